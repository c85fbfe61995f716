"""Hopper's TMA loads (tensor descriptors) against the pointer loads and float64, through the interpreter.

The MLP matmul (kernels/mlp.py, USE_TMA): every product of the GELU and gated MLPs, forward and backward, with
operands in both layouts (B = W^T in the forward products, A = dy^T in the weight gradients) and ragged edges that
the descriptors must fill with zeros as the masked loads do. Attention (kernels/attention.py, USE_TMA): forward's
and dQ's K and V tiles, dK/dV's Q and dO tiles through descriptors, at lengths and head dims that leave ragged rows
and padded columns, over views inside NaN so that a descriptor reaching past its view shows. On a GPU
autotune times both ways and keeps the faster: these tests are what makes the faster one also the right one. Which
operands a descriptor can read is each launcher's _tma_ok / _attn_tma_ok."""
import math

import pytest
import torch

from launch_spy import FlagSpy
from parity import assert_close_rel
from tritongpt.kernels import attention, mlp
from tritongpt.kernels._common import tma_strides_ok
from tritongpt.kernels.attention import flash_attention
from tritongpt.kernels.mlp import gelu_mlp
from tritongpt.kernels.swiglu import swiglu_mlp

TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@pytest.fixture
def picks(monkeypatch):
    """A fresh record of the matmul's autotune picks ({key: config}) for the test, the module's kept aside."""
    fresh = {}
    monkeypatch.setitem(mlp._matmul_kernel.__dict__, "tritongpt_picks", fresh)
    monkeypatch.setattr(mlp, "MLP_MATMUL", "triton")  # every product on this kernel (no split path)
    return fresh


def tma_flags(picks):
    """{TMA_OK: {USE_TMA of the configs picked}} over the recorded launches' keys."""
    at = mlp._matmul_kernel.keys.index("TMA_OK")
    out = {}
    for key, config in picks.items():
        out.setdefault(key[at], set()).add(config.kwargs["USE_TMA"])
    return out


def run(fn, params, dy):
    leaves = [p.detach().clone().requires_grad_() if p is not None else None for p in params]
    y = fn(*leaves)
    y.backward(dy)
    return [y.detach()] + [p.grad for p in leaves if p is not None]


def gelu64(h):
    return 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h ** 3)))


def ref_gelu_mlp(x, w1, b1, w2, b2):
    return gelu64(x @ w1.t() + b1) @ w2.t() + b2


def ref_swiglu(x, wg, bg, wu, bu, wd, bd):
    g, u = x @ wg.t() + bg, x @ wu.t() + bu
    return (g * torch.sigmoid(g) * u) @ wd.t() + bd


def params_for(kind, M, C, H, dtype, gen):
    x = torch.randn(M, C, generator=gen)
    lin = lambda o, i: torch.randn(o, i, generator=gen) * (1.5 / math.sqrt(i))
    bias = lambda n: 0.5 * torch.randn(n, generator=gen)
    if kind == "gelu":
        ps = [x, lin(H, C), bias(H), lin(C, H), bias(C)]
    else:
        ps = [x, lin(H, C), bias(H), lin(H, C), bias(H), lin(C, H), bias(C)]
    return [p.to(dtype) for p in ps]


@pytest.mark.parametrize("kind", ["gelu", "swiglu"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tma_loads_give_the_pointer_loads_products_forward_and_backward(kind, dtype, picks, monkeypatch):
    """M 37 (not a multiple of the 64-row tile), C 24 and H 72 (K tails of 24 and 8 past a 64-wide step): the
    descriptors' zero fill stands where the masks were. Under the interpreter both loads feed tl.dot the same
    tiles, so the results are bit for bit the pointer path's; both within the dtype's tolerance of float64."""
    gen = torch.Generator().manual_seed(7 if kind == "gelu" else 8)
    params = params_for(kind, 37, 24, 72, dtype, gen)
    dy = torch.randn(37, 24, generator=gen).to(dtype)
    fn, ref = (gelu_mlp, ref_gelu_mlp) if kind == "gelu" else (swiglu_mlp, ref_swiglu)

    pointer = run(fn, params, dy)
    assert tma_flags(picks) == {0: {False}}
    picks.clear()
    monkeypatch.setattr(mlp, "TMA_INTERPRETED", True)
    tma = run(fn, params, dy)
    assert tma_flags(picks) == {1: {True}}, "every product read its operands through descriptors"
    for got, want in zip(tma, pointer):
        assert torch.equal(got, want)

    want = run(ref, [p.double() for p in params], dy.double())
    names = ["y", "dx"] + [f"d{i}" for i in range(len(params) - 1)]
    for name, got, w in zip(names, tma, want):
        assert_close_rel(got.double(), w, TOL[dtype], name)


def test_operands_a_descriptor_cannot_read_take_the_pointer_loads(picks, monkeypatch):
    """bf16 at width 100 (200-byte rows: TMA wants 16-byte multiples) runs on the pointer configs even when TMA is
    on, and gives float64's answer."""
    monkeypatch.setattr(mlp, "TMA_INTERPRETED", True)
    gen = torch.Generator().manual_seed(9)
    params = params_for("gelu", 21, 100, 40, torch.bfloat16, gen)
    dy = torch.randn(21, 100, generator=gen).to(torch.bfloat16)
    got = run(gelu_mlp, params, dy)
    assert 0 in tma_flags(picks) and tma_flags(picks)[0] == {False}
    want = run(ref_gelu_mlp, [p.double() for p in params], dy.double())
    for g, w in zip(got, want):
        assert_close_rel(g.double(), w, TOL[torch.bfloat16])


def test_tma_ok_reads_alignment_layout_and_the_device(monkeypatch):
    """A descriptor needs a 16-byte aligned base and row stride and one unit stride; without TMA (a CPU outside a
    test, a GPU before sm_90) no launch asks for it."""
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    w = torch.randn(32, 64, dtype=torch.bfloat16)
    assert not mlp._tma_ok(x, w.t())  # the interpreter, TMA not asked for
    monkeypatch.setattr(mlp, "TMA_INTERPRETED", True)
    assert mlp._tma_ok(x, w.t()) and mlp._tma_ok(x.t(), w)  # either layout of each operand
    with mlp.matmul_tma(False):  # TRITONGPT_MATMUL_TMA=0: the pointer configs only
        assert not mlp._tma_ok(x, w.t())
    assert mlp._tma_ok(x, w.t())
    assert not mlp._tma_ok(x[:, 1:], w.t()[1:])  # a base 2 bytes past alignment
    assert mlp._tma_ok(x[:, :60], w.t()[:60])  # 60 columns, rows 128 bytes apart: the stride is what counts
    assert not mlp._tma_ok(torch.randn(8, 12, dtype=torch.bfloat16), w.t()[:12])  # 24-byte rows
    assert not mlp._tma_ok(x, w.t(), b2=torch.randn(64, 33, dtype=torch.bfloat16)[:, :32])  # any operand counts
    assert not mlp._tma_ok(x[::2, ::2].t(), w)  # no unit stride at all
    assert not mlp._tma_readable(torch.randn(4, 1).expand(4, 8))  # a broadcast: a stride of 0
    assert not mlp._tma_readable(torch.randn(1, 8).expand(4, 8))


def test_fp32_operands_take_the_pointer_loads(picks, monkeypatch):
    """fp32 products run their dot on FMAs ("ieee": no tensor cores to feed): through descriptors ptxas builds every
    TMA config at 32 registers a thread and ~17 KB of spills (offline sm_90 build), so fp32 never asks for TMA,
    aligned or not, and the GELU MLP in fp32 runs on the pointer configs."""
    monkeypatch.setattr(mlp, "TMA_INTERPRETED", True)
    x = torch.randn(8, 64)
    w = torch.randn(32, 64)
    assert not mlp._tma_ok(x, w.t()) and not mlp._tma_ok(x.t(), w)
    assert mlp._tma_ok(x.half(), w.t().half()) and mlp._tma_ok(x.bfloat16(), w.t().bfloat16())
    gen = torch.Generator().manual_seed(12)
    params = params_for("gelu", 37, 24, 72, torch.float32, gen)
    dy = torch.randn(37, 24, generator=gen)
    got = run(gelu_mlp, params, dy)
    assert tma_flags(picks) == {0: {False}}
    want = run(ref_gelu_mlp, [p.double() for p in params], dy.double())
    for g, w in zip(got, want):
        assert_close_rel(g.double(), w, TOL[torch.float32])


def attention64(q, k, v, causal, doc_ids=None, softcap=0.0, alibi=None, window=None):
    """softmax(q k^T / sqrt(D) + mask) v in float64, bottom-right causal, K/V heads repeated for their groups; with
    Gemma's soft cap, ALiBi (slope m_h times j - i, i the query's position Tk - Tq + i) and a causal window (query
    position p sees p - window < j <= p). The masks are made on q's device (a GPU test's reference runs there)."""
    q, k, v = (t.double() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    tq, tk = s.shape[-2:]
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    pos = torch.arange(tq, device=q.device)[:, None] + (tk - tq)
    key = torch.arange(tk, device=q.device)[None, :]
    if alibi is not None:
        s = s + alibi.to(s)[:, None, None] * (key - pos)
    allowed = torch.ones(tq, tk, dtype=torch.bool, device=q.device)
    if causal:
        allowed = key <= pos
    if window is not None:
        allowed = allowed & (key > pos - window)
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, None, -tq:, None] == doc_ids[:, None, None, :])
    return torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v


@pytest.mark.parametrize("case", [
    dict(dtype=torch.float16, B=1, H=2, Hkv=2, Tq=37, Tk=37, D=64, causal=False),
    dict(dtype=torch.bfloat16, B=2, H=4, Hkv=2, Tq=21, Tk=33, D=80, causal=True),  # GQA, a cache prefix, D < BLOCK_D
    dict(dtype=torch.bfloat16, B=1, H=2, Hkv=1, Tq=19, Tk=19, D=32, causal=True, docs=True),  # packed documents
])
def test_attention_reads_its_streamed_tiles_through_descriptors_as_through_pointers(case, monkeypatch):
    """Forward (K, V tiles), dK/dV (Q, dO tiles) and dQ (K, V tiles): bit for bit the pointer loads' results
    under the interpreter, and float64's within the dtype's tolerance. Lengths not multiples of the 16-row tile
    leave ragged K/V tiles; D 80 reads 128-wide tiles whose last 48 columns the descriptor fills with zeros."""
    gen = torch.Generator().manual_seed(11)
    dt, B, H, Hkv, Tq, Tk, D = (case[k] for k in ("dtype", "B", "H", "Hkv", "Tq", "Tk", "D"))
    q = torch.randn(B, H, Tq, D, generator=gen).to(dt)
    k = torch.randn(B, Hkv, Tk, D, generator=gen).to(dt)
    v = torch.randn(B, Hkv, Tk, D, generator=gen).to(dt)
    do = torch.randn(B, H, Tq, D, generator=gen).to(dt)
    doc_ids = torch.tensor([[0] * 7 + [1] * 5 + [2] * (Tk - 12)] * B) if case.get("docs") else None
    spies = {}
    for name in ("_attn_fwd_run", "_attn_bwd_dkdv_run", "_attn_bwd_dq_run"):
        spies[name] = FlagSpy(getattr(attention, name), ("USE_TMA",))
        monkeypatch.setattr(attention, name, spies[name])

    def run():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        o = flash_attention(*leaves, causal=case["causal"], doc_ids=doc_ids)
        o.backward(do)
        return [o.detach()] + [t.grad for t in leaves]

    pointer = run()
    monkeypatch.setattr(attention, "TMA_INTERPRETED", True)
    tma = run()
    # one launch of each kernel a run, the second run's through descriptors
    assert all(spy.launched == [False, True] for spy in spies.values()), {n: s.launched for n, s in spies.items()}
    for got, want in zip(tma, pointer):
        assert torch.equal(got, want)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    o64 = attention64(*leaves, case["causal"], doc_ids)
    o64.backward(do.double())
    for name, got, want in zip(("o", "dq", "dk", "dv"), tma, [o64.detach()] + [t.grad for t in leaves]):
        assert_close_rel(got.double(), want, TOL[dt], name)


def nan_padded(B, H, T, D, dtype, gen, device="cpu"):
    """A [B, H, T, D] view into a NaN-filled [B, T + 5, H, D + 8] buffer (the model's [B, T, H, D] layout): the
    columns past D and the rows past T that a tile reads beyond the view are NaN. D + 8 keeps rows 16-byte aligned
    in every dtype, so a descriptor may read the view."""
    buf = torch.full((B, T + 5, H, D + 8), float("nan"), dtype=dtype, device=device)
    view = buf[:, :T, :, :D].transpose(1, 2)
    view.copy_(torch.randn(B, H, T, D, generator=gen).to(dtype))
    return view


@pytest.mark.parametrize("case", [
    dict(dtype=torch.bfloat16, B=2, H=4, Hkv=2, Tq=21, Tk=33, D=80, causal=True),  # a 128-wide box over 80 columns
    dict(dtype=torch.float16, B=1, H=2, Hkv=1, Tq=19, Tk=19, D=16, causal=True, softcap=2.0, window=5),  # 48-byte rows
    dict(dtype=torch.float16, B=1, H=2, Hkv=2, Tq=29, Tk=11, D=32, causal=False, alibi=True),  # Tq > Tk
    dict(dtype=torch.bfloat16, B=2, H=2, Hkv=2, Tq=1, Tk=23, D=64, causal=True),  # one query row
    dict(dtype=torch.bfloat16, B=1, H=2, Hkv=1, Tq=17, Tk=17, D=96, causal=True, dropout=0.3),
])
def test_attention_descriptors_read_nothing_past_the_views(case, monkeypatch):
    """q, k, v and dO views inside NaN: a descriptor whose shape reached past the view's rows (Tq, Tk) or columns
    (the head dim, in a box up to BLOCK_D wide) would bring NaN into the scores or a gradient, where the zero fill
    must stand. The TMA runs give the pointer loads' results bit for bit, and float64's (dropout aside)."""
    gen = torch.Generator().manual_seed(13)
    dt, B, H, Hkv, Tq, Tk, D = (case[k] for k in ("dtype", "B", "H", "Hkv", "Tq", "Tk", "D"))
    q, do = nan_padded(B, H, Tq, D, dt, gen), nan_padded(B, H, Tq, D, dt, gen)
    k, v = nan_padded(B, Hkv, Tk, D, dt, gen), nan_padded(B, Hkv, Tk, D, dt, gen)
    alibi = torch.tensor([0.5, 0.25]) if case.get("alibi") else None
    kw = dict(causal=case["causal"], softcap=case.get("softcap"), alibi_slopes=alibi, window=case.get("window"),
              dropout_p=case.get("dropout", 0.0), seed=3)
    spies = {}
    for name in ("_attn_fwd_run", "_attn_bwd_dkdv_run", "_attn_bwd_dq_run"):
        spies[name] = FlagSpy(getattr(attention, name), ("USE_TMA",))
        monkeypatch.setattr(attention, name, spies[name])

    def run():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]  # the padded views themselves, not copies
        o = flash_attention(*leaves, **kw)
        return [o.detach(), *torch.autograd.grad(o, leaves, do)]

    pointer = run()
    monkeypatch.setattr(attention, "TMA_INTERPRETED", True)
    tma = run()
    assert all(spy.launched == [False, True] for spy in spies.values()), {n: s.launched for n, s in spies.items()}
    for name, got, want in zip(("o", "dq", "dk", "dv"), tma, pointer):
        assert torch.isfinite(got).all(), f"{name}: NaN from past the view"
        assert torch.equal(got, want), name
    if kw["dropout_p"]:
        assert all(t.abs().sum() > 0 for t in tma)
        return
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    o64 = attention64(*leaves, case["causal"], softcap=kw["softcap"], alibi=alibi, window=kw["window"])
    want = [o64.detach(), *torch.autograd.grad(o64, leaves, do.double())]
    for name, got, w in zip(("o", "dq", "dk", "dv"), tma, want):
        assert_close_rel(got.double(), w, TOL.get(dt, 1e-2), name)


def test_cache_reads_keep_their_pointer_loads_with_tma_on(monkeypatch, forced_splits):
    """A fill length, an int8 cache and a paged one (_attn_fwd's static_assert refuses USE_TMA with them) launch
    the pointer loads however aligned K and V are, and so does the split-KV decode (no TMA tiles): each gives the
    answer it gives with TMA off."""
    from tritongpt.model.layers import quantize_kv

    gen = torch.Generator().manual_seed(17)
    q = torch.randn(2, 2, 3, 32, generator=gen).to(torch.bfloat16)
    k, v = (torch.randn(2, 1, 40, 32, generator=gen).to(torch.bfloat16) for _ in range(2))
    kv_len = torch.tensor([21, 40])
    (k8, ks), (v8, vs) = quantize_kv(k), quantize_kv(v)
    pages = torch.cat([k, v]).view(4, 1, 40, 32)  # rows: k0, k1, v0, v1
    pool = pages.reshape(4, 1, 5, 8, 32).transpose(1, 2).reshape(20, 1, 8, 32)  # 8-slot pages
    table = torch.arange(20, dtype=torch.int32).view(4, 5)
    cases = {"kv_len": dict(k=k, v=v, kv_len=kv_len),
             "int8": dict(k=k8, v=v8, k_scale=ks, v_scale=vs),
             "paged": dict(k=pool, v=pool, kv_len=kv_len, block_table=table[:2]),
             "paged v": dict(k=pool, v=pool, kv_len=kv_len, block_table=table[2:])}
    spy = FlagSpy(attention._attn_fwd_run, ("USE_TMA",))
    monkeypatch.setattr(attention, "_attn_fwd_run", spy)
    want = {name: flash_attention(q, **kw) for name, kw in cases.items()}
    split = forced_splits(2)
    want["split"] = flash_attention(q, k, v)
    forced_splits(1)
    monkeypatch.setattr(attention, "TMA_INTERPRETED", True)
    # (aligned for a descriptor, all of them; int8 is not a 16-bit dtype either, the other reason its cache keeps
    # the pointer loads)
    assert attention._attn_tma_ok(k, v) and attention._attn_tma_ok(pool, pool)
    assert all(tma_strides_ok(t, (0, 1, 2)) for t in (k8, v8)) and not attention._attn_tma_ok(k8, v8)
    for name, kw in cases.items():
        assert torch.equal(flash_attention(q, **kw), want[name]), name
    assert spy.launched == [False] * 8
    forced_splits(2)
    assert torch.equal(flash_attention(q, k, v), want["split"]) and split["launches"] == 2
    assert torch.isfinite(want["paged"]).all() and want["paged"].abs().sum() > 0


def test_attention_tma_ok_reads_alignment_and_the_device(monkeypatch):
    """[B, heads, T, D] operands: each head's base and row stride 16-byte aligned, on a GPU with TMA (or a test)."""
    k = torch.randn(2, 2, 10, 64, dtype=torch.bfloat16)
    assert not attention._attn_tma_ok(k, k)  # the interpreter, TMA not asked for
    monkeypatch.setattr(attention, "TMA_INTERPRETED", True)
    assert attention._attn_tma_ok(k, k)
    monkeypatch.setattr(attention, "ATTENTION_TMA", False)  # TRITONGPT_ATTENTION_TMA=0
    assert not attention._attn_tma_ok(k, k)
    monkeypatch.setattr(attention, "ATTENTION_TMA", True)
    assert attention._attn_tma_ok(k, k.transpose(1, 2).contiguous().transpose(1, 2))  # [B, T, H, D] storage
    assert not attention._attn_tma_ok(k, k[..., 1:])  # a base 2 bytes past alignment
    odd = torch.randn(2, 2, 10, 36, dtype=torch.bfloat16)[..., :32]
    assert not attention._attn_tma_ok(odd, odd)  # rows 72 bytes apart
    assert not attention._attn_tma_ok(k, k.expand(2, 2, 10, 64)[:1].expand(2, 2, 10, 64))  # a broadcast batch
    assert not attention._attn_tma_ok(k.float(), k.float())  # fp32: its dots run on FMAs, no wgmma to feed


def test_the_float64_reference_masks_on_its_inputs_device():
    """The Hopper test below hands attention64 CUDA tensors: its masks must be made there (masked_fill refuses a mask
    on another device; meta tensors stand in for the GPU here)."""
    q, k = torch.empty(1, 2, 5, 16, device="meta"), torch.empty(1, 1, 7, 16, device="meta")
    doc_ids = torch.zeros(1, 7, dtype=torch.int64, device="meta")
    assert attention64(q, k, k, True, doc_ids).shape == (1, 2, 5, 16)


# -- on a Hopper GPU: the TMA configs forced (autotune might otherwise keep a pointer one) ---------------------------

def only_tma(monkeypatch, tuner):
    """tuner's prune, then only its USE_TMA configs; a fresh record of its picks for the test."""
    prune = tuner.early_config_prune
    monkeypatch.setattr(tuner, "early_config_prune",
                        lambda configs, named_args, **kw: [c for c in prune(configs, named_args, **kw)
                                                           if c.kwargs["USE_TMA"]])
    monkeypatch.setitem(tuner.__dict__, "tritongpt_picks", {})


needs_hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                                  reason="needs a GPU with TMA (sm_90+)")


@pytest.mark.cuda
@needs_hopper
@pytest.mark.parametrize("kind", ["gelu", "swiglu"])
def test_tma_configs_on_a_hopper_gpu_match_float64(kind, monkeypatch):
    """GPT-2 small's widths in bf16 with every product on a TMA config: forward and every gradient within bf16's
    tolerance of float64 (the descriptors' layouts, alignment and zero fill on the real copy engine)."""
    only_tma(monkeypatch, mlp._matmul_kernel)
    monkeypatch.setattr(mlp, "MLP_MATMUL", "triton")
    gen = torch.Generator().manual_seed(5)
    params = [p.cuda() for p in params_for(kind, 4099, 768, 3072, torch.bfloat16, gen)]
    dy = torch.randn(4099, 768, generator=gen).to("cuda", torch.bfloat16)
    fn, ref = (gelu_mlp, ref_gelu_mlp) if kind == "gelu" else (swiglu_mlp, ref_swiglu)
    got = run(fn, params, dy)
    assert mlp._matmul_kernel.tritongpt_picks and all(c.kwargs["USE_TMA"] for c in
                                                      mlp._matmul_kernel.tritongpt_picks.values())
    want = run(ref, [p.double() for p in params], dy.double())
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close_rel(g.double(), w, TOL[torch.bfloat16], f"output/grad #{i}")


@pytest.mark.cuda
@needs_hopper
@pytest.mark.parametrize("dtype, D, Hkv, docs", [
    (torch.bfloat16, 64, 4, False), (torch.bfloat16, 80, 4, False), (torch.bfloat16, 128, 4, False),
    (torch.bfloat16, 64, 2, True),  # dK/dV's group loop makes a pair of descriptors for each query head
    (torch.float16, 64, 4, False),
])
def test_attention_tma_tiles_on_a_hopper_gpu_match_float64(dtype, D, Hkv, docs, monkeypatch):
    """Causal attention at T 1000 (ragged tiles) with its three kernels on TMA tiles, q, k, v and dO views inside
    NaN (nan_padded: what the copy engine reads past a view must come back as zeros): output and gradients within
    the dtype's tolerance of float64. Grouped-query heads with packed documents; fp16's tiles."""
    for tuner in (attention._attn_fwd_run, attention._attn_bwd_dkdv_run, attention._attn_bwd_dq_run):
        only_tma(monkeypatch, tuner)
    gen = torch.Generator().manual_seed(D)
    q, do = (nan_padded(2, 4, 1000, D, dtype, gen, "cuda") for _ in range(2))
    k, v = (nan_padded(2, Hkv, 1000, D, dtype, gen, "cuda") for _ in range(2))
    doc_ids = torch.tensor([[0] * 300 + [1] * 450 + [2] * 250] * 2, device="cuda") if docs else None
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    o = flash_attention(*leaves, causal=True, doc_ids=doc_ids)
    grads = torch.autograd.grad(o, leaves, do)
    for tuner in (attention._attn_fwd_run, attention._attn_bwd_dkdv_run, attention._attn_bwd_dq_run):
        assert tuner.tritongpt_picks and all(c.kwargs["USE_TMA"] for c in tuner.tritongpt_picks.values())
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    o64 = attention64(*leaves64, True, doc_ids)
    grads64 = torch.autograd.grad(o64, leaves64, do.double())
    for name, got, want in zip(("o", "dq", "dk", "dv"), [o, *grads], [o64, *grads64]):
        assert_close_rel(got.double(), want.detach(), TOL[dtype], name)


def gelu_erf64(h):
    return 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))


def flags_run(picks, name):
    """{the flag's value in a recorded launch's key}, over the launches of the test so far."""
    at = mlp._matmul_kernel.keys.index(name)
    return {key[at] for key in picks}


# (kind, dtype, M, C, H, variant, frozen): every MLP flag the existing cases miss, at shapes smaller than a tile.
# frozen: only the last Linear trains (x, the first Linear's weights without grad), so dW2 recomputes the activation
# on its B tiles (B_GELU, B_SWIGLU) rather than storing it beside dh.
EDGES = [
    ("gelu", torch.float16, 1, 8, 16, "none", False),   # M=1, K=8 < BLOCK_K, N < BLOCK_N; exact erf GELU, STORE_ACT
    ("gelu", torch.bfloat16, 5, 16, 24, "none", True),  # B_GELU with the erf GELU
    ("swiglu", torch.bfloat16, 3, 8, 40, "gelu", False),  # GeGLU: GATE_GELU in EPI_SWIGLU and its grad, SUM2
    ("swiglu", torch.float16, 9, 24, 16, "silu", True),   # B_SWIGLU
    ("swiglu", torch.bfloat16, 2, 16, 8, "gelu", True),   # B_SWIGLU with GATE_GELU
]


@pytest.mark.parametrize("kind,dtype,M,C,H,variant,frozen", EDGES)
def test_tma_loads_at_edge_shapes_and_every_flag(kind, dtype, M, C, H, variant, frozen, picks, monkeypatch):
    """The MLPs' flags the test above leaves out (GELU_ERF, GATE_GELU, B_GELU, B_SWIGLU, fp16) through the
    descriptors, at M=1 and at K and N under one tile: bit for bit the pointer loads', and float64's answer."""
    gen = torch.Generator().manual_seed(M * 100 + C)
    params = params_for(kind, M, C, H, dtype, gen)
    dy = torch.randn(M, C, generator=gen).to(dtype)
    if kind == "gelu":
        fn = lambda *p: gelu_mlp(*p, approximate=variant)
        act = gelu_erf64
        ref = lambda x, w1, b1, w2, b2: act(x @ w1.t() + b1) @ w2.t() + b2
    else:
        fn = lambda *p: swiglu_mlp(*p, activation=variant)
        act = (lambda g: gelu64(g)) if variant == "gelu" else (lambda g: g * torch.sigmoid(g))
        ref = lambda x, wg, bg, wu, bu, wd, bd: (act(x @ wg.t() + bg) * (x @ wu.t() + bu)) @ wd.t() + bd
    trains = [not frozen or i >= len(params) - 2 for i in range(len(params))]  # frozen: only the last Linear

    def go(f, ps, g):
        leaves = [p.detach().clone().requires_grad_(t) for p, t in zip(ps, trains)]
        y = f(*leaves)
        y.backward(g)
        return [y.detach()] + [p.grad for p, t in zip(leaves, trains) if t]

    pointer = go(fn, params, dy)
    picks.clear()
    monkeypatch.setattr(mlp, "TMA_INTERPRETED", True)
    tma = go(fn, params, dy)
    assert tma_flags(picks) == {1: {True}}
    prologue = "B_GELU" if kind == "gelu" else "B_SWIGLU"
    assert flags_run(picks, prologue) == ({False, True} if frozen else {False})
    # (the plain products carry the flag False whatever the MLP's GELU or gate)
    assert (True in flags_run(picks, "GELU_ERF" if kind == "gelu" else "GATE_GELU")) == (variant in ("none", "gelu"))
    for got, want in zip(tma, pointer):
        assert torch.equal(got, want)
    want = go(ref, [p.double() for p in params], dy.double())
    for i, (got, w) in enumerate(zip(tma, want)):
        assert_close_rel(got.double(), w, 1e-2, f"output {i}")


def test_tma_loads_of_views_sliced_and_transposed(monkeypatch):
    """Operands that are views: rows of a wider tensor at a 16-byte aligned offset, and A stored transposed
    (A_T, its M dim contiguous) with a row stride wider than M: the descriptors take the views' strides."""
    monkeypatch.setattr(mlp, "MLP_MATMUL", "triton")
    gen = torch.Generator().manual_seed(11)
    big = torch.randn(80, 96, generator=gen).to(torch.bfloat16)
    cases = [(big[3:30, 8:72], big[:64, 16:48]),       # sliced A and B, both row-major
             (big[:40, 8:40].t(), big[40:80, 16:40]),  # A [32, 40] transposed (stride 1, 96), M, N, K off the tile
             (big[:64, 8:9].t(), big[:64, 24:88].t()[:, :8])]  # M=1 transposed A; B [64, 8] transposed (B_T)
    for a, b in cases:
        monkeypatch.setattr(mlp, "TMA_INTERPRETED", False)
        pointer, _ = mlp._matmul(a, b, path="triton")
        monkeypatch.setattr(mlp, "TMA_INTERPRETED", True)
        assert mlp._tma_ok(a, b), (a.shape, a.stride(), b.shape, b.stride())
        got, _ = mlp._matmul(a, b, path="triton")
        assert torch.equal(got, pointer)
        assert_close_rel(got.double(), a.double() @ b.double(), 1e-2)


def test_the_gpu_prune_keeps_tma_configs_only_for_readable_operands(monkeypatch):
    """Outside the interpreter: TMA_OK 0 leaves only the pointer configs, TMA_OK 1 every config (autotune times
    both kinds); and only a GPU of sm_90 or later has TMA."""
    monkeypatch.setattr(mlp, "triton_interpreting", lambda: False)
    configs = mlp._matmul_configs()
    tma = [c for c in configs if c.kwargs["USE_TMA"]]
    assert tma and len(tma) < len(configs)
    assert mlp._prune_tma(configs, {"TMA_OK": 0}) == [c for c in configs if not c.kwargs["USE_TMA"]]
    assert mlp._prune_tma(configs, {"TMA_OK": 1}) == configs
    has_tma = mlp._has_tma.__wrapped__
    for capability, want in (((8, 0), False), ((8, 9), False), ((9, 0), True), ((10, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        assert has_tma(torch.device("cuda", 0)) is want
    assert not has_tma(torch.device("cpu"))


def test_the_allocator_is_set_in_the_thread_that_launches(monkeypatch):
    """Triton's allocator (the descriptors' global scratch, asked for at each launch) is a context variable: a new
    thread (serve's engine, autograd's device thread) starts without it, so _matmul sets it where it launches,
    and only for a launch that may take a TMA config."""
    import threading

    from triton.runtime import _allocation

    seen = []
    monkeypatch.setattr(mlp, "triton_interpreting", lambda: False)
    monkeypatch.setattr(mlp, "_has_tma", lambda device: True)
    monkeypatch.setattr(mlp, "launch_tuned", lambda *args, **kw: seen.append(_allocation._allocator.get()))
    a, b = torch.randn(16, 32, dtype=torch.bfloat16), torch.randn(32, 24, dtype=torch.bfloat16)

    def launch(x, y):
        mlp._matmul(x, y, path="triton")

    for x, y in ((a, b), (a[:, 1:17], b[:16])):  # aligned; then a base 2 bytes past alignment
        thread = threading.Thread(target=launch, args=(x, y))
        thread.start()
        thread.join()
    assert seen == [mlp.tma_scratch, _allocation._NULL_ALLOCATOR]
