"""OLMo 2 and OLMo 3 weights (AI2's fully open models: Hugging Face's Olmo2ForCausalLM and
Olmo3ForCausalLM) into GPTModel, and back out.

An OLMo 2 is a Llama (RMSNorm, SwiGLU, RoPE, no biases, the tensors under Llama's names) with two
differences, each a GPTConfig field:
- its blocks normalize after each sublayer only: x + norm(attention(x)), then x + norm(mlp(x)), with
  no input norms (post_norms True, pre_norms False; the norms are post_attention_layernorm and
  post_feedforward_layernorm, and the final norm stays);
- its q/k norm is over the whole projection, n_head * head_dim for q and n_kv_head * head_dim for k,
  before the heads split and before RoPE (qk_norm with qk_norm_width "all"), where Qwen3's and
  Gemma 3's normalize each head.
OLMo 3 is OLMo 2 with a sliding window in the layers layer_types names "sliding_attention" (three of
every four: attention_window and window_layers as a list), and RoPE scaled (YaRN, for 65K positions)
in the full-attention layers only (rope_scaling for those, the local ones unscaled: rope_local_theta).
Olmo2RMSNorm multiplies by its weight in fp32 and casts after, ours casts then multiplies: the same in
fp32 and float64, a rounding apart in bf16.
What this model does not compute is refused by name: attention biases, another activation, another
RoPE scaling, a head_dim the weights do not have, a scaled local RoPE.
"""
import math
from pathlib import Path

import torch

from tritongpt.errors import UserError, note, read_json_object
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.gpt2_weights import (_read_tensors, config_flag, config_json_gptconfig, model_with_tensors,
                                          refuse_moe_touches, refuse_neox_touches, refuse_phi3_touches, weights_file,
                                          write_hf_folder)
from tritongpt.train.llama_weights import (LLAMA_KEYS, _rope_theta, full_attention_rope, hf_shapes, rope_dict,
                                           shape_fields, without_one_rope_object)

FAMILIES = {"olmo2": "Olmo2ForCausalLM", "olmo3": "Olmo3ForCausalLM"}
_NAMES = {"olmo2": "OLMo 2", "olmo3": "OLMo 3"}
# each block's tensors: ours, then Hugging Face's (under "layers.{i}."); no input norms
_LAYER = (("att.W_query", "self_attn.q_proj"), ("att.W_key", "self_attn.k_proj"), ("att.W_value", "self_attn.v_proj"),
          ("att.out_proj", "self_attn.o_proj"), ("att.q_norm", "self_attn.q_norm"), ("att.k_norm", "self_attn.k_norm"),
          ("post_att_norm", "post_attention_layernorm"), ("post_ff_norm", "post_feedforward_layernorm"),
          ("ff.w_gate", "mlp.gate_proj"), ("ff.w_up", "mlp.up_proj"), ("ff.w_down", "mlp.down_proj"))
OLMO3_THETA = 500_000.0  # Olmo3Config's default_theta, which transformers gives the local layers of a flat config


def is_olmo_file(path) -> bool:
    """A Hugging Face OLMo 2 or 3 model.safetensors (or shard index): its config.json says so."""
    cfg_json = Path(path).parent / "config.json"
    return cfg_json.is_file() and read_json_object(cfg_json).get("model_type") in FAMILIES


def _sliding_window(d: dict, kind: str, n_layer: int, cfg_json) -> tuple:
    """(attention_window, window_layers): OLMo 2 has no window; OLMo 3 slides sliding_window (4096 when
    absent) over the layers layer_types names "sliding_attention" (without one: all but every 4th)."""
    if kind == "olmo2":
        return 0, "all"
    types = d.get("layer_types") or ["sliding_attention" if (i + 1) % 4 else "full_attention" for i in range(n_layer)]
    if not isinstance(types, list) or len(types) != n_layer or \
            not set(types) <= {"sliding_attention", "full_attention"}:
        raise UserError(f"{cfg_json} has layer_types {types!r}; it must list 'sliding_attention' or "
                        f"'full_attention' for each of the {n_layer} layers")
    local = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if not local:
        return 0, "all"
    window = d.get("sliding_window", 4096)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise UserError(f"{cfg_json} has sliding_window {window!r} and sliding layers {local}; it must be a "
                        "positive integer")
    return window, ",".join(map(str, local))


def _rope(d: dict, kind: str, window: int, cfg_json) -> tuple:
    """(rope_theta, rope_scaling, rope_local_theta). OLMo 3's two RoPEs come as transformers 5's
    rope_parameters per layer type, or flat (rope_theta, rope_scaling: the Hub's), the scaling the
    full-attention layers' only."""
    params = rope_dict(d, "rope_parameters", cfg_json)
    if kind == "olmo3" and params and not {"full_attention", "sliding_attention"} & set(params):
        d = without_one_rope_object(d, params, cfg_json, "Olmo3Config", OLMO3_THETA)
        params = {}
    if kind == "olmo2" or "full_attention" not in params:
        # Olmo3Config's base when none is said is 500000, Olmo2Config's (as Llama's) 10000
        # (passed as the default, not as a flat rope_theta: _rope_theta refuses a flat one that disagrees with
        # rope_parameters', which an injected default would do for a file that says its base there only)
        theta, scaling = _rope_theta(d, cfg_json, 10000.0 if kind == "olmo2" else OLMO3_THETA)
        if kind == "olmo2" or not window:
            return theta, scaling, 0.0
        if theta != OLMO3_THETA:  # Olmo3Config gives the local layers its default when rope_theta is flat
            note(f"{cfg_json} says rope_theta {theta:g} without rope_parameters per layer type: read for every layer, "
                 f"where transformers' Olmo3Config rotates the sliding layers with {OLMO3_THETA:g}")
        return theta, scaling, theta if scaling else 0.0
    full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
    # (Olmo3Config reads these as Gemma3TextConfig does; its base when none is said is 500000)
    theta, scaling, full = full_attention_rope(d, full, cfg_json, OLMO3_THETA)
    # every layer scaled alike (our export of such a model); compared with full_attention as read, a rope_scaling
    # merged in: that scales the full-attention layers only, an unscaled sliding_attention stays so
    if scaling is not None and local == full:
        return theta, scaling, 0.0
    if local.get("rope_type", "default") != "default":
        raise UserError(f"{cfg_json} scales the sliding layers' RoPE ({local['rope_type']!r}); this model rotates "
                        "them unscaled (rope_local_theta)")
    local_theta = local.get("rope_theta", OLMO3_THETA)
    if isinstance(local_theta, bool) or not isinstance(local_theta, (int, float)) or \
            not math.isfinite(local_theta) or local_theta <= 0:
        raise UserError(f"{cfg_json} has a sliding layers' RoPE base {local_theta!r}; it must be a number > 0")
    if not window or (local_theta == theta and scaling is None):
        return theta, scaling, 0.0
    return theta, scaling, float(local_theta)


def _check_hf_config(cfg_json: Path, sd: dict) -> GPTConfig:
    """The GPTConfig of an OLMo 2 or 3 config.json, checked against the tensors beside it; what this
    model does not compute refused by name."""
    d = read_json_object(cfg_json)
    kind = d.get("model_type")
    if kind not in FAMILIES:
        raise UserError(f"{cfg_json} says model_type {kind!r}; an OLMo folder's is {' or '.join(FAMILIES)}")
    shapes = hf_shapes(d, sd, cfg_json, _NAMES[kind])
    n_layer = shapes[3]
    if d.get("hidden_act", "silu") != "silu":
        raise UserError(f"{cfg_json} has hidden_act {d['hidden_act']!r}; this model's SwiGLU computes 'silu' only")
    if config_flag(d, "attention_bias", False, cfg_json):
        raise UserError(f"{cfg_json} has attention_bias true; {_NAMES[kind]}'s projections have no biases here")
    for key in ("input_layernorm", "pre_feedforward_layernorm"):  # another family's block under OLMo's name
        if f"layers.0.{key}.weight" in sd:
            raise UserError(f"{cfg_json.parent}: tensor layers.0.{key} is not {_NAMES[kind]}'s, whose blocks "
                            "normalize after each sublayer only")
    window, window_layers = _sliding_window(d, kind, n_layer, cfg_json)
    theta, scaling, local_theta = _rope(d, kind, window, cfg_json)
    # Olmo2Config's and Olmo3Config's defaults where config.json says nothing: 2048 positions, eps 1e-5
    return config_json_gptconfig(
        cfg_json, LLAMA_KEYS, **shape_fields(shapes, sd, d, cfg_json),
        context_length=d.get("max_position_embeddings", 2048), qk_norm=True, qk_norm_width="all", bias=False,
        attention_window=window, window_layers=window_layers, position_encoding="rope", rope_theta=theta,
        rope_scaling=scaling, rope_local_theta=local_theta, norm="rmsnorm",
        norm_eps=d.get("rms_norm_eps", 1e-5), mlp="swiglu", post_norms=True, pre_norms=False)


def _our_tensors(sd: dict, cfg: GPTConfig) -> dict:
    """Hugging Face OLMo tensors under our parameter names (KeyError: a tensor the file lacks)."""
    ours = {"tok_emb.weight": sd["embed_tokens.weight"], "final_norm.weight": sd["norm.weight"]}
    if not cfg.tie_weights:
        ours["out_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        for mine, theirs in _LAYER:
            ours[f"trf_blocks.{i}.{mine}.weight"] = sd[f"layers.{i}.{theirs}.weight"]
    return ours


def load_olmo_safetensors(path) -> GPTModel:
    """GPTModel with the weights of a Hugging Face OLMo 2 or 3 model.safetensors (or shard index) and
    its config.json beside it."""
    path = weights_file(path, "OLMo")
    sd = _read_tensors(path, prefix="model.")
    cfg = _check_hf_config(path.parent / "config.json", sd)
    return model_with_tensors(cfg, lambda: _our_tensors(sd, cfg), path)


# -- export: the inverse of _our_tensors -----------------------------------------------------------
def is_olmo_shaped(cfg: GPTConfig) -> bool:
    """Whether a model has one of OLMo's touches (no input norms, q/k norms over the whole projection):
    export writes it as an OLMo, or refuses."""
    return not cfg.pre_norms or (cfg.qk_norm and cfg.qk_norm_width == "all")


def hf_family(cfg: GPTConfig) -> str:
    """olmo3 with local attention, else olmo2."""
    return "olmo3" if cfg.attention_window else "olmo2"


def family_name(cfg: GPTConfig) -> str:
    return _NAMES[hf_family(cfg)]


def refuse_not_olmo(model: GPTModel, what: str) -> None:
    """What an OLMo of the family hf_family picks does not compute, by name."""
    cfg = model.config
    refuse_moe_touches(cfg, family_name(cfg), what)
    family = family_name(cfg)
    refuse_neox_touches(cfg, family, what)
    refuse_phi3_touches(cfg, family, what)
    for differs, why in ((cfg.position_encoding != "rope", f"{cfg.positions_said()}, where {family} rotates q "
                          "and k (RoPE)"),
                         (cfg.norm != "rmsnorm", f"normalizes with {cfg.norm}, where {family} has RMSNorms"),
                         (cfg.mlp != "swiglu", f"has a {cfg.mlp} MLP, where {family}'s is SwiGLU"),
                         (cfg.bias or cfg.qkv_bias_only, f"has biases, where {family}'s projections have none"),
                         (not cfg.scale_attention, f"does not scale its attention scores, which {family} does"),
                         (cfg.pre_norms, f"normalizes each sublayer's input (pre_norms), which {family} does not"),
                         (not cfg.post_norms, f"does not normalize each sublayer's output (post_norms), which "
                          f"{family} does"),
                         (not cfg.qk_norm or cfg.qk_norm_width != "all", f"does not normalize the whole q and k "
                          f"(qk_norm with qk_norm_width 'all'), which {family} does"),
                         (cfg.nope_layers != "", f"has layers without RoPE ({cfg.nope_layers}), which {family} "
                          "does not"),
                         (cfg.scale_embeddings, f"scales its token embeddings, which {family} does not"),
                         (bool(cfg.logit_softcap), f"soft-caps its logits, which {family} does not"),
                         (bool(cfg.attn_softcap), f"soft-caps its attention scores, which {family} does not"),
                         (bool(cfg.attention_scale_width), f"scales its attention scores by "
                          f"1/sqrt({cfg.attention_scale_width}), where {family} scales them by 1/sqrt(head_dim)")):
        if differs:
            raise UserError(f"this model {why}: it cannot be exported as {what}")


def _hf_tensors(model: GPTModel) -> dict:
    """Our parameters under OLMo's names, the padding rows dropped."""
    cfg = model.config
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    V = cfg.vocab_size
    hf = {"embed_tokens.weight": sd["tok_emb.weight"][:V], "norm.weight": sd["final_norm.weight"]}
    for i in range(cfg.n_layer):
        for mine, theirs in _LAYER:
            hf[f"layers.{i}.{theirs}.weight"] = sd[f"trf_blocks.{i}.{mine}.weight"]
    out = {"model." + k: v for k, v in hf.items()}
    if not cfg.tie_weights:
        out["lm_head.weight"] = sd["out_head.weight"][:V]
    return {k: v.to("cpu", memory_format=torch.contiguous_format, copy=True) for k, v in out.items()}


def hf_config(cfg: GPTConfig, eos_token_id: int | None = None) -> dict:
    """Olmo2Config (Olmo3Config) fields for this model: what _check_hf_config reads back. RoPE is written
    both ways: rope_parameters (transformers 5: per layer type for OLMo 3) and rope_theta / rope_scaling (4.x)."""
    kind = hf_family(cfg)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})}
    d = {"model_type": kind, "architectures": [FAMILIES[kind]], "vocab_size": cfg.vocab_size,
         "max_position_embeddings": cfg.context_length, "hidden_size": cfg.n_embd,
         "intermediate_size": cfg.ff_hidden, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
         "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
         "rms_norm_eps": cfg.norm_eps, "attention_bias": False, "attention_dropout": 0.0,
         "tie_word_embeddings": cfg.tie_weights, "bos_token_id": None, "eos_token_id": eos_token_id,
         "pad_token_id": None, "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling}
    if kind == "olmo2":
        return {**d, "rope_parameters": rope}
    local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
    if not cfg.rope_local_theta:  # one RoPE for every layer: the local ones as the global ones
        local = rope
    return {**d, "rope_parameters": {"full_attention": rope, "sliding_attention": local},
            "sliding_window": cfg.attention_window,
            "layer_types": ["sliding_attention" if cfg.layer_window(i) else "full_attention"
                            for i in range(cfg.n_layer)]}


def export_olmo(model: GPTModel, out_dir, eos_token_id: int | None = None, overwrite: bool = False) -> list:
    """Write model as a Hugging Face OLMo 2 or OLMo 3 folder (hf_family): model.safetensors and config.json,
    which transformers.AutoModelForCausalLM.from_pretrained(out_dir) and load_checkpoint both read.
    Returns the paths written; refuses to replace them unless overwrite."""
    refuse_not_olmo(model, f"an {family_name(model.config)} folder")
    cfg = model.config
    if cfg.rope_scaling and not cfg.rope_local_theta and any(cfg.layer_window(i) for i in range(cfg.n_layer)):
        # the flat keys say the full-attention layers' scaling only (the local ones unscaled): no flat form says this
        note(f"this model scales the sliding-window layers' RoPE too ({cfg.rope_scaling.get('rope_type')}): "
             "transformers 5 reads that from config.json's rope_parameters, but a reader of the flat keys alone "
             "(transformers 4's Olmo3) rotates those layers unscaled, another model")
    return write_hf_folder(out_dir, lambda: _hf_tensors(model), hf_config(model.config, eos_token_id), overwrite)
