"""The record formats SFT and the preference trainers read, and the chat template.

An SFT record is one JSON object in one of three formats (TRL's dataset formats, and Alpaca's):

    alpaca       {"instruction": ..., "input": ... (optional), "output": ...}
    completion   {"prompt": "...", "completion": "..."}                the prompt as it is: no template
    chat         {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
                 {"prompt": [messages], "completion": [{"role": "assistant", ...}]}

A file holds one format (a mix is refused: it is nearly always two datasets concatenated by
mistake). Every record becomes a list of parts, (text, eot after it, learned), encoded part by
part, so a response generated after its prompt tokenizes as it was trained:

    alpaca       format_prompt(record) | output <eot>
    completion   prompt | completion <eot>
    chat         the chat template below: the context parts are headers and the user's words; every
                 assistant turn is a part ending in <eot>, learned in "messages" (the model learns
                 to answer at each turn, TRL's assistant-only loss) and in a conversational
                 "completion" only the last one (the earlier ones are the given history).

GPT-2 has no role tokens, so the chat template is plain text in the same style as Alpaca's
headers, and <|endoftext|> ends each assistant turn (generation stops there):

    {system}\\n\\n                                   (when the first message is a system one)
    ### User:\\n{user}\\n\\n### Assistant:\\n{assistant}<|endoftext|>
    ### User:\\n{user}\\n\\n### Assistant:\\n{assistant}<|endoftext|> ...

`tritongpt chat` talks to a model through the same template (train/chat.py), and `tritongpt
export` gives a chat-tuned run's tokenizer HF_CHAT_TEMPLATE, for transformers'
`apply_chat_template`.
"""
import json

from tritongpt.errors import UserError

PROMPT_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")
USER_HEADER = "### User:\n"
ASSISTANT_HEADER = "\n\n### Assistant:\n"
ROLES = ("system", "user", "assistant")
FORMATS = ("alpaca", "completion", "chat")


# The chat template (the module docstring's) as Jinja, for transformers' tokenizer.apply_chat_template: the same
# text, the assistant header written as the generation prompt (add_generation_prompt=True), and each answer
# in a {% generation %} block, so return_assistant_tokens_mask marks what SFT learns of a
# {"messages"} chat (every answer; a conversational prompt-completion learns its last). Its ids are
# SFT's wherever an answer does not begin with whitespace (transformers tokenizes the text whole,
# SFT part by part: the newline before an answer is its own token either way).
HF_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ '### User:\\n' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '\\n\\n### Assistant:\\n' }}"
    "{%- generation -%}{{ message['content'] + eos_token }}{%- endgeneration -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\\n\\n### Assistant:\\n' }}{%- endif -%}")


def format_prompt(record) -> str:
    """The Alpaca prompt template (as in Raschka's book); the text ends where the response starts."""
    text = f"{PROMPT_PREAMBLE}\n\n### Instruction:\n{record['instruction']}"
    if record.get("input"):
        text += f"\n\n### Input:\n{record['input']}"
    return text + "\n\n### Response:\n"


# -- reading one record ------------------------------------------------------------------------------
def text_field(rec, key: str, where: str, empty_ok: bool = False) -> str:
    if key not in rec:
        raise UserError(f"{where}: missing field '{key}'")
    value = rec[key]
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    if not empty_ok and not value.strip():
        raise UserError(f"{where}: field '{key}' is empty")
    return value


def message_content(message: dict, where: str, empty_ok: bool = False) -> str:
    """A message's text: its content string, or the text of a list of content parts
    ([{"type": "text", "text": ...}, ...], as the OpenAI and Hugging Face multimodal formats
    write even text-only messages), the parts joined as chat templates join them (nothing between).
    empty_ok: an empty text taken (a served conversation's empty answer), not refused."""
    content = message.get("content")
    if isinstance(content, list):
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = repr(part.get("type")) if isinstance(part, dict) else type(part).__name__
                raise UserError(f"{where}: content[{j}] is a {kind} part, not {{\"type\": \"text\", \"text\": ...}}: "
                                f"only text reaches the model")
        message = {"content": "".join(part["text"] for part in content)}
    return text_field(message, "content", where, empty_ok)


def check_messages(messages, where: str, field: str = "messages", ends_with: str | None = "assistant",
                   empty_answers: bool = False) -> list:
    """Clean [{"role", "content"}] of a chat: an optional system message first, then user and
    assistant turns taking turns from a user one, ending with `ends_with` (any, if None).
    Other keys of a message (a name, say) are dropped; other roles are refused, not guessed at.
    empty_answers: an assistant's empty content taken (serve's, as OpenAI's API: an answer that
    was empty), not refused as training data's is."""
    if not isinstance(messages, list):
        raise UserError(f"{where}: field '{field}' must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise UserError(f"{where}: field '{field}' is an empty list")
    out = []
    for i, m in enumerate(messages):
        at = f"{where}: {field}[{i}]"
        if not isinstance(m, dict):
            raise UserError(f"{at}: expected an object with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise UserError(f"{at}: role {role!r} is not one of {', '.join(ROLES)} (tool calls and other "
                            f"roles have no place in the chat template)")
        content = message_content(m, at, empty_answers and role == "assistant")
        expected = ("system", "user") if i == 0 else ("assistant" if out[-1]["role"] == "user" else "user",)
        if role not in expected:
            raise UserError(f"{at}: a {role} message here; expected {' or '.join(expected)} (an optional "
                            f"system message, then user and assistant taking turns, a user first)")
        out.append({"role": role, "content": content})
    if ends_with is not None and out[-1]["role"] != ends_with:
        raise UserError(f"{where}: field '{field}' must end with an {ends_with} message, "
                        f"not a {out[-1]['role']} one")
    return out


FIRST_FIELD = {"alpaca": "instruction", "completion": "prompt", "chat": "messages"}


def record_format(rec, where: str, expect: str | None = None) -> str:
    """Which of FORMATS a raw record is in, from its fields; an error names what it lacks (of
    `expect`, the format of the file's records before it, when it has none of any)."""
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    found = [f for f, keys in (("alpaca", ("instruction",)), ("completion", ("prompt", "completion")),
                               ("chat", ("messages",))) if any(k in rec for k in keys)]
    if len(found) > 1:
        raise UserError(f"{where}: fields of two formats ({' and '.join(found)}); a record is one of "
                        f"{{instruction, input, output}}, {{prompt, completion}} or {{messages}}")
    if not found:
        if "text" in rec:
            raise UserError(f"{where}: a {{\"text\"}} record is pretraining data: train on it with "
                            f"`tritongpt pretrain --data FILE.jsonl`")
        if expect is not None:
            raise UserError(f"{where}: missing field '{FIRST_FIELD[expect]}'")
        raise UserError(f"{where}: no 'instruction', 'prompt' or 'messages' field; a record is one of "
                        f"{{instruction, input, output}}, {{prompt, completion}} or {{messages}}")
    if found[0] == "completion" and isinstance(rec.get("prompt"), list):
        return "chat"
    return found[0]


def read_record(rec, where: str, expect: str | None = None) -> dict:
    """A clean record of any format, or a UserError naming `where` and the field.

    alpaca: {"instruction", "input", "output"} (plus "task" if any); completion: {"prompt",
    "output"}; chat: {"messages", "output", "learn_all"} where output is the last assistant turn.
    """
    fmt = record_format(rec, where, expect)
    # TRL's unpaired preference format (kto's {prompt, completion, label}, text or conversational) reads as
    # completion records, and its undesirable answers were learned as targets (sft) or verified against as references
    # (rlhf's verifiers). Only there: an instruction or chat record's own "label" is no KTO label.
    if "completion" in rec and rec.get("label") is False:
        raise UserError(f"{where}: label false marks an undesirable completion (kto's {{prompt, completion, label}} "
                        "records): it would be learned as a good answer; train on the file with `tritongpt kto`, or "
                        "leave such records out")
    if fmt == "alpaca":
        out = {"instruction": text_field(rec, "instruction", where), "input": "",
               "output": text_field(rec, "output", where)}
        if rec.get("input") is not None:
            out["input"] = text_field(rec, "input", where, empty_ok=True)
        if isinstance(rec.get("task"), str):
            out["task"] = rec["task"]
        return out
    if "messages" in rec:
        messages = check_messages(rec["messages"], where)
        return {"messages": messages, "output": messages[-1]["content"], "learn_all": True}
    if fmt == "completion":
        return {"prompt": text_field(rec, "prompt", where), "output": text_field(rec, "completion", where)}
    prompt = check_messages(rec["prompt"], where, "prompt", ends_with="user")
    reply = {"role": "assistant", "content": one_answer(rec, "completion", where)}
    return {"messages": prompt + [reply], "output": reply["content"], "learn_all": False}


def one_answer(rec, key: str, where: str) -> str:
    """The text of field `key` given as a list of one assistant message: the answer of a
    conversational record (SFT's completion, a preference pair's chosen and rejected)."""
    value = rec.get(key)
    if not isinstance(value, list) or len(value) != 1:
        raise UserError(f"{where}: field '{key}' must be a list of one assistant message "
                        f"(the prompt is a list of messages)")
    m = value[0]
    if not isinstance(m, dict) or m.get("role") != "assistant":
        got = repr(m.get("role")) if isinstance(m, dict) else type(m).__name__
        raise UserError(f"{where}: field '{key}' must be a list of one assistant message "
                        f"({key}[0] must be an assistant message, got {got})")
    return message_content(m, f"{where}: {key}[0]")


def format_of(record) -> str:
    """The format of a record read_record made (or of an embedded task: alpaca)."""
    return "chat" if "messages" in record else "completion" if "prompt" in record else "alpaca"


def with_article(word: str) -> str:
    return ("an " if word[:1] in "aeiou" else "a ") + word


def read_records(raw) -> list:
    """Clean records from (where, record) pairs, all of one format."""
    records, first = [], None
    for where, rec in raw:
        rec = read_record(rec, where, first and first[0])
        if first is None:
            first = (format_of(rec), where)
        elif format_of(rec) != first[0]:
            raise UserError(f"{where} is {with_article(format_of(rec))} record but {first[1]} is {first[0]}: "
                            f"a file holds records of one format")
        records.append(rec)
    return records


# -- parts: text to encode, and what is learned --------------------------------------------------------
def chat_parts(messages, learn_all: bool = True, tokenizer=None) -> list:
    """(text, eot after it, learned) parts of a chat, by the chat template in the module doc, or by
    the tokenizer's own chat template when it has one (chat_template.template_parts).
    A chat that ends with a user message ends with the assistant header: a prompt to answer."""
    if getattr(tokenizer, "chat_template", None) is not None:
        from tritongpt.train.chat_template import template_parts

        return template_parts(tokenizer, messages, learn_all)
    parts, head, last = [], "", len(messages) - 1
    for i, m in enumerate(messages):
        if m["role"] == "system":
            head = m["content"] + "\n\n"
        elif m["role"] == "user":
            parts.append((head + USER_HEADER + m["content"] + ASSISTANT_HEADER, False, False))
            head = ""
        else:
            parts.append((m["content"], True, learn_all or i == last))
    return parts


def record_parts(record, template=format_prompt, tokenizer=None) -> list:
    """Every part of a record, the response last. `template` is the Alpaca one except in tests
    that need shorter prompts; a chat is rendered by `tokenizer`'s own chat template if it has one."""
    if "messages" in record:
        return chat_parts(record["messages"], record.get("learn_all", True), tokenizer)
    prompt = record["prompt"] if "prompt" in record else template(record)
    return [(prompt, False, False), (record["output"], True, True)]


def prompt_parts(record, template=format_prompt, tokenizer=None) -> tuple:
    """The parts before the final response: what generation starts from."""
    parts = record_parts(record, template, tokenizer)
    if parts[-1][2]:  # a learned answer last (a template may write more after it: dropped with it)
        parts = parts[:-1]
    else:
        parts = parts[:max(i for i, p in enumerate(parts) if p[2])]
    return tuple((text, eot) for text, eot, _ in parts)


def as_prompt(parts):
    """A prompt to store (preference pairs): its one text, or its (text, eot) parts where an
    earlier turn's <eot> lies inside it."""
    parts = tuple((t, e) for t, e, *_ in parts)
    return parts[0][0] if len(parts) == 1 and not parts[0][1] else parts


class ChatPrompt(tuple):
    """A chat's prompt as preference pairs and RLHF keep it: its (text, eot after it) parts in
    tritongpt's template (what hashes, splits and compares), and the messages they came from, so
    that encode_prompt renders them in a tokenizer's own chat template where it has one."""

    def __new__(cls, messages):
        self = super().__new__(cls, ((t, e) for t, e, _ in chat_parts(messages)))
        self.messages = tuple(messages)
        return self


def record_prompt(record, template=format_prompt):
    """A record's prompt to store: a chat's as a ChatPrompt, else as_prompt of its prompt parts."""
    if "messages" in record:
        return ChatPrompt(record["messages"][:-1])
    return as_prompt(prompt_parts(record, template))


def prompt_key(prompt) -> str:
    """One string for a prompt (a text, or parts): what held-out splits hash and group by."""
    if isinstance(prompt, str):
        return prompt
    return "".join(t + ("<|endoftext|>" if e else "") for t, e in prompt)


def record_key(record, template=format_prompt) -> str:
    """The split key of an SFT record: an Alpaca one's instruction and input (as before the other
    formats came, so its files split as they did), else its prompt."""
    from tritongpt.train import tasks

    if format_of(record) == "alpaca":
        return tasks.prompt_key(record)
    return prompt_key(prompt_parts(record, template))


def encode_text(tokenizer, text: str) -> list:
    # a special token's spelling inside user text is just text, never a control token; a chat
    # template's own text (Rendered: <|im_start|>...) spells its tokens, and the messages in it none
    from tritongpt.train.chat_template import Rendered

    return tokenizer.encode(text, allowed_special="all" if isinstance(text, Rendered) else "none")


def hf_chat_template(tokenizer) -> str:
    """HF_CHAT_TEMPLATE as export writes it for a run tuned with it: opened with {{ bos_token }} where
    the tokenizer starts every text with a BOS (SFT's ids start with it: with_bos), since transformers'
    apply_chat_template tokenizes the rendered text without adding special tokens."""
    if getattr(tokenizer, "prepended_bos_id", None) is None:
        return HF_CHAT_TEMPLATE
    return "{{- bos_token -}}" + HF_CHAT_TEMPLATE


def with_bos(tokenizer, ids: list) -> list:
    """ids with the tokenizer's BOS first, where its own pipeline starts every text with one (Gemma's,
    Llama 2's and 3's: HFTokenizer.prepended_bos_id) and they do not already (a chat template that
    writes it): a sequence then starts as the model's pretraining text did. Else ids as they are."""
    bos = getattr(tokenizer, "prepended_bos_id", None)
    return [bos] + ids if bos is not None and ids[:1] != [bos] else ids


def encode_prompt(tokenizer, prompt) -> list:
    """Token ids of a prompt: a text, or (text, eot after it) parts; a ChatPrompt in the
    tokenizer's own chat template when it has one. BOS first where the tokenizer starts texts
    with one (with_bos), as SFT's examples do."""
    if isinstance(prompt, ChatPrompt) and getattr(tokenizer, "chat_template", None) is not None:
        from tritongpt.train.chat_template import template_parts

        prompt = tuple((t, e) for t, e, _ in template_parts(tokenizer, list(prompt.messages)))
    if isinstance(prompt, str):
        return with_bos(tokenizer, encode_text(tokenizer, prompt))
    ids = []
    for text, eot in prompt:
        ids += encode_text(tokenizer, text) + ([tokenizer.eot_id] if eot else [])
    return with_bos(tokenizer, ids)


def describe(record) -> str:
    """A record's prompt in one line, for samples printed while training."""
    if "messages" in record:
        return json.dumps(record["messages"][:-1], ensure_ascii=False)
    if "prompt" in record:
        return repr(record["prompt"])
    return f"{record['instruction']} | {record['input']}"
