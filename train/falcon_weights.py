"""Falcon weights (TII's Falcon-7B, 40B, 180B: Hugging Face's FalconForCausalLM, model_type "falcon") into
GPTModel, and back out.

A Falcon is a GPT-2 with RoPE over whole heads (no position embeddings), the exact GELU (gelu_approximate
"none"), no biases (bias False; config.json's bias true gives every projection one) and an LM head tied to the
embeddings, in one of three blocks:
- Falcon-7B's (parallel_attn, the old decoder architecture): one LayerNorm read by attention and MLP side by
  side, x + attention(ln(x)) + mlp(ln(x)): GPTConfig.parallel_residual and shared_norm (GPT-J's block);
- Falcon-40B's and 180B's (new_decoder_architecture): two LayerNorms, ln_attn and ln_mlp, side by side:
  parallel_residual (GPT-NeoX's block); num_ln_in_parallel_attn 1 shares one, as the 7B;
- parallel_attn false: GPT-2's sequential block (input_layernorm, then post_attention_layernorm).
Its attention is multi-query in the 7B (multi_query: one key/value head) and grouped in the new architecture
(num_kv_heads), q, k and v fused in query_key_value in a layout of each architecture's own (_qkv_rows).
Falcon-RW (alibi true) has ALiBi instead of RoPE, added to the scores before their 1/sqrt(head_dim) scale (in
transformers' SDPA path the mask carries alibi / sqrt(head_dim)): position_encoding "alibi" with alibi_scaled,
the slopes divided by sqrt(head_dim). transformers builds the bias in bf16 (slopes.bfloat16() * positions):
exact for 1, 2, 4 or 8 heads (slopes powers of two) up to 256 positions, rounded otherwise, where ours stays
fp32. (transformers 5's eager Falcon adds the ALiBi bias twice, once in the scores and once in the mask; its
default SDPA path, which tests compare with, adds it once.)
What this model does not compute is refused by name: another activation, an MLP wider or narrower than 4
hidden_size, a scaled RoPE, the remote-code folders' model types (RefinedWeb).
"""
from pathlib import Path

import torch

from tritongpt._types import is_int
from tritongpt.errors import UserError, read_json_object
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.gpt2_weights import (_read_tensors, check_fused_rows, config_flag, config_json_gptconfig,
                                          fuse_rows, head_count, model_with_tensors, per_head_qkv_rows,
                                          plain_block_refusals, refuse_moe_touches, tied_head, weights_file,
                                          write_hf_folder)
from tritongpt.train.llama_weights import unscaled_partial_rope

MODEL_TYPE = "falcon"
REMOTE_CODE_TYPES = ("RefinedWeb", "RefinedWebModel")
# each block's tensors with a weight (and a bias if config.json's bias): ours, then Hugging Face's
_PROJ = (("att.out_proj", "self_attention.dense"), ("ff.fc1", "mlp.dense_h_to_4h"), ("ff.fc2", "mlp.dense_4h_to_h"))
_QKV = ("att.W_query", "att.W_key", "att.W_value")


def is_falcon_file(path) -> bool:
    """A Hugging Face Falcon model.safetensors (or shard index): its config.json says so (the remote-code
    RefinedWeb types too, to be refused by name)."""
    cfg_json = Path(path).parent / "config.json"
    return cfg_json.is_file() and read_json_object(cfg_json).get("model_type") in (MODEL_TYPE, *REMOTE_CODE_TYPES)


# FalconConfig's true/false fields and their defaults
_FLAGS = {"parallel_attn": True, "multi_query": True, "new_decoder_architecture": False, "alibi": False, "bias": False}


def _flags(d: dict, cfg_json) -> dict:
    """d with its Falcon flags as bools (config_flag: absent, FalconConfig's default; null, false). They were read
    by truthiness, and "false" is true: a bias "false" read as biases, an alibi "false" as ALiBi."""
    return {**d, **{key: config_flag(d, key, default, cfg_json) for key, default in _FLAGS.items()}}


def _norms(d: dict) -> tuple:
    """(our norms' Hugging Face names (norm1, norm2 or None for a shared one), parallel_residual) of a
    Falcon config.json's block (d: its flags read by _flags), as FalconDecoderLayer builds it."""
    if not d["parallel_attn"]:
        return ("input_layernorm", "post_attention_layernorm"), False
    if d["new_decoder_architecture"] and d.get("num_ln_in_parallel_attn") in (None, 2):
        return ("ln_attn", "ln_mlp"), True
    return ("input_layernorm", None), True


def _check_hf_config(cfg_json: Path, d: dict, sd: dict) -> GPTConfig:
    """The GPTConfig of a Falcon config.json (d, its contents), checked against the tensors beside it; what this
    model does not compute refused by name."""
    kind = d.get("model_type")
    if kind in REMOTE_CODE_TYPES:
        raise UserError(f"{cfg_json} says model_type {kind!r}, the remote-code Falcon format: take the folder's "
                        "transformers-format revision (model_type 'falcon'), which this loader reads")
    if kind != MODEL_TYPE:
        raise UserError(f"{cfg_json} says model_type {kind!r}; a Falcon folder's is {MODEL_TYPE}")
    try:
        vocab, n_embd = sd["word_embeddings.weight"].shape
        hidden = sd["h.0.mlp.dense_h_to_4h.weight"].shape[0]
        qkv_rows = sd["h.0.self_attention.query_key_value.weight"].shape[0]
    except KeyError as e:
        raise UserError(f"{cfg_json.parent}: not a Falcon model, missing tensor {e.args[0]!r}") from None
    n_layer = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("h.")), default=-1)
    n_head = head_count(d.get("num_attention_heads", 71), "num_attention_heads", n_embd, cfg_json)
    for key, have in (("vocab_size", vocab), ("hidden_size", n_embd), ("num_hidden_layers", n_layer)):
        if key in d and d[key] != have:
            raise UserError(f"{cfg_json} says {key} {d[key]!r}, but the weights have {have}")
    if d.get("ffn_hidden_size") not in (None, hidden) or hidden != 4 * n_embd:
        raise UserError(f"{cfg_json} has an MLP {hidden} wide (ffn_hidden_size {d.get('ffn_hidden_size')!r}); this "
                        f"model's GELU MLP is 4 hidden_size wide ({4 * n_embd})")
    if d.get("activation", "gelu") != "gelu":
        raise UserError(f"{cfg_json} has activation {d['activation']!r}; this model's Falcon MLP computes 'gelu' "
                        "(the exact one) only")
    if d["new_decoder_architecture"]:
        kv = d.get("num_kv_heads") or n_head
    else:
        kv = 1 if d["multi_query"] else n_head
    if not is_int(kv) or kv < 1 or n_head % kv:
        raise UserError(f"{cfg_json} says num_kv_heads {kv!r}, which does not divide num_attention_heads {n_head}")
    head_dim = n_embd // n_head
    if qkv_rows != (n_head + 2 * kv) * head_dim:
        raise UserError(f"{cfg_json.parent}: query_key_value has {qkv_rows} rows; {n_head} query heads over {kv} "
                        f"key/value heads of {head_dim} need {(n_head + 2 * kv) * head_dim}")
    # (layer 0's weight above, in the words its tests match; every layer's weight and bias here)
    check_fused_rows(sd, "h.{i}.self_attention.query_key_value", n_layer, (n_head + 2 * kv) * head_dim,
                     f"{n_head} query heads over {kv} key/value heads of {head_dim}", cfg_json.parent)
    if d["alibi"]:  # Falcon-RW: no rotation, ALiBi scaled with the scores
        positions = dict(position_encoding="alibi", alibi_scaled=True)
    else:  # whole heads unless rope_parameters says a factor (no Falcon does; refused below)
        theta, rotary = unscaled_partial_rope(d, head_dim, cfg_json, "Falcon", factor_default=1.0)
        if rotary:
            raise UserError(f"{cfg_json} has a partial rotary factor; Falcon rotates whole heads")
        positions = dict(position_encoding="rope", rope_theta=theta)
    names, parallel = _norms(d)
    head = sd.get("lm_head.weight")
    return config_json_gptconfig(
        cfg_json, {"context_length": "max_position_embeddings", "norm_eps": "layer_norm_epsilon"}, vocab_size=vocab,
        n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_kv_head=kv,
        context_length=d.get("max_position_embeddings", 2048), **positions, norm_eps=d.get("layer_norm_epsilon", 1e-5),
        bias=d["bias"], tie_weights=tied_head(d, head, sd["word_embeddings.weight"], "lm_head.weight", cfg_json),
        parallel_residual=parallel, shared_norm=parallel and names[1] is None, gelu_approximate="none")


def _qkv_rows(cfg: GPTConfig, new_arch: bool) -> tuple:
    """Index tensors of query_key_value's rows that are q's, k's and v's (in our heads' order). The new
    architecture lays them out per key/value group: the group's query heads, then its key, then its value;
    the old one (multi-query, or a head each) all the queries first, then the keys, then the values (a head
    each: per head, as GPT-NeoX's)."""
    H, G, D = cfg.n_head, cfg.kv_heads, cfg.head_dim
    if new_arch:
        rows = torch.arange((H + 2 * G) * D).reshape(G, H // G + 2, D)
        return rows[:, :-2].reshape(-1), rows[:, -2].reshape(-1), rows[:, -1].reshape(-1)
    if G == 1:
        rows = torch.arange((H + 2) * D)
        return rows[:H * D], rows[H * D:(H + 1) * D], rows[(H + 1) * D:]
    return per_head_qkv_rows(H, D)


def _our_tensors(sd: dict, cfg: GPTConfig, d: dict) -> dict:
    """Hugging Face Falcon tensors under our parameter names (KeyError: a tensor the file lacks)."""
    names, _ = _norms(d)
    kinds = ("weight", "bias") if cfg.bias else ("weight",)
    ours = {"tok_emb.weight": sd["word_embeddings.weight"], "final_norm.weight": sd["ln_f.weight"],
            "final_norm.bias": sd["ln_f.bias"]}
    if not cfg.tie_weights:
        ours["out_head.weight"] = sd["lm_head.weight"]
    split = _qkv_rows(cfg, d["new_decoder_architecture"])
    for i in range(cfg.n_layer):
        h, b = f"h.{i}.", f"trf_blocks.{i}."
        for kind in kinds:
            fused = sd[f"{h}self_attention.query_key_value.{kind}"]
            for name, rows in zip(_QKV, split):
                # (a 4-bit query_key_value's is split by the loader: hf_quant.int4_rows, named by _int4_part)
                ours[f"{b}{name}.{kind}"] = sd[_int4_part(i, name)] if fused.is_meta else fused[rows]
            for mine, theirs in _PROJ:
                ours[f"{b}{mine}.{kind}"] = sd[f"{h}{theirs}.{kind}"]
        for mine, theirs in zip(("norm1", "norm2"), names):
            if theirs is not None:
                for kind in ("weight", "bias"):
                    ours[f"{b}{mine}.{kind}"] = sd[f"{h}{theirs}.{kind}"]
    return ours


def load_falcon_safetensors(path) -> GPTModel:
    """GPTModel with the weights of a Hugging Face Falcon model.safetensors (or shard index) and its
    config.json beside it."""
    from tritongpt.train.hf_quant import (folder_dequantized, folder_quantization, int4_linears, int4_rows,
                                          model_with_int4)
    path = weights_file(path, "Falcon")
    cfg_json = path.parent / "config.json"
    # a GPTQ or AWQ folder: 4-bit, read as int4 (hf_quant.py; 8-bit GPTQ as int8 where it maps); an FP8 one, or a
    # GPTQ one of other bits, dequantized to a float model; any other refused by name
    spec, dequant = folder_quantization(cfg_json)
    sd = _read_tensors(path, prefix="transformer.", quantization_read=spec is not None or dequant is not None)
    if dequant is not None:
        sd = folder_dequantized(sd, dequant, path, blocks="h.", prefix="transformer.")
    if spec is not None:
        sd, packed, group_size = int4_linears(sd, spec, path, blocks="h.", prefix="transformer.")
        if packed is None:  # (4-bit groups no int4 group size divides: read dequantized, a float model)
            spec = None
    d = _flags(read_json_object(cfg_json), cfg_json)  # (_check_hf_config and _our_tensors read them)
    cfg = _check_hf_config(cfg_json, d, sd)
    if spec is None:
        return model_with_tensors(cfg, lambda: _our_tensors(sd, cfg, d), path)
    # GPTQ and AWQ quantize query_key_value as one linear, in its architecture's layout: each projection's rows
    # taken from it, as the float weight's are
    for i in range(cfg.n_layer):
        int4_rows(sd, packed, f"h.{i}.self_attention.query_key_value",
                  {_int4_part(i, name).removesuffix(".weight"): rows
                   for name, rows in zip(_QKV, _qkv_rows(cfg, d["new_decoder_architecture"]))})
    return model_with_int4(cfg, lambda: _our_tensors(sd, cfg, d), sd, packed, group_size, path)


def _int4_part(i: int, name: str) -> str:
    """Where load_falcon_safetensors puts layer i's q, k or v (ours: name) of a 4-bit query_key_value."""
    return f"h.{i}.self_attention.query_key_value.{name.removeprefix('att.')}.weight"


# -- export: the inverse of _our_tensors -----------------------------------------------------------
def is_falcon_shaped(cfg: GPTConfig) -> bool:
    """Falcon-RW's scaled ALiBi (alibi_scaled), or RoPE over LayerNorms with the exact-GELU MLP, no LM-head bias,
    and one of Falcon's touches a GPT-NeoX cannot say (a shared norm, fewer key/value heads than query heads, no
    biases): what export writes as a Falcon (or refuses)."""
    return cfg.alibi_scaled or (cfg.position_encoding == "rope" and cfg.norm == "layernorm" and cfg.mlp == "gelu"
                                and cfg.gelu_approximate == "none" and not cfg.head_bias
                                and (cfg.shared_norm or cfg.kv_heads < cfg.n_head or not cfg.bias))


def refuse_not_falcon(model: GPTModel, what: str) -> None:
    """What Hugging Face's Falcon does not compute, by name."""
    cfg = model.config
    refuse_moe_touches(cfg, "Falcon", what)
    rw = cfg.position_encoding == "alibi" and cfg.alibi_scaled  # Falcon-RW's positions
    for differs, why in ((cfg.position_encoding != "rope" and not rw, f"{cfg.positions_said()}, where Falcon "
                          "rotates q and k (RoPE) or, Falcon-RW, adds ALiBi's bias before the scores' scale "
                          "(alibi_scaled)"),
                         (bool(cfg.rotary_dim), f"rotates only {cfg.rotary_dim} of each head's dimensions, where "
                          "Falcon rotates whole heads"),
                         (cfg.norm != "layernorm", f"normalizes with {cfg.norm}, where Falcon has LayerNorms"),
                         (cfg.mlp != "gelu", f"has a {cfg.mlp} MLP, where Falcon's is GELU"),
                         (cfg.gelu_approximate != "none", "computes the tanh GELU, where Falcon's is the exact one"),
                         (cfg.bias != cfg.has_qkv_bias, "has biases on some projections only, where Falcon has them "
                          "on all or none"),
                         (cfg.head_bias, "has an LM-head bias, which Falcon does not"),
                         (not cfg.parallel_residual and 1 < cfg.kv_heads < cfg.n_head, "has sequential blocks over "
                          "grouped-query attention, which no Falcon block computes"),
                         (cfg.qk_norm, "normalizes q and k (qk_norm), which Falcon does not"),
                         (cfg.rope_scaling is not None, "scales RoPE's frequencies (rope_scaling), which this export "
                          "does not write"),
                         *plain_block_refusals(cfg, "Falcon")):
        if differs:
            raise UserError(f"this model {why}: it cannot be exported as {what}")


def hf_config(cfg: GPTConfig, eos_token_id: int | None = None) -> dict:
    """FalconConfig fields for this model (what _check_hf_config reads back): the new decoder architecture
    for two parallel norms or grouped key/value heads, else the old one (multi-query for one key/value head)."""
    G, H = cfg.kv_heads, cfg.n_head
    new_arch = cfg.parallel_residual and (not cfg.shared_norm or 1 < G < H)
    return {"model_type": MODEL_TYPE, "architectures": ["FalconForCausalLM"], "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.context_length, "hidden_size": cfg.n_embd, "ffn_hidden_size": 4 * cfg.n_embd,
            "num_hidden_layers": cfg.n_layer, "num_attention_heads": H, "num_kv_heads": G, "activation": "gelu",
            "layer_norm_epsilon": cfg.norm_eps, "bias": cfg.bias,
            "alibi": cfg.position_encoding == "alibi", "new_decoder_architecture": new_arch,
            "multi_query": G == 1 and H > 1, "parallel_attn": cfg.parallel_residual,
            "num_ln_in_parallel_attn": (1 if cfg.shared_norm else 2) if new_arch else None, "hidden_dropout": 0.0,
            "attention_dropout": 0.0, "tie_word_embeddings": cfg.tie_weights, "bos_token_id": eos_token_id,
            "eos_token_id": eos_token_id, "pad_token_id": None, "rope_theta": cfg.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}}


def _hf_tensors(model: GPTModel, d: dict) -> dict:
    """Our parameters under FalconForCausalLM's names, q, k and v fused in the layout d's architecture reads,
    the padding rows dropped."""
    cfg = model.config
    V = cfg.vocab_size
    names, _ = _norms(d)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    hf = {"word_embeddings.weight": sd["tok_emb.weight"][:V], "ln_f.weight": sd["final_norm.weight"],
          "ln_f.bias": sd["final_norm.bias"]}
    split = _qkv_rows(cfg, d["new_decoder_architecture"])
    for i in range(cfg.n_layer):
        h, b = f"h.{i}.", f"trf_blocks.{i}."
        for kind in ("weight", "bias") if cfg.bias else ("weight",):
            hf[f"{h}self_attention.query_key_value.{kind}"] = fuse_rows([sd[f"{b}{name}.{kind}"] for name in _QKV],
                                                                          split)
            for mine, theirs in _PROJ:
                hf[f"{h}{theirs}.{kind}"] = sd[f"{b}{mine}.{kind}"]
        for mine, theirs in zip(("norm1", "norm2"), names):
            if theirs is not None:
                for kind in ("weight", "bias"):
                    hf[f"{h}{theirs}.{kind}"] = sd[f"{b}{mine}.{kind}"]
    out = {"transformer." + k: v for k, v in hf.items()}
    if not cfg.tie_weights:
        out["lm_head.weight"] = sd["out_head.weight"][:V]
    return {k: v.to("cpu", memory_format=torch.contiguous_format, copy=True) for k, v in out.items()}


def export_falcon(model: GPTModel, out_dir, eos_token_id: int | None = None, overwrite: bool = False) -> list:
    """Write model as a Hugging Face Falcon folder: model.safetensors and config.json, which
    transformers.AutoModelForCausalLM.from_pretrained(out_dir) and load_checkpoint both read.
    Returns the paths written; refuses to replace them unless overwrite."""
    refuse_not_falcon(model, "a Falcon folder")
    d = hf_config(model.config, eos_token_id)
    return write_hf_folder(out_dir, lambda: _hf_tensors(model, d), d, overwrite)
