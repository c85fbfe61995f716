"""Gemma 1, 2 and 3 (text): a Llama-shaped GPTModel with Gemma's touches, each a GPTConfig field
(train/gemma_weights.py): the GeGLU MLP (mlp "geglu"), embeddings scaled by sqrt(n_embd)
(scale_embeddings), RMSNorm's (1 + w) read as our w, the sandwich norms (post_norms), local layers
by a list (window_layers), Gemma 3's q/k norms and the local layers' own RoPE base
(rope_local_theta), Gemma 2's final logit soft cap. Tiny random transformers models saved to
tmp_path (float64, every tensor jittered so each one counts): logits on both kernel paths, the
KV-cache decode, greedy tokens, export round trips through transformers, a pretrain --init step;
what this model does not compute refused by name. Nothing downloaded."""
import json

import pytest
import torch

from parity import assert_close_rel, decode_token_by_token, decodes_like, logits_match_transformers, pretrain_argv
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.gpt2_weights import load_checkpoint

transformers = pytest.importorskip("transformers")

VOCAB, CTX, T = 53, 40, 23
# Gemma 3's two RoPEs, far apart so that swapping them fails the logits
ROPE3 = {"full_attention": {"rope_type": "default", "rope_theta": 300.0},
         "sliding_attention": {"rope_type": "default", "rope_theta": 20000.0}}


def hf_gemma(folder, kind="gemma3_text", layers=7, kv_heads=1, head_dim=32, tie=True, vocab=VOCAB, context=CTX,
             **config):
    """A tiny random Gemma (GemmaForCausalLM, Gemma2ForCausalLM or Gemma3ForCausalLM) in float64,
    saved to folder, EOS 1 and BOS 2. Gemma 3's default layer_types: five local layers to a global
    one (layer 5 global of 7). -> (the model, its model.safetensors)."""
    torch.manual_seed(0)
    cls = {"gemma": "Gemma", "gemma2": "Gemma2", "gemma3_text": "Gemma3Text"}[kind]
    if kind != "gemma":
        config = {"query_pre_attn_scalar": head_dim, "sliding_window": 7, "attn_logit_softcapping": None,
                  "final_logit_softcapping": None, **config}
    if kind == "gemma3_text":
        config.setdefault("rope_parameters", json.loads(json.dumps(ROPE3)))
    else:
        config.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": 5000.0})
    cfg = getattr(transformers, cls + "Config")(
        vocab_size=vocab, hidden_size=64, intermediate_size=88, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=context,
        tie_word_embeddings=tie, bos_token_id=2, eos_token_id=1, pad_token_id=0, **{"rms_norm_eps": 1e-6, **config})
    model_cls = "Gemma3ForCausalLM" if kind == "gemma3_text" else cls + "ForCausalLM"
    hf = getattr(transformers, model_cls)(cfg).double().eval()
    with torch.no_grad():  # zero norm weights (1 + 0) and unit embeddings would hide a mistake
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(folder)
    return hf, folder / "model.safetensors"


def test_gemma3_loads_with_its_touches_and_matches_transformers(tmp_path):
    hf, path = hf_gemma(tmp_path)
    model = load_checkpoint(path).double().eval()
    c = model.config
    assert (c.mlp, c.scale_embeddings, c.post_norms, c.qk_norm, c.norm, c.head_dim, c.kv_heads) == \
        ("geglu", True, True, True, "rmsnorm", 32, 1)
    assert (c.attention_window, c.window_layers, c.rope_theta, c.rope_local_theta) == (7, "0,1,2,3,4,6", 300.0, 2e4)
    assert [c.layer_window(i) for i in range(7)] == [7] * 5 + [0, 7]
    assert [c.layer_rope(i)[0] for i in range(7)] == [2e4] * 5 + [300.0, 2e4]
    # Gemma's RMSNorm weight w is our 1 + w (loaded into an fp32 model, then made float64)
    w = hf.model.layers[0].pre_feedforward_layernorm.weight.detach()
    assert torch.equal(model.trf_blocks[0].norm2.weight.detach(), (1 + w).float().double())
    logits_match_transformers(hf, model, VOCAB, T)


def test_gemma3_decodes_over_the_cache_and_generates_transformers_tokens(tmp_path):
    hf, path = hf_gemma(tmp_path)
    model = load_checkpoint(path).double().eval()
    idx = torch.randint(0, VOCAB, (1, 15))
    with torch.no_grad():
        _, decoded, _ = decode_token_by_token(model, idx, whole=False)
        assert_close_rel(decoded, hf(idx).logits, 2e-6, "decoded over the cache")
    from tritongpt.train.generate import generate

    ours = generate(model, idx[:, :3], 12)
    theirs = hf.generate(idx[:, :3], max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("kind,kw", [("gemma", {"layers": 2, "head_dim": 16, "kv_heads": 2, "tie": False}),
                                     ("gemma2", {"layers": 4, "head_dim": 16, "final_logit_softcapping": 5.0})],
                         ids=["gemma1", "gemma2"])
def test_gemma1_and_gemma2_match_transformers(tmp_path, kind, kw):
    """Gemma 1: no sandwich norms (its post_attention_layernorm is the MLP's input norm, as Llama's),
    no window, heads of 16 over n_embd 64 (n_embd / n_head). Gemma 2 (without its attention soft cap):
    local layers 0 and 2 (the even ones), the final logits soft-capped at 5."""
    hf, path = hf_gemma(tmp_path, kind, **kw)
    model = load_checkpoint(path).double().eval()
    c = model.config
    if kind == "gemma":
        assert (c.post_norms, c.attention_window, c.logit_softcap, c.tie_weights) == (False, 0, 0.0, False)
    else:
        assert (c.post_norms, c.attention_window, c.window_layers, c.logit_softcap, c.rope_local_theta) == \
            (True, 7, "0,2", 5.0, 0.0)
    logits_match_transformers(hf, model, VOCAB, T)


@pytest.mark.parametrize("kind,kw", [("gemma3_text", {}), ("gemma", {"layers": 2, "head_dim": 16}),
                                     ("gemma2", {"layers": 3, "head_dim": 16, "final_logit_softcapping": 5.0}),
                                     ("gemma2", {"layers": 3, "head_dim": 16, "attn_logit_softcapping": 1.0,
                                                 "query_pre_attn_scalar": 24})],
                         ids=["gemma3", "gemma1", "gemma2", "gemma2-capped"])
def test_export_round_trips_through_transformers(tmp_path, kind, kw):
    """Loaded, exported, read by transformers' AutoModelForCausalLM: the same logits; its model_type
    is the family's, the norms written as w - 1, and load_checkpoint reads the export back."""
    from tritongpt.train.gemma_weights import export_gemma

    hf, path = hf_gemma(tmp_path / "in", kind, **kw)
    hf.set_attn_implementation("eager")
    model = load_checkpoint(path).double().eval()
    export_gemma(model, tmp_path / "out", eos_token_id=1)
    d = json.loads((tmp_path / "out" / "config.json").read_text())
    assert d["model_type"] == kind
    # eager: transformers' SDPA refuses the attention soft cap
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64,
                                                             attn_implementation="eager").eval()
    assert (d.get("attn_logit_softcapping"), d.get("query_pre_attn_scalar")) == \
        ((kw.get("attn_logit_softcapping"), kw.get("query_pre_attn_scalar", 16)) if kind == "gemma2" else
         (None, None if kind == "gemma" else 32))
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(back(idx).logits, hf(idx).logits, 2e-6, "exported, read by transformers")
        assert_close_rel(back(idx).logits, model(idx), 2e-6, "exported, against ours")
    again = load_checkpoint(tmp_path / "out" / "model.safetensors")
    assert again.config == model.config.__class__(**{**model.config.to_dict(), "kernels": again.config.kernels})
    with pytest.raises(UserError, match="already holds a model"):
        export_gemma(model, tmp_path / "out")


@pytest.mark.parametrize("kind,kw", [("gemma2", {"layers": 2, "head_dim": 16}),
                                     ("gemma3_text", {"layers": 2, "head_dim": 32})], ids=["gemma2", "gemma3"])
def test_attention_soft_cap_and_scale_width_match_transformers_on_both_paths(tmp_path, capsys, kind, kw):
    """Gemma 2's attn_logit_softcapping (1 here, so that tanh bends the scores: the uncapped model is
    far off) and the 27B models' query_pre_attn_scalar (a width other than head_dim's): logits on the
    reference and Triton paths, and (Gemma 2's, the capped one) a decode over the KV cache (Tq < Tk in the
    kernel), are transformers' (eager: its SDPA refuses the cap). Gemma 3's config has the cap's field, which
    transformers' Gemma 3 never applies: read as no cap, noted."""
    hf, path = hf_gemma(tmp_path, kind, attn_logit_softcapping=1.0, query_pre_attn_scalar=24, **kw)
    hf.set_attn_implementation("eager")
    model = load_checkpoint(path).double().eval()
    assert (model.config.attn_softcap, model.config.attention_scale_width) == (1.0 if kind == "gemma2" else 0.0, 24)
    assert ("attn_logit_softcapping 1.0, which Gemma 3 does not apply" in capsys.readouterr().err) == \
        (kind == "gemma3_text")
    assert [b.att.softmax_scale for b in model.trf_blocks] == pytest.approx([24 ** -0.5] * kw["layers"], rel=1e-15)
    logits_match_transformers(hf, model, VOCAB, T)
    idx = torch.randint(0, VOCAB, (2, 15))
    with torch.no_grad():
        want = hf(idx).logits
        if kind == "gemma2":  # Gemma 3 decodes in test_gemma3_decodes_over_the_cache_and_generates_..._tokens
            decodes_like(model, idx, want)
        for b in model.trf_blocks:  # without the cap (Gemma 2) or with it (Gemma 3): far from transformers'
            b.att.softcap = 1.0 - b.att.softcap
        other = model(idx)
    assert ((other - want).norm() / want.norm()).item() > 0.05


def hf_gemma3_multimodal(folder, **text):
    """A tiny random Gemma3ForConditionalGeneration (vision tower and projector beside the language model)
    in float64, saved to folder. -> (the model, its model.safetensors)."""
    torch.manual_seed(0)
    text = dict(vocab_size=300, hidden_size=64, intermediate_size=88, num_hidden_layers=7, num_attention_heads=8,
                num_key_value_heads=4, head_dim=256, sliding_window=7, max_position_embeddings=CTX,
                rope_parameters=json.loads(json.dumps(ROPE3)), **text)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                    image_token_index=299, boi_token_index=297, eoi_token_index=298)
    hf = transformers.Gemma3ForConditionalGeneration(cfg).double().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(folder)
    return hf, folder / "model.safetensors"


def test_a_multimodal_gemma3_loads_as_its_language_model(tmp_path, capsys):
    """Gemma 3 4B and up (Gemma3ForConditionalGeneration): its language model's tensors and text_config are
    read, the vision tower left out (noted); the text logits are transformers' for the whole model. A
    text_config trimmed as the Hub's 4B's is (widths, layers, window, RoPE scaling only) reads the rest as
    Gemma3TextConfig's defaults: 8 heads of 256 over 4 KV heads, the 4B's."""
    hf, path = hf_gemma3_multimodal(tmp_path)
    model = load_checkpoint(path).double().eval()
    assert "a multimodal Gemma 3; its language model is read, without the vision tower" in capsys.readouterr().err
    c = model.config
    assert (c.vocab_size, c.n_head, c.kv_heads, c.head_dim, c.window_layers, c.qk_norm, c.tie_weights) == \
        (300, 8, 4, 256, "0,1,2,3,4,6", True, True)
    idx = torch.randint(0, 297, (2, T))  # text tokens only
    with torch.no_grad():
        assert_close_rel(model(idx), hf(input_ids=idx).logits, 2e-6, "multimodal Gemma 3's text logits")
    cfg_json = tmp_path / "config.json"
    d = json.loads(cfg_json.read_text())
    keep = ("hidden_size", "intermediate_size", "model_type", "num_hidden_layers", "rope_scaling", "sliding_window")
    d["text_config"] = {k: v for k, v in d["text_config"].items() if k in keep}
    cfg_json.write_text(json.dumps(d))
    trimmed = load_checkpoint(path).config
    assert (trimmed.n_head, trimmed.kv_heads, trimmed.head_dim, trimmed.context_length, trimmed.rope_theta,
            trimmed.rope_local_theta, trimmed.attn_softcap, trimmed.attention_scale_width) == \
        (8, 4, 256, 131072, 1e6, 1e4, 0.0, 0)
    d["text_config"]["num_attention_heads"] = 4  # the defaults are only defaults: the file's own win
    cfg_json.write_text(json.dumps(d))
    with pytest.raises(UserError, match="head_dim 256, but the weights have 512"):
        load_checkpoint(path)


def test_a_multimodal_gemma3s_head_is_tied_by_the_top_level_field(hf_copy, tmp_path):
    """Gemma3ForConditionalGeneration ties its head by the top level's tie_word_embeddings (Gemma3Config's: default
    true, a null false), never text_config's, which _text_config read: text_config false beside no head is the
    tied model in transformers 5 (it was refused as a random head), a top-level false or null beside no head a
    random head (it was read tied), refused by name. text_config's null is still refused: Gemma3TextConfig's."""
    path = hf_copy(hf_gemma3_multimodal, tmp_path)
    cfg_json = tmp_path / "config.json"
    d = json.loads(cfg_json.read_text())

    def say(top, text):
        d["tie_word_embeddings"], d["text_config"]["tie_word_embeddings"] = top, text
        cfg_json.write_text(json.dumps(d))

    say(True, False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)  # (the premise: transformers ties it)
    assert torch.equal(hf.lm_head.weight, hf.get_input_embeddings().weight)
    assert load_checkpoint(path).config.tie_weights
    for top in (False, None):
        say(top, True)
        with pytest.raises(UserError, match="config.json says tie_word_embeddings false, but the weights beside it "
                                            "have no lm_head.weight: transformers would start a random LM head"):
            load_checkpoint(path)
    say(True, None)
    with pytest.raises(UserError, match="config.json's text_config has tie_word_embeddings null; it must be true or "
                                        "false"):
        load_checkpoint(path)


def test_the_model_types_read_name_the_multimodal_gemma3(tmp_path):
    """load_checkpoint reads a multimodal Gemma 3 folder (model_type gemma3) as its language model, so
    read_model_types, the list a folder of an unknown model_type is refused with, names it (it named only
    gemma3_text, so the refusal said gemma3 was not read)."""
    from tritongpt.train.gemma_weights import is_gemma_file
    from tritongpt.train.gpt2_weights import _gpt2_config_json, read_model_types

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3"}))
    assert is_gemma_file(tmp_path / "model.safetensors") and "gemma3" in read_model_types()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v2"}))
    with pytest.raises(UserError, match=r"not a GPT-2 model \(tritongpt reads .*, gemma3_text, gemma3, "):
        _gpt2_config_json(tmp_path / "config.json")


def test_attention_cap_and_scale_fields_are_checked_and_exports_that_cannot_say_them_refuse(tmp_path):
    from tritongpt.train.gemma_weights import export_gemma
    from tritongpt.train.llama_weights import export_llama

    for bad, match in (({"attn_softcap": -1.0}, "attn_softcap must be a finite number >= 0"),
                       ({"attn_softcap": float("inf")}, "attn_softcap must be a finite number >= 0"),
                       ({"attention_scale_width": -2}, "attention_scale_width must be an integer >= 0"),
                       ({"attention_scale_width": 1.5}, "attention_scale_width must be an integer >= 0"),
                       ({"attention_scale_width": 64, "scale_attention": False}, "scale_attention False leaves")):
        with pytest.raises(UserError, match=match):
            GPTConfig(**bad)
    llama = dict(scale_embeddings=False, post_norms=False, qk_norm=False, mlp="swiglu", window_layers="all",
                 rope_local_theta=0.0)
    with pytest.raises(UserError, match="soft-caps its attention scores at 50"):
        export_llama(_gemma_like(**llama, attn_softcap=50.0), tmp_path / "llama")
    with pytest.raises(UserError, match=r"scales its attention scores by 1/sqrt\(48\)"):
        export_llama(_gemma_like(**llama, attention_scale_width=48), tmp_path / "llama")
    gemma1 = dict(post_norms=False, qk_norm=False, attention_window=0, window_layers="all", rope_local_theta=0.0)
    with pytest.raises(UserError, match="soft-caps its attention scores, which Gemma 3 does not"):
        export_gemma(_gemma_like(attn_softcap=50.0), tmp_path / "g3")
    with pytest.raises(UserError, match="soft-caps its attention scores, which Gemma does not"):
        export_gemma(_gemma_like(**gemma1, attn_softcap=50.0), tmp_path / "g1")
    with pytest.raises(UserError, match=r"scales its attention scores by 1/sqrt\(48\), where Gemma 1"):
        export_gemma(_gemma_like(**gemma1, attention_scale_width=48), tmp_path / "g1")


@pytest.mark.parametrize("kind,kw", [("gemma2", {"layers": 3, "head_dim": 16}), ("gemma3_text", {})],
                         ids=["gemma2", "gemma3"])
def test_a_config_without_caps_window_or_layer_types_is_read_as_transformers_reads_it(tmp_path, kind, kw):
    """What a Gemma 2 or 3 config.json leaves out is its config class's default: Gemma 2's caps 50 (attention)
    and 30 (logits), its even layers sliding; Gemma 3's five local layers to a global one, no caps; both a
    window of 4096 and query_pre_attn_scalar 256. Compared field by field with transformers' AutoConfig."""
    _, path = hf_gemma(tmp_path, kind, **kw)
    cfg_json = tmp_path / "config.json"
    d = json.loads(cfg_json.read_text())
    for key in ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar", "sliding_window",
                "layer_types"):
        d.pop(key)
    cfg_json.write_text(json.dumps(d))
    c, theirs = load_checkpoint(path).config, transformers.AutoConfig.from_pretrained(tmp_path)
    assert (c.attn_softcap, c.logit_softcap) == ((50.0, 30.0) if kind == "gemma2" else (0.0, 0.0))
    assert (c.attn_softcap, c.logit_softcap) == (theirs.attn_logit_softcapping or 0.0,
                                                 theirs.final_logit_softcapping or 0.0)
    assert (c.attention_scale_width, c.attention_window) == (theirs.query_pre_attn_scalar, theirs.sliding_window)
    assert [bool(c.layer_window(i)) for i in range(c.n_layer)] == \
        [t == "sliding_attention" for t in theirs.layer_types]


def test_gemma3_without_rope_parameters_reads_the_older_keys(tmp_path):
    """A config.json from before transformers 5: rope_theta (global), rope_local_base_freq (local) and
    rope_scaling (global only), as the Hub's Gemma 3 270M and 1B say them."""
    hf, path = hf_gemma(tmp_path, rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                      "rope_theta": 300.0},
                                                   "sliding_attention": {"rope_type": "default",
                                                                         "rope_theta": 20000.0}})
    cfg_json = tmp_path / "config.json"
    d = json.loads(cfg_json.read_text())
    d.pop("rope_parameters")
    cfg_json.write_text(json.dumps({**d, "rope_theta": 300.0, "rope_local_base_freq": 20000.0,
                                    "rope_scaling": {"rope_type": "linear", "factor": 2.0}}))
    model = load_checkpoint(path).double().eval()
    c = model.config
    assert (c.rope_theta, c.rope_scaling, c.rope_local_theta) == (300.0, {"rope_type": "linear", "factor": 2.0}, 2e4)
    assert c.layer_rope(5) == (300.0, c.rope_scaling) and c.layer_rope(0) == (2e4, None)
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(model(idx), hf(idx).logits, 2e-6, "older keys")


def test_gemma3_merges_rope_scaling_into_the_global_layers_rope_as_transformers(hf_copy, tmp_path):
    """A rope_scaling beside rope_parameters: Gemma3TextConfig (transformers 5) merges it into rope_parameters'
    full_attention, its keys winning, a rope_theta of its own included. That base was refused here, as if the file
    said a flat rope_theta (rope_parameters' 300, which the reader passed on as one) disagreeing with it."""
    path = hf_copy(hf_gemma, tmp_path, layers=7)
    cfg_json = tmp_path / "config.json"
    scaling = {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}
    cfg_json.write_text(json.dumps({**json.loads(cfg_json.read_text()), "rope_scaling": scaling}))
    theirs = transformers.AutoConfig.from_pretrained(tmp_path).rope_parameters
    c = load_checkpoint(path).config
    assert (c.rope_theta, c.rope_scaling, c.rope_local_theta) == \
        (theirs["full_attention"]["rope_theta"], {"rope_type": "linear", "factor": theirs["full_attention"]["factor"]},
         theirs["sliding_attention"]["rope_theta"]) == (500.0, {"rope_type": "linear", "factor": 2.0}, 20000.0)


def test_gemma3_one_rope_object_is_read_as_transformers_and_refused_beside_rope_scaling(hf_copy, tmp_path, capsys):
    """One rope_parameters object, not one per layer type: Gemma3TextConfig (transformers 5) does not read it (its
    default bases, 1e6 and 1e4, as the reader had it), and beside a rope_scaling it fails (KeyError
    'full_attention'), where the reader merged the two into a scaled global RoPE: refused by name, as OLMo 3's."""
    path = hf_copy(hf_gemma, tmp_path, layers=7)
    cfg_json = tmp_path / "config.json"
    d = {k: v for k, v in json.loads(cfg_json.read_text()).items() if k != "rope_parameters"}
    one = {"rope_type": "default", "rope_theta": 300.0}
    cfg_json.write_text(json.dumps({**d, "rope_parameters": one}))
    theirs = transformers.AutoConfig.from_pretrained(tmp_path).rope_parameters
    c = load_checkpoint(path).config
    assert (c.rope_theta, c.rope_scaling, c.rope_local_theta) == \
        (theirs["full_attention"]["rope_theta"], None, theirs["sliding_attention"]["rope_theta"]) == (1e6, None, 1e4)
    assert "one rope_parameters object" in capsys.readouterr().err
    cfg_json.write_text(json.dumps({**d, "rope_parameters": one, "rope_scaling": {"rope_type": "linear",
                                                                                   "factor": 2.0}}))
    with pytest.raises(KeyError, match="full_attention"):
        transformers.AutoConfig.from_pretrained(tmp_path)
    with pytest.raises(UserError, match="one rope_parameters object .not one per layer type. and a rope_scaling; "
                                        "transformers' Gemma3TextConfig fails on that pair"):
        load_checkpoint(path)


@pytest.mark.parametrize("change,match", [
    ({"attn_logit_softcapping": -1.0}, "attn_logit_softcapping -1.0; it must be a number > 0 or null"),
    ({"attention_bias": True}, "attention_bias true; Gemma's projections have no biases here"),
    ({"query_pre_attn_scalar": 1.5}, "query_pre_attn_scalar 1.5; it must be a positive integer"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"hidden_activation": "silu"}, "hidden_activation 'silu'"),
    ({"model_type": "gemma3"}, "multimodal Gemma 3 without a Gemma 3 text_config"),
    ({"layer_types": ["sliding_attention"] * 3}, "for each of the 7 layers"),
    ({"head_dim": 16}, "head_dim 16, but the weights have 32"),
    ({"rope_parameters": {**ROPE3, "sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
     "scales the local layers' RoPE"),
    # transformers 4.x reads the flat keys, 5 rope_parameters' per layer type (300 and 20000 in the fixture): two
    # models. They were read as rope_parameters', the flat ones passed over
    ({"rope_theta": 777.0}, r"has rope_theta 777.0, but this model's RoPE reads the rope_theta in "
                            r'rope_parameters\["full_attention"\], 300.0 \(transformers 4.x reads rope_theta'),
    ({"rope_local_base_freq": 777.0}, r"has rope_local_base_freq 777.0, but Gemma 3's RoPE reads the rope_theta in "
                                      r'rope_parameters\["sliding_attention"\], 20000.0 \(transformers 4.x reads '
                                      r"rope_local_base_freq"),
    # a field passed on as config.json gives it, which GPTConfig refuses: named with the file and its key
    ({"final_logit_softcapping": "30"},
     r"config\.json: final_logit_softcapping \(GPTConfig\.logit_softcap\) must be a finite number >= 0"),
    ({"rms_norm_eps": 0}, r"config\.json: rms_norm_eps \(GPTConfig\.norm_eps\) must be a number in \(0, 1\), got 0"),
    # bool("false") is True: a flag spelled as a string is refused by name
    ({"use_bidirectional_attention": "false"},
     "config.json has use_bidirectional_attention 'false'; it must be true or false"),
], ids=["attn-softcap", "attention-bias", "query-scalar", "bidirectional", "activation", "multimodal", "layer-types",
        "head-dim", "local-scaling", "flat-theta", "flat-local-theta", "softcap-type", "eps-zero",
        "bidirectional-type"])
def test_what_this_model_does_not_compute_is_refused_by_name(hf_copy, tmp_path, change, match):
    path = hf_copy(hf_gemma, tmp_path, layers=7)
    cfg_json = tmp_path / "config.json"
    cfg_json.write_text(json.dumps({**json.loads(cfg_json.read_text()), **change}))
    with pytest.raises(UserError, match=match):
        load_checkpoint(path)


def _gemma_like(**kw):
    cfg = dict(vocab_size=VOCAB, context_length=CTX, n_embd=64, n_layer=3, n_head=4, n_kv_head=1,
               attention_head_dim=32, position_encoding="rope", norm="rmsnorm", mlp="geglu", bias=False,
               scale_embeddings=True, post_norms=True, qk_norm=True, attention_window=5, window_layers="0,2",
               rope_theta=500.0, rope_local_theta=10000.0, norm_eps=1e-6)
    cfg.update(kw)
    return GPTModel(GPTConfig(**cfg))


def test_a_model_built_here_exports_as_gemma3_and_other_exports_refuse_its_touches(tmp_path):
    """A GPTModel made with Gemma 3's fields (not loaded) is written as Gemma 3, whose logits
    transformers reproduces; GPT-2, GPT-Neo and Llama exports name what they cannot say."""
    from tritongpt.train.gemma_weights import export_gemma
    from tritongpt.train.gpt2_weights import export_gpt2
    from tritongpt.train.gpt_neo_weights import export_gpt_neo
    from tritongpt.train.llama_weights import export_llama

    torch.manual_seed(1)
    model = _gemma_like().double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    export_gemma(model, tmp_path / "g3")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "g3", dtype=torch.float64).eval()
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(model(idx), hf(idx).logits, 2e-6, "built here, read by transformers")
    with pytest.raises(UserError, match="RoPE base of their own"):
        export_llama(_gemma_like(scale_embeddings=False, post_norms=False, qk_norm=False, mlp="swiglu",
                                 window_layers="all"), tmp_path / "llama")
    with pytest.raises(UserError, match="sandwich norms"):
        export_llama(_gemma_like(scale_embeddings=False, mlp="swiglu", window_layers="all",
                                 rope_local_theta=0.0), tmp_path / "llama")
    with pytest.raises(UserError, match="local attention in layers 0,2 only"):
        export_gpt_neo(GPTModel(GPTConfig(vocab_size=VOCAB, context_length=CTX, n_embd=64, n_layer=3, n_head=4,
                                          attention_window=5, window_layers="0,2", scale_attention=False,
                                          qkv_bias=False)), tmp_path / "neo")
    with pytest.raises(UserError, match="scales its token embeddings"):
        export_gpt2(GPTModel(GPTConfig(vocab_size=VOCAB, context_length=CTX, n_embd=64, n_layer=3, n_head=4,
                                       scale_embeddings=True)), tmp_path / "gpt2")
    with pytest.raises(UserError, match="GeGLU"):
        export_gemma(_gemma_like(mlp="swiglu"), tmp_path / "no")
    with pytest.raises(UserError, match="RoPE of their own"):
        export_gemma(_gemma_like(qk_norm=False), tmp_path / "no")  # a Gemma 2 has one RoPE
    with pytest.raises(UserError, match=r"does not normalize its sublayers' outputs \(post_norms\), which Gemma 3's"):
        export_gemma(_gemma_like(post_norms=False), tmp_path / "no")
    # no local layer: transformers' Gemma 2 and 3 still build a sliding mask, from the context's window written
    for change in ({"qk_norm": False}, {}):
        model = _gemma_like(attention_window=0, window_layers="all", rope_local_theta=0.0, **change).double().eval()
        export_gemma(model, tmp_path / "global", overwrite=True)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "global", dtype=torch.float64).eval()
        with torch.no_grad():
            assert_close_rel(model(idx), hf(idx).logits, 2e-6, f"no local layer, {type(hf).__name__}")
        assert load_checkpoint(tmp_path / "global").config.attention_window == 0


GEMMA1 = dict(post_norms=False, qk_norm=False, attention_window=0, window_layers="all", rope_local_theta=0.0)


@pytest.mark.parametrize("kind,kw", [("gemma", GEMMA1), ("gemma3_text", {})], ids=["gemma1", "gemma3"])
def test_the_export_writes_the_models_norm_eps(tmp_path, kind, kw):
    """An rms_norm_eps hard-coded to Gemma's 1e-6 passes the round trips of models of 1e-6, and a 1e-5 hides under
    a float32 tolerance: a model of 1e-3 (large enough that a wrong eps moves transformers' logits far past this
    float64 tolerance) is written with its eps, which transformers reads to our logits."""
    from tritongpt.train.gemma_weights import export_gemma

    torch.manual_seed(4)
    model = _gemma_like(norm_eps=1e-3, **kw).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    export_gemma(model, tmp_path / "g")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "g", dtype=torch.float64).eval()
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(model(idx), hf(idx).logits, 2e-6, f"norm_eps 1e-3, read by transformers' {kind}")
    d = json.loads((tmp_path / "g" / "config.json").read_text())
    assert (d["model_type"], d["rms_norm_eps"]) == (kind, 1e-3)
    assert load_checkpoint(tmp_path / "g" / "model.safetensors").config.norm_eps == 1e-3


def test_window_layers_as_a_list_is_checked():
    assert GPTConfig(n_layer=4, window_layers="0, 1,2,3").window_layers == "all"
    for bad, match in (("2,1", "increasing"), ("0,4", "below n_layer 4"), ("0,,1", "comma list"),
                       ("evens", "comma list"), ("1,1", "distinct")):
        with pytest.raises(UserError, match=match):
            GPTConfig(n_layer=4, window_layers=bad)
    with pytest.raises(UserError, match="rope_local_theta 10000 is the RoPE base of the local layers; this model "
                                        "has no local attention"):
        GPTConfig(position_encoding="rope", rope_local_theta=1e4)


@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_gemma_fields_train_on_both_paths_with_the_same_gradients(kernels):
    """One backward through every Gemma piece (scaled embeddings, q/k norms, sandwich norms, GeGLU,
    two RoPEs, local layers by list): the Triton path's loss and every parameter's gradient are the
    reference path's (fp32, within 1e-4 relative)."""
    torch.manual_seed(2)
    ref = _gemma_like().float()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    idx = torch.randint(0, VOCAB, (2, 19))
    targets = torch.randint(0, VOCAB, (2, 19))
    model = _gemma_like().float()
    model.load_state_dict(ref.state_dict())
    model.set_kernels(kernels)
    loss = model(idx, targets=targets)
    loss.backward()
    ref64 = _gemma_like().double()
    ref64.load_state_dict(ref.state_dict())
    want = ref64(idx, targets=targets)
    want.backward()
    assert_close_rel(loss.double().reshape(1), want.reshape(1), 1e-5, "loss")
    grads = dict(ref64.named_parameters())
    for name, p in model.named_parameters():
        assert_close_rel(p.grad.double(), grads[name].grad, 1e-4, name)


def test_pretrain_from_a_gemma3_folder_exports_back_as_gemma3_and_resumes_only_as_itself(corpus, tmp_path, capsys):
    """--init a Gemma 3 folder, train a step, export: a Gemma 3 folder that transformers runs with our
    logits; `info` names Gemma's fields; a resume whose flags would build a model without them is
    refused by name."""
    from tritongpt.cli import main

    hf_gemma(tmp_path / "g", layers=3, vocab=300, context=64, rms_norm_eps=1e-5,
             layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    assert main(pretrain_argv(corpus, tmp_path / "run", "--init", str(tmp_path / "g"), "--max-steps", "1")) == 0
    model = load_checkpoint(tmp_path / "run").eval()
    c = model.config
    assert (c.mlp, c.scale_embeddings, c.post_norms, c.qk_norm, c.rope_local_theta) == ("geglu", True, True, True,
                                                                                        2e4)
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    assert "Gemma 3 with 3 layers" in capsys.readouterr().out
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "gemma3_text"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        assert_close_rel(hf(idx).logits, model(idx), 1e-5, "transformers on the export")
    assert main(["info", "--weights", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "post_norms" in out and "scale_embeddings" in out and "rope_local_theta" in out
    flags = ("--norm", "rmsnorm", "--mlp", "geglu", "--mlp-hidden", "88", "--position-encoding", "rope",
             "--rope-theta", "300", "--no-bias", "--attention-window", "7", "--window-layers", "0,1")
    assert main(pretrain_argv(corpus, tmp_path / "run", *flags, "--max-steps", "2", "--resume")) == 2
    assert "model normalizes each head's q and k and has heads of 32, this run's model does not normalize" in \
        capsys.readouterr().err


def test_a_resume_that_would_drop_gemmas_touches_is_refused_by_name():
    from types import SimpleNamespace

    from tritongpt.train.loop import Trainer

    gemma = _gemma_like().config
    saved = gemma.to_dict()
    Trainer._check_same_function(SimpleNamespace(_cfg=gemma, name="pretrain"), "ckpt", saved)
    for change, refused in (({"post_norms": False}, "does not normalize each sublayer's output"),
                            ({"scale_embeddings": False}, "does not scale its token embeddings"),
                            ({"rope_local_theta": 0.0}, "has one RoPE for every layer"),
                            ({"attn_softcap": 20.0}, "soft-caps its attention scores at 0, this run's at 20"),
                            ({"attention_scale_width": 48}, r"by 1/sqrt\(head_dim\), this run's model by "
                                                            r"1/sqrt\(48\)"),
                            ({"mlp": "swiglu"}, "has a GeGLU MLP of hidden size 192, this run's model has a SwiGLU")):
        cfg = GPTConfig(**{**saved, **change})
        with pytest.raises(UserError, match=refused):
            Trainer._check_same_function(SimpleNamespace(_cfg=cfg, name="pretrain"), "ckpt", saved)


def test_scaled_embeddings_round_the_factor_to_their_dtype_as_gemma_does():
    """sqrt(40) = 6.3246 is 6.3125 in bf16: Gemma multiplies by the rounded factor (embed_scale.to(dtype)),
    and so does scale_embeddings; the unrounded one would differ in most entries."""
    import math

    model = GPTModel(GPTConfig(vocab_size=VOCAB, context_length=CTX, n_embd=40, n_layer=1, n_head=2,
                               scale_embeddings=True)).to(torch.bfloat16)
    seen = []
    model.trf_blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    idx = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        model(idx)
        emb = model.tok_emb(idx) + model.pos_emb(torch.arange(9))
        want = model.tok_emb(idx) * torch.tensor(math.sqrt(40), dtype=torch.bfloat16) + model.pos_emb(torch.arange(9))
    assert torch.equal(seen[0], want)
    assert not torch.equal(seen[0], model.tok_emb(idx) * math.sqrt(40) + model.pos_emb(torch.arange(9)))
    assert not torch.equal(seen[0], emb)


def test_pretrain_attn_softcap_builds_a_capped_model_and_resumes_only_as_it(corpus, tmp_path, capsys):
    """pretrain --attn-softcap C: a new model whose attention scores are capped (saved in its config, said
    at start); a resume without the flag, an --init that would change it and a negative cap refused by name."""
    from tritongpt.cli import main

    run = tmp_path / "run"
    assert main(pretrain_argv(corpus, run, "--attn-softcap", "5", "--max-steps", "1")) == 0
    assert "attention scores soft-capped at 5" in capsys.readouterr().out
    assert load_checkpoint(run).config.attn_softcap == 5.0
    assert main(pretrain_argv(corpus, run, "--max-steps", "2", "--resume")) == 2
    assert "soft-caps its attention scores at 5, this run's at 0 (0: none): pass --attn-softcap 5" in \
        capsys.readouterr().err
    assert main(pretrain_argv(corpus, tmp_path / "b", "--init", str(run), "--attn-softcap", "7")) == 2
    assert "--attn-softcap 7 would change what --init's model computes (its attn_softcap is 5)" in \
        capsys.readouterr().err
    assert main(pretrain_argv(corpus, tmp_path / "c", "--attn-softcap", "-1")) == 2
    assert "--attn-softcap must be a finite number >= 0" in capsys.readouterr().err
