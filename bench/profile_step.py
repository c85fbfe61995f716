"""`tritongpt bench profile`: where a training step's time goes, per provider, under torch.profiler.

bench train says how long a step takes; this says why. For each provider (train_step.py's, built and
stepped the same way: same model, batch, optimizer) it runs the warm-up steps, times --steps steps
unprofiled (CUDA events, as bench train does), then profiles --steps more with torch.profiler (CPU
activity, and CUDA activity on a GPU) and reports:

    wall ms per step      the profiled steps' wall clock (perf_counter around them and a final
                          synchronize): the profiler's own overhead included, so also step_ms, unprofiled
    CPU self ms per step  the sum of every CPU op's self time (torch's "Self CPU time total"): the
                          host's work, the autograd thread's included, the profiler's bookkeeping too,
                          and its waits for the device: the time blocked in the synchronize calls below
    sync wait ms per step those calls' self time (the window's final synchronize included: a device-bound
                          step's host waits there for the device to catch up)
    host ms per step      CPU self less sync wait: the host's own work
    device ms per step    the sum of the device events' self time (torch's "Self CUDA time total"):
                          the GPU's busy time when its work is on one stream, as a training step's is
    scalar reads per step aten::_local_scalar_dense calls: .item(), bool(t), int(t) of a tensor; of a
                          CUDA tensor each waits for the device (on a CPU tensor it is free), so on a GPU
                          read it beside:
    syncs per step        cudaStreamSynchronize / cudaDeviceSynchronize / cudaEventSynchronize calls,
                          the host waiting for the device inside the step (the window's own at its end,
                          ours and the profiler's on exit, counted in a profile of them alone, left out)
    the top-K events by device self time (the kernels) and by CPU self time (the ops), with counts

and calls a provider "host-bound" when its host ms per step exceed its device time per step:
the GPU then waits on the host (launch overhead, Python), which CUDA graphs (the
triton+compile+cudagraphs provider) or fewer, larger kernels remove; "device-bound" otherwise. On a
CPU there is no device timeline: the host time is all there is, and no verdict is given.
Written under --out/<device>/: profile.json, profile.md, and profile-traces/<provider>.json.gz, a
Chrome trace per provider (chrome://tracing or ui.perfetto.dev) in one folder, so a session packs them
as one. torch.profiler: https://pytorch.org/docs/stable/profiler.html (key_averages, export_chrome_trace).
"""
import json
import math
import sys
import time
from pathlib import Path

import torch

from tritongpt.bench.common import dtype_name, reason_of, slugify
from tritongpt.bench.train_step import (COMPILE_MIN_S, Unavailable, build, device_unavailable, model_variant,
                                        time_steps, train_config, train_step)
from tritongpt.kernels._common import is_oom
from tritongpt.train.common import LossScaler

# the compiled baseline and ours compiled beside the eager Triton path: where the 77.6 ms go
PROFILE_PROVIDERS = ("triton", "reference+compile+sdpa", "triton+compile")
TRACES = ("all", "first", "none")
HOST_READ = "aten::_local_scalar_dense"  # what .item(), bool(t) and int(t) of a tensor run
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
SCHEMA = "tritongpt-bench-profile/1"


def summarize(events, steps, top_k, harness=()):
    """Per-step totals and the top ops of torch.profiler's key_averages() `events` over `steps` steps.
    The totals are the profiler table's own footers: self CPU time of the CPU events, self device time
    of the device events (user annotations left out, as the table leaves them). The host's own time
    leaves out its waits for the device (the SYNC_CALLS' self time: a blocked call, not work). The syncs
    counted leave out `harness`'s: the key_averages() of the profiled window's end alone (the final
    synchronize, and the profiler's own on exit), which are no step's."""
    from torch.autograd import DeviceType

    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    dev = [e for e in events if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False)]
    cpu_us = sum(e.self_cpu_time_total for e in cpu)
    wait_us = sum(e.self_cpu_time_total for e in cpu if e.key in SYNC_CALLS)
    dev_us = sum(e.self_device_time_total for e in dev)
    by_dev = sorted(dev, key=lambda e: e.self_device_time_total, reverse=True)[:top_k]
    by_cpu = sorted(cpu, key=lambda e: e.self_cpu_time_total, reverse=True)[:top_k]
    count = {e.key: e.count for e in cpu}
    own = {e.key: e.count for e in harness if e.device_type == DeviceType.CPU}
    return {
        "cpu_self_ms_per_step": cpu_us / 1e3 / steps,
        "sync_wait_ms_per_step": wait_us / 1e3 / steps,
        "host_ms_per_step": (cpu_us - wait_us) / 1e3 / steps,
        "device_ms_per_step": dev_us / 1e3 / steps if dev else None,
        "scalar_reads_per_step": count.get(HOST_READ, 0) / steps,
        "syncs_per_step": sum(max(0, count.get(name, 0) - own.get(name, 0)) for name in SYNC_CALLS) / steps,
        "top_device": [{"name": e.key, "count": e.count, "self_ms": e.self_device_time_total / 1e3,
                        "share": e.self_device_time_total / dev_us if dev_us else None} for e in by_dev],
        "top_cpu": [{"name": e.key, "count": e.count, "self_ms": e.self_cpu_time_total / 1e3,
                     "total_ms": e.cpu_time_total / 1e3, "share": e.self_cpu_time_total / cpu_us if cpu_us else None}
                    for e in by_cpu],
    }


def verdict(entry):
    """'host-bound' when the host's own time per step (its waits for the device left out: a device-bound
    step's host waits out the difference) exceeds the device's busy time, else 'device-bound'; None
    without a device timeline (a CPU run)."""
    if entry.get("device_ms_per_step") is None:
        return None
    return "host-bound" if entry["host_ms_per_step"] > entry["device_ms_per_step"] else "device-bound"


def _cudagraph_skips():
    """How many times inductor fell back from CUDA graphs so far (a host sync or a CPU tensor in the graph
    makes it skip them); None before dynamo is imported."""
    if "torch._dynamo" not in sys.modules:
        return None
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def profile_provider(name, model_name, batch, seq_len, device, dtype, warmup_steps, steps, top_k=15,
                     trace_path=None, vocab_size=None, seed=0, **model):
    """One provider's entry: its unprofiled step time, the profiled steps' totals and top ops (summarize),
    the verdict, and its Chrome trace written to trace_path (a .json.gz; None: none)."""
    from torch.profiler import ProfilerActivity, profile

    cfg = train_config(model_name, seq_len, vocab_size, **model)
    g = torch.Generator().manual_seed(seed)  # the same batch for every provider, as bench train's
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=g).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    entry = {"provider": name}
    model = run = opt = None
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    try:
        model, run, opt = build(name, cfg, device, seed)
        losses, scaler = [], LossScaler(device, dtype)

        def step():
            losses.append(train_step(run, model, opt, x, y, device, dtype, scaler=scaler))

        activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda
        # the profiled window's end alone (its syncs are no step's), and before any CUDA graph is recorded: a
        # graph made before the profiler's first start can fault when replayed under it (pytorch#75504; torch's
        # own workaround, torch.profiler._utils._init_for_cuda_graphs, is this empty profile)
        with profile(activities=activities) as harness:
            sync()
        skips = _cudagraph_skips()
        t0 = time.perf_counter()
        for _ in range(warmup_steps):  # compilation, autotuning, CUDA-graph recording, optimizer state
            step()
        sync()
        entry["warmup_s"] = time.perf_counter() - t0
        times = sorted(time_steps(step, steps, device))
        entry["step_ms"] = times[len(times) // 2]
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            sync()
            entry["wall_ms_per_step"] = (time.perf_counter() - t0) * 1e3 / steps
        entry.update(summarize(prof.key_averages(), steps, top_k, harness.key_averages()))
        after = _cudagraph_skips()
        entry["cudagraph_skips"] = None if after is None else after - (skips or 0)
        entry["final_loss"] = float(losses[-1])
        if not math.isfinite(entry["final_loss"]):
            entry["status"] = f"failed: loss is {entry['final_loss']}"
            return entry
        if trace_path is not None:
            Path(trace_path).parent.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(trace_path))  # gzipped by torch for a .gz name
            entry["trace"] = "/".join(Path(trace_path).parts[-2:])  # relative to profile.json
        entry["verdict"] = verdict(entry)
        entry["status"] = "ok"
    except Unavailable as e:
        entry["status"] = f"skipped: {e}"
    except Exception as e:
        entry["status"] = "failed: out of memory" if is_oom(e) else f"failed: {reason_of(e)}"
    finally:
        model = run = opt = None  # the weights and compiled graphs go before the next provider is built
        import gc

        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        if "torch._dynamo" in sys.modules:
            torch._dynamo.reset()
    return entry


def run_profile(device, budget, dtype, model_name, providers=PROFILE_PROVIDERS, batch=2, seq_len=1024,
                warmup_steps=3, steps=3, top_k=15, trace_dir=None, traces="all", log=print, **model_flags):
    """Every provider's entry, in order; one the budget cannot hold is 'skipped: ...' unrun (a compiled one
    needs COMPILE_MIN_S left). trace_dir: where profile-traces/ go (None: nowhere); traces: all | first
    (the first provider profiled only) | none."""
    entries = []
    for p in providers:
        if budget.expired():
            entries.append({"provider": p, "status": budget.skip_reason()})
            continue
        why = device_unavailable(p, device)
        if why:  # said as it is, not as a budget's skip
            entries.append({"provider": p, "status": f"skipped: {why}"})
            continue
        if "compile" in p and budget.remaining() < COMPILE_MIN_S:
            entries.append({"provider": p, "status": f"skipped: time budget (a compiled run needs "
                                                     f"~{COMPILE_MIN_S:.0f} s, {budget.remaining():.0f} s left)"})
            continue
        first = not any(e["status"] == "ok" for e in entries)
        trace = None
        if trace_dir is not None and (traces == "all" or (traces == "first" and first)):
            trace = Path(trace_dir) / "profile-traces" / f"{slugify(p.replace('+', '-'))}.json.gz"
        log(f"profile: {model_name} B={batch} T={seq_len} {p} ...")
        try:
            entry = profile_provider(p, model_name, batch, seq_len, device, dtype, warmup_steps, steps, top_k,
                                     trace, **model_flags)
        except KeyboardInterrupt:  # what is profiled so far is still written; nothing new starts
            budget.interrupt()
            entry = {"provider": p, "status": budget.skip_reason()}
        entries.append(entry)
        log(f"  {entry['status']}" if entry["status"] != "ok" else
            f"  {entry['step_ms']:.2f} ms/step, host {entry['host_ms_per_step']:.2f} ms, device "
            f"{_ms(entry['device_ms_per_step'])} ms{', ' + entry['verdict'] if entry['verdict'] else ''}")
    return entries


def make_profile(env, settings, model_name, batch, seq_len, dtype, steps, warmup_steps, top_k, entries,
                 elapsed_s, **model_flags):
    cfg = train_config(model_name, seq_len, **model_flags)
    config = {"model": model_name, "batch": batch, "seq_len": seq_len, "dtype": dtype_name(dtype), "steps": steps,
              "warmup_steps": warmup_steps, "top_k": top_k, **model_variant(cfg)}
    return {"schema": SCHEMA, "section": "profile", "env": env, "settings": settings, "config": config,
            "providers": entries, "elapsed_s": elapsed_s}


def _ms(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}"


def _over(ms_per_step, steps):
    """A top table's scale: its self ms are totals over the profiled steps, as profile.json's are."""
    return f"self ms over the {steps} profiled steps: {_ms(ms_per_step * steps)} ms, {_ms(ms_per_step)} ms/step"


def _cell(text, limit=90):
    """A kernel name cut to fit a table cell: inductor's and C++ templates' run long."""
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def render_markdown(result) -> str:
    from tritongpt.bench.report import config_text, env_lines, markdown_table

    c = result["config"]
    lines = ["# tritongpt bench: profile", "", env_lines(result["env"]), "",
             f"Model: {config_text(c)}; {c['warmup_steps']} warm-up steps, then {c['steps']} timed and "
             f"{c['steps']} profiled steps.", "",
             "host = the CPU ops' self time per step (every thread, the profiler's bookkeeping included) less the "
             "sync wait, the host blocked in CUDA synchronize calls (the window's final one included); "
             "device = the device events' self time per step (its busy time on one stream); host-bound: host > "
             "device, the GPU waits on launches. scalar reads: .item()/bool()/int() of a tensor (a sync when it is "
             "on the GPU); syncs: the CUDA synchronize calls.",
             "", "## Summary", ""]
    rows = []
    for e in result["providers"]:
        if e["status"] != "ok":
            rows.append([e["provider"], "-", "-", "-", "-", "-", "-", "-", e["status"]])
            continue
        rows.append([e["provider"], _ms(e["step_ms"]), _ms(e["wall_ms_per_step"]), _ms(e["host_ms_per_step"]),
                     _ms(e["sync_wait_ms_per_step"]), _ms(e["device_ms_per_step"]), f"{e['scalar_reads_per_step']:g}",
                     f"{e['syncs_per_step']:g}", e["verdict"] or "no device timeline (CPU)"])
    lines += [markdown_table(["provider", "step ms", "profiled wall ms/step", "host ms/step", "sync wait ms/step",
                              "device ms/step", "scalar reads/step", "syncs/step", "verdict"], rows)]
    for e in result["providers"]:
        if e["status"] != "ok":
            continue
        lines += ["", f"## {e['provider']}", ""]
        if e.get("trace"):
            lines += [f"Chrome trace: `{e['trace']}`", ""]
        if e.get("cudagraph_skips"):
            lines += [f"inductor skipped CUDA graphs {e['cudagraph_skips']} time(s) (see the log)", ""]
        if e["top_device"]:
            lines += [f"Top {len(e['top_device'])} by device time ({_over(e['device_ms_per_step'], c['steps'])}):", "",
                      markdown_table(["kernel", "calls", "self ms", "share"],
                                     [[_cell(t["name"]), t["count"], _ms(t["self_ms"], 3), f"{100 * t['share']:.1f}%"]
                                      for t in e["top_device"]]), ""]
        lines += [f"Top {len(e['top_cpu'])} by CPU self time ({_over(e['cpu_self_ms_per_step'], c['steps'])}):", "",
                  markdown_table(["op", "calls", "self ms", "total ms", "share"],
                                 [[_cell(t["name"]), t["count"], _ms(t["self_ms"], 3), _ms(t["total_ms"], 3),
                                   f"{100 * t['share']:.1f}%" if t["share"] is not None else "-"]
                                  for t in e["top_cpu"]])]
    return "\n".join(lines) + "\n"


def write_profile(result, folder) -> list:
    """profile.json and profile.md into folder (the traces are already there). Returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "profile.json", folder / "profile.md"]
    paths[0].write_text(json.dumps(result, indent=1, default=str) + "\n")
    paths[1].write_text(render_markdown(result))
    return paths
