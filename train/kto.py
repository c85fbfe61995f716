"""KTO: Kahneman-Tversky Optimization (Ethayarajh et al. 2024) on unpaired examples, as TRL's KTOTrainer computes it.

DPO needs pairs: two answers to one prompt, one preferred. KTO needs only a thumbs-up or -down on each answer:
examples (x, y, label), label True (desirable) or False (undesirable). Its implicit reward is DPO's,

    r(x, y) = log pi(y|x) - log pi_ref(y|x)        (beta * r is reported as the reward)

with log pi(y|x) the SUM of the completion's token log-probs (eot included) and pi_ref the frozen --init model.
Prospect theory's value function scores a reward against a reference point z0, the policy's KL from the
reference, estimated on the batch:

    desirable:    1 - sigmoid(beta * (r - z0))
    undesirable:  1 - sigmoid(beta * (z0 - r))
    z0 = max(0, mean over the batch of log pi(y'|x) - log pi_ref(y'|x)),  no gradient through it

where (x, y') is a mismatched pair: x with another example's completion, so that log pi - log pi_ref of it is a
sample of KL(pi(.|x) || pi_ref(.|x)) that says nothing about y being good or bad. z0 is a baseline, not something
to optimise (TRL computes it under no_grad), and a KL is never negative: a negative estimate is noise, clamped.
--loss-type apo_zero_unpaired (APO-zero, D'Oosterlinck et al. 2024) drops z0: desirable 1 - sigmoid(beta * r),
undesirable sigmoid(beta * r). The loss is the mean over the batch of desirable_weight * (desirable losses) and
undesirable_weight * (undesirable losses): a batch of one class only is as right as a mixed one.

Mismatched pairs. TRL rotates the completions by one within each chunk of batch_size examples of the dataset, in
its order (x_i with y_{i-1}, the chunk's first with its last), once, before training, and then samples batches at
random: an example keeps its partner. We do the same, so that the reference's log-probs of the mismatched pairs
are cached once with the matched ones (one reference forward in all, none per step). A partner's completion is cut
to fit the context after x (TRL truncates too). A chunk of one example is paired with itself (as in TRL).

Data: records {prompt, completion, label} (TRL's unpaired preference format; a chat's prompt a message list and
its completion one assistant message), or the pairs every other preference command takes (--data as dpo takes it,
or the embedded task pairs): each pair becomes (prompt, chosen, True) and (prompt, rejected, False), as TRL's
unpair_preference_dataset does, in blocks of UNPAIR_BLOCK pairs, chosen ones then rejected ones (as its map
batches of 1000: rotation neighbours are then other pairs' answers; 128 here, so that the first 256 training
examples, which the eval reads, are 128 whole pairs). Pairs are held out as dpo holds them out, before
unpairing: a pair's halves stay on one side.

Reported (eval_fn, on held-out examples and the first 256 training ones): the loss, z0 (kl), the mean reward of
desirable and of undesirable examples, their difference (margin), and for unpaired pairs the pairwise accuracy
(reward of chosen > reward of rejected). All rewards are exactly 0 at step 0 (policy == reference). The eval's
z0 is one estimate over the whole set it measures, not one per eval batch: a figure that does not depend on the
eval's batch size.

Under torchrun z0 is one estimate for the step: each rank's batch mean, averaged over the ranks (an all-reduce,
detached), then clamped at 0, as TRL gathers each process's mean, takes their mean and clamps it. Each rank's own
would give every rank another reference point for the same step, and a noisier one: a rank sees 1/world of the
examples. The eval (rank 0 alone) estimates z0 on all it measures and reduces nothing. One process: unchanged.
Under --grad-accum, though, each micro-batch estimates its own z0 from its --batch-size examples (TRL too takes
the KL in each training_step), so k micro-batches are not one batch of k x --batch-size as k ranks are. The loss
is a mean over examples and every micro-batch holds --batch-size of them: apo_zero_unpaired, with no z0,
accumulates exactly (tests/test_grad_accum_jobs.py).
"""
import copy
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from tritongpt.errors import UserError, note
from tritongpt.train import common, formats
from tritongpt.train.dpo import FrozenReference, check_beta
from tritongpt.train.preference import encode_fitting, response_batch, sequence_logprobs
from tritongpt.cli import command_help

LOSS_TYPES = ("kto", "apo_zero_unpaired")
UNPAIR_BLOCK = 128  # pairs unpaired together: their chosen answers, then their rejected ones
BALANCE = (1.0, 4 / 3)  # TRL's recommended desirable_weight * n_desirable / (undesirable_weight * n_undesirable)


# -- the loss --------------------------------------------------------------------------------------
def kl_estimate(policy_kl_logp, ref_kl_logp, across_ranks: bool = False):
    """z0: the batch's mean log-ratio on mismatched pairs, detached, at least 0. across_ranks (training under
    torchrun): the mean of every rank's batch mean, clamped after averaging (TRL: gather, mean, clamp); every rank
    must call it then, as every rank does a training step."""
    kl = (policy_kl_logp - ref_kl_logp).mean().detach()
    if across_ranks and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        kl = kl.clone()  # all_reduce writes in place
        dist.all_reduce(kl, op=dist.ReduceOp.SUM)
        kl = kl / dist.get_world_size()
    return kl.clamp(min=0)


def kto_loss(policy_logp, ref_logp, labels, beta: float, loss_type: str = "kto", policy_kl_logp=None,
             ref_kl_logp=None, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             kl_across_ranks: bool = False):
    """policy_logp, ref_logp, labels (bool: desirable): [B]; the KL log-probs [B] (kto's only); kl_across_ranks:
    z0 averaged over the torchrun ranks (kl_estimate). Returns (loss, rewards beta * r [B], z0 (None for
    apo_zero_unpaired))."""
    r = policy_logp - ref_logp
    if loss_type == "kto":
        if policy_kl_logp is None or ref_kl_logp is None:
            raise UserError("the kto loss needs the mismatched pairs' log-probs (policy_kl_logp, ref_kl_logp)")
        kl = kl_estimate(policy_kl_logp, ref_kl_logp, kl_across_ranks)
        desirable, undesirable = 1 - torch.sigmoid(beta * (r - kl)), 1 - torch.sigmoid(beta * (kl - r))
    elif loss_type == "apo_zero_unpaired":
        kl = None
        desirable, undesirable = 1 - torch.sigmoid(beta * r), torch.sigmoid(beta * r)
    else:
        raise UserError(f"--loss-type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    # each example its own class's loss; a class absent from the batch adds nothing (TRL: the mean of the two
    # classes' weighted losses concatenated)
    losses = torch.where(labels, desirable_weight * desirable, undesirable_weight * undesirable)
    return losses.mean(), beta * r, kl


def check_kto(beta, loss_type: str = "kto", desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
              batch_size: int | None = None):
    check_beta(beta)
    if loss_type not in LOSS_TYPES:
        raise UserError(f"--loss-type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    if loss_type == "kto" and batch_size is not None and batch_size < 2:
        # a chunk of one is its own mismatched pair: z0 = max(0, r), the example's own reward (TRL refuses too)
        raise UserError(f"kto: --batch-size must be at least 2 for --loss-type kto, got {batch_size}: with one "
                        "example a batch, its KL estimate is its own reward (raise --batch-size, lower --grad-accum)")
    for flag, w in (("--desirable-weight", desirable_weight), ("--undesirable-weight", undesirable_weight)):
        if not 0 < w < math.inf:
            raise UserError(f"{flag} must be positive and finite, got {w}")


def note_class_balance(n_desirable: int, n_undesirable: int, desirable_weight: float, undesirable_weight: float):
    """TRL's warning, as a note: the KTO paper finds desirable_weight * n_d / (undesirable_weight * n_u) best in
    [1, 4/3]; outside it, the weight of either class that would bring it back."""
    if not n_desirable or not n_undesirable:
        which = "desirable" if n_desirable else "undesirable"
        note(f"kto: every training example is {which}: KTO learns from both classes, weighted to balance "
             "(--desirable-weight, --undesirable-weight)")
        return
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    lo, hi = BALANCE
    if not lo <= ratio <= hi:
        d = undesirable_weight * n_undesirable / n_desirable
        u = desirable_weight * n_desirable / n_undesirable
        note(f"kto: desirable_weight * {n_desirable} desirable / (undesirable_weight * {n_undesirable} undesirable) "
             f"= {ratio:.3g}, outside [1, 4/3], the range TRL recommends: --desirable-weight in "
             f"[{d * lo:.3g}, {d * hi:.3g}] or --undesirable-weight in [{u / hi:.3g}, {u / lo:.3g}] brings it in")


# -- data --------------------------------------------------------------------------------------------
@dataclass
class UnpairedExample:
    prompt: str | tuple  # as PreferencePair's: formatted text, or a chat's ChatPrompt
    completion: str
    label: bool  # True: desirable
    format: str = field(default="completion", compare=False)  # of the prompt: formats.FORMATS
    pair: int | None = field(default=None, compare=False)  # the pair it was unpaired from (its halves share it)


def _record_to_example(rec, where: str) -> UnpairedExample:
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for key in ("prompt", "completion", "label"):
        if key not in rec:
            raise UserError(f"{where}: missing field '{key}'")
    if not isinstance(rec["label"], bool):  # 1 or "yes" is a guess at what was meant: not taken
        raise UserError(f"{where}: field 'label' must be true (desirable) or false (undesirable), "
                        f"got {rec['label']!r}")
    if isinstance(rec["prompt"], list) or isinstance(rec["completion"], list):
        prompt = formats.check_messages(rec["prompt"], where, "prompt", ends_with="user")
        completion = formats.one_answer(rec, "completion", where)  # (its content must not be empty)
        return UnpairedExample(formats.ChatPrompt(prompt), completion, rec["label"], format="chat")
    for key in ("prompt", "completion"):
        if not isinstance(rec[key], str) or not rec[key].strip():
            raise UserError(f"{where}: field '{key}' must be a non-empty string")
    return UnpairedExample(rec["prompt"], rec["completion"], rec["label"])


def is_unpaired(raw) -> bool:
    """Whether records (where, record) are unpaired examples: the first has a label or a completion (a pair has
    neither), so a file of them missing a field later is told so, not that it lacks 'chosen'."""
    rec = raw[0][1] if raw else None
    return isinstance(rec, dict) and ("label" in rec or "completion" in rec)


def unpaired_examples(raw) -> list[UnpairedExample]:
    """Examples from (where, record) pairs; chats and text prompts do not mix in one file (as with pairs)."""
    out, first = [], None
    for where, rec in raw:
        out.append(_record_to_example(rec, where))
        if first is None:
            first = where
        elif (out[-1].format == "chat") != (out[0].format == "chat"):
            raise UserError(f"{where} is {formats.with_article(out[-1].format)} record but {first} is "
                            f"{out[0].format}: a file holds chats or text prompts, not both")
    return out


def unpair(pairs, block: int = UNPAIR_BLOCK) -> list[UnpairedExample]:
    """(prompt, chosen, True) and (prompt, rejected, False) of each pair, in blocks of `block` pairs: the block's
    chosen answers, then its rejected ones (see the module doc)."""
    out = []
    for start in range(0, len(pairs), block):
        ids = range(start, min(len(pairs), start + block))
        out += [UnpairedExample(pairs[i].prompt, pairs[i].chosen, True, pairs[i].format, i) for i in ids]
        out += [UnpairedExample(pairs[i].prompt, pairs[i].rejected, False, pairs[i].format, i) for i in ids]
    return out


def train_val_examples(source=None, n: int = 2000, val_fraction: float = 0.1, seed: int = 0):
    """(train, held-out) examples: a file of unpaired records split by prompt, as SFT splits records; pairs (a
    file's, or the embedded ones: n of them) split as dpo splits them, then unpaired."""
    from tritongpt.train.preference import is_embedded, preference_pairs, split_pairs, train_val_pairs
    from tritongpt.train.sft import read_json_records, split_by_prompt

    if is_embedded(source):
        train, val = train_val_pairs(source, n, val_fraction, seed)
    else:
        raw = read_json_records(source, what="preference file")
        if is_unpaired(raw):
            return split_by_prompt(unpaired_examples(raw), val_fraction, lambda e: formats.prompt_key(e.prompt))
        train, val = split_pairs(preference_pairs(raw), val_fraction)
    return unpair(train), unpair(val)


@dataclass
class EncodedExample:
    prompt: list  # token ids
    completion: list  # ids, the end token included
    label: bool
    pair: int | None = None


def encode_examples(examples, tokenizer, max_len: int, what: str = "examples") -> list[EncodedExample]:
    """Tokenize (preference.py's layout); examples whose prompt + completion exceed max_len are dropped (counted)."""
    return encode_fitting(examples, tokenizer, max_len, what, lambda e: (e.completion,),
                          lambda e, prompt, answers: EncodedExample(prompt, answers[0], e.label, e.pair))


def mismatched_partners(n: int, chunk: int) -> list[int]:
    """partner[i]: whose completion example i's prompt is scored with for z0. TRL's rotation by one within each
    chunk of `chunk` examples: i takes i - 1's, a chunk's first takes its last's."""
    partner = []
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        partner += [end - 1] + list(range(start, end - 1))
    return partner


# -- batches and log-probs ---------------------------------------------------------------------------
class KTOData:
    """Encoded examples, their mismatched completions and (once cached) the reference's log-probs of both."""

    def __init__(self, encoded, chunk: int, max_len: int, pad_id: int):
        self.encoded, self.pad_id = encoded, pad_id
        # the partner's completion, cut to fit after this prompt (each example's own fits: max_len - prompt >= 1)
        self.kl_completions = [encoded[j].completion[:max_len - len(e.prompt)]
                               for e, j in zip(encoded, mismatched_partners(len(encoded), chunk))]
        self.labels = torch.tensor([e.label for e in encoded], dtype=torch.bool)
        self.ref_logp = self.ref_kl_logp = None  # [N] each: cache_reference

    def __len__(self):
        return len(self.encoded)

    def inputs(self, rows, device="cpu", kl: bool = True):
        """(idx, mask) of the rows' (prompt, completion), and of their mismatched pairs (None, None without kl)."""
        prompts = [self.encoded[i].prompt for i in rows]
        idx, _, mask = response_batch(prompts, [self.encoded[i].completion for i in rows], self.pad_id, device)
        if not kl:
            return idx, mask, None, None
        kl_idx, _, kl_mask = response_batch(prompts, [self.kl_completions[i] for i in rows], self.pad_id, device)
        return idx, mask, kl_idx, kl_mask

    def batch(self, rows, device="cpu", kl: bool = True):
        """What the loss reads: (idx, mask, kl_idx, kl_mask, labels, ref_logp, ref_kl_logp, lengths), lengths the
        rows' real tokens (idx's, response_batch's), which a mixture of experts' load-balancing loss counts."""
        ref_kl = self.ref_kl_logp[rows].to(device) if kl else None
        lengths = torch.tensor([len(self.encoded[i].prompt) + len(self.encoded[i].completion) for i in rows],
                               dtype=torch.long, device=device)
        return (*self.inputs(rows, device, kl), self.labels[rows].to(device), self.ref_logp[rows].to(device), ref_kl,
                lengths)


def logprobs(model, idx, mask, kl_idx=None, kl_mask=None):
    """Summed completion log-probs [B] (fp32) of the rows, and of their mismatched pairs (None without them)."""
    lp = sequence_logprobs(model, idx, mask).float()
    return lp, None if kl_idx is None else sequence_logprobs(model, kl_idx, kl_mask).float()


@torch.no_grad()
def cache_reference(ref, data: KTOData, device, dtype=torch.float32, kl: bool = True, batch_size: int = 32):
    """The frozen reference's log-probs of every example (and of its mismatched pair), once, before training (a
    progress bar on stderr, rank 0's)."""
    ref.eval()
    lps, kls = [], []
    for i in common.progress(range(0, len(data), batch_size), "reference log-probs"):
        with common.autocast(device, dtype):
            lp, k = logprobs(ref, *data.inputs(range(i, min(len(data), i + batch_size)), device, kl))
        lps.append(lp.cpu())
        kls.append(k.cpu() if kl else None)
    data.ref_logp = torch.cat(lps)
    data.ref_kl_logp = torch.cat(kls) if kl else None
    return data


def make_loss_fn(beta: float, loss_type: str = "kto", desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """The Trainer's loss_fn. Its z0 is averaged over the torchrun ranks (every rank runs each training step);
    loss_fn.kl holds the z0 (a detached tensor) of its last call, None for apo_zero_unpaired."""
    def loss_fn(model, batch):
        idx, mask, kl_idx, kl_mask, labels, ref, ref_kl = batch[:7]
        lp = sequence_logprobs(model, idx, mask).float()
        # a mixture of experts' load-balancing loss, read now: z0's forward below replaces the routers' logits
        # (the KL batch's forward is z0's baseline, under no_grad: nothing of it trains)
        aux = common.moe_aux_term(model, common.preference_real_mask(batch, 7))  # the pad tokens left out
        policy_kl = None
        if loss_type == "kto":
            with torch.no_grad():  # z0 is a baseline, not optimised: no graph kept for it (TRL's no_grad)
                policy_kl = sequence_logprobs(model, kl_idx, kl_mask).float()
        loss, _, loss_fn.kl = kto_loss(lp, ref, labels, beta, loss_type, policy_kl, ref_kl, desirable_weight,
                                       undesirable_weight, kl_across_ranks=True)
        return loss if aux is None else loss + aux

    loss_fn.kl = None
    return loss_fn


@torch.no_grad()
def kto_metrics(model, data: KTOData, beta: float, loss_type: str = "kto", desirable_weight: float = 1.0,
                undesirable_weight: float = 1.0, limit: int | None = None, batch_size: int = 32) -> dict:
    """Over (the first limit) examples, z0 estimated on all of them at once (not per batch: a figure that does not
    depend on the eval's batch size): loss, kl (kto's), desirable_reward, undesirable_reward and margin (a class
    absent: its keys left out), and acc over the unpaired pairs both halves of which are there."""
    device = next(model.parameters()).device
    n = min(len(data), limit or len(data))
    kl = loss_type == "kto"
    lps, kls = [], []
    for i in range(0, n, batch_size):
        lp, k = logprobs(model, *data.inputs(range(i, min(n, i + batch_size)), device, kl))
        lps.append(lp.cpu())
        kls.append(k.cpu() if kl else None)
    lp, labels = torch.cat(lps), data.labels[:n]
    loss, rewards, z0 = kto_loss(lp, data.ref_logp[:n], labels, beta, loss_type, torch.cat(kls) if kl else None,
                                 data.ref_kl_logp[:n] if kl else None, desirable_weight, undesirable_weight)
    out = {"loss": loss.item()}
    if kl:
        out["kl"] = z0.item()
    if labels.any():
        out["desirable_reward"] = rewards[labels].mean().item()
    if not labels.all():
        out["undesirable_reward"] = rewards[~labels].mean().item()
    if labels.any() and not labels.all():
        out["margin"] = out["desirable_reward"] - out["undesirable_reward"]
    halves = {}  # pair -> {label: reward}
    for e, r in zip(data.encoded[:n], rewards.tolist()):
        if e.pair is not None:
            halves.setdefault(e.pair, {})[e.label] = r
    both = [h for h in halves.values() if len(h) == 2]
    if both:
        out["acc"] = sum(h[True] > h[False] for h in both) / len(both)
    return out


# -- training ------------------------------------------------------------------------------------------
def train_kto(policy, ref, tokenizer, train_examples, val_examples, args, beta: float = 0.1,
              run_args: dict | None = None, loss_type: str = "kto", desirable_weight: float = 1.0,
              undesirable_weight: float = 1.0):
    """Fit the policy with the shared Trainer, ref frozen. Returns the Trainer's final dict.

    Eval keys: val_loss, val_kl, val_desirable_reward, val_undesirable_reward, val_margin, val_acc (held-out
    unpaired pairs), and train_margin, train_kl, train_acc (first 256 training examples); a key a set has no
    figure for is left out. run_args: the data flags; they, beta, the loss type and the weights are named by a
    resume that changes them.
    """
    from tritongpt.train.loop import Trainer

    check_kto(beta, loss_type, desirable_weight, undesirable_weight, args.batch_size)
    if ref is None:
        raise UserError("KTO compares the policy with a reference model: pass one (ref)")
    device = common.pick_device(args.device)
    dtype = common.pick_dtype(args.dtype, device)
    ctx, pad, kl = policy.config.context_length, tokenizer.eot_id, loss_type == "kto"
    ref = ref.to(device).eval().requires_grad_(False)
    if args.kernels is not None:
        ref.set_kernels(args.kernels)
    # the reference log-probs are cached dropout-free (eval); the policy's must match, or the rewards start
    # away from 0 (as dpo does)
    policy.set_dropout(0.0)

    def data(examples, what):
        enc = encode_examples(examples, tokenizer, ctx, what)
        return cache_reference(ref, KTOData(enc, args.batch_size, ctx, pad), device, dtype, kl)

    train = data(train_examples, "training examples")
    val = data(val_examples, "held-out examples") if val_examples else None
    ref.cpu()  # its log-probs are cached: free the accelerator's memory for the policy
    n_desirable = int(train.labels.sum())
    note_class_balance(n_desirable, len(train) - n_desirable, desirable_weight, undesirable_weight)

    def get_batch(split, generator):  # the Trainer draws training batches only
        rows = torch.randint(len(train), (args.batch_size,), generator=generator).tolist()
        return train.batch(rows, kl=kl)

    def eval_fn(model):
        out, kind = {}, dict(loss_type=loss_type, desirable_weight=desirable_weight,
                             undesirable_weight=undesirable_weight)
        if val is not None:
            out.update({f"val_{k}": v for k, v in kto_metrics(model, val, beta, **kind).items()})
        t = kto_metrics(model, train, beta, limit=256, **kind)
        out.update({f"train_{k}": t[k] for k in ("margin", "kl", "acc") if k in t})
        return out

    from tritongpt.train.reward import DATA_DEFAULTS

    trainer = Trainer(policy, args, make_loss_fn(beta, loss_type, desirable_weight, undesirable_weight), get_batch,
                      eval_fn=eval_fn, name="kto", data_state=FrozenReference(ref),
                      run_args={**(run_args or {}), "beta": beta, "loss_type": loss_type,
                                "desirable_weight": desirable_weight, "undesirable_weight": undesirable_weight},
                      prompt_format=train_examples[0].format if train_examples else None,
                      run_defaults={**DATA_DEFAULTS, "beta": 0.1, "loss_type": "kto", "desirable_weight": 1.0,
                                    "undesirable_weight": 1.0})
    result = trainer.fit()
    if trainer.is_main:  # loss.png has the losses; the rewards get their own plot
        common.plot_curves(trainer.metrics.rows(), trainer.out_dir / "margin.png",
                           keys=("val_margin", "train_margin", "val_acc", "train_acc"), title="kto: reward margin")
    return result


def cmd_kto(args):
    from tritongpt.commands import apply_lora, check_lora_args, check_qlora
    from tritongpt.train.reward import data_run_args, setup_preference_run

    check_lora_args(args)
    check_qlora(args)
    check_kto(args.beta, args.loss_type, args.desirable_weight, args.undesirable_weight,
              args.batch_size)  # before the set-up
    targs, train, val, policy, tok = setup_preference_run(
        args, "kto", lambda a: train_val_examples(a.data, a.num_pairs, a.val_fraction, a.seed))
    ref = copy.deepcopy(policy)  # (QLoRA: the quantized base, as the set-up left it (or a GPTQ/AWQ folder's): the
    # policy at step 0)
    apply_lora(policy, args)  # the reference stays the whole --init model
    result = train_kto(policy, ref, tok, train, val, targs, beta=args.beta,
                       run_args=data_run_args(args, base=policy),
                       loss_type=args.loss_type, desirable_weight=args.desirable_weight,
                       undesirable_weight=args.undesirable_weight)
    if not result.get("is_main", True):  # DDP: rank 0 reports
        return 0
    if "val_margin" in result:
        acc = f", pairwise accuracy {result['val_acc']:.3f}" if "val_acc" in result else ""
        print(f"kto: held-out reward margin {result['val_margin']:.4f} (desirable "
              f"{result['val_desirable_reward']:.4f}, undesirable {result['val_undesirable_reward']:.4f}){acc}; "
              f"checkpoint {result['checkpoint']}")
    elif "val_loss" in result:  # held-out examples of one class: no margin
        print(f"kto: held-out loss {result['val_loss']:.4f} (its examples are of one class: no margin); "
              f"checkpoint {result['checkpoint']}")
    elif "checkpoint" in result:  # no held-out examples: the checkpoint is still worth naming
        print(f"kto: no held-out examples to measure (--val-fraction); checkpoint {result['checkpoint']}")
    return 0


def add_cli(sub):
    from tritongpt.train.dpo import POLICY_TRAIN_DEFAULTS, add_policy_args
    from tritongpt.train.loop import add_train_args

    p = sub.add_parser("kto", help=command_help("kto"))
    add_policy_args(p, unpaired=True)
    p.add_argument("--beta", type=float, default=0.1, help="KTO temperature beta (default %(default)s)")
    p.add_argument("--loss-type", choices=LOSS_TYPES, default="kto",
                   help="kto: KTO's, rewards against the policy's KL from the reference (estimated on mismatched "
                        "prompt-completion pairs); apo_zero_unpaired: APO-zero's, against 0 (default %(default)s)")
    p.add_argument("--desirable-weight", type=float, default=1.0,
                   help="weight of the desirable examples' losses (TRL's desirable_weight) (default %(default)s)")
    p.add_argument("--undesirable-weight", type=float, default=1.0,
                   help="weight of the undesirable examples' losses; a note says when the weights times the class "
                        "counts are outside TRL's recommended ratio (default %(default)s)")
    common.add_moe_aux_arg(p)
    add_train_args(p, out_dir="runs/kto", **POLICY_TRAIN_DEFAULTS)
    p.set_defaults(func=cmd_kto)
