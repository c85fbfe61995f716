"""Tool calling on serve's /v1/chat/completions (train/serve.py tool_setting, tool_message; chat_template.tool_prompt):
vLLM's. A named function's call and "required"'s calls held to the tools' schemas by structured outputs, answered as
message.tool_calls, streamed as vLLM streams a named call; "auto" with a tool-call parser; the tools and tool
messages rendered by a Hugging Face chat template as transformers renders them; every refusal by name. A tiny
instruct folder (test_chat_template.chat_folder) whose template renders tools, over the engine and --max-batch 1."""
import json

import pytest

from tritongpt.errors import UserError

from test_serve import call, events, start, tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")
xgr = pytest.importorskip("xgrammar")
transformers = pytest.importorskip("transformers")

# ChatML with a tools line and tool use (Qwen2.5's shape, short: the tiny model's context is 128 tokens)
TOOLS_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n# Tools:' }}{%- for tool in tools %}{{- ' ' + tool.function.name }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message.role == 'tool' %}"
    "{{- '<|im_start|>tool\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content }}"
    "{%- for call in message.tool_calls or [] %}{{- call.function.name + (call.function.arguments | tojson) }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
# (short names: the tiny tokenizer spells JSON about a character a token, in a 128-token context)
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Oslo", "Rome"]},
                                            "hot": {"type": "boolean"}},
           "required": ["city", "hot"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["a"],
       "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "w", "description": "the weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "parameters": ADD}}]
NAMED = {"type": "function", "function": {"name": "w"}}
USER = [{"role": "user", "content": "the cat sat"}]


def satisfies(args: dict, name: str) -> bool:
    """The two tools' schemas, checked by hand: every required key, no other, each value of its kind."""
    if name == "w":
        return set(args) == {"city", "hot"} and args["city"] in ("Oslo", "Rome") and isinstance(args["hot"], bool)
    return set(args) == {"a"} and type(args["a"]) is int and 0 <= args["a"] <= 9


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from test_chat_template import chat_folder

    return chat_folder(tmp_path_factory.mktemp("tools") / "qwen", TOOLS_TEMPLATE, "<|im_end|>")


def started(path, *flags):
    server = start(path, "--kernels", "reference", *flags)
    server.RequestHandlerClass.log_message = lambda *a: None
    return server


@pytest.fixture(scope="module", params=["engine", "max-batch-1"])
def both(request, folder):
    """The folder served with the engine, then with --max-batch 1 (generate() under a lock); and BAN: a logit_bias
    that bans the whitespace-only tokens (the grammar allows JSON's whitespace anywhere, and a random model draws
    it until max_tokens: the bias leaves the grammar's other tokens to draw from)."""
    path, theirs, _ = folder
    server = started(path, *(["--max-batch", "1"] if request.param == "max-batch-1" else []))
    assert (server.app.engine is None) == (request.param == "max-batch-1")
    ban = {str(i): -100 for i in range(len(theirs)) if not theirs.decode([i]).strip()}
    yield server, theirs, ban
    server.shutdown()
    server.server_close()


def ask(server, ban, **fields):
    return call(server, "/v1/chat/completions", {"messages": USER, "tools": TOOLS, "max_tokens": 60,
                                                 "logit_bias": ban, **fields})


def test_named_and_required_calls_hold_to_the_schemas_each_choice_its_own(both):
    server, theirs, ban = both
    status, body = ask(server, ban, tool_choice=NAMED, n=2, seed=3, logprobs=True, top_logprobs=2)
    assert status == 200, body
    texts = set()
    for c in body["choices"]:
        (tc,) = c["message"]["tool_calls"]
        assert c["message"]["content"] == "" and c["finish_reason"] == "stop"  # (vLLM's: the finish as drawn)
        assert tc["type"] == "function" and tc["id"].startswith("chatcmpl-tool-")
        assert tc["function"]["name"] == "w" and satisfies(json.loads(tc["function"]["arguments"]),
                                                                     "w")
        # each choice's logprobs are its own tokens': their texts spell its arguments, then the end of turn
        spelled = "".join(t["token"] for t in c["logprobs"]["content"])
        assert spelled == tc["function"]["arguments"] + "<|im_end|>"
        texts.add(tc["function"]["arguments"])
    assert len(texts) == 2  # (seed 3: the choices draw different calls, so one given the other's logprobs shows)
    assert len({c["message"]["tool_calls"][0]["id"] for c in body["choices"]}) == 2
    # "required": an array of calls, each one of the tools with its parameters; one with parallel_tool_calls false
    status, body = ask(server, ban, tool_choice="required", parallel_tool_calls=False, n=2, seed=3)
    assert status == 200, body
    for c in body["choices"]:
        (tc,) = c["message"]["tool_calls"]
        assert c["finish_reason"] == "tool_calls" and c["message"]["content"] == ""
        assert satisfies(json.loads(tc["function"]["arguments"]), tc["function"]["name"])
    # parallel calls (the default): this seed's array ends after one call; seed 3's second call is cut by max_tokens,
    # and an array that does not parse stays the content, with no calls
    c = ask(server, ban, tool_choice="required", seed=1)[1]["choices"][0]
    assert c["finish_reason"] == "tool_calls" and len(c["message"]["tool_calls"]) == 1
    c = ask(server, ban, tool_choice="required", seed=3)[1]["choices"][0]
    assert c["finish_reason"] == "length" and "tool_calls" not in c["message"]
    assert c["message"]["content"].startswith('[{"name":"add","parameters":{"a":')


def test_the_schemas_are_vllms():
    """A named tool's parameters (an empty object's where none); "required"'s array of {name, parameters}, one item
    at most without parallel_tool_calls, each tool's references pointed at its place in the array."""
    from tritongpt.train.serve import check_tools, tool_schema

    tools = check_tools([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}, "$defs": {"P": {"type": "integer"}}}}},
        {"function": {"name": "g"}}])
    assert tool_schema(tools, "g", True) == {"type": "object", "properties": {}}
    many, one = tool_schema(tools, None, True), tool_schema(tools, None, False)
    assert many["minItems"] == 1 and "maxItems" not in many and one["maxItems"] == 1
    assert [i["properties"]["name"] for i in many["items"]["anyOf"]] == [{"type": "string", "enum": ["f"]},
                                                                           {"type": "string", "enum": ["g"]}]
    f = many["items"]["anyOf"][0]["properties"]["parameters"]
    assert f["properties"]["p"] == {"$ref": "#/items/anyOf/0/properties/parameters/$defs/P"} and f["$defs"]
    assert tools[0]["function"]["parameters"]["properties"]["p"] == {"$ref": "#/$defs/P"}  # (the template's as given)


def test_tools_and_tool_messages_reach_the_prompt_as_transformers_renders_them(both):
    server, theirs, ban = both
    args = {"a": 4}
    messages = USER + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": json.dumps(args)}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
    hf_messages = [dict(m, content=m["content"] or "") for m in messages]
    hf_messages[1]["tool_calls"] = [{"type": "function", "function": {"name": "add", "arguments": args}}]
    for choice in ("none", NAMED):
        status, body = ask(server, ban, messages=messages, tool_choice=choice, max_tokens=2, temperature=0)
        assert status == 200, body
        want = theirs.apply_chat_template(hf_messages, tools=TOOLS, add_generation_prompt=True, return_dict=False)
        assert body["usage"]["prompt_tokens"] == len(want)
    # "none": plain text, the tools still in the prompt (vLLM's); "required" of no tools: a 400 (test below)
    assert "tool_calls" not in ask(server, ban, tool_choice="none", max_tokens=2)[1]["choices"][0]["message"]
    status, body = ask(server, ban, tools=[], tool_choice="required", max_tokens=2)
    assert status == 400 and body["error"]["param"] == "tools", body


def test_required_of_no_tools_is_refused_not_answered_in_text():
    """tool_choice "required" with tools [] asks for a call there is none to make: answered as "none" it was text, a
    200 that said nothing (OpenAI refuses tools [] with a 400, as vLLM now does); refused, naming it. "auto" of no
    tools answers without a call, as it may, the tools still given ([]: a "tool_use" template renders the chat)."""
    from tritongpt.train.serve import APIError, tool_setting
    from tritongpt.train.tool_calls import PARSERS

    s = {"structured": None, "structured_field": None}
    with pytest.raises(APIError, match='tool_choice "required" calls one of the request\'s tools, and "tools" is '
                                       'empty') as e:
        tool_setting({"tools": [], "tool_choice": "required"}, dict(s))
    assert e.value.status == 400 and e.value.param == "tools"
    setting = tool_setting({"tools": [], "tool_choice": "auto"}, s, PARSERS["hermes"]())
    assert (setting["tools"], setting["choice"], s["structured"]) == ([], "none", None)


def test_streamed_calls_add_up_to_the_whole_answers(both):
    """Each call's first delta carries its index, id, type and name, the rest only its arguments' next text; a named
    call's add up to the whole answer's arguments, "required"'s to the same parameters (the whole answer writes
    them anew, as vLLM's)."""
    server, theirs, ban = both
    for choice, n, seed in ((NAMED, 2, 4), ("required", 1, 1), ("required", 1, 3)):
        whole = ask(server, ban, tool_choice=choice, n=n, seed=seed)[1]
        status, text = ask(server, ban, tool_choice=choice, n=n, seed=seed, stream=True)
        assert status == 200
        chunks = events(text)
        for i, c in enumerate(whole["choices"]):
            mine = [k["choices"][0] for k in chunks if k["choices"][0]["index"] == i]
            assert mine[0]["delta"] == {"role": "assistant", "content": ""}
            deltas = [d for k in mine[1:-1] for d in k["delta"]["tool_calls"]]
            firsts = [d for d in deltas if "id" in d]
            assert [d["index"] for d in firsts] == list(range(len(firsts))) and all(d["type"] == "function"
                                                                                    for d in firsts)
            assert all(set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
                       for d in deltas if "id" not in d)
            args = ["".join(d["function"]["arguments"] for d in deltas if d["index"] == k) for k in range(len(firsts))]
            calls = c["message"].get("tool_calls") or []
            if choice == NAMED:
                assert args == [calls[0]["function"]["arguments"]]
            elif calls:
                assert [f["function"]["name"] for f in firsts] == [f["function"]["name"] for f in calls]
                assert [json.loads(a) for a in args] == [json.loads(f["function"]["arguments"]) for f in calls]
            else:  # (seed 3: a second call cut by max_tokens before its parameters; the whole answer keeps the
                # text, the stream sent the first call)
                assert c["finish_reason"] == "length" and [json.loads(a) for a in args] == [{"a": 1}]
                assert c["message"]["content"].startswith('[{"name":"add","parameters":' + args[0] + "},")
            assert mine[-1]["finish_reason"] == "tool_calls"  # (vLLM's stream, once a call was streamed)


def test_the_openai_clients_shapes(both):
    openai = pytest.importorskip("openai")
    server, theirs, ban = both
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="x")
    out = client.chat.completions.create(model=str(server.app.name), messages=USER, tools=TOOLS, tool_choice=NAMED,
                                         max_tokens=40, logit_bias=ban, seed=1)
    tc = out.choices[0].message.tool_calls[0]
    assert tc.function.name == "w" and satisfies(json.loads(tc.function.arguments), "w")


@pytest.mark.parametrize("fields, param, says", [
    ({}, "tool_choice", '"auto" tool choice requires --enable-auto-tool-choice'),  # (tools given: vLLM's "auto")
    ({"tool_choice": "auto"}, "tool_choice", '"auto" tool choice requires --enable-auto-tool-choice'),
    ({"tools": None, "tool_choice": NAMED}, "tool_choice", "`tools` must be set"),
    ({"tool_choice": "any"}, "tool_choice", "Invalid value for `tool_choice`: any!"),
    ({"tool_choice": {"type": "function"}}, "tool_choice", "Invalid value for `function`"),
    ({"tool_choice": {"function": {"name": "nope"}}}, "tool_choice", "does not match any of the specified `tools`"),
    ({"tools": {"name": "f"}, "tool_choice": "none"}, "tools", "'tools' must be a list"),
    ({"tools": [{"type": "retrieval"}], "tool_choice": "none"}, "tools[0]", "function tools are the only kind"),
    ({"tools": [{"type": "function", "function": {"description": "x"}}], "tool_choice": "none"},
     "tools[0].function.name", "must be a non-empty string"),
    ({"tools": [{"type": "function", "function": {"name": "f", "args": {}}}], "tool_choice": "none"},
     "tools[0].function.args", "unknown field 'tools[0].function.args'"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}], "tool_choice": "none"},
     "tools[0].function.parameters", "must be a JSON schema object"),
    ({"tools": TOOLS + TOOLS[:1], "tool_choice": "none"}, "tools[2].function.name", "two tools are named"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}], "tool_choice":
      "required"}, "tools[0].function.parameters", "must be an object's schema"),  # (arguments are an object's text)
    ({"tool_choice": NAMED, "structured_outputs": {"regex": "a"}}, "structured_outputs", "cannot be used with"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format",
     "cannot be used with"),
    ({"tool_choice": NAMED, "parallel_tool_calls": "no"}, "parallel_tool_calls", "must be true or false"),
    ({"tool_choice": "none", "functions": [{"name": "f"}]}, "functions", "'functions' is not supported"),
    ({"tool_choice": "none", "messages": USER + [{"role": "tool", "tool_call_id": "x", "content": "1"}]},
     "messages", "must be an earlier assistant's tool call's id"),
    ({"tool_choice": "none", "messages": USER + [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "add", "arguments": "[1]"}}]}, *USER]},
     "messages", "arguments must be the JSON text of an object"),
    ({"tool_choice": "none", "messages": [{"role": "function", "content": "1"}]}, "messages", "role 'function'"),
    ({"tool_choice": "none", "messages": USER + [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
      "function": {"name": "add", "arguments": '{"a": "<|im_end|>"}'}}]},
      {"role": "tool", "tool_call_id": "c", "content": "2"}, *USER]}, "messages",
     "spells the special token '<|im_end|>'"),  # (a template writes a call's arguments: no forged turn)
    ({"tool_choice": NAMED, "tools": [dict(TOOLS[0], function=dict(TOOLS[0]["function"], description="<|im_start|>"))]},
     "tools", "tools[0] spells the special token '<|im_start|>'"),
    ({"tool_choice": "none", "messages": USER + [{"role": "assistant", "content": "x"}]}, "messages",
     "must end with a user or tool message"),
    # (arguments nested past the JSON parser's depth: its RecursionError was a 500)
    ({"tool_choice": "none", "messages": USER + [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "add", "arguments": "[" * 100_000 + "]" * 100_000}}]},
      {"role": "tool", "tool_call_id": "c", "content": "2"}]}, "messages", "arguments must be the JSON text"),
    # (no tools: the plain chat path's refusal was a 400 with no param)
    ({"tools": None, "messages": [{"role": "user", "content": "<|im_start|>x"}]}, "messages",
     "spells the special token '<|im_start|>'"),
])
def test_refusals_name_the_field(folder, both, fields, param, says):
    server, theirs, ban = both
    if server.app.engine is None:  # (refused before anything is drawn: once is enough)
        pytest.skip("the engine's server checks the same request")
    status, body = ask(server, ban, **fields)
    assert status == 400 and body["error"]["param"] == param and says in body["error"]["message"], body


def test_a_template_without_tools_and_tritongpts_own_format_refuse_what_they_cannot_render(both, tmp_path,
                                                                                            monkeypatch):
    from test_chat_template import CHATML

    server, theirs, ban = both
    if server.app.engine is None:
        pytest.skip("the engine's server checks the same request")
    monkeypatch.setattr(server.app.tok, "chat_template", CHATML)  # (renders neither tools nor tool messages)
    status, body = ask(server, ban, tool_choice=NAMED)
    assert status == 400 and body["error"]["param"] == "tools" and "renders no tools" in body["error"]["message"]
    status, body = ask(server, ban, tool_choice="none", messages=USER + [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "add", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "sunny"}])
    assert status == 400 and "messages[1]: the model's chat template drops this assistant's tool call" in \
        body["error"]["message"]
    assert call(server, "/v1/completions", {"prompt": "a", "tools": TOOLS})[1]["error"]["param"] == "tools"
    # tritongpt's plain-text chat format: "none" answers as without tools; a call, or tool messages, refused
    tok = tiny_run(tmp_path / "run", "chat")
    plain = started(tmp_path / "run")
    try:
        alone = call(plain, "/v1/chat/completions", {"messages": USER, "max_tokens": 4, "temperature": 0})[1]
        body = call(plain, "/v1/chat/completions", {"messages": USER, "tools": TOOLS, "tool_choice": "none",
                                                    "max_tokens": 4, "temperature": 0})[1]
        assert body["choices"][0]["message"] == alone["choices"][0]["message"] and body["usage"] == alone["usage"]
        status, body = call(plain, "/v1/chat/completions", {"messages": USER, "tools": TOOLS, "tool_choice": NAMED})
        assert status == 400 and body["error"]["param"] == "tool_choice" and "no place for tools" in \
            body["error"]["message"]
        status, body = call(plain, "/v1/chat/completions", {"messages": USER + [
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "add", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c", "content": "1"}]})
        assert status == 400 and body["error"]["param"] == "messages" and "no place for them" in \
            body["error"]["message"]
        assert tok.vocab_size
    finally:
        plain.shutdown()
        plain.server_close()


# A template that writes each tool result as JSON (Llama 3.1's does: `message.content | tojson`) and a call's name and
# arguments; and one that lists the tools but drops every call (their names are still in the prompt, in the list)
TOJSON_RESULTS = TOOLS_TEMPLATE.replace("message.content + '<|im_end|>", "(message.content | tojson) + '<|im_end|>")
DROPS_CALLS = TOOLS_TEMPLATE.replace("{%- for call in message.tool_calls or [] %}", "{%- for call in [] %}")
DROPS_ARGUMENTS = TOOLS_TEMPLATE.replace("(call.function.arguments | tojson)", "''")


def test_the_template_check_sees_what_is_rendered_not_a_text_search(folder, monkeypatch):
    """A tool result a template escapes (tojson) is rendered, not dropped; a call whose name is in the tools' list
    but not in the conversation, or whose arguments are dropped, is dropped: the check renders the results and calls
    changed (each marked, all at once, then alone where its marker proves nothing) and looks for the change, where a
    search for their text finds the tools' list or misses the escapes."""
    from tritongpt.train.chat_template import tool_prompt
    from tritongpt.train.serve import check_tools, tool_messages
    from tritongpt.train.tokenizer import get_tokenizer

    tok = get_tokenizer(folder[0])
    messages = tool_messages(USER + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "w", "arguments": '{"city": "Oslo", "hot": false}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": 'it said "cold" \\ 2°'}])
    tools = check_tools(TOOLS)
    assert 'it said "cold"' in tool_prompt(tok, messages, tools)
    monkeypatch.setattr(tok, "chat_template", TOJSON_RESULTS)
    assert '\\"cold\\"' in tool_prompt(tok, messages, tools)  # (escaped, yet there)
    for template in (DROPS_CALLS, DROPS_ARGUMENTS):
        monkeypatch.setattr(tok, "chat_template", template)
        with pytest.raises(UserError, match=r"messages\[1\]: the model's chat template drops this assistant's tool"):
            tool_prompt(tok, messages, tools)


def agent_chat(results: int, length: int, name=lambda k: "w") -> list:
    """A user's question, then `results` calls (call k named name(k)) each answered by a tool result (quotes, a
    backslash, HTML's specials and non-ASCII in it), then user and assistant turns to `length` messages."""
    from tritongpt.train.serve import tool_messages

    messages = list(USER)
    for k in range(results):
        messages += [{"role": "assistant", "content": None, "tool_calls": [{"id": f"c{k}", "type": "function",
                      "function": {"name": name(k), "arguments": json.dumps({"city": "Oslo", "hot": k % 2 == 0})}}]},
                     {"role": "tool", "tool_call_id": f"c{k}", "content": f'<{k}> said "cold" & \\ 2°'}]
    while len(messages) < length:
        messages.append({"role": "user" if messages[-1]["role"] != "user" else "assistant", "content": "and then?"})
    return tool_messages(messages if messages[-1]["role"] != "assistant" else messages[:-1])


def test_the_template_check_takes_a_few_renderings_whatever_the_chat_length(folder, monkeypatch):
    """Every result and call is changed at once, each by a marker of its own, and found in one rendering (escaped by
    tojson or |e too): a chat of 100 messages with 30 results and calls takes 4 renderings (the prompt, it without
    tools, the results' and arguments' markers, the names'), not one a result and two a call (92)."""
    from tritongpt.train import chat_template
    from tritongpt.train.serve import check_tools
    from tritongpt.train.tokenizer import get_tokenizer

    tok, tools, messages = get_tokenizer(folder[0]), check_tools(TOOLS), agent_chat(30, 100)
    assert len(messages) == 100 and sum(m["role"] == "tool" for m in messages) == 30
    renders, render = [], chat_template.render
    monkeypatch.setattr(chat_template, "render", lambda *a, **k: renders.append(1) or render(*a, **k))
    escaped = TOOLS_TEMPLATE.replace("message.content + '<|im_end|>", "(message.content | e) + '<|im_end|>")
    # (the arguments written by tojson indented, or as Python writes a dict: their marker's pair taken out as well)
    indented, as_dict = (TOOLS_TEMPLATE.replace("arguments | tojson)", f"arguments | {how})")
                         for how in ("tojson(indent=2)", "string"))
    for template in (TOOLS_TEMPLATE, TOJSON_RESULTS, indented, as_dict, escaped):
        monkeypatch.setattr(tok, "chat_template", template)
        renders.clear()
        text = chat_template.tool_prompt(tok, messages, tools)
        assert len(renders) <= 4 and text == render(tok, messages, True, tools)
    assert '&lt;7&gt; said &#34;cold&#34; &amp;' in text  # (|e's: the results reach it escaped)
    # continued (vLLM's continue_final_message): the final answer cut where its text ends, as few renderings
    monkeypatch.setattr(tok, "chat_template", TOOLS_TEMPLATE)
    renders.clear()
    text = chat_template.tool_prompt(tok, messages + [{"role": "assistant", "content": "it is"}], tools,
                                     mode="continue")
    assert len(renders) <= 4 and text.endswith("<|im_start|>assistant\nit is")


def test_one_dropped_item_among_many_is_named_as_before(folder, monkeypatch):
    """A template that drops one result, or one call's arguments, in the middle of 30 of each is refused naming that
    message; one that shows a result cut short (no room for its marker) or refuses a call whose name is no tool's
    (a marked name: refused, so read) passes, each such item then probed alone as before."""
    from tritongpt.train import chat_template
    from tritongpt.train.serve import check_tools
    from tritongpt.train.tokenizer import get_tokenizer

    tok, tools = get_tokenizer(folder[0]), check_tools(TOOLS)
    messages = agent_chat(30, 70, name=lambda k: "add" if k == 17 else "w")  # (call 17 at 35, its result at 36)
    drops_result = TOOLS_TEMPLATE.replace("{%- if message.role == 'tool' %}",
                                          "{%- if message.role == 'tool' and loop.index0 == 24 %}"
                                          "{%- elif message.role == 'tool' %}")
    drops_adds_arguments = TOOLS_TEMPLATE.replace("(call.function.arguments | tojson)",
                                                  "((call.function.arguments | tojson) if call.function.name != 'add' "
                                                  "else '')")
    for template, at, what in ((drops_result, 24, "tool result"), (drops_adds_arguments, 35, "assistant's tool "
                                                                                           "call's arguments")):
        monkeypatch.setattr(tok, "chat_template", template)
        with pytest.raises(UserError, match=rf"^messages\[{at}\]: the model's chat template drops this {what} "):
            chat_template.tool_prompt(tok, messages, tools)
    cut = TOOLS_TEMPLATE.replace("message.content + '<|im_end|>", "message.content[:12] + '<|im_end|>")
    known = TOOLS_TEMPLATE.replace(
        "{{- call.function.name", "{%- if call.function.name not in tools | map(attribute='function.name') %}"
        "{{- raise_exception('no tool ' + call.function.name) }}{%- endif %}{{- call.function.name")
    for template in (cut, known):
        monkeypatch.setattr(tok, "chat_template", template)
        assert chat_template.tool_prompt(tok, messages, tools) == chat_template.render(tok, messages, True, tools)


# Qwen3-Coder's chat template (Qwen/Qwen3-Coder-30B-A3B-Instruct's tokenizer_config.json), as published: each
# argument of a call written apart, <parameter=KEY>\nVALUE\n</parameter>\n, not as JSON
QWEN3_CODER = r"""{% macro render_extra_keys(json_dict, handled_keys) %}
    {%- if json_dict is mapping %}
        {%- for json_key in json_dict if json_key not in handled_keys %}
            {%- if json_dict[json_key] is mapping or (json_dict[json_key] is sequence and json_dict[json_key] is not string) %}
                {{- '\n<' ~ json_key ~ '>' ~ (json_dict[json_key] | tojson | safe) ~ '</' ~ json_key ~ '>' }}
            {%- else %}
                {{-'\n<' ~ json_key ~ '>' ~ (json_dict[json_key] | string) ~ '</' ~ json_key ~ '>' }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
{% endmacro %}

{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{%- if not tools is defined %}
    {%- set tools = [] %}
{%- endif %}

{%- if system_message is defined %}
    {{- "<|im_start|>system\n" + system_message }}
{%- else %}
    {%- if tools is iterable and tools | length > 0 %}
        {{- "<|im_start|>system\nYou are Qwen, a helpful AI assistant that can interact with a computer to solve tasks." }}
    {%- endif %}
{%- endif %}
{%- if tools is iterable and tools | length > 0 %}
    {{- "\n\n# Tools\n\nYou have access to the following functions:\n\n" }}
    {{- "<tools>" }}
    {%- for tool in tools %}
        {%- if tool.function is defined %}
            {%- set tool = tool.function %}
        {%- endif %}
        {{- "\n<function>\n<name>" ~ tool.name ~ "</name>" }}
        {%- if tool.description is defined %}
            {{- '\n<description>' ~ (tool.description | trim) ~ '</description>' }}
        {%- endif %}
        {{- '\n<parameters>' }}
        {%- if tool.parameters is defined and tool.parameters is mapping and tool.parameters.properties is defined and tool.parameters.properties is mapping %}
            {%- for param_name, param_fields in tool.parameters.properties|items %}
                {{- '\n<parameter>' }}
                {{- '\n<name>' ~ param_name ~ '</name>' }}
                {%- if param_fields.type is defined %}
                    {{- '\n<type>' ~ (param_fields.type | string) ~ '</type>' }}
                {%- endif %}
                {%- if param_fields.description is defined %}
                    {{- '\n<description>' ~ (param_fields.description | trim) ~ '</description>' }}
                {%- endif %}
                {%- set handled_keys = ['name', 'type', 'description'] %}
                {{- render_extra_keys(param_fields, handled_keys) }}
                {{- '\n</parameter>' }}
            {%- endfor %}
        {%- endif %}
        {% set handled_keys = ['type', 'properties'] %}
        {{- render_extra_keys(tool.parameters, handled_keys) }}
        {{- '\n</parameters>' }}
        {%- set handled_keys = ['type', 'name', 'description', 'parameters'] %}
        {{- render_extra_keys(tool, handled_keys) }}
        {{- '\n</function>' }}
    {%- endfor %}
    {{- "\n</tools>" }}
    {{- '\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple lines\n</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n- Function calls MUST follow the specified format: an inner <function=...></function> block must be nested within <tool_call></tool_call> XML tags\n- Required parameters MUST be specified\n- You may provide optional reasoning for your function call in natural language BEFORE the function call, but NOT after\n- If there is no function call available, answer the question like normal with your current knowledge and do not tell the user about function calls\n</IMPORTANT>' }}
{%- endif %}
{%- if system_message is defined %}
    {{- '<|im_end|>\n' }}
{%- else %}
    {%- if tools is iterable and tools | length > 0 %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if message.role == "assistant" and message.tool_calls is defined and message.tool_calls is iterable and message.tool_calls | length > 0 %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content is defined and message.content is string and message.content | trim | length > 0 %}
            {{- '\n' + message.content | trim + '\n' }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n<function=' + tool_call.name + '>\n' }}
            {%- if tool_call.arguments is defined %}
                {%- for args_name, args_value in tool_call.arguments|items %}
                    {{- '<parameter=' + args_name + '>\n' }}
                    {%- set args_value = args_value | tojson | safe if args_value is mapping or (args_value is sequence and args_value is not string) else args_value | string %}
                    {{- args_value }}
                    {{- '\n</parameter>\n' }}
                {%- endfor %}
            {%- endif %}
            {{- '</function>\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "user" or message.role == "system" or message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.previtem and loop.previtem.role != "tool" %}
            {{- '<|im_start|>user\n' }}
        {%- endif %}
        {{- '<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>\n' }}
        {%- if not loop.last and loop.nextitem.role != "tool" %}
            {{- '<|im_end|>\n' }}
        {%- elif loop.last %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""


def test_a_template_that_writes_each_argument_apart_takes_as_few_renderings(folder, monkeypatch):
    """Qwen3-Coder's template writes a call's arguments a pair at a time in words of its own, not as JSON: the
    arguments' markers are found with those words around them (taken out, the rendering is the prompt), so a chat of
    100 messages with 30 calls and results takes 4 renderings, not one more a call; one that drops a call, a call's
    arguments or a result among them is still refused naming that message."""
    from tritongpt.train import chat_template
    from tritongpt.train.serve import check_tools
    from tritongpt.train.tokenizer import get_tokenizer

    tok, tools = get_tokenizer(folder[0]), check_tools(TOOLS)
    messages = agent_chat(30, 100, name=lambda k: "add" if k == 17 else "w")  # (call 17 at 35, its result at 36)
    renders, render = [], chat_template.render
    monkeypatch.setattr(chat_template, "render", lambda *a, **k: renders.append(1) or render(*a, **k))
    monkeypatch.setattr(tok, "chat_template", QWEN3_CODER)
    text = chat_template.tool_prompt(tok, messages, tools)
    assert len(renders) <= 4 and text == render(tok, messages, True, tools)
    assert "<function=add>\n<parameter=city>\nOslo\n</parameter>\n<parameter=hot>\nFalse\n</parameter>" in text
    drops_call = QWEN3_CODER.replace("{%- for tool_call in message.tool_calls %}",
                                     "{%- for tool_call in message.tool_calls if tool_call.function.name != 'add' %}")
    drops_arguments = QWEN3_CODER.replace("{%- if tool_call.arguments is defined %}",
                                          "{%- if tool_call.arguments is defined and tool_call.name != 'add' %}")
    drops_result = QWEN3_CODER.replace("{{- message.content }}", "{{- message.content if loop.index0 != 24 }}")
    # (a call dropped by its name: its name changed alone is shown, its arguments changed alone are not)
    for template, at, what in ((drops_call, 35, "assistant's tool call's arguments"),
                               (drops_arguments, 35, "assistant's tool call's arguments"),
                               (drops_result, 24, "tool result")):
        monkeypatch.setattr(tok, "chat_template", template)
        with pytest.raises(UserError, match=rf"^messages\[{at}\]: the model's chat template drops this {what} "):
            chat_template.tool_prompt(tok, messages, tools)


def test_a_template_that_drops_one_argument_among_a_calls_is_refused_naming_it(folder, monkeypatch):
    """A call's arguments changed whole change the prompt where a template writes any one of them, and the arguments'
    marker pair is written by one that writes only the keys it looks like: each argument whose value is text has a
    marker of its own in the same rendering (no rendering more where they are all found), and one the template drops
    by its name, or by what its name looks like, is refused naming it."""
    from tritongpt.train import chat_template
    from tritongpt.train.serve import check_tools
    from tritongpt.train.tokenizer import get_tokenizer

    tok, tools = get_tokenizer(folder[0]), check_tools(TOOLS)
    messages = agent_chat(3, 9, name=lambda k: "add" if k == 1 else "w")  # (calls at 1, 3 and 5)
    messages[3]["tool_calls"][0]["function"]["arguments"] = {"city": "Rome", "note": "wet", "hot": True}
    each = "{%- for args_name, args_value in tool_call.arguments|items %}"
    renders, render = [], chat_template.render
    monkeypatch.setattr(chat_template, "render", lambda *a, **k: renders.append(1) or render(*a, **k))
    monkeypatch.setattr(tok, "chat_template", QWEN3_CODER)
    assert "<parameter=note>\nwet\n</parameter>" in chat_template.tool_prompt(tok, messages, tools)
    assert len(renders) <= 4
    for template, at, key in ((QWEN3_CODER.replace(each, each[:-3] + " if args_name != 'note' %}"), 3, "note"),
                              (QWEN3_CODER.replace(each, each[:-3] + " if args_name | length > 12 %}"), 1, "city"),
                              (TOOLS_TEMPLATE.replace("(call.function.arguments | tojson)",
                                                      "(call.function.arguments | dictsort | rejectattr(0, 'eq', "
                                                      "'note') | list | tojson)"), 3, "note")):
        monkeypatch.setattr(tok, "chat_template", template)
        with pytest.raises(UserError, match=rf"^messages\[{at}\]: the model's chat template drops this assistant's "
                                            rf"tool call's argument '{key}' \(the prompt is the same without it\)"):
            chat_template.tool_prompt(tok, messages, tools)


def test_a_template_that_tests_what_it_shows_is_refused_as_before(folder, monkeypatch):
    """All marked at once, the results and arguments are not what the template tests in the prompt: one that shows a
    result only if it is long, or the results only where none is "ok", or a result only after a call with arguments,
    shows the marked ones it drops. The marked rendering is then more than the prompt and its markers, proves
    nothing, and each item is probed alone: the first it drops is named, as before."""
    from tritongpt.train.chat_template import render, tool_prompt
    from tritongpt.train.serve import check_tools, tool_messages
    from tritongpt.train.tokenizer import get_tokenizer

    tok, tools = get_tokenizer(folder[0]), check_tools(TOOLS)
    messages = list(USER)
    for k, (arguments, result) in enumerate((('{"city": "Oslo", "hot": false}', "ok"), ("{}", "it is cold"))):
        messages += [{"role": "assistant", "content": None, "tool_calls": [
                         {"id": f"c{k}", "type": "function", "function": {"name": "w", "arguments": arguments}}]},
                     {"role": "tool", "tool_call_id": f"c{k}", "content": result}]
    messages = tool_messages(messages)
    def drops_results(where: str, before: str = "") -> str:  # (a result it drops: not written as any other turn)
        return TOOLS_TEMPLATE.replace("{%- for message in messages %}{%- if message.role == 'tool' %}",
                                      before + "{%- for message in messages %}{%- if message.role == 'tool' and "
                                      + where + " %}{%- elif message.role == 'tool' %}")

    long_only = drops_results("message.content | length <= 12")
    none_ok = drops_results("ok", "{%- set ok = messages | selectattr('content', 'eq', 'ok') | list %}")
    after_arguments = drops_results("not last.args", "{%- set last = namespace(args={}) %}").replace(
        "{%- for call in message.tool_calls or [] %}",
        "{%- for call in message.tool_calls or [] %}{%- set last.args = call.function.arguments %}")
    for template, at in ((long_only, 2), (none_ok, 4), (after_arguments, 4)):
        monkeypatch.setattr(tok, "chat_template", template)
        assert "it is cold" not in render(tok, messages, True, tools)  # (it drops the last result)
        with pytest.raises(UserError, match=rf"^messages\[{at}\]: the model's chat template drops this tool result "):
            tool_prompt(tok, messages, tools)


def test_a_result_of_text_parts_reaches_the_template_as_transformers_gives_it(folder, monkeypatch):
    """A tool result whose content is a list of text parts (OpenAI's, transformers' shape; serve joins them first)
    is given to the template as it is: its text checked for special tokens, joined as templates join parts, proven
    to reach the prompt by a marker in its last part, refused by name where the template drops it; a part that is
    not text is refused naming it."""
    from tritongpt.train import chat_template
    from tritongpt.train.serve import check_tools
    from tritongpt.train.tokenizer import get_tokenizer

    tok, tools = get_tokenizer(folder[0]), check_tools(TOOLS)
    parts = [{"type": "text", "text": "it is "}, {"type": "text", "text": "cold"}]
    messages = agent_chat(2, 5)
    messages[2] = {**messages[2], "content": parts}
    joins = TOOLS_TEMPLATE.replace("message.content + '<|im_end|>",
                                   "(message.content if message.content is string else message.content | "
                                   "map(attribute='text') | join) + '<|im_end|>")
    renders, render = [], chat_template.render
    monkeypatch.setattr(chat_template, "render", lambda *a, **k: renders.append(1) or render(*a, **k))
    monkeypatch.setattr(tok, "chat_template", joins)
    text = chat_template.tool_prompt(tok, messages, tools)
    assert "tool\nit is cold<|im_end|>" in text and text == render(tok, messages, True, tools) and len(renders) <= 4
    monkeypatch.setattr(tok, "chat_template", joins.replace("message.content | map", "[] | map"))  # (drops lists)
    with pytest.raises(UserError, match=r"^messages\[2\]: the model's chat template drops this tool result "):
        chat_template.tool_prompt(tok, messages, tools)
    monkeypatch.setattr(tok, "chat_template", joins)
    for part, says in (({"type": "text", "text": "<|im_end|>"}, r"^message 2 \(tool\) spells the special token "
                                                                 r"'<\|im_end\|>'"),
                       ({"type": "image_url", "image_url": {"url": "x"}}, r"^messages\[2\]: content\[1\] is a "
                                                                           r"'image_url' part, not")):
        with pytest.raises(UserError, match=says):
            chat_template.tool_prompt(tok, messages[:2] + [{**messages[2], "content": parts[:1] + [part]}]
                                      + messages[3:], tools)
    with pytest.raises(UserError, match=r"^messages\[2\]: content must be text, a list of text parts or null, got "
                                        "dict"):
        chat_template.tool_prompt(tok, messages[:2] + [{**messages[2], "content": parts[0]}] + messages[3:], tools)


def test_call_ids_are_text_a_template_may_write(folder):
    """Templates write a call's id and a result's tool_call_id (Mistral's do): neither may spell a special token."""
    from tritongpt.train.chat_template import tool_prompt
    from tritongpt.train.serve import tool_messages
    from tritongpt.train.tokenizer import get_tokenizer

    tok = get_tokenizer(folder[0])
    messages = tool_messages(USER + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "<|im_end|>", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}]},
        {"role": "tool", "tool_call_id": "<|im_end|>", "content": "2"}])
    with pytest.raises(UserError, match="message 1 .* spells the special token '<\\|im_end"):
        tool_prompt(tok, messages, None)
    messages[1]["tool_calls"][0]["id"] = "c"
    with pytest.raises(UserError, match="message 2 .* spells the special token '<\\|im_end"):
        tool_prompt(tok, messages, None)  # (the result's id alone)


def test_a_schema_xgrammar_cannot_compile_is_named_by_its_tool(both):
    server, theirs, ban = both
    if server.app.engine is None:
        pytest.skip("the engine's server checks the same request")
    broken = {"type": "function", "function": {"name": "b", "parameters": {
        "type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}}}}
    for choice in ("required", {"type": "function", "function": {"name": "b"}}):
        status, body = ask(server, ban, tools=TOOLS + [broken], tool_choice=choice)
        assert status == 400 and body["error"]["param"] == "tools[2].function.parameters", body
        assert "tools[2] ('b')" in body["error"]["message"] and "$defs/missing" in body["error"]["message"], body


def test_required_keeps_each_tools_references_its_own():
    """"required" nests each tool's schema in the array's: its local $refs ("#": itself, recursive; "#/$defs/P",
    "#/definitions/P") are rewritten to point there, so a tree's children are trees, not arrays of calls, and two
    tools may each define a $defs entry of one name."""
    from xgrammar.testing import _is_grammar_accept_string

    from tritongpt.train.serve import check_tools, tool_schema

    tree = {"type": "object", "properties": {"v": {"$ref": "#/definitions/V"}, "kids": {"type": "array",
            "items": {"$ref": "#"}}}, "required": ["v", "kids"], "additionalProperties": False,
            "definitions": {"V": {"type": "integer"}}}
    pick = {"type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}, "required": ["p"],
            "additionalProperties": False, "$defs": {"P": {"enum": ["x", "y"]}}}
    other = dict(pick, properties={"p": {"$ref": "#/$defs/P"}, "const": {"const": {"$ref": "#"}}},
                 **{"$defs": {"P": {"type": "boolean"}}})
    tools = check_tools([{"function": {"name": n, "parameters": p}} for n, p in (("t", tree), ("a", pick),
                                                                               ("b", other))])
    grammar = xgr.Grammar.from_json_schema(json.dumps(tool_schema(tools, None, True)))
    for text, ok in (('[{"name":"t","parameters":{"v":1,"kids":[{"v":2,"kids":[]}]}}]', True),
                     ('[{"name":"t","parameters":{"v":1,"kids":[[{"name":"t","parameters":{"v":2,"kids":[]}}]]}}]',
                      False),
                     ('[{"name":"a","parameters":{"p":"x"}},{"name":"b","parameters":{"p":true}}]', True),
                     ('[{"name":"b","parameters":{"p":"x"}}]', False),
                     ('[{"name":"b","parameters":{"p":false,"const":{"$ref":"#"}}}]', True)):
        assert _is_grammar_accept_string(grammar, text) == ok, text
    assert tools[0]["function"]["parameters"] == tree  # (the request's tools as they were: the template's)


def test_none_answers_without_the_tools_where_the_prompts_are_not_the_chat_template(both, monkeypatch):
    """A run tuned on alpaca prompts whose tokenizer still carries a chat template: tool_choice "none" is answered in
    its alpaca prompt, as without tools (not refused as a call); a call is refused."""
    server, theirs, ban = both
    if server.app.engine is None:
        pytest.skip("the engine's server checks the same request")
    monkeypatch.setattr(server.app, "template", "alpaca")
    alone = ask(server, ban, tools=None, max_tokens=2, temperature=0)
    status, body = ask(server, ban, tool_choice="none", max_tokens=2, temperature=0)
    assert status == 200 and body["usage"] == alone[1]["usage"], body
    status, body = ask(server, ban, tool_choice=NAMED)
    assert status == 400 and "its alpaca prompts, which has no place for tools" in body["error"]["message"]


def test_tokenize_renders_messages_with_their_tools(both):
    """vLLM's /tokenize takes `tools` beside `messages`: the ids the chat completion that calls a tool prompts
    (transformers' apply_chat_template(tools=)); with `prompt`, refused by name."""
    from test_serve import call

    server, theirs, ban = both
    status, body = call(server, "/tokenize", {"messages": USER, "tools": TOOLS})
    assert status == 200, body
    assert body["tokens"] == theirs.apply_chat_template(USER, tools=TOOLS, add_generation_prompt=True,
                                                        return_dict=False)
    assert body["count"] == ask(server, ban, tool_choice=NAMED, max_tokens=1)[1]["usage"]["prompt_tokens"]
    status, body = call(server, "/tokenize", {"prompt": "the cat", "tools": TOOLS})
    assert status == 400 and body["error"]["param"] == "tools"


# Hermes' syntax, the answer held to it by a regex (a random model writes no call of itself): text, then a call
HERMES = r'Hi<tool_call>\{"name": "add", "arguments": \{"a": [0-9]\}\}</tool_call>'


def test_auto_finds_the_calls_the_model_writes_in_its_own_syntax(both, monkeypatch):
    """serve --enable-auto-tool-choice --tool-call-parser hermes: tool_choice "auto" (the default once tools are
    given) leaves the answer free; the parser finds its calls (the text before them the content, finish
    "tool_calls"), streamed as they are drawn; an answer with none is all content. The request's own structured
    outputs hold beside "auto" (here: the call's syntax)."""
    from tritongpt.train.tool_calls import Hermes

    server, theirs, ban = both
    monkeypatch.setattr(server.app, "tool_parser", Hermes())
    for fields in ({}, {"tool_choice": "auto"}):
        status, body = ask(server, ban, structured_outputs={"regex": HERMES}, n=2, seed=5, max_tokens=86, **fields)
        assert status == 200, body
        for c in body["choices"]:
            assert "tool_calls" in c["message"], c
            (tc,) = c["message"]["tool_calls"]
            assert c["finish_reason"] == "tool_calls" and c["message"]["content"] == "Hi"
            assert tc["function"]["name"] == "add" and satisfies(json.loads(tc["function"]["arguments"]), "add")
            assert tc["id"].startswith("chatcmpl-tool-")
    status, text = ask(server, ban, structured_outputs={"regex": HERMES}, n=2, seed=5, max_tokens=86,
                       stream=True)
    assert status == 200
    chunks = [k["choices"][0] for k in events(text)]
    for i, c in enumerate(body["choices"]):
        mine = [k for k in chunks if k["index"] == i]
        assert "".join(k["delta"].get("content") or "" for k in mine) == "Hi"
        deltas = [d for k in mine for d in k["delta"].get("tool_calls") or ()]
        assert deltas[0]["function"]["name"] == "add" and {d["index"] for d in deltas} == {0}
        # (the regex writes the arguments as json.dumps does: the drawn text and the parsed one written anew agree)
        assert "".join(d["function"]["arguments"] for d in deltas) == c["message"]["tool_calls"][0]["function"][
            "arguments"]
        assert mine[-1]["finish_reason"] == "tool_calls"
    # no call in the answer: its text the content, as without tools
    status, body = ask(server, ban, max_tokens=4, seed=2)
    message = body["choices"][0]["message"]
    assert status == 200 and "tool_calls" not in message and body["choices"][0]["finish_reason"] == "length"
    status, text = ask(server, ban, max_tokens=4, seed=2, stream=True)
    chunks = [k["choices"][0] for k in events(text)]
    assert "".join(k["delta"].get("content") or "" for k in chunks) == message["content"]
    assert chunks[-1]["finish_reason"] == "length" and not any("tool_calls" in k["delta"] for k in chunks)


@pytest.mark.parametrize("name, regex, content", [
    ("pythonic", r"\[add\(a=[0-9]\)\]", None),
    ("qwen3_coder", r"Hi<function=add><parameter=a>[0-9]</parameter></function>", "Hi"),  # (vLLM's: no <tool_call>)
    ("mistral", r'Hi\[TOOL_CALLS\]add\[ARGS\]\{"a": [0-9]\}', "Hi")])  # (v11)
def test_the_other_parsers_find_their_syntax_whole_and_streamed(folder, name, regex, content):
    """Each parser over the server (the engine), the random model held to its syntax by a regex: the call found
    (qwen3_coder's value typed by the request's tool: ADD's integer), the same streamed."""
    from tritongpt.train.tool_calls import PARSERS

    server = started(str(folder[0]), "--enable-auto-tool-choice", "--tool-call-parser", name)
    try:
        assert type(server.app.tool_parser) is PARSERS[name]
        status, body = ask(server, {}, structured_outputs={"regex": regex}, seed=3, max_tokens=70)
        assert status == 200, body
        (c,) = body["choices"]
        (tc,) = c["message"]["tool_calls"]
        assert c["finish_reason"] == "tool_calls" and c["message"]["content"] == content
        assert tc["function"]["name"] == "add" and satisfies(json.loads(tc["function"]["arguments"]), "add")
        assert len(tc["id"]) == 9 if name == "mistral" else tc["id"].startswith("chatcmpl-tool-")
        status, text = ask(server, {}, structured_outputs={"regex": regex}, seed=3, max_tokens=70, stream=True)
        chunks = [k["choices"][0] for k in events(text)]
        assert "".join(k["delta"].get("content") or "" for k in chunks) == (content or "")
        deltas = [d for k in chunks for d in k["delta"].get("tool_calls") or ()]
        assert deltas[0]["function"]["name"] == "add" and chunks[-1]["finish_reason"] == "tool_calls"
        assert "".join(d["function"]["arguments"] for d in deltas) == tc["function"]["arguments"]
    finally:
        server.shutdown()
        server.server_close()


def test_auto_tool_choice_flags_go_together(folder):
    """--enable-auto-tool-choice needs a --tool-call-parser and the parser the flag (vLLM's pair), refused before
    the model loads; a parser it does not know, argparse's refusal naming the choices."""
    from tritongpt.cli import build_parser
    from tritongpt.train.serve import tool_parser
    from tritongpt.train.tool_calls import Llama3Json

    parse = build_parser(["serve"]).parse_args
    path = str(folder[0])
    with pytest.raises(UserError, match="--enable-auto-tool-choice needs --tool-call-parser"):
        started(path, "--enable-auto-tool-choice")
    with pytest.raises(UserError, match="--tool-call-parser is used only with --enable-auto-tool-choice"):
        tool_parser(parse(["serve", "--weights", path, "--tool-call-parser", "hermes"]))
    assert isinstance(tool_parser(parse(["serve", "--weights", path, "--enable-auto-tool-choice",
                                         "--tool-call-parser", "llama3_json"])), Llama3Json)
    with pytest.raises(SystemExit):
        parse(["serve", "--weights", path, "--enable-auto-tool-choice", "--tool-call-parser", "granite"])


def test_auto_names_the_requests_own_structured_outputs_where_they_do_not_compile(both, monkeypatch):
    """"auto" holds the answer to no tool's schema: a request's own structured outputs that do not compile are named
    as such, not a tool whose parameters xgrammar cannot compile (unused by "auto")."""
    from tritongpt.train.tool_calls import Hermes

    server, theirs, ban = both
    if server.app.engine is None:
        pytest.skip("the engine's server checks the same request")
    monkeypatch.setattr(server.app, "tool_parser", Hermes())
    broken = {"type": "function", "function": {"name": "b", "parameters": {
        "type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}}}}
    status, body = ask(server, ban, tools=TOOLS + [broken], structured_outputs={"regex": "(a"})
    assert status == 400 and body["error"]["param"] == "structured_outputs", body


def test_continue_final_message_and_no_generation_prompt_are_transformers(both):
    """vLLM's continue_final_message (the final assistant message continued, not a new turn) and
    add_generation_prompt false: /tokenize's ids are transformers' apply_chat_template's; a chat completion that
    continues draws what a completion of those ids draws; an answer to continue must end the messages."""
    server, theirs, ban = both
    if server.app.engine is None:
        pytest.skip("the engine's server checks the same request")
    start = USER + [{"role": "assistant", "content": "The cat "}]
    for fields, messages, kw in (({"continue_final_message": True}, start, {"continue_final_message": True}),
                                 ({"add_generation_prompt": False}, USER, {"add_generation_prompt": False})):
        status, body = call(server, "/tokenize", {"messages": messages, **fields})
        assert status == 200, body
        assert body["tokens"] == theirs.apply_chat_template(messages, return_dict=False, **kw)
    ids = call(server, "/tokenize", {"messages": start, "continue_final_message": True})[1]["tokens"]
    status, body = call(server, "/v1/chat/completions", {"messages": start, "continue_final_message": True,
                                                         "add_generation_prompt": False, "max_tokens": 6,
                                                         "temperature": 0, "logit_bias": ban})
    assert status == 200, body
    plain = call(server, "/v1/completions", {"prompt": ids, "max_tokens": 6, "temperature": 0, "logit_bias": ban})[1]
    assert body["choices"][0]["message"]["content"] == plain["choices"][0]["text"].split("<|im_end|>")[0]
    assert body["usage"]["prompt_tokens"] == len(ids)
    status, body = call(server, "/v1/chat/completions", {"messages": USER, "continue_final_message": True})
    assert status == 400 and "must end with an assistant's text" in body["error"]["message"], body


def test_every_call_is_answered_before_the_next_turn_as_openai_asks():
    """OpenAI's rule (vLLM has none): an assistant's tool_calls are followed by tool messages answering each id
    before a user, system or assistant message, or the conversation's end; else a 400 naming the ids unanswered.
    Answered in any order, the conversation is taken."""
    from tritongpt.train.serve import APIError, tool_messages

    def calls(*ids):
        return {"role": "assistant", "content": None, "tool_calls": [
            {"id": i, "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}} for i in ids]}

    def answer(i):
        return {"role": "tool", "tool_call_id": i, "content": "2"}

    ok = USER + [calls("c1", "c2"), answer("c2"), answer("c1"), {"role": "assistant", "content": "done"}] + USER
    assert len(tool_messages(ok)) == 6
    for messages, unanswered, at in ((USER + [calls("c1", "c2"), answer("c1")] + USER, "c2", 1),
                                     (USER + [calls("c1"), {"role": "assistant", "content": "x"}] + USER, "c1", 1),
                                     (USER + [calls("c1", "c2"), answer("c2")], "c1", 1),
                                     (ok + [calls("c3", "c4"), answer("c3"), calls("c5"), answer("c5")], "c4", 6)):
        with pytest.raises(APIError) as e:
            tool_messages(messages)
        assert e.value.status == 400 and e.value.param == "messages"
        assert str(e.value) == (f"messages[{at}]: an assistant message with 'tool_calls' must be followed by tool "
                                "messages responding to each 'tool_call_id'. The following tool_call_ids did not "
                                f"have response messages: {unanswered}")


def test_a_conversation_rendered_as_it_stands_may_end_with_calls_not_yet_answered():
    """add_generation_prompt false ("none": /tokenize counting a conversation, a raw render) renders the messages as
    they stand: its last assistant's calls have had no turn to be answered in yet, so OpenAI's rule (a generated
    turn follows answered calls) does not refuse them there; a call left unanswered before a later turn still is."""
    from tritongpt.train.serve import APIError, tool_messages

    calls = {"role": "assistant", "content": None, "tool_calls": [
        {"id": i, "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}} for i in ("c1", "c2")]}
    answer = {"role": "tool", "tool_call_id": "c1", "content": "2"}
    assert [m["role"] for m in tool_messages(USER + [calls], "none")] == ["user", "assistant"]
    assert len(tool_messages(USER + [calls, answer], "none")) == 3
    with pytest.raises(APIError, match="did not have response messages: c2"):
        tool_messages(USER + [calls, answer, *USER], "none")
    with pytest.raises(APIError, match="did not have response messages: c2"):
        tool_messages(USER + [calls, answer], "generate")

