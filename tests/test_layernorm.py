"""Triton LayerNorm (kernels/layernorm.py) vs float64 formula and vs tritongpt.model.layers.LayerNorm.

On CPU the kernels run through Triton's interpreter, so shapes are small; the CUDA-marked tests
repeat the check at GPT-2 sizes when a GPU is present.
"""
import pytest
import torch
import triton
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from parity import assert_close_mixed, assert_close_rel
from tritongpt.kernels.layernorm import MAX_WIDTH, add_layer_norm, layer_norm
from tritongpt.model.layers import LayerNorm

TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def ref64(x, w, b, eps=1e-5):
    """The textbook formula in float64 (biased variance)."""
    x, w = x.double(), w.double()
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps) * w
    return y + b.double() if b is not None else y


def make(shape, dtype, device, gen, pdtype=None, bias=True):
    N = shape[-1]
    pdtype = pdtype or dtype
    # an offset and a scale so that mean/variance matter; params away from the 1/0 init
    x = (torch.randn(shape, generator=gen) * 2.0 + 0.5).to(device, dtype).requires_grad_()
    w = (1.0 + 0.5 * torch.randn(N, generator=gen)).to(device, pdtype).requires_grad_()
    b = (0.5 * torch.randn(N, generator=gen)).to(device, pdtype).requires_grad_() if bias else None
    return x, w, b


def dx_rounding_floor(x64, w64, dy64, eps):
    """The error fp32 math cannot avoid in dx = rstd * (w*dy - mean(w*dy) - x_hat * mean(x_hat*w*dy)).

    At width 2, x_hat is +-1 up to eps and the three terms cancel to eps / (d^2 + eps) of their
    size, so dx is a few millionths of its terms (or less): the terms' fp32 rounding, amplified
    by how much centering loses when a row's values nearly coincide (kappa = max|x| / max|x -
    mean|), is then all of dx's error, in any fp32 LayerNorm (PyTorch's too). Hypothesis found
    such rows (43 x 2: 3.5e-4 relative on a correct kernel). Returns 16 * 2^-24 * kappa_max *
    ||terms||; rows that do not cancel are held to the relative tolerance by it being small.
    """
    x64, w64 = x64.detach(), w64.detach()
    mean = x64.mean(-1, keepdim=True)
    rstd = 1.0 / torch.sqrt(((x64 - mean) ** 2).mean(-1, keepdim=True) + eps)
    x_hat, wdy = (x64 - mean) * rstd, w64 * dy64
    terms = rstd * (wdy.abs() + wdy.mean(-1, keepdim=True).abs()
                    + x_hat.abs() * (x_hat * wdy).mean(-1, keepdim=True).abs())
    spread = (x64 - mean).abs().amax(-1)
    kappa = (x64.abs().amax(-1) / spread.clamp_min(1e-300)).clamp_min(1.0).max().item()
    return 16 * 2.0 ** -24 * kappa * terms.norm().item()


def check_parity(shape, dtype, device, seed, pdtype=None, bias=True, eps=1e-5):
    gen = torch.Generator().manual_seed(seed)
    x, w, b = make(shape, dtype, device, gen, pdtype, bias)
    y = layer_norm(x, w, b, eps)
    assert y.dtype == dtype and y.shape == x.shape
    dy = torch.randn(shape, generator=gen).to(device, dtype)
    y.backward(dy)
    leaves = [t.detach().double().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
    y64 = ref64(leaves[0], leaves[1], leaves[2] if bias else None, eps)
    y64.backward(dy.double())
    tol = max(TOL[dtype], TOL[pdtype or dtype])
    assert_close_rel(y, y64, tol, f"y {dtype} {shape}")
    assert_close_mixed(x.grad, leaves[0].grad, tol, dx_rounding_floor(leaves[0], leaves[1], dy.double(), eps), "dx")
    assert_close_rel(w.grad, leaves[1].grad, tol, "dweight")
    assert w.grad.dtype == w.dtype
    if bias:
        assert_close_rel(b.grad, leaves[2].grad, tol, "dbias")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64), (7, 100), (37, 768), (3, 1600), (2, 5, 1024)])
def test_parity_fp64(shape, dtype, device):
    check_parity(shape, dtype, device, seed=sum(shape) + (dtype == torch.bfloat16))


@pytest.mark.parametrize("shape", [(1, 1), (2, 8192), (4, 1280)])
def test_edge_widths(shape, device):
    check_parity(shape, torch.float32, device, seed=3)


def test_fp16_and_mixed_dtypes(device):
    check_parity((9, 100), torch.float16, device, seed=4)
    # bf16 activations with fp32 parameters (what autocast produces): output stays bf16
    check_parity((9, 100), torch.bfloat16, device, seed=5, pdtype=torch.float32)


def test_no_bias_and_eps(device):
    import numpy as np

    check_parity((5, 96), torch.float32, device, seed=6, bias=False, eps=1e-3)
    x, w = torch.randn(3, 10).to(device), torch.ones(10).to(device)
    assert torch.equal(layer_norm(x, w, None, np.float32(1e-3)), layer_norm(x, w, None, 1e-3))  # as F.layer_norm


def random_layer_norm(n, device):
    """The reference module with weight and bias away from their 1 and 0 init."""
    ln = LayerNorm(n).to(device)
    with torch.no_grad():
        ln.weight.copy_(1 + 0.3 * torch.randn(n))
        ln.bias.copy_(0.3 * torch.randn(n))
    return ln


def test_matches_reference_module(device):
    """Same LayerNorm module, both paths (use_triton False/True), plus the float64 module."""
    torch.manual_seed(11)
    ln = random_layer_norm(200, device)
    x = (torch.randn(3, 11, 200) * 3 + 1).to(device)
    dy = torch.randn(3, 11, 200).to(device)
    outs = {}
    for use_triton in (False, True):
        ln.use_triton = use_triton
        ln.zero_grad()
        xi = x.clone().requires_grad_()
        y = ln(xi)
        y.backward(dy)
        outs[use_triton] = (y, xi.grad, ln.weight.grad.clone(), ln.bias.grad.clone())
    ln64 = LayerNorm(200).double().to(device)
    ln64.load_state_dict(ln.state_dict())
    x64 = x.double().requires_grad_()
    y64 = ln64(x64)
    y64.backward(dy.double())
    ref64_ = (y64, x64.grad, ln64.weight.grad, ln64.bias.grad)
    for name, tri, ref, r64 in zip(("y", "dx", "dweight", "dbias"), outs[True], outs[False], ref64_):
        assert_close_rel(tri, r64, 1e-4, f"{name} vs fp64 module")
        assert_close_rel(tri, ref, 1e-4, f"{name} vs fp32 module")


def test_non_contiguous_inputs(device):
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(6, 200, generator=gen).to(device)
    w = (1 + 0.2 * torch.randn(100, generator=gen)).to(device)
    b = (0.2 * torch.randn(100, generator=gen)).to(device)
    strided = base[:, ::2]  # last-dim stride 2
    transposed = torch.randn(100, 6, generator=gen).to(device).t()  # row stride 1
    for x in (strided, transposed):
        assert not x.is_contiguous()
        xg = x.detach().requires_grad_()  # a leaf with x's strides (clone would make it dense)
        assert xg.stride() == x.stride()
        y = layer_norm(xg, w, b)
        y.backward(torch.ones_like(y) + x)
        x64 = x.double().requires_grad_()
        y64 = ref64(x64, w, b)
        y64.backward((torch.ones_like(y) + x).double())
        assert_close_rel(y, y64, 1e-4, "y non-contiguous")
        assert_close_rel(xg.grad, x64.grad, 1e-4, "dx non-contiguous")


def test_strided_params_and_broadcast_output_grads(device):
    """Weight/bias views with stride 2, and output gradients that autograd hands over as expanded
    views (row stride 0 from y.sum(0) * c, last-dim stride 0 from a per-row weight): dx, dweight
    and dbias against float64, each case."""
    gen = torch.Generator().manual_seed(12)
    x = (torch.randn(9, 64, generator=gen) * 2 + 0.5).to(device)
    wb = (1 + 0.3 * torch.randn(128, generator=gen)).to(device)
    bb = (0.3 * torch.randn(128, generator=gen)).to(device)
    c = torch.randn(64, generator=gen).to(device)
    r = torch.randn(9, 1, generator=gen).to(device)
    losses = {"row-broadcast dy": lambda y: (y.sum(0) * c).sum(),     # dy strides (0, 1)
              "column-broadcast dy": lambda y: (y.sum(1, keepdim=True) * r).sum()}  # (1, 0)
    for name, loss in losses.items():
        w, b = wb[::2].detach().requires_grad_(), bb[1::2].detach().requires_grad_()
        assert w.stride() == (2,)
        xg = x.clone().requires_grad_()
        loss(layer_norm(xg, w, b)).backward()
        leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
        loss(ref64(*leaves)).backward()
        for what, got, want in zip(("dx", "dweight", "dbias"), (xg.grad, w.grad, b.grad), leaves):
            assert_close_rel(got, want.grad, 1e-4, f"{what} {name}")


@pytest.mark.parametrize("eps", [1e-5, 1e-12])
def test_constant_rows_normalize_to_exactly_zero(eps, device):
    """A constant row is exactly its mean: y = bias, as PyTorch gives. sum(x)/N was off by an ulp,
    and rstd = 1/sqrt(eps) made that |y - b| = 7.5e-5 at eps 1e-5 and 0.23 at 1e-12; the kernel
    now takes its statistics of x - x[0]. The gradient still matches float64."""
    gen = torch.Generator().manual_seed(23)
    N = 100
    x = torch.full((5, N), 1.7).to(device).requires_grad_()
    w = (1.0 + 0.5 * torch.randn(N, generator=gen)).to(device).requires_grad_()
    b = (0.5 * torch.randn(N, generator=gen)).to(device).requires_grad_()
    y = layer_norm(x, w, b, eps)
    assert torch.equal(y, b.detach().expand(5, N))
    dy = torch.randn(5, N, generator=gen).to(device)
    y.backward(dy)
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref64(*leaves, eps=eps).backward(dy.double())
    for name, t, t64 in zip(("dx", "dw", "db"), (x, w, b), leaves):
        assert_close_rel(t.grad, t64.grad, 1e-4, f"{name}, constant rows, eps {eps}")


def test_large_mean_keeps_forward_precision(device):
    """Rows of 1000 + 0.1 randn: the mean is 10^4 times the spread, so sum(x)/N lost digits that
    the normalized output needs (2.5e-4 relative, over the 1e-4 bound; PyTorch's fp32 CPU
    LayerNorm: 4.2e-4). Shifted data keeps y to fp32 precision (about 1e-7)."""
    gen = torch.Generator().manual_seed(24)
    x = (1000.0 + 0.1 * torch.randn(16, 96, generator=gen)).to(device)
    w = (1.0 + 0.5 * torch.randn(96, generator=gen)).to(device)
    b = (0.5 * torch.randn(96, generator=gen)).to(device)
    assert_close_rel(layer_norm(x, w, b), ref64(x, w, b), 1e-5, "y, rows of 1000 + 0.1 randn")


@pytest.mark.parametrize("reduce3", [False, True])
@pytest.mark.parametrize("offset,spread", [(1000.0, 0.1), (1e4, 1e-2)])
def test_large_mean_keeps_backward_precision(offset, spread, reduce3, device, monkeypatch):
    """Backward recomputes x_hat from the saved mean, which is rounded to fp32: an ulp of 1e4 is
    1e-3, a tenth of a 1e-2 spread, so x - mean carried that error into every x_hat (dw 1.5e-4
    relative at 1000 + 0.1 randn, 2.5e-2 at 1e4 + 0.01 randn; dx 2e-5 / 3.4e-3) although the
    forward kept y to 1e-7. Taking out the row mean of x - mean (the saved mean's rounding)
    gives about 1e-7 for dx, dw and db alike. reduce3: the row's three sums as the GPU takes them, one
    tl.reduce of three values (the interpreter otherwise takes three tl.sum: its tuple reduce is slow)."""
    from tritongpt.kernels import layernorm

    monkeypatch.setattr(layernorm, "REDUCE3", triton.language.constexpr(reduce3))
    gen = torch.Generator().manual_seed(24)
    x = (offset + spread * torch.randn(16, 96, generator=gen)).to(device).requires_grad_()
    w = (1.0 + 0.5 * torch.randn(96, generator=gen)).to(device).requires_grad_()
    b = (0.5 * torch.randn(96, generator=gen)).to(device).requires_grad_()
    dy = torch.randn(16, 96, generator=gen).to(device)
    layer_norm(x, w, b).backward(dy)
    x64, w64, b64 = (t.detach().cpu().double().requires_grad_() for t in (x, w, b))
    ref64(x64, w64, b64).backward(dy.cpu().double())
    for name, got, want in (("dx", x.grad, x64.grad), ("dw", w.grad, w64.grad), ("db", b.grad, b64.grad)):
        assert_close_rel(got, want, 1e-5, f"{name}, rows of {offset:g} + {spread:g} randn")


def test_reference_module_fp16_statistics_do_not_overflow(device):
    """fp16 rows with a spread of ~1000: the variance (1e6) passes fp16's 65504. The reference
    module computed it in fp16, got inf, and returned y = bias (0.96 relative) with NaN in dx;
    F.layer_norm and the kernel compute in fp32 (2e-4). It now takes fp16 statistics in fp32."""
    gen = torch.Generator().manual_seed(31)
    x = (1000.0 * torch.randn(8, 64, generator=gen)).half()
    w = (1.0 + 0.3 * torch.randn(64, generator=gen)).half()
    b = (0.3 * torch.randn(64, generator=gen)).half()
    dy = torch.randn(8, 64, generator=gen).half()
    m = LayerNorm(64).half()
    with torch.no_grad():
        m.weight.copy_(w)
        m.bias.copy_(b)
    xr = x.clone().requires_grad_()
    y = m(xr)
    y.backward(dy)
    x64, w64, b64 = (t.double().requires_grad_() for t in (x, w, b))
    y64 = ref64(x64, w64, b64)
    y64.backward(dy.double())
    assert_close_rel(y, y64, 1e-2, "reference module fp16 y")
    assert_close_rel(xr.grad, x64.grad, 1e-2, "reference module fp16 dx")
    assert_close_rel(m.weight.grad, w64.grad, 1e-2, "reference module fp16 dw")
    xt = x.to(device).requires_grad_()
    yt = layer_norm(xt, w.to(device), b.to(device))
    yt.backward(dy.to(device))
    assert_close_rel(yt, y64, 1e-2, "kernel fp16 y")
    assert_close_rel(xt.grad, x64.grad, 1e-2, "kernel fp16 dx")


# the interpreter's numpy warns of the squares that overflow
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered in reduce:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_variance_past_fp32_max_is_nan_not_the_bias(dtype, device):
    """Rows of 1e20 randn (and 1e21 + 1e20 randn): the sum of squares passes fp32's 3.4e38, so
    rstd = 1 / sqrt(inf) = 0 made y the bias and dx, dw 0: finite and wrong (0.88 / 1.0 relative).
    Those rows are now NaN, as PyTorch's LayerNorm gives; the ordinary rows beside them are not
    touched."""
    gen = torch.Generator().manual_seed(5)
    for offset in (0.0, 1e21):
        x = torch.randn(8, 64, generator=gen, dtype=torch.float64)
        huge = torch.tensor([1, 4, 5])
        x[huge] = offset + 1e20 * x[huge]
        x = x.to(device, dtype).requires_grad_()
        w = (1.0 + 0.5 * torch.randn(64, generator=gen)).to(device, dtype).requires_grad_()
        b = (0.5 * torch.randn(64, generator=gen)).to(device, dtype).requires_grad_()
        dy = torch.randn(8, 64, generator=gen).to(device, dtype)
        y = layer_norm(x, w, b)
        y.backward(dy)
        ok = torch.ones(8, dtype=torch.bool)
        ok[huge] = False
        assert torch.isnan(y[huge]).all() and torch.isnan(x.grad[huge]).all(), f"offset {offset:g}"
        assert torch.isnan(w.grad).all()  # every row's dy * x_hat sums into it
        x64, w64, b64 = (t.detach().cpu().double()[ok] if t is x else t.detach().cpu().double()
                         for t in (x, w, b))
        x64.requires_grad_()
        y64 = ref64(x64, w64, b64)
        y64.backward(dy.cpu().double()[ok])
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert_close_rel(y[ok], y64, tol, "y of the ordinary rows")
        assert_close_rel(x.grad[ok], x64.grad, tol, "dx of the ordinary rows")


def test_programs_that_walk_several_row_blocks(device):
    """Each program normalizes its group of rows BLOCK_M at a time. The other CPU shapes give every
    program one step (under the interpreter at most 16 programs run, each up to 64 rows), so a
    loop that restarted at the group's first row, or a dweight/dbias partial sum overwritten
    instead of accumulated per step, passed them all. 70 rows of width 2100 (BLOCK_M 4, 8 rows per
    program): two steps per program and a ragged last one."""
    from tritongpt.kernels._common import cdiv
    from tritongpt.kernels.layernorm import _interpreter_shape

    M, N = 70, 2100
    if device.type == "cpu":  # the split the kernels' _row_range makes of this grid (forward and backward alike)
        n_prog, block_m = _interpreter_shape(M, N)
        rows_per_prog = cdiv(cdiv(M, n_prog), block_m) * block_m
        assert rows_per_prog >= 2 * block_m and M % rows_per_prog % block_m, (rows_per_prog, block_m)
    check_parity((M, N), torch.float32, device, seed=25)


def _stand_in_gpu(monkeypatch, fastest):
    """Run _launch's GPU branch on the CPU: the interpreter launches, 3 "SMs", NaN-filled partial-sum
    rows, and a timer that makes the fastest[kernel]-th shape left by the prune the quickest (autotune_stub).
    -> {kernel: [the pruned configs, in the order autotune timed them]}."""
    from autotune_stub import time_as_told

    from tritongpt.kernels import layernorm as ln

    monkeypatch.setattr(ln, "INTERPRET", False)
    monkeypatch.setattr(ln, "_sm_count", lambda device: 3)
    monkeypatch.setattr(ln, "SMALL_M", 64)
    monkeypatch.setattr(ln, "_partials", lambda rows, N, device: torch.full((rows, N), float("nan"), device=device))
    return time_as_told(monkeypatch, {"fwd": (ln._fwd_tuned, ln._prune_shapes),
                                      "bwd": (ln._bwd_tuned, ln._prune_shapes)}, fastest)


@pytest.mark.parametrize("fastest", [{"fwd": 0, "bwd": 0}, {"fwd": 2, "bwd": 2}, {"fwd": 5, "bwd": 6}],
                         ids=["first", "3rd", "widest"])
def test_gpu_launch_path_autotunes_then_reuses_its_pick(monkeypatch, fastest):
    """On a GPU the launch shape is autotuned per (rows bucket, width, flags, dtypes): each shape
    sizes its own grid (programs per SM), the backward sums only the partial rows of the programs
    that ran (here the rest are NaN: one program per "SM" leaves 3 of 6), and later calls launch
    the pick without the autotuner. 150 rows of width 100 (bucket 256: timed, with SMALL_M lowered to 64
    here so the interpreter's grids stay small)."""
    from triton.runtime.autotuner import Autotuner

    from tritongpt.kernels import layernorm as ln

    timed = _stand_in_gpu(monkeypatch, fastest)
    for seed in (41, 42):  # the second call must not reach the autotuner
        check_parity((150, 100), torch.float32, torch.device("cpu"), seed=seed)
        check_add_parity((150, 100), torch.float32, torch.bfloat16, torch.device("cpu"), seed=seed)
        if seed == 41:
            assert len(timed["fwd"]) >= 6 and len(timed["bwd"]) >= 7
            for name, tuner in (("fwd", ln._fwd_tuned), ("bwd", ln._bwd_tuned)):
                picks = tuner.tritongpt_picks  # _common.launch_tuned's: layer_norm's and add_layer_norm's
                shape = lambda c: (c.kwargs["BLOCK_M"], c.kwargs["PROGS"], c.num_warps, c.num_stages)  # noqa: E731
                assert len(picks) == 2, picks
                assert shape(timed[name][fastest[name]]) in {shape(c) for c in picks.values()}, picks  # last search's
            monkeypatch.setattr(Autotuner, "run", lambda *a, **k: pytest.fail("autotuned again"))


def test_saved_autotune_searches_name_the_layernorm_kernels(tmp_path):
    """bench/gpu_session.sh gathers autotune's saved searches (report.save_autotune_timings) in a
    fresh process that imports bench.report alone. LayerNorm's kernels, autotuned on a GPU, must be
    named there as the results' picks are ("layernorm.backward" and its key names), not as Triton's
    function with a bare key; so must every other autotuned kernel the package registers (MoE's)."""
    import json
    import subprocess
    import sys

    import triton

    from tritongpt.bench import report

    search = {"key": [256, 100, True, False, False, "torch.float32", "torch.float32"],
              "configs_timings": [(triton.Config({"BLOCK_M": 16, "NUM_STAGES": 2, "PROGS": 2}, num_warps=4,
                                                 num_stages=2).__dict__, [0.02, 0.02, 0.02])]}
    (tmp_path / "ab12").mkdir()
    (tmp_path / "ab12" / "_layer_norm_bwd_kernel.autotune.json").write_text(json.dumps(search))
    out = tmp_path / "timings.json"
    code = ("import json, sys; from tritongpt.bench.report import _tuned_kernel_names, save_autotune_timings; "
            "save_autotune_timings(sys.argv[1], sys.argv[2]); print(json.dumps(_tuned_kernel_names()))")
    run = subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    (entry,) = json.loads(out.read_text())
    assert entry["kernel"] == "layernorm.backward" and entry["function"] == "_layer_norm_bwd_kernel", entry
    assert entry["key"] == {"M_BUCKET": 256, "N": 100, "HAS_DS": True, "HAS_DX2": False, "IS_RMS": False}
    assert entry["dtypes"] == ["float32"]
    # the fresh process names every tuner this one registers once all the kernel modules are imported
    import importlib
    import pkgutil

    import tritongpt.kernels as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"tritongpt.kernels.{info.name}")
    assert json.loads(run.stdout.splitlines()[-1]) == {k: list(v) for k, v in report._tuned_kernel_names().items()}


def test_launch_shapes_fit_every_width():
    """The prune's output at GPT-2's widths and the extremes: BLOCK_M rows of BLOCK_N within 32
    values a thread, no repeats, no more rows than the bucket, one shape (no timing) for few rows."""
    import triton

    from tritongpt.kernels import layernorm as ln

    for shapes in (ln.FWD_SHAPES, ln.BWD_SHAPES):
        configs = [triton.Config({"ELEMS": e, "PROGS": p}, num_warps=w, num_stages=s) for e, w, s, p in shapes]
        for n in (1, 64, 100, 768, 1600, 8192):
            block_n = triton.next_power_of_2(n)
            for m_bucket in (1, 64, 1024, 2048, 16384):
                kept = ln._prune_shapes(configs, {"M_BUCKET": m_bucket}, BLOCK_N=block_n)
                assert len(kept) == 1 if m_bucket <= ln.SMALL_M else len(kept) >= 2, (n, m_bucket, kept)
                shapes_kept = [(c.kwargs["BLOCK_M"], c.num_warps, c.num_stages, c.kwargs["PROGS"]) for c in kept]
                assert len(set(shapes_kept)) == len(kept)
                for c in kept:
                    assert 1 <= c.kwargs["BLOCK_M"] <= m_bucket
                    assert c.kwargs["BLOCK_M"] * block_n <= 32 * 32 * c.num_warps
                    assert c.kwargs["NUM_STAGES"] == c.num_stages
    assert ln.MAX_BWD_PROGS == max(p for *_, p in ln.BWD_SHAPES)


@pytest.mark.parametrize("M", [1, 2, 7, 70, 150, 1000, 16384, 81920, 100003])
def test_grid_size_leaves_no_program_without_rows(M):
    """_grid_size(M, BLOCK_M, cap) programs, each taking the kernels' _row_range share: every row is
    covered once, each program has rows, and no more programs than the cap."""
    from tritongpt.kernels._common import cdiv
    from tritongpt.kernels.layernorm import _grid_size

    for block_m in (1, 2, 4, 16, 64):
        for cap in (1, 3, 16, 132, 264, 1056):
            n = _grid_size(M, block_m, cap)
            per = cdiv(cdiv(M, n), block_m) * block_m
            assert 1 <= n <= cap and per % block_m == 0
            assert per * (n - 1) < M <= per * n, (M, block_m, cap, n, per)


def test_rows_of_a_wider_buffer_are_read_in_place(device):
    """x a column slice of a wider buffer (unit stride on the last dim, row stride 160) is read in
    place, while y and dx are new [11, 96] tensors of row stride 96, and dy comes in as a slice of
    its own buffer (row stride 128): every tensor needs its own row stride. (Only dy's was tested:
    y or dx stored at x's row stride passed.)"""
    gen = torch.Generator().manual_seed(27)
    x = (torch.randn(11, 160, generator=gen) * 2 + 0.5)[:, 40:136].to(device).detach().requires_grad_()
    w = (1 + 0.3 * torch.randn(96, generator=gen)).to(device).requires_grad_()
    b = (0.3 * torch.randn(96, generator=gen)).to(device).requires_grad_()
    dy = torch.randn(11, 128, generator=gen).to(device)[:, 5:101]
    assert x.stride() == (160, 1) and dy.stride() == (128, 1)
    y = layer_norm(x, w, b)
    y.backward(dy)
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    y64 = ref64(*leaves)
    y64.backward(dy.double())
    assert_close_rel(y, y64, 1e-4, "y, x of row stride 160")
    for name, t, t64 in zip(("dx", "dweight", "dbias"), (x, w, b), leaves):
        assert_close_rel(t.grad, t64.grad, 1e-4, f"{name}, x of row stride 160")


def test_saves_fp32_statistics_for_bf16_input(device):
    """mean and rstd are kept in fp32 whatever x's dtype: bf16 statistics would cost dx precision
    that the bf16 tolerance alone is too loose to notice."""
    gen = torch.Generator().manual_seed(13)
    x, w, b = make((5, 96), torch.bfloat16, device, gen)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer_norm(x, w, b)
    stats = [t for t in saved if t.shape[0] == 5 and t.numel() == 5]
    assert len(stats) == 2 and all(t.dtype == torch.float32 for t in stats), \
        [(tuple(t.shape), t.dtype) for t in saved]


def test_weight_grads_deterministic(device):
    """Partial sums + a fixed-order reduction (no atomics): two backward passes agree bit for bit."""
    gen = torch.Generator().manual_seed(8)
    x, w, b = make((70, 64), torch.float32, device, gen)
    dy = torch.randn(70, 64, generator=gen).to(device)
    grads = []
    for _ in range(2):
        w.grad = b.grad = None
        layer_norm(x, w, b).backward(dy)
        grads.append((w.grad.clone(), b.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])  # no shrinking: minutes under the interpreter
@given(rows=st.integers(1, 80), width=st.integers(1, 2100),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       seed=st.integers(0, 2**31 - 1))
@example(rows=43, width=2, dtype=torch.float32, seed=5103322)  # found by this test: dx at width 2
def test_shape_fuzz(rows, width, dtype, seed):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_parity((rows, width), dtype, device, seed)


# -- bad input: one clear error, never a wrong answer ------------------------------------------

def test_rejects_too_wide():
    x = torch.randn(2, MAX_WIDTH + 1)
    w, b = torch.ones(MAX_WIDTH + 1), torch.zeros(MAX_WIDTH + 1)
    with pytest.raises(ValueError, match="8192"):
        layer_norm(x, w, b)


def test_rejects_integer_dtype():
    with pytest.raises(TypeError, match="x has dtype int64"):
        layer_norm(torch.ones(2, 8, dtype=torch.int64), torch.ones(8), torch.zeros(8))
    with pytest.raises(TypeError, match="weight has dtype int32"):
        layer_norm(torch.ones(2, 8), torch.ones(8, dtype=torch.int32), torch.zeros(8))


def test_custom_ops_called_directly_refuse_a_strided_last_dim(device):
    """layer_norm() hands the ops rows of unit stride; a direct call with a transposed x was
    read as if row-major (errors of 1e31, no message)."""
    x = torch.randn(16, 8, device=device).t()  # [8, 16], strides (1, 8)
    w, b = torch.randn(16, device=device), torch.randn(16, device=device)
    with pytest.raises(ValueError, match=r"unit stride on its last dim, got strides \(1, 8\)"):
        torch.ops.tritongpt.layer_norm_fwd(x, w, b, 1e-5)
    with pytest.raises(ValueError, match="weight has shape"):
        torch.ops.tritongpt.layer_norm_fwd(x.contiguous(), w[:8], b, 1e-5)
    y, mean, rstd = torch.ops.tritongpt.layer_norm_fwd(x.contiguous(), w, b, 1e-5)
    assert_close_rel(y, torch.nn.functional.layer_norm(x.double(), (16,), w.double(), b.double()), 1e-5, "y")
    with pytest.raises(ValueError, match="unit stride"):
        torch.ops.tritongpt.layer_norm_bwd(torch.ones_like(y), x, w, mean, rstd)
    with pytest.raises(ValueError, match=r"dy has shape \(16, 8\), expected \(8, 16\)"):
        torch.ops.tritongpt.layer_norm_bwd(torch.ones_like(y).t().contiguous(), x.contiguous(), w, mean, rstd)
    # the gradients come back in the parameters' dtype, as the fake impl says (torch.compile)
    torch.library.opcheck(torch.ops.tritongpt.layer_norm_bwd.default,
                          (torch.randn_like(y), x.contiguous(), w.bfloat16(), mean, rstd))


# the interpreter also runs the masked-off rows past the last one: with eps = 0 their 1/sqrt(0)
# warns in NumPy (never stored)
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_zero_eps_and_empty_batches(device, nan_filled_empty):
    """eps = 0 is allowed (a non-negative eps; PyTorch's too) and exact for non-constant rows;
    no rows at all give empty outputs and zero parameter gradients, as F.layer_norm."""
    check_parity((7, 40), torch.float32, device, seed=11, eps=0.0)
    w, b = (torch.randn(24).to(device).requires_grad_() for _ in range(2))
    x = torch.randn(0, 3, 24).to(device).requires_grad_()
    y = layer_norm(x, w, b)
    (y * 2.0).sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def test_rejects_a_negative_or_nan_eps():
    """var + eps under the square root: a negative eps gives nan rows (a constant row has var 0),
    and nan gives nan everywhere; both are refused before launch, as a string is."""
    x, w, b = torch.randn(2, 8), torch.ones(8), torch.zeros(8)
    for bad in (-1e-5, float("nan"), "1e-5"):
        with pytest.raises(ValueError, match="eps must be a non-negative float"):
            layer_norm(x, w, b, bad)


def test_rejects_shape_mismatch():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"weight has shape \(7,\), expected \(8,\)"):
        layer_norm(x, torch.ones(7), torch.zeros(8))
    with pytest.raises(ValueError, match=r"bias has shape \(8, 1\), expected \(8,\)"):
        layer_norm(x, torch.ones(8), torch.zeros(8, 1))
    with pytest.raises(TypeError, match="torch.Tensor"):
        layer_norm(x.tolist(), torch.ones(8), torch.zeros(8))


def test_rejects_mixed_devices():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="different devices.*x is on cpu.*weight is on meta"):
        layer_norm(x, torch.ones(8, device="meta"), torch.zeros(8))


def test_cpu_without_interpreter_says_how_to_fix(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"set TRITON_INTERPRET=1 before importing triton \(or `import tritongpt` first\)"):
        layer_norm(torch.randn(2, 8), torch.ones(8), torch.zeros(8))


def test_interpreter_too_old_for_numpy_says_what_to_install(monkeypatch):
    from tritongpt.kernels import _common

    assert _common.interpreter_problem("3.8.0", "2.4.6") is None
    assert _common.interpreter_problem("3.6.0", "2.3.5") is None
    # the bounds: 3.7 is the first Triton that runs with NumPy 2.4 (a version string may carry a suffix)
    assert _common.interpreter_problem("3.7.0", "2.4.0") is None
    assert _common.interpreter_problem("3.6.9", "2.3.9") is None
    assert _common.interpreter_problem("3.6.9+git1a2b", "2.4.0") is not None
    assert "install triton>=3.7 or numpy<2.4" in _common.interpreter_problem("3.6.0", "2.4.1")
    # and the kernels say it before launching, instead of the interpreter's TypeError
    monkeypatch.setattr(_common, "INTERPRETER_PROBLEM", _common.interpreter_problem("3.6.0", "2.4.6"))
    if _common.triton_interpreting():
        with pytest.raises(RuntimeError, match=r"Triton 3.6.0's CPU interpreter fails with NumPy 2.4.6"):
            layer_norm(torch.randn(2, 8), torch.ones(8), torch.zeros(8))


# -- the residual add: add_layer_norm --------------------------------------------------------

def check_add_parity(shape, xdtype, ddtype, device, seed, uses=("s", "y")):
    """(s, y) = add_layer_norm(x, delta) against float64, forward and every gradient, with s
    used downstream (its gradient ds comes into the kernel) and y, or only one of them."""
    gen = torch.Generator().manual_seed(seed)
    N = shape[-1]
    x = (torch.randn(shape, generator=gen) * 2 + 0.5).to(device, xdtype).requires_grad_()
    d = torch.randn(shape, generator=gen).to(device, ddtype).requires_grad_()
    w = (1.0 + 0.5 * torch.randn(N, generator=gen)).to(device).requires_grad_()
    b = (0.5 * torch.randn(N, generator=gen)).to(device).requires_grad_()
    s, y = add_layer_norm(x, d, w, b)
    want = torch.promote_types(xdtype, ddtype)
    assert s.dtype == y.dtype == want and s.shape == y.shape == x.shape
    gs, gy = (torch.randn(shape, generator=gen).to(device, want) for _ in range(2))
    loss = sum((t * g).sum() for name, t, g in (("s", s, gs), ("y", y, gy)) if name in uses)
    loss.backward()
    leaves = [t.detach().double().requires_grad_() for t in (x, d, w, b)]
    s64 = leaves[0] + leaves[1]
    y64 = ref64(s64, leaves[2], leaves[3])
    sum((t * g.double()).sum() for name, t, g in (("s", s64, gs), ("y", y64, gy)) if name in uses).backward()
    tol = max(TOL[xdtype], TOL[ddtype])
    assert_close_rel(s, s64, tol, f"s {xdtype}+{ddtype} {shape}")
    assert_close_rel(y, y64, tol, f"y {xdtype}+{ddtype} {shape}")
    assert x.grad.dtype == xdtype and d.grad.dtype == ddtype
    floor = dx_rounding_floor(s64, leaves[2], gy.double(), 1e-5) if "y" in uses else 0.0
    assert_close_mixed(x.grad, leaves[0].grad, tol, floor, "dx")
    assert_close_mixed(d.grad, leaves[1].grad, tol, floor, "ddelta")
    if "y" in uses:
        assert_close_rel(w.grad, leaves[2].grad, tol, "dweight")
        assert_close_rel(b.grad, leaves[3].grad, tol, "dbias")
    else:  # y unused: no LayerNorm gradient at all, as autograd gives
        assert w.grad is None and b.grad is None


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                    (torch.float32, torch.bfloat16), (torch.float16, torch.float32)],
                         ids=["fp32", "bf16", "fp32+bf16", "fp16+fp32"])
@pytest.mark.parametrize("shape", [(1, 64), (7, 100), (3, 37, 768), (2, 1600)])
def test_add_layer_norm_parity_fp64(shape, dtypes, device):
    check_add_parity(shape, *dtypes, device, seed=sum(shape) + len(str(dtypes)))


@pytest.mark.parametrize("uses", [("y",), ("s",)])
def test_add_layer_norm_with_one_output_used(uses, device):
    check_add_parity((9, 100), torch.float32, torch.float32, device, seed=31, uses=uses)


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
                                    (torch.float32, torch.float32)], ids=["bf16", "fp32+bf16", "fp32"])
def test_add_layer_norm_is_the_add_then_the_layer_norm(dtypes, device):
    """The fused forward gives torch's x + delta bit for bit (rounded once to s's dtype) and
    normalizes that rounded s, so y is layer_norm(x + delta)'s bit for bit; its gradients are
    the unfused kernels' within fp32 rounding (the fused one adds ds before it rounds dx)."""
    gen = torch.Generator().manual_seed(41)
    x = (torch.randn(13, 96, generator=gen) * 3 + 1).to(device, dtypes[0]).requires_grad_()
    d = torch.randn(13, 96, generator=gen).to(device, dtypes[1]).requires_grad_()
    w = (1 + 0.3 * torch.randn(96, generator=gen)).to(device).requires_grad_()
    b = (0.3 * torch.randn(96, generator=gen)).to(device).requires_grad_()
    gs, gy = torch.randn(13, 96, generator=gen).to(device), torch.randn(13, 96, generator=gen).to(device)
    grads = []
    for fused in (True, False):
        if fused:
            s, y = add_layer_norm(x, d, w, b)
        else:
            s = x + d
            y = layer_norm(s, w, b)
        outs = (s.detach(), y.detach())
        ((s * gs.to(s.dtype)).sum() + (y * gy.to(y.dtype)).sum()).backward()
        grads.append([t.grad.clone() for t in (x, d, w, b)])
        x.grad = d.grad = w.grad = b.grad = None
        if fused:
            fused_outs = outs
    assert torch.equal(fused_outs[0], outs[0]) and torch.equal(fused_outs[1], outs[1])
    tol = 1e-6 if dtypes == (torch.float32, torch.float32) else 1e-2
    for name, g, e in zip(("dx", "ddelta", "dweight", "dbias"), *grads):
        assert g.dtype == e.dtype, name
        assert_close_rel(g, e, tol, f"fused vs unfused {name}")


def test_add_and_norm_reference_module_both_paths(device):
    """LayerNorm.add_and_norm on both paths and its float64 twin: (s, y) and every gradient."""
    torch.manual_seed(12)
    ln = random_layer_norm(120, device)
    x, d = (torch.randn(2, 9, 120) * 2 + 1).to(device), torch.randn(2, 9, 120).to(device)
    gs, gy = torch.randn(2, 9, 120).to(device), torch.randn(2, 9, 120).to(device)

    def run(module, dtype):
        xi, di = x.to(dtype).clone().requires_grad_(), d.to(dtype).clone().requires_grad_()
        s, y = module.add_and_norm(xi, di)
        ((s * gs.to(dtype)).sum() + (y * gy.to(dtype)).sum()).backward()
        out = (s, y, xi.grad, di.grad, module.weight.grad.clone(), module.bias.grad.clone())
        module.zero_grad()
        return out

    ln64 = LayerNorm(120).double().to(device)
    ln64.load_state_dict(ln.state_dict())
    ref64_ = run(ln64, torch.float64)
    ln.use_triton = True
    tri = run(ln, torch.float32)
    ln.use_triton = False
    ref = run(ln, torch.float32)
    for name, t, r, r64 in zip(("s", "y", "dx", "ddelta", "dweight", "dbias"), tri, ref, ref64_):
        assert_close_rel(t, r64, 1e-4, f"{name} vs fp64 module")
        assert_close_rel(t, r, 1e-4, f"{name} vs fp32 module")


def test_add_and_norm_uses_the_modules_eps_on_both_paths(device):
    """A LayerNorm with an eps of its own adds and normalizes with that eps on the Triton path as
    on the reference one (an eps of 0.5 next to a variance near 0.2 moves y by far more than the
    tolerance)."""
    torch.manual_seed(14)
    ln = random_layer_norm(40, device)
    ln.eps = 0.5
    x, d = (torch.randn(5, 40) * 0.3).to(device), (torch.randn(5, 40) * 0.3).to(device)
    want = ref64(x.double() + d.double(), ln.weight, ln.bias, eps=0.5)
    for use_triton in (False, True):
        ln.use_triton = use_triton
        s, y = ln.add_and_norm(x, d)
        assert_close_rel(y, want, 1e-5, f"y, eps 0.5, use_triton={use_triton}")


def test_add_layer_norm_strided_inputs(device):
    """x a column slice of a wider buffer, delta transposed, gradients of other strides: each
    read at its own strides (or copied), never misread."""
    gen = torch.Generator().manual_seed(43)
    x = (torch.randn(11, 160, generator=gen) * 2)[:, 40:136].to(device).detach().requires_grad_()
    d = torch.randn(96, 11, generator=gen).to(device).t().detach().requires_grad_()
    w, b = (1 + 0.3 * torch.randn(96, generator=gen)).to(device), (0.3 * torch.randn(96, generator=gen)).to(device)
    gs = torch.randn(11, 128, generator=gen).to(device)[:, 5:101]
    gy = torch.randn(96, 11, generator=gen).to(device).t()
    s, y = add_layer_norm(x, d, w, b)
    torch.autograd.backward((s, y), (gs, gy))
    x64, d64 = x.detach().double().requires_grad_(), d.detach().double().requires_grad_()
    s64 = x64 + d64
    y64 = ref64(s64, w, b)
    torch.autograd.backward((s64, y64), (gs.double(), gy.double()))
    for name, t, r in (("s", s, s64), ("y", y, y64), ("dx", x.grad, x64.grad), ("ddelta", d.grad, d64.grad)):
        assert_close_rel(t, r, 1e-4, f"{name}, strided")


def test_add_layer_norm_strided_gradients_with_a_bf16_delta(device):
    """An fp32 stream and a bf16 delta (delta's gradient stored by the same pass, in bf16) with
    y's gradient a column slice of a wider buffer (row stride 128, not 96) and s's transposed
    (last-dim stride 11): ds is read at its own layout and delta's gradient written at its own."""
    gen = torch.Generator().manual_seed(47)
    x = (torch.randn(11, 96, generator=gen) * 2 + 0.5).to(device).requires_grad_()
    d = torch.randn(11, 96, generator=gen).to(device, torch.bfloat16).requires_grad_()
    w, b = (1 + 0.3 * torch.randn(96, generator=gen)).to(device), (0.3 * torch.randn(96, generator=gen)).to(device)
    gy = torch.randn(11, 128, generator=gen).to(device)[:, 5:101]
    gs = torch.randn(96, 11, generator=gen).to(device).t()
    assert gy.stride() == (128, 1) and gs.stride() == (1, 11)
    s, y = add_layer_norm(x, d, w, b)
    torch.autograd.backward((s, y), (gs, gy))
    x64, d64 = x.detach().double().requires_grad_(), d.detach().double().requires_grad_()
    s64 = x64 + d64
    torch.autograd.backward((s64, ref64(s64, w, b)), (gs.double(), gy.double()))
    assert x.grad.dtype == torch.float32 and d.grad.dtype == torch.bfloat16
    assert_close_rel(x.grad, x64.grad, 1e-4, "dx, strided gradients")
    assert_close_rel(d.grad, d64.grad, 1e-2, "ddelta (bf16), strided gradients")


def test_add_layer_norm_without_bias_and_with_strided_params(device):
    """bias None (no bias gradient, none asked of autograd) and a weight view of stride 2, which
    add_layer_norm copies for the ops as layer_norm does: forward and gradients against float64."""
    gen = torch.Generator().manual_seed(48)
    x = (torch.randn(7, 64, generator=gen) * 2 + 0.5).to(device).requires_grad_()
    d = torch.randn(7, 64, generator=gen).to(device).requires_grad_()
    w = (1 + 0.3 * torch.randn(128, generator=gen)).to(device)[::2].detach().requires_grad_()
    assert w.stride() == (2,)
    gs, gy = torch.randn(7, 64, generator=gen).to(device), torch.randn(7, 64, generator=gen).to(device)
    s, y = add_layer_norm(x, d, w, None)
    torch.autograd.backward((s, y), (gs, gy))
    leaves = [t.detach().double().requires_grad_() for t in (x, d, w)]
    s64 = leaves[0] + leaves[1]
    y64 = ref64(s64, leaves[2], None)
    torch.autograd.backward((s64, y64), (gs.double(), gy.double()))
    assert_close_rel(y, y64, 1e-4, "y, no bias")
    for name, t, r in zip(("dx", "ddelta", "dweight"), (x.grad, d.grad, w.grad), leaves):
        assert_close_rel(t, r.grad, 1e-4, f"{name}, no bias")


def test_add_layer_norm_ops_called_directly_refuse_a_bad_delta_or_ds(device):
    """add_layer_norm() hands the ops a delta and a ds of x's shape, delta with unit stride on its
    last dim; a direct call with other rows or a transposed delta would be read past its rows or
    as if row-major, with no error."""
    gen = torch.Generator().manual_seed(49)
    x, d = (torch.randn(8, 16, generator=gen).to(device) for _ in range(2))
    w, b = torch.randn(16, generator=gen).to(device), torch.randn(16, generator=gen).to(device)
    with pytest.raises(ValueError, match=r"delta has shape \(16, 16\), expected \(8, 16\)"):
        torch.ops.tritongpt.add_layer_norm_fwd(x, torch.randn(16, 16, device=device), w, b, 1e-5)
    with pytest.raises(ValueError, match=r"unit stride on its last dim, got strides \(1, 8\)"):
        torch.ops.tritongpt.add_layer_norm_fwd(x, d.t().contiguous().t(), w, b, 1e-5)
    s, y, mean, rstd = torch.ops.tritongpt.add_layer_norm_fwd(x, d, w, b, 1e-5)
    assert_close_rel(y, ref64(x.double() + d.double(), w, b), 1e-5, "y")
    ds = torch.randn(16, 8, generator=gen).to(device)  # as many values as s, in the wrong shape
    with pytest.raises(ValueError, match=r"ds has shape \(16, 8\), expected \(8, 16\)"):
        torch.ops.tritongpt.layer_norm_bwd(torch.ones_like(y), s, w, mean, rstd, ds)
    with pytest.raises(ValueError, match=r"ds has shape \(16, 8\), expected \(8, 16\)"):
        torch.ops.tritongpt.add_layer_norm_bwd(torch.ones_like(y), s, w, mean, rstd, ds, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [100, 768])
def test_add_layer_norm_constant_sum_normalizes_to_exactly_zero(width, dtype, device):
    """A row whose sum x + delta is constant gives exactly the bias at eps 1e-12, as
    layer_norm does: the shifted statistics must shift by the sum's first value as rounded to
    s's dtype, not x's value or the unrounded sum."""
    gen = torch.Generator().manual_seed(width)
    x = (torch.full((3, width), 3.0) + torch.tensor([[0.0], [-10.3], [7.0]])).to(device, dtype)
    d = torch.tensor([[0.1], [0.7], [-0.3]]).to(device, dtype).expand(3, width)
    b = torch.randn(width, generator=gen).to(device, dtype)
    s, y = add_layer_norm(x, d, torch.randn(width, generator=gen).to(device, dtype), b, 1e-12)
    assert (s == s[:, :1]).all()
    assert torch.equal(y, b.expand(3, width))


def test_add_layer_norm_saves_only_s_and_the_statistics(device):
    """Backward keeps s (the output the caller holds as its residual stream anyway) and the fp32
    mean and rstd: no copy of x or delta."""
    from tritongpt.kernels._common import saved_tensor_bytes

    gen = torch.Generator().manual_seed(44)
    x, d = (torch.randn(8, 64, generator=gen).to(device).requires_grad_() for _ in range(2))
    w, b = torch.ones(64, device=device, requires_grad=True), torch.zeros(64, device=device, requires_grad=True)
    nbytes, (s, y) = saved_tensor_bytes(add_layer_norm, x, d, w, b, exclude=(w, b))
    assert nbytes == 8 * 64 * 4 + 2 * 8 * 4


def test_add_layer_norm_refuses_bad_input():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"add_layer_norm: delta has shape \(3, 1\), x \(3, 8\)"):
        add_layer_norm(x, torch.randn(3, 1), torch.ones(8), torch.zeros(8))
    with pytest.raises(TypeError, match="delta has dtype int64"):
        add_layer_norm(x, torch.ones(3, 8, dtype=torch.int64), torch.ones(8), torch.zeros(8))
    with pytest.raises(ValueError, match="different devices.*x is on cpu.*delta is on meta"):
        add_layer_norm(x, torch.randn(3, 8, device="meta"), torch.ones(8), torch.zeros(8))
    wide = torch.randn(1, MAX_WIDTH + 1)
    with pytest.raises(ValueError, match=f"add_layer_norm: last dim of x is {MAX_WIDTH + 1}"):
        add_layer_norm(wide, wide, torch.ones(MAX_WIDTH + 1), None)


def test_add_layer_norm_torch_compile_fullgraph(device):
    gen = torch.Generator().manual_seed(45)
    x, w, b = make((2, 3, 48), torch.float32, device, gen)
    d = torch.randn(2, 3, 48, generator=gen).to(device).requires_grad_()

    def fn(x, d, w, b):
        s, y = add_layer_norm(x, d, w, b)
        return s * y

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    outs = []
    for f in (compiled, fn):
        out = f(x, d, w, b)
        out.square().sum().backward()
        outs.append((out.detach(), x.grad.clone(), d.grad.clone(), w.grad.clone(), b.grad.clone()))
        x.grad = d.grad = w.grad = b.grad = None
    for name, g, e in zip(("out", "dx", "ddelta", "dw", "db"), *outs):
        assert_close_rel(g, e, 1e-6, f"compiled {name}")


# -- torch.compile ---------------------------------------------------------------------------

def test_torch_compile_fullgraph(device):
    """The custom ops (with fake impls) + autograd.Function trace into one graph, no breaks."""
    gen = torch.Generator().manual_seed(9)
    x, w, b = make((2, 3, 48), torch.float32, device, gen)
    fn = lambda x, w, b: layer_norm(x, w, b) * 2.0
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    y = compiled(x, w, b)
    y.square().sum().backward()
    got = (y.detach(), x.grad.clone(), w.grad.clone(), b.grad.clone())
    x.grad = w.grad = b.grad = None
    y = fn(x, w, b)
    y.square().sum().backward()
    for name, g, e in zip(("y", "dx", "dw", "db"), got, (y, x.grad, w.grad, b.grad)):
        assert_close_rel(g, e, 1e-6, f"compiled {name}")


# -- GPT-2 sizes on a GPU ----------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("width", [768, 1024, 1280, 1600])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpt2_sizes_cuda(width, dtype):
    check_parity((4096, width), dtype, torch.device("cuda"), seed=width)


@pytest.mark.cuda
@pytest.mark.parametrize("width", [768, 1600])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)])
def test_add_layer_norm_gpt2_sizes_cuda(width, dtypes):
    check_add_parity((4099, width), *dtypes, torch.device("cuda"), seed=width)


@pytest.mark.cuda
def test_odd_rows_max_width_cuda():
    check_parity((4099, MAX_WIDTH), torch.bfloat16, torch.device("cuda"), seed=1)
    check_parity((37, 100), torch.float16, torch.device("cuda"), seed=2)


@pytest.mark.parametrize("fused", ["add_layer_norm", "add_rms_norm"])
def test_add_norm_leaf_grads_accumulate_apart(fused, device):
    """x and delta get one gradient: two leaves' .grad must still be two buffers, so that a second
    backward adds its gradient once to each (two views of one buffer made both 3x, not 2x)."""
    from tritongpt.kernels.layernorm import add_rms_norm
    gen = torch.Generator().manual_seed(43)
    x, d = (torch.randn(3, 32, generator=gen).to(device).requires_grad_() for _ in range(2))
    w = torch.randn(32, generator=gen).to(device)
    dy = torch.randn(3, 32, generator=gen).to(device)

    def backward():
        y = add_layer_norm(x, d, w, None)[1] if fused == "add_layer_norm" else add_rms_norm(x, d, w)[1]
        y.backward(dy)

    backward()
    once = x.grad.clone()
    assert once.abs().sum() > 0 and torch.equal(d.grad, once)
    assert x.grad.data_ptr() != d.grad.data_ptr()
    backward()
    torch.testing.assert_close(x.grad, 2 * once)
    torch.testing.assert_close(d.grad, 2 * once)
