"""StarCoder2 (Hugging Face's Starcoder2ForCausalLM: LayerNorms with biases, a GELU-tanh MLP c_fc / c_proj,
grouped-query attention with biases, RoPE, a sliding window) read into GPTModel and exported back, against
transformers on tiny random models."""
import json

import pytest
import torch

from parity import assert_close_rel, decodes_like, logits_match_transformers
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.gpt2_weights import load_checkpoint

transformers = pytest.importorskip("transformers")

VOCAB, CTX, T = 53, 40, 19


def hf_starcoder2(folder, tie=False, bias=True, window=6, hidden=192, **config):
    """A tiny random Starcoder2ForCausalLM in float64 (3 heads of 16 over 1 key/value head, an MLP 4 x 48 wide, a
    sliding window of 6 under T unless window says), saved to folder, EOS and BOS 1. -> (the model, its
    model.safetensors)."""
    torch.manual_seed(0)
    cfg = transformers.Starcoder2Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=hidden, num_hidden_layers=2,
                                        num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=CTX,
                                        norm_epsilon=1e-6, tie_word_embeddings=tie, use_bias=bias,
                                        sliding_window=window, bos_token_id=1, eos_token_id=1, pad_token_id=0,
                                        rope_parameters={"rope_type": "default", "rope_theta": 500.0}, **config)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).double().eval()
    with torch.no_grad():  # unit norm weights and zero biases would hide a mistake
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(folder)
    return hf, folder / "model.safetensors"


@pytest.mark.parametrize("tie,bias,window", [(False, True, 6), (True, False, None)])
def test_loads_and_matches_transformers_on_both_paths(tmp_path, tie, bias, window):
    """Logits within 2e-6 of transformers' in float64, 1e-5 on the Triton path in fp32; the sliding window read as
    attention_window, use_bias as GPTConfig.bias (the LayerNorms keep theirs)."""
    hf, path = hf_starcoder2(tmp_path, tie=tie, bias=bias, window=window)
    model = load_checkpoint(path).double().eval()
    c = model.config
    assert (c.norm, c.mlp, c.gelu_approximate, c.ff_hidden, c.position_encoding, c.bias, c.kv_heads, c.tie_weights,
            c.attention_window, c.rope_theta) == ("layernorm", "gelu", "tanh", 192, "rope", bias, 1, tie, window or 0,
                                                  500.0)
    logits_match_transformers(hf, model, VOCAB, T)


def test_decodes_over_the_cache_and_generates_transformers_tokens(tmp_path):
    from tritongpt.train.generate import generate

    hf, path = hf_starcoder2(tmp_path)
    model = load_checkpoint(path).double().eval()
    idx = torch.randint(0, VOCAB, (1, 11))
    with torch.no_grad():
        want = hf(idx).logits
    decodes_like(model, idx, want)
    ours = generate(model, idx[:, :3], 10)
    theirs = hf.generate(idx[:, :3], max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, theirs)


def test_export_round_trips_through_transformers(tmp_path):
    """Loaded, exported (export_target picks StarCoder2 for grouped-query GELU-tanh over LayerNorms), read by
    transformers: the same logits; and load_checkpoint reads the export back to the same config."""
    from tritongpt.commands import export_target
    from tritongpt.train.starcoder2_weights import export_starcoder2

    hf, path = hf_starcoder2(tmp_path / "in")
    model = load_checkpoint(path).double().eval()
    assert export_target(model.config)[0] == "StarCoder2"
    export_starcoder2(model, tmp_path / "out", eos_token_id=1)
    d = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (d["model_type"], d["use_bias"], d["sliding_window"], d["num_key_value_heads"]) == \
        ("starcoder2", True, 6, 1)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    assert type(back).__name__ == "Starcoder2ForCausalLM"
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(back(idx).logits, hf(idx).logits, 2e-6, "exported, read by transformers")
    again = load_checkpoint(tmp_path / "out" / "model.safetensors")
    assert again.config == GPTConfig(**{**model.config.to_dict(), "kernels": again.config.kernels})


@pytest.mark.parametrize("change,match", [
    ({"hidden_act": "relu"}, "hidden_act 'relu'; this model's StarCoder2 MLP computes 'gelu_pytorch_tanh'"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 500.0, "factor": 2.0}}, "type 'dynamic'"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5; this model rotates every dimension"),
    ({"sliding_window": 0}, "sliding_window 0; it must be a positive integer or null"),
    ({"use_bias": "true"}, "config.json has use_bias 'true'; it must be true or false"),
    ({"intermediate_size": 41}, "says intermediate_size 41, but the weights have 192"),
], ids=["activation", "dynamic", "partial", "window", "bias-type", "hidden"])
def test_what_this_model_does_not_compute_is_refused_by_name(hf_copy, tmp_path, change, match):
    path = hf_copy(hf_starcoder2, tmp_path)
    cfg_json = tmp_path / "config.json"
    cfg_json.write_text(json.dumps({**json.loads(cfg_json.read_text()), **change}))
    with pytest.raises(UserError, match=match):
        load_checkpoint(path)


def test_an_mlp_not_4_wide_is_refused_by_name(tmp_path):
    """Our GELU MLP is 4 n_embd wide (mlp_hidden is the gated and squared-ReLU MLPs'): another intermediate_size is
    named, not read as a model it is not."""
    _, path = hf_starcoder2(tmp_path, hidden=40)
    with pytest.raises(UserError, match="intermediate_size 40; this model's GELU MLP is 4 hidden_size wide \\(192\\)"):
        load_checkpoint(path)


def test_the_exact_gelu_is_read_and_written_as_such(tmp_path):
    """hidden_act "gelu" is the erf GELU (gelu_approximate "none"): transformers' logits on the reference path, and
    export writes it back as "gelu" (not refused as GPT-NeoX's touch: a StarCoder2 folder says it)."""
    from tritongpt.train.starcoder2_weights import export_starcoder2

    hf, path = hf_starcoder2(tmp_path / "in", hidden_act="gelu")
    model = load_checkpoint(path).double().eval()
    assert model.config.gelu_approximate == "none"
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(model(idx), hf(idx).logits, 2e-6, "exact GELU")
    export_starcoder2(model, tmp_path / "out", eos_token_id=1)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["hidden_act"] == "gelu"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    with torch.no_grad():
        assert_close_rel(back(idx).logits, hf(idx).logits, 2e-6, "exact GELU exported")


def test_export_refuses_what_a_starcoder2_cannot_say(tmp_path):
    from tritongpt.commands import export_target
    from tritongpt.train.starcoder2_weights import export_starcoder2

    base = dict(vocab_size=53, context_length=24, n_embd=32, n_layer=2, n_head=2, n_kv_head=1,
                position_encoding="rope")
    assert export_target(GPTConfig(**base))[0] == "StarCoder2"
    assert export_target(GPTConfig(**{**base, "n_kv_head": 0}))[0] == "GPT-NeoX"  # nothing GPT-NeoX cannot say
    for change, match in (({"window_layers": "odd", "attention_window": 8}, "local attention in some layers only"),
                          ({"qkv_bias": False}, "biases on some linear layers only"),
                          ({"rotary_dim": 4}, "rotates only 4 of each head's 16"),
                          ({"logit_softcap": 30.0}, "soft-caps its logits")):
        model = GPTModel(GPTConfig(**{**base, **change}))
        assert export_target(model.config)[0] == "StarCoder2"
        with pytest.raises(UserError, match=match + ".*cannot be exported as a StarCoder2 folder"):
            export_starcoder2(model, tmp_path / "x")
    with pytest.raises(UserError, match="has a swiglu MLP, where StarCoder2's is c_fc, GELU, c_proj"):
        export_starcoder2(GPTModel(GPTConfig(**{**base, "mlp": "swiglu"})), tmp_path / "y")
