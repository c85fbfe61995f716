"""Multi-LoRA in Triton (punica's SGMV/BGMV, vLLM's shrink and expand): one frozen base Linear, several LoRA adapters
resident on the device, each row of a batch (a request) with its own adapter or none. For row b with slot
s = index[b] >= 0 it adds to the base Linear's output y, in place,

    y[b] += (x[b] @ lora_a[s]^T) @ lora_b[s]^T          x [B, T, K], lora_a [S, R, K], lora_b [S, N, R]

(the LoRA scale alpha / r folded into lora_b at load, as vLLM does); a row with index -1 (the base model) is left
as it is. Reference module: `tritongpt.model.lora.AdapterLinear`, whose reference path calls
`tritongpt.model.lora.lora_rows_reference` (a function of that module): each row's adapter gathered for two bmm's
(what the benchmark's torch provider times).

Two kernels, as punica's and vLLM's:
  * shrink, grid (B, cdiv(T, BLOCK_T)): a program's BLOCK_T tokens all belong to row b, so all use one adapter; it
    walks K in BLOCK_K steps, h [BLOCK_T, R_PAD] += tl.dot(x tile [BLOCK_T, BLOCK_K], a tile^T [BLOCK_K, R_PAD]) in
    fp32 registers, and stores h to an fp32 buffer [B, T, R_PAD]. R is padded to a power of two >= 16 (tl.dot's
    smallest side), the padding masked to 0 on load.
  * expand, grid (B, cdiv(T, BLOCK_T), cdiv(N, BLOCK_N)): one tl.dot of the h tile [BLOCK_T, R_PAD] (rounded to the
    compute dtype first, as vLLM does, for the tensor cores) by the b tile^T [R_PAD, BLOCK_N], in fp32, plus the y
    tile it loads, stored back in y's dtype.
Why two: a fused kernel would recompute the shrink (2 T K R) in each of the cdiv(N, BLOCK_N) programs of a row, ~10x
the LoRA FLOPs at GPT-2 widths; h is tiny (R_PAD floats a token), so the round trip through memory costs little.
A row with index -1 costs each of its programs one load of the index: they return at once, y untouched.

Decode (T = 1) uses one of BLOCK_T (16) rows of each MMA: the other 15 are masked padding, every row re-reads its
adapter's A and B tiles, and the shrink has only B programs, each walking all of K. Hence a second pair, grouped
(punica's SGMV segments as vLLM's V1 kernels run them: vllm/lora/ops/triton_ops/lora_shrink_op.py and
lora_expand_op.py, their prep in lora_kernel_metadata.py's LoRAKernelMeta):
  * segments(): the M = B * T tokens flattened (token m = b * T + t on adapter index[b]), a stable sort by adapter
    on the device (order: token ids, adapter -1's first), and each adapter's span of it (bounds [S + 1]); no host
    read, so a CUDA graph can capture it.
  * shrink, grid (cdiv(M, BLOCK_M), S): program (m, s) takes adapter s's tokens m * BLOCK_M.. of its span (and exits
    at once past its count), gathers their x rows through order, and stores h = x @ A_s^T at the tokens' own rows of
    an fp32 [M, R_PAD] buffer. expand, grid (cdiv(M, BLOCK_M), S, cdiv(N, BLOCK_N)): the same tokens' h and y rows,
    y += h @ B_s^T. The grid depends on M, S and N only; at decode most of its programs exit at once.
A decode batch of B rows over S adapters then fills each MMA with up to B / S rows and reads each adapter's tiles
once a tile rather than once a row. Not done: vLLM's SPLIT_K (the shrink's K split over programs, summed with
atomics into a zeroed h), which would give a decode shrink more programs at the price of a nondeterministic sum.
add_lora_rows(grouped=None) picks by pick_grouped's rule: grouped when a row has under 16 tokens. The rule is a
guess: no GPU has timed either pair yet (bench kernels --ops lora times both as triton-rows and triton-grouped).

Precision: fp32 inputs use IEEE products (no TF32), bf16/fp16 tensor cores with fp32 accumulation. Tiles: fixed
(no autotune): under the interpreter small ones (BLOCK_T 16, BLOCK_K 32, BLOCK_N 32), on a GPU BLOCK_T (grouped:
BLOCK_M) 16 at decode and 64 at prefill (grouped: by the tokens an adapter has on average, M / S), narrower token
and K / N tiles as R_PAD grows, so the fp32 h tile and the weight tiles keep a bounded size; ranks up to MAX_RANK
(256).

Public API: `add_lora_rows(y, x, lora_a, lora_b, index, index_checked=False, grouped=None) -> y`, through the
torch.library custom op `tritongpt::add_lora_rows` (mutates_args y, a fake impl), so torch.compile keeps it as an
opaque call.
Inference only (serving): adapters train through model/lora.py's parametrization (add_lora).
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from tritongpt._env import triton_interpreting
from tritongpt.errors import UserError
from tritongpt.kernels._common import (FLOAT_DTYPES, cast, cdiv, check_runnable, custom_op, dot, next_pow2,
                                       no_func_transform, on_tensor_device)

# vLLM's max_lora_rank choices run 8..512; 256 keeps the fp32 h tile (BLOCK_T x R_PAD) and the weight tiles
# (R_PAD x BLOCK_K / BLOCK_N) in registers and shared memory on every GPU without shrinking the tiles to nothing
MAX_RANK = 256
INDEX_DTYPES = (torch.int32, torch.int64)


@triton.jit
def _shrink_tile(x_ptrs, a_ptrs, rows_ok, r_ok, K, PRECISION: tl.constexpr, ROWS: tl.constexpr,
                 R_PAD: tl.constexpr, BLOCK_K: tl.constexpr):
    """Both shrinks' K loop: sum over K's tiles of x [ROWS, BLOCK_K] @ a^T [BLOCK_K, R_PAD] in fp32 registers, from
    x_ptrs and a_ptrs at k = 0 (unit stride on K), rows_ok and r_ok masking the rows and the rank's padding."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((ROWS, R_PAD), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - k * BLOCK_K
        x = tl.load(x_ptrs, mask=rows_ok[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc = dot(x, a, acc, PRECISION)
        x_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
    return acc


@triton.jit
def _lora_shrink_kernel(X, A, Index, H, T, K, R, stride_xb, stride_xt, stride_as, stride_ar, stride_hb, stride_ht,
                   PRECISION: tl.constexpr, R_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """H[b, t, :R_PAD] = X[b, t, :] @ A[Index[b]]^T for row b's tokens (the padding 0); X and A at unit stride on K."""
    row = tl.program_id(0)
    slot = tl.load(Index + row).to(tl.int64)
    if slot < 0:  # the base model: no delta
        return
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_r = tl.arange(0, R_PAD)
    offs_k = tl.arange(0, BLOCK_K)
    t_ok = offs_t < T
    x_ptrs = X + row.to(tl.int64) * stride_xb + offs_t.to(tl.int64)[:, None] * stride_xt + offs_k[None, :]
    a_ptrs = A + slot * stride_as + offs_r[None, :] * stride_ar + offs_k[:, None]  # a^T's [BLOCK_K, R_PAD] tile
    acc = _shrink_tile(x_ptrs, a_ptrs, t_ok, offs_r < R, K, PRECISION, BLOCK_T, R_PAD, BLOCK_K)
    h_ptrs = H + row.to(tl.int64) * stride_hb + offs_t.to(tl.int64)[:, None] * stride_ht + offs_r[None, :]
    tl.store(h_ptrs, acc, mask=t_ok[:, None])


@triton.jit
def _lora_expand_kernel(H, Bw, Index, Y, T, N, R, stride_hb, stride_ht, stride_bs, stride_bn, stride_br,
                   stride_yb, stride_yt, PRECISION: tl.constexpr, R_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """Y[b, t, n] += H[b, t, :R] @ Bw[Index[b]][n, :R]^T for row b's tokens; Y at unit stride on N."""
    row = tl.program_id(0)
    slot = tl.load(Index + row).to(tl.int64)
    if slot < 0:  # the base model: y stays the base Linear's output
        return
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    t_ok = offs_t < T
    n_ok = offs_n < N
    r_ok = offs_r < R
    rows_t = offs_t.to(tl.int64)
    h = tl.load(H + row.to(tl.int64) * stride_hb + rows_t[:, None] * stride_ht + offs_r[None, :],
                mask=t_ok[:, None], other=0.0)
    b_ptrs = Bw + slot * stride_bs + offs_r[:, None] * stride_br + offs_n.to(tl.int64)[None, :] * stride_bn
    b = tl.load(b_ptrs, mask=r_ok[:, None] & n_ok[None, :], other=0.0)  # b^T's [R_PAD, BLOCK_N] tile
    acc = dot(cast(h, Y.dtype.element_ty), b, tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32), PRECISION)
    y_ptrs = Y + row.to(tl.int64) * stride_yb + rows_t[:, None] * stride_yt + offs_n[None, :]
    ok = t_ok[:, None] & n_ok[None, :]
    y = tl.load(y_ptrs, mask=ok, other=0.0)
    tl.store(y_ptrs, cast(acc + y.to(tl.float32), Y.dtype.element_ty), mask=ok)


@triton.jit
def _lora_shrink_grouped_kernel(X, A, Order, Bounds, H, T, K, R, stride_xb, stride_xt, stride_as, stride_ar,
                                stride_hm, PRECISION: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_K: tl.constexpr):
    """H[m, :R_PAD] = X[m // T, m % T, :] @ A[s]^T for the tokens m of slot s = program_id(1) in Order[Bounds[s]:
    Bounds[s + 1]] (tokens sorted by slot), BLOCK_M of them from program_id(0) * BLOCK_M on."""
    slot = tl.program_id(1)
    seg = tl.load(Bounds + slot)
    first = tl.program_id(0) * BLOCK_M
    left = tl.load(Bounds + slot + 1) - seg - first  # this segment's tokens from `first` on
    if left <= 0:  # past slot s's tokens (most programs at decode): nothing to do
        return
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < left
    tok = tl.load(Order + seg + first + offs_m, mask=m_ok, other=0).to(tl.int64)
    offs_r = tl.arange(0, R_PAD)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + ((tok // T) * stride_xb + (tok % T) * stride_xt)[:, None] + offs_k[None, :]
    a_ptrs = A + slot.to(tl.int64) * stride_as + offs_r[None, :] * stride_ar + offs_k[:, None]
    acc = _shrink_tile(x_ptrs, a_ptrs, m_ok, offs_r < R, K, PRECISION, BLOCK_M, R_PAD, BLOCK_K)
    tl.store(H + tok[:, None] * stride_hm + offs_r[None, :], acc, mask=m_ok[:, None])  # at the token's own row


@triton.jit
def _lora_expand_grouped_kernel(H, Bw, Order, Bounds, Y, T, N, R, stride_hm, stride_bs, stride_bn, stride_br,
                                stride_yb, stride_yt, PRECISION: tl.constexpr, R_PAD: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Y[m // T, m % T, n] += H[m, :R] @ Bw[s][n, :R]^T for slot s's tokens m, as the grouped shrink picks them."""
    slot = tl.program_id(1)
    seg = tl.load(Bounds + slot)
    first = tl.program_id(0) * BLOCK_M
    left = tl.load(Bounds + slot + 1) - seg - first
    if left <= 0:
        return
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < left
    tok = tl.load(Order + seg + first + offs_m, mask=m_ok, other=0).to(tl.int64)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    n_ok = offs_n < N
    r_ok = offs_r < R
    h = tl.load(H + tok[:, None] * stride_hm + offs_r[None, :], mask=m_ok[:, None], other=0.0)
    b_ptrs = Bw + slot.to(tl.int64) * stride_bs + offs_r[:, None] * stride_br + offs_n.to(tl.int64)[None, :] * stride_bn
    b = tl.load(b_ptrs, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
    acc = dot(cast(h, Y.dtype.element_ty), b, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), PRECISION)
    y_ptrs = Y + ((tok // T) * stride_yb + (tok % T) * stride_yt)[:, None] + offs_n[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    y = tl.load(y_ptrs, mask=ok, other=0.0)
    tl.store(y_ptrs, cast(acc + y.to(tl.float32), Y.dtype.element_ty), mask=ok)


def _tiles(T: int, r_pad: int) -> dict:
    """(BLOCK_T, BLOCK_K, BLOCK_N, num_warps, num_stages); T the tokens a program's tile serves (a row's, or a slot's
    on average when grouped). The fp32 h tile BLOCK_T x R_PAD stays at most 4096 values (64 x 64, 32 x 128, 16 x 256: 32
    registers a thread on 4 warps); the weight tiles R_PAD x BLOCK_K and R_PAD x BLOCK_N at most 8192 values."""
    if triton_interpreting():  # the interpreter pays per program and per tl.dot: few small ones
        return dict(BLOCK_T=16, BLOCK_K=32, BLOCK_N=32, num_warps=4, num_stages=1)
    block_t = max(16, min(16 if T <= 16 else 64, 4096 // r_pad))
    return dict(BLOCK_T=block_t, BLOCK_K=max(32, min(128, 8192 // r_pad)), BLOCK_N=max(32, min(128, 8192 // r_pad)),
                num_warps=4, num_stages=3)


def pick_grouped(T: int) -> bool:
    """grouped=None's rule: group the tokens by adapter when a row has fewer than 16 (tl.dot's smallest tile side)
    tokens, i.e. at decode and short chunks, where the per-row kernels fill an MMA with T of its 16 rows; a longer row
    fills its own tiles, and the sort is extra launches. A guess until a GPU times both (bench kernels --ops lora)."""
    return T < 16


def segments(index: torch.Tensor, T: int, S: int):
    """vLLM's LoRAKernelMeta prep, on the device with no host read (CUDA-graph safe): the B * T tokens' slots
    (token m = b * T + t on index[b]), their stable sort by slot -> order [M] (token ids, slot -1's first), and
    bounds [S + 1]: slot s's tokens are order[bounds[s]:bounds[s + 1]]. vLLM counts with unique / bincount and
    a cumsum; torch.bincount sizes its output from index.max(), a host read on CUDA, so the bounds here come from
    a binary search of the sorted slots instead (the same starts; slots outside [0, S) fall outside every segment)."""
    slots = index[:, None].expand(index.shape[0], T).reshape(-1)
    sorted_slots, order = torch.sort(slots, stable=True)
    bounds = torch.searchsorted(sorted_slots, torch.arange(S + 1, device=index.device, dtype=index.dtype))
    return order, bounds


# (bench/compile_check.py calls this on meta tensors to compile the exact launches for sm_90.)
@on_tensor_device
def _launch(y, x, lora_a, lora_b, index, grouped=None):
    """y [B, T, N] += the rows' deltas; no checks (add_lora_rows'). x, lora_a, lora_b at unit stride on their last dim,
    y contiguous. grouped: the segment kernels (True), the per-row ones (False), or pick_grouped's rule (None)."""
    B, T, K = x.shape
    S, N, R = lora_b.shape
    if B == 0 or T == 0:
        return
    # the per-row kernels read index[b] at index + b: a strided or expanded (stride-0) index would read other memory
    index = index.contiguous()
    if grouped is None:
        grouped = pick_grouped(T)
    r_pad = max(16, next_pow2(R))
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # tf32 only affects fp32 inputs
    if grouped:
        M = B * T
        tiles = _tiles(cdiv(M, S), r_pad)
        block_m, warps, stages = tiles["BLOCK_T"], tiles["num_warps"], tiles["num_stages"]
        order, bounds = segments(index, T, S)
        h = torch.empty((M, r_pad), device=x.device, dtype=torch.float32)
        # the grid a function of M, S and N only (CUDA graphs): each slot gets enough tiles for all M tokens, and
        # the tiles past its own count exit at once
        _lora_shrink_grouped_kernel[(cdiv(M, block_m), S)](
            x, lora_a, order, bounds, h, T, K, R, x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1),
            h.stride(0), PRECISION=precision, R_PAD=r_pad, BLOCK_M=block_m, BLOCK_K=tiles["BLOCK_K"],
            num_warps=warps, num_stages=stages)
        _lora_expand_grouped_kernel[(cdiv(M, block_m), S, cdiv(N, tiles["BLOCK_N"]))](
            h, lora_b, order, bounds, y, T, N, R, h.stride(0), lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
            y.stride(0), y.stride(1), PRECISION=precision, R_PAD=r_pad, BLOCK_M=block_m, BLOCK_N=tiles["BLOCK_N"],
            num_warps=warps, num_stages=stages)
        return
    tiles = _tiles(T, r_pad)
    block_t, warps, stages = tiles["BLOCK_T"], tiles["num_warps"], tiles["num_stages"]
    h = torch.empty((B, T, r_pad), device=x.device, dtype=torch.float32)
    _lora_shrink_kernel[(B, cdiv(T, block_t))](
        x, lora_a, index, h, T, K, R, x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1),
        h.stride(0), h.stride(1), PRECISION=precision, R_PAD=r_pad, BLOCK_T=block_t, BLOCK_K=tiles["BLOCK_K"],
        num_warps=warps, num_stages=stages)
    _lora_expand_kernel[(B, cdiv(T, block_t), cdiv(N, tiles["BLOCK_N"]))](
        h, lora_b, index, y, T, N, R, h.stride(0), h.stride(1), lora_b.stride(0), lora_b.stride(1),
        lora_b.stride(2), y.stride(0), y.stride(1), PRECISION=precision, R_PAD=r_pad, BLOCK_T=block_t,
        BLOCK_N=tiles["BLOCK_N"], num_warps=warps, num_stages=stages)


@custom_op("tritongpt::add_lora_rows", mutates_args=("y",))
def _add_lora_rows_op(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                      index: torch.Tensor, grouped: Optional[bool] = None) -> None:
    """y [B, T, N] += each row's delta, in place; add_lora_rows checks the arguments."""
    check_runnable(x, "x")
    _launch(y, x, lora_a, lora_b, index, grouped)


@_add_lora_rows_op.register_fake
def _(y, x, lora_a, lora_b, index, grouped=None):
    return None


def _dt(t) -> str:
    return str(t.dtype).replace("torch.", "")


def _check(y, x, lora_a, lora_b, index, index_checked, grouped):
    """Every refusal add_lora_rows makes, each a UserError naming the argument."""
    if grouped not in (None, True, False):
        raise UserError(f"add_lora_rows: grouped must be None (pick by T), True or False, got {grouped!r}")
    if not isinstance(index_checked, bool):  # "no" is truthy: it would skip the index check it asks to keep
        raise UserError(f"add_lora_rows: index_checked must be a bool, got {type(index_checked).__name__} "
                        f"{index_checked!r}")
    for name, t in (("y", y), ("x", x), ("lora_a", lora_a), ("lora_b", lora_b), ("index", index)):
        if not isinstance(t, torch.Tensor):
            raise UserError(f"add_lora_rows: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t, dims in (("y", y, "[B, T, N]"), ("x", x, "[B, T, K]"), ("lora_a", lora_a, "[S, R, K]"),
                          ("lora_b", lora_b, "[S, N, R]"), ("index", index, "[B]")):
        if t.dim() != dims.count(",") + 1:
            raise UserError(f"add_lora_rows: {name} must be {dims}, got shape {tuple(t.shape)}")
    B, T, K = x.shape
    S, R = lora_a.shape[0], lora_a.shape[1]
    N = lora_b.shape[1]
    if lora_a.shape[2] != K:
        raise UserError(f"add_lora_rows: lora_a [S, R, K] has K = {lora_a.shape[2]}, x [B, T, K] has K = {K}")
    if tuple(lora_b.shape) != (S, N, R):
        raise UserError(f"add_lora_rows: lora_b has shape {tuple(lora_b.shape)}, expected [S, N, R] with S = {S} and "
                        f"R = {R} from lora_a {tuple(lora_a.shape)}")
    if tuple(y.shape) != (B, T, N):
        raise UserError(f"add_lora_rows: y has shape {tuple(y.shape)}, expected [B, T, N] = {(B, T, N)} (x's B and T, "
                        "lora_b's N)")
    if tuple(index.shape) != (B,):
        raise UserError(f"add_lora_rows: index has shape {tuple(index.shape)}, expected ({B},): one slot a row of x")
    if S == 0 or R == 0:
        raise UserError(f"add_lora_rows: lora_a has shape {tuple(lora_a.shape)}; S (adapters) and R (rank) must be "
                        "at least 1")
    if R > MAX_RANK:
        raise UserError(f"add_lora_rows: rank R = {R} is above the kernel's largest, {MAX_RANK}")
    if x.dtype not in FLOAT_DTYPES:
        raise UserError(f"add_lora_rows: x has dtype {_dt(x)}; expected float32, bfloat16 or float16")
    for name, t in (("y", y), ("lora_a", lora_a), ("lora_b", lora_b)):
        if t.dtype != x.dtype:
            raise UserError(f"add_lora_rows: {name} is {_dt(t)}, x is {_dt(x)}: y, x, lora_a and lora_b take one "
                            "dtype")
    if index.dtype not in INDEX_DTYPES:
        raise UserError(f"add_lora_rows: index has dtype {_dt(index)}; expected int32 or int64")
    for name, t in (("y", y), ("lora_a", lora_a), ("lora_b", lora_b), ("index", index)):
        if t.device != x.device:
            raise UserError(f"add_lora_rows: {name} is on {t.device}, x on {x.device}: all on x's device")
    for name, t in (("x", x), ("lora_a", lora_a), ("lora_b", lora_b)):
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise UserError(f"add_lora_rows: {name} must have unit stride on its last dim, got strides {t.stride()} "
                            "(its other dims may be strided)")
    if not y.is_contiguous():
        raise UserError(f"add_lora_rows: y must be contiguous (it is written in place), got strides {y.stride()}")
    if torch.is_grad_enabled():
        for name, t in (("y", y), ("x", x), ("lora_a", lora_a), ("lora_b", lora_b)):
            if t.requires_grad:
                raise UserError(f"add_lora_rows: {name} requires grad; the kernel is inference-only (serving, no "
                                "backward): run it under torch.no_grad() / inference_mode, and train adapters through "
                                "model/lora.py's add_lora")
    if not index_checked and B > 0:
        bad = (index < -1) | (index >= S)
        if bool(bad.any()):  # one host sync: the engine passes index_checked=True
            i = int(bad.nonzero()[0, 0])
            raise UserError(f"add_lora_rows: index[{i}] = {int(index[i])} is outside [-1, {S}): -1 (no adapter) or "
                            f"one of lora_a's {S} slots")


def add_lora_rows(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, index: torch.Tensor,
                  index_checked: bool = False, grouped: Optional[bool] = None) -> torch.Tensor:
    """y[b] += (x[b] @ lora_a[s]^T) @ lora_b[s]^T for each row b with s = index[b] >= 0, in place; returns y.

    y [B, T, N] contiguous (the base Linear's output), x [B, T, K] (B and T may be strided, K at unit stride),
    lora_a [S, R, K], lora_b [S, N, R] (the scale alpha / r folded in; unit stride on their last dims), one float
    dtype; index [B] int32 or int64 on x's device, values in [-1, S): -1 leaves the row's y as it is. Checking the
    index's values reads it back (one host sync); index_checked=True skips that (the caller guarantees them: an
    index >= S reads other memory in the per-row kernels, one below -1 counts as -1 there, and the grouped ones
    skip both). R <=
    MAX_RANK. Inference only: refused where grad is enabled and y, x, lora_a or lora_b requires grad. grouped: True
    sorts the tokens by adapter first (the segment kernels), False runs a program per row, None picks (pick_grouped:
    grouped below 16 tokens a row).
    """
    no_func_transform("add_lora_rows")
    _check(y, x, lora_a, lora_b, index, index_checked, grouped)
    if y.numel() and x.device.type == "cpu":
        try:
            check_runnable(x, "x")
        except RuntimeError as e:
            raise UserError(f"add_lora_rows: {e}") from None
    _add_lora_rows_op(y, x, lora_a, lora_b, index, grouped)
    return y
