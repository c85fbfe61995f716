"""Arcee weights (Hugging Face's ArceeForCausalLM: Arcee's AFM-4.5B) into GPTModel, and back out.

An Arcee is a Llama whose MLP has no gate: down_proj(relu2(up_proj(x))), the squared ReLU relu(h)^2 between two
matrices (transformers' ArceeMLP, hidden_act "relu2"), which is GPTConfig.mlp "relu2" with mlp_hidden its
intermediate_size (up_proj is our ff.fc1, down_proj ff.fc2; the Triton path is kernels/mlp.py's RELU2 epilogues).
The rest is Llama's: RMSNorms, RoPE over whole heads in rotate_half's order, grouped-query attention, biases on
every projection or none (attention_bias and mlp_bias must agree: GPTConfig.bias), an untied head unless
tie_word_embeddings. AFM-4.5B stretches its RoPE by YaRN (rope_scaling {"rope_type": "yarn", ...}), read as the
Llama reader reads it (GPTConfig.rope_scaling); linear and llama3 scaling too. ArceeConfig's defaults where
config.json is silent: rms_norm_eps 1e-5, max_position_embeddings 4096, RoPE base 10000.
What this model does not compute is refused by name: another activation, biases on the attention or the MLP only, a
sliding window, a partial rotary factor, another RoPE scaling (longrope, dynamic).

`export` writes an Arcee folder (any model with mlp "relu2" is written as one, or refused naming what an Arcee
cannot say) that transformers loads with the same logits, and load_checkpoint reads it back.
"""
from pathlib import Path

import torch

from tritongpt.errors import UserError, read_json_object
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.gpt2_weights import (_read_tensors, config_flag, config_json_gptconfig, model_with_tensors,
                                          refuse_gemma_touches, refuse_moe_touches, refuse_phi3_touches, weights_file,
                                          write_hf_folder)
from tritongpt.train.llama_weights import LLAMA_KEYS, _rope_theta, hf_config as llama_hf_config, hf_shapes, \
    shape_fields

MODEL_TYPE = "arcee"
# each block's tensors: ours, then Hugging Face's (under "layers.{i}."): Llama's, with no gate_proj
_LAYER = (("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm"), ("att.W_query", "self_attn.q_proj"),
          ("att.W_key", "self_attn.k_proj"), ("att.W_value", "self_attn.v_proj"), ("att.out_proj", "self_attn.o_proj"),
          ("ff.fc1", "mlp.up_proj"), ("ff.fc2", "mlp.down_proj"))
_NORMS = ("norm1", "norm2")
_SCALINGS = ("linear", "llama3", "yarn")  # the RoPE scalings read here (longrope is Phi-3's, in our model)


def is_arcee_file(path) -> bool:
    """A Hugging Face Arcee model.safetensors (or shard index): its config.json says model_type "arcee"."""
    cfg_json = Path(path).parent / "config.json"
    return cfg_json.is_file() and read_json_object(cfg_json).get("model_type") == MODEL_TYPE


def relu2_mlp_shapes(d: dict, sd: dict, cfg_json: Path, family: str, article: str) -> tuple:
    """hf_shapes of a Llama-layout folder whose MLP is ungated, up_proj then down_proj around the squared ReLU
    (Arcee's, Nemotron's), its gate_proj and another hidden_act refused by name."""
    if "layers.0.mlp.up_proj.weight" not in sd:
        raise UserError(f"{cfg_json.parent}: not {article} {family} model, missing tensor "
                        "'layers.0.mlp.up_proj.weight'")
    if "layers.0.mlp.gate_proj.weight" in sd:
        raise UserError(f"{cfg_json.parent}: the weights have mlp.gate_proj, a gated (Llama's) MLP, where "
                        f"{article} {family}'s MLP has up_proj and down_proj only")
    if d.get("hidden_act", "relu2") != "relu2":
        raise UserError(f"{cfg_json} has hidden_act {d['hidden_act']!r}; this model's {family} MLP computes 'relu2' "
                        "(the squared ReLU) only")
    # hf_shapes reads the MLP's hidden size off gate_proj: up_proj has the same rows (a view of sd, nothing copied)
    return hf_shapes(d, {**sd, "layers.0.mlp.gate_proj.weight": sd["layers.0.mlp.up_proj.weight"]}, cfg_json, family)


def _check_hf_config(cfg_json: Path, sd: dict) -> GPTConfig:
    """The GPTConfig of an Arcee config.json, checked against the tensors beside it."""
    d = read_json_object(cfg_json)
    shapes = relu2_mlp_shapes(d, sd, cfg_json, "Arcee", "an")
    if d.get("sliding_window") is not None:  # ArceeConfig has none: a file that says one means another model
        raise UserError(f"{cfg_json} has sliding_window {d['sliding_window']!r}; an Arcee attends to the whole "
                        "context")
    attention_bias, mlp_bias = (config_flag(d, k, False, cfg_json, MODEL_TYPE) for k in ("attention_bias", "mlp_bias"))
    if attention_bias != mlp_bias:
        raise UserError(f"{cfg_json} has attention_bias {str(attention_bias).lower()} and mlp_bias "
                        f"{str(mlp_bias).lower()}; this model's linear layers have biases all or none (GPTConfig.bias)")
    theta, scaling = _rope_theta(d, cfg_json)  # (a partial_rotary_factor is refused there)
    if scaling is not None and scaling["rope_type"] not in _SCALINGS:
        raise UserError(f"{cfg_json} has RoPE scaling of type {scaling['rope_type']!r}; this model reads an Arcee's "
                        f"RoPE unscaled or scaled by {', '.join(map(repr, _SCALINGS))}")
    return config_json_gptconfig(
        cfg_json, LLAMA_KEYS, **shape_fields(shapes, sd, d, cfg_json), bias=attention_bias,
        context_length=d.get("max_position_embeddings", 4096), position_encoding="rope", rope_theta=theta,
        rope_scaling=scaling, norm="rmsnorm", norm_eps=d.get("rms_norm_eps", 1e-5), mlp="relu2")


def _our_tensors(sd: dict, cfg: GPTConfig) -> dict:
    """Hugging Face Arcee tensors under our parameter names (KeyError: a tensor the file lacks)."""
    ours = {"tok_emb.weight": sd["embed_tokens.weight"], "final_norm.weight": sd["norm.weight"]}
    if not cfg.tie_weights:
        ours["out_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        for mine, theirs in _LAYER:
            ours[f"trf_blocks.{i}.{mine}.weight"] = sd[f"layers.{i}.{theirs}.weight"]
            if cfg.bias and mine not in _NORMS:
                ours[f"trf_blocks.{i}.{mine}.bias"] = sd[f"layers.{i}.{theirs}.bias"]
    return ours


def load_arcee_safetensors(path) -> GPTModel:
    """GPTModel with the weights of a Hugging Face Arcee model.safetensors (or shard index) and its config.json."""
    path = weights_file(path, "Arcee")
    cfg_json = path.parent / "config.json"
    sd = _read_tensors(path, prefix="model.")
    cfg = _check_hf_config(cfg_json, sd)
    return model_with_tensors(cfg, lambda: _our_tensors(sd, cfg), path)


# -- export: the inverse of _our_tensors -----------------------------------------------------------
def refuse_not_arcee(model: GPTModel, what: str, family: str = "Arcee") -> None:
    """Hugging Face's Arcee is a Llama with the squared-ReLU MLP: RoPE over whole heads, RMSNorms, scores scaled by
    1/sqrt(head_dim) over the whole context, sequential blocks, biases all or none, no logit soft cap or LM-head
    bias. Another model's weights would give it other logits: refused by name."""
    cfg = model.config
    refuse_moe_touches(cfg, family, what)
    for differs, why in ((cfg.mlp != "relu2", f"has a {cfg.mlp} MLP, where {family}'s is up_proj, relu^2, down_proj "
                          "(mlp 'relu2')"),
                         (cfg.position_encoding != "rope", f"{cfg.positions_said()}, where {family} rotates q and k "
                          "(RoPE)"),
                         (cfg.norm != "rmsnorm", f"normalizes with {cfg.norm}, where {family} has RMSNorms"),
                         (not cfg.scale_attention, "does not scale its attention scores by 1/sqrt(head_dim), "
                          f"which {family} does"),
                         (bool(cfg.attention_window), f"has local attention (attention_window "
                          f"{cfg.attention_window}), where {family} attends to the whole context"),
                         (bool(cfg.logit_softcap), f"soft-caps its logits (logit_softcap {cfg.logit_softcap:g}), "
                          f"which {family} does not"),
                         (cfg.parallel_residual, f"runs attention and the MLP in parallel (parallel_residual), "
                          f"where {family}'s blocks are sequential"),
                         (cfg.head_bias, f"has a bias on its LM head (head_bias), which {family}'s has not"),
                         (cfg.qk_norm, f"normalizes q and k (qk_norm), which {family} does not"),
                         (cfg.qkv_bias_only, f"has biases on q, k and v only (Qwen2's), where {family}'s linear "
                          "layers have biases all or none"),
                         (bool(cfg.nope_layers), f"has layers without RoPE (nope_layers {cfg.nope_layers}), where "
                          f"every {family} layer rotates q and k"),
                         (bool(cfg.rope_local_theta), f"rotates its local layers with a RoPE base of their own "
                          f"(rope_local_theta {cfg.rope_local_theta:g}), where {family}'s layers share one")):
        if differs:
            raise UserError(f"this model {why}: it cannot be exported as {what}")
    refuse_gemma_touches(cfg, family, what)
    refuse_phi3_touches(cfg, family, what)


def _hf_tensors(model: GPTModel) -> dict:
    """Our parameters under ArceeForCausalLM's names; the padding rows dropped."""
    cfg = model.config
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    V = cfg.vocab_size
    hf = {"embed_tokens.weight": sd["tok_emb.weight"][:V], "norm.weight": sd["final_norm.weight"]}
    for i in range(cfg.n_layer):
        for mine, theirs in _LAYER:
            hf[f"layers.{i}.{theirs}.weight"] = sd[f"trf_blocks.{i}.{mine}.weight"]
            if cfg.bias and mine not in _NORMS:
                hf[f"layers.{i}.{theirs}.bias"] = sd[f"trf_blocks.{i}.{mine}.bias"]
    out = {"model." + k: v for k, v in hf.items()}
    if not cfg.tie_weights:
        out["lm_head.weight"] = sd["out_head.weight"][:V]
    return {k: v.to("cpu", memory_format=torch.contiguous_format, copy=True) for k, v in out.items()}


def hf_config(cfg: GPTConfig, eos_token_id: int | None = None) -> dict:
    """ArceeConfig fields (config.json) for this model: a Llama's (llama_weights.hf_config: RoPE's base and scaling
    written both ways), as an Arcee, its activation relu2, attention_bias and mlp_bias GPTConfig.bias."""
    d = llama_hf_config(cfg, eos_token_id)
    d.update(model_type=MODEL_TYPE, architectures=["ArceeForCausalLM"], hidden_act="relu2", attention_bias=cfg.bias,
             mlp_bias=cfg.bias)
    return d


def export_arcee(model: GPTModel, out_dir, eos_token_id: int | None = None, overwrite: bool = False) -> list:
    """Write model as a Hugging Face Arcee folder (model.safetensors, config.json), which
    transformers.AutoModelForCausalLM.from_pretrained(out_dir) and load_checkpoint both read. Returns the paths
    written; refuses to replace them unless overwrite."""
    refuse_not_arcee(model, "an Arcee folder")
    return write_hf_folder(out_dir, lambda: _hf_tensors(model), hf_config(model.config, eos_token_id), overwrite)
