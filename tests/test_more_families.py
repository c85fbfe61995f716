"""More of Llama's relatives: ERNIE 4.5 (RoPE in interleaved pairs, biases on every projection), Helium (interleaved
RoPE, q/k/v biases), Seed-OSS (q/k/v biases, a head width of its own) (train/llama_kin_weights.py) and Ministral
(Mistral with its sliding window in the layers layer_types names: train/llama_weights.py). Tiny random transformers
models in float64, every tensor jittered so each one counts, saved to tmp_path: transformers' logits on both kernel
paths, the KV-cache decode and greedy generate's tokens; export writes the folder of the same function (ERNIE 4.5,
Helium and Seed-OSS as the Llama or Qwen2 they compute, Ministral as itself), which transformers reads with the same
logits and load_checkpoint reads back; what this model does not compute refused by name. Nothing downloaded."""
import json

import pytest
import torch

from parity import assert_close_rel, decodes_like, logits_match_transformers
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.train.gpt2_weights import load_checkpoint

transformers = pytest.importorskip("transformers")

VOCAB, CTX, T = 53, 40, 23
_CLASSES = {"ernie4_5": "Ernie4_5", "helium": "Helium", "seed_oss": "SeedOss", "ministral": "Ministral",
            "glm4": "Glm4"}


def hf_kin(folder, kind, tie=False, layers=2, head_dim=16, **config):
    """A tiny random <kind>ForCausalLM in float64: 4 heads of head_dim over a width of 64 on 2 KV heads, RoPE base
    5000, saved to folder, EOS, BOS and pad 0. -> (the model, its model.safetensors)."""
    torch.manual_seed(0)
    cfg = getattr(transformers, _CLASSES[kind] + "Config")(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=88, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=CTX, rms_norm_eps=1e-6,
        tie_word_embeddings=tie, rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, bos_token_id=0,
        eos_token_id=0, pad_token_id=0, **config)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).double().eval()
    with torch.no_grad():  # unit norms and zero biases would hide a mistake
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(folder)
    return hf, folder / "model.safetensors"


# (kind, builder's arguments, the GPTConfig fields read, the family export writes it as)
CASES = [
    ("ernie4_5", dict(use_bias=True, tie=True), dict(bias=True, qkv_bias_only=False, tie_weights=True), "Llama"),
    ("helium", dict(attention_bias=True), dict(bias=False, qkv_bias_only=True, tie_weights=False), "Qwen2"),
    ("seed_oss", dict(head_dim=32), dict(bias=False, qkv_bias_only=True, attention_head_dim=32), "Qwen2"),
    ("ministral", dict(layers=3, sliding_window=5, layer_types=["sliding_attention", "full_attention",
                                                                "sliding_attention"]),
     dict(bias=False, attention_window=5, window_layers="0,2"), "Ministral"),
    # Glm4Config's default partial_rotary_factor 0.5: 8 of each head's 16 dimensions rotated
    ("glm4", dict(), dict(post_norms=True, pre_norms=True, rotary_dim=8, qkv_bias_only=True, bias=False), "GLM-4"),
]


@pytest.mark.parametrize("kind,build,fields,family", CASES, ids=[c[0] for c in CASES])
def test_loads_decodes_generates_and_exports_like_transformers(tmp_path, kind, build, fields, family):
    from tritongpt.commands import export_target
    from tritongpt.train.generate import generate

    hf, path = hf_kin(tmp_path / "in", kind, **build)
    model = load_checkpoint(path).double().eval()
    c = model.config
    assert (c.norm, c.mlp, c.position_encoding, c.kv_heads, c.rope_theta, c.norm_eps) == \
        ("rmsnorm", "swiglu", "rope", 2, 5000.0, 1e-6)
    assert {k: getattr(c, k) for k in fields} == fields
    logits_match_transformers(hf, model, VOCAB, T)
    idx = torch.randint(0, VOCAB, (1, 13))
    with torch.no_grad():
        decodes_like(model, idx, hf(idx).logits)
    ours = generate(model, idx[:, :3], 8)
    # (the mask said: a prompt token 0, the pad id, would be masked out of transformers' attention otherwise)
    theirs = hf.generate(idx[:, :3], attention_mask=torch.ones_like(idx[:, :3]), max_new_tokens=8, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, theirs)
    # export: the family export_target picks, which transformers reads with the original's logits
    name, refuse, export = export_target(c)
    assert name == family
    export(model, tmp_path / "out", eos_token_id=0)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(back(idx).logits, hf(idx).logits, 2e-6, "exported, read by transformers")
    again = load_checkpoint(tmp_path / "out" / "model.safetensors")
    assert again.config == GPTConfig(**{**c.to_dict(), "kernels": again.config.kernels})


@pytest.mark.parametrize("kind,change,match", [
    ("ernie4_5", {"hidden_act": "gelu"}, "hidden_act 'gelu'; this model's SwiGLU computes 'silu' only"),
    ("ernie4_5", {"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5; this model rotates every dimension"),
    ("ernie4_5", {"use_bias": "true"}, "use_bias 'true'; it must be true or false"),
    ("helium", {"mlp_bias": True}, "attention_bias false, mlp_bias true; this model's projections have biases on "
     r"all of them, on q, k and v only, or none \(Helium's o_proj has none\)"),
    ("helium", {"sliding_window": 8}, "sliding_window 8; Helium attends to the whole context"),
    ("seed_oss", {"attention_out_bias": True}, "attention_bias true, mlp_bias false, attention_out_bias true; this "
     "model's projections have biases on all of them"),
    ("seed_oss", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 5000.0, "factor": 2.0}},
     "rope_parameters of type 'dynamic'"),
    ("seed_oss", {"head_dim": 24}, "says head_dim 24, but the weights have 16"),
    ("ministral", {"layer_types": ["sliding_attention"] * 2}, "has 2 layer_types for 3 layers"),
    ("ministral", {"sliding_window": 0}, "sliding_window 0; it must be a positive integer or null"),
    # (a misspelled entry was read as full attention, a string as its characters: other windows, said nowhere)
    ("ministral", {"layer_types": ["sliding_attention", "sliding", "full_attention"]},
     r"layer_types \['sliding_attention', 'sliding', 'full_attention'\]; it must list 'sliding_attention' or "
     "'full_attention' for each of its 3 layers"),
    ("ministral", {"layer_types": "full_attention"}, "layer_types 'full_attention'; it must list"),
    ("glm4", {"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ("glm4", {"partial_rotary_factor": 0.1, "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0,
                                                                 "partial_rotary_factor": 0.1}},
     "partial rotary factor 0.1: 1 of head_dim 16 rotated"),
    ("glm4", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 5000.0, "factor": 2.0}},
     "rope_parameters of type 'yarn'; this model reads GLM-4's RoPE unscaled"),
    ("glm4", {"attention_bias": False}, "has attention_bias false, but the weights have q_proj's bias"),
    # (the other way, biases said and missing, is model_with_tensors' missing tensor)
    ("seed_oss", {"attention_bias": False}, "says no q/k/v biases, but the weights have q_proj's bias"),
], ids=["ernie-activation", "ernie-partial-rotary", "ernie-bias-type", "helium-mlp-bias", "helium-window",
        "seed-out-bias", "seed-dynamic-rope", "seed-head-dim", "ministral-layer-types", "ministral-window",
        "ministral-layer-type-unknown", "ministral-layer-types-text",
        "glm4-activation", "glm4-partial-rotary", "glm4-yarn", "glm4-biases-not-said",
        "seed-biases-not-said"])
def test_what_this_model_does_not_compute_is_refused_by_name(hf_copy, tmp_path, kind, change, match):
    build = dict(layers=3, sliding_window=5) if kind == "ministral" else {}
    path = hf_copy(hf_kin, tmp_path, kind, **build)
    cfg_json = tmp_path / "config.json"
    cfg_json.write_text(json.dumps({**json.loads(cfg_json.read_text()), **change}))
    with pytest.raises(UserError, match=match):
        load_checkpoint(path)


def test_config_defaults_are_each_familys(hf_copy, tmp_path):
    """A config.json that says no RoPE base nor eps reads each config class's defaults: ERNIE 4.5's base 500000 and
    eps 1e-5, Helium's 100000 and 1e-8, Seed-OSS's 10000 and 1e-6 (transformers' own, checked here)."""
    for kind, theta, eps in (("ernie4_5", 500000.0, 1e-5), ("helium", 100000.0, 1e-8), ("seed_oss", 10000.0, 1e-6)):
        to = tmp_path / kind
        path = hf_copy(hf_kin, to, kind)
        cfg_json = to / "config.json"
        d = {k: v for k, v in json.loads(cfg_json.read_text()).items()
             if k not in ("rope_parameters", "rope_theta", "rms_norm_eps")}
        cfg_json.write_text(json.dumps(d))
        theirs = transformers.AutoConfig.from_pretrained(to)
        assert (theirs.rope_parameters["rope_theta"], theirs.rms_norm_eps) == (theta, eps)
        c = load_checkpoint(path).config
        assert (c.rope_theta, c.norm_eps) == (theta, eps)


@pytest.mark.parametrize("change,said", [
    ({"bias": True}, "has biases on its output projection and MLP, where GLM-4's are on q, k and v only"),
    ({"attention_window": 5}, "has local attention (attention_window 5), where GLM-4 attends to the whole context"),
    ({"qk_norm": True}, "normalizes q and k (qk_norm), which GLM-4 does not"),
    ({"logit_softcap": 30.0}, "soft-caps its logits (logit_softcap 30), which GLM-4 does not"),
], ids=["biases", "window", "qk-norm", "softcap"])
def test_a_glm4_shaped_model_glm4_cannot_say_is_refused_by_name(tmp_path, change, said):
    """Sandwich norms on a SwiGLU block are GLM-4's (export_target): what its folder cannot say refused before any
    file is written."""
    from tritongpt.commands import export_target
    from tritongpt.model.gpt import GPTModel

    cfg = GPTConfig(vocab_size=VOCAB, context_length=CTX, n_embd=64, n_layer=1, n_head=4, norm="rmsnorm",
                    mlp="swiglu", position_encoding="rope", rotary_dim=8, post_norms=True,
                    **(change if "bias" in change else {"bias": False, "qkv_bias_only": True, **change}))
    name, refuse, export = export_target(cfg)
    assert name == "GLM-4"
    with pytest.raises(UserError) as e:
        export(GPTModel(cfg), tmp_path / "out")
    assert f"this model {said}: it cannot be exported as a GLM-4 folder" in str(e.value)
    assert not (tmp_path / "out").exists()
