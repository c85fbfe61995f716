"""Hugging Face folders quantized elsewhere (config.json's quantization_config: GPTQ, AWQ, bitsandbytes, FP8,
compressed-tensors ...; or AutoGPTQ's quantize_config.json): refused by name at the config read, by every reader
and command, never a missing-tensor error or a model of whatever float tensors are there; 4-bit GPTQ and AWQ read as
int4 (below), FP8 dequantized (test_hf_fp8.py), bitsandbytes 8-bit as int8 and 4-bit dequantized (test_hf_bnb.py),
by the readers that take them. Tiny models exported here: nothing downloaded."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from tritongpt import cli
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.gpt2_weights import export_gpt2, load_checkpoint
from tritongpt.train.llama_weights import export_llama

pytestmark = pytest.mark.usefixtures("one_thread")

V, T = 64, 32
LLAMA = dict(norm="rmsnorm", mlp="swiglu", position_encoding="rope", bias=False, n_kv_head=2, tie_weights=False,
             mlp_hidden=128)


def tiny(family="llama", seed=0):
    torch.manual_seed(seed)
    return GPTModel(GPTConfig(vocab_size=V, context_length=T, n_layer=1, n_head=4, n_embd=64,
                              **(LLAMA if family == "llama" else {}))).eval()


def exported(tmp_path, family="llama", seed=0):
    out = tmp_path / family
    (export_llama if family == "llama" else export_gpt2)(tiny(family, seed), out)
    return out


def with_quantization(folder, q):
    d = json.loads((folder / "config.json").read_text())
    d["quantization_config"] = q
    (folder / "config.json").write_text(json.dumps(d))
    return folder


# what transformers' quantizers write into config.json (trimmed to the fields read)
CONFIGS = {
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"},
    "bitsandbytes-4bit": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "bitsandbytes-8bit-no-method": {"load_in_8bit": True},  # (older saves: transformers reads it as bitsandbytes')
    "fp8": {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
    "compressed-tensors": {"quant_method": "compressed-tensors", "format": "pack-quantized"},
    "hqq": {"quant_method": "hqq", "nbits": 4},
}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("name", CONFIGS)
def test_a_quantized_folder_is_refused_by_name_at_the_config_read(tmp_path, family, name):
    """The float tensors left in place: without the refusal the folder would load as a float model without a word
    (a real quantized folder's integer codes, or its missing .weight, fail later and say less)."""
    folder = with_quantization(exported(tmp_path, family), CONFIGS[name])
    method = CONFIGS[name].get("quant_method", "bitsandbytes")
    said = (rf"config\.json's quantization_config: quant_method '{method}'.* is not read here.*: .*load the float "
            "model it was quantized from")
    if family == "llama" and method in ("gptq", "awq"):  # 4-bit, read as int4 (below): its float tensors named
        said = rf"config\.json says {method.upper()} quantization, but no tensor is a quantized linear's"
    if family == "llama" and method == "fp8":  # read dequantized (test_hf_fp8.py): its float tensors named
        said = r"config\.json says fp8 \(FP8\) quantization, but no tensor is float8"
    if family == "llama" and method == "bitsandbytes":  # read (test_hf_bnb.py): its float tensors named
        said = r"config\.json says bitsandbytes [48]-bit quantization, but no tensor is a quantized linear's"
    with pytest.raises(UserError, match=said):
        load_checkpoint(folder, quantized_ok=True)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gptq_tensors_are_refused_by_name_not_as_a_missing_tensor(tmp_path, family):
    """Linears as GPTQ stores them (qweight, qzeros, scales, g_idx; no .weight), through generate: a GPT-2's (whose
    reader takes no GPTQ), and a Llama's at 5 bits (its reader takes 2, 3, 4 and 8: GPTQModel's planar 5 bits are
    another layout)."""
    q = {**CONFIGS["gptq"], "bits": 5 if family == "llama" else 4}
    folder = with_quantization(exported(tmp_path, family), q)
    sd = load_file(folder / "model.safetensors")
    for k in [k for k in sd if k.endswith(("_proj.weight", "c_attn.weight", "c_fc.weight"))]:
        N, K = sd.pop(k).shape
        N, K = (K, N) if family == "gpt2" else (N, K)  # (GPT-2's Conv1D: [in, out])
        base = k.removesuffix(".weight")
        sd.update({base + ".qweight": torch.randint(0, 2 ** 31 - 1, (K // 8, N), dtype=torch.int32),
                   base + ".qzeros": torch.randint(0, 2 ** 31 - 1, (K // 32, N // 8), dtype=torch.int32),
                   base + ".scales": torch.rand(K // 32, N).half(), base + ".g_idx": torch.arange(K) // 32})
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=rf"quant_method 'gptq' \(bits {q['bits']}, group_size 32, desc_act False, "
                                        r"sym True\) is not read here.*: its linear layers are stored as GPTQ's "
                                        "int32-packed"):
        load_checkpoint(folder, quantized_ok=True)
    assert cli.main(["generate", "--weights", str(folder), "--prompt", "hi", "--device", "cpu"]) == 2


def test_autogptqs_own_quantize_config_json_is_refused_by_name(tmp_path):
    folder = exported(tmp_path, "gpt2")  # (a Llama's is read: the 4-bit GPTQ below)
    (folder / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 128, "desc_act": True}))
    with pytest.raises(UserError, match=r"quantize_config\.json: quant_method 'gptq' \(bits 4, group_size 128, "
                                        r"desc_act True\) is not read here"):
        load_checkpoint(folder)


@pytest.mark.parametrize("q", [[1], "gptq"])
def test_a_quantization_config_that_is_no_object_is_refused(tmp_path, q):
    with pytest.raises(UserError, match="has quantization_config .*; it must be an object"):
        load_checkpoint(with_quantization(exported(tmp_path), q))


def test_a_null_quantization_config_is_a_float_model(tmp_path):
    folder = exported(tmp_path)
    want = load_checkpoint(folder)
    got = load_checkpoint(with_quantization(folder, None))
    assert torch.equal(got.trf_blocks[0].att.W_query.weight, want.trf_blocks[0].att.W_query.weight)


# -- 4-bit GPTQ and AWQ read as int4 (train/hf_quant.py) ----------------------------------------------------------
# The reference packers below are written from the quantizers' own code, not from our unpacker:
# - GPTQ: AutoGPTQ's auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py QuantLinear.pack (and GPTQ's quant.py
#   find_params): q = clamp(round(W / s) + z, 0, 15); qweight [K / 8, N], row r's bits 4j..4j+3 input 8r + j;
#   qzeros [G, N / 8], column c's bits 4j.. output 8c + j, of z (GPTQModel's gptq_v2) or z - 1 (v1: GPTQModel's
#   convert_gptq_v2_to_v1_format subtracts 0x11111111 from each word, so a zero of 0 borrows from the next nibble);
#   sym: z = (maxq + 1) / 2 = 8, s = 2 max|W| / 15.
# - AWQ GEMM: AutoAWQ's awq/modules/linear/gemm.py WQLinear_GEMM.from_linear: intweight [K, N], qweight[:, c] |=
#   intweight[:, 8c + order_map[i]] << 4i with order_map [0, 2, 4, 6, 1, 3, 5, 7]; qzeros the same of z [G, N];
#   W = (q - z) s (awq/utils/packing_utils.py dequantize_gemm).

def as_int32(words):
    """uint32 values (int64) as the int32 words the files hold (two's complement)."""
    return ((words + 2 ** 31) % 2 ** 32 - 2 ** 31).to(torch.int32)


def reference_quantize(w, group, sym):
    """(q [N, K], z [N, G], s [N, G]) by GPTQ's find_params / round-to-nearest (what AWQ's pseudo-quantizer does
    too), and the matrix (q - z) s they stand for."""
    N, K = w.shape
    width = K if group == -1 else group
    # ceil(K / width) groups, the last one short where K is not a multiple (GPTQ's g_idx k // group_size)
    g_idx = torch.arange(K) // width
    w = w.double()
    if sym:
        s = 2 * torch.stack([c.abs().amax(dim=1) for c in w.split(width, dim=1)], dim=1) / 15
        z = torch.full_like(s, 8)
    else:
        lo = torch.stack([c.amin(dim=1) for c in w.split(width, dim=1)], dim=1).clamp(max=0)
        hi = torch.stack([c.amax(dim=1) for c in w.split(width, dim=1)], dim=1).clamp(min=0)
        s = (hi - lo) / 15
        z = torch.round(-lo / s)
    s = s.half().double()  # scales are stored fp16
    q = (torch.round(w / s[:, g_idx]) + z[:, g_idx]).clamp(0, 15)
    return q.long(), z.long(), s, (q - z[:, g_idx]) * s[:, g_idx]


def pack_gptq(q, z, s, v1=True, width=None):
    """width: the group size (default K / G: whole groups)."""
    intweight, zeros = q.T, z.T  # [K, N], [G, N]
    K, N = intweight.shape
    qweight = torch.zeros(K // 8, N, dtype=torch.int64)
    for j in range(8):
        qweight |= intweight[j::8] << (4 * j)
    qzeros = torch.zeros(zeros.shape[0], N // 8, dtype=torch.int64)
    for j in range(8):
        qzeros |= zeros[:, j::8] << (4 * j)
    if v1:  # GPTQModel's v2 -> v1: z - 1 as whole words (a zero of 0 borrows from the next nibble)
        qzeros -= 0x11111111
    G = s.shape[1]
    return {".qweight": as_int32(qweight), ".qzeros": as_int32(qzeros), ".scales": s.T.half().contiguous(),
            ".g_idx": (torch.arange(K) // (width or K // G)).to(torch.int32)}


def act_order_quantize(w, group, gen):
    """GPTQ's act-order (desc_act) of w [N, K]: the inputs quantized in a random order perm (GPTQ's: by decreasing
    H_kk), the i-th of them in group i // group, so that g_idx[perm[i]] = i // group (AutoGPTQ's g_idx) scatters each
    group over the inputs. -> (q [N, K], z, s [N, G]) as pack_gptq takes them, q in the inputs' own order; the
    matrix they stand for, dequantized straight from g_idx: w[n, k] = (q[n, k] - z[n, g_idx[k]]) s[n, g_idx[k]]
    (nothing sorted); g_idx int32 [K]."""
    N, K = w.shape
    perm = torch.randperm(K, generator=gen)
    g_idx = torch.empty(K, dtype=torch.long)
    g_idx[perm] = torch.arange(K) // group
    lv_sorted, z, s, _ = reference_quantize(w[:, perm], group, False)  # (group i is perm[i * group: (i + 1) * group])
    q = torch.empty_like(lv_sorted)
    q[:, perm] = lv_sorted
    assert not torch.equal(g_idx, torch.arange(K) // group)  # (a real act-order: its groups not consecutive)
    return q, z, s, ((q - z[:, g_idx]) * s[:, g_idx]), g_idx.to(torch.int32)


def pack_awq(q, z, s):
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    intweight, zeros = q.T, z.T

    def pack(t):
        out = torch.zeros(t.shape[0], t.shape[1] // 8, dtype=torch.int64)
        for col in range(t.shape[1] // 8):
            for i in range(8):
                out[:, col] |= t[:, col * 8 + order[i]] << (i * 4)
        return as_int32(out)

    return {".qweight": pack(intweight), ".qzeros": pack(zeros), ".scales": s.T.half().contiguous()}


KINDS = {  # name: (family config, quantization_config)
    "gptq-v1-sym": ({}, {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True}),
    "gptq-v1-asym-qwen2": ({"qkv_bias_only": True}, {"quant_method": "gptq", "bits": 4, "group_size": 32,
                                                     "desc_act": False, "sym": False, "checkpoint_format": "gptq"}),
    "gptq-v2-one-group-mistral": ({"attention_window": 5}, {"quant_method": "gptq", "bits": 4, "group_size": -1,
                                                             "sym": False, "checkpoint_format": "gptq_v2"}),
    "gptq-desc-act-sorted": ({}, {"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": True,
                                  "sym": False}),
    "awq-gemm": ({}, {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "GEMM"}),
    # desc_act with a real act-order g_idx (quantized_folder: each linear's groups a random scatter of its inputs):
    # read with its inputs sorted by group and a gather of x's columns (Int4Linear.in_perm); an MLP of 96 (three
    # groups: not a power of two), and NeoX's fused query_key_value split along the outputs, one order for all
    "gptq-v1-act-order": ({"mlp_hidden": 96}, {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True,
                                               "sym": False}),
    "gptq-v2-act-order-gpt_neox": ({"family": "neox"}, {"quant_method": "gptq", "bits": 4, "group_size": 32,
                                                        "desc_act": True, "sym": False,
                                                        "checkpoint_format": "gptq_v2"}),
    # the same reader's Qwen3 (q/k norms, float beside the 4-bit layers) and SmolLM3 (a layer without RoPE)
    "gptq-v2-qwen3": ({"qk_norm": True}, {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False,
                                          "checkpoint_format": "gptq_v2"}),
    "awq-gemm-smollm3": ({"nope_layers": "0"}, {"quant_method": "awq", "bits": 4, "group_size": 32,
                                                "zero_point": True, "version": "gemm"}),
    # Gemma's reader (gemma_weights.py): the same seven projections, its norms read as 1 + w
    "gptq-v1-gemma": ({"family": "gemma"}, {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True}),
    "awq-gemm-gemma2": ({"family": "gemma", "post_norms": True, "attention_window": 5, "window_layers": "0",
                         "attn_softcap": 50.0, "logit_softcap": 30.0},
                        {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}),
    "gptq-v2-gemma3_text": ({"family": "gemma", "post_norms": True, "qk_norm": True, "attention_window": 5,
                             "window_layers": "0", "rope_theta": 1e6, "rope_local_theta": 1e4},
                            {"quant_method": "gptq", "bits": 4, "group_size": 64, "sym": False,
                             "checkpoint_format": "gptq_v2"}),
    # Phi-3's (phi3_weights.py): qkv_proj and gate_up_proj quantized fused, as GPTQ and AWQ see them; asymmetric,
    # so that each output's own zero and scale must follow it into q, k or v (gate or up)
    "gptq-v1-phi3": ({"family": "phi3"}, {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False}),
    "awq-gemm-phi3": ({"family": "phi3"}, {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True,
                                           "version": "gemm"}),
    # GPT-NeoX's (neox_weights.py): query_key_value quantized fused, its rows per head, and float biases beside
    "gptq-v2-gpt_neox": ({"family": "neox"}, {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False,
                                              "checkpoint_format": "gptq_v2"}),
    "awq-gemm-gpt_neox": ({"family": "neox"}, {"quant_method": "awq", "bits": 4, "group_size": 32,
                                               "zero_point": True, "version": "gemm"}),
    # Falcon's (falcon_weights.py): query_key_value quantized fused, Falcon-7B's multi-query layout and the new
    # architecture's grouped one
    "gptq-v1-falcon": ({"family": "falcon", "shared_norm": True, "n_kv_head": 1, "bias": False},
                       {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False}),
    "awq-gemm-falcon": ({"family": "falcon", "n_kv_head": 2, "bias": False},
                        {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}),
    # hidden 80 (5 heads of 16) at group_size 32 (Falcon-7B's 4544 at 128): the attention's and dense_h_to_4h's 80 inputs three GPTQ
    # groups, the last of 16, read as ours of 16 (dense_4h_to_h's 320 whole groups); act-order's last group short too.
    # (AutoAWQ's GEMM asserts K a multiple of group_size: no such AWQ folder)
    "gptq-v1-ragged-falcon": ({"family": "falcon", "n_embd": 80, "n_head": 5, "n_kv_head": 1, "bias": False},
                              {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False}),
    "gptq-v2-ragged-falcon": ({"family": "falcon", "n_embd": 80, "n_head": 5, "n_kv_head": 1, "bias": False},
                              {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True,
                               "checkpoint_format": "gptq_v2"}),
    "gptq-v1-act-order-ragged-falcon": ({"family": "falcon", "n_embd": 80, "n_head": 5, "n_kv_head": 1, "bias": False},
                                        {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True,
                                         "sym": False}),
}
# 4-bit folders that load otherwise (quantized_folder takes these too): K = 72 at group_size 16 ends in a group of 8,
# below GROUP_SIZES' 16, so no int4 group size divides it: read dequantized (4 heads of 18 and 4 kv heads: every
# output count a multiple of 8, as GPTQ packs its zeros); and an AWQ layer of a short group (AutoAWQ writes none)
OTHER_KINDS = {
    "gptq-v1-ragged-dequantized": ({"n_embd": 72, "n_kv_head": 4}, {"quant_method": "gptq", "bits": 4,
                                                                     "group_size": 16, "sym": False}),
    "gptq-v2-act-order-ragged-dequantized": ({"n_embd": 72, "n_kv_head": 4},
                                             {"quant_method": "gptq", "bits": 4, "group_size": 16, "desc_act": True,
                                              "sym": False, "checkpoint_format": "gptq_v2"}),
    # the other readers (each its own path to the float model)
    "gptq-v1-ragged-dequantized-gemma": ({"family": "gemma", "n_embd": 72, "n_kv_head": 4},
                                         {"quant_method": "gptq", "bits": 4, "group_size": 16, "sym": False}),
    "gptq-v1-ragged-dequantized-phi3": ({"family": "phi3", "n_embd": 72, "n_kv_head": 4},
                                        {"quant_method": "gptq", "bits": 4, "group_size": 16, "sym": False}),
    "gptq-v1-ragged-dequantized-gpt_neox": ({"family": "neox", "n_embd": 72},
                                            {"quant_method": "gptq", "bits": 4, "group_size": 16, "sym": False}),
    "gptq-v2-ragged-dequantized-falcon": ({"family": "falcon", "n_embd": 72, "n_kv_head": 2, "bias": False},
                                          {"quant_method": "gptq", "bits": 4, "group_size": 16, "sym": True,
                                           "checkpoint_format": "gptq_v2"}),
    "awq-gemm-ragged-falcon": ({"family": "falcon", "n_embd": 80, "n_head": 5, "n_kv_head": 1, "bias": False},
                               {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                                "version": "gemm"}),
}
GEMMA = dict(LLAMA, mlp="geglu", scale_embeddings=True, tie_weights=True)
NEOX = dict(position_encoding="rope", rotary_dim=4, parallel_residual=True, gelu_approximate="none", tie_weights=False)
FALCON = dict(NEOX, rotary_dim=0)  # (Falcon rotates whole heads)
# the file's names of the linears GPTQ and AWQ quantize (the LM head left float)
LINEARS = ("_proj.weight", "query_key_value.weight", "attention.dense.weight", "dense_h_to_4h.weight",
           "dense_4h_to_h.weight")
PHI3 = dict(LLAMA, rotary_dim=12)  # (a partial rotary: written as Phi-3, not as the Llama it would equal)


def exported_model(folder, extra: dict, seed=0, vocab=V):
    """A tiny random model of extra's family ("family": llama by default; the rest GPTConfig fields over the family's
    own), its norms and biases off their ones and zeros, exported to folder as that family's Hugging Face folder:
    (model, folder). The float folder the quantized-folder tests (here, test_hf_fp8, test_hf_bnb) quantize."""
    from tritongpt.train.falcon_weights import export_falcon
    from tritongpt.train.gemma_weights import export_gemma
    from tritongpt.train.neox_weights import export_neox
    from tritongpt.train.phi3_weights import export_phi3

    base, export = {"llama": (LLAMA, export_llama), "gemma": (GEMMA, export_gemma), "phi3": (PHI3, export_phi3),
                    "neox": (NEOX, export_neox), "falcon": (FALCON, export_falcon)}[extra.get("family", "llama")]
    torch.manual_seed(seed)
    model = GPTModel(GPTConfig(vocab_size=vocab, context_length=T, n_layer=1,
                               **{"n_head": 4, "n_embd": 64, **base,
                                  **{k: v for k, v in extra.items() if k != "family"}})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    export(model, folder)
    return model, folder


def quantized_folder(tmp_path, kind, seed=0, vocab=V):
    """A tiny Llama-shaped folder of `kind`, quantized and packed by the reference rules above, and the float model
    of the matrices it stands for (the dequantized weights, everything else as exported). vocab: a tokenizer's, for
    a run on it (test_qlora_gptq.py)."""
    extra, q = {**KINDS, **OTHER_KINDS}[kind]
    model, folder = exported_model(tmp_path / (kind if seed == 0 else f"{kind}-{seed}"), extra, seed, vocab)
    sd = load_file(folder / "model.safetensors")
    dequantized = {}
    gen = torch.Generator().manual_seed(seed)
    for k in [k for k in sd if k.endswith(LINEARS)]:
        base = k.removesuffix(".weight")
        if "act-order" in kind:
            lv, zero, scale, w, g_idx = act_order_quantize(sd.pop(k), q["group_size"], gen)
        else:
            lv, zero, scale, w = reference_quantize(sd.pop(k), q["group_size"], q.get("sym", False))
        packed = pack_awq(lv, zero, scale) if q["quant_method"] == "awq" else \
            pack_gptq(lv, zero, scale, v1=q.get("checkpoint_format", "gptq") == "gptq", width=q["group_size"] if
                      q["group_size"] != -1 else None)
        if "act-order" in kind:
            packed[".g_idx"] = g_idx
        sd.update({base + part: t for part, t in packed.items()})
        dequantized[k] = w.float()
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    with_quantization(folder, q)
    float_model = load_checkpoint(exported_with(tmp_path / f"{folder.name}-float", folder, dequantized))
    return folder, float_model


def float_twin(out, folder, tensors: dict):
    """out: a float folder beside the quantized `folder`, its config.json without the quantization_config and
    `tensors` (the dequantized matrices and everything else) as its model.safetensors (the GPTQ/AWQ, FP8 and
    bitsandbytes tests' reference model)."""
    out.mkdir()
    d = json.loads((folder / "config.json").read_text())
    del d["quantization_config"]
    (out / "config.json").write_text(json.dumps(d))
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def exported_with(out, folder, weights):
    """folder's float twin: the dequantized matrices in place of its packed ones."""
    sd = {k: v for k, v in load_file(folder / "model.safetensors").items()
          if not k.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))}
    return float_twin(out, folder, {**sd, **weights})


# the largest logit error against the fp32 float model, over its largest logit: fp32 differs by summation order
# alone; a 16-bit run rounds the activations, the weights and the logits (measured on the CPU: ~1.3 bf16 eps and
# ~1 fp16 eps), so 4 of its eps (3e-2, 4e-3). An unpacking slip is O(1) off.
LOGIT_TOL = {torch.float32: 1e-5, torch.bfloat16: 4 * 2.0**-7, torch.float16: 4 * 2.0**-10}
# every kind on the CPU in fp32; a GPTQ and an AWQ folder on the GPU in each dtype (and one in bf16 on the CPU: the
# 16-bit bound's logic run here too)
ON_DEVICES = [pytest.param(kind, "cpu", torch.float32, id=kind) for kind in KINDS] + \
    [pytest.param("gptq-v1-sym", "cpu", torch.bfloat16, id="gptq-v1-sym-cpu-bf16")] + \
    [pytest.param(kind, "cuda", dtype, id=f"{kind}-cuda-{name}", marks=pytest.mark.cuda)
     for kind in ("gptq-v1-sym", "gptq-v1-act-order", "awq-gemm")
     for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16"))]


@pytest.mark.parametrize("kind,dev,dtype", ON_DEVICES)
def test_a_4bit_gptq_or_awq_folder_loads_as_int4_with_the_dequantized_models_logits(tmp_path, kind, dev, dtype):
    """A folder written by the quantizers' own packing rules loads as Int4Linear and gives, on both paths (the
    reference's dequantized F.linear and the Triton int4 kernel), the logits of the float model built from the
    weights dequantized here, independently of our unpacker. On CUDA it settles the compiled int4 kernel (its GPU
    tiles) and the moved model on a real folder's layers, in fp32 to 1e-5 and in bf16 / fp16 within LOGIT_TOL."""
    folder, want = quantized_folder(tmp_path, kind)
    model = load_checkpoint(folder, quantized_ok=True)
    assert model.quantized == "int4" and not model.quantized_head
    linears = {type(m).__name__ for m in model.trf_blocks.modules() if "Linear" in type(m).__name__}
    assert linears == {"Int4Linear"}  # (every linear of the blocks 4-bit: none left float)
    family = json.loads((folder / "config.json").read_text())["model_type"]
    assert kind.endswith(family) or family == "llama", family  # (the family the kind names is the one read)
    assert model.config == GPTConfig(**{**want.config.to_dict(), "kernels": model.config.kernels})
    # ours: the file's group size (one group a row: 64, the largest dividing every K), 16 where K = 80 ends in a short
    # group of 16
    group = KINDS[kind][1]["group_size"]
    assert model.quantized_group_size == (16 if "ragged" in kind else 64 if group == -1 else group)
    ordered = {getattr(m, "in_perm", None) is not None for m in model.trf_blocks.modules()} - {False}
    assert ordered == ({True} if "act-order" in kind else set())  # (a sorted g_idx needs no gather)
    idx = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(1)).to(dev)
    want, model = want.to(dev), model.to(dev, dtype)  # (the float model stays fp32: the bound's reference)
    with torch.no_grad():
        expected = want(idx)
        for kernels in ("reference", "triton"):
            model.set_kernels(kernels)
            got = model(idx)
            assert got.dtype == dtype and got.device == expected.device, (kernels, got.dtype, got.device)
            err = (got.float() - expected).abs().max().item()
            assert err < LOGIT_TOL[dtype] * expected.abs().max().item(), (kernels, err)


@pytest.mark.parametrize("kind, n, inputs", [("gptq-v1-ragged-dequantized", 7, [72, 128]),
                                             ("gptq-v2-act-order-ragged-dequantized", 7, [72, 128]),
                                             ("gptq-v1-ragged-dequantized-gemma", 7, [72, 128]),
                                             ("gptq-v1-ragged-dequantized-phi3", 4, [72, 128]),
                                             ("gptq-v1-ragged-dequantized-gpt_neox", 4, [72, 288]),
                                             ("gptq-v2-ragged-dequantized-falcon", 4, [72, 288])])
def test_a_4bit_folder_whose_groups_no_int4_group_size_divides_loads_dequantized(tmp_path, capsys, kind, n, inputs):
    """K = 72 at group_size 16: GPTQ's five groups, the last of 8, that no int4 group size (16 and up) divides:
    read as the float model of its dequantized weights, with a note saying why, where it was refused."""
    folder, want = quantized_folder(tmp_path, kind)
    model = load_checkpoint(folder)  # (an ordinary float model: no quantized_ok needed)
    assert not getattr(model, "quantized", None)
    assert {type(m).__name__ for m in model.trf_blocks.modules() if "Linear" in type(m).__name__} == {"Linear"}
    assert (f"its {n} 4-bit GPTQ linear weights are dequantized to float at load: an ordinary float model of the "
            "same weights, no int4 group size here (16, 32, 64, 128, 256, 512, 1024) divides both its group_size 16 "
            f"and its layers' inputs {inputs}") in capsys.readouterr().err
    same_logits(model, want)


def test_an_awq_layer_of_a_short_last_group_is_refused_by_name(tmp_path):
    """AutoAWQ's WQLinear_GEMM asserts K a multiple of group_size: a file whose 80 inputs have three groups of 32 is
    none it wrote, named, not read as GPTQ's short last group."""
    folder, _ = quantized_folder(tmp_path, "awq-gemm-ragged-falcon")
    with pytest.raises(UserError, match=r"h\.0\.\w+\.\w+ has 3 groups of its 80 inputs, not groups of group_size 32 "
                                        r"\(AutoAWQ's GEMM layers hold whole groups only"):
        load_checkpoint(folder, quantized_ok=True)


def test_an_int4_folder_saves_and_loads_as_our_int4_file(tmp_path):
    folder, _ = quantized_folder(tmp_path, "awq-gemm")
    model = load_checkpoint(folder, quantized_ok=True)
    model.save(tmp_path / "int4.safetensors")
    back = GPTModel.load(tmp_path / "int4.safetensors", quantized_ok=True).eval()
    idx = torch.arange(9)[None]
    with torch.no_grad():
        assert torch.equal(back(idx), model(idx))


@pytest.mark.parametrize("kind", ["gptq-v1-sym", "gptq-v1-gemma", "gptq-v1-phi3", "gptq-v2-gpt_neox"])
def test_an_int4_folder_is_for_inference_export_merge_and_init_refuse_it(tmp_path, kind):
    folder, _ = quantized_folder(tmp_path, kind)
    with pytest.raises(UserError, match=r"is GPTQ-quantized .* read as int4 for inference: .*sft, dpo, kto, reward "
                                        r"and rlhf with --lora-rank train LoRA updates on it .*full fine-tuning, "
                                        "export and merge take the float weights it was quantized from"):
        load_checkpoint(folder)
    assert cli.main(["export", str(folder), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out" / "model.safetensors").exists()
    assert cli.main(["merge", str(folder), str(folder), "--out", str(tmp_path / "merged")]) == 2


@pytest.mark.parametrize("change, said", [
    ({"bits": 5}, r"quant_method 'gptq' \(bits 5, .*\) is not read here \(bits 5: GPTQ of 2, 3, 4 or 8 bits only"),
    ({"bits": True}, r"\(bits True: GPTQ of 2, 3, 4 or 8 bits only"),
    ({"quant_method": "awq", "bits": 8, "version": "gemm"}, r"quant_method 'awq' \(bits 8, .*\) is not read here "
                                                            r"\(bits 8: 4-bit AWQ only: AutoAWQ's GEMM packs no other"),
    ({"checkpoint_format": "marlin"}, r"checkpoint_format 'marlin': 'gptq' \(v1, zeros stored less 1\) or "),
    ({"group_size": 0}, r"group_size 0: a positive integer, or -1"),
    ({"dynamic": {".*down.*": {"bits": 8}}}, r"a dynamic per-module config"),
    ({"quant_method": "awq", "version": "gemv"}, r"quant_method 'awq' .* \(version 'gemv': AWQ's GEMM packing only"),
    ({"quant_method": "awq", "zero_point": False}, r"zero_point false"),
    ({"quant_method": "awq", "version": "gemm", "backend": "llm-awq"}, r"backend 'llm-awq': AutoAWQ's GEMM packing"),
    ({"is_marlin_format": True}, r"checkpoint_format 'marlin': 'gptq' \(v1"),
    ({"checkpoint_format": "gptq", "format": "gptq_v2"}, r"checkpoint_format 'gptq' but format 'gptq_v2': which packing is unclear"),
    ({"quant_method": "fp8"}, r"config\.json says fp8 \(FP8\) quantization, but no tensor is float8"),
    ({"quant_method": "hqq", "bits": 4}, r"quant_method 'hqq' .* is not read here \(GPTQ of 2, 3, 4 or 8 bits, "
                                         r"4-bit AWQ GEMM and bitsandbytes are, and FP8 dequantized\)"),
])
def test_what_does_not_map_to_int4_is_refused_by_name(tmp_path, change, said):
    folder, _ = quantized_folder(tmp_path, "gptq-v1-sym")
    with_quantization(folder, {**KINDS["gptq-v1-sym"][1], **change})
    with pytest.raises(UserError, match=said):
        load_checkpoint(folder, quantized_ok=True)


def edit_tensors(folder, edit):
    sd = load_file(folder / "model.safetensors")
    edit(sd)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def as_multimodal_gemma3(folder, q=None, tie=True, more=None):
    """A gemma3_text folder rewritten as Gemma3ForConditionalGeneration saves it: config.json's fields in text_config
    beside model_type gemma3, its quantization_config (q, or its own) and tie_word_embeddings (tie); its tensors under
    model.language_model.; more(sd): the test's own edits after (a vision tower, a quantized head)."""
    d = json.loads((folder / "config.json").read_text())
    own = d.pop("quantization_config")
    (folder / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": d,
                                                    "quantization_config": own if q is None else q,
                                                    "tie_word_embeddings": tie}))

    def edit(sd):
        for k in list(sd):
            sd["model.language_model." + k.removeprefix("model.")] = sd.pop(k)
        if more is not None:
            more(sd)
    return edit_tensors(folder, edit)


@pytest.mark.parametrize("edit, said", [
    # one input moved from group 0 to group 1: act-order is read as whole groups of group_size inputs
    (lambda g: g.index_put_((torch.nonzero(g == 0)[0],), torch.tensor(1, dtype=g.dtype)),
     r"down_proj\.g_idx gives its groups different sizes \(group 0 has 31 inputs, not group_size 32\)"),
    (lambda g: torch.where(g == 2, 3, g), r"down_proj\.g_idx names group 3, outside the layer's 3 groups"),
    (lambda g: g[:-1], r"down_proj\.g_idx is int32 \(95,\), not the group \(an integer\) of each of the layer's 96"),
])
def test_an_act_order_g_idx_of_unequal_or_unknown_groups_is_refused_by_name(tmp_path, edit, said):
    folder, _ = quantized_folder(tmp_path, "gptq-v1-act-order")

    def groups(sd):
        sd["model.layers.0.mlp.down_proj.g_idx"] = edit(sd["model.layers.0.mlp.down_proj.g_idx"].clone())

    with pytest.raises(UserError, match=said):
        load_checkpoint(edit_tensors(folder, groups), quantized_ok=True)


def test_an_awq_layer_with_a_g_idx_is_refused_by_name_not_read_as_act_order(tmp_path):
    """AutoAWQ's GEMM writes no g_idx: a scattered one beside an AWQ layer was read as GPTQ's act-order (its inputs
    gathered, another model than AWQ's), without a word. Refused naming the tensor."""
    folder, _ = quantized_folder(tmp_path, "awq-gemm")
    name = "model.layers.0.mlp.down_proj.g_idx"

    def scattered(sd):  # (128 inputs in four groups of 32, each group's inputs spread over K)
        sd[name] = (torch.arange(128, dtype=torch.int32) % 4).contiguous()

    with pytest.raises(UserError, match=rf"tensor '{name.removeprefix('model.')}' is not an AWQ layer's \(AutoAWQ's "
                                        r"GEMM writes no g_idx"):
        load_checkpoint(edit_tensors(folder, scattered), quantized_ok=True)


def test_an_act_order_model_saves_loads_dequantizes_copies_and_casts_with_its_input_order(tmp_path):
    """in_perm goes wherever the layer goes: our int4 file (written and read back, the gather included), a deep
    copy, .to(dtype) (an index: never cast), and dequantize_model (merge's and export's float model: the matrix in
    the inputs' own order, the original model's logits). A damaged in_perm is refused by name."""
    import copy

    from tritongpt.model.quant import dequantize_model

    folder, want = quantized_folder(tmp_path, "gptq-v1-act-order")
    model = load_checkpoint(folder, quantized_ok=True)
    model.save(tmp_path / "int4.safetensors")
    back = GPTModel.load(tmp_path / "int4.safetensors", quantized_ok=True).eval()
    perm = model.trf_blocks[0].ff.w_down.in_perm
    assert torch.equal(back.trf_blocks[0].ff.w_down.in_perm, perm)
    idx = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = want(idx)
        assert torch.equal(back(idx), model(idx))
        copied = copy.deepcopy(model)
        assert torch.equal(copied(idx), model(idx))
        cast = copy.deepcopy(model).to(torch.float64)
        assert cast.trf_blocks[0].ff.w_down.in_perm.dtype == torch.int64
        dense = dequantize_model(copy.deepcopy(model))
        assert not any(type(m).__name__ == "Int4Linear" for m in dense.modules())
        got = dense(idx)
        assert (got - expected).abs().max().item() < 1e-5 * expected.abs().max().item()

    sd = load_file(tmp_path / "int4.safetensors")
    name = "trf_blocks.0.ff.w_down.in_perm"
    sd[name] = sd[name].clone()
    sd[name][0] = sd[name][1]  # (input perm[1] gathered twice, perm[0] never)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "int4.safetensors"), framework="pt") as f:
        meta = f.metadata()
    save_file(sd, tmp_path / "bad.safetensors", metadata=meta)
    with pytest.raises(UserError, match=r"bad\.safetensors: tensor trf_blocks\.0\.ff\.w_down\.in_perm is not a "
                                        r"permutation of the layer's 96 inputs"):
        GPTModel.load(tmp_path / "bad.safetensors", quantized_ok=True)


@pytest.mark.parametrize("kind, ordered", [("gptq-v1-act-order", 7), ("gptq-desc-act-sorted", 0)])
def test_info_on_our_int4_file_of_an_act_order_model_says_so(tmp_path, capsys, kind, ordered):
    """info on the int4 file an act-order folder saves as (GPTModel.save): its layers gather their inputs first
    (in_perm), said with the quantization; a desc_act folder whose g_idx is already in order has no in_perm, and says
    none."""
    folder, _ = quantized_folder(tmp_path, kind)
    load_checkpoint(folder, quantized_ok=True).save(tmp_path / "int4.safetensors")
    assert cli.main(["info", "--weights", str(tmp_path / "int4.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "quantized    int4: 7 matrices (" in out
    said = "of them act-order (GPTQ's desc_act: each gathers its inputs into its groups' order first, its in_perm)"
    assert (f", {ordered} {said}" in out) if ordered else (said not in out)


def test_a_fused_act_order_layers_parts_each_save_and_load_their_input_order(tmp_path):
    """GPT-NeoX's query_key_value is one GPTQ layer, split into W_query, W_key and W_value (int4_rows) with one input
    order: each part must keep its own copy, as safetensors saves tensors shared by several names under one of them
    alone, and the file's other parts then loaded without their gather (wrong logits, no error)."""
    folder, want = quantized_folder(tmp_path, "gptq-v2-act-order-gpt_neox")
    model = load_checkpoint(folder, quantized_ok=True)
    model.save(tmp_path / "int4.safetensors")
    back = GPTModel.load(tmp_path / "int4.safetensors", quantized_ok=True).eval()
    att = back.trf_blocks[0].att
    for part in ("W_query", "W_key", "W_value"):
        assert getattr(att, part).in_perm is not None, part
        assert torch.equal(getattr(att, part).in_perm, model.trf_blocks[0].att.W_query.in_perm), part
    idx = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = want(idx)
        assert (back(idx) - expected).abs().max().item() < 1e-5 * expected.abs().max().item()


def test_a_float_layer_beside_4bit_ones_and_a_quantized_head_are_refused_by_name(tmp_path):
    folder, want = quantized_folder(tmp_path, "awq-gemm")

    def float_down(sd):
        for part in (".qweight", ".qzeros", ".scales"):
            del sd["model.layers.0.mlp.down_proj" + part]
        sd["model.layers.0.mlp.down_proj.weight"] = want.trf_blocks[0].ff.w_down.weight.detach().clone()

    with pytest.raises(UserError, match=r"trf_blocks\.0\.ff\.w_down is stored as a float weight beside quantized"):
        load_checkpoint(edit_tensors(folder, float_down), quantized_ok=True)

    folder, _ = quantized_folder(tmp_path / "head", "awq-gemm")

    def quantized_head(sd):
        lv, zero, scale, _ = reference_quantize(sd.pop("lm_head.weight"), 32, False)
        sd.update({"lm_head" + part: t for part, t in pack_awq(lv, zero, scale).items()})

    with pytest.raises(UserError, match=r"lm_head is quantized, where this model keeps all but the blocks' linear"):
        load_checkpoint(edit_tensors(folder, quantized_head), quantized_ok=True)


def test_a_gptq_v1_zero_of_0_saved_as_whole_words_reads_back(tmp_path):
    """GPTQ v1's z - 1 is word arithmetic: GPTQModel saves v1 as its v2 qzeros less 0x11111111 per int32 word (and
    loads it back adding that), so a zero of 0 (an asymmetric group of weights all at or above 0) becomes nibble 15
    and borrows 1 from the next output's. Read nibble by nibble + 1, that zero is 16 and its neighbour one short."""
    from tritongpt.model.quant import dequantize_int4
    from tritongpt.train.hf_quant import int4_linears, int4_spec

    gen = torch.Generator().manual_seed(0)
    N, K, group = 16, 64, 32
    q = torch.randint(0, 16, (N, K), generator=gen)
    z = torch.randint(1, 16, (N, K // group), generator=gen)
    z[3, 0] = z[8, 1] = 0  # output 3 (a word's nibble 3) in group 0, output 8 (a word's lowest) in group 1
    s = (torch.rand(N, K // group, generator=gen) + 0.1).half().double()
    packed = pack_gptq(q, z, s, v1=True)  # (v2's words less 0x11111111)
    sd = {"layers.0.mlp.down_proj" + part: t for part, t in packed.items()}
    spec = int4_spec({**KINDS["gptq-v1-asym-qwen2"][1], "_where": "config.json"})
    _, out, G = int4_linears(sd, spec, tmp_path)
    got = dequantize_int4(*out["layers.0.mlp.down_proj"][:3], G)
    want = (q - z.repeat_interleave(group, dim=1)) * s.repeat_interleave(group, dim=1)
    assert torch.allclose(got.double(), want, atol=1e-6, rtol=0)


def test_a_gptq_v2_folder_naming_its_format_as_format_alone_reads_as_v2(tmp_path):
    """GPTQModel calls its checkpoint_format "format" (and writes both today): a config with only that one is v2's
    zeros as they are, not v1's read one too high."""
    folder, want = quantized_folder(tmp_path, "gptq-v2-one-group-mistral")
    q = {**KINDS["gptq-v2-one-group-mistral"][1]}
    q["format"] = q.pop("checkpoint_format")
    model = load_checkpoint(with_quantization(folder, q), quantized_ok=True)
    idx = torch.arange(7)[None]
    with torch.no_grad():
        expected = want(idx)
        assert (model(idx) - expected).abs().max().item() < 1e-5 * expected.abs().max().item()


def autoawq_own_config(folder, fields):
    """folder as AutoAWQ's older save_quantized leaves it: no quantization_config in config.json, its settings in
    quant_config.json (AwqConfig.to_dict's fields)."""
    d = json.loads((folder / "config.json").read_text())
    del d["quantization_config"]
    (folder / "config.json").write_text(json.dumps(d))
    (folder / "quant_config.json").write_text(json.dumps(fields))
    return folder


def test_autoawqs_own_quant_config_json_is_read_as_autoawq_reads_it(tmp_path):
    folder, want = quantized_folder(tmp_path, "awq-gemm")
    autoawq_own_config(folder, {"zero_point": True, "q_group_size": 32, "w_bit": 4, "version": "GEMM",
                                "modules_to_not_convert": None})
    model = load_checkpoint(folder, quantized_ok=True)
    assert model.quantized == "int4" and model.quantized_group_size == 32
    idx = torch.arange(7)[None]
    with torch.no_grad():
        expected = want(idx)
        assert (model(idx) - expected).abs().max().item() < 1e-5 * expected.abs().max().item()
    # AwqConfig's defaults where a field is missing: groups of 128 (this model's are of 32)
    autoawq_own_config(with_quantization(folder, {}), {"w_bit": 4, "zero_point": True})
    with pytest.raises(UserError, match=r"down_proj has 4 groups of its 128 inputs, not groups of group_size 128"):
        load_checkpoint(folder, quantized_ok=True)
    autoawq_own_config(with_quantization(folder, {}), {"w_bit": 3, "q_group_size": 32})
    with pytest.raises(UserError, match=r"quant_config\.json: quant_method 'awq' \(bits 3, group_size 32, version "
                                        r"'GEMM'\) is not read here \(bits 3: 4-bit AWQ only"):
        load_checkpoint(folder, quantized_ok=True)
    # a GPT-2's reader takes none: refused by name, as quantization_config would be
    gpt2 = autoawq_own_config(with_quantization(exported(tmp_path, "gpt2"), {}), {"w_bit": 4, "q_group_size": 32})
    with pytest.raises(UserError, match=r"quant_config\.json: quant_method 'awq' .* is not read here"):
        load_checkpoint(gpt2, quantized_ok=True)
    (gpt2 / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 32}))
    with pytest.raises(UserError, match=r"both AutoGPTQ's quantize_config\.json and AutoAWQ's quant_config\.json"):
        load_checkpoint(gpt2, quantized_ok=True)


def test_a_quantized_multimodal_gemma3_loads_its_language_model_as_int4(tmp_path):
    """Gemma3ForConditionalGeneration's folder (model_type gemma3, the text model's fields in text_config, its tensors
    under model.language_model.): the language model's 4-bit projections read, the vision tower's left out as they
    are for a float folder (a vision linear of GPTQ's here too)."""
    folder, want = quantized_folder(tmp_path, "gptq-v2-gemma3_text")

    def vision_tower(sd):
        down = "model.language_model.layers.0.mlp.down_proj"
        sd.update({"model.vision_tower.encoder.layers.0.mlp.fc1" + p[len(down):]: sd[p].clone()
                   for p in [k for k in sd if k.startswith(down + ".")]})

    model = load_checkpoint(as_multimodal_gemma3(folder, more=vision_tower), quantized_ok=True)
    assert model.quantized == "int4"
    idx = torch.arange(7)[None]
    with torch.no_grad():
        expected = want(idx)
        assert (model(idx) - expected).abs().max().item() < 1e-5 * expected.abs().max().item()


def test_qlora_on_an_act_order_layer_trains_and_merges_in_the_inputs_own_order(tmp_path):
    """A LoRA update beside an act-order Int4Linear reads x ungathered (its A is in the inputs' order), and merging
    (dequantize_model: W + scale B A) gives the same logits; a gradient reaches A through both paths' gather."""
    import copy

    from tritongpt.model.lora import add_lora, merge_lora

    folder, _ = quantized_folder(tmp_path, "gptq-v1-act-order")
    model = add_lora(load_checkpoint(folder, quantized_ok=True), 4, 8.0)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "lora", None) is not None:
                m.lora.lora_B.normal_(generator=torch.Generator().manual_seed(2))  # (B starts at 0: no update at all)
    idx = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        merged = merge_lora(copy.deepcopy(model))(idx)
    for kernels in ("reference", "mlp"):  # (the quantized matmuls' Triton path: the rest left reference, quicker)
        model.set_kernels(kernels)
        got = model(idx)
        assert (got - merged).abs().max().item() < 1e-5 * merged.abs().max().item(), kernels
        got.square().mean().backward()
        a = model.trf_blocks[0].ff.w_down.lora.lora_A
        assert a.grad is not None and a.grad.abs().sum() > 0
        a.grad = None


def test_adapters_served_on_an_act_order_model_read_x_ungathered_on_both_paths(tmp_path):
    """serve --lora on an act-order GPTQ folder: each AdapterLinear runs its adapter on x as it is (A in the inputs'
    own order), beside the base's gather: a row per adapter and a base row, on the reference path and the Triton
    one (kernels/lora.py add_lora_rows), give the float model's logits with that row's adapter merged, W + B A."""
    import copy

    from tritongpt.model.lora import serve_adapters

    folder, want = quantized_folder(tmp_path, "gptq-v1-act-order")
    model = load_checkpoint(folder, quantized_ok=True)
    assert model.trf_blocks[0].ff.w_down.in_perm is not None
    gen = torch.Generator().manual_seed(3)
    adapters = {name: {f"trf_blocks.0.{p}": (0.3 * torch.randn(4, m.in_features, generator=gen),
                                             0.3 * torch.randn(m.out_features, 4, generator=gen))
                       for p in paths for m in [model.get_submodule(f"trf_blocks.0.{p}")]}
                for name, paths in (("a", ["ff.w_down", "att.W_query"]), ("b", ["ff.w_down", "ff.w_up"]))}
    merged = {}
    for name, modules in adapters.items():
        merged[name] = copy.deepcopy(want)
        with torch.no_grad():
            for path, (a, b) in modules.items():
                merged[name].get_submodule(path).weight.add_(b @ a)
    serve_adapters(model, adapters)
    idx = torch.randint(0, V, (3, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = torch.stack([merged["a"](idx[:1])[0], merged["b"](idx[1:2])[0], want(idx[2:])[0]])
        assert (expected[0] - want(idx[:1])[0]).abs().max() > 0.1 * expected.abs().max()  # (the adapters matter)
        for kernels in ("reference", "mlp"):  # (the quantized and adapter matmuls' Triton path)
            model.set_kernels(kernels)
            with model.adapters.use(torch.tensor([0, 1, -1])):
                got = model(idx)
            assert (got - expected).abs().max().item() < 1e-5 * expected.abs().max().item(), kernels


@pytest.mark.parametrize("quantized, tie", [("lm_head", True), ("language_model.lm_head", True), ("lm_head", False),
                                            ("model.language_model.embed_tokens", True)])
def test_a_multimodal_gemma3s_quantized_head_or_embedding_is_refused_by_name(tmp_path, quantized, tie):
    """GPTQModel's lm_head=True in a Gemma3ForConditionalGeneration folder: the head's qweight was left out with the
    vision tower, so a tied model loaded its float embedding as the head without a word (and an untied one was said
    to have no head); a 4-bit embedding was "no language model found". Refused by name, as the text model's are."""
    folder, _ = quantized_folder(tmp_path, "gptq-v2-gemma3_text")

    def quantized_part(sd):
        emb = "model.language_model.embed_tokens.weight"
        w = sd.pop(emb) if "embed" in quantized else sd[emb].clone()
        lv, zero, scale, _ = reference_quantize(w, 64, False)
        sd.update({quantized + part: t for part, t in pack_gptq(lv, zero, scale, v1=False).items()})

    # (the head named as the file holds it; the embedding as the language model's, its prefix read off as "model."
    # is from a text model's)
    name = re.escape(quantized.removeprefix("model.language_model."))
    with pytest.raises(UserError, match=rf"safetensors: {name} is quantized, where this model keeps all but the "
                                        r"blocks' linear"):
        load_checkpoint(as_multimodal_gemma3(folder, tie=tie, more=quantized_part), quantized_ok=True)


def moe_folder(tmp_path, qk_norm=False):
    """A tiny float Mixtral (Qwen3-MoE with qk_norm) folder, for the quantized-MoE refusals (here, test_hf_fp8,
    test_hf_bnb) to give a quantization_config."""
    from tritongpt.train.moe_weights import export_moe

    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=V, context_length=T, n_layer=1, n_head=4, n_embd=64, n_experts=4,
                               experts_per_token=2, qk_norm=qk_norm, **{**LLAMA, "mlp_hidden": 32}))
    export_moe(model, tmp_path / "moe")
    return tmp_path / "moe"


@pytest.mark.parametrize("qk_norm", [False, True])  # Mixtral, Qwen3-MoE
def test_a_quantized_moe_folder_is_refused_by_name_its_experts_being_float_here(tmp_path, qk_norm):
    """GPTQ and AWQ quantize each expert's linears, which MoEFeedForward keeps as stacked float tensors for its
    grouped kernels: refused by name, without the `tritongpt quantize` remedy (which refuses MoE models too)."""
    folder = with_quantization(moe_folder(tmp_path, qk_norm), KINDS["gptq-v1-sym"][1])
    name = "Qwen3-MoE" if qk_norm else "Mixtral"
    with pytest.raises(UserError, match=rf"quant_method 'gptq' .* is not read here \(a quantized {name}: this model's "
                                        r"mixture-of-experts layer keeps its experts float .*; load the float "
                                        rf"{name} it was quantized from \(this model's int4 and int8 do not take"):
        load_checkpoint(folder, quantized_ok=True)


def grown_rows(sd, name, rows):
    """sd with the fused tensor `name` (a float weight or bias, or a GPTQ linear's qweight, qzeros and scales) given
    `rows` more outputs (fewer where negative), its first ones repeated."""
    for k in [k for k in sd if (k == name or k.startswith(name + ".")) and not k.endswith(".g_idx")]:  # (inputs')
        t, dim = sd[k], 1 if k.endswith((".qweight", ".qzeros", ".scales")) else 0
        n = rows // 8 if k.endswith(".qzeros") else rows  # (eight outputs a word)
        sd[k] = (torch.cat([t, t.narrow(dim, 0, n)], dim) if n > 0 else t.narrow(dim, 0, t.shape[dim] + n)).contiguous()


@pytest.mark.parametrize("rows", [16, -16])
def test_a_4bit_query_key_value_of_other_rows_is_refused_by_name(tmp_path, rows):
    """Its q, k and v are taken by index (per_head_qkv_rows): extra rows loaded without a word (the first ones
    taken), too few an IndexError; refused by name as the float reader's are (below)."""
    folder, _ = quantized_folder(tmp_path, "gptq-v2-gpt_neox")
    edit_tensors(folder, lambda sd: grown_rows(sd, "gpt_neox.layers.0.attention.query_key_value", rows))
    with pytest.raises(UserError, match=rf"tensor layers\.0\.attention\.query_key_value\.weight has {192 + rows} "
                                        r"rows; 4 heads' queries, keys and values of 16 need 192"):
        load_checkpoint(folder, quantized_ok=True)


@pytest.mark.parametrize("family", ["neox", "falcon", "bloom"])
def test_a_float_query_key_value_of_other_rows_in_any_layer_is_refused_by_name(tmp_path, family):
    """The fused q, k, v split by index (GPT-NeoX's and BLOOM's per head, Falcon's in its layout): a later layer's
    weight or a bias of other rows was loaded without a word (or an IndexError), only layer 0's weight checked
    (Falcon's) or none."""
    from tritongpt.train.bloom_weights import export_bloom
    from tritongpt.train.falcon_weights import export_falcon
    from tritongpt.train.neox_weights import export_neox

    fields, export, prefix = {"neox": (NEOX, export_neox, "gpt_neox.layers.1.attention"),
                              "falcon": ({**FALCON, "bias": True}, export_falcon, "transformer.h.1.self_attention"),
                              "bloom": (dict(position_encoding="alibi", embed_norm=True), export_bloom,
                                        "transformer.h.1.self_attention")}[family]
    torch.manual_seed(0)
    export(GPTModel(GPTConfig(vocab_size=V, context_length=T, n_layer=2, n_head=4, n_embd=64, **fields)),
           tmp_path / family)
    for kind, rows in (("bias", 16), ("weight", -16)):
        folder = edit_tensors(tmp_path / family, lambda sd: grown_rows(sd, f"{prefix}.query_key_value.{kind}", rows))
        need = 192  # (Falcon's old per-head layout here: a key and value head each)
        with pytest.raises(UserError, match=rf"tensor {prefix.split('.', 1)[1]}\.query_key_value\.{kind} has "
                                            rf"{need + rows} rows; .* need {need}"):
            load_checkpoint(folder)
        grown_rows(sd := load_file(folder / "model.safetensors"), f"{prefix}.query_key_value.{kind}", -rows)
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})  # (back as it was, for the next)


# -- GPTQ of 2, 3 and 8 bits: 8-bit symmetric with one group a row kept int8, the rest dequantized ------------------
# The packer below is AutoGPTQ's QuantLinear.pack loop (auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py) as it is:
# at 2, 4 and 8 bits word r's field j is level (32 / bits) r + j; at 3, each 32 levels fill three words, level 10's
# low two bits at the top of the first and its high bit at the bottom of the second, level 21 likewise across the
# second and third. v1's zeros less 1: whole words less 0x55555555 / 0x01010101 at 2 / 8 bits (GPTQModel's
# convert_gptq_v2_to_v1_format), per level mod 8 at 3 (its _revert_gptq_v1_qzeros_correction).

def autogptq_pack(intweight, bits):
    """int64 levels [R, C] (R a multiple of 32) -> int32 words [R / 32 * bits, C] along the rows."""
    qweight = torch.zeros(intweight.shape[0] // 32 * bits, intweight.shape[1], dtype=torch.int64)
    i = row = 0
    while row < qweight.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                qweight[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i))
            i += 10
            qweight[row] |= intweight[i] << 30
            row += 1
            qweight[row] |= (intweight[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 1)
            i += 10
            qweight[row] |= intweight[i] << 31
            row += 1
            qweight[row] |= (intweight[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return as_int32(qweight & 0xFFFFFFFF)


def pack_gptq_bits(q, z, s, g_idx, bits, v1):
    """GPTQ's tensors of levels q [N, K], zeros z and scales s [N, G] (fp16 values), g_idx [K]: qweight packed along
    the inputs, qzeros along the outputs (AutoGPTQ packs zeros [G, N] column by column as qweight row by row)."""
    if v1 and bits == 3:
        z = (z - 1) & 7
    qzeros = autogptq_pack(z.contiguous(), bits).T  # (z [N, G]: the outputs its rows)
    if v1 and bits != 3:
        qzeros = as_int32((qzeros.long() - sum(1 << i for i in range(0, 32, bits))) & 0xFFFFFFFF)
    return {".qweight": autogptq_pack(q.T.contiguous(), bits), ".qzeros": qzeros.contiguous(),
            ".scales": s.T.half().contiguous(), ".g_idx": g_idx.to(torch.int32)}


def coded_folder(tmp_path, q, family="llama", act_order=False, seed=0, mlp_hidden=96):
    """A tiny folder of `family` whose linears are random GPTQ codes of q's bits and groups (levels, zeros: 0 among
    them where asymmetric, scales), packed by pack_gptq_bits, with an act-order g_idx (a random scatter of equal
    groups) where asked; and the float model of the matrices they stand for, dequantized here straight from g_idx:
    W[n, k] = (q[n, k] - z[n, g_idx[k]]) s[n, g_idx[k]]. A Llama's MLP 96 wide by default (three groups of 32: not a
    power of two); "qwen2": a Llama with Qwen2's q/k/v biases."""
    from tritongpt.train.neox_weights import export_neox

    base, export = {"llama": ({**LLAMA, "mlp_hidden": mlp_hidden}, export_llama), "neox": (NEOX, export_neox),
                    "qwen2": ({**LLAMA, "mlp_hidden": mlp_hidden, "qkv_bias_only": True}, export_llama)}[family]
    torch.manual_seed(seed)
    model = GPTModel(GPTConfig(vocab_size=V, context_length=T, n_layer=1, n_head=4, n_embd=64, **base)).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms and biases off their ones and zeros
            p.add_(0.05 * torch.randn(p.shape))
    folder = tmp_path / f"gptq{q['bits']}-{family}"
    export(model, folder)
    sd = load_file(folder / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    bits, dequantized = q["bits"], {}
    maxq = 2 ** bits - 1
    for k in [k for k in sd if k.endswith(LINEARS)]:
        N, K = sd.pop(k).shape
        width = K if q["group_size"] == -1 else q["group_size"]
        levels = torch.randint(0, maxq + 1, (N, K), generator=gen)
        levels[0, :2] = torch.tensor([0, maxq])  # (both ends of the range: int8's -128 and 127 at 8 bits sym)
        if q.get("sym", True):
            z = torch.full((N, K // width), (maxq + 1) // 2)
        else:
            z = torch.randint(0, maxq + 1, (N, K // width), generator=gen)
            z[1, 0] = 0  # (v1's z - 1 of 0: borrowed from the next word's level, or 7 at 3 bits)
        s = ((torch.rand(N, K // width, generator=gen) + 0.5) * 0.2 / maxq).half().double()
        g_idx = torch.arange(K) // width
        if act_order:
            g_idx = g_idx[torch.randperm(K, generator=gen)]
            assert not torch.equal(g_idx, torch.arange(K) // width)
        packed = pack_gptq_bits(levels, z, s, g_idx, bits, v1=q.get("checkpoint_format", "gptq") == "gptq")
        sd.update({k.removesuffix(".weight") + part: t for part, t in packed.items()})
        dequantized[k] = ((levels - z[:, g_idx]) * s[:, g_idx]).float()
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    with_quantization(folder, q)
    return folder, load_checkpoint(exported_with(tmp_path / "float", folder, dequantized))


def same_logits(model, want, kernels=("reference",)):
    idx = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = want(idx)
        for k in kernels:
            model.set_kernels(k)
            got = model(idx)
            assert (got - expected).abs().max().item() < 1e-5 * expected.abs().max().item(), k


GPTQ = {"quant_method": "gptq", "desc_act": False}


@pytest.mark.parametrize("q, family, act_order", [
    ({**GPTQ, "bits": 2, "group_size": 32, "sym": False}, "llama", False),
    ({**GPTQ, "bits": 2, "group_size": 32, "sym": False, "checkpoint_format": "gptq_v2"}, "llama", True),
    ({**GPTQ, "bits": 3, "group_size": 32, "sym": False}, "llama", True),
    ({**GPTQ, "bits": 3, "group_size": -1, "sym": True, "checkpoint_format": "gptq_v2"}, "llama", False),
    ({**GPTQ, "bits": 3, "group_size": 32, "sym": False}, "neox", False),
    # 8 bits that Int8Linear does not hold: act-order groups (their inputs scattered), or zero points
    ({**GPTQ, "bits": 8, "group_size": 32, "sym": True}, "llama", True),
    ({**GPTQ, "bits": 8, "group_size": -1, "sym": False, "checkpoint_format": "gptq_v2"}, "llama", False),
    ({**GPTQ, "bits": 8, "group_size": 32, "sym": False}, "neox", False),
])
def test_a_2_3_or_8bit_gptq_folder_loads_as_the_float_model_of_its_dequantized_weights(tmp_path, capsys, q, family,
                                                                                      act_order):
    folder, want = coded_folder(tmp_path, {**q, "desc_act": act_order}, family, act_order)
    model = load_checkpoint(folder)  # (an ordinary float model: no quantized_ok needed)
    assert not getattr(model, "quantized", None)
    assert {type(m).__name__ for m in model.trf_blocks.modules() if "Linear" in type(m).__name__} == {"Linear"}
    n = 4 if family == "neox" else 7
    assert f"its {n} {q['bits']}-bit GPTQ linear weights are dequantized to float at load" in capsys.readouterr().err
    same_logits(model, want)


@pytest.mark.parametrize("v1, family, desc_act", [(True, "llama", False), (False, "llama", True),
                                                  (True, "neox", False)])
def test_an_8bit_symmetric_gptq_folder_of_one_group_a_row_loads_kept_int8(tmp_path, v1, family, desc_act):
    """W = s (q - 128), a scale a row: Int8Linear's qweight q - 128 (-128..127) and scale s, exactly (desc_act with
    one group: every input's g_idx 0). NeoX's fused query_key_value split along the outputs. Saved as our int8 file
    and loaded back, the same model."""
    q = {**GPTQ, "bits": 8, "group_size": -1, "sym": True, "desc_act": desc_act,
         "checkpoint_format": "gptq" if v1 else "gptq_v2"}
    folder, want = coded_folder(tmp_path, q, family)
    model = load_checkpoint(folder, quantized_ok=True)
    assert model.quantized == "int8" and not model.quantized_head
    assert {type(m).__name__ for m in model.trf_blocks.modules() if "Linear" in type(m).__name__} == {"Int8Linear"}
    assert int(model.trf_blocks[0].att.W_query.qweight.min()) == -128  # (level 0 less 128: int8's lowest)
    same_logits(model, want, ("reference", "triton"))
    with pytest.raises(UserError, match=r"GPTQ-quantized .* read as int8 for inference"):
        load_checkpoint(folder)
    model.save(tmp_path / "int8.safetensors")  # (our int8 file: its -128s kept)
    same_logits(GPTModel.load(tmp_path / "int8.safetensors", quantized_ok=True).eval(), want)


@pytest.mark.parametrize("mlp_hidden", [64, 128])
def test_an_8bit_sym_gptq_folder_of_group_size_k_is_kept_int8_a_scale_a_row_only_where_every_layer_has_one_group(
        tmp_path, capsys, mlp_hidden):
    """group_size 64 where every layer's K is 64 (an MLP 64 wide): one group a row in fact, though the config names a
    number, so kept int8 with a scale a row as group_size -1 is. With an MLP 128 wide down_proj has two groups: every
    layer kept int8 with group scales of 64 (this model's int8 layers are all of one kind)."""
    q = {**GPTQ, "bits": 8, "group_size": 64, "sym": True}
    folder, want = coded_folder(tmp_path, q, mlp_hidden=mlp_hidden)
    model = load_checkpoint(folder, quantized_ok=True)
    linears = {type(m).__name__ for m in model.trf_blocks.modules() if "Linear" in type(m).__name__}
    assert model.quantized == "int8" and linears == {"Int8Linear"} and "dequantized" not in capsys.readouterr().err
    # (a scale a row: [N]; group scales of 64: [N, 1] for K 64, [N, 2] for down_proj's 128)
    groups = {tuple(m.scale.shape[1:]) for m in model.trf_blocks.modules() if type(m).__name__ == "Int8Linear"}
    assert groups == ({()} if mlp_hidden == 64 else {(1,), (2,)})
    assert model.quantized_group_size == (None if mlp_hidden == 64 else 64)
    same_logits(model, want)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_an_8bit_sym_gptq_folder_of_groups_loads_kept_int8_with_group_scales(tmp_path, capsys, family):
    """Qwen's *-GPTQ-Int8 layout (bits 8, sym, a group_size: 32 here, K 64 and the MLP's 96, not multiples of 128;
    "qwen2": its q/k/v biases): every linear an Int8Linear whose scale is [N, K / 32] fp32 and qweight int8 (not
    read dequantized: nothing said on stderr), W = s[n, k // 32] (q - 128) exactly; the logits the float model's of
    the weights dequantized straight from the file, on both kernel paths; saved as our int8 file (its group size
    recorded) and loaded back, the same layers and logits."""
    from tritongpt.model.quant import dequantize_model

    folder, want = coded_folder(tmp_path, {**GPTQ, "bits": 8, "group_size": 32, "sym": True}, family)
    model = load_checkpoint(folder, quantized_ok=True)
    assert "dequantized" not in capsys.readouterr().err
    layers = {n: m for n, m in model.trf_blocks.named_modules() if "Linear" in type(m).__name__}
    assert len(layers) == 7 and {type(m).__name__ for m in layers.values()} == {"Int8Linear"}
    for name, m in layers.items():
        assert m.qweight.dtype == torch.int8 and m.scale.dtype == torch.float32, name
        assert m.group_size == 32 and m.scale.shape == (m.out_features, m.in_features // 32), name
    assert {m.in_features for m in layers.values()} == {64, 96}
    assert model.quantized == "int8" and model.quantized_group_size == 32
    if family == "qwen2":
        assert model.trf_blocks[0].att.W_query.bias is not None
    same_logits(model, want, ("reference", "triton"))
    model.save(tmp_path / "int8g.safetensors")
    back = GPTModel.load(tmp_path / "int8g.safetensors", quantized_ok=True).eval()
    assert back.quantized == "int8" and back.quantized_group_size == 32
    for name, m in back.trf_blocks.named_modules():
        if name in layers:
            assert torch.equal(m.qweight, layers[name].qweight) and torch.equal(m.scale, layers[name].scale), name
    same_logits(back, want, ("reference", "triton"))
    same_logits(dequantize_model(back), want)  # (merge's and export's float model: each group's scale on its inputs)
    assert not any("Int8" in type(m).__name__ for m in back.modules())


def test_an_8bit_sym_layer_whose_zero_is_not_128_is_refused_by_name(tmp_path):
    q = {**GPTQ, "bits": 8, "group_size": -1, "sym": True, "checkpoint_format": "gptq_v2"}
    folder, _ = coded_folder(tmp_path, q)

    def zero_0(sd):  # (one output's zero 0: its levels 0..255 no int8 less it)
        sd["model.layers.0.mlp.down_proj.qzeros"][0, 0] = 0x80808000 - 2 ** 32  # (as the int32 word it is)

    with pytest.raises(UserError, match=r"down_proj's 8-bit levels less their zeros run -128\.\.255, outside int8's "
                                        r"-128\.\.127: not the symmetric GPTQ layer \(zero 128\)"):
        load_checkpoint(edit_tensors(folder, zero_0), quantized_ok=True)


@pytest.mark.parametrize("kind, name, mode", [("gptq-v1-sym", "GPTQ", "int4"), ("awq-gemm", "AWQ", "int4"),
                                              ("gptq-8bit", "GPTQ", "int8")])
def test_a_folders_own_quantization_is_said_as_its_own_not_tritongpt_quantizes(tmp_path, capsys, kind, name, mode):
    """info on a GPTQ/AWQ folder kept quantized, and on our file saved from it (GPTModel.save: its quantized_from),
    names the folder's quantization, as the loader's refusal does; a file without the record (older ones, and
    `tritongpt quantize`'s) still loads, said as before."""
    from tritongpt.model.gpt import safetensors_metadata

    if kind == "gptq-8bit":
        folder, _ = coded_folder(tmp_path, {**GPTQ, "bits": 8, "group_size": -1, "sym": True})
    else:
        folder, _ = quantized_folder(tmp_path, kind)
    file = tmp_path / "ours.safetensors"
    load_checkpoint(folder, quantized_ok=True).save(file)
    for weights in (folder, file):
        assert cli.main(["info", "--weights", str(weights)]) == 0
        out = capsys.readouterr().out
        assert f"as the matmuls read them (a Hugging Face {name} folder's own quantization)" in out, weights
        assert "tritongpt quantize" not in out
    with pytest.raises(UserError, match=rf"is {mode}-quantized \(a Hugging Face {name} folder's own quantization, "
                                        r"saved\), for inference"):
        GPTModel.load(file)
    back = GPTModel.load(file, quantized_ok=True)
    back.save(tmp_path / "again.safetensors")  # (kept through a load and a save)
    assert safetensors_metadata(tmp_path / "again.safetensors")["quantized_from"] == name.lower()
    meta = safetensors_metadata(file)
    del meta["quantized_from"]
    save_file(load_file(file), tmp_path / "old.safetensors", metadata=meta)
    assert GPTModel.load(tmp_path / "old.safetensors", quantized_ok=True).quantized_from is None
    assert cli.main(["info", "--weights", str(tmp_path / "old.safetensors")]) == 0
    assert "as the matmuls read them (`tritongpt quantize`)" in capsys.readouterr().out
