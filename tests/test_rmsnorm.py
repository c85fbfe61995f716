"""RMSNorm: the Triton kernels (kernels/layernorm.py rms_norm / add_rms_norm, IS_RMS) vs the float64
formula and vs tritongpt.model.layers.RMSNorm; then a model with GPTConfig.norm="rmsnorm" on both
paths, its config, resume, export and the pretrain flag.

On CPU the kernels run through Triton's interpreter, so shapes are small; the CUDA-marked tests
repeat the check at GPT-2 sizes when a GPU is present.
"""
import pytest
import torch

import plot_stub
from parity import assert_close_mixed, assert_close_rel, pretrain_argv
from tritongpt.errors import UserError
from tritongpt.kernels.layernorm import MAX_WIDTH, add_rms_norm, rms_norm
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.model.layers import LayerNorm, RMSNorm

no_plots = plot_stub.no_plots  # (empty loss.png: no test here reads one)

TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def ref64(x, w, eps=1e-5):
    """The textbook formula in float64: x / sqrt(mean(x^2) + eps) * w."""
    x = x.double()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w.double()


def dx_rounding_floor(x64, w64, dy64, eps):
    """The error fp32 math cannot avoid in dx = rstd * (w*dy - x_hat * mean(x_hat*w*dy)): at width 1
    x_hat^2 is x^2 / (x^2 + eps), so the two terms cancel to eps / x^2 of their size and their fp32
    rounding is all of dx (4e-3 relative at width 1 on a correct kernel). 16 * 2^-24 * ||terms||;
    rows that do not cancel are held to the relative tolerance by it being small."""
    x64, w64 = x64.detach(), w64.detach()
    rstd = 1.0 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + eps)
    x_hat, wdy = x64 * rstd, w64 * dy64
    terms = rstd * (wdy.abs() + x_hat.abs() * (x_hat * wdy).mean(-1, keepdim=True).abs())
    return 16 * 2.0 ** -24 * terms.norm().item()


def make(shape, dtype, device, gen, pdtype=None):
    # an offset, so that a mean subtracted (LayerNorm's) would change y; weight away from its 1 init
    x = (torch.randn(shape, generator=gen) * 2.0 + 0.7).to(device, dtype).requires_grad_()
    w = (1.0 + 0.5 * torch.randn(shape[-1], generator=gen)).to(device, pdtype or dtype).requires_grad_()
    return x, w


def check_parity(shape, dtype, device, seed, pdtype=None, eps=1e-5):
    gen = torch.Generator().manual_seed(seed)
    x, w = make(shape, dtype, device, gen, pdtype)
    y = rms_norm(x, w, eps)
    assert y.dtype == dtype and y.shape == x.shape
    dy = torch.randn(shape, generator=gen).to(device, dtype)
    y.backward(dy)
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    ref64(x64, w64, eps).backward(dy.double())
    tol = max(TOL[dtype], TOL[pdtype or dtype])
    assert_close_rel(y, ref64(x64, w64, eps), tol, f"y {dtype} {shape}")
    assert_close_mixed(x.grad, x64.grad, tol, dx_rounding_floor(x64, w64, dy.double(), eps), f"dx {dtype} {shape}")
    assert_close_rel(w.grad, w64.grad, tol, f"dweight {dtype} {shape}")
    assert w.grad.dtype == w.dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 64), (7, 100), (37, 768), (2, 5, 1024)])
def test_parity_fp64(shape, dtype, device):
    check_parity(shape, dtype, device, seed=sum(shape) + len(str(dtype)))


def test_edge_widths_and_mixed_dtypes(device):
    check_parity((3, 1), torch.float32, device, seed=1)
    check_parity((2, MAX_WIDTH), torch.float32, device, seed=2)
    # bf16 activations with fp32 weights (autocast's case): y stays bf16, the weight's gradient fp32
    check_parity((9, 100), torch.bfloat16, device, seed=3, pdtype=torch.float32)


def test_programs_that_walk_several_row_blocks(device):
    """70 rows of width 2100: two BLOCK_M steps per program under the interpreter and a ragged
    last one (test_layernorm's shape), so dweight's partial sums must accumulate across steps."""
    check_parity((70, 2100), torch.float32, device, seed=4)


@pytest.mark.parametrize("eps", [0.5, 1e-12])
def test_eps_is_honoured(eps, device):
    """rms_norm's eps goes under the square root: 0.5 next to a mean square near 0.1 moves y by far
    more than the tolerance, and 1e-12 on rows of 1e-3 leaves them at unit RMS (an eps stuck at
    1e-5 gives 0.995: 5e-3 off)."""
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(5, 40, generator=gen) * (0.3 if eps == 0.5 else 1e-3)).to(device).requires_grad_()
    w = (1 + 0.3 * torch.randn(40, generator=gen)).to(device).requires_grad_()
    dy = torch.randn(5, 40, generator=gen).to(device)
    rms_norm(x, w, eps).backward(dy)
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    y64 = ref64(x64, w64, eps)
    y64.backward(dy.double())
    assert_close_rel(rms_norm(x, w, eps), y64, 1e-5, f"y, eps {eps}")
    assert_close_rel(x.grad, x64.grad, 1e-5, f"dx, eps {eps}")
    assert_close_rel(w.grad, w64.grad, 1e-5, f"dweight, eps {eps}")


def test_constant_rows_and_zero_rows(device):
    """RMSNorm does not centre: a constant row c gives sign(c) * w (LayerNorm's would be 0, the
    bias), and a zero row gives exactly 0 with a finite gradient (rstd = 1/sqrt(eps))."""
    gen = torch.Generator().manual_seed(6)
    x = torch.tensor([[1.7], [-3.0], [0.0]]).expand(3, 50).contiguous().to(device).requires_grad_()
    w = (1 + 0.3 * torch.randn(50, generator=gen)).to(device).requires_grad_()
    y = rms_norm(x, w)
    assert_close_rel(y, ref64(x.detach(), w.detach()), 1e-6, "y, constant rows")
    assert torch.equal(y[2], torch.zeros(50, device=device))
    dy = torch.randn(3, 50, generator=gen).to(device)
    y.backward(dy)
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    ref64(x64, w64).backward(dy.double())
    assert_close_rel(x.grad, x64.grad, 1e-5, "dx, constant rows")
    assert_close_rel(w.grad, w64.grad, 1e-5, "dweight, constant rows")


# the interpreter's numpy warns of the squares that overflow
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered in reduce:RuntimeWarning")
def test_mean_square_past_fp32_max_is_nan_not_zero(device):
    """Rows of 1e20 randn: the sum of squares passes fp32's 3.4e38, so rstd = 1/sqrt(inf) = 0
    would make y exactly 0, finite and wrong. Those rows are NaN (as layer_norm's); the others kept."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(8, 64, generator=gen)
    x[[1, 4]] *= 1e20
    w = (1 + 0.3 * torch.randn(64, generator=gen)).to(device)
    y = rms_norm(x.to(device), w)
    ok = torch.tensor([i not in (1, 4) for i in range(8)])
    assert torch.isnan(y[~ok]).all()
    assert_close_rel(y[ok], ref64(x[ok], w), 1e-5, "y of the ordinary rows")


def test_non_contiguous_inputs_and_strided_weight(device):
    gen = torch.Generator().manual_seed(8)
    base = (torch.randn(6, 200, generator=gen) + 0.5).to(device)
    w = (1 + 0.2 * torch.randn(200, generator=gen)).to(device)[::2].detach().requires_grad_()
    for x in (base[:, ::2], torch.randn(100, 6, generator=gen).to(device).t()):
        assert not x.is_contiguous()
        xg = x.detach().requires_grad_()
        w.grad = None
        dy = torch.randn(6, 100, generator=gen).to(device)
        rms_norm(xg, w).backward(dy)
        x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
        ref64(x64, w64).backward(dy.double())
        assert_close_rel(xg.grad, x64.grad, 1e-4, "dx, non-contiguous")
        assert_close_rel(w.grad, w64.grad, 1e-4, "dweight, strided weight")


def test_saves_x_weight_and_one_fp32_statistic(device):
    """Backward keeps x and the fp32 rstd per row: no mean (RMSNorm has none), nothing else."""
    from tritongpt.kernels._common import saved_tensor_bytes

    x = torch.randn(8, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(64, device=device, requires_grad=True)
    nbytes, _ = saved_tensor_bytes(rms_norm, x, w, exclude=(w,))
    assert nbytes == 8 * 64 * 2 + 8 * 4


def test_weight_grads_deterministic(device):
    gen = torch.Generator().manual_seed(9)
    x, w = make((70, 64), torch.float32, device, gen)
    dy = torch.randn(70, 64, generator=gen).to(device)
    grads = []
    for _ in range(2):
        w.grad = None
        rms_norm(x, w).backward(dy)
        grads.append(w.grad.clone())
    assert torch.equal(grads[0], grads[1])


# the interpreter also runs the masked-off rows: with eps = 0 their 1/sqrt(0) warns (never stored)
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_zero_eps_and_empty_batches(device, nan_filled_empty):
    check_parity((7, 40), torch.float32, device, seed=11, eps=0.0)
    w = torch.randn(24).to(device).requires_grad_()
    x = torch.randn(0, 3, 24).to(device).requires_grad_()
    y = rms_norm(x, w)
    (y * 2.0).sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w))
    s, y = add_rms_norm(x, x, w)
    assert s.shape == y.shape == x.shape


def test_refuses_bad_input_by_name():
    x, w = torch.randn(2, 8), torch.ones(8)
    with pytest.raises(ValueError, match=r"weight has shape \(7,\), expected \(8,\)"):
        rms_norm(x, torch.ones(7))
    with pytest.raises(TypeError, match="x has dtype int64"):
        rms_norm(torch.ones(2, 8, dtype=torch.int64), w)
    with pytest.raises(TypeError, match="weight has dtype int32"):
        rms_norm(x, torch.ones(8, dtype=torch.int32))
    with pytest.raises(TypeError, match="torch.Tensor"):
        rms_norm(x.tolist(), w)
    with pytest.raises(ValueError, match="rms_norm: x must have at least 1 dim"):
        rms_norm(torch.tensor(1.0), w)
    with pytest.raises(ValueError, match=f"rms_norm: last dim of x is {MAX_WIDTH + 1}"):
        rms_norm(torch.randn(1, MAX_WIDTH + 1), torch.ones(MAX_WIDTH + 1))
    for bad in (-1e-5, float("nan"), "1e-5"):
        with pytest.raises(ValueError, match="eps must be a non-negative float"):
            rms_norm(x, w, bad)
    with pytest.raises(ValueError, match="different devices.*x is on cpu.*weight is on meta"):
        rms_norm(x, torch.ones(8, device="meta"))
    with pytest.raises(ValueError, match=r"add_rms_norm: delta has shape \(2, 1\), x \(2, 8\)"):
        add_rms_norm(x, torch.randn(2, 1), w)
    with pytest.raises(TypeError, match="delta has dtype int64"):
        add_rms_norm(x, torch.ones(2, 8, dtype=torch.int64), w)
    with pytest.raises(ValueError, match="different devices.*x is on cpu.*delta is on meta"):
        add_rms_norm(x, torch.randn(2, 8, device="meta"), w)


def test_cpu_without_interpreter_says_how_to_fix(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"set TRITON_INTERPRET=1 before importing triton"):
        rms_norm(torch.randn(2, 8), torch.ones(8))


def test_custom_ops_called_directly_refuse_a_strided_last_dim(device):
    x = torch.randn(16, 8, device=device).t()  # [8, 16], strides (1, 8)
    w = torch.randn(16, device=device)
    with pytest.raises(ValueError, match=r"tritongpt::rms_norm ops read x with unit stride on its last dim"):
        torch.ops.tritongpt.rms_norm_fwd(x, w, 1e-5)
    with pytest.raises(ValueError, match="weight has shape"):
        torch.ops.tritongpt.rms_norm_fwd(x.contiguous(), w[:8], 1e-5)
    y, rstd = torch.ops.tritongpt.rms_norm_fwd(x.contiguous(), w, 1e-5)
    with pytest.raises(ValueError, match=r"dy has shape \(16, 8\), expected \(8, 16\)"):
        torch.ops.tritongpt.rms_norm_bwd(torch.ones(16, 8, device=device), x.contiguous(), w, rstd)
    with pytest.raises(ValueError, match=r"delta has shape \(16, 16\), expected \(8, 16\)"):
        torch.ops.tritongpt.add_rms_norm_fwd(x.contiguous(), torch.randn(16, 16, device=device), w, 1e-5)
    with pytest.raises(ValueError, match=r"ds has shape \(16, 8\), expected \(8, 16\)"):
        torch.ops.tritongpt.add_rms_norm_bwd(torch.ones_like(y), y, w, rstd, torch.ones(16, 8, device=device),
                                             torch.bfloat16)


def test_no_second_derivative_and_no_func_transforms(device):
    x = torch.randn(3, 16, device=device, requires_grad=True)
    w = torch.ones(16, device=device)
    with pytest.raises(RuntimeError, match="rms_norm: the Triton kernel has no second derivative"):
        torch.autograd.grad(rms_norm(x, w).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="add_rms_norm: the Triton kernel has no second derivative"):
        torch.autograd.grad(add_rms_norm(x, x * 2, w)[1].square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="rms_norm: the Triton kernel does not support torch.func"):
        torch.func.grad(lambda t: rms_norm(t, w).sum())(x.detach())


# -- the residual add: add_rms_norm ---------------------------------------------------------------

def check_add_parity(shape, xdtype, ddtype, device, seed, uses=("s", "y")):
    """(s, y) = add_rms_norm(x, delta) against float64: both outputs, x's and delta's gradients and
    the weight's, with s used downstream (its gradient comes into the kernel) and y, or one of them."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 2 + 0.5).to(device, xdtype).requires_grad_()
    d = torch.randn(shape, generator=gen).to(device, ddtype).requires_grad_()
    w = (1.0 + 0.5 * torch.randn(shape[-1], generator=gen)).to(device).requires_grad_()
    s, y = add_rms_norm(x, d, w)
    want = torch.promote_types(xdtype, ddtype)
    assert s.dtype == y.dtype == want and s.shape == y.shape == x.shape
    gs, gy = (torch.randn(shape, generator=gen).to(device, want) for _ in range(2))
    sum((t * g).sum() for name, t, g in (("s", s, gs), ("y", y, gy)) if name in uses).backward()
    x64, d64, w64 = (t.detach().double().requires_grad_() for t in (x, d, w))
    s64 = x64 + d64
    y64 = ref64(s64, w64)
    sum((t * g.double()).sum() for name, t, g in (("s", s64, gs), ("y", y64, gy)) if name in uses).backward()
    tol = max(TOL[xdtype], TOL[ddtype])
    assert_close_rel(s, s64, tol, f"s {xdtype}+{ddtype} {shape}")
    assert_close_rel(y, y64, tol, f"y {xdtype}+{ddtype} {shape}")
    assert x.grad.dtype == xdtype and d.grad.dtype == ddtype
    assert_close_rel(x.grad, x64.grad, tol, "dx")
    assert_close_rel(d.grad, d64.grad, tol, "ddelta")
    if "y" in uses:
        assert_close_rel(w.grad, w64.grad, tol, "dweight")
    else:
        assert w.grad is None


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                    (torch.float32, torch.bfloat16), (torch.float16, torch.float32)],
                         ids=["fp32", "bf16", "fp32+bf16", "fp16+fp32"])
@pytest.mark.parametrize("shape", [(1, 64), (7, 100), (37, 768)])
def test_add_rms_norm_parity_fp64(shape, dtypes, device):
    check_add_parity(shape, *dtypes, device, seed=sum(shape) + len(str(dtypes)))


@pytest.mark.parametrize("uses", [("y",), ("s",)])
def test_add_rms_norm_with_one_output_used(uses, device):
    check_add_parity((9, 100), torch.float32, torch.float32, device, seed=31, uses=uses)


def test_add_rms_norm_is_the_add_then_the_rms_norm(device):
    """The fused forward gives x + delta rounded once to s's dtype and normalizes that: y is
    rms_norm(x + delta)'s bit for bit; the gradients are the unfused kernels' within rounding."""
    gen = torch.Generator().manual_seed(41)
    x = (torch.randn(13, 96, generator=gen) * 3 + 1).to(device).requires_grad_()
    d = torch.randn(13, 96, generator=gen).to(device, torch.bfloat16).requires_grad_()
    w = (1 + 0.3 * torch.randn(96, generator=gen)).to(device).requires_grad_()
    gs, gy = torch.randn(13, 96, generator=gen).to(device), torch.randn(13, 96, generator=gen).to(device)
    outs, grads = [], []
    for fused in (True, False):
        s, y = add_rms_norm(x, d, w) if fused else (x + d, rms_norm(x + d, w))
        outs.append((s.detach(), y.detach()))
        ((s * gs).sum() + (y * gy).sum()).backward()
        grads.append([t.grad.clone() for t in (x, d, w)])
        x.grad = d.grad = w.grad = None
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    for name, g, e in zip(("dx", "ddelta", "dweight"), *grads):
        assert g.dtype == e.dtype, name
        assert_close_rel(g, e, 1e-2 if name == "ddelta" else 1e-6, f"fused vs unfused {name}")


def test_add_rms_norm_saves_only_s_and_rstd(device):
    from tritongpt.kernels._common import saved_tensor_bytes

    x, d = (torch.randn(8, 64, device=device, requires_grad=True) for _ in range(2))
    w = torch.ones(64, device=device, requires_grad=True)
    nbytes, _ = saved_tensor_bytes(add_rms_norm, x, d, w, exclude=(w,))
    assert nbytes == 8 * 64 * 4 + 8 * 4


@pytest.mark.parametrize("fn", ["rms_norm", "add_rms_norm"])
def test_torch_compile_fullgraph(fn, device):
    """The custom ops (fake impls) + autograd.Function trace into one graph, no breaks, and give
    the eager values and gradients."""
    gen = torch.Generator().manual_seed(45)
    x, w = make((2, 3, 48), torch.float32, device, gen)
    d = torch.randn(2, 3, 48, generator=gen).to(device).requires_grad_()

    def f(x, d, w):
        if fn == "rms_norm":
            return rms_norm(x + d, w) * 2.0
        s, y = add_rms_norm(x, d, w)
        return s * y

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    outs = []
    for g in (compiled, f):
        out = g(x, d, w)
        out.square().sum().backward()
        outs.append((out.detach(), x.grad.clone(), d.grad.clone(), w.grad.clone()))
        x.grad = d.grad = w.grad = None
    for name, got, want in zip(("out", "dx", "ddelta", "dw"), *outs):
        assert_close_rel(got, want, 1e-6, f"compiled {name}")


# -- the reference module -------------------------------------------------------------------------

def random_rms_norm(n, device, eps=1e-5):
    m = RMSNorm(n, eps).to(device)
    with torch.no_grad():
        m.weight.copy_(1 + 0.3 * torch.randn(n))
    return m


def test_module_has_a_weight_only_and_names_its_twin():
    m = RMSNorm(12)
    assert [n for n, _ in m.named_parameters()] == ["weight"] and torch.equal(m.weight, torch.ones(12))
    assert "kernels/layernorm.py" in RMSNorm.__doc__ and "RMSNorm" in __import__(
        "tritongpt.kernels.layernorm", fromlist=["x"]).__doc__


@pytest.mark.parametrize("add", [False, True], ids=["forward", "add_and_norm"])
def test_module_both_paths_and_float64(add, device):
    """RMSNorm (forward, and add_and_norm) on both paths against its float64 twin: outputs and the
    gradients of x, delta and the weight."""
    torch.manual_seed(12)
    m = random_rms_norm(120, device)
    x, d = (torch.randn(2, 9, 120) * 2 + 1).to(device), torch.randn(2, 9, 120).to(device)
    gs, gy = torch.randn(2, 9, 120).to(device), torch.randn(2, 9, 120).to(device)

    def run(module, dtype):
        xi, di = x.to(dtype).clone().requires_grad_(), d.to(dtype).clone().requires_grad_()
        if add:
            s, y = module.add_and_norm(xi, di)
            loss = (s * gs.to(dtype)).sum() + (y * gy.to(dtype)).sum()
        else:
            s, y = xi + di, module(xi + di)
            loss = (y * gy.to(dtype)).sum()
        loss.backward()
        out = (s, y, xi.grad, di.grad, module.weight.grad.clone())
        module.zero_grad()
        return out

    m64 = RMSNorm(120).double().to(device)
    m64.load_state_dict(m.state_dict())
    want = run(m64, torch.float64)
    m.use_triton = True
    tri = run(m, torch.float32)
    m.use_triton = False
    ref = run(m, torch.float32)
    # the float64 module is the formula itself
    assert_close_rel(want[1], ref64(want[0], m64.weight), 1e-12, "float64 module vs formula")
    for name, t, r, r64 in zip(("s", "y", "dx", "ddelta", "dweight"), tri, ref, want):
        assert_close_rel(t, r64, 1e-4, f"{name} triton vs fp64 module")
        assert_close_rel(r, r64, 1e-4, f"{name} reference vs fp64 module")


def test_module_eps_on_both_paths(device):
    torch.manual_seed(14)
    m = random_rms_norm(40, device, eps=0.5)
    x, d = (torch.randn(5, 40) * 0.3).to(device), (torch.randn(5, 40) * 0.3).to(device)
    want = ref64(x.double() + d.double(), m.weight, eps=0.5)
    for use_triton in (False, True):
        m.use_triton = use_triton
        assert_close_rel(m.add_and_norm(x, d)[1], want, 1e-5, f"add_and_norm y, eps 0.5, triton={use_triton}")
        assert_close_rel(m(x + d), want, 1e-5, f"y, eps 0.5, triton={use_triton}")


def test_module_fp16_mean_square_does_not_overflow():
    """fp16 rows of ~1000: x^2 passes fp16's 65504; the module squares in fp32, as the kernel does."""
    gen = torch.Generator().manual_seed(31)
    x = (1000.0 * torch.randn(8, 64, generator=gen)).half().requires_grad_()
    m = RMSNorm(64).half()
    with torch.no_grad():
        m.weight.copy_(1 + 0.3 * torch.randn(64, generator=gen))
    dy = torch.randn(8, 64, generator=gen).half()
    y = m(x)
    y.backward(dy)
    x64, w64 = x.detach().double().requires_grad_(), m.weight.detach().double().requires_grad_()
    ref64(x64, w64).backward(dy.double())
    assert_close_rel(y, ref64(x64, w64), 1e-2, "fp16 y")
    assert_close_rel(x.grad, x64.grad, 1e-2, "fp16 dx")
    assert_close_rel(m.weight.grad, w64.grad, 1e-2, "fp16 dweight")


# -- the model: GPTConfig.norm = "rmsnorm" ---------------------------------------------------------
# bias-free, as Llama: W_key's bias has a zero gradient (a shift shared by a row of scores) that
# only rounding makes, and no relative tolerance holds for it
TINY = dict(vocab_size=67, context_length=24, n_embd=48, n_layer=2, n_head=3, bias=False, norm="rmsnorm")


def _rms_model(device, seed=0, **cfg):
    torch.manual_seed(seed)
    model = GPTModel(GPTConfig(**{**TINY, **cfg}))
    with torch.no_grad():
        for p in model.parameters():  # away from the init: norm weights of 1 would hide a swapped one
            p.add_(torch.randn_like(p) * 0.05)
    return model.to(device)


def _loss_and_grads(model, idx, targets):
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        logits = model(idx)
    loss = model(idx, targets=targets)
    loss.backward()
    return logits, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_every_norm_of_the_model_is_rms():
    """Each block's two norms and the final one are RMSNorms with eps 1e-5 (weights only: no norm
    bias in the state_dict); the default, and a config from before the field, stay LayerNorm."""
    model = GPTModel(GPTConfig(**TINY))
    norms = [m for m in model.modules() if isinstance(m, (LayerNorm, RMSNorm))]
    assert len(norms) == 2 * 2 + 1 and all(type(m) is RMSNorm for m in norms)
    assert all(m.eps == 1e-5 for m in norms)  # GPT-2's eps, and Llama 2's and 3's
    assert not any("norm" in k and k.endswith("bias") for k in model.state_dict())
    assert model.num_params() == GPTModel(GPTConfig(**{**TINY, "norm": "layernorm"})).num_params() - 5 * 48  # biases
    old = {k: v for k, v in GPTConfig(**TINY).to_dict().items() if k != "norm"}
    cfg = GPTConfig.from_dict(old)
    assert cfg.norm == "layernorm"
    assert all(type(m) is LayerNorm for m in GPTModel(cfg).modules() if isinstance(m, (LayerNorm, RMSNorm)))


def test_config_norm_checked_by_name():
    for bad in ("RMSNorm", "batchnorm", None, 1):
        with pytest.raises(UserError, match=f"GPTConfig.norm must be one of layernorm, rmsnorm, got {bad!r}"):
            GPTConfig(**{**TINY, "norm": bad})


@pytest.mark.parametrize("kernels,positions", [("triton", "learned"), ("layernorm", "learned"), ("triton", "rope")])
def test_model_paths_agree(kernels, positions, device):
    """The whole RMSNorm model (and a Llama-shaped one: RoPE, no biases), reference path against the
    Triton one (all kernels, or the 'layernorm' kernel alone, which switches the RMSNorms): logits,
    loss and every parameter's gradient; and the reference path against the model in float64."""
    model = _rms_model(device, position_encoding=positions)
    idx = torch.randint(0, 67, (2, 19), device=device)
    targets = torch.randint(0, 67, (2, 19), device=device)
    ref = _loss_and_grads(model.set_kernels("reference"), idx, targets)
    got = _loss_and_grads(model.set_kernels(kernels), idx, targets)
    assert all(m.use_triton for m in model.modules() if isinstance(m, RMSNorm))
    assert_close_rel(got[0], ref[0], 1e-5, "logits")
    assert_close_rel(got[1], ref[1], 1e-5, "loss")
    for name, g in ref[2].items():
        assert_close_rel(got[2][name], g, 1e-4, f"grad {name}")
    want = _loss_and_grads(model.set_kernels("reference").double(), idx, targets)
    assert_close_rel(ref[1], want[1], 1e-5, "fp32 loss vs float64")
    for name, g in want[2].items():
        assert_close_rel(ref[2][name], g, 1e-4, f"fp32 grad {name} vs float64")


def test_triton_model_compiles_in_one_graph(device):
    model = _rms_model(device, seed=5, n_layer=1).set_kernels("triton")  # one block: every op, half the launches
    idx = torch.randint(0, 67, (2, 19), device=device)
    loss = torch.compile(model, backend="aot_eager", fullgraph=True)(idx, targets=idx)
    loss.backward()
    got = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    loss = model(idx, targets=idx)
    loss.backward()
    assert_close_rel(got[0], loss.detach(), 1e-6, "compiled loss")
    for n, p in model.named_parameters():
        assert_close_rel(got[1][n], p.grad, 1e-5, f"compiled grad {n}")


def test_save_load_round_trip(tmp_path):
    model = _rms_model("cpu", seed=4)
    model.save(tmp_path / "m.safetensors")
    back = GPTModel.load(tmp_path / "m.safetensors")
    assert back.config.norm == "rmsnorm" and type(back.final_norm) is RMSNorm
    idx = torch.randint(0, 67, (2, 9))
    with torch.no_grad():
        assert torch.equal(back(idx), model(idx))


def test_export_to_gpt2_and_gpt_neo_refused_by_name(tmp_path):
    from tritongpt.train.gpt2_weights import export_gpt2
    from tritongpt.train.gpt_neo_weights import export_gpt_neo

    model = _rms_model("cpu")
    with pytest.raises(UserError, match="this model normalizes with rmsnorm .*Hugging Face's GPT-2 has LayerNorms"):
        export_gpt2(model, tmp_path / "gpt2")
    neo = _rms_model("cpu", scale_attention=False, qkv_bias=False)  # all GPT-Neo has, but the norm
    with pytest.raises(UserError, match="this model normalizes with rmsnorm .*Hugging Face's GPT-Neo has LayerNorms"):
        export_gpt_neo(neo, tmp_path / "neo")
    assert not (tmp_path / "gpt2").exists() and not (tmp_path / "neo").exists()


def test_pretrain_norm_rmsnorm_end_to_end(corpus, tmp_path, capsys, one_thread):
    """pretrain --norm rmsnorm: an RMSNorm model, saved as one; --init keeps it (and refuses
    another norm); a resume without the flag is refused by name; GPT-2's and GPT-Neo's published
    weights cannot start one; the export to GPT-2 is refused."""
    from tritongpt.cli import main

    def argv(out, *extra):
        return pretrain_argv(corpus, out, *extra)

    assert main(argv(tmp_path / "rms", "--max-steps", "1", "--norm", "rmsnorm")) == 0
    assert ", RMSNorm) on cpu" in capsys.readouterr().out
    model = GPTModel.load(tmp_path / "rms" / "ckpt-0000001" / "model.safetensors")
    assert model.config.norm == "rmsnorm" and type(model.trf_blocks[0].norm1) is RMSNorm
    # --init keeps the model's norm; another would change what it computes
    init = ("--init", str(tmp_path / "rms"), "--max-steps", "1")
    assert main(argv(tmp_path / "again", *init, "--norm", "layernorm")) == 2
    assert "--norm layernorm would change what --init's model computes (its norm is rmsnorm)" in \
        capsys.readouterr().err
    assert main(argv(tmp_path / "again", *init)) == 0
    assert GPTModel.load(tmp_path / "again" / "ckpt-0000001" / "model.safetensors").config.norm == "rmsnorm"
    capsys.readouterr()
    # a resume builds the model from the flags: without --norm it would go on as a LayerNorm model
    more = ("--max-steps", "2", "--resume")
    assert main(argv(tmp_path / "rms", *more)) == 2
    assert "model normalizes with rmsnorm, this run's model with layernorm: pass --norm rmsnorm" in \
        capsys.readouterr().err
    assert main(argv(tmp_path / "rms", *more, "--norm", "rmsnorm")) == 0
    capsys.readouterr()
    # a LayerNorm run resumed with --norm rmsnorm: refused the other way round
    assert main(argv(tmp_path / "ln", "--max-steps", "1")) == 0
    capsys.readouterr()
    assert main(argv(tmp_path / "ln", *more, "--norm", "rmsnorm")) == 2
    assert "model normalizes with layernorm, this run's model with rmsnorm: pass --norm layernorm" in \
        capsys.readouterr().err
    # the published GPT-2 and GPT-Neo weights have LayerNorms: refused before any download
    for name in ("gpt2-small", "gpt-neo-125m"):
        assert main(argv(tmp_path / "bad", "--init", name, "--norm", "rmsnorm")) == 2
        assert f"--init {name}: its published weights were trained with LayerNorm (a mean and a bias): " \
               "--norm rmsnorm cannot start from them" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(argv(tmp_path / "bad", "--norm", "batchnorm"))
    assert "--norm: invalid choice: 'batchnorm'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main(["export", str(tmp_path / "rms"), "--out", str(tmp_path / "hf")]) == 2
    # an RMSNorm model goes out as a Llama, which this one's learned positions and GELU MLP are not
    assert "this model learns position embeddings (position_encoding learned), where Llama rotates q and k (RoPE): " \
           "it cannot be exported as a Llama folder" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


# -- GPT-2 sizes on a GPU ----------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("width", [768, 1024, 1600, MAX_WIDTH])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpt2_sizes_cuda(width, dtype):
    check_parity((4099, width), dtype, torch.device("cuda"), seed=width)


@pytest.mark.cuda
@pytest.mark.parametrize("width", [768, 1600])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)])
def test_add_rms_norm_gpt2_sizes_cuda(width, dtypes):
    check_add_parity((4099, width), *dtypes, torch.device("cuda"), seed=width)
