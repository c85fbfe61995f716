"""4-bit GPTQ and AWQ folders from Hugging Face (config.json's quantization_config) into Int4Linear (model/quant.py),
kept 4-bit: for the readers that call folder_quantization (llama_weights.py's Llamas, Gemma's, Phi-3's, Falcon's and
GPT-NeoX's; gpt_oss_weights.py for MXFP4 alone). 8-bit GPTQ symmetric into Int8Linear, kept 8-bit (int8_linears): a
scale a row where each layer has one group (group_size -1, or one at least every layer's K), else group scales
(Qwen's *-GPTQ-Int8: group_size 128; int4's rule for the group size below); other 8-bit GPTQ (zero points,
act-order groups, groups no size of ours fits: no int8 form here) and 2- and 3-bit GPTQ (no kernel) as the float
model of their dequantized weights (gptq_dequantized, a note on stderr), as FP8 folders are.

Both store a linear of in K, out N as int32 words of eight 4-bit levels q, a zero z and an fp16 scale s per group of
inputs and output, W[n, k] = (q[k, n] - z[g, n]) * s[g, n]; ours is W = q * scale + offset per group of consecutive
inputs, so scale = s and offset = -z * s, the levels q the same 0..15 repacked two to a byte.
- GPTQ (AutoGPTQ, GPTQModel; qlinear pack/unpack): qweight [K / 8, N], word r's nibble j (from the low bits) input
  8r + j; qzeros [G, N / 8], word c's nibble j output 8c + j; scales [G, N]; g_idx [K] each input's group. The
  gptq (v1) checkpoint_format stores z - 1 in qzeros, as whole words (v2's less 0x11111111: a zero of 0 borrows
  from the next nibble), read back by adding 0x11111111 to each word as GPTQModel does; its gptq_v2 stores z.
  sym: z is 8 in every group. desc_act (act-order): the inputs were quantized in another order, their groups given
  by g_idx, each group's inputs scattered over K. Ours groups consecutive inputs, so such a layer is kept with its
  inputs sorted by g_idx (stable; each group must then hold group_size of them, else refused) and a per-layer
  gather of x's columns into that order before the matmul (Int4Linear.in_perm, both paths), as vLLM and exllama
  serve it; a g_idx of k // group_size needs none.
- AWQ GEMM (AutoAWQ's WQLinear_GEMM.from_linear): qweight [K, N / 8] and qzeros [G, N / 8] packed along the outputs,
  word c's nibble i holding output 8c + [0, 2, 4, 6, 1, 3, 5, 7][i]; z stored as it is; scales [G, N].
- GPTQ of other bits (AutoGPTQ's QuantLinear.pack): qweight's column a little-endian stream of bits-bit levels along
  the inputs, 32 / bits a word at 2 and 8; at 3, 32 levels fill three words, levels 10 and 21 of each straddling two;
  qzeros the same along the outputs. v1's zeros less 1: words less 0x55555555 (2) or 0x01010101 (8) as at 4 bits; at
  3 bits per level mod 8 (GPTQModel's _correct_gptq_v1_qzeros: a word add would lose a straddling level's carry).
group_size -1 is one group of all K inputs. GPTQ gives a layer whose K is not a multiple of group_size ceil(K /
group_size) groups, the last one short (Falcon-7B's 4544 inputs at 128); AutoAWQ's GEMM takes whole groups only. The
groups become ours of the largest size GROUP_SIZES has that divides the file's group size and every layer's K (each
scale repeated over the smaller groups: the same matrix; 4544 at 128 is ours 64, the short group one of them); where
none does, the folder is read dequantized (gptq_dequantized, a note on stderr). What does not map (other bits:
GPTQModel's planar 5 to 7, AWQ's but 4; other checkpoint formats or AWQ versions, a g_idx of unequal groups or one
beside an AWQ layer, a quantized LM head, some layers float) is refused by name.

FP8 folders (transformers' fp8 and fbgemm_fp8, compressed-tensors' float-quantized) load as float models: each FP8
weight times its scale (per block, row or tensor) at load (fp8_dequantized, below).

bitsandbytes folders (transformers' load_in_8bit / load_in_4bit): 8-bit (LLM.int8) kept as Int8Linear
(bnb_int8_linears), 4-bit NF4 / FP4 dequantized to float (bnb_dequantized); their formats below.

MXFP4 (transformers' mxfp4: gpt-oss's experts, the only family published so): dequantized to float at load
(mxfp4_experts, mxfp4_dequantize; the format below), for the gpt-oss reader.
"""
import json
import math
import re
from pathlib import Path

import torch

from tritongpt.errors import UserError, note, read_json_object
from tritongpt.model.gpt import GPTModel, check_quantized_scales
from tritongpt.model.quant import (GROUP_SIZES, Int4Linear, QuantLinear, dequantize_mxfp4, mixed_layout, pack_int4,
                                  quantized_layout)
from tritongpt.train.gpt2_weights import _FLOAT_DTYPES, hf_quantization, model_with_tensors, refuse_quantized

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's order_map: nibble i of a word holds output 8c + AWQ_ORDER[i]
_PARTS = (".qweight", ".qzeros", ".scales", ".g_idx")


def folder_quantization(cfg_json) -> tuple:
    """(packed_spec, dequantized_spec) of the folder whose config.json is cfg_json, at most one not None (both None: a
    float folder): a GPTQ or AWQ folder kept quantized (4-bit as int4; 8-bit as int8 where Int8Linear holds it
    exactly, a scale a row or a group) and a bitsandbytes 8-bit one are packed (int4_linears), an FP8 one, a GPTQ
    one of other bits or a bitsandbytes 4-bit one read as the float model of its dequantized weights
    (folder_dequantized), as is a gpt-oss MXFP4 one (mxfp4_spec: other model types' refused), anything else refused
    by name."""
    q = hf_quantization(cfg_json)
    if q is None:
        return None, None
    if bnb_method(q):
        # 8-bit (LLM.int8): kept as Int8Linear (bnb_int8_linears); 4-bit NF4 / FP4 read dequantized (bnb_dequantized)
        spec = bnb_spec(q)
        return (spec, None) if spec["bits"] == 8 else (None, spec)
    if q.get("quant_method") in FP8_METHODS:
        return None, fp8_spec(q)
    if q.get("quant_method") == "mxfp4":
        # (gpt-oss's experts only, its reader's to read: any other model type refused by name, mxfp4_spec)
        return None, mxfp4_spec(q, read_json_object(cfg_json).get("model_type"))
    spec = int4_spec(q)
    return (None, spec) if spec["mode"] == "float" else (spec, None)


GPTQ_BITS = (2, 3, 4, 8)  # AutoGPTQ's QuantLinear.pack widths (GPTQModel's planar 5, 6 and 7 bits are another layout)


def int4_spec(q: dict) -> dict:
    """A quantization_config (gpt2_weights.hf_quantization's) as {method, bits, group_size, zero_minus_one, mode}, or
    a UserError naming what of it is not read (refuse_quantized). mode: "int4" (4-bit, int4_linears), "int8" (8-bit
    symmetric GPTQ, which Int8Linear holds exactly, W = s (q - 128) with q - 128 an int8 and s a row's or a group's:
    int8_linears, which reads the folder dequantized where its groups do not fit), or "float" (other GPTQ bits,
    or 8-bit with zero points: dequantized at load, gptq_dequantized)."""
    method = q.get("quant_method")
    if method not in ("gptq", "awq"):
        refuse_quantized(q, "GPTQ of 2, 3, 4 or 8 bits, 4-bit AWQ GEMM and bitsandbytes are, and FP8 "
                            "dequantized")
    bits = q.get("bits")
    if isinstance(bits, bool) or bits not in (GPTQ_BITS if method == "gptq" else (4,)):
        refuse_quantized(q, f"bits {bits!r}: " + ("GPTQ of 2, 3, 4 or 8 bits only" if method == "gptq" else
                                                   "4-bit AWQ only: AutoAWQ's GEMM packs no other width"))
    group = q.get("group_size", 128)
    if isinstance(group, bool) or not isinstance(group, int) or not (group == -1 or group > 0):
        refuse_quantized(q, f"group_size {group!r}: a positive integer, or -1 for one group of all the inputs")
    if method == "gptq":
        # GPTQModel writes its format as both "format" (its own name) and "checkpoint_format" (transformers'): one
        # alone is read, so that a v2 folder saying only "format" is not read as v1 (every zero one too high)
        fmt = q.get("checkpoint_format", q.get("format", "gptq"))
        if "format" in q and q["format"] != fmt:
            refuse_quantized(q, f"checkpoint_format {fmt!r} but format {q['format']!r}: which packing is unclear")
        if q.get("is_marlin_format"):  # (AutoGPTQ's older name for checkpoint_format 'marlin')
            fmt = "marlin"
        if fmt not in ("gptq", "gptq_v2"):
            refuse_quantized(q, f"checkpoint_format {fmt!r}: 'gptq' (v1, zeros stored less 1) or 'gptq_v2' only")
        if q.get("dynamic"):  # GPTQModel's per-module overrides of bits and group size
            refuse_quantized(q, "a dynamic per-module config: one bits and group_size for every layer only")
        # 8-bit symmetric is Int8Linear's own form (levels q - 128 in -128..127, a scale a row or a group of
        # inputs): kept int8, exactly. One group a row is group_size -1, or a group_size at least a layer's K (GPTQ's
        # g_idx k // group_size is then 0 for all its inputs): only the shapes say which, so int8_linears decides
        # (group scales where some layer has several; the folder dequantized where no group size of ours fits them,
        # or act-order groups). Zero points have no int8 form here, and 2 and 3 bits no kernel: those are
        # dequantized (an ordinary float model of the same weights)
        mode = {4: "int4", 8: "int8" if q.get("sym", True) is True else "float"}.get(bits, "float")
        return dict(method=method, bits=bits, group_size=group, zero_minus_one=fmt == "gptq", mode=mode)
    version = q.get("version", "gemm")
    if not isinstance(version, str) or version.lower() != "gemm":
        refuse_quantized(q, f"version {version!r}: AWQ's GEMM packing only")
    # transformers' AwqConfig backend: 'llm-awq' (MIT's WQLinear) packs its linears otherwise than AutoAWQ's GEMM
    if q.get("backend", "autoawq") not in ("autoawq", None):
        refuse_quantized(q, f"backend {q['backend']!r}: AutoAWQ's GEMM packing only")
    if q.get("zero_point", True) is not True:
        refuse_quantized(q, "zero_point false: AWQ GEMM with zero points only")
    return dict(method=method, bits=4, group_size=group, zero_minus_one=False, mode="int4")


def _unpack_rows(words, bits: int = 4):
    """int32 [R, C] -> levels [32R / bits, C]: the words of each column a little-endian stream of bits-bit levels, row
    i at bits i * bits .. (i + 1) * bits - 1 (GPTQ's qweight, AutoGPTQ's QuantLinear.pack: word r's field j from the
    low bits is row 32r / bits + j at 2, 4 and 8 bits; at 3 a level every 3 bits of three words, so that rows 10 and
    21 of each 32 straddle two words)."""
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        shifts = torch.arange(0, 32, bits, dtype=torch.int32)
        return ((words[:, None, :] >> shifts[None, :, None]) & mask).reshape(-1, words.shape[1])
    # (3 bits: each level read from the 64 bits of its word and the next, the word past the last one zeros)
    stream = torch.cat([words.long() & 0xFFFFFFFF, torch.zeros_like(words[:1], dtype=torch.long)])
    at = torch.arange(words.shape[0] * 32 // bits) * bits
    word, shift = at // 32, (at % 32)[:, None]
    return (((stream[word] | (stream[word + 1] << 32)) >> shift) & mask).to(torch.int32)


def _unpack_cols(words, order=tuple(range(8)), bits: int = 4):
    """int32 [R, C] -> levels [R, 32C / bits]: the rows' words a stream of levels along the columns as _unpack_rows'
    along the rows (GPTQ's qzeros: at 4 bits word c's nibble i is column 8c + i); AWQ's 4-bit ones, word c's nibble
    i column 8c + order[i]."""
    if bits != 4:
        return _unpack_rows(words.T, bits).T
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    nibbles = (words[:, :, None] >> shifts) & 15  # [R, C, 8]: nibble i
    out = torch.empty_like(nibbles)
    out[:, :, list(order)] = nibbles
    return out.reshape(words.shape[0], -1)


def _one(sd: dict, name: str, path):
    if name not in sd:
        raise UserError(f"{path}: missing tensor {name!r} (a quantized linear's qweight, qzeros and scales go "
                        "together)")
    return sd.pop(name)


def _codes(base: str, sd: dict, spec: dict, path) -> tuple:
    """(q [N, K] int, zero [N, G] float, scale [N, G] fp32, width (K / G), g_idx or None) of one quantized linear as
    the file stores it, its tensors taken out of sd."""
    qweight, qzeros, scales = (_one(sd, base + p, path) for p in _PARTS[:3])
    if spec["method"] == "awq" and base + ".g_idx" in sd:
        # AutoAWQ's GEMM groups consecutive inputs and writes no g_idx: one here would be read as GPTQ's act-order,
        # another model than the one AWQ runs
        raise UserError(f"{path}: tensor {base + '.g_idx'!r} is not an AWQ layer's (AutoAWQ's GEMM writes no g_idx, "
                        "its groups consecutive inputs; GPTQ's act-order does): which format its tensors are is "
                        "unclear")
    g_idx = sd.pop(base + ".g_idx", None)
    bits = spec["bits"]
    for name, t in ((".qweight", qweight), (".qzeros", qzeros)):
        if t.dtype != torch.int32 or t.dim() != 2:
            raise UserError(f"{path}: tensor {base}{name} is {str(t.dtype).removeprefix('torch.')} "
                            f"{tuple(t.shape)}, not 2-D int32 (words of {bits}-bit levels)")
    if spec["method"] == "gptq":
        if spec["zero_minus_one"] and bits != 3:
            # v1's z - 1 is word arithmetic, not per level: GPTQModel saves v1 as its v2 qzeros less 0x11111111 (4
            # bits; 0x55555555 at 2, 0x01010101 at 8), so a zero of 0 borrows from the next level up; adding the
            # words back (as GPTQModel's load does) undoes it exactly, where each level + 1 would read that zero as
            # 2 ** bits and its neighbour one short
            qzeros = (qzeros.long() + sum(1 << i for i in range(0, 32, bits))) & 0xFFFFFFFF
        q, zero = _unpack_rows(qweight, bits).T, _unpack_cols(qzeros, bits=bits).T  # [N, K], [N, G]
        if spec["zero_minus_one"] and bits == 3:
            # v1's z - 1 at 3 bits is per level (GPTQModel's _correct_gptq_v1_qzeros: a word add would lose the carry
            # of a level straddling two words), its zero of 0 stored as 7
            zero = (zero + 1) & 7
    else:
        q, zero = _unpack_cols(qweight, AWQ_ORDER).T, _unpack_cols(qzeros, AWQ_ORDER).T
    N, K = q.shape
    G = scales.shape[0]
    if tuple(scales.shape) != (G, N) or tuple(zero.shape) != (N, G) or G < 1:
        raise UserError(f"{path}: {base}'s qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)} and scales "
                        f"{tuple(scales.shape)} are not one {bits}-bit {spec['method'].upper()} layer")
    width = K if spec["group_size"] == -1 else spec["group_size"]
    # GPTQ gives a layer ceil(K / group_size) groups (AutoGPTQ's and GPTQModel's QuantLinear: g_idx k // group_size),
    # the last one short where K is not a multiple (Falcon-7B's 4544 inputs at 128: 35 groups, the last of 64);
    # AutoAWQ's WQLinear_GEMM asserts K a multiple of group_size, so an AWQ layer's groups are all whole
    if G != -(-K // width) or (spec["method"] == "awq" and width * G != K):
        raise UserError(f"{path}: {base} has {G} groups of its {K} inputs, not groups of group_size "
                        f"{spec['group_size']}" + (" (AutoAWQ's GEMM layers hold whole groups only: K a multiple of "
                                                   "group_size)" if spec["method"] == "awq" and K % width else ""))
    if not scales.is_floating_point():
        raise UserError(f"{path}: tensor {base}.scales is {scales.dtype}, not a float")
    return q, zero.float(), scales.T.float(), width, g_idx


def _levels(base: str, sd: dict, spec: dict, path) -> tuple:
    """(q [N, K] int, zero [N, G] float, scale [N, G] fp32, K / G, perm) of one 4-bit linear, its tensors taken out of
    sd. perm: None, or an act-order layer's input order (_act_order): q's columns are then in that order, each
    group's inputs consecutive."""
    q, zero, scale, width, g_idx = _codes(base, sd, spec, path)
    G = scale.shape[1]
    perm = None if g_idx is None else _act_order(g_idx, q.shape[1], G, width, f"{path}: {base}.g_idx")
    if perm is not None:
        q = q[:, perm]
    return q, zero, scale, width, perm


def _groups(g_idx, K: int, G: int, what) -> torch.Tensor:
    """g_idx (each of the K inputs' group, int64), or a UserError naming it where it is not one of the G groups of
    each input."""
    if g_idx.dim() != 1 or len(g_idx) != K or g_idx.is_floating_point() or g_idx.dtype == torch.bool:
        raise UserError(f"{what} is {str(g_idx.dtype).removeprefix('torch.')} {tuple(g_idx.shape)}, not the group "
                        f"(an integer) of each of the layer's {K} inputs")
    g_idx = g_idx.long()
    if int(g_idx.min()) < 0 or int(g_idx.max()) >= G:
        raise UserError(f"{what} names group {int(g_idx.min()) if int(g_idx.min()) < 0 else int(g_idx.max())}, "
                        f"outside the layer's {G} groups")
    return g_idx


def _act_order(g_idx, K: int, G: int, width: int, what) -> torch.Tensor | None:
    """None where g_idx (each input's group) is k // width, the groups consecutive inputs as ours are; else
    (desc_act's act-order: the inputs were quantized in another order) the inputs sorted by group, stably, as
    vLLM's and exllama's GPTQ kernels sort them: column j of the layer kept is input perm[j], so group g is columns
    g * width .. (g + 1) * width - 1, and the layer gathers x's columns in that order (Int4Linear.in_perm). Each
    group must then hold exactly width inputs, the last the K - (G - 1) width left where K is not a multiple of
    width (GPTQ's do: its g_idx is i // group_size of the i-th input quantized)."""
    g_idx = _groups(g_idx, K, G, what)
    if torch.equal(g_idx, torch.arange(K) // width):
        return None
    sizes, want = torch.bincount(g_idx, minlength=G), torch.full((G,), width)
    want[-1] = K - (G - 1) * width  # (a short last group: K not a multiple of group_size)
    if not torch.equal(sizes, want):
        # (the first group off is never the last: the sizes sum to K, so all the others right make it right too)
        g = int((sizes != want).nonzero()[0])
        raise UserError(f"{what} gives its groups different sizes (group {g} has {int(sizes[g])} inputs, not "
                        f"group_size {width}): act-order is read as whole groups of group_size inputs each")
    return torch.argsort(g_idx, stable=True)


def _quantized_bases(sd: dict, spec: dict, path, blocks: str) -> list:
    """The names of sd's quantized linears (each .qweight's), all of the blocks (refused by name otherwise)."""
    bases = sorted({k.removesuffix(".qweight") for k in sd if k.endswith(".qweight")})
    if not bases:
        raise UserError(f"{path}: config.json says {spec['method'].upper()} quantization, but no tensor is a "
                        "quantized linear's (.qweight)")
    outside = [b for b in bases if not b.startswith(blocks)]  # (GPTQModel's lm_head=True: the LM head quantized)
    if outside:
        raise UserError(f"{path}: {outside[0]} is quantized, where this model keeps all but the blocks' linear layers "
                        "float (the LM head, as GPTQ and AWQ leave it by default): requantize without it")
    return bases


def _check_all_read(sd: dict, path) -> None:
    left = sorted(k for k in sd if k.endswith(_PARTS))
    if left:
        raise UserError(f"{path}: tensor {left[0]!r} is part of no quantized linear this reader maps")


def int4_linears(sd: dict, spec: dict, path, blocks: str = "layers.", prefix: str | tuple = "model.") -> tuple:
    """(sd with each quantized linear's tensors replaced by a meta .weight of its float shape, for the reader's shape
    checks; {base name: (qweight uint8 [N, K / 2], scale, offset fp32 [N, K / G], in_perm: None, or an act-order
    layer's input order, Int4Linear.in_perm)}; G, our group size). blocks: the prefix of the file's block tensors
    (Falcon's "h."). An 8-bit spec (mode "int8": int8_linears) gives {base: (qweight int8 [N, K], scale fp32 [N],
    None)} and G None, or scale fp32 [N, K / G] and G (group scales); a bitsandbytes 8-bit one (bnb_int8_linears)
    the first. A folder read dequantized (a 4-bit one whose groups no size of GROUP_SIZES divides: gptq_dequantized,
    with its note; an 8-bit GPTQ one whose groups do not fit, int8_linears'; a bitsandbytes 8-bit one with some
    linear of the blocks float) gives (sd dequantized, None, None): the caller reads it as a float folder. prefix: the
    file's model prefix, for the config's modules left float (bitsandbytes')."""
    if spec["method"] == "bitsandbytes":
        return bnb_int8_linears(sd, spec, path, blocks, prefix)
    bases = _quantized_bases(sd, spec, path, blocks)
    if spec["mode"] == "int8":
        return int8_linears(sd, bases, spec, path, blocks)
    # our group size first, from the shapes (qweight's inputs: GPTQ packs them 8 to a word, AWQ keeps one a row), so
    # that each layer is unpacked and repacked alone (all of a 7B model's levels at once would be tens of GB). It
    # divides the file's group size and every layer's K: a GPTQ layer whose K is not a multiple of group_size ends in
    # a short group (_codes), which must be whole groups of ours too (4544 at 128: ours 64, the last group one)
    inputs = {sd[b + ".qweight"].shape[0] * (8 if spec["method"] == "gptq" else 1) for b in bases}
    sizes = inputs | ({spec["group_size"]} if spec["group_size"] != -1 else set())
    G = max((g for g in GROUP_SIZES if all(w % g == 0 for w in sizes)), default=None)
    if G is None:
        # no int4 layout holds these groups exactly: the float model of the same weights, as other bits are read
        sizes = ", ".join(map(str, GROUP_SIZES))
        return gptq_dequantized(sd, spec, path, blocks, why=f"no int4 group size here ({sizes}) divides both its "
                                f"group_size {spec['group_size']} and its layers' inputs {sorted(inputs)}"), None, None
    out = {}
    for b in bases:
        q, zero, scale, width, perm = _levels(b, sd, spec, path)
        N, K = q.shape
        # each of the file's groups is width / G of ours, sharing its scale and zero; a short last group (K not a
        # multiple of width) fewer, cut at K / G
        scale = scale.repeat_interleave(width // G, dim=1)[:, :K // G]
        zero = zero.repeat_interleave(width // G, dim=1)[:, :K // G]
        out[b] = (pack_int4(q).contiguous(), scale.contiguous(), (-zero * scale).contiguous(), perm)
        sd[b + ".weight"] = torch.empty(N, K, device="meta")
    _check_all_read(sd, path)
    return sd, out, G


def int8_linears(sd: dict, bases: list, spec: dict, path, blocks: str = "layers.") -> tuple:
    """int4_linears' (sd, packed, G) of an 8-bit symmetric GPTQ folder (int4_spec's mode "int8"): W[n, k] =
    s[n, g] (q[n, k] - z[n, g]) is Int8Linear's qweight q - z and scale s. Its zero is 128 (GPTQ's symmetric
    (maxq + 1) / 2), so q - z is -128..127, an int8; a layer whose levels less its zero run outside that is not the
    symmetric layer its config says, and is refused by name (no rounding). Where every layer has one group (scales
    [1, N]: group_size -1, or at least the layer's K), a scale a row: packed {base: (qweight int8 [N, K], scale fp32
    [N], None)}, G None. Where some layer has several (Qwen's *-GPTQ-Int8 folders: group_size 128), group scales:
    scale fp32 [N, K / G], G our group size, int4_linears' (the largest of GROUP_SIZES dividing the file's group
    size and every layer's K, each of the file's scales repeated over ours: the same matrix). Where no size divides
    them, or a grouped layer is act-order (desc_act: Int8Linear has no in_perm), (sd dequantized, None, None): the
    whole folder read as a float model (gptq_dequantized, its note naming why)."""
    # decided for the folder, not layer by layer: this model's int8 layers are all of the blocks' or none (as
    # bnb_int8_linears'), and all of one group size. (A missing or misshapen .scales is left for _codes to refuse.)
    grouped = [b for b in bases if getattr(sd.get(b + ".scales"), "ndim", 0) == 2 and sd[b + ".scales"].shape[0] > 1]
    G = None
    if grouped:
        inputs = {sd[b + ".qweight"].shape[0] * 4 for b in bases}  # (GPTQ's 8-bit qweight: 4 inputs a word)
        sizes = inputs | ({spec["group_size"]} if spec["group_size"] != -1 else set())
        G = max((g for g in GROUP_SIZES if all(w % g == 0 for w in sizes)), default=None)
        why = None
        if G is None:
            why = (f"no int8 group size here ({', '.join(map(str, GROUP_SIZES))}) divides both its group_size "
                   f"{spec['group_size']} and its layers' inputs {sorted(inputs)}")
        else:
            for b in grouped:  # act-order: its groups are inputs scattered over K, which Int8Linear does not gather
                g_idx, K = sd.get(b + ".g_idx"), sd[b + ".qweight"].shape[0] * 4
                if g_idx is not None and g_idx.shape == (K,) and not torch.equal(
                        g_idx.long(), torch.arange(K) // spec["group_size"]):
                    why = (f"{b} is act-order (desc_act: its groups' inputs scattered, by g_idx), which int8 group "
                           "scales do not gather")
                    break
        if why is not None:
            return gptq_dequantized(sd, spec, path, blocks, why=why), None, None
    out = {}
    for b in bases:
        q, zero, scale, width, g_idx = _codes(b, sd, spec, path)
        N, K = q.shape
        if g_idx is not None:  # checked (k // width, or desc_act with one group: nothing to reorder; act-order
            _act_order(g_idx, K, scale.shape[1], width, f"{path}: {b}.g_idx")  # with groups was read dequantized)
        g = torch.arange(K) // width
        w = q - zero.long()[:, g]  # [N, K] less each input's group's zero
        lo, hi = int(w.min()), int(w.max())
        if lo < -128 or hi > 127:
            raise UserError(f"{path}: {b}'s 8-bit levels less their zeros run {lo}..{hi}, outside int8's -128..127: "
                            "not the symmetric GPTQ layer (zero 128) its config says (sym true)")
        if G is None:
            scale = scale[:, 0]
        else:
            # each of the file's groups is width / G of ours, sharing its scale; a short last group (K not a
            # multiple of width) fewer, cut at K / G
            scale = scale.repeat_interleave(width // G, dim=1)[:, :K // G]
        out[b] = (w.to(torch.int8).contiguous(), scale.contiguous(), None)
        sd[b + ".weight"] = torch.empty(N, K, device="meta")
    _check_all_read(sd, path)
    return sd, out, G


def gptq_dequantized(sd: dict, spec: dict, path, blocks: str = "layers.", why: str | None = None) -> dict:
    """sd with each GPTQ linear (int4_spec's mode "float": 2 or 3 bits, or 8 without Int8Linear's form) replaced by
    the float32 matrix it stands for, W[n, k] = (q[n, k] - z[n, g]) s[n, g] with g = g_idx[k] (each input's own
    group: act-order needs no reordering here), and a note on stderr that it was. why: the note's reason where it is
    not the bits' (int4_linears: a 4-bit GPTQ or AWQ folder whose groups no int4 group size divides)."""
    bases = _quantized_bases(sd, spec, path, blocks)
    for b in bases:
        q, zero, scale, width, g_idx = _codes(b, sd, spec, path)
        N, K = q.shape
        g = torch.arange(K) // width if g_idx is None else _groups(g_idx, K, scale.shape[1], f"{path}: {b}.g_idx")
        # (exact in fp32: an fp16 scale times an integer of at most 8 bits)
        sd[b + ".weight"] = (q - zero[:, g]) * scale[:, g]
    _check_all_read(sd, path)
    note(f"{path}: its {len(bases)} {spec['bits']}-bit {spec['method'].upper()} linear weights are dequantized to "
         "float at load: an ordinary float model of the same weights, " + (why or "no " + (
             f"{spec['bits']}-bit kernel" if spec["bits"] != 8 else "int8 form for its groups or zero points")))
    return sd


def folder_dequantized(sd: dict, spec: dict, path, blocks: str = "layers.", prefix: str | tuple = "model.") -> dict:
    """The float model's tensors of a folder folder_quantization reads dequantized: FP8 (fp8_dequantized), GPTQ of
    bits without a kernel here (gptq_dequantized), bitsandbytes' 4-bit (bnb_dequantized) or gpt-oss's MXFP4 experts
    (mxfp4_experts, at its default dtype)."""
    if spec["method"] == "mxfp4":
        return mxfp4_experts(sd, spec, path, blocks, prefix)
    if spec["method"] == "bitsandbytes":
        return bnb_dequantized(sd, spec, path, blocks, prefix)
    if spec["method"] == "gptq":
        return gptq_dequantized(sd, spec, path, blocks)
    return fp8_dequantized(sd, spec, path, blocks, prefix)


def int4_rows(sd: dict, packed: dict, base: str, parts: dict) -> None:
    """A fused 4-bit linear (int4_linears' base) taken apart by its outputs: for each {name: rows (an index
    tensor)} of parts, sd[name.weight] a meta weight of those rows and packed[name] those rows of base's qweight,
    scale and offset, in place of base's packed entry (sd's meta weight of base is left as it is: GPT-NeoX's and
    Falcon's readers see by it that the fused linear was 4-bit). Exact: each output's levels, scale and offset are
    its own, the groups running along the inputs. A float base (a bitsandbytes 8-bit folder read dequantized,
    bnb_int8_linears) is left whole, for the reader to split as a float folder's."""
    if base + ".weight" in sd and not sd[base + ".weight"].is_meta:
        return
    fused = packed.pop(base)
    # (qweight: int4's two levels a byte along the inputs, uint8; int8's one a byte)
    K = fused[0].shape[1] * (2 if fused[0].dtype == torch.uint8 else 1)
    for name, rows in parts.items():
        sd[name + ".weight"] = torch.empty(len(rows), K, device="meta")
        packed[name] = (*(t[rows] for t in fused[:-1]), fused[-1])  # (an act-order's input order: every part's)


def model_with_int4(cfg, mapping, sd: dict, packed: dict, group_size: int | None, path,
                    quantized_from: str | None = None, layouts: dict | None = None) -> GPTModel:
    """model_with_tensors' model of a quantized folder: every Linear of the blocks an Int4Linear (quantized_layout;
    the LM head float, as GPTQ and AWQ leave it) filled from int4_linears' packed ({base: (qweight, scale, offset,
    in_perm)}, the base found by the meta .weight mapping() gives it), its bias from the file, the rest as
    model_with_tensors fills it. An int8 qweight (int8_linears'): Int8Linears, from {base: (qweight, scale, None)},
    a scale a row where group_size is None, else group scales.
    packed empty (a bitsandbytes 8-bit folder read dequantized: bnb_int8_linears): model_with_tensors' float model.
    quantized_from: what the quantization is recorded as (QUANTIZED_FROM's key) where there is no config.json to say
    (a GGUF file's, gguf_import.py). layouts ({base: (mode, group size)}, a mixed GGUF file's): each layer's own
    (model/quant.py mixed_layout), for group_size and the packed tensors' dtype."""
    if not packed:
        return model_with_tensors(cfg, mapping, path)
    meta = {}
    bases = {id(t): k.removesuffix(".weight") for k, t in sd.items() if t.is_meta}  # mapping() hands these on

    def build(cfg):
        with torch.device("meta"):  # (the float matrices never made)
            model = GPTModel(cfg)
        # (int8_linears' and bnb_int8_linears' qweight int8, int4's packed uint8; int8's group_size None: a scale a row)
        if layouts:
            meta["model"] = model = mixed_layout(model, layouts)
            return model.to_empty(device="cpu").eval()
        mode = "int8" if next(iter(packed.values()))[0].dtype == torch.int8 else "int4"
        meta["model"] = model = quantized_layout(model, mode, head=False, group_size=group_size or 128,
                                                 int8_group_size=group_size)
        return model.to_empty(device="cpu").eval()

    def floats():
        model, ours, filled = meta["model"], mapping(), set()
        layers = {name for name, m in model.named_modules() if isinstance(m, QuantLinear)}
        for name in [n for n in ours if n.removesuffix(".weight") in layers or n.removesuffix(".bias") in layers]:
            layer, _, kind = name.rpartition(".")
            value, m = ours.pop(name), model.get_submodule(layer)
            if kind == "weight":
                if not value.is_meta:
                    raise UserError(f"{path}: {layer} is stored as a float weight beside quantized layers; this model "
                                    "reads a folder whose every linear layer of the blocks is quantized")
                *tensors, perm = packed[bases[id(value)]]
                bufs = (m.qweight, m.scale, m.offset) if isinstance(m, Int4Linear) else (m.qweight, m.scale)
                for buf, t in zip(bufs, tensors, strict=True):
                    assert buf.shape == t.shape, (layer, buf.shape, t.shape)  # (int4_linears made them to fit)
                    buf.copy_(t)
                if perm is not None:
                    m.set_in_perm(perm)
                filled.add(layer)
            elif value.dtype not in _FLOAT_DTYPES or value.shape != m.bias.shape:
                raise UserError(f"{path}: tensor for {name} is {value.dtype} {tuple(value.shape)}, not a float "
                                f"bias of {m.out_features}")
            else:
                m.bias.copy_(value)
        if layers - filled:
            raise UserError(f"{path}: no weights for {sorted(layers - filled)[:3]}")
        return ours

    model = model_with_tensors(cfg, floats, path, build=build)
    check_quantized_scales(model, path)  # (a scale of 0 or below: a damaged file)
    # the folder's own quantization, not ours: GPTModel.save records it (quantized_metadata), for info and the loader
    if quantized_from is not None:
        model.quantized_from = quantized_from
        return model
    q = hf_quantization(Path(path).parent / "config.json")
    model.quantized_from = "bitsandbytes" if bnb_method(q) else q["quant_method"]
    return model


# -- FP8 folders, read dequantized -------------------------------------------------------------------------------
# Each quantized linear keeps its .weight [N, K] as float8_e4m3fn beside a float scale, W = w * scale, the scale
# broadcast over (from transformers' integrations and compressed-tensors' float-quantized decompress):
# - "fp8" (FineGrainedFP8Config, DeepSeek-V3's and Qwen3-*-FP8's): weight_scale_inv [ceil(N / bn), ceil(K / bk)]
#   for weight_block_size [bn, bk] (output rows, input columns; the last blocks ragged where bn, bk do not divide);
#   weight_block_size null: one weight_scale_inv for the whole weight.
# - "fbgemm_fp8": weight_scale [N, 1], one per output row.
# - "compressed-tensors" format float-quantized: weight_scale of its weights' strategy: "tensor" one, "channel"
#   [N, 1], "block" [ceil(N / bn), ceil(K / bk)] for block_structure [bn, bk].
# The LM head (and modules_to_not_convert / ignore) stay float in the file. Dequantized, the model is an ordinary
# float model of the same weights: no FP8 kernel here, its activations never rounded to FP8 (the folder's dynamic
# per-token or per-block activation quantization is its kernels' rounding, not part of the weights).
FP8_METHODS = ("fp8", "fbgemm_fp8", "compressed-tensors")
_FP8_SCALES = (".weight_scale_inv", ".weight_scale")
# tensors an FP8 folder may hold that this reader does not read: static activation scales (Mistral's consolidated
# format names its ".qscale_act", which vLLM's Mistral loader reads as input_scale), a KV cache's scales, zero points
# (an asymmetric scheme): named, never dropped
_FP8_OTHER = (".input_scale", ".activation_scale", ".input_scale_ub", ".qscale_act", ".weight_zero_point",
              ".input_zero_point", ".k_scale", ".v_scale", ".output_scale")
_STATIC = ("its activations quantized with the fixed scales the folder stores (input_scale), clipped where they run "
           "past them: the dequantized float model, which does not clip, would give other outputs")


def _block(q: dict, value, name: str) -> tuple:
    if (not isinstance(value, (list, tuple)) or len(value) != 2 or
            not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        refuse_quantized(q, f"{name} {value!r}: two positive integers, the blocks' output rows and input columns",
                         remedy="load the float model it was quantized from")
    return tuple(value)


def fp8_spec(q: dict) -> dict:
    """An FP8 quantization_config (hf_quantization's) as {method, scale (the scale tensor's suffix; scales: those it
    is read under, where the format's loader takes others too), block ((rows, columns) or None), per ("block", "row",
    "channel", "tensor"), keep (a name -> bool: a module the config says is left float)} for fp8_dequantized, or a
    UserError naming what of it is not read."""
    method = q["quant_method"]
    refuse = lambda why: refuse_quantized(q, why, remedy="load the float model it was quantized from")  # noqa: E731
    if method == "fp8":
        # FineGrainedFP8Config takes MiniMax's ignored_layers for modules_to_not_convert where that is missing or
        # null (FbgemmFp8Config and compressed-tensors take no such alias: left unread there, as they leave it)
        field = "modules_to_not_convert" if q.get("modules_to_not_convert") is not None or "ignored_layers" not in q \
            else "ignored_layers"
        keep = _names_kept(q, q.get(field), field)
        # the scale under the other names transformers' fp8 loader renames to weight_scale_inv
        # (FineGrainedFP8HfQuantizer.update_weight_conversions: DeepSeek-V4's ".scale", Mistral Large's
        # ".qscale_weight")
        scales = (".weight_scale_inv", ".scale", ".qscale_weight")
        # scale_fmt "ue8m0" (DeepSeek-V3.1's and V4's): power-of-two scales, still each block's multiplier, stored as
        # float32 or as float8_e8m0fnu exponents (fp8_dequantized reads both); FineGrainedFP8Config refuses others
        fmt = q.get("scale_fmt", "float")
        if fmt not in ("float", "ue8m0"):
            refuse(f"scale_fmt {fmt!r}: 'float' or 'ue8m0' scales only")
        scheme = q.get("activation_scheme", "dynamic")
        if not (isinstance(scheme, str) and scheme.lower() == "dynamic"):  # (FineGrainedFP8Config lowercases it)
            refuse(f"activation_scheme {scheme!r}: {_STATIC}; 'dynamic' only")
        block = q.get("weight_block_size", [128, 128])  # (transformers' default; an explicit null is per tensor)
        if block is None:
            # FineGrainedFP8Config(weight_block_size=None): FP8Linear's one weight_scale_inv for the whole weight
            return dict(method=method, scale=".weight_scale_inv", scales=scales, block=None, per="tensor", keep=keep,
                        kept_by=field)
        return dict(method=method, scale=".weight_scale_inv", scales=scales, per="block",
                    block=_block(q, block, "weight_block_size"), keep=keep, kept_by=field)
    if method == "fbgemm_fp8":
        return dict(method=method, scale=".weight_scale", block=None, per="row",
                    keep=_names_kept(q, q.get("modules_to_not_convert"), "modules_to_not_convert"),
                    kept_by="modules_to_not_convert")
    # compressed-tensors: its FP8 ("float-quantized") weights only; its int4 / int8 packings, sparsity, a quantized KV
    # cache are other formats
    fmt = q.get("format")
    if fmt != "float-quantized":
        refuse(f"format {fmt!r}: FP8 'float-quantized' only")
    sparsity = q.get("sparsity_config") or {}
    if not isinstance(sparsity, dict) or sparsity.get("format", "dense") != "dense":
        refuse(f"sparsity_config {sparsity!r}: dense weights only")
    if q.get("kv_cache_scheme") is not None:
        refuse(f"kv_cache_scheme {q['kv_cache_scheme']!r}: {_STATIC.replace('activations', 'keys and values')}")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups or not all(isinstance(g, dict) for g in groups.values()):
        refuse(f"config_groups {groups!r}: an object of quantization schemes")
    schemes = []
    for name, g in groups.items():
        w, act = g.get("weights"), g.get("input_activations")
        if g.get("format", fmt) != fmt:
            refuse(f"config_groups {name!r} has format {g['format']!r}: 'float-quantized' only")
        # compressed-tensors' QuantizationArgs lowercases type and strategy (its validators), and a strategy
        # missing or null is its group_size's: none "tensor", -1 "channel", above 0 "group"
        lower = lambda v: v.lower() if isinstance(v, str) else v  # noqa: E731
        if not isinstance(w, dict) or lower(w.get("type")) != "float" or w.get("num_bits") != 8:
            refuse(f"config_groups {name!r} weights {w!r}: 8-bit float (FP8) weights only")
        if w.get("symmetric", True) is not True or w.get("dynamic", False) is not False:
            refuse(f"config_groups {name!r} weights {w!r}: symmetric FP8 weights with stored scales only")
        strategy = lower(w.get("strategy"))
        if strategy is None:
            size = w.get("group_size")
            strategy = "tensor" if size is None else "channel" if size == -1 else "group"
        if strategy not in ("tensor", "channel", "block"):
            refuse(f"config_groups {name!r} weights strategy {strategy!r}: 'tensor', 'channel' or 'block' scales only")
        block = _block(q, w.get("block_structure"), "block_structure") if strategy == "block" else None
        if isinstance(act, dict) and act.get("dynamic") is not True:
            refuse(f"config_groups {name!r} input_activations static: {_STATIC}")
        if g.get("output_activations") is not None:
            refuse(f"config_groups {name!r} output_activations {g['output_activations']!r}: weights and dynamic "
                   "activations only")
        schemes.append((strategy, block))
    if len(set(schemes)) > 1:
        # which group a module is in is its targets' matching (class names, regexes): each strategy's scale shape
        # alone would not say which was meant
        refuse(f"config_groups of several weight schemes {sorted(set(map(str, schemes)))}: one for all only")
    strategy, block = schemes[0]
    return dict(method=method, scale=".weight_scale", block=block, per=strategy,
                keep=_names_kept(q, q.get("ignore"), "ignore"), kept_by="ignore")


def _names_kept(q: dict, names, field: str):
    """A test of a module name (the file's, e.g. "model.layers.0.mlp.gate") against the config's list of modules left
    float, each matched as the library that wrote it matches: transformers' modules_to_not_convert, compressed-tensors'
    ignore (a module, a "re:" regex, or a class: a class here refused, unread)."""
    if names is None:
        names = []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        refuse_quantized(q, f"{field} {names!r}: a list of module names", remedy="load the float model it was "
                         "quantized from")
    if field == "ignore":
        for n in names:
            if n[:1].isupper() and "." not in n:  # (a class name: "Linear", "Qwen3MoeSparseMoeBlock")
                refuse_quantized(q, f"ignore names the class {n!r}: module names and 're:' patterns only",
                                 remedy="load the float model it was quantized from")
        # (compressed-tensors matches a "re:" pattern from the name's start, any other name whole)
        pats = [re.compile(n[3:]) for n in names if n.startswith("re:")]
        plain = {n for n in names if not n.startswith("re:")}
        return lambda name: name in plain or any(p.match(name) for p in pats)
    # transformers' should_convert_module: a pattern matched from the name's start up to a module boundary (a regex:
    # "model.layers.*"; "model.layers.1" keeps layer 1, not layers 10 to 19 with it), or the name's end ("down_proj")
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    pats = []
    for n in names:
        try:
            pats.append(re.compile(rf"(?:{n}){boundary}"))
        except re.error:
            pats.append(re.compile(rf"(?:{re.escape(n)}){boundary}"))
    return lambda name: any(p.match(name) for p in pats) or any(name.endswith(n) for n in names)


def _dequantized(w, scale, spec: dict, name: str, path):
    """w (float8_e4m3fn [N, K]) times its scale broadcast per spec, float32; a scale of another shape named."""
    N, K = w.shape
    if spec["per"] == "block":
        bn, bk = spec["block"]
        want = (-(-N // bn), -(-K // bk))
    else:
        want = {"row": (N, 1), "channel": (N, 1), "tensor": (1,)}[spec["per"]]
    shape = tuple(scale.shape)
    # (a per-tensor scale is saved as [1] or a 0-d tensor, both one number)
    ok = shape == want or (spec["per"] == "tensor" and scale.numel() == 1 and scale.dim() <= 2)
    if not ok:
        raise UserError(f"{path}: tensor {name} has shape {shape}, where {spec['method']}'s "
                        f"{spec['per']} scales of an FP8 weight {tuple(w.shape)} are {want}"
                        + (f" (weight_block_size {list(spec['block'])})" if spec["per"] == "block" else ""))
    scale = scale.float()
    if spec["per"] == "block":
        bn, bk = spec["block"]
        # each scale over its block, the last row and column of blocks cropped where N, K are not multiples
        scale = scale.repeat_interleave(bn, dim=0)[:N].repeat_interleave(bk, dim=1)[:, :K]
    else:
        scale = scale.reshape(N, 1) if spec["per"] in ("row", "channel") else scale.reshape(())
    return w.float() * scale


def _left_float(spec: dict, base: str, prefix) -> bool:
    """Whether the config (spec's keep) leaves the module base (a reader's name, without the file's prefix) float,
    tried under each name the file's model may give it: prefix one, or a tuple (a multimodal Gemma 3's language
    model is model.language_model. in transformers 5, language_model.model. in the Hub's older saves, and its
    config may name either), and bare."""
    prefixes = (prefix,) if isinstance(prefix, str) else tuple(prefix)
    return any(spec["keep"](p + base) for p in prefixes) or spec["keep"](base)


def fp8_dequantized(sd: dict, spec: dict, path, blocks: str = "layers.", prefix: str | tuple = "model.") -> dict:
    """sd (a reader's tensors, named without its prefix) with each FP8 weight of the blocks' linears replaced by the
    float32 matrix it stands for and its scale taken out; a note on stderr that it was. Refused by name: an FP8
    tensor outside the blocks (an LM head or embedding), in a module the config leaves float, without its scale or
    with one of another shape, a scale without its weight, and the tensors this reader does not read (static
    activation scales, zero points). prefix: the file's model prefix (or prefixes: _left_float)."""
    fp8 = sorted(k for k, t in sd.items() if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2))
    scales = spec.get("scales", (spec["scale"],))
    named = {}  # each FP8 weight's scale tensor: under the format's name, or another its loader reads as that
    if not fp8:
        raise UserError(f"{path}: config.json says {spec['method']} (FP8) quantization, but no tensor is float8")
    for k in fp8:
        base = k.removesuffix(".weight")
        if not k.endswith(".weight") or sd[k].dim() != 2:
            raise UserError(f"{path}: tensor {k} is {str(sd[k].dtype).removeprefix('torch.')} "
                            f"{tuple(sd[k].shape)}: FP8 weights of linear layers are read here, nothing else")
        if sd[k].dtype != torch.float8_e4m3fn:
            raise UserError(f"{path}: tensor {k} is float8_e5m2; the FP8 formats read here store float8_e4m3fn")
        if not k.startswith(blocks):
            raise UserError(f"{path}: {k} is FP8, where this reader dequantizes the blocks' linear layers only (an LM "
                            "head or embedding is left float by the FP8 quantizers): load the float model it was "
                            "quantized from")
        if _left_float(spec, base, prefix):
            raise UserError(f"{path}: {k} is FP8, but the quantization_config leaves {base} float "
                            f"({spec['kept_by']}): which it is is unclear")
        found = [base + s for s in scales if base + s in sd]
        if not found:
            also = f"; nor its {' or '.join(scales[1:])}, read as that too" if len(scales) > 1 else ""
            raise UserError(f"{path}: FP8 tensor {k} has no {base}{spec['scale']} beside it ({spec['method']}'s "
                            f"scales{also})")
        if len(found) > 1:
            raise UserError(f"{path}: FP8 tensor {k} has scales {' and '.join(found)}, both read as its "
                            f"{spec['scale'].lstrip('.')}: which is meant is unclear")
        named[k] = found[0]
    other = sorted(k for k in sd if k not in named.values() and k.endswith(_FP8_OTHER + _FP8_SCALES + scales))
    if other:
        raise UserError(f"{path}: tensor {other[0]!r} is not read here ({spec['method']}'s FP8 weights and their "
                        f"{spec['scale'].lstrip('.')} only: no static activation scales, zero points or scales without "
                        "an FP8 weight)")
    for k in fp8:
        name = named[k]
        scale = sd.pop(name)
        if not scale.is_floating_point() or scale.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise UserError(f"{path}: tensor {name} is {str(scale.dtype).removeprefix('torch.')}, not a float scale")
        if scale.dtype == getattr(torch, "float8_e8m0fnu", None):
            # ue8m0 scales saved as exponent bytes (DeepSeek-V4's): 2 ** (b - 127) exactly in float32, the byte 255
            # NaN (refused below); compared as they are, they would not compute ("gt" has no e8m0 kernel)
            scale = scale.float()
        # every FP8 quantizer keeps its scales finite and > 0 (an all-zero block's too: transformers gives it 1,
        # compressed-tensors clamps to eps) and its values within +-448: a 0 or negative scale (a zeroed or
        # sign-flipped block that would load as another model, as check_quantized_scales refuses for int4), or
        # e4m3fn's NaN, is a damaged file, named here by the file's tensor rather than the float one it would become
        if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
            raise UserError(f"{path}: tensor {name} holds a scale that is 0 or below, NaN or inf "
                            f"({spec['method']}'s FP8 scales are positive: a damaged file)")
        if bool(torch.isnan(sd[k].float()).any()):
            raise UserError(f"{path}: tensor {k} holds FP8 NaN values (a quantized weight is within +-448: a "
                            "damaged file)")
        sd[k] = _dequantized(sd[k], scale, spec, name, path)
    note(f"{path}: its {len(fp8)} FP8 linear weights ({spec['method']}) are dequantized to float at load: an "
         "ordinary float model of the same weights, no FP8 kernel")
    return sd


# -- bitsandbytes folders (transformers' BitsAndBytesConfig: load_in_8bit, load_in_4bit) ---------------------------
# From bitsandbytes' functional.py (quantize_4bit, QuantState.as_dict / from_dict, int8_vectorwise_quant) and
# nn/modules.py (Params4bit, Linear8bitLt's state dict), as transformers saves them:
# - 8-bit (LLM.int8): weight int8 [N, K] and SCB [N] (each row's absmax), W = weight * SCB / 127; weight_format a
#   uint8 0 ("row": older versions also wrote their GPU tile layouts, 1 to 3). At run time bitsandbytes rounds the
#   activations to int8 too (their outlier columns above llm_int8_threshold in 16 bits): read here weight-only, as
#   Int8Linear (its qweight the weight, its one scale a row SCB / 127 rounded to fp32: q * scale is within an fp32
#   ulp of bitsandbytes' own int8_vectorwise_dequant, q * SCB * (1 / 127) rounded twice, not always the same bits),
#   or, where some linear of the blocks is left float (llm_int8_skip_modules), as the float model of the same weights
#   (a model is all Int8Linear or all float here).
# - 4-bit: the [N, K] weight flattened row-major, cut into blocks of blocksize (64; the last ragged), each block's
#   absmax (float32) and each value's nearest code of quant_map / absmax, two codes a byte, the first in the high
#   nibble: weight uint8 [ceil(NK / 2), 1]; W = quant_map[code] * absmax[i // blocksize], in fp32, cast to the
#   quant_state's dtype. Double quant (bnb_4bit_use_double_quant): absmax less its mean (nested_offset) quantized
#   again by 8-bit blocks of nested_blocksize (256): absmax uint8 codes of nested_quant_map (256 values) times
#   nested_absmax, plus the offset. Beside the weight: weight.absmax, weight.quant_map [16], weight.nested_absmax,
#   weight.nested_quant_map and weight.quant_state.bitsandbytes__nf4 (or __fp4): a uint8 tensor holding JSON of
#   quant_type, blocksize, dtype, shape and nested_blocksize, nested_dtype, nested_offset. NF4's 16 levels are
#   normal quantiles and FP4's a tiny float's, neither equally spaced: no scale and offset (Int4Linear's W = q *
#   scale + offset) gives them, so 4-bit folders load dequantized, an ordinary float model of the same weights.
# LM heads (and what llm_int8_skip_modules names) stay float, as transformers leaves them.
BNB_NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
           -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
           0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
# (get_4bit_type("fp4"): 1 sign, 2 exponent and 1 mantissa bits, normalized by its largest, 12)
BNB_FP4 = tuple(v / 12 for v in (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0,
                                 -2.0, -3.0))
_BNB_STATE = ".weight.quant_state.bitsandbytes__"
_BNB4_PARTS = (".weight.absmax", ".weight.quant_map", ".weight.nested_absmax", ".weight.nested_quant_map")
_BNB_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def bnb_method(q: dict) -> bool:
    # (transformers reads a config without quant_method but with load_in_4bit / load_in_8bit as bitsandbytes')
    return q.get("quant_method", "bitsandbytes" if q.get("load_in_4bit") or q.get("load_in_8bit") else None) \
        == "bitsandbytes"


def bnb_spec(q: dict) -> dict:
    """A bitsandbytes quantization_config as {method, bits (4 or 8), keep (a name -> bool: a module the config leaves
    float)}, or a UserError naming what of it is not read."""
    refuse = lambda why: refuse_quantized(q, why, remedy="load the float model it was quantized from")  # noqa: E731
    four, eight = q.get("load_in_4bit", False), q.get("load_in_8bit", False)
    if four not in (True, False) or eight not in (True, False) or four == eight:
        refuse(f"load_in_4bit {four!r} and load_in_8bit {eight!r}: exactly one of them true")
    if four:
        # (Params4bit packs its bytes into another dtype's elements when quant_storage is not uint8: unread)
        storage = q.get("bnb_4bit_quant_storage", "uint8")
        if storage not in ("uint8", None):
            refuse(f"bnb_4bit_quant_storage {storage!r}: 4-bit codes stored as uint8 only")
        kind = q.get("bnb_4bit_quant_type", "fp4")
        if kind not in ("nf4", "fp4"):
            refuse(f"bnb_4bit_quant_type {kind!r}: 'nf4' or 'fp4' only")
    elif q.get("llm_int8_has_fp16_weight"):
        refuse("llm_int8_has_fp16_weight true: 8-bit weights stored as int8 with their SCB only")
    keep = _names_kept(q, q.get("llm_int8_skip_modules"), "llm_int8_skip_modules")
    return dict(method="bitsandbytes", bits=4 if four else 8, keep=keep)


def _bnb_bases(sd: dict, spec: dict, path, blocks: str, prefix: str | tuple) -> list:
    """The names of sd's bitsandbytes linears of spec's bits (each 4-bit one's quant_state, each 8-bit one's SCB),
    all of the blocks and none the config leaves float; whatever of the other width, or a part of none, named."""
    four = sorted({k.partition(_BNB_STATE)[0] for k in sd if _BNB_STATE in k})
    eight = sorted(k.removesuffix(".SCB") for k in sd if k.endswith(".SCB"))
    bases, other = (four, eight) if spec["bits"] == 4 else (eight, four)
    what = ("4-bit", "weight.quant_state.bitsandbytes__nf4 or __fp4") if spec["bits"] == 4 else ("8-bit", "SCB")
    if other:
        raise UserError(f"{path}: {other[0]} is a bitsandbytes {'8-bit' if spec['bits'] == 4 else '4-bit'} linear, "
                        f"where the config says {what[0]} (load_in_{spec['bits']}bit)")
    if not bases:
        raise UserError(f"{path}: config.json says bitsandbytes {what[0]} quantization, but no tensor is a quantized "
                        f"linear's ({what[1]})")
    parts = _BNB4_PARTS if spec["bits"] == 4 else (".weight_format",)
    orphan = sorted(k for k in sd if k.endswith(parts) and
                    k.removesuffix(next(p for p in parts if k.endswith(p))) not in bases)
    if orphan:
        raise UserError(f"{path}: tensor {orphan[0]!r} is part of no bitsandbytes {what[0]} linear (no {what[1]} "
                        "beside it)")
    for b in bases:
        if not b.startswith(blocks):
            raise UserError(f"{path}: {b} is quantized by bitsandbytes, where this model keeps all but the blocks' "
                            "linear layers float (an LM head or embedding; transformers leaves the head float): load "
                            "the float model it was quantized from")
        if _left_float(spec, b, prefix):
            raise UserError(f"{path}: {b} is quantized by bitsandbytes, but the quantization_config leaves it float "
                            "(llm_int8_skip_modules): which it is is unclear")
        if b + ".weight" not in sd:
            raise UserError(f"{path}: bitsandbytes linear {b} has no {b}.weight (its quantized codes)")
    return bases


def _bnb_int8(sd: dict, b: str, path) -> tuple:
    """(q int8 [N, K], SCB fp32 [N]) of one 8-bit linear, its tensors taken out of sd; what is not LLM.int8's row
    layout named."""
    q, scb, fmt = sd.pop(b + ".weight"), sd.pop(b + ".SCB"), sd.pop(b + ".weight_format", None)
    if q.dtype != torch.int8 or q.dim() != 2:
        raise UserError(f"{path}: tensor {b}.weight is {str(q.dtype).removeprefix('torch.')} {tuple(q.shape)}, not "
                        "2-D int8 (bitsandbytes' 8-bit weight)")
    if not scb.is_floating_point() or tuple(scb.shape) != (q.shape[0],):
        raise UserError(f"{path}: tensor {b}.SCB is {str(scb.dtype).removeprefix('torch.')} {tuple(scb.shape)}, "
                        f"where the 8-bit weight {tuple(q.shape)} has one float absmax a row: ({q.shape[0]},)")
    if fmt is not None and (fmt.numel() != 1 or int(fmt.reshape(-1)[0]) != 0):
        raise UserError(f"{path}: tensor {b}.weight_format is {fmt.reshape(-1).tolist()}, not 0: its weight is in a "
                        "GPU tile layout (col32, col_turing, col_ampere) of older bitsandbytes, not rows")
    # (each row's absmax: >= 0 and finite; a negative or NaN one is a damaged file)
    if not bool(torch.isfinite(scb).all()) or not bool((scb >= 0).all()):
        raise UserError(f"{path}: tensor {b}.SCB holds an absmax below 0, NaN or inf (a damaged file)")
    return q, scb.float()


def bnb_int8_linears(sd: dict, spec: dict, path, blocks: str, prefix: str | tuple) -> tuple:
    """int4_linears' (sd, {base: (qweight int8 [N, K], scale fp32 [N], None)}, None) of a bitsandbytes 8-bit
    folder: Int8Linear's W = q * scale is bitsandbytes' q * SCB / 127, scale = SCB / 127 a row. Where some linear of
    the blocks is float (llm_int8_skip_modules), the 8-bit ones are dequantized into sd instead, a note saying why,
    and (sd, None, None) comes back: the caller reads it as a float folder."""
    bases = _bnb_bases(sd, spec, path, blocks, prefix)
    # (the blocks' float matrices: linears left float; norms and biases are 1-D)
    floats = sorted(k for k, t in sd.items() if k.startswith(blocks) and k.endswith(".weight") and t.dim() == 2
                    and t.is_floating_point() and k.removesuffix(".weight") not in bases)
    out = {}
    for b in bases:
        q, scb = _bnb_int8(sd, b, path)
        if floats:
            # (float64 then fp32: W = q * SCB / 127 rounded once)
            sd[b + ".weight"] = (q.double() * scb.double()[:, None] / 127).float()
            continue
        # a row of absmax 0 is all zeros (bitsandbytes' W is 0 whatever q): scale 1 and q 0, as quantize_weight
        # gives such a row (check_quantized_scales refuses a scale of 0)
        zero = scb == 0
        q = q.masked_fill(zero[:, None], 0)
        out[b] = (q.contiguous(), torch.where(zero, 1.0, scb / 127).contiguous(), None)
        sd[b + ".weight"] = torch.empty(q.shape, device="meta")
    if floats:
        note(f"{path}: its {len(bases)} bitsandbytes 8-bit linear weights are dequantized to float at load ("
             f"{floats[0].removesuffix('.weight')} and others of the blocks are float, llm_int8_skip_modules: this "
             "model's int8 layers are all of the blocks' or none): an ordinary float model of the same weights")
        return sd, None, None
    return sd, out, None


def _bnb_part(sd: dict, name: str, path):
    if name not in sd:
        raise UserError(f"{path}: missing tensor {name!r} (a bitsandbytes 4-bit weight's absmax, quant_map and "
                        "quant_state go together, with nested_absmax and nested_quant_map when double quantized)")
    return sd.pop(name)


def _bnb_state(raw, name: str, kind: str, nested: bool, path) -> dict:
    """The quant_state JSON of tensor name (QuantState.as_dict(packed=True): utf-8 bytes as uint8), checked."""
    def bad(why):
        raise UserError(f"{path}: tensor {name} is not bitsandbytes' quant_state JSON ({why})")
    if raw.dtype != torch.uint8 or raw.dim() != 1:
        bad(f"{str(raw.dtype).removeprefix('torch.')} {tuple(raw.shape)}, not 1-D uint8 bytes")
    try:
        d = json.loads(bytes(raw.tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        bad(f"unreadable: {e}")
    if not isinstance(d, dict):
        bad(f"{d!r}: not an object")
    if d.get("quant_type") != kind:
        bad(f"quant_type {d.get('quant_type')!r}, where its name says {kind!r}")
    shape, dtype = d.get("shape"), str(d.get("dtype")).removeprefix("torch.")
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(v) is int and v > 0 for v in shape)):
        bad(f"shape {shape!r}: a linear's [out, in]")
    if dtype not in _BNB_DTYPES:
        bad(f"dtype {d.get('dtype')!r}: {', '.join(_BNB_DTYPES)}")
    fields = ("blocksize", "nested_blocksize") if nested else ("blocksize",)
    for f in fields:
        if type(d.get(f)) is not int or d[f] < 1:
            bad(f"{f} {d.get(f)!r}: a positive integer")
    if nested and (type(d.get("nested_offset")) not in (int, float) or not math.isfinite(d["nested_offset"])):
        bad(f"nested_offset {d.get('nested_offset')!r}: a number (the mean absmax, double quant)")
    if not nested and "nested_blocksize" in d:
        bad("nested_blocksize, but no nested_absmax beside it")
    return d


def _bnb_4bit_weight(sd: dict, b: str, path):
    """The float32 matrix [N, K] one bitsandbytes 4-bit linear stands for, its tensors taken out of sd."""
    key = next(k for k in sd if k.startswith(b + _BNB_STATE))
    kind = key.removeprefix(b + _BNB_STATE)
    if kind not in ("nf4", "fp4"):
        raise UserError(f"{path}: tensor {key}: bitsandbytes' {kind!r} is not read here (nf4 and fp4 only)")
    nested = b + ".weight.nested_absmax" in sd
    d = _bnb_state(sd.pop(key), key, kind, nested, path)
    N, K = d["shape"]
    n = N * K
    blocks = -(-n // d["blocksize"])
    w, absmax, code = sd.pop(b + ".weight"), _bnb_part(sd, b + ".weight.absmax", path), \
        _bnb_part(sd, b + ".weight.quant_map", path)

    def check(name, t, dtypes, shape, what):
        if t.dtype not in dtypes or tuple(t.shape) != shape:
            raise UserError(f"{path}: tensor {b}{name} is {str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}, "
                            f"where {kind} of a {N}x{K} weight in blocks of {d['blocksize']} has {what} "
                            f"{' or '.join(str(x).removeprefix('torch.') for x in dtypes)} {shape}")
    floats = (torch.float32, torch.float16, torch.bfloat16)
    check(".weight", w, (torch.uint8,), (-(-n // 2), 1), "its codes, two a byte:")
    check(".weight.quant_map", code, floats, (16,), "its 16 levels:")
    table = torch.tensor(BNB_NF4 if kind == "nf4" else BNB_FP4)
    if not torch.allclose(code.float(), table, rtol=0, atol=1e-6):
        # (bitsandbytes' GPU kernels use their own NF4 / FP4 tables, whatever quant_map says: another code would
        # load as another model than the one it runs)
        raise UserError(f"{path}: tensor {b}.weight.quant_map is not bitsandbytes' {kind} code table")
    if nested:
        check(".weight.absmax", absmax, (torch.uint8,), (blocks,), "its blocks' double-quantized absmax:")
        nested_absmax = _bnb_part(sd, b + ".weight.nested_absmax", path)
        nested_code = _bnb_part(sd, b + ".weight.nested_quant_map", path)
        check(".weight.nested_absmax", nested_absmax, (torch.float32,), (-(-blocks // d["nested_blocksize"]),),
              f"in nested blocks of {d['nested_blocksize']} the absmax:")
        check(".weight.nested_quant_map", nested_code, (torch.float32,), (256,), "its absmax's 256 levels:")
        # (dequantize_blockwise in fp32, then the offset added: bitsandbytes' dequantize_4bit)
        scale = nested_absmax.repeat_interleave(d["nested_blocksize"])[:blocks]
        absmax = nested_code[absmax.long()] * scale + torch.tensor(d["nested_offset"], dtype=torch.float32)
    else:
        if b + ".weight.nested_quant_map" in sd:
            raise UserError(f"{path}: tensor {b}.weight.nested_quant_map without {b}.weight.nested_absmax")
        check(".weight.absmax", absmax, (torch.float32,), (blocks,), "its blocks' absmax:")
    if not bool(torch.isfinite(absmax).all()):
        raise UserError(f"{path}: tensor {b}.weight.absmax holds NaN or inf (a damaged file)")
    w = w.reshape(-1)
    codes = torch.stack([w >> 4, w & 15], dim=1).reshape(-1)[:n].long()  # (the high nibble first)
    W = code.float()[codes] * absmax.float().repeat_interleave(d["blocksize"])[:n]
    return W.to(_BNB_DTYPES[d["dtype"].removeprefix("torch.")]).float().reshape(N, K)


def bnb_dequantized(sd: dict, spec: dict, path, blocks: str = "layers.", prefix: str | tuple = "model.") -> dict:
    """sd with each bitsandbytes 4-bit linear of the blocks replaced by the float32 matrix it stands for (its
    quant_state's dtype's values), a note on stderr that it was. Refused by name: a quantized linear outside the
    blocks or in a module the config leaves float, a part missing, of another shape or dtype, malformed quant_state
    JSON, a quant_map that is not bitsandbytes' code."""
    bases = _bnb_bases(sd, spec, path, blocks, prefix)
    for b in bases:
        sd[b + ".weight"] = _bnb_4bit_weight(sd, b, path)
    note(f"{path}: its {len(bases)} bitsandbytes 4-bit linear weights are dequantized to float at load: an ordinary "
         "float model of the same weights (NF4 and FP4 levels are not equally spaced: no int4 scale and offset holds "
         "them)")
    return sd


# -- MXFP4 (gpt-oss's experts; transformers' quant_method "mxfp4", integrations/mxfp4.py) --------------------------
# OCP Microscaling FP4: blocks of 32 values along a weight's inputs, each value an FP4 e2m1 code (1 sign, 2 exponent,
# 1 mantissa bit: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives) and the block's shared scale an e8m0 exponent byte
# (2 ** (byte - 127); 255 is e8m0's NaN). gpt-oss's published checkpoints store each layer's experts so, beside
# their float biases: mlp.experts.gate_up_proj_blocks uint8 [E, 2I, H / 32, 16] (two codes a byte, the low nibble
# first: value 2j of a block in byte j's bits 0-3, value 2j + 1 in bits 4-7) and gate_up_proj_scales uint8
# [E, 2I, H / 32]; down_proj_blocks [E, H, I / 32, 16] and down_proj_scales [E, H, I / 32]: rows the outputs, blocks
# the inputs (a Linear's [out, in]). transformers' convert_moe_packed_tensors (Mxfp4Config(dequantize=True))
# decodes them and transposes to GptOssExperts' layout, [E, in, out]: gate_up_proj [E, H, 2I], down_proj [E, I, H].
# Only the experts are MXFP4 (the config's modules_to_not_convert names attention, router, embeddings and head).
_MXFP4_PARTS = ("_blocks", "_scales")
_MXFP4_PROJS = ("gate_up_proj", "down_proj")


def mxfp4_dequantize(blocks, scales, dtype=torch.float32, what: str = "MXFP4 blocks"):
    """The float tensor of MXFP4 blocks (uint8 [E, R, G, 16], 32 FP4 codes a block two a byte, the low nibble first)
    and scales (uint8 [E, R, G], e8m0 exponents), in transformers' convert_moe_packed_tensors' layout [E, G * 32, R]
    (each expert's matrix transposed: the blocks' inputs first, as GptOssExperts holds gate_up_proj [E, H, 2I] and
    down_proj [E, I, H]), bit for bit its values. dtype float32, bfloat16 or float64: each holds every MXFP4 value
    below 2 ** 128 exactly (the least, 0.5 * 2 ** -127, a subnormal of float32 and bfloat16 alike), so the one
    rounding is none. Refused by name (what: the tensors' name, for the message): other dtypes or shapes, a scale of
    255 (e8m0's NaN) and a value beyond float range (2 ** 128 or more: a damaged file)."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float64):
        raise ValueError(f"mxfp4_dequantize: dtype {dtype}: float32, bfloat16 or float64 (which hold MXFP4's values "
                         "exactly)")
    check_mxfp4_pair(blocks, scales, what)
    # (in float32 exactly, e2m1 times a power of two from 2 ** -127, as transformers' ldexp computes it)
    out = dequantize_mxfp4(blocks, scales)
    check_mxfp4_finite(out, what)
    return out.to(dtype).transpose(1, 2).contiguous()


def check_mxfp4_pair(blocks, scales, what: str) -> None:
    """blocks uint8 [E, R, G, 16] and scales uint8 [E, R, G] with no 255 (e8m0's NaN), else a UserError naming what
    is wrong (what: the tensors' name)."""
    if blocks.dtype != torch.uint8 or blocks.dim() != 4 or blocks.shape[-1] != 16:
        raise UserError(f"{what}: blocks are {str(blocks.dtype).removeprefix('torch.')} {tuple(blocks.shape)}, not "
                        "uint8 [experts, rows, blocks, 16] (32 FP4 codes a block, two a byte)")
    if scales.dtype != torch.uint8 or tuple(scales.shape) != tuple(blocks.shape[:-1]):
        raise UserError(f"{what}: scales are {str(scales.dtype).removeprefix('torch.')} {tuple(scales.shape)}, where "
                        f"blocks {tuple(blocks.shape)} have one uint8 e8m0 exponent a block: uint8 "
                        f"{tuple(blocks.shape[:-1])}")
    if scales.numel() and int(scales.max()) == 255:
        # (transformers' ldexp reads it as 2 ** 128: every code of 1 or more inf, where the format says NaN)
        raise UserError(f"{what}: a scale is 255, e8m0's NaN (a damaged file)")


def check_mxfp4_finite(out, what: str) -> None:
    """out (dequantize_mxfp4's float32) finite, else a UserError naming what."""
    # (from scale 253 up: 4 * 2 ** 126 is 2 ** 128, float32's inf, as transformers' ldexp gives it)
    if not bool(torch.isfinite(out).all()):
        raise UserError(f"{what}: a value is 2 ** 128 or more (a scale of 253 or 254 and a large code), beyond "
                        "float range (a damaged file)")


def mxfp4_spec(q: dict, model_type) -> dict:
    """A quantization_config of quant_method "mxfp4" (hf_quantization's) as {method, keep (a module name -> bool: left
    float by modules_to_not_convert, matched to a module boundary as transformers' should_convert_module does),
    kept_by}, for gpt-oss (model_type "gpt_oss"): the only family transformers reads MXFP4 for (its Mxfp4HfQuantizer
    replaces GptOssMLP's experts and nothing else). Any other model type is refused by name."""
    if q.get("quant_method") != "mxfp4":
        refuse_quantized(q, "MXFP4 only")
    if model_type != "gpt_oss":
        refuse_quantized(q, f"model_type {model_type!r}: MXFP4 is read for gpt-oss's experts (model_type 'gpt_oss') "
                            "only, as transformers reads it", remedy="load the float model it was quantized from")
    return dict(method="mxfp4", keep=_names_kept(q, q.get("modules_to_not_convert"), "modules_to_not_convert"),
                kept_by="modules_to_not_convert")


def mxfp4_experts(sd: dict, spec: dict, path, blocks: str = "layers.", prefix: str | tuple = "model.",
                  dtype=torch.bfloat16) -> dict:
    """sd (a gpt-oss reader's tensors, named without the file's prefix) with each expert projection's MXFP4 pair,
    NAME_blocks and NAME_scales (NAME a layer's mlp.experts.gate_up_proj or down_proj), replaced by the float tensor
    NAME in GptOssExperts' layout (mxfp4_dequantize: gate_up_proj [E, H, 2I], down_proj [E, I, H]), of dtype
    (bfloat16, gpt-oss's own: exact, as is float32); a note on stderr that they were. Refused by name: no pair at
    all, half a pair, a pair beside a float tensor of its name, one outside the blocks' experts or in a module the
    config leaves float (spec's keep), and what mxfp4_dequantize refuses. The shapes' agreement with the config is
    the reader's to check."""
    bases = mxfp4_bases(sd, spec, path, blocks, prefix)
    for b in bases:
        sd[b] = mxfp4_dequantize(sd.pop(b + "_blocks"), sd.pop(b + "_scales"), dtype, what=f"{path}: {b}")
    note(f"{path}: its {len(bases)} MXFP4 expert weights are dequantized to {str(dtype).removeprefix('torch.')} at "
         "load: an ordinary float model of the same weights (the folder read for training, export or merge; "
         "the commands that run a model keep them MXFP4)")
    return sd


def mxfp4_bases(sd: dict, spec: dict, path, blocks: str = "layers.", prefix: str | tuple = "model.") -> list:
    """The names NAME of sd's MXFP4 pairs (NAME_blocks, NAME_scales), checked as mxfp4_experts says."""
    bases = sorted({k.removesuffix(p) for k in sd for p in _MXFP4_PARTS if k.endswith(p)})
    if not bases:
        raise UserError(f"{path}: config.json says MXFP4 quantization, but no tensor is MXFP4 (an experts' "
                        "gate_up_proj_blocks / _scales)")
    for b in bases:
        module, _, proj = b.rpartition(".")
        if not (b.startswith(blocks) and module.endswith(".mlp.experts") and proj in _MXFP4_PROJS):
            raise UserError(f"{path}: tensors {b}_blocks / _scales are MXFP4, where gpt-oss stores only its experts' "
                            "gate_up_proj and down_proj so: which tensor they are is unclear")
        for p in _MXFP4_PARTS:
            if b + p not in sd:
                other = next(o for o in _MXFP4_PARTS if o != p)
                raise UserError(f"{path}: MXFP4 tensor {b}{other} has no {b}{p} beside it (blocks and scales go "
                                "together)")
        if b in sd:
            raise UserError(f"{path}: {b} is stored both as a float tensor and as MXFP4 ({b}_blocks): which it is is "
                            "unclear")
        if _left_float(spec, module, prefix):
            raise UserError(f"{path}: {b} is MXFP4, but the quantization_config leaves {module} float "
                            f"({spec['kept_by']}): which it is is unclear")
    return bases
