"""GLM-4 weights (Zhipu's GLM-4-0414: Hugging Face's Glm4ForCausalLM, model_type "glm4") into GPTModel, and back out.

A GLM-4 is a Llama (RMSNorm, SwiGLU, RoPE, grouped-query attention) whose differences are each a GPTConfig field:
- sandwich norms: each sublayer's input and output normalized, x + post(attention(norm1(x))), then
  x + post(mlp(norm2(x))) (post_norms, as Gemma 2's; its norms are input_layernorm, post_self_attn_layernorm,
  post_attention_layernorm before the MLP and post_mlp_layernorm);
- a partial rotary (partial_rotary_factor, 0.5 when config.json says none): rotary_dim;
- its RoPE pairs dimensions (2i, 2i + 1) of the rotated share, where ours pairs (i, i + R/2): each head's rows of
  q_proj and k_proj (and their biases) reordered as GPT-J's (half_split_order), the pass-through ones kept, and put
  back on export;
- attention_bias gives q, k and v biases only (qkv_bias_only; its default), o_proj and the MLP none;
- its MLP's gate and up are one gate_up_proj (gate rows first, as Phi-3's), split on the way in.
What this model does not compute is refused by name: another activation, a scaled RoPE, a sliding window.
"""
from dataclasses import replace
from pathlib import Path

import torch

from tritongpt.errors import UserError, read_json_object
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.gpt2_weights import (_read_tensors, config_flag, config_json_gptconfig, model_with_tensors,
                                          weights_file, write_hf_folder)
from tritongpt.train.gptj_weights import half_split_order
from tritongpt.train.llama_weights import LLAMA_KEYS, hf_shapes, shape_fields, unscaled_partial_rope

MODEL_TYPE, ARCH = "glm4", "Glm4ForCausalLM"
# each block's tensors: ours, then GLM-4's (under "layers.{i}."); gate and up come from gate_up_proj
_LAYER = (("norm1", "input_layernorm"), ("post_att_norm", "post_self_attn_layernorm"),
          ("norm2", "post_attention_layernorm"), ("post_ff_norm", "post_mlp_layernorm"),
          ("att.W_query", "self_attn.q_proj"), ("att.W_key", "self_attn.k_proj"), ("att.W_value", "self_attn.v_proj"),
          ("att.out_proj", "self_attn.o_proj"), ("ff.w_down", "mlp.down_proj"))
_ROTATED = ("att.W_query", "att.W_key")


def is_glm4_file(path) -> bool:
    """A Hugging Face GLM-4 model.safetensors (or shard index): its config.json says so."""
    cfg_json = Path(path).parent / "config.json"
    return cfg_json.is_file() and read_json_object(cfg_json).get("model_type") == MODEL_TYPE


def _split_gate_up(sd: dict) -> dict:
    """sd with each layer's gate_up_proj [2H, C] as Llama's gate_proj and up_proj (gate rows first: Phi3MLP's
    chunk(2)), so hf_shapes reads the MLP's width."""
    out = {k: v for k, v in sd.items() if not k.endswith(".mlp.gate_up_proj.weight")}
    for k, v in sd.items():
        if k.endswith(".mlp.gate_up_proj.weight"):
            gate, up = v.chunk(2, dim=0)
            out[k.replace("gate_up_proj", "gate_proj")], out[k.replace("gate_up_proj", "up_proj")] = gate, up
    return out


def _check_hf_config(cfg_json: Path, sd: dict) -> GPTConfig:
    """The GPTConfig of a GLM-4 config.json, checked against the tensors beside it; what this model does not compute
    refused by name."""
    d = read_json_object(cfg_json)
    shapes = hf_shapes(d, sd, cfg_json, "GLM-4")
    if d.get("hidden_act", "silu") != "silu":
        raise UserError(f"{cfg_json} has hidden_act {d['hidden_act']!r}; this model's SwiGLU computes 'silu' only")
    if d.get("sliding_window") is not None:
        raise UserError(f"{cfg_json} has sliding_window {d['sliding_window']!r}; GLM-4 attends to the whole context")
    # Glm4Config's partial_rotary_factor when none is said: 0.5 (a scaled RoPE is refused there by name)
    qkv_bias = config_flag(d, "attention_bias", True, cfg_json)
    if qkv_bias != ("layers.0.self_attn.q_proj.bias" in sd):  # transformers would drop (or zero) them unsaid
        raise UserError(f"{cfg_json} has attention_bias {str(qkv_bias).lower()}, but the weights "
                        f"{'lack' if qkv_bias else 'have'} q_proj's bias")
    theta, rotary_dim = unscaled_partial_rope(d, shapes[6], cfg_json, "GLM-4", factor_default=0.5)
    return config_json_gptconfig(
        cfg_json, LLAMA_KEYS, **shape_fields(shapes, sd, d, cfg_json),
        context_length=d.get("max_position_embeddings", 131072), bias=False,
        qkv_bias_only=qkv_bias, position_encoding="rope", rope_theta=theta,
        rotary_dim=rotary_dim, norm="rmsnorm", norm_eps=d.get("rms_norm_eps", 1.5625e-07), mlp="swiglu",
        post_norms=True)


def _rope_order(cfg: GPTConfig) -> torch.Tensor:
    """A head's dimensions in our RoPE's order, from GLM-4's interleaved pairs of the rotated share."""
    return half_split_order(cfg.head_dim, cfg.rotary_dim or cfg.head_dim)


def _our_tensors(sd: dict, cfg: GPTConfig) -> dict:
    """GLM-4's tensors under our names (KeyError: a tensor the file lacks), q's and k's rows reordered per head."""
    D, order = cfg.head_dim, _rope_order(cfg)
    ours = {"tok_emb.weight": sd["embed_tokens.weight"], "final_norm.weight": sd["norm.weight"]}
    if not cfg.tie_weights:
        ours["out_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        names = [(f"{m}.weight", f"{t}.weight") for m, t in _LAYER] + [("ff.w_gate.weight", "mlp.gate_proj.weight"),
                                                                       ("ff.w_up.weight", "mlp.up_proj.weight")]
        if cfg.qkv_bias_only:
            names += [(f"{m}.bias", f"{t}.bias") for m, t in _LAYER if m in ("att.W_query", "att.W_key",
                                                                              "att.W_value")]
        for mine, theirs in names:
            w = sd[f"layers.{i}.{theirs}"]
            if mine.rsplit(".", 1)[0] in _ROTATED:
                w = w.reshape(-1, D, *w.shape[1:])[:, order].reshape(w.shape)
            ours[f"trf_blocks.{i}.{mine}"] = w
    return ours


def load_glm4_safetensors(path) -> GPTModel:
    """GPTModel with the weights of a Hugging Face GLM-4 model.safetensors (or shard index) and its config.json."""
    path = weights_file(path, "GLM-4")
    sd = _split_gate_up(_read_tensors(path, prefix="model."))
    cfg = _check_hf_config(path.parent / "config.json", sd)
    return model_with_tensors(cfg, lambda: _our_tensors(sd, cfg), path)


# -- export: the inverse of _our_tensors -----------------------------------------------------------
def is_glm4_shaped(cfg: GPTConfig) -> bool:
    """Sandwich norms on a SwiGLU block without Gemma's scaled embeddings: export writes it as a GLM-4 (or
    refuses). (Gemma 2's and 3's sandwiches are GeGLU over scaled embeddings.)"""
    return cfg.post_norms and cfg.pre_norms and cfg.mlp == "swiglu" and not cfg.scale_embeddings


def refuse_not_glm4(model: GPTModel, what: str) -> None:
    """What GLM-4 does not compute, by name: its own, then Llama's refusals on a twin without the sandwich norms and
    the partial rotary, which GLM-4 has."""
    from tritongpt.train.llama_weights import refuse_not_llama
    from tritongpt.train.moe_weights import _Shell

    cfg = model.config
    for differs, why in ((cfg.bias, "has biases on its output projection and MLP, where GLM-4's are on q, k and v "
                          "only"),
                         (cfg.qk_norm, "normalizes q and k (qk_norm), which GLM-4 does not"),
                         (bool(cfg.attention_window), f"has local attention (attention_window "
                          f"{cfg.attention_window}), where GLM-4 attends to the whole context"),
                         (cfg.nope_layers != "", f"has layers without RoPE ({cfg.nope_layers}), which GLM-4 does not"),
                         (cfg.rope_scaling is not None, f"scales RoPE "
                          f"({(cfg.rope_scaling or {}).get('rope_type')!r}), which GLM-4 does not")):
        if differs:
            raise UserError(f"this model {why}: it cannot be exported as {what}")
    refuse_not_llama(_Shell(replace(cfg, post_norms=False, rotary_dim=0)), what, "GLM-4")


def _hf_tensors(model: GPTModel) -> dict:
    """Our parameters under GLM-4's names (q's and k's rows back in its pairs, gate and up as one gate_up_proj),
    the padding rows dropped."""
    cfg = model.config
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    D, inverse = cfg.head_dim, torch.argsort(_rope_order(cfg))
    V = cfg.vocab_size
    hf = {"embed_tokens.weight": sd["tok_emb.weight"][:V], "norm.weight": sd["final_norm.weight"]}
    for i in range(cfg.n_layer):
        for mine, theirs in _LAYER:
            for p in ("weight", "bias"):
                if (w := sd.get(f"trf_blocks.{i}.{mine}.{p}")) is None:
                    continue
                if mine in _ROTATED:
                    w = w.reshape(-1, D, *w.shape[1:])[:, inverse].reshape(w.shape)
                hf[f"layers.{i}.{theirs}.{p}"] = w
        hf[f"layers.{i}.mlp.gate_up_proj.weight"] = torch.cat([sd[f"trf_blocks.{i}.ff.w_gate.weight"],
                                                               sd[f"trf_blocks.{i}.ff.w_up.weight"]])
    out = {"model." + k: v for k, v in hf.items()}
    if not cfg.tie_weights:
        out["lm_head.weight"] = sd["out_head.weight"][:V]
    return {k: v.to("cpu", memory_format=torch.contiguous_format, copy=True) for k, v in out.items()}


def hf_config(cfg: GPTConfig, eos_token_id: int | None = None) -> dict:
    """Glm4Config fields for this model: what _check_hf_config reads back. RoPE both ways: rope_parameters
    (transformers 5) and the flat rope_theta and partial_rotary_factor (4.x)."""
    factor = (cfg.rotary_dim or cfg.head_dim) / cfg.head_dim
    return {"model_type": MODEL_TYPE, "architectures": [ARCH], "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.context_length, "hidden_size": cfg.n_embd,
            "intermediate_size": cfg.ff_hidden, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
            "rms_norm_eps": cfg.norm_eps, "attention_bias": cfg.qkv_bias_only, "attention_dropout": 0.0,
            "tie_word_embeddings": cfg.tie_weights, "rope_theta": cfg.rope_theta, "partial_rotary_factor": factor,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": factor},
            "bos_token_id": eos_token_id, "eos_token_id": eos_token_id, "pad_token_id": None}


def export_glm4(model: GPTModel, out_dir, eos_token_id: int | None = None, overwrite: bool = False) -> list:
    """Write model as a Hugging Face GLM-4 folder: model.safetensors and config.json, which
    transformers.AutoModelForCausalLM.from_pretrained(out_dir) and load_checkpoint both read. Returns the paths
    written; refuses to replace them unless overwrite."""
    refuse_not_glm4(model, "a GLM-4 folder")
    return write_hf_folder(out_dir, lambda: _hf_tensors(model), hf_config(model.config, eos_token_id), overwrite)
