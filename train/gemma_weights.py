"""Gemma weights (Hugging Face's GemmaForCausalLM, Gemma2ForCausalLM and Gemma3ForCausalLM: Gemma 3
270M and 1B, the text-only ones) into GPTModel, and back out.

A Gemma is a Llama-shaped GPTModel (RMSNorm, RoPE, no biases, grouped-query attention, heads of
their own width: 256) with Gemma's touches, each a GPTConfig field:
- the MLP is GeGLU, GELU (tanh) where Llama has silu: mlp "geglu";
- the token embeddings are multiplied by sqrt(n_embd): scale_embeddings;
- Gemma's RMSNorm multiplies by (1 + w), not w: its weights are read in as 1 + w and written out
  as w - 1 (in fp32 at least: bf16 would round w's last bits away next to the 1), so the model is
  the same function with our RMSNorm (and its kernel);
- Gemma 2 and 3 normalize each sublayer's output too before it joins the residual (their
  post_attention_layernorm and post_feedforward_layernorm; the MLP's input norm is then
  pre_feedforward_layernorm, where Gemma 1 and Llama call it post_attention_layernorm): post_norms;
- Gemma 2 and 3 slide a window over some layers (layer_types: Gemma 2's even ones, Gemma 3's five of
  every six): attention_window with window_layers the list of them;
- Gemma 3 normalizes each head's q and k (qk_norm, as Qwen3), and its local layers rotate with a
  RoPE base of their own, 10000, unscaled (rope_local_theta), the global ones with rope_theta 1e6
  and rope_scaling;
- Gemma 2 soft-caps its final logits (logit_softcap) and its attention scores (attn_logit_softcapping,
  50 in every published Gemma 2: attn_softcap; Gemma 3's config has the field too, which transformers
  never applies: read as no cap, noted);
- Gemma 2 and 3 scale the scores by query_pre_attn_scalar^-0.5, which is 1/sqrt(head_dim) except in
  the 27B models (144 and 168 over heads of 128): attention_scale_width.
The multimodal Gemma 3 (4B and up: Gemma3ForConditionalGeneration, model_type "gemma3") is read as
its language model: the text_config (with Gemma3TextConfig's defaults where the published configs
leave fields out) and the language_model's tensors; the vision tower and its projector are left out.
What this model does not compute is refused by name: bidirectional attention (EmbeddingGemma), other
activations, attention biases, a scaled local RoPE.
"""
import math
from pathlib import Path

import torch

from tritongpt.errors import UserError, note, read_json_object
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.gpt2_weights import (_read_tensors, config_flag, config_json_gptconfig, model_with_tensors,
                                          weights_file, write_hf_folder)
from tritongpt.train.llama_weights import (LLAMA_KEYS, _rope_theta, full_attention_rope, hf_shapes, rope_dict,
                                           rope_field, shape_fields, without_one_rope_object)

FAMILIES = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
_NAMES = {"gemma": "Gemma", "gemma2": "Gemma 2", "gemma3_text": "Gemma 3"}
# read too, as its language model (Gemma3ForConditionalGeneration's text_config): named here so that
# read_model_types, which lists what load_checkpoint reads, lists it
MODEL_TYPES = ("gemma3",)
_PROJECTIONS = (("att.W_query", "self_attn.q_proj"), ("att.W_key", "self_attn.k_proj"),
                ("att.W_value", "self_attn.v_proj"), ("att.out_proj", "self_attn.o_proj"),
                ("ff.w_gate", "mlp.gate_proj"), ("ff.w_up", "mlp.up_proj"), ("ff.w_down", "mlp.down_proj"))
# each block's norms, ours then Hugging Face's: Gemma 1's two are Llama's; Gemma 2's and 3's four
_NORMS_1 = (("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm"))
_NORMS_2 = (("norm1", "input_layernorm"), ("post_att_norm", "post_attention_layernorm"),
            ("norm2", "pre_feedforward_layernorm"), ("post_ff_norm", "post_feedforward_layernorm"))
_QK_NORMS = (("att.q_norm", "self_attn.q_norm"), ("att.k_norm", "self_attn.k_norm"))
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")  # transformers' names of GELU's tanh form


def is_gemma_file(path) -> bool:
    """A Hugging Face Gemma model.safetensors (or shard index): its config.json says a Gemma model_type
    (the multimodal "gemma3" too: its language model is read)."""
    cfg_json = Path(path).parent / "config.json"
    return cfg_json.is_file() and read_json_object(cfg_json).get("model_type") in (*FAMILIES, *MODEL_TYPES)


def _norms(cfg: GPTConfig) -> tuple:
    return _NORMS_2 if cfg.post_norms else _NORMS_1


def _sliding_window(d: dict, kind: str, n_layer: int, cfg_json) -> tuple:
    """(attention_window, window_layers) as transformers reads a Gemma config.json: Gemma 1 has no
    window; Gemma 2's and 3's slides over the layers layer_types names "sliding_attention" (without
    one: Gemma 2's even layers, Gemma 3's all but every sliding_window_pattern-th, 6)."""
    if kind == "gemma":
        return 0, "all"
    window = d.get("sliding_window", 4096)
    if window is None:
        return 0, "all"
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise UserError(f"{cfg_json} has sliding_window {window!r}; it must be a positive integer or null")
    pattern = 2 if kind == "gemma2" else d.get("sliding_window_pattern", d.get("_sliding_window_pattern", 6))
    types = d.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                     for i in range(n_layer)]
    if not isinstance(types, list) or len(types) != n_layer or \
            not set(types) <= {"sliding_attention", "full_attention"}:
        raise UserError(f"{cfg_json} has layer_types {types!r}; it must list 'sliding_attention' or "
                        f"'full_attention' for each of the {n_layer} layers")
    local = [i for i, t in enumerate(types) if t == "sliding_attention"]
    return (window, ",".join(map(str, local))) if local else (0, "all")


def _rope(d: dict, kind: str, cfg_json) -> tuple:
    """(rope_theta, rope_scaling, rope_local_theta). Gemma 3's two RoPEs come as transformers 5's
    rope_parameters per layer type ({"full_attention": ..., "sliding_attention": ...}), or as
    rope_theta, rope_scaling (the global layers') and rope_local_base_freq (the local ones')."""
    if kind != "gemma3_text":
        theta, scaling = _rope_theta(d, cfg_json)
        return theta, scaling, 0.0
    params = rope_dict(d, "rope_parameters", cfg_json)
    if params and not {"full_attention", "sliding_attention"} & set(params):
        d, params = without_one_rope_object(d, params, cfg_json, "Gemma3TextConfig", 1_000_000.0), {}
    full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
    # Gemma3TextConfig's global base when none is said is 1e6; a flat rope_local_base_freq that disagrees with
    # sliding_attention's base is two models too: refused by rope_field below
    theta, scaling, _ = full_attention_rope(d, full, cfg_json, 1_000_000.0)
    if local.get("rope_type", "default") != "default":
        raise UserError(f"{cfg_json} scales the local layers' RoPE ({local['rope_type']!r}); this model rotates "
                        "them unscaled (rope_local_theta)")
    local_theta = rope_field(d, local, 'rope_parameters["sliding_attention"]', "rope_theta", ("rope_local_base_freq",),
                             10_000.0, cfg_json, "Gemma 3")
    if isinstance(local_theta, bool) or not isinstance(local_theta, (int, float)) or \
            not math.isfinite(local_theta) or local_theta <= 0:
        raise UserError(f"{cfg_json} has a local RoPE base {local_theta!r}; it must be a number > 0")
    return theta, scaling, float(local_theta)


# Gemma3TextConfig's defaults for the fields a multimodal Gemma 3's text_config may leave out (the Hub's 4B
# says only its widths, layers, window and RoPE scaling): the 4B's heads, 8 of 256 over 4 KV heads. The
# vocabulary (262208) is the embedding's rows, read from the tensors.
GEMMA3_TEXT_DEFAULTS = {"model_type": "gemma3_text", "num_attention_heads": 8,
                        "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 131072,
                        "query_pre_attn_scalar": 256, "sliding_window": 4096, "rms_norm_eps": 1e-6}
# where a multimodal Gemma 3's language model keeps its tensors: the Hub's files (and transformers' saves),
# and transformers 5's in-memory names
_LANGUAGE_MODEL = ("language_model.model.", "model.language_model.")
_LANGUAGE_HEAD = ("language_model.lm_head.weight", "lm_head.weight")
_QUANTIZED_PARTS = (".qweight", ".qzeros", ".scales", ".g_idx")  # a GPTQ or AWQ linear's (hf_quant.py's _PARTS)


def _text_config(d: dict, cfg_json: Path) -> dict:
    """A config.json's language model fields: its own, or a multimodal Gemma 3's text_config over
    GEMMA3_TEXT_DEFAULTS."""
    if d.get("model_type") != "gemma3":
        return d
    text = d.get("text_config")
    if not isinstance(text, dict) or text.get("model_type", "gemma3_text") != "gemma3_text":
        raise UserError(f"{cfg_json} is a multimodal Gemma 3 without a Gemma 3 text_config (got "
                        f"{type(text).__name__ if not isinstance(text, dict) else text.get('model_type')!r}); "
                        "its language model's fields are read from there")
    out = {**GEMMA3_TEXT_DEFAULTS, **text, "model_type": "gemma3_text"}
    # the head is tied as the top level's tie_word_embeddings says (Gemma3Config's: default true, a null false):
    # Gemma3ForConditionalGeneration ties by its own config, never text_config's, so text_config's "false" beside
    # no head is the tied model there, and a top-level false the random head tied_head refuses. text_config's is
    # still Gemma3TextConfig's strict bool (a null or a string refused when transformers builds it)
    config_flag(out, "tie_word_embeddings", True, f"{cfg_json}'s text_config")
    out["tie_word_embeddings"] = config_flag(d, "tie_word_embeddings", True, cfg_json)
    return out


def _language_model_tensors(path: Path, quantization_read: bool = False) -> dict:
    """A multimodal Gemma 3's language model tensors, named as a Gemma3ForCausalLM's (without "model.");
    the vision tower's and the projector's are left out (quantization_read: _read_tensors')."""
    sd = _read_tensors(path, prefix="", quantization_read=quantization_read)
    # (a 4-bit embedding has a .qweight instead: found, so that hf_quant.int4_linears refuses it by name)
    prefix = next((p for p in _LANGUAGE_MODEL if p + "embed_tokens.weight" in sd or p + "embed_tokens.qweight" in sd),
                  None)
    if prefix is None:
        raise UserError(f"{path}: a multimodal Gemma 3 whose language model is not found: no "
                        f"{' or '.join(p + 'embed_tokens.weight' for p in _LANGUAGE_MODEL)}")
    out = {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}
    head = next((k for k in _LANGUAGE_HEAD if k in sd), None)
    if head is not None:
        out["lm_head.weight"] = sd[head]
    # a 4-bit head (GPTQModel's lm_head=True) handed on under the file's own name (language_model.lm_head, or
    # lm_head), for hf_quant.int4_linears to refuse by that name: left behind, a tied model loaded its float
    # embedding as the head without a word, and an untied one was said to have no head at all
    for name in _LANGUAGE_HEAD:
        base = name.removesuffix(".weight")
        out.update({k: v for k, v in sd.items() if k.startswith(base + ".") and k.endswith(_QUANTIZED_PARTS)})
    return out


def _check_hf_config(cfg_json: Path, sd: dict) -> GPTConfig:
    """The GPTConfig of a Gemma config.json (a multimodal Gemma 3's: its text_config), checked against
    the tensors beside it; what this model does not compute refused by name."""
    d = _text_config(read_json_object(cfg_json), cfg_json)
    kind = d.get("model_type")
    shapes = hf_shapes(d, sd, cfg_json, "Gemma")
    n_layer, head_dim = shapes[3], shapes[6]
    act_key = "hidden_act" if kind == "gemma" else "hidden_activation"
    act = d.get(act_key) or "gelu_pytorch_tanh"
    if act not in _GELU_TANH and not (kind == "gemma" and act == "gelu"):  # Gemma 1's legacy "gelu" means tanh
        raise UserError(f"{cfg_json} has {act_key} {act!r}; this model's GeGLU computes GELU's tanh form "
                        "('gelu_pytorch_tanh')")
    if config_flag(d, "attention_bias", False, cfg_json):
        raise UserError(f"{cfg_json} has attention_bias true; Gemma's projections have no biases here")
    # Gemma 1 has neither field: its scores are scaled by 1/sqrt(head_dim), never capped
    attn_cap = d.get("attn_logit_softcapping", 50.0 if kind == "gemma2" else None) if kind != "gemma" else None
    if attn_cap is not None and (isinstance(attn_cap, bool) or not isinstance(attn_cap, (int, float))
                                 or not math.isfinite(attn_cap) or attn_cap <= 0):
        raise UserError(f"{cfg_json} has attn_logit_softcapping {attn_cap!r}; it must be a number > 0 or null")
    if kind == "gemma3_text" and attn_cap is not None:  # transformers' Gemma 3 keeps the field but never applies it
        note(f"{cfg_json} has attn_logit_softcapping {attn_cap!r}, which Gemma 3 does not apply (transformers' "
             "Gemma3 attention ignores it): read without a cap")
        attn_cap = None
    scalar = d.get("query_pre_attn_scalar", 256) if kind != "gemma" else head_dim
    if isinstance(scalar, bool) or not isinstance(scalar, (int, float)) or scalar != int(scalar) or scalar < 1:
        raise UserError(f"{cfg_json} has query_pre_attn_scalar {scalar!r}; it must be a positive integer (the "
                        "width whose 1/sqrt scales the attention scores)")
    if config_flag(d, "use_bidirectional_attention", False, cfg_json):
        raise UserError(f"{cfg_json} has use_bidirectional_attention true (an embedding model); this model is causal")
    cap = d.get("final_logit_softcapping", 30.0 if kind == "gemma2" else None)
    window, window_layers = _sliding_window(d, kind, n_layer, cfg_json)
    theta, scaling, local_theta = _rope(d, kind, cfg_json)
    return config_json_gptconfig(
        cfg_json, {**LLAMA_KEYS, "logit_softcap": "final_logit_softcapping", "attn_softcap": "attn_logit_softcapping"},
        **shape_fields(shapes, sd, d, cfg_json), context_length=d.get("max_position_embeddings", 8192),
        attn_softcap=attn_cap or 0.0,
        attention_scale_width=0 if scalar == head_dim else int(scalar), qk_norm=kind == "gemma3_text", bias=False,
        attention_window=window, window_layers=window_layers, position_encoding="rope", rope_theta=theta,
        rope_scaling=scaling, rope_local_theta=local_theta if window else 0.0, norm="rmsnorm",
        norm_eps=d.get("rms_norm_eps", 1e-6), mlp="geglu", scale_embeddings=True, post_norms=kind != "gemma",
        logit_softcap=cap or 0.0)


def _wide(w):
    """w in fp32 at least: Gemma's RMSNorm weights are added to 1, which in bf16 would round w's last bits away."""
    return w.to(torch.promote_types(w.dtype, torch.float32))


def _plus_one(w):
    return _wide(w) + 1


def _our_tensors(sd: dict, cfg: GPTConfig) -> dict:
    """Hugging Face Gemma tensors under our parameter names, the norms' as 1 + w (KeyError: a tensor
    the file lacks)."""
    ours = {"tok_emb.weight": sd["embed_tokens.weight"], "final_norm.weight": _plus_one(sd["norm.weight"])}
    if not cfg.tie_weights:
        ours["out_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        for mine, theirs in _PROJECTIONS:
            ours[f"trf_blocks.{i}.{mine}.weight"] = sd[f"layers.{i}.{theirs}.weight"]
        for mine, theirs in _norms(cfg) + (_QK_NORMS if cfg.qk_norm else ()):
            ours[f"trf_blocks.{i}.{mine}.weight"] = _plus_one(sd[f"layers.{i}.{theirs}.weight"])
    return ours


def load_gemma_safetensors(path) -> GPTModel:
    """GPTModel with the weights of a Hugging Face Gemma (1, 2 or 3; a multimodal Gemma 3's language model)
    model.safetensors (or shard index) and its config.json beside it."""
    from tritongpt.train.hf_quant import folder_dequantized, folder_quantization, int4_linears, model_with_int4
    path = weights_file(path, "Gemma")
    cfg_json = path.parent / "config.json"
    # a GPTQ or AWQ folder: 4-bit, its projections read as int4 (hf_quant.py) as Llama's are (8-bit GPTQ as int8
    # where it maps); an FP8 one, or a GPTQ one of other bits, dequantized to a float model; any other refused by name
    spec, dequant = folder_quantization(cfg_json)
    multimodal = read_json_object(cfg_json).get("model_type") == "gemma3"
    if multimodal:
        _text_config(read_json_object(cfg_json), cfg_json)  # a config without one refused before any tensor is read
        sd = _language_model_tensors(path, quantization_read=spec is not None or dequant is not None)
        note(f"{path}: a multimodal Gemma 3; its language model is read, without the vision tower")
    else:
        sd = _read_tensors(path, prefix="model.", quantization_read=spec is not None or dequant is not None)
    # the file's model prefix, for the config's modules left float: a multimodal model's language model is named
    # by either of its prefixes there (hf_quant._left_float)
    prefix = _LANGUAGE_MODEL if multimodal else "model."
    if dequant is not None:
        sd = folder_dequantized(sd, dequant, path, prefix=prefix)
    if spec is not None:
        sd, packed, group_size = int4_linears(sd, spec, path, prefix=prefix)
        if packed is None:  # (4-bit groups no int4 group size divides: read dequantized, a float model)
            spec = None
    cfg = _check_hf_config(cfg_json, sd)
    if spec is not None:
        return model_with_int4(cfg, lambda: _our_tensors(sd, cfg), sd, packed, group_size, path)
    return model_with_tensors(cfg, lambda: _our_tensors(sd, cfg), path)


# -- export: the inverse of _our_tensors -----------------------------------------------------------
def is_gemma_shaped(cfg: GPTConfig) -> bool:
    """Whether a model has one of Gemma's touches (scaled embeddings, sandwich norms, GeGLU): export
    writes it as a Gemma, or refuses."""
    return cfg.scale_embeddings or cfg.post_norms or cfg.mlp == "geglu"


def hf_family(cfg: GPTConfig) -> str:
    """gemma3_text with q/k norms, gemma2 with sandwich norms without them, else gemma."""
    return "gemma3_text" if cfg.qk_norm else "gemma2" if cfg.post_norms else "gemma"


def family_name(cfg: GPTConfig) -> str:
    return _NAMES[hf_family(cfg)]


def refuse_not_gemma(model: GPTModel, what: str) -> None:
    """What a Gemma of the family hf_family picks does not compute, by name."""
    from tritongpt.train.gpt2_weights import refuse_moe_touches, refuse_olmo_touches, refuse_phi3_touches

    cfg = model.config
    refuse_moe_touches(cfg, family_name(cfg), what)
    family = family_name(cfg)
    kind = hf_family(cfg)
    refuse_olmo_touches(cfg, family, what)
    refuse_phi3_touches(cfg, family, what)
    for differs, why in ((cfg.position_encoding != "rope", f"{cfg.positions_said()}, where {family} rotates q "
                          "and k (RoPE)"),
                         (cfg.norm != "rmsnorm", f"normalizes with {cfg.norm}, where {family} has RMSNorms"),
                         (cfg.mlp != "geglu", f"has a {cfg.mlp} MLP, where {family}'s is GeGLU"),
                         (not cfg.scale_embeddings, f"does not scale its token embeddings by sqrt(n_embd), which "
                          f"{family} does"),
                         (cfg.bias or cfg.qkv_bias_only, f"has biases, where {family}'s projections have none"),
                         (not cfg.scale_attention, f"does not scale its attention scores, which {family} does"),
                         (kind != "gemma" and not cfg.post_norms, "does not normalize its sublayers' outputs "
                          f"(post_norms), which {family}'s sandwich norms do"),
                         (kind == "gemma" and bool(cfg.attention_window), "has local attention, which Gemma 1 "
                          "does not (Gemma 2 and 3, with their sandwich norms: post_norms, do)"),
                         (kind == "gemma" and bool(cfg.logit_softcap), "soft-caps its logits, which Gemma 1 does "
                          "not"),
                         (kind != "gemma3_text" and bool(cfg.rope_local_theta), f"rotates its local layers with a "
                          f"RoPE of their own (rope_local_theta), which {family} does not (Gemma 3, with q/k norms, "
                          "does)"),
                         (kind == "gemma" and cfg.rope_scaling is not None, "scales RoPE, which Gemma 1 does not"),
                         (cfg.nope_layers != "", f"does not rotate q and k in layers {cfg.nope_layers} (nope_layers: "
                          f"SmolLM3's), where every {family} layer does"),
                         (kind != "gemma2" and bool(cfg.attn_softcap), f"soft-caps its attention scores, which "
                          f"{family} does not (Gemma 2 does; transformers' Gemma 3 reads attn_logit_softcapping but "
                          "never applies it)"),
                         (kind == "gemma" and bool(cfg.attention_scale_width), "scales its attention scores by "
                          f"1/sqrt({cfg.attention_scale_width}), where Gemma 1 scales them by 1/sqrt(head_dim)")):
        if differs:
            raise UserError(f"this model {why}: it cannot be exported as {what}")


def _layer_types(cfg: GPTConfig) -> list:
    return ["sliding_attention" if cfg.layer_window(i) else "full_attention" for i in range(cfg.n_layer)]


def _hf_tensors(model: GPTModel) -> dict:
    """Our parameters under Gemma's names, the norms' as w - 1 (in fp32 at least), the padding rows dropped."""
    cfg = model.config
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    V = cfg.vocab_size
    hf = {"embed_tokens.weight": sd["tok_emb.weight"][:V], "norm.weight": _wide(sd["final_norm.weight"]) - 1}
    for i in range(cfg.n_layer):
        for mine, theirs in _PROJECTIONS:
            hf[f"layers.{i}.{theirs}.weight"] = sd[f"trf_blocks.{i}.{mine}.weight"]
        for mine, theirs in _norms(cfg) + (_QK_NORMS if cfg.qk_norm else ()):
            hf[f"layers.{i}.{theirs}.weight"] = _wide(sd[f"trf_blocks.{i}.{mine}.weight"]) - 1
    out = {"model." + k: v for k, v in hf.items()}
    if not cfg.tie_weights:
        out["lm_head.weight"] = sd["out_head.weight"][:V]
    return {k: v.to("cpu", memory_format=torch.contiguous_format, copy=True) for k, v in out.items()}


def hf_config(cfg: GPTConfig, eos_token_id: int | None = None, bos_token_id: int | None = None) -> dict:
    """GemmaConfig (Gemma2Config, Gemma3TextConfig) fields for this model: what _check_hf_config reads back."""
    kind = hf_family(cfg)
    act = {"hidden_act" if kind == "gemma" else "hidden_activation": "gelu_pytorch_tanh"}
    d = {"model_type": kind, "architectures": [FAMILIES[kind]], "vocab_size": cfg.vocab_size,
         "max_position_embeddings": cfg.context_length, "hidden_size": cfg.n_embd,
         "intermediate_size": cfg.ff_hidden, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
         "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, **act, "rms_norm_eps": cfg.norm_eps,
         "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": cfg.tie_weights,
         "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": None}
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})}
    if kind == "gemma":
        return {**d, "rope_theta": cfg.rope_theta, "rope_parameters": rope}
    d.update(query_pre_attn_scalar=cfg.attention_scale_width or cfg.head_dim,
             attn_logit_softcapping=cfg.attn_softcap or None,
             final_logit_softcapping=cfg.logit_softcap or None,
             # transformers' Gemma 2 and 3 build a sliding mask whatever layer_types say, and fail without a
             # window: a model with none gets the context's, which no full_attention layer reads
             sliding_window=cfg.attention_window or cfg.context_length, layer_types=_layer_types(cfg))
    if kind == "gemma2":
        return {**d, "rope_theta": cfg.rope_theta, "rope_parameters": rope}
    local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
    if not cfg.rope_local_theta:  # one RoPE for every layer: the local ones as the global ones
        local = rope
    return {**d, "rope_parameters": {"full_attention": rope, "sliding_attention": local},
            "use_bidirectional_attention": False}


def export_gemma(model: GPTModel, out_dir, eos_token_id: int | None = None, overwrite: bool = False) -> list:
    """Write model as a Hugging Face Gemma, Gemma 2 or Gemma 3 folder (hf_family): model.safetensors and
    config.json, which transformers.AutoModelForCausalLM.from_pretrained(out_dir) and load_checkpoint
    both read. Returns the paths written; refuses to replace them unless overwrite."""
    refuse_not_gemma(model, f"a {family_name(model.config)} folder")
    return write_hf_folder(out_dir, lambda: _hf_tensors(model), hf_config(model.config, eos_token_id), overwrite)
