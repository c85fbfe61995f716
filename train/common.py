"""Pieces every trainer shares (pretraining, SFT, reward model, RLHF, DPO).

Device and precision, the AdamW parameter groups, the learning-rate schedule, crash-safe
checkpoints, RNG state capture for exact resume, per-step JSONL metrics (also sent to wandb or
TensorBoard with --report-to) and the loss plot.
"""
import contextlib
import inspect
import json
import math
import os
import pickle
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from tritongpt.errors import UserError, first_line, note


# -- device and precision ---------------------------------------------------------------------
def dist_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) as torchrun sets them for every process it starts; (0, 0, 1) alone."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1))


def progress(items, desc: str):
    """items with a tqdm bar on stderr (rank 0's alone under torchrun): for the work a command does before its
    trainer's own bar starts, so a long wait is not silent."""
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="batch", file=sys.stderr, disable=dist_env()[0] != 0, leave=False)


def pick_device(name: str = "auto") -> torch.device:
    """"auto": CUDA when present (under torchrun, this process's GPU: cuda:LOCAL_RANK), else CPU."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        _, local_rank, world_size = dist_env()
        if world_size > 1:
            return torch.device("cuda", local_rank)
        return torch.device("cuda")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available: --device cpu (or auto, the default) "
                        f"runs on this machine's CPU")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"device {name!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    return dev


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" is bf16 autocast on CUDA and fp32 on CPU; fp16 (with loss scaling) on a GPU older
    than Ampere, which has no bf16 arithmetic (torch emulates it slowly, Triton not at all)."""
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if name == "auto":
        from tritongpt.model.toggle import ampere_or_later

        if device.type != "cuda":
            return torch.float32
        # (`bench` checks the name against "cuda" on machines without a GPU: bf16 there)
        return torch.bfloat16 if ampere_or_later(device) else torch.float16
    if name not in table:
        raise UserError(f"unknown dtype {name!r}; use auto, fp32, bf16 or fp16")
    return table[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for the forward pass; a no-op for fp32 (or None: torch.autocast's own
    default would be bf16 on a CPU). Weights stay fp32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


DTYPES = ("auto", "fp32", "bf16", "fp16")  # what --dtype takes
DTYPE_HELP = ("auto = bf16 autocast on CUDA (fp16 on GPUs before Ampere), fp32 on CPU; fp16 trains with "
              "dynamic loss scaling, skipping a step whose gradients overflow")


def check_dtype(name: str) -> None:
    """--dtype as the trainers take it, checked before any work."""
    if name not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")


class LossScaler:
    """fp16 mixed precision's dynamic loss scaling (torch.amp.GradScaler); a pass-through otherwise.

    fp16 flushes values below 6e-8 to zero, where many activation gradients lie, so the loss is
    multiplied by a scale (2^16 to start) before backward and the gradients divided by it again
    before clipping. A step whose gradients overflow to inf/NaN is skipped and the scale halved;
    after 2000 steps without one it doubles. bf16 has fp32's range and needs none of this.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    @property
    def enabled(self) -> bool:
        return self.scaler is not None

    @property
    def scale(self) -> float | None:
        return self.scaler.get_scale() if self.scaler else None

    def backward(self, loss):
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def unscale(self, optimizer):
        """The gradients as they would be unscaled: call before clipping or reading their norm."""
        if self.scaler:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer):
        """optimizer.step(), which the scaler skips when a gradient overflowed; then the scale's update."""
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def state_dict(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler else None

    def load_state_dict(self, state: dict | None):
        if self.scaler and state:  # a checkpoint of a bf16/fp32 run has none: the scale starts afresh
            self.scaler.load_state_dict(state)

    def skips(self, grad_norm: float) -> bool:
        """A non-finite gradient norm is fp16's overflow, which step() skips, while the scale is
        above 1; at 1 the gradients overflow unscaled: the run diverged and must stop."""
        return self.scaler is not None and not math.isfinite(grad_norm) and self.scale > 1

    def why(self) -> str:
        """What to add to the stop message of a non-finite gradient norm."""
        return f" with the fp16 loss scale already at {self.scale:g}" if self.scaler else ""


def check_seed(seed) -> None:
    """--seed as torch's generators take it (a 64-bit integer), checked before any work: torch
    raised 'Overflow when unpacking long long' from deep inside a run."""
    if not -2**63 <= seed < 2**63:
        raise UserError(f"--seed must be a 64-bit integer (between -2**63 and 2**63 - 1), got {seed}")


def set_seed(seed: int):
    check_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # one state per GPU of the machine that saved it (every rank saves them all): on one with
        # fewer (a run on 8 GPUs resumed on 1) the others have no device to go to
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


# -- optimizer and schedule -------------------------------------------------------------------
def param_groups(model: nn.Module, weight_decay: float):
    """Decay the matrices of Linear layers; never biases, norm parameters (LayerNorm, RMSNorm) or embeddings."""
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding) or type(module).__name__ in ("LayerNorm", "RMSNorm", "PerHeadNorm"):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
        if type(module).__name__ == "MoEFeedForward":  # GPT-OSS's expert biases are [E, H]: biases, though 2-d
            no_decay_ids.update(id(b) for b in (module.b_gate, module.b_up, module.b_down) if b is not None)
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if id(p) in no_decay_ids or p.dim() < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


OPTIMIZERS = ("adamw", "muon")


class MuonWithAdamW:
    """Muon for the transformer blocks' weight matrices (an MoE's experts each a matrix: ExpertMuon)
    and AdamW for every other parameter
    (embeddings, the LM head tied to them, biases, LayerNorms, reward and value heads), as
    modded-nanogpt's speedruns and Moonshot's Muon runs split them. Stepped as one optimizer:
    the Trainer, the fp16 loss scaler (duck-typed: param_groups, step) and the checkpoints see
    one object, and set_lr reaches both (Muon's lr is scaled to match AdamW's update RMS).

    Under DDP (world_size > 1) the ranks share Muon's Newton-Schulz work, as modded-nanogpt does:
    every rank holds every averaged gradient, but orthogonalizes and steps only its own share of
    the matrices (`owner`, balanced by size), and the ranks then all-gather the stepped matrices.
    A matrix's momentum lives on its owner only; state_dict() gathers it whole, so a checkpoint is
    what one process would save and resumes on any number of ranks."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer, rank: int = 0,
                 world_size: int = 1):
        self.muon, self.adamw = muon, adamw
        self.rank, self.world_size = rank, world_size
        # in the order of the Muon's own state_dict indices
        self.matrices = [p for g in muon.param_groups for p in g["params"]]
        self.owner = shard_by_size([p.numel() for p in self.matrices], world_size)

    @property
    def param_groups(self) -> list:
        # every matrix, owned or not: the loss scaler unscales them all, so each rank finds the
        # same overflow and all skip a step together
        return self.muon.param_groups + self.adamw.param_groups

    def step(self):
        if self.world_size == 1:
            self.muon.step()
        else:
            others = [(p, p.grad) for p, r in zip(self.matrices, self.owner) if r != self.rank]
            for p, _ in others:
                p.grad = None  # torch's Muon leaves a matrix without a gradient alone
            try:
                self.muon.step()
            finally:
                for p, g in others:
                    p.grad = g
            with torch.no_grad():
                self._from_owners(self.matrices, self.owner)
        self.adamw.step()

    def _from_owners(self, tensors: list, owners: list):
        """Each of tensors (one a matrix, on every rank) given its owner's values on every rank:
        one all_gather of each rank's share, flattened and padded to the longest share."""
        import torch.distributed as dist

        shares = [[t for t, r in zip(tensors, owners) if r == k] for k in range(self.world_size)]
        longest = max(sum(t.numel() for t in share) for share in shares)
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)  # a narrower dtype comes back exactly
        mine = torch.zeros(longest, dtype=dtype, device=tensors[0].device)
        if shares[self.rank]:
            flat = torch.cat([t.reshape(-1).to(dtype) for t in shares[self.rank]])
            mine[:flat.numel()] = flat
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine)
        for k, share in enumerate(shares):
            if k == self.rank:
                continue
            at = 0
            for t in share:
                t.copy_(gathered[k][at:at + t.numel()].view(t.shape))
                at += t.numel()

    def zero_grad(self, set_to_none: bool = True):
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """Every rank calls this under DDP (the owners' momenta are gathered)."""
        muon = self.muon.state_dict()
        if self.world_size > 1:
            muon = {**muon, "state": self._whole_muon_state(muon["state"])}
        return {"muon": muon, "adamw": self.adamw.state_dict()}

    def _whole_muon_state(self, state: dict) -> dict:
        import torch.distributed as dist

        held = [None] * self.world_size  # which matrices have momentum yet (none before a first step)
        dist.all_gather_object(held, sorted(i for i in state if self.owner[i] == self.rank))
        have = sorted(i for share in held for i in share)
        extra = {k for i in state for k in state[i]} - {"momentum_buffer"}
        if extra:  # torch's Muon (2.9 to 2.14) keeps its momentum only
            raise RuntimeError(f"this torch's Muon keeps {sorted(extra)} beside its momentum, which "
                               "MuonWithAdamW does not gather across ranks")
        bufs = {i: state[i]["momentum_buffer"] if self.owner[i] == self.rank
                else torch.zeros_like(self.matrices[i]) for i in have}
        if have:
            with torch.no_grad():
                self._from_owners([bufs[i] for i in have], [self.owner[i] for i in have])
        return {i: {"momentum_buffer": bufs[i]} for i in have}

    def load_state_dict(self, state: dict):
        saved, ours = len(state["muon"]["param_groups"]), len(self.muon.param_groups)
        if saved < ours:  # ExpertMuon's second group: the expert stacks, which AdamW once stepped
            raise UserError("--resume: this checkpoint's optimizer state gives the MoE's expert weights to AdamW, as "
                            "--optimizer muon did before Muon took them expert by expert: its Muon and AdamW states "
                            "do not fit this run's; resume it with the version that saved it")
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])
        for p, r in zip(self.matrices, self.owner):
            if r != self.rank:  # another rank steps it, from its own copy of this momentum
                self.muon.state.pop(p, None)


class ExpertMuon(getattr(torch.optim, "Muon", torch.optim.Optimizer)):  # torch < 2.9: build_optimizer refuses
    """torch.optim.Muon that also takes an MoE block's 3-D expert stacks ([E, m, n]) and steps each
    expert's [m, n] matrix as a matrix of its own, as Moonshot's Moonlight/Kimi runs and Megatron's
    Muon do: the stack's expert e moves exactly as torch's Muon moves a separate 2-D parameter with
    gradient grad[e] (its momentum, Nesterov, Newton-Schulz, weight decay, and the lr adjustment from
    the expert's [m, n], not from [E, m, n]). An expert stack is one parameter to the optimizer: one
    momentum tensor [E, m, n] in state_dict, one unit for MuonWithAdamW's owners.

    params: the 2-D matrices (torch's Muon checks them, and refuses an empty list); stacks: the 3-D
    expert stacks, a param group of their own (torch's Muon __init__ refuses any parameter not 2-D)."""

    def __init__(self, params, stacks=(), **kwargs):
        check_muon_hook()
        super().__init__(params, **kwargs)
        stacks = list(stacks)
        if stacks:
            self.add_param_group({"params": stacks})

    def add_param_group(self, param_group: dict):
        params = param_group["params"]
        for p in [params] if isinstance(params, torch.Tensor) else params:
            if p.dim() not in (2, 3):
                raise ValueError(f"ExpertMuon takes 2-D matrices and 3-D expert stacks, not a parameter of size {tuple(p.shape)}")
        super().add_param_group(param_group)

    def _init_group(self, group, params_with_grad, grads, muon_momentum_bufs):
        # torch's own (momentum buffers made the parameter's shape, so [E, m, n] for a stack), then each
        # stack handed on as its E experts' views: torch's step updates them in place, one matrix each,
        # so its math (lr adjusted by param.shape included) is torch's. _init_group is private, but its
        # signature is the one torch's Muon has had since it came (2.9 to 2.14): check_muon_hook()
        # refuses, when the optimizer is built, a torch whose Muon has another
        has_complex = super()._init_group(group, params_with_grad, grads, muon_momentum_bufs)
        lists = (params_with_grad, grads, muon_momentum_bufs)
        split = [[], [], []]
        for p, g, buf in zip(*lists):
            for out, t in zip(split, (p, g, buf)):
                out.extend(t.unbind(0) if p.dim() == 3 else [t])
        for lst, out in zip(lists, split):
            lst[:] = out
        return has_complex


# The private hook ExpertMuon overrides: torch's Muon.step (2.9 to 2.14) calls
# self._init_group(group, params_with_grad, grads, muon_momentum_bufs) and steps each listed tensor
# as one matrix
MUON_HOOK = ("self", "group", "params_with_grad", "grads", "muon_momentum_bufs")


def check_muon_hook():
    """Refuses, by torch's version, a torch.optim.Muon whose step ExpertMuon cannot hook: another
    torch's _init_group with other arguments (the override would fail inside the first step with a
    bare TypeError) or a step that no longer calls it (the expert stacks would reach torch's 2-D
    math whole: 'Param gradient must be a 2D matrix')."""
    hook = getattr(torch.optim.Muon, "_init_group", None)
    args = tuple(inspect.signature(hook).parameters) if callable(hook) else None
    calls = "_init_group" in inspect.unwrap(torch.optim.Muon.step).__code__.co_names
    if args != MUON_HOOK or not calls:
        found = ("no _init_group" if args is None else f"_init_group{args}" if args != MUON_HOOK
                 else "a step that does not call _init_group")
        raise UserError(f"--optimizer muon on an MoE steps its experts through torch.optim.Muon's private "
                        f"_init_group{MUON_HOOK} (torch 2.9 to 2.14); torch {torch.__version__}'s Muon has {found}: "
                        "use a torch it fits, or --optimizer adamw")


def shard_by_size(sizes: list, n: int) -> list:
    """An owner in range(n) for each size, the loads even: the largest first, each to the least
    loaded rank so far (the lowest on a tie), so every rank computes the same assignment."""
    load, owner = [0] * n, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        owner[i] = min(range(n), key=lambda r: load[r])
        load[owner[i]] += sizes[i]
    return owner


def block_matrices(model: nn.Module) -> list:
    """The trainable 2-D parameters of the transformer blocks (attention's q, k, v and output
    projections, the MLP's fc1 and fc2, or a gated MLP's gate, up and down; an MoE block's router):
    what Muon orthogonalizes. Not the per-head q/k norms' [heads, head_dim] weights (qk_norm_width
    "each"): 2-D, but scales, not a matrix; nor GPT-OSS's expert biases ([E, H], [E, C]: a bias per expert). An
    MoE block's 3-D expert stacks are expert_stacks()."""
    from tritongpt.model.layers import MoEFeedForward, PerHeadNorm, TransformerBlock

    found = {}
    for block in model.modules():
        if isinstance(block, TransformerBlock):
            norms = {id(p) for m in block.modules() if isinstance(m, PerHeadNorm) for p in m.parameters()}
            norms |= {id(b) for m in block.modules() if isinstance(m, MoEFeedForward)
                      for b in (m.b_gate, m.b_up, m.b_down) if b is not None}
            found.update({id(p): p for p in block.parameters() if p.requires_grad and p.dim() == 2
                          and id(p) not in norms})
    return list(found.values())


def moe_aux_term(model, mask=None):
    """GPTConfig.moe_aux_loss times the routers' load-balancing loss of model's last forward (a scalar mean), or
    None for a dense model or a coefficient of 0: what GPTModel.forward(targets=) adds to a mean loss, for the
    objectives that compute theirs otherwise (a sum, per-token log-probs). Call it right after the policy's own
    forward: the routers keep the last forward's logits, and another forward through the same model (KTO's z0
    batch) replaces them. model may be DDP's or torch.compile's wrapper, a reward model (its backbone's routers) or
    rlhf's PolicyWithValue (its policy's).

    mask: that forward's [B, T], true at its real tokens, whatever their targets (length_mask, sft_real_mask,
    preference_real_mask): a padded batch's pad tokens are left out of the loss, as transformers'
    load_balancing_loss_func leaves out its attention_mask's 0s (else the routers would train to balance the
    padding too). None: every token counts."""
    m = _routed_model(model)
    coef = getattr(getattr(m, "config", None), "moe_aux_loss", 0.0)
    aux = m.router_aux_loss(mask) if coef else None
    if aux is None:
        return None
    term = coef * aux
    m.logged_moe_aux = term.detach()  # the step's moe_aux column (take_moe_aux)
    return term


def take_moe_aux(model):
    """The load-balancing term (detached) that the last moe_aux_term, or the last forward(targets=)'s mean, added to
    a loss since the last call, then forgotten: None where none was (a dense model, a coefficient of 0, or no
    such forward). The Trainer reads it after each micro-batch's loss for its moe_aux column: what of the logged
    loss is the routers' balance, so that loss - moe_aux is the plain objective."""
    m = _routed_model(model)
    aux = getattr(m, "logged_moe_aux", None)
    if aux is not None:
        m.logged_moe_aux = None
    return aux


def _routed_model(model):
    """The GPTModel whose routers model's forward runs, through DDP's and torch.compile's wrappers, a reward
    model's backbone and rlhf's PolicyWithValue's policy."""
    m = getattr(model, "module", model)
    m = getattr(m, "_orig_mod", m)
    m = getattr(m, "backbone", m)
    return getattr(m, "policy", m)


@contextlib.contextmanager
def without_moe_aux(model):
    """Evaluations score the plain objective: within this, model's GPTConfig.moe_aux_loss is 0, so neither
    GPTModel.forward(targets=)'s mean nor moe_aux_term adds the load-balancing loss. That loss is a training
    regulariser of the routers, not part of the model's fit: a val_loss with it would not be the cross-entropy
    (nor comparable with a dense model's or another coefficient's). The coefficient comes back after, error or not."""
    cfg = getattr(_routed_model(model), "config", None)
    coef = getattr(cfg, "moe_aux_loss", 0.0)
    if not coef:
        yield
        return
    cfg.moe_aux_loss = 0.0
    try:
        yield
    finally:
        cfg.moe_aux_loss = coef


def length_mask(lengths, T: int):
    """[B, T] true at each right-padded row's first lengths[b] tokens: its real ones (rlhf's rollouts, the reward
    model's pairs)."""
    return torch.arange(T, device=lengths.device) < lengths.unsqueeze(1)


def through_last_mask(counted):
    """[B, T] true at and before each row's last true of counted [B, T]: the real tokens of a right-padded row
    whose last real position is always counted (sft's targets: each example's closing eot is one; packed rows'
    last example's too), false at the padding after it. A row with nothing counted is all padding."""
    return counted.flip(1).cummax(1).values.flip(1)


def sft_real_mask(batch, ignore_index: int = -100):
    """[B, T] true at an sft batch's real input tokens, whatever their targets: the first lengths[b] of each row
    where the batch carries its rows' lengths (sft.collate(lengths=True), collate_packed(lengths=True): (inputs,
    targets, doc_ids or None, lengths)). A chat cut in a later user turn ends in real tokens whose targets are
    ignored, and its routing counts as any other. A batch without them ((inputs, targets[, doc_ids]), made by
    hand): through each row's last counted target (through_last_mask), exact where no row ends in ignored
    targets."""
    if len(batch) > 3 and batch[3] is not None:
        return length_mask(batch[3], batch[0].size(1))
    return through_last_mask(batch[1] != ignore_index)


def preference_real_mask(batch, at: int):
    """[B, T] true at a dpo or kto batch's real tokens (idx = batch[0]), prompt and response alike: from the rows'
    lengths where the batch carries them (batch[at], DPOData's and KTOData's), else response_rows_mask of its
    response mask (batch[1]; a batch made by hand), which leaves out a row with no response target at all."""
    if len(batch) > at and batch[at] is not None:
        return length_mask(batch[at], batch[0].size(1))
    return response_rows_mask(batch[1])


def response_rows_mask(mask):
    """idx's [B, T] real tokens from preference.response_mask's [B, T-1] (target t is token t+1): a right-padded
    row's tokens through its response's last (preference_real_mask's fallback for a batch without its lengths)."""
    through = through_last_mask(mask)
    return torch.cat([through[:, :1], through], 1)


def add_moe_aux_arg(p) -> None:
    """--moe-aux-loss of the fine-tuning commands (pretrain has its own, beside --n-experts)."""
    p.add_argument("--moe-aux-loss", type=float, default=None, metavar="COEF",
                   help="a mixture-of-experts --init: add COEF times the routers' load-balancing loss to the "
                        "training loss (GPTConfig.moe_aux_loss, saved with the model; Mixtral trains with 0.02). "
                        "Default: what --init's config has (a pretrain run's --moe-aux-loss; a Hugging Face "
                        "Mixtral, Qwen3-MoE, OLMoE or Qwen2-MoE folder: 0, a GraniteMoE one's router_aux_loss_coef "
                        "where its output_router_logits is true, as transformers adds it)")


def set_moe_aux_loss(model, args) -> None:
    """--moe-aux-loss onto model's config (a reward model's: its backbone's), refused by name for a dense model:
    there is no router to balance, and the flag would be ignored silently."""
    coef = getattr(args, "moe_aux_loss", None)
    if coef is None:
        return
    from dataclasses import replace

    m = getattr(model, "backbone", model)
    if not m.config.n_experts:
        raise UserError(f"--moe-aux-loss {coef:g} weighs a mixture of experts' load-balancing loss, and --init's "
                        "model is dense (n_experts 0): leave the flag out")
    m.config.moe_aux_loss = replace(m.config, moe_aux_loss=coef).moe_aux_loss  # checked as GPTConfig checks it


def expert_stacks(model: nn.Module) -> list:
    """The trainable [E, m, n] expert stacks of MoE blocks (w_gate, w_up, w_down): E matrices each,
    which Muon steps expert by expert (ExpertMuon)."""
    from tritongpt.model.layers import MoEFeedForward

    found = {}
    for moe in model.modules():
        if isinstance(moe, MoEFeedForward):
            # (MXFP4MoEFeedForward's are None: its experts are frozen buffers)
            found.update({id(p): p for p in (moe.w_gate, moe.w_up, moe.w_down) if p is not None and p.requires_grad})
    return list(found.values())


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1,
                    betas=(0.9, 0.95), device: torch.device | None = None, kind: str = "adamw",
                    ranks: tuple = (0, 1)):
    """AdamW with decay/no-decay groups (the fused implementation on CUDA); kind "muon": Muon
    (torch.optim.Muon, Nesterov momentum 0.95, 5 Newton-Schulz steps, its lr scaled to AdamW's
    update RMS so that --lr and --weight-decay carry over) for block_matrices() and, expert by expert,
    an MoE's expert_stacks() (ExpertMuon), AdamW for the rest.
    ranks: (rank, world_size) of a DDP run, whose ranks then share Muon's work (MuonWithAdamW)."""
    device = device or next(model.parameters()).device
    fused = device.type == "cuda"
    if kind == "adamw":
        return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, fused=fused)
    if kind != "muon":
        raise UserError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {kind!r}")
    from tritongpt.model.lora import LoRAUpdate

    if not hasattr(torch.optim, "Muon"):
        raise UserError(f"--optimizer muon needs torch.optim.Muon (torch 2.9 or later), this is torch {torch.__version__}")
    if any(isinstance(m, LoRAUpdate) for m in model.modules()):
        raise UserError("--optimizer muon is for whole weight matrices, not LoRA's low-rank factors: "
                        "leave out --lora-rank, or use --optimizer adamw")
    matrices, stacks = block_matrices(model), expert_stacks(model)
    if not matrices:
        raise UserError("--optimizer muon: the model has no trainable weight matrices in transformer blocks")
    taken = {id(p) for p in matrices + stacks}
    rest = [{**g, "params": [p for p in g["params"] if id(p) not in taken]} for g in param_groups(model, weight_decay)]
    kw = dict(lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
    # a dense model's Muon is torch's own: it needs none of ExpertMuon's private hook (check_muon_hook)
    muon = ExpertMuon(matrices, stacks, **kw) if stacks else torch.optim.Muon(matrices, **kw)
    adamw = torch.optim.AdamW([g for g in rest if g["params"]], lr=lr, betas=betas, fused=fused)
    return MuonWithAdamW(muon, adamw, *ranks)


LR_SCHEDULES = ("cosine", "wsd", "linear", "constant")


def lr_at(step: int, max_lr: float, warmup: int, total: int, min_lr: float, schedule: str = "cosine",
          decay_fraction: float = 0.2) -> float:
    """Linear warmup for `warmup` steps, then to min_lr at `total` (flat after) by the schedule:

    cosine    half a cosine from max_lr down (GPT-3's, to 10% of the peak; nanoGPT's, llm.c's)
    linear    a straight line down
    constant  max_lr to the end (min_lr unused)
    wsd       warmup-stable-decay: max_lr until the last decay_fraction of the run, then down as
              1 - sqrt(progress) (WSD is MiniCPM's schedule, whose decay is exponential; the 1 - sqrt
              shape is Hagele et al. 2024's, who find a 20% cooldown of it matches cosine). The stable
              phase's rate does not depend on `total`, so a run checkpointed before its decay can be
              continued to more steps as if planned so.
    """
    if warmup > 0 and step < warmup:
        return max_lr * (step + 1) / warmup
    if schedule == "constant":
        return max_lr
    if step >= total:
        return min_lr
    start = warmup
    if schedule == "wsd":
        start = max(warmup, total - round(decay_fraction * total))
        if step < start:
            return max_lr
    progress = (step - start) / max(1, total - start)
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        shape = 1.0 - progress
    elif schedule == "wsd":
        shape = 1.0 - math.sqrt(progress)
    else:
        raise UserError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")
    return min_lr + shape * (max_lr - min_lr)


def set_lr(optimizer, lr: float):
    for group in optimizer.param_groups:
        group["lr"] = lr


# -- checkpoints --------------------------------------------------------------------------------
class Checkpointer:
    """Checkpoints as folders ckpt-0000123/ holding model.safetensors and state.pt.

    A checkpoint is written into a temporary folder and renamed into place, so a crash
    mid-write never leaves a half checkpoint under a real name; only the newest `keep` stay.
    """

    def __init__(self, out_dir, keep: int = 3):
        self.dir = Path(out_dir)
        self.keep = keep

    def save(self, step: int, model, state: dict) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"ckpt-{step:07d}"
        tmp = self.dir / f".tmp-ckpt-{step:07d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        model.save(tmp / "model.safetensors", extra_metadata={"step": step})
        torch.save(state, tmp / "state.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in self.list()[:-self.keep] if self.keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def list(self):
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.glob("ckpt-*") if (p / "state.pt").is_file())

    def latest(self):
        found = self.list()
        return found[-1] if found else None


def weights_fingerprint(model) -> tuple:
    """(sum, sum of squares) of every weight in float64, without float64 copies: tells another
    model's weights apart (a frozen model rebuilt on a resume: RLHF's reference and reward model,
    DPO's reference)."""
    from tritongpt.model.quant import QuantLinear

    # a quantized model's matrices are its QuantLinears' buffers (model/quant.py), read as floats (exact: int8 and
    # the packed uint8 bytes; the fp32 scales and offsets as they are); a float model's tensors are its parameters
    quantized = [b for m in model.modules() if isinstance(m, QuantLinear) for b in m.buffers(recurse=False)]
    total = squares = 0.0
    with torch.no_grad():
        for t in [*model.parameters(), *quantized]:
            t = t if t.is_floating_point() else t.float()  # one at a time: never the whole model's copy
            total = total + t.sum(dtype=torch.float64)
            squares = squares + torch.linalg.vector_norm(t, dtype=torch.float64) ** 2
    return float(total), float(squares)


def same_fingerprint(a, b) -> bool:
    # float64 sums of the same weights on another device may differ in their last bits
    return all(math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9) for x, y in zip(a, b))


def model_out_folder(command: str, out, sources, overwrite: bool, what: str, source_words: str) -> Path:
    """out/model.safetensors for a command that writes a model folder of its own (merge, quantize), once out is
    checked: a folder, not a training run's or checkpoint's (its tokenizer.json replaced, its checkpoints shadowed
    as `--weights run/`, its weights replaced: export refuses those too), no model.safetensors there unless
    overwrite, and none of the models read (sources). what: the model written ("the merge"); source_words: what
    out then is ("one of the models merged")."""
    out = Path(out)
    target = out / "model.safetensors"
    if out.exists() and not out.is_dir():
        raise UserError(f"{command} --out {out} is a file: name a folder")
    run_files = [n for n in ("state.pt", "metrics.jsonl") if (out / n).is_file()] + \
        [p.name for p in out.glob("ckpt-*")][:1] if out.is_dir() else []
    if run_files:
        raise UserError(f"{command} --out {out} is a tritongpt run or checkpoint folder ({', '.join(run_files)}): "
                        f"write {what} to a folder of its own")
    if target.exists() and not overwrite:
        raise UserError(f"{command} --out {out} already holds a model.safetensors: --overwrite to replace it, or "
                        "another --out")
    for p in sources:
        if Path(p).exists() and Path(p).resolve() in (out.resolve(), target.resolve()):
            raise UserError(f"{command} --out {out} is {source_words}: write {what} to a folder of its own")
    return target


class NoCheckpoint(UserError):
    """resolve_checkpoint's: no weights and no checkpoint at the path (which may not exist)."""


def resolve_checkpoint(path) -> Path:
    """A checkpoint folder, a run folder (its newest checkpoint), or a weights file; a peft adapter
    folder: its weights file; a Hugging Face folder: its model.safetensors, else its shard index (shards
    are read together: gpt2_weights.shard_files), else its pytorch_model.bin or that one's index."""
    from tritongpt.train.gpt2_weights import ADAPTER_FILES, WEIGHT_FILES

    p = Path(path)
    if p.is_file():
        return p
    if (p / "model.safetensors").is_file():
        return p / "model.safetensors"
    if (p / "adapter_config.json").is_file():
        for name in ADAPTER_FILES:
            if (p / name).is_file():
                return p / name
    for name in WEIGHT_FILES[1:]:
        if (p / name).is_file():
            return p / name
    latest = Checkpointer(p).latest()
    if latest is None:
        raise NoCheckpoint(f"no checkpoint found at {path}")
    return latest / "model.safetensors"


OVERWRITE_HELP = ("start a new run in an --out-dir that holds one (its checkpoints and metrics are "
                  "deleted when training starts)")
ACTIVATION_CHECKPOINTING_HELP = ("keep only each transformer block's input for backward and recompute the "
                                 "rest there (GPTModel.set_activation_checkpointing): far less activation "
                                 "memory for ~1/3 more compute, the same gradients")


TRACKING_FIELDS = ("report_to", "run_name", "wandb_project")  # TrainArgs' and RLArgs' fields of these flags
WANDB_PROJECT = "tritongpt"  # --wandb-project's default


def add_tracking_args(parser) -> None:
    """--report-to, --run-name and --wandb-project (TRACKING_FIELDS): every trainer's, in an argument
    group of their own."""
    g = parser.add_argument_group("experiment tracking")
    g.add_argument("--report-to", default="none", metavar="TRACKERS",
                   help="also send every metrics.jsonl row (its numbers, keyed by step) to: none, wandb, "
                        "tensorboard, or a comma list (wandb,tensorboard); only the main process reports "
                        "(default %(default)s)")
    g.add_argument("--run-name", default=None, help="the run's name in the trackers (default: the --out-dir "
                                                    "folder's name)")
    g.add_argument("--wandb-project", default=WANDB_PROJECT, help="the wandb project (default %(default)s)")


_LATEST = (True, "latest", "auto")  # what a bare --resume means: the newest checkpoint in --out-dir


def resume_checkpoint(out_dir, resume) -> Path:
    """The checkpoint folder --resume names: the newest in out_dir, or a checkpoint/run folder or file."""
    if resume not in _LATEST and not Path(resume).exists():  # a typo'd path: not "nothing to resume"
        raise UserError(f"--resume {resume}: no such file or folder")
    try:
        return resolve_checkpoint(out_dir if resume in _LATEST else resume).parent
    except NoCheckpoint as e:
        if resume in _LATEST:  # a first run given a bare --resume: say how to start one
            raise UserError(f"--resume: {e}, nothing to resume (leave --resume out to start a run)") from None
        # a folder the user named that holds none: another folder was likely meant
        raise UserError(f"--resume {resume}: {e} (name a run folder holding ckpt-* folders, or a checkpoint "
                        "folder or file)") from None


def check_resume_of(ckpt: Path, state: dict, name: str) -> None:
    """--resume's checkpoint (its loaded state) is one of a `name` run's, e.g. not sft --resume on a pretrain run."""
    if state.get("name", name) != name:
        raise UserError(f"--resume: {ckpt} is a checkpoint of a {state['name']} run, not of {name} "
                        "(to start from its weights, use --init)")


def _resumes_in(out: Path, resume) -> bool:
    """--resume continues the run in `out` (its newest checkpoint, or a checkpoint inside it)."""
    if resume in _LATEST:
        return True
    where, here = Path(resume).expanduser().resolve(), out.expanduser().resolve()
    return where == here or here in where.parents


def check_out_dir(out_dir, resume, overwrite: bool) -> bool:
    """May this run write into out_dir? A new run must not land on another: its checkpoints
    would outrank the new ones (only the newest few are kept, by step) and its metrics would
    mix with them. Refused unless --overwrite; a resume of the run in out_dir is always fine.
    Returns whether the old run is to be cleared (clear_run) when training starts."""
    out = Path(out_dir)
    if resume and _resumes_in(out, resume):
        if overwrite:
            raise UserError(f"--overwrite would delete the run in {out} that --resume continues: pass one of them")
        return False
    ckpts = Checkpointer(out).list()
    found = [f"{len(ckpts)} checkpoint{'s' * (len(ckpts) > 1)} up to {ckpts[-1].name}"] if ckpts else []
    metrics = out / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        found.append(metrics.name)
    if found and not overwrite:
        what = f"already holds a run ({', '.join(found)})" if ckpts else \
            "holds the metrics of a run that wrote no checkpoint"
        keep = "pass --resume to continue it, " if ckpts and not resume else ""
        raise UserError(f"--out-dir {out} {what}: {keep}--overwrite to replace it, or another --out-dir")
    return bool(found)


def clear_run(out_dir) -> None:
    """What check_out_dir looks for: the checkpoints (and half-written ones) and metrics.jsonl; and
    what ties the folder to the old run's trackers: its TensorBoard events (the new run's would be
    drawn as one curve with them) and its wandb run id (the new run is a new wandb run). wandb's own
    folder stays: an offline run's files there are its only copy until `wandb sync`."""
    out = Path(out_dir)
    if not out.is_dir():
        return
    for p in list(out.glob("ckpt-*")) + list(out.glob(".tmp-ckpt-*")) + [out / TENSORBOARD_DIR]:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    (out / WANDB_RUN_FILE).unlink(missing_ok=True)


def data_path(data):
    """--data as a resume compares it: absolute (the same file named from another folder is the
    same data), None for the embedded data."""
    if not data:
        return None
    p = Path(data).expanduser()
    return str(p.resolve()) if p.exists() else str(data)


def same_rates_so_far(saved: dict, now: dict, steps: int) -> bool:
    """Whether each step run so far (0 .. steps - 1) has the same learning rate under the resumed
    run's schedule flags as under the run's own (False when the checkpoint's args lack one): e.g. a
    wsd run given more --max-steps before its decay began (the stable phase does not depend on
    them). The rates only: whether any other flag changed is the caller's to check."""
    keys = ("lr", "warmup_steps", "max_steps", "min_lr", "lr_schedule", "decay_fraction")
    if not all(k in saved and k in now for k in keys):
        return False
    return all(lr_at(s, *(saved[k] for k in keys)) == lr_at(s, *(now[k] for k in keys)) for s in range(steps))


def check_resume(ckpt, state: dict, now_args: dict, names, step_key: str, limit_flag: str, precision: str,
                 say: bool, kernels: str | None = None, defaults: dict | None = None) -> None:
    """The checks every trainer's --resume makes: the checkpoint is not past the run's end
    (state[step_key] vs now_args[limit]); a note naming the flags among `names` that differ from
    the checkpoint's run, and a different precision (bf16/fp32 as resolved, not as spelled), or,
    where --max-steps alone changed and left the wsd rates of the steps run so far as they were,
    that the run is extended; a note when the kernels (as resolved: `auto` is one or the other)
    are not the run's; a note naming the flags among `names` set now that the checkpoint's record
    lacks (unrecorded_flags: a flag newer than the checkpoint)."""
    limit = now_args[limit_flag.removeprefix("--").replace("-", "_")]
    if state[step_key] > limit:
        raise UserError(f"--resume: {ckpt} is at {step_key} {state[step_key]}, past {limit_flag} {limit}: "
                        f"raise {limit_flag} to train further")
    saved = state.get("args", {})
    changed = [k for k in names if k in saved and k in now_args and saved[k] != now_args[k]]
    parts = [(f"--{k.replace('_', '-')} {now_args[k]}", saved[k]) for k in changed]
    if state.get("precision", precision) != precision:  # checkpoints from before it was saved: unknown
        parts.append((f"precision {precision.removeprefix('torch.')}", state["precision"].removeprefix("torch.")))
    # wsd's stable phase is made to be extended; other schedules (a cosine run still in its warmup,
    # a constant one) keep the note that names --max-steps as a change (len(parts): nor a precision change)
    if say and changed == ["max_steps"] and len(parts) == 1 and now_args.get("lr_schedule") == "wsd" \
            and same_rates_so_far(saved, now_args, state[step_key]):
        note(f"resuming with --max-steps {now_args['max_steps']} (the run had {saved['max_steps']}): up to step "
             f"{state[step_key]} the wsd schedule gives the same learning rates over {now_args['max_steps']} "
             f"steps, so the run goes on as if planned with {now_args['max_steps']} steps")
    elif parts and say:
        text = ", ".join(f"{now} ({'the run had ' if i == 0 else ''}{was})" for i, (now, was) in enumerate(parts))
        note(f"resuming with {text}: the run goes on differently from the one it was started as")
    unrecorded = unrecorded_flags(saved, now_args, names, defaults or {})
    if say and unrecorded:
        note(f"resuming with {', '.join(unrecorded)}, which {ckpt}'s run did not record (a flag newer than the "
             "checkpoint, or a run started without it): if that run went otherwise, this one goes on differently")
    if say and kernels is not None and state.get("kernels", kernels) != kernels:
        # Same weights and math on either path, but not the same rounding: a rerun of the run
        # would not give its numbers bit for bit.
        note(f"resuming on the kernels {kernels} (the run had {state['kernels']}): the same model, "
             "its numbers agree with the run's path to rounding, not bit for bit")


def unrecorded_flags(saved: dict, now_args: dict, names, defaults: dict) -> list:
    """The flags among `names` (as "--flag value") that a resume sets but the checkpoint's run args lack. A
    checkpoint written before a flag existed has no entry for it, and that run went as the flag's default does:
    so a value equal to its default (`defaults`, a dataclass's), or, for a flag without one, an "off" value
    (None, False, 0, empty), changes nothing and is not named. A checkpoint that recorded no args at all (one
    made by hand) names nothing."""
    if not saved:
        return []
    out = []
    for k in names:
        if k in saved or k not in now_args:
            continue
        v = now_args[k]
        if (v == defaults[k]) if k in defaults else (v is None or v is False or v == 0 or v in ("", [], ())):
            continue
        out.append(f"--{k.replace('_', '-')} {v}")
    return out


def check_same_base(model, ckpt: Path, group_flag: str = "--group-size", saved_args: dict | None = None) -> None:
    """A QLoRA run's base is quantized (--quantize, --group-size), and its weights file says how: resumed with
    another (or none), the file's tensors would not fit the model, and torch's error names no flag. The Trainer's
    resume and rlhf's ask before loading the weights (and rlhf's before comparing its reference's fingerprint,
    which a base quantized otherwise changes too). group_flag: the command's int4 group flag (add_qlora_args').
    A run on a GPTQ or AWQ folder's own quantization (sft's --init, model.base_folder: commands.folder_base) has its
    base re-loaded from the folder: it must be the checkpoint's bit for bit, or loading the checkpoint would
    silently put the run's base back over another folder's. saved_args: the checkpoint's run args (its --init)."""
    from safetensors import safe_open

    from tritongpt.model.gpt import safetensors_metadata
    from tritongpt.model.quant import QuantLinear

    saved_args = saved_args or {}
    meta = safetensors_metadata(ckpt / "model.safetensors")
    group = meta.get("quantized_group_size")
    was = meta.get("quantized"), int(group) if group and group.isdigit() else group
    now = getattr(model, "quantized", None), getattr(model, "quantized_group_size", None)
    folder, own = getattr(model, "base_folder", None), saved_args.get("init_quantized")
    if was == now and folder is None and own is None:
        return

    def describe(mode, group):
        return "float" if mode is None else f"int4 (group {group})" if mode == "int4" else mode

    if own is not None and folder is None:  # (a float --init, or --quantize: the run's base was its folder's)
        raise UserError(f"--resume: {ckpt}'s base is its --init folder's own {own.upper()} quantization (this run: "
                        f"{describe(*now)}): resume with the run's own --init {saved_args.get('init')}, without "
                        "--quantize")
    if was != now:
        fix = ("resume without --quantize" if was[0] is None else f"pass --quantize {was[0]}"
               + (f" {group_flag} {was[1]}" if was[0] == "int4" else ""))
        if folder is not None:  # (this model's quantization is the folder's, not a flag's)
            fix = f"resume with the run's own --init {saved_args.get('init') or 'model'}"
        raise UserError(f"--resume: {ckpt} does not fit this model: its base is {describe(*was)} (this run: "
                        f"{describe(*now)}); {fix}, as its run trained")
    if folder is None:
        return
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for prefix, m in model.named_modules():
            if not isinstance(m, QuantLinear):
                continue
            for name, buf in m.named_buffers(recurse=False):
                key = f"{prefix}.{name}"
                if key not in keys or not torch.equal(f.get_tensor(key), buf.to("cpu")):
                    raise UserError(f"--resume: --init {folder} is not the base {ckpt} trained on ({key} differs "
                                    "from the checkpoint's): resume with the run's own --init "
                                    f"{saved_args.get('init') or 'folder'}")


# the flags that choose a model of another size from scratch (pretrain's; a run from --init names that instead)
MODEL_FLAGS = "--model (and --vocab-multiple)"


def load_checkpoint_weights(module, ckpt: Path, device, config, what: str, model_flags: str = MODEL_FLAGS):
    """ckpt's model.safetensors into module. Weights of another shape are a UserError naming how
    the checkpoint's model config differs from `config` (None: not known), else torch's reason.
    model_flags: the flags that chose the run's model, for the error to name (config_difference's)."""
    from safetensors.torch import load_model

    weights = ckpt / "model.safetensors"
    try:
        load_model(module, str(weights), device=str(device))
    except RuntimeError as e:
        why = (config_difference(weights, config, model_flags) if config is not None else "") \
            or str(e).splitlines()[0]
        raise UserError(f"checkpoint {ckpt} does not fit this {what}: {why}") from None


def config_difference(weights_file, config, model_flags: str = MODEL_FLAGS) -> str:
    """How the model config saved with a checkpoint differs from `config` ("" if unknown), for
    the error a checkpoint of another model size gets. model_flags: what chose the run's model
    (sft has no --model, reward no --vocab-multiple: a run from --init is told to pass that)."""
    saved = saved_model_config(weights_file)
    if not saved:  # no config, or not readable: the caller says what torch said
        return ""
    now = config.to_dict()
    keys = [k for k in saved if k in now and saved[k] != now[k] and k not in ("kernels", "dropout")]
    diffs = [f"{k} {saved[k]} (this run: {now[k]})" for k in keys]
    flags = []
    if any(not k.startswith("lora_") and k != "n_kv_head" for k in keys):
        flags.append(model_flags)
    if "n_kv_head" in keys:  # pretrain --n-kv-head: the key and value projections' shapes
        flags.append("--n-kv-head")
    if any(k.startswith("lora_") for k in keys):  # a LoRA run's checkpoint holds A and B too
        flags.append("--lora-rank, --lora-alpha and --lora-targets")
    return ("the checkpoint's model has " + ", ".join(diffs) +
            f"; pass the {' and the '.join(flags)} it was trained with") if diffs else ""


def saved_model_config(weights_file) -> dict:
    """The model config saved with a checkpoint's weights, or {} when it has none or is unreadable."""
    from tritongpt.model.gpt import safetensors_metadata

    try:
        saved = json.loads(safetensors_metadata(weights_file)["config"])
    except (UserError, KeyError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def load_state(ckpt_dir, mmap: bool = False) -> dict:
    """A checkpoint's state.pt. mmap: map the file instead of reading it, for a few fields of it
    (info, chat, eval): a GPT-2 small run's 1 GB of AdamW moments are then never read."""
    path = Path(ckpt_dir) / "state.pt"
    if not path.is_file():
        raise UserError(f"checkpoint state not found: {path}")
    state = None
    if mmap:
        try:
            state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError:  # not a zip file torch can map: read whole, which names what it is
            pass
    try:
        if state is None:
            state = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:  # truncated, or not a torch.save file
        first = str(e).splitlines()[0].split(". ")[0] if str(e) else type(e).__name__
        raise UserError(f"{path} is not a readable checkpoint state ({type(e).__name__}: {first})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a checkpoint state (it holds a {type(state).__name__}, not a dict)")
    return state


# -- metrics --------------------------------------------------------------------------------------
def json_report(result) -> str:
    """result as strict JSON for a command's --json: a float that is inf or NaN (a perplexity past float's range)
    written as null, as JavaScript's JSON.stringify does, not Python's bare Infinity, which jq and most other
    parsers refuse."""
    def strict(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: strict(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [strict(x) for x in v]
        return v
    return json.dumps(strict(result), indent=1, allow_nan=False)


class MetricsLog:
    """Appends one JSON object per line; `rows()` reads them back. `trackers` (a Trackers, or None)
    get every row too; a disabled log (DDP ranks other than 0) writes and reports nothing."""

    def __init__(self, path, enabled: bool = True, trackers=None):
        self.path = Path(path)
        self.enabled = enabled
        self.trackers = trackers if enabled else None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, **row):
        if not self.enabled:
            return
        row.setdefault("time", time.time())
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.trackers:
            self.trackers.log(row)

    def rows(self):
        """The rows logged, in order. A last line cut short (no newline: a run killed while writing it) is dropped,
        with a note; any other line that is no JSON object is a UserError naming it (a resume read it deep in
        json's own error)."""
        if not self.path.is_file():
            return []
        text = self.path.read_bytes().decode("utf-8", errors="replace")  # (json.dumps writes ASCII)
        lines = text.splitlines()
        rows = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                if i == len(lines) and not text.endswith("\n"):
                    note(f"{self.path}: its last line is cut short (a run stopped while writing it): dropped")
                    break
                raise UserError(f"{self.path}:{i}: not a JSON row ({e.msg}): the metrics log is damaged; "
                                "mend or remove that line") from None
            if not isinstance(row, dict):
                raise UserError(f"{self.path}:{i}: expected a JSON object (one row a line), got "
                                f"{type(row).__name__}")
            rows.append(row)
        return rows

    def truncate(self, step: int) -> list:
        """On resume: drop the rows a crashed run logged after `step`; returns the rows kept."""
        rows = [r for r in self.rows() if r.get("step", 0) <= step]
        if self.enabled and self.path.is_file():
            self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        if self.trackers:
            self.trackers.resume_at(step)
        return rows

    def start_trackers(self):
        """Start the trackers now rather than at the first row: one that cannot start (wandb without
        a login) fails before the first training step."""
        if self.trackers:
            self.trackers.start()

    def close(self, failed: bool = False):
        """Finish the trackers' runs (wandb: marked failed if `failed`); the log itself stays usable."""
        if self.trackers:
            self.trackers.close(failed)

    @contextlib.contextmanager
    def finishing(self, finish: bool = True):
        """Closes the trackers when the block ends: always when it raises (as failed), else if `finish`."""
        try:
            yield self
        except BaseException:
            self.close(failed=True)
            raise
        if finish:
            self.close()


# -- experiment trackers (--report-to) ------------------------------------------------------------
TRACKERS = ("wandb", "tensorboard")
TENSORBOARD_DIR = "tb"                # the run folder's TensorBoard log dir
WANDB_RUN_FILE = "wandb-run.json"     # the run folder's wandb run id and the last step wandb was sent


def parse_report_to(text) -> tuple:
    """--report-to as tracker names: "none" is none, "wandb,tensorboard" both (as Hugging Face's report_to)."""
    names = [n.strip() for n in str(text or "none").split(",") if n.strip()]
    if not names or any(n not in ("none", *TRACKERS) for n in names) or ("none" in names and len(names) > 1):
        raise UserError(f"--report-to takes none, wandb, tensorboard or a comma list of wandb and tensorboard, "
                        f"got {text!r}")
    return tuple(dict.fromkeys(n for n in names if n != "none"))


def _import_tracker(name: str):
    """The tracker's module (wandb, or torch's SummaryWriter); optional packages: a UserError naming
    the pip command when one is missing."""
    try:
        if name == "wandb":
            import wandb

            return wandb
        from torch.utils.tensorboard import SummaryWriter  # an ImportError without the tensorboard package

        return SummaryWriter
    except ImportError:
        raise UserError(f"--report-to {name} needs the {name} package, which is not installed: "
                        f"pip install {name}") from None


def check_report_to(text) -> tuple:
    """--report-to checked before any work: the names, and their packages where they will be used
    (rank 0; the other ranks report nothing and need none)."""
    names = parse_report_to(text)
    if dist_env()[0] == 0:
        for name in names:
            _import_tracker(name)
    return names


def check_tracking(args) -> tuple:
    """check_report_to of args.report_to, and --run-name and --wandb-project (wandb's alone: TensorBoard's logs are in
    --out-dir) refused by name without --report-to wandb, where nothing would read them."""
    names = check_report_to(args.report_to)
    given = [f for f, v in (("--run-name", args.run_name is not None),
                            ("--wandb-project", args.wandb_project != WANDB_PROJECT)) if v]
    if given and "wandb" not in names:
        raise UserError(f"{given[0]} is wandb's (the run's name and project there): pass --report-to wandb too, or "
                        "leave it out")
    return names


def trackers_for(args, config: dict):
    """The Trackers args.report_to names (None for none), for a run in args.out_dir. `config`: the
    run's arguments, as wandb shows them."""
    names = parse_report_to(args.report_to)
    if not names:
        return None
    return Trackers(names, args.out_dir, args.run_name, args.wandb_project, config)


def tracked_values(row: dict) -> dict:
    """What a metrics row sends to the trackers: its numbers (bools as 0/1), not the step, which
    keys them, nor the wall time, which they record themselves. Strings and None stay in the jsonl."""
    return {k: float(v) for k, v in row.items()
            if k not in ("step", "time") and isinstance(v, (int, float))}


class Trackers:
    """The trackers --report-to names, fed every metrics row that has a step (on the main process).

    They start at the first row (or start()), after a resume's truncate (resume_at), which each
    needs to know: TensorBoard hides the events a crashed run wrote after the checkpoint, wandb
    continues the run folder's wandb run. Once closed they take no more rows (the jsonl still does)."""

    def __init__(self, names, out_dir, run_name=None, project: str = "tritongpt", config: dict | None = None):
        self.names, self.out_dir = tuple(names), Path(out_dir)
        self.run_name = run_name or self.out_dir.resolve().name
        self.project, self.config = project, dict(config or {})
        self.resumed_step = None  # the checkpoint's step when the run resumed
        self.open = None  # the started trackers; [] once closed

    def resume_at(self, step: int):
        self.resumed_step = step

    def start(self):
        if self.open is not None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.open = []
        for name in self.names:
            if name == "wandb":
                resuming = self.resumed_step is not None
                self.open.append(WandbRun(self.out_dir, self.run_name, self.project, self.config, resuming))
            else:
                self.open.append(TensorBoardRun(self.out_dir, self.resumed_step))

    def log(self, row: dict):
        values = tracked_values(row)
        if "step" not in row or not values:
            return
        self.start()
        for tracker in self.open:
            tracker.log(int(row["step"]), values)

    def close(self, failed: bool = False):
        for tracker in self.open or []:
            try:
                tracker.close(failed)
            except Exception:
                if not failed:
                    raise
                # closing after a training error: the error is what the user must see, not this
        self.open = []


class WandbRun:
    """A wandb run for the run folder. Its id is kept in WANDB_RUN_FILE, with the last step sent to it,
    so a --resume (`resuming`) continues the same wandb run; a new run in the folder starts a new one.

    wandb ignores (with a warning) a step below the last one it got; online also a step it already
    has from an earlier process, while an offline run keeps both. A resumed run logs the steps after
    its checkpoint again (MetricsLog.truncate dropped the crashed run's rows from metrics.jsonl):
    those rows are skipped here, and wandb keeps the values the crashed run sent for them (the same
    ones, for a resume that replays bit for bit; metrics.jsonl has the resumed run's). Rows at the
    last step sent in this process are sent: wandb merges them into that step (an evaluation
    logged beside a step's row)."""

    def __init__(self, out_dir: Path, name: str, project: str, config: dict, resuming: bool):
        wandb = _import_tracker("wandb")
        self.file = out_dir / WANDB_RUN_FILE
        saved = json.loads(self.file.read_text()) if resuming and self.file.is_file() else {}
        self.last_step = saved.get("last_step")  # None: nothing sent yet
        self.first_step = 0 if self.last_step is None else self.last_step + 1  # what this process may send
        try:
            self.run = wandb.init(project=project, name=name, dir=str(out_dir), config=config,
                                  id=saved.get("id"), resume="allow")
        except wandb.errors.Error as e:  # e.g. no API key: `wandb login`, or log offline
            raise UserError(f"--report-to wandb: wandb could not start a run ({first_line(e)}); run `wandb login`, "
                            f"or set WANDB_MODE=offline to keep the run on disk for `wandb sync`") from None
        self._save()

    def _save(self):
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"id": self.run.id, "last_step": self.last_step}))
        os.replace(tmp, self.file)

    def log(self, step: int, values: dict):
        if step < self.first_step:
            return
        self.run.log(values, step=step)
        self.first_step = step  # later rows at this step merge into it; earlier ones would be ignored
        if step != self.last_step:
            self.last_step = step
            self._save()  # every step: a crash leaves the last step sent for the resume to skip to

    def close(self, failed: bool):
        self.run.finish(exit_code=1 if failed else 0)


class TensorBoardRun:
    """torch's SummaryWriter into the run folder's tb/. A resumed run opens it with purge_step, so
    TensorBoard hides the events a crashed run wrote after the checkpoint (the resumed run writes
    those steps again)."""

    def __init__(self, out_dir: Path, resumed_step: int | None):
        SummaryWriter = _import_tracker("tensorboard")
        purge = resumed_step + 1 if resumed_step is not None else None
        self.writer = SummaryWriter(log_dir=str(out_dir / TENSORBOARD_DIR), purge_step=purge)

    def log(self, step: int, values: dict):
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self, failed: bool):
        self.writer.flush()
        self.writer.close()


def plot_curves(rows, png_path, keys=("loss", "val_loss"), title="training"):
    """One PNG with a line per key (x = step), skipping rows that lack the key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=key, marker="o" if len(pts) < 30 else None)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.lines:  # none of the keys logged (kto on one class, no held-out set): no legend, not matplotlib's warning
        ax.legend()
    fig.tight_layout()
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def replot(shown, rows, png_path, keys, title):
    """plot_curves(rows, ...) unless `shown`, what this returned for png_path's last plot, says it shows these rows
    already and the file is still there (a metrics log only appends: its length and last row say which rows; the
    end of a run follows its last checkpoint's plot of the same rows, ~0.2 s of matplotlib). -> the next `shown`."""
    now = (len(rows), rows[-1] if rows else None)
    if now != shown or not Path(png_path).is_file():
        plot_curves(rows, png_path, keys=keys, title=title)
    return now


def note_slow_kernels(models, device):
    """Say so when Triton kernels will be slow: on the CPU they run through the interpreter, and
    below compute capability 8.0 the MLP's and attention's tl.dot has no tensor cores."""
    from tritongpt.model.toggle import DOT_KERNELS, ampere_or_later, resolve_kernels

    device = torch.device(device)
    if device.type == "cpu" and any(m.config.kernels != "reference" for m in models):
        note("Triton kernels on the CPU run through Triton's interpreter, which checks "
             "parity but is orders of magnitude slower; --kernels reference is the fast CPU path")
    used = {n for m in models for n in resolve_kernels(m.config.kernels, device, check_device=False)}
    slow = [n for n in DOT_KERNELS if n in used]
    if device.type == "cuda" and slow and not ampere_or_later(device):
        cc = ".".join(map(str, torch.cuda.get_device_capability(device)))
        note(f"Triton compiles tl.dot to scalar FMAs below compute capability 8.0 (this GPU: {cc}): "
             f"the Triton {' and '.join(slow)} will be slower than the reference path's cuBLAS and SDPA "
             "(--kernels auto leaves them out here)")


