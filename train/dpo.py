"""DPO: Direct Preference Optimization (Rafailov et al. 2023) on preference pairs.

No reward model and no sampling: the policy itself is the reward model, implicitly,

    r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x))

where log pi(y|x) is the SUM of the response tokens' log-probs (eot included) and pi_ref is
the frozen SFT model the policy starts from. The loss is Bradley-Terry on those rewards:

    loss = -log sigmoid(r(x, chosen) - r(x, rejected))

--loss-type picks another loss of the same margin m = r(x, chosen) - r(x, rejected), as TRL's
DPOTrainer names them:

    sigmoid  -log sigmoid(m), with --label-smoothing e: -(1 - e) log sigmoid(m) - e log sigmoid(-m),
             conservative DPO (cDPO: e is the chance a pair's labels are swapped)
    hinge    max(0, 1 - m), SLiC's (Zhao et al. 2023)
    ipo      (h - 1 / (2 beta))^2 with h = m / beta, IPO (Azar et al. 2023): a squared loss that
             stops at a finite margin; its log-probs are each response's MEAN per token (as in
             TRL), not the sum

and two that need no reference model (none is built: half the memory), on each response's mean
per-token log-prob l(x, y), their implicit reward beta * l(x, y) and m = beta * (l_chosen - l_rejected):

    simpo    -log sigmoid(m - gamma), SimPO (Meng et al. 2024): a length-normalized reward and a
             target margin gamma (--simpo-gamma); --label-smoothing as the sigmoid loss's (TRL's
             CPOTrainer with loss_type simpo and cpo_alpha 0: its default cpo_alpha 1 adds the chosen
             answer's NLL, CPO-SimPO)
    orpo     NLL(chosen) - beta * log sigmoid(log odds(chosen) - log odds(rejected)), ORPO (Hong et
             al. 2024): SFT on the chosen answer (its mean token NLL over the batch's chosen tokens)
             plus an odds-ratio penalty, odds(y) = p / (1 - p) with p = exp(l(x, y)); beta is the
             paper's lambda (TRL's ORPOTrainer)

--rpo-alpha a adds a times the chosen answers' NLL (as ORPO's) to any loss but ORPO's own: RPO (Pang et al.
2024; TRL's rpo_alpha), DPO kept from lowering the chosen answers' likelihood along with the rejected ones'.

Gradient accumulation: every loss is a mean over pairs and every micro-batch --batch-size pairs, so --grad-accum k
trains as one batch of k x --batch-size pairs (tests/test_grad_accum_jobs.py), except ORPO's and RPO's NLL: each
micro-batch's is the mean over its own chosen tokens (as in TRL, whose cross-entropy is per training_step), and
the step takes the mean of those means. With chosen answers of different lengths a token of a micro-batch of short
ones weighs more than in one batch of all of them (the pair terms are unaffected).

The reference never changes, so its log-probs are computed once for every pair before
training (one forward each) and travel with the batches.

Reported (eval_fn, on held-out pairs, and on training pairs): the reward margin m, the accuracy
(m > 0) and the implicit rewards of chosen and rejected. With a reference they are exactly 0 at
step 0 (policy == ref).
"""
import copy
import math

import torch
import torch.nn.functional as F

from tritongpt.errors import UserError
from tritongpt.train import common
from tritongpt.train.preference import encode_pairs, pair_batch, sequence_logprobs
from tritongpt.cli import command_help


LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "orpo")
PER_TOKEN = ("ipo", "simpo", "orpo")  # the losses on each response's mean per-token log-prob, not the sum
REFERENCE_FREE = ("simpo", "orpo")
SMOOTHED = ("sigmoid", "simpo")  # the losses --label-smoothing applies to
SIMPO_GAMMA = 0.5  # TRL's CPOConfig.simpo_gamma


def log_odds(logp):
    """log(p / (1 - p)) of p = exp(logp), logp < 0 (a response's mean token log-prob); log(1 - p) as
    log(-expm1(logp)), exact as p nears 1, where log1p(-exp(logp)) loses its digits. A mean of exactly 0
    (every token certain, in fp32) is held just below it: its odds are finite, and huge."""
    logp = logp.clamp(max=-1e-6)
    return logp - torch.log(-torch.expm1(logp))


def dpo_loss(policy_logp, ref_logp, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             simpo_gamma: float = SIMPO_GAMMA, chosen_nll=None, rpo_alpha: float = 0.0):
    """policy_logp, ref_logp: [2B] (chosen rows, then rejected; ref_logp None for a reference-free loss).
    chosen_nll: ORPO's SFT term (and RPO's, times rpo_alpha), the chosen answers' mean token NLL.
    Returns (loss, margins [B])."""
    if chosen_nll is None and (loss_type == "orpo" or rpo_alpha):
        raise UserError(f"{'rpo_alpha' if rpo_alpha else 'the orpo loss'} needs chosen_nll, the chosen answers' NLL "
                        "(policy_terms gives it)")
    pc, pr = policy_logp.chunk(2)
    if loss_type in REFERENCE_FREE:
        h = pc - pr
    else:
        rc, rr = ref_logp.chunk(2)
        h = (pc - rc) - (pr - rr)
    margins = beta * h
    if loss_type in SMOOTHED:
        z = margins - simpo_gamma if loss_type == "simpo" else margins
        losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    elif loss_type == "hinge":
        losses = torch.relu(1 - margins)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "orpo":
        losses = chosen_nll - beta * F.logsigmoid(log_odds(pc) - log_odds(pr))
    else:
        raise UserError(f"--loss-type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    if rpo_alpha:
        losses = losses + rpo_alpha * chosen_nll
    return losses.mean(), margins


def response_logprobs(model, idx, mask, mean: bool = False):
    """[2B]: each response's summed token log-probs, or their mean per token (IPO's, SimPO's, ORPO's)."""
    lp = sequence_logprobs(model, idx, mask)
    return lp / mask.sum(-1) if mean else lp


def policy_terms(model, idx, mask, loss_type: str, rpo_alpha: float = 0.0):
    """(log-probs [2B] as the loss reads them, ORPO's (or RPO's) chosen NLL or None) from one forward: the NLL is
    the chosen answers' token-weighted mean over the batch, as TRL's ORPOTrainer's cross-entropy on them."""
    total, counts = sequence_logprobs(model, idx, mask), mask.sum(-1)
    lp = total / counts if loss_type in PER_TOKEN else total
    if loss_type != "orpo" and not rpo_alpha:
        return lp, None
    chosen, chosen_counts = total.chunk(2)[0], counts.chunk(2)[0]
    return lp, -chosen.sum() / chosen_counts.sum()


@torch.no_grad()
def reference_logprobs(ref, encoded, pad_id: int, device, dtype=torch.float32, batch_size: int = 32,
                       mean: bool = False):
    """[N, 2]: summed (or mean, IPO's) response log-probs of (chosen, rejected) under the frozen reference
    (a progress bar on stderr, rank 0's: minutes on a CPU before the first training step)."""
    ref.eval()
    out = []
    for i in common.progress(range(0, len(encoded), batch_size), "reference log-probs"):
        chunk = encoded[i:i + batch_size]
        idx, _, mask = pair_batch(chunk, pad_id, device)
        with common.autocast(device, dtype):
            lp = response_logprobs(ref, idx, mask, mean)
        out.append(torch.stack(lp.float().chunk(2), dim=1))
    return torch.cat(out)


class DPOData:
    """Encoded pairs with their reference log-probs (None for a reference-free loss); batches for the Trainer."""

    def __init__(self, encoded, ref_logp, pad_id: int):
        self.encoded, self.pad_id = encoded, pad_id
        self.ref_logp = None if ref_logp is None else ref_logp.cpu()

    def __len__(self):
        return len(self.encoded)

    def batch(self, rows, device="cpu"):
        """(idx, mask, ref log-probs or None, lengths): the rows' real tokens last, for a mixture of experts'
        load-balancing loss, which counts every token the policy routed, a response's or not."""
        idx, lengths, mask = pair_batch([self.encoded[i] for i in rows], self.pad_id, device)
        if self.ref_logp is None:
            return idx, mask, None, lengths
        ref = self.ref_logp[rows]
        return idx, mask, torch.cat([ref[:, 0], ref[:, 1]]).to(device), lengths


class FrozenReference:
    """The reference's fingerprint, saved with every checkpoint (as the Trainer's data state) and
    compared on --resume, as RLHF compares its frozen models: a resume rebuilds the reference
    from --init, and other weights there (an SFT run trained on since) would change every margin
    the run optimises, silently."""

    def __init__(self, ref):  # None: a reference-free loss, nothing to compare
        self.fingerprint = None if ref is None else common.weights_fingerprint(ref)

    def state_dict(self) -> dict:
        return {} if self.fingerprint is None else {"ref_fingerprint": self.fingerprint}

    def load_state_dict(self, d: dict):
        if self.fingerprint is not None and "ref_fingerprint" in d and \
                not common.same_fingerprint(d["ref_fingerprint"], self.fingerprint):
            raise UserError("--resume: --init is not the model this run's reference was (its weights differ): "
                            "pass the --init the run started from")


def make_loss_fn(beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 simpo_gamma: float = SIMPO_GAMMA, rpo_alpha: float = 0.0):
    def loss_fn(model, batch):
        idx, mask, ref = batch[:3]
        lp, nll = policy_terms(model, idx, mask, loss_type, rpo_alpha)
        loss = dpo_loss(lp, ref, beta, loss_type, label_smoothing, simpo_gamma, nll, rpo_alpha)[0]
        # a mixture of experts' load-balancing loss over the policy's one forward (chosen and rejected together;
        # the reference's log-probs are cached), a mean as the loss is: TRL's aux_loss_enabled adds it the same way
        aux = common.moe_aux_term(model, common.preference_real_mask(batch, 3))  # the pad tokens left out
        return loss if aux is None else loss + aux

    return loss_fn


@torch.no_grad()
def dpo_metrics(model, data: DPOData, beta: float, limit: int | None = None, batch_size: int = 32,
                loss_type: str = "sigmoid", label_smoothing: float = 0.0, simpo_gamma: float = SIMPO_GAMMA,
                rpo_alpha: float = 0.0) -> dict:
    """Mean loss, margin, accuracy and chosen/rejected implicit rewards over (the first limit) pairs (ORPO's
    loss: each batch's, its NLL a mean over that batch's chosen tokens, weighted by its pairs)."""
    device = next(model.parameters()).device
    n = min(len(data), limit or len(data))
    loss = margin = acc = rc = rr = 0.0
    for i in range(0, n, batch_size):
        rows = list(range(i, min(n, i + batch_size)))
        idx, mask, ref, _ = data.batch(rows, device)
        lp, nll = policy_terms(model, idx, mask, loss_type, rpo_alpha)
        lp = lp.float()
        l, m = dpo_loss(lp, ref, beta, loss_type, label_smoothing, simpo_gamma, nll, rpo_alpha)
        pc, pr = lp.chunk(2)
        c, r = (0.0, 0.0) if ref is None else ref.chunk(2)
        loss += l.item() * len(rows)
        margin += m.sum().item()
        acc += (m > 0).float().sum().item()
        rc += (beta * (pc - c)).sum().item()
        rr += (beta * (pr - r)).sum().item()
    return {"loss": loss / n, "margin": margin / n, "acc": acc / n, "chosen_reward": rc / n,
            "rejected_reward": rr / n}


def check_beta(beta, loss_type: str = "sigmoid", label_smoothing: float = 0.0, simpo_gamma=None,
               rpo_alpha: float = 0.0):
    if not 0 < beta < math.inf:
        raise UserError(f"--beta must be positive and finite, got {beta}")
    if loss_type not in LOSS_TYPES:
        raise UserError(f"--loss-type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    if not 0 <= label_smoothing < 0.5:
        raise UserError(f"--label-smoothing must be in [0, 0.5) (the chance a pair's labels are swapped), "
                        f"got {label_smoothing}")
    if label_smoothing and loss_type not in SMOOTHED:
        raise UserError(f"--label-smoothing is the sigmoid and simpo losses' (cDPO); --loss-type {loss_type} has "
                        "none")
    if simpo_gamma is not None:
        if loss_type != "simpo":
            raise UserError(f"--simpo-gamma is SimPO's target margin; --loss-type {loss_type} has none")
        if not 0 <= simpo_gamma < math.inf:
            raise UserError(f"--simpo-gamma must be a finite number >= 0, got {simpo_gamma}")
    if not 0 <= rpo_alpha < math.inf:
        raise UserError(f"--rpo-alpha must be a finite number >= 0 (0: none), got {rpo_alpha}")
    if rpo_alpha and loss_type == "orpo":
        raise UserError("--rpo-alpha adds the chosen answers' NLL, which ORPO's loss holds already")


def train_dpo(policy, ref, tokenizer, train_pairs, val_pairs, args, beta: float = 0.1,
              run_args: dict | None = None, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
              simpo_gamma: float | None = None, rpo_alpha: float = 0.0):
    """Fit the policy with the shared Trainer (ref frozen; None for a reference-free loss, which ignores
    one given). Returns the Trainer's final dict.

    Eval keys: val_loss, val_margin, val_acc, val_chosen_reward, val_rejected_reward,
    train_margin, train_acc (first 256 training pairs). run_args: the data flags; they and beta
    are named by a resume that changes them.
    """
    from tritongpt.train.loop import Trainer

    check_beta(beta, loss_type, label_smoothing, simpo_gamma, rpo_alpha)
    gamma = SIMPO_GAMMA if simpo_gamma is None else simpo_gamma
    mean = loss_type in PER_TOKEN
    device = common.pick_device(args.device)
    dtype = common.pick_dtype(args.dtype, device)
    ctx = policy.config.context_length
    pad = tokenizer.eot_id
    if loss_type in REFERENCE_FREE:
        ref = None
    elif ref is None:
        raise UserError(f"--loss-type {loss_type} compares the policy with a reference model: pass one (ref)")
    else:
        ref = ref.to(device).eval().requires_grad_(False)
        if args.kernels is not None:
            ref.set_kernels(args.kernels)

    def ref_logprobs(enc):
        return None if ref is None else reference_logprobs(ref, enc, pad, device, dtype, mean=mean)
    # The reference log-probs are cached dropout-free (eval); the policy's must match, or the
    # margins start biased away from 0. (RLHF does the same by keeping its policy in eval.)
    policy.set_dropout(0.0)
    train_enc = encode_pairs(train_pairs, tokenizer, ctx, "training pairs")
    train = DPOData(train_enc, ref_logprobs(train_enc), pad)
    val = None
    if val_pairs:
        val_enc = encode_pairs(val_pairs, tokenizer, ctx, "held-out pairs")
        val = DPOData(val_enc, ref_logprobs(val_enc), pad)
    if ref is not None:
        ref.cpu()  # its log-probs are cached: free the accelerator's memory for the policy

    def get_batch(split, generator):  # the Trainer draws training batches only
        rows = torch.randint(len(train), (args.batch_size,), generator=generator).tolist()
        return train.batch(rows)

    def eval_fn(model):
        out, kind = {}, dict(loss_type=loss_type, label_smoothing=label_smoothing, simpo_gamma=gamma,
                             rpo_alpha=rpo_alpha)
        if val is not None:
            out.update({f"val_{k}": v for k, v in dpo_metrics(model, val, beta, **kind).items()})
        t = dpo_metrics(model, train, beta, limit=256, **kind)
        out.update(train_margin=t["margin"], train_acc=t["acc"])
        return out

    from tritongpt.train.reward import DATA_DEFAULTS

    trainer = Trainer(policy, args, make_loss_fn(beta, loss_type, label_smoothing, gamma, rpo_alpha), get_batch,
                      eval_fn=eval_fn, name="dpo", data_state=FrozenReference(ref),
                      run_args={**(run_args or {}), "beta": beta, "loss_type": loss_type,
                                # the value used (None: no SimPO), not as spelled: a resume naming the default
                                # is the same run
                                "label_smoothing": label_smoothing, "simpo_gamma": gamma if loss_type == "simpo"
                                else None, "rpo_alpha": rpo_alpha},  # 0 too: a resume dropping it is named
                      prompt_format=train_pairs[0].format if train_pairs else None,
                      run_defaults={**DATA_DEFAULTS, "beta": 0.1, "loss_type": "sigmoid"})
    result = trainer.fit()
    if trainer.is_main:  # loss.png has the losses; margins and accuracy get their own plot
        common.plot_curves(trainer.metrics.rows(), trainer.out_dir / "margin.png",
                           keys=("val_margin", "train_margin", "val_acc", "train_acc"), title="dpo: reward margin")
    return result


def cmd_dpo(args):
    from tritongpt.commands import apply_lora, check_lora_args, check_qlora
    from tritongpt.train.reward import data_run_args, setup_preference_run

    check_lora_args(args)
    check_qlora(args)
    check_beta(args.beta, args.loss_type, args.label_smoothing, args.simpo_gamma, args.rpo_alpha)  # before the set-up
    targs, train, val, policy, tok = setup_preference_run(args, "dpo")
    # QLoRA: the set-up quantized the base (or kept a GPTQ/AWQ folder's): the reference is it, the policy with its
    # updates at 0
    ref = None if args.loss_type in REFERENCE_FREE else copy.deepcopy(policy)
    apply_lora(policy, args)  # the reference stays the whole --init model
    result = train_dpo(policy, ref, tok, train, val, targs, beta=args.beta,
                       run_args=data_run_args(args, base=policy),
                       loss_type=args.loss_type, label_smoothing=args.label_smoothing, simpo_gamma=args.simpo_gamma,
                       rpo_alpha=args.rpo_alpha)
    if not result.get("is_main", True):  # DDP: rank 0 reports
        return 0
    if "val_margin" in result:
        print(f"dpo: held-out reward margin {result['val_margin']:.4f}, accuracy {result['val_acc']:.3f}; "
              f"checkpoint {result['checkpoint']}")
    elif "checkpoint" in result:  # no held-out pairs: the checkpoint is still worth naming
        print(f"dpo: no held-out pairs to measure (--val-fraction); checkpoint {result['checkpoint']}")
    return 0


# the training flags' defaults of dpo and kto: an --init policy, tuned at a fine-tuning rate
POLICY_TRAIN_DEFAULTS = dict(max_steps=300, batch_size=16, lr=1e-5, min_lr=1e-6, warmup_steps=20, eval_every=50,
                             ckpt_every=100, sample_every=0, weight_decay=0.0)


def add_policy_args(p, unpaired: bool = False):
    """The flags dpo and kto share before their own: the --init policy (or a fresh --model), the preference data
    (kto's unpaired examples too), --vocab-multiple, LoRA and QLoRA's quantized base."""
    from tritongpt.commands import add_lora_args, add_model_args, add_qlora_args, add_vocab_multiple_arg
    from tritongpt.train.reward import add_data_args

    add_model_args(p, default_model=None, default_text="tiny, with no --init")
    add_data_args(p, unpaired=unpaired)
    add_vocab_multiple_arg(p, None, "as the --init model has them")
    add_lora_args(p)
    add_qlora_args(p)


def add_cli(sub):
    from tritongpt.train.loop import add_train_args

    p = sub.add_parser("dpo", help=command_help("dpo"))
    add_policy_args(p)
    p.add_argument("--beta", type=float, default=0.1,
                   help="DPO temperature beta; ORPO's lambda (the odds-ratio term's weight); SimPO's reward scale "
                        "(its paper uses 2 to 10) (default %(default)s)")
    p.add_argument("--loss-type", choices=LOSS_TYPES, default="sigmoid",
                   help="sigmoid: DPO's; hinge: SLiC's; ipo: IPO's squared loss on mean per-token log-probs; and "
                        "with no reference model, on mean per-token log-probs: simpo: SimPO's, orpo: ORPO's "
                        "(SFT on the chosen answer plus an odds-ratio term) (default %(default)s)")
    p.add_argument("--label-smoothing", type=float, default=0.0,
                   help="conservative DPO (cDPO) with the sigmoid (or simpo) loss: the chance a pair's labels are "
                        "swapped, in [0, 0.5) (default %(default)s)")
    p.add_argument("--simpo-gamma", type=float, default=None,
                   help=f"SimPO's target reward margin gamma (default {SIMPO_GAMMA}, TRL's)")
    p.add_argument("--rpo-alpha", type=float, default=0.0,
                   help="RPO: add this times the chosen answers' NLL to the loss (TRL's rpo_alpha; its paper uses 1; "
                        "0 = none; not with orpo, whose loss has it) (default %(default)s)")
    common.add_moe_aux_arg(p)
    add_train_args(p, out_dir="runs/dpo", **POLICY_TRAIN_DEFAULTS)
    p.set_defaults(func=cmd_dpo)
