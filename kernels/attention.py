"""FlashAttention-2 style attention in Triton: forward, backward, dropout, bottom-right causal mask.

Reference module: `tritongpt.model.layers.MultiHeadAttention` -- this file replaces its textbook
attention core (`MultiHeadAttention.attend`: scores, causal mask, softmax, dropout, @ v).

Algorithm (Dao, "FlashAttention-2", 2023). Per (batch, head), with S = scale * Q K^T:
  forward   One program owns a BLOCK_M tile of query rows; Q tile, the running row max m,
            the running row sum l and the fp32 output accumulator stay in SRAM/registers while
            the program streams BLOCK_N tiles of K and V past them (online softmax: when the max
            grows, rescale l and the accumulator by exp(m_old - m_new)). Only O and the
            logsumexp L = m + log(l) (one float per row) go back to HBM. The Tq x Tk matrix
            never exists in memory. Causal: KV tiles wholly above the diagonal are never
            visited, and only tiles that straddle the diagonal or the ragged end pay for a mask.
  backward  (1) preprocess: Delta = rowsum(O * dO), one float per query row.
            (2) dK/dV pass: one program owns a BLOCK_N tile of keys (K, V, dK, dV in SRAM) and
                streams the query tiles that can see it, recomputing P = exp(S - L) from the
                saved logsumexp: dV += P'^T dO, dP = dO V^T (with dropout: masked and scaled
                by 1/(1-p), i.e. the gradient of the pre-dropout P), dS = P * (dP - Delta),
                dK += scale * dS^T Q (the scale is applied once, when dK is stored).
            (3) dQ pass: one program owns a BLOCK_M tile of queries and streams K, V again:
                dQ += scale * dS K. Recomputing P twice is cheaper than storing it, and no atomics.
  base 2    the kernels compute in base 2 (exp2 is one MUFU instruction): scores are scaled by
            scale * log2(e), and the saved L is log2 of the row sum of 2^(scores), i.e. the
            natural logsumexp times log2(e); P = exp2(S' - L) is the same P as above.
  causal    bottom-right aligned, as in the reference with a KV cache: query i (of Tq) sits at
            absolute position Tk - Tq + i and sees keys j <= Tk - Tq + i. So decode (Tq = 1)
            and chunked prefill (Tq < Tk) use the same kernel.
  dropout   P' = dropout(P) / (1 - p), O = P' V, as nn.Dropout on the attention weights. The
            keep-mask is never stored: entry (bh, i, j) keeps iff tl.rand(seed, (bh*Tq + i)*Tk + j)
            >= p, a counter-based RNG, so the backward regenerates exactly the same mask, and
            `dropout_mask` rebuilds it for tests. Delta = rowsum(O*dO) is still rowsum(P*dP). The
            seed is a one-element int64 tensor on q's device that each program loads (its low 31
            bits): the host never reads it, so a launch with dropout can be captured in a CUDA graph.
  documents packed documents (doc_ids, causal only): query i sees key j iff starts[i] <= j <= i,
            starts[i] being where i's run of equal ids begins. The forward and dQ pass skip the KV
            tiles before the earliest start among a query tile's rows; the dK/dV pass skips the
            query tiles past the latest end among a key tile's keys. Only tiles that hold a
            document boundary pay for the extra mask; a row that sees nothing of its first
            visited tile keeps its running max at -inf and exponentiates against 0 there.
  window    local (sliding-window) attention (window=W, causal only): query i sees keys
            i - W < j <= i. No kernel of its own: a window is a start per row too, i - W + 1
            (and an end per key, j + W), so it rides on the document bounds, intersected with
            them when both are given. The same skipping makes a layer cost O(T W), not O(T^2):
            only the tiles that cross the band's lower edge or the diagonal are masked.
  GQA/MQA   k, v may have fewer heads than q (Hkv dividing H; Llama's 32 over 8, MQA's one):
            query head h reads KV head h // (H / Hkv). The forward and dQ pass only change that
            index (no repeat_interleave copy of K and V). dK/dV of a KV head is the sum over the
            H / Hkv query heads of its group: its dK/dV program (one key tile of one KV head)
            streams the query tiles of each query head of the group in turn into the same
            registers. The masks do not depend on the head, so the tile ranges are computed once;
            no atomics, no [B, H, Tk, D] scratch and no reduction launch. flash-attn 2 instead
            writes dK/dV per query head into such a scratch and sums it after (more memory, and a
            grid H / Hkv times wider). The cost here: the dK/dV grid has Hkv, not H, rows of
            programs, each H / Hkv times longer, which underfills a GPU when B * Hkv * Tk / BLOCK_N
            is small (MQA at short T). The dropout counter stays that of the query head. Every
            pass specializes on GROUP == 1 (Triton's specialization of an int argument equal to 1):
            the loop and the h // GROUP fold away, and multi-head attention keeps its registers
            (sm_90, offline: a shared binary took up to ~70 more a thread in dK/dV and dQ, ~40 in
            forward).
  head dim  16, 32, 64, 80, 96, 128, 256; 80 and 96 are padded to 128 inside the kernel with masks.
            256 (Gemma's heads) autotunes over tiles of its own (TILES, tile_group): smaller, 2
            stages, so that its K/V tiles fit 99 KB of shared memory and its accumulators do not spill;
            a one-stage 16 x 16 backward tile for a T4's 64 KB (fp16; fp32 dK/dV there needs 65 KB).
  softcap   (softcap=c, Gemma 2's attention logits) each scaled score is capped before the masks
            and the softmax: s_c = c tanh(s / c); in base 2, (c log2 e) t with t = tanh(scale q.k / c),
            and the saved L is the logsumexp of the capped scores. Backward recomputes t with S in
            both passes (nothing more is stored): P from the capped S and L as above, dS_c =
            P * (dP - Delta) is the gradient of the capped score, and dS = dS_c * (1 - t^2) goes
            on into dQ and dK. A constexpr flag (HAS_SOFTCAP): without a cap the kernels are as before.
  alibi     (alibi_slopes, fp32 [H]: BLOOM, MPT, Falcon-RW, Baichuan-13B) query head h adds m_h (j - i)
            to each scaled (after the cap, if any) score, before the masks and the softmax, i being the
            query's position Tk - Tq + i as for the causal mask, so a decode row gets the bias its row of
            the whole sequence gets; <= 0 where causal. The saved L includes it; the bias is a constant,
            so both backward passes only add it again to the recomputed S (dS is unchanged). It masks
            nothing: the tile skipping is as before. Base 2: the kernels scale the slope by log2 e. A
            constexpr flag (HAS_ALIBI): without slopes the kernels are as before.
  decode    (split-KV, "flash-decoding") a KV-cache step has Tq = 1 (or a few tokens to verify), so the
            forward's grid is B * H programs of one real row each, every one walking all of Tk: on an
            H100's 132 SMs, batch 1 with 32 heads leaves most idle. When the query tiles fill less than
            80% of two programs per SM (_num_splits; never under the interpreter), the forward splits the
            KV tiles a query tile visits into NUM_SPLITS runs of whole tiles, one program each
            (_attn_fwd_split: the same _fwd_inner loop, masks and skipping), each writing its normalized
            output O_s and logsumexp lse_s in fp32 to scratch; _attn_fwd_combine merges them: lse =
            log2 sum_s 2^lse_s, O = sum_s 2^(lse_s - lse) O_s. That lse is the single pass's, so the
            backward is unchanged. A split the causal mask (Tq > 1) or a document hides from a row
            leaves it lse_s = -inf, weight 0. Dropout (training) always takes the single pass. With
            GQA (while GROUP * Tq <= 64) a split program's rows are the GROUP query heads of one KV
            head (PACK_GQA): a decode tile holds GROUP real rows sharing each K/V tile load.
            kv_len (HAS_KV_LEN): k and v may be a whole preallocated cache of Tk_cap positions with a
            one-element tensor holding how many are filled, L (or one a batch row, [B]: continuous batching's
            requests of their own lengths); both forwards load L on the device and use
            it for Tk everywhere (masks, tile ranges, splits' shares, query positions L - Tq + i), while
            the grid, NUM_SPLITS and the tuning key follow Tk_cap: a decode step captured in a CUDA graph
            replays correctly after a new L is written into the tensor. Inference only.
  int8 KV   (k_scale, v_scale: an int8 KV cache, model/gpt.py KVCache(kv_dtype="int8")) k and v are int8 with one
            fp32 scale per key/value vector, [B, Hkv, Tk]. Both forwards (INT8_KV, a constexpr: the float kernels
            are as before) load int8 K/V tiles (half a 16-bit tile's bytes) and the scales of their columns: the
            keys convert exactly to q's dtype (|k| <= 127), each raw score q . k_int is multiplied by its key's
            scale in fp32, then scaled, capped and biased as above (FOLD_SCALE folds the softmax scale as before);
            each V tile is read back as v_int * v_scale in q's dtype, as the reference's dequantize_kv, before
            P V. Inference only (no dropout, no backward). A NaN or inf k scale (quantize_kv gives a vector
            holding inf or NaN a NaN scale) makes that key's scores NaN, as the reference's dequantized key does.
  sinks     (sinks: gpt-oss's attention sinks, float [H]; reference: MultiHeadAttention.attend with
            GPTConfig.attention_sinks) query head h's sink logit is one more column of each row's softmax, with
            no value, dropped after it. The forward folds it into the epilogue (_sink_fold, HAS_SINKS a
            constexpr: without sinks the kernel is as before): with m, l the row's running max and sum (base 2),
            m' = max(m, sink), l' = l 2^(m - m') + 2^(sink - m'), O = acc 2^(m - m') / l', and the stored
            L = m' + log2 l' is logaddexp2(lse, sink), so the backward kernels, which recompute P = 2^(S - L),
            need no change; Delta = rowsum(O * dO) is still rowsum(P * dP) (the sink's dP is 0), and
            d sink_h = -sum over batch and rows of 2^(sink_h - L) Delta (a [B, H, Tq] reduction in torch from
            Delta and L). The split-KV combine adds 2^(sink - m) to its sum the same way (the splits' partials
            leave the sink out), so every decode path (kv_len, paged, int8 KV) has it.
  NaN/inf   in q or k behave as in PyTorch; a NaN in v reaches the rows whose visited KV tiles
            hold it (PyTorch's P @ V spreads it to every row, 0 * NaN; exact math, to the rows
            that attend to it).

Public API: `flash_attention(q, k, v, causal=True, softmax_scale=None, dropout_p=0.0, seed=None,
doc_ids=None, window=None, softcap=None, alibi_slopes=None, kv_len=None, k_scale=None, v_scale=None,
block_table=None, *, lengths_checked=False, sinks=None)`,
`document_bounds(doc_ids)`, `window_bounds(window, Tk, ...)` and `dropout_mask(seed, B, H, Tq, Tk, p, device)`.
The kernels are registered as the custom ops `tritongpt::flash_attn_fwd` /
`tritongpt::flash_attn_bwd` (fake impls + register_autograd, which plays the role of the
autograd.Function), so torch.compile treats the attention as one opaque differentiable op
instead of tracing into Triton.
"""
import functools
import math
import os

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakIdKeyDictionary

from tritongpt._env import triton_interpreting
from tritongpt._types import is_int, is_real
from tritongpt.kernels._common import (FLOAT_DTYPES, autocast_dtype, autotuned, cast, cdiv, check_runnable,
                                       check_same_device, check_same_dtype, check_tensor, custom_op, dot,
                                       first_order_only, launch_tuned, next_pow2, no_func_transform, on_tensor_device,
                                       plain_eager, tanh)
from tritongpt.kernels._common import sm_count as _sm_count  # patched by bench/compile_check.py, tests
from tritongpt.kernels._common import cuda_has_tma as _has_tma  # patched by bench/compile_check.py
from tritongpt.kernels._common import tma_scratch, tma_strides_ok

MAX_GRID_YZ = 65535  # CUDA's limit on a grid's y and z sizes, where the heads and sequences go
SUPPORTED_HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)  # 16: tiny models, tl.dot needs K >= 16; 256: Gemma
WIDE_HEAD_DIM = 256  # from this padded head dim on, the autotuner times tiles of their own (tile_group)
LOG2E = 1.4426950408889634  # kernels work in base 2: exp(x) = exp2(x * log2(e)), exp2 is one MUFU op
FP32_MAX = 3.4028234663852886e38  # the scale reaches the kernels as an fp32 argument
# fp32's smallest normal: a folded scale (FOLD_SCALE) below it may be 0 in fp32 (or flushed to 0 on a GPU), and
# the masked raw score -inf times 0 is NaN
FP32_TINY = 1.1754943508222875e-38

KV_DTYPES = (*FLOAT_DTYPES, torch.int8)  # k and v: q's float dtype, or an int8 KV cache's values with scales

INTERPRET = triton_interpreting()
# The interpreter costs ~5 ms per program instance and would time every autotune config, so
# on CPU use one small fixed tile: enough tiles per head that block skipping and ragged edges
# are exercised by tests at lengths of a few dozen.
INTERPRET_BLOCK = 16


# ----------------------------------------------------------------------------- shared helpers
@triton.jit
def _load_rows(base, rows, n_rows, stride_row, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Load a [rows, BLOCK_D] tile; rows past n_rows and padded head-dim columns read as 0."""
    ptrs = base + rows[:, None] * stride_row + offs_d[None, :]
    mask = rows[:, None] < n_rows
    if BLOCK_D != HEAD_DIM:
        mask = mask & (offs_d[None, :] < HEAD_DIM)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _rows_desc(base, n_rows, stride_row, BLOCK_R: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """A TMA descriptor over one head's [n_rows, HEAD_DIM] rows (unit stride along D), read in [BLOCK_R, BLOCK_D]
    tiles: rows past n_rows and columns past HEAD_DIM read as 0, as _load_rows's masks give."""
    return tl.make_tensor_descriptor(base, shape=[n_rows, HEAD_DIM], strides=[stride_row, 1],
                                     block_shape=[BLOCK_R, BLOCK_D])


@triton.jit
def _rows_tile(base, start, rows, n_rows, stride_row, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               USE_TMA: tl.constexpr):
    """The tile of rows [start, start + len(rows)): through base as a _rows_desc descriptor (USE_TMA), else by
    _load_rows from base as a pointer."""
    if USE_TMA:
        tile = base.load([start, 0])
    else:
        tile = _load_rows(base, rows, n_rows, stride_row, offs_d, HEAD_DIM, BLOCK_D)
    return tile


@triton.jit
def _load_at(base, row_offsets, row_ok, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Load a [rows, BLOCK_D] tile whose rows start at base + row_offsets (a paged cache's rows lie in their pages);
    rows not row_ok and padded head-dim columns read as 0."""
    mask = row_ok[:, None]
    if BLOCK_D != HEAD_DIM:
        mask = mask & (offs_d[None, :] < HEAD_DIM)
    return tl.load(base + row_offsets[:, None] + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(base, val, rows, n_rows, stride_row, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    ptrs = base + rows[:, None] * stride_row + offs_d[None, :]
    mask = rows[:, None] < n_rows
    if BLOCK_D != HEAD_DIM:
        mask = mask & (offs_d[None, :] < HEAD_DIM)
    tl.store(ptrs, cast(val, base.dtype.element_ty), mask=mask)


@triton.jit
def _load_seed(Seed):
    """The dropout seed from its one-element int64 tensor, its low 31 bits (the seeds an int takes: a tensor's
    seed + 2^31 gives seed's mask). Read on the device: a host .item() would wait for the GPU and could not be
    captured in a CUDA graph, and a graph replayed with a new seed in the tensor draws a new mask."""
    return tl.load(Seed) & 0x7FFFFFFF


@triton.jit
def _kv_len(KV_LEN, b, stride_lb, Tq, Tk, IS_CAUSAL: tl.constexpr, HAS_KV_LEN: tl.constexpr):
    """The number of keys batch row b's forward attends over: Tk (the buffers' length), or with HAS_KV_LEN the filled
    length L of a preallocated KV cache, from the caller's integer tensor: one length for every row (stride_lb 0) or
    one a row (stride_lb 1: continuous batching, each row a request of its own length). Read on the device, as the
    seed is: a CUDA graph captured at one L replays with whatever the tensor holds then. Clamped to [Tq, Tk] with
    causal ([0, Tk] without): flash_attention checks the value on the host where that costs no sync, and a replayed
    graph given one out of range reads nothing past the K/V buffers (nor a window bound before a row's position)."""
    if HAS_KV_LEN:
        lo = Tq if IS_CAUSAL else 0
        return tl.minimum(tl.maximum(tl.load(KV_LEN + b * stride_lb), lo), Tk).to(tl.int32)
    else:
        return Tk


@triton.jit
def _dropout_keep(seed, rng_base, rows, cols, Tk, dropout_p):
    """Keep-mask for attention entries (rows, cols) of one head; rng_base = bh * Tq * Tk.

    One counter per (bh, row, col), so every kernel (forward, both backward passes,
    dropout_mask) draws the same number for the same entry, whatever its tiling.
    """
    offsets = rng_base + rows.to(tl.int64) * Tk + cols
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def _scores(q, k, qk_scale, softcap, PRECISION: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """Base-2 scores of a tile, q k * scale * log2(e), soft-capped with HAS_SOFTCAP: (c log2 e) * t,
    t = tanh(scale q k / c) (softcap is c log2 e, so scale / c = qk_scale / softcap). -> (s, t);
    backward takes the cap's slope 1 - t^2 from t (t is s itself without the cap, then unused)."""
    return _capped(dot(q, k, None, PRECISION), qk_scale, softcap, HAS_SOFTCAP)


@triton.jit
def _capped(qk, qk_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """_scores from the raw products qk: (s, t) as there."""
    if HAS_SOFTCAP:
        t = tanh(qk * (qk_scale / softcap))
        s = softcap * t
    else:
        s = qk * qk_scale
        t = s
    return s, t


@triton.jit
def _alibi_slope(ALIBI, h, HAS_ALIBI: tl.constexpr):
    """Query head h's ALiBi slope in base 2 (slope * log2 e, as the scores); 0 (unused) without ALiBi."""
    if HAS_ALIBI:
        return tl.load(ALIBI + h) * 1.4426950408889634
    else:
        return 0.0


@triton.jit
def _alibi_bias(slope, q_pos, k_pos):
    """ALiBi's bias slope * (j - i) for query position i and key position j (<= 0 where causal)."""
    return slope * (k_pos - q_pos).to(tl.float32)


# ----------------------------------------------------------------------------- forward
@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, ks_base, vs_base, stride_kn, stride_vn, offs_m, offs_d, q_start,
               lo, hi, Tq, Tk, qk_scale, softcap, slope, seed, rng_base, dropout_p, keep_scale,
               table_row, stride_kp, stride_vp, stride_sp,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
               MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
               HAS_DOCS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
               PRECISION: tl.constexpr, EMPTY_ROWS: tl.constexpr, FOLD_SCALE: tl.constexpr,
               INT8_KV: tl.constexpr, PAGE: tl.constexpr, USE_TMA: tl.constexpr = False):
    """Stream KV tiles [lo, hi) past one query tile (online softmax, base-2 logits). EMPTY_ROWS: a row
    may have seen no finite score so far (documents; a KV split the causal mask hides from some rows; a
    tile whose scores are all -inf for a row, from a -inf key component). FOLD_SCALE (qk_scale a positive
    normal fp32, no cap, no ALiBi): s holds the raw products q k; the row max is taken on them and scaled
    once a row (exact: rounding is monotone for a positive factor), and exp2 takes s * scale - max as one
    FMA, so the scaled tile is never made: one multiply an entry less in the loop whose exp2s, not its
    matmuls, bound a head dim of 64 (FlashAttention-3's finding on Hopper).
    INT8_KV: k and v are an int8 cache's values, ks_base and vs_base their per-position fp32 scales (unit stride):
    the int8 keys convert exactly to q's dtype, the tile's raw products q k_int are multiplied by each column's
    k scale (in fp32, before the softmax scale, the cap, or FOLD_SCALE's fold), and the V tile is read back as
    v_int * v scale in q's dtype (the reference's dequantize_kv) before the dot with p.
    PAGE > 0 (a paged KV cache, flash_attention's block_table): key position n of this row lies in page
    table_row[n // PAGE] at slot n % PAGE, the pages stride_kp / stride_vp / stride_sp (scales) apart; each tile
    reads its columns' page numbers first (one small load a tile), so pages of any size and order serve.
    USE_TMA (_attn_fwd's): k_base and v_base are tensor descriptors over this head's [Tk, HEAD_DIM] keys and values
    (Hopper's TMA copies each tile into shared memory; rows past Tk and columns past HEAD_DIM read as 0, as the
    masked loads give)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if PAGE > 0:
            page = tl.load(table_row + offs_n // PAGE, mask=offs_n < Tk, other=0).to(tl.int64)
            slot = offs_n % PAGE
            k = _load_at(k_base, page * stride_kp + slot * stride_kn, offs_n < Tk, offs_d, HEAD_DIM, BLOCK_D)
        else:
            k = _rows_tile(k_base, start_n, offs_n, Tk, stride_kn, offs_d, HEAD_DIM, BLOCK_D, USE_TMA)
        if INT8_KV:
            # exact (|k| <= 127); through fp32, as Triton's interpreter turns int8 -> bf16 into garbage
            k = k.to(tl.float32).to(q.dtype)
            if PAGE > 0:
                k_sc = tl.load(ks_base + page * stride_sp + slot, mask=offs_n < Tk, other=0.0)
            else:
                k_sc = tl.load(ks_base + offs_n, mask=offs_n < Tk, other=0.0)
            # an inf scale reads as NaN, as the reference's k_int * inf (inf, or NaN at a 0) makes the key's scores
            # NaN: (q . k_int) * inf would be a clean -inf for a row whose dot is negative, the key silently dropped
            k_sc = tl.where(tl.abs(k_sc) < float("inf"), k_sc, float("nan"))
            if FOLD_SCALE:
                s = dot(q, tl.trans(k), None, PRECISION) * k_sc[None, :]
            else:
                s, _ = _capped(dot(q, tl.trans(k), None, PRECISION) * k_sc[None, :], qk_scale, softcap, HAS_SOFTCAP)
        elif FOLD_SCALE:
            s = dot(q, tl.trans(k), None, PRECISION)
        else:
            s, _ = _scores(q, tl.trans(k), qk_scale, softcap, PRECISION, HAS_SOFTCAP)
        if HAS_ALIBI:  # after the cap, at query i's position Tk - Tq + i (a decode row sees its own bias)
            s += _alibi_bias(slope, offs_m[:, None] + (Tk - Tq), offs_n[None, :])
        # masked after the cap: a masked score is -inf whatever the cap
        if MASKED:  # only tiles on the diagonal, the ragged end of K or a document start pay for this
            valid = offs_n[None, :] < Tk
            if IS_CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None] + (Tk - Tq))
            if HAS_DOCS:
                valid = valid & (offs_n[None, :] >= q_start[:, None])
            s = tl.where(valid, s, float("-inf"))
        if FOLD_SCALE:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
        if EMPTY_ROWS:
            # A row with no finite score yet (its document starts past this tile, a split the causal mask
            # hides, a tile of -inf scores): its max stays -inf and the exponentials take 0 as their base
            # (exp2(-inf - -inf) would be NaN).
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        alpha = tl.exp2(m_i - m_use)
        if FOLD_SCALE:
            p = tl.exp2(s * qk_scale - m_use[:, None])
        else:
            p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)  # the softmax denominator counts dropped entries too
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rng_base, offs_m[:, None], offs_n[None, :], Tk, dropout_p)
            p = tl.where(keep, p * keep_scale, 0.0)
        if PAGE > 0:
            v = _load_at(v_base, page * stride_vp + slot * stride_vn, offs_n < Tk, offs_d, HEAD_DIM, BLOCK_D)
        else:
            v = _rows_tile(v_base, start_n, offs_n, Tk, stride_vn, offs_d, HEAD_DIM, BLOCK_D, USE_TMA)
        if INT8_KV:
            if PAGE > 0:
                v_sc = tl.load(vs_base + page * stride_sp + slot, mask=offs_n < Tk, other=0.0)
            else:
                v_sc = tl.load(vs_base + offs_n, mask=offs_n < Tk, other=0.0)
            # cast, not .to: the interpreter's .to truncates into bf16, dequantize_kv rounds to nearest even
            v = cast(v.to(tl.float32) * v_sc[:, None], q.dtype)
        acc = dot(cast(p, v.dtype), v, acc, PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _kv_tile_range(start_m, Tq, Tk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """Which KV tiles a query tile starting at start_m visits (forward and dQ alike).

    Tiles [0, full_hi) are fully visible to every row of the query tile: no mask at all.
    Tiles [full_hi, hi) straddle the causal diagonal (bottom-right aligned: row i sees keys
    <= i + Tk - Tq) or the ragged end of K. Tiles from hi on are never visited.
    """
    if IS_CAUSAL:
        hi = tl.minimum(Tk, start_m + BLOCK_M + (Tk - Tq))
        full_hi = tl.minimum((start_m + (Tk - Tq) + 1) // BLOCK_N * BLOCK_N, Tk // BLOCK_N * BLOCK_N)
    else:
        hi = Tk
        full_hi = Tk // BLOCK_N * BLOCK_N
    return full_hi, hi


@triton.jit
def _doc_tile_range(starts, offs_m, Tq, Tk, full_hi, BLOCK_N: tl.constexpr):
    """Documents (forward and dQ): row i of the query tile sees keys from its document's start,
    starts[Tk - Tq + i], on. -> (the rows' starts, lo, mid): KV tiles before lo hold no key any
    row sees (skipped); [lo, mid) hold a document start of some row (masked); from mid on, every
    row sees every key its causal range allows. lo <= mid <= full_hi."""
    q_start = tl.load(starts + (Tk - Tq) + offs_m, mask=offs_m < Tq, other=0)
    lo = tl.min(tl.where(offs_m < Tq, q_start, Tk), 0) // BLOCK_N * BLOCK_N
    mid = tl.minimum(tl.maximum(tl.cdiv(tl.max(q_start, 0), BLOCK_N) * BLOCK_N, lo), full_hi)
    return q_start, tl.minimum(lo, full_hi), mid


@triton.jit(do_not_specialize=["H"])
def _attn_fwd(Q, K, V, O, LSE, STARTS, ALIBI, Seed, KV_LEN, K_SCALE, V_SCALE, TABLE, SINKS, qk_scale, softcap,
              dropout_p, keep_scale, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om, stride_sb, stride_scb, stride_sch,
              stride_lb, stride_tb, H, GROUP, Tq, Tk, Q_BUCKET, TMA_OK,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_DOCS: tl.constexpr,
              HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, PRECISION: tl.constexpr,
              FOLD_SCALE: tl.constexpr, HAS_KV_LEN: tl.constexpr, INT8_KV: tl.constexpr, PAGE: tl.constexpr,
              HAS_SINKS: tl.constexpr, USE_TMA: tl.constexpr):
    """Grid (cdiv(Tq, BLOCK_M), H, B). Writes O and the base-2 logsumexp of the scaled (with HAS_SOFTCAP,
    capped) scores. Query head h reads KV head h // GROUP (GROUP = H / Hkv query heads share one).
    FOLD_SCALE: the scale folded into exp2's FMA (_fwd_inner); the launcher sets it for a positive scale
    without a cap or ALiBi whose qk_scale is an fp32 normal (a 0 or flushed one times a masked -inf is NaN).
    HAS_KV_LEN: K and V are a cache of Tk positions of which the first KV_LEN hold keys (_kv_len): that length
    stands for Tk everywhere below (masks, tile ranges, the causal offset, ALiBi and window positions).
    INT8_KV: K and V are int8 (an int8 KV cache), K_SCALE and V_SCALE their fp32 scales [B, Hkv, Tk] (row strides
    stride_scb, stride_sch; unit along Tk): each score is (q . k_int) * k_scale[col], then scaled as above, and each
    V tile is read as v_int * v_scale[row] in Q's dtype (_fwd_inner). Inference only: no dropout, no backward.
    PAGE > 0: K and V (and their scales) are pools of pages [pages, Hkv, PAGE, D], row b's positions in the pages
    TABLE[b, :] names (a paged KV cache; _fwd_inner), stride_kb / stride_vb / stride_scb the pages' strides.
    USE_TMA (a config autotune may pick where the launcher found K and V readable by TMA: TMA_OK, in the key):
    the K and V tiles come through tensor descriptors over this head's rows, not masked pointer loads.
    HAS_SINKS: SINKS [H] holds each query head's sink logit, folded into the epilogue (_sink_fold)."""
    tl.static_assert(not (USE_TMA and (PAGE > 0 or INT8_KV or HAS_KV_LEN)), "USE_TMA: a plain K and V")
    tl.static_assert(not (FOLD_SCALE and (HAS_SOFTCAP or HAS_ALIBI)), "FOLD_SCALE: the scores must be q k * scale")
    tl.static_assert(not (PAGE > 0 and not HAS_KV_LEN), "PAGE: a paged cache has its lengths (KV_LEN)")
    tl.static_assert(not (INT8_KV and HAS_DROPOUT), "INT8_KV: inference only")
    tl.static_assert(not (HAS_KV_LEN and HAS_DROPOUT), "KV_LEN: inference only (the dropout counter follows Tk)")
    start_m = tl.program_id(0) * BLOCK_M
    h, b = tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    Tk = _kv_len(KV_LEN, b, stride_lb, Tq, Tk, IS_CAUSAL, HAS_KV_LEN)
    bh = b * H + h
    kb = b
    if PAGE > 0:  # paged: the pages, not the row, say where a row's keys are
        kb = b * 0
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + kb * stride_kb + (h // GROUP) * stride_kh
    v_base = V + kb * stride_vb + (h // GROUP) * stride_vh
    o_base = O + b * stride_ob + h * stride_oh
    ks_base = K_SCALE + kb * stride_scb + (h // GROUP) * stride_sch
    vs_base = V_SCALE + kb * stride_scb + (h // GROUP) * stride_sch
    table_row = TABLE + b * stride_tb
    rng_base = bh.to(tl.int64) * Tq * Tk
    seed = _load_seed(Seed) if HAS_DROPOUT else 0  # without dropout Seed is a stand-in, never read
    slope = _alibi_slope(ALIBI, h, HAS_ALIBI)
    if USE_TMA:  # from here on k_base / v_base are descriptors (_fwd_inner loads their tiles)
        k_base = _rows_desc(k_base, Tk, stride_kn, BLOCK_N, HEAD_DIM, BLOCK_D)
        v_base = _rows_desc(v_base, Tk, stride_vn, BLOCK_N, HEAD_DIM, BLOCK_D)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(q_base, offs_m, Tq, stride_qm, offs_d, HEAD_DIM, BLOCK_D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # Column 0 is visible to every row, but its tile's scores may all be -inf for a row (a -inf key component):
    # EMPTY_ROWS everywhere (a [BLOCK_M] where a tile), so such a row's max stays -inf without exp2(-inf - -inf).
    full_hi, hi = _kv_tile_range(start_m, Tq, Tk, BLOCK_M, BLOCK_N, IS_CAUSAL)
    if HAS_DOCS:  # KV tiles before the first row's document are skipped; [lo, mid) straddle a start
        q_start, lo, mid = _doc_tile_range(STARTS + b * stride_sb, offs_m, Tq, Tk, full_hi, BLOCK_N)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, ks_base, vs_base, stride_kn, stride_vn,
                                   offs_m, offs_d,
                                   q_start, lo, mid, Tq, Tk, qk_scale, softcap, slope, seed, rng_base, dropout_p,
                                   keep_scale, table_row, stride_kb, stride_vb, stride_scb,
                                   HEAD_DIM, BLOCK_D, BLOCK_N, True, IS_CAUSAL, HAS_DROPOUT, HAS_DOCS,
                                   HAS_SOFTCAP, HAS_ALIBI, PRECISION, HAS_DOCS,
                                   FOLD_SCALE, INT8_KV, PAGE, USE_TMA)
    else:
        q_start, mid = offs_m, 0
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, ks_base, vs_base, stride_kn, stride_vn, offs_m,
                               offs_d, q_start, mid, full_hi, Tq, Tk, qk_scale, softcap, slope, seed, rng_base,
                               dropout_p, keep_scale, table_row, stride_kb, stride_vb, stride_scb,
                               HEAD_DIM, BLOCK_D, BLOCK_N, False, IS_CAUSAL, HAS_DROPOUT,
                               HAS_DOCS, HAS_SOFTCAP, HAS_ALIBI, PRECISION, True, FOLD_SCALE, INT8_KV, PAGE, USE_TMA)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, ks_base, vs_base, stride_kn, stride_vn, offs_m,
                               offs_d, q_start, full_hi, hi, Tq, Tk, qk_scale, softcap, slope, seed, rng_base,
                               dropout_p, keep_scale, table_row, stride_kb, stride_vb, stride_scb,
                               HEAD_DIM, BLOCK_D, BLOCK_N, True, IS_CAUSAL, HAS_DROPOUT,
                               HAS_DOCS, HAS_SOFTCAP, HAS_ALIBI, PRECISION, True, FOLD_SCALE, INT8_KV, PAGE, USE_TMA)

    if HAS_SINKS:
        acc, l_i, m_i = _sink_fold(acc, l_i, m_i, tl.load(SINKS + h).to(tl.float32) * 1.4426950408889634)
    acc = acc / l_i[:, None]
    _store_rows(o_base, acc, offs_m, Tq, stride_om, offs_d, HEAD_DIM, BLOCK_D)
    tl.store(LSE + bh.to(tl.int64) * Tq + offs_m, m_i + tl.log2(l_i), mask=offs_m < Tq)


@triton.jit
def _sink_fold(acc, l_i, m_i, sink):
    """An attention sink (gpt-oss): one more column of every row's softmax, of logit `sink` (base 2, the scores'
    domain) and with no value, so it joins the row sum l and not the accumulator: O = acc / (l + 2^(sink - m)),
    and the row's logsumexp m + log2(l) then includes it, the L the backward recomputes P from. The running max
    is raised to the sink's first (acc and l rescaled as _fwd_inner does), so a sink far above every score does
    not overflow the sum. A row that saw no key (m = -inf) gets l = 1 at the sink and acc = 0: O = 0, as the
    reference's softmax puts all of the row on the sink."""
    m_new = tl.maximum(m_i, sink)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a -inf sink over a row of no key: no exp2(-inf - -inf)
    alpha = tl.exp2(m_i - m_use)
    return acc * alpha[:, None], l_i * alpha + tl.exp2(sink - m_use), m_new


@triton.jit(do_not_specialize=["H", "NUM_SPLITS"])  # the split count follows Tk: one binary for every count
def _attn_fwd_split(Q, K, V, O_PART, LSE_PART, STARTS, ALIBI, KV_LEN, K_SCALE, V_SCALE, TABLE, qk_scale, softcap,
                    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                    stride_vb, stride_vh, stride_vn, stride_sb, stride_scb, stride_sch, stride_lb, stride_tb,
                    H, GROUP, Tq, Tk, Q_BUCKET, NUM_SPLITS,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    IS_CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                    HAS_ALIBI: tl.constexpr, PRECISION: tl.constexpr, PACK_GQA: tl.constexpr,
                    HAS_KV_LEN: tl.constexpr, INT8_KV: tl.constexpr, PAGE: tl.constexpr):
    """Split-KV forward (flash-decoding), grid (NUM_SPLITS * cdiv(rows, BLOCK_M), heads, B): program
    (tile, split) runs _attn_fwd's loop over the split-th of the KV tiles its query tile visits
    (whole BLOCK_N tiles, the same masks), then writes that split's normalized output O_s (fp32,
    O_PART [B, H, NUM_SPLITS, Tq, D]) and the base-2 logsumexp of its scores (LSE_PART
    [B, H, NUM_SPLITS, Tq]). _attn_fwd_combine merges the splits. No dropout (decode never has it).
    Rows, heads: Tq and H; with PACK_GQA, GROUP * Tq and Hkv: a tile's row g * Tq + i is query i of
    query head kv_h * GROUP + g, so the GROUP heads that read one KV head share its K/V tiles (a
    decode step's tile holds GROUP real rows, not one) and each row has its own head (ALiBi slope).
    A row may see no key of its split (the causal mask hides the last keys from the earlier rows of
    a chunk; a split past the visited tiles is empty; its keys' scores may all be -inf): its max stays
    -inf, it stores O_s = 0 and lse_s = -inf, which weigh 0 in the combine.
    HAS_KV_LEN: the first KV_LEN of Tk cached positions hold keys, as in _attn_fwd; the splits share the tiles of
    that length (NUM_SPLITS and the grid follow the cache's Tk, so one launch serves every length).
    INT8_KV: int8 K and V with their fp32 scales K_SCALE, V_SCALE [B, Hkv, Tk], folded in as _attn_fwd does.
    PAGE > 0: a paged cache, read through TABLE as _attn_fwd does."""
    pid = tl.program_id(0)
    split = pid % NUM_SPLITS
    start_m = (pid // NUM_SPLITS) * BLOCK_M
    hp, b = tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    Tk = _kv_len(KV_LEN, b, stride_lb, Tq, Tk, IS_CAUSAL, HAS_KV_LEN)
    kb = b
    if PAGE > 0:  # paged: the pages, not the row, say where a row's keys are
        kb = b * 0
    table_row = TABLE + b * stride_tb
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    if PACK_GQA:
        live = rows < GROUP * Tq
        head = hp * GROUP + rows // Tq
        # a row past GROUP * Tq (dropped at the store) takes the last position, whose document start is the
        # latest: it moves no tile bound of the live rows (lo is their earliest start)
        offs_m = tl.where(live, rows % Tq, Tq - 1)
        k_base = K + kb * stride_kb + hp * stride_kh
        v_base = V + kb * stride_vb + hp * stride_vh
        ks_base = K_SCALE + kb * stride_scb + hp * stride_sch
        vs_base = V_SCALE + kb * stride_scb + hp * stride_sch
        first = tl.min(tl.where(live, offs_m, Tq), 0)
        end = tl.max(tl.where(live, offs_m, 0), 0) + 1
    else:
        live = rows < Tq
        head = hp + tl.zeros([BLOCK_M], tl.int64)
        offs_m = rows
        k_base = K + kb * stride_kb + (hp // GROUP) * stride_kh
        v_base = V + kb * stride_vb + (hp // GROUP) * stride_vh
        ks_base = K_SCALE + kb * stride_scb + (hp // GROUP) * stride_sch
        vs_base = V_SCALE + kb * stride_scb + (hp // GROUP) * stride_sch
        first = start_m
        end = start_m + BLOCK_M
    if HAS_ALIBI:  # base 2, one a row; a packed row past GROUP * Tq has no head (past the [H] slopes)
        slope = (tl.load(ALIBI + head, mask=live, other=0.0) * 1.4426950408889634)[:, None]
    else:
        slope = 0.0
    row_ok = live[:, None]
    if BLOCK_D != HEAD_DIM:
        row_ok = row_ok & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # _kv_tile_range's bounds for query positions [first, end)
    if IS_CAUSAL:
        hi = tl.minimum(Tk, end + (Tk - Tq))
        full_hi = tl.minimum((first + (Tk - Tq) + 1) // BLOCK_N * BLOCK_N, Tk // BLOCK_N * BLOCK_N)
    else:
        hi = Tk
        full_hi = Tk // BLOCK_N * BLOCK_N
    if HAS_DOCS:
        q_start, lo, mid = _doc_tile_range(STARTS + b * stride_sb, offs_m, Tq, Tk, full_hi, BLOCK_N)
    else:
        q_start, lo, mid = offs_m, 0, 0
    # This split's share of the visited tiles [lo, hi): the same number of whole tiles each (lo is
    # a multiple of BLOCK_N), so each of _attn_fwd's three ranges is cut at tile boundaries. Every
    # range takes EMPTY_ROWS, the unmasked one too: a split may start on a tile whose scores are all
    # -inf for a row (a key with a -inf component), where the single pass already holds a finite max.
    per_split = tl.cdiv(tl.cdiv(hi - lo, BLOCK_N), NUM_SPLITS) * BLOCK_N
    s_lo = lo + split * per_split
    s_hi = tl.minimum(s_lo + per_split, hi)
    if HAS_DOCS:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, ks_base, vs_base, stride_kn, stride_vn,
                                   offs_m, offs_d, q_start, s_lo, tl.minimum(mid, s_hi), Tq, Tk, qk_scale, softcap,
                                   slope, 0, 0, 0.0, 1.0, table_row, stride_kb, stride_vb, stride_scb,
                                   HEAD_DIM, BLOCK_D, BLOCK_N, True, IS_CAUSAL, False,
                                   HAS_DOCS, HAS_SOFTCAP, HAS_ALIBI, PRECISION, True, False, INT8_KV, PAGE)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, ks_base, vs_base, stride_kn, stride_vn, offs_m,
                               offs_d, q_start, tl.maximum(mid, s_lo), tl.minimum(full_hi, s_hi), Tq, Tk, qk_scale,
                               softcap, slope, 0, 0, 0.0, 1.0, table_row, stride_kb, stride_vb, stride_scb,
                               HEAD_DIM, BLOCK_D, BLOCK_N, False, IS_CAUSAL, False,
                               HAS_DOCS, HAS_SOFTCAP, HAS_ALIBI, PRECISION, True, False, INT8_KV, PAGE)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, ks_base, vs_base, stride_kn, stride_vn, offs_m,
                               offs_d, q_start, tl.maximum(full_hi, s_lo), s_hi, Tq, Tk, qk_scale, softcap, slope, 0,
                               0, 0.0, 1.0, table_row, stride_kb, stride_vb, stride_scb,
                               HEAD_DIM, BLOCK_D, BLOCK_N, True, IS_CAUSAL, False, HAS_DOCS,
                               HAS_SOFTCAP, HAS_ALIBI, PRECISION, True, False, INT8_KV, PAGE)

    empty = l_i == 0.0  # only where the split showed the row no key
    l_i = tl.where(empty, 1.0, l_i)
    part_row = ((b * H + head) * NUM_SPLITS + split) * Tq + offs_m  # each row's place in the partials
    tl.store(O_PART + part_row[:, None] * HEAD_DIM + offs_d[None, :], acc / l_i[:, None], mask=row_ok)
    tl.store(LSE_PART + part_row, tl.where(empty, float("-inf"), m_i + tl.log2(l_i)), mask=live)


@triton.jit(do_not_specialize=["H", "NUM_SPLITS"])
def _attn_fwd_combine(O_PART, LSE_PART, O, LSE, SINKS, stride_ob, stride_oh, stride_om, H, Tq, NUM_SPLITS,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                      HAS_SINKS: tl.constexpr):
    """Grid (cdiv(Tq, BLOCK_M), H, B). Merges _attn_fwd_split's partials of BLOCK_M query rows:
    lse = log2 sum_s 2^lse_s, O = sum_s 2^(lse_s - lse) O_s (each O_s normalized by its own row
    sum, so its weight is that split's share of the whole row sum). Two passes over the splits:
    the max of the lse_s first, so no 2^lse_s overflows; then the weighted sum.
    HAS_SINKS: head h's sink logit SINKS[h] is one more term of the sum, of weight 2^(sink - m) and no value (the
    splits' partials leave it out: it is a column of the whole row, not of any split's keys), so O and the stored
    lse come out as _attn_fwd's _sink_fold gives them."""
    start_m = tl.program_id(0) * BLOCK_M
    h, b = tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    part = (b * H + h) * NUM_SPLITS * Tq
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for s in range(0, NUM_SPLITS):
        m = tl.maximum(m, tl.load(LSE_PART + part + s * Tq + offs_m, mask=offs_m < Tq, other=float("-inf")))
    if HAS_SINKS:
        sink = tl.load(SINKS + h).to(tl.float32) * 1.4426950408889634
        m = tl.maximum(m, sink)
    m = tl.where(m == float("-inf"), 0.0, m)  # rows past Tq: no split has any of them (l stays 0)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for s in range(0, NUM_SPLITS):
        w = tl.exp2(tl.load(LSE_PART + part + s * Tq + offs_m, mask=offs_m < Tq, other=float("-inf")) - m)
        o_s = _load_rows(O_PART + (part + s * Tq) * HEAD_DIM, offs_m, Tq, HEAD_DIM, offs_d, HEAD_DIM, BLOCK_D)
        acc += w[:, None] * o_s
        l += w
    if HAS_SINKS:
        l += tl.exp2(sink - m)
    l = tl.where(offs_m < Tq, l, 1.0)
    _store_rows(O + b * stride_ob + h * stride_oh, acc / l[:, None], offs_m, Tq, stride_om, offs_d, HEAD_DIM,
                BLOCK_D)
    tl.store(LSE + (b * H + h) * Tq + offs_m, m + tl.log2(l), mask=offs_m < Tq)

# ----------------------------------------------------------------------------- backward
@triton.jit(do_not_specialize=["H"])
def _attn_bwd_preprocess(O, DO, Delta, stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom,
                         H, Tq, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Grid (cdiv(Tq, BLOCK_M), H, B). Delta_i = sum_d O_id * dO_id (= rowsum(P * dP)), in fp32."""
    start_m = tl.program_id(0) * BLOCK_M
    h, b = tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    bh = b * H + h
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(O + b * stride_ob + h * stride_oh, offs_m, Tq, stride_om, offs_d, HEAD_DIM, BLOCK_D)
    do = _load_rows(DO + b * stride_dob + h * stride_doh, offs_m, Tq, stride_dom, offs_d, HEAD_DIM, BLOCK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + bh.to(tl.int64) * Tq + offs_m, delta, mask=offs_m < Tq)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_ptr, delta_ptr, starts, stride_qm, stride_dom,
                    offs_n, offs_d, lo, hi, Tq, Tk, qk_scale, softcap, slope, seed, rng_base, dropout_p, keep_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    MASKED: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_DOCS: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, PRECISION: tl.constexpr,
                    USE_TMA: tl.constexpr):
    """Stream query tiles [lo, hi) past one key tile; work in the transposed [BLOCK_N, BLOCK_M] frame.
    USE_TMA: q_base and do_base are descriptors over the query head's [Tq, HEAD_DIM] rows (_attn_bwd_dkdv)."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _rows_tile(q_base, start_m, offs_m, Tq, stride_qm, offs_d, HEAD_DIM, BLOCK_D, USE_TMA)
        do = _rows_tile(do_base, start_m, offs_m, Tq, stride_dom, offs_d, HEAD_DIM, BLOCK_D, USE_TMA)
        # Rows past Tq load q = dO = 0, L = Delta = 0: their P is finite and their dS is 0.
        lse = tl.load(lse_ptr + offs_m, mask=offs_m < Tq, other=0.0)
        delta = tl.load(delta_ptr + offs_m, mask=offs_m < Tq, other=0.0)
        s_t, t_t = _scores(k, tl.trans(q), qk_scale, softcap, PRECISION, HAS_SOFTCAP)
        if HAS_ALIBI:  # a constant: P is recomputed with it, dS is unchanged
            s_t += _alibi_bias(slope, offs_m[None, :] + (Tk - Tq), offs_n[:, None])
        p_t = tl.exp2(s_t - lse[None, :])
        if MASKED:  # causal diagonal or document-end tiles only (loop bounds guarantee IS_CAUSAL here)
            visible = offs_n[:, None] <= offs_m[None, :] + (Tk - Tq)
            if HAS_DOCS:
                q_start = tl.load(starts + (Tk - Tq) + offs_m, mask=offs_m < Tq, other=0)
                visible = visible & (offs_n[:, None] >= q_start[None, :])
            p_t = tl.where(visible, p_t, 0.0)
        dp_t = dot(v, tl.trans(do), None, PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rng_base, offs_m[None, :], offs_n[:, None], Tk, dropout_p)
            pd_t = tl.where(keep, p_t * keep_scale, 0.0)
            dp_t = tl.where(keep, dp_t * keep_scale, 0.0)
        else:
            pd_t = p_t
        dv = dot(cast(pd_t, do.dtype), do, dv, PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])  # the gradient of the capped score
        if HAS_SOFTCAP:
            ds_t = ds_t * (1.0 - t_t * t_t)  # through the cap: d(c tanh(x / c))/dx
        dk = dot(cast(ds_t, q.dtype), q, dk, PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["H"])
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, Delta, STARTS, ENDS, ALIBI, Seed, qk_scale, softcap, sm_scale, dropout_p,
                   keep_scale, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom, stride_sb,
                   stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                   H, GROUP, Tq, Tk, Q_BUCKET, TMA_OK,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_DOCS: tl.constexpr,
                   HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, PRECISION: tl.constexpr,
                   USE_TMA: tl.constexpr):
    """Grid (cdiv(Tk, BLOCK_N), Hkv, B). dV = P'^T dO, dK = scale * dS^T Q for one key tile of KV
    head kv_h, summed over the GROUP query heads that read it (kv_h * GROUP + g). USE_TMA (where the launcher
    found Q and dO readable by TMA: TMA_OK, in the key): their streamed tiles come through descriptors."""
    start_n = tl.program_id(0) * BLOCK_N
    kv_h, b = tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K + b * stride_kb + kv_h * stride_kh, offs_n, Tk, stride_kn, offs_d, HEAD_DIM, BLOCK_D)
    v = _load_rows(V + b * stride_vb + kv_h * stride_vh, offs_n, Tk, stride_vn, offs_d, HEAD_DIM, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # Causal: query rows before start_n - (Tk - Tq) never see this tile (skipped); rows from
    # full_lo on see all of it (no mask); the tiles between straddle the diagonal.
    # Keys past Tk load as 0 and their dK/dV rows are never stored, so they need no mask.
    if IS_CAUSAL:
        lo = tl.maximum(start_n - (Tk - Tq), 0) // BLOCK_M * BLOCK_M
        full_lo = tl.minimum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - (Tk - Tq), 0), BLOCK_M) * BLOCK_M,
                             tl.cdiv(Tq, BLOCK_M) * BLOCK_M)
    else:
        lo = 0
        full_lo = 0
    seed = _load_seed(Seed) if HAS_DROPOUT else 0  # without dropout Seed is a stand-in, never read
    starts = STARTS + b * stride_sb
    if HAS_DOCS:
        # Documents: query row i sees key j only while j >= starts[i], i.e. before j's document
        # ends: rows from ends[j] - (Tk - Tq) on never see key j. Query tiles past the tile's last
        # end are skipped; rows before its first end see all of it (no document mask).
        k_end = tl.load(ENDS + b * stride_sb + offs_n, mask=offs_n < Tk, other=0)
        # (clamped at 0 before dividing: a document may end before the first query row)
        hi = tl.minimum(tl.cdiv(tl.maximum(tl.max(k_end, 0) - (Tk - Tq), 0), BLOCK_M) * BLOCK_M,
                        tl.cdiv(Tq, BLOCK_M) * BLOCK_M)
        first_end = tl.maximum(tl.min(tl.where(offs_n < Tk, k_end, Tk), 0) - (Tk - Tq), 0)
        full_lo = tl.minimum(full_lo, hi)
        full_hi = tl.minimum(tl.maximum(first_end // BLOCK_M * BLOCK_M, full_lo), hi)
    else:
        hi = Tq
        full_hi = Tq
    # The query heads of the group one after the other, into the same registers: their masks and
    # so the tile ranges above are the same, only Q, dO, L, Delta and the dropout counters differ.
    for g in range(0, GROUP):
        bh = b * H + kv_h * GROUP + g
        q_base = Q + b * stride_qb + (kv_h * GROUP + g) * stride_qh
        do_base = DO + b * stride_dob + (kv_h * GROUP + g) * stride_doh
        if USE_TMA:  # (fresh names: a loop body must not change a name's type)
            q_src = _rows_desc(q_base, Tq, stride_qm, BLOCK_M, HEAD_DIM, BLOCK_D)
            do_src = _rows_desc(do_base, Tq, stride_dom, BLOCK_M, HEAD_DIM, BLOCK_D)
        else:
            q_src = q_base
            do_src = do_base
        lse_ptr = LSE + bh * Tq
        delta_ptr = Delta + bh * Tq
        rng_base = bh * Tq * Tk
        slope = _alibi_slope(ALIBI, kv_h * GROUP + g, HAS_ALIBI)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_src, do_src, lse_ptr, delta_ptr, starts, stride_qm, stride_dom,
                                 offs_n, offs_d, lo, full_lo, Tq, Tk, qk_scale, softcap, slope, seed, rng_base,
                                 dropout_p, keep_scale, HEAD_DIM, BLOCK_D, BLOCK_M, True, HAS_DROPOUT, HAS_DOCS,
                                 HAS_SOFTCAP, HAS_ALIBI, PRECISION, USE_TMA)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_src, do_src, lse_ptr, delta_ptr, starts, stride_qm, stride_dom,
                                 offs_n, offs_d, full_lo, full_hi, Tq, Tk, qk_scale, softcap, slope, seed,
                                 rng_base, dropout_p, keep_scale, HEAD_DIM, BLOCK_D, BLOCK_M, False, HAS_DROPOUT,
                                 HAS_DOCS, HAS_SOFTCAP, HAS_ALIBI, PRECISION, USE_TMA)
        if HAS_DOCS:
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_src, do_src, lse_ptr, delta_ptr, starts, stride_qm,
                                     stride_dom, offs_n, offs_d, full_hi, hi, Tq, Tk, qk_scale, softcap, slope,
                                     seed, rng_base, dropout_p, keep_scale, HEAD_DIM, BLOCK_D, BLOCK_M, True,
                                     HAS_DROPOUT, HAS_DOCS, HAS_SOFTCAP, HAS_ALIBI, PRECISION, USE_TMA)

    _store_rows(DK + b * stride_dkb + kv_h * stride_dkh, dk * sm_scale, offs_n, Tk, stride_dkn, offs_d,
                HEAD_DIM, BLOCK_D)
    _store_rows(DV + b * stride_dvb + kv_h * stride_dvh, dv, offs_n, Tk, stride_dvn, offs_d, HEAD_DIM, BLOCK_D)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, q_start,
                  lo, hi, Tq, Tk, qk_scale, softcap, slope, seed, rng_base, dropout_p, keep_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                  HAS_DOCS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                  PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    """Stream KV tiles [lo, hi) past one query tile, accumulating dS K. USE_TMA: k_base and v_base are
    descriptors over the KV head's [Tk, HEAD_DIM] rows (_attn_bwd_dq)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _rows_tile(k_base, start_n, offs_n, Tk, stride_kn, offs_d, HEAD_DIM, BLOCK_D, USE_TMA)
        v = _rows_tile(v_base, start_n, offs_n, Tk, stride_vn, offs_d, HEAD_DIM, BLOCK_D, USE_TMA)
        s, t = _scores(q, tl.trans(k), qk_scale, softcap, PRECISION, HAS_SOFTCAP)
        if HAS_ALIBI:
            s += _alibi_bias(slope, offs_m[:, None] + (Tk - Tq), offs_n[None, :])
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            valid = offs_n[None, :] < Tk
            if IS_CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None] + (Tk - Tq))
            if HAS_DOCS:
                valid = valid & (offs_n[None, :] >= q_start[:, None])
            p = tl.where(valid, p, 0.0)
        dp = dot(do, tl.trans(v), None, PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rng_base, offs_m[:, None], offs_n[None, :], Tk, dropout_p)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = dot(cast(ds, k.dtype), k, dq, PRECISION)
    return dq


@triton.jit(do_not_specialize=["H"])
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, Delta, STARTS, ENDS, ALIBI, Seed, qk_scale, softcap, sm_scale, dropout_p,
                 keep_scale, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom, stride_sb,
                 stride_dqb, stride_dqh, stride_dqm,
                 H, GROUP, Tq, Tk, Q_BUCKET, TMA_OK,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_DOCS: tl.constexpr,
                 HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, PRECISION: tl.constexpr,
                 USE_TMA: tl.constexpr):
    """Grid (cdiv(Tq, BLOCK_M), H, B). dQ = scale * dS K for one query tile; same KV skipping as forward.
    USE_TMA (TMA_OK, in the key): the K and V tiles come through descriptors, as in forward."""
    start_m = tl.program_id(0) * BLOCK_M
    h, b = tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    bh = b * H + h
    k_base = K + b * stride_kb + (h // GROUP) * stride_kh  # query head h reads KV head h // GROUP
    v_base = V + b * stride_vb + (h // GROUP) * stride_vh
    rng_base = bh.to(tl.int64) * Tq * Tk
    seed = _load_seed(Seed) if HAS_DROPOUT else 0  # without dropout Seed is a stand-in, never read
    slope = _alibi_slope(ALIBI, h, HAS_ALIBI)
    if USE_TMA:
        k_base = _rows_desc(k_base, Tk, stride_kn, BLOCK_N, HEAD_DIM, BLOCK_D)
        v_base = _rows_desc(v_base, Tk, stride_vn, BLOCK_N, HEAD_DIM, BLOCK_D)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, Tq, stride_qm, offs_d, HEAD_DIM, BLOCK_D)
    do = _load_rows(DO + b * stride_dob + h * stride_doh, offs_m, Tq, stride_dom, offs_d, HEAD_DIM, BLOCK_D)
    lse = tl.load(LSE + bh.to(tl.int64) * Tq + offs_m, mask=offs_m < Tq, other=0.0)
    delta = tl.load(Delta + bh.to(tl.int64) * Tq + offs_m, mask=offs_m < Tq, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    full_hi, hi = _kv_tile_range(start_m, Tq, Tk, BLOCK_M, BLOCK_N, IS_CAUSAL)
    if HAS_DOCS:
        q_start, lo, mid = _doc_tile_range(STARTS + b * stride_sb, offs_m, Tq, Tk, full_hi, BLOCK_N)
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d,
                           q_start, lo, mid, Tq, Tk, qk_scale, softcap, slope, seed, rng_base, dropout_p, keep_scale,
                           HEAD_DIM, BLOCK_D, BLOCK_N, True, IS_CAUSAL, HAS_DROPOUT, HAS_DOCS,
                           HAS_SOFTCAP, HAS_ALIBI, PRECISION, USE_TMA)
    else:
        q_start, mid = offs_m, 0
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d,
                       q_start, mid, full_hi, Tq, Tk, qk_scale, softcap, slope, seed, rng_base, dropout_p, keep_scale,
                       HEAD_DIM, BLOCK_D, BLOCK_N, False, IS_CAUSAL, HAS_DROPOUT, HAS_DOCS,
                       HAS_SOFTCAP, HAS_ALIBI, PRECISION, USE_TMA)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d,
                       q_start, full_hi, hi, Tq, Tk, qk_scale, softcap, slope, seed, rng_base, dropout_p, keep_scale,
                       HEAD_DIM, BLOCK_D, BLOCK_N, True, IS_CAUSAL, HAS_DROPOUT, HAS_DOCS,
                       HAS_SOFTCAP, HAS_ALIBI, PRECISION, USE_TMA)
    _store_rows(DQ + b * stride_dqb + h * stride_dqh, dq * sm_scale, offs_m, Tq, stride_dqm, offs_d,
                HEAD_DIM, BLOCK_D)


@triton.jit
def _dropout_mask_kernel(Out, Seed, Tq, Tk, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(Tq, BLOCK_M), cdiv(Tk, BLOCK_N), B*H): materialise the keep-mask (tests only)."""
    bh = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rng_base = bh.to(tl.int64) * Tq * Tk
    keep = _dropout_keep(_load_seed(Seed), rng_base, offs_m[:, None], offs_n[None, :], Tk, dropout_p)
    ptrs = Out + rng_base + offs_m[:, None].to(tl.int64) * Tk + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < Tq) & (offs_n[None, :] < Tk))


# ----------------------------------------------------------------------------- tuning (GPU only)
def _prune_query_tile(configs, named_args, **kwargs):
    """Forward and dQ own a BLOCK_M tile of queries: a tile much taller than Tq (decode: Tq = 1)
    wastes the tensor cores, and a 16-row tile is only worth timing for short query chunks."""
    rows = named_args["Q_BUCKET"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, rows) and (c.kwargs["BLOCK_M"] > 16 or rows <= 64)
            or c.num_stages == 1]  # a one-stage tile is the one that fits a T4's 64 KB: kept at every length
    return kept or configs[-1:]


def _prune_streamed_rows(configs, named_args, **kwargs):
    """dK/dV streams BLOCK_M query rows at a time: no point in a step taller than Tq."""
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, named_args["Q_BUCKET"])]
    return kept or configs[-1:]


def tile_group(block_d: int, dtype) -> str:
    """Which of a kernel's tile lists (TILES) a launch times: head dims up to 128, or 256 in a
    16-bit dtype or in fp32. A 256-wide head in a narrow tile spills or overflows 99 KB of shared
    memory, a narrow head in a wide tile wastes the SM, and fp32 doubles every tile's bytes."""
    if block_d < WIDE_HEAD_DIM:
        return "narrow"
    return "wide_fp32" if dtype == torch.float32 else "wide"


def _tuned(tiles, prune, key=()):
    """Autotune on a GPU; under the interpreter, launch with the fixed small tile instead.
    tiles: {tile_group: [(BLOCK_M, BLOCK_N, num_warps, num_stages)]}; each launch times only its
    group's (before `prune`), so autotune compiles nothing that cannot fit its head dim. A fifth entry
    True: the tile with USE_TMA (the kernel then takes TMA_OK, in `key`, and every config says USE_TMA).
    key: launch arguments besides the shared ones that change what the best tile is."""
    if INTERPRET:
        return lambda fn: fn
    # a fifth entry: USE_TMA; a kernel with such tiles gets the flag in every config
    tma = any(len(t) == 5 for cfgs in tiles.values() for t in cfgs)
    groups = {g: [triton.Config({"BLOCK_M": m, "BLOCK_N": n, **({"USE_TMA": bool(rest and rest[0])} if tma else {})},
                                num_warps=w, num_stages=s) for m, n, w, s, *rest in t]
              for g, t in tiles.items()}
    group_of = {id(c): g for g, cfgs in groups.items() for c in cfgs}

    def by_head_dim(configs, named_args, **kwargs):
        group = tile_group(kwargs["BLOCK_D"], named_args["Q"].dtype)
        kept = [c for c in configs if group_of[id(c)] == group]
        if tma:  # TMA configs only where the launcher found the streamed operands readable by TMA
            kept = [c for c in kept if named_args["TMA_OK"] or not c.kwargs["USE_TMA"]]
        return prune(kept, named_args, **kwargs)

    # Q_BUCKET (next power of two of Tq, capped) instead of Tq/Tk: decode grows Tk by one per
    # token and must not re-tune every step (nor the split count, which follows Tk). Tensor dtypes
    # join the key automatically. The split kernel has no HAS_DROPOUT: only the flags a kernel takes.
    def decorate(fn):
        flags = [a for a in ("HEAD_DIM", "IS_CAUSAL", "HAS_DROPOUT", "HAS_DOCS", "HAS_SOFTCAP", "HAS_ALIBI",
                             "FOLD_SCALE", "HAS_KV_LEN", "HAS_SINKS")
                 if a in fn.arg_names]
        return triton.autotune([c for cfgs in groups.values() for c in cfgs], key=[*flags, "Q_BUCKET", *key],
                               prune_configs_by={"early_config_prune": by_head_dim})(fn)

    return decorate


# (BLOCK_M, BLOCK_N, num_warps, num_stages), by tile_group. Narrow: H100 starting points from the
# Triton fused-attention tutorial and FlashAttention-2. The 8-warp variants matter at head_dim
# 96/128 and with dropout (Philox needs registers); BLOCK_M = 16 is for decode and short chunks.
# The small 2-stage tiles are there for GPUs with 99 KB of shared memory per block (sm_86/89: RTX
# 30xx/40xx, L4), where in fp32 every bigger tile is OutOfResources and autotune would have
# nothing left to launch.
# Wide (head dim 256, Gemma's): each K/V tile and accumulator row is twice head dim 128's, so
# 2 stages, BLOCK_N <= 64 and 8 warps for the bigger tiles (FlashAttention-2 runs 256 at 64 x 64
# forward, smaller in backward). Offline, none spills on sm_90/80/89; the 64-wide ones need
# sm_90's or sm_80's shared memory, sm_89 keeps forward's BLOCK_N = 32 tiles, dK/dV's 16 x 64
# and those of at most 32 x 32. Wide fp32 (ieee, no tensor cores): 16 rows in the streamed tiles
# (K, V in forward and dQ; Q, dO in dK/dV), the ones that fit sm_89's 99 KB (bigger ones took
# 20-100 s each to compile, to be refused there).
# (16, 16, 4, 1) in the wide backward lists: one stage (no pipelined copy of the next tile), the only
# dK/dV and dQ tile at head dim 256 that fits sm_75's 64 KB of shared memory in fp16 (T4: 48 KB;
# `bench compile --arch 75` found every other one over it, so a Gemma backward on a T4 had nothing to
# launch), and fp32 dQ's at full length within 64 KB (sm_70's 96 KB fits the 2-stage ones: `--arch 70`);
# the prune keeps it at every length. fp32 dK/dV at 256 needs 65 KB whatever the tile: not on a T4
# (the launch says so, naming the kernel and inputs: _common.out_of_resources).
# `tritongpt bench compile --arch 90|80|89` builds every entry for every launch: on each of those
# architectures every launch keeps a config that fits and does not spill. The last entry of each
# list is the fallback when pruning leaves nothing.
# (..., True): the same tile with its streamed operands through TMA descriptors (sm_90+, where they allow it:
# _attn_tma_ok): K and V in forward and dQ, Q and dO in dK/dV; autotune times them beside the pointer ones. The
# H200 run at head dim 64, T 1024: forward 283 TFLOPS against the issue's 300, fwd+bwd 0.55x the best SDPA's.
TILES = {
    "forward": {
        "narrow": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (32, 32, 4, 2),
                   (16, 128, 4, 3), (16, 64, 4, 3), (16, 32, 4, 2),
                   (128, 64, 4, 3, True), (128, 64, 8, 3, True), (128, 128, 8, 3, True)],
        "wide": [(128, 64, 8, 2), (64, 64, 8, 2), (64, 32, 4, 2), (64, 32, 8, 2), (32, 32, 4, 2),
                 (16, 64, 4, 2), (16, 32, 4, 2), (16, 16, 4, 2)],
        "wide_fp32": [(32, 16, 4, 2), (16, 16, 4, 2)],
    },
    # split-KV decode (Tq <= SPLIT_MAX_QUERIES): the forward's short-query tiles; a decode row streams
    # K and V once, so longer BLOCK_N and more stages keep more loads in flight
    "forward_split": {
        "narrow": [(16, 128, 4, 3), (16, 128, 4, 4), (16, 64, 4, 4), (32, 64, 4, 3), (64, 64, 4, 3),
                   (16, 64, 4, 3), (16, 32, 4, 2)],
        "wide": [(16, 64, 4, 2), (16, 64, 8, 2), (32, 32, 4, 2), (16, 32, 4, 2), (16, 16, 4, 2)],
        "wide_fp32": [(16, 16, 4, 2)],
    },
    "backward_dkdv": {
        "narrow": [(32, 128, 8, 3), (64, 128, 8, 3), (64, 64, 8, 3), (32, 64, 8, 3),
                   (32, 64, 4, 4), (16, 64, 4, 3), (16, 32, 4, 2),
                   (32, 128, 8, 3, True), (64, 128, 8, 3, True), (64, 64, 8, 3, True)],
        "wide": [(64, 64, 8, 2), (32, 64, 8, 2), (16, 64, 8, 2), (32, 32, 8, 2), (16, 32, 8, 2), (16, 32, 4, 2),
                 (16, 16, 4, 1)],
        "wide_fp32": [(16, 32, 8, 2), (16, 32, 4, 2), (16, 16, 4, 2)],
    },
    "backward_dq": {
        "narrow": [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 8, 3), (32, 32, 4, 2),
                   (16, 64, 4, 3), (16, 32, 4, 2),
                   (128, 32, 4, 3, True), (128, 64, 8, 3, True), (64, 64, 8, 3, True)],
        "wide": [(64, 64, 8, 2), (64, 32, 8, 2), (32, 32, 8, 2), (32, 32, 4, 2), (16, 32, 4, 2), (16, 16, 4, 1)],
        "wide_fp32": [(32, 16, 4, 2), (16, 16, 4, 2), (16, 16, 4, 1)],
    },
}
_attn_fwd_run = autotuned("attention.forward", _tuned(TILES["forward"], _prune_query_tile, key=["TMA_OK"])(_attn_fwd))
_attn_fwd_split_run = autotuned("attention.forward_split", _tuned(
    TILES["forward_split"], _prune_query_tile, key=["PACK_GQA"])(_attn_fwd_split))
_attn_bwd_dkdv_run = autotuned("attention.backward_dkdv", _tuned(
    TILES["backward_dkdv"], _prune_streamed_rows, key=["GROUP", "TMA_OK"])(_attn_bwd_dkdv))
_attn_bwd_dq_run = autotuned("attention.backward_dq", _tuned(TILES["backward_dq"], _prune_query_tile,
                                                             key=["TMA_OK"])(_attn_bwd_dq))


def _fixed_blocks():
    return dict(BLOCK_M=INTERPRET_BLOCK, BLOCK_N=INTERPRET_BLOCK) if INTERPRET else {}


def _kernel_flags(q, causal, dropout_p, starts=None, softcap=0.0, alibi=None):
    D = q.shape[-1]
    return dict(HEAD_DIM=D, BLOCK_D=next_pow2(D), IS_CAUSAL=bool(causal),
                HAS_DROPOUT=dropout_p > 0.0, HAS_DOCS=starts is not None, HAS_SOFTCAP=softcap > 0.0,
                HAS_ALIBI=alibi is not None,
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


@functools.lru_cache(maxsize=None)
def _stand_in(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A one-element tensor for a pointer the kernels never read (no documents, no ALiBi: compile-time
    False flags), made once per device and dtype. A torch.zeros per call was an allocation and a fill
    kernel on the GPU, four a forward + backward, besides attention's own launches."""
    return torch.empty(1, dtype=dtype, device=device)


def _doc_args(q, starts, ends):
    """The document-bound pointers and their row stride; without documents a one-element stand-in
    (never read: HAS_DOCS is a compile-time False then)."""
    if starts is None:
        dummy = _stand_in(q.device, torch.int32)
        return dummy, dummy, 0
    # the kernels step both by one row stride: a caller of the op may give them others. A window's
    # bounds, the same for every row, come expanded (stride 0) and stay so.
    if starts.stride() != ends.stride():
        starts, ends = starts.contiguous(), ends.contiguous()
    return starts, ends, starts.stride(0)


def _alibi_arg(q, alibi):
    """The slopes as the kernels index them (unit stride); without ALiBi a never-read stand-in."""
    return _stand_in(q.device, torch.float32) if alibi is None else alibi.contiguous()


def _scale_args(q, k_scale, v_scale):
    """An int8 cache's scale pointers and their (batch, head) strides, unit along Tk (the kernels step both by one
    pair of strides); without them never-read stand-ins (INT8_KV is False)."""
    if k_scale is None:
        dummy = _stand_in(q.device, torch.float32)
        return dummy, dummy, 0, 0
    if k_scale.stride(-1) != 1 or v_scale.stride() != k_scale.stride():
        k_scale, v_scale = k_scale.contiguous(), v_scale.contiguous()
    return k_scale, v_scale, k_scale.stride(0), k_scale.stride(1)


def _kv_len_arg(q, kv_len):
    """The forward's KV_LEN pointer: the caller's one-element integer tensor of filled cache positions, read by the
    kernels (_kv_len), never on the host here; without kv_len a never-read stand-in (HAS_KV_LEN is False)."""
    return _stand_in(q.device, torch.int32) if kv_len is None else kv_len


def _table_arg(q, block_table):
    """The forward's TABLE pointer: a paged cache's block table [B, pages a row] (int32), else a never-read stand-in
    (PAGE is 0)."""
    return _stand_in(q.device, torch.int32) if block_table is None else block_table


def _sinks_arg(q, sinks):
    """The SINKS pointer: the per-head sink logits [H] (any float dtype, unit stride), else a never-read stand-in
    (HAS_SINKS is False)."""
    return _stand_in(q.device, torch.float32) if sinks is None else sinks.contiguous()


def _table_stride(block_table):
    return 0 if block_table is None else block_table.stride(0)


def _page(k, block_table):
    """PAGE: a paged cache's positions a page (k is its pool [pages, Hkv, PAGE, D]), 0 for a cache of rows."""
    return 0 if block_table is None else k.shape[2]


def _cache_len(k, block_table):
    """The positions a row of the cache can hold (the launch's Tk): k's own, or a paged row's pages times PAGE."""
    return k.shape[2] if block_table is None else block_table.shape[1] * k.shape[2]


def _kv_len_stride(kv_len):
    """KV_LEN's step from one batch row to the next: 0 for one length shared by every row (or none), else its own
    stride along the rows ([B]: a length a row)."""
    return 0 if kv_len is None or kv_len.numel() == 1 else kv_len.stride(0)


def _q_bucket(Tq):
    return min(next_pow2(Tq), 1024)


def _last_dim_contiguous(t):
    # The kernels assume unit stride along the head dim (vectorised loads); every other stride
    # is passed in, so KV-cache slices and transposed views are used in place.
    return t if t.stride(-1) == 1 else t.contiguous()


def _seed_arg(q, seed, dropout_p):
    """The kernels' Seed pointer: with dropout the one-element int64 seed tensor on q's device, which they read
    themselves (_load_seed), so the launch never waits on the GPU for it (.item()) and can be captured in a CUDA
    graph; without dropout a never-read stand-in (HAS_DROPOUT is a compile-time False). A pointer's value is not
    specialized on, only its alignment, so every seed shares one binary. Nor is H (it only numbers the
    programs: do_not_specialize): 12 heads and 32 share the binaries bench compile built."""
    return seed if dropout_p > 0.0 else _stand_in(q.device, torch.int64)


# ----------------------------------------------------------------------------- split-KV decode
SPLIT_MAX_QUERIES = 64  # decode and speculative verification: longer query chunks fill a GPU with query tiles
SPLIT_MIN_KEYS = 256    # keys a split streams at the least (2-4 tiles), or its partial costs more than it saves
MAX_SPLITS = 64
COMBINE_BLOCK = 16      # query rows a combine program merges


def _num_splits(B, H, Tq, Tk, device) -> int:
    """How many KV splits the forward runs (1: the single-pass _attn_fwd), for B * H query tiles of
    Tq rows (the split kernel's heads and rows: _split_rows). Decode has one real row a query head:
    32 heads at batch 1 occupy 32 of an H100's 132 SMs, each walking all of Tk. Split (as flash-attn's
    num_splits_heuristic) when the query tiles fill less than 80% of two programs per SM, into enough
    splits to fill them, each at least SPLIT_MIN_KEYS long.
    Under the interpreter (~5 ms a program) never: tests monkeypatch this to force splits."""
    if INTERPRET or Tq > SPLIT_MAX_QUERIES:
        return 1
    tiles, slots = B * H * cdiv(Tq, 16), 2 * _sm_count(device)
    if tiles >= 0.8 * slots:
        return 1
    return max(1, min(slots // tiles, Tk // SPLIT_MIN_KEYS, MAX_SPLITS))


def _split_rows(H, Hkv, Tq):
    """(heads, rows, pack) of the split kernel's grid: GROUP = H / Hkv > 1 query heads packed into the rows of
    their KV head's tiles (GROUP * Tq rows) while those stay a decode step's few; else H heads of Tq rows."""
    group = H // Hkv
    if group > 1 and group * Tq <= SPLIT_MAX_QUERIES:
        return Hkv, group * Tq, True
    return H, Tq, False


def _fwd_split_launch(q, k, v, o, lse, causal, softmax_scale, starts, ends, softcap, alibi, splits, kv_len=None,
                      k_scale=None, v_scale=None, block_table=None, sinks=None):
    """_attn_fwd_split into fp32 partials, then _attn_fwd_combine into o and lse (and the sinks, if any)."""
    B, H, Tq, D = q.shape
    heads, rows, pack = _split_rows(H, k.shape[1], Tq)
    o_part = torch.empty((B, H, splits, Tq, D), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((B, H, splits, Tq), dtype=torch.float32, device=q.device)
    starts_arg, _, stride_sb = _doc_args(q, starts, ends)
    flags = _kernel_flags(q, causal, 0.0, starts, softcap, alibi)
    del flags["HAS_DROPOUT"]
    ks, vs, stride_scb, stride_sch = _scale_args(q, k_scale, v_scale)
    launch_tuned(
        _attn_fwd_split_run, lambda meta: (splits * cdiv(rows, meta["BLOCK_M"]), heads, B),
        q, k, v, o_part, lse_part, starts_arg, _alibi_arg(q, alibi), _kv_len_arg(q, kv_len), ks, vs,
        _table_arg(q, block_table), softmax_scale * LOG2E, softcap * LOG2E, q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), stride_sb, stride_scb,
        stride_sch, _kv_len_stride(kv_len), _table_stride(block_table),
        H, H // k.shape[1], Tq, _cache_len(k, block_table), _q_bucket(rows), splits, **flags, PACK_GQA=pack,
        HAS_KV_LEN=kv_len is not None, INT8_KV=k_scale is not None, PAGE=_page(k, block_table), **_fixed_blocks())
    _attn_fwd_combine[(cdiv(Tq, COMBINE_BLOCK), H, B)](
        o_part, lse_part, o, lse, _sinks_arg(q, sinks), o.stride(0), o.stride(1), o.stride(2), H, Tq, splits,
        HEAD_DIM=D, BLOCK_D=flags["BLOCK_D"], BLOCK_M=COMBINE_BLOCK, HAS_SINKS=sinks is not None)
    return o, lse


# ----------------------------------------------------------------------------- launchers
@on_tensor_device
def _fwd_launch(q, k, v, causal, softmax_scale, dropout_p, seed, starts=None, ends=None, softcap=0.0, alibi=None,
                kv_len=None, k_scale=None, v_scale=None, block_table=None, sinks=None):
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    B, H, Tq, D = q.shape
    # With kv_len, Tk is the cache's capacity: the grid, the split count and the tuning key follow it, never the
    # filled length the kernels read, so a CUDA graph captured at one length replays correctly at another.
    Tk = _cache_len(k, block_table)
    # O is written as [B, Tq, H, D] and returned as a [B, H, Tq, D] view: merging the heads
    # afterwards (transpose(1, 2).reshape) is then free.
    o = torch.empty((B, Tq, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    _check_head_span(q=q, k=k, v=v, o=o)
    if B * H * Tq == 0:
        return o, lse
    splits = 1 if dropout_p > 0.0 else _num_splits(B, *_split_rows(H, k.shape[1], Tq)[:2], Tk, q.device)
    if splits > 1:
        return _fwd_split_launch(q, k, v, o, lse, causal, softmax_scale, starts, ends, softcap, alibi, splits,
                                 kv_len, k_scale, v_scale, block_table, sinks)
    group = H // k.shape[1]
    grid = lambda meta: (cdiv(Tq, meta["BLOCK_M"]), H, B)  # noqa: E731
    starts_arg, _, stride_sb = _doc_args(q, starts, ends)
    ks, vs, stride_scb, stride_sch = _scale_args(q, k_scale, v_scale)
    tma_ok = kv_len is None and k_scale is None and block_table is None and _attn_tma_ok(k, v)
    if tma_ok and not INTERPRET:
        triton.set_allocator(tma_scratch)  # a context variable: set where the launch runs
    launch_tuned(
        _attn_fwd_run, grid,
        q, k, v, o, lse, starts_arg, _alibi_arg(q, alibi), _seed_arg(q, seed, dropout_p), _kv_len_arg(q, kv_len),
        ks, vs, _table_arg(q, block_table), _sinks_arg(q, sinks), softmax_scale * LOG2E, softcap * LOG2E, dropout_p,
        1.0 / (1.0 - dropout_p),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2), stride_sb, stride_scb, stride_sch,
        _kv_len_stride(kv_len), _table_stride(block_table), H, group, Tq, Tk, _q_bucket(Tq), int(tma_ok),
        **_kernel_flags(q, causal, dropout_p, starts, softcap, alibi),
        FOLD_SCALE=softmax_scale * LOG2E >= FP32_TINY and softcap == 0.0 and alibi is None,
        HAS_KV_LEN=kv_len is not None, INT8_KV=k_scale is not None, PAGE=_page(k, block_table),
        HAS_SINKS=sinks is not None, **_fixed_blocks(),
        **({"USE_TMA": tma_ok} if INTERPRET else {}))  # (on a GPU each config says USE_TMA)
    return o, lse


# TMA_INTERPRETED: a test drives the kernels' TMA loads through the interpreter. TRITONGPT_ATTENTION_TMA=0 keeps
# every launch on the pointer tiles (mlp's TRITONGPT_MATMUL_TMA likewise): to time them apart, or to get by a GPU
# or driver that refuses a descriptor.
TMA_INTERPRETED = False
ATTENTION_TMA = os.environ.get("TRITONGPT_ATTENTION_TMA", "1") != "0"


def _attn_tma_ok(*tensors) -> bool:
    """The kernels may read these [B, heads, T, D] tensors (D contiguous: k and v in forward; q, k, v and dO in
    backward) through TMA descriptors: a GPU that has TMA, a 16-bit dtype, and each head's base and row stride
    16-byte aligned. fp32's dots run on FMAs (no wgmma to feed): offline, its forward TMA tiles build at 32 registers
    a thread with 28-69 KB of spills (sm_90, head dim 64), as the matmul's fp32 ones did."""
    if not ATTENTION_TMA or tensors[0].element_size() != 2:
        return False
    if not (TMA_INTERPRETED if INTERPRET else _has_tma(tensors[0].device)):
        return False
    return all(tma_strides_ok(t, (0, 1, 2)) for t in tensors)


@on_tensor_device
def _bwd_launch(do, q, k, v, o, lse, causal, softmax_scale, dropout_p, seed, starts=None, ends=None, softcap=0.0,
                alibi=None, sinks=None):
    """-> (dq, dk, dv, dsinks): dsinks [H] in sinks' dtype, or an empty fp32 tensor without sinks (the op returns
    tensors only). The sinks change no kernel here: forward stored the L that includes them, so P = exp2(S - L) is
    already the sink-shrunk probability, and Delta = rowsum(O * dO) is still rowsum(P * dP) (the sink column has no
    value: its dP is 0). The sink's own gradient is -P_sink * Delta summed over batch and rows, P_sink = 2^(sink - L):
    a [B, H, Tq] product from Delta and L, no pass over Q, K or V."""
    do, q, k, v = (_last_dim_contiguous(t) for t in (do, q, k, v))
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    # q, k, v (the same after _last_dim_contiguous) and o were checked in forward; dq, dk, dv are
    # empty_like of them, so no wider: only the incoming gradient is new
    _check_head_span(do=do)
    dsinks = torch.empty(0, dtype=torch.float32, device=q.device) if sinks is None else \
        torch.zeros_like(sinks)
    if B * H * Tq * Tk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), dsinks
    flags = _kernel_flags(q, causal, dropout_p, starts, softcap, alibi)
    delta = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    pre_block = INTERPRET_BLOCK if INTERPRET else 64
    _attn_bwd_preprocess[(cdiv(Tq, pre_block), H, B)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        H, Tq, HEAD_DIM=D, BLOCK_D=flags["BLOCK_D"], BLOCK_M=pre_block)
    starts_arg, ends_arg, stride_sb = _doc_args(q, starts, ends)
    tma_ok = _attn_tma_ok(q, k, v, do)
    if tma_ok and not INTERPRET:
        triton.set_allocator(tma_scratch)  # a context variable: set where the launch runs
    tma = {"USE_TMA": tma_ok} if INTERPRET else {}  # (on a GPU each config says USE_TMA)
    common = (starts_arg, ends_arg, _alibi_arg(q, alibi), _seed_arg(q, seed, dropout_p), softmax_scale * LOG2E,
              softcap * LOG2E, softmax_scale, dropout_p, 1.0 / (1.0 - dropout_p), q.stride(0), q.stride(1), q.stride(2),
              k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1),
              do.stride(2), stride_sb)
    launch_tuned(
        _attn_bwd_dkdv_run, lambda meta: (cdiv(Tk, meta["BLOCK_N"]), Hkv, B),
        q, k, v, do, dk, dv, lse, delta, *common,
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        H, H // Hkv, Tq, Tk, _q_bucket(Tq), int(tma_ok), **flags, **_fixed_blocks(), **tma)
    launch_tuned(
        _attn_bwd_dq_run, lambda meta: (cdiv(Tq, meta["BLOCK_M"]), H, B),
        q, k, v, do, dq, lse, delta, *common,
        dq.stride(0), dq.stride(1), dq.stride(2),
        H, H // Hkv, Tq, Tk, _q_bucket(Tq), int(tma_ok), **flags, **_fixed_blocks(), **tma)
    if sinks is not None:
        p_sink = torch.exp2(sinks.float().view(1, H, 1) * LOG2E - lse)
        dsinks = (-(p_sink * delta).sum((0, 2))).to(sinks.dtype)
    return dq, dk, dv, dsinks


# ----------------------------------------------------------------------------- custom ops
# Registered ops let torch.compile (Dynamo/AOTAutograd/Inductor) keep attention as one opaque
# node with known output shapes (the fake impls) and a known backward (register_autograd),
# instead of trying to trace Python that launches Triton. The seed travels as a one-element int64
# tensor on q's device, so a fresh seed per step does not force a recompile, and a compiled graph
# holds no CPU tensor (inductor's CUDA graphs skip a graph that has one); without dropout it is None.
@custom_op("tritongpt::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, softmax_scale: float,
                    dropout_p: float, seed: torch.Tensor | None, starts: torch.Tensor | None = None,
                    ends: torch.Tensor | None = None, softcap: float = 0.0,
                    alibi: torch.Tensor | None = None,
                    kv_len: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None,
                    block_table: torch.Tensor | None = None,
                    sinks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (o [B, H, Tq, D], lse [B, H, Tq] fp32: the base-2 logsumexp of the scaled, capped, biased scores).
    starts/ends: int32 [B, Tk], each position's document start and end (document_bounds).
    softcap: c > 0 caps each scaled score s to c * tanh(s / c); 0: no cap.
    alibi: fp32 [H], query head h's ALiBi slope m: the score of query position i, key j gets + m (j - i).
    kv_len: one int32/int64 on q's device (or one a batch row, [B]), L: k and v are caches of Tk positions whose
    first L hold keys; the kernels read it (query i at position L - Tq + i). Forward only: its backward refuses it.
    k_scale, v_scale: fp32 [B, Hkv, Tk] with int8 k and v (an int8 KV cache): key/value j of head h is
    k[..., j, :] * k_scale[..., j]. Forward only: its backward refuses them.
    block_table: int32 [B, pages a row] with kv_len: k and v (and their scales) are pools of pages [pages, Hkv,
    PAGE, D], row b's position n in page block_table[b, n // PAGE] (a paged KV cache). Forward only.
    sinks: float [H], each query head's attention-sink logit (gpt-oss): one more softmax column with no value; the
    returned lse includes it."""
    check_tensor(q, "q", ndim=4)
    for name, t in (("k", k), ("v", v)):  # (int8: an int8 KV cache's, with its scales: _check_int8_kv)
        check_tensor(t, name, KV_DTYPES, ndim=4)
    _check_int8_kv(q, k, v, k_scale, v_scale, dropout_p, block_table)
    _check_block_table(q, k, kv_len, block_table)
    _check_shapes(q, k, v, causal, dropout_p, block_table)
    _check_seed(q, dropout_p, seed)
    _check_bounds(q, k, causal, starts, ends, block_table)
    _checked_softcap(softcap)
    _check_alibi(q, alibi)
    _check_sinks(q, sinks)
    _check_kv_len(q, kv_len, dropout_p)
    if kv_len is not None and q.device.type == "cpu":  # free there, and run under torch.compile too
        _check_kv_len_value(kv_len, q.shape[2], _cache_len(k, block_table), causal)
    if block_table is not None and q.device.type == "cpu":
        _check_block_table_values(block_table, k.shape[0])
    return _fwd_launch(q, k, v, causal, softmax_scale, dropout_p, seed, starts, ends, softcap, alibi, kv_len,
                       k_scale, v_scale, block_table, sinks)


@_flash_attn_fwd.register_fake
def _(q, k, v, causal, softmax_scale, dropout_p, seed, starts=None, ends=None, softcap=0.0, alibi=None, kv_len=None,
      k_scale=None, v_scale=None, block_table=None, sinks=None):
    _check_seed(q, dropout_p, seed)  # a seed on another device fails when traced, not first on the GPU
    _check_sinks(q, sinks)
    _check_kv_len(q, kv_len, dropout_p)
    _check_int8_kv(q, k, v, k_scale, v_scale, dropout_p, block_table)
    _check_block_table(q, k, kv_len, block_table)
    _check_routed_to_fake("flash_attn_fwd", q, k=k, v=v, seed=seed, starts=starts, ends=ends, alibi=alibi,
                          kv_len=kv_len, k_scale=k_scale, v_scale=v_scale, block_table=block_table, sinks=sinks)
    B, H, Tq, D = q.shape
    o = q.new_empty((B, Tq, H, D)).transpose(1, 2)
    return o, q.new_empty((B, H, Tq), dtype=torch.float32)


@custom_op("tritongpt::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                    lse: torch.Tensor, causal: bool, softmax_scale: float, dropout_p: float,
                    seed: torch.Tensor | None, starts: torch.Tensor | None = None, ends: torch.Tensor | None = None,
                    softcap: float = 0.0, alibi: torch.Tensor | None = None, sinks: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq, dk, dv, dsinks): dsinks [H] with sinks, else an empty fp32 tensor (_bwd_launch)."""
    _checked_softcap(softcap)
    _check_alibi(q, alibi, finite=False)  # forward checked its values
    _check_sinks(q, sinks)
    _check_seed(q, dropout_p, seed)
    return _bwd_launch(do, q, k, v, o, lse, causal, softmax_scale, dropout_p, seed, starts, ends, softcap, alibi,
                       sinks)


@_flash_attn_bwd.register_fake
def _(do, q, k, v, o, lse, causal, softmax_scale, dropout_p, seed, starts=None, ends=None, softcap=0.0, alibi=None,
      sinks=None):
    _check_seed(q, dropout_p, seed)
    _check_routed_to_fake("flash_attn_bwd", q, do=do, k=k, v=v, o=o, lse=lse, seed=seed, starts=starts, ends=ends,
                          alibi=alibi, sinks=sinks)
    # Same allocation calls as _bwd_launch, so fake and real strides agree.
    dsinks = q.new_empty(0, dtype=torch.float32) if sinks is None else torch.empty_like(sinks)
    return torch.empty_like(_last_dim_contiguous(q)), torch.empty_like(_last_dim_contiguous(k)), \
        torch.empty_like(_last_dim_contiguous(v)), dsinks


def _setup_context(ctx, inputs, output):
    q, k, v, causal, softmax_scale, dropout_p, seed, starts, ends, softcap, alibi, kv_len, k_scale, v_scale, _, \
        sinks = _padded_inputs(inputs)
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, seed, starts, ends, alibi, sinks)
    ctx.causal, ctx.softmax_scale, ctx.dropout_p, ctx.softcap = causal, softmax_scale, dropout_p, softcap
    ctx.has_kv_len = kv_len is not None
    ctx.int8_kv = k_scale is not None
    ctx.n_inputs = len(inputs)


def _padded_inputs(inputs):
    """The op's inputs with the trailing optional ones a caller left out (kv_len, k_scale, v_scale, block_table,
    sinks) as None."""
    return (*inputs, *(None,) * (16 - len(inputs)))


def _backward(ctx, grad_o, grad_lse):
    first_order_only("flash_attention")
    if ctx.int8_kv:  # flash_attention refuses it with gradients on; a direct caller of the op gets here
        raise RuntimeError("flash_attn_fwd with int8 k and v (k_scale, v_scale) is inference only: there is no "
                           "backward through a quantized KV cache")
    if ctx.has_kv_len:  # flash_attention refuses it with gradients on; a direct caller of the op gets here
        raise RuntimeError("flash_attn_fwd with kv_len is inference only: the backward kernels take the whole "
                           "Tk of k and v (slice the cache to its filled length to train through it)")
    q, k, v, o, lse, seed, starts, ends, alibi, sinks = ctx.saved_tensors
    dq, dk, dv, dsinks = _flash_attn_bwd.call(grad_o, q, k, v, o, lse, ctx.causal, ctx.softmax_scale, ctx.dropout_p,
                                              seed, starts, ends, ctx.softcap, alibi, sinks)
    # q, k, v then the other inputs (the ALiBi slopes are constants: no gradient); the sinks, the 16th input, last
    grads = [dq, dk, dv, *(None,) * (ctx.n_inputs - 3)]
    if sinks is not None:
        grads[15] = dsinks
    return tuple(grads)


def _learnable_slopes(name: str, who: str = "") -> ValueError:
    """The refusal of ALiBi slopes that require grad (flash_attention's and the registered op's): _backward returns
    None for them, so learnable slopes would silently never learn."""
    return ValueError(f"{who}{name} requires grad, but the kernels take the slopes as a constant (no gradient): pass "
                      f"{name}.detach(), or learn them in torch (the scores plus model/layers.py's "
                      "alibi_bias(slopes, Tq, Tk))")


def _op_setup_context(ctx, inputs, output):
    """The registered op's: called only with grad on and some input requiring grad. Slopes that require grad are
    refused (flash_attention refuses them up front; a direct caller of the op gets here), where _backward's None for
    them would leave learnable slopes silently never learning. (Not in _setup_context: FlashAttnFunction's runs
    under no_grad too.)"""
    alibi = _padded_inputs(inputs)[10]
    if alibi is not None and alibi.requires_grad:  # (not needs_input_grad: under torch.compile it can be shorter)
        raise _learnable_slopes("alibi", who="flash_attn_fwd: ")
    _setup_context(ctx, inputs, output)


_flash_attn_fwd.register_autograd(_backward, setup_context=_op_setup_context)


class FlashAttnFunction(torch.autograd.Function):
    """The eager path of flash_attn_fwd's registered autograd (_setup_context, _backward): the
    function itself under an autograd.Function, without the dispatcher's autograd_impl and
    redispatch around it (bench cpu's host-flash_attention rows). flash_attention takes it when
    plain_eager; torch.compile, vmap and the dispatch modes still see the registered op."""

    @staticmethod
    def forward(ctx, *inputs):
        o, lse = _flash_attn_fwd.eager(*inputs)
        _setup_context(ctx, inputs, (o, lse))
        ctx.mark_non_differentiable(lse)  # as the op's callers use it: a constant, never differentiated
        return o, lse

    backward = staticmethod(_backward)


# ----------------------------------------------------------------------------- public API
def _checked_inputs(q, k, v):
    """(q, k, v) once valid; under autocast cast to its dtype first, as SDPA's inputs are (a KV
    cache made outside autocast holds fp32 keys while the projections give bf16 queries)."""
    check_tensor(q, "q", ndim=4)
    for name, t in (("k", k), ("v", v)):  # (int8: an int8 KV cache's, with its scales: _check_int8_kv)
        check_tensor(t, name, KV_DTYPES, ndim=4)
    check_same_device(q=q, k=k, v=v)
    check_runnable(q, "q")
    dt = autocast_dtype(q.device)
    if dt is not None:  # (an int8 cache's k and v stay int8: read back in q's dtype in the kernels)
        q, k, v = q.to(dt), *(t if t.dtype == torch.int8 else t.to(dt) for t in (k, v))
    return q, k, v  # dtypes and shapes: checked by the op itself (_check_shapes)


def _check_shapes(q, k, v, causal, dropout_p, block_table=None):
    """What the kernels need of the [B, H, T, D] shapes and of dropout_p, checked in the custom
    op, so also for a caller who calls it directly (it returns the logsumexp too), where a head
    dim the kernels lack or Tq > Tk with causal gave garbage. A paged cache's pools are checked as the rows they
    hold (_check_block_table checks the table against them)."""
    (B, H, Tq, D), (Bk, Hk, Tk, Dk) = q.shape, k.shape
    if block_table is not None:
        Bk, Tk = B, _cache_len(k, block_table)
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same number of heads, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if (Bk, Dk) != (B, D):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch and head_dim "
                         "(layout [B, H, T, D])")
    if Hk != H and (Hk == 0 or H % Hk):
        raise ValueError(f"q's heads ({H}) must be a multiple of k's and v's ({Hk}): each group of H / Hkv query "
                         f"heads shares one KV head (grouped-query attention); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {D} is not supported; flash_attention supports {SUPPORTED_HEAD_DIMS}")
    if causal and Tq > Tk:
        raise ValueError(f"causal attention needs Tq <= Tk (queries are the last Tq of the Tk positions), "
                         f"got Tq={Tq} > Tk={Tk}")
    if Tk == 0 and Tq > 0:
        raise ValueError("k and v have no positions (Tk=0): every query would attend to nothing")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if max(B, H) > MAX_GRID_YZ:
        raise ValueError(f"flash_attention launches one row of programs per head and per sequence, and a "
                         f"CUDA grid allows at most {MAX_GRID_YZ} of each: got batch {B}, heads {H} (split the batch)")


def _check_head_span(**tensors):
    """The kernels address one (batch, head) slice with 32-bit offsets (the batch and head
    offsets themselves are 64-bit): refuse a slice spanning 2^31 elements or more."""
    for name, t in tensors.items():
        span = 1 + sum((n - 1) * st for n, st in zip(t.shape[2:], t.stride()[2:]) if n > 0)
        if span >= 2 ** 31:
            raise ValueError(f"one head of {name} {tuple(t.shape)} (strides {t.stride()}) spans {span} elements; "
                             "flash_attention addresses within a head with 32-bit offsets (< 2^31)")


def _check_routed_to_fake(op, q, **tensors):
    """Refuse a meta tensor beside a real q in a direct call of an op: the Meta backend outranks every other, so the
    dispatcher sends the whole call to the fake impl, whose empty outputs would come back as attention or its
    gradients (uninitialised memory), and the real impl's checks never run. Fake tensors (torch.compile, FakeTensorMode)
    and an all-meta call are the fake impl's own use."""
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(q, FakeTensor) or q.is_meta:
        return
    for name, t in tensors.items():
        if t is not None and t.is_meta:
            raise ValueError(f"{op}: {name} is on meta, q on {q.device}: every tensor must be on q's device "
                             "(a meta one sends the call to the op's fake impl, which computes nothing)")


def _check_seed(q, dropout_p, seed):
    """The op's seed as the kernels read it (_load_seed) when dropout_p > 0: one int64 on q's device.
    Checked, not moved: a copy from the host inside the op would run on every call and cannot be captured
    in a CUDA graph (flash_attention moves a user's seed once, before the op)."""
    if dropout_p <= 0.0:
        return  # never read
    if seed is None:  # flash_attention draws one; a direct call of the op must give it
        raise ValueError(f"dropout_p {dropout_p} needs a seed tensor (None only without dropout)")
    if seed.numel() != 1 or seed.dtype != torch.int64 or seed.device != q.device:
        raise ValueError(f"the seed must be one int64 on q's device {q.device}, got {seed.dtype} "
                         f"{tuple(seed.shape)} on {seed.device}")


def _check_kv_len(q, kv_len, dropout_p=0.0):
    """kv_len as the kernels read it (_kv_len): None, or one int32/int64 element, or one a batch row ([B]), on q's
    device. Not its values: reading them waits on a GPU (_check_kv_len_value)."""
    if kv_len is None:
        return
    if not isinstance(kv_len, torch.Tensor):
        raise TypeError(f"kv_len must be a one-element int32/int64 tensor on q's device (the number of filled "
                        f"KV-cache positions) or None, got {type(kv_len).__name__}")
    if kv_len.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"kv_len must hold an int32 or int64 (a count of positions), got dtype {kv_len.dtype}")
    if kv_len.dim() > 1 or kv_len.numel() not in (1, q.shape[0]):
        raise ValueError(f"kv_len must be one element (shape [] or [1]) or one a batch row ([{q.shape[0]}]), got "
                         f"shape {tuple(kv_len.shape)}")
    if kv_len.device != q.device:
        raise ValueError(f"kv_len is on {kv_len.device}, q on {q.device}: the kernels read it on q's device")
    if dropout_p > 0.0:
        raise ValueError(f"kv_len is for inference: dropout_p must be 0 with it, got {dropout_p}")


def _check_block_table(q, k, kv_len, block_table):
    """A paged cache's block table as the kernels read it (PAGE): int32 [B, pages a row] (unit stride along a row's
    pages; any between rows, as first_rows' slices) on q's device, with kv_len (a paged row's keys are its filled
    ones), and k a pool whose page size is the kernels' (any size; a whole number of pages a row).
    Not its values: reading them waits on a GPU (_check_block_table_values)."""
    if block_table is None:
        return
    if not isinstance(block_table, torch.Tensor):
        raise TypeError(f"block_table must be an int32 tensor [B, pages a row] (a paged KV cache's) or None, got "
                        f"{type(block_table).__name__}")
    if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != q.shape[0] \
            or block_table.shape[1] == 0:
        raise ValueError(f"block_table must be int32 [B, pages a row] = [{q.shape[0]}, n >= 1] (B: q's batch), got "
                         f"{block_table.dtype} {list(block_table.shape)}")
    if block_table.shape[1] > 1 and block_table.stride(1) != 1:  # (the kernels step one element a page)
        raise ValueError(f"block_table must have unit stride along a row's pages, got strides "
                         f"{tuple(block_table.stride())}: pass block_table.contiguous()")
    if block_table.device != q.device:
        raise ValueError(f"block_table is on {block_table.device}, q on {q.device}: the kernels read it on q's device")
    if kv_len is None:
        raise ValueError("block_table (a paged KV cache) needs kv_len: each row's filled length, which its pages "
                         "hold")
    if k.shape[0] == 0 or k.shape[2] == 0:
        raise ValueError(f"a paged cache's k is a pool [pages, Hkv, page size, D] of at least one page and "
                         f"position, got {tuple(k.shape)}")


def _check_block_table_values(block_table, pages):
    """Every page number a real page of the pool: [0, pages). A host read: one sync on a GPU."""
    lo, hi = int(block_table.min()), int(block_table.max())
    if lo < 0 or hi >= pages:
        raise ValueError(f"block_table names page {lo if lo < 0 else hi}, but the pool has pages 0..{pages - 1}")


def _check_int8_kv(q, k, v, k_scale, v_scale, dropout_p=0.0, block_table=None):
    """The dtypes of q, k, v, and an int8 cache's scales as the kernels read them (INT8_KV): int8 k and v (both) with
    k_scale and v_scale fp32 [B, Hkv, Tk] on q's device and a float q; a float k and v with none (then q, k and v
    share one dtype). With a block_table the scales are in pages as the values are, [pages, Hkv, page size]: named
    so in the refusal, where [B, Hkv, Tk] sent a caller to the rows' shape (its pages' sizes printed as [B, Hkv, Tk])."""
    int8 = [t.dtype == torch.int8 for t in (k, v)]
    scales = [t is not None for t in (k_scale, v_scale)]
    if q.dtype == torch.int8:
        raise TypeError("q must be a float tensor (bf16/fp16/fp32): int8 is for the keys and values of an int8 KV "
                        "cache only, with k_scale and v_scale")
    if not any(int8) and not any(scales):
        check_same_dtype(q=q, k=k, v=v)
        return
    if not all(int8):
        raise TypeError(f"k_scale and v_scale go with int8 k and v (an int8 KV cache), got k {k.dtype} and "
                        f"v {v.dtype}" if any(scales) else
                        f"int8 k and v go together, with k_scale and v_scale: got k {k.dtype} and v {v.dtype}")
    if not all(scales):
        raise ValueError("int8 k and v need their scales: k_scale and v_scale, fp32 [B, Hkv, Tk] (an int8 KV "
                         "cache's KVCache.k_scale and v_scale), got "
                         f"k_scale {'given' if scales[0] else 'None'} and v_scale {'given' if scales[1] else 'None'}")
    want = tuple(k.shape[:3])
    layout = "[B, Hkv, Tk]" if block_table is None else "[pages, Hkv, page size] (the pool's, as k's pages)"
    for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be an fp32 tensor {layout}, got {type(t).__name__}")
        if t.dtype != torch.float32 or tuple(t.shape) != want or t.device != q.device:
            raise ValueError(f"{name} must be float32 {layout} = {list(want)} (one scale per key/value vector) "
                             f"on q's device {q.device}, got {t.dtype} {list(t.shape)} on {t.device}")
    if dropout_p > 0.0:
        raise ValueError(f"int8 k and v (a KV cache) are for inference: dropout_p must be 0, got {dropout_p}")


def _check_kv_len_value(kv_len, Tq, Tk, causal):
    """The filled length L (each row's) in range: [Tq, Tk] with causal (the queries are the last Tq of the L
    positions), else [1, Tk] (a query must see some key). A host read: one sync on a GPU."""
    lo = Tq if causal else 1
    for row, L in enumerate(kv_len.reshape(-1).tolist()):
        if not lo <= L <= Tk:
            which = f" (batch row {row})" if kv_len.numel() > 1 else ""
            raise ValueError(f"kv_len {L}{which} is out of range: it must lie in [{lo}, {Tk}] "
                             f"({'Tq' if causal else '1'} to the cache's Tk{' with causal' if causal else ''}; "
                             f"Tq={Tq}, Tk={Tk})")


def _as_seed(seed, device):
    """A user's seed as a one-element int64 tensor on `device`."""
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool:
            raise TypeError(f"seed tensor must hold one integer, got dtype {seed.dtype} shape {tuple(seed.shape)}")
        return seed.detach().reshape(()).to(device=device, dtype=torch.int64)
    if not is_int(seed):
        raise TypeError(f"seed must be an int or an integer tensor, got {type(seed).__name__}")
    seed = int(seed)
    if not 0 <= seed < 2 ** 31:  # the kernels take 31 bits (_load_seed): others would alias
        raise ValueError(f"seed must be in [0, 2^31), got {seed}")
    # a fill on the device, not torch.tensor's copy from the host (which a CUDA-graph capture refuses)
    return torch.full((), seed, dtype=torch.int64, device=device)


def _seed_tensor(seed, dropout_p, device):
    if dropout_p == 0.0:
        return None
    if seed is None:
        # From torch's generator of q's device, so torch.manual_seed makes the dropout reproducible and
        # activation checkpointing's replay of that generator draws the same seed; on the device, so no
        # CPU tensor enters a compiled graph (which would cost it its CUDA graph).
        return torch.randint(0, 2**31 - 1, (), dtype=torch.int64, device=device)
    return _as_seed(seed, device)


def _checked_scale(softmax_scale) -> float:
    """softmax_scale as a float: a finite real number (numpy's too), not a bool, a string or a tensor.

    A tensor would be read once by float(), silently cut from autograd (a learnable temperature
    would get no gradient) and, under torch.compile, reach the op as a SymFloat it cannot take;
    SDPA's scale refuses one too.
    """
    if isinstance(softmax_scale, torch.Tensor):
        raise TypeError("softmax_scale must be a Python float, got a tensor; the kernel takes a constant scale "
                        "(for a learnable temperature, scale q by it before the call: its gradient then flows)")
    if not is_real(softmax_scale):
        raise TypeError(f"softmax_scale must be a float, got {type(softmax_scale).__name__} {softmax_scale!r}")
    if not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    if abs(float(softmax_scale)) * LOG2E >= FP32_MAX:
        # the kernels take scale * log2(e) as an fp32 argument: inf there made every output NaN
        raise ValueError(f"softmax_scale {softmax_scale} is too large: the kernels take softmax_scale * log2(e) "
                         f"in fp32, whose largest value is {FP32_MAX:.4g}")
    return float(softmax_scale)


def _checked_softcap(softcap) -> float:
    """softcap as a float: None or 0 for no cap, else a finite real c > 0 (numpy's too); a bool, a
    string or a tensor refused, as softmax_scale's are."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, torch.Tensor) or not is_real(softcap):
        raise TypeError(f"softcap must be a float (the cap c of c * tanh(score / c)) or None, got "
                        f"{type(softcap).__name__} {softcap!r}")
    if not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap must be a finite number > 0 (0 or None: no cap), got {softcap!r}")
    if softcap and not 1.0 / FP32_MAX < float(softcap) * LOG2E < FP32_MAX:
        # the kernels take c * log2(e) in fp32 and divide by it: 0 or inf there made NaNs
        raise ValueError(f"softcap {softcap!r} is out of range: the kernels take softcap * log2(e) and its "
                         f"inverse in fp32, so softcap must lie between {1.0 / FP32_MAX / LOG2E:.4g} and "
                         f"{FP32_MAX / LOG2E:.4g}")
    return float(softcap)


def _check_sinks(q, sinks):
    """The sink logits as the kernels read them: a float [H] on q's device, one per query head (any strides: the
    launch makes them contiguous). Their values are not read here (that would sync a GPU every layer): a NaN sink
    makes its head's rows NaN, as in the reference."""
    if sinks is None:
        return
    H = q.shape[1]
    if sinks.dtype not in FLOAT_DTYPES or tuple(sinks.shape) != (H,) or sinks.device != q.device:
        raise ValueError(f"sinks must be a float tensor [H] = [{H}] (one sink logit per query head) on {q.device}, "
                         f"got {sinks.dtype} {tuple(sinks.shape)} on {sinks.device}")


_FINITE_SLOPES = WeakIdKeyDictionary()  # slopes tensors read finite -> their _version then


def _check_alibi(q, alibi, finite=True):
    """The ALiBi slopes as the kernels read them: fp32 [H] on q's device, one per query head, finite."""
    if alibi is None:
        return
    H = q.shape[1]
    if alibi.dtype != torch.float32 or tuple(alibi.shape) != (H,) or alibi.device != q.device:
        raise ValueError(f"alibi_slopes must be float32 [H] = [{H}] (one slope per query head) on {q.device}, "
                         f"got {alibi.dtype} {tuple(alibi.shape)} on {alibi.device}")
    # A NaN slope made every row NaN. Reading the values syncs a GPU, so a tensor is read once while
    # unchanged (its _version counts in-place writes): the model passes the same buffer every layer and step.
    if finite and _FINITE_SLOPES.get(alibi) != alibi._version:
        if not torch.isfinite(alibi).all():
            raise ValueError(f"alibi_slopes must be finite, got {alibi.tolist()}")
        _FINITE_SLOPES[alibi] = alibi._version


def flash_attention(q, k, v, causal=True, softmax_scale=None, dropout_p=0.0, seed=None, doc_ids=None,
                    window=None, softcap=None, alibi_slopes=None, kv_len=None, k_scale=None, v_scale=None,
                    block_table=None, *, lengths_checked=False, sinks=None):
    """softmax(q k^T * scale + mask) with dropout, @ v, without the Tq x Tk matrix. Differentiable.

    q: [B, H, Tq, D]; k, v: [B, Hkv, Tk, D], any strides (unit stride on D is fastest), bf16/fp16/fp32
    (under torch.autocast, cast to the autocast dtype first, as for SDPA). Hkv < H: grouped-query
    attention (Hkv = 1: multi-query), H a multiple of Hkv, query head h reads KV head h // (H / Hkv),
    as SDPA's enable_gqa=True and flash-attn; dk, dv come back [B, Hkv, Tk, D].
    causal: bottom-right aligned (query i is position Tk - Tq + i), needs Tq <= Tk.
    softmax_scale: a finite float, default 1/sqrt(D) (not a tensor: scale q for a learnable one). The model passes
        MultiHeadAttention.softmax_scale (model/layers.py): Gemma's 1/sqrt(query_pre_attn_scalar), Granite's
        attention_multiplier (GPTConfig.attention_multiplier), each times YaRN's attention_factor squared under YaRN.
    dropout_p: on the attention weights, scaled by 1/(1-p);
    seed: int in [0, 2^31) for a reproducible mask (see dropout_mask), else drawn from torch's RNG of q's
    device (a seed tensor is taken modulo 2^31, and moved to q's device: one there already costs no copy).
    doc_ids: integer [B, Tk], with causal: packed documents. A run of equal ids is one document,
    and a query sees only the keys of its own (document masking; FlashAttention's varlen and
    FlexAttention's document mask give the same). KV tiles of other documents are skipped.
    window: int >= 1, with causal: local attention, query i (at position p) sees only the last
    `window` positions, p - window < j <= p (flash-attn's window_size=(window - 1, 0); GPT-3's and
    GPT-Neo's local layers). KV tiles outside the band are skipped. None: no window.
    softcap: a float c > 0: each scaled score s becomes c * tanh(s / c) before the masks and the
    softmax (Gemma 2's attn_logit_softcapping, 50; flash-attn's softcap). None or 0: no cap.
    alibi_slopes: fp32 [H], one slope m_h per query head (alibi_slopes(H) in model/layers.py):
    ALiBi adds m_h (j - i) to the scaled (and capped) score of query position i (Tk - Tq + i, as
    for the mask) and key j, before the masks; flash-attn's alibi_slopes. A constant: no gradient
    (slopes that require grad are refused while grad is on).
    kv_len: a one-element int32/int64 tensor on q's device (shape [] or [1]) or None. With it, k and v are a
        preallocated KV cache of Tk_cap = k.shape[2] positions of which only the first L (kv_len's value) hold
        keys: the result is flash_attention(q, k[:, :, :L], v[:, :, :L]) with the same other arguments (query i
        at position L - Tq + i), and what lies past L (stale keys, NaN, inf) is never read into it. Or one
        length a batch row, shape [B]: row b as flash_attention on its own first kv_len[b] keys (continuous
        batching: each row a request of its own length, train/engine.py). The kernels
        read L on the device, and the launch depends on Tk_cap only (grid, KV splits, tuning, window bounds), so
        one decode step can be captured in a CUDA graph and replayed after the caller writes a new L into the
        same tensor. L must lie in [Tq, Tk_cap] with causal ([1, Tk_cap] without); it is checked on the host:
        always for a CPU q (in the op, so under torch.compile too), on a GPU only in plain eager outside a
        CUDA-graph capture (one .item(), a sync: a graph runner's eager warm-up checks it), not under
        torch.compile, vmap or a dispatch mode. A value out of range that reaches the kernels unchecked is
        clamped to [Tq, Tk_cap] with causal ([0, Tk_cap] without), so it reads nothing past the buffers, but its
        result means nothing. lengths_checked=True: the caller keeps kv_len (and block_table's pages) in range
        itself, so a GPU never reads them on the host here (the model's KV caches, whose owners check on the host:
        the batching engine's eager step would otherwise wait on the GPU in every layer); a CPU q still checks.
        block_table: with kv_len, k and v (and their scales) are a paged cache's pools [pages, Hkv, PAGE, D] and
        block_table int32 [B, pages a row] names row b's pages in order (model/gpt.py PagedKVCache): row b's
        position n lies in page block_table[b, n // PAGE] at slot n % PAGE; checked as kv_len is.
        Inference only: refused with gradients on (grad mode and q, k or v requiring grad), with dropout_p > 0
        and with doc_ids.
    k_scale, v_scale: with int8 k and v (an int8 KV cache, model/gpt.py KVCache(kv_dtype="int8")), their fp32
        scales [B, Hkv, Tk], one per key/value vector: the result is flash_attention on k * k_scale[..., None] (in
        fp32) and v * v_scale[..., None] read back in q's dtype, without making them: the kernels convert the int8 keys
        exactly to q's dtype, multiply each raw score q . k_int by its column's k scale in fp32 (before the
        softmax scale, cap and bias), and read each V tile as v_int * v_scale in q's dtype. Every other argument
        as above (kv_len too). Inference only: refused with gradients on, with dropout_p > 0 and with doc_ids;
        int8 k without scales, scales without int8 k and v, scales not fp32 [B, Hkv, Tk] on q's device, and an
        int8 q are refused.
    sinks: a float tensor [H] on q's device (bf16/fp16/fp32), or None: attention sinks (gpt-oss's learned per-head
        sink logits, model/layers.py MultiHeadAttention.attend). Each row of query head h gets one more softmax
        column of logit sinks[h] and no value, dropped after the softmax, so the row's weights sum to less than 1:
        O = sum_j e^(s_j) v_j / (e^(sinks[h]) + sum_j e^(s_j)). Combines with every argument above (dropout, documents,
        window, cap, ALiBi, kv_len, paged and int8 caches, the split-KV decode). Differentiable: the sinks get a
        gradient (-P_sink * rowsum(O * dO), summed over batch and rows). A -inf sink is attention without one.
    Returns [B, H, Tq, D] (a view of a [B, Tq, H, D] buffer, so merging heads is free).
    """
    no_func_transform("flash_attention", vmap_ok=True)
    if causal not in (True, False):  # bool("False") would be True
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if not isinstance(lengths_checked, bool):  # "no" is truthy: it would skip the check it asks to keep
        raise TypeError(f"lengths_checked must be a bool, got {type(lengths_checked).__name__} {lengths_checked!r}")
    if not is_real(dropout_p):  # the op takes a float: "0.1" would be read as 0.1
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__} {dropout_p!r}")
    q, k, v = _checked_inputs(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else _checked_scale(softmax_scale)
    softcap = _checked_softcap(softcap)
    if alibi_slopes is not None and not isinstance(alibi_slopes, torch.Tensor):
        raise TypeError(f"alibi_slopes must be a float32 tensor [H] or None, got {type(alibi_slopes).__name__}")
    # here too: slopes on another device (meta) would send the op to that device's (fake) kernel
    _check_alibi(q, alibi_slopes, finite=False)
    if alibi_slopes is not None and alibi_slopes.requires_grad and torch.is_grad_enabled():
        raise _learnable_slopes("alibi_slopes")
    dropout_p = float(dropout_p)
    _check_block_table(q, k, kv_len, block_table)
    if kv_len is not None:
        _checked_kv_len_call(q, k, v, causal, dropout_p, doc_ids, kv_len, block_table, lengths_checked)
    _check_int8_kv(q, k, v, k_scale, v_scale, dropout_p, block_table)
    if k_scale is not None:
        if torch.is_grad_enabled() and q.requires_grad:
            raise ValueError("int8 k and v (an int8 KV cache) are for inference only (no backward through a "
                             "quantized cache): call under torch.no_grad() or torch.inference_mode()")
        if doc_ids is not None:
            raise ValueError("int8 k and v (an int8 KV cache) do not take doc_ids (document masking is for packed "
                             "training sequences)")
    starts, ends = (None, None) if doc_ids is None else document_bounds(_checked_doc_ids(doc_ids, q, k, causal))
    if window is not None:
        starts, ends = window_bounds(_checked_window(window, causal), _cache_len(k, block_table), q.shape[0],
                                     q.device, starts, ends)
    if sinks is not None and not isinstance(sinks, torch.Tensor):
        raise TypeError(f"sinks must be a float tensor [H] (one sink logit per query head) or None, got "
                        f"{type(sinks).__name__}")
    _check_sinks(q, sinks)
    seed = _seed_tensor(seed, dropout_p, q.device)
    # the op's trailing optional inputs are left out while None (older callers' arity); sinks come 16th
    tail = (block_table, sinks) if sinks is not None else (() if block_table is None else (block_table,))
    args = (q, k, v, bool(causal), scale, dropout_p, seed, starts, ends, softcap, alibi_slopes, kv_len, k_scale,
            v_scale, *tail)
    out, _ = FlashAttnFunction.apply(*args) if plain_eager(args) else _flash_attn_fwd(*args)
    return out


def _checked_kv_len_call(q, k, v, causal, dropout_p, doc_ids, kv_len, block_table=None, lengths_checked=False):
    """What flash_attention refuses with kv_len (inference only), and on a GPU its value where a sync may be paid
    (never with lengths_checked: the caller's own)."""
    _check_kv_len(q, kv_len, dropout_p)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError("kv_len is for inference only (the backward takes no cache length): call under "
                         "torch.no_grad() or torch.inference_mode(), or pass tensors that do not require grad")
    if doc_ids is not None:
        raise ValueError("kv_len does not take doc_ids (document masking is for packed training sequences)")
    # the shapes first (as the op checks them): a causal Tq past the cache or an empty cache leaves no valid L,
    # and is named as such, not as a length out of an empty range
    _check_shapes(q, k, v, causal, dropout_p, block_table)
    # On the CPU the op checks the value itself, in every mode (a free read). On a GPU plain eager only: not under
    # torch.compile (a .item() there breaks the graph), a dispatch mode or transform, nor inside a CUDA-graph capture
    # (it cannot sync).
    if kv_len.is_cuda and plain_eager((q, kv_len)) and not torch.cuda.is_current_stream_capturing() \
            and not lengths_checked:
        _check_kv_len_value(kv_len, q.shape[2], _cache_len(k, block_table), causal)
        if block_table is not None:
            _check_block_table_values(block_table, k.shape[0])


def document_bounds(doc_ids):
    """Each position's document as int32 [B, T] (starts, ends): the first position of its run of
    equal ids, and one past its last. The kernels mask with starts (query i sees key j iff
    starts[i] <= j <= i) and skip tiles with both."""
    B, T = doc_ids.shape
    pos = torch.arange(T, device=doc_ids.device).expand(B, T)
    new = torch.ones_like(doc_ids, dtype=torch.bool)
    new[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]  # a document starts here
    starts = torch.where(new, pos, 0).cummax(1).values
    # the next start after each position (T past the last): a suffix minimum
    next_start = torch.full_like(pos, T)
    next_start[:, :-1] = torch.where(new[:, 1:], pos[:, 1:], T)
    ends = next_start.flip(1).cummin(1).values.flip(1)
    return starts.to(torch.int32).contiguous(), ends.to(torch.int32).contiguous()


def window_bounds(window, Tk, batch=1, device=None, starts=None, ends=None):
    """The bounds (starts, ends), int32 [batch, Tk], of local attention over the last `window`
    positions: query i sees key j iff i - window < j <= i, so starts[i] = i - window + 1 (from 0)
    and ends[j] = j + window (up to Tk). With document bounds given, their intersection: a query
    sees the keys of its own document within its window. A window of Tk or more masks nothing:
    (starts, ends) come back unchanged then (None, None without documents: the dense kernels)."""
    if window >= Tk:
        return starts, ends
    device = starts.device if starts is not None else device
    pos = torch.arange(Tk, dtype=torch.int32, device=device)
    w_starts = (pos - (window - 1)).clamp_min(0).expand(batch, Tk)  # one row for all: stride 0
    w_ends = (pos + window).clamp_max(Tk).expand(batch, Tk)
    if starts is None:
        return w_starts, w_ends
    return torch.maximum(starts, w_starts), torch.minimum(ends, w_ends)


def _checked_window(window, causal):
    if not is_int(window):  # 2.0 or "8" would pass a comparison; a bool is not a width
        raise TypeError(f"window must be an int (how many positions a query sees), got "
                        f"{type(window).__name__} {window!r}")
    if window < 1:
        raise ValueError(f"window must be at least 1 (a query sees itself), got {window}")
    if not causal:  # (a bool by now, or 1 or numpy's True: flash_attention takes them as causal)
        raise ValueError("window (local attention) needs causal=True: the kernels skip tiles by both masks")
    return int(window)


def _checked_doc_ids(doc_ids, q, k, causal):
    if not isinstance(doc_ids, torch.Tensor):
        raise TypeError(f"doc_ids must be an integer tensor [B, Tk], got {type(doc_ids).__name__}")
    if doc_ids.dtype.is_floating_point or doc_ids.dtype.is_complex or doc_ids.dtype == torch.bool:
        raise TypeError(f"doc_ids must hold integer document ids, got dtype {doc_ids.dtype}")
    B, Tk = q.shape[0], k.shape[2]
    if tuple(doc_ids.shape) != (B, Tk):
        raise ValueError(f"doc_ids must be [B, Tk] = [{B}, {Tk}] (one id per key position), got {tuple(doc_ids.shape)}")
    if doc_ids.device != q.device:
        raise ValueError(f"doc_ids is on {doc_ids.device}, q on {q.device}: they must share a device")
    if not causal:
        raise ValueError("doc_ids (document masking) needs causal=True: the kernels skip tiles by both masks")
    return doc_ids


def _check_bounds(q, k, causal, starts, ends, block_table=None):
    """starts/ends as the kernels read them, for a caller of the op itself."""
    if starts is None and ends is None:
        return
    if starts is None or ends is None:
        raise ValueError("document bounds need both starts and ends (document_bounds or window_bounds gives them)")
    Tk = _cache_len(k, block_table)
    for name, t in (("starts", starts), ("ends", ends)):
        if t.dtype != torch.int32 or tuple(t.shape) != (q.shape[0], Tk) or t.device != q.device \
                or t.stride(-1) != 1:
            raise ValueError(f"{name} must be int32 [B, Tk] = [{q.shape[0]}, {Tk}] on {q.device} with unit "
                             f"stride, got {t.dtype} {tuple(t.shape)} on {t.device}")
    if not causal:
        raise ValueError("document masking needs causal=True")


def dropout_mask(seed, B, H, Tq, Tk, p, device):
    """The keep-mask (bool [B, H, Tq, Tk], True = kept) that flash_attention(..., dropout_p=p, seed=seed) uses."""
    device = torch.device(device)
    check_runnable(torch.empty(0, device=device), "device")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p must be in [0, 1), got {p}")
    if B * H > MAX_GRID_YZ:
        raise ValueError(f"dropout_mask: batch x heads = {B * H} > {MAX_GRID_YZ} (CUDA's grid z limit); "
                         "rebuild the mask a few sequences at a time")
    out = torch.empty((B, H, Tq, Tk), dtype=torch.int8, device=device)
    if out.numel() == 0:
        return out.bool()
    return _mask_launch(out, _as_seed(seed, device), float(p)).bool()


@on_tensor_device
def _mask_launch(out, seed, p):
    B, H, Tq, Tk = out.shape
    block = 64  # a plain elementwise kernel: big tiles keep the interpreter's grid small too
    grid = (cdiv(Tq, block), cdiv(Tk, block), B * H)
    _dropout_mask_kernel[grid](out, seed, Tq, Tk, p, BLOCK_M=block, BLOCK_N=block)
    return out
