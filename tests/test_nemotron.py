"""Nemotron (Hugging Face's NemotronForCausalLM: LayerNorm1P, (1 + w) x-hat + b; the squared-ReLU MLP up_proj /
down_proj; RoPE over half of each head; grouped-query attention) read into GPTModel and exported back, against
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


def hf_nemotron(folder, tie=False, bias=False, **config):
    """A tiny random NemotronForCausalLM in float64 (3 heads of 16 over 1 key/value head, an MLP 40 wide, RoPE over
    NemotronConfig's default half of each head), saved to folder, EOS and BOS 1. -> (the model, its
    model.safetensors)."""
    torch.manual_seed(0)
    cfg = transformers.NemotronConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
                                      num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=CTX,
                                      norm_eps=1e-6, tie_word_embeddings=tie, attention_bias=bias, mlp_bias=bias,
                                      bos_token_id=1, eos_token_id=1, pad_token_id=0, **config)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).double().eval()
    with torch.no_grad():  # LayerNorm1P's weights start at 0 (a scale of 1): moved off it, so a lost + 1 shows
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(folder)
    return hf, folder / "model.safetensors"


@pytest.mark.parametrize("tie,bias", [(False, False), (True, True)])
def test_loads_and_matches_transformers_on_both_paths(tmp_path, tie, bias):
    """Logits within 2e-6 of transformers' in float64, 1e-5 on the Triton path in fp32 (kernels/mlp.py's RELU2,
    layernorm.py's LayerNorm over the folded 1 + w); RoPE over 8 of each head's 16 dimensions."""
    hf, path = hf_nemotron(tmp_path, tie=tie, bias=bias)
    model = load_checkpoint(path).double().eval()
    c = model.config
    assert (c.norm, c.mlp, c.ff_hidden, c.rotary_dim, c.bias, c.kv_heads, c.tie_weights) == \
        ("layernorm", "relu2", 40, 8, bias, 1, tie)
    logits_match_transformers(hf, model, VOCAB, T)


def test_decodes_over_the_cache_and_generates_transformers_tokens(tmp_path):
    from tritongpt.train.generate import generate

    hf, path = hf_nemotron(tmp_path)
    model = load_checkpoint(path).double().eval()
    idx = torch.randint(0, VOCAB, (1, 11))
    with torch.no_grad():
        want = hf(idx).logits
    decodes_like(model, idx, want)
    ours = generate(model, idx[:, :3], 10)
    theirs = hf.generate(idx[:, :3], max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, theirs)


def test_export_round_trips_through_transformers(tmp_path):
    """Loaded, exported (export_target picks Nemotron for mlp "relu2" over LayerNorms), read by transformers: the
    same logits; the norms written back as LayerNorm1P's w = s - 1; and load_checkpoint reads the export back to
    the same config."""
    from safetensors.torch import load_file

    from tritongpt.commands import export_target
    from tritongpt.train.nemotron_weights import export_nemotron

    hf, path = hf_nemotron(tmp_path / "in", bias=True)
    model = load_checkpoint(path).double().eval()
    assert export_target(model.config)[0] == "Nemotron"
    export_nemotron(model, tmp_path / "out", eos_token_id=1)
    d = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (d["model_type"], d["hidden_act"], d["partial_rotary_factor"], d["intermediate_size"]) == \
        ("nemotron", "relu2", 0.5, 40)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    assert type(back).__name__ == "NemotronForCausalLM"
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(back(idx).logits, hf(idx).logits, 2e-6, "exported, read by transformers")
    again = load_checkpoint(tmp_path / "out" / "model.safetensors")
    assert again.config == GPTConfig(**{**model.config.to_dict(), "kernels": again.config.kernels})
    # in fp32 the file's w = s - 1 is not the w read bit for bit (w + 1 dropped its low bits), but the scale
    # transformers computes from it, w + 1.0, is our s exactly (s - 1 is exact for s >= 0.5)
    model.float()
    export_nemotron(model, tmp_path / "fp32", eos_token_id=1)
    written = load_file(str(tmp_path / "fp32" / "model.safetensors"))
    for ours, theirs in (("final_norm", "model.norm"), ("trf_blocks.1.norm1", "model.layers.1.input_layernorm")):
        s = model.get_submodule(ours).weight.detach()
        assert s.dtype == written[theirs + ".weight"].dtype == torch.float32 and (s >= 0.5).all()
        assert torch.equal(written[theirs + ".weight"] + 1.0, s), theirs


@pytest.mark.parametrize("change,match", [
    ({"hidden_act": "silu"}, "hidden_act 'silu'; this model's Nemotron MLP computes 'relu2'"),
    ({"attention_bias": True}, "attention_bias true and mlp_bias false; this model's linear layers have biases all "
                               "or none"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0,
                          "partial_rotary_factor": 0.5}}, "type 'dynamic'"),
    ({"partial_rotary_factor": 0.25, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
     None),
    ({"partial_rotary_factor": 0.0, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
     "partial rotary factor 0.0; it must be a number in \\(0, 1\\]"),
    ({"intermediate_size": 41}, "says intermediate_size 41, but the weights have 40"),
], ids=["activation", "bias", "dynamic", "quarter", "zero-factor", "hidden"])
def test_what_this_model_does_not_compute_is_refused_by_name(hf_copy, tmp_path, change, match):
    path = hf_copy(hf_nemotron, tmp_path)
    cfg_json = tmp_path / "config.json"
    cfg_json.write_text(json.dumps({**json.loads(cfg_json.read_text()), **change}))
    if match is None:  # a flat partial_rotary_factor (4.x's) is read: a quarter of 16 is 4
        assert load_checkpoint(path).config.rotary_dim == 4
        return
    with pytest.raises(UserError, match=match):
        load_checkpoint(path)


def test_export_refuses_what_a_nemotron_cannot_say(tmp_path):
    """A squared-ReLU model over LayerNorms goes to the Nemotron export (over RMSNorms to Arcee's), which names
    what a Nemotron folder cannot hold."""
    from tritongpt.commands import export_target
    from tritongpt.train.nemotron_weights import export_nemotron

    base = dict(vocab_size=53, context_length=24, n_embd=32, n_layer=1, n_head=2, mlp="relu2", norm="layernorm",
                position_encoding="rope", bias=False)
    assert export_target(GPTConfig(**{**base, "norm": "rmsnorm"}))[0] == "Arcee"
    for change, match in (({"position_encoding": "learned"}, "where Nemotron rotates q and k"),
                          ({"norm_bias": False}, "has LayerNorms without biases"),
                          ({"attention_window": 8}, "has local attention \\(attention_window 8\\)"),
                          ({"qk_norm": True}, "normalizes q and k \\(qk_norm\\)"),
                          ({"parallel_residual": True}, "runs attention and the MLP in parallel")):
        model = GPTModel(GPTConfig(**{**base, **change}))
        assert export_target(model.config)[0] == "Nemotron"
        with pytest.raises(UserError, match=match + ".*cannot be exported as a Nemotron folder"):
            export_nemotron(model, tmp_path / "x")
    with pytest.raises(UserError, match="normalizes with rmsnorm, where Nemotron has LayerNorms"):
        export_nemotron(GPTModel(GPTConfig(**{**base, "norm": "rmsnorm"})), tmp_path / "y")
