"""GPT-J: a shared-norm parallel block (GPTConfig.parallel_residual + shared_norm), an LM-head bias
(head_bias), no q/k/v or attention-output biases, and RoPE on the first rotary_dim dimensions of each head in
GPT-J's own pairing (2i, 2i + 1), which the loader turns into ours by reordering q's and k's rows
(train/gptj_weights.py). Tiny random GPTJForCausalLMs saved to tmp_path (float64, every tensor jittered so
each one counts): logits on both kernel paths, the KV-cache decode, greedy tokens, export round trips through
transformers (the attention output's bias folded into fc_out's), a pretrain --init step; what this model does
not compute refused by name. Nothing downloaded."""
import json

import pytest
import torch

from parity import a_head_of_its_own_is_kept, assert_close_rel, decodes_like, logits_match_transformers, pretrain_argv
from tritongpt.errors import UserError
from tritongpt.train.gpt2_weights import load_checkpoint

transformers = pytest.importorskip("transformers")

VOCAB, CTX, T = 53, 40, 23


def hf_gptj(folder, rotary=8, act="gelu_new", layers=2, vocab=VOCAB, context=CTX, **config):
    """A tiny random GPTJForCausalLM in float64 (4 heads of 16 over 64, `rotary` of each head's dimensions
    rotated), saved to folder, EOS and BOS 1. -> (the model, its model.safetensors)."""
    torch.manual_seed(0)
    cfg = transformers.GPTJConfig(vocab_size=vocab, n_embd=64, n_layer=layers, n_head=4, n_positions=context,
                                  rotary_dim=rotary, activation_function=act, layer_norm_epsilon=1e-6,
                                  bos_token_id=1, eos_token_id=1, **config)
    hf = transformers.GPTJForCausalLM(cfg).double().eval()
    with torch.no_grad():  # unit norm weights and zero biases would hide a mistake
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(folder)
    return hf, folder / "model.safetensors"


@pytest.mark.parametrize("rotary,act", [(8, "gelu_new"), (16, "gelu")], ids=["half-heads", "whole-heads-erf"])
def test_loads_its_fields_and_matches_transformers_on_both_paths(tmp_path, rotary, act):
    """GPT-J-6B's shape in small (a quarter of each head rotated there: half here), and whole heads with the
    exact GELU: logits on both paths are transformers'; without the rows' reordering they are not."""
    hf, path = hf_gptj(tmp_path, rotary, act)
    model = load_checkpoint(path).double().eval()
    c = model.config
    assert (c.parallel_residual, c.shared_norm, c.head_bias, c.tie_weights) == (True, True, True, False)
    assert (c.rotary_dim, c.rope_theta, c.gelu_approximate) == (0 if rotary == 16 else rotary, 10000.0,
                                                               "tanh" if act == "gelu_new" else "none")
    assert (c.bias, c.has_qkv_bias, c.norm_eps, c.n_layer, c.head_dim, c.context_length) == \
        (True, False, 1e-6, 2, 16, CTX)
    assert not hasattr(model.trf_blocks[0], "norm2") or model.trf_blocks[0].norm2 is None
    assert torch.count_nonzero(model.trf_blocks[0].att.out_proj.bias) == 0
    logits_match_transformers(hf, model, VOCAB, T)
    # the check has teeth: q and k in GPT-J's own row order rotate other pairs
    from tritongpt.train.gptj_weights import half_split_order

    back = torch.argsort(half_split_order(16, rotary))
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        want = hf(idx).logits
        for b in model.trf_blocks:
            for lin in (b.att.W_query, b.att.W_key):
                lin.weight.copy_(lin.weight.reshape(4, 16, 64)[:, back].reshape(64, 64))
        assert ((model(idx) - want).norm() / want.norm()).item() > 1e-3


def test_decodes_over_the_cache_and_generates_transformers_tokens(tmp_path):
    hf, path = hf_gptj(tmp_path)
    model = load_checkpoint(path).double().eval()
    idx = torch.randint(0, VOCAB, (1, 13))
    with torch.no_grad():
        decodes_like(model, idx, hf(idx).logits)
    from tritongpt.train.generate import generate

    ours = generate(model, idx[:, :3], 10)
    theirs = hf.generate(idx[:, :3], max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("rotary,act", [(8, "gelu_new"), (16, "gelu")], ids=["half-heads", "whole-heads-erf"])
def test_export_round_trips_through_transformers_with_the_output_bias_folded(tmp_path, rotary, act):
    """Loaded, its attention output's bias made nonzero (as training makes it), exported, read by
    transformers' AutoModelForCausalLM: the same logits as ours (the bias folded into fc_out's: a GPT-J has
    no other place for it), q and k in GPT-J's order again; load_checkpoint reads the export back."""
    from tritongpt.model.config import GPTConfig
    from tritongpt.train.gptj_weights import export_gptj

    hf, path = hf_gptj(tmp_path / "in", rotary, act)
    model = load_checkpoint(path).double().eval()
    with torch.no_grad():
        for b in model.trf_blocks:
            b.att.out_proj.bias.normal_(0, 0.3)
    export_gptj(model, tmp_path / "out", eos_token_id=1)
    d = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (d["model_type"], d["rotary_dim"], d["activation_function"], d["tie_word_embeddings"]) == \
        ("gptj", rotary, act, False)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    assert type(back).__name__ == "GPTJForCausalLM"
    for name in ("q_proj", "k_proj"):  # GPT-J's row order again (loaded through fp32: to its rounding)
        theirs, ours = (getattr(m.transformer.h[1].attn, name).weight for m in (hf, back))
        assert torch.allclose(ours, theirs, rtol=1e-6, atol=0)
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(back(idx).logits, model(idx), 2e-6, "exported, against ours")
    again = load_checkpoint(tmp_path / "out" / "model.safetensors").double().eval()
    assert again.config == GPTConfig(**{**model.config.to_dict(), "kernels": again.config.kernels})
    with torch.no_grad():
        # the folded bias b_o + b_2 is read back in fp32, as load_checkpoint reads every weight (the rest of
        # model's were fp32 values already): 9e-10 here
        assert_close_rel(again(idx), model(idx), 1e-8, "read back")
    with pytest.raises(UserError, match="already holds a model"):
        export_gptj(model, tmp_path / "out")


def test_a_tied_head_loads_as_transformers_ties_it_and_exports_so(tmp_path):
    """tie_word_embeddings true: GPTJForCausalLM ties lm_head.weight to wte (its bias stays its own) and
    save_pretrained leaves lm_head.weight out. That folder was refused as missing lm_head.weight: it loads tied,
    with transformers' logits, and exports tied, which transformers reads back to the same logits."""
    from tritongpt.train.gptj_weights import export_gptj

    hf, path = hf_gptj(tmp_path / "in", layers=1, tie_word_embeddings=True)
    model = load_checkpoint(path).double().eval()
    assert (model.config.tie_weights, model.config.head_bias) == (True, True)
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(model(idx), hf(idx).logits, 2e-6, "tied head")
    export_gptj(model, tmp_path / "out", eos_token_id=1)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    with torch.no_grad():
        assert_close_rel(back(idx).logits, model(idx), 2e-6, "exported tied, read by transformers")


def test_a_head_of_its_own_beside_tie_word_embeddings_is_read_as_transformers_reads_it(hf_copy, tmp_path):
    """tie_word_embeddings true, but the file holds an lm_head.weight unlike wte: transformers 5 loads the
    file's head (ties only what the file leaves out), and so must we: tied, the head would be wte, another model."""
    path = hf_copy(hf_gptj, tmp_path, layers=1, tie_word_embeddings=True)
    a_head_of_its_own_is_kept(path, "transformer.wte.weight", VOCAB, T)


def test_the_head_is_tied_by_every_readers_rule(hf_copy, tmp_path):
    """GPT-J's tie is gpt2_weights.tied_head's, as every other reader's: untied (as save_pretrained wrote it) beside
    no lm_head.weight is refused by name, where transformers would start a random head (it was refused as a missing
    tensor, naming no field); a head equal to wte is the embedding, as the weights say."""
    from safetensors.torch import load_file, save_file

    path = hf_copy(hf_gptj, tmp_path)  # (the refusal tests' build, made once)
    sd = load_file(path)
    sd["lm_head.weight"] = sd["transformer.wte.weight"].clone()
    save_file(sd, path, metadata={"format": "pt"})
    assert load_checkpoint(path).config.tie_weights
    del sd["lm_head.weight"]
    save_file(sd, path, metadata={"format": "pt"})
    with pytest.raises(UserError, match="config.json says tie_word_embeddings false, but the weights beside it have "
                                        "no lm_head.weight: transformers would start a random LM head"):
        load_checkpoint(path)


@pytest.mark.parametrize("change,match", [
    ({"activation_function": "relu"}, "activation_function 'relu'; this model's GELU MLP computes"),
    ({"n_inner": 100}, r"an MLP 256 wide \(n_inner 100\)"),
    ({"rotary_dim": None}, "rotary_dim None; it must be an even number"),
    ({"rotary_dim": 7}, "rotary_dim 7; it must be an even number"),
    ({"n_head": 5}, "n_head 5, which does not divide the weights' width 64"),
    ({"n_head": 0}, r"config\.json says n_head 0; it must be a positive integer"),  # (gpt2_weights.head_count)
    ({"model_type": "gpt_neox"}, None),
    # bool("false") is True: a flag spelled as a string is refused by name
    ({"tie_word_embeddings": "true"}, "config.json has tie_word_embeddings 'true'; it must be true or false"),
    # a field passed on as config.json gives it, which GPTConfig refuses: named with the file and its key
    ({"n_positions": 40.0},
     r"config\.json: n_positions \(GPTConfig\.context_length\) must be a positive integer, got 40\.0"),
], ids=["activation", "mlp-width", "rotary-null", "rotary-odd", "heads", "heads-zero", "not-gptj", "tie-type",
        "context-float"])
def test_what_this_model_does_not_compute_is_refused_by_name(hf_copy, tmp_path, change, match):
    from tritongpt.train.gptj_weights import load_gptj_safetensors

    path = hf_copy(hf_gptj, tmp_path)
    cfg_json = tmp_path / "config.json"
    cfg_json.write_text(json.dumps({**json.loads(cfg_json.read_text()), **change}))
    with pytest.raises(UserError, match=match or "says model_type 'gpt_neox'; a GPT-J folder's is gptj"):
        load_gptj_safetensors(path)


def test_a_config_without_rotary_dim_is_read_as_transformers_reads_it(tmp_path):
    """GPTJConfig's rotary_dim is 64 when config.json says none: wider than these heads of 16, refused by name."""
    _, path = hf_gptj(tmp_path)
    cfg_json = tmp_path / "config.json"
    d = json.loads(cfg_json.read_text())
    d.pop("rotary_dim")
    cfg_json.write_text(json.dumps(d))
    assert transformers.AutoConfig.from_pretrained(tmp_path).rotary_dim == 64
    with pytest.raises(UserError, match=r"rotary_dim 64; it must be an even number of dimensions in \[2, 16\]"):
        load_checkpoint(path)


def test_other_exports_refuse_it_and_it_refuses_what_gptj_cannot_say(tmp_path):
    from tritongpt.model.config import GPTConfig
    from tritongpt.model.gpt import GPTModel
    from tritongpt.train.gpt2_weights import export_gpt2
    from tritongpt.train.gptj_weights import export_gptj
    from tritongpt.train.neox_weights import export_neox

    _, path = hf_gptj(tmp_path / "in")
    model = load_checkpoint(path)
    with pytest.raises(UserError, match="cannot be exported as a GPT-NeoX folder"):
        export_neox(model, tmp_path / "neox")
    with pytest.raises(UserError, match="cannot be exported as a GPT-2"):
        export_gpt2(model, tmp_path / "gpt2")
    for change, match in (({"rope_theta": 500.0}, "RoPE base 500, where GPT-J's is 10000"),
                          ({"n_kv_head": 2}, "grouped-query attention"),
                          ({"qkv_bias": True}, "has biases on q, k and v, where GPT-J has none"),
                          ({"head_bias": False}, "has no LM-head bias, where GPT-J has one")):
        other = GPTModel(GPTConfig(**{**model.config.to_dict(), **change}))
        with pytest.raises(UserError, match=match):
            export_gptj(other, tmp_path / "x")


def test_pretrain_from_a_gptj_folder_then_export_picks_gptj(tmp_path, corpus):
    """One step of `pretrain --init <GPT-J folder>` (the tokenizer's vocabulary fits in the model's), then
    `export`: the run's model goes out as a GPT-J, which transformers reads."""
    from tritongpt.cli import main

    hf_gptj(tmp_path / "in", vocab=300, context=64)
    run = tmp_path / "run"
    assert main(pretrain_argv(corpus, run, "--init", str(tmp_path / "in"), "--max-steps", "1")) == 0
    model = load_checkpoint(run).eval()
    assert (model.config.shared_norm, model.config.head_bias, model.config.rotary_dim) == (True, True, 8)
    assert main(["export", str(run), "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "gptj"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    idx = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        assert_close_rel(back(idx).logits, model(idx), 1e-5, "transformers on the export")
