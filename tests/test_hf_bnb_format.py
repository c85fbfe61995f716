"""bitsandbytes' 4-bit format read a second time, independently of train/hf_quant.py's reader and of
test_hf_bnb.py's quantizer (the same hand wrote both, so a misreading shared by the two would pass there).

Written from bitsandbytes' own source, not from either of those:
- functional.py quantize_4bit: absmax float32 [ceil(n / blocksize)] of the row-major flattened [N, K] weight; packed
  uint8 [(n + 1) // 2, 1]; get_4bit_type's code (the data list over its abs max) as quant_map. compress_statistics:
  offset = absmax.mean(), quantize_blockwise(absmax - offset, blocksize=256) with create_dynamic_map() (signed).
- QuantState.as_dict(packed=True): the tensors, and quant_state.bitsandbytes__<type> the JSON of quant_type,
  blocksize, dtype (str(dtype).strip("torch.")), shape and, nested, nested_blocksize, nested_dtype, nested_offset.
- backends/default/ops.py quantize_4bit: A * (1 / absmax) clamped to [-1, 1], argmin to the code, padded to even
  length, packed[::2] << 4 | packed[1::2] (element 2i in the high nibble).
- csrc kernels.cu kDequantizeBlockwise: vals[2j] from qvals[j] >> 4, vals[2j + 1] from qvals[j] & 15, each
  lut[code] * absmax in fp32, stored as the output dtype T (one rounding); FP4 there is a sign bit (0b1000) and a
  3-bit magnitude table (fp4_dequantization_lut), NF4 a 16-entry table (nf4_dequantization_lut); the GPU kernels
  use those tables, not the file's quant_map.
- dequantize_4bit nested: dequantize_blockwise(absmax, state2) (code2[q] * nested_absmax in fp32, stored as
  nested_dtype), then absmax += offset (a float32 tensor, QuantState.from_dict)."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.gpt2_weights import load_checkpoint
from tritongpt.train.hf_quant import bnb_dequantized, bnb_spec
from tritongpt.train.llama_weights import export_llama

from test_hf_bnb import bnb4, bnb_folder
from test_hf_quantized import LINEARS, LLAMA, T, V, float_twin, with_quantization

pytestmark = pytest.mark.usefixtures("one_thread")

# kernels.cu's dequantization tables, as the CUDA kernel holds them (float literals)
NF4_LUT = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                        0.7229568362236023, 1.0])
FP4_MAGNITUDE_LUT = torch.tensor([0.0, 0.005208333333, 0.66666667, 1.0, 0.33333333, 0.5, 0.16666667, 0.25])


def get_4bit_type(kind):
    """functional.get_4bit_type: the quant_map bitsandbytes writes (its data list over the list's abs max)."""
    data = {"nf4": NF4_LUT.tolist(),
            "fp4": [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]}[kind]
    t = torch.tensor(data)
    return t / t.abs().max()


def create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8):
    """functional.create_dynamic_map, line for line."""
    data = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                             else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    assert additional_items == 0
    data += [0, 1.0]
    assert len(data) == 2 ** total_bits
    return torch.tensor(sorted(data), dtype=torch.float32)


def blockwise(x, blocksize, code):
    """default backend's quantize_blockwise / quantize_4bit core: (absmax float32 per block, nearest code index)."""
    n = x.numel()
    blocks = -(-n // blocksize)
    flat = x.reshape(-1).float()
    absmax = torch.nn.functional.pad(flat.abs(), (0, blocks * blocksize - n)).view(blocks, blocksize).amax(1)
    scaled = torch.clamp(flat * (1 / absmax).repeat_interleave(blocksize)[:n], -1, 1)
    return absmax, (scaled[:, None] - code[None, :]).abs().argmin(1)


def bnb_quantize_4bit(A, kind, blocksize=64, nested=False):
    """Params4bit's state-dict parts ({suffix: tensor}) of weight A [N, K] (its dtype the quant_state's)."""
    code = get_4bit_type(kind)
    absmax, q = blockwise(A, blocksize, code)
    if q.numel() % 2:
        q = torch.cat([q, code.abs().argmin().reshape(1)])  # (padded with 0.0's code)
    packed = (q[::2] << 4 | q[1::2]).to(torch.uint8).reshape(-1, 1)
    state = {"quant_type": kind, "blocksize": blocksize, "dtype": str(A.dtype).strip("torch."),
             "shape": list(A.shape)}
    parts = {".weight": packed, ".weight.quant_map": code}
    if nested:
        offset = absmax.mean()
        code2 = create_dynamic_map()
        absmax2, q2 = blockwise(absmax - offset, 256, code2)
        parts.update({".weight.absmax": q2.to(torch.uint8), ".weight.nested_absmax": absmax2,
                      ".weight.nested_quant_map": code2})
        state.update(nested_blocksize=256, nested_dtype="float32", nested_offset=offset.item())
    else:
        parts[".weight.absmax"] = absmax
    parts[f".weight.quant_state.bitsandbytes__{kind}"] = torch.tensor(list(json.dumps(state).encode()),
                                                                      dtype=torch.uint8)
    return parts


def reference_dequantize_4bit(parts):
    """The matrix bitsandbytes' dequantize_4bit gives for Params4bit's parts ({suffix: tensor}), as float32 (of the
    quant_state dtype's values), element by element index arithmetic rather than the reader's reshapes."""
    (key,) = [k for k in parts if ".quant_state.bitsandbytes__" in k]
    st = json.loads(bytes(parts[key].tolist()).decode("utf-8"))
    N, K = st["shape"]
    i = torch.arange(N * K)
    byte = parts[".weight"].reshape(-1).long()[i // 2]
    nibble = (byte >> (4 * (1 - i % 2))) & 0xF  # element 2j: the high nibble
    if st["quant_type"] == "fp4":
        vals = FP4_MAGNITUDE_LUT[nibble & 0b111] * (1 - 2 * (nibble >> 3))
    else:
        vals = NF4_LUT[nibble]
    absmax = parts[".weight.absmax"]
    if "nested_offset" in st:
        j = torch.arange(absmax.numel())
        absmax = parts[".weight.nested_quant_map"][absmax.long()] * \
            parts[".weight.nested_absmax"][j // st["nested_blocksize"]]
        absmax = absmax.to(getattr(torch, st["nested_dtype"]))
        absmax = absmax.float() + torch.tensor(float(st["nested_offset"]))
    out = (vals * absmax[i // st["blocksize"]]).to(getattr(torch, st["dtype"]))
    return out.float().reshape(N, K)


def split(sd):
    """{base: {suffix: tensor}} of a file's 4-bit linears."""
    bases = {k.partition(".weight.quant_state.")[0] for k in sd if ".weight.quant_state.bitsandbytes__" in k}
    return {b: {k.removeprefix(b): t for k, t in sd.items() if k.startswith(b + ".weight")} for b in bases}


@pytest.mark.parametrize("kind", ["nf4-llama", "nf4-double-qwen3", "fp4-double-ragged-gpt_neox"])
def test_the_4bit_reader_agrees_with_an_independent_reading_on_test_hf_bnbs_folders(tmp_path, kind):
    """Folders of test_hf_bnb.py's writer: the reader's matrix of each linear is bitsandbytes' own, bit for bit."""
    folder, _ = bnb_folder(tmp_path, kind)
    sd = load_file(folder / "model.safetensors")
    linears, table = split(sd), get_4bit_type(kind[:3])
    assert linears
    for base, parts in linears.items():
        # (the writer's tables are bitsandbytes' own: its folders are ones bitsandbytes could have written)
        assert torch.equal(parts[".weight.quant_map"], table)
        if ".weight.nested_quant_map" in parts:
            assert torch.equal(parts[".weight.nested_quant_map"], create_dynamic_map())
        b = base.removeprefix("model.").removeprefix("gpt_neox.")
        got = bnb_dequantized({b + k: t for k, t in parts.items()}, bnb_spec(bnb4()), "f")[b + ".weight"]
        want = reference_dequantize_4bit(parts)
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=base)


@pytest.mark.parametrize("kind, nested, dtype", [("nf4", True, torch.bfloat16), ("fp4", True, torch.float16),
                                                  ("nf4", False, torch.float16), ("fp4", False, torch.bfloat16)])
def test_a_folder_quantized_by_bitsandbytes_rules_loads_as_the_float_model_bitsandbytes_dequantizes(
        tmp_path, kind, nested, dtype):
    """bitsandbytes' layouts (blocks of 64, nested blocks of 256: the MLP's 320 blocks two of them, the last short),
    a quant_state dtype of 16 bits: the loaded model's weights equal the reference's dequantized ones exactly (each
    rounded once to that dtype), and everything else the file's float tensors."""
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=V, context_length=T, n_layer=1, n_head=4, n_embd=64,
                               **{**LLAMA, "mlp_hidden": 320}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    export_llama(model, tmp_path / "q")
    sd = load_file(tmp_path / "q" / "model.safetensors")
    float_sd = dict(sd)
    for k in [k for k in sd if k.endswith(LINEARS)]:
        parts = bnb_quantize_4bit(sd.pop(k).to(dtype), kind, 64, nested)
        float_sd[k] = reference_dequantize_4bit(parts)
        sd.update({k.removesuffix(".weight") + p: t for p, t in parts.items()})
    assert sd["model.layers.0.mlp.up_proj.weight.absmax"].shape == (320,)
    if nested:
        assert sd["model.layers.0.mlp.up_proj.weight.nested_absmax"].shape == (2,)
    save_file(sd, tmp_path / "q" / "model.safetensors", metadata={"format": "pt"})
    with_quantization(tmp_path / "q", bnb4(kind, nested))
    float_twin(tmp_path / "f", tmp_path / "q", float_sd)
    got, want = load_checkpoint(tmp_path / "q").state_dict(), load_checkpoint(tmp_path / "f").state_dict()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("shape, nested", [((5, 7), False), ((5, 7), True), ((3, 5477), True)])
def test_an_odd_count_and_several_nested_blocks_read_as_bitsandbytes_does(shape, nested):
    """An odd N * K (the last byte's low nibble padding), blocks of 64 with a short last one, and 257 blocks in two
    nested blocks of 256 (the second of one): read element for element as the reference reads them."""
    torch.manual_seed(1)
    for kind in ("nf4", "fp4"):
        parts = bnb_quantize_4bit(torch.randn(shape), kind, 64, nested)
        assert parts[".weight"].shape == ((shape[0] * shape[1] + 1) // 2, 1)
        b = "layers.0.mlp.odd"
        got = bnb_dequantized({b + k: t for k, t in parts.items()}, bnb_spec(bnb4(kind)), "f")[b + ".weight"]
        torch.testing.assert_close(got, reference_dequantize_4bit(parts), rtol=0, atol=0)
