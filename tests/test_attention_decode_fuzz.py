"""A fuzz of flash_attention's DECODE paths against the float64 reference on the gathered contiguous K/V
(test_attention_fuzz.py covers the training-side combinations; this one the caches).

Each example draws a decode step, a few drafts to verify or a prefill chunk over a cache (Tq 1-4, 17, 33; causal
mostly), batch 1-3, GQA/MQA (packed into the split kernel's rows or not), a head dim, fp32, bf16 or fp16, a scale, a
window, a soft cap, ALiBi, a forced KV-split count (flash-decoding, which _num_splits never picks under the
interpreter), kv_len (one, or one a row; int32 or int64) and the cache's layout:
  rows    a [B, Hkv, cap, D] cache: contiguous, a slice of a longer one, heads transposed out of a [B, cap, Hkv, D]
          buffer, or with a head dim of stride 2 (which the wrapper copies); v in a layout of its own or k's, the
          scales of an int8 cache with their heads transposed too (copied); NaN and inf past each row's length.
  paged   a pool of pages [pages, Hkv, P, D] (or with its heads transposed; P from 1 to past the 16-key tile,
          dividing the length or not, the last page partly filled), the rows' pages in random order, the first
          pages of some rows shared (a common prefix), the rest of the pool and every slot past a row's length NaN;
          the block table a column slice of a wider one, or with extra (unread) page numbers past each row's pages.
int8 caches (their scales in the same layout) too. Non-finite inputs: a NaN or +-inf at one or two places in q or
in the keys/values within a row's length (for int8, quantize_kv makes such a vector's scale NaN). The reference sums
only the values each query row sees (PyTorch's weights @ v spreads a value it does not see into it: weight 0 times
inf is NaN). The rule: where the reference is NaN the kernel is NaN, where it is +-inf the kernel is not finite;
where it is finite the kernel matches (fp32 within 1e-4 relative, 16-bit within 2x the error of the same reference
in that dtype), except that a non-finite VALUE the row does not see may reach it through a KV tile it visits (0 * NaN
in P V, documented in kernels/attention.py): allowed only in a column of v that holds one within the row's length.
"""
import pytest
import torch
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from parity import report
from test_attention import reference_attention
from tritongpt.kernels import attention
from tritongpt.kernels.attention import SUPPORTED_HEAD_DIMS, flash_attention
from tritongpt.model.layers import dequantize_kv, quantize_kv

POISON = (None, "nan_q", "inf_q", "-inf_q", "nan_k", "inf_k", "-inf_k", "nan_v", "inf_v", "-inf_k+-inf_k",
          "inf_k+nan_v")


@st.composite
def decodes(draw, max_t=40, head_dims=SUPPORTED_HEAD_DIMS, max_kv_heads=3):
    causal = draw(st.sampled_from([True, True, True, False]))
    Hkv = draw(st.integers(1, max_kv_heads))
    # decode, verifying a few drafts, a prefill chunk (33: GQA's heads too many to pack into a split's rows)
    Tq = draw(st.sampled_from([t for t in (1, 1, 1, 2, 3, 4, 17, 33) if t <= max_t]))
    return dict(
        B=draw(st.integers(1, 3)), Hkv=Hkv, H=Hkv * draw(st.integers(1, 3)), Tq=Tq,
        cap=draw(st.integers(Tq, max_t)), D=draw(st.sampled_from(head_dims)), causal=causal,
        dtype=draw(st.sampled_from(["float32", "float32", "bfloat16", "float16"])),
        scale=draw(st.one_of(st.none(), st.floats(-1.5, 1.5, width=32))),
        window=draw(st.one_of(st.none(), st.integers(1, max_t + 4))) if causal else None,
        softcap=draw(st.one_of(st.none(), st.floats(0.5, 6.0, width=32))),
        alibi=draw(st.booleans()), int8=draw(st.sampled_from([False, False, True])),
        kv_len=draw(st.sampled_from(["one", "per_row", "per_row"])),
        layout=draw(st.sampled_from(["paged", "paged", "paged_heads", "rows", "rows_slice", "rows_heads",
                                     "rows_stride2"])),
        v_layout=draw(st.sampled_from(["same", "rows", "rows_heads"])), kv_len_dtype=draw(st.sampled_from(
            ["int64", "int32"])),
        page=draw(st.sampled_from([1, 3, 4, 5, 7, 8, 16, 17, 32])), shared=draw(st.booleans()),
        table=draw(st.sampled_from(["tight", "wide", "slice"])), splits=draw(st.integers(1, 5)),
        strided_q=draw(st.booleans()), poison=draw(st.sampled_from(POISON + (None,) * 4)),
        seed=draw(st.integers(0, 2**31 - 1)))


def lay_out(t, layout, g):
    """A [B, Hkv, T(, D)] cache t (or its scales) as the layout says: the same values, other strides."""
    if t.dim() == 3:  # scales: heads transposed (not unit stride along T: the wrapper copies them)
        return t.transpose(1, 2).contiguous().transpose(1, 2) if layout == "rows_heads" else t
    if layout == "rows_slice":  # the first T positions of a longer cache
        big = torch.randn(t.shape[0], t.shape[1], t.shape[2] + 5, t.shape[3], generator=g).to(t.dtype)
        big[:, :, :t.shape[2]] = t
        return big[:, :, :t.shape[2]]
    if layout == "rows_heads":  # heads transposed out of [B, T, Hkv, D]
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "rows_stride2":  # every other element of a [..., 2D] buffer: the wrapper copies it
        big = torch.zeros(*t.shape[:3], 2 * t.shape[3], dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    return t


def inputs(c):
    """q, the cache flash_attention reads (rows or pages, float or int8 with scales) and its keyword arguments, and
    what the reference reads: float64 rows k, v (int8: dequantized as the kernels read them), 16-bit ones for the
    16-bit reference, and each row's length."""
    g = torch.Generator().manual_seed(c["seed"])
    B, H, Hkv, Tq, cap, D = c["B"], c["H"], c["Hkv"], c["Tq"], c["cap"], c["D"]
    dtype = getattr(torch, c["dtype"])
    lo = Tq if c["causal"] else 1
    if c["kv_len"] == "per_row":
        lengths = [int(torch.randint(lo, cap + 1, (1,), generator=g)) for _ in range(B)]
    else:
        lengths = [int(torch.randint(lo, cap + 1, (1,), generator=g))] * B
    q = torch.randn(B, Tq, H, D, generator=g).transpose(1, 2) * 1.5
    if not c["strided_q"]:
        q = q.contiguous()
    k, v = (torch.randn(B, Hkv, cap, D, generator=g) for _ in range(2))
    k, v, q = k.to(dtype), v.to(dtype), q.to(dtype)
    poison = c["poison"]
    for kind in poison.split("+") if poison else ():  # a non-finite entry where some row may read it
        value, what = kind.split("_")
        b = int(torch.randint(B, (1,), generator=g))
        n = int(torch.randint(lengths[b], (1,), generator=g))  # within the row's length
        d = int(torch.randint(D, (1,), generator=g))
        if what == "q":
            q[b, int(torch.randint(H, (1,), generator=g)), int(torch.randint(Tq, (1,), generator=g)), d] = float(value)
        else:
            (k if what == "k" else v)[b, int(torch.randint(Hkv, (1,), generator=g)), n, d] = float(value)
    if c["layout"].startswith("paged") and c["shared"] and B > 1:
        # a common prefix: rows 1.. hold row 0's first whole pages (paginate gives them the same page numbers)
        common = min(lengths) // c["page"] * c["page"]
        k[1:, :, :common], v[1:, :, :common] = k[:1, :, :common], v[:1, :, :common]
    kw = dict(causal=c["causal"], softmax_scale=c["scale"], window=c["window"], softcap=c["softcap"])
    if c["alibi"]:
        kw["alibi_slopes"] = torch.rand(H, generator=g) * 0.5 + 0.02
    if c["int8"]:
        (kq, ks), (vq, vs) = quantize_kv(k.float()), quantize_kv(v.float())  # a non-finite vector: a NaN scale
        k64, v64 = kq.double() * ks.double()[..., None], dequantize_kv(vq, vs, dtype).double()
        klow, vlow = dequantize_kv(kq, ks, dtype), dequantize_kv(vq, vs, dtype)
        cache = [kq, vq, ks, vs]
    else:
        k64, v64, klow, vlow = k.double(), v.double(), k, v
        cache = [k, v]
    if c["layout"].startswith("paged"):
        cache, kw["block_table"] = paginate(cache, lengths, c, g)
    else:
        # past each row's length: NaN and inf, never read (int8: in the scales)
        for b, L in enumerate(lengths):
            cache[-2][b, :, L:], cache[-1][b, :, L:] = float("nan"), float("inf")
        v_layout = c["layout"] if c["v_layout"] == "same" else c["v_layout"]
        cache = [lay_out(t, v_layout if i % 2 else c["layout"], g) for i, t in enumerate(cache)]
    if c["int8"]:
        kw.update(k_scale=cache[2], v_scale=cache[3])
    kw["kv_len"] = torch.tensor(lengths if c["kv_len"] == "per_row" else lengths[0],
                                dtype=getattr(torch, c["kv_len_dtype"]))
    return q, cache[0], cache[1], kw, (k64, v64, klow, vlow), lengths


def paginate(cache, lengths, c, g):
    """The rows' first lengths[b] positions of each tensor of cache ([B, Hkv, cap(, D)]) copied into pages of a pool
    (NaN elsewhere; int8 values 127 with NaN scales), the pages in random order, row b > 0 sharing its first pages
    with row 0 where c["shared"] (inputs made their contents equal). -> (pools, block table)."""
    P, B = c["page"], len(lengths)
    need = [-(-L // P) for L in lengths]
    common = min(lengths) // P if c["shared"] and B > 1 else 0
    n_pages = sum(need) - common * (B - 1) + 3  # and a few pages nobody reads
    order = torch.randperm(n_pages, generator=g).tolist()
    width = max(need) + (2 if c["table"] != "tight" else 0)
    table = torch.zeros(B, width, dtype=torch.int32)
    for b in range(B):
        for j in range(need[b]):
            table[b, j] = table[0, j] if b > 0 and j < common else order.pop()
        if c["table"] == "wide":  # page numbers past the row's pages: never read
            table[b, need[b]:] = torch.randint(n_pages, (width - need[b],), generator=g, dtype=torch.int32)
    pools = []
    for t in cache:
        pool = torch.empty((n_pages, t.shape[1], P) + tuple(t.shape[3:]), dtype=t.dtype)
        pool.fill_(127 if t.dtype == torch.int8 else float("nan"))
        for b, L in enumerate(lengths):
            for j in range(need[b]):
                n = min(P, L - j * P)
                pool[table[b, j], :, :n] = t[b, :, j * P:j * P + n]
        if c["layout"] == "paged_heads":  # the pool [pages, P, Hkv(, D)] with its heads transposed
            pool = pool.transpose(1, 2).contiguous().transpose(1, 2)
        pools.append(pool)
    if c["table"] == "slice":  # a column slice of a wider table: row stride past the row's pages
        wide = torch.zeros(B, width + 3, dtype=torch.int32)
        wide[:, 1:width + 1] = table
        table = wide[:, 1:width + 1]
    return pools, table


def reference(q, k, v, kw, lengths):
    """Out of the textbook attention in q's dtype, batch row b on its first lengths[b] keys, the KV heads repeated
    for their query heads, each query row summing only the values it sees: PyTorch's weights @ v would spread a
    non-finite value a row does not see into it (its weight 0 times inf is NaN), which exact math does not."""
    group = q.shape[1] // k.shape[1]
    masks = {n: kw[n] for n in ("causal", "softmax_scale", "window", "softcap", "alibi_slopes")
             if kw.get(n) is not None}
    outs = []
    for b, L in enumerate(lengths):
        Tq = q.shape[2]
        eye = torch.eye(L, dtype=q.dtype).expand(1, q.shape[1], L, L)  # the reference's weights @ I: its weights
        weights = reference_attention(q[b:b + 1], k[b:b + 1, :, :L].repeat_interleave(group, 1), eye, **masks)
        pos, key = torch.arange(Tq)[:, None] + (L - Tq), torch.arange(L)[None, :]
        seen = torch.ones(Tq, L, dtype=torch.bool)
        if kw["causal"]:
            seen &= key <= pos
        if kw.get("window") is not None:
            seen &= key > pos - kw["window"]
        vals = v[b:b + 1, :, :L].repeat_interleave(group, 1)[:, :, None]  # [1, H, 1, L, D]
        vals = torch.where(seen[:, :, None], vals, torch.zeros((), dtype=v.dtype))  # [1, H, Tq, L, D]
        outs.append((weights[..., None, :] @ vals).squeeze(-2))
    return torch.cat(outs)


def check_decode(c):
    q, k, v, kw, (k64, v64, klow, vlow), lengths = inputs(c)
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():  # the split path, never picked in the interpreter
        mp.setattr(attention, "_num_splits", lambda B, H, Tq, Tk, device: c["splits"])
        got = flash_attention(q, k, v, **kw).double()
    ref = reference(q.double(), k64, v64, kw, lengths)
    # the non-finite rules, element by element
    assert not (ref.isnan() & ~got.isnan()).any(), f"{c}: a NaN of the reference is a number here"
    assert not (ref.isinf() & got.isfinite()).any(), f"{c}: an inf of the reference is finite here"
    spread = torch.zeros_like(got, dtype=torch.bool)  # where a value the row does not see may leak in
    group = q.shape[1] // v64.shape[1]
    for b, L in enumerate(lengths):
        spread[b] = (~v64[b, :, :L].isfinite()).any(1).repeat_interleave(group, 0)[:, None, :]
    bad = ref.isfinite() & ~got.isfinite() & ~spread
    assert not bad.any(), f"{c}: not finite where the reference is, at {bad.nonzero()[:4].tolist()}"
    # the rows finite in both: matched as test_attention_fuzz.py matches
    rows = (ref.isfinite() & got.isfinite()).all(-1, keepdim=True).expand_as(ref)
    if not rows.any():
        return
    g_, r = got[rows], ref[rows]
    if q.dtype == torch.float32:
        _, rel = report(g_, r)
        assert rel <= 1e-4, f"{c}: relative error {rel:.3e} > 1e-4"
    else:
        low_rel = report(reference(q, klow, vlow, kw, lengths)[rows], r)[1]
        _, rel = report(g_, r)
        assert rel <= max(2e-2, 2 * low_rel) and rel <= 2 * low_rel, \
            f"{c}: {rel:.3e} > 2 x the {q.dtype} reference's {low_rel:.3e}"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy's, on the NaN inputs
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])  # no shrinking: minutes under the interpreter
@given(c=decodes(max_t=24, head_dims=(16, 32, 64, 80), max_kv_heads=2))  # (explored: up to 40, every head dim)
# found by this test, in its first reference (PyTorch's weights @ v): an inf value outside a row's window made the
# reference NaN (weight 0 times inf), where the kernels, which skip that tile, are right to stay finite
@example(c=dict(B=2, Hkv=2, H=6, Tq=4, cap=31, D=128, causal=True, dtype="float32", scale=None, window=8,
                softcap=None, alibi=True, int8=False, kv_len="per_row", layout="rows", v_layout="same",
                kv_len_dtype="int64", page=3, shared=False, table="slice", splits=1, strided_q=False, poison="inf_v",
                seed=734))
# every page feature at once: pages of 5 keys (not dividing the lengths) with their heads transposed, a shared
# prefix, a sliced table, int8 with a NaN scale (a NaN value), per-row lengths, packed GQA over three splits
@example(c=dict(B=3, Hkv=1, H=3, Tq=2, cap=23, D=32, causal=True, dtype="bfloat16", scale=0.7, window=None,
                softcap=3.0, alibi=False, int8=True, kv_len="per_row", layout="paged_heads", v_layout="same",
                kv_len_dtype="int32", page=5, shared=True, table="slice", splits=3, strided_q=True, poison="nan_v",
                seed=13))  # (lengths 12, 18, 16: the rows share two pages, the NaN in them)
def test_decode_paths_fuzz(c):
    check_decode(c)
