"""serve --reasoning-parser (train/reasoning.py, vLLM's): a reasoning model's chat answer split into
message.reasoning (its thought, between <think> and </think>) and content, streamed as delta.reasoning and
delta.content; structured outputs and tool calls hold the answer after </think>; chat_template_kwargs reach the
template (Qwen3's enable_thinking false: the prompt ends the thought, the answer is all content). The parsers on texts
(pure Python), then a tiny Qwen3-shaped folder whose tokenizer has the think tokens, served on both servers."""
import random

import pytest

from tritongpt.errors import UserError
from tritongpt.train.reasoning import PARSERS, Qwen3, ReasoningStream, Thinking, answer


class Tok:
    """The two think tokens and single characters: what the parsers ask of a tokenizer."""
    ids = {"<think>": 1, "</think>": 2}

    def encode(self, text, allowed_special="none_raise"):
        return [self.ids[text]] if text in self.ids else [ord(c) + 10 for c in text]

    def decode(self, ids):
        names = {v: k for k, v in self.ids.items()}
        return "".join(names.get(i) or chr(i - 10) for i in ids)


ANSWERS = [  # (text, reasoning, content)
    ("<think>\nLet me see: 2+2.\n</think>\n\nIt is 4.", "\nLet me see: 2+2.\n", "\n\nIt is 4."),
    ("Thought first (R1's prompt ends in <think>)</think>Answer", "Thought first (R1's prompt ends in <think>)",
     "Answer"),
    ("  <think>cut short while thinking <", "cut short while thinking <", None),
    ("<think></think>", "", None),
    ("no markers at all", "no markers at all", None),
    ("", "", None),
]


@pytest.mark.parametrize("text, reasoning, content", ANSWERS)
def test_answers_split_whole_and_streamed_cut_anywhere(text, reasoning, content):
    parser = Thinking(Tok(), "deepseek_r1")
    assert answer(parser, text, True) == (reasoning, content)
    assert answer(parser, text, False) == (None, text)  # (a prompt that ended the thought: all content)
    rng = random.Random(len(text))
    for sizes in ([1], [2, 3], [max(1, len(text))], [rng.randint(1, 7) for _ in range(30)]):
        stream, r, c, i, k = ReasoningStream(parser, True), "", "", 0, 0
        while i < len(text):
            piece = text[i:i + sizes[k % len(sizes)]]
            i, k = i + len(piece), k + 1
            dr, dc = stream.add(piece)
            assert dr != "" and dc != ""  # (nothing sent empty)
            r, c = r + (dr or ""), c + (dc or "")
        r += stream.finish() or ""
        assert (r, c or None) == (reasoning, content), sizes


def test_the_prompt_and_the_switch_decide_whether_the_answer_thinks():
    q3, r1 = Qwen3(Tok(), "qwen3"), Thinking(Tok(), "deepseek_r1")
    assert r1.thinks([5, 1, 6]) and r1.thinks([7, 8]) and not r1.thinks([1, 9, 2, 11])
    assert r1.thinks([2, 1]) and r1.thinks([5], {"enable_thinking": False})  # (R1 has no switch)
    assert not q3.thinks([5], {"enable_thinking": False}) and q3.thinks([5], {"enable_thinking": True})
    assert sorted(PARSERS) == ["deepseek_r1", "openai_gptoss", "qwen3"]  # (harmony's: test_harmony.py)


def test_a_tokenizer_without_think_tokens_is_refused_by_name():
    class Plain(Tok):
        ids = {"<think>": 1}
    with pytest.raises(UserError, match="--reasoning-parser qwen3: the tokenizer has no </think> token"):
        Qwen3(Plain(), "qwen3")


def test_any_text_splits_alike_whole_and_streamed_cut_anywhere():
    """A model may write the think tags anywhere, unbalanced, repeated or cut: the stream's reasoning and content
    add up to the whole answer's split, nothing sent empty, and no text lost (the reasoning, the tags it meant and
    the content are the answer)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    pieces = ["<think>", "</think>", "<", "</", "<th", "</thi", "k>", " ", "\n", "a", "é"]
    text = st.lists(st.one_of(st.sampled_from(pieces), st.text(max_size=3)), max_size=12).map("".join)

    @settings(max_examples=150, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(text, st.lists(st.integers(1, 9), min_size=1, max_size=4), st.booleans())
    def check(text, sizes, thinks):
        parser = Thinking(Tok(), "deepseek_r1")
        reasoning, content = answer(parser, text, thinks)
        stream, r, c, i, k = ReasoningStream(parser, thinks), "", "", 0, 0
        while i < len(text):
            piece = text[i:i + sizes[k % len(sizes)]]
            i, k = i + len(piece), k + 1
            dr, dc = stream.add(piece)
            assert dr != "" and dc != ""
            r, c = r + (dr or ""), c + (dc or "")
        r += stream.finish() or ""
        assert (r if thinks else None, c or None) == (reasoning, content or None)
        if thinks:  # (what is not the reasoning is the tags and the content)
            assert text.lstrip().removeprefix("<think>").startswith(reasoning) or text.startswith(reasoning)
            assert content is None or text.endswith(content)

    check()


CALL = "<tool_call>\n<function=add>\n<parameter=a>\n3\n</parameter>\n</function>\n</tool_call>"
CALLS = [  # (text, qwen3's (reasoning, content)): a tool call in the thought ends it (Qwen3.5's, vLLM's rule)
    ("Let me add.\n" + CALL, ("Let me add.\n", CALL)),
    ("<think>Let me add.\n" + CALL, ("Let me add.\n", CALL)),  # (the <think> written in the answer, Qwen3's)
    (CALL, (None, CALL)),  # (nothing thought first: no reasoning, vLLM's)
    ("<tool_call> <function name=\"add\">", (None, "<tool_call> <function name=\"add\">")),  # (vLLM's tag: [\s=])
    ("Let me add.</think>\n\n" + CALL, ("Let me add.", "\n\n" + CALL)),  # (</think> first: as without the rule)
    ("I write <tool_call> tags; " + CALL, ("I write <tool_call> tags; ", CALL)),  # (a mention, then the call)
    ('hermes: <tool_call>\n{"name": "add"}</tool_call>', ('hermes: <tool_call>\n{"name": "add"}</tool_call>', None)),
    ("cut short <tool_call>\n<function", ("cut short <tool_call>\n<function", None)),  # (no tag yet: thought)
    ("<tool_call><functions=x>", ("<tool_call><functions=x>", None)),
    ("a" + CALL + "b</think>c", ("a", CALL + "b</think>c")),  # (ours: the first end, whole and streamed alike)
]


def joined(parser, text, cuts, calls=True) -> tuple:
    """The stream's (reasoning, content) of text cut at cuts, checking nothing is sent empty."""
    stream, r, c = ReasoningStream(parser, True, calls), "", ""
    for a, b in zip([0, *cuts], [*cuts, len(text)]):
        dr, dc = stream.add(text[a:b])
        assert dr != "" and dc != ""
        r, c = r + (dr or ""), c + (dc or "")
    return r + (stream.finish() or ""), c


@pytest.mark.parametrize("text, split", CALLS)
def test_qwen3s_thought_ends_at_a_tool_call_whole_and_streamed_every_split(text, split):
    """qwen3: a <tool_call> whose function tag follows ends the thought without </think>, the call the content
    (where the tool parser finds it); every way of cutting the text in two or three deltas adds up to the whole
    answer's split. deepseek_r1, and qwen3 where a grammar waits for </think> (calls False), have no such rule."""
    q3, r1 = Qwen3(Tok(), "qwen3"), Thinking(Tok(), "deepseek_r1")
    assert answer(q3, text, True) == split
    plain = answer(r1, text, True)
    assert answer(q3, text, True, calls=False) == plain and plain[0] == text.partition("</think>")[0].removeprefix(
        "<think>")
    n = len(text)
    for cuts in [[i] for i in range(1, n)] + [[i, j] for i in range(1, n, 3) for j in range(i + 1, n)]:
        r, c = joined(q3, text, cuts)
        assert (r or None, c or None) == (split[0] or None, split[1]), cuts
    for cuts in ([], [1], list(range(1, n))):
        assert joined(q3, text, cuts, calls=False) == (plain[0], plain[1] or "")


def test_qwen3s_call_in_the_thought_is_found_by_the_qwen3_coder_tool_parser():
    """The content a tool call ends a thought at is what the tool parser reads: the call, no content before it."""
    from tritongpt.train.tool_calls import Qwen3Coder

    tools = [{"function": {"name": "add", "parameters": {"properties": {"a": {"type": "integer"}}}}}]
    for text, _ in CALLS[:3]:
        reasoning, content = answer(Qwen3(Tok(), "qwen3"), text, True)
        assert Qwen3Coder(tools).extract(content) == (None, [("add", '{"a": 3}')])


# -- served ----------------------------------------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")
# ChatML, short, with Qwen3's switch: enable_thinking false writes an empty thought into the prompt
TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}")
USER = [{"role": "user", "content": "the cat sat"}]
SEED = 3  # (an answer that thinks, then answers: /v1/responses' test)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A Qwen3-shaped tokenizer (the think tokens plain added tokens, as Qwen3's) and a tiny random model."""
    from parity import hf_llama
    from test_chat_template import SPECIALS
    from test_hf_tokenizer import build_tokenizer

    path = tmp_path_factory.mktemp("reasoning") / "qwen3"
    tok = build_tokenizer("qwen2")
    tok.add_special_tokens(SPECIALS)
    tok.add_tokens(["<think>", "</think>"])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                                bos_token="<|begin_of_text|>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(path)
    hf_llama(path, len(fast), eos=fast.convert_tokens_to_ids("<|im_end|>"), context=128, kind="qwen2")
    return path, transformers.AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module", params=["engine", "max-batch-1"])
def both(request, folder):
    from test_tool_calls import started

    path, theirs = folder
    server = started(path, "--reasoning-parser", "qwen3", *(["--max-batch", "1"] if request.param != "engine" else []))
    # (a random model draws </think> now and then: the thought ends early in most answers)
    yield server, theirs, {str(theirs.convert_tokens_to_ids("</think>")): 6}
    server.shutdown()
    server.server_close()


def ask(server, bias, **fields):
    from test_serve import call

    return call(server, "/v1/chat/completions", {"messages": USER, "max_tokens": 16, "temperature": 1.0,
                                                 "logit_bias": bias, **fields})


def streamed(server, bias, **fields):
    """{index: (reasoning, content)} a stream sends, and the last chunks' finish reasons."""
    from test_serve import events

    status, text = ask(server, bias, stream=True, **fields)
    assert status == 200, text
    out, finish = {}, {}
    for k in events(text):
        c = k["choices"][0]
        r, t = out.get(c["index"], ("", ""))
        out[c["index"]] = (r + (c["delta"].get("reasoning") or ""), t + (c["delta"].get("content") or ""))
        finish[c["index"]] = c["finish_reason"]
    return out, finish


def test_the_thought_apart_whole_and_streamed(both, monkeypatch):
    """The same seeded draw with and without the parser: its text split at </think>, the thought as reasoning; the
    stream's deltas add up to the whole answer's parts."""
    server, theirs, bias = both
    plain = {}
    with monkeypatch.context() as m:
        m.setattr(server.app, "reasoning_parser", None)
        status, body = ask(server, bias, n=3, seed=7)
        assert status == 200, body
        plain = [c["message"]["content"] for c in body["choices"]]
        assert "reasoning" not in body["choices"][0]["message"] and "completion_tokens_details" not in body["usage"]
    status, body = ask(server, bias, n=3, seed=7)
    assert status == 200, body
    split = [(c["message"]["reasoning"], c["message"]["content"]) for c in body["choices"]]
    assert list(body["choices"][0]["message"]) == ["role", "reasoning", "content"]
    assert split == [answer(server.app.reasoning_parser, t, True) for t in plain]
    assert any(r and c for r, c in split)  # (some answers think, then answer)
    # OpenAI's usage detail: each answer's tokens through its </think> (all of them where it drew none)
    ids = [[int(t["token"].split(":")[1]) for t in c["logprobs"]["content"]] for c in ask(
        server, bias, n=3, seed=7, logprobs=True, return_tokens_as_token_ids=True)[1]["choices"]]
    end = theirs.convert_tokens_to_ids("</think>")
    assert body["usage"]["completion_tokens_details"] == {
        "reasoning_tokens": sum(row.index(end) + 1 if end in row else len(row) for row in ids)}
    got, _ = streamed(server, bias, n=3, seed=7)
    assert [got[i] for i in range(3)] == [(r or "", c or "") for r, c in split]
    # vLLM's include_reasoning false: the thought left out, whole and streamed; the answer the same
    body = ask(server, bias, n=3, seed=7, include_reasoning=False)[1]
    assert [(c["message"]["reasoning"], c["message"]["content"]) for c in body["choices"]] == \
        [(None, c) for r, c in split]
    got, _ = streamed(server, bias, n=3, seed=7, include_reasoning=False)
    assert [got[i] for i in range(3)] == [("", c or "") for r, c in split]


def test_structured_outputs_hold_the_answer_after_the_thought(both):
    """vLLM's: the grammar wakes at </think>: the thought is free, the content what the regex allows, ended by the
    end of turn."""
    server, theirs, bias = both
    status, body = ask(server, bias, n=2, seed=3, max_tokens=40, structured_outputs={"regex": "[0-9]{3}"})
    assert status == 200, body
    for c in body["choices"]:
        m = c["message"]
        assert c["finish_reason"] == "stop" and m["reasoning"] is not None, c
        assert len(m["content"]) == 3 and m["content"].isdigit(), m
    got, finish = streamed(server, bias, n=2, seed=3, max_tokens=40, structured_outputs={"regex": "[0-9]{3}"})
    assert [got[i] for i in range(2)] == [(c["message"]["reasoning"], c["message"]["content"])
                                          for c in body["choices"]]


def test_enable_thinking_false_reaches_the_template_and_the_answer_is_content(both):
    """chat_template_kwargs go to the template (its prompt ends with an empty thought: /tokenize's ids are
    transformers' apply_chat_template(enable_thinking=False)'s) and the answer is all content."""
    from test_serve import call

    server, theirs, bias = both
    kwargs = {"enable_thinking": False}
    status, body = call(server, "/tokenize", {"messages": USER, "chat_template_kwargs": kwargs})
    assert status == 200, body
    assert body["tokens"] == theirs.apply_chat_template(USER, add_generation_prompt=True, enable_thinking=False,
                                                        return_dict=False)
    status, body = ask(server, bias, seed=1, chat_template_kwargs=kwargs)
    m = body["choices"][0]["message"]
    assert status == 200 and m["reasoning"] is None and m["content"], body
    assert streamed(server, bias, seed=1, chat_template_kwargs=kwargs)[0][0] == ("", m["content"])


def test_a_beam_searchs_thought_counts_as_reasoning_tokens(both):
    """use_beam_search with a reasoning parser: usage's reasoning_tokens are the beams' thought's tokens (a beam that
    drew no </think> thought all through: every completion token), not 0."""
    server, theirs, bias = both
    if server.app.engine is None:
        pytest.skip("a beam search runs outside the engine, the same on either server")
    status, body = ask(server, None, n=2, use_beam_search=True, max_tokens=4)
    assert status == 200, body
    assert all(c["message"]["content"] is None for c in body["choices"]), body  # (no beam ends its thought)
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": body["usage"]["completion_tokens"]}
    assert body["usage"]["completion_tokens"] == 8


@pytest.mark.parametrize("kwargs, says", [
    ([1], "'chat_template_kwargs' must be an object"),
    ({"tools": []}, "'chat_template_kwargs' may not set 'tools'"),
    ({"continue_final_message": True}, "may not set 'continue_final_message': it is no template variable"),
])
def test_bad_chat_template_kwargs_are_refused_by_name(both, kwargs, says):
    server, theirs, bias = both
    status, body = ask(server, bias, chat_template_kwargs=kwargs)
    assert status == 400 and body["error"]["param"] == "chat_template_kwargs" and says in body["error"]["message"]


def test_a_served_tokenizer_without_think_tokens_is_refused_at_start(tmp_path):
    """And a run prompted in tritongpt's own chat format has no template for chat_template_kwargs: refused by name."""
    from test_serve import serve_once, start, tiny_run

    run = tmp_path / "run"
    tiny_run(run, "chat")
    with pytest.raises(UserError, match="--reasoning-parser deepseek_r1: the tokenizer has no <think> token"):
        start(run, "--reasoning-parser", "deepseek_r1")
    status, body, _ = serve_once(run, "/tokenize", {"messages": USER, "chat_template_kwargs": {"enable_thinking": 0}})
    assert status == 400 and body["error"]["param"] == "chat_template_kwargs", body
    assert "tritongpt's plain-text chat format, not a Hugging Face chat template" in body["error"]["message"], body


def test_chat_template_kwargs_named_as_the_renderers_own_arguments_are_variables(both, monkeypatch):
    """A variable named as render's or tool_prompt's Python arguments (tokenizer, shown) is one more variable the
    template may read, and Jinja's render's (self: a template's own name there) is passed without a 500 from a clash
    of keyword arguments; the template's helpers (raise_exception, strftime_now) are refused by name, as its other
    own variables."""
    from test_serve import call
    from test_tool_calls import TOOLS_TEMPLATE, WEATHER

    server, theirs, bias = both
    monkeypatch.setattr(server.app.tok, "chat_template", TOOLS_TEMPLATE + "{{- shown ~ tokenizer }}")
    tools = [{"type": "function", "function": {"name": "get", "parameters": WEATHER}}]
    kwargs = {"tokenizer": "t", "shown": "s", "self": "f"}
    for fields in ({}, {"tools": tools}):
        status, body = call(server, "/tokenize", {"messages": USER, "chat_template_kwargs": kwargs, **fields})
        assert status == 200, body
        assert theirs.decode(body["tokens"]).endswith("<|im_start|>assistant\nst"), body
    status, body = call(server, "/tokenize", {"messages": USER, "chat_template_kwargs": {"raise_exception": 1}})
    assert status == 400 and "may not set 'raise_exception'" in body["error"]["message"], body


def test_chat_template_kwargs_may_set_a_folders_other_special_tokens(both, monkeypatch):
    """A folder's special tokens besides BOS and EOS (pad_token, a model's image_token) reach the template, and a
    request's chat_template_kwargs naming one set it, as vLLM passes them on to apply_chat_template's kwargs (which
    override special_tokens_map): not a 400."""
    from test_serve import call
    from test_tool_calls import TOOLS_TEMPLATE

    server, theirs, bias = both
    monkeypatch.setattr(server.app.tok, "chat_template", TOOLS_TEMPLATE + "{{- pad_token ~ '|' ~ image_token }}")
    monkeypatch.setattr(server.app.tok, "template_tokens", {"pad_token": "<pad>", "image_token": "<img>"})
    for kwargs, ends in ((None, "<pad>|<img>"), ({"pad_token": "P", "image_token": "I"}, "P|I")):
        status, body = call(server, "/tokenize", {"messages": USER, "chat_template_kwargs": kwargs})
        assert status == 200 and theirs.decode(body["tokens"]).endswith(ends), body


def test_a_chat_template_kwargs_value_the_template_cannot_use_is_a_400(both, monkeypatch):
    """The values reach the template as they are: one it fails on (gpt-oss's 'Reasoning: ' + reasoning_effort, given a
    number) is the request's 400 naming chat_template_kwargs and the template's error, not a 500."""
    from test_serve import call
    from test_tool_calls import TOOLS_TEMPLATE

    server, theirs, bias = both
    monkeypatch.setattr(server.app.tok, "chat_template", TOOLS_TEMPLATE + "{{- 'Reasoning: ' + reasoning_effort }}")
    status, body = call(server, "/tokenize", {"messages": USER, "chat_template_kwargs": {"reasoning_effort": "low"}})
    assert status == 200 and theirs.decode(body["tokens"]).endswith("Reasoning: low"), body
    for path, fields in (("/tokenize", {}), ("/v1/chat/completions", {"max_tokens": 1})):
        status, body = call(server, path, {"messages": USER, "chat_template_kwargs": {"reasoning_effort": 1}, **fields})
        assert status == 400 and body["error"]["param"] == "chat_template_kwargs", body
        assert "can only concatenate str" in body["error"]["message"], body


def test_the_thought_as_a_reasoning_item_on_v1_responses(both):
    """/v1/responses: chat's thought a reasoning item before the answer's message, whole and streamed alike; a
    continuation's prompt leaves the thought out (as templates drop earlier thoughts)."""
    from test_responses import typed
    from test_serve import call

    server, theirs, bias = both
    if server.app.engine is None:
        pytest.skip("the Responses layer is the same on either server (and this one is the slower)")
    chat = ask(server, bias, seed=SEED)[1]["choices"][0]["message"]
    assert chat["reasoning"] and chat["content"], chat
    body = {"input": "the cat sat", "max_output_tokens": 16, "temperature": 1.0, "logit_bias": bias, "seed": SEED}
    status, r = call(server, "/v1/responses", body)
    assert status == 200, r
    assert [(o["type"], o["content"][0]["text"]) for o in r["output"]] == [("reasoning", chat["reasoning"]),
                                                                           ("message", chat["content"])]
    assert r["usage"]["output_tokens_details"]["reasoning_tokens"] == \
        ask(server, bias, seed=SEED)[1]["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0
    events = typed(call(server, "/v1/responses", {**body, "stream": True})[1])
    kinds = [e["type"] for e in events]
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
    assert [(o["type"], o["content"]) for o in events[-1]["response"]["output"]] == [
        (o["type"], o["content"]) for o in r["output"]]
    status, r2 = call(server, "/v1/responses", {"previous_response_id": r["id"], "input": "on", "max_output_tokens": 1})
    messages = USER + [{"role": "assistant", "content": chat["content"]}, {"role": "user", "content": "on"}]
    assert r2["usage"]["input_tokens"] == call(server, "/tokenize", {"messages": messages})[1]["count"]


def test_masks_that_leave_out_the_thoughts_end_are_not_refused_for_the_grammars(both):
    """A grammar wakes at </think>: allowed_token_ids without it (nor an end token) never wake it, the answer runs
    to max_tokens as without one (a 200, finish length), not refused for the grammar's end; with </think> allowed
    and no end token, the 400 naming allowed_token_ids stands."""
    server, theirs, bias = both
    end, turn = theirs.convert_tokens_to_ids("</think>"), theirs.convert_tokens_to_ids("<|im_end|>")
    others = [t for t in range(len(theirs)) if t not in (end, turn, theirs.eos_token_id)]
    regex = {"regex": "[0-9]{3}"}
    status, body = ask(server, bias, max_tokens=6, allowed_token_ids=others, structured_outputs=regex)
    assert status == 200 and body["choices"][0]["finish_reason"] == "length", body
    status, body = ask(server, bias, max_tokens=6, allowed_token_ids=others + [end], structured_outputs=regex)
    assert status == 400 and body["error"]["param"] == "allowed_token_ids", body


@pytest.fixture(scope="module")
def calling(folder):
    """The folder served with qwen3 and the qwen3_coder tool parser, its model a Scripted stand-in (test_stream_text's:
    it draws the answer a test writes), its template one that takes tools."""
    from test_stream_text import Scripted
    from test_tool_calls import TOOLS_TEMPLATE, started

    path, theirs = folder
    server = started(path, "--max-batch", "1", "--reasoning-parser", "qwen3", "--enable-auto-tool-choice",
                     "--tool-call-parser", "qwen3_coder")
    server.app.tok.chat_template = TOOLS_TEMPLATE
    server.app.model = model = Scripted(len(theirs), theirs.convert_tokens_to_ids("<|im_end|>"))
    yield server, theirs, model
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("text, reasoning, content", [
    ("Let me add.\n" + CALL, "Let me add.\n", None), ("<think>Let me add.\n" + CALL, "Let me add.\n", None),
    (CALL, None, None),
    ("Let me add.</think>\n\n" + CALL, "Let me add.", "\n\n")])  # (</think> then the call: as before the rule)
def test_a_served_thought_that_ends_at_a_tool_call_is_a_call(calling, text, reasoning, content):
    """A Qwen3.5 answer that calls a tool from its thought (no </think>): the chat message's reasoning the thought,
    the call the qwen3_coder parser's, whole and streamed alike; /v1/responses' items a reasoning and a
    function_call."""
    from test_responses import typed
    from test_serve import call, events

    server, theirs, model = calling
    model.script = [theirs.encode(text, add_special_tokens=False)]
    assert theirs.decode(model.script[0]) == text
    tools = [{"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}}}}}]
    body = {"messages": USER, "tools": tools, "max_tokens": 80, "temperature": 0}
    status, whole = call(server, "/v1/chat/completions", body)
    assert status == 200, whole
    (choice,) = whole["choices"]
    message = choice["message"]
    assert choice["finish_reason"] == "tool_calls" and (message["reasoning"], message["content"]) == (reasoning, content)
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]] == [("add", '{"a": 3}')]
    chunks = [k["choices"][0] for k in events(call(server, "/v1/chat/completions", {**body, "stream": True})[1])
              if k["choices"]]
    assert "".join(k["delta"].get("reasoning") or "" for k in chunks) == (reasoning or "")
    assert "".join(k["delta"].get("content") or "" for k in chunks) == (content or "")
    assert chunks[-1]["finish_reason"] == "tool_calls"
    deltas = [d for k in chunks for d in k["delta"].get("tool_calls") or ()]
    assert deltas[0]["function"]["name"] == "add" and "".join(d["function"]["arguments"] for d in deltas) == '{"a": 3}'
    body = {"input": "the cat sat", "tools": [{"type": "function", **tools[0]["function"]}], "max_output_tokens": 80,
            "temperature": 0}
    status, r = call(server, "/v1/responses", body)
    assert status == 200, r
    want = [("reasoning", reasoning)] * (reasoning is not None) + [("message", content)] * (content is not None) + [
        ("function_call", "add")]
    assert [(o["type"], o["name"] if o["type"] == "function_call" else o["content"][0]["text"]) for o in r["output"]] \
        == want
    events_ = typed(call(server, "/v1/responses", {**body, "stream": True})[1])
    assert [o["type"] for o in events_[-1]["response"]["output"]] == [kind for kind, _ in want]


def test_where_a_grammar_waits_for_the_thoughts_end_a_call_in_the_thought_stays_thought(calling):
    """Structured outputs wake at the </think> token: a tool call written in the thought before it does not end the
    thought there (the parser keeps to the grammar's end), whole and streamed; the content is the grammar's."""
    from test_serve import call, events

    server, theirs, model = calling
    thought = "a<tool_call><function=f></function></tool_call>"
    model.script = [theirs.encode(thought + "</think>7", add_special_tokens=False)]
    body = {"messages": USER, "max_tokens": 90, "temperature": 0, "structured_outputs": {"regex": "[0-9]"}}
    status, whole = call(server, "/v1/chat/completions", body)
    assert status == 200, whole
    message = whole["choices"][0]["message"]
    assert (message["reasoning"], message["content"]) == (thought, "7"), message
    chunks = [k["choices"][0]["delta"] for k in events(call(server, "/v1/chat/completions",
                                                            {**body, "stream": True})[1]) if k["choices"]]
    assert ("".join(d.get("reasoning") or "" for d in chunks), "".join(d.get("content") or "" for d in chunks)) == \
        (thought, "7")
