"""EXAONE 4.0 weights (LG AI Research's EXAONE-4.0-1.2B and -32B: Hugging Face's Exaone4ForCausalLM, model_type
"exaone4") into GPTModel, and back out.

An EXAONE 4 is a Llama (RMSNorm, SwiGLU, grouped-query attention, no biases, the tensors under OLMo 2's names)
whose differences are each a GPTConfig field:
- its blocks normalize after each sublayer only, x + norm(attention(x)), then x + norm(mlp(x)), with no input
  norms (OLMo 2's post_norms True, pre_norms False: post_attention_layernorm and post_feedforward_layernorm);
- each head's q and k RMSNorm-ed over head_dim before RoPE (Qwen3's qk_norm, qk_norm_width "head");
- with a sliding_window, its layers are of two kinds (layer_types; the 32B's three sliding to one global): the
  sliding ones attend to the last sliding_window positions and rotate q and k, the global ones attend to the
  whole context without RoPE (Exaone4Attention rotates `if self.sliding_window is None or self.is_sliding`):
  attention_window and window_layers, and nope_layers the global ones. Without a window (sliding_window null)
  every layer is global and every layer rotates.
One RoPE (with the 32B's Llama 3 scaling, say) for every layer that rotates: rope_theta and rope_scaling.
What this model does not compute is refused by name: another activation, biases, another RoPE scaling, a head_dim
the weights do not have, and the layer_types transformers' Exaone4Config fails on (sliding layers without a
window, no layer_types where its pattern cannot make them).
"""
from pathlib import Path

from tritongpt._types import is_int
from tritongpt.errors import UserError, read_json_object
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.gpt2_weights import (_read_tensors, config_json_gptconfig, model_with_tensors,
                                          refuse_moe_touches, refuse_neox_touches, refuse_phi3_touches, weights_file,
                                          write_hf_folder)
from tritongpt.train.llama_weights import LLAMA_KEYS, _rope_theta, hf_shapes, shape_fields
# OLMo's tensor names, both ways: only the q/k norms' widths differ
from tritongpt.train.olmo_weights import _hf_tensors, _our_tensors

MODEL_TYPE, ARCH, NAME = "exaone4", "Exaone4ForCausalLM", "EXAONE 4"


def is_exaone4_file(path) -> bool:
    """A Hugging Face EXAONE 4 model.safetensors (or shard index): its config.json says so."""
    cfg_json = Path(path).parent / "config.json"
    return cfg_json.is_file() and read_json_object(cfg_json).get("model_type") == MODEL_TYPE


def _layers(d: dict, n_layer: int, cfg_json) -> tuple:
    """(attention_window, window_layers, nope_layers) as Exaone4Config and Exaone4Attention read config.json:
    sliding_window (4096 when absent; null: none), layer_types (without one, every sliding_window_pattern-th
    layer global, the pattern 4 when absent), the global layers without RoPE where there is a window."""
    window = d.get("sliding_window", 4096)
    if window is not None and (isinstance(window, bool) or not is_int(window) or window < 1):
        raise UserError(f"{cfg_json} has sliding_window {window!r}; it must be a positive integer or null")
    types = d.get("layer_types")
    if types is None:
        # Exaone4Config's __post_init__: a null window makes the pattern 0, and the pattern is taken modulo (an int
        # only: its string form "LLLG" is a TypeError there, 0 a ZeroDivisionError): no model to read
        pattern = 0 if window is None else d.get("sliding_window_pattern", 4)
        if isinstance(pattern, bool) or not is_int(pattern) or pattern < 1:
            why = "sliding_window null" if window is None else f"sliding_window_pattern {pattern!r}"
            raise UserError(f"{cfg_json} has no layer_types and {why}; transformers' Exaone4Config makes "
                            "layer_types from a positive integer pattern only (it fails on this): say layer_types")
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layer)]
    if not isinstance(types, list) or len(types) != n_layer or \
            not all(t in ("sliding_attention", "full_attention") for t in types):
        raise UserError(f"{cfg_json} has layer_types {types!r}; it must list 'sliding_attention' or "
                        f"'full_attention' for each of the {n_layer} layers")
    local = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if window is None:
        if local:  # (transformers' sliding mask needs the width: it fails)
            raise UserError(f"{cfg_json} has sliding_window null and sliding layers {local} (layer_types); say the "
                            "window's width, or make them 'full_attention'")
        return 0, "all", ""  # no window: every layer global, and every layer rotates
    glob = [i for i in range(n_layer) if i not in local]
    # a window: the global layers are NoPE ones (all of them where layer_types names no sliding layer)
    return (window if local else 0), ",".join(map(str, local)) or "all", ",".join(map(str, glob))


def _check_hf_config(cfg_json: Path, sd: dict) -> GPTConfig:
    """The GPTConfig of an EXAONE 4 config.json, checked against the tensors beside it; what this model does not
    compute refused by name."""
    d = read_json_object(cfg_json)
    shapes = hf_shapes(d, sd, cfg_json, NAME)
    if d.get("hidden_act", "silu") != "silu":
        raise UserError(f"{cfg_json} has hidden_act {d['hidden_act']!r}; this model's SwiGLU computes 'silu' only")
    # Exaone4Config has no attention_bias: its projections never have biases, and transformers drops any in the file
    for key in ("self_attn.q_proj.bias", "mlp.gate_proj.bias", "input_layernorm.weight",
                "pre_feedforward_layernorm.weight"):
        if f"layers.0.{key}" in sd:
            raise UserError(f"{cfg_json.parent}: tensor layers.0.{key} is not {NAME}'s, whose projections have no "
                            "biases and whose blocks normalize after each sublayer only")
    window, window_layers, nope = _layers(d, shapes[3], cfg_json)
    # Exaone4Config's defaults where config.json says nothing: base 10000, 2048 positions, eps 1e-5
    theta, scaling = _rope_theta(d, cfg_json, 10000.0)
    return config_json_gptconfig(
        cfg_json, LLAMA_KEYS, **shape_fields(shapes, sd, d, cfg_json),
        context_length=d.get("max_position_embeddings", 2048), qk_norm=True, qk_norm_width="head", bias=False,
        attention_window=window, window_layers=window_layers, nope_layers=nope, position_encoding="rope",
        rope_theta=theta, rope_scaling=scaling, norm="rmsnorm", norm_eps=d.get("rms_norm_eps", 1e-5), mlp="swiglu",
        post_norms=True, pre_norms=False)


def load_exaone4_safetensors(path) -> GPTModel:
    """GPTModel with the weights of a Hugging Face EXAONE 4 model.safetensors (or shard index) and its config.json."""
    path = weights_file(path, NAME)
    sd = _read_tensors(path, prefix="model.")
    cfg = _check_hf_config(path.parent / "config.json", sd)
    return model_with_tensors(cfg, lambda: _our_tensors(sd, cfg), path)


# -- export: the inverse of _our_tensors -----------------------------------------------------------
def is_exaone4_shaped(cfg: GPTConfig) -> bool:
    """No input norms with each head's q and k normalized: export writes it as an EXAONE 4 (or refuses). (OLMo's
    have no input norms either, and normalize q and k over all heads at once: qk_norm_width "all".)"""
    return not cfg.pre_norms and cfg.qk_norm and cfg.qk_norm_width == "head"


def _rope_layers_said(cfg: GPTConfig) -> bool:
    """Whether the layers that rotate are the ones EXAONE 4 rotates: the sliding ones with a window, every one
    without (or none: a window written over no sliding layer makes every layer NoPE)."""
    rotates = [cfg.layer_has_rope(i) for i in range(cfg.n_layer)]
    if cfg.attention_window:
        return rotates == [bool(cfg.layer_window(i)) for i in range(cfg.n_layer)]
    return all(rotates) or not any(rotates)


def refuse_not_exaone4(model: GPTModel, what: str) -> None:
    """What an EXAONE 4 does not compute, by name."""
    cfg = model.config
    refuse_moe_touches(cfg, NAME, what)
    refuse_neox_touches(cfg, NAME, what)
    refuse_phi3_touches(cfg, NAME, what)
    rotates = ",".join(str(i) for i in range(cfg.n_layer) if cfg.layer_has_rope(i)) or "none"
    for differs, why in ((cfg.position_encoding != "rope", f"{cfg.positions_said()}, where {NAME} rotates q and k "
                          "(RoPE)"),
                         (cfg.norm != "rmsnorm", f"normalizes with {cfg.norm}, where {NAME} has RMSNorms"),
                         (cfg.mlp != "swiglu", f"has a {cfg.mlp} MLP, where {NAME}'s is SwiGLU"),
                         (cfg.bias or cfg.qkv_bias_only, f"has biases, where {NAME}'s projections have none"),
                         (not cfg.scale_attention, f"does not scale its attention scores, which {NAME} does"),
                         (cfg.pre_norms, f"normalizes each sublayer's input (pre_norms), which {NAME} does not"),
                         (not cfg.post_norms, f"does not normalize each sublayer's output (post_norms), which "
                          f"{NAME} does"),
                         (not cfg.qk_norm or cfg.qk_norm_width != "head", f"does not normalize each head's q and k "
                          f"(qk_norm with qk_norm_width 'head'), which {NAME} does"),
                         (bool(cfg.rope_local_theta), f"rotates its local layers with a RoPE base of their own "
                          f"(rope_local_theta {cfg.rope_local_theta:g}), where {NAME}'s layers share one"),
                         (cfg.position_encoding == "rope" and not _rope_layers_said(cfg),
                          f"rotates q and k in layers {rotates} (nope_layers {cfg.nope_layers!r}), where {NAME} "
                          "rotates them in its sliding-window layers only, or without a window in every layer"),
                         (cfg.scale_embeddings, f"scales its token embeddings, which {NAME} does not"),
                         (bool(cfg.logit_softcap), f"soft-caps its logits, which {NAME} does not"),
                         (bool(cfg.attn_softcap), f"soft-caps its attention scores, which {NAME} does not"),
                         (bool(cfg.attention_scale_width), f"scales its attention scores by "
                          f"1/sqrt({cfg.attention_scale_width}), where {NAME} scales them by 1/sqrt(head_dim)")):
        if differs:
            raise UserError(f"this model {why}: it cannot be exported as {what}")


def hf_config(cfg: GPTConfig, eos_token_id: int | None = None) -> dict:
    """Exaone4Config fields for this model: what _check_hf_config reads back. RoPE is written both ways:
    rope_parameters (transformers 5) and rope_theta / rope_scaling (4.x). layer_types always (the pattern is
    only its default)."""
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})}
    nope = not any(cfg.layer_has_rope(i) for i in range(cfg.n_layer))
    # a window makes the global layers NoPE: none without one, unless no layer rotates (a window over no sliding
    # layer says that; its width then bounds nothing)
    window = cfg.attention_window or (cfg.context_length if nope else None)
    return {"model_type": MODEL_TYPE, "architectures": [ARCH], "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.context_length, "hidden_size": cfg.n_embd,
            "intermediate_size": cfg.ff_hidden, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
            "rms_norm_eps": cfg.norm_eps, "attention_dropout": 0.0, "tie_word_embeddings": cfg.tie_weights,
            "bos_token_id": None, "eos_token_id": eos_token_id, "pad_token_id": None,
            "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling, "rope_parameters": rope,
            "sliding_window": window, "sliding_window_pattern": None,
            "layer_types": ["sliding_attention" if cfg.layer_window(i) else "full_attention"
                            for i in range(cfg.n_layer)]}


def export_exaone4(model: GPTModel, out_dir, eos_token_id: int | None = None, overwrite: bool = False) -> list:
    """Write model as a Hugging Face EXAONE 4 folder: model.safetensors and config.json, which
    transformers.AutoModelForCausalLM.from_pretrained(out_dir) and load_checkpoint both read. Returns the paths
    written; refuses to replace them unless overwrite."""
    refuse_not_exaone4(model, f"an {NAME} folder")
    return write_hf_folder(out_dir, lambda: _hf_tensors(model), hf_config(model.config, eos_token_id), overwrite)
