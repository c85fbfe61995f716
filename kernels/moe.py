"""Mixture-of-experts MLP in Triton as grouped GEMMs: every expert's gated MLP
y_e = (act(x_e @ Wg_e.T) * (x_e @ Wu_e.T)) @ Wd_e.T in one launch per product, forward and backward,
with act silu (SwiGLU: Mixtral's, Qwen3-MoE's, OLMoE's) or gelu_tanh (GeGLU).

Reference module: `tritongpt.model.layers.MoEFeedForward` (router, top-k, weights and the combine stay
in the module; this kernel is the experts). The router's choice experts [N, k] is turned into an order
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
            (only the gradients autograd asks for: a frozen weight skips its product)

So x, g and u (sorted rows, [N*k, H] each) and the order are saved, as swiglu_mlp saves per expert.
The routing-weight combine out = sum_k w[n, k] y[n, k] stays in torch, so autograd gives the router
its gradient through w. Math is fp32; fp32 inputs use IEEE products (no TF32) so fp32 parity holds;
bf16/fp16 use tensor cores with fp32 accumulation.

Public API: `moe_mlp(x, experts, w_gate, w_up, w_down, activation="silu") -> y [N, k, C]`, built from
the custom ops `tritongpt::moe_mlp_fwd` / `tritongpt::moe_mlp_bwd` (with fake impls) inside an
autograd.Function, so it runs under torch.compile as opaque calls in one graph. Expert ids out of
[0, E) are refused by moe_mlp (one device-to-host read of a flag; MoEFeedForward's top-k ids are in
range by construction and skip it); the ops themselves never read outside the weights for any ids, but
leave the rows of an id out of range unwritten.
Tested in tests/test_moe_kernel.py against a float64 loop over experts.
"""
import torch
import triton
import triton.language as tl

from tritongpt._env import triton_interpreting
from tritongpt.kernels._common import (autocast_dtype, autotuned, cast, cdiv, check_runnable, check_same_device,
                                       check_same_dtype, check_tensor, custom_op, dot, first_order_only, launch_tuned,
                                       no_func_transform, on_tensor_device)
from tritongpt.kernels.mlp import (EPI_NONE, EPI_SWIGLU, EPI_SWIGLU_GRAD, GATES, _bucket, _gate_act, _swiglu_epilogue,
                                   _swiglu_grad_epilogue)

NAMES = ("x", "experts", "w_gate", "w_up", "w_down")
ID_DTYPES = (torch.int64, torch.int32)


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


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "EPILOGUE", "SUM2", "GATE_GELU", "GATHER_A",
                                          "SCATTER_C", "STORE_ACT"])
@triton.jit
def _grouped_kernel(A, AIdx, B, C, CIdx, Offsets, Aux, Hout, A2, B2, Aux2, Hout2, N, K, E, A_DIV, M_BUCKET,
                    stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn,
                    stride_xm, stride_xn,
                    GATHER_A: tl.constexpr, SCATTER_C: tl.constexpr, EPILOGUE: tl.constexpr, SUM2: tl.constexpr,
                    GATE_GELU: tl.constexpr, STORE_ACT: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """For each sorted row r of expert e: C[r'] = A[r''] @ B[e] with the gate epilogues of kernels/mlp.py.

    A's row is r, or AIdx[r] // A_DIV with GATHER_A (x through the token index, dy through the order);
    C's row is r, or CIdx[r] with SCATTER_C (back to (token, slot)). B[e] is [K, N] by strides from
    B + e * stride_be (a weight slice, transposed for free); B2 beside it (EPI_SWIGLU: the up weight;
    SUM2: C = A @ B + A2 @ B2). Aux/Hout/Aux2/Hout2 are sorted [rows, N] tensors: g and u written
    (EPI_SWIGLU) or read (EPI_SWIGLU_GRAD, which writes dg to C and du to Hout2, and with STORE_ACT the
    activation a = act(g) * u to Hout, for dW_down).
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
    for k in range(0, k_steps):
        k_ok = offs_k < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = dot(a, b, acc, PRECISION)
        if EPILOGUE == 3:  # the same x tile times the up weight's matching columns
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
            b = tl.load(b2_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = dot(a, b, acc, PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b2_ptrs += BLOCK_K * stride_bk

    mask = m_ok[:, None] & n_ok[None, :]
    x_off = rows.to(tl.int64)[:, None] * stride_xm + offs_n[None, :] * stride_xn
    if EPILOGUE == 3:
        acc = _swiglu_epilogue(acc, acc2, Hout, Hout2, x_off, mask, GATE_GELU)
    elif EPILOGUE == 4:  # acc is da = dy @ Wd_e: dg to C, du to Hout2
        acc = _swiglu_grad_epilogue(acc, Aux, Aux2, Hout, Hout2, x_off, mask, GATE_GELU, STORE_ACT)
    if SCATTER_C:
        c_rows = tl.load(CIdx + rows, mask=m_ok, other=0).to(tl.int64)
    else:
        c_rows = rows.to(tl.int64)
    c_ptrs = C + c_rows[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, cast(acc, C.dtype.element_ty), mask=mask)


autotuned("moe.grouped", _grouped_kernel)


@triton.autotune(configs=_configs(), key=["M", "N", "K_BUCKET", "L_GATHER", "R_GATHER", "R_SWIGLU", "TWO",
                                          "GATE_GELU"])
@triton.jit
def _expert_grad_kernel(L, LIdx, L2, R, RIdx, R2, Out, Out2, Offsets, M, N, L_DIV, R_DIV, K_BUCKET,
                        stride_lr, stride_lm, stride_rr, stride_rn, stride_oe, stride_om, stride_on,
                        L_GATHER: tl.constexpr, R_GATHER: tl.constexpr, R_SWIGLU: tl.constexpr,
                        TWO: tl.constexpr, GATE_GELU: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Out[e] [M, N] = sum over expert e's sorted rows r of L[r', :M]^T R[r'', :N] (a weight's gradient).

    Program (tile, expert): loops over offsets[e]..offsets[e+1] in BLOCK_K rows (none for an idle
    expert: zeros stored). L's row is r or LIdx[r] // L_DIV (L_GATHER), R's likewise (R_GATHER).
    R_SWIGLU: R is g and R2 u, the tile recomputed as act(g) * u (dW_down's a). TWO: Out2[e] =
    sum L2^T R too, L2 beside L (dW_up's du beside dW_gate's dg: one R tile for both).
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
            rt = cast(_gate_act(rt.to(tl.float32), GATE_GELU) * ut.to(tl.float32), L.dtype.element_ty)
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


@on_tensor_device
def _grouped(a, b, n_rows, order, offsets, a_div=None, scatter=False, epilogue=EPI_NONE, b2=None, a2=None,
             aux=None, aux2=None, out=None, gate="silu", store_act=False):
    """The grouped product over n_rows sorted rows: b [E, K, N] by strides (a weight, transposed as a view).
    a_div: A's rows gathered through order // a_div (None: a is already in sorted rows). scatter: C's rows
    go to order[r] in `out` ([n_rows, N], given) instead of a new sorted tensor. -> (c, extra): extra
    (g, u) for EPI_SWIGLU, du for EPI_SWIGLU_GRAD ((du, a) with store_act: a = act(g) * u too), else None."""
    if store_act and epilogue != EPI_SWIGLU_GRAD:
        raise ValueError(f"store_act needs epilogue EPI_SWIGLU_GRAD, got {epilogue}")
    E, K, N = b.shape
    c = out if out is not None else a.new_empty((n_rows, N))
    h = a.new_empty((n_rows, N)) if epilogue == EPI_SWIGLU or store_act else None
    h2 = a.new_empty((n_rows, N)) if epilogue in (EPI_SWIGLU, EPI_SWIGLU_GRAD) else None
    extra = (h, h2) if epilogue == EPI_SWIGLU else ((h2, h) if store_act else h2)
    if n_rows == 0 or N == 0:
        return c, extra
    if b2 is not None and b2.stride() != b.stride():
        b, b2 = b.contiguous(), b2.contiguous()
    if a2 is not None and a2.stride() != a.stride():
        a, a2 = a.contiguous(), a2.contiguous()
    if aux is not None:
        aux, aux2 = aux.contiguous(), aux2.contiguous()
    x = h if h is not None else (aux if aux is not None else c)
    grid = lambda meta: (cdiv(n_rows, meta["BLOCK_M"]) + E, cdiv(N, meta["BLOCK_N"]))
    launch_tuned(
        _grouped_kernel, grid,
        a, order, b, c, order, offsets, aux if aux is not None else x, x, a2 if a2 is not None else a,
        b2 if b2 is not None else b, aux2 if aux2 is not None else x, h2 if h2 is not None else x,
        N, K, E, a_div or 1, _bucket(n_rows),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
        x.stride(0), x.stride(1),
        GATHER_A=a_div is not None, SCATTER_C=scatter, EPILOGUE=epilogue, SUM2=a2 is not None,
        GATE_GELU=gate == "gelu", STORE_ACT=store_act, PRECISION=_precision(a))
    return c, extra


@on_tensor_device
def _expert_grad(lhs, rhs, order, offsets, n_experts, l_div=None, r_div=None, lhs2=None, rhs2=None, gate="silu"):
    """Per-expert lhs_e^T rhs_e over each expert's sorted rows -> [E, M, N] (and lhs2's beside it, or None).
    l_div / r_div: that operand's rows gathered through order // div (None: sorted rows). rhs2: rhs is g
    and rhs2 u, multiplied as act(g) * u."""
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
        lhs.stride(0), lhs.stride(1), rhs.stride(0), rhs.stride(1), out.stride(0), out.stride(1), out.stride(2),
        L_GATHER=l_div is not None, R_GATHER=r_div is not None, R_SWIGLU=rhs2 is not None, TWO=lhs2 is not None,
        GATE_GELU=gate == "gelu", PRECISION=_precision(lhs))
    return out, out2


# Launchers: the products of the table at the top (bench/compile_check.py calls them on meta tensors).
def _fwd_launch(x, experts, wg, wu, wd, activation="silu"):
    """-> (y [N, k, C], g [N*k, H], u [N*k, H] in sorted rows, order [N*k], offsets [E+1])."""
    (N, k), E = experts.shape, wg.shape[0]
    order, offsets = _route(experts, E)
    a, (g, u) = _grouped(x, wg.transpose(1, 2), N * k, order, offsets, a_div=k, epilogue=EPI_SWIGLU,
                         b2=wu.transpose(1, 2), gate=activation)
    y = x.new_empty((N * k, wd.shape[1]))
    _grouped(a, wd.transpose(1, 2), N * k, order, offsets, scatter=True, out=y)
    return y.view(N, k, wd.shape[1]), g, u, order, offsets


def _bwd_launch(dy, x, g, u, order, offsets, wg, wu, wd, needs=(True,) * 4, activation="silu"):
    """dy [N, k, C] -> (dx, dw_gate, dw_up, dw_down); needs: autograd's needs_input_grad for (x, w_gate,
    w_up, w_down), a gradient not made comes back as an empty tensor (its products are skipped)."""
    need_dx, need_dwg, need_dwu, need_dwd = needs
    N, k, C = dy.shape
    E = wg.shape[0]
    dy2 = dy.reshape(N * k, C)

    def skipped():
        return dy.new_empty(0)  # one per output: a custom op's outputs may not alias each other

    dg = du = act = None
    if need_dx or need_dwg or need_dwu:  # [N*k, H] each, sorted rows; a = act(g) * u beside them if dWd wants it
        dg, extra = _grouped(dy2, wd, N * k, order, offsets, a_div=1, epilogue=EPI_SWIGLU_GRAD, aux=g, aux2=u,
                             gate=activation, store_act=need_dwd)
        du, act = extra if need_dwd else (extra, None)
        del extra  # else the (du, a) tuple keeps a alive after dWd, through the products below
    if not need_dwd:
        dwd = skipped()
    elif act is not None:  # a plain per-expert product; a is freed right after
        dwd = _expert_grad(dy2, act, order, offsets, E, l_div=1)[0]
        act = None
    else:  # no dg/du launch to make a beside: recomputed on the tiles as loaded
        dwd = _expert_grad(dy2, g, order, offsets, E, l_div=1, rhs2=u, gate=activation)[0]
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
    return dx, dwg, dwu, dwd


def _check_activation(activation):
    if activation not in GATES:
        raise ValueError(f"activation must be one of {', '.join(map(repr, GATES))}, got {activation!r}")


def _check_op_shapes(x, experts, wg, wu, wd, **saved):
    """Shapes, dtypes and device the products need, in the ops and their fake impls. saved: backward's
    dy, g, u, order and offsets."""
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
    shapes = {"dy": (N, k, C), "g": (N * k, H), "u": (N * k, H), "order": (N * k,), "offsets": (E + 1,)}
    for name, t in saved.items():
        check_tensor(t, name, dtypes=ID_DTYPES if name in ("order", "offsets") else None, shape=shapes[name])
    floats = {n: t for n, t in saved.items() if n in ("dy", "g", "u")}
    check_same_device(x=x, experts=experts, w_gate=wg, w_up=wu, w_down=wd, **saved)
    check_same_dtype(x=x, w_gate=wg, w_up=wu, w_down=wd, **floats)


@custom_op("tritongpt::moe_mlp_fwd", mutates_args=())
def _moe_mlp_fwd(x: torch.Tensor, experts: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                 w_down: torch.Tensor, activation: str = "silu"
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [N, C], experts [N, k] -> (y [N, k, C], g, u [N*k, H] sorted, order [N*k], offsets [E+1])."""
    check_runnable(x, "x")
    _check_activation(activation)
    _check_op_shapes(x, experts, w_gate, w_up, w_down)
    return _fwd_launch(x, experts, w_gate, w_up, w_down, activation)


@_moe_mlp_fwd.register_fake
def _(x, experts, w_gate, w_up, w_down, activation="silu"):
    _check_activation(activation)
    _check_op_shapes(x, experts, w_gate, w_up, w_down)
    (N, k), (E, H, C) = experts.shape, w_gate.shape
    return (x.new_empty((N, k, C)), x.new_empty((N * k, H)), x.new_empty((N * k, H)),
            experts.new_empty((N * k,), dtype=torch.int64), experts.new_empty((E + 1,), dtype=torch.int64))


@custom_op("tritongpt::moe_mlp_bwd", mutates_args=())
def _moe_mlp_bwd(dy: torch.Tensor, x: torch.Tensor, experts: torch.Tensor, g: torch.Tensor, u: torch.Tensor,
                 order: torch.Tensor, offsets: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                 w_down: torch.Tensor, needs: list[bool], activation: str = "silu"
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx, dw_gate, dw_up, dw_down); those not in needs come back empty."""
    check_runnable(dy, "dy")
    _check_activation(activation)
    _check_op_shapes(x, experts, w_gate, w_up, w_down, dy=dy, g=g, u=u, order=order, offsets=offsets)
    if len(needs) != 4:
        raise ValueError(f"needs must hold 4 flags (dx, dw_gate, dw_up, dw_down), got {len(needs)}")
    return _bwd_launch(dy, x, g, u, order, offsets, w_gate, w_up, w_down, needs, activation)


@_moe_mlp_bwd.register_fake
def _(dy, x, experts, g, u, order, offsets, w_gate, w_up, w_down, needs, activation="silu"):
    _check_activation(activation)
    _check_op_shapes(x, experts, w_gate, w_up, w_down, dy=dy, g=g, u=u, order=order, offsets=offsets)
    shapes = (x.shape, w_gate.shape, w_up.shape, w_down.shape)
    return tuple(x.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs))


class MoEMLPFunction(torch.autograd.Function):
    """Saves x, g, u and the routing order (plus the weights, which live anyway)."""

    @staticmethod
    def forward(ctx, x, experts, wg, wu, wd, activation="silu"):
        y, g, u, order, offsets = _moe_mlp_fwd.call(x, experts, wg, wu, wd, activation)
        ctx.save_for_backward(x, experts, g, u, order, offsets, wg, wu, wd)
        ctx.activation = activation
        return y

    @staticmethod
    def backward(ctx, dy):
        first_order_only("moe_mlp")
        x, experts, g, u, order, offsets, wg, wu, wd = ctx.saved_tensors
        needs = [ctx.needs_input_grad[i] for i in (0, 2, 3, 4)]  # False for a frozen weight
        grads = _moe_mlp_bwd.call(dy.contiguous(), x, experts, g, u, order, offsets, wg, wu, wd,
                                                needs, ctx.activation)
        dx, dwg, dwu, dwd = (gr if need else None for gr, need in zip(grads, needs))
        return dx, None, dwg, dwu, dwd, None


def moe_mlp(x: torch.Tensor, experts: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
            w_down: torch.Tensor, activation: str = "silu", check_experts: bool = True) -> torch.Tensor:
    """Each row of x through its k experts' gated MLPs: y[n, j] = (act(x[n] Wg_e.T) * (x[n] Wu_e.T)) Wd_e.T
    for e = experts[n, j], act silu ("silu", SwiGLU) or gelu_tanh ("gelu", GeGLU). Differentiable in x and
    the weights; the caller weights and sums y over k (so the router's weights get their gradient).

    x [N, C], experts [N, k] integer ids in [0, E), w_gate, w_up [E, H, C], w_down [E, C, H] (the stacked
    layout of MoEFeedForward and transformers). -> y [N, k, C]. Float tensors share one dtype (fp32/bf16/
    fp16) and all one device. check_experts: refuse ids out of range (reads one flag back from the device;
    skipped under torch.compile); False for ids that are in range by construction (a top-k's).
    Under torch.autocast x and the weights are cast to the autocast dtype first, as nn.Linear would be.
    """
    no_func_transform("moe_mlp")
    _check_activation(activation)
    if not isinstance(check_experts, bool):  # a truthy "no" would read the ids back, a falsy "" skip the check
        raise TypeError(f"check_experts must be a bool, got {type(check_experts).__name__} {check_experts!r}")
    for name, t in zip(NAMES, (x, experts, w_gate, w_up, w_down)):
        check_tensor(t, name, dtypes=ID_DTYPES if name == "experts" else None)
    check_same_device(x=x, experts=experts, w_gate=w_gate, w_up=w_up, w_down=w_down)
    dt = autocast_dtype(x.device)
    if dt is not None:
        x, w_gate, w_up, w_down = x.to(dt), w_gate.to(dt), w_up.to(dt), w_down.to(dt)
    _check_op_shapes(x, experts, w_gate, w_up, w_down)
    if check_experts and not torch.compiler.is_compiling():
        E = w_gate.shape[0]
        out = (experts < 0) | (experts >= E)
        if bool(out.any()):  # the one device-to-host read: an id past the weights has no answer
            raise ValueError(f"experts holds id {experts[out][0].item()}, outside [0, {E}) "
                             f"(w_gate has {E} experts)")
    return MoEMLPFunction.apply(x, experts, w_gate, w_up, w_down, activation)


__all__ = ["moe_mlp", "MoEMLPFunction"]
