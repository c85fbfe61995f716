"""EleutherAI's GPT-Neo weights, in Hugging Face's safetensors layout, into GPTModel, and back out.

GPT-Neo is GPT-2 with three differences, each a GPTConfig field: local attention over the last
window_size positions in every other layer (attention_window, window_layers "odd": Hugging
Face's mask `bias ^ tril(bias, -window_size)` lets query i see keys i - window_size < j <= i,
outside_window's), attention scores q.k not scaled by 1/sqrt(head_dim) (scale_attention False)
and q/k/v projections without biases (qkv_bias False). Its layers are nn.Linear, [out, in] like
ours, and q, k and v are apart as ours: the tensors only change names. load_checkpoint
(gpt2_weights.py) hands a GPT-Neo file here; `export_gpt_neo` writes the inverse, a folder
transformers' GPTNeoForCausalLM.from_pretrained loads.
"""
from pathlib import Path

import torch

from tritongpt.errors import UserError, note, read_json_object
from tritongpt.model.config import GPTConfig, get_config
from tritongpt.model.gpt import GPTModel
from tritongpt.train.gpt2_weights import (_read_tensors, head_count, hub_download, model_with_tensors,
                                          refuse_moe_touches, refuse_other_heads, tensor_names, tensor_shapes,
                                          tied_head, weights_file, write_hf_folder)

HUB_REPOS = {
    "gpt-neo-125m": "EleutherAI/gpt-neo-125m",
    "gpt-neo-1.3B": "EleutherAI/gpt-neo-1.3B",
    "gpt-neo-2.7B": "EleutherAI/gpt-neo-2.7B",
}
# fetched beside the weights: the model's own tokenizer (GPT-2's BPE), read from the Hub cache
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")

# each block's tensors: ours, then Hugging Face's (under "h.{i}."); .weight, and .bias where ours has one
_LAYER = (("norm1", "ln_1"), ("norm2", "ln_2"), ("att.W_query", "attn.attention.q_proj"),
          ("att.W_key", "attn.attention.k_proj"), ("att.W_value", "attn.attention.v_proj"),
          ("att.out_proj", "attn.attention.out_proj"), ("ff.fc1", "mlp.c_fc"), ("ff.fc2", "mlp.c_proj"))


def is_gpt_neo_file(path) -> bool:
    """A Hugging Face GPT-Neo model.safetensors: its config.json says model_type gpt_neo, or
    without one, its tensors have GPT-Neo's names (attn.attention.q_proj)."""
    cfg_json = Path(path).parent / "config.json"
    if cfg_json.is_file() and "model_type" in (d := read_json_object(cfg_json)):
        return d["model_type"] == "gpt_neo"
    return any(".attn.attention.q_proj." in k for k in tensor_names(path))


def _attention_layers(d: dict, cfg_json) -> list:
    """config.json's attention_types ([[["global", "local"], 12]]: the pair 12 times), each layer's kind."""
    types = d.get("attention_types", [[["global", "local"], 12]])
    layers = []
    try:
        for kinds, times in types:
            if not isinstance(times, int) or isinstance(times, bool) or times < 0 or isinstance(kinds, str):
                raise TypeError
            layers += list(kinds) * times
    except (TypeError, ValueError):
        raise UserError(f"{cfg_json}: attention_types {types!r} is not a list of [[kinds...], times]") from None
    bad = sorted({str(k) for k in layers} - {"global", "local"})
    if bad:
        raise UserError(f"{cfg_json}: attention_types names {bad[0]!r}; a layer is 'global' or 'local'")
    return layers


def _check_hf_config(cfg_json: Path, vocab: int, ctx: int, n_embd: int, n_layer: int) -> dict:
    """config.json beside a GPT-Neo file, agreeing with the tensors and computing what GPTModel
    computes: -> {n_head, attention_window, window_layers} (what the tensors do not say)."""
    d = read_json_object(cfg_json)
    for key, have in (("vocab_size", vocab), ("max_position_embeddings", ctx), ("hidden_size", n_embd),
                      ("num_layers", n_layer)):
        if key in d and d[key] != have:
            raise UserError(f"{cfg_json} says {key} {d[key]!r}, but the weights have {have}")
    act = d.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        raise UserError(f"{cfg_json} has activation_function {act!r}; this model computes 'gelu_new' only")
    if d.get("layer_norm_epsilon", 1e-5) != 1e-5:
        raise UserError(f"{cfg_json} has layer_norm_epsilon {d['layer_norm_epsilon']!r}; this model computes "
                        "1e-05 only")
    if d.get("intermediate_size") not in (None, 4 * n_embd):
        raise UserError(f"{cfg_json} has intermediate_size {d['intermediate_size']!r}; this model's MLP is "
                        f"4 x hidden_size ({4 * n_embd}) wide only")
    layers = _attention_layers(d, cfg_json)
    if len(layers) != n_layer:
        raise UserError(f"{cfg_json}: attention_types gives {len(layers)} layers, the weights have {n_layer}")
    key = "num_heads" if "num_heads" in d else "num_attention_heads"
    n_head = d.get(key)
    if n_head is not None:  # (null: named below, as a missing one)
        n_head = head_count(n_head, key, n_embd, cfg_json)
    out = {"n_head": n_head, "attention_window": 0, "window_layers": "all"}
    if "local" in layers:
        window = d.get("window_size", 256)
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise UserError(f"{cfg_json} has window_size {window!r}; a local layer's window is a positive integer")
        # what GPTConfig can say: every layer local, or GPT-Neo's alternation, global first
        odd = ["global", "local"] * (n_layer // 2) + ["global"] * (n_layer % 2)
        if layers not in (["local"] * n_layer, odd):
            raise UserError(f"{cfg_json}: attention_types makes layers {layers} local or global; this model "
                            "computes all global, all local, or global and local in turn from a global one only")
        out.update(attention_window=window, window_layers="all" if "global" not in layers else "odd")
    return out


def _infer_config(sd: dict, path: Path, model_name: str | None) -> GPTConfig:
    vocab, n_embd, ctx, n_layer = tensor_shapes(sd, path, "GPT-Neo")
    cfg_json = path.parent / "config.json"
    d = {}  # (config.json's fields: tied_head reads its tie_word_embeddings)
    if cfg_json.is_file():
        d = read_json_object(cfg_json)
        attn = _check_hf_config(cfg_json, vocab, ctx, n_embd, n_layer)
    else:  # the heads and the attention are in no tensor: --model's, or the published model's of this shape
        shapes = {(get_config(n).n_embd, get_config(n).n_layer): n for n in HUB_REPOS}
        name = model_name or shapes.get((n_embd, n_layer))
        if name is None:
            raise UserError(f"cannot tell the heads and local layers of {path} (width {n_embd}, {n_layer} layers): "
                            "put its config.json beside it or pass --model")
        named = get_config(name)
        if (named.n_embd, named.n_layer) != (n_embd, n_layer):
            raise UserError(f"{path} has width {n_embd} and {n_layer} layers, but --model {name} has "
                            f"{named.n_embd} and {named.n_layer}: put the file's config.json beside it")
        neo = get_config("gpt-neo-125m")  # --model names the heads; the attention is GPT-Neo's
        attn = {"n_head": named.n_head, "attention_window": neo.attention_window, "window_layers": neo.window_layers}
        note(f"{path} has no config.json beside it: read as GPT-Neo with {named.n_head} heads and local attention "
             f"over {neo.attention_window} positions in the odd layers")
    if attn["n_head"] is None:
        raise UserError(f"{cfg_json} names no num_heads")
    return GPTConfig(vocab_size=vocab, context_length=ctx, n_embd=n_embd, n_layer=n_layer, **attn,
                     scale_attention=False, qkv_bias=False, bias=True,
                     tie_weights=tied_head(d, sd.get("lm_head.weight"), sd["wte.weight"], "lm_head.weight", cfg_json))


def _our_tensors(sd: dict, cfg: GPTConfig) -> dict:
    """Hugging Face GPT-Neo tensors under our parameter names (KeyError: a tensor the file lacks)."""
    ours = {"tok_emb.weight": sd["wte.weight"], "pos_emb.weight": sd["wpe.weight"],
            "final_norm.weight": sd["ln_f.weight"], "final_norm.bias": sd["ln_f.bias"]}
    if not cfg.tie_weights:
        ours["out_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        for mine, theirs in _LAYER:
            ours[f"trf_blocks.{i}.{mine}.weight"] = sd[f"h.{i}.{theirs}.weight"]
            if not mine.startswith("att.W_"):  # q, k and v have none
                ours[f"trf_blocks.{i}.{mine}.bias"] = sd[f"h.{i}.{theirs}.bias"]
    return ours


def load_gpt_neo_safetensors(path, model_name: str | None = None) -> GPTModel:
    """GPTModel with the weights of a Hugging Face GPT-Neo model.safetensors (its config.json
    beside it says the heads and the local layers; else model_name, or the published size)."""
    path = weights_file(path, "GPT-Neo")
    sd = _read_tensors(path)
    cfg = _infer_config(sd, path, model_name)
    return model_with_tensors(cfg, lambda: _our_tensors(sd, cfg), path)


def load_gpt_neo_pretrained(name: str = "gpt-neo-125m", cache_dir=None) -> GPTModel:
    """Download (or take from the local Hub cache) EleutherAI's GPT-Neo weights by name, with
    their config.json and tokenizer files (hub_tokenizer reads those)."""
    if name not in HUB_REPOS:
        raise UserError(f"unknown GPT-Neo model {name!r}; choose one of: {', '.join(HUB_REPOS)}")
    return load_gpt_neo_safetensors(hub_download(HUB_REPOS[name], ("config.json",) + TOKENIZER_FILES, cache_dir),
                                    name)


def hub_tokenizer(name) -> Path | None:
    """A GPT-Neo name's tokenizer folder in the local Hub cache (load_gpt_neo_pretrained put it
    there with the weights), else None: then GPT-2's tokenizer by vocabulary size, whose files
    GPT-Neo's are."""
    if name not in HUB_REPOS:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = [try_to_load_from_cache(HUB_REPOS[name], f) for f in TOKENIZER_FILES[:2]]
    if all(isinstance(f, str) for f in found) and Path(found[0]).parent == Path(found[1]).parent:
        return Path(found[0]).parent
    return None


# -- export: the inverse of _our_tensors -----------------------------------------------------------
def refuse_not_gpt_neo(model: GPTModel, what: str) -> None:
    """Hugging Face's GPT-Neo learns position embeddings, has LayerNorms (no RMSNorm), no logit soft
    cap nor SwiGLU MLP, unscaled scores and q/k/v without biases: another model's weights would give
    it other logits. (Any window GPTConfig has it can say.)"""
    cfg = model.config
    refuse_moe_touches(cfg, "GPT-Neo", what)
    if cfg.position_encoding != "learned":
        raise UserError(f"this model {cfg.positions_said()}, where Hugging Face's GPT-Neo learns position embeddings: "
                        f"it cannot be exported as {what}")
    if cfg.norm != "layernorm":
        raise UserError(f"this model normalizes with {cfg.norm} (GPTConfig.norm), where Hugging Face's GPT-Neo has "
                        f"LayerNorms: it cannot be exported as {what}")
    if cfg.logit_softcap:
        raise UserError(f"this model soft-caps its logits (logit_softcap {cfg.logit_softcap:g}), which "
                        f"Hugging Face's GPT-Neo does not: it cannot be exported as {what}")
    if cfg.kv_heads < cfg.n_head:
        raise UserError(f"this model has grouped-query attention (n_kv_head {cfg.n_kv_head} key/value heads for "
                        f"{cfg.n_head} query heads), which Hugging Face's GPT-Neo does not: it cannot be exported "
                        f"as {what}")
    if cfg.mlp != "gelu":
        raise UserError(f"this model has a SwiGLU MLP (mlp {cfg.mlp}: w_gate, w_up, w_down, hidden {cfg.ff_hidden}), "
                        f"where Hugging Face's GPT-Neo has GELU's c_fc and c_proj: it cannot be exported as {what}")
    if cfg.norm_eps != 1e-5:
        raise UserError(f"this model's norms add eps {cfg.norm_eps:g} (GPTConfig.norm_eps), where GPT-Neo's add "
                        f"1e-05: it cannot be exported as {what}")
    if cfg.scale_attention:
        raise UserError("this model scales its attention scores by 1/sqrt(head_dim) (scale_attention True), "
                        f"which GPT-Neo does not: it cannot be exported as {what}")
    if cfg.has_qkv_bias:
        field = "qkv_bias_only" if cfg.qkv_bias_only else "qkv_bias"
        raise UserError(f"this model's query, key and value projections have biases ({field} True), which "
                        f"GPT-Neo's have not: it cannot be exported as {what}")
    refuse_other_heads(cfg, "GPT-Neo", what)


def _hf_tensors(model: GPTModel) -> dict:
    """Our parameters under GPTNeoForCausalLM's names; zero biases where ours has none (out_proj
    and the MLP of a bias=False model); the vocabulary's padding rows dropped."""
    cfg = model.config
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    V, emb = cfg.vocab_size, sd["tok_emb.weight"]
    hf = {"wte.weight": emb[:V], "wpe.weight": sd["pos_emb.weight"],
          "ln_f.weight": sd["final_norm.weight"], "ln_f.bias": sd["final_norm.bias"]}
    for i in range(cfg.n_layer):
        for mine, theirs in _LAYER:
            w = hf[f"h.{i}.{theirs}.weight"] = sd[f"trf_blocks.{i}.{mine}.weight"]
            if not mine.startswith("att.W_"):
                hf[f"h.{i}.{theirs}.bias"] = sd.get(f"trf_blocks.{i}.{mine}.bias", w.new_zeros(w.shape[0]))
    out = {"transformer." + k: v for k, v in hf.items()}
    if not cfg.tie_weights:
        out["lm_head.weight"] = sd["out_head.weight"][:V]
    return {k: v.to("cpu", memory_format=torch.contiguous_format, copy=True) for k, v in out.items()}


def hf_config(cfg: GPTConfig, eos_token_id: int | None = None) -> dict:
    """GPTNeoConfig fields (config.json) for this model; what _check_hf_config reads back."""
    n = cfg.n_layer
    if not cfg.attention_window:
        types = [[["global"], n]]
    elif cfg.window_layers == "all":
        types = [[["local"], n]]
    else:  # odd: global, local, ... (and a last global layer for an odd count)
        types = [[["global", "local"], n // 2]] + ([[["global"], 1]] if n % 2 else [])
    return {"model_type": "gpt_neo", "architectures": ["GPTNeoForCausalLM"], "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.context_length, "hidden_size": cfg.n_embd, "num_layers": n,
            "num_heads": cfg.n_head, "attention_types": types, "window_size": cfg.attention_window or 256,
            "intermediate_size": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "resid_dropout": cfg.dropout, "embed_dropout": cfg.dropout, "attention_dropout": cfg.dropout,
            "tie_word_embeddings": cfg.tie_weights, "bos_token_id": eos_token_id, "eos_token_id": eos_token_id}


def export_gpt_neo(model: GPTModel, out_dir, eos_token_id: int | None = None, overwrite: bool = False) -> list:
    """Write model as a Hugging Face GPT-Neo folder: model.safetensors and config.json, which
    transformers.GPTNeoForCausalLM.from_pretrained(out_dir) and load_checkpoint both read.
    Returns the paths written; refuses to replace them unless overwrite."""
    refuse_not_gpt_neo(model, "a GPT-Neo folder")
    return write_hf_folder(out_dir, lambda: _hf_tensors(model), hf_config(model.config, eos_token_id), overwrite)
