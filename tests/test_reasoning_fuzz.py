"""serve --reasoning-parser against vLLM's own rules (vllm/reasoning/basic_parsers.py BaseThinkingReasoningParser,
deepseek_r1_reasoning_parser.py, qwen3_reasoning_parser.py; the serving layer's prompt_is_reasoning_end), written
out below as a reference: random answers of think tokens and text pieces, cut into deltas of one to three tokens,
through our whole split, our stream, and a served chat answer, its stream and /v1/responses.

Where vLLM's non-streamed and streamed answers agree, and keep every character the model wrote, ours is theirs
(reasoning and content, "" and null alike: vLLM's message has content null where nothing follows </think>,
reasoning "" for an empty thought). Where they do not, vLLM is odd and ours keeps to one rule, whole and streamed:
  - text before a <think> that is not the answer's start (after blanks): vLLM's whole answer partitions at the first
    <think> anywhere and drops what came before it (and a <think> after </think> drops the thought and the answer
    both); its stream keeps that text, less the <think> token when it is a delta alone (qwen3's drops the text that
    shares the <think>'s delta). Ours: the reasoning up to
    </think> as written, the content after it as written.
  - a prompt that ended the thought (prompt_is_reasoning_end): vLLM's stream sends all content, its whole answer
    still runs extract_reasoning (deepseek_r1: all reasoning; qwen3 enable_thinking false: a </think> in the
    answer still splits it). Ours: all content, as the stream.
  - vLLM's stream drops a think token that is a delta alone and keeps one that shares a delta with text (a second
    </think> lost, or "<think>" in the reasoning): ours, written on text, does not depend on the deltas.
  - qwen3's tool call in the thought (newest vLLM's Qwen3.5 rule, qwen3_reasoning_parser.py: a <tool_call> token
    followed by a function tag ends the thought without </think>): vLLM's whole answer reads the first <tool_call>
    only (a mention of one before the call: all reasoning) and a </think> anywhere before it (a </think> after the
    call: the call in the thought); its stream ends the thought at any such call, and splits a later </think>'s
    delta again; a <tool_call> it holds back whose tag never comes is dropped. Ours: the first of </think> and a
    call ends the thought, whole and streamed alike."""
import re
import random

import pytest
import torch

from tritongpt.train.reasoning import Qwen3, ReasoningStream, Thinking, answer

# the think tokens' ids, and qwen3's <tool_call> and <function (one token each, as in Qwen3's vocabulary: vLLM's
# lookahead for a function tag reads the 8 tokens after a <tool_call>); a text piece's ids are its characters'
START, END, TOOL, FUNC = 1, 2, 3, 4
NAMES = {START: "<think>", END: "</think>", TOOL: "<tool_call>", FUNC: "<function"}
PIECES = ["a", "the cat", " ", "\n", "<", "</th", "k>", "é"]
CALLING = [[TOOL, ord("\n"), FUNC, ord("=")], [FUNC, ord("=")], [FUNC], [ord("=")], [ord(c) for c in "<func"]]
# (qwen3's calls: whole, cut, or a <tool_call> a mere mention)


def spelled(ids) -> str:
    return "".join(NAMES.get(t) or chr(t) for t in ids)


class Tok:
    def encode(self, text, allowed_special="none_raise"):
        return [k for k, v in NAMES.items() if v == text] or [ord(c) for c in text]

    def decode(self, ids):
        return spelled(ids)


# -- vLLM's rules ----------------------------------------------------------------------------------------------------
def vllm_is_reasoning_end(ids) -> bool:
    """BaseThinkingReasoningParser.is_reasoning_end: the last think token is </think>."""
    return next((t == END for t in reversed(ids) if t in (START, END)), False)


FUNCTION = re.compile(r"<function[\s=]")  # (Qwen3ReasoningParser._RE_FUNCTION_OPEN, matched after lstrip)


def vllm_whole(text: str, qwen3_disabled=False, qwen3=False) -> tuple:
    """extract_reasoning: partition at the first <think>, then at the first </think>; none: all reasoning (qwen3 with
    enable_thinking false: all content; qwen3 else: split at the first <tool_call> where a function tag follows it,
    reasoning None where nothing is before it)."""
    before, start, after = text.partition("<think>")
    text = after if start else before
    if "</think>" in text:
        reasoning, _, content = text.partition("</think>")
        return reasoning, content or None
    if qwen3_disabled:
        return None, text
    at = text.find("<tool_call>")
    if qwen3 and at >= 0 and FUNCTION.match(text[at + 11:].lstrip()):
        return text[:at] or None, text[at:] or None
    return text, None


def vllm_delta_r1(prev, delta, text):
    """BaseThinkingReasoningParser.extract_reasoning_streaming with DeepSeekR1's override (no <think> seen: the
    thought runs to </think>): (reasoning, content), or None for no delta."""
    if len(delta) == 1 and delta[0] in (START, END):
        return None
    if START not in prev and START in delta:
        if END in delta:
            i, j = text.find("<think>"), text.find("</think>")
            return text[i + 7:j], text[j + 8:] or None
        return text, None
    if END in delta:
        j = text.find("</think>")
        return text[:j], text[j + 8:] or None
    return (None, text) if END in prev else (text, None)


def vllm_genuine(ids, at) -> bool:
    """Qwen3ReasoningParser._tool_call_is_genuine_end: a function tag in the 8 tokens after the <tool_call> at."""
    after = ids[at + 1:at + 9]
    return bool(after) and bool(FUNCTION.match(spelled(after).lstrip()))


def vllm_delta_qwen3(prev, delta, text, state):
    """Qwen3ReasoningParser.extract_reasoning_streaming, its <tool_call> rule with it (state: the parser's
    _tool_call_pending, under "pending")."""
    if not prev:
        state["pending"] = None
    if START in delta and "<think>" in text:
        text = text[text.find("<think>") + 7:]
    if END in delta:
        j = text.find("</think>")
        if j < 0 or not text[:j] + text[j + 8:]:
            return None
        return text[:j] or None, text[j + 8:] or None
    ids = prev + delta
    last = len(ids) - 1 - ids[::-1].index(TOOL) if TOOL in ids else -1
    if state["pending"] is not None:
        if vllm_genuine(ids, last):
            content, state["pending"] = state["pending"] + text, None
            return None, content
        rest = (state["pending"][11:] + text).lstrip()
        if not rest or "<function".startswith(rest) or rest.startswith("<function"):
            state["pending"] += text
            return None
        held, state["pending"] = state["pending"] + text, None
        return held, None
    if TOOL in delta or TOOL in prev:
        if vllm_genuine(ids, last):
            if TOOL not in delta:
                return None, text
            k = text.find("<tool_call>")
            if k >= 0:
                return text[:k] or None, text[k:] or None
        if TOOL in delta and END not in prev:
            k = text.find("<tool_call>")
            if k >= 0:
                state["pending"] = text[k:]
                return (text[:k], None) if text[:k] else None
    if not text:
        return None
    return (None, text) if END in prev else (text, None)


def vllm_stream(ids, sizes, qwen3, prompt_ended) -> tuple:
    """The serving layer's stream joined: prompt_is_reasoning_end sends every delta as content."""
    reasoning = content = ""
    i = k = 0
    state = {"pending": None}
    while i < len(ids):
        delta = ids[i:i + sizes[k % len(sizes)]]
        text = spelled(delta)
        got = (None, text) if prompt_ended else vllm_delta_qwen3(ids[:i], delta, text, state) if qwen3 else \
            vllm_delta_r1(ids[:i], delta, text)
        if got is not None:
            reasoning, content = reasoning + (got[0] or ""), content + (got[1] or "")
        i, k = i + len(delta), k + 1
    return reasoning, content


def ours_stream(parser, ids, sizes, thinks) -> tuple:
    stream, reasoning, content, i, k = ReasoningStream(parser, thinks), "", "", 0, 0
    while i < len(ids):
        delta = ids[i:i + sizes[k % len(sizes)]]
        r, c = stream.add(spelled(delta))
        assert r != "" and c != ""  # (nothing sent empty)
        reasoning, content, i, k = reasoning + (r or ""), content + (c or ""), i + len(delta), k + 1
    return reasoning + (stream.finish() or ""), content


def draw(rng, calls=False) -> list:
    """An answer's ids: think tokens anywhere (first, twice, after the content, none) among text pieces; calls:
    qwen3's <tool_call> token and function tags (whole, cut, or none after it) among them too."""
    ids, pieces = [], [[ord(c) for c in p] for p in PIECES] + (CALLING * 4 if calls else [])
    for _ in range(rng.randint(0, 9 if calls else 7)):
        k = rng.random()
        if calls:  # (fewer think tokens: a call has a thought to end)
            ids += [START] if k < 0.05 else [END] if k < 0.12 else [TOOL] if k < 0.35 else rng.choice(pieces)
        else:
            ids += [START] if k < 0.2 else [END] if k < 0.45 else rng.choice(pieces)
    return ids


def loses_text(text: str) -> bool:
    """Whether vLLM's whole answer drops what the model wrote: a <think> past the answer's start (after blanks)."""
    return "<think>" in text.lstrip()[1:]


def vllm_reads_the_call_otherwise(parser, text: str, whole: tuple) -> bool:
    """Whether ours ends the thought at a tool call that vLLM's whole answer reads otherwise (the module's
    docstring): a </think> after it, or a <tool_call> before it that is a mere mention."""
    if whole == answer(parser, text, True, calls=False):
        return False  # (no call ended the thought)
    return "</think>" in whole[1] or text.find("<tool_call>") < len(text) - len(whole[1])


def test_answers_split_as_vllms_parsers_where_they_agree_with_themselves():
    rng = random.Random(8)
    agreed, called = 0, 0
    for n in range(800):
        ids = draw(rng, calls=n % 2 == 1)
        text, sizes = spelled(ids), [rng.randint(1, 3) for _ in range(4)]
        for name, kind in (("deepseek_r1", Thinking), ("qwen3", Qwen3)):
            parser = kind(Tok(), name)
            for prompt in ([7, START, 8], [7, START, 8, END]):  # (the prompt's thought left open, or ended)
                ended = vllm_is_reasoning_end(prompt)
                assert parser.thinks(prompt) == (not ended)
                whole = answer(parser, text, not ended)
                r, c = ours_stream(parser, ids, sizes, not ended)
                # (ours: one rule; a thought the prompt ended and an empty answer: content "", as without a parser;
                # a call with no thought before it: reasoning None whole, no reasoning delta streamed)
                assert (r if not ended else None, c or None) == (
                    None if ended else whole[0] or "", whole[1] or None), (text, sizes)
                theirs = vllm_whole(text, qwen3=name == "qwen3")
                vr, vc = vllm_stream(ids, sizes, name == "qwen3", ended)
                if ended:  # (vLLM's stream: all content; its whole answer the parser's all the same)
                    assert whole == (None, text) and (vr, vc) == ("", text)
                elif (theirs[0] or "", theirs[1]) == (vr, vc or None) and not loses_text(text) \
                        and not vllm_reads_the_call_otherwise(parser, text, whole):  # (reasoning None: no delta)
                    assert whole == theirs, (name, text, sizes)
                    agreed += 1
                    called += whole != answer(parser, text, True, calls=False)  # (the call rule decided it)
    assert agreed > 600 and called > 30  # (most answers: the fuzz compares, not only skips; calls among them)
    # qwen3's switch: chat_template_kwargs enable_thinking false, the answer all content (vLLM's whole answer splits
    # at a </think> the model writes anyway; its stream, the prompt ending the thought, does not)
    q3 = Qwen3(Tok(), "qwen3")
    assert not q3.thinks([7], {"enable_thinking": False})
    assert answer(q3, "a</think>b", False) == (None, "a</think>b") and vllm_whole("a</think>b", True) == ("a", "b")
    assert answer(q3, "no tags", False) == (None, "no tags") == vllm_whole("no tags", True)


def test_the_cases_vllm_drops_text_in_keep_it_whole_and_streamed():
    """vLLM's odd cases (the module's docstring), by name: ours keeps every character but the tags it read."""
    r1 = Thinking(Tok(), "deepseek_r1")
    for ids, ours, theirs in (
            ([ord("a"), START, ord("b"), END, ord("c")], ("a<think>b", "c"), ("b", "c")),  # text before <think>
            ([ord("a"), END, ord("b"), START, ord("c")], ("a", "b<think>c"), ("c", None)),  # <think> after </think>
            ([START, ord("a"), END, ord("b"), END], ("a", "b</think>"), ("a", "b</think>")),  # two </think>
    ):
        text = spelled(ids)
        assert answer(r1, text, True) == ours and vllm_whole(text) == theirs
        for sizes in ([1], [2], [3]):
            r, c = ours_stream(r1, ids, sizes, True)
            assert (r, c or None) == ours
    # (vLLM's stream of the two </think>, one token a delta: the second dropped)
    assert vllm_stream([START, ord("a"), END, ord("b"), END], [1], False, False) == ("a", "b")
    # qwen3's tool call that vLLM's whole answer reads otherwise: a </think> after it (the call in the thought), a
    # mention of <tool_call> before it (all the thought); ours: the thought ends at the call, whole and streamed
    q3 = Qwen3(Tok(), "qwen3")
    for ids, ours, theirs in (
            ([ord("a"), TOOL, FUNC, ord("="), END, ord("b")], ("a", "<tool_call><function=</think>b"),
             ("a<tool_call><function=", "b")),
            ([TOOL, ord("!"), TOOL, FUNC, ord("=")], ("<tool_call>!", "<tool_call><function="),
             ("<tool_call>!<tool_call><function=", None)),
    ):
        text = spelled(ids)
        assert answer(q3, text, True) == ours and vllm_whole(text, qwen3=True) == theirs
        for sizes in ([1], [2], [3]):
            r, c = ours_stream(q3, ids, sizes, True)
            assert (r, c or None) == ours


# -- served: chat, its stream, /v1/responses -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    """test_stream_text's scripted server, its tokenizer with the think tokens, --reasoning-parser deepseek_r1."""
    from test_serve import start
    from test_stream_text import CORPUS, Scripted
    from tritongpt.model.config import GPTConfig
    from tritongpt.model.gpt import GPTModel
    from tritongpt.train.tokenizer import EOT, BPETokenizer

    folder = tmp_path_factory.mktemp("reasoning_fuzz") / "run"
    tok = BPETokenizer.train(CORPUS, 280, special_tokens=(EOT, "<|im_end|>", "<think>", "</think>"))
    (folder / "ckpt-0000001").mkdir(parents=True)
    tok.save(folder / "tokenizer.json")
    GPTModel(GPTConfig(vocab_size=tok.vocab_size, context_length=128, n_embd=16, n_layer=1, n_head=1)).save(
        folder / "ckpt-0000001" / "model.safetensors")
    torch.save({"step": 1, "prompt_format": "chat"}, folder / "ckpt-0000001" / "state.pt")
    server = start(folder, "--max-batch", "1", "--reasoning-parser", "deepseek_r1")
    server.RequestHandlerClass.log_message = lambda *a: None
    server.app.model = model = Scripted(tok.vocab_size, tok.eot_id)
    yield server, tok, model
    server.shutdown()
    server.server_close()


def test_served_answers_whole_streamed_and_as_responses_items(scripted):
    """Each scripted answer: the chat message's reasoning and content are the parser's split (vLLM's where vLLM
    agrees with itself), the stream's deltas add up to them, and /v1/responses has a reasoning item and a message
    item of the same texts (none for an empty one)."""
    from test_serve import call, events

    server, tok, model = scripted
    ids_of = {NAMES[START]: [tok.encode("<think>", allowed_special="all")[0]],
              NAMES[END]: [tok.encode("</think>", allowed_special="all")[0]]}
    rng = random.Random(3)
    answers = [[START, END], [], [START, *b"the cat", END], [END, *b"a"], [*b"a", END, *b" ", END],
               [START, *b"<", END, *b"the cat"]] + [draw(rng) for _ in range(4)]
    for ids in answers:
        text = spelled(ids)
        model.script = [[t for piece in ids for t in ids_of.get(spelled([piece])) or tok.encode(chr(piece))]]
        body = {"messages": [{"role": "user", "content": "the"}], "max_tokens": 24, "temperature": 0}
        status, whole = call(server, "/v1/chat/completions", body)
        assert status == 200, whole
        message = whole["choices"][0]["message"]
        assert (message["reasoning"], message["content"]) == answer(server.app.reasoning_parser, text, True)
        if not loses_text(text):
            assert (message["reasoning"], message["content"]) == vllm_whole(text), text
        deltas = [c["choices"][0]["delta"] for c in events(call(server, "/v1/chat/completions",
                                                                {**body, "stream": True})[1]) if c["choices"]]
        assert all(d.get("reasoning") != "" for d in deltas)  # (no empty reasoning delta)
        assert ("".join(d.get("reasoning") or "" for d in deltas), "".join(d.get("content") or "" for d in deltas)) \
            == (message["reasoning"], message["content"] or "")
        status, r = call(server, "/v1/responses", {"input": "the", "max_output_tokens": 24, "temperature": 0})
        assert status == 200, r
        assert [(o["type"], o["content"][0]["text"]) for o in r["output"]] == \
            [(kind, t) for kind, t in (("reasoning", message["reasoning"]), ("message", message["content"])) if t]
