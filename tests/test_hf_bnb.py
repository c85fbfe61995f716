"""bitsandbytes folders from Hugging Face (transformers' load_in_8bit / load_in_4bit): 8-bit LLM.int8 kept as
Int8Linear, 4-bit NF4 / FP4 (with and without double quant) dequantized to a float model (train/hf_quant.py), and
what is not read refused by name. Tiny folders quantized here by bitsandbytes' rules, written independently of our
reader: nothing downloaded, bitsandbytes not needed. (No differential half against transformers: its
dequantize_bnb_weight calls bitsandbytes' own functions, which are not installed here.)"""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.train.gpt2_weights import load_checkpoint

from test_hf_quantized import (LINEARS, V, as_multimodal_gemma3, edit_tensors, exported_model, float_twin,
                               moe_folder, with_quantization)

pytestmark = pytest.mark.usefixtures("one_thread")

# bitsandbytes' get_4bit_type tables (functional.py), copied as the quantizer's own
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0])
FP4 = torch.tensor([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0,
                    -3.0]) / 12


def dynamic_map():
    """bitsandbytes' create_dynamic_map(signed=True): the 256 levels its quantize_blockwise (double quant) uses."""
    data = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2 ** i + 1)
        means = ((bounds[:-1] + bounds[1:]) / 2.0 * 10 ** (-6 + i)).tolist()
        data += means + [-m for m in means]
    data += [0.0, 1.0]
    return torch.tensor(sorted(data))


def nearest(x, table):
    return (x[:, None] - table[None, :]).abs().argmin(dim=1)


def quantize_4bit(w, kind="nf4", blocksize=64, nested=None):
    """bitsandbytes' quantize_4bit of w, as Params4bit saves it ({suffix: tensor}), and the float32 matrix it stands
    for, dequantized block by block here. nested: double quant's blocksize (absmax less its mean, 8-bit blocks)."""
    table = NF4 if kind == "nf4" else FP4
    N, K = w.shape
    flat = w.float().reshape(-1)
    n, nb = flat.numel(), -(-flat.numel() // blocksize)
    absmax, codes = torch.empty(nb), torch.empty(n, dtype=torch.long)
    for i in range(nb):
        block = flat[i * blocksize:(i + 1) * blocksize]
        absmax[i] = block.abs().max()
        codes[i * blocksize:(i + 1) * blocksize] = nearest(block / absmax[i], table)
    pairs = torch.cat([codes, codes.new_zeros(n % 2)]).reshape(-1, 2)
    out = {".weight": (pairs[:, 0] << 4 | pairs[:, 1]).to(torch.uint8).reshape(-1, 1),
           ".weight.quant_map": table.clone()}
    state = {"quant_type": kind, "blocksize": blocksize, "dtype": "float32", "shape": [N, K]}
    scale = absmax
    if nested:
        code2 = dynamic_map()
        offset = absmax.mean()
        rest = absmax - offset
        nn_ = -(-nb // nested)
        nested_absmax, qabs = torch.empty(nn_), torch.empty(nb, dtype=torch.long)
        scale = torch.empty(nb)
        for j in range(nn_):
            part = rest[j * nested:(j + 1) * nested]
            nested_absmax[j] = part.abs().max()
            qabs[j * nested:(j + 1) * nested] = nearest(part / nested_absmax[j], code2)
            scale[j * nested:(j + 1) * nested] = code2[qabs[j * nested:(j + 1) * nested]] * nested_absmax[j] + offset
        out.update({".weight.absmax": qabs.to(torch.uint8), ".weight.nested_absmax": nested_absmax,
                    ".weight.nested_quant_map": code2})
        state.update(nested_blocksize=nested, nested_dtype="float32", nested_offset=offset.item())
    else:
        out[".weight.absmax"] = absmax
    deq = torch.empty(n)
    for i in range(nb):
        deq[i * blocksize:(i + 1) * blocksize] = table[codes[i * blocksize:(i + 1) * blocksize]] * scale[i]
    out[f".weight.quant_state.bitsandbytes__{kind}"] = json_bytes(state)
    return out, deq.reshape(N, K)


def json_bytes(d):
    return torch.tensor(list(json.dumps(d).encode("utf-8")), dtype=torch.uint8)


def quantize_8bit(w):
    """bitsandbytes' int8_vectorwise_quant of w as Linear8bitLt saves it (weight int8, SCB each row's absmax,
    weight_format 0: "row"), and the matrix it stands for, W = weight * SCB / 127 (rounded once)."""
    scb = w.float().abs().amax(dim=1)
    q = torch.round(w.float() * (127 / scb[:, None])).to(torch.int8)
    return ({".weight": q, ".SCB": scb, ".weight_format": torch.tensor(0, dtype=torch.uint8)},
            (q.double() * scb.double()[:, None] / 127).float())


def bnb4(kind="nf4", nested=False, **extra):
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False, "bnb_4bit_quant_type": kind,
            "bnb_4bit_use_double_quant": nested, "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage":
            "uint8", "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0, **extra}


BNB8 = {"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False, "llm_int8_threshold": 6.0,
        "llm_int8_skip_modules": None, "llm_int8_has_fp16_weight": False}

KINDS = {  # name: (family config, quantization_config, quantizer of one weight)
    "nf4-llama": ({}, bnb4("nf4"), lambda w: quantize_4bit(w, "nf4")),
    # double quant in several nested blocks (of 16: bitsandbytes' own 256 would be one block of these tiny layers)
    "nf4-double-qwen3": ({"qk_norm": True}, bnb4("nf4", True), lambda w: quantize_4bit(w, "nf4", 64, nested=16)),
    # blocks of 48: the last of each matrix ragged; GPT-NeoX's fused query_key_value dequantized before its split
    "fp4-double-ragged-gpt_neox": ({"family": "neox"}, bnb4("fp4", True),
                                   lambda w: quantize_4bit(w, "fp4", 48, nested=256)),
    "int8-llama": ({}, BNB8, quantize_8bit),
    # Falcon's fused query_key_value kept int8, split by its rows (int4_rows)
    "int8-falcon": ({"family": "falcon", "n_kv_head": 2, "bias": False}, {"load_in_8bit": True}, quantize_8bit),
    # Phi-3's fused qkv_proj and gate_up_proj: dequantized before their split (4-bit), kept int8 and split by rows
    "nf4-phi3": ({"family": "phi3"}, bnb4("nf4"), lambda w: quantize_4bit(w, "nf4")),
    "int8-phi3": ({"family": "phi3"}, BNB8, quantize_8bit),
    # Gemma (text): GeGLU, tied head, scaled embeddings around the same linears
    "nf4-gemma": ({"family": "gemma"}, bnb4("nf4"), lambda w: quantize_4bit(w, "nf4")),
    "int8-gemma": ({"family": "gemma"}, BNB8, quantize_8bit),
}


def bnb_folder(tmp_path, kind, seed=0, keep_float=()):
    """A tiny folder of `kind`, its blocks' linears quantized by bitsandbytes' rules (those whose name ends with one of
    keep_float left float), and the float model of the matrices it stands for."""
    extra, q, quantize = KINDS[kind]
    model, folder = exported_model(tmp_path / kind, extra, seed)
    sd = load_file(folder / "model.safetensors")
    float_sd, dequantized = dict(sd), {}
    for k in [k for k in sd if k.endswith(LINEARS) and not k.removesuffix(".weight").endswith(keep_float)]:
        parts, dequantized[k] = quantize(sd.pop(k))
        sd.update({k.removesuffix(".weight") + part: t for part, t in parts.items()})
    assert dequantized
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    with_quantization(folder, q)
    return folder, load_checkpoint(float_twin(tmp_path / "float", folder, {**float_sd, **dequantized}))


def logits_err(model, want):
    idx = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = want(idx)
        return (model(idx) - expected).abs().max().item() / expected.abs().max().item()


@pytest.mark.parametrize("kind", [k for k in KINDS if not k.startswith("int8")])
def test_a_4bit_folder_loads_as_the_float_model_of_its_dequantized_weights(tmp_path, kind, capsys):
    folder, want = bnb_folder(tmp_path, kind)
    model = load_checkpoint(folder)  # (an ordinary float model: no quantized_ok needed)
    assert not getattr(model, "quantized", None)
    assert {type(m) for m in model.trf_blocks.modules() if "Linear" in type(m).__name__} == {torch.nn.Linear}
    assert json.loads((folder / "config.json").read_text())["model_type"] in kind or "llama" in kind
    assert model.config == GPTConfig(**{**want.config.to_dict(), "kernels": model.config.kernels})
    assert logits_err(model, want) < 1e-5
    err = capsys.readouterr().err
    assert "bitsandbytes 4-bit linear weights are dequantized to float at load" in err
    # the folder's codes themselves (not float weights the test would pass on)
    assert all(t.dtype == torch.uint8 for k, t in load_file(folder / "model.safetensors").items()
               if k.endswith(LINEARS))


# an 8-bit kind: its file's linear, our layer that holds it (ff's attribute) and the rows of the file's it holds
# (Phi-3's gate_up_proj: gate rows first, then up)
KEPT = {"int8-llama": ("model.layers.0.mlp.down_proj", "w_down", slice(None)),
        "int8-falcon": ("transformer.h.0.mlp.dense_4h_to_h", "fc2", slice(None)),
        "int8-phi3": ("model.layers.0.mlp.gate_up_proj", "w_up", slice(128, None)),
        "int8-gemma": ("model.layers.0.mlp.down_proj", "w_down", slice(None))}


@pytest.mark.parametrize("kind", KEPT)
def test_an_8bit_folder_loads_kept_int8_with_the_dequantized_models_logits_on_both_paths(tmp_path, kind):
    folder, want = bnb_folder(tmp_path, kind)
    model = load_checkpoint(folder, quantized_ok=True)
    assert model.quantized == "int8" and not model.quantized_head
    assert {type(m).__name__ for m in model.trf_blocks.modules() if "Linear" in type(m).__name__} == {"Int8Linear"}
    assert model.config == GPTConfig(**{**want.config.to_dict(), "kernels": model.config.kernels})
    # the file's int8 weight kept as it is, its scale SCB / 127
    sd = load_file(folder / "model.safetensors")
    name, attr, rows = KEPT[kind]
    layer = getattr(model.trf_blocks[0].ff, attr)
    assert torch.equal(layer.qweight, sd[name + ".weight"][rows])
    torch.testing.assert_close(layer.scale, sd[name + ".SCB"][rows] / 127, rtol=0, atol=0)
    for kernels in ("reference", "triton"):
        model.set_kernels(kernels)
        assert logits_err(model, want) < 1e-5, kernels


def test_an_8bit_folder_with_a_blocks_linear_left_float_loads_dequantized_and_skip_modules_are_float(tmp_path, capsys):
    """llm_int8_skip_modules: those linears float in the file; one of the blocks' among int8 ones (this model's int8
    layers are all of the blocks' or none): the whole model read as the float model of the same weights, said."""
    folder, want = bnb_folder(tmp_path, "int8-llama", keep_float=("down_proj",))
    model = load_checkpoint(with_quantization(folder, {**BNB8, "llm_int8_skip_modules": ["lm_head", "down_proj"]}))
    assert not getattr(model, "quantized", None)
    assert logits_err(model, want) < 1e-5
    assert "bitsandbytes 8-bit linear weights are dequantized to float at load (layers.0.mlp.down_proj" in \
        capsys.readouterr().err
    with_quantization(folder, {**BNB8, "llm_int8_skip_modules": ["lm_head", "down_proj", "up_proj"]})
    with pytest.raises(UserError, match=r"layers\.0\.mlp\.up_proj is quantized by bitsandbytes, but the "
                                        r"quantization_config leaves it float \(llm_int8_skip_modules\)"):
        load_checkpoint(folder)


@pytest.mark.parametrize("change, said", [
    (bnb4(bnb_4bit_quant_storage="bfloat16"), r"quant_method 'bitsandbytes' .*is not read here \("
                                              r"bnb_4bit_quant_storage 'bfloat16': 4-bit codes stored as uint8 only"),
    (bnb4("int4"), r"bnb_4bit_quant_type 'int4': 'nf4' or 'fp4' only"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": True},
     r"load_in_4bit True and load_in_8bit True: exactly one of them true"),
    ({**BNB8, "llm_int8_skip_modules": "lm_head"}, r"llm_int8_skip_modules 'lm_head': a list of module names"),
    (BNB8, r"layers\.0\.mlp\.down_proj is a bitsandbytes 4-bit linear, where the config says 8-bit"),
])
def test_what_a_bitsandbytes_config_says_and_is_not_read_is_refused_by_name(tmp_path, change, said):
    folder, _ = bnb_folder(tmp_path, "nf4-llama")
    with pytest.raises(UserError, match=said):
        load_checkpoint(with_quantization(folder, change))


def test_a_quantized_head_and_a_float_folder_saying_bitsandbytes_are_refused_by_name(tmp_path):
    folder, _ = bnb_folder(tmp_path, "nf4-llama")

    def quantized_head(sd):
        parts, _ = quantize_4bit(sd.pop("lm_head.weight"))
        sd.update({"lm_head" + p: t for p, t in parts.items()})

    with pytest.raises(UserError, match=r"lm_head is quantized by bitsandbytes, where this model keeps all but the "
                                        r"blocks' linear layers float"):
        load_checkpoint(edit_tensors(folder, quantized_head))
    float_folder = with_quantization(tmp_path / "float", BNB8)
    with pytest.raises(UserError, match=r"config\.json says bitsandbytes 8-bit quantization, but no tensor is a "
                                        r"quantized linear's \(SCB\)"):
        load_checkpoint(float_folder)


Q = "model.layers.0.self_attn.q_proj"


def set_state(**change):
    def edit(sd):
        d = json.loads(bytes(sd[Q + ".weight.quant_state.bitsandbytes__nf4"].tolist()))
        sd[Q + ".weight.quant_state.bitsandbytes__nf4"] = json_bytes({**d, **change})
    return edit


def set_tensor(name, value):
    def edit(sd):
        sd[name] = value
    return edit


@pytest.mark.parametrize("kind, edit, said", [
    ("nf4-llama", set_tensor(Q + ".weight.quant_state.bitsandbytes__nf4", torch.tensor(list(b"{not json"),
                                                                                       dtype=torch.uint8)),
     r"tensor layers\.0\.self_attn\.q_proj\.weight\.quant_state\.bitsandbytes__nf4 is not bitsandbytes' "
     r"quant_state JSON \(unreadable"),
    ("nf4-llama", set_state(quant_type="fp4"), r"bitsandbytes__nf4 is not bitsandbytes' quant_state JSON "
                                               r"\(quant_type 'fp4', where its name says 'nf4'\)"),
    ("nf4-llama", set_state(blocksize=0), r"quant_state JSON \(blocksize 0: a positive integer\)"),
    ("nf4-llama", set_state(shape=[64]), r"quant_state JSON \(shape \[64\]: a linear's \[out, in\]\)"),
    ("nf4-llama", set_state(shape=[32, 64]),
     r"tensor layers\.0\.self_attn\.q_proj\.weight is uint8 \(2048, 1\), where nf4 of a 32x64 weight in blocks of "
     r"64 has its codes, two a byte: uint8 \(1024, 1\)"),
    ("nf4-llama", set_tensor(Q + ".weight.absmax", torch.ones(63)),
     r"tensor layers\.0\.self_attn\.q_proj\.weight\.absmax is float32 \(63,\), where nf4 of a 64x64 weight in "
     r"blocks of 64 has its blocks' absmax: float32 \(64,\)"),
    ("nf4-llama", set_tensor(Q + ".weight.quant_map", FP4.clone()),
     r"tensor layers\.0\.self_attn\.q_proj\.weight\.quant_map is not bitsandbytes' nf4 code table"),
    ("nf4-double-qwen3", set_tensor(Q + ".weight.nested_absmax", torch.ones(3)),
     r"weight\.nested_absmax is float32 \(3,\), where nf4 of a 64x64 weight in blocks of 64 has in nested blocks "
     r"of 16 the absmax: float32 \(4,\)"),
    ("int8-llama", set_tensor(Q + ".SCB", torch.ones(32)),
     r"tensor layers\.0\.self_attn\.q_proj\.SCB is float32 \(32,\), where the 8-bit weight \(64, 64\) has one float "
     r"absmax a row: \(64,\)"),
    ("int8-llama", set_tensor(Q + ".weight_format", torch.tensor(2, dtype=torch.uint8)),
     r"tensor layers\.0\.self_attn\.q_proj\.weight_format is \[2\], not 0: its weight is in a GPU tile layout"),
    ("int8-llama", set_tensor(Q + ".SCB", -torch.ones(64)), r"q_proj\.SCB holds an absmax below 0"),
])
def test_a_malformed_bitsandbytes_tensor_is_refused_naming_it(tmp_path, kind, edit, said):
    folder, _ = bnb_folder(tmp_path, kind)
    with pytest.raises(UserError, match=said):
        load_checkpoint(edit_tensors(folder, edit), quantized_ok=True)


def test_a_part_without_its_linear_and_a_missing_part_are_refused_by_name(tmp_path):
    folder, _ = bnb_folder(tmp_path, "nf4-double-qwen3")

    def orphan(sd):
        sd["model.layers.0.mlp.extra.weight.absmax"] = torch.ones(4)

    with pytest.raises(UserError, match=r"tensor 'layers\.0\.mlp\.extra\.weight\.absmax' is part of no bitsandbytes "
                                        r"4-bit linear"):
        load_checkpoint(edit_tensors(folder, orphan))
    folder, _ = bnb_folder(tmp_path / "b", "nf4-double-qwen3")
    with pytest.raises(UserError, match=r"missing tensor 'layers\.0\.self_attn\.q_proj\.weight\.nested_quant_map'"):
        load_checkpoint(edit_tensors(folder, lambda sd: sd.pop(Q + ".weight.nested_quant_map")))


@pytest.mark.parametrize("q", [bnb4("nf4"), BNB8])
def test_a_bitsandbytes_moe_folder_is_refused_by_name(tmp_path, q):
    with pytest.raises(UserError, match=r"quant_method 'bitsandbytes' .* is not read here \(a quantized Mixtral: this "
                                        r"model's mixture-of-experts layer keeps its experts float"):
        load_checkpoint(with_quantization(moe_folder(tmp_path), q), quantized_ok=True)


GEMMA3_TEXT = {"family": "gemma", "post_norms": True, "qk_norm": True, "attention_window": 5, "window_layers": "0",
               "rope_theta": 1e6, "rope_local_theta": 1e4}


@pytest.mark.parametrize("bits, quantize", [(4, lambda w: quantize_4bit(w, "nf4")), (8, quantize_8bit)])
def test_a_multimodal_gemma3s_skip_modules_are_matched_by_its_full_names(tmp_path, monkeypatch, bits, quantize):
    """llm_int8_skip_modules naming a multimodal folder's language model in full (model.language_model. in
    transformers 5, language_model.model. in older saves): matched against the reader's shortened names too, so a
    quantized up_proj it leaves float is refused (it was read without a word), as for a text-only folder."""
    q = {**(bnb4() if bits == 4 else BNB8),
         "llm_int8_skip_modules": ["lm_head", "language_model.model.layers.0.mlp.up_proj"]}
    monkeypatch.setitem(KINDS, "gemma3_text", (GEMMA3_TEXT, q, quantize))
    folder, _ = bnb_folder(tmp_path, "gemma3_text")
    as_multimodal_gemma3(folder)
    with pytest.raises(UserError, match=r"layers\.0\.mlp\.up_proj is quantized by bitsandbytes, but the "
                                        r"quantization_config leaves it float \(llm_int8_skip_modules\)"):
        load_checkpoint(folder)
