"""Structured outputs: text that a JSON schema, a regular expression, a list of choices or a grammar allows, and
nothing else (vLLM's `structured_outputs`, OpenAI's `response_format`).

Each decode step a request's grammar matcher says which tokens may come next given the text so far; the others'
logits become -inf before the draw, so every sampling setting still applies, over the allowed tokens. At the
grammar's end only the end tokens are allowed: the row ends with its EOS. The grammar side is xgrammar's (vLLM's
default backend: a grammar compiled once against the tokenizer's vocabulary, a pushdown automaton a row that fills
a 32-tokens-a-word bitmask each step); the mask on the logits is ours, both paths: model/sampling.py's reference
and kernels/token_mask.py's Triton kernel (the "cross_entropy" kernel name: the LM head's logits).

    spec = StructuredOutputs.from_dict({"json": {"type": "object", ...}})   # or regex=, choice=, grammar=
    guide = Grammars.of(tokenizer, vocab_size).guide(spec)   # (generate begins it: its rows, its end tokens)
    generate(model, idx, 64, eos_id=eos, guide=guide)
"""
import json
import re
import threading
from dataclasses import dataclass

from tritongpt.errors import FieldError, UserError, first_line

KINDS = ("json", "regex", "choice", "grammar", "json_object")
# vLLM's StructuredOutputsParams' options taken here: disable_any_whitespace (JSON with xgrammar's fixed ", " and
# ": " between its tokens and no other blanks, as vLLM's: fewer tokens, and none of a small model's runs of blanks),
# disable_fallback (vLLM's: no other backend where xgrammar cannot take the spec; there is none here, so it changes
# nothing)
OPTIONS = ("disable_any_whitespace", "disable_fallback")
INSTALL = 'structured outputs need the xgrammar package: pip install -e ".[structured]"'


def _xgrammar():
    try:
        import xgrammar
    except ImportError:
        raise UserError(INSTALL) from None
    return xgrammar


@dataclass(frozen=True)
class StructuredOutputs:
    """What the text must be, one of vLLM's StructuredOutputsParams kinds: json (a JSON schema, as a dict or its
    text), regex, choice (a list of strings: the text is one of them), grammar (an EBNF grammar in xgrammar's GBNF
    form, `root ::= ...`, or a Lark grammar, `start: ...`: grammar_is_lark) or json_object (any JSON object:
    OpenAI's response_format {"type": "json_object"})."""
    json: object = None
    regex: str | None = None
    choice: tuple | None = None
    grammar: str | None = None
    json_object: bool = False
    disable_any_whitespace: bool = False

    @classmethod
    def from_dict(cls, d, where: str = "structured_outputs") -> "StructuredOutputs":
        """vLLM's `structured_outputs` object: exactly one kind given (null or false counts as not given)."""
        if not isinstance(d, dict):
            raise UserError(f"{where} must be an object with one of {list(KINDS)}, got {type(d).__name__}")
        unknown = sorted(k for k, v in d.items() if k not in KINDS + OPTIONS and v not in (None, False))
        if unknown:
            raise UserError(f"{where}: {unknown} not supported here; it takes one of {list(KINDS)} and the options "
                            f"{list(OPTIONS)}")
        for k in OPTIONS:
            if d.get(k) is not None and not isinstance(d[k], bool):
                raise UserError(f"{where}.{k} must be true or false, got {d[k]!r}")
        given = [k for k in KINDS if d.get(k) not in (None, False)]
        if len(given) != 1:
            raise UserError(f"{where} takes exactly one of {list(KINDS)}, got {given or 'none'}")
        kind, value = given[0], d[given[0]]
        if kind == "json" and not isinstance(value, (dict, str)):
            raise UserError(f"{where}.json must be a JSON schema (an object, or its text), got {type(value).__name__}")
        if kind in ("regex", "grammar") and (not isinstance(value, str) or not value):
            raise UserError(f"{where}.{kind} must be a non-empty string, got {value!r}")
        if kind == "choice":
            if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
                raise UserError(f"{where}.choice must be a non-empty list of non-empty strings, got {value!r}")
            value = tuple(value)
        if kind == "json_object" and value is not True:
            raise UserError(f"{where}.json_object must be true, got {value!r}")
        return cls(**{kind: value}, disable_any_whitespace=bool(d.get("disable_any_whitespace")))

    @classmethod
    def from_response_format(cls, rf, where: str = "response_format") -> "StructuredOutputs | None":
        """OpenAI's response_format: {"type": "text"} (None: no constraint), {"type": "json_object"}, or
        {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}."""
        if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
            raise UserError(f'{where} must be an object with a "type" (text, json_object or json_schema), got {rf!r}')
        kind = rf["type"]
        if kind == "text":
            return None
        if kind == "json_object":
            return cls(json_object=True)
        if kind != "json_schema":
            raise UserError(f"{where}.type must be text, json_object or json_schema, got {kind!r}")
        js = rf.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema", {}), dict):
            raise UserError(f'{where}.json_schema must be an object whose "schema", if given, is an object (a JSON '
                            f'schema), got {js!r}')
        # (OpenAI's and vLLM's types: a wrong one is refused there, so not taken here as if it were right)
        for key, kind, what in (("name", str, "a string"), ("strict", bool, "true or false")):
            if js.get(key) is not None and not isinstance(js[key], kind):
                raise UserError(f"{where}.json_schema.{key} must be {what}, got {js[key]!r}"[:300])
        # OpenAI's json_schema without a schema: any JSON object (its name and strict change no token here: the
        # mask holds the text to the schema whatever `strict` says)
        return cls(json=js["schema"]) if "schema" in js else cls(json_object=True)

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))


class StructureError(FieldError):
    """request_structure's refusal, naming the request's field (serve's 400 param)."""


def request_structure(d: dict, where: str = "") -> tuple:
    """(A request's or --prompts record's structured outputs, StructuredOutputs or None; the field it came from or
    None): its structured_outputs (vLLM's) or response_format (OpenAI's: {"type": "text"} is None), one of them.
    where: the messages' prefix ("FILE: record 3: "). Refused as a StructureError naming the field."""
    given = [k for k in ("structured_outputs", "response_format") if d.get(k) is not None]
    if len(given) > 1:
        raise StructureError(f"{where}pass one of 'structured_outputs' and 'response_format'", given[1])
    if not given:
        return None, None
    field = given[0]
    read = StructuredOutputs.from_dict if field == "structured_outputs" else StructuredOutputs.from_response_format
    try:
        return read(d[field], where + field), field
    except UserError as e:
        raise StructureError(str(e), field) from None


def choice_grammar(choices) -> str:
    """An EBNF grammar whose language is exactly the choices (each a JSON-escaped string literal)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def grammar_is_lark(grammar: str) -> bool:
    """Whether a grammar is read as Lark's (`start: a | b`) rather than EBNF's (`root ::= ...`), by vLLM's rule
    (grammar_is_likely_lark): Lark unless some line, its comment (`#` or `//` on) cut off, has `::=`. vLLM's
    xgrammar backend then compiles it with xgrammar's own Lark reader (compile_lark; its hand-written Lark-to-EBNF
    conversion is gone), so that is what reads it here too: the same grammars taken, the same texts allowed."""
    return not any("::=" in re.sub(r"(#|//).*$", "", line) for line in grammar.split("\n"))


def _said(e: Exception) -> str:
    """xgrammar's error without its C++ source location ("[time] /project/cpp/x.cc:94: ")."""
    return re.sub(r"^\[[\d:]+\]\s*\S+:\d+:\s*", "", first_line(e))


# vLLM's has_xgrammar_unsupported_json_features (backend_xgrammar.py): keywords xgrammar's schema converter reads
# past, its grammar then allowing texts that break them (uniqueItems' [2, 2], a number's multipleOf 0.5's 0.3), ended
# by the EOS as if whole. vLLM refuses such a schema with a 400; so does Grammars.compile, naming the keyword and where
# it is. (patternProperties and propertyNames alone xgrammar holds names to: see unsupported_feature)
UNSUPPORTED = {"integer": ("multipleOf",), "number": ("multipleOf",),
               "array": ("uniqueItems", "contains", "minContains", "maxContains")}
# the string formats xgrammar's converter builds a grammar for (vLLM's STRING_SUPPORTED_FORMATS); any other is
# read past, any string allowed
STRING_FORMATS = frozenset({"email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname", "uuid",
                            "uri", "uri-reference", "uri-template", "json-pointer", "relative-json-pointer"})
# (values, not schemas: a dict there is never read as one; "example" is OpenAPI 3.0's and FastAPI's one example)
DATA = ("const", "enum", "default", "examples", "example")
NAMED = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")  # (names to schemas)


def raw_in_pattern(pattern: str) -> bool:
    """Whether a string's pattern has a literal quote or backslash (a class of only those too: ["], ["\\\\], \\x22),
    which xgrammar's JSON grammar takes as the string's raw text, not its escape: {"pattern": "^a\\"$"} drew "a""
    and ended it whole (in an alternation, (ab|"), it drops the branch: no text has the quote either). A class with
    any other character ([a"], [^a], . and ranges) leaves both out. A pattern Python's parser cannot read
    (ECMAScript's own syntax) is xgrammar's to take or refuse."""
    try:
        from re import _parser as sre  # (Python 3.11's name of sre_parse)
    except ImportError:
        import sre_parse as sre
    try:
        parsed = sre.parse(pattern)
    except (re.error, RecursionError, OverflowError):
        return False

    def walk(items):
        for item in items:
            if isinstance(item, (list, tuple, sre.SubPattern)):
                if len(item) == 2 and item[0] is sre.LITERAL and item[1] in (34, 92):
                    return True
                # a class of nothing but quotes and backslashes (["], ["\\]) is written raw too: ["\\] drew """;
                # one with any other character ([a"], [!-#], [^a], .) leaves both out
                if len(item) == 2 and item[0] is sre.IN:
                    if all(op is sre.LITERAL and c in (34, 92) for op, c in item[1]):
                        return True
                    continue
                if walk(item):
                    return True
        return False
    return walk(parsed)


def bounded_pattern(schema: dict) -> str | None:
    """A string schema's minLength or maxLength beside its pattern or format, named ("maxLength beside pattern"), or
    None: xgrammar builds the pattern's or format's grammar and drops the bounds ("Ignoring the length constraints"),
    format uuid with maxLength 5 drawing all 36 characters; vLLM's check refuses it too."""
    bound = next((k for k in ("minLength", "maxLength") if k in schema), None)
    held = next((k for k in ("pattern", "format") if k in schema), None)
    return f"{bound} beside {held}" if bound and held else None


def unsupported_feature(schema, where: str = "", names: bool = False) -> str | None:
    """The first keyword of the JSON schema (at any depth) that xgrammar cannot hold a text to, as "KEYWORD at
    PATH ..." and why (PATH: the keys down to it, "the top level" there), or None. As vLLM's check, a keyword counts
    where its object's type says it applies (a list of types naming it too: the text could be of that type); a
    string's pattern too (raw_in_pattern). names: schema is a map of names to schemas (properties, $defs: a property
    may be called "enum")."""
    if isinstance(schema, list):
        for j, item in enumerate(schema):
            found = unsupported_feature(item, f"{where}[{j}]")
            if found:
                return found
        return None
    if not isinstance(schema, dict):
        return None
    if names:
        return next(filter(None, (unsupported_feature(v, f"{where}.{k}") for k, v in schema.items())), None)
    types = schema.get("type")
    types = [types] if isinstance(types, str) else [t for t in types if isinstance(t, str)] \
        if isinstance(types, list) else []
    at = where.lstrip(".") or "the top level"
    past = ": its text would not be held to it (vLLM refuses it too); leave it out"
    for t in types:
        for key in UNSUPPORTED.get(t, ()):
            if key in schema:
                return f"{key} at {at} is not supported by xgrammar{past}"
        # a lone patternProperties (pydantic's dict[constr(pattern=...), V]) or propertyNames xgrammar holds the
        # names and values to; in company it does not: a name in properties that a pattern matches too is held to
        # properties' schema alone, two patterns' common names to one, and propertyNames lets properties' names and
        # patternProperties' through ({"q": 1} under propertyNames ^z). vLLM's check refuses these same combinations
        pattern_properties = schema.get("patternProperties")
        if t == "object" and isinstance(pattern_properties, dict) and ("properties" in schema
                                                                       or len(pattern_properties) > 1):
            with_ = "properties" if "properties" in schema else "more than one pattern"
            return f"patternProperties with {with_} at {at} is not supported by xgrammar{past}"
        names_schema = schema.get("propertyNames")  # (a string schema, whether or not it says so)
        bounded = bounded_pattern(names_schema) if t == "object" and isinstance(names_schema, dict) else None
        if bounded:
            return f"{bounded} in propertyNames at {at} is not supported by xgrammar{past}"
        if t == "object" and "propertyNames" in schema:
            with_ = next((k for k in ("properties", "patternProperties") if k in schema), None) \
                or ("additionalProperties" if isinstance(schema.get("additionalProperties"), dict) else None) \
                or ("unevaluatedProperties" if schema.get("unevaluatedProperties", True) is not True else None)
            if with_:
                return f"propertyNames with {with_} at {at} is not supported by xgrammar{past}"
        if t == "string" and "format" in schema and schema["format"] not in STRING_FORMATS:
            return (f"format {schema['format']!r} at {at} is not supported by xgrammar (its formats: "
                    f"{', '.join(sorted(STRING_FORMATS))}){past}")
        bounded = bounded_pattern(schema) if t == "string" else None
        if bounded:
            return f"{bounded} at {at} is not supported by xgrammar{past}"
        if t == "string" and isinstance(schema.get("pattern"), str) and raw_in_pattern(schema["pattern"]):
            return (f"pattern {schema['pattern']!r} at {at} has a literal '\"' or '\\', which xgrammar writes into "
                    "the JSON string unescaped (the text not JSON: a string ended by that quote, a stray backslash) "
                    "or, in an alternation, leaves out; write the pattern without it")
    for key, value in schema.items():
        if key not in DATA and isinstance(value, (dict, list)):
            found = unsupported_feature(value, f"{where}.{key}", key in NAMED)
            if found:
                return found
    return None


def vocabulary(tok) -> list | None:
    """The tokenizer's vocabulary as xgrammar reads it raw: our byte-level BPE's token bytes (a token is the bytes it
    adds to the text), special tokens empty (xgrammar treats an empty token as special: never part of a grammar's
    text); None for a Hugging Face tokenizer, read through transformers' fast tokenizer, whose vocabulary xgrammar
    decodes itself (byte-level, byte-fallback or raw, as its decoder says; Grammars empties its special tokens)."""
    table = getattr(tok, "_id_to_bytes", None)
    if table is None:
        return None
    special = set(tok.special_tokens.values())
    return [b"" if i in special else t for i, t in enumerate(table)]


class Grammars:
    """A tokenizer's grammar compiler (xgrammar's GrammarCompiler, its compiled grammars cached by their text):
    one per tokenizer and vocabulary width, shared by every request (Grammars.of)."""
    _made: dict = {}
    _lock = threading.Lock()

    def __init__(self, tok, vocab_size: int):
        xgr = _xgrammar()
        if vocab_size < tok.vocab_size:
            raise UserError(f"structured outputs: the logits' {vocab_size} tokens are fewer than the tokenizer's "
                            f"{tok.vocab_size}")
        from tritongpt.train.tokenizer import eot_or_none

        vocab = vocabulary(tok)
        # (each matcher's end tokens are its request's, Guide.begin's: these only keep xgrammar from guessing)
        eos = eot_or_none(tok)
        stops = [eos] if eos is not None else []  # (none: an empty list, not None, which xgrammar would guess at)
        if vocab is not None:
            info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=stops)
        else:
            from transformers import PreTrainedTokenizerFast

            fast = PreTrainedTokenizerFast(tokenizer_object=tok._tok)
            info = xgr.TokenizerInfo.from_huggingface(fast, vocab_size=vocab_size, stop_token_ids=stops)
            # xgrammar reads the special tokens by their spelling ("<|im_end|>"): text a JSON string could hold,
            # which the answer's detokenization drops. Empty, as our BPE's (the vocabulary's kind it detected kept)
            special, vocab = set(tok.special_tokens.values()), [""] * vocab_size
            for t, i in fast.get_vocab().items():
                if i < vocab_size and i not in special:
                    vocab[i] = t
            info = xgr.TokenizerInfo(vocab, info.vocab_type, vocab_size=vocab_size, stop_token_ids=stops,
                                     add_prefix_space=info.add_prefix_space)
        self.vocab_size, self.info = vocab_size, info
        # the ids that are never text: the special tokens and the padding past the tokenizer's (Guide.begin)
        self.specials = frozenset(tok.special_tokens.values()) | frozenset(range(tok.vocab_size, vocab_size))
        self.compiler = xgr.GrammarCompiler(info)

    @classmethod
    def of(cls, tok, vocab_size: int) -> "Grammars":
        """The Grammars of this tokenizer object at this vocabulary width (made once: a 50k-token vocabulary's
        TokenizerInfo takes a moment)."""
        key = (id(tok), vocab_size)
        with cls._lock:
            made = cls._made.get(key)
            if made is None or made[0] is not tok:
                made = cls._made[key] = (tok, cls(tok, vocab_size))
        return made[1]

    def compile(self, spec: StructuredOutputs):
        """spec compiled against the vocabulary (xgrammar caches each grammar's compilation): a UserError naming
        the kind and xgrammar's complaint for a schema, pattern or grammar it cannot read."""
        c, what = self.compiler, spec.kind
        try:
            if spec.json is not None:
                schema = spec.json if isinstance(spec.json, str) else json.dumps(spec.json)
                try:  # (its text read here for the check; text that is not JSON is xgrammar's to refuse)
                    found = unsupported_feature(json.loads(spec.json) if isinstance(spec.json, str) else spec.json)
                except (ValueError, RecursionError):
                    found = None
                if found:
                    raise UserError(f"structured outputs: the json schema's {found}")
                return c.compile_json_schema(schema, any_whitespace=not spec.disable_any_whitespace)
            if spec.regex is not None:
                return c.compile_regex(spec.regex)
            if spec.choice is not None:
                return c.compile_grammar(choice_grammar(spec.choice))
            if spec.grammar is not None and grammar_is_lark(spec.grammar):
                what = "grammar (read as Lark: no line defines a rule with ::=)"
                if not hasattr(c, "compile_lark"):  # (xgrammar 0.2.6's; our floor is 0.2)
                    raise UserError(f"structured outputs: the {what} needs xgrammar 0.2.6 or later, whose Lark "
                                    "reader vLLM uses: pip install -U xgrammar, or write it as EBNF (root ::= ...)")
                # (xgrammar's error names the line and column: "Lark error at line 2, column 5: unknown name 'b'")
                return c.compile_lark(spec.grammar)
            if spec.grammar is not None:
                return c.compile_grammar(spec.grammar)
            # OpenAI's json_object is an object; xgrammar's builtin JSON grammar (vLLM's) takes any value, [1] too
            return c.compile_json_schema('{"type": "object"}', any_whitespace=not spec.disable_any_whitespace)
        except (RuntimeError, ValueError, TypeError) as e:
            raise UserError(f"structured outputs: the {what} could not be compiled: {_said(e)}") from None

    def guide(self, spec: StructuredOutputs) -> "Guide":
        """A Guide of spec's compiled grammar (its rows and end tokens given by Guide.begin)."""
        return Guide(self.compile(spec), self.vocab_size, self.specials)


class Guide:
    """One request's (or generate call's) grammar state: a matcher a row. Each decode step mask() sets the logits
    of the tokens a row's grammar does not allow to -inf (the rows not done), then accept() advances each row by
    the token it drew. At the grammar's end only the end tokens are allowed (the special ones: begin), and a row
    whose text ended (an end token drawn, a stop string, its budget) is left alone. specials: the ids that are never
    text (Grammars'; none: every end token a grammar's end only). wake: a token id the grammar waits for (a
    reasoning model's </think>: serve's --reasoning-parser, vLLM's): a row is free until it draws it, held to the
    grammar from the next token on (set before begin; no speculation then: mask_drafts and mask_after refuse)."""

    def __init__(self, compiled, vocab_size: int, specials=frozenset()):
        self.compiled, self.vocab_size, self.specials = compiled, vocab_size, specials
        self.matchers, self.done, self.triton, self.live = None, [], False, None
        self.spec_bitmask = None  # mask_drafts' buffer, [rows x (k + 1), words], kept across steps
        self.draft_bitmask = None  # mask_after's, [rows, words]
        self.wake, self.waiting = None, []  # the token a row's grammar waits for, and the rows waiting for it

    def begin(self, rows: int, ends, vocab: int, triton: bool = False) -> "Guide":
        """Ready for `rows` rows whose text ends with one of `ends` (token ids: end_rule's, the EOS and any stop
        token ids), drawn from `vocab` tokens; triton: mask with the Triton kernel (generate's and the engine's
        call, from the model's kernels). Once: a guide is one request's."""
        xgr = _xgrammar()
        if self.matchers is not None:
            raise UserError("a Guide serves one request: make another (Grammars.guide) for the next")
        ends = sorted({int(e) for e in ends or ()})
        if not ends:
            raise UserError("structured outputs end a row's text with an end token, and this one has none (no EOS, "
                            "or ignore_eos without stop_token_ids)")
        if vocab > self.vocab_size:
            raise UserError(f"structured outputs: the grammar was compiled for {self.vocab_size} tokens, fewer than "
                            f"the {vocab} drawn from")
        # the grammar's own end tokens: the special ones. xgrammar allows its end tokens only at the grammar's end,
        # so a text token among them (stop_token_ids' ".") would never be text, and a grammar needing it would
        # allow nothing; left out, it is drawn as text where the grammar allows it and ends the row there, as
        # vLLM's stop_token_ids (its grammar's end is the EOS's). Text tokens alone (ignore_eos): they end it.
        stops = [e for e in ends if e in self.specials] or ends
        self.matchers = [xgr.GrammarMatcher(self.compiled, override_stop_tokens=stops) for _ in range(rows)]
        self.bitmask = xgr.allocate_token_bitmask(rows, self.vocab_size)
        self.done, self.triton = [False] * rows, triton
        self.waiting = [self.wake is not None] * rows
        return self

    def fill(self):
        """The live rows' next-token bitmasks, filled on the host: by mask() itself, or earlier by the engine, which
        fills every guided request's right after it launches a step's forwards, so the matchers work while the GPU
        runs them (vLLM's scheduler fills its bitmasks beside the forward too)."""
        self.live = [i for i, d in enumerate(self.done) if not d and not self.waiting[i]]
        for i in self.live:
            self.matchers[i].fill_next_token_bitmask(self.bitmask, i)
        self._check(self.bitmask, self.live, lambda i: i)

    def _check(self, bitmask, filled, row_of):
        """A row allowing nothing would draw from all -inf (a NaN distribution): one check of every bitmask row
        (~20 us at 50k tokens; a row not filled is all ones or its last, never empty), the row found only then."""
        if not bool(bitmask.any(dim=1).all()):
            i = row_of(next(p for p in filled if not bitmask[p].any()))
            raise UserError(f"structured outputs: row {i}'s grammar allows no token after its text so far: no text "
                            "matches it (a pattern such as [^\\s\\S]), or a token its text needs is one of its end "
                            f"tokens {self.matchers[i].stop_token_ids}, allowed only at its end")

    def took(self):
        """Its live rows' bitmasks applied by the caller (the engine's one mask over a decode batch): mask() then
        masks nothing more this step."""
        self.live = []

    def mask(self, logits):
        """logits [rows, V] (V at most the vocabulary width the grammar was compiled for) with -inf where a live
        row's grammar allows no token: the bitmask (fill()'s, filled here if not yet) sent without waiting."""
        if self.live is None:
            self.fill()
        live, self.live = self.live, None
        if not live:
            return logits
        if logits.is_cuda and not self.bitmask.is_pinned():  # (a copy from pinned memory does not block the host)
            self.bitmask = self.bitmask.pin_memory()
        return self._apply(logits, self.bitmask, None if len(live) == len(self.done) else live)

    def _apply(self, logits, bitmask, live):
        """logits [N, V] masked by bitmask's rows `live` (None: all), the bitmask sent without waiting."""
        from tritongpt.model.sampling import apply_token_bitmask

        words = (logits.size(-1) + 31) // 32
        bitmask = bitmask if words == bitmask.size(1) else bitmask[:, :words].contiguous()
        bitmask = bitmask.to(logits.device, non_blocking=True)
        # (the kernel masks in place and takes strided rows: a vocab_limit slice's view, no copy)
        return apply_token_bitmask(logits, bitmask, live, triton=self.triton)

    def mask_after(self, logits, drafted):
        """A draft model's logits [rows, V] for its next proposal, masked by each live row's grammar after the row's
        drafts so far drafted [rows, j] (each taken, then rolled back), so it proposes only what the grammar allows
        (the verification keeps the model's distribution whatever the draft's: this only raises its acceptance). A
        row whose drafts ended its grammar is left as it is: nothing after its end token is kept."""
        xgr = _xgrammar()
        self._no_drafts()
        drafted = drafted.tolist()
        if self.draft_bitmask is None:
            self.draft_bitmask = xgr.allocate_token_bitmask(len(self.matchers), self.vocab_size)
            if logits.is_cuda:
                self.draft_bitmask = self.draft_bitmask.pin_memory()
        filled = []
        for i in (i for i, d in enumerate(self.done) if not d):
            m = self.matchers[i]
            taken = 0
            for t in drafted[i]:
                if not m.accept_token(t):
                    break
                taken += 1
            if taken == len(drafted[i]) and not m.is_terminated():
                m.fill_next_token_bitmask(self.draft_bitmask, i)
                filled.append(i)
            if taken:
                m.rollback(taken)
        if not filled:
            return logits
        return self._apply(logits, self.draft_bitmask, filled)

    def mask_drafts(self, logits, drafted, lens=None):
        """Speculation's verification (generate's prompt lookup or draft, the engine's n-gram speculation): logits
        [rows, k + 1, V] at the text's last position and its k draft tokens drafted [rows, k] (lens [rows]: a
        lookup's proposals a row, the rest padding; None: all k), each live row's position j masked by its grammar
        after the row's first j drafts (accepted on its matcher, then rolled back: accept() takes the tokens the step
        keeps, one at a time). A draft the grammar refuses ends its row's masks there: the masked distribution gives
        it no mass, so the verification rejects it and reads no position after it."""
        xgr = _xgrammar()
        self._no_drafts()
        rows, width = logits.shape[:2]
        drafted = drafted.tolist()
        lens = [width - 1] * rows if lens is None else lens.tolist()
        if self.spec_bitmask is None or self.spec_bitmask.size(0) < rows * width:  # (one buffer, pinned once)
            self.spec_bitmask = xgr.allocate_token_bitmask(rows * width, self.vocab_size)
            if logits.is_cuda:
                self.spec_bitmask = self.spec_bitmask.pin_memory()
        bitmask = self.spec_bitmask[:rows * width]
        bitmask.fill_(-1)  # (a position not filled below, past a refused draft: never read, all allowed)
        filled = []
        for i in (i for i, d in enumerate(self.done) if not d):
            m, taken = self.matchers[i], 0
            for j in range(width):
                m.fill_next_token_bitmask(bitmask, i * width + j)
                filled.append(i * width + j)
                if j >= lens[i] or not m.accept_token(drafted[i][j]):
                    break
                taken += 1
                if m.is_terminated():  # (an end token drafted: the row's text ends there)
                    break
            if taken:
                m.rollback(taken)
        self.live = None
        if not filled:
            return logits
        self._check(bitmask, filled, lambda p: p // width)
        return self._apply(logits.reshape(rows * width, -1), bitmask, filled).view(rows, width, -1)

    def _no_drafts(self):
        if self.wake is not None:  # (a draft may hold the wake token, the grammar then holding the drafts after it)
            raise UserError("structured outputs that wait for a token (a reasoning model's </think>) do not take "
                            "speculative decoding's drafts")

    def accept(self, tokens, ended=None):
        """Each live row's new token (host ints), then the rows `ended` (a host list: decode_step's) marked done.
        A token the grammar refuses is a bug (the mask allowed it): an error, not a silent drift."""
        for i, t in enumerate(tokens):
            if self.done[i]:
                continue
            if self.waiting[i]:  # (free text until the wake token: the grammar holds what follows it)
                self.waiting[i] = int(t) != self.wake
                continue
            m = self.matchers[i]
            if not m.is_terminated() and not m.accept_token(int(t)):
                raise RuntimeError(f"structured outputs: row {i}'s token {int(t)} is not one its grammar allows")
            if m.is_terminated():
                self.done[i] = True
        for i, e in enumerate(ended or ()):
            self.done[i] = self.done[i] or bool(e)

    @property
    def finished(self) -> list:
        """Each row's grammar is complete (its text is whole: an end token drawn where the grammar allowed it)."""
        return [m.is_terminated() for m in self.matchers]


def spec_from_flag(text: str, flag: str = "--structured-outputs") -> StructuredOutputs:
    """The flag's value: vLLM's structured_outputs object as JSON text, or @PATH, a file holding it."""
    return StructuredOutputs.from_dict(*flag_object(text, flag))


def flag_object(text: str, flag: str = "--structured-outputs") -> tuple:
    """(The JSON object of the flag's value, text or @PATH, unchecked; where it came from, for errors)."""
    from pathlib import Path

    where = flag
    if text.startswith("@"):
        path = Path(text[1:])
        if not path.is_file():
            raise UserError(f"{flag} {text}: no such file")
        text, where = path.read_text(encoding="utf-8"), f"{flag} {path}"
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not JSON ({e}); give vLLM's structured_outputs object, e.g. "
                        '\'{"regex": "[0-9]+"}\' or \'{"json": {...schema...}}\', or @FILE') from None
    return d, where


def add_structured_arg(p, what: str = "the text"):
    """generate's --structured-outputs (its --prompts records' own structured_outputs win over it), chat's (every
    answer held to it)."""
    p.add_argument("--structured-outputs", default=None, metavar="SPEC",
                   help=f"{what} must be what SPEC allows (vLLM's structured_outputs, through xgrammar): a JSON "
                        "object with one of json (a JSON schema), regex, choice (a list of strings), grammar (EBNF, "
                        "`root ::= ...`, or Lark, `start: ...`) or json_object: true, and optionally "
                        "disable_any_whitespace; or @FILE holding it. A text ends at the grammar's end with its end "
                        "token (the EOS, a chat's end of turn)")
