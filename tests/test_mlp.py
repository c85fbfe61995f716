"""Triton GELU-MLP (kernels/mlp.py) vs float64 formula and vs tritongpt.model.layers.FeedForward.

On CPU the kernels run through Triton's interpreter (slow per tl.dot), so matrices stay small
(M <= 70, C <= 100); the CUDA-marked tests repeat the check at GPT-2 sizes when a GPU is present.
"""
import math

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from launch_spy import FlagSpy, record_launches
from parity import assert_close_mixed, assert_close_rel, report
from tritongpt.kernels.layernorm import layer_norm
from tritongpt.kernels._common import cast, saved_tensor_bytes
from tritongpt.kernels.mlp import (_gelu, _gelu_act, _gelu_act_grad, _gelu_grad, _mlp_act, _mlp_act_grad, gelu_mlp,
                                   relu2_mlp)
from tritongpt.model.layers import FeedForward, ReLU2

TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def gelu64(x, approximate="tanh"):
    """GELU written out: GPT-2's tanh form, or with approximate "none" the exact x Phi(x) (erf); "relu2" the
    squared ReLU the same kernel computes in the GELU's place (relu2_mlp)."""
    if approximate == "relu2":
        return torch.relu(x) ** 2
    if approximate == "none":
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def ref_mlp(x, w1, b1, w2, b2, approximate="tanh"):
    """The formula, written out (run it on float64 leaves for the reference)."""
    h = x @ w1.t()
    h = h + b1 if b1 is not None else h
    y = gelu64(h, approximate) @ w2.t()
    return y + b2 if b2 is not None else y


def make(M, C, H, dtype, device, gen, bias=True, lead=None):
    shape = (*lead, C) if lead else (M, C)
    # weights scaled like nn.Linear's init, so h spans GELU's curved region (|h| ~ 1-3)
    x = torch.randn(shape, generator=gen)
    w1 = torch.randn(H, C, generator=gen) * (1.5 / math.sqrt(C))
    b1 = 0.5 * torch.randn(H, generator=gen) if bias else None
    w2 = torch.randn(C, H, generator=gen) / math.sqrt(H)
    b2 = 0.5 * torch.randn(C, generator=gen) if bias else None
    return [t.to(device, dtype).requires_grad_() if t is not None else None for t in (x, w1, b1, w2, b2)]


NAMES = ("dx", "dw1", "db1", "dw2", "db2")


def torch_lowp_errors(params, dy, y64, leaves, approximate="tanh"):
    """Relative errors of PyTorch's own low-precision MLP (F.linear + F.gelu in the same dtype)
    against float64: output and each gradient. Used as FlashAttention's rule for bf16/fp16: our
    error may be at most twice PyTorch's, which matters on tiny shapes where rounding y to 16 bits
    alone costs more than 1e-2 relative (e.g. 10 outputs that are sums with cancellation)."""
    lp = [p.detach().clone().requires_grad_() if p is not None else None for p in params]
    x, w1, b1, w2, b2 = lp
    y = torch.nn.functional.linear(torch.nn.functional.gelu(torch.nn.functional.linear(x, w1, b1),
                                                            approximate=approximate), w2, b2)
    y.backward(dy)
    errs = {"y": report(y, y64)[1]}
    for name, p, p64 in zip(NAMES, lp, leaves):
        if p is not None:
            errs[name] = report(p.grad, p64.grad)[1]
    return errs


def operands64(leaves, dy64, approximate="tanh"):
    """The float64 operands of the MLP's last products, as 2-D matrices: x, w1, w2, dy, a = gelu(h)
    and dh = (dy @ w2) * gelu'(h)."""
    x, w1, b1, w2, _ = (t.detach() if t is not None else None for t in leaves)
    x, dy64 = x.reshape(-1, x.shape[-1]), dy64.reshape(-1, dy64.shape[-1])
    h = (x @ w1.t() + (b1 if b1 is not None else 0)).requires_grad_()
    a = gelu64(h, approximate)
    (gelu_grad,) = torch.autograd.grad(a, h, torch.ones_like(a))
    return x, w1, w2, dy64, a.detach(), (dy64 @ w2) * gelu_grad


def fp32_sum_floors(leaves, dy64, approximate="tanh"):
    """What fp32 accumulation may cost each output, whatever the kernel: every output entry is a
    sum of K products, and its rounding error grows like sqrt(K) * 2^-24 times the sum of the
    products' sizes (K * 2^-24 at worst). That exceeds 1e-4 of the result only when the
    products cancel (the fuzz draws C = 1, H = 1: dw1 is then one sum of M signed terms; it once
    failed at 1.3e-4). Returns {name: 2 sqrt(K) u * ||(|A| @ |B|)||} for the last product of
    each output, from the float64 operands: a few 1e-6 of the result when nothing cancels."""
    x, w1, w2, dy64, a, dh = operands64(leaves, dy64, approximate)
    M, H = x.shape[0], w1.shape[0]
    u = 2.0 ** -24

    def floor(A, B, k):
        return 2 * k ** 0.5 * u * (A.abs() @ B.abs()).norm().item()

    return {"y": floor(a, w2.t(), H), "dx": floor(dh, w1, H), "dw1": floor(dh.t(), x, M),
            "db1": 2 * M ** 0.5 * u * dh.abs().sum(0).norm().item(), "dw2": floor(dy64.t(), a, M),
            "db2": 2 * M ** 0.5 * u * dy64.abs().sum(0).norm().item()}


def rounding_floors(leaves, dy64, dtype, approximate="tanh"):
    """What rounding a = gelu(h) and dh = (dy @ w2) * gelu'(h) to the 16-bit dtype may cost, as
    PyTorch's own 16-bit MLP rounds them too: y and dw2 are sums of terms carrying a's rounding,
    dx, dw1 and db1 of terms carrying dh's, each off by a relative error up to u (2^-8 bf16,
    2^-11 fp16), spread evenly. A sum's error then has std u / sqrt(3) * ||terms||; this is 3 of
    those. It matters only when a sum cancels: db1 of H = 1 is one sum of M signed terms
    (M=18, C=29, H=1: -0.5703 from dh in bf16, -0.5237 exact), and PyTorch's error on the same
    draw, one sample of the same spread, may by chance be under half ours.
    h is saved rounded too (the backward recomputes a and gelu'(h) from it): its relative error moves a by
    gelu'(h) h and dh by (dy @ w2) gelu''(h) h times it, independent of their own rounding, so each of a and dh
    counts as the root sum of squares of the two. Without h's, M=22, C=3, H=1 (seed 1160985661) failed: db1 1.0078,
    the sum of dh from h and dh rounded to bf16 1.0074, exact 0.9836 (h's rounding alone 0.9926)."""
    x, w1, w2, dy64, a, dh = operands64(leaves, dy64, approximate)
    sigma = (2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11) / 3 ** 0.5
    h = (x @ w1.t() + (leaves[2].detach() if leaves[2] is not None else 0)).requires_grad_()
    (d1,) = torch.autograd.grad(gelu64(h, approximate), h, torch.ones_like(h), create_graph=True)
    (d2,) = torch.autograd.grad(d1, h, torch.ones_like(h))
    h, d1 = h.detach(), d1.detach()
    a = (a * a + (d1 * h) ** 2).sqrt()
    dh = (dh * dh + ((dy64 @ w2) * d2 * h) ** 2).sqrt()

    def floor(A, B):  # for A @ B with A's entries rounded: 3 sigma * sqrt(sum over outputs of sum_k (A B)^2)
        return 3 * sigma * ((A * A) @ (B * B)).sum().sqrt().item()

    return {"y": floor(a, w2.t()), "dx": floor(dh, w1), "dw1": floor(dh.t(), x),
            "db1": 3 * sigma * dh.norm().item(), "dw2": floor(dy64.t(), a), "db2": 0.0}


def check_parity(M, C, H, dtype, device, seed, bias=True, lead=None, torch_rule=False, approximate="tanh"):
    """Kernel vs float64, forward and every gradient. 16-bit tolerance is the flat TOL, or with
    torch_rule (the shape fuzz, which draws degenerate shapes such as C=1) max(TOL, 2x the error
    of PyTorch's own low-precision MLP on the same inputs), above a floor for rounding to 16 bits.
    approximate: the GELU, kernel and reference alike ("none": exact erf)."""
    gen = torch.Generator().manual_seed(seed)
    params = make(M, C, H, dtype, device, gen, bias, lead)
    y = gelu_mlp(*params, approximate=approximate)
    assert y.dtype == dtype and y.shape == params[0].shape
    dy = torch.randn(y.shape, generator=gen).to(device, dtype)
    y.backward(dy)
    leaves = [p.detach().double().requires_grad_() if p is not None else None for p in params]
    y64 = ref_mlp(*leaves, approximate=approximate)
    y64.backward(dy.double())
    tol = dict.fromkeys(("y",) + NAMES, TOL[dtype])
    if torch_rule and dtype != torch.float32:
        # No cap on PyTorch's own error: over 1,500 fuzz draws it stays under 1e-2 for 99.7% of
        # them but reaches 0.14 on degenerate ones (M=1, C=1: dx is one sum that cancels).
        torch_errs = torch_lowp_errors(params, dy, y64, leaves, approximate)
        tol.update({k: max(TOL[dtype], 2 * e) for k, e in torch_errs.items()})
    floors = fp32_sum_floors(leaves, dy.double(), approximate)
    if torch_rule and dtype != torch.float32:
        # the bound becomes max(tol * ||ref||, rounding floor): looser only where a sum cancels
        refs = {"y": y64, **{name: p64.grad for name, p64 in zip(NAMES, leaves) if p64 is not None}}
        extra = rounding_floors(leaves, dy.double(), dtype, approximate)
        floors = {k: f + max(0.0, extra[k] - tol[k] * refs[k].detach().norm().item()) if k in refs else f
                  for k, f in floors.items()}
    figures = {"y": assert_close_mixed(y, y64, tol["y"], floors["y"], f"y {dtype} M={M} C={C} H={H}")}
    for name, p, p64 in zip(NAMES, params, leaves):
        if p is not None:
            assert p.grad is not None and p.grad.dtype == p.dtype, name
            figures[name] = assert_close_mixed(p.grad, p64.grad, tol[name], floors[name], name)
    return figures


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,C,H", [(1, 64, 256), (37, 100, 400), (7, 48, 72)])
def test_parity_fp64(M, C, H, dtype, device):
    check_parity(M, C, H, dtype, device, seed=M + C + H + (dtype == torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,C,H", [(1, 64, 256), (37, 100, 400), (7, 48, 72)])
def test_exact_gelu_parity_fp64(M, C, H, dtype, device):
    """approximate "none" (GPT-NeoX's exact GELU, GELU_ERF in the kernel): forward and dx, dW1, db1, dW2,
    db2 against the float64 erf formula, odd shapes too."""
    check_parity(M, C, H, dtype, device, seed=M + C + H + 5 * (dtype == torch.bfloat16), approximate="none")


def test_exact_gelu_is_erf_not_tanh(device):
    """The two GELUs differ by < 5e-4 anywhere, close to fp32 parity's 1e-4: in fp32 the exact-GELU MLP is
    the erf formula's to 2e-6 relative in y and every gradient, and that formula is > 1e-5 from the tanh one's
    (so a kernel that kept tanh fails here: db2 aside, which is sum(dy)); the bias-free case too, leading dims."""
    for bias, lead in ((True, None), (False, (3, 5))):
        gen = torch.Generator().manual_seed(21)
        params = make(13, 40, 160, torch.float32, device, gen, bias, lead)
        y = gelu_mlp(*params, approximate="none")
        dy = torch.randn(y.shape, generator=gen).to(device)
        y.backward(dy)
        for approximate, near in (("none", True), ("tanh", False)):
            leaves = [p.detach().double().requires_grad_() if p is not None else None for p in params]
            y64 = ref_mlp(*leaves, approximate=approximate)
            y64.backward(dy.double())
            pairs = [("y", y, y64)] + [(n, p.grad, p64.grad) for n, p, p64 in zip(NAMES, params, leaves)
                                       if p is not None]
            for name, got, want in pairs:
                rel = ((got.double() - want).norm() / want.norm()).item()
                # db2 = sum(dy) does not see the GELU
                assert (rel < 2e-6) if near else (rel > 1e-5 or name == "db2"), f"{name} vs {approximate}: {rel:.2e}"
        for p in params:
            if p is not None:
                p.grad = None


def test_exact_gelu_matches_reference_module_and_is_refused_misspelled(device):
    """FeedForward(approximate "none") on both paths: the same output and gradients (the module hands its
    GELU's form to the kernel); an unknown form is a ValueError naming approximate, in the API and the op."""
    torch.manual_seed(4)
    ff = FeedForward(24, approximate="none").to(device)
    x = torch.randn(2, 5, 24, device=device, requires_grad=True)
    want = ff(x)
    grads = torch.autograd.grad(want.square().sum(), [x, *ff.parameters()])
    ff.use_triton = True
    got = ff(x)
    assert_close_rel(got, want, 1e-5, "y")
    for g, w in zip(torch.autograd.grad(got.square().sum(), [x, *ff.parameters()]), grads):
        assert_close_rel(g, w, 1e-4, "grad")
    w1, w2 = ff.fc1.weight, ff.fc2.weight
    with pytest.raises(ValueError, match=r"approximate must be one of tanh, none .*got 'erf'"):
        gelu_mlp(x, w1, None, w2, None, approximate="erf")
    with pytest.raises(ValueError, match=r"approximate must be one of tanh, none"):
        torch.ops.tritongpt.gelu_mlp_fwd(x.detach()[0], w1, None, w2, None, "exact")
    # the fake impls, which torch.compile traces with, refuse it too (meta tensors reach them)
    mx, mw1, mw2 = (t.detach().to("meta") for t in (x[0], w1, w2))
    with pytest.raises(ValueError, match=r"approximate must be one of tanh, none"):
        torch.ops.tritongpt.gelu_mlp_fwd(mx, mw1, None, mw2, None, "exact")
    with pytest.raises(ValueError, match=r"approximate must be one of tanh, none"):
        torch.ops.tritongpt.gelu_mlp_bwd(mx, mx, torch.empty(5, 96, device="meta"), mw1, mw2, [True] * 5, "exact")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,C,H", [(7, 64, 100), (37, 100, 64)])
def test_relu2_parity_fp64(M, C, H, dtype, device):
    """The squared-ReLU MLP (RELU2 in the same epilogues) against float64's relu(h)^2: out and every gradient,
    at odd rows and widths, with pre-activations on both sides of 0 (the ReLU's kink is in play)."""
    gen = torch.Generator().manual_seed(5)
    x, w1, b1 = (t.detach().double() for t in make(M, C, H, torch.float32, "cpu", gen)[:3])
    neg = ((x @ w1.t() + b1) < 0).double().mean().item()  # make()'s draw again, same seed: h's signs
    assert 0.25 < neg < 0.75, neg
    check_parity(M, C, H, dtype, device, seed=5, approximate="relu2")


def test_relu2_is_not_gelu_and_matches_the_reference_module(device):
    """relu2_mlp is relu(h)^2 (far from either GELU on the same draw), and FeedForward(activation "relu2",
    hidden of its own) gives the same output and gradients on both paths (the module hands "relu2" to the
    kernel, and fc1 is hidden wide)."""
    gen = torch.Generator().manual_seed(9)
    params = make(11, 16, 40, torch.float32, device, gen)
    y = relu2_mlp(*params)
    leaves = [p.detach().double() for p in params]
    assert_close_rel(y, ref_mlp(*leaves, approximate="relu2"), 1e-5, "y")
    assert (y.double() - ref_mlp(*leaves)).abs().max() > 1e-2
    torch.manual_seed(4)
    ff = FeedForward(24, hidden=40, activation="relu2").to(device)
    assert ff.fc1.weight.shape == (40, 24) and ff.fc2.weight.shape == (24, 40)
    x = torch.randn(2, 5, 24, device=device, requires_grad=True)
    want = ff(x)
    grads = torch.autograd.grad(want.square().sum(), [x, *ff.parameters()])
    ff.use_triton = True
    got = ff(x)
    assert_close_rel(got, want, 1e-5, "y")
    for g, w in zip(torch.autograd.grad(got.square().sum(), [x, *ff.parameters()]), grads):
        assert_close_rel(g, w, 1e-4, "grad")


def test_relu2_on_int8_layers_squares_fc1s_output(device):
    """A squared-ReLU FeedForward quantized to int8 (quantize's Linears swapped in): relu^2 of fc1's output (in the
    int8 kernel's epilogue, RELU2, on the Triton path), on both paths: relu(x W1q^T + b1)^2 W2q^T + b2 of the
    dequantized weights (once handed to that epilogue as a GELU, it computed gelu_tanh)."""
    from tritongpt.model.quant import Int8Linear

    torch.manual_seed(6)
    ff = FeedForward(24, hidden=40, activation="relu2").to(device)
    ff.fc1, ff.fc2 = Int8Linear.from_linear(ff.fc1), Int8Linear.from_linear(ff.fc2)
    x = torch.randn(2, 5, 24, device=device)
    with torch.no_grad():
        h = torch.nn.functional.linear(x, ff.fc1.dequantize(), ff.fc1.bias)
        want = torch.nn.functional.linear(torch.relu(h) ** 2, ff.fc2.dequantize(), ff.fc2.bias)
        for triton_path in (False, True):
            ff.fc1.use_triton = ff.fc2.use_triton = triton_path
            assert_close_rel(ff(x), want, 1e-5, f"int8 relu2 MLP, triton {triton_path}")


def test_fp16_leading_dims(device):
    check_parity(None, 40, 160, torch.float16, device, seed=2, lead=(2, 3))


def test_no_bias(device):
    check_parity(7, 32, 128, torch.float32, device, seed=3, bias=False)


def test_strided_views(device):
    """Views as callers hand them over (every-other-element biases, transposed weights, a slice
    of a wider activation) give the contiguous copies' answer; the biases once read as if
    contiguous and gave errors of order 10."""
    gen = torch.Generator().manual_seed(4)
    M, C, H = 9, 24, 40
    wide = torch.randn(M, 2 * C, generator=gen)
    views = (wide[:, 1::2], torch.randn(C, H, generator=gen).t(), torch.randn(2 * H, generator=gen)[::2],
             torch.randn(H, C, generator=gen).t(), torch.randn(3 * C, generator=gen)[::3])
    views = [t.to(device).requires_grad_() for t in views]
    y = gelu_mlp(*views)
    dy = torch.randn(y.shape, generator=gen).to(device)
    y.backward(dy)
    leaves = [t.detach().double().contiguous().requires_grad_() for t in views]
    y64 = ref_mlp(*leaves)
    y64.backward(dy.double())
    assert_close_rel(y, y64, 1e-4, "y")
    for name, t, t64 in zip(NAMES, views, leaves):
        assert_close_rel(t.grad, t64.grad, 1e-4, name)


@pytest.mark.parametrize("trainable", [
    (True, False, False, False, False),   # every weight frozen: only dx
    (True, False, False, True, True),     # first Linear frozen
    (False, True, True, False, False),    # input needs no gradient, second Linear frozen
    (True, True, False, True, False),     # biases frozen
    (False, False, True, False, False),   # only the first bias trains: dh for db1 alone
])
def test_frozen_weights_skip_their_products(trainable, device, monkeypatch):
    """Backward makes only the gradients autograd asks for: the trainable ones match float64,
    the frozen ones stay None, and the products of frozen weights are not launched (dW1 and
    dW2 are half of backward's FLOPs; they used to be made and dropped)."""
    from tritongpt.kernels import mlp

    gen = torch.Generator().manual_seed(13)
    params = make(11, 24, 40, torch.float32, device, gen)
    for p, train in zip(params, trainable):
        p.requires_grad_(train)
    y = gelu_mlp(*params)
    dy = torch.randn(y.shape, generator=gen).to(device)
    calls = record_launches(monkeypatch, mlp)
    y.backward(dy)
    launched = [k.get("epilogue", 0) for k in calls]
    need_dx, need_dw1, need_db1, need_dw2, _ = trainable
    # dh (the GELU' epilogue) feeds dx, dW1 and db1; then one product per wanted weight/input
    assert launched.count(mlp.EPI_GELU_GRAD) == int(need_dx or need_dw1 or need_db1)
    assert len(launched) == int(need_dx or need_dw1 or need_db1) + need_dx + need_dw1 + need_dw2
    leaves = [p.detach().double().requires_grad_(train) for p, train in zip(params, trainable)]
    ref_mlp(*leaves).backward(dy.double())
    for name, p, p64, train in zip(NAMES, params, leaves, trainable):
        if train:
            assert_close_rel(p.grad, p64.grad, 1e-4, name)
        else:
            assert p.grad is None, name


def test_matches_reference_module(device):
    """Same FeedForward (dropout 0), both paths (use_triton False/True), plus the float64 module."""
    torch.manual_seed(12)
    ff = FeedForward(40, dropout=0.0).to(device)
    x = torch.randn(2, 9, 40).to(device)
    dy = torch.randn(2, 9, 40).to(device)
    outs = {}
    for use_triton in (False, True):
        ff.use_triton = use_triton
        ff.zero_grad()
        xi = x.clone().requires_grad_()
        y = ff(xi)
        y.backward(dy)
        outs[use_triton] = [y, xi.grad] + [p.grad.clone() for p in
                                           (ff.fc1.weight, ff.fc1.bias, ff.fc2.weight, ff.fc2.bias)]
    ff64 = FeedForward(40, dropout=0.0).double().to(device)
    ff64.load_state_dict(ff.state_dict())
    x64 = x.double().requires_grad_()
    y64 = ff64(x64)
    y64.backward(dy.double())
    refs64 = [y64, x64.grad] + [p.grad for p in (ff64.fc1.weight, ff64.fc1.bias, ff64.fc2.weight, ff64.fc2.bias)]
    for name, tri, ref, r64 in zip(("y",) + NAMES, outs[True], outs[False], refs64):
        assert_close_rel(tri, r64, 1e-4, f"{name} vs fp64 module")
        assert_close_rel(tri, ref, 1e-4, f"{name} vs fp32 module")


def test_autocast_casts_like_linear(device):
    """Under autocast, fp32 params are used in the autocast dtype; their grads come back fp32."""
    gen = torch.Generator().manual_seed(4)
    params = make(9, 32, 96, torch.float32, device, gen)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = gelu_mlp(*params)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in params)
    leaves = [p.detach().to(torch.bfloat16).double().requires_grad_() for p in params]
    y64 = ref_mlp(*leaves)
    y64.sum().backward()
    assert_close_rel(y, y64, 1e-2, "y autocast")
    for name, p, p64 in zip(NAMES, params, leaves):
        assert_close_rel(p.grad, p64.grad, 1e-2, f"{name} autocast")


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])  # no shrinking: minutes under the interpreter
@given(M=st.integers(1, 40), C=st.integers(1, 64), H=st.integers(1, 130),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**31 - 1))
@example(M=10, C=1, H=91, dtype=torch.bfloat16, seed=243741529)  # once failed a flat 1e-2 bound
@example(M=37, C=1, H=1, dtype=torch.float32, seed=1783104834)  # dw1 sums 37 signed terms: 1.3e-4
@example(M=18, C=29, H=1, dtype=torch.bfloat16, seed=923)  # db1 cancels: 2x PyTorch's error is too tight
@example(M=22, C=3, H=1, dtype=torch.bfloat16, seed=1160985661)  # db1 cancels: h's rounding counts too
def test_shape_fuzz(M, C, H, dtype, seed):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_parity(M, C, H, dtype, device, seed, torch_rule=True)


def test_fp16_large_preactivations_both_paths(device):
    """fp16 pre-activations of ~1000 (GELU is saturated: the identity, or 0). The reference
    module's GELU computed x^3 in fp16, which overflows past |x| = 40 (forward survives: tanh(inf)
    is 1), and its backward 3x^2 past 256: 0 * inf = NaN in every gradient but dw2, where
    F.gelu and the kernel (GELU in fp32) are right to 3e-4. It now evaluates fp16 GELU in fp32."""
    gen = torch.Generator().manual_seed(17)
    M, C, H = 16, 32, 128  # FeedForward's H = 4C
    x = torch.randn(M, C, generator=gen)
    w1 = torch.randn(H, C, generator=gen) / math.sqrt(C) * 1000
    b1, w2 = torch.randn(H, generator=gen), torch.randn(C, H, generator=gen) / math.sqrt(H)
    b2 = torch.randn(C, generator=gen)
    params = [t.half() for t in (x, w1, b1, w2, b2)]
    dy = torch.randn(M, C, generator=gen).half()
    leaves64 = [t.double().requires_grad_() for t in params]
    y64 = ref_mlp(*leaves64)
    y64.backward(dy.double())
    want = [y64] + [t.grad for t in leaves64]
    ff = FeedForward(C).half()
    with torch.no_grad():
        for p, t in zip((ff.fc1.weight, ff.fc1.bias, ff.fc2.weight, ff.fc2.bias), params[1:]):
            p.copy_(t)
    xr = params[0].clone().requires_grad_()
    y = ff(xr)
    y.backward(dy)
    ref = [y, xr.grad, ff.fc1.weight.grad, ff.fc1.bias.grad, ff.fc2.weight.grad, ff.fc2.bias.grad]
    leaves = [t.to(device).requires_grad_() for t in params]
    y = gelu_mlp(*leaves)
    y.backward(dy.to(device))
    got = [y] + [t.grad for t in leaves]
    for name, r, g, w in zip(("y",) + NAMES, ref, got, want):
        assert_close_rel(r, w, 1e-2, f"reference module fp16 {name}")
        assert_close_rel(g, w, 1e-2, f"kernel fp16 {name}")


def test_saves_less_activation_memory(device):
    """Only x and h are kept for backward; the reference also keeps a = gelu(h) and GELU's insides."""
    gen = torch.Generator().manual_seed(5)
    M, C, H = 16, 32, 128
    x, w1, b1, w2, b2 = make(M, C, H, torch.float32, device, gen)
    weights = (w1, b1, w2, b2)
    ref_bytes, _ = saved_tensor_bytes(ref_mlp, x, *weights, exclude=weights)
    ours, _ = saved_tensor_bytes(gelu_mlp, x, *weights, exclude=weights)
    expected = (M * C + M * H) * 4  # x and h, fp32
    print(f"saved activations: reference {ref_bytes} B, gelu_mlp {ours} B")
    assert ours == expected
    assert ref_bytes >= expected + 3 * M * H * 4  # reference keeps >= 3 more [M, H] tensors
    ff = FeedForward(C, dropout=0.0).to(device)
    ff_bytes, _ = saved_tensor_bytes(ff, x, exclude=tuple(ff.parameters()))
    ff.use_triton = True
    assert saved_tensor_bytes(ff, x, exclude=tuple(ff.parameters()))[0] == expected < ff_bytes


def test_saved_tensor_bytes_counts_each_storage_once():
    """The measuring helper itself: x * x saves x twice (as self and as other), a view of x
    shares its storage, an excluded tensor is not counted: x's bytes, once."""
    x = torch.randn(6, 7, requires_grad=True)
    w = torch.randn(7, requires_grad=True)
    assert saved_tensor_bytes(lambda: x * x, exclude=())[0] == x.nbytes
    assert saved_tensor_bytes(lambda: (x * x[0]) * w, exclude=(w,))[0] == x.nbytes + x.nbytes


# -- bad input: one clear error, never a wrong answer ------------------------------------------

def _good(C=8, H=32, dtype=torch.float32):
    return [torch.randn(3, C, dtype=dtype), torch.randn(H, C, dtype=dtype), torch.randn(H, dtype=dtype),
            torch.randn(C, H, dtype=dtype), torch.randn(C, dtype=dtype)]


@pytest.mark.parametrize("index,bad,match", [
    (1, torch.randn(32, 9), r"w1 has shape \(32, 9\), expected \(32, 8\)"),
    (1, torch.randn(32), r"w1 must have 2 dims"),
    (2, torch.randn(31), r"b1 has shape \(31,\), expected \(32,\)"),
    (3, torch.randn(32, 8), r"w2 has shape \(32, 8\), expected \(8, 32\)"),
    (4, torch.randn(9), r"b2 has shape \(9,\), expected \(8,\)"),
    (0, torch.tensor(1.0), r"x must have at least 1 dim"),
])
def test_rejects_shape_mismatch(index, bad, match):
    args = _good()
    args[index] = bad
    with pytest.raises(ValueError, match=match):
        gelu_mlp(*args)


def test_rejects_bad_dtypes():
    args = _good()
    args[0] = args[0].to(torch.int32)
    with pytest.raises(TypeError, match="x has dtype int32"):
        gelu_mlp(*args)
    args = _good()
    args[3] = args[3].to(torch.bfloat16)
    with pytest.raises(TypeError, match="dtype mismatch: x is float32, w2 is bfloat16"):
        gelu_mlp(*args)


def test_rejects_mixed_devices():
    args = _good()
    args[1] = args[1].to("meta")
    with pytest.raises(ValueError, match="different devices.*w1 is on meta"):
        gelu_mlp(*args)


def test_cpu_without_interpreter_says_how_to_fix(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1 before importing triton"):
        gelu_mlp(*_good())


def test_custom_ops_called_directly_check_shapes(device):
    """gelu_mlp() checked the shapes before calling its op; a direct call of the op with a w1 of
    another width, a short bias or a w2 of another hidden size multiplied what lay in memory
    (garbage, no error). The checks now live in the ops and their fake impls."""
    fwd, bwd = torch.ops.tritongpt.gelu_mlp_fwd, torch.ops.tritongpt.gelu_mlp_bwd
    gen = torch.Generator().manual_seed(31)
    x, w1, w2 = (torch.randn(*s, generator=gen).to(device) for s in ((5, 12), (20, 12), (12, 20)))
    with pytest.raises(ValueError, match=r"w1 has shape \(20, 10\), expected \(20, 12\)"):
        fwd(x, w1[:, :10], None, w2, None)
    with pytest.raises(ValueError, match=r"w2 has shape \(12, 16\), expected \(12, 20\)"):
        fwd(x, w1, None, w2[:, :16], None)
    with pytest.raises(ValueError, match=r"b1 has shape \(3,\), expected \(20,\)"):
        fwd(x, w1, torch.randn(3, device=device), w2, None)
    with pytest.raises(TypeError, match="dtype mismatch: x is float32, w2 is bfloat16"):
        fwd(x, w1, None, w2.bfloat16(), None)
    y, h = fwd(x, w1, None, w2, None)
    with pytest.raises(ValueError, match=r"h has shape \(5, 12\), expected \(5, 20\)"):
        bwd(torch.ones_like(y), x, h[:, :12], w1, w2, [True] * 5)
    with pytest.raises(ValueError, match="needs must hold 5 flags"):
        bwd(torch.ones_like(y), x, h, w1, w2, [True] * 4)
    with pytest.raises(ValueError, match="needs must hold 5 flags"):
        bwd(torch.ones_like(y), x, h, w1, w2, [True] * 6)
    # gradients not asked for come back empty, as the fake impl says (a bias-free or frozen
    # second Linear: dW2 without dB2)
    torch.library.opcheck(bwd.default, (torch.randn_like(y), x, h, w1, w2, [True, True, False, True, False]))
    # the exact GELU's argument, after the others: fake and real agree on it too
    b1 = torch.randn(20, generator=gen).to(device)
    torch.library.opcheck(fwd.default, (x, w1, b1, w2, None, "none"))
    y, h = fwd(x, w1, b1, w2, None, "none")
    torch.library.opcheck(bwd.default, (torch.randn_like(y), x, h, w1, w2, [True] * 5, "none"))
    with pytest.raises(TypeError, match="dtype mismatch: x is float32, dy is bfloat16"):
        bwd(torch.ones_like(y).bfloat16(), x, h, w1, w2, [True] * 5)
    with pytest.raises(TypeError, match="dtype mismatch: x is float32, h is float16"):
        bwd(torch.ones_like(y), x, h.half(), w1, w2, [True] * 5)
    # and under torch.compile the fake impl reports the same while tracing
    with pytest.raises(Exception, match=r"w1 has shape \(20, 10\)"):
        torch.compile(lambda x, w1, w2: fwd(x, w1, None, w2, None), backend="eager", fullgraph=True)(
            x, w1[:, :10], w2)


# -- torch.compile ---------------------------------------------------------------------------

def test_torch_compile_block_fullgraph(device):
    """A pre-LN MLP sublayer (both custom ops) compiles as one graph and matches eager."""
    gen = torch.Generator().manual_seed(6)
    x, w1, b1, w2, b2 = make(None, 24, 96, torch.float32, device, gen, lead=(2, 5))
    lw = (1 + 0.1 * torch.randn(24, generator=gen)).to(device).requires_grad_()
    lb = (0.1 * torch.randn(24, generator=gen)).to(device).requires_grad_()
    params = (x, lw, lb, w1, b1, w2, b2)

    def block(x, lw, lb, w1, b1, w2, b2):
        return x + gelu_mlp(layer_norm(x, lw, lb), w1, b1, w2, b2)

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    y = compiled(*params)
    y.square().sum().backward()
    got = [y.detach()] + [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    y = block(*params)
    y.square().sum().backward()
    for i, (g, e) in enumerate(zip(got, [y] + [p.grad for p in params])):
        assert_close_rel(g, e, 1e-6, f"compiled output/grad #{i}")


# -- GPT-2 sizes on a GPU ----------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("C", [768, 1024, 1280, 1600])
def test_gpt2_sizes_cuda_bf16(C):
    check_parity(4096, C, 4 * C, torch.bfloat16, torch.device("cuda"), seed=C)


@pytest.mark.cuda
@pytest.mark.parametrize("C", [768, 2048])
def test_pythia_sizes_cuda_bf16_exact_gelu(C):
    """The exact (erf) GELU at Pythia 160M's and 1.4B's widths, bf16, forward and every gradient."""
    check_parity(4096, C, 4 * C, torch.bfloat16, torch.device("cuda"), seed=C + 1, approximate="none")


@pytest.mark.cuda
def test_odd_sizes_cuda():
    dev = torch.device("cuda")
    check_parity(4099, 768, 3072, torch.float32, dev, seed=1)
    check_parity(1000, 100, 300, torch.float16, dev, seed=2, lead=None)
    check_parity(None, 1600, 6400, torch.bfloat16, dev, seed=3, lead=(3, 333))


@triton.jit
def gelu_pair(H, A, G, n, BLOCK: tl.constexpr):
    """mlp's GELU and GELU' (the epilogue's and the backward's) of H, on their own."""
    offs = tl.arange(0, BLOCK)
    h = tl.load(H + offs, mask=offs < n, other=0.0)
    tl.store(A + offs, _gelu(h), mask=offs < n)
    tl.store(G + offs, _gelu_grad(h), mask=offs < n)


@triton.jit
def gelu_erf_pair(H, A, G, n, BLOCK: tl.constexpr):
    """The exact GELU and its derivative as the epilogues compute them (GELU_ERF)."""
    offs = tl.arange(0, BLOCK)
    h = tl.load(H + offs, mask=offs < n, other=0.0)
    tl.store(A + offs, _gelu_act(h, True), mask=offs < n)
    tl.store(G + offs, _gelu_act_grad(h, True), mask=offs < n)


@triton.jit
def to_bf16(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n, other=0.0)
    tl.store(Y + offs, cast(x, tl.bfloat16), mask=offs < n)


def test_gelu_and_its_derivative_in_triton_match_float64(device):
    """The epilogue's GELU and the backward's GELU' on their own, over h in [-6, 6], against
    autograd of the float64 formula: fp32 math keeps them to a few 1e-7, far tighter than a
    whole MLP's gradients can show (a constant off in its fourth digit moves GELU' by ~1e-5)."""
    h = torch.linspace(-6, 6, 1001, device=device)
    a, g = torch.empty_like(h), torch.empty_like(h)
    gelu_pair[(1,)](h, a, g, h.numel(), BLOCK=1024)
    h64 = h.double().cpu().requires_grad_()
    a64 = gelu64(h64)
    (g64,) = torch.autograd.grad(a64.sum(), h64)
    assert (a.cpu().double() - a64.detach()).abs().max() < 2e-6
    assert (g.cpu().double() - g64).abs().max() < 2e-6


def test_exact_gelu_and_its_derivative_in_triton_match_float64(device):
    """erf GELU, h Phi(h), and Phi(h) + h phi(h), over h in [-8, 8], against autograd of the float64 erf
    formula, within 1e-6 (the tanh form is up to 4.7e-4 away from it)."""
    h = torch.linspace(-8, 8, 1001, device=device)
    a, g = torch.empty_like(h), torch.empty_like(h)
    gelu_erf_pair[(1,)](h, a, g, h.numel(), BLOCK=1024)
    h64 = h.double().cpu().requires_grad_()
    a64 = gelu64(h64, "none")
    (g64,) = torch.autograd.grad(a64.sum(), h64)
    assert (a.cpu().double() - a64.detach()).abs().max() < 1e-6
    assert (g.cpu().double() - g64).abs().max() < 1e-6
    assert (gelu64(h64, "tanh") - a64).abs().max() > 1e-4


@triton.jit
def relu2_pair(H, A, G, n, BLOCK: tl.constexpr):
    """The squared ReLU and its derivative as the epilogues compute them (RELU2)."""
    offs = tl.arange(0, BLOCK)
    h = tl.load(H + offs, mask=offs < n, other=0.0)
    tl.store(A + offs, _mlp_act(h, False, True), mask=offs < n)
    tl.store(G + offs, _mlp_act_grad(h, False, True), mask=offs < n)


def test_relu2_and_its_derivative_in_triton_match_float64(device):
    """relu(h)^2 and 2 relu(h) over h in [-6, 6] (0 included), against autograd of the float64 formula: the
    square of an fp32 h is one rounding off, the derivative exact; both 0 for h <= 0."""
    h = torch.linspace(-6, 6, 1001, device=device)
    a, g = torch.empty_like(h), torch.empty_like(h)
    relu2_pair[(1,)](h, a, g, h.numel(), BLOCK=1024)
    h64 = h.double().cpu().requires_grad_()
    a64 = gelu64(h64, "relu2")
    (g64,) = torch.autograd.grad(a64.sum(), h64)
    assert ((a.cpu().double() - a64.detach()).abs() <= 2 ** -24 * a64.detach()).all()
    assert torch.equal(g.cpu().double(), g64)
    assert (a[h <= 0] == 0).all() and (g[h <= 0] == 0).all()


def test_bf16_cast_rounds_to_nearest_even(device):
    """The kernels' fp32 -> bf16 store (kernels/_common.cast) rounds as torch does, bit for bit
    (truncation would double the rounding error, which bf16 parity tolerances cannot see)."""
    gen = torch.Generator().manual_seed(15)
    x = torch.randn(1000, generator=gen) * torch.logspace(-3, 3, 1000)
    # ties: halfway between two bf16 values, with an even and an odd lower neighbour
    ties = torch.tensor([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -(1.0 + 2 ** -8), 3.0 + 2 ** -7])
    x = torch.cat([x, ties]).to(device)
    y = torch.empty(x.shape, device=device, dtype=torch.bfloat16)
    to_bf16[(1,)](x, y, x.numel(), BLOCK=1024)
    assert torch.equal(y.cpu(), x.cpu().to(torch.bfloat16))


def test_forward_activation_is_gelu_of_the_saved_h(device):
    """Backward recomputes a = gelu(h) from the saved h (rounded to the activations' dtype) for
    dW2, so forward must multiply by the same a: GELU of the rounded h, not of the fp32
    accumulator. In bf16 the two differ in about half the entries of a, which no parity tolerance
    sees. Checked on the first product alone against mlp's own GELU applied to the saved h and
    rounded as the kernel stores (a compiled GPU kernel may contract a multiply-add differently
    and flip a rare rounding: a few entries may differ, not a large share)."""
    from tritongpt.kernels import mlp

    gen = torch.Generator().manual_seed(33)
    x, w1, b1, _, _ = make(40, 48, 72, torch.bfloat16, device, gen)
    with torch.no_grad():
        a, h = mlp._matmul(x, w1.t(), b1, mlp.EPI_GELU)
    h32 = h.float().contiguous()
    a32, g = torch.empty_like(h32), torch.empty_like(h32)
    gelu_pair[(1,)](h32, a32, g, h32.numel(), BLOCK=4096)
    want = torch.empty_like(h)
    to_bf16[(1,)](a32, want, a32.numel(), BLOCK=4096)
    differ = (a != want).float().mean().item()
    print(f"entries of a that are not gelu(saved h): {differ:.2%}")
    assert differ <= 0.01


@pytest.mark.parametrize("C,H,approximate", [(0, 8, "tanh"), (5, 0, "tanh"), (0, 8, "none"), (0, 8, "relu2")])
def test_empty_feature_or_hidden_dims_match_pytorch(C, H, approximate, device, nan_filled_empty):
    """No input features (y = GELU(b1) @ w2^T + b2) or no hidden units (y = b2): PyTorch's
    answers and gradients, not a reshape error (nor a buffer no kernel wrote). With C = 0 the GELU
    of b1 is torch's, outside the kernel, and y is empty: checked on the launch's own a, the exact
    GELU too (mutation audit: that branch's tanh GELU for approximate "none" passed every test)."""
    gen = torch.Generator().manual_seed(17)
    params = [torch.randn(*shape, generator=gen).to(device).requires_grad_()
              for shape in ((4, C), (H, C), (H,), (C, H), (C,))]
    leaves = [p.detach().double().requires_grad_() for p in params]
    y, y64 = gelu_mlp(*params, approximate=approximate), ref_mlp(*leaves, approximate)
    dy = torch.randn(y.shape, generator=gen).to(device)
    y.backward(dy)
    y64.backward(dy.double())
    assert y.shape == (4, C)
    for name, got, want in zip(("y",) + NAMES, [y] + [p.grad for p in params], [y64] + [p.grad for p in leaves]):
        assert got.shape == want.shape and torch.allclose(got.double(), want, atol=1e-5), name
    if C == 0:
        from tritongpt.kernels import mlp

        x, w1, b1 = (p.detach() for p in params[:3])
        a, h = mlp._matmul(x, w1.t(), b1, mlp.EPI_GELU, approximate=approximate)
        assert torch.equal(h, b1.expand(4, H))
        assert torch.allclose(a.double(), gelu64(h.double(), approximate), atol=1e-6)


def test_meta_tensors_give_shapes():
    m = [torch.empty(*shape, device="meta") for shape in ((2, 3, 8), (16, 8), (16,), (8, 16), (8,))]
    y = gelu_mlp(*m)
    assert y.device.type == "meta" and y.shape == (2, 3, 8)


def test_autotune_key_tells_operand_layouts_apart(monkeypatch):
    """Without biases, the second Linear's forward (h_act @ w2^T) and dx = dh @ w1 have the same
    sizes and flags; their B operands are laid out differently, so on a GPU they must not share
    a tuned tile. The interpreter runs one config, so read the key the autotuner would build."""
    from tritongpt.kernels import mlp

    kernel = mlp._matmul_kernel
    keys = {}

    def capture(*args, grid, warmup, **kwargs):
        named = {**dict(zip(kernel.arg_names, args)), **kwargs}
        b = named["B"]
        keys[(tuple(b.shape), b.stride())] = tuple(named[k] for k in kernel.keys)

    monkeypatch.setattr(kernel.fn, "run", capture)  # one config here: _common.launch_tuned launches kernel.fn
    gen = torch.Generator().manual_seed(0)
    x, w1, _, w2, _ = make(24, 16, 64, torch.float32, "cpu", gen, bias=False)
    h = torch.randn(24, 64, generator=gen)
    mlp._fwd_launch(x, w1, None, w2, None)
    mlp._bwd_launch(torch.randn(24, 16, generator=gen), x, h, w1, w2)
    w2_t = keys[((64, 16), w2.t().stride())]   # second Linear forward
    w1_b = keys[((64, 16), w1.stride())]       # dx = dh @ w1
    assert w2_t != w1_b


def test_autotune_key_holds_every_flag():
    """Each constexpr flag changes what a program loads and holds (EPILOGUE 3 has two accumulators,
    B_SWIGLU three tiles a stage, SUM2 a second K loop), so a tile tuned for one mode may not fit
    another: every one is in the autotune key. Not in it: the tuned meta-parameters, and PRECISION,
    which follows the dtype, which the autotuner adds to the key itself (mutation audit: dropping
    GATE_GELU, GELU_ERF, B_SWIGLU, SUM2 or EPILOGUE from the key passed every test)."""
    import inspect

    from tritongpt.kernels import mlp

    kernel = mlp._matmul_kernel
    fn = getattr(kernel.fn, "fn", kernel.fn)  # the Python function, under the interpreter or not
    flags = {name for name, p in inspect.signature(fn).parameters.items() if p.annotation is tl.constexpr}
    tuned = {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "PRECISION", "USE_TMA"}  # (TMA_OK, in the key, picks USE_TMA)
    assert {"EPILOGUE", "B_SWIGLU", "GATE_GELU", "GELU_ERF", "A_T", "B_T"} <= flags  # the signature was read
    assert flags - tuned <= set(kernel.keys), f"not in the autotune key: {sorted(flags - tuned - set(kernel.keys))}"


@pytest.mark.parametrize("approximate", ["tanh", "none", "relu2"])
def test_dh_epilogue_stores_the_forward_activation(approximate, device):
    """dW2 = dy^T a reads the a that dh's epilogue stores beside dh (STORE_ACT), so that a must be the
    one forward multiplied by: GELU of the saved (rounded) h, rounded -- bit for bit under the
    interpreter (a compiled kernel may contract a multiply-add differently: a few entries may
    differ) -- and close to float64's GELU of h, the exact one for "none". Storing it leaves dh as it
    was. bf16, where a wrong rounding or the other GELU shows in many entries."""
    from tritongpt.kernels import mlp

    gen = torch.Generator().manual_seed(41)
    x, w1, b1, w2, _ = make(37, 24, 72, torch.bfloat16, device, gen)
    dy = torch.randn(37, 24, generator=gen).to(device, torch.bfloat16)
    with torch.no_grad():
        a_fwd, h = mlp._matmul(x, w1.t(), b1, mlp.EPI_GELU, approximate=approximate)
        dh, a = mlp._matmul(dy, w2, epilogue=mlp.EPI_GELU_GRAD, aux=h, approximate=approximate, store_act=True)
        dh_alone, nothing = mlp._matmul(dy, w2, epilogue=mlp.EPI_GELU_GRAD, aux=h, approximate=approximate)
        # a saved h in another layout (a direct op call may pass one): a is new, so h is read in a's layout
        dh_t, a_t = mlp._matmul(dy, w2, epilogue=mlp.EPI_GELU_GRAD, aux=h.t().contiguous().t(),
                                approximate=approximate, store_act=True)
    assert nothing is None and a.shape == h.shape and a.dtype == h.dtype
    assert torch.equal(dh, dh_alone) and torch.equal(dh_t, dh) and torch.equal(a_t, a)
    differ = (a != a_fwd).float().mean().item()
    assert differ == 0 if device.type == "cpu" else differ <= 0.01, differ
    want = gelu64(h.double(), approximate)
    assert ((a.double() - want).abs() <= 2 ** -8 * want.abs() + 1e-6).all()  # one bf16 rounding of a
    with pytest.raises(ValueError, match="store_act needs epilogue"):
        mlp._matmul(x, w1.t(), b1, mlp.EPI_GELU, store_act=True)


@pytest.mark.parametrize("approximate", ["tanh", "none", "relu2"])
@pytest.mark.parametrize("trainable", [
    (True, True, True, True, True),       # dh made: a stored beside it, dW2 a plain product
    (False, False, False, True, True),    # W1 frozen, no dx: no dh launch, gelu(h) recomputed in dW2 (B_GELU)
    (False, False, True, True, False),    # dh made for db1 alone: a stored
    (True, False, False, False, True),    # W2 frozen: dh made, no a
])
def test_dw2_from_the_stored_activation_or_recomputed(trainable, approximate, device, monkeypatch):
    """dW2 takes a from dh's epilogue when backward makes dh, and recomputes it on its B tiles only
    when it does not (the launches' flags); either way dW2 matches float64 (fp32), and in bf16 the two
    paths give the same dW2 (the same rounded a; bit for bit under the interpreter)."""
    from tritongpt.kernels import mlp

    gen = torch.Generator().manual_seed(43)
    params = make(29, 24, 72, torch.float32, device, gen)
    for p, train in zip(params, trainable):
        p.requires_grad_(train)
    y = gelu_mlp(*params, approximate=approximate)
    dy = torch.randn(y.shape, generator=gen).to(device)
    launched = record_launches(monkeypatch, mlp)
    y.backward(dy)
    need_dx, need_dw1, need_db1, need_dw2, _ = trainable
    need_dh = need_dx or need_dw1 or need_db1
    grad_launch = [k for k in launched if k.get("epilogue") == mlp.EPI_GELU_GRAD]
    assert len(grad_launch) == need_dh
    assert all(k.get("store_act", False) == need_dw2 for k in grad_launch)
    assert sum(k.get("b_gelu", False) for k in launched) == int(need_dw2 and not need_dh)
    leaves = [p.detach().double().requires_grad_(train) for p, train in zip(params, trainable)]
    ref_mlp(*leaves, approximate).backward(dy.double())
    for name, p, p64, train in zip(NAMES, params, leaves, trainable):
        if train:
            assert_close_rel(p.grad, p64.grad, 1e-4, name)
    if need_dw2:  # bf16: the stored a and the recomputed one are the same numbers
        x, w1, b1, w2, b2 = (p.detach().bfloat16() for p in params)
        dy16 = dy.bfloat16()
        with torch.no_grad():
            _, h = mlp._fwd_launch(x, w1, b1, w2, b2, approximate)
            stored = mlp._bwd_launch(dy16, x, h, w1, w2, (True,) * 5, approximate)[3]
            recomputed = mlp._bwd_launch(dy16, x, h, w1, w2, (False, False, False, True, False), approximate)[3]
        if device.type == "cpu":
            assert torch.equal(stored, recomputed)
        else:
            assert_close_rel(stored, recomputed, 1e-2, "dw2 stored vs recomputed")


def test_stored_activation_is_freed_once_dw2_is_made(device, monkeypatch):
    """The a that dh's epilogue stores lives only until dW2 = dy^T a is made: no reference may be left
    when dW1's and dx's products run (backward would hold a second [M, H] through them)."""
    import weakref

    from tritongpt.kernels import mlp

    gen = torch.Generator().manual_seed(55)
    x, w1, b1, w2, b2 = (p.detach() for p in make(29, 24, 72, torch.float32, device, gen))
    dy = torch.randn(29, 24, generator=gen).to(device)
    stored, alive = [], []
    matmul = mlp._matmul

    def spy(*args, **kwargs):
        if stored:
            alive.append(stored[0]() is not None)
        out = matmul(*args, **kwargs)
        if kwargs.get("store_act"):
            stored.append(weakref.ref(out[1]))
        return out

    monkeypatch.setattr(mlp, "_matmul", spy)
    with torch.no_grad():
        _, h = mlp._fwd_launch(x, w1, b1, w2, b2)
        mlp._bwd_launch(dy, x, h, w1, w2, (True,) * 5)
    assert len(stored) == 1 and alive == [True, False, False], alive  # dW2 reads it; then gone


# -- where the plain products run (kernels/mlp.py: _plain_path) ---------------------------------

def KernelSpy(kernel):
    """A stand-in for mlp._matmul_kernel keeping each launch's (EPILOGUE, HAS_BIAS)."""
    return FlagSpy(kernel, ("EPILOGUE", "HAS_BIAS"))


def PointwiseSpy(kernel):
    """A stand-in for mlp._gelu_pointwise_kernel (the split path's GELU pass) keeping each launch's (GRAD, STORE_ACT)."""
    return FlagSpy(kernel, ("GRAD", "STORE_ACT"))


@pytest.fixture
def plain_picks():
    """mlp's timed picks (plain and GELU products) emptied for the test, and again after it; -> the plain ones."""
    from tritongpt.kernels import mlp

    for picks in (mlp._PLAIN, mlp._GELU, mlp._GATE):
        picks.clear()
    yield mlp._PLAIN
    for picks in (mlp._PLAIN, mlp._GELU, mlp._GATE):
        picks.clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("approximate", ["tanh", "none", "relu2"])
def test_plain_products_on_torch_match_float64(dtype, approximate, device, monkeypatch):
    """TRITONGPT_MLP_MATMUL=torch: the second Linear, dW2, dW1 and dx run as torch.mm / addmm (transposed
    operands as views), and the two GELU products split: torch's product, then the GELU (forward) or GELU' with
    the stored activation (backward) in one Triton pass; no matmul kernel launch. Forward and every gradient
    match float64, with either GELU."""
    from tritongpt.kernels import mlp

    monkeypatch.setattr(mlp, "MLP_MATMUL", "torch")
    spy, pointwise = KernelSpy(mlp._matmul_kernel), PointwiseSpy(mlp._gelu_pointwise_kernel)
    monkeypatch.setattr(mlp, "_matmul_kernel", spy)
    monkeypatch.setattr(mlp, "_gelu_pointwise_kernel", pointwise)
    check_parity(37, 48, 72, dtype, device, seed=21, approximate=approximate)
    assert spy.launched == [] and pointwise.launched == [(False, False), (True, True)]


def test_split_gelu_product_without_the_stored_activation(device, monkeypatch):
    """W2 frozen: backward's split GELU' pass stores no activation (no dW2 to feed) and the rest matches float64."""
    from tritongpt.kernels import mlp

    monkeypatch.setattr(mlp, "MLP_MATMUL", "torch")
    pointwise = PointwiseSpy(mlp._gelu_pointwise_kernel)
    monkeypatch.setattr(mlp, "_gelu_pointwise_kernel", pointwise)
    gen = torch.Generator().manual_seed(30)
    params = make(21, 24, 40, torch.bfloat16, device, gen)
    params[3].requires_grad_(False)
    y = gelu_mlp(*params)
    dy = torch.randn(y.shape, generator=gen).to(device, torch.bfloat16)
    y.backward(dy)
    assert pointwise.launched == [(False, False), (True, False)] and params[3].grad is None
    leaves = [p.detach().double().requires_grad_(p.requires_grad) for p in params]
    ref_mlp(*leaves).backward(dy.double())
    for name, p, p64 in zip(NAMES, params, leaves):
        if p.requires_grad:
            assert_close_rel(p.grad, p64.grad, 1e-2, name)


def test_plain_products_on_triton_launch_all_six(device, monkeypatch):
    from tritongpt.kernels import mlp

    monkeypatch.setattr(mlp, "MLP_MATMUL", "triton")
    spy = KernelSpy(mlp._matmul_kernel)
    monkeypatch.setattr(mlp, "_matmul_kernel", spy)
    check_parity(9, 24, 40, torch.bfloat16, device, seed=22)
    assert sorted(spy.launched) == sorted([(mlp.EPI_GELU, True), (mlp.EPI_NONE, True), (mlp.EPI_GELU_GRAD, False)]
                                          + [(mlp.EPI_NONE, False)] * 3)


def test_auto_times_each_plain_product_once_and_keeps_the_faster(device, monkeypatch, plain_picks):
    """"auto" on a timed device (the CPU added here, so it runs through the interpreter): each plain product's
    shape is timed on its first call, both paths run for real, and the faster one (here: Triton for the product
    with a bias, torch for the rest) serves later calls without timing again; autotune_choices lists the picks."""
    from tritongpt.kernels import mlp
    from tritongpt.kernels._common import autotune_choices

    monkeypatch.setattr(mlp, "TIMED_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(mlp, "SMALL_M", 0)
    timed = []

    def timer(fn):  # runs the candidate; torch's takes 2, Triton's 1 with a bias (the second Linear), else 3
        spy.launched.clear()
        fn()
        timed.append(list(spy.launched))
        return 2.0 if not spy.launched else 1.0 if spy.launched == [(mlp.EPI_NONE, True)] else 3.0

    monkeypatch.setattr(mlp, "_PLAIN_TIMER", timer)
    spy = KernelSpy(mlp._matmul_kernel)
    monkeypatch.setattr(mlp, "_matmul_kernel", spy)
    check_parity(37, 48, 72, torch.bfloat16, device, seed=23)
    # six shapes, each timed on both paths: Triton's run launched it, torch's no matmul kernel. In order: fc1's GELU
    # product, y = a w2^T + b2, backward's GELU' product, dW2, dW1, dx
    assert len(timed) == 12 and timed[0::2] == [[(mlp.EPI_GELU, True)], [(mlp.EPI_NONE, True)],
                                                [(mlp.EPI_GELU_GRAD, False)]] + [[(mlp.EPI_NONE, False)]] * 3
    assert all(t == [] for t in timed[1::2])
    assert [p["path"] for p in mlp._GELU.values()] == ["torch", "torch"]  # 2 against Triton's fused 3
    assert [p["path"] for p in plain_picks.values()] == ["triton", "torch", "torch", "torch"]
    assert all(p["triton_ms"] > 0 and p["torch_ms"] > 0 for p in plain_picks.values())
    listed = [c for c in autotune_choices() if c["kernel"] == "mlp.plain_product"]
    assert [c["config"]["path"] for c in listed] == ["triton", "torch", "torch", "torch"]
    assert listed[0]["key"]["bias"] == "True" and listed[0]["key"]["dtype"] == "bfloat16"

    timed.clear()
    spy.launched.clear()
    check_parity(37, 48, 72, torch.bfloat16, device, seed=24)  # the same shapes: the picks, untimed
    assert timed == []
    assert spy.launched == [(mlp.EPI_NONE, True)]


def test_auto_keeps_fp32_and_untimed_devices_on_triton_and_small_rows_on_torch(device, monkeypatch, plain_picks):
    """fp32 stays on the Triton kernel (IEEE products everywhere), as does a device "auto" does not time (the
    interpreter's CPU); up to SMALL_M rows cuBLAS is taken untimed (host-bound; no search per decode batch)."""
    from tritongpt.kernels import mlp

    def timer(fn):
        raise AssertionError("timed")

    monkeypatch.setattr(mlp, "_PLAIN_TIMER", timer)
    spy = KernelSpy(mlp._matmul_kernel)
    monkeypatch.setattr(mlp, "_matmul_kernel", spy)
    check_parity(19, 24, 40, torch.bfloat16, device, seed=25)  # the CPU: not a timed device
    assert len(spy.launched) == 6 and not plain_picks
    monkeypatch.setattr(mlp, "TIMED_DEVICES", ("cuda", "cpu"))
    spy.launched.clear()
    check_parity(19, 24, 40, torch.float32, device, seed=26)
    assert len(spy.launched) == 6 and not plain_picks
    spy.launched.clear()
    check_parity(19, 24, 40, torch.bfloat16, device, seed=27)  # 19 tokens: M here, K in dW2 and dW1
    assert spy.launched == []  # the GELU products split too
    picks = [*plain_picks.values(), *mlp._GELU.values()]
    assert len(picks) == 6 and {p["path"] for p in picks} == {"torch"}
    assert all(p["note"].startswith("untimed") for p in picks)


def test_small_m_rule_counts_tokens_not_a_weight_gradients_rows(device, monkeypatch, plain_picks):
    """SMALL_M is about the token count (decode, short prompts), which is M in the second Linear and dx but K in
    dW2 = dy^T a and dW1 = dh^T x, whose M is the width C or H. With more tokens than SMALL_M all four plain products
    are timed, though C is under it; with fewer, all four go to cuBLAS untimed, though H is over it."""
    from tritongpt.kernels import mlp

    monkeypatch.setattr(mlp, "TIMED_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(mlp, "SMALL_M", 32)  # C = 24 under it, H = 40 over it
    monkeypatch.setattr(mlp, "_PLAIN_TIMER", lambda fn: (fn(), 1.0)[1])
    check_parity(40, 24, 40, torch.bfloat16, device, seed=28)  # 40 tokens: over SMALL_M
    assert len(plain_picks) == 4 and all("note" not in p and p["torch_ms"] > 0 for p in plain_picks.values())
    plain_picks.clear()
    check_parity(19, 24, 40, torch.bfloat16, device, seed=29)  # 19 tokens: under it
    assert len(plain_picks) == 4 and all(p["note"].startswith("untimed") for p in plain_picks.values())


def test_plain_product_picks_are_kept_per_operand_layout(device, monkeypatch, plain_picks):
    """The same sizes in another layout (a transposed view, a bias) are other shapes to cuBLAS and to the tile:
    each is timed and kept on its own, as the Triton kernel's autotune key tells them apart too."""
    from tritongpt.kernels import mlp

    monkeypatch.setattr(mlp, "TIMED_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(mlp, "SMALL_M", 0)
    monkeypatch.setattr(mlp, "_PLAIN_TIMER", lambda fn: (fn(), 1.0)[1])
    gen = torch.Generator().manual_seed(5)
    a, b = (torch.randn(20, 20, generator=gen, dtype=torch.bfloat16) for _ in range(2))
    bias = torch.randn(20, generator=gen, dtype=torch.bfloat16)
    for x, y, z in ((a, b, None), (a.t(), b, None), (a, b.t(), None), (a, b, bias), (a, b, None)):
        c, _ = mlp._matmul(x, y, z)
        ref = x.double() @ y.double() + (z.double() if z is not None else 0)
        assert_close_rel(c, ref, 1e-2, "c")
    assert len(plain_picks) == 4


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_plain_products_keep_the_inputs_dtype_under_an_enclosing_autocast(path, device, monkeypatch):
    """The ops called directly with fp32 inside a bf16 autocast: the op's body still sees the autocast, which would
    recast torch.mm's operands; its outputs stay in x's dtype (as the fake impls say), on either path."""
    import torch.nn.functional as F

    from tritongpt.kernels import mlp

    monkeypatch.setattr(mlp, "MLP_MATMUL", path)
    x, w1, b1, w2, b2 = (t.detach() for t in make(5, 8, 16, torch.float32, device, torch.Generator().manual_seed(6)))
    dy = torch.randn(5, 8, generator=torch.Generator().manual_seed(7)).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y, h = torch.ops.tritongpt.gelu_mlp_fwd(x, w1, b1, w2, b2)
        grads = torch.ops.tritongpt.gelu_mlp_bwd(dy, x, h, w1, w2, [True] * 5)
    assert [t.dtype for t in (y, h, *grads)] == [torch.float32] * 7
    want = F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)
    assert_close_rel(y, want.double(), 1e-5, "y")


def test_plain_products_setting_is_checked(device, monkeypatch):
    from tritongpt.kernels import mlp

    monkeypatch.setattr(mlp, "MLP_MATMUL", "cublas")
    with pytest.raises(ValueError, match="TRITONGPT_MLP_MATMUL is 'cublas'; expected one of: auto, triton, torch"):
        make_and_run = make(5, 8, 16, torch.float32, device, torch.Generator().manual_seed(0))
        gelu_mlp(*make_and_run)


def test_timed_pick_during_graph_capture_or_out_of_memory_takes_the_default_and_keeps_nothing(monkeypatch):
    from tritongpt.kernels import _common

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    picks = {}
    assert _common.timed_pick(picks, ("k",), {"a": None, "b": None}, default="b",
                              timer=lambda fn: pytest.fail("timed in a capture")) == "b"
    assert picks == {}
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)

    def out_of_memory(fn):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (stand-in)")

    assert _common.timed_pick(picks, ("k",), {"a": None, "b": None}, default="b", timer=out_of_memory) == "b"
    assert picks == {("k",): {"path": "b", "note": "untimed: out of memory while timing"}}  # not timed again
    picks.clear()

    def cublas_out_of_memory(fn):
        raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED: out of memory (stand-in)")

    assert _common.timed_pick(picks, ("k",), {"a": None}, default="b", timer=cublas_out_of_memory) == "b"
    assert picks[("k",)]["path"] == "b"
    picks.clear()

    def other_error(fn):
        raise RuntimeError("an illegal memory access (stand-in)")

    with pytest.raises(RuntimeError, match="illegal memory access"):
        _common.timed_pick(picks, ("k",), {"a": None}, default="b", timer=other_error)
    assert picks == {}
    ms = {"a": 0.5, "b": 0.7}
    assert _common.timed_pick(picks, ("k",), {"a": "a", "b": "b"}, default="b", timer=ms.get) == "a"
    assert picks == {("k",): {"path": "a", "a_ms": 0.5, "b_ms": 0.7}}


@pytest.mark.cuda
def test_plain_products_gpu_auto_and_forced_triton_bf16(monkeypatch, plain_picks):
    """On a GPU: "auto" times the four plain products at GPT-2 small's width and keeps a pick with both times;
    the forced-Triton path (every product this kernel) holds parity at the same size."""
    from tritongpt.kernels import mlp

    dev = torch.device("cuda")
    check_parity(4096, 768, 3072, torch.bfloat16, dev, seed=31)
    assert len(plain_picks) == 4
    assert all(p["path"] in ("triton", "torch") and p["triton_ms"] > 0 and p["torch_ms"] > 0
               for p in plain_picks.values())
    monkeypatch.setattr(mlp, "MLP_MATMUL", "triton")
    check_parity(4096, 768, 3072, torch.bfloat16, dev, seed=32)


def test_split_backward_product_refuses_a_bias(device):
    """The backward GELU' product takes no bias (the fused kernel would add one; the split path would drop it):
    asked for one, the split path says so rather than give another answer than the fused one."""
    from tritongpt.kernels import mlp

    gen = torch.Generator().manual_seed(31)
    a, b, h = torch.randn(8, 16, generator=gen), torch.randn(16, 24, generator=gen), torch.randn(8, 24, generator=gen)
    with pytest.raises(ValueError, match="epilogue 2 takes no bias"):
        mlp._matmul(a, b, torch.randn(24, generator=gen), mlp.EPI_GELU_GRAD, h, path="torch")


# -- the model option: GPTConfig.mlp "relu2" -------------------------------------------------------

def test_relu2_model_triton_path_matches_reference_fp32(device):
    """mlp "relu2" with a hidden size of its own and no biases (Arcee's shape): fc1 is mlp_hidden wide, and
    logits, loss and every gradient agree on both paths; a GELU model's mlp_hidden is still refused."""
    from test_model_paths import _compare_paths, _randomize
    from tritongpt.errors import UserError
    from tritongpt.model.config import GPTConfig
    from tritongpt.model.gpt import GPTModel

    tiny = dict(vocab_size=67, context_length=24, n_embd=64, n_layer=2, n_head=4)
    assert GPTConfig(**tiny, mlp="relu2").ff_hidden == 256
    with pytest.raises(UserError, match="GPTConfig.mlp_hidden 100 is the gated .* or squared-ReLU MLP's hidden size"):
        GPTConfig(**tiny, mlp_hidden=100)
    torch.manual_seed(21)
    model = _randomize(GPTModel(GPTConfig(**tiny, mlp="relu2", mlp_hidden=72, bias=False))).to(device)
    ff = model.trf_blocks[1].ff
    assert isinstance(ff, FeedForward) and isinstance(ff.act, ReLU2)
    assert ff.fc1.weight.shape == (72, 64) and ff.fc1.bias is None
    idx = torch.randint(0, 67, (2, 19), device=device)
    _compare_paths(model, idx, torch.roll(idx, -1, 1), 1e-4)


def test_pretrain_mlp_relu2_two_steps(corpus, tmp_path, capsys, one_thread):
    """pretrain --mlp relu2 --mlp-hidden: two steps of a squared-ReLU model, saved as one (its summary says so); a
    resume that would build another MLP is refused naming it."""
    from parity import pretrain_argv
    from tritongpt.cli import main
    from tritongpt.model.gpt import GPTModel

    argv = pretrain_argv(corpus, tmp_path / "r2", "--max-steps", "2", "--mlp", "relu2", "--mlp-hidden", "72")
    assert main(argv) == 0
    assert ", squared-ReLU MLP (hidden 72)) on cpu" in capsys.readouterr().out
    model = GPTModel.load(tmp_path / "r2" / "ckpt-0000002" / "model.safetensors")
    assert (model.config.mlp, model.config.ff_hidden) == ("relu2", 72)
    # a resume without the flags is refused by name (the saved MLP's kind and width), before the weights' shapes
    assert main(pretrain_argv(corpus, tmp_path / "r2", "--max-steps", "3", "--resume")) == 2
    assert "model has a squared-ReLU MLP of hidden size 72, this run's model has a GELU MLP: pass --mlp relu2 " \
           "--mlp-hidden 72" in capsys.readouterr().err
