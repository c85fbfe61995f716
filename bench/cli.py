"""`tritongpt bench kernels|train|all|cpu|compile|profile|decode`: the benchmark suite's command line.

On a CUDA machine `tritongpt bench all` is the one command: ceilings, kernel sweeps, training
steps, targets, files under bench/results/<device-slug>/ and a short table at the end, within
--max-minutes (default 8; work left when the time is up is recorded as skipped, not run).
Without CUDA it says so, runs the CPU-side timings and writes files only when --out is given.
`tritongpt bench compile` needs no GPU: it builds every kernel launch for sm_90 and reports
registers, spills and shared memory (bench/compile_check.py). `tritongpt bench profile` runs a few
training steps of each provider under torch.profiler: host vs device time per step, the top kernels
and ops, a Chrome trace each (bench/profile_step.py); on a CPU too, with the CPU activity only.
`tritongpt bench decode` times greedy KV-cache decode steps, eager against CUDA-graph replays, on the reference
and the Triton path (bench/decode.py); CUDA only (without it, it says so and measures nothing).
`tritongpt bench serve` loads an OpenAI-compatible server with streamed completions, as vLLM's benchmark_serving
does: throughput, TTFT, TPOT, ITL, end-to-end latency (bench/serve.py), or with --scoring lm-evaluation-harness's
loglikelihood requests, their answers checked; our server, started in this process with serve's model flags, or any
other at --base-url.
"""
import argparse
import sys
import time
from pathlib import Path

from tritongpt.commands import add_vocab_multiple_arg, vocab_multiple
from tritongpt.errors import UserError
from tritongpt.cli import command_help

WHATS = ("kernels", "train", "all", "cpu", "compile", "profile", "decode", "serve")
# which `bench WHAT`s read each of bench's own flags (serve's are args.serve_flags, bench serve's alone; --out is
# everyone's): given to another (a value not its default), a flag would do nothing there, and is refused by name
KERNEL_FLAGS = ("ops", "modes", "ln_rows", "ln_widths", "mlp_rows", "mlp_widths", "attn_seqlens", "attn_head_dims",
                "attn_tokens", "attn_width", "attn_window", "gqa_seqlens", "gqa_heads", "moe_shapes", "ce_rows",
                "ce_vocabs", "head_widths")
TRAIN, TIMED = ("train", "all", "profile"), ("kernels", "train", "all")
FLAG_WHATS = {"quick": ("kernels", "train", "all", "cpu", "compile", "profile"),
              "dtype": ("kernels", "train", "all", "profile", "decode", "serve"),
              "max_minutes": ("kernels", "train", "all", "profile", "decode"),
              "no_plots": ("kernels", "train", "all", "cpu", "decode", "serve"),
              "strict": ("kernels", "train", "all", "compile"),
              "arch": ("compile",), "workers": ("compile",), "cases": ("compile",), "one_config": ("compile",),
              "threads": ("cpu", *TIMED),  # (kernels, train and all without CUDA: the CPU-side timings)
              **{k: ("kernels", "all") for k in KERNEL_FLAGS},
              "providers": ("kernels", "all", "decode"),
              # train: do_bench's settings time its matmul ceiling (for MFU, without a datasheet peak)
              "warmup_ms": TIMED, "rep_ms": TIMED, "cuda_graphs": (*TIMED, "serve"),
              "models": (*TRAIN, "decode"), "batch": (*TRAIN, "decode"), "seq_len": (*TRAIN, "decode"),
              "train_providers": TRAIN, "steps": TRAIN, "warmup_steps": TRAIN,  # (+ train_step.MODEL_FLAGS: add_cli)
              "peak_tflops": ("train", "all"), "new_tokens": ("decode",), "top": ("profile",), "traces": ("profile",)}


class _Given(argparse.Action):
    """Stores the value and notes that it was given (args.<dest>_given): a flag whose default differs by command."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, self.dest + "_given", True)


def _ints(text, name):
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"--{name} must be comma-separated integers, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise UserError(f"--{name} must list positive integers, got {text!r}")
    return vals


def _names(text, allowed, name):
    vals = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in vals if v not in allowed]
    if bad or not vals:
        raise UserError(f"--{name}: unknown {bad or text!r}; choose from {', '.join(allowed)}")
    return vals


def _batches(text, models):
    """'16' (every model) or 'gpt2-small=16,gpt2-medium=8'."""
    if text is None:
        return None
    if "=" not in text:
        b = _ints(text, "batch")[0]
        return {m: b for m in models}
    out = {}
    for part in text.split(","):
        key, _, val = part.partition("=")
        out[key.strip()] = _ints(val, "batch")[0]
    return out


def kernel_names(args):
    """(ops, modes, providers or None) from the flags, checked (on any machine: a typo in a GPU
    command shows up in a dry run on the CPU too)."""
    from tritongpt.bench.common import MODES
    from tritongpt.bench.kernels import ALL_PROVIDERS, PROVIDERS

    return (_names(args.ops, tuple(PROVIDERS), "ops"), _names(args.modes, MODES, "modes"),
            _names(args.providers, ALL_PROVIDERS, "providers") if args.providers else None)


def kernel_sizes(args, quick=False):
    """The kernel sweep's sizes: the defaults, with the size flags given (checked: positive)."""
    from tritongpt.bench.kernels import FULL_SIZES, QUICK_SIZES

    sizes = dict(QUICK_SIZES if quick else FULL_SIZES)
    for key in ("ln_rows", "mlp_rows", "attn_tokens", "attn_width", "attn_window", "ce_rows"):
        if getattr(args, key) is not None:
            if getattr(args, key) <= 0:
                raise UserError(f"--{key.replace('_', '-')} must be a positive integer, got {getattr(args, key)}")
            sizes[key] = getattr(args, key)
    for key in ("ln_widths", "mlp_widths", "attn_seqlens", "attn_head_dims", "gqa_seqlens", "ce_vocabs",
                "head_widths"):
        if getattr(args, key) is not None:
            sizes[key] = _ints(getattr(args, key), key.replace("_", "-"))
    if args.gqa_heads is not None:
        sizes["gqa_heads"] = _gqa_heads(args.gqa_heads)
    if args.moe_shapes is not None:
        sizes["moe_shapes"] = _moe_shapes(args.moe_shapes)
    if args.warmup_ms < 0 or args.rep_ms <= 0:
        raise UserError(f"--warmup-ms must be >= 0 and --rep-ms positive, got {args.warmup_ms} and {args.rep_ms}")
    return sizes


def _gqa_heads(text):
    """--gqa-heads 32:8:128,12:1:64 -> ((32, 8, 128), (12, 1, 64)), each H a multiple of Hkv."""
    shapes = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        parts = item.split(":")
        if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise UserError(f"--gqa-heads takes query heads:KV heads:head dim, positive integers, got {item!r}")
        h, h_kv, d = map(int, parts)
        if h % h_kv:
            raise UserError(f"--gqa-heads {item}: the query heads ({h}) must be a multiple of the KV heads ({h_kv})")
        shapes.append((h, h_kv, d))
    if not shapes:
        raise UserError(f"--gqa-heads lists no shape, got {text!r}")
    return tuple(shapes)


def _moe_shapes(text):
    """--moe-shapes 4096:8:2:1024:3584 -> ((4096, 8, 2, 1024, 3584),): tokens, experts, top k <= experts, width,
    hidden."""
    shapes = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        parts = item.split(":")
        if len(parts) != 5 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise UserError(f"--moe-shapes takes tokens:experts:top k:width:hidden, positive integers, got {item!r}")
        shape = tuple(map(int, parts))
        if shape[2] > shape[1]:
            raise UserError(f"--moe-shapes {item}: top k ({shape[2]}) must be at most the experts ({shape[1]})")
        shapes.append(shape)
    if not shapes:
        raise UserError(f"--moe-shapes lists no shape, got {text!r}")
    return tuple(shapes)


def train_names(args):
    """(models, training providers) from the flags, checked."""
    from tritongpt.bench.train_step import parse_provider
    from tritongpt.model.config import PRESETS

    models = _names(args.models or ("gpt2-small" if args.quick else "gpt2-small,gpt2-medium"), tuple(PRESETS),
                    "models")
    if args.train_providers is None:  # each command's own default
        from tritongpt.bench.profile_step import PROFILE_PROVIDERS
        from tritongpt.bench.train_step import TRAIN_PROVIDERS

        args.train_providers = ",".join(PROFILE_PROVIDERS if args.what == "profile" else TRAIN_PROVIDERS)
    provs = tuple(v.strip() for v in args.train_providers.split(",") if v.strip())
    if args.train_providers.strip(", ") == "":
        raise UserError(f"--train-providers lists no provider, got {args.train_providers!r}")
    for pname in provs:
        try:
            parse_provider(pname)
        except ValueError as e:
            raise UserError(str(e)) from None
    if args.seq_len < 1:
        raise UserError(f"--seq-len must be a positive integer, got {args.seq_len}")
    if args.peak_tflops is not None and not 0 < args.peak_tflops < float("inf"):
        raise UserError(f"--peak-tflops must be a positive number, got {args.peak_tflops}")
    other = sorted(set(_batches(args.batch, models) or {}) - set(models))
    if other:
        raise UserError(f"--batch names {', '.join(other)}, not among the models benchmarked ({', '.join(models)})")
    train_model_flags(args, models)
    return models, provs


def profile_names(args):
    """(model, providers) of `bench profile`, checked: one model (default gpt2-small), --top positive."""
    if args.models is None:
        args.models = "gpt2-small"
    models, provs = train_names(args)
    if len(models) != 1:
        raise UserError(f"bench profile takes one model in --models, got {len(models)}: {', '.join(models)}")
    if args.top < 1:
        raise UserError(f"--top must be a positive integer, got {args.top}")
    return models[0], provs


def train_model_flags(args, models=()):
    """--attention-window, --window-layers, --logit-softcap and Llama's --norm to --bias, checked as
    pretrain checks them (--n-kv-head against every model's heads), and a window the sequence fits in
    refused: its rows would time plain GPT-2's attention."""
    import math

    from tritongpt._types import softcap_value
    from tritongpt.bench.train_step import train_config
    from tritongpt.model.config import get_config

    try:
        softcap_value(args.logit_softcap, "--logit-softcap")
        if args.attn_softcap is not None:
            softcap_value(args.attn_softcap, "--attn-softcap")
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.logit_scale is not None and not (math.isfinite(args.logit_scale) and args.logit_scale > 0):
        raise UserError(f"--logit-scale must be a finite number > 0 (1: unscaled logits), got {args.logit_scale}")
    for flag in ("embedding_multiplier", "residual_multiplier", "attention_multiplier"):
        value = getattr(args, flag)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UserError(f"--{flag.replace('_', '-')} must be a finite number > 0, got {value}")
    if args.attention_window < 0:
        raise UserError(f"--attention-window must be >= 0 (0: every layer sees the whole context), "
                        f"got {args.attention_window}")
    if args.window_layers is not None and not args.attention_window:
        raise UserError(f"--window-layers {args.window_layers} picks the layers --attention-window makes local: "
                        "without a window it does nothing")
    if args.attention_window >= args.seq_len:
        raise UserError(f"--attention-window {args.attention_window} is not below --seq-len {args.seq_len}: "
                        "every position would see the whole context, as in plain GPT-2")
    if args.rope_theta is not None:
        if not math.isfinite(args.rope_theta) or args.rope_theta <= 0:
            raise UserError(f"--rope-theta must be a finite number > 0, got {args.rope_theta:g}")
        if args.position_encoding != "rope":
            raise UserError(f"--rope-theta {args.rope_theta:g} is RoPE's base: without --position-encoding rope "
                            "it does nothing")
    if args.mlp_hidden is not None:
        if args.mlp_hidden <= 0:
            raise UserError(f"--mlp-hidden must be a positive integer, got {args.mlp_hidden}")
        # (GPTConfig.mlp_hidden's MLPs: the gated ones and the squared ReLU's; GELU's is 4 n_embd)
        if args.mlp not in ("swiglu", "geglu", "relu2"):
            raise UserError(f"--mlp-hidden {args.mlp_hidden} is the SwiGLU, GeGLU or squared-ReLU MLP's hidden size: "
                            "without --mlp swiglu, geglu or relu2 it does nothing")
    if args.experts_per_token is not None and not args.n_experts:  # (GPTConfig keeps it on a dense model)
        raise UserError(f"--experts-per-token {args.experts_per_token} is how many experts a token goes through: "
                        "without --n-experts the MLP is dense and it does nothing")
    if args.attention_head_dim is not None and args.attention_head_dim <= 0:
        raise UserError(f"--attention-head-dim must be a positive integer, got {args.attention_head_dim}")
    if args.n_kv_head is not None and args.n_kv_head < 0:
        raise UserError(f"--n-kv-head must be >= 0 (0: as many as the heads), got {args.n_kv_head}")
    for m in models:
        heads = get_config(m).n_head
        if args.n_kv_head and heads % args.n_kv_head:
            raise UserError(f"--n-kv-head {args.n_kv_head} must divide {m}'s {heads} heads")
        train_config(m, args.seq_len, **model_flags(args))  # anything else GPTConfig refuses (by name), now


def model_flags(args) -> dict:
    """bench train's model flags (train_step.MODEL_FLAGS) as run_train takes them."""
    from tritongpt.bench.train_step import MODEL_FLAGS

    return {k: getattr(args, k) for k in MODEL_FLAGS}


def add_cli(sub):
    from tritongpt.bench.kernels import ALL_PROVIDERS, FULL_SIZES, QUICK_SIZES
    from tritongpt.bench.profile_step import PROFILE_PROVIDERS, TRACES
    from tritongpt.bench.train_step import TRAIN_PROVIDERS
    from tritongpt.model.config import (GELU_APPROXIMATES, MLPS, NORMS, POSITION_ENCODINGS, QK_NORM_WIDTHS,
                                        window_layers_arg)

    def size_default(key):
        """A kernel size flag's default as its help says it: FULL_SIZES', and --quick's where QUICK_SIZES differs."""
        def text(v):  # 16384, 512,1024 or 32:8:128,12:1:64, as the flags take them
            if not isinstance(v, tuple):
                return str(v)
            return ",".join(":".join(map(str, x)) if isinstance(x, tuple) else str(x) for x in v)

        full, quick = text(FULL_SIZES[key]), text(QUICK_SIZES[key])
        return f"default {full}" + ("" if quick == full else f", --quick {quick}")

    p = sub.add_parser("bench", help=command_help("bench"),
                       description=__doc__.split("\n\n")[1])
    p.add_argument("what", choices=WHATS, help="kernels | train | all (both) | cpu (CPU-side timings) | "
                   "compile (build every kernel launch for sm_90 offline: registers, spills, shared memory) | "
                   "profile (training steps under torch.profiler: host vs device time, top kernels, traces) | "
                   "decode (greedy KV-cache decode steps, eager vs CUDA graphs, reference vs Triton; CUDA only) | "
                   "serve (an OpenAI-compatible server under load: throughput, TTFT, TPOT, ITL, latency)")
    p.add_argument("--quick", action="store_true", help="small sizes, few steps (a smoke run)")
    p.add_argument("--out", default=None,
                   help="results folder (default bench/results on a GPU; on CPU, and for compile anywhere, nothing is "
                        "written unless given)")
    p.add_argument("--dtype", default="bf16", action=_Given,
                   help="bf16 | fp16 | fp32 (default %(default)s; serve: the in-process server's, default auto)")
    p.add_argument("--max-minutes", type=float, default=8.0,
                   help="time budget for the whole run; later work is recorded as skipped (default %(default)s)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target FAILs")
    p.add_argument("--arch", type=int, default=90,
                   help="compile: compute capability x10 to build for (90 H100/H200, 80 A100, 86/89 RTX/L4)")
    p.add_argument("--workers", type=int, default=None,
                   help="compile: build processes (default: CPU count, at most 8)")
    p.add_argument("--cases", default=None, metavar="REGEX",
                   help="compile: only the launches whose case matches, e.g. 'attention .* hd256' (a partial check)")
    p.add_argument("--one-config", action="store_true",
                   help="compile: each launch's configs built until one is clean, then each kernel config not yet "
                        "built once; not all (under a third of the builds)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for the CPU-side timings (default: torch's choice)")
    k = p.add_argument_group("kernels")
    k.add_argument("--ops", default="layernorm,mlp,attention,cross_entropy,lm_head_loss,doc_attention,"
                                   "window_attention,add_layernorm,rope,lm_head_loss_smooth_z,lm_head_loss_softcap,"
                                   "gqa_attention,rmsnorm,add_rmsnorm,swiglu,geglu,softcap_attention,mlp_exact_gelu,"
                                   "rope_partial,lm_head_loss_bias,alibi_attention,moe_mlp,lm_head_distill,"
                                   "decode_attention,matmul,int8_linear,int4_linear,lora,token_mask,sampling,"
                                   "rl_logprobs,sink_attention",
                   help="comma list (default: all of %(default)s; lm_head_loss_smooth_z is the LM head + loss with "
                        "label smoothing 0.1 and z-loss 1e-4, lm_head_loss_softcap with the logits soft-capped to "
                        "30 tanh(logits / 30), gqa_attention causal attention with fewer KV heads than query heads, "
                        "rmsnorm and add_rmsnorm Llama's norm, alone and after the residual add, at --ln-widths, "
                        "swiglu Llama's SwiGLU MLP at the --mlp-widths, geglu Gemma's GeGLU (gelu_tanh gate) "
                        "at the same sizes, softcap_attention causal attention with the scores soft-capped to "
                        "50 tanh(scores / 50), Gemma 2's, at the attention sizes, mlp_exact_gelu the GELU MLP with "
                        "the exact erf GELU (Pythia's) at the --mlp-widths, rope_partial RoPE on part of each head: "
                        "Pythia's 16 of 64 and 32 of 128, Phi-4-mini's 96 of 128 over 8 KV heads with LongRoPE's "
                        "attention factor, lm_head_loss_bias the LM head + loss with a bias on the head, "
                        "Phi-2's and GPT-J's, alibi_attention causal attention with ALiBi's position biases, "
                        "BLOOM's and MPT's, at the attention sizes, moe_mlp the mixture-of-experts MLP, Mixtral's 8 "
                        "experts top 2 at C 1024, H 3584: the eager loop, the loop through swiglu_mlp and the grouped "
                        "kernel, lm_head_distill --teacher distillation's loss on both LM heads, (1 - alpha) CE + "
                        "alpha T^2 generalized JSD at alpha 0.5, T 2, beta 0.5, at --head-widths and --ce-vocabs, "
                        "decode_attention one KV-cache decode step, a query over 1024-16384 cached keys at batch 1 "
                        "and 8, forward only, in GB/s of the cache read, matmul the GELU-MLP's products (fc1, fc2, "
                        "dx, dW1) per operand layout, NN, NT, TN and NN-copy (fc2 with W2^T made contiguous in the "
                        "timing), at --mlp-rows tokens and widths 768 and 1600: torch.mm (cuBLAS) against our matmul "
                        "kernel, forward only, int8_linear the weight-only int8 linear (W8A16) at decode and prefill "
                        "rows on GPT-2 small's fc1 and fc2 and Llama-3-8B's up projection: the weight dequantized "
                        "once (torch) or every call (reference, compile), torch's aten._weight_int8pack_mm and our "
                        "kernel, forward only, each with a scale a row and with a scale a group of 128 inputs "
                        "(a GPTQ 8-bit folder's), int4_linear the weight-only int4 linear (W4A16, a scale and offset a "
                        "group of 128 inputs) at int8_linear's sizes, with torch's aten._weight_int4pack_mm, lora "
                        "multi-LoRA serving's per-row adapter delta added in place (kernels/lora.py's add_lora_rows "
                        "against the gather + two bmm's) at a decode batch of 32 rows and a 4 x 512 prefill, "
                        "768 -> 3072, R 16, over 4 adapters, token_mask structured outputs' grammar mask, logits "
                        "-inf in place where an xgrammar bitmask bans the token, at batches 1-256 of vocabularies "
                        "50257 and 151936, a random and a JSON-string mask, in fp32 and --dtype: the reference, "
                        "ours and xgrammar's triton and cuda kernels when installed, sampling the temperature, top-k, "
                        "top-p and min-p cuts and the draw, at batches 1-256 of vocabularies 50257 and 151936, in "
                        "fp32 and --dtype, in ms and tokens/s: the reference (sort-based top-p, inverse CDF), it with "
                        "torch.multinomial, it compiled, our fused kernel and flashinfer's sampling when installed, "
                        "rl_logprobs RL's per-token log-probs and entropies from the logits at temperature 0.7, "
                        "at cross_entropy's sizes: torch's fp32 log_softmax + gather + entropy, it compiled and our "
                        "loss kernel with the temperature and the entropy, sink_attention gpt-oss's attention, "
                        "64 query heads over 8 KV heads of 64 with a learned sink logit a head, causal and over a "
                        "window of 128, at T 1024 and 4096: the reference module, it compiled and flash_attention)")
    k.add_argument("--modes", default="fwd,bwd,fwd+bwd", help="comma list (default: all of %(default)s)")
    k.add_argument("--providers", default=None, help=f"subset of {','.join(ALL_PROVIDERS)}")
    k.add_argument("--ln-rows", type=int, default=None,
                   help=f"at least this many; on a GPU enough that x is twice the L2 cache "
                        f"({size_default('ln_rows')})")
    k.add_argument("--ln-widths", default=None, help="e.g. 768,1024,1280,1600")
    k.add_argument("--mlp-rows", type=int, default=None, help=f"({size_default('mlp_rows')})")
    k.add_argument("--mlp-widths", default=None, help="e.g. 768,1024,1280,1600")
    k.add_argument("--attn-seqlens", default=None, help="e.g. 256,512,1024,2048,4096,8192")
    k.add_argument("--attn-head-dims", default=None, help="e.g. 64,128")
    k.add_argument("--attn-tokens", type=int, default=None,
                   help=f"batch*seq_len per attention config ({size_default('attn_tokens')})")
    k.add_argument("--attn-width", type=int, default=None,
                   help=f"heads*head_dim ({size_default('attn_width')})")
    k.add_argument("--attn-window", type=int, default=None,
                   help=f"window_attention: positions each query sees ({size_default('attn_window')}, GPT-Neo's); "
                        "timed at the --attn-seqlens longer than it")
    k.add_argument("--gqa-seqlens", default=None,
                   help=f"gqa_attention's lengths ({size_default('gqa_seqlens')})")
    k.add_argument("--gqa-heads", default=None,
                   help="gqa_attention's shapes as query heads:KV heads:head dim "
                        f"(Llama's, MQA, Gemma 3 270M's; {size_default('gqa_heads')})")
    k.add_argument("--moe-shapes", default=None,
                   help="moe_mlp's shapes as tokens:experts:top k:width:hidden "
                        f"(Mixtral's 8 experts top 2 at a quarter of its widths; {size_default('moe_shapes')})")
    k.add_argument("--ce-rows", type=int, default=None,
                   help=f"tokens per cross-entropy config ({size_default('ce_rows')})")
    k.add_argument("--ce-vocabs", default=None, help="e.g. 50257,50304")
    k.add_argument("--head-widths", default=None, help="LM head + loss: hidden widths, e.g. 768,1024")
    k.add_argument("--warmup-ms", type=int, default=25, help="do_bench warmup (default %(default)s)")
    k.add_argument("--rep-ms", type=int, default=100, help="do_bench rep (default %(default)s)")
    k.add_argument("--cuda-graphs", action="store_true",
                   help="time each kernel row replayed from a CUDA graph (triton.testing.do_bench_cudagraph): the "
                        "device's time without the host's launch overhead, which eager rows of small ops measure "
                        "instead; a provider that cannot be captured fails its rows; the results say so")
    t = p.add_argument_group("training step")
    t.add_argument("--models", default=None, help="default gpt2-small,gpt2-medium (--quick, profile and decode: "
                   "gpt2-small; profile and decode take one; tiny and mini, the CPU presets, make a CPU run quick)")
    t.add_argument("--train-providers", default=None,
                   help="comma list: reference or triton, each with +compile, +sdpa (reference only) and "
                        "+ckpt (activation checkpointing), +lora (a rank-8 LoRA update trains instead), +qlora (the same on an "
                        "int4 base: QLoRA), "
                        "+compile+cudagraphs (torch.compile mode='reduce-overhead': the step replayed as CUDA "
                        f"graphs; CUDA only) (default {','.join(TRAIN_PROVIDERS)}; profile: "
                        f"{','.join(PROFILE_PROVIDERS)})")
    t.add_argument("--batch", default=None, help="16 or gpt2-small=16,gpt2-medium=8 (the default); decode: the "
                   "batch sizes, e.g. 1,8 (the default)")
    t.add_argument("--seq-len", type=int, default=1024, action=_Given,
                   help="tokens per sequence (default %(default)s); decode: the prompt's (default 128)")
    t.add_argument("--steps", type=int, default=None, help="timed steps (default 10, --quick 4; profile: 3 timed, "
                   "then 3 profiled, --quick 2 and 2)")
    t.add_argument("--warmup-steps", type=int, default=None, help="untimed steps (default 3, --quick 2)")
    add_vocab_multiple_arg(t, 1, "1, GPT-2 as published; the same for every provider")
    t.add_argument("--attention-window", type=int, default=0, metavar="W",
                   help="time local attention: a token in a local layer attends to the last W positions only "
                        "(GPTConfig.attention_window; GPT-Neo's 256), every provider alike (default 0: none)")
    t.add_argument("--window-layers", type=window_layers_arg, default=None, metavar="all|odd|I,J,...",
                   help="which layers --attention-window makes local: all, odd (1, 3, 5, ...: GPT-Neo's), or a "
                        "comma list of layer indices (Gemma 3's: 0,1,2,3,4,6,...) (default: all)")
    t.add_argument("--logit-softcap", type=float, default=0.0, metavar="C",
                   help="soft-cap the logits to C tanh(logits / C) in every provider's loss "
                        "(GPTConfig.logit_softcap; Gemma 2's 30; default 0: none)")
    t.add_argument("--logit-scale", type=float, default=None, metavar="S",
                   help="multiply the logits by S in every provider (GPTConfig.logit_scale; Cohere's 0.0625; "
                        "default: 1, none)")
    # Llama's shape, with pretrain's names: every provider times the same model
    t.add_argument("--norm", choices=NORMS, default=None,
                   help="every norm of the model: layernorm, GPT-2's, or rmsnorm, x / rms(x) * weight without a mean "
                        "or a bias (Llama; GPTConfig.norm) (default: the preset's, layernorm)")
    t.add_argument("--mlp", choices=MLPS, default=None,
                   help="the MLP: gelu, GPT-2's, swiglu, Llama's w_down(silu(w_gate x) * w_up x), geglu, Gemma's "
                        "(GELU for silu), or relu2, Arcee's and Nemotron's (GPT-2's two matrices, relu(h)^2 for the "
                        "GELU) (GPTConfig.mlp) (default: the preset's, gelu)")
    t.add_argument("--mlp-hidden", type=int, default=None, metavar="H",
                   help="the SwiGLU, GeGLU or squared-ReLU MLP's hidden size (GPTConfig.mlp_hidden; default: Llama's "
                        "rule for the gated ones, 2/3 of 4 n_embd rounded up to a multiple of 64: 2048 at n_embd 768; "
                        "relu2's 4 n_embd)")
    t.add_argument("--position-encoding", choices=POSITION_ENCODINGS, default=None,
                   help="learned, GPT-2's absolute embeddings, rope, rotary embeddings of each head's queries and "
                        "keys (GPT-NeoX, Llama), or alibi, a per-head linear bias by distance on the scores (BLOOM, "
                        "MPT) (GPTConfig.position_encoding; default: the preset's, learned)")
    t.add_argument("--rope-theta", type=float, default=None, metavar="T",
                   help="RoPE's base: dimension pair i turns by position * T^(-2i/head_dim) (GPTConfig.rope_theta; "
                        "default 10000, GPT-NeoX's and Llama 2's)")
    t.add_argument("--n-kv-head", type=int, default=None, metavar="N",
                   help="grouped-query attention: N key/value heads, each shared by n_head / N query heads "
                        "(GPTConfig.n_kv_head; Llama's 8 of 32, 1: multi-query); must divide every --models "
                        "entry's heads (default: as many as the heads)")
    t.add_argument("--bias", action=argparse.BooleanOptionalAction, default=None,
                   help="biases in the linear layers (GPTConfig.bias): GPT-2 has them; --no-bias drops them all, "
                        "as Llama does (default: the preset's, biases)")
    t.add_argument("--attention-head-dim", type=int, default=None, metavar="D",
                   help="each head's width, its own (Qwen3's 128; GPTConfig.attention_head_dim): the queries and "
                        "the attention output n_head x D wide (default: n_embd / n_head)")
    t.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="normalize each head's query and key before RoPE, with the model's norm (Qwen3; "
                        "GPTConfig.qk_norm) (default: the preset's, none)")
    t.add_argument("--scale-embeddings", action=argparse.BooleanOptionalAction, default=None,
                   help="multiply the token embeddings by sqrt(n_embd) (Gemma; GPTConfig.scale_embeddings) "
                        "(default: the preset's, no)")
    t.add_argument("--post-norms", action=argparse.BooleanOptionalAction, default=None,
                   help="normalize each sublayer's output too before it joins the residual, with a norm of its "
                        "own (Gemma 2 and 3's sandwich norms; GPTConfig.post_norms) (default: the preset's, no)")
    t.add_argument("--pre-norms", action=argparse.BooleanOptionalAction, default=None,
                   help="normalize each sublayer's input (GPT-2, Llama, Gemma); --no-pre-norms with --post-norms: "
                        "OLMo 2's and 3's blocks, normalized after each sublayer only (GPTConfig.pre_norms) "
                        "(default: the preset's, yes)")
    t.add_argument("--qk-norm-width", choices=QK_NORM_WIDTHS, default=None,
                   help="what --qk-norm normalizes over: each head with one weight for all (head: Qwen3, Gemma 3), all "
                        "heads of q and of k at once (all: OLMo 2 and 3), or each head with weights of its own (each: "
                        "StableLM 2 12B, Command R+) (GPTConfig.qk_norm_width) (default: the preset's, head)")
    t.add_argument("--attn-softcap", type=float, default=None, metavar="C",
                   help="soft-cap the attention scores to C tanh(s / C) (Gemma 2's 50; GPTConfig.attn_softcap): "
                        "SDPA has no such cap, so reference+compile+sdpa is reported unavailable (default: none)")
    t.add_argument("--nope-layers", type=window_layers_arg, default=None, metavar="I,J,...",
                   help="layers whose q and k are not rotated (SmolLM3's NoPE layers, every fourth: 3,7,11; "
                        "GPTConfig.nope_layers; needs --position-encoding rope) (default: RoPE in every layer)")
    t.add_argument("--rotary-dim", type=int, default=None, metavar="R",
                   help="rotate only the first R dimensions of each head (Pythia's 16 of 64; GPTConfig.rotary_dim; "
                        "needs --position-encoding rope) (default: the whole head)")
    t.add_argument("--parallel-residual", action=argparse.BooleanOptionalAction, default=None,
                   help="GPT-NeoX's (Pythia's) parallel blocks: attention and MLP both read the block's input, "
                        "x + attn(ln1(x)) + mlp(ln2(x)) (GPTConfig.parallel_residual) (default: the preset's, no)")
    t.add_argument("--shared-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="Phi-1/1.5/2's (GPT-J's) parallel blocks on one norm: x + attn(ln1(x)) + mlp(ln1(x)) "
                        "(GPTConfig.shared_norm; with --parallel-residual) (default: the preset's, no)")
    t.add_argument("--head-bias", action=argparse.BooleanOptionalAction, default=None,
                   help="a bias on the LM head (Phi-1/1.5/2's, GPT-J's; GPTConfig.head_bias) (default: the preset's, "
                        "no)")
    t.add_argument("--alibi-scaled", action=argparse.BooleanOptionalAction, default=None,
                   help="Falcon-RW's ALiBi, added before the scores' scale (GPTConfig.alibi_scaled; with "
                        "--position-encoding alibi) (default: the preset's, no)")
    t.add_argument("--embed-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="a norm on the token embeddings before the first block (BLOOM's; GPTConfig.embed_norm) "
                        "(default: the preset's, no)")
    t.add_argument("--norm-bias", action=argparse.BooleanOptionalAction, default=None,
                   help="biases on the LayerNorms (GPTConfig.norm_bias; --no-norm-bias: MPT's, none) (default: the "
                        "preset's, yes)")
    t.add_argument("--n-experts", type=int, default=None, metavar="E",
                   help="a mixture of experts: E SwiGLU/GeGLU experts and a router per block (GPTConfig.n_experts; "
                        "with --mlp swiglu or geglu; the Triton path runs swiglu_mlp once per expert) (default: the "
                        "preset's, a dense MLP)")
    t.add_argument("--experts-per-token", type=int, default=None, metavar="K",
                   help="the router's top k (GPTConfig.experts_per_token) (default: 2)")
    t.add_argument("--moe-aux-loss", type=float, default=None, metavar="COEF",
                   help="the routers' load-balancing loss added to the timed loss times COEF (GPTConfig.moe_aux_loss) "
                        "(default: none)")
    t.add_argument("--gelu-approximate", choices=GELU_APPROXIMATES, default=None,
                   help="the GELU MLP's GELU: tanh (GPT-2's) or none, the exact erf one (GPT-NeoX's, Pythia's; "
                        "GPTConfig.gelu_approximate) (default: the preset's, tanh)")
    t.add_argument("--rope-local-theta", type=float, default=None, metavar="T",
                   help="RoPE's base in the local layers (Gemma 3's 10000 beside its global 1e6; "
                        "GPTConfig.rope_local_theta) (default: rope_theta in every layer)")
    t.add_argument("--embedding-multiplier", type=float, default=None, metavar="M",
                   help="token embeddings times M (Granite's muP input multiplier, 12.0 in Granite 3; "
                        "GPTConfig.embedding_multiplier) (default: the preset's, 1)")
    t.add_argument("--residual-multiplier", type=float, default=None, metavar="M",
                   help="each block's attention and MLP outputs times M before they join the residual stream "
                        "(Granite 3's 0.22; GPTConfig.residual_multiplier) (default: the preset's, 1)")
    t.add_argument("--attention-multiplier", type=float, default=None, metavar="M",
                   help="the attention scores' scale in place of 1/sqrt(head_dim) (Granite's; "
                        "GPTConfig.attention_multiplier) (default: the preset's, 1/sqrt(head_dim))")
    t.add_argument("--peak-tflops", type=float, default=None,
                   help="MFU denominator; default: the GPU's dense bf16 datasheet peak (as the trainers use), "
                        "else the bf16 matmul measured in this run")
    d = p.add_argument_group("decode (with --models, --batch, --seq-len as the prompt, --providers, --dtype)")
    d.add_argument("--new-tokens", type=int, default=128,
                   help="greedy decode steps timed after the prompt's prefill (default %(default)s)")
    f = p.add_argument_group("profile (with the training step's flags)")
    f.add_argument("--top", type=int, default=15, help="ops listed per provider, by device and by CPU time "
                   "(default %(default)s)")
    f.add_argument("--traces", choices=TRACES, default="all",
                   help="Chrome traces (profile-traces/<provider>.json.gz): every provider's, the first profiled "
                        "one's, or none (default %(default)s)")
    from tritongpt.bench import serve

    serve.add_cli(p)  # its own flags, and `tritongpt serve`'s for the server it starts
    p.set_defaults(func=cmd_bench, what_flags={a.dest: a.default for a in p._actions if a.dest in whats_of_flags()},
                   foreign_dests=foreign_dests)


def whats_of_flags() -> dict:
    """FLAG_WHATS with the model flags of the training step (train_step.MODEL_FLAGS): bench train's, all's and
    profile's."""
    from tritongpt.bench.train_step import MODEL_FLAGS

    return {**FLAG_WHATS, **{k: TRAIN for k in MODEL_FLAGS}}


def check_what_flags(args):
    """A flag of another `bench WHAT` than args.what (one that it never reads), given: refused by name."""
    whats = whats_of_flags()
    for dest, default in args.what_flags.items():
        if getattr(args, dest) != default and args.what not in whats[dest]:
            raise UserError(f"--{dest.replace('_', '-')} is a flag of bench {', '.join(whats[dest])}, not of bench "
                            f"{args.what}: it would do nothing there (leave it out)")


def foreign_dests(args) -> set:
    """The dests of the flags `bench args.what` refuses (check_what_flags', and bench serve's own elsewhere): the
    command line's typo hint (cli.did_you_mean) leaves them out, as a flag it would then refuse."""
    whats = whats_of_flags()
    foreign = {d for d in args.what_flags if args.what not in whats[d]}
    return foreign | (set(args.serve_flags) if args.what != "serve" else set())


def cmd_bench(args):
    import torch

    check_what_flags(args)
    if args.what == "serve":
        if args.out:
            from tritongpt.bench.common import check_out_dir

            check_out_dir(args.out)
        from tritongpt.bench.serve import run_serve

        return run_serve(args)
    serve_only = [d for d, default in args.serve_flags.items() if getattr(args, d) != default]
    if serve_only:
        flags = ", ".join("--" + d.replace("_", "-") for d in serve_only)
        raise UserError(f"{flags}: bench serve's flags, not bench {args.what}'s"
                        f"{' (--models names the models it times)' if 'model' in serve_only else ''}")

    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        raise UserError(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    vocab_multiple(args)
    if args.what in ("kernels", "train", "all", "profile", "decode"):
        from tritongpt.train.common import pick_dtype

        pick_dtype(args.dtype, torch.device("cuda"))  # a table look-up: no GPU needed to check the name
        if not args.max_minutes > 0:
            raise UserError(f"--max-minutes must be a positive number, got {args.max_minutes}")
    if args.what in ("kernels", "all"):
        kernel_names(args)
        kernel_sizes(args, args.quick)
    if args.what in ("train", "all"):
        train_names(args)
    if args.what == "profile":
        profile_names(args)
    if args.what == "decode":
        decode_names(args)
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers must be a positive integer, got {args.workers}")
    if args.out:
        from tritongpt.bench.common import check_out_dir

        check_out_dir(args.out)
    if args.what == "compile":
        if args.cases is not None:
            from tritongpt.bench.compile_check import check_cases

            check_cases(args.cases)
        return _run_compile(args)
    if args.what == "profile":
        return _run_profile(args, cuda=torch.cuda.is_available())
    if args.what == "decode":
        return _run_decode(args, cuda=torch.cuda.is_available())
    if args.what == "cpu" or not torch.cuda.is_available():
        return _run_cpu(args, cuda=torch.cuda.is_available())
    return _run_gpu(args)


def _run_cpu(args, cuda):
    from tritongpt.bench.common import environment
    from tritongpt.bench.cpu import run_cpu
    from tritongpt.bench.report import make_result, rows_table, saved_table, write_result

    note = None
    if args.what != "cpu" and not cuda:
        note = ("GPU benchmarks need CUDA: no CUDA device is available here, so no kernel or "
                "training-step numbers were measured. Running the CPU-side timings only.")
        print(note)
    if args.threads is not None:
        if args.threads <= 0:
            raise UserError(f"--threads must be a positive integer, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    env = environment()  # before the run: the load average is the machine's, not ours
    t0 = time.perf_counter()
    rows = run_cpu(quick=args.quick, log=lambda s: print(s, file=sys.stderr))
    result = make_result("cpu", env, rows, settings=_settings(args), elapsed_s=time.perf_counter() - t0,
                         notes=[note] if note else [])
    print()
    n = env["cpu_threads"]
    print(f"CPU-side timings on {env['device']} ({n} torch thread{'s' if n != 1 else ''}, "
          f"load average {env.get('load_avg_1m')}; torch {env['torch']}, triton {env['triton']}); "
          "the Triton kernels run through the interpreter here and are not timed")
    print(rows_table(rows))
    st = saved_table(rows)
    if st:
        print()
        print(st)
    if args.out:
        paths = write_result(result, args.out, plots=not args.no_plots)
        print(f"\nwrote {paths[0].parent}/ ({', '.join(p.name for p in paths)})")
    else:
        print("\n(results not written: pass --out DIR to save them)")
    if note:
        print("\n" + note.split(":")[0] + ": run `tritongpt bench all` on a CUDA machine for GPU numbers.")
    return 0


def _run_profile(args, cuda):
    """bench profile: on the GPU when there is one (files under --out, default bench/results), else on the
    CPU with its activity only (files only with --out)."""
    import torch

    from tritongpt.bench.common import Budget, environment
    from tritongpt.bench.profile_step import make_profile, render_markdown, run_profile, write_profile
    from tritongpt.bench.train_step import DEFAULT_BATCH
    from tritongpt.train.common import pick_dtype

    model_name, provs = profile_names(args)
    device = torch.device("cuda" if cuda else "cpu")
    dtype = pick_dtype(args.dtype, device)
    if not cuda:
        print("no CUDA device here: profiling the CPU activity only (host time; no device timeline)")
    env = environment()
    out_root = args.out or ("bench/results" if cuda else None)
    folder = None if out_root is None else Path(out_root) / env["device_slug"]
    batch = (_batches(args.batch, (model_name,)) or {}).get(model_name) or DEFAULT_BATCH.get(model_name, 8)
    warmup, steps = _or(args.warmup_steps, 2 if args.quick else 3), _or(args.steps, 2 if args.quick else 3)
    budget = Budget(args.max_minutes * 60)
    entries = run_profile(device, budget, dtype, model_name, provs, batch, args.seq_len, warmup, steps, args.top,
                          folder, args.traces, log=lambda s: print(s, file=sys.stderr, flush=True),
                          **model_flags(args))
    result = make_profile(env, _settings(args), model_name, batch, args.seq_len, dtype, steps, warmup, args.top,
                          entries, budget.elapsed(), **model_flags(args))
    md = render_markdown(result)
    print()
    print(md[md.index("## Summary"):].split("\n\n## ")[0])  # the summary table; the top ops are in the files
    if folder is not None:
        paths = write_profile(result, folder)
        traces = [Path(e["trace"]).name for e in entries if e.get("trace")]  # this run's, not an earlier one's
        print(f"\nwrote {folder}/ ({', '.join(p.name for p in paths)}"
              f"{', profile-traces/: ' + ', '.join(traces) if traces else ''})")
    else:
        print("\n(results not written: pass --out DIR to save them)")
    if budget.interrupted:
        print("interrupted: the providers profiled before it are written, the rest are marked skipped",
              file=sys.stderr)
        return 130
    return 0


def decode_names(args):
    """(model, batches, prompt length, new tokens, providers) of `bench decode`, checked on any machine: one model
    (default gpt2-small), the prompt and the new tokens within its context."""
    from tritongpt.bench.decode import DECODE_PROVIDERS, DEFAULT_BATCHES
    from tritongpt.model.config import PRESETS, get_config

    models = _names(args.models or "gpt2-small", tuple(PRESETS), "models")
    if len(models) != 1:
        raise UserError(f"bench decode takes one model in --models, got {len(models)}: {', '.join(models)}")
    batches = _ints(args.batch, "batch") if args.batch is not None else DEFAULT_BATCHES
    prompt = args.seq_len if getattr(args, "seq_len_given", False) else 128
    if prompt < 1 or args.new_tokens < 1:
        raise UserError(f"--seq-len (the prompt) and --new-tokens must be positive integers, got {prompt} and "
                        f"{args.new_tokens}")
    ctx = get_config(models[0]).context_length
    if prompt + args.new_tokens > ctx:
        raise UserError(f"--seq-len {prompt} + --new-tokens {args.new_tokens} > {models[0]}'s context ({ctx})")
    providers = _names(args.providers, DECODE_PROVIDERS, "providers") if args.providers else DECODE_PROVIDERS
    return models[0], batches, prompt, args.new_tokens, providers


def _run_decode(args, cuda):
    """bench decode: on CUDA, rows into <out>/<device>/decode.json, .md and .png (out default bench/results) and a
    table; without CUDA nothing is measured (a CPU's decode step would time Python, not the graphs)."""
    import torch

    from tritongpt.bench.common import Budget, dtype_name, environment
    from tritongpt.bench.decode import run_decode
    from tritongpt.bench.report import make_result, rows_table, write_result
    from tritongpt.train.common import pick_dtype

    model_name, batches, prompt, new_tokens, providers = decode_names(args)
    if not cuda:
        print("decode timings need CUDA: no CUDA device is available here, so nothing was measured. Run "
              "`tritongpt bench decode` on a CUDA machine.")
        return 0
    dtype = pick_dtype(args.dtype, torch.device("cuda"))
    env = environment()
    print(f"decoding on {env['device']} (torch {env['torch']}, triton {env['triton']}): {model_name}, batches "
          f"{','.join(map(str, batches))}, prompt {prompt} + {new_tokens} tokens, budget {args.max_minutes:g} min")
    budget = Budget(args.max_minutes * 60)
    rows = run_decode(torch.device("cuda"), budget, dtype, model_name, batches, prompt, new_tokens, providers,
                      log=lambda s: print(s, file=sys.stderr, flush=True))
    cast = "without autocast" if dtype == torch.float32 else f"under {dtype_name(dtype)} autocast"  # (common.autocast)
    note = (f"Greedy decode of a randomly initialised {model_name}: fp32 weights {cast}, "
            f"as `tritongpt generate` runs it; a {prompt}-token prompt prefilled (not timed), then {new_tokens} steps "
            "(the forward of one token a row and the argmax) between two CUDA syncs, the median over the timed runs.")
    result = make_result("decode", env, rows, settings=_settings(args), elapsed_s=budget.elapsed(), notes=[note])
    print()
    print(rows_table(rows))
    paths = write_result(result, args.out or "bench/results", plots=not args.no_plots)
    print(f"\nwrote {paths[0].parent}/ ({', '.join(p.name for p in paths)})")
    if budget.interrupted:
        print("interrupted: the rows measured before it are written, the rest are marked skipped", file=sys.stderr)
        return 130
    return 0


def _run_compile(args):
    """bench/compile_check.py in a subprocess: it needs Triton's compiled mode, and this process
    may already have imported triton with the interpreter on."""
    import os
    import subprocess

    cmd = [sys.executable, "-m", "tritongpt.bench.compile_check"]
    cmd += ["--arch", str(args.arch)] + ["--quick"] * args.quick + ["--strict"] * args.strict
    cmd += ["--out", args.out] if args.out else []
    cmd += ["--workers", str(args.workers)] if args.workers is not None else []
    cmd += ["--cases", args.cases] if args.cases is not None else []
    cmd += ["--one-config"] * args.one_config
    return subprocess.run(cmd, env={**os.environ, "TRITON_INTERPRET": "0"}).returncode


def _or(value, default):
    """An option left unset takes its default; 0 stays 0."""
    return default if value is None else value


def _settings(args):
    return {k: v for k, v in vars(args).items() if k not in ("func", "what_flags", "foreign_dests")}


def _run_gpu(args):
    import torch

    from tritongpt.bench.common import Budget, GpuTimer, environment
    from tritongpt.bench.kernels import ceiling_value, kernel_targets, measure_ceilings, run_kernels
    from tritongpt.bench.report import console_summary, make_result, write_result, write_summary
    from tritongpt.bench.train_step import TRAIN_PROVIDERS, run_train, train_targets
    from tritongpt.kernels._common import autotune_choices
    from tritongpt.train.common import pick_dtype
    from tritongpt.train.loop import peak_flops

    if args.threads is not None:  # (its CPU-side timings' threads, which a CUDA machine does not run)
        raise UserError(f"--threads sets the CPU-side timings' torch threads: bench {args.what} on CUDA times the GPU "
                        "(leave it out)")
    dtype = pick_dtype(args.dtype, torch.device("cuda"))  # the trainers' names, and auto = bf16
    out_root = args.out or "bench/results"
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    env = environment()
    print(f"benchmarking on {env['device']} (driver {env['driver']}, CUDA {env['cuda_version']}, "
          f"torch {env['torch']}, triton {env['triton']}), budget {args.max_minutes:g} min")
    budget = Budget(args.max_minutes * 60)
    timer = GpuTimer(args.warmup_ms, args.rep_ms, 3, args.cuda_graphs)
    results, ceilings = [], None
    settings = _settings(args)
    tuned = []  # autotune's picks already reported: each section lists the ones it added

    def new_choices():
        fresh = [a for a in autotune_choices() if a not in tuned]
        tuned.extend(fresh)
        return fresh

    if args.what in ("kernels", "all"):
        ops, modes, providers = kernel_names(args)
        sizes = kernel_sizes(args, args.quick)
        kb = budget.sub(0.5) if args.what == "all" else budget
        t0 = time.perf_counter()
        ceil_sizes = {"copy_bytes": 1 << 28, "matmul_n": 4096} if args.quick else None
        rows, ceilings = run_kernels(timer, kb, dtype, ops, modes, providers, sizes, ceil_sizes, log=log)
        graphs = ["Timed as CUDA-graph replays (--cuda-graphs, triton.testing.do_bench_cudagraph): device time "
                  "without the host's launch overhead; host_ms is still the eager call's."] if args.cuda_graphs else []
        res = make_result("kernels", env, rows, kernel_targets(rows, ceilings), ceilings, settings,
                          time.perf_counter() - t0, notes=graphs, autotune=new_choices())
        results.append(res)
        paths = write_result(res, out_root, plots=not args.no_plots)
        log(f"wrote {paths[0].parent}/ ({', '.join(p.name for p in paths)})")

    if args.what in ("train", "all"):
        models, provs = train_names(args)
        t0 = time.perf_counter()
        # the trainer's MFU denominator (train/loop.py PEAK_FLOPS), so the two report the same MFU
        datasheet = peak_flops(torch.device("cuda")) if torch.cuda.is_available() else None
        if args.peak_tflops is not None:
            peak, source = args.peak_tflops * 1e12, "--peak-tflops"
        elif datasheet:
            peak, source = datasheet, f"dense bf16 datasheet peak of {torch.cuda.get_device_name()}"
        else:
            if ceilings is None:
                log("measuring the bf16 matmul ceiling for MFU ...")
                ceilings = measure_ceilings(timer, copy_bytes=1 << 28, matmul_n=8192, dtype=torch.bfloat16)
            tf = ceiling_value(ceilings, "matmul")
            mm = ceilings.get("matmul", {})
            peak, source = ((tf * 1e12, f"{mm.get('dtype')} matmul {mm.get('n')}^3 measured in this run")
                            if tf else (None, f"unavailable ({mm.get('status')})"))
        rows = run_train(torch.device("cuda"), budget, dtype, models, provs or TRAIN_PROVIDERS,
                         _batches(args.batch, models), args.seq_len,
                         _or(args.warmup_steps, 2 if args.quick else 3),
                         _or(args.steps, 4 if args.quick else 10), peak, log=log,
                         **model_flags(args))
        targets = train_targets(rows) if "gpt2-small" in models else []
        res = make_result("train", env, rows, targets, ceilings, settings, time.perf_counter() - t0,
                          peak_flops=peak, peak_flops_source=source, autotune=new_choices())
        results.append(res)
        paths = write_result(res, out_root, plots=not args.no_plots)
        log(f"wrote {paths[0].parent}/ ({', '.join(p.name for p in paths)})")

    summary = write_summary(results, out_root)
    print()
    print(console_summary(results))
    print(f"\nresults: {summary.parent}/  ({budget.elapsed():.0f} s)")
    if budget.interrupted:
        print("interrupted: the rows measured before it are written, the rest are marked skipped",
              file=sys.stderr)
        return 130
    if args.strict and any(t["status"] == "FAIL" for r in results for t in r["targets"]):
        return 1
    return 0
