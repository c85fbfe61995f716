"""Mixture-of-experts MLP in Triton as grouped GEMMs: every expert's gated MLP
y_e = (act(x_e @ Wg_e.T) * (x_e @ Wu_e.T)) @ Wd_e.T in one launch per product, forward and backward,
with act silu (SwiGLU: Mixtral's, Qwen3-MoE's, OLMoE's) or gelu_tanh (GeGLU); or GPT-OSS's experts:
biases bg_e, bu_e on g and u and bd_e on y_e (in the products' epilogues), and activation "gpt_oss", the
clamped SwiGLU a = (clamp(u, -limit, limit) + 1) * gc * sigmoid(alpha gc), gc = min(g, limit) (CLAMP, a
constexpr: the other activations compile without it; limit and alpha fp32).

Reference module: `tritongpt.model.layers.MoEFeedForward` (router, top-k, weights and the combine stay
in the module; this kernel is the experts), and `tritongpt.model.layers.MXFP4MoEFeedForward` for GPT-OSS's
experts kept MXFP4 (moe_mlp_mxfp4, at the end of this file). The router's choice experts [N, k] is turned into an order
in torch: the N*k (token, slot) assignments sorted by expert (stable argsort of the flat ids), and each
expert's first sorted row (offsets [E+1], by searchsorted: no host sync). The sorted rows of expert e
are offsets[e]..offsets[e+1]; sorted row r is assignment order[r], token order[r] // k.

Row tiles: BLOCK_M sorted rows of ONE expert. Their count is data dependent, so the grid launches the
bound ceil(N*k / BLOCK_M) + E (each expert wastes at most one partial tile); a program walks the E
offsets to find its expert and rows, and one past the last tile has no K steps and stores nothing. Each
product is kernels/mlp.py's tiled matmul (BLOCK_M x BLOCK_N tiles, K in BLOCK_K steps, fp32
accumulators, the gate epilogues) with the expert's weight slice as B:

  forward   g = x[tok] @ Wg_e.T, u = x[tok] @ Wu_e.T   ONE launch: the A tile is x's rows loaded
            a = act(g) * u                            through the token index (no sorted copy of
                                                      x), two accumulators; writes g, u (saved)
                                                      and a (read once, then freed)
            y[order] = a @ Wd_e.T                     rows stored at their (token, slot): y [N, k, C]
  backward  da = dy[order] @ Wd_e                     never stored: dg = da * u * act'(g) and
                                                      du = da * act(g) from the one accumulator,
                                                      and a = act(g) * u stored beside them when
                                                      dWd is wanted (g, u are read there anyway)
            dx[order] = dg @ Wg_e + du @ Wu_e         one launch (two products, one accumulator),
                                                      fp32 rows at their (token, slot), summed
                                                      over k in torch (deterministic: no atomics)
            dWd_e = dy[order_e].T @ a_e               grid over (expert, output tile), each looping
            dWg_e = dg_e.T @ x[tok_e]                 over its expert's rows (an idle expert's
            dWu_e = du_e.T @ x[tok_e]                 loop is empty: exact zeros); dWd from that
                                                      a, freed once dWd is made (a recomputed
                                                      from g, u on the tiles as loaded only when
                                                      there is no dg/du launch: gate, up and x
                                                      frozen); dWg and dWu in one launch (one x
                                                      tile, two acc)
            dbg_e, dbu_e = column sums of dg_e, du_e   one launch of the dW kernel against a column of
            dbd_e = column sums of dy[order_e]        ones (stride 0): fp32 sums in a fixed order
            (only the gradients autograd asks for: a frozen weight skips its product)

GPT-OSS: g and u are stored with their biases and unclamped, and the dg/du epilogue reads its masks from
them: du = da * gc sigmoid(alpha gc) where -limit < u < limit, dg = da * (uc + 1) * d(gc sigmoid(alpha gc))
where g < limit, 0 elsewhere (strict, as torch.clamp's backward: 0 at exactly the limit).

So x, g and u (sorted rows, [N*k, H] each) and the order are saved, as swiglu_mlp saves per expert.
The routing-weight combine out = sum_k w[n, k] y[n, k] stays in torch, so autograd gives the router
its gradient through w. Math is fp32; fp32 inputs use IEEE products (no TF32) so fp32 parity holds;
bf16/fp16 use tensor cores with fp32 accumulation.

Public API: `moe_mlp(x, experts, w_gate, w_up, w_down, activation="silu", *, b_gate=None, b_up=None,
b_down=None, limit=7.0, alpha=1.702) -> y [N, k, C]`, built from
the custom ops `tritongpt::moe_mlp_fwd` / `tritongpt::moe_mlp_bwd` (with fake impls) inside an
autograd.Function, so it runs under torch.compile as opaque calls in one graph. Expert ids out of
[0, E) are refused by moe_mlp (one device-to-host read of a flag; MoEFeedForward's top-k ids are in
range by construction and skip it); the ops themselves never read outside the weights for any ids, but
leave the rows of an id out of range unwritten.
Tested in tests/test_moe_kernel.py against a float64 loop over experts.

MXFP4 (GPT-OSS's experts as the Hub's folders hold them: `moe_mlp_mxfp4`): the same launches with each weight
tile read from the uint8 blocks and e8m0 scales and decoded in registers in the K loop (_mxfp4_tile: the e2m1
code's float32 bits times 2 ** (s - 127) from the scale byte's, exact; then tl.dot in the activations' dtype),
forward and dx (the experts frozen: no dW, no bias gradients). Tested in tests/test_moe_mxfp4.py.
"""
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from tritongpt._env import triton_interpreting
from tritongpt.kernels._common import (autocast_dtype, autotuned, cast, cdiv, check_runnable, check_same_device,
                                       check_same_dtype, check_tensor, custom_op, dot, first_order_only, launch_tuned,
                                       no_func_transform, on_tensor_device)
from tritongpt.kernels.mlp import (EPI_NONE, EPI_SWIGLU, EPI_SWIGLU_GRAD, GATES, _bucket, _gate_act, _sigmoid,
                                   _swiglu_epilogue, _swiglu_grad_epilogue)

NAMES = ("x", "experts", "w_gate", "w_up", "w_down")
BIAS_NAMES = ("b_gate", "b_up", "b_down")
ID_DTYPES = (torch.int64, torch.int32)
# the gated MLPs' gates, and GPT-OSS's clamped SwiGLU (its limit and alpha are arguments of their own)
ACTIVATIONS = (*GATES, "gpt_oss")


def _configs():
    if triton_interpreting():
        # The interpreter costs per program: one small tile, so the tests' few dozen rows still
        # cross tile boundaries and take more than one K step.
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    cfg = triton.Config
    return [
        cfg({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=4),
        cfg({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
        cfg({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
        cfg({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    ]


@triton.jit
def _row_tile(Offsets, E, pid_m, BLOCK_M: tl.constexpr):
    """Row tile pid_m of the grouped schedule -> (expert, first sorted row, the expert's end row).
    Each expert's rows take cdiv(rows, BLOCK_M) tiles in expert order; past the last, end <= first."""
    expert = pid_m * 0
    row0 = tl.load(Offsets + E)  # past every expert's rows: no row of this tile is valid
    row_end = row0
    first = row0 * 0  # the offsets' integer type, so the loop keeps one type
    for e in range(0, E):
        start = tl.load(Offsets + e)
        end = tl.load(Offsets + e + 1)
        n = (end - start + BLOCK_M - 1) // BLOCK_M
        hit = (pid_m >= first) & (pid_m < first + n)
        expert = tl.where(hit, e, expert)
        row0 = tl.where(hit, start + (pid_m - first) * BLOCK_M, row0)
        row_end = tl.where(hit, end, row_end)
        first += n
    return expert, row0, row_end


@triton.jit
def _expert_act(g, u, GATE_GELU: tl.constexpr, CLAMP: tl.constexpr, limit, alpha):
    """a from fp32 g and u: act(g) * u, or with CLAMP GPT-OSS's clamped SwiGLU (transformers' GptOssExperts):
    g = min(g, limit), u = clamp(u, -limit, limit), a = (u + 1) * g * sigmoid(alpha * g)."""
    if CLAMP:
        gc = tl.minimum(g, limit)
        uc = tl.minimum(tl.maximum(u, -limit), limit)
        a = (uc + 1.0) * (gc * _sigmoid(alpha * gc))
    else:
        a = _gate_act(g, GATE_GELU) * u
    return a


@triton.jit
def _expert_epilogue(acc, acc2, Hout, Hout2, x_off, mask, GATE_GELU: tl.constexpr, CLAMP: tl.constexpr, limit,
                     alpha):
    """EPI_SWIGLU: kernels/mlp.py's _swiglu_epilogue, or with CLAMP the same with GPT-OSS's activation: g and u
    stored unclamped and rounded (backward's masks are read from them), a made from the rounded ones."""
    if CLAMP:
        g = cast(acc, Hout.dtype.element_ty)
        u = cast(acc2, Hout2.dtype.element_ty)
        tl.store(Hout + x_off, g, mask=mask)
        tl.store(Hout2 + x_off, u, mask=mask)
        a = _expert_act(g.to(tl.float32), u.to(tl.float32), GATE_GELU, CLAMP, limit, alpha)
    else:
        a = _swiglu_epilogue(acc, acc2, Hout, Hout2, x_off, mask, GATE_GELU)
    return a


@triton.jit
def _expert_grad_epilogue(da, Aux, Aux2, Hout, Hout2, x_off, mask, GATE_GELU: tl.constexpr, STORE_ACT: tl.constexpr,
                          CLAMP: tl.constexpr, limit, alpha):
    """EPI_SWIGLU_GRAD: kernels/mlp.py's _swiglu_grad_epilogue, or with CLAMP GPT-OSS's derivatives: with
    gc = min(g, limit), s = sigmoid(alpha gc), glu = gc s and uc = clamp(u, -limit, limit),
    du = da * glu where -limit < u < limit, else 0; dg = da * (uc + 1) * s (1 + alpha gc (1 - s)) where
    g < limit, else 0. Strict, as torch.clamp's backward (the reference's autograd): its gradient at exactly
    the limit is 0. a = (uc + 1) glu stored to Hout with STORE_ACT, rounded as _expert_epilogue's."""
    if CLAMP:
        g = tl.load(Aux + x_off, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(Aux2 + x_off, mask=mask, other=0.0).to(tl.float32)
        gc = tl.minimum(g, limit)
        uc = tl.minimum(tl.maximum(u, -limit), limit)
        s = _sigmoid(alpha * gc)
        glu = gc * s
        if STORE_ACT:
            tl.store(Hout + x_off, cast((uc + 1.0) * glu, Hout.dtype.element_ty), mask=mask)
        du = tl.where((u > -limit) & (u < limit), da * glu, 0.0)
        tl.store(Hout2 + x_off, cast(du, Hout2.dtype.element_ty), mask=mask)
        dg = tl.where(g < limit, da * (uc + 1.0) * (s * (1.0 + alpha * gc * (1.0 - s))), 0.0)
    else:
        dg = _swiglu_grad_epilogue(da, Aux, Aux2, Hout, Hout2, x_off, mask, GATE_GELU, STORE_ACT)
    return dg


@triton.jit
def _mxfp4_tile(Blocks, Scales, w_off, s_off, kk, offs_n, mask, stride_br, stride_sr, MXFP4: tl.constexpr,
                dtype: tl.constexpr):
    """B's [BLOCK_K, BLOCK_N] tile decoded from an MXFP4 weight W [R, G * 32] (blocks: a row's G * 16 bytes
    contiguous, row stride stride_br; scales: G e8m0 bytes a row, row stride stride_sr): MXFP4 1 reads
    B[k, n] = W[n, k] (the forward products: blocks along K), 2 B[k, n] = W[k, n] (backward's dx and da: blocks
    along N). Value c of a row is byte c // 2's low (c even) or high nibble, an e2m1 code (sign bit 3, exponent
    bits 2-1 of bias 1, mantissa bit 0) made a float32 from its bits, times 2 ** (s - 127) made from the scale's
    bits (0x400000, a subnormal, for s 0): both exact, so the product is the one mxfp4_dequantize gives, bit for bit,
    then cast to dtype (the activations', which holds it: bf16 and fp32 have float32's exponent range)."""
    if MXFP4 == 1:
        r = offs_n.to(tl.int64)[None, :]
        c = kk.to(tl.int64)[:, None]
    else:
        r = kk.to(tl.int64)[:, None]
        c = offs_n.to(tl.int64)[None, :]
    byte = tl.load(Blocks + w_off + r * stride_br + c // 2, mask=mask, other=0).to(tl.int32)
    code = (byte >> ((c % 2) * 4).to(tl.int32)) & 15
    s = tl.load(Scales + s_off + r * stride_sr + c // 32, mask=mask, other=127).to(tl.int32)
    mag = code & 7
    ex = mag >> 1
    man = mag & 1
    # exponent 0: 0 or 0.5 (0.5 is 126 << 23); else 2 ** (ex - 1) * (1 + man / 2)
    bits = tl.where(ex == 0, man * (126 << 23), ((ex + 126) << 23) | (man << 22))
    val = bits.to(tl.float32, bitcast=True)
    val = tl.where((code & 8) != 0, -val, val)  # (-0.0 for code 8, as the table's)
    scale = tl.where(s == 0, 0x400000, s << 23).to(tl.float32, bitcast=True)
    return (val * scale).to(dtype)


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "EPILOGUE", "SUM2", "GATE_GELU", "GATHER_A",
                                          "SCATTER_C", "STORE_ACT", "HAS_BIAS", "CLAMP", "MXFP4"])
@triton.jit
def _grouped_kernel(A, AIdx, B, C, CIdx, Offsets, Aux, Hout, A2, B2, Aux2, Hout2, Bias, Bias2, SB, SB2, N, K, E,
                    A_DIV, M_BUCKET, limit, alpha,
                    stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn,
                    stride_xm, stride_xn, stride_se, stride_sr,
                    GATHER_A: tl.constexpr, SCATTER_C: tl.constexpr, EPILOGUE: tl.constexpr, SUM2: tl.constexpr,
                    GATE_GELU: tl.constexpr, STORE_ACT: tl.constexpr, HAS_BIAS: tl.constexpr, CLAMP: tl.constexpr,
                    MXFP4: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """For each sorted row r of expert e: C[r'] = A[r''] @ B[e] with the gate epilogues of kernels/mlp.py.

    A's row is r, or AIdx[r] // A_DIV with GATHER_A (x through the token index, dy through the order);
    C's row is r, or CIdx[r] with SCATTER_C (back to (token, slot)). B[e] is [K, N] by strides from
    B + e * stride_be (a weight slice, transposed for free); B2 beside it (EPI_SWIGLU: the up weight;
    SUM2: C = A @ B + A2 @ B2). Aux/Hout/Aux2/Hout2 are sorted [rows, N] tensors: g and u written
    (EPI_SWIGLU) or read (EPI_SWIGLU_GRAD, which writes dg to C and du to Hout2, and with STORE_ACT the
    activation a = act(g) * u to Hout, for dW_down).
    HAS_BIAS: Bias[e] [N] (contiguous [E, N]) added to the accumulator before the epilogue, and Bias2[e] to the
    up's (EPI_SWIGLU). CLAMP: the activation is GPT-OSS's clamped SwiGLU (_expert_act), limit and alpha fp32.
    MXFP4 (1 or 2, _mxfp4_tile): B and B2 are MXFP4 blocks (uint8) with their scales SB and SB2, decoded in
    registers a tile at a time: stride_be / stride_bk are then the blocks' expert and row strides, stride_se /
    stride_sr the scales' (stride_bn unused); 0: B and B2 float by their strides.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert, row0, row_end = _row_tile(Offsets, E, pid_m, BLOCK_M)
    rows = row0 + tl.arange(0, BLOCK_M)
    m_ok = rows < row_end
    k_steps = tl.where(row0 < row_end, tl.cdiv(K, BLOCK_K), 0)  # a tile past the end does nothing
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    if GATHER_A:
        a_rows = tl.load(AIdx + rows, mask=m_ok, other=0).to(tl.int64) // A_DIV
    else:
        a_rows = rows.to(tl.int64)
    w_off = expert.to(tl.int64) * stride_be
    a_ptrs = A + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = B + w_off + offs_k.to(tl.int64)[:, None] * stride_bk + offs_n[None, :] * stride_bn
    b2_ptrs = B2 + w_off + offs_k.to(tl.int64)[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # the up projection's (EPI_SWIGLU only)
    s_off = expert.to(tl.int64) * stride_se
    for k in range(0, k_steps):
        k_ok = offs_k < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if MXFP4:
            b = _mxfp4_tile(B, SB, w_off, s_off, k * BLOCK_K + offs_k, offs_n, k_ok[:, None] & n_ok[None, :],
                            stride_bk, stride_sr, MXFP4, A.dtype.element_ty)
        else:
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = dot(a, b, acc, PRECISION)
        if EPILOGUE == 3:  # the same x tile times the up weight's matching columns
            if MXFP4:
                b2 = _mxfp4_tile(B2, SB2, w_off, s_off, k * BLOCK_K + offs_k, offs_n, k_ok[:, None] & n_ok[None, :],
                                 stride_bk, stride_sr, MXFP4, A.dtype.element_ty)
            else:
                b2 = tl.load(b2_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc2 = dot(a, b2, acc2, PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
        b2_ptrs += BLOCK_K * stride_bk
    if SUM2:  # + A2 @ B2 into the same accumulator (A2 shares A's rows and strides)
        a_ptrs = A2 + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
        b2_ptrs = B2 + w_off + offs_k.to(tl.int64)[:, None] * stride_bk + offs_n[None, :] * stride_bn
        for k in range(0, k_steps):
            k_ok = offs_k < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if MXFP4:
                b = _mxfp4_tile(B2, SB2, w_off, s_off, k * BLOCK_K + offs_k, offs_n, k_ok[:, None] & n_ok[None, :],
                                stride_bk, stride_sr, MXFP4, A.dtype.element_ty)
            else:
                b = tl.load(b2_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = dot(a, b, acc, PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b2_ptrs += BLOCK_K * stride_bk

    mask = m_ok[:, None] & n_ok[None, :]
    if HAS_BIAS:  # the expert's bias row, before the activation (g and u are stored with it)
        b_off = expert.to(tl.int64) * N + offs_n
        acc += tl.load(Bias + b_off, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if EPILOGUE == 3:
            acc2 += tl.load(Bias2 + b_off, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    x_off = rows.to(tl.int64)[:, None] * stride_xm + offs_n[None, :] * stride_xn
    if EPILOGUE == 3:
        acc = _expert_epilogue(acc, acc2, Hout, Hout2, x_off, mask, GATE_GELU, CLAMP, limit, alpha)
    elif EPILOGUE == 4:  # acc is da = dy @ Wd_e: dg to C, du to Hout2
        acc = _expert_grad_epilogue(acc, Aux, Aux2, Hout, Hout2, x_off, mask, GATE_GELU, STORE_ACT, CLAMP, limit,
                                    alpha)
    if SCATTER_C:
        c_rows = tl.load(CIdx + rows, mask=m_ok, other=0).to(tl.int64)
    else:
        c_rows = rows.to(tl.int64)
    c_ptrs = C + c_rows[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, cast(acc, C.dtype.element_ty), mask=mask)


autotuned("moe.grouped", _grouped_kernel)


@triton.autotune(configs=_configs(), key=["M", "N", "K_BUCKET", "L_GATHER", "R_GATHER", "R_SWIGLU", "TWO",
                                          "GATE_GELU", "CLAMP"])
@triton.jit
def _expert_grad_kernel(L, LIdx, L2, R, RIdx, R2, Out, Out2, Offsets, M, N, L_DIV, R_DIV, K_BUCKET, limit, alpha,
                        stride_lr, stride_lm, stride_rr, stride_rn, stride_oe, stride_om, stride_on,
                        L_GATHER: tl.constexpr, R_GATHER: tl.constexpr, R_SWIGLU: tl.constexpr,
                        TWO: tl.constexpr, GATE_GELU: tl.constexpr, CLAMP: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Out[e] [M, N] = sum over expert e's sorted rows r of L[r', :M]^T R[r'', :N] (a weight's gradient).

    Program (tile, expert): loops over offsets[e]..offsets[e+1] in BLOCK_K rows (none for an idle
    expert: zeros stored). L's row is r or LIdx[r] // L_DIV (L_GATHER), R's likewise (R_GATHER).
    R_SWIGLU: R is g and R2 u, the tile recomputed as act(g) * u (dW_down's a; CLAMP: GPT-OSS's). TWO:
    Out2[e] = sum L2^T R too, L2 beside L (dW_up's du beside dW_gate's dg: one R tile for both). A bias's
    gradient is this with R a column of ones (stride 0, N 1): Out[e] the column sums of expert e's L rows.
    """
    pid = tl.program_id(0)
    expert = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    start = tl.load(Offsets + expert)
    end = tl.load(Offsets + expert + 1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        r_ok = rows < end
        if L_GATHER:
            l_rows = tl.load(LIdx + rows, mask=r_ok, other=0).to(tl.int64) // L_DIV
        else:
            l_rows = rows.to(tl.int64)
        if R_GATHER:
            r_rows = tl.load(RIdx + rows, mask=r_ok, other=0).to(tl.int64) // R_DIV
        else:
            r_rows = rows.to(tl.int64)
        l_off = l_rows[None, :] * stride_lr + offs_m[:, None] * stride_lm  # [BLOCK_M, BLOCK_K]: L^T's tile
        r_off = r_rows[:, None] * stride_rr + offs_n[None, :] * stride_rn
        l_mask = m_ok[:, None] & r_ok[None, :]
        r_mask = r_ok[:, None] & n_ok[None, :]
        lt = tl.load(L + l_off, mask=l_mask, other=0.0)
        rt = tl.load(R + r_off, mask=r_mask, other=0.0)
        if R_SWIGLU:  # recompute a = act(g) * u, rounded as forward stored it
            ut = tl.load(R2 + r_off, mask=r_mask, other=0.0)
            rt = cast(_expert_act(rt.to(tl.float32), ut.to(tl.float32), GATE_GELU, CLAMP, limit, alpha),
                      L.dtype.element_ty)
        acc = dot(lt, rt, acc, PRECISION)
        if TWO:
            acc2 = dot(tl.load(L2 + l_off, mask=l_mask, other=0.0), rt, acc2, PRECISION)
    mask = m_ok[:, None] & n_ok[None, :]
    o_off = expert.to(tl.int64) * stride_oe + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(Out + o_off, cast(acc, Out.dtype.element_ty), mask=mask)
    if TWO:
        tl.store(Out2 + o_off, cast(acc2, Out2.dtype.element_ty), mask=mask)


autotuned("moe.expert_grad", _expert_grad_kernel)


def _precision(t):
    return "ieee" if t.dtype == torch.float32 else "tf32"  # tf32 only affects fp32 inputs


def _route(experts, n_experts):
    """experts [N, k] -> (order [N*k]: flat (token, slot) indices sorted by expert, stable;
    offsets [E+1]: expert e's sorted rows are offsets[e]..offsets[e+1]). No host sync."""
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    ids = torch.arange(n_experts + 1, device=flat.device, dtype=flat.dtype)
    offsets = torch.searchsorted(flat[order], ids)  # ids out of [0, E) fall outside every expert's rows
    return order, offsets


class Mxfp4Weight:
    """An MXFP4 weight W [E, R, G * 32] as _grouped takes it in place of a float one: blocks uint8 [E, R, G, 16]
    (a row's last two dims contiguous) and scales uint8 [E, R, G] (last dim contiguous), views allowed (GPT-OSS's
    gate and up: the even and odd rows of gate_up_proj's). shape is the logical float shape, transpose(1, 2) the
    same bytes read transposed (B[k, n] = W[n, k]), as a float weight's transpose is a view: so _fwd_launch and
    _bwd_launch run unchanged on it."""

    def __init__(self, blocks, scales, transposed: bool = False):
        self.blocks, self.scales, self.transposed = blocks, scales, transposed
        E, R, G = scales.shape
        self.shape = torch.Size((E, G * 32, R) if transposed else (E, R, G * 32))
        self.device = blocks.device

    def transpose(self, d0, d1):
        assert (d0, d1) == (1, 2), (d0, d1)
        return Mxfp4Weight(self.blocks, self.scales, not self.transposed)

    def dim(self):
        return 3


def _mxfp4_args(b, b2):
    """_grouped_kernel's B, B2, SB, SB2, (stride_be, stride_bk, stride_bn), (stride_se, stride_sr) and MXFP4 flag for
    b (and b2 beside it, or None): float weights by their strides, Mxfp4Weight by its bytes'."""
    if not isinstance(b, Mxfp4Weight):
        b2 = b2 if b2 is not None else b
        if b2.stride() != b.stride():
            b, b2 = b.contiguous(), b2.contiguous()
        return b, b2, b, b2, b.stride(), (0, 0), 0
    b2 = b2 if b2 is not None else b
    if not isinstance(b2, Mxfp4Weight) or b2.transposed != b.transposed:
        raise ValueError("an MXFP4 weight beside a float one (or read the other way) in one product")
    parts = [b.blocks, b2.blocks, b.scales, b2.scales]
    if (b.blocks.stride() != b2.blocks.stride() or b.scales.stride() != b2.scales.stride()
            or b.blocks.stride()[2:] != (16, 1) or b.scales.stride(2) != 1):
        parts = [t.contiguous() for t in parts]
    blocks, blocks2, scales, scales2 = parts
    return (blocks, blocks2, scales, scales2, (blocks.stride(0), blocks.stride(1), 0),
            (scales.stride(0), scales.stride(1)), 1 if b.transposed else 2)


@on_tensor_device
def _grouped(a, b, n_rows, order, offsets, a_div=None, scatter=False, epilogue=EPI_NONE, b2=None, a2=None,
             aux=None, aux2=None, out=None, gate="silu", store_act=False, bias=None, bias2=None, limit=7.0,
             alpha=1.702):
    """The grouped product over n_rows sorted rows: b [E, K, N] by strides (a weight, transposed as a view).
    a_div: A's rows gathered through order // a_div (None: a is already in sorted rows). scatter: C's rows
    go to order[r] in `out` ([n_rows, N], given) instead of a new sorted tensor. -> (c, extra): extra
    (g, u) for EPI_SWIGLU, du for EPI_SWIGLU_GRAD ((du, a) with store_act: a = act(g) * u too), else None.
    gate: an ACTIVATIONS name ("gpt_oss": the clamped SwiGLU with limit and alpha). bias [E, N]: the expert's
    row added to the product (bias2 to the up's, EPI_SWIGLU; both or neither there)."""
    if store_act and epilogue != EPI_SWIGLU_GRAD:
        raise ValueError(f"store_act needs epilogue EPI_SWIGLU_GRAD, got {epilogue}")
    if epilogue == EPI_SWIGLU and (bias is None) != (bias2 is None):
        raise ValueError("EPI_SWIGLU adds the gate's bias and the up's together: give both bias and bias2 or neither")
    E, K, N = b.shape
    c = out if out is not None else a.new_empty((n_rows, N))
    h = a.new_empty((n_rows, N)) if epilogue == EPI_SWIGLU or store_act else None
    h2 = a.new_empty((n_rows, N)) if epilogue in (EPI_SWIGLU, EPI_SWIGLU_GRAD) else None
    extra = (h, h2) if epilogue == EPI_SWIGLU else ((h2, h) if store_act else h2)
    if n_rows == 0 or N == 0:
        return c, extra
    b, b2, sb, sb2, b_strides, s_strides, mxfp4 = _mxfp4_args(b, b2)
    if a2 is not None and a2.stride() != a.stride():
        a, a2 = a.contiguous(), a2.contiguous()
    if aux is not None:
        aux, aux2 = aux.contiguous(), aux2.contiguous()
    if bias is not None:  # the kernel reads expert e's row at e * N
        bias = bias.contiguous()
        bias2 = bias2.contiguous() if bias2 is not None else bias
    x = h if h is not None else (aux if aux is not None else c)
    grid = lambda meta: (cdiv(n_rows, meta["BLOCK_M"]) + E, cdiv(N, meta["BLOCK_N"]))
    launch_tuned(
        _grouped_kernel, grid,
        a, order, b, c, order, offsets, aux if aux is not None else x, x, a2 if a2 is not None else a,
        b2, aux2 if aux2 is not None else x, h2 if h2 is not None else x,
        bias if bias is not None else x, bias2 if bias is not None else x, sb, sb2,
        N, K, E, a_div or 1, _bucket(n_rows), float(limit), float(alpha),
        a.stride(0), a.stride(1), *b_strides, c.stride(0), c.stride(1),
        x.stride(0), x.stride(1), *s_strides,
        GATHER_A=a_div is not None, SCATTER_C=scatter, EPILOGUE=epilogue, SUM2=a2 is not None,
        GATE_GELU=gate == "gelu", STORE_ACT=store_act, HAS_BIAS=bias is not None, CLAMP=gate == "gpt_oss",
        MXFP4=mxfp4, PRECISION=_precision(a))
    return c, extra


@on_tensor_device
def _expert_grad(lhs, rhs, order, offsets, n_experts, l_div=None, r_div=None, lhs2=None, rhs2=None, gate="silu",
                 limit=7.0, alpha=1.702):
    """Per-expert lhs_e^T rhs_e over each expert's sorted rows -> [E, M, N] (and lhs2's beside it, or None).
    l_div / r_div: that operand's rows gathered through order // div (None: sorted rows). rhs2: rhs is g
    and rhs2 u, multiplied as act(g) * u (gate "gpt_oss": the clamped SwiGLU with limit and alpha)."""
    M, N = lhs.shape[1], rhs.shape[1]
    out = lhs.new_empty((n_experts, M, N))
    out2 = lhs.new_empty((n_experts, M, N)) if lhs2 is not None else None
    if out.numel() == 0:
        return out, out2
    if rhs2 is not None:
        rhs, rhs2 = rhs.contiguous(), rhs2.contiguous()
    if lhs2 is not None and lhs2.stride() != lhs.stride():
        lhs, lhs2 = lhs.contiguous(), lhs2.contiguous()
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]), n_experts)
    launch_tuned(
        _expert_grad_kernel, grid,
        lhs, order, lhs2 if lhs2 is not None else lhs, rhs, order, rhs2 if rhs2 is not None else rhs,
        out, out2 if out2 is not None else out, offsets, M, N, l_div or 1, r_div or 1, _bucket(order.numel()),
        float(limit), float(alpha),
        lhs.stride(0), lhs.stride(1), rhs.stride(0), rhs.stride(1), out.stride(0), out.stride(1), out.stride(2),
        L_GATHER=l_div is not None, R_GATHER=r_div is not None, R_SWIGLU=rhs2 is not None, TWO=lhs2 is not None,
        GATE_GELU=gate == "gelu", CLAMP=gate == "gpt_oss", PRECISION=_precision(lhs))
    return out, out2


def _expert_col_sums(lhs, order, offsets, n_experts, l_div=None, lhs2=None):
    """Per-expert column sums of lhs's rows (and lhs2's) -> [E, M]: a bias's gradient. _expert_grad's
    product with a column of ones (stride 0: nothing allocated but one element), so each expert's rows
    are summed in fp32 in a fixed order (deterministic, as torch's index_add_ on CUDA is not), in one
    launch for two."""
    ones = lhs.new_ones((1, 1)).expand(lhs.shape[0], 1)
    out, out2 = _expert_grad(lhs, ones, order, offsets, n_experts, l_div=l_div, lhs2=lhs2)
    return out.squeeze(2), (out2.squeeze(2) if out2 is not None else None)


# Launchers: the products of the table at the top (bench/compile_check.py calls them on meta tensors).
def _fwd_launch(x, experts, wg, wu, wd, activation="silu", bg=None, bu=None, bd=None, limit=7.0, alpha=1.702):
    """-> (y [N, k, C], g [N*k, H], u [N*k, H] in sorted rows, order [N*k], offsets [E+1]). bg, bu, bd: the
    experts' biases or None; g and u hold bg and bu (unclamped: backward's masks are read from them)."""
    (N, k), E = experts.shape, wg.shape[0]
    order, offsets = _route(experts, E)
    act = dict(gate=activation, limit=limit, alpha=alpha)
    a, (g, u) = _grouped(x, wg.transpose(1, 2), N * k, order, offsets, a_div=k, epilogue=EPI_SWIGLU,
                         b2=wu.transpose(1, 2), bias=bg, bias2=bu, **act)
    y = x.new_empty((N * k, wd.shape[1]))
    _grouped(a, wd.transpose(1, 2), N * k, order, offsets, scatter=True, out=y, bias=bd)
    return y.view(N, k, wd.shape[1]), g, u, order, offsets


def _bwd_launch(dy, x, g, u, order, offsets, wg, wu, wd, needs=(True,) * 4, activation="silu", limit=7.0,
                alpha=1.702):
    """dy [N, k, C] -> (dx, dw_gate, dw_up, dw_down, db_gate, db_up, db_down); needs: autograd's
    needs_input_grad for (x, w_gate, w_up, w_down), and for (b_gate, b_up, b_down) when there are biases
    (4 flags: none), a gradient not made comes back as an empty tensor (its products are skipped)."""
    need_dx, need_dwg, need_dwu, need_dwd = needs[:4]
    need_dbg, need_dbu, need_dbd = needs[4:] if len(needs) == 7 else (False,) * 3
    N, k, C = dy.shape
    E = wg.shape[0]
    dy2 = dy.reshape(N * k, C)

    def skipped():
        return dy.new_empty(0)  # one per output: a custom op's outputs may not alias each other

    dg = du = act = None
    if need_dx or need_dwg or need_dwu or need_dbg or need_dbu:  # [N*k, H] each, sorted rows; a = act(g) * u
        dg, extra = _grouped(dy2, wd, N * k, order, offsets, a_div=1, epilogue=EPI_SWIGLU_GRAD, aux=g, aux2=u,
                             gate=activation, limit=limit, alpha=alpha, store_act=need_dwd)  # beside, for dWd
        du, act = extra if need_dwd else (extra, None)
        del extra  # else the (du, a) tuple keeps a alive after dWd, through the products below
    if not need_dwd:
        dwd = skipped()
    elif act is not None:  # a plain per-expert product; a is freed right after
        dwd = _expert_grad(dy2, act, order, offsets, E, l_div=1)[0]
        act = None
    else:  # no dg/du launch to make a beside: recomputed on the tiles as loaded
        dwd = _expert_grad(dy2, g, order, offsets, E, l_div=1, rhs2=u, gate=activation, limit=limit, alpha=alpha)[0]
    # the biases': each expert's column sums of its rows' dg, du and dy (dy gathered through the order)
    dbd = _expert_col_sums(dy2, order, offsets, E, l_div=1)[0] if need_dbd else skipped()
    if need_dbg or need_dbu:
        lhs, lhs2 = (dg, du) if need_dbg else (du, None)
        first, second = _expert_col_sums(lhs, order, offsets, E, lhs2=lhs2 if need_dbu else None)
        dbg = first if need_dbg else skipped()
        dbu = (second if need_dbg else first) if need_dbu else skipped()
    else:
        dbg, dbu = skipped(), skipped()
    if need_dwg or need_dwu:  # one x tile for both when both are asked for
        lhs, lhs2 = (dg, du) if need_dwg else (du, None)
        lhs2 = lhs2 if need_dwu else None
        first, second = _expert_grad(lhs, x, order, offsets, E, r_div=k, lhs2=lhs2)
        dwg = first if need_dwg else skipped()
        dwu = (second if need_dwg else first) if need_dwu else skipped()
    else:
        dwg, dwu = skipped(), skipped()  # not one tensor twice: a custom op's outputs may not alias
    if need_dx:  # fp32 rows at their (token, slot), summed over the k slots in fp32
        rows = torch.empty((N * k, C), device=dy.device, dtype=torch.float32)
        _grouped(dg, wg, N * k, order, offsets, scatter=True, a2=du, b2=wu, out=rows)
        dx = rows.view(N, k, C).sum(1).to(x.dtype)
    else:
        dx = skipped()
    return dx, dwg, dwu, dwd, dbg, dbu, dbd


def _check_activation(activation, limit=7.0, alpha=1.702):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}, got {activation!r}")
    for name, value in (("limit", limit), ("alpha", alpha)):  # GPT-OSS's, as GPTConfig.swiglu_limit / _alpha
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0 (GPT-OSS's clamped SwiGLU), got {value!r}")


def _check_op_shapes(x, experts, wg, wu, wd, bg=None, bu=None, bd=None, **saved):
    """Shapes, dtypes and device the products need, in the ops and their fake impls. bg, bu, bd: the biases,
    all three or none. saved: backward's dy, g, u, order and offsets."""
    check_tensor(x, "x", ndim=2)
    N, C = x.shape
    check_tensor(experts, "experts", dtypes=ID_DTYPES, ndim=2)
    if experts.shape[0] != N or experts.shape[1] < 1:
        raise ValueError(f"experts has shape {tuple(experts.shape)}, expected ({N}, k) with k >= 1 "
                         f"(one row of expert ids per row of x)")
    k = experts.shape[1]
    check_tensor(wg, "w_gate", ndim=3)
    E, H = wg.shape[:2]
    check_tensor(wg, "w_gate", shape=(E, H, C))
    check_tensor(wu, "w_up", shape=(E, H, C))
    check_tensor(wd, "w_down", shape=(E, C, H))
    if E < 1:
        raise ValueError("w_gate has no experts (shape [0, H, C])")
    biases = dict(zip(BIAS_NAMES, (bg, bu, bd)))
    given = [n for n, t in biases.items() if t is not None]
    if given and len(given) != 3:  # one launch adds the gate's and the up's, the experts' MLPs have all or none
        raise ValueError(f"b_gate, b_up and b_down come together (GPT-OSS's experts have all three), got "
                         f"{' and '.join(given)} only")
    for name, shape in (("b_gate", (E, H)), ("b_up", (E, H)), ("b_down", (E, C))):
        if biases[name] is not None:
            check_tensor(biases[name], name, shape=shape)
    shapes = {"dy": (N, k, C), "g": (N * k, H), "u": (N * k, H), "order": (N * k,), "offsets": (E + 1,)}
    for name, t in saved.items():
        check_tensor(t, name, dtypes=ID_DTYPES if name in ("order", "offsets") else None, shape=shapes[name])
    floats = {n: t for n, t in saved.items() if n in ("dy", "g", "u")}
    check_same_device(x=x, experts=experts, w_gate=wg, w_up=wu, w_down=wd, **biases, **saved)
    check_same_dtype(x=x, w_gate=wg, w_up=wu, w_down=wd, **biases, **floats)


@custom_op("tritongpt::moe_mlp_fwd", mutates_args=())
def _moe_mlp_fwd(x: torch.Tensor, experts: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                 w_down: torch.Tensor, activation: str = "silu", b_gate: Optional[torch.Tensor] = None,
                 b_up: Optional[torch.Tensor] = None, b_down: Optional[torch.Tensor] = None, limit: float = 7.0,
                 alpha: float = 1.702) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [N, C], experts [N, k] -> (y [N, k, C], g, u [N*k, H] sorted, order [N*k], offsets [E+1])."""
    check_runnable(x, "x")
    _check_activation(activation, limit, alpha)
    _check_op_shapes(x, experts, w_gate, w_up, w_down, b_gate, b_up, b_down)
    return _fwd_launch(x, experts, w_gate, w_up, w_down, activation, b_gate, b_up, b_down, limit, alpha)


@_moe_mlp_fwd.register_fake
def _(x, experts, w_gate, w_up, w_down, activation="silu", b_gate=None, b_up=None, b_down=None, limit=7.0,
      alpha=1.702):
    _check_activation(activation, limit, alpha)
    _check_op_shapes(x, experts, w_gate, w_up, w_down, b_gate, b_up, b_down)
    (N, k), (E, H, C) = experts.shape, w_gate.shape
    return (x.new_empty((N, k, C)), x.new_empty((N * k, H)), x.new_empty((N * k, H)),
            experts.new_empty((N * k,), dtype=torch.int64), experts.new_empty((E + 1,), dtype=torch.int64))


def _check_needs(needs):
    if len(needs) not in (4, 7):
        raise ValueError(f"needs must hold 4 flags (dx, dw_gate, dw_up, dw_down), or 7 with the biases' (db_gate, "
                         f"db_up, db_down), got {len(needs)}")


@custom_op("tritongpt::moe_mlp_bwd", mutates_args=())
def _moe_mlp_bwd(dy: torch.Tensor, x: torch.Tensor, experts: torch.Tensor, g: torch.Tensor, u: torch.Tensor,
                 order: torch.Tensor, offsets: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                 w_down: torch.Tensor, needs: list[bool], activation: str = "silu", limit: float = 7.0,
                 alpha: float = 1.702) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                torch.Tensor, torch.Tensor]:
    """-> (dx, dw_gate, dw_up, dw_down, db_gate, db_up, db_down); those not in needs come back empty (the
    biases' always, with 4 flags). The biases' values are not needed: g and u hold them."""
    check_runnable(dy, "dy")
    _check_activation(activation, limit, alpha)
    _check_op_shapes(x, experts, w_gate, w_up, w_down, dy=dy, g=g, u=u, order=order, offsets=offsets)
    _check_needs(needs)
    return _bwd_launch(dy, x, g, u, order, offsets, w_gate, w_up, w_down, needs, activation, limit, alpha)


@_moe_mlp_bwd.register_fake
def _(dy, x, experts, g, u, order, offsets, w_gate, w_up, w_down, needs, activation="silu", limit=7.0, alpha=1.702):
    _check_activation(activation, limit, alpha)
    _check_op_shapes(x, experts, w_gate, w_up, w_down, dy=dy, g=g, u=u, order=order, offsets=offsets)
    _check_needs(needs)
    E, H = w_gate.shape[:2]
    shapes = (x.shape, w_gate.shape, w_up.shape, w_down.shape, (E, H), (E, H), (E, x.shape[1]))
    flags = list(needs) + [False] * (7 - len(needs))
    return tuple(x.new_empty(shape if need else (0,)) for shape, need in zip(shapes, flags))


class MoEMLPFunction(torch.autograd.Function):
    """Saves x, g, u and the routing order (plus the weights, which live anyway; the biases are not needed)."""

    @staticmethod
    def forward(ctx, x, experts, wg, wu, wd, activation="silu", bg=None, bu=None, bd=None, limit=7.0, alpha=1.702):
        y, g, u, order, offsets = _moe_mlp_fwd.call(x, experts, wg, wu, wd, activation, bg, bu, bd, limit, alpha)
        ctx.save_for_backward(x, experts, g, u, order, offsets, wg, wu, wd)
        ctx.activation, ctx.limit, ctx.alpha, ctx.bias = activation, limit, alpha, bg is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        first_order_only("moe_mlp")
        x, experts, g, u, order, offsets, wg, wu, wd = ctx.saved_tensors
        # False for a frozen weight; the biases' flags only when there are biases (4 flags: none made)
        needs = [ctx.needs_input_grad[i] for i in ((0, 2, 3, 4, 6, 7, 8) if ctx.bias else (0, 2, 3, 4))]
        grads = _moe_mlp_bwd.call(dy.contiguous(), x, experts, g, u, order, offsets, wg, wu, wd,
                                  needs, ctx.activation, ctx.limit, ctx.alpha)
        dx, dwg, dwu, dwd, dbg, dbu, dbd = (gr if need else None for gr, need in
                                            zip(grads, needs + [False] * (7 - len(needs))))
        return dx, None, dwg, dwu, dwd, None, dbg, dbu, dbd, None, None


def moe_mlp(x: torch.Tensor, experts: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
            w_down: torch.Tensor, activation: str = "silu", check_experts: bool = True, *,
            b_gate: Optional[torch.Tensor] = None, b_up: Optional[torch.Tensor] = None,
            b_down: Optional[torch.Tensor] = None, limit: float = 7.0, alpha: float = 1.702) -> torch.Tensor:
    """Each row of x through its k experts' gated MLPs: y[n, j] = (act(x[n] Wg_e.T) * (x[n] Wu_e.T)) Wd_e.T
    for e = experts[n, j], act silu ("silu", SwiGLU) or gelu_tanh ("gelu", GeGLU). Differentiable in x, the
    weights and the biases; the caller weights and sums y over k (so the router's weights get their gradient).

    x [N, C], experts [N, k] integer ids in [0, E), w_gate, w_up [E, H, C], w_down [E, C, H] (the stacked
    layout of MoEFeedForward and transformers). -> y [N, k, C]. Float tensors share one dtype (fp32/bf16/
    fp16) and all one device. check_experts: refuse ids out of range (reads one flag back from the device;
    skipped under torch.compile); False for ids that are in range by construction (a top-k's).
    GPT-OSS's experts: b_gate, b_up [E, H] and b_down [E, C] (all three or none) added to expert e's
    products, g = x Wg_e.T + b_gate[e], u likewise, y = a Wd_e.T + b_down[e]; activation "gpt_oss" is its
    clamped SwiGLU, a = (clamp(u, -limit, limit) + 1) * gc * sigmoid(alpha * gc), gc = min(g, limit) (limit
    and alpha fp32 in the kernel; read only by "gpt_oss").
    Under torch.autocast x, the weights and biases are cast to the autocast dtype first, as nn.Linear would be.
    """
    no_func_transform("moe_mlp")
    _check_activation(activation, limit, alpha)
    if not isinstance(check_experts, bool):  # a truthy "no" would read the ids back, a falsy "" skip the check
        raise TypeError(f"check_experts must be a bool, got {type(check_experts).__name__} {check_experts!r}")
    for name, t in zip(NAMES, (x, experts, w_gate, w_up, w_down)):
        check_tensor(t, name, dtypes=ID_DTYPES if name == "experts" else None)
    biases = (b_gate, b_up, b_down)
    for name, t in zip(BIAS_NAMES, biases):
        if t is not None:
            check_tensor(t, name)
    check_same_device(x=x, experts=experts, w_gate=w_gate, w_up=w_up, w_down=w_down, **dict(zip(BIAS_NAMES, biases)))
    dt = autocast_dtype(x.device)
    if dt is not None:
        x, w_gate, w_up, w_down = x.to(dt), w_gate.to(dt), w_up.to(dt), w_down.to(dt)
        biases = tuple(t.to(dt) if t is not None else None for t in biases)
    _check_op_shapes(x, experts, w_gate, w_up, w_down, *biases)
    if check_experts and not torch.compiler.is_compiling():
        E = w_gate.shape[0]
        out = (experts < 0) | (experts >= E)
        if bool(out.any()):  # the one device-to-host read: an id past the weights has no answer
            raise ValueError(f"experts holds id {experts[out][0].item()}, outside [0, {E}) "
                             f"(w_gate has {E} experts)")
    return MoEMLPFunction.apply(x, experts, w_gate, w_up, w_down, activation, *biases, float(limit), float(alpha))


# -- GPT-OSS's MXFP4 experts, kept packed ------------------------------------------------------------------------
# The same launches with Mxfp4Weight in place of the float weights: each B tile decoded in registers from the blocks
# and scales (_mxfp4_tile), then tl.dot in the activations' dtype. The layout is transformers' (the Hub folders'):
# gate_up_blocks uint8 [E, 2H, C / 32, 16] whose even rows are gate's and odd rows up's, gate_up_scales [E, 2H, C / 32],
# down_blocks [E, C, H / 32, 16], down_scales [E, C, H / 32]. The experts are frozen (the blocks are integers; the
# biases refused a gradient): backward is dx only, as int8/int4's Linears (LoRA on attention, the router and the
# rest train over them).
MXFP4_NAMES = ("gate_up_blocks", "gate_up_scales", "down_blocks", "down_scales")


def _check_mxfp4_shapes(x, experts, gub, gus, dnb, dns, bg=None, bu=None, bd=None, **saved):
    """What _check_op_shapes checks, for packed weights: each blocks tensor uint8 [E, rows, K / 32, 16], its scales
    uint8 [E, rows, K / 32], gate_up's rows 2H, C (x's width) a multiple of 32 and H too (MXFP4's block)."""
    check_tensor(x, "x", ndim=2)
    N, C = x.shape
    for name, t in zip(MXFP4_NAMES, (gub, gus, dnb, dns)):
        check_tensor(t, name, dtypes=(torch.uint8,), ndim=3 if name.endswith("scales") else 4)
    if C % 32:
        raise ValueError(f"x has {C} features, not a multiple of 32: MXFP4 blocks hold 32 inputs each")
    E, H2 = gub.shape[:2]
    if H2 % 2 or H2 < 2:
        raise ValueError(f"gate_up_blocks has {H2} rows: gate's and up's interleaved, an even number")
    H = H2 // 2
    if H % 32:
        raise ValueError(f"the experts' width {H} is not a multiple of 32: down_blocks' MXFP4 blocks hold 32 each")
    check_tensor(gub, "gate_up_blocks", dtypes=None, shape=(E, H2, C // 32, 16))
    check_tensor(gus, "gate_up_scales", dtypes=None, shape=(E, H2, C // 32))
    check_tensor(dnb, "down_blocks", dtypes=None, shape=(E, C, H // 32, 16))
    check_tensor(dns, "down_scales", dtypes=None, shape=(E, C, H // 32))
    # the float checks on stand-in weights of the logical shapes (no memory: expanded views)
    wg = x.new_empty((1,)).expand(E, H, C)
    wd = x.new_empty((1,)).expand(E, C, H)
    _check_op_shapes(x, experts, wg, wg, wd, bg, bu, bd, **saved)
    check_same_device(x=x, **dict(zip(MXFP4_NAMES, (gub, gus, dnb, dns))))


def _mxfp4_weights(gub, gus, dnb, dns):
    """(w_gate, w_up, w_down) as Mxfp4Weight: gate and up the even and odd rows of gate_up's (views)."""
    return (Mxfp4Weight(gub[:, 0::2], gus[:, 0::2]), Mxfp4Weight(gub[:, 1::2], gus[:, 1::2]),
            Mxfp4Weight(dnb, dns))


def _mxfp4_fwd_launch(x, experts, gub, gus, dnb, dns, activation="gpt_oss", bg=None, bu=None, bd=None, limit=7.0,
                      alpha=1.702):
    return _fwd_launch(x, experts, *_mxfp4_weights(gub, gus, dnb, dns), activation, bg, bu, bd, limit, alpha)


def _mxfp4_bwd_launch(dy, x, g, u, order, offsets, gub, gus, dnb, dns, activation="gpt_oss", limit=7.0, alpha=1.702):
    """dx alone: dg, du from da = dy @ Wd_e in the one epilogue launch, then dg @ Wg_e + du @ Wu_e."""
    return _bwd_launch(dy, x, g, u, order, offsets, *_mxfp4_weights(gub, gus, dnb, dns), (True, False, False, False),
                       activation, limit, alpha)[0]


@custom_op("tritongpt::moe_mlp_mxfp4_fwd", mutates_args=())
def _moe_mlp_mxfp4_fwd(x: torch.Tensor, experts: torch.Tensor, gate_up_blocks: torch.Tensor,
                       gate_up_scales: torch.Tensor, down_blocks: torch.Tensor, down_scales: torch.Tensor,
                       activation: str = "gpt_oss", b_gate: Optional[torch.Tensor] = None,
                       b_up: Optional[torch.Tensor] = None, b_down: Optional[torch.Tensor] = None, limit: float = 7.0,
                       alpha: float = 1.702) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                      torch.Tensor]:
    """x [N, C], experts [N, k] -> (y [N, k, C], g, u [N*k, H] sorted, order [N*k], offsets [E+1])."""
    check_runnable(x, "x")
    _check_activation(activation, limit, alpha)
    _check_mxfp4_shapes(x, experts, gate_up_blocks, gate_up_scales, down_blocks, down_scales, b_gate, b_up, b_down)
    return _mxfp4_fwd_launch(x, experts, gate_up_blocks, gate_up_scales, down_blocks, down_scales, activation, b_gate,
                             b_up, b_down, limit, alpha)


@_moe_mlp_mxfp4_fwd.register_fake
def _(x, experts, gate_up_blocks, gate_up_scales, down_blocks, down_scales, activation="gpt_oss", b_gate=None,
      b_up=None, b_down=None, limit=7.0, alpha=1.702):
    _check_activation(activation, limit, alpha)
    _check_mxfp4_shapes(x, experts, gate_up_blocks, gate_up_scales, down_blocks, down_scales, b_gate, b_up, b_down)
    (N, k), (E, H2) = experts.shape, gate_up_blocks.shape[:2]
    C, H = x.shape[1], H2 // 2
    return (x.new_empty((N, k, C)), x.new_empty((N * k, H)), x.new_empty((N * k, H)),
            experts.new_empty((N * k,), dtype=torch.int64), experts.new_empty((E + 1,), dtype=torch.int64))


@custom_op("tritongpt::moe_mlp_mxfp4_bwd", mutates_args=())
def _moe_mlp_mxfp4_bwd(dy: torch.Tensor, x: torch.Tensor, experts: torch.Tensor, g: torch.Tensor, u: torch.Tensor,
                       order: torch.Tensor, offsets: torch.Tensor, gate_up_blocks: torch.Tensor,
                       gate_up_scales: torch.Tensor, down_blocks: torch.Tensor, down_scales: torch.Tensor,
                       activation: str = "gpt_oss", limit: float = 7.0, alpha: float = 1.702) -> torch.Tensor:
    """-> dx [N, C] (the packed experts are frozen: nothing else)."""
    check_runnable(dy, "dy")
    _check_activation(activation, limit, alpha)
    _check_mxfp4_shapes(x, experts, gate_up_blocks, gate_up_scales, down_blocks, down_scales, dy=dy, g=g, u=u,
                        order=order, offsets=offsets)
    return _mxfp4_bwd_launch(dy, x, g, u, order, offsets, gate_up_blocks, gate_up_scales, down_blocks, down_scales,
                             activation, limit, alpha)


@_moe_mlp_mxfp4_bwd.register_fake
def _(dy, x, experts, g, u, order, offsets, gate_up_blocks, gate_up_scales, down_blocks, down_scales,
      activation="gpt_oss", limit=7.0, alpha=1.702):
    _check_activation(activation, limit, alpha)
    _check_mxfp4_shapes(x, experts, gate_up_blocks, gate_up_scales, down_blocks, down_scales, dy=dy, g=g, u=u,
                        order=order, offsets=offsets)
    return x.new_empty(x.shape)


class MoEMLPMXFP4Function(torch.autograd.Function):
    """Saves x, g, u and the routing order; the packed weights live anyway. dx only."""

    @staticmethod
    def forward(ctx, x, experts, gub, gus, dnb, dns, activation="gpt_oss", bg=None, bu=None, bd=None, limit=7.0,
                alpha=1.702):
        y, g, u, order, offsets = _moe_mlp_mxfp4_fwd.call(x, experts, gub, gus, dnb, dns, activation, bg, bu, bd,
                                                          limit, alpha)
        ctx.save_for_backward(x, experts, g, u, order, offsets, gub, gus, dnb, dns)
        ctx.activation, ctx.limit, ctx.alpha = activation, limit, alpha
        return y

    @staticmethod
    def backward(ctx, dy):
        first_order_only("moe_mlp_mxfp4")
        x, experts, g, u, order, offsets, gub, gus, dnb, dns = ctx.saved_tensors
        # (moe_mlp_mxfp4 refused a frozen input requiring grad; a direct apply() is refused here by name)
        for i, name in ((7, "b_gate"), (8, "b_up"), (9, "b_down")):
            if ctx.needs_input_grad[i]:
                raise RuntimeError(f"moe_mlp_mxfp4: {name} requires grad, but the MXFP4 experts are frozen: only x "
                                   "gets a gradient")
        dx = None
        if ctx.needs_input_grad[0]:
            dx = _moe_mlp_mxfp4_bwd.call(dy.contiguous(), x, experts, g, u, order, offsets, gub, gus, dnb, dns,
                                         ctx.activation, ctx.limit, ctx.alpha)
        return dx, None, None, None, None, None, None, None, None, None, None, None


def moe_mlp_mxfp4(x: torch.Tensor, experts: torch.Tensor, gate_up_blocks: torch.Tensor, gate_up_scales: torch.Tensor,
                  down_blocks: torch.Tensor, down_scales: torch.Tensor, activation: str = "gpt_oss",
                  check_experts: bool = True, *, b_gate: Optional[torch.Tensor] = None,
                  b_up: Optional[torch.Tensor] = None, b_down: Optional[torch.Tensor] = None, limit: float = 7.0,
                  alpha: float = 1.702) -> torch.Tensor:
    """moe_mlp with the experts' weights kept MXFP4 (GPT-OSS's, in transformers' layout: MXFP4_NAMES above), each
    tile dequantized in registers in the K loop: y [N, k, C], bit for bit the values mxfp4_dequantize gives in
    the products. Differentiable in x only: the blocks are integers, and a bias requiring grad is refused by name
    (the experts are frozen; pass them detached). Under torch.autocast x and the biases are cast to the autocast
    dtype first; the tiles are decoded into x's dtype."""
    no_func_transform("moe_mlp_mxfp4")
    _check_activation(activation, limit, alpha)
    if not isinstance(check_experts, bool):
        raise TypeError(f"check_experts must be a bool, got {type(check_experts).__name__} {check_experts!r}")
    check_tensor(x, "x")
    check_tensor(experts, "experts", dtypes=ID_DTYPES)
    biases = (b_gate, b_up, b_down)
    for name, t in zip(BIAS_NAMES, biases):
        if t is not None:
            check_tensor(t, name)
            if t.requires_grad and torch.is_grad_enabled():
                raise ValueError(f"moe_mlp_mxfp4: {name} requires grad, but the MXFP4 experts (their biases too) are "
                                 f"frozen: only x gets a gradient; pass {name}.detach()")
    dt = autocast_dtype(x.device)
    if dt is not None:
        x = x.to(dt)
        biases = tuple(t.to(dt) if t is not None else None for t in biases)
    _check_mxfp4_shapes(x, experts, gate_up_blocks, gate_up_scales, down_blocks, down_scales, *biases)
    if check_experts and not torch.compiler.is_compiling():
        E = gate_up_blocks.shape[0]
        out = (experts < 0) | (experts >= E)
        if bool(out.any()):
            raise ValueError(f"experts holds id {experts[out][0].item()}, outside [0, {E}) "
                             f"(gate_up_blocks has {E} experts)")
    return MoEMLPMXFP4Function.apply(x, experts, gate_up_blocks, gate_up_scales, down_blocks, down_scales, activation,
                                     *biases, float(limit), float(alpha))


__all__ = ["moe_mlp", "MoEMLPFunction", "moe_mlp_mxfp4", "MoEMLPMXFP4Function"]
