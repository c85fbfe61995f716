"""--compile-mode (train/loop.py): torch.compile's mode for every trainer with --compile, refused without it, and under
the CUDA-graph modes (reduce-overhead, max-autotune) a cudagraph_mark_step_begin before each micro-batch's forward.
Inductor skips CUDA graphs on a CPU: here the real compiled run checks the loop still trains alike; the CUDA test
compares reduce-overhead's loss curve with the default mode's on a GPU."""
import math

import pytest
import torch

from test_loop import args_for, loss_fn, make_get_batch, synthetic_tokens, tiny_model
from tritongpt.errors import UserError
from tritongpt.train import common
from tritongpt.train.loop import COMPILE_MODES, TrainArgs, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("cmd", ["pretrain", "sft", "reward", "dpo", "kto"])
def test_every_trainer_with_compile_takes_a_compile_mode(cmd):
    from tritongpt.cli import build_parser

    p = build_parser([cmd])
    extra = ["--init", "x"] if cmd == "sft" else []
    assert p.parse_args([cmd, *extra]).compile_mode == "default"
    for mode in COMPILE_MODES:
        a = TrainArgs.from_namespace(p.parse_args([cmd, *extra, "--compile", "--compile-mode", mode]))
        assert (a.compile, a.compile_mode) == (True, mode)
        a.validate()
    with pytest.raises(SystemExit):  # argparse names the choices
        p.parse_args([cmd, *extra, "--compile", "--compile-mode", "reduce_overhead"])


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
def test_a_compile_mode_without_compile_is_refused_naming_both_flags(mode):
    with pytest.raises(UserError, match=rf"^--compile-mode {mode} sets how --compile compiles: pass --compile too$"):
        TrainArgs(compile_mode=mode).validate()
    with pytest.raises(UserError, match=r"^--compile-mode must be one of default, reduce-overhead, max-autotune, "
                                        r"max-autotune-no-cudagraphs, got 'fast'$"):
        TrainArgs(compile=True, compile_mode="fast").validate()
    TrainArgs(compile_mode="default").validate()  # the default is fine without --compile


def test_pretrain_cli_refuses_a_compile_mode_without_compile(corpus, tmp_path, capsys):
    from tritongpt.cli import main

    rc = main(["pretrain", "--data", str(corpus.text), "--tokenizer", str(corpus.tok), "--cache-dir",
               str(corpus.cache), "--out-dir", str(tmp_path / "run"), "--device", "cpu", "--max-steps", "1",
               "--compile-mode", "reduce-overhead"])
    assert rc == 2
    assert "--compile-mode reduce-overhead sets how --compile compiles: pass --compile too" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("compile_, mode, marks", [
    (False, "default", False), (True, "default", False), (True, "reduce-overhead", True),
    (True, "max-autotune", True), (True, "max-autotune-no-cudagraphs", False)])
def test_the_mode_reaches_torch_compile_and_cuda_graph_modes_mark_each_micro_batch(
        tmp_path, monkeypatch, compile_, mode, marks):
    """torch.compile (recorded, the model returned as is) gets the mode; the CUDA-graph modes call
    cudagraph_mark_step_begin once before each micro-batch's forward, and the others never; the mode is
    recorded in the checkpoint's args like --compile, and a resume in another mode is not named a change."""
    events, compiled = [], []

    def fake_compile(model, **kw):
        compiled.append(kw)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: events.append("mark"))

    def recording_loss(model, batch):
        events.append("forward")
        return loss_fn(model, batch)

    steps, accum = 3, 2
    t = Trainer(tiny_model(), args_for(tmp_path, max_steps=steps, grad_accum=accum, compile=compile_,
                                       compile_mode=mode), recording_loss, make_get_batch(synthetic_tokens(), 4))
    t.fit()
    assert compiled == ([{"mode": mode}] if compile_ else [])
    assert events == (["mark", "forward"] if marks else ["forward"]) * (steps * accum)
    assert common.load_state(t.last_ckpt)["args"]["compile_mode"] == mode


def test_a_resume_in_another_compile_mode_goes_on_without_a_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: None)
    get_batch = make_get_batch(synthetic_tokens(), 4)
    Trainer(tiny_model(), args_for(tmp_path, max_steps=3, ckpt_every=2), loss_fn, get_batch).fit()
    capsys.readouterr()
    Trainer(tiny_model(), args_for(tmp_path, max_steps=3, resume=str(tmp_path / "ckpt-0000002"), compile=True,
                                   compile_mode="reduce-overhead"), loss_fn, get_batch).fit()
    assert "resuming with" not in capsys.readouterr().err  # how the step runs, not what it computes


class FakeCudaGraphs:
    """CUDA-graph trees' contract, on a CPU: torch.compile (patched) returns the model, and what it returns and the
    gradients its backward makes are overwritten (here with NaN, in place) once the next step is marked, as a
    replay overwrites its static buffers. Kept as aliases (detach), so autograd still hands a gradient over as
    .grad rather than copy it, as it does a graph's output buffer."""

    def __init__(self, monkeypatch):
        self.buffers, self.marks = [], 0
        monkeypatch.setattr(torch, "compile", self.compile)
        monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", self.mark)

    def compile(self, model, **kw):
        for p in model.parameters():
            if p.requires_grad:
                p.register_hook(self.keep)

        def compiled(*args, **kwargs):
            out = model(*args, **kwargs)
            self.keep(out)
            return out

        compiled._orig_mod = model
        return compiled

    def keep(self, t):
        self.buffers.append(t.detach())

    def mark(self):
        self.marks += 1
        for t in self.buffers:
            t.fill_(float("nan"))
        self.buffers.clear()


@pytest.mark.parametrize("accum", [1, 3])
def test_outputs_and_gradients_overwritten_by_the_next_replay_are_not_read(tmp_path, monkeypatch, accum):
    """Under the fake graphs the run is the eager one exactly: the loop keeps each micro-batch's loss as a copy and
    replaces the gradients a backward made with its own before the next micro-batch's replay."""
    eager = _curve(tmp_path / "eager", grad_accum=accum)
    graphs = FakeCudaGraphs(monkeypatch)
    replayed = _curve(tmp_path / "graphs", grad_accum=accum, compile=True, compile_mode="reduce-overhead")
    assert replayed == eager
    assert graphs.marks == 5 * accum


def _curve(tmp_path, device="cpu", **kw):
    base = dict(max_steps=5, grad_accum=2, warmup_steps=0, min_lr=3e-3, device=device)
    t = Trainer(tiny_model(n_layer=1), args_for(tmp_path, **{**base, **kw}), loss_fn,
                make_get_batch(synthetic_tokens(), 4))
    return t.fit()["losses"]


def test_a_reduce_overhead_run_trains_as_the_eager_one_on_cpu(tmp_path):
    """The real torch.compile (inductor, CUDA graphs skipped on a CPU) under --grad-accum 2: the loss curve is the
    uncompiled loop's, step by step, and falls."""
    import shutil

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("inductor on the CPU needs a C++ compiler")
    eager = _curve(tmp_path / "eager")
    graphs = _curve(tmp_path / "compiled", compile=True, compile_mode="reduce-overhead")
    assert all(math.isfinite(v) for v in graphs)
    assert graphs[-1] < graphs[0] - 0.1, graphs
    for i, (e, g) in enumerate(zip(eager, graphs)):
        assert abs(e - g) <= 1e-4 * abs(e), (i, eager, graphs)


@pytest.mark.cuda
def test_reduce_overhead_on_cuda_follows_the_default_modes_loss_curve(tmp_path):
    """CUDA graphs replayed on the Triton path (--grad-accum 2: two replays a step, each marked): the loss curve
    stays within bf16's noise of the default mode's, and falls."""
    kw = dict(compile=True, kernels="triton", dtype="bf16", max_steps=8)
    default = _curve(tmp_path / "default", "cuda", compile_mode="default", **kw)
    torch._dynamo.reset()
    graphs = _curve(tmp_path / "graphs", "cuda", compile_mode="reduce-overhead", **kw)
    assert all(math.isfinite(v) for v in graphs)
    assert graphs[-1] < graphs[0] - 0.1, graphs
    for i, (d, g) in enumerate(zip(default, graphs)):
        assert abs(d - g) <= 2e-2 * abs(d), (i, default, graphs)
