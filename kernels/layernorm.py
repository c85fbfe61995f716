"""LayerNorm and RMSNorm in Triton: forward (y, mean, rstd) and backward (dx, dweight, dbias).

Reference modules: `tritongpt.model.layers.LayerNorm` (y = (x - mean) / sqrt(var + eps) * w + b,
biased variance over the last dimension; `LayerNorm.add_and_norm` for add_layer_norm) and
`tritongpt.model.layers.RMSNorm` (rms_norm, add_rms_norm: below). Triton's 05-layer-norm tutorial
with three changes: each program owns a contiguous group of rows and walks through it, a row is one tile (one pass
over x, not a loop over column blocks), and dweight/dbias are per-program partial sums (the
tutorial reduces them through lock-protected buffers):

  * Tiling: the input is viewed as [M rows, N features]. The grid has a few programs per SM
    (at most 16 under the interpreter); program p takes rows [p*R, (p+1)*R) and loops over them
    BLOCK_M rows at a time. A whole row fits in one tile (BLOCK_N = next_pow2(N) <= 8192), so
    mean and variance are a single in-SRAM reduction, with no second pass over memory.
  * Launch shape (rows a step, warps, programs per SM, and NUM_STAGES, the software pipelining of
    the row loop: with 2-3 stages the next steps' loads are in flight, cp.async into shared memory,
    while this one computes) is autotuned on a GPU per (rows bucket, width, flags, dtypes), then
    reused without the autotuner; the H200 showed the fixed shape latency-bound (backward 0.59 ms
    against F.layer_norm's 0.24 at 81920 x 768, 2 programs an SM each loading then waiting).
  * Forward: x tile loaded once, math in fp32, y written in x's dtype. The statistics are
    those of x - x[0] (shifted data: exact for constant rows, precise for large means); a row
    whose variance overflows fp32 (spread past ~1.8e19) gives NaN, not the bias. mean
    and rstd (fp32, 4+4 bytes per row) are saved for backward; x_hat is recomputed.
  * Backward: recompute x_hat = (x - mean - mean(x - mean)) * rstd (the second term takes out
    the saved fp32 mean's rounding, which a large mean next to a small spread would otherwise
    carry into every x_hat), then
        dx = rstd * (w*dy - (x_hat * mean(x_hat*w*dy) + mean(w*dy)))
    The weight/bias gradients need a sum over all rows. Each program accumulates its own
    rows' dy*x_hat and dy in one fp32 row of registers each and writes them as row pid of an
    fp32 buffer (rows for the largest grid autotune may launch); a torch .sum(0) over the rows of
    the programs that ran finishes the job. No atomics, so the result is deterministic for a given
    launch shape (on a GPU, autotune's pick: it may differ between processes) and there is no lock
    contention.

  * Residual add (`add_layer_norm`, llm.c's fused residual forward): a pre-LN block computes
    s = x + delta, then LayerNorm(s). The forward loads x and delta, writes s (the residual stream
    the block carries on) and y, and normalizes s from registers: one read of s fewer than an add
    then a LayerNorm. The backward gets s's gradient from its later uses (ds) besides y's, adds
    it into dx as it stores it, and stores delta's gradient in delta's dtype in the same pass when
    that is not s's (a bf16 sublayer on an fp32 stream): autograd would add, then cast, in two
    more passes.

  * RMSNorm (Llama, Gemma, modded-nanogpt): y = x / sqrt(mean(x^2) + eps) * w, through the same two
    kernels with the constexpr IS_RMS: forward skips the mean (rstd is of mean(x^2)) and stores rstd
    alone; backward's x_hat is x * rstd and dx = rstd * (w*dy - x_hat * mean(x_hat*w*dy)), without
    LayerNorm's mean(w*dy) term; only dweight's partials. IS_RMS is a compile-time flag: a
    LayerNorm binary holds none of RMSNorm's branches, and the reverse.

Public API: `layer_norm(x, weight, bias, eps=1e-5)` and `add_layer_norm(x, delta, weight, bias,
eps=1e-5) -> (s, y)`; `rms_norm(x, weight, eps=1e-5)` and `add_rms_norm(x, delta, weight, eps=1e-5)`.
They are built from torch.library custom ops (`tritongpt::layer_norm_fwd` / `layer_norm_bwd`, and
`add_layer_norm_fwd` / `add_layer_norm_bwd`, with fake impls; RMSNorm's `rms_norm_fwd` / `rms_norm_bwd`,
`add_rms_norm_fwd` / `add_rms_norm_bwd`) inside an autograd.Function, so it runs under torch.compile (the
ops stay opaque calls in the graph).
"""
import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from tritongpt._env import triton_interpreting
from tritongpt._types import is_real
from tritongpt.kernels._common import (as_rows, autotuned, cast, cdiv, check_runnable, check_same_device,
                                       check_same_dtype, check_tensor, custom_op, first_order_only, launch_tuned,
                                       next_pow2, no_func_transform, on_tensor_device)
from tritongpt.kernels._common import sm_count as _sm_count  # patched by bench/compile_check.py, tests

MAX_WIDTH = 8192  # one row must fit in one tile (registers/SRAM); wider rows are rejected
INTERPRET = triton_interpreting()  # Triton decided at its import: read once, not on every launch


@triton.jit
def _row_range(M, BLOCK_M: tl.constexpr):
    """This program's rows [start, end): the M rows split evenly over the grid, in whole BLOCK_M
    steps (the last program's group may be short, trailing programs' empty)."""
    rows_per_prog = tl.cdiv(tl.cdiv(M, tl.num_programs(0)), BLOCK_M) * BLOCK_M
    row_start = tl.program_id(0) * rows_per_prog
    return row_start, tl.minimum(row_start + rows_per_prog, M)


@triton.jit(do_not_specialize=["M_BUCKET"])
def _layer_norm_fwd_kernel(X, D, S, Y, W, B, Mean, Rstd, stride_x, stride_d, stride_s, stride_y, M, N,
                           M_BUCKET, eps,
                           HAS_BIAS: tl.constexpr, HAS_ADD: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_RMS: tl.constexpr,
                           NUM_STAGES: tl.constexpr, PROGS: tl.constexpr):
    """One program normalizes its share of the rows (_row_range), BLOCK_M rows per step.
    HAS_ADD: the rows normalized are S = X + D (written out, in S's dtype), not X.
    IS_RMS: RMSNorm, y = x * rstd * w with rstd = 1 / sqrt(mean(x^2) + eps): no mean, no Mean
    stored, no bias (HAS_BIAS False).
    M_BUCKET and PROGS are not read here: M_BUCKET is autotune's key, PROGS sized the grid."""
    row_start, row_end = _row_range(M, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    # weight/bias are reused by every row of the group: load them once.
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    # NUM_STAGES > 1: the loads of the next steps are issued (cp.async into shared memory) while
    # this step computes, so a few programs per SM keep enough bytes in flight
    for r0 in tl.range(row_start, row_end, BLOCK_M, num_stages=NUM_STAGES):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)  # row * stride can pass 2^31 on big batches
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # Statistics of x - x0, x0 = the row's first value (shifted data): a constant row gives
        # exactly 0 (sum(x)/N is off by an ulp, which rstd = 1/sqrt(eps) magnified to 0.2 at
        # eps 1e-12), and a row whose mean is large next to its spread keeps its precision.
        if not IS_RMS:
            x0 = tl.load(X + rows64 * stride_x, mask=row_ok, other=0.0).to(tl.float32)
        if HAS_ADD:
            # The sum is rounded to S's dtype before it is normalized: the caller holds S in that
            # dtype, and LayerNorm(x + d) on the unfused path normalizes the rounded sum too.
            d = tl.load(D + rows64[:, None] * stride_d + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            s = cast(x + d, S.dtype.element_ty)
            tl.store(S + rows64[:, None] * stride_s + cols[None, :], s, mask=mask)
            x = s.to(tl.float32)
            if not IS_RMS:
                d0 = tl.load(D + rows64 * stride_d, mask=row_ok, other=0.0).to(tl.float32)
                x0 = cast(x0 + d0, S.dtype.element_ty).to(tl.float32)
        if IS_RMS:
            # nothing to centre: xc is x itself and var its mean square (masked columns load 0)
            xc = x
            var = tl.sum(xc * xc, axis=1) / N
        else:
            xs = tl.where(mask, x - x0[:, None], 0.0)
            mean_s = tl.sum(xs, axis=1) / N
            xc = tl.where(mask, xs - mean_s[:, None], 0.0)
            mean = x0 + mean_s
            var = tl.sum(xc * xc, axis=1) / N  # biased variance, as in GPT-2
        # A spread past ~1.8e19 squares to inf in fp32: rstd would be 0 and y the bias, a finite
        # wrong answer. NaN says so instead, as PyTorch's LayerNorm does (no second pass for a
        # row that large: it means the model has diverged).
        rstd = tl.where(var == float("inf"), float("nan"), 1.0 / tl.sqrt(var + eps))
        y = xc * rstd[:, None] * w[None, :]
        if HAS_BIAS:
            y = y + b[None, :]
        tl.store(Y + rows64[:, None] * stride_y + cols[None, :], cast(y, Y.dtype.element_ty), mask=mask)
        if not IS_RMS:
            tl.store(Mean + rows, mean, mask=row_ok)
        tl.store(Rstd + rows, rstd, mask=row_ok)


# The backward's three row sums as one tl.reduce on a GPU. Triton's interpreter runs a tuple reduce's combine in
# Python, element by element: 11 s for a 64 x 768 LayerNorm fwd+bwd against 0.14 s with tl.sum, so there the same
# three sums are three tl.sum (a test runs the tuple form on a small shape).
REDUCE3 = tl.constexpr(not INTERPRET)


@triton.jit
def _sum3(a0, a1, a2, b0, b1, b2):
    """tl.reduce's combine for three sums at once."""
    return a0 + b0, a1 + b1, a2 + b2


@triton.jit(do_not_specialize=["M_BUCKET"])
def _layer_norm_bwd_kernel(X, DY, DS, W, Mean, Rstd, DX, DX2, DW_part, DB_part,
                           stride_x, stride_dy, stride_ds, stride_dx, stride_dx2, M, N, M_BUCKET,
                           HAS_DS: tl.constexpr, HAS_DX2: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_RMS: tl.constexpr,
                           NUM_STAGES: tl.constexpr, PROGS: tl.constexpr):
    """dx for this program's rows (_row_range), plus its partial sums of dW and dB (row pid of
    DW_part / DB_part). M_BUCKET and PROGS as in forward.
    IS_RMS: RMSNorm's backward, x_hat = x * rstd and no mean term in dx; no Mean read, no dB.
    HAS_DS: X was a residual sum S = x + delta that is used elsewhere too; its gradient from
    there, DS, is added to dx here rather than by autograd in another pass. HAS_DX2: dx is
    stored a second time in DX2's dtype (delta's gradient, when delta's dtype is not S's),
    rather than cast by autograd in another pass."""
    pid = tl.program_id(0)
    row_start, row_end = _row_range(M, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    # One fp32 row per column sum: a step's BLOCK_M rows are summed into it as they go (a sum over
    # rows is within each thread's registers), not kept as a [BLOCK_M, BLOCK_N] tile of registers.
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if not IS_RMS:
        db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in tl.range(row_start, row_end, BLOCK_M, num_stages=NUM_STAGES):  # pipelined as forward's
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if IS_RMS:
            # y = x * rstd * w: dx = rstd * (w*dy - x_hat * mean(x_hat*w*dy)), without LayerNorm's
            # mean(w*dy) term (no mean was subtracted)
            rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
            xhat = x * rstd[:, None]
            wdy = w[None, :] * dy
            c1 = tl.sum(xhat * wdy, axis=1) / N
            dx = (wdy - xhat * c1[:, None]) * rstd[:, None]
        else:
            mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
            rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
            # x_hat is recomputed rather than saved: one fp32 load of x is cheaper than a stored copy.
            # The saved mean is rounded to fp32, an ulp of its size: at a mean of 1e4 that is 1e-3,
            # a tenth of a 1e-2 spread, and x - mean would carry it into every x_hat (dw 2.5e-2
            # relative). x - mean is exact or nearly so (x and mean are close), so its row mean is
            # that rounding: take it out, as forward's shifted statistics did.
            xm = tl.where(mask, x - mean[:, None], 0.0)
            wdy = w[None, :] * dy
            # The row's three sums in one reduction: one exchange across the row's warps, not three one
            # after another (the first, r's, fed the other two). With x_hat = (xm - r) rstd,
            # sum(x_hat wdy) = rstd (sum(xm wdy) - r sum(wdy)); r is tiny (the mean's rounding): no cancellation.
            if REDUCE3:
                s_xm, s_xw, s_w = tl.reduce((xm, xm * wdy, wdy), 1, _sum3)
            else:
                s_xm, s_xw, s_w = tl.sum(xm, axis=1), tl.sum(xm * wdy, axis=1), tl.sum(wdy, axis=1)
            r = s_xm / N
            xhat = tl.where(mask, (xm - r[:, None]) * rstd[:, None], 0.0)
            c1 = rstd * (s_xw - r * s_w) / N
            c2 = s_w / N
            dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DS:
            dx += tl.load(DS + rows64[:, None] * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], cast(dx, DX.dtype.element_ty), mask=mask)
        if HAS_DX2:
            tl.store(DX2 + rows64[:, None] * stride_dx2 + cols[None, :], cast(dx, DX2.dtype.element_ty), mask=mask)
        dw_acc += tl.sum(dy * xhat, axis=0)
        if not IS_RMS:
            db_acc += tl.sum(dy, axis=0)
    tl.store(DW_part + pid * N + cols, dw_acc, mask=col_ok)
    if not IS_RMS:
        tl.store(DB_part + pid * N + cols, db_acc, mask=col_ok)


def _grid_size(M: int, BLOCK_M: int, max_programs: int) -> int:
    """Programs for M rows walked BLOCK_M at a time, at most max_programs, none without rows: the
    kernels' _row_range gives each cdiv(cdiv(M, n), BLOCK_M) * BLOCK_M rows, and with n this
    size that split needs exactly n programs."""
    n = max(min(cdiv(M, BLOCK_M), max_programs), 1)
    return cdiv(M, cdiv(cdiv(M, n), BLOCK_M) * BLOCK_M)


@functools.lru_cache(maxsize=None)
def _interpreter_shape(M: int, N: int):
    """(n_programs, BLOCK_M) under the interpreter, which pays per program and per op, not per
    element: few programs (at most 16), big tiles (up to 64 rows, 16K elements a step)."""
    BLOCK_M = max(1, min(64, 16384 // next_pow2(N)))
    return _grid_size(M, BLOCK_M, 16), BLOCK_M


# Launch shapes autotune times on a GPU, as (elements a step loads per tensor, num_warps, stages of the
# row loop, programs per SM); a step is BLOCK_M = elements // BLOCK_N rows (at least one). Memory-bound
# kernels want bytes in flight: either many resident programs each waiting on its loads (no
# pipelining, 8 programs an SM: the forward's old fixed shape) or a few programs whose row loop keeps
# the next steps' loads in flight (NUM_STAGES 2-3). Backward keeps to 1-2 programs an SM: each program
# adds a row of dW (and dB) partial sums that is written, then read back by the final sum; at 2 an SM
# and 16K rows of width 768 (bf16) that is 4 % of the kernel's traffic.
FWD_SHAPES = ((4096, 8, 1, 8), (4096, 8, 2, 4), (4096, 8, 3, 2), (2048, 4, 2, 8), (2048, 4, 3, 4),
              (8192, 8, 2, 2), (1024, 4, 3, 8))
BWD_SHAPES = ((4096, 8, 1, 2), (4096, 8, 2, 2), (4096, 8, 3, 1), (2048, 4, 2, 2), (2048, 4, 3, 2),
              (2048, 8, 3, 1), (8192, 8, 2, 1), (1024, 4, 4, 2))
MAX_BWD_PROGS = max(p for *_, p in BWD_SHAPES)
# At most this many rows (decode steps, short prompts): the first shape, untimed. The kernel takes microseconds
# there, the call is host-bound, and each new rows bucket would cost a search (~1 s) in a generation session.
SMALL_M = 1024


def _prune_shapes(configs, named_args, **kwargs):
    """Turn each (elements, warps, stages, programs) entry into BLOCK_M for this width, drop the ones
    that would hold more than 32 values per thread in each row tile (spills) and repeats; with few
    rows keep only the first: nothing to time at that size."""
    BLOCK_N, M_BUCKET = kwargs["BLOCK_N"], named_args["M_BUCKET"]
    kept, seen = [], set()
    for c in configs:
        elems, progs = c.kwargs["ELEMS"], c.kwargs["PROGS"]
        BLOCK_M = min(max(1, elems // BLOCK_N), M_BUCKET)
        shape = (BLOCK_M, c.num_warps, c.num_stages, progs)
        if BLOCK_M * BLOCK_N > 32 * 32 * c.num_warps or shape in seen:
            continue
        seen.add(shape)
        kept.append(triton.Config({"BLOCK_M": BLOCK_M, "NUM_STAGES": c.num_stages, "PROGS": progs},
                                  num_warps=c.num_warps, num_stages=c.num_stages))
    if not kept:  # cannot happen for BLOCK_N <= 8192 (8 warps: 32 values a thread); a guard, not a path
        raise ValueError(f"no LayerNorm launch shape for BLOCK_N={BLOCK_N}")
    return kept[:1] if M_BUCKET <= SMALL_M else kept


def _tuner(shapes, key):
    # the loop's stages double as the kernel's num_stages (Triton's default for its loops)
    return triton.autotune([triton.Config({"ELEMS": e, "PROGS": p}, num_warps=w, num_stages=s)
                            for e, w, s, p in shapes],
                           key=["M_BUCKET", "N", *key], prune_configs_by={"early_config_prune": _prune_shapes})


# (built under the interpreter too, where _launch does not use them: a test drives them there)
_fwd_tuned = autotuned("layernorm.forward", _tuner(FWD_SHAPES, ["HAS_BIAS", "HAS_ADD", "IS_RMS"])(
    _layer_norm_fwd_kernel))
_bwd_tuned = autotuned("layernorm.backward", _tuner(BWD_SHAPES, ["HAS_DS", "HAS_DX2", "IS_RMS"])(
    _layer_norm_bwd_kernel))


def _launch(backward, args, flags, M, N, device):
    """Launch the forward (backward False) or backward kernel on args (positional, up to M_BUCKET);
    -> how many programs ran, None when the launch was only recorded (bench/compile_check.py).

    Interpreter: the fixed _interpreter_shape. GPU: the first launch of a (rows bucket, width, flags,
    dtypes) runs Triton's autotuner over the shapes above; later ones launch its pick directly
    (_common.launch_tuned)."""
    kernel = _layer_norm_bwd_kernel if backward else _layer_norm_fwd_kernel
    if INTERPRET:
        n, BLOCK_M = _interpreter_shape(M, N)
        kernel[(n,)](*args, **flags, BLOCK_M=BLOCK_M, NUM_STAGES=1, PROGS=1, num_warps=1)
        return n
    sms, launched = _sm_count(device), [None]

    def grid(meta):
        launched[0] = _grid_size(M, meta["BLOCK_M"], sms * meta["PROGS"])
        return (launched[0],)

    launch_tuned(_bwd_tuned if backward else _fwd_tuned, grid, *args, **flags)
    return launched[0]


def _partials(rows, N, device):
    """Uninitialized fp32 rows for the backward's per-program dW/dB sums; only the rows of programs
    that ran are summed (a test fills them with NaN to prove it)."""
    return torch.empty((rows, N), device=device, dtype=torch.float32)


# Launchers: allocate outputs and launch; the custom ops below check the device first.
# (bench/compile_check.py calls these on meta tensors to compile the exact launches for sm_90.)
@on_tensor_device
def _fwd_launch(x, weight, bias, eps, delta=None, rms=False):
    """-> (y, mean, rstd); with delta, the rows normalized are s = x + delta: -> (s, y, mean, rstd),
    s and y in the dtype x + delta has in torch (fp32 + bf16 -> fp32). rms: RMSNorm (bias None),
    mean is None."""
    M, N = x.shape
    out_dtype = x.dtype if delta is None else torch.promote_types(x.dtype, delta.dtype)
    s = None if delta is None else torch.empty(x.shape, device=x.device, dtype=out_dtype)
    y = torch.empty(x.shape, device=x.device, dtype=out_dtype)
    mean = None if rms else torch.empty(M, device=x.device, dtype=torch.float32)
    rstd = torch.empty(M, device=x.device, dtype=torch.float32)
    if M > 0:
        _launch(False, (
            x, x if delta is None else delta, y if s is None else s, y,
            weight, bias if bias is not None else weight, rstd if rms else mean, rstd,
            x.stride(0), x.stride(0) if delta is None else delta.stride(0), y.stride(0), y.stride(0),
            M, N, next_pow2(M), float(eps)),  # eps: a Python float is fp32 in Triton
            dict(HAS_BIAS=bias is not None, HAS_ADD=delta is not None, IS_RMS=rms, BLOCK_N=next_pow2(N)),
            M, N, x.device)
    return (y, mean, rstd) if delta is None else (s, y, mean, rstd)


@on_tensor_device
def _bwd_launch(dy, x, weight, mean, rstd, ds=None, dx2_dtype=None):
    """-> (dx, dweight, dbias). ds (x's gradient from its other uses, when x is a residual sum)
    is added into dx; dx2_dtype: dx is also written in that dtype: -> (dx, dx2, dweight, dbias).
    mean None: RMSNorm's backward, and dbias is None."""
    rms = mean is None
    M, N = x.shape
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    if ds is not None and ds.stride(-1) != 1:
        ds = ds.contiguous()
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    dx2 = None if dx2_dtype is None else torch.empty(x.shape, device=x.device, dtype=dx2_dtype)
    if M == 0:
        dw, db = torch.zeros_like(weight), None if rms else torch.zeros_like(weight)
    else:
        # one row of partial sums per program: as many rows as the largest grid autotune may launch
        rows = _interpreter_shape(M, N)[0] if INTERPRET else min(M, _sm_count(x.device) * MAX_BWD_PROGS)
        dw_part = _partials(rows, N, x.device)
        db_part = dw_part if rms else _partials(rows, N, x.device)
        n = _launch(True, (
            x, dy, dy if ds is None else ds, weight, rstd if rms else mean, rstd, dx, dx if dx2 is None else dx2,
            dw_part, db_part,
            x.stride(0), dy.stride(0), dy.stride(0) if ds is None else ds.stride(0), dx.stride(0),
            dx.stride(0), M, N, next_pow2(M)),
            dict(HAS_DS=ds is not None, HAS_DX2=dx2 is not None, IS_RMS=rms, BLOCK_N=next_pow2(N)),
            M, N, x.device)
        n = rows if n is None else n  # only recorded (meta tensors): nothing to sum
        dw = dw_part[:n].sum(0).to(weight.dtype)
        db = None if rms else db_part[:n].sum(0).to(weight.dtype)
    return (dx, dw, db) if dx2 is None else (dx, dx2, dw, db)


def _check_op_layout(x, weight, bias=None, ops="layer_norm"):
    """What the kernels assume of their inputs; layer_norm() arranges it, a direct call of the
    op must too (a transposed x was read as if row-major: garbage, no error)."""
    check_tensor(x, "x", ndim=2)
    N = x.shape[1]
    check_tensor(weight, "weight", shape=(N,))
    if bias is not None:
        check_tensor(bias, "bias", shape=(N,))
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"tritongpt::{ops} ops read {name} with unit stride on its last dim, got strides "
                             f"{t.stride()} (call {ops}(), which copies, or pass .contiguous())")


def _check_bwd_args(dy, x, weight, ds, ops="layer_norm"):
    """What the backward ops check: dy (and ds, when given) of x's shape, x laid out as forward's."""
    check_runnable(dy, "dy")
    _check_op_layout(x, weight, ops=ops)
    check_tensor(dy, "dy", shape=x.shape)
    if ds is not None:
        check_tensor(ds, "ds", shape=x.shape)


@custom_op("tritongpt::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, N] with unit stride on the last dim -> (y [M, N] x.dtype, mean [M] fp32, rstd [M] fp32)."""
    check_runnable(x, "x")
    _check_op_layout(x, weight, bias)
    return _fwd_launch(x, weight, bias, eps)


@_layer_norm_fwd.register_fake
def _(x, weight, bias, eps):
    M = x.shape[0]
    return (torch.empty_like(x), x.new_empty(M, dtype=torch.float32), x.new_empty(M, dtype=torch.float32))


@custom_op("tritongpt::add_layer_norm_fwd", mutates_args=())
def _add_layer_norm_fwd(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, delta [M, N] -> (s = x + delta, y = LayerNorm(s), mean, rstd); s and y in x + delta's dtype."""
    check_runnable(x, "x")
    _check_op_layout(x, weight, bias)
    _check_op_layout(delta, weight)
    check_tensor(delta, "delta", shape=x.shape)
    return _fwd_launch(x, weight, bias, eps, delta=delta)


@_add_layer_norm_fwd.register_fake
def _(x, delta, weight, bias, eps):
    M, dtype = x.shape[0], torch.promote_types(x.dtype, delta.dtype)
    return (x.new_empty(x.shape, dtype=dtype), x.new_empty(x.shape, dtype=dtype),
            x.new_empty(M, dtype=torch.float32), x.new_empty(M, dtype=torch.float32))


@custom_op("tritongpt::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                    rstd: torch.Tensor, ds: Optional[torch.Tensor] = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx [M, N] in x.dtype, dweight [N] and dbias [N] in weight.dtype). ds: x's gradient from
    its other uses (x a residual sum, add_layer_norm), added into dx."""
    _check_bwd_args(dy, x, weight, ds)
    return _bwd_launch(dy, x, weight, mean, rstd, ds)


@_layer_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, ds=None):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


@custom_op("tritongpt::add_layer_norm_bwd", mutates_args=())
def _add_layer_norm_bwd(dy: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                        rstd: torch.Tensor, ds: Optional[torch.Tensor], delta_dtype: torch.dtype
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """layer_norm_bwd for s = x + delta when delta's dtype is not s's: -> (dx in s.dtype, ddelta
    in delta_dtype, dweight, dbias), both gradients written by one pass."""
    _check_bwd_args(dy, s, weight, ds)
    return _bwd_launch(dy, s, weight, mean, rstd, ds, dx2_dtype=delta_dtype)


@_add_layer_norm_bwd.register_fake
def _(dy, s, weight, mean, rstd, ds, delta_dtype):
    return (torch.empty_like(s), s.new_empty(s.shape, dtype=delta_dtype), torch.empty_like(weight),
            torch.empty_like(weight))


# RMSNorm's ops: the same kernels with IS_RMS, no bias, no mean (forward saves rstd alone).
@custom_op("tritongpt::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, N] with unit stride on the last dim -> (y [M, N] x.dtype, rstd [M] fp32)."""
    check_runnable(x, "x")
    _check_op_layout(x, weight, ops="rms_norm")
    y, _, rstd = _fwd_launch(x, weight, None, eps, rms=True)
    return y, rstd


@_rms_norm_fwd.register_fake
def _(x, weight, eps):
    return torch.empty_like(x), x.new_empty(x.shape[0], dtype=torch.float32)


@custom_op("tritongpt::add_rms_norm_fwd", mutates_args=())
def _add_rms_norm_fwd(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, delta [M, N] -> (s = x + delta, y = RMSNorm(s), rstd); s and y in x + delta's dtype."""
    check_runnable(x, "x")
    _check_op_layout(x, weight, ops="rms_norm")
    _check_op_layout(delta, weight, ops="rms_norm")
    check_tensor(delta, "delta", shape=x.shape)
    s, y, _, rstd = _fwd_launch(x, weight, None, eps, delta=delta, rms=True)
    return s, y, rstd


@_add_rms_norm_fwd.register_fake
def _(x, delta, weight, eps):
    dtype = torch.promote_types(x.dtype, delta.dtype)
    return (x.new_empty(x.shape, dtype=dtype), x.new_empty(x.shape, dtype=dtype),
            x.new_empty(x.shape[0], dtype=torch.float32))


@custom_op("tritongpt::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                  ds: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (dx [M, N] in x.dtype, dweight [N] in weight.dtype); ds added into dx as layer_norm_bwd's."""
    _check_bwd_args(dy, x, weight, ds, ops="rms_norm")
    dx, dw, _ = _bwd_launch(dy, x, weight, None, rstd, ds)
    return dx, dw


@_rms_norm_bwd.register_fake
def _(dy, x, weight, rstd, ds=None):
    return torch.empty_like(x), torch.empty_like(weight)


@custom_op("tritongpt::add_rms_norm_bwd", mutates_args=())
def _add_rms_norm_bwd(dy: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                      ds: Optional[torch.Tensor], delta_dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rms_norm_bwd for s = x + delta when delta's dtype is not s's: -> (dx in s.dtype, ddelta in
    delta_dtype, dweight), as add_layer_norm_bwd."""
    _check_bwd_args(dy, s, weight, ds, ops="rms_norm")
    dx, ddelta, dw, _ = _bwd_launch(dy, s, weight, None, rstd, ds, dx2_dtype=delta_dtype)
    return dx, ddelta, dw


@_add_rms_norm_bwd.register_fake
def _(dy, s, weight, rstd, ds, delta_dtype):
    return torch.empty_like(s), s.new_empty(s.shape, dtype=delta_dtype), torch.empty_like(weight)


class LayerNormFunction(torch.autograd.Function):
    """Saves x (the caller keeps it alive anyway), weight, and the fp32 per-row mean and rstd."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        shape = x.shape
        x2 = as_rows(x)
        y, mean, rstd = _layer_norm_fwd.call(x2, weight, bias, eps)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.has_bias = bias is not None
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        first_order_only("layer_norm")
        x2, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = _layer_norm_bwd.call(dy.reshape(x2.shape), x2, weight, mean, rstd)
        return dx.view(dy.shape), dw, (db if ctx.has_bias else None), None


class AddLayerNormFunction(torch.autograd.Function):
    """s = x + delta and y = LayerNorm(s) in one pass over memory, as llm.c's fused residual
    forward. Saves s (an output the caller keeps as its residual stream anyway), weight, mean and
    rstd. Backward gets s's gradient from its other uses (ds) and y's (dy) and adds ds into the
    LayerNorm's dx in the same kernel; x and delta both get that sum."""

    @staticmethod
    def forward(ctx, x, delta, weight, bias, eps):
        shape = x.shape
        s, y, mean, rstd = _add_layer_norm_fwd.call(as_rows(x), as_rows(delta), weight, bias, eps)
        ctx.save_for_backward(s, weight, mean, rstd)
        ctx.has_bias = bias is not None
        ctx.shape, ctx.delta_dtype = shape, delta.dtype
        ctx.set_materialize_grads(False)  # an unused output's gradient is None, not zeros to read
        return s.view(shape), y.view(shape)

    @staticmethod
    def backward(ctx, ds, dy):
        first_order_only("add_layer_norm")
        s, weight, mean, rstd = ctx.saved_tensors
        if dy is None:  # y unused: s's gradient is x's and delta's (autograd casts it to delta's dtype)
            return ds, ds, None, None, None
        dy, ds = dy.reshape(s.shape), None if ds is None else ds.reshape(s.shape)
        if ctx.delta_dtype == s.dtype:
            dx, dw, db = _layer_norm_bwd.call(dy, s, weight, mean, rstd, ds)
            # one tensor object for x and delta: autograd copies it for a second leaf's .grad. Two views of one
            # buffer would both be kept as .grad, and a later backward accumulating into one added to both.
            dx = ddelta = dx.view(ctx.shape)
        else:  # an fp32 stream and a bf16 sublayer: delta's gradient written in bf16 by the same pass
            dx, ddelta, dw, db = _add_layer_norm_bwd.call(dy, s, weight, mean, rstd, ds,
                                                                        ctx.delta_dtype)
            dx, ddelta = dx.view(ctx.shape), ddelta.view(ctx.shape)
        return dx, ddelta, dw, (db if ctx.has_bias else None), None


class RMSNormFunction(torch.autograd.Function):
    """LayerNormFunction for RMSNorm: saves x, weight and the fp32 per-row rstd (no mean, no bias)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x2 = as_rows(x)
        y, rstd = _rms_norm_fwd.call(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        first_order_only("rms_norm")
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = _rms_norm_bwd.call(dy.reshape(x2.shape), x2, weight, rstd)
        return dx.view(dy.shape), dw, None


class AddRMSNormFunction(torch.autograd.Function):
    """AddLayerNormFunction for RMSNorm: s = x + delta and y = RMSNorm(s) in one pass; saves s,
    weight and rstd; backward adds s's other gradient (ds) into dx in the same kernel."""

    @staticmethod
    def forward(ctx, x, delta, weight, eps):
        s, y, rstd = _add_rms_norm_fwd.call(as_rows(x), as_rows(delta), weight, eps)
        ctx.save_for_backward(s, weight, rstd)
        ctx.shape, ctx.delta_dtype = x.shape, delta.dtype
        ctx.set_materialize_grads(False)
        return s.view(x.shape), y.view(x.shape)

    @staticmethod
    def backward(ctx, ds, dy):
        first_order_only("add_rms_norm")
        s, weight, rstd = ctx.saved_tensors
        if dy is None:
            return ds, ds, None, None
        dy, ds = dy.reshape(s.shape), None if ds is None else ds.reshape(s.shape)
        if ctx.delta_dtype == s.dtype:
            dx, dw = _rms_norm_bwd.call(dy, s, weight, rstd, ds)
            dx = ddelta = dx.view(ctx.shape)  # one object, as AddLayerNormFunction's
        else:
            dx, ddelta, dw = _add_rms_norm_bwd.call(dy, s, weight, rstd, ds, ctx.delta_dtype)
            dx, ddelta = dx.view(ctx.shape), ddelta.view(ctx.shape)
        return dx, ddelta, dw, None


def _check_args(fn: str, x, weight, bias, eps):
    check_tensor(x, "x")
    if x.dim() == 0:
        raise ValueError(f"{fn}: x must have at least 1 dim (the normalized one), got a scalar")
    N = x.shape[-1]
    check_tensor(weight, "weight", shape=(N,))
    if bias is not None:
        check_tensor(bias, "bias", shape=(N,))
    check_same_dtype(weight=weight, bias=bias)
    if N == 0 or N > MAX_WIDTH:
        raise ValueError(f"{fn}: last dim of x is {N}; the Triton kernel supports 1..{MAX_WIDTH}")
    if not is_real(eps) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")


def _unit_stride(t):
    """weight/bias are read with unit stride by the kernel."""
    return t if t is None or t.stride(0) == 1 else t.contiguous()


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float = 1e-5):
    """LayerNorm over the last dim of x (any leading dims); output has x's dtype. Differentiable.

    x, weight, bias: fp32/bf16/fp16 (weight/bias may differ from x, e.g. fp32 params under
    autocast; the math is fp32 either way). bias may be None.
    """
    no_func_transform("layer_norm")
    _check_args("layer_norm", x, weight, bias, eps)
    check_same_device(x=x, weight=weight, bias=bias)
    return LayerNormFunction.apply(x, _unit_stride(weight), _unit_stride(bias), float(eps))


def add_layer_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   eps: float = 1e-5):
    """(s, y) = (x + delta, LayerNorm(x + delta)) in one kernel: a pre-LN block's residual add and
    the LayerNorm after it. Reference: `LayerNorm.add_and_norm` (model/layers.py). Differentiable.

    x and delta have one shape and may differ in dtype (an fp32 residual stream and a bf16
    sublayer output under autocast): s and y then have the dtype x + delta has in torch.
    """
    no_func_transform("add_layer_norm")
    _check_args("add_layer_norm", x, weight, bias, eps)
    check_tensor(delta, "delta")
    if delta.shape != x.shape:
        raise ValueError(f"add_layer_norm: delta has shape {tuple(delta.shape)}, x {tuple(x.shape)}; "
                         "they must match (no broadcasting)")
    check_same_device(x=x, delta=delta, weight=weight, bias=bias)
    return AddLayerNormFunction.apply(x, delta, _unit_stride(weight), _unit_stride(bias), float(eps))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5):
    """RMSNorm over the last dim of x: x / sqrt(mean(x^2) + eps) * weight (no mean subtracted, no
    bias; Llama's, Gemma's). Reference: `tritongpt.model.layers.RMSNorm`. Differentiable; dtypes
    as layer_norm's."""
    no_func_transform("rms_norm")
    _check_args("rms_norm", x, weight, None, eps)
    check_same_device(x=x, weight=weight)
    return RMSNormFunction.apply(x, _unit_stride(weight), float(eps))


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5):
    """(s, y) = (x + delta, RMSNorm(x + delta)) in one kernel, as add_layer_norm. Reference:
    `RMSNorm.add_and_norm` (model/layers.py). Differentiable."""
    no_func_transform("add_rms_norm")
    _check_args("add_rms_norm", x, weight, None, eps)
    check_tensor(delta, "delta")
    if delta.shape != x.shape:
        raise ValueError(f"add_rms_norm: delta has shape {tuple(delta.shape)}, x {tuple(x.shape)}; "
                         "they must match (no broadcasting)")
    check_same_device(x=x, delta=delta, weight=weight)
    return AddRMSNormFunction.apply(x, delta, _unit_stride(weight), float(eps))


__all__ = ["layer_norm", "add_layer_norm", "rms_norm", "add_rms_norm", "LayerNormFunction", "AddLayerNormFunction",
           "RMSNormFunction", "AddRMSNormFunction", "MAX_WIDTH"]
