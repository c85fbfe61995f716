"""EXAONE 4.0: a Llama-shaped GPTModel whose blocks normalize after each sublayer only (OLMo 2's post_norms without
pre_norms), whose q and k are normalized per head before RoPE (qk_norm), and whose global layers, where there is a
sliding window, have no RoPE (nope_layers) (train/exaone4_weights.py). Tiny random transformers Exaone4ForCausalLMs
saved to tmp_path (float64, every tensor jittered so each one counts): logits on both kernel paths, the KV-cache
decode and greedy tokens past the window, export round trips through transformers, the export chooser; what this
model does not compute refused by name. Nothing downloaded."""
import json

import pytest
import torch

from parity import assert_close_rel, decodes_like, logits_match_transformers
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.gpt2_weights import load_checkpoint

transformers = pytest.importorskip("transformers")

VOCAB, CTX, T, WINDOW = 53, 40, 23, 5
HYBRID = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
# Llama 3's scaling over a 10-position original context: of a head of 16's 8 frequencies some kept, some divided
# by the factor, some blended (the 32B's rope_type, at sizes where each part shows)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 300.0, "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 10}


def hf_exaone4(folder, layer_types=tuple(HYBRID), window=WINDOW, tie=False, **config):
    """A tiny random Exaone4ForCausalLM in float64, saved to folder, EOS 1 and BOS 2: heads of 16 over n_embd 64
    (attention_head_dim), 2 KV heads, Llama 3's RoPE scaling; by default layers 0 and 2 sliding over 5 positions
    (rotated), 1 and 3 global (no RoPE). -> (the model, its model.safetensors)."""
    torch.manual_seed(0)
    cfg = transformers.Exaone4Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=88, num_hidden_layers=len(layer_types),
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=CTX,
        tie_word_embeddings=tie, bos_token_id=2, eos_token_id=1, pad_token_id=0, sliding_window=window,
        layer_types=list(layer_types), **{"rms_norm_eps": 1e-6, "rope_parameters": dict(LLAMA3), **config})
    hf = transformers.Exaone4ForCausalLM(cfg).double().eval()
    with torch.no_grad():  # unit norm weights and unit embeddings would hide a mistake
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(folder)
    return hf, folder / "model.safetensors"


def test_hybrid_layers_load_their_fields_and_match_transformers(tmp_path):
    """The 32B's shape: sliding layers rotated, global ones without RoPE nor window; q/k norms per head."""
    hf, path = hf_exaone4(tmp_path)
    model = load_checkpoint(path).double().eval()
    c = model.config
    assert (c.pre_norms, c.post_norms, c.qk_norm, c.qk_norm_width, c.norm, c.mlp, c.bias, c.tie_weights) == \
        (False, True, True, "head", "rmsnorm", "swiglu", False, False)
    assert (c.head_dim, c.kv_heads, c.rope_theta, c.rope_scaling["rope_type"], c.context_length) == \
        (16, 2, 300.0, "llama3", CTX)
    assert [c.layer_window(i) for i in range(4)] == [WINDOW, 0, WINDOW, 0]
    assert [c.layer_has_rope(i) for i in range(4)] == [True, False, True, False]
    block = model.trf_blocks[0]
    assert block.att.q_norm.weight.shape == (16,) and block.att.k_norm.weight.shape == (16,)
    logits_match_transformers(hf, model, VOCAB, T)


def test_without_a_window_every_layer_rotates_as_transformers(tmp_path):
    """No window (sliding_window null), every layer global and every layer rotated (Exaone4Attention's
    `sliding_window is None or is_sliding`), a tied head."""
    hf, path = hf_exaone4(tmp_path, ["full_attention"] * 3, window=None, tie=True)
    model = load_checkpoint(path).double().eval()
    c = model.config
    assert (c.attention_window, c.nope_layers, c.tie_weights) == (0, "", True)
    logits_match_transformers(hf, model, VOCAB, T)


def test_decodes_over_the_cache_past_the_window_and_generates_transformers_tokens(tmp_path):
    """A prompt longer than the window, decoded over the KV cache on both paths (float64 reference 2e-6, fp32
    Triton 1e-5), and generate's greedy tokens equal transformers' generate, 12 steps past the window."""
    hf, path = hf_exaone4(tmp_path)
    model = load_checkpoint(path).double().eval()
    idx = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        want = hf(idx).logits
    decodes_like(model, idx, want)
    from tritongpt.train.generate import generate

    ours = generate(model, idx[:, :3], 12)
    theirs = hf.generate(idx[:, :3], max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, theirs)


def test_the_hubs_flat_rope_and_pattern_string_are_read_as_transformers_reads_them(hf_copy, tmp_path):
    """The Hub's config.json says rope_theta and rope_scaling flat (transformers 4.x's keys) and
    sliding_window_pattern "LLLG" beside its layer_types: read as transformers 5 reads them, to its logits."""
    path = hf_copy(hf_exaone4, tmp_path)
    cfg_json = tmp_path / "config.json"
    d = {k: v for k, v in json.loads(cfg_json.read_text()).items() if k != "rope_parameters"}
    flat = {k: v for k, v in LLAMA3.items() if k != "rope_theta"}
    cfg_json.write_text(json.dumps({**d, "rope_theta": 300.0, "rope_scaling": flat, "sliding_window_pattern": "LLLG"}))
    model = load_checkpoint(path).double().eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert model.config.rope_scaling["rope_type"] == hf.config.rope_parameters["rope_type"] == "llama3"
    logits_match_transformers(hf, model, VOCAB, T)


@pytest.mark.parametrize("kw", [{}, {"layer_types": ["full_attention"] * 3, "window": None, "tie": True}],
                         ids=["hybrid", "no-window-tied"])
def test_export_round_trips_through_transformers(tmp_path, kw):
    """Loaded, exported, read by transformers' AutoModelForCausalLM: an Exaone4ForCausalLM with the same logits, and
    load_checkpoint reads the export back to the same config."""
    from tritongpt.train.exaone4_weights import export_exaone4

    hf, path = hf_exaone4(tmp_path / "in", **kw)
    model = load_checkpoint(path).double().eval()
    export_exaone4(model, tmp_path / "out", eos_token_id=1)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "exaone4"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    assert type(back).__name__ == "Exaone4ForCausalLM"
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(back(idx).logits, hf(idx).logits, 2e-6, "exported, read by transformers")
    again = load_checkpoint(tmp_path / "out" / "model.safetensors")
    assert again.config == GPTConfig(**{**model.config.to_dict(), "kernels": again.config.kernels})
    with pytest.raises(UserError, match="already holds a model"):
        export_exaone4(model, tmp_path / "out")


def _exaone_like(**kw):
    cfg = dict(vocab_size=VOCAB, context_length=CTX, n_embd=64, n_layer=4, n_head=4, n_kv_head=2,
               attention_head_dim=16, position_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False,
               post_norms=True, pre_norms=False, qk_norm=True, attention_window=WINDOW, window_layers="0,1,2",
               nope_layers="3", rope_theta=500.0, norm_eps=1e-6)
    cfg.update(kw)
    return GPTModel(GPTConfig(**cfg))


def test_the_export_chooser_sends_exaone4_there_and_olmo_to_olmo(tmp_path):
    """No input norms is OLMo's touch too: the chooser sends a model there by its q/k norms, per head (EXAONE 4) or
    over all heads (OLMo); the chosen export writes a model built here as EXAONE 4, which transformers reads to our
    logits."""
    from tritongpt.commands import export_target

    assert export_target(_exaone_like().config)[0] == "EXAONE 4"
    assert export_target(_exaone_like(qk_norm_width="all", nope_layers="").config)[0] == "OLMo 3"
    assert export_target(_exaone_like(qk_norm_width="all", nope_layers="", attention_window=0).config)[0] == "OLMo 2"
    assert export_target(_exaone_like(qk_norm=False).config)[0] == "OLMo 3"  # (which refuses it by name)
    torch.manual_seed(1)
    model = _exaone_like().double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    _, _, export = export_target(model.config)
    export(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float64).eval()
    assert type(hf).__name__ == "Exaone4ForCausalLM"
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(hf(idx).logits, model(idx), 2e-6, "built here, read by transformers")


@pytest.mark.parametrize("change,match", [
    ({"nope_layers": ""}, r"rotates q and k in layers 0,1,2,3 \(nope_layers ''\), where EXAONE 4 rotates them in its "
                          r"sliding-window layers only"),
    ({"nope_layers": "2,3"}, r"rotates q and k in layers 0,1"),
    ({"attention_window": 0, "window_layers": "all", "nope_layers": "3"}, r"rotates q and k in layers 0,1,2 "),
    ({"qk_norm_width": "all"}, r"does not normalize each head's q and k \(qk_norm with qk_norm_width 'head'\)"),
    ({"rope_local_theta": 50.0}, r"rotates its local layers with a RoPE base of their own"),
    ({"bias": True}, "has biases, where EXAONE 4's projections have none"),
    ({"pre_norms": True}, r"normalizes each sublayer's input \(pre_norms\)"),
    ({"mlp": "geglu"}, "has a geglu MLP, where EXAONE 4's is SwiGLU"),
    ({"attn_softcap": 5.0}, "soft-caps its attention scores"),
], ids=["all-rotate", "other-nope", "nope-without-window", "qk-all", "local-theta", "bias", "pre-norms", "geglu",
        "softcap"])
def test_the_export_refuses_what_exaone4_does_not_compute(tmp_path, change, match):
    from tritongpt.train.exaone4_weights import export_exaone4

    with pytest.raises(UserError, match=match + ".*: it cannot be exported as an EXAONE 4 folder"):
        export_exaone4(_exaone_like(**change), tmp_path / "no")
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("change,match", [
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'; this model's SwiGLU computes 'silu' only"),
    ({"head_dim": 32}, "head_dim 32, but the weights have 16"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 300.0, "factor": 2.0}},
     "rope_parameters of type 'dynamic'"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
    ({"layer_types": HYBRID[:3]}, "for each of the 4 layers"),
    ({"sliding_window": None}, r"sliding_window null and sliding layers \[0, 2\]"),
    ({"sliding_window": 0}, "sliding_window 0; it must be a positive integer or null"),
    ({"layer_types": None, "sliding_window_pattern": "LLLG"},
     "no layer_types and sliding_window_pattern 'LLLG'; transformers' Exaone4Config makes layer_types from a "
     "positive integer pattern only"),
    ({"layer_types": None, "sliding_window": None}, "no layer_types and sliding_window null"),
], ids=["activation", "head-dim", "dynamic-rope", "partial-rotary", "layer-types", "null-window", "zero-window",
        "pattern-string", "null-window-no-types"])
def test_what_this_model_does_not_compute_is_refused_by_name(hf_copy, tmp_path, change, match):
    path = hf_copy(hf_exaone4, tmp_path)
    cfg_json = tmp_path / "config.json"
    d = {**json.loads(cfg_json.read_text()), **change}
    cfg_json.write_text(json.dumps({k: v for k, v in d.items() if v is not None or k == "sliding_window"}))
    with pytest.raises(UserError, match=match):
        load_checkpoint(path)


def test_a_pattern_without_layer_types_is_read_as_transformers_fills_them_in(hf_copy, tmp_path):
    """No layer_types: Exaone4Config makes every sliding_window_pattern-th layer global (3 here: layer 2)."""
    path = hf_copy(hf_exaone4, tmp_path)
    cfg_json = tmp_path / "config.json"
    d = {k: v for k, v in json.loads(cfg_json.read_text()).items() if k != "layer_types"}
    cfg_json.write_text(json.dumps({**d, "sliding_window_pattern": 3}))
    theirs = transformers.AutoConfig.from_pretrained(tmp_path).layer_types
    c = load_checkpoint(path).config
    assert ["sliding_attention" if c.layer_window(i) else "full_attention" for i in range(4)] == theirs
    assert [c.layer_has_rope(i) for i in range(4)] == [t == "sliding_attention" for t in theirs] == \
        [True, True, False, True]


def test_a_file_with_biases_or_input_norms_is_refused(tmp_path):
    """transformers' EXAONE 4 has no biases and no input norms: such tensors would be dropped without a word."""
    from safetensors.torch import load_file, save_file

    _, path = hf_exaone4(tmp_path)
    sd = load_file(str(path))
    for extra in ("model.layers.0.self_attn.q_proj.bias", "model.layers.0.input_layernorm.weight"):
        save_file({**sd, extra: torch.ones(64, dtype=torch.float64)}, str(path), metadata={"format": "pt"})
        with pytest.raises(UserError, match=f"tensor {extra.removeprefix('model.')} is not EXAONE 4's"):
            load_checkpoint(path)


def test_a_tied_folder_that_does_not_say_so_is_refused_as_transformers_unties_it(hf_copy, tmp_path):
    """Exaone4Config's tie_word_embeddings is false when config.json leaves it out: a folder without lm_head that
    does not say it ties would get a random head in transformers. Refused by name (read as tied here before
    exaone4 joined the untied-by-default types)."""
    path = hf_copy(hf_exaone4, tmp_path, ["full_attention"] * 3, window=None, tie=True)
    cfg_json = tmp_path / "config.json"
    d = {k: v for k, v in json.loads(cfg_json.read_text()).items() if k != "tie_word_embeddings"}
    cfg_json.write_text(json.dumps(d))
    assert transformers.AutoConfig.from_pretrained(tmp_path).tie_word_embeddings is False
    with pytest.raises(UserError, match="no lm_head.weight: transformers would start a random LM head"):
        load_checkpoint(path)
