"""MPT: ALiBi, no biases on the projections or the LayerNorms (bias False, norm_bias False), q, k and v stacked in
Wqkv, the exact GELU (train/mpt_weights.py). Tiny random MptForCausalLMs saved to tmp_path (float64, every tensor
jittered so each one counts): logits on both kernel paths, the KV-cache decode, greedy tokens, export round
trips through transformers; what this model does not compute refused by name. Nothing downloaded."""
import json

import pytest
import torch

from parity import assert_close_rel, decodes_like, logits_match_transformers, pretrain_argv
from tritongpt.errors import UserError
from tritongpt.train.gpt2_weights import load_checkpoint

transformers = pytest.importorskip("transformers")

VOCAB, CTX, T = 53, 40, 23


def hf_mpt(folder, heads=4, width=64, layers=2, vocab=VOCAB, attn=None, **config):
    """A tiny random MptForCausalLM in float64 (heads of width / heads), saved to folder, EOS and BOS 1.
    -> (the model, its model.safetensors)."""
    torch.manual_seed(0)
    cfg = transformers.MptConfig(vocab_size=vocab, d_model=width, n_layers=layers, n_heads=heads, max_seq_len=CTX,
                                 layer_norm_epsilon=1e-6, bos_token_id=1, eos_token_id=1, attn_config=attn or {},
                                 **config)
    hf = transformers.MptForCausalLM(cfg).double().eval()
    with torch.no_grad():  # unit norm weights would hide a mistake
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(folder)
    return hf, folder / "model.safetensors"


@pytest.mark.parametrize("heads,width", [(4, 64), (6, 96)], ids=["4-heads", "6-heads"])
def test_loads_and_matches_transformers_on_both_paths(tmp_path, heads, width):
    hf, path = hf_mpt(tmp_path, heads, width)
    model = load_checkpoint(path).double().eval()
    c = model.config
    assert (c.position_encoding, c.bias, c.has_qkv_bias, c.norm_bias, c.embed_norm, c.gelu_approximate,
            c.tie_weights, c.context_length) == ("alibi", False, False, False, False, "none", True, CTX)
    assert not any(n.endswith(".bias") for n, _ in model.named_parameters())
    logits_match_transformers(hf, model, VOCAB, T)


def test_decodes_over_the_cache_and_generates_transformers_tokens(tmp_path):
    hf, path = hf_mpt(tmp_path)
    model = load_checkpoint(path).double().eval()
    idx = torch.randint(0, VOCAB, (1, 13))
    with torch.no_grad():
        decodes_like(model, idx, hf(idx).logits)
    from tritongpt.train.generate import generate

    ours = generate(model, idx[:, :3], 10)
    theirs = hf.generate(idx[:, :3], max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_export_round_trips_through_transformers(tmp_path, tie):
    """Loaded, exported, read by transformers' AutoModelForCausalLM: the same logits, and load_checkpoint reads
    the export back to the same config."""
    from tritongpt.train.mpt_weights import export_mpt

    hf, path = hf_mpt(tmp_path / "in", tie_word_embeddings=tie)
    model = load_checkpoint(path).double().eval()
    assert model.config.tie_weights == tie
    export_mpt(model, tmp_path / "out", eos_token_id=1)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    assert type(back).__name__ == "MptForCausalLM"
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(back(idx).logits, hf(idx).logits, 2e-6, "exported, read by transformers")
    again = load_checkpoint(tmp_path / "out" / "model.safetensors")
    assert again.config.to_dict() == {**model.config.to_dict(), "kernels": again.config.kernels}


@pytest.mark.parametrize("change,match", [
    ({"attn_config": {"clip_qkv": 6.0}}, r"attn_config.clip_qkv 6.0; this model computes None only"),
    ({"attn_config": {"qk_ln": True}}, r"attn_config.qk_ln True"),
    ({"attn_config": {"softmax_scale": 0.5}}, r"attn_config.softmax_scale 0.5; this model scales the scores by "
                                              r"1/sqrt\(head_dim\)"),
    ({"attn_config": {"alibi_bias_max": 16}}, r"attn_config.alibi_bias_max 16"),
    ({"attn_config": {"alibi": False}}, r"attn_config.alibi False"),
    ({"attn_config": {"prefix_lm": True}}, r"attn_config.prefix_lm True"),
    ({"attn_config": {"attn_type": "multiquery_attention"}}, r"attn_config.attn_type 'multiquery_attention'"),
    ({"logit_scale": 2.0}, "logit_scale 2.0"),
    ({"no_bias": False}, "no_bias False"),
    ({"expansion_ratio": 2}, "expansion_ratio 2"),
    ({"n_heads": 5}, "n_heads 5, which does not divide the weights' width 64"),
    ({"n_heads": "4"}, r"config\.json says n_heads '4'; it must be a positive integer"),  # (gpt2_weights.head_count)
    ({"n_layers": 3}, "n_layers 3, but the weights have 2"),
    # a field passed on as config.json gives it, which GPTConfig refuses: named with the file and its key
    ({"max_seq_len": 40.0},
     r"config\.json: max_seq_len \(GPTConfig\.context_length\) must be a positive integer, got 40\.0"),
], ids=["clip-qkv", "qk-ln", "softmax-scale", "alibi-bias-max", "no-alibi", "prefix-lm", "multiquery",
        "logit-scale", "biases", "expansion", "heads-mismatch", "heads-type", "layers", "context-float"])
def test_what_this_model_does_not_compute_is_refused_by_name(hf_copy, tmp_path, change, match):
    path = hf_copy(hf_mpt, tmp_path)
    cfg_json = tmp_path / "config.json"
    d = json.loads(cfg_json.read_text())
    d = {**d, **change, "attn_config": {**d["attn_config"], **change.get("attn_config", {})}}
    cfg_json.write_text(json.dumps(d))
    with pytest.raises(UserError, match=match):
        load_checkpoint(path)


@pytest.mark.parametrize("extra,match", [("transformer.wpe.weight", "a learned position table"),
                                         ("transformer.blocks.0.attn.Wqkv.bias", "holds biases")],
                         ids=["wpe", "bias"])
def test_tensors_an_mpt_does_not_have_are_refused(tmp_path, extra, match):
    """A position table beside ALiBi or a bias tensor (a no_bias MPT has none): refused by the file's tensors,
    whatever config.json says."""
    from safetensors.torch import load_file, save_file

    _, path = hf_mpt(tmp_path)
    sd = load_file(path)
    sd[extra] = torch.randn(CTX if "wpe" in extra else 3 * 64, 64, dtype=torch.float64)
    save_file(sd, path, metadata={"format": "pt"})
    with pytest.raises(UserError, match=match):
        load_checkpoint(path)


@pytest.mark.parametrize("H", [2, 6, 8, 12, 48])
def test_slopes_are_mpts(H):
    """MPT's rule (the next power of two's slopes, odd positions first, at alibi_bias_max 8) is BLOOM's, ours, for
    any head count: build_mpt_alibi_tensor's bias one key back is -m_h."""
    from tritongpt.model.layers import alibi_slopes

    theirs = -transformers.models.mpt.modeling_mpt.build_mpt_alibi_tensor(H, 2)[:, 0, 0]
    assert torch.allclose(theirs.float(), alibi_slopes(H), rtol=1e-6, atol=0)


def test_pretrain_from_an_mpt_folder_then_export_picks_mpt(tmp_path, corpus):
    """One step of `pretrain --init <MPT folder>` (no norm biases to train: norm_bias False keeps them out),
    then `export`: the run's model goes out as an MPT, which transformers reads."""
    from tritongpt.cli import main

    hf_mpt(tmp_path / "in", vocab=300)
    run = tmp_path / "run"
    assert main(pretrain_argv(corpus, run, "--init", str(tmp_path / "in"), "--max-steps", "1")) == 0
    model = load_checkpoint(run).eval()
    assert (model.config.norm_bias, model.config.bias, model.config.position_encoding) == (False, False, "alibi")
    assert main(["export", str(run), "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "mpt"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    idx = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        assert_close_rel(back(idx).logits, model(idx), 1e-5, "transformers on the export")


def small(**fields):
    from tritongpt.model.config import GPTConfig
    from tritongpt.model.gpt import GPTModel

    return GPTModel(GPTConfig(**{**dict(vocab_size=VOCAB, n_embd=64, n_layer=1, n_head=4, position_encoding="alibi",
                                        bias=False, norm_bias=False, gelu_approximate="none"), **fields}))


@pytest.mark.parametrize("fields,match", [
    (dict(norm_bias=True), r"has LayerNorm biases, where MPT's LayerNorms have none"),
    (dict(bias=True), "has projection biases, where MPT .no_bias. has none"),
    (dict(qkv_bias_only=True), "has projection biases"),
    (dict(gelu_approximate="tanh"), "computes the tanh GELU"),
    (dict(n_head=2, n_kv_head=1, n_embd=32), "1 key/value heads for 2 query heads"),
    (dict(embed_norm=True), r"normalizes its token embeddings \(embed_norm"),
    (dict(head_bias=True), "LM-head bias"),
    (dict(parallel_residual=True), "parallel blocks"),
], ids=["norm-bias", "bias", "qkv-bias", "tanh", "gqa", "embed-norm", "head-bias", "parallel"])
def test_export_refuses_what_mpt_cannot_say(tmp_path, fields, match):
    from tritongpt.train.mpt_weights import export_mpt

    with pytest.raises(UserError, match=match):
        export_mpt(small(**fields), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fields,family,match", [
    (dict(), "MPT", None),
    (dict(bias=True), "MPT", "has LayerNorm biases|projection biases"),
    (dict(norm_bias=True), "MPT", "has LayerNorm biases"),
    (dict(position_encoding="rope"), "Falcon", r"LayerNorms without biases \(norm_bias False\)"),
    (dict(norm_bias=True, bias=True), "GPT-2", r"biases each head's attention scores by distance \(ALiBi"),
], ids=["mpt", "linear-biases", "norm-biases", "rope-is-falcon", "alibi-with-biases-is-refused"])
def test_export_target_routes_alibi_without_biases_to_mpt(fields, family, match):
    from tritongpt.commands import export_target

    model = small(**fields)
    got, refuse, _ = export_target(model.config)
    assert got == family
    if match is None:
        refuse(model, "x")
    else:
        with pytest.raises(UserError, match=match):
            refuse(model, "x")
