"""Every training command resumed halfway (its checkpoint, then --resume) ends with the weights of the run that went
straight through, bit for bit on CPU, and its metrics.jsonl holds the straight run's training rows: the optimizer's
moments and step, the schedule, the data position (mid-epoch, shuffled), the RNGs (dropout, RL sampling), the
gradient accumulation and the frozen reference/reward models all come back. test_loop.py checks the Trainer alone
(crashes, Muon, fp16); these check what each command hands it."""
import json

import pytest
import torch
from safetensors.torch import load_file

from tritongpt.cli import main
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.common import Checkpointer, MetricsLog
from tritongpt.train.reward import RewardModel
from tritongpt.train.tasks import generate_tasks
from tritongpt.train.tokenizer import get_tokenizer, save_run_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TIMING = ("dt", "time", "tok_per_s", "mfu", "mem_gb")
# evaluated at the end of every call (the short one's last step too): not the run's, and not compared
END_OF_CALL = ("val_", "train_", "test_", "eval_")


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    """A one-layer model of the embedded tokenizer's vocabulary with dropout (the RNG must resume too), a random
    reward model for rlhf, and 8 instruction records for sft (6 to train on: an epoch is 1.5 steps)."""
    d = tmp_path_factory.mktemp("init")
    cfg = GPTConfig(vocab_size=4100, context_length=256, n_embd=32, n_layer=1, n_head=2, dropout=0.1)
    torch.manual_seed(0)
    GPTModel(cfg).save(d / "model.safetensors")
    RewardModel(GPTModel(GPTConfig(**{**cfg.to_dict(), "dropout": 0.0}))).save(d / "reward.safetensors")
    (d / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in generate_tasks(8, seed=0, families="first_word")))
    return d


def straight_and_resumed(tmp_path, argv, steps=2, flag="--max-steps"):
    """A run of `steps` and one of steps // 2 resumed to `steps` end with the same weights and training rows."""
    def run(where, n, *resume):
        assert main([*argv, "--out-dir", str(where), flag, str(n), *resume]) == 0
        rows = [{k: v for k, v in r.items() if k not in TIMING and not k.startswith(END_OF_CALL)}
                for r in MetricsLog(where / "metrics.jsonl").rows() if "loss" in r]
        return load_file(Checkpointer(where).latest() / "model.safetensors"), rows

    a, rows_a = run(tmp_path / "straight", steps)
    half, _ = run(tmp_path / "resumed", steps // 2)
    b, rows_b = run(tmp_path / "resumed", steps, "--resume")
    assert [r["step"] for r in rows_b] == list(range(1, steps + 1))  # the log goes on, not over
    assert rows_a == rows_b
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    # the resumed call trained: one that loaded the checkpoint and stopped would pass the checks above no better
    assert any(not torch.equal(half[k], b[k]) for k in b)


COMMON = ["--device", "cpu", "--kernels", "reference", "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "1",
          "--ckpt-every", "1"]
PREFERENCE = ["--num-pairs", "8", "--val-fraction", "0.25", "--eval-every", "0", "--grad-accum", "2"]


@pytest.mark.parametrize("command", ["reward", "dpo", "kto"])
def test_a_preference_run_resumed_halfway_is_the_straight_run(init, tmp_path, command):
    straight_and_resumed(tmp_path, [command, "--init", str(init / "model.safetensors"), *PREFERENCE, *COMMON])


def test_an_sft_run_resumed_mid_epoch_is_the_straight_run(init, tmp_path):
    # 6 training records, batches of 4: the halfway checkpoint falls mid-epoch, the next batch crosses into the second
    straight_and_resumed(tmp_path, ["sft", "--init", str(init / "model.safetensors"), "--data", str(init / "sft.jsonl"),
                                    "--val-fraction", "0.25", "--eval-every", "0", "--eval-gen", "0",
                                    "--max-new-tokens", "2", "--sample-every", "0", *COMMON])


@pytest.mark.parametrize("algo", ["ppo", "grpo", "rloo"])
def test_an_rlhf_run_resumed_halfway_is_the_straight_run(init, tmp_path, algo):
    straight_and_resumed(tmp_path, ["rlhf", "--algo", algo, "--init", str(init / "model.safetensors"),
                                    "--reward", str(init / "reward.safetensors"), "--num-pairs", "12",
                                    "--val-fraction", "0.25", "--prompts-per-iter", "4", "--minibatch-size", "2",
                                    "--epochs", "2", "--max-new-tokens", "4", "--eval-prompts", "2", "--eval-every", "0",
                                    "--lr", "1e-3", "--device", "cpu", "--kernels", "reference", "--ckpt-every", "1"],
                         flag="--iterations")


@pytest.fixture(scope="module")
def teacher(corpus, tmp_path_factory):
    """A random teacher of the corpus tokenizer's vocabulary, with that tokenizer beside it (as a run leaves it)."""
    d = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(2)
    GPTModel(GPTConfig(vocab_size=300, context_length=64, n_embd=24, n_layer=1, n_head=2)).save(d / "model.safetensors")
    save_run_tokenizer(get_tokenizer(str(corpus.tok)), d)
    return d


@pytest.mark.parametrize("distill", [False, True])
def test_a_pretrain_run_resumed_halfway_is_the_straight_run(corpus, teacher, tmp_path, distill):
    # shuffled blocks, dropout, two micro-batches a step; --teacher: the distillation loss on top
    straight_and_resumed(tmp_path, ["pretrain", "--data", str(corpus.text), "--tokenizer", str(corpus.tok),
                                    "--cache-dir", str(corpus.cache), "--model", "tiny", "--block-size", "32",
                                    "--dropout", "0.1", "--grad-accum", "2", "--eval-every", "0", "--sample-tokens", "0",
                                    *(["--teacher", str(teacher)] if distill else []), *COMMON])
