"""GGUF import: a .gguf file (llama.cpp's, what Ollama and LM Studio keep on disk) as a model and its tokenizer.

The inverse of gguf_export.py, whose tensor-name tables and Q/K permute it reads with. Architectures: "llama"
(Llama, Mistral as convert_hf_to_gguf.py writes it), "qwen2" and "gpt2". Every tensor is dequantized to float32 by
the gguf package (ggml's reader: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants): no kernel here runs a
GGUF block format, so a quantized file runs as the float model it stands for. One tensor is dequantized at a time,
straight into the model's parameter, so a large file never has two float copies in memory.

The tokenizer is rebuilt from the file's metadata (tokenizer.ggml.*): a byte-level BPE ("gpt2") with one of the
pre-tokenizer regexes gguf_export.py writes, as the same HFTokenizer a Hugging Face folder gives. A SentencePiece
vocabulary ("llama") is refused by name: pass its Hugging Face tokenizer folder."""
from pathlib import Path

import numpy as np
import torch

from tritongpt.errors import UserError, note
from tritongpt.model.config import GPTConfig
from tritongpt.train.gguf_export import (GGUF_LAYER, GGUF_TOP, GPT2_QKV, INSTALL, LLAMA3_PAT, QKV, QWEN2_PAT, CONTROL,
                                         UNUSED, USER_DEFINED, unpermute_qk)

ARCHS = ("llama", "qwen2", "gpt2")
# tokenizer.ggml.pre -> the split regex (None: GPT-2's own, ByteLevel's use_regex)
PRE_PATTERNS = {"gpt-2": None, "llama-bpe": LLAMA3_PAT, "qwen2": QWEN2_PAT}


def _reader(path):
    try:
        import gguf
    except ImportError:
        raise UserError(f"{path} is a GGUF file, read with the gguf package (ggml's own reader), which is not "
                        f"installed: {INSTALL}") from None
    try:
        return gguf, gguf.GGUFReader(path)
    except (ValueError, OSError) as e:  # its bad-magic / version refusals are ValueErrors
        raise UserError(f"{path}: not a GGUF file gguf can read ({e})") from None


def _field(reader, key: str, path, default=...):
    """The value of metadata key (a string, number, bool or list); default where the file has none, else refused."""
    f = reader.fields.get(key)
    if f is None:
        if default is ...:
            raise UserError(f"{path}: no {key} in its metadata")
        return default
    if hasattr(f, "contents"):  # (gguf >= 0.11)
        return f.contents()
    import gguf  # older ones: decode the parts (strings are bytes, scalars one-element arrays)

    S, A = gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY
    one = (lambda i: bytes(f.parts[i]).decode()) if f.types[-1] == S else (lambda i: f.parts[i].tolist()[0])
    return [one(i) for i in f.data] if f.types[0] == A else one(f.data[0])


def _positive(reader, key, path, default=...) -> int:
    v = _field(reader, key, path, default)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
        raise UserError(f"{path}: {key} must be a positive integer, got {v!r}")
    return int(v)


def gguf_config(reader, path) -> tuple:
    """(arch, GPTConfig) from the file's metadata; the vocabulary is token_embd's rows. What this model cannot
    compute is refused by name: another architecture, rescaled RoPE, partial rotary."""
    arch = _field(reader, "general.architecture", path)
    if arch not in ARCHS:
        raise UserError(f"{path}: general.architecture is {arch!r}, which tritongpt does not read from a GGUF file "
                        f"(it reads {', '.join(ARCHS)})")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise UserError(f"{path}: no tensor token_embd.weight")
    V = int(tensors["token_embd.weight"].shape[1])  # ggml's shape is [in, out]: [n_embd, vocab]
    k = lambda key: f"{arch}.{key}"  # noqa: E731
    fields = dict(vocab_size=V, context_length=_positive(reader, k("context_length"), path),
                  n_embd=_positive(reader, k("embedding_length"), path),
                  n_layer=_positive(reader, k("block_count"), path),
                  n_head=_positive(reader, k("attention.head_count"), path),
                  mlp_hidden=_positive(reader, k("feed_forward_length"), path))
    if _field(reader, k("vocab_size"), path, V) != V:
        raise UserError(f"{path}: {k('vocab_size')} is {_field(reader, k('vocab_size'), path)}, but token_embd.weight "
                        f"has {V} rows")
    if arch == "gpt2":
        if fields["mlp_hidden"] != 4 * fields["n_embd"]:
            raise UserError(f"{path}: {k('feed_forward_length')} is {fields['mlp_hidden']}, not 4 x "
                            f"{k('embedding_length')} ({4 * fields['n_embd']}), the only GPT-2 MLP this model has")
        fields.update(mlp_hidden=0, norm_eps=float(_field(reader, k("attention.layer_norm_epsilon"), path, 1e-5)),
                      tie_weights="output.weight" not in tensors)
        return arch, GPTConfig(**fields)
    scaling = _field(reader, k("rope.scaling.type"), path, "none")
    if scaling != "none":
        raise UserError(f"{path}: {k('rope.scaling.type')} is {scaling!r}: rescaled RoPE frequencies are not read "
                        "from a GGUF file (only unscaled RoPE, 'none')")
    if "rope_freqs.weight" in tensors:  # Llama 3.1's rescaled frequencies, kept as a tensor of factors
        raise UserError(f"{path}: it has rope_freqs.weight (Llama 3.1-style rescaled RoPE frequencies), which this "
                        "reader does not apply")
    head_dim = _positive(reader, k("attention.key_length"), path, fields["n_embd"] // fields["n_head"])
    if _positive(reader, k("attention.value_length"), path, head_dim) != head_dim:
        raise UserError(f"{path}: {k('attention.value_length')} differs from {k('attention.key_length')} "
                        f"({head_dim}): this model's values are as wide as its keys")
    rot = _positive(reader, k("rope.dimension_count"), path, head_dim)
    if rot != head_dim:
        raise UserError(f"{path}: {k('rope.dimension_count')} is {rot}, not the head's {head_dim}: partial rotary "
                        "is not read from a GGUF file")
    fields.update(norm="rmsnorm", mlp="swiglu", position_encoding="rope", bias=False,
                  n_kv_head=_positive(reader, k("attention.head_count_kv"), path, fields["n_head"]),
                  attention_head_dim=head_dim if head_dim * fields["n_head"] != fields["n_embd"] else 0,
                  rope_theta=float(_field(reader, k("rope.freq_base"), path, 10000.0)),
                  norm_eps=float(_field(reader, k("attention.layer_norm_rms_epsilon"), path, 1e-5)),
                  qkv_bias_only=arch == "qwen2", tie_weights="output.weight" not in tensors)
    try:
        return arch, GPTConfig(**fields)
    except UserError as e:  # (heads that do not divide the width, ...)
        raise UserError(f"{path}: its metadata gives no model this reads: {e}") from None


def gguf_names(cfg: GPTConfig, arch: str) -> dict:
    """{our parameter name: GGUF tensor name} for a model of cfg (gpt2's q/k/v: attn_qkv, split by load_gguf)."""
    top = dict(GGUF_TOP)
    names = {"tok_emb.weight": top["tok_emb"] + ".weight", "final_norm.weight": top["final_norm"] + ".weight"}
    if not cfg.tie_weights:
        names["out_head.weight"] = top["out_head"] + ".weight"
    if arch == "gpt2":
        names.update({"pos_emb.weight": "position_embd.weight", "final_norm.bias": "output_norm.bias"})
    for i in range(cfg.n_layer):
        b, g = f"trf_blocks.{i}.", f"blk.{i}."
        for ours, theirs in GGUF_LAYER[arch]:
            names[b + ours + ".weight"] = g + theirs + ".weight"
            if arch == "gpt2":
                names[b + ours + ".bias"] = g + theirs + ".bias"
        if arch == "gpt2":
            for j, ours in enumerate(GPT2_QKV):
                names[b + ours + ".weight"], names[b + ours + ".bias"] = (g + "attn_qkv.weight", j), \
                    (g + "attn_qkv.bias", j)
        if arch == "qwen2":
            for ours, theirs in QKV.items():
                names[b + ours + ".bias"] = g + theirs + ".bias"
    return names


def load_gguf(path):
    """GPTModel (float32, eval) with a .gguf file's weights, each tensor dequantized as it is copied in."""
    from tritongpt.model.gpt import GPTModel, check_finite_weights

    path = Path(path)
    gguf, reader = _reader(path)
    arch, cfg = gguf_config(reader, path)
    names = gguf_names(cfg, arch)
    tensors = {t.name: t for t in reader.tensors}
    wanted = {n if isinstance(n, str) else n[0] for n in names.values()}
    missing = sorted(wanted - set(tensors))
    if missing:
        raise UserError(f"{path}: missing tensor(s) {missing[:3]} (a {arch} of {cfg.n_layer} layers has them)")
    extra = sorted(set(tensors) - wanted)
    if extra:  # a tensor unread would be a part of the function left out (q/k norms, rope factors, biases)
        raise UserError(f"{path}: tensor(s) {extra[:3]} that a {arch} as this reads it has no place for")

    def read(name):
        t = tensors[name]
        try:
            x = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise UserError(f"{path}: tensor {name} is {t.tensor_type.name}, which the gguf package cannot "
                            "dequantize") from None
        return torch.from_numpy(np.array(x, dtype=np.float32).reshape(tuple(int(s) for s in reversed(t.shape))))

    model = GPTModel.empty(cfg)
    params = dict(model.named_parameters())
    # the file holds the vocabulary's rows; our padded ones (vocab_multiple) stay zero, never a token
    V = cfg.vocab_size
    fused = {}
    with torch.no_grad():
        for ours, theirs in names.items():
            p = params[ours]
            if isinstance(theirs, tuple):  # gpt2's attn_qkv [3C, C]: q, k, v thirds, read once for all three
                theirs, j = theirs
                if theirs not in fused:
                    fused = {theirs: read(theirs)}  # (one layer's at a time)
                value = fused[theirs].chunk(3)[j]
            else:
                value = read(theirs)
            if arch == "llama" and theirs.endswith(("attn_q.weight", "attn_k.weight")):
                value = unpermute_qk(value, cfg.n_head if "attn_q" in theirs else cfg.kv_heads)
            want = tuple(p.shape)
            if ours in ("tok_emb.weight", "out_head.weight"):
                want = (V, *want[1:])
            if tuple(value.shape) != want:
                raise UserError(f"{path}: tensor {theirs} has shape {tuple(value.shape)}, but its metadata "
                                f"says {want}")
            if ours in ("tok_emb.weight", "out_head.weight"):
                p.zero_()
                p[:V].copy_(value)
            else:
                p.copy_(value)
    left = set(params) - set(names) - ({"out_head.weight"} if cfg.tie_weights else set())
    if left:  # (a table that missed a parameter would leave it uninitialized memory)
        raise UserError(f"{path}: no tensor for {sorted(left)[:3]}")
    check_finite_weights(model, path)
    kinds = sorted({tensors[n].tensor_type.name for n in wanted} - {"F32"})
    if kinds:
        note(f"{path}: its {', '.join(kinds)} tensors are dequantized, no GGUF kernel runs them: the model is float32 "
             "here (the file's rounding, not its size)")
    return model.eval()


def gguf_tokenizer(path):
    """The HFTokenizer of a .gguf file's tokenizer.ggml.* metadata (byte-level BPE, "gpt2"): its vocabulary (the
    [PAD] rows, type UNUSED, left out), merges, pre-tokenizer (PRE_PATTERNS), special tokens (type CONTROL), BOS, EOS,
    pad, whether a BOS is prepended (add_bos_token), and its chat template."""
    from tritongpt.train.hf_tokenizer import HFTokenizer

    path = Path(path)
    _, reader = _reader(path)
    kind = _field(reader, "tokenizer.ggml.model", path)
    if kind == "llama":
        raise UserError(f"{path}: its tokenizer is SentencePiece's (tokenizer.ggml.model 'llama'), which is not "
                        "rebuilt from a GGUF file here: pass the model's Hugging Face tokenizer folder (--tokenizer)")
    if kind != "gpt2":
        raise UserError(f"{path}: tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') is read from a GGUF "
                        "file: pass a tokenizer folder (--tokenizer)")
    pre = _field(reader, "tokenizer.ggml.pre", path, "default")
    if pre not in PRE_PATTERNS:
        raise UserError(f"{path}: tokenizer.ggml.pre is {pre!r}, none of the pre-tokenizers read from a GGUF file "
                        f"({', '.join(PRE_PATTERNS)}): its text would be split otherwise and give other ids; pass a "
                        "tokenizer folder (--tokenizer)")
    tokens = _field(reader, "tokenizer.ggml.tokens", path)
    types = _field(reader, "tokenizer.ggml.token_type", path, [1] * len(tokens))
    merges = _field(reader, "tokenizer.ggml.merges", path, [])
    if len(types) != len(tokens):
        raise UserError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries, tokenizer.ggml.tokens "
                        f"{len(tokens)}")
    vocab, added = {}, []
    for i, (text, t) in enumerate(zip(tokens, types)):
        if t == UNUSED:
            continue
        vocab[text] = i
        if t in (CONTROL, USER_DEFINED):
            added.append({"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": t != CONTROL, "special": t == CONTROL})
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    pattern = PRE_PATTERNS[pre]
    pre_tok = byte_level if pattern is None else {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
        {**byte_level, "use_regex": False}]}

    def token(key):
        i = _field(reader, key, path, None)
        if i is None:
            return None
        if not 0 <= i < len(tokens) or tokens[i] not in vocab:
            raise UserError(f"{path}: {key} {i} is not a token of tokenizer.ggml.tokens")
        return tokens[i]

    bos, eos, pad = (token(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding"))
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", path, False)) and bos is not None
    post = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                                                     {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [vocab[bos]], "tokens": [bos]}}} if add_bos else None
    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": pre_tok, "post_processor": post,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab, "merges": [m.split(" ", 1) for m in merges]}}
    tok = HFTokenizer(spec, eos_token=eos, bos_token=bos, name=path.stem, info={"source": str(path)},
                      where=str(path), no_eos=f"{path} has no tokenizer.ggml.eos_token_id")
    if pad is not None:
        tok.template_tokens = {"pad_token": pad}
    tok.chat_template = _field(reader, "tokenizer.chat_template", path, None)
    return tok
