"""Hugging Face folders quantized elsewhere (config.json's quantization_config: GPTQ, AWQ, bitsandbytes, FP8,
compressed-tensors ...; or AutoGPTQ's quantize_config.json): refused by name at the config read, by every reader
and command, never a missing-tensor error or a model of whatever float tensors are there. Tiny models exported
here: nothing downloaded."""
import json

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
    with pytest.raises(UserError, match=rf"config\.json's quantization_config: quant_method '{method}'.* is not "
                                        r"read here: .*load the float model it was quantized from"):
        load_checkpoint(folder)


def test_gptq_tensors_are_refused_by_name_not_as_a_missing_tensor(tmp_path):
    """A Llama's linears as GPTQ stores them (qweight, qzeros, scales, g_idx; no .weight), through generate."""
    folder = with_quantization(exported(tmp_path), CONFIGS["gptq"])
    sd = load_file(folder / "model.safetensors")
    for k in [k for k in sd if k.endswith("_proj.weight")]:
        N, K = sd.pop(k).shape
        base = k.removesuffix(".weight")
        sd.update({base + ".qweight": torch.randint(0, 2 ** 31 - 1, (K // 8, N), dtype=torch.int32),
                   base + ".qzeros": torch.randint(0, 2 ** 31 - 1, (K // 32, N // 8), dtype=torch.int32),
                   base + ".scales": torch.rand(K // 32, N).half(), base + ".g_idx": torch.arange(K) // 32})
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"quant_method 'gptq' \(bits 4, group_size 32, desc_act False, sym True\) "
                                        r"is not read here: its linear layers are stored as GPTQ's int32-packed"):
        load_checkpoint(folder)
    assert cli.main(["generate", "--weights", str(folder), "--prompt", "hi", "--device", "cpu"]) == 2


def test_autogptqs_own_quantize_config_json_is_refused_by_name(tmp_path):
    folder = exported(tmp_path)
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
