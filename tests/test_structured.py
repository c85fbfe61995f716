"""Structured outputs (train/structured.py): every text is what its JSON schema, regex, choices or grammar allows,
ended by the EOS; the mask removes only what the grammar forbids; the engine draws what generate() draws; serve's
response_format and structured_outputs; refusals by name."""
import json
import re

import pytest
import torch

from tritongpt.errors import FieldError, UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.engine import Engine
from tritongpt.train.generate import generate, masked_ends
from tritongpt.train.tokenizer import BPETokenizer

xgr = pytest.importorskip("xgrammar")
from tritongpt.train.structured import Grammars, StructuredOutputs, grammar_is_lark  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
CORPUS = ('the cat sat on the mat. a dog ran in the park, "name": 12, {"age": [1, 2]} yes no maybe ' * 4
          + "Hello there! How are you? 0123456789")
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False}
SPECS = {"regex": StructuredOutputs(regex=r"[a-c]{2,4}-\d"), "choice": StructuredOutputs(choice=("yes", "no", "maybe")),
         "json": StructuredOutputs(json=SCHEMA, disable_any_whitespace=True),
         "json_object": StructuredOutputs(json_object=True, disable_any_whitespace=True)}


@pytest.fixture(scope="module")
def tiny():
    tok = BPETokenizer.train(CORPUS, 300)
    torch.manual_seed(3)
    model = GPTModel(GPTConfig(vocab_size=tok.vocab_size, context_length=96, n_embd=32, n_layer=2, n_head=2,
                               tie_weights=False)).eval()
    return model, tok, Grammars.of(tok, tok.vocab_size)


def allowed(kind, text) -> bool:
    if kind == "regex":
        return re.fullmatch(r"[a-c]{2,4}-\d", text) is not None
    if kind == "choice":
        return text in ("yes", "no", "maybe")
    try:
        # strict=False: xgrammar's string rule under maxLength admits raw control characters token by token (its
        # accept_string refuses "\x04"; vLLM's texts have them too), which a strict parser refuses
        value = json.loads(text, strict=False)
    except ValueError:
        return False
    if kind == "json_object":
        return isinstance(value, dict)
    return (isinstance(value, dict) and set(value) == {"name", "age"} and isinstance(value["name"], str)
            and len(value["name"]) <= 6 and type(value["age"]) is int and 0 <= value["age"] <= 99)


def texts(tok, out, start):
    """Each row's new text up to its EOS, and whether it had one."""
    rows = []
    for row in out[:, start:].tolist():
        end = row.index(tok.eot_id) if tok.eot_id in row else None
        rows.append((tok.decode(row[:end]), end is not None))
    return rows


@pytest.mark.parametrize("kind", list(SPECS))
def test_every_sampled_text_is_what_its_spec_allows_and_ends_with_the_eos(tiny, kind):
    model, tok, grammars = tiny
    idx = torch.tensor([tok.encode("the cat")] * 3)
    guide = grammars.guide(SPECS[kind])
    # (a random model's JSON strings run on: a bias toward the quote and the brace closes them sooner, the grammar
    # still deciding where they may come)
    bias = {tok.encode(c)[0]: 4.0 for c in '"}'} if kind.startswith("json") else None
    out = generate(model, idx, 40, temperature=1.0, eos_id=tok.eot_id, vocab_limit=tok.vocab_size, guide=guide,
                   generator=torch.Generator().manual_seed(1), logit_bias=bias)
    got = texts(tok, out, idx.size(1))
    assert all(ended and allowed(kind, text) for text, ended in got), got
    assert guide.finished == [True] * 3
    # (the same draw without the grammar: random weights write no such text, so the mask is what made it)
    plain = generate(model, idx, 40, temperature=1.0, eos_id=tok.eot_id, vocab_limit=tok.vocab_size,
                     generator=torch.Generator().manual_seed(1), logit_bias=bias)
    assert not any(allowed(kind, text) for text, _ in texts(tok, plain, idx.size(1)))


def test_the_mask_removes_only_what_the_grammar_forbids(tiny):
    """Greedy under a regex: each token is the model's likeliest among the tokens an independent matcher allows
    (checked against xgrammar's own bitmask, unpacked here by hand), so nothing allowed was masked."""
    model, tok, grammars = tiny
    idx = torch.tensor([tok.encode("a dog")])
    spec = StructuredOutputs(regex=r"(the|a|mat|cat| ){1,6}\.")
    out = generate(model, idx, 30, eos_id=tok.eot_id, vocab_limit=tok.vocab_size, guide=grammars.guide(spec))
    new = out[0, idx.size(1):].tolist()
    assert tok.eot_id in new and len(new) > 3
    matcher = xgr.GrammarMatcher(grammars.compile(spec), override_stop_tokens=[tok.eot_id])
    bitmask = xgr.allocate_token_bitmask(1, tok.vocab_size)
    for j, t in enumerate(new[:new.index(tok.eot_id) + 1]):
        matcher.fill_next_token_bitmask(bitmask)
        ok = [(int(bitmask[0, i // 32]) >> (i % 32)) & 1 == 1 for i in range(tok.vocab_size)]
        logits = model(out[:, :idx.size(1) + j])[0, -1].double()
        best = max((i for i in range(tok.vocab_size) if ok[i]), key=lambda i: logits[i])
        assert t == best
        assert matcher.accept_token(t)
    assert matcher.is_terminated()


def test_the_engine_draws_what_generate_draws(tiny):
    """Requests of each kind, sampled and greedy, n of 1 and 2, and a plain one, through an engine that preempts
    (a pool too small for all): each request's tokens are generate()'s alone with a guide of its own. (Guided
    requests that speculate: the speculation test below.)"""
    model, tok, grammars = tiny
    bias = {tok.encode(c)[0]: 4.0 for c in '"}'}
    reqs = [("regex", 2, 1.0, 5), ("choice", 1, 0.0, None), (None, 1, 0.0, 7), ("json", 1, 1.0, 9),
            ("json_object", 2, 0.7, 11)]
    prompts = ["the cat sat", "a dog", "the cat sat on the mat. the cat sat on", "Hello", "the park"]
    engine = Engine(model, max_batch=4, kv_pages=14, page_size=4)
    handles, refs = [], []
    for (kind, n, temperature, seed), prompt in zip(reqs, prompts):
        idx = torch.tensor([tok.encode(prompt)] * n)
        kw = dict(eos_id=tok.eot_id, vocab_limit=tok.vocab_size, temperature=temperature,
                  logit_bias=bias if kind and kind.startswith("json") else None)
        for out, submit in ((handles, True), (refs, False)):
            gen = torch.Generator().manual_seed(seed) if seed is not None else None
            guide = grammars.guide(SPECS[kind]) if kind else None
            budget = 40 if kind == "json" else 24
            out.append(engine.submit(idx, budget, generator=gen, guide=guide, **kw) if submit else
                       generate(model, idx, budget, generator=gen, guide=guide, **kw))
    engine.start()
    try:
        outs = [h.wait() for h in handles]
    finally:
        engine.close()
    for (kind, *_), out, ref, prompt in zip(reqs, outs, refs, prompts):
        assert torch.equal(out, ref), kind
        got = texts(tok, out, len(tok.encode(prompt)))
        assert all(ended and allowed(kind, text) for text, ended in got) if kind else not allowed("json", got[0][0]), \
            (kind, got)
    assert engine.stats["preemptions"] > 0, engine.stats


def test_logprobs_are_the_masked_distributions_and_min_tokens_yields_to_the_grammar(tiny):
    """The logprobs of a guided draw are the grammar-masked distribution's (vLLM's: its bitmask comes before the
    sampler): the tokens outside the choices' prefixes have none, the allowed ones sum to 1. min_tokens past the
    grammar's end: the grammar's end token is drawn all the same (else nothing would be left to draw)."""
    model, tok, grammars = tiny
    idx = torch.tensor([tok.encode("the cat")])
    steps = []
    out = generate(model, idx, 10, eos_id=tok.eot_id, vocab_limit=tok.vocab_size, logprobs=5, min_tokens=6,
                   guide=grammars.guide(SPECS["choice"]), on_token=lambda new, lp: steps.append(lp))
    text, ended = texts(tok, out, idx.size(1))[0]
    assert ended and text in ("yes", "no", "maybe")
    lp, top_ids, top_lps = steps[0]
    finite = top_lps[0].isfinite()
    assert 0 < int(finite.sum()) < 5  # (fewer allowed tokens than 5 at the first step)
    assert all(any(c.startswith(tok.decode([i])) for c in ("yes", "no", "maybe")) for i in top_ids[0][finite].tolist())
    assert abs(float(top_lps[0][finite].exp().sum()) - 1) < 1e-5
    assert torch.isfinite(lp).all()


def test_a_hugging_face_tokenizer_takes_the_same_grammars(tiny, tmp_path):
    """Our tokenizer saved as a Hugging Face folder and read back through the tokenizers library (xgrammar reads
    its vocabulary from transformers' fast tokenizer): the same greedy text under a regex."""
    from tritongpt.train.hf_tokenizer import HFTokenizer

    model, tok, grammars = tiny
    from transformers import GPT2TokenizerFast

    tok.save_hf(tmp_path)  # (vocab.json and merges.txt: transformers writes the tokenizer.json the library reads)
    GPT2TokenizerFast.from_pretrained(tmp_path).save_pretrained(tmp_path)
    hf = HFTokenizer.from_hf_folder(tmp_path)
    idx = torch.tensor([tok.encode("a dog")])
    spec = StructuredOutputs(regex=r"(the|a|mat|cat| ){1,6}\.")
    outs = [generate(model, idx, 30, eos_id=tok.eot_id, vocab_limit=tok.vocab_size,
                     guide=Grammars.of(t, tok.vocab_size).guide(spec)) for t in (tok, hf)]
    assert torch.equal(outs[0], outs[1])
    assert re.fullmatch(r"(the|a|mat|cat| ){1,6}\.", texts(tok, outs[1], idx.size(1))[0][0])


@pytest.mark.parametrize("d,says", [
    ({}, "exactly one of"), ({"regex": "a", "choice": ["x"]}, "exactly one of"), ({"json": 3}, "a JSON schema"),
    ({"choice": []}, "non-empty list"), ({"choice": ["a", 1]}, "non-empty list"), ({"regex": ""}, "non-empty string"),
    ({"json_object": "yes"}, "must be true"), ({"regex": "a", "whitespace_pattern": " "}, "['whitespace_pattern'] not "
                                                                                           "supported"),
    ({"regex": "a", "disable_any_whitespace": "no"}, "true or false"), ("regex", "must be an object")])
def test_structured_outputs_objects_are_checked_by_field(d, says):
    with pytest.raises(UserError, match=re.escape(says)):
        StructuredOutputs.from_dict(d)


@pytest.mark.parametrize("rf,says", [({"type": "xml"}, "text, json_object or json_schema"), ("json", '"type"'),
                                     ({"type": "json_schema", "json_schema": []}, '"schema", if given'),
                                     ({"type": "json_schema", "json_schema": {"schema": 3}}, '"schema", if given'),
                                     ({"type": "json_schema", "json_schema": {"name": "x", "strict": "yes"}},
                                      "json_schema.strict must be true or false, got 'yes'"),
                                     ({"type": "json_schema", "json_schema": {"name": 5}},
                                      "json_schema.name must be a string, got 5")])
def test_response_formats_are_checked(rf, says):
    with pytest.raises(UserError, match=re.escape(says)):
        StructuredOutputs.from_response_format(rf)


def test_response_formats_read_as_openais():
    assert StructuredOutputs.from_response_format({"type": "text"}) is None
    assert StructuredOutputs.from_response_format({"type": "json_object"}).kind == "json_object"
    spec = StructuredOutputs.from_response_format({"type": "json_schema", "json_schema": {"name": "x",
                                                                                          "schema": SCHEMA}})
    assert spec.json == SCHEMA
    # (OpenAI's schema is optional: without one, any JSON object, as the README says)
    assert StructuredOutputs.from_response_format({"type": "json_schema", "json_schema": {"name": "x"}}).kind \
        == "json_object"


@pytest.mark.parametrize("spec,says", [(StructuredOutputs(regex="a("), "the regex could not be compiled"),
                                       (StructuredOutputs(json={"type": "objec"}), "the json could not be compiled"),
                                       (StructuredOutputs(grammar="root ::= "), "the grammar could not be compiled")])
def test_what_xgrammar_cannot_compile_is_named(tiny, spec, says):
    with pytest.raises(UserError, match=says):
        tiny[2].guide(spec)


# vLLM's own test grammars (tests/v1/entrypoints/conftest.py's sample_sql_ebnf and sample_sql_lark: one language,
# 16 texts; test_struct_output_generate.py's ?start grammar with a regex terminal), and one with Lark's multi-line
# alternatives, `//` comments, %import and %ignore
SQL_EBNF = """
root ::= select_statement
select_statement ::= "SELECT" column "from" table "where" condition
column ::= "col_1" | "col_2"
table ::= "table_1" | "table_2"
condition ::= column "=" number
number ::= "1" | "2"
"""
SQL_LARK = """
start: select_statement
select_statement: "SELECT" column "from" table "where" condition
column: "col_1" | "col_2"
table: "table_1" | "table_2"
condition: column "=" number
number: "1" | "2"
"""
SQL_TEXTS = {f"SELECT{c}from{t}where{d}={n}" for c in ("col_1", "col_2") for t in ("table_1", "table_2")
             for d in ("col_1", "col_2") for n in "12"}
LARK = {
    "sql": (SQL_LARK, lambda t: t in SQL_TEXTS),
    "sql_regex": ("""
?start: select_statement
?select_statement: "SELECT " column_list " FROM " table_name
?column_list: column_name ("," column_name)*
?table_name: identifier
?column_name: identifier
?identifier: /[a-zA-Z_][a-zA-Z0-9_]*/
""", lambda t: re.fullmatch(r"SELECT ([a-zA-Z_]\w*)(,[a-zA-Z_]\w*)* FROM [a-zA-Z_]\w*", t, re.ASCII) is not None),
    "ignore": ("""// a list: the blanks between its tokens ignored
start: "[" item ("," item)* "]"
item: INT
    | "x"   // a placeholder
%import common.INT
%ignore " "
""", lambda t: re.fullmatch(r" *\[ *(\d+|x)( *, *(\d+|x))* *\] *", t) is not None)}


@pytest.mark.parametrize("name", list(LARK))
def test_a_lark_grammar_holds_the_text_as_vllms_does(tiny, name):
    """A grammar with no `::=` rule is Lark's (vLLM's grammar_is_likely_lark), compiled by xgrammar's Lark reader as
    vLLM's backend compiles it: every sampled text is one of the grammar's (checked by a pattern of its language, not
    by Lark or xgrammar), ended by the EOS."""
    model, tok, grammars = tiny
    grammar, ok = LARK[name]
    assert grammar_is_lark(grammar)
    idx = torch.tensor([tok.encode("the cat")] * 3)
    # (a bias toward the ends: a random model's identifiers and lists run on, the grammar deciding where they may end)
    bias = {tok.eot_id: 6.0, tok.encode(" ")[0]: 3.0, tok.encode("]")[0]: 3.0}
    kw = dict(temperature=1.0, eos_id=tok.eot_id, vocab_limit=tok.vocab_size, logit_bias=bias)
    guide = grammars.guide(StructuredOutputs(grammar=grammar))
    out = generate(model, idx, 40, guide=guide, generator=torch.Generator().manual_seed(1), **kw)
    got = texts(tok, out, idx.size(1))
    assert all(ended and ok(text) for text, ended in got) and guide.finished == [True] * 3, got
    plain = generate(model, idx, 40, generator=torch.Generator().manual_seed(1), **kw)
    assert not any(ok(text) for text, _ in texts(tok, plain, idx.size(1)))


def test_a_lark_grammar_draws_what_its_ebnf_twin_draws(tiny):
    """vLLM's sample_sql_lark and sample_sql_ebnf, one language: the same tokens drawn under each (the EBNF one still
    read as EBNF). A `::=` on any line, outside a `#` or `//` comment, makes a grammar EBNF, as vLLM's rule says."""
    model, tok, grammars = tiny
    assert grammar_is_lark(SQL_LARK) and not grammar_is_lark(SQL_EBNF)
    assert grammar_is_lark('start: "a" // not root ::= "a"\n# x ::= y') and not grammar_is_lark('root ::= "a"  // a')
    idx = torch.tensor([tok.encode("the cat")] * 4)
    outs = [generate(model, idx, 44, temperature=1.0, eos_id=tok.eot_id, vocab_limit=tok.vocab_size,
                     guide=grammars.guide(StructuredOutputs(grammar=g)), generator=torch.Generator().manual_seed(5))
            for g in (SQL_LARK, SQL_EBNF)]
    assert torch.equal(outs[0], outs[1])
    got = texts(tok, outs[0], idx.size(1))
    assert all(ended and text in SQL_TEXTS for text, ended in got) and len({t for t, _ in got}) > 1, got


@pytest.mark.parametrize("grammar,says", [
    ('start: "a"\n    | b', "Lark error at line 2, column 7: unknown name 'b'"),
    ("\nrule: 'hello'", "Lark error at line 2, column 7: unexpected character"),  # (Lark's strings are "...")
    ('start: A\n%declare A', "Lark error at line 2, column 1: directive %declare is not supported"),
    ('start: NUM\n%import common.NUM', "Lark error at line 2, column 1: unknown common import 'common.NUM'"),
    ('a: "x"', "Lark error at line 1, column 1: no start rule found")])
def test_a_malformed_lark_grammar_is_refused_naming_its_line(tiny, grammar, says):
    with pytest.raises(UserError, match=re.escape("the grammar (read as Lark: no line defines a rule with ::=) could "
                                                  f"not be compiled: {says}")):
        tiny[2].guide(StructuredOutputs(grammar=grammar))


def test_a_lark_grammar_without_xgrammars_lark_reader_is_refused(tiny, monkeypatch):
    """xgrammar before 0.2.6 has no compile_lark: a Lark grammar is refused by name, not read as EBNF."""
    grammars = tiny[2]

    class Old:  # (an older compiler: compile_grammar alone)
        compile_grammar = grammars.compiler.compile_grammar
    monkeypatch.setattr(grammars, "compiler", Old())
    with pytest.raises(UserError, match=re.escape("(read as Lark: no line defines a rule with ::=) needs xgrammar "
                                                  "0.2.6 or later")):
        grammars.compile(StructuredOutputs(grammar=SQL_LARK))
    grammars.compile(StructuredOutputs(grammar=SQL_EBNF))


@pytest.mark.parametrize("schema,says", [
    ({"type": "array", "items": {"enum": [1, 2]}, "minItems": 2, "maxItems": 2, "uniqueItems": True},
     "uniqueItems at the top level is not supported by xgrammar"),
    ({"type": "object", "properties": {"enum": {"type": ["integer", "null"], "multipleOf": 7}}},
     "multipleOf at properties.enum is not supported by xgrammar"),
    ({"$defs": {"a": {"type": "array", "contains": {"const": 1}}}, "$ref": "#/$defs/a"},
     "contains at $defs.a is not supported by xgrammar"),
    ({"anyOf": [{"type": "null"}, {"type": "object", "properties": {"q": {}}, "propertyNames": {"pattern": "^z$"}}]},
     "propertyNames with properties at anyOf[1] is not supported by xgrammar"),
    ({"type": "object", "patternProperties": {"^a$": {"type": "integer"}, "^b$": {"type": "string"}}},
     "patternProperties with more than one pattern at the top level is not supported by xgrammar"),
    ({"type": "string", "format": "zip-code"}, "format 'zip-code' at the top level is not supported by xgrammar"),
    # (xgrammar drops a length beside a pattern or format: uuid under maxLength 5 drew all 36 characters)
    ({"type": "object", "properties": {"id": {"type": ["string", "null"], "format": "uuid", "maxLength": 5}}},
     "maxLength beside format at properties.id is not supported by xgrammar"),
    ({"type": "object", "propertyNames": {"pattern": "^[a-z]+$", "minLength": 2}},
     "minLength beside pattern in propertyNames at the top level is not supported by xgrammar"),
    ({"type": "object", "properties": {"q": {"type": "string", "pattern": '^a"$'}}},
     "pattern '^a\"$' at properties.q has a literal '\"' or '\\', which xgrammar writes into the JSON string "
     "unescaped"),
    ({"type": "array", "items": {"type": "string", "pattern": "^(ab|\\x5c)$"}}, "pattern '^(ab|\\\\x5c)$' at items"),
    ({"type": "string", "pattern": '^["\\\\]$'}, "pattern " + repr('^["\\\\]$') + " at the top level has a literal")])
def test_schema_keywords_xgrammar_reads_past_are_refused_by_name(tiny, schema, says):
    """vLLM's has_xgrammar_unsupported_json_features: xgrammar compiles these schemas as if the keyword were not
    there (uniqueItems' grammar draws [2, 2], ended by the EOS as if whole), so they are refused, the keyword and
    where it is named; as text too. So is a pattern's literal quote or backslash, which xgrammar's grammar writes
    unescaped (^a"$ drew "a"", not JSON). A keyword's name as data (an enum's, a const's) or a property's is no
    schema; a class of other characters too ([^a], [a"]) is xgrammar's to keep the quote out of, not one of only
    quotes and backslashes (["\\\\] drew a string of a bare quote, not JSON)."""
    model, tok, grammars = tiny
    for given in (schema, json.dumps(schema)):
        with pytest.raises(UserError, match=re.escape(f"the json schema's {says}")):
            grammars.guide(StructuredOutputs(json=given))
    grammars.guide(StructuredOutputs(json={"type": "object", "properties": {"enum": {"type": "integer"}},
                                           "default": {"type": "array", "uniqueItems": True},
                                           "enum": [{"type": "number", "multipleOf": 2}],
                                           "example": {"type": "string", "format": "zip-code"}}))
    grammars.guide(StructuredOutputs(json={"type": "string", "pattern": '^[^a]+\\.[!-#]$'}))
    grammars.guide(StructuredOutputs(json={"type": "string", "pattern": '^[a"]$'}))


def test_a_lone_pattern_properties_or_property_names_is_taken_and_held(tiny):
    """pydantic's dict[constr(pattern=...), int] is a lone patternProperties, which xgrammar holds names and values
    to (as a lone propertyNames): taken, as vLLM takes them; only their combinations it reads past are refused."""
    model, tok, grammars = tiny
    keyed = {"type": "object", "patternProperties": {"^[a-z]+$": {"type": "integer"}}}
    named = {"type": "object", "propertyNames": {"pattern": "^z[a-z]*$"}}
    for schema, good, bad in ((keyed, '{"ab": 1}', ['{"aB": 1}', '{"ab": "x"}']),
                              (named, '{"zq": "x"}', ['{"q": 1}'])):
        compiled = grammars.compile(StructuredOutputs(json=schema))
        assert xgr.GrammarMatcher(compiled).accept_string(good)
        assert not any(xgr.GrammarMatcher(compiled).accept_string(text) for text in bad)


def test_generate_refuses_what_a_guide_cannot_do(tiny):
    model, tok, grammars = tiny
    idx = torch.tensor([tok.encode("the")])
    kw = dict(eos_id=tok.eot_id, vocab_limit=tok.vocab_size)
    with pytest.raises(UserError, match="with a draft or prompt_lookup do not take no_repeat_ngram_size"):
        generate(model, idx, 4, guide=grammars.guide(SPECS["choice"]), prompt_lookup=2, no_repeat_ngram_size=2, **kw)
    with pytest.raises(UserError, match="has none"):  # (the grammar's end could never end the text)
        generate(model, idx, 4, guide=grammars.guide(SPECS["choice"]), ignore_eos=True, **kw)
    guide = grammars.guide(SPECS["choice"])
    generate(model, idx, 4, guide=guide, **kw)
    with pytest.raises(UserError, match="serves one request"):
        generate(model, idx, 4, guide=guide, **kw)
    with pytest.raises(UserError, match="compiled for 300 tokens, fewer than the 320"):
        generate(model, idx, 4, guide=grammars.guide(SPECS["choice"]), eos_id=tok.eot_id, vocab_limit=320)
    with pytest.raises(UserError, match="fewer than the tokenizer's 300"):
        Grammars(tok, 299)


@pytest.fixture(scope="module", params=["engine", "max-batch-1"])
def server(request, tmp_path_factory):
    from test_serve import start, tiny_run

    folder = tmp_path_factory.mktemp("structured") / "run"
    tok = tiny_run(folder, "chat")
    srv = start(folder, *(["--max-batch", "1"] if request.param == "max-batch-1" else []))
    srv.RequestHandlerClass.log_message = lambda *a: None
    yield srv, tok
    srv.shutdown()
    srv.server_close()


def test_serve_takes_structured_outputs_and_response_format(server):
    """A completion's structured_outputs (vLLM's) and a chat's response_format (OpenAI's): texts the spec allows,
    finish_reason stop, the same tokens as generate() with the seed, streamed or not."""
    from test_serve import call, events

    srv, tok = server
    body = {"prompt": "the cat", "max_tokens": 30, "n": 2, "seed": 4, "temperature": 1.0,
            "structured_outputs": {"regex": "[a-c]{2,4}-[0-9]"}}
    status, out = call(srv, "/v1/completions", body)
    assert status == 200, out
    got = [c["text"] for c in out["choices"]]
    assert all(re.fullmatch(r"[a-c]{2,4}-\d", t) for t in got) and {c["finish_reason"] for c in out["choices"]} \
        == {"stop"}
    ids = tok.encode("the cat")
    ref = generate(srv.app.model, torch.tensor([ids] * 2), 30, temperature=1.0, eos_id=tok.eot_id,
                   generator=torch.Generator().manual_seed(4), vocab_limit=srv.app.limit,
                   guide=srv.app.guide(StructuredOutputs(regex="[a-c]{2,4}-[0-9]"), "x"))
    assert got == [t for t, _ in texts(tok, ref, len(ids))]
    status, text = call(srv, "/v1/completions", {**body, "stream": True})
    streamed = ["", ""]
    for chunk in events(text):
        for c in chunk["choices"]:
            streamed[c["index"]] += c["text"]
    assert streamed == got
    schema = {"type": "object", "properties": {"a": {"enum": ["x", "yy"]}}, "required": ["a"],
              "additionalProperties": False}
    status, out = call(srv, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 60, "seed": 1, "temperature": 0.5,
        "response_format": {"type": "json_schema", "json_schema": {"name": "pick", "schema": schema}}})
    assert status == 200, out
    answer = out["choices"][0]["message"]["content"]
    assert json.loads(answer)["a"] in ("x", "yy") and out["choices"][0]["finish_reason"] == "stop", answer
    # a Lark grammar (vLLM's sample_sql_lark), read as vLLM's xgrammar backend reads it
    status, out = call(srv, "/v1/completions", {"prompt": "the cat", "max_tokens": 44, "seed": 2, "temperature": 1.0,
                                                "structured_outputs": {"grammar": SQL_LARK}})
    assert status == 200 and out["choices"][0]["text"] in SQL_TEXTS and out["choices"][0]["finish_reason"] == "stop", \
        out


@pytest.mark.parametrize("extra,param,says", [
    ({"structured_outputs": {"regex": "a("}}, "structured_outputs", "the regex could not be compiled"),
    ({"structured_outputs": {"grammar": 'start: "a"\n  | b'}}, "structured_outputs",
     "(read as Lark: no line defines a rule with ::=) could not be compiled: Lark error at line 2, column 5"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, "response_format",
     "pass one of"),
    ({"guided_json": {"type": "object"}}, "guided_json", 'use "structured_outputs": {"json": ...}'),
    ({"guided_decoding_backend": "xgrammar"}, "guided_decoding_backend", "removed it"),
    ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern", "whitespace_pattern, not built here"),
    ({"response_format": {"type": "xml"}}, "response_format", "json_object or json_schema"),
    ({"structured_outputs": {"choice": "yes"}}, "structured_outputs", "non-empty list"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "array", "uniqueItems": True}}}},
     "response_format", "uniqueItems at the top level is not supported by xgrammar")])
def test_serve_refuses_bad_structured_requests_by_field(server, extra, param, says):
    from test_serve import call

    srv, _ = server
    status, out = call(srv, "/v1/completions", {"prompt": "the", "max_tokens": 4, **extra})
    assert status == 400 and out["error"]["param"] == param and says in out["error"]["message"], out


def test_generate_structured_outputs_flag_and_prompts_records(tmp_path, capsys):
    """`generate --structured-outputs` (JSON text or @FILE) and --prompts records with their own structured_outputs
    or response_format over the flag; refusals by flag."""
    from test_serve import tiny_run
    from tritongpt.cli import main

    folder = tmp_path / "run"
    tiny_run(folder, "completion")
    base = ["generate", "--weights", str(folder), "--device", "cpu", "--max-new-tokens", "30"]
    assert main(base + ["--prompt", "the cat", "--num-samples", "2", "--temperature", "1.0",
                        "--structured-outputs", '{"choice": ["yes", "no", "maybe"]}']) == 0
    printed = capsys.readouterr().out.split("\n")
    assert {line.removeprefix("the cat") for line in printed if line.startswith("the cat")} <= {"yes", "no", "maybe"}
    (tmp_path / "spec.json").write_text('{"regex": "[0-9]{3}"}')
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a dog"}) + "\n" + json.dumps(
        {"prompt": "the", "structured_outputs": {"choice": ["cat", "mat"]}}) + "\n" + json.dumps(
        {"prompt": "Hello", "response_format": {"type": "json_object"}, "max_tokens": 60}) + "\n" + json.dumps(
        {"prompt": "the", "response_format": {"type": "text"}}) + "\n")  # (text: no grammar, over the flag's too)
    assert main(base + ["--prompts", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o.jsonl"),
                        "--structured-outputs", "@" + str(tmp_path / "spec.json"), "--temperature", "0.8",
                        "--max-batch", "3"]) == 0
    recs = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert re.fullmatch("[0-9]{3}", recs[0]["text"]) and recs[1]["text"] in ("cat", "mat")
    assert all(r["finish_reason"] == "stop" for r in recs[:2])
    assert recs[2]["finish_reason"] == "length" or isinstance(json.loads(recs[2]["text"]), dict)
    assert not re.fullmatch("[0-9]{3}", recs[3]["text"]), recs[3]
    for flags, says in [(["--structured-outputs", "{regex"], "not JSON"),
                        (["--structured-outputs", "@" + str(tmp_path / "none.json")], "no such file"),
                        (["--structured-outputs", '{"regex": "a"}', "--prompt-lookup", "2",
                          "--no-repeat-ngram-size", "2"], "no_repeat_ngram_size"),
                        (["--structured-outputs", '{"regex": "a"}', "--num-beams", "2"], "--structured-outputs"),
                        (["--structured-outputs", '{"regex": "a("}'], "the regex could not be compiled")]:
        assert main(base + ["--prompt", "the"] + flags) == 2
        assert says in capsys.readouterr().err, flags


def test_the_triton_mask_draws_what_the_reference_draws(tiny):
    """The token mask's two paths (model/sampling.py's reference, kernels/token_mask.py's kernel, through the
    interpreter here), picked by the model's "cross_entropy" kernel name: the same sampled tokens, a request of two
    rows whose one ends first (the kernel then masks the live row alone)."""
    model, tok, grammars = tiny
    idx = torch.tensor([tok.encode("the cat")] * 2)
    outs = []
    for kernels in ("reference", "cross_entropy"):
        model.set_kernels(kernels)
        try:
            outs.append(generate(model, idx, 24, temperature=1.0, eos_id=tok.eot_id, vocab_limit=tok.vocab_size,
                                 guide=grammars.guide(SPECS["regex"]), generator=torch.Generator().manual_seed(2)))
        finally:
            model.set_kernels("reference")
    assert torch.equal(outs[0], outs[1])
    lengths = [row.index(tok.eot_id) for row in outs[0][:, idx.size(1):].tolist()]
    assert lengths[0] != lengths[1]


@pytest.mark.cuda
def test_on_a_gpu_the_kernel_the_engine_and_its_graphs_draw_generates_text(tiny):
    """On CUDA: the Triton mask and the reference draw the same sampled text in bf16 autocast; the engine's guided
    requests, CUDA graphs on, are generate()'s greedy text (the bitmask sent from pinned memory each step)."""
    import copy

    model, tok, grammars = tiny
    gpu = copy.deepcopy(model).cuda()
    idx = torch.tensor([tok.encode("the cat")] * 3, device="cuda")
    kw = dict(eos_id=tok.eot_id, vocab_limit=tok.vocab_size)
    outs = []
    for kernels in ("reference", "cross_entropy"):
        gpu.set_kernels(kernels)
        with torch.autocast("cuda", torch.bfloat16):
            outs.append(generate(gpu, idx, 30, temperature=1.0, guide=grammars.guide(SPECS["json"]),
                                 generator=torch.Generator("cuda").manual_seed(5), **kw))
    assert torch.equal(outs[0], outs[1])
    assert all(allowed("json", text) for text, ended in texts(tok, outs[0].cpu(), idx.size(1)) if ended)
    engine = Engine(gpu, max_batch=4, cuda_graph=True)
    handles = [engine.submit(idx[:1], 20, guide=grammars.guide(SPECS[k]), **kw) for k in ("regex", "choice")]
    engine.start()
    try:
        got = [h.wait() for h in handles]
    finally:
        engine.close()
    for k, out in zip(("regex", "choice"), got):
        assert torch.equal(out, generate(gpu, idx[:1], 20, guide=grammars.guide(SPECS[k]), **kw)), k


def test_a_stop_token_the_grammar_needs_as_text_ends_the_text_there(tiny):
    """stop_token_ids holding a text token ("." here) that the grammar's text needs: vLLM's grammar knows only the
    EOS, so the "." is drawn as text where the grammar allows it and ends the row there (as a stop token does).
    Made one of the grammar's own end tokens, xgrammar would allow it only at the grammar's end: nothing would be
    allowed after "ab" (a draw from all -inf, then an error claiming a bug). Where a text token is the only end
    (ignore_eos), a grammar that needs it as text allows nothing there: a UserError that says so."""
    model, tok, grammars = tiny
    idx = torch.tensor([tok.encode("the cat")] * 2)
    dot = tok.encode(".")
    assert len(dot) == 1
    spec = StructuredOutputs(regex=r"[a-c]{2}\.[0-9]")
    out = generate(model, idx, 8, temperature=1.0, eos_id=tok.eot_id, vocab_limit=tok.vocab_size, stop_token_ids=dot,
                   guide=grammars.guide(spec), generator=torch.Generator().manual_seed(0))
    for row in out[:, idx.size(1):].tolist():
        end = next(j for j, t in enumerate(row) if t in (dot[0], tok.eot_id))
        assert re.fullmatch(r"[a-c]{2}\.[0-9]?", tok.decode(row[:end + 1] if row[end] == dot[0] else row[:end])), row
        assert all(t == tok.eot_id for t in row[end + 1:]), row
    with pytest.raises(UserError, match="allows no token"):
        generate(model, idx, 8, eos_id=tok.eot_id, vocab_limit=tok.vocab_size, stop_token_ids=dot, ignore_eos=True,
                 guide=grammars.guide(spec))


def test_a_hugging_face_vocabularys_special_tokens_are_never_text(tmp_path):
    """xgrammar reads a Hugging Face vocabulary's special tokens by their spelling ("<|im_end|>"), text a JSON
    string or a regex's \\S could hold, which the answer's detokenization then drops; our BPE's are empty, never
    text. The same tokenizer both ways (a special token that ends nothing here): the same bitmask, inside a JSON
    string and at the grammar's end."""
    from transformers import GPT2TokenizerFast

    from tritongpt.train.hf_tokenizer import HFTokenizer

    tok = BPETokenizer.train(CORPUS, 300, special_tokens=("<|endoftext|>", "<|im_end|>"))
    tok.save_hf(tmp_path)
    GPT2TokenizerFast.from_pretrained(tmp_path).save_pretrained(tmp_path)
    hf = HFTokenizer.from_hf_folder(tmp_path)
    assert hf.special_tokens == tok.special_tokens
    masks = []
    for t in (tok, hf):
        guide = Grammars(t, 320).guide(StructuredOutputs(regex=r'"[^"]*"'))
        guide.begin(1, [tok.eot_id], 300)
        for token in tok.encode('"ab') + [None] + tok.encode('"'):  # (None: the bitmask inside the string)
            if token is None:
                guide.fill()
                masks.append(guide.bitmask.clone())
            else:
                guide.accept([token])
        guide.fill()
        masks.append(guide.bitmask.clone())
    im_end = tok.special_tokens["<|im_end|>"]
    assert not (int(masks[0][0, im_end // 32]) >> (im_end % 32)) & 1
    assert torch.equal(masks[0], masks[2]) and torch.equal(masks[1], masks[3])


def test_a_grammar_no_text_matches_fails_its_engine_request_alone(tiny):
    """A regex xgrammar compiles but no text matches ("ab" then an empty class): its bitmask, filled by the engine
    beside the step's forward, allows nothing after "ab" -> that request fails with a UserError saying so (not a
    draw from all -inf), and the request beside it draws what generate() draws."""
    model, tok, grammars = tiny
    idx = torch.tensor([tok.encode("the cat")])
    kw = dict(eos_id=tok.eot_id, vocab_limit=tok.vocab_size)
    engine = Engine(model, max_batch=4)
    bad = engine.submit(idx, 8, guide=grammars.guide(StructuredOutputs(regex=r"ab[^\s\S]")), **kw)
    good = engine.submit(idx, 8, guide=grammars.guide(SPECS["choice"]), **kw)
    engine.start()
    try:
        with pytest.raises(UserError, match="allows no token after its text so far"):
            bad.wait()
        assert torch.equal(good.wait(), generate(model, idx, 8, guide=grammars.guide(SPECS["choice"]), **kw))
    finally:
        engine.close()


@pytest.mark.parametrize("stream", [False, True])
def test_serve_refuses_a_structured_request_with_no_end_before_streaming(server, stream):
    """ignore_eos without stop_token_ids leaves a grammar's end no token to end the text: a 400 naming
    ignore_eos, streamed or not (a stream's used to open with 200 and carry the error as its one event)."""
    from test_serve import call

    srv, _ = server
    status, out = call(srv, "/v1/completions", {"prompt": "the", "max_tokens": 4, "ignore_eos": True, "stream": stream,
                                                "structured_outputs": {"regex": "[a-c]+"}})
    assert status == 400 and out["error"]["param"] == "ignore_eos" and "has none" in out["error"]["message"], out


@pytest.mark.parametrize("stream", [False, True])
def test_serve_refuses_masks_that_leave_out_the_grammars_end_before_streaming(server, stream):
    """A grammar's end allows only its end token: allowed_token_ids leaving it out, or bad_words banning it, left
    every answer reaching that end no token to draw, an error mid-answer (a stream's 200 then its error event). A
    400 naming the mask and the grammar's field before any token, the engine's server and --max-batch 1's alike;
    with the end token allowed, a 200."""
    from test_serve import call

    srv, tok = server
    eot, end = tok.eot_id, srv.app.chat_stop
    others = [t for t in range(tok.vocab_size) if t not in (eot, end)]
    choice = {"structured_outputs": {"choice": ["a", "b"]}}
    for path, body, param, says in (
            ("/v1/completions", {"prompt": "the", "allowed_token_ids": others, **choice}, "allowed_token_ids",
             f"'allowed_token_ids' leaves out token {eot}, the end of the text, which the 'structured_outputs' "
             "grammar ends it with"),
            ("/v1/completions", {"prompt": "the", "bad_words": ["<|endoftext|>"], **choice}, "bad_words",
             f"'bad_words' bans token {eot}, the end of the text"),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "allowed_token_ids": others,
                                      "response_format": {"type": "json_object"}}, "allowed_token_ids",
             f"leaves out token {end}, the end of the text, which the 'response_format' grammar")):
        status, out = call(srv, path, {"max_tokens": 6, "temperature": 0, "stream": stream, **body})
        assert status == 400 and out["error"]["param"] == param and says in out["error"]["message"], (body, out)
    status, out = call(srv, "/v1/completions", {"prompt": "the", "max_tokens": 6, "temperature": 0,
                                                "allowed_token_ids": others + [eot], **choice})
    assert status == 200 and out["choices"][0]["text"] in ("a", "b"), out
    # a text stop token allowed ends the text where the grammar takes it (test_a_text_stop_token_...): not refused
    dot = tok.encode(".")[0]
    status, out = call(srv, "/v1/completions", {"prompt": "the", "max_tokens": 6, "temperature": 0,
                                                "allowed_token_ids": others, "stop_token_ids": [dot],
                                                "structured_outputs": {"regex": "[a-c]{1,3}\\."}})
    assert status == 200 and re.fullmatch(r"[a-c]{1,3}", out["choices"][0]["text"]), out


def test_generate_and_the_engine_refuse_masks_that_leave_out_the_grammars_end(tiny):
    """generate() and Engine.submit: the same refusal before any token (on_token never called), not
    check_drawable's at the grammar's end; one end token of several left drawable is enough."""
    model, tok, grammars = tiny
    idx = torch.tensor([tok.encode("the cat")])
    others = [t for t in range(tok.vocab_size) if t != tok.eot_id]
    drawn = []
    for masks, says in ((dict(allowed_token_ids=others), f"allowed_token_ids leaves out token {tok.eot_id}"),
                        (dict(bad_words=[[tok.eot_id]]), f"bad_words bans token {tok.eot_id}")):
        with pytest.raises(FieldError, match=says) as e:
            generate(model, idx, 6, guide=grammars.guide(SPECS["choice"]), eos_id=tok.eot_id, on_token=drawn.append,
                     **masks)
        assert e.value.field == next(iter(masks))  # (the field a Python caller, or serve's 400, names)
        with pytest.raises(FieldError, match=says) as e:
            Engine(model, max_batch=2).submit(idx, 6, guide=grammars.guide(SPECS["choice"]), eos_id=tok.eot_id,
                                              **masks)
        assert e.value.field == next(iter(masks))
    assert drawn == []
    # several end tokens (stop tokens among the specials): refused only where none is left drawable
    assert masked_ends([5, 7], [7, 1]) is None and masked_ends([5, 7], None, [[5], [1, 7]]) is None
    assert masked_ends([5, 7], [1])[1].startswith("allowed_token_ids leaves out tokens 5, 7, the ends of the text")
    assert masked_ends([5, 7], [1, 5], [[5]])[0] == "bad_words"


def test_a_word_of_several_tokens_that_bans_the_grammars_end_fails_its_request_alone(tiny):
    """A bad word of several tokens ending in the end token ("a" then the EOS) is not refused before any token
    (masked_ends sees one-token words: whether a text ends with the word's other tokens is the draw's), but once
    the text is "a", the grammar's end allows only the EOS the word bans: the request fails with an error naming
    bad_words and the word (a DrawError, field bad_words), plain decoding and speculation alike (a verified
    position past the first used to take token 0, a RuntimeError from the grammar: serve's 500), and the request
    beside it in the engine's batch draws what generate() draws alone."""
    from tritongpt.train.generate import DrawError

    model, tok, grammars = tiny
    a, eot = tok.encode("a")[0], tok.eot_id
    idx = torch.tensor([[5, a, 20, 21, 5]])  # (prompt lookup's n-gram "5" proposes "a", 20, 21: both in one step)
    kw = dict(eos_id=eot, bad_words=[[a, eot]])
    said = f"bad_words [{a}, {eot}] bans token {eot} after its other tokens"
    spec = StructuredOutputs(choice=("a",))
    for extra in (dict(), dict(prompt_lookup=1, num_draft_tokens=3), dict(prompt_lookup=1, temperature=1.0),
                  dict(draft=model, num_draft_tokens=3)):
        with pytest.raises(DrawError, match=re.escape(said)) as e:
            generate(model, idx, 6, guide=grammars.guide(spec), **kw, **extra)
        assert e.value.field == "bad_words", extra
    good = generate(model, idx, 6, guide=grammars.guide(SPECS["regex"]), eos_id=eot)
    for engine in (Engine(model, max_batch=4), Engine(model, max_batch=4, prompt_lookup=1, num_draft_tokens=3)):
        bad = engine.submit(idx, 6, guide=grammars.guide(spec), temperature=1.0, **kw)
        other = engine.submit(idx, 6, guide=grammars.guide(SPECS["regex"]), eos_id=eot)
        engine.start()
        try:
            with pytest.raises(DrawError, match=re.escape(said)):
                bad.wait()
            assert torch.equal(other.wait(), good)
        finally:
            engine.close()


@pytest.mark.parametrize("stream", [False, True])
def test_serve_answers_a_word_that_bans_the_grammars_end_mid_answer_with_its_400(server, stream):
    """The same word served ("a<|endoftext|>": "a" then the EOS, special tokens read as vLLM's tokenizer reads
    them): a 400 naming bad_words (its param too), not a 500; streamed, the 200's "a" then that error as an event
    and [DONE]; the engine's server and --max-batch 1's alike."""
    from test_serve import call

    srv, tok = server
    a = tok.encode("a")[0]
    status, out = call(srv, "/v1/completions", {"prompt": "the cat", "max_tokens": 6, "temperature": 0,
                                                "stream": stream, "structured_outputs": {"choice": ["a"]},
                                                "bad_words": ["a<|endoftext|>"]})
    if stream:
        lines = [line for line in out.split("\n\n") if line]
        assert status == 200 and lines[-1] == "data: [DONE]", out
        *chunks, out = [json.loads(line[len("data: "):]) for line in lines[:-1]]
        assert [(c["choices"][0]["text"], c["choices"][0]["finish_reason"]) for c in chunks] == [("a", None)], chunks
    else:
        assert status == 400, out
    said = f"bad_words [{a}, {tok.eot_id}] bans token {tok.eot_id} after its other tokens"
    assert out["error"]["param"] == "bad_words" and out["error"]["message"].startswith(said), out


def test_a_text_stop_token_the_masks_allow_ends_a_grammars_text_unrefused(tiny):
    """A stop token that is text (".") is drawn where the grammar takes it as text and ends the text there, before
    the grammar's end: masks leaving out the EOS but allowing it are not refused (the text ends at it, as before
    the refusal), by generate() and Engine.submit alike; without it they are. A bad_words refusal names the end
    tokens it bans, not those allowed_token_ids left out."""
    model, tok, grammars = tiny
    dot, eot = tok.encode(".")[0], tok.eot_id
    idx = torch.tensor([tok.encode("the cat")])
    spec = StructuredOutputs(regex=r"[a-c]{1,3}\.")
    for masks in (dict(allowed_token_ids=[t for t in range(tok.vocab_size) if t != eot]), dict(bad_words=[[eot]])):
        out = generate(model, idx, 8, guide=grammars.guide(spec), eos_id=eot, stop_token_ids=[dot], **masks)
        assert re.fullmatch(r"[a-c]{1,3}\.", tok.decode(out[0, idx.size(1):].tolist())), out
        engine = Engine(model, max_batch=2)
        handle = engine.submit(idx, 8, guide=grammars.guide(spec), eos_id=eot, stop_token_ids=[dot], **masks)
        engine.start()
        try:
            got = handle.wait()
        finally:
            engine.close()
        assert torch.equal(got, out), (got, out)
    with pytest.raises(UserError, match=f"leaves out tokens {eot}, {dot}, the ends of the text"):
        generate(model, idx, 8, guide=grammars.guide(spec), eos_id=eot, stop_token_ids=[dot],
                 allowed_token_ids=[t for t in range(tok.vocab_size) if t not in (eot, dot)])
    said = masked_ends([5, 7], [1, 7], [[7]])[1]
    assert said.startswith("bad_words bans token 7, the end of the text (allowed_token_ids leaves out the "
                           "other),"), said


def test_masks_that_leave_out_the_grammars_wake_token_too_are_not_refused(tiny):
    """A grammar that waits for a token (Guide.wake: a reasoning model's </think>) holds no text whose masks leave
    that token out too: the text runs to its budget as without a grammar, not refused for the grammar's end;
    with the wake token drawable the refusal stands (generate() and Engine.submit alike)."""
    model, tok, grammars = tiny
    wake, eot = tok.encode("!")[0], tok.eot_id
    idx = torch.tensor([tok.encode("the cat")])
    for masks in (dict(allowed_token_ids=[t for t in range(tok.vocab_size) if t not in (eot, wake)]),
                  dict(bad_words=[[eot], [wake]])):
        guide = grammars.guide(SPECS["choice"])
        guide.wake = wake
        assert generate(model, idx, 5, guide=guide, eos_id=eot, **masks).size(1) == idx.size(1) + 5
        guide = grammars.guide(SPECS["choice"])
        guide.wake = wake
        Engine(model, max_batch=2).submit(idx, 5, guide=guide, eos_id=eot, **masks)  # (queued, not refused)
    guide = grammars.guide(SPECS["choice"])
    guide.wake = wake
    with pytest.raises(UserError, match=f"allowed_token_ids leaves out token {eot}"):
        generate(model, idx, 5, guide=guide, eos_id=eot, allowed_token_ids=[t for t in range(tok.vocab_size)
                                                                             if t != eot])


def test_no_repeat_ngram_size_yields_to_the_grammar_where_it_would_ban_all(tiny):
    """no_repeat_ngram_size 1 bans every token seen; a grammar whose text repeats its tokens ((ab|ba){3}) would be
    left nothing (a draw from all -inf: an error claiming a bug, or a NaN distribution). Greedy: each token is the
    likeliest the grammar allows and the ban does not, or, where the ban leaves none, the likeliest the grammar
    allows (an independent matcher's bitmask); sampled, the text is the grammar's too."""
    model, tok, grammars = tiny
    idx = torch.tensor([tok.encode("a dog")])
    spec = StructuredOutputs(regex=r"(ab|ba){3}")
    out = generate(model, idx, 12, eos_id=tok.eot_id, vocab_limit=tok.vocab_size, guide=grammars.guide(spec),
                   no_repeat_ngram_size=1)
    new = out[0, idx.size(1):].tolist()
    assert tok.eot_id in new and re.fullmatch(r"(ab|ba){3}", tok.decode(new[:new.index(tok.eot_id)])), new
    matcher = xgr.GrammarMatcher(grammars.compile(spec), override_stop_tokens=[tok.eot_id])
    bitmask, yielded = xgr.allocate_token_bitmask(1, tok.vocab_size), 0
    for j, t in enumerate(new[:new.index(tok.eot_id) + 1]):
        matcher.fill_next_token_bitmask(bitmask)
        ok = {i for i in range(tok.vocab_size) if (int(bitmask[0, i // 32]) >> (i % 32)) & 1}
        seen = set(out[0, :idx.size(1) + j].tolist())
        logits = model(out[:, :idx.size(1) + j])[0, -1].double()
        yielded += not ok - seen
        assert t == max(ok - seen or ok, key=lambda i: logits[i])
        assert matcher.accept_token(t)
    assert 0 < yielded < len(new)
    out = generate(model, idx, 12, temperature=1.0, eos_id=tok.eot_id, vocab_limit=tok.vocab_size,
                   guide=grammars.guide(spec), no_repeat_ngram_size=1, generator=torch.Generator().manual_seed(0))
    new = out[0, idx.size(1):].tolist()
    assert tok.eot_id in new and re.fullmatch(r"(ab|ba){3}", tok.decode(new[:new.index(tok.eot_id)])), new


def test_no_repeat_ngram_size_yields_to_what_the_grammar_and_allowed_token_ids_leave(tiny, monkeypatch):
    """Under a grammar of letters that are also one token together ([eh]{6}: "he" is a merged token), with
    allowed_token_ids the single letters and no_repeat_ngram_size 1: once both letters are seen, the ban leaves the
    grammar only the merged token, which allowed_token_ids leaves out. The ban yields to what the grammar and the
    masks leave together (it drew nothing before: a DrawError blaming allowed_token_ids); the text keeps to both.
    The masks are applied once a step (each application checks the rows: a host sync)."""
    from tritongpt.train import generate as gen

    calls, real = [], gen.allow_and_ban
    monkeypatch.setattr(gen, "allow_and_ban", lambda *a, **k: calls.append(1) or real(*a, **k))
    model, tok, grammars = tiny
    word = next(w for w in (tok.decode([t]) for t in range(256, tok.vocab_size)) if w.isalpha() and len(set(w)) > 1)
    assert len(tok.encode(word)) == 1  # the merged token the ban would leave alone
    letters = sorted(set(word))
    single = [tok.encode(c)[0] for c in letters]
    idx = torch.tensor([tok.encode("a dog")])
    spec = StructuredOutputs(regex=f"[{''.join(letters)}]{{6}}")
    out = generate(model, idx, 10, eos_id=tok.eot_id, vocab_limit=tok.vocab_size, guide=grammars.guide(spec),
                   no_repeat_ngram_size=1, allowed_token_ids=single + [tok.eot_id])
    new = out[0, idx.size(1):].tolist()
    assert new[6] == tok.eot_id and set(new[:6]) == set(single), (word, new)
    assert len(calls) == len(new), (len(calls), new)  # one a drawn token


def test_speculation_under_a_grammar_keeps_its_text(tiny):
    """Prompt lookup and a draft model under a grammar (each verified position masked by the grammar after the
    drafts before it; a draft it refuses rejected): greedy, the very text of plain guided decoding, over prompts
    whose proposals the grammar often refuses (JSON after a prose prompt) and often takes (a prompt of JSON);
    sampled, texts the spec allows. The engine's speculating guided requests are generate()'s with prompt lookup."""
    model, tok, grammars = tiny
    bias = {tok.encode(c)[0]: 4.0 for c in '"}'}
    draft = GPTModel(GPTConfig(vocab_size=tok.vocab_size, context_length=96, n_embd=16, n_layer=1, n_head=2)).eval()
    prompts = ['{"name": "ab", "age": 12} {"name": "ab", "age": 12} {"name"', "the cat sat on the mat"]
    stats = {}
    for prompt in prompts:
        idx = torch.tensor([tok.encode(prompt)] * 2)
        kw = dict(eos_id=tok.eot_id, vocab_limit=tok.vocab_size, logit_bias=bias)
        plain = generate(model, idx, 40, guide=grammars.guide(SPECS["json"]), **kw)
        for spec_kw in (dict(prompt_lookup=2, stats=stats), dict(draft=draft, num_draft_tokens=3)):
            assert torch.equal(generate(model, idx, 40, guide=grammars.guide(SPECS["json"]), **kw, **spec_kw),
                               plain)
        sampled = generate(model, idx, 40, temperature=1.0, guide=grammars.guide(SPECS["json"]), prompt_lookup=2,
                           generator=torch.Generator().manual_seed(3), **kw)
        assert all(allowed("json", text) for text, ended in texts(tok, sampled, idx.size(1)) if ended)
    assert stats["accepted"] > 0  # (the JSON prompt's proposals were taken: the masks read past a draft)
    engine = Engine(model, max_batch=4, prompt_lookup=2)
    idx = torch.tensor([tok.encode(prompts[0])] * 2)
    kw = dict(eos_id=tok.eot_id, vocab_limit=tok.vocab_size, logit_bias=bias, temperature=0.8)
    handle = engine.submit(idx, 30, guide=grammars.guide(SPECS["json"]), generator=torch.Generator().manual_seed(4),
                           **kw)
    engine.start()
    try:
        out = handle.wait()
    finally:
        engine.close()
    assert torch.equal(out, generate(model, idx, 30, guide=grammars.guide(SPECS["json"]), prompt_lookup=2,
                                     num_draft_tokens=10, generator=torch.Generator().manual_seed(4), **kw))
    assert engine.stats["spec_decode_num_drafts"] > 0


def test_speculation_under_a_grammar_ends_rows_inside_a_step_as_plain_decoding(tiny):
    """Greedy, three rows of different texts in one batch under a loose grammar: the model itself as the draft (its
    proposals the grammar allows are kept, several a step) and prompt lookup; the rows end inside a step at different
    places (a text stop token, a stop rule, the budget, k = 0 at its end), a row that ended padding the rest of the
    step. Each output is plain guided decoding's, token for token."""
    model, tok, grammars = tiny
    spec = StructuredOutputs(regex=r"[a-z .,]{1,40}")
    prompts = ["the cat sat on the mat. the cat sat on the mat. the", "yes no maybe yes no maybe yes no maybe",
               "the cat sat on the mat. a dog ran in the park, "]
    ids = [tok.encode(p) for p in prompts]
    idx = torch.tensor([i[-min(map(len, ids)):] for i in ids])

    def stop(rows):  # (a stop string's rule: "ran" just drawn)
        return torch.tensor([tok.decode(r[-2:]).endswith("ran") for r in rows.tolist()])
    (s,), (w,) = tok.encode(" s"), tok.encode("w")
    kept = [0, 0]  # (the draft tokens every row kept, a speculation's: several a step)
    for end_kw in (dict(stop_token_ids=[s]), dict(stop=stop), dict(ignore_eos=True, stop_token_ids=[s, w])):
        for budget in (7, 24):
            kw = dict(eos_id=tok.eot_id, vocab_limit=tok.vocab_size, **end_kw)
            plain = generate(model, idx, budget, guide=grammars.guide(spec), **kw)
            for i, spec_kw in enumerate((dict(draft=model, num_draft_tokens=4),
                                         dict(prompt_lookup=2, num_draft_tokens=5))):
                stats = {}
                got = generate(model, idx, budget, guide=grammars.guide(spec), stats=stats, **kw, **spec_kw)
                assert torch.equal(got, plain), (end_kw, budget, spec_kw)
                kept[i] += stats["accepted"]
        # (the rows end apart, inside the steps: each rule's rows end at different lengths)
        assert len({int((r == tok.eot_id).sum()) for r in plain}) > 1, end_kw
    assert min(kept) > 0, kept


def test_sampling_under_a_grammar_with_speculation_draws_plain_guided_decodings_distribution(tiny):
    """Tokens 2 and 3 under choices that all begin "a", 2000 rows in one batch (keep_common: each row's step cut by
    the others'), exactly: the model's distribution masked by the grammar after "a" and after each allowed second
    token. Prompt lookup proposes "a dog": "a" (the grammar's only token) kept by every row, so each row's second
    token comes from the mask read past a draft; another model as the draft (its logits masked by the grammar too,
    Guide.mask_after): its proposals refused now and then, the residual drawn; the model itself as the draft, masked
    alike: every draft kept. Each to within chance once in a million (tv_bound's, over the support)."""
    import math
    model, tok, grammars = tiny
    spec = StructuredOutputs(choice=("a dog", "a cat sat", "a dog ran", "a mat"))
    colon, V, N = tok.encode(":"), tok.vocab_size, 2000
    ids = tok.encode("the cat sat") + colon + tok.encode("a dog") + colon
    a, T = tok.encode("a")[0], len(ids)

    def masked(prefix):
        matcher = xgr.GrammarMatcher(grammars.compile(spec), override_stop_tokens=[tok.eot_id])
        assert all(matcher.accept_token(t) for t in prefix)
        bitmask = xgr.allocate_token_bitmask(1, V)
        matcher.fill_next_token_bitmask(bitmask)
        ok = torch.tensor([(int(bitmask[0, i // 32]) >> (i % 32)) & 1 == 1 for i in range(V)])
        with torch.no_grad():
            logits = model(torch.tensor([ids + prefix]))[0, -1].double()
        return torch.softmax(logits.masked_fill(~ok, float("-inf")), dim=-1)
    p1, want = masked([a]), torch.zeros(V, V, dtype=torch.double)
    for b in p1.nonzero().squeeze(1).tolist():
        want[b] = p1[b] * masked([a, b])
    bound = math.sqrt(2 * (int((want > 0).sum()) * math.log(2) + math.log(1e6)) / N)
    torch.manual_seed(11)
    other = GPTModel(GPTConfig(vocab_size=V, context_length=96, n_embd=16, n_layer=1, n_head=2)).eval()
    forwards = []
    for spec_kw in (dict(prompt_lookup=2, num_draft_tokens=4), dict(draft=other, num_draft_tokens=3),
                    dict(draft=model, num_draft_tokens=3)):
        stats = {}
        with torch.no_grad():
            out = generate(model, torch.tensor([ids] * N), 3, temperature=1.0, guide=grammars.guide(spec),
                           eos_id=tok.eot_id, vocab_limit=V, generator=torch.Generator().manual_seed(5), stats=stats,
                           **spec_kw)
        seen = torch.bincount(out[:, T + 1] * V + out[:, T + 2], minlength=V * V).double() / N
        assert bool((out[:, T] == a).all()) and (seen - want.flatten()).abs().sum().item() < bound, (spec_kw, stats)
        forwards.append(stats["target_forwards"])
    # another draft, masked by the grammar too, still differs from the model: some of its drafts refused, the
    # residual drawn (a step cut short); the model as its own draft, masked alike, has every draft kept: 1 forward
    assert forwards[1] > 1 and forwards[2] == 1, forwards


def test_the_engines_speculating_guided_requests_are_plain_guided_decoding(tiny):
    """Greedy through an engine that speculates (prompt lookup), pages (a pool too small for all: preemptions, each
    request's proposals cut to what the pool holds) and caches prefixes: guided requests that speculate (n of 2;
    a stop rule ending rows inside a step), beside ones that do not (logprobs, min_tokens: the pre-filled
    bitmasks) and a plain one. Each request's tokens are plain guided decoding's, generate() without a draft."""
    model, tok, grammars = tiny
    spec = StructuredOutputs(regex=r"[a-z .,]{1,40}")

    def stop(rows):  # ("ran" just drawn)
        return torch.tensor([tok.decode(r[-2:]).endswith("ran") for r in rows.tolist()])
    reqs = [("the cat sat on the mat. the cat sat on the mat. the", 2, dict(stop=stop)),
            ("yes no maybe yes no maybe yes no maybe", 1, dict(logprobs=2)),
            ("the cat sat on the mat. a dog ran in the park, ", 2, {}),
            ("the cat sat on the mat. the cat", 1, dict(min_tokens=3)),
            ("a dog ran in the park, a dog ran in the park", 1, dict(guide=None))]
    engine = Engine(model, max_batch=5, kv_pages=24, page_size=4, prefix_caching=True, prompt_lookup=2,
                    num_draft_tokens=5)
    handles, refs = [], []
    for prompt, n, extra in reqs:
        idx = torch.tensor([tok.encode(prompt)] * n)
        kw = dict(eos_id=tok.eot_id, vocab_limit=tok.vocab_size, **extra)
        guided = kw.pop("guide", True) is not None
        handles.append(engine.submit(idx, 24, guide=grammars.guide(spec) if guided else None, **kw))
        kw.pop("logprobs", None)
        refs.append(generate(model, idx, 24, guide=grammars.guide(spec) if guided else None, **kw))
    engine.start()
    try:
        outs = [h.wait() for h in handles]
    finally:
        engine.close()
    for (prompt, _, extra), out, ref in zip(reqs, outs, refs):
        assert torch.equal(out, ref), (prompt, extra)
    stats = engine.stats
    assert stats["preemptions"] > 0 and stats["spec_decode_num_accepted_tokens"] > 0, stats


def test_the_engines_one_mask_a_decode_batch_on_the_triton_path(tiny):
    """The engine masks its decode batch's guided rows in one op (Engine._mask_decode: their bitmasks gathered at
    their slots, the Triton kernel's indices): guided requests beside a plain one, a row of a request ending before
    the other, on the Triton path (interpreted) are each generate()'s on the reference path."""
    model, tok, grammars = tiny
    reqs = [("the cat", 2, SPECS["regex"], 3), ("a dog", 1, None, 4), ("Hello", 1, SPECS["choice"], 5)]
    model.set_kernels("cross_entropy")
    try:
        engine = Engine(model, max_batch=4)
        handles = [engine.submit(torch.tensor([tok.encode(p)] * n), 12, eos_id=tok.eot_id, vocab_limit=tok.vocab_size,
                                 temperature=1.0, generator=torch.Generator().manual_seed(seed),
                                 guide=grammars.guide(spec) if spec else None) for p, n, spec, seed in reqs]
        while engine.step():
            pass
        outs = [h.wait() for h in handles]
    finally:
        model.set_kernels("reference")
    for (p, n, spec, seed), out in zip(reqs, outs):
        assert torch.equal(out, generate(model, torch.tensor([tok.encode(p)] * n), 12, eos_id=tok.eot_id,
                                         vocab_limit=tok.vocab_size, temperature=1.0,
                                         generator=torch.Generator().manual_seed(seed),
                                         guide=grammars.guide(spec) if spec else None)), p
    lengths = [row.index(tok.eot_id) for row in outs[0][:, len(tok.encode("the cat")):].tolist()]
    assert lengths[0] != lengths[1]


def static_graphed(model, log, **kw):
    """test_engine's graphed Engine (buckets 1, 2, 4, the capture emulated by make_fx) whose replays return one
    buffer a graph, overwritten each replay, as a CUDA graph's output; log gets at each replay (its rows, the rows
    holding -inf before it: the step before's in-place mask, which the replay must overwrite, the address of the
    engine's batch bitmask)."""
    from test_decode_graph import fx_capture

    def capture(fn, device):
        replay, buf = fx_capture(fn), []

        def static():
            out = replay()
            if not buf:
                buf.append(out.clone())
            mask = engine.batch_bitmask
            log.append((out.size(0), torch.isinf(buf[0]).flatten(1).any(1).nonzero().flatten().tolist(),
                        None if mask is None else mask.data_ptr()))
            return buf[0].copy_(out)
        return static
    engine = Engine(model, max_batch=4, cuda_graph=True, capture=capture, **kw)
    return engine


@pytest.mark.parametrize("kernels", ["reference", "cross_entropy"])
def test_guided_requests_under_cuda_graphs_draw_generates_tokens(tiny, kernels):
    """The engine's decode steps replay emulated CUDA graphs (static output buffers) and mask their guided rows in
    one op, in place on the graph's buffer on the Triton path: a regex request alone (bucket 1), a choice one beside
    it (2), a regex request of 2 rows whose one ends first (4), a plain one waiting for a slot, then a JSON one;
    each request's tokens are generate()'s alone, so no mask leaks into the next replay or another request's rows."""
    from test_engine import buckets_run, run, seeded

    model, tok, grammars = tiny
    kw = dict(eos_id=tok.eot_id, vocab_limit=tok.vocab_size, temperature=1.0)
    reqs = [(0, "the cat", 1, "regex", 8, 1), (1, "Hello", 1, "choice", 8, 2), (2, "the cat", 2, "regex", 12, 3),
            (3, "a dog", 1, None, 6, 4), (4, "Hello", 1, "json", 10, 5)]
    schedule = [(at, torch.tensor([tok.encode(p)] * n), new,
                 dict(kw, seed=seed, guide=spec and grammars.guide(SPECS[spec]))) for at, p, n, spec, new, seed in reqs]
    log = []
    model.set_kernels(kernels)
    try:
        handles = [h for h, _ in run(static_graphed(model, log), schedule)]
    finally:
        model.set_kernels("reference")
    outs = [h.wait() for h in handles]
    for (at, p, n, spec, new, seed), (_, idx, _, settings), out in zip(reqs, schedule, outs):
        alone = dict(settings, guide=spec and grammars.guide(SPECS[spec]))
        assert torch.equal(out, generate(model, idx, new, **seeded(alone))), (p, spec)
    assert [rows for rows, _ in buckets_run([rows for rows, *_ in log])] == [1, 2, 4, 2, 1]
    lengths = [row.index(tok.eot_id) for row in outs[2][:, len(tok.encode("the cat")):].tolist()]
    assert lengths[0] != lengths[1]
    # the Triton path masked the graph's own buffer (its rows of -inf seen at the next replay), the reference a copy
    masked = [r for _, rows, _ in log for r in rows]
    assert bool(masked) == (kernels == "cross_entropy"), log
    # one batch bitmask kept across the buckets' row counts (pinned once on a GPU), not one a change of rows
    assert len({at for *_, at in log if at is not None}) == 1, log


def test_one_mask_under_cuda_graphs_with_vocabularies_a_failed_fill_and_preemption(tiny):
    """On the Triton path under emulated CUDA graphs, the one-mask decode batch beside what it must leave alone: a
    grammar of the tokenizer's 300 tokens (a bitmask of 10 words) beside one of the model's 352 (11, the width of
    the batch's logits) and a plain request of vocab_limit 320; a request whose grammar allows nothing after its
    first token fails alone in its decode step's fill (its row not masked); the paged cache too small for all, so
    the 2-row JSON request is preempted and readmitted at other slots. The others' tokens are generate()'s."""
    from test_engine import run, seeded

    _, tok, grammars = tiny
    torch.manual_seed(4)
    model = GPTModel(GPTConfig(vocab_size=352, context_length=64, n_embd=32, n_layer=1, n_head=2)).eval()
    wide, none_after = Grammars.of(tok, 352), StructuredOutputs(regex=r"(the|ab)[^\s\S]")
    reqs = [(0, "a dog", 1, None, None, 320, 16, 3), (0, "Hello there", 1, SPECS["regex"], wide, 352, 14, 2),
            (1, "the", 1, none_after, grammars, 300, 6, 4), (1, "the cat", 2, SPECS["json"], grammars, 300, 12, 1)]
    schedule = [(at, torch.tensor([tok.encode(p)] * n), new, dict(eos_id=tok.eot_id, vocab_limit=limit, seed=seed,
                                                                  temperature=1.0, guide=spec and g.guide(spec)))
                for at, p, n, spec, g, limit, new, seed in reqs]
    model.set_kernels("cross_entropy")
    try:
        engine = static_graphed(model, [], kv_pages=8, page_size=4)
        handles = [h for h, _ in run(engine, schedule)]
    finally:
        model.set_kernels("reference")
    with pytest.raises(UserError, match="row 0's grammar allows no token after its text so far"):
        handles[2].wait()
    for (_, p, _, spec, g, _, new, _), (_, idx, _, settings), h in zip(reqs, schedule, handles):
        if spec is none_after:
            continue
        alone = dict(settings, guide=spec and g.guide(spec))
        assert torch.equal(h.wait(), generate(model, idx, new, **seeded(alone))), p
    assert engine.stats["preemptions"] > 0 and engine.free == [0, 1, 2, 3]


def test_a_mask_that_fails_over_the_decode_batch_fails_the_guided_requests_alone(tiny, monkeypatch):
    """Engine._mask_decode's one op raising (a device error, say): its guided requests fail with the error; the plain
    request beside them draws on, generate()'s tokens."""
    import tritongpt.model.sampling as sampling

    model, tok, grammars = tiny
    engine = Engine(model, max_batch=4)
    kw = dict(eos_id=tok.eot_id, vocab_limit=tok.vocab_size)
    idx = torch.tensor([tok.encode("the cat")])
    guided = engine.submit(idx, 8, guide=grammars.guide(SPECS["regex"]), **kw)
    plain = engine.submit(idx, 8, **kw)
    engine.step()  # (the prefill's tokens: masked a request at a time)

    def broken(*a, **k):
        raise RuntimeError("the mask's device failed")
    monkeypatch.setattr(sampling, "apply_token_bitmask", broken)
    while engine.step():
        pass
    with pytest.raises(RuntimeError, match="the mask's device failed"):
        guided.wait()
    assert torch.equal(plain.wait(), generate(model, idx, 8, **kw))


def test_chat_holds_every_answer_to_its_structured_outputs(tmp_path, monkeypatch, capsys):
    """`chat --structured-outputs`: each answer of the conversation what the spec allows, ended by the grammar (no
    cut note); a spec that does not compile is refused before the first message is read."""
    import io

    from test_serve import tiny_run
    from tritongpt.cli import main

    tiny_run(tmp_path / "run", "chat")
    base = ["chat", "--weights", str(tmp_path / "run"), "--device", "cpu", "--max-new-tokens", "12"]
    monkeypatch.setattr("sys.stdin", io.StringIO("Is it red?\nAnd now?\n"))
    assert main(base + ["--structured-outputs", '{"choice": ["yes", "no", "maybe"]}']) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 2 and set(out.splitlines()) <= {"yes", "no", "maybe"}, out
    assert "was cut" not in err
    monkeypatch.setattr("sys.stdin", io.StringIO("never read\n"))
    assert main(base + ["--structured-outputs", '{"regex": "a("}']) == 2
    out, err = capsys.readouterr()
    assert "the regex could not be compiled" in err and out == ""


def random_schema(r, depth=0):
    """A seeded random JSON schema of the keywords xgrammar holds a text to: objects with required and optional
    properties (additionalProperties false or not), enums, consts, arrays with minItems/maxItems, bounded integers
    and numbers, strings with maxLength or a pattern, anyOf, a $ref to $defs (at the top)."""
    kinds = ["string", "integer", "number", "boolean", "enum", "const"] + ["object", "array", "anyOf"] * (depth < 2)
    kind = r.choice(kinds)
    if kind == "string":
        return r.choice([{"type": "string", "maxLength": r.randint(0, 4)}, {"type": "string", "pattern": "^[a-c]+-?$"},
                         {"type": "string"}])
    if kind in ("integer", "number"):
        lo = r.randint(-20, 20)
        return {"type": kind, "minimum": lo, "maximum": lo + r.randint(0, 50)} if r.random() < 0.7 else {"type": kind}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": r.sample(["a", "b c", 1, 2.5, None, True, "é", 'q"'], r.randint(1, 3))}
    if kind == "const":
        return {"const": r.choice(["x", 3, False, None])}
    if kind == "array":
        lo = r.randint(0, 2)
        return {"type": "array", "items": random_schema(r, depth + 1), "minItems": lo, "maxItems": lo + r.randint(0, 2)}
    if kind == "anyOf":
        return {"anyOf": [random_schema(r, depth + 1) for _ in range(r.randint(1, 3))]}
    props = {f"k{i}": random_schema(r, depth + 1) for i in range(r.randint(0, 3))}
    out = {"type": "object", "properties": props, "required": r.sample(sorted(props), r.randint(0, len(props)))}
    if r.random() < 0.6:
        out["additionalProperties"] = False
    return out


def conforms(v, s, defs) -> bool:
    """v is what schema s allows (random_schema's keywords only: jsonschema is no dependency here)."""
    if "$ref" in s:
        return conforms(v, defs[s["$ref"].rsplit("/", 1)[1]], defs)
    if "anyOf" in s:
        return any(conforms(v, a, defs) for a in s["anyOf"])
    if "enum" in s or "const" in s:  # (JSON's 1 is not true: compared with their types)
        return any(type(v) is type(c) and v == c for c in s.get("enum", [s.get("const")]))
    kind = s["type"]
    number = type(v) is int or (kind == "number" and type(v) is float)
    if kind in ("integer", "number"):
        return number and s.get("minimum", v) <= v <= s.get("maximum", v)
    if kind == "boolean":
        return type(v) is bool
    if kind == "string":
        return type(v) is str and len(v) <= s.get("maxLength", len(v)) and (
            "pattern" not in s or re.search(s["pattern"], v) is not None)
    if kind == "array":
        return (type(v) is list and s["minItems"] <= len(v) <= s["maxItems"]
                and all(conforms(x, s["items"], defs) for x in v))
    return (type(v) is dict and set(s["required"]) <= set(v)
            and all(k in s["properties"] or s.get("additionalProperties", True) for k in v)
            and all(conforms(x, s["properties"][k], defs) for k, x in v.items() if k in s["properties"]))


def test_fuzz_every_guided_text_is_whole_and_valid_or_cut_by_its_budget(tiny):
    """Random schemas, sampling settings (temperature 0.3 to 2, top_p, top_k, a bias toward JSON's closing marks)
    and budgets small enough to cut texts: each row either ends with the EOS, its text JSON the schema allows
    (checked here, not by xgrammar), or runs its whole budget: never a text the grammar left unended that stopped."""
    import random

    model, tok, grammars = tiny
    closers = {tok.encode(c)[0]: 3.0 for c in '"}]'}
    idx = torch.tensor([tok.encode("the cat")] * 2)
    whole = 0
    for seed in range(24):
        r = random.Random(seed)
        defs = {"d": random_schema(r, 1)}
        schema = {**random_schema(r), "$defs": defs} if r.random() < 0.7 else \
            {"type": "object", "properties": {"r": {"$ref": "#/$defs/d"}}, "required": ["r"], "$defs": defs}
        budget = r.randint(3, 40)
        kw = dict(temperature=r.uniform(0.3, 2.0), top_p=r.choice([None, r.uniform(0.5, 1.0)]),
                  top_k=r.choice([None, r.randint(2, 20)]), logit_bias=closers if r.random() < 0.7 else None)
        guide = grammars.guide(StructuredOutputs(json=schema, disable_any_whitespace=r.random() < 0.5))
        out = generate(model, idx, budget, eos_id=tok.eot_id, vocab_limit=tok.vocab_size, guide=guide,
                       generator=torch.Generator().manual_seed(seed), **kw)
        for row, done in zip(out[:, idx.size(1):].tolist(), guide.finished):
            if tok.eot_id in row:
                text = tok.decode(row[:row.index(tok.eot_id)])
                # (strict=False: raw control characters, as xgrammar's strings take them; see allowed())
                assert done and conforms(json.loads(text, strict=False), schema, defs), (seed, schema, text)
                whole += 1
            else:
                assert len(row) == budget and not done, (seed, row)
    assert whole >= 10  # (the texts checked: the budgets and the bias end most of them)


@pytest.mark.parametrize("kernels", ["reference", "cross_entropy"])
def test_a_guided_request_in_slots_apart_with_penalties_draws_generates_tokens(tiny, kernels):
    """rows_of's gather beside its views: a JSON request of 2 rows admitted into slots 0 and 3 (the first request's,
    freed, and the last free one), seeded, with penalties, beside a guided one and plain ones, on the reference path
    and the Triton one (its mask in place on the decode's logits): each request's tokens are generate()'s alone."""
    import tritongpt.train.engine as engine_module

    model, tok, grammars = tiny
    pen = dict(repetition_penalty=1.3, frequency_penalty=0.6, presence_penalty=0.4)
    reqs = [(0, "the cat", 1, None, 2, dict(temperature=0.0)), (0, "a dog", 1, "regex", 10, dict(temperature=1.0, **pen)),
            (0, "Hello", 1, None, 10, dict(temperature=0.8, top_p=0.9, **pen)),
            (3, "the park", 2, "json", 14, dict(temperature=1.0, **pen)), (3, "the cat", 1, None, 6, {})]
    kw = dict(eos_id=tok.eot_id, vocab_limit=tok.vocab_size)

    def ask(j, submit):
        at, p, n, spec, new, w = reqs[j]
        return submit(torch.tensor([tok.encode(p)] * n), new, generator=torch.Generator().manual_seed(10 + j),
                      guide=spec and grammars.guide(SPECS[spec]), **kw, **w)
    seen, real = [], engine_module.rows_of
    engine_module.rows_of = lambda out, slots: seen.append(list(slots)) or real(out, slots)
    model.set_kernels(kernels)
    try:
        engine, handles, step = Engine(model, max_batch=4), {}, 0
        while len(handles) < len(reqs) or engine.running or engine.waiting:
            handles.update((j, ask(j, engine.submit)) for j, r in enumerate(reqs) if r[0] == step)
            engine.step()
            step += 1
    finally:
        model.set_kernels("reference")
        engine_module.rows_of = real
    for j in range(len(reqs)):
        assert torch.equal(handles[j].wait(), ask(j, lambda *a, **k: generate(model, *a, **k))), j
    assert [0, 3] in seen
