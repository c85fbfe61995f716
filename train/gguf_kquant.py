"""ggml's K-quants Q4_K, Q5_K and Q6_K written in numpy: the gguf package only dequantizes them.

A K-quant block covers 256 inputs of a row (QK_K) in sub-blocks, each with its own scale quantized against the
block's fp16 super-scale (ggml-common.h's block_q4_K / block_q5_K / block_q6_K):
- Q4_K / Q5_K: 8 sub-blocks of 32, w = d sc_j q - dmin m_j, q 4 (5) bits, sc_j and m_j 6 bits each (12 bytes),
  d and dmin fp16. 144 (176) bytes a block: 4.5 (5.5) bits a weight.
- Q6_K: 16 sub-blocks of 16, w = d sc_j (q - 32), q 6 bits, sc_j int8, d fp16. 210 bytes: 6.5625 bits a weight.

The search for each sub-block's scale (and min) follows ggml-quants.c's reference quantizers, the ones
llama-quantize uses without an importance matrix: quantize_row_q4_K_ref / q5_K_ref (make_qkx2_quants: the
weighted least-squares scale and min over a sweep of trial scales, weights av_x + |x|) and quantize_row_q6_K_ref
(make_qx_quants, rmse_type 1: a sweep of 19 trial scales, weights x^2), then the sub-scales rounded against the
block's largest and the levels rounded again with the scales as stored. Written here over all sub-blocks at once
(numpy, float32 as ggml computes); ties and summation order may round a level differently from llama.cpp's C, so
the bytes need not be identical to llama-quantize's: each block is a valid encoding whose error is the same kind.

Each quantizer returns (blocks, value): blocks uint8 [N, K / 256 * block bytes] as gguf.quants.quantize returns
them (GGUFWriter.add_tensor's raw_dtype), value float32 [N, K] the matrix those blocks hold, computed from the levels
and scales chosen the way ggml's dequantizers compute it (gguf.quants.dequantize of blocks gives it exactly)."""
import numpy as np

QK_K = 256
GROUP_MAX_EPS = 1e-15  # (ggml-quants.c's: below it a Q6_K sub-block / block is all zero)
BLOCK_BYTES = {"q4_k": 144, "q5_k": 176, "q6_k": 210}


def _fp16(x):
    """x rounded to fp16 (the block's stored field) and back to float32, as GGML_FP16_TO_FP32 reads it."""
    return x.astype(np.float16).astype(np.float32)


def _rint(x):
    """ggml's nearest_int (a float32 add of 1.5 * 2^23): round half to even, as np.rint."""
    return np.rint(x)


def _qkx2(x, w, nmax: int, rmin: float, rdelta: float, nstep: int):
    """make_qkx2_quants over rows of x [B, n] (weights w): (scale [B], the_min [B] >= 0, L [B, n] 0..nmax) with
    x ~ scale L - the_min. The first guess spans [min(x, 0), max x] in nmax steps; each of nstep + 1 trial inverse
    scales (nmax + rmin + rdelta i) / range rounds the levels, and the weighted least-squares scale and min for those
    levels (min held at most 0) are kept where their weighted squared error is the lowest so far; each trial spans
    from the min kept so far."""
    lo = np.minimum(x.min(axis=-1), 0)
    hi = x.max(axis=-1)
    sum_w = w.sum(axis=-1)
    sum_x = (w * x).sum(axis=-1)
    flat = hi == lo  # (all zero, or one value <= 0: L 0, the min its value)
    span = np.where(flat, 1, hi - lo).astype(np.float32)
    xs = x - lo[:, None]
    iscale = nmax / span
    scale = 1 / iscale
    L = np.clip(_rint(iscale[:, None] * xs), 0, nmax)
    best = (w * (scale[:, None] * L + lo[:, None] - x) ** 2).sum(axis=-1)
    mn = lo
    for i in range(nstep + 1):
        # (each trial spans from the best min so far, as the C's loop reads the min it updates)
        span = np.where(flat, 1, hi - mn).astype(np.float32)
        with np.errstate(divide="ignore"):
            iscale = (np.float32(rmin) + np.float32(rdelta) * np.float32(i) + nmax) / span  # (the C's float sums)
        La = np.clip(_rint(iscale[:, None] * (x - mn[:, None])), 0, nmax)
        sum_l, sum_l2, sum_xl = (w * La).sum(axis=-1), (w * La * La).sum(axis=-1), (w * La * x).sum(axis=-1)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0  # (a positive min is held at 0: the scale alone, least squares through 0)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
        this_min = np.where(pos, 0, this_min)
        err = (w * (this_scale[:, None] * La + this_min[:, None] - x) ** 2).sum(axis=-1)
        better = ok & (err < best)
        L = np.where(better[:, None], La, L)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    L = np.where(flat[:, None], 0, L)
    return np.where(flat, 0, scale).astype(np.float32), (-mn).astype(np.float32), L


def _q45_k(x, bits: int):
    """Q4_K (bits 4) or Q5_K (5): quantize_row_q4_K_ref / quantize_row_q5_K_ref over x [N, K], K a multiple of
    256. The sub-blocks' scales and mins become 6-bit levels of the block's largest (d = max scale / 63, dmin = max
    min / 63, fp16), and each sub-block's levels are rounded again against d sc_j and dmin m_j as stored."""
    nmax = (1 << bits) - 1
    rmin, rdelta, nstep = (-1.0, 0.1, 20) if bits == 4 else (-0.5, 0.1, 15)
    N, K = x.shape
    nb = N * K // QK_K
    sub = x.reshape(nb * 8, 32)
    av_x = np.sqrt((sub * sub).sum(axis=-1) / 32)
    scales, mins, L = _qkx2(sub, av_x[:, None] + np.abs(sub), nmax, rmin, rdelta, nstep)
    scales, mins, L = scales.reshape(nb, 8), mins.reshape(nb, 8), L.reshape(nb, 8, 32)
    max_scale = np.maximum(scales.max(axis=-1), 0)
    max_min = np.maximum(mins.max(axis=-1), 0)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, 63 / max_scale, 0).astype(np.float32)
        inv_min = np.where(max_min > 0, 63 / max_min, 0).astype(np.float32)
    ls = np.clip(_rint(inv_scale[:, None] * scales), 0, 63).astype(np.uint8)
    lm = np.clip(_rint(inv_min[:, None] * mins), 0, 63).astype(np.uint8)
    d = _fp16(max_scale / np.float32(63))
    dmin = _fp16(max_min / np.float32(63))
    dl = d[:, None] * ls.astype(np.float32)  # (float32, as ggml's d * sc)
    ml = dmin[:, None] * lm.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        again = np.clip(_rint((sub.reshape(nb, 8, 32) + ml[..., None]) / dl[..., None]), 0, nmax)
    # (a sub-block whose scale stored as 0 keeps its first levels: they multiply 0, as the C's `continue`)
    L = np.where(dl[..., None] != 0, again, L).astype(np.uint8)
    value = (dl[..., None] * L.astype(np.float32) - ml[..., None]).reshape(N, K)
    # the 12 bytes of scales: sub-blocks 0..3 in bytes 0..3 (scale) and 4..7 (min), 6 bits each; 4..7 their low 4
    # bits in bytes 8..11 (scale low, min high) and their top 2 bits in the top bits of bytes 0..7
    packed = np.empty((nb, 12), np.uint8)
    packed[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    packed[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:] & 15) | ((lm[:, 4:] & 15) << 4)
    # the levels: each 64 inputs as 32 bytes, input l's low 4 bits below input l + 32's
    pairs = L.reshape(nb, 4, 2, 32)
    qs = ((pairs[:, :, 0] & 15) | ((pairs[:, :, 1] & 15) << 4)).reshape(nb, 128)
    fields = [d.astype(np.float16).view(np.uint8).reshape(nb, 2), dmin.astype(np.float16).view(np.uint8).reshape(nb, 2),
              packed]
    if bits == 5:  # their fifth bits: byte l holds bit 4 of input l of each sub-block j as its bit j
        high = (L.reshape(nb, 8, 32) >> 4).astype(np.uint8)
        fields.append((high << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1, dtype=np.uint8))
    fields.append(qs)
    return np.concatenate(fields, axis=-1).reshape(N, -1), value


def quantize_q4_k(x):
    """x float [N, K] (K a multiple of 256) as Q4_K blocks: (uint8 [N, K / 256 * 144], its float32 value)."""
    return _q45_k(_rows(x), 4)


def quantize_q5_k(x):
    """x float [N, K] (K a multiple of 256) as Q5_K blocks: (uint8 [N, K / 256 * 176], its float32 value)."""
    return _q45_k(_rows(x), 5)


def _qx(x, nmax: int):
    """make_qx_quants(n, nmax, x, L, rmse_type 1, no weights) over rows of x [B, n]: (scale [B], L [B, n] 0..2 nmax
    - 1) with x ~ scale (L - nmax). The signed value of the largest |x| goes to level -nmax; 19 trial inverse scales
    -(nmax + 0.1 i) / max, i in -9..9, are tried and the one whose least-squares fit (weights x^2) explains the most
    kept, with its least-squares scale."""
    idx = np.abs(x).argmax(axis=-1)  # (the first of equal |x|, as the C's strict >)
    mx = np.take_along_axis(x, idx[:, None], axis=-1)[:, 0]
    zero = np.abs(mx) < GROUP_MAX_EPS
    mx = np.where(zero, 1, mx).astype(np.float32)
    w = x * x

    def fit(iscale):
        l = np.clip(_rint(iscale[:, None] * x), -nmax, nmax - 1)
        return l, (w * x * l).sum(axis=-1), (w * l * l).sum(axis=-1)

    l, sumlx, suml2 = fit(-nmax / mx)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 > 0, sumlx / suml2, 0).astype(np.float32)
    best = scale * sumlx
    L = l
    for i in range(-9, 10):
        if i == 0:
            continue
        la, slx, sl2 = fit(-(nmax + np.float32(0.1) * i) / mx)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        with np.errstate(divide="ignore", invalid="ignore"):
            s = slx / sl2
        L = np.where(better[:, None], la, L)
        scale = np.where(better, s, scale)
        best = np.where(better, s * slx, best)
    return np.where(zero, 0, scale).astype(np.float32), np.where(zero[:, None], 0, L + nmax)


def quantize_q6_k(x):
    """x float [N, K] (K a multiple of 256) as Q6_K blocks: (uint8 [N, K / 256 * 210], its float32 value),
    quantize_row_q6_K_ref: each 16's scale from _qx, the block's d = -(the largest |scale|, signed) / 128 (fp16) and
    each scale an int8 of it (-128..127), the levels rounded again against d sc_j as stored."""
    x = _rows(x)
    N, K = x.shape
    nb = N * K // QK_K
    sub = x.reshape(nb * 16, 16)
    scales, L = _qx(sub, 32)
    scales, L, sub = scales.reshape(nb, 16), L.reshape(nb, 16, 16), sub.reshape(nb, 16, 16)
    idx = np.abs(scales).argmax(axis=-1)
    max_scale = np.take_along_axis(scales, idx[:, None], axis=-1)[:, 0]
    zero = np.abs(max_scale) < GROUP_MAX_EPS  # (the C writes the whole block as zero bytes)
    iscale = np.float32(-128) / np.where(zero, 1, max_scale).astype(np.float32)
    d = np.where(zero, 0, _fp16(1 / iscale)).astype(np.float32)
    sc = np.where(zero[:, None], 0, np.clip(_rint(iscale[:, None] * scales), -128, 127)).astype(np.int8)
    dl = d[:, None] * sc.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        again = np.clip(_rint(sub / dl[..., None]), -32, 31) + 32
    L = np.where(dl[..., None] != 0, again, L)
    L = np.where(zero[:, None, None], 0, L).astype(np.uint8)
    value = (dl[..., None] * (L.astype(np.float32) - 32)).reshape(N, K)
    # the levels, each 128 inputs as 64 bytes of low 4 bits (inputs l and l + 64 in byte l, l + 32 and l + 96 in
    # byte l + 32) and 32 bytes of high 2 bits (inputs l, l + 32, l + 64, l + 96 in byte l, lowest first)
    q = L.reshape(nb, 2, 4, 32)
    ql = np.concatenate([(q[:, :, 0] & 15) | ((q[:, :, 2] & 15) << 4),
                         (q[:, :, 1] & 15) | ((q[:, :, 3] & 15) << 4)], axis=-1).reshape(nb, 128)
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4)
          | ((q[:, :, 3] >> 4) << 6)).reshape(nb, 64)
    blocks = np.concatenate([ql, qh, sc.view(np.uint8), d.astype(np.float16).view(np.uint8).reshape(nb, 2)], axis=-1)
    return blocks.reshape(N, -1), value


def _rows(x):
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] % QK_K:
        raise ValueError(f"K-quants take rows of whole blocks of {QK_K}: got shape {x.shape}")
    return x


QUANTIZERS = {"q4_k": quantize_q4_k, "q5_k": quantize_q5_k, "q6_k": quantize_q6_k}
