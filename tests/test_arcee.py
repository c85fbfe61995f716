"""Arcee (Hugging Face's ArceeForCausalLM, Arcee's AFM-4.5B: a Llama with the squared-ReLU MLP up_proj, relu^2,
down_proj) read into GPTModel (mlp "relu2") and exported back, against transformers on tiny random models."""
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
YARN = {"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0, "original_max_position_embeddings": 10}


def hf_arcee(folder, tie=False, bias=False, rope=None, **config):
    """A tiny random ArceeForCausalLM in float64 (3 heads of 16 over 1 key/value head, an MLP 40 wide; RoPE
    scaled by YaRN unless rope says), saved to folder, EOS and BOS 1. -> (the model, its model.safetensors)."""
    torch.manual_seed(0)
    cfg = transformers.ArceeConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
                                   num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=CTX,
                                   rms_norm_eps=1e-6, tie_word_embeddings=tie, attention_bias=bias, mlp_bias=bias,
                                   bos_token_id=1, eos_token_id=1, pad_token_id=0,
                                   rope_parameters=rope or YARN, **config)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).double().eval()
    with torch.no_grad():  # unit norm weights would hide a mistake
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(folder)
    return hf, folder / "model.safetensors"


@pytest.mark.parametrize("tie,bias", [(False, False), (True, True)])
def test_loads_and_matches_transformers_on_both_paths(tmp_path, tie, bias):
    """Logits within 2e-6 of transformers' in float64, 1e-5 on the Triton path in fp32 (kernels/mlp.py's RELU2);
    the MLP read as mlp "relu2" of intermediate_size, YaRN as rope_scaling."""
    hf, path = hf_arcee(tmp_path, tie=tie, bias=bias)
    model = load_checkpoint(path).double().eval()
    c = model.config
    assert (c.norm, c.mlp, c.ff_hidden, c.position_encoding, c.bias, c.kv_heads, c.tie_weights, c.rope_theta) == \
        ("rmsnorm", "relu2", 40, "rope", bias, 1, tie, 500.0)
    assert c.rope_scaling["rope_type"] == "yarn" and c.rope_scaling["factor"] == 4.0
    logits_match_transformers(hf, model, VOCAB, T)


def test_decodes_over_the_cache_and_generates_transformers_tokens(tmp_path):
    from tritongpt.train.generate import generate

    hf, path = hf_arcee(tmp_path)
    model = load_checkpoint(path).double().eval()
    idx = torch.randint(0, VOCAB, (1, 11))
    with torch.no_grad():
        want = hf(idx).logits
    decodes_like(model, idx, want)
    ours = generate(model, idx[:, :3], 10)
    theirs = hf.generate(idx[:, :3], max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, theirs)


def test_export_round_trips_through_transformers(tmp_path):
    """Loaded, exported (export_target picks Arcee for mlp "relu2"), read by transformers: the same logits; and
    load_checkpoint reads the export back to the same config."""
    from tritongpt.commands import export_target
    from tritongpt.train.arcee_weights import export_arcee

    hf, path = hf_arcee(tmp_path / "in", bias=True)
    model = load_checkpoint(path).double().eval()
    assert export_target(model.config)[0] == "Arcee"
    export_arcee(model, tmp_path / "out", eos_token_id=1)
    d = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (d["model_type"], d["hidden_act"], d["mlp_bias"], d["intermediate_size"]) == ("arcee", "relu2", True, 40)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    assert type(back).__name__ == "ArceeForCausalLM"
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(back(idx).logits, hf(idx).logits, 2e-6, "exported, read by transformers")
    again = load_checkpoint(tmp_path / "out" / "model.safetensors")
    assert again.config == GPTConfig(**{**model.config.to_dict(), "kernels": again.config.kernels})


@pytest.mark.parametrize("change,match", [
    ({"hidden_act": "silu"}, "hidden_act 'silu'; this model's Arcee MLP computes 'relu2'"),
    ({"attention_bias": True}, "attention_bias true and mlp_bias false; this model's linear layers have biases all "
                               "or none"),
    ({"sliding_window": 16}, "sliding_window 16; an Arcee attends to the whole context"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 500.0, "factor": 2.0}}, "type 'dynamic'"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 500.0, "short_factor": [1.0] * 8,
                          "long_factor": [1.0] * 8, "original_max_position_embeddings": 10}},
     "RoPE scaling of type 'longrope'; this model reads an Arcee's RoPE unscaled or scaled by"),
    ({"intermediate_size": 41}, "says intermediate_size 41, but the weights have 40"),
    ({"mlp_bias": "false"}, "config.json has mlp_bias 'false'; it must be true or false"),
], ids=["activation", "bias", "window", "dynamic", "longrope", "hidden", "bias-type"])
def test_what_this_model_does_not_compute_is_refused_by_name(hf_copy, tmp_path, change, match):
    path = hf_copy(hf_arcee, tmp_path)
    cfg_json = tmp_path / "config.json"
    cfg_json.write_text(json.dumps({**json.loads(cfg_json.read_text()), **change}))
    with pytest.raises(UserError, match=match):
        load_checkpoint(path)


def test_untied_by_default_and_a_gated_mlp_refused(hf_copy, tmp_path):
    """ArceeConfig unties the head when config.json does not say: a folder with no lm_head and no word is refused
    (transformers would start a random head), as the Llama family's; weights with a gate_proj are a gated MLP."""
    from safetensors.torch import load_file, save_file

    path = hf_copy(hf_arcee, tmp_path, tie=True)
    cfg_json = tmp_path / "config.json"
    d = json.loads(cfg_json.read_text())
    cfg_json.write_text(json.dumps({k: v for k, v in d.items() if k != "tie_word_embeddings"}))
    with pytest.raises(UserError, match="tie_word_embeddings"):
        load_checkpoint(path)
    cfg_json.write_text(json.dumps(d))
    sd = load_file(str(path))
    sd["model.layers.0.mlp.gate_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"].clone()
    save_file(sd, str(path), metadata={"format": "pt"})
    with pytest.raises(UserError, match="mlp.gate_proj, a gated \\(Llama's\\) MLP, where an Arcee's MLP has up_proj"):
        load_checkpoint(path)


def test_export_refuses_what_an_arcee_cannot_say(tmp_path):
    """A squared-ReLU model goes to the Arcee export, which names what an Arcee folder cannot hold."""
    from tritongpt.commands import export_target
    from tritongpt.train.arcee_weights import export_arcee

    base = dict(vocab_size=53, context_length=24, n_embd=32, n_layer=1, n_head=2, mlp="relu2", norm="rmsnorm",
                position_encoding="rope", bias=False)
    for change, match in (({"position_encoding": "learned"}, "where Arcee rotates q and k"),
                          ({"attention_window": 8}, "has local attention \\(attention_window 8\\)"),
                          ({"qk_norm": True}, "normalizes q and k \\(qk_norm\\)"),
                          ({"logit_softcap": 30.0}, "soft-caps its logits")):
        model = GPTModel(GPTConfig(**{**base, **change}))
        family, refuse, _ = export_target(model.config)
        assert family == "Arcee"
        with pytest.raises(UserError, match=match + ".*cannot be exported as an Arcee folder"):
            export_arcee(model, tmp_path / "x")
    # over LayerNorms it is a Nemotron's (train/nemotron_weights.py); the Arcee export still names the norm
    assert export_target(GPTConfig(**{**base, "norm": "layernorm"}))[0] == "Nemotron"
    with pytest.raises(UserError, match="normalizes with layernorm, where Arcee has RMSNorms"):
        export_arcee(GPTModel(GPTConfig(**{**base, "norm": "layernorm"})), tmp_path / "z")
    with pytest.raises(UserError, match="has a swiglu MLP, where Arcee's is up_proj, relu\\^2, down_proj"):
        export_arcee(GPTModel(GPTConfig(**{**base, "mlp": "swiglu"})), tmp_path / "y")
