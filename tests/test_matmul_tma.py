"""The MLP matmul's TMA loads (kernels/mlp.py, USE_TMA: Hopper's tensor descriptors) against its pointer loads and
float64, through the interpreter: every product of the GELU and gated MLPs, forward and backward, with operands in
both layouts (B = W^T in the forward products, A = dy^T in the weight gradients) and ragged edges that the
descriptors must fill with zeros as the masked loads do. On a GPU autotune times both and keeps the faster: these
tests are what makes the faster one also the right one. Which operands a descriptor can read is _tma_ok's."""
import math

import pytest
import torch

from parity import assert_close_rel
from tritongpt.kernels import mlp
from tritongpt.kernels.mlp import gelu_mlp
from tritongpt.kernels.swiglu import swiglu_mlp

TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


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
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
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
