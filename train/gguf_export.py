"""GGUF export: one .gguf file that llama.cpp (and Ollama, LM Studio, anything built on it) runs.

GGUF is ggml's single-file format: key/value metadata (the architecture's hyperparameters, the tokenizer's
vocabulary, and its merges or scores) followed by the tensors, each in its own type (F32, F16, BF16, or a block
quantization: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 here). It is written with the `gguf` package, ggml's own writer
(pip install -e ".[gguf]"), imported only here. Tensor names and layouts are the ones llama.cpp's
convert_hf_to_gguf.py writes, so llama.cpp reads the file as it reads that script's:

- GPT-2 ("gpt2"): q, k and v fused in one attn_qkv [3C, C], every matrix [out, in] (Hugging Face's Conv1D
  [in, out] is what that script transposes; ours are Linear weights already).
- Llama ("llama", Mistral without its window too): q and k rows permuted within each head from Hugging Face's
  rotate-half pairing (i, i + d/2) to the interleaved (2i, 2i + 1) pairs llama.cpp's "normal" RoPE rotates.
- Qwen2 ("qwen2"): as Llama, with q/k/v biases and no permute (llama.cpp rotates Qwen2 in NeoX style, halves).
- Qwen3 ("qwen3"): as Qwen2 without the biases, with each head's q and k RMSNorm weights (attn_q_norm and
  attn_k_norm, [head_dim]), heads possibly of their own width (key_length, value_length).
- Gemma ("gemma"), Gemma 2 ("gemma2"), Gemma 3 ("gemma3"): Llama's tensors unpermuted (llama.cpp rotates them in
  NeoX style), the head tied; Gemma 2 and 3 with their sandwich norms (post_attention_norm, post_ffw_norm), Gemma 3
  with q/k norms. Gemma's RMSNorm multiplies by 1 + w, and convert_hf_to_gguf.py writes every norm as w + 1 for
  llama.cpp's plain RMSNorm: ours hold 1 + w already (gemma_weights.py), written as they are. What llama.cpp does
  not read from the file it fixes by architecture, and a model that differs is refused: the embeddings' sqrt(n_embd)
  scale, the scores' 1/sqrt(head_dim) (n_embd / n_head in the 27Bs: gemma_scale_width), Gemma 2's local layers the
  even ones, Gemma 3's five of every six with a local RoPE base of 10000, Gemma 2's soft caps always on.
- Phi-3 ("phi3", export_target's Phi-3: a partial rotary, rope.dimension_count): q, k and v fused in attn_qkv (the
  k and v rows fewer under GQA), gate and up in ffn_up (FUSED), unpermuted (NeoX-style RoPE). LongRoPE (its
  rope_factors_long / _short tensors, which llama.cpp picks by the context size it runs with, not by each sequence's
  length as the model does) is refused by name; a window is written, with a note that llama.cpp's phi3 runs without.
- Mixtures of experts: Mixtral as a "llama" with experts, Qwen3-MoE ("qwen3moe"), Qwen2-MoE ("qwen2moe", with its
  gated shared expert), OLMoE ("olmoe"): the router ffn_gate_inp (F32 always) and the experts stacked in 3-D
  ffn_*_exps tensors (MOE_ARCHS says where). GPT-OSS ("gpt-oss") is refused by name.
- Falcon ("falcon": convert_hf_to_gguf.py's FalconModel, llama.cpp's llama_model_falcon): q, k and v fused in
  attn_qkv as all the queries, then the keys, then the values (the converter regroups Hugging Face's per-group
  query_key_value, its "jploski" layout: ours are in that order already), no biases but the LayerNorms'; always a
  parallel block, on one norm (attn_norm: Falcon-7B) or two, where llama.cpp's attention reads attn_norm_2
  (Falcon-40B's ln_attn) and its MLP attn_norm (ln_mlp), as gguf's tensor map names them; RoPE in NeoX style over
  whole heads. llama.cpp's GELU (ggml_gelu) is the tanh one where Falcon's is exact, as for every Falcon llama.cpp
  converts. Falcon-RW (ALiBi), a sequential block and biases on the projections have no place there: refused.
- BLOOM ("bloom": BloomModel, llama_model_bloom): token_embd_norm (the embeddings' LayerNorm), q, k and v fused in
  attn_qkv as queries, keys, values (the converter regroups Hugging Face's per-head rows), every bias; ALiBi with
  a max bias of 8 that llama.cpp fixes by architecture (hparams.f_max_alibi_bias): BLOOM's slopes.
- StableLM ("stablelm": StableLMModel, llama_model_stablelm): Llama's tensors unpermuted (NeoX-style RoPE over
  rope.dimension_count, the partial rotary), LayerNorms with biases, q/k/v biases where the model has them (Stable LM
  2 1.6B), each head's own q/k norm weights as attn_q_norm / attn_k_norm [n_head, head_dim] (StableLM 2 12B), and no
  ffn_norm for the parallel block on one norm (12B: llama.cpp and transformers' GGUF loader read its absence so). The
  head is written as output even where tied: llama.cpp's stablelm loads output without a token_embd fallback.

Tensor types (--gguf-type): F32, F16, BF16; ggml's blocks of 32 inputs that the gguf package quantizes in Python:
Q8_0, Q4_0, Q4_1, Q5_0, Q5_1; or llama.cpp's K-quant mixes Q4_K_M, Q4_K_S, Q5_K_M, Q5_K_S, Q6_K, blocks of 256
that gguf only dequantizes, quantized here by gguf_kquant.py (numpy, after ggml-quants.c's reference quantizers).
Which tensor takes which type is llama-quant.cpp's llama_tensor_get_type with no importance matrix (tensor_type):
norms, biases (1-D) and GPT-2's position embeddings stay F32 (it quantizes 2-D tensors only, never position_embd);
the LM head (output, or token_embd where it is tied and so is the head) goes as Q6_K for every quantized type but
Q8_0 (which keeps it Q8_0), or Q8_0 where its rows are not whole blocks of the type; an untied token_embd takes the
mix's base type. The _M mixes give attn_v and ffn_down Q6_K on the "use_more_bits" layers (the first and last
eighth and every third between), Q4_K_S gives the first 4 attn_v and the first eighth of ffn_down Q5_K, a fused
attn_qkv (GPT-2, Phi-3) is Q5_K in Q4_K_M and Q6_K in Q5_K_M, and a 70B Llama's (80 layers, GQA) Q4_K attn_v Q5_K. A
matrix whose rows are not whole blocks of 256 falls back as llama-quant.cpp's tensor_type_fallback does: Q4_K to
Q5_0, Q5_K to Q5_1, Q6_K to Q8_0; and one whose rows are not whole blocks of 32 goes as F16, as
convert_hf_to_gguf.py does for Q8_0 (llama-quantize refuses it outright).

An already quantized model (Int8Linear / Int4Linear with groups of 32 and fp16 scales, as gguf_import.py keeps a
Q8_0 / Q4_0 / Q4_1 file) is written to the matching type by copying its levels and scales into ggml's blocks
(_exact_blocks): no second rounding, so .gguf -> kept model -> .gguf gives the same bytes (but for a Q6_K head: the
kept model's head is float, and Q6_K's search run again on its own values need not find the same blocks). Where its
groups are not the type's (`tritongpt quantize`'s per-row int8, int4 at another group size or act-order, scales no
fp16 holds as its fp32 range / 15 are; asymmetric int4 as Q4_0; any K-quant, whose nested scales no group of ours
is) the matrix is dequantized and quantized again, with a note.

A model these cannot hold is refused by name before anything is written."""
import json
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from tritongpt.errors import UserError, note

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s",
              "q6_k")
# ggml's block types of 32 inputs a block that gguf.quants can quantize (its K-quants it can only dequantize)
BLOCK_TYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
GGUF_BLOCK = 32
# llama.cpp's K-quant mixes -> the type most of their matrices take (llama_ftype_get_default_type), blocks of QK_K
K_MIXES = {"q4_k_m": "q4_k", "q4_k_s": "q4_k", "q5_k_m": "q5_k", "q5_k_s": "q5_k", "q6_k": "q6_k"}
QK_K = 256
# llama-quant.cpp's tensor_type_fallback: a K-quant for rows that are not whole blocks of 256
K_FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
INSTALL = 'pip install -e ".[gguf]"'
# llama.cpp's name for the pre-tokenizer regex a byte-level BPE vocabulary was learned over (its
# tokenizer.ggml.pre): the regex itself is not in the file, llama.cpp and transformers pick it by this name
LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PAT = LLAMA3_PAT.replace(r"\p{N}{1,3}", r"\p{N}")
PRE_NAMES = {LLAMA3_PAT: "llama-bpe", QWEN2_PAT: "qwen2"}
# llama.cpp's token types (gguf.TokenType): a normal token, a special one (<|endoftext|>), an added non-special
# one (matched whole in text), a padding row no text encodes to
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # SentencePiece's "▁": a space, inside its pieces


def import_gguf():
    try:
        import gguf
    except ImportError:
        raise UserError(f"--format gguf writes with the gguf package (ggml's own writer), which is not installed: "
                        f"{INSTALL}") from None
    return gguf


def gguf_arch(cfg, family: str) -> str:
    """The llama.cpp architecture this model is written as, from the Hugging Face family export_target picks:
    GPT-2 -> "gpt2", Llama and Mistral -> "llama" (convert_hf_to_gguf.py writes Mistral as a Llama), Qwen2 ->
    "qwen2", Qwen3 -> "qwen3", Gemma, Gemma 2 and Gemma 3 -> "gemma", "gemma2", "gemma3", Phi-3 (a partial rotary:
    export_target's Phi-3) -> "phi3", Falcon -> "falcon", BLOOM -> "bloom", StableLM -> "stablelm"; any other
    family is refused by name."""
    arch = {"GPT-2": "gpt2", "Llama": "llama", "Mistral": "llama", "Qwen2": "qwen2", "Qwen3": "qwen3",
            "Gemma": "gemma", "Gemma 2": "gemma2", "Gemma 3": "gemma3", "Phi-3": "phi3", "Falcon": "falcon",
            "BLOOM": "bloom", "StableLM": "stablelm", **MOE_ARCHS}.get(family)
    if arch is None:
        raise UserError(f"this model is {_article(family)} {family}, which the GGUF writer does not write (it writes "
                        "GPT-2, Llama (a Mistral without its window is one), Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3, "
                        "Phi-3, Falcon, BLOOM, StableLM, and the mixtures of experts Mixtral, Qwen3-MoE, Qwen2-MoE and OLMoE): "
                        "export it as a Hugging Face folder (without --format gguf) and convert that with llama.cpp's "
                        "convert_hf_to_gguf.py if it knows the family")
    return arch


# Mixtures of experts, as convert_hf_to_gguf.py writes them (LlamaModel with num_local_experts: Mixtral is a
# "llama" with experts; Qwen2MoeModel, Qwen3MoeModel, OlmoeModel): each block's router ffn_gate_inp [E, C] and its
# experts stacked in 3-D tensors ffn_gate_exps / ffn_up_exps [E, H, C], ffn_down_exps [E, C, H] (ggml's shapes
# {C, H, E}, {H, C, E}: llama-model.cpp's create_tensor); the counts in {arch}.expert_count / expert_used_count.
# GPT-OSS ("gpt-oss": attention sinks, expert biases, the clamped SwiGLU, MXFP4 experts) is not written here.
MOE_ARCHS = {"Mixtral": "llama", "Qwen3-MoE": "qwen3moe", "Qwen2-MoE": "qwen2moe", "OLMoE": "olmoe"}
# Whether llama.cpp renormalizes the top k router weights (build_moe_ffn's norm_w, fixed by architecture, read from
# no key): llm_build_llama and llm_build_qwen3moe pass true, llm_build_qwen2moe and llm_build_olmoe false. So a
# Qwen3-MoE with norm_topk_prob false, or a Qwen2-MoE / OLMoE with it true, has no file llama.cpp runs alike.
MOE_NORM_TOPK = {"llama": True, "qwen3moe": True, "qwen2moe": False, "olmoe": False}
# (our parameter, GGUF's tensor) of each block's MoE MLP; Qwen2-MoE's shared expert beside it (its gate
# ffn_gate_inp_shexp a 1-D [C] in llama.cpp, our shared_gate's [1, C] row)
MOE_LAYER = (("ff.router.weight", "ffn_gate_inp.weight"), ("ff.w_gate", "ffn_gate_exps.weight"),
             ("ff.w_up", "ffn_up_exps.weight"), ("ff.w_down", "ffn_down_exps.weight"))
SHEXP_LAYER = (("ff.shared_gate.weight", "ffn_gate_inp_shexp.weight"),
               ("ff.shared_expert.w_gate.weight", "ffn_gate_shexp.weight"),
               ("ff.shared_expert.w_up.weight", "ffn_up_shexp.weight"),
               ("ff.shared_expert.w_down.weight", "ffn_down_shexp.weight"))


def moe_layer(arch: str, cfg) -> tuple:
    """MOE_LAYER, with SHEXP_LAYER for a model with a shared expert (Qwen2-MoE's); () for a dense one."""
    if not cfg.n_experts:
        return ()
    return MOE_LAYER + (SHEXP_LAYER if cfg.moe_shared_hidden else ())


def layer_table(arch: str, cfg) -> tuple:
    """GGUF_LAYER[arch], with Falcon's norms as its block has them: one (norm1: attn_norm, read by both) or two, where
    llama.cpp's falcon feeds attention attn_norm_2 and the MLP attn_norm (llama_model_falcon's graph; gguf's tensor
    map: ln_attn -> attn_norm_2, ln_mlp -> attn_norm); a MoE's without the dense MLP's rows (moe_layer names its own)."""
    table = GGUF_LAYER[arch]
    if arch == "stablelm":  # (no norm2 in a shared-norm block; each head's own q/k norm weights with qk_norm)
        table = tuple(x for x in table if x[0] != "norm2" or not cfg.shared_norm)
        if cfg.qk_norm:
            table += GGUF_LAYER["qwen3"][-2:]
    if arch == "falcon":
        table += ((("norm1", "attn_norm"),) if cfg.shared_norm else
                  (("norm1", "attn_norm_2"), ("norm2", "attn_norm")))
    return tuple(r for r in table if not r[0].startswith("ff.")) if cfg.n_experts else table


def _article(name: str) -> str:
    return "an" if name[0] in "AEIOU" else "a"


GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")
# what llama.cpp fixes by architecture for the Gemmas, not read from the file (llama-model.cpp's hparams): which
# layers slide their window (set_swa_pattern: Gemma 2's even layers, Gemma 3's five of every six), Gemma 3's local
# RoPE base (rope_freq_base_train_swa), Gemma 2's soft caps when the file has no keys (llama-hparams.h's defaults)
GEMMA_SWA_PATTERN = {"gemma2": 2, "gemma3": 6}
GEMMA3_LOCAL_THETA = 10000.0
GEMMA2_SOFTCAPS = (50.0, 30.0)  # (attention, final logits)
# the layer counts llama.cpp takes for the 27Bs, whose scores it scales by n_embd / n_head (query_pre_attn_scalar)
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def gemma_local_layers(arch: str, n_layer: int) -> list:
    """The layers llama.cpp's set_swa_pattern(n) makes local: layer i where i % n < n - 1."""
    n = GEMMA_SWA_PATTERN[arch]
    return [i for i in range(n_layer) if i % n < n - 1]


def gemma_scale_width(arch: str, n_layer: int, n_embd: int, n_head: int, head_dim: int) -> int:
    """The width whose 1/sqrt llama.cpp scales a Gemma's scores by: the head's, but n_embd / n_head in a model of the
    27B's layer count (gemma2: 46, gemma3: 62), as llama-model.cpp picks it."""
    return n_embd // n_head if GEMMA_27B_LAYERS.get(arch) == n_layer else head_dim


def refuse_not_gguf(model, arch: str, what: str) -> None:
    """What llama.cpp's architecture (as this writer writes it) has no key or tensor for, beyond what the Hugging
    Face family already refuses: its logits would differ."""
    cfg = model.config
    if arch == "gpt2":
        return  # refuse_not_gpt2 has said all of it: GGUF's gpt2 is Hugging Face's GPT-2
    if arch in GEMMA_ARCHS:
        _refuse_not_gemma_gguf(cfg, arch, what)
    if arch == "phi3" and (cfg.rope_scaling or {}).get("rope_type") == "longrope":
        raise UserError(f"this model has LongRoPE (rope_scaling {cfg.rope_scaling['rope_type']!r}: Phi-3's 128k, "
                        "Phi-4-mini), which this writer does not write (llama.cpp's rope_factors_long / "
                        f"rope_factors_short, picked there by the context size, not the sequence's): it cannot be "
                        f"exported as {what}")
    if arch == "falcon":  # (llama-model.cpp's llama_model_falcon: its tensors and graph)
        for differs, why in ((cfg.position_encoding != "rope", f"{cfg.positions_said()} (Falcon-RW's ALiBi), where "
                              "llama.cpp's falcon rotates q and k (RoPE)"),
                             (not cfg.parallel_residual, "has sequential blocks, where llama.cpp's falcon always runs "
                              "attention and MLP side by side on the block's input"),
                             (cfg.bias, "has biases on its projections, which llama.cpp's falcon has no tensors for")):
            if differs:
                raise UserError(f"this model {why}: it cannot be exported as {what}")
    # (phi3's window covers every layer, as refuse_not_phi3 has checked)
    for differs, why in ((bool(cfg.attention_window) and arch not in (*GEMMA_SWA_PATTERN, "phi3"), f"has local "
                          "attention "
                          f"(attention_window {cfg.attention_window}), which llama.cpp's {arch} does not"),
                         (cfg.rope_scaling is not None, f"rescales its RoPE frequencies (rope_scaling "
                          f"{cfg.rope_scaling}), which this writer does not write (no rope.scaling keys)"),
                         (arch == "llama" and cfg.bias, "has biases in its linear layers, which this writer's llama "
                          "does not write"),
                         (arch in ("qwen2", "qwen2moe") and cfg.bias, "has biases in its MLP, where Qwen2's are on "
                          "q, k and v only"),
                         # llama.cpp's qwen2 loads attn_q and attn_output as [n_embd, n_embd] whatever key_length
                         # says (llama's reads n_head * key_length): a head width of its own fails to load there
                         (arch in ("qwen2", "qwen2moe") and cfg.head_dim * cfg.n_head != cfg.n_embd, f"has heads of "
                          f"their own width ({cfg.n_head} heads of {cfg.head_dim} over n_embd {cfg.n_embd}), where "
                          f"llama.cpp's {arch} has n_embd / n_head"),
                         (bool(cfg.n_experts) and cfg.moe_norm_topk != MOE_NORM_TOPK.get(arch), f"has "
                          f"moe_norm_topk {cfg.moe_norm_topk} (its top {cfg.experts_per_token} router weights "
                          f"{'' if cfg.moe_norm_topk else 'not '}renormalized), where llama.cpp's {arch} "
                          f"{'always' if MOE_NORM_TOPK.get(arch) else 'never'} renormalizes them (fixed by "
                          "architecture: no key says it)")):
        if differs:
            raise UserError(f"this model {why}: it cannot be exported as {what}")


def _refuse_not_gemma_gguf(cfg, arch: str, what: str) -> None:
    """What a Gemma's file cannot say, llama.cpp fixing it by architecture (GEMMA_SWA_PATTERN, ...)."""
    local = list(cfg.local_layers) if cfg.attention_window else []
    width = cfg.attention_scale_width or cfg.head_dim
    theirs = gemma_scale_width(arch, cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_dim)
    checks = [(not cfg.tie_weights and arch != "gemma3", f"has an LM head of its own, where llama.cpp's {arch} "
               "always computes the logits with token_embd (tied)"),
              (width != theirs, f"scales its attention scores by 1/sqrt({width}), where llama.cpp's {arch} of "
               f"{cfg.n_layer} layers scales them by 1/sqrt({theirs})")]
    if arch in GEMMA_SWA_PATTERN:
        want = gemma_local_layers(arch, cfg.n_layer)
        checks.append((local != want, f"has local attention in layers {local or 'none'}, where llama.cpp's {arch} "
                       f"slides its window over layers {want} (it reads the window from the file, never which "
                       "layers)"))
    if arch == "gemma2":
        checks.append((not cfg.attn_softcap or not cfg.logit_softcap, "does not soft-cap both its attention "
                       f"scores and its logits (attn_softcap {cfg.attn_softcap:g}, logit_softcap "
                       f"{cfg.logit_softcap:g}), which llama.cpp's gemma2 always does"))
    if arch == "gemma3":
        theta = cfg.rope_local_theta or cfg.rope_theta
        checks += [(theta != GEMMA3_LOCAL_THETA, f"rotates its local layers with a RoPE base of {theta:g}, where "
                    f"llama.cpp's gemma3 fixes it at {GEMMA3_LOCAL_THETA:g}"),
                   (bool(cfg.logit_softcap), f"soft-caps its logits ({cfg.logit_softcap:g}), which the gemma3 this "
                    "writer writes does not (transformers' GGUF loader reads no cap for it)")]
    for differs, why in checks:
        if differs:
            raise UserError(f"this model {why}: it cannot be exported as {what}")


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute: each head's rows from rotate-half order (i and i + d/2 are a
    pair) to interleaved (2i, 2i + 1), the pairs llama.cpp's llama rotates. Biases ([rows]) the same way."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """permute_qk's inverse (gguf_import.py): a llama file's interleaved rows back to rotate-half order."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# Our parameter names -> GGUF's (convert_hf_to_gguf.py's), written here and read back by gguf_import.py. Whole-model
# tensors; then each block's (trf_blocks.{i}.X -> blk.{i}.Y); GPT-2 fuses q, k and v in one attn_qkv (GPT2_QKV).
GGUF_TOP = (("tok_emb", "token_embd"), ("final_norm", "output_norm"), ("out_head", "output"))
GGUF_LAYER = {
    "gpt2": (("att.out_proj", "attn_output"), ("ff.fc1", "ffn_up"), ("ff.fc2", "ffn_down"), ("norm1", "attn_norm"),
             ("norm2", "ffn_norm")),
    "llama": (("norm1", "attn_norm"), ("norm2", "ffn_norm"), ("att.W_query", "attn_q"), ("att.W_key", "attn_k"),
              ("att.W_value", "attn_v"), ("att.out_proj", "attn_output"), ("ff.w_gate", "ffn_gate"),
              ("ff.w_up", "ffn_up"), ("ff.w_down", "ffn_down")),
}
GGUF_LAYER["qwen2"] = GGUF_LAYER["llama"]
# Qwen3's per-head q/k RMSNorms: one [head_dim] weight each, shared by every head (llama.cpp's attn_q_norm, attn_k_norm)
GGUF_LAYER["qwen3"] = GGUF_LAYER["llama"] + (("att.q_norm", "attn_q_norm"), ("att.k_norm", "attn_k_norm"))
# Gemma: Llama's (unpermuted); Gemma 2's sandwich norms after each sublayer; Gemma 3's q/k norms on top
GGUF_LAYER["gemma"] = GGUF_LAYER["llama"]
GGUF_LAYER["gemma2"] = GGUF_LAYER["llama"] + (("post_att_norm", "post_attention_norm"),
                                              ("post_ff_norm", "post_ffw_norm"))
GGUF_LAYER["gemma3"] = GGUF_LAYER["gemma2"] + GGUF_LAYER["qwen3"][-2:]
# Phi-3: a Llama's norms, output and down projections; q/k/v and gate/up fused (FUSED)
GGUF_LAYER["phi3"] = (("norm1", "attn_norm"), ("norm2", "ffn_norm"), ("att.out_proj", "attn_output"),
                      ("ff.w_down", "ffn_down"))
# the MoE archs' attention is Qwen3's (qwen3moe; olmoe's q/k norms the whole projection's, the same names) or
# Qwen2's (qwen2moe, its q/k/v biases); their MLP rows give way to moe_layer's (layer_table)
GGUF_LAYER["qwen3moe"] = GGUF_LAYER["olmoe"] = GGUF_LAYER["qwen3"]
GGUF_LAYER["qwen2moe"] = GGUF_LAYER["qwen2"]
# Falcon (gguf's tensor map, convert_hf_to_gguf.py's FalconModel): the norms by layer_table, as the block has one or two
GGUF_LAYER["falcon"] = (("att.out_proj", "attn_output"), ("ff.fc1", "ffn_up"), ("ff.fc2", "ffn_down"))
# BLOOM: GPT-2's names with q, k and v fused; the embeddings' norm is token_embd_norm (GGUF_EMBED_NORM)
GGUF_LAYER["bloom"] = GGUF_LAYER["gpt2"]
GGUF_EMBED_NORM = ("embed_norm", "token_embd_norm")
# the architectures whose biases go as the model has them: each table entry's .bias beside its .weight (LayerNorms
# and, BLOOM, the projections; fused ones fused as their weights), output_norm.bias, token_embd_norm.bias
BIASED = ("falcon", "bloom", "stablelm")
# StableLM: Llama's names (ffn_norm left out of the parallel block on one norm, attn_q_norm / attn_k_norm with qk_norm:
# layer_table); its q/k/v biases beside their weights, as BIASED writes every bias the model has
GGUF_LAYER["stablelm"] = GGUF_LAYER["llama"]
GPT2_QKV = ("att.W_query", "att.W_key", "att.W_value")
# The fused tensors, each [its parts' rows one after the other, in]: GPT-2's and Phi-3's q, k, v in attn_qkv,
# Phi-3's gate then up in ffn_up (llama.cpp's phi3 splits ffn_up in halves: silu(first) * second, Phi3MLP's chunk)
FUSED = {"gpt2": {"attn_qkv": GPT2_QKV}, "phi3": {"attn_qkv": GPT2_QKV, "ffn_up": ("ff.w_gate", "ff.w_up")},
         "falcon": {"attn_qkv": GPT2_QKV}, "bloom": {"attn_qkv": GPT2_QKV}}


def fused_rows(cfg, theirs: str) -> tuple:
    """Each part's rows of fused tensor theirs: q, k, v (n_head and kv_heads heads of head_dim), or gate, up."""
    if theirs == "attn_qkv":
        return cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    return cfg.ff_hidden, cfg.ff_hidden
QKV = {"att.W_query": "attn_q", "att.W_key": "attn_k", "att.W_value": "attn_v"}  # qwen2's biases: on these only


class Coded(NamedTuple):
    """A quantized layer's matrix as gguf_tensors hands it on: dense, its fp32 value [N, K] (what it computes); and
    where its groups are ggml's blocks (32 consecutive inputs of a row, no act-order gather), its levels q (int16 [N,
    K]: Int8Linear's -127..127, Int4Linear's 0..15), scale [N, K / 32] and offset (int4's, else None), fp32, for
    _exact_blocks to copy. Rows are moved (permute_qk), cut ([:V]) and joined (GPT-2's attn_qkv) in every part
    alike: _rowwise."""
    bits: int
    dense: torch.Tensor
    q: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    offset: torch.Tensor | None = None


def _rowwise(fn, *xs):
    """fn applied to float matrices, or to each part of Coded ones (fn takes one tensor of each x)."""
    if not isinstance(xs[0], Coded):
        return fn(*xs)
    parts = [fn(*p) if p[0] is not None else None for p in zip(*(x[1:] for x in xs))]
    return Coded(xs[0].bits, *parts)


def _coded(m) -> Coded:
    """A QuantLinear (model/quant.py) as Coded, on the CPU."""
    from tritongpt.model.quant import Int4Linear, unpack_int4

    if m.lora is not None:  # its matrix is W + scale B A, which no copy of W's levels holds
        raise UserError("the model has QLoRA updates on its quantized layers: merge them first (export does: "
                        "tritongpt.model.lora.merge_lora), then write the GGUF file")
    dense = m.dequantize().detach().to("cpu", torch.float32)
    int4 = isinstance(m, Int4Linear)
    if m.group_size != GGUF_BLOCK or (int4 and m.in_perm is not None):
        return Coded(4 if int4 else 8, dense)
    q = (unpack_int4(m.qweight) if int4 else m.qweight).to("cpu", torch.int16)
    return Coded(4 if int4 else 8, dense, q, m.scale.detach().to("cpu", torch.float32),
                 m.offset.detach().to("cpu", torch.float32) if int4 else None)


def gguf_tensors(model, arch: str) -> dict:
    """{GGUF name: float32 tensor [out, in], or Coded for a quantized layer's} as convert_hf_to_gguf.py names and
    lays them out; the vocabulary's padding rows (vocab_multiple) dropped, a tied head not written (llama.cpp reuses
    token_embd)."""
    from tritongpt.model.quant import QuantLinear

    cfg = model.config
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items() if v.is_floating_point()}
    quant = {n: _coded(m) for n, m in model.named_modules() if isinstance(m, QuantLinear)}

    def weight(name):  # a module's matrix: float, or Coded where the module is quantized
        return quant[name] if name in quant else sd[name + ".weight"]

    V = cfg.vocab_size
    top = dict(GGUF_TOP)
    t = {top["tok_emb"] + ".weight": sd["tok_emb.weight"][:V], top["final_norm"] + ".weight": sd["final_norm.weight"]}
    if not cfg.tie_weights or arch == "stablelm":  # (llama.cpp's stablelm needs output: a tied head is copied)
        t[top["out_head"] + ".weight"] = _rowwise(lambda x: x[:V], weight("out_head"))
    for i in range(cfg.n_layer):
        b, g = f"trf_blocks.{i}.", f"blk.{i}."
        for theirs, ours in FUSED.get(arch, {}).items():
            parts = [weight(b + n) for n in ours]
            forms = {(x.bits, x.q is None) if isinstance(x, Coded) else None for x in parts}
            if len(forms) > 1:  # (one fused tensor holds one form: its parts quantized alike, or all float)
                parts = [x.dense if isinstance(x, Coded) else x for x in parts]
            t[g + theirs + ".weight"] = _rowwise(lambda *xs: torch.cat(xs), *parts)
        if arch in BIASED:  # the biases the model has, each beside its weight (fused as its weights)
            for theirs, ours in FUSED.get(arch, {}).items():
                if all(b + n + ".bias" in sd for n in ours):
                    t[g + theirs + ".bias"] = torch.cat([sd[b + n + ".bias"] for n in ours])
            for ours, theirs in layer_table(arch, cfg):
                t[g + theirs + ".weight"] = weight(b + ours)
                if b + ours + ".bias" in sd:
                    t[g + theirs + ".bias"] = sd[b + ours + ".bias"]
            continue
        if arch == "gpt2":
            C = cfg.n_embd
            qkv = [b + n for n in GPT2_QKV]
            # GPT-2 has all its biases: a model without them (qkv_bias False) has zero ones, the same function
            t[g + "attn_qkv.bias"] = torch.cat([sd.get(n + ".bias", torch.zeros(C)) for n in qkv])
            for ours, theirs in GGUF_LAYER[arch]:
                w = weight(b + ours)
                t[g + theirs + ".weight"] = w
                t[g + theirs + ".bias"] = sd.get(b + ours + ".bias", torch.zeros(_rows(w)))
            continue
        for ours, theirs in layer_table(arch, cfg):
            t[g + theirs + ".weight"] = weight(b + ours)
        for ours, theirs in moe_layer(arch, cfg):
            # (the experts are stacked parameters, not Linears; the shared gate's [1, C] row is llama.cpp's [C])
            w = weight(b + ours.removesuffix(".weight")) if ours.endswith(".weight") else sd[b + ours]
            t[g + theirs] = w.reshape(-1) if theirs == "ffn_gate_inp_shexp.weight" else w
        if arch == "llama":
            for theirs, heads in (("attn_q", cfg.n_head), ("attn_k", cfg.kv_heads)):
                t[g + theirs + ".weight"] = _rowwise(lambda x: permute_qk(x, heads), t[g + theirs + ".weight"])
        if arch in ("qwen2", "qwen2moe"):  # q/k/v biases (zero where the model has none: qwen2's always are)
            for ours, theirs in QKV.items():
                w = t[g + theirs + ".weight"]
                t[g + theirs + ".bias"] = sd.get(b + ours + ".bias", torch.zeros(_rows(w)))
    if arch == "gpt2":
        t["position_embd.weight"] = sd["pos_emb.weight"]
    if arch == "gpt2" or arch in BIASED and "final_norm.bias" in sd:
        t["output_norm.bias"] = sd["final_norm.bias"]
    if arch in BIASED and "embed_norm.weight" in sd:
        ours, theirs = GGUF_EMBED_NORM
        t[theirs + ".weight"] = sd[ours + ".weight"]
        if ours + ".bias" in sd:
            t[theirs + ".bias"] = sd[ours + ".bias"]
    return t


def _rows(w) -> int:
    return (w.dense if isinstance(w, Coded) else w).shape[0]


def _shape(w):
    return (w.dense if isinstance(w, Coded) else w).shape


def _pre_name(spec: dict, where: str) -> str:
    """llama.cpp's tokenizer.ggml.pre for a tokenizer.json's pre-tokenizer: GPT-2's byte-level split, Llama 3's or
    Qwen2's regex; any other refused by name."""
    from tritongpt.train.tokenizer import _SAME_PATTERN, GPT2_PAT

    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True) \
            and not steps[0].get("add_prefix_space"):
        return "gpt-2"
    # llama.cpp keeps every match of its regex as a word of its own (the tokenizers library's Isolated, not
    # inverted): a Split that drops or merges the matches would give other words under the same name
    if len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel" \
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert") \
            and not steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space"):
        pattern = steps[0].get("pattern", {}).get("Regex")
        if _SAME_PATTERN.get(pattern, pattern) == GPT2_PAT:
            return "gpt-2"
        if pattern in PRE_NAMES:
            return PRE_NAMES[pattern]
    raise UserError(f"{where}: its pre-tokenizer ({json.dumps(pre)[:200]}) is none of those GGUF's byte-level BPE "
                    "names that this writer knows (GPT-2's, Llama 3's, Qwen2's): llama.cpp would split text "
                    "otherwise and give other ids")


def spm_merges(vocab: dict, scores: dict) -> list:
    """The merges ("a b") a SentencePiece-BPE vocabulary's scores stand for, as transformers' GGUF reader recovers
    them (tokenization_utils_base.generate_merges): every split of a token into two tokens of vocab is a merge
    ranked by the token's score, higher first (ties: the longer left part first, then by the parts' ids).
    llama.cpp's SentencePiece tokenizer uses the same scores directly: of a text's adjacent pairs, it merges the
    one whose joined token scores highest."""
    merges = []
    for token, score in scores.items():
        local = [(token[:k], token[k:], score) for k in range(1, len(token))
                 if token[:k] in vocab and token[k:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)  # (stable: ties keep the ids' order)
    return [f"{a} {b}" for a, b, _ in merges]


def _space_prefix(spec: dict, where: str) -> bool:
    """Whether a SentencePiece-BPE tokenizer.json prepends "▁" to a text (GGUF's tokenizer.ggml.add_space_prefix),
    from how it turns spaces into "▁": a Metaspace pre-tokenizer (transformers' LlamaTokenizer today; not split on
    "▁", as SentencePiece never splits there) or the Prepend + Replace normalizer (Llama 2's own tokenizer.json),
    or a Replace alone (no prefix). Another way of spelling spaces is refused by name: llama.cpp's would differ."""
    norm, pre = spec.get("normalizer"), spec.get("pre_tokenizer")
    norms = norm.get("normalizers", []) if (norm or {}).get("type") == "Sequence" else [norm] if norm else []
    kinds = [n.get("type") for n in norms]
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
    if not norms and (pre or {}).get("type") == "Metaspace" and pre.get("replacement") == SPACE \
            and not pre.get("split", True) and pre.get("prepend_scheme") in ("first", "always", "never"):
        return pre["prepend_scheme"] != "never"
    if pre is None and kinds in (["Prepend", "Replace"], ["Replace"]) and norms[-1] == replace \
            and (len(norms) == 1 or norms[0].get("prepend") == SPACE):
        return len(norms) == 2
    raise UserError(f"{where}: a SentencePiece-style BPE whose spaces are spelled otherwise (normalizer "
                    f"{json.dumps(norm)[:120]}, pre-tokenizer {json.dumps(pre)[:120]}) than GGUF's \"llama\" tokenizer "
                    "says (\"▁\" for every space, one prepended or not): llama.cpp would give other ids")


def _spm_fields(tok, spec: dict, vocab_size: int, where: str) -> dict:
    """tokenizer_fields for a SentencePiece-style BPE (Llama 2's, Mistral 7B's, TinyLlama's tokenizer.json: BPE with
    byte_fallback, "▁" for spaces): GGUF's "llama" tokenizer as convert_hf_to_gguf.py writes one (its
    _set_vocab_sentencepiece: the tokens in id order, their scores and types; byte tokens <0xNN> BYTE, the unknown
    token UNKNOWN, special added tokens CONTROL, others USER_DEFINED; no merges). GGUF holds no merges for it: its
    readers rank merges by the scores (spm_merges), so a token's score is minus the rank of the first merge that
    makes it (SentencePiece's own BPE scores: 0, -1, -2, ...), 0 for the others. Where no scores rank the
    tokenizer's own merges so (a merge the scores imply that it lacks, or one token's merges far apart in its list:
    a BPE not trained by SentencePiece), refused by name: llama.cpp and transformers would give other ids.
    (_set_vocab_llama_hf writes every score -1000, which ranks no merge at all: not followed.)"""
    model = spec["model"]
    prefix = _space_prefix(spec, where)
    vocab = dict(model["vocab"])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    first = {}
    for rank, m in enumerate(merges):
        first.setdefault(m.replace(" ", "", 1), -float(rank))
    for text in first:
        if text not in vocab:
            raise UserError(f"{where}: its merge making {text!r} makes no token of its vocabulary")
    added = {a["content"]: a for a in spec.get("added_tokens", [])}
    byte = re.compile(r"<0x[0-9A-Fa-f]{2}>")
    # (the readers rank a split of every token; added and byte tokens are matched whole before any merge)
    scores = {t: first.get(t, 0.0) for t in vocab if t not in added and not byte.fullmatch(t)}
    implied = spm_merges(vocab, scores)
    if set(implied) != set(merges) or any(first[a.replace(" ", "", 1)] < first[b.replace(" ", "", 1)]
                                          for a, b in zip(merges, merges[1:])):
        extra = sorted(set(implied) - set(merges))
        why = f"its vocabulary implies merges it does not have ({extra[:3]})" if extra else \
            "its merges are not ranked by the tokens they make"
        raise UserError(f"{where}: a SentencePiece-style BPE whose merges no token scores hold: {why}; GGUF's \"llama\" "
                        "tokenizer keeps scores, not merges, and llama.cpp would give other ids (a tokenizer.json "
                        "converted from SentencePiece's tokenizer.model has such merges)")
    for text, a in added.items():
        vocab[text] = a["id"]
    unk = model.get("unk_token")
    tokens, types = [f"[PAD{i}]" for i in range(vocab_size)], [UNUSED] * vocab_size
    score_list = [-1000.0] * vocab_size  # (convert_hf_to_gguf.py's for padding and added tokens)
    for text, i in vocab.items():
        if i >= vocab_size:
            raise UserError(f"tokenizer {tok.name!r} has token {text!r} at id {i}, past the model's {vocab_size} rows")
        tokens[i] = text
        if text in added and text != unk:
            types[i] = CONTROL if added[text].get("special", True) else USER_DEFINED
            score_list[i] = 0.0 if types[i] == CONTROL else -1000.0
        else:
            types[i] = UNKNOWN if text == unk else BYTE if byte.fullmatch(text) else NORMAL
            score_list[i] = scores.get(text, 0.0)
    ids = {t: vocab.get(t) if t else None for t in (tok.bos_token, tok.eos_token, unk)}
    pad = (getattr(tok, "template_tokens", None) or {}).get("pad_token")
    return {"model": "llama", "pre": "default", "tokens": tokens, "types": types, "scores": score_list,
            "merges": None, "bos": ids[tok.bos_token], "eos": ids[tok.eos_token], "unk": ids[unk],
            "pad": vocab.get(pad) if pad else None, "add_bos": tok.prepended_bos_id is not None,
            "add_space_prefix": prefix}


def tokenizer_fields(tok, vocab_size: int) -> dict:
    """GGUF's tokenizer.ggml.* for a byte-level BPE tokenizer (ours with GPT-2's pattern, or a Hugging Face
    tokenizer.json): {"model": "gpt2", "pre", "tokens", "types", "merges", "bos", "eos", "add_bos"}; for a
    SentencePiece-style BPE tokenizer.json, _spm_fields' ("llama", with scores). Ids past the tokenizer's (the
    model's vocabulary is larger) are "[PAD{i}]" rows of type UNUSED, as convert_hf_to_gguf.py writes them."""
    spec = getattr(tok, "spec", None)
    if spec is None:  # ours: hf_files refuses a pattern other than GPT-2's by name
        files = tok.hf_files()
        vocab = json.loads(files["vocab.json"])
        merges = files["merges.txt"].splitlines()[1:]
        specials = set(tok.special_tokens)
        pre, added, bos = "gpt-2", {s: True for s in specials}, None
        eot = getattr(tok, "eot_id", None) if "<|endoftext|>" in specials else None
        bos = eos = eot
        add_bos = False  # our runs never prepend one
    else:
        where = f"tokenizer {tok.name!r}"
        model = spec.get("model") or {}
        if model.get("type") == "BPE" and model.get("byte_fallback"):
            return _spm_fields(tok, spec, vocab_size, where)
        if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
            raise UserError(f"{where} is no byte-level BPE (its model is {model.get('type')!r}, its decoder "
                            f"{(spec.get('decoder') or {}).get('type')!r}): GGUF's \"gpt2\" tokenizer is byte-level "
                            "BPE; its \"llama\" one SentencePiece-style BPE (byte_fallback): the only ones this writer writes")
        norm = (spec.get("normalizer") or {}).get("type")
        if norm == "NFC":  # Qwen2's: llama.cpp's qwen2 vocabulary is written without it, as convert_hf_to_gguf.py does
            note(f"{where} composes text (NFC) before splitting it, which GGUF's tokenizer does not: text with "
                 "decomposed characters (e + U+0301) may get other ids in llama.cpp")
        elif norm is not None:
            raise UserError(f"{where} normalizes text first ({norm}), which GGUF's \"gpt2\" tokenizer does not: "
                            "llama.cpp would give other ids")
        pre = _pre_name(spec, where)
        vocab = dict(model["vocab"])
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        added = {}
        for a in spec.get("added_tokens", []):
            vocab[a["content"]] = a["id"]
            added[a["content"]] = a.get("special", True)
        bos = vocab.get(tok.bos_token) if tok.bos_token else None
        eos = vocab.get(tok.eos_token) if tok.eos_token else None
        # llama.cpp prepends BOS as tokenizer.ggml.add_bos_token says: as the tokenizer's own pipeline does,
        # asked of the pipeline itself (Llama 3's post-processor is a Sequence: ByteLevel, then the template)
        add_bos = tok.prepended_bos_id is not None
    if eos is None:  # GGUF has no "none": llama.cpp's BPE vocabulary defaults its BOS and EOS to id 11 instead
        note(f"tokenizer {tok.name!r} has no end-of-text token, so the GGUF file names none: llama.cpp then takes id "
             "11 as its EOS and stops generating wherever the model picks that token")
    tokens, types = [f"[PAD{i}]" for i in range(vocab_size)], [UNUSED] * vocab_size
    for text, i in vocab.items():
        if i >= vocab_size:
            raise UserError(f"tokenizer {tok.name!r} has token {text!r} at id {i}, past the model's {vocab_size} rows")
        tokens[i] = text
        types[i] = (CONTROL if added[text] else USER_DEFINED) if text in added else NORMAL
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "types": types, "merges": merges, "bos": bos, "eos": eos,
            "add_bos": add_bos}


def write_tokenizer(w, toks: dict) -> None:
    """tokenizer_fields' toks as GGUF's tokenizer.ggml.* keys, on the GGUFWriter w."""
    w.add_tokenizer_model(toks["model"])
    w.add_tokenizer_pre(toks["pre"])
    w.add_token_list(toks["tokens"])
    if toks.get("scores") is not None:
        w.add_token_scores(toks["scores"])
    w.add_token_types(toks["types"])
    if toks["merges"] is not None:
        w.add_token_merges(toks["merges"])
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                     ("pad", w.add_pad_token_id)):
        if toks.get(key) is not None:
            add(toks[key])
    w.add_add_bos_token(toks["add_bos"])
    if toks["model"] == "llama":
        w.add_add_eos_token(False)  # (our data puts EOS between documents itself)
        w.add_add_space_prefix(toks["add_space_prefix"])


def _use_more_bits(i_layer: int, n_layer: int) -> bool:
    """llama-quant.cpp's use_more_bits: the first and last eighth of the layers, and every third one between."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def tensor_type(kind: str, name: str, shape: tuple, n_layer: int, head: bool = False, big: bool = False) -> str:
    """The type (GGUF_TYPES' names, or a K-quant's: q4_k, q5_k, q6_k) the export's `kind` writes tensor `name` of
    `shape` in. head: it is the LM head (output, or a tied token_embd); big: a 70B Llama (llama.cpp's LLM_TYPE_70B:
    80 layers with GQA). llama-quant.cpp's llama_tensor_get_type without an importance matrix, for the tensors our
    architectures have (no experts, no Falcon), then its tensor_type_fallback for rows that are not whole blocks."""
    if (len(shape) == 1 or name == "position_embd.weight" or kind == "f32" or name.endswith("ffn_gate_inp.weight")
            or name.endswith("_norm.weight")):
        # (llama-quant.cpp quantizes 2-D tensors only, never the position embeddings nor the MoE routers,
        # ffn_gate_inp, which convert_hf_to_gguf.py writes F32; StableLM 2 12B's per-head q/k norms are 2-D, and
        # the converter keeps every *_norm.weight F32)
        return "f32"
    if kind in ("f16", "bf16"):
        return kind
    base = K_MIXES.get(kind, kind)
    ncols = shape[-1]
    layer = int(name.split(".")[1]) if name.startswith("blk.") else None
    out = base
    if head:
        # the head's own rule: Q8_0 where its rows are not whole blocks of the mix's base type, else Q6_K (Q8_0 stays)
        out = "q8_0" if ncols % (QK_K if kind in K_MIXES else GGUF_BLOCK) else base if base == "q8_0" else "q6_k"
    elif ".attn_v." in name:
        # (i_attention_wv counts the attn_v tensors before this one: its layer, the file holding them in order)
        if kind in ("q4_k_m", "q5_k_m") and _use_more_bits(layer, n_layer):
            out = "q6_k"
        elif kind == "q4_k_s" and layer < 4:
            out = "q5_k"
        if big and out == "q4_k":  # (70B: 8 heads share each attn_v, a small tensor worth more bits)
            out = "q5_k"
    elif ".ffn_down." in name:
        if kind in ("q4_k_m", "q5_k_m") and _use_more_bits(layer, n_layer):
            out = "q6_k"
        elif kind == "q4_k_s" and layer < n_layer // 8:
            out = "q5_k"
    elif ".attn_qkv." in name:
        out = {"q4_k_m": "q5_k", "q5_k_m": "q6_k"}.get(kind, out)
    if out in K_FALLBACK and ncols % QK_K:
        out = K_FALLBACK[out]
    if ncols % GGUF_BLOCK:  # (no block type holds it: F16, as convert_hf_to_gguf.py writes such a Q8_0 tensor)
        out = "f16"
    return out


def file_type(gguf, kind: str):
    """general.file_type for an export of `kind`: llama.cpp's LLAMA_FTYPE (MOSTLY_Q4_K_M = 15, ...)."""
    return gguf.LlamaFileType.ALL_F32 if kind == "f32" else gguf.LlamaFileType["MOSTLY_" + kind.upper()]


def _as_type(gguf, name: str, data, ttype: str, requantized: list | None = None):
    """(array, raw_dtype or None): a tensor (float, or Coded) in type ttype (tensor_type's). A Coded matrix is
    copied block for block where _exact_blocks can; otherwise its dense value is quantized (its name appended to
    requantized, for the note): always for a K-quant, whose nested scales no group of ours is."""
    from tritongpt.train.gguf_kquant import QUANTIZERS

    T = gguf.GGMLQuantizationType
    coded = data if isinstance(data, Coded) else None
    if coded is not None:
        data = coded.dense.contiguous().numpy()
    if ttype == "f32":
        return data, None
    if ttype in BLOCK_TYPES:
        qtype = T[ttype.upper()]
        if coded is not None:
            blocks = _exact_blocks(coded, ttype)
            if blocks is not None:
                return blocks, qtype
            if requantized is not None:
                requantized.append(name)
        return gguf.quants.quantize(data, qtype), qtype
    if ttype in QUANTIZERS:
        if coded is not None and requantized is not None:
            requantized.append(name)
        # (a 3-D expert stack quantized as its rows, each expert's, and given back its leading dims as gguf's do)
        blocks = QUANTIZERS[ttype](data.reshape(-1, data.shape[-1]))[0]
        return blocks.reshape(*data.shape[:-1], -1), T[ttype.upper()]
    if ttype == "bf16":
        return gguf.quants.quantize(data, T.BF16), T.BF16
    return data.astype(np.float16), None


def _exact_blocks(c: Coded, kind: str):
    """c's matrix as ggml's `kind` blocks (uint8 [N, K / 32 * block bytes], as gguf.quants.quantize returns them)
    holding exactly the matrix c computes, its levels and scales copied; None where that type cannot.
    - q8_0 (w = d q, q int8) from int8: d the scale, q the levels.
    - q4_0 / q5_0 (w = d (q - z), z 8 / 16) from int4 whose offset is -8 scale (the symmetric zero, gguf_import's
      Q4_0 load): d the scale, q + z - 8; or offset -7 scale (gguf_import's flip of a negative Q4_0 d, levels 15 -
      q'): d -scale, levels 15 - q + z - 8, the block llama.cpp wrote.
    - q4_1 / q5_1 (w = d q + m) from int4: d the scale, m the offset (fp32 sums as ours: the same matrix).
    Each d and m must be an fp16 (the block's fields) and the same value; a block of levels all 0 (a constant group
    of ours: scale 1) is written with d 0 as gguf writes a constant block (Q4_0 / Q5_0: a block of zeros, d -0 and
    levels z), so the import's blocks come back byte for byte."""
    if c.q is None or c.bits != (8 if kind == "q8_0" else 4):
        return None
    N, K = c.q.shape
    G = K // GGUF_BLOCK
    q = c.q.view(N, G, GGUF_BLOCK)
    scale = c.scale
    const = (q == 0).all(dim=-1)  # a group whose levels are all 0: its scale is no part of its value
    if kind == "q8_0":
        d, m = torch.where(const, 0.0, scale), None
    elif kind in ("q4_1", "q5_1"):
        d, m = torch.where(const, 0.0, scale), c.offset
    else:
        z = 8 if kind == "q4_0" else 16
        zero = const & (c.offset == 0)  # (gguf_import's load of a zero block: levels 0, scale 1, offset 0)
        up, flip = c.offset == -8 * scale, c.offset == -7 * scale
        if not bool((zero | up | flip).all()):
            return None  # (an asymmetric group: no d (q - z) holds it)
        # (a zero block's d is -0: ggml's max / -8 of a max of 0, its sign bit set in the file)
        d = torch.where(zero, -0.0, torch.where(up, scale, -scale))
        q = torch.where(zero[..., None], 8, torch.where(up[..., None], q, 15 - q)) + (z - 8)
        m = None
    for x in (d, m):
        if x is not None and not torch.equal(x.half().float(), x):
            return None  # (a scale or offset fp16 would round: not the same matrix)
    fp16 = lambda x: x.half().numpy().view(np.uint8).reshape(N, G, 2)  # noqa: E731
    # (int8 levels as their two's-complement bytes, as ggml stores them)
    q = q.numpy().astype(np.int8).view(np.uint8) if kind == "q8_0" else q.numpy().astype(np.uint8)
    fields = [fp16(d)] + ([] if m is None else [fp16(m)])
    if kind != "q8_0":
        lo, hi = q[..., :16], q[..., 16:]  # (ggml: byte j holds element j's low 4 bits, element j + 16's above)
        if kind in ("q5_0", "q5_1"):  # their fifth bits, 32 of them in 4 bytes, element 0 the lowest
            fields.append(np.packbits(q >> 4, axis=-1, bitorder="little"))
        q = (lo & 15) | (hi << 4)
    return np.ascontiguousarray(np.concatenate(fields + [q], axis=-1).reshape(N, -1))


def write_gguf(model, out, tok, kind: str = "f16", family: str | None = None, chat_template: str | None = None,
               name: str | None = None) -> Path:
    """Write model (and its tokenizer, tok) as the GGUF file `out` in tensor type kind (GGUF_TYPES). family: the
    Hugging Face family export_target picks (which refuses what that family cannot hold); refused by name, before
    the file is opened, whatever GGUF or this writer cannot hold."""
    from tritongpt.commands import export_target

    gguf = import_gguf()
    if kind not in GGUF_TYPES:
        # (llama-quantize takes Q4_K and Q5_K as its _M mixes; the K-quant types themselves are no file's whole type)
        hint = f" ({kind} alone is no mix: {kind}_m or {kind}_s)" if kind in ("q4_k", "q5_k") else ""
        raise UserError(f"GGUF tensor type must be one of {', '.join(GGUF_TYPES)}, got {kind!r}{hint}")
    cfg = model.config
    if family is None:
        family, refuse, _ = export_target(cfg)
        refuse(model, f"{_article(family)} {family} folder")
    arch = gguf_arch(cfg, family)
    what = f"a GGUF file (llama.cpp's {arch})"
    refuse_not_gguf(model, arch, what)
    toks = tokenizer_fields(tok, cfg.vocab_size)
    tensors = gguf_tensors(model, arch)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(out, arch)
    w.add_name(name or out.stem)
    w.add_file_type(file_type(gguf, kind))
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.ff_hidden)
    w.add_head_count(cfg.n_head)
    if arch == "gpt2":
        w.add_layer_norm_eps(cfg.norm_eps)
    elif arch in BIASED:  # LayerNorms (attention.layer_norm_epsilon); Falcon's RoPE over whole heads, BLOOM's ALiBi
        w.add_vocab_size(cfg.vocab_size)
        w.add_head_count_kv(cfg.kv_heads)
        w.add_layer_norm_eps(cfg.norm_eps)
        if cfg.position_encoding == "rope":
            w.add_rope_freq_base(cfg.rope_theta)
            w.add_rope_dimension_count(cfg.rotary_dim or cfg.head_dim)  # (StableLM's partial rotary)
    else:
        w.add_vocab_size(cfg.vocab_size)
        w.add_head_count_kv(cfg.kv_heads)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_rope_dimension_count(cfg.rotary_dim or cfg.head_dim)  # (phi3's partial rotary)
        if cfg.head_dim * cfg.n_head != cfg.n_embd or arch in GEMMA_ARCHS:
            # heads of their own width (llama.cpp: n_embd / n_head else); convert_hf_to_gguf.py writes a Gemma's
            # always, and transformers' GGUF loader reads gemma2's and gemma3's head_dim from it
            w.add_key_length(cfg.head_dim)
            w.add_value_length(cfg.head_dim)
    if arch == "qwen3moe" and cfg.head_dim * cfg.n_head == cfg.n_embd:  # (else written above)
        # (Qwen3MoeModel writes a config's head_dim; transformers' GGUF loader reads key_length as it, else takes
        # Qwen3MoeConfig's default)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    if cfg.n_experts:
        # llama.cpp: a llama's (and olmoe's) experts are feed_forward_length wide; qwen3moe's and qwen2moe's
        # expert_feed_forward_length (convert_hf_to_gguf.py's moe_intermediate_size), qwen2moe's shared expert
        # expert_shared_feed_forward_length
        w.add_expert_count(cfg.n_experts)
        w.add_expert_used_count(cfg.experts_per_token)
        if arch in ("qwen3moe", "qwen2moe"):
            w.add_expert_feed_forward_length(cfg.ff_hidden)
        if cfg.moe_shared_hidden:
            w.add_expert_shared_feed_forward_length(cfg.moe_shared_hidden)
    if arch in (*GEMMA_SWA_PATTERN, "phi3") and cfg.attention_window:
        w.add_sliding_window(cfg.attention_window)
        if arch == "phi3":
            note(f"llama.cpp's phi3 reads attention.sliding_window ({cfg.attention_window}) but runs without it (its "
                 "Phi SWA is disabled): past that many tokens its logits differ from this model's")
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_softcap)
        w.add_final_logit_softcapping(cfg.logit_softcap)
    write_tokenizer(w, toks)
    if chat_template:
        w.add_chat_template(chat_template)
    head = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    big = arch == "llama" and cfg.n_layer == 80 and cfg.kv_heads != cfg.n_head  # (llama.cpp's LLM_TYPE_70B)
    requantized, fell_back = [], []
    for tname, t in tensors.items():
        shape = tuple(_shape(t))
        ttype = tensor_type(kind, tname, shape, cfg.n_layer, tname == head, big)
        if kind in K_MIXES and len(shape) >= 2 and shape[-1] % QK_K \
                and ttype not in ("f32", "q4_k", "q5_k", "q6_k"):
            fell_back.append(f"{tname} {ttype.upper()}")
        data, raw = _as_type(gguf, tname, t if isinstance(t, Coded) else t.contiguous().numpy(), ttype, requantized)
        if raw is None:
            w.add_tensor(tname, data)
        else:
            w.add_tensor(tname, data, raw_dtype=raw)
    if fell_back:
        some = ", ".join(fell_back[:3]) + (", ..." if len(fell_back) > 3 else "")
        note(f"{len(fell_back)} matrices have rows that are not whole blocks of {QK_K} inputs, which {kind.upper()}'s "
             f"K-quants need: written in the type llama-quantize falls back to ({some})")
    if requantized:
        some = ", ".join(requantized[:3]) + (", ..." if len(requantized) > 3 else "")
        why = "a K-quant's nested scales, which no group of ours is" if kind in K_MIXES else \
            "other groups or levels, scales no fp16 holds"
        note(f"{len(requantized)} quantized matrices ({some}) do not fit their {kind.upper()} file's blocks exactly "
             f"({why}): dequantized and quantized again, rounded twice")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
