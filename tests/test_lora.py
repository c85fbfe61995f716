"""LoRA (model/lora.py): a zero start, both kernel paths against float64 (forward and every
LoRA gradient, and the gradients against dA = s B^T dW, dB = s dW A^T), merging, saving and
loading, and fine-tuning that trains only A and B."""
import copy
import json
import re

import pytest
import torch

from parity import assert_close_rel, report
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.model.lora import add_lora, has_lora, lora_linears, lora_parameters, merge_lora

pytestmark = pytest.mark.usefixtures("one_thread")


def small(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=97, context_length=32, n_embd=32, n_layer=2, n_head=2)
    return GPTModel(GPTConfig(**{**cfg, **kw}))


def with_trained_lora(model, rank=4, alpha=8.0, targets="attn,mlp", seed=1):
    """LoRA whose B is no longer zero (as after some training), of a realistic size."""
    add_lora(model, rank, alpha, targets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_lora_starts_as_the_frozen_model_and_trains_only_a_and_b():
    model = small()
    x = torch.randint(0, 97, (3, 21))
    before = model(x)
    add_lora(model, rank=4, alpha=8.0)
    assert torch.equal(model(x), before)  # B = 0
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith(("lora_A", "lora_B")) for n in trained)
    # r (in + out) per matrix: 4 attention [32 x 32] and the MLP's [128 x 32] and [32 x 128], per layer
    assert sum(p.numel() for p in lora_parameters(model)) == 2 * 4 * (4 * 64 + 2 * 160)
    model(x, targets=x).backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trained)
    attn_only = add_lora(small(), 2, 4.0, "attn")
    assert [n.split(".", 2)[2] for n, _ in lora_linears(attn_only)][:4] == \
        ["att.W_query", "att.W_key", "att.W_value", "att.out_proj"]
    assert sum(p.numel() for p in lora_parameters(attn_only)) == 2 * 2 * 4 * 64


@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_both_paths_agree_with_float64_forward_and_every_lora_gradient(kernels):
    model = with_trained_lora(small(seed=3, n_layer=1))
    x = torch.randint(0, 97, (2, 19))  # 19: not a multiple of any block size
    ref = copy.deepcopy(model).double()
    ref.set_kernels("reference")
    ref_loss = ref(x, targets=x)
    ref_loss.backward()
    model.set_kernels(kernels)
    loss = model(x, targets=x)
    loss.backward()
    assert_close_rel(loss, ref_loss, 1e-5, "loss")
    want = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert_close_rel(p.grad, want[name].grad, 1e-4, name)


def test_lora_gradients_are_the_weight_gradient_projected_on_a_and_b():
    """dA = s B^T dW and dB = s dW A^T, dW the gradient a plain model with the merged weights
    gets for that matrix: what autograd through the parametrization must give."""
    model = with_trained_lora(small(seed=4), rank=3, alpha=6.0).double()
    x = torch.randint(0, 97, (2, 17))
    plain = merge_lora(copy.deepcopy(model))  # a copy merged: the model itself keeps its LoRA
    plain(x, targets=x).backward()
    model(x, targets=x).backward()
    s = 6.0 / 3
    for name, linear in lora_linears(model):
        upd = linear.parametrizations.weight[0]
        dW = plain.get_submodule(name).weight.grad
        assert_close_rel(upd.lora_A.grad, s * upd.lora_B.detach().T @ dW, 1e-10, name + " A")
        assert_close_rel(upd.lora_B.grad, s * dW @ upd.lora_A.detach().T, 1e-10, name + " B")


def test_merge_gives_the_same_model_plainly():
    model = with_trained_lora(small(seed=5))
    x = torch.randint(0, 97, (2, 13))
    out = model(x)
    merged = merge_lora(copy.deepcopy(model))
    assert not has_lora(merged) and merged.config.lora_rank == 0
    assert (merged.config.lora_alpha, merged.config.lora_targets) == (16.0, "attn,mlp")  # defaults again
    assert all(p.requires_grad for p in merged.parameters())
    assert torch.equal(merged(x), out)
    assert has_lora(model) and torch.equal(model(x), out)  # merging a copy leaves the model as it was
    assert set(merged.state_dict()) == set(small().state_dict())  # plain parameter names again


def test_a_lora_checkpoint_loads_as_saved_for_training_and_merged_for_use(tmp_path):
    from tritongpt.train.gpt2_weights import load_checkpoint

    model = with_trained_lora(small(seed=6), targets="mlp")
    x = torch.randint(0, 97, (2, 11))
    model.save(tmp_path / "m.safetensors")
    again = GPTModel.load(tmp_path / "m.safetensors")
    assert has_lora(again) and again.config.lora_targets == "mlp" and again.config.lora_alpha == 8.0
    assert torch.equal(again(x), model(x))
    assert {n for n, p in again.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}
    used = load_checkpoint(tmp_path / "m.safetensors")
    assert not has_lora(used) and torch.equal(used(x), model(x))
    # padding the vocabulary keeps LoRA and what trains
    padded = again.pad_vocab(64)
    assert has_lora(padded) and torch.equal(padded(x), model(x))
    assert {n for n, p in padded.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}


def test_bad_lora_settings_are_named():
    for kw, msg in ((dict(rank=-1), "--lora-rank must be an integer >= 0"),
                    (dict(rank=2.5), "--lora-rank must be an integer >= 0"),
                    (dict(rank=4, alpha=0), "--lora-alpha must be a positive number"),
                    (dict(rank=4, alpha=float("nan")), "--lora-alpha must be a positive number"),
                    (dict(rank=4, targets="attn,head"), "LoRA targets must be a comma list of attn, mlp"),
                    (dict(rank=4, targets=""), "LoRA targets must be a comma list"),
                    (dict(rank=33), "--lora-rank 33 is above the model's width 32")):
        with pytest.raises(UserError, match=msg):
            add_lora(small(), **kw)
    with pytest.raises(UserError, match="has LoRA already"):
        add_lora(add_lora(small(), 2), 2)
    assert not has_lora(add_lora(small(), 0))  # rank 0: none
    with pytest.raises(UserError, match="--lora-rank must be an integer >= 0"):
        GPTConfig(lora_rank=-2)


def test_sft_with_lora_trains_only_the_update_and_its_checkpoint_is_used_merged(tmp_path, capsys):
    from tritongpt.cli import main
    from tritongpt.train.common import load_state
    from tritongpt.train.gpt2_weights import load_checkpoint

    init = small(seed=7, vocab_size=4096, context_length=128)
    init.save(tmp_path / "init.safetensors")
    out = tmp_path / "sft"
    assert main(["sft", "--init", str(tmp_path / "init.safetensors"), "--tokenizer", "default",
                 "--n-train", "32", "--n-eval", "4", "--max-steps", "3", "--batch-size", "4", "--lr", "1e-2",
                 "--lora-rank", "2", "--lora-targets", "mlp", "--out-dir", str(out), "--device", "cpu",
                 "--eval-every", "0", "--sample-every", "0", "--max-new-tokens", "2"]) == 0
    assert "LoRA rank 2 (alpha 16) on mlp: 1,280 of" in capsys.readouterr().err
    saved = GPTModel.load(out / "ckpt-0000003" / "model.safetensors")
    base = dict(init.named_parameters())
    for name, p in saved.named_parameters():
        if name.endswith("lora_B"):
            assert p.abs().max() > 0  # trained away from its zero start
        elif not name.endswith("lora_A"):  # everything else is the --init model's, bit for bit
            assert torch.equal(p, base[name.replace(".parametrizations.weight.original", ".weight")]), name
    state = load_state(out / "ckpt-0000003")["optimizer"]["state"]
    assert len(state) == 2 * 2 * 2  # AdamW state for A and B of 2 matrices in 2 layers, nothing else
    used = load_checkpoint(out)
    x = torch.randint(0, 4096, (1, 9))
    assert not has_lora(used) and torch.equal(used(x), saved(x))
    assert main(["info", "--weights", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "lora         rank 2, alpha 16 on mlp: the file holds" in printed and "  lora_rank       0\n" in printed
    assert main(["sft", "--init", str(tmp_path / "init.safetensors"), "--lora-rank", "-3",
                 "--out-dir", str(tmp_path / "bad")]) == 2
    assert "--lora-rank must be an integer >= 0" in capsys.readouterr().err


def test_dpo_with_lora_keeps_the_reference_whole(tmp_path, capsys):
    from tritongpt.cli import main

    out = tmp_path / "dpo"
    assert main(["dpo", "--model", "tiny", "--num-pairs", "8", "--max-steps", "1", "--batch-size", "4",
                 "--lora-rank", "2", "--out-dir", str(out), "--device", "cpu", "--eval-every", "0",
                 "--val-fraction", "0"]) == 0
    assert "LoRA rank 2" in capsys.readouterr().err
    saved = GPTModel.load(out / "ckpt-0000001" / "model.safetensors")
    assert has_lora(saved) and saved.config.lora_rank == 2


def test_a_lora_run_resumes_bit_for_bit(tmp_path, capsys):
    import shutil

    from tritongpt.cli import main

    small(seed=8, vocab_size=4096, context_length=128).save(tmp_path / "init.safetensors")
    out = tmp_path / "sft"
    run = ["sft", "--init", str(tmp_path / "init.safetensors"), "--tokenizer", "default", "--n-train", "32",
           "--n-eval", "4", "--max-steps", "4", "--batch-size", "4", "--lr", "1e-2", "--lora-rank", "2",
           "--out-dir", str(out), "--device", "cpu", "--eval-every", "0", "--sample-every", "0",
           "--ckpt-every", "2", "--max-new-tokens", "2"]
    assert main(run) == 0
    straight = GPTModel.load(out / "ckpt-0000004" / "model.safetensors").state_dict()
    shutil.rmtree(out / "ckpt-0000004")
    assert main(run + ["--resume"]) == 0
    resumed = GPTModel.load(out / "ckpt-0000004" / "model.safetensors").state_dict()
    assert straight.keys() == resumed.keys() and any("lora_B" in k for k in straight)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    # a resume without the run's LoRA flags is told which flags to pass
    shutil.rmtree(out / "ckpt-0000004")
    i = run.index("--lora-rank")
    plain = run[:i] + run[i + 2:]
    assert main(plain + ["--resume"]) == 2
    assert ("has lora_rank 2 (this run: 0); pass the --lora-rank, --lora-alpha and --lora-targets it was "
            "trained with") in capsys.readouterr().err


def test_activation_checkpointing_gives_the_same_lora_gradients():
    model = with_trained_lora(small(seed=9))
    x = torch.randint(0, 97, (2, 15))
    grads = []
    for on in (False, True):
        model.set_activation_checkpointing(on)
        model.zero_grad(set_to_none=True)
        model(x, targets=x).backward()
        grads.append([p.grad.clone() for p in lora_parameters(model)])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_reward_and_rlhf_with_lora_train_the_update_and_their_new_heads(tmp_path, capsys):
    """The reward model's scalar head and PPO's value head are new: they train whole, beside
    the backbone's LoRA; a LoRA reward model is scored with merged (RewardModel.load)."""
    from tritongpt.cli import main
    from tritongpt.train.common import load_state
    from tritongpt.train.reward import RewardModel

    small(seed=10, vocab_size=4096, context_length=128).save(tmp_path / "init.safetensors")
    init = ["--init", str(tmp_path / "init.safetensors"), "--tokenizer", "default", "--num-pairs", "8",
            "--lora-rank", "2", "--device", "cpu"]
    assert main(["reward", *init, "--max-steps", "1", "--batch-size", "4", "--out-dir", str(tmp_path / "rw"),
                 "--eval-every", "0", "--val-fraction", "0"]) == 0
    n_lora = 2 * 6 * 2  # A and B of 6 matrices in each of 2 layers
    assert len(load_state(tmp_path / "rw" / "ckpt-0000001")["optimizer"]["state"]) == n_lora + 2  # + head w, b
    rm = RewardModel.load(tmp_path / "rw")
    assert not has_lora(rm.backbone) and rm.config.lora_rank == 0
    assert main(["rlhf", *init, "--reward", str(tmp_path / "rw"), "--iterations", "1", "--prompts-per-iter", "4",
                 "--minibatch-size", "2", "--epochs", "1", "--max-new-tokens", "4", "--eval-prompts", "2",
                 "--eval-samples", "1", "--out-dir", str(tmp_path / "rl")]) == 0
    ckpt = tmp_path / "rl" / "ckpt-0000001"
    assert len(load_state(ckpt)["optimizer"]["state"]) == n_lora + 2  # + the value head's w, b
    policy = GPTModel.load(ckpt / "model.safetensors")
    err = capsys.readouterr().err
    assert has_lora(policy) and "parameters train, and the new reward head whole" in err
    assert "parameters train, and the new value head whole" in err
    base = dict(small(seed=10, vocab_size=4096, context_length=128).named_parameters())
    for name, p in policy.named_parameters():
        if not name.endswith(("lora_A", "lora_B")):
            assert torch.equal(p, base[name.replace(".parametrizations.weight.original", ".weight")]), name


def test_targets_are_read_loosely_and_kept_in_targets_order():
    """Spaces and repeats in --lora-targets are one set, in TARGETS' order: each matrix adapted once."""
    model = add_lora(small(), 2, 4.0, " mlp , attn,mlp ")
    assert model.config.lora_targets == "attn,mlp"
    names = [n.split(".", 2)[2] for n, _ in lora_linears(model)]
    assert names == ["att.W_query", "att.W_key", "att.W_value", "att.out_proj", "ff.fc1", "ff.fc2"] * 2
    assert sum(p.numel() for p in lora_parameters(model)) == 2 * 2 * (4 * 64 + 2 * 160)


def test_the_edges_of_the_lora_settings():
    x = torch.randint(0, 97, (2, 9))
    model = small()
    before = model(x)
    add_lora(model, 32)  # the model's width: still allowed (only above it is refused)
    assert has_lora(model) and torch.equal(model(x), before)
    # targets are checked with no rank too, and in a config: a typo is an error, not ignored
    with pytest.raises(UserError, match="LoRA targets must be a comma list"):
        add_lora(small(), 0, targets="head")
    with pytest.raises(UserError, match="LoRA targets must be a comma list"):
        GPTConfig(lora_targets="attn,head")
    # a model in float64 gets its update in float64
    double = add_lora(small().double(), 2)
    assert {p.dtype for p in double.parameters()} == {torch.float64}


def test_apply_lora_reports_only_lora_and_the_flags_default_to_none(tmp_path, capsys):
    from argparse import Namespace

    from tritongpt.cli import build_parser, main
    from tritongpt.commands import apply_lora

    apply_lora(small(), Namespace(lora_rank=0, lora_alpha=16.0, lora_targets="attn,mlp"))
    assert capsys.readouterr().err == ""  # full fine-tuning: no LoRA line
    model = apply_lora(small(), Namespace(lora_rank=2, lora_alpha=4.0, lora_targets="mlp,attn"))
    assert "LoRA rank 2 (alpha 4) on attn,mlp: 2,304 of" in capsys.readouterr().err
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2304
    for argv in (["sft", "--init", "x"], ["dpo"]):
        a = build_parser().parse_args(argv)
        assert (a.lora_rank, a.lora_alpha, a.lora_targets) == (0, 16.0, None), argv  # None: apply_lora's choice
    model = apply_lora(small(), Namespace(lora_rank=2, lora_alpha=4.0, lora_targets=None))
    assert model.config.lora_targets == "attn,mlp" and "experts" not in capsys.readouterr().err
    # a bad LoRA flag is named before any model loads (the --init here does not exist)
    for cmd in ("sft", "dpo"):
        assert main([cmd, "--init", str(tmp_path / "none"), "--lora-alpha", "0", "--out-dir", str(tmp_path / cmd)]) == 2
        assert "--lora-alpha must be a positive number" in capsys.readouterr().err


def test_numpy_settings_are_stored_as_plain_numbers_and_a_plain_checkpoint_has_no_lora_line(tmp_path, capsys):
    import numpy as np

    from tritongpt.cli import main

    model = add_lora(small(), np.int64(2), np.int64(8))
    assert (type(model.config.lora_rank), type(model.config.lora_alpha)) == (int, float)
    model.save(tmp_path / "m.safetensors")  # the config is JSON: a numpy integer would not save
    assert GPTModel.load(tmp_path / "m.safetensors").config.lora_alpha == 8.0
    cfg = GPTConfig(lora_rank=np.int64(3), lora_alpha=np.int32(4))
    assert (type(cfg.lora_rank), type(cfg.lora_alpha)) == (int, float)
    small().save(tmp_path / "plain.safetensors")
    assert main(["info", "--weights", str(tmp_path / "plain.safetensors")]) == 0
    assert "\nlora " not in capsys.readouterr().out


def test_merging_a_model_without_biases_adds_none():
    model = with_trained_lora(small(seed=10, bias=False))
    x = torch.randint(0, 97, (2, 7))
    out = model(x)
    merged = merge_lora(model)
    assert set(merged.state_dict()) == set(small(bias=False).state_dict())  # no bias appears
    assert torch.equal(merged(x), out)


# -- a LoRA run's update as a peft adapter (export --adapter) -------------------------------------
@pytest.mark.parametrize("targets", ["attn,mlp", "attn", "mlp"])
def test_the_adapter_is_each_hugging_face_layers_lora_update(targets):
    """Without peft: each adapted Conv1D weight of the merged model is the base's plus
    scale (B A)^T of the adapter's tensors (c_attn's rank 3r, alpha 3 alpha); the others are the
    base's."""
    from tritongpt.model.lora import strip_lora
    from tritongpt.train.gpt2_weights import _hf_tensors, peft_adapter

    model = with_trained_lora(small(seed=11), rank=3, alpha=5.0, targets=targets)
    tensors, config = peft_adapter(model, "base")
    base, merged = _hf_tensors(strip_lora(copy.deepcopy(model))), _hf_tensors(merge_lora(copy.deepcopy(model)))
    adapted = set()
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        b = tensors[module.join(("base_model.model.", ".lora_B.weight"))]
        qkv = module.endswith("c_attn")
        r, alpha = config["rank_pattern"]["c_attn"] if qkv else config["r"], \
            config["alpha_pattern"]["c_attn"] if qkv else config["lora_alpha"]
        assert a.shape[0] == b.shape[1] == r == (9 if qkv else 3)
        assert_close_rel(base[module + ".weight"] + (alpha / r) * (b @ a).t(), merged[module + ".weight"], 1e-6)
        adapted.add(module + ".weight")
    assert len(adapted) == 2 * len(config["target_modules"]) and adapted
    assert all(m.split(".", 1)[1] in {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"} for m in
               (k.removeprefix("transformer.h.").removesuffix(".weight") for k in adapted))
    for key in set(base) - adapted:  # biases, LayerNorms, embeddings and the untargeted matrices
        assert torch.equal(base[key], merged[key]), key
    assert bool(config["rank_pattern"]) == ("attn" in targets) and config["base_model_name_or_path"] == "base"
    assert config["fan_in_fan_out"] is True and config["lora_alpha"] == 5 and isinstance(config["lora_alpha"], int)
    with pytest.raises(UserError, match="no LoRA update"):
        peft_adapter(small(), "base")


@pytest.mark.parametrize("overrides,targets", [({}, "attn,mlp"),
                                               ({"bias": False, "tie_weights": False, "vocab_multiple": 64}, "attn")],
                         ids=["gpt2-layout", "no-bias-untied-padded"])
def test_peft_puts_the_exported_adapter_on_its_base_with_the_runs_logits(tmp_path, capsys, overrides, targets):
    """peft (PeftModel on the base folder, and AutoPeftModelForCausalLM through the adapter's
    base_model_name_or_path) gives the LoRA model's logits; merge_and_unload gives its merged
    weights; the adapter folder's tokenizer gives our ids."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from tritongpt.cli import main
    from tritongpt.model.lora import strip_lora
    from tritongpt.train.gpt2_weights import _hf_tensors, export_gpt2
    from tritongpt.train.tokenizer import get_tokenizer

    model = with_trained_lora(small(seed=12, vocab_size=4096, context_length=40, **overrides), targets=targets).eval()
    model.save(tmp_path / "lora.safetensors")
    export_gpt2(strip_lora(copy.deepcopy(model)), tmp_path / "base")
    out = tmp_path / "adapter"
    assert main(["export", str(tmp_path / "lora.safetensors"), "--out", str(out), "--adapter",
                 "--base", str(tmp_path / "base"), "--tokenizer", "default"]) == 0
    assert f"for the base {tmp_path / 'base'}" in capsys.readouterr().out
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()
    idx = torch.randint(0, 4096, (2, 23))
    with torch.no_grad():  # in float64: a random model's fp32 logits carry ~1e-5 of rounding either way
        ours = copy.deepcopy(model).double()(idx)
        base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base")
        on_base = peft.PeftModel.from_pretrained(base, out).eval()
        max_abs, rel = report(copy.deepcopy(on_base).double()(idx).logits, ours)
        print(f"peft logits (float64) max_abs={max_abs:.2e} rel={rel:.2e}")
        # float64 rounding only (measured ~5e-16): a scale or tensor off by an fp32 rounding (1e-7) fails here
        assert rel <= 1e-12
        auto = peft.AutoPeftModelForCausalLM.from_pretrained(out).eval()
        assert report(auto.double()(idx).logits, ours)[1] <= 1e-12
        unloaded = {k: v for k, v in on_base.merge_and_unload().state_dict().items()}
        for key, value in _hf_tensors(merge_lora(copy.deepcopy(model))).items():
            assert_close_rel(unloaded[key], value, 1e-6)
    text = "LoRA adapters, exported: 42 ids."
    assert transformers.AutoTokenizer.from_pretrained(out).encode(text) == get_tokenizer("default").encode(text)


def test_an_sft_lora_run_exports_its_adapter_for_its_init(tmp_path, capsys, monkeypatch):
    """Without --base the adapter goes on the run's --init, a Hugging Face folder it is checked
    against; peft on that folder gives what `tritongpt generate` would use (the merged run). A
    relative --init is saved absolute: the export may run from another folder."""
    from tritongpt.cli import main
    from tritongpt.train.gpt2_weights import export_gpt2, load_checkpoint

    export_gpt2(small(seed=13, vocab_size=4096, context_length=128), tmp_path / "init")
    run = tmp_path / "sft"
    monkeypatch.chdir(tmp_path)
    assert main(["sft", "--init", "init/model.safetensors", "--tokenizer", "default",
                 "--n-train", "16", "--n-eval", "4", "--max-steps", "2", "--batch-size", "4", "--lr", "1e-2",
                 "--lora-rank", "2", "--out-dir", str(run), "--device", "cpu", "--eval-every", "0",
                 "--sample-every", "0", "--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    monkeypatch.chdir(run)
    assert main(["export", str(run), "--out", str(tmp_path / "adapter"), "--adapter"]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    # the file's folder, which peft loads
    assert config["base_model_name_or_path"] == str((tmp_path / "init").resolve())
    assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (2, 16, {"c_attn": 6})
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    idx = torch.randint(0, 4096, (1, 11))
    with torch.no_grad():
        base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "init")
        theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval().double()(idx).logits
        assert report(theirs, load_checkpoint(run).double()(idx))[1] <= 1e-5


def test_an_adapter_needs_a_lora_run_and_its_own_base(tmp_path, capsys, monkeypatch):
    from tritongpt.cli import main
    from tritongpt.model.lora import strip_lora
    from tritongpt.train.gpt2_weights import adapter_base, export_gpt2

    model = with_trained_lora(small(seed=14, vocab_size=4096))
    model.save(tmp_path / "lora.safetensors")
    small(seed=15, vocab_size=4096).save(tmp_path / "plain.safetensors")
    export_gpt2(small(seed=16, vocab_size=4096), tmp_path / "other")
    frozen = strip_lora(copy.deepcopy(model))
    export_gpt2(frozen, tmp_path / "base")
    (tmp_path / "run" / "ckpt-0000001").mkdir(parents=True)
    frozen.save(tmp_path / "run" / "ckpt-0000001" / "model.safetensors")
    out = ["--out", str(tmp_path / "adapter"), "--tokenizer", "default"]
    lora = [str(tmp_path / "lora.safetensors"), *out]
    for argv, said in (([*lora, "--base", str(tmp_path / "base")], "--base names the model an --adapter goes on"),
                       ([str(tmp_path / "plain.safetensors"), *out, "--adapter", "--base", str(tmp_path / "base")],
                        "plain.safetensors holds no LoRA update"),
                       ([*lora, "--adapter"], "name the model it goes on with --base"),
                       ([*lora, "--adapter", "--base", str(tmp_path / "other")],
                        "is not the model this LoRA update was trained on: its transformer.wte.weight differs by"),
                       ([*lora, "--adapter", "--base", str(tmp_path / "plain.safetensors")],
                        "is not a Hugging Face GPT-2 folder .* export it"),
                       ([*lora, "--adapter", "--base", str(tmp_path / "run")],  # a tritongpt run folder
                        "is not a Hugging Face GPT-2 folder .* export it"),
                       ([*lora, "--adapter", "--base", str(tmp_path / "none")], "no such Hugging Face GPT-2 folder")):
        assert main(["export", *argv]) == 2, argv
        assert re.search(said, capsys.readouterr().err), said
        assert not (tmp_path / "adapter").exists()  # refused before anything is written
    # a Hub name: compared when the local cache holds it, named as its repository either way
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hub, "try_to_load_from_cache", lambda repo, name: None)
    assert adapter_base(None, "gpt2", frozen) == "openai-community/gpt2"
    assert "not in the local Hub cache: not compared" in capsys.readouterr().err
    monkeypatch.setattr(hub, "try_to_load_from_cache", lambda repo, name: str(tmp_path / "other" / "model.safetensors"))
    with pytest.raises(UserError, match="the run's --init gpt2-small is not the model"):
        adapter_base(None, "gpt2-small", frozen)
    monkeypatch.setattr(hub, "try_to_load_from_cache", lambda repo, name: str(tmp_path / "base" / "model.safetensors"))
    assert adapter_base("openai-community/gpt2", "elsewhere", frozen) == "openai-community/gpt2"


def test_a_soft_capped_lora_run_keeps_its_cap_merged_and_exports_no_adapter(tmp_path, capsys):
    """merge_lora and strip_lora keep GPTConfig.logit_softcap (generate uses the merged model). An
    adapter would go on Hugging Face's GPT-2, which has no cap: `export --adapter` refuses it before
    an earlier export's files are removed, even with a --base its frozen weights match."""
    from tritongpt.cli import main
    from tritongpt.model.lora import strip_lora
    from tritongpt.train.gpt2_weights import export_gpt2, load_checkpoint

    model = with_trained_lora(small(seed=17, vocab_size=4096, logit_softcap=15.0))
    model.save(tmp_path / "lora.safetensors")
    assert merge_lora(copy.deepcopy(model)).config.logit_softcap == 15.0
    assert load_checkpoint(tmp_path / "lora.safetensors").config.logit_softcap == 15.0
    frozen = strip_lora(copy.deepcopy(model))
    assert frozen.config.logit_softcap == 15.0
    frozen.config.logit_softcap = 0.0  # the same weights, uncapped: a base the adapter would match
    for folder in ("base", "hf"):
        export_gpt2(frozen, tmp_path / folder)
    before = {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()}
    assert main(["export", str(tmp_path / "lora.safetensors"), "--out", str(tmp_path / "hf"), "--adapter",
                 "--base", str(tmp_path / "base"), "--tokenizer", "default", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "soft-caps its logits (logit_softcap 15)" in err and "cannot be exported as a peft adapter" in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()} == before


def test_an_adapter_names_a_relative_base_folder_by_its_full_path(tmp_path, monkeypatch, capsys):
    """`export --adapter --base hf/base` wrote 'hf/base' as base_model_name_or_path, which peft
    and tritongpt then looked for relative to wherever the adapter was loaded from, not where it
    was exported: from any other folder the adapter did not load. The folder's full path is written."""
    from tritongpt.cli import main
    from tritongpt.model.lora import strip_lora
    from tritongpt.train.gpt2_weights import export_gpt2, load_checkpoint

    model = with_trained_lora(small(seed=17, vocab_size=4096)).eval()
    model.save(tmp_path / "lora.safetensors")
    export_gpt2(strip_lora(copy.deepcopy(model)), tmp_path / "hf" / "base")
    monkeypatch.chdir(tmp_path)
    assert main(["export", "lora.safetensors", "--out", "adapter", "--adapter", "--base", "hf/base",
                 "--tokenizer", "default"]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "hf" / "base")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    idx = torch.randint(0, 4096, (1, 9))
    with torch.no_grad():
        assert_close_rel(load_checkpoint(tmp_path / "adapter")(idx), merge_lora(copy.deepcopy(model))(idx), 1e-5)


def test_a_base_is_refused_unless_it_is_exactly_the_runs_frozen_model(tmp_path):
    """The base folder must compute the frozen model: every tensor equal to the last bit (one
    rounding step in the last layer is another model), no LM head of its own where the run ties
    it to the embedding (or none where the run has one), the same heads (config.json only)."""
    from safetensors.torch import load_file, save_file

    from tritongpt.model.lora import strip_lora
    from tritongpt.train.gpt2_weights import adapter_base, export_gpt2

    def base_like(frozen, name, edit=None, config=None):
        """frozen exported as a Hugging Face folder, its tensors and config.json then edited."""
        folder = tmp_path / name
        export_gpt2(frozen, folder)
        tensors = load_file(folder / "model.safetensors")
        save_file(edit(tensors) if edit else tensors, folder / "model.safetensors", metadata={"format": "pt"})
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, **(config or {})}))
        return str(folder)

    tied = strip_lora(copy.deepcopy(with_trained_lora(small(seed=20)))).eval()
    untied = strip_lora(copy.deepcopy(with_trained_lora(small(seed=21, tie_weights=False)))).eval()
    assert adapter_base(base_like(tied, "same"), None, tied) == str(tmp_path / "same")  # the edits below are all

    def one_step(t):  # the last layer's MLP output matrix, one element up by one float32 step
        w = t["transformer.h.1.mlp.c_proj.weight"]
        w.view(-1)[7] = torch.nextafter(w.view(-1)[7], torch.tensor(float("inf")))
        return t

    for frozen, base, said in (
            (tied, base_like(tied, "ulp", one_step), r"its transformer.h.1.mlp.c_proj.weight differs by up to \d"),
            (untied, base_like(untied, "no-head", lambda t: {k: v for k, v in t.items() if k != "lm_head.weight"},
                               {"tie_word_embeddings": True}), "its lm_head.weight has no such tensor"),
            (tied, base_like(tied, "own-head", lambda t: {**t, "lm_head.weight": torch.randn(97, 32)},
                             {"tie_word_embeddings": False}), "it has lm_head.weight, which the run's model has not"),
            (tied, base_like(tied, "heads", config={"n_head": 4}), "it has 4 heads, not 2")):
        with pytest.raises(UserError, match="--base .* is not the model this LoRA update was trained on: " + said):
            adapter_base(base, None, frozen)


def test_a_base_peft_cannot_load_is_refused_with_the_export_that_makes_one(tmp_path):
    """peft loads the adapter onto GPT2LMHeadModel.from_pretrained(base): a folder with config.json
    and a Hugging Face model.safetensors. Without config.json, a tritongpt checkpoint, or a
    PyTorch .bin, --base is refused with the export that makes one."""
    from tritongpt.model.lora import strip_lora
    from tritongpt.train.gpt2_weights import _hf_tensors, adapter_base, export_gpt2

    frozen = strip_lora(copy.deepcopy(with_trained_lora(small(seed=22)))).eval()
    export_gpt2(frozen, tmp_path / "no-config")
    (tmp_path / "no-config" / "config.json").unlink()
    export_gpt2(frozen, tmp_path / "ours")  # its config.json, beside our own checkpoint format
    frozen.save(tmp_path / "ours" / "model.safetensors")
    export_gpt2(frozen, tmp_path / "bin")
    torch.save(_hf_tensors(frozen), tmp_path / "bin" / "pytorch_model.bin")
    for base in (tmp_path / "no-config", tmp_path / "ours", tmp_path / "bin" / "pytorch_model.bin"):
        with pytest.raises(UserError, match=f"--base {re.escape(str(base))} is not a Hugging Face GPT-2 folder "
                                            r"\(config.json and model.safetensors\).* export it"):
            adapter_base(str(base), None, frozen)

# -- and back: a peft adapter folder as --weights / --init -------------------------------------------
def _base_and_peft_adapter(tmp_path, **lora):
    """A random GPT-2 folder, and an adapter for it made by peft itself (B random: not a no-op)."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from tritongpt.train.gpt2_weights import export_gpt2

    export_gpt2(small(seed=17, vocab_size=4096, context_length=128), tmp_path / "base")
    torch.manual_seed(18)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    config = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj", "c_fc"],
                                "fan_in_fan_out": True, "init_lora_weights": False, **lora})
    model = peft.get_peft_model(hf, config).eval()
    return model


@pytest.mark.parametrize("lora,safe", [({}, True), ({"use_rslora": True, "rank_pattern": {"c_fc": 2},
                                                     "alpha_pattern": {"attn.c_proj": 3}}, False),
                                       ({"target_modules": ["c_attn"]}, True)],
                         ids=["plain", "rslora-patterns-bin", "c_attn-only"])
def test_a_peft_adapter_folder_loads_merged_into_its_base(tmp_path, capsys, lora, safe):
    """An adapter peft saved (safetensors or .bin; rsLoRA's scale, per-module ranks and alphas)
    is read as its base with the update merged: peft's logits; `generate`, `info` and `--init`
    take the folder."""
    from tritongpt.cli import main
    from tritongpt.train.gpt2_weights import load_checkpoint

    peft_model = _base_and_peft_adapter(tmp_path, **lora)
    peft_model.save_pretrained(tmp_path / "adapter", safe_serialization=safe)
    assert (tmp_path / "adapter" / ("adapter_model.safetensors" if safe else "adapter_model.bin")).is_file()
    idx = torch.randint(0, 4096, (2, 19))
    with torch.no_grad():  # float64: the merge's own fp32 rounding (~1e-7 of each weight) is what shows
        ours, theirs = load_checkpoint(tmp_path / "adapter").double()(idx), peft_model.double()(idx).logits
        base = load_checkpoint(tmp_path / "base").double()(idx)
    max_abs, rel = report(ours, theirs)
    print(f"adapter merged (float64) max_abs={max_abs:.2e} rel={rel:.2e}")
    assert rel <= 1e-5 and report(base, theirs)[1] > 1e-2  # the update is there, and counts
    assert main(["info", "--weights", str(tmp_path / "adapter")]) == 0
    assert f"adapter      a peft LoRA adapter on {tmp_path / 'base'}: used merged" in capsys.readouterr().out
    assert main(["generate", "--weights", str(tmp_path / "adapter"), "--tokenizer", "default", "--prompt", "Hi",
                 "--max-new-tokens", "3", "--device", "cpu"]) == 0
    assert main(["sft", "--init", str(tmp_path / "adapter" / ("adapter_model." + ("safetensors" if safe else "bin"))),
                 "--tokenizer", "default", "--n-train", "8", "--n-eval", "2", "--max-steps", "1", "--batch-size", "4",
                 "--out-dir", str(tmp_path / "sft"), "--device", "cpu", "--eval-every", "0", "--sample-every", "0",
                 "--max-new-tokens", "2"]) == 0


# "_proj" below is no module's key, on purpose
@pytest.mark.filterwarnings("ignore:The following alpha_pattern keys did not match")
def test_rank_and_alpha_patterns_and_files_are_read_as_peft_reads_them(tmp_path):
    """peft takes a module's rank and alpha from the first pattern key that ends its name at a
    dot (so "_proj" is no key of c_proj's), and an adapter_model.safetensors before a .bin beside
    it (an earlier save's): ours merges what PeftModel.from_pretrained computes."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from tritongpt.train.gpt2_weights import load_checkpoint

    # attn.c_proj and mlp.c_proj both take "c_proj"'s alpha: the first key (in the file's order) that matches
    peft_model = _base_and_peft_adapter(tmp_path, alpha_pattern={"_proj": 1, "c_proj": 3, "mlp.c_proj": 5})
    peft_model.save_pretrained(tmp_path / "adapter")
    stale = {k: 3 * v for k, v in load_file(tmp_path / "adapter" / "adapter_model.safetensors").items()}
    torch.save(stale, tmp_path / "adapter" / "adapter_model.bin")
    idx = torch.randint(0, 4096, (2, 17))
    with torch.no_grad():
        base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base")
        theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval().double()(idx).logits
        assert report(peft_model.double()(idx).logits, theirs)[1] <= 1e-12  # peft itself: the .bin unread
        ours = load_checkpoint(tmp_path / "adapter").double()(idx)
    assert report(ours, theirs)[1] <= 1e-5


def test_an_adapters_base_is_a_gpt2_name_or_repository_or_the_base_passed(tmp_path, monkeypatch):
    """base_model_name_or_path as peft writes a Hub base ("openai-community/gpt2") or as a user
    does ("gpt2-medium") is fetched by its GPT-2 name; load_peft_adapter's `base` wins over it."""
    from tritongpt.train import gpt2_weights
    from tritongpt.train.gpt2_weights import HUB_REPOS, load_checkpoint, load_peft_adapter

    _base_and_peft_adapter(tmp_path).save_pretrained(tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    fetched = []

    def pretrained(name="gpt2-small", cache_dir=None):  # the download, offline: the base folder's model
        if name not in HUB_REPOS:
            raise UserError(f"unknown GPT-2 model {name!r}")
        fetched.append(HUB_REPOS[name])
        return load_checkpoint(tmp_path / "base")

    monkeypatch.setattr(gpt2_weights, "load_gpt2_pretrained", pretrained)
    idx = torch.randint(0, 4096, (1, 9))
    with torch.no_grad():
        want = load_checkpoint(tmp_path / "adapter")(idx)
        for name, repo in (("openai-community/gpt2", "openai-community/gpt2"),
                           ("gpt2-medium", "openai-community/gpt2-medium"),
                           ("openai-community/gpt2-xl", "openai-community/gpt2-xl")):
            config_file.write_text(json.dumps({**config, "base_model_name_or_path": name}))
            assert torch.equal(load_checkpoint(tmp_path / "adapter")(idx), want) and fetched.pop() == repo
        config_file.write_text(json.dumps({**config, "base_model_name_or_path": "nowhere"}))
        assert torch.equal(load_peft_adapter(tmp_path / "adapter", str(tmp_path / "base"))(idx), want)
    assert not fetched


def test_our_adapter_comes_back_as_the_lora_run(tmp_path, capsys):
    from tritongpt.cli import main
    from tritongpt.model.lora import strip_lora
    from tritongpt.train.gpt2_weights import export_gpt2, load_checkpoint

    model = with_trained_lora(small(seed=19, vocab_size=4096, context_length=128)).eval()
    model.save(tmp_path / "lora.safetensors")
    export_gpt2(strip_lora(copy.deepcopy(model)), tmp_path / "base")
    assert main(["export", str(tmp_path / "lora.safetensors"), "--out", str(tmp_path / "adapter"), "--adapter",
                 "--base", str(tmp_path / "base"), "--tokenizer", "default"]) == 0
    idx = torch.randint(0, 4096, (2, 13))
    with torch.no_grad():
        back = load_checkpoint(tmp_path / "adapter").double()(idx)
        assert report(back, copy.deepcopy(model).double()(idx))[1] <= 1e-5
    # a run whose --init is an adapter: its own adapter goes on that adapter merged, exported first
    capsys.readouterr()
    assert main(["sft", "--init", str(tmp_path / "adapter"), "--tokenizer", "default", "--n-train", "8",
                 "--n-eval", "2", "--max-steps", "1", "--batch-size", "4", "--lora-rank", "2", "--out-dir",
                 str(tmp_path / "sft"), "--device", "cpu", "--eval-every", "0", "--sample-every", "0",
                 "--max-new-tokens", "2"]) == 0
    assert main(["export", str(tmp_path / "sft"), "--out", str(tmp_path / "again"), "--adapter"]) == 2
    assert "is not a Hugging Face GPT-2 folder" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    assert main(["export", str(tmp_path / "sft"), "--out", str(tmp_path / "again"), "--adapter",
                 "--base", str(tmp_path / "merged")]) == 0


def test_an_adapter_that_is_not_plain_gpt2_lora_is_refused_by_name(tmp_path):
    from tritongpt.train.gpt2_weights import load_checkpoint

    peft_model = _base_and_peft_adapter(tmp_path)
    peft_model.save_pretrained(tmp_path / "adapter")
    folder = tmp_path / "adapter"
    good = json.loads((folder / "adapter_config.json").read_text())
    from safetensors.torch import load_file, save_file
    tensors = load_file(folder / "adapter_model.safetensors")

    def refused(said, config=None, weights=None):
        (folder / "adapter_config.json").write_text(json.dumps({**good, **(config or {})}))
        save_file(weights if weights is not None else tensors, folder / "adapter_model.safetensors")
        with pytest.raises(UserError, match=said):
            load_checkpoint(folder)

    refused("use_dora is True; only a plain LoRA adapter", {"use_dora": True})
    refused("modules_to_save is \\['score'\\]", {"modules_to_save": ["score"]})
    refused("peft_type is 'IA3'", {"peft_type": "IA3"})
    refused("bias is 'all'", {"bias": "all"})
    refused("base_model_name_or_path 'nowhere' is neither a folder", {"base_model_name_or_path": "nowhere"})
    key = next(k for k in tensors if k.endswith("mlp.c_fc.lora_A.weight"))
    refused("tensor 'base_model.model.lm_head.lora_A.weight' is not a LoRA A or B",
            weights={**tensors, "base_model.model.lm_head.lora_A.weight": tensors[key].clone()})
    refused(r"h.0.mlp.c_fc: lora_A \(4, 31\) and lora_B \(128, 4\) do not make an update",
            weights={**tensors, key.replace(".1.", ".0."): tensors[key][:, :31].contiguous()})
    refused("lora_B is missing",
            weights={k: v for k, v in tensors.items() if not k.endswith("h.1.mlp.c_fc.lora_B.weight")})
    # shapes that make no update of the base, and values that make no model: refused, not a torch error or NaN
    deeper = {k.replace(".h.1.", ".h.5."): v.clone() for k, v in tensors.items() if ".h.1." in k}
    refused("h.5.attn.c_attn: the base has only 2 layers", weights={**tensors, **deeper})
    b = key.replace("lora_A", "lora_B")
    refused(r"h.0.mlp.c_fc: lora_A \(4, 32\) and lora_B \(128, 3\) do not make",
            weights={**tensors, b: tensors[b][:, :3].contiguous()})
    qkv_b = next(k for k in tensors if k.endswith("h.0.attn.c_attn.lora_B.weight"))
    refused(r"h.0.attn.c_attn: lora_A \(4, 32\) and lora_B \(95, 4\) do not make an update of its \[32, 96\]",
            weights={**tensors, qkv_b: tensors[qkv_b][:95].contiguous()})
    refused("tensor trf_blocks.0.ff.fc1.weight holds NaN",
            weights={**tensors, b: torch.full_like(tensors[b], torch.nan)})
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match="no checkpoint found|without adapter_model"):
        load_checkpoint(folder)
