"""Phi-3 and Phi-4 weights (Microsoft's Phi-3-mini/small-free/medium, Phi-3.5-mini, Phi-4 and Phi-4-mini:
Hugging Face's Phi3ForCausalLM, model_type "phi3") into GPTModel, and back out.

A Phi-3 is a Llama (RMSNorm, SwiGLU, RoPE, no biases) whose tensors are fused differently: one
qkv_proj holds q_proj's, k_proj's and v_proj's rows one after the other, and one gate_up_proj holds
gate_proj's rows then up_proj's. They are split on the way in (views, no copy until the model's
parameters take them) and concatenated on the way out. What else a Phi config says is a GPTConfig field:
- sliding_window (Phi-3-mini-4k's 2047) covers every layer, as Mistral's: attention_window. A window
  at least as long as the context (Phi-3-mini-128k's 262144) hides nothing and is read as none.
- partial_rotary_factor (Phi-4-mini's 0.75): only the first rotary_dim = int(head_dim * factor)
  dimensions of each head are rotated (GPTConfig.rotary_dim).
- LongRoPE (the 128k models: rope_type "longrope", which older configs spell "su" or "yarn"): per-frequency
  short_factor and long_factor lists, picked by the sequence's length against
  original_max_position_embeddings, and an attention factor (GPTConfig.rope_scaling "longrope").
What this model does not compute is refused by name: another activation, a head_dim the weights do
not have, another RoPE scaling, fused tensors whose rows do not split into the heads config.json says.
"""
from pathlib import Path

import torch

from tritongpt._types import is_int
from tritongpt.errors import UserError, read_json_object
from tritongpt.model.config import GPTConfig, check_rope_scaling
from tritongpt.model.gpt import GPTModel
from tritongpt.train.gpt2_weights import (_read_tensors, config_json_gptconfig, model_with_tensors, refuse_per_head_qk,
                                          weights_file, write_hf_folder)
from tritongpt.train.llama_weights import (LLAMA_KEYS, _our_tensors, checked_rope_base, hf_shapes,
                                           partial_rotary_dim, read_rope_parameters, refuse_not_llama, rope_field,
                                           shape_fields)

MODEL_TYPE, ARCHITECTURE = "phi3", "Phi3ForCausalLM"
LONGROPE_ALIASES = ("longrope", "su", "yarn")  # Phi3Config reads the two older names as longrope


def is_phi3_file(path) -> bool:
    """A Hugging Face Phi-3 (Phi-4) model.safetensors or shard index: its config.json says model_type phi3."""
    cfg_json = Path(path).parent / "config.json"
    return cfg_json.is_file() and read_json_object(cfg_json).get("model_type") == MODEL_TYPE


def _split_rows(out: dict, prefix: str, k: str, w, sizes: list, names: tuple, packed: dict | None) -> None:
    """out[prefix.name.weight] = w's rows split by sizes; where w is a 4-bit linear's meta weight (int4_linears),
    the fused linear GPTQ and AWQ quantized is split as its parts by hf_quant.int4_rows (exact along the outputs)."""
    if not w.is_meta:
        out.update({f"{prefix}.{name}.weight": part for name, part in zip(names, w.split(sizes))})
        return
    from tritongpt.train.hf_quant import int4_rows
    rows = torch.arange(w.shape[0]).split(sizes)
    int4_rows(out, packed, k.removesuffix(".weight"), {f"{prefix}.{name}": r for name, r in zip(names, rows)})


def _unfused(sd: dict, d: dict, cfg_json: Path, packed: dict | None = None) -> dict:
    """The state dict with each layer's qkv_proj and gate_up_proj split into Llama's names (packed: a 4-bit
    folder's int4_linears, whose fused linears are split alike)."""
    if "layers.0.self_attn.qkv_proj.weight" not in sd:
        raise UserError(f"{cfg_json.parent}: not a Phi-3 model, missing tensor 'layers.0.self_attn.qkv_proj.weight'")
    n_head = d.get("num_attention_heads")
    n_kv_head = d.get("num_key_value_heads") or n_head
    if not isinstance(n_head, int) or not isinstance(n_kv_head, int) or n_head < 1 or n_kv_head < 1:
        raise UserError(f"{cfg_json} has num_attention_heads {n_head!r} and num_key_value_heads {n_kv_head!r}; "
                        "they must be positive integers")
    out = {k: v for k, v in sd.items() if ".qkv_proj." not in k and ".gate_up_proj." not in k}
    for k, w in sd.items():
        prefix = k.rsplit(".", 2)[0]  # "layers.{i}.self_attn" or "layers.{i}.mlp"
        if k.endswith(".qkv_proj.weight"):
            rows = w.shape[0]
            if rows % (n_head + 2 * n_kv_head):
                raise UserError(f"{cfg_json.parent}: tensor {k} has {rows} rows, which do not split into "
                                f"{n_head} query heads and twice {n_kv_head} key/value heads of one width")
            D = rows // (n_head + 2 * n_kv_head)
            _split_rows(out, prefix, k, w, [n_head * D, n_kv_head * D, n_kv_head * D], ("q_proj", "k_proj", "v_proj"),
                        packed)
        elif k.endswith(".gate_up_proj.weight"):
            if w.shape[0] % 2:
                raise UserError(f"{cfg_json.parent}: tensor {k} has {w.shape[0]} rows, not gate's and up's alike")
            _split_rows(out, prefix, k, w, [w.shape[0] // 2] * 2, ("gate_proj", "up_proj"), packed)
        elif k.endswith((".qkv_proj.bias", ".gate_up_proj.bias")):
            raise UserError(f"{cfg_json.parent}: tensor {k} is a bias, which Phi-3's projections do not have")
    return out


def _rotary_dim(d: dict, rope: tuple, head_dim: int, cfg_json) -> int:
    """GPTConfig.rotary_dim of partial_rotary_factor (in `rope_scaling or rope_parameters`, or top level, as
    transformers 5 reads it: rope_field; rope: read_rope_parameters' (object, key)): 0 for the whole head."""
    p, where = rope
    factor = rope_field(d, p, where, "partial_rotary_factor", ("partial_rotary_factor",), 1.0, cfg_json, "Phi-3")
    return partial_rotary_dim(factor, head_dim, f"{cfg_json} has")


def _rope(d: dict, rope: tuple, cfg_json) -> tuple:
    """(RoPE's base, GPTConfig.rope_scaling): none, or LongRoPE's factor lists with
    original_max_position_embeddings (top level in Phi-3's configs) and the optional factor and
    attention_factor. rope: read_rope_parameters' (object, key)."""
    # as transformers 5's Phi3Config: `rope_scaling or rope_parameters` (the Hub's Phi-3.5 and Phi-4-mini say
    # rope_scaling and a flat rope_theta), the base from it, else the flat one (refused where they disagree)
    p, where = rope
    theta = checked_rope_base(rope_field(d, p, where, "rope_theta", ("rope_theta",), 10000.0, cfg_json, "Phi-3"),
                              f"{cfg_json} has rope_theta")
    kind = p.get("rope_type", p.get("type", "default"))
    if kind != "default":
        if kind not in LONGROPE_ALIASES:
            raise UserError(f"{cfg_json} has {where} of type {kind!r}; Phi-3's RoPE is unscaled ('default') or "
                            "LongRoPE ('longrope', or 'su' / 'yarn' as older Phi-3 configs say)")
        spec = {"rope_type": "longrope",
                "original_max_position_embeddings": p.get("original_max_position_embeddings",
                                                          d.get("original_max_position_embeddings", 4096))}
        for key in ("short_factor", "long_factor", "factor", "attention_factor"):
            if p.get(key) is not None:
                spec[key] = p[key]
        for key in ("short_factor", "long_factor"):
            if key not in spec:
                raise UserError(f"{cfg_json} has {where} of type {kind!r} without {key}; LongRoPE needs both lists")
        return theta, check_rope_scaling(spec, f"{cfg_json} has {where}")
    return theta, None


def _check_hf_config(cfg_json: Path, sd: dict) -> GPTConfig:
    """The GPTConfig of a Phi-3 config.json, checked against the (unfused) tensors beside it."""
    d = read_json_object(cfg_json)
    if d.get("model_type") != MODEL_TYPE:
        raise UserError(f"{cfg_json} says model_type {d.get('model_type')!r}; a Phi-3 folder's is {MODEL_TYPE!r}")
    shapes = hf_shapes(d, sd, cfg_json, "Phi-3")
    head_dim = shapes[6]
    if d.get("hidden_act", "silu") != "silu":
        raise UserError(f"{cfg_json} has hidden_act {d['hidden_act']!r}; this model's SwiGLU computes 'silu' only")
    context = d.get("max_position_embeddings", 4096)  # Phi3Config's defaults where config.json says nothing
    window = d.get("sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise UserError(f"{cfg_json} has sliding_window {window!r}; it must be a positive integer or null")
    # it hides nothing within the context: no window (a context that is no integer is GPTConfig's to name below)
    if window is not None and is_int(context) and window >= context:
        window = None
    rope = read_rope_parameters(d, cfg_json)  # (read once: the base, the scaling and the rotary share)
    theta, scaling = _rope(d, rope, cfg_json)
    rotary = _rotary_dim(d, rope, head_dim, cfg_json)
    return config_json_gptconfig(
        cfg_json, LLAMA_KEYS, **shape_fields(shapes, sd, d, cfg_json), context_length=context, bias=False,
        attention_window=window or 0, position_encoding="rope", rope_theta=theta, rope_scaling=scaling,
        rotary_dim=rotary, norm="rmsnorm", norm_eps=d.get("rms_norm_eps", 1e-5), mlp="swiglu")


def load_phi3_safetensors(path) -> GPTModel:
    """GPTModel with the weights of a Hugging Face Phi-3 (Phi-4) model.safetensors (or shard index) and its
    config.json beside it."""
    from tritongpt.train.hf_quant import folder_dequantized, folder_quantization, int4_linears, model_with_int4
    path = weights_file(path, "Phi-3")
    cfg_json = path.parent / "config.json"
    # a GPTQ or AWQ folder: 4-bit, read as int4 (hf_quant.py; 8-bit GPTQ as int8 where it maps), its fused qkv_proj
    # and gate_up_proj quantized as one linear each and split after (_split_rows); an FP8 one, or a GPTQ one of other
    # bits, dequantized (fused, as it was quantized) before the split; any other refused by name
    spec, dequant = folder_quantization(cfg_json)
    sd = _read_tensors(path, prefix="model.", quantization_read=spec is not None or dequant is not None)
    if dequant is not None:
        sd = folder_dequantized(sd, dequant, path, prefix="model.")
    packed = None
    if spec is not None:
        sd, packed, group_size = int4_linears(sd, spec, path)
        if packed is None:  # (4-bit groups no int4 group size divides: read dequantized, a float model)
            spec = None
    sd = _unfused(sd, read_json_object(cfg_json), cfg_json, packed)
    cfg = _check_hf_config(cfg_json, sd)
    if spec is not None:
        return model_with_int4(cfg, lambda: _our_tensors(sd, cfg), sd, packed, group_size, path)
    return model_with_tensors(cfg, lambda: _our_tensors(sd, cfg), path)


# -- export: the inverse of _unfused and _our_tensors -----------------------------------------------------
def is_phi3_shaped(cfg: GPTConfig) -> bool:
    """A Llama-shaped model that only Phi-3's folder can say: a partial rotary or LongRoPE. (Any other Phi-3
    is written as the Llama or Mistral it computes the same logits as.)"""
    return bool(cfg.rotary_dim) or (cfg.rope_scaling or {}).get("rope_type") == "longrope"


def refuse_not_phi3(model: GPTModel, what: str) -> None:
    """Phi-3 is a Llama whose sliding window, if any, covers every layer, with neither biases nor q/k norms."""
    cfg = model.config
    refuse_per_head_qk(cfg, "Phi-3", what)
    for differs, why in ((cfg.bias or cfg.qkv_bias_only, "has biases, where Phi-3's projections have none"),
                         (cfg.qk_norm, "normalizes q and k (qk_norm), which Phi-3 does not"),
                         (bool(cfg.nope_layers), f"has layers without RoPE ({cfg.nope_layers}), where Phi-3 rotates "
                          "in every layer"),
                         ((cfg.rope_scaling or {}).get("rope_type", "longrope") != "longrope",
                          f"scales RoPE as {(cfg.rope_scaling or {}).get('rope_type')!r}, where Phi-3's config takes "
                          "LongRoPE only"),
                         (cfg.rope_scaling is not None and cfg.head_dim * cfg.n_head != cfg.n_embd,
                          f"has heads of {cfg.head_dim} and LongRoPE, whose factor lists Phi3Config sizes by "
                          "n_embd / n_head (a Phi-3 with wider or narrower heads rotates them unscaled only)"),
                         (bool(cfg.attention_window) and cfg.window_layers != "all",
                          f"has local attention in layers {cfg.window_layers} only, where Phi-3's sliding window "
                          "covers every layer")):
        if differs:
            raise UserError(f"this model {why}: it cannot be exported as {what}")
    refuse_not_llama(model, what, "Phi-3")


def _hf_tensors(model: GPTModel) -> dict:
    """Our parameters under Phi3ForCausalLM's names (q, k and v fused into qkv_proj, gate and up into
    gate_up_proj), the padding rows dropped."""
    cfg = model.config
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    V = cfg.vocab_size
    hf = {"embed_tokens.weight": sd["tok_emb.weight"][:V], "norm.weight": sd["final_norm.weight"]}
    for i in range(cfg.n_layer):
        ours, theirs = f"trf_blocks.{i}.", f"layers.{i}."
        hf.update({theirs + "input_layernorm.weight": sd[ours + "norm1.weight"],
                   theirs + "post_attention_layernorm.weight": sd[ours + "norm2.weight"],
                   theirs + "self_attn.qkv_proj.weight": torch.cat([sd[ours + f"att.{w}.weight"]
                                                                   for w in ("W_query", "W_key", "W_value")]),
                   theirs + "self_attn.o_proj.weight": sd[ours + "att.out_proj.weight"],
                   theirs + "mlp.gate_up_proj.weight": torch.cat([sd[ours + "ff.w_gate.weight"],
                                                                 sd[ours + "ff.w_up.weight"]]),
                   theirs + "mlp.down_proj.weight": sd[ours + "ff.w_down.weight"]})
    out = {"model." + k: v for k, v in hf.items()}
    if not cfg.tie_weights:
        out["lm_head.weight"] = sd["out_head.weight"][:V]
    return {k: v.to("cpu", memory_format=torch.contiguous_format, copy=True) for k, v in out.items()}


def hf_config(cfg: GPTConfig, eos_token_id: int | None = None) -> dict:
    """Phi3Config fields for this model: what _check_hf_config reads back. RoPE is written both ways:
    rope_parameters (transformers 5) and rope_theta / rope_scaling (4.x)."""
    scaling = dict(cfg.rope_scaling or {})
    factor = (cfg.rotary_dim or cfg.head_dim) / cfg.head_dim
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": factor, **scaling}
    return {"model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.context_length, "hidden_size": cfg.n_embd,
            "intermediate_size": cfg.ff_hidden, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
            "rms_norm_eps": cfg.norm_eps,
            "original_max_position_embeddings": scaling.get("original_max_position_embeddings", cfg.context_length),
            "rope_theta": cfg.rope_theta, "partial_rotary_factor": factor, "rope_parameters": rope,
            "rope_scaling": cfg.rope_scaling, "sliding_window": cfg.attention_window or None,
            "attention_dropout": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "tie_word_embeddings": cfg.tie_weights,
            "bos_token_id": eos_token_id, "eos_token_id": eos_token_id, "pad_token_id": None}


def export_phi3(model: GPTModel, out_dir, eos_token_id: int | None = None, overwrite: bool = False) -> list:
    """Write model as a Hugging Face Phi-3 folder: model.safetensors and config.json, which
    transformers.AutoModelForCausalLM.from_pretrained(out_dir) and load_checkpoint both read. Returns the
    paths written; refuses to replace them unless overwrite."""
    refuse_not_phi3(model, "a Phi-3 folder")
    return write_hf_folder(out_dir, lambda: _hf_tensors(model), hf_config(model.config, eos_token_id), overwrite)
