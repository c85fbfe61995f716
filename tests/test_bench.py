"""The benchmark harness on a CPU (formulas, rows, targets, files, CLI) and, with CUDA, a real
--quick run. Everything here is small: the CPU is shared, and timings are not asserted."""
import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from launch_spy import FlagSpy
from tritongpt.bench import common, kernels, report, train_step
from tritongpt.bench.common import CpuTimer, Budget, make_row, target
from tritongpt.kernels import _common as kernel_common

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


pytestmark = pytest.mark.usefixtures("one_thread")


def quick_timer(reps=1):
    """A CpuTimer whose warm-up is one call: its default adds calls for 0.5 s, ~25 interpreted launches a Triton
    row (a third of this file's time), and the tests that use this read no time (CpuTimer's own tests below)."""
    return CpuTimer(reps=reps, warm_s=0)


# -- formulas against hand computations ------------------------------------------------------------
def test_matmul_and_mlp_flops():
    assert common.matmul_flops(2, 3, 4) == 48
    # GPT-2 small MLP on 16k rows: two matmuls of 16384 x 3072 x 768, 2 FLOPs per MAC.
    fwd = 2 * (2 * 16384 * 3072 * 768)
    assert common.mlp_flops(16384, 768, "fwd") == fwd == 16 * 16384 * 768 ** 2
    assert common.mlp_flops(16384, 768, "bwd") == 2 * fwd
    assert common.mlp_flops(16384, 768, "fwd+bwd") == 3 * fwd
    with pytest.raises(ValueError, match="mode"):
        common.mlp_flops(1, 1, "forward")


def test_attention_flops():
    # one head, T=1024, D=64: QK^T and PV are 2*T*T*D each; causal halves; bwd is 2.5x.
    full = 2 * (2 * 1024 * 1024 * 64)
    assert common.attention_flops(1, 1, 1024, 1024, 64, False, "fwd") == full
    assert common.attention_flops(1, 1, 1024, 1024, 64, True, "fwd") == full / 2
    assert common.attention_flops(1, 1, 1024, 1024, 64, True, "bwd") == 2.5 * full / 2
    assert common.attention_flops(2, 3, 1024, 1024, 64, True, "fwd+bwd") == 6 * 3.5 * full / 2


def test_layernorm_bytes_and_rates():
    m, n = 16384, 768
    assert common.layernorm_bytes(m, n, 2, "fwd") == 2 * m * n * 2 + 2 * n * 2
    assert common.layernorm_bytes(m, n, 2, "bwd") == 3 * m * n * 2 + 3 * n * 2
    assert common.layernorm_bytes(m, n, 2, "fwd+bwd") == 5 * m * n * 2 + 5 * n * 2
    assert common.layernorm_bytes(4, 8, 2, "fwd", param_elem=4) == 2 * 32 * 2 + 2 * 8 * 4
    # RMSNorm's: no bias to read in forward, no dbias to write in backward
    assert common.layernorm_bytes(m, n, 2, "fwd", bias=False) == 2 * m * n * 2 + n * 2
    assert common.layernorm_bytes(m, n, 2, "bwd", bias=False) == 3 * m * n * 2 + 2 * n * 2
    assert common.gbps(2e9, 2.0) == pytest.approx(1000.0)
    assert common.tflops(3e12, 1500.0) == pytest.approx(2.0)


def test_add_layernorm_bytes():
    m, n = 16384, 768
    # forward: x (fp32), delta (bf16) in; s, y (fp32) out; backward: dy, ds, s in; dx (fp32), ddelta (bf16) out
    assert common.add_layernorm_bytes(m, n, 4, 2, "fwd") == m * n * (4 + 2 + 4 + 4) + 2 * n * 4
    assert common.add_layernorm_bytes(m, n, 4, 2, "bwd") == m * n * (4 + 4 + 4 + 4 + 2) + 3 * n * 4
    assert common.add_layernorm_bytes(m, n, 2, 2, "fwd+bwd", 2) == m * n * 2 * 9 + 5 * n * 2
    assert common.add_layernorm_bytes(m, n, 4, 2, "fwd", bias=False) == m * n * (4 + 2 + 4 + 4) + n * 4
    assert common.add_layernorm_bytes(m, n, 4, 2, "bwd", bias=False) == m * n * (4 + 4 + 4 + 4 + 2) + 2 * n * 4


def test_rmsnorm_providers_compute_the_same_and_every_mode_times(device, monkeypatch):
    """rmsnorm and add_rmsnorm: every provider (the module and its compile, F.rms_norm, ours through
    the interpreter) gives the float64 formula's outputs and the same gradients for x, delta and the
    weight; the sweeps count RMSNorm's bytes (no bias)."""
    monkeypatch.setattr(kernels, "_fresh_compile", lambda fn: fn)  # no compiler to spare on the CPU
    gen = torch.Generator().manual_seed(9)
    x = (torch.randn(6, 40, generator=gen) + 0.5).to(device).requires_grad_()
    d = torch.randn(6, 40, generator=gen).to(device, torch.bfloat16).requires_grad_()
    w = (1 + 0.3 * torch.randn(40, generator=gen)).to(device).requires_grad_()
    gs, gy = torch.randn(6, 40, generator=gen).to(device), torch.randn(6, 40, generator=gen).to(device)

    def rms64(t):
        t = t.detach().double()
        return t / torch.sqrt((t * t).mean(-1, keepdim=True) + 1e-5) * w.detach().double()

    for op, builders in (("rmsnorm", kernels.rmsnorm_providers(x, w)),
                         ("add_rmsnorm", kernels.add_rmsnorm_providers(x, d, w))):
        assert set(builders) == set(kernels.PROVIDERS[op])
        results = {}
        for name in ("reference", "torch", "compile", "triton"):
            forward, leaves = builders[name]()
            out = forward()
            if op == "rmsnorm":
                out.backward(gy)
                want = rms64(x)
            else:
                torch.autograd.backward(out, (gs, gy))
                assert torch.equal(out[0], x.detach() + d.detach().float()), name
                out, want = out[1], rms64(x.detach() + d.detach().float())
            assert torch.allclose(out.double(), want, atol=1e-5, rtol=1e-5), (op, name)
            assert len(leaves) == (2 if op == "rmsnorm" else 3) and all(t.grad is not None for t in leaves), name
            results[name] = [t.grad.clone() for t in leaves]
            for t in leaves:
                t.grad = None
        for name, got in results.items():
            for i, (g, e) in enumerate(zip(got, results["reference"], strict=True)):
                assert torch.allclose(g.float(), e.float(), atol=1e-5, rtol=1e-4), (op, name, i)
    rows = kernels.sweep_rmsnorm(quick_timer(), Budget(None), 8, (24,), torch.float32, providers=("torch",))
    assert {r["mode"]: r["bytes"] for r in rows} == {m: common.layernorm_bytes(8, 24, 4, m, bias=False)
                                                     for m in ("fwd", "bwd", "fwd+bwd")}
    rows = kernels.sweep_add_rmsnorm(quick_timer(), Budget(None), 8, (24,), torch.bfloat16, providers=("torch",))
    assert {r["mode"]: r["bytes"] for r in rows} == {m: common.add_layernorm_bytes(8, 24, 4, 2, m, bias=False)
                                                     for m in ("fwd", "bwd", "fwd+bwd")}
    assert all(r["status"] == "ok" and r["config"]["stream"] == "fp32" for r in rows)


def test_rmsnorm_liger_provider_builds_llamas_rmsnorm(monkeypatch):
    """Liger's LigerRMSNorm(hidden_size, eps, offset, casting_mode, ...) is built with Llama's casting
    and no offset (Gemma's would compute x_hat * (1 + w)), by keyword (its defaults changed between
    versions), holding our weight, and not in place (its backward would write dx into the dy every
    timed backward reuses); without liger_kernel, a skipped row naming it."""
    seen = {}

    class LigerRMSNorm(torch.nn.Module):
        def __init__(self, hidden_size, eps=1e-6, offset=0.0, casting_mode="gemma", init_fn="ones", in_place=True):
            super().__init__()
            seen.update(hidden_size=hidden_size, eps=eps, offset=offset, casting_mode=casting_mode)
            self.weight = torch.nn.Parameter(torch.ones(hidden_size))
            self.eps, self.offset, self.in_place = eps, offset, in_place

        def forward(self, x):
            seen["in_place"] = self.in_place
            return F.rms_norm(x, x.shape[-1:], self.weight + self.offset, self.eps)

    fake = types.ModuleType("liger_kernel.transformers.rms_norm")
    fake.LigerRMSNorm = LigerRMSNorm
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.rms_norm", fake)
    gen = torch.Generator().manual_seed(10)
    x, w = torch.randn(5, 16, generator=gen).requires_grad_(), torch.randn(16, generator=gen).requires_grad_()
    forward, leaves = kernels.rmsnorm_providers(x, w)["liger"]()
    y = forward()
    assert seen == dict(hidden_size=16, eps=1e-5, offset=0.0, casting_mode="llama", in_place=False)
    assert torch.allclose(y, F.rms_norm(x, (16,), w, 1e-5)) and leaves[0] is x and len(leaves) == 2
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.rms_norm", None)
    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    with pytest.raises(kernels.Unavailable, match="liger_kernel"):
        kernels.rmsnorm_providers(x, w)["liger"]()


def test_add_layernorm_providers_compute_the_same_and_every_mode_times(device):
    """Each provider gives (x + d, LayerNorm(x + d)) and the same gradients for both outputs'
    gradients (the fused kernel through the interpreter on the CPU); the sweep times both
    outputs' backward and counts its bytes."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 40, generator=gen).to(device).requires_grad_()
    d = torch.randn(6, 40, generator=gen).to(device, torch.bfloat16).requires_grad_()
    w, b = (torch.randn(40, generator=gen).to(device).requires_grad_() for _ in range(2))
    gs, gy = torch.randn(6, 40, generator=gen).to(device), torch.randn(6, 40, generator=gen).to(device)
    builders = kernels.add_layernorm_providers(x, d, w, b)
    assert set(builders) == set(kernels.PROVIDERS["add_layernorm"])
    with pytest.raises(kernels.Unavailable, match="flash_attn"):  # not installed here
        builders["flash-attn"]()
    results = {}
    for name in ("reference", "torch", "triton"):
        forward, leaves = builders[name]()
        s, y = forward()
        torch.autograd.backward((s, y), (gs, gy))
        results[name] = [s, y] + [t.grad for t in leaves]
        for t in leaves:
            t.grad = None
    want = x.detach() + d.detach().float()
    assert torch.equal(results["torch"][0], want)
    for name, got in results.items():
        for i, (g, e) in enumerate(zip(got, results["torch"])):
            assert torch.allclose(g, e, atol=1e-5, rtol=1e-5), (name, i)
    rows = kernels.sweep_add_layernorm(quick_timer(), Budget(None), 8, (24,), torch.bfloat16,
                                       providers=("torch",))
    assert {r["mode"]: r["bytes"] for r in rows} == {m: common.add_layernorm_bytes(8, 24, 4, 2, m)
                                                     for m in ("fwd", "bwd", "fwd+bwd")}
    assert all(r["status"] == "ok" and r["config"]["stream"] == "fp32" for r in rows)


def test_add_layernorm_flash_attn_provider_passes_its_argument_order(monkeypatch):
    """flash-attn's layer_norm_fn(x, weight, bias, residual=...) normalizes x + residual: our
    sublayer output is its x and our stream its residual; prenorm returns (y, sum), which the
    provider gives back as (sum, y). A version without out_dtype is skipped, named."""
    import sys
    import types

    seen = {}

    def layer_norm_fn(x, weight, bias, residual=None, eps=1e-6, prenorm=False, residual_in_fp32=False,
                      out_dtype=None):
        seen.update(x=x, residual=residual, eps=eps, prenorm=prenorm, fp32=residual_in_fp32, out_dtype=out_dtype)
        s = residual.float() + x.float()
        return torch.nn.functional.layer_norm(s, s.shape[-1:], weight, bias, eps).to(out_dtype), s

    module = types.ModuleType("flash_attn.ops.triton.layer_norm")
    module.layer_norm_fn = layer_norm_fn
    monkeypatch.setitem(sys.modules, "flash_attn.ops.triton.layer_norm", module)
    gen = torch.Generator().manual_seed(6)
    x, w, b = (torch.randn(*shape, generator=gen) for shape in ((5, 16), (16,), (16,)))
    d = torch.randn(5, 16, generator=gen).bfloat16()
    s, y = kernels.add_layernorm_providers(x, d, w, b)["flash-attn"]()[0]()
    assert seen["x"] is d and seen["residual"] is x and seen["prenorm"] and seen["fp32"]
    assert seen["out_dtype"] == torch.float32 and seen["eps"] == 1e-5
    assert torch.equal(s, x + d.float()) and y.dtype == torch.float32
    module.layer_norm_fn = lambda x, weight, bias, residual=None, eps=1e-6, prenorm=False: None
    with pytest.raises(kernels.Unavailable, match="no out_dtype"):
        kernels.add_layernorm_providers(x, d, w, b)["flash-attn"]()


def test_add_layernorm_triton_provider_passes_the_stream_as_x(monkeypatch):
    """The fused kernel is called as a block calls it: the fp32 stream as x, the bf16 sublayer
    output as delta. Swapped, the numbers are the same (x + d == d + x, and autograd casts each
    gradient to its input's dtype), but the kernel would take delta for fp32 and time its
    one-dtype backward instead of the one that writes delta's gradient in bf16."""
    from tritongpt.kernels import layernorm

    seen = []
    real = layernorm.add_layer_norm

    def add_layer_norm(x, delta, weight, bias, eps=1e-5):
        seen.append((x, delta, weight, bias, eps))
        return real(x, delta, weight, bias, eps)

    monkeypatch.setattr(layernorm, "add_layer_norm", add_layer_norm)
    gen = torch.Generator().manual_seed(8)
    x, w, b = (torch.randn(*shape, generator=gen).requires_grad_() for shape in ((5, 16), (16,), (16,)))
    d = torch.randn(5, 16, generator=gen).bfloat16().requires_grad_()
    s, _ = kernels.add_layernorm_providers(x, d, w, b)["triton"]()[0]()
    [(got_x, got_delta, got_w, got_b, eps)] = seen
    assert got_x is x and got_delta is d, "the stream and the sublayer output are swapped"
    assert got_w is w and got_b is b and eps == 1e-5
    assert s.grad_fn.delta_dtype == torch.bfloat16  # the backward timed is the mixed-dtype one


def test_add_layernorm_compile_provider_and_the_leaves_each_provider_resets(monkeypatch):
    """The compile provider compiles the module's add_and_norm (torch.compile stood in for by the
    function itself: the CPU has no compiler to spare here), so it returns (s, y) as the eager
    module does; every provider names as leaves each tensor its backward gives a gradient (the
    timing loop resets exactly those), the module's own weight and bias included."""
    monkeypatch.setattr(kernels, "_fresh_compile", lambda fn: fn)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(5, 24, generator=gen).requires_grad_()
    d = torch.randn(5, 24, generator=gen).bfloat16().requires_grad_()
    w, b = (torch.randn(24, generator=gen).requires_grad_() for _ in range(2))
    gs, gy = torch.randn(5, 24, generator=gen), torch.randn(5, 24, generator=gen)
    builders = kernels.add_layernorm_providers(x, d, w, b)
    want = None
    for name in ("torch", "reference", "compile", "triton"):
        forward, leaves = builders[name]()
        s, y = forward()
        torch.autograd.backward((s, y), (gs, gy))
        assert len(leaves) == 4 and all(t.grad is not None for t in leaves), name
        got = [s, y] + [t.grad for t in leaves]
        want = want or got
        for i, (g, e) in enumerate(zip(got, want, strict=True)):
            assert torch.allclose(g.float(), e.float(), atol=1e-5, rtol=1e-5), (name, i)
        for t in leaves:
            t.grad = None


@pytest.mark.parametrize("mode", ["bwd", "fwd+bwd"])
def test_a_timed_backward_sends_a_gradient_into_every_output(mode):
    """A forward with several outputs (add_layernorm's s and y): the timed backward starts from a
    random gradient for each, as a block's does, not from the first output's alone."""
    x = torch.randn(4, 8, requires_grad=True)
    torch.manual_seed(3)
    fn = kernels._mode_fn(lambda: (x * 2, x * 3), mode)
    torch.manual_seed(3)
    dy_s, dy_y = torch.randn(4, 8), torch.randn(4, 8)  # the ones _mode_fn drew, in its order
    fn()
    assert torch.allclose(x.grad, 2 * dy_s + 3 * dy_y)


def test_the_add_layernorm_sweep_times_an_fp32_stream_and_a_sublayer_output_in_the_dtype(monkeypatch):
    """As a block under autocast: x (the stream), weight and bias in fp32, delta in the swept
    dtype; the bytes counted are for those (4-byte x, s and y, 2-byte delta in bf16)."""
    seen = []
    real = kernels.add_layernorm_providers

    def spy(x, d, w, b, eps=1e-5):
        seen.append((x.dtype, d.dtype, w.dtype, b.dtype))
        return real(x, d, w, b, eps)

    monkeypatch.setattr(kernels, "add_layernorm_providers", spy)
    rows = kernels.sweep_add_layernorm(quick_timer(), Budget(None), 8, (24,), torch.bfloat16, modes=("fwd",),
                                       providers=("torch",))
    assert seen == [(torch.float32, torch.bfloat16, torch.float32, torch.float32)]
    assert [r["bytes"] for r in rows] == [common.add_layernorm_bytes(8, 24, 4, 2, "fwd")]


def test_gpt2_small_flops_per_token_from_the_model():
    # The benchmark's MFU uses the trainer's formula on the model's own count: GPT-2 small has the
    # published 124,439,808 parameters, 786,432 of them position embeddings (N excludes those).
    from tritongpt.model.config import get_config
    from tritongpt.model.gpt import GPTModel
    from tritongpt.train.loop import flops_per_token

    cfg = get_config("gpt2-small")
    with torch.device("meta"):  # shapes only: no 500 MB of weights
        model = GPTModel(cfg)
    assert model.num_params() == 124_439_808
    n = model.num_params(non_embedding=True)
    assert n == 124_439_808 - 1024 * 768
    assert flops_per_token(cfg, n, 1024) == 6 * n + 12 * 12 * 768 * 1024


def test_median_quantiles_order_matches_do_bench():
    med, p20, p80 = common.median_quantiles([float(x) for x in range(10, 0, -1)])
    assert (med, p20, p80) == pytest.approx((5.5, 2.8, 8.2))
    assert common.median_quantiles([3.0]) == (3.0, 3.0, 3.0)
    with pytest.raises(ValueError):
        common.median_quantiles([])


# -- targets --------------------------------------------------------------------------------------------
def test_target_pass_fail_na():
    assert target("t", "c", 1.25, 1.25)["status"] == "PASS"
    assert target("t", "c", 1.2499, 1.25)["status"] == "FAIL"
    assert target("t", "c", 0.7, 0.7, op="<=")["status"] == "PASS"
    assert target("t", "c", 0.71, 0.7, op="<=")["status"] == "FAIL"
    assert target("t", "c", None, 1.0)["status"] == "N/A"
    na = target("t", "c", float("nan"), 1.0)
    assert na["status"] == "N/A" and na["value"] is None
    with pytest.raises(ValueError, match="op"):
        target("t", "c", 1.0, 1.0, op=">")
    assert common.ratio(3.0, 2.0) == 1.5
    assert common.ratio(None, 2.0) is None and common.ratio(1.0, 0) is None


def _k(op, prov, mode, cfg, **m):
    return make_row("kernels", op, prov, cfg, mode, **m)


def test_kernel_targets_from_rows():
    ln = {"rows": 16384, "width": 768, "dtype": "bf16"}
    mlp = {"rows": 16384, "width": 768, "hidden": 3072, "dtype": "bf16"}
    att = {"batch": 16, "heads": 32, "seq_len": 1024, "head_dim": 64, "causal": True, "dtype": "bf16"}
    rows = [
        _k("layernorm", "triton", "fwd+bwd", ln, ms=1.1, gbps=900.0),
        _k("layernorm", "compile", "fwd+bwd", ln, ms=1.0, gbps=990.0),
        _k("mlp", "reference", "fwd+bwd", mlp, ms=2.4),
        _k("mlp", "triton", "fwd+bwd", mlp, ms=2.0),
        _k("mlp", "reference", "saved", mlp, saved_bytes=100),
        _k("mlp", "triton", "saved", mlp, saved_bytes=75),
        _k("mlp", "torch", "fwd+bwd", mlp, ms=2.1),
        _k("mlp", "torch", "saved", mlp, saved_bytes=90),
        _k("attention", "triton", "fwd", att, ms=0.1, tflops=350.0),
        _k("attention", "triton", "fwd+bwd", att, ms=0.7),
        _k("attention", "sdpa-flash", "fwd+bwd", att, ms=1.0),
        _k("attention", "sdpa-cudnn", "fwd+bwd", att, ms=0.8),
        make_row("kernels", "attention", "sdpa-efficient", att, "fwd+bwd", "failed: RuntimeError: x"),
    ]
    got = {t["target"]: t for t in kernels.kernel_targets(rows, {"copy": {"gbps": 1000.0}})}
    assert got["layernorm bandwidth / copy bandwidth"]["value"] == pytest.approx(0.9)
    assert got["layernorm bandwidth / copy bandwidth"]["status"] == "PASS"
    assert got["layernorm speed vs torch.compile"]["status"] == "FAIL"  # 1.0 / 1.1
    assert got["gelu-mlp speedup vs reference eager"]["value"] == pytest.approx(1.2)
    assert got["gelu-mlp speedup vs reference eager"]["status"] == "PASS"
    assert got["gelu-mlp saved activations / reference"]["status"] == "FAIL"  # 0.75 > 0.70
    # the same bars against PyTorch's own eager ops, named as beyond the issue
    assert got["gelu-mlp speedup vs torch ops"]["value"] == pytest.approx(1.05)
    assert got["gelu-mlp speedup vs torch ops"]["status"] == "FAIL"
    assert got["gelu-mlp saved activations / torch ops"]["value"] == pytest.approx(75 / 90)
    assert "beyond the issue" in got["gelu-mlp saved activations / torch ops"]["note"]
    assert got["attention forward TFLOPS"]["status"] == "PASS"
    sp = got["attention speedup vs best SDPA backend"]
    assert sp["value"] == pytest.approx(0.8 / 0.7) and sp["status"] == "PASS"  # best = cudnn


def test_kernel_targets_missing_rows_are_na():
    ln = {"rows": 8, "width": 32, "dtype": "bf16"}
    rows = [make_row("kernels", "layernorm", "triton", ln, "fwd+bwd", "skipped: not written yet"),
            _k("layernorm", "compile", "fwd+bwd", ln, ms=1.0)]
    got = kernels.kernel_targets(rows, {})
    assert {t["status"] for t in got} == {"N/A"}
    assert len(got) == 4  # 2 layernorm lines for the one width + 2 attention lines


def test_train_targets_pick_fastest_triton_provider():
    cfg = {"model": "gpt2-small", "batch": 16, "seq_len": 1024}
    rows = [make_row("train", "step", "reference", cfg, "fwd+bwd", ms=9, tokens_per_s=80.0, peak_mem_bytes=100),
            make_row("train", "step", "reference+compile+sdpa", cfg, "fwd+bwd", ms=5, tokens_per_s=100.0,
                     peak_mem_bytes=90),
            make_row("train", "step", "triton", cfg, "fwd+bwd", ms=4, tokens_per_s=130.0, mfu=0.6,
                     peak_mem_bytes=80),
            make_row("train", "step", "triton+compile", cfg, "fwd+bwd", ms=3, tokens_per_s=140.0, mfu=0.5,
                     peak_mem_bytes=60)]
    got = {t["target"]: t for t in train_step.train_targets(rows)}
    speed = got["train step speedup vs reference+compile+sdpa"]
    assert speed["value"] == pytest.approx(1.4) and speed["status"] == "PASS"
    assert "triton+compile" in speed["note"]
    assert got["train MFU"]["status"] == "FAIL"
    assert got["train peak memory / reference eager"]["value"] == pytest.approx(0.6)
    rows[-1] = make_row("train", "step", "triton+compile", cfg, "fwd+bwd", "failed: Unsupported: x")
    got = {t["target"]: t for t in train_step.train_targets(rows)}
    assert got["train MFU"]["status"] == "PASS" and "ours = triton" in got["train MFU"]["note"]


# -- providers, skipping, the driver on CPU ----------------------------------------------------------
def test_missing_providers_skip_cleanly(monkeypatch):
    # A None entry in sys.modules makes the import fail, whatever is installed.
    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    monkeypatch.setitem(sys.modules, "tritongpt.kernels.layernorm", None)
    torch.manual_seed(0)
    x = kernels.randn(16, 24, device="cpu", dtype=torch.float32)
    w, b = (kernels.randn(24, device="cpu", dtype=torch.float32) for _ in range(2))
    rows = kernels.bench_providers(
        "layernorm", {"rows": 16, "width": 24}, kernels.layernorm_providers(x, w, b),
        ("fwd", "fwd+bwd"), quick_timer(2), Budget(None),
        lambda m: {"bytes": common.layernorm_bytes(16, 24, 4, m)},
        providers=("reference", "torch", "triton", "liger"))
    by = {(r["provider"], r["mode"]): r for r in rows}
    assert len(rows) == 8
    for mode in ("fwd", "fwd+bwd"):
        assert by[("liger", mode)]["status"].startswith("skipped: liger_kernel")
        assert by[("triton", mode)]["status"].startswith("skipped: tritongpt.kernels.layernorm")
        for p in ("reference", "torch"):
            r = by[(p, mode)]
            assert r["status"] == "ok" and r["ms"] > 0
            assert r["gbps"] == pytest.approx(r["bytes"] / (r["ms"] * 1e-3) / 1e9)
    assert x.grad is None and w.grad is None  # gradients reset after timing


def test_fused_lm_head_rates_count_the_work_each_mode_does():
    """The fused LM head + loss makes its gradients in forward: its fwd row counts the three
    matmuls, and its bwd row (scaling saved gradients) claims no TFLOPS (it once claimed the
    two backward matmuls it never runs, thousands of TFLOPS)."""
    torch.manual_seed(0)
    N, C, V = 16, 12, 40
    h, w = (kernels.randn(*s, device="cpu", dtype=torch.float32) for s in ((N, C), (V, C)))
    t = torch.randint(0, V, (N,))
    rows = kernels.bench_providers(
        "lm_head_loss", {"rows": N}, kernels.lm_head_loss_providers(h, w, t), kernels.MODES, quick_timer(),
        Budget(None), lambda m: {"flops": common.lm_head_flops(N, C, V, m)}, providers=("torch", "triton"),
        grads_in_forward=("triton",))
    by = {(r["provider"], r["mode"]): r for r in rows}
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    three = common.lm_head_flops(N, C, V, "fwd+bwd")
    assert by[("triton", "fwd")]["flops"] == three and by[("triton", "fwd+bwd")]["flops"] == three
    assert "flops" not in by[("triton", "bwd")] and "tflops" not in by[("triton", "bwd")]
    assert by[("triton", "bwd")]["note"] == "gradients made in forward"
    assert by[("torch", "fwd")]["flops"] == common.lm_head_flops(N, C, V, "fwd") and "note" not in by[("torch", "bwd")]
    assert "gradients made in forward" in report.rows_table(rows)


def test_lm_head_distill_providers_agree_and_count_the_teachers_matmul():
    """lm_head_distill: ours (interpreted, tiny) gives the reference's loss, its fwd row counts the teacher's
    forward matmul and the student's three, its bwd row none; Liger's, not installed here, is a skipped row."""
    torch.manual_seed(0)
    N, C, V = 8, 12, 30
    h, w, th, tw = (kernels.randn(*s, device="cpu", dtype=torch.float32) for s in ((N, C), (V, C), (N, C), (V, C)))
    t = torch.randint(0, V, (N,))
    builders = kernels.lm_head_distill_providers(h, w, th, tw, t)
    ref, ours = builders["reference"]()[0](), builders["triton"]()[0]()
    assert abs(ours.item() - ref.item()) < 1e-5 * abs(ref.item()) and ref.item() > 0.1
    rows = kernels.sweep_lm_head_distill(quick_timer(), Budget(None), N, (C,), (V,), torch.float32,
                                         providers=("triton", "liger"))
    by = {(r["provider"], r["mode"]): r for r in rows}
    assert all(by[("triton", m)]["status"] == "ok" for m in kernels.MODES)
    assert by[("triton", "fwd")]["flops"] == 4 * 2 * N * C * V and "flops" not in by[("triton", "bwd")]
    import importlib.util
    if importlib.util.find_spec("liger_kernel") is None:
        assert by[("liger", "fwd")]["status"].startswith("skipped")
    assert by[("triton", "fwd")]["config"] == {"rows": N, "width": C, "teacher_width": C, "vocab": V, **kernels.DISTILL,
                                               "dtype": "fp32"}


def test_flash_attn_providers_pass_their_layout_and_skip_when_absent(monkeypatch):
    """The flash-attn package's FA2 and FA3 functions take [B, T, H, D]: a stand-in that checks
    that layout (and computes with SDPA) must give SDPA's output and gradients on [B, H, T, D];
    fp32 is refused by name (they have no fp32 kernel); a missing package is a skipped row."""
    def fake_flash_attn_func(q, k, v, causal=False):
        assert q.shape == (2, 9, 3, 16) and q.stride(-1) == 1, (q.shape, q.stride())  # [B, T, H, D]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=causal).transpose(1, 2)
        return out, torch.zeros(1)  # FA3 returns (out, lse) in some versions
    fake = types.SimpleNamespace(flash_attn_func=fake_flash_attn_func)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", fake)
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    torch.manual_seed(0)
    q, k, v = (kernels.randn(2, 3, 9, 16, device="cpu", dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    builders = kernels.attention_providers(q, k, v)
    f, inputs = builders["flash-attn-3"]()
    do = torch.randn(2, 3, 9, 16, dtype=torch.bfloat16)
    got = f()
    got_grads = torch.autograd.grad(got, inputs, do)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    want_grads = torch.autograd.grad(want, [q, k, v], do)
    assert got.shape == want.shape and torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(got_grads, want_grads))
    work = lambda m: {"flops": common.attention_flops(2, 3, 9, 9, 16, True, m)}  # noqa: E731
    rows = kernels.bench_providers("attention", {"seq_len": 9}, builders, ("fwd",), quick_timer(),
                                   Budget(None), work, providers=("flash-attn", "flash-attn-3"))
    by = {r["provider"]: r for r in rows}
    assert by["flash-attn"]["status"].startswith("skipped: flash_attn"), by["flash-attn"]["status"]
    assert by["flash-attn-3"]["status"] == "ok" and by["flash-attn-3"]["tflops"] > 0
    q32 = q.detach().float()
    rows = kernels.bench_providers("attention", {"seq_len": 9}, kernels.attention_providers(q32, q32, q32),
                                   ("fwd",), quick_timer(), Budget(None), work, providers=("flash-attn-3",))
    assert rows[0]["status"] == "skipped: flash_attn_interface.flash_attn_func takes fp16/bf16 only, not fp32"


def test_failing_provider_and_time_budget_give_rows():
    torch.manual_seed(0)
    q, k, v = (kernels.randn(1, 2, 8, 16, device="cpu", dtype=torch.float32) for _ in range(3))
    builders = kernels.attention_providers(q, k, v)
    work = lambda m: {"flops": common.attention_flops(1, 2, 8, 8, 16, True, m)}  # noqa: E731
    # CPU tensors have no cuDNN attention: a failed row, not a crash; SDPA's CPU flash kernel runs.
    rows = kernels.bench_providers("attention", {"seq_len": 8}, builders, ("fwd",), quick_timer(),
                                   Budget(None), work, providers=("sdpa-cudnn", "sdpa-flash"))
    by = {r["provider"]: r for r in rows}
    assert by["sdpa-cudnn"]["status"].startswith("failed: RuntimeError")
    assert by["sdpa-flash"]["status"] == "ok" and by["sdpa-flash"]["tflops"] > 0
    rows = kernels.bench_providers("attention", {"seq_len": 8}, builders, ("fwd", "bwd"), quick_timer(),
                                   Budget(0), work, providers=("reference",))
    assert [r["status"] for r in rows] == ["skipped: time budget (--max-minutes)"] * 2


def test_run_kernels_end_to_end_on_cpu():
    # The whole sweep machinery at toy sizes (CPU timer, eager providers only): ceilings, rows
    # for every op/size/mode, percent of ceiling, saved-activation rows, sorted output.
    rows, ceil = kernels.run_kernels(
        quick_timer(), Budget(None), torch.float32, providers=("reference", "torch", "sdpa-flash"),
        sizes=dict(ln_rows=8, ln_widths=(40, 24), mlp_rows=8, mlp_widths=(8,), attn_seqlens=(32, 16),
                   attn_head_dims=(8,), attn_tokens=32, attn_width=16, attn_window=20, ce_rows=8, ce_vocabs=(30,),
                   head_widths=(12,), rope_tokens=32, rope_seq_len=16, rope_heads=(2, 3), rope_head_dim=8,
                   gqa_seqlens=(16,), gqa_heads=((4, 2, 8),),
                   rope_partial_heads=((2, 2, 8, 4, 1.0), (4, 2, 16, 12, 1.5)), moe_shapes=((12, 3, 2, 8, 16),),
                   decode_batches=(1,), decode_seqlens=(16,), decode_heads=((4, 2, 8),), matmul_widths=(8,),
                   int8_rows=(1, 4), int8_shapes=((16, 8),), lora_shapes=((3, 1, 16, 8, 5, 2), (2, 3, 16, 8, 5, 2)),
                   token_mask_batches=(2,), token_mask_vocabs=(70,), sampling_batches=(2,), sampling_vocabs=(70,),
                   sink_seqlens=(16,), sink_heads=((4, 2, 8),), sink_windows=(8, 0)),
        ceiling_sizes=dict(copy_bytes=1 << 16, matmul_n=32, dtype=torch.float32), log=lambda s: None)
    assert ceil["copy"]["gbps"] > 0 and ceil["matmul"]["tflops"] > 0
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows if r["status"] != "ok"]
    timed = [r for r in rows if r["mode"] != "saved"]
    # layernorm, mlp, attention, cross_entropy, lm_head_loss, documents (reference), a window of 20 (reference,
    # T=32 only: at 16 it would be causal attention), residual add + layernorm, lm_head_loss with label
    # smoothing and z-loss, lm_head_loss on soft-capped logits, rope at 2 and 3 heads (reference),
    # grouped-query attention (reference, sdpa-flash), rmsnorm and residual add + rmsnorm at 2 widths,
    # the SwiGLU MLP and the GeGLU one (reference), soft-capped attention at T 32 and 16 (reference), the exact-GELU
    # MLP (reference, torch), partial rotary at 2 shapes (reference), lm_head_loss with a head bias, ALiBi attention
    # at T 32 and 16 (reference), the mixture-of-experts MLP (reference), both LM heads + distillation (reference),
    # a decode step (reference, sdpa-flash; forward only), the MLP's 5 matmuls (torch; forward only), the int8 linear
    # with a scale a row and with group scales, and the int4 one, at 2 row counts (reference, torch; forward only),
    # the LoRA delta at 2 shapes (torch; fwd only), the token mask's 2 masks (torch; fwd only; fp32 is the run's
    # dtype), sampling's 4 settings (torch; fwd only), RL's log-probs and entropies (torch), attention with sinks over
    # a window and causal (reference)
    assert len(timed) == (2 * 2 * 3 + 1 * 2 * 3 + 2 * 2 * 3 + 1 * 2 * 3 + 1 * 2 * 3 + 2 * 3 + 3 + 2 * 2 * 3 + 1 * 2 * 3
                          + 1 * 2 * 3 + 2 * 3 + 2 * 3 + 2 * 2 * 3 + 2 * 2 * 3 + 3 + 3 + 2 * 3 + 2 * 3 + 2 * 3
                          + 1 * 2 * 3 + 2 * 3 + 3 + 3 + 2 + 5 + 2 * 2 * 2 + 2 * 2 + 2 + 2 + 4 + 3 + 2 * 3)
    assert {(r["provider"], r["mode"], r["config"]["vocab"]) for r in timed if r["op"] == "rl_logprobs"} == {
        ("torch", m, 30) for m in ("fwd", "bwd", "fwd+bwd")}
    banned = [r for r in timed if r["op"] == "token_mask"]
    assert [(r["provider"], r["config"]["mask"], r["config"]["dtype"]) for r in banned] == \
        [("torch", "random", "fp32"), ("torch", "json-string", "fp32")]
    # bytes: the 2 x 3 words, then at most every logit banned, in fp32
    assert all(24 < r["bytes"] <= 24 + 2 * 70 * 4 for r in banned)
    drawn = [r for r in timed if r["op"] == "sampling"]
    assert [(r["provider"], r["config"]["setting"], r["config"]["B"]) for r in drawn] == \
        [("torch", s, 2) for s in kernels.SAMPLING_SETTINGS]
    # a rate in tokens (2 a call), no bytes or FLOPs: no percent of a ceiling
    assert all(r["tokens_per_s"] == 2000 / r["ms"] and "bytes" not in r and "flops" not in r for r in drawn)
    assert [(r["provider"], r["config"]["B"], r["config"]["T"], r["flops"], r["bytes"]) for r in timed
            if r["op"] == "lora"] == [("torch", b, t, 2 * b * t * 5 * (16 + 8),
                                       (b * t * 16 + 2 * b * t * 8 + 2 * 5 * 24) * 4) for b, t in ((3, 1), (2, 3))]
    # int8: a scale a row, then group scales (K 16: G 128 does not divide it, so the group is 16, one a row)
    assert sorted((r["provider"], r["mode"], r["config"]["M"], r["config"].get("G", 0), r["flops"], r["bytes"])
                  for r in timed if r["op"] == "int8_linear") == sorted(
        (p, "fwd", m, g, 2 * m * 8 * 16, 8 * 16 + 4 * 8 + (m * 16 + m * 8) * 4)
        for g in (0, 16) for m in (1, 4) for p in ("reference", "torch"))
    assert sorted((r["provider"], r["config"]["window"], r["config"]["kv_heads"], r["config"]["sinks"], r["mode"])
                  for r in timed if r["op"] == "sink_attention") == sorted(
        ("reference", w, 2, True, m) for w in (8, 0) for m in ("fwd", "bwd", "fwd+bwd"))
    # K 16: G 128 does not divide it, so the group is 16 (one a row)
    assert [(r["provider"], r["mode"], r["config"]["M"], r["config"]["G"], r["flops"], r["bytes"]) for r in timed
            if r["op"] == "int4_linear"] == [(p, "fwd", m, 16, 2 * m * 8 * 16, 8 * 8 + 8 * 8 + (m * 16 + m * 8) * 4)
                                             for m in (1, 4) for p in ("reference", "torch")]
    assert [(r["provider"], r["mode"], r["config"]["layout"], r["config"]["product"], r["config"]["M"],
             r["config"]["N"], r["config"]["K"], r["flops"]) for r in timed if r["op"] == "matmul"] == \
        [("torch", "fwd", layout, product, m, n, k, 2 * m * n * k)
         for layout, product, m, n, k in (("NN", "dx", 8, 8, 32), ("NN-copy", "fc2", 8, 8, 32), ("NT", "fc1", 8, 32, 8),
                                          ("NT", "fc2", 8, 8, 32), ("TN", "dW1", 32, 8, 8))]  # sorted by layout
    assert [(r["provider"], r["mode"], r["config"]["kv_heads"], r["bytes"]) for r in timed
            if r["op"] == "decode_attention"] == [("reference", "fwd", 2, 2 * 2 * 16 * 8 * 4),
                                                  ("sdpa-flash", "fwd", 2, 2 * 2 * 16 * 8 * 4)]
    assert [(r["provider"], r["config"]["width"], r["config"]["vocab"], r["config"]["beta"], r["flops"])
            for r in timed if r["op"] == "lm_head_distill"] == \
        [("reference", 12, 30, 0.5, m * 2 * 8 * 12 * 30) for m in (2, 2, 4)]  # the teacher's matmul in forward
    assert [(r["provider"], r["config"]["rows"], r["config"]["experts"], r["config"]["top_k"], r["config"]["width"],
             r["config"]["hidden"], r["flops"]) for r in timed if r["op"] == "moe_mlp"] == \
        [("reference", 12, 3, 2, 8, 16, m * 3 * 2 * 24 * 8 * 16) for m in (1, 2, 3)]
    assert [(r["provider"], r["config"]["width"]) for r in timed if r["op"] == "mlp_exact_gelu"] == \
        [("reference", 8)] * 3 + [("torch", 8)] * 3
    assert [(r["config"]["heads"], r["config"]["kv_heads"], r["config"]["head_dim"], r["config"]["rotary_dim"],
             r["config"]["mscale"]) for r in timed if r["op"] == "rope_partial"] == \
        [(2, 2, 8, 4, 1.0)] * 3 + [(4, 2, 16, 12, 1.5)] * 3
    assert [(r["config"]["seq_len"], r["config"]["head_dim"], r["config"]["softcap"]) for r in timed
            if r["op"] == "softcap_attention"] == [(16, 8, 50.0)] * 3 + [(32, 8, 50.0)] * 3
    assert [(r["provider"], r["config"]["seq_len"], r["config"]["alibi"]) for r in timed
            if r["op"] == "alibi_attention"] == [("reference", 16, True)] * 3 + [("reference", 32, True)] * 3
    assert {r["config"]["width"] for r in timed if r["op"] in ("rmsnorm", "add_rmsnorm")} == {40, 24}
    for op in ("swiglu", "geglu"):
        assert [(r["config"]["width"], r["config"]["hidden"]) for r in timed if r["op"] == op] == [(8, 64)] * 3
    assert [(r["config"]["batch"], r["config"]["heads"]) for r in timed if r["op"] == "rope"] == \
        [(2, 2)] * 3 + [(2, 3)] * 3
    assert {(r["config"]["heads"], r["config"]["kv_heads"], r["config"]["head_dim"]) for r in timed
            if r["op"] == "gqa_attention"} == {(4, 2, 8)}
    assert {(r["config"]["seq_len"], r["config"]["window"]) for r in timed if r["op"] == "window_attention"} == \
        {(32, 20)}
    assert [(r["config"]["label_smoothing"], r["config"]["z_loss"]) for r in timed
            if r["op"] == "lm_head_loss_smooth_z"] == [(0.1, 1e-4)] * 6
    assert [r["config"]["softcap"] for r in timed if r["op"] == "lm_head_loss_softcap"] == [30.0] * 6
    assert [(r["provider"], r["config"]["head_bias"], r["config"]["width"], r["config"]["vocab"]) for r in timed
            if r["op"] == "lm_head_loss_bias"] == [("reference", True, 12, 30)] * 3 + [("torch", True, 12, 30)] * 3
    assert {r["config"]["documents"] for r in timed if r["op"] == "doc_attention"} == {8}
    assert [r["config"]["width"] for r in timed[:6]] == [24] * 6  # sorted by size
    att = [r for r in timed if r["op"] == "attention"]
    assert [r["config"]["seq_len"] for r in att][:6] == [16] * 6
    assert att[0]["config"]["batch"] == 2 and att[0]["config"]["heads"] == 2
    for r in (r for r in timed if r["op"] != "sampling"):
        by_bytes = r["op"] in ("layernorm", "add_layernorm", "cross_entropy", "rope", "rmsnorm", "add_rmsnorm",
                               "rope_partial", "decode_attention", "token_mask", "rl_logprobs")
        key = "pct_of_copy_bw" if by_bytes else "pct_of_matmul"
        assert r[key] > 0
    assert {r["provider"] for r in rows if r["mode"] == "saved"} == {"reference", "torch"}
    assert [r["provider"] for r in rows if r["mode"] == "saved" and r["op"] == "swiglu"] == ["reference"]
    assert [r["provider"] for r in rows if r["mode"] == "saved" and r["op"] == "geglu"] == ["reference"]
    assert [r["provider"] for r in rows if r["mode"] == "saved" and r["op"] == "mlp_exact_gelu"] == \
        ["reference", "torch"]
    assert [r["provider"] for r in rows if r["mode"] == "saved" and r["op"] == "moe_mlp"] == ["reference"]


def test_target_configurations_are_measured_first_and_exactly_once():
    """A time budget that runs out must leave the wider sweep short, not the issue's targets:
    the targets' configurations (every provider, torch.compile too) come first, the rest after,
    and together they are the whole sweep with nothing twice."""
    import itertools

    full = kernels.FULL_SIZES
    first, rest = kernels._sweep_plan(full, "targets"), kernels._sweep_plan(full, "rest")
    assert first["layernorm"] == [(768,)] and first["attention"] == [((1024,), (64,))]
    assert first["cross_entropy"] == [] and rest["cross_entropy"] == [full["ce_vocabs"]]
    assert first["lm_head_loss_smooth_z"] == [] and rest["lm_head_loss_smooth_z"] == [full["head_widths"]]
    assert first["lm_head_loss_softcap"] == [] and rest["lm_head_loss_softcap"] == [full["head_widths"]]
    for op in ("doc_attention", "window_attention"):  # after the targets, at the first head dim only
        assert first[op] == [] and rest[op] == [(full["attn_seqlens"], full["attn_head_dims"][:1])]
    assert first["gqa_attention"] == [] and rest["gqa_attention"] == [(full["gqa_seqlens"], full["gqa_heads"])]
    for op in ("rmsnorm", "add_rmsnorm"):  # LayerNorm's widths, after every target
        assert first[op] == [] and rest[op] == [full["ln_widths"]]
    for op in ("swiglu", "geglu"):
        assert first[op] == [] and rest[op] == [full["mlp_widths"]] == [(768, 1024, 1280, 1600)]
    assert first["softcap_attention"] == [] and rest["softcap_attention"] == [(full["attn_seqlens"],
                                                                                full["attn_head_dims"])]
    assert first["mlp_exact_gelu"] == [] and rest["mlp_exact_gelu"] == [full["mlp_widths"]]
    assert first["rope_partial"] == [] and rest["rope_partial"] == [full["rope_partial_heads"]]
    assert first["lm_head_loss_bias"] == [] and rest["lm_head_loss_bias"] == [full["head_widths"]]
    assert first["alibi_attention"] == [] and rest["alibi_attention"] == [(full["attn_seqlens"],
                                                                            full["attn_head_dims"])]
    assert first["moe_mlp"] == [] and rest["moe_mlp"] == [full["moe_shapes"]] == [((4096, 8, 2, 1024, 3584),)]
    assert first["lm_head_distill"] == [] and rest["lm_head_distill"] == [full["head_widths"]]
    assert first["decode_attention"] == [] and rest["decode_attention"] == [((1, 8), (1024, 4096, 16384), (
        (32, 32, 64), (32, 32, 128), (32, 8, 128)))]
    assert first["matmul"] == [] and rest["matmul"] == [(768, 1600)] and full["mlp_rows"] == 16384
    assert first["int8_linear"] == [] and rest["int8_linear"] == [((1, 16, 4096), ((768, 3072), (3072, 768),
                                                                                   (4096, 14336)))]
    assert first["int4_linear"] == [] and rest["int4_linear"] == rest["int8_linear"]
    assert first["lora"] == [] and rest["lora"] == [((32, 1, 768, 3072, 16, 4), (4, 512, 768, 3072, 16, 4))]
    assert first["token_mask"] == [] and rest["token_mask"] == [((1, 8, 64, 256), (50257, 151936))]
    assert first["sampling"] == [] and rest["sampling"] == [((1, 8, 64, 256), (50257, 151936))]
    assert full["gqa_heads"] == ((32, 8, 128), (12, 1, 64), (4, 1, 256))
    assert full["gqa_seqlens"] == (512, 1024, 2048, 4096, 8192)
    for op, key in (("layernorm", "ln_widths"), ("mlp", "mlp_widths")):
        done = [w for plan in (first, rest) for args in plan[op] for w in args]
        assert sorted(done) == sorted(full[key])
    attn = [c for plan in (first, rest) for seqs, dims in plan["attention"] for c in itertools.product(seqs, dims)]
    assert sorted(attn) == sorted(itertools.product(full["attn_seqlens"], full["attn_head_dims"]))
    lines = []
    kernels.run_kernels(quick_timer(), Budget(None), torch.float32, ops=("layernorm",), providers=("torch",),
                        sizes=dict(ln_rows=4, ln_widths=(24, 768)),
                        ceiling_sizes=dict(copy_bytes=1 << 12, matmul_n=16, dtype=torch.float32), log=lines.append)
    assert [ln.split(":")[0] for ln in lines[1:]] == ["layernorm (targets)", "layernorm (rest)"]
    assert "[768]" in lines[1] and "[24]" in lines[2]


def test_saved_activation_bytes_match_hand_count():
    m, c = 8, 16
    torch.manual_seed(0)
    x = kernels.randn(m, c, device="cpu", dtype=torch.float32)
    w1 = kernels.randn(4 * c, c, device="cpu", dtype=torch.float32)
    b1 = kernels.randn(4 * c, device="cpu", dtype=torch.float32)
    w2 = kernels.randn(c, 4 * c, device="cpu", dtype=torch.float32)
    b2 = kernels.randn(c, device="cpu", dtype=torch.float32)
    rows = kernels.mlp_saved_rows({"width": c}, kernels.mlp_providers(x, w1, b1, w2, b2),
                                  providers=("reference", "torch"))
    got = {r["provider"]: r["saved_bytes"] for r in rows}
    # torch: x, fc1 output h, gelu(h). reference GELU also keeps tanh(.), 0.5*h and 1+tanh(.).
    assert got["torch"] == (m * c + 2 * m * 4 * c) * 4
    assert got["reference"] == (m * c + 5 * m * 4 * c) * 4


def test_swiglu_flops_and_saved_bytes_match_hand_count():
    """swiglu's FLOPs: three [c, hidden] matmuls forward, twice that backward. Its saved rows: the
    reference keeps x, g, silu(g), u and a; ours x, g and u (bias-free, fp32)."""
    from tritongpt.bench.common import swiglu_flops

    assert swiglu_flops(16384, 768, 2048, "fwd") == 3 * 2 * 16384 * 768 * 2048
    assert swiglu_flops(16384, 768, 2048, "fwd+bwd") == 3 * swiglu_flops(16384, 768, 2048, "fwd")
    m, c, h = 8, 16, 40
    torch.manual_seed(0)
    ws = [kernels.randn(*s, device="cpu", dtype=torch.float32) for s in ((m, c), (h, c), (h, c), (c, h))]
    rows = kernels.mlp_saved_rows({"width": c}, kernels.swiglu_providers(*ws), providers=("reference", "triton"),
                                  op="swiglu")
    got = {r["provider"]: r["saved_bytes"] for r in rows}
    assert {r["op"] for r in rows} == {"swiglu"}
    assert got["reference"] == (m * c + 4 * m * h) * 4
    assert got["triton"] == (m * c + 2 * m * h) * 4
    liger = kernels.mlp_saved_rows({"width": c}, kernels.swiglu_providers(*ws), providers=("liger",), op="swiglu")
    assert liger[0]["status"] == "ok" or liger[0]["status"].startswith("skipped:")
    # GeGLU's the same: F.gelu keeps its input g as F.silu does
    rows = kernels.mlp_saved_rows({"width": c}, kernels.swiglu_providers(*ws, "gelu"),
                                  providers=("reference", "triton"), op="geglu")
    got = {r["provider"]: r["saved_bytes"] for r in rows}
    assert {r["op"] for r in rows} == {"geglu"}
    assert (got["reference"], got["triton"]) == ((m * c + 4 * m * h) * 4, (m * c + 2 * m * h) * 4)


def test_moe_mlp_providers_agree_and_ours_saves_less():
    """moe_mlp's three providers (the eager loop, the loop through swiglu_mlp, the grouped kernel: both Triton
    ones in the interpreter) give one output and one gradient for x, the routing weights and each expert
    weight, on a routing that leaves an expert idle; the sweep times all three, FLOPs swiglu's on N k rows;
    the kernel saves x, g and u (the loop's eager experts keep x's gathered rows, g, silu(g), u and a)."""
    torch.manual_seed(0)
    n, e, k, c, h = 11, 4, 2, 8, 24
    x, wg, wu, wd = (kernels.randn(*s, device="cpu", dtype=torch.float32) for s in ((n, c), (e, h, c), (e, h, c),
                                                                                     (e, c, h)))
    experts = torch.stack([torch.randperm(e - 1)[:k] for _ in range(n)])  # expert e - 1 gets no token
    weights = torch.rand(n, k).requires_grad_()
    builders = kernels.moe_providers(x, experts, weights, wg, wu, wd)
    dout = torch.randn(n, c)
    results = {}
    for name, build in builders.items():
        forward, leaves = build()
        for t in leaves:
            t.grad = None
        y = forward()
        y.backward(dout)
        results[name] = [y.detach()] + [t.grad.clone() for t in leaves]
    for name in ("swiglu-loop", "triton"):
        for got, want in zip(results[name], results["reference"]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(results["triton"][2][e - 1], torch.zeros(h, c))  # the idle expert's dW_gate
    rows = kernels.sweep_moe_mlp(quick_timer(), Budget(None), ((n, e, k, c, h),), torch.float32,
                                 modes=("fwd+bwd",))
    timed = {r["provider"]: r for r in rows if r["mode"] == "fwd+bwd"}
    assert set(timed) == {"reference", "swiglu-loop", "triton"} and all(r["status"] == "ok" for r in rows)
    assert all(r["flops"] == 3 * 3 * 2 * n * k * c * h for r in timed.values())
    saved = {r["provider"]: r["saved_bytes"] for r in rows if r["mode"] == "saved"}
    assert saved["triton"] < saved["reference"]


def test_geglu_providers_run_gemmas_mlp(monkeypatch):
    """The geglu op's providers compute w_down(gelu_tanh(w_gate x) * w_up x), written out here in
    float64: the reference module and ours; swiglu's give silu's. Liger's kernels do not run in
    Triton's interpreter: its provider is checked to build Liger's GeGLU class, with transformers'
    name for gelu_tanh and our weights (a stand-in class where liger_kernel is not installed)."""
    import math

    real_import, asked = kernels.try_import, []

    def try_import(module, name):
        if not module.startswith("liger_kernel"):
            return real_import(module, name)
        asked.append((module, name))

        class Stand(torch.nn.Module):  # LigerGEGLUMLP's constructor: a config, three bias-free Linears
            def __init__(self, config):
                super().__init__()
                h, i = config.hidden_size, config.intermediate_size
                self.gate_proj, self.up_proj = (torch.nn.Linear(h, i, bias=False) for _ in range(2))
                self.down_proj = torch.nn.Linear(i, h, bias=False)

        class Recording(real_import(module, name)[0] or Stand):
            def __init__(self, config):
                asked.append(config.hidden_act)
                super().__init__(config)
        return Recording, None

    monkeypatch.setattr(kernels, "try_import", try_import)

    m, c, h = 6, 16, 40
    torch.manual_seed(1)
    x, wg, wu, wd = (kernels.randn(*s, device="cpu", dtype=torch.float32) for s in ((m, c), (h, c), (h, c), (c, h)))
    g, u = x.double() @ wg.double().T, x.double() @ wu.double().T
    gelu = 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3)))
    want = {"gelu": (gelu * u) @ wd.double().T, "silu": (g * torch.sigmoid(g) * u) @ wd.double().T}
    for act, y64 in want.items():
        for name, build in kernels.swiglu_providers(x, wg, wu, wd, act).items():
            if name == "compile":
                continue
            try:
                forward, leaves = build()
            except kernels.Unavailable:
                continue
            if name == "liger":
                assert all(torch.equal(p, w) for p, w in zip(leaves[1:], (wg, wu, wd))), act
                continue
            y = forward().detach().double()
            assert ((y - y64).norm() / y64.norm()).item() < 1e-5, (act, name)
    assert asked == [("liger_kernel.transformers.geglu", "LigerGEGLUMLP"), "gelu_pytorch_tanh",
                     ("liger_kernel.transformers.swiglu", "LigerSwiGLUMLP"), "silu"]


def test_mlp_exact_gelu_providers_run_the_erf_gelu(device):
    """mlp_exact_gelu's providers compute fc2(x Phi(x)) of fc1, the exact erf GELU written out here in float64,
    closer to it by far than to GPT-2's tanh form (a provider left on tanh would fail); its rows are mlp's sizes
    and FLOPs under their own op, saved rows included (ours keeps x and h only)."""
    m, c = 6, 16
    torch.manual_seed(2)
    x = kernels.randn(m, c, device=device, dtype=torch.float32)
    w1 = kernels.randn(4 * c, c, device=device, dtype=torch.float32, scale=0.5)  # h of spread ~2: the forms differ
    b1, b2 = (kernels.randn(n, device=device, dtype=torch.float32, scale=0.1) for n in (4 * c, c))
    w2 = kernels.randn(c, 4 * c, device=device, dtype=torch.float32, scale=(4 * c) ** -0.5)
    h = x.double() @ w1.double().T + b1.double()
    erf = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    tanh = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    want, tanh_y = ((a @ w2.double().T + b2.double()) for a in (erf, tanh))
    assert ((want - tanh_y).norm() / want.norm()).item() > 1e-4  # the two GELUs' MLPs tell apart here
    builders = kernels.mlp_providers(x, w1, b1, w2, b2, "none")
    assert set(builders) == set(kernels.PROVIDERS["mlp_exact_gelu"])
    for name, build in builders.items():
        if name == "compile":
            continue  # inductor's CPU compiler takes minutes here; it compiles the reference module
        y = build()[0]().detach().double()
        assert ((y - want).norm() / want.norm()).item() < 2e-6, name
    rows = kernels.sweep_mlp_exact_gelu(quick_timer(), Budget(None), 8, (8,), torch.float32, modes=("fwd",),
                                        providers=("reference", "torch", "triton"))
    assert {r["op"] for r in rows} == {"mlp_exact_gelu"} and all(r["status"] == "ok" for r in rows)
    assert [(r["provider"], r["config"]["width"], r["config"]["hidden"], r.get("flops")) for r in rows
            if r["mode"] == "fwd"] == [(p, 8, 32, common.mlp_flops(8, 8, "fwd"))
                                       for p in ("reference", "torch", "triton")]
    saved = {r["provider"]: r["saved_bytes"] for r in rows if r["mode"] == "saved"}
    # the reference's erf GELU keeps x and four [M, 4C] tensors (erf's input, 0.5 h, 1 + erf, a), the tanh form
    # five (test_saved_activation_bytes_match_hand_count): the sweep built the erf one
    assert saved == {"reference": (8 * 8 + 4 * 8 * 32) * 4, "torch": (8 * 8 + 2 * 8 * 32) * 4,
                     "triton": (8 * 8 + 8 * 32) * 4}


# -- the SDPA swap used by the reference+compile+sdpa baseline --------------------------------------
@pytest.mark.parametrize("window", [0, 4])
def test_use_sdpa_attention_matches_reference_with_and_without_cache(window):
    """window 4: a model with local attention in its odd layers (the SDPA swap once attended over
    the whole context there)."""
    from tritongpt.model.config import get_config
    from tritongpt.model.gpt import GPTModel

    torch.manual_seed(0)
    cfg = get_config("tiny", n_layer=2, context_length=24, attention_window=window, window_layers="odd")
    ref = GPTModel(cfg).eval()
    sdpa = train_step.use_sdpa_attention(GPTModel(cfg).eval())
    sdpa.load_state_dict(ref.state_dict())
    idx = torch.randint(0, cfg.vocab_size, (2, 13))
    with torch.no_grad():
        a, b = ref(idx), sdpa(idx)
        assert ((a - b).norm() / a.norm()).item() < 1e-5
        ca, cb = ref.new_cache(2), sdpa.new_cache(2)  # prefill, then 2 tokens against the prefix
        ref(idx[:, :9], ca), sdpa(idx[:, :9], cb)
        a, b = ref(idx[:, 9:11], ca), sdpa(idx[:, 9:11], cb)
        assert ((a - b).norm() / a.norm()).item() < 1e-5
        # a CUDA-graph decode step's forward (KVCache.on_device: the whole buffers, NaN past the fill, and kv_len)
        cb.k[:, :, :, 11:] = float("nan")
        cb.v[:, :, :, 11:] = float("nan")
        cb.fill.fill_(cb.pos)
        cb.on_device = True
        a, b = ref(idx[:, 11:12], ca), sdpa(idx[:, 11:12], cb)
        cb.on_device = False
        assert ((a - b).norm() / a.norm()).item() < 1e-5
        # packed documents; in the first row an id seen before opens a third (A B A: runs, not ids)
        doc_ids = torch.tensor([[0] * 5 + [1] * 4 + [0] * 4, [0] * 12 + [1]])
        a, b = ref(idx, doc_ids=doc_ids), sdpa(idx, doc_ids=doc_ids)
        assert ((a - b).norm() / a.norm()).item() < 1e-5 and (a - ref(idx)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="no MultiHeadAttention"):
        train_step.use_sdpa_attention(torch.nn.Linear(2, 2))


def test_parse_provider():
    assert train_step.parse_provider("reference+compile+sdpa") == ("reference", {"compile", "sdpa"})
    assert train_step.parse_provider("triton") == ("triton", set())
    assert train_step.parse_provider("triton+compile+ckpt") == ("triton", {"compile", "ckpt"})
    assert train_step.parse_provider("triton+lora") == ("triton", {"lora"})
    assert train_step.parse_provider("triton+qlora") == ("triton", {"qlora"})
    for bad in ("eager", "reference+fast", "triton+sdpa", "reference+compile+compile", "triton+lora+qlora"):
        with pytest.raises(ValueError):
            train_step.parse_provider(bad)


def test_train_provider_on_cpu(monkeypatch):
    row = train_step.bench_train_provider("reference", "tiny", 2, 16, torch.device("cpu"), torch.float32,
                                          warmup_steps=1, steps=2, peak_flops=1e12)
    assert row["status"] == "ok", row["status"]
    assert row["tokens_per_s"] == pytest.approx(2 * 16 / (row["ms"] * 1e-3))
    assert row["mfu"] == pytest.approx(row["flops_per_token"] * row["tokens_per_s"] / 1e12)
    assert math.isfinite(row["final_loss"])
    # +ckpt: the same steps (same weights, batch and losses), the blocks recomputed in backward
    ckpt = train_step.bench_train_provider("reference+ckpt", "tiny", 2, 16, torch.device("cpu"), torch.float32,
                                           warmup_steps=1, steps=2, peak_flops=1e12)
    assert ckpt["status"] == "ok" and ckpt["final_loss"] == pytest.approx(row["final_loss"], rel=1e-6)
    # HFU counts the blocks' forward once more: per layer 12C^2 + 13C parameters (qkv 3C^2+3C,
    # out C^2+C, fc 4C^2+4C, proj 4C^2+C, two LayerNorms 4C) at 2 FLOPs each, plus 4*C*T for the
    # scores and the weighted sum; MFU stays the model's FLOPs. tiny: C = 128, 4 layers, T = 16.
    C, L, T = 128, 4, 16
    assert ckpt["flops_per_token"] == row["flops_per_token"]
    assert ckpt["hw_flops_per_token"] == row["flops_per_token"] + L * (2 * (12 * C * C + 13 * C) + 4 * C * T)
    assert ckpt["hfu"] == pytest.approx(ckpt["hw_flops_per_token"] * ckpt["tokens_per_s"] / 1e12)
    assert ckpt["note"] == f"HFU {100 * ckpt['hfu']:.1f}% counting the recomputed forward"
    assert row["hfu"] == row["mfu"] and row["hw_flops_per_token"] == row["flops_per_token"] and "note" not in row
    # +lora: the same model FLOPs (the merged weights do the matmuls), a step that trains A and B only
    lora = train_step.bench_train_provider("reference+lora", "tiny", 2, 16, torch.device("cpu"), torch.float32,
                                           warmup_steps=1, steps=2, peak_flops=1e12)
    assert lora["status"] == "ok" and lora["flops_per_token"] == row["flops_per_token"]
    # the frozen head (tiny: C = 128, V = 4096) gets no weight gradient: HFU counts 2 C V fewer a token
    assert lora["hw_flops_per_token"] == row["flops_per_token"] - 2 * C * 4096
    assert lora["note"] == f"HFU {100 * lora['hfu']:.1f}% counting no LM-head weight gradient"
    assert lora["config"]["n_params_non_embedding"] == row["config"]["n_params_non_embedding"]
    assert math.isfinite(lora["final_loss"]) and lora["final_loss"] != row["final_loss"]
    # +qlora: LoRA on the int4 base; the same model FLOPs (the int4 matrices count as the weights they stand for),
    # and no weight gradient for the 4 layers' 12 C^2 int4 matrix weights either: HFU counts 2 * that fewer too
    qlora = train_step.bench_train_provider("reference+qlora", "tiny", 2, 16, torch.device("cpu"), torch.float32,
                                            warmup_steps=1, steps=2, peak_flops=1e12)
    assert qlora["status"] == "ok" and qlora["flops_per_token"] == row["flops_per_token"]
    assert qlora["config"]["n_params_non_embedding"] == row["config"]["n_params_non_embedding"]
    assert qlora["hw_flops_per_token"] == row["flops_per_token"] - 2 * C * 4096 - 2 * L * 12 * C * C
    assert qlora["note"] == (f"HFU {100 * qlora['hfu']:.1f}% counting no weight gradient of the LM head or the int4 "
                             "matrices")
    assert math.isfinite(qlora["final_loss"]) and qlora["final_loss"] not in (row["final_loss"], lora["final_loss"])
    # fp16 steps as the trainers take them: the loss scaled by GradScaler, whose step skips overflows
    scaled = []
    real_step = torch.amp.GradScaler.step
    monkeypatch.setattr(torch.amp.GradScaler, "step", lambda self, opt: (scaled.append(1), real_step(self, opt))[1])
    half = train_step.bench_train_provider("reference", "tiny", 2, 16, torch.device("cpu"), torch.float16,
                                           warmup_steps=1, steps=2)
    assert half["status"] == "ok" and half["config"]["dtype"] == "fp16" and len(scaled) == 3  # warm-up + 2 timed
    assert half["final_loss"] == pytest.approx(row["final_loss"], rel=1e-2)
    monkeypatch.setitem(sys.modules, "tritongpt.kernels.attention", None)
    row = train_step.bench_train_provider("triton", "tiny", 2, 16, torch.device("cpu"), torch.float32, 1, 1)
    assert row["status"].startswith("skipped: tritongpt.kernels.attention")


def test_run_train_respects_the_time_budget(monkeypatch):
    import time as _time

    def fake(name, model_name, batch, seq_len, *a, **k):
        _time.sleep(0.2)
        return make_row("train", "step", name, {"model": model_name}, "fwd+bwd", ms=1.0, tokens_per_s=1.0)

    monkeypatch.setattr(train_step, "bench_train_provider", fake)
    rows = train_step.run_train(torch.device("cpu"), Budget(0.5), models=("tiny", "mini"),
                                providers=("reference", "triton"), log=lambda s: None)
    status = [(r["config"]["model"], r["status"]) for r in rows]
    assert status[:2] == [("tiny", "ok"), ("tiny", "ok")]
    # mini has 6 layers to tiny's 4: ~0.3 s expected per provider, ~0.1 s left -> not started
    assert all(m == "mini" and st.startswith("skipped: time budget") for m, st in status[2:])
    rows = train_step.run_train(torch.device("cpu"), Budget(0), models=("tiny",), providers=("reference",),
                                log=lambda s: None)
    assert rows[0]["status"] == "skipped: time budget (--max-minutes)"
    # a compiled provider never measured is not started with less than its minimum left
    monkeypatch.setattr(train_step, "COMPILE_MIN_S", 5.0)
    rows = train_step.run_train(torch.device("cpu"), Budget(3.0), models=("tiny",),
                                providers=("reference", "triton+compile", "triton"), log=lambda s: None)
    assert [r["status"][:40] for r in rows] == [
        "ok", "skipped: time budget (a first compiled r", "ok"]
    # ... and one measured compiled provider sets what the next is expected to cost
    monkeypatch.setattr(train_step, "COMPILE_MIN_S", 0.05)
    rows = train_step.run_train(torch.device("cpu"), Budget(0.3), models=("tiny",),
                                providers=("reference+compile+sdpa", "triton+compile"), log=lambda s: None)
    assert rows[0]["status"] == "ok" and rows[1]["status"].startswith(
        "skipped: time budget (~0 s expected from the other compiled provider"), rows[1]["status"]


# -- results on disk ------------------------------------------------------------------------------------
def _fake_kernel_result():
    env = common.environment()
    ln = {"rows": 16384, "width": 768, "dtype": "bf16"}
    rows = [_k("layernorm", p, mode, dict(ln, width=w), ms=ms, ms_p20=ms * 0.9, ms_p80=ms * 1.1,
               gbps=common.gbps(common.layernorm_bytes(16384, w, 2, mode), ms), peak_mem_bytes=3 << 20)
            for p, f in (("torch", 1.0), ("triton", 0.8)) for mode in ("fwd", "fwd+bwd")
            for w, ms in ((768, 0.1 * f), (1024, 0.13 * f))]
    rows += [make_row("kernels", "layernorm", "liger", ln, m, "skipped: liger_kernel not importable")
             for m in ("fwd", "fwd+bwd")]
    ceilings = {"copy": {"bytes": 2 << 30, "ms": 1.0, "gbps": 2000.0}}
    kernels.add_ceiling_percent(rows, ceilings)
    return report.make_result("kernels", env, rows, kernels.kernel_targets(rows, ceilings), ceilings)


def test_result_json_markdown_and_plots(tmp_path, monkeypatch):
    monkeypatch.setattr(common.torch.cuda, "is_available", lambda: False)
    res = _fake_kernel_result()
    assert res["env"]["device_slug"].startswith("cpu-")
    commit = res["env"]["git_commit"]
    commit = commit.removesuffix("+dirty")  # run from a tree with uncommitted changes
    assert commit == "unknown" or (len(commit) == 40 and int(commit, 16) >= 0)
    paths = report.write_result(res, tmp_path)
    folder = tmp_path / res["env"]["device_slug"]
    assert {p.name for p in paths} == {"kernels.json", "kernels.md", "layernorm.png"}
    loaded = report.validate_result(json.loads((folder / "kernels.json").read_text()))
    assert loaded["rows"][0]["pct_of_copy_bw"] == pytest.approx(100 * loaded["rows"][0]["gbps"] / 2000.0)
    md = (folder / "kernels.md").read_text()
    assert "| layernorm bandwidth / copy bandwidth | width=768 fwd+bwd |" in md
    assert "| layernorm | M=16384 N=768 | fwd,fwd+bwd | liger |" in md  # one line for both modes
    assert (folder / "layernorm.png").read_bytes()[:4] == b"\x89PNG"
    summary = report.write_summary([res], tmp_path)
    assert "layernorm speed vs torch.compile" in summary.read_text()
    # a later `bench train` keeps the kernel targets saved by this run, and says where from
    train = report.make_result("train", res["env"], [], [common.target("train MFU", "gpt2-small", 0.6, 0.55)])
    text = report.write_summary([train], tmp_path).read_text()
    assert "layernorm speed vs torch.compile" in text and "| train MFU |" in text
    assert "kernels targets are from the earlier run of" in text


@pytest.mark.parametrize("breakage, field", [
    (lambda d: d["env"].pop("git_commit"), "env.git_commit"),
    (lambda d: d["rows"][0].update(status="broken"), "rows[0].status"),
    (lambda d: d["rows"][0].pop("ms"), "rows[0].ms"),
    (lambda d: d["rows"][0].update(ms=0.0), "rows[0].ms"),  # an ok row timed nothing: no rate from it
    (lambda d: d.update(schema="other"), "schema"),
    (lambda d: d["targets"][0].update(status="OK"), "targets[0].status"),
    (lambda d: d["targets"][0].pop("threshold"), "targets[0].threshold"),
    (lambda d: d.update(targets="PASS"), "targets must be a list"),
    (lambda d: d["rows"][0].update(status="skipped"), "rows[0].status"),  # a skip must say why
    (lambda d: d["rows"][0].update(status="failed:"), "rows[0].status"),
    (lambda d: d["rows"][0].pop("provider"), "rows[0].provider"),
    (lambda d: d["rows"][0].pop("section"), "rows[0].section"),
    (lambda d: d["rows"][0].pop("config"), "rows[0].config"),
])
def test_validate_result_names_the_bad_field(breakage, field):
    d = _fake_kernel_result()
    breakage(d)
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        report.validate_result(d)


def test_markdown_table_rendering():
    text = report.markdown_table(["a", "b"], [[1, "x|y"], ["-", 2.5]])
    assert text == "| a | b |\n|---|---|\n| 1 | x\\|y |\n| - | 2.5 |"
    assert report.fmt(1234.5) == "1,234" or report.fmt(1234.5) == "1,235"
    assert report.fmt(0.012345) == "0.0123" and report.fmt(None) == "-" and report.fmt(7) == "7"
    assert report.fmt_bytes(3 * 2**20) == "3.0 MiB" and report.fmt_bytes(512) == "512 B"
    t = report.targets_table([target("speed", "w=1", 1.3, 1.25, unit="x")])
    assert "| speed | w=1 | 1.3 x | >= 1.25 | PASS |  |" in t


def test_slug_and_environment():
    assert common.slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert common.slugify("  ") == "unknown"
    env = common.environment()
    for key in report.REQUIRED_ENV:
        assert key in env
    assert env["torch"] == torch.__version__


def test_environment_names_the_other_kernel_libraries(monkeypatch):
    """The versions of Liger-Kernel and flash-attn (FA2, FA3) the rows were timed with, or None
    where the module does not import (whatever the distribution metadata says)."""
    import importlib.metadata

    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    monkeypatch.setattr(importlib.metadata, "version", lambda dist: {"flash-attn": "2.8.3"}.get(dist, "9.9"))
    env = common.environment()
    assert (env["flash_attn"], env["flash_attn_3"], env["liger_kernel"]) == ("2.8.3", None, None)
    assert "- flash_attn: 2.8.3" in report.env_lines(env)


def test_git_commit_outside_a_checkout_takes_the_named_one(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # git must not find /work's repo
    monkeypatch.delenv("TRITONGPT_GIT_COMMIT", raising=False)
    assert common.git_commit(tmp_path) == "unknown"
    monkeypatch.setenv("TRITONGPT_GIT_COMMIT", "0123abc")
    assert common.git_commit(tmp_path) == "0123abc"
    if (Path(common.__file__).resolve().parent.parent / ".git").exists():
        head = common.git_commit()  # a git checkout: git's answer wins over the named one
        assert head != "0123abc" and len(head.removesuffix("+dirty")) == 40


def test_git_commit_says_when_the_code_differs_from_it(tmp_path, monkeypatch):
    """A benchmark run from a tree with uncommitted code names HEAD "+dirty": those figures come
    from code no commit holds. Results already in bench/results and untracked files do not count."""
    import subprocess

    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "kernel.py").write_text("x = 1\n")
    (tmp_path / "bench" / "results" / "r.json").write_text("{}\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "one")
    head = common.git_commit(tmp_path)
    assert len(head) == 40 and "+" not in head
    (tmp_path / "bench" / "results" / "r.json").write_text('{"new": 1}\n')
    (tmp_path / "notes.txt").write_text("untracked\n")
    assert common.git_commit(tmp_path) == head
    (tmp_path / "kernel.py").write_text("x = 2\n")
    assert common.git_commit(tmp_path) == head + "+dirty"


# -- the CLI without CUDA -------------------------------------------------------------------------------------
def _fast_cpu_rows(quick=False, log=print):
    return [make_row("cpu", "model-forward", "reference", {"model": "tiny"}, "fwd", ms=2.0, ms_p20=1.9,
                     ms_p80=2.1, tokens_per_s=1000.0)]


def test_cli_without_cuda_says_so_and_exits_0(tmp_path, monkeypatch, capsys):
    from tritongpt import cli
    from tritongpt.bench import cpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cpu, "run_cpu", _fast_cpu_rows)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "all", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "GPU benchmarks need CUDA" in out and "results not written" in out
    assert f"torch {torch.__version__}, triton " in out  # the CPU line names the versions, as the GPU one does
    assert list(tmp_path.iterdir()) == []  # nothing written without --out
    assert cli.main(["bench", "kernels", "--out", str(tmp_path / "res")]) == 0
    (folder,) = (tmp_path / "res").iterdir()
    assert folder.name.startswith("cpu-")
    d = report.validate_result(json.loads((folder / "cpu.json").read_text()))
    assert d["section"] == "cpu" and "need CUDA" in d["notes"][0]


def _cpu_stand_ins(monkeypatch):
    """The GPU command's timer and ceilings, swapped for the CPU timer and tiny fp32 ceilings."""
    real_ceilings = kernels.measure_ceilings
    monkeypatch.setattr(common, "GpuTimer", lambda *a: quick_timer())
    monkeypatch.setattr(kernels, "measure_ceilings", lambda timer, **k: real_ceilings(
        timer, copy_bytes=1 << 16, matmul_n=32, dtype=torch.float32))


def test_an_interrupt_writes_the_rows_measured_so_far(tmp_path, monkeypatch, capsys):
    """SIGINT (Ctrl-C, or a GPU session's hard time limit) in the middle of `bench all`: the rows
    measured before it are written, everything after is marked skipped, and the exit code is 130."""
    from tritongpt import cli
    from tritongpt.bench import cli as bcli

    _cpu_stand_ins(monkeypatch)
    real_one, calls = kernels._bench_one, []

    def one(*a, **k):
        calls.append(a[1])
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_one(*a, **k)

    monkeypatch.setattr(kernels, "_bench_one", one)
    monkeypatch.setattr(train_step, "bench_train_provider", lambda *a, **k: pytest.fail("started after Ctrl-C"))
    args = cli.build_parser().parse_args([
        "bench", "all", "--quick", "--out", str(tmp_path), "--dtype", "fp32", "--no-plots",
        "--providers", "reference,torch", "--ops", "layernorm,mlp", "--ln-rows", "8", "--ln-widths", "16",
        "--mlp-rows", "8", "--mlp-widths", "8"])
    assert bcli._run_gpu(args) == 130
    (folder,) = tmp_path.iterdir()
    k = report.validate_result(json.loads((folder / "kernels.json").read_text()))
    t = report.validate_result(json.loads((folder / "train.json").read_text()))
    status = [r["status"] for r in k["rows"] if r["mode"] != "saved"]
    assert status.count("ok") == 3 and len(calls) == 4, (status, calls)
    assert set(status) == {"ok", "skipped: interrupted (Ctrl-C or a hard time limit)"}, status
    assert {r["status"] for r in t["rows"]} == {"skipped: interrupted (Ctrl-C or a hard time limit)"}
    assert "interrupted" in capsys.readouterr().err


def test_gpu_command_flow_with_cpu_stand_ins(tmp_path, monkeypatch, capsys):
    # `bench all` as it runs on a GPU, with the GPU parts swapped for CPU stand-ins: argument
    # plumbing, the two sections, files, summary and the final table.
    from tritongpt import cli
    from tritongpt.bench import cli as bcli

    _cpu_stand_ins(monkeypatch)
    # rope_partial's quick shapes (16k tokens of heads of 128) have no size flag: tiny ones here, the same kinds
    # (a whole-head count, then fewer KV heads with an mscale), as the CPU's reference takes seconds a mode on those
    monkeypatch.setitem(kernels.QUICK_SIZES, "rope_partial_heads", ((2, 2, 8, 4, 1.0), (4, 2, 16, 12, 1.5)))
    monkeypatch.setitem(kernels.QUICK_SIZES, "decode_seqlens", (64,))  # no size flag either
    # nor rope's tokens (16k: 2 s of the CPU's reference), shared with rope_partial; its 12 heads of 64 kept
    monkeypatch.setitem(kernels.QUICK_SIZES, "rope_tokens", 32)
    monkeypatch.setitem(kernels.QUICK_SIZES, "rope_seq_len", 16)
    monkeypatch.setitem(kernels.QUICK_SIZES, "matmul_widths", (8,))  # nor matmul's widths (its rows: --mlp-rows)
    monkeypatch.setitem(kernels.QUICK_SIZES, "int8_rows", (1, 4))  # nor int8_linear's rows and shapes
    monkeypatch.setitem(kernels.QUICK_SIZES, "int8_shapes", ((16, 8),))
    monkeypatch.setitem(kernels.QUICK_SIZES, "lora_shapes", ((3, 1, 16, 8, 5, 2),))  # nor lora's
    monkeypatch.setitem(kernels.QUICK_SIZES, "token_mask_vocabs", (70,))  # nor token_mask's
    monkeypatch.setitem(kernels.QUICK_SIZES, "sampling_vocabs", (70,))  # nor sampling's
    monkeypatch.setitem(kernels.QUICK_SIZES, "sink_seqlens", (16,))  # nor sink_attention's
    monkeypatch.setitem(kernels.QUICK_SIZES, "sink_heads", ((4, 2, 8),))
    seen = {}

    def fake_train(device, budget, dtype, models, providers, batch, seq_len, warmup, steps, peak, log, **model):
        seen.update(models=models, providers=providers, peak=peak, steps=steps, flags=model)
        return [make_row("train", "step", p, {"model": m, "batch": 1, "seq_len": seq_len}, "fwd+bwd",
                         ms=10.0, tokens_per_s=100.0, mfu=0.1, peak_mem_bytes=1 << 20)
                for m in models for p in providers]

    monkeypatch.setattr(train_step, "run_train", fake_train)
    # autotune's picks so far, as the kernels then the train section leave them: each section
    # reports the ones it added
    pick = lambda n: {"kernel": "mlp.matmul", "key": {"N": n}, "dtypes": ["bfloat16"],  # noqa: E731
                      "config": {"BLOCK_M": 64, "num_warps": 4, "num_stages": 3}}
    so_far = iter([[pick(8)], [pick(8), pick(16)]])
    monkeypatch.setattr(kernel_common, "autotune_choices", lambda: next(so_far))
    args = cli.build_parser().parse_args([
        "bench", "all", "--quick", "--out", str(tmp_path), "--dtype", "fp32", "--no-plots",
        "--providers", "reference,torch,sdpa-flash", "--ln-rows", "8", "--ln-widths", "16",
        "--mlp-rows", "8", "--mlp-widths", "8", "--attn-seqlens", "16", "--attn-head-dims", "8",
        "--attn-tokens", "32", "--attn-width", "16", "--attn-window", "8", "--ce-rows", "8", "--ce-vocabs", "20",
        "--head-widths", "8", "--gqa-seqlens", "16", "--gqa-heads", "4:2:8,3:1:8", "--moe-shapes", "12:3:2:8:16"])
    assert bcli._run_gpu(args) == 0
    assert seen["models"] == ("gpt2-small",) and seen["steps"] == 4 and seen["peak"] > 0
    assert seen["providers"] == train_step.TRAIN_PROVIDERS
    # GPT-2 as published unless --vocab-multiple, --attention-window, ..., --bias say otherwise
    assert seen["flags"] == dict(vocab_multiple=1, attention_window=0, window_layers=None, logit_softcap=0.0,
                                 logit_scale=None, norm=None, mlp=None, mlp_hidden=None, position_encoding=None, rope_theta=None,
                                 n_kv_head=None, bias=None, attention_head_dim=None, qk_norm=None,
                                 scale_embeddings=None, post_norms=None, rope_local_theta=None, attn_softcap=None,
                                 nope_layers=None, pre_norms=None, qk_norm_width=None, parallel_residual=None,
                                 gelu_approximate=None, rotary_dim=None, shared_norm=None, head_bias=None,
                                 embed_norm=None, norm_bias=None, alibi_scaled=None, n_experts=None,
                                 experts_per_token=None, moe_aux_loss=None, embedding_multiplier=None,
                                 residual_multiplier=None, attention_multiplier=None)
    (folder,) = tmp_path.iterdir()
    k = report.validate_result(json.loads((folder / "kernels.json").read_text()))
    t = report.validate_result(json.loads((folder / "train.json").read_text()))
    assert {r["op"] for r in k["rows"]} == {"layernorm", "mlp", "attention", "cross_entropy", "lm_head_loss",
                                            "doc_attention", "window_attention", "add_layernorm", "rope",
                                            "lm_head_loss_smooth_z", "lm_head_loss_softcap", "gqa_attention",
                                            "rmsnorm", "add_rmsnorm", "swiglu", "geglu", "softcap_attention",
                                            "mlp_exact_gelu", "rope_partial", "lm_head_loss_bias",
                                            "alibi_attention", "moe_mlp", "lm_head_distill", "decode_attention",
                                            "matmul", "int8_linear", "int4_linear", "lora", "token_mask",
                                            "sampling", "rl_logprobs", "sink_attention"}
    assert {(r["config"]["M"], r["config"]["C"]) for r in k["rows"] if r["op"] == "matmul"} == {(8, 8), (32, 8)}
    assert {(r["config"]["heads"], r["config"]["kv_heads"]) for r in k["rows"] if r["op"] == "gqa_attention"} == \
        {(4, 2), (3, 1)}
    assert {(r["config"]["rows"], r["config"]["experts"], r["config"]["top_k"]) for r in k["rows"]
            if r["op"] == "moe_mlp"} == {(12, 3, 2)}
    assert {(r["config"]["heads"], r["config"]["rotary_dim"]) for r in k["rows"] if r["op"] == "rope_partial"} == \
        {(2, 4), (4, 12)}
    ce = [r for r in k["rows"] if r["op"] == "cross_entropy" and r["provider"] == "torch"]
    assert len(ce) == 3 and all(r["status"] == "ok" and r["gbps"] > 0 for r in ce), ce
    assert t["peak_flops_source"] == "float32 matmul 32^3 measured in this run"
    assert len(t["targets"]) == 3
    assert k["autotune"] == [pick(8)] and t["autotune"] == [pick(16)]
    assert "| mlp.matmul | N=16 | bfloat16 | BLOCK_M=64 num_warps=4 num_stages=3 |" in (folder / "train.md").read_text()
    out = capsys.readouterr().out
    assert "| train step speedup vs reference+compile+sdpa |" in out and "results:" in out
    assert (folder / "summary.md").is_file()


def test_cli_argument_parsing():
    from tritongpt.bench import cli as bcli
    from tritongpt.errors import UserError

    assert bcli._ints("768,1024", "x") == (768, 1024)
    assert bcli._batches("gpt2-small=16,gpt2-medium=8", ()) == {"gpt2-small": 16, "gpt2-medium": 8}
    assert bcli._batches("4", ("a", "b")) == {"a": 4, "b": 4}
    with pytest.raises(UserError, match="--ln-widths"):
        bcli._ints("768,wide", "ln-widths")
    with pytest.raises(UserError, match="--ops"):
        bcli._names("layernorm,softmax", ("layernorm", "mlp"), "ops")
    parser = __import__("tritongpt.cli", fromlist=["build_parser"]).build_parser()
    for argv, msg in ((["--steps", "0"], "--steps must be at least 1"),
                      (["--warmup-steps", "-1"], "--warmup-steps must be >= 0"),
                      (["--vocab-multiple", "0"], "--vocab-multiple must be a positive integer")):
        with pytest.raises(UserError, match=msg):
            bcli.cmd_bench(parser.parse_args(["bench", "train", *argv]))
    assert bcli._or(0, 3) == 0 and bcli._or(None, 3) == 3  # an explicit 0 warm-up steps stays 0
    # the GPU flags are checked on any machine, before the CPU timings run (a dry run catches typos)
    for argv, msg in ((["kernels", "--ops", "nonsense"], "--ops: unknown"),
                      (["all", "--modes", "fwd,xyz"], "--modes: unknown"),
                      (["kernels", "--providers", "bogus"], "--providers: unknown"),
                      (["train", "--train-providers", "triton+sdpa"], "already has its own attention"),
                      (["all", "--models", "gpt5"], "--models: unknown")):
        with pytest.raises(UserError, match=msg):
            bcli.cmd_bench(parser.parse_args(["bench", *argv]))


def refused_before_the_cpu_timings(monkeypatch, cases):
    """Each `bench` argv of cases is a UserError matching its message, and the CPU timings never
    start; returns the parser."""
    from tritongpt.bench import cli as bcli
    from tritongpt.bench import cpu
    from tritongpt.cli import build_parser
    from tritongpt.errors import UserError

    monkeypatch.setattr(cpu, "run_cpu", lambda **k: pytest.fail("the CPU timings ran"))
    parser = build_parser()
    for argv, msg in cases:
        with pytest.raises(UserError, match=msg):
            bcli.cmd_bench(parser.parse_args(["bench", *argv]))
    return parser


def test_kernel_sizes_dtype_and_budget_are_checked_before_the_cpu_timings(monkeypatch):
    """A dry run on a CPU catches them: before, they were read only on a GPU, so here the CPU
    timings ran and the command exited 0 (and --max-minutes nan never expired on a GPU)."""
    from tritongpt.bench import cli as bcli

    parser = refused_before_the_cpu_timings(monkeypatch, (
        (["kernels", "--ln-widths", "768,wide"], "--ln-widths must be comma-separated"),
        (["all", "--ce-vocabs", "0"], "--ce-vocabs must list positive"),
        (["kernels", "--ln-rows", "0"], "--ln-rows must be a positive integer"),
        (["kernels", "--attn-width", "-1"], "--attn-width must be a positive integer"),
        (["kernels", "--rep-ms", "0"], "--rep-ms positive"),
        (["kernels", "--warmup-ms", "-1"], "--warmup-ms must be >= 0"),
        (["kernels", "--dtype", "fp64"], "unknown dtype 'fp64'"),
        (["train", "--dtype", "int8"], "unknown dtype 'int8'"),
        (["all", "--max-minutes", "nan"], "--max-minutes must be a positive number"),
        (["kernels", "--max-minutes", "0"], "--max-minutes must be a positive number"),
        (["kernels", "--gqa-heads", "32:8"], "--gqa-heads takes query heads:KV heads:head dim, positive integers, "
                                             "got '32:8'"),
        (["kernels", "--gqa-heads", "32:0:128"], "got '32:0:128'"),
        (["kernels", "--gqa-heads", "12:5:64"], r"the query heads \(12\) must be a multiple of the KV heads \(5\)"),
        (["kernels", "--gqa-heads", ","], "--gqa-heads lists no shape"),
        (["kernels", "--gqa-seqlens", "0"], "--gqa-seqlens must list positive"),
        (["kernels", "--moe-shapes", "4096:8:2:1024"], "--moe-shapes takes tokens:experts:top k:width:hidden, "
                                                       "positive integers, got '4096:8:2:1024'"),
        (["kernels", "--moe-shapes", "64:4:5:8:16"], r"top k \(5\) must be at most the experts \(4\)"),
        (["kernels", "--moe-shapes", ","], "--moe-shapes lists no shape")))
    sizes = bcli.kernel_sizes(parser.parse_args(["bench", "kernels", "--ln-rows", "8", "--head-widths", "8,16",
                                                 "--gqa-heads", "8:2:64, 4:1:80", "--gqa-seqlens", "256",
                                                 "--moe-shapes", "64:4:2:8:16"]))
    assert sizes["ln_rows"] == 8 and sizes["head_widths"] == (8, 16)
    assert sizes["moe_shapes"] == ((64, 4, 2, 8, 16),)
    assert sizes["gqa_heads"] == ((8, 2, 64), (4, 1, 80)) and sizes["gqa_seqlens"] == (256,)
    assert sizes["mlp_rows"] == kernels.FULL_SIZES["mlp_rows"]


def test_training_flags_are_checked_before_the_cpu_timings(monkeypatch):
    """Before, on a CPU these ran the CPU timings and exited 0; on a GPU --peak-tflops 0 took the
    datasheet peak instead, a --batch for a model not benchmarked was ignored, and an empty
    --train-providers ran every provider."""
    from tritongpt.bench import cli as bcli

    parser = refused_before_the_cpu_timings(monkeypatch, (
        (["train", "--seq-len", "0"], "--seq-len must be a positive integer"),
        (["all", "--peak-tflops", "0"], "--peak-tflops must be a positive number"),
        (["train", "--peak-tflops", "nan"], "--peak-tflops must be a positive number"),
        (["train", "--batch", "x"], "--batch must be comma-separated"),
        (["train", "--batch", "0"], "--batch must list positive"),
        (["train", "--quick", "--batch", "gpt2-xl=4"], "--batch names gpt2-xl, not among"),
        (["train", "--train-providers", ","], "--train-providers lists no provider"),
        # the model flags (bench train times that model): as pretrain refuses them, and a window the
        # sequence fits in (its rows would time plain GPT-2's attention)
        (["train", "--attention-window", "-1"], "--attention-window must be >= 0"),
        (["all", "--window-layers", "odd"], "--window-layers odd picks the layers --attention-window makes local"),
        (["train", "--attention-window", "0", "--window-layers", "all"], "without a window it does nothing"),
        (["train", "--attention-window", "1024"], "--attention-window 1024 is not below --seq-len 1024"),
        (["train", "--attention-window", "64", "--seq-len", "32"], "--attention-window 64 is not below --seq-len 32"),
        (["train", "--logit-softcap", "-1"], "--logit-softcap must be a finite number >= 0"),
        (["all", "--logit-softcap", "nan"], "--logit-softcap must be a finite number >= 0"),
        (["train", "--logit-softcap", "inf"], "--logit-softcap must be a finite number >= 0")))
    args = parser.parse_args(["bench", "train", "--batch", "gpt2-small=4", "--peak-tflops", "1.5"])
    assert bcli.train_names(args) == (("gpt2-small", "gpt2-medium"), train_step.TRAIN_PROVIDERS)
    args = parser.parse_args(["bench", "train", "--attention-window", "256", "--window-layers", "odd",
                              "--logit-softcap", "30"])
    assert bcli.train_names(args)[0] == ("gpt2-small", "gpt2-medium")
    assert (args.attention_window, args.window_layers, args.logit_softcap) == (256, "odd", 30.0)
    with pytest.raises(SystemExit):  # its choices, at parsing (as pretrain's)
        parser.parse_args(["bench", "train", "--attention-window", "256", "--window-layers", "even"])


def test_llama_flags_are_checked_before_the_cpu_timings(monkeypatch):
    """bench train's --norm, --mlp, --mlp-hidden, --position-encoding, --rope-theta, --n-kv-head and
    --bias: refused by name as pretrain refuses them, before any work; --n-kv-head against the heads of
    every --models entry (3 divides gpt2-small's 12, not gpt2-medium's 16), and a flag that would do
    nothing (a theta without RoPE, a hidden size without SwiGLU) rather than time a model it does not name."""
    from tritongpt.bench import cli as bcli

    parser = refused_before_the_cpu_timings(monkeypatch, (
        (["train", "--n-kv-head", "5"], "--n-kv-head 5 must divide gpt2-small's 12 heads"),
        (["train", "--n-kv-head", "3"], "--n-kv-head 3 must divide gpt2-medium's 16 heads"),
        (["all", "--quick", "--models", "tiny", "--n-kv-head", "3"], "--n-kv-head 3 must divide tiny's 4 heads"),
        (["train", "--n-kv-head", "-1"], r"--n-kv-head must be >= 0 \(0: as many as the heads\), got -1"),
        (["train", "--mlp-hidden", "2048"], "--mlp-hidden 2048 is the SwiGLU, GeGLU or squared-ReLU MLP's hidden "
                                            "size: without --mlp swiglu, geglu or relu2 it does nothing"),
        (["train", "--mlp", "gelu", "--mlp-hidden", "2048"], "without --mlp swiglu, geglu or relu2 it does nothing"),
        (["train", "--experts-per-token", "4"], "--experts-per-token 4 is how many experts a token goes through: "
                                                "without --n-experts the MLP is dense"),
        (["train", "--attention-window", "256", "--window-layers", "0,12"], r"GPTConfig.window_layers '0,12' must "
                                                                            "list distinct layers in increasing order, "
                                                                            "each below n_layer 12"),
        (["train", "--mlp", "swiglu", "--mlp-hidden", "0"], "--mlp-hidden must be a positive integer, got 0"),
        (["train", "--rope-theta", "500000"], "--rope-theta 500000 is RoPE's base: without --position-encoding "
                                              "rope it does nothing"),
        (["all", "--position-encoding", "rope", "--rope-theta", "0"], "--rope-theta must be a finite number > 0"),
        (["train", "--position-encoding", "rope", "--rope-theta", "nan"], "--rope-theta must be a finite number > 0"),
        (["train", "--position-encoding", "rope", "--rope-theta", "inf"], "--rope-theta must be a finite number > 0")))
    args = parser.parse_args(["bench", "train", "--norm", "rmsnorm", "--mlp", "swiglu", "--mlp-hidden", "2000",
                              "--position-encoding", "rope", "--rope-theta", "500000", "--n-kv-head", "4",
                              "--no-bias"])
    assert bcli.train_names(args) == (("gpt2-small", "gpt2-medium"), train_step.TRAIN_PROVIDERS)
    assert {k: v for k, v in bcli.model_flags(args).items() if v is not None} == dict(
        vocab_multiple=1, attention_window=0, logit_softcap=0.0, norm="rmsnorm", mlp="swiglu", mlp_hidden=2000,
        position_encoding="rope", rope_theta=500000.0, n_kv_head=4, bias=False)
    assert bcli.model_flags(parser.parse_args(["bench", "train", "--bias"]))["bias"] is True
    for bad in (["--norm", "batchnorm"], ["--mlp", "relu"], ["--position-encoding", "xpos"]):
        with pytest.raises(SystemExit):  # their choices, at parsing (as pretrain's)
            parser.parse_args(["bench", "train", *bad])


def test_out_that_cannot_be_a_folder_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """Before, a file given as --out was found only when the results were written: after the CPU
    timings here, after minutes of measuring on a GPU (and compile's subprocess raised a traceback)."""
    from tritongpt import cli
    from tritongpt.bench import compile_check, cpu

    monkeypatch.setattr(cpu, "run_cpu", lambda **k: pytest.fail("the CPU timings ran"))
    (tmp_path / "file").write_text("x")
    for what in ("cpu", "kernels", "compile"):
        assert cli.main(["bench", what, "--out", str(tmp_path / "file")]) == 2
        assert capsys.readouterr().err == f"error: --out {tmp_path / 'file'} is a file, not a folder\n"
    assert cli.main(["bench", "cpu", "--out", str(tmp_path / "file" / "sub")]) == 2
    assert "cannot make the folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compile_check.main(["--out", str(tmp_path / "file")])
    assert "is a file, not a folder" in capsys.readouterr().err
    monkeypatch.setattr(cpu, "run_cpu", _fast_cpu_rows)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["bench", "cpu", "--out", str(tmp_path / "new" / "res"), "--no-plots"]) == 0
    (folder,) = (tmp_path / "new" / "res").iterdir()
    assert (folder / "cpu.json").is_file()


def test_compile_workers_must_be_positive(monkeypatch, capsys):
    """Before, --workers 0 was dropped (the default count ran) and -1 reached the process pool,
    which raised a traceback after the capture."""
    import subprocess

    from tritongpt import cli
    from tritongpt.bench import compile_check

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("compile_check started"))
    for n in ("0", "-1"):
        assert cli.main(["bench", "compile", "--workers", n]) == 2
        assert capsys.readouterr().err == f"error: --workers must be a positive integer, got {n}\n"
        with pytest.raises(SystemExit):
            compile_check.main(["--workers", n])
        assert f"--workers must be a positive integer, got {n}" in capsys.readouterr().err


def test_non_causal_attention_rows_skip_the_causal_only_reference():
    args = [torch.randn(1, 2, 8, 16) for _ in range(3)]
    builders = kernels.attention_providers(*args, causal=False)
    for name in ("reference", "compile"):
        with pytest.raises(kernels.Unavailable, match="causal only"):
            builders[name]()
    fn, _ = builders["triton"]()  # ours (and SDPA's) take causal=False
    assert fn().shape == (1, 2, 8, 16)


def test_cpu_timings_run():
    from tritongpt.bench import cpu

    row = cpu.bench_model_forward("tiny", batch=1, seq_len=16, reps=1)
    assert row["status"] == "ok" and row["tokens_per_s"] == pytest.approx(16 / (row["ms"] * 1e-3))

    class Tok:
        vocab_size = 300

        def encode(self, text):
            return list(text.encode())

    rows = cpu.bench_tokenizer("hello world " * 50, reps=1, tokenizer=Tok())
    assert rows[0]["status"] == "ok" and rows[0]["tokens"] == 600
    assert rows[1]["status"] == "skipped: tokenizer has no .encode_reference"


# -- on a GPU: a real --quick run ------------------------------------------------------------------------------
@pytest.mark.cuda
@cuda
def test_quick_kernel_bench_on_gpu(tmp_path):
    from tritongpt import cli

    # no torch.compile provider (inductor builds take minutes; `bench all` times it); a budget
    # with room for the Triton kernels' first autotuning (22 attention configs), so that every op
    # is measured (bench/gpu_session.sh leaves this test to `bench all`)
    assert cli.main(["bench", "kernels", "--quick", "--out", str(tmp_path), "--max-minutes", "4",
                     "--providers", "reference,torch,sdpa-flash,triton", "--no-plots"]) == 0
    (folder,) = tmp_path.iterdir()
    d = report.validate_result(json.loads((folder / "kernels.json").read_text()))
    assert d["env"]["device"] == torch.cuda.get_device_name(0)
    bw, fl = d["ceilings"]["copy"]["gbps"], d["ceilings"]["matmul"]["tflops"]
    assert bw > 0 and fl > 0
    ok = [r for r in d["rows"] if r["status"] == "ok" and r["mode"] != "saved"]
    torch_rows = [r for r in ok if r["provider"] in ("torch", "sdpa-flash")]
    # lm_head_loss_smooth_z, lm_head_loss_softcap (last in the plan) and add_layernorm may be left to a budget
    # that ran out
    assert {"layernorm", "mlp", "attention", "cross_entropy", "lm_head_loss"} <= {r["op"] for r in torch_rows}
    for r in ok:  # units sanity: nothing beats the ceilings measured in the same run by far
        assert r["ms_p20"] <= r["ms"] <= r["ms_p80"]
        if r.get("gbps"):
            assert r["gbps"] < 1.5 * bw, r
        if r.get("tflops"):
            assert r["tflops"] < 1.5 * fl, r
        assert r["peak_mem_bytes"] is not None and r["peak_mem_bytes"] >= 0
    assert len(d["targets"]) >= 6 and (folder / "summary.md").is_file()
    tuned = {a["kernel"] for a in d["autotune"]}
    assert {"attention.forward", "attention.backward_dkdv", "attention.backward_dq", "mlp.matmul"} <= tuned


@pytest.mark.cuda
@cuda
def test_quick_train_bench_on_gpu(tmp_path):
    from tritongpt import cli

    assert cli.main(["bench", "train", "--quick", "--out", str(tmp_path), "--models", "gpt2-small",
                     "--train-providers", "reference,reference+sdpa,reference+sdpa+ckpt",
                     "--batch", "2", "--seq-len", "256",
                     "--steps", "2", "--warmup-steps", "1", "--no-plots"]) == 0
    (folder,) = tmp_path.iterdir()
    d = report.validate_result(json.loads((folder / "train.json").read_text()))
    rows = {r["provider"]: r for r in d["rows"]}
    for p in ("reference", "reference+sdpa"):
        assert rows[p]["status"] == "ok", rows[p]["status"]
        assert rows[p]["peak_mem_bytes"] > rows[p]["static_mem_bytes"] > 0
        assert 0 < rows[p]["mfu"] < 1.0
    # SDPA never builds the T x T scores: less peak memory than the textbook attention.
    assert rows["reference+sdpa"]["peak_mem_bytes"] < rows["reference"]["peak_mem_bytes"]
    # the blocks recomputed in backward: less still
    assert rows["reference+sdpa+ckpt"]["status"] == "ok", rows["reference+sdpa+ckpt"]["status"]
    assert rows["reference+sdpa+ckpt"]["peak_mem_bytes"] < rows["reference+sdpa"]["peak_mem_bytes"]


@pytest.mark.cuda
@cuda
def test_gpu_timer_peak_memory():
    timer = common.GpuTimer(warmup_ms=5, rep_ms=10)
    n = 16 << 20
    held = torch.empty(4 * n, device="cuda", dtype=torch.uint8)  # live before: not fn's peak
    assert n <= timer.peak_bytes(lambda: torch.empty(n, device="cuda", dtype=torch.uint8)) < 2 * n
    del held
    med, p20, p80 = timer.bench(lambda: torch.ones(n, device="cuda", dtype=torch.uint8))
    assert 0 < p20 <= med <= p80


# -- formulas and figures by hand (a mutation pass found them checked only against themselves) --
def test_lm_head_and_cross_entropy_formulas():
    f = 2 * 4096 * 768 * 50257
    assert common.lm_head_flops(4096, 768, 50257, "fwd") == f == 316_189_704_192
    assert common.lm_head_flops(4096, 768, 50257, "bwd") == 2 * f
    assert common.lm_head_flops(4096, 768, 50257, "fwd+bwd") == 3 * f
    assert common.cross_entropy_bytes(4096, 50257, 2, "fwd") == 411_705_344
    assert common.cross_entropy_bytes(4096, 50257, 2, "bwd") == 823_410_688
    assert common.cross_entropy_bytes(4096, 50257, 2, "fwd+bwd") == 1_235_116_032


def test_layernorm_rows_keep_x_out_of_l2(monkeypatch):
    """On a GPU, x is at least twice the L2 cache (else fwd+bwd reads it back from L2 and the
    GB/s judged against the DRAM copy ceiling is inflated); on the CPU the rows are as asked."""
    assert kernels.layernorm_rows(16384, 768, 2, "cpu") == 16384
    props = types.SimpleNamespace(L2_cache_size=50 * 2**20)  # an H100's
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d=None: props)
    rows = kernels.layernorm_rows(16384, 768, 2, "cuda")
    assert rows == 68608 and rows * 768 * 2 >= 2 * props.L2_cache_size and rows % 1024 == 0
    assert kernels.layernorm_rows(16384, 1600, 4, "cuda") == 16384  # 105 MB already
    assert kernels.layernorm_rows(100_000, 768, 2, "cuda") == 100_000


def test_hidden_and_rectangular_attention():
    assert common.mlp_flops(16384, 768, "fwd", hidden=2048) == 4 * 16384 * 768 * 2048
    assert common.attention_flops(1, 1, 128, 1024, 64, False, "fwd") == 4 * 128 * 1024 * 64
    # causal, bottom-right aligned: the pairs the model's mask keeps, counted here by the mask
    # (Tq = Tk stays FlashAttention's half, which counts the diagonal as half too)
    from tritongpt.model.layers import in_the_future

    for tq, tk in ((128, 1024), (1, 1024), (512, 1024), (300, 301)):
        seen = (~in_the_future(tq, tk)).sum().item()  # True where a key is hidden
        diag = tq / 2  # the half of the diagonal FlashAttention's convention leaves out
        assert common.attention_flops(1, 1, tq, tk, 64, True, "fwd") == 4 * 64 * (seen - diag), (tq, tk)
    with pytest.raises(ValueError, match="tq <= tk"):
        common.attention_flops(1, 1, 300, 100, 64, True, "fwd")


def test_cpu_timer_warms_up_for_its_time_then_times_reps(monkeypatch):
    """Untimed calls until warm_s has passed (at least warm_calls, at most 50), then reps timed."""
    clock, calls = [0.0], []

    def call(cost):
        calls.append(cost)
        clock[0] += cost

    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])
    CpuTimer(reps=2, warm_calls=1, warm_s=0.5).bench(lambda: call(0.2))
    assert len(calls) == 3 + 2  # warm-up at t = 0, 0.2, 0.4; then two timed calls
    calls.clear()
    CpuTimer(reps=2, warm_calls=1, warm_s=0.5).bench(lambda: call(1e-6))
    assert len(calls) == 50 + 2  # a cheap call: capped
    calls.clear()
    CpuTimer(reps=2, warm_calls=0, warm_s=0.5).bench(lambda: call(0.2))
    assert len(calls) == 2  # warm_calls=0: no warm-up at all (the slow reference tokenizer)


def test_cpu_timer_reports_milliseconds(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])
    med, p20, p80 = CpuTimer(reps=3, warm_calls=0).bench(lambda: clock.__setitem__(0, clock[0] + 0.25))
    assert (med, p20, p80) == pytest.approx((250.0, 250.0, 250.0))


def test_ceilings_count_read_plus_write_and_2n3():
    c = kernels.measure_ceilings(quick_timer(), copy_bytes=1 << 16, matmul_n=32, dtype=torch.float32)
    assert c["copy"]["bytes"] == 2 * (1 << 16)
    assert c["copy"]["gbps"] == pytest.approx(c["copy"]["bytes"] / (c["copy"]["ms"] * 1e-3) / 1e9)
    assert c["matmul"]["flops"] == 2 * 32 ** 3 == 65536


def test_percent_of_matmul_ceiling():
    rows = [make_row("kernels", "mlp", "torch", {}, "fwd", ms=1.0, tflops=50.0),
            make_row("kernels", "layernorm", "torch", {}, "fwd", ms=1.0, gbps=500.0)]
    kernels.add_ceiling_percent(rows, {"copy": {"gbps": 2000.0}, "matmul": {"tflops": 500.0}})
    assert rows[0]["pct_of_matmul"] == pytest.approx(10.0) and rows[1]["pct_of_copy_bw"] == pytest.approx(25.0)


def test_kernel_target_thresholds_and_saved_ratio():
    ln = {"rows": 16384, "width": 768, "dtype": "bf16"}
    mlp = {"rows": 16384, "width": 768, "hidden": 3072, "dtype": "bf16"}
    att = {"batch": 16, "heads": 32, "seq_len": 1024, "head_dim": 64, "causal": True, "dtype": "bf16"}
    rows = [make_row("kernels", "layernorm", "triton", ln, "fwd+bwd", ms=1.0, gbps=840.0),
            make_row("kernels", "mlp", "reference", mlp, "saved", saved_bytes=100),
            make_row("kernels", "mlp", "triton", mlp, "saved", saved_bytes=60),
            make_row("kernels", "attention", "triton", att, "fwd", ms=0.1, tflops=299.0)]
    got = {t["target"]: t for t in kernels.kernel_targets(rows, {"copy": {"gbps": 1000.0}})}
    assert got["layernorm bandwidth / copy bandwidth"]["status"] == "FAIL"  # 0.84 < 0.85
    s = got["gelu-mlp saved activations / reference"]
    assert s["value"] == pytest.approx(0.6) and s["status"] == "PASS"
    assert got["attention forward TFLOPS"]["status"] == "FAIL"  # 299 < 300


def test_sweeps_count_each_modes_work():
    t, b = quick_timer(), Budget(None)
    for r in kernels.sweep_mlp(quick_timer(5), b, 8, (8,), torch.float32, providers=("torch",)):
        if r["mode"] != "saved":
            assert r["flops"] == common.mlp_flops(8, 8, r["mode"])
            assert r["tflops"] == pytest.approx(r["flops"] / (r["ms"] * 1e-3) / 1e12)
    rows = kernels.sweep_attention(t, b, (16,), (8,), torch.float32, tokens=32, width=16, providers=("reference",))
    by = {r["mode"]: r["flops"] for r in rows}
    assert by == {"fwd": 16384, "bwd": 2.5 * 16384, "fwd+bwd": 3.5 * 16384}  # 4*B2*H2*16*16*8 / 2
    rows = kernels.sweep_cross_entropy(t, b, 8, (30,), torch.bfloat16, providers=("torch",))
    assert {r["mode"]: r["bytes"] for r in rows} == {"fwd": 480, "bwd": 960, "fwd+bwd": 1440}


def test_document_attention_rows_time_each_provider_on_the_same_documents(device):
    """doc_attention: DOCUMENTS_PER_ROW random lengths summing to the sequence, FLOPs of each
    document's own causal attention, and every provider computing the same attention (FlexAttention
    is timed on CUDA only)."""
    lengths = kernels.document_lengths(37)
    assert len(lengths) == 8 and sum(lengths) == 37 and min(lengths) >= 1 and lengths == kernels.document_lengths(37)
    assert kernels.document_lengths(5) == [1] * 5
    q, k, v = (kernels.randn(2, 2, 37, 16, device=device, dtype=torch.float32) for _ in range(3))
    builders = kernels.doc_attention_providers(q, k, v, lengths)
    outs = {name: build()[0]() for name, build in builders.items() if name != "flex" or device.type == "cuda"}
    at = 0
    for n in lengths:  # each document alone, causal
        part = slice(at, at + n)
        alone = torch.nn.functional.scaled_dot_product_attention(q[:, :, part], k[:, :, part], v[:, :, part],
                                                                 is_causal=True)
        for name, o in outs.items():
            assert torch.allclose(o[:, :, part], alone, atol=1e-5), (name, n)
        at += n
    rows = kernels.sweep_doc_attention(quick_timer(), Budget(None), (16,), (16,), torch.float32, tokens=32,
                                       width=32, providers=("sdpa-mask", "flex"))
    by = {(r["provider"], r["mode"]): r for r in rows}
    pairs = sum(n * n / 2 for n in kernels.document_lengths(16))
    assert by["sdpa-mask", "fwd"]["flops"] == 4 * 2 * 2 * pairs * 16 and by["sdpa-mask", "fwd"]["status"] == "ok"
    assert by["flex", "fwd"]["status"].startswith("skipped: FlexAttention is timed on CUDA only")


def test_window_attention_rows_time_each_provider_on_the_same_band(device):
    """window_attention: every provider computes the attention of the last `window` positions
    (FlexAttention on CUDA only, flash-attn where installed), the FLOPs of the band's pairs, and
    only sequences longer than the window are swept."""
    from tritongpt.bench.common import attention_flops, window_attention_flops

    q, k, v = (kernels.randn(2, 2, 37, 16, device=device, dtype=torch.float32) for _ in range(3))
    builders = kernels.window_attention_providers(q, k, v, 5)
    outs = {name: build()[0]() for name, build in builders.items() if name in ("reference", "sdpa-mask", "triton")}
    pos = torch.arange(37, device=device)
    band = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < 5)
    want = torch.softmax((q @ k.transpose(-2, -1) / 4).masked_fill(~band, float("-inf")), -1) @ v
    for name, o in outs.items():
        assert torch.allclose(o, want, atol=1e-5), name
    assert window_attention_flops(2, 2, 37, 5, 16, "fwd") == 4 * 2 * 2 * (37 * 5 - 5 * 5 / 2) * 16
    assert window_attention_flops(2, 2, 37, 40, 16, "bwd") == attention_flops(2, 2, 37, 37, 16, True, "bwd")
    rows = kernels.sweep_window_attention(quick_timer(), Budget(None), (8, 16), (16,), torch.float32, window=8,
                                          tokens=32, width=32, providers=("sdpa-mask", "flex", "flash-attn"))
    by = {(r["provider"], r["mode"]): r for r in rows}
    assert {r["config"]["seq_len"] for r in rows} == {16} and {r["config"]["window"] for r in rows} == {8}
    assert by["sdpa-mask", "fwd"]["flops"] == 4 * 2 * 2 * (16 * 8 - 32) * 16
    assert by["sdpa-mask", "fwd"]["status"] == "ok"
    if device.type != "cuda":
        assert by["flex", "fwd"]["status"].startswith("skipped: FlexAttention is timed on CUDA only")
        assert by["flash-attn", "fwd"]["status"].startswith("skipped: ")


def test_rope_rows_time_each_provider_on_the_same_rotation(device, monkeypatch):
    """rope: the reference module, ours and Liger's (a stand-in with its signature, reading HF's
    [1, T, D] cos/sin tables) rotate the same q and k views; the bytes are q and k read and written
    (twice for fwd+bwd)."""
    import sys
    import types

    from tritongpt.model.layers import apply_rotary

    def liger_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):  # HF's apply_rotary_pos_emb
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

        def rotate_half(x):
            return torch.cat([-x[..., x.shape[-1] // 2:], x[..., :x.shape[-1] // 2]], -1)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

    fake = types.ModuleType("liger_kernel.transformers.rope")
    fake.liger_rotary_pos_emb = liger_rotary_pos_emb
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.rope", fake)
    leaves = [kernels.randn(2, 37, 3, 16, device=device, dtype=torch.float32) for _ in range(2)]
    q, k = (t.transpose(1, 2) for t in leaves)
    pos = torch.arange(37, device=device)
    want = apply_rotary(q, pos), apply_rotary(k, pos)
    for name, build in kernels.rope_providers(q, k, leaves=leaves).items():
        if name == "compile":
            continue  # inductor's CPU compiler takes minutes here; it compiles this same module
        forward, reset = build()
        got = forward()
        assert len(reset) == 2 and all(a is b for a, b in zip(reset, leaves))  # q and k are views of them
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
    rows = kernels.sweep_rope(quick_timer(), Budget(None), 32, 16, (3,), 8, torch.bfloat16,
                              providers=("reference",))
    by = {r["mode"]: r for r in rows}
    assert all(r["status"] == "ok" for r in rows) and by["fwd"]["config"]["batch"] == 2
    assert {m: r["bytes"] for m, r in by.items()} == {"fwd": 4 * 32 * 3 * 8 * 2, "bwd": 4 * 32 * 3 * 8 * 2,
                                                      "fwd+bwd": 8 * 32 * 3 * 8 * 2}


def partial_rotary64(x, rotary_dim, mscale, theta=10000.0):
    """x [B, H, T, D] at positions 0..T-1 in float64: the first rotary_dim columns rotated (pairs i, i + R/2 at
    pos theta^(-2i/R), cos and sin times mscale), the rest as they are."""
    r, t = rotary_dim, x.shape[2]
    angles = torch.arange(t, dtype=torch.float64)[:, None] * theta ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)
    cos, sin = angles.cos() * mscale, angles.sin() * mscale
    x = x.detach().double().cpu()
    x1, x2 = x[..., :r // 2], x[..., r // 2:r]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., r:]], -1)


def test_rope_partial_rows_rotate_part_of_each_head(device):
    """rope_partial: the reference module and ours rotate the first rotary_dim columns of each head (cos and sin
    times mscale) of q [B, H, T, D] and k [B, Hkv, T, D] (views of the projection's layout) and pass the rest
    through, as written out here in float64; Liger's rows say it has no partial rotary; the bytes are q's and k's
    whole heads read and written, k over its Hkv heads."""
    leaves = [kernels.randn(2, 37, n, 16, device=device, dtype=torch.float32) for n in (6, 2)]
    q, k = (t.transpose(1, 2) for t in leaves)
    want = [partial_rotary64(t, 8, 1.19) for t in (q, k)]
    for name, build in kernels.rope_partial_providers(q, k, 8, mscale=1.19, leaves=leaves).items():
        if name == "compile":
            continue  # inductor's CPU compiler takes minutes here; it compiles this same module
        if name == "liger":
            with pytest.raises(kernels.Unavailable, match="no partial rotary"):
                build()
            continue
        forward, reset = build()
        assert len(reset) == 2 and all(a is b for a, b in zip(reset, leaves))
        for a, b in zip(forward(), want):
            torch.testing.assert_close(a.double().cpu(), b, atol=1e-5, rtol=1e-5, msg=name)
    rows = kernels.sweep_rope_partial(quick_timer(), Budget(None), 32, 16, ((6, 2, 16, 4, 1.5),), torch.bfloat16,
                                      providers=("reference", "triton", "liger"))
    by = {(r["provider"], r["mode"]): r for r in rows}
    assert {r["op"] for r in rows} == {"rope_partial"} and len(rows) == 9
    assert by["reference", "fwd"]["config"] == {"batch": 2, "heads": 6, "kv_heads": 2, "seq_len": 16, "head_dim": 16,
                                                "rotary_dim": 4, "mscale": 1.5, "dtype": "bf16"}
    for p in ("reference", "triton"):
        assert {m: by[p, m]["bytes"] for m in common.MODES} == {"fwd": 2 * 32 * 8 * 16 * 2, "bwd": 2 * 32 * 8 * 16 * 2,
                                                                 "fwd+bwd": 4 * 32 * 8 * 16 * 2}
        assert all(by[p, m]["status"] == "ok" for m in common.MODES)
    assert all(by["liger", m]["status"].startswith("skipped: Liger's liger_rotary_pos_emb rotates whole heads")
               for m in common.MODES)


def test_rope_partial_sizes_are_pythias_and_phi4_minis_heads():
    """The full sweep's partial rotary shapes: Pythia 160M's (12 heads of 64 rotating 16) and 1.4B's (16 of 128
    rotating 32), rotary_pct 0.25, and Phi-4-mini's (24 over 8 KV heads of 128 rotating 96), whose mscale is the
    attention factor the model's LongRoPE default gives for its 131072 positions over 4096; quick keeps the
    smallest and Phi-4-mini's."""
    from tritongpt.model.config import longrope_defaults

    factors = dict(short_factor=[1.0] * 48, long_factor=[1.0] * 48, original_max_position_embeddings=4096)
    phi = longrope_defaults(factors, "test", 131072, 48)["attention_factor"]
    assert kernels.FULL_SIZES["rope_partial_heads"] == ((12, 12, 64, 16, 1.0), (16, 16, 128, 32, 1.0),
                                                        (24, 8, 128, 96, phi))
    assert kernels.QUICK_SIZES["rope_partial_heads"] == ((12, 12, 64, 16, 1.0), (24, 8, 128, 96, phi))
    for h, h_kv, d, r, _ in kernels.FULL_SIZES["rope_partial_heads"]:
        assert h % h_kv == 0 and r % 2 == 0 and r < d


def test_gqa_attention_rows_time_each_provider_on_the_same_grouped_heads(device):
    """gqa_attention: every provider computes query head h over KV head h // (H / Hkv) (the SDPA
    backends with enable_gqa=True where they take it; flash-attn where installed), from k, v with
    Hkv heads; the FLOPs are causal attention's over the H query heads."""
    from tritongpt.bench.common import attention_flops

    q = kernels.randn(1, 6, 37, 16, device=device, dtype=torch.float32)  # (one row: the heads are the point)
    k, v = (kernels.randn(1, 2, 37, 16, device=device, dtype=torch.float32) for _ in range(2))
    builders = kernels.gqa_attention_providers(q, k, v)
    outs = {name: build()[0]() for name, build in builders.items()
            if name in ("reference", "sdpa-flash", "sdpa-repeat", "triton")}
    future = torch.ones(37, 37, dtype=torch.bool, device=device).triu(1)
    kv = [t[:, [0, 0, 0, 1, 1, 1]] for t in (k, v)]  # heads 0-2 read KV head 0, 3-5 KV head 1
    want = torch.softmax((q @ kv[0].transpose(-2, -1) / 4).masked_fill(future, float("-inf")), -1) @ kv[1]
    for name, o in outs.items():
        assert torch.allclose(o, want, atol=1e-5), name
    rows = kernels.sweep_gqa_attention(quick_timer(), Budget(None), (16,), ((4, 2, 8), (3, 1, 16)),
                                       torch.float32, tokens=32, providers=("sdpa-repeat", "triton", "flash-attn"))
    by = {(r["config"]["heads"], r["provider"], r["mode"]): r for r in rows}
    assert {(r["config"]["batch"], r["config"]["kv_heads"], r["config"]["head_dim"]) for r in rows} == \
        {(2, 2, 8), (2, 1, 16)}
    assert by[4, "sdpa-repeat", "fwd"]["flops"] == attention_flops(2, 4, 16, 16, 8, True, "fwd") == 4 * 2 * 4 * 16 ** 2 * 8 / 2
    assert by[3, "triton", "fwd+bwd"]["flops"] == attention_flops(2, 3, 16, 16, 16, True, "fwd+bwd")
    assert by[4, "sdpa-repeat", "fwd"]["status"] == "ok" and by[3, "triton", "bwd"]["status"] == "ok"
    if device.type != "cuda":
        assert by[4, "flash-attn", "fwd"]["status"].startswith("skipped: ")


def test_decode_attention_rows_time_one_query_over_the_cache(device, monkeypatch):
    """decode_attention: every provider computes one query a sequence over every cached key (query head h over KV
    head h // (H / Hkv)), ours with the KV split forced too; triton-1pass runs the single pass and leaves the split
    choice as it was; the rows are forward only, their bytes the cache read once; flash-attn where installed."""
    from tritongpt.kernels import attention

    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 6, 1, 16, generator=gen).to(device)
    k, v = (torch.randn(2, 2, 37, 16, generator=gen).to(device) for _ in range(2))
    kv = [t[:, [0, 0, 0, 1, 1, 1]].double() for t in (k, v)]  # heads 0-2 read KV head 0, 3-5 KV head 1
    want = torch.softmax(q.double() @ kv[0].transpose(-2, -1) / 4, -1) @ kv[1]
    builders = kernels.decode_attention_providers(q, k, v)
    for name in ("reference", "sdpa-flash", "triton", "triton-1pass", "triton-paged"):
        f, leaves = builders[name]()
        assert torch.allclose(f().double(), want, atol=1e-5), name
        # (the paged provider's leaves are its pools: the same keys in pages, 37 keys in 3 pages a row)
        assert all(t is u for t, u in zip(leaves, (q, k, v))) or name == "triton-paged" and leaves[1].shape == (
            6, 2, 16, 16)
    launches = []
    split = attention._fwd_split_launch
    monkeypatch.setattr(attention, "_fwd_split_launch", lambda *a: launches.append(1) or split(*a))
    monkeypatch.setattr(attention, "_num_splits", lambda B, H, Tq, Tk, device: 3)
    forced = attention._num_splits
    assert torch.allclose(builders["triton"]()[0]().double(), want, atol=1e-5) and len(launches) == 1
    assert torch.allclose(builders["triton-1pass"]()[0]().double(), want, atol=1e-5) and len(launches) == 1
    assert attention._num_splits is forced  # put back after the call
    with pytest.raises(ValueError, match="one query a sequence"):
        kernels.decode_attention_providers(k, k, v)
    rows = kernels.sweep_decode_attention(quick_timer(), Budget(None), (1, 2), (16,), ((4, 2, 16), (2, 2, 32)),
                                          torch.float32, providers=("reference", "triton", "flash-attn"))
    assert {r["mode"] for r in rows} == {"fwd"} and {r["op"] for r in rows} == {"decode_attention"}
    by = {(r["config"]["batch"], r["config"]["heads"], r["provider"]): r for r in rows}
    assert len(by) == len(rows) == 2 * 2 * 3
    assert by[2, 4, "triton"]["bytes"] == 2 * 2 * 2 * 16 * 16 * 4  # k and v, batch 2, 2 KV heads, 16 keys, fp32
    assert by[1, 2, "reference"]["bytes"] == 2 * 2 * 16 * 32 * 4
    assert by[2, 4, "triton"]["status"] == "ok" and by[2, 4, "triton"]["gbps"] > 0
    assert by[1, 4, "reference"]["config"]["queries"] == 1 and by[1, 4, "reference"]["config"]["seq_len"] == 16
    if device.type != "cuda":
        assert by[1, 4, "flash-attn"]["status"].startswith("skipped: ")
    assert kernels.sweep_decode_attention(quick_timer(), Budget(None), (1,), (16,), ((4, 2, 16),), torch.float32,
                                          modes=("bwd", "fwd+bwd")) == []


def test_matmul_rows_time_each_product_in_the_layout_the_mlp_passes(device, monkeypatch):
    """matmul: the GELU-MLP's products with the operands' strides as the MLP passes them (transposed views, not
    copies; NN-copy's b made contiguous inside the timed call), both providers equal to a float64 a @ b; the rows are
    forward only, 2 M N K FLOPs each, their config naming the layout, the product and M, N, K."""
    from tritongpt.kernels import mlp

    m, c, h = 24, 8, 32
    products = kernels.mlp_matmul_operands(m, c, device, torch.float32)
    assert [(layout, product, a.shape, a.stride(), b.shape, b.stride()) for layout, product, a, b in products] == [
        ("NT", "fc1", (m, c), (c, 1), (c, h), (1, c)),    # x @ W1^T: W1 [H, C] read K-contiguous
        ("NN", "dx", (m, h), (h, 1), (h, c), (c, 1)),     # dh @ W1, both row-major
        ("NT", "fc2", (m, h), (h, 1), (h, c), (1, h)),    # a @ W2^T: W2 [C, H]
        ("TN", "dW1", (h, m), (1, h), (m, c), (c, 1)),    # dh^T @ x: A M-contiguous
        ("NN-copy", "fc2", (m, h), (h, 1), (h, c), (1, h))]
    (_, _, x, w1t), (_, _, dh, w1), _, (_, _, dht, x2), _ = products
    assert dht.data_ptr() == dh.data_ptr() and x2 is x and w1t.data_ptr() == w1.data_ptr()  # views of one tensor
    seen = []
    real = mlp._matmul
    monkeypatch.setattr(mlp, "_matmul", lambda a, b, *r, **k: seen.append((a.stride(), b.stride(), r, k,
                                                                           mlp.MATMUL_TMA)) or real(a, b, *r, **k))
    for layout, product, a, b in products:
        want = a.double() @ b.double()
        builders = kernels.matmul_providers(a, b, copy_b=layout == "NN-copy")
        for name in ("torch", "triton", "triton-pointer"):
            f, leaves = builders[name]()
            got = f()
            assert got.shape == want.shape and got.dtype == a.dtype, (layout, name)
            assert torch.allclose(got.double(), want, atol=1e-4), (layout, name)
            assert len(leaves) == 2 and leaves[0] is a and leaves[1] is b
    # ours gets the views as they are (no bias, no epilogue), on the Triton kernel whatever a plain product would
    # pick (cuBLAS is the torch row); only NN-copy's b comes contiguous
    # (triton-pointer: the same call with the TMA configs off, and on again after it)
    assert seen == [(a.stride(), (c, 1) if layout == "NN-copy" else b.stride(), (), {"path": "triton"}, tma)
                    for layout, _, a, b in products for tma in (True, False)]
    assert mlp.MATMUL_TMA
    with pytest.raises(ValueError, match="a \\[M, K\\] and b \\[K, N\\]"):
        kernels.matmul_providers(x, x)
    with pytest.raises(ValueError, match="one dtype"):
        kernels.matmul_providers(x, w1t.double())
    seen.clear()
    rows = kernels.sweep_matmul(quick_timer(), Budget(None), m, (c,), torch.float32,
                                providers=("torch", "triton"))
    # the timer calls each product several times: one entry per run of equal calls
    calls = [call[:2] for i, call in enumerate(seen) if i == 0 or call != seen[i - 1]]
    assert calls == [(a.stride(), (c, 1) if layout == "NN-copy" else b.stride()) for layout, _, a, b in products]
    assert {r["mode"] for r in rows} == {"fwd"} and {r["op"] for r in rows} == {"matmul"}
    assert {r["status"] for r in rows} == {"ok"} and all(r["tflops"] > 0 for r in rows)
    by = {(r["config"]["layout"], r["config"]["product"], r["provider"]): r for r in rows}
    assert len(by) == len(rows) == 5 * 2
    assert by["TN", "dW1", "triton"]["config"] == {"layout": "TN", "product": "dW1", "M": h, "N": c, "K": m, "C": c,
                                                   "dtype": "fp32"}
    assert [(r["config"]["M"], r["config"]["N"], r["config"]["K"], r["flops"]) for r in rows if r["provider"] ==
            "torch"] == [(M, N, K, 2 * M * N * K) for M, N, K in ((m, h, c), (m, c, h), (m, c, h), (h, c, m),
                                                                   (m, c, h))]
    # sorted, each product's two providers sit side by side
    assert [(r["config"]["layout"], r["config"]["product"], r["provider"]) for r in kernels.sort_rows(rows)] == \
        [(layout, product, p) for layout, product in (("NN", "dx"), ("NN-copy", "fc2"), ("NT", "fc1"), ("NT", "fc2"),
                                                      ("TN", "dW1")) for p in ("torch", "triton")]
    assert kernels.sweep_matmul(quick_timer(), Budget(None), m, (c,), torch.float32,
                                modes=("bwd", "fwd+bwd")) == []


def test_int8_linear_rows_time_every_provider_on_one_quantized_weight(device, monkeypatch):
    """int8_linear: every provider computes x @ (q * scale[:, None]).T (+ b) from the same int8 weight (the reference
    and compile dequantizing on each call, torch on a weight dequantized once, torch-int8 through
    aten._weight_int8pack_mm where it runs, ours); the rows are forward only, 2 M N K FLOPs and the int8 weight, its
    fp32 scales, x and y in bytes, each row saying so."""
    from tritongpt.model.quant import quantize_weight  # (what sweep_int8_linear quantizes with)

    monkeypatch.setattr(kernels, "_fresh_compile", lambda fn: fn)  # the function torch.compile would get
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(40, 24, generator=gen) * 24 ** -0.5
    w[3] = 0.0
    q, scale = quantize_weight(w.to(device))
    assert q.dtype == torch.int8 and q.abs().max() == 127 and scale[3] == 1 and (q[3] == 0).all()
    assert (q.double() * scale.double()[:, None] - w.double().to(device)).abs().max() <= scale.max() / 2 + 1e-7
    x = torch.randn(5, 24, generator=gen).to(device)
    b = torch.randn(40, generator=gen).to(device)
    want = x.double() @ (q.double() * scale.double()[:, None]).T + b.double()
    builders = kernels.int8_linear_providers(x, q, scale, b)
    assert set(builders) == set(kernels.PROVIDERS["int8_linear"])
    for name, build in builders.items():
        try:
            f, leaves = build()
        except kernels.Unavailable as e:
            assert name == "torch-int8", (name, e)  # the one provider torch may lack
            continue
        y = f()
        assert y.dtype == x.dtype and torch.allclose(y.double(), want, rtol=1e-5, atol=1e-5), name
    rows = kernels.sweep_int8_linear(quick_timer(), Budget(None), (1, 3), ((24, 40), (16, 8)), torch.float32,
                                     groups=(0,))
    assert {r["op"] for r in rows} == {"int8_linear"} and {r["mode"] for r in rows} == {"fwd"}
    by = {(r["config"]["M"], r["config"]["K"], r["provider"]): r for r in rows}
    assert len(by) == len(rows) == 2 * 2 * 5
    assert by[3, 24, "triton"]["status"] == "ok" and by[3, 24, "reference"]["status"] == "ok"
    assert by[3, 24, "triton"]["flops"] == 2 * 3 * 40 * 24
    assert by[3, 24, "triton"]["bytes"] == 40 * 24 + 4 * 40 + (3 * 24 + 3 * 40) * 4
    assert by[1, 16, "torch"]["bytes"] == 8 * 16 + 4 * 8 + (16 + 8) * 4 and by[1, 16, "torch"]["config"]["N"] == 8
    assert all(r["note"] == kernels.INT8_BYTES_NOTE for r in rows)
    assert kernels.sweep_int8_linear(quick_timer(), Budget(None), (1,), ((16, 8),), torch.float32,
                                     modes=("bwd", "fwd+bwd")) == []


def test_int8_linear_rows_with_group_scales(device, monkeypatch):
    """int8_linear with group scales (a GPTQ 8-bit folder's, scale [N, K / G]): every provider computes x @ W.T + b
    from the same grouped weight, W[n, k] = q[n, k] * scale[n, k // G], but torch-int8, whose op takes one scale a
    row and says so; the sweep's grouped rows name their G (a K G does not divide: the largest group size that
    does; none divides 24) and count a scale a group in their bytes."""
    from tritongpt.model.quant import quantize_weight  # (what sweep_int8_linear quantizes each group with)

    monkeypatch.setattr(kernels, "_fresh_compile", lambda fn: fn)
    gen = torch.Generator().manual_seed(8)
    w = torch.randn(40, 32, generator=gen) * 32 ** -0.5
    w[:, 16:] *= 10  # the second group far larger: a scale read for the other group is seen
    q, scale = quantize_weight(w.view(-1, 16))
    q, scale = q.view(40, 32).to(device), scale.view(40, 2).to(device)
    x = torch.randn(5, 32, generator=gen).to(device)
    b = torch.randn(40, generator=gen).to(device)
    want = x.double() @ (q.double().view(40, 2, 16) * scale.double()[:, :, None]).view(40, 32).T + b.double()
    builders = kernels.int8_linear_providers(x, q, scale, b)
    assert set(builders) == set(kernels.PROVIDERS["int8_linear"])
    with pytest.raises(kernels.Unavailable, match="takes one scale a row, not group scales|has no aten"):
        builders["torch-int8"]()
    for name in ("reference", "torch", "compile", "triton"):
        f, _ = builders[name]()
        y = f()
        assert y.dtype == x.dtype and torch.allclose(y.double(), want, rtol=1e-5, atol=1e-5), name
    rows = kernels.sweep_int8_linear(quick_timer(), Budget(None), (2,), ((32, 40), (24, 8), (64, 8)), torch.float32,
                                     providers=("torch", "triton"), groups=(0, 128))
    assert [(r["config"]["K"], r["config"].get("G"), r["provider"]) for r in rows] == [
        (k, g, p) for k, groups in ((32, (None, 32)), (24, (None,)), (64, (None, 64))) for g in groups
        for p in ("torch", "triton")]
    assert all(r["status"] == "ok" for r in rows), rows
    by = {(r["config"]["K"], r["config"].get("G"), r["provider"]): r for r in rows}
    assert by[32, 32, "triton"]["bytes"] == 40 * 32 + 4 * 40 * 1 + (2 * 32 + 2 * 40) * 4
    assert by[64, 64, "torch"]["bytes"] == 8 * 64 + 4 * 8 * 1 + (2 * 64 + 2 * 8) * 4
    assert by[64, None, "torch"]["bytes"] == 8 * 64 + 4 * 8 + (2 * 64 + 2 * 8) * 4


def test_sink_attention_rows_time_each_provider_on_the_same_sinks(device, monkeypatch):
    """sink_attention (gpt-oss's): the reference module, it compiled and ours compute causal GQA attention with a
    sink logit a query head (over a window where given), against the float64 textbook (softmax over the scores and
    the sink, the sink's column dropped); the sweep's rows name the window (0: causal over all) and count causal
    attention's FLOPs, the window's pairs below T."""
    import math

    from tritongpt.bench.common import attention_flops, window_attention_flops

    monkeypatch.setattr(kernels, "_fresh_compile", lambda fn: fn)
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(1, 4, 20, 16, generator=gen).to(device)
    k, v = (torch.randn(1, 2, 20, 16, generator=gen).to(device) for _ in range(2))
    sinks = (torch.randn(4, generator=gen) * 2).to(device)
    for window in (0, 5):
        kv = [t[:, [0, 0, 1, 1]].double() for t in (k, v)]
        scores = q.double() @ kv[0].transpose(-2, -1) / math.sqrt(16)
        i, j = torch.arange(20, device=device)[:, None], torch.arange(20, device=device)[None, :]
        scores = scores.masked_fill((j > i) | ((j <= i - window) if window else False), float("-inf"))
        sink = sinks.double().view(1, 4, 1, 1).expand(1, 4, 20, 1)
        want = torch.softmax(torch.cat([scores, sink], -1), -1)[..., :-1] @ kv[1]
        builders = kernels.sink_attention_providers(q, k, v, sinks, window)
        assert set(builders) == set(kernels.PROVIDERS["sink_attention"])
        for name, build in builders.items():
            f, leaves = build()
            assert len(leaves) == 4 and leaves[3].shape == (4,)  # the sinks a leaf: bwd times their gradient
            assert torch.allclose(f().double(), want, atol=1e-5), (name, window)
    rows = kernels.sweep_sink_attention(quick_timer(), Budget(None), (16,), ((4, 2, 16),), (8, 0), torch.float32,
                                        tokens=32, providers=("triton",))
    assert [(r["config"]["window"], r["mode"]) for r in rows] == [(w, m) for w in (8, 0) for m in kernels.MODES]
    assert all(r["status"] == "ok" and r["config"]["sinks"] and r["config"]["batch"] == 2 for r in rows), rows
    by = {(r["config"]["window"], r["mode"]): r for r in rows}
    assert by[8, "fwd"]["flops"] == window_attention_flops(2, 4, 16, 8, 16, "fwd") < attention_flops(
        2, 4, 16, 16, 16, True, "fwd") == by[0, "fwd"]["flops"]


def test_int4_linear_rows_time_every_provider_on_one_quantized_weight(device, monkeypatch):
    """int4_linear: every provider computes x @ W.T (+ b), W = q * scale + offset per group, from the same packed
    weight (the reference and compile dequantizing on each call, torch on a weight dequantized once, torch-int4
    through aten._weight_int4pack_mm where it runs: on the CPU always, its _for_cpu form, ours); the rows are forward
    only, 2 M N K FLOPs and the packed weight, its fp32 scales and offsets, x and y in bytes, each row saying so."""
    from tritongpt.model.quant import quantize_weight_int4, unpack_int4  # (what sweep_int4_linear quantizes with)

    monkeypatch.setattr(kernels, "_fresh_compile", lambda fn: fn)
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(48, 64, generator=gen)  # (torch's CPU pack: N a multiple of 16, G 32 up) * 64 ** -0.5
    q, scale, offset = quantize_weight_int4(w.to(device), 32)
    x = torch.randn(5, 64, generator=gen).to(device)
    b = torch.randn(48, generator=gen).to(device)
    wd = (unpack_int4(q).double().view(48, 2, 32) * scale.double()[:, :, None] + offset.double()[:, :, None])
    want = x.double() @ wd.view(48, 64).T + b.double()
    builders = kernels.int4_linear_providers(x, q, scale, offset, b)
    assert set(builders) == set(kernels.PROVIDERS["int4_linear"])
    for name, build in builders.items():
        try:
            f, leaves = build()
        except kernels.Unavailable as e:
            assert name == "torch-int4" and device.type != "cpu", (name, e)  # the one provider torch may lack
            continue
        y = f()
        assert y.dtype == x.dtype and torch.allclose(y.double(), want, rtol=1e-5, atol=1e-5), name
    if device.type == "cpu":  # a pack torch reads otherwise (a version's other nibble order): refused, not timed
        real = torch.ops.aten._weight_int4pack_mm_for_cpu
        # (a context, not monkeypatch.undo(): that would undo the _fresh_compile stand-in too, and the sweep below
        # would run the compiler)
        with monkeypatch.context() as m, pytest.raises(kernels.Unavailable,
                                                       match="gives a different product .* int4 packing"):
            m.setattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", lambda *a: real(*a).flip(-1))
            kernels.int4_linear_providers(x, q, scale, offset, b)["torch-int4"]()
    rows = kernels.sweep_int4_linear(quick_timer(), Budget(None), (1, 3), ((32, 40), (16, 8)), torch.float32,
                                     group_size=16)
    assert {r["op"] for r in rows} == {"int4_linear"} and {r["mode"] for r in rows} == {"fwd"}
    by = {(r["config"]["M"], r["config"]["K"], r["provider"]): r for r in rows}
    assert len(by) == len(rows) == 2 * 2 * 5
    assert by[3, 32, "triton"]["status"] == "ok" and by[3, 32, "reference"]["status"] == "ok"
    assert by[3, 32, "triton"]["flops"] == 2 * 3 * 40 * 32 and by[3, 32, "triton"]["config"]["G"] == 16
    assert by[3, 32, "triton"]["bytes"] == 40 * 32 // 2 + 8 * 40 * 2 + (3 * 32 + 3 * 40) * 4
    assert by[1, 16, "torch"]["bytes"] == 8 * 16 // 2 + 8 * 8 + (16 + 8) * 4 and by[1, 16, "torch"]["config"]["N"] == 8
    assert all(r["note"] == kernels.INT4_BYTES_NOTE for r in rows)
    assert kernels.sweep_int4_linear(quick_timer(), Budget(None), (1,), ((16, 8),), torch.float32,
                                     modes=("bwd", "fwd+bwd"), group_size=16) == []


def test_lora_rows_time_every_provider_adding_the_same_delta_in_place(device):
    """lora: torch (the gather + two bmm's) and ours (the default pick, per row, grouped) add the same per-row delta
    to y in place, rows with index -1 untouched; the rows are forward only, 2 B T R (K + N) FLOPs and x, y twice and
    the used adapters in bytes."""
    gen = torch.Generator().manual_seed(8)
    x, y0 = torch.randn(3, 2, 24, generator=gen).to(device), torch.randn(3, 2, 20, generator=gen).to(device)
    a, b = torch.randn(2, 5, 24, generator=gen).to(device), torch.randn(2, 20, 5, generator=gen).to(device)
    index = torch.tensor([1, -1, 0], device=device)
    want = y0.double().clone()
    for row, s in ((0, 1), (2, 0)):
        want[row] += x[row].double() @ a[s].double().T @ b[s].double().T
    providers = kernels.lora_providers(y := y0.clone(), x, a, b, index)
    assert list(providers) == ["torch", "triton", "triton-rows", "triton-grouped"]
    for name, build in providers.items():
        f, leaves = build()
        assert f() is y and torch.allclose(y.double(), want, rtol=1e-5, atol=1e-5), name
        assert torch.equal(y[1], y0[1]), name
        y.copy_(y0)
    # the sweep's rows on two providers (each of ours costs the interpreter a first launch)
    rows = kernels.sweep_lora(quick_timer(), Budget(None), ((3, 1, 24, 20, 5, 2), (2, 3, 24, 20, 5, 4)),
                              torch.float32, providers=("torch", "triton"))
    by = {(r["config"]["B"], r["provider"]): r for r in rows}
    assert len(by) == len(rows) == 4 and {r["mode"] for r in rows} == {"fwd"}
    assert all(r["status"] == "ok" and r["note"] == kernels.LORA_BYTES_NOTE for r in rows)
    assert by[3, "triton"]["flops"] == 2 * 3 * 5 * 44 and by[3, "triton"]["bytes"] == (3 * 24 + 6 * 20 + 2 * 5 * 44) * 4
    assert by[2, "torch"]["bytes"] == (6 * 24 + 12 * 20 + 2 * 5 * 44) * 4  # 2 rows use 2 of the 4 adapters
    assert kernels.sweep_lora(quick_timer(), Budget(None), ((3, 1, 24, 20, 5, 2),), torch.float32,
                              modes=("bwd", "fwd+bwd")) == []


def test_token_mask_rows_time_every_provider_masking_the_same_tokens(device):
    """token_mask: torch (the reference) and ours give the same masked logits (ours and xgrammar's in place); an
    xgrammar kernel that cannot run here is a skipped row saying why, not a crash; the rows are forward only, for both
    masks, in fp32 and the run's dtype, their bytes the bitmask and the banned logits."""
    from tritongpt.model.sampling import pack_token_bitmask

    gen = torch.Generator().manual_seed(9)
    allowed = torch.rand(3, 70, generator=gen) < 0.5
    logits0 = torch.randn(3, 70, generator=gen).to(device)
    bitmask = pack_token_bitmask(allowed).to(device)
    want = logits0.masked_fill(~allowed.to(device), float("-inf"))
    providers = kernels.token_mask_providers(logits := logits0.clone(), bitmask)
    assert list(providers) == ["torch", "triton", "xgrammar-triton", "xgrammar-cuda"]
    for name in ("torch", "triton"):
        f, _ = providers[name]()
        assert torch.equal(f(), want), name
    assert torch.equal(logits, want)  # ours, in place
    rows = kernels.sweep_token_mask(quick_timer(), Budget(None), (2,), (70,), torch.bfloat16,
                                    providers=("triton", "xgrammar-cuda"))
    assert {(r["provider"], r["config"]["mask"], r["config"]["dtype"]) for r in rows} == {
        (p, m, d) for p in ("triton", "xgrammar-cuda") for m in ("random", "json-string") for d in ("fp32", "bf16")}
    assert {r["mode"] for r in rows} == {"fwd"} and all(r["note"] == kernels.TOKEN_MASK_BYTES_NOTE for r in rows)
    ours = [r for r in rows if r["provider"] == "triton"]
    assert all(r["status"] == "ok" and 2 * 3 * 4 < r["bytes"] < 2 * 3 * 4 + 2 * 70 * 4 for r in ours)
    if not torch.cuda.is_available():
        assert all(r["status"].startswith("skipped: ") for r in rows if r["provider"] == "xgrammar-cuda")
    assert kernels.sweep_token_mask(quick_timer(), Budget(None), (2,), (70,), torch.float32,
                                    modes=("bwd", "fwd+bwd")) == []


def test_sampling_rows_time_every_provider_drawing_inside_the_same_cut(device):
    """sampling: for each setting torch (the reference) and ours draw the same tokens from one seed (both by inverse
    CDF at torch.rand), torch.multinomial draws inside the reference's cut; flashinfer, not installed, is a skipped
    row saying why, not a crash; the rows are forward only, every setting in fp32 and the run's dtype, their rate
    tokens a second (B a call)."""
    from tritongpt.train.generate import sampling_logits

    logits = torch.randn(3, 70, generator=torch.Generator().manual_seed(4)).to(device) * 3
    for name, setting in kernels.SAMPLING_SETTINGS.items():
        providers = kernels.sampling_providers(logits, **setting)
        assert list(providers) == ["torch", "torch-multinomial", "compile", "triton", "flashinfer"]
        kept = sampling_logits(logits, **setting) > float("-inf")
        drawn = {}
        for p in ("torch", "torch-multinomial", "triton"):
            f, _ = providers[p]()
            torch.manual_seed(11)
            drawn[p] = f()
            assert drawn[p].shape == (3,) and kept.gather(1, drawn[p][:, None]).all(), (name, p)
        assert torch.equal(drawn["torch"], drawn["triton"]), name
    rows = kernels.sweep_sampling(quick_timer(), Budget(None), (2,), (70,), torch.bfloat16,
                                  providers=("triton", "flashinfer"))
    assert {(r["provider"], r["config"]["setting"], r["config"]["dtype"]) for r in rows} == {
        (p, s, d) for p in ("triton", "flashinfer") for s in kernels.SAMPLING_SETTINGS for d in ("fp32", "bf16")}
    assert len(rows) == 16 and {r["mode"] for r in rows} == {"fwd"}
    assert {(r["config"]["top_k"], r["config"]["min_p"]) for r in rows
            if r["config"]["setting"] == "top_k+top_p+min_p"} == {(50, 0.05)}
    ours = [r for r in rows if r["provider"] == "triton"]
    assert all(r["status"] == "ok" and r["tokens_per_s"] == 2000 / r["ms"] for r in ours)
    if importlib.util.find_spec("flashinfer") is None:
        assert all(r["status"].startswith("skipped: flashinfer.sampling not importable") for r in rows
                   if r["provider"] == "flashinfer")
    assert kernels.sweep_sampling(quick_timer(), Budget(None), (2,), (70,), torch.float32,
                                  modes=("bwd", "fwd+bwd")) == []


def test_rl_logprobs_providers_agree_and_their_sweep_runs(device):
    """rl_logprobs: torch's log_softmax + gather + entropy and ours (the loss kernel with a temperature and the
    entropy) give the same log-probs, entropies and logits' gradient; the sweep times both in every mode, the
    temperature in each row's config, cross_entropy's bytes."""
    gen = torch.Generator().manual_seed(8)
    x = (torch.randn(6, 70, generator=gen) * 3).to(device).requires_grad_()
    t = torch.randint(0, 70, (6,), generator=gen).to(device)
    providers = kernels.rl_logprobs_providers(x, t)
    assert list(providers) == ["torch", "compile", "triton"]
    out, grads = {}, {}
    for p in ("torch", "triton"):
        f, leaves = providers[p]()
        out[p] = f()
        x.grad = None
        (out[p][0].sum() + out[p][1].sum()).backward()
        grads[p] = x.grad
    for i, what in enumerate(("log-probs", "entropies")):
        assert out["torch"][i].shape == (6,) and out["torch"][i].abs().min() > 0.01, what
        assert torch.allclose(out["triton"][i], out["torch"][i], rtol=1e-5, atol=1e-5), what
    assert torch.allclose(grads["triton"], grads["torch"], rtol=1e-4, atol=1e-6) and grads["torch"].abs().max() > 0
    rows = kernels.sweep_rl_logprobs(quick_timer(), Budget(None), 4, (70,), torch.float32,
                                     providers=("torch", "triton"))
    assert {(r["provider"], r["mode"]) for r in rows} == {(p, m) for p in ("torch", "triton") for m in common.MODES}
    assert all(r["status"] == "ok" and r["config"]["temperature"] == kernels.RL_TEMPERATURE for r in rows), rows
    assert all(r["bytes"] == common.cross_entropy_bytes(4, 70, 4, r["mode"]) for r in rows)


def _fake_flashinfer(monkeypatch, calls, outside=False):
    """flashinfer.sampling stood in by torch functions of its documented signatures, recording which ran; outside:
    each draws the row's least likely token (a peer not cutting as the reference does)."""
    def draw(probs):
        calls.append("draw")
        return (probs.argmin(-1) if outside else torch.multinomial(probs, 1)[:, 0]).int()

    def keep_top_k(probs, k):
        calls.append("top_k_renorm_probs")
        return probs.masked_fill(probs < torch.topk(probs, k).values[:, -1:], 0.0)

    def keep_top_p(probs, p):
        calls.append("top_p_renorm_probs")
        sorted_p, order = torch.sort(probs, descending=True)
        return probs * torch.zeros_like(probs).scatter(-1, order, (sorted_p.cumsum(-1) - sorted_p < p * probs.sum(
            -1, keepdim=True)).float())

    def min_p_sampling_from_probs(probs, min_p):
        calls.append("min_p_sampling_from_probs")
        return draw(probs.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), 0.0))

    def top_k_top_p_sampling_from_logits(logits, top_k, top_p):
        calls.append(f"top_k_top_p_sampling_from_logits k={top_k} p={top_p}")
        return draw(keep_top_p(keep_top_k(torch.softmax(logits, -1), top_k), top_p))

    fi = types.ModuleType("flashinfer")
    fi.sampling = types.SimpleNamespace(sampling_from_probs=draw, top_k_renorm_probs=keep_top_k,
                                        top_p_renorm_probs=keep_top_p,
                                        min_p_sampling_from_probs=min_p_sampling_from_probs,
                                        top_k_top_p_sampling_from_logits=top_k_top_p_sampling_from_logits)
    monkeypatch.setitem(sys.modules, "flashinfer", fi)
    monkeypatch.setitem(sys.modules, "flashinfer.sampling", fi.sampling)


def test_flashinfer_sampling_rows_run_its_kernel_for_each_setting_and_refuse_another_cut(monkeypatch):
    """The flashinfer provider (a stand-in here: no flashinfer on the CPU) runs, per setting, its plain sampler, its
    fused top-k + top-p one (top_k V or top_p 1 for the cut not asked) or the renorms then the min-p sampler, on the
    tempered logits; a peer drawing outside the reference's cut is a skipped row saying so, never a timed one."""
    logits = torch.randn(2, 70, generator=torch.Generator().manual_seed(6)) * 3
    want = {"temperature": ["draw"], "top_k": ["top_k_top_p_sampling_from_logits k=50 p=1.0", "top_k_renorm_probs",
                                              "top_p_renorm_probs", "draw"],
            "top_p": ["top_k_top_p_sampling_from_logits k=70 p=0.9", "top_k_renorm_probs", "top_p_renorm_probs",
                      "draw"],
            "top_k+top_p+min_p": ["top_k_renorm_probs", "top_p_renorm_probs", "min_p_sampling_from_probs", "draw"]}
    for name, setting in kernels.SAMPLING_SETTINGS.items():
        calls = []
        _fake_flashinfer(monkeypatch, calls)
        f, _ = kernels.sampling_providers(logits, **setting)["flashinfer"]()
        del calls[:]
        assert f().shape == (2,) and calls == want[name], name
        _fake_flashinfer(monkeypatch, [], outside=True)
        if name == "temperature":  # no cut: the least likely token is a fair draw
            kernels.sampling_providers(logits, **setting)["flashinfer"]()
            continue
        with pytest.raises(kernels.Unavailable, match="outside sampling_logits' cut"):
            kernels.sampling_providers(logits, **setting)["flashinfer"]()


def test_softcap_attention_rows_time_each_provider_on_the_same_capped_scores(device):
    """softcap_attention: the eager math (which compile compiles) and ours compute causal attention on
    c tanh(s / c), written out here in float64; FlexAttention is timed on CUDA only, flash-attn where
    installed; the FLOPs are causal attention's; the rows carry the cap."""
    from tritongpt.bench.common import attention_flops

    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 37, 16, generator=gen).to(device) for _ in range(3))
    q = q * 3  # scores of a few units, so a cap of 2 bends them
    builders = kernels.softcap_attention_providers(q, k, v, softcap=2.0)
    q64, k64, v64 = (t.double() for t in (q, k, v))
    scores = q64 @ k64.transpose(-2, -1) / 4
    future = torch.ones(37, 37, dtype=torch.bool, device=device).triu(1)
    want = torch.softmax((2.0 * torch.tanh(scores / 2.0)).masked_fill(future, float("-inf")), -1) @ v64
    uncapped = torch.softmax(scores.masked_fill(future, float("-inf")), -1) @ v64
    assert (want - uncapped).abs().max() > 0.1  # the cap bites
    for name in ("reference", "triton"):
        f, leaves = builders[name]()
        assert torch.allclose(f().double(), want, atol=1e-5), name
        assert all(t is u for t, u in zip(leaves, (q, k, v)))
    rows = kernels.sweep_softcap_attention(quick_timer(), Budget(None), (16,), (16,), torch.float32, tokens=32,
                                           width=32, providers=("reference", "flex", "flash-attn"))
    by = {(r["provider"], r["mode"]): r for r in rows}
    assert {r["op"] for r in rows} == {"softcap_attention"}
    assert {r["config"]["softcap"] for r in rows} == {kernels.ATTN_SOFTCAP} == {50.0}
    assert by["reference", "fwd"]["status"] == "ok"
    assert by["reference", "fwd+bwd"]["flops"] == attention_flops(2, 2, 16, 16, 16, True, "fwd+bwd")
    if device.type != "cuda":
        assert by["flex", "fwd"]["status"].startswith("skipped: FlexAttention is timed on CUDA only")
        assert by["flash-attn", "fwd"]["status"].startswith("skipped: ")


def test_alibi_attention_rows_time_each_provider_on_the_same_biased_scores(device):
    """alibi_attention: the reference module, SDPA's float mask and ours compute causal attention on scores plus
    m_h (j - i), written out here in float64 with BLOOM's slopes for 6 heads (not a power of two); FlexAttention
    is timed on CUDA only, flash-attn where installed, FlashAttention-3 never (no ALiBi); the FLOPs are causal
    attention's."""
    from tritongpt.bench.common import attention_flops

    gen = torch.Generator().manual_seed(5)
    T = 37
    q, k, v = (torch.randn(1, 6, T, 16, generator=gen).to(device) for _ in range(3))
    builders = kernels.alibi_attention_providers(q, k, v)
    q64, k64, v64 = (t.double() for t in (q, k, v))
    # transformers' BLOOM slopes for 6 heads: the 4-head rule's, then every other one of the 8-head rule's
    slopes = torch.tensor([2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3], dtype=torch.float64)
    pos = torch.arange(T, dtype=torch.float64)
    bias = slopes[:, None, None] * (pos[None, None, :] - pos[None, :, None])
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    scores = q64 @ k64.transpose(-2, -1) / 4
    want = torch.softmax((scores + bias.to(device)).masked_fill(future.to(device), float("-inf")), -1) @ v64
    plain = torch.softmax(scores.masked_fill(future.to(device), float("-inf")), -1) @ v64
    assert (want - plain).abs().max() > 0.1  # the bias bites
    for name in ("reference", "sdpa-mask", "triton"):
        f, leaves = builders[name]()
        assert torch.allclose(f().double(), want, atol=1e-5), name
        assert all(t is u for t, u in zip(leaves, (q, k, v)))
    rows = kernels.sweep_alibi_attention(quick_timer(), Budget(None), (16,), (16,), torch.float32, tokens=32,
                                         width=32, providers=("reference", "flex", "flash-attn", "flash-attn-3"))
    by = {(r["provider"], r["mode"]): r for r in rows}
    assert {r["op"] for r in rows} == {"alibi_attention"}
    assert by["reference", "fwd"]["status"] == "ok"
    assert by["reference", "fwd+bwd"]["flops"] == attention_flops(2, 2, 16, 16, 16, True, "fwd+bwd")
    assert by["flash-attn-3", "fwd"]["status"] == ("skipped: FlashAttention-3 (flash_attn_interface.flash_attn_func) "
                                                   "has no ALiBi: no alibi_slopes")
    if device.type != "cuda":
        assert by["flex", "fwd"]["status"].startswith("skipped: FlexAttention is timed on CUDA only")
        assert by["flash-attn", "fwd"]["status"].startswith("skipped: ")


def test_alibi_attention_gives_flash_attn_and_flex_the_slopes(monkeypatch):
    """flash-attn takes the model's slopes as alibi_slopes (fp32 [H]) with causal=True; FlexAttention's score_mod
    adds m_h (kv - q) to the score."""
    from tritongpt.model.layers import alibi_slopes

    seen = []

    def fake_flash_attn_func(q, k, v, **options):
        seen.append(options)
        return q
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=fake_flash_attn_func))
    q = kernels.randn(1, 4, 9, 16, device="cpu", dtype=torch.bfloat16)
    f, _ = kernels.alibi_attention_providers(q, q, q)["flash-attn"]()
    assert torch.equal(f(), q)
    (options,) = seen
    assert options.pop("causal") is True and options.pop("alibi_slopes").tolist() == alibi_slopes(4).tolist()
    assert options == {}
    flex = []
    monkeypatch.setattr(kernels, "_flex", lambda q, k, v, mask_mod, score_mod=None: flex.append((mask_mod,
                                                                                             score_mod)))
    kernels.alibi_attention_providers(q, q, q)
    (mask_mod, score_mod), = flex
    s = torch.tensor([-4.0, 0.5, 7.0])
    assert torch.allclose(score_mod(s, 0, 1, 5, 2), s - 3 * alibi_slopes(4)[1])
    qi, ki = torch.arange(5)[:, None], torch.arange(5)[None, :]
    assert torch.equal(mask_mod(0, 0, qi, ki), ki <= qi)


def test_softcap_attention_gives_flash_attn_and_flex_the_cap(monkeypatch):
    """flash-attn (and FA3) take the cap as softcap=c with causal=True; FlexAttention's score_mod is
    c tanh(score / c) (its causal block mask is the compiled function's, CUDA only)."""
    seen = []

    def fake_flash_attn_func(q, k, v, **options):
        seen.append(options)
        return q
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=fake_flash_attn_func))
    q = kernels.randn(1, 2, 9, 16, device="cpu", dtype=torch.bfloat16)
    f, _ = kernels.softcap_attention_providers(q, q, q)["flash-attn"]()
    assert torch.equal(f(), q) and seen == [dict(causal=True, softcap=50.0)]
    flex = []
    monkeypatch.setattr(kernels, "_flex", lambda q, k, v, mask_mod, score_mod=None: flex.append((mask_mod,
                                                                                             score_mod)))
    kernels.softcap_attention_providers(q, q, q, softcap=3.0)
    (mask_mod, score_mod), = flex
    s = torch.tensor([-40.0, -1.0, 0.5, 7.0])
    assert torch.allclose(score_mod(s, 0, 0, 0, 0), 3.0 * torch.tanh(s / 3.0))
    qi, ki = torch.arange(5)[:, None], torch.arange(5)[None, :]
    assert torch.equal(mask_mod(0, 0, qi, ki), ki <= qi)


def test_gqa_attention_gives_flash_attn_the_kv_heads_as_they_are(monkeypatch):
    """flash-attn takes fewer KV heads natively: no repeat before it, [B, T, Hkv, D] as given."""
    seen = []

    def fake_flash_attn_func(q, k, v, **options):
        seen.append((k.shape, v.shape, options))
        return q
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=fake_flash_attn_func))
    q = kernels.randn(1, 4, 9, 16, device="cpu", dtype=torch.bfloat16)
    k = kernels.randn(1, 1, 9, 16, device="cpu", dtype=torch.bfloat16)
    f, _ = kernels.gqa_attention_providers(q, k, k)["flash-attn"]()
    assert torch.equal(f(), q) and seen == [((1, 9, 1, 16), (1, 9, 1, 16), dict(causal=True))]


def test_window_attention_gives_flash_attn_the_band_as_window_size(monkeypatch):
    """flash-attn's window_size=(left, right) counts the keys before and after the query: the last
    `window` positions, the query's own included, are (window - 1, 0), causal."""
    seen = []

    def fake_flash_attn_func(q, k, v, **options):
        seen.append(options)
        return q
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=fake_flash_attn_func))
    q = kernels.randn(1, 2, 9, 16, device="cpu", dtype=torch.bfloat16)
    f, _ = kernels.window_attention_providers(q, q, q, 5)["flash-attn"]()
    assert torch.equal(f(), q) and seen == [dict(causal=True, window_size=(4, 0))]


@pytest.mark.parametrize("op,options", [("doc_attention", {}), ("window_attention", {"window": 8})])
def test_masked_attention_sweeps_skip_the_reference_whose_scores_would_not_fit(op, options, monkeypatch):
    monkeypatch.setattr(kernels, "scores_too_big", lambda *a: "needs ~9 GiB for T x T scores")
    rows = getattr(kernels, f"sweep_{op}")(quick_timer(), Budget(None), (16,), (16,), torch.float32, **options,
                                           tokens=32, width=32, modes=("fwd",), providers=("reference", "sdpa-mask"))
    assert {r["provider"]: r["status"] for r in rows if r["mode"] == "fwd"} == \
        {"reference": "skipped: needs ~9 GiB for T x T scores", "sdpa-mask": "ok"}


def test_the_textbook_attention_is_skipped_where_its_scores_would_not_fit(monkeypatch):
    """scores_too_big: on a GPU whose free memory is under 1.25x the T x T scores' bytes, a reason
    (both attention sweeps skip their reference with it); never on the CPU."""
    need = kernels.reference_attention_bytes(8, 16, 8192, torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (int(need / 0.8) - 1, 80 << 30))
    why = kernels.scores_too_big(8, 16, 8192, torch.bfloat16, torch.device("cuda"))
    assert why is not None and why.startswith(f"needs ~{need / 2**30:.0f} GiB for T x T scores")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (int(need / 0.8) + 1, 80 << 30))
    assert kernels.scores_too_big(8, 16, 8192, torch.bfloat16, torch.device("cuda")) is None
    assert kernels.scores_too_big(8, 16, 8192, torch.bfloat16, torch.device("cpu")) is None


def test_train_row_flops_per_token_by_hand():
    row = train_step.bench_train_provider("reference", "tiny", 2, 16, torch.device("cpu"), torch.float32,
                                          warmup_steps=0, steps=3, peak_flops=1e12)
    assert row["config"]["n_params_non_embedding"] == 1_317_632
    assert row["flops_per_token"] == 6 * 1_317_632 + 12 * 4 * 4 * 32 * 16 == 8_004_096
    assert row["tflops"] == pytest.approx(8_004_096 * row["tokens_per_s"] / 1e12)
    assert row["ms_p20"] <= row["ms"] <= row["ms_p80"]


def test_train_peak_memory_threshold():
    cfg = {"model": "gpt2-small", "batch": 16, "seq_len": 1024}
    rows = [make_row("train", "step", "reference", cfg, "fwd+bwd", ms=9, tokens_per_s=80.0, peak_mem_bytes=100),
            make_row("train", "step", "triton", cfg, "fwd+bwd", ms=4, tokens_per_s=130.0, peak_mem_bytes=72)]
    got = {t["target"]: t for t in train_step.train_targets(rows)}
    assert got["train peak memory / reference eager"]["status"] == "FAIL"


@pytest.mark.parametrize("peak_arg", [None, "400"])
def test_mfu_denominator_units(tmp_path, monkeypatch, peak_arg):
    import json

    from tritongpt import cli
    from tritongpt.bench import cli as bcli

    _cpu_stand_ins(monkeypatch)
    seen = {}
    monkeypatch.setattr(train_step, "run_train", lambda *a, **k: seen.update(peak=a[9]) or [])
    argv = ["bench", "train", "--out", str(tmp_path), "--no-plots"] + (["--peak-tflops", peak_arg] if peak_arg else [])
    assert bcli._run_gpu(cli.build_parser().parse_args(argv)) == 0
    (folder,) = tmp_path.iterdir()
    t = json.loads((folder / "train.json").read_text())
    if peak_arg:
        assert seen["peak"] == 400e12
    else:
        assert seen["peak"] == pytest.approx(t["ceilings"]["matmul"]["tflops"] * 1e12)


def test_rows_table_train_row_and_collapse():
    cfg = {"model": "gpt2-small", "batch": 16, "seq_len": 1024}
    r = make_row("train", "step", "triton", cfg, "fwd+bwd", ms=100.0, tokens_per_s=163840.0, tflops=150.0, mfu=0.42)
    text = report.rows_table([r])
    assert "163,840 tok/s" in text and "42.0%" in text
    c = {"rows": 8, "width": 16}
    bad = [make_row("kernels", "layernorm", "triton", c, "fwd", "skipped: x"),
           make_row("kernels", "layernorm", "triton", c, "bwd", "failed: y")]
    assert len(report.collapse_unmeasured(bad)) == 2
    res = report.make_result("train", common.environment(), [r], peak_flops=989.5e12, peak_flops_source="datasheet")
    assert "MFU denominator: 990 TFLOPS (datasheet)" in report.render_markdown(res)


def test_summary_does_not_call_this_runs_targets_earlier(tmp_path):
    env = common.environment()
    res = report.make_result("kernels", env, [], [common.target("t", "c", 1.0, 1.0)])
    report.write_result(res, tmp_path, plots=False)
    text = report.write_summary([res], tmp_path).read_text()
    assert "earlier run" not in text and text.count("| t | c |") == 1


@pytest.mark.parametrize("saved", ["[]", '"x"', '{"schema": "', json.dumps({"schema": "old", "targets": [{}]}),
                                   "SCHEMA_NO_VALUE", "SCHEMA_TARGETS_5"])
def test_summary_leaves_out_an_earlier_file_it_cannot_read(tmp_path, saved):
    """Before, an earlier kernels.json that was a list, of another schema or with a target missing
    a field stopped `bench train` with a traceback (AttributeError, KeyError, TypeError) after the
    run, at the summary; now that file is left out and this run is summarised."""
    env = common.environment()
    good = report.make_result("kernels", env, [], [common.target("t", "c", 1.0, 1.0)])
    if saved == "SCHEMA_NO_VALUE":
        good["targets"][0].pop("value")
        saved = json.dumps(good)
    elif saved == "SCHEMA_TARGETS_5":
        saved = json.dumps(dict(good, targets=5))
    (tmp_path / env["device_slug"]).mkdir()
    (tmp_path / env["device_slug"] / "kernels.json").write_text(saved)
    train = report.make_result("train", env, [], [common.target("train MFU", "gpt2-small", 0.6, 0.55)])
    text = report.write_summary([train], tmp_path).read_text()
    assert "| train MFU |" in text and "earlier run" not in text


def test_cpu_decode_row_counts_the_new_tokens(monkeypatch):
    """bench cpu's greedy decoding row: the new tokens a second, the prompt's length in its config; a failure
    is a `failed:` row."""
    from tritongpt.bench import cpu

    row = cpu.bench_generate("tiny", prompt_len=8, new_tokens=5, reps=1)
    assert row["status"] == "ok" and row["op"] == "generate" and row["config"]["seq_len"] == 8
    assert row["config"]["new_tokens"] == 5 and row["tokens_per_s"] == pytest.approx(5 / (row["ms"] * 1e-3))
    monkeypatch.setattr("tritongpt.train.generate.generate", lambda *a: 1 / 0)
    assert cpu.bench_generate("tiny", prompt_len=8, new_tokens=5, reps=1)["status"].startswith(
        "failed: ZeroDivisionError")


def test_cpu_rates_use_batch_bytes_and_tokens():
    from tritongpt.bench import cpu

    row = cpu.bench_model_forward("tiny", batch=2, seq_len=16, reps=1)
    assert row["tokens_per_s"] == pytest.approx(32 / (row["ms"] * 1e-3))

    class Tok:
        vocab_size = 300

        def encode(self, text):
            return list(range(len(text) // 2))

    text = "héllo " * 50  # 300 chars, 350 UTF-8 bytes, 150 tokens
    r = cpu.bench_tokenizer(text, reps=1, tokenizer=Tok())[0]
    assert r["tokens"] == 150 and r["tokens_per_s"] == pytest.approx(150 / (r["ms"] * 1e-3))
    assert r["mb_per_s"] == pytest.approx(350 / (r["ms"] * 1e-3) / 1e6)


def test_autotune_choices_name_the_config_triton_picked(monkeypatch):
    # a real triton.autotune run (under the interpreter, with a stand-in timer that makes the
    # second config faster): the record follows Triton's own cache key, values then dtypes
    import triton
    import triton.language as tl

    @triton.jit
    def double(X, Y, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(Y + offs, tl.load(X + offs, mask=offs < N) * 2, mask=offs < N)

    times = [[2.0, 2.0, 2.0], [1.0, 1.0, 1.0]]
    configs = [triton.Config({"BLOCK": 16}, num_warps=4, num_stages=2),
               triton.Config({"BLOCK": 32}, num_warps=2, num_stages=1)]
    tuner = triton.autotune(configs, key=["N"], do_bench=lambda fn, quantiles: (fn(), times.pop(0))[1])(double)
    monkeypatch.setattr(kernel_common, "AUTOTUNED", {})
    kernel_common.autotuned("double", tuner)
    kernel_common.autotuned("untuned", double)  # a plain kernel (the interpreter's attention): no record
    assert kernel_common.autotune_choices() == []
    x = torch.randn(37)
    y = torch.empty_like(x)
    tuner[lambda meta: (triton.cdiv(37, meta["BLOCK"]),)](x, y, 37)
    torch.testing.assert_close(y, 2 * x)
    assert kernel_common.autotune_choices() == [
        {"kernel": "double", "key": {"N": 37}, "dtypes": ["float32"],
         "config": {"BLOCK": 32, "num_warps": 2, "num_stages": 1}}]


def test_every_autotuned_kernel_is_registered():
    # every autotuned launcher the kernel modules define is in the registry the results are
    # named from (the MLP's matmul here; attention's are autotuned on a GPU only), and the
    # attention launchers are registered under their names either way
    import importlib
    import pkgutil

    import triton

    import tritongpt.kernels as package

    modules = {info.name: importlib.import_module(f"tritongpt.kernels.{info.name}")
               for info in pkgutil.iter_modules(package.__path__)}
    registered = {id(t) for t in kernel_common.AUTOTUNED.values()}
    tuned = 0
    for module_name, module in modules.items():
        for name, value in vars(module).items():
            if isinstance(value, triton.runtime.Autotuner):
                tuned += 1
                assert id(value) in registered, f"{module_name}.{name} is autotuned but not registered"
    assert tuned >= 1
    attention = modules["attention"]
    assert kernel_common.AUTOTUNED["attention.forward"] is attention._attn_fwd_run
    assert kernel_common.AUTOTUNED["attention.backward_dkdv"] is attention._attn_bwd_dkdv_run
    assert kernel_common.AUTOTUNED["attention.backward_dq"] is attention._attn_bwd_dq_run
    assert kernel_common.AUTOTUNED["attention.forward_split"] is attention._attn_fwd_split_run


def test_every_compile_time_flag_of_an_autotuned_kernel_is_in_its_key():
    """Autotune caches one config per key: a constexpr flag missing from the key (the MoE kernel's SCATTER_C was)
    reuses the config timed for the other variant of the kernel. Each constexpr must be a key, a config's
    meta-parameter, or derived from a key (PRECISION from the dtypes, which Triton's key holds; LayerNorm's BLOCK_N
    from N; its BLOCK_M and NUM_STAGES come from the prune, which makes them from each config's ELEMS)."""
    import importlib
    import inspect
    import pkgutil

    import triton

    import tritongpt.kernels as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"tritongpt.kernels.{info.name}")
    derived = {"PRECISION", "BLOCK_D"}
    from_prune = {"layernorm.forward": {"BLOCK_M", "BLOCK_N", "NUM_STAGES"},
                  "layernorm.backward": {"BLOCK_M", "BLOCK_N", "NUM_STAGES"}}
    checked = 0
    for name, tuner in kernel_common.AUTOTUNED.items():
        if not isinstance(tuner, triton.runtime.Autotuner):
            continue  # attention's under the interpreter: plain kernels
        fn = getattr(tuner.fn, "fn", tuner.fn)
        flags = [n for n, p in inspect.signature(fn).parameters.items() if "constexpr" in str(p.annotation)]
        meta = set().union(*(c.kwargs for c in tuner.configs))
        missing = [f for f in flags if f not in tuner.keys and f not in meta and f not in derived
                   and f not in from_prune.get(name, ())]
        assert not missing, f"{name}: {missing} not in the autotune key {tuner.keys}"
        checked += 1
    assert checked >= 5


def test_result_autotune_field_is_checked_and_rendered():
    d = _fake_kernel_result()
    d["autotune"] = [{"kernel": "attention.forward", "key": {"HEAD_DIM": 64, "Q_BUCKET": 1024},
                      "dtypes": ["bfloat16", "float32"], "config": {"BLOCK_M": 128, "num_warps": 4}}]
    md = report.render_markdown(report.validate_result(d))
    assert ("| attention.forward | HEAD_DIM=64 Q_BUCKET=1024 | bfloat16, float32 | BLOCK_M=128 num_warps=4 |"
            in md)
    d["autotune"][0].pop("config")
    with pytest.raises(ValueError, match=r"autotune\[0\]"):
        report.validate_result(d)


def test_autotune_timings_read_tritons_saved_searches(tmp_path):
    # files as Triton's Autotuner.check_disk_cache writes them (config.__dict__, [median, p20,
    # p80]), one folder per search; a config that did not fit is timed inf
    import triton

    fast, slow, too_big = (triton.Config({"BLOCK_M": m}, num_warps=w, num_stages=3)
                           for m, w in ((64, 4), (32, 4), (256, 8)))
    search = {"key": [64, True, 1024, "torch.bfloat16"],
              "configs_timings": [(c.__dict__, t) for c, t in ((slow, [0.3, 0.29, 0.31]),
                                                               (too_big, [float("inf")] * 3),
                                                               (fast, [0.2, 0.19, 0.21]))]}
    (tmp_path / "ab12").mkdir()
    (tmp_path / "ab12" / "_attn_fwd.autotune.json").write_text(json.dumps(search))
    (tmp_path / "cd34").mkdir()
    (tmp_path / "cd34" / "_matmul_kernel.autotune.json").write_text("{not json")
    (tmp_path / "cd34" / "_matmul_kernel.json").write_text("{}")  # a compiled kernel's metadata
    out = tmp_path / "timings.json"
    assert report.save_autotune_timings(out, tmp_path) == 1
    (got,) = json.loads(out.read_text())
    # named as the results' "autotune" picks are (the attention kernels are autotuned on a GPU only,
    # so their key names are given here; the MLP's matmul is registered with its keys everywhere)
    named = {"_attn_fwd": ("attention.forward", ["HEAD_DIM", "IS_CAUSAL", "Q_BUCKET"])}
    (entry,) = report.autotune_timings(tmp_path, kernels=named)
    assert entry["kernel"] == "attention.forward" and entry["function"] == "_attn_fwd"
    assert entry["key"] == {"HEAD_DIM": 64, "IS_CAUSAL": True, "Q_BUCKET": 1024} and entry["dtypes"] == ["bfloat16"]
    # the saved file names it from the registry too (its key names are the GPU autotuner's, so the
    # key's shape differs between a GPU and the interpreter: only the names are compared here)
    assert got["kernel"] == "attention.forward" and got["function"] == "_attn_fwd"
    assert report._tuned_kernel_names()["_matmul_kernel"] == ("mlp.matmul", [
        "M_BUCKET", "N", "K_BUCKET", "EPILOGUE", "B_GELU", "B_SWIGLU", "SUM2", "GATE_GELU", "GELU_ERF", "RELU2",
        "STORE_ACT", "HAS_BIAS", "stride_ak", "stride_bn", "TMA_OK", "A_T", "B_T"])
    # a search the kernel saved before its key gained names (another hash folder): not named under the names it
    # would shift under, but kept (its timings are real), marked stale
    (tmp_path / "ef56").mkdir()
    older = dict(search, key=[64, True, "torch.float16"])
    (tmp_path / "ef56" / "_attn_fwd.autotune.json").write_text(json.dumps(older))
    new, old = sorted(report.autotune_timings(tmp_path, kernels=named), key=lambda e: "stale_key" in e)
    assert "stale_key" not in new and new["key"]["Q_BUCKET"] == 1024
    assert old["key"] == [64, True, "torch.float16"] and old["dtypes"] == [] and "older version" in old["stale_key"]
    assert [t["config"]["BLOCK_M"] for t in got["timings"]] == [64, 32, 256]
    assert got["timings"][0] == {"config": {"BLOCK_M": 64, "num_warps": 4, "num_stages": 3}, "ms": [0.2, 0.19, 0.21]}
    assert got["timings"][2]["ms"] is None


def test_backward_of_a_loss_starts_from_one():
    """A loss's backward starts from 1, as loss.backward() in training: Liger's losses skip
    scaling their saved [N, V] gradient then. A random scalar (as for other outputs) timed an
    extra pass over the logits' gradient that training never makes."""
    seen = []

    class Record(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            seen.append(g.clone())
            return g

    x = kernels.randn(4, 5, device="cpu", dtype=torch.float32)
    for mode in ("bwd", "fwd+bwd"):
        seen.clear()
        kernels._mode_fn(lambda: Record.apply(x.sum()), mode)()
        assert seen and torch.equal(seen[-1], torch.ones(())), (mode, seen)
        seen.clear()
        kernels._mode_fn(lambda: Record.apply(x), mode)()  # not a loss: a random gradient
        assert seen[-1].shape == (4, 5) and not torch.equal(seen[-1], torch.ones(4, 5))


def test_liger_cross_entropy_rates_count_the_work_each_mode_does(monkeypatch):
    """Liger's cross-entropy writes the logits' gradient during forward and its backward only
    scales it (nothing when the gradient is 1): its fwd row counts the fwd+bwd bytes and its bwd
    row claims no GB/s (a no-op backward once claimed to move 2*N*V*elem bytes)."""
    from torch.nn.functional import cross_entropy as F_cross_entropy

    made = {}

    class FakeLiger(torch.autograd.Function):  # Liger's plan: gradient in forward, backward scales it
        @staticmethod
        def forward(ctx, x, t):
            g = torch.softmax(x.float(), -1)
            g[torch.arange(len(t)), t] -= 1
            ctx.save_for_backward((g / len(t)).to(x.dtype))
            made["fwd"] = True
            return F_cross_entropy(x.float(), t)

        @staticmethod
        def backward(ctx, grad):
            (g,) = ctx.saved_tensors
            return (g if torch.equal(grad, torch.ones_like(grad)) else g * grad), None

    real = kernels.cross_entropy_providers

    def with_liger(x, t):
        b = real(x, t)
        b["liger"] = lambda: ((lambda: FakeLiger.apply(x, t)), [x])
        return b

    monkeypatch.setattr(kernels, "cross_entropy_providers", with_liger)
    rows = kernels.sweep_cross_entropy(quick_timer(), Budget(None), 8, (30,), torch.bfloat16,
                                       providers=("torch", "liger"))
    by = {(r["provider"], r["mode"]): r for r in rows}
    assert made and all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    nv2 = 8 * 30 * 2
    assert by[("torch", "fwd")]["bytes"] == nv2 and by[("torch", "bwd")]["bytes"] == 2 * nv2
    assert by[("liger", "fwd")]["bytes"] == 3 * nv2 and by[("liger", "fwd+bwd")]["bytes"] == 3 * nv2
    assert "bytes" not in by[("liger", "bwd")] and "gbps" not in by[("liger", "bwd")]
    assert by[("liger", "bwd")]["note"] == "gradients made in forward"


# -- a second mutation pass over bench/: each test below failed on a mutant that passed the rest ----------
def test_gpu_timer_asks_do_bench_for_median_p20_p80_with_the_team_settings(monkeypatch):
    """GpuTimer.bench is do_bench(warmup=25, rep=100, quantiles for the median, p20 and p80), run
    after untimed warm calls (compilation and autotuning are not timed), and returns (median, p20,
    p80). A stand-in do_bench answers each quantile asked for from fixed timings, so a reordered
    quantile list, a swapped return, swapped warmup/rep or no warm call shows here without a GPU."""
    import triton.testing

    times = torch.arange(1.0, 11.0)  # 1..10 ms
    calls, seen = [], {}

    def fake_do_bench(fn, warmup, rep, grad_to_none=None, quantiles=None):
        seen.update(warmup=warmup, rep=rep, grad_to_none=grad_to_none, warm_calls=len(calls))
        fn()
        return [torch.quantile(times, q).item() for q in quantiles]

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    leaves = [torch.zeros(1)]
    med, p20, p80 = common.GpuTimer().bench(lambda: calls.append(1), grad_to_none=leaves)
    # linear interpolation over 1..10: the median at 4.5 -> 5.5, p20 at 1.8 -> 2.8, p80 at 7.2 -> 8.2
    assert (med, p20, p80) == pytest.approx((5.5, 2.8, 8.2))
    assert (seen["warmup"], seen["rep"]) == (25, 100) and seen["grad_to_none"] is leaves
    assert seen["warm_calls"] >= 1
    common.GpuTimer(warmup_ms=7, rep_ms=30).bench(lambda: None)
    assert (seen["warmup"], seen["rep"]) == (7, 30)


def test_gpu_timer_peak_counts_only_what_fn_allocates(monkeypatch):
    """peak_bytes is the allocator's peak while fn runs above what was live before it (inputs,
    weights), with an earlier op's higher peak forgotten. A stand-in CUDA allocator: 4000 bytes
    live, an earlier peak of 10000, and fn making a 1000-byte temporary."""
    mem = {"live": 4000, "peak": 10_000}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a, **k: mem.update(peak=mem["live"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: mem["live"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: mem["peak"])

    def fn():
        mem["peak"] = max(mem["peak"], mem["live"] + 1000)

    assert common.GpuTimer().peak_bytes(fn) == 1000


def test_cpu_timer_resets_gradients_before_each_timed_call():
    """As do_bench's grad_to_none: each timed call starts with the leaves' .grad None, so a timed
    backward writes its gradients rather than adding into the previous call's."""
    x = torch.ones(3, requires_grad=True)
    fresh = []

    def step():
        fresh.append(x.grad is None)
        (2 * x).sum().backward()

    CpuTimer(reps=3, warm_calls=1, warm_s=0.0).bench(step, grad_to_none=[x])
    assert fresh[-3:] == [True, True, True]


def test_median_quantiles_is_the_median_not_the_mean():
    """One slow outlier (a page fault, another process) moves the mean, not the median the rows
    report; p20/p80 by linear interpolation, as torch.quantile computes them."""
    xs = [1.0, 2.0, 3.0, 4.0, 100.0]
    expected = torch.quantile(torch.tensor(xs, dtype=torch.float64), torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    assert common.median_quantiles(xs) == pytest.approx(tuple(expected.tolist()))
    assert common.median_quantiles(xs)[0] == 3.0


def test_time_cpu_times_reps_calls_and_warms_only_when_asked():
    """time_cpu(fn, reps, warm_calls=0) calls fn exactly reps times (the tokenizer bench has
    already run it once, untimed); with warm_calls=1 at least one more call comes first."""
    calls = []
    common.time_cpu(lambda: calls.append(1), reps=4, warm_calls=0)
    assert len(calls) == 4
    calls.clear()
    common.time_cpu(lambda: calls.append(1), reps=4, warm_calls=1)
    assert len(calls) >= 5


def test_budget_sub_is_a_fraction_of_the_time_left():
    """`bench all` gives the kernels half of what is left (Budget.sub(0.5)), so the training step
    still has time; an interrupt of the part stops the whole."""
    whole = Budget(100.0)
    half = whole.sub(0.5)
    assert 49.0 < half.remaining() <= 50.0
    assert Budget(None).sub(0.5).remaining() == float("inf")
    half.interrupt()
    assert whole.expired() and whole.skip_reason().startswith("skipped: interrupted")


def test_kernel_targets_judge_each_width_on_its_own_rows():
    """Two widths, two verdicts: the 1024-wide LayerNorm and MLP lines are judged on the 1024 rows,
    not on the first row of the op (the 768 one) whatever its width."""
    def ln(w):
        return {"rows": 16384, "width": w, "dtype": "bf16"}

    def mlp(w):
        return {"rows": 16384, "width": w, "hidden": 4 * w, "dtype": "bf16"}

    rows = [_k("layernorm", "triton", "fwd+bwd", ln(768), ms=1.0, gbps=900.0),
            _k("layernorm", "triton", "fwd+bwd", ln(1024), ms=2.0, gbps=500.0),
            _k("mlp", "reference", "fwd+bwd", mlp(768), ms=3.0),
            _k("mlp", "triton", "fwd+bwd", mlp(768), ms=2.0),
            _k("mlp", "reference", "fwd+bwd", mlp(1024), ms=3.0),
            _k("mlp", "triton", "fwd+bwd", mlp(1024), ms=3.0)]
    got = {(t["target"], t["config"]): t for t in kernels.kernel_targets(rows, {"copy": {"gbps": 1000.0}})}
    bw = "layernorm bandwidth / copy bandwidth"
    assert got[(bw, "width=768 fwd+bwd")]["value"] == pytest.approx(0.9)
    assert got[(bw, "width=1024 fwd+bwd")]["value"] == pytest.approx(0.5)
    assert got[(bw, "width=1024 fwd+bwd")]["status"] == "FAIL"
    sp = "gelu-mlp speedup vs reference eager"
    assert got[(sp, "width=768 fwd+bwd")]["value"] == pytest.approx(1.5)
    assert got[(sp, "width=1024 fwd+bwd")]["value"] == pytest.approx(1.0)


def test_kernel_speedup_thresholds_at_their_edges():
    """The issue's bars: the GELU-MLP >= 1.15x the reference eager module, attention >= 1.10x the
    best SDPA backend (fwd+bwd). Just under each bar fails."""
    mlp = {"rows": 16384, "width": 768, "hidden": 3072, "dtype": "bf16"}
    att = {"batch": 16, "heads": 32, "seq_len": 1024, "head_dim": 64, "causal": True, "dtype": "bf16"}

    def verdicts(ref_ms, sdpa_ms):
        rows = [_k("mlp", "reference", "fwd+bwd", mlp, ms=ref_ms), _k("mlp", "triton", "fwd+bwd", mlp, ms=1.0),
                _k("attention", "sdpa-flash", "fwd+bwd", att, ms=sdpa_ms),
                _k("attention", "triton", "fwd+bwd", att, ms=1.0)]
        got = {t["target"]: t for t in kernels.kernel_targets(rows, {})}
        return (got["gelu-mlp speedup vs reference eager"]["status"],
                got["attention speedup vs best SDPA backend"]["status"])

    assert verdicts(1.14, 1.09) == ("FAIL", "FAIL")
    assert verdicts(1.15, 1.10) == ("PASS", "PASS")


def test_attention_targets_judge_the_causal_d64_rows_only():
    """The attention targets are for causal attention at D=64, T=1024: a non-causal row or a D=128
    row of the same length, listed first, is not the one judged."""
    att = {"batch": 16, "heads": 32, "seq_len": 1024, "head_dim": 64, "causal": True, "dtype": "bf16"}
    rows = [_k("attention", "triton", "fwd", dict(att, causal=False), ms=0.1, tflops=400.0),
            _k("attention", "triton", "fwd", dict(att, heads=16, head_dim=128), ms=0.1, tflops=450.0),
            _k("attention", "triton", "fwd", att, ms=0.1, tflops=250.0)]
    got = {t["target"]: t for t in kernels.kernel_targets(rows, {})}
    assert got["attention forward TFLOPS"]["value"] == 250.0
    assert got["attention forward TFLOPS"]["status"] == "FAIL"


def test_environment_names_versions_threads_and_utc_time(monkeypatch):
    """The JSON says who measured: torch's and Triton's own versions, torch's CPU thread count
    (what the CPU timings ran with, not the core count) and a UTC timestamp."""
    import datetime

    import triton

    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    env = common.environment()
    assert env["triton"] == triton.__version__ and env["torch"] == torch.__version__
    assert env["cpu_threads"] == 7
    assert datetime.datetime.fromisoformat(env["timestamp"]).utcoffset() == datetime.timedelta(0)


def test_environment_on_a_gpu_names_the_gpu(monkeypatch):
    """With CUDA, the device is the GPU's name (the results' folder too), with its driver and
    compute capability: a stand-in CUDA device here."""
    name = "NVIDIA H100 80GB HBM3"
    props = types.SimpleNamespace(total_memory=80 << 30, multi_processor_count=132, major=9, minor=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: props)
    monkeypatch.setattr(common, "nvidia_driver", lambda: "550.54.15")
    env = common.environment()
    assert env["device"] == name and env["device_slug"] == "nvidia-h100-80gb-hbm3"
    assert env["driver"] == "550.54.15" and env["compute_capability"] == "9.0"
    assert env["cpu"] == common.cpu_name()


def test_dtype_names_are_the_ones_the_flags_take():
    """A row's dtype label reads back, through --dtype's own table, as the dtype it measured."""
    from tritongpt.train.common import pick_dtype

    for dt in (torch.bfloat16, torch.float16, torch.float32):
        assert pick_dtype(common.dtype_name(dt), torch.device("cuda")) == dt


def test_rows_table_shows_each_rows_own_numbers():
    """Each measured row keeps its own line (rows are merged only when skipped/failed alike), its
    timing as median [p20, p80] and a GB/s row its percent of the copy ceiling."""
    c = {"rows": 8, "width": 16}
    rows = [make_row("kernels", "layernorm", "triton", c, "fwd", ms=2.0, ms_p20=1.5, ms_p80=3.0, gbps=500.0),
            make_row("kernels", "layernorm", "triton", c, "bwd", ms=4.0, ms_p20=3.5, ms_p80=5.0, gbps=250.0)]
    kernels.add_ceiling_percent(rows, {"copy": {"gbps": 2000.0}, "matmul": {"tflops": 100.0}})
    lines = [ln for ln in report.rows_table(rows).splitlines() if ln.startswith("| layernorm |")]
    assert len(lines) == 2
    assert "| fwd | triton | 2 [1.5, 3] | 500 GB/s | 25.0% |" in lines[0]  # 500 / 2000
    assert "| bwd | triton | 4 [3.5, 5] | 250 GB/s | 12.5% |" in lines[1]


def test_a_gpu_row_says_its_host_time_and_when_it_is_host_bound():
    """GPU timers also time the host per call, the GPU left running behind; a row whose host time reaches 0.8 of
    its median is called host-bound (do_bench then timed the CPU); a CPU timer records none."""
    c = {"rows": 8, "width": 16}
    rows = [make_row("kernels", "layernorm", "triton", c, "fwd", ms=0.40, ms_p20=0.3, ms_p80=0.5, host_ms=0.39),
            make_row("kernels", "layernorm", "torch", c, "fwd", ms=0.40, ms_p20=0.3, ms_p80=0.5, host_ms=0.05),
            make_row("kernels", "layernorm", "liger", c, "fwd", ms=0.40, ms_p20=0.3, ms_p80=0.5)]
    lines = [ln for ln in report.rows_table(rows).splitlines() if ln.startswith("| layernorm |")]
    assert lines[0].endswith("| ok (host 0.39 ms: host-bound) |")
    assert lines[1].endswith("| ok (host 0.05 ms) |") and lines[2].endswith("| ok |")

    class Timer(common.CpuTimer):  # the GPU timer's host_ms on a CPU: counts calls, reports a fixed time
        calls = []

        def host_ms(self, fn, grad_to_none=None, calls=10):
            Timer.calls.append(fn)
            return 0.25

    x = torch.randn(8, 16, requires_grad=True)
    for timer, want in ((Timer(reps=2, warm_calls=0), 0.25), (common.CpuTimer(reps=2, warm_calls=0), None)):
        row = kernels._bench_one("layernorm", "torch", c, "fwd", lambda: torch.tanh(x), [x], timer, {"bytes": 1})
        assert row["status"] == "ok" and row.get("host_ms") == want
    assert len(Timer.calls) == 1


def test_gpu_timer_host_ms_is_the_mean_host_time_of_unsynced_calls(monkeypatch):
    """host_ms syncs only before and after its calls, clears the leaves' grads before each, and averages."""
    import time as _time

    syncs, seen = [], []
    monkeypatch.setattr(common.GpuTimer, "sync", lambda self: syncs.append(1))
    x = torch.randn(3, requires_grad=True)

    def fn():
        seen.append(x.grad)
        x.grad = torch.ones(3)
        _time.sleep(0.004)

    ms = common.GpuTimer().host_ms(fn, grad_to_none=[x], calls=5)
    assert 4.0 <= ms < 40.0 and len(syncs) == 2 and seen == [None] * 5


def test_targets_saved_table_and_ceilings_render_what_they_hold():
    """A "<=" target says so, a missing value is "-" (not 0), the saved-activation table shows the
    saved bytes (not the output's), and the ceilings section gives the copy's GB/s."""
    t = report.targets_table([target("mem", "w=1", 0.6, 0.7, op="<=", unit="x"), target("speed", "w=1", None, 1.15)])
    assert "| mem | w=1 | 0.6 x | <= 0.7 | PASS |" in t
    assert "| speed | w=1 | - | >= 1.15 | N/A |" in t
    saved = make_row("kernels", "mlp", "triton", {"rows": 8, "width": 16, "dtype": "bf16"}, "saved",
                     saved_bytes=3 * 2**20, output_bytes=2**20)
    assert "| 3.0 MiB | 3,145,728 | ok |" in report.saved_table([saved])
    res = report.make_result("kernels", common.environment(), [],
                             ceilings={"copy": {"bytes": 2 << 30, "ms": 1.0, "gbps": 2000.0}})
    assert "- device copy: 2,000 GB/s (2.0 GiB moved, 1 ms)" in report.render_markdown(res)


def test_console_summary_lists_what_was_not_measured():
    c = {"rows": 8, "width": 16}
    res = report.make_result("kernels", {}, [make_row("kernels", "layernorm", "triton", c, "fwd", ms=1.0),
                                             make_row("kernels", "layernorm", "liger", c, "fwd", "skipped: no liger")])
    text = report.console_summary([res])
    assert "1 row(s) not measured" in text and "skipped: no liger" in text


def test_write_result_refuses_an_invalid_result(tmp_path):
    """Nothing reaches disk that validate_result refuses (here an ok row with no timing)."""
    res = _fake_kernel_result()
    res["rows"][0].pop("ms")
    with pytest.raises(ValueError, match=r"rows\[0\]\.ms"):
        report.write_result(res, tmp_path, plots=False)
    assert list(tmp_path.iterdir()) == []


def test_kernel_plots_draw_each_ops_own_ceiling(tmp_path, monkeypatch):
    """A GB/s plot's dashed line is the copy ceiling, a TFLOPS plot's the matmul ceiling."""
    import matplotlib.axes

    drawn, real = [], matplotlib.axes.Axes.axhline

    def axhline(self, y=0, *a, **k):
        drawn.append((k.get("label"), y))
        return real(self, y, *a, **k)

    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", axhline)
    rows = [_k("layernorm", "torch", "fwd", {"rows": 8, "width": 16}, ms=1.0, gbps=500.0),
            _k("mlp", "torch", "fwd", {"rows": 8, "width": 16}, ms=1.0, tflops=50.0),
            _k("add_layernorm", "torch", "fwd", {"rows": 8, "width": 16}, ms=1.0, gbps=400.0)]
    paths = report.plot_kernels(rows, {"copy": {"gbps": 2000.0}, "matmul": {"tflops": 400.0}}, tmp_path)
    assert sorted(drawn) == [("copy ceiling", 2000.0), ("copy ceiling", 2000.0), ("matmul ceiling", 400.0)]
    assert sorted(p.name for p in paths) == ["add_layernorm.png", "layernorm.png", "mlp.png"]


def test_exact_gelu_mlp_and_partial_rotary_get_their_plots(tmp_path, monkeypatch):
    """mlp_exact_gelu is plotted in TFLOPS against the matmul ceiling by width, rope_partial in GB/s against the
    copy ceiling by heads, a panel row per head dim (Pythia 160M's 64, then 128: Pythia 1.4B's and Phi-4-mini's)."""
    import matplotlib.axes

    drawn, real, real_title = [], matplotlib.axes.Axes.axhline, matplotlib.axes.Axes.set_title

    def axhline(self, y=0, *a, **k):
        drawn.append(k.get("label"))
        return real(self, y, *a, **k)

    def set_title(self, title, *a, **k):  # a panel's title comes after its ceiling line
        drawn[-1] = (title, drawn[-1])
        return real_title(self, title, *a, **k)

    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", axhline)
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", set_title)
    rope = [_k("rope_partial", "triton", "fwd", {"heads": h, "kv_heads": kv, "head_dim": d, "rotary_dim": r},
               ms=1.0, gbps=900.0) for h, kv, d, r in ((12, 12, 64, 16), (16, 16, 128, 32), (24, 8, 128, 96))]
    rows = [_k("mlp_exact_gelu", "triton", "fwd", {"rows": 8, "width": 16}, ms=1.0, tflops=50.0), *rope]
    paths = report.plot_kernels(rows, {"copy": {"gbps": 2000.0}, "matmul": {"tflops": 400.0}}, tmp_path)
    assert sorted(p.name for p in paths) == ["mlp_exact_gelu.png", "rope_partial.png"]
    assert drawn == [("mlp_exact_gelu fwd", "matmul ceiling"), ("rope_partial fwd D=64", "copy ceiling"),
                     ("rope_partial fwd D=128", "copy ceiling")]


def test_lm_head_bias_gets_its_plot(tmp_path, monkeypatch):
    """lm_head_loss_bias is plotted as its siblings are: TFLOPS by vocabulary against the matmul ceiling, a line
    per provider, a panel per mode."""
    import matplotlib.axes

    lines, ceilings = [], []
    real_plot, real_hline = matplotlib.axes.Axes.plot, matplotlib.axes.Axes.axhline
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, *a, **k: lines.append((k.get("label"), list(a[0]), list(a[1])))
                        or real_plot(self, *a, **k))
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline",
                        lambda self, y=0, *a, **k: ceilings.append((k.get("label"), y)) or real_hline(self, y, *a, **k))
    rows = [_k("lm_head_loss_bias", p, m, {"rows": 8, "width": 16, "vocab": v, "head_bias": True}, ms=1.0,
               tflops=tf) for p, m, v, tf in (("triton", "fwd", 64, 40.0), ("triton", "fwd", 32, 30.0),
                                              ("torch", "fwd", 64, 20.0), ("torch", "fwd+bwd", 64, 25.0))]
    paths = report.plot_kernels(rows, {"copy": {"gbps": 2000.0}, "matmul": {"tflops": 400.0}}, tmp_path)
    assert [p.name for p in paths] == ["lm_head_loss_bias.png"]
    assert sorted(lines) == [("torch", [64], [20.0]), ("torch", [64], [25.0]), ("triton", [32, 64], [30.0, 40.0])]
    assert ceilings == [("matmul ceiling", 400.0)] * 2


def test_a_provider_keeps_its_colour_in_every_panel(tmp_path, monkeypatch):
    """matplotlib's colour cycle restarts in each panel: a provider missing from one panel (the H200 run's
    torch.compile at head dim 128) shifted every later provider's colour there. Ours is drawn bolder."""
    import matplotlib.axes

    lines, real_plot = [], matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, *a, **k: lines.append((k["label"], k["color"], k["lw"])) or real_plot(self, *a, **k))
    rows = [_k("attention", p, "fwd", {"seq_len": 256, "head_dim": d}, ms=1.0, tflops=50.0)
            for d, provs in ((64, ("compile", "reference", "sdpa-cudnn", "triton")),
                             (128, ("reference", "sdpa-cudnn", "triton")))
            for p in provs]
    report.plot_kernels(rows, {"matmul": {"tflops": 400.0}}, tmp_path)
    colours = {}
    for label, colour, _ in lines:
        colours.setdefault(label, set()).add(colour)
    assert len(lines) == 7 and all(len(c) == 1 for c in colours.values())
    assert len({c for cs in colours.values() for c in cs}) == 4  # and no two providers share one
    assert {lw for label, _, lw in lines if label == "triton"} == {2.5}
    assert {lw for label, _, lw in lines if label != "triton"} == {1.5}


@pytest.mark.parametrize("slow_median, fast_median", [([0.30, 0.10, 0.31], [0.20, 0.19, 0.21]),   # a lucky p20
                                                       ([0.30, 0.29, 0.31], [0.20, 0.19, 0.50])])  # a noisy p80
def test_autotune_timings_rank_configs_by_their_median(tmp_path, slow_median, fast_median):
    """Fastest first by the median (the first of [median, p20, p80]), not by the p20 or the p80."""
    import triton

    a, b = (triton.Config({"BLOCK_M": m}, num_warps=4, num_stages=3) for m in (32, 64))
    search = {"key": [1], "configs_timings": [(a.__dict__, slow_median), (b.__dict__, fast_median)]}
    (tmp_path / "ab").mkdir()
    (tmp_path / "ab" / "_k.autotune.json").write_text(json.dumps(search))
    (entry,) = report.autotune_timings(tmp_path, kernels={})
    assert [t["config"]["BLOCK_M"] for t in entry["timings"]] == [64, 32]


def test_every_provider_builder_is_in_the_sweep():
    """PROVIDERS (what a sweep runs, what --providers accepts) lists exactly the providers each op's
    builders make: one left out would never be measured, and its target lines would say N/A."""
    x = torch.zeros(4, 8)
    q = torch.zeros(1, 2, 4, 8)
    t = torch.zeros(4, dtype=torch.long)
    built = {"layernorm": kernels.layernorm_providers(x, x[0], x[0]),
             "mlp": kernels.mlp_providers(x, torch.zeros(32, 8), torch.zeros(32), torch.zeros(8, 32), x[0]),
             "attention": kernels.attention_providers(q, q, q),
             "cross_entropy": kernels.cross_entropy_providers(x, t),
             "lm_head_loss": kernels.lm_head_loss_providers(x, torch.zeros(5, 8), t),
             "lm_head_loss_smooth_z": kernels.lm_head_loss_smooth_z_providers(x, torch.zeros(5, 8), t),
             "lm_head_loss_softcap": kernels.lm_head_loss_softcap_providers(x, torch.zeros(5, 8), t),
             "doc_attention": kernels.doc_attention_providers(q, q, q, [3, 1]),
             "window_attention": kernels.window_attention_providers(q, q, q, 2),
             "add_layernorm": kernels.add_layernorm_providers(x, x, x[0], x[0]),
             "rope": kernels.rope_providers(q, q),
             "gqa_attention": kernels.gqa_attention_providers(q, q[:, :1], q[:, :1]),
             "rmsnorm": kernels.rmsnorm_providers(x, x[0]),
             "add_rmsnorm": kernels.add_rmsnorm_providers(x, x, x[0]),
             "swiglu": kernels.swiglu_providers(x, torch.zeros(24, 8), torch.zeros(24, 8), torch.zeros(8, 24)),
             "geglu": kernels.swiglu_providers(x, torch.zeros(24, 8), torch.zeros(24, 8), torch.zeros(8, 24), "gelu"),
             "softcap_attention": kernels.softcap_attention_providers(q, q, q),
             "mlp_exact_gelu": kernels.mlp_providers(x, torch.zeros(32, 8), torch.zeros(32), torch.zeros(8, 32), x[0],
                                                     "none"),
             "rope_partial": kernels.rope_partial_providers(q, q[:, :1], 4),
             "lm_head_loss_bias": kernels.lm_head_loss_bias_providers(x, torch.zeros(5, 8), t, torch.zeros(5)),
             "alibi_attention": kernels.alibi_attention_providers(q, q, q),
             "moe_mlp": kernels.moe_providers(x, t[:, None], torch.ones(4, 1), torch.zeros(1, 24, 8),
                                              torch.zeros(1, 24, 8), torch.zeros(1, 8, 24)),
             "lm_head_distill": kernels.lm_head_distill_providers(x, torch.zeros(5, 8), x, torch.zeros(5, 8), t),
             "decode_attention": kernels.decode_attention_providers(q[:, :, :1], q, q),
             "matmul": kernels.matmul_providers(x, x.t()),
             "int8_linear": kernels.int8_linear_providers(x, torch.zeros(5, 8, dtype=torch.int8), torch.ones(5)),
             "int4_linear": kernels.int4_linear_providers(torch.zeros(3, 16), torch.zeros(5, 8, dtype=torch.uint8),
                                                          torch.ones(5, 1), torch.zeros(5, 1)),
             "lora": kernels.lora_providers(torch.zeros(1, 1, 5), x[None, :1], torch.zeros(1, 2, 8),
                                            torch.zeros(1, 5, 2), torch.zeros(1, dtype=torch.long)),
             "token_mask": kernels.token_mask_providers(x, torch.zeros(4, 1, dtype=torch.int32)),
             "sampling": kernels.sampling_providers(x, 1.0),
             "rl_logprobs": kernels.rl_logprobs_providers(x, t),
             "sink_attention": kernels.sink_attention_providers(q, q[:, :1], q[:, :1], torch.zeros(2))}
    assert set(built) == set(kernels.PROVIDERS)
    for op, builders in built.items():
        assert set(kernels.PROVIDERS[op]) == set(builders), op


def test_layernorm_rows_config_and_bytes_are_the_rows_measured(monkeypatch):
    """On a GPU the sweep raises the row count past the L2 cache: the row's config and its byte
    count must both be for the rows actually timed (here a stand-in doubling them)."""
    monkeypatch.setattr(kernels, "layernorm_rows", lambda rows_m, n, elem, device: 2 * rows_m)
    (r,) = kernels.sweep_layernorm(quick_timer(), Budget(None), 8, (16,), torch.float32, modes=("fwd",),
                                   providers=("torch",))
    assert r["status"] == "ok" and r["config"]["rows"] == 16
    assert r["bytes"] == (16 * 16 + 16 + 16 + 16 * 16) * 4  # read x, weight, bias; write y


def test_attention_shape_keeps_tokens_and_width():
    """FlashAttention's sizing: batch * seq_len = tokens and heads * head_dim = width."""
    b, h = kernels.attention_shape(512, 128, tokens=16384, width=2048)
    assert b * 512 == 16384 and h * 128 == 2048


def test_non_causal_attention_rows_count_the_whole_score_matrix():
    """causal=False: every query sees every key, QK^T and PV of 2*T*T*D each per (batch, head)."""
    (r,) = kernels.sweep_attention(quick_timer(), Budget(None), (16,), (8,), torch.float32, tokens=32,
                                   width=32, modes=("fwd",), providers=("sdpa-flash",), causal=False)
    assert r["status"] == "ok" and r["config"]["causal"] is False
    b, h = r["config"]["batch"], r["config"]["heads"]
    assert (b, h) == (2, 4) and r["flops"] == b * h * 2 * (2 * 16 * 16 * 8)


def test_lm_head_sweep_counts_our_fused_forward_as_fwd_plus_bwd():
    """Our fused LM head + loss makes its gradients in forward: the sweep's fwd row counts its three
    matmuls and the bwd row none (the sweep must name triton among grads_in_forward)."""
    N, C, V = 8, 8, 24
    rows = kernels.sweep_lm_head_loss(quick_timer(), Budget(None), N, (C,), (V,), torch.float32,
                                      modes=("fwd", "bwd"), providers=("triton",))
    by = {r["mode"]: r for r in rows}
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    assert by["fwd"]["flops"] == 3 * (2 * N * C * V)
    assert "flops" not in by["bwd"] and "tflops" not in by["bwd"]


def _lm_head_loss64(h, w, t, label_smoothing=0.0, z_loss=0.0, softcap=0.0, bias=None):
    """The objective written out in float64: (1 - s) * NLL + s * the mean of -log p over the
    vocabulary, plus z_loss * logsumexp(logits)^2, averaged over the rows; the logits h @ w.T (+ bias)
    soft-capped to softcap * tanh(logits / softcap) first when softcap > 0."""
    logits = F.linear(h.double(), w.double(), None if bias is None else bias.double())
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    logp = logits.log_softmax(-1)
    per_row = ((1 - label_smoothing) * -logp.gather(1, t[:, None])[:, 0] + label_smoothing * -logp.mean(-1)
               + z_loss * torch.logsumexp(logits, -1).square())
    return per_row.mean()


def _fake_liger_forward(ctx, h, w, t, bias, label_smoothing, lse_square_scale, softcap, defaults):
    """Liger's plan (the gradients made in forward, scaled in backward) on the bias and options it was
    given (bias None: none; softcap None: no cap); every other argument must be that parameter's default
    (a shifted order would not be)."""
    assert all(v is None for v in defaults[:-2]) and defaults[-2:] == (-100, "mean"), defaults
    with torch.enable_grad():
        hh, ww = h.detach().requires_grad_(), w.detach().requires_grad_()
        bb = bias.detach().requires_grad_() if bias is not None else None
        logits = F.linear(hh, ww, bb).float()
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        loss = (F.cross_entropy(logits, t, label_smoothing=label_smoothing)
                + lse_square_scale * torch.logsumexp(logits, -1).square().mean())
        grads = torch.autograd.grad(loss, (hh, ww) + ((bb,) if bb is not None else ()))
    ctx.save_for_backward(*grads)
    ctx.n_inputs = 4 + 3 + len(defaults)
    return loss.detach()


def _fake_liger_backward(ctx, grad):
    gh, gw, *gb = ctx.saved_tensors
    # in forward's order: _input, weight, target, bias, then the options
    return (gh * grad, gw * grad, None, gb[0] * grad if gb else None) + (None,) * (ctx.n_inputs - 4)


class _OldLiger(torch.autograd.Function):
    """Liger 0.4's order (no ce_weight yet); it returns the loss alone."""
    @staticmethod
    def forward(ctx, _input, weight, target, bias=None, ignore_index=-100, lse_square_scale=0.0,
                label_smoothing=0.0, reduction="mean", softcap=None):
        return _fake_liger_forward(ctx, _input, weight, target, bias, label_smoothing, lse_square_scale, softcap,
                                   (ignore_index, reduction))

    @staticmethod
    def backward(ctx, grad):
        return _fake_liger_backward(ctx, grad)


class _NewLiger(torch.autograd.Function):
    """Newer Liger's order: ce_weight before ignore_index, more options after; it returns (loss, z_loss)."""
    @staticmethod
    def forward(ctx, _input, weight, target, bias=None, ce_weight=None, ignore_index=-100, lse_square_scale=0.0,
                label_smoothing=0.0, reduction="mean", softcap=None, return_z_loss=False, accum_dtype=None):
        assert return_z_loss is False
        loss = _fake_liger_forward(ctx, _input, weight, target, bias, label_smoothing, lse_square_scale, softcap,
                                   (ce_weight, accum_dtype, ignore_index, reduction))
        ctx.n_inputs += 1  # return_z_loss
        return loss, None

    @staticmethod
    def backward(ctx, grad, _):
        return _fake_liger_backward(ctx, grad)


class _OldestLiger(torch.autograd.Function):
    """Before lse_square_scale (z-loss) came in."""
    @staticmethod
    def forward(ctx, _input, weight, target, bias=None, ignore_index=-100, label_smoothing=0.0, reduction="mean"):
        raise AssertionError("never called: it cannot take the z-loss")


def _with_fake_liger(monkeypatch, function):
    module = types.SimpleNamespace(LigerFusedLinearCrossEntropyFunction=function)
    monkeypatch.setitem(sys.modules, "liger_kernel.ops.fused_linear_cross_entropy", module)


# op -> (its providers' builder, its sweep, its options' module constant: None for the plain op)
LM_HEAD_VARIANTS = {
    "lm_head_loss": ("lm_head_loss_providers", "sweep_lm_head_loss", None),
    "lm_head_loss_smooth_z": ("lm_head_loss_smooth_z_providers", "sweep_lm_head_loss_smooth_z", "SMOOTH_Z"),
    "lm_head_loss_softcap": ("lm_head_loss_softcap_providers", "sweep_lm_head_loss_softcap", "SOFTCAP"),
    "lm_head_loss_bias": ("lm_head_loss_bias_providers", "sweep_lm_head_loss_bias", None)}


@pytest.mark.parametrize("op, want_options, liger", [
    ("lm_head_loss", {}, _OldLiger), ("lm_head_loss", {}, _NewLiger),
    ("lm_head_loss_smooth_z", {"label_smoothing": 0.1, "z_loss": 1e-4}, _NewLiger),
    ("lm_head_loss_softcap", {"softcap": 30.0}, _NewLiger),
    ("lm_head_loss_bias", {"head_bias": True}, _OldLiger), ("lm_head_loss_bias", {"head_bias": True}, _NewLiger)])
def test_lm_head_variant_sweep_every_provider_computes_the_same_loss_and_gradients(monkeypatch, op, want_options,
                                                                                   liger):
    """The sweep of an LM head + loss, plain or a variant, on the CPU (ours through the interpreter,
    torch.compile and Liger stood in for): every provider gives the float64 objective's loss and
    gradients with the op's options (none; label smoothing 0.1 and z-loss 1e-4; the logits soft-capped
    at 30; a bias on the head, its gradient too), so one that drops an option fails; the rows name the
    options and count the LM head's FLOPs (three matmuls in forward for the fused ones). The plain op's
    Liger goes through the variants' helper too, so a Liger that returns its loss alone (_OldLiger) works
    there (indexing it failed); the bias goes in Liger's bias place in either order."""
    builder, sweep, constant = LM_HEAD_VARIANTS[op]
    monkeypatch.setattr(kernels, "_fresh_compile", lambda fn: fn)  # the function torch.compile would get
    _with_fake_liger(monkeypatch, liger)
    real, built = getattr(kernels, builder), []

    def keep(h, w, t, *bias, **options):
        built.append((h, w, t, bias, options, real(h, w, t, *bias, **options)))
        return built[-1][-1]

    monkeypatch.setattr(kernels, builder, keep)
    torch.manual_seed(0)
    N, C, V = 8, 8, 24
    rows = getattr(kernels, sweep)(quick_timer(), Budget(None), N, (C,), (V,), torch.float32, modes=("fwd", "bwd"))
    assert all(r["status"] == "ok" for r in rows), [(r["provider"], r["status"]) for r in rows]
    assert {r["op"] for r in rows} == {op} and {r["provider"] for r in rows} == set(kernels.PROVIDERS[op])
    by = {(r["provider"], r["mode"]): r for r in rows}
    assert rows[0]["config"] == {"rows": N, "width": C, "vocab": V, **want_options, "dtype": "fp32"}
    for p in ("triton", "liger"):
        assert by[(p, "fwd")]["flops"] == 3 * (2 * N * C * V) and "flops" not in by[(p, "bwd")]
    assert by[("torch", "fwd")]["flops"] == 2 * N * C * V and by[("torch", "bwd")]["flops"] == 2 * (2 * N * C * V)
    (h, w, t, bias, options, builders), = built
    assert options == (getattr(kernels, constant) if constant else {})
    assert {**options, **({"head_bias": True} if bias else {})} == want_options
    assert len(bias) == (op == "lm_head_loss_bias") and all(b.shape == (V,) and b.dtype == w.dtype for b in bias)
    inputs64 = [x.detach().double().requires_grad_() for x in (h, w, *bias)]
    h64, w64, b64 = *inputs64[:2], (inputs64[2] if bias else None)
    want = _lm_head_loss64(h64, w64, t, **options, bias=b64)
    want_grads = torch.autograd.grad(want, inputs64)
    for name in options:  # each option moves the loss
        assert abs(want - _lm_head_loss64(h64, w64, t, **{**options, name: 0.0}, bias=b64)) > 1e-3, name
    if bias:  # so does the bias
        assert abs(want - _lm_head_loss64(h64, w64, t, **options)) > 1e-3
    for name, build in builders.items():
        forward, leaves = build()
        assert len(leaves) == len(inputs64) and all(a is b for a, b in zip(leaves, (h, w, *bias))), name
        loss = forward()
        grads = torch.autograd.grad(loss, leaves)
        torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")
        for got, ref in zip(grads, want_grads):
            torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("fake, defaults", [(_OldLiger, [None, -100]), (_NewLiger, [None, None, -100])])
def test_lm_head_smooth_z_liger_arguments_follow_its_signature(monkeypatch, fake, defaults):
    """Liger's apply takes positional arguments only, in an order that changed across versions:
    they are built from its forward's signature (the options by name, the rest their defaults),
    so both orders get the z-loss and label smoothing, and its loss comes out of a tuple or not."""
    h, w = (kernels.randn(*s, device="cpu", dtype=torch.float32) for s in ((6, 8), (20, 8)))
    t = torch.randint(0, 20, (6,))
    args = kernels.positional_args(fake, _input=h, weight=w, target=t, lse_square_scale=1e-4, label_smoothing=0.1)
    tail = ["mean", None] + ([False, None] if fake is _NewLiger else [])
    assert args[:3] == [h, w, t] and args[3:] == [*defaults, 1e-4, 0.1, *tail]
    _with_fake_liger(monkeypatch, fake)
    forward, leaves = kernels.lm_head_loss_smooth_z_providers(h, w, t)["liger"]()
    loss = forward()
    assert loss.dim() == 0
    want = _lm_head_loss64(h.double(), w.double(), t, 0.1, 1e-4)
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-6)
    assert leaves == [h, w] and all(g.shape == x.shape for g, x in zip(torch.autograd.grad(loss, leaves), leaves))


def test_lm_head_smooth_z_skips_a_liger_without_the_z_loss(monkeypatch):
    """A Liger from before lse_square_scale cannot time this op: a skipped row naming the parameter."""
    _with_fake_liger(monkeypatch, _OldestLiger)
    (row,) = kernels.sweep_lm_head_loss_smooth_z(quick_timer(), Budget(None), 4, (8,), (20,), torch.float32,
                                                 modes=("fwd",), providers=("liger",))
    assert row["status"] == "skipped: this version's _OldestLiger.forward has no lse_square_scale", row["status"]
    with pytest.raises(kernels.Unavailable, match="has no lse_square_scale, typo$"):
        kernels.positional_args(_OldestLiger, _input=1, weight=2, target=3, lse_square_scale=1e-4, label_smoothing=0.1,
                                typo=1)


@pytest.mark.parametrize("fake", [_OldLiger, _NewLiger])
def test_lm_head_softcap_liger_gets_the_cap_by_name(monkeypatch, fake):
    """Liger's softcap goes in its parameter's place in either order (every other argument its
    default): the loss is that of the capped logits (a cap of 2 moves it far), from a tuple or not."""
    h, w = (kernels.randn(*s, device="cpu", dtype=torch.float32, scale=3.0) for s in ((6, 8), (20, 8)))
    t = torch.randint(0, 20, (6,))
    _with_fake_liger(monkeypatch, fake)
    forward, leaves = kernels.lm_head_loss_softcap_providers(h, w, t, softcap=2.0)["liger"]()
    loss = forward()
    want = _lm_head_loss64(h.double(), w.double(), t, softcap=2.0)
    assert abs(want - _lm_head_loss64(h.double(), w.double(), t)) > 1.0
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-6)
    assert leaves == [h, w] and all(g.shape == x.shape for g, x in zip(torch.autograd.grad(loss, leaves), leaves))


@pytest.mark.parametrize("liger, why", [(_OldestLiger, "this version's _OldestLiger.forward has no softcap"),
                                        (None, "liger_kernel.ops.fused_linear_cross_entropy."
                                               "LigerFusedLinearCrossEntropyFunction not importable")])
def test_lm_head_softcap_skips_a_liger_without_the_cap(monkeypatch, liger, why):
    """A Liger from before its softcap, or none, cannot time this op: a skipped row saying why."""
    if liger is None:
        monkeypatch.setitem(sys.modules, "liger_kernel", None)  # a None entry fails the import
    else:
        _with_fake_liger(monkeypatch, liger)
    (row,) = kernels.sweep_lm_head_loss_softcap(quick_timer(), Budget(None), 4, (8,), (20,), torch.float32,
                                                modes=("fwd",), providers=("liger",))
    assert row["op"] == "lm_head_loss_softcap" and row["status"].startswith(f"skipped: {why}"), row["status"]


def test_lm_head_bias_skips_a_missing_liger_saying_why(monkeypatch):
    """No Liger installed: the head-bias op's liger row is skipped naming what failed to import, the other
    providers' rows still measured."""
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # a None entry fails the import
    rows = kernels.sweep_lm_head_loss_bias(quick_timer(), Budget(None), 4, (8,), (20,), torch.float32,
                                           modes=("fwd",), providers=("torch", "liger"))
    by = {r["provider"]: r for r in rows}
    assert by["torch"]["status"] == "ok" and by["torch"]["config"]["head_bias"] is True
    assert by["liger"]["status"].startswith("skipped: liger_kernel.ops.fused_linear_cross_entropy."
                                            "LigerFusedLinearCrossEntropyFunction not importable"), by["liger"]


def test_lm_head_variants_run_last_of_all_the_soft_cap_last(monkeypatch):
    """lm_head_loss_smooth_z, then lm_head_loss_softcap (both on by default, in the CLI's --ops
    too), run after every other op's rows, the compiled baselines of the rest included, each whole
    in turn, then the newer ops, lm_head_loss_bias the very last: a GPU session whose budget runs out
    loses the head bias first."""
    import inspect

    from tritongpt import cli
    from tritongpt.bench import cli as bcli

    calls = []
    sweeps = {"layernorm": "sweep_layernorm", "mlp": "sweep_mlp", "attention": "sweep_attention",
              "cross_entropy": "sweep_cross_entropy", "lm_head_loss": "sweep_lm_head_loss",
              "add_layernorm": "sweep_add_layernorm", "doc_attention": "sweep_doc_attention",
              "window_attention": "sweep_window_attention", "rope": "sweep_rope",
              "lm_head_loss_smooth_z": "sweep_lm_head_loss_smooth_z",
              "lm_head_loss_softcap": "sweep_lm_head_loss_softcap", "gqa_attention": "sweep_gqa_attention",
              "rmsnorm": "sweep_rmsnorm", "add_rmsnorm": "sweep_add_rmsnorm", "swiglu": "sweep_swiglu",
              "geglu": "sweep_geglu", "softcap_attention": "sweep_softcap_attention",
              "mlp_exact_gelu": "sweep_mlp_exact_gelu", "rope_partial": "sweep_rope_partial",
              "lm_head_loss_bias": "sweep_lm_head_loss_bias", "alibi_attention": "sweep_alibi_attention",
              "moe_mlp": "sweep_moe_mlp", "lm_head_distill": "sweep_lm_head_distill",
              "decode_attention": "sweep_decode_attention", "matmul": "sweep_matmul",
              "int8_linear": "sweep_int8_linear", "int4_linear": "sweep_int4_linear", "lora": "sweep_lora",
              "token_mask": "sweep_token_mask", "sampling": "sweep_sampling", "rl_logprobs": "sweep_rl_logprobs",
              "sink_attention": "sweep_sink_attention"}
    for op, name in sweeps.items():
        monkeypatch.setattr(kernels, name, lambda *a, op=op: calls.append((op, "compile" in a[-1])) or [])
    monkeypatch.setattr(kernels, "measure_ceilings", lambda timer, **k: {})
    kernels.run_kernels(quick_timer(), Budget(None), log=lambda s: None)
    newest = ["lm_head_loss_smooth_z", "lm_head_loss_softcap", "gqa_attention", "rmsnorm", "add_rmsnorm", "swiglu",
              "geglu", "softcap_attention", "mlp_exact_gelu", "rope_partial", "lm_head_loss_bias", "alibi_attention",
              "moe_mlp", "lm_head_distill", "decode_attention", "matmul", "int8_linear", "int4_linear", "lora",
              "token_mask", "sampling", "rl_logprobs", "sink_attention"]
    assert calls[-46:] == [(op, compiled) for op in newest for compiled in (False, True)]  # after them all
    assert {op for op, _ in calls[:-46]} == set(sweeps) - set(newest)
    assert ("doc_attention", True) in calls[:-46]
    parser = cli.build_parser()
    default_ops = parser.parse_args(["bench", "kernels"]).ops.split(",")
    assert default_ops == list(inspect.signature(kernels.run_kernels).parameters["ops"].default)
    assert default_ops[-23:] == newest
    ops, _, _ = bcli.kernel_names(parser.parse_args(["bench", "kernels", "--ops", "lm_head_loss_softcap"]))
    assert ops == ("lm_head_loss_softcap",)


def test_out_of_memory_rows_say_so():
    def build():
        def forward():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward, []

    (r,) = kernels.bench_providers("mlp", {"rows": 1}, {"torch": build}, ("fwd",), quick_timer(),
                                   Budget(None), lambda m: {"flops": 1})
    assert r["status"] == "failed: out of memory"


def test_bwd_mode_times_backward_alone():
    """bwd times backward of a graph built once (retain_graph), never the forward again; fwd+bwd
    runs forward each call."""
    x = kernels.randn(4, 5, device="cpu", dtype=torch.float32)
    forwards = []

    def forward():
        forwards.append(1)
        return 2 * x

    bwd = kernels._mode_fn(forward, "bwd")
    for _ in range(3):
        bwd()
    assert len(forwards) == 1
    both = kernels._mode_fn(forward, "fwd+bwd")
    for _ in range(3):
        both()
    assert len(forwards) == 2 + 3


def _step(model, provider, tok_s, **m):
    cfg = {"model": model, "batch": 16, "seq_len": 1024}
    return make_row("train", "step", provider, cfg, "fwd+bwd", ms=1.0, tokens_per_s=tok_s, **m)


def test_train_targets_ours_is_a_triton_provider_on_gpt2_small():
    """"Ours" is only a Triton provider and only the 124M model's rows count: a faster compiled
    baseline is the baseline, and gpt2-medium rows listed first are not judged."""
    rows = [_step("gpt2-medium", "reference", 50.0, peak_mem_bytes=300),
            _step("gpt2-medium", "reference+compile+sdpa", 60.0, peak_mem_bytes=250),
            _step("gpt2-medium", "triton", 200.0, mfu=0.9, peak_mem_bytes=100),
            _step("gpt2-small", "reference", 80.0, peak_mem_bytes=100),
            _step("gpt2-small", "reference+compile+sdpa", 150.0, mfu=0.7, peak_mem_bytes=90),
            _step("gpt2-small", "triton", 130.0, mfu=0.5, peak_mem_bytes=60)]
    got = {t["target"]: t for t in train_step.train_targets(rows)}
    speed = got["train step speedup vs reference+compile+sdpa"]
    assert speed["value"] == pytest.approx(130 / 150) and speed["status"] == "FAIL"
    assert speed["note"] == "ours = triton"
    assert got["train MFU"]["value"] == 0.5 and got["train MFU"]["status"] == "FAIL"
    assert got["train peak memory / reference eager"]["value"] == pytest.approx(0.6)


def test_train_speedup_threshold_at_its_edge():
    """>= 1.25x reference+compile+sdpa (train_targets' docstring): 1.24x fails."""
    for tok_s, status in ((124.0, "FAIL"), (125.0, "PASS")):
        rows = [_step("gpt2-small", "reference+compile+sdpa", 100.0), _step("gpt2-small", "triton", tok_s)]
        got = {t["target"]: t for t in train_step.train_targets(rows)}
        assert got["train step speedup vs reference+compile+sdpa"]["status"] == status, tok_s


def test_a_soft_capped_models_speedup_is_against_compiled_eager_math():
    """SDPA cannot soft-cap the attention scores: with attn_softcap the baseline is reference+compile,
    named in the target; a plain model never falls back to it (a missing SDPA row is no baseline)."""
    def step(provider, tok_s, cap):
        row = _step("gpt2-small", provider, tok_s)
        row["config"].update({"attn_softcap": cap} if cap else {})
        return row

    for cap in (50.0, 0.0):
        rows = [step("reference+compile+sdpa", 0.0, cap), step("reference+compile", 100.0, cap),
                step("triton", 150.0, cap)]
        rows[0] = make_row("train", "step", "reference+compile+sdpa", rows[0]["config"], "fwd+bwd", "skipped: no cap")
        got = {t["target"]: t for t in train_step.train_targets(rows)}
        if cap:
            assert got["train step speedup vs reference+compile"]["value"] == pytest.approx(1.5)
        else:
            assert got["train step speedup vs reference+compile+sdpa"]["value"] is None


def test_train_step_with_a_non_finite_loss_is_a_failed_row(monkeypatch):
    """A step whose loss is nan measured nothing worth a number: a failed row, no tokens/s."""
    monkeypatch.setattr(train_step, "train_step", lambda *a, **k: torch.tensor(float("nan")))
    row = train_step.bench_train_provider("reference", "tiny", 1, 8, torch.device("cpu"), torch.float32,
                                          warmup_steps=0, steps=1, peak_flops=1e12)
    assert row["status"] == "failed: loss is nan" and "tokens_per_s" not in row and "mfu" not in row


def test_train_row_timing_is_the_median_of_every_timed_step(monkeypatch):
    times = [10.0, 20.0, 30.0, 40.0, 1000.0]
    monkeypatch.setattr(train_step, "time_steps", lambda step, n, device: list(times))
    row = train_step.bench_train_provider("reference", "tiny", 1, 8, torch.device("cpu"), torch.float32,
                                          warmup_steps=1, steps=5)
    assert row["ms"] == 30.0 and row["tokens_per_s"] == pytest.approx(8 / 30e-3)


def test_train_row_config_names_a_padded_vocabulary():
    """--vocab-multiple pads the head: a different workload, so the row's config says so."""
    row = train_step.bench_train_provider("reference", "tiny", 1, 8, torch.device("cpu"), torch.float32,
                                          warmup_steps=0, steps=1, vocab_size=4000, vocab_multiple=64)
    assert row["status"] == "ok" and row["config"]["padded_vocab"] == 4032  # 63 * 64, the next multiple


def _variant_loss64(cfg, x, y, scale):
    """The loss and every parameter's gradient of cfg's model in float64, on the reference path, with
    the weights train_step.build makes (seed 0) scaled, so that the logits reach the cap and the
    attention is sharp enough for a window to matter (at GPT-2's init both barely move the loss)."""
    from tritongpt.model.gpt import GPTModel

    torch.manual_seed(0)
    model = GPTModel(cfg).double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    # the cross-entropy in float64 too (the model's own lm_loss takes it in fp32)
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_every_train_provider_computes_the_same_variant_model(monkeypatch):
    """bench train --attention-window/--window-layers/--logit-softcap: every provider of the step
    times the same model. A tiny local (odd layers, window 4 of 13 positions) and soft-capped model:
    each provider's loss and every parameter's gradient are the float64 reference model's, and
    dropping the window (e.g. the SDPA swap attending over the whole context) or the cap (a loss
    that skips it) moves both far past the tolerance. torch.compile is stood in for by the model it
    would get; the Triton path runs through the interpreter."""
    from dataclasses import replace

    from tritongpt.model.config import GPTConfig

    monkeypatch.setattr(torch, "compile", lambda model: model)
    cfg = GPTConfig(vocab_size=97, context_length=24, n_embd=32, n_layer=2, n_head=2, attention_window=4,
                    window_layers="odd", logit_softcap=0.5)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 97, (2, 13), generator=g), torch.randint(0, 97, (2, 13), generator=g)
    want, want_grads = _variant_loss64(cfg, x, y, scale=5.0)
    for other in (replace(cfg, attention_window=0), replace(cfg, logit_softcap=0.0)):
        loss, grads = _variant_loss64(other, x, y, scale=5.0)
        assert abs(loss - want) / want > 1e-3
        assert max((grads[n] - want_grads[n]).norm() / want_grads[n].norm() for n in grads) > 0.1
    for name in train_step.TRAIN_PROVIDERS:
        model, run, _ = train_step.build(name, cfg, torch.device("cpu"))
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(5.0)
        loss = run(x, targets=y)
        loss.backward()
        rel = (abs(loss.double() - want) / want).item()
        assert rel < 1e-5, (name, rel)
        params = dict(model.named_parameters())
        assert set(params) == set(want_grads)
        for n, p in params.items():
            diff, ref = p.grad.double() - want_grads[n], want_grads[n]
            if "W_key.bias" in n:  # softmax ignores a shift every key shares: a gradient of ~0, judged absolutely
                assert ref.abs().max() < 1e-12 and diff.abs().max() < 1e-6, (name, n, diff.abs().max())
                continue
            err = (diff.norm() / ref.norm()).item()
            assert err < 1e-4, (name, n, err, diff.abs().max().item())


def test_every_train_provider_computes_the_same_granite_model(monkeypatch):
    """bench train --embedding-multiplier/--residual-multiplier/--attention-multiplier: every provider of the step
    times the same Granite-shaped model (RoPE, RMSNorm, SwiGLU, the three muP multipliers), its loss and every
    gradient the float64 reference model's; a model without any one multiplier is far from it, so a provider that
    dropped one (the SDPA swap's scale, the Triton path's residual product) would fail. The row names them."""
    from dataclasses import replace

    from tritongpt import cli
    from tritongpt.bench import cli as bcli
    from tritongpt.errors import UserError
    from tritongpt.model.config import GPTConfig

    monkeypatch.setattr(torch, "compile", lambda model: model)
    cfg = GPTConfig(vocab_size=97, context_length=24, n_embd=32, n_layer=2, n_head=2, norm="rmsnorm", mlp="swiglu",
                    mlp_hidden=40, position_encoding="rope", bias=False, embedding_multiplier=6.0,
                    residual_multiplier=0.3, attention_multiplier=0.5)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randint(0, 97, (2, 13), generator=g), torch.randint(0, 97, (2, 13), generator=g)
    want, want_grads = _variant_loss64(cfg, x, y, scale=3.0)
    for other in (replace(cfg, embedding_multiplier=1.0), replace(cfg, residual_multiplier=1.0),
                  replace(cfg, attention_multiplier=0.0)):
        loss, grads = _variant_loss64(other, x, y, scale=3.0)
        assert max((grads[n] - want_grads[n]).norm() / want_grads[n].norm() for n in grads) > 0.05
    for name in train_step.TRAIN_PROVIDERS:
        model, run, _ = train_step.build(name, cfg, torch.device("cpu"))
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(3.0)
        loss = run(x, targets=y)
        loss.backward()
        assert (abs(loss.double() - want) / want).item() < 1e-5, name
        for n, p in model.named_parameters():
            err = ((p.grad.double() - want_grads[n]).norm() / want_grads[n].norm()).item()
            assert err < 1e-4, (name, n, err)
    args = cli.build_parser().parse_args(["bench", "train", "--embedding-multiplier", "12", "--residual-multiplier",
                                          "0.22", "--attention-multiplier", "0.0078125"])
    flags = bcli.model_flags(args)
    assert (flags["embedding_multiplier"], flags["residual_multiplier"], flags["attention_multiplier"]) == \
        (12.0, 0.22, 0.0078125)
    row = train_step.bench_train_provider("reference", "tiny", 2, 16, torch.device("cpu"), torch.float32, 0, 1,
                                          peak_flops=1e12, vocab_size=64, residual_multiplier=0.22,
                                          attention_multiplier=0.0078125)
    assert row["status"] == "ok"
    assert (row["config"]["residual_multiplier"], row["config"]["attention_multiplier"]) == (0.22, 0.0078125)
    assert "embedding_multiplier" not in row["config"]  # the preset's 1: plain
    assert "Granite's multipliers: residual branches x0.22, attention scores x0.0078125" in report.models_line([row])
    for flag, value in (("--embedding-multiplier", "0"), ("--residual-multiplier", "-1"),
                        ("--attention-multiplier", "nan")):
        with pytest.raises(UserError, match=f"{flag} must be a finite number > 0, got"):
            bcli.cmd_bench(cli.build_parser().parse_args(["bench", "train", flag, value]))


def test_every_train_provider_computes_the_same_llama_model(monkeypatch):
    """bench train --norm rmsnorm --mlp swiglu --position-encoding rope --n-kv-head N --no-bias: every
    provider of the step times the same Llama-shaped model. A tiny one (4 query heads sharing 2 KV heads,
    SwiGLU hidden 48, RoPE theta 500, no biases, 13 positions): each provider's loss and every parameter's
    gradient are the float64 reference model's. The SDPA swap gets q and k rotated and the KV heads as
    they are (a swap that paired query heads with the wrong KV head, or a path that turned by Llama's
    theta 10000, is far past the tolerance); the Triton path runs its RMSNorm, SwiGLU and RoPE kernels
    through the interpreter. torch.compile is stood in for by the model it would get."""
    from dataclasses import replace

    from tritongpt.model.config import GPTConfig

    monkeypatch.setattr(torch, "compile", lambda model: model)
    # two layers: the second block's RMSNorm adds the first's MLP output (add_rms_norm between blocks), which a
    # one-layer model never runs (a Triton block that dropped it passed)
    cfg = GPTConfig(vocab_size=97, context_length=24, n_embd=64, n_layer=2, n_head=4, n_kv_head=2, norm="rmsnorm",
                    mlp="swiglu", mlp_hidden=48, position_encoding="rope", rope_theta=500.0, bias=False)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 97, (2, 13), generator=g), torch.randint(0, 97, (2, 13), generator=g)
    want, want_grads = _variant_loss64(cfg, x, y, scale=5.0)
    loss, grads = _variant_loss64(replace(cfg, rope_theta=10000.0), x, y, scale=5.0)
    assert abs(loss - want) / want > 1e-3
    assert max((grads[n] - want_grads[n]).norm() / want_grads[n].norm() for n in grads) > 0.1
    assert not any(n.endswith("bias") or "pos_emb" in n for n in want_grads)
    assert want_grads["trf_blocks.0.att.W_key.weight"].shape == (2 * 16, 64)  # 2 KV heads of 16
    for name in train_step.TRAIN_PROVIDERS:
        model, run, _ = train_step.build(name, cfg, torch.device("cpu"))
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(5.0)
        loss = run(x, targets=y)
        loss.backward()
        rel = (abs(loss.double() - want) / want).item()
        assert rel < 1e-5, (name, rel)
        params = dict(model.named_parameters())
        assert set(params) == set(want_grads)
        for n, p in params.items():
            diff, ref = p.grad.double() - want_grads[n], want_grads[n]
            err = (diff.norm() / ref.norm()).item()
            assert err < 1e-4, (name, n, err, diff.abs().max().item())


def test_train_row_names_the_variant_and_counts_its_local_layers_by_hand():
    """A variant's row says which model it timed, and its FLOPs count a local layer's attention by
    the pairs its window leaves (bench/common.py's window_attention_flops: T W - W^2 / 2 of the
    causal T^2 / 2), the dense ones as the trainers do (12 C T a token). tiny: C = 128, 4 layers,
    T = 16, window 4: a local layer counts 12 C T * 56 / 128 = 12 * 128 * 7, a dense one 12 * 128 * 16."""
    from tritongpt.model.config import get_config
    from tritongpt.train.loop import flops_per_token

    cpu, n = torch.device("cpu"), 1_317_632
    plain = train_step.bench_train_provider("reference", "tiny", 2, 16, cpu, torch.float32, 0, 1, peak_flops=1e12)
    odd = train_step.bench_train_provider("reference", "tiny", 2, 16, cpu, torch.float32, 0, 1, peak_flops=1e12,
                                          attention_window=4, window_layers="odd", logit_softcap=30.0)
    assert plain["status"] == odd["status"] == "ok" and odd["config"]["n_params_non_embedding"] == n
    assert not {"attention_window", "window_layers", "logit_softcap"} & set(plain["config"])
    assert {k: odd["config"][k] for k in ("attention_window", "window_layers", "logit_softcap")} == \
        {"attention_window": 4, "window_layers": "odd", "logit_softcap": 30.0}
    assert plain["flops_per_token"] == flops_per_token(get_config("tiny"), n, 16) == 6 * n + 4 * 12 * 128 * 16
    assert odd["flops_per_token"] == 6 * n + 2 * 12 * 128 * 16 + 2 * 12 * 128 * 7
    assert odd["mfu"] == pytest.approx(odd["flops_per_token"] * odd["tokens_per_s"] / 1e12)
    every = train_step.bench_train_provider("reference+ckpt", "tiny", 2, 16, cpu, torch.float32, 0, 1,
                                            peak_flops=1e12, attention_window=4)
    assert every["config"]["window_layers"] == "all" and "logit_softcap" not in every["config"]
    assert every["flops_per_token"] == 6 * n + 4 * 12 * 128 * 7
    # the recomputed forward: the block parameters (12C^2 + 13C a layer) and each layer's scores, windowed
    assert every["hw_flops_per_token"] == every["flops_per_token"] + 4 * (2 * (12 * 128 * 128 + 13 * 128)
                                                                          + 4 * 128 * 7)
    # GPT-2 124M with GPT-Neo's window 256 in its odd layers, T = 1024: 6 dense layers, 6 counting
    # 4 C T * (1024 * 256 - 256^2 / 2) / (1024^2 / 2) = 4 C * 448 forward
    neo = get_config("gpt2-small", attention_window=256, window_layers="odd")
    assert train_step.attention_forward_flops(neo, 1024) == 6 * 4 * 768 * 1024 + 6 * 4 * 768 * 448
    # a window the sequence fits in masks nothing: counted dense, an int
    assert train_step.attention_forward_flops(neo, 256) == 12 * 4 * 768 * 256


def test_run_train_passes_the_model_flags_and_names_them_in_every_row(monkeypatch):
    """run_train gives each provider the model flags, and a row it skips unrun (time budget) names
    that model too; its log line and the targets' config say which model was timed."""
    seen, lines = [], []

    def fake(name, model_name, batch, seq_len, *a, **k):
        seen.append(k)
        cfg = {"model": model_name, "batch": batch, "seq_len": seq_len, **train_step.model_variant(
            train_step.train_config(model_name, seq_len, **k))}
        return make_row("train", "step", name, cfg, "fwd+bwd", ms=1.0, tokens_per_s=1.0)

    monkeypatch.setattr(train_step, "bench_train_provider", fake)
    flags = dict(vocab_multiple=64, attention_window=256, window_layers="odd", logit_softcap=30.0)
    rows = train_step.run_train(torch.device("cpu"), Budget(None), models=("gpt2-small",),
                                providers=("reference", "triton"), log=lines.append, **flags)
    assert seen == [flags, flags]
    assert lines[0] == ("train step: gpt2-small padded_vocab=50304 attention_window=256 window_layers=odd "
                        "logit_softcap=30.0 B=16 T=1024 reference ...")
    variant = {"padded_vocab": 50304, "attention_window": 256, "window_layers": "odd", "logit_softcap": 30.0}
    skipped = train_step.run_train(torch.device("cpu"), Budget(0), models=("gpt2-small",), providers=("triton",),
                                   log=lambda s: None, **flags)
    for r in rows + skipped:
        assert {k: r["config"].get(k) for k in variant} == variant, r
    assert skipped[0]["status"] == "skipped: time budget (--max-minutes)"
    assert {t["config"] for t in train_step.train_targets(rows)} == {
        "gpt2-small B=16 T=1024 padded_vocab=50304 attention_window=256 window_layers=odd logit_softcap=30.0"}


def test_bench_train_variant_writes_the_model_into_the_json_and_markdown(tmp_path, monkeypatch):
    """`bench train --attention-window 4 --window-layers odd --logit-softcap 30` as on a GPU, the step
    run on the CPU: the rows' config, the settings, the markdown's table and its models line name
    the local, capped model."""
    from tritongpt.bench import cli as bcli
    from tritongpt.cli import build_parser

    _cpu_stand_ins(monkeypatch)
    real = train_step.run_train
    monkeypatch.setattr(train_step, "run_train", lambda device, *a, **k: real(torch.device("cpu"), *a, **k))
    args = build_parser().parse_args([
        "bench", "train", "--out", str(tmp_path), "--no-plots", "--models", "tiny", "--train-providers", "reference",
        "--batch", "1", "--seq-len", "16", "--steps", "1", "--warmup-steps", "0", "--dtype", "fp32",
        "--peak-tflops", "1", "--attention-window", "4", "--window-layers", "odd", "--logit-softcap", "30"])
    assert bcli._run_gpu(args) == 0
    (folder,) = tmp_path.iterdir()
    t = report.validate_result(json.loads((folder / "train.json").read_text()))
    (row,) = t["rows"]
    assert row["status"] == "ok"
    assert {k: row["config"].get(k) for k in ("attention_window", "window_layers", "logit_softcap")} == \
        {"attention_window": 4, "window_layers": "odd", "logit_softcap": 30.0}
    assert (t["settings"]["attention_window"], t["settings"]["window_layers"], t["settings"]["logit_softcap"]) == \
        (4, "odd", 30.0)
    # the flags' values alone: no parser machinery (a function's repr) among them
    assert [k for k, v in t["settings"].items() if str(v).startswith("<")] == []
    md = (folder / "train.md").read_text()
    assert "| step | model=tiny B=1 T=16 attention_window=4 window_layers=odd logit_softcap=30.0 |" in md
    line = "Models timed, the same for every provider: tiny attention_window=4 window_layers=odd logit_softcap=30.0"
    assert line + "\n" in md
    plain = [make_row("train", "step", "triton", {"model": "gpt2-small"}, "fwd+bwd", ms=1.0)]
    assert report.models_line(plain) == "Models timed, the same for every provider: gpt2-small (the preset as it is)"


def test_bench_train_takes_the_squared_relu_mlps_hidden_size(monkeypatch):
    """`bench train --mlp relu2 --mlp-hidden H` (Arcee's, Nemotron's MLP: GPTConfig.mlp_hidden is its hidden size
    too) gets past the flag checks to the timings (before, refused as a flag that does nothing), and the step it
    times is of that model: a tiny one's row, run on the CPU, names mlp relu2 at hidden H."""
    from tritongpt.bench import cli as bcli
    from tritongpt.cli import build_parser

    ran = []
    monkeypatch.setattr(bcli, "_run_cpu", lambda args, cuda: ran.append(args) or 0)
    monkeypatch.setattr(bcli, "_run_gpu", lambda args: ran.append(args) or 0)
    args = build_parser().parse_args(["bench", "train", "--models", "tiny", "--mlp", "relu2", "--mlp-hidden", "48"])
    assert bcli.cmd_bench(args) == 0 and ran == [args]
    flags = {k: v for k, v in bcli.model_flags(args).items() if v is not None}
    assert (flags["mlp"], flags["mlp_hidden"]) == ("relu2", 48)
    row = train_step.bench_train_provider("reference", "tiny", 1, 8, torch.device("cpu"), torch.float32, 0, 1,
                                          **flags)
    assert row["status"] == "ok" and (row["config"]["mlp"], row["config"]["mlp_hidden"]) == ("relu2", 48), row


LLAMA_FLAGS = ["--norm", "rmsnorm", "--mlp", "swiglu", "--position-encoding", "rope", "--n-kv-head", "4", "--no-bias"]


def test_bench_train_llama_names_the_model_in_rows_log_targets_and_markdown(tmp_path, monkeypatch):
    """`bench train` with Llama's flags as on a GPU, the step run on the CPU: the rows' config, the
    settings, the markdown's table and its models line name the model timed (the SwiGLU hidden size as
    built: Llama's rule when --mlp-hidden is left out), and so do run_train's log line, a row it skips
    unrun and the targets' config; a GPT-2 row names none of it."""
    from tritongpt.bench import cli as bcli
    from tritongpt.cli import build_parser

    _cpu_stand_ins(monkeypatch)
    real = train_step.run_train
    monkeypatch.setattr(train_step, "run_train", lambda device, *a, **k: real(torch.device("cpu"), *a, **k))
    args = build_parser().parse_args([
        "bench", "train", "--out", str(tmp_path), "--no-plots", "--models", "tiny", "--train-providers", "reference",
        "--batch", "1", "--seq-len", "16", "--steps", "1", "--warmup-steps", "0", "--dtype", "fp32",
        "--peak-tflops", "1", "--norm", "rmsnorm", "--mlp", "swiglu", "--mlp-hidden", "200", "--position-encoding",
        "rope", "--rope-theta", "500", "--n-kv-head", "2", "--no-bias"])
    assert bcli._run_gpu(args) == 0
    (folder,) = tmp_path.iterdir()
    t = report.validate_result(json.loads((folder / "train.json").read_text()))
    (row,) = t["rows"]
    llama = {"norm": "rmsnorm", "mlp": "swiglu", "mlp_hidden": 200, "position_encoding": "rope", "rope_theta": 500.0,
             "n_kv_head": 2, "bias": False}
    assert row["status"] == "ok" and {k: row["config"].get(k) for k in llama} == llama
    assert {k: t["settings"][k] for k in llama} == llama
    md = (folder / "train.md").read_text()
    assert ("| step | model=tiny B=1 T=16 norm=rmsnorm mlp=swiglu mlp_hidden=200 position_encoding=rope "
            "rope_theta=500.0 n_kv_head=2 bias=False |") in md
    assert ("Models timed, the same for every provider: tiny with RMSNorm, SwiGLU (hidden 200), RoPE (theta 500), "
            "2 KV heads, no biases\n") in md
    # gpt2-small as a Llama (Llama's rule: 2048 hidden at C = 768), padded: run_train's log, skips, targets
    seen, lines = [], []

    def fake(name, model_name, batch, seq_len, *a, **k):
        seen.append(k)
        cfg = {"model": model_name, "batch": batch, "seq_len": seq_len, **train_step.model_variant(
            train_step.train_config(model_name, seq_len, **k))}
        return make_row("train", "step", name, cfg, "fwd+bwd", ms=1.0, tokens_per_s=1.0)

    monkeypatch.setattr(train_step, "bench_train_provider", fake)
    flags = bcli.model_flags(build_parser().parse_args(["bench", "train", "--vocab-multiple", "64", *LLAMA_FLAGS]))
    rows = real(torch.device("cpu"), Budget(None), models=("gpt2-small",), providers=("triton",), log=lines.append,
                **flags)
    skipped = real(torch.device("cpu"), Budget(0), models=("gpt2-small",), providers=("triton",),
                   log=lambda s: None, **flags)
    assert seen == [flags]
    text = ("gpt2-small padded_vocab=50304 norm=rmsnorm mlp=swiglu mlp_hidden=2048 position_encoding=rope "
            "rope_theta=10000.0 n_kv_head=4 bias=False")
    assert lines[0] == text.replace("gpt2-small", "train step: gpt2-small") + " B=16 T=1024 triton ..."
    assert {t["config"] for t in train_step.train_targets(rows)} == {text.replace(" padded", " B=16 T=1024 padded")}
    assert report.models_line(rows + skipped) == (
        "Models timed, the same for every provider: gpt2-small padded_vocab=50304 with RMSNorm, SwiGLU "
        "(hidden 2048), RoPE (theta 10000), 4 KV heads, no biases")
    assert skipped[0]["config"] == rows[0]["config"]
    # a preset's own heads (--n-kv-head 12 of 12) and biases are GPT-2's: nothing named
    plain = train_step.train_config("gpt2-small", 1024, n_kv_head=12, bias=True, norm="layernorm", mlp="gelu",
                                    position_encoding="learned")
    assert train_step.model_variant(plain) == {}


def test_llama_step_flops_count_its_own_matrices_by_hand():
    """MFU's 6N on a Llama-shaped tiny (C = 128, 4 layers, 4 query heads of 32 sharing 2 KV heads,
    SwiGLU hidden 200, RoPE, no biases, V = 4096 tied): a layer has W_query and out_proj C^2 each, W_key
    and W_value C * 64 each (the KV heads' width, not C), w_gate, w_up and w_down C * 200 each (three,
    not GPT-2's two), two RMSNorm weights C (no biases); then the final norm's C and the tied embedding
    V C; no pos_emb to leave out. Attention's 12 C T a layer counts every query head (GQA shares keys,
    not scores). The checkpointed step's HFU adds each block's forward once more."""
    from tritongpt.model.config import get_config
    from tritongpt.train.loop import flops_per_token

    C, L, T, V, KV, HID = 128, 4, 16, 4096, 2 * 32, 200
    layer = 2 * C * C + 2 * C * KV + 3 * C * HID + 2 * C
    n = L * layer + C + V * C
    assert n == 1_029_248
    flags = dict(norm="rmsnorm", mlp="swiglu", mlp_hidden=HID, position_encoding="rope", n_kv_head=2, bias=False)
    assert flops_per_token(get_config("tiny", **flags), n, T) == 6 * n + 12 * L * C * T == 6_273_792
    cpu = torch.device("cpu")
    row = train_step.bench_train_provider("reference", "tiny", 2, T, cpu, torch.float32, 0, 1, peak_flops=1e12,
                                          **flags)
    ckpt = train_step.bench_train_provider("reference+ckpt", "tiny", 2, T, cpu, torch.float32, 0, 1,
                                           peak_flops=1e12, **flags)
    assert row["status"] == ckpt["status"] == "ok"
    assert row["config"]["n_params_non_embedding"] == n and row["flops_per_token"] == 6_273_792
    assert row["mfu"] == pytest.approx(6_273_792 * row["tokens_per_s"] / 1e12)
    assert ckpt["hw_flops_per_token"] == 6_273_792 + L * (2 * layer + 4 * C * T)


@pytest.mark.parametrize("mode, flags, model", [
    ("window", ["--attention-window", "256", "--window-layers", "odd"],
     dict(attention_window=256, window_layers="odd")),
    ("llama", LLAMA_FLAGS, dict(norm="rmsnorm", mlp="swiglu", position_encoding="rope", n_kv_head=4, bias=False)),
    ("qwen3", LLAMA_FLAGS + ["--attention-head-dim", "128", "--qk-norm"],
     dict(norm="rmsnorm", position_encoding="rope", n_kv_head=4, bias=False, attention_head_dim=128, qk_norm=True)),
    ("gemma3", ["--norm", "rmsnorm", "--mlp", "geglu", "--position-encoding", "rope", "--rope-theta", "1000000",
                "--rope-local-theta", "10000", "--n-kv-head", "1", "--no-bias", "--attention-head-dim", "256",
                "--qk-norm", "--post-norms", "--scale-embeddings", "--attention-window", "512", "--window-layers",
                "0,1,2,3,4,6,7,8,9,10"],
     dict(mlp="geglu", rope_local_theta=10000.0, n_kv_head=1, attention_head_dim=256, qk_norm=True, post_norms=True,
          scale_embeddings=True, attention_window=512, window_layers="0,1,2,3,4,6,7,8,9,10")),
    ("gemma2", ["--norm", "rmsnorm", "--mlp", "geglu", "--position-encoding", "rope", "--n-kv-head", "6", "--no-bias",
                "--attention-head-dim", "256", "--post-norms", "--scale-embeddings", "--attention-window", "512",
                "--window-layers", "0,2,4,6,8,10", "--attn-softcap", "50", "--logit-softcap", "30",
                "--train-providers", "reference,triton,reference+compile,triton+compile"],
     dict(mlp="geglu", n_kv_head=6, attention_head_dim=256, post_norms=True, scale_embeddings=True,
          attention_window=512, window_layers="0,2,4,6,8,10", attn_softcap=50.0, logit_softcap=30.0)),
    ("olmo", ["--norm", "rmsnorm", "--mlp", "swiglu", "--position-encoding", "rope", "--rope-theta", "500000",
              "--no-bias", "--qk-norm", "--qk-norm-width", "all", "--post-norms", "--no-pre-norms"],
     dict(mlp="swiglu", rope_theta=5e5, bias=False, qk_norm=True, qk_norm_width="all", post_norms=True,
          pre_norms=False)),
    ("smollm3", LLAMA_FLAGS + ["--nope-layers", "3,7,11"],
     dict(norm="rmsnorm", position_encoding="rope", n_kv_head=4, nope_layers="3,7,11")),
    ("pythia", ["--position-encoding", "rope", "--rotary-dim", "16", "--parallel-residual", "--gelu-approximate",
                "none"],
     dict(position_encoding="rope", rotary_dim=16, parallel_residual=True, gelu_approximate="none")),
    ("phi", ["--position-encoding", "rope", "--rotary-dim", "32", "--parallel-residual", "--shared-norm",
             "--head-bias"],
     dict(position_encoding="rope", rotary_dim=32, parallel_residual=True, shared_norm=True, head_bias=True,
          gelu_approximate=None)),
    ("falcon", ["--position-encoding", "rope", "--parallel-residual", "--shared-norm", "--n-kv-head", "1",
                "--gelu-approximate", "none", "--no-bias"],
     dict(position_encoding="rope", rotary_dim=None, parallel_residual=True, shared_norm=True, n_kv_head=1,
          gelu_approximate="none", bias=False, head_bias=None)),
    ("moe", LLAMA_FLAGS + ["--n-experts", "8", "--experts-per-token", "2", "--mlp-hidden", "2688"],
     dict(norm="rmsnorm", mlp="swiglu", n_kv_head=4, bias=False, n_experts=8, experts_per_token=2, mlp_hidden=2688)),
    ("bloom", ["--position-encoding", "alibi", "--embed-norm"], dict(position_encoding="alibi", embed_norm=True))])
def test_gpu_session_extra_train_modes_time_gpt2_small_into_their_own_folder(tmp_path, mode, flags, model):
    """`bash bench/gpu_session.sh window`, `... llama`, `... qwen3`, `... gemma3`, `... gemma2`, `... olmo`,
    `... smollm3`, `... pythia`, `... phi`, `... falcon`, `... moe` and `... bloom` (extra runs,
    as padded and lora are) run `bench train` on GPT-2 124M with GPT-Neo's window of 256 in the odd layers, with
    Llama's shape (RMSNorm, SwiGLU, RoPE, 4 KV heads, no biases), that with Qwen3's attention (heads of 128,
    q/k norms), or Gemma 3's or Gemma 2's shape (its attention soft cap), OLMo 2's (norms after each sublayer
    only, q/k norms over all heads), SmolLM3's NoPE layers, Pythia's (RoPE on 16 of 64 dimensions, parallel
    blocks, exact GELU), Phi-2's (RoPE on 32 of 64, parallel blocks on one shared norm, tanh GELU, an LM-head
    bias), Falcon-7B's (RoPE on whole heads, one shared norm, one KV head, exact GELU, no biases) or Llama's with
    Mixtral's experts (8 of hidden 2688, top 2) or BLOOM's (ALiBi, an embedding LayerNorm), into
    results-<mode>/, within its
    budget and hard limit, and pack
    it; the flags pass bench train's own checks and reach the model flags. Python is a stand-in that
    records its arguments (no install, no GPU)."""
    from session_stub import run_gpu_session
    from tritongpt.bench import cli as bcli
    from tritongpt.cli import build_parser

    runs, work, stdout = run_gpu_session(tmp_path, mode, BENCH_MINUTES="0.5")
    (bench,) = [c[2:] for c in runs if c[:2] == ["-m", "tritongpt.cli"]]
    assert bench == ["bench", "train", "--models", "gpt2-small", *flags, "--max-minutes", "0.5", "--out",
                     f"{work}/results-{mode}"]
    assert not any("pytest" in c for c in runs)  # the CUDA tests (and bench all) are not part of it
    args = build_parser().parse_args(bench)
    assert bcli.train_names(args) == (("gpt2-small",), train_step.TRAIN_PROVIDERS if mode != "gemma2" else
                                      ("reference", "triton", "reference+compile", "triton+compile"))
    assert {k: v for k, v in bcli.model_flags(args).items() if k in model} == model
    assert f"== tritongpt bench train {' '.join(flags)}" in stdout
    assert (tmp_path / "out" / "session.tgz").is_file()


def test_run_train_uses_the_batch_asked_for_per_model(monkeypatch):
    seen = []
    monkeypatch.setattr(train_step, "bench_train_provider", lambda name, model, batch, *a, **k: seen.append(
        (model, batch)) or make_row("train", "step", name, {"model": model}, "fwd+bwd", ms=1.0, tokens_per_s=1.0))
    train_step.run_train(torch.device("cpu"), Budget(None), models=("tiny", "gpt2-small"), providers=("reference",),
                         batch={"tiny": 3}, log=lambda s: None)
    assert seen == [("tiny", 3), ("gpt2-small", train_step.DEFAULT_BATCH["gpt2-small"])]


def test_run_train_scales_a_providers_cost_by_depth(monkeypatch):
    """A provider's time on the next model is its time on this one times the depth ratio (dynamo
    traces every layer): 10 s on tiny (4 layers) -> 30 s expected on gpt2-small (12), so with 15 s
    left it is not started. A stand-in clock: each step costs 10 s."""
    clock = [0.0]
    fake_time = types.SimpleNamespace(perf_counter=lambda: clock[0], monotonic=lambda: clock[0])
    monkeypatch.setattr(train_step, "time", fake_time)
    monkeypatch.setattr(common, "time", fake_time)

    def fake(name, model_name, *a, **k):
        clock[0] += 10.0
        return make_row("train", "step", name, {"model": model_name}, "fwd+bwd", ms=1.0, tokens_per_s=1.0)

    monkeypatch.setattr(train_step, "bench_train_provider", fake)
    rows = train_step.run_train(torch.device("cpu"), Budget(25.0), models=("tiny", "gpt2-small"),
                                providers=("reference",), log=lambda s: None)
    assert rows[0]["status"] == "ok"
    assert rows[1]["status"] == "skipped: time budget (~30 s expected from the previous model, 15 s left)"


def _train_only_run(monkeypatch, tmp_path, argv, rows):
    """`bench train` through _run_gpu with CPU stand-ins and given training rows."""
    from tritongpt import cli
    from tritongpt.bench import cli as bcli

    _cpu_stand_ins(monkeypatch)
    seen = {}

    def fake_train(device, budget, dtype, models, providers, batch, seq_len, warmup, steps, peak, **k):
        seen.update(models=models, peak=peak)
        return rows

    monkeypatch.setattr(train_step, "run_train", fake_train)
    args = cli.build_parser().parse_args(["bench", "train", "--out", str(tmp_path), "--no-plots", *argv])
    return bcli._run_gpu(args), seen


def test_strict_exits_1_on_a_failed_target_only(tmp_path, monkeypatch):
    """--strict: exit 1 when a target FAILs; a target that could not be judged (N/A) is not a FAIL."""
    fail = [_step("gpt2-small", "reference", 80.0, peak_mem_bytes=100),
            _step("gpt2-small", "reference+compile+sdpa", 100.0),
            _step("gpt2-small", "triton", 110.0, mfu=0.6, peak_mem_bytes=50)]  # 1.1x < 1.25x
    assert _train_only_run(monkeypatch, tmp_path / "a", ["--strict"], fail)[0] == 1
    assert _train_only_run(monkeypatch, tmp_path / "b", [], fail)[0] == 0
    na = [make_row("train", "step", "triton", {"model": "gpt2-small"}, "fwd+bwd", "skipped: x")]
    assert _train_only_run(monkeypatch, tmp_path / "c", ["--strict"], na)[0] == 0


def test_train_targets_only_when_gpt2_small_was_benchmarked(tmp_path, monkeypatch):
    rows = [_step("gpt2-medium", "triton", 100.0)]
    rc, seen = _train_only_run(monkeypatch, tmp_path, ["--models", "gpt2-medium"], rows)
    assert rc == 0 and seen["models"] == ("gpt2-medium",)
    (folder,) = tmp_path.iterdir()
    assert json.loads((folder / "train.json").read_text())["targets"] == []


def test_mfu_denominator_is_the_flag_then_the_trainers_datasheet_peak(tmp_path, monkeypatch):
    """On a GPU the trainer's datasheet peak (train/loop.py peak_flops) is the MFU denominator
    unless --peak-tflops names one; a stand-in CUDA device with a stand-in datasheet value."""
    from tritongpt.train import loop

    env = common.environment()
    monkeypatch.setattr(common, "environment", lambda: env)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Stand-in GPU")
    monkeypatch.setattr(loop, "peak_flops", lambda device: 123e12)
    rc, seen = _train_only_run(monkeypatch, tmp_path / "a", [], [])
    assert rc == 0 and seen["peak"] == 123e12
    (folder,) = (tmp_path / "a").iterdir()
    assert json.loads((folder / "train.json").read_text())["peak_flops_source"] == \
        "dense bf16 datasheet peak of Stand-in GPU"
    rc, seen = _train_only_run(monkeypatch, tmp_path / "b", ["--peak-tflops", "400"], [])
    assert rc == 0 and seen["peak"] == 400e12


def test_gpu_command_passes_timer_settings_and_halves_the_budget_for_kernels(tmp_path, monkeypatch):
    """`bench all`: the timer gets --warmup-ms/--rep-ms, and the kernels get half the time left
    (Budget.sub(0.5)) so the training step is not starved."""
    from tritongpt import cli
    from tritongpt.bench import cli as bcli

    seen = {}
    monkeypatch.setattr(common, "GpuTimer", lambda *a: seen.update(timer=a) or quick_timer())

    def fake_kernels(timer, budget, *a, **k):
        seen["kernel_budget"] = budget.remaining()
        return [], {}

    monkeypatch.setattr(kernels, "run_kernels", fake_kernels)
    monkeypatch.setattr(train_step, "run_train", lambda *a, **k: [])
    args = cli.build_parser().parse_args(["bench", "all", "--out", str(tmp_path), "--no-plots", "--max-minutes", "10",
                                          "--warmup-ms", "7", "--rep-ms", "30", "--peak-tflops", "100"])
    assert bcli._run_gpu(args) == 0
    assert seen["timer"] == (7, 30, 3, False)  # warm calls; --cuda-graphs off
    assert 290 < seen["kernel_budget"] <= 300


def test_cpu_threads_flag_must_be_positive(monkeypatch):
    refused_before_the_cpu_timings(monkeypatch, ((["cpu", "--threads", "0"], "--threads must be a positive integer"),))


def test_cpu_rows_name_their_section_threads_and_failures():
    """cpu.json's rows are section "cpu" (the MLP's saved bytes too), a model row's config names
    the torch threads it ran with and its n_params counts every parameter once, and a timing that
    raises is a failed row."""
    from tritongpt.bench import cpu

    rows = cpu.mlp_saved_cpu(rows_m=4, width=8, providers=("torch",))
    assert [r["section"] for r in rows] == ["cpu"]
    row = cpu.bench_model_forward("tiny", batch=1, seq_len=8, reps=1)
    assert row["config"]["threads"] == torch.get_num_threads()
    from tritongpt.model.config import get_config
    from tritongpt.model.gpt import GPTModel

    with torch.device("meta"):
        model = GPTModel(get_config("tiny"))
    unique = {id(p): p.numel() for p in model.parameters()}
    assert row["n_params"] == sum(unique.values())

    def broken():
        raise RuntimeError("no")

    r = cpu._timed_row("model-forward", "fwd", {"batch": 1, "seq_len": 8}, broken, reps=1)
    assert r["status"] == "failed: RuntimeError: no"


def test_reference_tokenizer_encodes_only_its_sample():
    """The from-scratch encoder is slow: it gets the first reference_chars characters, and its
    row's config says how many it encoded."""
    from tritongpt.bench import cpu

    class Tok:
        vocab_size = 300

        def encode(self, text):
            return list(text.encode())

        encode_reference = encode

    fast, ref = cpu.bench_tokenizer("abcd" * 100, reps=1, reference_chars=40, tokenizer=Tok())
    assert fast["config"]["chars"] == 400 and fast["tokens"] == 400
    assert ref["config"]["chars"] == 40 and ref["tokens"] == 40


# -- a third mutation pass over bench/: each test below failed on a mutant that passed the rest ----------
def test_layernorm_bytes_count_parameters_at_their_own_width_in_backward():
    """Parameters kept wider than x (fp32 weight, bf16 activations): backward reads the weight and
    writes dweight and dbias, 3 parameter vectors at param_elem bytes, as forward's 2 are."""
    m, n = 4, 8
    fwd = 2 * m * n * 2 + 2 * n * 4  # read x, write y (bf16); read weight, bias (fp32)
    bwd = 3 * m * n * 2 + 3 * n * 4  # read x, dy, write dx; read weight, write dweight, dbias
    assert common.layernorm_bytes(m, n, 2, "bwd", param_elem=4) == bwd == 288
    assert common.layernorm_bytes(m, n, 2, "fwd+bwd", param_elem=4) == fwd + bwd == 480


def test_a_budget_cut_from_an_interrupted_one_is_expired_too():
    """Budget's docstring: an interrupt expires the budget and the one it was cut from; a part
    cut from an interrupted whole (bounded or not) is expired as well, and says why."""
    whole = Budget(100.0)
    part = whole.sub(0.5)
    whole.interrupt()
    assert part.expired() and part.skip_reason().startswith("skipped: interrupted")
    unbounded = Budget(None)
    part = unbounded.sub(0.5)
    assert not unbounded.expired()
    part.interrupt()
    assert unbounded.expired() and unbounded.skip_reason().startswith("skipped: interrupted")


def test_reason_of_is_one_line_of_at_most_limit_characters():
    """A failed row's reason: the exception's kind and first line, cut to `limit` characters with
    "..." (the cut included); a reason exactly `limit` long is kept whole."""
    assert common.reason_of(ValueError("first\nsecond")) == "ValueError: first"
    long = common.reason_of(RuntimeError("x" * 500), limit=40)
    assert len(long) == 40 and long == "RuntimeError: " + "x" * 23 + "..."
    exact = RuntimeError("y" * (40 - len("RuntimeError: ")))
    assert common.reason_of(exact, limit=40) == "RuntimeError: " + "y" * 26
    assert common.reason_of(KeyError()) == "KeyError"


def test_config_text_names_each_dimension_once():
    """The markdown's config column: batch B, heads H, sequence T, head_dim D (an attention row's
    B and H must not read alike), with dtype and causal left to their own columns."""
    cfg = {"batch": 16, "heads": 32, "seq_len": 1024, "head_dim": 64, "causal": True, "dtype": "bf16"}
    assert report.config_text(cfg) == "B=16 H=32 T=1024 D=64"
    assert report.config_text({"rows": 8, "width": 16, "hidden": 64}) == "M=8 N=16"


def test_fmt_bytes_uses_a_unit_from_exactly_one_of_it():
    assert report.fmt_bytes(2**20) == "1.0 MiB" and report.fmt_bytes(2**30) == "1.0 GiB"
    assert report.fmt_bytes(2**10) == "1.0 KiB" and report.fmt_bytes(2**10 - 1) == "1023 B"
    assert report.fmt_bytes(3 * 10**9) == "2.8 GiB"  # binary units, not 10^9


def test_collapse_merges_modes_of_one_config_only():
    """A provider skipped alike in every mode shows once per configuration: the same skip at
    another width is another line, not folded into the first width's."""
    rows = [make_row("kernels", "layernorm", "liger", {"rows": 8, "width": w}, m, "skipped: no liger")
            for w in (16, 32) for m in ("fwd", "bwd")]
    got = report.collapse_unmeasured(rows)
    assert [(r["config"]["width"], r["mode"]) for r in got] == [(16, "fwd,bwd"), (32, "fwd,bwd")]
    lines = [ln for ln in report.rows_table(rows).splitlines() if ln.startswith("| layernorm |")]
    assert len(lines) == 2 and "N=16" in lines[0] and "N=32" in lines[1]


def test_summary_keeps_the_earlier_train_targets_after_a_kernels_run(tmp_path):
    """write_summary: a GPU section this run did not measure keeps its saved targets, the training
    step's as well as the kernels' (a `bench kernels` after a `bench train`)."""
    env = common.environment()
    train = report.make_result("train", env, [], [common.target("train MFU", "gpt2-small", 0.6, 0.55)])
    report.write_result(train, tmp_path, plots=False)
    res = report.make_result("kernels", env, [], [common.target("t", "c", 1.0, 1.0)])
    text = report.write_summary([res], tmp_path).read_text()
    assert "| train MFU |" in text and "| t | c |" in text
    assert "train targets are from the earlier run of" in text


def test_env_lines_name_the_load_average():
    """CPU timings on a busy machine are slower: the markdown says the load average it ran under."""
    assert "- load_avg_1m: 3.5" in report.env_lines({"device": "cpu", "load_avg_1m": 3.5})


def test_comma_lists_must_name_something():
    """A list flag of only commas is refused (it once ran a sweep of nothing and said nothing)."""
    from tritongpt.bench import cli as bcli
    from tritongpt.errors import UserError

    with pytest.raises(UserError, match="--ln-widths must list positive integers"):
        bcli._ints(",", "ln-widths")
    with pytest.raises(UserError, match="--ops: unknown"):
        bcli._names(" , ", ("layernorm", "mlp"), "ops")


def test_zero_warmup_ms_is_allowed():
    """--warmup-ms must be >= 0 (its own message): 0 is a valid do_bench warm-up."""
    from tritongpt.bench import cli as bcli
    from tritongpt.cli import build_parser

    args = build_parser().parse_args(["bench", "kernels", "--warmup-ms", "0", "--rep-ms", "1"])
    assert bcli.kernel_sizes(args)["ln_rows"] == kernels.FULL_SIZES["ln_rows"]


def test_a_kernel_size_flags_help_states_the_sizes_a_run_uses_quick_or_not():
    """The size flags default to None, kernel_sizes taking FULL_SIZES' or, with --quick, QUICK_SIZES': each help's
    stated default, given back as the flag, is what the run uses (before, they named the full sweep's alone:
    --ln-rows "default 16384", which --quick runs at 4096)."""
    import argparse
    import re

    from tritongpt.bench import cli as bcli
    from tritongpt.cli import build_parser

    parser = build_parser()
    bench = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["bench"]
    # "default 512,1024, --quick 1024)": a value runs to the ", " or ";" or ")" after it
    stated = re.compile(r"default ([\d:,]+?)(?:, --quick ([\d:,]+?))?(?=, |;|\))")
    checked = 0
    for a in bench._actions:
        if a.dest not in kernels.FULL_SIZES or a.default is not None or "default" not in (a.help or ""):
            continue
        m = stated.search(a.help)
        assert m, f"{a.option_strings[0]}: no default in {a.help!r}"
        for quick, value in ((False, m.group(1)), (True, m.group(2) or m.group(1))):
            flags = ["--quick"] * quick
            runs = bcli.kernel_sizes(parser.parse_args(["bench", "kernels", *flags]), quick)[a.dest]
            says = bcli.kernel_sizes(parser.parse_args(["bench", "kernels", *flags, a.option_strings[0], value]),
                                     quick)[a.dest]
            assert says == runs, f"{a.option_strings[0]}{' --quick' * quick}: help says {value}, runs {runs}"
        checked += 1
    assert checked >= 9

def test_kernels_alone_get_the_whole_budget(tmp_path, monkeypatch):
    """Only `bench all` halves the budget for the kernels (the training step needs the rest);
    `bench kernels --max-minutes 10` gives them all 600 s."""
    from tritongpt import cli
    from tritongpt.bench import cli as bcli

    seen = {}
    monkeypatch.setattr(common, "GpuTimer", lambda *a: quick_timer())

    def fake_kernels(timer, budget, *a, **k):
        seen["kernel_budget"] = budget.remaining()
        return [], {}

    monkeypatch.setattr(kernels, "run_kernels", fake_kernels)
    args = cli.build_parser().parse_args(["bench", "kernels", "--out", str(tmp_path), "--no-plots",
                                          "--max-minutes", "10"])
    assert bcli._run_gpu(args) == 0
    assert 590 < seen["kernel_budget"] <= 600


def test_training_steps_default_to_three_warm_and_ten_timed(tmp_path, monkeypatch):
    """--warmup-steps and --steps default to 3 and 10 (--quick: 2 and 4), as their help says."""
    from tritongpt import cli
    from tritongpt.bench import cli as bcli

    _cpu_stand_ins(monkeypatch)
    seen = []
    monkeypatch.setattr(train_step, "run_train", lambda device, budget, dtype, models, providers, batch, seq_len,
                        warmup, steps, peak, **k: seen.append((warmup, steps)) or [])
    for i, extra in enumerate(([], ["--quick"], ["--warmup-steps", "0", "--steps", "1"])):
        args = cli.build_parser().parse_args(["bench", "train", "--out", str(tmp_path / str(i)), "--no-plots",
                                              "--peak-tflops", "100", *extra])
        assert bcli._run_gpu(args) == 0
    assert seen == [(3, 10), (2, 4), (0, 1)]


def test_modes_flag_takes_the_timed_modes_only():
    """"saved" is a row kind (the MLP's activation bytes), not a mode --modes can time."""
    from tritongpt.bench import cli as bcli
    from tritongpt.cli import build_parser
    from tritongpt.errors import UserError

    with pytest.raises(UserError, match="--modes: unknown"):
        bcli.kernel_names(build_parser().parse_args(["bench", "kernels", "--modes", "fwd,saved"]))


def test_mlp_saved_target_against_torch_ops_without_a_torch_timing():
    """The torch-ops lines are there when either torch row was measured: with its fwd+bwd timing
    missing, the saved-activation ratio against PyTorch's ops is still judged."""
    mlp = {"rows": 16384, "width": 768, "hidden": 3072, "dtype": "bf16"}
    rows = [_k("mlp", "reference", "saved", mlp, saved_bytes=100),
            _k("mlp", "torch", "saved", mlp, saved_bytes=80),
            _k("mlp", "triton", "saved", mlp, saved_bytes=50),
            make_row("kernels", "mlp", "torch", mlp, "fwd+bwd", "failed: out of memory")]
    got = {t["target"]: t for t in kernels.kernel_targets(rows, {})}
    t = got["gelu-mlp saved activations / torch ops"]
    assert t["value"] == pytest.approx(50 / 80) and t["status"] == "PASS"
    assert got["gelu-mlp speedup vs torch ops"]["status"] == "N/A"


def test_a_provider_known_not_to_fit_is_skipped_unbuilt():
    """bench_providers' skip: a provider named there gets "skipped: <why>" rows in every mode and
    is never built (on a GPU: the textbook attention whose T x T scores would not fit)."""
    built = []

    def builder(name):
        def build():
            built.append(name)
            return (lambda: torch.ones(2, requires_grad=True) * 2), []
        return build

    rows = kernels.bench_providers("attention", {"seq_len": 8}, {"reference": builder("reference"),
                                                                 "sdpa-flash": builder("sdpa-flash")},
                                   ("fwd", "bwd"), CpuTimer(reps=1, warm_calls=0), Budget(None),
                                   lambda m: {"flops": 1}, skip={"reference": "needs ~90 GiB"})
    assert [(r["provider"], r["mode"], r["status"]) for r in rows] == [
        ("reference", "fwd", "skipped: needs ~90 GiB"), ("reference", "bwd", "skipped: needs ~90 GiB"),
        ("sdpa-flash", "fwd", "ok"), ("sdpa-flash", "bwd", "ok")]
    assert built == ["sdpa-flash"]


def test_sort_rows_puts_modes_in_fwd_bwd_order():
    """Within a provider and configuration, rows go fwd, bwd, fwd+bwd whatever order --modes gave."""
    c = {"rows": 8, "width": 16}
    rows = [_k("layernorm", "torch", m, c, ms=1.0) for m in ("fwd+bwd", "bwd", "fwd")]
    assert [r["mode"] for r in kernels.sort_rows(rows)] == ["fwd", "bwd", "fwd+bwd"]


def test_cross_entropy_bytes_use_the_logits_element_size():
    """fp32 logits move 4 bytes an element: N*V*4 read in forward, twice that in backward."""
    rows = kernels.sweep_cross_entropy(quick_timer(), Budget(None), 8, (30,), torch.float32, providers=("torch",))
    assert {r["mode"]: r["bytes"] for r in rows} == {"fwd": 960, "bwd": 1920, "fwd+bwd": 2880}


def test_liger_fused_lm_head_counts_its_forward_as_fwd_plus_bwd(monkeypatch):
    """Liger's fused linear cross-entropy makes its gradients in forward, as ours does: its fwd row
    counts the three matmuls, its bwd row none (a stand-in with Liger's plan, called as the variants
    call it: the plain op shares their helper, so the old order and the loss alone work too)."""
    spied = []
    real = kernels._lm_head_variant_providers
    monkeypatch.setattr(kernels, "_lm_head_variant_providers", lambda *a: spied.append(a[-2:]) or real(*a))
    _with_fake_liger(monkeypatch, _OldLiger)
    N, C, V = 8, 8, 24
    rows = kernels.sweep_lm_head_loss(quick_timer(), Budget(None), N, (C,), (V,), torch.float32,
                                      providers=("liger",))
    by = {r["mode"]: r for r in rows}
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    assert spied == [({}, {})]  # through the helper, with no option for either loss
    assert by["fwd"]["flops"] == by["fwd+bwd"]["flops"] == 3 * (2 * N * C * V)
    assert "flops" not in by["bwd"] and by["bwd"]["note"] == "gradients made in forward"


def test_reference_attention_memory_counts_fp16_scores_in_fp32():
    """The textbook attention computes fp16 scores in fp32: its four score tensors take 4 bytes an
    element for fp16 inputs, 2 for bf16, so the fp16 estimate is 4 * 2 bytes per score larger."""
    b, h, t = 2, 3, 16
    fp16 = kernels.reference_attention_bytes(b, h, t, torch.float16)
    bf16 = kernels.reference_attention_bytes(b, h, t, torch.bfloat16)
    assert fp16 - bf16 == 4 * 2 * b * h * t * t


def test_checkpointed_step_tflops_are_the_models_flops():
    """A +ckpt row's TFLOPS, like its MFU, count the model's FLOPs (what MFU is made of), not the
    recomputed forward that only HFU counts."""
    peak = 1e12
    row = train_step.bench_train_provider("reference+ckpt", "tiny", 1, 8, torch.device("cpu"), torch.float32,
                                          warmup_steps=0, steps=1, peak_flops=peak)
    assert row["status"] == "ok" and row["hw_flops_per_token"] > row["flops_per_token"]
    assert row["tflops"] == pytest.approx(row["flops_per_token"] * row["tokens_per_s"] / 1e12)
    assert row["mfu"] == pytest.approx(row["tflops"] * 1e12 / peak)


def test_run_train_estimates_from_the_model_just_measured(monkeypatch):
    """Three models: the third's expected cost scales the second's measured time (35 s on mini's 6
    layers -> 70 s on gpt2-small's 12), not the first's (10 s on tiny's 4 -> 30 s). Stand-in clock."""
    clock = [0.0]
    fake_time = types.SimpleNamespace(perf_counter=lambda: clock[0], monotonic=lambda: clock[0])
    monkeypatch.setattr(train_step, "time", fake_time)
    monkeypatch.setattr(common, "time", fake_time)
    cost = {"tiny": 10.0, "mini": 35.0}

    def fake(name, model_name, *a, **k):
        clock[0] += cost[model_name]
        return make_row("train", "step", name, {"model": model_name}, "fwd+bwd", ms=1.0, tokens_per_s=1.0)

    monkeypatch.setattr(train_step, "bench_train_provider", fake)
    rows = train_step.run_train(torch.device("cpu"), Budget(100.0), models=("tiny", "mini", "gpt2-small"),
                                providers=("reference",), log=lambda s: None)
    assert [r["status"] for r in rows[:2]] == ["ok", "ok"]
    assert rows[2]["status"] == "skipped: time budget (~70 s expected from the previous model, 55 s left)"


def test_train_step_out_of_memory_says_so(monkeypatch):
    """As a kernel row does: a training step that runs out of memory is "failed: out of memory"."""
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")

    monkeypatch.setattr(train_step, "train_step", oom)
    row = train_step.bench_train_provider("reference", "tiny", 1, 8, torch.device("cpu"), torch.float32,
                                          warmup_steps=1, steps=1)
    assert row["status"] == "failed: out of memory"


def test_train_targets_name_the_batch_and_length_judged():
    """A training target's config says which run it judged: the model, its batch and length."""
    rows = [_step("gpt2-small", "reference+compile+sdpa", 100.0), _step("gpt2-small", "triton", 130.0, mfu=0.6)]
    assert {t["config"] for t in train_step.train_targets(rows)} == {"gpt2-small B=16 T=1024"}
    assert {t["config"] for t in train_step.train_targets([])} == {"gpt2-small"}


def test_cpu_rows_record_the_threads_and_the_tokenizer_load_time(monkeypatch):
    """A model row's config names the torch threads it ran with (a stand-in count here: the tests
    run with one), and a tokenizer row built from the default tokenizer says how long loading took."""
    from tritongpt.bench import cpu
    from tritongpt.train import tokenizer as tok_module

    monkeypatch.setattr(torch, "get_num_threads", lambda: 5)
    row = cpu.bench_model_forward("tiny", batch=1, seq_len=8, reps=1)
    assert row["status"] == "ok" and row["config"]["threads"] == 5

    class Tok:
        vocab_size = 300

        def encode(self, text):
            return list(text.encode())

    clock = [0.0]

    def load():
        clock[0] += 2.5  # loading from the disk cache takes 2.5 s on the stand-in clock
        return Tok()

    monkeypatch.setattr(tok_module, "default_tokenizer", load)
    monkeypatch.setattr(cpu, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    fast, _ = cpu.bench_tokenizer("abcd" * 10, reps=1)
    assert fast["load_s"] == 2.5


def test_a_qwen3_step_names_its_attention_and_counts_its_wider_heads():
    """bench train --attention-head-dim 48 --qk-norm on tiny (4 heads of 48: queries 192 wide over
    C = 128): the row names both, the models line says them in words, and MFU's attention FLOPs count
    the queries' width (n_head x head_dim) where GPT-2's count C."""
    from tritongpt.bench import report
    from tritongpt.train.loop import attention_forward_flops

    flags = dict(norm="rmsnorm", mlp="swiglu", position_encoding="rope", bias=False, attention_head_dim=48,
                 qk_norm=True)
    cpu = torch.device("cpu")
    row = train_step.bench_train_provider("reference", "tiny", 2, 16, cpu, torch.float32, 0, 1, peak_flops=1e12,
                                          **flags)
    assert row["status"] == "ok"
    assert {k: row["config"][k] for k in ("attention_head_dim", "qk_norm")} == {"attention_head_dim": 48,
                                                                                "qk_norm": True}
    assert report.models_line([row]).endswith("heads of 48, q/k norms")
    cfg = train_step.train_config("tiny", 16, **flags)
    assert attention_forward_flops(cfg, 16) == 4 * (4 * 48) * 16 * cfg.n_layer


def test_an_olmo_step_names_its_norms():
    """bench train --no-pre-norms --post-norms --qk-norm --qk-norm-width all on tiny (OLMo 2's blocks): the row
    records both fields and the models line says them in words, not as Gemma's sandwich or Qwen3's per-head norms."""
    from tritongpt.bench import report

    flags = dict(norm="rmsnorm", mlp="swiglu", position_encoding="rope", bias=False, qk_norm=True,
                 qk_norm_width="all", post_norms=True, pre_norms=False)
    row = train_step.bench_train_provider("reference", "tiny", 2, 16, torch.device("cpu"), torch.float32, 0, 1,
                                          peak_flops=1e12, **flags)
    assert row["status"] == "ok"
    assert {k: row["config"][k] for k in ("pre_norms", "qk_norm_width", "post_norms")} == \
        {"pre_norms": False, "qk_norm_width": "all", "post_norms": True}
    assert report.models_line([row]).endswith("no biases, q/k norms over all heads, norms after each sublayer only")


def test_a_gemma3_step_names_its_touches():
    """bench train with Gemma 3's fields on tiny (GeGLU, scaled embeddings, sandwich and q/k norms, a
    window in layers 0 and 1 with their own RoPE base): the row's config and the models line say them,
    and MFU's attention FLOPs count the two local layers by their window."""
    from tritongpt.bench import report
    from tritongpt.train.loop import attention_forward_flops

    flags = dict(norm="rmsnorm", mlp="geglu", position_encoding="rope", bias=False, qk_norm=True, post_norms=True,
                 scale_embeddings=True, attention_window=4, window_layers="0,1", rope_local_theta=10000.0,
                 rope_theta=1e6)
    row = train_step.bench_train_provider("reference", "tiny", 2, 16, torch.device("cpu"), torch.float32, 0, 1,
                                          peak_flops=1e12, **flags)
    assert row["status"] == "ok"
    c = row["config"]
    assert (c["mlp"], c["scale_embeddings"], c["post_norms"], c["rope_local_theta"], c["window_layers"]) == \
        ("geglu", True, True, 10000.0, "0,1")
    assert report.models_line([row]).endswith("GeGLU (hidden 384), RoPE (theta 1e+06), no biases, q/k norms, "
                                              "scaled embeddings, sandwich norms, local RoPE theta 10000")
    cfg = train_step.train_config("tiny", 16, **flags)
    dense = 4 * cfg.n_embd * 16
    assert attention_forward_flops(cfg, 16) == 2 * dense * (16 * 4 - 8) / 128 + (cfg.n_layer - 2) * dense


def test_a_gemma2_step_soft_caps_its_attention_and_sdpa_says_it_cannot():
    """bench train --attn-softcap (Gemma 2's): the row's config and the models line say the cap; the
    reference and Triton steps run it (CPU, the interpreter) with the same loss; SDPA, which has no score
    cap, is reported unavailable with the reason instead of timing an uncapped model."""
    from tritongpt.bench import report

    flags = dict(norm="rmsnorm", mlp="geglu", position_encoding="rope", bias=False, post_norms=True,
                 scale_embeddings=True, attn_softcap=2.0)
    rows = {p: train_step.bench_train_provider(p, "tiny", 2, 16, torch.device("cpu"), torch.float32, 0, 1,
                                               peak_flops=1e12, vocab_size=256, n_layer=1, **flags)
            for p in ("reference", "triton", "reference+sdpa")}  # 1 layer, 256 tokens: the interpreter's time
    assert rows["reference"]["status"] == rows["triton"]["status"] == "ok"
    assert rows["reference"]["config"]["attn_softcap"] == 2.0
    assert "attn_softcap=2.0" in report.models_line([rows["reference"]])
    assert rows["triton"]["final_loss"] == pytest.approx(rows["reference"]["final_loss"], rel=1e-4)
    assert rows["reference+sdpa"]["status"] == ("skipped: F.scaled_dot_product_attention cannot soft-cap the scores "
                                                "(attn_softcap 2); reference+compile times the eager math")


def test_a_smollm3_step_names_its_nope_layers():
    """bench train --nope-layers: the row's config and the models line say which layers have no RoPE, and
    the model timed has no rotary there."""
    from tritongpt.bench import report

    flags = dict(position_encoding="rope", nope_layers="1,3")
    row = train_step.bench_train_provider("reference", "tiny", 2, 16, torch.device("cpu"), torch.float32, 0, 1,
                                          peak_flops=1e12, **flags)
    assert row["status"] == "ok" and row["config"]["nope_layers"] == "1,3"
    assert report.models_line([row]).endswith("no RoPE in layers 1,3")
    cfg = train_step.train_config("tiny", 16, **flags)
    assert [cfg.layer_has_rope(i) for i in range(cfg.n_layer)] == [True, False, True, False]


def test_a_neox_step_names_its_parallel_blocks_and_exact_gelu():
    """bench train --parallel-residual --gelu-approximate none --rotary-dim 8 (Pythia's pieces): the row's config
    and the models line say so,
    both paths train to the same loss, and the model timed has parallel blocks and the erf GELU."""
    from tritongpt.bench import report

    flags = dict(position_encoding="rope", parallel_residual=True, gelu_approximate="none", rotary_dim=8)
    rows = {p: train_step.bench_train_provider(p, "tiny", 2, 16, torch.device("cpu"), torch.float32, 0, 1,
                                               peak_flops=1e12, vocab_size=256, n_layer=1, **flags)
            for p in ("reference", "triton")}  # 1 layer, 256 tokens: the interpreter's time
    assert all(r["status"] == "ok" for r in rows.values())
    assert rows["reference"]["config"]["parallel_residual"] is True
    assert rows["reference"]["config"]["gelu_approximate"] == "none"
    assert rows["reference"]["config"]["rotary_dim"] == 8
    assert report.models_line([rows["reference"]]).endswith("RoPE (theta 10000, 8 dimensions of each head), "
                                                            "parallel attention and MLP, exact GELU")
    assert rows["triton"]["final_loss"] == pytest.approx(rows["reference"]["final_loss"], rel=1e-4)
    cfg = train_step.train_config("tiny", 16, **flags)
    assert (cfg.parallel_residual, cfg.gelu_approximate) == (True, "none")


def test_gpu_session_tests_stage_runs_the_unreached_files_first_then_every_cuda_file_once(tmp_path):
    """`bash bench/gpu_session.sh tests`: the files the first GPU run did not reach (or failed) come first, in the
    order given (pytest keeps it for files, not for a directory), then every other file with a CUDA-marked test,
    each once. Python is a stand-in that records its arguments."""
    from session_stub import run_gpu_session

    runs, _, _ = run_gpu_session(tmp_path, "tests")
    root = Path(__file__).resolve().parent.parent
    (pytest_args,) = [c[2:] for c in runs if c[:2] == ["-m", "pytest"]]
    files = [a for a in pytest_args if a.startswith("tests/") and "::" not in a]  # not the --deselect ids
    assert files[:18] == ["tests/test_model_paths.py", "tests/test_loop.py", "tests/test_attention.py",
                         "tests/test_rlhf.py", "tests/test_mlp.py", "tests/test_tuned_launch.py",
                         "tests/test_decode_graph.py", "tests/test_attention_kv_len.py",
                         "tests/test_attention_sinks.py", "tests/test_moe_kernel.py", "tests/test_gguf_quant.py",
                         "tests/test_gpt_oss.py", "tests/test_int8_linear.py", "tests/test_int4_linear.py",
                         "tests/test_quantize.py", "tests/test_quantize_int4.py", "tests/test_quant_dx.py",
                         "tests/test_qlora.py"]
    marked = {f"tests/{p.name}" for p in (root / "tests").glob("test_*.py") if "mark.cuda" in p.read_text()}
    assert len(files) == len(set(files)) and set(files) == marked and "tests" not in pytest_args


def test_gpu_session_kernels_extra_times_the_ops_bench_all_runs_last(tmp_path):
    """`bash bench/gpu_session.sh kernels-extra` (not part of all) times the ops `bench all`'s budget reaches
    last, decode_attention, matmul, int8_linear, int4_linear, lora, token_mask, sampling, rl_logprobs and
    sink_attention, within EXTRA_MINUTES, into results-extra/, and packs it; no tests, no `bench all`. The command parses as `tritongpt bench kernels` with
    those ops. Python is a stand-in."""
    from session_stub import run_gpu_session
    from tritongpt.cli import build_parser

    runs, work, stdout = run_gpu_session(tmp_path, "kernels-extra", EXTRA_MINUTES="0.7")
    (bench,) = [c[2:] for c in runs if c[:2] == ["-m", "tritongpt.cli"]]
    ops = "decode_attention,matmul,int8_linear,int4_linear,lora,token_mask,sampling,rl_logprobs,sink_attention"
    assert bench == ["bench", "kernels", "--ops", ops,
                     "--max-minutes", "0.7", "--out", f"{work}/results-extra"]
    args = build_parser().parse_args(bench)
    assert args.ops == ops
    assert not any("pytest" in c for c in runs) and not any("all" in c[2:4] for c in runs if c[:1] == ["-m"])
    assert ("== tritongpt bench kernels --ops decode_attention,matmul,int8_linear,int4_linear,lora,token_mask,"
            "sampling,rl_logprobs,sink_attention (budget 0.7 min)") in stdout
    assert (tmp_path / "out" / "session.tgz").is_file()


def test_cuda_graphs_flag_times_replays_and_says_so(tmp_path, monkeypatch):
    """`bench kernels --cuda-graphs`: the GPU timer times each row with triton.testing.do_bench_cudagraph (after its
    warm calls, outside the capture), not do_bench, and the results carry a note saying the rows are CUDA-graph
    replays. Without the flag, do_bench as before. (CPU stand-ins: no GPU here.)"""
    import triton.testing

    from tritongpt import cli
    from tritongpt.bench import cli as bcli

    used = []
    monkeypatch.setattr(common.GpuTimer, "sync", lambda self: None)
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **k: used.append("do_bench") or [1.0, 0.9, 1.1])
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph",
                        lambda fn, **k: used.append(("graph", k["rep"])) or [0.5, 0.4, 0.6])
    calls = []
    for graphs in (False, True):
        timer = common.GpuTimer(25, 40, 2, graphs)
        assert timer.bench(lambda: calls.append(graphs)) == ((0.5, 0.4, 0.6) if graphs else (1.0, 0.9, 1.1))
    assert used == ["do_bench", ("graph", 40)] and calls == [False, False, True, True]  # warm calls, not timed

    made = []

    def stand_in(*args):
        made.append(args)
        return quick_timer()

    real_ceilings = kernels.measure_ceilings
    monkeypatch.setattr(common, "GpuTimer", stand_in)
    monkeypatch.setattr(kernels, "measure_ceilings", lambda timer, **k: real_ceilings(
        timer, copy_bytes=1 << 16, matmul_n=32, dtype=torch.float32))
    for flag in ([], ["--cuda-graphs"]):
        out = tmp_path / ("graphs" if flag else "eager")
        args = cli.build_parser().parse_args(["bench", "kernels", "--quick", "--out", str(out), "--dtype", "fp32",
                                              "--no-plots", "--ops", "layernorm", "--providers", "reference",
                                              "--ln-rows", "8", "--ln-widths", "16", *flag])
        assert bcli._run_gpu(args) == 0
        (md,) = out.glob("*/kernels.md")
        assert ("CUDA-graph replays" in md.read_text()) == bool(flag)
    assert [a[3] for a in made] == [False, True]


def test_gpu_session_graphs_times_small_ops_as_cuda_graph_replays(tmp_path):
    """`bash bench/gpu_session.sh graphs` (not part of all): `bench kernels --cuda-graphs` of LayerNorm, attention and
    the loss within EXTRA_MINUTES into results-graphs/, packed. Python is a stand-in."""
    from session_stub import run_gpu_session
    from tritongpt.cli import build_parser

    runs, work, stdout = run_gpu_session(tmp_path, "graphs", EXTRA_MINUTES="0.5")
    (bench,) = [c[2:] for c in runs if c[:2] == ["-m", "tritongpt.cli"]]
    assert bench == ["bench", "kernels", "--cuda-graphs", "--ops", "layernorm,attention,cross_entropy",
                     "--max-minutes", "0.5", "--out", f"{work}/results-graphs"]
    assert build_parser().parse_args(bench).cuda_graphs
    assert (tmp_path / "out" / "session.tgz").is_file() and "--cuda-graphs (budget 0.5 min)" in stdout


def _torch_setting_and_epilogue_spy(monkeypatch):
    """TRITONGPT_MLP_MATMUL=torch for the test, and a spy on the MLP matmul kernel: -> the list of the EPILOGUE of
    each launch, filled as it runs."""
    from tritongpt.kernels import mlp

    monkeypatch.setattr(mlp, "MLP_MATMUL", "torch")
    spy = FlagSpy(mlp._matmul_kernel, ("EPILOGUE",))
    monkeypatch.setattr(mlp, "_matmul_kernel", spy)
    return spy.launched


def test_mlp_triton_only_provider_keeps_every_product_on_our_kernel(monkeypatch):
    """triton-only runs the GELU-MLP with the plain products on our matmul whatever TRITONGPT_MLP_MATMUL
    says (here "torch"), and leaves the setting as it found it; "triton" follows the setting."""
    from tritongpt.kernels import mlp

    epilogues = _torch_setting_and_epilogue_spy(monkeypatch)
    g = torch.Generator().manual_seed(3)
    x, w1, b1, w2, b2 = (torch.randn(*s, generator=g) * 0.3 for s in ((9, 16), (64, 16), (64,), (16, 64), (16,)))
    builders = kernels.mlp_providers(x, w1, b1, w2, b2)
    want = F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)
    for name, launched in (("triton", []), ("triton-only", [mlp.EPI_GELU, mlp.EPI_NONE])):
        epilogues.clear()
        f, _ = builders[name]()
        assert torch.allclose(f(), want, rtol=1e-4, atol=1e-5), name
        assert epilogues == launched, name
        assert mlp.MLP_MATMUL == "torch"
    assert "triton-only" in kernels.PROVIDERS["mlp"]
    with pytest.raises(ValueError, match="mlp_matmul takes one of: auto, triton, torch; got 'cuda'"):
        with mlp.mlp_matmul("cuda"):
            pass


@pytest.mark.parametrize("mode", ["bwd", "fwd+bwd"])
def test_mlp_triton_only_provider_keeps_backwards_products_on_our_kernel(mode, monkeypatch):
    """triton-only's backward too: the bench runs it outside the provider's forward call, so the setting must
    hold there as well. dW2, dW1 and dx are plain products: on our kernel (EPI_NONE), whatever
    TRITONGPT_MLP_MATMUL says (here "torch"), and the setting is left as found."""
    from tritongpt.kernels import mlp

    epilogues = _torch_setting_and_epilogue_spy(monkeypatch)
    g = torch.Generator().manual_seed(4)
    x, w1, b1, w2, b2 = (torch.randn(*s, generator=g).requires_grad_() for s in ((9, 16), (64, 16), (64,),
                                                                              (16, 64), (16,)))
    builders = kernels.mlp_providers(x, w1, b1, w2, b2)
    forward, _ = builders["triton-only"]()
    fn = kernels._mode_fn(forward, mode)
    epilogues.clear()
    fn()
    backward = [mlp.EPI_GELU_GRAD] + [mlp.EPI_NONE] * 3
    assert epilogues == (backward if mode == "bwd" else [mlp.EPI_GELU, mlp.EPI_NONE] + backward)
    assert mlp.MLP_MATMUL == "torch"
    assert all(t.grad is not None for t in (x, w1, b1, w2, b2))


@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_swiglu_triton_only_provider_keeps_every_product_on_our_kernel(activation, monkeypatch):
    """The gated MLPs' triton-only: forward and backward on our matmul kernel, fused, whatever TRITONGPT_MLP_MATMUL
    says (here "torch", which launches no matmul kernel at all); "triton" follows the setting."""
    from tritongpt.kernels import mlp

    epilogues = _torch_setting_and_epilogue_spy(monkeypatch)
    g = torch.Generator().manual_seed(6)
    x, wg, wu, wd = (torch.randn(*s, generator=g).requires_grad_() for s in ((9, 16), (40, 16), (40, 16), (16, 40)))
    builders = kernels.swiglu_providers(x, wg, wu, wd, activation)
    ref, _ = builders["reference"]()
    for name, launched in (("triton", []), ("triton-only", [mlp.EPI_SWIGLU, mlp.EPI_NONE, mlp.EPI_SWIGLU_GRAD,
                                                           mlp.EPI_NONE, mlp.EPI_NONE, mlp.EPI_NONE, mlp.EPI_NONE])):
        forward, _ = builders[name]()
        fn = kernels._mode_fn(forward, "fwd+bwd")  # runs forward once for the gradients' shapes
        epilogues.clear()
        fn()
        assert epilogues == launched, name
        assert mlp.MLP_MATMUL == "torch"
    assert "triton-only" in kernels.PROVIDERS["swiglu"] and "triton-only" in kernels.PROVIDERS["geglu"]
