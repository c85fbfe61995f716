"""Weight-only int8 quantization for inference (gpt-fast's "int8 weight-only", bitsandbytes' LLM.int8 without
its outliers): every matrix of the transformer blocks, and the LM head, stored as int8 with one fp32 scale a row.

    W [N, K]  ->  q = round(W / s[:, None]) in [-127, 127] (int8),  s[n] = max_k |W[n, k]| / 127  (fp32)
    x @ W^T   ~=  (x @ q^T) * s                                    (s factors out of the sum over k)

Why: a decode step reads every weight once for a few tokens' work, so its speed is the bytes it reads; int8
weights are a quarter of fp32's and half of bf16's. Symmetric and per output row (per channel): a row's
largest weight sets its step s, and each weight is off by at most s / 2. Activations stay in their
dtype (fp32, or autocast's bf16): only the weights are quantized, so nothing needs calibration data.

Reference: `Int8Linear` below dequantizes (q * s, a float matrix) and calls F.linear: the textbook version,
which reads the int8 weights and then writes and reads a float copy of them.
Triton twin: kernels/quant.py `int8_linear`, which reads the int8 tile, converts it in registers (exact:
every int8 is a bf16/fp16/fp32 value) and applies s and the bias (and FeedForward's GELU) in the epilogue.
The toggle: an Int8Linear follows "mlp" (model/toggle.py), the name of the matmul kernels.

    quantize_int8(model)   # in place; the model is then for inference (generate, chat, serve, eval, ...)

Refused: mixture-of-experts models (their experts are stacked tensors, not Linears: not quantized yet),
LoRA-parametrized weights (merge them first: merge_lora; and add_lora on a quantized model), gradients (frozen int8
weights; the Triton kernel has no backward).

A quantized model saves as it is (GPTModel.save: the int8 matrices and fp32 scales, "quantized" in the metadata;
`tritongpt quantize MODEL --out DIR`); GPTModel.load(quantized_ok=True) builds the Int8Linears on the meta device
(int8_layout) and fills them, so the float matrices are never made. Only the commands that run a model pass
quantized_ok; the trainers, export and merge refuse such a file by name.
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


class Int8Linear(nn.Module):
    """nn.Linear's forward on int8 weights: y = x @ (q * scale[:, None])^T + bias (inference only).

    q, scale and the bias are buffers, not parameters: nothing here trains. forward(x, act): act a GELU module
    (model/layers.py) applied to the output, which the Triton path fuses into the matmul's epilogue (FeedForward's
    fc1). Triton twin: kernels/quant.py `int8_linear`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.use_triton = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, device=None) -> "Int8Linear":
        """linear quantized; on device when given (its float weight copied there alone, then freed), else on its own."""
        w = linear.weight if device is None else linear.weight.detach().to(device)
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, w.device, w.dtype)
        new.qweight, new.scale = quantize_weight(w)
        if linear.bias is not None:
            new.bias = linear.bias.detach().to(w.device, copy=True)
        return new

    def _apply(self, fn, recurse=True):
        # model.to(bf16) / .half() casts every float buffer: the scale would keep 8 or 11 bits, and in fp16 a row
        # whose largest weight is below ~7.7e-3 would get a subnormal one (a few bits). The scale stays the fp32 it
        # was made in, moved wherever the rest goes; the bias is cast as any float parameter is.
        scale = self.scale
        out = super()._apply(fn, recurse)
        if self.scale.dtype != scale.dtype and not scale.is_meta:
            self.scale = scale.to(self.scale.device)
        return out

    def dequantize(self):
        """The fp32 matrix q * scale this layer multiplies by: [out, in]."""
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x, act=None):
        if torch.is_grad_enabled() and x.requires_grad:
            raise UserError("int8 weight-only quantization is for inference: the int8 weights are frozen and the "
                            "Triton kernel has no backward; run under torch.no_grad() (train on the float weights)")
        if self.use_triton:
            from tritongpt.kernels.quant import int8_linear

            activation = None if act is None else ("gelu_erf" if act.approximate == "none" else "gelu_tanh")
            return int8_linear(x, self.qweight, self.scale, self.bias, activation)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = F.linear(x, self.dequantize().to(x.dtype), bias)  # under autocast F.linear casts both, as nn.Linear's
        return y if act is None else act(y)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _swap_linears(model, head: bool, make) -> None:
    """Every nn.Linear of model's blocks, and with head its LM head, replaced by make(linear), an Int8Linear; the
    model marked quantized (.quantized, .quantized_linears, .quantized_head) and each Int8Linear on the model's
    kernel path."""
    n = 0
    for block in model.trf_blocks:
        for name, m in list(block.named_modules()):
            if isinstance(m, nn.Linear):
                parent, _, attr = name.rpartition(".")
                setattr(block.get_submodule(parent), attr, make(m))
                n += 1
    if head:
        model.out_head = make(model.out_head)
        n += 1
    for m in model.modules():
        if isinstance(m, Int8Linear):
            m.use_triton = "mlp" in model.kernels
    model.quantized, model.quantized_linears, model.quantized_head = "int8", n, head


def quantize_int8(model, head: bool = True, device=None):
    """model (a GPTModel) with every Linear of its blocks (attention's q, k, v and output projections, the MLP's
    two or three matrices) and, with head, its LM head replaced by Int8Linear. In place; returns the model.

    device: where the int8 matrices are made, one float matrix at a time copied there (the rest of the model, the
    embeddings and norms, stays where it is until the caller moves it): a model whose fp32 matrices do not fit a
    GPU, but whose int8 ones do, is quantized on the CPU-loaded model with device="cuda", then moved (--quantize).

    A tied head (GPT-2's) gets an int8 copy of its own: the embedding stays a float table (a lookup reads one row a
    token), while the head reads all of it every step, the largest matrix of a small model. Eval mode after."""
    from tritongpt.model.lora import has_lora

    if getattr(model, "quantized", None):
        raise UserError(f"the model is already quantized ({model.quantized})")
    if model.config.n_experts:
        raise UserError("int8 quantization does not take mixture-of-experts models yet: their experts are stacked "
                        "tensors run by the grouped kernels, not Linears")
    if has_lora(model):
        raise UserError("the model has LoRA updates: merge them first (tritongpt.model.lora.merge_lora), then quantize")
    _swap_linears(model, head, lambda linear: Int8Linear.from_linear(linear, device))
    return model.eval()


def int8_layout(model, head: bool = True):
    """model (a GPTModel, on the meta device) with each Linear quantize_int8 would quantize replaced by an empty
    Int8Linear of its shape: what an int8 file's tensors load into (GPTModel.load). In place; returns the model."""
    _swap_linears(model, head, lambda linear: Int8Linear(linear.in_features, linear.out_features,
                                                         linear.bias is not None, linear.weight.device,
                                                         linear.weight.dtype))
    return model


def linear_bytes(model) -> int:
    """Bytes of the model's matrices as its matmuls read them: the Linears' weights and biases, the Int8Linears'
    int8 weights, scales and biases (what quantize_int8 shrinks; the embeddings and norms are left out)."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += sum(t.numel() * t.element_size() for t in (m.weight, m.bias) if t is not None)
        elif isinstance(m, Int8Linear):
            total += sum(t.numel() * t.element_size() for t in (m.qweight, m.scale, m.bias) if t is not None)
    return total
