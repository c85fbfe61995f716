"""Mixture-of-experts models whose layers are not all MoE (GPTConfig.moe_layers, moe_dense_hidden): Qwen2-MoE's and
Qwen3-MoE's mlp_only_layers and decoder_sparse_step, DeepSeek's first_k_dense_replace as a list. Tiny random
transformers models (float64, 4 layers: mlp_only_layers [0] and decoder_sparse_step 2 leave layers 1 and 3 MoE,
0 and 2 dense of intermediate_size 96 beside experts of 32) saved to tmp_path: logits on both kernel paths, the
KV-cache decode and greedy tokens, the export read back by transformers; a training step on both paths with the aux
loss over the MoE layers only; the config, its checkpoint round trip, resume's check and refusals by name."""
import json

import pytest
import torch

from parity import assert_close_rel, decodes_like, logits_match_transformers, pretrain_argv
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.model.layers import MoEFeedForward, SwiGLUFeedForward, load_balancing_loss
from tritongpt.train.gpt2_weights import load_checkpoint

VOCAB, CTX, T = 53, 40, 9
E, K, C, H, D, S = 4, 2, 64, 32, 96, 48
KINDS = ("qwen2_moe", "qwen3_moe")


def hf_sparse(folder, kind):
    """A tiny random Qwen2MoeForCausalLM or Qwen3MoeForCausalLM with dense layers 0 and 2 (mlp_only_layers [0],
    decoder_sparse_step 2), saved to folder. -> (the model, its model.safetensors)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    extra = {"shared_expert_intermediate_size": S} if kind == "qwen2_moe" else {}
    prefix = {"qwen2_moe": "Qwen2Moe", "qwen3_moe": "Qwen3Moe"}[kind]
    cfg = getattr(transformers, prefix + "Config")(
        vocab_size=VOCAB, hidden_size=C, intermediate_size=D, moe_intermediate_size=H, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CTX, tie_word_embeddings=False,
        num_experts=E, num_experts_per_tok=K, norm_topk_prob=kind == "qwen3_moe", rms_norm_eps=1e-6,
        mlp_only_layers=[0], decoder_sparse_step=2, bos_token_id=2, eos_token_id=1, pad_token_id=0,
        experts_implementation="eager", **extra)  # (grouped_mm: no float64)
    hf = getattr(transformers, prefix + "ForCausalLM")(cfg).double().eval()
    with torch.no_grad():  # unit norms and zero routers would hide a mistake
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(folder)
    return hf, folder / "model.safetensors"


def sparse_config(**change):
    return GPTConfig(**{**dict(vocab_size=VOCAB, context_length=CTX, n_embd=C, n_layer=2, n_head=4, mlp="swiglu",
                               mlp_hidden=H, n_experts=E, experts_per_token=K, position_encoding="rope",
                               norm="rmsnorm", bias=False, moe_layers="1", moe_dense_hidden=D), **change})


@pytest.mark.parametrize("kind", KINDS)
def test_a_folder_with_dense_layers_reads_decodes_and_exports_as_transformers_computes(tmp_path, kind):
    from tritongpt.train.generate import generate
    from tritongpt.train.moe_weights import export_moe

    transformers = pytest.importorskip("transformers")
    hf, path = hf_sparse(tmp_path / "in", kind)
    model = load_checkpoint(path).double().eval()
    c = model.config
    assert (c.moe_layers, c.moe_dense_hidden, c.ff_hidden, c.moe_shared_hidden) == \
        ("1,3", D, H, S if kind == "qwen2_moe" else 0)
    kinds = [type(b.ff) for b in model.trf_blocks]
    assert kinds == [SwiGLUFeedForward, MoEFeedForward, SwiGLUFeedForward, MoEFeedForward]
    assert model.trf_blocks[0].ff.w_gate.weight.shape == (D, C)
    logits_match_transformers(hf, model, VOCAB, T)  # reference within 2e-6, Triton (fp32) within 1e-5
    idx = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        want = hf(idx).logits
    decodes_like(model, idx, want)
    ours = generate(model, idx[:, :3], 5)
    theirs = hf.generate(idx[:, :3], max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, theirs)
    # exported: the dense layers said one by one (mlp_only_layers), read by transformers to the same logits
    export_moe(model, tmp_path / "out", eos_token_id=1)
    d = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (d["model_type"], d["mlp_only_layers"], d["decoder_sparse_step"], d["intermediate_size"],
            d["moe_intermediate_size"]) == (kind, [0, 2], 1, D, H)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64,
                                                             experts_implementation="eager").eval()
    with torch.no_grad():
        assert_close_rel(back(idx).logits, want, 2e-6, "exported, read by transformers")
    again = load_checkpoint(tmp_path / "out" / "model.safetensors")
    assert again.config == GPTConfig(**{**c.to_dict(), "kernels": again.config.kernels})


def test_a_training_step_on_both_paths_balances_the_moe_layers_only():
    """fp32: layer 0 dense (SwiGLU at moe_dense_hidden; kernels/swiglu.py on the Triton path), layer 1 MoE. Both
    paths give the same loss, aux term and every gradient; the aux loss is layer 1's router's alone (a dense
    layer has none to balance); an AdamW step moves the dense layer's weights and the experts'."""
    from tritongpt.train.common import build_optimizer, expert_stacks

    torch.manual_seed(0)
    model = GPTModel(sparse_config(moe_aux_loss=0.05))
    idx, targets = torch.randint(0, VOCAB, (2, 5)), torch.randint(0, VOCAB, (2, 5))
    results = {}
    for kernels in ("reference", "triton"):
        model.set_kernels(kernels)
        assert model.trf_blocks[0].ff.use_triton == (kernels == "triton")
        model.zero_grad()
        loss = model(idx, targets=targets)
        loss.backward()
        aux = model.router_aux_loss()
        assert_close_rel(aux, load_balancing_loss([model.trf_blocks[1].ff.router_logits], K), 1e-6, "aux")
        results[kernels] = loss.detach(), aux.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    (loss_ref, aux_ref, g_ref), (loss_tri, aux_tri, g_tri) = results["reference"], results["triton"]
    assert_close_rel(loss_tri, loss_ref, 1e-4, "loss")
    assert_close_rel(aux_tri, aux_ref, 1e-5, "aux")
    assert {"trf_blocks.0.ff.w_gate.weight", "trf_blocks.1.ff.w_gate", "trf_blocks.1.ff.router.weight"} <= set(g_ref)
    for name in g_ref:
        assert_close_rel(g_tri[name], g_ref[name], 1e-4, name)
    # Muon's per-expert stacks are the MoE layer's; the dense layer's matrices are Linears
    assert [p.shape for p in expert_stacks(model)] == [(E, H, C), (E, H, C), (E, C, H)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    build_optimizer(model, 1e-2, kind="adamw").step()
    for name in ("trf_blocks.0.ff.w_down.weight", "trf_blocks.1.ff.w_down", "trf_blocks.1.ff.router.weight"):
        assert not torch.equal(before[name], dict(model.named_parameters())[name]), name


def test_the_fields_round_trip_the_checkpoint_and_resume_refuses_another_layout(tmp_path):
    from types import SimpleNamespace

    from tritongpt.train.loop import Trainer, flops_per_token

    cfg = sparse_config(n_layer=3, moe_layers="odd")
    assert (cfg.moe_layers, cfg.moe_layer_count) == ("1", 1)  # one spelling of the set
    assert GPTConfig(**sparse_config(moe_layers="0,1", moe_dense_hidden=0).to_dict()).moe_layers == "all"
    model = GPTModel(cfg)
    assert {n for n in model.state_dict() if ".ff." in n} >= {"trf_blocks.0.ff.w_gate.weight",
                                                              "trf_blocks.1.ff.w_gate", "trf_blocks.2.ff.w_up.weight"}
    model.save(tmp_path / "model.safetensors")  # the config beside the weights, as every run folder holds it
    back = load_checkpoint(tmp_path / "model.safetensors")
    assert (back.config.moe_layers, back.config.moe_dense_hidden) == ("1", D)
    idx = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        assert torch.equal(back(idx), model(idx))
    saved = cfg.to_dict()
    Trainer._check_same_function(SimpleNamespace(_cfg=cfg, name="pretrain"), "ckpt", saved)
    for change, refused in (({"moe_layers": "all", "moe_dense_hidden": 0}, "has experts in layers 1 \\(the others "
                             "dense, of width 96\\) .*this run's model has experts in every layer.*pass --moe-layers "
                             "1 --moe-dense-hidden 96"),
                            ({"moe_dense_hidden": 40}, "of width 96.*of width 40.*pass --moe-layers 1"),
                            ({"moe_shared_hidden": S}, "and no shared expert .*and a shared expert of width 48.*pass "
                             "the run's own --init")):
        with pytest.raises(UserError, match=refused):
            Trainer._check_same_function(SimpleNamespace(_cfg=sparse_config(**{**saved, **change}),
                                                         name="pretrain"), "ckpt", saved)
    # MFU's 6N leaves out the experts a token does not meet, in the MoE layers only
    every = GPTModel(sparse_config(n_layer=3, moe_layers="all", moe_dense_hidden=0))
    unused = 3 * (E - K) * C * H
    assert flops_per_token(cfg, model.num_params(), 8) - 6 * model.num_params() == \
        flops_per_token(every.config, every.num_params(), 8) - 6 * every.num_params() + 6 * 2 * unused


@pytest.mark.parametrize("change,match", [
    ({"moe_layers": "0,2"}, "GPTConfig.moe_layers '0,2' must list distinct layers in increasing order, each below "
                            "n_layer 2"),
    ({"moe_layers": "first"}, "GPTConfig.moe_layers must be all, odd or a comma list of layer indices"),
    ({"moe_dense_hidden": 0}, "GPTConfig.moe_layers '1' leaves layers 0 a dense MLP, whose hidden size "
                              "moe_dense_hidden is missing"),
    ({"moe_layers": "all"}, "GPTConfig.moe_dense_hidden 96 is the width of the dense layers among the "
                            "mixture-of-experts ones, and moe_layers 'all' leaves none"),
    ({"n_experts": 0}, "GPTConfig.moe_layers '1' and moe_dense_hidden 96 say which layers are a mixture of experts"),
    ({"moe_dense_hidden": -3}, "GPTConfig.moe_dense_hidden must be an integer >= 0, got -3"),
])
def test_a_bad_layout_is_refused_by_name(change, match):
    with pytest.raises(UserError, match=match):
        sparse_config(**change)


@pytest.mark.parametrize("family,change", [("Mixtral", {}), ("OLMoE", {"qk_norm": True, "qk_norm_width": "all"})])
def test_an_export_to_an_all_moe_family_refuses_dense_layers(family, change):
    from tritongpt.commands import export_target

    cfg = sparse_config(**change)
    target = export_target(cfg)
    assert target[0] == family
    with pytest.raises(UserError, match=f"has dense MLPs in some layers \\(moe_layers '1'\\), where every {family} "
                                        "layer is a mixture of experts"):
        target[1](GPTModel(cfg), "a folder")


def test_a_reward_model_with_dense_layers_exports_transformers_scores(tmp_path):
    """A reward model on a Qwen3-MoE backbone with a dense layer: Qwen3MoeForSequenceClassification reads the
    export (mlp_only_layers) to the same scores, and RewardModel.load reads it back."""
    transformers = pytest.importorskip("transformers")
    from tritongpt.commands import export_target
    from tritongpt.train.reward import RewardModel, export_reward_model

    torch.manual_seed(0)
    rm = RewardModel(GPTModel(sparse_config(qk_norm=True, moe_norm_topk=True)))
    with torch.no_grad():
        for p in rm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        rm.head.bias.zero_()  # (an RMSNorm backbone cannot take the head's bias: fold_head_bias's business)
    rm.eval()
    idx, lengths = torch.randint(2, VOCAB - 1, (2, 7)), torch.tensor([7, 4])
    idx[0, 6], idx[1, 3], idx[1, 4:] = VOCAB - 1, VOCAB - 1, 0  # each row closed by its end token, then padded
    with torch.no_grad():
        ours = rm(idx, lengths)
    export_reward_model(rm, tmp_path, export_target(rm.backbone.config)[2], VOCAB - 1, 0)
    assert json.loads((tmp_path / "config.json").read_text())["mlp_only_layers"] == [0]
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen3MoeForSequenceClassification"
    mask = (torch.arange(7)[None] < lengths[:, None]).long()
    with torch.no_grad():
        theirs = hf(input_ids=idx, attention_mask=mask).logits[:, 0]
        assert_close_rel(theirs, ours, 1e-5, "classifier scores")
        assert_close_rel(RewardModel.load(tmp_path).eval()(idx, lengths), ours, 1e-5, "read back")


def test_pretrain_trains_dense_layers_among_the_moe_ones_and_refuses_the_flags_without_experts(corpus, tmp_path,
                                                                                                capsys):
    """--moe-layers odd --moe-dense-hidden 40 with --n-experts: one step with the aux loss, the checkpoint's config
    holds them (as its list), the header says them; without experts, or changing --init's, refused by name."""
    from tritongpt.cli import main

    assert main(pretrain_argv(corpus, tmp_path / "run", "--model", "tiny", "--mlp", "swiglu", "--n-experts", "4",
                              "--moe-layers", "odd", "--moe-dense-hidden", "40", "--moe-aux-loss", "0.01",
                              "--max-steps", "1")) == 0
    out = capsys.readouterr().out
    model = load_checkpoint(tmp_path / "run")
    c = model.config
    moe = ",".join(map(str, range(1, c.n_layer, 2)))
    assert (c.moe_layers, c.moe_dense_hidden, c.moe_aux_loss) == (moe, 40, 0.01)
    assert f"4 experts in layers {moe} (the others dense, 40)" in out
    assert isinstance(model.trf_blocks[0].ff, SwiGLUFeedForward) and isinstance(model.trf_blocks[1].ff, MoEFeedForward)
    assert main(pretrain_argv(corpus, tmp_path / "dense", "--moe-layers", "1", "--max-steps", "1")) == 2
    assert "--moe-layers 1 picks which layers are a mixture of experts: without --n-experts" in capsys.readouterr().err
    assert main(pretrain_argv(corpus, tmp_path / "again", "--init", str(tmp_path / "run"), "--moe-layers", "odd",
                              "--max-steps", "1")) == 0  # the same set, spelled as it was given
    capsys.readouterr()
    assert main(pretrain_argv(corpus, tmp_path / "other", "--init", str(tmp_path / "run"), "--moe-dense-hidden", "48",
                              "--max-steps", "1")) == 2
    assert f"--moe-dense-hidden 48 would change what --init's model computes (its moe_layers is '{moe}', " \
        "moe_dense_hidden 40)" in capsys.readouterr().err
