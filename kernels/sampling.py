"""Sampling's last step in one Triton kernel: temperature, top-k, top-p and min-p cut the logits and a token is drawn
by inverse CDF from one uniform number a row, without sorting the vocabulary. Reference:
`tritongpt.train.generate.sampling_logits` (the cuts) then `tritongpt.model.sampling.draw_with_uniform` (the draw);
`sample_next(..., triton=True)` picks this kernel.

Why no sort: every cut keeps an upper set of the row's logits (the top k; the likeliest tokens whose mass above them is
under top_p; those at least min_p times the likeliest), so each is one threshold on the logit, found by a radix select
instead of torch's sort of the whole row. The tempered logit (logit - max) / T, the value the reference compares, is
computed in fp32 as it does, and its bits turned into a 32-bit key that orders as the values do (ties where the
reference's ties are); eight radix passes each fix four more bits of the threshold key: the k-th largest key for top-k
(from each 4-bit digit's count of tokens), then the smallest kept key for top-p (from each digit's mass: the lowest
digit whose mass above stays under top_p x the row's mass among the top-k). min-p is exp((logit - max) / T) >= min_p.
The cuts keep transformers' order (top-k, top-p, min-p) or, with min_p_first, vLLM's (min-p, top-k, top-p): min-p and
top-k keep the same tokens in either order (two upper sets, the likeliest token in both), but top-p then weighs only
the tokens min-p kept, so in vLLM's order every top-p mass counts only the weights >= min_p (`floor`; 0 otherwise).
The last pass draws: the kept tokens' weights in vocabulary order, a running cumulative sum over the blocks, and the
first token whose sum passes u x their total (the reference's inverse CDF, the same token for the same u up to the sums'
rounding). Ties at the top-k threshold are all kept, as the reference's top-k keeps them; those at the top-p threshold
are ranked in vocabulary order, as the reference's stable sort ranks them, and kept while under it.

Each row's settings (temperature, top_k, top_p, min_p and min-p's order) are one launch's scalars (sample_tokens)
or loaded per row from [B] tensors (sample_token_rows: the serving engine's step, requests of different settings in
one launch); then every cut is compiled in and a row skips the passes of the cuts it does not take (top_k 0 or >= V,
top_p 1; min-p has none, its compare in the draw keeps every token at min_p 0), so it reads the row as often as it
would alone.

One program a row (ROWS under the interpreter, which pays per program); between passes it keeps a few scalars and,
in a scratch row of global memory, the tokens still in play: a radix pass over the whole row costs a [BLOCK, 16]
compare a block, so only the first three of each select read the row (a key's top 12 bits are its sign, exponent and
3 mantissa bits: after them only the tokens within an eighth of an octave of the threshold's distance from the max
remain); those are copied out once (a prefix sum of the kept flags gives each its place) and the five other passes
read the copy. Top-p after top-k reads only the top-k's tokens, copied. Then two light passes over the row draw. The
weights are recomputed in each pass rather than stored. Passes over the row: 1 (max) + 4 (top-k) + 5 (top-p alone,
or 1 after top-k) + 2 (draw).

Public API: `sample_tokens(logits, u, temperature, top_k=None, top_p=None, min_p=None, min_p_first=False) -> ids [B]
int64`, and `sample_token_rows(logits, u, temperature, top_k, top_p, min_p, min_p_first) -> ids [B] int64` with each
setting a [B] tensor, through the torch.library custom ops `tritongpt::sample_tokens` and
`tritongpt::sample_token_rows` (fake impls), so torch.compile keeps them as opaque calls.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from tritongpt._env import triton_interpreting
from tritongpt._types import is_real
from tritongpt.errors import UserError
from tritongpt.kernels._common import cdiv, check_runnable, custom_op, next_pow2, on_tensor_device


@triton.jit
def _keys(x):
    """fp32 values -> int64 keys in [0, 2^32) that order as the values do (a negative float's magnitude bits
    flipped, then the sign bit's offset taken away). -0.0 is keyed as 0.0: one value to the reference's comparisons
    (a top-k tie), where its bits would key it below."""
    b = tl.where(x == 0.0, 0, x.to(tl.int32, bitcast=True))
    return tl.where(b >= 0, b, b ^ 0x7FFFFFFF).to(tl.int64) + 2147483648


@triton.jit
def _count_level(src, n, kth, need, shift, mx, temperature, BLOCK: tl.constexpr):
    """Top-k's radix pass over src[0:n]: the 4-bit digit at `shift` of the need-th largest key among those whose
    higher digits are kth's (at shift 28, a shift by 32 of a key below 2^32: all), from each digit's count.
    -> (kth with the digit set, need left within it)."""
    offs0 = tl.arange(0, BLOCK)
    digit = tl.arange(0, 16)
    count = tl.zeros((16,), tl.int32)
    for start in range(0, n, BLOCK):
        offs = start + offs0
        x = tl.load(src + offs, mask=offs < n, other=float("-inf")).to(tl.float32)
        key = _keys((x - mx) / temperature)
        inside = (offs < n) & ((key >> (shift + 4)) == (kth >> (shift + 4)))
        d = ((key >> shift) & 15).to(tl.int32)
        count += tl.sum(((d[:, None] == digit[None, :]) & inside[:, None]).to(tl.int32), 0)
    above = tl.sum(count, 0) - tl.cumsum(count, 0)  # keys in higher digits
    best = tl.max(tl.where((above < need) & (above + count >= need), digit, -1), 0)
    need -= tl.sum(tl.where(digit == best, above, 0), 0)
    return kth | (best.to(tl.int64) << shift), need


@triton.jit
def _mass_level(src, n, pth, above_all, limit, shift, mx, temperature, floor, BLOCK: tl.constexpr):
    """Top-p's radix pass over src[0:n]: the 4-bit digit at `shift` of the smallest key whose mass above is under
    limit, among the keys whose higher digits are pth's; above_all: the mass of the keys above those (a weight under
    floor counts 0: min-p's cut, in vLLM's order, before top-p). From each digit's mass: the lowest digit whose mass
    above is under the limit (an empty digit below the last kept token's makes the same cut: no key lies between
    them). -> (pth with the digit set, the mass above its keys)."""
    offs0 = tl.arange(0, BLOCK)
    digit = tl.arange(0, 16)
    part = tl.zeros((16,), tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + offs0
        z = (tl.load(src + offs, mask=offs < n, other=float("-inf")).to(tl.float32) - mx) / temperature
        key = _keys(z)
        inside = (offs < n) & ((key >> (shift + 4)) == (pth >> (shift + 4)))
        d = ((key >> shift) & 15).to(tl.int32)
        hit = (d[:, None] == digit[None, :]) & inside[:, None]
        w = tl.exp(z)
        part += tl.sum(tl.where(hit, tl.where(w >= floor, w, 0.0)[:, None], 0.0), 0)
    # each digit's mass above: the sum of the higher digits' own, not the total less a running sum, whose rounding
    # (~1e-7 of the mass) left above the top digit passes a tiny top_p's limit: no digit under it, every token cut
    above = above_all + tl.sum(tl.where(digit[None, :] > digit[:, None], part[None, :], 0.0), 1)
    best = tl.min(tl.where(above < limit, digit, 16), 0)
    return pth | (best.to(tl.int64) << shift), tl.sum(tl.where(digit == best, above, 0.0), 0)


@triton.jit
def _compact(src, n, dst, prefix, shift, lower, mx, temperature, floor, BLOCK: tl.constexpr):
    """dst[0:m] = the values of src[0:n], in order, whose key has prefix's bits from `shift` up (32: any) and is at
    least lower: the few tokens the later radix passes still need, so they read m values, not the row.
    -> (m, their mass: of the weights >= floor)."""
    offs0 = tl.arange(0, BLOCK)
    m = tl.full((), 0, tl.int32)
    mass = tl.full((), 0.0, tl.float32)
    tl.debug_barrier()  # every thread done reading dst (the last passes over it) before it is written
    for start in range(0, n, BLOCK):
        offs = start + offs0
        x = tl.load(src + offs, mask=offs < n, other=float("-inf")).to(tl.float32)
        key = _keys((x - mx) / temperature)
        keep = (offs < n) & ((key >> shift) == (prefix >> shift)) & (key >= lower)
        tl.store(dst + m + tl.cumsum(keep.to(tl.int32), 0) - 1, x, mask=keep)
        m += tl.sum(keep.to(tl.int32), 0)
        w = tl.exp((x - mx) / temperature)
        mass += tl.sum(tl.where(keep & (w >= floor), w, 0.0), 0)
    tl.debug_barrier()  # written before any thread reads it
    return m, mass


@triton.jit
def _kept(x, offs, V, mx, temperature, cut, pth, above_p, limit, tied, min_p, TOP_P: tl.constexpr,
          MIN_P: tl.constexpr):
    """(the kept tokens' weights in a block of logits x, 0 where cut; the count of tokens tied at the top-p threshold
    so far). Those tied at it are ranked in vocabulary order (the reference's stable sort) and each kept while the
    mass above it, the tied ones before it included, is under the limit: a cut inside a run of ties."""
    z = (x - mx) / temperature
    w = tl.exp(z)
    key = _keys(z)
    keep = (offs < V) & (key >= cut)
    if TOP_P:
        tie = keep & (key == pth)
        rank = tied + tl.cumsum(tie.to(tl.int32), 0) - 1
        keep = keep & ((key != pth) | (above_p + rank.to(tl.float32) * w < limit))
        tied += tl.sum(tie.to(tl.int32), 0)
    if MIN_P:
        keep = keep & (w >= min_p)
    return tl.where(keep, w, 0.0), tied


@triton.jit
def _sample_kernel(Logits, U, Out, Scratch, n_rows, V, stride, Temperature, TopK, TopP, MinP, Floor,
                   TOP_K: tl.constexpr, TOP_P: tl.constexpr, MIN_P: tl.constexpr, PER_ROW: tl.constexpr,
                   ROWS: tl.constexpr, BLOCK: tl.constexpr):
    offs0 = tl.arange(0, BLOCK)
    for i in range(ROWS):
        r = tl.program_id(0) * ROWS + i
        if r < n_rows:
            base = Logits + r.to(tl.int64) * stride
            scratch = Scratch + r.to(tl.int64) * V
            # the row's settings: PER_ROW, loaded from [B] tensors (the engine's step draws requests of different
            # settings in one launch); else the launch's scalars
            if PER_ROW:
                temperature = tl.load(Temperature + r).to(tl.float32)
                top_k = tl.load(TopK + r).to(tl.int32)
                top_p = tl.load(TopP + r).to(tl.float32)
                min_p = tl.load(MinP + r).to(tl.float32)
                floor = tl.load(Floor + r).to(tl.float32)
            else:
                temperature = Temperature
                top_k = TopK
                top_p = TopP
                min_p = MinP
                floor = Floor
            # which cuts this row takes: top_k 0 (or >= V) and top_p 1 are none (TOP_K / TOP_P: any row may)
            use_k = (top_k > 0) & (top_k < V)
            use_p = top_p < 1.0
            # the row's max (the reference subtracts it before dividing by T), and whether it holds a NaN
            mx = tl.full((), float("-inf"), tl.float32)
            nan = tl.full((), 0, tl.int32)
            for start in range(0, V, BLOCK):
                offs = start + offs0
                x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
                mx = tl.maximum(mx, tl.max(x, 0))
                nan = tl.maximum(nan, tl.max((x != x).to(tl.int32), 0))
            # a row of -inf only: weights exp(-inf) = 0, not exp(-inf - -inf) = NaN; it draws token 0
            mx = tl.where(mx == float("-inf"), 0.0, mx)
            # top-k: the k-th largest key, four bits a pass from the top; kth stays 0 (every key) without it. After
            # three passes over the row only the keys sharing kth's top 12 bits are left in play: copied to the row's
            # scratch, the five other passes read those
            kth = tl.full((), 0, tl.int64)
            if TOP_K:
                if use_k:
                    need = tl.full((), 0, tl.int32) + top_k  # how many keys at or above the threshold still wanted
                    for level in range(3):
                        kth, need = _count_level(base, V, kth, need, 28 - 4 * level, mx, temperature, BLOCK)
                    m, _ = _compact(base, V, scratch, kth, 20, 0, mx, temperature, floor, BLOCK)
                    for level in range(3, 8):
                        kth, need = _count_level(scratch, m, kth, need, 28 - 4 * level, mx, temperature, BLOCK)
            # top-p: the smallest key whose mass above (among the top-k, and in vLLM's order the weights >= floor: what
            # min-p kept) is under top_p x their mass; its passes read the top-k's tokens alone (copied), or without
            # top-k the row three times and then the keys sharing pth's top 12 bits. Without top-p pth is -1, a key
            # none has (_kept's ties at it)
            pth = tl.full((), -1, tl.int64)
            limit = tl.full((), 0.0, tl.float32)
            above_all = tl.full((), 0.0, tl.float32)  # the mass of keys above the prefix fixed so far
            if TOP_P:
                if use_p:
                    pth = tl.full((), 0, tl.int64)
                    if use_k:
                        m, top_mass = _compact(base, V, scratch, kth, 32, kth, mx, temperature, floor, BLOCK)
                        limit = top_p * top_mass
                        for level in range(8):
                            pth, above_all = _mass_level(scratch, m, pth, above_all, limit, 28 - 4 * level, mx,
                                                         temperature, floor, BLOCK)
                    else:
                        mass = tl.zeros((BLOCK,), tl.float32)
                        for start in range(0, V, BLOCK):
                            offs = start + offs0
                            x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
                            w = tl.exp((x - mx) / temperature)
                            mass += tl.where(w >= floor, w, 0.0)
                        limit = top_p * tl.sum(mass, 0)
                        for level in range(3):
                            pth, above_all = _mass_level(base, V, pth, above_all, limit, 28 - 4 * level, mx,
                                                         temperature, floor, BLOCK)
                        m, _ = _compact(base, V, scratch, pth, 20, 0, mx, temperature, floor, BLOCK)
                        for level in range(3, 8):
                            pth, above_all = _mass_level(scratch, m, pth, above_all, limit, 28 - 4 * level, mx,
                                                         temperature, floor, BLOCK)
            # the draw: the first token (vocabulary order) whose running sum of kept weights passes u x their total
            # (above_all is now the mass above pth: of the keys greater than it)
            cut = tl.maximum(kth, pth)
            total = tl.full((), 0.0, tl.float32)
            tied = tl.full((), 0, tl.int32)
            for start in range(0, V, BLOCK):
                offs = start + offs0
                x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
                w, tied = _kept(x, offs, V, mx, temperature, cut, pth, above_all, limit, tied, min_p, TOP_P, MIN_P)
                total += tl.sum(w, 0)
            target = tl.load(U + r) * total
            run = tl.full((), 0.0, tl.float32)
            found = tl.full((), 0, tl.int32) + V
            last = tl.full((), 0, tl.int32)  # the last kept token: u x total rounded up to the total lands there
            tied = tl.full((), 0, tl.int32)
            for start in range(0, V, BLOCK):
                offs = start + offs0
                x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
                w, tied = _kept(x, offs, V, mx, temperature, cut, pth, above_all, limit, tied, min_p, TOP_P, MIN_P)
                past = (run + tl.cumsum(w, 0) > target) & (w > 0)
                found = tl.minimum(found, tl.min(tl.where(past, offs, V), 0))
                last = tl.maximum(last, tl.max(tl.where(w > 0, offs, 0), 0))
                run += tl.sum(w, 0)
            # a NaN leaves nothing to draw: token 0, draw_from_probs' answer (the passes above ran on NaN keys and
            # masses, to no effect but this row's time)
            tl.store(Out + r, tl.where(nan > 0, 0, tl.where(found < V, found, last)).to(tl.int64))


def _tiles(V: int) -> tuple:
    """(BLOCK, ROWS, num_warps): one block of the row at a time (the radix passes hold a [BLOCK, 16] tile);
    the interpreter takes a small row whole and four rows a program."""
    if triton_interpreting():
        return min(next_pow2(V), 4096), 4, 4
    return 1024, 1, 8


# (bench/compile_check.py calls this on meta tensors to compile the exact launch for sm_90.)
@on_tensor_device
def _launch(logits, u, out, temperature: float, top_k: Optional[int], top_p: Optional[float],
            min_p: Optional[float], min_p_first: bool = False):
    """The kernel on checked arguments, one setting for every row: out [B] int64 written."""
    B, V = logits.shape
    if B == 0:
        return
    block, rows, warps = _tiles(V)
    use_k = top_k is not None and top_k < V
    use_p = top_p is not None and top_p < 1.0
    # a top_p under fp32's range (or under its normal numbers, flushed on a GPU) would be a limit of 0 that no mass
    # passes under: every token cut. Any top_p below 1 / V gives one cut (the likeliest token's weight is 1, the
    # row's mass at most V: the mass above any other token is over the limit), so 1e-30 stands for them all.
    top_p = max(top_p, 1e-30) if use_p else 1.0
    # the radix passes' copies of the tokens still in play, a row each (fp32: at most the row)
    scratch = torch.empty((B, V) if use_k or use_p else (1,), dtype=torch.float32, device=logits.device)
    _sample_kernel[(cdiv(B, rows),)](
        logits, u, out, scratch, B, V, logits.stride(0), float(temperature), int(top_k) if use_k else 0,
        float(top_p), float(min_p or 0.0), float(min_p or 0.0) if min_p_first else 0.0, TOP_K=use_k, TOP_P=use_p,
        MIN_P=bool(min_p), PER_ROW=False, ROWS=rows, BLOCK=block, num_warps=warps)


@on_tensor_device
def _launch_rows(logits, u, out, temperature, top_k, top_p, min_p, min_p_first):
    """The kernel on checked arguments, each row its own settings ([B] tensors on logits' device: fp32 temperature,
    int top_k (0: none), fp32 top_p (1: none) and min_p (0: none), bool min_p_first): out [B] int64 written. Every
    cut is compiled in and each row skips those it does not take (which rows take which is on the device: knowing
    it here would cost a host sync)."""
    B, V = logits.shape
    if B == 0:
        return
    block, rows, warps = _tiles(V)
    top_p = top_p.clamp(min=1e-30)  # (_launch's 1e-30: a top_p below fp32's normal numbers keeps the likeliest)
    # the kernel reads top_k as int32: an int64 past 2^31 would wrap (2^32 + 1 to a top-1 cut); V and more are all
    # no cut, so V stands for them
    top_k = top_k.clamp(max=V)
    floor = torch.where(min_p_first, min_p, 0.0)  # top-p's mass counts the weights >= floor: min_p in vLLM's order
    scratch = torch.empty((B, V), dtype=torch.float32, device=logits.device)
    _sample_kernel[(cdiv(B, rows),)](
        logits, u, out, scratch, B, V, logits.stride(0), temperature, top_k, top_p, min_p, floor, TOP_K=True,
        TOP_P=True, MIN_P=True, PER_ROW=True, ROWS=rows, BLOCK=block, num_warps=warps)


@custom_op("tritongpt::sample_tokens")
def _sample_tokens_op(logits: torch.Tensor, u: torch.Tensor, temperature: float, top_k: Optional[int] = None,
                      top_p: Optional[float] = None, min_p: Optional[float] = None,
                      min_p_first: bool = False) -> torch.Tensor:
    """ids [B] int64; sample_tokens checks the arguments."""
    check_runnable(logits, "logits")
    out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    _launch(logits, u.contiguous(), out, temperature, top_k, top_p, min_p, min_p_first)
    return out


@_sample_tokens_op.register_fake
def _(logits, u, temperature, top_k=None, top_p=None, min_p=None, min_p_first=False):
    return logits.new_empty(logits.shape[0], dtype=torch.int64)


@custom_op("tritongpt::sample_token_rows")
def _sample_token_rows_op(logits: torch.Tensor, u: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                          top_p: torch.Tensor, min_p: torch.Tensor, min_p_first: torch.Tensor) -> torch.Tensor:
    """ids [B] int64; sample_token_rows checks the arguments."""
    check_runnable(logits, "logits")
    out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    _launch_rows(logits, u.contiguous(), out, temperature.contiguous(), top_k.contiguous(), top_p.contiguous(),
                 min_p.contiguous(), min_p_first.contiguous())
    return out


@_sample_token_rows_op.register_fake
def _(logits, u, temperature, top_k, top_p, min_p, min_p_first):
    return logits.new_empty(logits.shape[0], dtype=torch.int64)


def _check_logits_u(who: str, logits, u):
    """The refusals sample_tokens and sample_token_rows share: logits [B, V] and u [B]. -> (B, V)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise UserError(f"{who}: logits must be a 2-D tensor [B, V], got "
                        f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise UserError(f"{who}: logits has dtype {str(logits.dtype).replace('torch.', '')}; expected float32, "
                        "bfloat16 or float16")
    B, V = logits.shape
    if V == 0 or V >= 2**31:
        raise UserError(f"{who}: logits has {V} tokens a row; the kernel takes 1 to 2^31 - 1")
    if V > 1 and logits.stride(1) != 1:
        raise UserError(f"{who}: logits must have unit stride on its last dim, got strides {logits.stride()}")
    if not isinstance(u, torch.Tensor) or u.dtype != torch.float32 or tuple(u.shape) != (B,):
        raise UserError(f"{who}: u must be a float32 tensor of shape ({B},), one uniform a row, got "
                        f"{(u.dtype, tuple(u.shape)) if isinstance(u, torch.Tensor) else type(u).__name__}")
    if u.device != logits.device:
        raise UserError(f"{who}: u is on {u.device}, logits on {logits.device}: both on one device")
    return B, V


def sample_tokens(logits: torch.Tensor, u: torch.Tensor, temperature: float, top_k: Optional[int] = None,
                  top_p: Optional[float] = None, min_p: Optional[float] = None,
                  min_p_first: bool = False) -> torch.Tensor:
    """A token id for each row of logits [B, V] (float32 / bfloat16 / float16, unit stride on V), drawn from
    softmax((logits - max) / temperature) cut to its top_k tokens, then to the likeliest whose mass above them is
    under top_p, then to those at least min_p times the likeliest (sampling_logits' order; min_p_first: min_p first,
    so top_p weighs only what it kept, vLLM's order and sampling_logits(min_p_first=True)'s), by inverse CDF at
    u [B] (float32 in [0, 1), on logits' device): ids [B] int64. temperature > 0 (greedy is an argmax, not this).
    A row with nothing to draw (every logit -inf, or any NaN) gives token 0, as the reference's draw_from_probs: a
    NaN is not refused, which would cost a host sync a step. One setting for every row: sample_token_rows takes
    each row's own."""
    who = "sample_tokens"
    _check_logits_u(who, logits, u)
    for name, value in (("temperature", temperature), ("top_p", top_p), ("min_p", min_p)):
        # (a string or None compared below would raise Python's own TypeError, naming neither argument nor kernel)
        if value is not None or name == "temperature":
            one = (isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex()
                   and value.dtype != torch.bool)  # (a bool tensor as temperature 1.0: refused as a Python True)
            if not (is_real(value) or one):
                raise UserError(f"{who}: {name} must be a number, got {type(value).__name__} {value!r}")
    if not temperature > 0 or temperature != temperature or temperature == float("inf"):
        raise UserError(f"{who}: temperature must be a finite number > 0 (greedy is an argmax), got {temperature!r}")
    if temperature > torch.finfo(torch.float32).max:  # (the kernel's fp32 scalar: Triton cannot pass it)
        raise UserError(f"{who}: temperature {temperature!r} is above fp32's largest number (3.4e38)")
    if temperature < torch.finfo(torch.float32).tiny:  # (0 in fp32, or flushed on a GPU: 0 / 0 for the likeliest)
        raise UserError(f"{who}: temperature {temperature!r} is below fp32's smallest normal number; sample_next "
                        "takes such a temperature as greedy (an argmax)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise UserError(f"{who}: top_k must be an int >= 1, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise UserError(f"{who}: top_p must be in (0, 1], got {top_p!r}")
    if min_p is not None and not 0.0 <= min_p <= 1.0:
        raise UserError(f"{who}: min_p must be in [0, 1], got {min_p!r}")
    if not isinstance(min_p_first, bool):
        raise UserError(f"{who}: min_p_first must be a bool, got {type(min_p_first).__name__} {min_p_first!r}")
    try:
        check_runnable(logits, "logits")
    except (RuntimeError, ValueError) as e:
        raise UserError(f"{who}: {e}") from None
    return _sample_tokens_op.call(logits, u, float(temperature), top_k, None if top_p is None else float(top_p),
                                  None if min_p is None else float(min_p), min_p_first)


# sample_token_rows' settings: (name, the dtypes it takes, what "none" is, the allowed range in words)
_ROW_SETTINGS = (("temperature", (torch.float32,), "a finite number >= fp32's smallest normal (greedy rows are "
                  "an argmax, not this)"),
                 ("top_k", (torch.int32, torch.int64), "an int >= 0 (0, or V and more: none)"),
                 ("top_p", (torch.float32,), "in (0, 1] (1: none)"),
                 ("min_p", (torch.float32,), "in [0, 1] (0: none)"),
                 ("min_p_first", (torch.bool,), "a bool"))


def sample_token_rows(logits: torch.Tensor, u: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                      top_p: torch.Tensor, min_p: torch.Tensor, min_p_first: torch.Tensor) -> torch.Tensor:
    """sample_tokens with each row's own settings, in one launch: temperature [B] float32, top_k [B] int32 or int64
    (0 or >= V: no top-k), top_p [B] float32 in (0, 1] (1: none), min_p [B] float32 in [0, 1] (0: none) and
    min_p_first [B] bool; row b draws exactly the token sample_tokens draws for it alone with its settings as
    scalars (the same fp32 values, the same u). Why: the serving engine's step draws requests of different settings
    together (generate.sample_rows), one launch a step rather than one a request. Greedy rows are the caller's
    argmax (sample_rows routes them; a temperature below fp32's smallest normal is refused here).
    The settings may be on logits' device or on the CPU: host tensors are checked there and sent without waiting;
    device ones are checked with one read back to the host (a sync)."""
    who = "sample_token_rows"
    B, _ = _check_logits_u(who, logits, u)
    given = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, min_p_first=min_p_first)
    for name, dtypes, _ in _ROW_SETTINGS:
        t = given[name]
        if not isinstance(t, torch.Tensor) or t.dtype not in dtypes or tuple(t.shape) != (B,):
            want = " or ".join(str(d).replace("torch.", "") for d in dtypes)
            raise UserError(f"{who}: {name} must be a {want} tensor of shape ({B},), one value a row, got "
                            f"{(t.dtype, tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.device != logits.device and t.device.type != "cpu":
            raise UserError(f"{who}: {name} is on {t.device}, logits on {logits.device}: on logits' device or "
                            "the CPU")
    # (NaN fails every comparison: refused as out of range)
    bad = {"temperature": ~((temperature >= torch.finfo(torch.float32).tiny) & (temperature < float("inf"))),
           "top_k": top_k < 0, "top_p": ~((top_p > 0.0) & (top_p <= 1.0)),
           "min_p": ~((min_p >= 0.0) & (min_p <= 1.0))}
    # the device's flags read back together: one sync, none for host tensors
    on_device = [name for name in bad if bad[name].device.type != "cpu"]
    any_bad = dict(zip(on_device, torch.stack([bad[n].any() for n in on_device]).tolist() if on_device else []))
    for name, _, allowed in _ROW_SETTINGS[:4]:
        if any_bad[name] if name in any_bad else bool(bad[name].any()):
            row = int(bad[name].nonzero()[0])
            raise UserError(f"{who}: {name} must be {allowed}, got {given[name][row].item()!r} in row {row}")
    try:
        check_runnable(logits, "logits")
    except (RuntimeError, ValueError) as e:
        raise UserError(f"{who}: {e}") from None
    # (a host setting sent without waiting: as generate's logit_bias)
    sent = [given[name].to(logits.device, non_blocking=True) for name, _, _ in _ROW_SETTINGS]
    return _sample_token_rows_op.call(logits, u, *sent)
