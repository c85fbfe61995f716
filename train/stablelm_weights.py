"""StableLM weights (Stability AI's StableLM-3B-4E1T and StableLM 2 1.6B: Hugging Face's StableLmForCausalLM,
model_type "stablelm") into GPTModel, and back out.

A StableLM is a Llama (SwiGLU, RoPE, Llama's tensor names) with these differences, each a GPTConfig field:
- LayerNorms (with biases) where Llama has RMSNorms: norm "layernorm";
- RoPE on the first quarter of each head only (partial_rotary_factor 0.25: 16 of 64 dimensions): rotary_dim;
- biases on q, k and v alone when use_qkv_bias (StableLM 2's), as Qwen2: qkv_bias_only; none elsewhere;
- StableLM 2 12B's two: use_parallel_residual, attention and MLP beside each other on one norm (parallel_residual
  and shared_norm: no post_attention_layernorm), and qk_layernorm, a bias-free LayerNorm of each head's q and k
  with weights of that head's own (q_layernorm.norms.{h}.weight, stacked into qk_norm_width "each"'s
  [heads, head_dim] weight; k's over the KV heads).
What this model does not compute is refused by name: another activation, scaled RoPE, a head_dim the weights do
not have.
"""
from dataclasses import replace
from pathlib import Path

import torch

from tritongpt.errors import UserError, read_json_object
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.gpt2_weights import (_read_tensors, config_flag, config_json_gptconfig, model_with_tensors,
                                          refuse_gemma_touches, refuse_moe_touches, weights_file, write_hf_folder)
from tritongpt.train.llama_weights import _hf_tensors as _llama_hf_tensors
from tritongpt.train.llama_weights import _our_tensors as _llama_tensors
from tritongpt.train.llama_weights import LLAMA_KEYS, hf_shapes, shape_fields, unscaled_partial_rope

MODEL_TYPE, ARCHITECTURE = "stablelm", "StableLmForCausalLM"
# the norms' biases, which Llama's RMSNorms do not have: ours, then StableLM's (under "layers.{i}.")
_NORMS = (("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm"))
# StableLM 2 12B's per-head q/k LayerNorms: ours [heads, head_dim], theirs one [head_dim] weight per head
_QK_NORMS = (("att.q_norm", "self_attn.q_layernorm", lambda cfg: cfg.n_head),
             ("att.k_norm", "self_attn.k_layernorm", lambda cfg: cfg.kv_heads))


def is_stablelm_file(path) -> bool:
    """A Hugging Face StableLM model.safetensors or shard index: its config.json says model_type stablelm."""
    cfg_json = Path(path).parent / "config.json"
    return cfg_json.is_file() and read_json_object(cfg_json).get("model_type") == MODEL_TYPE


def _check_hf_config(cfg_json: Path, sd: dict) -> GPTConfig:
    """The GPTConfig of a StableLM config.json, checked against the tensors beside it."""
    d = read_json_object(cfg_json)
    if d.get("model_type") != MODEL_TYPE:
        raise UserError(f"{cfg_json} says model_type {d.get('model_type')!r}; a StableLM folder's is {MODEL_TYPE!r}")
    shapes = hf_shapes(d, sd, cfg_json, "StableLM")
    head_dim = shapes[6]
    if head_dim * shapes[4] != shapes[1]:
        raise UserError(f"{cfg_json}: heads of {head_dim} over a width of {shapes[1]}; StableLM's heads are "
                        "hidden_size / num_attention_heads wide")
    if d.get("hidden_act", "silu") != "silu":
        raise UserError(f"{cfg_json} has hidden_act {d['hidden_act']!r}; this model's SwiGLU computes 'silu' only")
    parallel, qk_norm = (config_flag(d, k, False, cfg_json) for k in ("use_parallel_residual", "qk_layernorm"))
    if parallel == ("layers.0.post_attention_layernorm.weight" in sd):
        raise UserError(f"{cfg_json} has use_parallel_residual {str(parallel).lower()}, but the weights "
                        f"{'have' if parallel else 'lack'} post_attention_layernorm (a parallel block has one norm)")
    if qk_norm != ("layers.0.self_attn.q_layernorm.norms.0.weight" in sd):
        raise UserError(f"{cfg_json} has qk_layernorm {str(qk_norm).lower()}, but the weights "
                        f"{'lack' if qk_norm else 'have'} q_layernorm's")
    theta, rotary = unscaled_partial_rope(d, head_dim, cfg_json, "StableLM")
    qkv_bias = config_flag(d, "use_qkv_bias", False, cfg_json)
    if qkv_bias != ("layers.0.self_attn.q_proj.bias" in sd):
        raise UserError(f"{cfg_json} has use_qkv_bias {str(qkv_bias).lower()}, but the weights "
                        f"{'lack' if qkv_bias else 'have'} q_proj's bias")
    # StableLmConfig's defaults where config.json says nothing: 4096 positions, eps 1e-5
    return config_json_gptconfig(
        cfg_json, {**LLAMA_KEYS, "norm_eps": "layer_norm_eps"}, **shape_fields(shapes, sd, d, cfg_json),
        context_length=d.get("max_position_embeddings", 4096), bias=False, qkv_bias_only=qkv_bias,
        position_encoding="rope", rope_theta=theta, rotary_dim=rotary, norm="layernorm",
        norm_eps=d.get("layer_norm_eps", 1e-5), mlp="swiglu", parallel_residual=parallel, shared_norm=parallel,
        qk_norm=qk_norm, qk_norm_width="each" if qk_norm else "head")


def _our_tensors(sd: dict, cfg: GPTConfig) -> dict:
    """StableLM's tensors under our parameter names: Llama's, the LayerNorms' biases (no norm2 in a parallel
    block) and the per-head q/k norms' weights, stacked [heads, head_dim]."""
    ours = _llama_tensors(sd, cfg)
    ours["final_norm.bias"] = sd["norm.bias"]
    for i in range(cfg.n_layer):
        for mine, theirs in _NORMS[:1] if cfg.shared_norm else _NORMS:
            ours[f"trf_blocks.{i}.{mine}.bias"] = sd[f"layers.{i}.{theirs}.bias"]
        for mine, theirs, heads in _QK_NORMS if cfg.qk_norm else ():
            ours[f"trf_blocks.{i}.{mine}.weight"] = torch.stack(
                [sd[f"layers.{i}.{theirs}.norms.{h}.weight"] for h in range(heads(cfg))])
    return ours


def load_stablelm_safetensors(path) -> GPTModel:
    """GPTModel with the weights of a Hugging Face StableLM model.safetensors (or shard index) and its
    config.json beside it."""
    path = weights_file(path, "StableLM")
    sd = _read_tensors(path, prefix="model.")
    cfg = _check_hf_config(path.parent / "config.json", sd)
    return model_with_tensors(cfg, lambda: _our_tensors(sd, cfg), path)


# -- export: the inverse of _our_tensors -----------------------------------------------------------
def is_stablelm_shaped(cfg: GPTConfig) -> bool:
    """LayerNorms with a SwiGLU MLP: StableLM's pieces, which export writes as a StableLM (or refuses)."""
    return cfg.norm == "layernorm" and cfg.mlp == "swiglu"


def refuse_not_stablelm(model: GPTModel, what: str) -> None:
    """What Hugging Face's StableLM does not compute, by name."""
    cfg = model.config
    refuse_moe_touches(cfg, "StableLM", what, per_head_qk=True)
    for differs, why in ((cfg.position_encoding != "rope", f"{cfg.positions_said()}, where StableLM rotates q "
                          "and k (RoPE)"),
                         (cfg.norm != "layernorm", f"normalizes with {cfg.norm}, where StableLM has LayerNorms"),
                         (cfg.mlp != "swiglu", f"has a {cfg.mlp} MLP, where StableLM's is SwiGLU"),
                         (cfg.bias, "has biases beyond q, k and v, where StableLM's other projections have none"),
                         (not cfg.scale_attention, "does not scale its attention scores, which StableLM does"),
                         (cfg.head_dim * cfg.n_head != cfg.n_embd, f"has heads of {cfg.head_dim} "
                          "(attention_head_dim), where StableLM's are n_embd / n_head wide"),
                         (cfg.qk_norm and cfg.qk_norm_width != "each", "normalizes q and k with one weight for "
                          f"every head (qk_norm_width {cfg.qk_norm_width!r}), where StableLM's q/k norms have a weight "
                          "of each head's own ('each')"),
                         (bool(cfg.attention_window), f"has local attention (attention_window "
                          f"{cfg.attention_window}), where StableLM attends to the whole context"),
                         (cfg.rope_scaling is not None, "scales RoPE's frequencies (rope_scaling), which this "
                          "export does not write"),
                         (cfg.nope_layers != "", f"has layers without RoPE ({cfg.nope_layers}), which StableLM does "
                          "not"),
                         (bool(cfg.rope_local_theta), "rotates its local layers with a RoPE base of their own"),
                         (bool(cfg.logit_softcap), "soft-caps its logits, which StableLM does not")):
        if differs:
            raise UserError(f"this model {why}: it cannot be exported as {what}")
    # StableLM 2 12B's parallel block on one norm is StableLM's own; GPT-NeoX's on two norms and the other
    # families' touches refused as usual
    parallel = cfg.parallel_residual and cfg.shared_norm
    refuse_gemma_touches(replace(cfg, parallel_residual=False, shared_norm=False) if parallel else cfg, "StableLM",
                         what)


def _hf_tensors(model: GPTModel) -> dict:
    """Our parameters under StableLmForCausalLM's names: Llama's, and the LayerNorms' biases."""
    cfg = model.config
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out = _llama_hf_tensors(model)
    out["model.norm.bias"] = sd["final_norm.bias"]
    for i in range(cfg.n_layer):
        for mine, theirs in _NORMS[:1] if cfg.shared_norm else _NORMS:
            out[f"model.layers.{i}.{theirs}.bias"] = sd[f"trf_blocks.{i}.{mine}.bias"]
        for mine, theirs, _ in _QK_NORMS if cfg.qk_norm else ():
            for h, w in enumerate(sd[f"trf_blocks.{i}.{mine}.weight"]):
                out[f"model.layers.{i}.{theirs}.norms.{h}.weight"] = w
    return {k: v.to("cpu", memory_format=torch.contiguous_format, copy=True) for k, v in out.items()}


def hf_config(cfg: GPTConfig, eos_token_id: int | None = None) -> dict:
    """StableLmConfig fields for this model: what _check_hf_config reads back. RoPE both ways:
    rope_parameters (transformers 5) and rope_theta / partial_rotary_factor (4.x)."""
    factor = cfg.rotary_dim / cfg.head_dim if cfg.rotary_dim else 1.0  # int(head_dim * factor) reads it back
    return {"model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.context_length, "hidden_size": cfg.n_embd,
            "intermediate_size": cfg.ff_hidden, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.kv_heads, "hidden_act": "silu", "layer_norm_eps": cfg.norm_eps,
            "use_qkv_bias": cfg.qkv_bias_only, "qk_layernorm": cfg.qk_norm,
            "use_parallel_residual": cfg.parallel_residual,
            "hidden_dropout": 0.0, "attention_dropout": 0.0, "tie_word_embeddings": cfg.tie_weights,
            "bos_token_id": eos_token_id, "eos_token_id": eos_token_id, "pad_token_id": None,
            "rope_theta": cfg.rope_theta, "partial_rotary_factor": factor,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": factor}}


def export_stablelm(model: GPTModel, out_dir, eos_token_id: int | None = None, overwrite: bool = False) -> list:
    """Write model as a Hugging Face StableLM folder: model.safetensors and config.json, which
    transformers.AutoModelForCausalLM.from_pretrained(out_dir) and load_checkpoint both read. Returns the
    paths written; refuses to replace them unless overwrite."""
    refuse_not_stablelm(model, "a StableLM folder")
    return write_hf_folder(out_dir, lambda: _hf_tensors(model), hf_config(model.config, eos_token_id), overwrite)
