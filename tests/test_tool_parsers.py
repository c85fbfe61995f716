"""The tool-call parsers of serve's "auto" tool choice (train/tool_calls.py, vLLM's --tool-call-parser): each
model family's syntax read whole (extract: a response) and as it grows (AutoStream: a stream cut anywhere gives the
same content and calls); answers that hold no call, or a broken one, stay content."""
import functools
import json
import random
import re

import pytest

from tritongpt.train.tool_calls import (PARSERS, AutoStream, Hermes, Llama3Json, Mistral, Pythonic, Qwen3Coder, held,
                                        qwen_value, scan_calls)

W = {"city": "Oslo", "days": [1, 2], "note": 'a "}" and a ]'}
A = {"a": 7}
M = {"s": '\\"</tool_call> <tool_call>'}  # (the markers in a string, after an escaped backslash and quote)
MV11 = {"s": '[TOOL_CALLS]x[ARGS]{"'}  # (Mistral's markers in a string)
# the request's tools, which type qwen3_coder's values ("days" an array, "a" an integer; "note" a string)
QTOOLS = [{"type": "function", "function": {"name": "w", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "array"}, "note": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "add", "parameters": {"properties": {"a": {"type": "integer"}}}}}]
Qwen = functools.partial(Qwen3Coder, QTOOLS)


def qwen_call(name, **params):
    return (f"<tool_call>\n<function={name}>\n"
            + "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items()) + "</function>\n</tool_call>")


CASES = [  # (parser, answer, its content, its calls)
    (Hermes, 'Let me check.\n<tool_call>\n{"name": "w", "arguments": ' + json.dumps(W) + '}\n</tool_call>\n'
     '<tool_call>\n{"name": "add", "arguments": {"a": 7}}\n</tool_call>', "Let me check.\n", [("w", W), ("add", A)]),
    (Hermes, '<tool_call>{"name":"add","arguments":{"a":7}}</tool_call>', None, [("add", A)]),
    (Llama3Json, '{"name": "w", "parameters": ' + json.dumps(W) + '}; {"name": "add", "arguments": {"a": 7}}', None,
     [("w", W), ("add", A)]),
    (Llama3Json, '<|python_tag|>{"name": "add", "parameters": {"a": 7}}', None, [("add", A)]),
    (Mistral, 'Sure[TOOL_CALLS] [{"name": "w", "arguments": ' + json.dumps(W) + '}, {"name": "add", "arguments": '
     '{"a": 7}}]', "Sure", [("w", W), ("add", A)]),
    (Mistral, '[TOOL_CALLS]{"name": "add", "arguments": {"a": 7}}', None, [("add", A)]),
    # a call's strings may spell the markers (the block ends at an end marker outside them)
    (Hermes, 'Hi <tool_call>{"name": "w", "arguments": ' + json.dumps(M) + '}</tool_call>', "Hi ", [("w", M)]),
    # text after the calls' JSON: dropped (vLLM's regexes find the calls and nothing after them)
    (Mistral, 'Sure[TOOL_CALLS][{"name": "add", "arguments": {"a": 7}}] Done.', "Sure", [("add", A)]),
    (Llama3Json, '{"name": "add", "parameters": {"a": 7}} Done.', None, [("add", A)]),
    # (and a second array after it: not calls, streamed or whole)
    (Mistral, '[TOOL_CALLS][{"name": "add", "arguments": {"a": 7}}] [{"name": "w", "arguments": {}}]', None,
     [("add", A)]),
    (Llama3Json, '{"name": "add", "parameters": {"a": 7}}] [{"name": "w", "parameters": {}}]', None, [("add", A)]),
    (Llama3Json, '{"name": "add", "parameters": {"a": 7}}, {"name": "w", "parameters": {}}', None, [("add", A)]),
    # Mistral's v11 form: each call its own [TOOL_CALLS]name[ARGS]{...}; text after an object dropped
    (Mistral, "Sure[TOOL_CALLS]w[ARGS]" + json.dumps(W) + '[TOOL_CALLS]add[ARGS]{"a": 7}', "Sure",
     [("w", W), ("add", A)]),
    (Mistral, '[TOOL_CALLS]add{"a": 7} then[TOOL_CALLS]w[ARGS]' + json.dumps(MV11) + " end", None,
     [("add", A), ("w", MV11)]),
    # pythonic: the answer a Python list of calls (strings may hold brackets and quotes; literals read, not run)
    (Pythonic, "[w(city='Oslo', days=[1, 2], note='a \"}\" and a ]'),\n add(a=7)]", None, [("w", W), ("add", A)]),
    (Pythonic, '[f(x=-1.5, t=(1, 2), n=None, b=True, d={"k": "v"}),]\n', None,
     [("f", {"x": -1.5, "t": [1, 2], "n": None, "b": True, "d": {"k": "v"}})]),
    # qwen3_coder: values typed by the request's tools; text between and after the blocks dropped
    (Qwen, "Let me check.\n" + qwen_call("w", city="Oslo", days="[1, 2]", note='a "}" and a ]') + "\n"
     + qwen_call("add", a=7) + " Done.", "Let me check.\n", [("w", W), ("add", A)]),
    (Qwen, "Hi <function=add>\n<parameter=a>\n7\n</parameter>\n</function>", "Hi ", [("add", A)]),  # (no <tool_call>)
    (Qwen, "<tool_call>\n<function=add>\n<parameter=a>\n7", None, [("add", A)]),  # (cut: read as far as it goes)
]
PLAIN = [  # answers with no call: all content
    (Hermes, "It is <tool in the text, and <tool_call"),  # (a marker begun at the end, never finished)
    (Hermes, '<tool_call>{"name": "w", "parameters": {"a": 1}}</tool_call>'),  # (Hermes' key is "arguments")
    (Llama3Json, '{"answer": 42}'),  # (JSON, but not a call)
    (Llama3Json, " {\"name\": \"add\", \"parameters\": {\"a\": 1}}"),  # (vLLM's: a call begins the answer)
    (Llama3Json, "<|python"),
    (Mistral, "[TOOL_CALLS] not json"),
    (Mistral, "[TOOL_CALLS][]"),  # (an empty array: no call)
    (Hermes, ""),
    (Mistral, '[TOOL_CALLS]add[ARGS][{"a": 1}]'),  # (v11: the arguments an object)
    (Mistral, "[TOOL_CALLS]bad name[ARGS]{}"),  # (a function's name: letters, digits, _ and -)
    (Mistral, "[TOOL_CALLS]add"),
    (Pythonic, "Sure: [add(a=7)]"),  # (vLLM's: the answer begins with the list)
    (Pythonic, " [add(a=7)]"),
    (Pythonic, "\n[add(a=7)]"),  # (valid Python, but the answer does not begin with the list)
    (Pythonic, "[add(a=x)]"),  # (not a literal: never looked up)
    (Pythonic, '[add(a=__import__("os").system("exit 3"))]'),  # (never run)
    (Pythonic, "[add(7)]"),  # (a positional argument has no name)
    (Pythonic, "[m.add(a=7)]"),
    (Pythonic, "[add(a={1, 2})]"),  # (a set: no JSON)
    (Pythonic, "[]"),
    (Pythonic, "[1] is a citation"),
    (Pythonic, "[add(a=7)"),
    (Qwen, "<tool_call>\n<function=add"),  # (a name never closed)
    (Qwen, "It is <tool_call> plain </tool_call> and <function"),
]


def streamed(parser, text, sizes, parallel=True):
    """(content, {index: [id, name, arguments' text]}) an AutoStream sends for text cut into pieces of sizes."""
    stream, content, calls, i = AutoStream(parser, parallel), "", {}, 0
    pieces = []
    while i < len(text):
        pieces.append(text[i:i + sizes[len(pieces) % len(sizes)]])
        i += len(pieces[-1])
    for out in [stream.add(p) for p in pieces] + [stream.finish()]:
        content += out[0] or ""
        for d in out[1]:
            if "id" in d:  # (a call's first delta: its id, type and name; never twice for an index)
                assert d["index"] == len(calls) and d["type"] == "function"
                calls[d["index"]] = [d["id"], d["function"]["name"], ""]
            calls[d["index"]][2] += d["function"]["arguments"]
    return content, calls


@pytest.mark.parametrize("kind, text, content, want", CASES)
def test_calls_read_whole_and_streamed_cut_anywhere(kind, text, content, want):
    parser = kind()
    got_content, got = parser.extract(text)
    assert got_content == content
    assert [(n, json.loads(a)) for n, a in got] == want
    rng = random.Random(len(text))
    for sizes in ([1], [2, 5], [len(text)], [rng.randint(1, 9) for _ in range(20)]):
        s_content, calls = streamed(parser, text, sizes)
        assert s_content == (content or "")
        assert [(n, json.loads(a)) for _, n, a in calls.values()] == want
        ids = [i for i, _, _ in calls.values()]
        assert len(set(ids)) == len(ids)
        assert all(re.fullmatch(r"[A-Za-z0-9]{9}", i) if kind is Mistral else i.startswith("chatcmpl-tool-")
                   for i in ids)


@pytest.mark.parametrize("kind, text", PLAIN)
def test_answers_without_a_call_are_all_content(kind, text):
    parser = kind()
    assert parser.extract(text) == (text, [])
    for sizes in ([1], [3], [max(1, len(text))]):
        assert streamed(parser, text, sizes) == (text, {})


def test_a_call_that_breaks_after_it_began_streaming_stays_sent():
    """vLLM's stream too: a call is sent as its arguments are drawn, so one that then does not parse (a cut answer)
    was sent as far as it went; the whole answer's response has no call and all the text as content."""
    text = 'Bad: <tool_call>{"name": "w", "arguments": {"city": </tool_call>'
    assert Hermes().extract(text) == (text, [])
    content, calls = streamed(Hermes(), text, [3])
    assert content == "Bad: " and [c[1:] for c in calls.values()] == [["w", '{"city": ']]


def test_content_before_a_call_is_sent_as_it_comes_less_what_may_begin_the_marker():
    stream = AutoStream(Hermes())
    assert stream.add("Hello <to") == ("Hello ", [])  # ("<to" may begin <tool_call>)
    assert stream.add("ol") == (None, [])
    assert stream.add("s are") == ("<tools are", [])  # (it did not)
    assert stream.add(" here<tool_call>{") == (" here", [])
    content, calls = stream.add('"name": "add", "arguments": {"a"')
    assert content is None and calls[0]["function"] == {"name": "add", "arguments": '{"a"'}
    assert stream.add(": 1}}</tool_c") == (None, [{"index": 0, "function": {"arguments": ": 1}"}}])
    assert stream.finish() == (None, [])
    assert [held("ab<tool", "<tool_call>"), held("ab<", "<tool_call>"), held("<tool_call", "<tool_call>"),
            held("ab", "<tool_call>")] == [5, 1, 10, 0]


def test_a_call_whose_arguments_come_before_its_name_is_sent_whole_at_the_end():
    """The stream opens a call at its arguments once its name is known; a call written the other way round is
    found only when the answer is whole, and sent then (its arguments as extract writes them)."""
    text = '<tool_call>{"arguments": {"a": 2}, "name": "add"}</tool_call>'
    assert scan_calls("[" + text[len("<tool_call>"):], ("arguments",)) == []
    assert streamed(Hermes(), text, [4])[1][0][1:] == ["add", '{"a": 2}']


def test_scan_calls_takes_the_parsers_keys_and_odd_strings():
    text = '[{"name": "f", "arguments": {"s": "\\u00e9\\"}"}}, {"name": 3, "arguments": {}}, {"name": "g", "x": {}}'
    assert scan_calls(text, ("arguments",)) == [("f", '{"s": "\\u00e9\\"}"}')]
    assert scan_calls(text) == []  # ("required"'s key is "parameters")
    assert scan_calls('[{"name": "f\\x", "arguments": {}}]', ("arguments",)) == []  # (a bad escape: not a name)


def test_every_parser_is_named_as_vllm_names_it():
    assert sorted(PARSERS) == ["hermes", "llama3_json", "mistral", "openai", "pythonic", "qwen3_coder"]
    assert [PARSERS[n].keeps_specials for n in sorted(PARSERS)] == [True, False, True, True, False, False]
    assert [PARSERS[n].needs_tools for n in sorted(PARSERS)] == [False, False, False, False, False, True]
    assert [PARSERS[n].needs_ids for n in sorted(PARSERS)] == [False, False, True, False, False, False]


def test_serve_settings_and_messages_follow_the_parser():
    """Hermes' and Mistral's markers may be special tokens: "auto" shows special tokens (vLLM's adjust_request),
    Llama's leaves skip_special_tokens as asked; with the mistral parser every call's id is Mistral's nine letters
    and digits, a named call's and "required"'s too."""
    from tritongpt.train.serve import sampling_settings, tool_message

    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": tools}
    for parser, choice, skip in ((Hermes(), None, False), (Mistral(), "auto", False), (Llama3Json(), None, True),
                                 (Hermes(), "none", True)):
        s = sampling_settings({**body, "tool_choice": choice}, "chat", ["m"], parser)
        assert s["skip_special_tokens"] is skip and s["tools"]["choice"] == (choice or "auto")
    named = {"type": "function", "function": {"name": "f"}}
    for parser, pattern in ((Mistral(), r"[A-Za-z0-9]{9}"), (Hermes(), r"chatcmpl-tool-[0-9a-f]{32}")):
        for choice, text, finish in ((named, '{"x": 1}', "stop"), ("required", '[{"name": "f", "parameters": {}}]',
                                                                   "tool_calls")):
            s = sampling_settings({**body, "tool_choice": choice}, "chat", ["m"], parser)
            message, why = tool_message(s["tools"], text, "stop")
            (tc,) = message["tool_calls"]
            assert re.fullmatch(pattern, tc["id"]) and why == finish, (parser, choice, tc, why)
    s = sampling_settings(body, "chat", ["m"], Mistral())
    message, why = tool_message(s["tools"], '[TOOL_CALLS][{"name": "f", "arguments": {"x": 1}}]', "stop")
    (tc,) = message["tool_calls"]
    assert re.fullmatch(r"[A-Za-z0-9]{9}", tc["id"]) and why == "tool_calls" and message["content"] is None
    assert tc["function"] == {"name": "f", "arguments": '{"x": 1}'}


def test_a_call_cut_short_after_llamas_calls_is_dropped_as_vllm_drops_it():
    text = '{"name": "add", "parameters": {"a": 7}}; {"name": "w", "parameters": {"ci'
    assert Llama3Json().extract(text) == (None, [("add", '{"a": 7}')])
    assert Llama3Json().extract('{"name": "add", "parameters": {"a": 7}}; {"answer": 42}')[1] == []  # (not a call)


def test_json_nested_past_pythons_recursion_limit_is_content_not_a_crash():
    deep = "[" * 3000 + "]" * 3000
    for kind, text in ((Hermes, '<tool_call>{"name": "f", "arguments": ' + deep + "}</tool_call>"),
                       (Mistral, '[TOOL_CALLS][{"name": "f", "arguments": ' + deep + "}]"),
                       (Llama3Json, '{"name": "f", "parameters": ' + deep + "}"),
                       (Pythonic, "[f(a=" + deep + ")]")):
        assert kind().extract(text) == (text, [])
        assert streamed(kind(), text, [len(text)]) == (text, {})
    # (qwen3_coder's value that neither JSON nor a Python literal can read stays text, vLLM's)
    q = Qwen3Coder([{"function": {"name": "f", "parameters": {"properties": {"a": {"type": "array"}}}}}])
    assert q.extract(qwen_call("f", a=deep)) == (None, [("f", json.dumps({"a": deep}))])


def test_parallel_tool_calls_false_keeps_the_first_call_whole_and_streamed():
    """OpenAI's parallel_tool_calls false: at most one call; "auto" cannot hold the model to one (no grammar), so the
    first call found is kept, the others dropped (vLLM's maybe_filter_parallel_tool_calls)."""
    from tritongpt.train.serve import sampling_settings, tool_message

    kind, text = CASES[0][:2]  # (two Hermes calls)
    tools = [{"type": "function", "function": {"name": n}} for n in ("w", "add")]
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": tools}
    for parallel, names in ((False, ["w"]), (True, ["w", "add"]), (None, ["w", "add"])):
        s = sampling_settings({**body, "parallel_tool_calls": parallel}, "chat", ["m"], kind())
        message, why = tool_message(s["tools"], text, "stop")
        assert [c["function"]["name"] for c in message["tool_calls"]] == names and why == "tool_calls"
    for sizes in ([1], [len(text)]):
        assert [c[1] for c in streamed(kind(), text, sizes, parallel=False)[1].values()] == ["w"]


def test_broken_calls_after_the_list_or_mid_call_are_content_whole_and_sent_as_far_as_they_went_streamed():
    """Text after a pythonic list, a later call that is not literal, a v11 call cut short: the whole answer is
    content (vLLM's, but for the cut v11 call, which vLLM keeps a call with broken arguments); the stream sent each
    call that was whole before the answer broke (the vLLM stream's too)."""
    for kind, text, sent in ((Pythonic, "[add(a=7)] Done.", [["add", '{"a": 7}']]),
                             (Pythonic, "[add(a=7), w(city=x)]", [["add", '{"a": 7}']]),
                             (Mistral, '[TOOL_CALLS]add[ARGS]{"a": 7}[TOOL_CALLS]w[ARGS]{"city": ', [
                                 ["add", '{"a": 7}'], ["w", '{"city": ']])):
        assert kind().extract(text) == (text, [])
        content, calls = streamed(kind(), text, [2])
        assert content == "" and [c[1:] for c in calls.values()] == sent


def test_qwen3_coder_types_values_by_the_requests_tools_as_vllm():
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "x": {"type": "number"}}}
    assert [qwen_value(v, {"type": "integer"}) for v in ("3", "-2", "x", "null", "None")] == [3, -2, "x", None, None]
    assert [qwen_value(v, {"type": "number"}) for v in ("2.5", "3.0", "1e400", "nan")] == [2.5, 3, "1e400", "nan"]
    assert [qwen_value(v, {"type": "boolean"}) for v in ("True", "false", "yes")] == [True, False, False]
    assert qwen_value('{"a": [1]}', {"type": "object"}) == {"a": [1]}
    assert qwen_value("{'a': (1, 2)}", {"type": "object"}) == {"a": (1, 2)}  # (a Python literal: read, not run)
    assert qwen_value('"[1, 2]"', {"type": "array"}) == [1, 2]  # (JSON text of a literal: read again)
    assert qwen_value("__import__('os')", {"type": "object"}) == "__import__('os')"
    assert [qwen_value("null", s) for s in ({"type": "string"}, {"anyOf": [{"type": "string"}, {"type": "null"}]},
                                            None, "not a schema")] == ["null", None, "null", "null"]
    text = qwen_call("f", n="4", x="0.5", other="4") + qwen_call("g", n="4")
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    assert [json.loads(a) for _, a in Qwen3Coder(tools).extract(text)[1]] == [
        {"n": 4, "x": 0.5, "other": "4"}, {"n": "4"}]  # (a parameter or tool not in the request's tools: text)
    assert [json.loads(a) for _, a in Qwen3Coder().extract(text)[1]] == [{"n": "4", "x": "0.5", "other": "4"},
                                                                       {"n": "4"}]
    # a value JSON cannot hold (NaN) leaves the answer content
    nan = qwen_call("f", d="NaN")
    assert Qwen3Coder([{"function": {"name": "f", "parameters": {"properties": {"d": {"type": "object"}}}}}]
                      ).extract(nan) == (nan, [])


def test_qwen3_coder_streams_each_parameter_as_it_closes():
    stream = AutoStream(Qwen())
    assert stream.add("Hi <tool_") == ("Hi ", [])
    assert stream.add("call>\n<function=ad") == (None, [])
    content, calls = stream.add("d>\n<parameter=a>\n7\n</param")
    assert content is None and calls[0]["function"] == {"name": "add", "arguments": "{"}
    assert stream.add("eter>\n") == (None, [{"index": 0, "function": {"arguments": '"a": 7'}}])
    assert stream.add("</function>") == (None, [{"index": 0, "function": {"arguments": "}"}}])
    assert stream.finish() == (None, [])


def test_the_request_s_tools_reach_qwen3_coder_through_serve():
    """The server holds one parser; qwen3_coder's is made anew per request with its tools (tool_setting), so one
    request's schema types its values and another's does not leak."""
    from tritongpt.train.serve import sampling_settings, tool_message

    server_wide = Qwen3Coder()
    text = qwen_call("add", a="7")
    for tools, want in ((QTOOLS, {"a": 7}), ([{"type": "function", "function": {"name": "add"}}], {"a": "7"})):
        body = {"messages": [{"role": "user", "content": "hi"}], "tools": tools}
        s = sampling_settings(body, "chat", ["m"], server_wide)
        assert s["skip_special_tokens"] is True  # (left as asked: qwen3_coder shows no special tokens)
        message, why = tool_message(s["tools"], text, "stop")
        assert why == "tool_calls" and json.loads(message["tool_calls"][0]["function"]["arguments"]) == want
    assert server_wide.schemas == {}


def test_mistral_v11_and_pythonic_calls_are_sent_before_the_answer_ends():
    """v11 arguments go as drawn, a pythonic call whole once the comma after it is written (not at finish)."""
    stream = AutoStream(Mistral())
    assert stream.add("Ok[TOOL_CALLS]ad") == ("Ok", [])
    (d,) = stream.add('d[ARGS]{"a"')[1]
    assert d["function"] == {"name": "add", "arguments": '{"a"'} and re.fullmatch(r"[A-Za-z0-9]{9}", d["id"])
    assert stream.add(': 7}[TOOL_') == (None, [{"index": 0, "function": {"arguments": ": 7}"}}])
    stream = AutoStream(Pythonic())
    assert stream.add("[add(a=7)") == (None, [])  # (the call may go on: add(a=7)(...) is no call)
    (d,) = stream.add(", w(")[1]
    assert d["function"] == {"name": "add", "arguments": '{"a": 7}'}


def test_qwen3_coder_reads_a_list_of_types_and_local_refs_as_the_schema_says():
    """A "type" that is a list (["string", "null"]) types a value as anyOf's does, not as Python's text of the list
    (then "123" for a string became 123, "true" for a boolean stayed text); a local $ref (pydantic's "#/$defs/X")
    is the schema it points to, in the tool's parameters, so a nested model's JSON is an object, not its text."""
    assert [qwen_value(v, {"type": ["string", "null"]}) for v in ("123", "null")] == ["123", None]
    assert qwen_value("true", {"type": ["boolean", "null"]}) is True
    assert qwen_value('{"a": true}', {"type": ["object", "null"]}) == {"a": True}
    assert qwen_value("7", {"anyOf": [{"type": ["integer", "null"]}]}) == 7
    params = {"type": "object", "$defs": {"P": {"type": "object", "properties": {"x": {"type": "integer"}}},
                                          "L": {"$ref": "#/$defs/L"}},  # (a reference to itself: a string)
              "properties": {"p": {"$ref": "#/$defs/P"}, "q": {"anyOf": [{"$ref": "#/$defs/P"}, {"type": "null"}]},
                             "l": {"$ref": "#/$defs/L"}, "m": {"$ref": "#/$defs/missing"}}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": params}}]
    text = qwen_call("f", p='{"x": 1}', q="null", l='{"x": 1}', m="[1]")
    want = {"p": {"x": 1}, "q": None, "l": '{"x": 1}', "m": "[1]"}
    assert [json.loads(a) for _, a in Qwen3Coder(tools).extract(text)[1]] == [want]
    (_, name, args), = streamed(Qwen3Coder(tools), text, [5, 40])[1].values()
    assert name == "f" and json.loads(args) == want


def test_mistral_v11_reads_a_name_with_whitespace_about_it():
    """A v11 call whose name has whitespace about it ("[TOOL_CALLS] add [ARGS] {...}": a tokenizer that decodes a
    space before a word) is still the call, as vLLM's regex finds it, whole and streamed, not the answer's text."""
    text = 'Sure[TOOL_CALLS] add [ARGS] {"a": 7}[TOOL_CALLS]\nw{"city": "Oslo"}'
    want = [("add", A), ("w", {"city": "Oslo"})]
    content, calls = Mistral().extract(text)
    assert content == "Sure" and [(n, json.loads(a)) for n, a in calls] == want
    content, calls = streamed(Mistral(), text, [3])
    assert content == "Sure" and [(n, json.loads(a)) for _, n, a in calls.values()] == want


def test_qwen3_coder_keeps_a_bare_function_before_the_first_block_as_content():
    """vLLM's qwen3_coder reads the calls inside <tool_call> blocks once there is one, and its content is the text
    before the first block: a bare <function=...> written before it is content, not a call, nor dropped (whole and
    streamed); with no block at all, bare functions are the calls (vLLM's back-off). The stream cannot tell which
    until the answer ends or a block begins, so it holds a bare function back till then."""
    bare = "Hi <function=add>\n<parameter=a>\n1\n</parameter>\n</function>\n"
    text = bare + qwen_call("w", city="Oslo") + " Done."
    content, calls = Qwen().extract(text)
    assert content == bare and [(n, json.loads(a)) for n, a in calls] == [("w", {"city": "Oslo"})]
    for sizes in ([1], [3, 7], [len(text)]):
        s_content, s_calls = streamed(Qwen(), text, sizes)
        assert s_content == bare and [(n, json.loads(a)) for _, n, a in s_calls.values()] == [("w", {"city": "Oslo"})]
    stream = AutoStream(Qwen())
    assert stream.add(bare) == ("Hi ", [])  # (held: a block may follow)
    assert stream.add("<tool_") == (None, [])
    assert stream.add("call>") == (bare[3:], [])


def test_mistral_v13_calls_keep_the_id_written_in_the_text():
    """Mistral's v13 tokenizer (Magistral) writes each call as [TOOL_CALLS]name[CALL_ID]id[ARGS]{...}: the call is
    read, whole and streamed, with that id (the tool's answer will name it); an id that is not Mistral's nine letters
    and digits, or repeats an earlier call's, gets a fresh one. The v11 and JSON forms keep working beside it."""
    from tritongpt.train.serve import tool_message

    text = ('Sure[TOOL_CALLS]add[CALL_ID]a1B2c3D4e[ARGS]{"a": 7}[TOOL_CALLS] w [CALL_ID] Zz9Zz9Zz9 [ARGS]'
            + json.dumps(W) + '[TOOL_CALLS]add[CALL_ID]call_1[ARGS]{"a": 7}[TOOL_CALLS]add[CALL_ID]a1B2c3D4e[ARGS]{}')
    content, calls = Mistral().extract(text)
    assert content == "Sure" and [(c[0], json.loads(c[1])) for c in calls] == [("add", A), ("w", W), ("add", A),
                                                                              ("add", {})]
    assert [c[2:] for c in calls] == [("a1B2c3D4e",), ("Zz9Zz9Zz9",), (), ()]
    tools = {"choice": "auto", "parser": Mistral(), "parallel": True}
    message, why = tool_message(tools, text, "stop")
    ids = [c["id"] for c in message["tool_calls"]]
    assert why == "tool_calls" and ids[:2] == ["a1B2c3D4e", "Zz9Zz9Zz9"] and len(set(ids)) == 4
    assert all(re.fullmatch(r"[A-Za-z0-9]{9}", i) for i in ids)
    for sizes in ([1], [4, 9], [len(text)]):
        s_content, s_calls = streamed(Mistral(), text, sizes)
        assert s_content == "Sure" and [(n, json.loads(a)) for _, n, a in s_calls.values()] == [
            ("add", A), ("w", W), ("add", A), ("add", {})]
        s_ids = [i for i, _, _ in s_calls.values()]
        assert s_ids[:2] == ["a1B2c3D4e", "Zz9Zz9Zz9"] and len(set(s_ids)) == 4
    # v11 (no id in the text) beside: a fresh id
    content, calls = Mistral().extract('[TOOL_CALLS]add[ARGS]{"a": 7}')
    assert content is None and calls == [("add", '{"a": 7}')]


def test_mistral_v13_id_an_earlier_turn_gave_a_call_gets_a_fresh_one():
    """A v13 id the request's messages already gave a call (an earlier turn's) is not kept for a new call, whole or
    streamed: a tool's result naming it would answer two calls (mistral-common's v13 validator asks distinct ids
    within a turn; vLLM's ids are always its own). serve hands the parser the request's ids (tool_setting)."""
    from tritongpt.train.serve import sampling_settings, tool_message

    old = "a1B2c3D4e"
    text = f'[TOOL_CALLS]add[CALL_ID]{old}[ARGS]{{"a": 7}}[TOOL_CALLS]w[CALL_ID]Zz9Zz9Zz9[ARGS]{{}}'
    content, calls = Mistral(taken={old, "unused"}).extract(text)
    assert content is None and [c[:2] for c in calls] == [("add", '{"a": 7}'), ("w", "{}")]
    assert [c[2:] for c in calls] == [(), ("Zz9Zz9Zz9",)]
    for sizes in ([1], [4, 9], [len(text)]):
        s_ids = [i for i, _, _ in streamed(Mistral(taken={old}), text, sizes)[1].values()]
        assert s_ids[1] == "Zz9Zz9Zz9" and s_ids[0] != old and re.fullmatch(r"[A-Za-z0-9]{9}", s_ids[0])
    earlier = [{"role": "user", "content": "hi"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": old, "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}]},
               {"role": "tool", "tool_call_id": old, "content": "2"}]
    tools = [{"type": "function", "function": {"name": n}} for n in ("w", "add")]
    for messages, kept in ((earlier, False), (earlier[:1], True)):
        s = sampling_settings({"messages": messages, "tools": tools}, "chat", ["m"], Mistral())
        message, why = tool_message(s["tools"], text, "stop")
        ids = [c["id"] for c in message["tool_calls"]]
        assert why == "tool_calls" and ids[1] == "Zz9Zz9Zz9" and (ids[0] == old) == kept


def test_arguments_json_cannot_hold_are_content_not_a_call():
    """Python's json reads NaN and Infinity, which are not JSON: a call whose arguments hold one would reach the client
    as arguments it cannot parse, so the answer is content, as pythonic's and qwen3_coder's are (the stream sent
    the call as drawn, as any call that breaks after it began: the whole answer's response is what differs)."""
    for kind, text in ((Hermes, '<tool_call>{"name": "w", "arguments": {"x": NaN}}</tool_call>'),
                       (Llama3Json, '{"name": "w", "parameters": {"x": [Infinity]}}'),
                       (Mistral, '[TOOL_CALLS][{"name": "w", "arguments": {"x": -Infinity}}]'),
                       (Mistral, '[TOOL_CALLS]w[ARGS]{"x": NaN}')):
        assert kind().extract(text) == (text, [])
    # (past 4300 digits Python's int refuses the number: content too; a float's digits are not limited)
    # (and a float past a double's range, read as inf; past 4300 digits Python's int refuses the number)
    for text in ('<tool_call>{"name": "w", "arguments": {"x": 1e400}}</tool_call>',
                 '<tool_call>{"name": "w", "arguments": {"x": ' + "7" * 4400 + "}}</tool_call>"):
        assert Hermes().extract(text) == (text, [])
    assert Hermes().extract('<tool_call>{"name": "w", "arguments": {"x": 1e300}}</tool_call>')[1] == [
        ("w", '{"x": 1e+300}')]


def test_a_call_that_names_itself_or_gives_its_arguments_twice_is_content():
    """JSON's dict keeps a repeated key's last value, while the stream sent the first name it read, and each
    arguments object as a call of its own: which the model meant is not known, so the answer is content (streamed,
    what was sent stays sent). A key repeated inside the arguments is the arguments' own (the last kept, as the
    client's JSON reads the streamed text)."""
    for kind, text in (
            (Hermes, '<tool_call>{"name": "w", "arguments": {"a": 1}, "name": "add"}</tool_call>'),
            (Hermes, '<tool_call>{"name": "w", "arguments": {"a": 1}, "arguments": {"a": 2}}</tool_call>'),
            (Llama3Json, '{"name": "w", "parameters": {"a": 1}, "arguments": {"a": 2}}'),
            (Mistral, '[TOOL_CALLS][{"name": "w", "arguments": {}, "name": "add"}]')):
        assert kind().extract(text) == (text, [])
    text = '<tool_call>{"name": "w", "arguments": {"a": 1, "a": 2}}</tool_call>'
    assert Hermes().extract(text) == (None, [("w", '{"a": 2}')])
    (_, name, args), = streamed(Hermes(), text, [3])[1].values()
    assert name == "w" and json.loads(args) == {"a": 2}


def test_json_nested_to_just_within_pythons_limit_is_content_not_a_crash():
    """Llama 3's objects are read by raw_decode and written again by json.dumps, which recurses deeper: arguments
    nested just within the limit for the first were past it for the second (a RecursionError out of the server)."""
    import sys

    for depth in range(sys.getrecursionlimit() + 10):
        text = '{"name": "f", "parameters": {"a": ' + "[" * depth + "]" * depth + "}}"
        content, calls = Llama3Json().extract(text)  # (a call, or content where too deep: never an error)
        assert (content, [n for n, _ in calls]) in ((None, ["f"]), (text, []))


def test_required_calls_nested_past_pythons_limit_are_content_not_a_crash():
    """"required"'s grammar lets a tool whose parameters are a bare object draw any JSON, nested as deep as the
    tokens allow: past Python's limit the text is content (it was a RecursionError out of the server)."""
    from tritongpt.train.serve import tool_message

    tools = {"choice": "required", "parser": None, "parallel": True}
    for text in ('[{"name": "f", "parameters": {"a": ' + "[" * 5000 + "]" * 5000 + "}}]",
                 '[{"name": "f", "parameters": {"a": NaN}}]'):
        assert tool_message(tools, text, "length") == ({"role": "assistant", "content": text}, "length")
    message, why = tool_message(tools, '[{"name": "f", "parameters": {"a": [[1]]}}]', "stop")
    assert why == "tool_calls" and message["tool_calls"][0]["function"]["arguments"] == '{"a": [[1]]}'


# (pieces a model may write: each family's markers, JSON's punctuation, values JSON cannot hold, arguments given as a
# string; and calls in each family's syntax, with such a value, a key repeated or another beside)
PIECES = ["<tool_call>", "</tool_call>", "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]a1B2c3D4e", "<|python_tag|>",
          "<function=add>", "<function=", "</function>", "<parameter=a>", "</parameter>", "{", "}", "[", "]", '"',
          "\\", ":", ",", "; ", "\n", '"name": ', '"arguments": ', '"parameters": ', '"add"', "7", "NaN", "1e400",
          '"\\ud800"', "add(a=7)", "'", "é", '{"name": "add", "arguments": "{\\"a\\": 7}"}']
VALUES = ["7", '"x"', "[1, {}]", "NaN", "-Infinity", "1e400", '"\\ud800"', '"</tool_call>"', "null"]
EXTRA = ["", ', "name": "w"', ', "arguments": {"a": 8}', ', "parameters": {}', ', "x": 7', ', "a": 7']
FAMILY = {Hermes: "<tool_call>{}</tool_call>", Llama3Json: "{}", Mistral: "[TOOL_CALLS][{}]", Pythonic: "[{}]",
          Qwen: "<tool_call>{}</tool_call>"}


def family_call(kind, value, extra):
    """A call of add in kind's syntax, the value its argument a's, an extra key after its arguments (JSON's)."""
    if kind is Pythonic:
        return f"[add(a={value})]"
    if kind is Qwen:
        return f"<tool_call><function=add><parameter=a>{value}</parameter></function></tool_call>"
    key = "parameters" if kind is Llama3Json else "arguments"
    return FAMILY[kind].replace("{}", f'{{"name": "add", "{key}": {{"a": {value}}}{extra}}}', 1)


def not_json(constant):
    raise AssertionError(f"{constant} is not JSON")


def test_any_text_is_content_or_calls_whole_and_streamed_alike():
    """A model may write anything: no text makes a parser raise; an answer with no call is all its text as content,
    whole and streamed (a stream that sent none); where the whole answer has calls, the stream sent the same
    content and calls (their arguments the same strict JSON), cut anywhere."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    noise = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=3)), max_size=8).map("".join)

    @st.composite
    def answers(draw):
        kind = draw(st.sampled_from(list(FAMILY)))
        calls = st.builds(family_call, st.just(kind), st.sampled_from(VALUES), st.sampled_from(EXTRA))
        return kind, draw(st.lists(st.one_of(noise, calls), max_size=3).map("".join))

    @settings(max_examples=150, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(answers(), st.lists(st.integers(1, 9), min_size=1, max_size=4))
    def check(answer, sizes):
        kind, text = answer
        content, calls = kind().extract(text)
        s_content, s_calls = streamed(kind(), text, sizes)
        if calls:
            assert s_content == (content or "")
            assert [(n, json.loads(a)) for _, n, a in s_calls.values()] == [(n, json.loads(a)) for n, a, *_ in calls]
            for _, a, *_ in calls:  # (strict JSON: no NaN or Infinity)
                assert isinstance(json.loads(a, parse_constant=not_json), dict)
        else:
            assert content == text
            if not s_calls:
                assert s_content == text

    check()
