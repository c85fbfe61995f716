"""SmolLM3 (train/llama_weights.py): a Llama whose every fourth layer has no RoPE (NoPE: q and k not
rotated, GPTConfig.nope_layers), its sliding window, if any, in those layers. Tiny random
SmolLM3ForCausalLMs saved by transformers (float64, every tensor jittered): logits on both kernel paths,
the KV-cache decode, greedy tokens, export and back through transformers, refusals by name, and
pretrain --nope-layers. Nothing downloaded."""
import json

import pytest
import torch

from parity import assert_close_rel, decodes_like, hf_llama, logits_match_transformers, pretrain_argv
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.gpt2_weights import load_checkpoint

transformers = pytest.importorskip("transformers")

VOCAB, T = 61, 21


def test_smollm3_reads_its_nope_layers_and_matches_transformers(tmp_path):
    """Four layers: 3 without RoPE (transformers' no_rope_layer_interval 4). Logits on both
    paths, the decode over the cache on both, and greedy tokens are transformers'; rotating layer 3
    after all gives other logits, so the NoPE layer is what is tested."""
    hf, path = hf_llama(tmp_path, VOCAB, tie=True, kind="smollm3", layers=4)
    model = load_checkpoint(path).double().eval()
    c = model.config
    assert (c.nope_layers, c.attention_window, c.tie_weights) == ("3", 0, True)
    assert [b.att.rotary is None for b in model.trf_blocks] == [i == 3 for i in range(4)]
    logits_match_transformers(hf, model, VOCAB, T)
    idx = torch.randint(0, VOCAB, (2, 15))
    with torch.no_grad():
        want = hf(idx).logits
        decodes_like(model, idx, want)
        from tritongpt.train.generate import generate

        ours = generate(model, idx[:1, :3], 10)
        theirs = hf.generate(idx[:1, :3], max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert torch.equal(ours, theirs)
        model.trf_blocks[3].att.rotary = model.trf_blocks[2].att.rotary
        rotated = model(idx)
    assert ((rotated - want).norm() / want.norm()).item() > 0.01
    # a config.json without the list: every no_rope_layer_interval-th layer, as transformers fills it in
    cfg_json = tmp_path / "config.json"
    d = json.loads(cfg_json.read_text())
    assert d.pop("no_rope_layers") == [1, 1, 1, 0]
    for every, nope in ((4, "3"), (2, "1,3")):
        cfg_json.write_text(json.dumps({**d, "no_rope_layer_interval": every}))
        assert load_checkpoint(path).config.nope_layers == nope


def test_a_config_without_a_rope_base_reads_smollm3s_default_as_transformers(hf_copy, tmp_path):
    """A config.json that says no rope_theta: SmolLM3Config's base is 2000000 (in 4.x and 5), not Llama's 10000,
    which was read here: another model."""
    path = hf_copy(hf_llama, tmp_path, VOCAB, kind="smollm3")
    cfg_json = tmp_path / "config.json"
    d = json.loads(cfg_json.read_text())
    d["rope_parameters"].pop("rope_theta")
    cfg_json.write_text(json.dumps(d))
    theirs = transformers.AutoConfig.from_pretrained(tmp_path).rope_parameters["rope_theta"]
    assert load_checkpoint(path).config.rope_theta == theirs == 2e6


def test_smollm3_slides_its_window_over_the_nope_layers_and_takes_a_list(tmp_path):
    """use_sliding_window with no layer_types: the window is in the NoPE layers (transformers' default);
    a no_rope_layers list of its own is read as it is."""
    hf, path = hf_llama(tmp_path, VOCAB, kind="smollm3", layers=6, use_sliding_window=True, sliding_window=5,
                        no_rope_layers=[1, 0, 1, 1, 0, 1])
    model = load_checkpoint(path).double().eval()
    c = model.config
    assert (c.nope_layers, c.attention_window, c.window_layers) == ("1,4", 5, "1,4")
    logits_match_transformers(hf, model, VOCAB, T)


def test_export_round_trips_through_transformers_as_smollm3(tmp_path):
    from tritongpt.train.llama_weights import export_llama

    hf, path = hf_llama(tmp_path / "in", VOCAB, kind="smollm3", layers=5, bias=True)
    model = load_checkpoint(path).double().eval()
    assert (model.config.nope_layers, model.config.bias) == ("3", True)
    export_llama(model, tmp_path / "out", eos_token_id=0)
    d = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (d["model_type"], d["no_rope_layers"], d["attention_bias"]) == ("smollm3", [1, 1, 1, 0, 1], True)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(back(idx).logits, hf(idx).logits, 2e-6, "exported, read by transformers")
    again = load_checkpoint(tmp_path / "out" / "model.safetensors")
    assert again.config == GPTConfig(**{**model.config.to_dict(), "kernels": again.config.kernels})


def test_nope_layers_are_checked_and_exports_that_cannot_say_them_refuse(tmp_path):
    from tritongpt.train.gemma_weights import export_gemma
    from tritongpt.train.gpt2_weights import export_gpt2
    from tritongpt.train.llama_weights import export_llama

    for bad, match in (({"nope_layers": "3"}, "has position_encoding 'learned'"),
                       ({"nope_layers": "4", "position_encoding": "rope"}, "below n_layer 4"),
                       ({"nope_layers": "2,1", "position_encoding": "rope"}, "increasing")):
        with pytest.raises(UserError, match=match):
            GPTConfig(n_layer=4, **bad)
    rope = dict(vocab_size=VOCAB, context_length=32, n_embd=32, n_layer=4, n_head=2, position_encoding="rope",
                nope_layers="3")
    with pytest.raises(UserError, match="rotates q and k by their positions"):  # GPT-2: before the NoPE layers
        export_gpt2(GPTModel(GPTConfig(**rope)), tmp_path / "gpt2")
    with pytest.raises(UserError, match="does not rotate q and k in layers 3 .*where every Gemma 3 layer does"):
        export_gemma(GPTModel(GPTConfig(**rope, norm="rmsnorm", mlp="geglu", bias=False, scale_embeddings=True,
                                        post_norms=True, qk_norm=True)), tmp_path / "gemma")
    with pytest.raises(UserError, match="normalizes each head's q and k .* where SmolLM3"):
        export_llama(GPTModel(GPTConfig(**rope, norm="rmsnorm", mlp="swiglu", bias=False, qk_norm=True)),
                     tmp_path / "smol")


@pytest.mark.parametrize("flags,match", [({"no_rope_layers": [1, 0]}, "for each of the 4 layers"),
                                         ({"no_rope_layers": [1, 2, 1, 1]}, "for each of the 4 layers")],
                         ids=["length", "value"])
def test_a_malformed_no_rope_layers_is_refused_by_name(tmp_path, flags, match):
    _, path = hf_llama(tmp_path, VOCAB, kind="smollm3", layers=4)
    cfg_json = tmp_path / "config.json"
    cfg_json.write_text(json.dumps({**json.loads(cfg_json.read_text()), **flags}))
    with pytest.raises(UserError, match=match):
        load_checkpoint(path)


def test_pretrain_nope_layers_builds_them_and_resumes_only_as_it(corpus, tmp_path, capsys):
    from tritongpt.cli import main

    run = tmp_path / "run"
    assert main(pretrain_argv(corpus, run, "--position-encoding", "rope", "--nope-layers", "1,3",
                              "--max-steps", "1")) == 0
    assert "no RoPE in layers 1,3" in capsys.readouterr().out
    model = load_checkpoint(run)
    assert [b.att.rotary is None for b in model.trf_blocks] == [False, True, False, True]
    assert main(pretrain_argv(corpus, run, "--position-encoding", "rope", "--max-steps", "2", "--resume")) == 2
    assert "rotates q and k in every layer but 1,3, this run's model rotates q and k in every layer: pass " \
        "--nope-layers 1,3" in capsys.readouterr().err
