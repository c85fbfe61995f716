"""Training-step benchmark: one GPT-2 optimizer step (forward, loss, backward, clip, fused AdamW).

Providers (same weights, same batch, same optimizer for all of them):
    reference               the textbook modules, eager
    reference+compile+sdpa  torch.compile of the reference model with its attention core swapped
                            for F.scaled_dot_product_attention by use_sdpa_attention() below:
                            the strongest "plain PyTorch" baseline
    triton                  model.set_kernels("triton"): our LayerNorm, GELU-MLP, attention and
                            the fused LM head + cross-entropy (the step passes targets)
    triton+compile          the Triton path under torch.compile (a failure becomes a
                            "failed: reason" row)
    triton+compile+cudagraphs
                            the Triton path under torch.compile(mode="reduce-overhead"): the
                            forward and backward replayed as CUDA graphs, one launch each, so
                            the host's per-kernel launch cost leaves the step (CUDA only; on
                            another device its row is "skipped: ..."). Opt-in: not in the defaults
Other combinations parse too ("reference+sdpa", "reference+compile"), and "+ckpt" on any of them
runs the blocks under activation checkpointing (model.set_activation_checkpointing): less peak
memory, one more forward of the blocks per step. MFU counts the model's FLOPs only, never the
recomputation, so a checkpointed step's MFU is lower for the same hardware work; its row also
gives HFU (PaLM's hardware FLOPs utilization), which counts the recomputed forward too.
"+lora" trains a rank-8 LoRA update of every attention and MLP matrix instead (model/lora.py):
MFU counts the same model FLOPs (6N; A and B are no per-token matmul), and the block matrices'
weight gradients are still formed (then projected on A and B), but the frozen LM head's weight
gradient is not: the row's HFU counts the 2 * C * V FLOPs a token that skips.
"+qlora" is "+lora" on an int4 base (QLoRA, sft --quantize int4: the block matrices int4 in groups of 128,
model/quant.py; the LM head float): the same model FLOPs, but no weight gradient of the frozen quantized
matrices at all (only dx flows through them), which its HFU leaves out too.

Model variants (`bench train --attention-window W --window-layers all|odd --logit-softcap C`, and
--vocab-multiple): every provider of a run times the same GPTConfig, and each row's config names
what is not GPT-2 as published. Local attention reaches each provider through the model (the SDPA
swap adds the window's mask, the Triton kernel takes the window); the soft cap through the loss
(lm_loss on GPTModel.logits, or the fused Triton loss's softcap). MFU counts a local layer's
attention by its visible pairs (train/loop.py's flops_per_token, the trainers' own MFU count), as
bench/common.py's window_attention_flops does.
Llama's shape (`--norm rmsnorm --mlp swiglu [--mlp-hidden H] --position-encoding rope [--rope-theta T]
--n-kv-head N --no-bias`, pretrain's flags) reaches every provider through the model too: the SDPA swap
gets q and k already rotated and the KV heads as they are (enable_gqa); the Triton path runs its RMSNorm,
SwiGLU and RoPE kernels. MFU's 6N counts the model's own parameters: SwiGLU's three matrices, GQA's
narrower W_key and W_value, no pos_emb and no biases.

Reported per provider: step time (median of CUDA-event timings, 20/80 quantiles), tokens/s,
MFU, peak memory. MFU = model FLOPs per second / a peak: by default the GPU's dense bf16
datasheet peak (train/loop.py's PEAK_FLOPS, what the trainers log), else the bf16 matmul
ceiling measured in the same run; `--peak-tflops` sets it by hand. The JSON says which.
"""
import math
import sys
import time
import types

import torch
import torch.nn.functional as F

from tritongpt.bench.common import is_ok, make_row, median_quantiles, reason_of, try_import
from tritongpt.bench.report import variant_text
from tritongpt.kernels._common import is_oom
from tritongpt.train.common import LossScaler
from tritongpt.train.loop import attention_forward_flops, flops_per_token

# The uncompiled providers first: a time budget cut short by the compiled baseline (minutes of
# compiling) then still leaves the Triton path's MFU and memory targets judged.
TRAIN_PROVIDERS = ("reference", "triton", "reference+compile+sdpa", "triton+compile")
# What a first torch.compile'd GPT-2 step (dynamo + inductor, then warm-up) is given at least:
# one started with less left would run past the budget (later ones use the measured costs).
COMPILE_MIN_S = 60.0
DEFAULT_BATCH = {"gpt2-small": 16, "gpt2-medium": 8}


# -- the SDPA swap (bench-only; model/ stays textbook) ---------------------------------------------------
def sdpa_attend(self, q, k, v, doc_ids=None, kv_len=None):
    """MultiHeadAttention.attend with F.scaled_dot_product_attention; same causal alignment.

    Equal lengths use is_causal=True (top-left = bottom-right then); with a KV cache (Tq < Tk)
    the module's own bottom-right mask is passed, inverted (SDPA's True means "attend"), and
    with packed documents that mask and the document mask; with a window (local attention) the
    window's mask too. Fewer KV heads than query heads (GPTConfig.n_kv_head): enable_gqa. ALiBi
    (GPTConfig.position_encoding "alibi"): a float mask, the bias where allowed and -inf elsewhere.
    kv_len (a CUDA-graph decode step's, as attend's): the masks of the first kv_len keys, the values past them zeroed.
    """
    from tritongpt.model.layers import alibi_bias, document_index, in_the_future, outside_window, past_the_fill

    Tq, Tk = q.size(-2), k.size(-2)
    p = self.attn_drop.p if self.training else 0.0
    gqa = k.size(1) != q.size(1)
    if Tq == Tk and doc_ids is None and not self.window and not self.alibi and kv_len is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, scale=self.softmax_scale,
                                              enable_gqa=gqa)
    if kv_len is not None:  # the keys too: SDPA adds its mask to the scores, and -inf + NaN is NaN
        stale = past_the_fill(Tk, kv_len)
        k, v = k.masked_fill(stale, 0), v.masked_fill(stale, 0)
    allowed = ~in_the_future(Tq, Tk, q.device, kv_len)
    if self.window:
        allowed = allowed & ~outside_window(Tq, Tk, self.window, q.device, kv_len)
    if doc_ids is not None:
        doc = document_index(doc_ids)
        allowed = allowed & (doc[:, Tk - Tq:, None] == doc[:, None, :])[:, None]  # [B, 1, Tq, Tk]
    if self.alibi:  # SDPA adds a float mask to the scaled scores, as attend adds the bias
        allowed = torch.where(allowed, alibi_bias(self.alibi_slopes(q.device), Tq, Tk, kv_len=kv_len),
                              float("-inf")).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p, scale=self.softmax_scale,
                                          enable_gqa=gqa)


def use_sdpa_attention(model):
    """Swap the attention core of every MultiHeadAttention in `model` for SDPA, in place.

    Only the instances' `attend` is rebound: weights, projections, the KV cache and the
    use_triton flag are untouched (with use_triton set, forward never calls attend). This is
    how the benchmark builds its "reference + torch.compile + SDPA" baseline without editing
    model/layers.py. Returns the model.
    """
    from tritongpt.model.layers import MultiHeadAttention

    n = 0
    for m in model.modules():
        if isinstance(m, MultiHeadAttention):
            m.attend = types.MethodType(sdpa_attend, m)
            n += 1
    if n == 0:
        raise ValueError("use_sdpa_attention: the model has no MultiHeadAttention module")
    return model


# -- the model timed -------------------------------------------------------------------------------------
# bench train's model flags: GPTConfig fields over the preset's (None or absent: the preset's)
MODEL_FLAGS = ("vocab_multiple", "attention_window", "window_layers", "logit_softcap", "logit_scale", "norm", "mlp",
               "mlp_hidden", "position_encoding", "rope_theta", "n_kv_head", "bias", "attention_head_dim", "qk_norm",
               "scale_embeddings", "post_norms", "rope_local_theta", "attn_softcap", "nope_layers", "pre_norms",
               "qk_norm_width", "parallel_residual", "gelu_approximate", "rotary_dim", "shared_norm", "head_bias",
               "embed_norm", "norm_bias", "alibi_scaled", "n_experts", "experts_per_token", "moe_aux_loss",
               "embedding_multiplier", "residual_multiplier", "attention_multiplier")


def model_variant(cfg) -> dict:
    """What makes cfg's model other than GPT-2 as published, for a row's config (so a local, capped or
    Llama-shaped model's row is never read as plain GPT-2's): a padded vocabulary, local attention (the
    window and its layers), a logit soft cap, a logit scale (Cohere's), RMSNorm, the SwiGLU MLP (its hidden size as
    built), RoPE (its theta), fewer KV heads, no biases, Qwen3's heads of their own width and q/k norms, Gemma's scaled
    embeddings, sandwich norms, local layers' RoPE, attention soft cap and scale, SmolLM3's NoPE layers, OLMo's
    blocks without input norms and q/k norms over all heads, GPT-NeoX's parallel blocks, exact GELU and partial
    rotary, Phi's shared norm and LM-head bias, BLOOM's embedding norm, MPT's bias-free LayerNorms, Falcon-RW's
    scaled ALiBi, a mixture of experts (Mixtral's), Granite's muP multipliers. {} for GPT-2."""
    out = {}
    if cfg.padded_vocab_size != cfg.vocab_size:
        out["padded_vocab"] = cfg.padded_vocab_size
    if cfg.attention_window:
        out.update(attention_window=cfg.attention_window, window_layers=cfg.window_layers)
    if cfg.logit_softcap:
        out["logit_softcap"] = cfg.logit_softcap
    if cfg.logit_scale != 1.0:
        out["logit_scale"] = cfg.logit_scale
    if cfg.norm != "layernorm":
        out["norm"] = cfg.norm
    if cfg.mlp != "gelu":
        out.update(mlp=cfg.mlp, mlp_hidden=cfg.ff_hidden)
    if cfg.position_encoding != "learned":
        out["position_encoding"] = cfg.position_encoding
    if cfg.position_encoding == "rope":
        out["rope_theta"] = cfg.rope_theta
    if cfg.kv_heads != cfg.n_head:
        out["n_kv_head"] = cfg.kv_heads
    if not cfg.bias:
        out["bias"] = False
    if cfg.n_head * cfg.head_dim != cfg.n_embd:
        out["attention_head_dim"] = cfg.head_dim
    if cfg.qk_norm:
        out["qk_norm"] = True
    if cfg.scale_embeddings:
        out["scale_embeddings"] = True
    if cfg.post_norms:
        out["post_norms"] = True
    if cfg.rope_local_theta:
        out["rope_local_theta"] = cfg.rope_local_theta
    if cfg.attn_softcap:
        out["attn_softcap"] = cfg.attn_softcap
    if cfg.nope_layers:
        out["nope_layers"] = cfg.nope_layers
    if cfg.attention_scale_width:
        out["attention_scale_width"] = cfg.attention_scale_width
    if not cfg.pre_norms:
        out["pre_norms"] = False
    if cfg.qk_norm and cfg.qk_norm_width != "head":
        out["qk_norm_width"] = cfg.qk_norm_width
    if cfg.rotary_dim:
        out["rotary_dim"] = cfg.rotary_dim
    if cfg.parallel_residual:
        out["parallel_residual"] = True
    if cfg.gelu_approximate != "tanh":
        out["gelu_approximate"] = cfg.gelu_approximate
    if cfg.shared_norm:
        out["shared_norm"] = True
    if cfg.head_bias:
        out["head_bias"] = True
    if cfg.embed_norm:
        out["embed_norm"] = True
    if not cfg.norm_bias:
        out["norm_bias"] = False
    if cfg.alibi_scaled:
        out["alibi_scaled"] = True
    if cfg.n_experts:
        out.update(n_experts=cfg.n_experts, experts_per_token=cfg.experts_per_token)
        if cfg.moe_aux_loss:
            out["moe_aux_loss"] = cfg.moe_aux_loss
    for field, plain in (("embedding_multiplier", 1.0), ("residual_multiplier", 1.0), ("attention_multiplier", 0.0)):
        if getattr(cfg, field) != plain:
            out[field] = getattr(cfg, field)
    return out


# -- providers -------------------------------------------------------------------------------------------
def parse_provider(name: str):
    """'triton+compile' -> ('triton', {'compile'}). Raises ValueError on an unknown name."""
    parts = name.split("+")
    base, flags = parts[0], set(parts[1:])
    if base not in ("reference", "triton") or not flags <= {"compile", "sdpa", "ckpt", "lora", "qlora", "cudagraphs"} \
            or len(flags) != len(parts) - 1 or {"lora", "qlora"} <= flags:
        raise ValueError(f"unknown training provider {name!r}; e.g. {', '.join(TRAIN_PROVIDERS)}")
    if "cudagraphs" in flags and "compile" not in flags:
        raise ValueError(f"{name!r}: +cudagraphs is torch.compile's mode='reduce-overhead', so it needs +compile "
                         f"(e.g. {base}+compile+cudagraphs)")
    if base == "triton" and "sdpa" in flags:
        raise ValueError(f"{name!r}: the Triton path already has its own attention kernel")
    return base, flags


class Unavailable(Exception):
    pass


def device_unavailable(name, device):
    """Why provider `name` cannot run on `device` (CUDA graphs are CUDA's own), or None."""
    if "cudagraphs" in parse_provider(name)[1] and torch.device(device).type != "cuda":
        return (f"CUDA graphs (torch.compile mode='reduce-overhead') capture CUDA work only; "
                f"this step runs on {torch.device(device).type}")
    return None


def build(name, cfg, device, seed=0):
    """(model, the callable the step runs, optimizer) for a provider."""
    from tritongpt.model.gpt import GPTModel
    from tritongpt.train.common import build_optimizer

    base, flags = parse_provider(name)
    why = device_unavailable(name, device)
    if why:
        raise Unavailable(why)
    if "sdpa" in flags and cfg.attn_softcap:
        raise Unavailable(f"F.scaled_dot_product_attention cannot soft-cap the scores (attn_softcap "
                          f"{cfg.attn_softcap:g}); reference+compile times the eager math")
    if base == "triton":
        kernels = [("layernorm", "layer_norm"), ("mlp", "gelu_mlp"), ("attention", "flash_attention")]
        if cfg.mlp in ("swiglu", "geglu"):  # one kernel, either gate
            kernels.append(("swiglu", "swiglu_mlp"))
        if cfg.position_encoding == "rope":
            kernels.append(("rope", "rope"))
        for mod, fn in kernels:
            obj, why = try_import(f"tritongpt.kernels.{mod}", fn)
            if obj is None:
                raise Unavailable(why)
    torch.manual_seed(seed)
    model = GPTModel(cfg).to(device)
    model.train()
    model.set_kernels("triton" if base == "triton" else "reference")
    if "sdpa" in flags:
        use_sdpa_attention(model)
    model.set_activation_checkpointing("ckpt" in flags)
    if flags & {"lora", "qlora"}:
        from tritongpt.model.lora import add_lora
        from tritongpt.model.quant import quantize

        if "qlora" in flags:  # the frozen block matrices int4 (sft --quantize int4), the head float
            quantize(model, "int4", head=False)
        add_lora(model, rank=8)
    opt = build_optimizer(model, lr=1e-4, weight_decay=0.1, device=device)  # fused AdamW on CUDA
    run = model
    if "compile" in flags:
        torch._dynamo.reset()
        run = _graph_steps(torch.compile(model, mode="reduce-overhead")) if "cudagraphs" in flags else \
            torch.compile(model)
    return model, run, opt


def _graph_steps(compiled):
    """compiled (a reduce-overhead torch.compile) called as one new step each time, its loss copied out.

    CUDA-graph trees replay into static buffers: the step's start is marked (torch.compiler.
    cudagraph_mark_step_begin, as the torch.compile docs ask of training loops), and the loss cloned,
    so a loss kept from an earlier step is not overwritten by the next replay."""
    def run(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args, **kwargs).clone()

    return run


def train_step(run, model, opt, x, y, device, dtype, grad_clip=1.0, scaler=None):
    """The trainers' step: autocast forward, backward (of the scaled loss in fp16: scaler is a
    train.common.LossScaler), clipping, AdamW."""
    from tritongpt.train.common import autocast

    scaler = scaler or LossScaler(device, torch.float32)  # None: a pass-through
    with autocast(device, dtype):
        loss = run(x, targets=y)  # the model's own loss: reference lm_loss or the Triton kernel
    scaler.backward(loss)
    scaler.unscale(opt)
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(opt)
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def time_steps(step, n, device):
    """Per-step milliseconds: CUDA events on a GPU (no host sync inside), perf_counter on CPU."""
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(n)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in events]
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def train_config(model_name, seq_len, vocab_size=None, **model):
    """The GPTConfig a run times: the preset with the run's context and model flags (MODEL_FLAGS; None:
    the preset's)."""
    from tritongpt.model.config import get_config

    return get_config(model_name, vocab_size=vocab_size, context_length=max(seq_len, 1), **model)


def bench_train_provider(name, model_name, batch, seq_len, device, dtype, warmup_steps, steps,
                         peak_flops=None, vocab_size=None, seed=0, **model):
    """One row: step time, tokens/s, MFU and memory of `name` on `model_name` (with the model flags)."""
    from tritongpt.bench.common import dtype_name

    cfg = train_config(model_name, seq_len, vocab_size, **model)
    cfg_row = {"model": model_name, "batch": batch, "seq_len": seq_len, "dtype": dtype_name(dtype),
               "steps": steps, "warmup_steps": warmup_steps, **model_variant(cfg)}
    g = torch.Generator().manual_seed(seed)  # the same batch for every provider
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=g).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    model = run = opt = None
    try:
        model, run, opt = build(name, cfg, device, seed)
        from tritongpt.model.lora import lora_parameters
        from tritongpt.model.quant import QuantLinear

        # LoRA's A and B are no per-token matmul (the merged weight is): its FLOPs are the model's; a QLoRA
        # model's block matrices (and their biases) are buffers, not parameters: they count as what they stand for
        frozen = [m for m in model.modules() if isinstance(m, QuantLinear)]
        quantized = sum(m.in_features * m.out_features for m in frozen)
        biases = sum(m.bias.numel() for m in frozen if m.bias is not None)
        n_params = model.num_params(non_embedding=True) + quantized + biases \
            - sum(p.numel() for p in lora_parameters(model))
        fpt = flops_per_token(cfg, n_params, seq_len)
        # what the GPU does per token: checkpointing runs each block's forward once more
        # (2 FLOPs per block parameter, 4*H*Q*T a dense layer for the attention scores and their weighted sum)
        hw_fpt, flags = fpt, parse_provider(name)[1]
        if "ckpt" in flags:
            block = sum(p.numel() for n, p in model.trf_blocks.named_parameters() if not n.endswith(("_A", "_B")))
            hw_fpt += 2 * (block + quantized + biases) + attention_forward_flops(cfg, seq_len)
        if flags & {"lora", "qlora"}:  # no weight gradient for the frozen LM head (on either path)
            hw_fpt -= 2 * cfg.n_embd * cfg.padded_vocab_size
        if "qlora" in flags:  # nor for the quantized matrices: only dx flows through them
            hw_fpt -= 2 * quantized
        cfg_row["n_params_non_embedding"] = n_params
        losses, scaler = [], LossScaler(device, dtype)  # fp16 steps as the trainers take them

        def step():
            losses.append(train_step(run, model, opt, x, y, device, dtype, scaler=scaler))

        t0 = time.perf_counter()
        for _ in range(warmup_steps):  # compilation, autotuning, optimizer state allocation
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        warm_s = time.perf_counter() - t0
        static = torch.cuda.memory_allocated() if device.type == "cuda" else None
        times = time_steps(step, steps, device)
        med, p20, p80 = median_quantiles(times)
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
        last = float(losses[-1])
        if not math.isfinite(last):
            return make_row("train", "step", name, cfg_row, "fwd+bwd", f"failed: loss is {last}")
    except Unavailable as e:
        return make_row("train", "step", name, cfg_row, "fwd+bwd", f"skipped: {e}")
    except Exception as e:
        return make_row("train", "step", name, cfg_row, "fwd+bwd",
                        "failed: out of memory" if is_oom(e) else f"failed: {reason_of(e)}")
    finally:
        del model, run, opt
        if device.type == "cuda":  # the collector costs 0.1-0.3 s a call: only where the next row needs the memory
            import gc

            gc.collect()
            torch.cuda.empty_cache()
        if "torch._dynamo" in sys.modules:  # importing dynamo just to reset it costs seconds
            torch._dynamo.reset()
    tok_s = batch * seq_len / (med * 1e-3)
    row = make_row("train", "step", name, cfg_row, "fwd+bwd", ms=med, ms_p20=p20, ms_p80=p80,
                   tokens_per_s=tok_s, flops_per_token=fpt, tflops=fpt * tok_s / 1e12,
                   peak_mem_bytes=peak, static_mem_bytes=static, warmup_s=warm_s, final_loss=last)
    row["mfu"] = fpt * tok_s / peak_flops if peak_flops else None
    row["hw_flops_per_token"] = hw_fpt
    row["hfu"] = hw_fpt * tok_s / peak_flops if peak_flops else None
    if hw_fpt != fpt and row["hfu"] is not None:
        row["note"] = f"HFU {100 * row['hfu']:.1f}% counting " + " and ".join(
            what for flag, what in (("ckpt", "the recomputed forward"), ("lora", "no LM-head weight gradient"),
                                    ("qlora", "no weight gradient of the LM head or the int4 matrices"))
            if flag in flags)
    return row


def run_train(device, budget, dtype=torch.bfloat16, models=("gpt2-small", "gpt2-medium"),
              providers=TRAIN_PROVIDERS, batch=None, seq_len=1024, warmup_steps=3, steps=10,
              peak_flops=None, vocab_size=None, log=print, **model_flags):
    """Every provider on every model (each with the model flags, MODEL_FLAGS: vocab_multiple to bias);
    rows in model-major order (124M first: the targets)."""
    rows = []
    for p in providers:
        parse_provider(p)
    cost = {}  # provider -> (seconds it took, n_layer) on the previous model
    for model_name in models:
        b = (batch or {}).get(model_name) or DEFAULT_BATCH.get(model_name, 8)
        model_cfg = train_config(model_name, seq_len, vocab_size, **model_flags)
        n_layer = model_cfg.n_layer
        for p in providers:
            # a row skipped unrun names the model it would have timed too
            cfg = {"model": model_name, "batch": b, "seq_len": seq_len, **model_variant(model_cfg)}
            if budget.expired():
                rows.append(make_row("train", "step", p, cfg, "fwd+bwd", budget.skip_reason()))
                continue
            # Do not start what would overrun the budget. Compilation time grows with depth (dynamo
            # traces every layer): a provider's cost on this model is estimated from the previous
            # model's measured one; a compiled provider never measured is expected to cost what
            # the most expensive compiled one measured so far did (scaled to this depth), and at
            # least COMPILE_MIN_S.
            need, basis = 0.0, ""
            if p in cost:
                need = cost[p][0] * n_layer / cost[p][1]
                basis = f"~{need:.0f} s expected from the previous model"
            elif "compile" in p:
                seen = [c * n_layer / n for q, (c, n) in cost.items() if "compile" in q]
                need = max([COMPILE_MIN_S, *seen])
                basis = (f"~{need:.0f} s expected from the other compiled provider" if need > COMPILE_MIN_S
                         else f"a first compiled run needs ~{COMPILE_MIN_S:.0f} s")
            if need > budget.remaining():
                rows.append(make_row("train", "step", p, cfg, "fwd+bwd",
                                     f"skipped: time budget ({basis}, {budget.remaining():.0f} s left)"))
                continue
            log(f"train step: {model_name}{variant_text(cfg)} B={b} T={seq_len} {p} ...")
            t0 = time.perf_counter()
            try:
                row = bench_train_provider(p, model_name, b, seq_len, device, dtype, warmup_steps, steps,
                                           peak_flops, vocab_size, **model_flags)
            except KeyboardInterrupt:  # the rows so far are still written; nothing new starts
                budget.interrupt()
                row = make_row("train", "step", p, cfg, "fwd+bwd", budget.skip_reason())
            cost[p] = (time.perf_counter() - t0, n_layer)
            rows.append(row)
            if is_ok(row):
                log(f"  {row['tokens_per_s']:,.0f} tok/s, {row['ms']:.1f} ms/step")
            else:
                log(f"  {row['status']}")
    return rows


def train_targets(rows, model_name="gpt2-small"):
    """GPT-2 124M: >= 1.25x reference+compile+SDPA, MFU >= 55%, peak memory <= 0.7x reference.

    "Ours" is the faster of the Triton providers that ran (named in the note). A model whose attention
    scores are soft-capped (attn_softcap), which SDPA cannot compute, is compared with reference+compile
    (torch.compile of the eager math) where that ran.
    """
    from tritongpt.bench.common import find_row, ratio, target

    mine = [r for r in rows if r["op"] == "step" and r["config"].get("model") == model_name
            and r["provider"].startswith("triton") and is_ok(r)]
    best = max(mine, key=lambda r: r["tokens_per_s"]) if mine else None
    note = f"ours = {best['provider']}" if best else "no Triton provider ran"
    base_name = "reference+compile+sdpa"
    base = find_row(rows, op="step", provider=base_name, config={"model": model_name})
    plain = find_row(rows, op="step", provider="reference+compile", config={"model": model_name})
    if (base is None or not is_ok(base)) and plain is not None and is_ok(plain) and plain["config"].get("attn_softcap"):
        # SDPA cannot soft-cap the scores: a capped model's baseline is torch.compile of the eager math
        base_name, base = "reference+compile", plain
    ref = find_row(rows, op="step", provider="reference", config={"model": model_name})
    base_tok = base["tokens_per_s"] if base and is_ok(base) else None
    ref_mem = ref.get("peak_mem_bytes") if ref and is_ok(ref) else None
    some = best or base or ref
    # the model as timed: a local or soft-capped model's targets are not plain GPT-2's
    where = model_name + (f" B={some['config'].get('batch')} T={some['config'].get('seq_len')}"
                          f"{variant_text(some['config'])}" if some else "")
    return [
        target(f"train step speedup vs {base_name}", where,
               ratio(best["tokens_per_s"] if best else None, base_tok), 1.25, unit="x", note=note),
        target("train MFU", where, best.get("mfu") if best else None, 0.55,
               note=note + "; MFU denominator: see peak_flops_source"),
        target("train peak memory / reference eager", where,
               ratio(best.get("peak_mem_bytes") if best else None, ref_mem), 0.70, op="<=", unit="x",
               note=note),
    ]
