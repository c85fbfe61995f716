"""Mixture-of-experts weights (Mixtral, Qwen3-MoE, OLMoE, Qwen2-MoE) into GPTModel, and back out.

Each is a Llama-shaped model whose MLPs are GPTConfig.n_experts SwiGLU experts and a router (MoEFeedForward):
- Mixtral: Mistral's attention (its sliding window, null in the published configs), a router per block
  (block_sparse_moe.gate) and experts w1 (gate), w3 (up), w2 (down); the top k weights renormalized.
- Qwen3-MoE: Qwen3's attention (per-head q/k RMSNorms), mlp.gate and mlp.experts.{e}.gate_proj / up_proj /
  down_proj of hidden size moe_intermediate_size; renormalized when norm_topk_prob. Dense layers among them
  (mlp_only_layers, decoder_sparse_step: GPTConfig.moe_layers) are mlp.gate_proj / up_proj / down_proj of
  hidden size intermediate_size (GPTConfig.moe_dense_hidden).
- OLMoE: Qwen3-MoE's tensor names, q/k RMSNorms over the whole projection (qk_norm_width "all"), the top k
  weights not renormalized (norm_topk_prob false); clip_qkv refused.
- Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen2's attention (q/k/v biases, qkv_bias; its window in the
  layers layer_types names), Qwen3-MoE's expert names and widths, renormalized when norm_topk_prob (false in
  Qwen1.5-MoE), and a shared expert: mlp.shared_expert.gate_proj / up_proj / down_proj of hidden size
  shared_expert_intermediate_size, scaled by sigmoid(mlp.shared_expert_gate(x)) (GPTConfig.moe_shared_hidden).
  Dense layers (mlp_only_layers, decoder_sparse_step) as Qwen3-MoE's (no shared expert there).
The Hub's folders hold one tensor per expert (those names); transformers 5 merges them into gate_up_proj
[E, 2H, C] and down_proj [E, C, H] when it loads and splits them back when it saves, so either layout is read
here and the per-expert one is written. What a config.json asks that this model does not compute (another
family's shared experts: DeepSeek's ungated ones; another router, biases, another activation) is refused by name.
Each reads router_aux_loss_coef as 0 (transformers adds it only with output_router_logits, false in the Hub's
folders) and writes GPTConfig.moe_aux_loss there with output_router_logits false.
"""
from pathlib import Path

import torch

from tritongpt.errors import UserError, read_json_object
from tritongpt.model.config import GPTConfig, layer_list
from tritongpt.model.gpt import GPTModel
from tritongpt.train.gpt2_weights import (_read_tensors, config_flag, config_json_gptconfig, hf_quantization,
                                          model_with_tensors, refuse_per_head_qk, refuse_quantized, tensor_names,
                                          weights_file, write_hf_folder)
from tritongpt.train.llama_weights import LLAMA_KEYS, _rope_theta, _sliding_window, hf_shapes, shape_fields

FAMILIES = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM",
            "qwen2_moe": "Qwen2MoeForCausalLM"}
_NAMES = {"mixtral": "Mixtral", "qwen3_moe": "Qwen3-MoE", "olmoe": "OLMoE", "qwen2_moe": "Qwen2-MoE"}
FAMILY_NAMES = tuple(_NAMES.values())
# (router, the expert names of gate, up, down) under "layers.{i}.": Mixtral's, then Qwen3-MoE's, OLMoE's and
# Qwen2-MoE's (whose shared expert has the same three names under mlp.shared_expert)
_MOE = {"mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
        "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
        "olmoe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
        "qwen2_moe": ("mlp", ("gate_proj", "up_proj", "down_proj"))}
# Qwen2-MoE's shared expert: (ours under trf_blocks.{i}.ff., theirs under layers.{i}.mlp.)
_SHARED_EXPERT = (("shared_expert.w_gate", "shared_expert.gate_proj"), ("shared_expert.w_up", "shared_expert.up_proj"),
                  ("shared_expert.w_down", "shared_expert.down_proj"), ("shared_gate", "shared_expert_gate"))
# a dense layer's MLP (Qwen2-MoE's and Qwen3-MoE's mlp_only_layers): ours under trf_blocks.{i}.ff., theirs under
# layers.{i}.mlp.
_DENSE = {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}
_QKV = ("att.W_query", "att.W_key", "att.W_value")
_ATT = (("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm"), ("att.W_query", "self_attn.q_proj"),
        ("att.W_key", "self_attn.k_proj"), ("att.W_value", "self_attn.v_proj"), ("att.out_proj", "self_attn.o_proj"))
_QK_NORMS = (("att.q_norm", "self_attn.q_norm"), ("att.k_norm", "self_attn.k_norm"))
# config.json keys of other MoE designs, refused by name when they would change the function (Qwen2-MoE's own
# shared_expert_intermediate_size is read: its shared expert is gated, GPTConfig.moe_shared_hidden)
_SHARED = ("shared_expert_intermediate_size", "n_shared_experts", "num_shared_experts")


def is_moe_file(path) -> bool:
    """A Hugging Face Mixtral, Qwen3-MoE, OLMoE or Qwen2-MoE model.safetensors: its config.json says that model_type, or
    without one, its tensors have Mixtral's names (block_sparse_moe)."""
    cfg_json = Path(path).parent / "config.json"
    if cfg_json.is_file() and "model_type" in (d := read_json_object(cfg_json)):
        return d["model_type"] in FAMILIES
    return any(".block_sparse_moe." in k for k in tensor_names(path))


def _experts(sd: dict, i: int, kind: str, n_experts: int, path) -> tuple:
    """Layer i's experts as stacked (gate [E, H, C], up [E, H, C], down [E, C, H]): from the Hub's one tensor per
    expert, or transformers' merged gate_up_proj and down_proj."""
    block, (gate, up, down) = _MOE[kind]
    merged = f"layers.{i}.{block}.experts.gate_up_proj"
    if merged in sd:
        gate_up = sd[merged]
        if gate_up.dim() != 3 or gate_up.shape[1] % 2:
            raise UserError(f"{path}: {merged} has shape {tuple(gate_up.shape)}, not [experts, 2 hidden, width]")
        h = gate_up.shape[1] // 2
        return gate_up[:, :h], gate_up[:, h:], sd[f"layers.{i}.{block}.experts.down_proj"]
    names = [f"layers.{i}.{block}.experts.{e}.{{}}.weight" for e in range(n_experts)]
    return tuple(torch.stack([sd[n.format(which)] for n in names]) for which in (gate, up, down))


def _count_experts(sd: dict, kind: str, path, first: int = 0) -> int:
    """The experts the router of layer `first` (the first MoE layer) scores."""
    block = _MOE[kind][0]
    router = sd.get(f"layers.{first}.{block}.gate.weight")
    if router is None:
        raise UserError(f"{path}: not a {_NAMES[kind]} model, missing tensor 'layers.{first}.{block}.gate.weight' "
                        "(the router)")
    return router.shape[0]


def _moe_layers(d: dict, kind: str, cfg_json) -> str:
    """GPTConfig.moe_layers of a config.json: every layer but Qwen2-MoE's and Qwen3-MoE's dense ones, as their
    decoder layers choose (transformers' Qwen2MoeDecoderLayer, Qwen3MoeDecoderLayer): layer i is sparse when it
    is not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0."""
    if kind not in ("qwen3_moe", "qwen2_moe"):
        return "all"
    n_layer, only, step = d.get("num_hidden_layers"), d.get("mlp_only_layers") or [], d.get("decoder_sparse_step", 1)
    if not only and step == 1:  # every layer (the published Qwen3-MoE, Qwen1.5-MoE folders)
        return "all"
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise UserError(f"{cfg_json} has decoder_sparse_step {step!r}; it must be an integer >= 1")
    if not isinstance(n_layer, int) or not isinstance(only, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_layer for i in only):
        raise UserError(f"{cfg_json} has mlp_only_layers {only!r}; it must be a list of layer indices below "
                        f"num_hidden_layers {n_layer!r}")
    sparse = [i for i in range(n_layer) if i not in only and (i + 1) % step == 0]
    if not sparse:
        raise UserError(f"{cfg_json} has mlp_only_layers {only!r} and decoder_sparse_step {step!r}, which leave "
                        f"no layer of its {n_layer} a mixture of experts: a dense model, not read as {_NAMES[kind]}")
    return ",".join(map(str, sparse))


def _refuse(d: dict, kind: str, cfg_json) -> None:
    """What a config.json asks that this model does not compute, by name."""
    name = _NAMES[kind]
    if d.get("hidden_act", "silu") != "silu":
        raise UserError(f"{cfg_json} has hidden_act {d['hidden_act']!r}; this model's experts compute 'silu' only")
    for key in _SHARED:
        if kind == "qwen2_moe" and key == "shared_expert_intermediate_size":
            continue  # Qwen2-MoE's gated shared expert, read (moe_shared_hidden)
        if d.get(key):
            which = ("a gated shared expert, Qwen2-MoE's: read under model_type qwen2_moe"
                     if key == "shared_expert_intermediate_size" else
                     "shared experts beside the routed ones, as DeepSeek's, ungated")
            raise UserError(f"{cfg_json} has {key} {d[key]!r} ({which}); {name} routes every token to its top k "
                            "experts" + (" and one shared expert scaled by a sigmoid gate only" if kind == "qwen2_moe"
                                         else " only"))
    # (Qwen2MoeConfig has no attention_bias: its q/k/v biases are qkv_bias, read in _check_hf_config)
    if kind != "qwen2_moe" and (config_flag(d, "attention_bias", False, cfg_json, kind)
                                or config_flag(d, "mlp_bias", False, cfg_json, kind)):
        raise UserError(f"{cfg_json} has attention_bias {d.get('attention_bias')!r} and mlp_bias "
                        f"{d.get('mlp_bias')!r}; this model reads {name} without biases only")
    if kind == "olmoe" and d.get("clip_qkv") is not None:
        raise UserError(f"{cfg_json} has clip_qkv {d['clip_qkv']!r}; this model does not clamp q, k and v")
    if d.get("router_type", "topk") != "topk" or d.get("scoring_func", "softmax") != "softmax":
        raise UserError(f"{cfg_json} has router_type {d.get('router_type', 'topk')!r} and scoring_func "
                        f"{d.get('scoring_func', 'softmax')!r}; this model's router is a softmax then top k")


def _check_hf_config(cfg_json: Path, sd: dict) -> GPTConfig:
    """The GPTConfig of a Mixtral, Qwen3-MoE, OLMoE or Qwen2-MoE config.json, checked against the tensors beside
    it."""
    d = read_json_object(cfg_json)
    kind = d.get("model_type", "mixtral")
    _refuse(d, kind, cfg_json)
    moe_layers = _moe_layers(d, kind, cfg_json)
    first = 0 if moe_layers == "all" else int(moe_layers.split(",")[0])
    n_experts = _count_experts(sd, kind, cfg_json.parent, first)
    gate0 = _experts(sd, first, kind, n_experts, cfg_json.parent)[0][0]
    for key in ("num_local_experts", "num_experts"):
        if key in d and d[key] != n_experts:
            raise UserError(f"{cfg_json} says {key} {d[key]!r}, but the router scores {n_experts} experts")
    # hf_shapes reads a dense MLP's width: the experts' is intermediate_size (Mixtral's, OLMoE's) or
    # moe_intermediate_size (Qwen3-MoE's and Qwen2-MoE's, whose intermediate_size is the dense layers' it has none of)
    width_key = "moe_intermediate_size" if kind in ("qwen3_moe", "qwen2_moe") else "intermediate_size"
    shapes = hf_shapes({k: v for k, v in d.items() if k != "intermediate_size"} | (
        {"intermediate_size": d[width_key]} if width_key in d else {}),
        {**sd, "layers.0.mlp.gate_proj.weight": gate0}, cfg_json, _NAMES[kind])
    # the dense layers' width: their gate_proj's (intermediate_size, which a config.json that says it must agree)
    dense = [i for i in range(shapes[3]) if i not in layer_list(moe_layers, shapes[3])]
    dense_hidden = 0
    if dense:
        gate = sd.get(f"layers.{dense[0]}.mlp.gate_proj.weight")
        if gate is None:
            raise UserError(f"{cfg_json.parent}: layer {dense[0]} is dense (mlp_only_layers, decoder_sparse_step), "
                            f"and tensor 'layers.{dense[0]}.mlp.gate_proj.weight' (its MLP) is missing")
        dense_hidden = gate.shape[0]
        if d.get("intermediate_size", dense_hidden) != dense_hidden:
            raise UserError(f"{cfg_json} says intermediate_size {d['intermediate_size']!r}, but the dense layers' "
                            f"MLP weights have {dense_hidden}")
    k = d.get("num_experts_per_tok", 2)
    # a window config.json does not name: MixtralConfig's default is none (Mistral's 4096), Qwen3MoeConfig's 4096
    window, layers = (_sliding_window({"sliding_window": None, **d}, "mistral", shapes[3], cfg_json)
                      if kind == "mixtral" else
                      (d.get("sliding_window", 4096) or 0, "all")
                      if kind == "qwen3_moe" and config_flag(d, "use_sliding_window", False, cfg_json, kind)
                      else _qwen2_moe_window(d, shapes[3], cfg_json) if kind == "qwen2_moe" else (0, "all"))
    # MixtralConfig's base when none is said is 1000000 (4.x and 5), Qwen3-MoE's and OLMoE's 10000
    theta, scaling = _rope_theta(d, cfg_json, 1_000_000.0 if kind == "mixtral" else 10000.0)
    norm_topk = True if kind == "mixtral" else config_flag(d, "norm_topk_prob", False, cfg_json, kind)
    # Qwen2-MoE: Qwen2's q/k/v biases (qkv_bias, true unless said; transformers 4.x has them always) and the
    # shared expert, its width the tensors' (Qwen2MoeConfig's default 5632 when config.json names none)
    qkv_bias = kind == "qwen2_moe" and config_flag(d, "qkv_bias", True, cfg_json, kind)
    shared = 0
    if kind == "qwen2_moe":
        gate = sd.get(f"layers.{first}.mlp.shared_expert.gate_proj.weight")
        if gate is None:
            raise UserError(f"{cfg_json.parent}: not a Qwen2-MoE model, missing tensor "
                            f"'layers.{first}.mlp.shared_expert.gate_proj.weight' (the shared expert)")
        shared = gate.shape[0]
        said = d.get("shared_expert_intermediate_size", 5632)
        if said != shared:
            raise UserError(f"{cfg_json} says shared_expert_intermediate_size {said!r}"
                            f"{'' if 'shared_expert_intermediate_size' in d else ' (not said: the default)'}, but "
                            f"the shared expert's weights have {shared}")
    return config_json_gptconfig(
        cfg_json, {**LLAMA_KEYS, "experts_per_token": "num_experts_per_tok"}, **shape_fields(shapes, sd, d, cfg_json),
        context_length=d.get("max_position_embeddings", 2048), bias=False, qkv_bias_only=qkv_bias,
        attention_window=window, window_layers=layers, qk_norm=kind not in ("mixtral", "qwen2_moe"),
        qk_norm_width="all" if kind == "olmoe" else "head", position_encoding="rope", rope_theta=theta,
        rope_scaling=scaling, norm="rmsnorm", norm_eps=d.get("rms_norm_eps", 1e-6), mlp="swiglu",
        n_experts=n_experts, experts_per_token=k, moe_norm_topk=norm_topk, moe_shared_hidden=shared,
        moe_layers=moe_layers, moe_dense_hidden=dense_hidden)


def _qwen2_moe_window(d: dict, n_layer: int, cfg_json) -> tuple:
    """(attention_window, window_layers) of a Qwen2-MoE config.json: none unless use_sliding_window, then the
    layers its layer_types name "sliding_attention" (Qwen2's reading). Without layer_types the layers are
    transformers' guess, and its versions guess apart (4.x: from max_window_layers on; 5: the even layers below
    it): refused by name rather than read as one of them."""
    if not config_flag(d, "use_sliding_window", False, cfg_json, "qwen2_moe"):
        return 0, "all"
    if not d.get("layer_types"):
        raise UserError(f"{cfg_json} has use_sliding_window true and no layer_types: which layers slide their window "
                        "is transformers' guess from max_window_layers, and its versions guess differently; add "
                        "layer_types (one 'sliding_attention' or 'full_attention' a layer)")
    return _sliding_window(d, "qwen2", n_layer, cfg_json)


def _our_tensors(sd: dict, cfg: GPTConfig, kind: str, path) -> dict:
    """Hugging Face MoE tensors under our parameter names (KeyError: a tensor the file lacks)."""
    ours = {"tok_emb.weight": sd["embed_tokens.weight"], "final_norm.weight": sd["norm.weight"]}
    if not cfg.tie_weights:
        ours["out_head.weight"] = sd["lm_head.weight"]
    block = _MOE[kind][0]
    for i in range(cfg.n_layer):
        for mine, theirs in _ATT + (_QK_NORMS if cfg.qk_norm else ()):
            ours[f"trf_blocks.{i}.{mine}.weight"] = sd[f"layers.{i}.{theirs}.weight"]
            if cfg.qkv_bias_only and mine in _QKV:  # Qwen2-MoE's q/k/v biases
                ours[f"trf_blocks.{i}.{mine}.bias"] = sd[f"layers.{i}.{theirs}.bias"]
        if not cfg.is_moe_layer(i):  # a dense layer (mlp_only_layers): Qwen2MoeMLP's / Qwen3MoeMLP's names
            for w in ("w_gate", "w_up", "w_down"):
                ours[f"trf_blocks.{i}.ff.{w}.weight"] = sd[f"layers.{i}.mlp.{_DENSE[w]}.weight"]
            continue
        for mine, theirs in _SHARED_EXPERT if cfg.moe_shared_hidden else ():
            ours[f"trf_blocks.{i}.ff.{mine}.weight"] = sd[f"layers.{i}.{block}.{theirs}.weight"]
        ours[f"trf_blocks.{i}.ff.router.weight"] = sd[f"layers.{i}.{block}.gate.weight"]
        gate, up, down = _experts(sd, i, kind, cfg.n_experts, path)
        ours[f"trf_blocks.{i}.ff.w_gate"], ours[f"trf_blocks.{i}.ff.w_up"] = gate, up
        ours[f"trf_blocks.{i}.ff.w_down"] = down
    return ours


def load_moe_safetensors(path) -> GPTModel:
    """GPTModel with the weights of a Hugging Face Mixtral, Qwen3-MoE, OLMoE or Qwen2-MoE model.safetensors (or
    shard index) and its config.json beside it."""
    path = weights_file(path, "MoE")
    cfg_json = path.parent / "config.json"
    if not cfg_json.is_file():
        raise UserError(f"{path} looks like a mixture-of-experts model, whose heads, experts per token and RoPE "
                        "base are in its config.json: put that file beside it")
    kind = read_json_object(cfg_json).get("model_type", "mixtral")
    if (q := hf_quantization(cfg_json)) is not None:
        # GPTQ and AWQ quantize each expert's gate, up and down as a Linear of its own; MoEFeedForward keeps every
        # expert's in stacked float tensors for the grouped kernels (kernels/moe.py), with no int4 form to fill
        refuse_quantized(q, f"a quantized {_NAMES.get(kind, kind)}: this model's mixture-of-experts layer keeps "
                            "its experts float (stacked tensors run by the grouped kernels), not as int4 linears",
                         f"load the float {_NAMES.get(kind, kind)} it was quantized from (this model's int4 and int8 "
                         "do not take mixture-of-experts models yet)")
    sd = _read_tensors(path, prefix="model.")
    cfg = _check_hf_config(cfg_json, sd)
    return model_with_tensors(cfg, lambda: _our_tensors(sd, cfg, kind, path), path)


# -- export ------------------------------------------------------------------------------------------------
def hf_family(cfg: GPTConfig) -> str:
    """The model_type a MoE model is written as: qwen2_moe with a shared expert (only Qwen2-MoE has one), olmoe
    with q/k norms over the whole projection, qwen3_moe with per-head ones, else mixtral."""
    if cfg.moe_shared_hidden:
        return "qwen2_moe"
    if cfg.qk_norm:
        return "olmoe" if cfg.qk_norm_width == "all" else "qwen3_moe"
    return "mixtral"


def family_name(cfg: GPTConfig) -> str:
    return _NAMES[hf_family(cfg)]


def refuse_not_moe(model: GPTModel, what: str) -> None:
    """A MoE model that Mixtral, Qwen3-MoE, OLMoE or Qwen2-MoE cannot say, refused by name: the Llama-shaped
    fields (refuse_not_llama's), then the family's router (Mixtral always renormalizes the top k), window, biases
    (Qwen2-MoE's q/k/v ones only) and q/k norms (none in Qwen2-MoE)."""
    from dataclasses import replace

    from tritongpt.train.llama_weights import refuse_not_llama

    cfg = model.config
    family = family_name(cfg)
    if not cfg.n_experts:
        raise UserError(f"this model has a dense MLP (n_experts 0): it cannot be exported as {what}")
    refuse_per_head_qk(cfg, family, what)  # before the dense twin below forgets it
    for differs, why in ((cfg.moe_bias or cfg.moe_activation != "glu", f"has GPT-OSS's experts (moe_bias "
                          f"{cfg.moe_bias}, moe_activation {cfg.moe_activation!r}), where {family}'s are bias-free "
                          "SwiGLUs: a GPT-OSS folder takes them"),
                         (cfg.mlp != "swiglu", f"has {cfg.mlp.upper()} experts, where {family}'s are SwiGLU"),
                         (cfg.bias, f"has biases, where {family} has none" + (" but on q, k and v" if
                                                                               family == "Qwen2-MoE" else "")),
                         (cfg.qkv_bias_only and family != "Qwen2-MoE", f"has biases on q, k and v only (Qwen2's), "
                          f"where {family} has none (Qwen2-MoE has them, and a shared expert this model has not)"),
                         (family in ("Mixtral", "OLMoE") and cfg.moe_layers != "all", f"has dense MLPs in some "
                          f"layers (moe_layers {cfg.moe_layers!r}), where every {family} layer is a mixture of "
                          "experts (Qwen2-MoE's and Qwen3-MoE's may be dense: mlp_only_layers)"),
                         (family == "Qwen2-MoE" and cfg.qk_norm, "normalizes q and k (qk_norm), where Qwen2-MoE, "
                          "which has a shared expert as this model does, does not"),
                         # refuse_not_llama below takes them as SmolLM3's, a dense family
                         (cfg.nope_layers != "", f"has layers without RoPE ({cfg.nope_layers}), which {family} "
                          "does not"),
                         (family == "Mixtral" and not cfg.moe_norm_topk, "does not renormalize its top k router "
                          "weights (moe_norm_topk False), which Mixtral always does (Qwen3-MoE and OLMoE may not)"),
                         (family == "Mixtral" and cfg.attention_window and cfg.window_layers != "all",
                          f"has local attention in layers {cfg.window_layers} only, where Mixtral's window is in "
                          "every layer"),
                         (family == "OLMoE" and bool(cfg.attention_window), "has local attention, which OLMoE "
                          "does not"),
                         (family == "Qwen3-MoE" and cfg.attention_window and cfg.window_layers != "all",
                          f"has local attention in layers {cfg.window_layers} only, where Qwen3-MoE's window is in "
                          "every layer")):
        if differs:
            raise UserError(f"this model {why}: it cannot be exported as {what}")
    # the attention is a Mistral's (Mixtral), a Qwen3's (Qwen3-MoE), an OLMo-style one (OLMoE) or a Qwen2's
    # (Qwen2-MoE): Llama's checks on a dense twin, less the OLMo q/k norm OLMoE has
    dense = replace(cfg, n_experts=0, moe_aux_loss=0.0, moe_shared_hidden=0, moe_layers="all", moe_dense_hidden=0,
                    qk_norm_width="head")
    refuse_not_llama(_Shell(dense), what, family)


class _Shell:
    """A stand-in with a .config, for a refusal that reads the model's config only."""

    def __init__(self, config):
        self.config = config


def _hf_tensors(model: GPTModel) -> dict:
    """Our parameters under the family's Hub names, one tensor per expert; the padding rows dropped. Qwen2-MoE's
    q/k/v biases are zeros where the model has none (its attention always has them in transformers 4.x)."""
    cfg = model.config
    kind = hf_family(cfg)
    block, (gate, up, down) = _MOE[kind]
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    V = cfg.vocab_size
    hf = {"embed_tokens.weight": sd["tok_emb.weight"][:V], "norm.weight": sd["final_norm.weight"]}
    for i in range(cfg.n_layer):
        for mine, theirs in _ATT + (_QK_NORMS if cfg.qk_norm else ()):
            w = hf[f"layers.{i}.{theirs}.weight"] = sd[f"trf_blocks.{i}.{mine}.weight"]
            if kind == "qwen2_moe" and mine in _QKV:
                hf[f"layers.{i}.{theirs}.bias"] = sd.get(f"trf_blocks.{i}.{mine}.bias", w.new_zeros(w.shape[0]))
        if not cfg.is_moe_layer(i):  # a dense layer: mlp_only_layers in hf_config
            for w in ("w_gate", "w_up", "w_down"):
                hf[f"layers.{i}.mlp.{_DENSE[w]}.weight"] = sd[f"trf_blocks.{i}.ff.{w}.weight"]
            continue
        for mine, theirs in _SHARED_EXPERT if kind == "qwen2_moe" else ():
            hf[f"layers.{i}.{block}.{theirs}.weight"] = sd[f"trf_blocks.{i}.ff.{mine}.weight"]
        hf[f"layers.{i}.{block}.gate.weight"] = sd[f"trf_blocks.{i}.ff.router.weight"]
        for ours, theirs in (("w_gate", gate), ("w_up", up), ("w_down", down)):
            for e, w in enumerate(sd[f"trf_blocks.{i}.ff.{ours}"]):
                hf[f"layers.{i}.{block}.experts.{e}.{theirs}.weight"] = w
    out = {"model." + k: v for k, v in hf.items()}
    if not cfg.tie_weights:
        out["lm_head.weight"] = sd["out_head.weight"][:V]
    return {k: v.to("cpu", memory_format=torch.contiguous_format, copy=True) for k, v in out.items()}


def hf_config(cfg: GPTConfig, eos_token_id: int | None = None) -> dict:
    """MixtralConfig, Qwen3MoeConfig, OlmoeConfig or Qwen2MoeConfig fields (config.json) for this model; what
    _check_hf_config reads back."""
    kind = hf_family(cfg)
    d = {"model_type": kind, "architectures": [FAMILIES[kind]], "vocab_size": cfg.vocab_size,
         "max_position_embeddings": cfg.context_length, "hidden_size": cfg.n_embd,
         "intermediate_size": cfg.ff_hidden, "num_hidden_layers": cfg.n_layer,
         "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
         "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps, "num_experts_per_tok": cfg.experts_per_token,
         "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                                                           **(cfg.rope_scaling or {})},
         "rope_scaling": cfg.rope_scaling, "attention_dropout": 0.0, "tie_word_embeddings": cfg.tie_weights,
         "router_aux_loss_coef": cfg.moe_aux_loss, "output_router_logits": False,
         "bos_token_id": eos_token_id, "eos_token_id": eos_token_id, "pad_token_id": None}
    window = cfg.attention_window or None
    # the dense layers (Qwen2-MoE's and Qwen3-MoE's only: refuse_not_moe) said one by one, decoder_sparse_step 1;
    # their width is intermediate_size, the experts' moe_intermediate_size
    only = [i for i in range(cfg.n_layer) if not cfg.is_moe_layer(i)]
    if only:
        d["intermediate_size"] = cfg.moe_dense_hidden
    if kind == "mixtral":
        d.update(num_local_experts=cfg.n_experts, sliding_window=window, router_jitter_noise=0.0)
    elif kind == "qwen3_moe":
        d.update(num_experts=cfg.n_experts, moe_intermediate_size=cfg.ff_hidden, norm_topk_prob=cfg.moe_norm_topk,
                 decoder_sparse_step=1, mlp_only_layers=only, use_sliding_window=bool(window), sliding_window=window,
                 attention_bias=False)
    elif kind == "qwen2_moe":
        # the window's layers said one by one (layer_types): transformers' guess from max_window_layers differs
        # between its versions
        types = ["sliding_attention" if window and i in cfg.local_layers else "full_attention"
                 for i in range(cfg.n_layer)]
        d.update(num_experts=cfg.n_experts, moe_intermediate_size=cfg.ff_hidden, norm_topk_prob=cfg.moe_norm_topk,
                 shared_expert_intermediate_size=cfg.moe_shared_hidden, decoder_sparse_step=1, mlp_only_layers=only,
                 qkv_bias=True, use_sliding_window=bool(window), sliding_window=window, layer_types=types,
                 max_window_layers=cfg.n_layer)
    else:
        d.update(num_experts=cfg.n_experts, norm_topk_prob=cfg.moe_norm_topk, clip_qkv=None, attention_bias=False)
    return d


def export_moe(model: GPTModel, out_dir, eos_token_id: int | None = None, overwrite: bool = False) -> list:
    """Write model as a Hugging Face Mixtral, Qwen3-MoE, OLMoE or Qwen2-MoE folder (hf_family): model.safetensors and
    config.json, which transformers.AutoModelForCausalLM.from_pretrained(out_dir) and load_checkpoint both read.
    Returns the paths written; refuses to replace them unless overwrite."""
    refuse_not_moe(model, f"{'an' if hf_family(model.config) == 'olmoe' else 'a'} {family_name(model.config)} folder")
    return write_hf_folder(out_dir, lambda: _hf_tensors(model), hf_config(model.config, eos_token_id), overwrite)
