"""MPT weights (MosaicML's MPT-7B, MPT-30B: Hugging Face's MptForCausalLM, model_type "mpt") into GPTModel, and
back out.

An MPT is a GPT-2 with these differences:
- ALiBi instead of position embeddings (position_encoding "alibi"). MPT's slopes are 2^(-alibi_bias_max i / H)
  for i = 1..H when H is a power of two, and for other head counts the next power of two's, odd positions first
  then even ones: at alibi_bias_max 8 that is BLOOM's rule (layers.alibi_slopes), whose extra slopes are the
  next power of two's in between. MPT biases key j by m_h (j - last key), ours by m_h (j - i): a constant
  along each query's row, which the softmax does not see;
- no biases at all (no_bias): its Linears have none (bias False) and neither have its LayerNorms (norm_bias
  False);
- q, k and v fused in Wqkv: [3C, C], the q rows, then k's, then v's;
- the exact GELU (gelu_approximate "none"), an MLP 4 d_model wide (transformers' MptMLP; expansion_ratio other
  than 4 refused), a tied LM head.
What this model does not compute is refused by name (attn_config's clip_qkv, qk_ln, softmax_scale, prefix_lm,
attn_uses_sequence_id, another attn_type, alibi false or alibi_bias_max other than 8; logit_scale; no_bias
false; a learned position table). transformers ignores several of these (alibi_bias_max, logit_scale, no_bias),
MosaicML's own code does not: a folder that sets them means another function than the one either would load.
"""
import math
from pathlib import Path

import torch

from tritongpt.errors import UserError, read_json_object
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.gpt2_weights import (_read_tensors, config_json_gptconfig, head_count, model_with_tensors,
                                          plain_block_refusals, refuse_moe_touches, tied_head, weights_file,
                                          write_hf_folder)

MODEL_TYPE = "mpt"
# each block's tensors (weights only): ours, then Hugging Face's (under "blocks.{i}.")
_LAYER = (("norm1", "norm_1"), ("norm2", "norm_2"), ("att.out_proj", "attn.out_proj"), ("ff.fc1", "ffn.up_proj"),
          ("ff.fc2", "ffn.down_proj"))
_QKV = ("att.W_query", "att.W_key", "att.W_value")
# attn_config's fields that change the function, and the value this model computes
_ATTN_MUST = {"attn_type": "multihead_attention", "clip_qkv": None, "qk_ln": False, "prefix_lm": False,
              "attn_uses_sequence_id": False, "alibi": True, "alibi_bias_max": 8}


def is_mpt_file(path) -> bool:
    """A Hugging Face MPT model.safetensors (or shard index): its config.json says so."""
    cfg_json = Path(path).parent / "config.json"
    return cfg_json.is_file() and read_json_object(cfg_json).get("model_type") == MODEL_TYPE


def _check_hf_config(cfg_json: Path, d: dict, sd: dict) -> GPTConfig:
    """The GPTConfig of an MPT config.json (d, its contents), checked against the tensors beside it; what this
    model does not compute refused by name."""
    if d.get("model_type") != MODEL_TYPE:
        raise UserError(f"{cfg_json} says model_type {d.get('model_type')!r}; an MPT folder's is {MODEL_TYPE}")
    try:
        vocab, n_embd = sd["wte.weight"].shape
        hidden = sd["blocks.0.ffn.up_proj.weight"].shape[0]
    except KeyError as e:
        raise UserError(f"{cfg_json.parent}: not an MPT model, missing tensor {e.args[0]!r}") from None
    attn = d.get("attn_config") or {}
    if not isinstance(attn, dict):
        raise UserError(f"{cfg_json} has attn_config {attn!r}; a dict of the attention's fields is expected")
    for key, want in _ATTN_MUST.items():
        if attn.get(key, want) != want:
            raise UserError(f"{cfg_json} has attn_config.{key} {attn[key]!r}; this model computes {want!r} only")
    for key, want in (("no_bias", True), ("logit_scale", None), ("expansion_ratio", 4)):
        if d.get(key, want) != want:
            raise UserError(f"{cfg_json} has {key} {d[key]!r}; this model computes {want!r} only")
    if "wpe.weight" in sd:
        raise UserError(f"{cfg_json.parent} holds a learned position table (wpe.weight) beside ALiBi, which this "
                        "model does not add")
    if any(k.endswith(".bias") for k in sd):
        raise UserError(f"{cfg_json.parent} holds biases ({next(k for k in sd if k.endswith('.bias'))}); an MPT "
                        "(no_bias) has none")
    n_layer = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
    n_head = head_count(d.get("n_heads", 16), "n_heads", n_embd, cfg_json)
    for key, have in (("vocab_size", vocab), ("d_model", n_embd), ("n_layers", n_layer)):
        if key in d and d[key] != have:
            raise UserError(f"{cfg_json} says {key} {d[key]!r}, but the weights have {have}")
    if hidden != 4 * n_embd:
        raise UserError(f"{cfg_json.parent}: ffn.up_proj has {hidden} rows; this model's MPT MLP is 4 d_model wide "
                        f"({4 * n_embd})")
    scale = attn.get("softmax_scale")
    if scale is not None and not math.isclose(scale, (n_embd // n_head) ** -0.5, rel_tol=1e-6):
        raise UserError(f"{cfg_json} has attn_config.softmax_scale {scale!r}; this model scales the scores by "
                        f"1/sqrt(head_dim) ({(n_embd // n_head) ** -0.5:g})")
    head = sd.get("lm_head.weight")
    return config_json_gptconfig(
        cfg_json, {"context_length": "max_seq_len", "norm_eps": "layer_norm_epsilon"}, vocab_size=vocab, n_embd=n_embd,
        n_layer=n_layer, n_head=n_head, context_length=d.get("max_seq_len", 2048), position_encoding="alibi",
        norm_eps=d.get("layer_norm_epsilon", 1e-5), bias=False, norm_bias=False,
        tie_weights=tied_head(d, head, sd["wte.weight"], "lm_head.weight", cfg_json), gelu_approximate="none")


def _our_tensors(sd: dict, cfg: GPTConfig) -> dict:
    """Hugging Face MPT tensors under our parameter names (KeyError: a tensor the file lacks)."""
    ours = {"tok_emb.weight": sd["wte.weight"], "final_norm.weight": sd["norm_f.weight"]}
    if not cfg.tie_weights:
        ours["out_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        h, b = f"blocks.{i}.", f"trf_blocks.{i}."
        for name, part in zip(_QKV, sd[f"{h}attn.Wqkv.weight"].chunk(3)):  # MptAttention's chunk(3)
            ours[f"{b}{name}.weight"] = part
        for mine, theirs in _LAYER:
            ours[f"{b}{mine}.weight"] = sd[f"{h}{theirs}.weight"]
    return ours


def load_mpt_safetensors(path) -> GPTModel:
    """GPTModel with the weights of a Hugging Face MPT model.safetensors (or shard index) and its config.json
    beside it."""
    path = weights_file(path, "MPT")
    sd = _read_tensors(path, prefix="transformer.")
    cfg_json = path.parent / "config.json"
    cfg = _check_hf_config(cfg_json, read_json_object(cfg_json), sd)
    return model_with_tensors(cfg, lambda: _our_tensors(sd, cfg), path)


# -- export: the inverse of _our_tensors -----------------------------------------------------------
def is_mpt_shaped(cfg: GPTConfig) -> bool:
    """ALiBi without biases (on the projections or the norms), without BLOOM's embedding norm or Falcon-RW's
    scaled slopes: what export writes as an MPT (or refuses)."""
    return (cfg.position_encoding == "alibi" and not cfg.embed_norm and not cfg.alibi_scaled
            and not (cfg.bias and cfg.norm_bias))


def refuse_not_mpt(model: GPTModel, what: str) -> None:
    """What Hugging Face's MPT does not compute, by name."""
    cfg = model.config
    refuse_moe_touches(cfg, "MPT", what, bias_free_norms=True)
    H = cfg.n_head
    for differs, why in ((cfg.position_encoding != "alibi", f"{cfg.positions_said()}, where MPT biases its "
                          "attention scores by distance (ALiBi)"),
                         (cfg.alibi_scaled, "adds ALiBi's bias before the scores' 1/sqrt(head_dim) scale "
                          "(alibi_scaled, Falcon-RW's), where MPT adds it after"),
                         (cfg.norm != "layernorm", f"normalizes with {cfg.norm}, where MPT has LayerNorms"),
                         (cfg.norm_bias, "has LayerNorm biases, where MPT's LayerNorms have none (norm_bias False)"),
                         (cfg.bias or cfg.has_qkv_bias, "has projection biases, where MPT (no_bias) has none"),
                         (cfg.mlp != "gelu", f"has a {cfg.mlp} MLP, where MPT's is GELU"),
                         (cfg.gelu_approximate != "none", "computes the tanh GELU, where MPT's is the exact one"),
                         (cfg.head_bias, "has an LM-head bias, which MPT does not"),
                         (cfg.kv_heads < H, f"has {cfg.kv_heads} key/value heads for {H} query heads, where "
                          "MPT has one for each"),
                         (cfg.parallel_residual, "has parallel blocks, where MPT's are sequential"),
                         (cfg.qk_norm, "normalizes q and k (qk_norm), which this export does not write"),
                         *plain_block_refusals(cfg, "MPT")):
        if differs:
            raise UserError(f"this model {why}: it cannot be exported as {what}")


def hf_config(cfg: GPTConfig, eos_token_id: int | None = None) -> dict:
    """MptConfig fields for this model (what _check_hf_config reads back)."""
    return {"model_type": MODEL_TYPE, "architectures": ["MptForCausalLM"], "vocab_size": cfg.vocab_size,
            "d_model": cfg.n_embd, "n_layers": cfg.n_layer, "n_heads": cfg.n_head, "expansion_ratio": 4,
            "max_seq_len": cfg.context_length, "layer_norm_epsilon": cfg.norm_eps, "learned_pos_emb": False,
            "no_bias": True, "logit_scale": None, "resid_pdrop": 0.0, "emb_pdrop": 0.0,
            "attn_config": {**_ATTN_MUST, "attn_pdrop": 0, "softmax_scale": None},
            "tie_word_embeddings": cfg.tie_weights, "bos_token_id": eos_token_id, "eos_token_id": eos_token_id,
            "pad_token_id": None}


def _hf_tensors(model: GPTModel) -> dict:
    """Our parameters under MptForCausalLM's names, q, k and v stacked into Wqkv, the padding rows dropped."""
    cfg = model.config
    V = cfg.vocab_size
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    hf = {"wte.weight": sd["tok_emb.weight"][:V], "norm_f.weight": sd["final_norm.weight"]}
    for i in range(cfg.n_layer):
        h, b = f"blocks.{i}.", f"trf_blocks.{i}."
        hf[f"{h}attn.Wqkv.weight"] = torch.cat([sd[f"{b}{name}.weight"] for name in _QKV])
        for mine, theirs in _LAYER:
            hf[f"{h}{theirs}.weight"] = sd[f"{b}{mine}.weight"]
    out = {"transformer." + k: v for k, v in hf.items()}
    if not cfg.tie_weights:
        out["lm_head.weight"] = sd["out_head.weight"][:V]
    return {k: v.to("cpu", memory_format=torch.contiguous_format, copy=True) for k, v in out.items()}


def export_mpt(model: GPTModel, out_dir, eos_token_id: int | None = None, overwrite: bool = False) -> list:
    """Write model as a Hugging Face MPT folder: model.safetensors and config.json, which
    transformers.AutoModelForCausalLM.from_pretrained(out_dir) and load_checkpoint both read.
    Returns the paths written; refuses to replace them unless overwrite."""
    refuse_not_mpt(model, "an MPT folder")
    return write_hf_folder(out_dir, lambda: _hf_tensors(model), hf_config(model.config, eos_token_id), overwrite)
