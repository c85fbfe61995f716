"""GPT-NeoX and Pythia weights (EleutherAI: Hugging Face's GPTNeoXForCausalLM, model_type "gpt_neox") into
GPTModel, and back out.

A GPT-NeoX is a GPT-2 with RoPE (no position embeddings) and three differences:
- its blocks are parallel (use_parallel_residual, Pythia's and NeoX-20B's): x + attention(ln1(x)) + mlp(ln2(x)),
  GPTConfig.parallel_residual; use_parallel_residual false is GPT-2's sequential block;
- its GELU is the exact one (hidden_act "gelu": x Phi(x) with erf), GPTConfig.gelu_approximate "none";
  "gelu_new" and "gelu_pytorch_tanh" are GPT-2's tanh form;
- one query_key_value projection laid out per head: its rows are, head after head, that head's q, k and v
  (view(n_head, 3, head_dim, C)), not all the q rows then all the k rows as GPT-2's c_attn;
and an LM head of its own (embed_out, no bias), untied unless tie_word_embeddings says so. Its RoPE turns only
the first rotary_pct of each head's dimensions (Pythia's 0.25: 16 of 64), GPTConfig.rotary_dim.
What this model does not compute is refused by name: RoPE scaling, another activation, attention_bias false (the
MLP keeps its biases), an MLP wider or narrower than 4 hidden_size.
"""
from pathlib import Path

import torch

from tritongpt.errors import UserError, read_json_object
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.gpt2_weights import (_read_tensors, check_fused_rows, config_flag, config_json_gptconfig,
                                          fuse_rows, head_count, model_with_tensors, per_head_qkv_rows,
                                          plain_block_refusals, refuse_moe_touches, refuse_phi_touches, tied_head,
                                          weights_file, write_hf_folder)
from tritongpt.train.llama_weights import unscaled_partial_rope

MODEL_TYPE = "gpt_neox"
# hidden_act -> GPTConfig.gelu_approximate
ACTIVATIONS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}
# each block's tensors with a weight and a bias: ours, then Hugging Face's (under "gpt_neox.layers.{i}.")
_LAYER = (("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm"), ("att.out_proj", "attention.dense"),
          ("ff.fc1", "mlp.dense_h_to_4h"), ("ff.fc2", "mlp.dense_4h_to_h"))
_QKV = ("att.W_query", "att.W_key", "att.W_value")


def is_neox_file(path) -> bool:
    """A Hugging Face GPT-NeoX (Pythia) model.safetensors (or shard index): its config.json says so."""
    cfg_json = Path(path).parent / "config.json"
    return cfg_json.is_file() and read_json_object(cfg_json).get("model_type") == MODEL_TYPE


def _check_hf_config(cfg_json: Path, sd: dict) -> GPTConfig:
    """The GPTConfig of a GPT-NeoX config.json, checked against the tensors beside it; what this model
    does not compute refused by name."""
    d = read_json_object(cfg_json)
    if d.get("model_type") != MODEL_TYPE:
        raise UserError(f"{cfg_json} says model_type {d.get('model_type')!r}; a GPT-NeoX folder's is {MODEL_TYPE}")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
        if key not in d:
            raise UserError(f"{cfg_json} names no {key}")
    try:
        vocab, n_embd = sd["embed_in.weight"].shape
        hidden = sd["layers.0.mlp.dense_h_to_4h.weight"].shape[0]
    except KeyError as e:
        raise UserError(f"{cfg_json.parent}: not a GPT-NeoX model, missing tensor {e.args[0]!r}") from None
    n_layer = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("layers.")), default=-1)
    n_head = head_count(d["num_attention_heads"], "num_attention_heads", n_embd, cfg_json)
    for key, have in (("vocab_size", vocab), ("hidden_size", n_embd), ("num_hidden_layers", n_layer),
                      ("intermediate_size", hidden)):
        if key in d and d[key] != have:
            raise UserError(f"{cfg_json} says {key} {d[key]!r}, but the weights have {have}")
    check_fused_rows(sd, "layers.{i}.attention.query_key_value", n_layer, 3 * n_embd,
                     f"{n_head} heads' queries, keys and values of {n_embd // n_head}", cfg_json.parent)
    if hidden != 4 * n_embd:
        raise UserError(f"{cfg_json} has intermediate_size {hidden}; this model's GELU MLP is 4 hidden_size wide "
                        f"({4 * n_embd})")
    act = d.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise UserError(f"{cfg_json} has hidden_act {act!r}; this model's GELU MLP computes "
                        f"{', '.join(map(repr, ACTIVATIONS))} only")
    if not config_flag(d, "attention_bias", True, cfg_json):
        raise UserError(f"{cfg_json} has attention_bias false; this model gives the attention projections biases "
                        "when the MLP has them (GPT-NeoX's MLP always does)")
    if d.get("num_key_value_heads") not in (None, d["num_attention_heads"]):
        raise UserError(f"{cfg_json} has num_key_value_heads {d['num_key_value_heads']!r}; GPT-NeoX's heads each "
                        "have their own keys and values")
    head = sd.get("embed_out.weight", sd.get("lm_head.weight"))
    # transformers 4's names (the Hub's Pythia configs), rotary_pct 0.25 when absent. GPTNeoXConfig (4.x and 5)
    # reads no flat rope_theta or partial_rotary_factor: one that says another value is refused, not read
    theta, rotary = unscaled_partial_rope(d, n_embd // n_head, cfg_json, "GPT-NeoX", ("rotary_emb_base",),
                                          ("rotary_pct",), unread=("rope_theta", "partial_rotary_factor"))
    return config_json_gptconfig(
        cfg_json, {"context_length": "max_position_embeddings", "norm_eps": "layer_norm_eps"}, vocab_size=vocab,
        n_embd=n_embd, n_layer=n_layer, n_head=n_head, context_length=d.get("max_position_embeddings", 2048),
        position_encoding="rope", rope_theta=theta, rotary_dim=rotary, norm_eps=d.get("layer_norm_eps", 1e-5),
        tie_weights=tied_head(d, head, sd["embed_in.weight"], "embed_out.weight", cfg_json),
        parallel_residual=config_flag(d, "use_parallel_residual", True, cfg_json),
        gelu_approximate=ACTIVATIONS[act])


def _our_tensors(sd: dict, cfg: GPTConfig) -> dict:
    """Hugging Face GPT-NeoX tensors under our parameter names (KeyError: a tensor the file lacks). Each
    head's q, k and v rows lie together in query_key_value: split per head, then joined per projection."""
    ours = {"tok_emb.weight": sd["embed_in.weight"], "final_norm.weight": sd["final_layer_norm.weight"],
            "final_norm.bias": sd["final_layer_norm.bias"]}
    if not cfg.tie_weights:
        ours["out_head.weight"] = sd["embed_out.weight"] if "embed_out.weight" in sd else sd["lm_head.weight"]
    split = per_head_qkv_rows(cfg.n_head, cfg.head_dim)
    for i in range(cfg.n_layer):
        h, b = f"layers.{i}.", f"trf_blocks.{i}."
        for kind in ("weight", "bias"):
            fused = sd[f"{h}attention.query_key_value.{kind}"]
            for name, rows in zip(_QKV, split):
                # (a 4-bit query_key_value's is split by the loader: hf_quant.int4_rows, named by _int4_part)
                ours[f"{b}{name}.{kind}"] = sd[_int4_part(i, name)] if fused.is_meta else fused[rows]
            for mine, theirs in _LAYER:
                ours[f"{b}{mine}.{kind}"] = sd[f"{h}{theirs}.{kind}"]
    return ours


def load_neox_safetensors(path) -> GPTModel:
    """GPTModel with the weights of a Hugging Face GPT-NeoX (Pythia) model.safetensors (or shard index) and
    its config.json beside it."""
    from tritongpt.train.hf_quant import (folder_dequantized, folder_quantization, int4_linears, int4_rows,
                                          model_with_int4)
    path = weights_file(path, "GPT-NeoX")
    # a GPTQ or AWQ folder: 4-bit, read as int4 (hf_quant.py; 8-bit GPTQ as int8 where it maps); an FP8 one, or a
    # GPTQ one of other bits, dequantized to a float model (its query_key_value split after, as a float folder's); any
    # other refused by name
    spec, dequant = folder_quantization(path.parent / "config.json")
    sd = _read_tensors(path, prefix="gpt_neox.", quantization_read=spec is not None or dequant is not None)
    if dequant is not None:
        sd = folder_dequantized(sd, dequant, path, prefix="gpt_neox.")
    if spec is not None:
        sd, packed, group_size = int4_linears(sd, spec, path, prefix="gpt_neox.")
        if packed is None:  # (4-bit groups no int4 group size divides: read dequantized, a float model)
            spec = None
    if spec is None:
        cfg = _check_hf_config(path.parent / "config.json", sd)
        return model_with_tensors(cfg, lambda: _our_tensors(sd, cfg), path)
    cfg = _check_hf_config(path.parent / "config.json", sd)
    # GPTQ and AWQ quantize query_key_value as one linear, its rows laid out per head: each projection's rows
    # taken from it, as the float weight's are
    for i in range(cfg.n_layer):
        int4_rows(sd, packed, f"layers.{i}.attention.query_key_value",
                  {_int4_part(i, name).removesuffix(".weight"): rows
                   for name, rows in zip(_QKV, per_head_qkv_rows(cfg.n_head, cfg.head_dim))})
    return model_with_int4(cfg, lambda: _our_tensors(sd, cfg), sd, packed, group_size, path)


def _int4_part(i: int, name: str) -> str:
    """Where load_neox_safetensors puts layer i's q, k or v (ours: name) of a 4-bit query_key_value."""
    return f"layers.{i}.attention.query_key_value.{name.removeprefix('att.')}.weight"


# -- export: the inverse of _our_tensors -----------------------------------------------------------
def is_neox_shaped(cfg: GPTConfig) -> bool:
    """RoPE over LayerNorms with a GELU MLP: GPT-NeoX's pieces, which export writes as a GPT-NeoX (or refuses)."""
    return cfg.position_encoding == "rope" and cfg.norm == "layernorm" and cfg.mlp == "gelu"


def refuse_not_neox(model: GPTModel, what: str) -> None:
    """What Hugging Face's GPT-NeoX does not compute, by name."""
    cfg = model.config
    refuse_moe_touches(cfg, "GPT-NeoX", what)
    refuse_phi_touches(cfg, "GPT-NeoX", what)
    for differs, why in ((cfg.position_encoding != "rope", f"{cfg.positions_said()}, where GPT-NeoX rotates q and "
                          "k (RoPE)"),
                         (cfg.norm != "layernorm", f"normalizes with {cfg.norm}, where GPT-NeoX has LayerNorms"),
                         (cfg.mlp != "gelu", f"has a {cfg.mlp} MLP, where GPT-NeoX's is GELU"),
                         (not cfg.bias or not cfg.qkv_bias, "has no biases on "
                          + ("its linear layers" if not cfg.bias else "q, k and v") + ", where GPT-NeoX has them"),
                         (cfg.kv_heads < cfg.n_head, f"has grouped-query attention ({cfg.kv_heads} key/value heads), "
                          "where GPT-NeoX's heads each have their own"),
                         (cfg.qk_norm, "normalizes q and k (qk_norm), which GPT-NeoX does not"),
                         (cfg.rope_scaling is not None, "scales RoPE's frequencies (rope_scaling), which this export "
                          "does not write"),
                         *plain_block_refusals(cfg, "GPT-NeoX")):
        if differs:
            raise UserError(f"this model {why}: it cannot be exported as {what}")


def _hf_tensors(model: GPTModel) -> dict:
    """Our parameters under GPTNeoXForCausalLM's names, q, k and v interleaved per head, the padding rows dropped."""
    cfg = model.config
    V = cfg.vocab_size
    split = per_head_qkv_rows(cfg.n_head, cfg.head_dim)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    hf = {"embed_in.weight": sd["tok_emb.weight"][:V], "final_layer_norm.weight": sd["final_norm.weight"],
          "final_layer_norm.bias": sd["final_norm.bias"]}
    for i in range(cfg.n_layer):
        h, b = f"layers.{i}.", f"trf_blocks.{i}."
        for kind in ("weight", "bias"):
            hf[f"{h}attention.query_key_value.{kind}"] = fuse_rows([sd[f"{b}{name}.{kind}"] for name in _QKV], split)
            for mine, theirs in _LAYER:
                hf[f"{h}{theirs}.{kind}"] = sd[f"{b}{mine}.{kind}"]
    out = {"gpt_neox." + k: v for k, v in hf.items()}
    # the Hub's name, which transformers 4 and 5 both read; a tied model's is the embedding
    out["embed_out.weight"] = sd["tok_emb.weight" if cfg.tie_weights else "out_head.weight"][:V]
    return {k: v.to("cpu", memory_format=torch.contiguous_format, copy=True) for k, v in out.items()}


def hf_config(cfg: GPTConfig, eos_token_id: int | None = None) -> dict:
    """GPTNeoXConfig fields for this model: what _check_hf_config reads back. RoPE both ways: rope_parameters
    (transformers 5) and rotary_pct / rotary_emb_base (4.x)."""
    act = "gelu" if cfg.gelu_approximate == "none" else "gelu_new"
    pct = cfg.rotary_dim / cfg.head_dim if cfg.rotary_dim else 1.0  # int(head_dim * pct) reads rotary_dim back
    return {"model_type": MODEL_TYPE, "architectures": ["GPTNeoXForCausalLM"], "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.context_length, "hidden_size": cfg.n_embd,
            "intermediate_size": 4 * cfg.n_embd, "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head, "hidden_act": act, "layer_norm_eps": cfg.norm_eps,
            "use_parallel_residual": cfg.parallel_residual, "attention_bias": True, "attention_dropout": 0.0,
            "hidden_dropout": 0.0, "tie_word_embeddings": cfg.tie_weights, "bos_token_id": eos_token_id,
            "eos_token_id": eos_token_id, "pad_token_id": None, "rotary_pct": pct, "rotary_emb_base": cfg.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": pct}}


def export_neox(model: GPTModel, out_dir, eos_token_id: int | None = None, overwrite: bool = False) -> list:
    """Write model as a Hugging Face GPT-NeoX folder: model.safetensors and config.json, which
    transformers.AutoModelForCausalLM.from_pretrained(out_dir) and load_checkpoint both read.
    Returns the paths written; refuses to replace them unless overwrite."""
    refuse_not_neox(model, "a GPT-NeoX folder")
    return write_hf_folder(out_dir, lambda: _hf_tensors(model), hf_config(model.config, eos_token_id), overwrite)
