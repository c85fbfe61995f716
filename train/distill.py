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

On-policy distillation (sft only: it needs prompts; GKD, Agarwal et al. 2024, as TRL's GKDTrainer.training_step
and GKDConfig): --distill-seq-kd has the teacher answer every batch's prompts (sequence-level KD), then with
probability --distill-lmbda the student answers them instead, sampled at --distill-gen-temperature, at most
--distill-max-new-tokens (OnPolicy, below). A batch of the student's own answers is learned through A * T^2 * D
alone: CE on them would teach the student its own samples (sft_loss_fn). Our lmbda defaults to 0 (TRL's 0.5).

Where the student runs the Triton loss (its kernels include "cross_entropy") the loss is
kernels/jsd.py's linear_distill_loss: both LM heads and the whole loss fused, a chunk of rows at a
time, so neither model's [batch, block, vocab] logits ever exist whole (fused_head says when). Label
smoothing, the z-loss and a logit soft cap (student's or teacher's) are not in that kernel: with one of
them, as on the reference path, each model's logits are made whole (model(x)) and distill_loss takes CE
with the reference lm_loss and the divergence on them, with the step's memory the logits' and a few fp32
copies. Evaluations still score the plain cross-entropy.
"""
import argparse
import math
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from tritongpt.errors import UserError
from tritongpt.train.common import moe_aux_term, sft_real_mask

DEFAULT_ALPHA, DEFAULT_TEMPERATURE, DEFAULT_BETA = 0.5, 1.0, 0.0
# GKD's on-policy options (sft only): TRL's GKDConfig has lmbda 0.5, temperature 0.9 and max_new_tokens 128; our
# lmbda is 0 (off) so that a run without the flag is plain distillation, as before it existed
DEFAULT_LMBDA, DEFAULT_GEN_TEMPERATURE, DEFAULT_MAX_NEW_TOKENS = 0.0, 0.9, 128
FLAGS = {"distill_alpha": "--distill-alpha", "distill_temperature": "--distill-temperature",
         "distill_beta": "--distill-beta"}
GKD_FLAGS = {"distill_lmbda": "--distill-lmbda", "distill_seq_kd": "--distill-seq-kd",
             "distill_gen_temperature": "--distill-gen-temperature",
             "distill_max_new_tokens": "--distill-max-new-tokens"}
# what a run without a teacher records, and so what a checkpoint from before these flags ran with (a resume at
# them names nothing: common.unrecorded_flags)
RUN_DEFAULTS = {"teacher": None, "distill_alpha": DEFAULT_ALPHA, "distill_temperature": DEFAULT_TEMPERATURE,
                "distill_beta": DEFAULT_BETA, "distill_lmbda": DEFAULT_LMBDA, "distill_seq_kd": False,
                "distill_gen_temperature": DEFAULT_GEN_TEMPERATURE, "distill_max_new_tokens": DEFAULT_MAX_NEW_TOKENS,
                "teacher_quantize": None, "teacher_group_size": None}
QUANT_FLAGS = {"teacher_quantize": "--teacher-quantize", "teacher_group_size": "--teacher-group-size"}


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
    g.add_argument("--distill-lmbda", type=float, default=None, metavar="L",
                   help="with --teacher, sft only: GKD's on-policy share (TRL's lmbda): each micro-batch, with "
                        "probability L (a draw seeded by --seed), has its answers replaced by the student's own "
                        "samples to its prompts, and its loss is then A * T^2 * divergence over them (no CE: the "
                        f"student's own samples are no target) (default {DEFAULT_LMBDA}: off; TRL's 0.5)")
    g.add_argument("--distill-seq-kd", action="store_true", default=None,
                   help="with --teacher, sft only: sequence-level KD (TRL GKD's seq_kd): the teacher answers every "
                        "prompt first, and the batch learns its answers (before the --distill-lmbda draw)")
    g.add_argument("--distill-gen-temperature", type=float, default=None, metavar="T",
                   help="with --distill-lmbda or --distill-seq-kd: the sampling temperature of the generated "
                        f"answers (0 = greedy) (default {DEFAULT_GEN_TEMPERATURE}, TRL's)")
    g.add_argument("--distill-max-new-tokens", type=int, default=None, metavar="N",
                   help="with --distill-lmbda or --distill-seq-kd: the generated answers' length cap (within "
                        f"--max-length) (default {DEFAULT_MAX_NEW_TOKENS}, TRL's)")
    from tritongpt.commands import DEFAULT_GROUP_SIZE
    from tritongpt.model.quant import GROUP_SIZES

    g.add_argument("--teacher-quantize", choices=("int8", "int4"), default=None,
                   help="with --teacher: run the frozen teacher weight-only quantized (model/quant.py, as generate's "
                        "--quantize): its matrices and LM head int8 or int4, a quarter or an eighth of their fp32 "
                        "bytes, so a larger teacher fits beside the student; its targets are the quantized model's "
                        "(a teacher saved by `tritongpt quantize` runs so without it) (default: as loaded)")
    g.add_argument("--teacher-group-size", type=int, choices=GROUP_SIZES, default=None, metavar="G",
                   help="with --teacher-quantize int4: its groups of G inputs a scale and offset "
                        f"(default {DEFAULT_GROUP_SIZE})")


def distill_options(args, prompts: bool = False) -> dict:
    """{teacher, distill_alpha, distill_temperature, distill_beta}, and with prompts (sft) GKD's {distill_lmbda,
    distill_seq_kd, distill_gen_temperature, distill_max_new_tokens}, checked, defaults filled in (the run's record:
    a resume names a change). The options without --teacher are refused by name, GKD's without prompts too."""
    teacher = getattr(args, "teacher", None)
    given = {k: getattr(args, k, None) for k in FLAGS}
    gkd = {k: getattr(args, k, None) for k in GKD_FLAGS}
    if not prompts:
        stray = [GKD_FLAGS[k] for k, v in gkd.items() if v is not None]
        if stray:
            raise UserError(f"{', '.join(stray)}: on-policy distillation generates answers to prompts, and "
                            "pretraining text has none (use them with sft --teacher)")
    quant = {k: getattr(args, k, None) for k in QUANT_FLAGS}
    if teacher is None:
        flags = {**FLAGS, **GKD_FLAGS, **QUANT_FLAGS}
        stray = [flags[k] for k, v in {**given, **gkd, **quant}.items() if v is not None]
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

    if quant["teacher_group_size"] is not None and quant["teacher_quantize"] != "int4":
        raise UserError("--teacher-group-size sets an int4 teacher's groups: pass --teacher-quantize int4 too")
    out = {"teacher": common.data_path(teacher), "distill_alpha": alpha, "distill_temperature": temperature,
           "distill_beta": beta, **quant}  # (an int4 teacher's group size as given: None, 128 or a saved file's)
    return {**out, **gkd_options(gkd, alpha)} if prompts else out


def gkd_options(gkd: dict, alpha: float) -> dict:
    """distill_options' GKD part: given values (None: not given) checked, defaults filled in."""
    lmbda = DEFAULT_LMBDA if gkd["distill_lmbda"] is None else gkd["distill_lmbda"]
    seq_kd = bool(gkd["distill_seq_kd"])
    temperature = gkd["distill_gen_temperature"]
    max_new = gkd["distill_max_new_tokens"]
    if not 0 <= lmbda <= 1:
        raise UserError(f"--distill-lmbda must be in [0, 1], got {lmbda}")
    if lmbda > 0 and alpha == 0:
        raise UserError(f"--distill-lmbda {lmbda} with --distill-alpha 0: a batch of the student's own answers "
                        "is learned through the divergence alone (A * T^2 * D), which A = 0 turns off")
    if not (lmbda > 0 or seq_kd):
        stray = [f for f, v in (("--distill-gen-temperature", temperature), ("--distill-max-new-tokens", max_new))
                 if v is not None]
        if stray:
            raise UserError(f"{', '.join(stray)} set{'s' if len(stray) == 1 else ''} how answers are generated: "
                            "without --distill-lmbda > 0 or --distill-seq-kd none is (pass one of them)")
    temperature = DEFAULT_GEN_TEMPERATURE if temperature is None else temperature
    max_new = DEFAULT_MAX_NEW_TOKENS if max_new is None else max_new
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise UserError(f"--distill-gen-temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if max_new < 1:
        raise UserError(f"--distill-max-new-tokens must be positive, got {max_new}")
    return {"distill_lmbda": lmbda, "distill_seq_kd": seq_kd, "distill_gen_temperature": temperature,
            "distill_max_new_tokens": max_new}


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


def fused_head(model, teacher, loss_options: dict) -> bool:
    """Whether the loss runs as kernels/jsd.py's linear_distill_loss (the LM heads fused with it): where the
    student's kernels include "cross_entropy", as forward(targets=) fuses its head with the CE, and no option
    the kernel lacks is on (label smoothing, z-loss, a logit soft cap: the reference path's distill_loss)."""
    student, teacher = unwrapped(model), unwrapped(teacher)
    return ("cross_entropy" in student.kernels and not any(loss_options.values())
            and not student.config.logit_softcap and not teacher.config.logit_softcap)


def fused_distill_loss(model, teacher, x, targets, doc_ids, vocab_size: int, alpha: float, temperature: float,
                       beta: float, ignore_index: int = -100, reduction: str = "mean"):
    """distill_loss(model(x), teacher(x), targets, ...) -> (loss, ce, kd), neither model's logits whole: both
    give the LM head's input (forward(head_input=True), so the student's call goes through DDP / compile), and
    linear_distill_loss makes the logits a chunk of rows at a time. ce and kd are not differentiable."""
    from tritongpt.kernels.jsd import linear_distill_loss

    student, t_model = unwrapped(model), unwrapped(teacher)
    if vocab_size > t_model.config.vocab_size:  # its head's rows past it are padding, no token: the kernel reads them
        raise UserError(f"the teacher's vocabulary has {t_model.config.vocab_size} ids, fewer than the "
                        f"{vocab_size} the divergence compares: distill from a teacher with the student's tokenizer")
    with torch.no_grad():
        t_h = teacher(x, doc_ids=doc_ids, head_input=True)
    h = model(x, doc_ids=doc_ids, head_input=True)
    # the dtype the kernel reads the head in: autocast's, else the hidden states' (a float head is the model's)
    device = t_h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else t_h.dtype
    return linear_distill_loss(h, student.out_head.weight, t_h, head_weight(t_model, dtype), targets, vocab_size, alpha,
                               temperature, beta, ignore_index, reduction, student_bias=student.out_head.bias,
                               teacher_bias=t_model.out_head.bias, ce_vocab_size=student.config.vocab_size)


def head_weight(model, dtype=None):
    """The LM head's float weight: a quantized head's (--teacher-quantize, model/quant.py) dequantized for the call,
    [V, C] (the matrix its own forward multiplies by), in dtype when given (the one the kernel reads it in: under
    autocast only the 16-bit copy lives through the loss), so the fused loss still never makes the logits."""
    from tritongpt.model.quant import QuantLinear

    head = model.out_head
    if not isinstance(head, QuantLinear):
        return head.weight
    return head.dequantize() if dtype is None else head.dequantize().to(dtype)


def unwrapped(model):
    """The GPTModel inside DDP's and torch.compile's wrappers (its config and router losses)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


class Parts:
    """The last optimizer step's CE and divergence, for the metrics row (distill_ce, distill_kd): sums and
    counts over this process's micro-batches (under DDP, rank 0 logs its own share of the batch).

    With GKD's on-policy batches (sft --distill-lmbda) the CE is over the other batches' tokens only (the
    student's own answers have none: OnPolicy), and the row also has distill_on_policy, how many of the
    step's micro-batches had the student's answers: the seeded draw, recorded."""

    def __init__(self, on_policy: bool = False):
        self.sums, self.on_policy, self.drawn = None, on_policy, 0

    def add(self, ce, kd, n, student: bool = False):
        """student: the batch's answers are the student's samples (ce is not part of its loss, and not counted)."""
        n = torch.as_tensor(n, device=kd.device).float()
        got = torch.stack([torch.zeros_like(n) if student else ce.detach().float(), kd.detach().float(), n,
                           torch.zeros_like(n) if student else n])
        self.sums = got if self.sums is None else self.sums + got
        self.drawn += student

    def pop(self) -> dict:
        if self.sums is None:
            return {}
        ce, kd, n, n_ce = self.sums.tolist()
        self.sums = None
        row = {"distill_kd": kd / max(n, 1)}
        if n_ce:  # a step of the student's answers only has no CE to show
            row["distill_ce"] = ce / n_ce
        if self.on_policy:
            row["distill_on_policy"], self.drawn = self.drawn, 0
        return row


def pretrain_loss_fn(teacher, opts: dict, vocab_size: int, doc_ids_of, parts: Parts | None = None, **loss_options):
    """pretrain's training loss with a teacher: fn(model, (x, y[, src])) -> the mean loss. doc_ids_of(x[, src]): the
    document ids (--document-mask; a mixture's rows each split at its own source's marker) or None, given to both
    models."""
    def loss_fn(m, batch):
        x, y, *src = batch  # a mixture's batches (--data A --data B): each row's source too
        doc_ids = doc_ids_of(x, *src)
        mix = opts["distill_alpha"], opts["distill_temperature"], opts["distill_beta"]
        if fused_head(m, teacher, loss_options):
            loss, ce, kd = fused_distill_loss(m, teacher, x, y, doc_ids, vocab_size, *mix)
        else:
            with torch.no_grad():
                t_logits = teacher(x, doc_ids=doc_ids)
            loss, ce, kd = distill_loss(m(x, doc_ids=doc_ids), t_logits, y, vocab_size, *mix, **loss_options)
        if parts is not None:
            parts.add(ce * y.numel(), kd * y.numel(), y.numel())
        aux = moe_aux_term(m)  # as forward(targets=) adds it to a mean loss (windows: no padding)
        return loss if aux is None else loss + aux

    return loss_fn


def sft_loss_fn(teacher, opts: dict, vocab_size: int, ignore_index: int, parts: Parts | None = None,
                source=None, **loss_options):
    """SFT's training loss with a teacher: fn(model, (inputs, targets[, doc_ids[, lengths]])) -> (loss sum, count)
    over the counted (response) targets, as sft_loss returns them (a mixture of experts' load-balancing loss
    over the student's forward joins the sum once per counted target, as sft_loss adds it).

    source: None, or OnPolicy's source(): "student" where the batch's answers are the student's own samples
    (--distill-lmbda's draw); its loss is then alpha * T^2 * the divergence alone. Cross-entropy on them would
    be self-training, the student learning to repeat its own samples; TRL's GKDTrainer has no CE at all. The
    weight alpha stays, so that over the draws the divergence is alpha * T^2 * GKD's (1 - lmbda) data +
    lmbda on-policy mix, and the CE (1 - alpha) * (1 - lmbda) of the data's. The teacher's answers (seq_kd)
    keep the mix: CE on a teacher's samples is Kim and Rush's sequence-level KD."""
    def loss_fn(m, batch):
        inputs, targets = batch[0], batch[1]
        doc_ids = batch[2] if len(batch) > 2 else None  # --packing: each example kept apart, in both models
        alpha, temperature = opts["distill_alpha"], opts["distill_temperature"]
        n = (targets != ignore_index).sum()
        student = source is not None and source() == "student"
        if fused_head(m, teacher, loss_options):
            # the student's own answers: alpha T^2 D alone, the kernel's loss at alpha 1 (T^2 D) times alpha
            loss, ce, kd = fused_distill_loss(m, teacher, inputs, targets, doc_ids, vocab_size,
                                              1.0 if student else alpha, temperature, opts["distill_beta"],
                                              ignore_index, "sum")
            if student:
                loss, ce = alpha * loss, None
            if parts is not None:
                parts.add(ce, kd, n, student)
            return with_aux(m, loss, n, batch)
        with torch.no_grad():
            t_logits = teacher(inputs, doc_ids=doc_ids)
        logits = m(inputs, doc_ids=doc_ids)
        if student:
            d = divergence(logits[..., :vocab_size], t_logits[..., :vocab_size], temperature, opts["distill_beta"])
            ce, kd = None, torch.where(targets != ignore_index, d, 0.0).sum()
            loss = alpha * temperature ** 2 * kd
        else:
            loss, ce, kd = distill_loss(logits, t_logits, targets, vocab_size, alpha, temperature,
                                        opts["distill_beta"], ignore_index=ignore_index, reduction="sum",
                                        **loss_options)
        if parts is not None:
            parts.add(ce, kd, n, student)
        return with_aux(m, loss, n, batch)

    def with_aux(m, loss, n, batch):  # read after the student's forward (the teacher: another model's routers)
        aux = moe_aux_term(m, sft_real_mask(batch, ignore_index))  # the padding left out, as sft_loss
        return (loss if aux is None else loss + aux * n), n

    return loss_fn


# -- the teacher ---------------------------------------------------------------------------------------
def load_teacher(spec: str, tok, block: int, student: str, quantize: str | None = None, group_size=None):
    """--teacher's model (frozen, eval mode, on the CPU until place_teacher), refused where its tokenizer
    gives other ids than the student's `tok` or its context is shorter than `block`. student: how the
    student's weights were named (for the messages). quantize, group_size: --teacher-quantize's (a file
    `tritongpt quantize` wrote loads quantized as it is)."""
    from tritongpt.train import gpt_neo_weights
    from tritongpt.train.gpt2_weights import HUB_REPOS
    from tritongpt.train.sft import load_init_model, pick_tokenizer
    from tritongpt.train.tokenizer import same_ids

    named = spec in HUB_REPOS or spec in gpt_neo_weights.HUB_REPOS
    if not Path(spec).expanduser().exists() and not named:  # load_init_model would make a preset's random weights
        raise UserError(f"--teacher {spec}: no checkpoint there (a run or checkpoint folder, a weights file, a "
                        "Hugging Face folder or Hub id, or a GPT-2 or GPT-Neo name)")
    from tritongpt.commands import quantize as quantize_model

    teacher = load_init_model(spec, quantized_ok=True)  # only ever run forward: an int8/int4 file is a teacher
    # on the CPU (then place_teacher moves it): the float matrices are quantized one at a time where they are
    quantize_model(teacher, SimpleNamespace(quantize=quantize, group_size=group_size), what=f"--teacher {spec}")
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
    change every target the student learns, silently. The run's data state is kept as it was. How the teacher
    ran (float, or --teacher-quantize's int8 / int4 and its group) is saved beside it, for the refusal to name."""

    KEYS = ("teacher_fingerprint", "teacher_quantized")

    def __init__(self, inner, teacher, spec: str):
        from tritongpt.train import common

        self.inner, self.spec = inner, spec
        self.fingerprint = common.weights_fingerprint(teacher)
        mode, group = getattr(teacher, "quantized", None), getattr(teacher, "quantized_group_size", None)
        self.quantized = "float" if mode is None else f"int4 (group {group})" if mode == "int4" else mode

    def state_dict(self) -> dict:
        return {**(self.inner.state_dict() if self.inner is not None else {}), "teacher_fingerprint": self.fingerprint,
                "teacher_quantized": self.quantized}

    def load_state_dict(self, d: dict):
        from tritongpt.train import common

        if "teacher_fingerprint" in d and not common.same_fingerprint(d["teacher_fingerprint"], self.fingerprint):
            was = d.get("teacher_quantized")  # (runs from before it was saved: not known)
            if was is not None and was != self.quantized:
                raise UserError(f"--resume: --teacher {self.spec} is not the model this run distilled from: the run's "
                                f"ran {was}, this one {self.quantized} (--teacher-quantize, --teacher-group-size, or "
                                "a file `tritongpt quantize` wrote): pass the run's teacher as it ran")
            raise UserError(f"--resume: --teacher {self.spec} is not the model this run distilled from (its weights "
                            "differ): pass the run's teacher")
        if self.inner is not None:
            self.inner.load_state_dict({k: v for k, v in d.items() if k not in self.KEYS})


# -- GKD's on-policy batches (sft --distill-lmbda, --distill-seq-kd) --------------------------------------
def prompt_end(e) -> int:
    """Where an SFT Example's last learned part starts: what an answer is generated after. A chat's earlier
    turns are its prompt (TRL's GKD collator: every message but the last), a template's text after the last
    answer is not (formats.prompt_parts)."""
    return max([e.prompt_len] + [b for _, b in e.context if b < len(e.ids)])


class OnPolicy:
    """sft's training batches with GKD's generated answers (Agarwal et al. 2024; TRL's GKDTrainer.training_step):
    get_batch is SFTData's, except that with seq_kd the teacher answers each example's prompt first, then with
    probability lmbda the student does (over the teacher's, as TRL orders them). One draw a micro-batch (TRL
    draws in training_step, which the Hugging Face Trainer calls once a micro-batch) from this object's own
    generator, seeded by (--seed, rank) and saved with the data position, so a run and its resume draw alike
    and the training RNG is untouched; the samples come from it too.

    A generated answer is sampled (--distill-gen-temperature, 0 greedy) with the KV cache (generate(), which
    runs the model in eval mode and gives it back in train mode), at most max_new_tokens, and the prompt plus it
    at most the run's max_len + 1 tokens, as encode_records cuts the data's. It ends at the answer's end token
    (the eot, or a chat template's end of turn), which stays a target as the data's does (TRL masks the pad
    token, often that same EOS, so its students are not taught to stop); what is after it is padding. Prompts
    of one length are generated together (no padding inside a prompt). Under --no-mask-prompt a batch of the
    student's answers still learns them alone (the teacher's, as the data's, learn the prompt too). source()
    tells the loss whose answers the batch it just took holds: "data", "teacher" or "student".

    data: an SFTData (unpacked); opts: distill_options'; end_id: what ends an answer; vocab_size: the
    tokenizer's ids (a model's padded rows are never drawn)."""

    def __init__(self, data, student, teacher, opts: dict, end_id: int, vocab_size: int, max_len: int,
                 seed: int = 0, rank: int = 0, cuda_graph: bool = False):
        self.data, self.student, self.teacher = data, student, teacher
        # generate's cuda_graph (sft --cuda-graphs): the answers' decode steps CUDA-graph replays
        self.cuda_graph = cuda_graph
        if cuda_graph:
            from tritongpt.train.generate import check_graphable

            for model in (student, teacher) if opts["distill_seq_kd"] else (student,):
                check_graphable(unwrapped(model))
        self.lmbda, self.seq_kd = opts["distill_lmbda"], opts["distill_seq_kd"]
        self.temperature, self.max_new_tokens = opts["distill_gen_temperature"], opts["distill_max_new_tokens"]
        self.end_id, self.vocab_size, self.max_len, self.rank = end_id, vocab_size, max_len, rank
        self.seed = (seed * 1_000_003 + 0x6B6E + rank) % 2 ** 62  # apart from the Trainer's seed + rank stream
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.generator = torch.Generator().manual_seed(self.seed)
        self.last = "data"
        if any(prompt_end(e) == 0 for e in data.train):
            raise UserError("--distill-lmbda / --distill-seq-kd: a training record has an empty prompt, which "
                            "nothing can be generated from")

    def place(self, device, dtype) -> None:
        """Generate on the trainer's device (its generator there) and under its autocast."""
        self.device, self.dtype = torch.device(device), dtype
        if self.cuda_graph and self.device.type != "cuda":
            raise UserError(f"--cuda-graphs replays the generated answers' decode steps as CUDA graphs: it needs a "
                            f"CUDA device, the run is on {self.device.type}")
        if self.generator.device != self.device:
            state = self.generator.get_state() if self.device.type == "cpu" else None
            self.generator = torch.Generator(self.device).manual_seed(self.seed)
            if state is not None:
                self.generator.set_state(state)

    def source(self) -> str:
        return self.last

    def get_batch(self, split: str, generator=None):
        examples = self.data.next_examples(split)
        self.last = "data"
        if self.seq_kd:
            examples, self.last = self.answer(self.teacher, examples), "teacher"
        # TRL: random.random() <= lmbda; strictly below here, so that lmbda 0 never draws
        if self.lmbda > 0 and torch.rand((), generator=self.generator, device=self.device).item() < self.lmbda:
            examples, self.last = self.answer(self.student, examples), "student"
            if not self.data.mask_prompt:
                # --no-mask-prompt learns the data's prompts; GKD's on-policy term is over the student's own
                # tokens only (TRL's loss: those after the prompt), not the data's prompt it was given
                from tritongpt.train.sft import collate

                return collate(examples, self.data.pad_id, lengths=True)
        return self.data.collate_train(examples)

    @torch.no_grad()
    def answer(self, model, examples) -> list:
        """examples with their last answer replaced by model's sample to what comes before it."""
        from tritongpt.train import common
        from tritongpt.train.generate import generate
        from tritongpt.train.sft import Example

        cuts = [prompt_end(e) for e in examples]
        by_len = {}
        for i, c in enumerate(cuts):
            by_len.setdefault(c, []).append(i)
        out = list(examples)
        limit = self.vocab_size if self.vocab_size < unwrapped(model).config.vocab_size else None
        for cut, rows in sorted(by_len.items()):
            budget = min(self.max_new_tokens, self.max_len + 1 - cut)
            idx = torch.tensor([examples[i].ids[:cut] for i in rows], dtype=torch.long, device=self.device)
            with common.autocast(self.device, self.dtype):
                # (a graph captures the model itself: a DDP or compiled wrapper's forward is not the step it replays)
                new = generate(unwrapped(model) if self.cuda_graph else model, idx, budget,
                               temperature=self.temperature, eos_id=self.end_id, generator=self.generator,
                               vocab_limit=limit, cuda_graph=self.cuda_graph)[:, cut:].tolist()
            for i, ids in zip(rows, new):
                if self.end_id in ids:  # the rest is the end token repeated, generate's padding
                    ids = ids[:ids.index(self.end_id) + 1]
                # the generated answer is all that is learned (TRL's labels: the tokens after the prompt)
                out[i] = Example(examples[i].ids[:cut] + ids, cut)
        return out

    def state_dict(self) -> dict:
        return {**self.data.state_dict(), "gkd_generator": self.generator.get_state(), "gkd_rank": self.rank}

    def load_state_dict(self, d: dict):
        # (a run started without generated answers has none: this run's fresh draws; a rank new at the resume gets
        # the last saved rank's data state, and keeps its own draws, as the Trainer's generator does)
        if "gkd_generator" in d and d.get("gkd_rank", self.rank) == self.rank:
            try:
                self.generator.set_state(d["gkd_generator"])
            except (RuntimeError, ValueError):
                # a CPU generator's state does not fit a CUDA one (or the reverse): the resume is on another device
                print(f"note: the checkpoint's GKD draws were made on another device type than {self.device.type}; "
                      "this run draws afresh from --seed (the loss is the same in expectation, not draw for draw)")
                self.generator.manual_seed(self.seed)
        self.data.load_state_dict({k: v for k, v in d.items() if k not in ("gkd_generator", "gkd_rank")})
