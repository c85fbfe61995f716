"""The one training loop every trainer shares (pretraining, SFT, reward model, DPO).

A trainer supplies the model and three small functions; the Trainer owns everything else:

    loss_fn(model, batch) -> scalar loss   (mean over the micro-batch; every micro-batch weighs the same)
                          or (loss sum, count)     (token-weighted: see below)
    get_batch(split, generator) -> tuple of tensors (moved to the Trainer's device if needed)
    eval_fn(model) -> dict                 e.g. {"val_loss": 3.2}, at step 0, every eval_every steps and the last
    sample_fn(model) -> str                printed every sample_every steps

One optimizer step, as in nanoGPT's train.py:

    lr = linear warmup, then the --lr-schedule (cosine by default) at step
    for each of grad_accum micro-batches:       (DDP: gradients sync on the last one only)
        loss = loss_fn(model, batch) under autocast      (bf16 on CUDA, fp32 on CPU; fp16 on old GPUs)
        (loss / grad_accum).backward()          so the sum of micro-gradients is the mean
      or, when loss_fn returns (loss sum, count):
        (loss_sum / c).backward(), then every gradient * world_size * c / (count over micro-batches
        and ranks), c estimating a rank's count: the first micro-batch's (mean over ranks) x grad_accum
    stop if the loss is NaN/inf                 before the step, so no bad weights are saved
    clip the gradient norm, AdamW step, zero the gradients
      (fp16: backward of the loss times a scale, gradients unscaled before clipping, and a step
      whose gradients overflowed skipped: common.LossScaler)

Around it: a tqdm bar, one JSONL row per step (loss, lr, grad_norm, tok_per_s, mfu, mem_gb, and
eval_fn's keys on evaluated steps), a loss plot, checkpoints that resume exactly (weights,
optimizer, every RNG, the batch generator, the step and the data position), and DDP when
launched by torchrun.

Why a loss_fn may return (sum, count): SFT's micro-batches count different numbers of response
tokens, and a mean of micro-batch means weighs a token of a short batch more than one of a long
batch, so --grad-accum k, k ranks and one k-times larger batch would each train differently. With
the sum and the count, the step's gradient and logged loss are the mean over every counted token
of the global batch, whichever way it is split.
"""
import argparse
import contextlib
import datetime
import importlib
import inspect
import math
import sys
import time
import traceback
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist

from tritongpt.errors import UserError, note
from tritongpt.kernels._common import is_oom
from tritongpt.train import common


# torch.compile's modes (torch._inductor.list_mode_options). reduce-overhead and max-autotune also capture
# CUDA graphs (CUDA-graph trees): each replay writes its outputs into the same static buffers, so the loop
# marks where each micro-batch starts (torch.compiler.cudagraph_mark_step_begin) and keeps nothing of an
# output but copies, gradients included (Trainer._own_grads). Inductor skips CUDA graphs on a CPU.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


@dataclass
class TrainArgs:
    out_dir: str = "runs/train"
    max_steps: int = 1000
    batch_size: int = 8          # sequences per micro-batch, per process
    grad_accum: int = 1          # micro-batches per optimizer step, per process
    lr: float = 6e-4             # peak learning rate, reached after warmup
    min_lr: float = 6e-5         # floor of the decay
    lr_schedule: str = "cosine"  # after warmup: cosine | wsd | linear | constant (common.lr_at)
    decay_fraction: float = 0.2  # wsd: the last fraction of max_steps that decays
    warmup_steps: int = 100
    weight_decay: float = 0.1    # matrices only; biases, LayerNorm and embeddings get 0
    optimizer: str = "adamw"     # adamw | muon (the blocks' matrices; AdamW for the rest): common.build_optimizer
    grad_clip: float = 1.0       # max global gradient norm; 0 = no clipping (norm still logged)
    eval_every: int = 100        # 0 = never (besides the end)
    eval_batches: int = 10
    ckpt_every: int = 500        # 0 = only at the end
    keep_ckpts: int = 3
    log_every: int = 10          # printed log lines; the JSONL gets every step
    sample_every: int = 200      # 0 = only at the end
    dtype: str = "auto"          # auto (bf16 on CUDA, fp16 before Ampere, fp32 on CPU) | fp32 | bf16 | fp16
    device: str = "auto"
    seed: int = 1337
    resume: str | None = None    # None, "latest" (newest checkpoint in out_dir), or a path
    kernels: str | None = "auto"  # reference | triton | auto | comma list; None = leave the model's
    compile: bool = False
    compile_mode: str = "default"  # torch.compile's mode (COMPILE_MODES), with --compile only
    activation_checkpointing: bool = False  # recompute each block's forward in backward: less memory
    ddp_timeout: int = 1800      # seconds a DDP process waits in a collective (NCCL's own default: 600)
    overwrite: bool = False      # a new run may replace the checkpoints and metrics in out_dir
    report_to: str = "none"      # none | wandb | tensorboard | a comma list: trackers of the metrics rows
    run_name: str | None = None  # the trackers' name of the run; None = out_dir's folder name
    wandb_project: str = "tritongpt"

    @classmethod
    def from_namespace(cls, ns) -> "TrainArgs":
        """Pick the fields out of an argparse Namespace (or any object); missing ones keep defaults. A --min-lr given
        (not the command's default: add_train_args') with --lr-schedule constant, which never decays, is refused."""
        args = cls(**{f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)})
        default = getattr(ns, "min_lr_default", None)
        if default is not None and args.lr_schedule == "constant" and args.min_lr != default:
            raise UserError(f"--min-lr {args.min_lr:g} is where the schedule decays to: --lr-schedule constant "
                            "stays at --lr (pass another schedule, or leave --min-lr out)")
        return args

    def validate(self):
        for name in ("max_steps", "batch_size", "grad_accum", "eval_batches", "ddp_timeout"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "ckpt_every", "keep_ckpts", "log_every",
                     "sample_every", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("weight_decay", "grad_clip"):  # nan passes `< 0`: --grad-clip nan turned clipping off
            if not math.isfinite(getattr(self, name)):
                raise UserError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(self, name)}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise UserError(f"--lr must be a positive number, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise UserError(f"--min-lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.optimizer not in common.OPTIMIZERS:
            raise UserError(f"--optimizer must be one of {', '.join(common.OPTIMIZERS)}, got {self.optimizer!r}")
        if self.lr_schedule not in common.LR_SCHEDULES:
            raise UserError(f"--lr-schedule must be one of {', '.join(common.LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if not 0 < self.decay_fraction <= 1:  # nan fails too
            raise UserError(f"--decay-fraction must be in (0, 1], got {self.decay_fraction}")
        if self.decay_fraction != TrainArgs.decay_fraction and self.lr_schedule != "wsd":  # silently ignored
            raise UserError(f"--decay-fraction {self.decay_fraction:g} is --lr-schedule wsd's (the last fraction of "
                            f"the run, decaying): --lr-schedule {self.lr_schedule} has no such phase")
        if self.compile_mode not in COMPILE_MODES:
            raise UserError(f"--compile-mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")
        if self.compile_mode != "default" and not self.compile:  # it would be silently ignored
            raise UserError(f"--compile-mode {self.compile_mode} sets how --compile compiles: pass --compile too")
        common.check_seed(self.seed)
        common.check_dtype(self.dtype)
        common.check_tracking(self)


_HELP = {
    "out_dir": "folder for metrics.jsonl, loss.png and checkpoints",
    "max_steps": "optimizer steps in total (a resumed run continues up to this)",
    "batch_size": "sequences per micro-batch, per process",
    "grad_accum": "micro-batches per optimizer step (gradient accumulation)",
    "lr": "peak learning rate (after linear warmup)",
    "min_lr": "learning rate the decay ends at",
    "decay_fraction": "--lr-schedule wsd: the last fraction of --max-steps, decaying to --min-lr",
    "warmup_steps": "linear warmup steps",
    "weight_decay": "AdamW weight decay (matrices only)",
    "grad_clip": "clip the global gradient norm to this (0 = off)",
    "eval_every": "evaluate every N steps (0 = only at the end)",
    "eval_batches": "batches per evaluation",
    "ckpt_every": "checkpoint every N steps (0 = only at the end)",
    "keep_ckpts": "keep the newest K checkpoints (0 = keep all)",
    "log_every": "print a log line every N steps",
    "sample_every": "print a sample every N steps (0 = only at the end)",
    "seed": "random seed (DDP rank r draws batches with seed + r)",
    "ddp_timeout": "under torchrun, seconds a process waits for the others before the run fails (rank 0 "
                   "evaluates, samples and checkpoints while they wait; Hugging Face's Trainer also waits "
                   "1800, NCCL alone 600)",
}


def add_train_args(parser: argparse.ArgumentParser, **defaults):
    """Add the TrainArgs options (--out-dir, --max-steps, ...) with per-trainer defaults.

    --kernels and --device are added only if the parser lacks them (commands.add_model_args
    adds them too; call it first). Unknown keys in `defaults` are a programming error.
    """
    base = {f.name: f.default for f in fields(TrainArgs)}
    unknown = sorted(set(defaults) - set(base))
    if unknown:
        raise TypeError(f"add_train_args: unknown TrainArgs field(s) {unknown}")
    base.update(defaults)
    have = set(parser._option_string_actions)
    g = parser.add_argument_group("training")
    for f in fields(TrainArgs):
        flag = "--" + f.name.replace("_", "-")
        if f.name in common.TRACKING_FIELDS:  # common.add_tracking_args' flags, below
            continue
        if flag in have:
            if f.name in defaults:
                parser.set_defaults(**{f.name: defaults[f.name]})
            continue
        d = base[f.name]
        if f.name == "compile":
            g.add_argument(flag, action="store_true", default=d, help="torch.compile the model")
        elif f.name == "compile_mode":
            g.add_argument(flag, default=d, choices=COMPILE_MODES,
                           help="--compile's torch.compile mode: reduce-overhead (and max-autotune) also replay "
                                "the step as CUDA graphs, which cuts the per-kernel launch cost of the Triton "
                                "path (CUDA only; default %(default)s)")
        elif f.name == "activation_checkpointing":
            g.add_argument(flag, action="store_true", default=d, help=common.ACTIVATION_CHECKPOINTING_HELP)
        elif f.name == "overwrite":
            g.add_argument(flag, action="store_true", default=d, help=common.OVERWRITE_HELP)
        elif f.name == "resume":
            g.add_argument(flag, nargs="?", const="latest", default=d, metavar="CKPT",
                           help="continue exactly from a checkpoint: the newest in --out-dir, "
                                "or a checkpoint/run folder")
        elif f.name == "optimizer":
            g.add_argument(flag, default=d, choices=common.OPTIMIZERS,
                           help="adamw, or muon: Muon (torch.optim.Muon, its update scaled to AdamW's RMS, so "
                                "--lr and --weight-decay carry over) for the transformer blocks' weight matrices (an MoE's "
                                "experts each as a matrix of its own) "
                                "and AdamW for embeddings, biases, LayerNorms and heads (default %(default)s)")
        elif f.name == "lr_schedule":
            g.add_argument(flag, default=d, choices=common.LR_SCHEDULES,
                           help="after the warmup: cosine to --min-lr at --max-steps, wsd (stable at --lr, then "
                                "the last --decay-fraction down as 1-sqrt), linear, or constant (default %(default)s)")
        elif f.name == "dtype":
            g.add_argument(flag, default=d, choices=common.DTYPES,
                           help=common.DTYPE_HELP + " (default %(default)s)")
        elif f.name == "device":
            g.add_argument(flag, default=d, help="auto | cpu | cuda (default %(default)s)")
        elif f.name == "kernels":
            g.add_argument(flag, default=d, help="reference | triton | auto | comma list of "
                                                 "layernorm,mlp,attention,cross_entropy,rope (default %(default)s)")
        else:
            g.add_argument(flag, type=type(d), default=d,
                           help=f"{_HELP.get(f.name, f.name)} (default %(default)s)")
    common.add_tracking_args(parser)
    parser.set_defaults(**{k: v for k, v in defaults.items() if k in common.TRACKING_FIELDS})
    parser.set_defaults(min_lr_default=base["min_lr"])  # (from_namespace: --min-lr given or not)
    return g


def add_lm_loss_args(parser: argparse.ArgumentParser) -> None:
    """--label-smoothing and --z-loss: the next-token objective's options (pretrain and sft). They
    shape the training loss only; evaluations report the plain cross-entropy, comparable across runs."""
    g = parser.add_argument_group("loss")
    g.add_argument("--label-smoothing", type=float, default=0.0, metavar="EPS",
                   help="train against a target that puts this share of its weight evenly on every class "
                        "(PyTorch's label_smoothing, in [0, 1]; default %(default)s: off)")
    g.add_argument("--z-loss", type=float, default=0.0, metavar="Z",
                   help="add this times logsumexp(logits)^2 per token (PaLM's auxiliary z-loss, 1e-4 there; it "
                        "keeps the softmax's normaliser near 1, which steadies long and bf16 runs; default "
                        "%(default)s: off)")


def lm_loss_options(args) -> dict:
    """{label_smoothing, z_loss} from the flags, checked (a UserError naming the flag)."""
    from tritongpt._types import loss_options

    try:
        smoothing, z = loss_options(getattr(args, "label_smoothing", 0.0), getattr(args, "z_loss", 0.0),
                                    names=("--label-smoothing", "--z-loss"))
    except ValueError as e:
        raise UserError(str(e)) from None
    return {"label_smoothing": smoothing, "z_loss": z}


def lm_loss_text(options: dict) -> str:
    """The objective's options as words ("label smoothing 0.1 and z-loss 0.0001"; "" for none), from
    {label_smoothing, z_loss} (a run's recorded args will do): pretrain's header, `info --weights`."""
    words = [f"{name} {options[key]:g}" for key, name in (("label_smoothing", "label smoothing"), ("z_loss", "z-loss"))
             if options.get(key)]
    return " and ".join(words)


# -- throughput ------------------------------------------------------------------------------
# Dense bf16 tensor-core peaks (FLOP/s) by GPU name (datasheets halve their sparse figures),
# most specific first: the first key found in the name wins ("H200 NVL" before "H200", "L40"
# before "L4"). MFU is null elsewhere.
PEAK_FLOPS = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989.5e12), ("GH200", 989.5e12),
    ("H200 NVL", 835.5e12), ("H200", 989.5e12), ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12),
    ("L4", 121e12), ("RTX 4090", 165.2e12), ("V100", 125e12), ("T4", 65e12),
]


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_FLOPS:
        if key in name:
            return value
    return None


def flops_per_token(cfg, n_params: int, seq_len: int) -> float:
    """nanoGPT's estimate (PaLM appendix B): 6N for the matmuls, 12*L*H*Q*T for attention (forward
    and backward: 3x attention_forward_flops, which counts a local layer by its window). N counts
    every weight once, so a SwiGLU MLP's three [C, hidden] matrices are in it at their own hidden; of a mixture
    of experts, a token meets its experts_per_token experts only, so the others' are left out."""
    if cfg.n_experts:
        n_params -= cfg.moe_layer_count * (cfg.n_experts - cfg.experts_per_token) * 3 * cfg.n_embd * cfg.ff_hidden
    return 6 * n_params + 3 * attention_forward_flops(cfg, seq_len)


def attention_forward_flops(cfg, seq_len: int):
    """The forward's attention scores and weighted sum, per token, over every layer: nanoGPT's 4*C*T
    a layer that sees the whole context (the T x T square), a local layer's (window W < T) scaled by
    its share of the causal pairs, T W - W^2 / 2 of T^2 / 2 (bench/common.py's window_attention_flops
    over attention_flops). An int when no layer is local within seq_len. C is the queries' width,
    n_head x head_dim (n_embd, but where the heads have a width of their own: Qwen3)."""
    dense = 4 * cfg.n_head * cfg.head_dim * seq_len
    total = 0
    for i in range(cfg.n_layer):
        w = cfg.layer_window(i)
        total += dense * (seq_len * w - w * w / 2) / (seq_len * seq_len / 2) if w and w < seq_len else dense
    return total


def _mem_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (1e9 if sys.platform == "darwin" else 1e6)


def _gpt_models(model):
    from tritongpt.model.gpt import GPTModel

    return [m for m in model.modules() if isinstance(m, GPTModel)]


class _SafetensorsSaver:
    """Gives Checkpointer a .save() for models that are not GPTModel (e.g. a reward head wrapper)."""

    def __init__(self, module):
        self.module = module

    def save(self, path, extra_metadata=None):
        from tritongpt.model.gpt import save_safetensors

        save_safetensors(self.module, path, extra_metadata or {})


# Flags that change what a resumed run computes (--max-steps too: it stretches the cosine schedule),
# named in a note when a resume changes them; the precision is compared as resolved (auto = fp32 on CPU).
# A --max-steps that leaves the rates of the steps run so far alone (wsd before its decay) is noted as
# extending the run instead.
TRAJECTORY_ARGS = ("max_steps", "batch_size", "grad_accum", "lr", "min_lr", "lr_schedule", "decay_fraction",
                   "warmup_steps", "weight_decay", "grad_clip", "seed")


def _data_hooks(data_state):
    """data_state: None, or an object with state_dict()/load_state_dict(d)."""
    if data_state is None:
        return None, None
    if hasattr(data_state, "state_dict") and hasattr(data_state, "load_state_dict"):
        return data_state.state_dict, data_state.load_state_dict
    raise TypeError("data_state must have state_dict() and load_state_dict(d)")


class Trainer:
    """Runs `args.max_steps` optimizer steps of `loss_fn` on batches from `get_batch`.

    - loss_fn gets the model as trained (compiled and/or DDP-wrapped): call it, i.e. its
      forward, so DDP sees the step. Batches are per process: the global batch is
      batch_size * grad_accum * world_size.
    - eval_fn and sample_fn get the unwrapped model, on rank 0 only, under no_grad, eval()
      and autocast, with the training RNG forked (they never change the training run).
    - shared_eval_fn(model, rank, world_size) -> dict: an evaluation every rank runs, under the
      same conditions at the same steps, to share its work (HellaSwag: each rank scores its share
      of the examples, and all-reduces the counts); rank 0 logs what it returns with eval_fn's.
    - data_state: None, or an object with state_dict()/load_state_dict(d);
      saved per rank in every checkpoint and handed back on --resume.
    - run_args: {flag name: value} of the trainer's own flags that change what it computes (DPO's
      beta, SFT's data and prompt masking): saved with TrainArgs' and named on a resume that
      changes them, as TrainArgs' are.
    - step_metrics: None, or a function called after each optimizer step whose dict of floats goes into
      that step's metrics row (distillation's distill_ce and distill_kd: train/distill.py).
    - prompt_format: what a fine-tuning run's prompts looked like (train/formats.py: alpaca,
      completion or chat), saved so that `tritongpt chat` prompts the model the same way.
    - fit() returns: is_main, step, loss (last), first_loss, losses (this call's), the last eval dict's
      keys, tok_per_s (mean after the first step), mfu, time_s, checkpoint, metrics_path, plot_path.

    Attributes set at construction: device, dtype, rank, world_size, is_main, raw_model
    (the unwrapped model, on device), optimizer, checkpointer, metrics.
    """

    def __init__(self, model, args: TrainArgs, loss_fn, get_batch, eval_fn=None, sample_fn=None, shared_eval_fn=None,
                 name: str = "pretrain", data_state=None, run_args: dict | None = None,
                 prompt_format: str | None = None, step_metrics=None, run_defaults: dict | None = None):
        args.validate()
        # before the process group exists: a refusal then leaves no threads behind
        self._clear_first = common.check_out_dir(args.out_dir, args.resume, args.overwrite)
        self.args, self.name = args, name
        self.run_args = dict(run_args or {})
        # the run_args' defaults that are not "off" (DPO's beta 0.1, sft's --overlong drop): what a checkpoint older
        # than such a flag ran with, so a resume at that value names no unrecorded flag (common.unrecorded_flags)
        self.run_defaults = dict(run_defaults or {})
        self.prompt_format = prompt_format
        self.loss_fn, self.get_batch, self.eval_fn, self.sample_fn = loss_fn, get_batch, eval_fn, sample_fn
        self.shared_eval_fn = shared_eval_fn
        self.step_metrics = step_metrics
        self.get_data_state, self.set_data_state = _data_hooks(data_state)

        self.rank, _, self.world_size = common.dist_env()  # DDP when launched by torchrun
        self.ddp = self.world_size > 1
        self.is_main = self.rank == 0
        self.device = common.pick_device(args.device)  # under torchrun, "auto" is cuda:LOCAL_RANK
        if self.device.type == "cuda" and self.device.index is not None:
            # a bare "cuda" is the current device already; torch 2.11's set_device refuses one without an index
            torch.cuda.set_device(self.device)
        self._owns_group = False
        if self.ddp and not dist.is_initialized():
            # DDP's first construction imports torch.distributed.nn.functional, whose functions take
            # `group=group.WORLD` as a default argument: imported while a group exists, they keep it
            # alive for good, so destroy_process_group cannot stop its threads and the process exits
            # with gloo threads running (an occasional SIGABRT, "terminate called without an active
            # exception"). Imported before the group exists, the default is None.
            importlib.import_module("torch.distributed.nn.functional")

            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=args.ddp_timeout))
            self._owns_group = True
        self.dtype = common.pick_dtype(args.dtype, self.device)
        self.scaler = common.LossScaler(self.device, self.dtype)

        self.raw_model = model.to(self.device)
        if args.kernels is not None:
            for m in _gpt_models(self.raw_model):
                m.set_kernels(args.kernels)
        if args.activation_checkpointing:
            for m in _gpt_models(self.raw_model):
                m.set_activation_checkpointing(True)
        if self.is_main:
            common.note_slow_kernels(_gpt_models(self.raw_model), self.device)
        self.optimizer = common.build_optimizer(self.raw_model, args.lr, args.weight_decay, device=self.device,
                                                kind=args.optimizer, ranks=(self.rank, self.world_size))
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.out_dir = Path(args.out_dir)
        self.checkpointer = common.Checkpointer(self.out_dir, keep=args.keep_ckpts)
        self.generator = torch.Generator().manual_seed(args.seed + self.rank)
        self.step = 0
        self.last_ckpt = None
        self._seq_len = None
        self._saved_step = None
        gpts = _gpt_models(self.raw_model)
        self._cfg = gpts[0].config if gpts else None
        self._n_params = gpts[0].num_params(non_embedding=True) if gpts else \
            sum(p.numel() for p in self.raw_model.parameters())
        self._peak = peak_flops(self.device)
        # the run's arguments, as checkpoints save them, and its model's shape
        config = {"trainer": name, **vars(args), **self.run_args, "model": self._cfg.to_dict() if self._cfg else None}
        self.metrics = common.MetricsLog(self.out_dir / "metrics.jsonl", enabled=self.is_main,
                                         trackers=common.trackers_for(args, config) if self.is_main else None)
        self.plot_path = self.out_dir / "loss.png"
        self._plotted = None  # the rows loss.png shows (common.replot's)

    # -- checkpoints ---------------------------------------------------------------------
    def _gather(self, obj) -> list:
        """obj from every rank, in rank order (a collective: every rank must call it)."""
        if not self.ddp:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def state_dict(self) -> dict:
        """Everything but the weights. RNGs, batch generator and data position are per rank."""
        data = self.get_data_state() if self.get_data_state else None
        return {"step": self.step, "optimizer": self.optimizer.state_dict(),
                "rng": self._gather(common.rng_state()), "generator": self._gather(self.generator.get_state()),
                "data": self._gather(data), "args": {**vars(self.args), **self.run_args}, "name": self.name,
                "world_size": self.world_size, "precision": str(self.dtype), "kernels": self._kernels(),
                "scaler": self.scaler.state_dict(), "prompt_format": self.prompt_format}

    def _kernels(self) -> str:
        """The path the model runs on, as resolved (e.g. "triton"; "auto" is one or the other)."""
        return "+".join(sorted({m.config.kernels for m in _gpt_models(self.raw_model)})) or "reference"

    def save_checkpoint(self) -> Path | None:
        """Every rank calls this at the same step (it gathers their states); rank 0 writes."""
        state = self.state_dict()
        self._saved_step = self.step
        if self.is_main:
            model = self.raw_model if hasattr(self.raw_model, "save") else _SafetensorsSaver(self.raw_model)
            self.last_ckpt = self.checkpointer.save(self.step, model, state)
            self._plot()
        return self.last_ckpt

    def _check_same_function(self, ckpt, saved_cfg):
        """Another function of the weights (a logit soft cap, local attention, unscaled attention
        scores, the position encoding: RoPE or learned, RoPE's theta, scaling and rotated width, the norm: LayerNorm or RMSNorm,
        and its eps, biases, on q/k/v only (Qwen2) or none, Gemma's scaled embeddings, sandwich norms,
        local RoPE, attention soft cap and scale, SmolLM3's NoPE layers, OLMo's absent input norms and
        whole-width q/k norms, GPT-NeoX's parallel blocks and exact GELU, BLOOM's embedding norm, MPT's
        bias-free LayerNorms, Falcon-RW's scaled ALiBi, the experts: their count and top k, Qwen2-MoE's shared
        expert, GPT-OSS's biases and clamped SwiGLU) or another MLP (GELU, SwiGLU or GeGLU, the gated ones'
        hidden size: other weights too, named before their shapes are): the run would go on as another model. A
        config from before a field reads as without it; no saved config (a bare weights file) is not compared."""
        from tritongpt.model.layers import swiglu_hidden

        cfg = self._cfg
        if cfg is None or not saved_cfg:
            return
        cap = saved_cfg.get("logit_softcap", 0.0)
        logit_scale = saved_cfg.get("logit_scale", 1.0)
        mup = (saved_cfg.get("embedding_multiplier", 1.0), saved_cfg.get("residual_multiplier", 1.0),
               saved_cfg.get("attention_multiplier", 0.0))  # Granite's (muP's) multipliers
        attn_cap, scale_width = saved_cfg.get("attn_softcap", 0.0), saved_cfg.get("attention_scale_width", 0)
        nope = saved_cfg.get("nope_layers", "")
        window, layers = saved_cfg.get("attention_window", 0), saved_cfg.get("window_layers", "all")
        encoding, theta = saved_cfg.get("position_encoding", "learned"), saved_cfg.get("rope_theta", 10000.0)
        rope_scaling, rotary = saved_cfg.get("rope_scaling"), saved_cfg.get("rotary_dim", 0)
        mlp, norm = saved_cfg.get("mlp", "gelu"), saved_cfg.get("norm", "layernorm")
        eps, bias = saved_cfg.get("norm_eps", 1e-5), saved_cfg.get("bias", True)
        qkv_only = saved_cfg.get("qkv_bias_only", False)
        qk_norm, head_dim = saved_cfg.get("qk_norm", False), saved_cfg.get("attention_head_dim", 0)
        gemma = (saved_cfg.get("scale_embeddings", False), saved_cfg.get("post_norms", False),
                 saved_cfg.get("rope_local_theta", 0.0))
        olmo = saved_cfg.get("pre_norms", True), saved_cfg.get("qk_norm_width", "head")
        neox = saved_cfg.get("parallel_residual", False), saved_cfg.get("gelu_approximate", "tanh")
        phi = saved_cfg.get("shared_norm", False), saved_cfg.get("head_bias", False)
        norms = saved_cfg.get("embed_norm", False), saved_cfg.get("norm_bias", True)
        alibi_scaled = saved_cfg.get("alibi_scaled", False)
        moe = saved_cfg.get("n_experts", 0), saved_cfg.get("experts_per_token", 2), saved_cfg.get("moe_norm_topk", True)
        # which layers are the mixture, the dense ones' width and the shared expert's (0: none); from before the
        # fields, every layer's and none
        moe_layout = (saved_cfg.get("moe_layers", "all"), saved_cfg.get("moe_dense_hidden", 0),
                      saved_cfg.get("moe_shared_hidden", 0))
        # the experts' other fields (Qwen2-MoE's shared expert, GPT-OSS's biases and clamped SwiGLU): a config
        # from before one reads as without it, the config's defaults
        moe_extras = (saved_cfg.get("moe_shared_hidden", 0), saved_cfg.get("moe_bias", False),
                      saved_cfg.get("moe_activation", "glu"), saved_cfg.get("swiglu_limit", 7.0),
                      saved_cfg.get("swiglu_alpha", 1.702))
        n_embd = saved_cfg.get("n_embd", cfg.n_embd)
        hidden = saved_cfg.get("mlp_hidden", 0) or (4 * n_embd if mlp == "relu2" else swiglu_hidden(n_embd))
        gated = ("swiglu", "geglu", "relu2")  # (and the squared-ReLU MLP's hidden size is its own too)
        if mlp != cfg.mlp or (mlp in gated and hidden != cfg.ff_hidden):
            def kind(m, h):
                names = {"swiglu": "SwiGLU", "geglu": "GeGLU", "relu2": "squared-ReLU"}
                return f"has a {names[m]} MLP of hidden size {h}" if m in gated else "has a GELU MLP"

            what = f"{kind(mlp, hidden)}, this run's model {kind(cfg.mlp, cfg.ff_hidden)}"
            flags = f"--mlp {mlp}" + (f" --mlp-hidden {hidden}" if mlp in gated else "")
        elif encoding != cfg.position_encoding or (encoding == "rope" and (theta, rope_scaling, rotary) != (
                cfg.rope_theta, cfg.rope_scaling, cfg.rotary_dim)):
            def positions(e, t, s, r):
                scaled = f", {s['rope_type']} scaling x{s['factor']:g}" if s else ""
                partial = f", {r} dimensions of each head" if r else ""
                if e == "alibi":
                    return "biases its attention scores by distance (ALiBi)"
                return f"rotates q and k (RoPE, theta {t:g}{scaled}{partial})" if e == "rope" else \
                    "learns position embeddings"

            what = (f"{positions(encoding, theta, rope_scaling, rotary)}, this run's model "
                    f"{positions(cfg.position_encoding, cfg.rope_theta, cfg.rope_scaling, cfg.rotary_dim)}")
            flags = f"--position-encoding {encoding}" + (f" --rope-theta {theta:g}" if encoding == "rope" else "") \
                + (f" --rotary-dim {rotary}" if rotary else "")
            if rope_scaling or cfg.rope_scaling:  # no flag scales RoPE: only an --init folder's config.json
                flags = "the run's own --init"
        elif norm != cfg.norm:
            what = f"normalizes with {norm}, this run's model with {cfg.norm}"
            flags = f"--norm {norm}"
        elif eps != cfg.norm_eps:
            what = f"adds eps {eps:g} in its norms, this run's model {cfg.norm_eps:g}"
            flags = "the run's own --init"
        elif (bias, qkv_only) != (cfg.bias, cfg.qkv_bias_only):
            def has(on, qkv):
                return "has biases in its linear layers" if on else "has biases on q/k/v only" if qkv else \
                    "has no biases"

            what = f"{has(bias, qkv_only)}, this run's model {has(cfg.bias, cfg.qkv_bias_only)}"
            # Qwen2's q/k/v-only biases have no flag: only an --init folder's config.json sets them
            flags = "the run's own --init" if qkv_only or cfg.qkv_bias_only else "--bias" if bias else "--no-bias"
        elif cap != cfg.logit_softcap:
            what = f"soft-caps its logits at {cap:g}, this run's at {cfg.logit_softcap:g} (0: none)"
            flags = f"--logit-softcap {cap:g}"
        elif logit_scale != cfg.logit_scale:
            what = f"scales its logits by {logit_scale:g}, this run's by {cfg.logit_scale:g} (1: unscaled)"
            flags = f"--logit-scale {logit_scale:g}"
        elif mup != (cfg.embedding_multiplier, cfg.residual_multiplier, cfg.attention_multiplier):
            def multipliers(embedding, residual, attention):
                return (f"multiplies its embeddings by {embedding:g} and its sublayer outputs by {residual:g} and "
                        f"scales its attention scores by {f'{attention:g}' if attention else '1/sqrt(head_dim)'}")

            now = multipliers(cfg.embedding_multiplier, cfg.residual_multiplier, cfg.attention_multiplier)
            what = f"{multipliers(*mup)}, this run's model {now}"
            flags = (f"--embedding-multiplier {mup[0]:g} --residual-multiplier {mup[1]:g}"
                     + (f" --attention-multiplier {mup[2]:g}" if mup[2] else ""))
        elif window != cfg.attention_window or (window and layers != cfg.window_layers):
            def span(w, which):
                return f"attends over the last {w} positions in {which} layers" if w else \
                    "attends over the whole context"

            what = f"{span(window, layers)}, this run's model {span(cfg.attention_window, cfg.window_layers)}"
            flags = f"--attention-window {window}" + (f" --window-layers {layers}" if window else "")
        elif (qk_norm, head_dim) != (cfg.qk_norm, cfg.attention_head_dim):
            def heads(norm, width):
                return f"{'normalizes' if norm else 'does not normalize'} each head's q and k and has heads of " \
                    f"{width or 'n_embd / n_head'}"

            what = f"{heads(qk_norm, head_dim)}, this run's model {heads(cfg.qk_norm, cfg.attention_head_dim)}"
            flags = "the run's own --init"  # Qwen3's: no flag makes them, only an --init folder's config.json
        elif gemma != (cfg.scale_embeddings, cfg.post_norms, cfg.rope_local_theta):
            def touches(scaled, post, local):
                return ", ".join([f"{'scales' if scaled else 'does not scale'} its token embeddings",
                                  f"{'normalizes' if post else 'does not normalize'} each sublayer's output",
                                  f"rotates its local layers with theta {local:g}" if local else
                                  "has one RoPE for every layer"])

            what = (f"{touches(*gemma)}; this run's model "
                    f"{touches(cfg.scale_embeddings, cfg.post_norms, cfg.rope_local_theta)}")
            flags = "the run's own --init"  # Gemma's: no flag makes them, only an --init folder's config.json
        elif olmo != (cfg.pre_norms, cfg.qk_norm_width):
            def olmo_touches(pre, width):
                return (f"{'normalizes' if pre else 'does not normalize'} each sublayer's input and normalizes q and k "
                        + {"all": "over all heads at once", "each": "per head with weights of each head's own"}.get(
                            width, "per head (if at all)"))

            what = f"{olmo_touches(*olmo)}, this run's model {olmo_touches(cfg.pre_norms, cfg.qk_norm_width)}"
            flags = "the run's own --init"  # OLMo's: no flag makes them, only an --init folder's config.json
        elif neox != (cfg.parallel_residual, cfg.gelu_approximate):
            def neox_touches(parallel, approximate):
                return (f"{'runs attention and MLP in parallel' if parallel else 'runs attention then MLP'} and "
                        f"computes the {'exact (erf)' if approximate == 'none' else 'tanh'} GELU")

            now = neox_touches(cfg.parallel_residual, cfg.gelu_approximate)
            what = f"{neox_touches(*neox)}, this run's model {now}"
            flags = f"--{'' if neox[0] else 'no-'}parallel-residual --gelu-approximate {neox[1]}"
        elif phi != (cfg.shared_norm, cfg.head_bias):
            def phi_touches(shared, bias):
                return (f"{'reads one norm in both sublayers' if shared else 'has a norm for each sublayer'} and "
                        f"{'has a bias on its LM head' if bias else 'no LM-head bias'}")

            what = f"{phi_touches(*phi)}, this run's model {phi_touches(cfg.shared_norm, cfg.head_bias)}"
            flags = f"--{'' if phi[0] else 'no-'}shared-norm --{'' if phi[1] else 'no-'}head-bias"
        elif alibi_scaled != cfg.alibi_scaled and encoding == cfg.position_encoding == "alibi":
            def alibi_at(scaled):
                return f"adds ALiBi's bias {'before' if scaled else 'after'} the scores' scale"

            what = f"{alibi_at(alibi_scaled)}, this run's model {alibi_at(cfg.alibi_scaled)}"
            flags = f"--{'' if alibi_scaled else 'no-'}alibi-scaled"
        elif norms != (cfg.embed_norm, cfg.norm_bias):
            def norm_touches(embed, biased):
                return (f"{'normalizes' if embed else 'does not normalize'} its token embeddings and has LayerNorms "
                        f"{'with' if biased else 'without'} biases")

            what = f"{norm_touches(*norms)}, this run's model {norm_touches(cfg.embed_norm, cfg.norm_bias)}"
            flags = f"--{'' if norms[0] else 'no-'}embed-norm --{'' if norms[1] else 'no-'}norm-bias"
        elif attn_cap != cfg.attn_softcap:
            what = f"soft-caps its attention scores at {attn_cap:g}, this run's at {cfg.attn_softcap:g} (0: none)"
            flags = f"--attn-softcap {attn_cap:g}"
        elif scale_width != cfg.attention_scale_width:
            def width(w):
                return f"1/sqrt({w})" if w else "1/sqrt(head_dim)"

            what = f"scales its attention scores by {width(scale_width)}, this run's model by " \
                f"{width(cfg.attention_scale_width)}"
            flags = "the run's own --init"  # Gemma's query_pre_attn_scalar: only an --init folder's config.json
        elif nope != cfg.nope_layers:
            def rotates(layers):
                return f"rotates q and k in every layer but {layers}" if layers else "rotates q and k in every layer"

            what = f"{rotates(nope)}, this run's model {rotates(cfg.nope_layers)}"
            flags = f"--nope-layers {nope}" if nope else "the run's own flags (no --nope-layers)"
        elif saved_cfg.get("scale_attention", True) != cfg.scale_attention:
            def scaled(on):
                return "scales its attention scores by 1/sqrt(head_dim)" if on else \
                    "does not scale its attention scores"

            what = f"{scaled(not cfg.scale_attention)}, this run's model {scaled(cfg.scale_attention)}"
            flags = "the run's own --model"
        elif moe != (cfg.n_experts, cfg.experts_per_token, cfg.moe_norm_topk) and (moe[0] or cfg.n_experts):
            def experts(n, k, norm):
                return (f"routes each token to {k} of {n} experts"
                        + (" (weights renormalized)" if norm else " (weights not renormalized)")) if n else \
                    "has a dense MLP"

            now = experts(cfg.n_experts, cfg.experts_per_token, cfg.moe_norm_topk)
            what = f"{experts(*moe)}, this run's model {now}"
            flags = f"--n-experts {moe[0]} --experts-per-token {moe[1]}" if moe[2] == cfg.moe_norm_topk else \
                "the run's own --init"  # moe_norm_topk: no flag makes it, only an --init folder's config.json
        elif moe[0] and moe_layout != (cfg.moe_layers, cfg.moe_dense_hidden, cfg.moe_shared_hidden):
            def layout(layers, dense, shared):
                return (f"has experts in {'every layer' if layers == 'all' else 'layers ' + layers}"
                        + (f" (the others dense, of width {dense})" if layers != "all" else "")
                        + (f" and a shared expert of width {shared}" if shared else " and no shared expert")
                        + f" (moe_layers {layers!r}, moe_dense_hidden {dense}, moe_shared_hidden {shared})")

            what = f"{layout(*moe_layout)}, this run's model " \
                f"{layout(cfg.moe_layers, cfg.moe_dense_hidden, cfg.moe_shared_hidden)}"
            # pretrain's flags set the first two; the shared expert only an --init folder's config.json
            flags = f"--moe-layers {moe_layout[0]} --moe-dense-hidden {moe_layout[1]}" \
                if moe_layout[2] == cfg.moe_shared_hidden else "the run's own --init"
        elif moe_extras != (cfg.moe_shared_hidden, cfg.moe_bias, cfg.moe_activation, cfg.swiglu_limit,
                            cfg.swiglu_alpha) and (moe[0] or cfg.n_experts):
            def extras(shared, biased, activation, limit, alpha):
                return ", ".join([f"has a shared expert of hidden size {shared}" if shared else "has no shared expert",
                                  f"{'has' if biased else 'has no'} router and expert biases",
                                  f"computes GPT-OSS's clamped SwiGLU (limit {limit:g}, alpha {alpha:g})"
                                  if activation == "gpt_oss" else "computes the gated MLP mlp names"])

            now = extras(cfg.moe_shared_hidden, cfg.moe_bias, cfg.moe_activation, cfg.swiglu_limit, cfg.swiglu_alpha)
            what = f"{extras(*moe_extras)}; this run's model {now}"
            flags = "the run's own --init"  # Qwen2-MoE's and GPT-OSS's: only an --init folder's config.json
        else:
            return
        fix = f"pass {flags}" if self.name == "pretrain" else "resume with the run's own --init"
        raise UserError(f"--resume: {ckpt}'s model {what}: {fix}")

    def resume(self, where) -> int:
        """Load weights, optimizer, RNGs, batch generator, data position and step."""
        # a run folder (its newest checkpoint), a checkpoint folder, or a file inside one
        ckpt = common.resume_checkpoint(self.out_dir, where)
        state = common.load_state(ckpt)
        common.check_resume_of(ckpt, state, self.name)
        was = state.get("args", {}).get("optimizer", "adamw")  # runs from before the flag: AdamW
        if was != self.args.optimizer:  # its state (moments, momentum) is of the run's optimizer
            raise UserError(f"--resume: {ckpt}'s run trained with --optimizer {was}, not {self.args.optimizer}: "
                            f"pass --optimizer {was}")
        saved_cfg = common.saved_model_config(ckpt / "model.safetensors")
        # before the weights: a RoPE model's have no pos_emb, and the shapes' error would name --model
        self._check_same_function(ckpt, saved_cfg)
        common.check_same_base(self.raw_model, ckpt, saved_args=state.get("args", {}))
        # a run from --init (sft's always: it has no --model; reward refuses --model with one) got its shape there
        init = state.get("args", {}).get("init")
        common.load_checkpoint_weights(self.raw_model, ckpt, self.device, self._cfg, "model",
                                       f"--init {init}" if init else common.MODEL_FLAGS)
        # dropout changes the run too but is the model's (pretrain --dropout), not a TrainArgs field:
        # compared with the model config saved beside the weights (a resume without --dropout
        # silently trained on at the preset's rate)
        now_args, names = {**vars(self.args), **self.run_args}, TRAJECTORY_ARGS + tuple(self.run_args)
        from tritongpt.commands import qlora_recorded

        state = {**state, "args": qlora_recorded(state.get("args", {}))}
        saved_dropout = saved_cfg.get("dropout")
        if self._cfg is not None and saved_dropout is not None:
            now_args, names = {**now_args, "dropout": self._cfg.dropout}, names + ("dropout",)
            state = {**state, "args": {**state.get("args", {}), "dropout": saved_dropout}}
        if self._cfg is not None and saved_cfg.get("n_experts"):  # the aux loss's weight, likewise
            now_args, names = {**now_args, "moe_aux_loss": self._cfg.moe_aux_loss}, names + ("moe_aux_loss",)
            state = {**state, "args": {**state.get("args", {}), "moe_aux_loss": saved_cfg.get("moe_aux_loss", 0.0)}}
        common.check_resume(ckpt, state, now_args, names, "step", "--max-steps", str(self.dtype),
                            say=self.is_main, kernels=self._kernels(),
                            defaults={**{f.name: f.default for f in fields(TrainArgs)}, **self.run_defaults})
        if state["step"] == self.args.max_steps and self.is_main:
            note(f"{ckpt} is already at --max-steps {self.args.max_steps}: nothing to train, "
                 "evaluating it")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state.get("scaler"))
        saved_world = len(state["generator"])
        if saved_world != self.world_size and self.is_main:
            note(f"checkpoint was written by {saved_world} process(es), resuming with "
                 f"{self.world_size}: batches will differ from an uninterrupted run")
        if self.rank < saved_world:  # a new rank keeps its fresh seed + rank generator
            common.set_rng_state(state["rng"][self.rank])
            self.generator.set_state(state["generator"][self.rank])
        data = state.get("data") or [None]
        if self.set_data_state and data[min(self.rank, len(data) - 1)] is not None:
            self.set_data_state(data[min(self.rank, len(data) - 1)])
        self.step = state["step"]
        self._saved_step = self.step
        self.last_ckpt = ckpt
        self.metrics.truncate(self.step)  # a no-op except on rank 0
        return self.step

    # -- helpers -----------------------------------------------------------------------------
    def _to_device(self, batch):
        if isinstance(batch, torch.Tensor):
            batch = (batch,)
        return tuple(t.to(self.device, non_blocking=True) if isinstance(t, torch.Tensor) else t
                     for t in batch)

    def _side_run(self, fn):
        """eval/sample on the raw model: no grad, eval mode, autocast, and the training RNG untouched; a mixture of
        experts' load-balancing loss left out (common.without_moe_aux): every job's evaluations are its plain
        objective (val_loss the cross-entropy), the aux being a training term only."""
        was = self.raw_model.training
        self.raw_model.eval()
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad(), \
                    common.autocast(self.device, self.dtype), common.without_moe_aux(self.raw_model):
                return fn(self.raw_model)
        finally:
            self.raw_model.train(was)

    def _plot(self):
        """loss.png: the training loss and every *loss column eval_fn logged (val_loss, ...), and each source's of
        a data mixture (pretrain's val_loss_<name>)."""
        rows = self.metrics.rows()
        keys = ["loss"]
        for r in rows:
            keys += [k for k in r if (k.endswith("loss") or k.startswith("val_loss_")) and k not in keys]
        self._plotted = common.replot(self._plotted, rows, self.plot_path, keys=tuple(keys), title=self.name)

    def _log(self, msg):
        if self.is_main:
            from tqdm import tqdm

            tqdm.write(msg)

    # -- the loop ------------------------------------------------------------------------------
    def fit(self, finish_tracking: bool = True) -> dict:
        """Train to args.max_steps. The trackers' runs (--report-to) end with it, or on an error; with
        finish_tracking=False they stay open for rows logged after it, until metrics.close()."""
        try:
            with self.metrics.finishing(finish_tracking):
                return self._fit()
        except BaseException as e:
            if self.ddp:
                # The traceback's frames hold the DDP wrapper (and so the process group) for as
                # long as the error lives; one that reaches the top of a script lives into
                # interpreter exit, and the group's threads with it. Their locals go, their lines stay.
                traceback.clear_frames(e.__traceback__)
            raise
        finally:
            self.close()

    def close(self):
        """Tear down the process group this Trainer started (fit() does it; call it if fit never runs).

        The DDP wrapper goes first: it holds the group, and a group still held after
        destroy_process_group keeps its communication threads until the interpreter exits.
        """
        self.model = self.raw_model
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self._owns_group = False

    def clear_old_run(self):
        """--overwrite: delete the old run's checkpoints, metrics and tracker files, once. fit() does it
        first; a caller that logs a row before fit() calls it before that row, which fit would delete."""
        if self._clear_first and self.is_main:
            common.clear_run(self.out_dir)
        self._clear_first = False

    def _fit(self) -> dict:
        from tqdm import tqdm

        a = self.args
        common.set_seed(a.seed + self.rank)  # dropout differs by rank; resume overwrites all RNGs
        self.clear_old_run()  # --overwrite (a resume from elsewhere may come next)
        if a.resume:
            self.resume(a.resume)
            self._log(f"resumed from {self.last_ckpt} at step {self.step}")
        self.metrics.start_trackers()  # after resume's truncate, which they need to know
        if self.is_main and a.warmup_steps >= a.max_steps > self.step:
            note(f"--warmup-steps {a.warmup_steps} >= --max-steps {a.max_steps}: the learning rate "
                 f"stops at {common.lr_at(a.max_steps - 1, a.lr, a.warmup_steps, a.max_steps, a.min_lr):.2e} "
                 f"on the way up to --lr {a.lr:g} and never decays")
        model = self.raw_model
        model.train()
        if a.compile:
            model = torch.compile(model, mode=a.compile_mode)
        if self.ddp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # buffers are constant (the causal mask): no need to sync them every forward
            DDP = torch.nn.parallel.DistributedDataParallel
            no_sync_kw = ("forward_sync_buffers" if "forward_sync_buffers" in
                          inspect.signature(DDP.__init__).parameters else "broadcast_buffers")
            model = DDP(model, device_ids=ids, **{no_sync_kw: False})
        self.model = model

        last_eval = {}
        if self._evaluates() and a.eval_every and self.step == 0:
            last_eval = self._evaluate()
        bar = tqdm(total=a.max_steps, initial=self.step, desc=self.name, disable=not self.is_main,
                   dynamic_ncols=True, mininterval=0.5)
        losses, seen_tokens, seen_time, t_start = [], 0.0, 0.0, time.time()
        loss_value = None  # stays None when a resume is already at --max-steps
        try:
            while self.step < a.max_steps:
                row = self._train_step(model)
                loss_value = row["loss"]
                losses.append(loss_value)
                if len(losses) > 1:  # the first step pays for warmup/compilation
                    seen_tokens += row["tok_per_s"] * row["dt"]
                    seen_time += row["dt"]
                avg_tok_s = seen_tokens / seen_time if seen_time else row["tok_per_s"]
                # the last step is always evaluated, in its own row: readers keyed by step see one row
                if self._evaluates() and (self.step == a.max_steps or a.eval_every and self.step % a.eval_every == 0):
                    last_eval = self._evaluate(log=False)
                    row.update(last_eval)
                self.metrics.log(**row)
                # refresh=False: update() redraws, at most every mininterval, not every step
                # the bar shows the run's average speed (the first step left out); the step lines, each step's
                bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{row['lr']:.2e}", avg_tok_s=f"{avg_tok_s:.0f}",
                                avg_mfu=self._mfu_text(self._mfu(avg_tok_s, self._seq_len)), refresh=False)
                bar.update(1)
                if a.log_every and (self.step % a.log_every == 0 or self.step == a.max_steps):
                    self._log(self._format(row))
                if self.is_main and self.sample_fn and a.sample_every and self.step % a.sample_every == 0 \
                        and self.step < a.max_steps:
                    self._sample()
                if a.ckpt_every and self.step % a.ckpt_every == 0:
                    self.save_checkpoint()
        finally:
            bar.close()
        # the final checkpoint first: the RNG state it captures is the one a longer run continues from
        if self._saved_step != self.step:
            self.save_checkpoint()
        # nothing trained (a resume at --max-steps): the checkpoint's evaluation, whose row is logged
        if self._evaluates() and not losses:
            last_eval = self._evaluate(log=False)
        if self.is_main and self.sample_fn:
            self._sample()
        if self.is_main:
            self._plot()
        if self.ddp:
            dist.barrier()  # the others wait while rank 0 writes the last checkpoint
        tok_s = seen_tokens / seen_time if seen_time else None
        return {"name": self.name, "is_main": self.is_main, "step": self.step, "loss": loss_value,
                "first_loss": losses[0] if losses else None, "losses": losses,
                **last_eval, "tok_per_s": tok_s,
                "mfu": self._mfu(tok_s, self._seq_len) if tok_s and losses else None,
                "time_s": time.time() - t_start,
                "checkpoint": str(self.last_ckpt) if self.last_ckpt else None,
                "metrics_path": str(self.metrics.path), "plot_path": str(self.plot_path)}

    def _count_estimate(self, n):
        """c for a (sum, count) step: its first micro-batch's count (the mean over the ranks, so
        every rank divides alike and DDP's average stays one sum) times grad_accum, at least 1.

        Backward runs on sum / c, not the bare sum: a sum's gradient is count times a mean's, and
        in fp16 it overflowed at the loss scale's start (2^16), skipping the first ~log2(count)
        steps. An upper bound (batch x context) would not overflow, but a short answer's gradients
        would sit that many times below a mean's, nearer fp16's underflow."""
        c = torch.as_tensor(n, device=self.device).detach().float() * self.args.grad_accum
        if self.ddp:
            dist.all_reduce(c, op=dist.ReduceOp.SUM)
            c /= self.world_size
        return c.clamp_min(1.0)

    def _train_step(self, model) -> dict:
        a = self.args
        t0 = time.perf_counter()
        lr = common.lr_at(self.step, a.lr, a.warmup_steps, a.max_steps, a.min_lr, a.lr_schedule, a.decay_fraction)
        common.set_lr(self.optimizer, lr)
        loss_sum = torch.zeros((), device=self.device)
        count = torch.zeros((), device=self.device)  # counted items, when loss_fn returns (sum, count)
        divisor = None  # a (sum, count) step's estimate of its count; None while its losses are means
        tokens = 0
        graphs = a.compile and a.compile_mode in CUDAGRAPH_MODES
        owned = set()  # ids of the parameters whose .grad is the loop's own copy (_own_grads)
        # a mixture of experts' load-balancing term in the loss, weighed as the loss is (moe_aux): None for none
        aux_sum = None
        common.take_moe_aux(self.raw_model)  # none left over from a forward outside this step's losses
        for micro in range(a.grad_accum):
            batch = self._to_device(self.get_batch("train", self.generator))
            tokens += batch[0].numel()
            self._seq_len = batch[0].shape[-1]
            sync = not self.ddp or micro == a.grad_accum - 1
            if graphs:
                # a new CUDA-graph tree step: the replay may overwrite the last micro-batch's outputs, which
                # the loop has copied out (loss_sum +=, count +=) and no longer reads
                torch.compiler.cudagraph_mark_step_begin()
            try:
                with (contextlib.nullcontext() if sync else model.no_sync()):
                    with common.autocast(self.device, self.dtype):
                        loss = self.loss_fn(model, batch)
                    aux = common.take_moe_aux(self.raw_model)
                    if isinstance(loss, tuple):
                        # a sum: scaled by the step's whole count once every rank has it (below)
                        loss, n = loss
                        # the aux joined the sum once per counted target (sft_loss): over the count, its mean
                        aux = None if aux is None else aux * n
                        if divisor is None:
                            divisor = self._count_estimate(n)
                        count += n
                        self.scaler.backward(loss / divisor)
                    else:
                        # each micro-batch loss / grad_accum: the summed gradients are the mean's
                        self.scaler.backward(loss / a.grad_accum)
            except RuntimeError as e:
                if not is_oom(e):
                    raise
                self.optimizer.zero_grad(set_to_none=True)
                raise UserError(f"{self.name}: a micro-batch of {tuple(batch[0].shape)} tokens does not fit "
                                f"in {self.device.type} memory at step {self.step + 1}; lower --batch-size "
                                f"(and raise --grad-accum to keep the same global batch)"
                                + ("" if a.activation_checkpointing else
                                   ", or pass --activation-checkpointing (the same step in far less "
                                   "activation memory, ~1/3 slower)")) from None
            loss_sum += loss.detach().float()  # a copy: `loss` may be a CUDA graph's static output buffer
            if aux is not None:
                aux_sum = aux.float() + (0.0 if aux_sum is None else aux_sum)  # a copy too (a new tensor)
            if graphs and micro < a.grad_accum - 1:
                self._own_grads(owned)
        weighted = divisor is not None
        has_aux = aux_sum is not None  # alike on every rank: the same model and coefficient
        if weighted:
            totals = torch.stack([loss_sum, count] + ([aux_sum] if has_aux else []))
            if self.ddp:
                dist.all_reduce(totals, op=dist.ReduceOp.SUM)
            loss_t, count = totals[0] / totals[1], totals[1]
            aux_t = totals[2] / totals[1] if has_aux else None
            # DDP averaged the ranks' gradients of sum / c: times world_size * c / count is the token mean
            grads = [p.grad for p in self.params if p.grad is not None]
            torch._foreach_mul_(grads, self.world_size * divisor / count)
        else:
            means = torch.stack([loss_sum] + ([aux_sum] if has_aux else [])) / a.grad_accum
            if self.ddp:
                dist.all_reduce(means, op=dist.ReduceOp.SUM)
                means /= self.world_size
            loss_t, aux_t = means[0], (means[1] if has_aux else None)
        tokens *= self.world_size
        max_norm = a.grad_clip if a.grad_clip > 0 else float("inf")
        self.scaler.unscale(self.optimizer)
        norm_t = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        # one device-to-host sync for these numbers; nothing has touched the weights yet
        loss_value, grad_norm, count_value, *aux_value = torch.stack(
            [loss_t.float(), norm_t.float().to(loss_t.device), count.float()]
            + ([aux_t.float()] if has_aux else [])).tolist()
        scale = self.scaler.scale  # this step's (until step() updates it), read once the GPU has caught up
        step = self.step + 1  # the step being taken, 1-based as logged
        if weighted and count_value == 0:
            self.optimizer.zero_grad(set_to_none=True)
            raise UserError(f"{self.name}: no batch of step {step} has a counted target (every one is "
                            f"ignored); stopped without saving (last good checkpoint: {self.last_ckpt or 'none'})")
        if not math.isfinite(loss_value):
            self.optimizer.zero_grad(set_to_none=True)
            raise UserError(f"{self.name}: loss is {loss_value} at step {step}; stopped without "
                            f"saving (last good checkpoint: {self.last_ckpt or 'none'})")
        skipped = self.scaler.skips(grad_norm)
        if not math.isfinite(grad_norm) and not skipped:
            self.optimizer.zero_grad(set_to_none=True)
            raise UserError(f"{self.name}: gradient norm is {grad_norm} at step {step}{self.scaler.why()}; "
                            f"stopped without saving (last good checkpoint: {self.last_ckpt or 'none'})")
        self.scaler.step(self.optimizer)  # with fp16, no step where the gradients overflowed
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = max(time.perf_counter() - t0, 1e-9)
        self.step = step
        tok_s = tokens / dt
        row = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": None if skipped else grad_norm,
               "tok_per_s": tok_s, "mfu": self._mfu(tok_s, self._seq_len),
               "mem_gb": round(_mem_gb(self.device), 3), "dt": dt}
        if has_aux:  # what of `loss` is the routers' balance: loss - moe_aux is the plain objective
            row["moe_aux"] = aux_value[0]
        if self.scaler.enabled:
            row.update(loss_scale=scale, skipped=skipped)
        if self.step_metrics is not None:
            row.update(self.step_metrics())
        return row

    def _own_grads(self, owned: set):
        """Each .grad a CUDA-graph backward made replaced by a copy, before the next micro-batch's replay.

        A parameter's first gradient of the step is the backward graph's output buffer itself (autograd keeps
        it as .grad rather than copy it), which the next replay overwrites: accumulating into it would fail
        (torch's "accessing gradient tensor output of CUDAGraphs that has been overwritten"). A copy is the
        loop's own, and the next micro-batches add into it in place. Once a step (for the first micro-batch,
        and for a parameter whose first gradient comes later); the last micro-batch's need none, as the
        optimizer reads them before any replay. torch's message suggests zeroed .grad buffers instead, but
        a parameter no loss reaches would then be stepped (weight decay, moments) where it now is not."""
        for p in self.params:
            if p.grad is not None and id(p) not in owned:
                p.grad = p.grad.clone()
                owned.add(id(p))

    def _mfu(self, tok_s, seq_len):
        if self._peak is None or self._cfg is None:
            return None
        return flops_per_token(self._cfg, self._n_params, seq_len) * tok_s / (self._peak * self.world_size)

    def _evaluates(self) -> bool:
        """Whether evaluations run here: rank 0's eval_fn, or a shared_eval_fn every rank runs."""
        return bool(self.is_main and self.eval_fn or self.shared_eval_fn)

    def _evaluate(self, log=True) -> dict:
        """eval_fn's result (rank 0) and shared_eval_fn's (every rank: the others return it only)."""
        result = (self._side_run(self.eval_fn) or {}) if self.is_main and self.eval_fn else {}
        if self.shared_eval_fn is not None:
            result.update(self._side_run(lambda m: self.shared_eval_fn(m, self.rank, self.world_size)) or {})
        if not self.is_main:
            return result
        result = {k: (float(v) if isinstance(v, (int, float, torch.Tensor)) else v) for k, v in result.items()}
        if log:
            self.metrics.log(step=self.step, **result)
        self._log(f"step {self.step:>6} | " + " | ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
        return result

    def _sample(self):
        text = self._side_run(self.sample_fn)
        self._log(f"--- sample at step {self.step} ---\n{text}\n---")

    @staticmethod
    def _mfu_text(mfu) -> str:
        return "-" if mfu is None else f"{100 * mfu:.1f}%"

    def _format(self, row) -> str:
        mfu = self._mfu_text(row["mfu"])
        norm = "overflow, step skipped" if row.get("skipped") else f"{row['grad_norm']:.3f}"
        scale = f" | loss scale {row['loss_scale']:g}" if "loss_scale" in row else ""
        return (f"step {row['step']:>6} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | "
                f"grad_norm {norm}{scale} | {row['tok_per_s']:,.0f} tok/s | mfu {mfu} | "
                f"mem {row['mem_gb']:.2f} GB")


def loss_eval_fn(loss_fn, get_batch, batches: int, seed: int = 0, split: str = "val",
                 key: str = "val_loss"):
    """An eval_fn: mean of loss_fn over the same `batches` batches of `split` every time.

    The batches come from a generator reseeded on every call, so evaluations are comparable
    and do not move the training generator. A mixture of experts' load-balancing loss is left
    out (as the Trainer's evaluations leave it out, also when this is called alone): the mean is
    the plain loss, not the training objective.
    """
    def eval_fn(model):
        device = next(model.parameters()).device
        gen = torch.Generator().manual_seed(seed)
        total, count = 0.0, 0.0
        with common.without_moe_aux(model):
            for _ in range(batches):
                batch = get_batch(split, gen)
                batch = tuple(t.to(device) if isinstance(t, torch.Tensor) else t
                              for t in (batch if isinstance(batch, (tuple, list)) else (batch,)))
                loss = loss_fn(model, batch)
                loss, n = loss if isinstance(loss, tuple) else (loss, 1)  # (sum, count): token-weighted
                total, count = total + float(loss), count + float(n)
        return {key: total / count}

    return eval_fn
