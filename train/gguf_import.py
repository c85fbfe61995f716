"""GGUF import: a .gguf file (llama.cpp's, what Ollama and LM Studio keep on disk) as a model and its tokenizer.

The inverse of gguf_export.py, whose tensor-name tables and Q/K permute it reads with. Architectures: "llama"
(Llama, Mistral as convert_hf_to_gguf.py writes it), "qwen2", "qwen3", "gpt2", and "gemma", "gemma2", "gemma3" (with
what llama.cpp fixes for them by architecture, as gguf_export.py's GEMMA_* say: their norms are read as the file
holds them, w + 1, which our RMSNorm multiplies by), and "phi3" (its fused attn_qkv and ffn_up split, a partial
rotary, the window over every layer as Phi-3's config says; LongRoPE's rope_factors refused), "falcon" (a parallel
block on one norm or, attn_norm_2 there, two), "bloom" (ALiBi, the embeddings' LayerNorm), "stablelm" (a partial
rotary, q/k/v biases, per-head q/k norms and the parallel block as the file's tensors say), and the mixtures of
experts "llama" with expert_count (Mixtral), "qwen3moe", "qwen2moe", "olmoe" (_moe_fields; always dequantized, the
MoE kernel having no int path). A file whose blocks'
linears are each Q8_0, Q4_0, Q4_1, Q4_K or Q6_K keeps them so (_load_kept: Q8_0 as Int8Linear of group 32, Q4_0 /
Q4_1 / Q4_K as Int4Linear of group 32, Q6_K as Int8Linear of group 16, the same fp32 matrices; a file of several,
a Q4_K_M's Q4_K and Q6_K, each in its own layout; the embedding and head float), unless float weights are asked for
(load_gguf's quantized, load_checkpoint's quantized_ok).
Otherwise every tensor is dequantized to float32 by the gguf package (ggml's reader: F32, F16, BF16, Q8_0, Q4_0,
Q4_1, Q5_0, Q5_1 and the K-quants), and a quantized file runs as the float model it stands for. One tensor is
dequantized at a time, straight into the model's parameter, so a large file never has two float copies in memory.

The tokenizer is rebuilt from the file's metadata (tokenizer.ggml.*): a byte-level BPE ("gpt2") with one of the
pre-tokenizer regexes gguf_export.py writes, as the same HFTokenizer a Hugging Face folder gives; or a SentencePiece
vocabulary ("llama": Llama 2, Mistral 7B, Gemma, Phi-3) as the BPE with byte fallback transformers builds of it
(_spm_spec). Any other (T5's Unigram "t5", ...) is refused by name: pass its Hugging Face tokenizer folder."""
from pathlib import Path

import numpy as np
import torch

from tritongpt.errors import UserError, note
from tritongpt.model.config import GPTConfig
from tritongpt.model.quant import pack_int4
from tritongpt.train.gguf_export import (BIASED, FUSED, GEMMA2_SOFTCAPS, GEMMA3_LOCAL_THETA, GEMMA_ARCHS,
                                         GEMMA_SWA_PATTERN, GGUF_EMBED_NORM, GGUF_TOP, INSTALL, LLAMA3_PAT,
                                         MOE_NORM_TOPK, QKV, QWEN2_PAT, CONTROL, SPACE, UNUSED, USER_DEFINED,
                                         fused_rows, gemma_local_layers, gemma_scale_width, layer_table, moe_layer,
                                         spm_merges, unpermute_qk)

# (qwen3: Qwen2's layout without biases, with q/k norms; the Gemmas: gguf_export.py's GEMMA_ARCHS; the mixtures of
# experts: a llama with expert_count (Mixtral), qwen3moe, qwen2moe, olmoe)
MOE_ONLY = ("qwen3moe", "qwen2moe", "olmoe")
ARCHS = ("llama", "qwen2", "qwen3", "gpt2", *GEMMA_ARCHS, "phi3", "falcon", "bloom", "stablelm", *MOE_ONLY)
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
    except (ValueError, OSError, IndexError) as e:  # its bad-magic / version refusals are ValueErrors; a count
        # in the header larger than the file (truncated, or damaged) runs its parser off the end: an IndexError
        raise UserError(f"{path}: not a GGUF file gguf can read ({e})") from None


def _field(reader, key: str, path, default=...):
    """The value of metadata key (a string, number, bool or list); default where the file has none, else refused."""
    f = reader.fields.get(key)
    if f is None:
        if default is ...:
            raise UserError(f"{path}: no {key} in its metadata")
        return default
    try:  # (its strings are decoded here, lazily: a damaged one is bytes that are not UTF-8)
        if hasattr(f, "contents"):  # (gguf >= 0.11)
            return f.contents()
        import gguf  # older ones: decode the parts (strings are bytes, scalars one-element arrays)

        S, A = gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY
        one = (lambda i: bytes(f.parts[i]).decode()) if f.types[-1] == S else (lambda i: f.parts[i].tolist()[0])
        return [one(i) for i in f.data] if f.types[0] == A else one(f.data[0])
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: {key} is not UTF-8 text ({e}): a damaged file") from None


def _typed(reader, key: str, path, kind, what: str, default=...):
    """_field's value, refused by name unless an instance of kind (a string where a number belongs, a list where one
    value does, would else be read as something the writer never meant: bool("false") is True)."""
    v = _field(reader, key, path, default)
    number = bool not in (kind if isinstance(kind, tuple) else (kind,))  # (a bool is an int to isinstance)
    if v is not default and (not isinstance(v, kind) or (number and isinstance(v, bool))):
        raise UserError(f"{path}: {key} must be {what}, got {v!r}")
    return v


def _real(reader, key, path, default=...) -> float:
    return float(_typed(reader, key, path, (int, float, np.integer, np.floating), "a number", default))


def _flag(reader, key, path, default=...) -> bool:
    return _typed(reader, key, path, (bool, np.bool_), "true or false", default)


def _positive(reader, key, path, default=...) -> int:
    v = _field(reader, key, path, default)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
        raise UserError(f"{path}: {key} must be a positive integer, got {v!r}")
    return int(v)


def _decimal(v) -> float:
    """A float32 key's value as the shortest decimal float32 rounds to it: the eps a writer meant (1e-05, not
    float32's 9.99999974738e-06), which the Hugging Face export checks GPT-2's against exactly."""
    return float(str(np.float32(v)))


def gguf_config(reader, path) -> tuple:
    """(arch, GPTConfig) from the file's metadata; the vocabulary is token_embd's rows. What this model cannot
    compute is refused by name: another architecture, rescaled RoPE, a partial rotary (but phi3's)."""
    arch = _field(reader, "general.architecture", path)
    if arch not in ARCHS:
        raise UserError(f"{path}: general.architecture is {arch!r}, which tritongpt does not read from a GGUF file "
                        f"(it reads {', '.join(ARCHS)})")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise UserError(f"{path}: no tensor token_embd.weight")
    emb = tuple(int(s) for s in reversed(tensors["token_embd.weight"].shape))
    if len(emb) != 2:  # (its rows are the vocabulary: a 1-d one has none to count)
        raise UserError(f"{path}: tensor token_embd.weight has shape {emb}, not an embedding's 2-d (vocab, n_embd)")
    V = int(tensors["token_embd.weight"].shape[1])  # ggml's shape is [in, out]: [n_embd, vocab]
    k = lambda key: f"{arch}.{key}"  # noqa: E731
    fields = dict(vocab_size=V, context_length=_positive(reader, k("context_length"), path),
                  n_embd=_positive(reader, k("embedding_length"), path),
                  n_layer=_positive(reader, k("block_count"), path),
                  n_head=_positive(reader, k("attention.head_count"), path),
                  mlp_hidden=_positive(reader, k("feed_forward_length"), path))
    if _positive(reader, k("vocab_size"), path, V) != V:
        raise UserError(f"{path}: {k('vocab_size')} is {_field(reader, k('vocab_size'), path)}, but token_embd.weight "
                        f"has {V} rows")
    if arch == "gpt2":
        if fields["mlp_hidden"] != 4 * fields["n_embd"]:
            raise UserError(f"{path}: {k('feed_forward_length')} is {fields['mlp_hidden']}, not 4 x "
                            f"{k('embedding_length')} ({4 * fields['n_embd']}), the only GPT-2 MLP this model has")
        fields.update(mlp_hidden=0, norm_eps=_decimal(_real(reader, k("attention.layer_norm_epsilon"), path, 1e-5)),
                      tie_weights="output.weight" not in tensors)
        return arch, GPTConfig(**fields)
    if arch in BIASED:
        return arch, _layernorm_config(reader, path, arch, fields, tensors, k)
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
    if arch == "phi3" and {"rope_factors_long.weight", "rope_factors_short.weight"} & set(tensors):
        raise UserError(f"{path}: it has rope_factors_long / rope_factors_short (Phi-3's LongRoPE), which this reader "
                        "does not apply: read the model's Hugging Face folder instead")
    if rot != head_dim and arch != "phi3":
        raise UserError(f"{path}: {k('rope.dimension_count')} is {rot}, not the head's {head_dim}: partial rotary "
                        "is not read from a GGUF file")
    fields.update(norm="rmsnorm", mlp="swiglu", position_encoding="rope", bias=False,
                  n_kv_head=_positive(reader, k("attention.head_count_kv"), path, fields["n_head"]),
                  attention_head_dim=head_dim if head_dim * fields["n_head"] != fields["n_embd"] else 0,
                  rope_theta=_real(reader, k("rope.freq_base"), path, 10000.0),
                  norm_eps=_decimal(_real(reader, k("attention.layer_norm_rms_epsilon"), path, 1e-5)),
                  qkv_bias_only=arch in ("qwen2", "qwen2moe"), tie_weights="output.weight" not in tensors,
                  # (q/k RMSNorms: attn_q_norm, attn_k_norm, per head; olmoe's over the whole projection)
                  qk_norm=arch in ("qwen3", "gemma3", "qwen3moe", "olmoe"),
                  qk_norm_width="all" if arch == "olmoe" else "head")
    if arch in MOE_ONLY or (arch == "llama" and _field(reader, k("expert_count"), path, 0)):
        fields.update(_moe_fields(reader, path, arch, fields, k))
    if arch in ("gemma", "gemma2") and "output.weight" in tensors:
        raise UserError(f"{path}: it has output.weight, an LM head of its own, which llama.cpp's {arch} never reads "
                        "(it computes the logits with token_embd)")
    if arch in GEMMA_ARCHS:
        fields.update(_gemma_fields(reader, path, arch, fields, head_dim, k))
    if arch == "phi3":
        # a partial rotary (Phi-4-mini's 0.75 of the head); the window over every layer as Phi-3's config says it
        # (a window as long as the context hides nothing: none, as phi3_weights.py reads it)
        window = _field(reader, k("attention.sliding_window"), path, 0)
        if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 0:
            raise UserError(f"{path}: {k('attention.sliding_window')} must be an integer >= 0, got {window!r}")
        fields.update(rotary_dim=rot if rot != head_dim else 0,
                      attention_window=int(window) if window < fields["context_length"] else 0)
    try:
        return arch, GPTConfig(**fields)
    except UserError as e:  # (heads that do not divide the width, ...)
        raise UserError(f"{path}: its metadata gives no model this reads: {e}") from None


def _moe_fields(reader, path, arch: str, fields: dict, k) -> dict:
    """A mixture of experts' GPTConfig fields, as llama.cpp reads them (llama-model.cpp's load_hparams and
    create_tensor): expert_count and expert_used_count; the experts' width feed_forward_length (llama, olmoe) or
    expert_feed_forward_length (qwen3moe; qwen2moe's, else feed_forward_length / expert_used_count as there),
    qwen2moe's shared expert expert_shared_feed_forward_length (else feed_forward_length); the top k renormalized
    as llama.cpp's architecture fixes it (gguf_export.MOE_NORM_TOPK). A gating or scaling of the weights that
    llama.cpp reads from keys other MoEs write (sigmoid gating, a weights scale, dense leading blocks) is refused
    by name: none of these archs has it."""
    E = _positive(reader, k("expert_count"), path)
    used = _positive(reader, k("expert_used_count"), path)
    if used > E:
        raise UserError(f"{path}: {k('expert_used_count')} is {used}, more than the {E} experts of "
                        f"{k('expert_count')}")
    for key, plain in (("expert_gating_func", 1), ("expert_weights_scale", 1.0), ("leading_dense_block_count", 0),
                       ("expert_shared_count", 0 if arch != "qwen2moe" else 1)):
        v = _field(reader, k(key), path, plain)
        if v != plain:
            raise UserError(f"{path}: {k(key)} is {v!r}, which llama.cpp's {arch} does not read and this model does "
                            f"not compute (it reads a file without it, or {plain!r})")
    ff = fields["mlp_hidden"]
    hidden = ff
    if arch == "qwen3moe":
        hidden = _positive(reader, k("expert_feed_forward_length"), path)
    elif arch == "qwen2moe":
        hidden = _positive(reader, k("expert_feed_forward_length"), path, max(ff // used, 1))
    out = dict(n_experts=E, experts_per_token=used, moe_norm_topk=MOE_NORM_TOPK[arch], mlp_hidden=hidden)
    if arch == "qwen2moe":
        out["moe_shared_hidden"] = _positive(reader, k("expert_shared_feed_forward_length"), path, ff)
    return out


def _layernorm_config(reader, path, arch: str, fields: dict, tensors: dict, k) -> GPTConfig:
    """The GPTConfig of a falcon, bloom or stablelm file: LayerNorms with biases (attention.layer_norm_epsilon), heads
    n_embd / n_head wide (as llama.cpp's shapes for these). StableLM: _stablelm_fields. Falcon and BLOOM: a GELU MLP 4
    n_embd wide (llama.cpp's falcon and bloom have no other). Falcon: a parallel block
    (one norm, or two where the file has attn_norm_2), the exact GELU (Falcon's own; llama.cpp computes the tanh one),
    RoPE over whole heads (llama.cpp refuses a partial one for falcon), no projection biases; BLOOM: ALiBi (max bias 8,
    fixed by llama.cpp), its embeddings' LayerNorm, the tanh GELU, every bias."""
    C = fields["n_embd"]
    if arch == "stablelm":
        return _stablelm_config(reader, path, fields, tensors, k)
    if fields["mlp_hidden"] != 4 * C:
        raise UserError(f"{path}: {k('feed_forward_length')} is {fields['mlp_hidden']}, not 4 x "
                        f"{k('embedding_length')} ({4 * C}), the only {arch} MLP this model has")
    kv = _positive(reader, k("attention.head_count_kv"), path, fields["n_head"])
    fields.update(mlp_hidden=0, n_kv_head=kv, norm="layernorm", mlp="gelu",
                  norm_eps=_decimal(_real(reader, k("attention.layer_norm_epsilon"), path, 1e-5)),
                  tie_weights="output.weight" not in tensors)
    if arch == "falcon":
        head_dim = C // fields["n_head"]
        rot = _positive(reader, k("rope.dimension_count"), path, head_dim)
        if rot != head_dim:  # (llama.cpp's load refuses it for falcon: "invalid n_rot")
            raise UserError(f"{path}: {k('rope.dimension_count')} is {rot}, not the head's {head_dim}: llama.cpp's "
                            "falcon rotates whole heads")
        scaling = _field(reader, k("rope.scaling.type"), path, "none")
        if scaling != "none":
            raise UserError(f"{path}: {k('rope.scaling.type')} is {scaling!r}: rescaled RoPE frequencies are not "
                            "read from a GGUF file (only unscaled RoPE, 'none')")
        fields.update(position_encoding="rope", rope_theta=_real(reader, k("rope.freq_base"), path, 10000.0),
                      bias=False, parallel_residual=True, shared_norm="blk.0.attn_norm_2.weight" not in tensors,
                      gelu_approximate="none")
    else:
        if kv != fields["n_head"]:
            raise UserError(f"{path}: {k('attention.head_count_kv')} is {kv}, but BLOOM has a key/value head for each "
                            f"of its {fields['n_head']} query heads")
        fields.update(position_encoding="alibi", embed_norm=True, bias=True, gelu_approximate="tanh")
    try:
        return GPTConfig(**fields)
    except UserError as e:
        raise UserError(f"{path}: its metadata gives no model this reads: {e}") from None


def _stablelm_config(reader, path, fields: dict, tensors: dict, k) -> GPTConfig:
    """A stablelm file's GPTConfig: LayerNorms with biases, a SwiGLU MLP, NeoX-style RoPE over rope.dimension_count
    (a partial rotary), and, as its tensors say (llama.cpp's stablelm loads each as optional): q/k/v biases
    (attn_q.bias), each head's own q/k LayerNorm weights (attn_q_norm), no ffn_norm for a parallel block on one norm."""
    head_dim = fields["n_embd"] // fields["n_head"]
    rot = _positive(reader, k("rope.dimension_count"), path, head_dim)
    scaling = _field(reader, k("rope.scaling.type"), path, "none")
    if scaling != "none":
        raise UserError(f"{path}: {k('rope.scaling.type')} is {scaling!r}: rescaled RoPE frequencies are not read "
                        "from a GGUF file (only unscaled RoPE, 'none')")
    parallel = "blk.0.ffn_norm.weight" not in tensors
    qk_norm = "blk.0.attn_q_norm.weight" in tensors
    fields.update(norm="layernorm", mlp="swiglu", position_encoding="rope", bias=False,
                  n_kv_head=_positive(reader, k("attention.head_count_kv"), path, fields["n_head"]),
                  rope_theta=_real(reader, k("rope.freq_base"), path, 10000.0),
                  rotary_dim=rot if rot != head_dim else 0,
                  norm_eps=_decimal(_real(reader, k("attention.layer_norm_epsilon"), path, 1e-5)),
                  qkv_bias_only="blk.0.attn_q.bias" in tensors, qk_norm=qk_norm,
                  qk_norm_width="each" if qk_norm else "head", parallel_residual=parallel, shared_norm=parallel,
                  tie_weights="output.weight" not in tensors)
    try:
        return GPTConfig(**fields)
    except UserError as e:
        raise UserError(f"{path}: its metadata gives no model this reads: {e}") from None


def _gemma_fields(reader, path, arch: str, fields: dict, head_dim: int, k) -> dict:
    """A Gemma's GPTConfig fields beyond Llama's, with what llama.cpp fixes by architecture (gguf_export.py's
    GEMMA_*): GeGLU, scaled embeddings, sandwich norms (gemma2, gemma3), the window over llama.cpp's local layers
    (attention.sliding_window), Gemma 3's local RoPE base, Gemma 2's soft caps, the scores' scale width."""
    out = dict(mlp="geglu", scale_embeddings=True, post_norms=arch != "gemma")
    if arch in GEMMA_SWA_PATTERN:
        # llama.cpp's gemma2 needs the key; its gemma3 reads a file without one (or 0) as global layers only
        window = _field(reader, k("attention.sliding_window"), path, None if arch == "gemma3" else ...)
        if window is not None and (isinstance(window, bool) or not isinstance(window, (int, np.integer))
                                   or window < 0):
            raise UserError(f"{path}: {k('attention.sliding_window')} must be an integer >= 0, got {window!r}")
        if window:
            local = gemma_local_layers(arch, fields["n_layer"])
            out.update(attention_window=int(window), window_layers=",".join(map(str, local)))
            if arch == "gemma3":
                out["rope_local_theta"] = GEMMA3_LOCAL_THETA
    if arch == "gemma2":
        caps = [_field(reader, k(f"{x}_logit_softcapping"), path, d) for x, d in zip(("attn", "final"),
                                                                                       GEMMA2_SOFTCAPS)]
        out.update(attn_softcap=caps[0], logit_softcap=caps[1])
    if arch == "gemma3":  # (llama.cpp reads an optional final cap for gemma3 too; Gemma 3's have none)
        out["logit_softcap"] = _field(reader, k("final_logit_softcapping"), path, 0.0)
    width = gemma_scale_width(arch, fields["n_layer"], fields["n_embd"], fields["n_head"], head_dim)
    out["attention_scale_width"] = 0 if width == head_dim else width
    return out


def gguf_names(cfg: GPTConfig, arch: str) -> dict:
    """{our parameter name: GGUF tensor name, or (name, first row, end row) of a fused one}: gpt2's and phi3's
    q/k/v in attn_qkv, phi3's gate and up in ffn_up (FUSED), split by load_gguf."""
    top = dict(GGUF_TOP)
    names = {"tok_emb.weight": top["tok_emb"] + ".weight", "final_norm.weight": top["final_norm"] + ".weight"}
    if not cfg.tie_weights:
        names["out_head.weight"] = top["out_head"] + ".weight"
    if arch == "gpt2":
        names.update({"pos_emb.weight": "position_embd.weight", "final_norm.bias": "output_norm.bias"})
    params = set()
    if arch in BIASED:  # (which biases the model has: the meta model's parameters, no memory)
        from tritongpt.model.gpt import GPTModel

        with torch.device("meta"):
            params = {n for n, _ in GPTModel(cfg).named_parameters()}
        ours, theirs = GGUF_EMBED_NORM
        for x in ("weight", "bias"):
            if f"{ours}.{x}" in params:
                names[f"{ours}.{x}"] = f"{theirs}.{x}"
        if "final_norm.bias" in params:
            names["final_norm.bias"] = top["final_norm"] + ".bias"
    for i in range(cfg.n_layer):
        b, g = f"trf_blocks.{i}.", f"blk.{i}."
        for ours, theirs in layer_table(arch, cfg):
            names[b + ours + ".weight"] = g + theirs + ".weight"
            if arch == "gpt2" or b + ours + ".bias" in params:
                names[b + ours + ".bias"] = g + theirs + ".bias"
        for ours, theirs in moe_layer(arch, cfg):  # (full names: the experts are parameters, not Linears)
            names[b + ours] = g + theirs
        for theirs, parts in FUSED.get(arch, {}).items():
            start = 0
            for ours, rows in zip(parts, fused_rows(cfg, theirs)):
                names[b + ours + ".weight"] = (g + theirs + ".weight", start, start + rows)
                if arch == "gpt2" or b + ours + ".bias" in params:  # (its biases fused as its matrices)
                    names[b + ours + ".bias"] = (g + theirs + ".bias", start, start + rows)
                start += rows
        if arch in ("qwen2", "qwen2moe"):
            for ours, theirs in QKV.items():
                names[b + ours + ".bias"] = g + theirs + ".bias"
    return names


def load_gguf(path, quantized: bool = True):
    """GPTModel (eval) with a .gguf file's weights: the blocks' linears kept in the file's own Q8_0 / Q4_0 / Q4_1 /
    Q4_K / Q6_K blocks where each is one of those (_load_kept; quantized False: never), else float32, each tensor
    dequantized as it is copied in."""
    from tritongpt.model.gpt import GPTModel, check_finite_weights

    path = Path(path)
    gguf, reader = _reader(path)
    arch, cfg = gguf_config(reader, path)
    names = gguf_names(cfg, arch)
    tensors = {t.name: t for t in reader.tensors}
    wanted = {n if isinstance(n, str) else n[0] for n in names.values()}
    # a fused tensor's rows: its parts' (a file with more would have rows no parameter reads)
    fused_total = {}
    for n in names.values():
        if not isinstance(n, str):
            fused_total[n[0]] = max(fused_total.get(n[0], 0), n[2])
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

    # (a mixture of experts is never kept: its experts are 3-D stacks no QuantLinear holds, and kernels/moe.py has no
    # int path; it runs as the float model its file stands for, attention too, one model in one form)
    if quantized and not cfg.n_experts:
        model = _load_kept(reader, path, arch, cfg, names, tensors, read, fused_total)
        if model is not None:
            return model
    model = GPTModel.empty(cfg)
    params = dict(model.named_parameters())
    # the file holds the vocabulary's rows; our padded ones (vocab_multiple) stay zero, never a token
    V = cfg.vocab_size
    fused = {}
    with torch.no_grad():
        for ours, theirs in names.items():
            p = params[ours]
            if isinstance(theirs, tuple):  # a fused tensor (attn_qkv, phi3's ffn_up): read once for its parts
                theirs, lo, hi = theirs
                if theirs not in fused:
                    fused = {theirs: read(theirs)}  # (one layer's at a time)
                    if fused[theirs].shape[0] != fused_total[theirs]:
                        raise UserError(f"{path}: tensor {theirs} has shape {tuple(fused[theirs].shape)}, but its "
                                        f"metadata says {fused_total[theirs]} rows")
                value = fused[theirs][lo:hi]
            else:
                value = read(theirs)
            if arch == "llama" and theirs.endswith(("attn_q.weight", "attn_k.weight")):
                value = unpermute_qk(value, cfg.n_head if "attn_q" in theirs else cfg.kv_heads)
            if theirs.endswith("ffn_gate_inp_shexp.weight") and value.dim() == 1:
                value = value[None]  # (llama.cpp's [C]: our shared_gate's one row)
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
        why = "float weights asked for" if not quantized else "the MoE kernel has no int path for its experts" \
            if cfg.n_experts else "no kernel here runs them as the file holds them"
        note(f"{path}: its {', '.join(kinds)} tensors are dequantized, {why}: the model is float32 here (the file's "
             "rounding, not its size)")
    return model.eval()


# The block formats whose linears are kept as the file holds them -> (our mode, group size). ggml-common.h's block_q8_0
# / q4_0 / q4_1 (blocks of 32 consecutive inputs of a row, an fp16 d, Q4_1's fp16 m, then the levels): Int8Linear
# with group scales of 32 (W = d q, q int8), Int4Linear of group 32 (W = q scale + offset, q 0..15). Of the K-quants
# (256-input super-blocks whose sub-blocks' scales are 6- or 8-bit multiples of an fp16 d), the two a Q4_K_M file
# holds: Q4_K (8 sub-blocks of 32, w = d sc q - dmin m: Int4Linear of group 32, scale d sc and offset -dmin m) and
# Q6_K (16 sub-blocks of 16, w = d sc (q - 32): Int8Linear of group 16, scale d sc). The rest stay dequantized:
# Q5_K's 5-bit levels with an offset (Int4Linear has 4 bits, Int8Linear no offset), the IQ types' codebook levels
# (no scale and offset a group gives them), and Q3_K / Q2_K (their 16-input sub-blocks would fit Int4Linear of
# group 16: not read so yet).
GGUF_BLOCK = 32
KEPT = {"Q8_0": ("int8", 32), "Q4_0": ("int4", 32), "Q4_1": ("int4", 32), "Q4_K": ("int4", 32),
        "Q6_K": ("int8", 16)}
QK_K = 256  # a K-quant super-block's inputs


def _fp16(raw) -> np.ndarray:
    """An fp16 field of each block ([..., 2] bytes, little-endian as ggml writes them) as float32: exact, every fp16
    is an fp32."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def gguf_packed(t, N: int, K: int):
    """(qweight, scale [N, K / G] fp32, offset or None) of a KEPT type's tensor of N rows of K inputs (G: KEPT's), the
    same matrix as gguf.quants.dequantize gives, bit for bit in fp32; None where ours cannot hold it exactly.
    - Q8_0 (d, 32 int8 q: w = d q): Int8Linear's q and scale d. llama.cpp's d is amax / 127 >= 0; 0 only for a block
      of zeros, stored as scale 1 and q 0 (check_quantized_scales wants scales > 0, as _int8_scale makes them). A
      negative d has no such form (-q overflows at -128): None.
    - Q4_0 (d, 16 bytes: byte j's low nibble element j, its high nibble element j + 16; w = d (q - 8)): Int4Linear's
      levels q, scale d and offset -8 d, exact (d an fp16, so d q and 8 d are exact in fp32, and so their sum, a
      multiple of d within fp32's 24 bits). llama.cpp's d is the signed largest value / -8, negative half the time:
      there the levels are flipped, q' = 15 - q, scale -d, offset 7 d (w = d (7 - q') = -d q' + 7 d), exact too.
    - Q4_1 (d, m, nibbles as Q4_0's: w = d q + m): scale d, offset m, the same fp32 sum gguf computes (the zero point
      held as the float m itself, never divided out as -m / d). d >= 0 (llama.cpp's range / 15); a negative one: None.
    - Q4_K, Q6_K: _k_quant_packed.
    A d of 0 (a constant block) is scale 1, levels 0 and the offset the value (Int4Linear's own constant group)."""
    kind = t.tensor_type.name
    if kind in ("Q4_K", "Q6_K"):
        return _k_quant_packed(kind, np.asarray(t.data, dtype=np.uint8).reshape(N, K // QK_K, -1), N, K)
    G = K // GGUF_BLOCK
    raw = np.asarray(t.data, dtype=np.uint8).reshape(N, G, -1)
    d = _fp16(raw[..., 0:2])
    if kind == "Q8_0":
        q = np.ascontiguousarray(raw[..., 2:]).view(np.int8).copy()
        if (d < 0).any():
            return None
        zero = d == 0
        q[zero], d[zero] = 0, 1
        return torch.from_numpy(q.reshape(N, K)), torch.from_numpy(d), None
    nibbles = raw[..., 4:] if kind == "Q4_1" else raw[..., 2:]
    q = np.concatenate([nibbles & 15, nibbles >> 4], axis=-1)  # [N, G, 32]: elements 0-15, then 16-31
    if kind == "Q4_0":
        neg = d < 0
        q[neg] = 15 - q[neg]
        scale, offset = np.abs(d), np.where(neg, 7 * d, -8 * d).astype(np.float32)
    else:
        if (d < 0).any():
            return None
        scale, offset = d, _fp16(raw[..., 2:4])
    zero = d == 0
    q[zero], scale[zero] = 0, 1
    if kind == "Q4_0":
        offset[zero] = 0
    return pack_int4(torch.from_numpy(q.reshape(N, K))), torch.from_numpy(scale), torch.from_numpy(offset)


def _k_quant_packed(kind: str, raw, N: int, K: int):
    """gguf_packed of a Q4_K / Q6_K tensor, raw its super-blocks (uint8 [N, K / 256, block bytes]); gguf.quants'
    Q4_K / Q6_K dequantize_blocks are the reference, read field by field as they read them.
    - Q4_K (block_q4_K: fp16 d, fp16 dmin, 12 bytes of 6-bit sub-scales sc and mins m for 8 sub-blocks of 32, 128
      bytes of nibbles: each 32 bytes hold a 64-run's elements j in their low nibbles, j + 32 in their high ones;
      w = (d sc) q - (dmin m) in fp32): Int4Linear of group 32, scale d sc and offset -(dmin m). d sc and dmin m are
      exact products (11 and 6 bits), so q scale + offset is gguf's fp32 sum itself (a - b is a + (-b)). llama.cpp's
      d is >= 0 (its largest sub-scale / 63); a negative one: None (flipped levels would change the sum's rounding).
      A sub-block of d sc 0 is scale 1, levels 0 and the offset its value.
    - Q6_K (block_q6_K: 128 bytes ql of the levels' low 4 bits, 64 bytes qh of their high 2, 16 int8 sub-scales of
      sub-blocks of 16, fp16 d; w = (d sc) (q - 32)): Int8Linear of group 16, levels q - 32 (-32..31) and scale
      d sc, every product exact (17 bits by 6). A negative d sc (sc is signed: llama.cpp writes them of either sign)
      is stored as the levels negated (-31..32, int8 still) and scale -d sc, exact too, as check_quantized_scales
      wants scales > 0; a d sc of 0 is scale 1 and levels 0."""
    B = K // QK_K
    if kind == "Q4_K":
        d, dmin = _fp16(raw[..., 0:2]), _fp16(raw[..., 2:4])
        sc6 = raw[..., 4:16].reshape(N, B, 3, 4)  # (gguf's get_scale_min / llama.cpp's get_scale_min_k4)
        a, b, c = sc6[..., 0, :], sc6[..., 1, :], sc6[..., 2, :]
        sc = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], axis=-1).astype(np.float32)  # [N, B, 8]
        mn = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], axis=-1).astype(np.float32)
        if (d < 0).any():
            return None
        scale = d[..., None] * sc
        offset = -(dmin[..., None] * mn)
        qs = raw[..., 16:].reshape(N, B, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(2, 1)
        q = (qs & 15).reshape(N, B * 8, 32)  # sub-block 2i: run i's low nibbles, 2i + 1: its high ones
        scale, offset = scale.reshape(N, B * 8), offset.reshape(N, B * 8)
        zero = scale == 0
        q[zero], scale[zero] = 0, 1
        return pack_int4(torch.from_numpy(q.reshape(N, K))), torch.from_numpy(scale), torch.from_numpy(offset)
    ql, qh = raw[..., :128], raw[..., 128:192]
    sc = np.ascontiguousarray(raw[..., 192:208]).view(np.int8).astype(np.float32)  # [N, B, 16]
    d = _fp16(raw[..., 208:210])
    lo = (ql.reshape(N, B, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(2, 1)) & 15
    hi = (qh.reshape(N, B, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1)) & 3
    q = (lo.reshape(N, B * 8, 32) | (hi.reshape(N, B * 8, 32) << 4)).astype(np.int8) - np.int8(32)
    q = q.reshape(N, B * 16, 16)
    scale = (d[..., None] * sc).reshape(N, B * 16)
    neg = scale < 0
    q[neg], scale[neg] = -q[neg], -scale[neg]
    zero = scale == 0
    q[zero], scale[zero] = 0, 1
    return torch.from_numpy(q.reshape(N, K)), torch.from_numpy(scale), None


def _load_kept(reader, path, arch, cfg, names, tensors, read, fused_total):
    """load_gguf's model with every linear of the blocks kept in the file's block format (KEPT), built by hf_quant's
    model_with_int4 as a GPTQ folder's is (the embedding, norms, biases and LM head float: dequantized, as GPTQ and
    AWQ leave a head float), or None (a note on stderr saying why) where some linear is of a type not kept, or some
    block holds what ours cannot hold exactly: the caller then dequantizes them all (a model is kept or float
    here). A file of several kept types (a Q4_K_M's Q4_K and Q6_K) keeps each linear in its own type's layout
    (model/quant.py mixed_layout); a fused tensor's parts (phi3's, gpt2's) share its one."""
    from tritongpt.model.gpt import GPTModel
    from tritongpt.train.hf_quant import model_with_int4

    with torch.device("meta"):  # (the shapes alone, to tell linears and check the file's against)
        ref = GPTModel(cfg)
    shapes = {k: tuple(v.shape) for k, v in ref.named_parameters()}
    linears = [n for n in names if n.startswith("trf_blocks.") and n.endswith(".weight")
               and isinstance(ref.get_submodule(n.removesuffix(".weight")), torch.nn.Linear)]
    theirs = lambda n: names[n] if isinstance(names[n], str) else names[n][0]  # noqa: E731
    kinds = sorted({tensors[theirs(n)].tensor_type.name for n in linears})
    if not linears or not set(kinds) <= set(KEPT):
        if set(kinds) & set(KEPT):  # (a float file needs no word: it is what it was)
            note(f"{path}: its blocks' linears are {', '.join(kinds)}: kept quantized only where each is one of "
                 f"{', '.join(KEPT)}, so all are dequantized")
        return None
    layouts = {n.removesuffix(".weight"): KEPT[tensors[theirs(n)].tensor_type.name] for n in linears}
    sd, packed, fused = {}, {}, {}
    for ours in linears:
        name, rows = (names[ours], None) if isinstance(names[ours], str) else (names[ours][0],
                                                                                slice(*names[ours][1:]))
        want = shapes[ours]
        t = tensors[name]
        N, K = (int(s) for s in reversed(t.shape))
        said = (want[0] if rows is None else fused_total[name], want[1])
        if (N, K) != said:
            raise UserError(f"{path}: tensor {name} has shape {(N, K)}, but its metadata says {said}")
        if name not in fused:
            got = gguf_packed(t, N, K)
            if got is None:
                note(f"{path}: tensor {name} is {t.tensor_type.name} with a negative block scale, which "
                     f"{KEPT[t.tensor_type.name][0]} here does not hold exactly: all are dequantized")
                return None
            fused = {name: got} if rows is not None else {}  # (a fused tensor: one at a time, read once)
        else:
            got = fused[name]
        parts = [None if x is None else (x if rows is None else x[rows]) for x in got]
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            # the interleaved rows back in rotate-half order: a row's bytes, scales and offsets move together
            heads = cfg.n_head if "attn_q" in name else cfg.kv_heads
            parts = [None if x is None else unpermute_qk(x, heads) for x in parts]
        base = ours.removesuffix(".weight")
        packed[base] = (*(x.contiguous() for x in parts if x is not None), None)
        sd[ours] = torch.empty(want, device="meta")  # (model_with_int4 finds the layer by this tensor)

    def mapping():
        out = {}
        for ours, name in names.items():
            if ours in sd:
                out[ours] = sd[ours]
                continue
            value = read(name) if isinstance(name, str) else read(name[0])[name[1]:name[2]]
            if tuple(value.shape) != shapes[ours]:
                raise UserError(f"{path}: tensor {name} has shape {tuple(value.shape)}, but its metadata says "
                                f"{shapes[ours]}")
            out[ours] = value
        return out

    forms = sorted(set(layouts.values()))
    model = model_with_int4(cfg, mapping, sd, packed, forms[0][1], path, quantized_from="gguf",
                            layouts=layouts if len(forms) > 1 else None)
    floats = sorted({tensors[theirs(n)].tensor_type.name for n in names if n not in sd} - {"F32"})
    how = [f"{mode} (groups of {group} inputs)" + ("" if len(forms) == 1 else " where " + "/".join(
        k for k in kinds if KEPT[k] == (mode, group))) for mode, group in forms]
    note(f"{path}: its {len(linears)} {'/'.join(kinds)} linears of the blocks kept as {', '.join(how)}"
         + (f"; its {', '.join(floats)} embedding / head tensors dequantized to float32" if floats else ""))
    return model


def gguf_tokenizer(path):
    """The HFTokenizer of a .gguf file's tokenizer.ggml.* metadata (byte-level BPE, "gpt2"): its vocabulary (the
    [PAD] rows, type UNUSED, left out), merges, pre-tokenizer (PRE_PATTERNS), special tokens (type CONTROL), BOS, EOS,
    pad, whether a BOS is prepended (add_bos_token), and its chat template; a SentencePiece one ("llama"): _spm_spec."""
    path = Path(path)
    _, reader = _reader(path)
    kind = _field(reader, "tokenizer.ggml.model", path)
    if kind not in ("gpt2", "llama"):
        raise UserError(f"{path}: tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') and SentencePiece's "
                        "BPE ('llama') are read from a GGUF file: pass a tokenizer folder (--tokenizer)")
    tokens = _strings(reader, "tokenizer.ggml.tokens", path)
    types = _typed(reader, "tokenizer.ggml.token_type", path, list, "a list of token types", [1] * len(tokens))
    merges = _merges(reader, path, [])
    if len(types) != len(tokens):
        raise UserError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries, tokenizer.ggml.tokens "
                        f"{len(tokens)}")
    if kind == "llama":
        spec = _spm_spec(reader, path, tokens, types)
        return _wrap(reader, path, spec, tokens, {t: i for i, t in enumerate(tokens)})
    pre = _field(reader, "tokenizer.ggml.pre", path, "default")
    if pre not in PRE_PATTERNS:
        raise UserError(f"{path}: tokenizer.ggml.pre is {pre!r}, none of the pre-tokenizers read from a GGUF file "
                        f"({', '.join(PRE_PATTERNS)}): its text would be split otherwise and give other ids; pass a "
                        "tokenizer folder (--tokenizer)")
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
    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": pre_tok, "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab, "merges": [m.split(" ", 1) for m in merges]}}
    return _wrap(reader, path, spec, tokens, vocab)


def _strings(reader, key, path, default=...):
    """A list of strings (tokenizer.ggml.tokens, .merges), refused by name otherwise: a lone string would be read
    as a list of its characters."""
    v = _typed(reader, key, path, list, "a list of strings", default)
    if v is not default and not all(isinstance(x, str) for x in v):
        bad = next(x for x in v if not isinstance(x, str))
        raise UserError(f"{path}: {key} must be a list of strings, got {bad!r} among them")
    return v


def _merges(reader, path, default):
    """tokenizer.ggml.merges, each "left right" (llama.cpp splits at the first space after the first character);
    one without that space is refused by name, not left to the tokenizers library's untagged-enum error."""
    merges = _strings(reader, "tokenizer.ggml.merges", path, default)
    for i, m in enumerate(merges or ()):
        if m.find(" ", 1) == -1:
            raise UserError(f"{path}: tokenizer.ggml.merges entry {i} is {m!r}, not two tokens joined by a space "
                            "(\"left right\")")
    return merges


def _wrap(reader, path, spec: dict, tokens: list, vocab: dict):
    """spec as the HFTokenizer of the file: its BOS, EOS and pad (tokenizer.ggml.*_token_id), the BOS prepended
    where add_bos_token says (SentencePiece's "llama": unless it says not, as llama.cpp and transformers do), EOS
    appended where add_eos_token says, and its chat template."""
    from tritongpt.train.hf_tokenizer import HFTokenizer

    def token(key):
        i = _typed(reader, key, path, (int, np.integer), "a token id (an integer)", None)
        if i is None:
            return None
        if not 0 <= i < len(tokens) or tokens[i] not in vocab:
            raise UserError(f"{path}: {key} {i} is not a token of tokenizer.ggml.tokens")
        return tokens[i]

    bos, eos, pad = (token(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding"))
    spm = _field(reader, "tokenizer.ggml.model", path) == "llama"
    add_bos = _flag(reader, "tokenizer.ggml.add_bos_token", path, spm) and bos is not None
    add_eos = _flag(reader, "tokenizer.ggml.add_eos_token", path, False) and eos is not None
    ends = [t for t, add in ((bos, add_bos), (eos, add_eos)) if add]
    if ends:  # (transformers' template: the BOS before the text, the EOS after)
        single = ([{"SpecialToken": {"id": bos, "type_id": 0}}] if add_bos else []) + \
            [{"Sequence": {"id": "A", "type_id": 0}}] + ([{"SpecialToken": {"id": eos, "type_id": 0}}] if add_eos else [])
        spec["post_processor"] = {"type": "TemplateProcessing", "single": single,
                                  "pair": single + [{"Sequence": {"id": "B", "type_id": 1}}],
                                  "special_tokens": {t: {"id": t, "ids": [vocab[t]], "tokens": [t]} for t in ends}}
    tok = HFTokenizer(spec, eos_token=eos, bos_token=bos, name=path.stem, info={"source": str(path)},
                      where=str(path), no_eos=f"{path} has no tokenizer.ggml.eos_token_id")
    if pad is not None:
        tok.template_tokens = {"pad_token": pad}
    tok.chat_template = _typed(reader, "tokenizer.chat_template", path, str, "a string (a Jinja template)",
                               None)
    return tok


def _spm_spec(reader, path, tokens: list, types: list) -> dict:
    """The tokenizers-library spec of a SentencePiece vocabulary (tokenizer.ggml.model "llama"), as transformers'
    GGUF reader builds it (integrations/gguf: LlamaTokenizer, GemmaTokenizer, Phi-3's): a BPE with byte fallback
    over the tokens as the file spells them, its merges the file's tokenizer.ggml.merges or else ranked by the
    tokens' scores (spm_merges; a Gemma's by the tokens' order, which its scores do not follow); CONTROL tokens
    special, USER_DEFINED ones added whole. Spaces are "▁": a Metaspace pre-tokenizer prepending one to the text
    unless tokenizer.ggml.add_space_prefix says not (llama.cpp's reading of that key; transformers' ignores it),
    Gemma's without one (and its all-space tokens spelled "▁"), Phi-3's prepended by a normalizer (" hi" is
    "▁▁hi" there, "▁hi" under Metaspace). The decoder: "▁" back to spaces, byte tokens to bytes, the prefix off."""
    arch = _typed(reader, "general.architecture", path, str, "a string")
    gemma = arch.startswith("gemma")
    if gemma:
        tokens = [SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}  # (every row, UNUSED too, as transformers keeps them)
    merges = _merges(reader, path, None)
    if merges is None:
        if gemma:
            ranks = {t: -i for i, t in enumerate(tokens)}
        else:
            scores = _typed(reader, "tokenizer.ggml.scores", path, list, "a list of numbers", None)
            if scores is None:
                raise UserError(f"{path}: a SentencePiece vocabulary (tokenizer.ggml.model 'llama') with neither "
                                "tokenizer.ggml.scores nor tokenizer.ggml.merges: nothing says how its tokens merge")
            if len(scores) != len(tokens):
                raise UserError(f"{path}: tokenizer.ggml.scores has {len(scores)} entries, tokenizer.ggml.tokens "
                                f"{len(tokens)}")
            bad = next((x for x in scores if isinstance(x, bool) or not isinstance(x, (int, float))), None)
            if bad is not None:  # (float() of a string would be a ValueError, or a rank the writer never meant)
                raise UserError(f"{path}: tokenizer.ggml.scores must be a list of numbers, got {bad!r} among them")
            ranks = dict(zip(tokens, (float(x) for x in scores)))
        merges = spm_merges(vocab, ranks)
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": k == CONTROL} for i, (t, k) in enumerate(zip(tokens, types)) if k in (CONTROL, USER_DEFINED)]
    prefix = _flag(reader, "tokenizer.ggml.add_space_prefix", path, True) and not gemma
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
    normalizer, pre_tok = None, {"type": "Metaspace", "replacement": SPACE,
                                 "prepend_scheme": "first" if prefix else "never", "split": False}
    if gemma:
        normalizer = replace
        pre_tok = {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False}
    elif arch == "phi3" and prefix:
        normalizer, pre_tok = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": SPACE},
                                                                    replace]}, None
    decoders = [{"type": "Replace", "pattern": {"String": SPACE}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}] + ([{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if prefix else [])
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": normalizer,
            "pre_tokenizer": pre_tok, "post_processor": None, "decoder": {"type": "Sequence", "decoders": decoders},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                      "vocab": vocab, "merges": [m.split(" ", 1) for m in merges]}}
