"""`tritongpt bench profile` (bench/profile_step.py) and the CUDA-graph training provider (train_step.py)."""
import gzip
import json
import types
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.autograd import DeviceType

from tritongpt.bench import profile_step, train_step
from tritongpt.bench.common import Budget

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _event(key, device_type, self_cpu=0.0, self_dev=0.0, count=1, annotation=False):
    return types.SimpleNamespace(key=key, device_type=device_type, self_cpu_time_total=self_cpu,
                                 cpu_time_total=self_cpu * 2, self_device_time_total=self_dev, count=count,
                                 is_user_annotation=annotation)


def test_summarize_totals_top_ops_and_verdict():
    """Random times (microseconds) over 2 steps: the totals are the CPU events' self CPU time and the device
    events' self device time (a user annotation on the device left out), each top list sorted and cut to K."""
    g = torch.Generator().manual_seed(7)
    cpu_t = (torch.rand(6, generator=g, dtype=torch.float64) * 1000 + 1).tolist()
    dev_t = (torch.rand(5, generator=g, dtype=torch.float64) * 1000 + 1).tolist()
    events = [_event(f"aten::op{i}", DeviceType.CPU, self_cpu=t, count=i + 1) for i, t in enumerate(cpu_t)]
    events += [_event(f"kernel{i}", DeviceType.CUDA, self_dev=t, count=2) for i, t in enumerate(dev_t)]
    events += [_event("ProfilerStep#1", DeviceType.CUDA, self_dev=1e6, annotation=True),
               _event(profile_step.HOST_READ, DeviceType.CPU, self_cpu=3.0, count=6),
               _event("cudaStreamSynchronize", DeviceType.CPU, self_cpu=5.0, count=4)]
    s = profile_step.summarize(events, steps=2, top_k=3)
    cpu_total = sum(cpu_t) + 3.0 + 5.0
    assert s["cpu_self_ms_per_step"] == pytest.approx(cpu_total / 1e3 / 2)
    assert s["device_ms_per_step"] == pytest.approx(sum(dev_t) / 1e3 / 2)
    assert s["scalar_reads_per_step"] == 3 and s["syncs_per_step"] == 2
    want = sorted(range(5), key=lambda i: -dev_t[i])[:3]
    assert [t["name"] for t in s["top_device"]] == [f"kernel{i}" for i in want]
    assert [t["self_ms"] for t in s["top_device"]] == pytest.approx([dev_t[i] / 1e3 for i in want])
    assert s["top_device"][0]["share"] == pytest.approx(dev_t[want[0]] / sum(dev_t))
    want = sorted(range(6), key=lambda i: -cpu_t[i])[:3]
    assert [(t["name"], t["count"]) for t in s["top_cpu"]] == [(f"aten::op{i}", i + 1) for i in want]
    # host-bound: the host's time per step beyond the device's
    # (the host's own time: its wait in cudaStreamSynchronize left out)
    assert profile_step.verdict(s) == ("host-bound" if cpu_total - 5.0 > sum(dev_t) else "device-bound")
    assert profile_step.verdict({"host_ms_per_step": 2.0, "device_ms_per_step": 1.0}) == "host-bound"
    assert profile_step.verdict({"host_ms_per_step": 1.0, "device_ms_per_step": 2.0}) == "device-bound"
    # a CPU run: no device events, no device time, no verdict
    s = profile_step.summarize(events[:6], steps=1, top_k=10)
    assert s["device_ms_per_step"] is None and s["top_device"] == [] and len(s["top_cpu"]) == 6
    assert profile_step.verdict(s) is None


def test_verdict_leaves_out_the_hosts_waits_for_the_device():
    """A device-bound step on a GPU: the host enqueues its work quickly, then waits in cudaDeviceSynchronize (the
    harness's final synchronize) and cudaStreamSynchronize (an .item()). That wait is CPU self time of the
    runtime call, not host work: the verdict compares the host's own time with the device's."""
    g = torch.Generator().manual_seed(11)
    host = (torch.rand(8, generator=g, dtype=torch.float64) * 500 + 1).tolist()
    kernels = (torch.rand(6, generator=g, dtype=torch.float64) * 3000 + 2000).tolist()
    wait_dev, wait_stream = 3 * sum(kernels), 0.5 * sum(kernels)  # microseconds, far beyond the device's
    events = [_event(f"aten::op{i}", DeviceType.CPU, self_cpu=t) for i, t in enumerate(host)]
    events += [_event(f"kernel{i}", DeviceType.CUDA, self_dev=t) for i, t in enumerate(kernels)]
    events += [_event("cudaDeviceSynchronize", DeviceType.CPU, self_cpu=wait_dev, count=2),
               _event("cudaStreamSynchronize", DeviceType.CPU, self_cpu=wait_stream, count=3)]
    s = profile_step.summarize(events, steps=3, top_k=4)
    assert profile_step.verdict(s) == "device-bound"
    assert s["cpu_self_ms_per_step"] == pytest.approx((sum(host) + wait_dev + wait_stream) / 1e3 / 3)
    assert s["sync_wait_ms_per_step"] == pytest.approx((wait_dev + wait_stream) / 1e3 / 3)
    assert s["host_ms_per_step"] == pytest.approx(sum(host) / 1e3 / 3)
    assert s["host_ms_per_step"] < s["device_ms_per_step"] < s["cpu_self_ms_per_step"]
    # the same host work against a device idle most of the step: host-bound
    s = profile_step.summarize(events[:8] + [_event("kernel", DeviceType.CUDA, self_dev=sum(host) / 4)] + events[-2:],
                               steps=3, top_k=4)
    assert profile_step.verdict(s) == "host-bound"


def test_syncs_per_step_leave_out_the_harness_own(monkeypatch):
    """The profiled window ends in the harness's torch.cuda.synchronize() and the profiler's own on exit: those
    cudaDeviceSynchronize calls are not the step's. profile_provider profiles them alone first and takes them
    off; a fake torch.profiler.profile stands in for CUDA's (the step itself runs on the CPU)."""
    g = torch.Generator().manual_seed(5)
    kernels = (torch.rand(4, generator=g, dtype=torch.float64) * 900 + 100).tolist()
    own = [_event("cudaDeviceSynchronize", DeviceType.CPU, self_cpu=40.0, count=2)]
    steps, reads = 3, 2  # two .item() per step, each a cudaStreamSynchronize
    run = [_event("aten::mm", DeviceType.CPU, self_cpu=kernels[0] / 8, count=steps * 4),
           _event(profile_step.HOST_READ, DeviceType.CPU, self_cpu=5.0, count=steps * reads),
           _event("cudaStreamSynchronize", DeviceType.CPU, self_cpu=300.0, count=steps * reads),
           _event("cudaDeviceSynchronize", DeviceType.CPU, self_cpu=sum(kernels), count=2)]
    run += [_event(f"kernel{i}", DeviceType.CUDA, self_dev=t, count=steps) for i, t in enumerate(kernels)]
    s = profile_step.summarize(run, steps, 5, own)
    assert s["syncs_per_step"] == reads and s["scalar_reads_per_step"] == reads
    assert profile_step.summarize(run, steps, 5)["syncs_per_step"] == pytest.approx(reads + 2 / steps)

    sessions = []

    class FakeProfile:  # the first session holds the harness's syncs alone, the second the steps
        def __init__(self, activities):
            self.events = own if not sessions else run
            sessions.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def key_averages(self):
            return self.events

    order, step = [], profile_step.train_step
    monkeypatch.setattr(torch.profiler, "profile", FakeProfile)
    monkeypatch.setattr(profile_step, "train_step", lambda *a, **k: order.append(len(sessions)) or step(*a, **k))
    e = profile_step.profile_provider("reference", "tiny", 2, 8, torch.device("cpu"), torch.float32, 1, steps, 5)
    assert e["status"] == "ok", e["status"]
    assert len(sessions) == 2 and e["syncs_per_step"] == reads and e["verdict"] == "device-bound"
    assert e["device_ms_per_step"] == pytest.approx(sum(kernels) / 1e3 / steps)
    # the harness's profile comes before the first step: a CUDA graph recorded in the warm-up is then made with
    # the profiler initialized (torch.profiler._utils._init_for_cuda_graphs, pytorch#75504), and profiled
    # replays of it are safe; then 1 warm-up step, `steps` timed, `steps` profiled
    assert order == [1] * (1 + steps) + [2] * steps


def test_markdown_top_tables_say_their_times_span_the_profiled_steps():
    """top_device / top_cpu self ms are totals over the profiled steps (profile.json's own), so their headers
    give the window's total beside the per-step figure: a kernel's 24 ms of 3 steps at 10 ms/step is 80%."""
    from tritongpt.bench.common import environment

    g = torch.Generator().manual_seed(3)
    steps, dev, host = 3, 10 + float(torch.rand((), generator=g)), 2 + float(torch.rand((), generator=g))
    entry = {"provider": "triton", "status": "ok", "step_ms": 11.0, "wall_ms_per_step": 12.0,
             "cpu_self_ms_per_step": host + 1, "sync_wait_ms_per_step": 1.0, "host_ms_per_step": host,
             "device_ms_per_step": dev, "scalar_reads_per_step": 0, "syncs_per_step": 0, "verdict": "device-bound",
             "top_device": [{"name": "kernel", "count": 3, "self_ms": 0.8 * dev * steps, "share": 0.8}],
             "top_cpu": [{"name": "aten::mm", "count": 9, "self_ms": 0.5 * host * steps, "total_ms": 2 * host,
                          "share": 0.5 * host / (host + 1)}]}
    result = profile_step.make_profile(environment(), {}, "tiny", 2, 8, torch.float32, steps, 1, 5, [entry], 1.0)
    md = profile_step.render_markdown(result)
    assert (f"Top 1 by device time (self ms over the {steps} profiled steps: {dev * steps:.2f} ms, "
            f"{dev:.2f} ms/step):") in md
    assert (f"Top 1 by CPU self time (self ms over the {steps} profiled steps: {(host + 1) * steps:.2f} ms, "
            f"{host + 1:.2f} ms/step):") in md
    assert f"| kernel | 3 | {0.8 * dev * steps:.3f} | 80.0% |" in md


def test_profile_command_on_cpu_writes_json_markdown_and_a_trace(tmp_path, capsys):
    """A tiny model's step under the profiler, CPU activity only: the files, positive and consistent numbers,
    counts as the Chrome trace has them, and the CUDA-graph provider skipped with its reason."""
    from tritongpt import cli
    from tritongpt.bench.common import environment

    stale = tmp_path / environment()["device_slug"] / "profile-traces" / "triton-compile.json.gz"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(gzip.compress(b"{}"))  # an earlier run's: not this run's, not said written
    assert cli.main(["bench", "profile", "--models", "tiny", "--train-providers",
                     "reference,triton+compile+cudagraphs", "--seq-len", "8", "--batch", "2", "--steps", "2",
                     "--warmup-steps", "1", "--dtype", "fp32", "--top", "5", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "profiling the CPU activity only" in out and "| reference |" in out
    assert "profile-traces/: reference.json.gz)" in out and "triton-compile" not in out
    (folder,) = tmp_path.iterdir()
    d = json.loads((folder / "profile.json").read_text())
    assert d["section"] == "profile" and d["config"]["model"] == "tiny" and d["config"]["batch"] == 2
    ref, graphs = d["providers"]
    assert graphs["provider"] == "triton+compile+cudagraphs"
    assert graphs["status"].startswith("skipped: CUDA graphs") and "capture CUDA work only" in graphs["status"]
    assert ref["status"] == "ok" and ref["verdict"] is None and ref["device_ms_per_step"] is None
    assert ref["step_ms"] > 0 and ref["wall_ms_per_step"] > 0 and ref["cpu_self_ms_per_step"] > 0
    assert len(ref["top_cpu"]) == 5 and ref["top_device"] == []
    tops = [t["self_ms"] for t in ref["top_cpu"]]
    assert tops == sorted(tops, reverse=True) and all(t > 0 for t in tops)
    assert sum(tops) <= ref["cpu_self_ms_per_step"] * 2 * (1 + 1e-9)  # 2 profiled steps
    assert all(t["self_ms"] <= t["total_ms"] + 1e-9 for t in ref["top_cpu"])
    # the trace holds the same ops: the scalar reads (leaves), and every top op's calls at least (key_averages
    # counts an op redispatched to one of its own name once, the trace twice)
    trace = json.loads(gzip.open(folder / ref["trace"]).read())
    calls = Counter(e["name"] for e in trace["traceEvents"] if e.get("ph") == "X")  # complete events
    for t in ref["top_cpu"]:
        assert calls[t["name"]] >= t["count"] > 0, t["name"]
    assert ref["scalar_reads_per_step"] == calls[profile_step.HOST_READ] / 2 > 0
    assert ref["trace"] == "profile-traces/reference.json.gz"
    md = (folder / "profile.md").read_text()
    assert "## Summary" in md and "no device timeline (CPU)" in md and "skipped: CUDA graphs" in md
    assert f"| {ref['top_cpu'][0]['name']} | {ref['top_cpu'][0]['count']} |" in md


def test_run_profile_budget_traces_first_and_skips():
    """A budget that has run out profiles nothing; 'first' writes the first profiled provider's trace only;
    a compiled provider with less than COMPILE_MIN_S left is not started."""
    seen = []

    def fake(name, *a, **k):
        seen.append((name, a[8]))
        return {"provider": name, "status": "ok", "step_ms": 1.0, "host_ms_per_step": 1.0,
                "device_ms_per_step": None, "verdict": None}

    orig = profile_step.profile_provider
    profile_step.profile_provider = fake
    try:
        e = profile_step.run_profile(torch.device("cpu"), Budget(0), torch.float32, "tiny", ("reference",),
                                     log=lambda s: None)
        assert e[0]["status"] == "skipped: time budget (--max-minutes)" and seen == []
        e = profile_step.run_profile(torch.device("cpu"), Budget(30), torch.float32, "tiny",
                                     ("reference", "triton", "reference+compile"), trace_dir=Path("x"),
                                     traces="first", log=lambda s: None)
        assert seen == [("reference", Path("x/profile-traces/reference.json.gz")), ("triton", None)]
        assert e[2]["status"].startswith("skipped: time budget (a compiled run needs ~60 s")
        # a CUDA-only provider elsewhere is skipped for that, whatever the budget left
        e = profile_step.run_profile(torch.device("cpu"), Budget(30), torch.float32, "tiny",
                                     ("triton+compile+cudagraphs",), log=lambda s: None)
        assert e[0]["status"].startswith("skipped: CUDA graphs (torch.compile mode='reduce-overhead') capture")
        seen.clear()
        profile_step.run_profile(torch.device("cpu"), Budget(None), torch.float32, "tiny", ("reference", "triton"),
                                 trace_dir=Path("x"), traces="none", log=lambda s: None)
        assert seen == [("reference", None), ("triton", None)]
        profile_step.run_profile(torch.device("cpu"), Budget(None), torch.float32, "tiny", ("reference", "triton"),
                                 trace_dir=Path("x"), traces="all", log=lambda s: None)
        assert [t for _, t in seen[2:]] == [Path("x/profile-traces/reference.json.gz"),
                                            Path("x/profile-traces/triton.json.gz")]
    finally:
        profile_step.profile_provider = orig


def test_cudagraphs_provider_parses_needs_compile_and_cuda(monkeypatch):
    assert train_step.parse_provider("triton+compile+cudagraphs") == ("triton", {"compile", "cudagraphs"})
    with pytest.raises(ValueError, match=r"\+cudagraphs is torch.compile's mode='reduce-overhead', so it needs "
                                         r"\+compile \(e.g. triton\+compile\+cudagraphs\)"):
        train_step.parse_provider("triton+cudagraphs")
    assert train_step.device_unavailable("triton+compile", "cpu") is None
    assert "capture CUDA work only" in train_step.device_unavailable("triton+compile+cudagraphs", "cpu")
    row = train_step.bench_train_provider("reference+compile+cudagraphs", "tiny", 1, 4, torch.device("cpu"),
                                          torch.float32, 0, 1)
    assert row["status"].startswith("skipped: CUDA graphs")
    # built (the device check stood aside) as torch.compile's mode='reduce-overhead', plain +compile as before
    modes = []
    monkeypatch.setattr(torch, "compile", lambda model, **k: modes.append(k) or model)
    monkeypatch.setattr(train_step, "device_unavailable", lambda name, device: None)
    cfg = train_step.train_config("tiny", 4)
    model, run, _ = train_step.build("reference+compile+cudagraphs", cfg, torch.device("cpu"))
    assert modes == [{"mode": "reduce-overhead"}] and run is not model and run.__name__ == "run"
    assert train_step.build("reference+compile", cfg, torch.device("cpu"))[1] is not None and modes[1] == {}
    # each call marks a new step, then copies the loss out of the graph's static buffer
    marks, buf = [], torch.zeros(())
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(len(marks)))
    run = train_step._graph_steps(lambda x, targets=None: buf.copy_(x))  # a replay: the same static output
    first = torch.randn(())
    loss = run(first, targets=None)
    assert marks == [0] and loss == first
    second = run(first + 1)  # the next replay overwrites the buffer: the first copy keeps its value
    assert loss == first and second == first + 1 and buf == first + 1 and marks == [0, 1]


def test_profile_flags_are_checked(monkeypatch):
    from tritongpt.bench import cli as bcli
    from tritongpt.cli import build_parser
    from tritongpt.errors import UserError

    monkeypatch.setattr(profile_step, "run_profile", lambda *a, **k: pytest.fail("the profile ran"))
    parser = build_parser()
    for argv, msg in ((["--models", "tiny,mini"], "bench profile takes one model in --models, got 2: tiny, mini"),
                      (["--top", "0"], "--top must be a positive integer, got 0"),
                      (["--train-providers", "triton+cudagraphs"], r"needs \+compile"),
                      (["--train-providers", "triton+fast"], r"unknown training provider 'triton\+fast'"),
                      (["--models", "gpt5"], "--models: unknown"),
                      (["--dtype", "int8"], "unknown dtype 'int8'"),
                      (["--steps", "0"], "--steps must be at least 1"),
                      (["--max-minutes", "0"], "--max-minutes must be a positive number")):
        with pytest.raises(UserError, match=msg):
            bcli.cmd_bench(parser.parse_args(["bench", "profile", *argv]))
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "profile", "--traces", "some"])
    # the defaults: GPT-2 124M, the eager Triton path beside the two compiled ones; bench train's stay its own
    args = parser.parse_args(["bench", "profile"])
    assert bcli.profile_names(args) == ("gpt2-small", profile_step.PROFILE_PROVIDERS)
    args = parser.parse_args(["bench", "train"])
    assert bcli.train_names(args)[1] == train_step.TRAIN_PROVIDERS


def test_gpu_session_profile_stage_runs_bench_profile_and_packs(tmp_path):
    """`bash bench/gpu_session.sh profile` (not part of all) runs bench profile on GPT-2 124M with the CUDA-graph
    provider, within PROFILE_MINUTES, into results-profile/, and packs. Python is a stand-in that records its
    arguments."""
    from tritongpt.bench import cli as bcli
    from tritongpt.cli import build_parser

    from session_stub import SCRIPT as script, run_gpu_session

    runs, work, _ = run_gpu_session(tmp_path, "profile", PROFILE_MINUTES="0.5")
    (bench,) = [c[2:] for c in runs if c[:2] == ["-m", "tritongpt.cli"]]
    assert bench == ["bench", "profile", "--models", "gpt2-small", "--train-providers",
                     "triton,triton+compile+cudagraphs,reference+compile+sdpa,triton+compile", "--max-minutes", "0.5",
                     "--out", f"{work}/results-profile"]
    assert not any("pytest" in c for c in runs)
    assert bcli.profile_names(build_parser().parse_args(bench))[1][1] == "triton+compile+cudagraphs"
    assert (tmp_path / "out" / "session.tgz").is_file()
    # `all` does not profile
    text = script.read_text()
    assert 'if [ "$what" = profile ]; then' in text and '"$what" = all ] || [ "$what" = profile' not in text


# -- on a GPU --------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@cuda
def test_profile_on_gpu_sees_the_kernels(tmp_path):
    """Device events on a GPU: the eager Triton path's device time, its top kernels within it, a verdict; and the
    CUDA-graph provider runs the same steps (same loss)."""
    entry = profile_step.profile_provider("triton", "tiny", 2, 64, torch.device("cuda"), torch.bfloat16, 3, 2, 10,
                                          tmp_path / "profile-traces" / "triton.json.gz")
    assert entry["status"] == "ok", entry["status"]
    assert entry["device_ms_per_step"] > 0 and entry["verdict"] in ("host-bound", "device-bound")
    assert sum(t["self_ms"] for t in entry["top_device"]) <= entry["device_ms_per_step"] * 2 * (1 + 1e-6)
    assert (tmp_path / "profile-traces" / "triton.json.gz").is_file()
    graphs = profile_step.profile_provider("triton+compile+cudagraphs", "tiny", 2, 64, torch.device("cuda"),
                                           torch.bfloat16, 3, 2, 10)
    assert graphs["status"] == "ok", graphs["status"]
    assert graphs["final_loss"] == pytest.approx(entry["final_loss"], rel=2e-2)
