"""What can be measured without a GPU: tokenizer throughput and the reference model on a CPU.

Timings are medians of time.perf_counter over a few repetitions after an untimed call. None of
these numbers say anything about the Triton kernels (on a CPU they run through Triton's
interpreter, which is for correctness, not speed); the kernel and training figures need CUDA.
"""
import time

import torch

from tritongpt.bench.common import make_row, reason_of, time_cpu, try_import


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
    log("cpu: GELU-MLP saved activation bytes ...")
    provs = ("reference", "torch", "triton")
    rows += mlp_saved_cpu(providers=provs)
    return rows
