"""A model's own chat template: the Jinja text a Hugging Face tokenizer_config.json carries
(ChatML for Qwen2 and SmolLM, Llama 3's header tokens, Zephyr's for TinyLlama-Chat...), rendered
as transformers' apply_chat_template renders it, and cut into the parts SFT learns from.

tritongpt's own chat template (formats.chat_parts, drawn in formats' docstring) is plain text with <|endoftext|> after
each answer, for GPT-2, which has no role tokens. A published instruct model was tuned on its own
template instead, and answers best in it: `sft` renders chat records with the tokenizer's template
when it has one (--chat-template auto), and `chat` talks to a model through it.

Parts: a template renders a whole conversation, so the answers are found by rendering it a turn
at a time. For each assistant message i, render(messages[:i], add_generation_prompt=True) ends
where the answer starts, and render(messages[:i + 1]) where it ends (its end-of-turn token
included: what the model must learn to say to stop); both must be prefixes of the whole
rendering, or the template rewrites earlier turns (Qwen3 drops their reasoning) and the answers
cannot be told apart, which is refused by name. The rendered text holds the template's special
tokens (<|im_start|>, <|eot_id|>) as text, encoded as their ids (Rendered); the messages' own
text may spell none (refused, naming it), so a message can never forge a turn.
"""
import itertools
import json
import re
import secrets
import sys
import threading
from collections.abc import Iterator
from datetime import datetime

from tritongpt.errors import UserError, read_text_file


CHOICES = ("auto", "tritongpt")  # --chat-template


class Rendered(str):
    """Text a chat template wrote: the special tokens it spells are those tokens
    (formats.encode_text encodes it with allowed_special="all")."""


class TemplateText(str):
    """A chat template's text that knows the file it was read from (where): its errors name that file, not only
    Jinja's line in it. A str in all else (equal, hashed, saved to JSON and compiled as its text is); what makes a
    new string of it (strip, +) makes a plain one, a template set in code."""

    where = None


def from_file(text, where) -> "TemplateText | None":
    """text, a chat template read from where (a file, a flag, a run's field); None: None."""
    if text is None:
        return None
    text = TemplateText(text)
    text.where = str(where)
    return text


def _line(e: BaseException) -> str:
    """'line N: ' of the template's line a runtime error was raised at (Jinja rewrites the traceback it re-raises
    with frames of the template's own lines, named "<template>"), else ''."""
    tb, line = e.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno  # (the innermost: a macro's line, not the line that called it)
        tb = tb.tb_next
    return f"line {line}: " if line else ""


def templates_from_config(config: dict, where: str, folder=None) -> dict | None:
    """A model folder's chat templates by name ({"default": ..., "tool_use": ...}; a single template is the
    "default" one), as transformers >= 4.43 reads them: chat_template.jinja (the default) and
    additional_chat_templates/<name>.jinja, where the folder has them, before tokenizer_config.json's chat_template
    (a string, or transformers' list of named templates), else a chat_template.json beside it. None: no template.
    Templates but no "default" one are refused: which renders a chat without tools is unknown."""
    named, source = None, where
    files = sorted((folder / "additional_chat_templates").glob("*.jinja")) if folder is not None else []
    if folder is not None and ((folder / "chat_template.jinja").is_file() or files):
        # (transformers: "independent chat template files take priority over the tokenizer config's")
        named, source = {}, str(folder)
        if (folder / "chat_template.jinja").is_file():  # (UTF-8, as transformers reads it)
            named["default"] = from_file(read_text_file(folder / "chat_template.jinja"), folder / "chat_template.jinja")
        for path in files:
            named[path.name.removesuffix(".jinja")] = from_file(read_text_file(path), path)
    value = config.get("chat_template") if named is None else None
    if isinstance(value, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        if not all(isinstance(t, dict) and isinstance(t.get("name"), str) and "template" in t for t in value):
            raise UserError(f"{where}: chat_template is a list, but not of named templates ({{\"name\": ..., "
                            "\"template\": ...} objects, as transformers saves them)")
        value = {t["name"]: t["template"] for t in value}
    if isinstance(value, dict):  # (named templates, as transformers holds them: a dict too)
        named = value
    elif value is None and named is None and folder is not None and (folder / "chat_template.json").is_file():
        from tritongpt.errors import read_json_object

        value = read_json_object(folder / "chat_template.json").get("chat_template")
        where = source = str(folder / "chat_template.json")
    if named is None:
        if value is not None and not isinstance(value, str):
            raise UserError(f"{where}: chat_template must be a Jinja string, got {type(value).__name__}")
        return None if value is None else {"default": from_file(value, where)}
    if "default" not in named:  # (transformers' apply_chat_template refuses it: no template to pick)
        raise UserError(f"{source}: chat_template names templates {', '.join(map(repr, named)) or '(none)'} but "
                        "no 'default' one: which renders the chats is unknown")
    named = dict(named)
    for name, template in named.items():
        if not isinstance(template, str):
            raise UserError(f"{source}: chat template {name!r} must be a Jinja string, got {type(template).__name__}")
        if getattr(template, "where", None) is None:  # (tokenizer_config.json's list or dict: its errors name it)
            named[name] = template = from_file(template, where)
        if name != "default":  # (compiled now: a broken tool_use template would otherwise surface at a request)
            _compiled(template, _called(name, template))
    return named


def template_from_config(config: dict, where: str, folder=None) -> str | None:
    """The default chat template of a model folder (templates_from_config's), None: none."""
    named = templates_from_config(config, where, folder)
    return None if named is None else named["default"]


def hf_chat_template_field(default: str, named: dict | None = None):
    """tokenizer_config.json's chat_template as an export writes it: the template, or with named others beside it
    transformers' list of named templates (what its save_pretrained writes without jinja files, and every version
    reads back as the same templates), so the exported folder renders a chat with tools as the source did."""
    if not named:
        return default
    return [{"name": "default", "template": default}] + [{"name": k, "template": v} for k, v in named.items()]


def template_name(tokenizer, tools=None) -> str:
    """Which of the tokenizer's templates renders a chat, as transformers' get_chat_template (and vLLM through it)
    picks one: "tool_use" where tools are given (a list, even empty) and the tokenizer has a template so named, else
    "default" (tokenizer.chat_template). tokenizer.chat_templates holds the named ones besides the default."""
    named = getattr(tokenizer, "chat_templates", None) or {}
    if tools is not None and "tool_use" in named and getattr(tokenizer, "chat_template", None) is not None:
        return "tool_use"
    return "default"


def _template_text(tokenizer, name: str) -> str:
    return tokenizer.chat_template if name == "default" else tokenizer.chat_templates[name]


def _called(name: str, text=None) -> str:
    """The template as refusals name it: by the file its text was read from where it knows one (TemplateText),
    else the tokenizer's; the default one as that, another by its name."""
    named = "" if name == "default" else f" {name!r}"
    where = getattr(text, "where", None)
    return f"the chat template{named} in {where}" if where else f"the tokenizer's chat template{named}"


_ENVIRONMENTS = {}
# What one rendering may make with range(), * and ** (items of ranges, repeated strings and lists, bits of large
# integers) and lipsum() (words), so that a loop in a loop cannot hang it: Jinja's sandbox bounds a single range (to
# 100,000), not how often one is made. Real templates make as many items as there are messages.
MAX_ITEMS = 1_000_000
_budget = threading.local()  # (per thread: serve renders requests' chats at once with one compiled template)


class TooLarge(OverflowError):
    """The rendering budget's refusal (_spend, _grow): a template too large to finish, said as such, not as a value
    it could not use (an OverflowError of Python's own, 1e308 * 10, is that)."""


def _spend(n: int):
    left = getattr(_budget, "left", None)
    if left is None:  # (not under render(): nothing to bound)
        return
    if n > left:
        raise TooLarge(f"the template makes more than {MAX_ITEMS:,} items with range(), * and ** (a loop in a "
                       "loop, a repeated string, an integer's bits): a rendering too large to finish")
    _budget.left = left - n


# What one rendering may make as text: every string (or list) a template makes with +, ~, %, a filter, a method or
# its output is charged its length, checked before it is made where its arguments set it (center(10**9), a list of
# 1,000 references to one large string joined), so that doubling a string in a loop (25 times: 32 MB; 35: 32 GB) or
# making a large one again and again is refused, not a server out of memory or hung. MAX_TEXT for any one string
# (100x a prompt of 1 MB, past any model's context), MAX_MADE in all (the memory the strings a rendering keeps may
# take, and the copying it may do: 1-2 s of it). Real templates make about 4x their prompt (ChatML, Llama 3.1's and
# Qwen2.5's with tools: 4 MB for a prompt of 1 MB); a chat built by `ns.x = ns.x + a + b ...` copies ns.x each time:
# 1,000 messages of 200 characters with 5 +'s each make 580 MB.
# Both count characters, not bytes: CPython keeps a string at 1, 2 or 4 bytes a character (its widest one's: ASCII,
# CJK, an emoji), so one string within MAX_TEXT takes up to 400 MB, and the strings a template keeps within MAX_MADE
# up to 8 GB (kept copies of an emoji text, measured at MAX_MADE = 2*10**8: 0.18 GB ASCII, 0.37 GB CJK, 0.74 GB
# emoji). Bytes are not charged: a real chat built by + (1,000 messages of 200 CJK characters, one emoji in them:
# the whole string then 4 bytes a character) makes 576 million characters, 2.3 GB as bytes, past MAX_MADE.
MAX_TEXT = 100_000_000
MAX_MADE = 2_000_000_000
# A list a string is cut into (|list, .split()) holds a new string an item: its pointer and the string object (about
# 50 bytes, 76 for a CJK character), 8x what _made charges a list's item, so it is sized so before it is made: a
# string of 6*10**7 '中' (within MAX_TEXT) | list would make about 5 GB before the list's 8 an item refused it
STR_ITEM = 64


def _grow(n: int, made: bool = True, one: bool = True):
    """n characters (8 a list's item) made (made False: about to be, checked only), refused past MAX_TEXT (one: n is
    one string's length, not a copying's), or past what the rendering has left of MAX_MADE."""
    left = getattr(_budget, "made", None)
    if left is None:  # (not under render(): nothing to bound)
        return
    if one and n > MAX_TEXT:
        raise TooLarge(f"the template makes a string {n:,} characters long (or a list: 8 an item), more than "
                       f"{MAX_TEXT:,} (a string doubled in a loop, a width too large): a rendering too large to "
                       "finish")
    if n > left:
        raise TooLarge(f"the template makes more than {MAX_MADE:,} characters of text (and lists) in all "
                       "(a large string made again in a loop): a rendering too large to finish")
    if made:
        _budget.made = left - n


# What one rendering may do in steps: a loop's iterations (charged its items' count as it starts, or one an item as it
# takes them from an iterator), a call (a macro, a method) and an item a filter reads in Python (|select, |sort...), so
# that a loop in a loop in a loop over a list a template keeps (1,000 items: 10**9 iterations, minutes of CPU that make
# no text and use no range()) or a macro that calls itself twice (2**depth calls) is refused, not a hang. Real
# templates take 1-1.5 steps a message (ChatML, Gemma 3's, Llama 3.1's and Qwen2.5's with tools: 1,000-1,410 for a chat
# of 1,000 messages), 140x within it. All of them take 0.1 s (an empty loop's) to 1-3 s (a macro's calls, a loop
# that reads loop.index: 5-15 us each, on 2 loaded cores).
MAX_STEPS = 200_000


def _steps_for(messages, tools) -> int:
    """The steps a rendering of these messages and tools may take: MAX_STEPS, or where more, n**2 for the n messages,
    tool calls and tools it is given. Real templates loop over the messages inside their loop over them: Command
    R7B's tool template finds each tool result's call by walking every message and call (its tool_call_id_to_int
    macro), 0.43-0.48 n**2 steps for an agent's chat of calls and results (941,000 at 1,000 messages, 15 million at
    4,000: transformers renders them in 7 s and 78 s, as this does), which MAX_STEPS alone refused from 461 messages.
    A loop in a loop in a loop over them (n**3) is still refused once n**2 is spent, and so is a template's abuse, in
    time that grows with the chat it is given, as a real template's does: a macro that calls itself twice is refused
    in 2.7 s for a short chat, in 14-17 s for 1,000 messages (Command R7B's 941,000 steps: 6-9 s, on 2 loaded cores)."""
    def count(items):
        return len(items) if isinstance(items, (list, tuple)) else 0
    n = count(messages) + count(tools) + sum(count(m.get("tool_calls")) for m in messages if isinstance(m, dict))
    return max(MAX_STEPS, n * n)


def _step(n: int):
    left = getattr(_budget, "steps", None)
    if left is None:  # (not under render(): nothing to bound)
        return
    if n > left:
        raise TooLarge(f"the template takes more than {_budget.given:,} steps (a loop's items, a call, an item a "
                       "filter reads: a loop in a loop over a long list, a macro that calls itself twice): a "
                       "rendering too long to finish")
    _budget.steps = left - n


def _open_budget(steps: int):
    """Starts a rendering's budget (render's, or a compile's outside one: Jinja folds constants then), every field at
    once: one set here, not at each place a rendering starts, so no field is left from the last one."""
    _budget.left, _budget.made, _budget.steps, _budget.given = MAX_ITEMS, MAX_MADE, steps, steps


def _close_budget():
    """Ends it: _spend, _grow and _step bound nothing outside a rendering."""
    _budget.left = _budget.made = _budget.steps = None


def _counted(items):
    for x in items:
        _step(1)
        yield x


def _loop_items(items):
    """A {% for %} loop's items (or a recursive loop's loop(items)), charged as steps: a list (anything with a length)
    all at once as the loop starts, so a real template's loop is as it was (loop.length, loop.last, no wrapper); an
    iterator (map's, select's) one an item."""
    try:
        n = len(items)
    except TypeError:
        return _counted(iter(items))  # (iter now: a value that is no sequence is refused where the loop starts)
    _step(n)
    return items


def _check_size(n: int):
    """Before a template makes text (or a list) about n characters long: refused where _grow would refuse it."""
    _grow(n, made=False)


def _made(value):
    """value, a template's result, charged its length (when text; a list: 8 an item, its pointers' bytes; a dict: 24
    an entry)."""
    if isinstance(value, str):
        _grow(len(value))
    elif isinstance(value, (list, tuple)):
        _grow(8 * len(value))
    elif isinstance(value, dict):  # ({}.fromkeys(L), dict(d), d.copy(): an entry its hash, key and value's words)
        _grow(24 * len(value))
    return value


def _width(s: str) -> int:
    """Bytes a character of s takes in memory (1, 2 or 4: CPython's storage of it, its widest character's), read
    from its size in O(1), not by walking it."""
    if s.isascii():
        return 1
    width = (sys.getsizeof(s) - _WIDE_HEADER) // (len(s) + 1)
    return 1 if width <= 1 else 2 if width <= 2 else 4  # (a str subclass, Markup, is larger by its fields: rounded up)


# (a non-ASCII string's header: its characters, and a NUL, follow it). Read from a string made here, two 2-byte
# characters: not from a one-character Latin-1 string, which CPython keeps as a shared singleton that may carry its
# cached UTF-8 too (3.12 and later always: 'é' is 3 bytes larger, so every CJK text read as 1 byte a character, its
# repr and UTF-8 under-counted; 3.10-3.11 once anything cached it: a class named 'é'). Any other string's size is this
# header (or a str subclass's larger one) and its characters, plus a cached UTF-8 or wchar_t copy where it has one: so
# its width is read at its real one or above, never below.
_WIDE_HEADER = sys.getsizeof(chr(0x100) * 2) - 3 * 2


def _quoted_size(s: str, json_ascii=None) -> int:
    """The length of repr(s) (json_ascii None: as a list or dict prints it) or of its JSON (json.dumps(s,
    ensure_ascii=json_ascii)), at most, counted without making it: its quotes and backslashes doubled, where every
    character is printable; else each character as its longest escape (\\x01 and \\u2028 in repr: \\U000e0001 for a
    4-byte one; \\u0001 in JSON, \\ud83d\\ude42 for one outside the BMP written as ASCII). A message's newline is
    not printable: its repr is sized 4-10x, well within MAX_TEXT for any prompt of a few MB."""
    named = len(type(s).__name__) + 2 if json_ascii is None and type(s) is not str else 0  # (Markup('...'))
    if s.isprintable() and (json_ascii is not True or s.isascii()):
        return named + len(s) + 2 + s.count("\\") + s.count('"' if json_ascii is not None else "'")
    width = _width(s)
    per = ({1: 4, 2: 6, 4: 10} if json_ascii is None else {1: 6, 2: 6, 4: 12})[width]
    return named + 2 + per * len(s)


def _text_size(value, indent: int = 0, json_ascii=None, sep: int = 0) -> int:
    """About the length of str(value) (its repr, or with json_ascii True or False its JSON, with each item on a line
    indented by `indent` a level, and sep more characters an item: tojson's separators), counted only until past
    MAX_TEXT: a list holding a list holding a string, each 1,000 times, is 10**6 strings long in print, too many to
    walk. A string in it is sized as repr or JSON writes it (_quoted_size: escaped, up to 12x its length), not by
    its length."""
    from jinja2.utils import Namespace

    if isinstance(value, str):  # (most of what templates print and join: quick)
        return len(value) if json_ascii is None else _quoted_size(value, json_ascii)
    size, stack = 0, [iter((value,))]
    while stack and size <= MAX_TEXT:
        x = next(stack[-1], stack)
        if x is stack:
            stack.pop()
            continue
        size += 2 + sep + indent * len(stack)  # (quotes or brackets, a separator, the line's indent)
        if isinstance(x, str):
            size += _quoted_size(x, json_ascii)
        elif isinstance(x, int):
            size += x.bit_length() // 3  # (its decimal digits, at most)
        elif isinstance(x, dict):
            stack.append(v for kv in x.items() for v in kv)
        elif isinstance(x, (list, tuple, set, frozenset)):
            stack.append(iter(x))
        elif isinstance(x, Namespace):  # (it prints its attributes)
            stack.append(iter(x._Namespace__attrs.items()))
        else:
            size += 20
    return size


_PRINTF = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?.")


def _format_size(fmt: str, args, braces: bool = False) -> int:
    """About the length of fmt formatted with args (a tuple, a dict or one value; braces: str.format's {} fields,
    else printf's %): its text, each field's width, and per field the largest argument's text."""
    import string

    values = list(args.values()) if isinstance(args, dict) else list(args) if isinstance(args, tuple) else [args]
    if braces:
        try:
            specs = [spec or "" for _, name, spec, _ in string.Formatter().parse(fmt) if name is not None]
        except ValueError:  # (a malformed one: format() refuses it)
            specs = []
        nested = any("{" in spec for spec in specs)
    else:
        specs = ["".join(m.groups(default="")) for m in _PRINTF.finditer(fmt)]
        nested = any("*" in spec for spec in specs)
    widths = [int(d) for spec in specs for d in re.findall(r"\d+", spec)]
    if nested:  # (a width given as an argument: any integer one may be it)
        widths += [abs(v) for v in values if isinstance(v, int)]
    size = _text_size
    if re.search(r"%(?:\([^)]*\))?[-#0-9 +*.hlL]*[ra]" if not braces else r"![ra]", fmt):  # %r, {!a}: a repr of it
        size = lambda v: 2 + 10 * len(v) if isinstance(v, str) else _text_size(v)  # noqa: E731 (its longest escapes)
    return len(fmt) + len(specs) * max(map(size, values), default=0) + sum(widths)


def _pieces(text: str, name: str, args, kwargs) -> int:
    """How many strings text.split() (rsplit, splitlines) makes, at most, counted without making them."""
    if name == "splitlines":
        # ("\r\n" is one break, not two: a CRLF text is not sized at twice its lines)
        return sum(map(text.count, "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")) - text.count("\r\n") + 1
    sep = args[0] if args else kwargs.get("sep")
    most = args[1] if len(args) > 1 else kwargs.get("maxsplit", -1)
    most = most if isinstance(most, int) and most >= 0 else None
    if isinstance(sep, str) and sep:
        n = text.count(sep) + 1
    else:  # on whitespace: a piece a word, counted (not listed) in Python, so only until the pieces are past MAX_TEXT
        # (or maxsplit): a text of 7.5 MB took 0.34 s to count whole
        enough = MAX_TEXT // STR_ITEM + 1 if most is None else min(MAX_TEXT // STR_ITEM + 1, most + 1)
        n = sum(1 for _ in itertools.islice(re.finditer(r"\S+", text), enough)) + 1
    return n if most is None else min(n, most + 1)


_SPACES = "".join(c for c in map(chr, range(0x3001)) if c.isspace())  # (every one str.split() and \\s split on)


def _words(s: str, more: str = "") -> int:
    """How many pieces, at most, s is cut into at its whitespace (and the characters in more): each space or more a
    cut, counted in C (str.count), not by cutting it."""
    return 2 * sum(map(s.count, _SPACES + more)) + 1


def _utf8_size(s: str) -> int:
    """len(s.encode()), at most, without encoding it: 1 byte a character for ASCII, 2 for Latin-1, 3 for the BMP's,
    4 (an emoji's) by the widest character s holds (_width)."""
    return len(s) * (1 if s.isascii() else {1: 2, 2: 3, 4: 4}[_width(s)])


def _html_size(s) -> int:
    """The length of markupsafe.escape(s), exactly for text (& " ' as 5 characters, < > as 4), at most 5x the print of
    a value that is not."""
    if not isinstance(s, str):
        return 5 * _text_size(s)
    return len(s) + 4 * (s.count("&") + s.count('"') + s.count("'")) + 3 * (s.count("<") + s.count(">"))


def _case_size(s) -> int:
    """The length of s upper'd, lower'd or title'd, at most: 3x where it is not ASCII ('\ufb03'.upper() is 'FFI')."""
    return _text_size(s) if isinstance(s, str) and s.isascii() else 3 * _text_size(s)


def _cut(method) -> "str | None":
    """The text a method cuts into pieces (split, rsplit, splitlines, partition, rpartition), else None."""
    wrapped = getattr(method, "__wrapped__", method)
    text = getattr(wrapped, "__self__", None)
    if isinstance(text, str) and getattr(wrapped, "__name__", None) in ("split", "rsplit", "splitlines", "partition",
                                                                       "rpartition"):
        return text
    return None


def _method_size(method, args, kwargs) -> int:
    """About the length of what a string's method makes, where its arguments set it (0: no such method)."""
    wrapped = getattr(method, "__wrapped__", method)  # (str.format, as the sandbox wraps it)
    text, name = getattr(wrapped, "__self__", None), getattr(wrapped, "__name__", None)
    if isinstance(text, str) and name in ("split", "rsplit", "splitlines"):  # (with no arguments too)
        return STR_ITEM * _pieces(text, name, args, kwargs)
    if not isinstance(text, str) or not (args or kwargs):
        return 0
    if name in ("format", "format_map"):
        return _format_size(text, kwargs or (args[0] if name == "format_map" else args), braces=True)
    if name in ("center", "ljust", "rjust", "zfill") and isinstance(args[0], int):
        return max(len(text), args[0])
    if name == "expandtabs":
        tabsize = args[0] if args else kwargs.get("tabsize", 8)
        return len(text) + text.count("\t") * tabsize if isinstance(tabsize, int) else 0
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        count = args[2] if len(args) > 2 else kwargs.get("count", -1)
        found = text.count(args[0]) if not isinstance(count, int) or count < 0 else min(count, text.count(args[0]))
        return len(text) + found * max(len(args[1]) - len(args[0]), 0)
    if name == "translate" and isinstance(args[0], dict):
        return len(text) * max([_text_size(v) for v in args[0].values()] + [1])
    if name == "join" and isinstance(args[0], (list, tuple)):
        return sum(map(_text_size, args[0])) + len(text) * len(args[0])
    return 0


def _sum_size(environment, value, attribute=None, start=0) -> int:
    """sum(start=[]) (or "") of lists (strings): each partial sum is a copy, those before the result charged here."""
    from jinja2.filters import make_attrgetter

    if not isinstance(start, (str, list, tuple)):
        return 0
    total, copied = len(start), 0
    for item in map(make_attrgetter(environment, attribute), value) if attribute is not None else value:
        copied += total
        total += len(item) if isinstance(item, (str, list, tuple)) else 0
    _check_size(total)
    _grow(copied, one=False)
    return total


def _compiled(template: str, what: str = "the tokenizer's chat template"):
    """The template compiled as transformers compiles it: a sandbox, trim_blocks and lstrip_blocks,
    loop controls, {% generation %} blocks (rendered as their body), raise_exception,
    strftime_now and a tojson that does not escape HTML."""
    # (keyed by the text alone: two files with one text share a compile. Only a template that compiles is kept, so
    # a syntax error is raised, naming `what`, by each file's own compile; a runtime error names the file render's)
    template = str(template)
    if template in _ENVIRONMENTS:
        return _ENVIRONMENTS[template]
    import jinja2
    from jinja2.compiler import CodeGenerator, optimizeconst
    from jinja2.ext import Extension
    from jinja2.runtime import LoopContext
    from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range

    class Generation(Extension):  # {% generation %}...{% endgeneration %}: transformers marks answers with it
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    class Compiler(CodeGenerator):
        loops = frozenset()  # (the ids of the {% for %} loops' iterables: Jinja allows no node type of our own)

        def visit_For(self, node, frame):
            self.loops = self.loops | {id(node.iter)}
            super().visit_For(node, frame)

        def visit(self, node, *args, **kwargs):  # a loop's iterable (a recursive loop's first call's too), charged
            if id(node) not in self.loops:
                return super().visit(node, *args, **kwargs)
            self.write("environment.loop_items(")
            super().visit(node, *args, **kwargs)
            self.write(")")

        @optimizeconst
        def visit_Getitem(self, node, frame):  # a slice (text[i:], messages[1:]) is a copy: charged as made
            if isinstance(node.arg, jinja2.nodes.Slice):  # (Jinja writes a slice as Python's, not getitem())
                self.write("environment.made(")
                super().visit_Getitem(node, frame)
                self.write(")")
            else:
                super().visit_Getitem(node, frame)

        @optimizeconst
        def visit_Concat(self, node, frame):  # `a ~ b` compiles to a join, not a binop: its size checked first
            join = ("(markup_join if context.eval_ctx.volatile else str_join)" if frame.eval_ctx.volatile else
                    "markup_join" if frame.eval_ctx.autoescape else "str_join")  # (as Jinja's own visit_Concat)
            self.write(f"environment.join_text({join}, (")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class Sandbox(ImmutableSandboxedEnvironment):  # transformers' sandbox, with range(), * and ** bounded (_spend)
        intercepted_binops = frozenset({"*", "**", "+", "%"})  # and the text it makes (_made): +, ~, %, ...
        code_generator_class = Compiler
        loop_items, made = staticmethod(_loop_items), staticmethod(_made)

        def is_safe_attribute(self, obj, attr, value):
            # text.encode() makes bytes, which nothing here sizes (their *, +, %, center...): refused as an unsafe
            # attribute, not made (a kept list of a 64 MB string's UTF-32 copies held 256 MB each, charged 8 bytes)
            return not (isinstance(obj, str) and attr == "encode") and super().is_safe_attribute(obj, attr, value)

        def join_text(self, join, values):  # `a ~ b ~ c`
            _check_size(sum(map(_text_size, values)))
            return _made(join(values))

        def concat(self, parts):  # the output of the template, of a {% set %} block, a macro, a {% filter %} block
            parts = list(parts)
            _check_size(sum(map(len, parts)))
            return _made("".join(parts))

        def call(__self, __context, __obj, *args, **kwargs):  # (Jinja's names: no argument of the call's can be one)
            _step(1)  # (a macro that calls itself twice makes 2**depth calls, in no loop)
            if isinstance(__obj, LoopContext) and args:  # a recursive loop's loop(items): a loop's items too
                args = (_loop_items(args[0]), *args[1:])
            size = _method_size(__obj, args, kwargs)
            _check_size(size)
            cut = _cut(__obj)
            if cut is not None:  # its pieces, kept (ns.l + [b.split('x', 1)] in a loop), are a copy of the text: made
                _grow(size + len(cut), one=False)
            return _made(super().call(__context, __obj, *args, **kwargs))

        def call_binop(self, context, operator, left, right):
            if operator == "+" and isinstance(left, str) and isinstance(right, str):  # (most binops: quick)
                _grow(len(left) + len(right))
                return left + right
            ints, bits = isinstance(left, int) and isinstance(right, int), 0
            # an integer result's size in bits: in 64-bit words, 3 ** 25_000_000 passed (8 s), and so did x * x
            # squared in a loop (each product unbounded: 26 times took 41 s, 30 never ended). Machine-sized ones are
            # free, as loop.index0 * 2 on every message of a long chat must be.
            if operator == "**" and ints and abs(left) > 1 and right > 0:
                bits = right * abs(left).bit_length()
            elif operator == "*" and ints:
                bits = abs(left).bit_length() + abs(right).bit_length()
            elif operator == "*" and isinstance(left, int) != isinstance(right, int):
                seq, times = (right, left) if isinstance(left, int) else (left, right)
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int):
                    _spend(len(seq) * max(times, 0))
            elif operator == "+" and isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)):
                _check_size(8 * (len(left) + len(right)))
            elif operator == "%" and isinstance(left, str):
                _check_size(_format_size(left, right))
            if bits > 64:
                _spend(bits)
            value = super().call_binop(context, operator, left, right)
            return _made(value) if operator in ("+", "%") else value

    def bounded_range(*args):
        rng = safe_range(*args)
        _spend(len(rng))
        return rng

    class TemplateNamespace(jinja2.utils.Namespace):
        """transformers' namespace: no attribute named with a leading '_' (namespace(_x=1), {% set ns._x = 1 %}),
        refused as its sandbox refuses it, not rendered: a template that runs there runs here, and no other."""

        def __init__(*args, **kwargs):  # (Jinja's signature trick: namespace(self=1) is an attribute, as there)
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                TemplateNamespace.check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace.check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a namespace's attribute may not start with '_' (got {name!r}"
                                                      "; transformers' sandbox refuses it too)")

    def bounded_namespace(*args, **kwargs):  # namespace(d) copies d: charged as a dict (_made)
        ns = TemplateNamespace(*args, **kwargs)
        _grow(24 * len(ns._Namespace__attrs))
        return ns

    class TemplateDict:
        """transformers' `dict` global: dict(...) and dict.fromkeys(...) alone. Jinja's is the type itself, whose
        methods called unbound (dict.update(d, x=1), dict.pop(tools[0], 'name')) change a value the template was given
        (a caller's own tools), past the immutable sandbox's refusal of d.update(...)."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def bounded_lipsum(n=5, html=True, min=20, max=100):  # (Jinja's global: lipsum(20000) took 1 s, unbounded)
        _spend(abs(n) * abs(max))  # (its words, at most)
        return _made(jinja2.utils.generate_lorem_ipsum(n, html, min, max))

    # the filters that read a string a character at a time and keep each (a list, a sort, join's list) or hand them
    # to one that does (map's, select's, batch's generators, which |list or |join then keep; groupby sorts them, as
    # |sort): a new string an item, sized so (STR_ITEM) before any is made, as a string's split() is.
    # ('中' * 6*10**7) | sort, or | join, made about 5 GB before the list's 8 an item refused it, or let it be
    itemwise = {"list", "sort", "join", "map", "select", "reject", "selectattr", "rejectattr", "batch", "slice",
                "groupby"}

    # the filters that read their list (or string) an item at a time, in Python: each item a step (_step), so a filter
    # over a long list in a loop over it is charged as the loop in a loop it is (|length, |first, |tojson: not)
    stepwise = itemwise | {"unique", "sum", "min", "max", "dictsort", "items"}

    # the filters that print a value that is not text (str(), as {{ value }} does) before they read it: a list of 1,000
    # references to one large string, upper'd, was 1,000 copies of it made before its length refused them
    printing = {"capitalize", "e", "escape", "forceescape", "format", "lower", "replace", "safe", "striptags", "title",
                "trim", "upper", "urlencode", "urlize", "wordcount", "xmlattr"}

    # the sized filters that read their value as items (not print it): a generator is listed to be sized
    reading = {"join", "batch", "slice", "sum"}

    def bounded(f, size=None, name=None):
        """Filter f, its result charged as made; size: its result's length, about, from f's arguments (after the
        context or environment Jinja passes it: pass), checked before it is made."""
        import functools

        passed = 1 if hasattr(f, "jinja_pass_arg") else 0

        @functools.wraps(f)  # (its jinja_pass_arg too)
        def bounded_filter(*args, **kwargs):
            if name in stepwise and len(args) > passed and hasattr(args[passed], "__len__"):
                _step(len(args[passed]))  # (an iterator, map's: its items were charged to the filter that reads them)
            if name in printing and len(args) > passed and not isinstance(args[passed], str):
                _check_size(_text_size(args[passed]))
            if name in itemwise and len(args) > passed and isinstance(args[passed], str):
                _grow(STR_ITEM * len(args[passed]))  # (made: a list of them kept in a loop holds all)
            if size is not None and len(args) > passed:
                # a generator (map's) that the filter reads item by item: read once, for both. Not one it prints
                # (|string, |tojson, |center...): that prints (or refuses) the generator itself, as transformers' does,
                # not a list it never was
                if name in reading and isinstance(args[passed], Iterator):
                    args = (*args[:passed], list(args[passed]), *args[passed + 1:])
                _check_size(size(*args[passed:], **kwargs))
            return _made(f(*args, **kwargs))
        return bounded_filter

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       range=bounded_range, lipsum=bounded_lipsum, namespace=bounded_namespace,
                       dict=TemplateDict())
    # the filters whose arguments set their result's length (center(10**8), a list of 1,000 references to one large
    # string joined), checked before they make it; every filter's result charged
    lines = lambda s: _pieces(s, "splitlines", (), {}) if isinstance(s, str) else _text_size(s)  # noqa: E731
    width = lambda w: len(w) if isinstance(w, str) else w if isinstance(w, int) else 0  # noqa: E731
    text = lambda s: s if isinstance(s, str) else ""  # noqa: E731 (a value printed: sized by _text_size alone)

    def striptags_size(s):
        # (markupsafe cuts out each tag by copying the whole text: <> * 10**6 is 10**6 copies of it, refused as
        # copying past what is left of MAX_MADE; then it splits it at its spaces: a new string a word)
        s = text(s)
        _grow(len(s) * min(s.count("<"), s.count(">")), made=False, one=False)
        return _text_size(s) + STR_ITEM * _words(s)

    def wordwrap_size(s, width=79, break_long_words=True, wrapstring=None, *a, **k):
        # (Jinja's own parameters, in its order: a wrapstring given third, or a width given by name, is the one
        # sized, not the default's; every line gets a wrapstring, and textwrap's chunks (a word and a space each) and
        # lines (at most one a `width` characters) are a new string each)
        wrap = len(wrapstring) if isinstance(wrapstring, str) and wrapstring else 1  # (none or '': its newline)
        every = max(width if isinstance(width, int) else 1, 1)
        return _text_size(s) * (1 + wrap) + STR_ITEM * (_words(text(s), "-") + len(text(s)) // every)

    # the filters whose result, or what they make on the way to it, may be several times their input: sized from it
    # before they make it, not refused only once made (|escape of 6.7*10**7 '"' made 335 MB, |urlencode of 1.7*10**7
    # emoji a list of their 6.7*10**7 bytes: 850 MB, before MAX_TEXT refused the result). Words and lines they cut a
    # text into are a new string each (STR_ITEM), as a string's split() is.
    sizes = {
        "center": lambda s, width=80: max(_text_size(s), width if isinstance(width, int) else 0),
        "indent": lambda s, w=4, *a, **k: _text_size(s) + lines(s) * (width(k.get("width", w)) + STR_ITEM),
        "wordwrap": wordwrap_size,
        "escape": _html_size, "e": _html_size, "forceescape": _html_size,
        # (url_quote lists the UTF-8 bytes, a pointer each, before it joins their %XX)
        "urlencode": lambda v: 8 * (_utf8_size(v) if isinstance(v, str) else 4 * _text_size(v)),
        "upper": _case_size, "lower": _case_size, "capitalize": _case_size,
        # (title cuts its text at spaces and - ( { [ <: a new string a piece)
        "title": lambda s: _case_size(s) + STR_ITEM * _words(text(s), "-({[<"),
        "striptags": striptags_size,
        # (escaped, cut at its spaces, each word a link at most: <a href="https://w" rel=... target=...>w</a>)
        "urlize": lambda s, *a, **k: 11 * _text_size(s) + _words(text(s)) * (STR_ITEM + 60 + sum(
            map(width, [*a, *k.values()]))),
        "format": lambda s, *args, **kwargs: _format_size(s, kwargs or args) if isinstance(s, str) else 0,
        "join": lambda items, d="", attribute=None: sum(map(_text_size, items)) + _text_size(d) * len(items),
        "replace": lambda s, old, new, count=None: _method_size(str(s).replace, (str(old), str(new), count or -1),
                                                                {}),
        "tojson": lambda x, ensure_ascii=False, indent=None, separators=None, *a, **k: _text_size(
            x, width(indent), bool(ensure_ascii), sum(map(width, separators)) if isinstance(separators, (
                list, tuple)) else 0),
        "string": _text_size, "pprint": lambda x: _text_size(x, 1), "sum": lambda *a, **k: _sum_size(env, *a, **k),
        "batch": lambda items, n, fill_with=None: 8 * (len(items) + (n if fill_with is not None else 0)),
        "slice": lambda items, n, fill_with=None: 8 * (len(items) + n)}  # (lists: 8 an item, as _made counts them)
    # |wordcount listed every word to count them (a new string each: 'ab ' * 3*10**7 made 600 MB): counted one by one
    env.filters["wordcount"] = lambda s: sum(1 for _ in re.finditer(r"\w+", jinja2.filters.soft_str(s)))
    for name, f in env.filters.items():
        env.filters[name] = bounded(f, sizes.get(name), name)
    # {{ value }} prints str(value): a list of 1,000 references to one large string is sized before it is made (a
    # machine-sized number, none or an undefined value as it is: loop.index, printed in every iteration of a loop)
    env.finalize = lambda value: value if isinstance(value, (str, float, jinja2.Undefined)) or value is None or (
        isinstance(value, int) and value.bit_length() <= 64) else _check_size(_text_size(value)) or value
    outside = getattr(_budget, "made", None) is None  # (compiling folds constants: 'x' | center(10**9) is made then)
    if outside:
        _open_budget(MAX_STEPS)
    try:
        compiled = env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise UserError(f"{what} is not valid Jinja (line {e.lineno}: {e.message})") from None
    finally:
        if outside:
            _close_budget()
    _ENVIRONMENTS[template] = compiled
    return compiled


# the variables render gives a template, and its helpers (_compiled's globals): no request's variables may set them.
# The folder's special tokens (bos_token, eos_token, pad_token, a model's image_token: _special_tokens) are not among
# them: render lets the variables set those, as apply_chat_template's kwargs do ({**special_tokens_map, **kwargs}),
# and vLLM passes a request's chat_template_kwargs naming them on to it where the template reads them
# (resolve_chat_template_kwargs keeps the template's undeclared variables; where it does not, setting one changes
# nothing either way)
RENDER_VARIABLES = {"messages", "add_generation_prompt", "tools", "documents", "raise_exception", "strftime_now"}


# the names a message's reasoning goes by: templates read the first (Qwen3's), gpt-oss's the second
REASONING_NAMES = ("reasoning_content", "thinking", "reasoning")


def _reasoning_named(message: dict) -> dict:
    """message with its reasoning (under any of REASONING_NAMES) under "reasoning_content" and "thinking" too, as
    transformers >= 5's apply_chat_template names it (its keys in that order: a template may print the message), so
    a record's "reasoning" reaches Qwen3's template and gpt-oss's alike."""
    reasoning = next((message[k] for k in REASONING_NAMES if message.get(k) is not None), None)
    return message if reasoning is None else {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _special_tokens(tokenizer) -> dict:
    """The special tokens transformers' apply_chat_template gives a template (special_tokens_map): the tokenizer's
    BOS and EOS (or what its folder gave the template instead, template_ends) and template_tokens. One it has none
    of is left out, undefined as transformers leaves it ({% if bos_token is defined %}, | default('...')), not "";
    a tokenizer with no such attribute (BPETokenizer: GPT-2's, tritongpt's) keeps "", as it always rendered."""
    ends = {k: getattr(tokenizer, k, "") for k in ("bos_token", "eos_token")}
    ends.update(getattr(tokenizer, "template_ends", None) or {})
    tokens = {**ends, **(getattr(tokenizer, "template_tokens", None) or {})}
    return {k: v for k, v in tokens.items() if v is not None}


def render(tokenizer, messages, add_generation_prompt: bool = False, tools=None, variables=None,
           template: str | None = None) -> str:
    """messages rendered by the tokenizer's chat template, with the variables transformers gives it
    (its special tokens' spellings: bos_token, eos_token...; tools: OpenAI's function tools, as
    apply_chat_template(tools=) passes them; variables: more, as apply_chat_template's own kwargs, e.g.
    Qwen3's enable_thinking). template: the name of the one to render (None: template_name's pick, its
    "tool_use" one where tools are given), so that a check rendering without tools renders the same one."""
    import jinja2

    # (one dict, not keyword arguments: a variable may be named as an argument, "self", "tokenizer"). The tokenizer's
    # special tokens first (_special_tokens: every one transformers' special_tokens_map holds, pad_token, a model's
    # image_token...), which the variables may set, as apply_chat_template's kwargs do (serve refuses those in
    # RENDER_VARIABLES). A message's keys set to None are left out, as transformers >= 5's apply_chat_template leaves
    # them out: a record's tool call with "content": null renders its content as undefined ('' | trim), not "None"
    context = {**_special_tokens(tokenizer), **(variables or {}),
               "messages": [_reasoning_named({k: v for k, v in m.items() if v is not None}) for m in messages],
               "add_generation_prompt": add_generation_prompt, "tools": tools, "documents": None}
    name = template_name(tokenizer, tools) if template is None else template
    text = _template_text(tokenizer, name)
    what = _called(name, text)
    compiled = _compiled(text, what)
    _open_budget(_steps_for(context["messages"], tools))
    try:
        return compiled.render(context)
    except TooLarge as e:
        raise UserError(f"{what} is too large to render ({_line(e)}{e})") from None
    except RecursionError:  # (a macro that calls itself, a recursive loop with no end: a traceback, not a refusal)
        raise UserError(f"{what} calls itself without end (a macro or recursive loop: RecursionError)") from None
    except jinja2.exceptions.TemplateError as e:  # raise_exception's message: what the template refuses
        raise UserError(f"{what} refused this conversation: {e}") from None
    # (a value it cannot use: 'a' + 1; a filter given what it has no method for: a message's content list | indent
    # is an AttributeError of the filter's own)
    except (TypeError, ValueError, ArithmeticError, LookupError, AttributeError) as e:
        raise UserError(f"{what} could not render a value it was given ({_line(e)}{type(e).__name__}: {e})") \
            from None
    finally:
        _close_budget()


def _check_contents(tokenizer, messages):
    """No message may spell a special token: in rendered text it would be that token."""
    from tritongpt.train.tokenizer import DisallowedSpecialToken

    for i, m in enumerate(messages):
        try:
            tokenizer._check_special(m["content"], set(), "none_raise")
        except DisallowedSpecialToken as e:
            raise UserError(f"message {i} ({m['role']}) spells the special token {e.token!r}: in the model's chat "
                            "template it would be that token, not text") from None


def continued(text: str, final: str) -> str:
    """A rendering cut right after its final message's content (transformers' apply_chat_template(
    continue_final_message=True)): the answer then continues that message, not a new turn."""
    if not final.strip() or final.strip() not in text:
        raise UserError("continue_final_message: the final message's content is empty, or the chat template does "
                        "not write it as it is: there is nothing to continue")
    at = text.rindex(final.strip())
    keep = len(final.lstrip()) if text[at:at + len(final.lstrip())] == final.lstrip() else len(final.strip())
    return text[:at + keep]


def _content_text(messages, i: int) -> str:
    """messages[i]'s text as a template writes it: its content, none (null beside an assistant's calls), or a list
    of text parts ([{"type": "text", "text": ...}], given to the template as it is, as transformers gives it: the
    templates that read one write its parts one after another, as serve joins them)."""
    from tritongpt.train.formats import message_content

    content = messages[i].get("content")
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise UserError(f"messages[{i}]: content must be text, a list of text parts or null, got "
                        f"{type(content).__name__}")
    return message_content(messages[i], f"messages[{i}]", empty_ok=True)


def _with_text(content, before: str, after: str):
    """content (text, or a list of text parts) with text before and after it: a list's first and last parts changed,
    none added (a template may write only some of its parts, or test how many)."""
    if isinstance(content, list) and content:
        parts = [dict(part) for part in content]
        parts[0]["text"] = before + parts[0]["text"]
        parts[-1]["text"] += after
        return parts
    return f"{before}{content}{after}"


def tool_prompt(tokenizer, messages, tools=None, shown: bool = True, variables=None,
                mode: str = "generate") -> Rendered:
    """The generation prompt of a chat that may use tools (serve's tool calling, vLLM's): messages with an
    assistant's tool_calls (their arguments objects, not text: what templates read) and role "tool" results, the
    function tools given to the template as transformers' apply_chat_template(tools=) gives them. No text a message
    carries may spell a special token (_check_contents); a template that renders no tools, or drops a tool call or
    result, is refused by name: the model would answer without seeing them (tools where shown: a tool_choice
    "none" passes them as they are). variables: the template's other variables (render's). mode: vLLM's
    "generate" (add_generation_prompt), "continue" (continue_final_message: the final assistant message continued)
    or "none" (neither: the rendering as it is)."""
    # a message's text: its content, a result's tool_call_id, each call's id, name and arguments (as templates write
    # them: tojson keeps non-ASCII as it is), apart (no token spelled across two of them)
    _check_contents(tokenizer, [{"role": m["role"], "content": "\n".join(
        [_content_text(messages, i), m.get("tool_call_id") or ""] + [t for c in m.get("tool_calls") or () for t in (
            c["id"], c["function"]["name"], json.dumps(c["function"]["arguments"], ensure_ascii=False))])}
        for i, m in enumerate(messages)])
    for j, tool in enumerate(tools or ()):  # (its name, description and schema are rendered text too)
        try:
            _check_contents(tokenizer, [{"role": "tool", "content": json.dumps(tool, ensure_ascii=False)}])
        except UserError as e:
            raise UserError(f"tools[{j}]{str(e)[len('message 0 (tool)'):]}") from None
    name = template_name(tokenizer, tools)  # (every rendering below in it: "tool_use"'s, where tools pick it)

    def prompt(messages, tools):
        text = render(tokenizer, messages, mode == "generate", tools, variables, name)
        return continued(text, _content_text(messages, -1)) if mode == "continue" else text

    def without_tools():  # (a tool_use template may refuse no tools at all: it reads them, so it renders them)
        try:
            return prompt(messages, None)
        except UserError:
            return None

    text = prompt(messages, tools)
    if tools and shown and text == without_tools():
        raise UserError("the model's chat template renders no tools (it ignores apply_chat_template's tools): the "
                        "model would call them unseen")
    # each result, and each call's name and arguments, must reach the prompt: changed, it changes the rendering (a
    # search for its text would find a call's name in the tools' list, and miss a result the template escapes). One
    # rendering a change is O(n) renderings of an O(n) chat (Qwen2.5's with tools: 3 s at 200 messages), so they are
    # first all changed at once, each by a marker of its own (random digits: no escaping, quoting or casing alters
    # them): a marker found in that rendering proves its item reaches the prompt, where the rendering is the prompt
    # and the markers, nothing more (all changed at once, a template that tests them may show what it drops). An item
    # not so proven (a template that truncates, transforms, tests or drops it) is probed alone, as it was before.
    # A call's arguments changed whole change the prompt where the template writes any one of them, so each argument
    # whose value is text is a probe of its own too (its marker beside the others: no rendering more where they are
    # found): a template may write some of a call's arguments and drop others (by name, or by what a name looks like)
    probes = []  # (message, call or None, key, argument's name or None, what it is called, the message changed alone)
    for i, m in enumerate(messages):
        if m["role"] == "tool":
            changed = {**m, "content": _with_text(m.get("content"), "(", ")")}
            probes.append((i, None, "content", None, "tool result", changed))
        for j, c in enumerate(m.get("tool_calls") or ()):
            arguments = c["function"]["arguments"]
            changes = [("name", None, c["function"]["name"] + "_", "name"), ("arguments", None, {"_": arguments},
                                                                             "arguments")]
            changes += [("argument", a, {**arguments, a: f"({v})"}, f"argument {a!r}")
                        for a, v in (arguments.items() if isinstance(arguments, dict) else ()) if isinstance(v, str)]
            for key, a, value, what in changes:
                key_of = "arguments" if key == "argument" else key
                calls_j = [dict(d, function={**d["function"], key_of: value}) if k == j else d
                           for k, d in enumerate(m["tool_calls"])]
                probes.append((i, j, key, a, f"assistant's tool call's {what}", {**m, "tool_calls": calls_j}))
    read = _marked_probes(prompt, messages, tools, text, probes)
    for n, (i, _, _, _, what, changed) in enumerate(probes):
        if n in read:
            continue
        try:
            same = prompt(messages[:i] + [changed] + messages[i + 1:], tools) == text
        except UserError:  # (the template read it, and refuses the change)
            same = False
        if same:
            raise UserError(f"messages[{i}]: the model's chat template drops this {what} (the prompt is the same "
                            "without it)")
    return Rendered(text)


def _marked_probes(prompt, messages, tools, text: str, probes: list) -> set:
    """The probes (tool_prompt's) whose marked change is found in a rendering of the chat with them all changed (two
    renderings: the results' and arguments', then the calls' names): a tool result's content with a marker after it,
    a call's name with one, its arguments with a key and value of one (taken out as JSON writes the pair, or with
    the template's own words around it where it writes each argument apart: _pairs_taken_out), each argument whose
    value is text with a space and marker after it (the pair proves the template writes a call's arguments, not that
    it writes each of them: one it drops by name, or by what its name looks like, leaves its marker out). A marker
    found proves its item reaches the prompt only where that rendering, the markers taken out, is the prompt itself:
    a template that tests what it is given (shows the results only where none is "ok", a result only after a call
    with arguments, or only if it is long, or only its digits) shows marked items it drops as they are, and each
    change alone (the probes one at a time) would leave the prompt as it is. A rendering the template refuses, or
    that is more than the prompt and its markers, is retried a kind at a time, so that one kind leaves the other
    proven; what is still not proven, and what is not text or an object (no place for a marker), is left to the
    probes one at a time."""
    width = len(str(len(probes)))
    while True:  # (a marker's digits, fixed in length so that none is the start of another, in no text already)
        token = str(secrets.randbelow(10 ** 16)).zfill(16)
        if token not in text:
            break
    marks = {}  # probe's index: its item marked (an arguments' probe: the pair added to them)
    for n, (i, j, key, a, _, _) in enumerate(probes):
        mark = f"{token}{n:0{width}d}"
        # (a tool message may have no content, or null: left out, as transformers leaves a null key out, it renders as
        # the template renders an undefined one, and is probed alone)
        function = messages[i]["tool_calls"][j]["function"] if j is not None else {}
        value = messages[i].get("content") if key == "content" else function["arguments"][a] if key == "argument" \
            else function[key]
        if key == "arguments" and isinstance(value, dict):
            marks[n] = {mark: mark}
        elif key == "content" and (isinstance(value, str) or isinstance(value, list) and value):
            marks[n] = _with_text(value, "", f" {mark}")
        elif key == "argument":  # (after a space, as a result's: a template that writes only a value's digits, or
            marks[n] = f"{value} {mark}"  # cuts it short, leaves its marker in, not taken out)
        elif isinstance(value, str):
            marks[n] = value + mark
    marker = re.escape(token) + r"\d{%d}" % width
    # what a marker adds where it is found: a result's " " and marker, a name's marker, an arguments' key and value
    # (a pair as tojson or a Python dict writes it, with the separator on one side of it)
    added = re.compile(rf"(?P<pre>,\s*)?(?P<q>[\"'])(?P<key>{marker})(?P=q): (?P=q)(?P=key)(?P=q)(?P<post>,\s*)?"
                       rf"|(?P<space> ?)(?P<mark>{marker})")

    def proven(group) -> set | None:
        changed = list(messages)
        for n in group:
            i, j, key, a = probes[n][:4]
            m = changed[i] = dict(changed[i])
            if j is None:
                m["content"] = marks[n]
                continue
            calls = m["tool_calls"] = list(m["tool_calls"])
            function = dict(calls[j]["function"])
            calls[j] = {**calls[j], "function": function}
            # (an argument's marker replaces its value where it is, the arguments' pair comes after them all)
            if key == "arguments":
                function["arguments"] = {**function["arguments"], **marks[n]}
            elif key == "argument":
                function["arguments"] = {**function["arguments"], a: marks[n]}
            else:
                function[key] = marks[n]
        try:
            rendered = prompt(changed, tools)
        except UserError:
            return None
        kinds, seen = {n: probes[n][2] for n in group}, set()

        def taken_out(m):  # (a marker not where its kind puts it is left in: the rendering is then not the prompt)
            n = int((m["key"] or m["mark"])[len(token):])
            if m["key"] and kinds.get(n) == "arguments":
                seen.add(n)
                return m["pre"] if m["pre"] and m["post"] else ""
            if m["mark"] and (kinds.get(n) == "name" or kinds.get(n) in ("content", "argument") and m["space"]):
                seen.add(n)
                return m["space"] if kinds[n] == "name" else ""
            return m[0]
        left = added.sub(taken_out, rendered)
        if left == text:
            return seen
        # (what is left may be the arguments' pairs, written in words of the template's own: <parameter=k>...)
        pairs = _pairs_taken_out(left, text, token, width, {n for n in group if kinds[n] == "arguments"} - seen)
        return None if pairs is None else seen | pairs

    read = set()
    # names apart: a template may look a call's name up in the tools, and show or refuse other items by what it finds
    for kinds in (("content", "arguments", "argument"), ("name",)):
        group = [n for n in marks if probes[n][2] in kinds]
        got = proven(group) if group else set()
        if got is None and len(kinds) > 1:  # (refused or more than marked: which kind is unknown, each alone may pass)
            apart = ([n for n in group if probes[n][2] == kind] for kind in kinds)
            got = set().union(*(proven(g) or set() for g in apart if g))
        read |= got or set()
    return read


def _agree(a: str, b: str, ends: bool = False) -> int:
    """How many characters a and b share at their start (ends: at their end): found by halving, each test a
    comparison in C, not a character at a time in Python (a prompt may be megabytes long)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if (a.endswith(b[len(b) - mid:]) if ends else a.startswith(b[:mid])):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _pairs_taken_out(left: str, text: str, token: str, width: int, arguments: set) -> set | None:
    """The arguments' probes (_marked_probes') proven where a template writes each argument as a pair in words of
    its own, not as JSON: Qwen3-Coder's <parameter=KEY>\\nVALUE\\n</parameter>\\n, a marked key and value with the
    template's text before, between and after them. left: the marked rendering with every other marker taken out.
    The text between a key and its value is read from left; the text around each pair is found by its length (left
    is longer than the prompt by the pairs and as many characters around each: a template writes each pair alike)
    and by where it splits, before the pair and after it: the split that leaves the prompt itself, where there is
    one, takes the pairs out, and proves those probes as their JSON pairs prove theirs. Else None."""
    key = re.escape(token) + r"\d{%d}" % width
    # a key, then no other marker's digits until its own again: its value
    pairs = list(re.finditer(rf"(?P<key>{key})(?:(?!{re.escape(token)}).)*?(?P=key)", left, re.S))
    found = {int(m["key"][len(token):]) for m in pairs}
    if not pairs or len(found) < len(pairs) or not found <= arguments:
        return None
    extra = len(left) - len(text) - sum(m.end() - m.start() for m in pairs)
    if extra < 0 or extra % len(pairs):
        return None
    around = extra // len(pairs)  # (the template's text around each pair: `before` characters of it before)
    # the first pair's text before it is where left and the prompt still agree, the last one's after it where they
    # agree again: only the splits between those bounds can leave the prompt (usually one, or a few where the text
    # before a pair repeats the one after it)
    least = max(0, pairs[0].start() - _agree(left, text))
    most = min(around, pairs[-1].end() + around - len(left) + _agree(left, text, ends=True))
    for before in range(least, most + 1):
        cuts = [(m.start() - before, m.end() + around - before) for m in pairs]
        if cuts[0][0] < 0 or cuts[-1][1] > len(left) or any(end > start for (_, end), (start, _) in
                                                             zip(cuts, cuts[1:])):
            continue  # (past left's ends, or pairs' texts overlapping: no such split)
        kept = [left[end:start] for (_, end), (start, _) in zip([(0, 0)] + cuts, cuts + [(len(left), 0)])]
        if "".join(kept) == text:
            return found
    return None


def template_parts(tokenizer, messages, learn_all: bool = True) -> list:
    """(text, eot after it, learned) parts of a chat, as formats.chat_parts makes them, by the
    tokenizer's own template (see the module doc): the answers (through their end-of-turn token)
    learned, every other stretch of the rendering not; no eot is added (the template writes its
    own). A chat that ends with a user message ends with the generation prompt: a prompt to answer."""
    _check_contents(tokenizer, messages)
    ends_with_user = messages[-1]["role"] != "assistant"
    whole = render(tokenizer, messages, add_generation_prompt=ends_with_user)
    parts, at, last = [], 0, len(messages) - 1
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        through = render(tokenizer, messages[:i + 1])
        if not (whole.startswith(through) and through.startswith(before) and at <= len(before) < len(through)):
            raise UserError("the tokenizer's chat template does not render a conversation as its turns one after "
                            f"another (message {i}'s rendering is no prefix of the whole): the answers cannot be "
                            "told apart; pass --chat-template tritongpt")
        parts += [(Rendered(whole[at:len(before)]), False, False),
                  (Rendered(whole[len(before):len(through)]), False, learn_all or i == last)]
        at = len(through)
    if at < len(whole) or not parts:
        parts.append((Rendered(whole[at:]), False, False))
    return [p for p in parts if p[0]]


def turn_end_id(tokenizer, template: str = "default") -> int:
    """The id that ends an answer in the template (ChatML's <|im_end|>, Llama 3's <|eot_id|>, or
    the EOS): the first token the template writes after an answer's text. Generation stops there.
    template: which one (a "tool_use" one is rendered with tools, none listed: as a request with tools picks it)."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"}]
    text = render(tokenizer, probe, tools=[] if template == "tool_use" else None, template=template)
    what = _called(template, _template_text(tokenizer, template))
    if "Yes" not in text:  # (rfind's -1 would cut the text anywhere: a wrong end, or the eot, taken in silence)
        raise UserError(f"{what} does not write the messages' content (an answer 'Yes' "
                        f"renders as {text[:60]!r}): the model would never see the chat; pass --chat-template "
                        "tritongpt")
    after = text[text.rfind("Yes") + len("Yes"):]
    ids = tokenizer.encode(after, allowed_special="all")
    if not ids:
        return tokenizer.eot_id
    if ids[0] not in tokenizer.special_tokens.values():
        raise UserError(f"{what} ends an answer with {after[:20]!r}, no special token: "
                        "tritongpt cannot tell when an answer ends; pass --chat-template tritongpt")
    return ids[0]


def chat_template_for(tokenizer, command: str, choice: str, has_chats: bool):
    """The tokenizer a run saves and renders its chats with: as it is (--chat-template auto: the
    model's own template, when it has one), or without its template (tritongpt: ours). A note
    says which, where the data has chats and the tokenizer a template; the run's tokenizer keeps
    a template only if its chats are rendered in it, so `chat` and `export` use what it learned."""
    if getattr(tokenizer, "chat_template", None) is None:
        return tokenizer
    from tritongpt.errors import note

    if choice == "tritongpt":
        return tokenizer.without_chat_template()
    if has_chats:
        note(f"{command}: chats are rendered in the model's own chat template (its tokenizer's; --chat-template "
             "tritongpt for tritongpt's), answers ending in its end-of-turn token")
    return tokenizer


def add_chat_template_arg(p):
    """--chat-template, for sft, reward, dpo and rlhf."""
    p.add_argument("--chat-template", choices=CHOICES, default="auto",
                   help="how chat records become text: auto, the model's own template when its tokenizer has one "
                        "(tokenizer_config.json's chat_template: ChatML, Llama 3's...; else tritongpt's), or "
                        "tritongpt's plain-text one (train/formats.py) (default %(default)s)")


def answer_end_id(tokenizer, prompt) -> int:
    """What ends an answer to `prompt`, as preference pairs and RLHF's responses end: the
    template's end-of-turn token for a chat (formats.ChatPrompt) in a tokenizer with its own chat
    template, else the eot that ends an answer in tritongpt's."""
    from tritongpt.train.formats import ChatPrompt

    if isinstance(prompt, ChatPrompt) and getattr(tokenizer, "chat_template", None) is not None:
        return turn_end_id(tokenizer)
    return tokenizer.eot_id
