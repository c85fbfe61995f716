"""Cohere weights (Command R, Aya 23 and Aya Expanse: Hugging Face's CohereForCausalLM, model_type "cohere";
Command R7B: Cohere2ForCausalLM, "cohere2") into GPTModel, and back out.

A Cohere is a Llama (SwiGLU, RoPE, grouped-query attention, Llama's tensor names) with these differences,
each a GPTConfig field:
- its blocks are parallel on ONE norm, x + attention(ln(x)) + mlp(ln(x)): parallel_residual and shared_norm
  (GPT-J's and Phi-2's block), so there is no post_attention_layernorm;
- its norms are LayerNorms without a bias (mean subtracted, a weight only): norm "layernorm", norm_bias False;
- its logits are scaled, logits * logit_scale (0.0625 for Command R, 0.125 for Aya Expanse 8B): GPTConfig.
  logit_scale, which the model applies to the LM head's input (the same product: no kernel changes);
- its RoPE pairs dimensions (2i, 2i + 1) (repeat_interleave of the frequencies), where ours pairs (i, i + D/2):
  as for GPT-J (train/gptj_weights.py), the loader reorders each head's rows of q_proj and k_proj (even
  dimensions first, then odd ones) and the export puts them back; q.k is blind to the order of a head's
  dimensions, so the model computes Cohere's function exactly;
- Cohere2 (Command R7B) slides a window over the layers layer_types names "sliding_attention" and rotates q
  and k in those only: attention_window and window_layers for the sliding ones, nope_layers for the others.
- Command R+'s use_qk_norm: a bias-free LayerNorm of each head's q and k with weights of that head's own (q_norm
  [heads, head_dim], k_norm over the KV heads): qk_norm_width "each", each weight's head_dim reordered as q's and
  k's rows are (a norm over head_dim is blind to their order, its weight is not), and put back on export.
What this model does not compute is refused by name: attention biases, another activation, a head_dim the
weights do not have.
"""
from pathlib import Path

import torch

from tritongpt.errors import UserError, read_json_object
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.gpt2_weights import (_read_tensors, config_flag, config_json_gptconfig, model_with_tensors,
                                          refuse_moe_touches, weights_file, write_hf_folder)
from tritongpt.train.gptj_weights import half_split_order
from tritongpt.train.llama_weights import LLAMA_KEYS, _rope_theta, hf_shapes, read_rope_parameters, shape_fields

MODEL_TYPES = {"cohere": "CohereForCausalLM", "cohere2": "Cohere2ForCausalLM"}
# each block's tensors: ours, then Cohere's (under "layers.{i}."); the norm has a weight only
_LAYER = (("norm1", "input_layernorm"), ("att.W_query", "self_attn.q_proj"), ("att.W_key", "self_attn.k_proj"),
          ("att.W_value", "self_attn.v_proj"), ("att.out_proj", "self_attn.o_proj"), ("ff.w_gate", "mlp.gate_proj"),
          ("ff.w_up", "mlp.up_proj"), ("ff.w_down", "mlp.down_proj"))
_ROTATED = ("att.W_query", "att.W_key")  # their rows reordered per head: Cohere's RoPE pairs -> ours
# Command R+'s q/k norms, [heads, head_dim]: reordered along head_dim as q's and k's rows
_QK_NORMS = (("att.q_norm", "self_attn.q_norm"), ("att.k_norm", "self_attn.k_norm"))


def is_cohere_file(path) -> bool:
    """A Hugging Face Cohere (or Cohere2) model.safetensors or shard index: its config.json says so."""
    cfg_json = Path(path).parent / "config.json"
    return cfg_json.is_file() and read_json_object(cfg_json).get("model_type") in MODEL_TYPES


def _layer_types(d: dict, n_layer: int, cfg_json) -> list:
    """Cohere2's layer_types, as transformers reads them: the list, else every sliding_window_pattern-th
    layer (4) full and the rest sliding."""
    pattern = d.get("sliding_window_pattern", d.get("_sliding_window_pattern", 4))
    types = d.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                     for i in range(n_layer)]
    if not isinstance(types, list) or len(types) != n_layer or \
            not set(types) <= {"sliding_attention", "full_attention"}:
        raise UserError(f"{cfg_json} has layer_types {types!r}; it must list 'sliding_attention' or "
                        f"'full_attention' for each of the {n_layer} layers")
    return types


def _windows(d: dict, kind: str, n_layer: int, cfg_json) -> dict:
    """Cohere2's sliding layers as GPTConfig fields: a window over them, and no RoPE in the others (their
    attention is global and unrotated); Cohere's: none."""
    if kind == "cohere":
        return {}
    types = _layer_types(d, n_layer, cfg_json)
    local = [i for i, t in enumerate(types) if t == "sliding_attention"]
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    if not local:
        raise UserError(f"{cfg_json} has no sliding_attention layer, and Cohere2 rotates q and k in those only: "
                        "a model without RoPE in any layer is not one this model computes")
    window = d.get("sliding_window", 4096)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise UserError(f"{cfg_json} has sliding_window {window!r}; it must be a positive integer")
    return dict(attention_window=window, window_layers="all" if not full else ",".join(map(str, local)),
                nope_layers=",".join(map(str, full)))


def _check_hf_config(cfg_json: Path, sd: dict) -> GPTConfig:
    """The GPTConfig of a Cohere config.json, checked against the tensors beside it; what this model does not
    compute refused by name."""
    d = read_json_object(cfg_json)
    kind = d.get("model_type")
    if kind not in MODEL_TYPES:
        raise UserError(f"{cfg_json} says model_type {kind!r}; a Cohere folder's is one of {', '.join(MODEL_TYPES)}")
    shapes = hf_shapes(d, sd, cfg_json, "Cohere")
    n_embd, n_layer, n_head, head_dim = shapes[1], shapes[3], shapes[4], shapes[6]
    if head_dim * n_head != n_embd:
        raise UserError(f"{cfg_json}: heads of {head_dim} over a width of {n_embd}; Cohere's heads are "
                        "hidden_size / num_attention_heads wide")
    if d.get("hidden_act", "silu") != "silu":
        raise UserError(f"{cfg_json} has hidden_act {d['hidden_act']!r}; this model's SwiGLU computes 'silu' only")
    qk_norm = kind == "cohere" and config_flag(d, "use_qk_norm", False, cfg_json)  # (Cohere2Config has none)
    if qk_norm != ("layers.0.self_attn.q_norm.weight" in sd):
        raise UserError(f"{cfg_json} has use_qk_norm {str(qk_norm).lower()}, but the weights "
                        f"{'lack' if qk_norm else 'have'} q_norm's")
    if config_flag(d, "attention_bias", False, cfg_json) or "layers.0.self_attn.q_proj.bias" in sd:
        raise UserError(f"{cfg_json} has attention_bias true; this model reads Cohere's bias-free projections only")
    if "layers.0.post_attention_layernorm.weight" in sd or "layers.0.input_layernorm.bias" in sd:
        raise UserError(f"{cfg_json.parent}: a post_attention_layernorm or a norm bias, which a Cohere block (one "
                        "bias-free LayerNorm) does not have")
    scale = d.get("logit_scale", 0.0625)  # CohereConfig's default
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise UserError(f"{cfg_json} has logit_scale {scale!r}; it must be a number > 0")
    # CohereConfig's base when none is said is 10000 in transformers 4.x and 500000 in 5 (Cohere2Config's 10000 in
    # both): such a file is two models, refused (the Hub's Command R configs all say rope_theta)
    rope = read_rope_parameters(d, cfg_json)  # (read once: this check's and _rope_theta's)
    if kind == "cohere" and "rope_theta" not in d and "rope_theta" not in rope[0]:
        raise UserError(f"{cfg_json} says no RoPE base (rope_theta): CohereConfig reads 10000 in transformers 4.x "
                        "and 500000 in 5; say which")
    theta, scaling = _rope_theta(d, cfg_json, rope=rope)
    return config_json_gptconfig(
        cfg_json, {**LLAMA_KEYS, "norm_eps": "layer_norm_eps"}, **shape_fields(shapes, sd, d, cfg_json),
        context_length=d.get("max_position_embeddings", 8192), bias=False, position_encoding="rope", rope_theta=theta,
        rope_scaling=scaling, norm="layernorm", norm_bias=False, norm_eps=d.get("layer_norm_eps", 1e-5), mlp="swiglu",
        parallel_residual=True, shared_norm=True, logit_scale=float(scale), qk_norm=qk_norm,
        qk_norm_width="each" if qk_norm else "head", **_windows(d, kind, n_layer, cfg_json))


def _our_tensors(sd: dict, cfg: GPTConfig) -> dict:
    """Cohere's tensors under our parameter names (KeyError: a tensor the file lacks), q's and k's rows
    reordered per head for our RoPE's pairs."""
    C, D = cfg.n_embd, cfg.head_dim
    order = half_split_order(D, D)
    ours = {"tok_emb.weight": sd["embed_tokens.weight"], "final_norm.weight": sd["norm.weight"]}
    if not cfg.tie_weights:
        ours["out_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        for mine, theirs in _LAYER:
            w = sd[f"layers.{i}.{theirs}.weight"]
            if mine in _ROTATED:
                w = w.reshape(-1, D, C)[:, order].reshape(-1, C)
            ours[f"trf_blocks.{i}.{mine}.weight"] = w
        for mine, theirs in _QK_NORMS if cfg.qk_norm else ():
            ours[f"trf_blocks.{i}.{mine}.weight"] = sd[f"layers.{i}.{theirs}.weight"][:, order]
    return ours


def load_cohere_safetensors(path) -> GPTModel:
    """GPTModel with the weights of a Hugging Face Cohere (or Cohere2) model.safetensors (or shard index) and
    its config.json beside it."""
    path = weights_file(path, "Cohere")
    sd = _read_tensors(path, prefix="model.")
    cfg = _check_hf_config(path.parent / "config.json", sd)
    return model_with_tensors(cfg, lambda: _our_tensors(sd, cfg), path)


# -- export: the inverse of _our_tensors -----------------------------------------------------------
def is_cohere_shaped(cfg: GPTConfig) -> bool:
    """A SwiGLU MLP beside the attention on one bias-free LayerNorm, or scaled logits: Cohere's pieces (a StableLM
    has plain logits, and norms with biases in its parallel blocks: StableLM 2 12B's), which export writes as a
    Cohere (or refuses)."""
    return cfg.mlp == "swiglu" and (cfg.logit_scale != 1.0 or cfg.norm == "layernorm" and cfg.shared_norm
                                    and not cfg.norm_bias)


def hf_family(cfg: GPTConfig) -> str:
    """cohere2 for a model with local layers (Command R7B's), else cohere."""
    return "cohere2" if cfg.attention_window else "cohere"


def refuse_not_cohere(model: GPTModel, what: str) -> None:
    """What Hugging Face's Cohere (Cohere2, for a model with local layers) does not compute, by name."""
    from tritongpt.train.gpt2_weights import refuse_phi3_touches

    cfg = model.config
    family = "Cohere2" if hf_family(cfg) == "cohere2" else "Cohere"
    refuse_moe_touches(cfg, family, what, bias_free_norms=True, logit_scale=True, per_head_qk=family == "Cohere")
    refuse_phi3_touches(cfg, family, what)
    mismatched = any(bool(cfg.layer_window(i)) != cfg.layer_has_rope(i) for i in range(cfg.n_layer))
    for differs, why in ((cfg.position_encoding != "rope", f"{cfg.positions_said()}, where {family} rotates q "
                          "and k (RoPE)"),
                         (cfg.norm != "layernorm" or cfg.norm_bias, f"normalizes with {cfg.norm}"
                          f"{' with biases' if cfg.norm_bias else ''}, where {family} has LayerNorms without biases "
                          "(norm_bias False)"),
                         (cfg.mlp != "swiglu", f"has a {cfg.mlp} MLP, where {family}'s is SwiGLU"),
                         (not cfg.shared_norm, f"does not run attention and MLP beside each other on one norm "
                          f"(parallel_residual, shared_norm), which every {family} block does"),
                         (cfg.bias or cfg.has_qkv_bias, f"has biases, where {family}'s projections have none"),
                         (cfg.head_bias, f"has a bias on its LM head (head_bias), which {family} does not"),
                         (not cfg.scale_attention, f"does not scale its attention scores, which {family} does"),
                         (cfg.head_dim * cfg.n_head != cfg.n_embd, f"has heads of {cfg.head_dim} "
                          f"(attention_head_dim), where {family}'s are n_embd / n_head wide"),
                         (cfg.qk_norm and cfg.qk_norm_width != "each", f"normalizes q and k with one weight for "
                          f"every head (qk_norm_width {cfg.qk_norm_width!r}), where {family}'s q/k norms (Command R+'s "
                          "use_qk_norm) have a weight of each head's own ('each')"),
                         (family == "Cohere" and bool(cfg.nope_layers), f"has layers without RoPE "
                          f"({cfg.nope_layers}) and no local attention, where a Cohere rotates in every layer (Cohere2 "
                          "leaves its global layers unrotated)"),
                         (family == "Cohere2" and mismatched, f"rotates q and k in layers other than its local "
                          f"ones (local: {cfg.window_layers}, without RoPE: {cfg.nope_layers or 'none'}), where "
                          "Cohere2 rotates in its sliding layers only and leaves its global ones unrotated"),
                         (bool(cfg.rope_local_theta), f"rotates its local layers with a RoPE base of their own, which "
                          f"{family} does not"),
                         (cfg.scale_embeddings, f"scales its token embeddings, which {family} does not"),
                         (cfg.post_norms or not cfg.pre_norms, "normalizes each sublayer's output (post_norms) or not "
                          f"its input (pre_norms False), which {family} does not"),
                         (bool(cfg.logit_softcap), f"soft-caps its logits, which {family} does not"),
                         (bool(cfg.attn_softcap), f"soft-caps its attention scores, which {family} does not"),
                         (bool(cfg.attention_scale_width), f"scales its attention scores by "
                          f"1/sqrt({cfg.attention_scale_width}), where {family} scales them by 1/sqrt(head_dim)")):
        if differs:
            raise UserError(f"this model {why}: it cannot be exported as {what}")


def _hf_tensors(model: GPTModel) -> dict:
    """Our parameters under CohereForCausalLM's names, q's and k's rows put back in Cohere's pair order, the
    padding rows dropped."""
    cfg = model.config
    C, D, V = cfg.n_embd, cfg.head_dim, cfg.vocab_size
    back = torch.argsort(half_split_order(D, D))
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    hf = {"embed_tokens.weight": sd["tok_emb.weight"][:V], "norm.weight": sd["final_norm.weight"]}
    for i in range(cfg.n_layer):
        for mine, theirs in _LAYER:
            w = sd[f"trf_blocks.{i}.{mine}.weight"]
            if mine in _ROTATED:
                w = w.reshape(-1, D, C)[:, back].reshape(-1, C)
            hf[f"layers.{i}.{theirs}.weight"] = w
        for mine, theirs in _QK_NORMS if cfg.qk_norm else ():
            hf[f"layers.{i}.{theirs}.weight"] = sd[f"trf_blocks.{i}.{mine}.weight"][:, back]
    out = {"model." + k: v for k, v in hf.items()}
    if not cfg.tie_weights:
        out["lm_head.weight"] = sd["out_head.weight"][:V]
    return {k: v.to("cpu", memory_format=torch.contiguous_format, copy=True) for k, v in out.items()}


def hf_config(cfg: GPTConfig, eos_token_id: int | None = None) -> dict:
    """CohereConfig (Cohere2Config) fields for this model: what _check_hf_config reads back. RoPE both ways:
    rope_parameters (transformers 5) and rope_theta / rope_scaling (4.x)."""
    kind = hf_family(cfg)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})}
    d = {"model_type": kind, "architectures": [MODEL_TYPES[kind]], "vocab_size": cfg.vocab_size,
         "max_position_embeddings": cfg.context_length, "hidden_size": cfg.n_embd,
         "intermediate_size": cfg.ff_hidden, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
         "num_key_value_heads": cfg.kv_heads, "hidden_act": "silu", "layer_norm_eps": cfg.norm_eps,
         "logit_scale": cfg.logit_scale, "attention_bias": False, "attention_dropout": 0.0, "use_qk_norm": cfg.qk_norm,
         "tie_word_embeddings": cfg.tie_weights, "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling,
         "rope_parameters": rope, "bos_token_id": eos_token_id, "eos_token_id": eos_token_id, "pad_token_id": None}
    if kind == "cohere2":
        d.update(sliding_window=cfg.attention_window, layer_types=[
            "sliding_attention" if cfg.layer_window(i) else "full_attention" for i in range(cfg.n_layer)])
    return d


def export_cohere(model: GPTModel, out_dir, eos_token_id: int | None = None, overwrite: bool = False) -> list:
    """Write model as a Hugging Face Cohere folder (Cohere2 with local layers): model.safetensors and config.json,
    which transformers.AutoModelForCausalLM.from_pretrained(out_dir) and load_checkpoint both read. Returns the
    paths written; refuses to replace them unless overwrite."""
    refuse_not_cohere(model, f"a {'Cohere2' if hf_family(model.config) == 'cohere2' else 'Cohere'} folder")
    return write_hf_folder(out_dir, lambda: _hf_tensors(model), hf_config(model.config, eos_token_id), overwrite)
