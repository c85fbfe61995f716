"""Phi-1, Phi-1.5 and Phi-2: parallel blocks on one norm (GPTConfig.shared_norm), a bias on the LM head
(GPTConfig.head_bias), partial rotary, q/k/v projections of their own (train/phi_weights.py).
Tiny random PhiForCausalLMs saved to tmp_path (float64, every tensor jittered so each one counts, the head's
bias included): logits on both kernel paths, the KV-cache decode, greedy tokens, export round trips through
transformers, gradients on both paths, a pretrain --init step, bench train's row; what this model does not
compute refused by name. Nothing downloaded."""
import json

import pytest
import torch

from parity import a_head_of_its_own_is_kept, assert_close_rel, decodes_like, logits_match_transformers, pretrain_argv
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.gpt2_weights import load_checkpoint

transformers = pytest.importorskip("transformers")

VOCAB, CTX, T = 53, 40, 23


def hf_phi(folder, factor=0.5, kv_heads=None, layers=2, vocab=VOCAB, context=CTX, act="gelu_new", hidden=256,
           **config):
    """A tiny random PhiForCausalLM in float64 (4 heads of 16 over 64, RoPE base 500 on `factor` of each head),
    saved to folder, EOS 2 and BOS 1. -> (the model, its model.safetensors)."""
    torch.manual_seed(0)
    cfg = transformers.PhiConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=context, hidden_act=act, bos_token_id=1,
        eos_token_id=2, **{"layer_norm_eps": 1e-6, "rope_parameters": {"rope_type": "default", "rope_theta": 500.0,
                                                                       "partial_rotary_factor": factor}, **config})
    hf = transformers.PhiForCausalLM(cfg).double().eval()
    with torch.no_grad():  # unit norm weights and zero biases (the head's too) would hide a mistake
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(folder)
    return hf, folder / "model.safetensors"


@pytest.mark.parametrize("factor,kv_heads,extra", [(0.5, None, {}), (0.4, 2, {}), (0.5, None, {"qk_layernorm": True})],
                         ids=["phi-1", "phi-2-gqa", "qk-layernorm"])
def test_loads_its_fields_and_matches_transformers_on_both_paths(tmp_path, factor, kv_heads, extra):
    """Phi-1's and 1.5's half heads rotated, Phi-2's 0.4 (int(16 * 0.4) = 6 of 16) with two key/value heads, and
    the q/k LayerNorms no published Phi has (our per-head qk_norm)."""
    hf, path = hf_phi(tmp_path, factor, kv_heads, **extra)
    model = load_checkpoint(path).double().eval()
    c = model.config
    assert (c.parallel_residual, c.shared_norm, c.head_bias, c.gelu_approximate) == (True, True, True, "tanh")
    assert c.rotary_dim == int(16 * factor) and c.kv_heads == (kv_heads or 4)
    assert (c.position_encoding, c.rope_theta, c.norm, c.mlp, c.bias, c.has_qkv_bias, c.norm_eps) == \
        ("rope", 500.0, "layernorm", "gelu", True, True, 1e-6)
    assert (c.n_layer, c.n_head, c.head_dim, c.tie_weights, c.context_length, c.qk_norm) == \
        (2, 4, 16, False, CTX, bool(extra))
    keys = model.state_dict()
    assert not any(".norm2." in k for k in keys) and "out_head.bias" in keys
    assert torch.equal(model.out_head.bias, hf.lm_head.bias.float().double())  # loaded as fp32 parameters
    logits_match_transformers(hf, model, VOCAB, T)


def test_decodes_over_the_cache_and_generates_transformers_tokens(tmp_path):
    hf, path = hf_phi(tmp_path, 0.4, 2)
    model = load_checkpoint(path).double().eval()
    idx = torch.randint(0, VOCAB, (1, 11))
    with torch.no_grad():
        decodes_like(model, idx, hf(idx).logits)
    from tritongpt.train.generate import generate

    ours = generate(model, idx[:, :3], 12)
    theirs = hf.generate(idx[:, :3], max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("factor,kv_heads,tie,act", [(0.5, None, False, "gelu_new"), (0.4, 2, True, "gelu")],
                         ids=["phi-1", "gqa-tied-erf"])
def test_export_round_trips_through_transformers(tmp_path, factor, kv_heads, tie, act):
    """Loaded, exported, read by transformers' AutoModelForCausalLM: the same logits, model_type phi, and
    load_checkpoint reads the export back to the same config (a tied head keeps its own bias)."""
    from tritongpt.train.phi_weights import export_phi

    hf, path = hf_phi(tmp_path / "in", factor, kv_heads, act=act, tie_word_embeddings=tie)
    model = load_checkpoint(path).double().eval()
    assert model.config.tie_weights == tie
    assert (model.out_head.weight is model.tok_emb.weight) == tie and model.out_head.bias.abs().sum() > 0
    export_phi(model, tmp_path / "out", eos_token_id=2)
    d = json.loads((tmp_path / "out" / "config.json").read_text())
    # rotary_dim / head_dim: 0.4 of 16 is 6 rotated, written back as 0.375
    assert (d["model_type"], int(16 * d["partial_rotary_factor"]), d["num_key_value_heads"], d["hidden_act"]) == \
        ("phi", int(16 * factor), kv_heads or 4, act)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    assert type(back).__name__ == "PhiForCausalLM"
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(back(idx).logits, hf(idx).logits, 2e-6, "exported, read by transformers")
        assert_close_rel(back(idx).logits, model(idx), 2e-6, "exported, against ours")
    again = load_checkpoint(tmp_path / "out" / "model.safetensors")
    assert again.config == GPTConfig(**{**model.config.to_dict(), "kernels": again.config.kernels})
    # transformers 4.x reads the flat keys (rope_theta, partial_rotary_factor) alone: without rope_parameters, the
    # same config
    (tmp_path / "out" / "config.json").write_text(json.dumps({k: v for k, v in d.items() if k != "rope_parameters"}))
    assert load_checkpoint(tmp_path / "out" / "model.safetensors").config == again.config
    with pytest.raises(UserError, match="already holds a model"):
        export_phi(model, tmp_path / "out")


@pytest.mark.parametrize("change,said", [({"qk_norm": True}, {"qk_layernorm": True, "partial_rotary_factor": 0.5}),
                                         ({"rotary_dim": 0}, {"qk_layernorm": False, "partial_rotary_factor": 1.0})],
                         ids=["qk-layernorm", "whole-head-rotary"])
def test_qk_norm_and_whole_head_rotary_export_round_trip_through_transformers(tmp_path, change, said):
    """Two fields the loaded round trips above do not write: per-head q/k LayerNorms (qk_layernorm, tensors of
    their own) and rotary_dim 0, the whole head rotated (partial_rotary_factor 1.0). A model built with each is
    read by PhiForCausalLM with no missing or unexpected tensor (a dropped q/k norm would load as a fresh one,
    silently) and gives our logits."""
    from tritongpt.train.phi_weights import export_phi

    torch.manual_seed(7)
    model = _jittered(_phi_like(**change).double(), 0.3).eval()
    export_phi(model, tmp_path / "out")
    back, info = transformers.PhiForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64,
                                                             output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(back.eval()(idx).logits, model(idx), 2e-6, "exported, against ours")
    # and the fields by name: what config.json says
    d = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {k: d[k] for k in said} == said and d["rope_parameters"]["partial_rotary_factor"] == \
        said["partial_rotary_factor"]
    assert load_checkpoint(tmp_path / "out" / "model.safetensors").config.rotary_dim == model.config.rotary_dim


def test_sharded_and_hub_style_configs_load(tmp_path):
    """The Hub's Phi-2 config.json (transformers 4.x) says partial_rotary_factor and rope_theta at the top level,
    rope_scaling null and num_key_value_heads null, and large models come in shards: both read, with transformers'
    logits; a config.json without the factor is read as PhiConfig's 0.5, as transformers reads it."""
    hf, _ = hf_phi(tmp_path / "a", 0.5)
    hf.save_pretrained(tmp_path / "b", max_shard_size="40KB")
    index = tmp_path / "b" / "model.safetensors.index.json"
    assert index.is_file() and len(set(json.loads(index.read_text())["weight_map"].values())) > 1
    cfg_json = tmp_path / "b" / "config.json"
    d = {k: v for k, v in json.loads(cfg_json.read_text()).items()
         if k not in ("rope_parameters", "max_position_embeddings", "layer_norm_eps", "hidden_act")}
    cfg_json.write_text(json.dumps({**d, "rope_theta": 500.0, "rope_scaling": None, "num_key_value_heads": None,
                                    "layer_norm_eps": 1e-6, "qk_layernorm": False}))
    model = load_checkpoint(tmp_path / "b").double().eval()
    c = model.config
    assert (c.rope_theta, c.rotary_dim, c.context_length, c.gelu_approximate, c.kv_heads) == \
        (500.0, 8, 2048, "tanh", 4)
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(model(idx), hf(idx).logits, 2e-6, "shards, a 4.x config.json, no factor: 0.5")


@pytest.mark.parametrize("change,match", [
    ({"model_type": "phi-msft"}, "model_type 'phi-msft': the remote-code Phi format .* download the "
                                 "transformers-format revision"),
    ({"model_type": "mixformer-sequential"}, "model_type 'mixformer-sequential': the remote-code Phi format"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.35}},
     r"partial rotary factor 0.35: 5 of head_dim 16 rotated"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}},
     "rope_parameters of type 'linear'"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling of type 'dynamic'"),
    # transformers 5 reads rope_parameters' base, 4.x the flat one: a disagreement loads two models
    ({"rope_theta": 10000.0}, r"has rope_theta 10000.0, but Phi's RoPE reads the rope_theta in rope_parameters, 500.0"),
    ({"hidden_act": "relu"}, "hidden_act 'relu'; this model's GELU MLP computes"),
    ({"intermediate_size": 100}, "intermediate_size 100, but the weights have 256"),
    ({"num_attention_heads": 5}, "num_attention_heads 5, which does not divide the weights. width 64"),
    ({"num_attention_heads": "4"},  # (gpt2_weights.head_count)
     r"config\.json says num_attention_heads '4'; it must be a positive integer"),
    ({"num_key_value_heads": 2}, "num_key_value_heads 2, but the weights have 4"),
    ({"head_dim": 32}, r"head_dim 32; Phi's heads are hidden_size / num_attention_heads wide \(16\)"),
    ({"qk_layernorm": True}, r"missing tensor.*q_layernorm"),
    ({"qk_layernorm": "yes"}, "qk_layernorm 'yes'; it must be true or false"),
    # null: PhiConfig (transformers 5, a strict bool field) refuses it, as tie_word_embeddings beside the head
    ({"qk_layernorm": None}, r"qk_layernorm null; it must be true or false \(transformers refuses null here"),
    ({"tie_word_embeddings": None}, r"tie_word_embeddings null; it must be true or false \(transformers refuses"),
    # bool("false") is True: the file's own lm_head was dropped for the embedding without a word
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings 'false'; it must be true or false"),
    # a field passed on as config.json gives it, which GPTConfig refuses: named with the file and its key
    ({"layer_norm_eps": "1e-5"},
     r"config\.json: layer_norm_eps \(GPTConfig\.norm_eps\) must be a number in \(0, 1\), got '1e-5'"),
], ids=["phi-msft", "mixformer", "factor", "linear-rope", "dynamic-rope", "flat-theta", "activation", "mlp-width",
        "heads",
        "heads-type", "kv-heads", "head-dim", "qk-layernorm-tensors", "qk-layernorm-type", "qk-layernorm-null",
        "tie-null", "tie-type", "eps-type"])
def test_what_this_model_does_not_compute_is_refused_by_name(hf_copy, tmp_path, change, match):
    path = hf_copy(hf_phi, tmp_path)
    cfg_json = tmp_path / "config.json"
    d = {k: v for k, v in json.loads(cfg_json.read_text()).items() if k not in change}
    cfg_json.write_text(json.dumps({**d, **change}))
    with pytest.raises(UserError, match=match):
        load_checkpoint(path)


def test_the_head_is_tied_as_transformers_ties_it(hf_copy, tmp_path):
    """tie_word_embeddings true beside a head of the file's own, unlike the embedding: PhiForCausalLM (transformers 5)
    keeps the file's head, where the reader took the embedding for it (another model's logits). Untied beside no
    head at all: transformers starts a random head, refused by name (gpt2_weights.tied_head), not as a missing
    tensor."""
    from safetensors.torch import save_file

    path = hf_copy(hf_phi, tmp_path, layers=1, tie_word_embeddings=True)
    sd = a_head_of_its_own_is_kept(path, "model.embed_tokens.weight", VOCAB, T)
    del sd["lm_head.weight"]
    save_file(sd, path, metadata={"format": "pt"})
    cfg_json = tmp_path / "config.json"
    cfg_json.write_text(json.dumps({**json.loads(cfg_json.read_text()), "tie_word_embeddings": False}))
    with pytest.raises(UserError, match="config.json says tie_word_embeddings false, but the weights beside it have "
                                        "no lm_head.weight: transformers would start a random LM head"):
        load_checkpoint(path)


def test_an_mlp_of_another_width_is_refused(tmp_path):
    _, path = hf_phi(tmp_path, hidden=96)
    with pytest.raises(UserError, match=r"intermediate_size 96; this model's GELU MLP is 4 hidden_size wide \(256\)"):
        load_checkpoint(path)


def _phi_like(**kw):
    cfg = dict(vocab_size=VOCAB, context_length=CTX, n_embd=64, n_layer=2, n_head=4, position_encoding="rope",
               rope_theta=300.0, rotary_dim=8, parallel_residual=True, shared_norm=True, head_bias=True,
               tie_weights=False)
    cfg.update(kw)
    return GPTModel(GPTConfig(**cfg))


def _jittered(model, scale=0.1):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def test_the_fields_are_checked_by_name():
    for bad, match in (({"shared_norm": "yes", "parallel_residual": True}, "shared_norm must be True or False"),
                       ({"head_bias": 1}, "head_bias must be True or False, got 1"),
                       ({"shared_norm": True}, "shared_norm .* is a parallel block's: set parallel_residual True")):
        with pytest.raises(UserError, match=match):
            GPTConfig(**bad)
    c = GPTConfig(parallel_residual=True, shared_norm=True, head_bias=True)
    assert GPTConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    # a tied head keeps its bias as a parameter of its own, zero at first; no norm2 without its own norm
    model = GPTModel(GPTConfig(**{**c.to_dict(), "n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 40}))
    assert model.out_head.weight is model.tok_emb.weight and torch.count_nonzero(model.out_head.bias) == 0
    assert model.trf_blocks[0].norm2 is None and not any("norm2" in k for k in model.state_dict())
    assert "out_head.bias" in dict(model.named_parameters())


def test_a_shared_norm_block_is_the_shared_norm_formula():
    """The block, on its own, is x + attn(ln1(x)) + mlp(ln1(x)), with the sum handed on for the next norm's add;
    and the model's logits carry the head's bias."""
    torch.manual_seed(3)
    model = _jittered(_phi_like().double())
    block = model.trf_blocks[0]
    x = torch.randn(2, 7, 64, dtype=torch.float64)
    with torch.no_grad():
        out, delta = block(x)
        h = block.norm1(x)
        want = x + block.att(h) + block.ff(h)
    assert torch.equal(out, x)
    assert_close_rel(out + delta, want, 1e-12, "shared-norm parallel block")
    idx = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert_close_rel(model(idx), model.hidden(idx) @ model.out_head.weight.t() + model.out_head.bias, 1e-12,
                         "logits with the head's bias")


@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_phi_fields_train_on_both_paths_with_the_same_gradients(kernels):
    """One backward through shared-norm parallel blocks into a biased, padded LM head (the fused Triton loss on
    the Triton path): the loss and every parameter's gradient are the float64 reference's (fp32, 1e-4 relative),
    the head bias's padding entries get none."""
    torch.manual_seed(2)
    ref = _jittered(_phi_like(vocab_multiple=32).float())
    idx = torch.randint(0, VOCAB, (2, 19))
    targets = torch.randint(0, VOCAB, (2, 19))
    targets[0, :3] = -100
    model = _phi_like(vocab_multiple=32).float()
    model.load_state_dict(ref.state_dict())
    model.set_kernels(kernels)
    loss = model(idx, targets=targets)
    loss.backward()
    ref64 = _phi_like(vocab_multiple=32).double()
    ref64.load_state_dict(ref.state_dict())
    want = ref64(idx, targets=targets)
    want.backward()
    assert_close_rel(loss.double().reshape(1), want.reshape(1), 1e-5, "loss")
    grads = dict(ref64.named_parameters())
    for name, p in model.named_parameters():
        assert_close_rel(p.grad.double(), grads[name].grad, 1e-4, name)
    assert torch.count_nonzero(model.out_head.bias.grad[VOCAB:]) == 0


def test_a_model_built_here_exports_as_phi_and_other_exports_refuse_its_fields(tmp_path):
    """A GPTModel made with Phi's fields (not loaded) is written as a Phi, whose logits transformers reproduces;
    every other export names the field it cannot say, and the Phi one what Phi does not compute."""
    from tritongpt.commands import export_target
    from tritongpt.train.gemma_weights import export_gemma
    from tritongpt.train.gpt2_weights import export_gpt2
    from tritongpt.train.gpt_neo_weights import export_gpt_neo
    from tritongpt.train.llama_weights import export_llama
    from tritongpt.train.neox_weights import export_neox
    from tritongpt.train.olmo_weights import export_olmo
    from tritongpt.train.phi3_weights import export_phi3
    from tritongpt.train.phi_weights import export_phi
    from tritongpt.train.stablelm_weights import export_stablelm

    torch.manual_seed(1)
    model = _jittered(_phi_like().double()).eval()
    assert export_target(model.config)[0] == "Phi"
    export_phi(model, tmp_path / "phi")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "phi", dtype=torch.float64).eval()
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(model(idx), hf(idx).logits, 2e-6, "built here, read by transformers")
    gpt2 = dict(vocab_size=VOCAB, context_length=CTX, n_embd=64, n_layer=2, n_head=4)
    shared = {"parallel_residual": True, "shared_norm": True}
    for fields, match in ((shared, r"one norm's output .*shared_norm.*{} does not"),
                          ({"head_bias": True}, r"bias on its LM head \(head_bias\), which .*{} does not")):
        takers = r".*a Phi(, GPT-J, Falcon or Cohere| or GPT-J) folder may take it"
        with pytest.raises(UserError, match=match.format("GPT-2") + takers):
            export_gpt2(GPTModel(GPTConfig(**gpt2, **fields)), tmp_path / "gpt2")
        with pytest.raises(UserError, match=match.format("GPT-Neo")):
            export_gpt_neo(GPTModel(GPTConfig(**gpt2, **fields, scale_attention=False, qkv_bias=False)),
                           tmp_path / "neo")
        rope = dict(gpt2, position_encoding="rope", **fields)
        with pytest.raises(UserError, match=match.format("GPT-NeoX")):
            export_neox(GPTModel(GPTConfig(**rope)), tmp_path / "neox")
        llama = dict(rope, norm="rmsnorm", mlp="swiglu", bias=False)
        with pytest.raises(UserError, match=match.format("Llama")):
            export_llama(GPTModel(GPTConfig(**llama)), tmp_path / "llama")
        with pytest.raises(UserError, match=match.format("Phi-3")):
            export_phi3(GPTModel(GPTConfig(**llama, rotary_dim=8)), tmp_path / "phi3")
        with pytest.raises(UserError, match=match.format("Gemma")):
            export_gemma(GPTModel(GPTConfig(**{**llama, "mlp": "geglu"}, scale_embeddings=True)), tmp_path / "gemma")
        with pytest.raises(UserError, match=match.format("OLMo 2")):
            export_olmo(GPTModel(GPTConfig(**llama, qk_norm=True, qk_norm_width="all")), tmp_path / "olmo")
        if fields is shared:  # StableLM 2 12B's parallel block on one norm: StableLM's own
            export_stablelm(GPTModel(GPTConfig(**{**llama, "norm": "layernorm"})), tmp_path / "stablelm")
            continue
        with pytest.raises(UserError, match=match.format("StableLM")):
            export_stablelm(GPTModel(GPTConfig(**{**llama, "norm": "layernorm"})), tmp_path / "stablelm")
    for change, match in (({"shared_norm": False}, "norm of its own, where Phi's parallel blocks have one"),
                          ({"shared_norm": False, "parallel_residual": False}, "runs attention then MLP"),
                          ({"attention_window": 5}, "local attention"),
                          ({"logit_softcap": 30.0}, "soft-caps its logits"),
                          ({"scale_attention": False}, "does not scale its attention scores"),
                          ({"qk_norm": True, "qk_norm_width": "all"}, "over all heads at once")):
        with pytest.raises(UserError, match=match):
            export_phi(_phi_like(**change), tmp_path / "no")


def test_a_model_without_biases_exports_as_phi_with_zero_ones(tmp_path):
    """Phi's linear layers all have biases: a shared-norm model without (bias False, or no head bias) is written
    with zeros, the same function."""
    from tritongpt.train.phi_weights import export_phi

    torch.manual_seed(5)
    model = _jittered(_phi_like(bias=False, head_bias=False, n_kv_head=2).double()).eval()
    export_phi(model, tmp_path / "phi")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "phi", dtype=torch.float64).eval()
    assert torch.count_nonzero(hf.lm_head.bias) == 0
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(model(idx), hf(idx).logits, 2e-6, "no biases, written as zeros")


def test_a_resume_that_would_change_phi_fields_is_refused_by_name():
    from types import SimpleNamespace

    from tritongpt.train.loop import Trainer

    phi = _phi_like().config
    saved = phi.to_dict()
    Trainer._check_same_function(SimpleNamespace(_cfg=phi, name="pretrain"), "ckpt", saved)
    for change, refused in (({"shared_norm": False}, "reads one norm in both sublayers and has a bias on its LM head, "
                                                     "this run's model has a norm for each sublayer and has a bias on "
                                                     "its LM head: pass --shared-norm --head-bias"),
                            ({"head_bias": False}, "this run's model reads one norm in both sublayers and no LM-head "
                                                   "bias: pass --shared-norm --head-bias")):
        cfg = GPTConfig(**{**saved, **change})
        with pytest.raises(UserError, match=refused):
            Trainer._check_same_function(SimpleNamespace(_cfg=cfg, name="pretrain"), "ckpt", saved)


def test_pretrain_from_a_phi_folder_exports_back_as_phi(corpus, tmp_path, capsys):
    """--init a Phi folder, train a step, export: a Phi folder that transformers runs with our logits; the header
    and `info` name the fields; a flag that would change them is refused."""
    from tritongpt.cli import main

    hf_phi(tmp_path / "phi", 0.5, 2, vocab=300, context=64, layer_norm_eps=1e-5)
    assert main(pretrain_argv(corpus, tmp_path / "run", "--init", str(tmp_path / "phi"), "--max-steps", "1")) == 0
    model = load_checkpoint(tmp_path / "run").eval()
    c = model.config
    assert (c.shared_norm, c.head_bias, c.parallel_residual, c.rotary_dim, c.kv_heads) == (True, True, True, 8, 2)
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out  # pretrain's header, then export's line
    assert "attention and MLP in parallel on one norm" in out and "LM-head bias" in out
    assert "Phi with 2 layers" in out
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "phi"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        assert_close_rel(hf(idx).logits, model(idx), 1e-5, "transformers on the export")
    assert main(["info", "--weights", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "shared_norm     True" in out and "head_bias       True" in out
    assert main(pretrain_argv(corpus, tmp_path / "run2", "--init", str(tmp_path / "phi"), "--no-head-bias",
                              "--max-steps", "1")) == 2
    assert "--head-bias False would change what --init's model computes" in capsys.readouterr().err


def test_pretrain_and_bench_train_flags_build_the_fields(corpus, tmp_path, capsys):
    """pretrain --parallel-residual --shared-norm --head-bias builds the fields (--shared-norm alone is refused by
    name; the header is test_pretrain_from_a_phi_folder_exports_back_as_phi's); bench train's row and models line
    say them (the reference row only: both paths' gradients are
    test_phi_fields_train_on_both_paths_with_the_same_gradients', and a Triton step of `tiny` takes 10 s here)."""
    from tritongpt.bench import cli as bcli
    from tritongpt.bench import report, train_step
    from tritongpt.cli import build_parser, main

    from tritongpt.train.loop import TrainArgs
    from tritongpt.train.pretrain import check_args, parse_args

    assert main(pretrain_argv(corpus, tmp_path / "alone", "--shared-norm", "--max-steps", "1")) == 2
    assert "GPTConfig.shared_norm" in capsys.readouterr().err
    a = parse_args(["--tokenizer", str(corpus.tok), "--position-encoding", "rope", "--parallel-residual",
                    "--shared-norm", "--head-bias"])
    c = check_args(a, TrainArgs.from_namespace(a))[0].config  # the model pretrain would train
    assert (c.parallel_residual, c.shared_norm, c.head_bias) == (True, True, True)
    flags = dict(position_encoding="rope", parallel_residual=True, shared_norm=True, head_bias=True)
    row = train_step.bench_train_provider("reference", "tiny", 2, 16, torch.device("cpu"), torch.float32, 0, 1,
                                          peak_flops=1e12, vocab_size=64, **flags)
    assert row["status"] == "ok" and row["config"]["shared_norm"] is True and row["config"]["head_bias"] is True
    assert report.models_line([row]).endswith("parallel attention and MLP on one norm, LM-head bias")
    cfg = train_step.train_config("tiny", 16, **flags)
    assert (cfg.shared_norm, cfg.head_bias) == (True, True)
    args = build_parser().parse_args(["bench", "train", "--parallel-residual", "--shared-norm", "--head-bias"])
    flags = bcli.model_flags(args)
    assert (flags["shared_norm"], flags["head_bias"]) == (True, True)
