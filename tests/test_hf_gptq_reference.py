"""GPTQ folders of 2, 3, 4 and 8 bits checked against a second, independent reading of the format: a dequantizer
and a packer written here from GPTQModel's and AutoGPTQ's own code, sharing nothing with train/hf_quant.py's
unpacking or with test_hf_quantized.py's packer (AutoGPTQ's pack loop), so that a misreading both of those share
shows up here. The loader's matrix, on each path it takes (dequantized to float, kept int4, kept int8), must equal
this reference's exactly, on tensors packed by either packer.

The reading (GPTQModel nn_modules/qlinear PackableQuantLinear.dequantize_weight, utils/model.py
convert_gptq_v1_to_v2_format_module and convert_gptq_v2_to_v1_format_module, utils/model_dequant.py unpack_rows /
unpack_cols; AutoGPTQ qlinear_cuda_old.py pack and forward):
- qweight [K * bits / 32, N] int32, qzeros [G, N * bits / 32], scales [G, N], g_idx [K], G = ceil(K / group_size).
  (Both writers size their buffers K // 32 * bits and N // 32 * bits: a real file's K and N are multiples of 32;
  Falcon-7B's 4544 is, its short group at 128 being one of 64. Some cases below go past that, as the loader does.)
- 2, 4, 8 bits: word r of a column holds 32 / bits fields, field i (shift bits * i) is row (32 / bits) r + i (wf =
  range(0, 32, bits)). 3 bits: three words hold 32 fields: word 0 fields 0..9 at shifts 0..27 and field 10's low
  two bits at 30; word 1 field 10's high bit at 0, fields 11..20 at shifts 1..28, field 21's low bit at 31; word 2
  field 21's high two bits at 0, fields 22..31 at shifts 2..29. qzeros the same along the outputs.
- W[n, k] = scales[g, n] * (q[k, n] - z[g, n]), g = g_idx[k] (v2's zeros).
- v1 (checkpoint_format "gptq") stores z - 1: GPTQModel's writer subtracts 0x55555555 / 0x11111111 / 0x01010101
  from each word at 2 / 4 / 8 bits (a zero of 0 borrows from the next field) and its reader adds them back; at 3
  bits both shift each field by 1 modulo 8 (a straddling field would lose a word add's carry). (Older GPTQModel
  wrote 3-bit v1 zeros as word constants with words 0's and 2's swapped; its current reader, like AutoGPTQ's, reads
  them per field as here, so such a file is misread everywhere alike: nothing here tells one apart.)
"""
import pytest
import torch
from safetensors.torch import load_file, save_file

from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.model.quant import Int4Linear, Int8Linear
from tritongpt.train.gpt2_weights import load_checkpoint
from tritongpt.train.hf_quant import gptq_dequantized, int4_linears, int4_spec
from tritongpt.train.llama_weights import export_llama

from test_hf_quantized import (FALCON, GEMMA, LINEARS, LLAMA, NEOX, PHI3, T, V, exported_with, pack_gptq_bits,
                               same_logits, with_quantization)

pytestmark = pytest.mark.usefixtures("one_thread")

V1_OFFSET = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}  # (GPTQModel's v1 <-> v2 word constants)


def u32(t):
    return t.long() & 0xFFFFFFFF


def ref_unpack(words, bits):
    """uint32 words [R, C] (int64) -> fields [32 R / bits, C] down the rows, by the reading above."""
    if bits != 3:
        per = 32 // bits
        fields = [(words >> (bits * i)) & (2 ** bits - 1) for i in range(per)]  # field i of every word
        return torch.stack(fields, dim=1).reshape(words.shape[0] * per, words.shape[1])
    out = []
    for w0, w1, w2 in words.reshape(-1, 3, words.shape[1]).unbind(0):
        out += [(w0 >> (3 * i)) & 7 for i in range(10)]
        out.append(((w0 >> 30) & 3) | ((w1 & 1) << 2))
        out += [(w1 >> (1 + 3 * i)) & 7 for i in range(10)]
        out.append(((w1 >> 31) & 1) | ((w2 & 3) << 1))
        out += [(w2 >> (2 + 3 * i)) & 7 for i in range(10)]
    return torch.stack(out)


def ref_pack(fields, bits):
    """fields [R, C] (R a multiple of 32 / bits; of 32 at 3 bits) -> int32 words down the rows, ref_unpack's
    inverse."""
    fields = fields.long()
    if bits != 3:
        per = 32 // bits
        f = fields.reshape(-1, per, fields.shape[1])
        words = sum(f[:, i] << (bits * i) for i in range(per))
    else:
        f = fields.reshape(-1, 32, fields.shape[1])
        w0 = sum(f[:, i] << (3 * i) for i in range(10)) | ((f[:, 10] & 3) << 30)
        w1 = (f[:, 10] >> 2) | sum(f[:, 11 + i] << (1 + 3 * i) for i in range(10)) | ((f[:, 21] & 1) << 31)
        w2 = (f[:, 21] >> 1) | sum(f[:, 22 + i] << (2 + 3 * i) for i in range(10))
        words = torch.stack([w0, w1, w2], dim=1).reshape(-1, fields.shape[1])
    return (((words & 0xFFFFFFFF) ^ 0x80000000) - 0x80000000).to(torch.int32)  # (two's complement, as stored)


def ref_dequantize(t, bits, v1):
    """The float64 matrix [N, K] of one GPTQ linear's tensors t (qweight, qzeros, scales, g_idx)."""
    qzeros = u32(t[".qzeros"])
    if v1 and bits != 3:
        qzeros = (qzeros + V1_OFFSET[bits]) & 0xFFFFFFFF
    q = ref_unpack(u32(t[".qweight"]), bits)  # [K, N]
    z = ref_unpack(qzeros.T, bits).T  # [G, N]
    if v1 and bits == 3:
        z = (z + 1) & 7
    g = t[".g_idx"].long()
    return (t[".scales"].double()[g] * (q - z[g])).T


def ref_gptq(q, z, s, g_idx, bits, v1):
    """GPTQ's tensors of levels q [N, K], zeros z and fp16-valued scales s [N, G], g_idx [K], packed by the reading
    (GPTQModel's v2 pack, then its v2 -> v1 conversion where v1)."""
    if v1 and bits == 3:
        z = (z - 1) & 7
    qzeros = ref_pack(z, bits).T  # (z [N, G]: along the outputs)
    if v1 and bits != 3:
        qzeros = ((u32(qzeros) - V1_OFFSET[bits]) & 0xFFFFFFFF ^ 0x80000000) - 0x80000000
    return {".qweight": ref_pack(q.T, bits).contiguous(), ".qzeros": qzeros.to(torch.int32).contiguous(),
            ".scales": s.T.half().contiguous(), ".g_idx": g_idx.to(torch.int32)}


def codes(N, K, group, bits, sym, act_order, seed=0):
    """Random levels q [N, K], zeros z and scales s [N, G], g_idx [K] of one layer, and W [N, K] they stand for.
    Asymmetric zeros hold 0 and 2^bits - 1 at outputs 0, 7, 10, 21 and 31 of group 0 (v1's borrow at a word's first,
    last and, at 3 bits, straddling fields) and levels both ends of the range."""
    gen = torch.Generator().manual_seed(seed)
    maxq = 2 ** bits - 1
    width = K if group == -1 else group
    G = -(-K // width)
    q = torch.randint(0, maxq + 1, (N, K), generator=gen)
    q[0, :2] = torch.tensor([0, maxq])
    if sym:
        z = torch.full((N, G), (maxq + 1) // 2)
    else:
        z = torch.randint(0, maxq + 1, (N, G), generator=gen)
        for n, v in ((0, 0), (7, 0), (10, 0), (21, maxq), (31, 0)):
            if n < N:
                z[n, 0] = v
    s = ((torch.rand(N, G, generator=gen) + 0.5) * 0.2 / maxq).half().double()
    g_idx = torch.arange(K) // width
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=gen)]
    return q, z, s, g_idx, (s[:, g_idx] * (q - z[:, g_idx]))


BASE = "layers.0.mlp.down_proj"


def spec_of(bits, group, sym, v1, desc_act=False):
    return int4_spec({"quant_method": "gptq", "bits": bits, "group_size": group, "sym": sym, "desc_act": desc_act,
                      "checkpoint_format": "gptq" if v1 else "gptq_v2"})


def loaded(t, spec):
    """The loader's matrix [N, K] (float64) of one layer's tensors t, by the path its spec takes."""
    sd = {BASE + k: v.clone() for k, v in t.items()}
    if spec["mode"] == "float":
        return gptq_dequantized(sd, spec, "f")[BASE + ".weight"].double()
    sd, packed, G = int4_linears(sd, spec, "f")
    if packed is None:  # (a 4-bit folder whose groups no int4 size divides: read dequantized)
        return sd[BASE + ".weight"].double()
    qweight, scale, *rest = packed[BASE]
    N, K = sd[BASE + ".weight"].shape
    if spec["mode"] == "int8":
        m = Int8Linear(K, N, bias=False, group_size=G)  # (G None: a scale a row)
        m.qweight.copy_(qweight)
        m.scale.copy_(scale)
    else:
        m = Int4Linear(K, N, bias=False, group_size=G)
        for buf, v in zip((m.qweight, m.scale, m.offset), (qweight, scale, rest[0])):
            buf.copy_(v)
        if rest[1] is not None:
            m.set_in_perm(rest[1])
    return m.dequantize().double()


CASES = [  # bits, N, K, group_size, sym, act_order
    (2, 32, 64, 32, False, False),
    (2, 32, 80, 32, False, True),  # (K 80: three groups, the last of 16)
    (2, 32, 64, -1, True, False),
    (3, 32, 96, 32, False, False),
    (3, 64, 96, 64, False, True),  # (96 at 64: the last group half one, as Falcon-7B's 4544 at 128)
    (3, 32, 64, -1, True, False),
    (4, 32, 80, 32, False, True),  # (int4, ours 16)
    (4, 32, 192, 128, False, False),  # (Falcon-7B's 4544 at 128 scaled down: ours 64)
    (4, 32, 192, 128, True, True),
    (4, 32, 72, 16, False, False),  # (a last group of 8: read dequantized)
    (8, 32, 80, 32, False, True),
    (8, 32, 64, -1, False, False),
    (8, 32, 64, 32, True, False),
    (8, 32, 80, -1, True, True),  # (kept int8)
    (8, 32, 96, 32, True, False),  # (kept int8 with group scales: ours 32)
    (8, 64, 96, 64, True, False),  # (a last group of 32: ours 32)
    (8, 32, 80, 32, True, False),  # (a last group of 16: ours 16)
    (8, 32, 72, 32, True, False),  # (a last group of 8: no int8 group size fits, read dequantized)
    (8, 32, 96, 32, True, True),  # (act-order groups: read dequantized)
]


@pytest.mark.parametrize("v1", [True, False], ids=["v1", "v2"])
@pytest.mark.parametrize("bits, N, K, group, sym, act_order", CASES)
def test_the_loader_reads_gptq_layers_as_an_independent_reading_of_the_format_does(bits, N, K, group, sym, act_order,
                                                                                    v1):
    """Packed by this file's packer and by test_hf_quantized's (AutoGPTQ's loop): both packings the same words, the
    reference reads back W, and the loader's matrix, on its path for these bits and groups, is W exactly."""
    q, z, s, g_idx, W = codes(N, K, group, bits, sym, act_order)
    ours = ref_gptq(q, z, s, g_idx, bits, v1)
    assert torch.equal(ref_dequantize(ours, bits, v1), W)  # (the reading is self-consistent)
    spec = spec_of(bits, group, sym, v1, act_order)
    if K % 32 == 0:  # (AutoGPTQ's loop, as its buffers, packs 32 inputs a word group only)
        theirs = pack_gptq_bits(q, z, s, g_idx, bits, v1)
        for part in (".qweight", ".qzeros"):
            assert torch.equal(theirs[part], ours[part]), part
    assert torch.equal(loaded(ours, spec), W)


def test_a_v1_zero_of_0_is_read_as_gptqmodels_word_add_reads_it_not_per_field():
    """At 2, 4 and 8 bits GPTQModel's v1 writer borrows: a zero of 0 stores 2^bits - 1 and its word's next field
    one less. Added back as a word, every zero is exact; read field by field (+1 each, masked) the next field would
    be one short. Checked on the stored word itself: zeros 0 and 5 at 4 bits are 0x...3F."""
    q, z, s, g_idx, W = codes(8, 32, -1, 4, False, False)
    z[:2, 0] = torch.tensor([0, 5])
    t = ref_gptq(q, z, s, g_idx, 4, v1=True)
    assert int(t[".qzeros"][0, 0]) & 0xFF == 0x3F  # (5 - 1 - 1 borrowed: 3; 0 - 1: 15)
    W = s[:, g_idx] * (q - z[:, g_idx])
    assert torch.equal(loaded(t, spec_of(4, -1, False, True)), W)


def test_an_8bit_symmetric_layer_is_kept_int8_as_w_equals_s_times_q_less_128():
    """Int8Linear's W = qweight * scale, a scale a row: the file's q - 128 and s, at v1 (zeros stored 127, words
    0x7F7F7F7F) and v2 (128); and one output's zero off 128 so that q - z leaves int8 is refused by name."""
    q, z, s, g_idx, W = codes(32, 64, -1, 8, True, False)
    for v1 in (True, False):
        t = ref_gptq(q, z, s, g_idx, 8, v1)
        assert int(t[".qzeros"][0, 0]) == (0x7F7F7F7F if v1 else 0x80808080 - 2 ** 32)
        sd, packed, _ = int4_linears({BASE + k: v.clone() for k, v in t.items()}, spec_of(8, -1, True, v1), "f")
        assert torch.equal(packed[BASE][0], (q - 128).to(torch.int8))
        assert torch.equal(packed[BASE][1].double(), s[:, 0])
    z[5, 0], q[5, 0] = 100, 255  # (q - 100 reaches 155)
    with pytest.raises(UserError, match=r"down_proj's 8-bit levels less their zeros run -128\.\.155, outside int8"):
        int4_linears({BASE + k: v for k, v in ref_gptq(q, z, s, g_idx, 8, False).items()},
                     spec_of(8, -1, True, False), "f")


def test_a_kept_int8_gptq_layer_runs_its_matrix_on_the_triton_path():
    """The Triton int8 kernel (the interpreter here) on a layer read from an 8-bit GPTQ file: x @ W^T of the
    reference's W."""
    q, z, s, g_idx, W = codes(32, 64, -1, 8, True, False, seed=3)
    _, packed, _ = int4_linears({BASE + k: v for k, v in ref_gptq(q, z, s, g_idx, 8, True).items()},
                                spec_of(8, -1, True, True), "f")
    m = Int8Linear(64, 32, bias=False)
    m.qweight.copy_(packed[BASE][0])
    m.scale.copy_(packed[BASE][1])
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(4))
    want = (x.double() @ W.T).float()
    for triton in (False, True):
        m.use_triton = triton
        with torch.no_grad():
            got = m(x)
        assert (got - want).abs().max().item() < 1e-5 * want.abs().max().item(), triton


def ref_folder(tmp_path, family, q, act_order=False):
    """A tiny folder of `family` whose linears are random codes of q's bits and groups packed by ref_gptq, and the
    float model of the matrices the reference reads from them (ref_dequantize)."""
    from tritongpt.train.falcon_weights import export_falcon
    from tritongpt.train.gemma_weights import export_gemma
    from tritongpt.train.neox_weights import export_neox
    from tritongpt.train.phi3_weights import export_phi3

    base, export = {"llama": (LLAMA, export_llama), "gemma": (GEMMA, export_gemma), "phi3": (PHI3, export_phi3),
                    "neox": (NEOX, export_neox), "falcon": (FALCON, export_falcon)}[family]
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=V, context_length=T, n_layer=1, n_head=4, n_embd=64, **base)).eval()
    folder = tmp_path / family
    export(model, folder)
    sd = load_file(folder / "model.safetensors")
    v1, bits, dequantized = q["checkpoint_format"] == "gptq", q["bits"], {}
    for i, k in enumerate(k for k in list(sd) if k.endswith(LINEARS)):
        N, K = sd.pop(k).shape
        t = ref_gptq(*codes(N, K, q["group_size"], bits, q["sym"], act_order, seed=i)[:4], bits, v1)
        sd.update({k.removesuffix(".weight") + part: v for part, v in t.items()})
        dequantized[k] = ref_dequantize(t, bits, v1).float().contiguous()
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    with_quantization(folder, q)
    return folder, load_checkpoint(exported_with(tmp_path / "float", folder, dequantized))


@pytest.mark.parametrize("family", ["llama", "gemma", "phi3", "neox", "falcon"])
@pytest.mark.parametrize("bits", [3, 8])
def test_each_reader_loads_a_3_or_8bit_gptq_folder_as_the_reference_reads_it(tmp_path, family, bits):
    """Every reader that takes GPTQ (its fused linears split by outputs where it has them): 3-bit v1 asymmetric with
    act-order, dequantized to float; 8-bit v1 symmetric of one group a row, kept int8 (both kernel paths)."""
    q = {"quant_method": "gptq", "bits": bits, "group_size": 32 if bits == 3 else -1, "sym": bits == 8,
         "desc_act": bits == 3, "checkpoint_format": "gptq"}
    folder, want = ref_folder(tmp_path, family, q, act_order=bits == 3)
    model = load_checkpoint(folder, quantized_ok=True)
    assert getattr(model, "quantized", None) == ("int8" if bits == 8 else None)
    same_logits(model, want, ("reference", "triton") if bits == 8 else ("reference",))
