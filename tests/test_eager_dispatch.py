"""The kernels' eager fast path (kernels/_common.py custom_op / plain_eager): in plain eager mode the
autograd Functions run each custom op's Python function directly, not through the dispatcher, for
the same results; torch.compile, dispatch modes (FakeTensorMode, meta), vmap and tensor subclasses
still get the registered op. And bench cpu's host-overhead rows, which measure that path."""
import pytest
import torch
import triton
from torch._subclasses.fake_tensor import FakeTensorMode

from tritongpt.kernels import _common, attention, cross_entropy, layernorm, mlp, rope, swiglu
from tritongpt.kernels.attention import flash_attention
from tritongpt.kernels.cross_entropy import cross_entropy as ce
from tritongpt.kernels.layernorm import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from tritongpt.kernels.mlp import gelu_mlp
from tritongpt.kernels.rope import rope as rope_fn
from tritongpt.kernels.swiglu import swiglu_mlp

OPS = {layernorm: ["layer_norm_fwd", "layer_norm_bwd", "add_layer_norm_fwd", "add_layer_norm_bwd", "rms_norm_fwd",
                   "rms_norm_bwd", "add_rms_norm_fwd", "add_rms_norm_bwd"],
       mlp: ["gelu_mlp_fwd", "gelu_mlp_bwd"], swiglu: ["swiglu_mlp_fwd", "swiglu_mlp_bwd"],
       cross_entropy: ["checked_targets", "cross_entropy_fwd", "cross_entropy_bwd"], rope: ["rope_fwd", "rope_bwd"],
       attention: ["flash_attn_fwd", "flash_attn_bwd"]}


@pytest.fixture
def dispatched(monkeypatch):
    """The names of the ops whose real kernel ran through the dispatcher (the backend impl torch.library
    registered, which looks the function up in the op's _backend_fns at each call)."""
    seen = []
    for module, names in OPS.items():
        for name in names:
            op = getattr(module, "_" + name)

            def spy(*args, _real=op._backend_fns[None], _name=name, **kwargs):
                seen.append(_name)
                return _real(*args, **kwargs)

            monkeypatch.setitem(op._backend_fns, None, spy)
    return seen


def _cases(gen):
    def p(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(dtype).requires_grad_()

    x, d, w, b = p(6, 40), p(6, 40, dtype=torch.bfloat16), p(40), p(40)
    xm, w1, b1, w2, b2 = p(5, 12), p(48, 12), p(48), p(12, 48), p(12)
    wg, wu, wd = p(32, 12), p(32, 12), p(12, 32)
    q, k, v = p(2, 2, 9, 16), p(2, 1, 9, 16), p(2, 1, 9, 16)
    logits, targets = p(7, 33), torch.randint(0, 33, (7,), generator=gen)
    targets[2] = -100
    return {"layer_norm": lambda: layer_norm(x, w, b),
            "add_layer_norm": lambda: add_layer_norm(x, d, w, b),
            "rms_norm": lambda: rms_norm(x, w),
            "add_rms_norm": lambda: add_rms_norm(x, d.float(), w),
            "gelu_mlp": lambda: gelu_mlp(xm, w1, b1, w2, b2),
            "swiglu_mlp": lambda: swiglu_mlp(xm, wg, None, wu, None, wd, None),
            "flash_attention": lambda: flash_attention(q, k, v, causal=True, dropout_p=0.25, seed=3),
            "cross_entropy": lambda: ce(logits, targets, label_smoothing=0.1),
            "rope": lambda: rope_fn(q, k, 2)}, [x, d, w, b, xm, w1, b1, w2, b2, wg, wu, wd, q, k, v, logits]


def _run(fn, leaves, gen_seed):
    """The outputs and every leaf's gradient of a random weighting of the outputs."""
    out = fn()
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(gen_seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [o.detach().clone() for o in outs], grads


@pytest.mark.parametrize("name", ["layer_norm", "add_layer_norm", "rms_norm", "add_rms_norm", "gelu_mlp",
                                  "swiglu_mlp", "flash_attention", "cross_entropy", "rope"])
def test_eager_path_skips_dispatcher_and_matches_the_op(name, dispatched, monkeypatch):
    cases, leaves = _cases(torch.Generator().manual_seed(0))
    fast = _run(cases[name], leaves, 1)
    assert dispatched == [], f"{name}: eager call went through the dispatcher: {dispatched}"
    # the same call with the fast path off: every op dispatched, bit-identical outputs and gradients
    monkeypatch.setattr(_common, "plain_eager", lambda args: False)
    monkeypatch.setattr(attention, "plain_eager", lambda args: False)
    slow = _run(cases[name], leaves, 1)
    assert dispatched and all(n in sum(OPS.values(), []) for n in dispatched)
    assert any(n.endswith("bwd") for n in dispatched) or name == "flash_attention"  # its backward: autograd's
    for a, b in zip(fast[0] + [g for g in fast[1] if g is not None], slow[0] + [g for g in slow[1] if g is not None]):
        assert torch.equal(a, b), name
    assert [g is None for g in fast[1]] == [g is None for g in slow[1]]
    assert sum(g is not None for g in fast[1]) >= (1 if name == "cross_entropy" else 2)


@pytest.mark.parametrize("name", ["layer_norm", "add_layer_norm", "rms_norm", "add_rms_norm", "gelu_mlp",
                                  "swiglu_mlp", "flash_attention", "cross_entropy", "rope"])
def test_eager_path_matches_the_op_under_autocast(name, monkeypatch):
    """Forward and backward inside torch.autocast (a CPU backward runs on the calling thread, autocast on):
    the dispatcher's Autocast key falls through for the ops, so both paths must give the same bits and dtypes."""
    def run():
        cases, leaves = _cases(torch.Generator().manual_seed(2))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs, grads = _run(cases[name], leaves, 3)
        return outs + [g for g in grads if g is not None]

    fast = run()
    monkeypatch.setattr(_common, "plain_eager", lambda args: False)
    monkeypatch.setattr(attention, "plain_eager", lambda args: False)
    slow = run()
    assert len(fast) == len(slow) >= 2
    if name in ("gelu_mlp", "swiglu_mlp", "flash_attention"):  # cast to bf16 first, as torch's matmuls / SDPA
        assert fast[0].dtype == torch.bfloat16
    for a, b in zip(fast, slow):
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_attention_eager_function_gradients_against_float64():
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 11, 16, generator=gen).requires_grad_() for _ in range(3))
    out = flash_attention(q, k, v, causal=True)
    assert type(out.grad_fn).__name__ == "FlashAttnFunctionBackward"
    g = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = q64 @ k64.transpose(-1, -2) / 4.0
    s = s.masked_fill(torch.ones(11, 11, dtype=torch.bool).triu(1), float("-inf"))
    ref = s.softmax(-1) @ v64
    ref_grads = torch.autograd.grad((ref * g.double()).sum(), (q64, k64, v64))
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), r, atol=1e-4, rtol=0)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_modes_and_meta_still_dispatch(dispatched):
    # meta and fake tensors: the op's fake impl answers (the function itself would refuse the device
    # or launch Triton on fake data)
    w, b = torch.randn(16), torch.randn(16)
    y = layer_norm(torch.randn(3, 16, device="meta"), w.to("meta"), b.to("meta"))
    assert y.device.type == "meta" and y.shape == (3, 16)
    with FakeTensorMode() as mode:
        q = mode.from_tensor(torch.randn(1, 2, 8, 16))
        o = flash_attention(q, q, q)
        x = mode.from_tensor(torch.randn(3, 16))
        y = rms_norm(x, mode.from_tensor(w))
    assert o.shape == (1, 2, 8, 16) and y.shape == (3, 16) and dispatched == []
    # vmap: attention's forward runs as the op, once per batch element
    q = torch.randn(3, 1, 2, 8, 16)
    out = torch.vmap(lambda t: flash_attention(t, t, t))(q)
    assert dispatched == ["flash_attn_fwd"] * 3 and out.shape == q.shape
    torch.testing.assert_close(out[1], flash_attention(q[1], q[1], q[1]))


def test_pre_dispatch_tracing_records_the_ops():
    # make_fx(pre_dispatch=True) on real tensors (export's pre-dispatch IR) keeps its proxy mode on a stack of
    # its own, which torch._C._len_torch_dispatch_stack does not count: the fast path would launch on the
    # traced tensors and leave no op in the graph
    from torch.fx.experimental.proxy_tensor import make_fx

    gen = torch.Generator().manual_seed(11)
    w = torch.randn(24, generator=gen)
    gm = make_fx(lambda x, w: rms_norm(x, w), pre_dispatch=True)(torch.randn(4, 24, generator=gen), w)
    assert "tritongpt.rms_norm_fwd" in gm.code
    x = torch.randn(4, 24, generator=gen, dtype=torch.float64)
    ref = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(gm(x.float(), w).double(), ref, atol=1e-5, rtol=0)
    gm = make_fx(lambda q, k, v: flash_attention(q, k, v, causal=False), pre_dispatch=True)(
        *(torch.randn(1, 2, 8, 16, generator=gen) for _ in range(3)))
    assert "tritongpt.flash_attn_fwd" in gm.code
    q, k, v = (torch.randn(1, 2, 8, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    ref = (q @ k.transpose(-1, -2) / 4.0).softmax(-1) @ v
    torch.testing.assert_close(gm(q.float(), k.float(), v.float()).double(), ref, atol=2e-5, rtol=0)


def test_cpp_functionalization_dispatches():
    # C++ functionalization (torch._enable_functionalization, as lazy/XLA backends use it) wraps tensors in
    # FunctionalTensorWrapper, type torch.Tensor but without storage of its own: the op's functionalize
    # kernel unwraps them, the fast path would hand the wrappers to Triton
    gen = torch.Generator().manual_seed(13)
    x, w = torch.randn(4, 24, generator=gen), torch.randn(24, generator=gen)
    xf, wf = torch._to_functional_tensor(x), torch._to_functional_tensor(w)
    assert type(xf) is torch.Tensor and not _common.plain_eager((xf, wf))
    torch._enable_functionalization(reapply_views=True)
    try:
        y = rms_norm(xf, wf)
    finally:
        torch._disable_functionalization()
    torch._sync(y)
    x64 = x.double()
    ref = x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(torch._from_functional_tensor(y).double(), ref, atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:There is a performance drop", "ignore:Batching rule not implemented")
@pytest.mark.parametrize("name", ["rms_norm", "gelu_mlp", "flash_attention", "cross_entropy", "rope"])
def test_batched_gradients_dispatch(name):
    # autograd.grad(is_grads_batched=True) and autograd.functional.jacobian(vectorize=True) run the backward
    # under the legacy vmap, on BatchedTensorImpl grads (type torch.Tensor, no storage): the dispatched op
    # falls back to one call per sample, the fast path would hand them to Triton
    cases, leaves = _cases(torch.Generator().manual_seed(4))
    outs = cases[name]()
    out = outs[0] if isinstance(outs, tuple) else outs
    g = torch.randn((3,) + out.shape, generator=torch.Generator().manual_seed(5))
    batched = torch.autograd.grad(out, leaves, g, is_grads_batched=True, allow_unused=True, retain_graph=True)
    assert sum(b is not None for b in batched) >= 1
    for i in range(3):
        one = torch.autograd.grad(out, leaves, g[i], allow_unused=True, retain_graph=True)
        for b, o in zip(batched, one):
            assert (b is None) == (o is None) and (b is None or torch.equal(b[i], o)), name


def test_plain_eager_conditions():
    t = torch.randn(2)
    assert _common.plain_eager((t, 1.0, None, [True], torch.nn.Parameter(t)))
    assert not _common.plain_eager((t, t.to("meta")))
    with FakeTensorMode():
        assert not _common.plain_eager((t,))

    class Sub(torch.Tensor):
        pass

    assert not _common.plain_eager((t.as_subclass(Sub),))
    seen = []
    torch.vmap(lambda x: seen.append(_common.plain_eager((x,))) or x)(torch.randn(3, 2))
    assert seen == [False]
    seen.clear()
    torch.compile(lambda x: seen.append(_common.plain_eager((x,))) or x + 1, backend="eager", fullgraph=False)(t)
    assert seen == [False]


def test_fast_path_keeps_the_ops_checks():
    x, w = torch.randn(8, 6).t(), torch.randn(8)  # x transposed: the kernels would read it row-major
    with pytest.raises(ValueError, match="unit stride"):
        layernorm._layer_norm_fwd.call(x, w, None, 1e-5)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ce(torch.randn(3, 5), torch.tensor([0, 5, 1]))
    q = torch.randn(1, 2, 8, 24)
    with pytest.raises(ValueError, match="head_dim 24"):
        flash_attention(q, q, q)


def test_host_int_helpers_match_triton():
    for a in list(range(0, 70)) + [1000, 4095, 4097, 2 ** 31 + 5]:
        assert _common.next_pow2(max(a, 1)) == triton.next_power_of_2(max(a, 1))
        for b_ in (1, 3, 16, 64):
            assert _common.cdiv(a, b_) == triton.cdiv(a, b_)


def test_bench_host_overhead_rows():
    from triton.runtime import interpreter

    from tritongpt.bench.cpu import HOST_NOTE, bench_host_overhead

    run, threads = interpreter.InterpretedFunction.run, torch.get_num_threads()
    rows = bench_host_overhead(calls=5, ops=["layer_norm", "flash_attention"], gpu_branch=False)
    assert interpreter.InterpretedFunction.run is run and torch.get_num_threads() == threads  # both undone
    assert [(r["op"], r["provider"], r["mode"]) for r in rows] == [
        (f"host-{op}", p, m) for op in ("layer_norm", "flash_attention") for p in ("triton", "torch")
        for m in ("fwd", "fwd+bwd")]
    assert all(r["status"] == "ok" and r["ms"] > 0 and r["note"] == HOST_NOTE for r in rows)
    launches = {(r["op"], r["provider"], r["mode"]): r["launches"] for r in rows}
    # LayerNorm: one kernel forward, one backward; attention: one forward, three backward (preprocess, dk/dv, dq)
    assert launches[("host-layer_norm", "triton", "fwd")] == 1
    assert launches[("host-layer_norm", "triton", "fwd+bwd")] == 2
    assert launches[("host-flash_attention", "triton", "fwd+bwd")] == 4
    assert launches[("host-layer_norm", "torch", "fwd+bwd")] == 0
    # each row names its own op's sizes, not every op's
    assert {r["op"]: sorted(r["config"]) for r in rows} == {
        "host-layer_norm": ["calls", "dtype", "rows", "width"],
        "host-flash_attention": ["calls", "dtype", "head_dim", "heads", "seq"]}


def test_bench_host_overhead_gpu_branch_rows(monkeypatch):
    """The "triton-gpu-branch" rows time the launchers' GPU branch (a fresh process with the interpreter off): there
    every autotuned kernel launches through its pick, so attention's forward + backward counts three autotuned
    launches of four (the preprocess is not tuned), where the interpreter's branch has no Autotuner at all; the
    matmul's six launches of the GELU-MLP's forward + backward are tuned too; rope has no tuned kernel; a decode
    step against 512 cached keys splits them (the split kernel and the combine), which the interpreter never does;
    the int8 and int4 linears are one tuned launch each, forward only (no backward); the grammar's token mask one
    launch, not tuned, forward only. With the interpreter off here too (a GPU machine's `bench cpu`) the
    interpreter's rows are skipped, saying why, and the GPU branch's are still there (one process for both checks:
    ~4 s each)."""
    from tritongpt import _env
    from tritongpt.bench.cpu import GPU_BRANCH, GPU_BRANCH_NOTE, bench_host_overhead

    monkeypatch.setattr(_env, "triton_interpreting", lambda: False)
    ops = ["layer_norm", "gelu_mlp", "flash_attention", "rope", "decode_attention", "int8_linear", "int4_linear",
           "token_mask"]
    every = bench_host_overhead(calls=3, ops=ops)
    rows = [r for r in every if r["provider"] == GPU_BRANCH]
    modes = [(f"host-{op}", m) for op in ops[:-4] for m in ("fwd", "fwd+bwd")] + [(f"host-{op}", "fwd")
                                                                                  for op in ops[-4:]]
    assert [(r["op"], r["mode"]) for r in rows] == modes
    skipped = every[:len(every) - len(rows)]
    assert [(r["op"], r["provider"], r["mode"]) for r in skipped] == [
        (op, p, m) for op in dict.fromkeys(o for o, _ in modes) for p in ("triton", "torch")
        for o, m in modes if o == op]
    assert all(r["status"] == "skipped: needs Triton's interpreter (TRITON_INTERPRET=1)" for r in skipped), skipped
    assert all(r["status"] == "ok" and r["ms"] > 0 and r["note"] == GPU_BRANCH_NOTE for r in rows), rows
    assert all(r["config"] == {"rows": 8, "width": 768, "dtype": "fp32", "calls": 3}
               for r in every if r["op"] == "host-layer_norm")
    counts = {(r["op"][5:], r["mode"]): (r["launches"], r["tuned_launches"]) for r in rows}
    assert counts == {("layer_norm", "fwd"): (1, 1), ("layer_norm", "fwd+bwd"): (2, 2),
                      ("gelu_mlp", "fwd"): (2, 2), ("gelu_mlp", "fwd+bwd"): (6, 6),
                      ("flash_attention", "fwd"): (1, 1), ("flash_attention", "fwd+bwd"): (4, 3),
                      ("rope", "fwd"): (1, 0), ("rope", "fwd+bwd"): (2, 0),
                      ("decode_attention", "fwd"): (2, 1),  # the split-KV kernel (tuned) and its combine
                      ("int8_linear", "fwd"): (1, 1), ("int4_linear", "fwd"): (1, 1), ("token_mask", "fwd"): (1, 0)}


_RESTORE_CHECK = """
import importlib, pkgutil
from triton.runtime.jit import JITFunction
from tritongpt import kernels
from tritongpt.kernels import _common
from tritongpt.bench.cpu import gpu_branch_launches
mods = [importlib.import_module(f"tritongpt.kernels.{i.name}") for i in pkgutil.iter_modules(kernels.__path__)]
objs = [JITFunction, *mods, *_common.AUTOTUNED.values()]
before = [dict(vars(o)) for o in objs]
try:
    with gpu_branch_launches():
        assert _common.triton_interpreting() and JITFunction.run is not before[0]["run"]
        raise KeyError("inside")
except KeyError:
    pass
else:
    raise SystemExit("the exception inside was swallowed")
for o, b in zip(objs, before):
    a = dict(vars(o))
    changed = sorted(k for k in set(a) | set(b) if a.get(k, a) is not b.get(k, b))
    assert not changed, (o, changed)
print("restored")
"""


def test_gpu_branch_launches_restores_exactly_after_an_exception():
    """gpu_branch_launches swaps a class attribute (JITFunction.run), module functions (_common.triton_interpreting,
    the launchers' _sm_count) and each Autotuner's instance attribute early_config_prune: an exception inside
    propagates, and on the way out every one of them is back, the same object, no attribute added or removed."""
    import os
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _RESTORE_CHECK], env=dict(os.environ, TRITON_INTERPRET="0"),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.split() == ["restored"], run.stderr[-2000:]


def test_host_rows_configs_are_the_sizes_host_cases_runs():
    """The host rows' configs come from HOST_CONF and HOST_SIZES, written apart from host_cases' defaults (what both
    row makers run): they must agree, and every case must name its sizes (else its rows would name all of them)."""
    import inspect

    from tritongpt.bench.cpu import HOST_CONF, HOST_SIZES, host_cases

    defaults = {k: p.default for k, p in inspect.signature(host_cases).parameters.items()}
    assert defaults == {k: v for k, v in HOST_CONF.items() if k != "dtype"}
    assert set(HOST_SIZES) == set(host_cases()) and all(set(s) <= set(defaults) for s in HOST_SIZES.values())


def test_gpu_branch_failure_rows_name_their_ops_sizes(monkeypatch):
    """A GPU-branch process that cannot start gives failed rows, one per op and mode, each naming its op's sizes,
    dtype and calls as the ok rows do (the report shows the config: a row saying only calls=3 names no shape)."""
    import sys

    from tritongpt.bench.cpu import GPU_BRANCH, host_rows_gpu_branch

    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    rows = host_rows_gpu_branch(["layer_norm", "decode_attention"], 3)
    assert [(r["op"], r["provider"], r["mode"]) for r in rows] == [
        ("host-layer_norm", GPU_BRANCH, "fwd"), ("host-layer_norm", GPU_BRANCH, "fwd+bwd"),
        ("host-decode_attention", GPU_BRANCH, "fwd")]
    assert all(r["status"].startswith("failed: FileNotFoundError") for r in rows), rows
    assert [r["config"] for r in rows] == [{"rows": 8, "width": 768, "dtype": "fp32", "calls": 3}] * 2 + [
        {"heads": 4, "head_dim": 64, "cache": 512, "dtype": "fp32", "calls": 3}]


@pytest.mark.parametrize("printed, why", [('{"rows": []}', "printed dict, not a list of rows"),
                                          ("[1, 2]", "printed list, not a list of rows"),
                                          ("", "IndexError"), ("not json", "JSONDecodeError")])
def test_gpu_branch_rows_from_a_process_that_printed_no_rows_fail_with_a_reason(monkeypatch, printed, why):
    """The GPU branch's process exits 0 but its last line is not a JSON list of rows: failed rows saying so, not a
    crash of the whole bench nor rows made of whatever it printed. Its timeout is the caller's (bench cpu --quick:
    180 s, not the 600 s default)."""
    import subprocess

    from tritongpt.bench.cpu import host_rows_gpu_branch

    seen = {}

    def printed_only(args, timeout=None, **kwargs):
        seen["timeout"] = timeout
        return subprocess.CompletedProcess(args, 0, stdout=f"warming up\n{printed}\n" if printed else "", stderr="")

    monkeypatch.setattr(subprocess, "run", printed_only)
    rows = host_rows_gpu_branch(["layer_norm"], 3, timeout_s=180)
    assert seen["timeout"] == 180
    assert [r["mode"] for r in rows] == ["fwd", "fwd+bwd"]
    assert all(r["status"].startswith("failed: ") and why in r["status"] for r in rows), rows


@pytest.mark.parametrize("quick", [False, True])
@pytest.mark.parametrize("interpreting", [True, False])
def test_the_gpu_branch_process_gets_the_callers_timeout(monkeypatch, interpreting, quick):
    """bench cpu gives the GPU branch's process 600 s, --quick 180, with the interpreter on or off here."""
    from tritongpt import _env
    from tritongpt.bench import cpu

    seen = []
    monkeypatch.setattr(cpu, "host_rows_gpu_branch", lambda names, calls, timeout_s=600: seen.append(timeout_s) or [])
    monkeypatch.setattr(_env, "triton_interpreting", lambda: interpreting)
    for name in ("bench_tokenizer", "mlp_saved_cpu"):
        monkeypatch.setattr(cpu, name, lambda *a, **k: [])
    for name in ("bench_model_forward", "bench_model_train_step", "bench_generate"):
        monkeypatch.setattr(cpu, name, lambda *a, **k: {})
    monkeypatch.setattr(cpu, "host_cases", lambda: {})  # no op: the interpreter's rows are none, quickly
    cpu.run_cpu(quick=quick, log=lambda s: None)
    assert seen == [180 if quick else 600]


def test_gpu_branch_rows_refuse_the_interpreter():
    """In this process the interpreter is on: the GPU branch's rows cannot be taken here, and say why."""
    from tritongpt.bench.cpu import gpu_branch_rows

    with pytest.raises(RuntimeError, match="need Triton's interpreter off"):
        gpu_branch_rows(["layer_norm"], 1)


def _traced_ops(graph):
    """The kinds of a traced graph's nodes, an autograd.Function's Subgraph (what ONNX export inlines) included."""
    kinds = set()
    for node in graph.nodes():
        kinds.add(node.kind())
        if node.kind() == "prim::PythonOp":
            kinds |= _traced_ops(node.g("Subgraph"))
    return kinds


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit.trace` is deprecated")
def test_jit_trace_records_the_ops():
    # torch.jit.trace (and the ONNX exporter on it) records the dispatched ops; the fast path would run
    # the launchers on traced sizes, and a replay would not launch the kernels at all
    gen = torch.Generator().manual_seed(7)
    w, b = torch.randn(24, generator=gen), torch.randn(24, generator=gen)
    traced = torch.jit.trace(lambda x: layer_norm(x, w, b), torch.randn(5, 24, generator=gen))
    assert "tritongpt::layer_norm_fwd" in _traced_ops(traced.graph)
    x = torch.randn(5, 24, generator=gen, dtype=torch.float64)
    ref = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5) * w + b
    torch.testing.assert_close(traced(x.float()).double(), ref, atol=1e-5, rtol=0)
    traced = torch.jit.trace(lambda q, k, v: flash_attention(q, k, v, causal=False),
                             tuple(torch.randn(1, 2, 8, 16, generator=gen) for _ in range(3)))
    assert "tritongpt::flash_attn_fwd" in _traced_ops(traced.graph)
    q, k, v = (torch.randn(1, 2, 8, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    ref = (q @ k.transpose(-1, -2) / 4.0).softmax(-1) @ v
    torch.testing.assert_close(traced(q.float(), k.float(), v.float()).double(), ref, atol=2e-5, rtol=0)
