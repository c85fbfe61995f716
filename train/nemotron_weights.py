"""Nemotron weights (Hugging Face's NemotronForCausalLM: NVIDIA's Nemotron-4, Minitron) into GPTModel, and back out.

A Nemotron is a Llama's layout with three changes: its norms are LayerNorm1P, a LayerNorm with a bias whose scale is
1 + weight; its MLP has no gate, down_proj(relu2(up_proj(x))) (GPTConfig.mlp "relu2", mlp_hidden its
intermediate_size: Arcee's); and RoPE rotates only the first int(head_dim * partial_rotary_factor) dimensions of
each head (GPTConfig.rotary_dim; NemotronConfig's factor is 0.5 where config.json is silent). Grouped-query
attention, biases on every projection or none (attention_bias and mlp_bias must agree: GPTConfig.bias), an untied
head unless tie_word_embeddings. NemotronConfig's defaults where config.json is silent: norm_eps 1e-5,
max_position_embeddings 4096, RoPE base 10000.

LayerNorm1P's 1 + w is folded into the weights at load, as Gemma's RMSNorm (1 + w) is (train/gemma_weights.py): our
LayerNorm then multiplies by the weight as stored, on both kernel paths, nothing added to them. transformers itself
computes the scale as the float sum w + 1.0 in the weight's dtype, so the folded weight is the very scale it uses:
the logits are the same. Export writes s - 1, which is exact for a folded scale s >= 0.5 (Sterbenz below 1, and
1 a multiple of s's ulp above it), so the scale transformers makes of it, (s - 1) + 1.0, is s bit for bit. (The
file's w itself may not come back bit for bit: w + 1 rounds away w's low bits, as transformers' own sum does.)
What this model does not compute is refused by name: another activation, biases on the attention or the MLP only, a
RoPE scaling other than linear, llama3 and YaRN.

`export` writes a Nemotron folder for a squared-ReLU model over LayerNorms (commands.export_target; over RMSNorms it
is an Arcee), which transformers loads with the same logits, and load_checkpoint reads it back.
"""
from pathlib import Path

import torch

from tritongpt.errors import UserError, read_json_object
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.arcee_weights import _LAYER, _NORMS, relu2_mlp_shapes  # (Arcee's tensors: Llama's, no gate_proj)
from tritongpt.train.gpt2_weights import (_read_tensors, config_flag, config_json_gptconfig, model_with_tensors,
                                          refuse_gemma_touches, refuse_moe_touches, refuse_norm_touches, weights_file,
                                          write_hf_folder)
from tritongpt.train.llama_weights import (_rope_theta, partial_rotary_dim, read_rope_parameters,
                                           rope_field, shape_fields)

MODEL_TYPE = "nemotron"
KEYS = {"context_length": "max_position_embeddings", "norm_eps": "norm_eps", "n_kv_head": "num_key_value_heads"}


def is_nemotron_file(path) -> bool:
    """A Hugging Face Nemotron model.safetensors (or shard index): its config.json says model_type "nemotron"."""
    cfg_json = Path(path).parent / "config.json"
    return cfg_json.is_file() and read_json_object(cfg_json).get("model_type") == MODEL_TYPE


def _check_hf_config(cfg_json: Path, sd: dict) -> GPTConfig:
    """The GPTConfig of a Nemotron config.json, checked against the tensors beside it."""
    d = read_json_object(cfg_json)
    shapes = relu2_mlp_shapes(d, sd, cfg_json, "Nemotron", "a")
    attention_bias, mlp_bias = (config_flag(d, k, False, cfg_json, MODEL_TYPE) for k in ("attention_bias", "mlp_bias"))
    if attention_bias != mlp_bias:
        raise UserError(f"{cfg_json} has attention_bias {str(attention_bias).lower()} and mlp_bias "
                        f"{str(mlp_bias).lower()}; this model's linear layers have biases all or none (GPTConfig.bias)")
    rope = read_rope_parameters(d, cfg_json)
    p, where = rope
    # NemotronConfig's partial_rotary_factor defaults to 0.5 (top level or in rope_parameters, as transformers reads)
    factor = rope_field(d, p, where, "partial_rotary_factor", ("partial_rotary_factor",), 0.5, cfg_json, "Nemotron")
    rotary = partial_rotary_dim(factor, shapes[6], f"{cfg_json} has")
    # the base and the scaling as the Llama reader reads them (its refusal of a partial factor: read above)
    theta, scaling = _rope_theta({k: v for k, v in d.items() if k != "partial_rotary_factor"}, cfg_json,
                                 rope=({k: v for k, v in p.items() if k != "partial_rotary_factor"}, where))
    return config_json_gptconfig(
        cfg_json, KEYS, **shape_fields(shapes, sd, d, cfg_json), bias=attention_bias,
        context_length=d.get("max_position_embeddings", 4096), position_encoding="rope", rope_theta=theta,
        rope_scaling=scaling, rotary_dim=rotary, norm="layernorm", norm_eps=d.get("norm_eps", 1e-5), mlp="relu2")


def _our_tensors(sd: dict, cfg: GPTConfig) -> dict:
    """Hugging Face Nemotron tensors under our parameter names, LayerNorm1P's scales folded to 1 + w (KeyError: a
    tensor the file lacks)."""
    ours = {"tok_emb.weight": sd["embed_tokens.weight"], "final_norm.weight": sd["norm.weight"] + 1.0,
            "final_norm.bias": sd["norm.bias"]}
    if not cfg.tie_weights:
        ours["out_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        for mine, theirs in _LAYER:
            w = sd[f"layers.{i}.{theirs}.weight"]
            ours[f"trf_blocks.{i}.{mine}.weight"] = w + 1.0 if mine in _NORMS else w
            if cfg.bias or mine in _NORMS:  # the LayerNorms have biases whatever attention_bias says
                ours[f"trf_blocks.{i}.{mine}.bias"] = sd[f"layers.{i}.{theirs}.bias"]
    return ours


def load_nemotron_safetensors(path) -> GPTModel:
    """GPTModel with the weights of a Hugging Face Nemotron model.safetensors (or shard index) and its config.json."""
    path = weights_file(path, "Nemotron")
    cfg_json = path.parent / "config.json"
    sd = _read_tensors(path, prefix="model.")
    cfg = _check_hf_config(cfg_json, sd)
    return model_with_tensors(cfg, lambda: _our_tensors(sd, cfg), path)


# -- export: the inverse of _our_tensors -----------------------------------------------------------
def refuse_not_nemotron(model: GPTModel, what: str) -> None:
    """Hugging Face's Nemotron: RoPE (whole or partial heads), LayerNorm1Ps with biases, the squared-ReLU MLP, scores
    scaled by 1/sqrt(head_dim) over the whole context, sequential blocks, biases all or none. Another model's
    weights would give it other logits: refused by name."""
    cfg, family = model.config, "Nemotron"
    refuse_moe_touches(cfg, family, what)
    refuse_norm_touches(cfg, family, what)
    for differs, why in ((cfg.mlp != "relu2", f"has a {cfg.mlp} MLP, where {family}'s is up_proj, relu^2, down_proj "
                          "(mlp 'relu2')"),
                         (cfg.position_encoding != "rope", f"{cfg.positions_said()}, where {family} rotates q and k "
                          "(RoPE)"),
                         (cfg.norm != "layernorm", f"normalizes with {cfg.norm}, where {family} has LayerNorms"),
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
                         (cfg.bias and not cfg.qkv_bias or cfg.qkv_bias_only, "has biases on some linear layers "
                          f"only, where {family}'s have biases all or none"),
                         ((cfg.rope_scaling or {}).get("rope_type") == "longrope", "scales RoPE by LongRoPE, which "
                          f"{family} does not"),
                         (bool(cfg.nope_layers), f"has layers without RoPE (nope_layers {cfg.nope_layers}), where "
                          f"every {family} layer rotates q and k"),
                         (bool(cfg.rope_local_theta), f"rotates its local layers with a RoPE base of their own "
                          f"(rope_local_theta {cfg.rope_local_theta:g}), where {family}'s layers share one")):
        if differs:
            raise UserError(f"this model {why}: it cannot be exported as {what}")
    refuse_gemma_touches(cfg, family, what)


def _hf_tensors(model: GPTModel) -> dict:
    """Our parameters under NemotronForCausalLM's names, the norms' scales written as LayerNorm1P's w = s - 1; the
    padding rows dropped."""
    cfg = model.config
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    V = cfg.vocab_size
    hf = {"embed_tokens.weight": sd["tok_emb.weight"][:V], "norm.weight": sd["final_norm.weight"] - 1.0,
          "norm.bias": sd["final_norm.bias"]}
    for i in range(cfg.n_layer):
        for mine, theirs in _LAYER:
            w = sd[f"trf_blocks.{i}.{mine}.weight"]
            hf[f"layers.{i}.{theirs}.weight"] = w - 1.0 if mine in _NORMS else w
            if cfg.bias or mine in _NORMS:
                hf[f"layers.{i}.{theirs}.bias"] = sd[f"trf_blocks.{i}.{mine}.bias"]
    out = {"model." + k: v for k, v in hf.items()}
    if not cfg.tie_weights:
        out["lm_head.weight"] = sd["out_head.weight"][:V]
    return {k: v.to("cpu", memory_format=torch.contiguous_format, copy=True) for k, v in out.items()}


def hf_config(cfg: GPTConfig, eos_token_id: int | None = None) -> dict:
    """NemotronConfig fields (config.json) for this model: what _check_hf_config reads back. The rotary factor is
    always written (NemotronConfig's default is 0.5, not the whole head); RoPE both ways (rope_parameters for
    transformers 5, rope_theta / rope_scaling for 4.x)."""
    factor = cfg.rotary_dim / cfg.head_dim if cfg.rotary_dim else 1.0  # int(head_dim * factor) reads rotary_dim back
    return {"model_type": MODEL_TYPE, "architectures": ["NemotronForCausalLM"], "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.context_length, "hidden_size": cfg.n_embd,
            "intermediate_size": cfg.ff_hidden, "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
            "hidden_act": "relu2", "norm_eps": cfg.norm_eps, "attention_bias": cfg.bias, "mlp_bias": cfg.bias,
            "partial_rotary_factor": factor, "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                                "partial_rotary_factor": factor, **(cfg.rope_scaling or {})},
            "attention_dropout": 0.0, "tie_word_embeddings": cfg.tie_weights, "bos_token_id": eos_token_id,
            "eos_token_id": eos_token_id, "pad_token_id": None}


def export_nemotron(model: GPTModel, out_dir, eos_token_id: int | None = None, overwrite: bool = False) -> list:
    """Write model as a Hugging Face Nemotron folder (model.safetensors, config.json), which
    transformers.AutoModelForCausalLM.from_pretrained(out_dir) and load_checkpoint both read. Returns the paths
    written; refuses to replace them unless overwrite."""
    refuse_not_nemotron(model, "a Nemotron folder")
    return write_hf_folder(out_dir, lambda: _hf_tensors(model), hf_config(model.config, eos_token_id), overwrite)
