"""The command line: help, info, generate, and one-line errors for bad input."""
import argparse
import runpy
import subprocess
import sys

import pytest
import torch

from tritongpt.cli import command_help, main
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.tokenizer import BPETokenizer
from tritongpt.train.data import load_text


def test_python_started_in_the_checkout_imports_the_pypi_kernels_package():
    """`python -m pytest` (and any script) run from the checkout's root has it on sys.path, where kernels/ would
    be the top-level `kernels` that transformers 5 imports from PyPI; importing tritongpt binds the name to the
    installed package instead."""
    import importlib.machinery
    from pathlib import Path

    import tritongpt

    root = Path(tritongpt.__file__).resolve().parent.parent
    code = "import sys; sys.path.insert(0, ''); import tritongpt, kernels; print(kernels.__file__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    installed = [p for p in sys.path if p and Path(p).resolve() != root]
    if importlib.machinery.PathFinder.find_spec("kernels", installed) is None:
        assert out.returncode == 0 and str(root / "kernels") in out.stdout  # nothing to shadow: left alone
        pytest.skip("the PyPI package kernels is not installed")
    assert out.returncode == 0, out.stderr
    assert not Path(out.stdout.strip()).resolve().is_relative_to(root), out.stdout


@pytest.mark.parametrize("module", ["tritongpt.cli", "tritongpt"])
def test_help_lists_every_command(module, monkeypatch, capsys):
    """`python -m tritongpt.cli` (torchrun's form) and `python -m tritongpt` are the `tritongpt` script; its
    help lists every command with its line without importing torch (a command imports its own module only)."""
    code = (f"import runpy, sys; sys.argv = ['tritongpt', '--help']\n"
            f"try:\n    runpy.run_module({module!r}, run_name='__main__')\n"
            f"except SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip().endswith("exit 0 False"), out.stdout  # printed, and torch never imported
    flat = " ".join(out.stdout.split())  # argparse wraps the lines
    for cmd in ("info", "generate", "bpe", "pretrain", "sft", "reward", "rlhf", "dpo", "kto", "bench", "export", "eval",
                "hellaswag", "chat"):
        assert f"{cmd} {' '.join(command_help(cmd).split())}" in flat, cmd
    if module == "tritongpt":  # its exit status is main()'s: run as -m runs it, in this process (a fresh one ~3 s)
        monkeypatch.setattr(sys, "argv", ["tritongpt", "generate"])
        with pytest.raises(SystemExit) as bad:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        assert bad.value.code == 2 and "--prompt" in capsys.readouterr().err


def test_every_command_is_its_modules_and_a_command_builds_its_own_only():
    """build_parser() is the whole command line: each COMMANDS entry is defined (with its function) by the
    module it names, which shows the same help line; build_parser([name]) imports only name's module and
    lists the others by name (no options, no function), and main() runs a command through it."""
    from tritongpt.cli import COMMANDS, build_parser, main

    def commands(parser):
        return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))

    full = commands(build_parser())
    assert list(full.choices) != [] and set(full.choices) == set(COMMANDS)
    def runs(parser):  # a function, or actions of its own that have one (bpe's)
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        return parser.get_default("func") is not None or bool(subs) and all(map(runs, subs[0].choices.values()))

    assert all(runs(full.choices[c]) for c in COMMANDS)
    assert {a.dest: a.help for a in full._choices_actions} == {c: line for c, (_, line) in COMMANDS.items()}
    only = commands(build_parser(["bpe"]))
    assert set(only.choices) == set(COMMANDS)
    assert commands(only.choices["bpe"]).choices.keys() == {"train", "encode", "decode"}  # bpe's own, whole
    assert runs(only.choices["bpe"]) and not runs(only.choices["pretrain"])
    assert len(only.choices["pretrain"]._actions) == 1  # -h alone
    assert main(["bpe", "encode", "--text", "hi"]) == 0


def every_flag(parser, path=("tritongpt",)):
    """(command path, action) for each option and argument of every command and subcommand, --help's aside."""
    import argparse

    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from every_flag(sub, path + (name,))
        elif not isinstance(a, argparse._HelpAction):
            yield path, a


def test_every_flag_and_argument_has_a_help_text():
    """--help describes every option of every command and subcommand (argparse prints an option
    without help as its bare name, e.g. pretrain's --temperature said nothing of its default)."""
    from tritongpt.cli import build_parser

    flags = list(every_flag(build_parser()))
    bare = [f"{' '.join(path)} {'/'.join(a.option_strings) or a.dest}" for path, a in flags
            if not (a.help or "").strip()]
    assert len(flags) > 150 and bare == []


def test_every_weights_flag_says_what_load_checkpoint_reads():
    """Every --weights reads load_checkpoint's inputs (Hugging Face folders of any family it reads, .gguf files, our
    checkpoints) and says so with the one shared text: hellaswag's and lambada's wrote out "a Hugging Face GPT-2 or
    GPT-Neo model.safetensors", stale once Llama, Qwen, GGUF ... loaded there too."""
    from tritongpt.cli import build_parser
    from tritongpt.train.tokenizer import HF_WEIGHTS_HELP

    weights = [(path, a) for path, a in every_flag(build_parser()) if "--weights" in a.option_strings]
    stale = [" ".join(path) for path, a in weights if HF_WEIGHTS_HELP not in a.help]
    assert {"hellaswag", "lambada", "eval", "generate"} <= {path[-1] for path, _ in weights} and stale == []
    assert ".gguf" in HF_WEIGHTS_HELP and "any family" in HF_WEIGHTS_HELP


def test_a_default_a_help_text_writes_out_is_the_flags_default():
    """A help text that writes a flag's number default out (not as %(default)s) states the default argparse has: a
    default changed in the code but not in the text would tell every --help reader the old one. (A flag whose
    default is None is resolved later, a preset's or the run's, in words; bench --seq-len's 128 is decode's.)"""
    import re

    from tritongpt.cli import build_parser

    stated = re.compile(r"\bdefault:?\s+(-?(?:\d[\d.e+-]*|inf))(?![\w.])")
    per_mode = {("bench", "--seq-len")}
    checked, wrong = 0, []
    for path, a in every_flag(build_parser()):
        if not a.help or not isinstance(a.default, (int, float)) or isinstance(a.default, bool):
            continue
        flag = "/".join(a.option_strings) or a.dest
        if (path[-1], flag) in per_mode:
            continue
        for m in stated.finditer(a.help):
            checked += 1
            if float(m.group(1)) != float(a.default):
                wrong.append(f"{' '.join(path)} {flag}: help says default {m.group(1)}, it is {a.default!r}")
    assert checked >= 5 and wrong == []


def readme_anchors(text: str) -> set:
    """The #anchors of a markdown text's headings, as GitHub spells them (lower case, punctuation dropped, spaces as
    hyphens); a '# comment' inside a code block is no heading. (tests/test_readme_families.py uses it too.)"""
    import re

    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", text, flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_readme_names_only_flags_files_presets_and_anchors_that_exist():
    """README drift: every `--flag` it names is some command's (torchrun's and tensorboard's aside), every command
    it shows (`tritongpt CMD ...` lines, `CMD --flag` in prose) takes the flags shown with it, every repository path
    it names (a file, or a folder with its /) exists, every pip extra and --model preset it names is defined, and
    every [link](#anchor) is one of its headings, as GitHub spells them; a value shown for a flag or an action with
    choices (`--dtype bf16`, `bench kernels|train|all`) is one of them."""
    import re
    from pathlib import Path

    import tritongpt
    from tritongpt.cli import build_parser

    root = Path(tritongpt.__file__).resolve().parent.parent
    if not (root / "README.md").exists():
        pytest.skip("not a checkout: no README.md beside the package")
    text = (root / "README.md").read_text()
    flags_of, actions_of = {}, {}

    def walk(parser, name):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub_name, sub in a.choices.items():
                    walk(sub, f"{name} {sub_name}".strip())
        flags_of[name] = {o for a in parser._actions for o in a.option_strings}
        actions_of[name] = {o: a for a in parser._actions for o in a.option_strings}
        actions_of[name][""] = next((a for a in parser._actions if not a.option_strings and a.choices
                                     and not isinstance(a, argparse._SubParsersAction)), None)

    walk(build_parser(), "")
    flag = r"(?<![\w-])--[a-z][a-z0-9-]*"
    known = set().union(*flags_of.values()) | {"--nproc-per-node", "--standalone", "--logdir"}
    assert sorted(set(re.findall(flag, text)) - known) == []
    names = sorted(flags_of, key=len, reverse=True)
    shown = re.findall(r"`([^`\n]+)`", text) + [line.split("  #")[0] for line in text.splitlines()
                                                 if line.startswith(("tritongpt ", "torchrun "))]
    wrong = []
    for span in shown:
        span = re.sub(r"^(torchrun .*?-m tritongpt\.cli |python -m tritongpt |tritongpt )", "", span)
        cmd = next((c for c in names if c and (span + " ").startswith(c + " ")), None)
        wrong += [f"{cmd} {f}" for f in re.findall(flag, span) if cmd and f not in flags_of[cmd]]
        if not cmd:
            continue
        # the values shown of a flag with choices (`--dtype bf16`, `--algo ppo|grpo|rloo`; not a placeholder such
        # as FILE), and of a positional with choices (`bench kernels|train|all`)
        what = actions_of[cmd][""]
        first = span[len(cmd):].split()[:1]
        shown_values = [(f, v, actions_of[cmd].get(f)) for f, v in re.findall(f"({flag})[ =]([a-z][\\w.,/|-]*)", span)]
        shown_values += [("", first[0], what)] if what and first and re.match(r"[a-z][\w|-]*$", first[0]) else []
        wrong += [" ".join(filter(None, (cmd, f, v))) for f, value, a in shown_values if a is not None and a.choices
                  for v in value.split("|") if v not in a.choices]
    assert wrong == []
    top = r"(?<![\w./-])((?:\.ci|bench|kernels|model|tests|train|tritongpt)/"
    paths = set(re.findall(top + r"[\w./-]*(?:\.\w+|/))(?![\w-])", text))
    assert len(paths) > 20 and sorted(p for p in paths if not (root / p).exists()) == []
    extras = set(re.findall(r"\.\[(\w+)\]", text))  # pip install -e ".[track]"
    assert extras and sorted(e for e in extras if f"\n{e} = [" not in (root / "pyproject.toml").read_text()) == []
    from tritongpt.model.config import PRESETS
    ours = re.sub(r"^lm_eval .*$", "", text, flags=re.M)  # (lm-eval's own --model names its model classes)
    models = set(re.findall(r"--models? ([\w.-]+)", ours)) - {"MODEL"}
    assert "gpt2-small" in models and sorted(models - set(PRESETS)) == []
    anchors = readme_anchors(text)
    links = re.findall(r"\]\(#([^)]+)\)", text)
    assert links and sorted(set(links) - anchors) == []


def test_readme_s_pytest_commands_of_a_file_select_tests():
    """README Testing's `python -m pytest ... tests/FILE -k PATTERN` examples select at least one test as written
    (pytest exits 5 on none: a -k pattern that matches no test of the file ran nothing)."""
    import re
    import shlex
    from pathlib import Path

    import tritongpt

    root = Path(tritongpt.__file__).resolve().parent.parent
    if not (root / "README.md").exists():
        pytest.skip("not a checkout: no README.md beside the package")
    spans = [s for s in re.findall(r"`(python -m pytest [^`]+)`", (root / "README.md").read_text()) if " tests/" in s]
    assert spans
    for span in spans:
        words = shlex.split(span)[3:]
        run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                              "-p", "no:xdist", *words], capture_output=True, text=True, cwd=root)
        assert run.returncode == 0, (span, run.stdout[-500:])


def test_info_counts_parameters(capsys):
    assert main(["info", "--model", "gpt2-small"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("model        gpt2-small\n") and "124,439,808 (124.4M, tied LM head)" in out
    assert main(["info", "--model", "gpt2-small", "--untied"]) == 0
    assert "163,037,184 (163.0M, untied LM head)" in capsys.readouterr().out
    assert main(["info"]) == 0
    assert "model        gpt2-small\n" in capsys.readouterr().out  # the default


def test_info_says_what_a_zero_or_overridden_field_stands_for(tmp_path, capsys):
    """mlp_hidden 0 is Llama's rule, n_kv_head 0 one KV head per head, rotary_dim 0 the whole head, and qkv_bias
    is inert without biases: info says the value the model has, not only the stored 0 or True."""
    cfg = GPTConfig(vocab_size=64, context_length=16, n_embd=96, n_layer=1, n_head=6, n_kv_head=0, bias=False,
                    mlp="swiglu", norm="rmsnorm", position_encoding="rope")
    GPTModel(cfg).save(tmp_path / "w.safetensors")
    assert main(["info", "--weights", str(tmp_path / "w.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "  mlp_hidden      0 (Llama's rule: 256)\n" in out
    assert "  n_kv_head       0 (as many as the heads: 6)\n" in out
    assert "  qkv_bias        True (no effect: bias False drops every bias)\n" in out
    assert "  rotary_dim      0 (the whole head: 16)\n" in out
    assert main(["info", "--model", "gpt2-small"]) == 0
    out = capsys.readouterr().out  # GPT-2: biases, GELU, learned positions: nothing to explain but the KV heads
    assert "  mlp_hidden      0\n" in out and "  qkv_bias        True\n" in out and "  rotary_dim      0\n" in out
    # the squared-ReLU MLP's 0 is GPT-2's 4 n_embd
    GPTModel(GPTConfig(vocab_size=64, context_length=16, n_embd=96, n_layer=1, n_head=6, mlp="relu2")).save(
        tmp_path / "r.safetensors")
    assert main(["info", "--weights", str(tmp_path / "r.safetensors")]) == 0
    assert "  mlp_hidden      0 (4 n_embd: 384)\n" in capsys.readouterr().out


def test_info_on_a_checkpoint_says_its_config_and_its_run(saved_model, tmp_path, capsys):
    """info --weights: the checkpoint's own config and parameter count, and what its training
    state says of the run (trainer, step, precision, --init, data, saved tokenizer); a bare
    weights file says it has no run."""
    assert main(["pretrain", "--data", "pydoc", "--tokenizer", str(saved_model / "tok.json"), "--out-dir",
                 str(tmp_path / "run"), "--device", "cpu", "--kernels", "reference", "--block-size", "16",
                 "--batch-size", "2", "--max-steps", "2", "--eval-every", "0", "--sample-tokens", "0",
                 "--init", str(saved_model / "w.safetensors")]) == 0
    capsys.readouterr()
    for where in (tmp_path / "run", tmp_path / "run" / "ckpt-0000002" / "model.safetensors"):
        assert main(["info", "--weights", str(where)]) == 0
        out = capsys.readouterr().out
        n = GPTModel.load(saved_model / "w.safetensors").num_params()
        assert f"model        {tmp_path / 'run' / 'ckpt-0000002' / 'model.safetensors'}\n" in out
        assert "  n_embd          32\n  n_layer         2\n" in out and f"parameters   {n:,} (" in out
        assert "  attention_window 0\n  window_layers   all\n" in out  # 16 letters: still a space after
        assert (f"run          pretrain, step 2 of 2 (float32, kernels reference, 1 process); from --init "
                f"{saved_model / 'w.safetensors'}\n") in out
        assert "data         pydoc: " in out and "training tokens, 16-token blocks\n" in out
        assert f"tokenizer    {tmp_path / 'run' / 'tokenizer.json'}\n" in out
    assert main(["info", "--weights", str(saved_model / "w.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "run          - (no training state beside" in out and "tokenizer    - (none saved with it" in out
    assert main(["info", "--weights", str(saved_model / "w.safetensors"), "--untied"]) == 2
    assert "--untied counts a preset" in capsys.readouterr().err
    assert main(["info", "--weights", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint found" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["info"], ["generate", "--prompt", "hi", "--device", "cpu"]])
def test_unknown_model_is_a_one_line_error(argv, capsys):
    """generate's random model too: no note that 'gpt9 has random weights' before the error."""
    assert main(argv + ["--model", "gpt9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown model 'gpt9'") and "\n" not in err


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    tok = BPETokenizer.train(load_text("pydoc")[:20000], 300)
    tok.save(tmp / "tok.json")
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=tok.vocab_size, context_length=32, n_embd=32, n_layer=2, n_head=2))
    model.save(tmp / "w.safetensors")
    return tmp


def test_generate_from_saved_weights(saved_model, capsys):
    args = ["generate", "--weights", str(saved_model / "w.safetensors"), "--tokenizer",
            str(saved_model / "tok.json"), "--prompt", "The def statement", "--max-new-tokens", "8",
            "--temperature", "0"]
    assert main(args) == 0
    out = capsys.readouterr()
    first = out.out
    assert first.startswith("The def statement") and len(first) > len("The def statement")
    assert "only the tokenizer's ids are drawn" not in out.err  # the tokenizer covers the model's ids
    assert main(args) == 0
    assert capsys.readouterr().out == first  # greedy is deterministic


def test_an_allocation_too_large_is_a_one_line_error_and_other_runtime_errors_stay_tracebacks(monkeypatch, capsys):
    import tritongpt.commands as commands

    # a size asked for past any machine's memory (2**60 bytes: past a 64-bit process's address space, so it fails
    # whatever the machine's overcommit) fails inside torch's allocator, as `generate --num-samples 100000000` does
    monkeypatch.setattr(commands, "cmd_info", lambda args: torch.empty(2**60, dtype=torch.uint8))
    assert main(["info"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory: DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                          "1152921504606846976 bytes") and "ask for less" in err and err.count("\n") == 1

    def fails(args):
        raise RuntimeError("a bug, not a size")
    monkeypatch.setattr(commands, "cmd_info", fails)
    with pytest.raises(RuntimeError, match="a bug, not a size"):
        main(["info"])


def test_paths_the_system_refuses_are_one_line_errors(tmp_path, capsys):
    """An OSError (a folder that cannot be made, a file that cannot be written) is the user's
    path, named in one line with the system's reason, not a traceback."""
    corpus = tmp_path / "c.txt"
    corpus.write_text(load_text("pydoc")[:3000])
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["bpe", "train", "--input", str(corpus), "--vocab-size", "300",
                 "--out", str(blocker / "tok.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: [Errno") and str(blocker) in err and "\n" not in err, err
    # --text-field on plain text is refused before the training, as pretrain refuses it (it was ignored)
    assert main(["bpe", "train", "--input", str(corpus), "--text-field", "body", "--vocab-size", "300",
                 "--out", str(tmp_path / "tok.json")]) == 2
    assert "--text-field applies to .jsonl data" in capsys.readouterr().err
    # --out naming the corpus itself: it was read, then replaced by the tokenizer's JSON
    assert main(["bpe", "train", "--input", str(corpus), "--vocab-size", "300", "--out", str(corpus)]) == 2
    assert "is the --input corpus" in capsys.readouterr().err
    assert corpus.read_text() == load_text("pydoc")[:3000]


def test_generate_with_a_tokenizer_smaller_than_the_model(saved_model, tmp_path, capsys):
    """Ids past the tokenizer cannot be decoded: they are not drawn (the whole generation used to
    run, then fail at decode), and the note says so."""
    torch.manual_seed(1)
    big = GPTModel(GPTConfig(vocab_size=400, context_length=32, n_embd=32, n_layer=2, n_head=2))
    with torch.no_grad():
        big.tok_emb.weight[300:] += 5.0  # tied LM head: the extra ids are the likeliest
    big.save(tmp_path / "big.safetensors")
    assert main(["generate", "--weights", str(tmp_path / "big.safetensors"), "--tokenizer",
                 str(saved_model / "tok.json"), "--prompt", "The", "--max-new-tokens", "12",
                 "--temperature", "1.0"]) == 0
    out = capsys.readouterr()
    assert "the tokenizer has 300 tokens, the model 400: only the tokenizer's ids are drawn" in out.err
    assert out.out.startswith("The") and len(out.out) > 4


def test_generate_errors(saved_model, capsys):
    base = ["generate", "--tokenizer", str(saved_model / "tok.json")]
    assert main(base + ["--weights", str(saved_model / "missing.safetensors"), "--prompt", "x"]) == 2
    assert "no checkpoint found" in capsys.readouterr().err
    long_prompt = "word " * 200
    assert main(base + ["--weights", str(saved_model / "w.safetensors"), "--prompt", long_prompt]) == 2
    assert "context is 32" in capsys.readouterr().err
    assert main(base + ["--weights", str(saved_model / "w.safetensors"), "--prompt", ""]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    # a prompt of exactly the context predicts from a full window
    tok = BPETokenizer.load(saved_model / "tok.json")
    full = tok.decode(tok.encode("The def statement is " * 12)[:32])
    assert len(tok.encode(full)) == 32
    assert main(base + ["--weights", str(saved_model / "w.safetensors"), "--prompt", full,
                        "--max-new-tokens", "3", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith(full)
    for flags, said in ((["--temperature", "nan"], "--temperature must be a finite number"),
                        (["--top-k", "0", "--temperature", "0"], "--top-k must be a positive integer"),
                        (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
                        (["--seed", str(2**64)], "--seed must be a 64-bit integer"),  # was torch's overflow
                        # more beams returned than the 300 one-token texts: the rest were empty slots, scored -1e9
                        (["--num-beams", "301", "--num-return-sequences", "301", "--max-new-tokens", "1"],
                         "--num-return-sequences 301 is more than the 300 texts of --max-new-tokens 1")):
        assert main(base + ["--weights", str(saved_model / "w.safetensors"), "--prompt", "x", *flags]) == 2
        assert said in capsys.readouterr().err, flags
    w = ["--weights", str(saved_model / "w.safetensors")]
    assert main(base + w + ["--prompt", "a<|endoftext|>b"]) == 2
    assert "pass --allow-special" in capsys.readouterr().err
    assert main(base + w + ["--prompt", "a<|endoftext|>b", "--allow-special", "--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    # --pretrained downloads by a GPT-2 or GPT-Neo name: with another preset or with --weights it was ignored
    assert main(base + ["--model", "tiny", "--pretrained", "--prompt", "x"]) == 2
    assert "--pretrained downloads GPT-2 or GPT-Neo by --model name (gpt2-small|gpt2|gpt2-medium|gpt2-large|gpt2-xl|" \
        "gpt-neo-125m|gpt-neo-1.3B|gpt-neo-2.7B), not 'tiny'" in capsys.readouterr().err
    assert main(base + w + ["--pretrained", "--prompt", "x"]) == 2
    assert "pass one of them" in capsys.readouterr().err
    # a file that is not safetensors (a checkpoint's state.pt, say) as weights, for generate and sft
    (saved_model / "state.pt").write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    assert main(base + ["--weights", str(saved_model / "state.pt"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "state.pt is not a readable safetensors file" in err and "\n" not in err, err
    assert main(["sft", "--init", str(saved_model / "state.pt"), "--out-dir", str(saved_model / "sft")]) == 2
    assert "state.pt is not a readable safetensors file" in capsys.readouterr().err


def test_a_tokenizer_other_than_the_runs_gets_a_note(saved_model, tmp_path, capsys):
    """A run folder keeps the tokenizer the model was trained with; another --tokenizer (here a
    smaller BPE whose ids mean other strings) still runs, with a note saying so."""
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(saved_model / "w.safetensors", run / "model.safetensors")
    shutil.copy(saved_model / "tok.json", run / "tokenizer.json")
    BPETokenizer.train(load_text("pydoc")[:20000], 280).save(tmp_path / "other.json")
    args = ["generate", "--weights", str(run), "--prompt", "The", "--max-new-tokens", "2", "--temperature", "0"]
    assert main(args) == 0
    assert "note: --tokenizer" not in capsys.readouterr().err
    assert main(args + ["--tokenizer", str(run / "tokenizer.json")]) == 0
    assert "note: --tokenizer" not in capsys.readouterr().err
    assert main(args + ["--model", "gpt2-small"]) == 0  # the file's own config is used, and said so
    assert "holds a model of n_layer 2, n_head 2, n_embd 32 (its saved config, used), not gpt2-small's" \
        in capsys.readouterr().err
    main(args + ["--tokenizer", str(tmp_path / "other.json")])  # may fail later on an id it lacks
    assert f"note: --tokenizer {tmp_path / 'other.json'} is not the tokenizer saved with the run" \
        in capsys.readouterr().err


def test_generate_stops_at_the_tokenizers_end_of_text(saved_model, tmp_path, monkeypatch, capsys):
    """generate stops at the tokenizer's <|endoftext|>: a model whose likeliest token is always
    that one (final LayerNorm gives a constant vector, the tied head scores it 32 for <|endoftext|>,
    near 0 for the rest) prints the prompt alone, once: generation ended after no new token, and
    the marker that ended it is said on stderr, not printed as text."""
    tok = BPETokenizer.load(saved_model / "tok.json")
    eot = tok.special_tokens["<|endoftext|>"]
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=tok.vocab_size, context_length=32, n_embd=32, n_layer=2, n_head=2))
    with torch.no_grad():
        model.final_norm.weight.zero_()
        model.final_norm.bias.fill_(1.0)
        model.tok_emb.weight[eot] = 1.0
    model.save(tmp_path / "eot.safetensors")
    assert main(["generate", "--weights", str(tmp_path / "eot.safetensors"), "--tokenizer",
                 str(saved_model / "tok.json"), "--prompt", "The", "--max-new-tokens", "8", "--temperature", "0"]) == 0
    out = capsys.readouterr()
    assert out.out == "The\n"
    assert "note: the model ended the text (<|endoftext|>) after 0 new tokens" in out.err
    # streamed, and two samples: the same text, each sample's end said
    ends = ["generate", "--weights", str(tmp_path / "eot.safetensors"), "--tokenizer", str(saved_model / "tok.json"),
            "--prompt", "The", "--max-new-tokens", "8", "--temperature", "0"]
    from tritongpt.train import generate as gen

    drawn, real = [], gen.generate

    def count(*a, on_token=None, **k):  # the steps generation takes
        return real(*a, on_token=lambda new: (drawn.append(new), on_token(new)), **k)

    monkeypatch.setattr(gen, "generate", count)
    assert main(ends + ["--stream"]) == 0
    monkeypatch.setattr(gen, "generate", real)
    out = capsys.readouterr()
    assert out.out == "The\n" and "note: the model ended the text (<|endoftext|>) after 0 new tokens" in out.err
    assert len(drawn) == 1  # generation stopped at the marker, not after --max-new-tokens 8
    assert main(ends + ["--num-samples", "2"]) == 0
    out = capsys.readouterr()
    assert out.out == "The\n---------------\nThe\n"
    assert "note: sample 1: the model ended" in out.err and "note: sample 2: the model ended" in out.err
    # a prompt's own marker is the prompt's text, kept
    assert main(["generate", "--weights", str(tmp_path / "eot.safetensors"), "--tokenizer",
                 str(saved_model / "tok.json"), "--prompt", "The<|endoftext|>", "--allow-special",
                 "--max-new-tokens", "0"]) == 0
    out = capsys.readouterr()
    assert out.out == "The<|endoftext|>\n" and "ended the text" not in out.err


def test_generate_seed_fixes_the_sampled_text(saved_model, capsys):
    """--seed makes sampling reproducible: the same seed gives the same text, another seed
    other text (16 tokens drawn at temperature 1 from a near-uniform 300-token model)."""
    base = ["generate", "--weights", str(saved_model / "w.safetensors"), "--tokenizer", str(saved_model / "tok.json"),
            "--prompt", "The", "--max-new-tokens", "16", "--temperature", "1.0"]
    texts = []
    for seed in ("5", "5", "6"):
        assert main(base + ["--seed", seed]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] != texts[2], texts



def test_generate_draws_several_samples_and_streams_one(saved_model, tmp_path, monkeypatch, capsys):
    """--num-samples N draws N texts from the prompt in one batch (greedy: N copies of the single
    text; sampled: different texts); --stream prints the text while it is drawn, and what it prints
    is the text printed without it (random bytes from a near-uniform model cut characters across
    tokens and make invalid UTF-8: the stream's decoder must give decode()'s U+FFFD where it does);
    --prompt-file reads the prompt from a file."""
    from tritongpt.train import generate as gen

    base = ["generate", "--weights", str(saved_model / "w.safetensors"), "--tokenizer", str(saved_model / "tok.json"),
            "--prompt", "Thé", "--max-new-tokens", "16"]
    assert main(base + ["--temperature", "0"]) == 0
    one = capsys.readouterr().out
    assert main(base + ["--temperature", "0", "--num-samples", "3"]) == 0
    assert capsys.readouterr().out == "---------------\n".join([one] * 3)
    assert main(base + ["--temperature", "1", "--num-samples", "3"]) == 0
    texts = capsys.readouterr().out.split("---------------\n")
    assert len(texts) == 3 and all(t.startswith("Thé") for t in texts) and len(set(texts)) == 3, texts

    pieces, real = [], gen.generate

    def watch(*a, on_token=None, **k):  # what stdout holds each time a token is drawn
        def seen(new):
            on_token(new)
            pieces.append(capsys.readouterr().out)
        return real(*a, on_token=seen if on_token else None, **k)

    cut = []
    for seed in ("1", "2", "3", "4"):
        flags = ["--temperature", "1", "--seed", seed]
        assert main(base + flags) == 0
        whole = capsys.readouterr().out
        cut.append("\ufffd" in whole)
        monkeypatch.setattr(gen, "generate", watch)
        pieces.clear()
        assert main(base + flags + ["--stream"]) == 0
        monkeypatch.setattr(gen, "generate", real)
        assert "".join(pieces) + capsys.readouterr().out == whole
        assert sum(map(bool, pieces)) > 8  # printed as it went, not at the end
    assert any(cut)  # the draws do cut characters

    (tmp_path / "prompt.txt").write_bytes("Thé".encode())
    assert main([*base[:5], "--prompt-file", str(tmp_path / "prompt.txt"), *base[7:], "--temperature", "0"]) == 0
    assert capsys.readouterr().out == one
    # exactly as it is: its \r\n and final newline are the prompt's (no newline translation, no strip)
    (tmp_path / "crlf.txt").write_bytes(b"The\r\ndef \n")
    assert main([*base[:5], "--prompt-file", str(tmp_path / "crlf.txt"), "--max-new-tokens", "0"]) == 0
    assert capsys.readouterr().out == "The\r\ndef \n\n"
    for bad, said in ((["--num-samples", "0"], "--num-samples must be at least 1, got 0"),
                      (["--stream", "--num-samples", "2"], "--stream prints one text as it is drawn"),
                      ):
        assert main(base + bad) == 2
        assert said in capsys.readouterr().err
    for path, said in ((tmp_path / "none.txt", "file not found"), (tmp_path, "is a folder, not a file")):
        assert main([*base[:5], "--prompt-file", str(path), *base[7:]]) == 2
        assert said in capsys.readouterr().err
    (tmp_path / "bad.txt").write_bytes(b"ab\xff")
    assert main([*base[:5], "--prompt-file", str(tmp_path / "bad.txt"), *base[7:]]) == 2
    assert "bad.txt: not UTF-8 text (byte 2: invalid start byte)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one prompt or the other
        main(base + ["--prompt-file", str(tmp_path / "prompt.txt")])


def test_stream_flushes_each_piece_as_it_is_drawn(saved_model, monkeypatch):
    """--stream is for a terminal or a pipe: each token's text is flushed when it is printed (a
    pipe's stdout is block-buffered, and the text would come at the end, all at once)."""
    import io

    from tritongpt.train import generate as gen

    class Stdout(io.StringIO):
        flushed = ""

        def flush(self):
            self.flushed = self.getvalue()

    stdout, unflushed, real = Stdout(), [], gen.generate

    def watch(*a, on_token=None, **k):
        def seen(new):
            on_token(new)
            unflushed.append(stdout.getvalue()[len(stdout.flushed):])
        return real(*a, on_token=seen, **k)

    monkeypatch.setattr(gen, "generate", watch)
    monkeypatch.setattr(sys, "stdout", stdout)
    assert main(["generate", "--weights", str(saved_model / "w.safetensors"), "--tokenizer",
                 str(saved_model / "tok.json"), "--prompt", "The", "--max-new-tokens", "6", "--temperature", "1",
                 "--seed", str(torch.randint(0, 2**31, ()).item()), "--stream"]) == 0
    assert len(unflushed) == 6 and set(unflushed) == {""} and stdout.getvalue().startswith("The")


def test_generate_top_k_and_top_p_reach_the_sampler(saved_model, capsys):
    """--top-k 1, and a --top-p below every token's probability, keep only the likeliest token:
    sampling at temperature 1 then gives the greedy text (16 draws from a near-uniform model
    would not)."""
    base = ["generate", "--weights", str(saved_model / "w.safetensors"), "--tokenizer", str(saved_model / "tok.json"),
            "--prompt", "The", "--max-new-tokens", "16", "--seed", str(torch.randint(0, 2**31, ()).item())]
    assert main(base + ["--temperature", "0"]) == 0
    greedy = capsys.readouterr().out
    for flags in (["--top-k", "1"], ["--top-p", "1e-6"]):
        assert main(base + ["--temperature", "1", *flags]) == 0
        assert capsys.readouterr().out == greedy, flags


def test_notes_come_from_rank_0_only(monkeypatch, capsys):
    """Under torchrun every rank runs the same code: a note is printed by rank 0 (or a process
    without RANK), not once per rank."""
    from tritongpt.errors import note

    for rank, said in (("1", ""), ("3", ""), ("0", "note: hi\n"), (None, "note: hi\n")):
        if rank is None:
            monkeypatch.delenv("RANK", raising=False)
        else:
            monkeypatch.setenv("RANK", rank)
        note("hi")
        assert capsys.readouterr().err == said, rank


def test_generate_seed_fixes_a_random_weight_model(capsys):
    """Without --weights the model's random weights come from --seed too: greedy decoding (which
    draws nothing) repeats its text for one seed and changes it with another."""
    base = ["generate", "--model", "tiny", "--prompt", "The", "--max-new-tokens", "6", "--temperature", "0"]
    texts = []
    for seed in ("1", "1", "2"):
        assert main(base + ["--seed", seed]) == 0
        out = capsys.readouterr()
        assert "random weights" in out.err
        texts.append(out.out)
    assert texts[0] == texts[1] != texts[2], texts


def test_generate_runs_under_the_dtype_asked_for(saved_model, monkeypatch, capsys):
    """--dtype bf16 generates under bf16 autocast (the weights stay fp32); auto is fp32 on the CPU."""
    from tritongpt.train import generate as gen

    base = ["generate", "--weights", str(saved_model / "w.safetensors"), "--tokenizer", str(saved_model / "tok.json"),
            "--prompt", "The", "--max-new-tokens", "4", "--temperature", "0"]
    assert main(base + ["--dtype", "bf16"]) == 0 and capsys.readouterr().out.startswith("The")  # really runs
    seen, real = [], gen.generate

    def watch(model, *a, **k):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
                     next(model.parameters()).dtype))
        return real(model, *a, **k)

    monkeypatch.setattr(gen, "generate", watch)
    for flags in (["--dtype", "bf16"], [], ["--dtype", "fp16"]):
        assert main(base + flags) == 0
    assert [(on, on and dt, p) for on, dt, p in seen] == [(True, torch.bfloat16, torch.float32),
                                                          (False, False, torch.float32),
                                                          (True, torch.float16, torch.float32)]


def test_no_command_prints_help_and_ctrl_c_is_one_line(monkeypatch, capsys):
    """`tritongpt` alone prints the usage and exits 0; Ctrl-C inside a command is 'interrupted'
    and exit status 130 (a shell's convention for SIGINT), not a traceback."""
    assert main([]) == 0
    assert capsys.readouterr().out.startswith("usage: tritongpt")

    def interrupted(args):
        raise KeyboardInterrupt

    from tritongpt import commands

    monkeypatch.setattr(commands, "cmd_info", interrupted)
    try:
        rc = main(["info"])
    except KeyboardInterrupt:  # it would stop this test session, not fail the test
        pytest.fail("Ctrl-C escaped main(): a traceback, not a one-line message")
    assert rc == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_a_broken_pipe_is_141_only_where_stdout_s_reader_left(tmp_path, capsys, monkeypatch):
    """A BrokenPipeError is exit 141, quietly, only where stdout is a pipe whose reader left; stdout a file or a pipe
    still read, it is another path's (a FIFO's, a socket's): `error: [Errno 32] ...`, exit 2. Started with stdout
    closed (`tritongpt info >&-`: sys.stdout None, print a no-op) a command still runs and exits 0."""
    import os

    from tritongpt import commands

    def broken(args):
        print("a line")
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(commands, "cmd_info", broken)
    read, written = os.pipe()
    files = {"file": open(tmp_path / "out.txt", "w"), "pipe": open(written, "w")}
    for kind, stdout in files.items():
        monkeypatch.setattr("sys.stdout", stdout)
        assert main(["info"]) == 2, kind
        assert capsys.readouterr().err == "error: [Errno 32] Broken pipe\n", kind
        stdout.close()
    os.close(read)
    monkeypatch.setattr(commands, "cmd_info", lambda args: print("a line"))
    monkeypatch.setattr("sys.stdout", None)
    assert main(["info"]) == 0


def test_generate_runs_on_the_kernels_asked_for(saved_model, monkeypatch, capsys):
    """--kernels picks the path generate runs on (it was dropped without a word, the model left on
    the reference path); the default on a CPU is the reference."""
    from tritongpt.train import generate as gen

    seen = []

    def watch(model, idx, *a, **k):  # the kernels in force when generation starts; no work
        seen.append(sorted(model.kernels))
        return idx

    monkeypatch.setattr(gen, "generate", watch)
    base = ["generate", "--weights", str(saved_model / "w.safetensors"), "--tokenizer", str(saved_model / "tok.json"),
            "--prompt", "The", "--device", "cpu"]
    for flags in (["--kernels", "layernorm,mlp"], ["--kernels", "attention"], []):
        assert main(base + flags) == 0
        out, err = capsys.readouterr()
        assert out == "The\n"
        # on the CPU the Triton path is the interpreter: said, with the fast path, as the trainers say it
        assert ("Triton's interpreter" in err and "--kernels reference is the fast CPU path" in err) == bool(flags)
    assert seen == [["layernorm", "mlp"], ["attention"], []]


def test_pretrained_without_a_model_means_gpt2_small(monkeypatch, capsys):
    """generate --pretrained alone downloads GPT-2 small (the --model default of generate is what
    --weights holds, and a random 'tiny' is no GPT-2 to download)."""
    from tritongpt.train import gpt2_weights

    asked = []

    def fake(name, cache_dir=None):
        asked.append(name)
        raise UserError("offline in this test")

    monkeypatch.setattr(gpt2_weights, "load_gpt2_pretrained", fake)
    assert main(["generate", "--pretrained", "--prompt", "x", "--device", "cpu"]) == 2
    assert asked == ["gpt2-small"] and "offline in this test" in capsys.readouterr().err
    assert main(["generate", "--pretrained", "--model", "gpt2-medium", "--prompt", "x", "--device", "cpu"]) == 2
    assert asked == ["gpt2-small", "gpt2-medium"]


def test_info_says_each_runs_own_state(saved_model, tmp_path, capsys):
    """info --weights reads the run from the checkpoint's state as the Trainer writes it: the trainer,
    the step of its --max-steps, precision, kernels and processes as they were; no --init where the
    run had none; the data line only where the data state counts tokens (not an SFT run's position);
    --model, the heads of a GPT-2 file, noted where the checkpoint's own shape differs."""
    import random
    import shutil

    step, max_steps, tokens = random.randint(1, 50), random.randint(51, 99), random.randint(10**5, 10**7)
    states = {"sft": {"name": "sft", "args": {"max_steps": max_steps}, "world_size": 2, "prompt_format": "chat",
                      "data": [{"epoch": 0, "pos": 6, "epoch_seed": 1, "world_size": 2}] * 2},
              "pre": {"name": "pretrain", "args": {"max_steps": max_steps, "init": None, "label_smoothing": 0.0,
                                                   "z_loss": 1e-4}, "world_size": 1,
                      "data": [{"source": "x.txt", "train_tokens": tokens, "block_size": 64}]}}
    for run, state in states.items():
        ckpt = tmp_path / run / f"ckpt-{step:07d}"
        ckpt.mkdir(parents=True)
        shutil.copy(saved_model / "w.safetensors", ckpt / "model.safetensors")
        torch.save(dict(state, step=step, precision="torch.bfloat16", kernels="triton"), ckpt / "state.pt")
    assert main(["info", "--weights", str(tmp_path / "sft"), "--model", "tiny"]) == 0
    out, err = capsys.readouterr()
    assert f"run          sft, step {step} of {max_steps} (bfloat16, kernels triton, 2 processes)\n" in out
    assert "data " not in out and "tokenizer    - (none saved with it" in out and "objective" not in out
    assert "prompts      chat template (what `tritongpt chat` prompts it with)\n" in out
    assert "(its saved config, used), not tiny's" in err
    assert main(["info", "--weights", str(tmp_path / "pre")]) == 0
    out = capsys.readouterr().out
    assert f"run          pretrain, step {step} of {max_steps} (bfloat16, kernels triton, 1 process)\n" in out
    assert f"data         x.txt: {tokens:,} training tokens, 64-token blocks\n" in out and "prompts " not in out
    assert "objective    cross-entropy with z-loss 0.0001\n" in out  # --z-loss's run; no smoothing named


def test_info_says_an_rlhf_runs_iteration_of_its_iterations(saved_model, tmp_path, capsys):
    """An RLHF checkpoint's state counts iterations (of --iterations), not steps: info names them
    (it printed "step ? of ?")."""
    import shutil

    ckpt = tmp_path / "rlhf" / "ckpt-0000003"
    ckpt.mkdir(parents=True)
    shutil.copy(saved_model / "w.safetensors", ckpt / "model.safetensors")
    torch.save({"iteration": 3, "args": {"iterations": 7, "init": "runs/sft"}, "name": "rlhf-grpo",
                "precision": "torch.float32", "kernels": "reference", "prompt_format": "alpaca"}, ckpt / "state.pt")
    assert main(["info", "--weights", str(tmp_path / "rlhf")]) == 0
    out = capsys.readouterr().out
    assert ("run          rlhf-grpo, iteration 3 of 7 (float32, kernels reference, 1 process); "
            "from --init runs/sft\n") in out


@pytest.mark.parametrize("argv, usage, unknown", [
    (["rlhf", "--max-steps", "3"], "usage: tritongpt rlhf", "--max-steps 3"),
    (["pretrain", "--bogus"], "usage: tritongpt pretrain", "--bogus"),
    (["bpe", "train", "--out", "x", "--bogus"], "usage: tritongpt bpe train", "--bogus"),
    (["--bogus"], "usage: tritongpt [-h] COMMAND", "--bogus")])
def test_an_unknown_flag_is_named_with_its_command_s_usage(argv, usage, unknown, capsys):
    """argparse reports a subcommand's unknown flag from the top parser, with `tritongpt [-h] COMMAND ...` as the
    usage (the audit's `rlhf --max-steps`): the command's own usage lists the flags it has."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and usage in err and f"error: unrecognized arguments: {unknown}\n" in err, err


@pytest.mark.parametrize("argv, said", [
    (["pretrain", "--modle", "tiny"], "--modle tiny (did you mean --model?)"),
    (["generate", "--prompt", "x", "--max-new-tokns=8", "--temprature", "0"],
     "--max-new-tokns=8 --temprature 0 (did you mean --max-new-tokens, --temperature?)"),
    (["bpe", "encode", "--tokenzer", "t.json", "--text", "x"], "--tokenzer t.json (did you mean --tokenizer?)"),
    (["bench", "train", "--stepz", "3"], "--stepz 3 (did you mean --steps?)"),
    (["bench", "kernels", "--stepz", "3"], "--stepz 3"),  # bench kernels refuses --steps: not suggested
    (["bench", "serve", "--base-urll", "u"], "--base-urll u (did you mean --base-url?)"),
    (["bench", "cpu", "--base-urll", "u"], "--base-urll u"),
    # the command's own flag before the command: where it goes, not 'did you mean --overwrite?'
    (["--overwrite", "pretrain"],
     "--overwrite (--overwrite goes after the command: tritongpt pretrain --overwrite ...)"),
    (["--lr=1e-3", "--overwrite", "pretrain"],
     "--lr=1e-3 --overwrite (--lr, --overwrite go after the command: tritongpt pretrain --lr ...)"),
    (["generate", "--prompt", "x", "--", "--modle"], "-- --modle")])  # (after --, a positional: no guess)
def test_a_typo_d_flag_is_told_the_flag_it_is_close_to(argv, said, capsys):
    """A new user's typo: the nearest of the command's own flags is suggested (a flag far from all, --bogus above,
    gets no guess), not one of another `bench WHAT` that the command would then refuse."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and f"error: unrecognized arguments: {said}\n" in capsys.readouterr().err
