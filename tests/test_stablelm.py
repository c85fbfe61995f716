"""StableLM (StableLM-3B-4E1T, StableLM 2 1.6B and 12B): a Llama with LayerNorms, RoPE on a quarter of each head
and, in StableLM 2, biases on q, k and v only; StableLM 2 12B's parallel blocks on one norm and per-head q/k
LayerNorms with weights of each head's own (GPTConfig.qk_norm_width "each", tested here on both paths)
(train/stablelm_weights.py). Tiny random transformers
StableLmForCausalLM models saved to tmp_path (float64, every tensor jittered so each one counts): logits on both
kernel paths, the KV-cache decode, greedy tokens, export round trips through transformers, a pretrain --init
step; what this model does not compute refused by name. Nothing downloaded."""
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


def hf_stablelm(folder, qkv_bias=True, kv_heads=2, tie=False, vocab=VOCAB, context=CTX, **config):
    """A tiny random StableLmForCausalLM in float64 (4 heads of 16 over 64, 4 of each head's dimensions
    rotated: StableLmConfig's partial_rotary_factor 0.25), saved to folder, EOS and BOS 1.
    -> (the model, its model.safetensors)."""
    torch.manual_seed(0)
    cfg = transformers.StableLmConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=context, use_qkv_bias=qkv_bias,
        tie_word_embeddings=tie, bos_token_id=1, eos_token_id=1,
        **{"layer_norm_eps": 1e-6, "rope_parameters": {"rope_type": "default", "rope_theta": 500.0,
                                                      "partial_rotary_factor": 0.25}, **config})
    hf = transformers.StableLmForCausalLM(cfg).double().eval()
    with torch.no_grad():  # unit norm weights and zero biases would hide a mistake
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(folder)
    return hf, folder / "model.safetensors"


@pytest.mark.parametrize("qkv_bias", [True, False], ids=["stablelm2", "stablelm-3b"])
def test_loads_its_fields_and_matches_transformers_on_both_paths(tmp_path, qkv_bias):
    """StableLM 2's q/k/v biases (and StableLM-3B's none), LayerNorms with biases, a quarter of each head
    rotated, GQA: logits on both paths and a decode over the KV cache on both are transformers'."""
    hf, path = hf_stablelm(tmp_path, qkv_bias)
    model = load_checkpoint(path).double().eval()
    c = model.config
    assert (c.norm, c.mlp, c.bias, c.qkv_bias_only, c.rotary_dim, c.rope_theta, c.kv_heads, c.norm_eps) == \
        ("layernorm", "swiglu", False, qkv_bias, 4, 500.0, 2, 1e-6) and c.context_length == CTX
    assert model.trf_blocks[1].att.W_key.bias is not None if qkv_bias else model.trf_blocks[1].att.W_key.bias is None
    logits_match_transformers(hf, model, VOCAB, T)
    idx = torch.randint(0, VOCAB, (1, 15))
    with torch.no_grad():
        decodes_like(model, idx, hf(idx).logits)


def test_greedy_tokens_are_transformers(tmp_path):
    hf, path = hf_stablelm(tmp_path)
    model = load_checkpoint(path).double().eval()
    from tritongpt.train.generate import generate

    idx = torch.randint(0, VOCAB, (1, 3))
    ours = generate(model, idx, 12)
    theirs = hf.generate(idx, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("kw", [{}, {"qkv_bias": False, "tie": True, "kv_heads": 4, "rope_parameters": {
    "rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 1.0}}], ids=["stablelm2", "tied-whole-heads"])
def test_export_round_trips_through_transformers(tmp_path, kw):
    """Loaded, exported (`export` picks StableLM for LayerNorms with SwiGLU), read by transformers'
    AutoModelForCausalLM: the same logits, and load_checkpoint reads the export back to the same config."""
    from tritongpt.commands import export_target
    from tritongpt.train.stablelm_weights import export_stablelm

    hf, path = hf_stablelm(tmp_path / "in", **kw)
    model = load_checkpoint(path).double().eval()
    assert export_target(model.config)[0] == "StableLM"
    export_stablelm(model, tmp_path / "out", eos_token_id=1)
    d = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (d["model_type"], d["partial_rotary_factor"]) == \
        ("stablelm", kw.get("rope_parameters", {}).get("partial_rotary_factor", 0.25))
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    assert type(back).__name__ == "StableLmForCausalLM"
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(back(idx).logits, hf(idx).logits, 2e-6, "exported, read by transformers")
    again = load_checkpoint(tmp_path / "out" / "model.safetensors")
    assert again.config == GPTConfig(**{**model.config.to_dict(), "kernels": again.config.kernels})
    # transformers 4.x reads the flat keys (rope_theta, partial_rotary_factor) alone: without rope_parameters, the
    # same config
    (tmp_path / "out" / "config.json").write_text(json.dumps({k: v for k, v in d.items() if k != "rope_parameters"}))
    assert load_checkpoint(tmp_path / "out" / "model.safetensors").config == again.config
    with pytest.raises(UserError, match="already holds a model"):
        export_stablelm(model, tmp_path / "out")


@pytest.mark.parametrize("change,match", [
    ({"use_parallel_residual": True}, "use_parallel_residual true, but the weights have post_attention_layernorm"),
    ({"qk_layernorm": True}, "qk_layernorm true, but the weights lack q_layernorm's"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'; this model's SwiGLU computes 'silu' only"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0, "partial_rotary_factor": 0.25}},
     "rope_parameters of type 'linear'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.2}},
     "partial rotary factor 0.2: 3 of head_dim 16 rotated"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": -1.0, "partial_rotary_factor": 0.25}},
     r"a RoPE base -1.0 \(rope_theta\); it must be a number > 0"),
    # transformers 5 reads rope_parameters' factor, 4.x the flat one: a disagreement loads two models
    ({"partial_rotary_factor": 1.0}, r"has partial_rotary_factor 1.0, but StableLM's RoPE reads the "
                                     r"partial_rotary_factor in rope_parameters, 0.25 \(transformers 4.x reads "
                                     r"partial_rotary_factor"),
    ({"use_qkv_bias": False}, "use_qkv_bias false, but the weights have q_proj's bias"),
    ({"model_type": "stablelm_epoch"}, "model_type 'stablelm_epoch'"),
    # q_proj's 64 rows over 5 heads (llama_weights.hf_shapes refuses it before StableLM's own check)
    ({"num_attention_heads": 5}, "says num_attention_heads 5, which does not divide the 64 rows of the weights' "
                                 "q_proj"),
    # a field passed on as config.json gives it, which GPTConfig refuses: named with the file and its key
    ({"layer_norm_eps": 0},
     r"config\.json: layer_norm_eps \(GPTConfig\.norm_eps\) must be a number in \(0, 1\), got 0"),
], ids=["parallel", "qk-layernorm", "activation", "linear-rope", "odd-rotary", "theta", "flat-factor", "qkv-bias",
        "epoch", "heads", "eps-zero"])
def test_what_this_model_does_not_compute_is_refused_by_name(hf_copy, tmp_path, change, match):
    path = hf_copy(hf_stablelm, tmp_path)
    cfg_json = tmp_path / "config.json"
    cfg_json.write_text(json.dumps({**json.loads(cfg_json.read_text()), **change}))
    with pytest.raises(UserError, match=match):
        load_checkpoint(path)


@pytest.mark.parametrize("change,match", [
    ({"parallel_residual": True}, r"runs attention and MLP side by side .*GPT-NeoX's blocks.*cannot be exported as a "
     r"StableLM folder \(a GPT-NeoX folder may take it\)"),
    ({"attention_window": 8}, r"has local attention \(attention_window 8\), where StableLM attends to the whole "
     "context: it cannot be exported as a StableLM folder"),
], ids=["two-norm-parallel", "sliding-window"])
def test_the_export_refuses_what_stablelm_does_not_compute_by_name(tmp_path, change, match):
    """StableLM 2 12B's parallel block reads one norm (shared_norm): GPT-NeoX's, a norm per sublayer, has no
    StableLM config (its post_attention_layernorm would go unread), and no StableLM attends through a sliding
    window. Both refused by name, nothing written; the same model without the field exports."""
    from tritongpt.train.stablelm_weights import export_stablelm

    base = dict(vocab_size=VOCAB, context_length=CTX, n_embd=64, n_layer=2, n_head=4, n_kv_head=2,
                position_encoding="rope", rotary_dim=4, norm="layernorm", mlp="swiglu", bias=False, tie_weights=False)
    export_stablelm(GPTModel(GPTConfig(**base)), tmp_path / "base")
    with pytest.raises(UserError, match=match):
        export_stablelm(GPTModel(GPTConfig(**base, **change)), tmp_path / "no")
    assert not (tmp_path / "no").exists()


TWELVE_B = dict(qk_layernorm=True, use_parallel_residual=True)  # StableLM 2 12B's two


def test_stablelm2_12b_blocks_load_match_transformers_and_export_back(tmp_path):
    """StableLM 2 12B's parallel block on one norm (no post_attention_layernorm) and per-head q/k LayerNorms
    (q_layernorm.norms.{h}.weight stacked [4, 16], k's [2, 16] over the KV heads, bias-free though the block norms
    have biases): logits on both paths, the decode over the KV cache, greedy tokens; the export (routed to
    StableLM, not Cohere) writes them back, transformers reads it with the same logits."""
    from tritongpt.commands import export_target
    from tritongpt.train.generate import generate
    from tritongpt.train.stablelm_weights import export_stablelm

    hf, path = hf_stablelm(tmp_path / "in", **TWELVE_B)
    model = load_checkpoint(path).double().eval()
    c = model.config
    assert (c.qk_norm, c.qk_norm_width, c.parallel_residual, c.shared_norm, c.norm_bias) == \
        (True, "each", True, True, True)
    att = model.trf_blocks[1].att
    assert (att.q_norm.weight.shape, att.k_norm.weight.shape, model.trf_blocks[1].norm2) == ((4, 16), (2, 16), None)
    assert torch.allclose(att.k_norm.weight[1], hf.model.layers[1].self_attn.k_layernorm.norms[1].weight, atol=1e-6)
    assert not any(n.endswith(("q_norm.bias", "k_norm.bias")) for n in model.state_dict())
    logits_match_transformers(hf, model, VOCAB, T)
    idx = torch.randint(0, VOCAB, (1, 15))
    with torch.no_grad():
        decodes_like(model, idx, hf(idx).logits)
    theirs = hf.generate(idx[:, :3], max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(generate(model, idx[:, :3], 10), theirs)
    assert export_target(model.config)[0] == "StableLM"
    export_stablelm(model, tmp_path / "out", eos_token_id=1)
    d = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (d["qk_layernorm"], d["use_parallel_residual"]) == (True, True)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(back(idx).logits, hf(idx).logits, 2e-6, "12B blocks exported, read by transformers")
    again = load_checkpoint(tmp_path / "out" / "model.safetensors")
    assert again.config == GPTConfig(**{**model.config.to_dict(), "kernels": again.config.kernels})


def _per_head_like(**kw):
    cfg = dict(vocab_size=VOCAB, context_length=CTX, n_embd=64, n_layer=2, n_head=4, n_kv_head=2,
               position_encoding="rope", rope_theta=500.0, norm="layernorm", mlp="swiglu", bias=False, qk_norm=True,
               qk_norm_width="each", norm_eps=1e-6)
    cfg.update(kw)
    return GPTModel(GPTConfig(**cfg))


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_per_head_qk_norms_agree_on_both_paths_with_every_gradient(norm):
    """qk_norm_width "each": the reference's q/k norm is each head's own (a norm over head_dim times that head's
    row of the [heads, head_dim] weight, checked against F.layer_norm / F.rms_norm head by head); the Triton path's
    (the norm kernel with a ones weight, the weight multiplied in torch) gives the float64 reference's loss and
    every gradient, the [heads, head_dim] weights' too (fp32, 1e-4), and a decode over the KV cache gives the
    whole sequence's logits on both paths. (One layer: the interpreter's time.)"""
    import torch.nn.functional as F

    torch.manual_seed(3)
    ref = _per_head_like(norm=norm, n_layer=1).float()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    qn = ref.trf_blocks[0].att.q_norm
    x = torch.randn(2, 5, 4, 16)
    by_head = torch.stack([(F.layer_norm(x[:, :, h], (16,), qn.weight[h], None, 1e-6) if norm == "layernorm" else
                            F.rms_norm(x[:, :, h], (16,), qn.weight[h], 1e-6)) for h in range(4)], 2)
    assert_close_rel(qn(x), by_head, 1e-6, "each head's own norm")
    idx, targets = torch.randint(0, VOCAB, (2, 19)), torch.randint(0, VOCAB, (2, 19))
    ref64 = _per_head_like(norm=norm, n_layer=1).double()
    ref64.load_state_dict(ref.state_dict())
    want = ref64(idx, targets=targets)
    want.backward()
    grads = dict(ref64.named_parameters())
    for kernels in ("reference", "triton"):
        model = _per_head_like(norm=norm, n_layer=1).float()
        model.load_state_dict(ref.state_dict())
        model.set_kernels(kernels)
        loss = model(idx, targets=targets)
        loss.backward()
        assert_close_rel(loss.double().reshape(1), want.reshape(1), 1e-5, f"loss, {kernels}")
        for name, p in model.named_parameters():
            assert_close_rel(p.grad.double(), grads[name].grad, 1e-4, f"{name}, {kernels}")
    ref64.eval()
    with torch.no_grad():
        decodes_like(ref64, idx[:1, :13], ref64(idx[:1, :13]))


def test_per_head_qk_norms_are_checked_and_other_exports_refuse_them_by_name(tmp_path):
    """qk_norm_width "each" needs qk_norm; it has no bias whatever norm_bias says (neither StableLM's nor
    Command R+'s has one); every export but StableLM's and Cohere's refuses it by name, never writing a
    [heads, head_dim] weight where its family reads [head_dim]; the resume check names it."""
    from types import SimpleNamespace

    from tritongpt.train.gemma_weights import export_gemma
    from tritongpt.train.gpt2_weights import export_gpt2
    from tritongpt.train.llama_weights import export_llama
    from tritongpt.train.loop import Trainer
    from tritongpt.train.moe_weights import export_moe
    from tritongpt.train.neox_weights import export_neox
    from tritongpt.train.olmo_weights import export_olmo
    from tritongpt.train.phi3_weights import export_phi3
    from tritongpt.train.stablelm_weights import export_stablelm

    with pytest.raises(UserError, match="qk_norm_width must be one of head, all, each"):
        GPTConfig(qk_norm=True, qk_norm_width="heads")
    with pytest.raises(UserError, match="qk_norm_width 'each' says how q and k are normalized, and qk_norm is False"):
        GPTConfig(qk_norm_width="each")
    assert _per_head_like().trf_blocks[0].att.q_norm.weight.shape == (4, 16)
    assert not any("q_norm.bias" in n for n in _per_head_like(norm_bias=True).state_dict())
    from tritongpt.train.common import block_matrices, param_groups

    model = _per_head_like()  # its [heads, head_dim] weights are scales: no weight decay, not Muon's matrices
    norms = {id(p) for n, p in model.named_parameters() if n.endswith(("q_norm.weight", "k_norm.weight"))}
    assert norms <= {id(p) for p in param_groups(model, 0.1)[1]["params"]}
    assert len(norms) == 4 and not norms & {id(p) for p in block_matrices(model)}
    llama = dict(norm="rmsnorm")
    for export, kw in ((export_llama, llama), (export_phi3, llama), (export_olmo, llama),
                       (export_moe, dict(llama, n_experts=4, experts_per_token=2)),
                       (export_gemma, dict(llama, mlp="geglu", scale_embeddings=True)),
                       (export_neox, dict(mlp="gelu", bias=True, parallel_residual=True)),
                       (export_gpt2, dict(mlp="gelu", bias=True, position_encoding="learned"))):
        with pytest.raises(UserError, match=r"weights of that head's own \(qk_norm_width 'each'\).*StableLM or Cohere"):
            export(_per_head_like(**kw), tmp_path / "no")
    with pytest.raises(UserError, match=r"one weight for every head \(qk_norm_width 'head'\)"):
        export_stablelm(_per_head_like(qk_norm_width="head"), tmp_path / "no")
    saved = _per_head_like().config.to_dict()
    cfg = GPTConfig(**{**saved, "qk_norm_width": "head"})
    with pytest.raises(UserError, match="per head with weights of each head's own, this run's model normalizes .* "
                                        r"per head \(if at all\)"):
        Trainer._check_same_function(SimpleNamespace(_cfg=cfg, name="pretrain"), "ckpt", saved)


def test_a_config_without_the_rotary_factor_is_read_as_transformers_reads_it(tmp_path):
    """StableLmConfig's partial_rotary_factor default is 0.25: a config.json that says none rotates a quarter
    of each head, in transformers and here alike; without max_position_embeddings or layer_norm_eps, 4096 and
    1e-5, as StableLmConfig's."""
    _, path = hf_stablelm(tmp_path, rope_parameters={"rope_type": "default", "rope_theta": 500.0,
                                                     "partial_rotary_factor": 0.5})
    cfg_json = tmp_path / "config.json"
    d = json.loads(cfg_json.read_text())
    for key in ("rope_parameters", "max_position_embeddings", "layer_norm_eps"):
        d.pop(key)
    cfg_json.write_text(json.dumps({**d, "rope_theta": 500.0}))
    model = load_checkpoint(path).double().eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert (model.config.rotary_dim, model.config.context_length, model.config.norm_eps) == \
        (4, hf.config.max_position_embeddings, hf.config.layer_norm_eps) == (4, 4096, 1e-5)
    idx = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        assert_close_rel(model(idx), hf(idx).logits, 2e-6, "no partial_rotary_factor: a quarter rotated")


def test_pretrain_from_a_stablelm_folder_exports_back_as_stablelm(corpus, tmp_path, capsys):
    """--init a StableLM 2 folder, train a step, export: a StableLM folder that transformers runs with our
    logits."""
    from tritongpt.cli import main

    hf_stablelm(tmp_path / "s", vocab=300, context=64)
    assert main(pretrain_argv(corpus, tmp_path / "run", "--init", str(tmp_path / "s"), "--max-steps", "1")) == 0
    model = load_checkpoint(tmp_path / "run").eval()
    assert (model.config.norm, model.config.rotary_dim, model.config.qkv_bias_only) == ("layernorm", 4, True)
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    assert "StableLM with 2 layers" in capsys.readouterr().out
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        assert_close_rel(hf(idx).logits, model(idx), 1e-5, "transformers on the export")
