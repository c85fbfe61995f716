"""OpenAI's GPT-2 weights, in Hugging Face's safetensors layout, into GPTModel, and back out.
(GPT-Neo's: train/gpt_neo_weights.py, which load_checkpoint hands them to.)

Hugging Face's GPT-2 uses Conv1D layers, whose weights are stored [in, out], the transpose of
nn.Linear's [out, in]; and one fused c_attn projection that makes q, k and v together, which
we split into W_query, W_key and W_value. The LM head is tied to the token embedding.
`export_gpt2` writes the inverse: a folder transformers' GPT2LMHeadModel.from_pretrained loads.
"""
import copy
import json
import math
import os
import re
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import torch

from tritongpt._types import is_int
from tritongpt.errors import UserError, note, read_json_object
from tritongpt.model.config import GPTConfig, get_config
from tritongpt.model.gpt import GPTModel, all_finite, check_finite_weights, readable_like_other_files, \
    unreadable_safetensors

HUB_REPOS = {
    "gpt2-small": "openai-community/gpt2",
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}


# transformers' save_pretrained past max_shard_size (and the Hub's larger models): this index's
# weight_map names, for every tensor, the model-0000i-of-0000N.safetensors beside it holding it
SHARD_INDEX = "model.safetensors.index.json"
# PyTorch's pickled weights, what save_pretrained wrote before safetensors and what some Hub repos still
# hold alone; read after the safetensors forms, as transformers does, and only through weights_only
BIN_FILE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
WEIGHT_FILES = ("model.safetensors", SHARD_INDEX, BIN_FILE, BIN_INDEX)  # a Hugging Face folder's, first found


def is_shard_index(path) -> bool:
    return str(path).endswith((".safetensors.index.json", ".bin.index.json"))


def is_torch_bin(path) -> bool:
    """A pytorch_model.bin (or a shard of one) rather than a safetensors file."""
    return Path(path).suffix == ".bin"


def read_torch_bin(path) -> dict:
    """A pytorch_model.bin's tensors, unpickled with weights_only (tensors and plain containers, no
    code run: a pickle asking for anything else is refused) and memory-mapped where the file allows.
    A file that is not such a dict of named tensors is a UserError naming it."""
    def load(mmap):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            tensors = load(True)
        except RuntimeError:  # torch.save's legacy (pre-zip) format cannot be mapped: read it whole
            tensors = load(False)
    except Exception as e:
        first = str(e).splitlines()[0].split(". ")[0] if str(e) else ""
        raise UserError(f"{path} is not a readable PyTorch weights file ({type(e).__name__}: {first})") from None
    if not isinstance(tensors, dict):
        raise UserError(f"{path} is not a PyTorch weights file: it holds a {type(tensors).__name__}, "
                        "not a dict of named tensors")
    for k, v in tensors.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise UserError(f"{path} is not a PyTorch weights file: its entry {k!r} is a {type(v).__name__}, "
                            "not a tensor")
    return tensors


def _weight_map(index) -> dict:
    """A shard index's weight_map (tensor name -> shard file name), checked to be one."""
    wm = read_json_object(index).get("weight_map")
    if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
        raise UserError(f"{index}: its weight_map must be an object of tensor names to shard file names")
    return wm


def shard_files(index) -> list:
    """The shards a model.safetensors.index.json (or pytorch_model.bin.index.json) names, each a file
    beside it (a missing one named)."""
    index = Path(index)
    names = sorted(set(_weight_map(index).values()))
    outside = [n for n in names if Path(n).name != n]
    if outside:
        raise UserError(f"{index} names shard(s) outside its folder: {', '.join(outside)}")
    missing = [n for n in names if not (index.parent / n).is_file()]
    if missing:
        raise UserError(f"{index} names shard(s) that are not beside it: {', '.join(missing)}")
    return [index.parent / n for n in names]


def tensor_names(path) -> list:
    """The tensor names of a safetensors file (or a pytorch_model.bin), or of every shard a shard index names."""
    from safetensors import safe_open

    if is_shard_index(path):
        return list(_weight_map(path))
    if is_torch_bin(path):
        return list(read_torch_bin(path))
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:
        raise unreadable_safetensors(path, e) from None


def weights_file(path, family: str) -> Path:
    """path as a Path, refused by name (family's weights) when no such file is there: each loader's first step."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{family} weights file not found: {path}")
    return path


# how each quantizer transformers loads stores a linear layer (its quant_method): named in the refusal, since a reader
# here that went on would find no float .weight (a confusing missing-tensor error) or integer codes in its place
_QUANT_STORAGE = {
    "gptq": "GPTQ's int32-packed qweight, qzeros, scales and g_idx",
    "awq": "AWQ's int32-packed qweight, qzeros and scales",
    "bitsandbytes": "bitsandbytes' int8 (SCB) or 4-bit (absmax, quant_map) blocks",
    "fp8": "float8 weights with their scales (weight_scale_inv)",
    "fbgemm_fp8": "float8 weights with their scales (weight_scale)",
    "compressed-tensors": "compressed-tensors' packed weights with their scales",
    "mxfp4": "MXFP4's uint8 FP4 blocks with e8m0 exponent scales (_blocks, _scales)",
}
_QUANT_FIELDS = ("bits", "group_size", "desc_act", "sym", "version", "checkpoint_format", "load_in_4bit",
                 "load_in_8bit", "fmt")


def hf_quantization(cfg_json) -> dict | None:
    """config.json's quantization_config (a model quantized by GPTQ, AWQ, bitsandbytes, FP8, compressed-tensors ...:
    transformers' pre-quantized folders), or AutoGPTQ's own quantize_config.json or AutoAWQ's quant_config.json beside
    it; None when none says one (null: nothing said). Anything but an object there is refused by name."""
    cfg_json = Path(cfg_json)
    q = read_json_object(cfg_json).get("quantization_config") if cfg_json.is_file() else None
    gptq_own, awq_own = cfg_json.parent / "quantize_config.json", cfg_json.parent / "quant_config.json"
    if q is None and gptq_own.is_file() and awq_own.is_file():
        raise UserError(f"{cfg_json.parent} has both AutoGPTQ's quantize_config.json and AutoAWQ's quant_config.json "
                        "(and no quantization_config in config.json): which quantization its tensors hold is unclear")
    if q is None and gptq_own.is_file():
        # AutoGPTQ's save_quantized writes its settings here, not in config.json (and no quant_method: it is GPTQ's)
        return {"quant_method": "gptq", **read_json_object(gptq_own), "_where": str(gptq_own)}
    if q is None and awq_own.is_file():
        # AutoAWQ's older save_quantized writes these (AwqConfig.to_dict: w_bit, q_group_size, zero_point, version),
        # read by its from_quantized when config.json has no quantization_config; under transformers' names here
        # (its to_transformers_dict), AwqConfig's defaults where a field is missing
        d = read_json_object(awq_own)
        return {"quant_method": d.get("quant_method", "awq"), "bits": d.get("w_bit", 4),
                "group_size": d.get("q_group_size", 128), "zero_point": d.get("zero_point", True),
                "version": d.get("version", "GEMM"), "_where": str(awq_own)}
    if q is None:
        return None
    if not isinstance(q, dict):
        raise UserError(f"{cfg_json} has quantization_config {q!r}; it must be an object (quant_method and its "
                        "fields) or null")
    return {**q, "_where": f"{cfg_json}'s quantization_config"}


def refuse_quantized(q: dict, why: str = "", remedy: str | None = None) -> None:
    """A UserError naming a quantization_config (hf_quantization's) that the reader does not take (why: what it
    does take, where it takes some; remedy: what to load instead, where `tritongpt quantize` cannot make it)."""
    # transformers reads a config without quant_method but with load_in_4bit / load_in_8bit as bitsandbytes'
    method = q.get("quant_method") or ("bitsandbytes" if q.get("load_in_4bit") or q.get("load_in_8bit") else None)
    said = ", ".join(f"{k} {q[k]!r}" for k in _QUANT_FIELDS if k in q)
    raise UserError(f"{q['_where']}: quant_method {method!r}{f' ({said})' if said else ''} is not read here" +
                    (f" ({why})" if why else "") + f": its linear layers are stored as "
                    f"{_QUANT_STORAGE.get(method, 'quantized tensors')}, not float weights; " +
                    (remedy or "load the float model it was quantized from (`tritongpt quantize --quantize int4 "
                     "--method gptq` or `--method awq` makes a 4-bit model of it here)"))


def _read_tensors(path, prefix: str = "transformer.", quantization_read: bool = False) -> dict:
    """A safetensors file's tensors (or a pytorch_model.bin's, or all of a shard index's shards'), their
    names without the model class's prefix. A folder quantized by GPTQ, AWQ, bitsandbytes ... (config.json's
    quantization_config) is refused by name first, unless the reader takes it (quantization_read: it has read and
    checked that config itself)."""
    from safetensors.torch import load_file

    if not quantization_read and (q := hf_quantization(Path(path).parent / "config.json")) is not None:
        refuse_quantized(q)
    tensors = {}
    for file in shard_files(path) if is_shard_index(path) else [path]:
        if is_torch_bin(file):
            tensors.update(read_torch_bin(file))
            continue
        try:
            tensors.update(load_file(str(file)))
        except Exception as e:  # a truncated or foreign file: safetensors' own error, in one line
            raise unreadable_safetensors(file, e) from None
    # Hub files name keys "h.0...", a saved GPT2LMHeadModel "transformer.h.0..."
    tensors = {k.removeprefix(prefix): v for k, v in tensors.items()}
    held = _CLASSIFIER.get()
    return tensors if held is None else _classifier_as_causal_lm(tensors, held, path)


# -- a Hugging Face <Family>ForSequenceClassification (a reward model) --------------------------------------
# Its tensors are its causal LM's but for the LM head, which it lacks, and its `score.weight` [num_labels, C].
# Read as a causal LM, the missing head would pass for a tied one, a wrong model without a word: load_checkpoint
# refuses such a file, and train/reward.py reads it under `reading_classifier()`, where _read_tensors sets
# score.weight aside and gives every family's reader the head it expects: the embedding itself (the readers that
# look then find a tied head), and for GPT-J and Phi, whose readers take a head bias always, a zero one (MPT's
# refuses any bias). A reward model never calls that head.
_CLASSIFIER: ContextVar = ContextVar("tritongpt_classifier", default=None)
_EMBEDDINGS = ("wte.weight", "embed_tokens.weight", "word_embeddings.weight", "embed_in.weight")
_HEAD_BIAS = ("gptj", "phi")  # model_types
SCORE = "score.weight"


@contextmanager
def reading_classifier():
    """Within: the weights the loaders read are a sequence classifier's; yields the dict that receives its score."""
    held = {}
    token = _CLASSIFIER.set(held)
    try:
        yield held
    finally:
        _CLASSIFIER.reset(token)


def _classifier_as_causal_lm(tensors: dict, held: dict, path) -> dict:
    if SCORE not in tensors:
        raise UserError(f"{path} has no {SCORE!r}: not a sequence classifier (a reward model's scalar head)")
    heads = [k for k in tensors if k.startswith(("lm_head.", "embed_out."))]
    if heads:
        raise UserError(f"{path} has both a {SCORE!r} and an LM head ({heads[0]!r}): neither a sequence classifier "
                        "nor a causal LM as transformers saves them")
    embedding = next((k for k in _EMBEDDINGS if k in tensors), None)
    if embedding is None:
        raise UserError(f"{path}: no token embedding ({' or '.join(map(repr, _EMBEDDINGS))}) beside {SCORE!r}")
    held[SCORE] = tensors.pop(SCORE)
    emb = tensors[embedding]
    cfg_json = Path(path).parent / "config.json"
    if cfg_json.is_file() and read_json_object(cfg_json).get("model_type") in _HEAD_BIAS:
        tensors["lm_head.bias"] = emb.new_zeros(emb.shape[0])
    return {**tensors, "lm_head.weight": emb}


def classifier_name(path) -> str | None:
    """What a Hugging Face weights file is when it is a classifier (a score head, no LM head): the class its
    config.json's architectures names (<Family>ForSequenceClassification, or ForTokenClassification), or, where
    they name no causal LM, "a sequence classifier" when its tensors have score.weight and no LM head; None for
    anything else."""
    cfg_json = Path(path).parent / "config.json"
    arch = read_json_object(cfg_json).get("architectures") if cfg_json.is_file() else None
    arch = [a for a in arch if isinstance(a, str)] if isinstance(arch, list) else []
    named = next((a for a in arch if a.endswith(("ForSequenceClassification", "ForTokenClassification"))), None)
    if named or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in arch):
        return named
    names = tensor_names(path)
    if SCORE in names and not any(k.endswith(("lm_head.weight", "embed_out.weight")) for k in names):
        return "a sequence classifier"
    return None


def tensor_shapes(sd: dict, path: Path, family: str) -> tuple:
    """(vocab, width, context, layers) from a Hugging Face GPT-2 or GPT-Neo state dict (the two
    name wte, wpe, ln_f and h.<i> alike), each missing or misshapen tensor named."""
    for key in ("wte.weight", "wpe.weight", "ln_f.weight"):
        if key not in sd:
            raise UserError(f"{path} is not a {family} weights file: missing tensor {key!r}")
        want = 1 if key == "ln_f.weight" else 2
        if sd[key].dim() != want:
            raise UserError(f"{path}: tensor {key} has shape {tuple(sd[key].shape)}, expected "
                            + ("[width]" if want == 1 else "[rows, width]"))
    vocab, n_embd = sd["wte.weight"].shape
    layers = [int(m.group(1)) for k in sd if (m := re.match(r"h\.(\d+)\.", k))]
    if not layers:
        raise UserError(f"{path} is not a {family} weights file: no transformer blocks (h.0..., h.1...)")
    return vocab, n_embd, sd["wpe.weight"].shape[0], 1 + max(layers)


# The true/false fields our readers read whose null transformers 5.25's config class accepts, by model_type: typed
# bool | None (Falcon's flags, Cohere's use_qk_norm...) or no field of that class at all (Mistral's mlp_bias, read
# here as its default). The config keeps the None and its model tests it by truth, so a null is false. Every other
# field read is a strict bool there (attention_bias, qk_layernorm, tie_word_embeddings...): a null is refused when
# the config is built, and read as false here it loaded a model transformers never builds. Made by instantiating
# each config class with each field its reader reads set to None (tests/test_config_nulls.py compares it with
# transformers'); an entry for a field a branch does not read for that type (Cohere 2's use_qk_norm) keeps it true.
NULL_AS_FALSE = {
    "falcon": frozenset({"parallel_attn", "multi_query", "new_decoder_architecture", "alibi", "bias"}),
    "cohere": frozenset({"use_qk_norm"}), "cohere2": frozenset({"use_qk_norm"}),
    # (transformers 5 writes use_bidirectional_attention null in every Gemma and Gemma 2 config.json it saves)
    **dict.fromkeys(("gemma", "gemma2", "gemma3_text"), frozenset({"use_bidirectional_attention"})),
    # (a multimodal Gemma 3's top-level tie_word_embeddings: Gemma3Config types it bool | None, its model tests it
    # by truth)
    "gemma3": frozenset({"tie_word_embeddings"}),
    "granite": frozenset({"output_router_logits"}), "granitemoe": frozenset({"output_router_logits", "mlp_bias"}),
    "llama": frozenset({"use_sliding_window"}),
    "mistral": frozenset({"attention_bias", "mlp_bias", "use_sliding_window"}),
    # (MinistralConfig has no bias fields, its projections none whatever they say; Ernie4_5Config types use_bias
    # bool | None, and nn.Linear's bias=None is none)
    "ministral": frozenset({"attention_bias", "mlp_bias"}), "ernie4_5": frozenset({"use_bias"}),
    "qwen2": frozenset({"attention_bias", "mlp_bias"}), "qwen3": frozenset({"mlp_bias"}),
    "mixtral": frozenset({"attention_bias", "mlp_bias", "use_sliding_window", "norm_topk_prob"}),
    "qwen3_moe": frozenset({"mlp_bias"}), "olmoe": frozenset({"mlp_bias", "use_sliding_window"}),
    # not transformers: peft's LoraConfig (adapter_config.json) is a plain dataclass that tests these by truth
    "peft_lora": frozenset({"use_dora", "use_rslora"}),
}


def config_flag(d: dict, key: str, default: bool, cfg_json, kind: str | None = None) -> bool:
    """A true/false field of config.json: absent, its default. kind: the model_type whose config reads the file
    (default: d's model_type). A null is false where that config accepts it (NULL_AS_FALSE: Falcon's parallel_attn
    null is the sequential block in transformers too), and refused by name elsewhere, as transformers 5 refuses it.
    bool() of the string "false" is True: a flag spelled as a string (or a number) would read as another model, so
    anything but a JSON boolean is refused by name."""
    if key not in d:
        return default
    value = d[key]
    if kind is None:
        kind = d.get("model_type")
    if value is None and key not in NULL_AS_FALSE.get(kind, ()):
        raise UserError(f"{cfg_json} has {key} null; it must be true or false (transformers refuses null here, and "
                        f"its default is {json.dumps(default)})")
    if value is None:
        return False
    if not isinstance(value, bool):
        raise UserError(f"{cfg_json} has {key} {value!r}; it must be true or false")
    return value


# the model types whose transformers config unties the head where config.json does not say tie_word_embeddings
# (LlamaConfig's default false and its kin's; transformers 5.25 as 4.x). Their models tie only when it says true, so
# a folder of theirs with no head and no word is loaded with a random head; and save_pretrained writes the field
# wherever the value differs from PretrainedConfig's default (true) or the class's, so every folder transformers
# wrote for these says it. GPT-2, GPT-Neo, BLOOM, Falcon, MPT, Gemma, Cohere and SmolLM3 tie by default (GPT-2's
# configs leave the field out, their files the head); a config.json without a model_type is no transformers
# folder: tied as before.
UNTIED_BY_DEFAULT = frozenset({"llama", "mistral", "qwen2", "qwen3", "olmo2", "olmo3", "phi", "phi3", "stablelm",
                               "granite", "granitemoe", "mixtral", "qwen3_moe", "olmoe", "gpt_neox", "gptj",
                               "exaone4", "arcee", "nemotron"})


def tied_head(d: dict, head, emb, head_name: str, cfg_json) -> bool:
    """Whether the LM head is the embedding, as the weights say: no head tensor (head: None), or one equal to the
    embedding (emb). A config.json that says tie_word_embeddings false beside weights with no head is a broken
    folder: transformers starts a random head there (a missing weight), a model no reading here computes (tying
    was: another model than transformers'); refused naming the file and field. So is one that does not say it, of a
    model type whose transformers config unties by default (UNTIED_BY_DEFAULT). A null (or a string) is refused
    beside a head too: every transformers config refuses it, whatever the weights."""
    default = not (isinstance(d.get("model_type"), str) and d["model_type"] in UNTIED_BY_DEFAULT)
    tied = config_flag(d, "tie_word_embeddings", default, cfg_json)
    if head is None:
        if not tied:
            said = f"says tie_word_embeddings {json.dumps(d['tie_word_embeddings'])}" if "tie_word_embeddings" in d \
                else f"does not say tie_word_embeddings (model_type {d['model_type']!r}: transformers' default false)"
            raise UserError(f"{cfg_json} {said}, but the weights beside it have no {head_name}: transformers would "
                            "start a random LM head. Add the head's weights, or set tie_word_embeddings true to use "
                            "the embedding as the head")
        return True
    return torch.equal(head, emb)


def head_count(value, key: str, width: int, cfg_json) -> int:
    """config.json's head count (key): a positive integer dividing the weights' width. Another type ("4", 4.0) or
    one that does not divide would reach GPTConfig, whose error names its own n_head and not the file."""
    if not is_int(value) or value < 1:
        raise UserError(f"{cfg_json} says {key} {value!r}; it must be a positive integer")
    if width % value:
        raise UserError(f"{cfg_json} says {key} {value}, which does not divide the weights' width {width}")
    return int(value)


def config_json_gptconfig(cfg_json, keys: dict, **fields) -> GPTConfig:
    """GPTConfig(**fields) for a family's reader of config.json. Most fields reach GPTConfig as the file says them
    (a context length "40" or 40.0, an eps of 0), and GPTConfig's refusal names its own field only: it is re-raised
    naming the file, and the file's key where keys maps the field to it ({"context_length":
    "max_position_embeddings"}: "config.json: max_position_embeddings (GPTConfig.context_length) must be ...")."""
    try:
        return GPTConfig(**fields)
    except UserError as e:
        said = str(e)
        for field, key in keys.items():
            said = re.sub(rf"\bGPTConfig\.{field}\b", f"{key} (GPTConfig.{field})", said, count=1)
        raise UserError(f"{cfg_json}: {said}") from None


def _infer_config(sd: dict, path: Path, model_name: str | None) -> GPTConfig:
    vocab, n_embd, ctx, n_layer = tensor_shapes(sd, path, "GPT-2")
    # The heads are not in the tensors' shapes. In order: config.json beside the file, then
    # model_name -- only if its width and depth are the file's (a wrong head count loads
    # without error but computes something else) -- then the GPT-2 size of this width and depth.
    n_head, d = None, {}
    cfg_json = path.parent / "config.json"
    if cfg_json.is_file():
        d = _check_hf_config(cfg_json, vocab, ctx, n_embd, n_layer)
        n_head = d.get("n_head")
    if n_head is None and model_name is not None:
        named = get_config(model_name)
        if (named.n_embd, named.n_layer) != (n_embd, n_layer):
            raise UserError(f"{path} has width {n_embd} and {n_layer} layers, but --model {model_name} has "
                            f"{named.n_embd} and {named.n_layer}: put the file's config.json beside it")
        n_head = named.n_head
    if n_head is None:  # OpenAI's published sizes (not our small presets: a file of their shape
        for name in HUB_REPOS:  # may well have other heads, and a guess would fail silently)
            preset = get_config(name)
            if (preset.n_embd, preset.n_layer) == (n_embd, n_layer):
                n_head = preset.n_head
    if n_head is None:  # (a config.json without n_head is there: "put one beside it" would not help)
        raise UserError(f"cannot tell the number of heads of {path}: " + (
            f"{cfg_json} has no n_head; add it or pass --model" if cfg_json.is_file() else
            "put its config.json beside it or pass --model"))
    return GPTConfig(vocab_size=vocab, context_length=ctx, n_embd=n_embd, n_layer=n_layer,
                     n_head=n_head, bias=True,
                     tie_weights=tied_head(d, sd.get("lm_head.weight"), sd["wte.weight"], "lm_head.weight", cfg_json))


# What this model computes, as Hugging Face's GPT2Config spells it (its defaults when absent):
# GELU with the tanh approximation, LayerNorm eps 1e-5, scores scaled by 1/sqrt(head_dim) only.
_HF_MUST = {"activation_function": ({"gelu_new", "gelu_pytorch_tanh", "gelu_fast"}, "gelu_new"),
            "layer_norm_epsilon": ({1e-5}, 1e-5)}
# The two scale flags, read by config_flag: GPT2Config (transformers 5) refuses a null in either, so a null is
# refused by name.
_HF_FLAGS = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False}


def _gpt2_config_json(cfg_json: Path) -> dict:
    """config.json of a file load_checkpoint did not hand to GPT-Neo's or the Llama family's reader:
    another model_type (Gemma, Phi-3...) is named here, before its tensors are looked up under
    GPT-2's names."""
    d = read_json_object(cfg_json)
    if d.get("model_type", "gpt2") != "gpt2":
        *most, last = read_model_types()
        raise UserError(f"{cfg_json} says model_type {d['model_type']!r}: not a GPT-2 model (tritongpt reads "
                        f"Hugging Face's {', '.join(most)} and {last} models)")
    return d


def read_model_types() -> tuple:
    """The config.json model_types load_checkpoint hands to a reader, from the readers' own tables (a list
    written out here went stale as families were added)."""
    return tuple(model_type_readers())


def model_type_readers() -> dict:
    """{model_type: the train/ module whose reader reads it}, read_model_types' order (the README's table of
    families is checked against it: tests/test_readme_families.py)."""
    import importlib

    readers = {"gpt2": "gpt2_weights", "gpt_neo": "gpt_neo_weights", "gpt_oss": "gpt_oss_weights"}  # (named inline)
    for name in ("llama", "llama_kin", "gemma", "olmo", "neox", "phi", "phi3", "gptj", "falcon", "bloom", "mpt",
                 "cohere", "granite", "arcee", "nemotron", "starcoder2", "gpt_bigcode",
                 "stablelm", "glm4", "exaone4", "moe"):
        m = importlib.import_module(f"tritongpt.train.{name}_weights")
        for t in (getattr(m, "MODEL_TYPE", None), *getattr(m, "FAMILIES", ()), *getattr(m, "MODEL_TYPES", ())):
            if t:
                readers.setdefault(t, f"{name}_weights")
    return readers


def _check_hf_config(cfg_json: Path, vocab: int, ctx: int, n_embd: int, n_layer: int) -> dict:
    """config.json beside a GPT-2 file: readable, agreeing with the tensors' shapes, and naming
    no variant this model does not compute (another activation or eps would load silently and
    give other numbers)."""
    d = _gpt2_config_json(cfg_json)
    # a size of another type ("32", 2.0, null) was compared to the tensors' as if it were a wrong number ("says n_embd
    # '32', but the weights have 32")
    for key in ("vocab_size", "n_positions", "n_embd", "n_layer"):
        if key in d and not (is_int(d[key]) and d[key] > 0):
            raise UserError(f"{cfg_json}: {key} must be a positive integer, got {d[key]!r}")
    if "n_head" in d:  # (null too: transformers' GPT2Config refuses it, and its attention could not divide by it)
        head_count(d["n_head"], "n_head", n_embd, cfg_json)
    for key, have in (("vocab_size", vocab), ("n_positions", ctx), ("n_embd", n_embd), ("n_layer", n_layer)):
        if key in d and d[key] != have:
            raise UserError(f"{cfg_json} says {key} {d[key]!r}, but the weights have {have}")
    for key, (allowed, default) in _HF_MUST.items():
        if d.get(key, default) not in tuple(allowed):  # (a tuple: a list or object there is refused, not unhashable)
            raise UserError(f"{cfg_json} has {key} {d[key]!r}; this model computes {default!r} only")
    for key, want in _HF_FLAGS.items():
        if config_flag(d, key, want, cfg_json, "gpt2") != want:
            raise UserError(f"{cfg_json} has {key} {d[key]!r}; this model computes {want!r} only")
    return d


def is_hf_file(path) -> bool:
    """A .safetensors file not written by tritongpt (ours carry format=tritongpt and the config)."""
    from tritongpt.model.gpt import safetensors_metadata

    meta = safetensors_metadata(path)
    return meta.get("format") != "tritongpt" or "config" not in meta


def is_hf_weights(path) -> bool:
    """A Hugging Face weights file (a shard index, a pytorch_model.bin, or a .safetensors tritongpt did not write)."""
    return is_shard_index(path) or is_torch_bin(path) or str(path).endswith(".safetensors") and is_hf_file(path)


def load_checkpoint(path, model_name: str | None = None, merge: bool = True, quantized_ok: bool = False) -> GPTModel:
    """A tritongpt checkpoint (file, checkpoint folder or run folder: its newest) or a Hugging Face GPT-2, GPT-Neo,
    GPT-BigCode, Llama (Mistral, Ministral, Qwen2, Qwen3, ERNIE 4.5, Seed-OSS, Helium), GLM-4, Gemma, OLMo, EXAONE
    4, GPT-NeoX, Phi-1/1.5/2, Phi-3, StableLM, GPT-J, Falcon, BLOOM, MPT, Cohere (Cohere2), Granite (GraniteMoe),
    Arcee, Nemotron, StarCoder2 or mixture-of-experts (Mixtral, Qwen3-MoE, OLMoE) model.safetensors, shard index or
    pytorch_model.bin, or a GGUF file (llama.cpp's .gguf: gguf_import.py) (model_name: the preset, when no
    config.json says the heads).
    A LoRA checkpoint comes merged unless merge is False, and so does a peft adapter folder: its
    base with the update (load_peft_adapter). quantized_ok: an int8 or int4 file (`tritongpt quantize`) loads, for the
    commands that only run a model; elsewhere it is refused by name (GPTModel.load)."""
    from tritongpt.train.common import resolve_checkpoint

    path = resolve_checkpoint(path)
    model = _load_checkpoint(path, model_name, merge, quantized_ok)
    if model_name is not None:  # every kind carries its sizes (ours, a config.json, an adapter's base): a --model
        named, cfg = get_config(model_name), model.config  # that differs is only noted, never silently ignored
        shape = ("n_layer", "n_head", "n_embd")
        if any(getattr(named, k) != getattr(cfg, k) for k in shape):
            note(f"{path} holds a model of " + ", ".join(f"{k} {getattr(cfg, k)}" for k in shape) +
                 f" (its saved config, used), not {model_name}'s")
    return model


def _load_checkpoint(path, model_name, merge, quantized_ok) -> GPTModel:
    """load_checkpoint's model from a resolved path, by the kind of file it is."""
    if adapter_folder(path) is not None:
        return load_peft_adapter(adapter_folder(path))
    if str(path).endswith(".gguf"):  # llama.cpp's single file (gguf_import.py)
        from tritongpt.train.gguf_import import load_gguf

        # its Q8_0 / Q4_0 / Q4_1 / Q4_K / Q6_K linears kept so for the commands that run a model; the float model it
        # stands for (dequantized, as before) for those that take float weights: trainers, export, merge
        return load_gguf(path, quantized=quantized_ok)
    if is_hf_weights(path):
        cfg_json = Path(path).parent / "config.json"
        # each family's is_*_file looks model_type up in its own table: a list or object there would be a TypeError
        if cfg_json.is_file() and not isinstance(kind := read_json_object(cfg_json).get("model_type", ""), str):
            raise UserError(f"{cfg_json}: model_type must be a string (the model family, as 'llama'), got "
                            f"{type(kind).__name__} {kind!r}")
        if _CLASSIFIER.get() is None and (name := classifier_name(path)) is not None:
            raise UserError(f"{path} is {name if name.startswith('a ') else 'a ' + name} (a reward model or "
                            "classifier: a score head, no LM head), not a causal LM: a reward model is "
                            "`rlhf --reward`'s (or `reward --init`'s, to train it on; in Python, "
                            "tritongpt.train.reward.RewardModel.load)")
        from tritongpt.train.arcee_weights import is_arcee_file, load_arcee_safetensors
        from tritongpt.train.bloom_weights import is_bloom_file, load_bloom_safetensors
        from tritongpt.train.cohere_weights import is_cohere_file, load_cohere_safetensors
        from tritongpt.train.exaone4_weights import is_exaone4_file, load_exaone4_safetensors
        from tritongpt.train.falcon_weights import is_falcon_file, load_falcon_safetensors
        from tritongpt.train.gemma_weights import is_gemma_file, load_gemma_safetensors
        from tritongpt.train.gpt_bigcode_weights import is_gpt_bigcode_file, load_gpt_bigcode_safetensors
        from tritongpt.train.gpt_neo_weights import is_gpt_neo_file, load_gpt_neo_safetensors
        from tritongpt.train.gpt_oss_weights import is_gpt_oss_file, load_gpt_oss_safetensors
        from tritongpt.train.gptj_weights import is_gptj_file, load_gptj_safetensors
        from tritongpt.train.granite_weights import is_granite_file, load_granite_safetensors
        from tritongpt.train.llama_weights import is_llama_file, load_llama_safetensors
        from tritongpt.train.llama_kin_weights import is_kin_file, load_kin_safetensors
        from tritongpt.train.glm4_weights import is_glm4_file, load_glm4_safetensors
        from tritongpt.train.moe_weights import is_moe_file, load_moe_safetensors
        from tritongpt.train.mpt_weights import is_mpt_file, load_mpt_safetensors
        from tritongpt.train.neox_weights import is_neox_file, load_neox_safetensors
        from tritongpt.train.olmo_weights import is_olmo_file, load_olmo_safetensors
        from tritongpt.train.phi3_weights import is_phi3_file, load_phi3_safetensors
        from tritongpt.train.phi_weights import is_phi_file, load_phi_safetensors
        from tritongpt.train.nemotron_weights import is_nemotron_file, load_nemotron_safetensors
        from tritongpt.train.stablelm_weights import is_stablelm_file, load_stablelm_safetensors
        from tritongpt.train.starcoder2_weights import is_starcoder2_file, load_starcoder2_safetensors

        if is_gpt_neo_file(path):
            return load_gpt_neo_safetensors(path, model_name)
        if is_gpt_bigcode_file(path):
            return load_gpt_bigcode_safetensors(path)
        if is_gemma_file(path):
            return _inference_only(load_gemma_safetensors(path), path, quantized_ok)
        if is_olmo_file(path):
            return load_olmo_safetensors(path)
        if is_exaone4_file(path):
            return load_exaone4_safetensors(path)
        if is_neox_file(path):
            return _inference_only(load_neox_safetensors(path), path, quantized_ok)
        if is_phi3_file(path):
            return _inference_only(load_phi3_safetensors(path), path, quantized_ok)
        if is_gptj_file(path):
            return load_gptj_safetensors(path)
        if is_falcon_file(path):
            return _inference_only(load_falcon_safetensors(path), path, quantized_ok)
        if is_bloom_file(path):
            return load_bloom_safetensors(path)
        if is_mpt_file(path):
            return load_mpt_safetensors(path)
        if is_cohere_file(path):
            return load_cohere_safetensors(path)
        if is_granite_file(path):
            return load_granite_safetensors(path)
        if is_arcee_file(path):
            return load_arcee_safetensors(path)
        if is_nemotron_file(path):
            return load_nemotron_safetensors(path)
        if is_starcoder2_file(path):
            return load_starcoder2_safetensors(path)
        if is_phi_file(path):
            return load_phi_safetensors(path)
        if is_stablelm_file(path):
            return load_stablelm_safetensors(path)
        if is_gpt_oss_file(path):  # before the other MoE families: its tensors have their layers' names
            # its MXFP4 experts kept for the commands that run a model, dequantized for the rest (as a GGUF's)
            return load_gpt_oss_safetensors(path, quantized=quantized_ok)
        if is_moe_file(path):
            return load_moe_safetensors(path)
        if is_glm4_file(path):
            return load_glm4_safetensors(path)
        if is_kin_file(path):  # ERNIE 4.5, Seed-OSS, Helium: Llamas under model_types of their own
            return load_kin_safetensors(path)
        if is_llama_file(path):
            return _inference_only(load_llama_safetensors(path), path, quantized_ok)
        return load_gpt2_safetensors(path, model_name)
    model = GPTModel.load(path, quantized_ok=quantized_ok)
    # used, not trained on: the plain model its LoRA update makes; a QLoRA checkpoint's (model/quant.py) runs its
    # updates beside the quantized matrices instead (merged, it would be a float model again: merge_lora)
    if model.config.lora_rank and merge and not getattr(model, "quantized", None):
        from tritongpt.model.lora import merge_lora

        merge_lora(model)
    return model


def _inference_only(model: GPTModel, path, quantized_ok: bool) -> GPTModel:
    """model, unless it is a GPTQ or AWQ folder read as int4 or int8 (hf_quant.py) where quantized_ok is not given:
    refused by name, as GPTModel.load refuses an int4 file of ours (export, merge and full fine-tuning take float
    weights; a trainer's --init with --lora-rank passes quantized_ok: sft.load_init_base)."""
    if getattr(model, "quantized", None) and not quantized_ok:
        q = hf_quantization(Path(path).parent / "config.json")
        raise UserError(f"{path} is {q['quant_method'].upper()}-quantized ({q['_where']}), read as {model.quantized} "
                        "for inference: generate, chat, serve, eval, hellaswag and lambada run it, and sft, dpo, kto, "
                        "reward and rlhf with --lora-rank train LoRA updates on it as their --init (QLoRA on its own "
                        "quantization); full fine-tuning, export and merge take the float weights it was quantized "
                        "from")
    return model


def _our_tensors(sd: dict, cfg: GPTConfig) -> dict:
    """Hugging Face GPT-2 tensors under our parameter names (KeyError: a tensor the file lacks)."""
    C = cfg.n_embd
    ours = {"tok_emb.weight": sd["wte.weight"], "pos_emb.weight": sd["wpe.weight"],
            "final_norm.weight": sd["ln_f.weight"], "final_norm.bias": sd["ln_f.bias"]}
    if not cfg.tie_weights:
        ours["out_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        h, b = f"h.{i}.", f"trf_blocks.{i}."
        qkv_w, qkv_b = sd[h + "attn.c_attn.weight"], sd[h + "attn.c_attn.bias"]  # [C, 3C], [3C]
        for j, name in enumerate(("W_query", "W_key", "W_value")):
            ours[b + f"att.{name}.weight"] = qkv_w[:, j * C:(j + 1) * C].t()
            ours[b + f"att.{name}.bias"] = qkv_b[j * C:(j + 1) * C]
        ours[b + "att.out_proj.weight"] = sd[h + "attn.c_proj.weight"].t()
        ours[b + "att.out_proj.bias"] = sd[h + "attn.c_proj.bias"]
        ours[b + "ff.fc1.weight"] = sd[h + "mlp.c_fc.weight"].t()
        ours[b + "ff.fc1.bias"] = sd[h + "mlp.c_fc.bias"]
        ours[b + "ff.fc2.weight"] = sd[h + "mlp.c_proj.weight"].t()
        ours[b + "ff.fc2.bias"] = sd[h + "mlp.c_proj.bias"]
        for ln_hf, ln_ours in (("ln_1", "norm1"), ("ln_2", "norm2")):
            ours[b + f"{ln_ours}.weight"] = sd[h + f"{ln_hf}.weight"]
            ours[b + f"{ln_ours}.bias"] = sd[h + f"{ln_hf}.bias"]
    return ours


def load_gpt2_safetensors(path, model_name: str | None = None) -> GPTModel:
    """GPTModel with the weights of a Hugging Face GPT-2 model.safetensors."""
    path = weights_file(path, "GPT-2")
    if (path.parent / "config.json").is_file():
        _gpt2_config_json(path.parent / "config.json")
    sd = _read_tensors(path)
    cfg = _infer_config(sd, path, model_name)
    return model_with_tensors(cfg, lambda: _our_tensors(sd, cfg), path)


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def model_with_tensors(cfg: GPTConfig, mapping, path, build=None) -> GPTModel:
    """GPTModel(cfg) holding mapping()'s tensors (our parameter names -> a file's tensors; a
    KeyError names the tensor the file lacks): every parameter filled, each of its own shape
    (built empty: no random init to overwrite; a parameter the mapping leaves out is refused).
    build: makes the empty model instead of GPTModel.empty (hf_quant.py's, its int4 layers filled first)."""
    model = GPTModel.empty(cfg) if build is None else build(cfg)
    try:
        ours = mapping()
    except KeyError as e:  # the first tensor the mapping asked for and the file lacks
        raise UserError(f"{path}: missing tensor(s) {[e.args[0]]}") from None
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in ours.items():
            # copy_ would cast anything: integer or bool codes (a GPTQ / bitsandbytes file's), complex values, or
            # FP8 weights without the scales beside them, each a wrong model without a word
            if value.dtype not in _FLOAT_DTYPES:
                raise UserError(f"{path}: tensor for {name} is {str(value.dtype).removeprefix('torch.')}, not a float "
                                "weight (float32, float16, bfloat16 or float64): a quantized or damaged file")
            if params[name].shape != value.shape:
                raise UserError(f"{path}: tensor for {name} has shape {tuple(value.shape)}, "
                                f"expected {tuple(params[name].shape)}")
            params[name].copy_(value)
    missing = set(params) - set(ours) - ({"out_head.weight"} if cfg.tie_weights else set())
    if missing:
        raise UserError(f"{path}: no weights for {sorted(missing)[:3]}")
    check_finite_weights(model, path)
    return model


_PASS_A_FILE = "download the weights elsewhere and pass their path (--weights for generate, --init " \
               "for the trainers)"


def load_gpt2_pretrained(name: str = "gpt2-small", cache_dir=None) -> GPTModel:
    """Download (or take from the local Hub cache) OpenAI's GPT-2 weights by name."""
    if name not in HUB_REPOS:
        raise UserError(f"unknown GPT-2 model {name!r}; choose one of: {', '.join(HUB_REPOS)}")
    return load_gpt2_safetensors(hub_download(HUB_REPOS[name], ("config.json",), cache_dir), name)


# the Hub's 404 for a file the repo does not have, by class name: huggingface_hub < 1.0 raises EntryNotFoundError,
# >= 1.0 RemoteEntryNotFoundError (an EntryNotFoundError too, as LocalEntryNotFoundError is: a file not in the
# cache when offline, which must not read as "the repo has no such file", so no isinstance)
_NO_SUCH_FILE = ("EntryNotFoundError", "RemoteEntryNotFoundError")


def hub_download(repo: str, optional=(), cache_dir=None, cached_only=False) -> str:
    """repo's weights from the Hugging Face Hub (or the local Hub cache): the first of WEIGHT_FILES it has
    (model.safetensors, its shard index, pytorch_model.bin, that one's index; an index with every shard it
    names), and beside them whichever `optional` files it has (config.json, tokenizer files). cached_only: the
    Hub is known to be unreachable, the local cache's files alone are read (hf_hub_download's local_files_only).
    -> the weights' path (the index, for shards)."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise UserError("downloading weights needs huggingface_hub (pip install huggingface_hub); "
                        f"or {_PASS_A_FILE}") from None

    def fetch(name):
        # (unreachable, hf_hub_download retries ~24 s for every file that is not in the cache: each optional
        # file the repo lacks; cached_only answers those at once)
        return hf_hub_download(repo, name, cache_dir=cache_dir, **({"local_files_only": True} if cached_only else {}))

    try:
        for name in WEIGHT_FILES:
            try:
                path = fetch(name)
                break
            except Exception as e:
                if type(e).__name__ not in _NO_SUCH_FILE or name == WEIGHT_FILES[-1]:
                    raise  # offline, gated, ...; or (the Hub's 404) the repo has none of them
        if is_shard_index(path):
            for name in sorted(set(_weight_map(path).values())):
                fetch(name)
        got = set()
        for name in optional:
            if name == "tokenizer.model" and "tokenizer.json" in got:
                continue  # SentencePiece's, read only where a repo has no tokenizer.json (Gemma's: 4 MB unused)
            try:
                fetch(name)
                got.add(name)
            except Exception:
                pass
    except Exception as e:
        if type(e).__name__ in _NO_SUCH_FILE:  # the repo is there, its weights are in neither form
            raise UserError(f"{repo} has none of {', '.join(WEIGHT_FILES)}; {_PASS_A_FILE}") from None
        if isinstance(e, UserError):
            raise
        raise hub_error(repo, e, _PASS_A_FILE) from None
    return path


def hub_error(repo: str, e: Exception, remedy: str, dataset: bool = False) -> UserError:
    """What huggingface_hub raised while fetching a model's (or a dataset's) files, as the UserError to show. Its
    errors are told apart by class name (as hub_download reads them): a gated repo (Gemma's, Llama's: terms to
    accept, a token to send; GatedRepoError subclasses RepositoryNotFoundError: checked first), a repo the Hub
    does not know (or will not show without a token), or anything else (offline, mostly)."""
    names = {c.__name__ for c in type(e).__mro__}
    what, url = (f"the dataset {repo}", f"https://huggingface.co/datasets/{repo}") if dataset else \
        (repo, f"https://huggingface.co/{repo}")
    if "GatedRepoError" in names:
        return UserError(f"{what} is gated on the Hugging Face Hub: accept its terms on {url}, then log in "
                         f"(`hf auth login`) or set HF_TOKEN; or {remedy}")
    if "RepositoryNotFoundError" in names:
        return UserError(f"there is no {'dataset' if dataset else 'model'} {repo} on the Hugging Face Hub (or it is "
                         "private: log in, or set HF_TOKEN)")
    return UserError(f"could not fetch {what} from the Hugging Face Hub (offline?): {type(e).__name__}; {remedy}")


# what a Hub repo named where a checkpoint goes brings beside its weights: the model's config and
# tokenizer files (GPT-2's, a Llama's tokenizer.json, or SentencePiece's tokenizer.model, read where the
# repo has no tokenizer.json) and its chat template (in tokenizer_config.json, or a file of its own
# since transformers 4.43, its tool_use one beside it: what a chat with tools renders in), each fetched when the
# repo has it. The named templates are those the Hub lists (hub_templates); tool_use's name stands in for them
# where it cannot list them
TEMPLATE_DIR = "additional_chat_templates"
HUB_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
             "chat_template.jinja", "chat_template.json", f"{TEMPLATE_DIR}/tool_use.jinja")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_repo(spec) -> bool:
    """owner/name given for a checkpoint (--init, --weights) that is no path here: a Hub repo id.
    Not when `owner` is a folder here (runs/sft2 mistyped is a path, not a repo to ask the Hub for)."""
    return isinstance(spec, str) and _REPO_ID.fullmatch(spec) is not None and not Path(spec).expanduser().exists() \
        and not Path(spec).expanduser().parent.is_dir()


# huggingface_hub's errors where the Hub cannot be reached at all, by class name (as hub_error reads them): httpx's
# network errors and timeouts, requests' (older huggingface_hub), HF_HUB_OFFLINE's OfflineModeIsEnabled (a
# ConnectionError); not an HTTP answer (a 404, a gated repo), which says the Hub is there
_UNREACHABLE = {"ConnectionError", "NetworkError", "TimeoutException", "Timeout"}


def hub_templates(repo: str):
    """The repo's named chat templates, additional_chat_templates/<name>.jinja (any name: "rag" as well as
    "tool_use"), as the Hub lists that folder, not recursively, at the revision hf_hub_download fetches (the
    default branch): what transformers' list_repo_templates asks it. -> (those files, or None where the Hub does
    not list them (an older huggingface_hub, a repo without the folder, a gated or unknown one): the fixed name in
    HUB_FILES is then asked for, as before; unreachable: True where the Hub could not be reached at all (offline),
    after huggingface_hub's own retries (~24 s with no network), so that the fetch reads the cache alone and does
    not wait as long again for each file the cache does not hold (a cached folder keeps every template it fetched
    before, listed or not))."""
    try:
        from huggingface_hub import list_repo_tree

        # (a generator: the request is made, and fails, while it is read, so inside the try)
        return tuple(e.path for e in list_repo_tree(repo, path_in_repo=TEMPLATE_DIR, recursive=False)
                     if e.path.endswith(".jinja")), False
    except Exception as e:  # (a gated or unknown repo too: hub_download's fetch of the weights names that)
        return None, bool(_UNREACHABLE & {c.__name__ for c in type(e).__mro__})


def hub_folder(repo: str, cache_dir=None) -> Path:
    """A Hugging Face Hub repo's model.safetensors with its config and tokenizer files (HUB_FILES, with the named
    chat templates the Hub lists: hub_templates), fetched or taken from the local Hub cache: -> the snapshot
    folder, which load_checkpoint reads (GPT-2, GPT-Neo, Llama, Mistral, Qwen2 or Qwen3, by its config.json) and
    where the tokenizer is found."""
    named, unreachable = hub_templates(repo)
    files = HUB_FILES if named is None else \
        tuple(f for f in HUB_FILES if not f.startswith(f"{TEMPLATE_DIR}/")) + named
    try:
        path = hub_download(repo, files, cache_dir, cached_only=unreachable)
    except UserError as e:
        raise UserError(f"{repo!r} is no file or folder here, and as a Hugging Face Hub repo: {e}") from None
    note(f"{repo}: the Hugging Face Hub's files, in {Path(path).parent}")
    return Path(path).parent


def load_pretrained(name: str, cache_dir=None) -> GPTModel:
    """Published weights by name: GPT-2's (HUB_REPOS) or GPT-Neo's (gpt_neo_weights.HUB_REPOS)."""
    from tritongpt.train import gpt_neo_weights

    if name in gpt_neo_weights.HUB_REPOS:
        return gpt_neo_weights.load_gpt_neo_pretrained(name, cache_dir)
    return load_gpt2_pretrained(name, cache_dir)


# -- export: the inverse of _our_tensors ---------------------------------------------------------
def _hf_tensors(model: GPTModel) -> dict:
    """Our parameters under Hugging Face GPT-2 names (GPT2LMHeadModel.save_pretrained's:
    "transformer." prefix). A model without biases gets zero biases (the same function, in
    the one layout GPT-2 has); padding rows of the vocabulary are dropped (never a token)."""
    cfg = model.config
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    V = cfg.vocab_size
    emb = sd["tok_emb.weight"]

    def bias(name, n):
        b = sd.get(name)
        return b if b is not None else torch.zeros(n, dtype=emb.dtype, device=emb.device)

    hf = {"wte.weight": emb[:V], "wpe.weight": sd["pos_emb.weight"],
          "ln_f.weight": sd["final_norm.weight"], "ln_f.bias": sd["final_norm.bias"]}
    C = cfg.n_embd
    for i in range(cfg.n_layer):
        b, h = f"trf_blocks.{i}.", f"h.{i}."
        att = [b + f"att.{n}" for n in ("W_query", "W_key", "W_value")]
        hf[h + "attn.c_attn.weight"] = torch.cat([sd[a + ".weight"].t() for a in att], dim=1)  # [C, 3C]
        hf[h + "attn.c_attn.bias"] = torch.cat([bias(a + ".bias", C) for a in att])
        for ours, theirs, n_out in (("att.out_proj", "attn.c_proj", C), ("ff.fc1", "mlp.c_fc", 4 * C),
                                    ("ff.fc2", "mlp.c_proj", C)):
            hf[h + theirs + ".weight"] = sd[b + ours + ".weight"].t()
            hf[h + theirs + ".bias"] = bias(b + ours + ".bias", n_out)
        for ln_ours, ln_hf in (("norm1", "ln_1"), ("norm2", "ln_2")):
            hf[h + ln_hf + ".weight"] = sd[b + ln_ours + ".weight"]
            hf[h + ln_hf + ".bias"] = sd[b + ln_ours + ".bias"]
    out = {"transformer." + k: v for k, v in hf.items()}
    if not cfg.tie_weights:
        out["lm_head.weight"] = sd["out_head.weight"][:V]
    # safetensors stores each tensor whole and alone, on the CPU: no views of one another, no strides
    return {k: v.to("cpu", memory_format=torch.contiguous_format, copy=True) for k, v in out.items()}


def hf_config(cfg: GPTConfig, eos_token_id: int | None = None) -> dict:
    """GPT2Config fields (config.json) for this model; what _HF_MUST and _HF_FLAGS check on the way in."""
    d = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
         "n_positions": cfg.context_length, "n_ctx": cfg.context_length, "n_embd": cfg.n_embd,
         "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
         "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
         "tie_word_embeddings": cfg.tie_weights}
    d.update({k: default for k, (_, default) in _HF_MUST.items()}, **_HF_FLAGS)
    # GPT2Config would otherwise say 50256, GPT-2's <|endoftext|>, whatever the tokenizer
    d.update(bos_token_id=eos_token_id, eos_token_id=eos_token_id)
    return d


def refuse_not_gpt2(model: GPTModel, what: str) -> None:
    """Hugging Face's GPT-2 has no logit soft cap, no local attention, no RoPE (it learns its
    position embeddings, wpe), no grouped-query attention, no RMSNorm (its ln_1, ln_2 and ln_f are
    LayerNorms), no SwiGLU MLP and scales its scores by 1/sqrt(head_dim):
    with the weights alone it would give other logits (or, for fewer KV heads, not load). (q/k/v
    without biases it can be: zero ones.)"""
    cfg = model.config
    refuse_moe_touches(cfg, "GPT-2", what)
    if cfg.position_encoding != "learned":
        raise UserError(f"this model {cfg.positions_said()}, where Hugging Face's GPT-2 learns position embeddings: "
                        f"it cannot be exported as {what}")
    if cfg.norm != "layernorm":
        raise UserError(f"this model normalizes with {cfg.norm} (GPTConfig.norm), where Hugging Face's GPT-2 has "
                        f"LayerNorms: it cannot be exported as {what}")
    if cfg.logit_softcap:
        raise UserError(f"this model soft-caps its logits (logit_softcap {cfg.logit_softcap:g}), which "
                        f"Hugging Face's GPT-2 does not: it cannot be exported as {what}")
    if not cfg.scale_attention:
        raise UserError("this model does not scale its attention scores by 1/sqrt(head_dim) (scale_attention "
                        f"False), which Hugging Face's GPT-2 does: it cannot be exported as {what}")
    if cfg.attention_window:
        raise UserError(f"this model has local attention (attention_window {cfg.attention_window}, "
                        f"window_layers {cfg.window_layers}), which Hugging Face's GPT-2 does not: "
                        f"it cannot be exported as {what} (nor as GPT-Neo, whose local attention comes with "
                        "unscaled scores: scale_attention False)")
    if cfg.kv_heads < cfg.n_head:
        raise UserError(f"this model has grouped-query attention (n_kv_head {cfg.n_kv_head} key/value heads for "
                        f"{cfg.n_head} query heads), which Hugging Face's GPT-2 does not: it cannot be exported "
                        f"as {what}")
    if cfg.norm_eps != 1e-5:
        raise UserError(f"this model's norms add eps {cfg.norm_eps:g} (GPTConfig.norm_eps), where Hugging Face's "
                        f"GPT-2 adds 1e-05: it cannot be exported as {what}")
    if cfg.mlp != "gelu":
        raise UserError(f"this model has a SwiGLU MLP (mlp {cfg.mlp}: w_gate, w_up, w_down, hidden {cfg.ff_hidden}), "
                        f"where Hugging Face's GPT-2 has GELU's c_fc and c_proj: it cannot be exported as {what}")
    refuse_other_heads(cfg, "GPT-2", what)


def refuse_other_heads(cfg: GPTConfig, family: str, what: str) -> None:
    """GPT-2's and GPT-Neo's heads are n_embd / n_head wide, and their q and k go to the scores as
    projected: a Qwen3-style model (its own head width, q/k norms) is refused by name."""
    if cfg.n_head * cfg.head_dim != cfg.n_embd:
        raise UserError(f"this model's heads are {cfg.head_dim} wide (attention_head_dim; {cfg.n_head} of them over "
                        f"n_embd {cfg.n_embd}), where Hugging Face's {family} has n_embd / n_head: it cannot be "
                        f"exported as {what}")
    if cfg.qk_norm:
        raise UserError(f"this model normalizes each head's q and k (qk_norm), which Hugging Face's {family} does not: "
                        f"it cannot be exported as {what}")
    refuse_gemma_touches(cfg, family, what)


def refuse_gemma_touches(cfg: GPTConfig, family: str, what: str, layer_types: bool = False,
                         exact_gelu: bool = False) -> None:
    """Gemma's scaled embeddings, sandwich norms, attention soft cap and scale width, and (unless the family's
    config has layer_types: Qwen2's, Qwen3's, SmolLM3's) local layers other than all or the odd ones, which the
    other families' folders cannot say: refused by name (OLMo's touches first). (SmolLM3's NoPE layers need
    RoPE, which GPT-2 and GPT-Neo refuse first; a Llama-shaped model with them is written as a SmolLM3.)
    exact_gelu: the family's folder says the exact GELU too (StarCoder2's and GPT-BigCode's hidden_act "gelu")."""
    refuse_olmo_touches(cfg, family, what, exact_gelu)
    for differs, why in ((cfg.scale_embeddings, "scales its token embeddings by sqrt(n_embd) (scale_embeddings)"),
                         (cfg.post_norms, "normalizes each sublayer's output too (post_norms: Gemma's sandwich "
                          "norms)"),
                         (bool(cfg.attention_window) and cfg.window_layers not in ("all", "odd") and not layer_types,
                          f"has local attention in layers {cfg.window_layers} only"),
                         (bool(cfg.attn_softcap), f"soft-caps its attention scores at {cfg.attn_softcap:g} "
                          "(attn_softcap)"),
                         (bool(cfg.attention_scale_width), f"scales its attention scores by "
                          f"1/sqrt({cfg.attention_scale_width}), not 1/sqrt(head_dim) (attention_scale_width)")):
        if differs:
            raise UserError(f"this model {why}, which Hugging Face's {family} does not: it cannot be exported as "
                            f"{what} (a Gemma folder may take it)")


def refuse_olmo_touches(cfg: GPTConfig, family: str, what: str, exact_gelu: bool = False) -> None:
    """OLMo 2's and 3's blocks without input norms and q/k norms over the whole projection, which no other
    family's folder can say: refused by name (GPT-NeoX's touches first)."""
    refuse_neox_touches(cfg, family, what, exact_gelu)
    for differs, why, takers in ((not cfg.pre_norms, "does not normalize each sublayer's input (pre_norms False: "
                                  "OLMo 2's and EXAONE 4's blocks)", "an OLMo or EXAONE 4"),
                                 (cfg.qk_norm and cfg.qk_norm_width == "all", "normalizes q and k over all their "
                                  "heads at once (qk_norm_width 'all')", "an OLMo")):
        if differs:
            raise UserError(f"this model {why}, which Hugging Face's {family} does not: it cannot be exported as "
                            f"{what} ({takers} folder may take it)")


def refuse_neox_touches(cfg: GPTConfig, family: str, what: str, exact_gelu: bool = False) -> None:
    """GPT-NeoX's parallel blocks and exact GELU, which no other family's folder can say (but those whose config
    names the exact GELU too: exact_gelu): refused by name (Phi's touches first)."""
    refuse_phi_touches(cfg, family, what)
    for differs, why in ((cfg.parallel_residual, "runs attention and MLP side by side on each block's input "
                          "(parallel_residual: GPT-NeoX's blocks)"),
                         (cfg.gelu_approximate != "tanh" and not exact_gelu, "computes the exact GELU "
                          f"(gelu_approximate {cfg.gelu_approximate!r}), not the tanh one")):
        if differs:
            raise UserError(f"this model {why}, which Hugging Face's {family} does not: it cannot be exported as "
                            f"{what} (a GPT-NeoX folder may take it)")


def refuse_phi_touches(cfg: GPTConfig, family: str, what: str) -> None:
    """Phi-1/1.5/2's one norm for both sublayers of a parallel block and bias on the LM head, which no other
    family's folder this model writes can say: refused by name."""
    for differs, why, takers in ((cfg.shared_norm, "reads one norm's output in both sublayers of its parallel blocks "
                                  "(shared_norm: Phi's, GPT-J's, Falcon-7B's and Cohere's blocks)",
                                  "Phi, GPT-J, Falcon or Cohere"),
                                 (cfg.head_bias, "has a bias on its LM head (head_bias)", "Phi or GPT-J")):
        if differs:
            raise UserError(f"this model {why}, which Hugging Face's {family} does not: it cannot be exported as "
                            f"{what} (a {takers} folder may take it)")


def per_head_qkv_rows(n_head: int, head_dim: int) -> tuple:
    """Index tensors of a fused query_key_value's q, k and v rows when it is laid out per head, [H, 3, D] (each
    head's q, k, v rows together: BLOOM's, Falcon's old architecture with a key/value head each, GPT-NeoX's)."""
    rows = torch.arange(3 * n_head * head_dim).reshape(n_head, 3, head_dim)
    return rows[:, 0].reshape(-1), rows[:, 1].reshape(-1), rows[:, 2].reshape(-1)


def check_fused_rows(sd: dict, name: str, n_layer: int, rows: int, need: str, folder) -> None:
    """Refuse by name a fused query_key_value whose weight or bias (name: its tensors' name with {i} for the layer)
    has not `rows` rows (need: what those rows are, for the message). Its q, k and v are taken by index
    (per_head_qkv_rows' or another): extra rows would be dropped without a word, too few an IndexError; every layer's
    checked, a 4-bit folder's too (its meta weight's shape, int4_linears')."""
    for i in range(n_layer):
        for kind in ("weight", "bias"):
            t = sd.get(f"{name.format(i=i)}.{kind}")
            if t is not None and t.shape[0] != rows:
                raise UserError(f"{folder}: tensor {name.format(i=i)}.{kind} has {t.shape[0]} rows; {need} need {rows}")


def fuse_rows(parts, rows) -> torch.Tensor:
    """The fused tensor a split by rows came from (per_head_qkv_rows' or another): parts[i] (a weight or a
    bias) written at rows[i]; what a fused query_key_value's export writes."""
    fused = parts[0].new_empty((sum(p.shape[0] for p in parts), *parts[0].shape[1:]))
    for part, r in zip(parts, rows):
        fused[r] = part
    return fused


def plain_block_refusals(cfg: GPTConfig, family: str) -> tuple:
    """(differs, why) rows for what the GPT-2-like RoPE families (GPT-NeoX, Phi, GPT-J, Falcon) all lack, in their
    refuse_not_* tables: heads n_embd / n_head wide, scores scaled by 1/sqrt(head_dim) and uncapped over the whole
    context, RoPE in every layer with one base, norms before the sublayers only, plain embeddings and logits."""
    return ((not cfg.scale_attention, f"does not scale its attention scores, which {family} does"),
            (cfg.head_dim * cfg.n_head != cfg.n_embd, f"has heads of {cfg.head_dim} (attention_head_dim), where "
             f"{family}'s are n_embd / n_head wide"),
            (bool(cfg.attention_window), f"has local attention (attention_window {cfg.attention_window}), where "
             f"{family} attends to the whole context"),
            (cfg.nope_layers != "", f"has layers without RoPE ({cfg.nope_layers}), which {family} does not"),
            (bool(cfg.rope_local_theta), "rotates its local layers with a RoPE base of their own"),
            (cfg.post_norms or not cfg.pre_norms, "normalizes each sublayer's output (post_norms) or not its input "
             f"(pre_norms False), which {family} does not"),
            (cfg.scale_embeddings, f"scales its token embeddings, which {family} does not"),
            (bool(cfg.logit_softcap), f"soft-caps its logits, which {family} does not"),
            (bool(cfg.attn_softcap), f"soft-caps its attention scores, which {family} does not"),
            (bool(cfg.attention_scale_width), f"scales its attention scores by 1/sqrt({cfg.attention_scale_width}), "
             f"where {family} scales them by 1/sqrt(head_dim)"))


def refuse_moe_touches(cfg: GPTConfig, family: str, what: str, embed_norm: bool = False,
                       bias_free_norms: bool = False, logit_scale: bool = False, per_head_qk: bool = False,
                       mup: bool = False) -> None:
    """Mixture-of-experts MLPs (n_experts), which only a Mixtral, Qwen3-MoE, OLMoE or Qwen2-MoE folder can say:
    refused by name, before the MLP's other fields (a MoE model's gated MLP would be named a SwiGLU one otherwise). Then
    refuse_norm_touches (embed_norm, bias_free_norms, logit_scale: the family has BLOOM's embedding norm, MPT's
    and Cohere's norms, Cohere's scaled logits, per_head_qk: StableLM's and Cohere's q/k norms of each head's own)."""
    refuse_norm_touches(cfg, family, what, embed_norm, bias_free_norms, logit_scale, per_head_qk, mup)
    if cfg.n_experts:
        raise UserError(f"this model's MLPs are {cfg.n_experts} experts with a router (n_experts: a mixture of "
                        f"experts), which Hugging Face's {family} does not have: it cannot be exported as {what} (a "
                        "Mixtral, Qwen3-MoE, OLMoE or Qwen2-MoE folder may take it)")


def refuse_norm_touches(cfg: GPTConfig, family: str, what: str, embed_norm: bool = False,
                        bias_free_norms: bool = False, logit_scale: bool = False, per_head_qk: bool = False,
                        mup: bool = False) -> None:
    """BLOOM's norm on the token embeddings (embed_norm), MPT's and Cohere's LayerNorms without biases (norm_bias
    False), Cohere's scaled logits (logit_scale) and StableLM 2 12B's and Command R+'s q/k norms with weights of
    each head's own (qk_norm_width "each"), which only their folders say: refused by name (embed_norm,
    bias_free_norms, logit_scale, per_head_qk: the family has them); Granite's muP multipliers (embedding_multiplier,
    residual_multiplier, attention_multiplier) unless mup; gpt-oss's attention sinks (attention_sinks), always."""
    if not per_head_qk:
        refuse_per_head_qk(cfg, family, what)
    if cfg.attention_sinks:  # every family's export but GPT-OSS's (which writes them) reaches here: none has sinks
        raise UserError(f"this model has attention sinks (attention_sinks: gpt-oss's per-head sink logits, "
                        f"att.sinks), which Hugging Face's {family} does not: it cannot be exported as {what}")
    for differs, why, where in ((cfg.embed_norm and not embed_norm, "normalizes its token embeddings (embed_norm, "
                                 "BLOOM's word_embeddings_layernorm)", "a BLOOM"),
                                (not cfg.norm_bias and not bias_free_norms, "has LayerNorms without biases "
                                 "(norm_bias False)", "an MPT or Cohere"),
                                (cfg.logit_scale != 1.0 and not logit_scale, f"scales its logits (logit_scale "
                                 f"{cfg.logit_scale:g})", "a Cohere or Granite"),
                                ((cfg.embedding_multiplier, cfg.residual_multiplier, cfg.attention_multiplier) !=
                                 (1.0, 1.0, 0.0) and not mup, "has muP multipliers (embedding_multiplier "
                                 f"{cfg.embedding_multiplier:g}, residual_multiplier {cfg.residual_multiplier:g}, "
                                 f"attention_multiplier {cfg.attention_multiplier:g})", "a Granite")):
        if differs:
            raise UserError(f"this model {why}, which Hugging Face's {family} does not: it cannot be exported as "
                            f"{what} ({where} folder may take it)")


def refuse_per_head_qk(cfg: GPTConfig, family: str, what: str) -> None:
    """q/k norms with weights of each head's own (qk_norm_width "each": [heads, head_dim], where the other
    families' q_norm is one [head_dim] or [n_head * head_dim] weight), which only StableLM's and Cohere's folders
    say: refused by name, never written in a wrong shape."""
    if cfg.qk_norm and cfg.qk_norm_width == "each":
        raise UserError(f"this model normalizes each head's q and k with weights of that head's own (qk_norm_width "
                        f"'each'), which Hugging Face's {family} does not: it cannot be exported as {what} (a "
                        "StableLM or Cohere folder may take it)")


def refuse_phi3_touches(cfg: GPTConfig, family: str, what: str) -> None:
    """A partial rotary (rotary_dim) and LongRoPE, which a Llama-shaped model can say in a Phi-3 folder only:
    refused by name. (GPT-2 and GPT-Neo refuse RoPE itself; GPT-NeoX writes a partial rotary as rotary_pct.)"""
    for differs, why in ((bool(cfg.rotary_dim), f"rotates only {cfg.rotary_dim} of each head's {cfg.head_dim} "
                          "dimensions (rotary_dim)"),
                         ((cfg.rope_scaling or {}).get("rope_type") == "longrope", "scales RoPE by LongRoPE (its short "
                          "and long factors)")):
        if differs:
            raise UserError(f"this model {why}, which Hugging Face's {family} does not: it cannot be exported as "
                            f"{what} (a Phi-3 folder may take it)")


def export_gpt2(model: GPTModel, out_dir, eos_token_id: int | None = None, overwrite: bool = False) -> list:
    """Write model as a Hugging Face GPT-2 folder: model.safetensors and config.json, which
    transformers.GPT2LMHeadModel.from_pretrained(out_dir) and load_checkpoint both read.
    Returns the paths written; refuses to replace them unless overwrite."""
    refuse_not_gpt2(model, "a GPT-2 folder")
    return write_hf_folder(out_dir, lambda: _hf_tensors(model), hf_config(model.config, eos_token_id), overwrite)


def write_hf_folder(out_dir, tensors, config: dict, overwrite: bool = False) -> list:
    """model.safetensors (tensors(): made once the folder is known to be free) and config.json in
    out_dir, as transformers' from_pretrained reads them (GPT-2's or GPT-Neo's). -> the paths."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    paths = [out / "model.safetensors", out / "config.json"]
    if not overwrite and any(p.exists() for p in paths):
        raise UserError(f"{out} already holds a model (model.safetensors / config.json): pass --overwrite "
                        "or another folder")
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors(), str(paths[0]), metadata={"format": "pt"})  # transformers requires format=pt
    readable_like_other_files(paths[0])
    paths[1].write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return paths


# -- a LoRA run's update as a peft adapter -------------------------------------------------------
_PEFT_MODULES = {"attn": ("attn.c_attn", "attn.c_proj"), "mlp": ("mlp.c_fc", "mlp.c_proj")}
# each Hugging Face Conv1D a peft adapter may adapt, and our Linears it is, side by side (c_attn: q, k, v)
HF_LINEARS = {"attn.c_attn": ("att.W_query", "att.W_key", "att.W_value"), "attn.c_proj": ("att.out_proj",),
              "mlp.c_fc": ("ff.fc1",), "mlp.c_proj": ("ff.fc2",)}


# a Llama-family model's (Mistral's, Qwen2's, Qwen3's, SmolLM3's: one set of module names): each target's
# Hugging Face Linears, one of ours each (llama_weights._LAYER), so no update spans two of them
_PEFT_LLAMA_MODULES = {"attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
                       "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
LLAMA_FAMILIES = "Llama, Mistral, Ministral, Qwen2, Qwen3 or SmolLM3"


def peft_family(model: GPTModel) -> str:
    """The family whose transformers class a LoRA model's peft adapter is written for: the Llama-family name
    export writes it as ("Llama", "Mistral", "Ministral", "Qwen2", "Qwen3", "SmolLM3": llama_weights.export_llama's,
    one set of module names), else "GPT-2". A model neither expresses is refused by name: its adapter would put the
    update on another model's weights."""
    from tritongpt.commands import article, export_target
    from tritongpt.train import llama_weights

    cfg = model.config
    family, refuse, export = export_target(cfg)
    if export is llama_weights.export_llama:
        refuse(model, f"a peft adapter for {family}")
        return family
    # a model export writes as another family: named here (GPT-2's refusals below would name only one of its
    # touches); one of GPT-2's shape (LayerNorm, GELU) that GPT-2 still cannot say, by GPT-2's refusal
    if cfg.norm == "rmsnorm" or cfg.mlp != "gelu" or family.startswith(("OLMo", "Gemma")):
        what = f"{article(family)} {family}"
        raise UserError(f"--adapter writes a peft adapter for Hugging Face's GPT-2 or a Llama-family model "
                        f"({LLAMA_FAMILIES}), and this model is {what} (norm {cfg.norm}, mlp {cfg.mlp}): export it "
                        f"without --adapter, merged, as {what} folder")
    refuse_not_gpt2(model, "a peft adapter for GPT-2")
    return "GPT-2"


def peft_adapter(model: GPTModel, base: str) -> tuple:
    """A LoRA model's update as a peft adapter for GPT2LMHeadModel, or a Llama-family model's for its
    LlamaForCausalLM (MistralForCausalLM ...: peft_family): (adapter_model.safetensors' tensors,
    adapter_config.json's fields). `base`: the model the adapter goes on (its base_model_name_or_path), the
    frozen one this update was trained on.

    peft keeps an A [r, in] and a B [out, r] for each module and adds scale (B A)^T to a Conv1D's
    [in, out] weight (fan_in_fan_out), the scale being lora_alpha / r, as ours. Hugging Face's
    c_attn is our W_query, W_key and W_value side by side, so its update is the three stacked:
    A = [A_q; A_k; A_v] [3r, C] and B = diag(B_q, B_k, B_v) [3C, 3r], a rank-3r update with alpha
    3 alpha (rank_pattern, alpha_pattern). Exact: B's zero blocks add nothing.

    A Llama's q_proj ... down_proj are nn.Linears ([out, in], fan_in_fan_out false), one of ours each: their A
    and B are ours as they are, at the run's r and alpha.

    A QLoRA model's update (QuantLinear.lora) is written the same: A and B are the same object on a
    float base or a quantized one, and peft applies them to the float base (or its 4-bit load)."""
    from tritongpt.model.lora import lora_linears, parse_targets
    from tritongpt.model.quant import QuantLinear
    from tritongpt.train.llama_weights import _LAYER

    cfg = model.config
    llama = peft_family(model) != "GPT-2"  # (first: a model of no family written is refused as that, LoRA or not)
    if not cfg.lora_rank:
        raise UserError("the model has no LoRA update (a run trained with --lora-rank has one)")
    ups = {name: linear.lora if isinstance(linear, QuantLinear) else linear.parametrizations.weight[0]
           for name, linear in lora_linears(model)}
    targets = parse_targets(cfg.lora_targets)
    modules = [m for t in targets for m in (_PEFT_LLAMA_MODULES if llama else _PEFT_MODULES)[t]]
    linears = {theirs: (mine,) for mine, theirs in _LAYER} if llama else HF_LINEARS
    tensors = {}
    for i in range(cfg.n_layer):
        ours = f"trf_blocks.{i}."
        theirs = f"base_model.model.model.layers.{i}." if llama else f"base_model.model.transformer.h.{i}."
        for module in modules:
            parts = [ups[ours + n] for n in linears[module]]  # one, or c_attn's three
            a, b = torch.cat([u.lora_A for u in parts]), torch.block_diag(*[u.lora_B for u in parts])
            tensors[theirs + module + ".lora_A.weight"], tensors[theirs + module + ".lora_B.weight"] = a, b
    alpha = int(cfg.lora_alpha) if float(cfg.lora_alpha).is_integer() else cfg.lora_alpha
    qkv_pattern = "attn" in targets and not llama
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
              "r": cfg.lora_rank, "lora_alpha": alpha,
              # a Llama's as peft's recipes name them (q_proj ...: no other module of the model ends so)
              "target_modules": [m.rpartition(".")[2] if llama else m for m in modules],
              "rank_pattern": {"c_attn": 3 * cfg.lora_rank} if qkv_pattern else {},
              "alpha_pattern": {"c_attn": 3 * alpha} if qkv_pattern else {},
              "fan_in_fan_out": not llama, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
              "use_dora": False, "modules_to_save": None, "init_lora_weights": True, "inference_mode": True}
    tensors = {k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True) for k, v in tensors.items()}
    return tensors, config


def adapter_base(base: str | None, init: str | None, frozen: GPTModel) -> str:
    """base_model_name_or_path for an adapter whose frozen model is `frozen`: --base, else the
    run's --init. A Hugging Face folder of the adapter's family (peft_family: GPT-2's, or a Llama-family one,
    GPTQ or AWQ ones too), or a Hub model in the local cache, is compared with `frozen` tensor by tensor, and
    its heads: an adapter on another base would be a wrong model, silently. A QLoRA run's `frozen`
    (quantized matrices): the base quantized as the run did is compared with it, or, a GPTQ/AWQ folder (sft
    --lora-rank on its own quantization), the folder's matrices as they load (_check_base)."""
    family = peft_family(frozen)
    gpt2 = family == "GPT-2"
    name = base if base is not None else init
    if name is None:
        raise UserError(f"--adapter: name the model it goes on with --base (a Hugging Face {family} folder, e.g. "
                        "`tritongpt export` of the run's --init" + (", or a GPT-2 name" if gpt2 else "") +
                        "): the checkpoint has no run state saying its --init")
    flag = "--base" if base is not None else "the run's --init"
    if gpt2 and (name in HUB_REPOS or name in HUB_REPOS.values()) or not gpt2 and is_hub_repo(name):
        repo = HUB_REPOS.get(name, name)
        cached = None
        try:
            from huggingface_hub import try_to_load_from_cache
            for weights in WEIGHT_FILES[:1 if gpt2 else 2]:  # (model.safetensors, or a Llama's shards' index)
                if isinstance(found := try_to_load_from_cache(repo, weights), str):
                    cached = found
                    break
        except ImportError:
            pass
        if cached is not None:
            _check_base(Path(cached), frozen, f"{flag} {name}")
        else:
            note(f"the adapter's base {repo} is not in the local Hub cache: not compared with the run's frozen weights")
        return repo
    path = Path(name).expanduser()
    # a Hugging Face folder's weights: model.safetensors, or (a Llama's, as the Hub's larger ones come) its shards
    file = next((path / n for n in WEIGHT_FILES[:1 if gpt2 else 2] if (path / n).is_file()),
                path / "model.safetensors") if path.is_dir() else path
    adapter = adapter_folder(path) is not None  # the run's --init was an adapter, merged when loaded
    if not path.exists():
        raise UserError(f"{flag} {name}: no such Hugging Face {family} folder" +
                        (f", and not a GPT-2 name ({', '.join(HUB_REPOS)})" if gpt2 else ""))
    # a tritongpt run folder (the usual --init) holds no model.safetensors of its own: export it too
    if adapter or not file.is_file() or not (is_shard_index(file) and not gpt2 or file.suffix == ".safetensors"
                                             and is_hf_file(file)) or not (file.parent / "config.json").is_file():
        raise UserError(f"{flag} {name} is not a Hugging Face {family} folder (config.json and model.safetensors), "
                        f"which peft loads the adapter onto: export it (`tritongpt export {name} --out BASE`) "
                        "and pass --base BASE")
    _check_base(file, frozen, f"{flag} {name}")
    # in full: peft and `--weights ADAPTER` read a relative one from wherever they are run, not
    # from where the adapter was exported
    return os.path.abspath(file.parent)


def _check_base(file: Path, frozen: GPTModel, what: str):
    """A UserError naming the first tensor in which the model in `file` is not `frozen`.

    A QLoRA run's frozen model holds its matrices quantized (the float ones are not in the run):
    the base is quantized as the run quantized its --init (quantize(head=False), deterministic)
    and its quantized buffers compared with the run's bit for bit; every tensor the run keeps
    float (embeddings, norms, the LM head, the matrices' biases) is compared as a float run's. A base that
    loads quantized (a GPTQ or AWQ folder: the run's own --init, sft --lora-rank on it) is compared as it
    loads, its buffers with the run's bit for bit; a float base of a run on a .gguf file's own blocks (its export)
    with the run's matrices dequantized, exactly."""
    from tritongpt.train import llama_weights

    gpt2 = peft_family(frozen) == "GPT-2"
    if gpt2:
        base = load_gpt2_safetensors(file)
        hf_tensors = _hf_tensors
        matrices = {f"transformer.h.{i}.{m}.weight" for i in range(frozen.config.n_layer) for m in HF_LINEARS}
    else:
        base = llama_weights.load_llama_safetensors(file)  # (a GPTQ/AWQ folder's: int4 or int8, as sft loaded it)
        hf_tensors = llama_weights._hf_tensors
        matrices = {f"model.layers.{i}.{theirs}.weight" for i in range(frozen.config.n_layer)
                    for mine, theirs in llama_weights._LAYER if mine not in llama_weights._NORMS}
    # the heads (and a Llama's RoPE, eps, window...) are in config.json, not in any tensor: other heads split
    # the same weights otherwise
    if base.config.n_head != frozen.config.n_head:
        raise UserError(f"{what} is not the model this LoRA update was trained on: it has {base.config.n_head} "
                        f"heads, not {frozen.config.n_head}")
    if not gpt2:
        ids = ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings")  # (change no logit)
        theirs, ours = llama_weights.hf_config(base.config), llama_weights.hf_config(frozen.config)
        for key in (k for k in ours if k not in ids and theirs.get(k) != ours[k]):
            raise UserError(f"{what} is not the model this LoRA update was trained on: its config.json's {key} is "
                            f"{theirs.get(key)!r}, not {ours[key]!r}")
    mode, base_mode = getattr(frozen, "quantized", None), getattr(base, "quantized", None)
    if base_mode and not mode:
        raise UserError(f"{what} is not the model this LoRA update was trained on: it loads {base_mode}-quantized "
                        "(a GPTQ or AWQ folder), and the run trained on float matrices")
    # a run on a .gguf file's own blocks (sft --lora-rank on it): peft cannot put an adapter on a .gguf, so its base
    # is the file's float export, whose matrices are the run's frozen blocks dequantized exactly (gguf_import's
    # packing is bit for bit): compared as a float run's, every matrix equal, not re-quantized (round-to-nearest of
    # the dequantized blocks is not the file's own rounding)
    gguf_float = mode and not base_mode and getattr(frozen, "quantized_from", None) == "gguf"
    if gguf_float:
        from tritongpt.model.quant import dequantize_model

        matrices = set()
        theirs, ours = hf_tensors(base), hf_tensors(dequantize_model(copy.deepcopy(frozen)))
    elif mode:
        from tritongpt.model.quant import dequantize_model

        # its float tensors under Hugging Face's names (_hf_tensors reads each matrix as a weight: dequantized
        # here, only their shapes compared below; their values are compared quantized, after)
        theirs = hf_tensors(dequantize_model(copy.deepcopy(base)) if base_mode else base)
        ours = hf_tensors(dequantize_model(copy.deepcopy(frozen)))
    else:
        matrices = set()
        theirs, ours = hf_tensors(base), hf_tensors(frozen)
    extra = sorted(set(theirs) - set(ours))  # an LM head of its own where the run's is the token embedding
    if extra:
        raise UserError(f"{what} is not the model this LoRA update was trained on: it has {extra[0]}, "
                        "which the run's model has not")
    for key in ours:
        t = theirs.get(key)
        if t is None or t.shape != ours[key].shape or (key not in matrices and not torch.equal(t, ours[key])):
            how = "has no such tensor" if t is None else (
                f"has shape {tuple(t.shape)}, not {tuple(ours[key].shape)}" if t.shape != ours[key].shape
                else f"differs by up to {(t.double() - ours[key].double()).abs().max().item():.3g}")
            raise UserError(f"{what} is not the model this LoRA update was trained on: its {key} {how}")
    if mode and not gguf_float:
        hf_module = {ours: theirs for theirs, names in HF_LINEARS.items() for ours in names} if gpt2 else \
            dict(llama_weights._LAYER)
        layers = "transformer.h" if gpt2 else "model.layers"
        _check_quantized_base(base, frozen, what, lambda layer, path: f"{layers}.{layer}.{hf_module[path]}.weight")


def _check_quantized_base(base: GPTModel, frozen: GPTModel, what: str, hf_key):
    """base (float, of frozen's shapes) quantized as QLoRA's run quantized its --init, its quantized
    buffers compared with frozen's bit for bit. A weight moved by less than its quantization step
    quantizes the same: such a base is the run's frozen model exactly, all the run can tell. A base loaded
    quantized (a GPTQ or AWQ folder's own matrices) is compared as it is. hf_key(layer, our module path): the
    weight's Hugging Face name, said in the refusal."""
    from tritongpt.model.quant import QuantLinear, quantize

    group = frozen.quantized_group_size
    how = f"{frozen.quantized}" + (f", group {group}" if group else "")
    if getattr(base, "quantized", None):
        how = f"as its folder's {base.quantized} matrices load"
    else:
        try:
            quantize(base, frozen.quantized, head=False, group_size=group or 128)  # (int8's has no groups)
        except UserError as e:  # a NaN or inf matrix weight (the shapes are the run's): the run quantized none
            raise UserError(f"{what} is not the model this LoRA update was trained on: its matrices do not quantize "
                            f"as the run's ({how}): {e}") from None
        how = f"quantized as the run's ({how})"
    for name, m in frozen.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        layer, _, path = name.removeprefix("trf_blocks.").partition(".")
        key = hf_key(layer, path)
        theirs = base.get_submodule(name)
        # a step changed first: the coarser difference (then every other buffer: act-order's g_idx, a GPTQ
        # folder's own)
        names = ["scale", "offset", "qweight"] + [n for n, _ in m.named_buffers(recurse=False)
                                                 if n not in ("scale", "offset", "qweight")]
        for buf in names:
            t, o = getattr(theirs, buf, None), getattr(m, buf, None)
            if o is None:
                continue
            if not isinstance(t, torch.Tensor) or t.shape != o.shape or not torch.equal(t, o):
                n = "all" if not isinstance(t, torch.Tensor) or t.shape != o.shape else int((t != o).sum())
                raise UserError(f"{what} is not the model this LoRA update was trained on: its {key}, {how}, "
                                f"differs ({path.rpartition('.')[2]}'s {buf} in {n} of {o.numel()} places)")


def export_peft_adapter(model: GPTModel, out_dir, base: str) -> list:
    """Write model's LoRA update as a peft adapter folder (adapter_model.safetensors and
    adapter_config.json), which peft's PeftModel.from_pretrained(base model, out_dir) loads."""
    from safetensors.torch import save_file

    tensors, config = peft_adapter(model, base)  # (refuses a model of no family it writes: peft_family)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "adapter_model.safetensors", out / "adapter_config.json"]
    save_file(tensors, str(paths[0]), metadata={"format": "pt"})
    readable_like_other_files(paths[0])
    paths[1].write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return paths


# -- and back: a peft LoRA adapter for GPT-2, merged into its base ------------------------------
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def _adapter_key(layers: str, linears) -> re.Pattern:
    """A peft LoRA tensor's name: base_model.model.`layers`.i.module.lora_A|B[.default].weight."""
    return re.compile(r"base_model\.model\." + layers + r"\.(\d+)\.(" + "|".join(map(re.escape, linears)) +
                      r")\.lora_([AB])(?:\.default)?\.weight")


_ADAPTER_KEY = _adapter_key(r"(?:transformer\.)?h", HF_LINEARS)


def adapter_folder(path) -> Path | None:
    """The peft adapter folder `path` is (or whose weights file it is), else None."""
    p = Path(path)
    folder = p.parent if p.name in ADAPTER_FILES else p
    return folder if (folder / "adapter_config.json").is_file() else None


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank_pattern / alpha_pattern lookup: the first key that ends the module's name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def load_peft_adapter(folder, base: str | None = None) -> GPTModel:
    """A GPT-2 (or a Llama-family model) with a peft LoRA adapter merged in: the base model
    (base_model_name_or_path, or `base`: a Hugging Face folder or a GPT-2 name, downloaded if need be), each
    adapted Conv1D weight plus scale (B A)^T (a Llama's Linear plus scale B A), peft's own merge. c_attn's update
    is split into the W_query, W_key and W_value rows of ours. Any other adapter (DoRA, trained biases or embeddings,
    modules_to_save) is refused by name: merged without it, it would be another model."""
    config, file, tensors = _peft_files(folder)
    name = base if base is not None else config.get("base_model_name_or_path")
    if not name:
        raise UserError(f"{Path(folder) / 'adapter_config.json'} names no base_model_name_or_path: pass the base model")
    model = _adapter_base_model(str(name), Path(folder) / "adapter_config.json")
    updates, linears, layers = _peft_family_updates(file, tensors, model, "its base model")
    with torch.no_grad():
        for (layer, module), ab in sorted(updates.items()):
            a, b, scale, names = _peft_update(config, file, model, layer, module, ab, linears, layers)
            targets = [model.trf_blocks[layer].get_submodule(n) for n in names]
            delta = (scale * (b.double() @ a.double())).split([t.weight.shape[0] for t in targets])
            for t, d in zip(targets, delta):
                t.weight.copy_((t.weight.double() + d).to(t.weight.dtype))
    check_finite_weights(model, file)
    return model


def _peft_files(folder) -> tuple:
    """A peft adapter folder's (adapter_config.json's fields, weights file, its tensors); any adapter but a plain
    LoRA one (DoRA, trained biases, modules_to_save) refused by name: read without it, it would be another model."""
    folder = Path(folder)
    cfg_path = folder / "adapter_config.json"
    config = read_json_object(cfg_path)
    # (use_dora by config_flag: peft tests it by truth, and a "false" read as DoRA was refused as DoRA)
    for key, bad in (("peft_type", config.get("peft_type") != "LORA"),
                     ("use_dora", config_flag(config, "use_dora", False, cfg_path, "peft_lora")),
                     ("bias", config.get("bias", "none") != "none"),
                     ("modules_to_save", bool(config.get("modules_to_save")))):
        if bad:
            raise UserError(f"{cfg_path}: {key} is {config.get(key)!r}; only a plain LoRA adapter (peft_type LORA, "
                            "no DoRA, bias none, no modules_to_save) is read here")
    _check_lora_scale_fields(config, cfg_path)
    files = [folder / n for n in ADAPTER_FILES if (folder / n).is_file()]
    if not files:
        raise UserError(f"{folder}: an adapter_config.json without {' or '.join(ADAPTER_FILES)}")
    return config, files[0], _read_tensors(files[0])  # .safetensors or .bin; keys start base_model.: nothing to strip


def _check_lora_scale_fields(config: dict, cfg_path: Path) -> None:
    """r, lora_alpha and their per-module rank_pattern and alpha_pattern, what _peft_update's scale is made of:
    a rank that is no positive integer or an alpha that is no number would be a ZeroDivisionError or TypeError
    there (or, r < 0, a merge of the update with its sign flipped), a pattern that is no regular expression re's
    error."""
    def number(v):
        return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)

    rank = ("a positive integer", lambda v: number(v) and v == int(v) and v >= 1)
    alpha = ("a finite number", number)
    values = [("r", config.get("r", 8), *rank), ("lora_alpha", config.get("lora_alpha", 8), *alpha)]
    for key, want in (("rank_pattern", rank), ("alpha_pattern", alpha)):
        patterns = config.get(key)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise UserError(f"{cfg_path}: {key} must be an object of module name patterns to values, got "
                            f"{type(patterns).__name__}")
        for pattern, value in patterns.items():
            try:
                re.compile(pattern)
            except re.error as e:
                raise UserError(f"{cfg_path}: {key} key {pattern!r} is not a regular expression ({e})") from None
            try:  # matched as peft does, inside _pattern_value's wrapper: a global inline flag ("(?i)c_attn")
                re.compile(rf"(.*\.)?({pattern})$")  # compiles alone but not there (peft fails the same way)
            except re.error as e:
                raise UserError(f"{cfg_path}: {key} key {pattern!r} cannot be matched as peft matches it, inside "
                                f"(.*\\.)?(key)$ ({e}); a flag must be scoped to the key, as (?i:c_attn)") from None
            values.append((f"{key}[{pattern!r}]", value, *want))
    for what, value, want, ok in values:
        if not ok(value):
            raise UserError(f"{cfg_path}: {what} is {value!r}; it must be {want}")
    # peft tests use_rslora by truth: a "false" would be read as a scale over sqrt(r), so only a boolean (or null) is
    config_flag(config, "use_rslora", False, cfg_path, "peft_lora")  # read


def _peft_updates(tensors: dict, key: re.Pattern) -> tuple:
    """({(layer, module): {"A": lora_A, "B": lora_B}} of the tensors whose names `key` matches, the first name it
    does not match or None)."""
    updates = {}
    for name, value in tensors.items():
        m = key.fullmatch(name)
        if m is None:
            return updates, name
        updates.setdefault((int(m[1]), m[2]), {})[m[3]] = value
    return updates, None


def _peft_update(config: dict, file, model: GPTModel, layer: int, module: str, ab: dict, linears: dict,
                 layers: str) -> tuple:
    """One adapted module's (A [r, in] fp32, B [out, r] fp32, scale, our modules it is: linears[module]), checked
    against `model`: A and B both there, the layer in the model, their shapes an update of those modules' weight
    (their rows side by side). The scale is peft's: lora_alpha / r, or / sqrt(r) (use_rslora), r and alpha per
    module from rank_pattern and alpha_pattern, looked up by the module's full name, `layers`.i.module."""
    where = f"{file}: {layers.rpartition('.')[2]}.{layer}.{module}"
    n_layer = model.config.n_layer
    if set(ab) != {"A", "B"} or layer >= n_layer:
        raise UserError(f"{where}: " + (f"the base has only {n_layer} layers" if layer >= n_layer
                                        else f"lora_{'AB'[('A' in ab)]} is missing"))
    for which in "AB":  # .float() would cast integer or FP8 codes into an update without a word
        if ab[which].dtype not in _FLOAT_DTYPES:
            raise UserError(f"{where}: lora_{which} is {str(ab[which].dtype).removeprefix('torch.')}, not a float "
                            "tensor (float32, float16, bfloat16 or float64)")
    a, b = ab["A"].float(), ab["B"].float()
    full = f"{layers}.{layer}.{module}"
    r = _pattern_value(config.get("rank_pattern"), full, config.get("r", 8))
    alpha = _pattern_value(config.get("alpha_pattern"), full, config.get("lora_alpha", 8))
    scale = alpha / (r ** 0.5 if config.get("use_rslora") else r)  # (true, false or null: _peft_files)
    targets = [model.trf_blocks[layer].get_submodule(n) for n in linears[module]]
    out_f, in_f = sum(t.out_features for t in targets), targets[0].in_features
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != in_f or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
        raise UserError(f"{where}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not make an "
                        f"update of its [{in_f}, {out_f}] weight")
    return a, b, scale, linears[module]


def _adapter_base_model(name: str, cfg_path: Path) -> GPTModel:
    short = {repo: short for short, repo in HUB_REPOS.items()}
    if name in HUB_REPOS or name in short:
        return load_gpt2_pretrained(short.get(name, name))
    path = Path(name).expanduser()
    # (a Llama's folder may hold its weights as shards: their index, as adapter_base writes such a base)
    file = next((path / n for n in WEIGHT_FILES[:2] if (path / n).is_file()), path / "model.safetensors") \
        if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{cfg_path}: its base_model_name_or_path {name!r} is neither a folder here holding "
                        f"model.safetensors nor a GPT-2 name ({', '.join(HUB_REPOS)})")
    return load_checkpoint(file)


# -- an adapter's tensors, unmerged: multi-LoRA serving's --------------------------------------
# the shape fields of GPTConfig a LoRA checkpoint's base must share with the served model (vocab_size: another
# vocabulary is another base, even where no adapted matrix's shape shows it)
LORA_BASE_FIELDS = ("vocab_size", "n_embd", "n_layer", "n_head", "n_kv_head", "attention_head_dim", "mlp",
                    "mlp_hidden", "n_experts")
_OUR_LORA_KEY = re.compile(r"(.+)\.(?:parametrizations\.weight\.0|lora)\.lora_([AB])")  # LoRAUpdate, QLoRA's


def read_adapter(path, model: GPTModel) -> dict:
    """A LoRA adapter's tensors, not merged into anything: {module path in `model` (as named_modules() names
    it, "trf_blocks.3.att.W_query"): (A [r, in_features] fp32, B [out_features, r] fp32 with the LoRA scale
    folded in)}, for the modules the adapter adapts only; `model` x + x A^T B^T is the adapted model's.

    `path` is
    - a peft LoRA adapter folder (adapter_config.json, adapter_model.safetensors or .bin) for Hugging Face's
      GPT-2 (c_attn's update is W_query's, W_key's and W_value's: the same A, B's row blocks) or for a Llama
      (Mistral, Qwen2, Qwen3: q_proj ... down_proj, train/llama_weights.py's names), on a served model of that
      family. B is scale B, the scale peft's (lora_alpha / r, rsLoRA's / sqrt(r), rank_pattern and
      alpha_pattern per module). DoRA, trained biases and modules_to_save are refused as load_peft_adapter
      refuses them. base_model_name_or_path is not loaded: the served model is the base;
    - one of our LoRA checkpoints (file, checkpoint or run folder: resolve_checkpoint), saved by `sft` or
      `pretrain --lora-rank` (model/lora.py LoRAUpdate; QLoRA's updates on QuantLinear.lora alike): A = lora_A,
      B = lora_alpha / lora_rank * lora_B. Its base's shape fields (LORA_BASE_FIELDS) must be the served
      model's.

    The adapter's base weights are not compared with the served model's (vLLM does not either): an adapter
    trained on another base of the same shapes reads without complaint. A UserError names the file and field
    for a file that holds no LoRA, a module the served model lacks or whose widths differ from the adapter's,
    a layer beyond the served model's, a NaN or inf in A or B, another family's adapter."""
    folder = adapter_folder(path)
    out = _read_peft_adapter(folder, model) if folder is not None else _read_lora_checkpoint(path, model)
    for name, (a, b) in out.items():
        for t, which in ((a, "A"), (b, "B")):
            if not all_finite(t):
                raise UserError(f"{path}: {name}'s LoRA {which} holds NaN or inf values (a damaged adapter)")
    return out


def _peft_family_updates(file, tensors: dict, model: GPTModel, role: str) -> tuple:
    """(updates as _peft_updates, {HF module: our Linears}, the layers' prefix) of a peft adapter's tensors under
    GPT-2's module names or a Llama's (Mistral's, Qwen2's, Qwen3's: q_proj ... down_proj, train/llama_weights.py's
    names); `model` (the adapter's `role`, in words) refused by name unless of that family: the module names map
    onto ours as that family's weights do, and another family's model has other rows."""
    from tritongpt.train.llama_weights import _LAYER, _NORMS, refuse_not_llama

    llama = {theirs: (mine,) for mine, theirs in _LAYER if mine not in _NORMS}
    families = (("GPT-2", _ADAPTER_KEY, HF_LINEARS, "transformer.h", refuse_not_gpt2),
                ("Llama", _adapter_key(r"model\.layers", llama), llama, "model.layers", refuse_not_llama))
    for family, key, linears, layers, refuse in families:
        updates, bad = _peft_updates(tensors, key)
        if bad is None:
            break
    else:
        raise UserError(f"{file}: tensor {bad!r} is not a LoRA A or B of GPT-2's c_attn, c_proj or c_fc, nor of a "
                        "Llama's q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj or down_proj: an adapter for "
                        "another family, or one that changes more than those, is not read here")
    what = f"the base of a peft {family} adapter"
    try:
        refuse(model, what)
    except UserError as e:  # (the export's refusals: "this model <why>: it cannot be exported as <what>")
        why = str(e).removesuffix(f": it cannot be exported as {what}")
        raise UserError(f"{file}: a peft adapter for {family}, and {role} is no {family}: {why}") from None
    return updates, linears, layers


def _read_peft_adapter(folder: Path, model: GPTModel) -> dict:
    """read_adapter's of a peft adapter folder."""
    config, file, tensors = _peft_files(folder)
    updates, linears, layers = _peft_family_updates(file, tensors, model, "the served model")
    out = {}
    for (layer, module), ab in sorted(updates.items()):
        a, b, scale, names = _peft_update(config, file, model, layer, module, ab, linears, layers)
        rows = [model.trf_blocks[layer].get_submodule(n).out_features for n in names]
        for name, rows_b in zip(names, b.split(rows)):
            # A rank whose B column is zero in this module's rows adds nothing to it: our export writes c_attn's
            # update as W_query's, W_key's and W_value's side by side (rank 3r, B block-diagonal), which reads back
            # as each one's own rank r. (A module with no rank left is not adapted at all.)
            used = rows_b.ne(0).any(0)
            if bool(used.any()):
                out[f"trf_blocks.{layer}.{name}"] = a[used].contiguous(), (scale * rows_b[:, used]).contiguous()
    return out


def _read_lora_checkpoint(path, model: GPTModel) -> dict:
    from safetensors import safe_open

    from tritongpt.train.common import resolve_checkpoint, saved_model_config

    file = resolve_checkpoint(path)
    saved = saved_model_config(file)
    if not saved:
        raise UserError(f"{file} has no LoRA: not a tritongpt checkpoint (no config in its metadata) nor a peft "
                        "adapter folder (adapter_config.json)")
    rank = saved.get("lora_rank") or 0
    if not rank:
        raise UserError(f"{file} has no LoRA (its config's lora_rank is 0): a plain checkpoint, not an adapter")
    now = model.config.to_dict()
    diffs = [f"{k} {saved[k]} (served: {now[k]})" for k in LORA_BASE_FIELDS if k in saved and saved[k] != now[k]]
    if diffs:
        raise UserError(f"{file}: its LoRA was trained on another model than the served one: its config has "
                        + ", ".join(diffs))
    scale = float(saved.get("lora_alpha", GPTConfig.lora_alpha)) / rank  # LoRAUpdate.scale
    ab, modules = {}, dict(model.named_modules())
    try:  # the LoRA tensors alone: the file holds the whole base too, which the served model already is

        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if (m := _OUR_LORA_KEY.fullmatch(key)) is not None:
                    ab.setdefault(m[1], {})[m[2]] = f.get_tensor(key).float()
    except Exception as e:  # noqa: BLE001 (safetensors' own errors have no common base)
        raise unreadable_safetensors(file, e) from None
    if not ab:
        raise UserError(f"{file} has no LoRA tensors (lora_A, lora_B), though its config's lora_rank is {rank}")
    out = {}
    for name, t in ab.items():
        if set(t) != {"A", "B"}:
            raise UserError(f"{file}: {name}'s lora_{'AB'['A' in t]} is missing")
        a, b, module = t["A"], t["B"], modules.get(name)
        if module is None or not hasattr(module, "in_features"):
            raise UserError(f"{file}: the adapter adapts {name}, which the served model has no Linear of")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or a.shape[1] != module.in_features \
                or b.shape[0] != module.out_features:
            raise UserError(f"{file}: {name}'s lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not make an "
                            f"update of the served [{module.out_features}, {module.in_features}] weight")
        out[name] = a.contiguous(), scale * b
    return out
