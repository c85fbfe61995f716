"""QLoRA reward models: `reward --lora-rank R --quantize int8|int4 [--group-size G]` trains LoRA updates and the
float scalar head beside the backbone's frozen quantized matrices; the file says how it is quantized, and everything
that reads a reward model (rlhf --reward, eval, info, export) uses it unmerged or writes it merged."""
import contextlib
import io
import json
import re

import pytest
import torch
import torch.nn as nn

from tritongpt.cli import main
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel, safetensors_metadata
from tritongpt.model.lora import has_lora, merge_lora
from tritongpt.model.quant import QuantLinear, quantize
from tritongpt.train import common
from tritongpt.train.reward import RewardModel
from test_quantize import rel

WORDS = ("hi", "yes", "no", "ok", "up", "go", "on", "in", "at", "by", "so", "we")
VOCAB = 4096
QLORA = ("--lora-rank", "4", "--quantize", "int4", "--group-size", "32")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny --init model with its tokenizer, and preference pairs short enough for its context."""
    from tritongpt.train.tokenizer import default_tokenizer, save_run_tokenizer

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("qlora_reward_base")
    GPTModel(GPTConfig(vocab_size=VOCAB, context_length=64, n_embd=64, n_layer=1, n_head=2)).save(
        folder / "model.safetensors")
    save_run_tokenizer(default_tokenizer(), folder)
    (folder / "pairs.jsonl").write_text("".join(
        json.dumps({"prompt": f"Say {w}.", "chosen": f" {w}", "rejected": f" not {w}"}) + "\n" for w in WORDS))
    return folder


def reward_argv(base, out, *extra):
    return ["reward", "--init", str(base), "--data", str(base / "pairs.jsonl"), "--val-fraction", "0.3",
            "--out-dir", str(out), "--batch-size", "4", "--eval-every", "0", "--device", "cpu",
            "--kernels", "reference", "--log-every", "0", "--lr", "1e-2", "--warmup-steps", "0", *extra]


@pytest.fixture(scope="module")
def run(base, tmp_path_factory):
    """A 2-step QLoRA reward run (int4, group 32), and what it said on stderr."""
    out = tmp_path_factory.mktemp("qlora_reward") / "run"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):  # (capsys is a test's, not a module fixture's)
        assert main(reward_argv(base, out, "--max-steps", "2", *QLORA)) == 0
    (out.parent / "stderr.txt").write_text(err.getvalue())
    return out


def frozen_buffers_equal(model, base, mode, group):
    """Whether model's quantized buffers are the --init's matrices quantized (mode, group) bit for bit."""
    frozen = quantize(GPTModel.load(base / "model.safetensors"), mode, head=False, group_size=group)
    names = [n for n, _ in frozen.named_buffers()]
    assert names  # the quantized matrices, their scales (and int4's offsets)
    return all(torch.equal(buf, model.get_buffer(name)) for name, buf in frozen.named_buffers())


def test_the_run_trains_the_updates_and_the_float_head_on_the_quantized_backbone(base, run):
    err = (run.parent / "stderr.txt").read_text()
    assert "QLoRA: the base's 6 matrices int4 (group 32) weight-only" in err
    assert "of them the base's int4 matrices, and the new reward head whole" in err
    ckpt = common.resume_checkpoint(run, "latest")
    state = common.load_state(ckpt)
    assert len(state["optimizer"]["state"]) == 2 * 6 + 2  # A and B of 6 matrices in 1 layer, + the head's w, b
    assert (state["args"]["quantize"], state["args"]["group_size"]) == ("int4", 32)
    meta = safetensors_metadata(ckpt / "model.safetensors")
    assert (meta["kind"], meta["quantized"], meta["quantized_group_size"], meta["quantized_head"]) == \
        ("reward_model", "int4", "32", "false")
    rm = RewardModel.load(run, quantized_ok=True)
    assert rm.quantized == "int4" and rm.quantized_group_size == 32
    assert has_lora(rm.backbone) and rm.config.lora_rank == 4  # used unmerged: the memory QLoRA saves stays saved
    assert sum(isinstance(m, QuantLinear) for m in rm.modules()) == 6
    assert isinstance(rm.head, nn.Linear) and rm.head.weight.dtype == torch.float32
    assert frozen_buffers_equal(rm.backbone, base, "int4", 32)  # the frozen base, untouched by training
    lora = [p for n, p in rm.named_parameters() if n.endswith("lora_B")]
    assert lora and all(bool(p.any()) for p in lora)  # the updates trained (B starts at zero)


def test_the_loaded_model_scores_the_held_out_pairs_as_the_trained_model_did(run, capsys):
    # the run's last eval (the trained model in the Trainer) and `eval` of its saved file (RewardModel.load):
    # the same pairs, the same scores, to the bit
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "val_loss" in r][-1]
    assert main(["eval", "--weights", str(run), "--device", "cpu", "--kernels", "reference", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pairs"] > 0
    assert (result["loss"], result["acc"], result["margin"]) == (last["val_loss"], last["val_acc"], last["val_margin"])
    # unmerged, it computes what the merged float model does, but for float rounding
    rm = RewardModel.load(run, quantized_ok=True).eval()
    idx, lengths = torch.randint(0, VOCAB, (3, 11)), torch.tensor([11, 5, 1])
    with torch.no_grad():
        ours = rm(idx, lengths)
        merge_lora(rm.backbone)
        assert not any(isinstance(m, QuantLinear) for m in rm.modules())
        assert rel(rm(idx, lengths), ours) < 1e-5


def test_info_and_eval_quantize_name_the_qlora_reward_model(run, capsys):
    assert main(["info", "--weights", str(run)]) == 0
    out = capsys.readouterr().out
    assert "reward model a scalar head" in out and "quantized    int4: 6 matrices" in out
    assert "QLoRA: --quantize with --lora-rank" in out and "the updates run beside the quantized matrices" in out
    assert main(["eval", "--weights", str(run), "--device", "cpu", "--quantize", "int8"]) == 2
    assert "a reward model is scored as it is" in capsys.readouterr().err


def test_what_trains_on_a_model_refuses_the_qlora_reward_model_by_name(base, run, tmp_path, capsys):
    # its float backbone is not in the file: to train on, its run resumes
    assert main(reward_argv(base, tmp_path / "again", "--max-steps", "1", "--init", str(run), *QLORA)) == 2
    err = capsys.readouterr().err
    assert "is a QLoRA reward model (LoRA updates on an int4 backbone)" in err and "reward --resume" in err
    assert main(["merge", str(run), str(run), "--out", str(tmp_path / "merged")]) == 2
    assert "is a QLoRA reward model" in capsys.readouterr().err


def test_a_resume_goes_on_and_another_base_is_refused_naming_the_flags(base, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(reward_argv(base, out, "--max-steps", "1", *QLORA)) == 0
    for flags, said in ((["--quantize", "int4", "--group-size", "16"], "(this run: int4 (group 16))"),
                        (["--quantize", "int8"], "(this run: int8)"), ([], "(this run: float)")):
        capsys.readouterr()
        assert main(reward_argv(base, out, "--max-steps", "2", "--resume", "--lora-rank", "4", *flags)) == 2
        err = capsys.readouterr().err
        assert "its base is int4 (group 32)" in err and said in err and "pass --quantize int4 --group-size 32" in err
    assert main(reward_argv(base, out, "--max-steps", "2", "--resume", *QLORA)) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r][-1] == 2
    assert frozen_buffers_equal(RewardModel.load(out, quantized_ok=True).backbone, base, "int4", 32)


@pytest.mark.parametrize("flags,said", [
    (["--quantize", "int4"], "--quantize int4 freezes the base's matrices as int4: they train only through LoRA"),
    (["--group-size", "32", "--lora-rank", "4"], "--group-size sets int4's groups: pass --quantize int4 too"),
    (["--quantize", "int8", "--group-size", "32", "--lora-rank", "4"], "it does nothing with --quantize int8"),
])
def test_bad_flags_are_refused_before_any_file_is_written(base, tmp_path, capsys, flags, said):
    assert main(reward_argv(base, tmp_path / "bad", "--max-steps", "1", *flags)) == 2
    assert said in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_a_float_reward_init_has_its_backbone_quantized_and_its_head_trained_on(base, tmp_path, capsys):
    assert main(reward_argv(base, tmp_path / "float", "--max-steps", "1")) == 0
    out = tmp_path / "qlora"
    assert main(reward_argv(base, out, "--max-steps", "1", "--init", str(tmp_path / "float"), "--lora-rank", "4",
                            "--quantize", "int8")) == 0
    assert "of them the base's int8 matrices, and the --init's reward head whole" in capsys.readouterr().err
    init = RewardModel.load(tmp_path / "float")
    rm = RewardModel.load(out, quantized_ok=True)
    assert rm.quantized == "int8" and rm.quantized_group_size is None
    frozen = quantize(init.backbone, "int8", head=False)
    for name, buf in frozen.named_buffers():
        assert torch.equal(buf, rm.backbone.get_buffer(name)), name
    assert not torch.equal(rm.head.weight, init.head.weight)  # the --init's head trained on
    # a Hugging Face classifier (the float run exported) as --init: its backbone quantized alike
    pytest.importorskip("transformers")
    assert main(["export", str(tmp_path / "float"), "--out", str(tmp_path / "hf")]) == 0
    assert main(reward_argv(base, tmp_path / "from_hf", "--max-steps", "1", "--init", str(tmp_path / "hf"),
                            "--lora-rank", "4", "--quantize", "int4", "--group-size", "64")) == 0
    frozen = quantize(RewardModel.load(tmp_path / "hf").backbone, "int4", head=False, group_size=64)
    rm = RewardModel.load(tmp_path / "from_hf", quantized_ok=True)
    assert (rm.quantized, rm.quantized_group_size) == ("int4", 64)
    for name, buf in frozen.named_buffers():
        assert torch.equal(buf, rm.backbone.get_buffer(name)), name


def test_rlhf_scores_with_the_qlora_reward_model_unmerged(base, run, tmp_path):
    out = tmp_path / "rl"
    assert main(["rlhf", "--init", str(base), "--reward", str(run), "--data", str(base / "pairs.jsonl"),
                 "--iterations", "1", "--prompts-per-iter", "4", "--minibatch-size", "2", "--epochs", "1",
                 "--max-new-tokens", "4", "--eval-prompts", "2", "--eval-samples", "1", "--device", "cpu",
                 "--kernels", "reference", "--out-dir", str(out)]) == 0
    state = common.load_state(common.resume_checkpoint(out, "latest"))
    # the judge it fingerprinted (and a resume compares) is the quantized model with its updates, not a merged one
    rm = RewardModel.load(run, quantized_ok=True)
    assert common.same_fingerprint(state["reward_fingerprint"], common.weights_fingerprint(rm))
    merge_lora(rm.backbone)
    assert not common.same_fingerprint(state["reward_fingerprint"], common.weights_fingerprint(rm))


def test_export_writes_the_merged_classifier_whose_scores_match(run, tmp_path, capsys):
    pytest.importorskip("transformers")
    from test_reward_export import hf_scores, padded_batch
    from tritongpt.train.sft import pick_tokenizer

    hf = tmp_path / "hf"
    assert main(["export", str(run), "--out", str(hf)]) == 0
    capsys.readouterr()
    config = json.loads((hf / "config.json").read_text())
    assert config["architectures"] == ["GPT2ForSequenceClassification"]
    rm = RewardModel.load(run, quantized_ok=True).eval()
    pad, eot = config["pad_token_id"], pick_tokenizer(None, str(run), rm.config.vocab_size).eot_id
    idx, lengths = padded_batch(rm.config.vocab_size, eot, pad, [9, 4, 13, 1])
    with torch.no_grad():
        ours = rm(idx, lengths)
    theirs, _ = hf_scores(hf, idx, lengths)
    assert rel(theirs, ours) < 1e-5  # the dequantized backbone plus the update: float rounding apart
    assert not torch.allclose(theirs[1:], theirs[:-1])


def test_a_damaged_qlora_reward_file_is_refused_naming_the_tensor(run, tmp_path):
    from safetensors.torch import load_file, save_file

    from tritongpt.errors import UserError

    file = common.resume_checkpoint(run, "latest") / "model.safetensors"
    tensors, meta = load_file(str(file)), safetensors_metadata(file)
    name = next(n for n in tensors if n.endswith(".scale"))
    tensors[name] = torch.zeros_like(tensors[name])  # a zeroed row of scales: every weight of the row read as 0
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata=meta)
    with pytest.raises(UserError, match=re.escape(f"tensor {name} holds a scale of 0 or below")):
        RewardModel.load(tmp_path / "model.safetensors", quantized_ok=True)


def test_the_triton_path_scores_the_qlora_reward_model_as_the_reference_does(run):
    # the int4 matmuls by int4_linear (Triton's interpreter here), the updates beside them
    ref = RewardModel.load(run, quantized_ok=True).eval()
    tri = RewardModel.load(run, quantized_ok=True, kernels="triton").eval()
    assert all(m.use_triton for m in tri.modules() if isinstance(m, QuantLinear))
    assert not any(m.use_triton for m in ref.modules() if isinstance(m, QuantLinear))
    idx, lengths = torch.randint(0, VOCAB, (2, 7)), torch.tensor([7, 3])
    with torch.no_grad():
        assert rel(tri(idx, lengths), ref(idx, lengths)) < 1e-5
