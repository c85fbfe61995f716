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
    ({"input": "hi", "store": "yes"}, "store", "true or false"),
    ({"input": "hi", "max_output_tokens": 0}, "max_tokens", ">= 1"),
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
