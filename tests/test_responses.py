"""POST /v1/responses (train/responses.py, OpenAI's Responses API as vLLM serves it): the request drawn as the chat
completion it translates to (the same seeded text, the same prompt), its answer as output items, streamed as typed
events that add up to the whole response; function calls; stored responses continued by previous_response_id and
read back by GET; every field it does not take refused by name. The tiny instruct folder of test_tool_calls (a
template that renders tools), on the engine and --max-batch 1."""
import json

import pytest

import test_tool_calls
from test_serve import call
from test_tool_calls import ADD, TOOLS, satisfies

folder, both = test_tool_calls.folder, test_tool_calls.both  # (its fixtures: the folder, and its two servers)

pytestmark = pytest.mark.usefixtures("one_thread")
FLAT = [{"type": "function", **t["function"]} for t in TOOLS]  # (Responses' function tools: flat)


def typed(text: str) -> list:
    """The typed events of a Responses stream: each `event: TYPE` then its `data:`, the type the data's too."""
    out = []
    for block in [b for b in text.split("\n\n") if b]:
        name, data = block.split("\n")
        assert name.startswith("event: ") and data.startswith("data: ")
        event = json.loads(data[len("data: "):])
        assert event["type"] == name[len("event: "):]
        out.append(event)
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    return out


def test_a_response_is_the_chat_completion_it_translates_to(both):
    server, theirs, ban = both
    chat = call(server, "/v1/chat/completions", {"messages": [{"role": "system", "content": "Be brief."},
                                                               {"role": "user", "content": "the cat sat"}],
                                                  "max_tokens": 6, "seed": 4, "temperature": 1.0})[1]
    status, r = call(server, "/v1/responses", {"input": "the cat sat", "instructions": "Be brief.",
                                               "max_output_tokens": 6, "seed": 4, "temperature": 1.0})
    assert status == 200, r
    assert r["id"].startswith("resp_") and r["object"] == "response" and r["model"] == server.app.name
    (item,) = r["output"]
    text = chat["choices"][0]["message"]["content"]
    assert item["type"] == "message" and item["role"] == "assistant" and item["content"][0]["text"] == text
    finish = chat["choices"][0]["finish_reason"]
    assert r["status"] == ("incomplete" if finish == "length" else "completed")
    assert r["incomplete_details"] == ({"reason": "max_output_tokens"} if finish == "length" else None)
    u = chat["usage"]
    assert (r["usage"]["input_tokens"], r["usage"]["output_tokens"], r["usage"]["total_tokens"]) == \
        (u["prompt_tokens"], u["completion_tokens"], u["total_tokens"])
    # streamed: created, in_progress, the message item and its part opened, the text's deltas, all closed, the end
    status, text_stream = call(server, "/v1/responses", {"input": "the cat sat", "instructions": "Be brief.",
                                                         "max_output_tokens": 6, "seed": 4, "temperature": 1.0,
                                                         "stream": True})
    events = typed(text_stream)
    kinds = [e["type"] for e in events]
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[4:4 + len(deltas)] == ["response.output_text.delta"] * len(deltas)
    assert kinds[4 + len(deltas):] == ["response.output_text.done", "response.content_part.done",
                                       "response.output_item.done", "response." + r["status"]]
    assert "".join(deltas) == text == events[-1]["response"]["output"][0]["content"][0]["text"]
    assert events[-1]["response"]["usage"] == r["usage"] and events[0]["response"]["status"] == "in_progress"


def test_function_calls_whole_and_streamed_and_continued(both):
    """A named tool_choice's call as a function_call item (streamed as argument deltas); stored, read back by GET;
    continued by previous_response_id with the call's output, whose prompt is the chat of the whole conversation."""
    server, theirs, ban = both
    ask = {"input": "the cat sat", "tools": FLAT, "tool_choice": {"type": "function", "name": "add"},
           "max_output_tokens": 40, "seed": 2, "temperature": 1.0}
    status, r = call(server, "/v1/responses", ask)
    assert status == 200, r
    (fc,) = r["output"]
    assert fc["type"] == "function_call" and fc["name"] == "add" and fc["id"].startswith("fc_")
    assert satisfies(json.loads(fc["arguments"]), "add") and r["status"] == "completed", r
    assert call(server, f"/v1/responses/{r['id']}")[1] == r
    events = typed(call(server, "/v1/responses", {**ask, "stream": True})[1])
    args = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
    done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert args == done[0]["arguments"] == events[-1]["response"]["output"][0]["arguments"]
    assert json.loads(args) == json.loads(fc["arguments"])
    # the call's result sent back: the prompt is the conversation's chat (user, the assistant's call, the tool)
    status, r2 = call(server, "/v1/responses", {"previous_response_id": r["id"], "max_output_tokens": 2,
                                                "input": [{"type": "function_call_output", "call_id": fc["call_id"],
                                                           "output": "5"}]})
    assert status == 200, r2
    messages = [{"role": "user", "content": "the cat sat"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": fc["call_id"], "type": "function", "function": {"name": "add",
                                                                           "arguments": fc["arguments"]}}]},
                {"role": "tool", "tool_call_id": fc["call_id"], "content": "5"}]
    assert r2["usage"]["input_tokens"] == call(server, "/tokenize", {"messages": messages})[1]["count"]
    assert r2["previous_response_id"] == r["id"]


def test_store_false_keeps_nothing_and_unknown_ids_are_404s(both):
    server, theirs, ban = both
    status, r = call(server, "/v1/responses", {"input": "hi", "max_output_tokens": 1, "store": False})
    assert status == 200 and r["store"] is False
    status, body = call(server, f"/v1/responses/{r['id']}")
    assert status == 404 and body["error"]["param"] == "response_id"
    status, body = call(server, "/v1/responses", {"input": "hi", "previous_response_id": r["id"]})
    assert status == 404 and body["error"]["param"] == "previous_response_id"


@pytest.mark.parametrize("fields, param, says", [
    ({"input": "hi", "bogus": 1}, "bogus", "unknown field 'bogus'"),
    ({}, "input", "'input' is required"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input",
     "text is the only input"),
    ({"input": "hi", "background": True}, "background", "not supported"),
    ({"input": "hi", "include": ["reasoning.encrypted_content"]}, "include", "not supported"),
    ({"input": "hi", "reasoning": {"effort": "high"}}, "reasoning", "not supported"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0]", "function tools are the only kind"),
    ({"input": "hi", "text": {"format": {"type": "xml"}}}, "text", "json_schema or json_object"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "a"}}}, "text", "text.format.schema must be"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "schema": {}}}}, "text", "text.format.name must be"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "a", "schema": {}, "strict": "yes"}}}, "text",
     "text.format.strict must be true or false"),
    ({"input": "hi", "store": "yes"}, "store", "true or false"),
    ({"input": "hi", "stream": "no"}, "stream", "true or false"),
    # chat's checks, in the request's own names (its fields; the conversation's messages)
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens", "'max_output_tokens' must be an integer >= 1"),
    ({"input": "hi", "max_output_tokens": 1000}, "max_output_tokens", "max_output_tokens 1000"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "a", "schema": {"type": "nope"}}}}, "text",
     "could not be compiled"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "a", "schema": 3}}}, "text",
     "text.format.schema must be a JSON schema object"),
    ({"input": "hi", "tools": FLAT, "tool_choice": "required", "text": {"format": {"type": "json_object"}}}, "text",
     "'text.format' cannot be used with a tool_choice that calls a tool"),
    ({"input": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "input",
     "the conversation as chat messages"),
    ({"input": [{"role": "user", "content": "hi"}, {"type": "function_call_output", "call_id": "c", "output": "5"}]},
     "input", "input[1]: call_id 'c' is no earlier function_call's"),
    ({"input": [{"role": "user", "content": "hi"}, {"role": "developer", "content": "x"}]}, "input",
     "input[1]: a developer message after"),
])
def test_refusals_name_the_field(both, fields, param, says):
    server, theirs, ban = both
    if server.app.engine is None:
        pytest.skip("the engine's server checks the same request")
    status, body = call(server, "/v1/responses", fields)
    assert status in (400, 404) and body["error"]["param"] == param and says in body["error"]["message"], body


def test_json_schema_format_is_chats_response_format(both):
    """text.format json_schema holds the text as chat's response_format does: the same seeded text."""
    server, theirs, ban = both
    fmt = {"name": "a", "schema": ADD, "strict": True}
    chat = call(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "the cat sat"}],
                                                  "max_tokens": 12, "seed": 1, "temperature": 1.0,
                                                  "response_format": {"type": "json_schema", "json_schema": fmt}})[1]
    status, r = call(server, "/v1/responses", {"input": "the cat sat", "max_output_tokens": 12, "seed": 1,
                                               "temperature": 1.0, "text": {"format": {"type": "json_schema", **fmt}}})
    assert status == 200, r
    assert r["output"][0]["content"][0]["text"] == chat["choices"][0]["message"]["content"]
    assert r["text"]["format"]["name"] == "a"


def test_several_calls_and_calls_cut_short_whole_and_streamed(both):
    """"required"'s calls, each its own function_call item (streamed: its arguments' deltas, done naming the
    function); the outputs of both sent back. A call cut by max_output_tokens is incomplete streamed too (chat's
    stream says "tool_calls" for it), "required"'s and a named one's."""
    server, theirs, ban = both
    ask = {"input": "the cat sat", "tools": FLAT, "tool_choice": "required", "logit_bias": ban, "seed": 6,
           "max_output_tokens": 86, "temperature": 1.0}
    status, r = call(server, "/v1/responses", ask)
    assert status == 200 and r["status"] == "completed", r
    assert [o["type"] for o in r["output"]] == ["function_call"] * 2, r
    events = typed(call(server, "/v1/responses", {**ask, "stream": True})[1])
    done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert [(e["output_index"], e["name"], json.loads(e["arguments"])) for e in done] == [
        (k, o["name"], json.loads(o["arguments"])) for k, o in enumerate(r["output"])]
    assert events[-1]["type"] == "response.completed"
    back = [{"type": "function_call_output", "call_id": o["call_id"], "output": str(k)}
            for k, o in enumerate(r["output"])]
    status, r2 = call(server, "/v1/responses", {"previous_response_id": r["id"], "input": back, "max_output_tokens": 1})
    calls = [{"id": o["call_id"], "type": "function", "function": {"name": o["name"], "arguments": o["arguments"]}}
             for o in r["output"]]
    messages = [{"role": "user", "content": "the cat sat"}, {"role": "assistant", "content": None, "tool_calls": calls},
                {"role": "tool", "tool_call_id": calls[0]["id"], "content": "0"},
                {"role": "tool", "tool_call_id": calls[1]["id"], "content": "1"}]
    assert status == 200, r2
    assert r2["usage"]["input_tokens"] == call(server, "/tokenize", {"messages": messages})[1]["count"]
    for cut in ({"seed": 3}, {"tool_choice": {"type": "function", "name": "w"}, "max_output_tokens": 4}):
        status, r = call(server, "/v1/responses", {**ask, **cut})
        events = typed(call(server, "/v1/responses", {**ask, **cut, "stream": True})[1])
        assert r["status"] == events[-1]["response"]["status"] == "incomplete", (cut, r, events[-1])
        assert events[-1]["type"] == "response.incomplete"


def test_developer_messages_instructions_and_a_chain_of_two(both):
    """instructions and the input's leading developer messages are the one system message a template takes first;
    previous_response_id carries the conversation's developer messages, not its instructions, two turns on; a
    developer message after the conversation began is refused by its item."""
    server, theirs, ban = both

    def prompt(messages):
        return call(server, "/tokenize", {"messages": messages})[1]["count"]

    def text(r):
        return "".join(p["text"] for o in r["output"] for p in o["content"])

    parts = [{"type": "input_text", "text": "the "}, {"type": "input_text", "text": "cat"}]
    status, r1 = call(server, "/v1/responses", {"instructions": "Add.", "max_output_tokens": 2, "input": [
        {"role": "developer", "content": "Be brief."}, {"type": "message", "role": "user", "content": parts}]})
    assert status == 200, r1
    chat = [{"role": "user", "content": "the cat"}]
    assert r1["usage"]["input_tokens"] == prompt([{"role": "system", "content": "Add.\n\nBe brief."}] + chat)
    status, r2 = call(server, "/v1/responses", {"previous_response_id": r1["id"], "input": "sat",
                                                "max_output_tokens": 2})
    chat += [{"role": "assistant", "content": text(r1)}, {"role": "user", "content": "sat"}]
    assert status == 200 and r2["instructions"] is None, r2
    assert r2["usage"]["input_tokens"] == prompt([{"role": "system", "content": "Be brief."}] + chat)
    status, r3 = call(server, "/v1/responses", {"previous_response_id": r2["id"], "instructions": "Count.",
                                                "input": "on", "max_output_tokens": 2})
    chat += [{"role": "assistant", "content": text(r2)}, {"role": "user", "content": "on"}]
    assert status == 200 and r3["usage"]["input_tokens"] == prompt(
        [{"role": "system", "content": "Count.\n\nBe brief."}] + chat)
    status, body = call(server, "/v1/responses", {"previous_response_id": r1["id"],
                                                  "input": [{"role": "developer", "content": "x"}]})
    assert status == 400 and body["error"]["param"] == "input" and "input[0]" in body["error"]["message"], body


def test_a_stream_failing_midway_ends_with_typed_events(both, monkeypatch):
    """OpenAI's error event and response.failed (every event typed and numbered), not chat's error chunk and
    [DONE]; the failed response kept, its open item incomplete."""
    server, theirs, ban = both

    def broken(ids, budget, s, stop_id, generator, on_delta, *rest):
        on_delta(0, "Hi", None, 1)
        raise RuntimeError("the model broke")

    monkeypatch.setattr(server.app, "draw", broken)
    monkeypatch.setattr("traceback.print_exc", lambda **k: None)  # (the server's log of it)
    events = typed(call(server, "/v1/responses", {"input": "hi", "max_output_tokens": 3, "stream": True})[1])
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"], events
    assert events[-2]["message"] == "internal server error (see the server's log)"
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert failed["output"][0]["content"][0]["text"] == "Hi" and failed["output"][0]["status"] == "incomplete"
    assert call(server, f"/v1/responses/{failed['id']}")[1] == failed


def test_the_stream_adds_up_to_the_whole_answers_items():
    """Events (chat chunks in) against output_items (the whole message): the same items, a thought, a text, calls;
    an empty thought or text no item (the stream sends nothing of it)."""
    from tritongpt.train.responses import Events, output_items

    def chunk(**delta):
        return {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}

    call_a = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
    cases = [  # (the whole message, the stream's chunks)
        ({"reasoning": "I see", "content": "Hi"}, [chunk(reasoning="I "), chunk(reasoning="see"), chunk(content="Hi")]),
        ({"reasoning": "", "content": "Hi"}, [chunk(content="Hi")]),
        ({"reasoning": None, "content": ""}, []),
        ({"content": "Hi", "tool_calls": [call_a, {**call_a, "id": "c2"}]}, [chunk(content="Hi")] + [
            chunk(tool_calls=[{"index": k, "id": c, "type": "function", "function": {"name": "add", "arguments": ""}}])
            if part is None else chunk(tool_calls=[{"index": k, "function": {"arguments": part}}])
            for k, c in enumerate(("c1", "c2")) for part in (None, '{"a": ', "1}")]),
    ]

    def plain(items):
        return [{k: v for k, v in i.items() if k != "id"} for i in items]

    for message, chunks in cases:
        sent = []
        events = Events(sent.append, {})
        for c in chunks:
            events.chunk(c)
        events.close()
        assert plain(events.items) == plain(output_items(message)), message
        assert all(i["status"] == "completed" for i in events.items)


def test_input_items_listed_and_responses_deleted(both):
    """OpenAI's GET /v1/responses/{id}/input_items (the request's own input, ids given, newest first by default,
    order / limit / after) and DELETE /v1/responses/{id} (then a 404, as a continuation of it)."""
    server, theirs, ban = both
    if server.app.engine is None:
        pytest.skip("the engine's server checks the same request")
    given = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "input_text",
                                                                                       "text": "the cat sat"}]}]
    r = call(server, "/v1/responses", {"input": given, "max_output_tokens": 1})[1]
    listed = call(server, f"/v1/responses/{r['id']}/input_items")[1]
    assert listed["object"] == "list" and not listed["has_more"] and [i["role"] for i in listed["data"]] == \
        ["user", "system"]
    assert listed["data"][1]["content"] == [{"type": "input_text", "text": "Be brief."}]
    assert (listed["first_id"], listed["last_id"]) == (listed["data"][0]["id"], listed["data"][1]["id"])
    page = call(server, f"/v1/responses/{r['id']}/input_items?order=asc&limit=1")[1]
    assert [i["role"] for i in page["data"]] == ["system"] and page["has_more"]
    rest = call(server, f"/v1/responses/{r['id']}/input_items?order=asc&after={page['last_id']}")[1]
    assert [i["id"] for i in rest["data"]] == [listed["data"][0]["id"]]
    for query, param, says in (("limit=0", "limit", "'limit' must be an integer in [1, 100], got '0'"),
                               ("limit=x", "limit", "got 'x'"), ("limit=%C2%B2", "limit", "got '\u00b2'"),
                               ("order=up", "order", "asc or desc, got 'up'"),
                               ("after=", "after", "no input item ''"), ("after=msg_x", "after", "'msg_x'"),
                               ("include=x", "include", "query field 'include' is not supported"),
                               ("limt=2", "limt", "it takes order, limit and after")):
        status, out = call(server, f"/v1/responses/{r['id']}/input_items?{query}")
        assert status == 400 and out["error"]["param"] == param and says in out["error"]["message"], (query, out)
    for method in ("GET", "DELETE"):  # (OpenAI's GET takes stream, include, ...: none built here)
        status, out = call(server, f"/v1/responses/{r['id']}?stream=true", method=method)
        assert status == 400 and out["error"]["param"] == "stream", out
    assert call(server, f"/v1/responses/{r['id']}", method="DELETE")[1] == {"id": r["id"], "object": "response",
                                                                            "deleted": True}
    for path, method, status in ((f"/v1/responses/{r['id']}", "GET", 404), (f"/v1/responses/{r['id']}", "DELETE", 404),
                                 (f"/v1/responses/{r['id']}/input_items", "DELETE", 405),
                                 (f"/v1/responses/{r['id']}/other", "GET", 404)):
        assert call(server, path, method=method)[0] == status, (path, method)
    status, out = call(server, f"/v1/responses/{r['id']}/input_items")
    assert status == 404 and r["id"] in out["error"]["message"] and out["error"]["param"] == "response_id"


def test_openais_client_reads_every_response_and_event(both):
    """OpenAI's Python client (its pydantic types) on /v1/responses: a text response, a function call, a stream's
    events one by one to its end, a continuation by its call's output, the input items and the deletion."""
    openai = pytest.importorskip("openai")
    server, theirs, ban = both
    if server.app.engine is None:
        pytest.skip("the engine's server checks the same request")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="x")
    name = str(server.app.name)
    r = client.responses.create(model=name, input="the cat sat", instructions="Be brief.", max_output_tokens=4)
    assert r.status in ("completed", "incomplete") and r.output[0].type == "message" and r.usage.output_tokens >= 1
    r = client.responses.create(model=name, input="the cat sat", tools=FLAT, max_output_tokens=40,
                                tool_choice={"type": "function", "name": "add"}, extra_body={"logit_bias": ban})
    (fc,) = r.output
    assert fc.type == "function_call" and satisfies(json.loads(fc.arguments), "add") and r.status == "completed"
    with client.responses.stream(model=name, input="the cat sat", max_output_tokens=5) as stream:
        events = list(stream)
    assert events[0].type == "response.created" and events[-1].type in ("response.completed", "response.incomplete")
    assert events[-1].response.output_text == "".join(e.delta for e in events if e.type == "response.output_text.delta")
    r2 = client.responses.create(model=name, previous_response_id=r.id, max_output_tokens=2,
                                 input=[{"type": "function_call_output", "call_id": fc.call_id, "output": "5"}])
    assert r2.previous_response_id == r.id
    assert [i.type for i in client.responses.input_items.list(r2.id).data] == ["function_call_output"]
    client.responses.delete(r2.id)
    assert call(server, f"/v1/responses/{r2.id}")[0] == 404


def test_an_answer_with_no_items_is_continued_as_an_empty_turn(both):
    """An answer with no text and no call (the end token drawn first; a thought cut short by max_output_tokens) has no
    output item; previous_response_id continues it as an empty assistant turn (chat completions take an assistant's
    empty content, as OpenAI's and vLLM's), the prompt transformers' of that conversation."""
    server, theirs, ban = both
    end = theirs.convert_tokens_to_ids("<|im_end|>")
    status, r = call(server, "/v1/responses", {"input": "the cat", "max_output_tokens": 3,
                                               "logit_bias": {str(end): 100}})
    assert status == 200 and r["output"] == [] and r["status"] == "completed", r
    status, r2 = call(server, "/v1/responses", {"previous_response_id": r["id"], "input": "sat",
                                                "max_output_tokens": 1})
    assert status == 200, r2
    chat = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": ""},
            {"role": "user", "content": "sat"}]
    ids = theirs.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
    assert r2["usage"]["input_tokens"] == len(ids) == call(server, "/tokenize", {"messages": chat})[1]["count"]
    # (with tools the template renders: the tool-use path's messages)
    status, r3 = call(server, "/v1/responses", {"previous_response_id": r["id"], "input": "sat", "tools": FLAT,
                                                "tool_choice": "none", "max_output_tokens": 1})
    assert status == 200, r3
    assert r3["usage"]["input_tokens"] == len(theirs.apply_chat_template(chat, tools=TOOLS, add_generation_prompt=True,
                                                                         return_dict=False))
