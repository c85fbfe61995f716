"""What the user is told: one exception type for mistakes a user can fix (the CLI prints it as
one line), and notes about what a command did that they may not expect."""
import os
import sys


class UserError(Exception):
    """Bad input from the user (file, field, shape, option): printed as `error: ...`, exit 2."""


class FieldError(UserError):
    """A UserError a request's field caused: field, the one to change (serve's 400 `param`), or None."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class EngineDown(UserError):
    """The batching engine (train/engine.py) cannot end a request: its thread died or it is closed. Not the
    request's fault: serve answers it with a 500, as vLLM's EngineDeadError."""


def read_json_object(path) -> dict:
    """A JSON file holding an object, or a UserError naming the file and what is wrong with it."""
    import json
    from pathlib import Path

    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def read_text_file(path) -> str:
    """A file's own bytes as UTF-8 text (no newline translation), or a UserError naming the file."""
    from pathlib import Path

    if not Path(path).is_file():
        raise UserError(f"{path} is a folder, not a file" if Path(path).is_dir() else f"file not found: {path}")
    try:
        return Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def first_line(e: BaseException) -> str:
    """An exception's message, its first line (a library's may run on for pages), or its type's name when it has
    none: what an error naming the library's reason quotes."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def note(text: str) -> None:
    """`note: text` on stderr, from one process: under torchrun every rank runs the same code and
    would print it once each (rank 0 speaks; errors still come from whichever rank fails)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"note: {text}", file=sys.stderr)
