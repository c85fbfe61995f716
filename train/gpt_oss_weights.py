"""GPT-OSS (openai/gpt-oss-20b, gpt-oss-120b) weights into GPTModel, and back out.

A Llama-shaped mixture of experts (RMSNorm, RoPE half-split, GQA, untied head) with what the other MoE families
have not:
- attention: q/k/v/o biases (attention_bias, GPTConfig.bias) and a learned sink logit per head, self_attn.sinks
  (GPTConfig.attention_sinks); layer_types alternate sliding_attention (sliding_window, 128) and full_attention;
  RoPE scaled by YaRN with truncate false (the correction range's bounds not rounded).
- MLP: a router with a bias (mlp.router.weight / bias) taking the top k logits, softmaxed over those k (the softmax
  over all renormalized over the k: moe_norm_topk), and experts with biases (moe_bias) whose activation is a
  clamped SwiGLU (moe_activation "gpt_oss": swiglu_limit, swiglu_alpha). transformers keeps the experts merged,
  gate_up_proj [E, C, 2H] (C first: the product is x @ W, not Mixtral's W x) whose columns INTERLEAVE gate and up
  (gate the even ones, up the odd), gate_up_proj_bias [E, 2H] likewise, down_proj [E, H, C] and down_proj_bias
  [E, C]; ours are w_gate, w_up [E, H, C], w_down [E, C, H] and b_gate, b_up, b_down.
The Hub's own folders hold the experts in MXFP4 (quantization_config quant_method "mxfp4": gate_up_proj_blocks
uint8 [E, 2H, C / 32, 16] and gate_up_proj_scales, down_proj_blocks / _scales; attention, router, embeddings and head
float, its modules_to_not_convert): kept MXFP4 by default (model/layers.py MXFP4MoEFeedForward, the blocks and scales
as the file has them: gpt-oss-20b's experts ~13 GB, not bf16's ~40; kernels/moe.py moe_mlp_mxfp4 on the Triton path;
frozen, dx-only backward), as load_checkpoint gives them to the commands that run a model (quantized_ok); with
quantized False (load_checkpoint's trainers, export, merge) read as the float model of their dequantized experts
(hf_quant.mxfp4_experts: bfloat16, which holds every MXFP4 value exactly, in transformers' [E, C, 2H] layout, then
split as a float folder's are), said on stderr. Export of a kept model writes the blocks back unchanged. Any other
quantization is refused by name; the BF16 copies
(and transformers' save_pretrained) are read as they are. router_aux_loss_coef is read as 0, as the other MoE
families (transformers adds it only with output_router_logits, false in the Hub's folders), and written as
GPTConfig.moe_aux_loss.
"""
from pathlib import Path

import torch

from tritongpt.errors import UserError, note, read_json_object
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.model.layers import MXFP4MoEFeedForward
from tritongpt.train.gpt2_weights import (_FLOAT_DTYPES, _read_tensors, config_flag, config_json_gptconfig,
                                          hf_quantization, model_with_tensors, refuse_quantized, tensor_names,
                                          weights_file, write_hf_folder)
from tritongpt.train.hf_quant import check_mxfp4_pair, folder_dequantized, folder_quantization, mxfp4_bases
from tritongpt.train.llama_weights import LLAMA_KEYS, _rope_theta, hf_shapes, shape_fields

_ATT = (("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm"), ("att.W_query", "self_attn.q_proj"),
        ("att.W_key", "self_attn.k_proj"), ("att.W_value", "self_attn.v_proj"), ("att.out_proj", "self_attn.o_proj"))
_BIASED = ("att.W_query", "att.W_key", "att.W_value", "att.out_proj")
_EXPERTS = "layers.{}.mlp.experts."
# an MXFP4 folder's modules_to_not_convert, as openai/gpt-oss-20b's config.json says them: all but the experts
MXFP4_FLOAT_MODULES = ("model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head")


def is_gpt_oss_file(path) -> bool:
    """A Hugging Face GPT-OSS model.safetensors: its config.json says model_type gpt_oss, or without one its
    tensors have GPT-OSS's router (mlp.router)."""
    cfg_json = Path(path).parent / "config.json"
    if cfg_json.is_file() and "model_type" in (d := read_json_object(cfg_json)):
        return d["model_type"] == "gpt_oss"
    return any(".mlp.router.weight" in k for k in tensor_names(path))


def _experts(sd: dict, i: int, path) -> tuple:
    """Layer i's (w_gate, w_up [E, H, C], w_down [E, C, H], b_gate, b_up [E, H], b_down [E, C]) from transformers'
    merged tensors: gate_up_proj [E, C, 2H] with gate and up interleaved (columns 0, 2, 4... and 1, 3, 5...)."""
    p = _EXPERTS.format(i)
    if p + "gate_up_proj_blocks" in sd or p + "down_proj_blocks" in sd:
        # (an MXFP4 folder's are dequantized before this: these are in a folder whose config.json lost its
        # quantization_config, which alone says how they are read)
        raise UserError(f"{path}: {p}gate_up_proj_blocks / down_proj_blocks are GPT-OSS's MXFP4 form of the experts, "
                        "but config.json has no quantization_config (quant_method 'mxfp4') saying so: restore it "
                        "from the model's Hub folder")
    gate_up, bias = sd[p + "gate_up_proj"], sd[p + "gate_up_proj_bias"]
    down, down_bias = sd[p + "down_proj"], sd[p + "down_proj_bias"]
    if gate_up.dim() != 3 or gate_up.shape[2] % 2 or bias.shape != (gate_up.shape[0], gate_up.shape[2]):
        raise UserError(f"{path}: {p}gate_up_proj has shape {tuple(gate_up.shape)} and its bias "
                        f"{tuple(bias.shape)}, not [experts, hidden, 2 width] and [experts, 2 width]")
    E, C, H2 = gate_up.shape
    if down.shape != (E, H2 // 2, C) or down_bias.shape != (E, C):
        raise UserError(f"{path}: {p}down_proj has shape {tuple(down.shape)} and its bias {tuple(down_bias.shape)}, "
                        f"not {(E, H2 // 2, C)} and {(E, C)} beside gate_up_proj {tuple(gate_up.shape)}")
    # [E, C, 2H] -> ours [E, H, C], the interleaved columns apart
    return (gate_up[..., 0::2].transpose(1, 2), gate_up[..., 1::2].transpose(1, 2), down.transpose(1, 2),
            bias[:, 0::2], bias[:, 1::2], down_bias)


def _refuse(d: dict, cfg_json) -> None:
    """What a GPT-OSS config.json asks that this model does not compute, by name."""
    if d.get("hidden_act", "silu") != "silu":  # GptOssExperts ignores it (its activation is fixed): said anyway
        raise UserError(f"{cfg_json} has hidden_act {d['hidden_act']!r}; GPT-OSS's experts compute their clamped "
                        "SwiGLU ('silu') only")
    if not config_flag(d, "attention_bias", True, cfg_json, "gpt_oss"):
        raise UserError(f"{cfg_json} has attention_bias false; this model reads GPT-OSS with its q/k/v/o biases only")


def _window(d: dict, n_layer: int, cfg_json) -> tuple:
    """(attention_window, window_layers): the layers layer_types names "sliding_attention" (GptOssConfig's default
    without one: the even layers) slide a window of sliding_window (128 unless said)."""
    types = d.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layer)]
    if len(types) != n_layer or any(t not in ("sliding_attention", "full_attention") for t in types):
        raise UserError(f"{cfg_json} has layer_types {types!r}: one 'sliding_attention' or 'full_attention' for each "
                        f"of its {n_layer} layers")
    local = [i for i, t in enumerate(types) if t == "sliding_attention"]
    window = d.get("sliding_window", 128)
    if not local:
        return 0, "all"
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise UserError(f"{cfg_json} has sliding_window {window!r} for its sliding_attention layers; it must be a "
                        "positive integer")
    return window, "all" if len(local) == n_layer else ",".join(map(str, local))


def _check_hf_config(cfg_json: Path, sd: dict) -> GPTConfig:
    """The GPTConfig of a GPT-OSS config.json, checked against the tensors beside it."""
    d = read_json_object(cfg_json)
    _refuse(d, cfg_json)
    router = sd.get("layers.0.mlp.router.weight")
    if router is None:
        raise UserError(f"{cfg_json.parent}: not a GPT-OSS model, missing tensor 'layers.0.mlp.router.weight' "
                        "(the router)")
    n_experts = router.shape[0]
    for key in ("num_local_experts", "num_experts"):
        if key in d and d[key] != n_experts:
            raise UserError(f"{cfg_json} says {key} {d[key]!r}, but the router scores {n_experts} experts")
    try:
        gate0 = _experts(sd, 0, cfg_json.parent)[0][0]
    except KeyError as e:
        raise UserError(f"{cfg_json.parent}: not a GPT-OSS model, missing tensor {e.args[0]!r}") from None
    shapes = hf_shapes(d, {**sd, "layers.0.mlp.gate_proj.weight": gate0}, cfg_json, "GPT-OSS")
    window, layers = _window(d, shapes[3], cfg_json)
    # GptOssConfig's base when none is said is 150000; its rope_parameters default is YaRN's (factor 32 over 4096,
    # truncate false): a config.json naming neither is that
    if not (d.get("rope_parameters") or d.get("rope_scaling")):
        d = {**d, "rope_parameters": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                      "truncate": False, "original_max_position_embeddings": 4096,
                                      "rope_theta": d.get("rope_theta", 150000.0)}}
    theta, scaling = _rope_theta(d, cfg_json, 150000.0)
    return config_json_gptconfig(
        cfg_json, {**LLAMA_KEYS, "experts_per_token": "num_experts_per_tok", "swiglu_limit": "swiglu_limit",
                   "swiglu_alpha": "swiglu_alpha"}, **shape_fields(shapes, sd, d, cfg_json),
        context_length=d.get("max_position_embeddings", 131072), bias=True, attention_window=window,
        window_layers=layers, position_encoding="rope", rope_theta=theta, rope_scaling=scaling, norm="rmsnorm",
        norm_eps=d.get("rms_norm_eps", 1e-5), mlp="swiglu", attention_sinks=True, n_experts=n_experts,
        experts_per_token=d.get("num_experts_per_tok", 4), moe_norm_topk=True, moe_bias=True,
        moe_activation="gpt_oss", swiglu_limit=d.get("swiglu_limit", 7.0), swiglu_alpha=d.get("swiglu_alpha", 1.702))


def _our_tensors(sd: dict, cfg: GPTConfig, path) -> dict:
    """GPT-OSS tensors under our parameter names (KeyError: a tensor the file lacks)."""
    ours = {"tok_emb.weight": sd["embed_tokens.weight"], "final_norm.weight": sd["norm.weight"]}
    if not cfg.tie_weights:
        ours["out_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        for mine, theirs in _ATT:
            ours[f"trf_blocks.{i}.{mine}.weight"] = sd[f"layers.{i}.{theirs}.weight"]
            if mine in _BIASED:
                ours[f"trf_blocks.{i}.{mine}.bias"] = sd[f"layers.{i}.{theirs}.bias"]
        ours[f"trf_blocks.{i}.att.sinks"] = sd[f"layers.{i}.self_attn.sinks"]
        ours[f"trf_blocks.{i}.ff.router.weight"] = sd[f"layers.{i}.mlp.router.weight"]
        ours[f"trf_blocks.{i}.ff.router.bias"] = sd[f"layers.{i}.mlp.router.bias"]
        for name, t in zip(("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down"), _experts(sd, i, path)):
            ours[f"trf_blocks.{i}.ff.{name}"] = t
    return ours


def load_gpt_oss_safetensors(path, quantized: bool = True) -> GPTModel:
    """GPTModel with the weights of a Hugging Face GPT-OSS model.safetensors (or shard index) and its config.json
    beside it. An MXFP4 folder's experts are kept MXFP4 (MXFP4MoEFeedForward, both paths run it) unless quantized is
    False: then they are dequantized into an ordinary float model (load_gguf's convention: load_checkpoint passes
    its quantized_ok, so the commands that run a model keep them and the trainers, export and merge get floats)."""
    path = weights_file(path, "GPT-OSS")
    cfg_json = path.parent / "config.json"
    if not cfg_json.is_file():
        raise UserError(f"{path} looks like a GPT-OSS model, whose heads, experts per token, window layers and RoPE "
                        "scaling are in its config.json: put that file beside it")
    # the Hub's MXFP4 folders: the experts dequantized to float (hf_quant.py), the model then read as a float
    # folder's; any other quantization refused by name
    dequant = None
    if (q := hf_quantization(cfg_json)) is not None:
        if q.get("quant_method") != "mxfp4":
            refuse_quantized(q, "GPT-OSS is read from float weights or its MXFP4 experts only")
        dequant = folder_quantization(cfg_json)[1]  # (mxfp4_spec: a model_type other than gpt_oss refused)
    sd = _read_tensors(path, prefix="model.", quantization_read=dequant is not None)
    if dequant is not None and not quantized:
        # each layer's experts' *_blocks / _scales -> gate_up_proj [E, C, 2H] and down_proj [E, H, C] bfloat16,
        # the layout of a float folder's, which _experts splits as it does those
        sd = folder_dequantized(sd, dequant, path, prefix="model.")
    packed = {}
    if dequant is not None and quantized:
        for b in mxfp4_bases(sd, dequant, path, prefix="model."):
            blocks, scales = packed[b] = sd.pop(b + "_blocks"), sd.pop(b + "_scales")
            check_mxfp4_pair(blocks, scales, f"{path}: {b}")
            # a stand-in of the dequantized tensor's shape ([E, G * 32, R]: no memory) for the config's checks
            E, R, G = scales.shape
            sd[b] = torch.empty((E, G * 32, R), device="meta")
    cfg = _check_hf_config(cfg_json, sd)
    if not packed:
        return model_with_tensors(cfg, lambda: _our_tensors(sd, cfg, path), path)
    return _kept_model(cfg, sd, packed, path)


def _kept_model(cfg: GPTConfig, sd: dict, packed: dict, path) -> GPTModel:
    """The model of an MXFP4 folder with every layer's experts MXFP4MoEFeedForward, their blocks and scales as the
    file has them (the float experts never made); the rest as a float folder's."""
    for i in range(cfg.n_layer):
        p = _EXPERTS.format(i)
        if p + "gate_up_proj" not in packed or p + "down_proj" not in packed:
            raise UserError(f"{path}: {p}gate_up_proj and down_proj are not both MXFP4 beside other layers' MXFP4 "
                            "experts: this reader keeps every layer's experts MXFP4 or none; load it dequantized "
                            "(load_gpt_oss_safetensors(path, quantized=False))")

    def build(cfg):
        with torch.device("meta"):
            model = GPTModel(cfg)
            for block in model.trf_blocks:
                block.ff = MXFP4MoEFeedForward(cfg.n_embd, cfg.ff_hidden, cfg.n_experts, cfg.experts_per_token,
                                               cfg.moe_norm_topk, cfg.dropout, cfg.swiglu_limit, cfg.swiglu_alpha)
        return model.to_empty(device="cpu").eval()

    built = {}

    def mapping():
        ours = _our_tensors(sd, cfg, path)
        for i, block in enumerate(built["model"].trf_blocks):
            mine, theirs = f"trf_blocks.{i}.ff.", _EXPERTS.format(i)
            for name in ("w_gate", "w_up", "w_down"):
                ours.pop(mine + name)  # (the meta stand-ins')
            with torch.no_grad():
                for name in ("b_gate", "b_up", "b_down"):  # float, frozen buffers beside the blocks
                    value, buf = ours.pop(mine + name), getattr(block.ff, name)
                    if value.dtype not in _FLOAT_DTYPES:
                        raise UserError(f"{path}: tensor for {mine}{name} is {str(value.dtype).removeprefix('torch.')}, "
                                        "not a float bias")
                    buf.copy_(value)
            block.ff.set_packed(*packed[theirs + "gate_up_proj"], *packed[theirs + "down_proj"],
                                what=f"{path}: {theirs}")
        return ours

    def build_kept(cfg):
        built["model"] = build(cfg)
        return built["model"]

    model = model_with_tensors(cfg, mapping, path, build=build_kept)
    note(f"{path}: its {len(packed)} MXFP4 expert weights are kept MXFP4 (MXFP4MoEFeedForward: "
         f"{sum(b.ff.packed_bytes() for b in model.trf_blocks):,} bytes, bf16's would be ~3.8 times that); "
         "frozen: training reads the folder dequantized")
    return model


# -- export ------------------------------------------------------------------------------------------------
def is_gpt_oss_shaped(cfg: GPTConfig) -> bool:
    """A model only a GPT-OSS folder can say: experts with GPT-OSS's biases or clamped activation."""
    return bool(cfg.n_experts) and (cfg.moe_bias or cfg.moe_activation == "gpt_oss")


def refuse_not_gpt_oss(model: GPTModel, what: str) -> None:
    """What a GPT-OSS folder cannot say, by name: GptOssForCausalLM is one fixed design (biased q/k/v/o and experts,
    sinks, RMSNorm, RoPE, the clamped SwiGLU, untied head), so every field is checked against it."""
    cfg = model.config
    if not cfg.n_experts:
        raise UserError(f"this model has a dense MLP (n_experts 0): it cannot be exported as {what}")
    fixed = (("norm", "rmsnorm"), ("mlp", "swiglu"), ("position_encoding", "rope"), ("bias", True),
             ("qkv_bias", True), ("qkv_bias_only", False), ("attention_sinks", True), ("moe_bias", True),
             ("moe_activation", "gpt_oss"), ("moe_norm_topk", True), ("moe_shared_hidden", 0), ("moe_layers", "all"),
             ("tie_weights", False),
             ("qk_norm", False), ("head_bias", False), ("pre_norms", True), ("post_norms", False),
             ("parallel_residual", False), ("shared_norm", False), ("embed_norm", False), ("scale_attention", True),
             ("scale_embeddings", False), ("attention_scale_width", 0), ("attention_multiplier", 0.0),
             ("embedding_multiplier", 1.0), ("residual_multiplier", 1.0), ("logit_scale", 1.0),
             ("logit_softcap", 0.0), ("attn_softcap", 0.0), ("rotary_dim", 0), ("rope_local_theta", 0.0),
             ("nope_layers", ""))
    for name, want in fixed:
        have = getattr(cfg, name, want)
        if have != want and not (name.endswith("softcap") and not have):
            raise UserError(f"this model has {name} {have!r}, where GPT-OSS's is {want!r}: it cannot be exported as "
                            f"{what}")


def hf_config(cfg: GPTConfig, eos_token_id: int | None = None) -> dict:
    """GptOssConfig fields (config.json) for this model; what _check_hf_config reads back."""
    local = set(cfg.local_layers) if cfg.attention_window else set()
    return {"model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"], "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.context_length, "hidden_size": cfg.n_embd,
            "intermediate_size": cfg.ff_hidden, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
            "rms_norm_eps": cfg.norm_eps, "num_local_experts": cfg.n_experts,
            "num_experts_per_tok": cfg.experts_per_token, "swiglu_limit": cfg.swiglu_limit,
            "swiglu_alpha": cfg.swiglu_alpha, "attention_bias": True, "attention_dropout": 0.0,
            # GptOssModel builds its sliding mask whatever layer_types say: a null window fails there, so a model
            # without one writes GptOssConfig's default, which no full_attention layer reads
            "sliding_window": cfg.attention_window or 128,
            # the window's layers said one by one: GptOssConfig's default (the even ones) need not be this model's
            "layer_types": ["sliding_attention" if i in local else "full_attention" for i in range(cfg.n_layer)],
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})},
            "tie_word_embeddings": False, "router_aux_loss_coef": cfg.moe_aux_loss, "output_router_logits": False,
            "bos_token_id": eos_token_id, "eos_token_id": eos_token_id, "pad_token_id": None}


def _hf_tensors(model: GPTModel) -> dict:
    """Our parameters under GPT-OSS's names, the experts merged and gate/up interleaved again; the padding rows
    dropped."""
    cfg = model.config
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    V = cfg.vocab_size
    hf = {"embed_tokens.weight": sd["tok_emb.weight"][:V], "norm.weight": sd["final_norm.weight"]}
    for i in range(cfg.n_layer):
        for mine, theirs in _ATT:
            hf[f"layers.{i}.{theirs}.weight"] = sd[f"trf_blocks.{i}.{mine}.weight"]
            if mine in _BIASED:
                hf[f"layers.{i}.{theirs}.bias"] = sd[f"trf_blocks.{i}.{mine}.bias"]
        hf[f"layers.{i}.self_attn.sinks"] = sd[f"trf_blocks.{i}.att.sinks"]
        hf[f"layers.{i}.mlp.router.weight"] = sd[f"trf_blocks.{i}.ff.router.weight"]
        hf[f"layers.{i}.mlp.router.bias"] = sd[f"trf_blocks.{i}.ff.router.bias"]
        p = _EXPERTS.format(i)
        if isinstance(model.trf_blocks[i].ff, MXFP4MoEFeedForward):
            # kept MXFP4: the blocks and scales written as they are (lossless), in transformers' layout already
            ff = {n: sd[f"trf_blocks.{i}.ff.{n}"] for n in ("b_gate", "b_up", "b_down")}
            for name in ("gate_up", "down"):
                for part in ("blocks", "scales"):
                    hf[f"{p}{name}_proj_{part}"] = sd[f"trf_blocks.{i}.ff.{name}_{part}"]
        else:
            ff = {n: sd[f"trf_blocks.{i}.ff.{n}"] for n in ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down")}
            # [E, H, C] twice -> [E, C, 2H], column 2j gate j's and 2j + 1 up j's
            hf[p + "gate_up_proj"] = torch.stack((ff["w_gate"], ff["w_up"]), dim=2).flatten(1, 2).transpose(1, 2)
            hf[p + "down_proj"] = ff["w_down"].transpose(1, 2)
        hf[p + "gate_up_proj_bias"] = torch.stack((ff["b_gate"], ff["b_up"]), dim=2).flatten(1, 2)
        hf[p + "down_proj_bias"] = ff["b_down"]
    out = {"model." + k: v for k, v in hf.items()}
    out["lm_head.weight"] = sd["out_head.weight"][:V]
    return {k: v.to("cpu", memory_format=torch.contiguous_format, copy=True) for k, v in out.items()}


def export_gpt_oss(model: GPTModel, out_dir, eos_token_id: int | None = None, overwrite: bool = False) -> list:
    """Write model as a Hugging Face GPT-OSS folder: model.safetensors and config.json, which
    transformers.AutoModelForCausalLM.from_pretrained(out_dir) and load_checkpoint both read. Returns the paths
    written; refuses to replace them unless overwrite."""
    refuse_not_gpt_oss(model, "a GPT-OSS folder")
    d = hf_config(model.config, eos_token_id)
    kept = [isinstance(b.ff, MXFP4MoEFeedForward) for b in model.trf_blocks]
    if any(kept):
        if not all(kept):  # (one quantization_config says it for every layer's experts)
            raise UserError("this model has MXFP4 experts in some layers and float ones in others: a GPT-OSS "
                            "folder's quantization_config says one form for all")
        # the Hub's own: everything but the experts float
        d["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": list(MXFP4_FLOAT_MODULES)}
    return write_hf_folder(out_dir, lambda: _hf_tensors(model), d, overwrite)
