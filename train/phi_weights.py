"""Phi-1, Phi-1.5 and Phi-2 weights (Microsoft: Hugging Face's PhiForCausalLM, model_type "phi") into GPTModel,
and back out.

A Phi is a GPT-2 with RoPE (no position embeddings) and these differences:
- its blocks are parallel on one norm: h = input_layernorm(x), x + attention(h) + mlp(h), GPTConfig.parallel_residual
  with shared_norm (no second norm: GPT-J's and Falcon-7B's block too);
- its LM head has a bias (lm_head.bias), GPTConfig.head_bias; its weight is the embedding where the file has
  none and tie_word_embeddings says true (or one equal to it: gpt2_weights.tied_head);
- q, k and v are projections of their own (q_proj, k_proj, v_proj, with biases; fewer key/value heads when
  num_key_value_heads says), the output projection is self_attn.dense, the MLP fc1 and fc2 (GELU: gelu_new, the
  tanh form; "gelu" the exact one, GPTConfig.gelu_approximate);
- its RoPE turns the first partial_rotary_factor of each head (0.5 in Phi-1 and 1.5: 32 of 64; 0.4 in Phi-2: 32 of
  80; PhiConfig's 0.5 when absent), GPTConfig.rotary_dim;
- qk_layernorm (false in every published Phi) is one LayerNorm over each head's q and one over its k, shared by the
  heads: GPTConfig.qk_norm with LayerNorms per head.
The Hub's first revisions of these models (remote code: model_type "phi-msft" or "mixformer-sequential") name their
tensors otherwise and are refused by name; what this model does not compute is too: RoPE scaling, another
activation, an MLP not 4 hidden_size wide, a head_dim other than hidden_size / num_attention_heads.
"""
from pathlib import Path

import torch

from tritongpt.errors import UserError, read_json_object
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.gpt2_weights import (_read_tensors, config_flag, config_json_gptconfig, head_count,
                                          model_with_tensors, plain_block_refusals, refuse_moe_touches, tied_head,
                                          weights_file, write_hf_folder)
from tritongpt.train.llama_weights import unscaled_partial_rope
from tritongpt.train.neox_weights import ACTIVATIONS

MODEL_TYPE, ARCHITECTURE = "phi", "PhiForCausalLM"
REMOTE_CODE_TYPES = ("phi-msft", "mixformer-sequential")  # the Hub's first Phi-1.5 and Phi-2 revisions
# each block's tensors with a weight and a bias: ours, then Hugging Face's (under "model.layers.{i}.")
_LAYER = (("norm1", "input_layernorm"), ("att.W_query", "self_attn.q_proj"), ("att.W_key", "self_attn.k_proj"),
          ("att.W_value", "self_attn.v_proj"), ("att.out_proj", "self_attn.dense"), ("ff.fc1", "mlp.fc1"),
          ("ff.fc2", "mlp.fc2"))
_QK_NORMS = (("att.q_norm", "self_attn.q_layernorm"), ("att.k_norm", "self_attn.k_layernorm"))


def is_phi_file(path) -> bool:
    """A Hugging Face Phi-1/1.5/2 model.safetensors (or shard index): its config.json says model_type phi (or one of
    the remote-code types, which the loader refuses by name)."""
    cfg_json = Path(path).parent / "config.json"
    return cfg_json.is_file() and read_json_object(cfg_json).get("model_type") in (MODEL_TYPE, *REMOTE_CODE_TYPES)


def _positive_int(d: dict, key: str, default, cfg_json) -> int:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{cfg_json} has {key} {value!r}; it must be a positive integer")
    return value


def _check_hf_config(cfg_json: Path, sd: dict) -> GPTConfig:
    """The GPTConfig of a Phi config.json (PhiConfig's defaults where it says nothing), checked against the tensors
    beside it; what this model does not compute refused by name."""
    d = read_json_object(cfg_json)
    kind = d.get("model_type")
    if kind in REMOTE_CODE_TYPES:
        raise UserError(f"{cfg_json} says model_type {kind!r}: the remote-code Phi format of the Hub's first "
                        "revisions, whose tensors have other names; download the transformers-format revision "
                        "(model_type 'phi', PhiForCausalLM: the main branch of microsoft/phi-1, phi-1_5 and phi-2)")
    if kind != MODEL_TYPE:
        raise UserError(f"{cfg_json} says model_type {kind!r}; a Phi-1/1.5/2 folder's is {MODEL_TYPE!r}")
    try:
        vocab, n_embd = sd["embed_tokens.weight"].shape
        hidden = sd["layers.0.mlp.fc1.weight"].shape[0]
        kv_rows = sd["layers.0.self_attn.k_proj.weight"].shape[0]
    except KeyError as e:
        raise UserError(f"{cfg_json.parent}: not a Phi model, missing tensor {e.args[0]!r}") from None
    n_layer = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("layers.")), default=-1)
    n_head = head_count(d.get("num_attention_heads", 32), "num_attention_heads", n_embd, cfg_json)
    head_dim = n_embd // n_head
    if d.get("head_dim", head_dim) != head_dim:
        raise UserError(f"{cfg_json} has head_dim {d['head_dim']!r}; Phi's heads are hidden_size / "
                        f"num_attention_heads wide ({head_dim}), as its q/k LayerNorms are")
    n_kv = d.get("num_key_value_heads") or n_head  # None: as many as the query heads (PhiConfig)
    n_kv = _positive_int({"num_key_value_heads": n_kv}, "num_key_value_heads", None, cfg_json)
    for key, have in (("vocab_size", vocab), ("hidden_size", n_embd), ("num_hidden_layers", n_layer),
                      ("intermediate_size", hidden), ("num_key_value_heads", kv_rows // head_dim)):
        if key in d and d[key] is not None and d[key] != have:
            raise UserError(f"{cfg_json} says {key} {d[key]!r}, but the weights have {have}")
    if n_head % n_kv or n_kv * head_dim != kv_rows:
        raise UserError(f"{cfg_json}: {n_kv} key/value heads of {head_dim} do not make k_proj's {kv_rows} rows, or "
                        f"do not divide the {n_head} query heads")
    if hidden != 4 * n_embd:
        raise UserError(f"{cfg_json} has intermediate_size {hidden}; this model's GELU MLP is 4 hidden_size wide "
                        f"({4 * n_embd})")
    act = d.get("hidden_act", "gelu_new")
    if act not in ACTIVATIONS:
        raise UserError(f"{cfg_json} has hidden_act {act!r}; this model's GELU MLP computes "
                        f"{', '.join(map(repr, ACTIVATIONS))} only")
    qk_norm = config_flag(d, "qk_layernorm", False, cfg_json)
    # PhiConfig's partial_rotary_factor is 0.5 when config.json says none
    theta, rotary = unscaled_partial_rope(d, head_dim, cfg_json, "Phi", factor_default=0.5)
    return config_json_gptconfig(
        cfg_json, {"norm_eps": "layer_norm_eps"}, vocab_size=vocab, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        n_kv_head=0 if n_kv == n_head else n_kv,
        context_length=_positive_int(d, "max_position_embeddings", 2048, cfg_json), position_encoding="rope",
        rope_theta=theta, rotary_dim=rotary, norm_eps=d.get("layer_norm_eps", 1e-5), qk_norm=qk_norm,
        # tied as the weights say (tied_head): PhiForCausalLM keeps a head of the file's own even where
        # tie_word_embeddings says true, and one read as the embedding there was another model than transformers'
        tie_weights=tied_head(d, sd.get("lm_head.weight"), sd["embed_tokens.weight"], "lm_head.weight", cfg_json),
        parallel_residual=True, shared_norm=True, head_bias=True, gelu_approximate=ACTIVATIONS[act])


def _our_tensors(sd: dict, cfg: GPTConfig) -> dict:
    """Hugging Face Phi tensors under our parameter names (KeyError: a tensor the file lacks)."""
    ours = {"tok_emb.weight": sd["embed_tokens.weight"], "final_norm.weight": sd["final_layernorm.weight"],
            "final_norm.bias": sd["final_layernorm.bias"], "out_head.bias": sd["lm_head.bias"]}
    if not cfg.tie_weights:
        ours["out_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        h, b = f"layers.{i}.", f"trf_blocks.{i}."
        for mine, theirs in _LAYER + (_QK_NORMS if cfg.qk_norm else ()):
            for kind in ("weight", "bias"):
                ours[f"{b}{mine}.{kind}"] = sd[f"{h}{theirs}.{kind}"]
    return ours


def load_phi_safetensors(path) -> GPTModel:
    """GPTModel with the weights of a Hugging Face Phi-1/1.5/2 model.safetensors (or shard index) and its
    config.json beside it."""
    path = weights_file(path, "Phi")
    # lm_head.* keep their names; the rest lose PhiForCausalLM's "model."
    sd = _read_tensors(path, prefix="model.")
    cfg = _check_hf_config(path.parent / "config.json", sd)
    return model_with_tensors(cfg, lambda: _our_tensors(sd, cfg), path)


# -- export: the inverse of _our_tensors -----------------------------------------------------------
def is_phi_shaped(cfg: GPTConfig) -> bool:
    """RoPE over LayerNorms with a GELU MLP, and Phi's touches (one norm in a parallel block, a bias on the LM
    head): what export writes as a Phi (or refuses, naming what Phi cannot say)."""
    return cfg.position_encoding == "rope" and cfg.norm == "layernorm" and cfg.mlp == "gelu" and \
        (cfg.shared_norm or cfg.head_bias)


def refuse_not_phi(model: GPTModel, what: str) -> None:
    """What Hugging Face's Phi does not compute, by name. (A bias it lacks is written as zeros: the same function.)"""
    cfg = model.config
    refuse_moe_touches(cfg, "Phi", what)
    for differs, why in ((not cfg.parallel_residual, "runs attention then MLP, where Phi's blocks run them side by "
                          "side (parallel_residual)"),
                         (cfg.parallel_residual and not cfg.shared_norm, "normalizes each sublayer's input with a "
                          "norm of its own, where Phi's parallel blocks have one (shared_norm)"),
                         (cfg.position_encoding != "rope", f"{cfg.positions_said()}, where Phi rotates q and k "
                          "(RoPE)"),
                         (cfg.norm != "layernorm", f"normalizes with {cfg.norm}, where Phi has LayerNorms"),
                         (cfg.mlp != "gelu", f"has a {cfg.mlp} MLP, where Phi's is GELU"),
                         (cfg.qk_norm and cfg.qk_norm_width != "head", "normalizes q and k over all heads at once "
                          "(qk_norm_width 'all'), where Phi's qk_layernorm is per head"),
                         (cfg.rope_scaling is not None, "scales RoPE's frequencies (rope_scaling), which this export "
                          "does not write"),
                         *plain_block_refusals(cfg, "Phi")):
        if differs:
            raise UserError(f"this model {why}: it cannot be exported as {what}")


def _hf_tensors(model: GPTModel) -> dict:
    """Our parameters under PhiForCausalLM's names, the padding rows dropped, zeros for biases the model lacks."""
    cfg = model.config
    V = cfg.vocab_size
    sd = {k: v.detach() for k, v in model.state_dict().items()}  # a tied head's weight under both names

    def bias(name):  # Phi's linear layers and head all have one: a model without writes zeros, the same function
        w = sd[f"{name}.weight"]
        return sd.get(f"{name}.bias", w.new_zeros(w.shape[0]))

    hf = {"model.embed_tokens.weight": sd["tok_emb.weight"][:V], "lm_head.bias": bias("out_head")[:V],
          "model.final_layernorm.weight": sd["final_norm.weight"], "model.final_layernorm.bias": sd["final_norm.bias"]}
    if not cfg.tie_weights:
        hf["lm_head.weight"] = sd["out_head.weight"][:V]
    for i in range(cfg.n_layer):
        h, b = f"model.layers.{i}.", f"trf_blocks.{i}."
        for mine, theirs in _LAYER + (_QK_NORMS if cfg.qk_norm else ()):
            hf[f"{h}{theirs}.weight"] = sd[f"{b}{mine}.weight"]
            hf[f"{h}{theirs}.bias"] = bias(b + mine)
    return {k: v.to("cpu", memory_format=torch.contiguous_format, copy=True) for k, v in hf.items()}


def hf_config(cfg: GPTConfig, eos_token_id: int | None = None) -> dict:
    """PhiConfig fields for this model: what _check_hf_config reads back. RoPE both ways: rope_parameters
    (transformers 5) and rope_theta / partial_rotary_factor (4.x)."""
    factor = cfg.rotary_dim / cfg.head_dim if cfg.rotary_dim else 1.0  # int(head_dim * factor) reads rotary_dim back
    return {"model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.context_length, "hidden_size": cfg.n_embd,
            "intermediate_size": 4 * cfg.n_embd, "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads,
            "hidden_act": "gelu" if cfg.gelu_approximate == "none" else "gelu_new", "layer_norm_eps": cfg.norm_eps,
            "qk_layernorm": cfg.qk_norm, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attention_dropout": 0.0,
            "tie_word_embeddings": cfg.tie_weights, "bos_token_id": eos_token_id, "eos_token_id": eos_token_id,
            "pad_token_id": None, "rope_theta": cfg.rope_theta, "partial_rotary_factor": factor,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": factor}}


def export_phi(model: GPTModel, out_dir, eos_token_id: int | None = None, overwrite: bool = False) -> list:
    """Write model as a Hugging Face Phi folder: model.safetensors and config.json, which
    transformers.AutoModelForCausalLM.from_pretrained(out_dir) and load_checkpoint both read.
    Returns the paths written; refuses to replace them unless overwrite."""
    refuse_not_phi(model, "a Phi folder")
    return write_hf_folder(out_dir, lambda: _hf_tensors(model), hf_config(model.config, eos_token_id), overwrite)
