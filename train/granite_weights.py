"""IBM Granite weights (Granite 3.x dense: Hugging Face's GraniteForCausalLM, model_type "granite"; Granite 3.0
MoE, granite-3.0-1b-a400m / 3b-a800m: GraniteMoeForCausalLM, "granitemoe") into GPTModel, and back out.

A Granite is a Llama (RMSNorm, SwiGLU, RoPE, grouped-query attention, Llama's tensor names) with four muP
multipliers, each a GPTConfig field:
- embedding_multiplier: the token embeddings times it (12.0 in Granite 3): GPTConfig.embedding_multiplier;
- attention_multiplier: the attention scores' scale itself, in place of 1/sqrt(head_dim) (0.015625, 1/64 over
  heads of 128): GPTConfig.attention_multiplier, the softmax scale of both kernel paths;
- residual_multiplier: each block's attention and MLP outputs times it before they join the residual stream
  (0.22): GPTConfig.residual_multiplier;
- logits_scaling: the logits DIVIDED by it (8.0): GPTConfig.logit_scale = 1 / logits_scaling (Cohere's scale,
  applied to the LM head's input). The export writes back the shortest decimal whose inverse is that scale, so a
  config.json's 8.0 or 3.0 comes back as it was (logits_scaling_of).
GraniteMoe's MLP is block_sparse_moe: router.layer [E, C] (a softmax over the top k logits: our top k of the
softmax renormalized, moe_norm_topk), input_linear [E, 2H, C] (each expert's gate rows, then its up rows:
transformers' chunk(2) reads gate first) and output_linear [E, C, H]; transformers 5 renames them gate_up_proj,
down_proj and router.weight when it loads, and either layout is read here; the export writes the Hub's.
What this model does not compute is refused by name: GraniteMoeShared's shared experts ("granitemoeshared"), the
hybrid Mamba layers ("granitemoehybrid"), the sliding-window variants, another activation, a RoPE scaling other
than ours, biases on some layers only (a GraniteMoe's attention_bias).
"""
import math
from pathlib import Path

import torch

from tritongpt.errors import UserError, read_json_object
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.gpt2_weights import (_read_tensors, config_flag, config_json_gptconfig, model_with_tensors,
                                          weights_file, write_hf_folder)
from tritongpt.train.llama_weights import _our_tensors as llama_tensors
from tritongpt.train.llama_weights import LLAMA_KEYS, _rope_theta, hf_shapes, shape_fields

MODEL_TYPES = {"granite": "GraniteForCausalLM", "granitemoe": "GraniteMoeForCausalLM"}
_NAMES = {"granite": "Granite", "granitemoe": "GraniteMoe"}
# Granite model_types this model does not compute, and why: refused by name rather than read as another family
_REFUSED = {"granitemoeshared": "shared experts beside the routed ones (shared_intermediate_size)",
            "granitemoehybrid": "Mamba-2 layers among the attention ones (Granite 4)",
            "granite_swa": "a sliding window whose layers this reader does not map",
            "granitemoe_swa": "a sliding window whose layers this reader does not map"}
_MULTIPLIERS = ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")
_ATT = (("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm"), ("att.W_query", "self_attn.q_proj"),
        ("att.W_key", "self_attn.k_proj"), ("att.W_value", "self_attn.v_proj"), ("att.out_proj", "self_attn.o_proj"))
_MOE = "block_sparse_moe"


def is_granite_file(path) -> bool:
    """A Hugging Face Granite (any Granite model_type: the ones not computed are refused by name when loaded)
    model.safetensors or shard index: its config.json says so."""
    cfg_json = Path(path).parent / "config.json"
    return cfg_json.is_file() and read_json_object(cfg_json).get("model_type") in (*MODEL_TYPES, *_REFUSED)


def _multiplier(d: dict, key: str, cfg_json) -> float:
    """One of Granite's multipliers from config.json (GraniteConfig's default 1.0), a finite number > 0."""
    value = d.get(key, 1.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UserError(f"{cfg_json} has {key} {value!r}; it must be a finite number > 0")
    return float(value)


def _router(sd: dict, i: int):
    """Layer i's router weight [E, C]: the Hub's router.layer, or transformers 5's router (None: neither)."""
    return sd.get(f"layers.{i}.{_MOE}.router.layer.weight", sd.get(f"layers.{i}.{_MOE}.router.weight"))


def _experts(sd: dict, i: int, path) -> tuple:
    """Layer i's experts as stacked (gate [E, H, C], up [E, H, C], down [E, C, H]) from input_linear (the Hub's) or
    gate_up_proj (transformers 5's), gate rows first as transformers' chunk(2) reads them."""
    block = f"layers.{i}.{_MOE}"
    fused_name = next((n for n in (f"{block}.input_linear.weight", f"{block}.experts.gate_up_proj") if n in sd),
                      f"{block}.input_linear.weight")
    fused = sd[fused_name]
    if fused.dim() != 3 or fused.shape[1] % 2:
        raise UserError(f"{path}: {fused_name} has shape {tuple(fused.shape)}, not [experts, 2 hidden, width]")
    h = fused.shape[1] // 2
    down = sd.get(f"{block}.experts.down_proj", sd.get(f"{block}.output_linear.weight"))
    if down is None:
        raise KeyError(f"{block}.output_linear.weight")
    return fused[:, :h], fused[:, h:], down


def _check_hf_config(cfg_json: Path, sd: dict, path) -> GPTConfig:
    """The GPTConfig of a Granite or GraniteMoe config.json, checked against the tensors beside it; what this model
    does not compute refused by name."""
    d = read_json_object(cfg_json)
    kind = d.get("model_type")
    if kind in _REFUSED:
        raise UserError(f"{cfg_json} says model_type {kind!r}: {_REFUSED[kind]}, which this model does not "
                        f"compute; it reads {' and '.join(repr(k) for k in MODEL_TYPES)} only")
    if kind not in MODEL_TYPES:
        raise UserError(f"{cfg_json} says model_type {kind!r}; a Granite folder's is one of {', '.join(MODEL_TYPES)}")
    family = _NAMES[kind]
    if d.get("hidden_act", "silu") != "silu":
        raise UserError(f"{cfg_json} has hidden_act {d['hidden_act']!r}; this model's SwiGLU computes 'silu' only")
    multipliers = {key: _multiplier(d, key, cfg_json) for key in _MULTIPLIERS}
    moe = {}
    if kind == "granitemoe":
        for key in ("shared_intermediate_size", "num_shared_experts"):
            if d.get(key):
                raise UserError(f"{cfg_json} has {key} {d[key]!r} (GraniteMoeShared's shared experts); this model "
                                "routes every token to its top k experts only")
        if config_flag(d, "attention_bias", False, cfg_json) or "layers.0.self_attn.q_proj.bias" in sd:
            raise UserError(f"{cfg_json} has attention_bias {d.get('attention_bias')!r}; this model reads GraniteMoe "
                            "without biases only (its experts have none, and this model's biases are all or none)")
        router = _router(sd, 0)
        if router is None:
            raise UserError(f"{cfg_json.parent}: not a GraniteMoe model, missing tensor "
                            f"'layers.0.{_MOE}.router.layer.weight' (the router)")
        n_experts = router.shape[0]
        if d.get("num_local_experts", n_experts) != n_experts:
            raise UserError(f"{cfg_json} says num_local_experts {d['num_local_experts']!r}, but the router scores "
                            f"{n_experts} experts")
        k = d.get("num_experts_per_tok", 2)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_experts:
            raise UserError(f"{cfg_json} has num_experts_per_tok {k!r}; it must be an integer in [1, {n_experts}]")
        aux = d.get("router_aux_loss_coef", 0.0) if config_flag(d, "output_router_logits", False, cfg_json) else 0.0
        # the softmax over the top k logits (GraniteMoeTopKRouter) is the full softmax's top k renormalized
        moe = dict(n_experts=n_experts, experts_per_token=k, moe_norm_topk=True, moe_aux_loss=aux)
        sd = {**sd, "layers.0.mlp.gate_proj.weight": _experts(sd, 0, path)[0][0]}  # hf_shapes reads the width there
        bias = False
    else:
        attention_bias, mlp_bias = (config_flag(d, k, False, cfg_json) for k in ("attention_bias", "mlp_bias"))
        if attention_bias != mlp_bias:
            raise UserError(f"{cfg_json} has attention_bias {attention_bias} and mlp_bias {mlp_bias}; this model's "
                            "linear layers have biases all or none (GPTConfig.bias)")
        bias = attention_bias
    shapes = hf_shapes(d, sd, cfg_json, family)
    theta, scaling = _rope_theta(d, cfg_json)
    return config_json_gptconfig(
        cfg_json, {**LLAMA_KEYS, "moe_aux_loss": "router_aux_loss_coef"}, **shape_fields(shapes, sd, d, cfg_json),
        context_length=d.get("max_position_embeddings", 2048), bias=bias, position_encoding="rope", rope_theta=theta,
        rope_scaling=scaling, norm="rmsnorm", norm_eps=d.get("rms_norm_eps", 1e-6), mlp="swiglu",
        embedding_multiplier=multipliers["embedding_multiplier"],
        residual_multiplier=multipliers["residual_multiplier"],
        attention_multiplier=multipliers["attention_multiplier"], logit_scale=1.0 / multipliers["logits_scaling"],
        **moe)


def _our_tensors(sd: dict, cfg: GPTConfig, path) -> dict:
    """Granite's tensors under our parameter names (KeyError: a tensor the file lacks): a dense one's are Llama's."""
    if not cfg.n_experts:
        return llama_tensors(sd, cfg)
    ours = {"tok_emb.weight": sd["embed_tokens.weight"], "final_norm.weight": sd["norm.weight"]}
    if not cfg.tie_weights:
        ours["out_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        for mine, theirs in _ATT:
            ours[f"trf_blocks.{i}.{mine}.weight"] = sd[f"layers.{i}.{theirs}.weight"]
        router = _router(sd, i)
        if router is None:
            raise KeyError(f"layers.{i}.{_MOE}.router.layer.weight")
        ours[f"trf_blocks.{i}.ff.router.weight"] = router
        gate, up, down = _experts(sd, i, path)
        ours[f"trf_blocks.{i}.ff.w_gate"], ours[f"trf_blocks.{i}.ff.w_up"] = gate, up
        ours[f"trf_blocks.{i}.ff.w_down"] = down
    return ours


def load_granite_safetensors(path) -> GPTModel:
    """GPTModel with the weights of a Hugging Face Granite or GraniteMoe model.safetensors (or shard index) and its
    config.json beside it."""
    path = weights_file(path, "Granite")
    sd = _read_tensors(path, prefix="model.")
    cfg = _check_hf_config(path.parent / "config.json", sd, path)
    return model_with_tensors(cfg, lambda: _our_tensors(sd, cfg, path), path)


# -- export: the inverse of _our_tensors -----------------------------------------------------------
def is_granite_shaped(cfg: GPTConfig) -> bool:
    """A model with muP multipliers (which only Granite's folders say), or scaled logits on a Llama-shaped block
    (RMSNorm, sequential: a Cohere's are parallel on a LayerNorm): export writes it as a Granite (or refuses)."""
    mup = (cfg.embedding_multiplier, cfg.residual_multiplier, cfg.attention_multiplier) != (1.0, 1.0, 0.0)
    return mup or cfg.logit_scale != 1.0 and cfg.norm == "rmsnorm" and not cfg.parallel_residual


def hf_family(cfg: GPTConfig) -> str:
    """granitemoe for a mixture of experts, else granite."""
    return "granitemoe" if cfg.n_experts else "granite"


def family_name(cfg: GPTConfig) -> str:
    return _NAMES[hf_family(cfg)]


def logits_scaling_of(logit_scale: float) -> float:
    """Granite's logits_scaling for our logit_scale (its inverse): the shortest decimal s with 1 / s == logit_scale
    exactly, which is the config.json's own number whenever that one was the shortest to give this scale (8.0,
    3.0, 12.5: 1 / (1 / x) is not x for every float x, so a plain 1 / logit_scale could write 2.9999999999999996)."""
    for digits in range(1, 18):
        s = float(f"{1.0 / logit_scale:.{digits}g}")
        if 1.0 / s == logit_scale:
            return s
    return 1.0 / logit_scale


def refuse_not_granite(model: GPTModel, what: str) -> None:
    """What Hugging Face's Granite (GraniteMoe, for a mixture of experts) does not compute, by name: Llama's
    refusals on a twin without the multipliers and the logit scale, which Granite has, then Granite's own."""
    from dataclasses import replace

    from tritongpt.train.gpt2_weights import refuse_norm_touches
    from tritongpt.train.llama_weights import refuse_not_llama
    from tritongpt.train.moe_weights import _Shell

    cfg = model.config
    family = family_name(cfg)
    refuse_norm_touches(cfg, family, what, logit_scale=True, mup=True)
    for differs, why in ((cfg.n_experts and (cfg.moe_bias or cfg.moe_activation != "glu"), "has GPT-OSS's experts "
                          f"(moe_bias {cfg.moe_bias}, moe_activation {cfg.moe_activation!r}), where {family}'s are "
                          "bias-free SwiGLUs: a GPT-OSS folder takes them"),
                         (cfg.n_experts and cfg.bias, f"has biases, where {family}'s are none (its experts have "
                          "none)"),
                         (cfg.n_experts and not cfg.moe_norm_topk, "does not renormalize its top k router weights "
                          "(moe_norm_topk False), which GraniteMoe does (a softmax over the top k logits)"),
                         (cfg.n_experts and cfg.moe_layers != "all", f"has dense MLPs in some layers (moe_layers "
                          f"{cfg.moe_layers!r}), where every {family} layer is a mixture of experts"),
                         (cfg.qkv_bias_only, f"has biases on q, k and v only (Qwen2's), where {family}'s linear "
                          "layers have biases all or none"),
                         (cfg.qk_norm, f"normalizes q and k (qk_norm), which {family} does not"),
                         (bool(cfg.attention_window), f"has local attention (attention_window "
                          f"{cfg.attention_window}), where {family} attends to the whole context"),
                         (cfg.nope_layers != "", f"has layers without RoPE ({cfg.nope_layers}), which {family} "
                          "does not")):
        if differs:
            raise UserError(f"this model {why}: it cannot be exported as {what}")
    plain = replace(cfg, n_experts=0, moe_aux_loss=0.0, moe_layers="all", moe_dense_hidden=0, logit_scale=1.0,
                    embedding_multiplier=1.0, residual_multiplier=1.0, attention_multiplier=0.0)
    refuse_not_llama(_Shell(plain), what, family)


def _hf_tensors(model: GPTModel) -> dict:
    """Our parameters under Granite's names (a dense one's are Llama's; GraniteMoe's experts fused as the Hub's
    input_linear [E, 2H, C], gate rows first, and output_linear); the padding rows dropped."""
    from tritongpt.train.llama_weights import _hf_tensors as llama_hf_tensors

    cfg = model.config
    if not cfg.n_experts:
        return llama_hf_tensors(model)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    V = cfg.vocab_size
    hf = {"embed_tokens.weight": sd["tok_emb.weight"][:V], "norm.weight": sd["final_norm.weight"]}
    for i in range(cfg.n_layer):
        for mine, theirs in _ATT:
            hf[f"layers.{i}.{theirs}.weight"] = sd[f"trf_blocks.{i}.{mine}.weight"]
        hf[f"layers.{i}.{_MOE}.router.layer.weight"] = sd[f"trf_blocks.{i}.ff.router.weight"]
        hf[f"layers.{i}.{_MOE}.input_linear.weight"] = torch.cat([sd[f"trf_blocks.{i}.ff.w_gate"],
                                                                  sd[f"trf_blocks.{i}.ff.w_up"]], dim=1)
        hf[f"layers.{i}.{_MOE}.output_linear.weight"] = sd[f"trf_blocks.{i}.ff.w_down"]
    out = {"model." + k: v for k, v in hf.items()}
    if not cfg.tie_weights:
        out["lm_head.weight"] = sd["out_head.weight"][:V]
    return {k: v.to("cpu", memory_format=torch.contiguous_format, copy=True) for k, v in out.items()}


def hf_config(cfg: GPTConfig, eos_token_id: int | None = None) -> dict:
    """GraniteConfig (GraniteMoeConfig) fields for this model: what _check_hf_config reads back. RoPE both ways:
    rope_parameters (transformers 5) and rope_theta / rope_scaling (4.x). attention_multiplier 0 (ours: the
    default scale) is written as the scale it means, 1/sqrt(head_dim)."""
    kind = hf_family(cfg)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})}
    d = {"model_type": kind, "architectures": [MODEL_TYPES[kind]], "vocab_size": cfg.vocab_size,
         "max_position_embeddings": cfg.context_length, "hidden_size": cfg.n_embd,
         "intermediate_size": cfg.ff_hidden, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
         "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
         "rms_norm_eps": cfg.norm_eps, "attention_bias": cfg.bias, "attention_dropout": 0.0,
         "embedding_multiplier": cfg.embedding_multiplier, "residual_multiplier": cfg.residual_multiplier,
         "attention_multiplier": cfg.attention_multiplier or 1.0 / math.sqrt(cfg.head_dim),
         "logits_scaling": logits_scaling_of(cfg.logit_scale),
         "tie_word_embeddings": cfg.tie_weights, "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling,
         "rope_parameters": rope, "bos_token_id": eos_token_id, "eos_token_id": eos_token_id, "pad_token_id": None}
    if kind == "granite":
        d.update(mlp_bias=cfg.bias)
    else:
        d.update(num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.experts_per_token,
                 router_aux_loss_coef=cfg.moe_aux_loss, output_router_logits=bool(cfg.moe_aux_loss))
    return d


def export_granite(model: GPTModel, out_dir, eos_token_id: int | None = None, overwrite: bool = False) -> list:
    """Write model as a Hugging Face Granite folder (GraniteMoe for a mixture of experts): model.safetensors and
    config.json, which transformers.AutoModelForCausalLM.from_pretrained(out_dir) and load_checkpoint both read.
    Returns the paths written; refuses to replace them unless overwrite."""
    refuse_not_granite(model, f"a {family_name(model.config)} folder")
    return write_hf_folder(out_dir, lambda: _hf_tensors(model), hf_config(model.config, eos_token_id), overwrite)
