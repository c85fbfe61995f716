"""Weight-only quantization (gpt-fast's and torchao's "int8/int4 weight-only"; bitsandbytes' LLM.int8 without its
outliers): every matrix of the transformer blocks, and the LM head, stored as int8 with one fp32 scale a row, or as
int4 in groups of G inputs with an fp32 scale and offset each.

    int8:  W [N, K] -> q = round(W / s[:, None]) in [-127, 127],  s[n] = max_k |W[n, k]| / 127     (fp32)
           x @ W^T  ~= (x @ q^T) * s                               (s factors out of the sum over k)
    int4:  W[n, k] ~= q[n, k] * scale[n, k // G] + offset[n, k // G],  q in 0..15, two a byte (quantize_weight_int4)

Why: a decode step reads every weight once for a few tokens' work, so its speed is the bytes it reads; int8
weights are a quarter of fp32's and half of bf16's, int4 at G 128 about an eighth of fp32's. int8 is symmetric and per
output row: a row's largest weight sets its step s, and each weight is off by at most s / 2; int4 is asymmetric per
group (its 16 levels span the group's minimum to maximum). Activations stay in their dtype (fp32, or autocast's
bf16): only the weights are quantized, so nothing needs calibration data.

Reference: `Int8Linear` / `Int4Linear` below dequantize (a float matrix) and call F.linear: the textbook version,
which reads the quantized weights and then writes and reads a float copy of them.
Triton twins: kernels/quant.py `int8_linear` / `int4_linear`, which read the quantized tile, convert it in registers
and apply the scale (int8's in the epilogue), the bias and FeedForward's GELU. The toggle: a QuantLinear follows "mlp"
(model/toggle.py), the name of the matmul kernels.

    quantize_int8(model)                 # in place; for generate, chat, serve, eval, ...
    quantize_int4(model, group_size=128)
    quantize(model, "int4", head=False)  # QLoRA's base: add_lora (model/lora.py) then trains updates beside it

The quantized matrices are buffers, frozen: a gradient flows through them to x (both paths; the Triton kernels'
backward computes dx = dy @ W from the quantized tiles), never to them. QLoRA's updates (QuantLinear.lora) run
beside the quantized matmul. Refused: mixture-of-experts models (their experts are stacked tensors, not Linears: not
quantized yet), LoRA-parametrized weights (merge them first: merge_lora), a second quantization.

A quantized model saves as it is (GPTModel.save: the quantized matrices, fp32 scales and offsets, "quantized" and
int4's "quantized_group_size" in the metadata; `tritongpt quantize MODEL --out DIR`); GPTModel.load(quantized_ok=True)
builds the QuantLinears on the meta device (quantized_layout) and fills them, so the float matrices are never made.
Only the commands that run a model pass quantized_ok; the trainers and merge refuse such a file by name (export takes
a QLoRA run's, merged: dequantize_model; or its updates alone, --adapter, for the float base it quantized).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from tritongpt.errors import UserError

QMAX = 127  # symmetric: -127..127, so q and -q are both representable (-128 is never used)


def quantize_weight(weight):
    """(q int8 [N, K], scale fp32 [N]) with weight ~= q * scale[:, None]; each row's largest |weight| maps to 127.
    A row of zeros gets scale 1 (q 0): any scale reproduces it, and 0 would divide by zero."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise UserError(f"int8 quantization takes a floating [out, in] weight, got {tuple(weight.shape)} "
                        f"{weight.dtype}")
    w = weight.detach().float()
    if not bool(torch.isfinite(w).all()):
        raise UserError("cannot quantize a weight holding NaN or inf: the row's scale would be too")
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


INT4_LEVELS = 15  # q in 0..15 (4 bits); a group's minimum maps to 0 and its maximum to 15
GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024)  # int4 groups: powers of two the kernel's K tiles divide or hold


def check_group_size(in_features: int, group_size: int) -> None:
    """A UserError unless group_size is one of GROUP_SIZES and divides in_features (each group is whole)."""
    if group_size not in GROUP_SIZES:
        raise UserError(f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size!r}")
    if in_features % group_size:
        fits = [g for g in GROUP_SIZES if in_features % g == 0]
        hint = f" ({', '.join(map(str, fits))} divide it)" if fits else " (no int4 group size divides it: use int8)"
        raise UserError(f"int4 quantization with group size {group_size} needs in_features a multiple of it, got "
                        f"{in_features}: pass a smaller group size{hint}")


def quantize_weight_int4(weight, group_size: int = 128):
    """(qweight uint8 [N, K / 2], scale fp32 [N, K / G], offset fp32 [N, K / G]) with
    weight[n, k] ~= q[n, k] * scale[n, k // G] + offset[n, k // G], q in 0..15 packed two a byte (even k low nibble).

    Asymmetric per group of G consecutive inputs of a row (gpt-fast's and torchao's int4 weight-only): offset is the
    group's minimum and scale its range / 15, so both ends are levels and each weight is off by at most scale / 2.
    With 16 levels a symmetric grid would waste a level and half the range on a group that leans one way. A constant
    group gets scale 1 (q 0: offset is the value itself); one whose range (max - min, finite weights) passes fp32's
    largest value is refused: its scale would be inf."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise UserError(f"int4 quantization takes a floating [out, in] weight, got {tuple(weight.shape)} "
                        f"{weight.dtype}")
    N, K = weight.shape
    check_group_size(K, group_size)
    w = weight.detach().float()
    if not bool(torch.isfinite(w).all()):
        raise UserError("cannot quantize a weight holding NaN or inf: its group's scale would be too")
    g = w.view(N, K // group_size, group_size)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    scale = (hi - lo) / INT4_LEVELS
    # finite weights whose range passes fp32's largest value: an inf scale, NaN levels, a NaN layer. The top level
    # as dequantize() makes it (q * scale, then + offset) must be finite too
    bad = ~torch.isfinite(lo + scale * INT4_LEVELS)
    if bool(bad.any()):
        n, grp = (int(i) for i in bad.nonzero()[0])
        raise UserError(f"cannot int4-quantize row {n}, group {grp}: its range {float(lo[n, grp]):.3g} .. "
                        f"{float(hi[n, grp]):.3g} overflows fp32 (an inf scale); use int8, whose scale is a row's "
                        "largest |weight| / 127")
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a range that underflows (or is 0): q 0
    q = torch.round((g - lo[:, :, None]) / scale[:, :, None]).clamp_(0, INT4_LEVELS).to(torch.uint8).view(N, K)
    return q[:, 0::2] | (q[:, 1::2] << 4), scale, lo


def unpack_int4(qweight):
    """qweight uint8 [N, K / 2] -> q uint8 [N, K] in 0..15 (each byte's low nibble first: quantize_weight_int4's)."""
    return torch.stack((qweight & 15, qweight >> 4), dim=-1).view(qweight.shape[0], -1)


class QuantLinear(nn.Module):
    """What Int8Linear and Int4Linear share: nn.Linear's forward on quantized weights (frozen: no gradient), the
    quantized tensors and their fp32 scales as buffers (nothing here trains), and the toggle's use_triton.

    forward(x, act): act a GELU module (model/layers.py) applied to the output, which the Triton path fuses into
    the matmul's epilogue (FeedForward's fc1). The reference dequantizes (dequantize(), fp32) and calls F.linear;
    the Triton path is _triton (kernels/quant.py)."""

    FP32_BUFFERS = ("scale",)  # kept fp32 through model.half() / .to(bf16): see _apply
    mode = ""  # "int8" / "int4": GPTModel.quantized, the --quantize value

    def __init__(self, in_features: int, out_features: int, bias: bool, device, dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.use_triton = False
        self.lora = None  # QLoRA's update (model/lora.py LoRAUpdate), run beside the frozen matmul

    def _copy_bias(self, linear: nn.Linear, device):
        if linear.bias is not None:
            self.bias = linear.bias.detach().to(device, copy=True)

    def _apply(self, fn, recurse=True):
        # model.to(bf16) / .half() casts every float buffer: a scale would keep 8 or 11 bits, and in fp16 a row
        # whose largest weight is below ~7.7e-3 would get a subnormal one (a few bits). Scales (and int4's offsets)
        # stay the fp32 they were made in, moved wherever the rest goes; the bias is cast as any float parameter is.
        # A meta layout (GPTModel.load's, before the file fills it) too: its file's fp32 scales would be rounded
        # on the way in. (Nothing moves a meta tensor's values: only a new empty one leaves the meta device.)
        kept = {name: getattr(self, name) for name in self.FP32_BUFFERS}
        out = super()._apply(fn, recurse)
        for name, old in kept.items():
            new = getattr(self, name)
            if new.dtype != old.dtype:
                setattr(self, name, torch.empty_like(old, device=new.device) if old.is_meta else old.to(new.device))
        return out

    def forward(self, x, act=None):
        # A gradient flows through to x (QLoRA: the LoRA updates before it train), never to the frozen buffers. The
        # activation is fused into the Triton matmul's epilogue only where nothing needs its input afterwards: no
        # gradient through it, and no LoRA update to add before it.
        fused = act is not None and self.lora is None and not (torch.is_grad_enabled() and x.requires_grad)
        if self.use_triton:
            activation = ("gelu_erf" if act.approximate == "none" else "gelu_tanh") if fused else None
            y = self._triton(x, activation)
        else:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            y = F.linear(x, self.dequantize().to(x.dtype), bias)  # under autocast F.linear casts both, as nn.Linear's
            if fused:
                y = act(y)
        if self.lora is not None:
            y = y + self.lora.branch(x)
        return y if act is None or fused else act(y)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(QuantLinear):
    """y = x @ (q * scale[:, None])^T + bias, q int8 [out, in], one fp32 scale a row. Triton twin:
    kernels/quant.py `int8_linear`."""

    mode = "int8"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=torch.float32):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, device=None) -> "Int8Linear":
        """linear quantized; on device when given (its float weight copied there alone, then freed), else on its own."""
        w = linear.weight if device is None else linear.weight.detach().to(device)
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, w.device, w.dtype)
        new.qweight, new.scale = quantize_weight(w)
        new._copy_bias(linear, w.device)
        return new

    def dequantize(self):
        """The fp32 matrix q * scale this layer multiplies by: [out, in]."""
        return self.qweight.float() * self.scale[:, None]

    def _triton(self, x, activation):
        from tritongpt.kernels.quant import int8_linear

        return int8_linear(x, self.qweight, self.scale, self.bias, activation)


class Int4Linear(QuantLinear):
    """y = x @ W^T + bias with W[n, k] = q[n, k] * scale[n, g] + offset[n, g], g = k // group_size: q in 0..15 packed
    two to a byte (qweight uint8 [out, in / 2]: an even k's q in the low nibble, the odd k after it in the high),
    scale and offset fp32 [out, in / group_size]. Triton twin: kernels/quant.py `int4_linear`."""

    FP32_BUFFERS = ("scale", "offset")
    mode = "int4"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=torch.float32, group_size: int = 128):
        check_group_size(in_features, group_size)
        super().__init__(in_features, out_features, bias, device, dtype)
        self.group_size = group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("offset", torch.zeros(out_features, groups, dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, device=None, group_size: int = 128) -> "Int4Linear":
        """linear quantized (Int8Linear.from_linear's device=)."""
        w = linear.weight if device is None else linear.weight.detach().to(device)
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, w.device, w.dtype, group_size)
        new.qweight, new.scale, new.offset = quantize_weight_int4(w, group_size)
        new._copy_bias(linear, w.device)
        return new

    def dequantize(self):
        """The fp32 matrix q * scale + offset this layer multiplies by: [out, in]."""
        N, G = self.out_features, self.group_size
        q = unpack_int4(self.qweight).float().view(N, -1, G)
        return (q * self.scale[:, :, None] + self.offset[:, :, None]).view(N, self.in_features)

    def _triton(self, x, activation):
        from tritongpt.kernels.quant import int4_linear

        return int4_linear(x, self.qweight, self.scale, self.offset, self.bias, activation)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


def _swap_linears(model, head: bool, make) -> None:
    """Every nn.Linear of model's blocks, and with head its LM head, replaced by make(linear), a QuantLinear; the
    model marked quantized (.quantized, .quantized_linears, .quantized_head, .quantized_group_size: int4's, else
    None) and each QuantLinear on the model's kernel path."""
    n, made = 0, None
    for block in model.trf_blocks:
        for name, m in list(block.named_modules()):
            if isinstance(m, nn.Linear):
                parent, _, attr = name.rpartition(".")
                setattr(block.get_submodule(parent), attr, made := make(m))
                n += 1
    if head:
        model.out_head = made = make(model.out_head)
        n += 1
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.use_triton = "mlp" in model.kernels
    model.quantized, model.quantized_linears, model.quantized_head = made.mode, n, head
    model.quantized_group_size = getattr(made, "group_size", None)


def _check_quantizable(model, mode: str, group_size=None):
    from tritongpt.model.lora import has_lora

    if getattr(model, "quantized", None):
        raise UserError(f"the model is already quantized ({model.quantized})")
    if model.config.n_experts:
        raise UserError(f"{mode} quantization does not take mixture-of-experts models yet: their experts are "
                        "stacked tensors run by the grouped kernels, not Linears")
    if has_lora(model):
        raise UserError("the model has LoRA updates: merge them first (tritongpt.model.lora.merge_lora), then quantize")
    if group_size is not None:  # every matrix checked before any is swapped: no half-quantized model
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and (name.startswith("trf_blocks.") or name == "out_head"):
                try:
                    check_group_size(m.in_features, group_size)
                except UserError as e:
                    raise UserError(f"{name}: {e}") from None


def quantize_int8(model, head: bool = True, device=None):
    """model (a GPTModel) with every Linear of its blocks (attention's q, k, v and output projections, the MLP's
    two or three matrices) and, with head, its LM head replaced by Int8Linear. In place; returns the model.

    device: where the int8 matrices are made, one float matrix at a time copied there (the rest of the model, the
    embeddings and norms, stays where it is until the caller moves it): a model whose fp32 matrices do not fit a
    GPU, but whose int8 ones do, is quantized on the CPU-loaded model with device="cuda", then moved (--quantize).

    A tied head (GPT-2's) gets an int8 copy of its own: the embedding stays a float table (a lookup reads one row a
    token), while the head reads all of it every step, the largest matrix of a small model. Eval mode after."""
    _check_quantizable(model, "int8")
    _swap_linears(model, head, lambda linear: Int8Linear.from_linear(linear, device))
    return model.eval()


def quantize_int4(model, group_size: int = 128, head: bool = True, device=None):
    """quantize_int8's swap with Int4Linear (4 bits a weight and an fp32 scale and offset a group of group_size
    inputs: 4.5 bits a weight at 128): every in_features of the blocks' and the head's Linears must be a multiple
    of group_size (checked for all before any is swapped)."""
    _check_quantizable(model, "int4", group_size)
    _swap_linears(model, head, lambda linear: Int4Linear.from_linear(linear, device, group_size))
    return model.eval()


def quantize(model, mode: str, head: bool = True, device=None, group_size: int = 128):
    """quantize_int8 or quantize_int4 by name (the commands' --quantize)."""
    if mode == "int8":
        return quantize_int8(model, head, device)
    if mode == "int4":
        return quantize_int4(model, group_size, head, device)
    raise UserError(f"quantization must be int8 or int4, got {mode!r}")


def quantized_layout(model, mode: str = "int8", head: bool = True, group_size: int = 128):
    """model (a GPTModel, on the meta device) with each Linear quantize() would quantize replaced by an empty
    QuantLinear of its shape: what a quantized file's tensors load into (GPTModel.load). In place; returns it."""
    _check_quantizable(model, mode, group_size if mode == "int4" else None)

    def empty(linear):
        args = (linear.in_features, linear.out_features, linear.bias is not None, linear.weight.device,
                linear.weight.dtype)
        return Int4Linear(*args, group_size=group_size) if mode == "int4" else Int8Linear(*args)

    _swap_linears(model, head, empty)
    return model


def dequantize_model(model):
    """model with every QuantLinear replaced by an nn.Linear of its dequantized weight (plus scale B A where
    QLoRA adapted it) and its bias, in the model's float dtype (fp32 unless it was cast: model.to(bf16) casts the
    embeddings and norms, not the quantized matrices), the quantized marks gone (GPTModel.quantized None): the float
    model the quantized one computes, but for a quantized tied head, which is tied to the float embedding again (as
    the model was before quantize). In place; returns the model."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            with torch.no_grad():
                w = m.dequantize() if m.lora is None else m.lora(m.dequantize())
                plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=w.device,
                                  dtype=dtype)
                plain.weight.copy_(w)
                if m.bias is not None:
                    plain.bias.copy_(m.bias)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, plain)
    if getattr(model, "quantized", None):
        if model.quantized_head and model.config.tie_weights:  # its int8/int4 copy of the embedding: tied again
            model.out_head.weight = model.tok_emb.weight
        model.quantized = model.quantized_linears = model.quantized_group_size = None
        model.quantized_head = False
    return model


def linear_bytes(model) -> int:
    """Bytes of the model's matrices as its matmuls read them: the Linears' weights and biases, the QuantLinears'
    buffers (quantized weights, scales, offsets, biases: what quantize shrinks; embeddings and norms left out)."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += sum(t.numel() * t.element_size() for t in (m.weight, m.bias) if t is not None)
        elif isinstance(m, QuantLinear):
            total += sum(t.numel() * t.element_size() for t in m.buffers(recurse=False))
    return total
