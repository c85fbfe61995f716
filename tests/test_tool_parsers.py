"""The tool-call parsers of serve's "auto" tool choice (train/tool_calls.py, vLLM's --tool-call-parser): each
model family's syntax read whole (extract: a response) and as it grows (AutoStream: a stream cut anywhere gives the
same content and calls); answers that hold no call, or a broken one, stay content."""
import json
import random
import re

import pytest

from tritongpt.train.tool_calls import PARSERS, AutoStream, Hermes, Llama3Json, Mistral, held, scan_calls

W = {"city": "Oslo", "days": [1, 2], "note": 'a "}" and a ]'}
A = {"a": 7}
M = {"s": '\\"</tool_call> <tool_call>'}  # (the markers in a string, after an escaped backslash and quote)
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
    assert sorted(PARSERS) == ["hermes", "llama3_json", "mistral"]
    assert [PARSERS[n].keeps_specials for n in sorted(PARSERS)] == [True, False, True]


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
                       (Llama3Json, '{"name": "f", "parameters": ' + deep + "}")):
        assert kind().extract(text) == (text, [])
        assert streamed(kind(), text, [len(text)]) == (text, {})


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
