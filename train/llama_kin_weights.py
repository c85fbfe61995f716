"""ERNIE 4.5, Seed-OSS and Helium weights (Hugging Face's Ernie4_5ForCausalLM, SeedOssForCausalLM and
HeliumForCausalLM: Baidu's ERNIE-4.5-0.3B, ByteDance's Seed-OSS-36B, Kyutai's Helium-1) into GPTModel.

Each is a Llama (RMSNorm, SwiGLU, RoPE, grouped-query attention, Llama's tensor names) that differs in a way
GPTConfig already says, so they load as Llama-shaped models; `export` writes them back as the Llama or Qwen2 folder
of the same function (transformers has no field that tells these families from those):
- ERNIE 4.5: RoPE in interleaved pairs (2i, 2i + 1), GLM's rotate_half, where ours pairs (i, i + D/2): each head's
  rows of q_proj and k_proj (and their biases) reordered, even dimensions first, as for Cohere and GPT-J (q.k is
  blind to the order of a head's dimensions); use_bias gives every projection a bias (GPTConfig.bias). Its RoPE
  rotates in fp32 whatever the dtype: a rounding apart in float64. RoPE base 500000 when none is said.
- Helium: RoPE in interleaved pairs too (reordered alike); attention_bias gives q, k and v biases only (o_proj has
  none: qkv_bias_only), mlp_bias the MLP's. RoPE base 100000 when none is said.
- Seed-OSS: attention_bias gives q, k and v biases (qkv_bias_only, its default), attention_out_bias o_proj's,
  mlp_bias the MLP's; a head_dim of its own (attention_head_dim). Its dropouts are training's only.
What this model does not compute is refused by name: biases on some projections only where GPTConfig cannot say
them (o_proj's without the MLP's, the MLP's without o_proj's), another activation, a scaled RoPE other than the
Llama reader's, a partial rotary factor, a sliding window (none of the three has one).
"""
from pathlib import Path

from tritongpt.errors import UserError, read_json_object
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.gpt2_weights import (_read_tensors, config_flag, config_json_gptconfig, model_with_tensors,
                                          weights_file)
from tritongpt.train.gptj_weights import half_split_order
from tritongpt.train.llama_weights import LLAMA_KEYS, _our_tensors as llama_tensors, _rope_theta, hf_shapes, \
    shape_fields

FAMILIES = {"ernie4_5": "Ernie4_5ForCausalLM", "seed_oss": "SeedOssForCausalLM", "helium": "HeliumForCausalLM"}
NAMES = {"ernie4_5": "ERNIE 4.5", "seed_oss": "Seed-OSS", "helium": "Helium"}
# each config's RoPE base when it says none (Ernie4_5Config's and HeliumConfig's default_theta), and its rms_norm_eps
_THETA = {"ernie4_5": 500_000.0, "seed_oss": 10_000.0, "helium": 100_000.0}
_EPS = {"ernie4_5": 1e-5, "seed_oss": 1e-6, "helium": 1e-8}
_INTERLEAVED = ("ernie4_5", "helium")  # RoPE pairs (2i, 2i + 1): q's and k's rows reordered on the way in


def is_kin_file(path) -> bool:
    """A Hugging Face ERNIE 4.5, Seed-OSS or Helium model.safetensors (or shard index): its config.json says so."""
    cfg_json = Path(path).parent / "config.json"
    return cfg_json.is_file() and read_json_object(cfg_json).get("model_type") in FAMILIES


def _biases(d: dict, kind: str, cfg_json) -> dict:
    """GPTConfig's bias and qkv_bias_only for the family's bias flags; a set of biased projections GPTConfig cannot
    say (all, q/k/v only, or none) refused naming the flags."""
    if kind == "ernie4_5":  # use_bias: every projection, q/k/v/o and the MLP's, or none
        return dict(bias=config_flag(d, "use_bias", False, cfg_json, kind), qkv_bias_only=False)
    # Helium's o_proj never has a bias (HeliumAttention); Seed-OSS's has attention_out_bias's
    flags = {"attention_bias": config_flag(d, "attention_bias", kind == "seed_oss", cfg_json, kind),
             "mlp_bias": config_flag(d, "mlp_bias", False, cfg_json, kind)}
    if kind == "seed_oss":
        flags["attention_out_bias"] = config_flag(d, "attention_out_bias", False, cfg_json, kind)
    qkv, rest = flags["attention_bias"], [v for k, v in flags.items() if k != "attention_bias"]
    if all(rest) and qkv and kind == "seed_oss":
        return dict(bias=True, qkv_bias_only=False)
    if not any(rest):
        return dict(bias=False, qkv_bias_only=qkv)
    said = ", ".join(f"{k} {str(v).lower()}" for k, v in flags.items())
    raise UserError(f"{cfg_json} has {said}; this model's projections have biases on all of them, on q, k and v "
                    f"only, or none ({NAMES[kind]}'s o_proj " + ("has none" if kind == "helium" else
                                                                 "has attention_out_bias's") + ")")


def _check_hf_config(cfg_json: Path, sd: dict) -> GPTConfig:
    """The GPTConfig of an ERNIE 4.5, Seed-OSS or Helium config.json, checked against the tensors beside it; what
    this model does not compute refused by name."""
    d = read_json_object(cfg_json)
    kind = d.get("model_type")
    if kind not in FAMILIES:
        raise UserError(f"{cfg_json} says model_type {kind!r}; this reader's are {', '.join(FAMILIES)}")
    family = NAMES[kind]
    shapes = hf_shapes(d, sd, cfg_json, family)
    if d.get("hidden_act", "silu") != "silu":
        raise UserError(f"{cfg_json} has hidden_act {d['hidden_act']!r}; this model's SwiGLU computes 'silu' only")
    if d.get("sliding_window") is not None:  # none of the three reads one: a file that says one means another model
        raise UserError(f"{cfg_json} has sliding_window {d['sliding_window']!r}; {family} attends to the whole "
                        "context")
    biases = _biases(d, kind, cfg_json)
    said = biases["bias"] or biases["qkv_bias_only"]
    if said != ("layers.0.self_attn.q_proj.bias" in sd):  # transformers would drop (or zero) them unsaid
        raise UserError(f"{cfg_json} says {'' if said else 'no '}q/k/v biases, but the weights "
                        f"{'lack' if said else 'have'} q_proj's bias")
    theta, scaling = _rope_theta(d, cfg_json, _THETA[kind])  # (a partial_rotary_factor is refused there)
    return config_json_gptconfig(
        cfg_json, LLAMA_KEYS, **shape_fields(shapes, sd, d, cfg_json), **biases,
        context_length=d.get("max_position_embeddings", 2048), position_encoding="rope", rope_theta=theta,
        rope_scaling=scaling, norm="rmsnorm", norm_eps=d.get("rms_norm_eps", _EPS[kind]), mlp="swiglu")


def _our_tensors(sd: dict, cfg: GPTConfig, kind: str) -> dict:
    """The family's tensors under our names (Llama's; KeyError: a tensor the file lacks), q's and k's rows (and
    biases) reordered per head from interleaved RoPE pairs to ours for ERNIE 4.5 and Helium."""
    ours = llama_tensors(sd, cfg)
    if kind in _INTERLEAVED:
        D = cfg.head_dim
        order = half_split_order(D, D)
        for i in range(cfg.n_layer):
            for name in (f"trf_blocks.{i}.att.{m}.{p}" for m in ("W_query", "W_key") for p in ("weight", "bias")):
                if name in ours:
                    w = ours[name]
                    ours[name] = w.reshape(-1, D, *w.shape[1:])[:, order].reshape(w.shape)
    return ours


def load_kin_safetensors(path) -> GPTModel:
    """GPTModel with the weights of a Hugging Face ERNIE 4.5, Seed-OSS or Helium model.safetensors (or shard index)
    and its config.json beside it."""
    path = weights_file(path, "ERNIE 4.5, Seed-OSS or Helium")
    cfg_json = path.parent / "config.json"
    kind = read_json_object(cfg_json).get("model_type")
    sd = _read_tensors(path, prefix="model.")
    cfg = _check_hf_config(cfg_json, sd)
    return model_with_tensors(cfg, lambda: _our_tensors(sd, cfg, kind), path)

