"""GPT-BigCode weights (Hugging Face's GPTBigCodeForCausalLM: StarCoder 1, SantaCoder, WizardCoder) into GPTModel,
and back out.

A GPT-BigCode is GPT-2 (learned positions wpe, LayerNorms, a GELU MLP c_fc / c_proj 4C wide, biases everywhere, the
head tied unless tie_word_embeddings false) with nn.Linear's [out, in] weights where GPT-2 has Conv1D's [in, out],
and multi-query attention: with multi_query (GPTBigCodeConfig's default) every query head reads one key/value head
(GPTConfig.n_kv_head 1), c_attn's fused rows being q's C, then k's head_dim, then v's head_dim; without it c_attn is
3C rows laid out per head (each head's q, k, v rows together: per_head_qkv_rows, GPT-NeoX's layout).
activation_function "gelu_pytorch_tanh" (the default), "gelu_new" or "gelu_fast" is our tanh GELU, "gelu" the exact
one (gelu_approximate "none"); scale_attn_weights false is unscaled scores (scale_attention False). The softmax's
fp32 flags (attention_softmax_in_fp32, scale_attention_softmax_in_fp32) change no fp32 or float64 logit: ours
is in fp32 always. What this model does not compute is refused by name: another activation, an n_inner other than
4 n_embd (our GELU MLP's width is fixed), cross-attention (add_cross_attention: an encoder-decoder's).

`export` writes a multi-query GPT-2 (learned positions, LayerNorms, a GELU MLP, one key/value head) as a GPT-BigCode
folder (commands.export_target; one without grouped heads stays a GPT-2 folder, the same function), which
transformers loads with the same logits, and load_checkpoint reads it back.
"""
from pathlib import Path

import torch

from tritongpt.errors import UserError, read_json_object
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.gpt2_weights import (_read_tensors, check_fused_rows, config_flag, config_json_gptconfig,
                                          fuse_rows, head_count, model_with_tensors, per_head_qkv_rows,
                                          refuse_gemma_touches, refuse_moe_touches, refuse_norm_touches,
                                          refuse_phi3_touches, tensor_shapes, tied_head, weights_file,
                                          write_hf_folder)

MODEL_TYPE = "gpt_bigcode"
KEYS = {"context_length": "n_positions", "norm_eps": "layer_norm_epsilon"}
_QKV = ("att.W_query", "att.W_key", "att.W_value")
# each block's other tensors: ours, then Hugging Face's (under "h.{i}.")
_LAYER = (("norm1", "ln_1"), ("norm2", "ln_2"), ("att.out_proj", "attn.c_proj"), ("ff.fc1", "mlp.c_fc"),
          ("ff.fc2", "mlp.c_proj"))
_GELU = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu_fast": "tanh", "gelu": "none"}  # theirs: ours


def is_gpt_bigcode_file(path) -> bool:
    """A Hugging Face GPT-BigCode model.safetensors (or shard index): its config.json says model_type
    "gpt_bigcode"."""
    cfg_json = Path(path).parent / "config.json"
    return cfg_json.is_file() and read_json_object(cfg_json).get("model_type") == MODEL_TYPE


def qkv_rows(n_head: int, head_dim: int, multi_query: bool) -> tuple:
    """Index tensors of c_attn's q, k and v rows: multi-query's [q (C), k (D), v (D)], else per head [H, 3, D]."""
    if not multi_query:
        return per_head_qkv_rows(n_head, head_dim)
    C = n_head * head_dim
    return torch.arange(C), torch.arange(C, C + head_dim), torch.arange(C + head_dim, C + 2 * head_dim)


def _check_hf_config(cfg_json: Path, sd: dict, path: Path) -> GPTConfig:
    """The GPTConfig of a GPT-BigCode config.json, checked against the tensors beside it."""
    d = read_json_object(cfg_json)
    vocab, n_embd, ctx, n_layer = tensor_shapes(sd, path, "GPT-BigCode")
    for key, have in (("vocab_size", vocab), ("n_positions", ctx), ("n_embd", n_embd), ("n_layer", n_layer)):
        if key in d and d[key] != have:
            raise UserError(f"{cfg_json} says {key} {d[key]!r}, but the weights have {have}")
    if "n_head" not in d:
        raise UserError(f"{cfg_json} names no n_head")
    n_head = head_count(d["n_head"], "n_head", n_embd, cfg_json)
    act = d.get("activation_function", "gelu_pytorch_tanh")
    if not isinstance(act, str) or act not in _GELU:
        raise UserError(f"{cfg_json} has activation_function {act!r}; this model's GPT-BigCode MLP computes "
                        f"{', '.join(map(repr, _GELU))} (the GELU, tanh-approximated or exact) only")
    if "h.0.mlp.c_fc.weight" not in sd:
        raise UserError(f"{path} is not a GPT-BigCode weights file: missing tensor 'h.0.mlp.c_fc.weight'")
    hidden = sd["h.0.mlp.c_fc.weight"].shape[0]
    if d.get("n_inner") not in (None, hidden):
        raise UserError(f"{cfg_json} says n_inner {d['n_inner']!r}, but the weights have {hidden}")
    if hidden != 4 * n_embd:
        raise UserError(f"{cfg_json.parent}: the MLP is {hidden} wide (n_inner); this model's GELU MLP is 4 n_embd "
                        f"wide ({4 * n_embd}) only (GPTConfig.mlp_hidden is the gated and squared-ReLU MLPs')")
    if config_flag(d, "add_cross_attention", False, cfg_json, MODEL_TYPE):
        raise UserError(f"{cfg_json} has add_cross_attention true: an encoder-decoder's cross-attention, which this "
                        "model (a decoder alone) does not compute")
    multi_query = config_flag(d, "multi_query", True, cfg_json, MODEL_TYPE)
    head_dim = n_embd // n_head
    rows = n_embd + 2 * head_dim if multi_query else 3 * n_embd
    check_fused_rows(sd, "h.{i}.attn.c_attn", n_layer, rows, "multi-query attention's q, k and v (C + 2 head_dim)"
                     if multi_query else "q, k and v of every head (3C)", cfg_json.parent)
    return config_json_gptconfig(
        cfg_json, KEYS, vocab_size=vocab, context_length=ctx, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        n_kv_head=1 if multi_query and n_head > 1 else 0, bias=True,
        scale_attention=config_flag(d, "scale_attn_weights", True, cfg_json, MODEL_TYPE),
        norm_eps=d.get("layer_norm_epsilon", 1e-5), gelu_approximate=_GELU[act],
        tie_weights=tied_head(d, sd.get("lm_head.weight"), sd["wte.weight"], "lm_head.weight", cfg_json)), multi_query


def _our_tensors(sd: dict, cfg: GPTConfig, multi_query: bool) -> dict:
    """Hugging Face GPT-BigCode tensors under our parameter names (KeyError: a tensor the file lacks): c_attn split
    by qkv_rows; nn.Linear's weights are ours as they are."""
    ours = {"tok_emb.weight": sd["wte.weight"], "pos_emb.weight": sd["wpe.weight"],
            "final_norm.weight": sd["ln_f.weight"], "final_norm.bias": sd["ln_f.bias"]}
    if not cfg.tie_weights:
        ours["out_head.weight"] = sd["lm_head.weight"]
    split = qkv_rows(cfg.n_head, cfg.head_dim, multi_query)
    for i in range(cfg.n_layer):
        h, b = f"h.{i}.", f"trf_blocks.{i}."
        for kind in ("weight", "bias"):
            for name, rows in zip(_QKV, split):
                ours[f"{b}{name}.{kind}"] = sd[f"{h}attn.c_attn.{kind}"][rows]
            for mine, theirs in _LAYER:
                ours[f"{b}{mine}.{kind}"] = sd[f"{h}{theirs}.{kind}"]
    return ours


def load_gpt_bigcode_safetensors(path) -> GPTModel:
    """GPTModel with the weights of a Hugging Face GPT-BigCode model.safetensors (or shard index) and its
    config.json."""
    path = weights_file(path, "GPT-BigCode")
    sd = _read_tensors(path, prefix="transformer.")
    cfg, multi_query = _check_hf_config(path.parent / "config.json", sd, path)
    return model_with_tensors(cfg, lambda: _our_tensors(sd, cfg, multi_query), path)


# -- export: the inverse of _our_tensors -----------------------------------------------------------
def is_gpt_bigcode_shaped(cfg: GPTConfig) -> bool:
    """GPT-2's pieces (learned positions, LayerNorms, a GELU MLP) with one key/value head for several query heads:
    multi-query attention, which a GPT-2 folder cannot say and a GPT-BigCode one can. Not with local attention,
    which no GPT-BigCode has: that model goes on to GPT-Neo's export (and GPT-2's), whose refusals name it."""
    return (cfg.position_encoding == "learned" and cfg.norm == "layernorm" and cfg.mlp == "gelu"
            and cfg.kv_heads == 1 < cfg.n_head and not cfg.attention_window)


def refuse_not_gpt_bigcode(model: GPTModel, what: str) -> None:
    """Hugging Face's GPT-BigCode: learned positions, LayerNorms with biases, a GELU MLP 4C wide, one key/value head
    (multi_query) or one a query head, sequential blocks, the whole context. Another model's weights would give it
    other logits: refused by name. (No biases is zero biases: the same function.)"""
    cfg, family = model.config, "GPT-BigCode"
    refuse_moe_touches(cfg, family, what)
    refuse_norm_touches(cfg, family, what)
    for differs, why in ((cfg.mlp != "gelu", f"has a {cfg.mlp} MLP, where {family}'s is c_fc, GELU, c_proj"),
                         (cfg.position_encoding != "learned", f"{cfg.positions_said()}, where {family} learns "
                          "position embeddings (wpe)"),
                         (cfg.norm != "layernorm", f"normalizes with {cfg.norm}, where {family} has LayerNorms"),
                         (1 < cfg.kv_heads < cfg.n_head, f"has grouped-query attention ({cfg.kv_heads} key/value "
                          f"heads), where {family}'s query heads read one key/value head (multi_query) or their own"),
                         (bool(cfg.attention_window), f"has local attention (attention_window "
                          f"{cfg.attention_window}), where {family} attends to the whole context"),
                         (bool(cfg.logit_softcap), f"soft-caps its logits (logit_softcap {cfg.logit_softcap:g}), "
                          f"which {family} does not"),
                         (bool(cfg.attn_softcap), f"soft-caps its attention scores (attn_softcap "
                          f"{cfg.attn_softcap:g}), which {family} does not"),
                         (bool(cfg.attention_scale_width), "scales its scores by 1/sqrt(attention_scale_width "
                          f"{cfg.attention_scale_width}), where {family} scales by 1/sqrt(head_dim) or not at all"),
                         (bool(cfg.attention_head_dim), f"has heads of width {cfg.head_dim} apart from n_embd / n_head "
                          f"(attention_head_dim), where {family}'s are n_embd / n_head"),
                         (cfg.parallel_residual, f"runs attention and the MLP in parallel (parallel_residual), "
                          f"where {family}'s blocks are sequential"),
                         (cfg.head_bias, f"has a bias on its LM head (head_bias), which {family}'s has not"),
                         (cfg.qk_norm, f"normalizes q and k (qk_norm), which {family} does not")):
        if differs:
            raise UserError(f"this model {why}: it cannot be exported as {what}")
    refuse_gemma_touches(cfg, family, what, exact_gelu=True)  # (activation_function "gelu" says it)
    refuse_phi3_touches(cfg, family, what)


def _hf_tensors(model: GPTModel) -> dict:
    """Our parameters under GPTBigCodeForCausalLM's names, q, k and v fused by qkv_rows (zero biases where the model
    has none); the padding rows dropped."""
    cfg = model.config
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    V, emb = cfg.vocab_size, sd["tok_emb.weight"]

    def bias(name, n):
        b = sd.get(name)
        return b if b is not None else torch.zeros(n, dtype=emb.dtype, device=emb.device)

    multi_query = cfg.kv_heads == 1 < cfg.n_head
    split = qkv_rows(cfg.n_head, cfg.head_dim, multi_query)
    hf = {"wte.weight": emb[:V], "wpe.weight": sd["pos_emb.weight"], "ln_f.weight": sd["final_norm.weight"],
          "ln_f.bias": sd["final_norm.bias"]}
    for i in range(cfg.n_layer):
        b, h = f"trf_blocks.{i}.", f"h.{i}."
        hf[h + "attn.c_attn.weight"] = fuse_rows([sd[f"{b}{n}.weight"] for n in _QKV], split)
        hf[h + "attn.c_attn.bias"] = fuse_rows([bias(f"{b}{n}.bias", sd[f"{b}{n}.weight"].shape[0]) for n in _QKV],
                                               split)
        for mine, theirs in _LAYER:
            w = sd[f"{b}{mine}.weight"]
            hf[f"{h}{theirs}.weight"] = w
            hf[f"{h}{theirs}.bias"] = bias(f"{b}{mine}.bias", w.shape[0])
    out = {"transformer." + k: v for k, v in hf.items()}
    if not cfg.tie_weights:
        out["lm_head.weight"] = sd["out_head.weight"][:V]
    return {k: v.to("cpu", memory_format=torch.contiguous_format, copy=True) for k, v in out.items()}


def hf_config(cfg: GPTConfig, eos_token_id: int | None = None) -> dict:
    """GPTBigCodeConfig fields (config.json) for this model: what _check_hf_config reads back."""
    return {"model_type": MODEL_TYPE, "architectures": ["GPTBigCodeForCausalLM"], "vocab_size": cfg.vocab_size,
            "n_positions": cfg.context_length, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "n_inner": 4 * cfg.n_embd, "multi_query": cfg.kv_heads == 1 < cfg.n_head,
            "activation_function": "gelu" if cfg.gelu_approximate == "none" else "gelu_pytorch_tanh",
            "layer_norm_epsilon": cfg.norm_eps, "scale_attn_weights": cfg.scale_attention,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": cfg.tie_weights,
            "bos_token_id": eos_token_id, "eos_token_id": eos_token_id, "pad_token_id": None}


def export_gpt_bigcode(model: GPTModel, out_dir, eos_token_id: int | None = None, overwrite: bool = False) -> list:
    """Write model as a Hugging Face GPT-BigCode folder (model.safetensors, config.json), which
    transformers.AutoModelForCausalLM.from_pretrained(out_dir) and load_checkpoint both read. Returns the paths
    written; refuses to replace them unless overwrite."""
    refuse_not_gpt_bigcode(model, "a GPT-BigCode folder")
    return write_hf_folder(out_dir, lambda: _hf_tensors(model), hf_config(model.config, eos_token_id), overwrite)
