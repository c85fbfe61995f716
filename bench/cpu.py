"""What can be measured without a GPU: tokenizer throughput and the reference model on a CPU.

Timings are medians of time.perf_counter over a few repetitions after an untimed call. None of
these numbers say anything about the Triton kernels (on a CPU they run through Triton's
interpreter, which is for correctness, not speed); the kernel and training figures need CUDA.
"""
import time

import torch

from tritongpt.bench.common import CpuTimer, make_row, reason_of, time_cpu, try_import


def corpus_text() -> str:
    """The embedded corpus (Python's pydoc topics, as train/data.py's default source)."""
    import pydoc_data.topics

    return "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))


def bench_tokenizer(text: str, reps: int = 3, reference_chars: int = 20_000, tokenizer=None):
    """Encode throughput of the BPE tokenizer: the tiktoken fast path and the from-scratch one."""
    rows = []
    load_s = None
    if tokenizer is None:
        get, why = try_import("tritongpt.train.tokenizer", "default_tokenizer")
        if get is None:
            return [make_row("cpu", "tokenizer-encode", p, {}, None, f"skipped: {why}")
                    for p in ("fast", "reference")]
        try:
            t0 = time.perf_counter()
            tokenizer = get()  # trains once, then loads from its disk cache
            load_s = time.perf_counter() - t0
        except Exception as e:
            return [make_row("cpu", "tokenizer-encode", p, {}, None, f"failed: {reason_of(e)}")
                    for p in ("fast", "reference")]
    vocab = getattr(tokenizer, "vocab_size", None)
    for provider, method, sample in (("fast", "encode", text),
                                     ("reference", "encode_reference", text[:reference_chars])):
        cfg = {"chars": len(sample), "bytes": len(sample.encode("utf-8")), "vocab_size": vocab}
        fn = getattr(tokenizer, method, None)
        if fn is None:
            rows.append(make_row("cpu", "tokenizer-encode", provider, cfg, None,
                                 f"skipped: tokenizer has no .{method}"))
            continue
        try:
            ids = fn(sample)
            med, p20, p80 = time_cpu(lambda: fn(sample), reps=reps, warm_calls=0)
        except Exception as e:
            rows.append(make_row("cpu", "tokenizer-encode", provider, cfg, None, f"failed: {reason_of(e)}"))
            continue
        rows.append(make_row("cpu", "tokenizer-encode", provider, cfg, None, ms=med, ms_p20=p20,
                             ms_p80=p80, tokens=len(ids), tokens_per_s=len(ids) / (med * 1e-3),
                             mb_per_s=cfg["bytes"] / (med * 1e-3) / 1e6, load_s=load_s))
    return rows


def _cpu_model(model_name, batch, seq_len, train: bool):
    """A freshly seeded reference GPTModel, its row config, and random token ids [B, T+1]."""
    from tritongpt.model.config import get_config
    from tritongpt.model.gpt import GPTModel

    cfg = get_config(model_name)
    T = seq_len or cfg.context_length
    conf = {"model": model_name, "batch": batch, "seq_len": T, "dtype": "fp32",
            "threads": torch.get_num_threads()}
    torch.manual_seed(0)
    model = GPTModel(cfg).train(train)
    return model, conf, torch.randint(0, cfg.vocab_size, (batch, T + 1))


def _timed_row(op, mode, conf, fn, reps, **extra):
    """Time fn on the CPU into a row; a failure becomes a `failed: ...` row, never a crash."""
    try:
        med, p20, p80 = time_cpu(fn, reps=reps)
    except Exception as e:
        return make_row("cpu", op, "reference", conf, mode, f"failed: {reason_of(e)}")
    tokens = conf["batch"] * conf["seq_len"]
    return make_row("cpu", op, "reference", conf, mode, ms=med, ms_p20=p20, ms_p80=p80,
                    tokens_per_s=tokens / (med * 1e-3), **extra)


def bench_model_forward(model_name="tiny", batch=8, seq_len=None, reps=5):
    """Reference GPTModel forward (eval, no grad, fp32) on random token ids."""
    model, conf, tokens = _cpu_model(model_name, batch, seq_len, train=False)
    idx = tokens[:, :-1]

    def forward():
        with torch.no_grad():
            return model(idx)

    return _timed_row("model-forward", "fwd", conf, forward, reps, n_params=model.num_params())


def bench_model_train_step(model_name="tiny", batch=8, seq_len=None, reps=3):
    """Reference forward + loss + backward + AdamW step, fp32 on the CPU."""
    from tritongpt.bench.train_step import train_step
    from tritongpt.train.common import build_optimizer

    model, conf, tokens = _cpu_model(model_name, batch, seq_len, train=True)
    opt = build_optimizer(model, lr=1e-4, device=torch.device("cpu"))
    x, y = tokens[:, :-1], tokens[:, 1:]
    return _timed_row("train-step", "fwd+bwd", conf,
                      lambda: train_step(model, model, opt, x, y, torch.device("cpu"), torch.float32), reps)


def bench_generate(model_name="tiny", prompt_len=32, new_tokens=32, reps=3):
    """Greedy decoding with the KV cache on the reference path (one row, fp32): the prompt's prefill, then
    new_tokens steps of one position each. tokens_per_s counts the new tokens (no EOS ends the text early)."""
    from tritongpt.train.generate import generate

    model, conf, tokens = _cpu_model(model_name, 1, prompt_len, train=False)
    conf["new_tokens"] = new_tokens
    idx = tokens[:, :prompt_len]
    try:
        med, p20, p80 = time_cpu(lambda: generate(model, idx, new_tokens), reps=reps)
    except Exception as e:
        return make_row("cpu", "generate", "reference", conf, "decode", f"failed: {reason_of(e)}")
    return make_row("cpu", "generate", "reference", conf, "decode", ms=med, ms_p20=p20, ms_p80=p80,
                    tokens_per_s=new_tokens / (med * 1e-3))


def mlp_saved_cpu(rows_m=64, width=48, providers=("reference", "torch", "triton")):
    """Saved-activation bytes of the GELU-MLP on the CPU (a count, not a timing: it holds on
    any device). The Triton provider runs through the interpreter at this small size."""
    from tritongpt.bench.kernels import mlp_providers, mlp_saved_rows, randn

    dev, dt = torch.device("cpu"), torch.float32
    torch.manual_seed(0)
    x = randn(rows_m, width, device=dev, dtype=dt)
    w1 = randn(4 * width, width, device=dev, dtype=dt, scale=width ** -0.5)
    b1 = randn(4 * width, device=dev, dtype=dt, scale=0.02)
    w2 = randn(width, 4 * width, device=dev, dtype=dt, scale=(4 * width) ** -0.5)
    b2 = randn(width, device=dev, dtype=dt, scale=0.02)
    cfg = {"rows": rows_m, "width": width, "hidden": 4 * width, "dtype": "fp32"}
    rows = mlp_saved_rows(cfg, mlp_providers(x, w1, b1, w2, b2), providers)
    for r in rows:
        r["section"] = "cpu"
    return rows


def run_cpu(quick=False, log=print):
    rows = []
    log("cpu: tokenizer encode throughput ...")
    text = corpus_text()
    rows += bench_tokenizer(text if not quick else text[:100_000], reps=3 if not quick else 2,
                            reference_chars=20_000 if not quick else 5_000)
    log("cpu: reference model forward (tiny) ...")
    rows.append(bench_model_forward("tiny", batch=8 if not quick else 4, reps=5 if not quick else 3))
    if not quick:
        log("cpu: reference model forward (mini) ...")
        rows.append(bench_model_forward("mini", batch=4, reps=3))
    log("cpu: reference train step (tiny) ...")
    rows.append(bench_model_train_step("tiny", batch=8 if not quick else 4, reps=3 if not quick else 2))
    log("cpu: greedy decoding with the KV cache (tiny) ...")
    rows.append(bench_generate("tiny", new_tokens=32 if not quick else 8, reps=3 if not quick else 2))
    log("cpu: host overhead of the Triton ops (launch stubbed) ...")
    rows += bench_host_overhead(calls=300 if not quick else 50, timeout_s=600 if not quick else 180)
    log("cpu: GELU-MLP saved activation bytes ...")
    provs = ("reference", "torch", "triton")
    rows += mlp_saved_cpu(providers=provs)
    return rows


# -- host overhead of the Triton ops ---------------------------------------------------------------
HOST_NOTE = "host only: Python/dispatch time with the Triton launch stubbed, CPU tensors; not GPU time"


class stubbed_launches:
    """Within it, every Triton launch returns at once (the interpreter's launch, InterpretedFunction.run,
    does nothing): a kernel call costs only our Python host path (checks, dispatch, autograd, allocation,
    launch shapes), not Triton's own launcher, which differs between the interpreter and a GPU. The
    outputs are then uninitialized memory; only timings mean anything. .launches counts the launches."""

    def __enter__(self):
        from triton.runtime import interpreter

        self.cls, self.saved, self.launches = interpreter.InterpretedFunction, interpreter.InterpretedFunction.run, 0

        def run(fn, *args, grid, warmup, **kwargs):
            self.launches += not warmup

        self.cls.run = run
        return self

    def __exit__(self, *exc):
        self.cls.run = self.saved


def host_cases(rows=8, width=768, mlp_width=32, heads=4, seq=16, head_dim=64, vocab=512, cache=512):
    """{op: (ours, torch's eager op)}, each a function of no arguments returning a tensor, on tiny
    fp32 CPU tensors with requires_grad (the backward is timed through the sum of the output). The
    MLPs are narrow (mlp_width): torch's matmuls there run for real, and must cost next to nothing.
    decode_attention: one query a head against `cache` keys, without gradients (a KV-cache decode step: on a
    GPU's branch the split-KV kernel and its combine, HOST_MODES: forward only); torch's SDPA there computes for
    real, 4 heads x 512 keys, so its row is not host time alone. int8_linear: the weight-only int8 linear (no
    gradients: forward only), against F.linear on the weight dequantized once; int4_linear the int4 one (groups of
    16 of the mlp_width inputs), likewise. token_mask: structured outputs' grammar mask on `rows` rows of `vocab`
    logits, half of them masked (indices: a decode batch's guided rows), in place, against the reference's
    unpack and masked_fill (model/sampling.py)."""
    import torch.nn.functional as F

    from tritongpt.kernels.attention import flash_attention
    from tritongpt.kernels.cross_entropy import cross_entropy
    from tritongpt.kernels.layernorm import add_layer_norm, layer_norm, rms_norm
    from tritongpt.kernels.mlp import gelu_mlp
    from tritongpt.kernels.quant import int4_linear, int8_linear
    from tritongpt.model.quant import quantize_weight_int4, unpack_int4
    from tritongpt.kernels.rope import rope
    from tritongpt.kernels.swiglu import swiglu_mlp
    from tritongpt.kernels.token_mask import apply_token_bitmask_
    from tritongpt.model.sampling import apply_token_bitmask_reference, bitmask_words

    g = torch.Generator().manual_seed(0)

    def p(*shape):
        return torch.randn(*shape, generator=g).requires_grad_()

    x, d, w, b = p(rows, width), p(rows, width), p(width), p(width)
    xm, hidden = p(rows, mlp_width), 4 * mlp_width
    w1, b1, w2, b2 = p(hidden, mlp_width), p(hidden), p(mlp_width, hidden), p(mlp_width)
    wg, wu, wd = p(hidden, mlp_width), p(hidden, mlp_width), p(mlp_width, hidden)
    q, k, v = (p(1, heads, seq, head_dim) for _ in range(3))
    q1, kc, vc = (torch.randn(1, heads, n, head_dim, generator=g) for n in (1, cache, cache))
    logits, targets = p(rows, vocab), torch.randint(0, vocab, (rows,), generator=g)
    # int8_linear: inference only (no gradients); torch's side is F.linear on the weight dequantized once
    xq = torch.randn(rows, mlp_width, generator=g)
    q8 = torch.randint(-127, 128, (hidden, mlp_width), generator=g, dtype=torch.int8)
    s8, bq = torch.rand(hidden, generator=g) / 127, torch.randn(hidden, generator=g)
    w8 = q8.float() * s8[:, None]
    q4, s4, o4 = quantize_weight_int4(torch.randn(hidden, mlp_width, generator=g), 16)
    w4 = (unpack_int4(q4).float().view(hidden, -1, 16) * s4[:, :, None] + o4[:, :, None]).view(hidden, mlp_width)
    lm = torch.randn(rows, vocab, generator=g)  # (no gradients: the mask is inference only)
    bm = torch.randint(-2**31, 2**31 - 1, (rows, bitmask_words(vocab)), generator=g, dtype=torch.int32)
    guided = list(range(0, rows, 2))
    half = head_dim // 2
    inv = 1.0 / 10000.0 ** (torch.arange(half) / half)
    ang = torch.arange(seq)[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rope_torch(t):
        t1, t2 = t[..., :half], t[..., half:]
        return t * cos + torch.cat([-t2, t1], -1) * sin

    def sum2(pair):
        return pair[0].sum() + pair[1].sum()

    return {
        "layer_norm": (lambda: layer_norm(x, w, b), lambda: F.layer_norm(x, (width,), w, b)),
        "add_layer_norm": (lambda: sum2(add_layer_norm(x, d, w, b)),
                           lambda: sum2((lambda s: (s, F.layer_norm(s, (width,), w, b)))(x + d))),
        "rms_norm": (lambda: rms_norm(x, w), lambda: F.rms_norm(x, (width,), w, 1e-5)),
        "gelu_mlp": (lambda: gelu_mlp(xm, w1, b1, w2, b2),
                     lambda: F.linear(F.gelu(F.linear(xm, w1, b1), approximate="tanh"), w2, b2)),
        "swiglu_mlp": (lambda: swiglu_mlp(xm, wg, None, wu, None, wd, None),
                       lambda: F.linear(F.silu(F.linear(xm, wg)) * F.linear(xm, wu), wd)),
        "flash_attention": (lambda: flash_attention(q, k, v, causal=True),
                            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
        "cross_entropy": (lambda: cross_entropy(logits, targets), lambda: F.cross_entropy(logits, targets)),
        "rope": (lambda: sum2(rope(q, k, 0)), lambda: sum2((rope_torch(q), rope_torch(k)))),
        "int8_linear": (lambda: int8_linear(xq, q8, s8, bq), lambda: F.linear(xq, w8, bq)),
        "int4_linear": (lambda: int4_linear(xq, q4, s4, o4, bq), lambda: F.linear(xq, w4, bq)),
        "decode_attention": (lambda: flash_attention(q1, kc, vc, causal=True),
                             lambda: F.scaled_dot_product_attention(q1, kc, vc)),  # one query: every key
        "token_mask": (lambda: apply_token_bitmask_(lm, bm, guided),
                       lambda: apply_token_bitmask_reference(lm, bm, guided)),
    }


def bench_host_overhead(calls=300, ops=None, gpu_branch=True, timeout_s=600):
    """Per-call host time of each Triton op used by the model, fwd and fwd+bwd, and of torch's eager
    op for the same job, with the Triton launch stubbed (stubbed_launches) on tiny CPU tensors: what
    a GPU step pays on the host before any kernel runs (where the GPU waits on it, small batches and
    small models, a kernel's timing is this, not the kernel's). Not GPU time: the numbers are this
    CPU's Python and dispatch speed. gpu_branch: the GPU branch's rows follow (host_rows_gpu_branch, its process
    given timeout_s), also where the interpreter is off here and the rows above are skipped."""
    from tritongpt._env import triton_interpreting

    conf = {**HOST_CONF, "calls": calls}
    names = ops or list(host_cases())
    rows = []
    if not triton_interpreting():
        rows += [make_row("cpu", f"host-{n}", pr, _host_conf(n, conf), m,
                          "skipped: needs Triton's interpreter (TRITON_INTERPRET=1)")
                 for n in names for pr in ("triton", "torch") for m in host_modes(n)]
    else:
        cases = host_cases()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny tensors: a thread pool's wake-ups would only add noise to either side
        try:
            with stubbed_launches() as stub:
                _host_rows(names, cases, calls, conf, stub, rows)
        finally:
            torch.set_num_threads(threads)
    if gpu_branch:  # in a process of its own, with the interpreter off whatever this one does
        rows += host_rows_gpu_branch(names, calls, timeout_s)
    return rows


GPU_BRANCH = "triton-gpu-branch"
GPU_BRANCH_NOTE = ("host only: the launchers' GPU branch (autotuned picks, GPU launch shapes) on CPU tensors, "
                   "Triton's own launcher stubbed; not GPU time")


def host_rows_gpu_branch(names, calls, timeout_s=600):
    """The host rows of our ops as a GPU runs them (provider "triton-gpu-branch"). The interpreter's rows above take
    the launchers' interpreter branch, where nothing is autotuned (attention's kernels are not even Autotuners
    there); this one's launchers take their GPU branch: each autotuned kernel's search (one config, untimed), then
    its pick through _common.launch_tuned, the GPU launch shapes. Triton decides interpreter or not at import, so
    in a fresh process with TRITON_INTERPRET=0, Triton's own launcher (JITFunction.run) stubbed."""
    import json
    import os
    import subprocess
    import sys

    code = ("import json, sys; from tritongpt.bench.cpu import gpu_branch_rows; "
            "print(json.dumps(gpu_branch_rows(json.loads(sys.argv[1]), int(sys.argv[2]))))")
    env = dict(os.environ, TRITON_INTERPRET="0")
    try:
        run = subprocess.run([sys.executable, "-c", code, json.dumps(names), str(calls)], env=env,
                             capture_output=True, text=True, timeout=timeout_s)
        if run.returncode != 0:
            raise RuntimeError((run.stderr.strip().splitlines() or [f"exit status {run.returncode}"])[-1])
        rows = json.loads(run.stdout.strip().splitlines()[-1])
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"the GPU branch's process printed {type(rows).__name__}, not a list of rows, last")
        return rows
    except (OSError, RuntimeError, ValueError, IndexError, subprocess.TimeoutExpired) as e:
        return [make_row("cpu", f"host-{n}", GPU_BRANCH, _host_conf(n, {**HOST_CONF, "calls": calls}), m,
                         f"failed: {reason_of(e)}")
                for n in names for m in host_modes(n)]


class gpu_branch_launches:
    """Within it (a process with TRITON_INTERPRET=0), our launchers run their GPU branch on CPU tensors: every
    Triton launch (JITFunction.run) returns at once, counted in .launches (.tuned: those of an autotuned kernel);
    each autotune search keeps the first config its prune leaves, untimed (nothing here can time a GPU kernel);
    CPU tensors pass the device check; the GPU has 132 SMs (an H100 SXM's). Outputs are uninitialized memory.
    On exit the swapped attributes are back, but not the searches' untimed picks (each Autotuner's cache,
    launch_tuned's picks): a process that launches for real afterwards must not use it (gpu_branch_rows runs in a
    process of its own)."""

    def __enter__(self):
        import importlib
        import pkgutil

        from triton.runtime.jit import JITFunction

        from tritongpt import kernels
        from tritongpt.kernels import _common

        modules = [importlib.import_module(f"tritongpt.kernels.{info.name}")  # every autotuner registered
                   for info in pkgutil.iter_modules(kernels.__path__)]
        self.saved, self.launches, self.tuned = [], 0, 0
        tuned_fns = {id(t.fn) for t in _common.AUTOTUNED.values() if hasattr(t, "fn")}

        def swap(obj, name, value):  # each attribute swapped lives in obj's own __dict__: put back as it was
            self.saved.append((obj, name, obj.__dict__[name]))
            setattr(obj, name, value)

        def run(fn, *args, grid, warmup, **kwargs):
            self.launches += not warmup
            self.tuned += not warmup and id(fn) in tuned_fns

        swap(JITFunction, "run", run)
        swap(_common, "triton_interpreting", lambda: True)  # check_runnable's test: CPU tensors may run
        for module in modules:
            if hasattr(module, "_sm_count"):
                swap(module, "_sm_count", lambda device: 132)
        for tuner in _common.AUTOTUNED.values():
            prune = getattr(tuner, "early_config_prune", None)
            swap(tuner, "early_config_prune",
                 lambda configs, named_args, prune=prune, **kw: (prune(configs, named_args, **kw) if prune
                                                                 else configs)[:1])
        return self

    def __exit__(self, *exc):
        for obj, name, value in reversed(self.saved):
            setattr(obj, name, value)


def gpu_branch_rows(names, calls):
    """The "triton-gpu-branch" rows (run by host_rows_gpu_branch in a process with TRITON_INTERPRET=0)."""
    from tritongpt._env import triton_interpreting

    if triton_interpreting():
        raise RuntimeError("the GPU branch's host rows need Triton's interpreter off (TRITON_INTERPRET=0)")
    conf = {**HOST_CONF, "calls": calls}
    rows = []
    torch.set_num_threads(1)
    with gpu_branch_launches() as stub:
        _host_rows(names, host_cases(), calls, conf, stub, rows, providers=(GPU_BRANCH,), note=GPU_BRANCH_NOTE)
    return rows


# host_cases' sizes (its defaults), and the ones each op's rows name
HOST_CONF = {"rows": 8, "width": 768, "mlp_width": 32, "heads": 4, "seq": 16, "head_dim": 64, "vocab": 512,
             "cache": 512, "dtype": "fp32"}
HOST_SIZES = {"layer_norm": ("rows", "width"), "add_layer_norm": ("rows", "width"), "rms_norm": ("rows", "width"),
              "gelu_mlp": ("rows", "mlp_width"), "swiglu_mlp": ("rows", "mlp_width"),
              "flash_attention": ("heads", "seq", "head_dim"), "cross_entropy": ("rows", "vocab"),
              "rope": ("heads", "seq", "head_dim"), "decode_attention": ("heads", "cache", "head_dim"),
              "int8_linear": ("rows", "mlp_width"), "int4_linear": ("rows", "mlp_width"),
              "token_mask": ("rows", "vocab")}
HOST_MODES = {"decode_attention": ("fwd",), "int8_linear": ("fwd",), "int4_linear": ("fwd",), "token_mask": ("fwd",)}


def host_modes(name):
    return HOST_MODES.get(name, ("fwd", "fwd+bwd"))


def _host_conf(name, conf_all):
    """The config an op's host rows name, whatever became of them (ok, skipped, failed): its sizes, dtype, calls."""
    return {k: v for k, v in conf_all.items() if k in HOST_SIZES.get(name, conf_all) or k in ("dtype", "calls")}


def _host_rows(names, cases, calls, conf_all, stub, rows, providers=("triton", "torch"), note=HOST_NOTE):
    """Append each op's rows (ours and torch's, fwd and fwd+bwd; or ours alone, named providers[0]) to rows,
    launches stubbed by stub."""
    for name in names:
        conf = _host_conf(name, conf_all)
        for provider, fn in zip(providers, cases[name]):
            def fwd_bwd(fn=fn):
                out = fn()
                out.sum().backward() if out.dim() else out.backward()

            for mode, run in (("fwd", fn), ("fwd+bwd", fwd_bwd)):
                if mode not in host_modes(name):
                    continue
                try:
                    # 3 untimed calls, then `calls` timed one at a time
                    med, p20, p80 = CpuTimer(reps=calls, warm_calls=3, warm_s=0).bench(run)
                    stub.launches = 0
                    if hasattr(stub, "tuned"):
                        stub.tuned = 0
                    run()
                except Exception as e:
                    rows.append(make_row("cpu", f"host-{name}", provider, conf, mode, f"failed: {reason_of(e)}"))
                    continue
                # launches: Triton kernels a call starts, each with Triton's own launch cost on a GPU on top
                # tuned_launches (GPU branch): those of autotuned kernels, each through its pick
                tuned = {"tuned_launches": stub.tuned} if hasattr(stub, "tuned") else {}
                rows.append(make_row("cpu", f"host-{name}", provider, conf, mode, ms=med, ms_p20=p20,
                                     ms_p80=p80, us=med * 1e3, launches=stub.launches, note=note, **tuned))
