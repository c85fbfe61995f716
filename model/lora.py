"""LoRA (Hu et al., 2021): fine-tune a frozen weight W through a low-rank update, W + (alpha / r) B A.

A [r, in] starts random and B [out, r] at zero, so a model with LoRA starts exactly where the
frozen one is. Only A and B train: AdamW keeps its two moments for r (in + out) numbers of a
matrix instead of in x out (GPT-2 small at r = 8 on every attention and MLP matrix: 1.33M
trained parameters of 125.8M, so 10.6 MB of optimizer state instead of 995 MB).

The update is a parametrization of each chosen Linear's weight (torch.nn.utils.parametrize):
reading `linear.weight` gives W + scale B A. Both paths run on that merged weight unchanged:
nn.Linear's matmul, and the Triton kernels, which take the weights as tensors (model/layers.py
hands fc1.weight and fc2.weight to kernels/mlp.py's gelu_mlp, a SwiGLU MLP's w_gate, w_up and
w_down to kernels/swiglu.py's swiglu_mlp). Autograd carries the weight
gradient dW the matmul (or the kernel's backward) makes on to dB = scale dW A^T and
dA = scale B^T dW. So LoRA has no kernel
of its own: merging costs an [out, r] x [r, in] matmul per matrix per forward, r / tokens of
the [tokens, in] x [in, out] matmul it feeds. What LoRA saves is optimizer state and work on the
frozen parameters (their AdamW pass, the embedding's and tied head's gradient); each adapted
matrix's dW is still formed, then reduced to dA and dB.

The rank, alpha and targets are GPTConfig fields, so a checkpoint says what it holds and loads
as it was saved (the frozen W and A, B; a resume goes on from there). Everything that only uses
the model (generate, chat, eval, export, a later --init) loads it merged: a plain GPT-2 whose
weights are W + scale B A (merge_lora).

    model = add_lora(model, rank=8, alpha=16)     # the rest frozen
    ...train...
    model = merge_lora(model)                     # plain weights again
"""
import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig

TARGETS = {"attn": ("att.W_query", "att.W_key", "att.W_value", "att.out_proj"), "mlp": ("ff.fc1", "ff.fc2")}
# "mlp" on a SwiGLU model (GPTConfig.mlp): its three matrices, as peft's Llama recipes name gate_proj,
# up_proj and down_proj; the kernel takes the merged weights like gelu_mlp's
SWIGLU_MLP = ("ff.w_gate", "ff.w_up", "ff.w_down")


class LoRAUpdate(nn.Module):
    """The parametrization: W -> W + scale B A."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float):
        super().__init__()
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init, as peft does

    def forward(self, weight):
        # under autocast B @ A runs in bf16; the sum is in W's dtype (fp32): W is not rounded
        return weight + (self.scale * (self.lora_B @ self.lora_A)).to(weight.dtype)

    def branch(self, x):
        """scale (x A^T) B^T: the update applied to the input, unmerged (QLoRA's: the frozen weight is quantized,
        model/quant.py QuantLinear, and W + scale B A would be a float matrix again). r (in + out) a token."""
        return self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)


def parse_targets(spec) -> tuple:
    """"attn,mlp" (or a subset): the matrices LoRA adapts, in TARGETS' order."""
    names = [s.strip() for s in str(spec).split(",") if s.strip()]
    unknown = sorted(set(names) - set(TARGETS))
    if not names or unknown:
        raise UserError(f"LoRA targets must be a comma list of {', '.join(TARGETS)}, got {spec!r}")
    return tuple(t for t in TARGETS if t in names)


def check_lora(rank, alpha, targets):
    """A UserError naming the flag for a rank, alpha or targets LoRA cannot take."""
    from tritongpt._types import is_int, is_real

    if not is_int(rank) or rank < 0:
        raise UserError(f"--lora-rank must be an integer >= 0 (0: no LoRA), got {rank!r}")
    if not is_real(alpha) or not math.isfinite(alpha) or alpha <= 0:
        raise UserError(f"--lora-alpha must be a positive number, got {alpha!r}")
    if targets is not None:  # None: the command's default, chosen by the model
        parse_targets(targets)


def lora_linears(model):
    """(name, nn.Linear) of every matrix the config's targets name, block by block."""
    cfg = model.config
    for i, block in enumerate(model.trf_blocks):
        for target in parse_targets(cfg.lora_targets):
            for path in SWIGLU_MLP if target == "mlp" and cfg.mlp in ("swiglu", "geglu") else TARGETS[target]:
                module = block.get_submodule(path)
                yield f"trf_blocks.{i}.{path}", module


def add_lora(model, rank: int, alpha: float = 16.0, targets: str = "attn,mlp"):
    """`model` with LoRA on the targets' weights and every other parameter frozen (biases,
    LayerNorms, embeddings: peft's bias="none"). In place; returns the model.

    On a quantized model (QLoRA, Dettmers et al. 2023: model/quant.py quantize(head=False)) each target is a
    QuantLinear, frozen int8/int4 buffers: its update runs beside it unmerged (LoRAUpdate.branch)."""
    check_lora(rank, alpha, targets)
    if rank == 0:
        return model
    if model.config.n_experts and "mlp" in parse_targets(targets):
        raise UserError(f"LoRA target 'mlp' adapts the dense MLP's matrices, and this model's MLPs are "
                        f"{model.config.n_experts} experts (n_experts), which LoRA does not adapt: pass --lora-targets "
                        "attn")
    if has_lora(model):
        raise UserError("the model has LoRA already: merge_lora() it first to add another")
    if getattr(model, "quantized", None) and model.quantized_head:  # QLoRA's base keeps a float head
        raise UserError(f"this model's LM head is {model.quantized}-quantized too: LoRA on a quantized model "
                        "(QLoRA) takes one whose head stays float (model/quant.py quantize(head=False))")
    if rank > model.config.n_embd:
        raise UserError(f"--lora-rank {rank} is above the model's width {model.config.n_embd}: "
                        "no longer low-rank")
    model.config.lora_rank, model.config.lora_alpha = int(rank), float(alpha)
    model.config.lora_targets = ",".join(parse_targets(targets))
    attach_lora(model)
    return model


def attach_lora(model):
    """The parametrizations the config's LoRA fields describe (GPTModel builds a saved LoRA
    model with them, to load its weights into); every other parameter frozen."""
    from tritongpt.model.quant import QuantLinear

    cfg = model.config
    for p in model.parameters():
        p.requires_grad_(False)
    w = model.tok_emb.weight
    for _, linear in lora_linears(model):
        update = LoRAUpdate(linear.out_features, linear.in_features, cfg.lora_rank, cfg.lora_alpha).to(w.device,
                                                                                                        w.dtype)
        if isinstance(linear, QuantLinear):  # QLoRA: the update beside the frozen quantized matmul
            linear.lora = update
        else:
            parametrize.register_parametrization(linear, "weight", update)


def has_lora(model) -> bool:
    from tritongpt.model.quant import QuantLinear

    return any(parametrize.is_parametrized(m, "weight") if isinstance(m, nn.Linear) else
               isinstance(m, QuantLinear) and m.lora is not None for m in model.modules())


def merge_lora(model):
    """`model` with each LoRA weight replaced by its value W + scale B A: plain Linears, every
    parameter trainable again, the config's LoRA fields back to their defaults (rank 0: none).
    In place; returns the model. A quantized model (QLoRA's) comes back a float one: every QuantLinear a Linear of
    its dequantized W (+ scale B A where adapted) in the model's float dtype: the model it trained, as peft's
    merge_and_unload of a 4-bit base dequantizes it."""
    from tritongpt.model.quant import dequantize_model

    return _plain_linears(dequantize_model(model), lambda m: m.weight)  # (QuantLinears first: their updates)


def strip_lora(model):
    """`model` without its LoRA update: each adapted Linear back to its frozen W, the base model
    the update was trained on (what a peft adapter is applied to); a QLoRA model's quantized matrices without
    their updates. In place; returns the model."""
    return _plain_linears(model, lambda m: m.parametrizations.weight.original)


def _plain_linears(model, weight_of):
    """Each LoRA Linear swapped for a plain one holding weight_of(it); the config's LoRA fields
    back to their defaults, every parameter trainable again.

    A new Linear rather than un-parametrizing in place: parametrize.remove_parametrizations edits
    the module's class, which a deepcopy of the model shares, so merging a copy would break the
    original."""
    from tritongpt.model.quant import QuantLinear

    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):  # (merge_lora dequantizes them first: only strip_lora meets one)
            m.lora = None
        if isinstance(m, nn.Linear) and parametrize.is_parametrized(m, "weight"):
            w = weight_of(m).detach()
            plain = nn.utils.skip_init(nn.Linear, m.in_features, m.out_features, bias=m.bias is not None,
                                       device=w.device, dtype=w.dtype)
            with torch.no_grad():
                plain.weight.copy_(w)
            if m.bias is not None:
                plain.bias = m.bias
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, plain)
    model.config.lora_rank = 0
    model.config.lora_alpha, model.config.lora_targets = GPTConfig.lora_alpha, GPTConfig.lora_targets
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def lora_parameters(model) -> list:
    return [p for name, p in model.named_parameters() if name.endswith(("lora_A", "lora_B"))]


# -- serving several adapters at once (vLLM's multi-LoRA) ------------------------------------------------------------
class AdapterRows:
    """Which adapter each row of the next forward runs, shared by every AdapterLinear of a served model.

    index: None (the base model alone), an int slot (every row that adapter: generate()'s one request), or an int
    tensor [B] on the model's device, a slot a row and -1 for the base (the engine's batches, a request a row).
    names: the adapters' names, slot order (None: a free slot). The engine keeps one index buffer a slot and hands
    the forward a view or a gather of it, so a CUDA graph captured over the view replays whatever the buffer holds."""

    def __init__(self):
        self.names = []  # a slot's adapter, None: a slot an unloaded adapter left free (add() fills them)
        # a slot's prefix-cache salt: its name and its load's number, so an adapter loaded again under a name
        # another had never reads that one's cached pages
        self.salts, self.loads = [], 0
        self.index = None

    def slot(self, name) -> int:
        return self.names.index(name)

    @property
    def served(self) -> list:
        """The adapters' names, slot order."""
        return [n for n in self.names if n is not None]

    def add(self, name: str, slot: int):
        if slot == len(self.names):
            self.names.append(None)
            self.salts.append(b"")
        self.names[slot], self.salts[slot] = name, f"{name}#{self.loads}".encode()
        self.loads += 1

    @contextlib.contextmanager
    def use(self, index):
        before, self.index = self.index, index
        try:
            yield
        finally:
            self.index = before


def lora_rows_reference(x, lora_a, lora_b, index):
    """The textbook multi-LoRA delta: row b's x [T, in] times its adapter's A^T [in, r], times its B^T [r, out]
    (the scale folded into B), 0 for a row whose index is -1. Gathers each row's A and B ([B, r, in], [B, out, r]:
    a copy of the adapter per row) for two batched matmuls. Triton twin: kernels/lora.py add_lora_rows, which reads
    each row's adapter in place."""
    slot = index.clamp(min=0).long()
    h = torch.bmm(x, lora_a[slot].transpose(1, 2))
    delta = torch.bmm(h, lora_b[slot].transpose(1, 2))
    return delta.masked_fill((index < 0).view(-1, 1, 1), 0)


class AdapterLinear(nn.Module):
    """A frozen Linear (or a quantized one, model/quant.py) serving several LoRA adapters beside it, unmerged:
    y = base(x) + (x A_s^T) B_s^T for the adapter s each row runs (rows.index; none: the base alone). The adapters
    sit in slots, A [slots, rank, in] and B [slots, out, rank] buffers, each zero-padded to the largest rank served
    (vLLM's max_lora_rank) and its scale alpha / r folded into B (as vLLM's). Per row, a token costs
    rank (in + out) multiply-adds more, against in x out for the base matmul.

    Why not merge: a merged W + B A serves one adapter; punica (Chen et al., 2023) and vLLM keep the base shared
    and add each request's update in the batch. Triton twin: kernels/lora.py add_lora_rows (the "mlp" kernel
    name, as the quantized matmuls: the toggle's matmul kernels)."""

    def __init__(self, base, slots: int, rank: int, rows: AdapterRows, device=None, dtype=None):
        super().__init__()
        self.base, self.rows, self.use_triton = base, rows, False
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_buffer("lora_A", torch.zeros(slots, rank, self.in_features, device=device, dtype=dtype))
        self.register_buffer("lora_B", torch.zeros(slots, self.out_features, rank, device=device, dtype=dtype))

    def cast(self, dtype) -> tuple:
        """A and B in dtype, cast once and kept (serve's autocast would cast every slot's each forward) until the
        buffers change (load's writes bump their version; a move makes new ones)."""
        key = (dtype, self.lora_A.data_ptr(), self.lora_A._version, self.lora_B._version)
        if getattr(self, "_cast", (None,))[0] != key:
            self._cast = key, (self.lora_A.to(dtype), self.lora_B.to(dtype))
        return self._cast[1]

    def resize(self, slots: int, rank: int):
        """At least `slots` slots of rank `rank`: new zero-padded buffers holding the old ones where either grows."""
        S, R = self.lora_A.shape[:2]
        if slots <= S and rank <= R:
            return
        a = self.lora_A.new_zeros(max(slots, S), max(rank, R), self.in_features)
        b = self.lora_B.new_zeros(max(slots, S), self.out_features, max(rank, R))
        a[:S, :R], b[:S, :, :R] = self.lora_A, self.lora_B
        self.lora_A, self.lora_B = a, b
        self._cast = (None, None)  # (new buffers may reuse freed ones' addresses, at versions the cast key knows)

    def clear(self, slot: int):
        with torch.no_grad():
            self.lora_A[slot].zero_()
            self.lora_B[slot].zero_()

    def load(self, slot: int, a, b):
        """Adapter `slot`'s A [r, in] and scaled B [out, r], r <= the rank served (the rest stays zero)."""
        r = a.shape[0]
        self.clear(slot)
        with torch.no_grad():
            self.lora_A[slot, :r].copy_(a)
            self.lora_B[slot, :, :r].copy_(b)

    def forward(self, x):
        y = self.base(x)
        index = self.rows.index
        if index is None:
            return y
        # (under autocast y is the base matmul's bf16 while x is the fp32 stream: the update in y's dtype, as
        # F.linear's would be)
        x, (a, b) = x.to(y.dtype), self.cast(y.dtype)
        if isinstance(index, int):  # one adapter for every row: two plain matmuls
            return y + F.linear(F.linear(x, a[index]), b[index]) if index >= 0 else y
        if self.use_triton:
            from tritongpt.kernels.lora import add_lora_rows

            return add_lora_rows(y.contiguous(), x, a, b, index, index_checked=True)
        return y + lora_rows_reference(x, a, b, index)

    def extra_repr(self) -> str:
        return f"adapters={self.lora_A.shape[0]}, rank={self.lora_A.shape[1]}"


def serve_adapters(model, adapters: dict, max_rank: int = 16) -> AdapterRows:
    """`model` serving the LoRA adapters {name: {module path: (A [r, in], scale * B [out, r])}} (read_adapter's)
    beside its frozen weights, unmerged: each adapted Linear becomes an AdapterLinear with a slot an adapter (its
    A and B zero where that adapter leaves the module alone), all sharing one AdapterRows, which is returned and
    kept as model.adapters. In place. `adapters` may be empty (serve's runtime loading adds them later:
    add_adapter). Refuses by name what add_adapter refuses."""
    if getattr(model, "adapters", None) is not None:
        raise UserError("the model serves adapters already: serve_adapters takes the base model once")
    if has_lora(model):
        raise UserError("the model has a LoRA update of its own (a LoRA checkpoint): serve its merged weights "
                        "(merge_lora) as the base")
    for name, modules in adapters.items():  # (all checked before the first is added)
        _check_adapter(model, name, modules, max_rank)
    model.adapters = AdapterRows()
    for name, modules in adapters.items():
        add_adapter(model, name, modules, max_rank)
    return model.adapters


def _check_adapter(model, name, modules: dict, max_rank: int):
    from tritongpt.model.quant import QuantLinear

    for path, (a, b) in modules.items():
        if a.shape[0] > max_rank:
            raise UserError(f"adapter {name!r}: {path} has rank {a.shape[0]}, above the largest served "
                            f"({max_rank}: --max-lora-rank)")
        try:
            linear = model.get_submodule(path)
        except AttributeError:
            raise UserError(f"adapter {name!r}: the model has no module {path}") from None
        if not isinstance(linear, (nn.Linear, QuantLinear, AdapterLinear)):
            raise UserError(f"adapter {name!r}: {path} is a {type(linear).__name__}, not a Linear")
        # (each row's adapter is applied inside a forward over [rows, T, C]: the head runs after it, on some
        # requests' rows at a time, and a router on the tokens flattened)
        if linear is model.out_head:
            raise UserError(f"adapter {name!r}: {path} is the LM head, which the engine runs outside its rows' "
                            "forward: an adapter of the attention and MLP projections only")
        if path.rpartition(".")[2] == "router":
            raise UserError(f"adapter {name!r}: {path} is a MoE router, which sees the batch's tokens flattened: "
                            "an adapter of the attention and MLP projections only")
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != linear.in_features or b.shape[0] != linear.out_features \
                or b.shape[1] != a.shape[0]:
            raise UserError(f"adapter {name!r}: {path}'s A {tuple(a.shape)} and B {tuple(b.shape)} do not fit "
                            f"its [{linear.out_features}, {linear.in_features}] weight")


def add_adapter(model, name: str, modules: dict, max_rank: int = 16) -> int:
    """One more adapter on a model serving adapters (serve_adapters): into a slot an unloaded one left, else a new
    one; every AdapterLinear's buffers grown where the slots or the rank grow (new tensors: a CUDA graph captured
    over the old ones must be captured again), the modules it adapts first wrapped. -> its slot."""
    rows = model.adapters
    if rows is None:
        raise UserError("the model serves no adapters: serve_adapters first")
    if name in rows.names:
        raise UserError(f"the adapter {name!r} is loaded already")
    _check_adapter(model, name, modules, max_rank)
    slot = rows.names.index(None) if None in rows.names else len(rows.names)
    slots = max(len(rows.names), slot + 1)
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, AdapterLinear)}
    rank = max([a.shape[0] for a, _ in modules.values()] + [m.lora_A.shape[1] for m in wrapped.values()] + [1])
    w = model.tok_emb.weight  # (the model's float dtype: a quantized base has no float weight of its own)
    for path in sorted(set(modules) - set(wrapped)):
        parent, _, attr = path.rpartition(".")
        wrapped[path] = AdapterLinear(model.get_submodule(path), slots, rank, rows, w.device, w.dtype)
        wrapped[path].use_triton = "mlp" in model.kernels
        setattr(model.get_submodule(parent), attr, wrapped[path])
    for path, m in wrapped.items():
        m.resize(slots, rank)
        if path in modules:
            m.load(slot, *modules[path])
        else:
            m.clear(slot)
    rows.add(name, slot)
    return slot


def remove_adapter(model, name: str):
    """The adapter unloaded: its slot zero in every AdapterLinear and free for the next add_adapter (the caller
    makes sure no request runs it)."""
    rows = model.adapters
    if rows is None or name not in rows.names:
        raise UserError(f"the model serves no adapter {name!r}")
    slot = rows.slot(name)
    for m in model.modules():
        if isinstance(m, AdapterLinear):
            m.clear(slot)
    rows.names[slot] = None
