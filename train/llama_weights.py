"""Llama-architecture weights (Hugging Face's LlamaForCausalLM layout, which Mistral, Qwen2 and
Qwen3 share) into GPTModel, and back out.

A Llama is a GPTModel with norm "rmsnorm", mlp "swiglu", position_encoding "rope", no biases
and, often, fewer key/value heads (n_kv_head): every piece is already a GPTConfig field, so the
tensors only change names. Hugging Face's q_proj and k_proj rows are in rotate_half's order
(dimension i pairs with i + head_dim / 2), which is our apply_rotary's and kernels/rope.py's, so
no row is permuted. Four relatives differ from it in a field or two, and are read and written too:
- Mistral: a sliding window (config.json's sliding_window, in every layer; transformers' default
  4096 when the key is absent) is our local attention: attention_window W, window_layers "all".
  Both let query i see keys i - W + 1 .. i.
- Qwen2 (and Qwen2.5): biases on q_proj, k_proj and v_proj only (qkv_bias_only). Its sliding
  window (use_sliding_window, in the layers layer_types names, or from layer max_window_layers on)
  is our window_layers, whichever layers those are; no published Qwen2 uses one.
- Qwen3: no q/k/v biases, but each head's query and key RMSNorm-ed before RoPE (qk_norm), and a
  head width of its own (attention_head_dim: Qwen3-0.6B's 16 heads of 128 over a width of 1024);
  a Llama, Mistral or Qwen2 config.json's head_dim is read too.
- Ministral (Ministral-8B-Instruct-2410): Mistral with its sliding window in the layers layer_types names
  "sliding_attention" (without one, every layer when sliding_window says a width), the others global: our
  window_layers as a list. export writes a Mistral-shaped model whose window is in some layers only as one.
- SmolLM3: no RoPE in every fourth layer (no_rope_layers, 0 where q and k are not rotated:
  nope_layers), its sliding window, when use_sliding_window, in the layers layer_types names (by
  default those NoPE layers).
RoPE scaled for a longer context (Llama 3.1's and 3.2's "llama3", or "linear") is GPTConfig.rope_scaling.
What a config.json asks that this model does not compute (another RoPE scaling, a head_dim the weights do
not have, an activation other than SiLU, biases on only some layers) is refused by name.

`export` writes a Llama, Mistral, Qwen2, Qwen3 or SmolLM3 folder (whichever the model is) that transformers
loads with the same logits, and load_checkpoint (gpt2_weights.py) reads one back. The tokenizers of
published Llamas (SentencePiece converted to a BPE, or a byte-level BPE with another
pre-tokenizer) are not ones tritongpt's BPE reproduces: the folder's tokenizer.json is read by
Hugging Face's tokenizers library instead (hf_tokenizer.py), so such a model takes text too; a folder
with SentencePiece's tokenizer.model and no tokenizer.json is first converted by transformers.
"""
import math
from pathlib import Path

import torch

from tritongpt._types import is_int
from tritongpt.errors import UserError, note, read_json_object
from tritongpt.model.config import ROPE_SCALING_KEYS, GPTConfig, check_rope_extras, check_rope_scaling
from tritongpt.model.gpt import GPTModel
from tritongpt.train.gpt2_weights import (_read_tensors, config_flag, config_json_gptconfig, model_with_tensors,
                                          refuse_gemma_touches, refuse_moe_touches, refuse_norm_touches,
                                          refuse_phi3_touches, tensor_names, tied_head, weights_file, write_hf_folder)

# each block's tensors: ours, then Hugging Face's (under "layers.{i}.")
_LAYER = (("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm"), ("att.W_query", "self_attn.q_proj"),
          ("att.W_key", "self_attn.k_proj"), ("att.W_value", "self_attn.v_proj"), ("att.out_proj", "self_attn.o_proj"),
          ("ff.w_gate", "mlp.gate_proj"), ("ff.w_up", "mlp.up_proj"), ("ff.w_down", "mlp.down_proj"))
_NORMS = ("norm1", "norm2")
_QKV = ("att.W_query", "att.W_key", "att.W_value")
# model_type -> the class transformers builds; all three share LlamaForCausalLM's tensor names
FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM", "smollm3": "SmolLM3ForCausalLM", "ministral": "MinistralForCausalLM"}
_NAMES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "smollm3": "SmolLM3",
          "ministral": "Ministral"}
_QK_NORMS = (("att.q_norm", "self_attn.q_norm"), ("att.k_norm", "self_attn.k_norm"))  # Qwen3's


def is_llama_file(path) -> bool:
    """A Hugging Face Llama, Mistral, Qwen2 or Qwen3 model.safetensors: its config.json says that
    model_type, or without one, its tensors have Llama's names (mlp.gate_proj)."""
    cfg_json = Path(path).parent / "config.json"
    if cfg_json.is_file() and "model_type" in (d := read_json_object(cfg_json)):
        return d["model_type"] in FAMILIES
    return any(".mlp.gate_proj." in k for k in tensor_names(path))


def checked_rope_base(theta, what: str, note: str = "") -> float:
    """RoPE's base as read from a config.json (what: "<file> has rope_theta"), a finite number > 0, as a float."""
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 0:
        raise UserError(f"{what} {theta!r}{note}; it must be a number > 0")
    return float(theta)


def rope_dict(d: dict, key: str, cfg_json) -> dict:
    """config.json's rope_parameters or rope_scaling (key): {} when absent or null. Anything but an object (a list, a
    string), or a rope_type that is no string, is refused by name: passed over, it would load as unscaled RoPE
    without a word (or be unhashable in a lookup of the known types)."""
    value = d.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{cfg_json} has {key} {value!r}; it must be an object (rope_type and its fields) or null")
    kind = value.get("rope_type", value.get("type", "default"))
    if not isinstance(kind, str):
        raise UserError(f"{cfg_json} has {key} of type {kind!r}; its rope_type must be a string")
    return value


def read_rope_parameters(d: dict, cfg_json) -> tuple:
    """(the RoPE object transformers 5 reads, its key): `rope_scaling or rope_parameters`, as its
    convert_rope_params_to_dict; {} when neither says. A rope_scaling object (what 4.x wrote) stands in for
    rope_parameters whole, and what rope_parameters says is not read then (nor by 4.x, which reads no
    rope_parameters)."""
    params = rope_dict(d, "rope_parameters", cfg_json)
    scaling = rope_dict(d, "rope_scaling", cfg_json)
    return (scaling, "rope_scaling") if scaling else (params, "rope_parameters")


def rope_field(d: dict, nested: dict, which: str, name: str, keys, default, cfg_json, family: str, unread=()):
    """One field (name: rope_theta, partial_rotary_factor) of RoPE as transformers 5 reads it: the RoPE object's
    (nested, from read_rope_parameters: which), else the first flat key of `keys` config.json has (GPT-NeoX's
    rotary_emb_base), else the default. A flat key that says another value than the one read is refused naming
    both: transformers 4.x reads the flat key where 5 reads the object's, and `unread` keys (the field's own name,
    flat: GPT-NeoX's rope_theta) neither reads; either way some reader would load another model."""
    flat = next((k for k in keys if k in d), None)  # (a null is read, and refused: transformers fails on it)
    value, said = ((nested[name], f"the {name} in {which}") if name in nested else
                   (d[flat], flat) if flat is not None else (default, "its default"))
    for k in (*keys, *(name,) * (name in unread)):
        if k in d and d[k] != value:
            raise UserError(f"{cfg_json} has {k} {d[k]!r}, but {family}'s RoPE reads {said}, {value!r}" + (
                f" ({family}'s config does not read {k})" if k in unread else
                f" (transformers 4.x reads {k}, 5 the {name} in {which})") + ": make them agree")
    return value


def _rope_theta(d: dict, cfg_json, theta_default: float = 10000.0, rope=None) -> tuple:
    """(RoPE's base, its scaling: GPTConfig.rope_scaling) as transformers 5 reads them: from
    `rope_scaling or rope_parameters` (read_rope_parameters; the Hub's Llama 3.1 says rope_scaling and a flat
    rope_theta, transformers 5 saves rope_parameters), the base from it, else the flat rope_theta, else
    theta_default; a flat rope_theta that disagrees with the object's refused (rope_field). Linear, Llama 3's and
    YaRN's scalings stretch the frequencies (layers.scaled_inv_freq; YaRN scales the scores too); the others
    (dynamic, longrope...) are other functions of the positions, refused by name. rope: (the RoPE object, what
    to call it) where the family's config reads another than read_rope_parameters' (Gemma 3's), or where the
    reader has read that one already (Cohere's)."""
    p, where = rope or read_rope_parameters(d, cfg_json)
    scaling = None
    kind = p.get("rope_type", p.get("type", "default"))
    if kind != "default":
        if kind not in ROPE_SCALING_KEYS:
            raise UserError(f"{cfg_json} has {where} of type {kind!r}; this model computes unscaled RoPE ('default'), "
                            f"or scaled by {' or '.join(map(repr, ROPE_SCALING_KEYS))}")
        check_rope_extras(p, kind, f"{cfg_json} has {where}")  # keys the filter below would drop
        spec = {"rope_type": kind, **{k: p[k] for k in ROPE_SCALING_KEYS[kind] if k in p}}
        if kind == "yarn" and "truncate" in p:  # GPT-OSS's false: the correction range's bounds not rounded
            spec["truncate"] = p["truncate"]
        if kind == "llama3" and "original_max_position_embeddings" not in spec:  # transformers' fallback
            spec["original_max_position_embeddings"] = d.get("max_position_embeddings")
        scaling = check_rope_scaling(spec, f"{cfg_json} has {where}")
    theta = checked_rope_base(rope_field(d, p, where, "rope_theta", ("rope_theta",), theta_default, cfg_json,
                                         "this model"), f"{cfg_json} has rope_theta")
    if d.get("partial_rotary_factor", 1.0) != 1.0:
        raise UserError(f"{cfg_json} has partial_rotary_factor {d['partial_rotary_factor']!r}; this model rotates "
                        "every dimension of a head (1.0) only")
    return float(theta), scaling


def full_attention_rope(d: dict, full: dict, cfg_json, theta_default: float) -> tuple:
    """_rope_theta of the full-attention layers where config.json says rope_parameters per layer type (full is its
    "full_attention"), as transformers 5's Gemma3TextConfig and Olmo3Config read it (one convert_rope_params_to_dict):
    a rope_scaling beside it merged into full_attention (its keys winning), the base from there, else the flat
    rope_theta, else theta_default; 4.x reads the flat keys only. A flat rope_theta that disagrees with the nested
    one is two models: refused by rope_field, naming where the base was read. -> (base, scaling, the merged
    full_attention: what the full-attention layers compute, to compare the sliding layers' with)."""
    old = rope_dict(d, "rope_scaling", cfg_json)
    where = ("rope_scaling" if old and ("rope_theta" in old or "rope_theta" not in full) else
             'rope_parameters["full_attention"]' + (" (rope_scaling merged in)" if old else ""))
    merged = {**full, **old}
    return (*_rope_theta(d, cfg_json, theta_default, rope=(merged, where)), merged)


def without_one_rope_object(d: dict, params: dict, cfg_json, config_name: str, theta_default: float) -> dict:
    """d without its rope_parameters, where a config.json of a model with one RoPE per layer type (OLMo 3's, Gemma
    3's) says one RoPE object and not one per layer type: their transformers 5 configs (config_name) look for
    "full_attention" and "sliding_attention" in it only, so the object's base and scaling are not read (the flat
    rope_theta or theta_default, and rope_scaling, are), nor by 4.x, which reads no rope_parameters. Read as they
    read it, said in a note when the object asks otherwise; beside a rope_scaling transformers fails (KeyError
    'full_attention'): refused, where merging the two loaded a model transformers never builds."""
    if rope_dict(d, "rope_scaling", cfg_json):
        raise UserError(f"{cfg_json} has one rope_parameters object (not one per layer type) and a rope_scaling; "
                        f"transformers' {config_name} fails on that pair: say rope_parameters as {{'full_attention': "
                        "{...}, 'sliding_attention': {...}}, or rope_scaling alone")
    flat = d.get("rope_theta", theta_default)
    if params.get("rope_type", params.get("type", "default")) != "default" or params.get("rope_theta", flat) != flat:
        note(f"{cfg_json} has one rope_parameters object ({params!r}), not one per layer type: transformers' "
             f"{config_name} does not read it, and neither does this model (RoPE base {flat!r}, unscaled, as "
             "transformers reads it)")
    return {k: v for k, v in d.items() if k != "rope_parameters"}


def partial_rotary_dim(factor, head_dim: int, where: str) -> int:
    """GPTConfig.rotary_dim of a partial rotary factor (Phi-4-mini's partial_rotary_factor 0.75, Pythia's
    rotary_pct 0.25): int(head_dim * factor) dimensions rotated, as transformers rounds; 0 for the whole head."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
        raise UserError(f"{where} partial rotary factor {factor!r}; it must be a number in (0, 1]")
    rotary = int(head_dim * factor)
    if rotary % 2 or rotary < 2:
        raise UserError(f"{where} partial rotary factor {factor!r}: {rotary} of head_dim {head_dim} rotated, where "
                        "RoPE needs an even number >= 2 of dimensions")
    return 0 if rotary == head_dim else rotary


def unscaled_partial_rope(d: dict, head_dim: int, cfg_json, family: str, theta_keys=("rope_theta",),
                          factor_keys=("partial_rotary_factor",), factor_default=0.25, unread=()) -> tuple:
    """(RoPE's base, GPTConfig.rotary_dim) of a family whose RoPE is unscaled and turns the first share of each
    head (GPT-NeoX's, StableLM's: factor_default 0.25 when config.json says none, as transformers reads both),
    as transformers 5 reads them: rope_parameters' rope_theta and partial_rotary_factor, else the flat keys
    (theta_keys, factor_keys: GPT-NeoX's rotary_emb_base and rotary_pct), else the defaults. A rope_scaling object
    stands in for rope_parameters, as transformers 5's `rope_scaling or rope_parameters`. A scaled RoPE is refused
    by name, and so is a flat key that says another value than the one read: transformers 4.x reads the flat key
    where 5 reads rope_parameters', and `unread` keys (GPT-NeoX's rope_theta, partial_rotary_factor) neither reads:
    either way some reader would load another model."""
    params = rope_dict(d, "rope_parameters", cfg_json)
    scaling = rope_dict(d, "rope_scaling", cfg_json)
    for where, p in (("rope_parameters", params), ("rope_scaling", scaling)):
        kind = p.get("rope_type", p.get("type", "default"))
        if kind != "default":
            raise UserError(f"{cfg_json} has {where} of type {kind!r}; this model reads {family}'s RoPE unscaled "
                            "('default') only")
    nested, which = read_rope_parameters(d, cfg_json)

    def read(name, keys, default):
        return rope_field(d, nested, which, name, keys, default, cfg_json, family, unread)

    where = f"{cfg_json} has a RoPE base"
    theta = checked_rope_base(read("rope_theta", theta_keys, 10000.0), where, f" ({' or '.join(theta_keys)})")
    factor = read("partial_rotary_factor", factor_keys, factor_default)
    return theta, partial_rotary_dim(factor, head_dim, f"{cfg_json} has a")


def _sliding_window(d: dict, kind: str, n_layer: int, cfg_json) -> tuple:
    """(attention_window, window_layers) of a config.json as transformers reads it: Llama has no
    window; Mistral's sliding_window covers every layer (4096 if the key is absent); Qwen2's (and
    Qwen3's, SmolLM3's) counts only with use_sliding_window, in the layers its layer_types (or,
    without one, layer max_window_layers on; SmolLM3's NoPE layers) name "sliding_attention", its width 4096 when
    config.json names none (SmolLM3's none)."""
    if kind == "llama":
        if d.get("sliding_window"):
            raise UserError(f"{cfg_json} has sliding_window {d['sliding_window']!r}; a Llama attends to the whole "
                            "context")
        return 0, "all"
    # the key's default when config.json leaves it out: MistralConfig's, Qwen2Config's and Qwen3Config's 4096 (the
    # latter two only where use_sliding_window says so), SmolLM3Config's None (4.x and 5 alike)
    window = d.get("sliding_window", 4096 if kind in ("mistral", "qwen2", "qwen3", "ministral") else None)
    if kind not in ("mistral", "ministral") and not config_flag(d, "use_sliding_window", False, cfg_json, kind):
        window = None
    if window is None:
        return 0, "all"
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise UserError(f"{cfg_json} has sliding_window {window!r}; it must be a positive integer or null")
    if kind == "mistral":
        return window, "all"
    first = d.get("max_window_layers", 28)
    if kind == "smollm3":  # without layer_types, SmolLM3 slides its window over its NoPE layers
        nope = _nope_layers(d, n_layer, cfg_json)
        default = ["sliding_attention" if i in nope else "full_attention" for i in range(n_layer)]
    elif kind == "ministral":  # MinistralConfig's: without layer_types, every layer slides (a window is said here)
        default = ["sliding_attention"] * n_layer
    else:
        default = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layer)]
    types = d.get("layer_types") or default
    # (an entry misspelled read as full attention, or a string read as its characters, would be another model's
    # windows, said nowhere; transformers refuses both)
    if not isinstance(types, list) or any(t not in ("sliding_attention", "full_attention") for t in types):
        raise UserError(f"{cfg_json} has layer_types {types!r}; it must list 'sliding_attention' or "
                        f"'full_attention' for each of its {n_layer} layers")
    if len(types) != n_layer:
        raise UserError(f"{cfg_json} has {len(types)} layer_types for {n_layer} layers")
    local = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if not local:
        return 0, "all"
    if local == list(range(n_layer)):
        return window, "all"
    if local == list(range(1, n_layer, 2)):
        return window, "odd"
    return window, ",".join(map(str, local))  # any other set: GPTConfig.window_layers' list


def _nope_layers(d: dict, n_layer: int, cfg_json) -> tuple:
    """SmolLM3's layers without RoPE: no_rope_layers, one 0 (no RoPE) or 1 (RoPE) per layer, or without it
    every no_rope_layer_interval-th layer (4: layers 3, 7, 11, ...), as transformers fills it in."""
    flags = d.get("no_rope_layers")
    if flags is None:
        every = d.get("no_rope_layer_interval", 4)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise UserError(f"{cfg_json} has no_rope_layer_interval {every!r}; it must be a positive integer")
        flags = [int((i + 1) % every != 0) for i in range(n_layer)]
    if not isinstance(flags, list) or len(flags) != n_layer or any(f not in (0, 1) or isinstance(f, bool)
                                                                    for f in flags):
        raise UserError(f"{cfg_json} has no_rope_layers {flags!r}; it must list 1 (RoPE) or 0 (none) for each of "
                        f"the {n_layer} layers")
    return tuple(i for i, f in enumerate(flags) if f == 0)


def hf_shapes(d: dict, sd: dict, cfg_json: Path, family: str) -> tuple:
    """(vocab, n_embd, mlp hidden, n_layer, n_head, n_kv_head, head_dim) of a Llama-named state dict
    (Llama's relatives' and Gemma's), each checked against config.json's d where it names it."""
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
        if key not in d:
            raise UserError(f"{cfg_json} names no {key}")
    try:
        vocab, n_embd = sd["embed_tokens.weight"].shape
        hidden = sd["layers.0.mlp.gate_proj.weight"].shape[0]
    except KeyError as e:
        raise UserError(f"{cfg_json.parent}: not a {family} model, missing tensor {e.args[0]!r}") from None
    n_layer = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("layers.")), default=-1)
    for key, have in (("vocab_size", vocab), ("hidden_size", n_embd), ("num_hidden_layers", n_layer),
                      ("intermediate_size", hidden)):
        if key in d and d[key] != have:
            raise UserError(f"{cfg_json} says {key} {d[key]!r}, but the weights have {have}")
    n_head, n_kv_head = d["num_attention_heads"], d.get("num_key_value_heads")
    n_kv_head = n_head if n_kv_head is None else n_kv_head  # (None: as many as the query heads, as transformers)
    # the head width is q_proj's rows over the heads: a count of another type, or one that does not divide them,
    # would be a ZeroDivisionError or TypeError here, or a head width of the remainder's floor
    q_rows = sd["layers.0.self_attn.q_proj.weight"].shape[0] if "layers.0.self_attn.q_proj.weight" in sd else n_embd
    for key, value in (("num_attention_heads", n_head), ("num_key_value_heads", n_kv_head)):
        if not is_int(value) or value < 1:
            raise UserError(f"{cfg_json} says {key} {value!r}; it must be a positive integer")
    if q_rows % n_head:
        raise UserError(f"{cfg_json} says num_attention_heads {n_head}, which does not divide the {q_rows} rows of "
                        "the weights' q_proj")
    head_dim = q_rows // n_head
    if d.get("head_dim") not in (None, head_dim):
        raise UserError(f"{cfg_json} says head_dim {d['head_dim']!r}, but the weights have {head_dim}")
    return vocab, n_embd, hidden, n_layer, n_head, n_kv_head, head_dim


# config.json's keys of the GPTConfig fields the Llama-shaped readers pass on as the file says them: GPTConfig's
# refusal of one then names the key (config_json_gptconfig)
LLAMA_KEYS = {"context_length": "max_position_embeddings", "norm_eps": "rms_norm_eps",
              "n_kv_head": "num_key_value_heads"}


def shape_fields(shapes: tuple, sd: dict, d: dict, cfg_json) -> dict:
    """The GPTConfig fields hf_shapes' (vocab, n_embd, hidden, n_layer, n_head, n_kv_head, head_dim) give,
    and whether the LM head is the embedding (no lm_head tensor, or an equal one: tied_head, which refuses a
    config.json d that says untied without one): the Llama, Gemma and OLMo readers' common part."""
    vocab, n_embd, hidden, n_layer, n_head, n_kv_head, head_dim = shapes
    return dict(vocab_size=vocab, n_embd=n_embd, mlp_hidden=hidden, n_layer=n_layer, n_head=n_head,
                n_kv_head=0 if n_kv_head == n_head else n_kv_head,
                attention_head_dim=0 if head_dim * n_head == n_embd else head_dim,
                tie_weights=tied_head(d, sd.get("lm_head.weight"), sd["embed_tokens.weight"], "lm_head.weight",
                                      cfg_json))


def _check_hf_config(cfg_json: Path, sd: dict) -> GPTConfig:
    """The GPTConfig of a Llama config.json, checked against the tensors beside it."""
    d = read_json_object(cfg_json)
    shapes = hf_shapes(d, sd, cfg_json, "Llama")
    n_layer = shapes[3]
    if d.get("hidden_act", "silu") != "silu":
        raise UserError(f"{cfg_json} has hidden_act {d['hidden_act']!r}; this model's SwiGLU computes 'silu' only")
    kind = d.get("model_type", "llama")
    attention_bias, mlp_bias = (config_flag(d, k, False, cfg_json, kind) for k in ("attention_bias", "mlp_bias"))
    if kind == "qwen3" and attention_bias:  # Qwen3's MLP never has biases
        mlp_bias = False
    if kind in ("llama", "qwen3", "smollm3") and attention_bias != mlp_bias:
        raise UserError(f"{cfg_json} has attention_bias {attention_bias} and mlp_bias {mlp_bias}; this model's "
                        "linear layers have biases all or none (GPTConfig.bias)")
    # Mistral's have none, Qwen2's are q/k/v's only, whatever it says
    bias = attention_bias and kind in ("llama", "smollm3")
    window, window_layers = _sliding_window(d, kind, n_layer, cfg_json)
    nope = _nope_layers(d, n_layer, cfg_json) if kind == "smollm3" else ()
    # SmolLM3Config's base when none is said is 2000000 (4.x and 5), the others' 10000
    theta, scaling = _rope_theta(d, cfg_json, 2_000_000.0 if kind == "smollm3" else 10000.0)
    return config_json_gptconfig(
        cfg_json, LLAMA_KEYS, **shape_fields(shapes, sd, d, cfg_json),
        context_length=d.get("max_position_embeddings", 2048), bias=bias, qkv_bias_only=kind == "qwen2",
        attention_window=window, window_layers=window_layers, qk_norm=kind == "qwen3", position_encoding="rope",
        rope_theta=theta, rope_scaling=scaling, norm="rmsnorm",
        nope_layers=",".join(map(str, nope)), norm_eps=d.get("rms_norm_eps", 1e-6), mlp="swiglu")


def _our_tensors(sd: dict, cfg: GPTConfig) -> dict:
    """Hugging Face Llama tensors under our parameter names (KeyError: a tensor the file lacks)."""
    ours = {"tok_emb.weight": sd["embed_tokens.weight"], "final_norm.weight": sd["norm.weight"]}
    if not cfg.tie_weights:
        ours["out_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        for mine, theirs in _LAYER:
            if mine == "norm2" and cfg.shared_norm:  # StableLM 2 12B's parallel blocks: one norm
                continue
            ours[f"trf_blocks.{i}.{mine}.weight"] = sd[f"layers.{i}.{theirs}.weight"]
            if cfg.has_qkv_bias if mine in _QKV else cfg.bias and mine not in _NORMS:
                ours[f"trf_blocks.{i}.{mine}.bias"] = sd[f"layers.{i}.{theirs}.bias"]
        for mine, theirs in _QK_NORMS if cfg.qk_norm and cfg.qk_norm_width != "each" else ():  # (StableLM's: its own)
            ours[f"trf_blocks.{i}.{mine}.weight"] = sd[f"layers.{i}.{theirs}.weight"]
    return ours


def load_llama_safetensors(path) -> GPTModel:
    """GPTModel with the weights of a Hugging Face Llama (Mistral, Qwen2, Qwen3) model.safetensors and its
    config.json beside it (the heads, RoPE's base and the norm's eps are in no tensor). A 4-bit GPTQ or AWQ GEMM
    folder loads int4 (hf_quant.py: its Linears Int4Linears, the model marked quantized)."""
    from tritongpt.train.hf_quant import folder_dequantized, folder_quantization, int4_linears, model_with_int4
    path = weights_file(path, "Llama")
    cfg_json = path.parent / "config.json"
    if not cfg_json.is_file():
        raise UserError(f"{path} looks like a Llama model, whose heads, RoPE base and norm eps are in its "
                        "config.json: put that file beside it")
    # a GPTQ or AWQ folder (quantization_config): 4-bit, read as int4 (hf_quant.py; 8-bit GPTQ as int8 where it
    # maps); an FP8 one, or a GPTQ one of other bits, dequantized to a float model; any other refused by name
    spec, dequant = folder_quantization(cfg_json)
    sd = _read_tensors(path, prefix="model.", quantization_read=spec is not None or dequant is not None)
    if dequant is not None:
        sd = folder_dequantized(sd, dequant, path, prefix="model.")
    if spec is not None:
        sd, packed, group_size = int4_linears(sd, spec, path)
        if packed is None:  # (4-bit groups no int4 group size divides: read dequantized, a float model)
            spec = None
    cfg = _check_hf_config(cfg_json, sd)
    if spec is not None:
        return model_with_int4(cfg, lambda: _our_tensors(sd, cfg), sd, packed, group_size, path)
    return model_with_tensors(cfg, lambda: _our_tensors(sd, cfg), path)


# -- export: the inverse of _our_tensors -----------------------------------------------------------
def hf_family(cfg: GPTConfig) -> str:
    """The model_type a Llama-shaped model is written as: smollm3 when some layers have no RoPE (nope_layers),
    qwen3 when it normalizes q and k, qwen2 when
    its q/k/v alone have biases, mistral when it has a sliding window in every layer (and no biases: Mistral's
    projections have none), ministral when in some layers only (Ministral's layer_types), else llama."""
    if cfg.nope_layers:
        return "smollm3"
    if cfg.qk_norm:
        return "qwen3"
    if cfg.qkv_bias_only:
        return "qwen2"
    if cfg.attention_window and not cfg.bias:
        return "mistral" if cfg.window_layers == "all" else "ministral"
    return "llama"


def family_name(cfg: GPTConfig) -> str:
    """"Llama", "Mistral", "Qwen2", "Qwen3", "SmolLM3" or "Ministral": what export writes this model as."""
    return _NAMES[hf_family(cfg)]


def refuse_not_llama(model: GPTModel, what: str, family: str | None = None) -> None:
    """Hugging Face's Llama rotates q and k (RoPE, no position embeddings), normalizes with RMSNorm,
    has a SwiGLU MLP, scales its scores by 1/sqrt(head_dim) over the whole context and has no
    logit soft cap: another model's weights would give it other logits. Mistral may slide a window
    over every layer, Qwen2 too (Qwen2 from layer max_window_layers on: all of them, written here)."""
    cfg = model.config
    family = family or family_name(cfg)
    from tritongpt.train.moe_weights import FAMILY_NAMES

    if family not in FAMILY_NAMES:  # the MoE families' refusals check a dense twin of the model
        refuse_moe_touches(cfg, family, what)
    else:
        refuse_norm_touches(cfg, family, what)
    window = (f"has local attention (attention_window {cfg.attention_window}) in its {cfg.window_layers} layers, "
              f"where {family}'s sliding window, if any, is in every layer" if family != "Llama" else
              f"has local attention (attention_window {cfg.attention_window}), where Llama attends to the whole "
              "context (a Mistral folder would take the window, but Mistral's projections have no biases)")
    for differs, why in ((cfg.position_encoding != "rope", f"{cfg.positions_said()}, where {family} rotates q and k "
                          "(RoPE)"),
                         (cfg.norm != "rmsnorm", f"normalizes with {cfg.norm}, where {family} has RMSNorms"),
                         (cfg.mlp != "swiglu", f"has a {cfg.mlp.upper()} MLP, where {family}'s is SwiGLU"),
                         (not cfg.scale_attention, "does not scale its attention scores by 1/sqrt(head_dim), "
                          f"which {family} does"),
                         (bool(cfg.attention_window) and (family == "Llama" or family == "Mistral"
                                                          and cfg.window_layers != "all"), window),
                         (bool(cfg.logit_softcap), f"soft-caps its logits (logit_softcap {cfg.logit_softcap:g}), "
                          f"which {family} does not"),
                         (family == "Qwen3" and cfg.qkv_bias_only, "has biases on q, k and v only (Qwen2's), "
                          "where Qwen3, which normalizes q and k as this model does, has none"),
                         (family == "Qwen3" and cfg.bias, "has biases in its MLP, where Qwen3's has none"),
                         (bool(cfg.rope_local_theta), f"rotates its local layers with a RoPE base of their own "
                          f"(rope_local_theta {cfg.rope_local_theta:g}), where {family}'s layers share one"),
                         (family == "SmolLM3" and cfg.qk_norm, "normalizes each head's q and k (Qwen3's qk_norm), "
                          "where SmolLM3, which has layers without RoPE as this model does, does not"),
                         (family == "SmolLM3" and cfg.qkv_bias_only, "has biases on q, k and v only (Qwen2's), "
                          "where SmolLM3's linear layers have biases all or none")):
        if differs:
            raise UserError(f"this model {why}: it cannot be exported as {what}")
    refuse_gemma_touches(cfg, family, what, layer_types=family in ("Qwen2", "Qwen3", "SmolLM3", "Qwen2-MoE",
                                                                         "Ministral"))
    if family != "Phi-3":
        refuse_phi3_touches(cfg, family, what)


def _hf_tensors(model: GPTModel) -> dict:
    """Our parameters under LlamaForCausalLM's names (Mistral's and Qwen2's too); zero q/k/v biases
    for a qkv_bias False model with biases elsewhere (Llama's attention_bias is all four or none);
    the padding rows dropped."""
    cfg = model.config
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    V = cfg.vocab_size
    hf = {"embed_tokens.weight": sd["tok_emb.weight"][:V], "norm.weight": sd["final_norm.weight"]}
    for i in range(cfg.n_layer):
        for mine, theirs in _LAYER:
            if mine == "norm2" and cfg.shared_norm:
                continue
            w = hf[f"layers.{i}.{theirs}.weight"] = sd[f"trf_blocks.{i}.{mine}.weight"]
            if mine not in _NORMS and (cfg.bias or mine in _QKV and cfg.qkv_bias_only):
                hf[f"layers.{i}.{theirs}.bias"] = sd.get(f"trf_blocks.{i}.{mine}.bias", w.new_zeros(w.shape[0]))
        for mine, theirs in _QK_NORMS if cfg.qk_norm and cfg.qk_norm_width != "each" else ():
            hf[f"layers.{i}.{theirs}.weight"] = sd[f"trf_blocks.{i}.{mine}.weight"]
    out = {"model." + k: v for k, v in hf.items()}
    if not cfg.tie_weights:
        out["lm_head.weight"] = sd["out_head.weight"][:V]
    return {k: v.to("cpu", memory_format=torch.contiguous_format, copy=True) for k, v in out.items()}


def hf_config(cfg: GPTConfig, eos_token_id: int | None = None) -> dict:
    """LlamaConfig (MistralConfig, Qwen2Config, Qwen3Config, SmolLM3Config, MinistralConfig) fields (config.json)
    for this model; what _check_hf_config reads back. RoPE's base is written both ways: rope_parameters (transformers 5)
    and rope_theta (4.x)."""
    kind = hf_family(cfg)
    d = {"model_type": kind, "architectures": [FAMILIES[kind]], "vocab_size": cfg.vocab_size,
         "max_position_embeddings": cfg.context_length, "hidden_size": cfg.n_embd,
         "intermediate_size": cfg.ff_hidden, "num_hidden_layers": cfg.n_layer,
         "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
         "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
         "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                                                           **(cfg.rope_scaling or {})},
         "rope_scaling": cfg.rope_scaling, "attention_dropout": 0.0, "tie_word_embeddings": cfg.tie_weights,
         # pad None: SmolLM3Config's default (128004) would be past a smaller vocabulary's embedding
         "bos_token_id": eos_token_id, "eos_token_id": eos_token_id, "pad_token_id": None}
    window = cfg.attention_window or None
    if kind == "llama":
        d.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
    elif kind == "smollm3":
        d.update(attention_bias=cfg.bias, mlp_bias=cfg.bias, use_sliding_window=bool(window), sliding_window=window,
                 layer_types=["sliding_attention" if cfg.layer_window(i) else "full_attention"
                              for i in range(cfg.n_layer)],
                 no_rope_layers=[int(cfg.layer_has_rope(i)) for i in range(cfg.n_layer)])
    elif kind == "mistral":
        d.update(sliding_window=window)
    elif kind == "ministral":
        d.update(sliding_window=window, layer_types=["sliding_attention" if cfg.layer_window(i) else "full_attention"
                                                     for i in range(cfg.n_layer)])
    else:  # Qwen2's and Qwen3's local layers: layer_types (older readers: from max_window_layers 0, all)
        d.update(use_sliding_window=bool(window), sliding_window=window, max_window_layers=0 if window else cfg.n_layer,
                 layer_types=["sliding_attention" if cfg.layer_window(i) else "full_attention"
                              for i in range(cfg.n_layer)])
        if kind == "qwen3":
            d.update(attention_bias=False)
    return d


def export_llama(model: GPTModel, out_dir, eos_token_id: int | None = None, overwrite: bool = False) -> list:
    """Write model as a Hugging Face Llama, Mistral, Qwen2 or Qwen3 folder (hf_family): model.safetensors
    and config.json, which transformers.AutoModelForCausalLM.from_pretrained(out_dir) and
    load_checkpoint both read. Returns the paths written; refuses to replace them unless overwrite."""
    refuse_not_llama(model, f"a {family_name(model.config)} folder")
    return write_hf_folder(out_dir, lambda: _hf_tensors(model), hf_config(model.config, eos_token_id), overwrite)
