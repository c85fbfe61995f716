"""Weight-only quantized linear layers in Triton: int8 (W8A16), y = act(x @ (q * scale[:, None]).T + bias), and int4
with an fp32 scale and offset a group of G inputs (W4A16, `int4_linear`: after int8's text). The weights are frozen:
the backward gives x's gradient only (QLoRA's adapters train beside the quantized matrices; "Backward" below).

Reference module: `tritongpt.model.quant.Int8Linear` (dequantize the weight, then F.linear). The weight of an
nn.Linear, W [N, K], is stored as int8 q [N, K] plus one fp32 scale per output row, W ~= q * scale[:, None]
(symmetric, q in [-127, 127]: gpt-fast's "int8 weight-only"). Decoding a token is a matrix-vector product
that reads every weight once, so its time is the weight's bytes: one byte a weight instead of two (bf16).

The int8 kernel is the tiled matmul of Triton's 03-matrix-multiplication tutorial (kernels/mlp.py's, without its
prologues): each program computes a BLOCK_M x BLOCK_N tile of y, walking K in BLOCK_K steps; programs are
grouped (GROUP_M) so that neighbouring row-tiles reuse the same weight tiles from L2. Per K step:

  * the x tile [BLOCK_M, BLOCK_K] is loaded in the compute dtype, the q tile [BLOCK_K, BLOCK_N] (q^T, read
    along K at unit stride: nn.Linear's layout) as int8, and q is converted to the compute dtype in registers.
    The conversion is exact: every integer in [-127, 127] is a bf16, fp16 and fp32 value;
  * tl.dot(x, q) adds into an fp32 accumulator that stays in registers for the whole K loop.

The scale is applied once, in the epilogue: sum_k x[m, k] q[n, k] scale[n] = scale[n] * sum_k x[m, k] q[n, k],
so it factors out of the K sum. acc * scale[n] (fp32), + bias, then GELU (gelu_tanh or exact erf, kernels/mlp.py's
_gelu_act) or the squared ReLU (relu2, its _relu2) are computed on the tile in registers and stored in the compute
dtype. The dequantized weight never
exists in memory, and the scale costs one multiply per output instead of one per weight. The reference rounds its
dequantized weight q * scale to the compute dtype (in bf16 up to 2^-9 relative per weight) before the product; this
kernel's weight is exact (q, and the scale in fp32), so only x's, the bias's and y's roundings remain.

int8 with group scales (a GPTQ 8-bit folder's, Qwen's *-GPTQ-Int8: train/hf_quant.py): scale [N, K / G], W[n, k] =
q[n, k] * scale[n, k // G], G one of GROUP_SIZES dividing K. A group's scale does not factor out of the whole K sum,
so the same kernel (constexpr G > 0) dequantizes each q tile in registers as int4's does, per step: with
BLOCK_K <= G the step lies in one group (one scale a column of the tile), with BLOCK_K > G it holds BLOCK_K / G
whole groups ([BLOCK_K / G, BLOCK_N] scales broadcast over [BLOCK_K / G, G, BLOCK_N]); q * s in fp32 is rounded to
the compute dtype (as the reference's dequantized weight is) before tl.dot, and the epilogue skips the row scale.
Its tiles are int4's budget (_int8_prune: at most MAX_GROUPS_A_STEP groups a step and a 128 x 128 weight tile).

Compute dtype: under torch.autocast its dtype (x and bias are cast to it first, as nn.Linear's inputs are), else
x's. fp32 uses IEEE products (no TF32), bf16/fp16 tensor cores with fp32 accumulation. Launch: on a GPU autotuned
per (rows bucket, N, K, flags, dtypes) over decode tiles (BLOCK_M 16, wide N and K tiles: one or a few rows, the
grid split over N only) and prefill tiles (BLOCK_M 64/128); under the interpreter one fixed tile.

int4_linear (W4A16). Reference module: `tritongpt.model.quant.Int4Linear` (dequantize, then F.linear). W [N, K]
is stored as q in 0..15, two a byte (qweight uint8 [N, K / 2]: byte j of a row holds q[2j] in its low nibble and
q[2j + 1] in its high one), and per group of G consecutive inputs of a row an fp32 scale and offset (scale and
offset [N, K / G]): W[n, k] ~= q[n, k] * scale[n, k // G] + offset[n, k // G] (asymmetric: model/quant.py's
quantize_weight_int4). A decode step reads half a byte a weight, plus 8 bytes a group.

The same tiled matmul as int8's (BLOCK_M x BLOCK_N tiles of y, K walked in BLOCK_K steps, grouped programs). Per K
step the [BLOCK_N, BLOCK_K / 2] tile of packed bytes is loaded along K at unit stride and unpacked in registers: the
low nibbles (b & 15) and the high ones (b >> 4) are joined on a new last dim and reshaped, which interleaves them
back into k order, [BLOCK_N, BLOCK_K]. Unlike int8's scale, the offset does not factor out of the K sum per output
(a group's offset multiplies that group's sum of x), so the tile is dequantized in registers before the dot:
q * scale + offset in fp32, rounded to the compute dtype (as the reference's dequantize().to(x.dtype) is), then
tl.dot(x, w^T) into the fp32 accumulator, which stays in registers for the whole K loop. The scales and offsets
are fetched per step: with BLOCK_K <= G (G % BLOCK_K == 0, both powers of two) the step lies in one group, one
scale and offset a row; with BLOCK_K > G it holds BLOCK_K / G whole groups, a [BLOCK_N, BLOCK_K / G] tile broadcast
over [BLOCK_N, BLOCK_K / G, G]. As K is a multiple of G, K's edge falls on a group's. The bias and GELU are int8's
epilogue. Neither the dequantized weight nor the unpacked q ever exists in memory.

Launch: int8's decode tiles (BLOCK_M 16) and prefill ones, autotuned per (rows bucket, N, K, G, flags, dtypes),
less those whose K step holds more than MAX_GROUPS_A_STEP groups; under the interpreter one fixed tile (BLOCK_K 64:
4 and 2 whole groups a step at G 16 and 32, one at 64, part of one above).

Public API: `int8_linear(x, qweight, scale, bias=None, activation=None)` and `int4_linear(x, qweight, scale, offset,
bias=None, activation=None)`, activation None, "gelu_tanh", "gelu_erf" or "relu2". Each calls a torch.library custom op
(`tritongpt::int8_linear`, `tritongpt::int4_linear`, with fake impls), so torch.compile keeps it as an opaque call.

Backward: x's gradient only. The quantized weight, its scales and offsets and the bias are frozen: a call in grad
mode where one of them requires grad is refused by name, as is an activation while x requires grad (apply the
activation after the call; the backward is the linear's). With x requiring grad the call goes through the op's
registered autograd (setup_context keeps the quantized tensors, not a dequantized copy), whose backward calls
`tritongpt::int8_linear_dx` / `tritongpt::int4_linear_dx` (fake impls too, so torch.compile traces the backward):
dx[M, K] = dy[M, N] @ W[N, K], W the dequantized weight. Their kernels are the forward's matmul with N and K
swapped: a BLOCK_M x BLOCK_K tile of dx a program, N (the reduction) walked in BLOCK_N steps, the weight tile
[BLOCK_N, BLOCK_K] read along K from the quantized rows and dequantized in registers (int8: q * scale[n]; int4:
the forward's _int4_tile), in fp32, then rounded to dy's dtype. int8's scale is per n, the reduction index, so
unlike the forward's it cannot wait for an epilogue: int8's dx rounds q * scale to the compute dtype, as the
reference's dequantized weight does; int4's dx rounds its weight as its forward does. tl.dot accumulates in fp32
(IEEE products in fp32, tensor cores in bf16/fp16) and dx is stored in dy's dtype (the forward's compute dtype;
autograd casts it back to x's). Neither the dequantized weight nor the unpacked q ever exists in memory. Launch:
autotuned per (rows bucket, N, K[, G]) over few-row tiles (BLOCK_M 16) and training ones (BLOCK_M 64/128), int4's
less those whose K tile holds more than MAX_GROUPS_A_STEP groups; under the interpreter one fixed tile.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from tritongpt._env import triton_interpreting
from tritongpt.kernels._common import (FLOAT_DTYPES, as_rows, autocast_dtype, autotuned, cast, cdiv,
                                       check_runnable, check_same_device, check_tensor, custom_op, dot,
                                       first_order_only, grouped_tile, launch_tuned, next_pow2, no_func_transform,
                                       on_tensor_device)
from tritongpt.kernels.mlp import _gelu_act, _relu2
from tritongpt.model.quant import GROUP_SIZES

ACTIVATIONS = (None, "gelu_tanh", "gelu_erf", "relu2")  # relu2: relu(y)^2, mlp "relu2"'s
SCALE_DTYPES = FLOAT_DTYPES + (torch.float64,)  # read as fp32 in the kernel
DECODE_M = 16  # up to this many rows: the decode tiles (BLOCK_M 16)


def _interpreter_tile():
    """Every kernel's one tile under the interpreter, which pays per program and per tl.dot: a handful of programs.
    BLOCK_K 64 is one group's part at int4's G >= 64 and 2 or 4 whole groups at G 32 or 16 (both of its scale
    paths). A new Config each call: each autotuner keeps its own."""
    return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}, num_warps=4, num_stages=1)]


def _configs():
    if triton_interpreting():
        return _interpreter_tile()
    cfg = triton.Config
    return [
        # decode (M <= 16): one row-tile; the N tiles are the grid, so narrow ones keep more SMs busy on a small
        # N (GPT-2's fc2: 768 outputs are 24 programs at 32, 6 at 128); wide K steps keep weight bytes in flight
        cfg({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 256, "GROUP_M": 1}, num_warps=4, num_stages=4),
        cfg({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "GROUP_M": 1}, num_warps=4, num_stages=4),
        cfg({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1}, num_warps=4, num_stages=5),
        cfg({"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 1}, num_warps=4, num_stages=4),
        cfg({"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 256, "GROUP_M": 1}, num_warps=8, num_stages=3),
        # prefill: kernels/mlp.py's matmul tiles
        cfg({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        cfg({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
        cfg({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        cfg({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        cfg({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    ]


def _prune(configs, named_args, **kwargs):
    """The decode tiles for up to DECODE_M rows, the prefill ones above (a 16-row tile would read every weight
    tile M / 16 times; a 64-row tile at one row computes 63 rows of padding)."""
    decode = named_args["M_BUCKET"] <= DECODE_M
    return [c for c in configs if (c.kwargs["BLOCK_M"] <= DECODE_M) == decode] or configs


MAX_GROUPS_A_STEP = 8  # BLOCK_K / G above this: a fine-grained scale tile per step, pruned (a smaller BLOCK_K fits)
GROUPED_TILE = 128 * 128  # a grouped int8 weight tile's most values (BLOCK_N x BLOCK_K): int4's largest


def _int8_prune(configs, named_args, **kwargs):
    """_prune's decode or prefill tiles; with group scales (G > 0) less those whose K step holds more than
    MAX_GROUPS_A_STEP groups or whose weight tile, dequantized to fp32 in registers as int4's is, is larger than
    int4's largest (GROUPED_TILE: int8's 128 x 256 decode tile would double the registers a thread; kept if nothing
    else is left)."""
    G = kwargs.get("G", named_args.get("G"))
    configs = _prune(configs, named_args)
    if not G:
        return configs
    # (the dx kernel's tile is [BLOCK_N, BLOCK_K] too: one rule for both)
    return [c for c in configs if c.kwargs["BLOCK_K"] // G <= MAX_GROUPS_A_STEP
            and c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= GROUPED_TILE] or configs


@triton.jit
def _int8_group_tile(q, s, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, G: tl.constexpr, GROUPS: tl.constexpr):
    """The fp32 weight tile W^T [BLOCK_K, BLOCK_N] from its int8 q^T [BLOCK_K, BLOCK_N] and its groups' fp32 scales
    s [GROUPS, BLOCK_N] (GROUPS 1: the step is inside one group), in registers."""
    if GROUPS == 1:
        return q.to(tl.float32) * s  # [1, BLOCK_N] broadcast
    else:
        w = tl.reshape(q.to(tl.float32), (GROUPS, G, BLOCK_N)) * s[:, None, :]
        return tl.reshape(w, (BLOCK_K, BLOCK_N))


# M_BUCKET stands in for M (the token count changes from call to call); N and K are the layer's widths.
@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "G", "HAS_BIAS", "ACTIVATION", "GELU_ERF",
                                               "RELU2"], prune_configs_by={"early_config_prune": _int8_prune})
@triton.jit
def _int8_linear_kernel(X, Q, Scale, Bias, Y, M, N, K, M_BUCKET, stride_xm, stride_qn, stride_sn, stride_sg, stride_ym,
                        G: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, GELU_ERF: tl.constexpr,
                        RELU2: tl.constexpr,
                        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Y[M, N] = act((X[M, K] @ Q[N, K]^T) * Scale[N] + Bias[N]); X and Q at unit stride along K. G > 0 (a power of
    two, K a multiple of it): Scale is [N, K / G], W[n, k] = Q[n, k] * Scale[n, k // G], dequantized in the K loop."""
    # grouped ordering: GROUP_M row-tiles sweep the column-tiles together, so the weight tiles stay in L2
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    GROUPS: tl.constexpr = (BLOCK_K // G if BLOCK_K > G else 1) if G > 0 else 1  # whole groups a step (1: part of one)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_g = tl.arange(0, GROUPS)
    m_ok = offs_m < M
    n_ok = offs_n < N
    # int64 row offsets: M * K and N * K may pass 2^31 elements (a long prefill at a wide K, a big vocabulary's head)
    x_ptrs = X + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    q_ptrs = Q + offs_k[:, None] + offs_n.to(tl.int64)[None, :] * stride_qn  # the [BLOCK_K, BLOCK_N] tile of q^T
    s_ptrs = Scale + offs_g[:, None] * stride_sg + offs_n.to(tl.int64)[None, :] * stride_sn  # [GROUPS, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - k * BLOCK_K
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        q = tl.load(q_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0)
        if G > 0:
            # a group's scale does not factor out of the whole K sum: the tile is dequantized in registers (q * s in
            # fp32, rounded to the compute dtype as the reference's dequantized weight is), as int4's is
            first = k * BLOCK_K // G  # the step's first group
            s = tl.load(s_ptrs + first * stride_sg, mask=(offs_g < K // G - first)[:, None] & n_ok[None, :],
                        other=0.0).to(tl.float32)
            w = _int8_group_tile(q, s, BLOCK_N, BLOCK_K, G, GROUPS)  # masked q and s are 0: w 0 there, never NaN
            acc = dot(x, cast(w, X.dtype.element_ty), acc, PRECISION)
        else:
            acc = dot(x, cast(q, X.dtype.element_ty), acc, PRECISION)  # int8 -> compute dtype: exact
        x_ptrs += BLOCK_K
        q_ptrs += BLOCK_K

    if G == 0:
        # one scale a row factors out of the K sum: once per output here, not once per weight in the loop
        acc = acc * tl.load(Scale + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if RELU2:  # (the squared ReLU: kernels/mlp.py's, one rounding at the store)
        acc = _relu2(acc)
    elif ACTIVATION:
        acc = _gelu_act(acc, GELU_ERF)
    y_ptrs = Y + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, cast(acc, Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


autotuned("quant.int8_linear", _int8_linear_kernel)


def _bucket(m: int) -> int:
    """Autotune key for the token count: the next power of two, capped (a new prompt length re-runs no search)."""
    return min(next_pow2(m), 16384)


# (bench/compile_check.py calls this on meta tensors to compile the exact launches for sm_90.)
@on_tensor_device
def _launch(x, qweight, scale, bias=None, activation=None):
    """x [M, K] (unit stride along K, the compute dtype) -> y [M, N] in x's dtype; no checks (the op's)."""
    M, K = x.shape
    N = qweight.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0:
        return y
    if scale.dim() == 1 and scale.stride(0) != 1:
        scale = scale.contiguous()  # read at unit stride; N values
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    launch_tuned(_int8_linear_kernel, grid, x, qweight, scale, bias if bias is not None else scale, y,
                 M, N, K, _bucket(M), x.stride(0), qweight.stride(0), *_scale_strides(scale), y.stride(0),
                 G=_group(scale, K), HAS_BIAS=bias is not None, ACTIVATION=activation is not None,
                 GELU_ERF=activation == "gelu_erf", RELU2=activation == "relu2",
                 PRECISION="ieee" if x.dtype == torch.float32 else "tf32")  # tf32 only affects fp32 inputs
    return y


def _group(scale, K: int) -> int:
    """int8's group size: 0 for one scale a row (scale [N]), else K / groups (scale [N, K / G])."""
    return 0 if scale.dim() == 1 else K // scale.shape[1]


def _scale_strides(scale) -> tuple:
    """(stride along N, stride along the groups) of int8's scale: [N] has no groups (its stride there unused)."""
    return (scale.stride(0), 0) if scale.dim() == 1 else (scale.stride(0), scale.stride(1))


def check_activation(activation, kernel: str = "int8_linear") -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"{kernel}: activation must be None, 'gelu_tanh', 'gelu_erf' or 'relu2', "
                         f"got {activation!r}")


def _check_weight(qweight, scale, bias):
    """qweight [N, K] int8 with unit stride along K, scale [N] and bias [N] floating: -> (N, K)."""
    check_tensor(qweight, "qweight", dtypes=(torch.int8,), ndim=2)
    N, K = qweight.shape
    if N == 0 or K == 0:
        raise ValueError(f"int8_linear: qweight has shape {tuple(qweight.shape)}; N (outputs) and K (inputs) "
                         "must both be at least 1")
    if K > 1 and qweight.stride(1) != 1:
        raise ValueError(f"int8_linear: qweight must have unit stride along K (nn.Linear's [N, K] layout), got "
                         f"strides {qweight.stride()}; store it contiguous once (qweight.contiguous()): a copy "
                         "on every call would read the weight twice")
    if isinstance(scale, torch.Tensor) and scale.dim() == 2:  # group scales: W[n, k] = q[n, k] * scale[n, k // G]
        check_tensor(scale, "scale", dtypes=SCALE_DTYPES)
        groups = scale.shape[1]
        if scale.shape[0] != N or groups == 0 or K % groups or K // groups not in GROUP_SIZES:
            raise ValueError(f"int8_linear: scale has shape {tuple(scale.shape)}; group scales must be [N, K / G] = "
                             f"[{N}, K / G] for qweight {tuple(qweight.shape)} (K = {K}) with a group size G in "
                             f"{', '.join(map(str, GROUP_SIZES))}")
    else:  # (one a row)
        check_tensor(scale, "scale", dtypes=SCALE_DTYPES, shape=(N,))
    if bias is not None:
        check_tensor(bias, "bias", dtypes=SCALE_DTYPES, shape=(N,))
    return N, K


def _check_op_args(x, qweight, scale, bias, activation):
    """What the kernel assumes; int8_linear() arranges x, a direct call of the op must too."""
    check_tensor(x, "x", ndim=2)
    N, K = _check_weight(qweight, scale, bias)
    if x.shape[1] != K:
        raise ValueError(f"int8_linear: x has {x.shape[1]} features (last dim), qweight [N, K] has K = {K}")
    if K > 1 and x.stride(1) != 1:
        raise ValueError(f"tritongpt::int8_linear reads x with unit stride on its last dim, got strides {x.stride()} "
                         "(call int8_linear(), which copies, or pass .contiguous())")
    check_activation(activation)
    check_same_device(x=x, qweight=qweight, scale=scale, bias=bias)
    return N


@custom_op("tritongpt::int8_linear", mutates_args=())
def _int8_linear_op(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                    activation: Optional[str] = None) -> torch.Tensor:
    """x [M, K] -> y [M, N] in x's dtype."""
    check_runnable(x, "x")
    _check_op_args(x, qweight, scale, bias, activation)
    return _launch(x, qweight, scale, bias, activation)


@_int8_linear_op.register_fake
def _(x, qweight, scale, bias, activation=None):
    N = _check_op_args(x, qweight, scale, bias, activation)
    return x.new_empty((x.shape[0], N))


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
                activation: Optional[str] = None) -> torch.Tensor:
    """act(x @ (qweight * scale[:, None]).T + bias) over the last dim of x (any leading dims): y [..., N].

    qweight [N, K] torch.int8 with unit stride along K (nn.Linear's layout), scale [N] floating (used in fp32), or
    [N, K / G] for a scale a group of G consecutive inputs (W[n, k] = qweight[n, k] * scale[n, k // G], G one of
    GROUP_SIZES: a GPTQ 8-bit folder's groups), bias [N] floating or None; activation None, "gelu_tanh",
    "gelu_erf" or "relu2" (after the bias). y has the compute dtype: the autocast dtype under torch.autocast (x and
    bias cast to it first, as nn.Linear's inputs), else x's (the bias rounded to it too, as F.linear would need it).
    Backward: x's gradient only, with activation None (qweight, scale and bias are frozen; see the module's text).
    """
    _check_x(x, "int8_linear")
    N, K = _check_weight(qweight, scale, bias)
    if x.shape[-1] != K:
        raise ValueError(f"int8_linear: x has {x.shape[-1]} features (last dim), qweight [N, K] has K = {K}")
    return _call(_int8_linear_op, "int8_linear", x, N, bias, activation, qweight=qweight, scale=scale)


def _check_x(x, kernel: str):
    no_func_transform(kernel)
    check_tensor(x, "x")
    if x.dim() == 0:
        raise ValueError(f"{kernel}: x must have at least 1 dim (the feature one), got a scalar")


def _call(op, kernel: str, x, N: int, bias, activation, **weights):
    """int8_linear's and int4_linear's shared tail: the activation and devices checked, a gradient's conditions
    (_needs_grad), x and the bias cast to the compute dtype, the op called on x's rows. weights: the op's quantized
    tensors by name, in its argument order."""
    check_activation(activation, kernel)
    check_same_device(x=x, **weights, bias=bias)
    frozen = {k: v for k, v in weights.items() if k != "qweight"}
    grad = _needs_grad(kernel, x, activation, **frozen, bias=bias)
    dt = autocast_dtype(x.device) or x.dtype
    x = x.to(dt)
    bias = bias.to(dt) if bias is not None else None
    # with x's gradient: through the dispatcher, whose registered autograd records the backward (.call would not)
    y = (op if grad else op.call)(as_rows(x), *weights.values(), bias, activation)
    return y.view(*x.shape[:-1], N)


def _int4_configs():
    if triton_interpreting():
        return _interpreter_tile()
    cfg = triton.Config
    # the dequantized [BLOCK_N, BLOCK_K] fp32 tile lives in registers next to the accumulator: at most 64 values a
    # thread here (int8's 128 x 256 decode tile on 8 warps would be 128). bench/compile_check.py: none spills on
    # sm_90 (76-80 registers a thread at decode, 80-168 at prefill)
    return [
        # decode (M <= 16): narrow N tiles keep more SMs busy on a small N; wide K steps keep weight bytes in flight
        cfg({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 256, "GROUP_M": 1}, num_warps=4, num_stages=4),
        cfg({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1}, num_warps=4, num_stages=4),
        cfg({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "GROUP_M": 1}, num_warps=8, num_stages=3),
        cfg({"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 1}, num_warps=8, num_stages=3),
        # prefill: the dequantization is paid once per weight tile and row-tile, so tall row-tiles
        cfg({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        cfg({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        cfg({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        cfg({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    ]


def _int4_prune(configs, named_args, **kwargs):
    """_prune's decode or prefill tiles, less those whose K step holds more than MAX_GROUPS_A_STEP groups of
    this G (kept if nothing else is left)."""
    G = kwargs.get("G", named_args.get("G"))
    configs = _prune(configs, named_args)
    return [c for c in configs if c.kwargs["BLOCK_K"] // G <= MAX_GROUPS_A_STEP] or configs


@triton.jit
def _int4_tile(b, s, o, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, G: tl.constexpr, GROUPS: tl.constexpr):
    """The fp32 weight tile W [BLOCK_N, BLOCK_K] from its packed bytes b [BLOCK_N, BLOCK_K / 2] and its groups'
    fp32 scales and offsets s, o [BLOCK_N, GROUPS] (GROUPS 1: the tile is inside one group), in registers."""
    q = tl.reshape(tl.join(b & 15, b >> 4), (BLOCK_N, BLOCK_K)).to(tl.float32)  # nibbles back in k order
    if GROUPS == 1:
        return q * s + o  # [BLOCK_N, 1] broadcast
    else:
        return tl.reshape(tl.reshape(q, (BLOCK_N, GROUPS, G)) * s[:, :, None] + o[:, :, None], (BLOCK_N, BLOCK_K))


@triton.autotune(configs=_int4_configs(), key=["M_BUCKET", "N", "K", "G", "HAS_BIAS", "ACTIVATION",
                                                     "GELU_ERF", "RELU2"],
                 prune_configs_by={"early_config_prune": _int4_prune})
@triton.jit
def _int4_linear_kernel(X, Q, Scale, Offset, Bias, Y, M, N, K, M_BUCKET, stride_xm, stride_qn,
                        stride_sn, stride_sg, stride_on, stride_og, stride_ym, G: tl.constexpr,
                        HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, GELU_ERF: tl.constexpr,
                        RELU2: tl.constexpr,
                        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Y[M, N] = act(X[M, K] @ W[N, K]^T + Bias[N]), W[n, k] = q[n, k] * Scale[n, k // G] + Offset[n, k // G], q the
    nibbles of Q[N, K / 2] (low first); X and Q at unit stride along K. G and BLOCK_K powers of two."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    HALF_K: tl.constexpr = BLOCK_K // 2
    GROUPS: tl.constexpr = BLOCK_K // G if BLOCK_K > G else 1  # whole groups a step (1: part of one)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_b = tl.arange(0, HALF_K)
    offs_g = tl.arange(0, GROUPS)
    m_ok = offs_m < M
    n_ok = offs_n < N
    rows_n = offs_n.to(tl.int64)
    x_ptrs = X + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    q_ptrs = Q + rows_n[:, None] * stride_qn + offs_b[None, :]  # [BLOCK_N, BLOCK_K / 2] packed bytes
    s_ptrs = Scale + rows_n[:, None] * stride_sn + offs_g[None, :] * stride_sg  # [BLOCK_N, GROUPS]
    o_ptrs = Offset + rows_n[:, None] * stride_on + offs_g[None, :] * stride_og
    n_groups = K // G
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - k * BLOCK_K
        b_ok = offs_b < K // 2 - k * HALF_K
        first = k * BLOCK_K // G  # the step's first group
        g_ok = offs_g < n_groups - first
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(q_ptrs, mask=n_ok[:, None] & b_ok[None, :], other=0)
        s = tl.load(s_ptrs + first * stride_sg, mask=n_ok[:, None] & g_ok[None, :], other=0.0).to(tl.float32)
        o = tl.load(o_ptrs + first * stride_og, mask=n_ok[:, None] & g_ok[None, :], other=0.0).to(tl.float32)
        w = _int4_tile(b, s, o, BLOCK_N, BLOCK_K, G, GROUPS)
        # masked bytes, scales and offsets are 0: w is 0 past K's and N's edges (x is too), never NaN
        acc = dot(x, tl.trans(cast(w, X.dtype.element_ty)), acc, PRECISION)
        x_ptrs += BLOCK_K
        q_ptrs += HALF_K

    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if RELU2:  # (the squared ReLU: kernels/mlp.py's, one rounding at the store)
        acc = _relu2(acc)
    elif ACTIVATION:
        acc = _gelu_act(acc, GELU_ERF)
    y_ptrs = Y + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, cast(acc, Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


autotuned("quant.int4_linear", _int4_linear_kernel)


@on_tensor_device
def _launch_int4(x, qweight, scale, offset, bias=None, activation=None):
    """x [M, K] (unit stride along K, the compute dtype) -> y [M, N] in x's dtype; no checks (the op's)."""
    M, K = x.shape
    N, groups = scale.shape
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0:
        return y
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    launch_tuned(_int4_linear_kernel, grid, x, qweight, scale, offset, bias if bias is not None else scale, y,
                 M, N, K, _bucket(M), x.stride(0), qweight.stride(0), scale.stride(0), scale.stride(1),
                 offset.stride(0), offset.stride(1), y.stride(0), G=K // groups,
                 HAS_BIAS=bias is not None, ACTIVATION=activation is not None, GELU_ERF=activation == "gelu_erf",
                 RELU2=activation == "relu2",
                 PRECISION="ieee" if x.dtype == torch.float32 else "tf32")
    return y


def _check_int4_weight(qweight, scale, offset, bias):
    """qweight [N, K / 2] uint8 with unit stride along K, scale and offset [N, K / G] floating with G one of
    GROUP_SIZES, bias [N] floating: -> (N, K)."""
    check_tensor(qweight, "qweight", dtypes=(torch.uint8,), ndim=2)
    N, half = qweight.shape
    K = 2 * half
    if N == 0 or K == 0:
        raise ValueError(f"int4_linear: qweight has shape {tuple(qweight.shape)}; N (outputs) and K / 2 (packed "
                         "inputs) must both be at least 1")
    if half > 1 and qweight.stride(1) != 1:
        raise ValueError(f"int4_linear: qweight must have unit stride along its last dim (packed K, nn.Linear's "
                         f"[N, K] layout), got strides {qweight.stride()}; store it contiguous once "
                         "(qweight.contiguous()): a copy on every call would read the weight twice")
    check_tensor(scale, "scale", dtypes=SCALE_DTYPES, ndim=2)
    groups = scale.shape[1]
    if scale.shape[0] != N or groups == 0 or K % groups or K // groups not in GROUP_SIZES:
        raise ValueError(f"int4_linear: scale has shape {tuple(scale.shape)}; expected [N, K / G] = [{N}, K / G] "
                         f"for qweight {tuple(qweight.shape)} (K = {K}) with a group size G in "
                         f"{', '.join(map(str, GROUP_SIZES))}")
    check_tensor(offset, "offset", dtypes=SCALE_DTYPES, shape=scale.shape)
    if bias is not None:
        check_tensor(bias, "bias", dtypes=SCALE_DTYPES, shape=(N,))
    return N, K


def _check_int4_op_args(x, qweight, scale, offset, bias, activation):
    """What the kernel assumes; int4_linear() arranges x, a direct call of the op must too."""
    check_tensor(x, "x", ndim=2)
    N, K = _check_int4_weight(qweight, scale, offset, bias)
    if x.shape[1] != K:
        raise ValueError(f"int4_linear: x has {x.shape[1]} features (last dim), qweight [N, K / 2] has K = {K}")
    if K > 1 and x.stride(1) != 1:
        raise ValueError(f"tritongpt::int4_linear reads x with unit stride on its last dim, got strides {x.stride()} "
                         "(call int4_linear(), which copies, or pass .contiguous())")
    check_activation(activation, "int4_linear")
    check_same_device(x=x, qweight=qweight, scale=scale, offset=offset, bias=bias)
    return N


@custom_op("tritongpt::int4_linear", mutates_args=())
def _int4_linear_op(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                    bias: Optional[torch.Tensor], activation: Optional[str] = None) -> torch.Tensor:
    """x [M, K] -> y [M, N] in x's dtype."""
    check_runnable(x, "x")
    _check_int4_op_args(x, qweight, scale, offset, bias, activation)
    return _launch_int4(x, qweight, scale, offset, bias, activation)


@_int4_linear_op.register_fake
def _(x, qweight, scale, offset, bias, activation=None):
    N = _check_int4_op_args(x, qweight, scale, offset, bias, activation)
    return x.new_empty((x.shape[0], N))


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                bias: Optional[torch.Tensor] = None, activation: Optional[str] = None) -> torch.Tensor:
    """act(x @ W.T + bias) over the last dim of x (any leading dims): y [..., N], with W[n, k] = q[n, k] *
    scale[n, k // G] + offset[n, k // G] (model/quant.py's quantize_weight_int4).

    qweight [N, K / 2] torch.uint8 (q in 0..15, two a byte, the even k's in the low nibble) with unit stride along
    its last dim; scale and offset [N, K / G] floating (used in fp32), G = K / scale.shape[1] one of GROUP_SIZES;
    bias [N] floating or None; activation None, "gelu_tanh", "gelu_erf" or "relu2" (after the bias). y has the compute
    dtype (int8_linear's: autocast's, else x's). Backward: x's gradient only, with activation None (int8_linear's).
    """
    _check_x(x, "int4_linear")
    N, K = _check_int4_weight(qweight, scale, offset, bias)
    if x.shape[-1] != K:
        raise ValueError(f"int4_linear: x has {x.shape[-1]} features (last dim), qweight [N, K / 2] has K = {K}")
    return _call(_int4_linear_op, "int4_linear", x, N, bias, activation, qweight=qweight, scale=scale, offset=offset)


# ----------------------------------------------------------------------------- backward: dx only
# The quantized weights are frozen (QLoRA trains adapters beside them), so the only gradient is x's, through the
# weight: dx[M, K] = dy[M, N] @ W[N, K]. The forward's tiled matmul with the roles of N and K swapped: each program
# computes a BLOCK_M x BLOCK_K tile of dx and walks N (the reduction) in BLOCK_N steps.
def _dx_configs():
    if triton_interpreting():
        return _interpreter_tile()
    cfg = triton.Config
    # the dequantized [BLOCK_N, BLOCK_K] fp32 tile lives in registers next to the accumulator (as int4's forward).
    # bench/compile_check.py on sm_90: 94-168 registers a thread with few rows, 80-168 at training's; one spill: int8
    # with group scales of 32 at the 16 x 128 x 128 tile (255 registers, ~300 bytes spilled; BLOCK_K 64 does not
    # spill). Autotune times it beside the others; prune it if a GPU run shows it picked and slow.
    return [
        # few rows: one row-tile; the K tiles are the grid, so narrow ones keep more SMs busy
        cfg({"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 1}, num_warps=4, num_stages=4),
        cfg({"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 1}, num_warps=4, num_stages=4),
        # training's rows (B x T tokens)
        cfg({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
        cfg({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        cfg({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
        cfg({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    ]


@triton.autotune(configs=_dx_configs(), key=["M_BUCKET", "N", "K", "G"],
                 prune_configs_by={"early_config_prune": _int8_prune})
@triton.jit
def _int8_linear_dx_kernel(DY, Q, Scale, DX, M, N, K, M_BUCKET, stride_dym, stride_qn, stride_sn, stride_sg,
                           stride_dxm, G: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """DX[M, K] = DY[M, N] @ W[N, K], W[n, k] = Q[n, k] * Scale[n] (G 0), or Q[n, k] * Scale[n, k // G] (G > 0, a
    power of two, K a multiple of it); DY and Q at unit stride along N and K.

    Tiled over (M, K): a BLOCK_M x BLOCK_K tile of DX a program, N walked in BLOCK_N steps. Per step the dy tile
    [BLOCK_M, BLOCK_N] and the int8 tile [BLOCK_N, BLOCK_K] (rows of Q, read along K) are loaded, the weight tile is
    dequantized in registers (q * scale in fp32: the scale is per n, the reduction index, so it does not factor out
    of the sum as in the forward) and rounded to dy's dtype, as the reference's dequantized weight is; tl.dot adds
    into the fp32 accumulator, which stays in registers for the whole N loop. A program's K columns are fixed, so
    are its groups (G > 0): BLOCK_K / G whole ones or part of one, a [BLOCK_N, groups] scale tile a step (int4's dx).
    The dequantized weight never exists in memory."""
    pid_m, pid_k = grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    GROUPS: tl.constexpr = (BLOCK_K // G if BLOCK_K > G else 1) if G > 0 else 1
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    k_ok = offs_k < K
    dy_ptrs = DY + offs_m.to(tl.int64)[:, None] * stride_dym + offs_n[None, :]
    q_ptrs = Q + offs_n.to(tl.int64)[:, None] * stride_qn + offs_k[None, :]  # [BLOCK_N, BLOCK_K]
    if G > 0:
        offs_g = pid_k * BLOCK_K // G + tl.arange(0, GROUPS)
        g_ok = offs_g < K // G
    else:
        offs_g = tl.arange(0, 1)  # (one scale a row: no groups along K)
        g_ok = offs_g < 1
    s_ptrs = Scale + offs_n.to(tl.int64)[:, None] * stride_sn + offs_g[None, :] * stride_sg  # [BLOCK_N, GROUPS]
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n in range(0, tl.cdiv(N, BLOCK_N)):
        n_ok = offs_n < N - n * BLOCK_N
        dy = tl.load(dy_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        q = tl.load(q_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0)
        s = tl.load(s_ptrs, mask=n_ok[:, None] & g_ok[None, :], other=0.0).to(tl.float32)
        # masked q and scales are 0: w is 0 past N's and K's edges (dy is too past N's), never NaN
        if GROUPS == 1:
            w = q.to(tl.float32) * s  # [BLOCK_N, 1] broadcast: the row's scale, or its group's
        else:
            w = tl.reshape(tl.reshape(q.to(tl.float32), (BLOCK_N, GROUPS, G)) * s[:, :, None], (BLOCK_N, BLOCK_K))
        acc = dot(dy, cast(w, DY.dtype.element_ty), acc, PRECISION)
        dy_ptrs += BLOCK_N
        q_ptrs += BLOCK_N * stride_qn
        s_ptrs += BLOCK_N * stride_sn
    dx_ptrs = DX + offs_m.to(tl.int64)[:, None] * stride_dxm + offs_k[None, :]
    tl.store(dx_ptrs, cast(acc, DX.dtype.element_ty), mask=m_ok[:, None] & k_ok[None, :])


autotuned("quant.int8_linear_dx", _int8_linear_dx_kernel)


@triton.autotune(configs=_dx_configs(), key=["M_BUCKET", "N", "K", "G"],
                 prune_configs_by={"early_config_prune": _int4_prune})
@triton.jit
def _int4_linear_dx_kernel(DY, Q, Scale, Offset, DX, M, N, K, M_BUCKET, stride_dym, stride_qn, stride_sn, stride_sg,
                           stride_on, stride_og, stride_dxm, G: tl.constexpr, PRECISION: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """DX[M, K] = DY[M, N] @ W[N, K], W[n, k] = q[n, k] * Scale[n, k // G] + Offset[n, k // G], q the nibbles of
    Q[N, K / 2] (low first); DY and Q at unit stride along N and packed K. G and BLOCK_K powers of two.

    Tiled over (M, K): a BLOCK_M x BLOCK_K tile of DX a program, N walked in BLOCK_N steps. A program's K columns are
    fixed, so are its groups: BLOCK_K / G whole ones (BLOCK_K > G) or part of one. Per step the dy tile
    [BLOCK_M, BLOCK_N], the packed bytes [BLOCK_N, BLOCK_K / 2] and the rows' scales and offsets [BLOCK_N, groups]
    are loaded, the weight tile is unpacked and dequantized in registers (_int4_tile, the forward's: fp32, rounded
    to dy's dtype as the forward rounds it), and tl.dot adds into the fp32 accumulator, which stays in registers for
    the whole N loop. Neither the unpacked q nor the dequantized weight ever exists in memory."""
    pid_m, pid_k = grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    HALF_K: tl.constexpr = BLOCK_K // 2
    GROUPS: tl.constexpr = BLOCK_K // G if BLOCK_K > G else 1
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_b = pid_k * HALF_K + tl.arange(0, HALF_K)
    offs_g = pid_k * BLOCK_K // G + tl.arange(0, GROUPS)
    offs_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    b_ok = offs_b < K // 2
    g_ok = offs_g < K // G
    rows_n = offs_n.to(tl.int64)
    dy_ptrs = DY + offs_m.to(tl.int64)[:, None] * stride_dym + offs_n[None, :]
    q_ptrs = Q + rows_n[:, None] * stride_qn + offs_b[None, :]  # [BLOCK_N, BLOCK_K / 2] packed bytes
    s_ptrs = Scale + rows_n[:, None] * stride_sn + offs_g[None, :] * stride_sg  # [BLOCK_N, GROUPS]
    o_ptrs = Offset + rows_n[:, None] * stride_on + offs_g[None, :] * stride_og
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n in range(0, tl.cdiv(N, BLOCK_N)):
        n_ok = offs_n < N - n * BLOCK_N
        dy = tl.load(dy_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        b = tl.load(q_ptrs, mask=n_ok[:, None] & b_ok[None, :], other=0)
        s = tl.load(s_ptrs, mask=n_ok[:, None] & g_ok[None, :], other=0.0).to(tl.float32)
        o = tl.load(o_ptrs, mask=n_ok[:, None] & g_ok[None, :], other=0.0).to(tl.float32)
        # masked bytes, scales and offsets are 0: w is 0 past N's and K's edges (dy is too past N's), never NaN
        w = _int4_tile(b, s, o, BLOCK_N, BLOCK_K, G, GROUPS)
        acc = dot(dy, cast(w, DY.dtype.element_ty), acc, PRECISION)
        dy_ptrs += BLOCK_N
        q_ptrs += BLOCK_N * stride_qn
        s_ptrs += BLOCK_N * stride_sn
        o_ptrs += BLOCK_N * stride_on
    dx_ptrs = DX + offs_m.to(tl.int64)[:, None] * stride_dxm + offs_k[None, :]
    tl.store(dx_ptrs, cast(acc, DX.dtype.element_ty), mask=m_ok[:, None] & (offs_k < K)[None, :])


autotuned("quant.int4_linear_dx", _int4_linear_dx_kernel)


# (bench/compile_check.py calls these on meta tensors too.)
@on_tensor_device
def _launch_dx(dy, qweight, scale):
    """dy [M, N] (unit stride along N, the compute dtype) -> dx [M, K] in dy's dtype; no checks (the op's)."""
    M, N = dy.shape
    K = qweight.shape[1]
    dx = torch.empty((M, K), device=dy.device, dtype=dy.dtype)
    if M == 0:
        return dx
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(K, meta["BLOCK_K"]),)  # noqa: E731
    launch_tuned(_int8_linear_dx_kernel, grid, dy, qweight, scale, dx, M, N, K, _bucket(M), dy.stride(0),
                 qweight.stride(0), *_scale_strides(scale), dx.stride(0), G=_group(scale, K),
                 PRECISION="ieee" if dy.dtype == torch.float32 else "tf32")
    return dx


@on_tensor_device
def _launch_int4_dx(dy, qweight, scale, offset):
    """dy [M, N] (unit stride along N, the compute dtype) -> dx [M, K] in dy's dtype; no checks (the op's)."""
    M, N = dy.shape
    K = 2 * qweight.shape[1]
    dx = torch.empty((M, K), device=dy.device, dtype=dy.dtype)
    if M == 0:
        return dx
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(K, meta["BLOCK_K"]),)  # noqa: E731
    launch_tuned(_int4_linear_dx_kernel, grid, dy, qweight, scale, offset, dx, M, N, K, _bucket(M), dy.stride(0),
                 qweight.stride(0), scale.stride(0), scale.stride(1), offset.stride(0), offset.stride(1),
                 dx.stride(0), G=K // scale.shape[1], PRECISION="ieee" if dy.dtype == torch.float32 else "tf32")
    return dx


def _check_dy(kernel, dy, N):
    check_tensor(dy, "dy", ndim=2)
    if dy.shape[1] != N:
        raise ValueError(f"{kernel}: dy has {dy.shape[1]} outputs (last dim), qweight has N = {N}")
    if N > 1 and dy.shape[0] and dy.stride(1) != 1:  # (no rows: nothing read; autograd's may be at stride 0)
        raise ValueError(f"tritongpt::{kernel} reads dy with unit stride on its last dim, got strides {dy.stride()}")


def _check_dx_args(dy, qweight, scale):
    N, _ = _check_weight(qweight, scale, None)
    _check_dy("int8_linear_dx", dy, N)
    check_same_device(dy=dy, qweight=qweight, scale=scale)


@custom_op("tritongpt::int8_linear_dx", mutates_args=())
def _int8_linear_dx_op(dy: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """dy [M, N] -> dx = dy @ W [M, K] in dy's dtype, W int8_linear's dequantized weight."""
    check_runnable(dy, "dy")
    _check_dx_args(dy, qweight, scale)
    return _launch_dx(dy, qweight, scale)


@_int8_linear_dx_op.register_fake
def _(dy, qweight, scale):
    _check_dx_args(dy, qweight, scale)
    return dy.new_empty((dy.shape[0], qweight.shape[1]))


def _check_int4_dx_args(dy, qweight, scale, offset):
    N, _ = _check_int4_weight(qweight, scale, offset, None)
    _check_dy("int4_linear_dx", dy, N)
    check_same_device(dy=dy, qweight=qweight, scale=scale, offset=offset)


@custom_op("tritongpt::int4_linear_dx", mutates_args=())
def _int4_linear_dx_op(dy: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                       offset: torch.Tensor) -> torch.Tensor:
    """dy [M, N] -> dx = dy @ W [M, K] in dy's dtype, W int4_linear's dequantized weight."""
    check_runnable(dy, "dy")
    _check_int4_dx_args(dy, qweight, scale, offset)
    return _launch_int4_dx(dy, qweight, scale, offset)


@_int4_linear_dx_op.register_fake
def _(dy, qweight, scale, offset):
    _check_int4_dx_args(dy, qweight, scale, offset)
    return dy.new_empty((dy.shape[0], 2 * qweight.shape[1]))


def _needs_grad(kernel, x, activation, **frozen):
    """Whether the call must record x's gradient. The quantized weight, its scales and offsets and the bias are
    frozen: one requiring grad is refused, as is an activation with a gradient (the backward is the linear's)."""
    if not torch.is_grad_enabled():
        return False
    for name, t in frozen.items():
        if t is not None and t.requires_grad:
            raise RuntimeError(f"{kernel}: {name} requires grad, but the quantized weight, its scale(s), offsets and "
                               f"the bias are frozen and get no gradient (only x does); pass {name}.detach(), or "
                               "run under torch.no_grad() for inference")
    if not x.requires_grad:
        return False
    if activation is not None:
        raise RuntimeError(f"{kernel}: activation={activation!r} while x requires grad: the backward covers the "
                           "linear only; call it with activation=None and apply the activation to its result "
                           "(F.gelu(y, approximate='tanh' or 'none'), or F.relu(y) ** 2)")
    return True


def _frozen_in_backward(ctx, kernel, names):
    """A direct call of the op with a frozen input requiring grad (int8_linear() refuses it first)."""
    for name, needed in zip(names, ctx.needs_input_grad):
        if needed and name != "x":
            raise RuntimeError(f"{kernel}: {name} requires grad, but it is frozen: only x gets a gradient")
    if ctx.activation is not None:
        raise RuntimeError(f"{kernel}: no backward through activation={ctx.activation!r}; call it with "
                           "activation=None and apply the activation to its result")


def _int8_setup_context(ctx, inputs, output):
    x, qweight, scale, bias, activation = inputs
    ctx.save_for_backward(qweight, scale)  # the int8 weight, not a dequantized copy
    ctx.activation = activation


def _int8_backward(ctx, dy):
    first_order_only("int8_linear")
    _frozen_in_backward(ctx, "int8_linear", ("x", "qweight", "scale", "bias"))
    qweight, scale = ctx.saved_tensors
    return _int8_linear_dx_op.call(as_rows(dy), qweight, scale), None, None, None, None


_int8_linear_op.register_autograd(_int8_backward, setup_context=_int8_setup_context)


def _int4_setup_context(ctx, inputs, output):
    x, qweight, scale, offset, bias, activation = inputs
    ctx.save_for_backward(qweight, scale, offset)
    ctx.activation = activation


def _int4_backward(ctx, dy):
    first_order_only("int4_linear")
    _frozen_in_backward(ctx, "int4_linear", ("x", "qweight", "scale", "offset", "bias"))
    qweight, scale, offset = ctx.saved_tensors
    return _int4_linear_dx_op.call(as_rows(dy), qweight, scale, offset), None, None, None, None, None


_int4_linear_op.register_autograd(_int4_backward, setup_context=_int4_setup_context)


__all__ = ["int8_linear", "int4_linear", "ACTIVATIONS"]
