"""QLoRA on the preference trainers: `dpo` and `kto` with `--lora-rank R --quantize int8|int4 [--group-size G]`
(tritongpt/commands.py quantize_base; tests/test_qlora.py has sft's and the model's). The reference is the
quantized base, copied before the updates are added: the policy with its updates at 0 computes exactly it, so the
implicit rewards start at 0, as TRL's QLoRA-DPO (whose reference is the policy with its adapters off). A float
reference would start every margin off by the base's quantization error, which the loss would then train away."""
import json

import pytest
import torch

from tritongpt.cli import main
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.model.lora import has_lora
from tritongpt.model.quant import quantize
from tritongpt.train import common
from tritongpt.train.gpt2_weights import export_gpt2, load_checkpoint


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    """A tiny GPT-2 as a Hugging Face folder: a --init, and the base `export --adapter` puts the update on."""
    torch.manual_seed(4)
    folder = tmp_path_factory.mktemp("qlora_pref_base")
    export_gpt2(GPTModel(GPTConfig(vocab_size=4096, context_length=128, n_embd=64, n_layer=1, n_head=2)), folder)
    return folder


def argv(cmd, base, out, *extra):
    return [cmd, "--init", str(base), "--tokenizer", "default", "--num-pairs", "12", "--val-fraction", "0.25",
            "--batch-size", "4", "--out-dir", str(out), "--device", "cpu", "--kernels", "reference",
            "--eval-every", "1", "--log-every", "0", "--lr", "5e-2", "--warmup-steps", "0", *extra]


def metric_rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("cmd,mode,group", [("dpo", "int4", "32"), ("kto", "int8", None)])
def test_the_reference_is_the_quantized_base_so_rewards_start_at_zero_and_the_run_resumes_and_exports(
        hf_base, tmp_path, capsys, cmd, mode, group):
    out = tmp_path / "run"
    flags = ("--lora-rank", "4", "--quantize", mode, *(("--group-size", group) if group else ()))
    assert main(argv(cmd, hf_base, out, "--max-steps", "2", *flags)) == 0
    err = capsys.readouterr().err
    assert f"QLoRA: the base's 6 matrices {mode}" in err and "LoRA rank 4" in err
    # the quantized matrices are buffers, counted as the parameters they stand for: the float model's and LoRA's
    n_lora, n_float = 4 * (4 * (64 + 64) + (64 + 256) * 2), load_checkpoint(hf_base).num_params()
    n_quantized = 4 * 64 * 64 + 2 * 64 * 256 + 4 * 64 + 256 + 64
    assert (f"{n_lora:,} of {n_float + n_lora:,} parameters train, {n_quantized:,} of them the base's {mode} matrices"
            in err), err
    rows = metric_rows(out)
    first = rows[0]
    assert first["step"] == 0
    # exactly 0, not about: the cached reference log-probs are the policy's own at step 0
    zero = ["val_margin", "val_chosen_reward", "val_rejected_reward", "train_margin"] if cmd == "dpo" else \
        ["val_margin", "val_kl", "val_desirable_reward", "val_undesirable_reward", "train_margin", "train_kl"]
    for key in zero:
        assert first[key] == 0.0, (key, first[key])
    assert rows[-1]["train_margin"] != 0.0  # and the updates train (the frozen base cannot)
    state = common.load_state(common.resume_checkpoint(out, "latest"))
    assert (state["args"]["quantize"], state["args"]["group_size"]) == (mode, None if group is None else int(group))
    model = load_checkpoint(out, quantized_ok=True)
    assert model.quantized == mode and has_lora(model) and not model.quantized_head
    frozen = quantize(load_checkpoint(hf_base), mode, head=False, group_size=32 if group else None)
    for name, buf in frozen.named_buffers():
        assert torch.equal(buf, model.get_buffer(name)), name
    # a resume quantizes the base again as the run did; another base is refused naming the flags
    assert main(argv(cmd, hf_base, out, "--max-steps", "3", "--resume", *flags)) == 0
    assert [r["step"] for r in metric_rows(out) if "loss" in r][-1] == 3
    capsys.readouterr()
    assert main(argv(cmd, hf_base, out, "--max-steps", "4", "--resume", "--lora-rank", "4")) == 2
    assert f"its base is {mode}" in capsys.readouterr().err
    # the update goes on the float --init as a peft adapter (checked against the base quantized as the run did)
    assert main(["export", str(out), "--out", str(tmp_path / "adapter"), "--adapter"]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(hf_base) and config["r"] == 4


@pytest.mark.parametrize("cmd", ["dpo", "kto"])
@pytest.mark.parametrize("flags,said", [
    (["--quantize", "int4"], "--quantize int4 freezes the base's matrices as int4: they train only through LoRA"),
    (["--group-size", "32", "--lora-rank", "4"], "--group-size sets int4's groups: pass --quantize int4 too"),
    # a group (128 by default) that fits no width of the 64-wide base: refused before the tokenizer is written
    (["--lora-rank", "4", "--quantize", "int4"], "(the group: --group-size)"),
])
def test_bad_qlora_flags_are_refused_before_anything_is_written(hf_base, tmp_path, capsys, cmd, flags, said):
    assert main(argv(cmd, hf_base, tmp_path / "bad", "--max-steps", "1", *flags)) == 2
    assert said in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_the_run_records_the_group_size_it_used_so_a_resume_naming_the_default_is_the_same_run(tmp_path, capsys):
    wide = tmp_path / "wide"  # a width of 128: int4's default group
    torch.manual_seed(5)
    export_gpt2(GPTModel(GPTConfig(vocab_size=4096, context_length=128, n_embd=128, n_layer=1, n_head=2)), wide)
    out = tmp_path / "run"
    assert main(argv("dpo", wide, out, "--max-steps", "1", "--eval-every", "0", "--lora-rank", "2",
                     "--quantize", "int4")) == 0
    state = common.load_state(common.resume_checkpoint(out, "latest"))
    assert (state["args"]["quantize"], state["args"]["group_size"]) == ("int4", 128)
    capsys.readouterr()
    assert main(argv("dpo", wide, out, "--max-steps", "2", "--eval-every", "0", "--lora-rank", "2",
                     "--quantize", "int4", "--group-size", "128", "--resume")) == 0
    assert "--group-size" not in capsys.readouterr().err
