"""StableLM (StableLM-3B-4E1T, StableLM 2 1.6B): a Llama with LayerNorms, RoPE on a quarter of each head and,
in StableLM 2, biases on q, k and v only (train/stablelm_weights.py). Tiny random transformers
StableLmForCausalLM models saved to tmp_path (float64, every tensor jittered so each one counts): logits on both
kernel paths, the KV-cache decode, greedy tokens, export round trips through transformers, a pretrain --init
step; what this model does not compute refused by name. Nothing downloaded."""
import json

import pytest
import torch

from parity import assert_close_rel, decodes_like, logits_match_transformers, pretrain_argv
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.train.gpt2_weights import load_checkpoint

transformers = pytest.importorskip("transformers")

VOCAB, CTX, T = 53, 40, 23


def hf_stablelm(folder, qkv_bias=True, kv_heads=2, tie=False, vocab=VOCAB, context=CTX, **config):
    """A tiny random StableLmForCausalLM in float64 (4 heads of 16 over 64, 4 of each head's dimensions
    rotated: StableLmConfig's partial_rotary_factor 0.25), saved to folder, EOS and BOS 1.
    -> (the model, its model.safetensors)."""
    torch.manual_seed(0)
    cfg = transformers.StableLmConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=context, use_qkv_bias=qkv_bias,
        tie_word_embeddings=tie, bos_token_id=1, eos_token_id=1,
        **{"layer_norm_eps": 1e-6, "rope_parameters": {"rope_type": "default", "rope_theta": 500.0,
                                                      "partial_rotary_factor": 0.25}, **config})
    hf = transformers.StableLmForCausalLM(cfg).double().eval()
    with torch.no_grad():  # unit norm weights and zero biases would hide a mistake
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(folder)
    return hf, folder / "model.safetensors"


@pytest.mark.parametrize("qkv_bias", [True, False], ids=["stablelm2", "stablelm-3b"])
def test_loads_its_fields_and_matches_transformers_on_both_paths(tmp_path, qkv_bias):
    """StableLM 2's q/k/v biases (and StableLM-3B's none), LayerNorms with biases, a quarter of each head
    rotated, GQA: logits on both paths and a decode over the KV cache on both are transformers'."""
    hf, path = hf_stablelm(tmp_path, qkv_bias)
    model = load_checkpoint(path).double().eval()
    c = model.config
    assert (c.norm, c.mlp, c.bias, c.qkv_bias_only, c.rotary_dim, c.rope_theta, c.kv_heads, c.norm_eps) == \
        ("layernorm", "swiglu", False, qkv_bias, 4, 500.0, 2, 1e-6)
    assert model.trf_blocks[1].att.W_key.bias is not None if qkv_bias else model.trf_blocks[1].att.W_key.bias is None
    logits_match_transformers(hf, model, VOCAB, T)
    idx = torch.randint(0, VOCAB, (1, 15))
    with torch.no_grad():
        decodes_like(model, idx, hf(idx).logits)


def test_greedy_tokens_are_transformers(tmp_path):
    hf, path = hf_stablelm(tmp_path)
    model = load_checkpoint(path).double().eval()
    from tritongpt.train.generate import generate

    idx = torch.randint(0, VOCAB, (1, 3))
    ours = generate(model, idx, 12)
    theirs = hf.generate(idx, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("kw", [{}, {"qkv_bias": False, "tie": True, "kv_heads": 4}], ids=["stablelm2", "tied"])
def test_export_round_trips_through_transformers(tmp_path, kw):
    """Loaded, exported (`export` picks StableLM for LayerNorms with SwiGLU), read by transformers'
    AutoModelForCausalLM: the same logits, and load_checkpoint reads the export back to the same config."""
    from tritongpt.commands import export_target
    from tritongpt.train.stablelm_weights import export_stablelm

    hf, path = hf_stablelm(tmp_path / "in", **kw)
    model = load_checkpoint(path).double().eval()
    assert export_target(model.config)[0] == "StableLM"
    export_stablelm(model, tmp_path / "out", eos_token_id=1)
    d = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (d["model_type"], d["partial_rotary_factor"]) == ("stablelm", 0.25)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    assert type(back).__name__ == "StableLmForCausalLM"
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(back(idx).logits, hf(idx).logits, 2e-6, "exported, read by transformers")
    again = load_checkpoint(tmp_path / "out" / "model.safetensors")
    assert again.config == GPTConfig(**{**model.config.to_dict(), "kernels": again.config.kernels})
    with pytest.raises(UserError, match="already holds a model"):
        export_stablelm(model, tmp_path / "out")


@pytest.mark.parametrize("change,match", [
    ({"use_parallel_residual": True}, "use_parallel_residual true"),
    ({"qk_layernorm": True}, "qk_layernorm true"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'; this model's SwiGLU computes 'silu' only"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0, "partial_rotary_factor": 0.25}},
     "rope_parameters of type 'linear'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.2}},
     "partial rotary factor 0.2: 3 of head_dim 16 rotated"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": -1.0, "partial_rotary_factor": 0.25}},
     r"a RoPE base -1.0 \(rope_theta\); it must be a number > 0"),
    ({"use_qkv_bias": False}, "use_qkv_bias false, but the weights have q_proj's bias"),
    ({"model_type": "stablelm_epoch"}, "model_type 'stablelm_epoch'"),
], ids=["parallel", "qk-layernorm", "activation", "linear-rope", "odd-rotary", "theta", "qkv-bias", "epoch"])
def test_what_this_model_does_not_compute_is_refused_by_name(tmp_path, change, match):
    _, path = hf_stablelm(tmp_path)
    cfg_json = tmp_path / "config.json"
    cfg_json.write_text(json.dumps({**json.loads(cfg_json.read_text()), **change}))
    with pytest.raises(UserError, match=match):
        load_checkpoint(path)


def test_a_config_without_the_rotary_factor_is_read_as_transformers_reads_it(tmp_path):
    """StableLmConfig's partial_rotary_factor default is 0.25: a config.json that says none rotates a quarter
    of each head, in transformers and here alike."""
    _, path = hf_stablelm(tmp_path, rope_parameters={"rope_type": "default", "rope_theta": 500.0,
                                                     "partial_rotary_factor": 0.5})
    cfg_json = tmp_path / "config.json"
    d = json.loads(cfg_json.read_text())
    d.pop("rope_parameters")
    cfg_json.write_text(json.dumps({**d, "rope_theta": 500.0}))
    model = load_checkpoint(path).double().eval()
    assert model.config.rotary_dim == 4
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(model(idx), hf(idx).logits, 2e-6, "no partial_rotary_factor: a quarter rotated")


def test_pretrain_from_a_stablelm_folder_exports_back_as_stablelm(corpus, tmp_path, capsys):
    """--init a StableLM 2 folder, train a step, export: a StableLM folder that transformers runs with our
    logits."""
    from tritongpt.cli import main

    hf_stablelm(tmp_path / "s", vocab=300, context=64)
    assert main(pretrain_argv(corpus, tmp_path / "run", "--init", str(tmp_path / "s"), "--max-steps", "1")) == 0
    model = load_checkpoint(tmp_path / "run").eval()
    assert (model.config.norm, model.config.rotary_dim, model.config.qkv_bias_only) == ("layernorm", 4, True)
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    assert "StableLM with 2 layers" in capsys.readouterr().out
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        assert_close_rel(hf(idx).logits, model(idx), 1e-5, "transformers on the export")
