"""Tool calls in a chat answer's text (serve's tool calling: train/serve.py tool_setting, tool_message).

Two ways a call gets into the text. A named or "required" tool_choice holds the text to JSON by the grammar: the
named function's arguments, or "required"'s array [{"name": ..., "parameters": {...}}, ...], read as it grows by
scan_calls (CallStream). An "auto" tool_choice leaves the model free to answer or to call, in its own syntax, which
a parser for that model family finds (vLLM's --tool-call-parser, vllm/entrypoints/openai/tool_parsers/):

    hermes       text, then <tool_call>{"name": ..., "arguments": {...}}</tool_call> blocks (Qwen2.5, Qwen3, Hermes)
    llama3_json  {"name": ..., "parameters": {...}} objects, "; " between, after an optional <|python_tag|> (Llama 3.1+)
    mistral      text, then [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...] (Mistral's v3 tokenizers; ids of
                 9 letters and digits, which Mistral's templates insist on)

A response parses the whole answer (extract); a stream the growing text (AutoStream over scan): the content before
the first call is sent as it comes, less a tail that may begin the call marker; each call's name once its arguments
begin, then their text as it is drawn (vLLM's stream; the whole answer's arguments are parsed and written anew)."""
import json
import secrets
import string
import uuid


def tool_call_id(short: bool = False) -> str:
    """vLLM's make_tool_call_id; short: Mistral's nine letters and digits (its chat templates refuse other ids)."""
    if short:
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def scan_calls(text: str, keys=("parameters",)) -> list:
    """[(name, arguments' text so far)] of a JSON array of calls as it grows, [{"name": ..., "parameters": {...}},
    ...] ("required"'s grammar; keys: the arguments' key, a parser's), each item's name before its arguments, any
    whitespace between: a call counts once its arguments object has begun, its arguments that object's text, through
    its closing brace once written."""
    calls, depth, key, name, expect_key, i = [], 0, None, None, False, 0
    while i < len(text):
        c = text[i]
        if c == '"':  # a whole string (keys and the name are the item's, at depth 2), or wait for its end
            end, escaped = i + 1, False
            while end < len(text) and (escaped or text[end] != '"'):
                escaped = not escaped and text[end] == "\\"
                end += 1
            if end == len(text):
                break
            if depth == 2:
                try:
                    value = json.loads(text[i:end + 1])
                except ValueError:  # (a free model's text may hold any escape: not a name, not a key)
                    value = None
                key, name = (value, name) if expect_key else (key, value if key == "name" else name)
            i = end + 1
            continue
        if c in "{[":
            depth += 1
            if depth == 2:
                name, key, expect_key = None, None, True
            elif depth == 3 and c == "{" and key in keys and isinstance(name, str):
                calls.append([name, i, None])
        elif c in "}]":
            depth -= 1
            if depth == 2 and calls and calls[-1][2] is None:
                calls[-1][2] = i + 1
        elif depth == 2 and c in ":,":
            expect_key = c == ","
        i += 1
    return [(n, text[start:end]) for n, start, end in calls]


class CallDeltas:
    """A streamed choice's tool_calls deltas, as vLLM's stream sends them (serving_chat.py): a call's first delta with
    its index, id, type, name and the arguments so far, then the rest of its arguments' text as it comes."""

    def __init__(self, short_ids: bool = False):
        self.sent, self.short_ids = [], short_ids  # sent: each opened call's arguments sent so far (chars)

    def __call__(self, calls) -> list:
        """The deltas of calls [(name, arguments so far)] (the choice's calls as now seen) not sent yet."""
        out = []
        for k, (name, args) in enumerate(calls):
            if k == len(self.sent):
                out.append({"index": k, "id": tool_call_id(self.short_ids), "type": "function",
                            "function": {"name": name, "arguments": args}})
                self.sent.append(len(args))
            elif len(args) > self.sent[k]:
                out.append({"index": k, "function": {"arguments": args[self.sent[k]:]}})
                self.sent[k] = len(args)
        return out


class CallStream:
    """A named tool_choice's or "required"'s streamed calls: the named call's arguments the whole text, "required"'s
    read from the growing array (scan_calls)."""

    def __init__(self, name: str | None, short_ids: bool = False):
        self.name, self.text, self.deltas = name, "", CallDeltas(short_ids)

    @property
    def sent(self) -> list:
        return self.deltas.sent

    def add(self, text: str) -> list:
        """The tool_calls deltas the choice's new text makes (none: nothing of a call yet)."""
        self.text += text
        return self.deltas([(self.name, self.text)] if self.name else scan_calls(self.text))


def held(text: str, marker: str) -> int:
    """How many of text's last characters may begin marker (held back from a stream's content until they do not)."""
    return next((k for k in range(min(len(marker) - 1, len(text)), 0, -1) if marker.startswith(text[-k:])), 0)


def outside_strings(text: str, marker: str, start: int = 0) -> int:
    """The first index of marker in text from start that is not inside a JSON string (-1: none): a call's strings
    may spell its family's markers."""
    quoted = escaped = False
    for i in range(start, len(text)):
        c = text[i]
        if quoted:  # (a string's end is a quote no backslash escapes)
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif text.startswith(marker, i):
            return i
    return -1


def call(obj, keys) -> tuple:
    """(name, arguments' JSON text) of a parsed call {"name": ..., key: {...}} (keys: where its arguments may be);
    ValueError where it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise ValueError("a call is an object with a name")
    args = next((obj[k] for k in keys if k in obj), None)
    if not isinstance(args, dict):
        raise ValueError("a call's arguments are an object")
    return obj["name"], json.dumps(args, ensure_ascii=False)


class Marked:
    """A parser for text, then calls after a marker (Hermes' and Mistral's): the content is the text before the
    marker (None where empty, vLLM's), the calls what follows it; text that does not parse is all content, no calls
    (vLLM's: the model answered in text after all)."""
    marker = ""
    keys = ("arguments",)
    short_ids = False  # Mistral's ids
    keeps_specials = True  # vLLM's adjust_request: skip_special_tokens off, where tokenizers mark the marker special

    def objects(self, rest: str) -> list:
        """The calls' objects parsed from the text after the first marker (ValueError where it does not parse)."""
        raise NotImplementedError

    def arrays(self, rest: str) -> list:
        """The calls' texts after the first marker as it grows, each an array scan_calls reads."""
        raise NotImplementedError

    def extract(self, text: str) -> tuple:
        """(content, [(name, arguments' JSON text)]) of a whole answer; no calls: (text, [])."""
        at = text.find(self.marker)
        if at < 0:
            return text, []
        try:
            calls = [call(obj, self.keys) for obj in self.objects(text[at + len(self.marker):])]
        except (ValueError, TypeError, RecursionError):  # (RecursionError: JSON nested past Python's limit)
            return text, []
        return (text[:at] or None, calls) if calls else (text, [])

    def scan(self, text: str, final: bool) -> tuple:
        """(the content that can be sent, [(name, arguments so far)]) of a growing answer (final: it is whole)."""
        at = text.find(self.marker)
        if at < 0:
            return text[:len(text) - (0 if final else held(text, self.marker))], []
        return text[:at], [c for a in self.arrays(text[at + len(self.marker):]) for c in scan_calls(a, self.keys)]


class Hermes(Marked):
    """Hermes' <tool_call> blocks, a JSON object each (vLLM's hermes parser: text after a block's end or between
    blocks dropped; a last block left open parsed as far as it goes). A block ends at the first </tool_call> outside
    its JSON's strings, which may spell either marker."""
    marker, end = "<tool_call>", "</tool_call>"

    def blocks(self, rest: str) -> list:
        """Each block's text, the first's from rest's start (just after the first marker)."""
        out, i = [], 0
        while True:
            end = outside_strings(rest, self.end, i)
            if end < 0:  # (still open)
                return out + [rest[i:]]
            out.append(rest[i:end])
            i = rest.find(self.marker, end + len(self.end))
            if i < 0:
                return out
            i += len(self.marker)

    def objects(self, rest):
        return [json.loads(block) for block in self.blocks(rest)]

    def arrays(self, rest):  # (less a tail that may begin the block's end: not the arguments')
        return ["[" + b[:len(b) - held(b, self.end)] for b in self.blocks(rest)]


class Mistral(Marked):
    """Mistral's [TOOL_CALLS] and a JSON array of calls (or one call's object) after it."""
    marker, short_ids = "[TOOL_CALLS]", True

    def objects(self, rest):  # (text after the JSON dropped, as vLLM's fallback regex drops it)
        calls = json.JSONDecoder().raw_decode(rest.lstrip())[0]
        return [calls] if isinstance(calls, dict) else calls

    def arrays(self, rest):
        return ["[" + rest.lstrip() if rest.lstrip().startswith("{") else rest]


class Llama3Json:
    """Llama 3's JSON calls: the answer is calls when it begins with "{" (or <|python_tag|>, where special tokens are
    shown): objects {"name": ..., "parameters" (or "arguments"): {...}}, ";" between (vLLM's llama3_json parser);
    the content then None, and text after the last whole object dropped (vLLM's regex finds the objects alone). An
    answer that begins otherwise, or whose first object is not a call, or any object that is not one, is all
    content."""
    tag, keys, short_ids, keeps_specials = "<|python_tag|>", ("parameters", "arguments"), False, False

    def body(self, text: str):
        body = text[len(self.tag):] if text.startswith(self.tag) else text
        return body if body.startswith("{") else None

    def extract(self, text: str) -> tuple:
        body, calls, i = self.body(text), [], 0
        if body is None:
            return text, []
        decoder = json.JSONDecoder()
        while i < len(body):
            try:
                obj, i = decoder.raw_decode(body, i)
            except (ValueError, RecursionError):
                break  # (the calls' end: text after them, or one cut short)
            try:
                calls.append(call(obj, self.keys))
            except ValueError:
                return text, []
            while i < len(body) and body[i] in "; \t\r\n":
                i += 1
        return (None, calls) if calls else (text, [])

    def scan(self, text: str, final: bool) -> tuple:
        if not final and (text == "" or self.tag.startswith(text)):
            return "", []  # (not yet known: text or calls)
        body = self.body(text)
        return (text, []) if body is None else ("", scan_calls("[" + body, self.keys))


PARSERS = {"hermes": Hermes, "llama3_json": Llama3Json, "mistral": Mistral}


class AutoStream:
    """An "auto" tool_choice's streamed choice: the content before the first call as it comes (less a tail that may
    begin the call marker), then each call (CallDeltas) as its arguments grow; at the end (finish) what was held
    back: a held tail's text, the rest of the calls, or, where the answer held no call after all, its text.
    parallel False (parallel_tool_calls): the first call alone."""

    def __init__(self, parser, parallel: bool = True):
        self.parser, self.text, self.content = parser, "", 0  # content: the content's characters sent
        self.deltas, self.most = CallDeltas(parser.short_ids), None if parallel else 1

    @property
    def sent(self) -> list:
        return self.deltas.sent

    def _content(self, content) -> str | None:
        if not content or len(content) <= self.content:
            return None
        new, self.content = content[self.content:], len(content)
        return new

    def add(self, text: str) -> tuple:
        """(the content to send or None, the tool_calls deltas) of the choice's new text."""
        self.text += text
        content, calls = self.parser.scan(self.text, False)
        return self._content(content), self.deltas(calls[:self.most])

    def finish(self) -> tuple:
        """(content, tool_calls deltas) the answer's end sends: what add held back."""
        content, calls = self.parser.scan(self.text, True)
        _, whole = self.parser.extract(self.text)
        if not whole and not self.sent:  # (no call after all: a Llama answer in JSON, a marker never written whole)
            return self._content(self.text), []
        # (and calls the scan could not follow, their arguments before their name: sent whole)
        return self._content(content), self.deltas((calls + whole[len(calls):])[:self.most])
