"""POST /v1/responses (OpenAI's Responses API, as vLLM serves it: vllm/entrypoints/openai/serving_responses.py) on
serve's chat machinery: a request is translated into a chat completion (to_chat: `instructions` and the input's
leading developer messages the system message, `input` the messages, function tools and tool_choice in chat's shape,
`text.format` as response_format, `max_output_tokens` as max_tokens), drawn as chat completions draw, and its answer
written as output items:

    {"type": "reasoning", "content": [{"type": "reasoning_text", "text"}]}     the thought (--reasoning-parser)
    {"type": "message", "content": [{"type": "output_text", "text"}]}          the answer's text
    {"type": "function_call", "call_id", "name", "arguments"}                  each tool call

A stream is OpenAI's typed events (response.created, response.output_item.added, response.output_text.delta, ...,
response.completed or response.incomplete; error and response.failed where it fails midway), made from the chat
stream's chunks (Events). A response is kept in memory (`store`, OpenAI's default true; the newest MAX_STORED) for
GET /v1/responses/{id} and for a later request's `previous_response_id`, which continues its conversation (its input
and output, not its instructions: OpenAI's rule)."""
import threading
import uuid
from collections import OrderedDict

MAX_STORED = 1000  # responses kept for previous_response_id and GET (the oldest dropped first)
# the Responses fields taken (OpenAI's, and vLLM's sampling extras); every other one refused by name
FIELDS = {"model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream", "tools",
          "tool_choice", "parallel_tool_calls", "text", "previous_response_id", "store", "user", "metadata",
          "reasoning", "truncation", "include", "background", "top_k", "min_p", "repetition_penalty", "seed",
          "chat_template_kwargs", "service_tier", "top_logprobs", "logit_bias"}
SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "parallel_tool_calls", "user",
            "chat_template_kwargs", "logit_bias")


def bad(field, message):
    from tritongpt.train.serve import bad as api_bad

    return api_bad(field, message)


def new_id(kind: str) -> str:
    return f"{kind}_{uuid.uuid4().hex}"


class Store:
    """The responses kept (id -> (response object, the conversation through it as chat messages, its input items)),
    the newest MAX_STORED, under a lock (requests run in threads)."""

    def __init__(self, size: int = MAX_STORED):
        self.items, self.size, self.lock = OrderedDict(), size, threading.Lock()

    def put(self, response: dict, messages: list, inputs: list = ()):
        with self.lock:
            self.items[response["id"]] = (response, messages, list(inputs))
            while len(self.items) > self.size:
                self.items.popitem(last=False)

    def get(self, rid: str, field: str = "previous_response_id"):
        from tritongpt.train.serve import APIError

        with self.lock:
            got = self.items.get(rid)
        if got is None:
            raise APIError(404, f"Response with id '{rid}' not found (this server keeps the newest {self.size} "
                                "responses stored with store: true, in memory)", field, code="not_found")
        return got

    def delete(self, rid: str):
        self.get(rid, "response_id")  # (an unknown id: the 404)
        with self.lock:
            self.items.pop(rid, None)


def input_items(given) -> list:
    """A request's input as OpenAI lists it back (GET /v1/responses/{id}/input_items): items with ids, a message's
    content as parts (a string input one user message)."""
    items = [{"type": "message", "role": "user", "content": given}] if isinstance(given, str) else given
    out = []
    for item in items:
        item = dict(item)
        kind = item.setdefault("type", "message")
        if kind == "message" and isinstance(item.get("content"), str):
            part = "output_text" if item.get("role") == "assistant" else "input_text"
            item["content"] = [{"type": part, "text": item["content"]}]
        prefix = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}
        item.setdefault("id", new_id(prefix.get(kind, "item")))
        out.append(item)
    return out


def text_of(content, at: str) -> str:
    """A message's content: a string, or parts of type input_text / output_text (their texts joined)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad("input", f"{at}.content must be a string or a list of input_text parts, got {content!r}"[:300])
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text") or not isinstance(part.get("text"), str):
            raise bad("input", f"{at}.content[{j}] must be {{\"type\": \"input_text\", \"text\": ...}} (text is the "
                               f"only input this server takes), got {part!r}"[:300])
        texts.append(part["text"])
    return "".join(texts)


def input_messages(items, before=()) -> list:
    """`input` (a string, or a list of items) as chat messages, after `before` (previous_response_id's): messages
    by role (developer as system: only before the conversation's other messages, since chat templates take one
    system message, first), a function_call as an assistant's tool call (consecutive ones one assistant message,
    with the text before them), a function_call_output as a tool message (its call_id an earlier call's); reasoning
    items dropped (a chat template leaves earlier thoughts out)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise bad("input", f"'input' must be a string or a non-empty list of items, got {items!r}"[:300])
    out = []
    calls = {c["id"] for m in before for c in m.get("tool_calls") or ()}
    started = any(m["role"] != "system" for m in before)  # (the conversation begun: no system message now)
    for i, item in enumerate(items):
        at = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message" and isinstance(item.get("role"), str):
            role = {"developer": "system"}.get(item["role"], item["role"])
            if role not in ("system", "user", "assistant"):
                raise bad("input", f"{at}.role must be user, system, developer or assistant, got {item['role']!r}")
            if role == "system" and started:
                raise bad("input", f"{at}: a {item['role']} message after the conversation's first user, assistant "
                                   "or function items: the chat template takes one system message, first (send "
                                   "'instructions', or the message before the others)")
            started = started or role != "system"
            out.append({"role": role, "content": text_of(item.get("content"), at)})
        elif kind == "function_call":
            if not all(isinstance(item.get(k), str) for k in ("call_id", "name", "arguments")):
                raise bad("input", f"{at}: a function_call has a call_id, a name and arguments (JSON text), got "
                                   f"{item!r}"[:300])
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            calls.add(item["call_id"])
            started = True
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(item.get("call_id"), str):
                raise bad("input", f"{at}: a function_call_output has the call_id of its call, got {item!r}"[:300])
            if item["call_id"] not in calls:
                raise bad("input", f"{at}: call_id {item['call_id']!r} is no earlier function_call's (in input or "
                                   "the previous_response_id's output)"[:300])
            started = True
            out.append({"role": "tool", "tool_call_id": item["call_id"], "content": text_of(output, at)})
        elif kind == "reasoning":
            continue
        else:
            raise bad("input", f"{at}: items are messages, function_call, function_call_output or reasoning (text "
                               f"only), got {item!r}"[:300])
    return out


def chat_tools(tools, choice):
    """Responses' function tools ({"type": "function", "name", "description", "parameters", "strict"}) and
    tool_choice ("none", "auto", "required", {"type": "function", "name"}) in chat's shape."""
    out = None
    if tools is not None:
        if not isinstance(tools, list):
            raise bad("tools", f"'tools' must be a list of function tools, got {tools!r}"[:300])
        out = []
        for j, t in enumerate(tools):
            if not isinstance(t, dict) or t.get("type") != "function":
                raise bad(f"tools[{j}]", f"tools[{j}]: function tools are the only kind this server takes (no "
                                         f"built-in tools), got {t!r}"[:300])
            out.append({"type": "function", "function": {k: v for k, v in t.items() if k != "type"}})
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise bad("tool_choice", f"'tool_choice' must be none, auto, required or {{\"type\": \"function\", "
                                     f"\"name\": ...}}, got {choice!r}"[:300])
        choice = {"type": "function", "function": {"name": choice["name"]}}
    return out, choice


def response_format(text):
    """`text` ({"format": {"type": "text" | "json_schema" (name, schema, strict, description) | "json_object"}})
    as chat's response_format, or None."""
    if text is None:
        return None
    fmt = text.get("format") if isinstance(text, dict) else None
    if not isinstance(text, dict) or set(text) - {"format", "verbosity"} or (fmt is not None and
                                                                           not isinstance(fmt, dict)):
        raise bad("text", f"'text' must be {{\"format\": {{\"type\": \"text\" | \"json_schema\" | \"json_object\", "
                          f"...}}}}, got {text!r}"[:300])
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":  # (OpenAI's: a name and a schema object required, strict a boolean)
        for key, kind, what in (("name", str, "a string"), ("schema", dict, "a JSON schema object")):
            if not isinstance(fmt.get(key), kind):
                raise bad("text", f"text.format.{key} must be {what} (a json_schema format's), got "
                                  f"{fmt.get(key)!r}"[:300])
        if fmt.get("strict") is not None and not isinstance(fmt["strict"], bool):
            raise bad("text", f"text.format.strict must be true or false, got {fmt['strict']!r}")
        return {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}
    raise bad("text", f"text.format.type must be text, json_schema or json_object, got {fmt.get('type')!r}")


def to_chat(body: dict, store: Store) -> tuple:
    """(A chat completion's body, the conversation's earlier messages from previous_response_id) of a Responses
    request, every field checked by name."""
    if not isinstance(body, dict):
        raise bad(None, "the request body must be a JSON object")
    for key in body:
        if key not in FIELDS:
            raise bad(key, f"unknown field '{key}'")
    for key, off in (("background", False), ("truncation", "disabled"), ("service_tier", "auto")):
        if body.get(key) not in (None, off):
            raise bad(key, f"'{key}': {body[key]!r} is not supported by this server (only {off!r})")
    if body.get("include"):
        raise bad("include", f"'include' is not supported by this server (nothing extra to include), got "
                             f"{body['include']!r}"[:300])
    if body.get("store") is not None and not isinstance(body["store"], bool):
        raise bad("store", f"'store' must be true or false, got {body['store']!r}")
    if body.get("top_logprobs"):
        raise bad("top_logprobs", "'top_logprobs' is not supported on /v1/responses here (chat completions give "
                                  "logprobs)")
    reasoning = body.get("reasoning")
    if reasoning is not None and (not isinstance(reasoning, dict) or any(v is not None for v in reasoning.values())):
        raise bad("reasoning", "'reasoning' options (effort, summary) are not supported by this server: a reasoning "
                               "model thinks as its template asks (serve --reasoning-parser splits the thought out)")
    if body.get("metadata") is not None and not (isinstance(body["metadata"], dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in body["metadata"].items())):
        raise bad("metadata", "'metadata' must be an object of strings")
    if "input" not in body:
        raise bad("input", "'input' is required")
    before = []
    if body.get("previous_response_id") is not None:
        if not isinstance(body["previous_response_id"], str):
            raise bad("previous_response_id", "'previous_response_id' must be a response's id")
        before = store.get(body["previous_response_id"])[1]
    messages = input_messages(body["input"], before)
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise bad("instructions", f"'instructions' must be a string, got {instructions!r}"[:300])
    # the instructions, then the conversation's leading developer messages (a stored conversation keeps its input's,
    # not its instructions: OpenAI's), as the one system message chat templates take first
    conversation = before + messages
    k = next((j for j, m in enumerate(conversation) if m["role"] != "system"), len(conversation))
    system = ([instructions] if instructions else []) + [m["content"] for m in conversation[:k]]
    system = [{"role": "system", "content": "\n\n".join(system)}] if system else []
    chat = {"messages": system + conversation[k:], "stream": body.get("stream"), "n": 1}  # (checked as chat's)
    for key in SAMPLING:
        if body.get(key) is not None:
            chat[key] = body[key]
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    tools, choice = chat_tools(body.get("tools"), body.get("tool_choice"))
    if tools:
        chat["tools"] = tools
    if choice is not None:
        chat["tool_choice"] = choice
    fmt = response_format(body.get("text"))
    if fmt is not None:
        chat["response_format"] = fmt
    if body.get("model") is not None:
        chat["model"] = body["model"]
    return chat, conversation


# chat's fields that a chat check's refusal may name, as the Responses request calls them
CHAT_FIELDS = {"max_tokens": "max_output_tokens", "response_format": "text", "messages": "input"}


def renamed(e):
    """A refusal by chat's checks (Completion's) in the Responses request's own names: its field (its message's too:
    max_output_tokens, text.format), and the messages' indices said to be the conversation's (instructions,
    previous_response_id's turns, then input)."""
    field = CHAT_FIELDS.get(e.param)
    if field is None:
        return e
    message = str(e).replace("max_tokens", "max_output_tokens")
    if field == "text":  # (chat's response_format.json_schema holds what text.format holds, flat)
        for chat_name in ("response_format.json_schema", "response_format"):
            message = message.replace(chat_name, "text.format")
    if field == "input":
        message = f"the conversation as chat messages (instructions, previous_response_id's turns, input): {message}"
    return type(e)(e.status, message, field, e.kind, e.code)


def output_items(message: dict) -> list:
    """A chat message (Completion.message's) as Responses output items: its thought, its text, its calls."""
    items = []  # (an empty thought or text no item: the stream sends none)
    if message.get("reasoning"):
        items.append({"type": "reasoning", "id": new_id("rs"), "summary": [],
                      "content": [{"type": "reasoning_text", "text": message["reasoning"]}], "status": "completed"})
    if message.get("content"):
        items.append({"type": "message", "id": new_id("msg"), "status": "completed", "role": "assistant",
                      "content": [{"type": "output_text", "text": message["content"], "annotations": [],
                                   "logprobs": []}]})
    for c in message.get("tool_calls") or ():
        items.append({"type": "function_call", "id": new_id("fc"), "call_id": c["id"], "name": c["function"]["name"],
                      "arguments": c["function"]["arguments"], "status": "completed"})
    return items


def assistant_turn(items: list) -> dict:
    """The output items as the assistant message a later request's previous_response_id continues from (the
    thought left out: templates drop earlier thoughts)."""
    text = "".join(p["text"] for i in items if i["type"] == "message" for p in i["content"])
    calls = [{"id": i["call_id"], "type": "function", "function": {"name": i["name"], "arguments": i["arguments"]}}
             for i in items if i["type"] == "function_call"]
    return {"role": "assistant", "content": text or (None if calls else ""), **({"tool_calls": calls} if calls else {})}


def response_object(body: dict, rid: str, created: int, model: str, items: list, finish: str | None, usage,
                    status: str | None = None, error=None) -> dict:
    """OpenAI's response object: the request's settings echoed, the output items, the status ("incomplete" where
    max_output_tokens cut it; "failed" with the error, an APIError, of a stream that failed), the usage in
    Responses' names."""
    status = status or ("incomplete" if finish == "length" else "completed")
    tools = body.get("tools") or []
    if error is not None:  # (ResponseError's codes: the server's, or the request's)
        error = {"code": "server_error" if error.status >= 500 else "invalid_prompt", "message": str(error)}
    return {"id": rid, "object": "response", "created_at": created, "status": status, "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "model": model, "output": items, "parallel_tool_calls": body.get("parallel_tool_calls", True) is not False,
            "previous_response_id": body.get("previous_response_id"), "reasoning": {"effort": None, "summary": None},
            "store": body.get("store", True) is not False, "temperature": body.get("temperature", 1.0),
            "text": body.get("text") or {"format": {"type": "text"}}, "tool_choice": body.get("tool_choice", "auto"),
            "tools": tools, "top_p": body.get("top_p", 1.0), "truncation": "disabled", "user": body.get("user"),
            "metadata": body.get("metadata") or {},
            "usage": None if usage is None else {
                "input_tokens": usage["prompt_tokens"], "input_tokens_details": {
                    "cached_tokens": usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)},
                "output_tokens": usage["completion_tokens"], "output_tokens_details": {
                    "reasoning_tokens": usage.get("completion_tokens_details", {}).get("reasoning_tokens", 0)},
                "total_tokens": usage["total_tokens"]}}


class Events:
    """A streamed response's typed events, made from the chat stream's chunks (Completion.chunk's, through
    send_event): each output item added, its text's deltas, its end; every event numbered (sequence_number)."""

    def __init__(self, write, head: dict):
        self.write, self.head, self.seq = write, head, 0  # head: the response object so far (in_progress)
        self.items, self.open = [], None  # the output items; the one receiving deltas (its index in items)

    def event(self, kind: str, **fields):
        self.write({"type": kind, "sequence_number": self.seq, **fields})
        self.seq += 1

    def start(self):
        self.event("response.created", response=self.head)
        self.event("response.in_progress", response=self.head)

    def close(self):
        if self.open is None:
            return
        k, item = self.open, self.items[self.open]
        item["status"] = "completed"
        if item["type"] == "message":
            part = item["content"][0]
            self.event("response.output_text.done", item_id=item["id"], output_index=k, content_index=0,
                       text=part["text"], logprobs=[])
            self.event("response.content_part.done", item_id=item["id"], output_index=k, content_index=0, part=part)
        elif item["type"] == "reasoning":
            part = item["content"][0]
            self.event("response.reasoning_text.done", item_id=item["id"], output_index=k, content_index=0,
                       text=part["text"])
            self.event("response.content_part.done", item_id=item["id"], output_index=k, content_index=0, part=part)
        else:
            self.event("response.function_call_arguments.done", item_id=item["id"], output_index=k,
                       name=item["name"], arguments=item["arguments"])
        self.event("response.output_item.done", output_index=k, item=item)
        self.open = None

    def _add(self, item: dict, part=None):
        self.close()
        self.items.append(item)
        self.open = k = len(self.items) - 1
        self.event("response.output_item.added", output_index=k, item={**item, "content": []} if part else item)
        if part is not None:
            self.event("response.content_part.added", item_id=item["id"], output_index=k, content_index=0,
                       part={**part, "text": ""})

    def _text(self, kind: str, text: str):
        """A delta of the thought's or the answer's text: into the open item of that kind, or a new one."""
        item = self.items[self.open] if self.open is not None else None
        if item is None or item["type"] != kind:
            if kind == "message":
                part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                self._add({"type": "message", "id": new_id("msg"), "status": "in_progress", "role": "assistant",
                           "content": [part]}, part)
            else:
                part = {"type": "reasoning_text", "text": ""}
                self._add({"type": "reasoning", "id": new_id("rs"), "summary": [], "content": [part],
                           "status": "in_progress"}, part)
            item = self.items[self.open]
        item["content"][0]["text"] += text
        name = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
        extra = {"logprobs": []} if kind == "message" else {}
        self.event(name, item_id=item["id"], output_index=self.open, content_index=0, delta=text, **extra)

    def chunk(self, chunk: dict):
        """One chat chunk's delta as events."""
        choice = chunk["choices"][0]
        delta = choice.get("delta") or {}
        if delta.get("role"):
            return
        if delta.get("reasoning"):
            self._text("reasoning", delta["reasoning"])
        if delta.get("content"):
            self._text("message", delta["content"])
        for d in delta.get("tool_calls") or ():
            if "id" in d:  # (a call's first delta: a new item)
                self._add({"type": "function_call", "id": new_id("fc"), "call_id": d["id"],
                           "name": d["function"]["name"], "arguments": "", "status": "in_progress"})
            item = self.items[self.open]
            args = d["function"].get("arguments") or ""
            if args:
                item["arguments"] += args
                self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=self.open,
                           delta=args)

    def end(self, response: dict):
        self.close()
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        self.event(kind, response=response)

    def fail(self, e, response: dict):
        """A stream that failed midway (e: the APIError Handler.fail was given): OpenAI's `error` event, then
        response.failed with the response so far (the item open then left incomplete), not chat's error chunk and
        [DONE]."""
        self.event("error", code=e.code, message=str(e), param=e.param)
        self.event("response.failed", response=response)

    def cut(self):
        """The open item left incomplete (a stream that failed), no more events of it."""
        if self.open is not None:
            self.items[self.open]["status"] = "incomplete"
            self.open = None


