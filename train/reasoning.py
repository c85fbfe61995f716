"""Reasoning in a chat answer (serve --reasoning-parser, vLLM's vllm/reasoning/): a reasoning model thinks between
<think> and </think>, then answers; the parser splits the answer's text into `reasoning` and `content`.

    deepseek_r1  DeepSeek-R1, its distills, QwQ: the text up to </think> is reasoning (a <think> the answer begins
                 with dropped: R1's newer template puts it in the prompt); no </think>: all reasoning (the answer
                 was cut short while thinking)
    qwen3        Qwen3: the same, and chat_template_kwargs {"enable_thinking": false} makes the answer all content;
                 a tool call in the thought ends it without </think> (Qwen3.5 may call a tool from its thought):
                 a <tool_call> followed, after blanks, by <function= (or "<function " : a function tag, vLLM's
                 lookahead) is where the content begins, the <tool_call> with it, for the tool parser (qwen3_coder)
                 to find; a <tool_call> that is a mere mention (no function tag after it: Hermes' JSON calls too)
                 stays in the thought. The first of </think> and such a call ends the thought, whole and streamed
                 alike (vLLM's whole answer splits at a later </think> when it has one, its stream at the call), and
                 the call rule is off where a grammar holds the answer (structured outputs, a named or "required"
                 tool_choice): the grammar wakes at </think> only, and the parser then agrees with it

    openai_gptoss  gpt-oss: OpenAI's harmony format, not think tags: the analysis channel's messages are the
                 reasoning, the final channel's (and commentary preambles', shown to the user: vLLM's) the content;
                 tool calls (to=functions.NAME) are neither, left to the openai tool parser, which reads the answer's
                 markup itself (tool_calls.harmony_split, whose notes say where it differs from vLLM's)

The think parsers need <think> and </think> to be tokens of the tokenizer (vLLM refuses the parser otherwise): the </think> token
is where a request's structured outputs begin (the grammar holds the answer, not the thinking: vLLM's), and a prompt
whose last think token is </think> has done its thinking (Qwen3's template with enable_thinking false writes
"<think>\\n\\n</think>\\n\\n" into it): its answer is all content (vLLM's prompt_is_reasoning_end)."""
import re

from tritongpt.errors import UserError
from tritongpt.train.tool_calls import HARMONY_MARKERS, HarmonyReader, harmony_split, harmony_text, held


class Thinking:
    """A <think> ... </think> reasoning parser for one tokenizer (its two tokens' ids)."""
    start, end = "<think>", "</think>"
    markup = False  # (Harmony's: the tool parser reads the answer's own text)
    switch = None  # the chat_template_kwargs key that turns thinking off (qwen3's enable_thinking)
    call = None  # a tool call's opening that ends the thought without </think> (qwen3's <tool_call>)
    function = re.compile(r"\s*<function[\s=]")  # what must follow call for it to be one (vLLM's lookahead)

    def __init__(self, tok, name: str):
        self.name = name
        self.start_id, self.end_id = (token_id(tok, t, name) for t in (self.start, self.end))
        self.ids = (self.start_id, self.end_id)  # (the tokens whose text serve keeps for the parser)

    def thinks(self, prompt_ids, template_kwargs=None) -> bool:
        """Whether an answer to prompt_ids begins in thought: not where the prompt's last think token is </think>,
        nor where template_kwargs turn thinking off."""
        if self.switch is not None and (template_kwargs or {}).get(self.switch) is False:
            return False
        last = next((t for t in reversed(prompt_ids) if t in (self.start_id, self.end_id)), None)
        return last != self.end_id

    def split(self, text: str, final: bool = True, calls: bool = True) -> tuple:
        """(reasoning, content or None) of an answer that began in thought; final False: of one still growing, less
        a tail that may begin a think marker or a tool call (None for reasoning too while the answer may still begin
        with <think>). calls False: only </think> ends the thought (a grammar waits for it). Reasoning None where a
        tool call ends a thought with nothing before it (vLLM's)."""
        body = text.lstrip()
        if body.startswith(self.start):
            text = body[len(self.start):]
        elif not final and self.start.startswith(body):
            return None, None
        at = text.find(self.end)
        thought = text if at < 0 else text[:at]
        if calls and self.call is not None:
            c = self.called(thought, text, final)
            if c is not None:
                return text[:c] or None, text[c:]
            if at < 0 and not final:  # (a tail that may begin a call: held, as one that may begin </think>)
                keep = len(text) - max(held(text, self.end), held(text, self.call))
                pending = text.rfind(self.call)  # (a call whose function tag may yet follow: held from its start)
                if pending >= 0 and self.may_follow(text[pending + len(self.call):]):
                    keep = min(keep, pending)
                return text[:keep], None
        if at >= 0:
            return text[:at], text[at + len(self.end):]
        return text[:len(text) - (0 if final else held(text, self.end))], None

    def called(self, thought: str, text: str, final: bool) -> int | None:
        """Where the first tool call in thought begins (its function tag read in text, past the thought's end where
        the tag runs on), or None."""
        c = thought.find(self.call)
        while c >= 0:
            if self.function.match(text, c + len(self.call)):
                return c
            c = thought.find(self.call, c + 1)
        return None

    def may_follow(self, after: str) -> bool:
        """Whether the text after a <tool_call> may still grow into its function tag (blanks, then a start of
        "<function")."""
        return "<function".startswith(after.lstrip())

    def stream(self, thinks: bool, calls: bool = True):
        return ReasoningStream(self, thinks, calls)

class Qwen3(Thinking):
    switch, call = "enable_thinking", "<tool_call>"


class Harmony:
    """gpt-oss's harmony answers (vLLM's openai_gptoss): every answer begins in a message header (the prompt ends
    <|start|>assistant), its analysis messages the reasoning, its final and preamble messages the content
    (tool_calls.harmony_split). Its marker tokens must be the tokenizer's: serve keeps their text for the parser.
    Its thought ends at a sequence of tokens (<|channel|>final<|message|>), not at one token a grammar can wake at:
    structured outputs and a named or "required" tool_choice are refused with it (markup: the tool parser, where it
    is openai, reads the whole answer's text)."""
    end_id, markup = None, True  # (no one token ends the thought: no grammar waits for it, no reasoning_tokens)

    def __init__(self, tok, name: str):
        self.name = name
        self.ids = tuple(token_id(tok, t, name) for t in HARMONY_MARKERS)

    def thinks(self, prompt_ids, template_kwargs=None) -> bool:
        return True  # (the answer's first header says which channel it writes)

    def split(self, text: str, final: bool = True, calls: bool = True) -> tuple:
        """(reasoning, content), either None where the answer has none (final False: as far as it is decided)."""
        return harmony_split(text, final)[:2]

    def stream(self, thinks: bool, calls: bool = True):
        return HarmonyStream(self)


PARSERS = {"deepseek_r1": Thinking, "openai_gptoss": Harmony, "qwen3": Qwen3}


def token_id(tok, text: str, name: str) -> int:
    """The id of the token spelled text, or a UserError naming the parser that needs it."""
    try:
        ids = tok.encode(text, allowed_special="all")
    except (UserError, ValueError):
        ids = []
    if len(ids) != 1 or tok.decode(ids) != text:
        raise UserError(f"--reasoning-parser {name}: the tokenizer has no {text} token (vLLM's rule: the parser "
                        "finds a reasoning model's marker tokens); serve a model whose tokenizer has them")
    return ids[0]


def answer(parser, text: str, thinks: bool, calls: bool = True) -> tuple:
    """(reasoning or None, content or None) of a whole answer (vLLM's: content None where nothing follows the
    thought; no reasoning where the answer did not begin in thought). calls: Thinking.split's."""
    if not thinks:
        return None, text
    reasoning, content = parser.split(text, calls=calls)
    return reasoning, content or None


class ReasoningStream:
    """A streamed choice's reasoning: each new text split into (reasoning, content) deltas, the reasoning sent as
    it grows (less a tail that may begin </think> or a tool call), the content from the thought's end on; finish()
    sends a held tail. calls: Thinking.split's."""

    def __init__(self, parser, thinks: bool, calls: bool = True):
        self.parser, self.text, self.sent, self.past = parser, "", 0, not thinks  # past: the thought is over
        self.calls = calls

    def _new(self, final: bool) -> tuple:
        reasoning, content = self.parser.split(self.text, final, self.calls)
        new = reasoning[self.sent:] if reasoning is not None and len(reasoning) > self.sent else None
        self.sent += len(new or "")
        if content is not None:
            self.past = True
        return new, content or None

    def add(self, text: str) -> tuple:
        """(reasoning delta or None, content delta or None) of the choice's new text."""
        if self.past:
            return None, text or None
        self.text += text
        return self._new(False)

    def finish(self) -> str | None:
        """The reasoning the stream held back, at the answer's end."""
        return None if self.past else self._new(True)[0]

    def ends(self) -> tuple:
        """(reasoning, content) the answer's end sends: a think stream holds back reasoning only."""
        return self.finish(), None


class HarmonyStream:
    """A streamed harmony choice: the reasoning and the content each sent as they grow (what harmony_split of the text
    so far gives: an end marker's possible start held back, a header until its <|message|>), in the order drawn;
    ends() sends what was held, and a text with no marker at all (content once whole). Read chunk by chunk
    (HarmonyReader: linear in the answer), not split whole at each one."""

    def __init__(self, parser):
        self.reader, self.seen = HarmonyReader(), set()  # seen: the kinds whose first message has begun

    def _new(self, events) -> tuple:
        return tuple(harmony_text(events, kind, self.seen) for kind in ("reasoning", "content"))

    def add(self, text: str) -> tuple:
        """(reasoning delta or None, content delta or None) of the choice's new text."""
        return self._new(self.reader.feed(text))

    def ends(self) -> tuple:
        return self._new(self.reader.feed("", final=True))
