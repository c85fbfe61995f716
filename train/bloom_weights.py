"""BLOOM weights (BigScience's BLOOM and BLOOMZ: Hugging Face's BloomForCausalLM, model_type "bloom") into
GPTModel, and back out.

A BLOOM is a GPT-2 with these differences:
- ALiBi instead of position embeddings (position_encoding "alibi"; layers.alibi_slopes is BLOOM's
  _get_alibi_slopes for any head count). BLOOM biases key j by +m_h j (its positions are the attention mask's
  cumsum, so a left-padded row counts from its first real token); ours by m_h (j - i). For an unpadded row the
  two differ by m_h i, a constant along each query's row, which the softmax does not see;
- a LayerNorm on the token embeddings before the first block (word_embeddings_layernorm): embed_norm;
- q, k and v fused in query_key_value, laid out per head: [H, 3, D] rows (gpt2_weights.per_head_qkv_rows);
- the tanh GELU (bloom_gelu_forward, GPT-2's gelu_new), an MLP 4 hidden_size wide, biases everywhere, a tied
  LM head.
pretraining_tp > 1 alone changes nothing in transformers' BLOOM. What this model does not compute is refused by
name: apply_residual_connection_post_layernorm true (the residual is the norm's output, not the block's input),
and slow_but_exact with pretraining_tp > 1: transformers then sums the two output projections (dense,
dense_4h_to_h) in slices of F.linear without their biases, which drops those biases.
"""
from pathlib import Path

import torch

from tritongpt._types import is_int
from tritongpt.errors import UserError, read_json_object
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.gpt2_weights import (_read_tensors, check_fused_rows, config_flag, config_json_gptconfig,
                                          fuse_rows, head_count, model_with_tensors, per_head_qkv_rows,
                                          plain_block_refusals, refuse_moe_touches, tied_head, weights_file,
                                          write_hf_folder)

MODEL_TYPE = "bloom"
# BLOOM has no position table; the context it was trained at (2048) unless config.json says one (seq_length)
DEFAULT_CONTEXT = 2048
# each block's tensors with a weight and a bias: ours, then Hugging Face's (under "h.{i}.")
_LAYER = (("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm"), ("att.out_proj", "self_attention.dense"),
          ("ff.fc1", "mlp.dense_h_to_4h"), ("ff.fc2", "mlp.dense_4h_to_h"))
_QKV = ("att.W_query", "att.W_key", "att.W_value")


def is_bloom_file(path) -> bool:
    """A Hugging Face BLOOM model.safetensors (or shard index): its config.json says so."""
    cfg_json = Path(path).parent / "config.json"
    return cfg_json.is_file() and read_json_object(cfg_json).get("model_type") == MODEL_TYPE


def _check_hf_config(cfg_json: Path, d: dict, sd: dict) -> GPTConfig:
    """The GPTConfig of a BLOOM config.json (d, its contents), checked against the tensors beside it; what this
    model does not compute refused by name."""
    if d.get("model_type") != MODEL_TYPE:
        raise UserError(f"{cfg_json} says model_type {d.get('model_type')!r}; a BLOOM folder's is {MODEL_TYPE}")
    if config_flag(d, "apply_residual_connection_post_layernorm", False, cfg_json):
        raise UserError(f"{cfg_json} has apply_residual_connection_post_layernorm true (each block's residual is its "
                        "LayerNorm's output); this model adds the block's input")
    tp = d.get("pretraining_tp", 1)
    if config_flag(d, "slow_but_exact", False, cfg_json) and tp != 1:
        raise UserError(f"{cfg_json} has slow_but_exact true with pretraining_tp {tp!r}: transformers' BLOOM then "
                        "computes its output projections without their biases, which this model adds")
    try:
        vocab, n_embd = sd["word_embeddings.weight"].shape
        hidden = sd["h.0.mlp.dense_h_to_4h.weight"].shape[0]
        sd["word_embeddings_layernorm.weight"]
    except KeyError as e:
        raise UserError(f"{cfg_json.parent}: not a BLOOM model, missing tensor {e.args[0]!r}") from None
    n_layer = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("h.")), default=-1)
    key = "num_attention_heads" if "n_head" not in d and "num_attention_heads" in d else "n_head"  # (its alias)
    n_head = head_count(d.get(key, 8), key, n_embd, cfg_json)
    width = d.get("hidden_size", d.get("n_embed"))
    for key, want, have in (("vocab_size", d.get("vocab_size"), vocab), ("hidden_size", width, n_embd),
                            ("n_layer", d.get("n_layer"), n_layer)):
        if want is not None and want != have:
            raise UserError(f"{cfg_json} says {key} {want!r}, but the weights have {have}")
    check_fused_rows(sd, "h.{i}.self_attention.query_key_value", n_layer, 3 * n_embd,
                     f"{n_head} heads' queries, keys and values of {n_embd // n_head}", cfg_json.parent)
    if hidden != 4 * n_embd:
        raise UserError(f"{cfg_json.parent}: dense_h_to_4h has {hidden} rows; BLOOM's MLP is 4 hidden_size wide "
                        f"({4 * n_embd})")
    context = d.get("seq_length", DEFAULT_CONTEXT)
    if not is_int(context) or context < 1:
        raise UserError(f"{cfg_json} says seq_length {context!r}; a context length is a positive integer")
    head = sd.get("lm_head.weight")
    return config_json_gptconfig(
        cfg_json, {"norm_eps": "layer_norm_epsilon"}, vocab_size=vocab, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        context_length=context, position_encoding="alibi", embed_norm=True, norm_eps=d.get("layer_norm_epsilon", 1e-5),
        tie_weights=tied_head(d, head, sd["word_embeddings.weight"], "lm_head.weight", cfg_json),
        gelu_approximate="tanh")


def _our_tensors(sd: dict, cfg: GPTConfig) -> dict:
    """Hugging Face BLOOM tensors under our parameter names (KeyError: a tensor the file lacks)."""
    ours = {"tok_emb.weight": sd["word_embeddings.weight"]}
    for kind in ("weight", "bias"):
        ours[f"embed_norm.{kind}"] = sd[f"word_embeddings_layernorm.{kind}"]
        ours[f"final_norm.{kind}"] = sd[f"ln_f.{kind}"]
    if not cfg.tie_weights:
        ours["out_head.weight"] = sd["lm_head.weight"]
    split = per_head_qkv_rows(cfg.n_head, cfg.head_dim)  # [H, 3, D], as BloomAttention._reshape views them
    for i in range(cfg.n_layer):
        h, b = f"h.{i}.", f"trf_blocks.{i}."
        for kind in ("weight", "bias"):
            fused = sd[f"{h}self_attention.query_key_value.{kind}"]
            for name, rows in zip(_QKV, split):
                ours[f"{b}{name}.{kind}"] = fused[rows]
            for mine, theirs in _LAYER:
                ours[f"{b}{mine}.{kind}"] = sd[f"{h}{theirs}.{kind}"]
    return ours


def load_bloom_safetensors(path) -> GPTModel:
    """GPTModel with the weights of a Hugging Face BLOOM model.safetensors (or shard index) and its config.json
    beside it."""
    path = weights_file(path, "BLOOM")
    sd = _read_tensors(path, prefix="transformer.")
    cfg_json = path.parent / "config.json"
    cfg = _check_hf_config(cfg_json, read_json_object(cfg_json), sd)
    return model_with_tensors(cfg, lambda: _our_tensors(sd, cfg), path)


# -- export: the inverse of _our_tensors -----------------------------------------------------------
def is_bloom_shaped(cfg: GPTConfig) -> bool:
    """ALiBi with a norm on the embeddings: what export writes as a BLOOM (or refuses)."""
    return cfg.position_encoding == "alibi" and cfg.embed_norm


def refuse_not_bloom(model: GPTModel, what: str) -> None:
    """What Hugging Face's BLOOM does not compute, by name."""
    cfg = model.config
    refuse_moe_touches(cfg, "BLOOM", what, embed_norm=True)
    for differs, why in ((cfg.position_encoding != "alibi", f"{cfg.positions_said()}, where BLOOM biases its "
                          "attention scores by distance (ALiBi)"),
                         (cfg.alibi_scaled, "adds ALiBi's bias before the scores' 1/sqrt(head_dim) scale "
                          "(alibi_scaled, Falcon-RW's), where BLOOM adds it after"),
                         (not cfg.embed_norm, "does not normalize its token embeddings (embed_norm), which BLOOM "
                          "does"),
                         (cfg.norm != "layernorm", f"normalizes with {cfg.norm}, where BLOOM has LayerNorms"),
                         (not cfg.norm_bias, "has LayerNorms without biases (norm_bias False), where BLOOM's have "
                          "them"),
                         (cfg.mlp != "gelu", f"has a {cfg.mlp} MLP, where BLOOM's is GELU"),
                         (cfg.gelu_approximate != "tanh", "computes the exact GELU, where BLOOM's is the tanh one"),
                         (not cfg.bias or not cfg.has_qkv_bias, "has projections without biases, where BLOOM has "
                          "them on all"),
                         (cfg.head_bias, "has an LM-head bias, which BLOOM does not"),
                         (cfg.kv_heads < cfg.n_head, f"has {cfg.kv_heads} key/value heads for {cfg.n_head} query "
                          "heads, where BLOOM has one for each"),
                         (cfg.parallel_residual, "has parallel blocks, where BLOOM's are sequential"),
                         (cfg.qk_norm, "normalizes q and k (qk_norm), which BLOOM does not"),
                         *plain_block_refusals(cfg, "BLOOM")):
        if differs:
            raise UserError(f"this model {why}: it cannot be exported as {what}")


def hf_config(cfg: GPTConfig, eos_token_id: int | None = None) -> dict:
    """BloomConfig fields for this model (what _check_hf_config reads back; seq_length keeps the context)."""
    return {"model_type": MODEL_TYPE, "architectures": ["BloomForCausalLM"], "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "seq_length": cfg.context_length,
            "layer_norm_epsilon": cfg.norm_eps, "apply_residual_connection_post_layernorm": False,
            "hidden_dropout": 0.0, "attention_dropout": 0.0, "pretraining_tp": 1, "slow_but_exact": False,
            "tie_word_embeddings": cfg.tie_weights, "bos_token_id": eos_token_id, "eos_token_id": eos_token_id,
            "pad_token_id": None}


def _hf_tensors(model: GPTModel) -> dict:
    """Our parameters under BloomForCausalLM's names, q, k and v fused per head, the padding rows dropped."""
    cfg = model.config
    V = cfg.vocab_size
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    hf = {"word_embeddings.weight": sd["tok_emb.weight"][:V]}
    for kind in ("weight", "bias"):
        hf[f"word_embeddings_layernorm.{kind}"] = sd[f"embed_norm.{kind}"]
        hf[f"ln_f.{kind}"] = sd[f"final_norm.{kind}"]
    split = per_head_qkv_rows(cfg.n_head, cfg.head_dim)
    for i in range(cfg.n_layer):
        h, b = f"h.{i}.", f"trf_blocks.{i}."
        for kind in ("weight", "bias"):
            hf[f"{h}self_attention.query_key_value.{kind}"] = fuse_rows([sd[f"{b}{name}.{kind}"] for name in _QKV],
                                                                          split)
            for mine, theirs in _LAYER:
                hf[f"{h}{theirs}.{kind}"] = sd[f"{b}{mine}.{kind}"]
    out = {"transformer." + k: v for k, v in hf.items()}
    if not cfg.tie_weights:
        out["lm_head.weight"] = sd["out_head.weight"][:V]
    return {k: v.to("cpu", memory_format=torch.contiguous_format, copy=True) for k, v in out.items()}


def export_bloom(model: GPTModel, out_dir, eos_token_id: int | None = None, overwrite: bool = False) -> list:
    """Write model as a Hugging Face BLOOM folder: model.safetensors and config.json, which
    transformers.AutoModelForCausalLM.from_pretrained(out_dir) and load_checkpoint both read.
    Returns the paths written; refuses to replace them unless overwrite."""
    refuse_not_bloom(model, "a BLOOM folder")
    return write_hf_folder(out_dir, lambda: _hf_tensors(model), hf_config(model.config, eos_token_id), overwrite)
