"""Phi-3 and Phi-4: a Llama whose q/k/v and gate/up tensors are fused, with a sliding window over every
layer (Phi-3-mini-4k), a partial rotary (Phi-4-mini) and LongRoPE (the 128k models) (train/phi3_weights.py).
Tiny random transformers Phi3ForCausalLM models saved to tmp_path (float64, every tensor jittered so each
one counts): logits on both kernel paths, the KV-cache decode, greedy tokens across LongRoPE's switch,
export round trips through transformers, a pretrain --init step; what this model does not compute refused
by name. Nothing downloaded."""
import json

import pytest
import torch

from parity import assert_close_rel, decode_token_by_token, logits_match_transformers, pretrain_argv, rope_reads
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.gpt2_weights import load_checkpoint

transformers = pytest.importorskip("transformers")

VOCAB, CTX, T = 53, 40, 23
ORIGINAL = 8  # LongRoPE's pretraining context in these tests: T = 7 is short, T = 23 long


def longrope(rotated=12, seed=3):
    """LongRoPE's per-frequency factors for `rotated` dimensions: short ones near 1, long ones up to 6, all
    different so that a swapped list or frequency fails the logits."""
    g = torch.Generator().manual_seed(seed)
    short = (1 + torch.rand(rotated // 2, generator=g)).tolist()
    long = (1 + 5 * torch.rand(rotated // 2, generator=g)).tolist()
    return {"rope_type": "longrope", "rope_theta": 300.0, "short_factor": short, "long_factor": long}


def hf_phi3(folder, layers=2, kv_heads=2, tie=False, context=CTX, vocab=VOCAB, **config):
    """A tiny random Phi3ForCausalLM in float64 (4 heads of 16 over n_embd 64), saved to folder, EOS 1 and
    BOS 2. -> (the model, its model.safetensors)."""
    torch.manual_seed(0)
    config = {"rope_parameters": {"rope_type": "default", "rope_theta": 5000.0}, "sliding_window": None, **config}
    cfg = transformers.Phi3Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=88, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=context, original_max_position_embeddings=ORIGINAL,
        tie_word_embeddings=tie, rms_norm_eps=1e-6, bos_token_id=2, eos_token_id=1, pad_token_id=0, **config)
    hf = transformers.Phi3ForCausalLM(cfg).double().eval()
    with torch.no_grad():  # unit norm weights would hide a mistake
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(folder)
    return hf, folder / "model.safetensors"


def test_phi3_splits_its_fused_tensors_and_matches_transformers(tmp_path):
    """Phi-3-mini's shape: q, k and v rows in one qkv_proj (GQA: 4 query heads, 2 key/value heads), gate and
    up in one gate_up_proj, a sliding window over every layer."""
    hf, path = hf_phi3(tmp_path, sliding_window=5)
    model = load_checkpoint(path).double().eval()
    c = model.config
    assert (c.attention_window, c.window_layers, c.kv_heads, c.head_dim, c.mlp_hidden, c.rope_theta) == \
        (5, "all", 2, 16, 88, 5000.0)
    assert (c.norm, c.mlp, c.bias, c.tie_weights, c.rotary_dim, c.rope_scaling) == \
        ("rmsnorm", "swiglu", False, False, 0, None)
    qkv = hf.model.layers[1].self_attn.qkv_proj.weight.float()  # loaded as fp32 parameters
    att = model.trf_blocks[1].att
    assert torch.equal(torch.cat([att.W_query.weight, att.W_key.weight, att.W_value.weight]).float(), qkv)
    ff = model.trf_blocks[1].ff
    assert torch.equal(ff.w_gate.weight.float(), hf.model.layers[1].mlp.gate_up_proj.weight[:88].float())
    logits_match_transformers(hf, model, VOCAB, T)


@pytest.mark.parametrize("T", [7, T], ids=["short", "long"])
def test_phi4_mini_partial_rotary_and_longrope_match_transformers(tmp_path, T):
    """Phi-4-mini's shape: 12 of each head's 16 dimensions rotated (partial_rotary_factor 0.75), LongRoPE over
    an original context of 8 (short factors at T = 7, long ones at 23), its attention factor from
    factor = 40 / 8, the embedding tied."""
    hf, path = hf_phi3(tmp_path, tie=True, rope_parameters={**longrope(), "partial_rotary_factor": 0.75})
    model = load_checkpoint(path).double().eval()
    c = model.config
    assert (c.rotary_dim, c.tie_weights, c.rope_scaling["rope_type"], c.rope_scaling["factor"]) == \
        (12, True, "longrope", 5.0)
    assert c.rope_scaling["original_max_position_embeddings"] == ORIGINAL
    logits_match_transformers(hf, model, VOCAB, T)


def test_greedy_tokens_and_the_cache_cross_longropes_switch_as_transformers(tmp_path):
    """Generating past the original context: transformers rotates the new tokens with the long factors once
    the sequence is longer than 8, the cached keys keeping their short rotation; so does our cache."""
    hf, path = hf_phi3(tmp_path, rope_parameters={**longrope(16), "partial_rotary_factor": 1.0})
    model = load_checkpoint(path).double().eval()
    from tritongpt.train.generate import generate

    idx = torch.randint(0, VOCAB, (1, 3))
    ours = generate(model, idx, 12)
    theirs = hf.generate(idx, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, theirs)
    # a prefill past the original context: every token long, on the cache as without it
    idx = torch.randint(0, VOCAB, (1, 15))
    with torch.no_grad():
        _, decoded, _ = decode_token_by_token(model, idx, prefill=10, whole=False)
        assert_close_rel(decoded, hf(idx).logits, 2e-6, "decoded over the cache")


@pytest.mark.parametrize("kw", [{"sliding_window": 5}, {"tie": True, "rope_parameters": {
    **longrope(), "partial_rotary_factor": 0.75}}], ids=["phi3-window", "phi4-mini"])
def test_export_round_trips_through_transformers(tmp_path, kw):
    """Loaded, exported as Phi-3, read by transformers' AutoModelForCausalLM: the same logits (short and long
    sequences), and load_checkpoint reads the export back to the same config."""
    from tritongpt.train.phi3_weights import export_phi3

    hf, path = hf_phi3(tmp_path / "in", **kw)
    model = load_checkpoint(path).double().eval()
    export_phi3(model, tmp_path / "out", eos_token_id=1)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "phi3"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    assert type(back).__name__ == "Phi3ForCausalLM"
    for length in (7, T):
        idx = torch.randint(0, VOCAB, (2, length))
        with torch.no_grad():
            assert_close_rel(back(idx).logits, hf(idx).logits, 2e-6, f"exported, read by transformers, T={length}")
    again = load_checkpoint(tmp_path / "out" / "model.safetensors")
    assert again.config == GPTConfig(**{**model.config.to_dict(), "kernels": again.config.kernels})
    with pytest.raises(UserError, match="already holds a model"):
        export_phi3(model, tmp_path / "out")


def test_sharded_folders_and_older_rope_names_load(tmp_path):
    """The Hub's Phi-3-mini-128k config says rope_scaling {"type": "su", ...} flat, original_max_position_embeddings
    at the top level, and a sliding window longer than its context (read as none); its weights come in shards."""
    hf, _ = hf_phi3(tmp_path / "a", rope_parameters=longrope(16))
    hf.save_pretrained(tmp_path / "b", max_shard_size="40KB")
    cfg_json = tmp_path / "b" / "config.json"
    d = json.loads(cfg_json.read_text())
    rope = d.pop("rope_parameters")
    flat = {"type": "su", "short_factor": rope["short_factor"], "long_factor": rope["long_factor"]}
    cfg_json.write_text(json.dumps({**d, "rope_theta": 300.0, "rope_scaling": flat, "sliding_window": 262144}))
    index = tmp_path / "b" / "model.safetensors.index.json"
    assert index.is_file() and len(set(json.loads(index.read_text())["weight_map"].values())) > 1
    model = load_checkpoint(tmp_path / "b").double().eval()
    c = model.config
    assert (c.attention_window, c.rope_theta, c.rope_scaling["rope_type"]) == (0, 300.0, "longrope")
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(model(idx), hf(idx).logits, 2e-6, "shards, the older config")


def test_the_rope_object_is_read_once(hf_copy, tmp_path, monkeypatch):
    """read_rope_parameters once a config: Phi-3's base and scaling (_rope) and its rotary share (_rotary_dim)
    are read from the same (object, key) pair; each read it again."""
    from tritongpt.train import phi3_weights

    path = hf_copy(hf_phi3, tmp_path)
    assert rope_reads(monkeypatch, path, phi3_weights) == 1


def test_a_rope_scaling_object_stands_in_for_rope_parameters_as_in_transformers(hf_copy, tmp_path):
    """Phi3Config (transformers 5) reads `rope_scaling or rope_parameters`, 4.x no rope_parameters at all: beside
    the Hub's shape (a flat rope_theta and a LongRoPE rope_scaling), a stale rope_parameters (base 5000) is read by
    neither. It was read here: base 5000 where transformers rotates with 321."""
    path = hf_copy(hf_phi3, tmp_path)
    cfg_json = tmp_path / "config.json"
    rope = longrope(16)
    scaling = {"type": "longrope", "short_factor": rope["short_factor"], "long_factor": rope["long_factor"]}
    cfg_json.write_text(json.dumps({**json.loads(cfg_json.read_text()), "rope_theta": 321.0, "rope_scaling": scaling}))
    theirs = transformers.AutoConfig.from_pretrained(tmp_path).rope_parameters
    c = load_checkpoint(path).config
    assert (c.rope_theta, c.rope_scaling["rope_type"], c.rope_scaling["long_factor"]) == \
        (theirs["rope_theta"], theirs["rope_type"], theirs["long_factor"]) == (321.0, "longrope", rope["long_factor"])


@pytest.mark.parametrize("change,match", [
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'; this model's SwiGLU computes 'silu' only"),
    ({"num_key_value_heads": 3}, "do not split into 4 query heads and twice 3 key/value heads"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 5000.0, "factor": 2.0}},
     "rope_parameters of type 'dynamic'; Phi-3's RoPE is unscaled"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 5000.0, "short_factor": [1.0] * 8}},
     "without long_factor"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 5000.0, "partial_rotary_factor": 0.7}},
     "11 of head_dim 16 rotated"),
    ({"sliding_window": 0}, "sliding_window 0; it must be a positive integer or null"),
    # transformers 4.x reads the flat key, 5 rope_parameters' (base 5000, factor 1.0): two models. They were read
    # as rope_parameters'
    ({"rope_theta": 321.0}, r"has rope_theta 321.0, but Phi-3's RoPE reads the rope_theta in rope_parameters, "
                            r"5000.0 \(transformers 4.x reads rope_theta, 5 the rope_theta in rope_parameters\): "
                            r"make them agree"),
    ({"partial_rotary_factor": 0.5}, r"has partial_rotary_factor 0.5, but Phi-3's RoPE reads the partial_rotary_factor "
                                     r"in rope_parameters, 1.0 \(transformers 4.x reads partial_rotary_factor"),
    # Phi-2's reader (train/phi_weights.py) looks for its own tensor names
    ({"model_type": "phi"}, "not a Phi model, missing tensor 'layers.0.mlp.fc1.weight'"),
    # a field passed on as config.json gives it, which GPTConfig refuses: named with the file and its key
    ({"max_position_embeddings": "40"},
     r"config\.json: max_position_embeddings \(GPTConfig\.context_length\) must be a positive integer, got '40'"),
    # (with a window, compared to the context first: a TypeError there before)
    ({"max_position_embeddings": "40", "sliding_window": 5},
     r"config\.json: max_position_embeddings \(GPTConfig\.context_length\) must be a positive integer, got '40'"),
], ids=["activation", "kv-heads", "dynamic-rope", "longrope-one-list", "odd-rotary", "window", "flat-theta",
        "flat-factor", "phi2", "context-type", "context-type-window"])
def test_what_this_model_does_not_compute_is_refused_by_name(hf_copy, tmp_path, change, match):
    path = hf_copy(hf_phi3, tmp_path)
    cfg_json = tmp_path / "config.json"
    cfg_json.write_text(json.dumps({**json.loads(cfg_json.read_text()), **change}))
    with pytest.raises(UserError, match=match):
        load_checkpoint(path)


def test_pretrain_from_a_phi4_mini_folder_exports_back_as_phi3(corpus, tmp_path, capsys):
    """--init a Phi-4-mini-shaped folder, train a step, export: a Phi-3 folder that transformers runs with
    our logits, and `info` names the partial rotary and LongRoPE."""
    from tritongpt.cli import main

    hf_phi3(tmp_path / "p", vocab=300, context=64, rope_parameters={**longrope(), "partial_rotary_factor": 0.75})
    assert main(pretrain_argv(corpus, tmp_path / "run", "--init", str(tmp_path / "p"), "--max-steps", "1")) == 0
    model = load_checkpoint(tmp_path / "run").eval()
    assert (model.config.rotary_dim, model.config.rope_scaling["rope_type"]) == (12, "longrope")
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    assert "Phi-3 with 2 layers" in capsys.readouterr().out
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "phi3"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        assert_close_rel(hf(idx).logits, model(idx), 1e-5, "transformers on the export")


def _phi4_like(**kw):
    """A GPTModel made here with Phi-4-mini's fields (not loaded): 12 of 16 dimensions rotated, LongRoPE."""
    rope = longrope(kw.get("rotary_dim", 12) or 16)  # a factor for each rotated pair
    rope.pop("rope_theta")
    cfg = dict(vocab_size=VOCAB, context_length=CTX, n_embd=64, n_layer=2, n_head=4, n_kv_head=2, bias=False,
               position_encoding="rope", rope_theta=300.0, norm="rmsnorm", mlp="swiglu", norm_eps=1e-6, rotary_dim=12,
               rope_scaling={**rope, "original_max_position_embeddings": ORIGINAL})
    cfg.update(kw)
    return GPTModel(GPTConfig(**cfg))


def test_a_model_built_here_exports_as_phi3_and_other_exports_refuse_its_rope(tmp_path):
    """`export` writes a Llama-shaped model with a partial rotary or LongRoPE as Phi-3 (transformers reproduces
    its logits), and one with heads of 24 over n_embd 64 (config.json's head_dim; not with LongRoPE, whose factor
    lists Phi3Config sizes by n_embd / n_head); the Llama, Gemma and OLMo folders, which cannot say either, refuse
    them by name, and the Phi-3 one what Phi-3 does not compute (RoPE scaled otherwise than by LongRoPE too:
    Phi3Config refuses it). A resume that would change the rotated width is refused by name."""
    from types import SimpleNamespace

    from tritongpt.commands import export_target
    from tritongpt.train.gemma_weights import export_gemma
    from tritongpt.train.llama_weights import export_llama
    from tritongpt.train.loop import Trainer
    from tritongpt.train.olmo_weights import export_olmo
    from tritongpt.train.phi3_weights import export_phi3

    torch.manual_seed(1)
    model, wide = _phi4_like().double().eval(), _phi4_like(attention_head_dim=24, rope_scaling=None).double().eval()
    with torch.no_grad():
        for p in [*model.parameters(), *wide.parameters()]:
            p.add_(torch.randn_like(p) * 0.1)
    assert export_target(model.config)[0] == export_target(wide.config)[0] == "Phi-3"
    assert export_target(_phi4_like(rotary_dim=0, rope_scaling=None).config)[0] == "Llama"
    export_phi3(model, tmp_path / "p")
    export_phi3(wide, tmp_path / "w")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "p", dtype=torch.float64).eval()
    for length in (7, T):
        idx = torch.randint(0, VOCAB, (2, length))
        with torch.no_grad():
            assert_close_rel(model(idx), hf(idx).logits, 2e-6, f"built here, read by transformers, T={length}")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "w", dtype=torch.float64).eval()
    with torch.no_grad():
        assert_close_rel(wide(idx), hf(idx).logits, 2e-6, "heads of 24, read by transformers")
    assert load_checkpoint(tmp_path / "w").config.head_dim == 24
    for change, match in (({}, r"rotates only 12 of each head's 16 dimensions \(rotary_dim\).*Llama.*Phi-3 folder"),
                          ({"rotary_dim": 0}, "scales RoPE by LongRoPE.*Llama")):
        with pytest.raises(UserError, match=match):
            export_llama(_phi4_like(**change), tmp_path / "llama")
    with pytest.raises(UserError, match=r"rotates only 12 of each head's 16 dimensions.*Gemma"):
        export_gemma(_phi4_like(mlp="geglu", scale_embeddings=True), tmp_path / "gemma")
    with pytest.raises(UserError, match=r"rotates only 12 of each head's 16 dimensions.*OLMo 2"):
        export_olmo(_phi4_like(post_norms=True, pre_norms=False, qk_norm=True, qk_norm_width="all"), tmp_path / "o")
    for change, match in (({"bias": True}, "has biases, where Phi-3's projections have none"),
                          ({"qk_norm": True}, "normalizes q and k"),
                          ({"attention_window": 5, "window_layers": "odd"}, "in layers odd only"),
                          ({"logit_softcap": 5.0}, "soft-caps its logits"),
                          ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
                           "scales RoPE as 'linear', where Phi-3's config takes LongRoPE only"),
                          ({"attention_head_dim": 24}, "has heads of 24 and LongRoPE.*n_embd / n_head")):
        with pytest.raises(UserError, match=match):
            export_phi3(_phi4_like(**change), tmp_path / "no")
    saved = model.config.to_dict()
    for change in ({"rotary_dim": 0}, {"rotary_dim": 8}):
        cfg = GPTConfig(**{**saved, **change, "rope_scaling": None})
        with pytest.raises(UserError, match="12 dimensions of each head"):
            Trainer._check_same_function(SimpleNamespace(_cfg=cfg, name="pretrain"), "ckpt",
                                         {**saved, "rope_scaling": None})
