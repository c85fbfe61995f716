"""The distillation loss in Triton, fused with both models' LM heads: Liger-Kernel's FusedLinearJSD,
ours. linear_distill_loss (at the end) never holds either model's whole [tokens, vocab] logits.

Reference: `tritongpt.train.distill.distill_loss` (and `tritongpt.train.distill.divergence`, the D it calls) on
the logits of both LM heads: loss = (1 - alpha) * CE(student) + alpha * T^2 * D, D TRL GKD's generalized JSD
between softmax(s / T) and softmax(t / T) (beta 0: KL(teacher || student), 1: KL(student || teacher), else the
mixture form with M = (1 - beta) p_s + beta p_t), CE and D each the mean (or sum) over the rows whose target is counted.

Why: a `--teacher` step built the student's and the teacher's logits whole (two [tokens, vocab] tensors),
then log-softmaxes, a mixture and their gradients in fp32: several times the logits' size. Here rows go
chunk by chunk, as in kernels/cross_entropy.py's linear_cross_entropy: a chunk's two logits (the teacher's
under no_grad), one kernel launch that writes the chunk's loss parts and d(loss)/d(student logits) over the
student's logits in place, then dh = dlogits @ W and dW += dlogits^T @ h, and the chunk is dropped.

Kernel (one program per row on a GPU, BLOCK_R rows per program under the interpreter; rows are streamed in
BLOCK_V column tiles, so only a few BLOCK_V vectors per row live in registers, nothing in shared memory):
  pass 1  three online logsumexps per lane (flash attention's running max and rescaled sum, as the CE kernel):
          the student's logits x over the CE classes (T = 1), x / T and the teacher's y / T over the
          divergence's V classes. Each is kept as (row max m, log S) so log p = (x - m) - log S keeps fp32
          precision near the max.
  pass 2  the loss: CE = (m - x_target) + log S, and D summed over the tiles from log p_s and log p_t
          recomputed from the logits (nothing stored per column); for beta in (0, 1) also R = KL(p_s || M).
  pass 3  the gradient, written over x (recomputed again: reading a tile is cheaper than storing p):
            d CE / d x_j   = softmax(x)_j - [j == target]
            d D / d x_j    = (1 / T) * dD/ds_j, with s = x / T:
              beta = 0:        p_s,j - p_t,j
              beta = 1:        p_s,j (log p_s,j - log p_t,j - D)
              0 < beta < 1:    (1 - beta) p_s,j (log p_s,j - log M_j - R)
          (the mixture's terms through log M cancel: sum_j M_j d log M_j = d sum_j M_j = 0). So
          dx = (1 - alpha) dCE + alpha T dD/ds (T^2 times dD/dx = dD/ds / T), times the row's upstream
          gradient, which is a scalar (1/n or 1) applied in backward. Forward KL needs no row sum: its
          gradient is written in pass 2 and pass 3 is skipped. Without a gradient (evaluation) pass 3 is skipped too.
  ignore  rows whose target is ignore_index get CE 0, D 0 and gradient 0.
  padding rows hold W >= V values: columns past the CE's classes (and past the divergence's V, which may be
          fewer: the tokenizer's ids) count as absent and get gradient 0; the teacher's width may differ.
Unsupported (the caller keeps the reference path): label smoothing, z-loss, a logit soft cap.
"""
import math

import torch
import triton
import triton.language as tl

from tritongpt._env import triton_interpreting
from tritongpt._types import is_int, is_real
from tritongpt.kernels._common import (autocast_dtype, cast, cdiv, check_runnable, check_same_device, check_same_dtype,
                                       check_tensor, custom_op, first_order_only, next_pow2, no_func_transform,
                                       on_tensor_device)
from tritongpt.kernels.cross_entropy import (CHUNK_ELEMENTS, _as_int, _bias_grad_buffer, _checked_targets,
                                             _chunk_logits, _head_grads, _head_grad_buffers,
                                             _pad_rows, _padded_count)

INTERPRET = triton_interpreting()
LOG2E = tl.constexpr(1.4426950408889634)
FORWARD_KL, REVERSE_KL, MIXTURE = 0, 1, 2


@triton.jit
def _lse_step(m, s, x):
    """One tile into a lane's running (max, sum exp(x - max)); a lane of -inf only rescales by a finite stand-in."""
    m_new = tl.maximum(m, x)
    m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)
    s = s * tl.exp2((m - m_ref) * LOG2E) + tl.exp2((x - m_ref) * LOG2E)
    return m_new, s


@triton.jit
def _lse_row(m, s):
    """The lanes merged: (row max, log sum_j exp(x_j - max))."""
    m_row = tl.max(m, 1)
    return m_row, tl.log(tl.sum(s * tl.exp2((m - m_row[:, None]) * LOG2E), 1))


@triton.jit
def _log_probs(x, y, inv_t, ms, ls, mt, lt, log_1mb, log_b, MODE: tl.constexpr):
    """A tile's log p_s, log p_t (at temperature 1 / inv_t) and the log of what D compares p_s with
    (log p_t for beta 1; log M for the mixture)."""
    lps = (x * inv_t - ms[:, None]) - ls[:, None]
    lpt = (y * inv_t - mt[:, None]) - lt[:, None]
    if MODE == 2:
        a = lps + log_1mb
        b = lpt + log_b
        big = tl.maximum(a, b)
        lref = big + tl.log(1.0 + tl.exp2((tl.minimum(a, b) - big) * LOG2E))
    else:
        lref = lpt
    return lps, lpt, lref


@triton.jit
def _grad_tile(x, lps, lpt, lref, cols, target, mc, lc, r, V_CE, V_KD, ce_weight, kd_weight, kd_share,
               MODE: tl.constexpr):
    """A tile's d(row loss)/dx: ce_weight dCE + kd_weight (dD/ds), before the row's upstream gradient."""
    p_ce = tl.exp2(((x - mc[:, None]) - lc[:, None]) * LOG2E)
    p_ce = tl.where(cols < V_CE, p_ce, 0.0)
    p_ce = tl.where(cols == target[:, None], p_ce - 1.0, p_ce)
    ps = tl.exp2(lps * LOG2E)
    if MODE == 0:
        dkd = ps - tl.exp2(lpt * LOG2E)
    else:
        dkd = kd_share * ps * ((lps - lref) - r[:, None])
    return ce_weight * p_ce + kd_weight * tl.where(cols < V_KD, dkd, 0.0)


@triton.jit
def _distill_kernel(X, Y, Tgt, CE, KD, stride_x, stride_y, N, W, WT, V_CE, V_KD, ignore_index, inv_t, beta, one_mb,
                    log_1mb, log_b, ce_weight, kd_weight, MODE: tl.constexpr, HAS_GRAD: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """Grid (cdiv(N, BLOCK_R),). Row i of student logits X [N, W] and teacher logits Y [N, WT]:
    CE[i] = CE(X[i, :V_CE], Tgt[i]), KD[i] = D(X[i, :V_KD] / T, Y[i, :V_KD] / T) (0 where Tgt[i] is
    ignore_index); with HAS_GRAD, X[i, :W] is overwritten with ce_weight dCE/dx + kd_weight dD/ds.
    Loads are masked at the rows' widths W and WT, not at the classes (a padded row stays 16-byte aligned and is
    read in 16-byte vectors, as the CE kernel's); the columns past the classes are then set aside with where."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    # rows past N re-read row N-1 (their results are never stored): no all--inf rows, no nan
    safe = tl.minimum(rows, N - 1).to(tl.int64)[:, None]
    x_rows, y_rows = X + safe * stride_x, Y + safe * stride_y
    cols0 = tl.arange(0, BLOCK_V)[None, :]
    mc = tl.full([BLOCK_R, BLOCK_V], float("-inf"), tl.float32)
    ms, mt = mc, mc
    sc = tl.zeros([BLOCK_R, BLOCK_V], tl.float32)
    ss, st = sc, sc
    for start in range(0, V_CE, BLOCK_V):  # pass 1: V_KD <= V_CE
        cols = start + cols0
        x = tl.load(x_rows + cols, mask=cols < W, other=0.0).to(tl.float32)
        y = tl.load(y_rows + cols, mask=cols < WT, other=0.0).to(tl.float32)
        mc, sc = _lse_step(mc, sc, tl.where(cols < V_CE, x, float("-inf")))
        ms, ss = _lse_step(ms, ss, tl.where(cols < V_KD, x * inv_t, float("-inf")))
        mt, st = _lse_step(mt, st, tl.where(cols < V_KD, y * inv_t, float("-inf")))
    mc, lc = _lse_row(mc, sc)
    ms, ls = _lse_row(ms, ss)
    mt, lt = _lse_row(mt, st)
    target = tl.load(Tgt + rows, mask=row_ok, other=ignore_index)
    counted = target != ignore_index
    known = (target >= 0) & (target < V_CE)  # as the CE kernel: an unchecked bad id gives nan, not a wild read
    x_t = tl.load(X + rows.to(tl.int64) * stride_x + target, mask=row_ok & counted & known, other=0.0)
    ce = tl.where(known, (mc - x_t.to(tl.float32)) + lc, float("nan"))
    share = 1.0  # the student's weight in D (beta = 1: reverse KL, all of it)
    if MODE == 2:
        share = one_mb  # 1 - beta from the host's float64: beta's fp32 scalar has lost its digits near 1
    d = tl.zeros([BLOCK_R, BLOCK_V], tl.float32)
    r = tl.zeros([BLOCK_R, BLOCK_V], tl.float32)  # R = KL(p_s || M) (beta = 1: D itself)
    zero = tl.zeros([BLOCK_R], tl.float32)
    end = V_KD
    if HAS_GRAD and MODE == 0:
        end = W  # forward KL's gradient is written in this pass, over every column
    for start in range(0, end, BLOCK_V):  # pass 2: the loss (and forward KL's gradient)
        cols = start + cols0
        x = tl.load(x_rows + cols, mask=cols < W, other=0.0).to(tl.float32)
        y = tl.load(y_rows + cols, mask=cols < WT, other=0.0).to(tl.float32)
        lps, lpt, lref = _log_probs(x, y, inv_t, ms, ls, mt, lt, log_1mb, log_b, MODE)
        kd_col = cols < V_KD
        if MODE == 0:
            pt = tl.exp2(lpt * LOG2E)
            d += tl.where(kd_col & (pt != 0), pt * (lpt - lps), 0.0)  # (!= 0: a NaN p_t is kept, as torch)
            if HAS_GRAD:
                dx = _grad_tile(x, lps, lpt, lref, cols, target, mc, lc, zero, V_CE, V_KD, ce_weight, kd_weight,
                                share, MODE)
                # cast, not .to: the interpreter's .to truncates into bf16 where the GPU rounds to nearest even
                tl.store(x_rows + cols, cast(tl.where(counted[:, None], dx, 0.0), X.dtype.element_ty),
                         mask=row_ok[:, None] & (cols < W))
        else:
            ps = tl.exp2(lps * LOG2E)
            rs = tl.where(kd_col & (ps != 0), ps * (lps - lref), 0.0)
            r += rs
            if MODE == 2:
                pt = tl.exp2(lpt * LOG2E)
                d += beta * tl.where(kd_col & (pt != 0), pt * (lpt - lref), 0.0) + share * rs
    r_row = tl.sum(r, 1)
    kd = r_row
    if MODE != 1:
        kd = tl.sum(d, 1)
    tl.store(CE + rows, tl.where(counted, ce, 0.0), mask=row_ok)
    tl.store(KD + rows, tl.where(counted, kd, 0.0), mask=row_ok)
    if HAS_GRAD and MODE != 0:
        for start in range(0, W, BLOCK_V):  # pass 3: the gradient, which needs the row's R
            cols = start + cols0
            x = tl.load(x_rows + cols, mask=cols < W, other=0.0).to(tl.float32)
            y = tl.load(y_rows + cols, mask=cols < WT, other=0.0).to(tl.float32)
            lps, lpt, lref = _log_probs(x, y, inv_t, ms, ls, mt, lt, log_1mb, log_b, MODE)
            dx = _grad_tile(x, lps, lpt, lref, cols, target, mc, lc, r_row, V_CE, V_KD, ce_weight, kd_weight,
                            share, MODE)
            tl.store(x_rows + cols, cast(tl.where(counted[:, None], dx, 0.0), X.dtype.element_ty),
                     mask=row_ok[:, None] & (cols < W))


def _launch_shape(W):
    """(BLOCK_R rows per program, BLOCK_V columns per tile, num_warps)."""
    if INTERPRET:
        # as the CE kernel's: many rows per program, about four tiles per row (tests cross tiles)
        return 32, max(16, next_pow2(cdiv(W, 4))), 1
    # one row per program; six fp32 running vectors per lane (three logsumexps), so half the CE's tile
    return 1, min(2048, next_pow2(W)), 8


def _mode(beta: float) -> int:
    return FORWARD_KL if beta == 0 else REVERSE_KL if beta == 1 else MIXTURE


@on_tensor_device
def _fwd_launch(logits, teacher_logits, targets, ignore_index, n_ce, n_kd, temperature, beta, ce_weight, kd_weight,
                write_grad):
    N, W = logits.shape
    ce, kd = (torch.empty(N, device=logits.device, dtype=torch.float32) for _ in range(2))
    if N == 0:
        return ce, kd
    rows, block, warps = _launch_shape(W)
    log_1mb = math.log1p(-beta) if beta < 1 else 0.0
    log_b = math.log(beta) if beta > 0 else 0.0
    _distill_kernel[(cdiv(N, rows),)](
        logits, teacher_logits, targets, ce, kd, logits.stride(0), teacher_logits.stride(0), N, W,
        teacher_logits.shape[1], n_ce, n_kd,
        ignore_index, 1.0 / temperature, beta, 1.0 - beta, log_1mb, log_b, ce_weight, kd_weight, MODE=_mode(beta),
        HAS_GRAD=write_grad, BLOCK_R=rows, BLOCK_V=block, num_warps=warps)
    return ce, kd


def _check_op_layout(logits, teacher_logits, targets, n_ce, n_kd):
    """What the kernel assumes: row-major rows, targets [N], n_kd <= n_ce <= the student's width, n_kd <= the
    teacher's."""
    check_tensor(logits, "logits", ndim=2)
    check_tensor(teacher_logits, "teacher_logits", ndim=2)
    N, W = logits.shape
    check_tensor(targets, "targets", dtypes=(torch.int64, torch.int32), shape=(N,))
    if teacher_logits.shape[0] != N:
        raise ValueError(f"teacher_logits has {teacher_logits.shape[0]} rows, logits {N}")
    check_same_device(logits=logits, teacher_logits=teacher_logits, targets=targets)
    for name, t in (("logits", logits), ("teacher_logits", teacher_logits), ("targets", targets)):
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"tritongpt::distill_fwd reads {name} with unit stride on its last dim, got strides "
                             f"{t.stride()} (pass .contiguous())")
    if not 1 <= n_ce <= W:
        raise ValueError(f"the CE's classes must be in [1, {W}] (logits have {W} columns), got {n_ce}")
    if not 1 <= n_kd <= min(n_ce, teacher_logits.shape[1]):
        raise ValueError(f"the divergence's classes must be in [1, {min(n_ce, teacher_logits.shape[1])}] (the CE's "
                         f"{n_ce}, teacher_logits' {teacher_logits.shape[1]} columns), got {n_kd}")


# As the CE ops: a registered op stays one opaque node under torch.compile. It writes the gradient over the
# student's logits (mutates them) when write_grad, so that a chunk needs no second logits-sized buffer.
@custom_op("tritongpt::distill_fwd", mutates_args=("logits",))
def _distill_fwd(logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                 n_ce: int, n_kd: int, temperature: float, beta: float, ce_weight: float, kd_weight: float,
                 write_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (per-row CE, per-row D), fp32 [N] each; with write_grad, logits become
    ce_weight dCE/dlogits + kd_weight dD/d(logits / T) (kernel docstring)."""
    check_runnable(logits, "logits")
    _check_op_layout(logits, teacher_logits, targets, n_ce, n_kd)
    return _fwd_launch(logits, teacher_logits, targets, ignore_index, n_ce, n_kd, temperature, beta, ce_weight,
                       kd_weight, write_grad)


@_distill_fwd.register_fake
def _(logits, teacher_logits, targets, ignore_index, n_ce, n_kd, temperature, beta, ce_weight, kd_weight,
      write_grad):
    _check_op_layout(logits, teacher_logits, targets, n_ce, n_kd)
    return tuple(logits.new_empty(logits.shape[0], dtype=torch.float32) for _ in range(2))


# ----------------------------------------------------------------------------- both LM heads + the loss
class LinearDistillFunction(torch.autograd.Function):
    """(loss, ce, kd) of the student's head on hidden [N, Cs] (weight [Ws, Cs], bias) against the teacher's
    (teacher_hidden [N, Ct], teacher_weight [Wt, Ct]), chunk_rows rows of both logits at a time.

    The gradient is made in forward and kept unscaled by the reduction's 1/n: the kernel's dlogits are of
    order 1 whatever the row count, so an fp16 gradient does not flush to zero (the reason
    LinearCrossEntropyFunction defers fp16's), and backward multiplies dh, dW, db by grad_loss / n in fp32.
    ce and kd are for the metrics: not differentiable (a gradient sent into them is refused)."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, targets, bias, teacher_bias, n_ce, n_kd,
                alpha, temperature, beta, ignore_index, reduction, chunk_rows, grad_enabled):
        N = hidden.shape[0]
        device = hidden.device.type
        dt = autocast_dtype(hidden.device) or hidden.dtype  # the matmul dtype nn.Linear would use
        tdt = autocast_dtype(hidden.device) or teacher_hidden.dtype
        # both heads' rows padded for aligned matmuls (cross_entropy.HEAD_ROW_MULTIPLE); columns past n_ce / n_kd
        # are absent to the kernel, and dw, db keep weight's rows
        h, w, b = hidden.to(dt), _pad_rows(weight, dt), _pad_rows(bias, dt)
        th, tw, tb = teacher_hidden.to(tdt), _pad_rows(teacher_weight, tdt), _pad_rows(teacher_bias, tdt)
        want_dh, want_dw = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        want_db = grad_enabled and b is not None and ctx.needs_input_grad[5]
        dh, dw = _head_grad_buffers(h, weight, want_dh, want_dw)
        db = _bias_grad_buffer(bias, want_db)
        write = dh is not None or dw is not None or db is not None
        ce_rows, kd_rows = (torch.empty(N, device=hidden.device, dtype=torch.float32) for _ in range(2))
        # d(loss)/d(row's logits) before the reduction: (1 - alpha) dCE + alpha T^2 dD/dx, and dD/dx = dD/ds / T
        weights = 1.0 - alpha, alpha * temperature
        with torch.autocast(device, enabled=False):
            for s in range(0, N, chunk_rows):
                e = min(N, s + chunk_rows)
                logits = _chunk_logits(h[s:e], w, b)
                t_logits = _chunk_logits(th[s:e], tw, tb)
                ce_rows[s:e], kd_rows[s:e] = _distill_fwd.call(
                    logits, t_logits, targets[s:e], ignore_index, n_ce, n_kd, temperature, beta, *weights, write)
                del t_logits
                _head_grads(logits, h, w, s, e, dh, dw, db)  # the kernel wrote the gradient over the logits
                del logits  # one chunk alive at a time
        n = (targets != ignore_index).sum()
        g = (1.0 / n).float() if reduction == "mean" else torch.ones((), device=hidden.device)
        ce, kd = ce_rows.sum() * g, kd_rows.sum() * g
        ctx.dtypes = hidden.dtype, weight.dtype, None if bias is None else bias.dtype
        # every target ignored: the mean is nan (0 / 0) as the reference's, its gradient zero as the reference's
        # (dh, dw, db are zeros there; times 1/0 they would be nan)
        ctx.save_for_backward(dh, dw, db, g if reduction == "sum" else (1.0 / n.clamp_min(1)).float())
        ctx.mark_non_differentiable(ce, kd)
        return (1 - alpha) * ce + alpha * temperature ** 2 * kd, ce, kd

    @staticmethod
    def backward(ctx, grad_loss, grad_ce, grad_kd):
        first_order_only("linear_distill_loss")  # made from saved numbers: no graph to differentiate again
        dh, dw, db, g = ctx.saved_tensors
        scale = grad_loss.float() * g
        out = [None if t is None else (t.float() * scale).to(d) for t, d in zip((dh, dw, db), ctx.dtypes)]
        return out[0], out[1], None, None, None, out[2], *[None] * 10


def _check_bias(bias, weight, name: str, weight_name: str):
    """A head's bias: None, or [W] beside weight [W, C], in its dtype, on its device."""
    if bias is None:
        return
    check_tensor(bias, name)
    if tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{name} has shape {tuple(bias.shape)}; expected ({weight.shape[0]},), one per row of "
                         f"{weight_name} {tuple(weight.shape)}")
    check_same_dtype(**{weight_name: weight, name: bias})
    check_same_device(**{weight_name: weight, name: bias})


def linear_distill_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                        teacher_weight: torch.Tensor, targets: torch.Tensor, vocab_size: int, alpha: float,
                        temperature: float = 1.0, beta: float = 0.0, ignore_index: int = -100,
                        reduction: str = "mean", student_bias: torch.Tensor | None = None,
                        teacher_bias: torch.Tensor | None = None, ce_vocab_size: int | None = None,
                        chunk_rows: int | None = None):
    """distill_loss(student_hidden @ student_weight.T (+ bias), teacher_hidden @ teacher_weight.T (+ bias),
    targets, vocab_size, alpha, temperature, beta, ignore_index, reduction) -> (loss, ce, kd), never holding
    either model's whole logits: at most chunk_rows rows of each (default: 2^27 logits of the two together).
    Differentiable in the student's hidden, weight and bias (loss only; ce and kd are the metrics' numbers);
    the teacher gets no gradient. Reference: train.distill.distill_loss on both heads' outputs.

    student_hidden [..., Cs], student_weight [Ws, Cs]; teacher_hidden [..., Ct] (the same leading shape; its
    width may differ), teacher_weight [Wt, Ct]; targets: the hidden states' leading shape. vocab_size: the
    ids compared by the divergence (the tokenizer's), <= both heads' rows. ce_vocab_size: the CE's classes, the
    student head's first rows (default all Ws; GPTConfig.vocab_size when the head is padded). Under autocast
    the matmuls run in its dtype, as nn.Linear's would. reduction: "mean" (over counted targets) or "sum"."""
    no_func_transform("linear_distill_loss")
    named = dict(student_hidden=student_hidden, student_weight=student_weight, teacher_hidden=teacher_hidden,
                 teacher_weight=teacher_weight)
    for name, t in named.items():
        check_tensor(t, name, ndim=2 if name.endswith("weight") else None)
    check_tensor(targets, "targets", dtypes=(torch.int64, torch.int32))
    check_same_device(**named, targets=targets)
    check_runnable(student_hidden, "student_hidden")
    for who, h, w in (("student", student_hidden, student_weight), ("teacher", teacher_hidden, teacher_weight)):
        if h.dim() < 1 or h.shape[-1] != w.shape[1] or w.shape[0] == 0:
            raise ValueError(f"{who}_hidden {tuple(h.shape)} and {who}_weight {tuple(w.shape)} do not make logits: "
                             f"need {who}_hidden [..., C] and {who}_weight [V, C] with V >= 1")
        if autocast_dtype(h.device) is None:
            check_same_dtype(**{f"{who}_hidden": h, f"{who}_weight": w})
    if tuple(teacher_hidden.shape[:-1]) != tuple(student_hidden.shape[:-1]):
        raise ValueError(f"teacher_hidden has shape {tuple(teacher_hidden.shape)}; expected student_hidden's "
                         f"leading shape {tuple(student_hidden.shape[:-1])}")
    if tuple(targets.shape) != tuple(student_hidden.shape[:-1]):
        raise ValueError(f"targets has shape {tuple(targets.shape)}; expected the hidden states' leading shape "
                         f"{tuple(student_hidden.shape[:-1])}")
    _check_bias(student_bias, student_weight, "student_bias", "student_weight")
    _check_bias(teacher_bias, teacher_weight, "teacher_bias", "teacher_weight")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear_distill_loss supports reduction 'mean' or 'sum' (the gradient is made in "
                         f"forward), got {reduction!r}")
    Ws, Wt = student_weight.shape[0], teacher_weight.shape[0]
    n_ce = Ws if ce_vocab_size is None else ce_vocab_size
    if not is_int(n_ce) or not 1 <= n_ce <= Ws:
        raise ValueError(f"ce_vocab_size must be an int in [1, {Ws}] (student_weight has {Ws} rows), "
                         f"got {ce_vocab_size!r}")
    if not is_int(vocab_size) or not 1 <= vocab_size <= min(n_ce, Wt):
        raise ValueError(f"vocab_size must be an int in [1, {min(n_ce, Wt)}] (the CE's {n_ce} classes, "
                         f"teacher_weight's {Wt} rows), got {vocab_size!r}")
    for name, v, ok in (("alpha", alpha, lambda v: 0 <= v <= 1), ("beta", beta, lambda v: 0 <= v <= 1),
                        ("temperature", temperature, lambda v: 0 < v < math.inf)):
        if not is_real(v) or not ok(v):  # nan fails too
            raise ValueError(f"{name} must be {'a finite number > 0' if name == 'temperature' else 'in [0, 1]'}, "
                             f"got {v!r}")
    ignore_index = _as_int(ignore_index, "ignore_index")
    chunk = chunk_rows if chunk_rows is not None else max(1, CHUNK_ELEMENTS // (_padded_count(Ws) + _padded_count(Wt)))
    if not is_int(chunk) or chunk < 1:
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
    N = math.prod(student_hidden.shape[:-1])
    h2 = student_hidden.reshape(N, student_hidden.shape[-1])  # not -1: C may be 0
    th2 = teacher_hidden.detach().reshape(N, teacher_hidden.shape[-1])
    t1 = _checked_targets.call(targets, int(n_ce), ignore_index)
    return LinearDistillFunction.apply(h2, student_weight, th2, teacher_weight.detach(), t1, student_bias,
                                       None if teacher_bias is None else teacher_bias.detach(), int(n_ce),
                                       int(vocab_size), float(alpha), float(temperature), float(beta), ignore_index,
                                       reduction, int(chunk), torch.is_grad_enabled())


__all__ = ["linear_distill_loss", "LinearDistillFunction"]
