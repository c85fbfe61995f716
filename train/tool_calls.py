"""Tool calls in a chat answer's text (serve's tool calling: train/serve.py tool_setting, tool_message).

Two ways a call gets into the text. A named or "required" tool_choice holds the text to JSON by the grammar: the
named function's arguments, or "required"'s array [{"name": ..., "parameters": {...}}, ...], read as it grows by
scan_calls (CallStream). An "auto" tool_choice leaves the model free to answer or to call, in its own syntax, which
a parser for that model family finds (vLLM's --tool-call-parser, vllm/entrypoints/openai/tool_parsers/):

    hermes       text, then <tool_call>{"name": ..., "arguments": {...}}</tool_call> blocks (Qwen2.5, Qwen3, Hermes)
    llama3_json  {"name": ..., "parameters": {...}} objects, "; " between, after an optional <|python_tag|> (Llama 3.1+)
    mistral      text, then [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...] (Mistral's v3 tokenizers), or
                 [TOOL_CALLS]name[ARGS]{...} per call (v11+), or [TOOL_CALLS]name[CALL_ID]id[ARGS]{...} (v13, the
                 call's id in the text); ids of 9 letters and digits, which its templates insist on
    pythonic     [f(a=1, b="x"), g(c=[1, 2])], a Python list of calls with literal arguments (Llama 3.2, Llama 4)
    openai       gpt-oss's harmony messages, each <|channel|>commentary to=functions.NAME ... <|message|>{...}<|call|>
                 a call; the content its final channel's text (harmony_split: serve hands it the answer's markup)
    qwen3_coder  text, then <tool_call><function=f><parameter=a>text</parameter></function></tool_call> (Qwen3-Coder,
                 Qwen3.5): parameter values converted by the request's tool's JSON schema types

A response parses the whole answer (extract); a stream the growing text (AutoStream over scan): the content before
the first call is sent as it comes, less a tail that may begin the call marker; each call's name once its arguments
begin, then their text as it is drawn (vLLM's stream; the whole answer's arguments are parsed and written anew).
A call is (name, arguments' JSON text), or (name, arguments, id) where the text gives its id (Mistral's v13)."""
import ast
import io
import json
import re
import secrets
import string
import tokenize
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
    its closing brace once written; nothing after the array's closing bracket."""
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
            if depth == 0:  # (the array's end: what follows is not its calls, as the whole answer's parse drops it)
                break
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
        """The deltas of calls [(name, arguments so far[, id])] (the choice's calls as now seen) not sent yet."""
        out = []
        for k, (name, args, *given) in enumerate(calls):
            if k == len(self.sent):
                out.append({"index": k, "id": given[0] if given else tool_call_id(self.short_ids), "type": "function",
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


class Pairs(dict):
    """A JSON object as read (DECODER), with its keys in the order written, repeats kept (a dict keeps the last)."""

    def __init__(self, pairs):
        super().__init__(pairs)
        self.written = [k for k, _ in pairs]


DECODER = json.JSONDecoder(object_pairs_hook=Pairs)  # the calls' objects, whose repeated keys call() refuses


def call(obj, keys) -> tuple:
    """(name, arguments' JSON text) of a parsed call {"name": ..., key: {...}} (keys: where its arguments may be);
    ValueError where it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise ValueError("a call is an object with a name")
    # (a name or arguments written twice: the stream sent the first name, and each arguments object as a call of
    # its own (scan_calls), while the dict keeps the last; which one the model meant is not known)
    written = getattr(obj, "written", [])
    if written.count("name") > 1 or sum(k in keys for k in written) > 1:
        raise ValueError("a call names its function and gives its arguments once")
    args = next((obj[k] for k in keys if k in obj), None)
    if not isinstance(args, dict):
        raise ValueError("a call's arguments are an object")
    # (allow_nan off: Python's json reads NaN and Infinity, which are not JSON, so a client could not parse the
    # arguments; such a call is the answer's text, as pythonic's and qwen3_coder's are)
    return obj["name"], json.dumps(args, ensure_ascii=False, allow_nan=False)


class Marked:
    """A parser for text, then calls after a marker (Hermes' and Mistral's): the content is the text before the
    marker (None where empty, vLLM's), the calls what follows it; text that does not parse is all content, no calls
    (vLLM's: the model answered in text after all)."""
    marker = ""
    keys = ("arguments",)
    short_ids = False  # Mistral's ids
    needs_tools = False  # (Qwen3Coder's: the request's tools type its parameters)
    needs_ids = False  # (Mistral's: the ids of the request's earlier calls are not kept for a new one)
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
        return text[:at], self.streamed(text[at + len(self.marker):])

    def streamed(self, rest: str) -> list:
        """[(name, arguments so far)] of the calls after the first marker as they grow."""
        return [c for a in self.arrays(rest) for c in scan_calls(a, self.keys)]


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
        return [DECODER.decode(block) for block in self.blocks(rest)]

    def arrays(self, rest):  # (less a tail that may begin the block's end: not the arguments')
        return ["[" + b[:len(b) - held(b, self.end)] for b in self.blocks(rest)]


def split_outside(text: str, marker: str) -> list:
    """text cut at each marker outside JSON strings (outside_strings)."""
    out, i = [], 0
    while (at := outside_strings(text, marker, i)) >= 0:
        out.append(text[i:at])
        i = at + len(marker)
    return out + [text[i:]]


class Mistral(Marked):
    """Mistral's [TOOL_CALLS] and a JSON array of calls (or one call's object) after it (its v3 tokenizers), or each
    call its own [TOOL_CALLS]name[ARGS]{...} (v11 and later; vLLM tells them by the tokenizer's version, here by the
    text: a v11 call begins with its name, not "[" or "{"), or [TOOL_CALLS]name[CALL_ID]id[ARGS]{...} (v13,
    Magistral's), whose call keeps the id written (vLLM's makes its own: the tool's answer then names an id the
    model never wrote) where it is Mistral's nine letters and digits and no earlier call's, in this answer or in the
    request's messages (taken: their ids; a tool's result for a reused id would answer two calls; mistral-common's
    v13 validator asks distinct ids within one turn, and vLLM's ids are never the model's). A v11 call's text after
    its arguments' object, up to the next [TOOL_CALLS], is dropped, and one whose arguments do not parse leaves the
    answer content (vLLM's keeps it a call with the broken arguments)."""
    marker, short_ids, needs_ids = "[TOOL_CALLS]", True, True
    name = re.compile(r"[A-Za-z0-9_-]+")  # (mistral-common's function names)
    call_id = re.compile(r"[A-Za-z0-9]{9}")  # (mistral-common's tool call ids)

    def __init__(self, taken=()):
        """taken: the ids of the calls in the request's messages, which a call of this answer does not keep."""
        self.taken = frozenset(taken)

    @staticmethod
    def v11(rest: str) -> bool:
        return rest.strip() != "" and rest.lstrip()[0] not in "[{"

    def v11_call(self, chunk: str):
        """(name, where its arguments begin, the id written or None) of a v11 or v13 call's text (None: its name is
        not whole yet, or bad)."""
        at = chunk.find("{")
        # (whitespace about the name and the id: vLLM's regex skips it)
        name, _, given = chunk[:at].strip().removesuffix("[ARGS]").partition("[CALL_ID]")
        name, given = name.strip(), given.strip()
        return (name, at, given if self.call_id.fullmatch(given) else None) \
            if at >= 0 and self.name.fullmatch(name) else None

    def v11_calls(self, rest: str) -> list:
        """[(its text, name, where its arguments begin, its id or None), ...] of the v11 calls whose names are
        whole, in order, up to the first that is not (an id an earlier call has, or a taken one: None)."""
        out = []
        for chunk in split_outside(rest, self.marker):
            found = self.v11_call(chunk)
            if found is None:
                break
            out.append((chunk, *found[:2], None if found[2] in self.taken or found[2] in [c[3] for c in out]
                        else found[2]))
        return out

    def extract(self, text):
        content, calls = super().extract(text)
        rest = text[text.find(self.marker) + len(self.marker):]
        if not calls or not self.v11(rest):
            return content, calls
        return content, [c + (i,) if i else c for c, (*_, i) in zip(calls, self.v11_calls(rest))]

    def objects(self, rest):  # (text after the JSON dropped, as vLLM's fallback regex drops it)
        if self.v11(rest):
            out = []
            for chunk in split_outside(rest, self.marker):
                name, at, _ = self.v11_call(chunk) or (None, None, None)
                if name is None:
                    raise ValueError("a v11 call is a name, [ARGS] and an object")
                out.append({"name": name, "arguments": json.JSONDecoder().raw_decode(chunk, at)[0]})
            return out
        calls = DECODER.raw_decode(rest.lstrip())[0]
        return [calls] if isinstance(calls, dict) else calls

    def arrays(self, rest):
        return ["[" + rest.lstrip() if rest.lstrip().startswith("{") else rest]

    def streamed(self, rest):
        if not self.v11(rest):
            return super().streamed(rest)
        out = []
        for chunk, name, at, given in self.v11_calls(rest):
            # (read as the JSON form's item; its first call alone: text after the object is not a call)
            out += [c + (given,) if given else c for c in scan_calls(
                f'[{{"name": {json.dumps(name)}, "arguments": {chunk[at:]}', self.keys)[:1]]
        return out


class Llama3Json:
    """Llama 3's JSON calls: the answer is calls when it begins with "{" (or <|python_tag|>, where special tokens are
    shown): objects {"name": ..., "parameters" (or "arguments"): {...}}, ";" between (vLLM's llama3_json parser);
    the content then None, and text after the last whole object dropped (vLLM's regex finds the objects alone). An
    answer that begins otherwise, or whose first object is not a call, or any object that is not one, is all
    content."""
    tag, keys, short_ids, keeps_specials = "<|python_tag|>", ("parameters", "arguments"), False, False
    needs_tools = needs_ids = False

    def body(self, text: str):
        body = text[len(self.tag):] if text.startswith(self.tag) else text
        return body if body.startswith("{") else None

    def values(self, body: str) -> tuple:
        """([each whole JSON value body begins with], where the reading stopped): "; " and whitespace between them;
        it stops at the first that does not parse (the calls' end: text after them, or one cut short)."""
        decoder, out, i = DECODER, [], 0
        while i < len(body):
            try:
                obj, i = decoder.raw_decode(body, i)
            except (ValueError, RecursionError):
                break
            out.append(obj)
            while i < len(body) and body[i] in "; \t\r\n":
                i += 1
        return out, i

    def extract(self, text: str) -> tuple:
        body = self.body(text)
        if body is None:
            return text, []
        try:
            calls = [call(obj, self.keys) for obj in self.values(body)[0]]
        except (ValueError, RecursionError):  # (arguments read just within Python's limit, written just past it)
            return text, []
        return (None, calls) if calls else (text, [])

    def scan(self, text: str, final: bool) -> tuple:
        if not final and (text == "" or self.tag.startswith(text)):
            return "", []  # (not yet known: text or calls)
        body = self.body(text)
        if body is None:
            return text, []
        # (read as far as extract reads: its whole objects, and one still being written; not what follows them)
        end = self.values(body)[1]
        return "", scan_calls("[" + (body if body.startswith("{", end) else body[:end]), self.keys)


def python_call(node) -> tuple:
    """(name, arguments' JSON text) of a pythonic call's node, f(a=1, b=[2, "x"]): keyword arguments whose values are
    literals (ast.literal_eval reads the node, nothing is run) that JSON can hold; ValueError where it is not one."""
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise ValueError("a call is a name and its arguments")
    if node.args or any(k.arg is None for k in node.keywords):
        raise ValueError("a call's arguments are named")  # (vLLM drops positional ones unseen)
    try:
        args = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
        return node.func.id, json.dumps(args, ensure_ascii=False, allow_nan=False)
    except (TypeError, SyntaxError, RecursionError, MemoryError) as e:  # (a set, bytes, NaN: not JSON)
        raise ValueError(f"a call's arguments are JSON literals: {e}") from e


def list_items(text: str) -> list:
    """The texts of the items of the Python list text begins with, each once the comma or bracket after it is
    written (Python's tokenizer: strings may hold any bracket)."""
    starts = [0]
    for line in io.StringIO(text).readlines():
        starts.append(starts[-1] + len(line))
    items, depth, begin = [], 0, 1
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.ERRORTOKEN:
                break  # (a string not closed yet)
            at = starts[tok.start[0] - 1] + tok.start[1]
            if tok.type != tokenize.OP:
                continue
            if tok.string in ("(", "[", "{"):
                depth += 1
            elif tok.string in (")", "]", "}"):
                depth -= 1
                if depth == 0:
                    return items + ([text[begin:at]] if text[begin:at].strip() or not items else [])
            elif tok.string == "," and depth == 1:
                items.append(text[begin:at])
                begin = at + 1
    except (tokenize.TokenError, SyntaxError):  # (EOF inside the list: the items so far)
        pass
    return items


class Pythonic:
    """Llama 3.2's and Llama 4's pythonic calls (vLLM's pythonic parser): an answer that is a Python list of calls,
    [f(a=1, b="x"), g(c=[1, 2])], read with ast, never run; each call's keyword arguments (literals only) become its
    arguments' JSON object. An answer that does not begin with "[", or is not one such list and nothing after it, is
    all content. Streamed, each call is sent whole once the comma or bracket after it is written: its arguments'
    JSON does not exist until the Python literal is whole (vLLM's stream guesses the literal's end to send it as it
    grows)."""
    short_ids, keeps_specials, needs_tools, needs_ids = False, False, False, False

    def extract(self, text: str) -> tuple:
        if not text.startswith("["):
            return text, []
        try:
            body = ast.parse(text).body
            if len(body) != 1 or not isinstance(body[0], ast.Expr) or not isinstance(body[0].value, ast.List):
                return text, []
            calls = [python_call(e) for e in body[0].value.elts]
        except (ValueError, SyntaxError, RecursionError, MemoryError):
            return text, []
        return (None, calls) if calls else (text, [])

    def scan(self, text: str, final: bool) -> tuple:
        if not text.startswith("["):
            return ("", []) if text == "" and not final else (text, [])
        calls = []
        for item in list_items(text):
            try:
                calls.append(python_call(ast.parse(item.strip(), mode="eval").body))
            except (ValueError, SyntaxError, RecursionError, MemoryError):
                break
        return "", calls


def schema_types(schema, root=None, seen=()) -> list:
    """The JSON types a parameter's schema names: its "type" (one, or a list of them), else its anyOf's; a local
    $ref ("#/$defs/X", pydantic's) is the schema it points to in root (the tool's parameters)."""
    if not isinstance(schema, dict):
        return []
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/") and ref not in seen:  # (seen: a reference to itself ends)
        target = root
        for part in ref[2:].split("/"):
            target = target.get(part.replace("~1", "/").replace("~0", "~")) if isinstance(target, dict) else None
        return schema_types(target, root, seen + (ref,))
    if "type" in schema:
        kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        return [str(k).strip().lower() for k in kinds]
    options = schema.get("anyOf")
    return [k for o in options for k in schema_types(o, root, seen)] if isinstance(options, list) else []


def qwen_value(value: str, schema, root=None):
    """A qwen3_coder parameter's text as its JSON schema's type asks (vLLM's _convert_param_value): strings as
    written, integers and numbers parsed, booleans "true" or not, objects and arrays as JSON (else a Python
    literal), null or None as null where the type is not a string; a value that does not parse stays text. Of
    several types (a list, anyOf) the first not null; root: the tool's parameters, where a $ref points
    (vLLM's reads the text of a list of types as a type, and no $ref: objects and booleans there stayed text)."""
    kinds = schema_types(schema, root)
    nullable, kind = "null" in kinds, next((k for k in kinds if k != "null"), "string")
    if nullable and value.lower() in ("null", "none"):
        return None
    if kind in ("string", "str", "text", "varchar", "char", "enum"):
        return value
    if value.lower() in ("null", "none"):
        return None
    try:
        if kind.startswith(("int", "uint", "long", "short", "unsigned")):
            return int(value)
        if kind.startswith(("num", "float")):
            number = float(value)
            return int(number) if number == int(number) else number
    except (ValueError, OverflowError):  # (inf, nan, not a number: the text)
        return value
    if kind in ("boolean", "bool", "binary"):
        return value.lower() == "true"
    container = kind in ("object", "array", "arr") or kind.startswith(("dict", "list"))
    for parse in ((json.loads,) if container else ()) + (ast.literal_eval,):
        try:
            got = parse(value)
        except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
            continue
        if container and isinstance(got, str):  # (a Python literal written as a JSON string: vLLM reads it again)
            try:
                got = ast.literal_eval(got)
            except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
                pass
        return got
    return value


class Qwen3Coder:
    """Qwen3-Coder's and Qwen3.5's XML calls (vLLM's qwen3_coder parser): text, then <tool_call> blocks each holding
    <function=NAME> and <parameter=KEY>value</parameter> items, a newline each side of a value dropped. The values are
    text, typed by the request's tools (qwen_value; a parameter or tool the request does not name stays text), so
    the parser is made per request with its tools. The content is the text before the first <tool_call>, a bare
    <function=...> before it included (vLLM's: once there is a block, the calls are the blocks'); with no block, the
    text before the first <function=, the bare functions the calls (vLLM's back-off); text between and after the
    blocks is dropped. As vLLM's, a block, function or parameter left open at the answer's end is read as far as it
    goes; a function whose name is not closed by ">" leaves the answer content. Streamed, a call opens once its name
    is whole, its arguments' JSON growing by each parameter as it closes (its value typed then), "}" at </function>;
    a bare function is held back (neither content nor a call) until a block begins or the answer ends."""
    short_ids, keeps_specials, needs_tools, needs_ids = False, False, True, False
    starts = ("<tool_call>", "<function=")
    # (\Z, not $: $ also matches before a last newline, which would close a value still being written)
    blocks = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*?)\Z", re.DOTALL)
    functions = re.compile(r"<function=(.*?)</function>|<function=(.*)\Z", re.DOTALL)
    parameters = re.compile(r"<parameter=(.*?)(?:</parameter>|(?=<parameter=)|(?=</function>)|\Z)", re.DOTALL)

    def __init__(self, tools: list | None = None):
        """tools: the request's, as serve's check_tools gives them ({"function": {"name", "parameters"}})."""
        self.schemas, self.roots = {}, {}  # (roots: each tool's parameters, where its properties' $refs point)
        for tool in tools or []:
            root = tool["function"].get("parameters")
            params = root.get("properties", root) if isinstance(root, dict) else {}
            self.schemas[tool["function"]["name"]] = params if isinstance(params, dict) else {}
            self.roots[tool["function"]["name"]] = root

    def calls(self, text: str, final: bool) -> list:
        """[(name, arguments' JSON text so far)]: final, each call's whole (ValueError: a name not closed); else
        those whose names are whole, each with its closed parameters, and "}" once its </function> is written."""
        blocks = [a or b for a, b in self.blocks.findall(text)] if "<tool_call>" in text else [text]
        out = []
        for block in blocks:
            for m in self.functions.finditer(block):
                body = m.group(1) if m.group(1) is not None else m.group(2)
                closed = final or m.group(1) is not None
                if ">" not in body:
                    if final:
                        raise ValueError("a function's name ends with >")
                    return out
                name, body = body.split(">", 1)
                schemas, items = self.schemas.get(name, {}), []
                for p in self.parameters.finditer(body):
                    if not closed and p.end() == len(body) and not p.group(0).endswith("</parameter>"):
                        break  # (still being written: only the answer's end closes it so far)
                    if ">" not in p.group(1):
                        raise ValueError("a parameter's name ends with >")
                    key, value = p.group(1).split(">", 1)
                    value = value.removeprefix("\n").removesuffix("\n")
                    items.append(json.dumps(key, ensure_ascii=False) + ": " + json.dumps(
                        qwen_value(value, schemas.get(key), self.roots.get(name)), ensure_ascii=False,
                        allow_nan=False))
                out.append((name, "{" + ", ".join(items) + ("}" if closed else "")))
                if not closed:
                    return out
        return out

    def content_end(self, text: str) -> int:
        """Where the content ends: at the first <tool_call>, else at the first bare <function= (-1: neither)."""
        at = text.find("<tool_call>")
        return at if at >= 0 else text.find("<function=")

    def extract(self, text: str) -> tuple:
        if "<function=" not in text:
            return text, []
        try:
            calls = [(n, json.dumps(json.loads(a), ensure_ascii=False)) for n, a in self.calls(text, True)]
        except (ValueError, TypeError, RecursionError):
            return text, []
        return (text[:self.content_end(text)] or None, calls) if calls else (text, [])

    def scan(self, text: str, final: bool) -> tuple:
        at = self.content_end(text)
        if at < 0:
            return text[:len(text) - (0 if final else max(held(text, s) for s in self.starts))], []
        if not final and "<tool_call>" not in text:
            return text[:at], []  # (a bare function: a call only if no block follows, content if one does)
        try:
            return text[:at], self.calls(text, final)
        except (ValueError, TypeError, RecursionError):
            return text[:at], []


HARMONY_ENDS = ("<|end|>", "<|call|>", "<|return|>")  # (a message's end: <|call|> a tool call's, <|return|> the answer's)
HARMONY_MARKERS = ("<|start|>", "<|channel|>", "<|message|>", "<|constrain|>") + HARMONY_ENDS


class HarmonyMessage:
    """One message of a harmony answer: its header's role (None in the answer's first header: the prompt's
    <|start|>assistant gave it), channel, recipient (to=...) and content type (<|constrain|>json, or a bare word
    after the channel), its body's text, and whether its end marker was read (done)."""

    def __init__(self, header: str, first: bool, body: str, done: bool):
        before, _, after = header.partition("<|channel|>")
        heads, words = before.split(), after.replace("<|constrain|>", " ").split()
        self.role = None if first or not heads or heads[0].startswith("to=") else heads[0]
        self.channel = words[0] if words else None
        rest = heads + words[1:]
        self.recipient = next((w[3:] for w in rest if w.startswith("to=")), None)
        self.ctype = next((w for w in words[1:] if not w.startswith("to=")), None)
        self.body, self.done = body, done

    @property
    def kind(self) -> str | None:
        """"call" (to=functions.NAME), "reasoning" (analysis), "content" (final, and commentary without a recipient:
        vLLM's preambles, shown to the user), or None: dropped (another role's message, a built-in tool's call, an
        unknown channel: vLLM's chat answer has neither text nor call of them)."""
        if self.role not in (None, "assistant"):
            return None
        if self.recipient is not None:
            return "call" if self.recipient.startswith("functions.") else None
        return {"analysis": "reasoning", "final": "content", "commentary": "content"}.get(self.channel)


def harmony(text: str, final: bool) -> list:
    """The messages of a gpt-oss answer's text in OpenAI's harmony format (its special tokens kept), as a small
    state machine reads them: a header up to <|message|>, a body up to <|end|>, <|call|> or <|return|>, then
    nothing (text there dropped) up to the next <|start|>. vLLM reads the token ids with the openai_harmony
    library; this reads the decoded text: a marker is its special token's spelling, so a body that spells one
    (never a token the model draws as text) would end there. The answer's first header needs no <|start|> (the
    prompt ends <|start|>assistant). final False (a growing answer): a header not yet ended is no message, and an
    open body is less a tail that may begin an end marker; final: an open body ends with the answer (a call whose
    <|call|> is a stop token, left out of the text, is whole: vLLM's parser reads that token)."""
    out, i, state, first = [], 0, "header", True
    # each end marker's next place at or after i (-2: not looked for yet, -1: none left), kept until passed: one
    # the text never has again (a <|return|> where every message ends <|end|>) is not searched for to the text's
    # end at each body, which made an answer of many messages quadratic (1 MB of them: half a minute)
    ahead = dict.fromkeys(HARMONY_ENDS, -2)
    while i < len(text):
        if state == "between":
            at = text.find("<|start|>", i)
            if at < 0:
                break
            i, state = at + len("<|start|>"), "header"
        elif state == "header":
            at = text.find("<|message|>", i)
            if at < 0:
                break
            header = text[i:at]
            header = header[header.rfind("<|start|>") + len("<|start|>"):] if "<|start|>" in header else header
            out.append(HarmonyMessage(header, first, "", False))
            i, state, first = at + len("<|message|>"), "body", False
        else:
            for m in HARMONY_ENDS:
                if ahead[m] == -2 or -1 < ahead[m] < i:
                    ahead[m] = text.find(m, i)
            at, marker = min(((a, m) for m, a in ahead.items() if a >= 0), default=(-1, None))
            if at < 0:
                body = text[i:]
                out[-1].body = body if final else body[:len(body) - max(held(body, m) for m in HARMONY_ENDS)]
                out[-1].done = final
                break
            out[-1].body, out[-1].done = text[i:at], True
            i, state = at + len(marker), "between"
    return out


def harmony_split(text: str, final: bool) -> tuple:
    """(reasoning, content, calls [(name, body so far, content type)]) of a harmony answer: reasoning the analysis
    messages' bodies, content the final and preamble ones', each "\n"-joined (vLLM's whole answer joins its
    messages so; its stream sends no "\n" between them: here the stream sends what the whole answer has). A text
    with no harmony marker at all is all content once whole (vLLM's parser finds no message in it: no content)."""
    if final and not any(m in text for m in HARMONY_MARKERS):
        return None, text or None, []
    parts = {"reasoning": [], "content": [], "call": []}
    for m in harmony(text, final):
        if m.kind is not None:
            parts[m.kind].append(m)
    reasoning, content = ("\n".join(m.body for m in parts[k]) or None for k in ("reasoning", "content"))
    return reasoning, content, [(m.recipient.split("functions.", 1)[1], m.body, m.ctype) for m in parts["call"]]


class HarmonyReader:
    """harmony()'s reading of a streamed answer, kept between its chunks: each feed reads its new text (and the few
    characters before it that may begin a marker), not the answer so far, which made a stream quadratic (40k
    characters in 4-character chunks: 0.44 s). It gives events in the text's order: ("open", message) where a
    header ends, ("body", message, text) as a body grows (less a tail that may begin an end marker, until final),
    and at the end of an answer with no harmony marker at all ("plain", its text): harmony_split's content."""

    def __init__(self):
        self.rest, self.head, self.state, self.first = "", [], "header", True  # rest: the text not yet read
        self.message = None  # the message whose body is being read

    def feed(self, text: str, final: bool = False) -> list:
        s, i, out = self.rest + text, 0, []
        ahead = dict.fromkeys(HARMONY_ENDS, -2)  # (as harmony's: each end marker's next place kept until passed)
        while i < len(s):
            if self.state == "between":  # (text up to the next <|start|> is dropped)
                at = s.find("<|start|>", i)
                if at < 0:
                    i = max(i, len(s) - len("<|start|>") + 1)
                    break
                i, self.state = at + len("<|start|>"), "header"
            elif self.state == "header":
                at = s.find("<|message|>", i)
                if at < 0:  # (the header so far kept in pieces: a long one is not copied at each chunk)
                    keep = max(i, len(s) - len("<|message|>") + 1)
                    self.head.append(s[i:keep])
                    i = keep
                    break
                header, self.head = "".join(self.head) + s[i:at], []
                header = header[header.rfind("<|start|>") + len("<|start|>"):] if "<|start|>" in header else header
                self.message = HarmonyMessage(header, self.first, "", False)
                out.append(("open", self.message))
                i, self.state, self.first = at + len("<|message|>"), "body", False
            else:
                for m in HARMONY_ENDS:
                    if ahead[m] == -2 or -1 < ahead[m] < i:
                        ahead[m] = s.find(m, i)
                at, marker = min(((a, m) for m, a in ahead.items() if a >= 0), default=(-1, None))
                if at < 0:
                    tail = s[max(i, len(s) - 9):]  # (an end marker's start is at most its 9 last characters)
                    end = len(s) if final or "<" not in tail else len(s) - max(held(tail, m) for m in HARMONY_ENDS)
                    if end > i:
                        out.append(("body", self.message, s[i:end]))
                    i = end
                    break
                if at > i:
                    out.append(("body", self.message, s[i:at]))
                self.message.done = True
                i, self.state = at + len(marker), "between"
        self.rest = s[i:]
        if final and self.state == "header" and self.first:  # (no message read: the whole text is here)
            whole = "".join(self.head) + self.rest
            if whole and not any(m in whole for m in HARMONY_MARKERS):
                out.append(("plain", whole))
        return out


def harmony_text(events, kind: str, seen: set) -> str | None:
    """The text of kind ("reasoning" or "content") a HarmonyReader's events add, or None: its messages' bodies, a
    "\n" where one of that kind begins after another (harmony_split's join; seen: the kinds begun so far)."""
    out = []
    for event, *rest in events:
        if event == "plain":  # (an answer with no marker: all content)
            out += rest if kind == "content" else []
        elif rest[0].kind == kind:
            if event == "open":
                out += ["\n"] if kind in seen else []
                seen.add(kind)
            else:
                out.append(rest[1])
    return "".join(out) or None


def harmony_arguments(body: str, ctype) -> str:
    """A harmony call's arguments as vLLM's openai parser gives them: JSON (no content type, or one naming json)
    read and written anew; text that does not parse kept as written (vLLM's too: a call with those arguments)."""
    if ctype is not None and "json" not in ctype:
        return body
    try:
        return json.dumps(json.loads(body), ensure_ascii=False)
    except (ValueError, RecursionError):
        return body


class OpenAI:
    """gpt-oss's harmony calls (vLLM's openai parser): each message addressed to=functions.NAME is a call, its body
    the arguments; the content the final channel's text, and commentary preambles' (harmony_split). The parser reads
    the answer's markup, not a reasoning parser's content: serve hands it the whole text (Harmony's markup), and its
    content is the answer's even where it finds no call (markup: the raw text is never content). A stream reads it
    as it grows (reader: AutoStream's, in linear time)."""
    short_ids, keeps_specials, needs_tools, needs_ids, markup = False, True, False, False, True
    reader = HarmonyReader

    def extract(self, text: str) -> tuple:
        _, content, calls = harmony_split(text, True)
        return content, [(name, harmony_arguments(body, ctype)) for name, body, ctype in calls]

    def scan(self, text: str, final: bool) -> tuple:
        # (the arguments streamed as drawn, vLLM's: the whole answer's are written anew)
        _, content, calls = harmony_split(text, final)
        return content or "", [(name, body) for name, body, _ in calls]


PARSERS = {"hermes": Hermes, "llama3_json": Llama3Json, "mistral": Mistral, "openai": OpenAI, "pythonic": Pythonic,
           "qwen3_coder": Qwen3Coder}


class AutoStream:
    """An "auto" tool_choice's streamed choice: the content before the first call as it comes (less a tail that may
    begin the call marker), then each call (CallDeltas) as its arguments grow; at the end (finish) what was held
    back: a held tail's text, the rest of the calls, or, where the answer held no call after all, its text.
    parallel False (parallel_tool_calls): the first call alone."""

    def __init__(self, parser, parallel: bool = True):
        self.parser, self.text, self.content = parser, "", 0  # content: the content's characters sent
        self.deltas, self.most = CallDeltas(parser.short_ids), None if parallel else 1
        # a parser with a reader (harmony's) is read chunk by chunk, not scanned whole at each one
        self.reader = parser.reader() if getattr(parser, "reader", None) else None
        self.seen, self.calls = set(), {}  # (the reader's: the content's messages begun; each call message's index)

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
        if self.reader is not None:
            return self._read(self.reader.feed(text))
        self.text += text
        content, calls = self.parser.scan(self.text, False)
        return self._content(content), self.deltas(calls[:self.most])

    def _read(self, events) -> tuple:
        """(content or None, tool_calls deltas) of a reader's events: what scan and CallDeltas give the text so far,
        less what was sent (the content's messages "\n"-joined, harmony_split's)."""
        content, out, sent = harmony_text(events, "content", self.seen), [], self.deltas.sent
        for event, m, *body in events:
            if event == "open" and m.kind == "call":
                self.calls[id(m)] = k = len(sent)
                if self.most is None or k < self.most:  # (a call's first delta: its id and name, once)
                    sent.append(0)
                    out.append({"index": k, "id": tool_call_id(self.parser.short_ids), "type": "function",
                                "function": {"name": m.recipient.split("functions.", 1)[1], "arguments": ""}})
            elif event == "body" and id(m) in self.calls and self.calls[id(m)] < len(sent):
                k = self.calls[id(m)]
                if not out or out[-1]["index"] != k:  # (one delta a call in each chunk, as CallDeltas sends)
                    out.append({"index": k, "function": {"arguments": ""}})
                out[-1]["function"]["arguments"] += body[0]
                sent[k] += len(body[0])
        return content, out

    def finish(self) -> tuple:
        """(content, tool_calls deltas) the answer's end sends: what add held back."""
        if self.reader is not None:
            return self._read(self.reader.feed("", final=True))
        content, calls = self.parser.scan(self.text, True)
        _, whole = self.parser.extract(self.text)
        # (no call after all: a Llama answer in JSON, a marker never written whole; a markup parser's content is
        # its scan's, never the raw text)
        if not whole and not self.sent and not getattr(self.parser, "markup", False):
            return self._content(self.text), []
        # (and calls the scan could not follow, their arguments before their name: sent whole)
        return self._content(content), self.deltas((calls + whole[len(calls):])[:self.most])
