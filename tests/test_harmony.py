"""gpt-oss's harmony answers (serve --reasoning-parser openai_gptoss, --tool-call-parser openai; vLLM's): the analysis
channel the reasoning, the final channel (and commentary preambles) the content, each to=functions.NAME message a tool
call; whole and streamed alike, the text cut at every character. Pure text: the parsers read the decoded answer with
its special tokens kept."""
import json

import pytest

from tritongpt.errors import UserError
from tritongpt.train.reasoning import PARSERS as THINKING, Harmony, answer
from tritongpt.train.tool_calls import HARMONY_MARKERS, PARSERS, AutoStream, OpenAI, harmony_split


class Tok:
    """Harmony's marker tokens and single characters: what the parser asks of a tokenizer."""

    def __init__(self, markers=HARMONY_MARKERS):
        self.ids = {m: k for k, m in enumerate(markers)}

    def encode(self, text, allowed_special="none_raise"):
        return [self.ids[text]] if text in self.ids else [ord(c) + 100 for c in text]

    def decode(self, ids):
        names = {v: k for k, v in self.ids.items()}
        return "".join(names.get(i) or chr(i - 100) for i in ids)


A = "<|channel|>analysis<|message|>"
NEXT = "<|end|><|start|>assistant"
WEATHER = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}'
CASES = [  # (text, reasoning, content, [(name, arguments)])
    (A + "User asks 2+2. Easy." + NEXT + "<|channel|>final<|message|>It is 4.<|return|>",
     "User asks 2+2. Easy.", "It is 4.", []),
    (A + "Need the weather." + NEXT + WEATHER + "<|call|>", "Need the weather.", None,
     [("get_weather", '{"city": "Paris"}')]),
    (A + "Need the weather." + NEXT + WEATHER, "Need the weather.", None,  # (<|call|> a stop token, not in the text)
     [("get_weather", '{"city": "Paris"}')]),
    (A + "Two cities." + NEXT + "<|channel|>commentary<|message|>Checking both." + NEXT + WEATHER + "<|call|>"
     "<|start|>assistant to=functions.get_time<|channel|>commentary json<|message|>{\"tz\":  \"CET\"}<|call|>",
     "Two cities.", "Checking both.", [("get_weather", '{"city": "Paris"}'), ("get_time", '{"tz": "CET"}')]),
    ("plain text, no harmony markers", None, "plain text, no harmony markers", []),
    (A + "a" + NEXT + "<|channel|>secret<|message|>dropped" + NEXT + "<|channel|>final<|message|>b < | c <|end",
     "a", "b < | c <|end", []),  # (an unknown channel dropped; a body spelling a marker's start, cut short)
    (A + "think" + NEXT + "<|channel|>analysis<|message|>again" + NEXT + "<|channel|>final<|message|>x<|end|>",
     "think\nagain", "x", []),  # (messages of one kind "\n"-joined: vLLM's whole answer)
    (A + "cut short while thinking", "cut short while thinking", None, []),
    (A + "r" + NEXT + "<|channel|>commentary to=functions.f<|message|>{not json<|call|>", "r", None,
     [("f", "{not json")]),  # (vLLM's: arguments that do not parse are kept as written)
    (A + "r" + NEXT + "<|channel|>commentary to=browser.search<|message|>{}<|call|><|start|>functions.f to=assistant"
     "<|channel|>commentary<|message|>a tool's answer" + NEXT + "<|channel|>final<|message|>ok<|return|>",
     "r", "ok", []),  # (a built-in tool's call and another role's message: neither text nor call)
]


def same_arguments(got, want):
    try:
        return json.loads(got) == json.loads(want)
    except ValueError:
        return got == want


@pytest.mark.parametrize("text, reasoning, content, calls", CASES)
def test_whole_answers_split_into_reasoning_content_and_calls(text, reasoning, content, calls):
    assert answer(Harmony(Tok(), "openai_gptoss"), text, True) == (reasoning, content)
    assert OpenAI().extract(text) == (content, calls)


def pieces_at(text):
    """The text cut once at every character boundary, and into single characters."""
    return [[text[:i], text[i:]] for i in range(1, len(text))] + [list(text)]


@pytest.mark.parametrize("text, reasoning, content, calls", CASES)
def test_streams_cut_at_every_character_join_to_the_whole_answer(text, reasoning, content, calls):
    parser = Harmony(Tok(), "openai_gptoss")
    for pieces in pieces_at(text):
        stream, r, c = parser.stream(True), "", ""
        for dr, dc in [stream.add(p) for p in pieces] + [stream.ends()]:
            assert dr != "" and dc != ""  # (nothing sent empty)
            r, c = r + (dr or ""), c + (dc or "")
        assert (r or None, c or None) == (reasoning, content), pieces
        tools, c, got = AutoStream(OpenAI()), "", {}
        for dc, deltas in [tools.add(p) for p in pieces] + [tools.finish()]:
            c += dc or ""
            for d in deltas:
                if "id" in d:  # (a call's first delta: its id and name, once, in order)
                    assert d["index"] == len(got) and d["id"].startswith("chatcmpl-tool-")
                    got[d["index"]] = [d["function"]["name"], ""]
                got[d["index"]][1] += d["function"]["arguments"]
        assert c == (content or ""), pieces
        assert [n for n, _ in got.values()] == [n for n, _ in calls], pieces
        assert all(same_arguments(a, w) for (_, a), (_, w) in zip(got.values(), calls)), pieces


def test_a_stream_holds_a_header_and_a_markers_start_until_decided():
    stream = Harmony(Tok(), "openai_gptoss").stream(True)
    assert stream.add("<|channel|>analy") == (None, None)  # (a header: which channel is not known yet)
    assert stream.add("sis<|message|>Hm <|") == ("Hm ", None)  # ("<|" may begin <|end|>)
    assert stream.add("end|><|start|>assistant<|channel|>final<|message|>Yes") == (None, "Yes")
    assert stream.ends() == (None, None)
    plain = Harmony(Tok(), "openai_gptoss").stream(True)
    assert plain.add("no markers") == (None, None) and plain.ends() == (None, "no markers")  # (content once whole)


class _Counted(str):
    """A text that counts the characters its find searches (a search that fails searched to the end)."""
    searched = 0

    def find(self, sub, start=0, end=None):
        at = super().find(sub, start)
        _Counted.searched += (at + len(sub) if at >= 0 else len(self)) - start
        return at


def test_many_messages_are_read_in_linear_time():
    """Each body searched for all three end markers to the text's end where one never comes again (a <|return|>
    where every message ends <|end|>): quadratic in the answer's length (1 MB of messages: half a minute). The
    characters searched stay a few times the text's, whole and growing alike, and the messages are all read."""
    from tritongpt.train.tool_calls import harmony

    unit = "<|start|>assistant<|channel|>analysis<|message|>hmm<|end|>"
    text = _Counted("<|channel|>final<|message|>ok<|end|>" + unit * 2000)
    for final in (True, False):
        _Counted.searched = 0
        messages = harmony(text, final)
        assert len(messages) == 2001 and messages[-1].body == "hmm" and messages[-1].done
        assert _Counted.searched <= 6 * len(text), _Counted.searched / len(text)
    assert harmony_split(str(text), True)[:2] == ("\n".join(["hmm"] * 2000), "ok")


def test_a_long_answer_streams_in_linear_time():
    """Each chunk re-split the answer so far (harmony_split of the whole text): quadratic, 40k characters in
    4-character chunks took 0.44 s. Read chunk by chunk, a chunk's work does not grow with the answer: the last
    chunks take about as long as the first (re-read, ten times and more), and the answer comes whole, the
    reasoning's and the tool parser's streams alike. (Each block of chunks timed, the fastest of the first and of the
    last five compared, the garbage collector off: a collection or another process's turn lands in one block.)"""
    import gc
    import time

    think, say = "hmm, " * 200, "so it is. " * 6000
    text = A + think + NEXT + "<|channel|>final<|message|>" + say + "<|return|>"
    pieces = [text[i:i + 4] for i in range(0, len(text), 4)]
    blocks = [pieces[i:i + 200] for i in range(0, len(pieces), 200)]
    for stream, end, want in ((Harmony(Tok(), "openai_gptoss").stream(True), "ends", [think, say]),
                              (AutoStream(OpenAI()), "finish", [say, []])):  # (content, tool_calls deltas)
        got, took = [], []
        gc.disable()
        try:
            for block in blocks:
                start = time.perf_counter()
                got += [stream.add(p) for p in block]
                took.append(time.perf_counter() - start)
        finally:
            gc.enable()
        got.append(getattr(stream, end)())
        first, last = min(took[2:7]), min(took[-6:-1])  # (both within the final message's body)
        assert last < 2 * first, f"the last chunks took {last / first:.1f} times the first's"
        joined = ["".join(d or "" for d in ds) if isinstance(w, str) else [x for d in ds for x in d]
                  for ds, w in zip(zip(*got), want)]
        assert joined == want


def test_the_parsers_are_named_as_vllm_names_them_and_need_the_marker_tokens():
    assert "openai_gptoss" in THINKING and PARSERS["openai"] is OpenAI
    assert OpenAI.keeps_specials and OpenAI.markup and Harmony.markup and Harmony.end_id is None
    parser = Harmony(Tok(), "openai_gptoss")
    assert parser.thinks([5, 6]) and sorted(parser.ids) == list(range(len(HARMONY_MARKERS)))
    with pytest.raises(UserError, match=r"openai_gptoss: the tokenizer has no <\|call\|> token"):
        Harmony(Tok([m for m in HARMONY_MARKERS if m != "<|call|>"]), "openai_gptoss")


def test_serves_tool_message_reads_harmony_calls_and_content():
    """serve's "auto" tool message: the calls (finish "tool_calls"), the content the final channel's, never the raw
    markup, also where the answer calls nothing; special tokens kept for the parser (vLLM's adjust_request)."""
    from tritongpt.train.serve import sampling_settings, tool_message

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    s = sampling_settings({"messages": [{"role": "user", "content": "hi"}], "tools": tools}, "chat", ["m"], OpenAI())
    assert s["skip_special_tokens"] is False and s["tools"]["choice"] == "auto"
    message, finish = tool_message(s["tools"], CASES[3][0], "stop")
    assert finish == "tool_calls" and message["content"] == "Checking both."
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]] == CASES[3][3]
    message, finish = tool_message(s["tools"], CASES[0][0], "stop")
    assert (message, finish) == ({"role": "assistant", "content": "It is 4."}, "stop")
    assert harmony_split(CASES[0][0], True)[1] == "It is 4."


# -- served ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A ChatML tokenizer with harmony's marker tokens (special, as gpt-oss's) and a Scripted stand-in model (it
    draws the answer a test writes), served with both harmony parsers."""
    transformers = pytest.importorskip("transformers")
    from parity import hf_llama
    from test_chat_template import SPECIALS
    from test_hf_tokenizer import build_tokenizer
    from test_stream_text import Scripted
    from test_tool_calls import TOOLS_TEMPLATE, started

    path = tmp_path_factory.mktemp("harmony") / "gptoss"
    tok = build_tokenizer("qwen2")
    tok.add_special_tokens(SPECIALS + list(HARMONY_MARKERS))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")
    fast.chat_template = TOOLS_TEMPLATE
    fast.save_pretrained(path)
    hf_llama(path, len(fast), eos=fast.convert_tokens_to_ids("<|im_end|>"), context=512, kind="qwen2")
    theirs = transformers.AutoTokenizer.from_pretrained(path)
    server = started(path, "--max-batch", "1", "--reasoning-parser", "openai_gptoss", "--enable-auto-tool-choice",
                     "--tool-call-parser", "openai")
    server.app.model = model = Scripted(len(theirs), theirs.convert_tokens_to_ids("<|im_end|>"))
    model.config.context_length = 512  # (the folder's: a multi-call answer is longer than the stand-in's 128)
    yield server, theirs, model
    server.shutdown()
    server.server_close()


TOOLS = [{"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
         for name in ("get_weather", "get_time")]


@pytest.mark.parametrize("case", [0, 1, 3, 5])
def test_served_answers_whole_and_streamed_alike(served, case):
    """Through serve's handler: reasoning, content and calls (finish "tool_calls") of the whole answer; the stream's
    deltas join to them; with tools "none" the same reasoning and content, no call."""
    from test_serve import call, events

    server, theirs, model = served
    text, reasoning, content, calls = CASES[case]
    model.script = [theirs.encode(text, add_special_tokens=False)]
    assert theirs.decode(model.script[0]) == text
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS, "max_tokens": 200, "temperature": 0}
    for choice in ("auto", "none"):
        status, whole = call(server, "/v1/chat/completions", {**body, "tool_choice": choice})
        assert status == 200, whole
        (c,) = whole["choices"]
        m = c["message"]
        want = calls if choice == "auto" else []
        assert (m["reasoning"], m["content"]) == (reasoning, content)
        assert [(t["function"]["name"], t["function"]["arguments"]) for t in m.get("tool_calls") or []] == want
        assert c["finish_reason"] == ("tool_calls" if want else "stop")
        status, text_ = call(server, "/v1/chat/completions", {**body, "tool_choice": choice, "stream": True})
        chunks = [k["choices"][0] for k in events(text_) if k["choices"]]
        assert "".join(k["delta"].get("reasoning") or "" for k in chunks) == (reasoning or "")
        assert "".join(k["delta"].get("content") or "" for k in chunks) == (content or "")
        got = {}
        for d in [d for k in chunks for d in k["delta"].get("tool_calls") or ()]:
            got.setdefault(d["index"], [d["function"].get("name"), ""])[1] += d["function"]["arguments"]
        assert [n for n, _ in got.values()] == [n for n, _ in want]
        assert all(same_arguments(a, w) for (_, a), (_, w) in zip(got.values(), want))
        assert chunks[-1]["finish_reason"] == ("tool_calls" if want else "stop")


def test_structured_outputs_are_refused_with_harmony_by_name(served):
    from test_serve import call

    server, _, _ = served
    status, body = call(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                         "structured_outputs": {"regex": "[0-9]"}})
    assert status == 400 and body["error"]["param"] == "structured_outputs", body
    assert "--reasoning-parser openai_gptoss" in body["error"]["message"]
    status, body = call(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                         "tools": TOOLS, "tool_choice": "required"})
    assert status == 400 and body["error"]["param"] == "tools", body
