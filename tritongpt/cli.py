"""`tritongpt` command line: one subcommand per job, each defined next to the code it runs."""
import argparse
import importlib
import sys

from tritongpt.errors import UserError

# Each module defines add_cli(subparsers), which adds its subcommand(s).
COMMAND_MODULES = [
    "tritongpt.commands",
    "tritongpt.bench.cli",
    "tritongpt.train.tokenizer",
    "tritongpt.train.pretrain",
    "tritongpt.train.sft",
    "tritongpt.train.reward",
    "tritongpt.train.rlhf",
    "tritongpt.train.dpo",
    "tritongpt.train.evaluate",
    "tritongpt.train.hellaswag",
    "tritongpt.train.chat",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tritongpt",
        description="GPT-2 from scratch: reference PyTorch modules and Triton kernels behind one toggle.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_cli(sub)
    return parser


def fetch_hub_repos(args):
    """A Hugging Face Hub repo id (owner/name, no such path here) as --init or --weights: fetch its
    files once, here, so that every later step (the weights, their tokenizer, the run's record)
    reads a local folder, as for a model downloaded by hand."""
    for flag in ("init", "weights"):
        value = getattr(args, flag, None)
        if isinstance(value, str) and "/" in value:  # (the import loads torch: not for every command)
            from tritongpt.train.gpt2_weights import hub_folder, is_hub_repo

            if is_hub_repo(value):
                setattr(args, flag, str(hub_folder(value)))


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
