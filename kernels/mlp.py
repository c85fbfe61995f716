"""GELU-MLP in Triton: y = gelu(x @ w1.T + b1) @ w2.T + b2, forward and backward.

Reference module: `tritongpt.model.layers.FeedForward` (fc1, GELU, fc2; dropout stays in
the module). Every product below is one tiled matmul kernel (as in Triton's 03-matrix-
multiplication tutorial): each program computes a BLOCK_M x BLOCK_N tile of the output,
walking K in BLOCK_K steps; the A and B tiles of one step and the fp32 accumulator live in
SRAM/registers; programs are grouped (GROUP_M) so neighbouring tiles reuse B from L2. Operands
are passed by strides, so transposes (w.T, dy.T) cost nothing. What changes per product is a
small fused prologue/epilogue:

  forward   h = x @ w1.T + b1, a = gelu(h)    bias + GELU in the epilogue; writes h (saved for
                                              backward) and a (read once by the next matmul)
            y = a @ w2.T + b2                 bias in the epilogue
  backward  dh = (dy @ w2) * gelu'(h)         GELU's derivative in the epilogue: da never exists;
            a = gelu(h)                       the same epilogue stores a (h is read there anyway),
                                              only when dW2 is wanted, freed once dW2 is made
            dW2 = dy.T @ a                    a plain matmul (if W1 is frozen and dx not needed,
                                              no dh launch: gelu(h) is recomputed on the B tiles
                                              as they are loaded, B_GELU)
            dW1 = dh.T @ x,  dx = dh @ w1,  db1 = sum(dh),  db2 = sum(dy)
            (only the gradients autograd asks for: a frozen weight skips its product)

Which matmul runs each product on a GPU in bf16/fp16 (MLP_MATMUL, below): the plain ones (nothing fused: the
second Linear's forward, dW2 from the stored a, dW1, dx) on whichever of this kernel and cuBLAS (torch.mm /
addmm) was faster for their shape; the two GELU products either fused as above or split, cuBLAS's product and
then the GELU (or GELU', storing a) in one Triton pass (_gelu_pointwise_kernel), whichever was faster (the
gated MLPs' gate/up and dg/du products likewise, _gate_pointwise_kernel; their dx's sum as mm + addmm_). Each
shape is timed once, on its first call (_auto_path). fp32 keeps this kernel's IEEE products and
fused epilogues everywhere. The split path saves the same tensors: the memory figures below hold for both.

So only x and h are saved for backward: x plus ONE [M, H] tensor, where the eager reference
keeps x plus FIVE (h, tanh(z), 0.5 h, 1 + tanh(z), a) -- measured with _common.saved_tensor_bytes()
in tests/test_mlp.py. Backward holds a second [M, H] (a) for the one dW2 product. Recomputing a on
dW2's B tiles instead (B_GELU) costs the GELU C / BLOCK_M times per element inside the matmul's
inner loop: on an H200 (bf16, M=16384, C=768) that product ran at 0.56 ms, dW1 = dh.T @ x (the same
FLOPs, plain) at 0.17 ms.
Math is fp32 (accumulator and GELU); fp32 inputs use IEEE products (no TF32) so fp32 parity
holds; bf16/fp16 use tensor cores with fp32 accumulation.

gelu_tanh(h) = 0.5 h (1 + tanh(z)), z = sqrt(2/pi) (h + 0.044715 h^3). Since 1 + tanh(z) =
2 sigmoid(2z), we evaluate gelu = h * s with s = sigmoid(2z): no tanh, no cancellation.
gelu'(h) = s + h * 2 s (1 - s) * dz/dh.
With approximate "none" (GELU_ERF: GPT-NeoX's and Pythia's exact GELU, torch's F.gelu default) the
epilogues use the erf form instead: gelu(h) = h Phi(h), Phi(h) = 0.5 (1 + erf(h / sqrt(2))), and
gelu'(h) = Phi(h) + h phi(h), phi the standard normal density.
With approximate "relu2" (RELU2: the squared-ReLU MLP, relu(x W1^T + b1)^2 W2^T + b2, of Arcee's AFM, NVIDIA's
Nemotron and the modded-nanoGPT speedruns; reference module: FeedForward(activation="relu2")) the same
epilogues compute a = relu(h)^2 and its derivative 2 relu(h): the products and what is saved stay as above.

The same kernel carries the gated MLPs' products too, SwiGLU's and GeGLU's (kernels/swiglu.py: a
second B operand and accumulator, the gate epilogues EPI_SWIGLU / EPI_SWIGLU_GRAD, the B_SWIGLU
prologue and SUM2, a second product summed into the same tile). GATE_GELU picks the gate's
activation in those three: silu (Llama's SwiGLU) or gelu_tanh (Gemma's GeGLU).

Public API: `gelu_mlp(x, w1, b1, w2, b2, approximate="tanh")`, and `relu2_mlp(x, w1, b1, w2, b2)` (its
approximate "relu2"). It is built from torch.library custom ops
(`tritongpt::gelu_mlp_fwd` / `tritongpt::gelu_mlp_bwd`, with fake impls) inside an
autograd.Function, so it runs under torch.compile (the ops stay opaque calls in the graph).
"""
import contextlib
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tritongpt._env import triton_interpreting
from tritongpt.kernels._common import cuda_has_tma as _has_tma  # patched by bench/compile_check.py
from tritongpt.kernels._common import (autocast_dtype, autotuned, cast, cdiv, check_runnable, check_same_device,
                                       check_same_dtype, check_tensor, custom_op, dot, first_order_only, grouped_tile,
                                       launch_tuned, next_pow2, no_func_transform, on_tensor_device, register_timed,
                                       timed_pick, tma_scratch)

# Epilogue modes of the matmul kernel.
EPI_NONE = 0       # C = A @ B (+ bias)
EPI_GELU = 1       # H = A @ B + bias; C = gelu(H)       (stores both)
EPI_GELU_GRAD = 2  # C = (A @ B) * gelu'(AUX)             (AUX = saved pre-activation h)
EPI_SWIGLU = 3     # G = A @ B + bias, U = A @ B2 + bias2; C = act(G) * U   (stores all three)
EPI_SWIGLU_GRAD = 4  # D = A @ B; C = D * AUX2 * act'(AUX), C2 = D * act(AUX)  (AUX = g, AUX2 = u)
# STORE_ACT with EPI_GELU_GRAD / EPI_SWIGLU_GRAD: the epilogue also stores the activation a = gelu(AUX) or
# act(AUX) * AUX2 to HOUT, rounded as forward's EPI_GELU / EPI_SWIGLU made it (for dW2 = dy^T a as a plain matmul)
# (act: silu, or gelu_tanh with GATE_GELU; the gated MLP's gate activations by name)
GATES = ("silu", "gelu")
APPROXIMATES = ("tanh", "none")  # the GELU MLP's GELU, as F.gelu names them: GPT-2's tanh form or exact erf
# The non-gated MLP's activations, passed where `approximate` is: the two GELUs, or "relu2", the squared ReLU
# relu(h)^2 (Arcee's AFM, Nemotron, the modded-nanoGPT speedruns): the same two products, another epilogue (RELU2)
ACTIVATIONS = APPROXIMATES + ("relu2",)


@triton.jit
def _gelu_s(h):
    """s = sigmoid(2z) for z = sqrt(2/pi)(h + 0.044715 h^3); gelu(h) = h * s. h is fp32.

    Constants are literals so they compile as fp32 (0.7978845608028654 = sqrt(2/pi)).
    """
    z = 0.7978845608028654 * (h + 0.044715 * h * h * h)
    e = tl.exp(-2.0 * tl.abs(z))  # in (0, 1]: never overflows, unlike exp(-2z) for very negative h
    r = 1.0 / (1.0 + e)  # one division, not two (1/(1+e) and e/(1+e)): each is a reciprocal on the SFU
    return tl.where(z >= 0, r, e * r)


@triton.jit
def _gelu(h):
    return h * _gelu_s(h)


@triton.jit
def _gelu_grad(h):
    s = _gelu_s(h)
    dz = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * h * h)
    return s + 2.0 * h * s * (1.0 - s) * dz


@triton.jit
def _gelu_erf(h):
    """Exact GELU, h Phi(h) with Phi(h) = 0.5 (1 + erf(h / sqrt(2))); h is fp32 (0.7071067811865476 = 1/sqrt(2))."""
    return 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))


@triton.jit
def _gelu_erf_grad(h):
    """Phi(h) + h phi(h), phi(h) = exp(-h^2 / 2) / sqrt(2 pi) (0.3989422804014327 = 1/sqrt(2 pi))."""
    cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
    return cdf + h * 0.3989422804014327 * tl.exp(-0.5 * h * h)


@triton.jit
def _gelu_act(h, GELU_ERF: tl.constexpr):
    """The GELU MLP's activation of h (fp32): exact (erf) with GELU_ERF, else gelu_tanh."""
    if GELU_ERF:
        a = _gelu_erf(h)
    else:
        a = _gelu(h)
    return a


@triton.jit
def _gelu_act_grad(h, GELU_ERF: tl.constexpr):
    if GELU_ERF:
        d = _gelu_erf_grad(h)
    else:
        d = _gelu_grad(h)
    return d


@triton.jit
def _relu2(h):
    """relu(h)^2 (h fp32): the square of a rounded h is exact in fp32, so one rounding, at the store."""
    r = tl.maximum(h, 0.0)
    return r * r


@triton.jit
def _relu2_grad(h):
    """d relu(h)^2 / dh = 2 relu(h) (0 at h = 0, as torch's relu gradient is)."""
    return 2.0 * tl.maximum(h, 0.0)


@triton.jit
def _mlp_act(h, GELU_ERF: tl.constexpr, RELU2: tl.constexpr):
    """The non-gated MLP's activation of h (fp32): relu(h)^2 with RELU2, else _gelu_act's GELU."""
    if RELU2:
        a = _relu2(h)
    else:
        a = _gelu_act(h, GELU_ERF)
    return a


@triton.jit
def _mlp_act_grad(h, GELU_ERF: tl.constexpr, RELU2: tl.constexpr):
    if RELU2:
        d = _relu2_grad(h)
    else:
        d = _gelu_act_grad(h, GELU_ERF)
    return d


@triton.jit
def _sigmoid(g):
    e = tl.exp(-tl.abs(g))  # in (0, 1]: never overflows
    r = 1.0 / (1.0 + e)  # one division, as _gelu_s
    return tl.where(g >= 0, r, e * r)


@triton.jit
def _silu(g):
    """silu(g) = g * sigmoid(g); g is fp32."""
    return g * _sigmoid(g)


@triton.jit
def _silu_grad(g):
    s = _sigmoid(g)
    return s * (1.0 + g * (1.0 - s))


@triton.jit
def _gate_act(g, GATE_GELU: tl.constexpr):
    """The gated MLP's activation of g (fp32): gelu_tanh for GeGLU, else silu."""
    if GATE_GELU:
        a = _gelu(g)
    else:
        a = _silu(g)
    return a


@triton.jit
def _gate_act_grad(g, GATE_GELU: tl.constexpr):
    if GATE_GELU:
        d = _gelu_grad(g)
    else:
        d = _silu_grad(g)
    return d


@triton.jit
def _swiglu_epilogue(acc, acc2, Hout, Hout2, x_off, mask, GATE_GELU: tl.constexpr):
    """EPI_SWIGLU: g = acc and u = acc2 stored rounded (saved for backward) -> a = act(g) * u of the *rounded*
    g and u, as backward remakes a from them (EPI_SWIGLU_GRAD's STORE_ACT, or B_SWIGLU). kernels/moe.py's too."""
    g = cast(acc, Hout.dtype.element_ty)
    u = cast(acc2, Hout2.dtype.element_ty)
    tl.store(Hout + x_off, g, mask=mask)
    tl.store(Hout2 + x_off, u, mask=mask)
    return _gate_act(g.to(tl.float32), GATE_GELU) * u.to(tl.float32)


@triton.jit
def _swiglu_grad_epilogue(da, Aux, Aux2, Hout, Hout2, x_off, mask, GATE_GELU: tl.constexpr, STORE_ACT: tl.constexpr):
    """EPI_SWIGLU_GRAD: da = dy @ W_down, g and u read back from Aux and Aux2; du = da * act(g) stored to Hout2
    -> dg = da * u * act'(g). STORE_ACT: a = act(g) * u stored to Hout too, rounded as _swiglu_epilogue rounds
    it (g and u are read here anyway: dW_down = dy^T a is then a plain matmul). kernels/moe.py's epilogue too."""
    g = tl.load(Aux + x_off, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(Aux2 + x_off, mask=mask, other=0.0).to(tl.float32)
    act = _gate_act(g, GATE_GELU)
    if STORE_ACT:
        tl.store(Hout + x_off, cast(act * u, Hout.dtype.element_ty), mask=mask)
    tl.store(Hout2 + x_off, cast(da * act, Hout2.dtype.element_ty), mask=mask)
    return da * u * _gate_act_grad(g, GATE_GELU)


@triton.jit
def _tma_desc(P, ROWS, COLS, stride_r, stride_c, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, T: tl.constexpr):
    """A TMA descriptor over a logical [ROWS, COLS] operand read in [BLOCK_R, BLOCK_C] tiles. TMA needs the last
    dim contiguous: T (the operand stored transposed, stride_r 1) describes the [COLS, ROWS] matrix in memory."""
    if T:
        desc = tl.make_tensor_descriptor(P, shape=[COLS, ROWS], strides=[stride_c, 1], block_shape=[BLOCK_C, BLOCK_R])
    else:
        desc = tl.make_tensor_descriptor(P, shape=[ROWS, COLS], strides=[stride_r, 1], block_shape=[BLOCK_R, BLOCK_C])
    return desc


@triton.jit
def _tma_tile(desc, r, c, T: tl.constexpr):
    """The [BLOCK_R, BLOCK_C] tile at (r, c) of _tma_desc's operand (a transposed view of shared memory if T)."""
    if T:
        tile = desc.load([c, r]).T
    else:
        tile = desc.load([r, c])
    return tile


def _matmul_configs():
    if triton_interpreting():
        # The interpreter costs per program and per tl.dot: one fixed, mid-sized tile (autotune
        # would run every config), its operands read by pointer or, when a test asks, by TMA (_prune_tma keeps one).
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4, "USE_TMA": tma},
                              num_warps=4, num_stages=1) for tma in (False, True)]

    def cfg(kwargs, tma=False, **opts):
        return triton.Config({**kwargs, "USE_TMA": tma}, **opts)

    return [  # the Triton tutorial's H100-friendly shapes; OutOfResources ones are skipped by autotune
        cfg({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        cfg({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
        cfg({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
        cfg({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
        cfg({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=5),
        # An SM of sm_86/89 (RTX 30xx/40xx, L4) has 99 KB: fp32 SwiGLU's dW_down loads three tiles a
        # stage (dy^T, g, u), 104 KB at 5 stages, so without this tile (80 KB) it had none that fits.
        cfg({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
        # Hopper's TMA (sm_90+; _prune_tma drops these elsewhere): the A and B tiles copied into shared memory by
        # the copy engine, swizzled for wgmma, with no address arithmetic or masks in the warps. On the H200 the
        # pointer loads' K-contiguous B (every forward product: B = W^T) ran at 492 TFLOPS against 628 row-major
        # and cuBLAS's 687; autotune times these beside the pointer configs and keeps the faster.
        cfg({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, True, num_warps=8, num_stages=3),
        cfg({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, True, num_warps=8, num_stages=4),
        cfg({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, True, num_warps=8, num_stages=3),
        cfg({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, True, num_warps=4, num_stages=4),
    ]


def _prune_tma(configs, named_args, **kwargs):
    """The TMA configs only where the launcher found every operand readable by TMA (TMA_OK); under the
    interpreter the one config that matches it (a test sets TMA_INTERPRETED to drive the TMA loads there)."""
    ok = bool(named_args["TMA_OK"])
    kept = [c for c in configs if ok or not c.kwargs["USE_TMA"]]
    return [c for c in kept if c.kwargs["USE_TMA"] == ok][:1] if triton_interpreting() else kept


def _bucket(n: int) -> int:
    """Autotune key for a size that follows the token count (M forward, K in dW = dy^T h):
    the next power of two, capped, so a new batch or prompt length does not re-run the search."""
    return min(next_pow2(n), 16384)  # cached: called per launch


# M_BUCKET / K_BUCKET stand in for M and K in the key (the token count varies step to step);
# N is a model width and stays exact. stride_ak / stride_bn tell the operands' layouts apart
# (1 when row-major, else a model width): the second Linear's forward (B = w2^T) and dx = dh @ w1
# have the same sizes and, without biases, the same flags, but not the same best tile.
# TMA_OK (the launcher's _tma_ok: every operand readable by TMA on a GPU that has it) is in the key so that a
# pick of a TMA config is never launched on operands it cannot read; A_T / B_T follow stride_ak / stride_bn.
@triton.autotune(configs=_matmul_configs(),
                 key=["M_BUCKET", "N", "K_BUCKET", "EPILOGUE", "B_GELU", "B_SWIGLU", "SUM2", "GATE_GELU",
                      "GELU_ERF", "RELU2", "STORE_ACT", "HAS_BIAS", "stride_ak", "stride_bn", "TMA_OK", "A_T", "B_T"],
                 prune_configs_by={"early_config_prune": _prune_tma})
@triton.jit
def _matmul_kernel(A, B, C, Bias, Aux, Hout, A2, B2, Bias2, Aux2, Hout2, M, N, K, M_BUCKET, K_BUCKET,
                   stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                   stride_xm, stride_xn, TMA_OK,
                   HAS_BIAS: tl.constexpr, B_GELU: tl.constexpr, EPILOGUE: tl.constexpr,
                   B_SWIGLU: tl.constexpr, SUM2: tl.constexpr, GATE_GELU: tl.constexpr,
                   GELU_ERF: tl.constexpr, RELU2: tl.constexpr, STORE_ACT: tl.constexpr,
                   PRECISION: tl.constexpr, A_T: tl.constexpr, B_T: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr, USE_TMA: tl.constexpr):
    """C[M, N] = A[M, K] @ B[K, N] with the fused prologue (B_GELU, B_SWIGLU) / epilogue (EPILOGUE) above.

    Aux/Hout/Aux2/Hout2 share strides (stride_xm, stride_xn): Aux is read in EPI_GELU_GRAD, Hout
    written in EPI_GELU; the SwiGLU modes read or write the second pair too. The second operands
    (SwiGLU/GeGLU only) share their first's strides: B2 is the up weight beside the gate's (EPI_SWIGLU),
    u beside g (B_SWIGLU: B = act(g) * u), or with A2 a second product added to the first (SUM2:
    C = A @ B + A2 @ B2, dx = dg @ W_gate + du @ W_up). act is gelu_tanh if GATE_GELU, else silu.
    GELU_ERF: the GELU MLP's modes (EPI_GELU, EPI_GELU_GRAD, B_GELU) take the exact erf GELU, not gelu_tanh.
    RELU2: those modes take relu(h)^2 (derivative 2 relu(h)) instead of a GELU (the squared-ReLU MLP).
    STORE_ACT (EPI_GELU_GRAD, EPI_SWIGLU_GRAD): the activation a, recomputed from the Aux tiles the epilogue
    reads anyway, is stored to Hout: once per element, where B_GELU / B_SWIGLU recompute it per row-tile.
    USE_TMA: A, B (and A2, B2) tiles come through TMA descriptors (zero past the edges, as the masked loads give);
    A_T / B_T: that operand is stored transposed (A's M dim, B's K dim contiguous: B = W^T, A = dy^T).
    """
    # grouped ordering: GROUP_M row-tiles sweep the column-tiles together, so the B tiles they share stay in L2
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_ptrs = A + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = B + offs_k.to(tl.int64)[:, None] * stride_bk + offs_n[None, :] * stride_bn
    b2_ptrs = B2 + offs_k.to(tl.int64)[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # the up projection's (EPI_SWIGLU only)
    if USE_TMA:
        a_desc = _tma_desc(A, M, K, stride_am, stride_ak, BLOCK_M, BLOCK_K, A_T)
        b_desc = _tma_desc(B, K, N, stride_bk, stride_bn, BLOCK_K, BLOCK_N, B_T)
        if B_SWIGLU or EPILOGUE == 3 or SUM2:  # (B2 is a stand-in otherwise: no descriptor to build)
            b2_desc = _tma_desc(B2, K, N, stride_bk, stride_bn, BLOCK_K, BLOCK_N, B_T)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if USE_TMA:
            a = _tma_tile(a_desc, pid_m * BLOCK_M, k * BLOCK_K, A_T)
            b = _tma_tile(b_desc, k * BLOCK_K, pid_n * BLOCK_N, B_T)
        else:
            k_ok = offs_k < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if B_GELU:  # recompute a = gelu(h) on the fly instead of reading a saved copy
            b = cast(_mlp_act(b.to(tl.float32), GELU_ERF, RELU2), A.dtype.element_ty)
        if B_SWIGLU or EPILOGUE == 3:
            if USE_TMA:
                b2 = _tma_tile(b2_desc, k * BLOCK_K, pid_n * BLOCK_N, B_T)
            else:
                b2 = tl.load(b2_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if B_SWIGLU:  # recompute a = act(g) * u from the saved g (B) and u (B2)
            b = cast(_gate_act(b.to(tl.float32), GATE_GELU) * b2.to(tl.float32), A.dtype.element_ty)
        acc = dot(a, b, acc, PRECISION)
        if EPILOGUE == 3:  # the same A tile times the up weight's matching columns
            acc2 = dot(a, b2, acc2, PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
        b2_ptrs += BLOCK_K * stride_bk
    if SUM2:  # + A2 @ B2 into the same accumulator
        if USE_TMA:
            a2_desc = _tma_desc(A2, M, K, stride_am, stride_ak, BLOCK_M, BLOCK_K, A_T)
        a_ptrs = A2 + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
        b2_ptrs = B2 + offs_k.to(tl.int64)[:, None] * stride_bk + offs_n[None, :] * stride_bn
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if USE_TMA:
                a = _tma_tile(a2_desc, pid_m * BLOCK_M, k * BLOCK_K, A_T)
                b = _tma_tile(b2_desc, k * BLOCK_K, pid_n * BLOCK_N, B_T)
            else:
                k_ok = offs_k < K - k * BLOCK_K
                a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(b2_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = dot(a, b, acc, PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b2_ptrs += BLOCK_K * stride_bk

    mask = m_ok[:, None] & n_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    x_off = offs_m.to(tl.int64)[:, None] * stride_xm + offs_n[None, :] * stride_xn
    if EPILOGUE == 1:
        h = cast(acc, Hout.dtype.element_ty)
        tl.store(Hout + x_off, h, mask=mask)
        # gelu of the *rounded* h, so the backward's recomputation sees exactly the same value
        acc = _mlp_act(h.to(tl.float32), GELU_ERF, RELU2)
    elif EPILOGUE == 2:
        h = tl.load(Aux + x_off, mask=mask, other=0.0).to(tl.float32)
        if STORE_ACT:  # a = gelu(h) of the saved (rounded) h, rounded: the very a forward's EPI_GELU made
            tl.store(Hout + x_off, cast(_mlp_act(h, GELU_ERF, RELU2), Hout.dtype.element_ty), mask=mask)
        acc = acc * _mlp_act_grad(h, GELU_ERF, RELU2)
    elif EPILOGUE == 3:
        if HAS_BIAS:
            acc2 += tl.load(Bias2 + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        acc = _swiglu_epilogue(acc, acc2, Hout, Hout2, x_off, mask, GATE_GELU)
    elif EPILOGUE == 4:  # acc is da = dy @ W_down: dg to C, du to Hout2
        acc = _swiglu_grad_epilogue(acc, Aux, Aux2, Hout, Hout2, x_off, mask, GATE_GELU, STORE_ACT)
    c_ptrs = C + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, cast(acc, C.dtype.element_ty), mask=mask)


autotuned("mlp.matmul", _matmul_kernel)


# Which matmul runs the MLPs' products (TRITONGPT_MLP_MATMUL): "auto" (the faster way, timed once per shape, on a
# GPU in bf16/fp16; this kernel elsewhere), "triton" (always this kernel, the GELU in its epilogues: what a kernel
# benchmark of it wants) or "torch" (always torch.mm / addmm, the GELU products split). On the H200 this kernel's
# plain products ran at 466-628 TFLOPS where cuBLAS reached 687 (bench/results/nvidia-h200/), and the GELU-MLP's
# fwd+bwd took 1.58 ms against torch's 0.95.
MATMUL_PATHS = ("auto", "triton", "torch")
MLP_MATMUL = os.environ.get("TRITONGPT_MLP_MATMUL", "auto")
TIMED_DEVICES = ("cuda",)  # where "auto" times the two (a test adds "cpu" to drive it through the interpreter)
SMALL_M = 1024  # up to this many token rows (decode, short prompts) cuBLAS untimed: host-bound, and it has no search
_PLAIN = register_timed("mlp.plain_product", ("device", "dtype", "M_BUCKET", "N", "K_BUCKET", "a_row_major",
                                              "b_row_major", "bias", "SUM2"))
_PLAIN_TIMER = None  # None: triton.testing.do_bench's median (a test passes a stand-in)


@contextlib.contextmanager
def mlp_matmul(path: str):
    """Within it, the MLPs' products run as path says ("auto", "triton", "torch"; MLP_MATMUL), e.g.
    `with mlp_matmul("triton"):` times the MLP with every product on the Triton kernel."""
    global MLP_MATMUL
    if path not in MATMUL_PATHS:
        raise ValueError(f"mlp_matmul takes one of: {', '.join(MATMUL_PATHS)}; got {path!r}")
    saved, MLP_MATMUL = MLP_MATMUL, path
    try:
        yield
    finally:
        MLP_MATMUL = saved


def _torch_product(a, b, bias=None, a2=None, b2=None):
    """a @ b (+ bias) (+ a2 @ b2) by torch.mm / addmm (cuBLAS on a GPU), in a's dtype."""
    if autocast_dtype(a.device) is not None:  # an op's body still sees an enclosing autocast: keep a's dtype
        with torch.autocast(a.device.type, enabled=False):
            return _torch_product(a, b, bias, a2, b2)
    c = torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)
    return c if a2 is None else c.addmm_(a2, b2)


def _auto_path(picks, make_key, a, tokens, candidates) -> str:
    """"triton" or "torch" for one product, as MLP_MATMUL says. "auto" times both ways on a key's first call
    (kernels/_common.timed_pick; keys: rows and reduction bucketed as this kernel's autotune buckets them, N, the
    operands' layouts, the flags) and keeps the faster for the process: a GPU's first step pays ~0.1 s a shape.
    Up to SMALL_M tokens the torch way, untimed; during a CUDA-graph capture an unseen shape takes it too (Triton's
    autotune cannot run there). tokens: the product's token count (M, or K in a weight gradient). make_key: a
    function giving the key (made only where "auto" times). candidates: a function giving {"triton": fn,
    "torch": fn}, called only to time them."""
    mode = MLP_MATMUL
    if mode != "auto":
        if mode not in MATMUL_PATHS:
            raise ValueError(f"TRITONGPT_MLP_MATMUL is {mode!r}; expected one of: {', '.join(MATMUL_PATHS)}")
        return mode
    if a.device.type not in TIMED_DEVICES or a.dtype == torch.float32:
        return "triton"
    key = make_key()
    pick = picks.get(key)
    if pick is not None:
        return pick["path"]
    note = f"untimed: up to {SMALL_M} tokens" if _bucket(tokens) <= SMALL_M else None
    return timed_pick(picks, key, candidates() if note is None else {}, default="torch", timer=_PLAIN_TIMER,
                      note=note)


def _key(a, b, bias):
    (M, K), N = a.shape, b.shape[1]
    return a.device.index, a.dtype, _bucket(M), N, _bucket(K), a.stride(1) == 1, b.stride(1) == 1, bias is not None


def _plain_path(a, b, bias, a2, b2, tokens) -> str:
    """_auto_path for a plain product a @ b (+ bias), or with a2, b2 the sum a @ b + a2 @ b2 (the gated MLPs' dx)."""
    return _auto_path(_PLAIN, lambda: (*_key(a, b, bias), a2 is not None), a, tokens, lambda: {
        "triton": lambda: _matmul(a, b, bias, a2=a2, b2=b2, path="triton"),
        "torch": lambda: _torch_product(a, b, bias, a2, b2)})


# The GELU products (EPI_GELU forward, EPI_GELU_GRAD backward) have a second way: cuBLAS's product, then the GELU
# (or its derivative) in one Triton pass over the [M, N] result (_gelu_pointwise_kernel). On the H200 the fused
# epilogues ran their K = 768 products (GPT-2 small's fc1 and dh) at ~300 TFLOPS while the plain K = 3072 ones ran
# at 627: a short K loop cannot hide an epilogue that writes two tiles. The gated MLPs' products likewise
# (_gate_pointwise_kernel). "auto" times both ways per shape, as the plain products.
_GELU = register_timed("mlp.gelu_product", ("device", "dtype", "M_BUCKET", "N", "K_BUCKET", "a_row_major",
                                            "b_row_major", "bias", "EPILOGUE", "STORE_ACT", "GELU_ERF", "RELU2"))
_GATE = register_timed("mlp.gated_product", ("device", "dtype", "M_BUCKET", "N", "K_BUCKET", "a_row_major",
                                             "b_row_major", "bias", "EPILOGUE", "STORE_ACT", "GATE_GELU"))
POINTWISE_BLOCK = 1024


@triton.jit
def _gelu_pointwise_kernel(H, A, DA, n, GRAD: tl.constexpr, STORE_ACT: tl.constexpr, GELU_ERF: tl.constexpr,
                           RELU2: tl.constexpr, BLOCK: tl.constexpr):
    """The split path's GELU, one pass over n elements of contiguous [M, N] tensors: forward A = gelu(H);
    backward DA *= gelu'(H) in place (da = dy @ W2 becomes dh), and with STORE_ACT A = gelu(H) too. The math of
    the fused epilogues EPI_GELU / EPI_GELU_GRAD, on the 16-bit h the product stored (RELU2: relu(h)^2 there)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    h = tl.load(H + offs, mask=ok, other=0.0).to(tl.float32)
    if GRAD:
        da = tl.load(DA + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(DA + offs, cast(da * _mlp_act_grad(h, GELU_ERF, RELU2), DA.dtype.element_ty), mask=ok)
    if not GRAD or STORE_ACT:
        tl.store(A + offs, cast(_mlp_act(h, GELU_ERF, RELU2), A.dtype.element_ty), mask=ok)


@triton.jit
def _gate_pointwise_kernel(G, U, A, DA, DU, n, GRAD: tl.constexpr, STORE_ACT: tl.constexpr,
                           GATE_GELU: tl.constexpr, BLOCK: tl.constexpr):
    """The gated MLPs' split path, one pass over n elements of contiguous [M, H] tensors: forward A = act(G) * U
    (EPI_SWIGLU's, of the 16-bit g and u the products stored); backward (EPI_SWIGLU_GRAD's) DU = da act(G) and
    DA *= U act'(G) in place (da = dy @ W_down becomes dg), with STORE_ACT A = act(G) * U too."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(G + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=ok, other=0.0).to(tl.float32)
    act = _gate_act(g, GATE_GELU)
    if GRAD:
        da = tl.load(DA + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(DU + offs, cast(da * act, DU.dtype.element_ty), mask=ok)
        tl.store(DA + offs, cast(da * u * _gate_act_grad(g, GATE_GELU), DA.dtype.element_ty), mask=ok)
    if not GRAD or STORE_ACT:
        tl.store(A + offs, cast(act * u, A.dtype.element_ty), mask=ok)


def _split_product(a, b, bias, epilogue, aux, approximate, store_act, b2=None, bias2=None, aux2=None, gate="silu"):
    """EPI_GELU / EPI_GELU_GRAD / EPI_SWIGLU / EPI_SWIGLU_GRAD as cuBLAS's product(s), then one Triton pass:
    _matmul's (c, extra): (gelu(h), h) and (dh, a or None); (a, (g, u)) and (dg, (du, a) or du)."""
    grad = epilogue in (EPI_GELU_GRAD, EPI_SWIGLU_GRAD)
    if grad and bias is not None:  # the backward products have none; the fused kernel would add one
        raise ValueError(f"epilogue {epilogue} takes no bias")
    c = _torch_product(a, b, bias)  # h, g or da: new and contiguous
    act = torch.empty_like(c) if not grad or store_act else None
    n, grid = c.numel(), (cdiv(c.numel(), POINTWISE_BLOCK),)
    if epilogue in (EPI_GELU, EPI_GELU_GRAD):
        h = aux.contiguous() if grad else c
        _gelu_pointwise_kernel[grid](h, act if act is not None else c, c, n, GRAD=grad, STORE_ACT=store_act,
                                     GELU_ERF=approximate == "none", RELU2=approximate == "relu2",
                                     BLOCK=POINTWISE_BLOCK, num_warps=4)
        return (c, act) if grad else (act, c)
    if grad:
        g, u, du = aux.contiguous(), aux2.contiguous(), torch.empty_like(c)
    else:
        g, u, du = c, _torch_product(a, b2, bias2), c
    _gate_pointwise_kernel[grid](g, u, act if act is not None else c, c, du, n, GRAD=grad, STORE_ACT=store_act,
                                 GATE_GELU=gate == "gelu", BLOCK=POINTWISE_BLOCK, num_warps=4)
    if grad:
        return c, ((du, act) if store_act else du)
    return act, (g, u)


def _split_path(a, b, bias, epilogue, aux, approximate, store_act, b2, bias2, aux2, gate) -> str:
    """_auto_path for a GELU or gated product: "triton" (the fused epilogue) or "torch" (_split_product)."""
    gelu = epilogue in (EPI_GELU, EPI_GELU_GRAD)

    def make_key():
        flags = (approximate == "none", approximate == "relu2") if gelu else (gate == "gelu",)
        return (*_key(a, b, bias if bias is not None else bias2), epilogue, store_act, *flags)

    return _auto_path(_GELU if gelu else _GATE, make_key, a, a.shape[0], lambda: {
        "triton": lambda: _matmul(a, b, bias, epilogue, aux, b2=b2, bias2=bias2, aux2=aux2, gate=gate,
                                  approximate=approximate, store_act=store_act, path="triton"),
        "torch": lambda: _split_product(a, b, bias, epilogue, aux, approximate, store_act, b2, bias2, aux2, gate)})


def _act_torch(h, approximate):
    """The non-gated MLP's activation in fp32, torch's ops: _mlp_act's, for _matmul's empty reduction."""
    h = h.float()
    return F.relu(h).square() if approximate == "relu2" else F.gelu(h, approximate=approximate)


def _gated(g, u, gate):
    """act(g) * u in fp32, torch's ops: the kernel's EPI_SWIGLU / STORE_ACT math for _matmul's empty reduction."""
    g = g.float()
    return (F.gelu(g, approximate="tanh") if gate == "gelu" else F.silu(g)) * u.float()


@on_tensor_device
def _matmul(a, b, bias=None, epilogue=EPI_NONE, aux=None, b_gelu=False, b2=None, bias2=None, aux2=None,
            a2=None, b_swiglu=False, gate="silu", approximate="tanh", store_act=False, path=None, tokens=None):
    """a [M, K] @ b [K, N] (any strides) -> new [M, N] tensor in a's dtype, and a second one: h
    (EPI_GELU), (g, u) (EPI_SWIGLU), du (EPI_SWIGLU_GRAD), else None. The SwiGLU operands: b2
    (b's layout), bias2, aux2 (u beside aux = g), a2 (a's layout: C = a @ b + a2 @ b2). gate: the
    activation of g in EPI_SWIGLU, EPI_SWIGLU_GRAD and b_swiglu, "silu" (SwiGLU) or "gelu" (GeGLU).
    approximate: the activation of EPI_GELU, EPI_GELU_GRAD and b_gelu, "tanh" or "none" (exact erf) GELU, or
    "relu2" (relu(h)^2: the modes keep their GELU names).
    store_act (EPI_GELU_GRAD, EPI_SWIGLU_GRAD only): also make the activation a [M, N] from aux (and aux2);
    the second return is then a (EPI_GELU_GRAD) or (du, a) (EPI_SWIGLU_GRAD). path: for a plain product (none of
    the above, or SUM2), "triton" or "torch" (torch.mm / addmm); for a GELU or gated product, "triton" (the fused
    epilogue) or "torch" (split: _split_product); None: as _plain_path / _split_path pick. tokens: a plain
    product's token count for that pick, M unless given (a weight gradient dW = dy^T a passes K: its M is a width)."""
    if gate not in GATES:
        raise ValueError(f"gate must be one of {', '.join(GATES)}, got {gate!r}")
    check_approximate(approximate)
    if store_act and epilogue not in (EPI_GELU_GRAD, EPI_SWIGLU_GRAD):
        raise ValueError(f"store_act needs epilogue EPI_GELU_GRAD or EPI_SWIGLU_GRAD, got {epilogue}")
    M, K = a.shape
    N = b.shape[1]
    if not b_gelu and not b_swiglu and M and N and K:  # the B prologues (no dh to make a beside) stay fused
        if epilogue == EPI_NONE:  # a plain product, or the gated MLPs' dx = dg W_gate + du W_up (SUM2)
            if (path or _plain_path(a, b, bias, a2, b2, M if tokens is None else tokens)) == "torch":
                return _torch_product(a, b, bias, a2, b2), None
        elif a2 is None:
            if (path or _split_path(a, b, bias, epilogue, aux, approximate, store_act, b2, bias2, aux2,
                                    gate)) == "torch":
                return _split_product(a, b, bias, epilogue, aux, approximate, store_act, b2, bias2, aux2, gate)

    def new():
        return torch.empty((M, N), device=a.device, dtype=a.dtype)

    c = new()
    h = new() if epilogue in (EPI_GELU, EPI_SWIGLU) or store_act else None
    h2 = new() if epilogue in (EPI_SWIGLU, EPI_SWIGLU_GRAD) else None
    if epilogue == EPI_SWIGLU:
        extra = (h, h2)
    elif epilogue == EPI_SWIGLU_GRAD:
        extra = (h2, h) if store_act else h2
    else:
        extra = h
    if M == 0 or N == 0:
        return c, extra
    if K == 0:  # empty reduction: the kernel's k-loop would not run; keep the semantics explicit
        c.zero_()
        if epilogue == EPI_SWIGLU:
            h.copy_(bias if bias is not None else c)
            h2.copy_(bias2 if bias2 is not None else c)
            c = _gated(h, h2, gate).to(c.dtype)
            return c, extra
        if epilogue == EPI_SWIGLU_GRAD:
            h2.zero_()
            if store_act:
                h.copy_(_gated(aux, aux2, gate))
            return c, extra
        if bias is not None:
            c += bias
        if epilogue == EPI_GELU:
            h.copy_(c)
            c = _act_torch(c, approximate).to(c.dtype)
        elif epilogue == EPI_GELU_GRAD:
            c.zero_()
            if store_act:
                h.copy_(_act_torch(aux, approximate))
        return c, extra
    # Hout / Aux (and their second ones) share a layout: the outputs are new, the saved ones made so
    outs = [t for t in (h, h2) if t is not None]
    x = outs[0] if outs else (aux if aux is not None else c)
    if aux2 is not None:
        aux, aux2 = aux.contiguous(), aux2.contiguous()
        x = aux
    if store_act:  # a is new: the aux it is made from must share its layout
        aux = aux.contiguous()
    if b2 is not None and b2.stride() != b.stride():
        b, b2 = b.contiguous(), b2.contiguous()
    if a2 is not None and a2.stride() != a.stride():
        a, a2 = a.contiguous(), a2.contiguous()
    bias = bias.contiguous() if bias is not None else None  # the kernel reads it at unit stride
    bias2 = bias2.contiguous() if bias2 is not None else None
    if (bias is None) != (bias2 is None) and epilogue == EPI_SWIGLU:  # one flag for both: zeros for a missing one
        bias = bias if bias is not None else bias2.new_zeros(N)
        bias2 = bias2 if bias2 is not None else bias.new_zeros(N)
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)
    tma_ok = _tma_ok(a, b, a2, b2)
    if tma_ok and not triton_interpreting():
        triton.set_allocator(tma_scratch)  # a context variable: set where the launch runs (serve's engine thread)
    launch_tuned(
        _matmul_kernel, grid,
        a, b, c, bias if bias is not None else c, aux if aux is not None else x, h if h is not None else x,
        a2 if a2 is not None else a, b2 if b2 is not None else b, bias2 if bias2 is not None else c,
        aux2 if aux2 is not None else x, h2 if h2 is not None else x, M, N, K, _bucket(M), _bucket(K),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        x.stride(0), x.stride(1), int(tma_ok),
        HAS_BIAS=bias is not None, B_GELU=b_gelu, EPILOGUE=epilogue, B_SWIGLU=b_swiglu, SUM2=a2 is not None,
        GATE_GELU=gate == "gelu", GELU_ERF=approximate == "none", RELU2=approximate == "relu2", STORE_ACT=store_act,
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32",  # tf32 only affects fp32 inputs
        A_T=a.stride(1) != 1, B_T=b.stride(1) != 1)
    return c, extra


# TMA (Hopper's tensor memory accelerator) reads a tile given a descriptor: the base and every stride but the unit
# one 16-byte aligned. Where an operand is not (a view at an odd offset, a width that is not a multiple of 8 in
# bf16), the pointer configs run. TMA_INTERPRETED: a test drives the TMA loads through the interpreter.
# TRITONGPT_MATMUL_TMA=0 (or `with matmul_tma(False)`) keeps every launch on the pointer configs: `bench kernels
# --ops matmul`'s triton-pointer provider, to time the two apart.
TMA_INTERPRETED = False
MATMUL_TMA = os.environ.get("TRITONGPT_MATMUL_TMA", "1") != "0"


@contextlib.contextmanager
def matmul_tma(on: bool):
    """Within it, the matmul's TMA configs may run (on, the default) or not."""
    global MATMUL_TMA
    saved, MATMUL_TMA = MATMUL_TMA, bool(on)
    try:
        yield
    finally:
        MATMUL_TMA = saved


def _tma_readable(t) -> bool:
    """t [R, C] can be read through a descriptor in the layout _matmul_kernel gives it (A_T / B_T: C's stride not 1)."""
    row, col = t.stride()
    size = t.element_size()
    if t.data_ptr() % 16:
        return False
    if col == 1:
        return row > 0 and row * size % 16 == 0
    return row == 1 and col > 0 and col * size % 16 == 0  # (a stride of 0, a broadcast: no descriptor)


def _tma_ok(a, b, a2=None, b2=None) -> bool:
    """Every operand of a _matmul_kernel launch readable by TMA on a device that has it, in a 16-bit dtype: fp32's
    dot runs on FMAs (PRECISION "ieee"), no wgmma to feed, and through descriptors ptxas builds every TMA config at
    32 registers a thread with ~17 KB of spills (sm_90, offline build) where the pointer ones spill nothing."""
    if not MATMUL_TMA or a.element_size() != 2:
        return False
    if triton_interpreting():
        if not TMA_INTERPRETED:
            return False
    elif not _has_tma(a.device):
        return False
    return all(_tma_readable(t) for t in (a, b, a2, b2) if t is not None)


# Launchers: the products of the table at the top; the custom ops below check the device first.
# (bench/compile_check.py calls these on meta tensors to compile the exact launches for sm_90.)
def check_approximate(approximate) -> None:
    """approximate names an activation this kernel computes: a GELU, "tanh" (GPT-2's) or "none" (exact, erf), or
    "relu2" (squared ReLU)."""
    if approximate not in ACTIVATIONS:
        raise ValueError(f"approximate must be one of {', '.join(APPROXIMATES)} (F.gelu's names) or relu2 (the "
                         f"squared ReLU), got {approximate!r}")


def _fwd_launch(x, w1, b1, w2, b2, approximate="tanh"):
    h_act, h = _matmul(x, w1.t(), b1, EPI_GELU, approximate=approximate)  # h_act is a = gelu(h)
    y, _ = _matmul(h_act, w2.t(), b2)
    return y, h


def _bwd_launch(dy, x, h, w1, w2, needs=(True,) * 5, approximate="tanh"):
    """-> (dx, dw1, db1, dw2, db2). needs: which of the five to make (autograd's
    needs_input_grad): with frozen weights their products are skipped (dW1 and dW2 are half of
    backward's FLOPs); a gradient not made comes back as an empty tensor. approximate: the forward's GELU."""
    need_dx, need_dw1, need_db1, need_dw2, need_db2 = needs

    def skipped():
        return dy.new_empty(0)  # one per output: a custom op's outputs may not alias each other

    dh = act = None
    if need_dx or need_dw1 or need_db1:  # [M, H]; and a = gelu(h) beside it if dW2 wants it (h is read anyway)
        dh, act = _matmul(dy, w2, epilogue=EPI_GELU_GRAD, aux=h, approximate=approximate, store_act=need_dw2)
    if not need_dw2:
        dw2 = skipped()
    elif act is not None:  # dy^T a, a plain matmul; a is freed right after: one transient [M, H]
        dw2, _ = _matmul(dy.t(), act, tokens=dy.shape[0])
        act = None
    else:  # no dh to make a beside (W1 frozen, no dx): gelu(h) recomputed on the B tiles as loaded
        dw2, _ = _matmul(dy.t(), h, b_gelu=True, approximate=approximate)
    dw1 = _matmul(dh.t(), x, tokens=x.shape[0])[0] if need_dw1 else skipped()  # [H, C]
    dx = _matmul(dh, w1)[0] if need_dx else skipped()                  # [M, C]
    db1 = dh.sum(0, dtype=torch.float32).to(w1.dtype) if need_db1 else skipped()
    db2 = dy.sum(0, dtype=torch.float32).to(w2.dtype) if need_db2 else skipped()
    return dx, dw1, db1, dw2, db2


# The plain products (the second Linear, dW2, dW1, dx) take _plain_path's pick: in fp32 this kernel always (the
# same IEEE products on every device; addmm on a GPU may take TF32 depending on global flags).
def _check_op_shapes(x, w1, b1, w2, b2, **grads):
    """The shapes, dtype and device the products need: checked in the ops (and their fake impls,
    so torch.compile reports them while tracing), so also for a direct call of an op, where a w1
    of another width was multiplied as it lay: garbage, no error. grads: backward's dy and h."""
    check_tensor(x, "x", ndim=2)
    M, C = x.shape
    check_tensor(w1, "w1", ndim=2)
    H = w1.shape[0]
    check_tensor(w1, "w1", shape=(H, C))
    check_tensor(w2, "w2", shape=(C, H))
    if b1 is not None:
        check_tensor(b1, "b1", shape=(H,))
    if b2 is not None:
        check_tensor(b2, "b2", shape=(C,))
    for name, shape in (("dy", (M, C)), ("h", (M, H))):
        if name in grads:
            check_tensor(grads[name], name, shape=shape)
    check_same_device(x=x, w1=w1, b1=b1, w2=w2, b2=b2, **grads)
    check_same_dtype(x=x, w1=w1, b1=b1, w2=w2, b2=b2, **grads)


@custom_op("tritongpt::gelu_mlp_fwd", mutates_args=())
def _gelu_mlp_fwd(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
                  b2: Optional[torch.Tensor], approximate: str = "tanh") -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, C] -> (y [M, C], h [M, H]); the activation a = gelu(h) is freed on return."""
    check_runnable(x, "x")
    _check_op_shapes(x, w1, b1, w2, b2)
    check_approximate(approximate)
    return _fwd_launch(x, w1, b1, w2, b2, approximate)


@_gelu_mlp_fwd.register_fake
def _(x, w1, b1, w2, b2, approximate="tanh"):
    _check_op_shapes(x, w1, b1, w2, b2)
    check_approximate(approximate)
    return x.new_empty((x.shape[0], w2.shape[0])), x.new_empty((x.shape[0], w1.shape[0]))


@custom_op("tritongpt::gelu_mlp_bwd", mutates_args=())
def _gelu_mlp_bwd(dy: torch.Tensor, x: torch.Tensor, h: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                  needs: list[bool], approximate: str = "tanh"
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx, dw1, db1, dw2, db2); those not in needs come back empty."""
    check_runnable(dy, "dy")
    _check_op_shapes(x, w1, None, w2, None, dy=dy, h=h)
    check_approximate(approximate)
    if len(needs) != 5:
        raise ValueError(f"needs must hold 5 flags (dx, dw1, db1, dw2, db2), got {len(needs)}")
    return _bwd_launch(dy, x, h, w1, w2, needs, approximate)


@_gelu_mlp_bwd.register_fake
def _(dy, x, h, w1, w2, needs, approximate="tanh"):
    _check_op_shapes(x, w1, None, w2, None, dy=dy, h=h)
    check_approximate(approximate)
    # new_empty, not empty_like: the real op returns fresh contiguous tensors whatever x's strides
    shapes = (x.shape, w1.shape, w1.shape[:1], w2.shape, w2.shape[:1])
    return tuple(t.new_empty(shape if need else (0,))
                 for t, shape, need in zip((x, w1, w1, w2, w2), shapes, needs))


class GeluMLPFunction(torch.autograd.Function):
    """Saves x and the pre-activation h only (plus the weights, which live anyway)."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, approximate="tanh"):
        shape = x.shape
        x2 = x.reshape(math.prod(shape[:-1]), shape[-1])  # not -1: C may be 0
        y, h = _gelu_mlp_fwd.call(x2, w1, b1, w2, b2, approximate)
        ctx.save_for_backward(x2, h, w1, w2)
        ctx.approximate = approximate
        return y.view(*shape[:-1], w2.shape[0])

    @staticmethod
    def backward(ctx, dy):
        first_order_only("gelu_mlp")
        x2, h, w1, w2 = ctx.saved_tensors
        dy2 = dy.reshape(x2.shape[0], dy.shape[-1])
        needs = list(ctx.needs_input_grad[:5])  # False for a frozen weight and for a bias that is None
        dx, dw1, db1, dw2, db2 = _gelu_mlp_bwd.call(dy2, x2, h, w1, w2, needs, ctx.approximate)
        dx = dx.view(*dy.shape[:-1], x2.shape[-1]) if needs[0] else dx
        return tuple(g if need else None for g, need in zip((dx, dw1, db1, dw2, db2), needs)) + (None,)


def gelu_mlp(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
             b2: Optional[torch.Tensor], approximate: str = "tanh") -> torch.Tensor:
    """gelu(x @ w1.T + b1) @ w2.T + b2 over the last dim of x (any leading dims). Differentiable.

    approximate: the GELU, "tanh" (GPT-2's gelu_new) or "none" (exact erf: GPT-NeoX's, Pythia's), as F.gelu says;
    or "relu2", relu(h)^2 in its place (relu2_mlp).

    w1 [H, C], w2 [C, H] (nn.Linear layout; H is usually 4C), b1 [H] / b2 [C] or None.
    All tensors share one dtype (fp32/bf16/fp16) and device. Under torch.autocast the inputs
    are cast to the autocast dtype first, as nn.Linear would be.
    """
    no_func_transform("gelu_mlp")
    check_approximate(approximate)
    for name, t in (("x", x), ("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if t is not None or name in ("x", "w1", "w2"):
            check_tensor(t, name)
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dim (the feature one), got a scalar")
    check_same_device(x=x, w1=w1, b1=b1, w2=w2, b2=b2)
    dt = autocast_dtype(x.device)
    if dt is not None:
        x, w1, w2 = x.to(dt), w1.to(dt), w2.to(dt)
        b1 = b1.to(dt) if b1 is not None else None
        b2 = b2.to(dt) if b2 is not None else None
    return GeluMLPFunction.apply(x, w1, b1, w2, b2, approximate)  # shapes and dtypes: checked by the op


def relu2_mlp(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
              b2: Optional[torch.Tensor]) -> torch.Tensor:
    """relu(x @ w1.T + b1)^2 @ w2.T + b2, the squared-ReLU MLP (Arcee's, Nemotron's): gelu_mlp's kernel and
    products with the RELU2 epilogues. Reference: model/layers.py's FeedForward(activation="relu2")."""
    return gelu_mlp(x, w1, b1, w2, b2, approximate="relu2")


__all__ = ["gelu_mlp", "relu2_mlp", "GeluMLPFunction", "mlp_matmul"]
