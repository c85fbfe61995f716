"""IBM Granite (GraniteForCausalLM) and GraniteMoe (GraniteMoeForCausalLM): a Llama with muP's multipliers, each a
GPTConfig field (embedding_multiplier, residual_multiplier, attention_multiplier; logits_scaling as logit_scale, its
inverse), GraniteMoe's fused experts (train/granite_weights.py). Tiny random transformers models saved to tmp_path
(float64, every tensor jittered so each one counts; 3 heads of 16 over 48 on 1 KV head, an MLP of 40, multipliers
that are no power of two): logits on both kernel paths, the KV-cache decode and greedy tokens, export round trips
through transformers (logits_scaling written back as it was), every multiplier's forward and backward on the
Triton path against a float64 reference, what this model does not compute refused by name, pretrain's flags.
Nothing downloaded."""
import json
import math

import pytest
import torch

from parity import assert_close_rel, decode_token_by_token, decodes_like, logits_match_transformers, pretrain_argv
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.gpt2_weights import load_checkpoint

transformers = pytest.importorskip("transformers")

VOCAB, CTX, T = 53, 40, 19
MULTIPLIERS = dict(embedding_multiplier=3.5, residual_multiplier=0.4, attention_multiplier=0.09, logits_scaling=3.0)


def hf_granite(folder, kind="granite", tie=False, vocab=VOCAB, **config):
    """A tiny random GraniteForCausalLM (kind "granitemoe": GraniteMoeForCausalLM, 5 experts, top 2) in float64,
    saved to folder (max_shard_size: sharded), EOS and BOS 1. -> (the model, its weights file)."""
    torch.manual_seed(0)
    shard = config.pop("max_shard_size", None)
    if kind == "granitemoe":
        config = dict(dict(num_local_experts=5, num_experts_per_tok=2, experts_implementation="eager"), **config)
    cls = transformers.GraniteConfig if kind == "granite" else transformers.GraniteMoeConfig
    cfg = cls(vocab_size=vocab, hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=3,
              num_key_value_heads=1, max_position_embeddings=CTX, rms_norm_eps=1e-6, tie_word_embeddings=tie,
              bos_token_id=1, eos_token_id=1, pad_token_id=0,
              rope_parameters={"rope_type": "default", "rope_theta": 500.0}, **{**MULTIPLIERS, **config})
    hf = transformers.AutoModelForCausalLM.from_config(cfg).double().eval()
    with torch.no_grad():  # unit norm weights would hide a mistake
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    index = folder / "model.safetensors.index.json"
    return hf, index if index.exists() else folder / "model.safetensors"


@pytest.mark.parametrize("kind,tie", [("granite", False), ("granitemoe", True)])
def test_loads_and_matches_transformers_on_both_paths(tmp_path, kind, tie):
    hf, path = hf_granite(tmp_path, kind, tie=tie, max_shard_size="40KB")
    assert path.name == "model.safetensors.index.json"  # sharded: read through the shared helpers
    model = load_checkpoint(path).double().eval()
    c = model.config
    assert (c.norm, c.mlp, c.position_encoding, c.bias, c.kv_heads, c.tie_weights, c.rope_theta) == \
        ("rmsnorm", "swiglu", "rope", False, 1, tie, 500.0)
    assert (c.embedding_multiplier, c.residual_multiplier, c.attention_multiplier, c.logit_scale) == \
        (3.5, 0.4, 0.09, 1 / 3.0)
    assert (c.n_experts, c.experts_per_token) == ((5, 2) if kind == "granitemoe" else (0, 2))
    logits_match_transformers(hf, model, VOCAB, T)


@pytest.mark.parametrize("kind", ["granite", "granitemoe"])
def test_decodes_over_the_cache_and_generates_transformers_tokens(tmp_path, kind):
    from tritongpt.train.generate import generate

    hf, path = hf_granite(tmp_path, kind)
    model = load_checkpoint(path).double().eval()
    idx = torch.randint(0, VOCAB, (1, 11))
    with torch.no_grad():
        want = hf(idx).logits
    if kind == "granite":  # both paths (the Triton one's softmax scale with Tq < Tk)
        decodes_like(model, idx, want)
    else:  # the experts' Triton path costs the interpreter ~20 s here; its multipliers are the dense one's
        _, decoded, _ = decode_token_by_token(model, idx, whole=False)
        assert_close_rel(decoded, want, 2e-6, "decoded over the cache")
    ours = generate(model, idx[:, :3], 10)
    theirs = hf.generate(idx[:, :3], max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("kind", ["granite", "granitemoe"])
def test_export_round_trips_through_transformers(tmp_path, kind):
    """Loaded, exported, read by transformers' AutoModelForCausalLM: the same logits, the multipliers written back
    exactly as the folder had them (logits_scaling 49.0, not 1 / (1 / 49.0) = 49.00000000000001), GraniteMoe's
    experts fused as the Hub's input_linear; load_checkpoint reads the export back to the same config."""
    from safetensors import safe_open

    from tritongpt.commands import export_target
    from tritongpt.train.granite_weights import export_granite

    hf, path = hf_granite(tmp_path / "in", kind, logits_scaling=49.0)
    model = load_checkpoint(path).double().eval()
    assert export_target(model.config)[0] == {"granite": "Granite", "granitemoe": "GraniteMoe"}[kind]
    export_granite(model, tmp_path / "out", eos_token_id=1)
    d = json.loads((tmp_path / "out" / "config.json").read_text())
    assert d["model_type"] == kind
    assert {k: d[k] for k in MULTIPLIERS} == {**MULTIPLIERS, "logits_scaling": 49.0}
    if kind == "granitemoe":
        with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
            assert f.get_slice("model.layers.1.block_sparse_moe.input_linear.weight").get_shape() == [5, 80, 48]
        assert (d["num_local_experts"], d["num_experts_per_tok"]) == (5, 2)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64,
                                                             experts_implementation="eager").eval()
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(back(idx).logits, hf(idx).logits, 2e-6, "exported, read by transformers")
    again = load_checkpoint(tmp_path / "out" / "model.safetensors")
    assert again.config == GPTConfig(**{**model.config.to_dict(), "kernels": again.config.kernels})


def test_logits_scaling_is_written_back_as_it_was():
    """logit_scale is 1 / logits_scaling; 1 / (1 / x) is not x for every float (1 / (1 / 49.0) is
    49.00000000000001), so the export writes the shortest decimal whose inverse is the scale: the config.json's own
    number for these, and for any float one whose inverse is the scale exactly."""
    from tritongpt.train.granite_weights import logits_scaling_of

    assert 1 / (1 / 49.0) != 49.0  # what a plain inverse would write
    for x in (8.0, 3.0, 12.5, 0.7, 49.0, 1.0, 16.0, 0.22, 6.25e-2, 1e-3, 123456.789):
        assert logits_scaling_of(1 / x) == x, x
    torch.manual_seed(0)
    for x in torch.rand(200, dtype=torch.float64).mul(20).add(1e-3).tolist():
        assert 1 / logits_scaling_of(1 / x) == 1 / x, x


def _muP(**kw):
    cfg = dict(vocab_size=VOCAB, context_length=CTX, n_embd=48, n_layer=2, n_head=3, n_kv_head=1,
               position_encoding="rope", norm="rmsnorm", mlp="swiglu", mlp_hidden=40, bias=False, rope_theta=500.0,
               embedding_multiplier=3.5, residual_multiplier=0.4, attention_multiplier=0.09, logit_scale=0.25)
    cfg.update(kw)
    return GPTConfig(**cfg)


@pytest.mark.parametrize("change", [{}, {"n_experts": 3}, {"parallel_residual": True},
                                    {"post_norms": True, "norm": "layernorm", "mlp": "gelu", "mlp_hidden": 0}],
                         ids=["dense", "moe", "parallel", "post-norms"])
def test_multipliers_forward_and_backward_on_the_triton_path(change):
    """Every multiplier on the Triton path (flash attention's softmax scale, the fused add-and-norm after the scaled
    sublayer outputs, the fused LM head + loss on the scaled hidden state): the loss and every parameter's gradient
    are a float64 reference's, in fp32."""
    torch.manual_seed(3)
    ref = GPTModel(_muP(**change)).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    idx, targets = torch.randint(0, VOCAB, (2, 13)), torch.randint(0, VOCAB, (2, 13))
    want = ref(idx, targets=targets)
    want.backward()
    model = GPTModel(_muP(**change)).float()
    model.load_state_dict(ref.state_dict())
    model.set_kernels("triton")
    loss = model(idx, targets=targets)
    loss.backward()
    assert_close_rel(loss.double().reshape(1), want.reshape(1), 1e-5, "loss")
    grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert_close_rel(p.grad.double(), grads[name].grad, 1e-4, name)


def test_each_multiplier_is_what_it_says_by_hand():
    """The reference path against the arithmetic, one multiplier at a time on a one-layer model: embeddings times e
    is an unmultiplied twin's with its embedding table times e; scores scaled by a; a block's output x + r att + r
    mlp (also in a parallel block, and in a sandwich one after the outer norms); logits / logits_scaling."""
    torch.manual_seed(5)
    base = GPTModel(_muP(n_layer=1, embedding_multiplier=1.0, residual_multiplier=1.0, attention_multiplier=0.0,
                         logit_scale=1.0)).double().eval()
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    idx = torch.randint(0, VOCAB, (2, 11))

    def twin(**kw):
        m = GPTModel(_muP(n_layer=1, **{**dict(embedding_multiplier=1.0, residual_multiplier=1.0,
                                               attention_multiplier=0.0, logit_scale=1.0), **kw})).double().eval()
        m.load_state_dict(base.state_dict(), strict=False)
        return m

    with torch.no_grad():
        emb = twin(embedding_multiplier=3.5, tie_weights=False)
        plain = twin(tie_weights=False)
        plain.load_state_dict(emb.state_dict())
        plain.tok_emb.weight.mul_(3.5)
        assert_close_rel(emb(idx), plain(idx), 1e-12, "embedding multiplier")
        assert twin(attention_multiplier=0.09).trf_blocks[0].att.softmax_scale == 0.09
        assert twin().trf_blocks[0].att.softmax_scale == 1 / math.sqrt(16)
        assert_close_rel(twin(logit_scale=1 / 3.0)(idx), base(idx) / 3.0, 1e-12, "logits / logits_scaling")
        for kw in ({}, {"parallel_residual": True}, {"post_norms": True}):
            m = twin(residual_multiplier=0.4, **kw)
            blk = m.trf_blocks[0]
            x = torch.randn(2, 11, 48, dtype=torch.float64)
            pos = torch.arange(11)
            h = blk.norm1(x)
            att = blk.att(h, positions=pos)
            if kw.get("parallel_residual"):
                want_x, want_ff = x, 0.4 * (att + blk.ff(blk.norm2(x)))
            else:
                att = blk.post_att_norm(att) if blk.post_att_norm is not None else att
                want_x = x + 0.4 * att
                ff = blk.ff(blk.norm2(want_x))
                want_ff = 0.4 * (blk.post_ff_norm(ff) if blk.post_ff_norm is not None else ff)
            got_x, got_ff = blk(x, positions=pos)
            assert_close_rel(got_x, want_x, 1e-12, f"residual stream {kw}")
            assert_close_rel(got_ff, want_ff, 1e-12, f"scaled sublayer output {kw}")


def test_the_multipliers_are_checked_by_name():
    for field in ("embedding_multiplier", "residual_multiplier"):
        for bad in (0.0, -1.0, float("nan"), float("inf"), True, "2"):
            with pytest.raises(UserError, match=f"GPTConfig.{field} must be a finite number > 0"):
                GPTConfig(**{field: bad})
    for bad in (-0.5, float("nan"), float("inf"), True):
        with pytest.raises(UserError, match="GPTConfig.attention_multiplier must be a finite number > 0"):
            GPTConfig(attention_multiplier=bad)
    with pytest.raises(UserError, match="attention_multiplier 0.09 is the attention scores' scale, and "
                                        "attention_scale_width 144 sets it too"):
        GPTConfig(attention_multiplier=0.09, attention_scale_width=144)
    with pytest.raises(UserError, match="attention_multiplier 0.09 is the attention scores' scale, which "
                                        "scale_attention False leaves unscaled"):
        GPTConfig(attention_multiplier=0.09, scale_attention=False)
    c = GPTConfig(embedding_multiplier=12, residual_multiplier=1, attention_multiplier=1)  # ints: stored as floats
    assert (type(c.embedding_multiplier), type(c.attention_multiplier)) == (float, float)


@pytest.mark.parametrize("kind,change,match", [
    ("granite", {"model_type": "granitemoeshared"}, "model_type 'granitemoeshared': shared experts"),
    ("granite", {"model_type": "granitemoehybrid"}, "model_type 'granitemoehybrid': Mamba-2 layers"),
    ("granite", {"model_type": "granite_swa"}, "model_type 'granite_swa': a sliding window"),
    ("granite", {"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ("granite", {"attention_bias": True}, "attention_bias True and mlp_bias False"),
    ("granite", {"embedding_multiplier": 0}, "embedding_multiplier 0; it must be a finite number > 0"),
    ("granite", {"residual_multiplier": -0.2}, "residual_multiplier -0.2; it must be"),
    ("granite", {"attention_multiplier": "0.1"}, "attention_multiplier '0.1'; it must be"),
    ("granite", {"logits_scaling": 0.0}, "logits_scaling 0.0; it must be"),
    ("granite", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 500.0, "factor": 2.0}}, "type 'dynamic'"),
    ("granitemoe", {"attention_bias": True}, "attention_bias True; this model reads GraniteMoe without biases"),
    ("granitemoe", {"shared_intermediate_size": 32}, "shared_intermediate_size 32 .GraniteMoeShared's shared"),
    ("granitemoe", {"num_local_experts": 4}, "num_local_experts 4, but the router scores 5 experts"),
    ("granitemoe", {"num_experts_per_tok": 6}, "num_experts_per_tok 6; it must be an integer in \\[1, 5\\]"),
    # a field passed on as config.json gives it, which GPTConfig refuses: named with the file and its key
    ("granite", {"rms_norm_eps": "1e-6"},
     r"config\.json: rms_norm_eps \(GPTConfig\.norm_eps\) must be a number in \(0, 1\), got '1e-6'"),
    ("granitemoe", {"max_position_embeddings": None},
     r"config\.json: max_position_embeddings \(GPTConfig\.context_length\) must be a positive integer, got None"),
    # bool("false") is True: a flag spelled as a string is refused by name (this one trained with an aux loss)
    ("granitemoe", {"output_router_logits": "false", "router_aux_loss_coef": 0.01},
     "config.json has output_router_logits 'false'; it must be true or false"),
], ids=["shared", "hybrid", "swa", "activation", "bias", "embedding", "residual", "attention", "logits", "rope",
        "moe-bias", "moe-shared", "experts", "top-k", "eps-type", "context-null", "router-logits-type"])
def test_what_this_model_does_not_compute_is_refused_by_name(hf_copy, tmp_path, kind, change, match):
    path = hf_copy(hf_granite, tmp_path, kind)
    cfg_json = tmp_path / "config.json"
    cfg_json.write_text(json.dumps({**json.loads(cfg_json.read_text()), **change}))
    with pytest.raises(UserError, match=match):
        load_checkpoint(path)


def test_a_model_built_here_exports_as_granite_and_other_exports_refuse_its_fields(tmp_path):
    """A GPTModel made with the multipliers (not loaded) is written as a Granite (GraniteMoe with experts), whose
    logits transformers reproduces (attention_multiplier 0 written as the 1/sqrt(head_dim) it means); a Llama-shaped
    model with scaled logits only is a Granite too; the Llama, Mixtral and Cohere exports name the multipliers they
    cannot say, the Granite one what Granite does not compute."""
    from tritongpt.commands import export_target
    from tritongpt.train.cohere_weights import export_cohere
    from tritongpt.train.granite_weights import export_granite
    from tritongpt.train.llama_weights import export_llama
    from tritongpt.train.moe_weights import export_moe

    torch.manual_seed(1)
    for name, change in (("dense", {"attention_multiplier": 0.0}), ("moe", {"n_experts": 3}),
                         ("scaled logits", {"embedding_multiplier": 1.0, "residual_multiplier": 1.0,
                                            "attention_multiplier": 0.0})):
        model = GPTModel(_muP(**change)).double().eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        assert export_target(model.config)[0] == ("GraniteMoe" if "n_experts" in change else "Granite")
        export_granite(model, tmp_path / name)
        d = json.loads((tmp_path / name / "config.json").read_text())
        want = change.get("attention_multiplier", 0.09) or 1 / math.sqrt(16)  # 0: the default it means
        assert (d["logits_scaling"], d["attention_multiplier"]) == (4.0, want)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype=torch.float64,
                                                               experts_implementation="eager").eval()
        idx = torch.randint(0, VOCAB, (2, T))
        with torch.no_grad():
            assert_close_rel(model(idx), hf(idx).logits, 2e-6, f"{name}: built here, read by transformers")
    for export, kw, match in ((export_llama, {}, r"has muP multipliers \(embedding_multiplier 3.5, residual_multiplier "
                               r"0.4, attention_multiplier 0.09\).*a Granite folder may take it"),
                              (export_moe, {"n_experts": 3}, "has muP multipliers.*Mixtral"),
                              (export_cohere, {"norm": "layernorm", "norm_bias": False, "parallel_residual": True,
                                               "shared_norm": True}, "has muP multipliers.*Cohere")):
        with pytest.raises(UserError, match=match):
            export(GPTModel(_muP(**{"logit_scale": 1.0, **kw})), tmp_path / "no")
    for change, match in (({"qk_norm": True}, "normalizes q and k"),
                          ({"attention_window": 5}, "has local attention"),
                          ({"nope_layers": "1"}, "layers without RoPE"),
                          ({"qkv_bias_only": True}, "biases on q, k and v only"),
                          ({"n_experts": 3, "moe_norm_topk": False}, "does not renormalize its top k"),
                          ({"n_experts": 3, "bias": True}, "has biases, where GraniteMoe's are none"),
                          ({"norm": "layernorm"}, "normalizes with layernorm, where Granite has RMSNorms"),
                          ({"mlp": "gelu", "mlp_hidden": 0}, "GELU MLP, where Granite's is SwiGLU"),
                          ({"logit_softcap": 5.0}, "soft-caps its logits"),
                          ({"scale_embeddings": True}, "scales its token embeddings.*Granite")):
        other = GPTModel(_muP(**change))
        with pytest.raises(UserError, match=match):
            export_target(other.config)[1](other, "a Granite folder")


def test_a_granite_reward_model_is_refused_by_name():
    """transformers has no GraniteForSequenceClassification nor GraniteMoe's: the families export_target names are
    NO_CLASSIFIER's, refused by name."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES as names

    from tritongpt.commands import export_target
    from tritongpt.train.reward import refuse_no_classifier

    assert "granite" not in names and "granitemoe" not in names
    for change, family in (({}, "Granite"), ({"n_experts": 3}, "GraniteMoe")):
        assert export_target(_muP(**change))[0] == family
        with pytest.raises(UserError, match=f"no {family}ForSequenceClassification to read its score"):
            refuse_no_classifier(family)


def test_pretrain_with_the_multipliers_trains_resumes_exports_and_generates(corpus, tmp_path, capsys):
    """pretrain --embedding-multiplier --residual-multiplier --attention-multiplier (with --logit-scale 0.125):
    recorded in the run's config, a resume that differs refused by name, `info` shows them, the export is a Granite
    transformers runs with our logits (logits_scaling 8), generate runs; a flag outside (0, inf) is refused, and so
    is one that would change an --init model's."""
    from tritongpt.cli import main

    flags = ("--position-encoding", "rope", "--norm", "rmsnorm", "--mlp", "swiglu", "--embedding-multiplier", "6",
             "--residual-multiplier", "0.3", "--attention-multiplier", "0.0625", "--logit-scale", "0.125")
    assert main(pretrain_argv(corpus, tmp_path / "run", "--max-steps", "2", *flags)) == 0
    out = capsys.readouterr().out
    assert "embeddings times 6, sublayer outputs times 0.3, attention scores scaled by 0.0625" in out
    model = load_checkpoint(tmp_path / "run").eval()
    c = model.config
    assert (c.embedding_multiplier, c.residual_multiplier, c.attention_multiplier, c.logit_scale) == \
        (6.0, 0.3, 0.0625, 0.125)
    assert main(pretrain_argv(corpus, tmp_path / "run", "--max-steps", "3", "--resume", str(tmp_path / "run"),
                              *flags[:-8], "--residual-multiplier", "0.5", *flags[-4:])) == 2
    assert ("multiplies its embeddings by 6 and its sublayer outputs by 0.3 and scales its attention scores by "
            "0.0625, this run's model multiplies its embeddings by 1 and its sublayer outputs by 0.5") in \
        capsys.readouterr().err
    assert main(["info", "--weights", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "embedding_multiplier" in out and "0.0625" in out
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    d = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (d["model_type"], d["logits_scaling"], d["residual_multiplier"]) == ("granite", 8.0, 0.3)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, c.vocab_size, (2, 17))
    with torch.no_grad():
        assert_close_rel(hf(idx).logits, model(idx), 1e-5, "transformers on the export")
    capsys.readouterr()
    assert main(["generate", "--weights", str(tmp_path / "run"), "--prompt", "the", "--max-new-tokens", "4",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("the")
    assert main(pretrain_argv(corpus, tmp_path / "bad", "--residual-multiplier", "0")) == 2
    assert "--residual-multiplier must be a finite number > 0, got 0.0" in capsys.readouterr().err
    hf_granite(tmp_path / "in", vocab=300)
    assert main(pretrain_argv(corpus, tmp_path / "run2", "--init", str(tmp_path / "in"), "--embedding-multiplier",
                              "2")) == 2
    assert "--embedding-multiplier 2 would change what --init's model computes (its embedding_multiplier is 3.5)" \
        in capsys.readouterr().err
