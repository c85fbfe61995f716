"""FP8 folders from Hugging Face (transformers' fp8 block scales and fbgemm_fp8 row scales, compressed-tensors'
float-quantized tensor / channel / block scales) load as the float model of their dequantized weights
(train/hf_quant.py fp8_dequantized), and what is not read is refused by name. Tiny folders exported here and
quantized in the test by each format's rule: nothing downloaded."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.gpt2_weights import load_checkpoint
from tritongpt.train.llama_weights import export_llama

from test_hf_quantized import (FALCON, GEMMA, LINEARS, LLAMA, NEOX, PHI3, T, V, as_multimodal_gemma3, edit_tensors,
                               exported_model, float_twin, moe_folder, with_quantization)

pytestmark = pytest.mark.usefixtures("one_thread")

FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


# -- each format's quantizer, written from its own code (not from our reader) ------------------------------------
# - fp8 (transformers' integrations/finegrained_fp8.py Fp8Quantize): per block of weight_block_size [bn, bk] (output
#   rows, input columns), scale = 448 / max|w|, q = clamp(w * scale).to(float8_e4m3fn), weight_scale_inv = 1 / scale
#   [ceil(N / bn), ceil(K / bk)]; the last blocks here ragged (FP8Linear sizes its scales by ceil division).
# - fbgemm_fp8 (fbgemm's quantize_fp8_per_row): per output row, weight_scale [N, 1] = max|w| / 448, q = w / scale.
# - compressed-tensors float-quantized: weight_scale of the strategy's shape ("tensor" [1], "channel" [N, 1],
#   "block" as fp8's), q = w / scale; decompressed as q * scale.
def blocks(N, K, bn, bk):
    for i in range(0, N, bn):
        for j in range(0, K, bk):
            yield i // bn, j // bk, slice(i, i + bn), slice(j, j + bk)


def quantize_fp8(w, per, block=None):
    """(q float8_e4m3fn [N, K], scale as the format stores it, the float32 matrix q stands for), each block, row or
    the whole tensor scaled and dequantized in a loop of its own."""
    w = w.float()
    N, K = w.shape
    q, deq = torch.empty(N, K, dtype=torch.float8_e4m3fn), torch.empty(N, K)
    if per == "block":
        bn, bk = block
        scale = torch.empty(-(-N // bn), -(-K // bk))
        for bi, bj, rows, cols in blocks(N, K, bn, bk):
            scale[bi, bj] = w[rows, cols].abs().max() / FP8_MAX
            q[rows, cols] = (w[rows, cols] / scale[bi, bj]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            deq[rows, cols] = q[rows, cols].float() * scale[bi, bj]
    elif per in ("row", "channel"):
        scale = torch.empty(N, 1)
        for n in range(N):
            scale[n, 0] = w[n].abs().max() / FP8_MAX
            q[n] = (w[n] / scale[n, 0]).to(torch.float8_e4m3fn)
            deq[n] = q[n].float() * scale[n, 0]
    else:
        scale = (w.abs().max() / FP8_MAX).reshape(1)
        q = (w / scale).to(torch.float8_e4m3fn)
        deq = q.float() * scale
    return q, scale, deq


def compressed_tensors(strategy, block=None, **extra):
    weights = {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True, "dynamic": False}
    if block:
        weights["block_structure"] = block
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": {
                "num_bits": 8, "type": "float", "strategy": "token", "dynamic": True, "symmetric": True}}},
            "ignore": ["lm_head"], "kv_cache_scheme": None, "sparsity_config": {}, **extra}


KINDS = {  # name: (family config, quantization_config, (per, block), the scale's suffix)
    "fp8-llama": ({}, {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [16, 16],
                       "modules_to_not_convert": ["lm_head"]}, ("block", (16, 16)), ".weight_scale_inv"),
    # blocks that divide none of the layers' 32, 64 or 128 rows and columns: the last of each ragged
    "fp8-ragged-qwen3": ({"qk_norm": True}, {"quant_method": "fp8", "activation_scheme": "dynamic",
                                            "weight_block_size": [24, 40]}, ("block", (24, 40)), ".weight_scale_inv"),
    "fbgemm_fp8-gpt_neox": ({"family": "neox"}, {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
                                                 "modules_to_not_convert": ["embed_out"]}, ("row", None),
                            ".weight_scale"),
    "ct-channel-phi3": ({"family": "phi3"}, compressed_tensors("channel"), ("channel", None), ".weight_scale"),
    "ct-tensor-falcon": ({"family": "falcon", "n_kv_head": 2, "bias": False}, compressed_tensors("tensor"),
                         ("tensor", None), ".weight_scale"),
    "fp8-gemma": ({"family": "gemma"}, {"quant_method": "fp8", "weight_block_size": [32, 48]}, ("block", (32, 48)),
                  ".weight_scale_inv"),
    "fp8-gemma3_text": ({"family": "gemma", "post_norms": True, "qk_norm": True, "attention_window": 5,
                         "window_layers": "0", "rope_theta": 1e6, "rope_local_theta": 1e4},
                        {"quant_method": "fp8", "weight_block_size": [32, 48],
                         "modules_to_not_convert": ["vision_tower", "multi_modal_projector", "lm_head"]},
                        ("block", (32, 48)), ".weight_scale_inv"),
    "ct-block-qwen2": ({"qkv_bias_only": True}, compressed_tensors("block", [16, 48]), ("block", (16, 48)),
                       ".weight_scale"),
}


def fp8_folder(tmp_path, kind, seed=0, keep_float=()):
    """A tiny folder of `kind`, its blocks' linears quantized to FP8 by the rules above (those whose name ends with
    one of keep_float left float), and the float model of the matrices it stands for."""
    extra, q, (per, block), suffix = KINDS[kind]
    model, folder = exported_model(tmp_path / kind, extra, seed)
    sd = load_file(folder / "model.safetensors")
    dequantized = {}
    for k in [k for k in sd if k.endswith(LINEARS) and not k.removesuffix(".weight").endswith(keep_float)]:
        sd[k], sd[k.removesuffix(".weight") + suffix], dequantized[k] = quantize_fp8(sd[k], per, block)
    assert dequantized
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    with_quantization(folder, q)
    floats = {**{k: v for k, v in sd.items() if not k.endswith(suffix)}, **dequantized}
    return folder, load_checkpoint(float_twin(tmp_path / "float", folder, floats))


def assert_same_logits(model, want):
    idx = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = want(idx)
        got = model(idx)
    assert (got - expected).abs().max().item() < 1e-5 * expected.abs().max().item()


@pytest.mark.parametrize("kind", KINDS)
def test_an_fp8_folder_loads_as_the_float_model_of_its_dequantized_weights(tmp_path, kind, capsys):
    folder, want = fp8_folder(tmp_path, kind)
    model = load_checkpoint(folder)  # (an ordinary float model: no quantized_ok needed)
    assert not getattr(model, "quantized", None)
    assert {type(m) for m in model.trf_blocks.modules() if "Linear" in type(m).__name__} == {torch.nn.Linear}
    family = json.loads((folder / "config.json").read_text())["model_type"]
    assert kind.endswith(family) or family == "llama", family  # (the family the kind names is the one read)
    assert model.config == GPTConfig(**{**want.config.to_dict(), "kernels": model.config.kernels})
    assert_same_logits(model, want)
    err = capsys.readouterr().err
    assert err.count("FP8 linear weights") == 1 and "are dequantized to float at load" in err
    # the FP8 matrices themselves: not the float ones the folder was quantized from (the test would pass on those)
    quantized = load_file(folder / "model.safetensors")
    assert any(t.dtype == torch.float8_e4m3fn for t in quantized.values())


def test_modules_left_float_by_the_config_load_as_they_are_and_an_fp8_one_it_names_is_refused(tmp_path):
    """modules_to_not_convert (transformers': a name contained in the module's) and compressed-tensors' ignore ("re:"
    patterns matched from the start): those linears are float in the file, read as such beside the FP8 ones."""
    folder, want = fp8_folder(tmp_path, "fp8-llama", keep_float=("down_proj",))
    q = {**KINDS["fp8-llama"][1], "modules_to_not_convert": ["lm_head", "down_proj"]}
    assert_same_logits(load_checkpoint(with_quantization(folder, q)), want)
    with_quantization(folder, {**q, "modules_to_not_convert": ["lm_head", "up_proj"]})
    with pytest.raises(UserError, match=r"layers\.0\.mlp\.up_proj\.weight is FP8, but the quantization_config leaves "
                                        r"layers\.0\.mlp\.up_proj float"):
        load_checkpoint(folder)

    folder, want = fp8_folder(tmp_path / "ct", "ct-channel-phi3", keep_float=("o_proj",))
    q = {**KINDS["ct-channel-phi3"][1], "ignore": ["lm_head", "re:.*self_attn\\.o_proj$"]}
    assert_same_logits(load_checkpoint(with_quantization(folder, q)), want)
    with_quantization(folder, {**q, "ignore": ["lm_head", "re:.*qkv_proj"]})
    with pytest.raises(UserError, match=r"qkv_proj\.weight is FP8, but the quantization_config leaves"):
        load_checkpoint(folder)


@pytest.mark.parametrize("change, said", [
    ({"activation_scheme": "static"}, r"quant_method 'fp8' is not read here \(activation_scheme 'static': its "
                                      r"activations quantized with the fixed scales .* would give other outputs"),
    ({"weight_block_size": [16]}, r"weight_block_size \[16\]: two positive integers"),
    ({"scale_fmt": "e8m0"}, r"scale_fmt 'e8m0': 'float' or 'ue8m0' scales only"),  # (FineGrainedFP8Config's two)
    ({"modules_to_not_convert": "lm_head"}, r"modules_to_not_convert 'lm_head': a list of module names"),
    (compressed_tensors("channel", format="pack-quantized"), r"quant_method 'compressed-tensors' .*\(format "
                                                             r"'pack-quantized': FP8 'float-quantized' only"),
    (compressed_tensors("group"), r"weights strategy 'group': 'tensor', 'channel' or 'block' scales only"),
    (compressed_tensors("channel", kv_cache_scheme={"num_bits": 8, "type": "float", "strategy": "tensor"}),
     r"kv_cache_scheme .*: its keys and values quantized with the fixed scales"),
    (compressed_tensors("channel", ignore=["lm_head", "Qwen3MoeSparseMoeBlock"]),
     r"ignore names the class 'Qwen3MoeSparseMoeBlock'"),
])
def test_what_an_fp8_folder_says_and_is_not_read_is_refused_by_name(tmp_path, change, said):
    folder, _ = fp8_folder(tmp_path, "fp8-llama")
    q = change if "quant_method" in change else {**KINDS["fp8-llama"][1], **change}
    with pytest.raises(UserError, match=said):
        load_checkpoint(with_quantization(folder, q))


def test_ignored_layers_is_read_as_modules_to_not_convert_as_finegrainedfp8config_does(tmp_path):
    """MiniMax's ignored_layers: FineGrainedFP8Config's alias of modules_to_not_convert where that is missing or
    null (its __init__): an FP8 up_proj it names, which transformers would leave a float Linear, was read as FP8
    without a word."""
    folder, want = fp8_folder(tmp_path, "fp8-llama", keep_float=("down_proj",))
    q = {**KINDS["fp8-llama"][1], "modules_to_not_convert": None}
    assert_same_logits(load_checkpoint(with_quantization(folder, {**q, "ignored_layers": ["lm_head", "down_proj"]})),
                       want)
    with_quantization(folder, {**q, "ignored_layers": ["lm_head", "up_proj"]})
    with pytest.raises(UserError, match=r"up_proj\.weight is FP8, but the quantization_config leaves "
                                        r"layers\.0\.mlp\.up_proj float \(ignored_layers\)"):
        load_checkpoint(folder)
    # modules_to_not_convert given: ignored_layers unread, as transformers leaves it
    with_quantization(folder, {**q, "modules_to_not_convert": ["lm_head", "down_proj"], "ignored_layers": ["up_proj"]})
    assert_same_logits(load_checkpoint(folder), want)


def test_an_activation_scheme_in_capitals_reads_as_transformers_lowercases_it(tmp_path):
    folder, want = fp8_folder(tmp_path, "fp8-llama")  # (FineGrainedFP8Config.post_init: activation_scheme.lower())
    assert_same_logits(load_checkpoint(with_quantization(folder, {**KINDS["fp8-llama"][1],
                                                                  "activation_scheme": "Dynamic"})), want)


@pytest.mark.parametrize("weights", [{"type": "FLOAT", "strategy": "Channel"}, {"strategy": None, "group_size": -1}])
def test_compressed_tensors_strategy_and_type_read_as_its_quantizationargs_does(tmp_path, weights):
    """QuantizationArgs lowercases type and strategy, and infers a null strategy from group_size (-1: channel):
    both were refused, or read as one scale for the tensor."""
    folder, want = fp8_folder(tmp_path, "ct-channel-phi3")
    q = compressed_tensors("channel")
    q["config_groups"]["group_0"]["weights"].update(weights)
    assert_same_logits(load_checkpoint(with_quantization(folder, q)), want)


def test_static_activation_scales_are_refused_by_name(tmp_path):
    """compressed-tensors' static input_activations (input_scale beside each weight): the FP8 model clips its inputs
    at them, which the float model would not: refused, in the config and as a stray tensor."""
    folder, _ = fp8_folder(tmp_path, "ct-channel-phi3")
    q = compressed_tensors("channel")
    q["config_groups"]["group_0"]["input_activations"].update(strategy="tensor", dynamic=False)
    with pytest.raises(UserError, match=r"config_groups 'group_0' input_activations static: its activations "
                                        r"quantized with the fixed scales the folder stores"):
        load_checkpoint(with_quantization(folder, q))
    with_quantization(folder, compressed_tensors("channel"))
    edit_tensors(folder, lambda sd: sd.update({"model.layers.0.mlp.down_proj.input_scale": torch.tensor([0.02])}))
    with pytest.raises(UserError, match=r"tensor 'layers\.0\.mlp\.down_proj\.input_scale' is not read here"):
        load_checkpoint(folder)


def test_mistrals_static_activation_scale_qscale_act_is_refused_by_name(tmp_path):
    """Mistral's consolidated FP8 format stores its static activation scale as qscale_act (vLLM's Mistral loader reads
    it as input_scale): it was dropped without a word, the float model then not clipping where the FP8 one does."""
    folder, _ = fp8_folder(tmp_path, "fp8-llama")
    edit_tensors(folder, lambda sd: sd.update({"model.layers.0.self_attn.o_proj.qscale_act": torch.tensor([0.02])}))
    with pytest.raises(UserError, match=r"tensor 'layers\.0\.self_attn\.o_proj\.qscale_act' is not read here "
                                        r"\(fp8's FP8 weights and their weight_scale_inv only: no static activation"):
        load_checkpoint(folder)


def test_ue8m0_scales_read_as_float32_powers_of_two_or_as_e8m0_exponent_bytes(tmp_path):
    """scale_fmt "ue8m0" (DeepSeek-V3.1's, V4's): power-of-two weight_scale_inv, saved as float32 or as float8_e8m0fnu
    exponent bytes (2 ** (b - 127)); transformers' fp8 reads both. The bytes failed in a comparison torch has no e8m0
    kernel for; read now, each the same model as its float32 twin, and the NaN byte 255 refused as a damaged scale."""
    folder, _ = fp8_folder(tmp_path, "fp8-ragged-qwen3")
    with_quantization(folder, {**KINDS["fp8-ragged-qwen3"][1], "scale_fmt": "ue8m0"})
    # the folder's scales rounded to powers of two (their exponents vary: not a test on ones)
    edit_tensors(folder, lambda sd: sd.update({k: torch.exp2(torch.round(torch.log2(v.float()))) for k, v in sd.items()
                                               if k.endswith(".weight_scale_inv")}))
    sd = load_file(folder / "model.safetensors")
    name = "model.layers.0.mlp.down_proj"
    assert len(set(sd[name + ".weight_scale_inv"].flatten().tolist())) > 1
    (N, K), (bn, bk) = sd[name + ".weight"].shape, KINDS["fp8-ragged-qwen3"][2][1]
    want = sd[name + ".weight"].float() * sd[name + ".weight_scale_inv"].repeat_interleave(bn, 0)[
        :N].repeat_interleave(bk, 1)[:, :K]
    as_floats = load_checkpoint(folder)
    exponents = lambda s: (torch.log2(s).round() + 127).to(torch.uint8).view(torch.float8_e8m0fnu)  # noqa: E731
    edit_tensors(folder, lambda sd: sd.update({k: exponents(v) for k, v in sd.items()
                                               if k.endswith(".weight_scale_inv")}))
    assert load_file(folder / "model.safetensors")[name + ".weight_scale_inv"].dtype == torch.float8_e8m0fnu
    as_bytes = load_checkpoint(folder)
    floats, read = as_floats.state_dict(), as_bytes.state_dict()
    assert floats.keys() == read.keys() and all(torch.equal(floats[k], read[k]) for k in floats)
    assert any(torch.equal(v, want) for v in read.values())  # (the down_proj: its FP8 matrix times its blocks' scales)

    def damage(sd):
        s = sd[name + ".weight_scale_inv"].view(torch.uint8).clone()
        s.view(-1)[-1] = 255  # (e8m0's NaN)
        sd[name + ".weight_scale_inv"] = s.view(torch.float8_e8m0fnu)
    with pytest.raises(UserError, match=r"tensor layers\.0\.mlp\.down_proj\.weight_scale_inv holds a scale that is "
                                        r"0 or below, NaN or inf"):
        load_checkpoint(edit_tensors(folder, damage))


def quantize_tensor(name, suffix=".weight_scale_inv", per="block", block=(16, 16)):
    def edit(sd):
        sd[name], sd[name.removesuffix(".weight") + suffix], _ = quantize_fp8(sd[name], per, block)
    return edit


@pytest.mark.parametrize("name", ["lm_head.weight", "model.embed_tokens.weight"])
def test_an_fp8_head_or_embedding_is_refused_by_name(tmp_path, name):
    folder, _ = fp8_folder(tmp_path, "fp8-llama")
    with pytest.raises(UserError, match=rf"{name.removeprefix('model.')} is FP8, where this reader dequantizes the "
                                        r"blocks' linear layers only"):
        load_checkpoint(edit_tensors(folder, quantize_tensor(name)))


@pytest.mark.parametrize("kind, tensor, shape, said", [
    ("fp8-ragged-qwen3", "model.layers.0.mlp.down_proj.weight_scale_inv", (3, 3),
     r"tensor layers\.0\.mlp\.down_proj\.weight_scale_inv has shape \(3, 3\), where fp8's block scales of an FP8 "
     r"weight \(64, 128\) are \(3, 4\) \(weight_block_size \[24, 40\]\)"),
    ("fbgemm_fp8-gpt_neox", "gpt_neox.layers.0.mlp.dense_4h_to_h.weight_scale", (1, 64),
     r"dense_4h_to_h\.weight_scale has shape \(1, 64\), where fbgemm_fp8's row scales of an FP8 weight \(64, 256\) "
     r"are \(64, 1\)"),
    ("ct-tensor-falcon", "transformer.h.0.mlp.dense_4h_to_h.weight_scale", (2,),
     r"h\.0\.mlp\.dense_4h_to_h\.weight_scale has shape \(2,\), where compressed-tensors's tensor scales"),
])
def test_a_scale_of_the_wrong_shape_is_refused_naming_the_tensor_and_shapes(tmp_path, kind, tensor, shape, said):
    folder, _ = fp8_folder(tmp_path, kind)
    edit_tensors(folder, lambda sd: sd.update({tensor: torch.rand(shape) + 0.1}))
    with pytest.raises(UserError, match=said):
        load_checkpoint(folder)


def test_a_missing_scale_a_scale_without_weight_and_no_fp8_tensor_are_refused_by_name(tmp_path):
    folder, _ = fp8_folder(tmp_path, "fp8-llama")
    scale = "model.layers.0.self_attn.q_proj.weight_scale_inv"
    held = load_file(folder / "model.safetensors")[scale]
    with pytest.raises(UserError, match=r"FP8 tensor layers\.0\.self_attn\.q_proj\.weight has no "
                                        r"layers\.0\.self_attn\.q_proj\.weight_scale_inv beside it"):
        load_checkpoint(edit_tensors(folder, lambda sd: sd.pop(scale)))
    edit_tensors(folder, lambda sd: sd.update({scale: held, "lm_head.weight_scale_inv": held.clone()}))
    with pytest.raises(UserError, match=r"tensor 'lm_head\.weight_scale_inv' is not read here"):
        load_checkpoint(folder)
    # the config says FP8 over a float folder: not read as the float model it seems
    float_folder = tmp_path / "plain"
    export_llama(GPTModel(GPTConfig(vocab_size=V, context_length=T, n_layer=1, n_head=4, n_embd=64, **LLAMA)),
                 float_folder)
    with pytest.raises(UserError, match=r"config\.json says fp8 \(FP8\) quantization, but no tensor is float8"):
        load_checkpoint(with_quantization(float_folder, KINDS["fp8-llama"][1]))


@pytest.mark.parametrize("suffix", [".scale", ".qscale_weight"])
def test_fp8_scales_under_the_names_transformers_renames_are_read(tmp_path, suffix):
    """transformers' fp8 loader renames DeepSeek-V4's ".scale" and Mistral Large's ".qscale_weight" to
    weight_scale_inv (FineGrainedFP8HfQuantizer.update_weight_conversions): read so, not refused as missing; one
    beside a weight_scale_inv, or beside no FP8 weight, refused by name."""
    folder, want = fp8_folder(tmp_path, "fp8-ragged-qwen3")
    edit_tensors(folder, lambda sd: sd.update({k.replace(".weight_scale_inv", suffix): sd.pop(k) for k in list(sd)
                                               if k.endswith(".weight_scale_inv")}))
    assert_same_logits(load_checkpoint(folder), want)
    scale = "model.layers.0.mlp.up_proj" + suffix
    held = load_file(folder / "model.safetensors")[scale]
    edit_tensors(folder, lambda sd: sd.update({scale.replace(suffix, ".weight_scale_inv"): held.clone()}))
    with pytest.raises(UserError, match=rf"up_proj\.weight has scales layers\.0\.mlp\.up_proj\.weight_scale_inv "
                                        rf"and layers\.0\.mlp\.up_proj{re.escape(suffix)}, both read as its "
                                        r"weight_scale_inv"):
        load_checkpoint(folder)
    edit_tensors(folder, lambda sd: sd.pop(scale.replace(suffix, ".weight_scale_inv")))
    edit_tensors(folder, lambda sd: sd.update({"model.layers.0.mlp.foo" + suffix: held.clone()}))
    with pytest.raises(UserError, match=rf"tensor 'layers\.0\.mlp\.foo{re.escape(suffix)}' is not read here"):
        load_checkpoint(folder)


@pytest.mark.parametrize("qk_norm", [False, True])  # Mixtral, Qwen3-MoE
def test_an_fp8_moe_folder_is_refused_by_name(tmp_path, qk_norm):
    """The MoE reader keeps its experts stacked float for the grouped kernels and dequantizes nothing: refused
    naming the method, never a dtype error from its experts."""
    folder = with_quantization(moe_folder(tmp_path, qk_norm), KINDS["fp8-llama"][1])
    name = "Qwen3-MoE" if qk_norm else "Mixtral"
    with pytest.raises(UserError, match=rf"quant_method 'fp8' is not read here \(a quantized {name}: "):
        load_checkpoint(folder)


# -- differential: transformers' own FP8 quantizer and dequantizing loader ---------------------------------------
def hf_fp8():
    """transformers' FineGrainedFP8 pieces (its CPU load dequantizes), or a skip where this transformers lacks them."""
    try:
        from transformers import AutoModelForCausalLM, FineGrainedFP8Config
        from transformers.integrations.finegrained_fp8 import Fp8Quantize, _dequantize_fp8_weight
        from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer
    except ImportError as e:
        pytest.skip(f"transformers without its FineGrainedFP8 quantizer: {e}")
    return AutoModelForCausalLM, FineGrainedFP8Config, Fp8Quantize, FineGrainedFP8HfQuantizer, _dequantize_fp8_weight


def tiny_folder(tmp_path, family, **extra):
    from tritongpt.train.falcon_weights import export_falcon
    from tritongpt.train.gemma_weights import export_gemma
    from tritongpt.train.neox_weights import export_neox
    from tritongpt.train.phi3_weights import export_phi3

    base, export = {"llama": (LLAMA, export_llama), "phi3": (PHI3, export_phi3), "neox": (NEOX, export_neox),
                    "falcon": (FALCON, export_falcon), "gemma": (GEMMA, export_gemma)}[family]
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=V, context_length=T, n_layer=1, n_head=4, n_embd=64,
                               **{**base, **extra})).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms and biases off their ones and zeros
            p.add_(0.05 * torch.randn(p.shape))
    export(model, tmp_path / family)
    return tmp_path / family


def assert_logits_like_transformers(ours, theirs):
    idx = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = theirs(idx).logits.float()
        got = ours(idx)
    assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item()


@pytest.mark.parametrize("family, extra, block, fp8", [
    ("llama", {}, [16, 32], 7), ("llama", {"qk_norm": True}, [16, 32], 7), ("gemma", {}, [16, 32], 7),
    # weight_block_size null: one scale per weight (FP8Linear's 0-d weight_scale_inv)
    ("llama", {}, None, 7), ("phi3", {}, [16, 32], 4), ("neox", {}, [16, 32], 4), ("falcon", {"n_kv_head": 2, "bias": False}, [16, 32], 4),
    # blocks that divide only down_proj [64, 128]: Fp8Quantize leaves the other linears float, named nowhere in
    # the config, and transformers loads such a folder as it is: so do we
    ("llama", {}, [32, 128], 1)])
def test_an_fp8_folder_quantized_by_transformers_gives_transformers_dequantized_logits(tmp_path, family, extra,
                                                                                       block, fp8):
    """Quantized by transformers' own Fp8Quantize (FineGrainedFP8Config) and read by from_pretrained(dequantize=True)
    on the CPU: our logits are transformers'."""
    auto, config, quantize, quantizer, _ = hf_fp8()
    folder = tiny_folder(tmp_path, family, **extra)
    q = config(weight_block_size=block)
    op = quantize(quantizer(q))
    sd = load_file(folder / "model.safetensors")
    for k in [k for k in sd if k.endswith(LINEARS)]:
        sd.update({n: t.reshape(()) if block is None and n.endswith("_scale_inv") else t
                   for n, t in op.convert({k: sd.pop(k)}).items()})
    assert sum(t.dtype == torch.float8_e4m3fn for t in sd.values()) == fp8
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    with_quantization(folder, json.loads(q.to_json_string()))
    theirs = auto.from_pretrained(folder, quantization_config=config(dequantize=True), dtype=torch.float32).eval()
    assert_logits_like_transformers(load_checkpoint(folder), theirs)


@pytest.mark.parametrize("kind", ["fp8-llama", "fp8-ragged-qwen3"])
def test_ragged_fp8_blocks_dequantize_as_transformers_fp8linear_does(tmp_path, kind):
    """Blocks that do not divide the layers (FP8Linear sizes its scales by ceil division; from_pretrained's CPU
    dequantize refuses them): each weight dequantized by transformers' own _dequantize_fp8_weight (FP8Linear's, the
    last blocks cropped) into a float folder read by transformers, against ours from the FP8 folder."""
    auto, _, _, _, dequantize = hf_fp8()
    folder, _ = fp8_folder(tmp_path, kind)
    block = KINDS[kind][1]["weight_block_size"]
    sd = load_file(folder / "model.safetensors")
    for k in [k for k, t in sd.items() if t.dtype == torch.float8_e4m3fn]:
        scale = sd.pop(k.removesuffix(".weight") + ".weight_scale_inv")
        sd[k] = dequantize(sd[k], scale, block, torch.float32)
    plain = float_twin(tmp_path / "hf-dequantized", folder, sd)
    theirs = auto.from_pretrained(plain, dtype=torch.float32).eval()
    assert_logits_like_transformers(load_checkpoint(folder), theirs)


NAMES = ["model.layers.1.mlp.down_proj", "model.layers.11.mlp.down_proj", "model.layers.10.self_attn.q_proj",
         "model.layers.0.mlp.gate_proj", "lm_head", "model.layers.2.self_attn.o_proj"]


def test_modules_to_not_convert_matches_whole_modules_as_transformers_does():
    """"model.layers.1" leaves layer 1 float, not layers 10 to 19 with it (whose FP8 weights were then refused as
    'left float'); transformers' should_convert_module matches up to a module boundary."""
    from tritongpt.train.hf_quant import fp8_spec

    patterns = ["model.layers.1", "lm_head", "mlp.gate", "model.layers.*.self_attn.o"]
    keep = fp8_spec({"quant_method": "fp8", "modules_to_not_convert": patterns})["keep"]
    assert [keep(n) for n in NAMES] == [True, False, False, False, True, False]
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:
        return
    assert [keep(n) for n in NAMES] == [not should_convert_module(n, patterns) for n in NAMES]


@pytest.mark.parametrize("kind, value", [("fp8-llama", 0.0), ("fp8-ragged-qwen3", -0.01),
                                         ("ct-channel-phi3", float("nan")), ("fbgemm_fp8-gpt_neox", float("inf"))])
def test_a_damaged_fp8_scale_is_refused_naming_the_tensor(tmp_path, kind, value):
    """A scale of 0 or below loaded as a model with a zeroed or sign-flipped block; NaN and inf were named by our
    float weight's name, not the file's tensor."""
    folder, _ = fp8_folder(tmp_path, kind)
    suffix = KINDS[kind][3]
    sd = load_file(folder / "model.safetensors")
    name = next(k for k in sorted(sd) if k.endswith(suffix) and ("down_proj" in k or "4h_to_h" in k))

    def damage(sd):
        sd[name] = sd[name].clone()
        sd[name].view(-1)[-1] = value
    edit_tensors(folder, damage)
    with pytest.raises(UserError, match=rf"tensor {re.escape(name.split('.', 1)[1])} holds a scale that is 0 or "
                                        r"below, NaN or inf \(.*FP8 scales are positive: a damaged file\)"):
        load_checkpoint(folder)


def test_an_fp8_nan_weight_is_refused_naming_the_tensor(tmp_path):
    folder, _ = fp8_folder(tmp_path, "fp8-llama")
    name = "model.layers.0.self_attn.q_proj.weight"

    def damage(sd):
        w = sd[name].view(torch.uint8).clone()
        w[3, 5] = 0x7F  # (e4m3fn's NaN: it has no inf)
        sd[name] = w.view(torch.float8_e4m3fn)
    with pytest.raises(UserError, match=r"tensor layers\.0\.self_attn\.q_proj\.weight holds FP8 NaN values"):
        load_checkpoint(edit_tensors(folder, damage))


def test_a_sharded_fp8_folder_with_its_scales_in_another_shard_loads(tmp_path):
    folder, want = fp8_folder(tmp_path, "fp8-ragged-qwen3")
    sd = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    shards = {"model-00001-of-00002.safetensors": {k: v for k, v in sd.items() if not k.endswith("_scale_inv")},
              "model-00002-of-00002.safetensors": {k: v for k, v in sd.items() if k.endswith("_scale_inv")}}
    for name, part in shards.items():
        save_file(part, folder / name, metadata={"format": "pt"})
    weight_map = {k: name for name, part in shards.items() for k in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_same_logits(load_checkpoint(folder), want)


def test_a_multimodal_gemma3_fp8_folder_loads_its_language_model(tmp_path):
    """Gemma3ForConditionalGeneration's folder (tensors under model.language_model., text_config): the language
    model's FP8 projections dequantized, the vision tower's FP8 linear and the projector left out with the tower."""
    folder, want = fp8_folder(tmp_path, "fp8-gemma3_text")

    def vision_tower(sd):
        fc1 = "model.vision_tower.encoder.layers.0.mlp.fc1"
        sd[fc1 + ".weight"], sd[fc1 + ".weight_scale_inv"], _ = quantize_fp8(torch.randn(64, 96), "block", (32, 48))
        sd["model.multi_modal_projector.mm_input_projection_weight"] = torch.randn(32, 64)
    assert_same_logits(load_checkpoint(as_multimodal_gemma3(folder, more=vision_tower)), want)


@pytest.mark.parametrize("named", ["model.language_model.layers.0.mlp.up_proj",
                                   "language_model.model.layers.0.mlp.up_proj",
                                   "re:model\\.language_model\\.layers\\.0\\.mlp\\.up_proj$"])
def test_a_multimodal_gemma3s_modules_left_float_are_matched_by_its_full_names(tmp_path, named):
    """A multimodal folder's config names its language model's modules in full (model.language_model. in
    transformers 5, language_model.model. in older saves): matched against the reader's shortened names too, so an
    FP8 up_proj it leaves float is refused (it was read without a word), as for a text-only folder."""
    folder, _ = fp8_folder(tmp_path, "fp8-gemma3_text")
    q = json.loads((folder / "config.json").read_text())["quantization_config"]
    if named.startswith("re:"):  # (compressed-tensors' ignore: a module name or a "re:" pattern)
        q = {**compressed_tensors("block", [32, 48]), "ignore": ["re:.*vision_tower.*", "lm_head", named]}
        edit_tensors(folder, lambda sd: sd.update({k.replace("_scale_inv", "_scale"): sd.pop(k) for k in list(sd)
                                                   if k.endswith("_scale_inv")}))
    else:
        q = {**q, "modules_to_not_convert": q["modules_to_not_convert"] + [named]}
    as_multimodal_gemma3(folder, q)
    with pytest.raises(UserError, match=r"layers\.0\.mlp\.up_proj\.weight is FP8, but the quantization_config "
                                        r"leaves layers\.0\.mlp\.up_proj float"):
        load_checkpoint(folder)
