"""Cross-entropy over the vocabulary in Triton: the loss without an fp32 copy of the logits,
and (linear_cross_entropy, at the end of this file) the LM head fused with it, so that the
logits never exist whole.

Reference: `tritongpt.model.gpt.lm_loss` (F.cross_entropy on the logits upcast to fp32), after
`GPTModel.out_head` for the fused version (its bias too, when the head has one: GPTConfig.head_bias, Phi-1/1.5/2
and GPT-J's; the fused version adds it to each chunk's logits and sums each chunk's dlogits into its gradient).

Why: the language-model loss reads a [tokens, vocab] matrix (16k x 50257 for a GPT-2 step:
1.6 GB in bf16). The reference upcasts it to fp32, keeps the fp32 log-softmax for backward and
builds an fp32 gradient before casting it back: about a dozen passes over 1.6-3.3 GB buffers
and several GB of extra memory. Here the logits are read twice and the gradient written once,
in the logits' own dtype, and backward keeps two fp32 numbers per row.

Algorithm (one program per row on a GPU, BLOCK_R rows per program under the interpreter; a
row is too wide for one tile, so it is streamed in BLOCK_V column tiles, and nothing but two
BLOCK_V vectors per row lives in registers; on a GPU the tile width, warps, a software-pipelined
tile loop and LANE_MAX are autotuned):
  forward   online logsumexp: a running max m and a running sum s = sum exp(x - m), rescaled by
            exp(m_old - m_new) when m grows (flash attention's softmax). LANE_MAX: each lane keeps
            its own (no reduction in the loop, two exp2 an element), merged into the row's max m and
            S = sum_j exp(x_j - m) after the last tile; else one pair per row (a max and a sum over
            each tile, one exp2 an element). loss_i = (m - x[i, target_i]) + log S; m and log S
            are saved (two fp32 numbers per row).
  backward  recompute the softmax from the saved logits, m and log S:
            dx_ij = g_i * (exp((x_ij - m_i) - log S_i) - [j == target_i]), written in the
            logits' dtype, where g_i is the upstream gradient of row i's loss (1/n for the
            mean). Not exp(x - lse) with lse = m + log S saved as one float: lse is rounded to
            the size of m (2.4e-4 at logits near 5000), and that error would land in every p.
  ignore    rows whose target is ignore_index get loss 0, gradient 0 (even where their logits
            are all -inf, e.g. masked padding), and do not count in n.
  padding   a row may hold W >= V values (GPTConfig.vocab_multiple pads GPT-2's 50257 to 50304):
            all W are read, so a 16-byte aligned row is loaded in 16-byte vectors, but columns
            past V count as -inf, and their gradient is written as 0.
  options   label smoothing (eps) mixes in the loss against the uniform distribution over the V
            classes, mean_j (lse - x_j) = lse - sum_j x_j / V: forward also sums each row's
            logits, backward takes eps / V from every class's p and (1 - eps) from the target's.
            The z-loss z * lse^2 (PaLM) multiplies p by 1 + 2 z lse, lse = m + log S from the
            saved pair. A soft cap c reads every logit as c tanh(x / c) (forward and backward
            alike) and multiplies its gradient by 1 - tanh^2. Each is a constexpr flag: at 0 the
            kernels compile as without it.
  RL        (GPTModel.token_logprobs) a temperature T reads every (capped) logit as z = x / T, and the
            loss is then -log p_T(target); the entropy H = lse - sum_j p_j z_j of every row (an ignored
            target's too: RL masks afterwards) is a third running sum beside m and s, t = sum exp(z - m)
            (z - m), moved to a new max as s is (t' = e^(m - m') (t + (m - m') s)), H = log S - t / S: two
            terms >= 0, no cancellation at large logits. Backward adds g_H dH/dz_j = -g_H p_j (log p_j + H)
            (times 1/T, and the cap's derivative) to the loss's gradient in the same pass, only when the
            entropy has a gradient (HAS_ENT; an unused entropy compiles out). Both refuse label smoothing
            and the z-loss (written for the untempered loss); the soft cap composes.
"""
import math

import torch
import triton
import triton.language as tl

from tritongpt._env import triton_interpreting
from tritongpt._types import is_int, loss_options, softcap_value, temperature_value
from tritongpt.errors import UserError
from tritongpt.kernels._common import (autocast_dtype, autotuned, cast, cdiv, check_runnable, check_same_device,
                                       check_same_dtype, check_tensor, custom_op, first_order_only, launch_tuned,
                                       next_pow2, no_func_transform, on_tensor_device, plain_eager, tanh)

INTERPRET = triton_interpreting()
# exp(x) = exp2(x * log2(e)): exp2 is one MUFU instruction
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit(do_not_specialize=["N_BUCKET"])
def _ce_fwd_kernel(X, T, Loss, RowMax, LogSum, Ent, stride_x, N, V, W, ignore_index, smoothing, z_coef, softcap,
                   inv_temp, N_BUCKET, HAS_SMOOTH: tl.constexpr, HAS_Z: tl.constexpr, HAS_CAP: tl.constexpr,
                   HAS_TEMP: tl.constexpr, HAS_ENT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
                   LANE_MAX: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Grid (cdiv(N, BLOCK_R),). Loss[i] = logsumexp(X[i]) - X[i, T[i]] (0 where T[i] == ignore_index),
    with HAS_SMOOTH mixed with the smoothed term, with HAS_Z plus z_coef * logsumexp(X[i])^2; with
    HAS_CAP every logit x read as softcap * tanh(x / softcap) first, then with HAS_TEMP times inv_temp.
    HAS_ENT: Ent[i] = the entropy of softmax(X[i]) (of every row, ignored targets' too).

    Rows hold W >= V values; only the first V are classes (the rest: a padded vocabulary).
    LANE_MAX: the running max and sum are kept per lane (no reduction in the loop, two exp2 an element);
    else per row (two reductions a tile, one exp2 an element: half the MUFU work, which at one exp2 a
    bf16 element costs an H100/H200 about what reading the element does). Autotune picks on a GPU.
    N_BUCKET is autotune's key only. NUM_STAGES pipelines the tile loop's loads (layernorm.py's)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    # rows past N re-read row N-1 (their results are never stored): no all--inf rows, no nan
    x_rows = X + tl.minimum(rows, N - 1).to(tl.int64)[:, None] * stride_x
    cols = tl.arange(0, BLOCK_V)[None, :]
    if LANE_MAX:
        m = tl.full([BLOCK_R, BLOCK_V], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_R, BLOCK_V], tl.float32)
    else:
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_R], tl.float32)
    x_sum = tl.zeros([BLOCK_R, BLOCK_V], tl.float32)  # label smoothing's sum of the classes' logits
    # the entropy's running sum of exp(x - m) (x - m), beside s's exp(x - m): relative to the running max, so
    # H = log S - t / S adds two terms >= 0 (the raw sum of exp(x - m) x would cancel against lse at large m)
    t = tl.zeros(m.shape, tl.float32)
    for start in tl.range(0, W, BLOCK_V, num_stages=NUM_STAGES):
        # masked at the row's width W, not at V: with a vocabulary padded to a multiple of 16
        # (vocab_multiple 64: 50304) the rows stay 16-byte aligned and the loads are 16-byte
        # vectors; the padding columns are then set to -inf
        x = tl.load(x_rows + start + cols, mask=start + cols < W, other=float("-inf")).to(tl.float32)
        if HAS_CAP:
            x = softcap * tanh(x / softcap)
        if HAS_TEMP:
            x = x * inv_temp
        x = tl.where(start + cols < V, x, float("-inf"))
        if LANE_MAX:
            m_new = tl.maximum(m, x)
        else:
            m_new = tl.maximum(m, tl.max(x, 1))
        # A lane (row) that has seen only -inf (past V, or -inf logits) rescales by a finite
        # stand-in, not -inf - -inf = nan.
        m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)
        alpha = tl.exp2((m - m_ref) * LOG2E)
        if LANE_MAX:
            e = tl.exp2((x - m_ref) * LOG2E)
        else:
            e = tl.exp2((x - m_ref[:, None]) * LOG2E)
        if HAS_ENT:
            # t moves to the new max: sum e (x - m_new) = alpha (t + (m_old - m_new) s); -inf entries add 0, not nan
            shift = tl.where(m > float("-inf"), m - m_ref, 0.0)
            if LANE_MAX:
                te = e * tl.where(x > float("-inf"), x - m_ref, 0.0)
            else:
                te = tl.sum(e * tl.where(x > float("-inf"), x - m_ref[:, None], 0.0), 1)
            t = alpha * (t + shift * s) + te
        if LANE_MAX:
            s = s * alpha + e
        else:
            s = s * alpha + tl.sum(e, 1)
        m = m_new
        if HAS_SMOOTH:
            x_sum += tl.where(start + cols < V, x, 0.0)
    if LANE_MAX:
        m_row = tl.max(m, 1)
        # (a row of only -inf: its lanes scaled by 0, S = 0, not -inf - -inf = nan)
        lane_scale = tl.exp2((m - tl.where(m_row > float("-inf"), m_row, 0.0)[:, None]) * LOG2E)
        s_row = tl.sum(s * lane_scale, 1)
        if HAS_ENT:
            t_row = tl.sum(lane_scale * (t + tl.where(m > float("-inf"), m - m_row[:, None], 0.0) * s), 1)
    else:
        m_row = m
        s_row = s
        t_row = t
    log_s = tl.log(s_row)
    if HAS_ENT:
        # a row with no finite logit (every token masked, S = 0) has entropy 0, as a row with one: not 0 / 0 = nan
        # (a nan logit's row keeps its nan: S is nan, not 0)
        tl.store(Ent + rows, tl.where(s_row == 0.0, 0.0, log_s - t_row / s_row), mask=row_ok)
    target = tl.load(T + rows, mask=row_ok, other=ignore_index)
    counted = target != ignore_index
    # A counted target outside [0, V) gets loss nan instead of a read past the row: the
    # checked_targets op refuses such ids before launch, but a CUDA-graph capture skips that
    # check (it cannot sync) and a direct call of this op never ran it.
    known = (target >= 0) & (target < V)
    x_t = tl.load(X + rows.to(tl.int64) * stride_x + target, mask=counted & known, other=0.0).to(tl.float32)
    if HAS_CAP:
        x_t = softcap * tanh(x_t / softcap)
    if HAS_TEMP:
        x_t = x_t * inv_temp
    # (m - x_t) + log S, not (m + log S) - x_t: a confident right answer (x_t = m, S just above
    # 1) then keeps its small loss to fp32 precision instead of losing it to the size of m.
    loss = (m_row - x_t) + log_s
    if HAS_SMOOTH:
        # the loss against the uniform distribution over the V classes: mean_j (lse - x_j)
        uniform = (m_row - tl.sum(x_sum, 1) / V) + log_s
        loss = (1.0 - smoothing) * loss + smoothing * uniform
    if HAS_Z:
        lse = m_row + log_s
        loss += z_coef * lse * lse
    loss = tl.where(known, loss, float("nan"))
    tl.store(Loss + rows, tl.where(counted, loss, 0.0), mask=row_ok)
    tl.store(RowMax + rows, m_row, mask=row_ok)
    tl.store(LogSum + rows, log_s, mask=row_ok)


@triton.jit(do_not_specialize=["N_BUCKET"])
def _ce_bwd_kernel(X, T, RowMax, LogSum, G, Ent, GEnt, DX, stride_x, stride_dx, N, V, W, ignore_index, smoothing,
                   z_coef, softcap, inv_temp, N_BUCKET, HAS_SMOOTH: tl.constexpr, HAS_Z: tl.constexpr,
                   HAS_CAP: tl.constexpr, HAS_TEMP: tl.constexpr, HAS_ENT: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_V: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Grid (cdiv(N, BLOCK_R),). DX[i, j] = G[i] * (softmax(X[i])_j - [j == T[i]]), 0 for ignored
    rows; all W columns are written, the padding ones (j >= V) with 0. With label smoothing the
    target is (1 - smoothing) [j == T[i]] + smoothing / V; the z-loss adds 2 z_coef lse p_j; the
    soft cap multiplies by its derivative, 1 - tanh(x / softcap)^2; HAS_TEMP by inv_temp (z = x inv_temp).
    HAS_ENT (the entropy has a gradient) adds GEnt[i] dH/dz_j = -GEnt[i] p_j (log p_j + Ent[i]), to every row:
    ignored targets' too (where GEnt[i] is 0 it adds 0; a -inf logit gets none, even in a row of only -inf)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK_V)[None, :]
    target = tl.load(T + rows, mask=row_ok, other=ignore_index)
    m = tl.load(RowMax + rows, mask=row_ok, other=0.0)
    log_s = tl.load(LogSum + rows, mask=row_ok, other=0.0)
    counted = (target != ignore_index)[:, None]
    unknown = counted & ((target < 0) | (target >= V))[:, None]  # nan gradient, as forward's loss
    g = tl.load(G + rows, mask=row_ok, other=0.0).to(tl.float32)
    if HAS_ENT:
        g_ent = tl.load(GEnt + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        ent = tl.load(Ent + rows, mask=row_ok, other=0.0)[:, None]
    hit = 1.0 - smoothing if HAS_SMOOTH else 1.0  # the target's share of the label
    if HAS_Z:
        p_scale = 1.0 + 2.0 * z_coef * (m + log_s)  # d(z lse^2)/dx_j = 2 z lse p_j
    for start in tl.range(0, W, BLOCK_V, num_stages=NUM_STAGES):
        mask = row_ok[:, None] & (start + cols < W)
        x = tl.load(X + rows64 * stride_x + start + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_CAP:
            u = tanh(x / softcap)
            x = softcap * u
        if HAS_TEMP:
            x = x * inv_temp
        log_p = (x - m[:, None]) - log_s[:, None]
        p = tl.exp2(log_p * LOG2E)
        if HAS_ENT:
            # -dH/dz; a -inf logit's p log p is 0 (outside the product: a row of only -inf logits has p = nan)
            d_ent = tl.where(x > float("-inf"), p * (log_p + ent), 0.0)
        if HAS_Z:
            p = p * p_scale[:, None]
        if HAS_SMOOTH:
            p = p - smoothing / V
        p = tl.where(start + cols == target[:, None], p - hit, p)
        if HAS_TEMP:
            p = p * inv_temp
        if HAS_CAP:
            p = p * (1.0 - u * u)
        # padding columns last: they may hold anything (nan too), and the cap's derivative reads them
        p = tl.where(start + cols < V, p, 0.0)
        # where, not a zero g: an ignored row of -inf logits has p = nan, and nan * 0 is nan
        dx = tl.where(counted, p * g[:, None], 0.0)
        if HAS_ENT:
            if HAS_TEMP:
                d_ent = d_ent * inv_temp
            if HAS_CAP:
                d_ent = d_ent * (1.0 - u * u)
            dx -= tl.where((g_ent != 0.0) & (start + cols < V), g_ent * d_ent, 0.0)
        dx = tl.where(unknown, float("nan"), dx)
        tl.store(DX + rows64 * stride_dx + start + cols, cast(dx, DX.dtype.element_ty), mask=mask)


def _launch_shape(N, V):
    """Under the interpreter: (BLOCK_R rows per program, BLOCK_V columns per tile, num_warps)."""
    # ~5 ms per program: many rows per program, and about four tiles per row, so tests at V of a few
    # hundred still cross tiles and a ragged last one.
    return 32, max(64, next_pow2(cdiv(V, 4))), 1


# On a GPU one row a program (16k programs for a GPT-2 step), the tile width, warps, the tile loop's pipelining
# and (forward) LANE_MAX autotuned per (row width, rows bucket, flags, dtypes): (BLOCK_V, num_warps, stages[,
# LANE_MAX]). The first entries are the fixed shape the H200 ran (4096 wide, 8 warps, no pipelining, per-lane max:
# forward 1.08 ms, 36 % of the copy bandwidth, backward 1.27 ms at 16384 x 50257), the rest pipeline the loads and
# (forward) halve the exp2s; 16 values a thread per tile at most but for forward's 8-warp 8192-wide one (32).
FWD_SHAPES = ((4096, 8, 1, True), (4096, 8, 2, True), (4096, 8, 2, False), (4096, 8, 3, False),
              (2048, 4, 3, False), (8192, 16, 2, False), (8192, 8, 2, False))
BWD_SHAPES = ((4096, 8, 1), (4096, 8, 2), (4096, 8, 3), (2048, 4, 3), (8192, 16, 2), (2048, 8, 2))


# At most this many rows (a chunk's ragged end, a small evaluation batch): the first shape, untimed, as LayerNorm's
# SMALL_M; each new rows bucket would otherwise cost a search of every shape.
SMALL_N = 1024


def _prune_tiles(configs, named_args, **kwargs):
    """Tiles no wider than the row (next power of two), repeats dropped; few rows: the first alone."""
    widest = next_pow2(named_args["W"])
    if named_args["N_BUCKET"] <= SMALL_N:
        configs = configs[:1]
    kept, seen = [], set()
    for c in configs:
        block = min(c.kwargs["BLOCK_V"], widest)
        shape = (block, c.num_warps, c.num_stages, c.kwargs.get("LANE_MAX"))
        if shape not in seen:
            seen.add(shape)
            kept.append(triton.Config({**c.kwargs, "BLOCK_V": block}, num_warps=c.num_warps,
                                      num_stages=c.num_stages))
    return kept


def _tuner(configs):
    return triton.autotune(configs, key=["W", "N_BUCKET", "HAS_SMOOTH", "HAS_Z", "HAS_CAP", "HAS_TEMP", "HAS_ENT",
                                         "BLOCK_R"],
                           prune_configs_by={"early_config_prune": _prune_tiles})


# (the stages double as the kernel's num_stages; built under the interpreter too, where the launchers do not use them)
_ce_fwd_tuned = autotuned("cross_entropy.forward", _tuner(
    [triton.Config({"BLOCK_V": b, "NUM_STAGES": st, "LANE_MAX": lane}, num_warps=w, num_stages=st)
     for b, w, st, lane in FWD_SHAPES])(_ce_fwd_kernel))
_ce_bwd_tuned = autotuned("cross_entropy.backward", _tuner(
    [triton.Config({"BLOCK_V": b, "NUM_STAGES": st}, num_warps=w, num_stages=st) for b, w, st in BWD_SHAPES])(
    _ce_bwd_kernel))


def _n_bucket(N):
    """Autotune's rows key: the grid's size matters to a search only until it fills the GPU several times."""
    return min(next_pow2(N), 4096)


@on_tensor_device
def _fwd_launch(logits, targets, ignore_index, n_classes, label_smoothing=0.0, z_loss=0.0, softcap=0.0,
                temperature=1.0, entropy=False):
    N, W = logits.shape
    loss, row_max, log_sum = (torch.empty(N, device=logits.device, dtype=torch.float32) for _ in range(3))
    ent = torch.empty(N if entropy else 0, device=logits.device, dtype=torch.float32)
    if N == 0:
        return loss, row_max, log_sum, ent
    args = (logits, targets, loss, row_max, log_sum, ent if entropy else loss, logits.stride(0), N, n_classes, W,
            ignore_index, label_smoothing, z_loss, softcap, 1.0 / temperature, _n_bucket(N))
    flags = dict(HAS_SMOOTH=label_smoothing != 0, HAS_Z=z_loss != 0, HAS_CAP=softcap != 0, HAS_TEMP=temperature != 1,
                 HAS_ENT=bool(entropy))
    if INTERPRET:
        rows, block, warps = _launch_shape(N, W)
        _ce_fwd_kernel[(cdiv(N, rows),)](*args, **flags, BLOCK_R=rows, BLOCK_V=block, LANE_MAX=True, NUM_STAGES=1,
                                         num_warps=warps)
    else:
        launch_tuned(_ce_fwd_tuned, (N,), *args, **flags, BLOCK_R=1)
    return loss, row_max, log_sum, ent


@on_tensor_device
def _bwd_launch(grad_loss, logits, targets, row_max, log_sum, ignore_index, n_classes, label_smoothing=0.0,
                z_loss=0.0, softcap=0.0, temperature=1.0, grad_entropy=None, entropy=None):
    N, W = logits.shape
    dx = torch.empty((N, W), device=logits.device, dtype=logits.dtype)
    if N == 0:
        return dx
    grad_loss = grad_loss.contiguous()
    has_ent = grad_entropy is not None
    grad_entropy = grad_entropy.contiguous() if has_ent else grad_loss
    args = (logits, targets, row_max, log_sum, grad_loss, entropy if has_ent else row_max, grad_entropy, dx,
            logits.stride(0), dx.stride(0), N, n_classes, W, ignore_index, label_smoothing, z_loss, softcap,
            1.0 / temperature, _n_bucket(N))
    flags = dict(HAS_SMOOTH=label_smoothing != 0, HAS_Z=z_loss != 0, HAS_CAP=softcap != 0, HAS_TEMP=temperature != 1,
                 HAS_ENT=has_ent)
    if INTERPRET:
        rows, block, warps = _launch_shape(N, W)
        _ce_bwd_kernel[(cdiv(N, rows),)](*args, **flags, BLOCK_R=rows, BLOCK_V=block, NUM_STAGES=1, num_warps=warps)
    else:  # autotune may time a launch several times: it only reads the logits and writes dx
        launch_tuned(_ce_bwd_tuned, (N,), *args, **flags, BLOCK_R=1)
    return dx


# ----------------------------------------------------------------------------- custom ops
# As for the other kernels: registered ops stay opaque nodes under torch.compile.
@custom_op("tritongpt::checked_targets", mutates_args=())
def _checked_targets(targets: torch.Tensor, vocab: int, ignore_index: int) -> torch.Tensor:
    """targets as a flat contiguous int64 copy, once every id is in [0, vocab) or is ignore_index.

    An out-of-range id would make the kernels read past the row (F.cross_entropy raises too).
    int64 whatever the ids' dtype, so the check and the kernels compare ids with ignore_index
    alike (int32 ids compared in int32 would wrap an ignore_index of 2^32 - 100 to -100).
    The check costs a small reduction and one host sync, so it is an op of its own: torch.compile
    keeps it as one opaque call (its data-dependent raise would otherwise break the graph), and
    the fused LM head runs it once per call, not once per chunk.
    """
    flat = targets.reshape(-1).to(torch.int64, copy=True)
    if flat.is_cuda and torch.cuda.is_current_stream_capturing():
        return flat  # a CUDA-graph capture cannot sync; the eager warm-up runs before capture checked
    bad = (flat != ignore_index) & ((flat < 0) | (flat >= vocab))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"target {int(flat[i])} at position {i} is outside the vocabulary [0, {vocab}) "
                         f"and is not ignore_index ({ignore_index})")
    return flat


@_checked_targets.register_fake
def _(targets, vocab, ignore_index):
    return targets.new_empty(targets.numel(), dtype=torch.int64)


def rl_options(label_smoothing, z_loss, temperature, entropy) -> tuple[float, bool]:
    """(temperature, entropy) checked: temperature a finite number > 0 (the logits, soft-capped first, are divided
    by it: the distribution sampling drew from), entropy a bool, and neither beside label smoothing or a z-loss
    (whose terms were written for the untempered logits' loss; a soft cap is fine: the model's logits are capped)."""
    temperature = temperature_value(temperature)
    if not isinstance(entropy, bool):
        raise TypeError(f"entropy must be a bool, got {type(entropy).__name__}")
    if (temperature != 1 or entropy) and (label_smoothing or z_loss):
        raise ValueError(f"cross-entropy with a temperature or the entropy takes no label_smoothing or z_loss "
                         f"(got temperature {temperature!r}, entropy {entropy}, label_smoothing "
                         f"{label_smoothing!r}, z_loss {z_loss!r})")
    return float(temperature), entropy


def _check_op_layout(logits, targets, n_classes, label_smoothing=0.0, z_loss=0.0, softcap=0.0, temperature=1.0,
                     with_entropy=False, **row_values):
    """What the kernels assume of their inputs. cross_entropy() arranges it; a direct call of the
    ops must too (short targets, a transposed logits or n_classes past the row were read as
    they lay: garbage, no error). row_values: other [N] per-row tensors (row_max, grad_loss...)."""
    loss_options(label_smoothing, z_loss)
    softcap_value(softcap)
    rl_options(label_smoothing, z_loss, temperature, with_entropy)
    check_tensor(logits, "logits", ndim=2)
    N, W = logits.shape
    check_tensor(targets, "targets", dtypes=(torch.int64, torch.int32), shape=(N,))
    row_values = {name: t for name, t in row_values.items() if t is not None}
    for name, t in row_values.items():
        check_tensor(t, name, shape=(N,))
    check_same_device(logits=logits, targets=targets, **row_values)
    for name, t in (("logits", logits), ("targets", targets), *row_values.items()):
        # the upstream gradients are copied at launch (a sum's backward gives a stride-0 expand)
        if name not in ("grad_loss", "grad_entropy") and t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"tritongpt::cross_entropy ops read {name} with unit stride on its last dim, got "
                             f"strides {t.stride()} (call cross_entropy(), which copies, or pass .contiguous())")
    if not 1 <= n_classes <= W:
        raise ValueError(f"n_classes must be in [1, {W}] (logits have {W} columns), got {n_classes}")


@custom_op("tritongpt::cross_entropy_fwd", mutates_args=())
def _cross_entropy_fwd(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, n_classes: int,
                       label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float = 0.0,
                       temperature: float = 1.0, entropy: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (per-row loss, row max m, log S, entropy): fp32 [N] each ([0] for the entropy unless asked for); m and
    log S are for backward (of the tempered logits, with a temperature).

    Called directly, a target outside [0, n_classes) that is not ignore_index gives a nan loss
    (cross_entropy() refuses it with a message, at the cost of a host sync)."""
    check_runnable(logits, "logits")
    _check_op_layout(logits, targets, n_classes, label_smoothing, z_loss, softcap, temperature, entropy)
    return _fwd_launch(logits, targets, ignore_index, n_classes, label_smoothing, z_loss, softcap, temperature,
                       entropy)


@_cross_entropy_fwd.register_fake
def _(logits, targets, ignore_index, n_classes, label_smoothing=0.0, z_loss=0.0, softcap=0.0, temperature=1.0,
      entropy=False):
    _check_op_layout(logits, targets, n_classes, label_smoothing, z_loss, softcap, temperature, entropy)
    N = logits.shape[0]
    return tuple(logits.new_empty(n, dtype=torch.float32) for n in (N, N, N, N if entropy else 0))


@custom_op("tritongpt::cross_entropy_bwd", mutates_args=())
def _cross_entropy_bwd(grad_loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                       row_max: torch.Tensor, log_sum: torch.Tensor, ignore_index: int,
                       n_classes: int, label_smoothing: float = 0.0, z_loss: float = 0.0,
                       softcap: float = 0.0, temperature: float = 1.0, grad_entropy: torch.Tensor | None = None,
                       entropy: torch.Tensor | None = None) -> torch.Tensor:
    """-> dlogits [N, W] in logits' dtype, from the forward op's row max and log S; with grad_entropy (the
    entropy's upstream gradient), that of the forward's entropy (given as entropy) added in the same pass."""
    check_runnable(logits, "logits")
    _check_bwd_entropy(grad_entropy, entropy)
    _check_op_layout(logits, targets, n_classes, label_smoothing, z_loss, softcap, temperature,
                     grad_entropy is not None, grad_loss=grad_loss, row_max=row_max, log_sum=log_sum,
                     grad_entropy=grad_entropy, entropy=entropy)
    return _bwd_launch(grad_loss, logits, targets, row_max, log_sum, ignore_index, n_classes, label_smoothing,
                       z_loss, softcap, temperature, grad_entropy, entropy)


@_cross_entropy_bwd.register_fake
def _(grad_loss, logits, targets, row_max, log_sum, ignore_index, n_classes, label_smoothing=0.0, z_loss=0.0,
      softcap=0.0, temperature=1.0, grad_entropy=None, entropy=None):
    _check_bwd_entropy(grad_entropy, entropy)
    _check_op_layout(logits, targets, n_classes, label_smoothing, z_loss, softcap, temperature,
                     grad_entropy is not None, grad_loss=grad_loss, row_max=row_max, log_sum=log_sum,
                     grad_entropy=grad_entropy, entropy=entropy)
    return logits.new_empty(logits.shape)


def _check_bwd_entropy(grad_entropy, entropy):
    """The backward op's entropy gradient comes with the forward's entropy, or neither does."""
    if (grad_entropy is None) != (entropy is None):
        raise ValueError("tritongpt::cross_entropy_bwd takes grad_entropy and the forward's entropy together, "
                         f"got grad_entropy {'None' if grad_entropy is None else 'a tensor'} and entropy "
                         f"{'None' if entropy is None else 'a tensor'}")


class CrossEntropyFunction(torch.autograd.Function):
    """Per-row losses [N] from logits [N, W] whose first n_classes columns are the classes; saves
    the logits (alive anyway), the row max and the log-sum (fp32 [N] each). With entropy, (losses, entropies):
    the entropy saved too, and its gradient added in the one backward pass only when it has one."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, n_classes, label_smoothing=0.0, z_loss=0.0, softcap=0.0,
                temperature=1.0, entropy=False):
        loss, row_max, log_sum, ent = _cross_entropy_fwd.call(logits, targets, ignore_index, n_classes,
                                                              label_smoothing, z_loss, softcap, temperature, entropy)
        ctx.save_for_backward(logits, targets, row_max, log_sum, ent)
        ctx.options = ignore_index, n_classes, label_smoothing, z_loss, softcap, temperature
        # an entropy nobody differentiates comes back as None (no work), not as zeros
        ctx.set_materialize_grads(False)
        return (loss, ent) if entropy else loss

    @staticmethod
    def backward(ctx, grad_loss, grad_entropy=None):
        first_order_only("cross_entropy")
        logits, targets, row_max, log_sum, ent = ctx.saved_tensors
        if grad_loss is None:
            grad_loss = torch.zeros_like(row_max)
        dx = _cross_entropy_bwd.call(grad_loss, logits, targets, row_max, log_sum, *ctx.options, grad_entropy,
                                     None if grad_entropy is None else ent)
        return dx, *[None] * 8


def _n_classes(vocab_size, width: int, what: str) -> int:
    """The class count: vocab_size (a padded vocabulary's first columns) or, if None, all `width`."""
    n = width if vocab_size is None else vocab_size
    if not is_int(n) or not 1 <= n <= width:
        raise ValueError(f"vocab_size must be an int in [1, {width}] ({what.format(V=width)}), got {vocab_size!r}")
    return int(n)


def _as_int(value, name: str) -> int:
    """An int64 of any kind PyTorch takes (int, numpy integers), not a bool or a float."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not -2 ** 63 <= int(value) < 2 ** 63:
        raise ValueError(f"{name} must fit in int64, got {value}")
    return int(value)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean", vocab_size: int | None = None, label_smoothing: float = 0.0,
                  z_loss: float = 0.0, softcap: float = 0.0, temperature: float = 1.0, entropy: bool = False):
    """F.cross_entropy(logits.float(), targets, ignore_index=..., reduction=..., label_smoothing=...),
    fused, plus z_loss * logsumexp(logits)^2 per counted row. Differentiable. Reference: lm_loss.

    logits: [..., V] fp32/bf16/fp16 (math in fp32; the gradient comes back in the logits' dtype);
    targets: integer ids with logits' leading shape. reduction: "mean" (over counted targets:
    nan when every target is ignored, as in PyTorch), "sum", or "none" (per-position losses, fp32).
    vocab_size: the classes, when the logits' columns past it pad the vocabulary (the output of a
    padded LM head): the loss of logits[..., :vocab_size], read in aligned rows, and a zero
    gradient for the padding columns (default: every column is a class).
    label_smoothing: in [0, 1], PyTorch's: the target is (1 - label_smoothing) on the right class plus
    label_smoothing spread evenly over the vocab_size classes. z_loss: PaLM's auxiliary loss, which
    keeps logsumexp near 0 (and bf16 logits precise): its coefficient, 1e-4 in PaLM; 0 (default): off.
    softcap: the loss of softcap * tanh(logits / softcap) instead of the logits (Gemma 2's and
    modded-nanogpt's logit soft-capping; GPTModel applies it as GPTConfig.logit_softcap), its
    gradient through the tanh; 0 (default): none. Each option, when 0, compiles out of the kernels.
    temperature: the loss of softmax(logits / temperature) (after the soft cap): RL's log-probs of the
    distribution its rollouts were sampled from; > 0. entropy=True: (loss, entropy), the entropy of each
    position's (tempered) softmax, fp32 shaped like targets, made in the same pass over the logits and
    differentiable (its gradient joins the loss's in the one backward pass). Every position gets its entropy,
    an ignored target's too (an RL loss masks it afterwards); a row with no finite logit gets 0. Neither
    takes label_smoothing or z_loss. Reference: log_softmax(logits / temperature), -sum p log p.
    """
    no_func_transform("cross_entropy")
    check_tensor(logits, "logits")
    check_tensor(targets, "targets", dtypes=(torch.int64, torch.int32))
    check_same_device(logits=logits, targets=targets)
    check_runnable(logits, "logits")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [..., V] with V >= 1 classes, got shape {tuple(logits.shape)}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets has shape {tuple(targets.shape)}; expected logits' leading shape "
                         f"{tuple(logits.shape[:-1])}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    ignore_index = _as_int(ignore_index, "ignore_index")
    label_smoothing, z_loss = loss_options(label_smoothing, z_loss)
    softcap = softcap_value(softcap)
    temperature, entropy = rl_options(label_smoothing, z_loss, temperature, entropy)
    V = logits.shape[-1]
    n_classes = _n_classes(vocab_size, V, "logits have {V} columns")
    x2 = logits.reshape(-1, V)
    if x2.stride(-1) != 1:  # rows are streamed with unit stride
        x2 = x2.contiguous()
    t1 = _checked_targets.call(targets, n_classes, ignore_index)
    out = CrossEntropyFunction.apply(x2, t1, ignore_index, n_classes, label_smoothing, z_loss, softcap, temperature,
                                     entropy)
    loss = _reduced(out[0] if entropy else out, reduction, t1, ignore_index, targets.shape)
    return (loss, out[1].view(targets.shape)) if entropy else loss


def _reduced(loss, reduction, targets, ignore_index, shape):
    """Per-row losses [N] as reduction asks: shaped as the targets, summed, or their mean over counted targets."""
    if reduction == "none":
        return loss.view(shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (targets != ignore_index).sum()


# ----------------------------------------------------------------------------- LM head + loss
# The logits themselves are the big tensor: [tokens, vocab] (1.6 GB in bf16 for a 16k-token
# GPT-2 step, and as much again for their gradient). When only the mean or summed loss is
# wanted, its gradient with respect to each row's logits is known during the forward pass
# (grad_output is a scalar that can be applied afterwards), so the forward can walk the rows in
# chunks: logits of one chunk -> loss (and row max, log-sum) -> dlogits -> that chunk's dhidden
# rows and its share of dweight, then drop the chunk. Backward only scales the two stored gradients
# (except in fp16, whose range needs the loss scale first: see LinearCrossEntropyFunction).
# Per-token losses (reduction "none") and the entropy (RL's log-probs: GPTModel.token_logprobs) cannot: each row's
# upstream gradient is its own, known in backward only, and dweight sums the rows' dlogits weighted by them. So
# forward keeps each row's max and log-sum (and entropy: 8-12 bytes a row) and backward makes each chunk's logits
# again: four head matmuls instead of three (2 N C V more FLOPs: a third more than the fused mean's), where keeping
# the logits for backward, as F.linear then a per-token loss does, holds [N, V] (1.6 GB in bf16 at 16k x 50257,
# and torch's fp32 log-softmax 3.3 GB more). For GPT-2 124M the extra matmul is ~10 % of an update's matmul FLOPs
# (the head, 38.6M of the 124M weights, is one pass of the three a training step makes over each), the price of
# not holding those.
# (The same plan as Liger-Kernel's fused linear cross-entropy; the matmuls are cuBLAS's.)
CHUNK_ELEMENTS = 1 << 27  # logits per chunk: 256 MB in bf16, about 2.7k rows of GPT-2's vocabulary
# The head's rows are padded to a multiple of this inside the call, when the model's are not (GPT-2's 50257,
# GPTConfig.vocab_multiple 1): a logits chunk [rows, 50257] has a row stride of 50257 elements, which no
# 16-byte vector or TMA copy can walk, and cuBLAS falls back to slow kernels for all three head matmuls.
# On the H200 the fused head + loss ran at 103 TFLOPS at 16k x 768 x 50257 (torch's F.linear +
# F.cross_entropy at 113) where a bf16 matmul reached 687: the head was more than half the 124M step.
# Padding costs one copy of the head's weight a call (77 MB for GPT-2 in bf16); the padding columns
# are past n_classes, so the loss kernels treat them as absent, as they do the model's own padding.
HEAD_ROW_MULTIPLE = 64


def _padded_count(rows, multiple=HEAD_ROW_MULTIPLE):
    return -(-rows // multiple) * multiple


def _pad_rows(t, dtype, multiple=HEAD_ROW_MULTIPLE):
    """t (the head's weight [V, C] or bias [V]) in dtype, with zero rows appended up to a multiple of
    `multiple` rows: one new tensor (the cast and the padding in one copy), or t.to(dtype) when its
    row count is such a multiple already."""
    if t is None or t.shape[0] % multiple == 0:
        return None if t is None else t.to(dtype)
    padded = t.new_empty((_padded_count(t.shape[0], multiple), *t.shape[1:]), dtype=dtype)
    padded[:t.shape[0]] = t
    padded[t.shape[0]:] = 0
    return padded


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Mean, summed or per-row CE(hidden @ weight.T, targets) from hidden [N, C] and weight [W, C], whose
    first n_classes rows are the classes (the others pad the vocabulary: no logit, no gradient); with entropy,
    (loss, per-row entropies [N]).

    In fp16 the gradients wait for backward: a row's gradient at 1/n (a 16k-token step) times a
    probability of 1/V flushes to zero below fp16's 6e-8, which is why fp16 training scales the
    loss (GradScaler), and that scale only arrives as backward's upstream gradient. So fp16 keeps
    the forward's row max and log-sum and recomputes each chunk's logits in backward, as nn.Linear
    would form its gradients: one more head matmul. bf16 has fp32's range and needs none of it.
    Per-row losses (reduction "none") and the entropy defer the same way, in every dtype: their upstream
    gradients are [N] tensors (and the entropy's may be none at all) that only backward knows."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, chunk_rows, n_classes, grad_enabled,
                label_smoothing=0.0, z_loss=0.0, softcap=0.0, bias=None, temperature=1.0, entropy=False):
        N = hidden.shape[0]
        device = hidden.device.type
        # the matmul dtype nn.Linear would use: the autocast dtype, else the inputs' own
        dt = autocast_dtype(hidden.device) or hidden.dtype
        # (the head's rows padded to HEAD_ROW_MULTIPLE: aligned matmuls; the gradients keep weight's rows)
        h, w = hidden.to(dt), _pad_rows(weight, dt)
        b = _pad_rows(bias, dt)  # nn.Linear's bias under autocast: the matmul's dtype
        # needs_input_grad only says requires_grad: under no_grad (evaluation) a head weight still
        # requires grad, and the gradient work would triple the head's cost for nothing
        want_dh, want_dw = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        want_db = grad_enabled and b is not None and ctx.needs_input_grad[11]
        defer = (dt == torch.float16 or reduction == "none" or entropy) and (want_dh or want_dw or want_db)
        # d(loss)/d(row loss): 1/n for the mean (n = counted targets, kept on the device), 1 for the sum
        n = (targets != ignore_index).sum()
        g = (1.0 / n).float() if reduction == "mean" else torch.ones((), device=hidden.device)
        loss_rows = torch.empty(N, device=hidden.device, dtype=torch.float32)
        row_max, log_sum = (torch.empty_like(loss_rows) for _ in range(2))
        ent = torch.empty(N if entropy else 0, device=hidden.device, dtype=torch.float32)
        dh, dw = _head_grad_buffers(h, weight, want_dh and not defer, want_dw and not defer)
        db = _bias_grad_buffer(bias, want_db and not defer)
        g_rows = g.expand(min(N, chunk_rows)).contiguous()  # each row's upstream gradient, made once
        options = ignore_index, n_classes, label_smoothing, z_loss, softcap, temperature
        with torch.autocast(device, enabled=False):  # the dtypes are chosen above
            for s in range(0, N, chunk_rows):
                e = min(N, s + chunk_rows)
                # all W columns: a padded W keeps the matmuls on multiples of 64; the CE kernels
                # treat columns past n_classes as absent and give them a zero gradient
                logits = _chunk_logits(h[s:e], w, b)
                loss_rows[s:e], row_max[s:e], log_sum[s:e], ent_rows = _cross_entropy_fwd.call(
                    logits, targets[s:e], *options, entropy)
                if entropy:
                    ent[s:e] = ent_rows
                if dh is not None or dw is not None or db is not None:
                    _chunk_grads(dh, dw, logits, h, w, g_rows[:e - s], targets, row_max, log_sum, s, e, options, db)
                del logits  # before the next chunk's logits are allocated: one chunk alive at a time
        ctx.dtypes = hidden.dtype, weight.dtype, None if bias is None else bias.dtype
        ctx.deferred = (want_dh, want_dw, want_db, chunk_rows, options, reduction) if defer else None
        if defer:  # the weight as given (the padded copy is made again in backward, not kept alive until then)
            ctx.matmul_dtype = dt
            ctx.save_for_backward(h, weight, bias, targets, row_max, log_sum, g, ent)
        else:
            ctx.save_for_backward(dh, dw, db)
        ctx.set_materialize_grads(False)  # an entropy (or a loss) nobody differentiates: None, no work
        loss = loss_rows if reduction == "none" else loss_rows.sum() * g
        return (loss, ent) if entropy else loss

    @staticmethod
    def backward(ctx, grad_loss, grad_entropy=None):
        first_order_only("linear_cross_entropy")  # made from saved numbers: no graph to differentiate again
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        if ctx.deferred is None:
            dh, dw, db = ctx.saved_tensors
            return (None if dh is None else (dh * grad_loss).to(h_dtype),
                    None if dw is None else (dw * grad_loss).to(w_dtype), *[None] * 9,
                    None if db is None else (db * grad_loss).to(b_dtype), None, None)
        want_dh, want_dw, want_db, chunk_rows, options, reduction = ctx.deferred
        h, weight, bias, targets, row_max, log_sum, g, ent = ctx.saved_tensors
        N = h.shape[0]
        w, b = _pad_rows(weight, ctx.matmul_dtype), _pad_rows(bias, ctx.matmul_dtype)  # as forward's
        dh, dw = _head_grad_buffers(h, weight, want_dh, want_dw)  # the gradients: weight's rows
        db = _bias_grad_buffer(bias, want_db)
        if grad_loss is None:  # only the entropy is differentiated
            g_rows = torch.zeros(N, device=h.device, dtype=torch.float32)
        elif reduction == "none":
            g_rows = grad_loss.float().contiguous()
        else:  # the loss scale included
            g_rows = (grad_loss.float() * g).expand(min(N, chunk_rows)).contiguous()
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, N, chunk_rows):
                e = min(N, s + chunk_rows)
                g_chunk = g_rows[s:e] if g_rows.shape[0] == N else g_rows[:e - s]
                _chunk_grads(dh, dw, _chunk_logits(h[s:e], w, b), h, w, g_chunk, targets, row_max, log_sum, s, e,
                             options, db, grad_entropy, ent)
        return (None if dh is None else dh.to(h_dtype), None if dw is None else dw.to(w_dtype), *[None] * 9,
                None if db is None else db.to(b_dtype), None, None)


def _head_grad_buffers(h, weight, want_dh, want_dw):
    """dhidden in the matmul dtype (each chunk's rows written once), dweight in fp32 (summed over chunks)."""
    return (torch.empty_like(h) if want_dh else None,
            torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if want_dw else None)


def _bias_grad_buffer(bias, want_db):
    """dbias in fp32, summed over chunks (the head's bias, GPTConfig.head_bias), or None."""
    return torch.zeros(bias.shape, device=bias.device, dtype=torch.float32) if want_db else None


def _chunk_logits(h, w, b):
    """One chunk's logits h @ w.T, plus the bias in the same call when the head has one."""
    return h @ w.t() if b is None else torch.addmm(b, h, w.t())


def _chunk_grads(dh, dw, logits, h, w, g_chunk, targets, row_max, log_sum, s, e, options, db=None, grad_entropy=None,
                 ent=None):
    """Rows s:e's dlogits from their logits and forward statistics (g_chunk: their [e - s] upstream gradients),
    into dh[s:e], dw and db (the bias's gradient: dlogits' column sums; the padding columns' dlogits are zero, so
    theirs stays zero). options: (ignore_index, n_classes, label_smoothing, z_loss, softcap, temperature), as the
    ops take them; grad_entropy and ent ([N]: the entropy's upstream gradient and forward value) or None."""
    with_ent = grad_entropy is not None
    dlogits = _cross_entropy_bwd.call(g_chunk, logits, targets[s:e], row_max[s:e], log_sum[s:e], *options,
                                      grad_entropy[s:e] if with_ent else None, ent[s:e] if with_ent else None)
    _head_grads(dlogits, h, w, s, e, dh, dw, db)


def _head_grads(dlogits, h, w, s, e, dh, dw, db):
    """Rows s:e's dlogits through the head: dh[s:e] = dlogits W, dW += dlogits^T h (fp32), db += its column sums
    (kernels/jsd.py's fused distillation loss too). dw and db may have fewer rows than w (the rows _pad_rows
    added: their gradient is dropped)."""
    # (traced by torch.compile, the plain forms: inductor fuses the cast-and-add, and out= into views is its to plan;
    # under a dispatch mode (fake tensors, make_fx, export) too: the probe could not read its sum there)
    eager = plain_eager((dlogits, h, w, dh, dw))
    if dh is not None:
        if eager:
            torch.mm(dlogits, w, out=dh[s:e])  # written in place: no [rows, C] temporary and copy
        else:
            dh[s:e] = dlogits @ w
    if dw is not None:
        if eager and dlogits.dtype != torch.float32 and _fp32_accumulate_ok(dw.device, dlogits.dtype):
            # cuBLAS adds the 16-bit product into the fp32 sum itself (beta 1, fp32 C): a [V, C] product is not
            # rounded to 16 bits, written, cast to a new fp32 copy and added (~0.1 ms a chunk on an H200)
            torch.addmm(dw, dlogits.t()[:dw.shape[0]], h[s:e], out_dtype=torch.float32, out=dw)
        else:
            dw += (dlogits.t() @ h[s:e])[:dw.shape[0]].float()
    if db is not None:
        db += dlogits.sum(0, dtype=torch.float32)[:db.shape[0]]


# where torch.addmm has out_dtype (aten::addmm.dtype_out: CUDA only; some builds refuse an fp32 self: the probe
# says which)
ACCUMULATE_DEVICES = ("cuda",)
_ACCUMULATE_OK = {}  # (device, dtype) -> whether the probe below passed


def _fp32_accumulate_ok(device, dtype) -> bool:
    """Whether torch.addmm(c, a, b, out_dtype=float32, out=c) adds a 16-bit product into fp32 c in place here:
    probed once per device and dtype on small random operands (a transposed view for a, as the head passes it)
    against float64. Older torch (no out_dtype), a backend without it, or a wrong sum: False, the cast-and-add.
    During a CUDA-graph capture nothing can be checked: False, not kept."""
    ok = _ACCUMULATE_OK.get((device, dtype))
    if ok is not None:
        return ok
    if device.type not in ACCUMULATE_DEVICES or not hasattr(torch.ops.aten.addmm, "dtype_out"):
        ok = False
    elif device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    else:
        g = torch.Generator().manual_seed(0)
        a, b, c = (torch.randn(*shape, generator=g) for shape in ((37, 70), (37, 24), (70, 24)))
        a, b = a.to(dtype), b.to(dtype)  # the 16-bit operands, exactly what float64 multiplies below
        want = c.double() + a.double().t() @ b.double()
        try:
            got = c.to(device)
            torch.addmm(got, a.to(device).t(), b.to(device), out_dtype=torch.float32, out=got)
            ok = bool(((got.cpu().double() - want).norm() <= 1e-5 * want.norm()).item())
        except (RuntimeError, TypeError, NotImplementedError):
            ok = False
    _ACCUMULATE_OK[(device, dtype)] = ok
    return ok


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean", chunk_rows: int | None = None,
                         vocab_size: int | None = None, label_smoothing: float = 0.0, z_loss: float = 0.0,
                         softcap: float = 0.0, bias: torch.Tensor | None = None, temperature: float = 1.0,
                         entropy: bool = False):
    """cross_entropy(hidden @ weight.T, targets) for reduction "mean", "sum" or "none", never holding all
    the logits: at most chunk_rows rows of them (default: 2^27 logits) at a time. Differentiable
    in hidden, weight and bias. Reference: lm_loss(out_head(hidden), targets).

    hidden: [..., C] (e.g. the final LayerNorm's output), weight: [W, C] (the LM head), targets: hidden's
    leading shape. bias: None (GPT-2's head has none) or [W] in weight's dtype (Phi-1/1.5/2's and GPT-J's
    lm_head.bias: the logits are hidden @ weight.T + bias). Under autocast the matmuls run in the autocast
    dtype, as nn.Linear's would. vocab_size: the classes, when weight's rows past it pad the
    vocabulary (GPTConfig.vocab_multiple): the loss is then that of the logits [..., :vocab_size]
    and the padding rows get a zero gradient (default: all W rows are classes). label_smoothing,
    z_loss and softcap: as cross_entropy's (Liger-Kernel's label_smoothing, lse_square_scale and softcap).
    temperature and entropy: as cross_entropy's (RL's log-probs and entropies: GPTModel.token_logprobs).
    The mean and the sum make their gradients during forward; per-token losses ("none") and the entropy,
    whose upstream gradients only backward knows, keep the chunks' row statistics and make the logits again in
    backward (one more head matmul, as fp16's loss scale does), still one chunk at a time.
    """
    no_func_transform("linear_cross_entropy")
    check_tensor(hidden, "hidden")
    check_tensor(weight, "weight", ndim=2)
    check_tensor(targets, "targets", dtypes=(torch.int64, torch.int32))
    check_same_device(hidden=hidden, weight=weight, targets=targets)
    check_runnable(hidden, "hidden")
    V, C = weight.shape
    if hidden.dim() < 1 or hidden.shape[-1] != C or V == 0:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} do not make logits: "
                         "need hidden [..., C] and weight [V, C] with V >= 1")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets has shape {tuple(targets.shape)}; expected hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    ignore_index = _as_int(ignore_index, "ignore_index")
    label_smoothing, z_loss = loss_options(label_smoothing, z_loss)
    softcap = softcap_value(softcap)
    temperature, entropy = rl_options(label_smoothing, z_loss, temperature, entropy)
    if autocast_dtype(hidden.device) is None:
        check_same_dtype(hidden=hidden, weight=weight)
    _check_bias(bias, weight)
    n_classes = _n_classes(vocab_size, V, "weight has {V} rows")
    chunk = chunk_rows if chunk_rows is not None else max(1, CHUNK_ELEMENTS // _padded_count(V))
    if not is_int(chunk) or chunk < 1:
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
    chunk = int(chunk)
    h2 = hidden.reshape(math.prod(hidden.shape[:-1]), C)  # not -1: C may be 0
    t1 = _checked_targets.call(targets, n_classes, ignore_index)
    out = LinearCrossEntropyFunction.apply(h2, weight, t1, ignore_index, reduction, chunk, n_classes,
                                           torch.is_grad_enabled(), label_smoothing, z_loss, softcap, bias,
                                           temperature, entropy)
    loss, ent = out if entropy else (out, None)
    if reduction == "none":
        loss = loss.view(targets.shape)
    return (loss, ent.view(targets.shape)) if entropy else loss


def _check_bias(bias, weight):
    """The LM head's bias: None, or a [W] tensor beside weight [W, C], in its dtype, on its device."""
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise UserError(f"linear_cross_entropy: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if tuple(bias.shape) != (weight.shape[0],):
        raise UserError(f"linear_cross_entropy: bias has shape {tuple(bias.shape)}; expected ({weight.shape[0]},), "
                        f"one per row of weight {tuple(weight.shape)}")
    if bias.dtype != weight.dtype:
        raise UserError(f"linear_cross_entropy: bias is {str(bias.dtype).replace('torch.', '')}, weight "
                        f"{str(weight.dtype).replace('torch.', '')}: give them one dtype")
    if bias.device != weight.device:
        raise UserError(f"linear_cross_entropy: bias is on {bias.device}, weight on {weight.device}")


__all__ = ["cross_entropy", "CrossEntropyFunction", "linear_cross_entropy", "LinearCrossEntropyFunction"]
