"""Weight-only int8 linear layer in Triton (W8A16): y = act(x @ (q * scale[:, None]).T + bias), inference only.

Reference module: `tritongpt.model.quant.Int8Linear` (dequantize the weight, then F.linear). The weight of an
nn.Linear, W [N, K], is stored as int8 q [N, K] plus one fp32 scale per output row, W ~= q * scale[:, None]
(symmetric, q in [-127, 127]: gpt-fast's "int8 weight-only"). Decoding a token is a matrix-vector product
that reads every weight once, so its time is the weight's bytes: one byte a weight instead of two (bf16).

The kernel is the tiled matmul of Triton's 03-matrix-multiplication tutorial (kernels/mlp.py's, without its
prologues): each program computes a BLOCK_M x BLOCK_N tile of y, walking K in BLOCK_K steps; programs are
grouped (GROUP_M) so that neighbouring row-tiles reuse the same weight tiles from L2. Per K step:

  * the x tile [BLOCK_M, BLOCK_K] is loaded in the compute dtype, the q tile [BLOCK_K, BLOCK_N] (q^T, read
    along K at unit stride: nn.Linear's layout) as int8, and q is converted to the compute dtype in registers.
    The conversion is exact: every integer in [-127, 127] is a bf16, fp16 and fp32 value;
  * tl.dot(x, q) adds into an fp32 accumulator that stays in registers for the whole K loop.

The scale is applied once, in the epilogue: sum_k x[m, k] q[n, k] scale[n] = scale[n] * sum_k x[m, k] q[n, k],
so it factors out of the K sum. acc * scale[n] (fp32), + bias, then GELU (gelu_tanh or exact erf, kernels/mlp.py's
_gelu_act) are computed on the tile in registers and stored in the compute dtype. The dequantized weight never
exists in memory, and the scale costs one multiply per output instead of one per weight. The reference rounds its
dequantized weight q * scale to the compute dtype (in bf16 up to 2^-9 relative per weight) before the product; this
kernel's weight is exact (q, and the scale in fp32), so only x's, the bias's and y's roundings remain.

Compute dtype: under torch.autocast its dtype (x and bias are cast to it first, as nn.Linear's inputs are), else
x's. fp32 uses IEEE products (no TF32), bf16/fp16 tensor cores with fp32 accumulation. Launch: on a GPU autotuned
per (rows bucket, N, K, flags, dtypes) over decode tiles (BLOCK_M 16, wide N and K tiles: one or a few rows, the
grid split over N only) and prefill tiles (BLOCK_M 64/128); under the interpreter one fixed tile.

Public API: `int8_linear(x, qweight, scale, bias=None, activation=None)`, activation None, "gelu_tanh" or
"gelu_erf". It calls the torch.library custom op `tritongpt::int8_linear` (with a fake impl), so torch.compile
keeps it as an opaque call. There is no backward: the int8 weights are frozen, and a call that would need a
gradient (grad mode on, x or bias requiring grad) is refused.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from tritongpt._env import triton_interpreting
from tritongpt.kernels._common import (FLOAT_DTYPES, as_rows, autocast_dtype, autotuned, cast, cdiv,
                                       check_runnable, check_same_device, check_tensor, custom_op, dot, grouped_tile,
                                       launch_tuned, next_pow2, no_func_transform, on_tensor_device)
from tritongpt.kernels.mlp import _gelu_act

ACTIVATIONS = (None, "gelu_tanh", "gelu_erf")
SCALE_DTYPES = FLOAT_DTYPES + (torch.float64,)  # read as fp32 in the kernel
DECODE_M = 16  # up to this many rows: the decode tiles (BLOCK_M 16)


def _configs():
    if triton_interpreting():
        # the interpreter pays per program and per tl.dot: one mid-sized tile, a handful of programs
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}, num_warps=4, num_stages=1)]
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


# M_BUCKET stands in for M (the token count changes from call to call); N and K are the layer's widths.
@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "HAS_BIAS", "ACTIVATION", "GELU_ERF"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _int8_linear_kernel(X, Q, Scale, Bias, Y, M, N, K, M_BUCKET, stride_xm, stride_qn, stride_ym,
                        HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, GELU_ERF: tl.constexpr,
                        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Y[M, N] = act((X[M, K] @ Q[N, K]^T) * Scale[N] + Bias[N]); X and Q at unit stride along K."""
    # grouped ordering: GROUP_M row-tiles sweep the column-tiles together, so the weight tiles stay in L2
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    # int64 row offsets: M * K and N * K may pass 2^31 elements (a long prefill at a wide K, a big vocabulary's head)
    x_ptrs = X + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    q_ptrs = Q + offs_k[:, None] + offs_n.to(tl.int64)[None, :] * stride_qn  # the [BLOCK_K, BLOCK_N] tile of q^T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - k * BLOCK_K
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        q = tl.load(q_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0)
        acc = dot(x, cast(q, X.dtype.element_ty), acc, PRECISION)  # int8 -> compute dtype: exact
        x_ptrs += BLOCK_K
        q_ptrs += BLOCK_K

    # the scale factors out of the K sum: once per output here, not once per weight in the loop
    acc = acc * tl.load(Scale + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if ACTIVATION:
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
    scale = scale if scale.stride(0) == 1 else scale.contiguous()  # read at unit stride; N values
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    launch_tuned(_int8_linear_kernel, grid, x, qweight, scale, bias if bias is not None else scale, y,
                 M, N, K, _bucket(M), x.stride(0), qweight.stride(0), y.stride(0),
                 HAS_BIAS=bias is not None, ACTIVATION=activation is not None, GELU_ERF=activation == "gelu_erf",
                 PRECISION="ieee" if x.dtype == torch.float32 else "tf32")  # tf32 only affects fp32 inputs
    return y


def check_activation(activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"int8_linear: activation must be None, 'gelu_tanh' or 'gelu_erf', got {activation!r}")


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

    qweight [N, K] torch.int8 with unit stride along K (nn.Linear's layout), scale [N] floating (used in fp32),
    bias [N] floating or None; activation None, "gelu_tanh" or "gelu_erf" (after the bias). y has the compute
    dtype: the autocast dtype under torch.autocast (x and bias cast to it first, as nn.Linear's inputs), else x's
    (the bias rounded to it too, as F.linear would need it).
    Inference only: no backward (call it under torch.no_grad() or torch.inference_mode()).
    """
    no_func_transform("int8_linear")
    check_tensor(x, "x")
    if x.dim() == 0:
        raise ValueError("int8_linear: x must have at least 1 dim (the feature one), got a scalar")
    N, K = _check_weight(qweight, scale, bias)
    if x.shape[-1] != K:
        raise ValueError(f"int8_linear: x has {x.shape[-1]} features (last dim), qweight [N, K] has K = {K}")
    check_activation(activation)
    check_same_device(x=x, qweight=qweight, scale=scale, bias=bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, scale, bias)):
        raise RuntimeError("int8_linear: the int8 weight-only path is for inference and has no backward, but grad "
                           "mode is on and an input requires grad; run it under torch.no_grad() (or "
                           "torch.inference_mode())")
    dt = autocast_dtype(x.device) or x.dtype
    x = x.to(dt)
    bias = bias.to(dt) if bias is not None else None
    y = _int8_linear_op.call(as_rows(x), qweight, scale, bias, activation)
    return y.view(*x.shape[:-1], N)


__all__ = ["int8_linear", "ACTIVATIONS"]
