"""GPT-BigCode (Hugging Face's GPTBigCodeForCausalLM: StarCoder 1, SantaCoder, WizardCoder: GPT-2 with multi-query
attention, c_attn's fused q, k, v C + 2 head_dim rows) read into GPTModel and exported back, against transformers on
tiny random models; multi_query false too (3C rows, per head)."""
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


def hf_bigcode(folder, tie=True, multi_query=True, eps=1e-6, **config):
    """A tiny random GPTBigCodeForCausalLM in float64 (3 heads of 16 over one key/value head unless multi_query is
    false, an MLP 4 x 48 wide), saved to folder, EOS and BOS 1. -> (the model, its model.safetensors)."""
    torch.manual_seed(0)
    cfg = transformers.GPTBigCodeConfig(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=3, n_positions=CTX,
                                        multi_query=multi_query, layer_norm_epsilon=eps, tie_word_embeddings=tie,
                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                                        eos_token_id=1, pad_token_id=0, **config)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).double().eval()
    with torch.no_grad():  # unit norm weights and zero biases would hide a mistake
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(folder)
    return hf, folder / "model.safetensors"


@pytest.mark.parametrize("tie,multi_query", [(True, True), (False, False)])
def test_loads_and_matches_transformers_on_both_paths(tmp_path, tie, multi_query):
    """Logits within 2e-6 of transformers' in float64, 1e-5 on the Triton path in fp32 (multi-query: the attention
    kernel's k, v with one head); c_attn's rows split as multi_query lays them out."""
    hf, path = hf_bigcode(tmp_path, tie=tie, multi_query=multi_query)
    model = load_checkpoint(path).double().eval()
    c = model.config
    assert (c.position_encoding, c.norm, c.mlp, c.gelu_approximate, c.kv_heads, c.bias, c.tie_weights,
            c.context_length) == ("learned", "layernorm", "gelu", "tanh", 1 if multi_query else 3, True, tie, CTX)
    logits_match_transformers(hf, model, VOCAB, T)


def test_decodes_over_the_cache_and_generates_transformers_tokens(tmp_path):
    from tritongpt.train.generate import generate

    hf, path = hf_bigcode(tmp_path)
    model = load_checkpoint(path).double().eval()
    idx = torch.randint(0, VOCAB, (1, 11))
    with torch.no_grad():
        want = hf(idx).logits
    decodes_like(model, idx, want)
    ours = generate(model, idx[:, :3], 10)
    theirs = hf.generate(idx[:, :3], max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, theirs)


def test_export_round_trips_through_transformers(tmp_path):
    """Loaded, exported (export_target picks GPT-BigCode for one key/value head), read by transformers: the same
    logits; and load_checkpoint reads the export back to the same config."""
    from tritongpt.commands import export_target
    from tritongpt.train.gpt_bigcode_weights import export_gpt_bigcode

    hf, path = hf_bigcode(tmp_path / "in", tie=False, activation_function="gelu")
    model = load_checkpoint(path).double().eval()
    assert export_target(model.config)[0] == "GPT-BigCode" and model.config.gelu_approximate == "none"
    export_gpt_bigcode(model, tmp_path / "out", eos_token_id=1)
    d = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (d["model_type"], d["multi_query"], d["activation_function"]) == ("gpt_bigcode", True, "gelu")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    assert type(back).__name__ == "GPTBigCodeForCausalLM"
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(back(idx).logits, hf(idx).logits, 2e-6, "exported, read by transformers")
    again = load_checkpoint(tmp_path / "out" / "model.safetensors")
    assert again.config == GPTConfig(**{**model.config.to_dict(), "kernels": again.config.kernels})


def test_multi_query_false_exports_as_gpt2_with_the_same_logits(tmp_path):
    """Without multi_query a GPT-BigCode is GPT-2's function: export_target writes it as a GPT-2 folder."""
    from tritongpt.commands import export_target

    hf, path = hf_bigcode(tmp_path / "in", multi_query=False, eps=1e-5)  # (GPT-2's eps: its folder says no other)
    model = load_checkpoint(path).double().eval()
    name, _, export = export_target(model.config)
    assert name == "GPT-2"
    export(model, tmp_path / "out", 1)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(back(idx).logits, hf(idx).logits, 2e-6, "as GPT-2, read by transformers")


@pytest.mark.parametrize("change,match", [
    ({"activation_function": "relu"}, "activation_function 'relu'; this model's GPT-BigCode MLP computes"),
    ({"add_cross_attention": True}, "add_cross_attention true: an encoder-decoder's cross-attention"),
    ({"multi_query": False}, "tensor h.0.attn.c_attn.weight has 80 rows; q, k and v of every head \\(3C\\) need 144"),
    ({"n_inner": 100}, "says n_inner 100, but the weights have 192"),
    ({"multi_query": "yes"}, "config.json has multi_query 'yes'; it must be true or false"),
], ids=["activation", "cross", "layout", "inner", "flag-type"])
def test_what_this_model_does_not_compute_is_refused_by_name(hf_copy, tmp_path, change, match):
    path = hf_copy(hf_bigcode, tmp_path)
    cfg_json = tmp_path / "config.json"
    cfg_json.write_text(json.dumps({**json.loads(cfg_json.read_text()), **change}))
    with pytest.raises(UserError, match=match):
        load_checkpoint(path)


def test_an_mlp_not_4_wide_is_refused_by_name(tmp_path):
    _, path = hf_bigcode(tmp_path, n_inner=40)
    with pytest.raises(UserError, match="the MLP is 40 wide \\(n_inner\\); this model's GELU MLP is 4 n_embd wide"):
        load_checkpoint(path)


def test_export_refuses_what_a_gpt_bigcode_cannot_say(tmp_path):
    from tritongpt.commands import export_target
    from tritongpt.train.gpt_bigcode_weights import export_gpt_bigcode

    base = dict(vocab_size=53, context_length=24, n_embd=32, n_layer=1, n_head=2, n_kv_head=1)
    for change, match in (({"logit_softcap": 30.0}, "soft-caps its logits"),
                          ({"attention_head_dim": 8}, "has heads of width 8 apart from n_embd / n_head"),
                          ({"norm_bias": False}, "has LayerNorms without biases")):
        model = GPTModel(GPTConfig(**{**base, **change}))
        assert export_target(model.config)[0] == "GPT-BigCode"
        with pytest.raises(UserError, match=match + ".*cannot be exported as a GPT-BigCode folder"):
            export_gpt_bigcode(model, tmp_path / "x")
    # local attention is GPT-Neo's (export_target goes there; GPT-Neo's refusal names the single key/value head)
    windowed = GPTModel(GPTConfig(**{**base, "attention_window": 8, "scale_attention": False, "qkv_bias": False}))
    assert export_target(windowed.config)[0] == "GPT-Neo"
    with pytest.raises(UserError, match="has local attention \\(attention_window 8\\).*cannot be exported as a "
                                        "GPT-BigCode folder"):
        export_gpt_bigcode(windowed, tmp_path / "w")
    with pytest.raises(UserError, match="has grouped-query attention \\(2 key/value heads\\)"):
        export_gpt_bigcode(GPTModel(GPTConfig(**{**base, "n_head": 4, "n_kv_head": 2})), tmp_path / "y")
