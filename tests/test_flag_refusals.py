"""Flags given where the run never reads them (a setting of another mode, a sub-setting without its main flag):
each is refused by name, exit 2, before any model is built or data read (a flag at its default is never "given").
One table a command family; every case once did nothing, silently."""
import argparse

import pytest

from tritongpt import cli

TRAINERS = ("sft", "reward", "dpo", "kto", "rlhf")
LORA = [(cmd, flags, f"{flags[0]} sets the LoRA update of --lora-rank r: without it (full fine-tuning) it does "
         "nothing") for cmd in TRAINERS for flags in (["--lora-alpha", "8"], ["--lora-targets", "attn"])]
CRITIC = [(["--algo", "grpo", flag, value], f"{flag} {value}: PPO's value head and GAE; --algo grpo has no critic")
          for flag, value in (("--vf-coef", "1.0"), ("--value-clip", "0.1"), ("--gamma", "0.9"), ("--lam", "0.5"))]
PREFERENCE = ("reward", "dpo", "kto", "rlhf")


@pytest.mark.parametrize("cmd,flags,message", LORA, ids=[f"{c}{f[0]}" for c, f, _ in LORA])
def test_a_lora_setting_without_a_rank_is_refused(cmd, flags, message, tmp_path, capsys):
    init = ["--init", "model"] * (cmd == "sft")  # (required: never read, the refusal comes first)
    assert cli.main([cmd, *init, *flags, "--out-dir", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags,message", [
    *CRITIC,
    (["--num-pairs", "10", "--data", "pairs.jsonl"], "--num-pairs sets how many pairs are made from the embedded "
                                                      "tasks; --data pairs.jsonl's are the file's"),
])
def test_an_rlhf_flag_of_another_algorithm_or_data_is_refused(flags, message, tmp_path, capsys):
    assert cli.main(["rlhf", *flags, "--reward", "exact", "--out-dir", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("cmd", PREFERENCE[:3])
@pytest.mark.parametrize("flags,message", [
    (["--num-pairs", "10", "--data", "pairs.jsonl"], "--num-pairs sets how many pairs are made from the embedded "
                                                      "tasks; --data pairs.jsonl's are the file's"),
    (["--sample-every", "5"], "--sample-every prints a generated sample every N steps; {cmd} prints none"),
])
def test_a_preference_trainer_refuses_what_it_never_reads(cmd, flags, message, tmp_path, capsys):
    assert cli.main([cmd, *flags, "--out-dir", str(tmp_path / "run")]) == 2  # (pairs.jsonl: not read, not there)
    assert message.format(cmd=cmd) in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["sft", "--init", "model", "--val-fraction", "0.3"],
     "--val-fraction holds out a share of a --data file's records; the embedded tasks' held-out records are "
     "--n-eval's"),
    (["sft", "--init", "model", "--n-eval", "0", "--eval-before"], "--eval-before answers the held-out test records "
                                                                    "before training; --n-eval 0 holds none out"),
    (["sft", "--init", "model", "--n-eval", "0", "--eval-gen", "8"], "--eval-gen sets how many held-out records are "
                                                                     "answered at each evaluation; --n-eval 0 holds "
                                                                     "none out"),
    (["pretrain", "--sample-tokens", "0", "--prompt", "Once"], "--prompt sets the samples printed while training, "
                                                              "which --sample-tokens 0 turns off"),
    (["pretrain", "--sample-tokens", "0", "--temperature", "1.0"], "--temperature sets the samples printed"),
    (["pretrain", "--sample-tokens", "0", "--top-k", "7"], "--top-k sets the samples printed"),
    (["eval", "--weights", "w", "--split", "all", "--val-fraction", "0.2"],
     "--val-fraction sizes the held-out split that --split val scores; --split all scores the whole of the data"),
    (["hellaswag", "--weights", "w", "--data", "h.jsonl", "--cache-dir", "c"],
     "--cache-dir keeps the downloaded file; with --data h.jsonl nothing is downloaded"),
    (["lambada", "--weights", "w", "--data", "l.jsonl", "--cache-dir", "c"],
     "--cache-dir keeps the downloaded file; with --data l.jsonl nothing is downloaded"),
    (["generate", "--prompts", "p.txt", "--out", "o.jsonl", "--draft-tokens", "3"],
     "--draft-tokens is how many tokens --prompt-lookup or --draft proposes at most a step: a positive integer "
     "with --prompt-lookup or --draft, got 3 without either"),
])
def test_a_flag_another_one_turns_off_is_refused(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # (the files named are never read: the refusal comes first)
    assert cli.main([*argv, *(["--out-dir", "run"] if argv[0] in ("sft", "pretrain") else [])]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("cmd", ["pretrain", "sft", "reward", "dpo", "kto"])
def test_a_min_lr_with_a_constant_schedule_is_refused(cmd, tmp_path, capsys):
    """Each trainer's own --min-lr default (add_train_args') is not "given": --lr-schedule constant alone goes on
    (sft: to its --init, not there)."""
    init = ["--init", str(tmp_path / "none")] * (cmd == "sft")
    argv = [cmd, *init, "--lr-schedule", "constant", "--out-dir", str(tmp_path / "run")]
    assert cli.main([*argv, "--min-lr", "1e-7"]) == 2
    assert "--min-lr 1e-07 is where the schedule decays to: --lr-schedule constant stays at --lr" in \
        capsys.readouterr().err
    if cmd == "sft":
        assert cli.main(argv) == 2
        assert "--min-lr" not in capsys.readouterr().err


@pytest.mark.parametrize("argv,flag,whats", [
    (["cpu", "--ops", "attention"], "--ops", "kernels, all"),
    (["cpu", "--dtype", "fp32"], "--dtype", "kernels, train, all, profile, decode, serve"),
    (["cpu", "--norm", "rmsnorm"], "--norm", "train, all, profile"),  # a model flag (train_step.MODEL_FLAGS)
    (["compile", "--models", "gpt2-medium"], "--models", "train, all, profile, decode"),
    (["decode", "--steps", "3"], "--steps", "train, all, profile"),
    (["profile", "--peak-tflops", "100"], "--peak-tflops", "train, all"),
    (["kernels", "--new-tokens", "5"], "--new-tokens", "decode"),
    (["train", "--top", "3"], "--top", "profile"),
    (["serve", "--ops", "layernorm"], "--ops", "kernels, all"),
    (["decode", "--quick"], "--quick", "kernels, train, all, cpu, compile, profile"),
])
def test_bench_refuses_a_flag_of_another_benchmark(argv, flag, whats, capsys):
    assert cli.main(["bench", *argv]) == 2
    assert f"{flag} is a flag of bench {whats}, not of bench {argv[0]}: it would do nothing" in \
        capsys.readouterr().err


def test_every_bench_flag_says_which_benchmarks_read_it():
    """Each flag of bench's parser is in its table (bench.cli.FLAG_WHATS and the model flags) or serve's
    (serve_flags), so that a flag added later is refused where it does nothing, or the test says to place it."""
    from tritongpt.bench.cli import WHATS, whats_of_flags

    args = cli.build_parser(["bench"]).parse_args(["bench", "cpu"])
    mine = {"command", "what", "out", "func", "serve_flags", "what_flags", "foreign_dests"}
    assert sorted(set(vars(args)) - set(args.serve_flags) - set(whats_of_flags()) - mine) == []
    assert set(args.what_flags) == set(whats_of_flags())
    assert all(set(w) <= set(WHATS) for w in whats_of_flags().values())


def test_a_flag_at_its_default_is_not_given(tmp_path, capsys):
    """The checks compare with the parser's defaults: naming a default (--lora-alpha 16, --num-pairs 2000) is not
    a setting given, and the run goes on to its next check (here: --reward's)."""
    assert cli.main(["rlhf", "--lora-alpha", "16", "--num-pairs", "2000", "--data", "pairs.jsonl", "--algo", "grpo",
                     "--gamma", "1.0", "--out-dir", str(tmp_path / "run")]) == 2
    assert "--reward is required" in capsys.readouterr().err


def test_the_tables_cover_every_lora_flag():
    """--lora-rank's settings, read from the parser: a LoRA flag added later joins the refusal or fails here."""
    from tritongpt.commands import add_lora_args

    p = argparse.ArgumentParser()
    add_lora_args(p)
    settings = {a.option_strings[0] for a in p._actions if a.option_strings and a.dest not in ("help", "lora_rank")}
    assert settings == {flags[0] for _, flags, _ in LORA}


def test_info_refuses_model_for_a_reward_model(tmp_path, capsys):
    """info --weights of a reward model read its own config and dropped --model without a word (eval refuses it)."""
    from tritongpt.model.config import GPTConfig
    from tritongpt.model.gpt import GPTModel
    from tritongpt.train.reward import RewardModel

    RewardModel(GPTModel(GPTConfig(vocab_size=300, context_length=16, n_embd=16, n_layer=1, n_head=2))).save(
        tmp_path / "rm.safetensors")
    assert cli.main(["info", "--weights", str(tmp_path / "rm.safetensors"), "--model", "tiny"]) == 2
    assert "--model names the heads of a GPT-2 file without config.json; " in capsys.readouterr().err
    assert cli.main(["info", "--weights", str(tmp_path / "rm.safetensors")]) == 0


@pytest.mark.parametrize("cmd", ["pretrain", "rlhf"])  # TrainArgs' check (every other trainer's) and RLArgs'
@pytest.mark.parametrize("flags", [["--run-name", "r1"], ["--wandb-project", "p", "--report-to", "tensorboard"]])
def test_a_wandb_setting_without_wandb_is_refused(cmd, flags, tmp_path, capsys):
    assert cli.main([cmd, *flags, "--out-dir", str(tmp_path / "run")]) == 2
    assert f"{flags[0]} is wandb's (the run's name and project there): pass --report-to wandb too" in \
        capsys.readouterr().err


@pytest.mark.parametrize("cmd", ["serve", "run-batch"])
@pytest.mark.parametrize("flags", [["--max-batch", "4"], ["--kv-page-size", "32"], ["--max-loras", "0"],
                                   ["--enable-prefix-caching"], ["--kv-cache-dtype", "int8"],
                                   ["--generation-config", "vllm"]])
def test_the_pooling_runner_refuses_a_generation_flag(cmd, flags, tmp_path, capsys):
    """--runner pooling decodes nothing: serve's engine and generation flags off serve's own defaults are refused
    by name, before the model (not there) is loaded and run-batch's input (not there either) is read."""
    files = ["-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl")] * (cmd == "run-batch")
    assert cli.main([cmd, *files, "--runner", "pooling", "--weights", str(tmp_path / "none"), *flags]) == 2
    assert f"{flags[0]} is a generation setting: --runner pooling serves embeddings" in capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == []


def test_the_pooling_runner_takes_the_generation_flags_at_their_defaults(tmp_path, capsys):
    """serve's defaults named (--max-batch 8, --kv-cache-dtype auto, --generation-config auto) are not given: the
    run goes on to load its --weights (not there)."""
    assert cli.main(["serve", "--runner", "pooling", "--weights", str(tmp_path / "none"), "--max-batch", "8",
                     "--kv-cache-dtype", "auto", "--generation-config", "auto"]) == 2
    err = capsys.readouterr().err
    assert "generation setting" not in err and str(tmp_path / "none") in err


def test_the_pooling_runner_refuses_a_chat_template_for_an_embedder_before_loading(tmp_path, monkeypatch, capsys):
    """--chat-template lays out a reward model's chats; --weights that hold a language model embed, and the
    refusal comes before the model is loaded (the load here: an error the test would see)."""
    from tritongpt import commands
    from tritongpt.model.config import GPTConfig
    from tritongpt.model.gpt import GPTModel

    GPTModel(GPTConfig(vocab_size=64, context_length=8, n_embd=8, n_layer=1, n_head=1)).save(tmp_path / "m.safetensors")
    monkeypatch.setattr(commands, "load_generation_model", lambda args: pytest.fail("the model was loaded"))
    assert cli.main(["serve", "--runner", "pooling", "--weights", str(tmp_path / "m.safetensors"),
                     "--chat-template", "{{ messages }}"]) == 2
    assert "--chat-template lays out a reward model's chats" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--chat-template", "{{ messages }}"], ["--convert", "reward"]])
def test_the_pooling_runner_says_a_missing_weights_path_as_such(flags, tmp_path, capsys):
    """--weights that are not there: the load's own error, not that they are no reward model (which a typo in a
    reward model's path would read as)."""
    cmd = ["serve", "--runner", "pooling", "--weights", str(tmp_path / "none"), *flags]
    assert cli.main(cmd) == 2
    assert capsys.readouterr().err == f"error: no checkpoint found at {tmp_path / 'none'}\n"
