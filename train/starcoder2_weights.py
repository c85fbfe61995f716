"""StarCoder2 weights (Hugging Face's Starcoder2ForCausalLM: BigCode's StarCoder2 3B, 7B, 15B) into GPTModel, and back.

A StarCoder2 is a Llama's layout over GPT-2's pieces: LayerNorms with biases (input_layernorm,
post_attention_layernorm, the final norm), a non-gated GELU MLP c_proj(gelu_tanh(c_fc(x))) (GPTConfig.mlp "gelu",
4 hidden_size wide as every published StarCoder2's; hidden_act "gelu" is the exact erf GELU, gelu_approximate "none"),
grouped-query attention q/k/v/o_proj, biases on every projection or none (use_bias: GPTConfig.bias), RoPE over whole
heads in rotate_half's order (linear, llama3 and YaRN scalings read as the Llama reader reads them), an optional
sliding window over every layer (sliding_window: GPTConfig.attention_window, as Mistral's), the head tied unless
tie_word_embeddings false. Starcoder2Config's defaults where config.json is silent: norm_epsilon 1e-5,
max_position_embeddings 4096, use_bias and tie_word_embeddings true.
What this model does not compute is refused by name: another activation, an intermediate_size other than 4
hidden_size (our GELU MLP's width is fixed: GPTConfig.mlp_hidden is the gated and squared-ReLU MLPs'), a partial
rotary factor, another RoPE scaling (dynamic, longrope).

`export` writes a StarCoder2 folder for a sequential RoPE model over LayerNorms with a GELU-tanh MLP and grouped-query
attention or a sliding window (what a GPT-NeoX folder cannot say: commands.export_target), which transformers loads
with the same logits, and load_checkpoint reads it back.
"""
from pathlib import Path

import torch

from tritongpt.errors import UserError, read_json_object
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.gpt2_weights import (_read_tensors, config_flag, config_json_gptconfig, model_with_tensors,
                                          refuse_gemma_touches, refuse_moe_touches, refuse_norm_touches,
                                          refuse_phi3_touches, weights_file, write_hf_folder)
from tritongpt.train.llama_weights import _rope_theta, hf_shapes, shape_fields

MODEL_TYPE = "starcoder2"
KEYS = {"context_length": "max_position_embeddings", "norm_eps": "norm_epsilon", "n_kv_head": "num_key_value_heads",
        "attention_window": "sliding_window"}
# each block's tensors: ours, then Hugging Face's (under "layers.{i}.")
_LAYER = (("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm"), ("att.W_query", "self_attn.q_proj"),
          ("att.W_key", "self_attn.k_proj"), ("att.W_value", "self_attn.v_proj"), ("att.out_proj", "self_attn.o_proj"),
          ("ff.fc1", "mlp.c_fc"), ("ff.fc2", "mlp.c_proj"))
_NORMS = ("norm1", "norm2")
_GELU = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu_fast": "tanh", "gelu": "none"}  # hidden_act: ours


def is_starcoder2_file(path) -> bool:
    """A Hugging Face StarCoder2 model.safetensors (or shard index): its config.json says model_type "starcoder2"."""
    cfg_json = Path(path).parent / "config.json"
    return cfg_json.is_file() and read_json_object(cfg_json).get("model_type") == MODEL_TYPE


def _check_hf_config(cfg_json: Path, sd: dict) -> GPTConfig:
    """The GPTConfig of a StarCoder2 config.json, checked against the tensors beside it."""
    d = read_json_object(cfg_json)
    if "layers.0.mlp.c_fc.weight" not in sd:
        raise UserError(f"{cfg_json.parent}: not a StarCoder2 model, missing tensor 'layers.0.mlp.c_fc.weight'")
    # hf_shapes reads the MLP's hidden size off gate_proj: c_fc has the same rows (a view of sd, nothing copied)
    shapes = hf_shapes(d, {**sd, "layers.0.mlp.gate_proj.weight": sd["layers.0.mlp.c_fc.weight"]}, cfg_json,
                       "StarCoder2")
    act = d.get("hidden_act", "gelu_pytorch_tanh")
    if not isinstance(act, str) or act not in _GELU:
        raise UserError(f"{cfg_json} has hidden_act {act!r}; this model's StarCoder2 MLP computes "
                        f"{', '.join(map(repr, _GELU))} (the GELU, tanh-approximated or exact) only")
    if shapes[2] != 4 * shapes[1]:  # (every StarCoder2 on the Hub has 4 hidden_size: 3B, 7B and 15B)
        raise UserError(f"{cfg_json} has intermediate_size {shapes[2]}; this model's GELU MLP is 4 hidden_size wide "
                        f"({4 * shapes[1]}) only (GPTConfig.mlp_hidden is the gated and squared-ReLU MLPs')")
    bias = config_flag(d, "use_bias", True, cfg_json, MODEL_TYPE)
    context = d.get("max_position_embeddings", 4096)
    window = d.get("sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise UserError(f"{cfg_json} has sliding_window {window!r}; it must be a positive integer or null")
    theta, scaling = _rope_theta(d, cfg_json)  # (a partial_rotary_factor and dynamic / longrope refused there)
    return config_json_gptconfig(
        cfg_json, KEYS, **{**shape_fields(shapes, sd, d, cfg_json), "mlp_hidden": 0}, bias=bias, context_length=context,
        attention_window=window or 0, position_encoding="rope", rope_theta=theta, rope_scaling=scaling,
        norm="layernorm", norm_eps=d.get("norm_epsilon", 1e-5), mlp="gelu", gelu_approximate=_GELU[act])


def _our_tensors(sd: dict, cfg: GPTConfig) -> dict:
    """Hugging Face StarCoder2 tensors under our parameter names (KeyError: a tensor the file lacks)."""
    ours = {"tok_emb.weight": sd["embed_tokens.weight"], "final_norm.weight": sd["norm.weight"],
            "final_norm.bias": sd["norm.bias"]}
    if not cfg.tie_weights:
        ours["out_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        for mine, theirs in _LAYER:
            ours[f"trf_blocks.{i}.{mine}.weight"] = sd[f"layers.{i}.{theirs}.weight"]
            if cfg.bias or mine in _NORMS:  # the LayerNorms have biases whatever use_bias says
                ours[f"trf_blocks.{i}.{mine}.bias"] = sd[f"layers.{i}.{theirs}.bias"]
    return ours


def load_starcoder2_safetensors(path) -> GPTModel:
    """GPTModel with the weights of a Hugging Face StarCoder2 model.safetensors (or shard index) and its
    config.json."""
    path = weights_file(path, "StarCoder2")
    cfg_json = path.parent / "config.json"
    sd = _read_tensors(path, prefix="model.")
    cfg = _check_hf_config(cfg_json, sd)
    return model_with_tensors(cfg, lambda: _our_tensors(sd, cfg), path)


# -- export: the inverse of _our_tensors -----------------------------------------------------------
def is_starcoder2_shaped(cfg: GPTConfig) -> bool:
    """A sequential RoPE model over LayerNorms with a GELU-tanh MLP, biases all or none and none on the LM head,
    whose grouped-query attention or sliding window a GPT-NeoX folder cannot say: export writes it as a StarCoder2.
    (The exact GELU with fewer key/value heads stays Falcon's, as before.)"""
    return (cfg.position_encoding == "rope" and cfg.norm == "layernorm" and cfg.mlp == "gelu"
            and cfg.gelu_approximate == "tanh" and not (cfg.parallel_residual or cfg.shared_norm or cfg.head_bias)
            and (cfg.kv_heads < cfg.n_head or bool(cfg.attention_window)))


def refuse_not_starcoder2(model: GPTModel, what: str) -> None:
    """Hugging Face's StarCoder2: RoPE over whole heads, LayerNorms with biases, a GELU MLP, scores scaled by
    1/sqrt(head_dim), sequential blocks, biases all or none, one sliding window over every layer or none. Another
    model's weights would give it other logits: refused by name."""
    cfg, family = model.config, "StarCoder2"
    refuse_moe_touches(cfg, family, what)
    refuse_norm_touches(cfg, family, what)
    for differs, why in ((cfg.mlp != "gelu", f"has a {cfg.mlp} MLP, where {family}'s is c_fc, GELU, c_proj"),
                         (cfg.position_encoding != "rope", f"{cfg.positions_said()}, where {family} rotates q and k "
                          "(RoPE)"),
                         (cfg.norm != "layernorm", f"normalizes with {cfg.norm}, where {family} has LayerNorms"),
                         (not cfg.scale_attention, "does not scale its attention scores by 1/sqrt(head_dim), "
                          f"which {family} does"),
                         (cfg.window_layers != "all", f"has local attention in some layers only (window_layers "
                          f"{cfg.window_layers!r}), where {family}'s sliding window covers every layer"),
                         (bool(cfg.logit_softcap), f"soft-caps its logits (logit_softcap {cfg.logit_softcap:g}), "
                          f"which {family} does not"),
                         (cfg.parallel_residual, f"runs attention and the MLP in parallel (parallel_residual), "
                          f"where {family}'s blocks are sequential"),
                         (cfg.head_bias, f"has a bias on its LM head (head_bias), which {family}'s has not"),
                         (cfg.qk_norm, f"normalizes q and k (qk_norm), which {family} does not"),
                         (cfg.bias and not cfg.qkv_bias or cfg.qkv_bias_only, "has biases on some linear layers "
                          f"only, where {family}'s have biases all or none (use_bias)"),
                         (bool(cfg.nope_layers), f"has layers without RoPE (nope_layers {cfg.nope_layers}), where "
                          f"every {family} layer rotates q and k"),
                         (bool(cfg.rope_local_theta), f"rotates its local layers with a RoPE base of their own "
                          f"(rope_local_theta {cfg.rope_local_theta:g}), where {family}'s layers share one")):
        if differs:
            raise UserError(f"this model {why}: it cannot be exported as {what}")
    refuse_gemma_touches(cfg, family, what, exact_gelu=True)  # (hidden_act "gelu" says it)
    refuse_phi3_touches(cfg, family, what)


def _hf_tensors(model: GPTModel) -> dict:
    """Our parameters under Starcoder2ForCausalLM's names; the padding rows dropped."""
    cfg = model.config
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    V = cfg.vocab_size
    hf = {"embed_tokens.weight": sd["tok_emb.weight"][:V], "norm.weight": sd["final_norm.weight"],
          "norm.bias": sd["final_norm.bias"]}
    for i in range(cfg.n_layer):
        for mine, theirs in _LAYER:
            hf[f"layers.{i}.{theirs}.weight"] = sd[f"trf_blocks.{i}.{mine}.weight"]
            if cfg.bias or mine in _NORMS:
                hf[f"layers.{i}.{theirs}.bias"] = sd[f"trf_blocks.{i}.{mine}.bias"]
    out = {"model." + k: v for k, v in hf.items()}
    if not cfg.tie_weights:
        out["lm_head.weight"] = sd["out_head.weight"][:V]
    return {k: v.to("cpu", memory_format=torch.contiguous_format, copy=True) for k, v in out.items()}


def hf_config(cfg: GPTConfig, eos_token_id: int | None = None) -> dict:
    """Starcoder2Config fields (config.json) for this model: what _check_hf_config reads back. RoPE's base and
    scaling written both ways (rope_parameters for transformers 5, rope_theta / rope_scaling for 4.x)."""
    return {"model_type": MODEL_TYPE, "architectures": ["Starcoder2ForCausalLM"], "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.context_length, "hidden_size": cfg.n_embd,
            "intermediate_size": cfg.ff_hidden, "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads,
            "hidden_act": "gelu" if cfg.gelu_approximate == "none" else "gelu_pytorch_tanh",
            "norm_epsilon": cfg.norm_eps, "use_bias": cfg.bias, "sliding_window": cfg.attention_window or None,
            "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})},
            "attention_dropout": 0.0, "residual_dropout": 0.0, "embedding_dropout": 0.0,
            "tie_word_embeddings": cfg.tie_weights, "bos_token_id": eos_token_id, "eos_token_id": eos_token_id,
            "pad_token_id": None}


def export_starcoder2(model: GPTModel, out_dir, eos_token_id: int | None = None, overwrite: bool = False) -> list:
    """Write model as a Hugging Face StarCoder2 folder (model.safetensors, config.json), which
    transformers.AutoModelForCausalLM.from_pretrained(out_dir) and load_checkpoint both read. Returns the paths
    written; refuses to replace them unless overwrite."""
    refuse_not_starcoder2(model, "a StarCoder2 folder")
    return write_hf_folder(out_dir, lambda: _hf_tensors(model), hf_config(model.config, eos_token_id), overwrite)
