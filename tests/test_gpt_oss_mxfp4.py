"""GPT-OSS's MXFP4 folders (the Hub's openai/gpt-oss-20b, -120b: quantization_config quant_method "mxfp4", the
experts stored as gate_up_proj_blocks / _scales and down_proj_blocks / _scales) read as the float model of their
dequantized experts (train/gpt_oss_weights.py with train/hf_quant.py's mxfp4_experts). A tiny random
GptOssForCausalLM in fp32, its experts quantized by tests/test_mxfp4.py's spec-following quantizer into the tensors
transformers' mxfp4 loader reads; checked against transformers itself loading the folder with
Mxfp4Config(dequantize=True) on the CPU (which needs no GPU nor kernels package: its quantizer returns before
checking either). Nothing downloaded."""
import argparse
import json
import shutil

import pytest
import torch

from parity import assert_close_rel
from test_mxfp4 import GPT_OSS_SKIP, mxfp4_quantize
from tritongpt.errors import UserError
from tritongpt.train.gpt2_weights import load_checkpoint
from tritongpt.train.hf_quant import mxfp4_dequantize

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, CTX, T, LAYERS = 53, 40, 11, 2
E, K, C, H, LIMIT = 4, 2, 64, 32, 2.0  # C: hidden, two MXFP4 blocks of 32; H: the experts' width
PROJS = ("gate_up_proj", "down_proj")


def write_mxfp4_folder(folder, **config):
    """A tiny random GptOssForCausalLM (fp32, every tensor jittered; swiglu_limit 2 so the clamp bites) saved to
    folder with its experts as MXFP4 blocks and scales, as the Hub's gpt-oss folders hold them. -> (the file's
    tensors, the config.json dict)."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    cfg = transformers.GptOssConfig(
        vocab_size=VOCAB, hidden_size=C, intermediate_size=H, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=CTX, num_local_experts=E,
        num_experts_per_tok=K, sliding_window=4, swiglu_limit=LIMIT, bos_token_id=2, eos_token_id=1, pad_token_id=0,
        experts_implementation="eager", **config)
    hf = transformers.GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(folder)
    sd = load_file(folder / "model.safetensors")
    for i in range(LAYERS):
        for proj in PROJS:
            # GptOssExperts' [E, in, out] -> blocks [E, out, in / 32, 16] and scales [E, out, in / 32]
            name = f"model.layers.{i}.mlp.experts.{proj}"
            blocks, scales = mxfp4_quantize(sd.pop(name))
            sd[name + "_blocks"], sd[name + "_scales"] = blocks.contiguous(), scales.contiguous()
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    d = json.loads((folder / "config.json").read_text())
    d["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": list(GPT_OSS_SKIP)}
    (folder / "config.json").write_text(json.dumps(d))
    return sd, d


@pytest.fixture(scope="module")
def mxfp4_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    sd, _ = write_mxfp4_folder(folder)
    return folder, sd


def _experts_of_blocks(sd, i):
    """Layer i's experts as transformers holds them after dequantizing: gate_up_proj [E, C, 2H], down_proj
    [E, H, C]."""
    p = f"model.layers.{i}.mlp.experts."
    return [mxfp4_dequantize(sd[p + proj + "_blocks"], sd[p + proj + "_scales"]) for proj in PROJS]


def test_an_mxfp4_folder_loads_as_its_dequantized_experts_and_matches_transformers(mxfp4_folder, capsys):
    transformers = pytest.importorskip("transformers")
    folder, sd = mxfp4_folder
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32,
        experts_implementation="eager").eval()
    model = load_checkpoint(folder / "model.safetensors").eval()
    assert "4 MXFP4 expert weights are dequantized to bfloat16 at load" in capsys.readouterr().err
    for i in range(LAYERS):
        gate_up, down = _experts_of_blocks(sd, i)
        assert gate_up.shape == (E, C, 2 * H) and down.shape == (E, H, C)
        # transformers read the blocks (not a fresh init of the experts): the independent check below is of them
        hf = theirs.model.layers[i].mlp.experts
        assert torch.equal(hf.gate_up_proj, gate_up) and torch.equal(hf.down_proj, down)
        ff = model.trf_blocks[i].ff
        # ours bit for bit the blocks' values, gate the even columns of transformers' [E, C, 2H], up the odd
        assert torch.equal(ff.w_gate, gate_up[..., 0::2].transpose(1, 2))
        assert torch.equal(ff.w_up, gate_up[..., 1::2].transpose(1, 2))
        assert torch.equal(ff.w_down, down.transpose(1, 2))
        assert torch.equal(ff.w_gate.bfloat16().float(), ff.w_gate)  # (bfloat16-exact, as MXFP4 values are)
    # the float parts are the file's as they are (modules_to_not_convert)
    assert torch.equal(model.trf_blocks[1].att.W_query.weight, sd["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(model.trf_blocks[0].ff.router.bias, sd["model.layers.0.mlp.router.bias"])
    assert torch.equal(model.out_head.weight, sd["lm_head.weight"])
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        want = theirs(idx).logits
        assert_close_rel(model(idx), want, 1e-5, "reference path on an MXFP4 folder")
        # the tolerance tells the interleave apart: gate and up read as the halves of the [2H] columns instead
        ff = model.trf_blocks[0].ff
        halves = torch.cat((ff.w_gate, ff.w_up), 1)
        ff.w_gate.copy_(halves[:, 0::2]), ff.w_up.copy_(halves[:, 1::2])
        assert (model(idx) - want).abs().max() > 1e-2


def test_init_and_info_read_an_mxfp4_folder_as_a_float_model(mxfp4_folder, capsys):
    """--init (the LoRA trainers' load_init_base) loads it as a float model, fully trainable, not a QLoRA base;
    `info` (a command that only reads the model: load_checkpoint's quantized_ok) shows its fields, its experts
    kept MXFP4."""
    from tritongpt.cli import main
    from tritongpt.train.sft import load_init_base

    folder, sd = mxfp4_folder
    model = load_init_base(argparse.Namespace(init=str(folder), lora_rank=0, quantize=None))
    assert model.init_quantized is None and not getattr(model, "quantized", None)
    assert torch.equal(model.trf_blocks[1].ff.w_down, _experts_of_blocks(sd, 1)[1].transpose(1, 2))
    capsys.readouterr()
    assert main(["info", "--weights", str(folder)]) == 0
    out, err = capsys.readouterr()
    assert "n_experts       4" in out and "moe_activation  gpt_oss" in out and "quantized" not in out
    assert "MXFP4 expert weights are kept MXFP4" in err


def _edit(folder, tmp_path, tensors=None, config=None):
    """A copy of folder with its tensors and config.json changed (each a function of the dict)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, tmp_path / "m")
    if tensors is not None:
        sd = load_file(tmp_path / "m" / "model.safetensors")
        tensors(sd)
        save_file(sd, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    if config is not None:
        d = json.loads((tmp_path / "m" / "config.json").read_text())
        config(d)
        (tmp_path / "m" / "config.json").write_text(json.dumps(d))
    return tmp_path / "m" / "model.safetensors"


@pytest.mark.parametrize("tensors, config, said", [
    (lambda sd: sd.pop("model.layers.1.mlp.experts.down_proj_scales"), None,
     "MXFP4 tensor layers.1.mlp.experts.down_proj_blocks has no layers.1.mlp.experts.down_proj_scales beside it"),
    (None, lambda d: d["quantization_config"]["modules_to_not_convert"].append("model.layers.0.mlp.experts"),
     "layers.0.mlp.experts.down_proj is MXFP4, but the quantization_config leaves layers.0.mlp.experts float "
     r"\(modules_to_not_convert\)"),
    (None, lambda d: d.pop("quantization_config"),
     "gate_up_proj_blocks / down_proj_blocks are GPT-OSS's MXFP4 form of the experts, but config.json has no "
     "quantization_config"),
    (None, lambda d: d.__setitem__("quantization_config", {"quant_method": "fp8", "weight_block_size": [32, 32]}),
     r"quant_method 'fp8' is not read here \(GPT-OSS is read from float weights or its MXFP4 experts only\)"),
    (None, lambda d: d.__setitem__("model_type", "llama"),
     "quant_method 'mxfp4' is not read here \\(model_type 'llama': MXFP4 is read for gpt-oss's experts"),
    (None, lambda d: d.__setitem__("model_type", "mixtral"), "quant_method 'mxfp4' is not read here"),
    (None, lambda d: d.pop("model_type"),
     "quant_method 'mxfp4' is not read here \\(model_type None: MXFP4 is read for gpt-oss's experts"),
], ids=["half-a-pair", "expert-left-float", "no-quantization-config", "fp8", "llama", "mixtral", "no-model-type"])
def test_what_is_not_gpt_oss_mxfp4_is_refused_by_name(mxfp4_folder, tmp_path, tensors, config, said):
    path = _edit(mxfp4_folder[0], tmp_path, tensors, config)
    with pytest.raises(UserError, match=said):
        load_checkpoint(path)


def test_an_mxfp4_folder_loads_kept_for_running_and_gives_the_dequantized_models_logits(mxfp4_folder, capsys):
    """load_checkpoint(quantized_ok) (generate, chat, serve, eval) keeps the experts MXFP4: the same logits as the
    dequantized load, exactly on the reference path and within fp32's rounding on the Triton one; its experts'
    bytes ~1/4 of bf16's (4.25 bits a weight: 0.5 byte a value and a scale byte per 32); frozen."""
    from tritongpt.model.layers import MXFP4MoEFeedForward

    folder, sd = mxfp4_folder
    dense = load_checkpoint(folder / "model.safetensors").eval()
    kept = load_checkpoint(folder / "model.safetensors", quantized_ok=True).eval()
    assert "4 MXFP4 expert weights are kept MXFP4" in capsys.readouterr().err
    ff = kept.trf_blocks[1].ff
    assert isinstance(ff, MXFP4MoEFeedForward) and ff.w_gate is None
    assert torch.equal(ff.down_blocks, sd["model.layers.1.mlp.experts.down_proj_blocks"])
    assert not any(".ff.w_" in n for n in kept.state_dict())
    bf16 = sum(2 * getattr(b.ff, w).numel() for b in dense.trf_blocks for w in ("w_gate", "w_up", "w_down"))
    packed = sum(b.ff.packed_bytes() for b in kept.trf_blocks)
    assert packed / bf16 == pytest.approx((0.5 + 1 / 32) / 2)
    assert not any(p.requires_grad for n, p in kept.named_parameters() if ".ff." in n and ".router." not in n)
    idx = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = dense(idx)
        assert torch.equal(kept(idx), want)
        kept.set_kernels("mlp")
        assert kept.trf_blocks[0].ff.use_triton
        assert_close_rel(kept(idx), want, 1e-5, "Triton MXFP4 experts")


def test_a_kept_model_exports_its_blocks_unchanged_and_is_not_saved_as_a_checkpoint(mxfp4_folder, tmp_path):
    from safetensors.torch import load_file

    from tritongpt.train.gpt_oss_weights import export_gpt_oss, load_gpt_oss_safetensors

    folder, sd = mxfp4_folder
    kept = load_gpt_oss_safetensors(folder / "model.safetensors").eval()
    export_gpt_oss(kept, tmp_path / "out", eos_token_id=1)
    back = load_file(tmp_path / "out" / "model.safetensors")
    # every tensor the file's own: the blocks and scales byte for byte (uint8), the float ones exactly
    assert set(back) == set(sd)
    for name, t in sd.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    q = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert q == {"quant_method": "mxfp4", "modules_to_not_convert": list(GPT_OSS_SKIP)}
    again = load_gpt_oss_safetensors(tmp_path / "out" / "model.safetensors").eval()
    idx = torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(again(idx), kept(idx))
    with pytest.raises(UserError, match="experts are kept MXFP4 .* a tritongpt checkpoint does not hold them"):
        kept.save(tmp_path / "m.safetensors")
