"""Rotary position embeddings (RoPE) in Triton: q and k rotated in one launch, forward and backward.

Reference: `tritongpt.model.layers.apply_rotary` (through the `tritongpt.model.layers.Rotary` module
that MultiHeadAttention holds when GPTConfig.position_encoding is "rope"). The half-split convention
of GPT-NeoX and Llama (`rotate_half`): dimension i of a head and dimension i + D/2 form a pair,
rotated by the angle pos * theta^(-2i/D):

    y[i]       = x[i] cos(a_i) - x[i + D/2] sin(a_i)
    y[i + D/2] = x[i + D/2] cos(a_i) + x[i] sin(a_i)

Partial rotary (GPTConfig.rotary_dim R < D: GPT-NeoX's rotary_pct, Phi's partial_rotary_factor): the
pairs are (i, i + R/2), i < R/2, at pos * theta^(-2i/R), and columns R..D-1 pass through unchanged.
mscale (transformers' attention_scaling: YaRN's and LongRoPE's attention factor under partial rotary,
where it scales the rotated columns' share of q.k only) multiplies cos and sin.

  * Tiling: one program owns BLOCK_T tokens of one sequence. It loads their positions, computes
    cos and sin [BLOCK_T, D/2] once in fp32, then walks every head of q and then of k, each head a
    [BLOCK_T, D/2] tile of the first halves and one of the second halves, both in registers, and
    writes the rotated halves (R/2 wide under partial rotary; the same program then copies the head's
    D - R pass-through columns, as they are, in one more tile: PASS, a constexpr, so a whole-head
    rotation compiles to the code without it). So the angles are paid once per token, not once per (token, head):
    2 H heads of 64 share them at GPT-2's shapes.
  * cos/sin in the kernel, not read from a table: the inverse frequencies (a [D/2] fp32 vector,
    theta^(-2i/D) rounded once from float64, the same numbers the reference uses; stretched first
    for a long context by GPTConfig.rope_scaling's linear, Llama 3, YaRN or LongRoPE rule, which is all
    such a scaling changes; LongRoPE's vector, short or long, chosen on the host by the forward's length)
    and the positions are all it reads beyond q and k, so there is no [T, D/2] table to build, keep or
    index per call, and positions per token (packed documents, a KV cache's offset) cost nothing
    more than positions from 0. The angle pos * inv_freq is one fp32 product, as in the reference
    (and HF's Llama), so both paths rotate by the same fp32 angles.
  * Backward: the rotation is orthogonal, so the gradient of the input is the incoming gradient
    rotated by -angle (sin negated): the same kernel, and nothing saved but the positions and the
    [R/2] inverse frequencies. The pass-through columns' gradient is the incoming one copied (the
    gradient of a copy).
  * Layout: q is [B, H, T, D] and k [B, Hkv, T, D] (Hkv < H under grouped-query attention) with any
    strides (the projection's view + transpose is read in place, not copied); the outputs are
    [B, T, H, D] buffers returned as [B, H, T, D] views, the projection's layout, so merging heads
    and the KV cache's copy see what they saw before.
    Math is fp32; the result is rounded once to the input's dtype (bf16/fp16/fp32).

Public API: `rope(q, k, positions, theta=10000.0, scaling=None, rotary_dim=None, seq_len=None,
mscale=1.0) -> (q_rot, k_rot)`. It is built from the torch library custom ops `tritongpt::rope_fwd` /
`tritongpt::rope_bwd` (with fake impls; rotary_dim and mscale their last arguments, 0 and 1 by
default) inside an autograd.Function, so it runs under torch.compile (the ops stay opaque calls in the graph).
"""
import math

import torch
import triton
import triton.language as tl

from tritongpt._env import triton_interpreting
from tritongpt._types import is_int, is_real
from tritongpt.kernels._common import (cast, cdiv, check_runnable, check_same_device, check_same_dtype, check_tensor,
                                       custom_op, first_order_only, next_pow2, no_func_transform, on_tensor_device)
from tritongpt.errors import UserError
from tritongpt.model.config import check_rope_scaling
from tritongpt.model.layers import checked_seq_len, is_longrope, rope_inv_freq, rope_seq_len

INTERPRET = triton_interpreting()  # Triton decided at its import: read once, not on every launch

# a head's two halves in registers: BLOCK_T x 128 fp32 values each (under partial rotary the rotated halves
# are narrower and the pass-through tile at most a head wide: _block_t keeps it at two half-tiles' size)
MAX_HEAD_DIM = 256


@triton.jit
def _rotate_heads(X, Y, cos, sin, b, t, t_ok, i, i_ok, n_heads,
                  sxb, sxh, sxt, sxd, syb, syh, syt, syd, HALF: tl.constexpr, PASS: tl.constexpr,
                  BLOCK_PASS: tl.constexpr):
    """Rotate every head of X's tokens t (of sequence b) by the angles whose cos/sin are given; copy
    the PASS columns after the rotated 2 HALF (partial rotary) as they are."""
    mask = t_ok[:, None] & i_ok[None, :]
    x_row = b * sxb + t[:, None] * sxt + i[None, :] * sxd  # int64: b and t are
    y_row = b * syb + t[:, None] * syt + i[None, :] * syd
    if PASS > 0:
        j = 2 * HALF + tl.arange(0, BLOCK_PASS)
        pass_mask = t_ok[:, None] & (j < 2 * HALF + PASS)[None, :]
        xp_row = b * sxb + t[:, None] * sxt + j[None, :] * sxd
        yp_row = b * syb + t[:, None] * syt + j[None, :] * syd
    for h in range(n_heads):
        if PASS > 0:  # the same bits: in the input's dtype, never through fp32
            tl.store(Y + yp_row + h * syh, tl.load(X + xp_row + h * sxh, mask=pass_mask), mask=pass_mask)
        xh = X + x_row + h * sxh
        x1 = tl.load(xh, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(xh + HALF * sxd, mask=mask, other=0.0).to(tl.float32)
        yh = Y + y_row + h * syh
        tl.store(yh, cast(x1 * cos - x2 * sin, Y.dtype.element_ty), mask=mask)
        tl.store(yh + HALF * syd, cast(x2 * cos + x1 * sin, Y.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(Q, K, QO, KO, Pos, InvFreq, T, n_heads, n_kv_heads, n_tblocks,
                 sqb, sqh, sqt, sqd, skb, skh, skt, skd,
                 sob, soh, sot, sod, skob, skoh, skot, skod, spb, spt,
                 HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr, INVERSE: tl.constexpr,
                 PASS: tl.constexpr = 0, BLOCK_PASS: tl.constexpr = 1, SCALED: tl.constexpr = False, mscale=1.0):
    """Program p rotates tokens [tb * BLOCK_T, ...) of sequence b (p = b * n_tblocks + tb), all the
    heads of q and the n_kv_heads of k (fewer under grouped-query attention). INVERSE: by -angle
    (the backward pass). PASS > 0: partial rotary, the head's last PASS columns copied. SCALED: cos and
    sin times mscale (forward and backward alike: the gradient of a * R x is a * R^T dy)."""
    pid = tl.program_id(0)
    b = (pid // n_tblocks).to(tl.int64)
    t = (pid % n_tblocks) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    t = t.to(tl.int64)  # token * stride passes 2^31 on long sequences
    i = tl.arange(0, BLOCK_HALF)
    i_ok = i < HALF
    pos = tl.load(Pos + b * spb + t * spt, mask=t_ok, other=0).to(tl.float32)
    inv_freq = tl.load(InvFreq + i, mask=i_ok, other=0.0)
    angle = pos[:, None] * inv_freq[None, :]  # one fp32 product, as the reference's
    cos = tl.cos(angle)
    sin = tl.sin(angle)
    if INVERSE:
        sin = -sin
    if SCALED:
        cos = cos * mscale
        sin = sin * mscale
    _rotate_heads(Q, QO, cos, sin, b, t, t_ok, i, i_ok, n_heads, sqb, sqh, sqt, sqd, sob, soh, sot, sod, HALF,
                  PASS, BLOCK_PASS)
    _rotate_heads(K, KO, cos, sin, b, t, t_ok, i, i_ok, n_kv_heads, skb, skh, skt, skd, skob, skoh, skot, skod, HALF,
                  PASS, BLOCK_PASS)


def _block_t(T: int, half: int, n_pass: int = 0) -> int:
    if INTERPRET:
        return min(next_pow2(max(T, 1)), 64)  # the interpreter pays per program: few, big
    # 2K values per half-tile at 4 warps: 16 a thread for each of x1, x2, cos, sin (4K made 160
    # registers a thread in the sm_90 build, bench compile: too few warps per SM to hide latency);
    # a pass-through tile (partial rotary) of at most 4K, two half-tiles' worth
    width = next_pow2(half)
    if n_pass:
        width = max(width, next_pow2(n_pass) // 2)
    return max(1, min(next_pow2(max(T, 1)), 2048 // width))


@on_tensor_device
def _launch(q, k, positions, inv_freq, inverse, rotary_dim=0, mscale=1.0):
    """-> (q, k) rotated by +-angle into new [B, T, H, D] buffers, returned as [B, H, T, D] views.
    rotary_dim: the first rotary_dim columns rotated, the rest copied (0: the whole head); mscale: cos and
    sin multiplied by it."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    qo = torch.empty((B, T, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    ko = torch.empty((B, T, Hkv, D), dtype=k.dtype, device=k.device).transpose(1, 2)
    if B * T == 0:  # no token, no program (a q of no heads still has k's to rotate: they were left unwritten)
        return qo, ko
    R = rotary_dim or D
    half, n_pass = R // 2, D - R
    block_t = _block_t(T, half, n_pass)
    n_tblocks = cdiv(T, block_t)
    # a whole-head rotation launches without the pass-through constexprs: its kernel as before them
    partial = dict(PASS=n_pass, BLOCK_PASS=next_pow2(n_pass)) if n_pass else {}
    if mscale != 1.0:
        partial.update(SCALED=True, mscale=float(mscale))
    _rope_kernel[(B * n_tblocks,)](
        q, k, qo, ko, positions, inv_freq, T, H, Hkv, n_tblocks,
        *q.stride(), *k.stride(), *qo.stride(), *ko.stride(), *positions.stride(),
        HALF=half, BLOCK_T=block_t, BLOCK_HALF=next_pow2(half), INVERSE=inverse, **partial,
        num_warps=1 if INTERPRET else 4)
    return qo, ko


def _check_head_dim(D: int, rotary_dim=0):
    """rotary_dim 0 (or D): the whole head rotated, D even; else R even in [2, D], the rest passed through."""
    if not rotary_dim or rotary_dim == D:
        if D % 2 or not 2 <= D <= MAX_HEAD_DIM:
            raise ValueError(f"rope: head_dim {D} must be even (pairs i, i + D/2) and at most {MAX_HEAD_DIM}")
        return
    if not is_int(rotary_dim) or rotary_dim % 2 or not 2 <= rotary_dim <= D:
        raise ValueError(f"rope: rotary_dim {rotary_dim!r} must be an even int in [2, head_dim {D}] "
                         "(pairs i, i + rotary_dim/2; 0 or None: the whole head)")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"rope: head_dim {D} must be at most {MAX_HEAD_DIM}")


def _check_op_args(q, k, positions, inv_freq, rotary_dim=0, mscale=1.0):
    """What the kernel reads, checked in the ops themselves, so also for a direct caller."""
    check_tensor(q, "q", ndim=4)
    check_tensor(k, "k", ndim=4)
    check_same_dtype(q=q, k=k)
    if (q.shape[0], *q.shape[2:]) != (k.shape[0], *k.shape[2:]):
        raise ValueError(f"rope: q {tuple(q.shape)} and k {tuple(k.shape)} must have the same batch, length and "
                         "head_dim [B, H, T, D] (k may have fewer heads: grouped-query attention)")
    D = q.shape[-1]
    _check_head_dim(D, rotary_dim)
    check_tensor(positions, "positions", dtypes=(torch.int32, torch.int64), shape=(q.shape[0], q.shape[2]))
    check_same_device(q=q, k=k, positions=positions)
    check_tensor(inv_freq, "inv_freq", dtypes=(torch.float32,), shape=((rotary_dim or D) // 2,))
    if not is_real(mscale) or not math.isfinite(mscale) or mscale <= 0:
        raise ValueError(f"rope: mscale must be a finite number > 0, got {mscale!r}")
    check_same_device(q=q, inv_freq=inv_freq)
    check_runnable(q, "q")


@custom_op("tritongpt::rope_fwd", mutates_args=())
def _rope_fwd(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
              rotary_dim: int = 0, mscale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [B, H, T, D] (any strides), positions int [B, T], inv_freq fp32 [R/2] -> q and k
    rotated by pos * inv_freq (rope_inv_freq: theta^(-2i/R), perhaps rescaled) in their first
    R = rotary_dim columns (0: R = D), the rest copied; cos and sin times mscale."""
    _check_op_args(q, k, positions, inv_freq, rotary_dim, mscale)
    return _launch(q, k, positions, inv_freq, False, rotary_dim, mscale)


@custom_op("tritongpt::rope_bwd", mutates_args=())
def _rope_bwd(dq: torch.Tensor, dk: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
              rotary_dim: int = 0, mscale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of rope_fwd's inputs: its outputs' gradients rotated by -angle (the pass-through
    columns' copied)."""
    _check_op_args(dq, dk, positions, inv_freq, rotary_dim, mscale)
    return _launch(dq, dk, positions, inv_freq, True, rotary_dim, mscale)


def _fake(q, k, positions, inv_freq, rotary_dim=0, mscale=1.0):
    # the launcher's allocation: [B, T, H, D] buffers seen as [B, H, T, D]
    B, H, T, D = q.shape
    return q.new_empty((B, T, H, D)).transpose(1, 2), k.new_empty((B, T, k.shape[1], D)).transpose(1, 2)


_rope_fwd.register_fake(_fake)
_rope_bwd.register_fake(_fake)


class RopeFunction(torch.autograd.Function):
    """Saves the positions and the frequencies only: backward rotates the incoming gradients back."""

    @staticmethod
    def forward(ctx, q, k, positions, inv_freq, rotary_dim=0, mscale=1.0):
        ctx.save_for_backward(positions, inv_freq)
        ctx.rotary_dim, ctx.mscale = rotary_dim, mscale
        return _rope_fwd.call(q, k, positions, inv_freq, rotary_dim, mscale)

    @staticmethod
    def backward(ctx, dq, dk):
        first_order_only("rope")
        positions, inv_freq = ctx.saved_tensors
        dq, dk = _rope_bwd.call(dq, dk, positions, inv_freq, ctx.rotary_dim, ctx.mscale)
        return dq, dk, None, None, None, None


def _checked_positions(positions, q):
    """positions as the op takes them, int [B, T] on q's device: an int (a start offset: a KV
    cache's pos), [T] (shared by every sequence: expanded, not copied) or [B, T] (per token:
    packed documents count from each one's start)."""
    B, _, T, _ = q.shape
    if is_int(positions):
        return torch.arange(int(positions), int(positions) + T, device=q.device).expand(B, T)
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"rope: positions must be an int (a start offset) or an integer tensor [T] or [B, T], "
                        f"got {type(positions).__name__}")
    if positions.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"rope: positions must hold integers (int32/int64), got dtype {positions.dtype}")
    if positions.device != q.device:
        raise ValueError(f"rope: positions is on {positions.device}, q on {q.device}: they must share a device")
    if positions.dim() == 1 and positions.shape[0] == T:
        return positions.expand(B, T)
    if tuple(positions.shape) != (B, T):
        raise ValueError(f"rope: positions must be [T] = [{T}] or [B, T] = [{B}, {T}], got {tuple(positions.shape)}")
    return positions


def rope(q: torch.Tensor, k: torch.Tensor, positions, theta: float = 10000.0, scaling: dict | None = None,
         rotary_dim: int | None = None, seq_len: int | None = None, mscale: float = 1.0):
    """(q, k) rotated by RoPE's angles, half-split (GPT-NeoX / Llama). Differentiable.

    q: [B, H, T, D], k: [B, Hkv, T, D] (Hkv may be fewer: grouped-query attention), one dtype
    (bf16/fp16/fp32), any strides; D even, <= 256.
    positions: each token's position, an int start offset (positions start .. start + T - 1), an
    integer tensor [T], or [B, T]. theta: the base of the frequencies (10000: GPT-NeoX's, Llama 2's).
    scaling: GPTConfig.rope_scaling (linear, Llama 3's, YaRN's, LongRoPE's), applied to the frequencies
    (scaled_inv_freq; YaRN's and LongRoPE's attention_factor is not applied here: MultiHeadAttention scales
    the scores by its square). seq_len: LongRoPE's length, its long vector past original_max_position_embeddings
    (None: max(positions) + 1, for a tensor one device sync). rotary_dim: partial rotary, only the first
    rotary_dim columns rotated (frequencies over it), the rest copied (None or 0: the whole head).
    mscale: cos and sin multiplied by it (transformers' attention_scaling; MultiHeadAttention passes the
    attention factor here under partial rotary, where a softmax scale would scale the pass-through too).
    Returns [B, H, T, D] views of new [B, T, H, D] buffers, in q's dtype.
    """
    no_func_transform("rope")
    check_tensor(q, "q", ndim=4)
    check_tensor(k, "k", ndim=4)
    check_same_device(q=q, k=k)
    if not is_real(theta):
        raise TypeError(f"rope: theta must be a number, got {type(theta).__name__} {theta!r}")
    if not math.isfinite(theta) or theta <= 0:
        raise ValueError(f"rope: theta must be a finite number > 0, got {theta!r}")
    if not is_real(mscale) or not math.isfinite(mscale) or mscale <= 0:
        raise ValueError(f"rope: mscale must be a finite number > 0, got {mscale!r}")
    checked_seq_len(seq_len, "rope")
    D = q.shape[-1]
    rotary_dim = rotary_dim or 0
    _check_head_dim(D, rotary_dim)  # before the frequencies are made for it
    R = rotary_dim or D
    try:
        scaling = check_rope_scaling(scaling, "rope: scaling")
    except UserError as e:  # the kernels' bad arguments are ValueErrors
        raise ValueError(str(e)) from None
    if is_longrope(scaling):
        if len(scaling["short_factor"]) != R // 2:
            raise ValueError(f"rope: scaling: short_factor and long_factor have {len(scaling['short_factor'])} "
                             f"numbers, and {R // 2} pairs are rotated (rotary_dim / 2, or head_dim / 2)")
    checked = _checked_positions(positions, q)
    if is_longrope(scaling):
        if seq_len is None:  # an int start's length is known on the host; a tensor's max is one sync
            seq_len = rope_seq_len(positions if is_int(positions) else checked, q.shape[2])
    inv_freq = rope_inv_freq(R, float(theta), q.device, scaling, seq_len)
    return RopeFunction.apply(q, k, checked, inv_freq, 0 if R == D else R, float(mscale))


__all__ = ["rope", "rope_inv_freq", "RopeFunction", "MAX_HEAD_DIM"]
