"""Knowledge distillation from a frozen teacher: `pretrain --teacher W` and `sft --teacher W`.

The student trains on a mix of the usual next-token cross-entropy and a divergence from the
teacher's next-token distribution at the same positions (Hinton et al. 2015, "Distilling the
Knowledge in a Neural Network"):

    loss = (1 - alpha) * CE + alpha * T^2 * D

CE is the run's objective (lm_loss, with its --label-smoothing and --z-loss; a mixture of experts
adds its load-balancing loss as forward(targets=) does, outside the mix). D is TRL's GKDTrainer
generalized_jsd_loss (Agarwal et al. 2024, "On-Policy Distillation of Language Models") on the
logits divided by the temperature T, summed over the vocabulary per position and averaged over the
counted positions (pretrain: every target; SFT: the response tokens it counts):

    beta = 0:   KL(teacher || student)                     forward KL, Hinton's
    beta = 1:   KL(student || teacher)                     reverse KL, mode seeking
    otherwise:  beta * KL(teacher || M) + (1 - beta) * KL(student || M),
                M = (1 - beta) * student + beta * teacher  (mixed as probabilities, in log space)

As in TRL, beta near 0 is not forward KL (M is then nearly the student and both terms vanish):
beta = 0 is its own case. The T^2 is Hinton's: the soft targets' gradients scale as 1/T^2, so T^2
keeps their weight against CE's as T changes. TRL's GKDTrainer leaves it out; at T = 1 the two agree.

Both models' logits are compared over the tokenizer's ids only: a padded vocabulary's extra rows
(--vocab-multiple, or a GPT-2 preset's 50257 with a smaller tokenizer) are no token, and differ
between models. The teacher must give the same ids for the same text (its saved tokenizer is the
student's) and see the whole training block (its context is at least as long).

The distillation path asks the student for its logits (model(x)) and computes CE on them with the
reference lm_loss: the Triton fused LM-head loss (which never makes the logits whole) is not used,
so the step's memory is the logits' ([batch, block, vocab] for the student and the teacher, and a
few fp32 copies while the loss is made). Evaluations still score the plain cross-entropy.
"""
import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from tritongpt.errors import UserError

DEFAULT_ALPHA, DEFAULT_TEMPERATURE, DEFAULT_BETA = 0.5, 1.0, 0.0
FLAGS = {"distill_alpha": "--distill-alpha", "distill_temperature": "--distill-temperature",
         "distill_beta": "--distill-beta"}
# what a run without a teacher records, and so what a checkpoint from before these flags ran with (a resume at
# them names nothing: common.unrecorded_flags)
RUN_DEFAULTS = {"teacher": None, "distill_alpha": DEFAULT_ALPHA, "distill_temperature": DEFAULT_TEMPERATURE,
                "distill_beta": DEFAULT_BETA}


def add_distill_args(p: argparse.ArgumentParser) -> None:
    """--teacher and its three options (pretrain and sft)."""
    g = p.add_argument_group("distillation")
    g.add_argument("--teacher", default=None, metavar="W",
                   help="distill from this frozen model (a checkpoint, run folder, Hugging Face folder or Hub "
                        "id, read as --init is): the loss mixes the cross-entropy with a divergence from its "
                        "next-token distribution. It must have the student's tokenizer and a context at least "
                        "the training block's (default: none)")
    g.add_argument("--distill-alpha", type=float, default=None, metavar="A",
                   help="with --teacher: loss = (1 - A) * CE + A * T^2 * divergence, A in [0, 1] "
                        f"(default {DEFAULT_ALPHA})")
    g.add_argument("--distill-temperature", type=float, default=None, metavar="T",
                   help="with --teacher: both models' logits divided by T > 0 for the divergence, which is "
                        f"then times T^2 (Hinton's; TRL's GKD has no T^2) (default {DEFAULT_TEMPERATURE})")
    g.add_argument("--distill-beta", type=float, default=None, metavar="B",
                   help="with --teacher: TRL GKD's generalized JSD, B in [0, 1]: 0 forward KL(teacher || "
                        "student), 1 reverse KL(student || teacher), between them the JSD with a mixture of "
                        f"(1 - B) student and B teacher (default {DEFAULT_BETA})")


def distill_options(args) -> dict:
    """{teacher, distill_alpha, distill_temperature, distill_beta}, checked, defaults filled in (the
    run's record: a resume names a change). The options without --teacher are refused by name."""
    teacher = getattr(args, "teacher", None)
    given = {k: getattr(args, k, None) for k in FLAGS}
    if teacher is None:
        stray = [FLAGS[k] for k, v in given.items() if v is not None]
        if stray:
            raise UserError(f"{', '.join(stray)} set{'s' if len(stray) == 1 else ''} how --teacher's "
                            "distillation mixes in: without --teacher it does nothing (pass --teacher W)")
    alpha = DEFAULT_ALPHA if given["distill_alpha"] is None else given["distill_alpha"]
    temperature = DEFAULT_TEMPERATURE if given["distill_temperature"] is None else given["distill_temperature"]
    beta = DEFAULT_BETA if given["distill_beta"] is None else given["distill_beta"]
    if not 0 <= alpha <= 1:  # nan fails too
        raise UserError(f"--distill-alpha must be in [0, 1], got {alpha}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise UserError(f"--distill-temperature must be a finite number > 0, got {temperature}")
    if not 0 <= beta <= 1:
        raise UserError(f"--distill-beta must be in [0, 1], got {beta}")
    from tritongpt.train import common

    return {"teacher": common.data_path(teacher), "distill_alpha": alpha, "distill_temperature": temperature,
            "distill_beta": beta}


# -- the loss ------------------------------------------------------------------------------------------
def divergence(student_logits, teacher_logits, temperature: float = 1.0, beta: float = 0.0):
    """Per position (fp32, the logits' shape less the vocabulary): TRL GKD's generalized JSD between
    softmax(student / T) and softmax(teacher / T), summed over the vocabulary (module docstring)."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0:
        return (t.exp() * (t - s)).sum(-1)
    if beta == 1:
        return (s.exp() * (s - t)).sum(-1)
    # log((1 - beta) p_s + beta p_t), without leaving log space
    m = torch.logsumexp(torch.stack([s + math.log1p(-beta), t + math.log(beta)]), dim=0)
    return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)


def distill_loss(student_logits, teacher_logits, targets, vocab_size: int, alpha: float, temperature: float = 1.0,
                 beta: float = 0.0, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 z_loss: float = 0.0):
    """(loss, ce, kd): loss = (1 - alpha) * ce + alpha * T^2 * kd, where ce is lm_loss on the student's
    logits (its options as given) and kd the divergence over the first vocab_size ids, both over the
    positions whose target is not ignore_index: their mean (reduction "mean") or sum ("sum")."""
    from tritongpt.model.gpt import lm_loss

    ce = lm_loss(student_logits, targets, ignore_index, reduction, label_smoothing, z_loss)
    d = divergence(student_logits[..., :vocab_size], teacher_logits[..., :vocab_size], temperature, beta)
    counted = targets != ignore_index
    kd = torch.where(counted, d, 0.0).sum()
    if reduction == "mean":
        kd = kd / counted.sum()
    return (1 - alpha) * ce + alpha * temperature ** 2 * kd, ce, kd


def unwrapped(model):
    """The GPTModel inside DDP's and torch.compile's wrappers (its config and router losses)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


class Parts:
    """The last optimizer step's CE and divergence, for the metrics row (distill_ce, distill_kd): sums and
    counts over this process's micro-batches (under DDP, rank 0 logs its own share of the batch)."""

    def __init__(self):
        self.sums = None

    def add(self, ce, kd, n):
        got = torch.stack([ce.detach().float(), kd.detach().float(), torch.as_tensor(n, device=ce.device).float()])
        self.sums = got if self.sums is None else self.sums + got

    def pop(self) -> dict:
        if self.sums is None:
            return {}
        ce, kd, n = self.sums.tolist()
        self.sums = None
        return {"distill_ce": ce / max(n, 1), "distill_kd": kd / max(n, 1)}


def pretrain_loss_fn(teacher, opts: dict, vocab_size: int, doc_ids_of, parts: Parts | None = None, **loss_options):
    """pretrain's training loss with a teacher: fn(model, (x, y)) -> the mean loss. doc_ids_of(x): the
    document ids (--document-mask) or None, given to both models."""
    def loss_fn(m, batch):
        x, y = batch
        doc_ids = doc_ids_of(x)
        with torch.no_grad():
            t_logits = teacher(x, doc_ids=doc_ids)
        loss, ce, kd = distill_loss(m(x, doc_ids=doc_ids), t_logits, y, vocab_size, opts["distill_alpha"],
                                    opts["distill_temperature"], opts["distill_beta"], **loss_options)
        if parts is not None:
            parts.add(ce * y.numel(), kd * y.numel(), y.numel())
        cfg = unwrapped(m).config
        if cfg.moe_aux_loss:  # as forward(targets=) adds it to a mean loss
            loss = loss + cfg.moe_aux_loss * unwrapped(m).router_aux_loss()
        return loss

    return loss_fn


def sft_loss_fn(teacher, opts: dict, vocab_size: int, ignore_index: int, parts: Parts | None = None,
                **loss_options):
    """SFT's training loss with a teacher: fn(model, (inputs, targets[, doc_ids])) -> (loss sum, count)
    over the counted (response) targets, as sft_loss returns them (no aux loss: as sft_loss, a sum)."""
    def loss_fn(m, batch):
        inputs, targets = batch[0], batch[1]
        doc_ids = batch[2] if len(batch) > 2 else None  # --packing: each example kept apart, in both models
        with torch.no_grad():
            t_logits = teacher(inputs, doc_ids=doc_ids)
        loss, ce, kd = distill_loss(m(inputs, doc_ids=doc_ids), t_logits, targets, vocab_size,
                                    opts["distill_alpha"], opts["distill_temperature"], opts["distill_beta"],
                                    ignore_index=ignore_index, reduction="sum", **loss_options)
        n = (targets != ignore_index).sum()
        if parts is not None:
            parts.add(ce, kd, n)
        return loss, n

    return loss_fn


# -- the teacher ---------------------------------------------------------------------------------------
def load_teacher(spec: str, tok, block: int, student: str):
    """--teacher's model (frozen, eval mode, on the CPU until place_teacher), refused where its tokenizer
    gives other ids than the student's `tok` or its context is shorter than `block`. student: how the
    student's weights were named (for the messages)."""
    from tritongpt.train import gpt_neo_weights
    from tritongpt.train.gpt2_weights import HUB_REPOS
    from tritongpt.train.sft import load_init_model, pick_tokenizer
    from tritongpt.train.tokenizer import same_ids

    named = spec in HUB_REPOS or spec in gpt_neo_weights.HUB_REPOS
    if not Path(spec).expanduser().exists() and not named:  # load_init_model would make a preset's random weights
        raise UserError(f"--teacher {spec}: no checkpoint there (a run or checkpoint folder, a weights file, a "
                        "Hugging Face folder or Hub id, or a GPT-2 or GPT-Neo name)")
    teacher = load_init_model(spec)
    theirs = pick_tokenizer(None, spec, teacher.config.vocab_size)
    if not same_ids(theirs, tok):
        raise UserError(f"--teacher {spec}'s tokenizer ({theirs.name}) is not the student's ({student}: "
                        f"{tok.name}): other ids for the same text, so their next-token distributions cannot be "
                        "compared (distill from a teacher with the student's tokenizer)")
    if teacher.config.context_length < block:
        raise UserError(f"--teacher {spec}'s context length {teacher.config.context_length} is shorter than the "
                        f"training block of {block} tokens ({student}): it cannot score every position (lower "
                        "--block-size / --max-length, or a teacher with a longer context)")
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def place_teacher(teacher, trainer) -> None:
    """On the trainer's device, with its kernels (the loss function runs it under the trainer's autocast). A
    refusal (kernels the teacher's shape cannot take) names the teacher, and closes the trainer's process group
    first, as a refusal of the data does."""
    try:
        teacher.to(trainer.device)
        if trainer.args.kernels is not None:
            try:
                teacher.set_kernels(trainer.args.kernels)
            except UserError as e:
                raise UserError(f"--teacher: {e}") from None
        teacher.eval()
    except BaseException:
        trainer.close()
        raise


class WithTeacher:
    """A Trainer data state that also saves the teacher's weights' fingerprint and compares it on --resume,
    as RLHF does for its frozen models: other weights at the same path (a run trained on since) would
    change every target the student learns, silently. The run's data state is kept as it was."""

    def __init__(self, inner, teacher, spec: str):
        from tritongpt.train import common

        self.inner, self.spec = inner, spec
        self.fingerprint = common.weights_fingerprint(teacher)

    def state_dict(self) -> dict:
        return {**(self.inner.state_dict() if self.inner is not None else {}), "teacher_fingerprint": self.fingerprint}

    def load_state_dict(self, d: dict):
        from tritongpt.train import common

        if "teacher_fingerprint" in d and not common.same_fingerprint(d["teacher_fingerprint"], self.fingerprint):
            raise UserError(f"--resume: --teacher {self.spec} is not the model this run distilled from (its weights "
                            "differ): pass the run's teacher")
        if self.inner is not None:
            self.inner.load_state_dict({k: v for k, v in d.items() if k != "teacher_fingerprint"})
