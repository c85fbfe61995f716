"""Weight-only quantization (gpt-fast's and torchao's "int8/int4 weight-only"; bitsandbytes' LLM.int8 without its
outliers): every matrix of the transformer blocks, and the LM head, stored as int8 with one fp32 scale a row, or as
int4 in groups of G inputs with an fp32 scale and offset each.

    int8:  W [N, K] -> q = round(W / s[:, None]) in [-127, 127],  s[n] = max_k |W[n, k]| / 127     (fp32)
           x @ W^T  ~= (x @ q^T) * s                               (s factors out of the sum over k)
           (a GPTQ 8-bit folder's: s [N, K / G], a scale a group of G inputs, W ~= q * s[n, k // G]: Int8Linear's
           group_size; made by train/hf_quant.py only, never by quantize_int8)
    int4:  W[n, k] ~= q[n, k] * scale[n, k // G] + offset[n, k // G],  q in 0..15, two a byte (quantize_weight_int4)

Why: a decode step reads every weight once for a few tokens' work, so its speed is the bytes it reads; int8
weights are a quarter of fp32's and half of bf16's, int4 at G 128 about an eighth of fp32's. int8 is symmetric and per
output row: a row's largest weight sets its step s, and each weight is off by at most s / 2; int4 is asymmetric per
group (its 16 levels span the group's minimum to maximum). Activations stay in their dtype (fp32, or autocast's
bf16): only the weights are quantized, so round-to-nearest needs no calibration data. GPTQ (quantize_gptq,
`tritongpt quantize --method gptq`) picks the levels of the same layout from calibration text instead: each matrix's
rounding errors are corrected by its weights not yet rounded, for the least change of its outputs on that text. AWQ
(quantize_awq, `--method awq`, int4) scales each matrix's input channels by their activations' size on that text,
the scales folded into the op before it (the float model unchanged), clips each group's range, then rounds.

Reference: `Int8Linear` / `Int4Linear` below dequantize (a float matrix) and call F.linear: the textbook version,
which reads the quantized weights and then writes and reads a float copy of them.
Triton twins: kernels/quant.py `int8_linear` / `int4_linear`, which read the quantized tile, convert it in registers
and apply the scale (int8's in the epilogue), the bias and FeedForward's GELU. The toggle: a QuantLinear follows "mlp"
(model/toggle.py), the name of the matmul kernels.

    quantize_int8(model)                 # in place; for generate, chat, serve, eval, ...
    quantize_int4(model, group_size=128)
    quantize(model, "int4", head=False)  # QLoRA's base: add_lora (model/lora.py) then trains updates beside it
    quantize(model, "int4", method="gptq", calibration=ids)  # GPTQ on token ids [n_samples, T]
    quantize(model, "int4", method="gptq", calibration=ids, act_order=True)  # its columns by decreasing H_kk
    quantize(model, "int4", method="awq", calibration=ids)  # AWQ's scales and clipping, then round to nearest

The quantized matrices are buffers, frozen: a gradient flows through them to x (both paths; the Triton kernels'
backward computes dx = dy @ W from the quantized tiles), never to them. QLoRA's updates (QuantLinear.lora) run
beside the quantized matmul. Refused: mixture-of-experts models (their experts are stacked tensors, not Linears: not
quantized yet), LoRA-parametrized weights (merge them first: merge_lora), a second quantization.

A quantized model saves as it is (GPTModel.save: the quantized matrices, fp32 scales and offsets, "quantized" and
int4's "quantized_group_size" in the metadata, and "quantized_from" (QUANTIZED_FROM) where it is a Hugging Face
folder's own quantization; `tritongpt quantize MODEL --out DIR`); GPTModel.load(quantized_ok=True)
builds the QuantLinears on the meta device (quantized_layout) and fills them, so the float matrices are never made.
Only the commands that run a model pass quantized_ok; the trainers and merge refuse such a file by name (export takes
a QLoRA run's, merged: dequantize_model; or its updates alone, --adapter, for the float base it quantized).
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from tritongpt.errors import UserError, note

QMAX = 127  # symmetric: -127..127, so q and -q are both representable (-128 is never used)


# MXFP4 (OCP Microscaling FP4; GPT-OSS's experts, kept as the Hub's folders hold them: model/layers.py
# MXFP4MoEFeedForward): 32 e2m1 codes a block along a weight's inputs, two a byte (the low nibble first), and an e8m0
# exponent byte a block, 2 ** (byte - 127). train/hf_quant.py reads and checks the folders' tensors.
MXFP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks, scales, dtype=torch.float32):
    """The float weight [E, R, G * 32] (a Linear's [out, in] per expert) of MXFP4 blocks uint8 [E, R, G, 16] and
    scales uint8 [E, R, G]: e2m1 value times 2 ** (scale - 127), computed exactly in float32 (as transformers'
    ldexp), then one cast to dtype (float32, bfloat16 and float64 hold every value below 2 ** 128 exactly). Shapes
    and the scale 255 (e8m0's NaN) are the caller's to check (hf_quant.mxfp4_dequantize, MXFP4MoEFeedForward)."""
    E, R, G, _ = blocks.shape
    lut = torch.tensor(MXFP4_VALUES, dtype=torch.float32, device=blocks.device)
    # codes in order: byte j of a block holds values 2j (low nibble) and 2j + 1 (high); int32 indices, half int64's
    # memory (a gpt-oss-120b layer's gate_up_proj is 128 * 5760 * 2880 codes)
    codes = torch.stack([blocks & 15, blocks >> 4], dim=-1).reshape(E, R, G, 32).int()
    out = torch.ldexp(lut[codes], scales.to(torch.int32)[..., None] - 127)
    return out.reshape(E, R, G * 32).to(dtype)


def quantize_weight(weight):
    """(q int8 [N, K], scale fp32 [N]) with weight ~= q * scale[:, None]; each row's largest |weight| maps to 127.
    A row of zeros gets scale 1 (q 0): any scale reproduces it, and 0 would divide by zero."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise UserError(f"int8 quantization takes a floating [out, in] weight, got {tuple(weight.shape)} "
                        f"{weight.dtype}")
    w = weight.detach().float()
    if not bool(torch.isfinite(w).all()):
        raise UserError("cannot quantize a weight holding NaN or inf: the row's scale would be too")
    scale = _int8_scale(w.abs().amax(dim=1))
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def _int8_scale(amax):
    """A row's scale from its largest |weight|: amax / 127, or 1 for a row of zeros (any scale reproduces it, and 0
    would divide by zero)."""
    return torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))


INT4_LEVELS = 15  # q in 0..15 (4 bits); a group's minimum maps to 0 and its maximum to 15
# A model kept in a Hugging Face folder's own quantization (train/hf_quant.py) says so in its file's metadata
# ("quantized_from"), so that what reads it back does not credit `tritongpt quantize` with it: its names as said
# (a GGUF file's Q8_0 / Q4_0 / Q4_1 / Q4_K / Q6_K blocks too: train/gguf_import.py)
QUANTIZED_FROM = {"gptq": "GPTQ", "awq": "AWQ", "bitsandbytes": "bitsandbytes", "gguf": "GGUF"}
GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024)  # int4 groups: powers of two the kernel's K tiles divide or hold


class GroupSizeError(UserError):
    """An int4 group size the model's widths do not take: a command adds the flag that set it."""


def check_group_size(in_features: int, group_size: int) -> None:
    """A GroupSizeError unless group_size is one of GROUP_SIZES and divides in_features (each group is whole)."""
    if group_size not in GROUP_SIZES:
        raise GroupSizeError(f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, got "
                             f"{group_size!r}")
    if in_features % group_size:
        fits = [g for g in GROUP_SIZES if in_features % g == 0]
        hint = f" ({', '.join(map(str, fits))} divide it)" if fits else " (no int4 group size divides it: use int8)"
        raise GroupSizeError(f"int4 quantization with group size {group_size} needs in_features a multiple of it, "
                             f"got {in_features}: pass a smaller group size{hint}")


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
    scale, bad = _int4_scale(lo, hi)
    if bool(bad.any()):
        n, grp = (int(i) for i in bad.nonzero()[0])
        raise UserError(f"cannot int4-quantize row {n}, group {grp}: its range {float(lo[n, grp]):.3g} .. "
                        f"{float(hi[n, grp]):.3g} overflows fp32 (an inf scale); use int8, whose scale is a row's "
                        "largest |weight| / 127")
    q = torch.round((g - lo[:, :, None]) / scale[:, :, None]).clamp_(0, INT4_LEVELS).view(N, K)
    return pack_int4(q), scale, lo


def _int4_scale(lo, hi):
    """(scale, bad) of groups with minimum lo and maximum hi (fp32): range / 15, or 1 where the range is 0 or
    underflows (every level q 0: the offset is the value); bad where the top level as dequantize() makes it (q *
    scale, then + offset) is not finite: finite weights whose range passes fp32's largest value would give an inf
    scale, NaN levels, a NaN layer, so the caller refuses them."""
    scale = (hi - lo) / INT4_LEVELS
    bad = ~torch.isfinite(lo + scale * INT4_LEVELS)
    return torch.where(scale > 0, scale, torch.ones_like(scale)), bad


def pack_int4(q):
    """Levels [N, K] in 0..15 as uint8 [N, K / 2], two a byte, an even k's in the low nibble (unpack_int4's inverse)."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(qweight):
    """qweight uint8 [N, K / 2] -> q uint8 [N, K] in 0..15 (each byte's low nibble first: quantize_weight_int4's)."""
    return torch.stack((qweight & 15, qweight >> 4), dim=-1).view(qweight.shape[0], -1)


def dequantize_int4(qweight, scale, offset, group_size: int):
    """quantize_weight_int4's (qweight, scale, offset) back to the fp32 matrix q * scale + offset [N, K]."""
    N = qweight.shape[0]
    q = unpack_int4(qweight).float().view(N, -1, group_size)
    return (q * scale[:, :, None] + offset[:, :, None]).view(N, -1)


# -- GPTQ ------------------------------------------------------------------------------------------------------
# Round-to-nearest (above) quantizes each weight on its own. GPTQ (Frantar et al. 2022; AutoGPTQ, gpt-fast's GPTQ)
# minimises the layer's output error on calibration inputs X instead, ||X W^T - X Q^T||^2 = tr((W - Q) H (W - Q)^T)
# with H = 2 X^T X, in the same layout: what comes out is what the kernels and files already read.

QUANTIZE_METHODS = ("rtn", "gptq", "awq")  # quantize()'s: round to nearest; GPTQ; AWQ (below)


def _gptq(weight, hessian, damp: float, block: int, group_size, find_params, quantize_column, act_order=False,
          static_groups=False):
    """The GPTQ loop shared by int4 and int8 (see gptq_quantize_weight_int4): float64 on weight's device.
    find_params(w [N, G]) -> params for a group (called when the group starts, on the error-updated weights; with
    static_groups for every group up front, on the original weights; once for the whole row, up front, where
    group_size is None); quantize_column(w [N], params) -> (levels [N], dequantized [N]). act_order: the columns in
    order of decreasing H_kk (needs static groups, or no groups). -> (levels [N, K] in the original column order,
    the groups' params in group order, or the row's)."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise UserError(f"GPTQ takes a floating [out, in] weight, got {tuple(weight.shape)} {weight.dtype}")
    N, K = weight.shape
    if tuple(hessian.shape) != (K, K):
        raise UserError(f"GPTQ needs a [{K}, {K}] Hessian for a weight of {K} inputs, got {tuple(hessian.shape)}")
    if not damp > 0 or block < 1:
        raise UserError(f"GPTQ's damp must be > 0 and its block >= 1, got damp {damp}, block {block}")
    if act_order and group_size is not None and not static_groups:
        raise UserError("GPTQ's act-order needs static groups here: a group is G consecutive inputs (no g_idx), so "
                        "its scale and offset cannot wait for its columns, which act-order scatters")
    W = weight.detach().to(torch.float64, copy=True)
    H = hessian.detach().to(W.device, torch.float64, copy=True)
    if not bool(torch.isfinite(W).all()):
        raise UserError("cannot quantize a weight holding NaN or inf")
    if not bool(torch.isfinite(H).all()):
        raise UserError("GPTQ's Hessian holds NaN or inf: the calibration activations overflowed")
    # an input no calibration token ever set (H_ii = 0) tells nothing of its weights: they are zeroed and the input
    # left out of the error feedback (H_ii = 1 keeps H invertible), as AutoGPTQ and gpt-fast do
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if group_size is None:
        groups = find_params(W)
    elif static_groups:  # every group's parameters from the original weights, before any column moves them
        groups = [find_params(W[:, g:g + group_size]) for g in range(0, K, group_size)]
    else:
        groups = []
    # act-order: the columns quantized in order of decreasing H_kk, the inputs whose error costs most first, while
    # the most columns remain to absorb it; W and H permuted alike, the levels put back in the original order
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    # damping (a fraction of the mean diagonal) keeps H's inverse well conditioned on few or collinear samples.
    # Where it is not enough (a near-singular X^T X whose rounding left an eigenvalue below -damp), 10x and 100x
    # are tried, as GPTQModel's damp_auto_increment does: the commands pass no damp, so a refusal could not be
    # answered; an H that even 100x leaves indefinite is no X^T X of real inputs, and is refused
    mean, eye = torch.diagonal(H).mean(), torch.eye(K, dtype=H.dtype, device=H.device)
    for d in (damp, 10 * damp, 100 * damp):
        try:
            # the upper Cholesky factor U of H^-1 (H^-1 = U^T U): row i of U, scaled by U[i, i], is how the error
            # of column i spreads over the columns after it once columns 0..i-1 are fixed (the paper's Lemma)
            U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H + d * mean * eye)), upper=True)
            break
        except torch.linalg.LinAlgError:
            continue
    else:
        raise UserError(f"GPTQ's Hessian is not positive definite even damped by {100 * damp:g} times its mean "
                        "diagonal: not the X^T X of real inputs (its calibration activations?)")
    if d != damp:
        note(f"GPTQ: a Hessian damped by {d:g} of its mean diagonal, not {damp:g} (near-singular: too few or too "
             "alike calibration samples?)")
    dynamic = group_size is not None and not static_groups
    # a group never straddles two lazy blocks: its parameters are fixed from weights every earlier column updated
    if dynamic:
        block = -(-block // group_size) * group_size
    column = perm.tolist() if perm is not None else range(K)  # the original column at each position
    levels = torch.zeros(N, K, dtype=torch.int64, device=W.device)
    params = groups if group_size is None else None
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        err = torch.zeros_like(W1)
        for i in range(i2 - i1):
            if dynamic and (i1 + i) % group_size == 0:
                params = find_params(W1[:, i:i + group_size])
                groups.append(params)
            elif group_size is not None and static_groups:
                params = groups[column[i1 + i] // group_size]  # its own group's, wherever act-order put it
            q, dq = quantize_column(W1[:, i], params)
            levels[:, i1 + i] = q
            err[:, i] = (W1[:, i] - dq) / U1[i, i]
            W1[:, i:] -= err[:, i:i + 1] * U1[i:i + 1, i:]  # this block's later columns now
        W[:, i2:] -= err @ U[i1:i2, i2:]  # the rest, lazily: one matmul a block (the paper's lazy batch updates)
    if perm is not None:
        levels[:, perm] = levels.clone()
    return levels, groups


def gptq_quantize_weight_int4(weight, hessian, group_size: int = 128, damp: float = 0.01, block: int = 128,
                              act_order: bool = False, static_groups=None):
    """quantize_weight_int4's (qweight, scale, offset), same dtypes, shapes and packing, chosen by GPTQ for a layer
    whose inputs have Hessian `hessian` [K, K] = 2 X^T X (X the calibration inputs, one row a token).

    The algorithm (the paper's): H is damped (damp times its mean diagonal added to it; 10x, then 100x, with a
    note, where that leaves it indefinite) and U is the upper Cholesky factor of its inverse. The inputs are
    quantized one column k at a time, left to right; when a group starts, its offset and scale are fixed from the
    group's current (error-updated) weights as quantize_weight_int4 fixes them (min, range / 15; AutoGPTQ's
    static_groups=False), the column is rounded to its nearest level, and its error e = (w_k - q_k) / U[k, k] is
    spread over the columns not yet quantized, W[:, j] -= e * U[k, j] for j > k: the least-squares correction of the
    remaining weights for the error made, so that X W^T changes as little as possible. The corrections are applied
    lazily, a block of columns at a time (block rounded up to whole groups, so a group's parameters always see every
    earlier column's correction: the textbook column-by-column result; AutoGPTQ reads a group straddling its block
    boundary before that block's corrections). Inputs whose H_ii is 0 (never active in the calibration data) get
    their weights zeroed. With H = identity no correction moves any weight: round-to-nearest. float64 on the
    weight's device.

    act_order (AutoGPTQ's desc_act): the columns are quantized in order of decreasing H_kk instead, the inputs whose
    errors cost the most first, while the most columns remain to absorb them (W and H permuted alike before the
    Cholesky, the levels put back in the original column order). Why static groups: AutoGPTQ's desc_act alone
    makes a group of G columns consecutive in act-order's order and records each input's group in a g_idx; the
    files and kernels here have no g_idx, a group is G consecutive inputs of the original order, and act-order
    scatters those through its order, so their shared offset and scale must be fixed before the first of them is
    rounded. Hence AutoGPTQ's static_groups=True: every group's offset and scale fixed up front from the original
    weights (dead inputs zeroed first), each column rounded against its own group's wherever the order puts it
    (what the group gives up: parameters fitted to its error-updated weights). static_groups (default:
    act_order) also runs without act-order: the columns left to right, the groups fixed up front; act_order with
    static_groups=False is refused. With a diagonal H (no input's error says anything of another's) either is
    round-to-nearest, levels, scales and offsets."""
    if weight.dim() == 2:
        check_group_size(weight.shape[1], group_size)
    static_groups = act_order if static_groups is None else static_groups

    def find_params(g):
        lo, hi = g.amin(dim=1).float(), g.amax(dim=1).float()
        scale, bad = _int4_scale(lo, hi)
        if bool(bad.any()):
            raise UserError("cannot int4-quantize: a group's range overflows fp32 (an inf scale)")
        return scale.double(), lo.double()  # the fp32 values the file stores: the levels are rounded against them

    def quantize_column(w, params):
        scale, offset = params
        q = torch.round((w - offset) / scale).clamp_(0, INT4_LEVELS)
        return q.long(), q * scale + offset

    levels, groups = _gptq(weight, hessian, damp, block, group_size, find_params, quantize_column, act_order,
                           static_groups)
    scale = torch.stack([s for s, _ in groups], dim=1).float()
    offset = torch.stack([o for _, o in groups], dim=1).float()
    return pack_int4(levels), scale, offset


def gptq_quantize_weight(weight, hessian, damp: float = 0.01, block: int = 128, act_order: bool = False):
    """quantize_weight's (q int8 [N, K], scale fp32 [N]) by GPTQ (gptq_quantize_weight_int4's loop): each row's
    scale fixed up front from the row (its largest |weight| / 127, dead inputs zeroed first), then the columns
    rounded one at a time with their error spread over the columns after them (levels clamped to -127..127: a
    corrected weight may pass the row's largest). act_order: the columns in order of decreasing H_kk; the scale,
    a row's, is static already, so that is the whole of it."""
    def find_params(w):
        return _int8_scale(w.abs().amax(dim=1).float()).double()

    def quantize_column(w, scale):
        q = torch.round(w / scale).clamp_(-QMAX, QMAX)
        return q.long(), q * scale

    levels, scale = _gptq(weight, hessian, damp, block, None, find_params, quantize_column, act_order)
    return levels.to(torch.int8), scale.float()


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
        # the stored matrix's inputs: x itself, or (Int4Linear with in_perm) x's columns gathered into its order;
        # the LoRA update below reads x as it is, its A being in the inputs' own order
        xs = self._inputs(x)
        if self.use_triton:
            # act's approximate names its epilogue: GELU's "none" (erf) or "tanh", ReLU2's "relu2"
            activation = {"none": "gelu_erf", "relu2": "relu2"}.get(act.approximate, "gelu_tanh") if fused else None
            y = self._triton(xs, activation)
        else:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            y = F.linear(xs, self._stored().to(x.dtype), bias)  # under autocast F.linear casts both, as nn.Linear's
            if fused:
                y = act(y)
        if self.lora is not None:
            y = y + self.lora.branch(x)
        return y if act is None or fused else act(y)

    def _inputs(self, x):
        """What the stored matrix multiplies: x (Int4Linear's act-order layers gather its columns)."""
        return x

    def _stored(self):
        """The matrix as stored, for _inputs(x): dequantize()'s (Int4Linear's act-order layers: its columns in
        in_perm's order)."""
        return self.dequantize()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(QuantLinear):
    """y = x @ (q * scale[:, None])^T + bias, q int8 [out, in], one fp32 scale a row. Triton twin:
    kernels/quant.py `int8_linear`.

    group_size (None: a scale a row): a scale a group of group_size consecutive inputs of a row instead, scale fp32
    [out, in / group_size], W[n, k] = q[n, k] * scale[n, k // group_size]: a GPTQ 8-bit folder's groups
    (train/hf_quant.py), kept 8-bit. Its groups are int4's: one of GROUP_SIZES dividing in_features."""

    mode = "int8"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=torch.float32, group_size: int | None = None):
        if group_size is not None:
            try:
                check_group_size(in_features, group_size)
            except GroupSizeError as e:  # (check_group_size speaks of int4, whose groups these are)
                raise GroupSizeError(f"int8 group scales: {e}") from None
        super().__init__(in_features, out_features, bias, device, dtype)
        self.group_size = group_size
        shape = (out_features,) if group_size is None else (out_features, in_features // group_size)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(shape, dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, device=None, hessian=None, act_order: bool = False) -> "Int8Linear":
        """linear quantized; on device when given (its float weight copied there alone, then freed), else on its own;
        by GPTQ with its inputs' hessian when given (gptq_quantize_weight, act_order its), else rounded to nearest."""
        w = linear.weight if device is None else linear.weight.detach().to(device)
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, w.device, w.dtype)
        new.qweight, new.scale = (quantize_weight(w) if hessian is None else
                                  gptq_quantize_weight(w, hessian, act_order=act_order))
        new._copy_bias(linear, w.device)
        return new

    def dequantize(self):
        """The fp32 matrix q * scale this layer multiplies by: [out, in] (each group's scale over its inputs)."""
        if self.group_size is None:
            return self.qweight.float() * self.scale[:, None]
        N = self.out_features
        return (self.qweight.float().view(N, -1, self.group_size) * self.scale[:, :, None]).view(N, -1)

    def _triton(self, x, activation):
        from tritongpt.kernels.quant import int8_linear

        return int8_linear(x, self.qweight, self.scale, self.bias, activation)

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.group_size is None else f", group_size={self.group_size}")


class Int4Linear(QuantLinear):
    """y = x @ W^T + bias with W[n, k] = q[n, k] * scale[n, g] + offset[n, g], g = k // group_size: q in 0..15 packed
    two to a byte (qweight uint8 [out, in / 2]: an even k's q in the low nibble, the odd k after it in the high),
    scale and offset fp32 [out, in / group_size]. Triton twin: kernels/quant.py `int4_linear`.

    in_perm (int64 [in], None unless set_in_perm): a GPTQ act-order layer's (desc_act; train/hf_quant.py), whose
    groups are inputs scattered over x. Its columns are stored sorted by group (stored column j is input
    in_perm[j]), so that each group is consecutive as the kernel reads them, and forward gathers x's columns into
    that order first (both paths), as vLLM's and exllama's GPTQ kernels do. dequantize() gives the matrix in the
    inputs' own order: whatever uses it on x as it is (merge, export, LoRA, distillation) needs no permutation."""

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
        self.register_buffer("in_perm", None)  # (a buffer once set: saved, loaded and moved with the layer)

    def set_in_perm(self, perm) -> None:
        """The stored columns' inputs (see the class): a permutation of 0..in_features - 1, refused otherwise."""
        check_in_perm(perm, self.in_features, "in_perm")
        # a copy of its own: the parts of a fused GPTQ layer (int4_rows: q/k/v, gate/up) are handed one order, and
        # layers sharing one tensor are saved under one name alone (safetensors' save_model keeps one of shared
        # tensors), so the file's other parts would load without their gather
        self.in_perm = perm.to(self.qweight.device, torch.int64, copy=True)

    @classmethod
    def from_linear(cls, linear: nn.Linear, device=None, group_size: int = 128, hessian=None,
                    act_order: bool = False) -> "Int4Linear":
        """linear quantized (Int8Linear.from_linear's device=, hessian= and act_order=: GPTQ, act-order with static
        groups)."""
        w = linear.weight if device is None else linear.weight.detach().to(device)
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, w.device, w.dtype, group_size)
        new.qweight, new.scale, new.offset = (quantize_weight_int4(w, group_size) if hessian is None else
                                              gptq_quantize_weight_int4(w, hessian, group_size, act_order=act_order))
        new._copy_bias(linear, w.device)
        return new

    def dequantize(self):
        """The fp32 matrix q * scale + offset this layer multiplies x by: [out, in], in the inputs' own order (an
        act-order layer's stored columns put back where in_perm says they came from)."""
        w = self._stored()
        if self.in_perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.in_perm] = w
        return out

    def _stored(self):
        return dequantize_int4(self.qweight, self.scale, self.offset, self.group_size)

    def _inputs(self, x):
        return x if self.in_perm is None else x.index_select(-1, self.in_perm)

    def _triton(self, x, activation):
        from tritongpt.kernels.quant import int4_linear

        return int4_linear(x, self.qweight, self.scale, self.offset, self.bias, activation)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}" + (
            ", act-order (in_perm)" if self.in_perm is not None else "")


def check_in_perm(perm, in_features: int, what) -> None:
    """A UserError naming `what` unless perm is a 1-D integer permutation of 0..in_features - 1 (an Int4Linear's
    in_perm: any other index would gather some input twice and drop another, a wrong layer without an error)."""
    if not isinstance(perm, torch.Tensor) or perm.dim() != 1 or perm.is_floating_point() or perm.is_complex() \
            or perm.dtype == torch.bool or perm.numel() != in_features or \
            not torch.equal(perm.sort().values.long().cpu(), torch.arange(in_features)):
        got = (f"{str(perm.dtype).removeprefix('torch.')} {tuple(perm.shape)}" if isinstance(perm, torch.Tensor)
               else type(perm).__name__)
        raise UserError(f"{what} is not a permutation of the layer's {in_features} inputs (got {got}): each input's "
                        "column must be gathered exactly once")


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
    _mark_quantized(model, head, made, n)


def _mark_quantized(model, head: bool, made, n: int) -> None:
    """_swap_linears' marks (made: a QuantLinear of the model, n: how many it has) and the kernel path."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.use_triton = "mlp" in model.kernels
    model.quantized, model.quantized_linears, model.quantized_head = made.mode, n, head
    model.quantized_group_size = getattr(made, "group_size", None)
    model.quantized_layers = None  # (mixed_layout's layers of another layout than the marks say)
    # quantized here (`tritongpt quantize`, QLoRA's --quantize); a folder's reader marks its own after (model_with_int4)
    model.quantized_from = None


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
                except GroupSizeError as e:
                    raise GroupSizeError(f"{name}: {e}") from None


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


class _Stop(Exception):
    """Raised by the first block's forward pre-hook once it has its arguments: the model runs no further."""


def _input_hessians(linears: dict, run, rows: int, calls: int | None = None) -> dict:
    """{name: H [K, K] fp64} for each nn.Linear of linears ({name: module}): 2 X^T X / rows over its inputs X while
    run() runs the model (or a block) on every calibration token (rows of them). Matrices that read one tensor (a
    true-sequential stage: q, k and v) share its X^T X, made once. calls: a forward calls these matrices that many
    times in all; after the last of them _Stop is raised (run catches it): the rest of the block is not needed."""
    sums = {name: None for name in linears}
    last = [None, None, 0]  # the last input read (and its version: no in-place change since), its X^T X; calls

    def hook(name):
        def collect(module, args, output):
            x = args[0]
            if last[0] is None or last[0][0] is not x or last[0][1] != x._version:
                flat = x.detach().reshape(-1, module.in_features).to(torch.float64)
                last[0], last[1] = (x, x._version), flat.T @ flat
            sums[name] = last[1] if sums[name] is None else sums[name] + last[1]
            last[2] += 1
            if calls is not None and last[2] == calls:
                last[2] = 0
                raise _Stop
        return collect

    handles = [m.register_forward_hook(hook(name)) for name, m in linears.items()]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
        last[0] = last[1] = None
    return {name: 2 * s / rows for name, s in sums.items()}


def _block_stages(block, linears: dict, args, calls: dict | None = None, method: str = "GPTQ") -> list:
    """[[name, ...], ...]: the nn.Linears of block (linears, {name: module}) in the stages true-sequential GPTQ
    quantizes them in, found by running block(*args) once (a calibration batch's arguments): in the order the block
    first calls them, the Linears that read one tensor one stage (GPT-2's q, k and v; SwiGLU's gate and up; a
    parallel block's attention and MLP on one norm's output). Whatever a model family's block does, a stage's inputs
    depend only on the stages before it. calls (a dict), filled: {name: how many times the forward calls it}.
    method: the caller's name (GPTQ, AWQ) for the refusal of a Linear the block never calls."""
    seen = []  # [(input, [names])]: each input kept alive, so no later tensor reuses its memory and seems the same
    calls = {} if calls is None else calls

    def hook(name):
        def record(module, args):
            x = args[0]
            calls[name] = calls.get(name, 0) + 1
            if any(name in names for _, names in seen):  # called again: its stage is where it was first
                return
            for t, names in seen:
                if t is x or (t.data_ptr() == x.data_ptr() and t.shape == x.shape and t.stride() == x.stride()):
                    names.append(name)
                    return
            seen.append((x, [name]))
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in linears.items()]
    try:
        with torch.no_grad():
            block(*args)
    finally:
        for h in handles:
            h.remove()
    stages = [names for _, names in seen]
    unused = [name for name in linears if not any(name in names for names in stages)]
    if unused:
        raise UserError(f"{method} cannot calibrate {', '.join(unused)}: the block never calls it")
    return stages


def _first_block_inputs(model, calibration, batch_size: int, doc_ids=None) -> list:
    """The arguments GPTModel.hidden calls its first block with, a calibration batch each ([x, cache, doc_ids,
    mlp_out, rope_pos, rope_len]: every block is called alike, so the blocks can be run one at a time on them, each
    block's output the next one's x and mlp_out)."""
    inputs = []

    def grab(module, args):
        inputs.append(list(args))
        raise _Stop

    handle = model.trf_blocks[0].register_forward_pre_hook(grab)
    try:
        with torch.no_grad():
            for i in range(0, len(calibration), batch_size):
                try:
                    model(calibration[i:i + batch_size], doc_ids=None if doc_ids is None else doc_ids[i:i + batch_size])
                except _Stop:
                    pass
    finally:
        handle.remove()
    return inputs


def _check_calibration(model, calibration, doc_ids, method: str) -> None:
    """A UserError naming what is wrong with a calibration method's (GPTQ's, AWQ's) token ids or their doc_ids."""
    if not torch.is_tensor(calibration) or calibration.dim() != 2 or calibration.is_floating_point() \
            or calibration.numel() == 0:
        raise UserError(f"{method}'s calibration must be token ids [n_samples, T] (at least one sample of one token), "
                        "got " + (f"{tuple(calibration.shape)} {calibration.dtype}" if torch.is_tensor(calibration)
                                  else type(calibration).__name__))
    if calibration.shape[1] > model.config.context_length:
        raise UserError(f"{method}'s calibration samples are {calibration.shape[1]} tokens, longer than the model's "
                        f"context ({model.config.context_length})")
    if doc_ids is not None and (not torch.is_tensor(doc_ids) or doc_ids.shape != calibration.shape):
        raise UserError(f"{method}'s doc_ids must be calibration's shape {tuple(calibration.shape)}, got "
                        + (str(tuple(doc_ids.shape)) if torch.is_tensor(doc_ids) else type(doc_ids).__name__))


def quantize_gptq(model, mode: str, calibration, head: bool = True, group_size: int = 128, batch_size: int = 8,
                  doc_ids=None, act_order: bool = False, true_sequential: bool = True):
    """quantize_int8 / quantize_int4's swap, each matrix by GPTQ (gptq_quantize_weight / gptq_quantize_weight_int4)
    with the Hessian of its inputs on calibration (token ids [n_samples, T], T at most the context), block by block
    (the paper's sequential mode, as AutoGPTQ's default): a block's matrices see the inputs the model gives them with
    every block before it already quantized, so each corrects the error the earlier ones left, not an error it never
    meets. true_sequential (AutoGPTQ's, its default too) carries that inside the block: its matrices are quantized
    in stages in the order the block uses them (_block_stages: GPT-2's q, k, v; then the attention's output
    projection; then fc1; then fc2), each stage's Hessians collected with the block's earlier stages already
    quantized (the block re-run on its kept inputs a stage), so the output projection's Hessian is of the quantized
    q, k, v's attention output; without it every matrix of a block sees the float block's activations (one run).
    act_order: each matrix's columns in order of decreasing Hessian diagonal, with static groups at int4
    (gptq_quantize_weight_int4). The LM head, with head, last, on the quantized blocks' output. The model runs on
    the reference path while it calibrates (a hook sees each nn.Linear's input; the Triton MLP reads the weights
    itself), in place, on its device; returns it in eval mode. doc_ids [n_samples, T] (data.document_ids of
    calibration): a model trained with its documents apart (`pretrain --document-mask`) calibrated as it runs, each
    document from position 0 and attending to itself alone: the activations it was trained on, not ones it never
    meets."""
    if mode not in ("int8", "int4"):
        raise UserError(f"quantization must be int8 or int4, got {mode!r}")
    _check_quantizable(model, mode, group_size if mode == "int4" else None)
    _check_calibration(model, calibration, doc_ids, "GPTQ")

    def make(name, linear, hessian):
        try:
            if mode == "int4":
                return Int4Linear.from_linear(linear, group_size=group_size, hessian=hessian, act_order=act_order)
            return Int8Linear.from_linear(linear, hessian=hessian, act_order=act_order)
        except UserError as e:  # which of the model's matrices
            raise UserError(f"{name}: {e}") from None

    kernels, was_training, swapped = model.kernels, model.training, []
    model.eval().set_kernels("reference")
    calibration = calibration.to(model.tok_emb.weight.device)
    doc_ids = None if doc_ids is None else doc_ids.to(calibration.device)

    def swap(parent, attr, new):
        swapped.append((parent, attr, getattr(parent, attr)))
        setattr(parent, attr, new)
        return new

    try:
        # Each block runs on its inputs as the quantized blocks before it left them, kept from the last block's run:
        # one pass a block for its Hessians and one to move its inputs on, not the whole prefix again each time
        # (AutoGPTQ's way; [x, mlp_out] a batch, 2 x n_samples x T x n_embd floats).
        inputs = _first_block_inputs(model, calibration, batch_size, doc_ids)

        def run_block(block, advance=False):
            for args in inputs:
                try:
                    x, mlp_out = block(*args)
                except _Stop:  # (_input_hessians': the stage's matrices have all read their inputs)
                    continue
                if advance:
                    args[0], args[3] = x, mlp_out
        for b, block in enumerate(model.trf_blocks):
            linears = {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}
            calls = {}
            stages = _block_stages(block, linears, inputs[0], calls) if true_sequential else [list(linears)]
            for stage in stages:  # each stage's Hessians on the block with its earlier stages quantized, the block
                # run up to the stage's last matrix only (true-sequential; every batch calls the matrices alike)
                hessians = _input_hessians({name: linears[name] for name in stage}, lambda: run_block(block),
                                           calibration.numel(),
                                           sum(calls[name] for name in stage) if true_sequential else None)
                for name in stage:
                    parent, _, attr = name.rpartition(".")
                    made = swap(block.get_submodule(parent), attr,
                                make(f"trf_blocks.{b}.{name}", linears[name], hessians[name]))
            if b + 1 < len(model.trf_blocks) or head:
                with torch.no_grad():
                    run_block(block, advance=True)  # the quantized block's output: the next block's input
        if head:  # its input: the final norm of the last block's output (GPTModel.hidden's end, _head_input's
            hessian = 0  # scale), summed here: the logits themselves are not needed
            with torch.no_grad():
                for x, _, _, mlp_out, _, _ in inputs:
                    h = model.final_norm(x) if mlp_out is None else model.final_norm.add_and_norm(x, mlp_out)[1]
                    h = model._head_input(h).reshape(-1, h.shape[-1]).to(torch.float64)
                    hessian = hessian + h.T @ h
            made = swap(model, "out_head", make("out_head", model.out_head, 2 * hessian / calibration.numel()))
    except BaseException:  # the float model back as it was: never a half-quantized one
        for parent, attr, old in reversed(swapped):
            setattr(parent, attr, old)
        model.train(was_training)
        raise
    finally:
        model.set_kernels(kernels, check_device=False)
    _mark_quantized(model, head, made, len(swapped))
    return model


# -- AWQ ---------------------------------------------------------------------------------------------------------
# AWQ (Lin et al. 2023; llm-awq, AutoAWQ's auto_scale and auto_clip) keeps round-to-nearest's rounding and int4
# layout, and first scales each matrix's input channels: W x = (W diag(s)) (x / s). A channel whose activations are
# large (salient) gets s > 1: its weights a larger share of their group's range, so a smaller rounding error where it
# costs the most. x / s is folded into the op that makes x (a norm's weight and bias, a gated MLP's up rows, the value
# rows), so the float model computes what it did. Then each row-group's range is clipped where that cuts its output
# error (one outlier weight costs every other weight of its group resolution). What comes out is an ordinary int4
# file: every kernel and command runs it unchanged.

AWQ_GRID = 20  # the scale search's alphas 0, 1/20, ..., 19/20 (AutoAWQ's n_grid)
AWQ_CLIP_RATIOS = tuple(1 - i / 20 for i in range(11))  # auto_clip's shrinks of a group's largest |w|: 1.0 ... 0.5
AWQ_NO_CLIP = ("att.W_query", "att.W_key")  # as AutoAWQ: their error reaches the model through softmax(q k^T) only,
# where a row's own output error says little


def _channel_params(m):
    """(weight, bias) of a module whose output channels are its weight's first dimension (a Linear's rows, a norm's
    weight) and its bias's, one to one; None for a module without a weight of its own."""
    w = m._parameters.get("weight")
    if w is None or w.dim() not in (1, 2):
        return None
    b = m._parameters.get("bias")
    return None if b is not None and tuple(b.shape) != (w.shape[0],) else (w, b)


def _scale_channels(m, r, divide: bool = False):
    """m's output channels times r [M] (its weight's rows or entries, and its bias), or divided by it, in place (in
    their dtype: a float64 model's fold is float64's)."""
    with torch.no_grad():
        for p in _channel_params(m):
            if p is not None:
                r_ = r.to(p.device, p.dtype).view(-1, *[1] * (p.dim() - 1))
                p.div_(r_) if divide else p.mul_(r_)


def _stage_input(block, inputs, linear, reduce=None):
    """The tensor linear reads as the block runs on each batch of inputs (its first call a forward), [tokens, K];
    the rest of the block is not run. reduce: each batch's [tokens, K] summed into reduce(x) instead (a tuple of
    sums), returned in its place."""
    xs = []

    def grab(module, args):
        x = args[0].detach().reshape(-1, module.in_features)
        if reduce is None:
            xs.append(x)
        else:
            xs[:] = [a + b for a, b in zip(xs, reduce(x))] if xs else list(reduce(x))
        raise _Stop

    handle = linear.register_forward_pre_hook(grab)
    try:
        with torch.no_grad():
            for args in inputs:
                try:
                    block(*args)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return torch.cat(xs) if reduce is None else tuple(xs)


def _abs_and_gram(x):
    """(sum |x| over the tokens [K], X^T X [K, K]), float64: what AWQ's searches read of a tensor x [tokens, K]."""
    x = x.double()
    return x.abs().sum(0), x.T @ x


def _nearest(values, r):
    """For each of values [K], the index of r's [M] entry nearest it, by a sort and a binary search: a [K, M] table
    of differences would be K M float64s, gigabytes at an MLP's widths (27648^2: 6 GB, twice), on the device."""
    rs, order = torch.sort(r)
    i = torch.searchsorted(rs, values).clamp(max=len(rs) - 1)
    below = (i - 1).clamp(min=0)
    return order[torch.where((values - rs[below]).abs() < (rs[i] - values).abs(), below, i)]


def _awq_fold(block, args, stage: list):
    """Where AWQ's scale for stage (names of block's Linears that read one tensor X, K wide) folds exactly: (the name
    of the module whose output channels make X's, cmap [K]: X's channel c is that module's channel cmap[c]), or None.

    Found by trying, on a float64 copy of the block and the first sample of a calibration batch (args), each module
    with a weight of its own that ran before the stage, the nearest first: its output channels times a random r must
    make X times r[cmap] (X linear in them: a norm's weight and bias; a gated MLP's up rows, act(g) * u; the value
    rows under attention's weighted sum; under GQA a KV head's channels read by several query heads: cmap many to
    one), and the fold itself, those channels divided by a random t and the stage's columns times t[cmap], must
    leave the block's output as it was (what fails: a GELU between, as GPT-2's fc1 -> fc2; a norm whose output
    something else reads too; the residual stream itself, OLMo 2's blocks without input norms). Found by what the
    block computes, not by its modules' names: every family's block is tried alike."""
    probe = copy.deepcopy(block).double()
    # one sample (x, mlp_out, doc_ids, RoPE's positions [B, T]; not positions [T]): the fold is exact or not on any
    args = [a[:1] if torch.is_tensor(a) and a.dim() >= 2 else a for a in args]
    args = [a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    first, linears = probe.get_submodule(stage[0]), [probe.get_submodule(name) for name in stage]
    order, seen = [], {}

    def ran(name):
        return lambda m, a, out: order.append(name) if name not in order else None

    def grab(m, a):
        seen.setdefault("x", (a[0].detach().clone(), list(order)))  # X, and the modules that ran before it

    hooks = [m.register_forward_hook(ran(name)) for name, m in probe.named_modules()
             if _channel_params(m) is not None and name not in stage]
    hooks.append(first.register_forward_pre_hook(grab))
    try:
        with torch.no_grad():
            want = probe(*args)
    finally:
        for h in hooks:
            h.remove()
    (x, before), K = seen["x"], first.in_features
    x, dev = x.reshape(-1, K), x.device
    top, channels = x.abs().argmax(0), torch.arange(K, device=dev)  # each channel's largest activation: its ratio's
    peak = x[top, channels]
    if bool((peak == 0).any()):  # a channel never set tells nothing of which channel makes it
        return None
    g = torch.Generator().manual_seed(0)

    def close(a, b):
        return float((a - b).abs().max()) <= 1e-9 * float(b.abs().max())

    for name in reversed(before):
        m = probe.get_submodule(name)
        kept = [p.detach().clone() if p is not None else None for p in _channel_params(m)]
        M = kept[0].shape[0]
        r = 1 + torch.rand(M, generator=g, dtype=torch.float64).to(dev)
        _scale_channels(m, r)
        x2 = _stage_input(probe, [args], first).reshape(-1, K)
        cmap = _nearest(x2[top, channels] / peak, r)
        ok = close(x2, x * r[cmap])
        if ok:  # the fold itself, with other scales: the block's output unchanged
            t = 0.5 + torch.rand(M, generator=g, dtype=torch.float64).to(dev)
            for p, k in zip(_channel_params(m), kept):
                if p is not None:
                    p.data.copy_(k)
            _scale_channels(m, t, divide=True)
            columns = [lin.weight.detach().clone() for lin in linears]
            with torch.no_grad():
                for lin in linears:
                    lin.weight.mul_(t[cmap])
                got = probe(*args)
                for lin, w in zip(linears, columns):
                    lin.weight.copy_(w)
            ok = all(close(a, b) for a, b in zip(got, want) if torch.is_tensor(b))
        for p, k in zip(_channel_params(m), kept):
            if p is not None:
                p.data.copy_(k)
        if ok:
            return name, cmap
    return None


def _awq_search(x_mean, gram, weights: list, group_size: int, cmap, M: int):
    """AWQ's scale search for the Linears' weights (the stage's, [N_i, K]) reading inputs x with mean |x| x_mean [K]
    and X^T X / tokens gram [K, K]: (t [M], alpha, its error, round-to-nearest's error). For alpha in 0, 1/20, ...,
    19/20: t = x_mean^alpha (over the channels cmap gives one producer channel, their mean), clamped at 1e-4 and
    divided by sqrt(max t min t); s = t[cmap] (the columns' scales); the weights W s rounded (quantize_weight_int4,
    the file's quantizer), divided by s again; the error the mean square of x W_q^T - x W^T over the tokens and the
    stage's outputs, tr(D gram D^T) / N with D = W_q - W: the same sum as over every token, at K x K a row. alpha 0
    is s = 1, round to nearest: the best is never worse on this objective."""
    W = torch.cat([w.detach().float() for w in weights])
    count = torch.bincount(cmap, minlength=M)
    x_mean = torch.zeros(M, dtype=torch.float64, device=W.device).index_add_(0, cmap, x_mean) / count.clamp(min=1)
    x_mean = torch.where(count > 0, x_mean, x_mean[count > 0].mean()).float()  # (a channel nothing reads: the mean)
    best = None
    for i in range(AWQ_GRID):
        t = x_mean.pow(i / AWQ_GRID).clamp(min=1e-4)
        t = t / (t.max() * t.min()).sqrt()
        s = t[cmap]
        D = (dequantize_int4(*quantize_weight_int4(W * s, group_size), group_size) / s - W).double()
        err = float(((D @ gram) * D).sum()) / len(W)
        if i == 0:
            rtn = err
        if best is None or err < best[2]:
            best = (t, i / AWQ_GRID, err)
    return (*best, rtn)


def _awq_clip(weight, gram, group_size: int):
    """auto_clip: the largest |w| [N, K / G] each row-group of weight [N, K] keeps, of AWQ_CLIP_RATIOS times its own:
    the one whose clipped (w clamped to +-it) and rounded weights (the file's quantizer: the clamped group's own
    minimum and maximum its ends) give the group's share of the outputs, x_g w_g^T, nearest the float's in mean
    square over the calibration tokens: d_g gram_gg d_g^T (gram: X^T X / tokens [K, K], the group's diagonal
    block; d_g the group's rounding change), every token at G x G a group (AutoAWQ samples 512 tokens instead).
    Ratio 1 is round to nearest."""
    N, K = weight.shape
    ng = K // group_size
    w = weight.detach().float().view(N, ng, group_size)
    blocks = torch.stack([gram[g * group_size:(g + 1) * group_size, g * group_size:(g + 1) * group_size]
                          for g in range(ng)])  # [ng, G, G]
    amax = w.abs().amax(-1)
    best, best_err = amax.clone(), torch.full(amax.shape, float("inf"), dtype=torch.float64, device=w.device)
    for ratio in AWQ_CLIP_RATIOS:
        cw = torch.clamp(w, -amax[..., None] * ratio, amax[..., None] * ratio).view(N, K)
        d = (dequantize_int4(*quantize_weight_int4(cw, group_size), group_size).view(N, ng, group_size) - w).double()
        err = torch.einsum("ngk,gkl,ngl->ng", d, blocks, d)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, amax * ratio, best)
    return best


def quantize_awq(model, mode: str, calibration, head: bool = True, group_size: int = 128, batch_size: int = 8,
                 doc_ids=None, report: dict | None = None, fold_only: bool = False):
    """quantize_int4's swap with each matrix by AWQ (Lin et al. 2023, as AutoAWQ's auto_scale and auto_clip) on
    calibration (token ids [n_samples, T]; doc_ids as quantize_gptq's), block by block on the inputs kept from the
    block before (_first_block_inputs, as GPTQ's path). In each block, for each stage of Linears that read one tensor
    (_block_stages): the per-channel scale s of AWQ_GRID alphas whose rounded W s, divided by s, gives the stage's
    outputs nearest the float's (_awq_search), folded where it folds exactly (_awq_fold: the Linears' columns times
    s, the op making their input divided by it: the float model unchanged), else left out (that stage clip only:
    GPT-2's fc2 after its GELU; AutoAWQ's ScaledActivation would add a tensor to the layout); then every Linear but
    q and k clipped (_awq_clip) and rounded to nearest. The LM head, with head, rounded to nearest (AutoAWQ leaves it
    float: --no-head): a tied head is the embedding, nothing folds into it.

    The next block's inputs are the float block's outputs (the scaled float block computes the float one's), as
    llm-awq's and AutoAWQ's: AWQ's search measures each stage against the float model's outputs on the float model's
    activations, and its x_mean is the float model's saliency; it also means one run of the block gives the inputs.
    report (a dict), filled: "stages", one {"block", "stage", "fold", "alpha", "error", "rtn_error"} a stage
    ("fold": the module the scale went into, None where none folds), "unscaled" the stages no scale folds into.
    fold_only: the scales folded into the float model and nothing quantized (a test's: the function unchanged).
    int4 only: AWQ's scales serve groups; int8's row scale is refused. In place, on the model's device; the model on
    the reference path while it calibrates; returns it in eval mode."""
    if mode != "int4":
        raise UserError(f"AWQ quantizes to int4 here (AutoAWQ's 4-bit groups), not {mode}: use --method gptq or rtn "
                        "for int8")
    _check_quantizable(model, mode, group_size)
    _check_calibration(model, calibration, doc_ids, "AWQ")
    report = {} if report is None else report
    report.update(stages=[], unscaled=[])
    kernels, was_training, swapped, backups = model.kernels, model.training, [], []
    model.eval().set_kernels("reference")
    calibration = calibration.to(model.tok_emb.weight.device)
    doc_ids = None if doc_ids is None else doc_ids.to(calibration.device)
    try:
        inputs = _first_block_inputs(model, calibration, batch_size, doc_ids)
        for b, block in enumerate(model.trf_blocks):
            # the float block kept (on the CPU) until the whole model is done: a refusal puts it back as it was
            backups.append((block, {k: v.detach().to("cpu", copy=True) for k, v in block.state_dict().items()}))
            linears = {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}
            for stage in _block_stages(block, linears, inputs[0], method="AWQ"):
                fold = _awq_fold(block, inputs[0], stage)
                said = {"block": b, "stage": stage, "fold": None if fold is None else fold[0]}
                if fold is None:
                    report["unscaled"].append(f"trf_blocks.{b}.{'/'.join(stage)}")
                else:
                    producer, cmap = block.get_submodule(fold[0]), fold[1]
                    M = _channel_params(producer)[0].shape[0]
                    abs_sum, gram = _stage_input(block, inputs, linears[stage[0]], _abs_and_gram)
                    rows = calibration.numel()
                    t, said["alpha"], said["error"], said["rtn_error"] = _awq_search(
                        abs_sum / rows, gram / rows, [linears[name].weight for name in stage], group_size, cmap, M)
                    _scale_channels(producer, t, divide=True)
                    with torch.no_grad():
                        for name in stage:
                            linears[name].weight.mul_(t[cmap].to(linears[name].weight.dtype))
                report["stages"].append(said)
            clipped = {} if fold_only else {name: m for name, m in linears.items() if name not in AWQ_NO_CLIP}

            def advance():  # the (scaled) float block's output: the next block's input
                for args in inputs:
                    args[0], args[3] = block(*args)

            # the clipped matrices' inputs' X^T X (GPTQ's Hessians, 2 X^T X / tokens: a factor the argmin ignores)
            # as the block runs, once for those that read one tensor
            grams = _input_hessians(clipped, advance, calibration.numel())
            for name, m in clipped.items():
                keep = _awq_clip(m.weight, grams.pop(name), group_size)
                with torch.no_grad():
                    w = m.weight.view(m.out_features, -1, group_size)
                    keep = keep.to(w.dtype)[..., None]
                    w.copy_(torch.clamp(w, -keep, keep))
            if fold_only:
                continue
            for name, m in linears.items():
                parent, _, attr = name.rpartition(".")
                swapped.append((block.get_submodule(parent), attr, m))
                try:
                    made = Int4Linear.from_linear(m, group_size=group_size)
                except UserError as e:
                    raise UserError(f"trf_blocks.{b}.{name}: {e}") from None
                setattr(block.get_submodule(parent), attr, made)
        if head and not fold_only:
            swapped.append((model, "out_head", model.out_head))
            model.out_head = made = Int4Linear.from_linear(model.out_head, group_size=group_size)
    except BaseException:  # the float model back as it was: never a half-quantized or half-scaled one
        for parent, attr, old in reversed(swapped):
            setattr(parent, attr, old)
        for block, state in backups:
            block.load_state_dict(state)
        model.train(was_training)
        raise
    finally:
        model.set_kernels(kernels, check_device=False)
    if report["unscaled"]:
        names = sorted({name.split(".", 2)[2] for name in report["unscaled"]})
        note(f"AWQ: no scale folds exactly into the input of {', '.join(names)} ({len(report['unscaled'])} stages: "
             "what makes it is not linear in its channels, or feeds more than them); clipped only")
    if fold_only:
        return model.train(was_training)
    _mark_quantized(model, head, made, len(swapped))
    return model


def quantize(model, mode: str, head: bool = True, device=None, group_size: int = 128, method: str = "rtn",
             calibration=None, doc_ids=None, act_order: bool = False, true_sequential=None, report=None):
    """quantize_int8 or quantize_int4 by name (the commands' --quantize); method "gptq": quantize_gptq on
    calibration (token ids [n_samples, T]; doc_ids, its documents; act_order, true_sequential: None for its
    default), "awq": quantize_awq on calibration (report, its dict), each on the model's own device (device= is
    round-to-nearest's)."""
    if method not in QUANTIZE_METHODS:
        raise UserError(f"the quantization method must be rtn, gptq or awq, got {method!r}")
    if method != "gptq" and (act_order or true_sequential is not None):
        raise UserError(f"{'act-order' if act_order else 'true sequential'} is GPTQ's: "
                        + ("round-to-nearest (method rtn) quantizes each weight on its own" if method == "rtn" else
                           "AWQ scales and clips each matrix's weights, then rounds them to nearest: no column order"))
    if report is not None and method != "awq":  # (filled by AWQ's search alone: an empty dict would say nothing ran)
        raise UserError(f"report= is AWQ's (its scales' search, stage by stage): method {method!r} fills none")
    if method in ("gptq", "awq"):
        name = method.upper()
        if calibration is None:
            raise UserError(f"{name} needs calibration token ids [n_samples, T]")
        want, have = None if device is None else torch.device(device), next(model.parameters()).device
        if want is not None and (want.type != have.type or want.index not in (None, have.index)):
            raise UserError(f"{name} quantizes on the model's own device ({next(model.parameters()).device}): move "
                            f"the model to {device} first")
        if method == "awq":
            return quantize_awq(model, mode, calibration, head, group_size, doc_ids=doc_ids, report=report)
        return quantize_gptq(model, mode, calibration, head, group_size, doc_ids=doc_ids, act_order=act_order,
                             **({} if true_sequential is None else {"true_sequential": true_sequential}))
    if calibration is not None or doc_ids is not None:
        raise UserError("calibration data is GPTQ's and AWQ's: round-to-nearest (method rtn) reads none")
    if mode == "int8":
        return quantize_int8(model, head, device)
    if mode == "int4":
        return quantize_int4(model, group_size, head, device)
    raise UserError(f"quantization must be int8 or int4, got {mode!r}")


def quantized_layout(model, mode: str = "int8", head: bool = True, group_size: int = 128,
                     int8_group_size: int | None = None):
    """model (a GPTModel, on the meta device) with each Linear quantize() would quantize replaced by an empty
    QuantLinear of its shape: what a quantized file's tensors load into (GPTModel.load). In place; returns it.
    group_size: int4's; int8_group_size: int8's, None for a scale a row (what quantize makes), else Int8Linear's
    group scales (a GPTQ 8-bit folder's, train/hf_quant.py). Each mode ignores the other's, as quantize does."""
    group_size = int8_group_size if mode == "int8" else group_size
    _check_quantizable(model, mode, group_size)

    def empty(linear):
        args = (linear.in_features, linear.out_features, linear.bias is not None, linear.weight.device,
                linear.weight.dtype)
        return Int4Linear(*args, group_size=group_size) if mode == "int4" else Int8Linear(*args, group_size=group_size)

    _swap_linears(model, head, empty)
    return model


def mixed_layout(model, layouts: dict):
    """quantized_layout with a mode and group size a layer: layouts {name of a blocks' Linear: (mode, group size)}
    (a GGUF Q4_K_M file's Q4_K linears int4 of group 32, its Q6_K ones int8 of group 16: gguf_import.py), every
    Linear of the blocks named. The model's marks (.quantized, .quantized_group_size) are the most layers' layout;
    .quantized_layers {name: (mode, group)} holds the others', which GPTModel.save records and load rebuilds. In
    place; returns it."""
    main = max(sorted(set(layouts.values())), key=list(layouts.values()).count)
    quantized_layout(model, main[0], head=False, group_size=main[1], int8_group_size=main[1])
    other = {n: lg for n, lg in layouts.items() if lg != main}
    swap_layers(model, other)
    return model


def swap_layers(model, layouts: dict) -> None:
    """A quantized layout's (meta, unfilled) QuantLinears in layouts ({name: (mode, group size)}) replaced by empty
    ones of that layout; recorded as model.quantized_layers (None where layouts is empty)."""
    for name, (mode, group) in layouts.items():
        old = model.get_submodule(name)
        if not isinstance(old, QuantLinear) or mode not in ("int8", "int4"):
            raise UserError(f"{name}: a {mode} layer of group {group} where the model has "
                            f"{type(old).__name__}: not a quantized layout this version reads")
        args = (old.in_features, old.out_features, old.bias is not None, old.qweight.device,
                torch.float32 if old.bias is None else old.bias.dtype)
        new = Int4Linear(*args, group_size=group) if mode == "int4" else Int8Linear(*args, group_size=group)
        new.use_triton = old.use_triton
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)
    model.quantized_layers = dict(layouts) or None


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
        model.quantized = model.quantized_linears = model.quantized_group_size = model.quantized_layers = None
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
