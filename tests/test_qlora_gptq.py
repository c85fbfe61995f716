"""QLoRA on a pre-quantized base: LoRA updates trained beside a GPTQ or AWQ Hugging Face folder's own 4-bit (or kept
8-bit) matrices (train/hf_quant.py; `sft --init FOLDER --lora-rank R`, commands.folder_base), as peft trains on a
GPTQModel or AutoAWQ model. The reference: the same LoRA on the float model of the folder's matrices dequantized by
the test's own rules (test_hf_quantized.py's writers), independent of our unpacker."""
import json

import pytest
import torch

from tritongpt.cli import main
from tritongpt.model.lora import add_lora, has_lora
from tritongpt.model.quant import QuantLinear
from tritongpt.train.gpt2_weights import load_checkpoint
from test_hf_quantized import V, coded_folder, quantized_folder
from test_qlora import lora_grads, rel, sft_argv

pytestmark = pytest.mark.usefixtures("one_thread")

INT8 = {"quant_method": "gptq", "bits": 8, "group_size": -1, "sym": True, "desc_act": False}
INT8_GROUPS = {**INT8, "group_size": 32}  # (Qwen's *-GPTQ-Int8 layout: Int8Linear with group scales)


def with_updates(model, twin):
    """LoRA of rank 4 on both, the same random A and B (B starts at 0: no update to compare otherwise)."""
    add_lora(model, 4, 8.0)
    add_lora(twin, 4, 8.0)
    gen = torch.Generator().manual_seed(2)
    ours = {n.replace(".lora.", "."): p for n, p in model.named_parameters() if p.requires_grad}
    theirs = {n.replace(".parametrizations.weight.0", ""): p for n, p in twin.named_parameters() if p.requires_grad}
    assert sorted(ours) == sorted(theirs) and len(ours) == 2 * 7  # (q, k, v, o, gate, up, down: A and B each)
    with torch.no_grad():
        for name, p in ours.items():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            theirs[name].copy_(p)
    return model, twin


@pytest.mark.parametrize("kind", ["gptq-v1-sym", "awq-gemm", "gptq-v1-act-order", "gptq8-sym-int8",
                                  "gptq8-groups-int8"])
def test_lora_on_a_gptq_or_awq_folder_is_lora_on_its_dequantized_weights_forward_and_backward(tmp_path, kind):
    """Loss and every A and B gradient of LoRA on the loaded folder (the updates beside its Int4Linear / Int8Linear
    matmuls, act-order's gather included) equal LoRA's on the float model of its dequantized matrices, on the
    reference path and on the Triton path (its quantized matmul kernels among them)."""
    folder, twin = (coded_folder(tmp_path, INT8_GROUPS if "groups" in kind else INT8) if kind.endswith("int8") else
                    quantized_folder(tmp_path, kind))
    loaded = load_checkpoint(folder, quantized_ok=True)
    assert loaded.quantized == ("int8" if kind.endswith("int8") else "int4")
    assert loaded.quantized_group_size == (32 if "groups" in kind else None if kind.endswith("int8") else 32)
    model, twin = with_updates(loaded, twin.train())
    idx = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))
    want = twin(idx, targets=idx)
    want.backward()
    ref = lora_grads(twin)
    for kernels in ("reference", "triton"):  # (triton: the quantized matmuls' Triton kernels, forward and dx)
        model.set_kernels(kernels).train()
        loss = model(idx, targets=idx)
        loss.backward()
        assert abs(loss.item() - want.item()) < 1e-5 * want.item(), kernels
        got = lora_grads(model)
        assert sorted(got) == sorted(ref)
        for name, g in got.items():
            assert g is not None and g.abs().sum() > 0, (kernels, name)
            assert rel(g, ref[name]) < 1e-5, (kernels, name, rel(g, ref[name]))
        model.zero_grad()
    # only the updates train: the folder's matrices are buffers
    assert all(n.endswith(("lora_A", "lora_B")) for n, p in model.named_parameters() if p.requires_grad)


def base_buffers(model) -> dict:
    return {f"{n}.{b}": t for n, m in model.named_modules() if isinstance(m, QuantLinear)
            for b, t in m.named_buffers(recurse=False)}


@pytest.fixture
def gptq_llama(tmp_path):
    """A tiny GPTQ Llama folder with our tokenizer (sft needs one of its vocabulary), and its float twin."""
    from tritongpt.train.tokenizer import default_tokenizer, save_run_tokenizer

    folder, twin = quantized_folder(tmp_path, "gptq-v1-sym", vocab=4096)
    save_run_tokenizer(default_tokenizer(), folder)
    return folder, twin


def test_sft_trains_lora_on_a_gptq_folders_own_base_resumes_on_it_and_exports_merged(gptq_llama, tmp_path, capsys):
    from tritongpt.train import common

    folder, _ = gptq_llama
    out = tmp_path / "run"
    assert main(sft_argv(folder, out, "--max-steps", "4", "--lora-rank", "4")) == 0
    assert "QLoRA on --init's own GPTQ quantization: the base's 7 matrices int4 (group 32)" in capsys.readouterr().err
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0]
    state = common.load_state(common.resume_checkpoint(out, "latest"))
    assert (state["args"]["init_quantized"], state["args"]["quantize"]) == ("gptq int4", None)
    model = load_checkpoint(out, quantized_ok=True)
    assert model.quantized == "int4" and has_lora(model)
    # the frozen base is the folder's own matrices, bit for bit
    want = base_buffers(load_checkpoint(folder, quantized_ok=True))
    got = base_buffers(model)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    capsys.readouterr()
    assert main(["info", "--weights", str(out)]) == 0
    assert "(QLoRA: --lora-rank on its --init folder's own GPTQ INT4 quantization)" in capsys.readouterr().out
    # generate runs the checkpoint unmerged; export writes the float model it computes (dequantized W + scale B A)
    assert main(["generate", "--weights", str(out), "--prompt", "Say hi.", "--device", "cpu", "--max-new-tokens", "2",
                 "--temperature", "0"]) == 0
    assert main(["export", str(out), "--out", str(tmp_path / "hf")]) == 0
    idx = torch.randint(0, 4096, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel(load_checkpoint(tmp_path / "hf")(idx), model.eval()(idx)) < 1e-5
    capsys.readouterr()
    # its peft adapter goes on the folder (peft's logits on it: tests/test_llama_adapter.py)
    assert main(["export", str(out), "--out", str(tmp_path / "adapter"), "--adapter"]) == 0
    assert "its GPTQ Linears: the run's frozen matrices" in capsys.readouterr().err
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(folder)
    # a resume re-loads the folder, finds it the checkpoint's base, and goes on
    assert main(sft_argv(folder, out, "--max-steps", "5", "--lora-rank", "4", "--resume")) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r][-2:] == [4, 5]


def test_a_resume_on_another_folder_or_on_a_float_init_is_refused_by_name(gptq_llama, tmp_path, capsys):
    folder, _ = gptq_llama
    other, _ = quantized_folder(tmp_path, "gptq-v1-sym", seed=1, vocab=4096)  # (the same shapes, other weights)
    float_twin = tmp_path / "gptq-v1-sym-float"
    out = tmp_path / "run"
    assert main(sft_argv(folder, out, "--max-steps", "1", "--lora-rank", "4")) == 0
    capsys.readouterr()
    assert main(sft_argv(other, out, "--max-steps", "2", "--lora-rank", "4", "--resume", "--tokenizer",
                         str(folder / "tokenizer.json"))) == 2
    err = capsys.readouterr().err
    assert f"--init {other} is not the base" in err and f"resume with the run's own --init {folder}" in err
    assert main(sft_argv(float_twin, out, "--max-steps", "2", "--lora-rank", "4", "--resume", "--tokenizer",
                         str(folder / "tokenizer.json"))) == 2
    assert "'s base is its --init folder's own GPTQ INT4 quantization (this run: float)" in capsys.readouterr().err


@pytest.mark.parametrize("flags,said", [
    ([], "its matrices read as int4: they train only through LoRA updates beside them (QLoRA on its own "
         "quantization): pass --lora-rank"),
    (["--lora-rank", "4", "--quantize", "int4"], "is GPTQ-quantized already"),
])
def test_sft_on_a_gptq_folder_refuses_full_fine_tuning_and_quantize_by_name(gptq_llama, tmp_path, capsys, flags,
                                                                             said):
    folder, _ = gptq_llama
    assert main(sft_argv(folder, tmp_path / "bad", "--max-steps", "1", *flags)) == 2
    assert said in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def init_args(folder, lora_rank=0, quantize=None, vocab_multiple=None):
    import types

    return types.SimpleNamespace(init=str(folder), lora_rank=lora_rank, quantize=quantize,
                                 vocab_multiple=vocab_multiple)


@pytest.mark.parametrize("kind", ["gptq-ragged", "bnb8-skip-down"])
def test_a_folder_the_config_calls_quantized_but_that_loads_float_is_fully_fine_tuned(tmp_path, capsys, kind):
    """The config says 4-bit GPTQ or bitsandbytes 8-bit, but the load reads it as a float model (groups of 16 whose
    ragged last one of 8 no int4 group size divides; a linear of the blocks left float by llm_int8_skip_modules):
    full fine-tuning, --quantize and --vocab-multiple take it as the float model it is, not refused as quantized."""
    from test_hf_bnb import BNB8, bnb_folder
    from test_hf_quantized import with_quantization
    from tritongpt.train.sft import load_init_base

    if kind == "gptq-ragged":
        folder, _ = quantized_folder(tmp_path, "gptq-v1-ragged-dequantized")
    else:
        folder, _ = bnb_folder(tmp_path, "int8-llama", keep_float=("down_proj",))
        with_quantization(folder, {**BNB8, "llm_int8_skip_modules": ["lm_head", "down_proj"]})
    for args in (init_args(folder), init_args(folder, 4, "int4"), init_args(folder, vocab_multiple=64)):
        model = load_init_base(args)
        assert model.init_quantized is None and not getattr(model, "quantized", None)
        assert not hasattr(model, "base_folder")
        assert any(p.requires_grad and p.dim() == 2 for p in model.trf_blocks.parameters())  # (float matrices)
        assert "linear weights are dequantized to float at load" in capsys.readouterr().err


def test_a_bitsandbytes_8bit_folder_kept_int8_is_a_qlora_base_refused_without_lora_by_name(tmp_path, capsys):
    """Kept int8, it is a base LoRA trains beside (recorded "bitsandbytes int8"); without --lora-rank refused by name,
    where its config's spec (no "mode" of GPTQ's) was a KeyError."""
    from test_hf_bnb import bnb_folder
    from tritongpt.errors import UserError
    from tritongpt.train.sft import load_init_base

    folder, _ = bnb_folder(tmp_path, "int8-llama")
    model = load_init_base(init_args(folder, lora_rank=4))
    assert model.init_quantized == "bitsandbytes int8" and model.quantized == "int8"
    assert "QLoRA on --init's own BITSANDBYTES quantization: the base's 7 matrices int8" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"is BITSANDBYTES-quantized \(.*config\.json's quantization_config\), its "
                                        r"matrices read as int8: they train only through LoRA updates"):
        load_init_base(init_args(folder))


WORDS = ("hi", "yes", "no", "ok", "up", "go", "on", "in", "at", "by", "so", "we")


def other_folder(tmp_path):
    """A second GPTQ folder of the same shapes (other weights) with the tokenizer: a resume's wrong --init."""
    from tritongpt.train.tokenizer import default_tokenizer, save_run_tokenizer

    other, _ = quantized_folder(tmp_path, "gptq-v1-sym", seed=1, vocab=4096)
    save_run_tokenizer(default_tokenizer(), other)
    return other


def pref_argv(cmd, folder, out, *extra):
    """dpo, kto or reward on short pairs (the folder's context is 32 tokens), an eval every step."""
    data = out.parent / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}.", "chosen": f" {w}", "rejected": f" not {w}"}) + "\n"
                            for w in WORDS))
    return [cmd, "--init", str(folder), "--data", str(data), "--val-fraction", "0.3", "--batch-size", "4",
            "--out-dir", str(out), "--device", "cpu", "--kernels", "reference", "--eval-every", "1", "--log-every",
            "1", "--lr", "5e-2", "--warmup-steps", "0", "--lora-rank", "4", *extra]


def rlhf_argv(folder, out, reward, *extra):
    """GRPO (2 prompts an iteration, 2 responses each, 4 new tokens) judged by the reward model `reward`."""
    data = out.parent / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}.", "chosen": f" {w}", "rejected": f" not {w}"}) + "\n"
                            for w in WORDS))
    return ["rlhf", "--init", str(folder), "--reward", str(reward), "--algo", "grpo", "--data", str(data),
            "--prompts-per-iter", "2", "--group-size", "2", "--max-new-tokens", "4", "--epochs", "1",
            "--minibatch-size", "4", "--eval-prompts", "2", "--eval-samples", "1", "--device", "cpu", "--kernels",
            "reference", "--lr", "5e-2", "--ckpt-every", "1", "--out-dir", str(out), "--lora-rank", "4", *extra]


def metric_rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def trained_on_the_folder(out, folder, prefix=""):
    """The run's checkpoint records the folder's quantization, and its frozen base is the folder's matrices bit for
    bit (prefix: a reward model's backbone.)."""
    from safetensors import safe_open

    from tritongpt.train import common

    ckpt = common.resume_checkpoint(out, "latest")
    state = common.load_state(ckpt)
    assert (state["args"]["init_quantized"], state["args"]["quantize"]) == ("gptq int4", None)
    want = base_buffers(load_checkpoint(folder, quantized_ok=True))
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        got = {k.removeprefix(prefix): f.get_tensor(k) for k in f.keys() if k.removeprefix(prefix) in want}
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def resumes_and_refuses_another_folder(argv_of, folder, other, steps, capsys):
    """A resume re-loads the folder and goes on; on another folder (the same shapes), or on the float model of the
    folder's matrices (quantized_folder's twin), it is refused by name."""
    assert main(argv_of(folder, steps + 1, "--resume")) == 0
    capsys.readouterr()
    assert main(argv_of(other, steps + 2, "--resume")) == 2
    err = capsys.readouterr().err
    assert f"--init {other} is not the base" in err and f"resume with the run's own --init {folder}" in err
    assert main(argv_of(folder.parent / f"{folder.name}-float", steps + 2, "--resume")) == 2
    assert "'s base is its --init folder's own GPTQ INT4 quantization (this run: float)" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", ["dpo", "kto"])
def test_dpo_and_kto_train_lora_on_a_gptq_folders_own_base_their_reference_it_and_resume_on_it(
        gptq_llama, tmp_path, capsys, cmd):
    """The reference is the folder's base as loaded (the policy with its updates at 0): the implicit rewards start
    at exactly 0, as --quantize's QLoRA (test_qlora_preference.py) does with a base it quantizes itself."""
    folder, _ = gptq_llama
    out = tmp_path / "run"
    assert main(pref_argv(cmd, folder, out, "--max-steps", "2")) == 0
    assert "QLoRA on --init's own GPTQ quantization: the base's 7 matrices int4 (group 32)" in capsys.readouterr().err
    rows = metric_rows(out)
    zero = ["val_margin", "val_chosen_reward", "val_rejected_reward", "train_margin"] if cmd == "dpo" else \
        ["val_margin", "val_kl", "val_desirable_reward", "val_undesirable_reward", "train_margin", "train_kl"]
    assert rows[0]["step"] == 0 and all(rows[0][k] == 0.0 for k in zero), rows[0]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and losses[1] < losses[0] and rows[-1]["train_margin"] > 0  # the updates train
    trained_on_the_folder(out, folder)
    other = other_folder(tmp_path)
    resumes_and_refuses_another_folder(lambda init, n, *f: pref_argv(cmd, init, out, "--max-steps", str(n), *f),
                                       folder, other, 2, capsys)
    assert [r["step"] for r in metric_rows(out) if "loss" in r][-2:] == [2, 3]


def test_reward_trains_lora_and_a_new_head_on_a_gptq_folders_backbone_and_resumes_on_it(gptq_llama, tmp_path,
                                                                                          capsys):
    """The folder is a causal LM: reward takes its backbone, quantized as the folder holds it, and a new scalar head
    (as from a float causal LM); the updates and the head train."""
    from tritongpt.train.reward import RewardModel

    folder, _ = gptq_llama
    out = tmp_path / "run"
    assert main(pref_argv("reward", folder, out, "--max-steps", "2")) == 0
    err = capsys.readouterr().err
    assert "QLoRA on --init's own GPTQ quantization" in err and "and the new reward head whole" in err
    losses = [r["loss"] for r in metric_rows(out) if "loss" in r]
    assert len(losses) == 2 and losses[1] < losses[0]
    trained_on_the_folder(out, folder, "backbone.")
    rm = RewardModel.load(out, quantized_ok=True)
    assert rm.quantized == "int4" and has_lora(rm.backbone)
    other = other_folder(tmp_path)
    resumes_and_refuses_another_folder(lambda init, n, *f: pref_argv("reward", init, out, "--max-steps", str(n), *f),
                                       folder, other, 2, capsys)
    assert [r["step"] for r in metric_rows(out) if "loss" in r][-2:] == [2, 3]


def test_rlhf_trains_lora_on_a_gptq_folders_own_base_from_kl_0_judged_by_a_reward_model_trained_on_it_too(
        gptq_llama, tmp_path, capsys):
    """The policy's reference is the folder's base as loaded, so the first rollout's KL is exactly 0; the judge is
    a reward model `reward` trained on the same folder (a QLoRA reward model, used unmerged)."""
    folder, _ = gptq_llama
    rm = tmp_path / "rm"
    assert main(pref_argv("reward", folder, rm, "--max-steps", "1", "--eval-every", "0")) == 0
    out = tmp_path / "run"
    assert main(rlhf_argv(folder, out, rm, "--iterations", "2")) == 0
    assert "QLoRA on --init's own GPTQ quantization" in capsys.readouterr().err
    rows = [r for r in metric_rows(out) if "kl" in r]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["kl"] == 0.0 and rows[0]["approx_kl"] == 0.0
    assert rows[0]["grad_norm"] > 0 and rows[1]["kl"] != 0.0  # the updates moved the policy in the first step
    trained_on_the_folder(out, folder)
    other = other_folder(tmp_path)
    resumes_and_refuses_another_folder(lambda init, n, *f: rlhf_argv(init, out, rm, "--iterations", str(n), *f),
                                       folder, other, 2, capsys)
    assert [r["step"] for r in metric_rows(out) if "kl" in r][-1] == 3


@pytest.mark.parametrize("cmd,flags,said", [
    ("dpo", ["--lora-rank", "0"], "they train only through LoRA updates beside them (QLoRA on its own "
                                  "quantization): pass --lora-rank"),
    ("kto", ["--quantize", "int8"], "is GPTQ-quantized already"),
    ("reward", ["--lora-rank", "0"], "pass --lora-rank"),
    ("reward", ["--quantize", "int4", "--group-size", "32"], "is GPTQ-quantized already"),
    ("rlhf", ["--lora-rank", "0"], "pass --lora-rank"),
    ("rlhf", ["--quantize", "int4"], "is GPTQ-quantized already"),
    # pad_vocab rebuilds a float model's rows; its own refusal ("quantized, for inference") named no flag
    ("dpo", ["--vocab-multiple", "64"], "--vocab-multiple 64: --init"),
    ("sft", ["--vocab-multiple", "64"], "--vocab-multiple 64: --init"),
])
def test_the_trainers_refuse_full_fine_tuning_quantize_and_vocab_multiple_on_a_gptq_folder_by_name(
        gptq_llama, tmp_path, capsys, cmd, flags, said):
    folder, _ = gptq_llama
    bad = tmp_path / "bad"
    argv = sft_argv(folder, bad, "--lora-rank", "4") if cmd == "sft" else \
        rlhf_argv(folder, bad, "exact") if cmd == "rlhf" else pref_argv(cmd, folder, bad)
    assert main([*argv, "--max-steps" if cmd != "rlhf" else "--iterations", "1", *flags]) == 2
    assert said in capsys.readouterr().err
    assert not bad.exists()


def test_rlhf_refuses_a_gptq_sequence_classifier_folder_as_reward_by_name(gptq_llama, tmp_path, capsys):
    """A GPTQ <Family>ForSequenceClassification folder (the tiny Llama's LM head cut to one score row) is not read
    as a reward model: the refusal names it and what trains a QLoRA reward model on such a quantization."""
    from safetensors.torch import load_file, save_file

    folder, _ = gptq_llama
    cls, _ = quantized_folder(tmp_path, "gptq-v1-sym", seed=2, vocab=4096)
    sd = load_file(cls / "model.safetensors")
    sd["score.weight"] = sd.pop("lm_head.weight")[:1].clone()
    save_file(sd, cls / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((cls / "config.json").read_text())
    (cls / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForSequenceClassification"]}))
    assert main(rlhf_argv(folder, tmp_path / "bad", cls, "--iterations", "1")) == 2
    err = capsys.readouterr().err
    assert "is a GPTQ-quantized LlamaForSequenceClassification" in err
    assert "train a QLoRA reward model on a GPTQ or AWQ causal LM folder (reward --init FOLDER --lora-rank R)" in err
    assert not (tmp_path / "bad").exists()


def test_a_gptq_sequence_classifier_folder_that_loads_float_is_a_reward_model(tmp_path, capsys):
    """A GPTQ classifier whose groups no int4 group size divides loads as the float model of its dequantized weights
    (said): a reward model like any float classifier, its score row the head, not refused as quantized by its config
    alone."""
    from safetensors.torch import load_file, save_file

    from tritongpt.train.reward import RewardModel

    cls, twin = quantized_folder(tmp_path, "gptq-v1-ragged-dequantized")
    sd = load_file(cls / "model.safetensors")
    sd["score.weight"] = sd.pop("lm_head.weight")[:1].clone()
    save_file(sd, cls / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((cls / "config.json").read_text())
    (cls / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForSequenceClassification"]}))
    model = RewardModel.load(cls)
    assert not getattr(model.backbone, "quantized", None)
    assert "4-bit GPTQ linear weights are dequantized to float at load" in capsys.readouterr().err
    assert torch.equal(model.head.weight, sd["score.weight"])
    w = model.backbone.trf_blocks[0].ff.w_down.weight
    assert torch.equal(w, twin.trf_blocks[0].ff.w_down.weight) and w.abs().sum() > 0


@pytest.mark.parametrize("kind", ["gptq-v2-gpt_neox", "awq-gemm-falcon"])
def test_sft_on_a_fused_qkv_family_folder_exports_merged_as_the_runs_unmerged_logits(tmp_path, kind):
    """GPT-NeoX's and Falcon's fused query_key_value, read as q, k and v Int4Linears each with its own update: the
    merged export (dequantized W + scale B A, fused back into the family's query_key_value) is a float folder whose
    logits are the run's, computed unmerged on the 4-bit base."""
    from tritongpt.train.tokenizer import default_tokenizer, save_run_tokenizer

    folder, _ = quantized_folder(tmp_path, kind, vocab=4096)
    save_run_tokenizer(default_tokenizer(), folder)
    out = tmp_path / "run"
    assert main(sft_argv(folder, out, "--max-steps", "2", "--lora-rank", "4", "--lr", "5e-2")) == 0
    model = load_checkpoint(out, quantized_ok=True).eval()
    assert model.quantized == "int4" and has_lora(model)
    # the updates moved (B starts at 0: an export of untrained updates would be the folder's own matrices)
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("lora_B"))
    assert main(["export", str(out), "--out", str(tmp_path / "hf")]) == 0
    merged = load_checkpoint(tmp_path / "hf")
    assert not getattr(merged, "quantized", None) and not has_lora(merged)
    idx = torch.randint(0, 4096, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel(merged(idx), model(idx)) < 1e-5


def test_a_reward_model_on_an_act_order_gptq_folder_keeps_its_input_order_through_save_and_load(tmp_path):
    """An act-order folder's layers gather x's columns into their stored order (in_perm): a QLoRA reward model's
    checkpoint holds those buffers under backbone., and the model loaded from it scores as one built here from the
    folder itself, the run's updates and head put on it (and so again once saved and loaded)."""
    from safetensors.torch import load_file

    from tritongpt.train import common
    from tritongpt.train.reward import RewardModel
    from tritongpt.train.tokenizer import default_tokenizer, save_run_tokenizer

    folder, _ = quantized_folder(tmp_path, "gptq-v1-act-order", vocab=4096)
    save_run_tokenizer(default_tokenizer(), folder)
    out = tmp_path / "run"
    assert main(pref_argv("reward", folder, out, "--max-steps", "2", "--eval-every", "0")) == 0
    base = load_checkpoint(folder, quantized_ok=True)
    perms = {n + ".in_perm": m.in_perm for n, m in base.named_modules() if isinstance(m, QuantLinear)}
    assert len(perms) == 7 and all(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    saved = load_file(common.resume_checkpoint(out, "latest") / "model.safetensors")
    assert all(torch.equal(saved["backbone." + n], p) for n, p in perms.items())
    rm = RewardModel.load(out, quantized_ok=True).eval()
    assert all(torch.equal(rm.backbone.get_submodule(n.removesuffix(".in_perm")).in_perm, p) for n, p in perms.items())
    # the folder's base, the run's updates and head: built here without the checkpoint's quantized buffers
    cfg = rm.config
    want = RewardModel(add_lora(base, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)).eval()
    trained = {k: v for k, v in saved.items() if k.endswith(("lora_A", "lora_B")) or k.startswith("head.")}
    assert len(trained) == 2 * 7 + 2 and all(saved[k].abs().sum() > 0 for k in trained)
    missing = want.load_state_dict(trained, strict=False).missing_keys
    assert not [k for k in missing if k.endswith(("lora_A", "lora_B")) or k.startswith("head.")]
    idx = torch.randint(0, 4096, (3, 9), generator=torch.Generator().manual_seed(4))
    lengths = torch.tensor([9, 5, 2])
    with torch.no_grad():
        expected = want(idx, lengths)
        assert rel(rm(idx, lengths), expected) < 1e-5
        rm.save(tmp_path / "again.safetensors")
        again = RewardModel.load(tmp_path / "again.safetensors", quantized_ok=True).eval()
        assert rel(again(idx, lengths), expected) < 1e-5
