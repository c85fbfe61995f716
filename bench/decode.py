"""KV-cache decoding benchmark: greedy decode steps of one model, eager against CUDA-graph replays
(train/generate.py DecodeGraph), on the reference and the Triton path.

Providers:
    reference          model.set_kernels("reference"), each step an eager forward of one token a row
    reference+graphs   the same step captured once after the prefill (DecodeGraph) and replayed
    triton             model.set_kernels("triton"), eager
    triton+graphs      the Triton path's step captured and replayed
    reference+int8, triton+int8, triton+int8+graphs
                       a copy of the model with int8 weights (model/quant.py quantize_int8: every matrix of the
                       blocks and the LM head): the reference dequantizes each step, the Triton path reads the int8
                       weights (kernels/quant.py); same_tokens and speed-ups against the int8 model's own eager rows
    reference+int4, triton+int4, triton+int4+graphs
                       the same with int4 weights (quantize_int4, groups of 128 inputs): half int8's weight bytes
    triton+kv8, triton+kv8+graphs
                       the float model over an int8 KV cache (KVCache(kv_dtype="int8"), generate's --kv-cache-dtype
                       int8): the kernels read int8 keys and values with their scales, about half the cache bytes a
                       step reads; tokens compared with triton+kv8's own eager row

Per provider and batch size: random prompt ids (the same for every provider), one prefill (not timed), then
`new_tokens` greedy steps (the model's step and the argmax that feeds the next token) timed with
time.perf_counter between two torch.cuda.synchronize(): one untimed run, then `repeats` timed ones, the cache
cropped back to the prompt before each. A row gives the median ms a step over the repeats (p20, p80), tokens/s
(batch * 1000 / ms), and for a graph provider the DecodeGraph's build time (two warm-up steps and the capture,
capture_ms), its speed-up over the same path's eager row, and whether its tokens equal the eager step's
(same_tokens; under bf16 a near-tie between two logits may go either way: reported, not a failure). Every row
says its cache's bytes (kv_cache_bytes: KVCache.nbytes, prompt + new tokens long).
The decode runs as `tritongpt generate` runs it: fp32 weights under torch.autocast(dtype).
"""
import copy
import gc
import time

import torch

from tritongpt.bench.common import dtype_name, is_ok, make_row, median_quantiles, reason_of
from tritongpt.kernels._common import is_oom

DECODE_PROVIDERS = ("reference", "reference+graphs", "triton", "triton+graphs", "reference+int8", "triton+int8",
                    "triton+int8+graphs", "reference+int4", "triton+int4", "triton+int4+graphs", "triton+kv8",
                    "triton+kv8+graphs")
QUANTIZED = ("int8", "int4")  # a provider's quantization flag (model/quant.py quantize)
DEFAULT_BATCHES = (1, 8)


def parse_provider(name: str):
    """'triton+int8+graphs' -> ('triton', True, 'int8'): (path, graphs, quantization or None). Raises ValueError on
    a name not in DECODE_PROVIDERS."""
    if name not in DECODE_PROVIDERS:
        raise ValueError(f"unknown decode provider {name!r}; choose from {', '.join(DECODE_PROVIDERS)}")
    path, *flags = name.split("+")
    return path, "graphs" in flags, next((f for f in flags if f in QUANTIZED), None)


def kv_cache_dtype(name: str) -> str:
    """A provider's KV cache: 'triton+kv8+graphs' -> 'int8' (generate's kv_cache_dtype), else 'auto'."""
    return "int8" if "kv8" in name.split("+") else "auto"


def eager_provider(name: str) -> str:
    """The eager row a graph row is measured against: 'triton+int8+graphs' -> 'triton+int8'."""
    return name.removesuffix("+graphs")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _decode(step, first, n: int, device):
    """n greedy steps from the token first [B, 1]: (the tokens drawn [B, n], seconds between two syncs)."""
    out = []
    tok = first
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        tok = step(tok)[:, -1].argmax(dim=-1, keepdim=True)
        out.append(tok)
    _sync(device)
    return torch.cat(out, dim=1), time.perf_counter() - t0


def _timed(step, cache, first, prompt_len, new_tokens, repeats, device):
    """One untimed run (Triton's compiles and autotuning, the allocator's first blocks), then `repeats` timed ones,
    each from the prompt: (ms a step per repeat, each repeat's tokens on the host)."""
    ms, tokens = [], []
    for i in range(repeats + 1):
        cache.crop(prompt_len)
        drawn, seconds = _decode(step, first, new_tokens, device)
        if i:
            ms.append(seconds * 1e3 / new_tokens)
            tokens.append(drawn.cpu())
    return ms, tokens


def _first_difference(got, want):
    """The first step whose tokens differ in some row, or None."""
    differ = (got != want).any(dim=0).nonzero()
    return int(differ[0]) if len(differ) else None


def bench_decode_row(model, provider, batch, prompt_len, new_tokens, repeats, device, dtype, cfg_row, eager,
                     capture=None, seed=0):
    """One row. eager: {(path, batch): the eager step's tokens [B, new_tokens]}, filled by an eager row and read by
    a graph row (which runs an untimed eager decode itself when its path's eager row did not run)."""
    from tritongpt.train.common import autocast
    from tritongpt.train.generate import DecodeGraph, new_cache

    path, graphs, _ = parse_provider(provider)
    cache = graph = step = None
    try:
        model.set_kernels(path)
        g = torch.Generator().manual_seed(seed + batch)  # the same prompt for every provider of this batch
        prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=g).to(device)
        with torch.no_grad(), autocast(device, dtype):  # one context: a graph replays the casts it captured
            cache = new_cache(model, batch, prompt_len + new_tokens, kv_cache_dtype(provider))
            cache_bytes = cache.nbytes
            first = model(prompt, cache)[:, -1].argmax(dim=-1, keepdim=True)
            key = (eager_provider(provider), batch)
            if graphs and key not in eager:
                eager[key] = _decode(lambda t: model(t, cache), first, new_tokens, device)[0].cpu()
                cache.crop(prompt_len)
            capture_ms = None
            if graphs:
                _sync(device)
                t0 = time.perf_counter()
                # as generate's own graph: replayed only inside this autocast region, the weights unchanged
                graph = DecodeGraph(model, cache, capture, weight_cache=True)
                _sync(device)
                capture_ms = (time.perf_counter() - t0) * 1e3
                step = graph
            else:
                step = lambda t: model(t, cache)  # noqa: E731 (as _generate's eager step)
            ms, tokens = _timed(step, cache, first, prompt_len, new_tokens, repeats, device)
    except Exception as e:
        return make_row("decode", "generate", provider, cfg_row, "decode",
                        # 240: a capture's error comes wrapped in DecodeGraph's words, the cause after them
                        "failed: out of memory" if is_oom(e) else f"failed: {reason_of(e, 240)}")
    finally:
        cache = graph = step = None  # noqa: F841 (the graph's pool and the cache go before the next row)
        if device.type == "cuda":
            # a failed capture leaves reference cycles holding the cache; the collector (0.1-0.3 s a call) runs only
            # where memory goes back to a device the next row allocates on, the CPU's being reclaimed in due course
            gc.collect()
            torch.cuda.empty_cache()
    med, p20, p80 = median_quantiles(ms)
    row = make_row("decode", "generate", provider, cfg_row, "decode", ms=med, ms_p20=p20, ms_p80=p80,
                   tokens_per_s=batch * 1000 / med, capture_ms=capture_ms, kv_cache_bytes=cache_bytes)
    if graphs:
        want = eager[(eager_provider(provider), batch)]
        diffs = [d for d in (_first_difference(t, want) for t in tokens) if d is not None]
        row["same_tokens"] = not diffs
        row["first_difference"] = min(diffs) if diffs else None
    else:
        eager[(provider, batch)] = tokens[0]
    return row


def add_speedups(rows):
    """Each ok graph row's speed-up over its path's eager row of the same batch (None where that did not run), and
    a note the tables show."""
    for r in rows:
        if not (is_ok(r) and r["provider"].endswith("+graphs")):
            continue
        path = eager_provider(r["provider"])
        base = next((e for e in rows if e["provider"] == path and is_ok(e)
                     and e["config"].get("batch") == r["config"].get("batch")), None)
        r["speedup"] = base["ms"] / r["ms"] if base else None
        words = [f"capture {r['capture_ms']:.0f} ms"]
        if r["speedup"] is not None:
            words.insert(0, f"{r['speedup']:.2f}x over {path}")
        words.append("same tokens" if r["same_tokens"] else
                     f"tokens differ from step {r['first_difference']} on")
        r["note"] = ", ".join(words)
    return rows


def run_decode(device, budget, dtype=torch.bfloat16, model_name="gpt2-small", batches=DEFAULT_BATCHES,
               prompt_len=128, new_tokens=128, providers=DECODE_PROVIDERS, log=print, capture=None, repeats=3,
               config=None, seed=0, group_size=128):
    """Every provider at every batch size (batch-major: a budget cut short keeps the small batch's rows, where
    graphs matter most). config: a GPTConfig to time in place of model_name's preset (tests pass a tiny one;
    model_name then only labels the rows). capture: DecodeGraph's (None: a real CUDA graph). group_size: the int4
    rows' (quantize_int4's)."""
    from tritongpt.model.config import get_config
    from tritongpt.model.gpt import GPTModel
    from tritongpt.model.quant import quantize
    from tritongpt.errors import UserError

    device = torch.device(device)
    for p in providers:
        parse_provider(p)
    # eager first within a path: the graph row's speed-up and tokens are measured against it
    providers = sorted(providers, key=DECODE_PROVIDERS.index)
    for name, v in (("prompt_len", prompt_len), ("new_tokens", new_tokens), ("repeats", repeats)):
        if not isinstance(v, int) or v < 1:
            raise UserError(f"{name} must be a positive integer, got {v!r}")
    cfg = config or get_config(model_name)
    if prompt_len + new_tokens > cfg.context_length:
        raise UserError(f"prompt {prompt_len} + new tokens {new_tokens} > {model_name}'s context "
                        f"({cfg.context_length}): the cache holds them all")
    rows, eager, model, quantized = [], {}, None, {}
    try:
        torch.manual_seed(seed)
        model = GPTModel(cfg).to(device).eval()
        for mode in {parse_provider(p)[2] for p in providers} - {None}:  # the same weights, quantized (a copy each)
            try:
                quantized[mode] = quantize(copy.deepcopy(model), mode, group_size=group_size)
            except UserError as e:  # (int4's group size not dividing a width): those rows fail, the rest run
                quantized[mode] = f"failed: quantizing to {mode}: {e}"
    except Exception as e:
        why = "failed: out of memory" if is_oom(e) else f"failed: building the model: {reason_of(e)}"
        model = None
    for b in batches:
        for p in providers:
            cfg_row = {"model": model_name, "batch": b, "prompt_len": prompt_len, "new_tokens": new_tokens,
                       "dtype": dtype_name(dtype), "repeats": repeats}
            if budget.expired():
                rows.append(make_row("decode", "generate", p, cfg_row, "decode", budget.skip_reason()))
                continue
            target = quantized.get(parse_provider(p)[2], model)
            if model is None or isinstance(target, str):
                rows.append(make_row("decode", "generate", p, cfg_row, "decode", why if model is None else target))
                continue
            log(f"decode: {model_name} B={b} prompt {prompt_len} + {new_tokens} tokens {p} ...")
            try:
                row = bench_decode_row(target, p, b, prompt_len, new_tokens,
                                       repeats, device, dtype, cfg_row, eager, capture, seed)
            except KeyboardInterrupt:  # the rows so far are still written; nothing new starts
                budget.interrupt()
                row = make_row("decode", "generate", p, cfg_row, "decode", budget.skip_reason())
            rows.append(row)
            log(f"  {row['tokens_per_s']:,.0f} tok/s, {row['ms']:.3f} ms/step" if is_ok(row) else f"  {row['status']}")
    return add_speedups(rows)
