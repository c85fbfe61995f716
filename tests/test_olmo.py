"""OLMo 2 and OLMo 3: a Llama-shaped GPTModel whose blocks normalize after each sublayer only
(post_norms without pre_norms) and whose q/k norms span the whole projection (qk_norm_width "all");
OLMo 3 adds sliding layers by list and YaRN in its full-attention layers (train/olmo_weights.py).
Tiny random transformers models saved to tmp_path (float64, every tensor jittered so each one
counts): logits on both kernel paths, the KV-cache decode, greedy tokens, export round trips through
transformers, a pretrain --init step; what this model does not compute refused by name. Nothing
downloaded."""
import json
import math

import pytest
import torch

from parity import assert_close_rel, decode_token_by_token, logits_match_transformers, pretrain_argv
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.model.layers import NoNorm
from tritongpt.train.gpt2_weights import load_checkpoint

transformers = pytest.importorskip("transformers")

VOCAB, CTX, T = 53, 40, 23
# OLMo 3's two RoPEs, far apart so that swapping them fails the logits
ROPE3 = {"full_attention": {"rope_type": "default", "rope_theta": 300.0},
         "sliding_attention": {"rope_type": "default", "rope_theta": 20000.0}}
# YaRN over a 10-position original context, its betas set so that of the 8 frequencies of a head of 16,
# 0-1 are kept, 5-7 divided by the factor, 2-4 blended, the ramp's bounds 1.5 and 4.5 rounded out to 1 and 5
YARN = {"rope_type": "yarn", "rope_theta": 300.0, "factor": 4.0, "original_max_position_embeddings": 10,
        "beta_fast": 0.55, "beta_slow": 0.065}


def hf_olmo(folder, kind="olmo2", layers=4, kv_heads=2, tie=False, vocab=VOCAB, context=CTX, **config):
    """A tiny random Olmo2ForCausalLM or Olmo3ForCausalLM in float64, saved to folder, EOS 1 and BOS 2.
    OLMo 2: heads of 32 over n_embd 64 (attention_head_dim). OLMo 3: a window of 5 over its default
    layer_types (layers 0-2 sliding, 3 full), two RoPE bases. -> (the model, its model.safetensors)."""
    torch.manual_seed(0)
    if kind == "olmo2":
        config = {"head_dim": 32, "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0}, **config}
    else:
        config = {"sliding_window": 5, "rope_parameters": json.loads(json.dumps(ROPE3)), **config}
    cls = {"olmo2": "Olmo2", "olmo3": "Olmo3"}[kind]
    cfg = getattr(transformers, cls + "Config")(
        vocab_size=vocab, hidden_size=64, intermediate_size=88, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=context, tie_word_embeddings=tie, bos_token_id=2,
        eos_token_id=1, pad_token_id=0, **{"rms_norm_eps": 1e-6, **config})
    hf = getattr(transformers, cls + "ForCausalLM")(cfg).double().eval()
    with torch.no_grad():  # unit norm weights and unit embeddings would hide a mistake
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(folder)
    return hf, folder / "model.safetensors"


def test_olmo2_loads_its_fields_and_matches_transformers(tmp_path):
    hf, path = hf_olmo(tmp_path)
    model = load_checkpoint(path).double().eval()
    c = model.config
    assert (c.pre_norms, c.post_norms, c.qk_norm, c.qk_norm_width, c.norm, c.mlp, c.bias) == \
        (False, True, True, "all", "rmsnorm", "swiglu", False)
    assert (c.head_dim, c.kv_heads, c.attention_window, c.rope_theta, c.tie_weights, c.context_length) == \
        (32, 2, 0, 5000.0, False, CTX)
    block = model.trf_blocks[0]
    assert isinstance(block.norm1, NoNorm) and isinstance(block.norm2, NoNorm)
    assert not any(".norm1." in n or ".norm2." in n for n, _ in model.named_parameters())
    # one q norm over the 4 heads of 32, one k norm over the 2 KV heads of 32
    assert block.att.q_norm.weight.shape == (128,) and block.att.k_norm.weight.shape == (64,)
    logits_match_transformers(hf, model, VOCAB, T)


def test_olmo3_loads_its_windows_and_two_ropes_and_matches_transformers(tmp_path):
    hf, path = hf_olmo(tmp_path, "olmo3")
    model = load_checkpoint(path).double().eval()
    c = model.config
    assert (c.attention_window, c.window_layers, c.rope_theta, c.rope_local_theta) == (5, "0,1,2", 300.0, 2e4)
    assert [c.layer_window(i) for i in range(4)] == [5, 5, 5, 0]
    logits_match_transformers(hf, model, VOCAB, T)


def test_olmo3_yarn_matches_transformers_on_both_paths(tmp_path):
    """YaRN in the full-attention layer (its ramp of frequencies and its attention factor, 1 + 0.1 ln 4 on
    cos and sin), the sliding layers unscaled: logits on both paths and a decode over the KV cache."""
    from tritongpt.model.layers import rope_inv_freq

    hf, path = hf_olmo(tmp_path, "olmo3", rope_parameters={"full_attention": dict(YARN), "sliding_attention":
                                                           {"rope_type": "default", "rope_theta": 300.0}})
    model = load_checkpoint(path).double().eval()
    c = model.config
    assert c.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 10,
                              "beta_fast": 0.55, "beta_slow": 0.065, "attention_factor": pytest.approx(1.1386294361)}
    plain, scaled = rope_inv_freq(16, 300.0), rope_inv_freq(16, 300.0, scaling=c.rope_scaling)
    assert torch.equal(scaled[:2], plain[:2]) and torch.allclose(scaled[5:], plain[5:] / 4)
    assert ((scaled[2:5] < plain[2:5]) & (scaled[2:5] > plain[2:5] / 4)).all()
    assert (c.rope_local_theta, c.layer_rope(0), c.layer_rope(3)) == (300.0, (300.0, None), (300.0, c.rope_scaling))
    logits_match_transformers(hf, model, VOCAB, T)
    idx = torch.randint(0, VOCAB, (1, 15))
    with torch.no_grad():
        _, decoded, _ = decode_token_by_token(model, idx, whole=False)
        assert_close_rel(decoded, hf(idx).logits, 2e-6, "decoded over the cache")


@pytest.mark.parametrize("kind", ["olmo2", "olmo3"])
def test_decodes_over_the_cache_and_generates_transformers_tokens(tmp_path, kind):
    hf, path = hf_olmo(tmp_path, kind)
    model = load_checkpoint(path).double().eval()
    idx = torch.randint(0, VOCAB, (1, 15))
    with torch.no_grad():
        _, decoded, _ = decode_token_by_token(model, idx, whole=False)
        assert_close_rel(decoded, hf(idx).logits, 2e-6, "decoded over the cache")
    from tritongpt.train.generate import generate

    ours = generate(model, idx[:, :3], 12)
    theirs = hf.generate(idx[:, :3], max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("kind,kw", [("olmo2", {}), ("olmo2", {"head_dim": 16, "kv_heads": 4, "tie": True}),
                                     ("olmo3", {}),
                                     ("olmo3", {"rope_parameters": {"full_attention": dict(YARN), "sliding_attention":
                                                                    {"rope_type": "default", "rope_theta": 300.0}},
                                                "layer_types": ["full_attention", "sliding_attention"] * 2})],
                         ids=["olmo2", "olmo2-tied", "olmo3", "olmo3-yarn"])
def test_export_round_trips_through_transformers(tmp_path, kind, kw):
    """Loaded, exported, read by transformers' AutoModelForCausalLM: the same logits, the family's
    model_type, and load_checkpoint reads the export back to the same config."""
    from tritongpt.train.olmo_weights import export_olmo

    hf, path = hf_olmo(tmp_path / "in", kind, **kw)
    model = load_checkpoint(path).double().eval()
    export_olmo(model, tmp_path / "out", eos_token_id=1)
    d = json.loads((tmp_path / "out" / "config.json").read_text())
    assert d["model_type"] == kind
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    assert type(back).__name__ == {"olmo2": "Olmo2ForCausalLM", "olmo3": "Olmo3ForCausalLM"}[kind]
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(back(idx).logits, hf(idx).logits, 2e-6, "exported, read by transformers")
        assert_close_rel(back(idx).logits, model(idx), 2e-6, "exported, against ours")
    again = load_checkpoint(tmp_path / "out" / "model.safetensors")
    assert again.config == GPTConfig(**{**model.config.to_dict(), "kernels": again.config.kernels})
    with pytest.raises(UserError, match="already holds a model"):
        export_olmo(model, tmp_path / "out")


def test_sharded_and_flat_hub_configs_load(tmp_path):
    """The Hub's OLMo 3 config.json says rope_theta and rope_scaling flat (not per layer type), and its large
    models come in shards: both read, with transformers' logits. What a config.json leaves out is read as
    Olmo3Config's defaults: a RoPE base of 500000, eps 1e-5, all but every 4th layer sliding over 4096 positions."""
    hf, _ = hf_olmo(tmp_path / "a", "olmo3", rope_parameters={"full_attention": {**YARN, "rope_theta": 5e5},
                                                              "sliding_attention": {"rope_type": "default",
                                                                                    "rope_theta": 5e5}})
    hf.save_pretrained(tmp_path / "b", max_shard_size="40KB")
    cfg_json = tmp_path / "b" / "config.json"
    d = json.loads(cfg_json.read_text())
    d.pop("rope_parameters")
    flat = {k: v for k, v in YARN.items() if k != "rope_theta"}
    cfg_json.write_text(json.dumps({**d, "rope_theta": 5e5, "rope_scaling": flat}))
    index = tmp_path / "b" / "model.safetensors.index.json"
    assert index.is_file() and len(set(json.loads(index.read_text())["weight_map"].values())) > 1
    model = load_checkpoint(tmp_path / "b").double().eval()
    c = model.config
    assert (c.rope_theta, c.rope_local_theta, c.rope_scaling["rope_type"], c.norm_eps) == (5e5, 5e5, "yarn", 1e-6)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "b", dtype=torch.float64).eval()
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(model(idx), hf(idx).logits, 2e-6, "shards, flat config")
        assert_close_rel(again(idx).logits, hf(idx).logits, 2e-6, "transformers on the flat config")
    d = json.loads(cfg_json.read_text())
    for key in ("rope_theta", "rms_norm_eps", "max_position_embeddings", "layer_types", "sliding_window"):
        d.pop(key)
    cfg_json.write_text(json.dumps(d))
    model = load_checkpoint(tmp_path / "b").double().eval()
    assert (model.config.rope_theta, model.config.norm_eps, model.config.context_length) == (5e5, 1e-5, 2048)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "b", dtype=torch.float64).eval()
    # without layer_types and sliding_window: Olmo3Config's, all but every 4th layer sliding over 4096 positions
    assert (model.config.window_layers, model.config.attention_window) == ("0,1,2", again.config.sliding_window)
    with torch.no_grad():
        assert_close_rel(model(idx), again(idx).logits, 2e-6, "a config.json without theta, eps, context")


def test_a_sliding_rope_without_its_base_is_read_as_transformers_reads_it(tmp_path):
    """An OLMo 3 config.json whose sliding_attention RoPE says no rope_theta: Olmo3Config gives it its default
    base, 500000, not the full-attention layers' (300 here)."""
    _, path = hf_olmo(tmp_path, "olmo3")
    cfg_json = tmp_path / "config.json"
    d = json.loads(cfg_json.read_text())
    del d["rope_parameters"]["sliding_attention"]["rope_theta"]
    cfg_json.write_text(json.dumps(d))
    c = load_checkpoint(path).config
    theirs = transformers.AutoConfig.from_pretrained(tmp_path).rope_parameters["sliding_attention"]["rope_theta"]
    assert (c.rope_theta, c.rope_local_theta) == (300.0, theirs) == (300.0, 5e5)


def test_a_rope_scaling_with_its_own_base_is_read_as_transformers_reads_it(hf_copy, tmp_path):
    """An OLMo 3 config.json with a rope_scaling that says its rope_theta, and no flat rope_theta: Olmo3Config
    rotates the full-attention layers with rope_scaling's base (300). Olmo3Config's default (500000) was passed to
    the Llama reader as if the file said it flat, and refused as a flat rope_theta disagreeing with rope_scaling's."""
    path = hf_copy(hf_olmo, tmp_path, "olmo3")
    cfg_json = tmp_path / "config.json"
    d = {k: v for k, v in json.loads(cfg_json.read_text()).items() if k not in ("rope_parameters", "rope_theta")}
    cfg_json.write_text(json.dumps({**d, "rope_scaling": YARN, "layer_types": ["full_attention"] * 4}))
    theirs = transformers.AutoConfig.from_pretrained(tmp_path).rope_parameters["full_attention"]
    c = load_checkpoint(path).config
    assert (c.rope_theta, c.rope_scaling["rope_type"], c.window_layers) == \
        (theirs["rope_theta"], theirs["rope_type"], "all") == (300.0, "yarn", "all")


@pytest.mark.parametrize("edit", ["flat-base", "rope-scaling"])
def test_flat_keys_beside_rope_parameters_per_layer_type_are_read_as_transformers_reads_them(hf_copy, tmp_path,
                                                                                             edit):
    """Olmo3Config (transformers 5) reads rope_parameters per layer type as Gemma3TextConfig does: a rope_scaling
    beside it merged into full_attention, a flat rope_theta where full_attention says none. Both were passed over
    here: the full-attention layers unscaled (YaRN dropped), or at the default base 500000 for the file's 700."""
    path = hf_copy(hf_olmo, tmp_path, "olmo3")
    cfg_json = tmp_path / "config.json"
    d = {k: v for k, v in json.loads(cfg_json.read_text()).items() if k not in ("rope_theta", "rope_scaling")}
    if edit == "flat-base":
        del d["rope_parameters"]["full_attention"]["rope_theta"]
        d["rope_theta"] = 700.0
    else:
        d["rope_scaling"] = YARN
    cfg_json.write_text(json.dumps(d))
    theirs = transformers.AutoConfig.from_pretrained(tmp_path).rope_parameters
    c = load_checkpoint(path).config
    assert (c.rope_theta, (c.rope_scaling or {}).get("rope_type", "default"), c.rope_local_theta) == \
        (theirs["full_attention"]["rope_theta"], theirs["full_attention"]["rope_type"],
         theirs["sliding_attention"]["rope_theta"]) == \
        ((700.0, "default", 2e4) if edit == "flat-base" else (300.0, "yarn", 2e4))


def test_a_rope_scaling_merged_into_full_attention_leaves_equal_sliding_layers_unscaled(hf_copy, tmp_path):
    """rope_parameters per layer type that say the same unscaled RoPE for both, and a rope_scaling beside them:
    Olmo3Config merges it into full_attention only, the sliding layers stay unscaled. Here the unmerged
    full_attention was compared with sliding_attention, found equal, and read as every layer scaled (YaRN on the
    sliding layers too: rope_local_theta 0)."""
    path = hf_copy(hf_olmo, tmp_path, "olmo3")
    cfg_json = tmp_path / "config.json"
    plain = {"rope_type": "default", "rope_theta": 300.0}
    d = {k: v for k, v in json.loads(cfg_json.read_text()).items() if k not in ("rope_theta", "rope_scaling")}
    d.update(rope_parameters={"full_attention": dict(plain), "sliding_attention": dict(plain)}, rope_scaling=YARN)
    cfg_json.write_text(json.dumps(d))
    theirs = transformers.AutoConfig.from_pretrained(tmp_path).rope_parameters
    assert (theirs["full_attention"]["rope_type"], theirs["sliding_attention"]["rope_type"]) == ("yarn", "default")
    c = load_checkpoint(path).config
    assert (c.rope_theta, c.rope_scaling["rope_type"], c.rope_local_theta) == (300.0, "yarn", 300.0)
    assert (c.layer_rope(0), c.layer_rope(3)) == ((300.0, None), (300.0, c.rope_scaling))


@pytest.mark.parametrize("one", [{"rope_type": "default", "rope_theta": 300.0}, YARN], ids=["base", "yarn"])
def test_one_rope_parameters_object_is_not_read_as_transformers_does_not(hf_copy, tmp_path, capsys, one):
    """An OLMo 3 config.json whose rope_parameters is one RoPE object, not one per layer type: Olmo3Config looks
    for full_attention and sliding_attention in it only, so both kinds of layer rotate with its default base
    500000, unscaled. Its base (and YaRN) were read here for every layer: another model. Said in a note; beside a
    rope_scaling (on which transformers fails) refused."""
    path = hf_copy(hf_olmo, tmp_path, "olmo3")
    cfg_json = tmp_path / "config.json"
    d = {k: v for k, v in json.loads(cfg_json.read_text()).items() if k not in ("rope_theta", "rope_scaling")}
    cfg_json.write_text(json.dumps({**d, "rope_parameters": dict(one)}))
    theirs = transformers.AutoConfig.from_pretrained(tmp_path).rope_parameters
    c = load_checkpoint(path).config
    assert (c.rope_theta, c.rope_scaling, c.rope_local_theta or c.rope_theta) == \
        (theirs["full_attention"]["rope_theta"], None, theirs["sliding_attention"]["rope_theta"]) == (5e5, None, 5e5)
    assert theirs["full_attention"]["rope_type"] == theirs["sliding_attention"]["rope_type"] == "default"
    assert "one rope_parameters object" in capsys.readouterr().err
    cfg_json.write_text(json.dumps({**d, "rope_parameters": dict(one), "rope_scaling": YARN}))
    with pytest.raises(UserError, match="one rope_parameters object .not one per layer type. and a rope_scaling"):
        load_checkpoint(path)


def test_a_flat_base_that_disagrees_with_rope_parameters_per_layer_type_is_refused(hf_copy, tmp_path):
    """A flat rope_theta beside full_attention's own: transformers 4.x reads the flat one, 5 the nested one (two
    models), refused naming both as Gemma 3's; it was passed over here."""
    path = hf_copy(hf_olmo, tmp_path, "olmo3")
    cfg_json = tmp_path / "config.json"
    cfg_json.write_text(json.dumps({**json.loads(cfg_json.read_text()), "rope_theta": 700.0}))
    with pytest.raises(UserError, match=r"has rope_theta 700.0, but this model's RoPE reads the rope_theta in "
                                        r"rope_parameters\["):
        load_checkpoint(path)


@pytest.mark.parametrize("kind,change,match", [
    ("olmo2", {"attention_bias": True}, "attention_bias true; OLMo 2's projections have no biases"),
    ("olmo2", {"hidden_act": "gelu"}, "hidden_act 'gelu'; this model's SwiGLU computes 'silu' only"),
    ("olmo2", {"head_dim": 16}, "head_dim 16, but the weights have 32"),
    ("olmo2", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 5000.0, "factor": 2.0}},
     "rope_parameters of type 'dynamic'"),
    ("olmo3", {"rope_parameters": {**ROPE3, "full_attention": {**YARN, "mscale": 1.0, "mscale_all_dim": 1.0}}},
     "YaRN with mscale, mscale_all_dim"),
    ("olmo3", {"rope_parameters": {**ROPE3, "sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
     "scales the sliding layers' RoPE"),
    ("olmo3", {"layer_types": ["sliding_attention"] * 3}, "for each of the 4 layers"),
    ("olmo3", {"sliding_window": None}, "sliding_window None and sliding layers"),
    # a field passed on as config.json gives it, which GPTConfig refuses: named with the file and its key
    ("olmo2", {"num_key_value_heads": 3},
     r"config\.json: num_key_value_heads \(GPTConfig\.n_kv_head\) must divide n_head=4"),
    # bool("false") is True: a flag spelled as a string is refused by name
    ("olmo2", {"attention_bias": "false"}, "config.json has attention_bias 'false'; it must be true or false"),
], ids=["attention-bias", "activation", "head-dim", "dynamic-rope", "yarn-mscale", "local-scaling", "layer-types",
        "no-window", "kv-heads", "attention-bias-type"])
def test_what_this_model_does_not_compute_is_refused_by_name(hf_copy, tmp_path, kind, change, match):
    path = hf_copy(hf_olmo, tmp_path, kind)
    cfg_json = tmp_path / "config.json"
    cfg_json.write_text(json.dumps({**json.loads(cfg_json.read_text()), **change}))
    with pytest.raises(UserError, match=match):
        load_checkpoint(path)


def test_a_file_with_input_norms_under_olmos_name_is_refused(tmp_path):
    """An OLMo config.json beside a Llama's tensors (input_layernorm) would load its q/k norms as missing at
    best; the block's extra norm is named."""
    from safetensors.torch import load_file, save_file

    _, path = hf_olmo(tmp_path)
    sd = load_file(str(path))
    save_file({**sd, "model.layers.0.input_layernorm.weight": torch.ones(64, dtype=torch.float64)}, str(path),
              metadata={"format": "pt"})
    with pytest.raises(UserError, match="layers.0.input_layernorm is not OLMo 2's"):
        load_checkpoint(path)


def _olmo_like(**kw):
    cfg = dict(vocab_size=VOCAB, context_length=CTX, n_embd=64, n_layer=3, n_head=4, n_kv_head=2,
               attention_head_dim=32, position_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False,
               post_norms=True, pre_norms=False, qk_norm=True, qk_norm_width="all", attention_window=5,
               window_layers="0,1", rope_theta=500.0, norm_eps=1e-6)
    cfg.update(kw)
    return GPTModel(GPTConfig(**cfg))


def test_the_fields_are_checked_by_name():
    for bad, match in (({"pre_norms": "no"}, "pre_norms must be True or False"),
                       ({"pre_norms": False}, "pre_norms False leaves a block's sublayers without a norm"),
                       ({"qk_norm_width": "heads", "qk_norm": True}, "qk_norm_width must be one of head, all"),
                       ({"qk_norm_width": "all"}, "qk_norm is False"),
                       ({"position_encoding": "rope", "rope_scaling": {"rope_type": "yarn", "factor": 2.0}},
                        "missing original_max_position_embeddings"),
                       ({"position_encoding": "rope", "rope_scaling": {**YARN, "truncate": "no"}},
                        "YaRN's truncate must be true or false")):
        with pytest.raises(UserError, match=match):
            GPTConfig(**bad)
    # transformers' YaRN defaults: beta 32 and 1, attention factor 0.1 ln(factor) + 1
    c = GPTConfig(position_encoding="rope", rope_scaling={"rope_type": "yarn", "factor": 8.0,
                                                          "original_max_position_embeddings": 8192})
    assert c.rope_scaling == {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8192,
                              "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": pytest.approx(1.2079441542)}
    # a factor <= 1 keeps the attention factor at 1 (transformers' get_mscale), and a null beta is an absent one
    c = GPTConfig(position_encoding="rope", rope_scaling={"rope_type": "yarn", "factor": 0.5, "beta_fast": None,
                                                          "original_max_position_embeddings": 64})
    assert (c.rope_scaling["attention_factor"], c.rope_scaling["beta_fast"]) == (1.0, 32.0)


@pytest.mark.parametrize("original,theta", [(8, 1e4), (1000, 10.0)], ids=["ramp-from-0", "ramp-to-the-last-dim"])
def test_yarn_clamps_its_ramp_to_the_head_as_transformers(original, theta):
    """transformers' default betas (32, 1) over a short original context put the ramp's low end below
    dimension 0; at theta 10 over 1000 it spans dimensions 5 to 18 of 16: both ends clamped, as transformers does."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from tritongpt.model.layers import rope_inv_freq

    spec = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": original}
    cfg = transformers.LlamaConfig(hidden_size=32, num_attention_heads=2, head_dim=16,
                                   max_position_embeddings=4 * original, rope_parameters={**spec, "rope_theta": theta})
    want, factor = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    scaling = GPTConfig(position_encoding="rope", rope_scaling=spec).rope_scaling
    assert scaling["attention_factor"] == pytest.approx(factor)
    assert_close_rel(rope_inv_freq(16, theta, "cpu", scaling).double(), want.double(), 1e-6, "YaRN frequencies")


@pytest.mark.parametrize("truncate", [False, True, None])
def test_yarn_truncate_false_leaves_the_bounds_unrounded_as_transformers(truncate):
    """GPT-OSS's YaRN (truncate false): the correction range's bounds are not floored and ceiled, so the ramp
    starts and ends between dimensions. GPT-OSS's own numbers (head 64, base 150000, factor 32 over 4096), where
    the rounded and unrounded frequencies differ; true the rounded ones, null the unrounded ones (transformers'
    `if truncate`)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from tritongpt.model.layers import rope_inv_freq

    spec = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "original_max_position_embeddings": 4096, "truncate": truncate}
    cfg = transformers.LlamaConfig(hidden_size=128, num_attention_heads=2, head_dim=64,
                                   max_position_embeddings=131072, rope_parameters={**spec, "rope_theta": 150000.0})
    want, factor = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    scaling = GPTConfig(position_encoding="rope", rope_scaling=spec, n_embd=128, n_head=2).rope_scaling
    assert ("truncate" in scaling) == (not truncate)  # kept only when false
    assert scaling["attention_factor"] == pytest.approx(factor)
    ours = rope_inv_freq(64, 150000.0, "cpu", scaling).double()
    assert_close_rel(ours, want.double(), 1e-6, "YaRN frequencies")
    other = rope_inv_freq(64, 150000.0, "cpu", {**scaling, "truncate": not truncate}).double()
    assert (other - want.double()).abs().max() > 1e-4 * want.abs().max()  # the rounding shows at these numbers


def test_a_model_built_here_exports_as_olmo3_and_other_exports_refuse_its_fields(tmp_path):
    """A GPTModel made with OLMo's fields (not loaded; YaRN in every layer) is written as OLMo 3, whose logits
    transformers reproduces and load_checkpoint reads back to the same config; the Llama, Gemma, GPT-2 and
    GPT-Neo exports name what they cannot say, and the OLMo one what OLMo does not compute."""
    from tritongpt.train.gemma_weights import export_gemma
    from tritongpt.train.gpt2_weights import export_gpt2
    from tritongpt.train.gpt_neo_weights import export_gpt_neo
    from tritongpt.train.llama_weights import export_llama
    from tritongpt.train.olmo_weights import export_olmo

    torch.manual_seed(1)
    # YaRN in every layer, the local ones too (no rope_local_theta): written as one RoPE for both layer types
    model = _olmo_like(rope_scaling={k: v for k, v in YARN.items() if k != "rope_theta"}).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    export_olmo(model, tmp_path / "o3")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "o3", dtype=torch.float64).eval()
    assert type(hf).__name__ == "Olmo3ForCausalLM"
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(model(idx), hf(idx).logits, 2e-6, "built here, read by transformers")
    again = load_checkpoint(tmp_path / "o3" / "model.safetensors").config  # the MLP's width read as said
    assert again == GPTConfig(**{**model.config.to_dict(), "kernels": again.kernels, "mlp_hidden": again.ff_hidden})
    with pytest.raises(UserError, match=r"does not normalize each sublayer's input \(pre_norms False"):
        export_llama(_olmo_like(window_layers="all"), tmp_path / "llama")
    with pytest.raises(UserError, match=r"normalizes q and k over all their heads at once"):
        export_llama(_olmo_like(window_layers="all", pre_norms=True, post_norms=False), tmp_path / "llama")
    with pytest.raises(UserError, match=r"pre_norms False.*Gemma 2"):
        export_gemma(_olmo_like(mlp="geglu", scale_embeddings=True, qk_norm=False, qk_norm_width="head"),
                     tmp_path / "gemma")
    gpt2 = dict(vocab_size=VOCAB, context_length=CTX, n_embd=64, n_layer=2, n_head=4, post_norms=True,
                pre_norms=False)
    with pytest.raises(UserError, match="pre_norms False"):
        export_gpt2(GPTModel(GPTConfig(**gpt2)), tmp_path / "gpt2")
    with pytest.raises(UserError, match="pre_norms False"):
        export_gpt_neo(GPTModel(GPTConfig(**gpt2, scale_attention=False, qkv_bias=False)), tmp_path / "neo")
    for change, match in (({"mlp": "geglu"}, "has a geglu MLP, where OLMo 3's is SwiGLU"),
                          ({"pre_norms": True}, "normalizes each sublayer's input"),
                          ({"qk_norm_width": "head"}, "does not normalize the whole q and k"),
                          ({"attn_softcap": 5.0}, "soft-caps its attention scores"),
                          ({"nope_layers": "1"}, r"has layers without RoPE \(1\), which OLMo 3 does not"),
                          ({"attention_scale_width": 24}, r"scales its attention scores by 1/sqrt\(24\)"),
                          ({"attention_window": 0, "window_layers": "all", "bias": True}, "has biases, where OLMo 2")):
        with pytest.raises(UserError, match=match):
            export_olmo(_olmo_like(**change), tmp_path / "no")


@pytest.mark.parametrize("change,match", [
    ({"rotary_dim": 8}, r"rotates only 8 of each head's 32 dimensions \(rotary_dim\)"),
    ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.5] * 16, "long_factor": [3.0] * 16,
                       "original_max_position_embeddings": 10}},
     r"scales RoPE by LongRoPE \(its short and long factors\)"),
], ids=["partial-rotary", "longrope"])
def test_the_olmo_export_refuses_phi3s_fields_by_name(tmp_path, change, match):
    """OLMo rotates whole heads with plain or YaRN frequencies: a partial rotary and LongRoPE (Phi-3's, which
    refuse_phi3_touches names) would be written as a RoPE OLMo computes otherwise. Refused, nothing written."""
    from tritongpt.train.olmo_weights import export_olmo

    with pytest.raises(UserError, match=match + r", which Hugging Face's OLMo 3 does not: it cannot be exported as "
                       r"an OLMo 3 folder \(a Phi-3 folder may take it\)"):
        export_olmo(_olmo_like(**change), tmp_path / "no")
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("scaling", [None, {k: v for k, v in YARN.items() if k != "rope_theta"}], ids=["plain", "yarn"])
def test_the_flat_rope_scaling_says_the_models_yarn_or_null(tmp_path, scaling):
    """transformers 4.x and the Hub's OLMo 3 configs say RoPE flat (rope_theta, rope_scaling: the full-attention
    layers' scaling, the sliding ones unscaled), beside transformers 5's rope_parameters: the export's flat
    rope_scaling is the model's YaRN (the attention factor GPTConfig fills in included) or null, and a config.json
    without rope_parameters reads back to this model, by transformers and by load_checkpoint. (Base 500000, the
    one transformers 5's Olmo3Config gives the sliding layers when it reads the flat keys.)"""
    from tritongpt.train.olmo_weights import export_olmo

    torch.manual_seed(2)
    model = _olmo_like(rope_theta=5e5, rope_scaling=scaling, rope_local_theta=5e5 if scaling else 0.0).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    export_olmo(model, tmp_path / "o3")
    cfg_json = tmp_path / "o3" / "config.json"
    d = json.loads(cfg_json.read_text())
    want = scaling and {**scaling, "attention_factor": pytest.approx(0.1 * math.log(4.0) + 1)}
    assert (d["rope_theta"], d["rope_scaling"]) == (5e5, want)
    cfg_json.write_text(json.dumps({k: v for k, v in d.items() if k != "rope_parameters"}))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "o3", dtype=torch.float64).eval()
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(model(idx), hf(idx).logits, 2e-6, "the flat RoPE fields, read by transformers")
    again = load_checkpoint(tmp_path / "o3" / "model.safetensors").config
    assert again == GPTConfig(**{**model.config.to_dict(), "kernels": again.kernels, "mlp_hidden": again.ff_hidden})


def test_yarn_in_the_sliding_layers_too_is_noted_at_export(tmp_path, capsys):
    """A model that scales every layer's RoPE (no rope_local_theta) has no flat form (the flat rope_scaling is the
    full-attention layers' only): its export says so; one with the sliding layers unscaled, or none, does not."""
    from tritongpt.train.olmo_weights import export_olmo

    yarn = {k: v for k, v in YARN.items() if k != "rope_theta"}
    export_olmo(_olmo_like(rope_scaling=yarn), tmp_path / "all")
    assert "scales the sliding-window layers' RoPE too (yarn)" in capsys.readouterr().err
    export_olmo(_olmo_like(rope_scaling=yarn, rope_local_theta=500.0), tmp_path / "full")
    export_olmo(_olmo_like(rope_scaling=yarn, window_layers="all", attention_window=0), tmp_path / "none")
    assert "sliding-window layers" not in capsys.readouterr().err


@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_olmo_fields_train_on_both_paths_with_the_same_gradients(kernels):
    """One backward through every OLMo piece (no input norms, whole-width q/k norms, post norms, local
    layers by list, YaRN in the global layer): the loss and every parameter's gradient on either path
    are the float64 reference's (fp32, within 1e-4 relative)."""
    yarn = dict(YARN)
    yarn.pop("rope_theta")
    kw = dict(rope_scaling=yarn, rope_local_theta=500.0)
    torch.manual_seed(2)
    ref = _olmo_like(**kw).float()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    idx = torch.randint(0, VOCAB, (2, 19))
    targets = torch.randint(0, VOCAB, (2, 19))
    model = _olmo_like(**kw).float()
    model.load_state_dict(ref.state_dict())
    model.set_kernels(kernels)
    loss = model(idx, targets=targets)
    loss.backward()
    ref64 = _olmo_like(**kw).double()
    ref64.load_state_dict(ref.state_dict())
    want = ref64(idx, targets=targets)
    want.backward()
    assert_close_rel(loss.double().reshape(1), want.reshape(1), 1e-5, "loss")
    grads = dict(ref64.named_parameters())
    for name, p in model.named_parameters():
        assert_close_rel(p.grad.double(), grads[name].grad, 1e-4, name)


def test_a_resume_that_would_drop_olmos_fields_is_refused_by_name():
    from types import SimpleNamespace

    from tritongpt.train.loop import Trainer

    olmo = _olmo_like().config
    saved = olmo.to_dict()
    Trainer._check_same_function(SimpleNamespace(_cfg=olmo, name="pretrain"), "ckpt", saved)
    for change, refused in (({"pre_norms": True}, "does not normalize each sublayer's input and normalizes q and k "
                                                  "over all heads at once, this run's model normalizes each"),
                            ({"qk_norm_width": "head"}, "over all heads at once, this run's model does not normalize "
                                                        "each sublayer's input and normalizes q and k per head")):
        cfg = GPTConfig(**{**saved, **change})
        with pytest.raises(UserError, match=refused):
            Trainer._check_same_function(SimpleNamespace(_cfg=cfg, name="pretrain"), "ckpt", saved)


def test_pretrain_from_an_olmo2_folder_exports_back_as_olmo2_and_resumes_only_as_itself(corpus, tmp_path, capsys):
    """--init an OLMo 2 folder, train a step, export: an OLMo 2 folder that transformers runs with our
    logits; `info` names OLMo's fields; a resume whose flags would build a Llama is refused by name."""
    from tritongpt.cli import main

    hf_olmo(tmp_path / "o", layers=2, vocab=300, context=64, rms_norm_eps=1e-5)
    assert main(pretrain_argv(corpus, tmp_path / "run", "--init", str(tmp_path / "o"), "--max-steps", "1")) == 0
    model = load_checkpoint(tmp_path / "run").eval()
    c = model.config
    assert (c.pre_norms, c.post_norms, c.qk_norm, c.qk_norm_width) == (False, True, True, "all")
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out  # pretrain's header, then export's line
    assert "q/k norms over all heads" in out and "norms after each sublayer only" in out
    assert "OLMo 2 with 2 layers" in out
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "olmo2"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        assert_close_rel(hf(idx).logits, model(idx), 1e-5, "transformers on the export")
    assert main(["info", "--weights", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "pre_norms       False" in out and "qk_norm_width   all" in out
    flags = ("--norm", "rmsnorm", "--mlp", "swiglu", "--mlp-hidden", "88", "--position-encoding", "rope",
             "--rope-theta", "5000", "--no-bias")
    assert main(pretrain_argv(corpus, tmp_path / "run", *flags, "--max-steps", "2", "--resume")) == 2
    assert "model normalizes each head's q and k and has heads of 32, this run's model does not normalize" in \
        capsys.readouterr().err
