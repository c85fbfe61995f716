"""`tritongpt` command line: one subcommand per job, each defined next to the code it runs."""
import argparse
import importlib
import os
import sys
import threading
import traceback

from tritongpt.errors import UserError, first_line

# Each command: the module whose add_cli(subparsers) defines it, and its line in `tritongpt --help`. The lines
# live here, and each add_cli reads its own (command_help), so that the top-level help lists every command
# without importing a module (they import torch: ~2 s), and a command imports only its own module.
COMMANDS = {
    "info": ("tritongpt.commands", "config, parameter count, and whether Triton and CUDA are usable"),
    "generate": ("tritongpt.commands", "generate text from a prompt"),
    "export": ("tritongpt.commands", "write a checkpoint as a Hugging Face folder that transformers loads (GPT-2, "
               "Llama, Qwen, Gemma and the other families the README lists), or with --format gguf as one .gguf "
               "file for llama.cpp"),
    "quantize": ("tritongpt.commands", "write a model's int8 or int4 weight-only quantization as a folder the "
                 "commands that run a model load"),
    "bench": ("tritongpt.bench.cli", "benchmarks: kernels, training step, CPU-side timings"),
    "bpe": ("tritongpt.train.tokenizer", "train, apply or invert a byte-level BPE tokenizer"),
    "pretrain": ("tritongpt.train.pretrain", "pretrain a GPT on a text corpus (default: tiny model, embedded corpus)"),
    "sft": ("tritongpt.train.sft", "supervised fine-tuning on instruction records (default: embedded verifiable "
            "tasks)"),
    "reward": ("tritongpt.train.reward", "train a reward model (Bradley-Terry) on preference pairs"),
    "rlhf": ("tritongpt.train.rlhf", "RLHF against a reward model (or a verifier): PPO, GRPO or RLOO"),
    "dpo": ("tritongpt.train.dpo", "Direct Preference Optimization against a frozen SFT reference"),
    "kto": ("tritongpt.train.kto", "Kahneman-Tversky Optimization on desirable and undesirable examples (or pairs) "
            "against a frozen SFT reference"),
    "eval": ("tritongpt.train.evaluate", "loss, perplexity and bits per byte of a model on a corpus"),
    "hellaswag": ("tritongpt.train.hellaswag", "multiple-choice accuracy: HellaSwag, ARC, OpenBookQA, PIQA, "
                  "WinoGrande, MMLU"),
    "lambada": ("tritongpt.train.lambada", "LAMBADA: last-word accuracy and perplexity, as lm-eval-harness's "
                "lambada_openai scores them"),
    "chat": ("tritongpt.train.chat", "talk to a fine-tuned model, a message a turn, in the template it was tuned on"),
    "serve": ("tritongpt.train.serve", "serve a model over HTTP with OpenAI's API (completions, chat completions; "
              "--runner pooling: embeddings, reward scores)"),
    "run-batch": ("tritongpt.train.run_batch", "run a .jsonl file of OpenAI Batch API requests through serve's "
                  "endpoints offline, as vLLM's run-batch"),
    "merge": ("tritongpt.train.merge", "merge checkpoints of one model into one (linear, slerp, task arithmetic, "
              "TIES, DARE)"),
}


def command_help(name: str) -> str:
    """The line `tritongpt --help` shows for command `name` (its module's add_parser help)."""
    return COMMANDS[name][1]


def build_parser(commands=None) -> argparse.ArgumentParser:
    """The whole command line (commands None), or with only the named commands' modules imported: the others
    are listed by name and help line, without their options (what `tritongpt --help` needs)."""
    parser = argparse.ArgumentParser(
        prog="tritongpt",
        description="GPT-2 from scratch: reference PyTorch modules and Triton kernels behind one toggle.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = COMMANDS if commands is None else [c for c in commands if c in COMMANDS]
    for module in dict.fromkeys(COMMANDS[c][0] for c in wanted):
        importlib.import_module(module).add_cli(sub)
    for name, (_, line) in COMMANDS.items():
        if name not in sub.choices:
            sub.add_parser(name, help=line)
    return parser


def command_parser(parser, argv):
    """The parser of the deepest command argv names (`bench kernels`'s, `rlhf`'s), else parser itself: argparse
    reports a command's unknown flags from the top parser, with the top level's usage (`tritongpt [-h] COMMAND
    ...`), where the command's own usage says which flags it has."""
    for word in argv:
        if word.startswith("-"):
            continue
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or word not in subs[0].choices:
            break
        parser = subs[0].choices[word]
    return parser


def did_you_mean(parser, unknown, args=None) -> str:
    """' (did you mean --model?)' for an unknown flag spelled close to one of the command's (a typo), else ''; not
    one the command would then refuse (args.foreign_dests: bench train's --steps to `bench kernels`). The command's
    own flag given before it (`tritongpt --overwrite pretrain`) is told where it goes, not that it is itself."""
    import difflib

    foreign = args.foreign_dests(args) if hasattr(args, "foreign_dests") else set()
    flags = [o for a in parser._actions if a.dest not in foreign for o in a.option_strings if o.startswith("--")]
    # (words after a bare -- are positionals, not flags: no guess for them)
    words = [w.split("=")[0] for w in (unknown[:unknown.index("--")] if "--" in unknown else unknown)
             if w.startswith("--")]
    early = list(dict.fromkeys(w for w in words if w in flags))
    if early:
        verb = "goes" if len(early) == 1 else "go"
        return f" ({', '.join(early)} {verb} after the command: {parser.prog} {early[0]} ...)"
    near = [m for word in words for m in difflib.get_close_matches(word, flags, n=1, cutoff=0.8)]
    return f" (did you mean {', '.join(dict.fromkeys(near))}?)" if near else ""


# the commands whose --data may be a Hugging Face Hub dataset id, and the split each reads
DATASET_COMMANDS = {"pretrain": "train", "sft": "train", "reward": "train", "dpo": "train", "kto": "train",
                    "rlhf": "train", "eval": "train", "lambada": "test"}


def fetch_hub_repos(args):
    """A Hugging Face Hub repo id (owner/name, no such path here) as --init, --weights (merge's models), --draft,
    --reward (a reward model), --base (export's adapter base, merge's) or --teacher (distillation's), or a Hub
    dataset id as --data: fetch its files once, here, so that every later step (the weights, their tokenizer, the
    data, the run's record) reads a local folder, as for files downloaded by hand."""
    def fetched(value):
        if isinstance(value, str) and "/" in value:  # (the import loads torch: not for every command)
            from tritongpt.train.gpt2_weights import hub_folder, is_hub_repo

            if is_hub_repo(value):
                return str(hub_folder(value))
        return value

    # rlhf's --reward is a list (repeatable): each one fetched
    for flag in ("init", "weights", "draft", "reward", "base", "teacher"):
        value = getattr(args, flag, None)
        if value is not None:
            setattr(args, flag, [fetched(v) for v in value] if isinstance(value, list) else fetched(value))
    # --data as a Hub dataset id (owner/name, owner/name/config): its train split's .parquet files (lambada's: its
    # test split, LAMBADA's only one), fetched into a folder of their own, which every trainer reads as a folder of
    # shards (hellaswag's --data is its own file)
    # (pretrain's --data repeated, a mixture: a list, each one fetched)
    def fetched_data(data):
        if isinstance(data, str) and "/" in data:
            from tritongpt.train.hub_datasets import hub_dataset_folder, is_hub_dataset

            if is_hub_dataset(data):
                return str(hub_dataset_folder(data, split=DATASET_COMMANDS[args.command]))
        return data

    data = getattr(args, "data", None)
    if getattr(args, "command", None) in DATASET_COMMANDS and data is not None:
        args.data = [fetched_data(d) for d in data] if isinstance(data, list) else fetched_data(data)
        if isinstance(data, list):  # as typed: pretrain's refusal of a repeated source names the id, not its folder
            args.data_given = data  # (a mixture's alone: rlhf records its whole namespace)


def stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (`tritongpt ... | head -1`): its write end polls as an
    error (Linux's pipe_poll)."""
    import select

    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # (no fd: a test's captured stdout; no poll on this system)
        return False


def abandoned() -> bool:
    """Whether a thread marked abandoned is still running (serve's Server.server_close marks a request's that did not
    stop in time)."""
    return any(getattr(t, "abandoned", False) and t.is_alive() for t in threading.enumerate())


def main(argv=None) -> int:
    """The command argv names, run: its exit code (0; 2 for a UserError or a path's OSError, said as `error: ...`; 1
    for an allocation that failed, `error: out of memory: ...`; 130 for Ctrl-C; 141 when stdout's reader left)."""
    try:
        try:
            code = run(argv)
        finally:  # (here, not at Python's exit: a reader gone is caught below, argparse's help's too)
            if sys.stdout is not None:  # (None: started with stdout closed, `>&-`, where print writes nothing)
                sys.stdout.flush()
    except BrokenPipeError:
        # stdout's reader left (`tritongpt generate ... | head -1`): the command ends quietly, as Unix tools, with
        # the shell's code for a process SIGPIPE ended (128 + 13), and stdout pointed at /dev/null so that Python's
        # own flush at its exit does not fail again (the signal module's "Note on SIGPIPE")
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        code = 141
    except Exception:  # (Python's traceback and exit 1, printed here where the process ends below)
        if not abandoned():
            raise
        traceback.print_exc()
        code = 1
    if abandoned():
        # a thread still inside torch (a request that did not stop as the server closed): Python's exit would abort
        # in it (exit -6: the thread is killed inside C++ code as it takes the GIL back), so the process ends here
        sys.stderr.flush()
        os._exit(code)
    return code


def run(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # the command is the first word that is not an option (the top level has -h alone)
    parser = build_parser([a for a in argv if not a.startswith("-")][:1])
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named with the command's own usage (command_parser)
        own = command_parser(parser, argv)
        own.error(f"unrecognized arguments: {' '.join(unknown)}{did_you_mean(own, unknown, args)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        fetch_hub_repos(args)
        return args.func(args) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path that cannot be read or written: its name and the system's reason
        if isinstance(e, BrokenPipeError) and stdout_reader_gone():
            raise  # (main's: stdout's reader left, not a path's fault)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as e:
        reason = out_of_memory(e)
        if reason is None:
            raise
        print(f"error: out of memory: {reason}; ask for less (a smaller batch, fewer samples or beams, a shorter "
              "context or a smaller model)", file=sys.stderr)
        return 1


def out_of_memory(e: BaseException) -> str | None:
    """torch's reason when e is an allocation that failed (a CUDA out-of-memory error, the CPU allocator's, Python's
    MemoryError), else None. A size the user asked for (`generate --num-samples 100000000`, `--vocab-size 1e10`)
    fails there, deep inside torch: its traceback names no flag, its first line says how much was asked."""
    text = first_line(e)
    if type(e).__name__ == "OutOfMemoryError" or isinstance(e, MemoryError):
        return text
    if "DefaultCPUAllocator: can't allocate memory" in text or "DefaultCPUAllocator: not enough memory" in text:
        return text[text.index("DefaultCPUAllocator"):]  # (without "[enforce fail at alloc_cpu.cpp:127] err == 0.")
    return None


if __name__ == "__main__":
    sys.exit(main())
