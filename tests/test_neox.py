"""GPT-NeoX and Pythia: RoPE over LayerNorms, parallel blocks (GPTConfig.parallel_residual), the exact GELU
(gelu_approximate "none") and q/k/v interleaved per head in one projection (train/neox_weights.py).
Tiny random GPTNeoXForCausalLMs saved to tmp_path (float64, every tensor jittered so each one counts,
rotary_pct 1.0): logits on both kernel paths, the KV-cache decode, greedy tokens, export round trips
through transformers, gradients on both paths, a pretrain --init step; what this model does not compute
refused by name. Nothing downloaded."""
import json

import pytest
import torch

from parity import assert_close_rel, decodes_like, logits_match_transformers, pretrain_argv
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.gpt2_weights import load_checkpoint

transformers = pytest.importorskip("transformers")

VOCAB, CTX, T = 53, 40, 23


def hf_neox(folder, parallel=True, act="gelu", layers=3, vocab=VOCAB, context=CTX, tie=False, **config):
    """A tiny random GPTNeoXForCausalLM in float64 (4 heads of 16 over 64, RoPE base 500 on whole heads),
    saved to folder, EOS 1 and BOS 2. -> (the model, its model.safetensors)."""
    torch.manual_seed(0)
    cfg = transformers.GPTNeoXConfig(
        vocab_size=vocab, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
        max_position_embeddings=context, use_parallel_residual=parallel, hidden_act=act, tie_word_embeddings=tie,
        bos_token_id=2, eos_token_id=1, **{"rotary_pct": 1.0, "rotary_emb_base": 500.0, "layer_norm_eps": 1e-6,
                                           "intermediate_size": 256, **config})
    hf = transformers.GPTNeoXForCausalLM(cfg).double().eval()
    with torch.no_grad():  # unit norm weights and zero biases would hide a mistake
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(folder)
    return hf, folder / "model.safetensors"


@pytest.mark.parametrize("parallel,act,pct", [(True, "gelu", 0.25), (False, "gelu", 1.0), (True, "gelu_new", 0.5)],
                         ids=["pythia", "sequential-erf", "parallel-tanh"])
def test_loads_its_fields_and_matches_transformers_on_both_paths(tmp_path, parallel, act, pct):
    """Pythia's shape (parallel blocks, exact GELU, 4 of each head's 16 dimensions rotated: rotary_pct 0.25),
    a sequential block over whole heads, and the tanh GELU over half heads."""
    hf, path = hf_neox(tmp_path, parallel, act, rotary_pct=pct)
    model = load_checkpoint(path).double().eval()
    c = model.config
    assert (c.parallel_residual, c.gelu_approximate) == (parallel, "none" if act == "gelu" else "tanh")
    assert c.rotary_dim == (0 if pct == 1.0 else int(16 * pct))
    assert (c.position_encoding, c.rope_theta, c.norm, c.mlp, c.bias, c.has_qkv_bias, c.norm_eps) == \
        ("rope", 500.0, "layernorm", "gelu", True, True, 1e-6)
    assert (c.n_layer, c.n_head, c.head_dim, c.tie_weights, c.context_length) == (3, 4, 16, False, CTX)
    assert model.trf_blocks[0].ff.act.approximate == c.gelu_approximate
    logits_match_transformers(hf, model, VOCAB, T)


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "sequential"])
def test_decodes_over_the_cache_and_generates_transformers_tokens(tmp_path, parallel):
    hf, path = hf_neox(tmp_path, parallel, rotary_pct=0.25)
    model = load_checkpoint(path).double().eval()
    idx = torch.randint(0, VOCAB, (1, 15))
    with torch.no_grad():
        decodes_like(model, idx, hf(idx).logits)
    from tritongpt.train.generate import generate

    ours = generate(model, idx[:, :3], 12)
    theirs = hf.generate(idx[:, :3], max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("parallel,act,tie", [(True, "gelu", False), (False, "gelu_pytorch_tanh", False),
                                              (True, "gelu", True)], ids=["pythia", "sequential-tanh", "tied"])
def test_export_round_trips_through_transformers(tmp_path, parallel, act, tie):
    """Loaded, exported, read by transformers' AutoModelForCausalLM: the same logits, model_type gpt_neox, and
    load_checkpoint reads the export back to the same config."""
    from tritongpt.train.neox_weights import export_neox

    pct = 0.25 if parallel and not tie else 1.0
    hf, path = hf_neox(tmp_path / "in", parallel, act, tie=tie, rotary_pct=pct)
    model = load_checkpoint(path).double().eval()
    assert model.config.tie_weights == tie
    export_neox(model, tmp_path / "out", eos_token_id=1)
    d = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (d["model_type"], d["use_parallel_residual"], d["rotary_pct"], d["tie_word_embeddings"]) == \
        ("gpt_neox", parallel, pct, tie)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    assert type(back).__name__ == "GPTNeoXForCausalLM"
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(back(idx).logits, hf(idx).logits, 2e-6, "exported, read by transformers")
        assert_close_rel(back(idx).logits, model(idx), 2e-6, "exported, against ours")
    again = load_checkpoint(tmp_path / "out" / "model.safetensors")
    assert again.config == GPTConfig(**{**model.config.to_dict(), "kernels": again.config.kernels})
    # transformers 4.x reads the flat keys (rotary_emb_base, rotary_pct) alone: without rope_parameters, the
    # same config
    (tmp_path / "out" / "config.json").write_text(json.dumps({k: v for k, v in d.items() if k != "rope_parameters"}))
    assert load_checkpoint(tmp_path / "out" / "model.safetensors").config == again.config
    with pytest.raises(UserError, match="already holds a model"):
        export_neox(model, tmp_path / "out")


def test_sharded_and_hub_style_configs_load(tmp_path):
    """The Hub's Pythia config.json says rotary_pct and rotary_emb_base (transformers 4.x), no rope_parameters,
    and its large models come in shards: both read, with transformers' logits; what it leaves out is read as
    GPTNeoXConfig's defaults (eps 1e-5, 2048 positions, parallel blocks, exact GELU)."""
    hf, _ = hf_neox(tmp_path / "a", context=2048, layer_norm_eps=1e-5)
    hf.save_pretrained(tmp_path / "b", max_shard_size="40KB")
    index = tmp_path / "b" / "model.safetensors.index.json"
    assert index.is_file() and len(set(json.loads(index.read_text())["weight_map"].values())) > 1
    cfg_json = tmp_path / "b" / "config.json"
    d = json.loads(cfg_json.read_text())
    for key in ("rope_parameters", "layer_norm_eps", "max_position_embeddings", "use_parallel_residual",
                "hidden_act", "attention_bias"):
        d.pop(key, None)
    cfg_json.write_text(json.dumps({**d, "rotary_pct": 1.0, "rotary_emb_base": 500}))
    model = load_checkpoint(tmp_path / "b").double().eval()
    c = model.config
    assert (c.rope_theta, c.norm_eps, c.context_length, c.parallel_residual, c.gelu_approximate) == \
        (500.0, 1e-5, 2048, True, "none")
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(model(idx), hf(idx).logits, 2e-6, "shards, a 4.x config.json")


@pytest.mark.parametrize("change,match", [
    ({"rotary_pct": 0.35}, r"partial rotary factor 0.35: 5 of head_dim 16 rotated"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 1.5}},
     r"partial rotary factor 1.5; it must be a number in \(0, 1\]"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}},
     "rope_parameters of type 'linear'"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling of type 'dynamic'"),
    # GPTNeoXConfig (4.x and 5) reads rotary_emb_base and rotary_pct, never a flat rope_theta or factor: they were
    # read here when rope_parameters (or rotary_*) did not say, and a rotary_emb_base that disagrees with
    # rope_parameters (4.x reads the one, 5 the other) was passed over
    ({"rope_theta": 777.0}, r"has rope_theta 777.0, but GPT-NeoX's RoPE reads the rope_theta in rope_parameters, 500.0 "
                            r"\(GPT-NeoX's config does not read rope_theta\)"),
    ({"rope_parameters": None, "partial_rotary_factor": 1.0},
     r"has partial_rotary_factor 1.0, but GPT-NeoX's RoPE reads its default, 0.25"),
    ({"rotary_emb_base": 777.0}, r"has rotary_emb_base 777.0, but GPT-NeoX's RoPE reads the rope_theta in "
                                 r"rope_parameters, 500.0 \(transformers 4.x reads rotary_emb_base, 5 the rope_theta "
                                 r"in rope_parameters\)"),
    ({"hidden_act": "relu"}, "hidden_act 'relu'; this model's GELU MLP computes"),
    ({"attention_bias": False}, "attention_bias false"),
    ({"intermediate_size": 100}, "intermediate_size 100, but the weights have 256"),
    ({"num_attention_heads": 5}, "num_attention_heads 5, which does not divide the weights. width 64"),
    ({"num_key_value_heads": 2}, "num_key_value_heads 2; GPT-NeoX's heads each have their own"),
    # a field passed on as config.json gives it, which GPTConfig refuses: named with the file and its key
    ({"layer_norm_eps": 0},
     r"config\.json: layer_norm_eps \(GPTConfig\.norm_eps\) must be a number in \(0, 1\), got 0"),
    # bool("false") is True: a flag spelled as a string is refused by name
    ({"use_parallel_residual": "false"}, "config.json has use_parallel_residual 'false'; it must be true or false"),
    ({"attention_bias": "false"}, "config.json has attention_bias 'false'; it must be true or false"),
    # null: GPTNeoXConfig (transformers 5) refuses it; read as false, a null use_parallel_residual loaded the
    # sequential block (the default is parallel)
    ({"use_parallel_residual": None}, "config.json has use_parallel_residual null; it must be true or false "
                                      r"\(transformers refuses null here, and its default is true\)"),
    ({"attention_bias": None}, "config.json has attention_bias null; it must be true or false"),
], ids=["rotary-pct", "partial-factor", "linear-rope", "dynamic-rope", "flat-theta", "flat-factor", "emb-base",
        "activation", "attention-bias",
        "mlp-width", "heads", "kv-heads", "eps-zero", "parallel-type", "attention-bias-type", "parallel-null",
        "attention-bias-null"])
def test_what_this_model_does_not_compute_is_refused_by_name(hf_copy, tmp_path, change, match):
    path = hf_copy(hf_neox, tmp_path)
    cfg_json = tmp_path / "config.json"
    d = {k: v for k, v in json.loads(cfg_json.read_text()).items() if k not in change and
         not (k == "rope_parameters" and "rotary_pct" in change)}
    cfg_json.write_text(json.dumps({**d, **change}))
    with pytest.raises(UserError, match=match):
        load_checkpoint(path)


def test_an_untied_config_json_beside_weights_without_a_head_is_refused(hf_copy, tmp_path):
    """tie_word_embeddings false and no embed_out: transformers starts a random head; it loaded tied here."""
    path = hf_copy(hf_neox, tmp_path, tie=True)
    cfg_json = tmp_path / "config.json"
    cfg_json.write_text(json.dumps({**json.loads(cfg_json.read_text()), "tie_word_embeddings": False}))
    with pytest.raises(UserError, match="config.json says tie_word_embeddings false, but the weights beside it have "
                                        "no embed_out.weight"):
        load_checkpoint(path)


def test_a_rope_scaling_object_stands_in_for_rope_parameters_as_in_transformers(hf_copy, tmp_path):
    """transformers 5 reads `rope_scaling or rope_parameters`: an unscaled rope_scaling object beside
    rope_parameters (base 500, whole heads) puts the defaults (base 10000, a quarter of each head) in their place.
    They were read from rope_parameters here: another model."""
    path = hf_copy(hf_neox, tmp_path)
    cfg_json = tmp_path / "config.json"
    cfg_json.write_text(json.dumps({**json.loads(cfg_json.read_text()), "rope_scaling": {"rope_type": "default"}}))
    theirs = transformers.AutoConfig.from_pretrained(tmp_path).rope_parameters
    c = load_checkpoint(path).config
    assert (c.rope_theta, c.rotary_dim) == (theirs["rope_theta"], int(16 * theirs["partial_rotary_factor"])) == \
        (10000.0, 4)


def test_a_config_without_rotary_pct_is_read_as_transformers_reads_it(tmp_path):
    """GPTNeoXConfig's rotary_pct default is 0.25: a config.json that says none rotates a quarter of each head,
    in transformers and here alike."""
    _, path = hf_neox(tmp_path)
    cfg_json = tmp_path / "config.json"
    d = json.loads(cfg_json.read_text())
    d.pop("rope_parameters")
    d.pop("rotary_pct", None)
    cfg_json.write_text(json.dumps(d))
    model = load_checkpoint(path).double().eval()
    assert model.config.rotary_dim == 4
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(model(idx), hf(idx).logits, 2e-6, "no rotary_pct: a quarter of each head rotated")


def test_a_head_saved_as_lm_head_reads_as_embed_out(tmp_path):
    """transformers 5 names GPT-NeoX's head lm_head (the Hub's files embed_out, which it renames on reading): a
    file that says lm_head.weight is read as the untied head it is, with transformers' logits."""
    from safetensors.torch import load_file, save_file

    hf, path = hf_neox(tmp_path)
    sd = load_file(path)
    sd["lm_head.weight"] = sd.pop("embed_out.weight")
    save_file(sd, path, metadata={"format": "pt"})
    model = load_checkpoint(path).double().eval()
    assert not model.config.tie_weights
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(model(idx), hf(idx).logits, 2e-6, "a head named lm_head")


def test_an_mlp_of_another_width_is_refused(tmp_path):
    _, path = hf_neox(tmp_path / "w", intermediate_size=96)
    with pytest.raises(UserError, match=r"intermediate_size 96; this model's GELU MLP is 4 hidden_size wide \(256\)"):
        load_checkpoint(path)


def _neox_like(**kw):
    cfg = dict(vocab_size=VOCAB, context_length=CTX, n_embd=64, n_layer=3, n_head=4, position_encoding="rope",
               rope_theta=300.0, parallel_residual=True, gelu_approximate="none", tie_weights=False)
    cfg.update(kw)
    return GPTModel(GPTConfig(**cfg))


def test_the_fields_are_checked_by_name():
    for bad, match in (({"parallel_residual": "yes"}, "parallel_residual must be True or False"),
                       ({"parallel_residual": True, "post_norms": True}, "parallel_residual .* set post_norms False"),
                       ({"gelu_approximate": "erf"}, "gelu_approximate must be one of tanh, none, got 'erf'"),
                       ({"gelu_approximate": "none", "mlp": "swiglu"}, "gelu_approximate 'none' picks the GELU "
                                                                      "MLP's GELU; this model's mlp is 'swiglu'"),
                       ({"gelu_approximate": "none", "mlp": "geglu"}, "this model's mlp is 'geglu'")):
        with pytest.raises(UserError, match=match):
            GPTConfig(**bad)
    c = GPTConfig(parallel_residual=True, gelu_approximate="none")
    assert GPTConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_a_parallel_block_is_the_parallel_formula():
    """The block, on its own, is x + attn(ln1(x)) + mlp(ln2(x)) (not x + attn + mlp(ln2(x + attn))), with the
    sum handed on for the next norm's add."""
    torch.manual_seed(3)
    model = _neox_like().double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    block = model.trf_blocks[0]
    x = torch.randn(2, 7, 64, dtype=torch.float64)
    with torch.no_grad():
        out, delta = block(x)
        want = x + block.att(block.norm1(x)) + block.ff(block.norm2(x))
    assert torch.equal(out, x)
    assert_close_rel(out + delta, want, 1e-12, "parallel block")


@pytest.mark.parametrize("kernels", ["reference", "triton"])
@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "sequential"])
def test_neox_fields_train_on_both_paths_with_the_same_gradients(kernels, parallel):
    """One backward through parallel (or sequential) blocks with the exact GELU: the loss and every parameter's
    gradient on either path are the float64 reference's (fp32, within 1e-4 relative)."""
    torch.manual_seed(2)
    ref = _neox_like(parallel_residual=parallel).float()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    idx = torch.randint(0, VOCAB, (2, 19))
    targets = torch.randint(0, VOCAB, (2, 19))
    model = _neox_like(parallel_residual=parallel).float()
    model.load_state_dict(ref.state_dict())
    model.set_kernels(kernels)
    loss = model(idx, targets=targets)
    loss.backward()
    ref64 = _neox_like(parallel_residual=parallel).double()
    ref64.load_state_dict(ref.state_dict())
    want = ref64(idx, targets=targets)
    want.backward()
    assert_close_rel(loss.double().reshape(1), want.reshape(1), 1e-5, "loss")
    grads = dict(ref64.named_parameters())
    for name, p in model.named_parameters():
        assert_close_rel(p.grad.double(), grads[name].grad, 1e-4, name)


def test_a_model_built_here_exports_as_neox_and_other_exports_refuse_its_fields(tmp_path):
    """A GPTModel made with NeoX's fields (not loaded) is written as a GPT-NeoX, whose logits transformers
    reproduces; the GPT-2, GPT-Neo, Llama, Gemma and OLMo exports name the fields they cannot say, and the
    NeoX one what NeoX does not compute."""
    from tritongpt.train.gemma_weights import export_gemma
    from tritongpt.train.gpt2_weights import export_gpt2
    from tritongpt.train.gpt_neo_weights import export_gpt_neo
    from tritongpt.train.llama_weights import export_llama
    from tritongpt.train.neox_weights import export_neox
    from tritongpt.train.olmo_weights import export_olmo

    torch.manual_seed(1)
    model = _neox_like().double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    export_neox(model, tmp_path / "nx")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "nx", dtype=torch.float64).eval()
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(model(idx), hf(idx).logits, 2e-6, "built here, read by transformers")
    gpt2 = dict(vocab_size=VOCAB, context_length=CTX, n_embd=64, n_layer=2, n_head=4)
    for fields, match in (({"parallel_residual": True}, r"side by side .*parallel_residual.*GPT-2 does not"),
                          ({"gelu_approximate": "none"}, r"exact GELU \(gelu_approximate 'none'\).*GPT-2 does not")):
        with pytest.raises(UserError, match=match):
            export_gpt2(GPTModel(GPTConfig(**gpt2, **fields)), tmp_path / "gpt2")
        with pytest.raises(UserError, match=match.replace("GPT-2", "GPT-Neo")):
            export_gpt_neo(GPTModel(GPTConfig(**gpt2, **fields, scale_attention=False, qkv_bias=False)),
                           tmp_path / "neo")
    llama = dict(gpt2, position_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    with pytest.raises(UserError, match=r"parallel_residual.*Llama does not"):
        export_llama(GPTModel(GPTConfig(**llama, parallel_residual=True)), tmp_path / "llama")
    with pytest.raises(UserError, match=r"parallel_residual.*Gemma does not"):
        export_gemma(GPTModel(GPTConfig(**{**llama, "mlp": "geglu"}, scale_embeddings=True, parallel_residual=True)),
                     tmp_path / "gemma")
    with pytest.raises(UserError, match=r"parallel_residual.*OLMo 2 does not"):
        export_olmo(GPTModel(GPTConfig(**llama, parallel_residual=True, qk_norm=True, qk_norm_width="all")),
                    tmp_path / "olmo")
    for change, match in (({"norm": "rmsnorm"}, "normalizes with rmsnorm, where GPT-NeoX has LayerNorms"),
                          ({"position_encoding": "learned"}, "learns position embeddings"),
                          ({"n_kv_head": 2}, "grouped-query attention"),
                          ({"qkv_bias": False}, "no biases on q, k and v"),
                          ({"attention_window": 5}, "local attention"),
                          ({"logit_softcap": 30.0}, "soft-caps its logits")):
        with pytest.raises(UserError, match=match):
            export_neox(_neox_like(**change), tmp_path / "no")


def test_a_resume_that_would_change_neox_fields_is_refused_by_name():
    from types import SimpleNamespace

    from tritongpt.train.loop import Trainer

    neox = _neox_like().config
    saved = neox.to_dict()
    Trainer._check_same_function(SimpleNamespace(_cfg=neox, name="pretrain"), "ckpt", saved)
    for change, refused in (({"parallel_residual": False}, "runs attention and MLP in parallel and computes the exact "
                                                           ".erf. GELU, this run's model runs attention then MLP"),
                            ({"gelu_approximate": "tanh"}, "this run's model runs attention and MLP in parallel and "
                                                           "computes the tanh GELU: pass --parallel-residual "
                                                           "--gelu-approximate none")):
        cfg = GPTConfig(**{**saved, **change})
        with pytest.raises(UserError, match=refused):
            Trainer._check_same_function(SimpleNamespace(_cfg=cfg, name="pretrain"), "ckpt", saved)


def test_pretrain_from_a_neox_folder_exports_back_and_resumes_only_as_itself(corpus, tmp_path, capsys):
    """--init a GPT-NeoX folder, train a step, export: a GPT-NeoX folder that transformers runs with our
    logits; `info` names the fields; a resume whose flags would build sequential blocks is refused by name."""
    from tritongpt.cli import main

    hf_neox(tmp_path / "nx", layers=2, vocab=300, context=64, layer_norm_eps=1e-5, rotary_pct=0.25)
    assert main(pretrain_argv(corpus, tmp_path / "run", "--init", str(tmp_path / "nx"), "--max-steps", "1")) == 0
    model = load_checkpoint(tmp_path / "run").eval()
    c = model.config
    assert (c.parallel_residual, c.gelu_approximate, c.position_encoding, c.rotary_dim) == (True, "none", "rope", 4)
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out  # pretrain's header, then export's line
    assert "attention and MLP in parallel" in out and "exact (erf) GELU" in out
    assert "RoPE on 4 of each head's 16 dimensions" in out
    assert "GPT-NeoX with 2 layers" in out
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "gpt_neox"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        assert_close_rel(hf(idx).logits, model(idx), 1e-5, "transformers on the export")
    assert main(["info", "--weights", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "parallel_residual True" in out and "gelu_approximate none" in out
    flags = ("--position-encoding", "rope", "--rope-theta", "500", "--no-parallel-residual", "--gelu-approximate",
             "none")
    assert main(pretrain_argv(corpus, tmp_path / "run", *flags, "--max-steps", "2", "--resume")) == 2
    assert "(RoPE, theta 500, 4 dimensions of each head), this run's model rotates q and k (RoPE, theta 500): " \
        "pass --position-encoding rope --rope-theta 500 --rotary-dim 4" in capsys.readouterr().err
    flags += ("--rotary-dim", "4")
    assert main(pretrain_argv(corpus, tmp_path / "run", *flags, "--max-steps", "2", "--resume")) == 2
    assert "runs attention and MLP in parallel and computes the exact (erf) GELU, this run's model runs attention " \
        "then MLP" in capsys.readouterr().err
    assert main(pretrain_argv(corpus, tmp_path / "run2", "--init", str(tmp_path / "nx"), "--gelu-approximate",
                              "tanh", "--max-steps", "1")) == 2
    assert "--gelu-approximate tanh would change what --init's model computes" in capsys.readouterr().err
    assert main(pretrain_argv(corpus, tmp_path / "run2", "--init", str(tmp_path / "nx"), "--rotary-dim", "8",
                              "--max-steps", "1")) == 2
    assert "--rotary-dim 8 would change what --init's model computes (its rotary_dim is 4)" in capsys.readouterr().err
