"""Reasoning in a chat answer (serve --reasoning-parser, vLLM's vllm/reasoning/): a reasoning model thinks between
<think> and </think>, then answers; the parser splits the answer's text into `reasoning` and `content`.

    deepseek_r1  DeepSeek-R1, its distills, QwQ: the text up to </think> is reasoning (a <think> the answer begins
                 with dropped: R1's newer template puts it in the prompt); no </think>: all reasoning (the answer
                 was cut short while thinking)
    qwen3        Qwen3: the same, and chat_template_kwargs {"enable_thinking": false} makes the answer all content

Both need <think> and </think> to be tokens of the tokenizer (vLLM refuses the parser otherwise): the </think> token
is where a request's structured outputs begin (the grammar holds the answer, not the thinking: vLLM's), and a prompt
whose last think token is </think> has done its thinking (Qwen3's template with enable_thinking false writes
"<think>\\n\\n</think>\\n\\n" into it): its answer is all content (vLLM's prompt_is_reasoning_end)."""
from tritongpt.errors import UserError
from tritongpt.train.tool_calls import held


class Thinking:
    """A <think> ... </think> reasoning parser for one tokenizer (its two tokens' ids)."""
    start, end = "<think>", "</think>"
    switch = None  # the chat_template_kwargs key that turns thinking off (qwen3's enable_thinking)

    def __init__(self, tok, name: str):
        self.name = name
        self.start_id, self.end_id = (token_id(tok, t, name) for t in (self.start, self.end))

    def thinks(self, prompt_ids, template_kwargs=None) -> bool:
        """Whether an answer to prompt_ids begins in thought: not where the prompt's last think token is </think>,
        nor where template_kwargs turn thinking off."""
        if self.switch is not None and (template_kwargs or {}).get(self.switch) is False:
            return False
        last = next((t for t in reversed(prompt_ids) if t in (self.start_id, self.end_id)), None)
        return last != self.end_id

    def split(self, text: str, final: bool = True) -> tuple:
        """(reasoning, content or None) of an answer that began in thought; final False: of one still growing, less
        a tail that may begin a think marker (None for reasoning too while the answer may still begin with
        <think>)."""
        body = text.lstrip()
        if body.startswith(self.start):
            text = body[len(self.start):]
        elif not final and self.start.startswith(body):
            return None, None
        at = text.find(self.end)
        if at >= 0:
            return text[:at], text[at + len(self.end):]
        return text[:len(text) - (0 if final else held(text, self.end))], None


class Qwen3(Thinking):
    switch = "enable_thinking"


PARSERS = {"deepseek_r1": Thinking, "qwen3": Qwen3}


def token_id(tok, text: str, name: str) -> int:
    """The id of the token spelled text, or a UserError naming the parser that needs it."""
    try:
        ids = tok.encode(text, allowed_special="all")
    except (UserError, ValueError):
        ids = []
    if len(ids) != 1 or tok.decode(ids) != text:
        raise UserError(f"--reasoning-parser {name}: the tokenizer has no {text} token (vLLM's rule: the parser "
                        "finds a reasoning model's think tokens); serve a model whose tokenizer has them")
    return ids[0]


def answer(parser, text: str, thinks: bool) -> tuple:
    """(reasoning or None, content or None) of a whole answer (vLLM's: content None where nothing follows the
    thought; no reasoning where the answer did not begin in thought)."""
    if not thinks:
        return None, text
    reasoning, content = parser.split(text)
    return reasoning, content or None


class ReasoningStream:
    """A streamed choice's reasoning: each new text split into (reasoning, content) deltas, the reasoning sent as
    it grows (less a tail that may begin </think>), the content from </think> on; finish() sends a held tail."""

    def __init__(self, parser, thinks: bool):
        self.parser, self.text, self.sent, self.past = parser, "", 0, not thinks  # past: the thought is over

    def _new(self, final: bool) -> tuple:
        reasoning, content = self.parser.split(self.text, final)
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
