"""`tritongpt serve`: a tiny chat-tuned run served on an ephemeral port, talked to with urllib. Completions are
generate()'s text, chat answers what `chat`'s Conversation and reply() give, streamed chunks add up to the text,
every bad request gets OpenAI's error object with its status, and logprobs (echo's, the drawn tokens', lm-eval's
loglikelihood requests) are the model's own log-softmax."""
import http.client
import json
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from parity import loud_attention
from tritongpt.cli import build_parser, main
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train import chat, engine as engine_module, formats, generate as generate_module, serve
from tritongpt.train.engine import PREFILL_PAD
from tritongpt.train.generate import generate
from tritongpt.train.tokenizer import BPETokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
CORPUS = ("the cat sat on the mat. a dog ran in the park, the bird sang; " * 4 + "Hello there! How are you? 0123456789")


def tiny_run(folder, prompt_format, loud=False):
    """A run folder as SFT leaves one: its tokenizer, a checkpoint with the prompt format it was tuned on."""
    tok = BPETokenizer.train(CORPUS, 300)
    tok.save(folder / "tokenizer.json")
    torch.manual_seed(7)
    (folder / "ckpt-0000001").mkdir(parents=True)
    model = GPTModel(GPTConfig(vocab_size=tok.vocab_size, context_length=128, n_embd=32, n_layer=2, n_head=2,
                               tie_weights=False))  # (tied, a random model repeats its last token)
    if loud:  # (the engine's texts then read the cache's keys and values: else they hardly need them to match)
        loud_attention(model)
    model.save(folder / "ckpt-0000001" / "model.safetensors")
    torch.save({"step": 1, "prompt_format": prompt_format}, folder / "ckpt-0000001" / "state.pt")
    return tok


def start(folder, *flags):
    args = build_parser(["serve"]).parse_args(["serve", "--weights", str(folder), "--port", "0", "--device", "cpu",
                                               *flags])
    server = serve.make_server(args)
    # polled every 50 ms, not socketserver's 500: shutdown() waits for the next poll (~0.45 s a server, 23 in this file)
    server.loop = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    server.loop.start()
    STARTED.append(server)
    return server


STARTED = []  # every server start() made, for closed_servers_shut_down


@pytest.fixture(autouse=True)
def closed_servers_shut_down():
    """A server a test closed (server_close) without shutdown() first: its serve_forever thread, polling a closed
    socket, finds it ready at once and spins for the rest of the session, a core's worth of CPU taken from every later
    test. Stopped here, and the test failed."""
    first = len(STARTED)
    yield
    spinning = [s for s in STARTED[first:] if s.fileno() == -1 and s.loop.is_alive()]
    del STARTED[first:]
    for server in spinning:
        server.shutdown()
    assert not spinning, f"{len(spinning)} server(s) closed without shutdown() first: call server.shutdown() before " \
        "server_close()"


def serve_once(folder, path, body, *flags):
    """A server started with flags, one request to path, then shut down: (status, reply, the server)."""
    server = start(folder, *flags)
    server.RequestHandlerClass.log_message = lambda *a: None
    try:
        status, out = call(server, path, body)
    finally:
        server.shutdown()
        server.server_close()
    return status, out, server


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve") / "run"
    return folder, tiny_run(folder, "chat", loud=True)


@pytest.fixture(scope="module")
def served(run_folder):
    folder, tok = run_folder
    server = start(folder, "--served-model-name", "tiny-chat")
    server.RequestHandlerClass.log_message = lambda *a: None  # (the request log: stderr, not the test's output)
    yield server, tok
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module", params=["engine", "max-batch-1"])
def both(request, run_folder, served):
    """The batching engine's server (served), then one with --max-batch 1 (generate() under a lock)."""
    if request.param == "engine":
        yield served
        return
    folder, tok = run_folder
    server = start(folder, "--served-model-name", "tiny-chat", "--max-batch", "1")
    server.RequestHandlerClass.log_message = lambda *a: None
    assert server.app.engine is None
    yield server, tok
    server.shutdown()
    server.server_close()



def running_request(server, body):
    """A completion sent on a raw socket (so the test can hang up), once the server's engine runs it: -> (the
    socket, a deadline 10 s on for the waits that follow)."""
    import socket
    import time

    data = json.dumps(body).encode()
    sock = socket.create_connection(server.server_address[:2])
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    deadline = time.time() + 10
    while not server.app.engine.running and time.time() < deadline:
        time.sleep(0.01)
    return sock, deadline

def call(server, path, body=None, method=None, raw=None):
    """(status, parsed JSON body, or the raw text of another (an event stream))."""
    url = f"http://127.0.0.1:{server.server_address[1]}{path}"
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method or ("GET" if data is None else "POST"),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            text = r.read().decode()
            return r.status, (json.loads(text) if r.headers["Content-Type"] == "application/json" else text)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode())


def events(text):
    """The JSON chunks of an event stream, which must end with [DONE]."""
    lines = [line for line in text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def reference(server, ids, max_new, eos=None, seed=None, n=1, temperature=0.0):
    """generate()'s rows of new ids, drawn here (the model the server holds, its own generator)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    out = generate(server.app.model, torch.tensor([ids] * n), max_new, temperature=temperature, eos_id=eos,
                   generator=gen)
    return [row[len(ids):] for row in out.tolist()]


def new_text(tok, ids, new):
    return tok.decode(ids + new)[len(tok.decode(ids)):]


def fresh_stop(text, at):
    """Two characters of text first found at `at` or later (a random model repeats itself)."""
    i = next(i for i in range(at, len(text) - 1) if text.find(text[i:i + 2]) == i and text[i:i + 2].strip())
    return text[i:i + 2]


def test_models_lists_the_one_model(served):
    server, _ = served
    status, body = call(server, "/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == ["tiny-chat"] and body["object"] == "list"
    assert call(server, "/v1/models/tiny-chat")[1]["id"] == "tiny-chat"
    assert body["data"][0]["max_model_len"] == 128 and body["data"][0]["root"] == "tiny-chat"  # (vLLM's extras)
    assert call(server, "/v1/models/other")[0] == 404
    assert serve.served_name("/x/hub/models--Qwen--Qwen2.5-0.5B/snapshots/abc") == "Qwen/Qwen2.5-0.5B"


def test_a_greedy_completion_is_generates_text_with_its_usage(served):
    server, tok = served
    prompt = "the cat sat"
    status, body = call(server, "/v1/completions", {"prompt": prompt, "max_tokens": 9, "temperature": 0,
                                                    "model": "tiny-chat"})
    ids = tok.encode(prompt)
    new = reference(server, ids, 9, eos=tok.eot_id)[0]
    assert tok.eot_id not in new  # (else the row below would be cut)
    assert status == 200 and body["object"] == "text_completion" and body["model"] == "tiny-chat"
    assert body["choices"] == [{"index": 0, "text": new_text(tok, ids, new), "logprobs": None,
                                "finish_reason": "length", "stop_reason": None}]
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 9, "total_tokens": len(ids) + 9}
    # OpenAI's default: 16 tokens
    assert call(server, "/v1/completions", {"prompt": prompt, "temperature": 0})[1]["usage"]["completion_tokens"] == 16


def test_several_prompts_and_n_samples_seeded(served):
    server, tok = served
    prompts = ["a dog", "Hello there! How"]
    req = {"prompt": prompts, "max_tokens": 7, "n": 3, "seed": 1234, "temperature": 1.0}
    status, body = call(server, "/v1/completions", req)
    assert status == 200 and [c["index"] for c in body["choices"]] == list(range(6))
    # one generator for the request, seeded: the prompts' n rows drawn in turn, one batch each
    gen, want, prompt_tokens = torch.Generator().manual_seed(1234), [], 0
    for p in prompts:
        ids = tok.encode(p)
        prompt_tokens += len(ids)
        rows = generate(server.app.model, torch.tensor([ids] * 3), 7, temperature=1.0, eos_id=tok.eot_id,
                        generator=gen)[:, len(ids):].tolist()
        want += [new_text(tok, ids, r[:r.index(tok.eot_id)] if tok.eot_id in r else r) for r in rows]
    assert [c["text"] for c in body["choices"]] == want
    assert len(set(want)) > 1  # (sampled: the rows differ)
    assert body["usage"]["prompt_tokens"] == prompt_tokens
    assert call(server, "/v1/completions", req)[1]["choices"] == body["choices"]  # the seed reproduces it
    assert call(server, "/v1/completions", {**req, "seed": 99})[1]["choices"] != body["choices"]


def greedy_with_a_stop(server, tok, prompt="the bird"):
    """prompt's ids, generate()'s 20 greedy new ids and their text, and a stop string first found 3 in."""
    ids = tok.encode(prompt)
    new = reference(server, ids, 20)[0]
    full = new_text(tok, ids, new)
    return ids, new, full, fresh_stop(full, 3)


def test_stop_strings_cut_the_text_and_count_the_tokens_drawn(served):
    server, tok = served
    prompt = "the bird"
    ids, new, full, stop = greedy_with_a_stop(server, tok, prompt)
    status, body = call(server, "/v1/completions", {"prompt": prompt, "max_tokens": 20, "temperature": 0,
                                                    "stop": ["zzz", stop]})
    (choice,) = body["choices"]
    assert choice["text"] == full[:full.find(stop)] and choice["finish_reason"] == "stop"
    # the tokens drawn until the text first held the stop string
    k = next(k for k in range(1, 21) if stop in new_text(tok, ids, new[:k]))
    assert body["usage"]["completion_tokens"] == k
    # one string as stop; a stop never drawn leaves the text whole
    assert call(server, "/v1/completions", {"prompt": prompt, "max_tokens": 20, "temperature": 0,
                                            "stop": stop})[1]["choices"] == [choice]
    body = call(server, "/v1/completions", {"prompt": prompt, "max_tokens": 20, "temperature": 0, "stop": "zzz"})[1]
    assert body["choices"][0]["text"] == full and body["choices"][0]["finish_reason"] == "length"


def test_the_end_token_ends_a_completion_with_finish_reason_stop(served, monkeypatch):
    server, tok = served
    prompt = "on the mat"
    ids = tok.encode(prompt)
    new = reference(server, ids, 12)[0]
    end = new[4]  # a token the greedy text draws, made the model's end of text for this test
    monkeypatch.setattr(server.app, "eot", end)
    body = call(server, "/v1/completions", {"prompt": prompt, "max_tokens": 12, "temperature": 0})[1]
    cut = new.index(end)
    assert body["choices"][0]["text"] == new_text(tok, ids, new[:cut])
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == cut + 1  # the end token was drawn too


def test_streamed_chunks_add_up_to_the_text_and_end_with_done(served):
    server, tok = served
    prompt = "the dog ran"
    new = reference(server, tok.encode(prompt), 24)[0]
    full = new_text(tok, tok.encode(prompt), new)
    stop = fresh_stop(full, 6)
    for extra in ({}, {"stop": stop}, {"n": 2, "temperature": 1.0, "seed": 5}):
        req = {"prompt": prompt, "max_tokens": 24, "temperature": 0, **extra}
        plain = call(server, "/v1/completions", req)[1]
        status, text = call(server, "/v1/completions", {**req, "stream": True,
                                                        "stream_options": {"include_usage": True}})
        chunks = events(text)
        assert status == 200 and all(c["object"] == "text_completion" for c in chunks)
        assert chunks[-1]["usage"] == plain["usage"] and chunks[-1]["choices"] == []
        assert all("usage" in c and c["usage"] is None for c in chunks[:-1])  # OpenAI's: null on the others
        for c in plain["choices"]:
            mine = [ch["choices"][0] for ch in chunks[:-1] if ch["choices"][0]["index"] == c["index"]]
            assert "".join(m["text"] for m in mine) == c["text"]
            assert [m["finish_reason"] for m in mine] == [None] * (len(mine) - 1) + [c["finish_reason"]]
            assert len(mine) > 2  # streamed as drawn, not in one piece
    # without stream_options: no usage chunk
    assert all("usage" not in c for c in events(call(server, "/v1/completions",
                                                     {"prompt": prompt, "max_tokens": 3, "stream": True})[1]))


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"},
            {"role": "assistant", "content": "the cat sat."}, {"role": "user", "content": "How are you?"}]


def test_continuous_usage_stats_puts_each_choices_usage_so_far_on_every_chunk(both):
    """vLLM's stream_options: continuous_usage_stats (with include_usage, on by default once stream_options is
    given) gives every chunk its prompt's tokens and its choice's tokens so far: the text it has sent is what those
    tokens decode to; the last usage chunk is the request's. Chat's role chunk counts none."""
    server, tok = both
    prompt = "the dog ran"
    ids = tok.encode(prompt)
    new = reference(server, ids, 6)[0]
    req = {"prompt": prompt, "max_tokens": 6, "temperature": 0, "n": 2, "ignore_eos": True, "stream": True}
    chunks = events(call(server, "/v1/completions", {**req, "stream_options": {"continuous_usage_stats": True}})[1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 12,
                                                                    "total_tokens": len(ids) + 12}
    for index in (0, 1):
        mine = [c for c in chunks[:-1] if c["choices"][0]["index"] == index]
        assert len(mine) > 2 and mine[-1]["choices"][0]["finish_reason"] == "length"
        sent = ""
        for c in mine:
            u = c["usage"]
            assert u["prompt_tokens"] == len(ids) and u["total_tokens"] == len(ids) + u["completion_tokens"]
            sent += c["choices"][0]["text"]
            assert sent == streamed_text(tok, ids + new[:u["completion_tokens"]])[len(prompt):]
        assert mine[-1]["usage"]["completion_tokens"] == 6
    # include_usage false: no usage, continuous or last; {} alone: include_usage (vLLM's default), null elsewhere
    off = events(call(server, "/v1/completions", {**req, "stream_options": {"include_usage": False,
                                                                             "continuous_usage_stats": True}})[1])
    assert all("usage" not in c for c in off)
    plain = events(call(server, "/v1/completions", {**req, "stream_options": {}})[1])
    assert plain[-1]["usage"] == chunks[-1]["usage"] and all(c["usage"] is None for c in plain[:-1])
    chat = events(call(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 3, "stream": True,
                                                        "stream_options": {"continuous_usage_stats": True}})[1])
    P = chat[-1]["usage"]["prompt_tokens"]
    assert chat[0]["choices"][0]["delta"]["role"] == "assistant" and chat[0]["usage"] == {
        "prompt_tokens": P, "completion_tokens": 0, "total_tokens": P}
    assert chat[-2]["usage"] == chat[-1]["usage"] and chat[-1]["usage"]["completion_tokens"] > 0


def test_a_chat_completion_is_what_chat_answers(served):
    server, tok = served
    conv = chat.Conversation("chat", "Be brief.")
    conv.add("Hello there!", "the cat sat.")
    ids = formats.encode_prompt(tok, conv.prompt("How are you?", 0, tok))
    want, ended = chat.reply(server.app.model, tok, ids, 10, temperature=0.0, stream=False)
    status, body = call(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 10, "temperature": 0})
    assert status == 200 and body["object"] == "chat.completion"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": want}, "logprobs": None,
                                "finish_reason": "stop" if ended else "length", "stop_reason": None}]
    assert body["usage"]["prompt_tokens"] == len(ids)
    # no max_tokens: to the end of the turn, or of the context
    default = call(server, "/v1/chat/completions", {"messages": MESSAGES, "temperature": 0})[1]
    budget = 128 - len(ids)
    want, ended = chat.reply(server.app.model, tok, ids, budget, temperature=0.0, stream=False)
    assert default["choices"][0]["message"]["content"] == want
    assert default["usage"]["completion_tokens"] == (len(tok.encode(want)) + 1 if ended else budget)
    # streamed: a role chunk, then the content's deltas, then the finish
    chunks = events(call(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 10, "temperature": 0,
                                                          "stream": True})[1])
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == body["choices"][0]["message"][
        "content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == body["choices"][0]["finish_reason"]


def test_a_model_without_a_chat_format_refuses_chat_and_serves_completions(tmp_path):
    tiny_run(tmp_path / "run", None)  # a pretraining run's: no prompt format, our BPE (no chat template)
    server = start(tmp_path / "run")
    server.RequestHandlerClass.log_message = lambda *a: None
    try:
        status, body = call(server, "/v1/chat/completions", {"messages": MESSAGES[1:2]})
        assert status == 400 and body["error"]["param"] == "messages"
        assert "has no chat format" in body["error"]["message"] and str(tmp_path / "run") in body["error"]["message"]
        assert call(server, "/v1/completions", {"prompt": "the"})[0] == 200
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("path, body, status, param, says", [
    ("/v1/completions", {"prompt": "a", "temperature": -0.5}, 400, "temperature", "'temperature' must be"),
    ("/v1/completions", {"prompt": "a", "temperature": 2.5}, 400, "temperature", "in [0, 2]"),
    ("/v1/completions", {"prompt": "a", "n": 0}, 400, "n", "'n' must be an integer in [1, 128], got 0"),
    ("/v1/completions", {"prompt": "a", "n": 1.5}, 400, "n", "'n' must be an integer"),
    ("/v1/completions", {"prompt": "a", "top_p": 0}, 400, "top_p", "'top_p' must be a number in (0, 1]"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 0}, 400, "max_tokens", "0 is taken with 'echo': true"),
    ("/v1/completions", {"prompt": "a", "max_tokens": -1, "echo": True}, 400, "max_tokens", "an integer >= 0"),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_completion_tokens": 0}, 400, "max_completion_tokens",
     "'max_completion_tokens' must be an integer >= 1, got 0"),
    ("/v1/completions", {"prompt": "a", "repetition_penalty": 0}, 400, "repetition_penalty", "a number > 0, got 0"),
    ("/v1/completions", {"prompt": "a", "min_p": 1.5}, 400, "min_p", "'min_p' must be a number in [0, 1]"),
    ("/v1/completions", {"prompt": "a", "temperature": float("nan")}, 400, "temperature", "got nan"),
    ("/v1/completions", {"prompt": "a", "frequency_penalty": 3}, 400, "frequency_penalty", "[-2, 2]"),
    ("/v1/completions", {"prompt": "a", "seed": "7"}, 400, "seed", "'seed' must be an integer"),
    ("/v1/completions", {"prompt": "a", "top_k": -2}, 400, "top_k", "'top_k' must be a positive integer"),
    ("/v1/completions", {"prompt": "a", "stop": ""}, 400, "stop", "'stop' must be a non-empty string"),
    ("/v1/completions", {"prompt": "a", "stream": "yes"}, 400, "stream", "'stream' must be true or false"),
    ("/v1/completions", {"prompt": "a", "stream": 0}, 400, "stream", "'stream' must be true or false, got 0"),
    ("/v1/chat/completions", {"messages": MESSAGES, "stream": 0}, 400, "stream", "'stream' must be true or false"),
    ("/v1/completions", {"prompt": "a", "stream_options": {"include_usage": True}}, 400, "stream_options",
     "only allowed with 'stream': true"),
    ("/v1/completions", {"prompt": "a", "stream": True, "stream_options": {"include_usage": "yes"}}, 400,
     "stream_options.include_usage", "'stream_options.include_usage' must be true or false, got 'yes'"),
    ("/v1/chat/completions", {"messages": MESSAGES, "stream": True, "stream_options": {"continuous_usage_stats": 1}},
     400, "stream_options.continuous_usage_stats", "'stream_options.continuous_usage_stats' must be true or false"),
    ("/v1/completions", {"prompt": "a", "stream": True, "stream_options": {"usage": True}}, 400,
     "stream_options.usage", "unknown field 'stream_options.usage'"),
    ("/v1/completions", {"prompt": "a", "stream": True, "stream_options": [True]}, 400, "stream_options",
     "'stream_options' must be an object"),
    ("/v1/completions", {"prompt": "a", "frobnicate": 1}, 400, "frobnicate", "unknown field 'frobnicate'"),
    ("/v1/completions", {"prompt": "a", "logprobs": 21}, 400, "logprobs", "'logprobs' must be an integer in [0, 20]"),
    ("/v1/completions", {"prompt": "a", "logprobs": True}, 400, "logprobs", "must be an integer in [0, 20]"),
    ("/v1/completions", {"prompt": "a", "echo": 1}, 400, "echo", "'echo' must be true or false"),
    ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": 1}, 400, "logprobs", "must be true or false"),
    ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs",
     "in [0, 20]"),
    ("/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, 400, "top_logprobs", "needs 'logprobs': true"),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"x": 1}}, 400, "logit_bias", "keys must be token ids"),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"-3": 1}}, 400, "logit_bias", "keys must be token ids"),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"9" * 5000: 1}}, 400, "logit_bias", "a key of 5000 digits"),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"5": 101}}, 400, "logit_bias", "in [-100, 100], got 101"),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"5": "1"}}, 400, "logit_bias", "in [-100, 100], got '1'"),
    ("/v1/completions", {"prompt": "a", "logit_bias": [5]}, 400, "logit_bias", "must be an object"),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"300": 1}}, 400, "logit_bias", "the model's tokens are 0..299"),
    ("/v1/chat/completions", {"messages": MESSAGES, "logit_bias": {"1": float("inf")}}, 400, "logit_bias",
     "got inf"),
    ("/v1/completions", {"prompt": "a", "min_tokens": -1}, 400, "min_tokens", "'min_tokens' must be an integer >= 0"),
    ("/v1/completions", {"prompt": "a", "min_tokens": 17}, 400, "min_tokens", "must be at most max_tokens (16)"),
    ("/v1/completions", {"prompt": "a", "stop_token_ids": 5}, 400, "stop_token_ids", "must be a list of token ids"),
    ("/v1/completions", {"prompt": "a", "stop_token_ids": [300]}, 400, "stop_token_ids",
     "token id 300: the model's tokens are 0..299"),
    ("/v1/chat/completions", {"messages": MESSAGES, "ignore_eos": 1}, 400, "ignore_eos", "must be true or false"),
    ("/v1/completions", {"prompt": "a", "include_stop_str_in_output": "no"}, 400, "include_stop_str_in_output",
     "must be true or false"),
    ("/v1/completions", {"prompt": [1, 300]}, 400, "prompt", "token ids must be in [0, 300)"),
    ("/v1/completions", {"prompt": [[1], []]}, 400, "prompt", "'prompt' must be a string, a list of token ids"),
    ("/v1/completions", {"prompt": "a", "best_of": 3}, 400, "best_of", "'best_of' other than n"),
    ("/v1/completions", {"prompt": "a", "best_of": True}, 400, "best_of", "'best_of' must be an integer"),
    ("/v1/completions", {"prompt": "a", "max_completion_tokens": 3}, 400, "max_completion_tokens", "unknown field"),
    ("/v1/completions", {}, 400, "prompt", "'prompt' must be a string"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", "the prompt is empty"),
    ("/v1/completions", {"prompt": "a<|endoftext|>"}, 400, "prompt", "special token <|endoftext|>"),
    ("/v1/completions", {"prompt": "q z " * 70}, 400, "max_tokens", "the model's context is 128 tokens"),
    ("/v1/completions", {"prompt": "a", "model": "gpt-4o"}, 404, "model", "'gpt-4o' does not exist"),
    ("/v1/chat/completions", {"messages": MESSAGES, "functions": [{"name": "f"}]}, 400, "functions",
     "'functions' is not supported"),
    ("/v1/chat/completions", {"messages": MESSAGES[:3]}, 400, "messages", "must end with an user message"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages", "role 'tool'"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages", "must be a list of messages"),
    ("/v1/chat/completions", {}, 400, "messages", "'messages' is required"),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2, "max_completion_tokens": 2}, 400,
     "max_completion_tokens", "pass one of"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "q z " * 70}]}, 400, "messages",
     "nothing is left for an answer"),
    ("/v1/chat/completions", {"messages": MESSAGES, "prompt": "a"}, 400, "prompt", "unknown field 'prompt'"),
    ("/tokenize", {}, 400, "prompt", "'prompt' (a string) or 'messages' is required"),
    ("/tokenize", {"prompt": [1, 2]}, 400, "prompt", "'prompt' must be a string, got [1, 2]"),
    ("/tokenize", {"prompt": "a", "messages": MESSAGES}, 400, "prompt", "pass one of 'prompt' and 'messages'"),
    ("/tokenize", {"prompt": "a", "add_special_tokens": 1}, 400, "add_special_tokens", "must be true or false"),
    ("/tokenize", {"prompt": "a", "return_token_strs": "yes"}, 400, "return_token_strs", "must be true or false"),
    ("/tokenize", {"prompt": "a", "add_generation_prompt": True}, 400, "add_generation_prompt",
     "taken with 'messages'"),
    ("/tokenize", {"prompt": "a", "model": "gpt-4o"}, 404, "model", "'gpt-4o' does not exist"),
    ("/tokenize", {"prompt": "a", "frobnicate": 1}, 400, "frobnicate", "unknown field 'frobnicate'"),
    ("/tokenize", {"messages": "hi"}, 400, "messages", "must be a list of messages"),
    ("/tokenize", {"messages": MESSAGES, "add_generation_prompt": False}, 400, "add_generation_prompt",
     "'add_generation_prompt' has no template to go to"),  # (tritongpt's own chat format: the template's modes)
    ("/tokenize", {"messages": MESSAGES, "add_special_tokens": True}, 400, "add_special_tokens",
     "'add_special_tokens': true with 'messages' is not supported"),
    ("/tokenize", {"messages": MESSAGES, "continue_final_message": True}, 400, "continue_final_message",
     "'continue_final_message' has no template to go to"),
    ("/v1/chat/completions", {"messages": MESSAGES, "continue_final_message": True, "add_generation_prompt": True},
     400, "continue_final_message", "Cannot set both `continue_final_message` and `add_generation_prompt`"),
    ("/tokenize", {"messages": MESSAGES, "chat_template": "{{ x }}"}, 400, "chat_template", "not supported"),
    ("/detokenize", {}, 400, "tokens", "'tokens' (a list of token ids) is required"),
    ("/detokenize", {"tokens": "the"}, 400, "tokens", "'tokens' must be a list of token ids, got 'the'"),
    ("/detokenize", {"tokens": [1, True]}, 400, "tokens", "must be a list of token ids"),
    ("/detokenize", {"tokens": [5, 300]}, 400, "tokens", "'tokens' token ids must be in [0, 300)"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens", "must be in [0, 300)"),
    ("/detokenize", {"tokens": [1], "prompt": "a"}, 400, "prompt", "unknown field 'prompt'"),
    ("/v1/completions", {"prompt": "a", "prompt_logprobs": 21}, 400, "prompt_logprobs", "in [0, 20]"),
    ("/v1/chat/completions", {"messages": MESSAGES, "prompt_logprobs": "2"}, 400, "prompt_logprobs", "in [0, 20]"),
    ("/v1/chat/completions", {"messages": MESSAGES, "prompt_logprobs": 1, "stream": True}, 400, "prompt_logprobs",
     "'prompt_logprobs' is not available with 'stream': true"),
    ("/v1/completions", {"prompt": "a", "skip_special_tokens": 0}, 400, "skip_special_tokens", "true or false"),
    ("/v1/completions", {"prompt": "a", "spaces_between_special_tokens": "no"}, 400,
     "spaces_between_special_tokens", "true or false"),
    ("/v1/chat/completions", {"messages": MESSAGES, "return_tokens_as_token_ids": 1}, 400,
     "return_tokens_as_token_ids", "'return_tokens_as_token_ids' must be true or false"),
])
def test_bad_requests_get_openais_error_object(served, path, body, status, param, says):
    server, _ = served
    got, err = call(server, path, body)
    assert got == status and set(err) == {"error"}
    assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["param"] == param
    assert says in err["error"]["message"] and err["error"]["type"] == "invalid_request_error"


def test_bad_paths_methods_and_bodies(served):
    server, _ = served
    for path, method, raw, status, says in [
            ("/v1/nothing", "GET", None, 404, "unknown path: GET /v1/nothing"),
            ("/v1/completions", "GET", None, 405, "GET is not allowed on /v1/completions"),
            ("/v1/models", "POST", b"{}", 405, "POST is not allowed on /v1/models"),
            ("/v1/completions", "DELETE", None, 405, "DELETE is not allowed"),
            ("/v1/completions", "POST", b"{not json", 400, "not valid JSON"),
            ("/v1/completions", "POST", b"[1, 2]", 400, "must be a JSON object, got list"),
            ("/v1/completions", "POST", b"\xff", 400, "not valid JSON"),
            ("/tokenize", "GET", None, 405, "GET is not allowed on /tokenize (only POST)"),
            ("/health", "POST", b"{}", 405, "POST is not allowed on /health (only GET)"),
            ("/detokenize", "POST", b"[5]", 400, "must be a JSON object, got list")]:
        got, err = call(server, path, method=method, raw=raw)
        assert got == status and set(err["error"]) == {"message", "type", "param", "code"}, (path, method)
        assert says in err["error"]["message"]


def test_an_internal_failure_is_a_500_without_a_traceback(served, monkeypatch, capsys):
    server, _ = served
    monkeypatch.setattr(server.app, "draw", lambda *a, **k: 1 / 0)
    got, err = call(server, "/v1/completions", {"prompt": "a"})
    assert got == 500 and err["error"]["type"] == "server_error" and "Traceback" not in err["error"]["message"]
    assert "ZeroDivisionError" in capsys.readouterr().err  # in the server's log


def test_model_help_of_serve_run_batch_and_bench_names_no_tiny_default(capsys):
    """generate and chat build an untrained tiny without --weights or --pretrained; serve, run-batch and bench serve
    refuse to run so (check_server_args), so their --model help states no tiny default (it did, shared with
    generate's)."""
    import argparse

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices

    def model_help(command):
        return next(a.help for a in commands[command]._actions if a.dest == "model")

    assert "(default tiny, gpt2-small with --pretrained" in model_help("generate")
    for command in ("serve", "run-batch", "bench"):
        assert "tiny," not in model_help(command) and "gpt2-small with --pretrained" in model_help(command), command
    assert main(["serve"]) == 2 and "serve needs a model" in capsys.readouterr().err


def test_readme_names_the_flags_auto_tool_choice_needs():
    """README's Serving summary says what "auto" tool choice is served with: every flag the server's refusal of it
    (AUTO_REFUSED, vLLM's words) names, not --tool-call-parser alone (refused without --enable-auto-tool-choice)."""
    import re
    from pathlib import Path

    import tritongpt

    readme = Path(tritongpt.__file__).resolve().parent.parent / "README.md"
    if not readme.exists():
        pytest.skip("not a checkout: no README.md beside the package")
    said = re.search(r'Tool\s+calling\s+\(`tools`,\s+`tool_choice`\s+named\s+or\s+`"required"`,\s+`"auto"`\s+with\s+'
                     r'([^)]*)\)', readme.read_text())
    assert said, "README: the Serving summary's 'Tool calling (..., \"auto\" with ...)' is not found"
    flags = set(re.findall(r"--[a-z-]+", said.group(1)))
    assert flags == set(re.findall(r"--[a-z-]+", serve.AUTO_REFUSED)), flags


def test_the_command_refuses_bad_flags(capsys, tmp_path):
    assert main(["serve"]) == 2
    assert "serve needs a model: pass --weights" in capsys.readouterr().err
    assert main(["serve", "--weights", str(tmp_path), "--port", "70000"]) == 2
    assert "--port must be in [0, 65535], got 70000" in capsys.readouterr().err
    # a page size without pages was ignored without a word
    assert main(["serve", "--weights", str(tmp_path), "--kv-page-size", "8"]) == 2
    assert "--kv-page-size sizes the pages of --kv-cache-pages: pass --kv-cache-pages N too" in capsys.readouterr().err
    assert main(["serve", "--weights", str(tmp_path), "--enable-prefix-caching"]) == 2
    assert "--enable-prefix-caching shares the pages of the paged KV cache: pass --kv-cache-pages N too" in \
        capsys.readouterr().err
    assert main(["serve", "--weights", str(tmp_path), "--max-prefill-tokens", "4", "--max-batch", "1"]) == 2
    assert "--max-prefill-tokens must be a positive number of tokens, with --max-batch above 1" in \
        capsys.readouterr().err


def test_a_hugging_face_instruct_folder_answers_in_its_own_chat_template(tmp_path):
    """A folder whose tokenizer has a chat template (ChatML) and no run: the chat answer is transformers' greedy
    continuation of apply_chat_template(add_generation_prompt), up to the template's <|im_end|>."""
    pytest.importorskip("transformers")
    from test_chat_template import CHATML, chat_folder

    path, theirs, hf = chat_folder(tmp_path / "qwen", CHATML, "<|im_end|>")
    server = start(path, "--kernels", "reference")
    server.RequestHandlerClass.log_message = lambda *a: None
    try:
        assert server.app.chat_stop == theirs.convert_tokens_to_ids("<|im_end|>")
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the cat sat"}]
        prompt = theirs.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        with torch.no_grad():
            row = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                              pad_token_id=0)[0, len(prompt):].tolist()
        end = server.app.chat_stop
        body = call(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 6, "temperature": 0})[1]
        assert body["choices"][0]["message"]["content"] == theirs.decode(row[:row.index(end)] if end in row else row)
        assert body["usage"]["prompt_tokens"] == len(prompt) and body["model"] == str(path)
    finally:
        server.shutdown()
        server.server_close()


def test_requests_at_once_take_turns_and_get_what_each_gets_alone(served):
    server, _ = served
    reqs = [{"prompt": f"the {w}", "max_tokens": 6, "n": 2, "seed": i} for i, w in enumerate(["cat", "dog", "mat"])]
    alone = [call(server, "/v1/completions", r)[1]["choices"] for r in reqs]
    got = [None] * len(reqs)

    def ask(i):
        got[i] = call(server, "/v1/completions", reqs[i])[1]["choices"]
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == alone


def test_the_sampling_fields_draw_as_generate_draws_with_them(served):
    """...in vLLM's order (min_p before top_p: generate's min_p_first), where transformers' order (generate's
    default) draws other tokens: this near-uniform model's min_p 0.8 keeps 58 tokens, top_p 0.3 of those 17, of the
    whole row 58."""
    server, tok = served
    ids = tok.encode("a dog ran")
    settings = dict(temperature=0.7, top_p=0.8, top_k=40, min_p=0.02, frequency_penalty=0.5, presence_penalty=-0.3,
                    repetition_penalty=1.3)
    parting = dict(temperature=1.0, top_p=0.3, min_p=0.8)
    vllm = {"min_p_first": True}

    def rows(**kwargs):
        return generate(server.app.model, torch.tensor([ids] * 3), 10, eos_id=tok.eot_id,
                        generator=torch.Generator().manual_seed(21), **kwargs)[:, len(ids):].tolist()
    for fields, kwargs in ((settings, {**settings, **vllm}), (parting, {**parting, **vllm}),
                           ({}, {"temperature": 1.0})):  # ({}: OpenAI's temperature 1)
        body = call(server, "/v1/completions", {"prompt": "a dog ran", "max_tokens": 10, "n": 3, "seed": 21,
                                                **fields})[1]
        assert [c["text"] for c in body["choices"]] == [
            new_text(tok, ids, r[:r.index(tok.eot_id)] if tok.eot_id in r else r) for r in rows(**kwargs)], fields
    assert rows(**parting) != rows(**parting, **vllm)  # (the orders part here)


def test_a_temperature_under_vllms_epsilon_is_greedy(both, monkeypatch):
    """vLLM's sampler takes the argmax below a temperature of 1e-5 (vllm/v1/sample/sampler.py _SAMPLING_EPS), and so
    does serve, with the engine and without: the decode step is handed temperature 0 (sample_next's, or the
    engine's batched draw's, sample_rows); 1e-5 itself samples.
    (generate, as transformers, samples at any temperature > 0.)"""
    server, tok = both
    handed = []

    def spy(*args, **kwargs):
        handed.append(kwargs["temperature"])
        return sample_next(*args, **kwargs)

    def rows_spy(logits, warps, *args, **kwargs):
        handed.extend(w["temperature"] for w in warps)
        return sample_rows(logits, warps, *args, **kwargs)
    sample_next, sample_rows = generate_module.sample_next, engine_module.sample_rows
    monkeypatch.setattr(generate_module, "sample_next", spy)
    monkeypatch.setattr(engine_module, "sample_rows", rows_spy)
    for temperature in (9e-6, 1e-5):
        handed.clear()
        status, body = call(server, "/v1/completions", {"prompt": "a dog ran", "max_tokens": 2,
                                                        "temperature": temperature})
        assert status == 200 and handed == [0.0 if temperature < 1e-5 else temperature] * 2, (temperature, handed)
        assert body["choices"][0]["text"] == call(server, "/v1/completions", {
            "prompt": "a dog ran", "max_tokens": 2, "temperature": 0})[1]["choices"][0]["text"]


def test_the_context_holds_the_prompt_and_max_tokens_exactly(served):
    server, tok = served
    prompt = "q z " * 20
    room = 128 - len(tok.encode(prompt))
    body = call(server, "/v1/completions", {"prompt": prompt, "max_tokens": room, "temperature": 0})[1]
    assert body["usage"]["total_tokens"] == 128
    status, err = call(server, "/v1/completions", {"prompt": prompt, "max_tokens": room + 1})
    assert status == 400 and err["error"]["code"] == "context_length_exceeded"


def test_a_chat_answer_ends_at_the_templates_end_of_turn(served, monkeypatch):
    server, tok = served
    ids = formats.encode_prompt(tok, chat.Conversation("chat").prompt("How are you?", 0, tok))
    new = reference(server, ids, 12)[0]
    end = new[3]  # a token the greedy answer draws, made the template's end of turn for this test
    monkeypatch.setattr(server.app, "chat_stop", end)
    body = call(server, "/v1/chat/completions", {"messages": MESSAGES[3:], "max_tokens": 12, "temperature": 0})[1]
    assert body["choices"][0]["message"]["content"] == new_text(tok, ids, new[:new.index(end)])
    assert body["choices"][0]["finish_reason"] == "stop" and body["usage"]["completion_tokens"] == new.index(end) + 1


def test_a_run_tuned_on_completions_answers_one_user_message_as_chat_does(tmp_path):
    tok = tiny_run(tmp_path / "run", "completion")
    server = start(tmp_path / "run")
    server.RequestHandlerClass.log_message = lambda *a: None
    try:
        ids = formats.encode_prompt(tok, chat.Conversation("completion").prompt("the cat sat"))
        assert ids == tok.encode("the cat sat")  # the message as it is
        want, _ = chat.reply(server.app.model, tok, ids, 8, temperature=0.0, stream=False)
        body = call(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "the cat sat"}],
                                                     "max_tokens": 8, "temperature": 0})[1]
        assert body["choices"][0]["message"]["content"] == want
        for messages in (MESSAGES[1:], MESSAGES[:2]):  # earlier turns, a system message: the template has none
            status, err = call(server, "/v1/chat/completions", {"messages": messages})
            assert status == 400 and "was tuned on completion prompts" in err["error"]["message"]
    finally:
        server.shutdown()
        server.server_close()


def test_405_names_the_allowed_method_and_a_failure_mid_stream_is_an_error_event(served, monkeypatch):
    server, _ = served
    for path, allowed in (("/v1/models/tiny-chat", "GET"), ("/v1/chat/completions", "POST")):
        req = urllib.request.Request(f"http://127.0.0.1:{server.server_address[1]}{path}", method="PUT")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 405 and e.value.headers["Allow"] == allowed
    # OPTIONS and HEAD too (vLLM's 405s; http.server's own 501 page before, no error object), HEAD's without a body
    import socket

    for method in ("OPTIONS", "HEAD"):
        with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=30) as sock:
            sock.sendall(method.encode() + b" /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        head, _, sent = reply.partition(b"\r\n\r\n")
        assert head.split()[1] == b"405" and b"\r\nAllow: GET" in head, method
        assert (json.loads(sent)["error"]["code"] if method == "OPTIONS" else sent) == \
            ("method_not_allowed" if method == "OPTIONS" else b"")

    def fail(*a, **k):
        raise serve.UserError("no-repeat n-grams ban every token")
    monkeypatch.setattr(server.app, "draw", fail)
    status, text = call(server, "/v1/completions", {"prompt": "a", "stream": True})
    assert status == 200  # (sent before the first token)
    assert events(text) == [{"error": {"message": "no-repeat n-grams ban every token",
                                       "type": "invalid_request_error", "param": None, "code": None}}]


def raw_request(server, head: bytes, body: bytes = b"", timeout=30):
    """(status, parsed error or body) of a request written byte by byte: headers urllib would not send."""
    import socket

    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=timeout) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n\r\n" + body)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    status, _, rest = reply.partition(b"\r\n\r\n")
    return int(status.split()[1]), json.loads(rest)


@pytest.mark.parametrize("length, status, says", [
    ("10" + "0" * 30, 413, "at most"),  # past an index-sized int (was an OverflowError: a 500)
    (str(10**12), 413, "at most"),  # a terabyte would be allocated (or waited for)
    ("\u00b2", 400, "Content-Length"),  # a digit to str.isdigit(), not to int()
])
def test_a_content_length_too_large_or_not_a_number_is_refused(served, length, status, says):
    server, _ = served
    got, err = raw_request(server, b"Content-Length: " + length.encode("latin-1"), b"{}")
    assert got == status and says in err["error"]["message"]


def test_json_nested_past_the_parsers_depth_is_a_400(served):
    server, _ = served
    got, err = call(server, "/v1/completions", raw=b"[" * 100_000 + b"]" * 100_000)
    assert got == 400 and "not valid JSON" in err["error"]["message"]


def test_an_integer_past_pythons_digit_limit_is_a_400(served):
    # (json.loads refuses an int of more than 4300 digits with a plain ValueError, not a JSONDecodeError)
    server, _ = served
    got, err = call(server, "/v1/completions", raw=b'{"prompt": "a", "seed": ' + b"9" * 5000 + b"}")
    assert got == 400 and "not valid JSON" in err["error"]["message"] and "4300" in err["error"]["message"]


def test_a_body_shorter_than_its_content_length_times_out_with_a_408(served, monkeypatch):
    server, _ = served
    assert serve.Handler.timeout is not None and 0 < serve.Handler.timeout <= 600  # never a thread held forever
    monkeypatch.setattr(serve.Handler, "timeout", 0.5)
    got, err = raw_request(server, b"Content-Length: 100", b'{"prompt": "the"', timeout=10)
    assert got == 408 and "did not arrive" in err["error"]["message"]
    assert call(server, "/v1/models")[0] == 200  # and the server still answers


def test_cuda_graphs_serve_the_eager_text_and_are_refused_off_cuda(tmp_path, monkeypatch):
    """--cuda-graphs: each request's generate replays its decode steps (--max-batch 1), or the batching engine its
    steps (--max-batch 4: 3 rows, the graph of bucket 4), the captures emulated on the CPU past the startup's device
    check, the eager text; on a CPU the server refuses to start, naming the flag."""
    import functools

    import tritongpt.commands as commands
    import tritongpt.train.engine as engine
    import tritongpt.train.generate as gen
    from test_decode_graph import fx_capture

    folder = tmp_path / "run"
    tiny_run(folder, "chat")
    for batch in ("1", "4"):
        with pytest.raises(UserError, match="--cuda-graphs needs the model on a CUDA device; it is on cpu"):
            start(folder, "--cuda-graphs", "--max-batch", batch)
    body = {"prompt": "the cat sat", "max_tokens": 7, "n": 3, "seed": 5, "temperature": 0.8}
    texts = {}
    captured = []

    def capture(fn, device):
        captured.append(device)
        return fx_capture(fn)
    monkeypatch.setattr(commands, "check_cuda_graphs", lambda args, device, model: None)
    monkeypatch.setattr(gen, "capture_cuda_graph", capture)
    monkeypatch.setattr(engine, "Engine", functools.partial(engine.Engine, capture=capture))
    for flags in ((), ("--cuda-graphs", "--max-batch", "1"), ("--cuda-graphs", "--max-batch", "4")):
        status, out, server = serve_once(folder, "/v1/completions", body, *flags)
        assert status == 200
        texts[flags] = [c["text"] for c in out["choices"]]
        if flags[-1:] == ("4",):
            assert sorted(server.app.engine.graphs) == [4]
    assert texts[()] == texts[("--cuda-graphs", "--max-batch", "1")] == texts[("--cuda-graphs", "--max-batch", "4")]
    assert len(captured) == 2  # generate's, the engine's for bucket 4


def test_cuda_graphs_with_a_model_no_graph_replays_are_refused_at_startup(tmp_path):
    """A mixture-of-experts model's decode step cannot be captured: serve --cuda-graphs refuses to start, naming
    why, rather than failing every request at its first decode step. (The model is asked before the device.)"""
    folder = tmp_path / "run"
    tok = tiny_run(folder, "chat")
    GPTModel(GPTConfig(vocab_size=tok.vocab_size, context_length=128, n_embd=32, n_layer=1, n_head=2,
                       position_encoding="rope", norm="rmsnorm", mlp="swiglu", n_experts=4,
                       experts_per_token=2)).save(folder / "ckpt-0000001" / "model.safetensors")
    for batch in ("1", "4"):
        with pytest.raises(UserError, match="CUDA-graph decoding does not take mixture-of-experts models"):
            start(folder, "--cuda-graphs", "--max-batch", batch)


def scrape(server, model="tiny"):
    """GET /metrics parsed: {(name, sorted labels): value}; every line checked against Prometheus' text format
    (HELP and TYPE before a family's samples, `name{labels} float`, histogram buckets cumulative to +Inf), every
    sample's model_name the served model's, and its engine vLLM's "0" (lora_requests_info's none, as vLLM's)."""
    import re

    url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    assert text.endswith("\n")
    helps, types, samples = {}, {}, {}
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            _, word, name, rest = line.split(" ", 3)
            assert name.startswith("tritongpt:") and rest, line
            (helps if word == "HELP" else types)[name] = rest
            continue
        m = re.fullmatch(r'(tritongpt:[a-z0-9_]+)\{((?:[a-z_]+="[^"]*",?)*)\} (\S+)', line)
        assert m, line
        name, labels, value = m.group(1), dict(re.findall(r'([a-z_]+)="([^"]*)"', m.group(2))), float(m.group(3))
        assert value == value, line  # (never NaN)
        family = re.sub(r"_(bucket|sum|count)$", "", name) if types.get(name) is None else name
        assert family in helps and family in types, f"{line}: no HELP/TYPE for {family}"
        assert types[family] in ("gauge", "counter", "histogram") and labels.get("model_name") == model, line
        assert labels.pop("engine", None) == (None if family == "tritongpt:lora_requests_info" else "0"), line
        samples[name, tuple(sorted(labels.items()))] = value
    for family in (f for f, t in types.items() if t == "histogram"):
        les = [(dict(k[1])["le"], v) for k, v in samples.items() if k[0] == family + "_bucket"]
        assert les[-1][0] == "+Inf" and [float(le) for le, _ in les] == sorted(float(le) for le, _ in les)
        assert all(a <= b for (_, a), (_, b) in zip(les, les[1:]))  # cumulative
        assert samples[family + "_count", (("model_name", model),)] == les[-1][1]
        assert (family + "_sum", (("model_name", model),)) in samples
    return samples


def metric(samples, name, model="tiny", **labels):
    """A sample of scrape()'s (its engine label "0" checked there)."""
    return samples["tritongpt:" + name, tuple(sorted({"model_name": model, **labels}.items()))]


def phases(s, requests, tokens):
    """vLLM's per-request histograms in a scrape of `requests` requests that ended with their choices, tokens
    [(prompt, completion)] theirs: one observation each, prefill + decode = inference, queue + inference within
    the handler's own time around them of e2e; the token histograms' sums the usage's."""
    count = {name: metric(s, f"request_{name}_count") for name in ("queue_time_seconds", "prefill_time_seconds",
             "decode_time_seconds", "inference_time_seconds", "time_per_output_token_seconds", "prompt_tokens",
             "generation_tokens")}
    assert set(count.values()) == {requests}, count
    total = {name: metric(s, f"request_{name}_time_seconds_sum") for name in ("queue", "prefill", "decode",
                                                                                "inference")}
    assert total["prefill"] + total["decode"] == pytest.approx(total["inference"], rel=1e-9, abs=1e-9)
    e2e = metric(s, "e2e_request_latency_seconds_sum")
    assert 0 < total["queue"] + total["inference"] <= e2e
    assert e2e - total["queue"] - total["inference"] < 0.1 * requests + 0.25 * e2e  # (the tokenizing, the texts)
    assert min(total.values()) >= 0 and total["decode"] > 0
    assert 0 < metric(s, "request_time_per_output_token_seconds_sum") <= total["decode"]
    assert metric(s, "request_prompt_tokens_sum") == sum(p for p, _ in tokens)
    assert metric(s, "request_generation_tokens_sum") == sum(g for _, g in tokens)


def test_token_count_buckets_are_vllms_1_2_5_up_to_the_context():
    from tritongpt.train.metrics import Metrics, buckets_1_2_5

    assert buckets_1_2_5(100) == (1, 2, 5, 10, 20, 50, 100) and buckets_1_2_5(1023)[-3:] == (200, 500, 1000)
    assert Metrics("m", 32).hist["request_prompt_tokens"].buckets == (1, 2, 5, 10, 20)


def test_metrics_text_is_strict_prometheus_0_0_4_with_a_model_name_to_escape():
    """Every line of render() read by Prometheus' 0.0.4 grammar, strictly: a label value's backslash, quote and
    newline escaped (a raw newline would cut the sample in two), which read back give the served model's name; HELP
    then TYPE once a family, before its samples; histograms cumulative to +Inf == _count."""
    import re
    from types import SimpleNamespace as NS

    from tritongpt.train.metrics import Metrics

    name = 'a "q"\\b\nc\\n'  # (a quote, a backslash before b, a newline, a backslash before n)
    stats = {"prompt_tokens": 5, "cached_prompt_tokens": 2, "preemptions": 0}
    engine = NS(cond=threading.Condition(), paged=False, max_batch=4, free=[0, 1, 2], stats=stats, max_loras=2,
                adapters=NS(names=["x\\y", 'p"\nq']), running=[NS(adapter=0)], waiting=[NS(adapter=1)])
    m = Metrics(name, 32, engine)
    t = m.request()
    t.scheduled = t.start
    t.tokens(), t.tokens(), t.end(["stop"], 3, [2])
    value = r'"((?:[^"\\\n]|\\[\\"n])*)"'  # (the grammar's label value: only \\, \" and \n escapes)
    sample = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{((?:[a-zA-Z_][a-zA-Z0-9_]*=" + value.replace("((", "(?:(", 1) +
                        r",?)*)\} (\S+)")
    unescape = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}
    seen, families, hist = [], {}, {}
    text = m.render()
    assert text.endswith("\n") and "\r" not in text
    for line in text[:-1].split("\n"):
        if line.startswith("#"):
            word, family, rest = re.fullmatch(r"# (HELP|TYPE) (\S+) (.+)", line).groups()
            assert not re.search(r"\\[^\\n]", rest), line  # (HELP's escapes: only \\ and \n)
            seen.append((word, family))
            if word == "TYPE":
                assert seen[-2:] == [("HELP", family), ("TYPE", family)] and family not in families, line
                families[family] = rest
            continue
        got = sample.fullmatch(line)
        assert got, line
        family = got.group(1)
        kind = families[seen[-1][1]]
        assert family == seen[-1][1] or kind == "histogram" and re.fullmatch(
            re.escape(seen[-1][1]) + "_(bucket|sum|count)", family), line
        labels = {k: re.sub(r"\\.", lambda e: unescape[e.group()], v)
                  for k, v in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)=" + value, got.group(2))}
        assert labels["model_name"] == name, line
        float(got.group(3))
        if family.endswith("_bucket"):
            hist.setdefault(family[:-7], []).append((float(labels["le"]), float(got.group(3))))
        elif family.endswith("_count") and kind == "histogram":
            assert hist[family[:-6]][-1] == (float("inf"), float(got.group(3))), line
        if family.endswith("lora_requests_info"):
            assert labels["running_lora_adapters"] == "x\\y" and labels["waiting_lora_adapters"] == 'p"\nq'
    assert set(families.values()) == {"gauge", "counter", "histogram"} and len(hist) == 15
    for family, les in hist.items():
        assert les == sorted(les) and les[-1][0] == float("inf"), family  # (bounds rising, counts cumulative)
    assert hist["tritongpt:time_to_first_token_seconds"][-1][1] == 1


def test_metrics_count_what_the_responses_say(tmp_path, monkeypatch):
    """/metrics after a completion, a streamed n=2 one, one cut by a stop string and one whose client hangs up:
    the token counters are the responses' usage, the finish reasons theirs, the histograms one observation a
    request (a gap a step), prefix-cache hits the full blocks a repeated prompt finds; the paged cache's usage is the
    pages a running request holds of the cache's, and everything idle again reads 0."""
    import time

    folder = tmp_path / "run"
    tiny_run(folder, "chat")
    server = start(folder, "--served-model-name", "tiny", "--max-batch", "4", "--kv-cache-pages", "24",
                   "--kv-page-size", "8", "--enable-prefix-caching")
    server.RequestHandlerClass.log_message = lambda *a: None
    engine = server.app.engine
    try:
        long = "the cat sat on the mat. a dog ran in the park"
        P = len(server.app.completion_prompt(long))
        assert P > 9  # (a full block to find again)
        _, a = call(server, "/v1/completions", {"prompt": long, "max_tokens": 6, "temperature": 0})
        _, text = call(server, "/v1/completions", {"prompt": "Hello there", "max_tokens": 5, "n": 2, "stream": True,
                                                   "temperature": 0, "stream_options": {"include_usage": True}})
        chunks = events(text)
        b = chunks[-1]
        b["choices"] = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        stop = fresh_stop(a["choices"][0]["text"], 2)
        _, c = call(server, "/v1/completions", {"prompt": long, "max_tokens": 6, "temperature": 0, "stop": stop})
        reasons = [ch["finish_reason"] for r in (a, b, c) for ch in r["choices"]]
        assert reasons == ["length"] * 3 + ["stop"]
        s = scrape(server)
        # (b's prompt once a choice: vLLM's n child requests each prefill it; its usage counts it once)
        prompts = a["usage"]["prompt_tokens"] + 2 * b["usage"]["prompt_tokens"] + c["usage"]["prompt_tokens"]
        assert metric(s, "prompt_tokens_total") == prompts
        assert metric(s, "generation_tokens_total") == sum(r["usage"]["completion_tokens"] for r in (a, b, c))
        for reason in ("stop", "length", "abort", "error"):
            assert metric(s, "request_success_total", finished_reason=reason) == reasons.count(reason)
        assert metric(s, "time_to_first_token_seconds_count") == metric(s, "e2e_request_latency_seconds_count") == 4
        steps = [a["usage"]["completion_tokens"], *[b["usage"]["completion_tokens"] // 2] * 2,
                 c["usage"]["completion_tokens"]]
        assert metric(s, "time_per_output_token_seconds_count") == sum(k - 1 for k in steps)
        for part in ("count", "sum"):  # (vLLM 0.11's name for it)
            assert metric(s, f"inter_token_latency_seconds_{part}") == metric(s, f"time_per_output_token_seconds_{part}")
        assert metric(s, "e2e_request_latency_seconds_sum") > 0
        phases(s, 4, [(r["usage"]["prompt_tokens"], r["usage"]["completion_tokens"] // len(r["choices"]))
                      for r in (a, b, b, c)])
        # n equal rows prefill once (usage counts their prompt once too); the repeated prompt finds a's full blocks
        # (its last token always computed)
        assert metric(s, "prefix_cache_queries_total") == 2 * P + b["usage"]["prompt_tokens"]
        assert metric(s, "prefix_cache_hits_total") == (P - 1) // 8 * 8 > 0
        assert metric(s, "num_requests_running") == metric(s, "num_requests_waiting") == 0
        assert metric(s, "kv_cache_usage_perc") == 0  # (cached pages no request holds count as free)

        assert metric(s, "num_preemptions_total") == 0
        # vLLM's cache_config_info: the paged cache's config as labels (vLLM's strings), its value 1
        (info,) = [k for k in s if k[0] == "tritongpt:cache_config_info"]
        assert dict(info[1]) == {"model_name": "tiny", "block_size": "8", "num_gpu_blocks": "24", "cache_dtype": "auto",
                                 "enable_prefix_caching": "True"} and s[info] == 1

        real, gate = engine.step, threading.Lock()  # (held: the engine between steps, its pages as scraped)

        def step():
            time.sleep(0.02)  # 100 steps: 2 s
            with gate:
                return real()
        monkeypatch.setattr(engine, "step", step)
        sock, deadline = running_request(server, {"prompt": "the cat", "max_tokens": 100, "stream": True})
        with gate:
            s = scrape(server)
            assert metric(s, "num_requests_running") == 1 and metric(s, "num_requests_waiting") == 0
            # its pages: the ones its rows have filled (and the next decode's), taken as they grow, not its budget's
            held, T = len(engine.cache.pages[engine.running[0].slots[0]]), engine.running[0].idx.size(1)
            assert metric(s, "kv_cache_usage_perc") == held / 24 and held <= -(-T // 8)
        sock.close()
        # (the handler counts the abort when it sees the client gone; the engine frees its rows at its next step)
        while (server.app.metrics.finished["abort"] == 0 or engine.running) and time.time() < deadline:
            time.sleep(0.01)
        s = scrape(server)
        assert metric(s, "request_success_total", finished_reason="abort") == 1
        assert metric(s, "e2e_request_latency_seconds_count") == 5
        assert metric(s, "num_requests_running") == metric(s, "kv_cache_usage_perc") == 0
        # its prompt and the tokens it drew counted (vLLM's engine steps count them as they are made)
        assert metric(s, "prompt_tokens_total") == prompts + len(server.app.completion_prompt("the cat"))
        assert metric(s, "generation_tokens_total") > sum(r["usage"]["completion_tokens"] for r in (a, b, c))
        # its phases timed as far as it got (it drew tokens), its token histograms not
        assert metric(s, "request_inference_time_seconds_count") == 5 and metric(s, "request_prompt_tokens_count") == 4
    finally:
        server.shutdown()
        server.server_close()


def test_metrics_count_n_choices_as_vllms_n_child_requests(both):
    """vLLM splits an n > 1 request into n child requests, each prefilling the prompt (parallel_sampling.py): n
    finished requests, the prompt n times, n first tokens, each step's gap n times, n observations of each
    per-request histogram and of max_tokens, and once the parent's n and the most tokens of its choices; streamed
    or not, with the engine or --max-batch 1, a beam search as its n beams (all its tokens at once: no gap). Each
    step's tokens (iteration_tokens_total) count every child's too."""
    server, _ = both
    cases = [({"n": 3, "max_tokens": 4, "temperature": 1, "seed": 1}, 3, 4, 4),
             ({"n": 3, "max_tokens": 4, "temperature": 1, "seed": 1, "stream": True}, 3, 4, 4),
             ({"n": 2, "max_tokens": 3, "use_beam_search": True}, 2, 3, 1)]
    P = len(server.app.completion_prompt("the cat"))
    for body, n, k, steps in cases:
        before = scrape(server, "tiny-chat")
        status, out = call(server, "/v1/completions", {"prompt": "the cat", "ignore_eos": True, **body})
        assert status == 200
        after = scrape(server, "tiny-chat")

        def delta(name, **labels):
            return metric(after, name, "tiny-chat", **labels) - metric(before, name, "tiny-chat", **labels)
        assert delta("request_success_total", finished_reason="length") == n, body
        assert delta("prompt_tokens_total") == n * P and delta("generation_tokens_total") == n * k
        assert delta("time_to_first_token_seconds_count") == n
        assert delta("inter_token_latency_seconds_count") == delta("time_per_output_token_seconds_count") == \
            n * (steps - 1)
        for name in ("e2e_request_latency_seconds", "request_queue_time_seconds", "request_prefill_time_seconds",
                     "request_decode_time_seconds", "request_inference_time_seconds",
                     "request_time_per_output_token_seconds", "request_prompt_tokens", "request_generation_tokens",
                     "request_params_max_tokens"):
            assert delta(name + "_count") == n, name
        assert delta("request_prompt_tokens_sum") == n * P and delta("request_generation_tokens_sum") == n * k
        assert delta("request_params_max_tokens_sum") == n * body["max_tokens"]
        assert delta("request_params_n_count") == 1 and delta("request_params_n_sum") == n
        assert delta("request_params_n_bucket", le="1.0") == 0 and delta("request_params_n_bucket", le="5.0") == 1
        assert delta("request_max_num_generation_tokens_count") == 1
        assert delta("request_max_num_generation_tokens_sum") == k
        # vLLM's tokens per engine step: the first step each child's prompt and its token, then a token a child (a
        # beam search's beams come at once: one observation of them all)
        beams = "use_beam_search" in body
        assert delta("iteration_tokens_total_count") == (1 if beams else k)
        assert delta("iteration_tokens_total_sum") == n * (P + k)


def test_iteration_tokens_count_no_choice_past_its_end(both):
    """vLLM's iteration_tokens_total counts a step's new tokens of the child requests still drawing: a choice ended by
    a stop string or a stop token adds none after (--max-batch 1's generate() pads it to the last step: not tokens),
    so over a request the sum is its prompt once a choice and its completion tokens, as with the engine."""
    server, _ = both
    P = len(server.app.completion_prompt("the cat"))
    body = {"prompt": "the cat", "n": 3, "max_tokens": 12, "temperature": 1, "seed": 5, "return_token_ids": True}
    first = None
    for ends in ({"stop": [" "]}, "stop token"):
        if ends == "stop token":  # (the same seeded draws, ended where choice 0's drew its 2nd token)
            ends = {"stop_token_ids": [first["choices"][0]["token_ids"][1]]}
        before = scrape(server, "tiny-chat")
        status, out = call(server, "/v1/completions", {**body, **ends})
        assert status == 200
        after = scrape(server, "tiny-chat")
        first = first or out
        counts = [len(c["token_ids"]) for c in out["choices"]]
        assert min(counts) < max(counts), (ends, counts)  # (a choice ended steps before another)
        delta = metric(after, "iteration_tokens_total_sum", "tiny-chat") - \
            metric(before, "iteration_tokens_total_sum", "tiny-chat")
        assert delta == 3 * P + out["usage"]["completion_tokens"] == 3 * P + sum(counts), ends


def test_each_choice_times_its_inter_token_gaps_up_to_its_own_end(both, monkeypatch):
    """vLLM's n child requests each observe their own inter-token latencies: a choice a stop string ended early adds
    no gap of the steps its siblings drew after it (each choice's tokens less its first). With the engine the
    handler is held after its first step until the engine has drawn the whole request (its stop rule ahead of the
    handler's steps: a choice's stop, set at a later step, does not end it at an earlier one)."""
    import time

    from tritongpt.train import metrics as metrics_module

    server, _ = both
    engine, real = server.app.engine, metrics_module.Timing.tokens

    def tokens(self, *args, **kwargs):
        real(self, *args, **kwargs)
        deadline = time.time() + 10
        while engine is not None and self.steps == 1 and engine.running and time.time() < deadline:
            time.sleep(0.005)
    monkeypatch.setattr(metrics_module.Timing, "tokens", tokens)
    body = {"prompt": "the cat", "n": 3, "max_tokens": 12, "temperature": 1, "seed": 5, "return_token_ids": True,
            "stop": [" "]}
    before = scrape(server, "tiny-chat")
    status, out = call(server, "/v1/completions", body)
    after = scrape(server, "tiny-chat")
    assert status == 200
    counts = [len(c["token_ids"]) for c in out["choices"]]
    assert min(counts) < max(counts), counts  # (a choice ended steps before another)
    for name in ("inter_token_latency_seconds_count", "time_per_output_token_seconds_count"):
        assert metric(after, name, "tiny-chat") - metric(before, name, "tiny-chat") == sum(k - 1 for k in counts)


def test_inter_token_gaps_show_in_metrics_mid_stream(both, monkeypatch):
    """vLLM observes each step's inter-token latency at the step (IterationStats.update_from_output, for each child
    request still running), so a dashboard sees a long stream's gaps as it goes: scraped while the stream's handler
    is held after its 3rd step, /metrics holds the n choices' first 2 gaps each (the request not ended: no e2e yet),
    and all of them once it ends."""
    import http.client

    from tritongpt.train import metrics as metrics_module

    server, _ = both
    n, k, held_at = 2, 6, 3
    real, held, go = metrics_module.Timing.tokens, threading.Event(), threading.Event()

    def tokens(self, *args, **kwargs):
        real(self, *args, **kwargs)
        if self.max_tokens == k and self.steps == held_at:  # (this request's handler, after its 3rd step)
            held.set()
            go.wait(10)
    monkeypatch.setattr(metrics_module.Timing, "tokens", tokens)
    before = scrape(server, "tiny-chat")

    def delta(s, name):
        return metric(s, name, "tiny-chat") - metric(before, name, "tiny-chat")
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    try:
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "the cat", "n": n, "max_tokens": k,
                                                            "ignore_eos": True, "temperature": 1, "seed": 3,
                                                            "stream": True}),
                     {"Content-Type": "application/json"})
        assert held.wait(10)
        mid = scrape(server, "tiny-chat")
    finally:
        go.set()
    text = conn.getresponse().read().decode()
    conn.close()
    after = scrape(server, "tiny-chat")
    assert len([c for e in events(text) for c in e["choices"] if c["finish_reason"] == "length"]) == n
    assert delta(mid, "e2e_request_latency_seconds_count") == 0 and delta(mid, "time_to_first_token_seconds_count") == n
    for name in ("inter_token_latency_seconds_count", "time_per_output_token_seconds_count"):
        assert delta(mid, name) == n * (held_at - 1)  # (observed at the steps, before the end)
        assert delta(after, name) == n * (k - 1)


def test_a_choices_clocks_stop_at_its_own_last_token(monkeypatch):
    """Timing on a hand-run clock: a choice of 2 tokens among 4 steps ends 2 s before the request's last token,
    so its gaps, decode, inference and e2e stop there (vLLM's child request finishes then); the longest choice's
    are the request's. Each step's gap is observed at the step, once for each choice still drawing (vLLM's
    IterationStats at each engine step), not when the request ends."""
    from tritongpt.train import metrics as metrics_module

    clock = iter(range(100))
    monkeypatch.setattr(metrics_module.time, "monotonic", lambda: float(next(clock)))
    m = metrics_module.Metrics("m", 32)
    t = m.request(2, 4)  # started at 0
    t.scheduled = 0.5
    h, seen = m.hist, []
    for alive in ([0, 1], [0, 1], [1], [1]):  # tokens at 1, 2, 3, 4; choice 0's last at 2
        t.tokens(alive=alive)
        seen.append((h["inter_token_latency_seconds"].count, h["time_per_output_token_seconds"].count))
    assert seen == [(0, 0), (2, 2), (3, 3), (4, 4)]  # (live: 2 choices drew the second step, 1 the later ones)
    t.end(["stop", "length"], 3, [2, 4])  # at 5
    assert (h["inter_token_latency_seconds"].count, h["inter_token_latency_seconds"].sum) == (1 + 3, 4.0)
    assert h["time_per_output_token_seconds"].count == 4
    assert h["request_decode_time_seconds"].sum == 1.0 + 3.0
    assert h["request_inference_time_seconds"].sum == 1.5 + 3.5
    assert h["e2e_request_latency_seconds"].sum == 3.0 + 5.0
    assert h["request_time_per_output_token_seconds"].sum == 1.0 + 1.0
    assert (m.prompt_tokens, m.generation_tokens) == (6, 6)


def test_an_aborted_requests_prompt_and_drawn_tokens_are_counted(both, monkeypatch):
    """vLLM counts each engine step's tokens as they are made (its IterationStats: prompt_tokens_total at a child's
    first token, generation_tokens_total each step's): a request whose client left after its first step counts its
    n children's prompts and the token each drew, as iteration_tokens_total does."""
    server, _ = both
    app, n = server.app, 2
    m, P, engine = app.metrics, len(app.completion_prompt("the cat")), app.engine
    aborts, first = m.finished["abort"], m.hist["time_to_first_token_seconds"].count
    deadline = time.time() + 10
    # the client gone once the first tokens came (with no engine asked after each token, and before the model's turn)
    monkeypatch.setattr(server.RequestHandlerClass, "client_gone",
                        lambda self: m.hist["time_to_first_token_seconds"].count > first)
    if engine is not None:  # (the engine held after the step that drew them until the handler saw the client gone)
        real = engine.step

        def step():
            out = real()
            while any(r.first_token is not None for r in engine.running) and m.finished["abort"] == aborts and \
                    time.time() < deadline:
                time.sleep(0.005)
            return out
        monkeypatch.setattr(engine, "step", step)
    before = scrape(server, "tiny-chat")
    try:
        call(server, "/v1/completions", {"prompt": "the cat", "n": n, "max_tokens": 8, "ignore_eos": True,
                                         "temperature": 1, "seed": 1})
    except (OSError, http.client.HTTPException):  # (the server sends nothing to a client gone)
        pass
    while (m.finished["abort"] == aborts or engine is not None and engine.running) and time.time() < deadline:
        time.sleep(0.01)
    after = scrape(server, "tiny-chat")

    def delta(name, **labels):
        return metric(after, name, "tiny-chat", **labels) - metric(before, name, "tiny-chat", **labels)
    assert delta("request_success_total", finished_reason="abort") == n
    assert delta("prompt_tokens_total") == n * P and delta("generation_tokens_total") == n
    assert delta("iteration_tokens_total_sum") == n * (P + 1)
    assert delta("request_generation_tokens_count") == 0  # (the token histograms: requests that ended)


@pytest.mark.parametrize("logprobs", [None, 1])
def test_echo_with_max_tokens_0_counts_vllms_prefill_step(both, logprobs):
    """vLLM runs echo with max_tokens 0 as max_tokens 1 (its token drawn and dropped): its step counts each child's
    prompt and token in iteration_tokens_total, as prompt_tokens_total and generation_tokens_total count them (with
    the engine and logprobs, scored in the engine's prefill; else no engine step: its own observation)."""
    server, _ = both
    P = len(server.app.completion_prompt("the cat"))
    body = {"prompt": "the cat", "echo": True, "max_tokens": 0, "n": 2, "logprobs": logprobs}
    before = scrape(server, "tiny-chat")
    status, out = call(server, "/v1/completions", body)
    after = scrape(server, "tiny-chat")
    assert status == 200 and out["usage"]["completion_tokens"] == 2

    def delta(name):
        return metric(after, name, "tiny-chat") - metric(before, name, "tiny-chat")
    assert delta("prompt_tokens_total") == 2 * P and delta("generation_tokens_total") == 2
    assert delta("iteration_tokens_total_count") == 1 and delta("iteration_tokens_total_sum") == 2 * (P + 1)


def test_metrics_with_max_batch_1_count_the_requests_waiting_for_the_model(tmp_path):
    """No engine: running and waiting are the requests holding and waiting for the model's lock, no cache usage."""
    import time

    folder = tmp_path / "run"
    tiny_run(folder, "chat")
    server = start(folder, "--served-model-name", "tiny", "--max-batch", "1")
    server.RequestHandlerClass.log_message = lambda *a: None
    try:
        out = []
        with server.app.lock:  # the model busy: the request waits
            t = threading.Thread(target=lambda: out.append(call(server, "/v1/completions",
                                                                {"prompt": "the cat", "max_tokens": 4, "n": 2,
                                                                 "ignore_eos": True})))  # (4 steps, sampled)
            t.start()
            deadline = time.time() + 10
            while server.app.metrics.waiting == 0 and time.time() < deadline:
                time.sleep(0.01)
            s = scrape(server)
            assert metric(s, "num_requests_waiting") == 1 and metric(s, "num_requests_running") == 0
            time.sleep(0.05)  # (its queue time at least that)
        t.join()
        status, body = out[0]
        s = scrape(server)
        assert status == 200 and metric(s, "num_requests_waiting") == metric(s, "num_requests_running") == 0
        # (its 2 choices vLLM's 2 child requests: the prompt prefilled, and each step's gap timed, once a choice)
        assert metric(s, "prompt_tokens_total") == 2 * body["usage"]["prompt_tokens"]
        assert metric(s, "generation_tokens_total") == body["usage"]["completion_tokens"] == 8
        assert metric(s, "request_success_total", finished_reason="length") == 2
        assert metric(s, "time_per_output_token_seconds_count") == 2 * 3
        phases(s, 2, [(body["usage"]["prompt_tokens"], 4)] * 2)
        # it waited for the lock while the scrape above ran; its 4 steps: the mean gap of its 3
        queue = metric(s, "request_queue_time_seconds_sum")
        assert queue >= 0.05 and metric(s, "time_to_first_token_seconds_sum") > queue
        assert metric(s, "request_time_per_output_token_seconds_sum") == pytest.approx(
            metric(s, "request_decode_time_seconds_sum") / 3)
        # (no paged cache: no cache_config_info either)
        assert not [k for k in s if k[0] in ("tritongpt:kv_cache_usage_perc", "tritongpt:cache_config_info")]
        assert call(server, "/metrics", {"x": 1})[0] == 405
    finally:
        server.shutdown()
        server.server_close()


# -- logprobs, echo and logit_bias --------------------------------------------------------------------------------


def model_logprobs(server, ids):
    """The model's float64 log-softmax at every position of ids [T]: [T, V], row t the distribution of token t + 1."""
    with torch.no_grad():
        return torch.log_softmax(server.app.model(torch.tensor([ids]))[0].double(), dim=-1)


def text_of(tok, i):
    return serve.token_text(tok, i)[0]


def streamed_text(tok, ids) -> str:
    """The text ids give as a stream hands it out: bytes that are not UTF-8 as U+FFFD (a random model draws such),
    a character not yet finished at the end held back."""
    import codecs

    return codecs.getincrementaldecoder("utf-8")(errors="replace").decode(tok.decode_bytes(ids))


def check_top(tok, top, logp, k, token):
    """A completions top_logprobs dict: the k likeliest tokens, likeliest first, then the token's own if not among
    them, each its model logprob."""
    best = torch.topk(logp, k)
    want = [text_of(tok, i) for i in best.indices.tolist()]
    assert list(top)[:k] == want and len(top) == k + (text_of(tok, token) not in want)
    assert top[text_of(tok, token)] == pytest.approx(float(logp[token]), abs=1e-5)
    for name, v in zip(want, best.values.tolist()):
        assert top[name] == pytest.approx(v, abs=1e-5)


def same_rows(a, b):
    """prompt_rows' rows alike: the same top ids and ranks, the logprobs to fp32's rounding."""
    return len(a) == len(b) and all(i == j and r == q and [x, *v] == pytest.approx([y, *w], rel=1e-5, abs=1e-6)
                                    for (x, i, v, r), (y, j, w, q) in zip(a, b))


def test_prompt_logprobs_in_chunks_are_the_whole_prompt_forward_s(monkeypatch):
    """echo's scoring runs the LM head and log-softmax a chunk of rows at a time (no [T, V] logits made whole): the
    same logprobs and top-k as one float64 forward of the whole prompt, with chunk boundaries inside the prompt and
    a vocabulary limit below the head's width; no head call is wider than a chunk."""
    torch.manual_seed(3)
    model = GPTModel(GPTConfig(vocab_size=77, context_length=32, n_embd=24, n_layer=2, n_head=2)).eval()
    idx = torch.randint(0, 70, (1, 13))
    with torch.no_grad():
        logp = torch.log_softmax(model.double()(idx)[0, :-1, :70], dim=-1)
    model.float()
    widths, head = [], model.logits
    monkeypatch.setattr(model, "logits", lambda h: widths.append(h.size(0)) or head(h))
    with torch.no_grad():
        rows = serve.prompt_rows(model, idx, 3, limit=70, chunk=5)
    assert widths == [5, 5, 2] and len(rows) == 12
    best = torch.topk(logp, 3)
    for t, (lp, top_ids, top_lps, rank) in enumerate(rows):
        assert lp == pytest.approx(float(logp[t, idx[0, t + 1]]), rel=1e-4, abs=1e-5)
        assert rank == logp[t].argsort(descending=True).tolist().index(idx[0, t + 1]) + 1  # (vLLM's: 1 the likeliest)
        assert top_ids == best.indices[t].tolist()
        assert top_lps == pytest.approx(best.values[t].tolist(), rel=1e-4, abs=1e-5)
    # the default chunk: a budget of logits' elements, its rows the head's width (77: the head makes every column,
    # the limit of 70 cut after)
    monkeypatch.setattr(generate_module, "ECHO_CHUNK_ELEMENTS", 70 * 4)
    widths.clear()
    with torch.no_grad():
        assert same_rows(serve.prompt_rows(model, idx, 3, limit=70), rows)
    assert widths == [3, 3, 3, 3]
    # a wrapper (not a GPTModel) runs whole, its log-softmax in chunks: the same rows
    wrapper = torch.nn.Module()
    wrapper.forward = lambda idx, cache=None: model(idx)
    with torch.no_grad():
        assert same_rows(serve.prompt_rows(wrapper, idx, 3, limit=70, chunk=5), rows)


def test_echo_with_max_tokens_0_scores_the_prompt_as_the_model_does(served):
    server, tok = served
    prompt = "the cat sat on the mat. Hello"
    ids = tok.encode(prompt)
    m = server.app.metrics  # (what /metrics renders)
    before = m.prompt_tokens, m.generation_tokens, m.finished["length"]
    status, body = call(server, "/v1/completions", {"prompt": prompt, "echo": True, "max_tokens": 0, "logprobs": 3})
    (choice,) = body["choices"]
    assert status == 200 and choice["text"] == prompt and choice["finish_reason"] == "length"
    # vLLM's one drawn and dropped token (below), counted in /metrics as the usage says
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}
    assert (m.prompt_tokens, m.generation_tokens, m.finished["length"]) == (before[0] + len(ids), before[1] + 1,
                                                                           before[2] + 1)
    lp, logp = choice["logprobs"], model_logprobs(server, ids)
    assert lp["tokens"] == [text_of(tok, i) for i in ids] and "".join(lp["tokens"]) == prompt
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing comes before the first
    assert lp["token_logprobs"][1:] == pytest.approx([float(logp[t, i]) for t, i in enumerate(ids[1:])], abs=1e-5)
    for t, i in enumerate(ids[1:]):
        check_top(tok, lp["top_logprobs"][t + 1], logp[t], 3, i)
    assert lp["text_offset"] == [len(tok.decode(ids[:j])) for j in range(len(ids))]
    # echo without logprobs: the prompt's text only; echo with tokens drawn: the prompt's entries, then theirs
    plain = call(server, "/v1/completions", {"prompt": prompt, "echo": True, "max_tokens": 0})[1]["choices"][0]
    assert plain["text"] == prompt and plain["logprobs"] is None
    more = call(server, "/v1/completions", {"prompt": prompt, "echo": True, "max_tokens": 3, "logprobs": 3,
                                            "temperature": 0})[1]["choices"][0]
    assert more["text"].startswith(prompt) and len(more["logprobs"]["tokens"]) == len(ids) + 3
    assert {k: v[:len(ids)] for k, v in more["logprobs"].items()} == lp


@pytest.mark.parametrize("logprobs", [2, None])
def test_a_prefill_only_request_counts_as_vllms_one_drawn_and_dropped_token(both, logprobs, monkeypatch):
    """echo with max_tokens 0: vLLM draws one token a choice and drops it (protocol.py's to_sampling_params:
    max_tokens 1), so its usage counts 1 completion token a choice and its metrics, a choice each (vLLM's n child
    requests), a first token (TTFT), that generation token and an e2e latency, no inter-token gap. Ours draws none (the engine ends the request after
    its prefill; with no engine, or no scoring, the prompt is scored or echoed alone) and counts alike, streamed
    too, with the engine's phases and with --max-batch 1's (its scoring, under the model's lock, its prefill)."""
    import time

    server, tok = both
    real = serve.prompt_rows
    monkeypatch.setattr(serve, "prompt_rows", lambda *a, **k: (time.sleep(0.05), real(*a, **k))[1])
    prompt = "the cat sat on the mat"
    ids = tok.encode(prompt)
    m = server.app.metrics
    names = ("time_to_first_token_seconds", "e2e_request_latency_seconds", "time_per_output_token_seconds",
             "request_generation_tokens", "request_prefill_time_seconds", "request_inference_time_seconds")

    def counts():
        return m.generation_tokens, [(m.hist[name].count, m.hist[name].sum) for name in names]
    req = {"prompt": prompt, "echo": True, "max_tokens": 0, "n": 2, "logprobs": logprobs}
    for stream in (True, False):
        (gen, hist) = counts()
        status, body = call(server, "/v1/completions", {**req, "stream": stream,
                                                        **({"stream_options": {}} if stream else {})})
        used = events(body)[-1]["usage"] if stream else body["usage"]
        assert status == 200 and used == {"prompt_tokens": len(ids), "completion_tokens": 2,
                                          "total_tokens": len(ids) + 2}
        (gen2, hist2) = counts()
        assert gen2 == gen + 2
        ttft, e2e, itl, gens, prefill, inference = [(c2 - c, s2 - s) for (c, s), (c2, s2) in zip(hist, hist2)]
        assert ttft[0] == e2e[0] == gens[0] == prefill[0] == inference[0] == 2 and itl[0] == 0
        assert gens[1] == 2 and 0 < ttft[1] <= e2e[1] and prefill[1] == pytest.approx(inference[1])
        if logprobs is not None and server.app.engine is None:  # (no engine: scored by prompt_rows, 50 ms more)
            assert prefill[1] >= 0.05


@pytest.mark.parametrize("both", ["max-batch-1"], indirect=True)
def test_with_max_batch_1_a_scoring_forward_is_its_requests_prefill_whatever_max_tokens(both, monkeypatch):
    """--max-batch 1 scores echo's prompt in a forward of its own under the model's lock, before any token is
    drawn: it is the request's prefill (vLLM's prompt logprobs come from its prefill), inside its TTFT and e2e
    latency with max_tokens 2 as with 0, and /metrics counts the request running while it holds the model."""
    import time

    server, tok = both
    m = server.app.metrics
    real, running = serve.prompt_rows, []
    monkeypatch.setattr(serve, "prompt_rows", lambda *a, **k: (running.append(m.gauges()[:2]), time.sleep(0.1),
                                                               real(*a, **k))[2])
    names = ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_prefill_time_seconds")
    for max_tokens in (0, 2):
        before = [(m.hist[name].count, m.hist[name].sum) for name in names]
        status, body = call(server, "/v1/completions", {"prompt": "the cat sat", "echo": True, "logprobs": 1,
                                                        "max_tokens": max_tokens})
        assert status == 200 and body["usage"]["completion_tokens"] == max(max_tokens, 1)
        for name, (count, total) in zip(names, before):
            assert m.hist[name].count == count + 1 and m.hist[name].sum - total >= 0.1, (name, max_tokens)
    assert running == [(1, 0)] * 2


def test_drawn_tokens_logprobs_are_the_models_raw_distribution_at_each_step(both):
    server, tok = both
    prompt, k = "a dog ran in", 2
    ids = tok.encode(prompt)
    req = {"prompt": prompt, "max_tokens": 10, "temperature": 1.0, "seed": 11, "logprobs": k}
    (choice,) = call(server, "/v1/completions", req)[1]["choices"]
    new = reference(server, ids, 10, seed=11, temperature=1.0)[0]
    assert choice["text"] == new_text(tok, ids, new) and server.app.eot not in new
    lp, logp = choice["logprobs"], model_logprobs(server, ids + new)
    assert lp["tokens"] == [text_of(tok, i) for i in new]
    drawn = [float(logp[len(ids) - 1 + j, i]) for j, i in enumerate(new)]
    assert lp["token_logprobs"] == pytest.approx(drawn, abs=1e-5)
    assert min(drawn) < float(logp[len(ids) - 1:-1].max(-1).values.min())  # (sampled: not every token the top one)
    for j, i in enumerate(new):
        check_top(tok, lp["top_logprobs"][j], logp[len(ids) - 1 + j], k, i)
    # where each token's text begins (a token that ends part of a character: where that character begins)
    for j, offset in enumerate(lp["text_offset"]):
        assert offset == len(streamed_text(tok, ids + new[:j])) - len(prompt)
    # chat: logprobs true, top_logprobs k: OpenAI's content entries, each with its bytes
    conv = chat.Conversation("chat", None)
    cids = formats.encode_prompt(tok, conv.prompt("Hello there!", 0, tok))
    body = call(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello there!"}],
                                                 "max_tokens": 6, "temperature": 0, "logprobs": True,
                                                 "top_logprobs": 2})[1]
    (choice,) = body["choices"]
    content = choice["logprobs"]["content"]
    by_bytes = {tok.decode_bytes([i]): i for i in range(tok.vocab_size)}
    got = [by_bytes[bytes(e["bytes"])] for e in content]  # (each token's bytes: which token it is)
    assert tok.decode(got) == choice["message"]["content"]
    clogp = model_logprobs(server, cids + got)
    for j, (e, i) in enumerate(zip(content, got)):
        row = clogp[len(cids) - 1 + j]
        assert e["logprob"] == pytest.approx(float(row[i]), abs=1e-5) and e["token"] == text_of(tok, i)
        best = torch.topk(row, 2)
        assert [t["token"] for t in e["top_logprobs"]] == [text_of(tok, t) for t in best.indices.tolist()]
        assert [t["logprob"] for t in e["top_logprobs"]] == pytest.approx(best.values.tolist(), abs=1e-5)
    assert call(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                                                 "logprobs": True})[1]["choices"][0]["logprobs"]["content"][0][
        "top_logprobs"] == []  # (top_logprobs 0 by default)


def test_streamed_logprobs_add_up_to_the_whole_responses(served):
    server, tok = served
    prompt = "the dog ran"
    ids = tok.encode(prompt)
    new = reference(server, ids, 24)[0]
    stop = fresh_stop(new_text(tok, ids, new), 6)
    for extra in ({}, {"stop": stop}, {"echo": True}, {"n": 2, "temperature": 1.0, "seed": 5, "stop": "e"}):
        req = {"prompt": prompt, "max_tokens": 24, "temperature": 0, "logprobs": 2, **extra}
        plains = call(server, "/v1/completions", req)[1]["choices"]
        streamed = [c["choices"][0] for c in events(call(server, "/v1/completions", {**req, "stream": True})[1])]
        assert len(plains) == extra.get("n", 1)
        for plain in plains:
            chunks = [c for c in streamed if c["index"] == plain["index"]]
            assert len(chunks) > 3 and "".join(c["text"] for c in chunks) == plain["text"]
            lps = [c["logprobs"] for c in chunks if c["logprobs"]]
            assert {key: [v for lp in lps for v in lp[key]] for key in plain["logprobs"]} == plain["logprobs"]
        plain = plains[0]
    chat_req = {"messages": MESSAGES, "max_tokens": 8, "temperature": 0, "logprobs": True, "top_logprobs": 1}
    plain = call(server, "/v1/chat/completions", chat_req)[1]["choices"][0]["logprobs"]
    chunks = events(call(server, "/v1/chat/completions", {**chat_req, "stream": True})[1])
    assert [e for c in chunks if c["choices"][0]["logprobs"] for e in c["choices"][0]["logprobs"]["content"]] == \
        plain["content"]


def test_a_stop_string_keeps_every_drawn_tokens_logprobs_as_vllm_does(both):
    """vLLM cuts the text at a stop string but returns the logprobs of every token drawn (its detokenizer truncates
    output_text only; the logprobs processor keeps each new token's): up to the one the stop string completes in,
    whose entry may begin past the cut text, its text_offset where its text begins. Alike with
    include_stop_str_in_output, streamed (the last chunk carries the rest), and in chat's logprobs.content."""
    server, tok = both
    prompt = "the dog ran"
    ids = tok.encode(prompt)
    new = reference(server, ids, 24)[0]
    full = new_text(tok, ids, new)
    stop = fresh_stop(full, 6)
    # the token the stop ends in (a random model's bytes may put U+FFFD in it: matched once text follows it, as
    # vLLM's detokenizer holds back text that ends in one)
    k = next(k for k in range(1, 25) if stop in new_text(tok, ids, new[:k]).rstrip("\ufffd"))
    for keep in (False, True):
        req = {"prompt": prompt, "max_tokens": 24, "temperature": 0, "logprobs": 1, "stop": stop,
               "include_stop_str_in_output": keep}
        body = call(server, "/v1/completions", req)[1]
        (choice,) = body["choices"]
        assert choice["text"] == full[:full.find(stop) + (len(stop) if keep else 0)]
        lp = choice["logprobs"]
        assert body["usage"]["completion_tokens"] == k and lp["tokens"] == [text_of(tok, i) for i in new[:k]]
        assert lp["text_offset"] == [len(streamed_text(tok, ids + new[:j])) - len(prompt) for j in range(k)]
        streamed = [c["choices"][0] for c in events(call(server, "/v1/completions", {**req, "stream": True})[1])]
        assert {key: [v for c in streamed if c["logprobs"] for v in c["logprobs"][key]] for key in lp} == lp
    # chat: the answer's tokens up to the one the stop string ends in, each in logprobs.content
    chat_req = {"messages": MESSAGES, "max_tokens": 12, "temperature": 0, "logprobs": True}
    answer = call(server, "/v1/chat/completions", chat_req)[1]
    content = answer["choices"][0]["logprobs"]["content"]
    by_bytes = {tok.decode_bytes([i]): i for i in range(tok.vocab_size)}
    got = [by_bytes[bytes(e["bytes"])] for e in content]  # (each token's bytes: which token it is)
    # (where U+FFFDs end the answer, a stop string of theirs matches nothing: one before them)
    stop = fresh_stop(answer["choices"][0]["message"]["content"].rstrip("\ufffd"), 0)
    k = next(k for k in range(1, len(got) + 1) if stop in tok.decode(got[:k]).rstrip("\ufffd"))
    body = call(server, "/v1/chat/completions", {**chat_req, "stop": stop})[1]
    assert body["choices"][0]["finish_reason"] == "stop" and body["usage"]["completion_tokens"] == k
    assert body["choices"][0]["logprobs"]["content"] == content[:k]
    chunks = events(call(server, "/v1/chat/completions", {**chat_req, "stop": stop, "stream": True})[1])
    assert [e for c in chunks if c["choices"][0]["logprobs"] for e in c["choices"][0]["logprobs"]["content"]] == \
        content[:k]


def test_streamed_and_whole_answers_agree_and_usage_counts_the_tokens_with_logprobs(both):
    """The same seeded request streamed (continuous_usage_stats) and whole, over settings that end choices early and
    differently (a list of prompts with n 2 and a stop string; echo with stop_token_ids, min_tokens, ignore_eos,
    include_stop_str_in_output and skip_special_tokens false; chat with n 2): each choice's deltas add up to its
    text, logprobs, finish and stop reasons; each chunk's usage counts the tokens drawn so far, those whose logprobs
    came with the text so far (more where text is held back for a stop string); each choice's last usage counts
    exactly the tokens whose logprobs the whole answer gives (usage's completion tokens their sum, and /metrics'
    generation tokens)."""
    server, tok = both
    m = server.app.metrics
    ids = tok.encode("the dog ran")
    greedy = reference(server, ids, 10)[0]
    sampled = {"temperature": 1.0, "seed": 3, "max_tokens": 10, "n": 2}
    first = call(server, "/v1/completions", {**sampled, "prompt": ["the dog ran", "a cat"]})[1]["choices"][0]
    talk = call(server, "/v1/chat/completions", {**sampled, "messages": MESSAGES})[1]["choices"][0]
    cases = [("/v1/completions", {**sampled, "prompt": ["the dog ran", "a cat"], "logprobs": 1,
                                  "stop": fresh_stop(first["text"], 3)}),
             ("/v1/completions", {"prompt": "the dog ran", "max_tokens": 10, "temperature": 0, "echo": True,
                                  "logprobs": 2, "stop_token_ids": [greedy[3]], "min_tokens": 2, "ignore_eos": True,
                                  "include_stop_str_in_output": True, "skip_special_tokens": False}),
             ("/v1/chat/completions", {**sampled, "messages": MESSAGES, "logprobs": True, "top_logprobs": 1,
                                       "stop": fresh_stop(talk["message"]["content"], 2)})]
    ends = []
    for path, req in cases:
        chat, before = path.endswith("chat/completions"), m.generation_tokens
        whole = call(server, path, req)[1]
        assert m.generation_tokens - before == whole["usage"]["completion_tokens"]
        chunks = events(call(server, path, {**req, "stream": True,
                                            "stream_options": {"continuous_usage_stats": True}})[1])
        assert chunks[-1]["usage"] == whole["usage"]
        ends += [(c["finish_reason"], c["stop_reason"] is None) for c in whole["choices"]]
        drawn = 0
        for c in whole["choices"]:
            mine = [ch for ch in chunks[:-1] if ch["choices"][0]["index"] == c["index"]]
            echoed = len(server.app.completion_prompt(req["prompt"])) if req.get("echo") else 0
            text, given, entries = "", -echoed, []
            for ch in mine:
                d, lp = ch["choices"][0], ch["choices"][0]["logprobs"]
                text += d["delta"].get("content") or "" if chat else d["text"]
                entries += (lp["content"] if chat else [dict(zip(lp, v)) for v in zip(*lp.values())]) if lp else []
                given = len(entries) - echoed
                # (all drawn so far, but where text is held back for a stop string: a choice's tokens, no more)
                assert given <= ch["usage"]["completion_tokens"] and (given == ch["usage"]["completion_tokens"] or
                                                                      "stop" in req)
            want = c["logprobs"]["content"] if chat else [dict(zip(c["logprobs"], v))
                                                          for v in zip(*c["logprobs"].values())]
            assert text == (c["message"]["content"] if chat else c["text"]) and entries == want
            assert (d["finish_reason"], d["stop_reason"]) == (c["finish_reason"], c["stop_reason"])
            assert mine[-1]["usage"]["completion_tokens"] == given
            drawn += given
        assert drawn == whole["usage"]["completion_tokens"]
    assert set(ends) == {("stop", False), ("length", True)}  # (choices stopped early, and at the budget)


def test_logit_bias_forces_or_bans_a_token_and_logprobs_stay_raw(both):
    server, tok = both
    prompt = "the bird sang"
    ids = tok.encode(prompt)
    greedy = reference(server, ids, 4)[0]
    forced = next(i for i in range(5, 300) if i not in greedy and i != server.app.eot)
    body = call(server, "/v1/completions", {"prompt": prompt, "max_tokens": 4, "temperature": 0, "logprobs": 0,
                                            "logit_bias": {str(forced): 100}})[1]
    lp = body["choices"][0]["logprobs"]
    assert lp["tokens"] == [text_of(tok, forced)] * 4
    logp = model_logprobs(server, ids + [forced] * 4)
    # the model's own logprobs, not the biased distribution's (~0)
    assert lp["token_logprobs"] == pytest.approx([float(logp[len(ids) - 1 + j, forced]) for j in range(4)],
                                                 abs=1e-5)
    assert max(lp["token_logprobs"]) < -1
    banned = call(server, "/v1/completions", {"prompt": prompt, "max_tokens": 4, "temperature": 0,
                                              "logit_bias": {str(greedy[0]): -100}})[1]["choices"][0]["text"]
    assert tok.encode(banned)[0] != greedy[0] and banned != new_text(tok, ids, greedy)


def lm_eval_loglikelihood(server, requests, **extra):
    """lm-evaluation-harness' local-completions: its loglikelihood request (_create_payload with generate=False: the
    context and continuation as token ids, echo, max_tokens 1, logprobs 1) and its parse_logprobs, as it does them
    -> [(sum of the continuation's logprobs, is_greedy)]. extra: fields added to the request (a test's)."""
    payload = {"model": "tiny-chat", "prompt": [ctx + cont for ctx, cont in requests], "temperature": 0,
               "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True, **extra}
    status, out = call(server, "/v1/completions", payload)
    assert status == 200, out
    res = []
    for choice, ctxlen in zip(sorted(out["choices"], key=lambda c: c["index"]), [len(c) for c, _ in requests]):
        logprobs = sum(choice["logprobs"]["token_logprobs"][ctxlen:-1])
        is_greedy = all(t == max(top.values()) for t, top in zip(choice["logprobs"]["token_logprobs"][ctxlen:-1],
                                                                choice["logprobs"]["top_logprobs"][ctxlen:-1]))
        res.append((logprobs, is_greedy))
    return res


def test_lm_eval_local_completions_loglikelihoods_are_the_models(served):
    server, tok = served
    ctx = tok.encode("the cat sat on the")
    greedy = reference(server, ctx, 3)[0]
    other = [greedy[0], (greedy[1] + 7) % 250 + 5, greedy[2]]  # its second token not the likeliest
    got = lm_eval_loglikelihood(server, [(ctx, greedy), (ctx, other)])
    for (ll, is_greedy), cont in zip(got, [greedy, other]):
        logp = model_logprobs(server, ctx + cont)
        want = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
        assert ll == pytest.approx(want, abs=1e-4)
        assert is_greedy == all(int(logp[len(ctx) - 1 + j].argmax()) == t for j, t in enumerate(cont))
    assert [g for _, g in got] == [True, False]


def test_an_lm_eval_request_whose_drawn_token_is_the_end_token_scores_its_whole_continuation(both):
    """lm-eval drops the drawn token's entry (token_logprobs[ctxlen:-1]): when the model's next token is the end
    token (here biased to it), its entry must be there too (vLLM's), or the continuation's last token is dropped
    instead and the loglikelihood is wrong."""
    server, tok = both
    ctx, cont = tok.encode("the cat sat on the"), tok.encode(" mat")
    ((ll, _),) = lm_eval_loglikelihood(server, [(ctx, cont)], logit_bias={str(server.app.eot): 100})
    logp = model_logprobs(server, ctx + cont)
    assert ll == pytest.approx(sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)), abs=1e-4)


def test_the_engine_prefills_a_scoring_requests_prompt_once(served, monkeypatch):
    """echo with logprobs through the engine: the request's own prefill scores its prompt (Engine.submit's
    prompt_logprobs), so an lm-eval request (max_tokens 1) and a scoring one (max_tokens 0) run each prompt token
    through the model once, not twice, the request counted running while it prefills; the scoring request is in
    the prefill phase's histogram (vLLM's: its one prefill) and in the prompt-token counts, its prefill's end its
    first token (vLLM's one token, drawn and dropped)."""
    server, tok = served
    app, counts = server.app, []
    hidden = app.model.hidden
    monkeypatch.setattr(app.model, "hidden", lambda ids, cache=None, *a, **k: counts.append(
        (ids.numel(), app.metrics.gauges()[0])) or hidden(ids, cache, *a, **k))
    ctx, cont = tok.encode("the cat sat on the"), tok.encode(" mat")
    for pair in [(ctx, cont), (ctx[1:], cont)]:  # (one request each: a request's prompts run together, two then)
        lm_eval_loglikelihood(server, [pair])
    assert counts == [(len(ctx) + len(cont), 1), (len(ctx) + len(cont) - 1, 1)]
    m, counts[:] = app.metrics, []
    before = {name: m.hist[name].count for name in ("request_prefill_time_seconds", "request_prompt_tokens",
                                                    "time_to_first_token_seconds", "request_decode_time_seconds")}
    status, body = call(server, "/v1/completions", {"prompt": ctx, "echo": True, "max_tokens": 0, "logprobs": 1})
    assert status == 200 and len(body["choices"][0]["logprobs"]["tokens"]) == len(ctx)
    assert counts == [(len(ctx), 1)]
    after = {name: m.hist[name].count - n for name, n in before.items()}
    assert after == {"request_prefill_time_seconds": 1, "request_prompt_tokens": 1, "time_to_first_token_seconds": 1,
                     "request_decode_time_seconds": 1}
    # n choices of a scoring request: one row scores the prompt for all (not n rows of slots), each choice alike
    rows, submit = [], app.engine.submit
    monkeypatch.setattr(app.engine, "submit", lambda idx, *a, **k: rows.append(idx.size(0)) or submit(idx, *a, **k))
    body = call(server, "/v1/completions", {"prompt": ctx, "echo": True, "max_tokens": 0, "logprobs": 1, "n": 3})[1]
    assert rows == [1] and [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert all(c["logprobs"] == body["choices"][0]["logprobs"] and c["text"] == body["choices"][0]["text"]
               for c in body["choices"]) and len(body["choices"][0]["logprobs"]["tokens"]) == len(ctx)


def test_echo_text_offsets_index_the_echoed_text_with_a_bos_adding_tokenizer(served, monkeypatch):
    """A tokenizer that starts texts with a BOS (Llama's): the prompt's ids begin with it, its text is not in the
    echoed prompt, so every text_offset (the prompt's and the drawn tokens') indexes the choice's own text."""
    server, tok = served
    bos = server.app.eot  # (as a BOS: its text, "<|endoftext|>", is no part of the prompt's)
    monkeypatch.setattr(server.app.tok, "prepended_bos_id", bos, raising=False)
    prompt = "the cat sat"
    ids = [bos] + tok.encode(prompt)
    choice = call(server, "/v1/completions", {"prompt": prompt, "echo": True, "max_tokens": 3, "temperature": 0,
                                              "logprobs": 1})[1]["choices"][0]
    lp, text = choice["logprobs"], choice["text"]
    assert text.startswith(prompt) and len(lp["tokens"]) == len(ids) + 3 and lp["tokens"][0] == text_of(tok, bos)
    assert lp["token_logprobs"][1] == pytest.approx(float(model_logprobs(server, ids)[0, ids[1]]), abs=1e-5)
    assert lp["text_offset"][:2] == [0, 0]  # the BOS takes no room in the text; the prompt's first token begins it
    whole = [(t, o) for t, o in list(zip(lp["tokens"], lp["text_offset"]))[1:] if not t.startswith("bytes:")]
    assert len(whole) >= len(ids) and all(text[o:o + len(t)] == t for t, o in whole)  # (the prompt's and some drawn)


def strict(text):
    """JSON as the spec has it: NaN and Infinity, which Python's json reads and writes, refused."""
    def no(name):
        raise AssertionError(f"{name} in the body: not JSON")
    return json.loads(text, parse_constant=no)


def test_a_nan_logprob_is_a_500_naming_it_never_nan_in_the_json(served):
    """A broken model (NaN logits) makes NaN logprobs: JSON has no NaN (Python's json writes it, clients refuse
    it), so the request is a 500 saying what went wrong, as vLLM's is (Starlette's strict JSON), streamed or not,
    echo's prompt logprobs and the drawn tokens' alike, counted as an error in /metrics."""
    server, _ = served
    head = server.app.model.out_head.weight
    saved = head.detach().clone()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1/completions"
    m = server.app.metrics
    errors = m.finished["error"]
    try:
        with torch.no_grad():
            head[5] = float("nan")  # one column NaN: each position's log-softmax all NaN
        for body in ({"prompt": "the cat", "echo": True, "max_tokens": 0, "logprobs": 2},
                     {"prompt": "the cat", "max_tokens": 2, "logprobs": 1, "temperature": 0},
                     {"prompt": "the cat", "max_tokens": 2, "logprobs": 1, "temperature": 0, "stream": True}):
            req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type":
                                                                                        "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    status, text = r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                status, text = e.code, e.read().decode()
            if body.get("stream"):  # the 200 went first: the error is the stream's last event, as vLLM's
                assert status == 200 and all(strict(line[6:]) for line in text.split("\n\n")[:-2] if line)
                error = strict(text.split("\n\n")[-3][6:])["error"]
            else:
                assert status == 500, body
                error = strict(text)["error"]
            assert error["type"] == "server_error" and "NaN" in error["message"], error
        assert m.finished["error"] == errors + 3  # /metrics counts each as the error it is, the draws stopped there
    finally:
        with torch.no_grad():
            head.copy_(saved)
    # the model restored, the same requests are answered
    assert call(server, "/v1/completions", {"prompt": "the cat", "max_tokens": 2, "logprobs": 1})[0] == 200


def test_json_bodies_are_strict():
    """The server's one JSON writer refuses NaN and infinity (a 500 saying so), the backstop behind finite()."""
    assert serve.to_json({"a": [1.5, None]}) == '{"a": [1.5, null]}'
    for x in (float("nan"), float("inf")):
        with pytest.raises(serve.APIError) as e:
            serve.to_json({"logprob": x})
        assert e.value.status == 500 and "not JSON" in str(e.value)


def test_a_scoring_request_that_fails_counts_as_an_error_in_metrics(served, monkeypatch):
    """echo's prompt forward failing (an out-of-memory, say) is a 500, and /metrics counts its choices as errors,
    as it does a failed draw's: with max_tokens 0 (nothing drawn) and before a draw alike."""
    server, _ = served

    def fails(*args):
        raise RuntimeError("the prompt's forward failed")
    monkeypatch.setattr(server.app, "prompt_logprobs", fails)
    m = server.app.metrics
    for max_tokens in (0, 3):
        before = m.finished["error"]
        status, body = call(server, "/v1/completions", {"prompt": "the cat", "echo": True, "max_tokens": max_tokens,
                                                        "logprobs": 1, "n": 2})
        assert status == 500 and body["error"]["type"] == "server_error"
        assert m.finished["error"] == before + 2, max_tokens


# -- vLLM's operational endpoints: /health, /version, /tokenize, /detokenize, --api-key --------------------------------
def test_tokenize_counts_the_ids_a_completion_and_a_chat_request_prompt_and_detokenize_reverses_it(served,
                                                                                                   monkeypatch):
    server, tok = served
    prompt = "the cat sat on the mat"
    status, body = call(server, "/tokenize", {"prompt": prompt, "model": "tiny-chat"})
    ids = tok.encode(prompt)
    assert status == 200 and body == {"count": len(ids), "max_model_len": 128, "tokens": ids, "token_strs": None}
    used = call(server, "/v1/completions", {"prompt": prompt, "max_tokens": 1})[1]["usage"]["prompt_tokens"]
    assert used == body["count"]
    strs = call(server, "/tokenize", {"prompt": prompt, "return_token_strs": True})[1]["token_strs"]
    assert strs == [tok.decode([i]) for i in ids] and "".join(strs) == prompt and len(strs) > 2
    assert call(server, "/detokenize", {"tokens": ids})[1] == {"prompt": prompt}
    assert call(server, "/detokenize", {"tokens": []})[1] == {"prompt": ""}
    assert call(server, "/tokenize", {"prompt": ""})[1]["count"] == 0  # (a completion refuses it; a count is 0)
    # a special token's spelling is its id, as vLLM's tokenizer reads it (a completion's text refuses it)
    assert call(server, "/tokenize", {"prompt": "a<|endoftext|>"})[1]["tokens"] == tok.encode("a") + [tok.eot_id]
    # messages: the served template's prompt, as the chat request's (what `chat` prompts, ready for the answer)
    conv = chat.Conversation("chat", "Be brief.")
    conv.add("Hello there!", "the cat sat.")
    want = formats.encode_prompt(tok, conv.prompt("How are you?", 0, tok))
    body = call(server, "/tokenize", {"messages": MESSAGES, "add_generation_prompt": True})[1]
    assert body["tokens"] == want and body["count"] == len(want) > len(ids)
    used = call(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1})[1]["usage"]["prompt_tokens"]
    assert used == body["count"]
    # a tokenizer that starts texts with a BOS (Llama's): add_special_tokens (vLLM's default true) puts it first
    bos = server.app.eot
    monkeypatch.setattr(server.app.tok, "prepended_bos_id", bos, raising=False)
    assert call(server, "/tokenize", {"prompt": prompt})[1]["tokens"] == [bos] + ids
    assert call(server, "/tokenize", {"prompt": prompt, "add_special_tokens": False})[1]["tokens"] == ids


def test_tokenizer_info_names_the_end_token_and_the_context(served):
    """vLLM's GET /tokenizer_info, which lm-evaluation-harness's remote tokenizer reads first (its eos_token, encoded
    through /tokenize, is its end and empty-context token)."""
    server, tok = served
    status, info = call(server, "/tokenizer_info")
    assert status == 200 and info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == 128
    assert info["bos_token"] is None and info["tokenizer_class"] == type(tok).__name__
    assert call(server, "/tokenize", {"prompt": info["eos_token"], "add_special_tokens": False})[1]["tokens"] == \
        [server.app.eot]


def test_lm_evaluation_harness_itself_scores_the_models_loglikelihoods(served):
    """lm-eval's own LocalCompletionsAPI (when installed: not a dependency) against the server, its tokenizer the
    server's (lm-eval's remote backend: /tokenizer_info, /tokenize, /detokenize), batched requests: its
    loglikelihoods are the model's (an empty context too: lm-eval scores it after its end token)."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    server, tok = served
    lm = LocalCompletionsAPI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1/completions",
                             model="tiny-chat", tokenizer_backend="auto", batch_size=3, max_length=128)
    pairs = [("the cat sat on the", " mat"), ("the dog", " ran to the cat"), ("", "the bird sat")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)],
                           disable_tqdm=True)
    for (ctx, cont), (ll, is_greedy) in zip(pairs, got):
        ctx_ids = tok.encode(ctx) if ctx else [tok.eot_id]
        cont_ids = tok.encode(cont)
        logp = model_logprobs(server, ctx_ids + cont_ids)
        steps = [logp[len(ctx_ids) - 1 + j] for j in range(len(cont_ids))]
        assert ll == pytest.approx(sum(float(s[t]) for s, t in zip(steps, cont_ids)), abs=1e-4)
        assert is_greedy == all(int(s.argmax()) == t for s, t in zip(steps, cont_ids))
    # generate_until (greedy, its `until` a stop string): the model's greedy text up to the stop
    ids = tok.encode("the cat")
    full = new_text(tok, ids, reference(server, ids, 12, eos=tok.eot_id)[0])
    stop = fresh_stop(full, 4)
    (text,) = lm.generate_until([Instance("generate_until", {}, ("the cat", {"until": [stop], "max_gen_toks": 12}),
                                          0)], disable_tqdm=True)
    assert text == full[:full.find(stop)]


def test_health_and_version_with_the_engine_and_with_max_batch_1(both):
    from tritongpt import __version__

    server, _ = both
    assert call(server, "/health") == (200, "")
    assert call(server, "/version") == (200, {"version": __version__})


def test_health_is_a_503_and_a_completion_a_500_once_the_engines_thread_died(run_folder, monkeypatch):
    """vLLM's: /health a 503 and a request a 500 (its EngineDeadError handler), not the client's 400."""
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # (the death expected: not reported)
    server = start(run_folder[0], "--max-batch", "2")
    server.RequestHandlerClass.log_message = lambda *a: None
    engine = server.app.engine
    try:
        assert call(server, "/health") == (200, "")

        def die():  # (a BaseException ends the engine's thread: _loop catches Exception only)
            raise SystemExit
        engine.step = die
        engine.submit(torch.tensor([[1, 2]]), 1)  # (wakes the thread, which steps and dies)
        engine.thread.join(timeout=10)
        status, body = call(server, "/health")
        assert status == 503 and body["error"]["code"] == "engine_dead" and body["error"]["type"] == "server_error"
        assert "the engine's thread is not running any more" in body["error"]["message"]
        assert call(server, "/version")[0] == 200  # (the server itself still answers)
        for says in ("the engine's thread is not running any more", "the engine is closed"):
            status, body = call(server, "/v1/completions", {"prompt": "the cat", "max_tokens": 2})
            assert (status, body["error"]["type"], body["error"]["code"]) == (500, "server_error", "engine_dead")
            assert says in body["error"]["message"]
            engine.close()  # (then a closed one's: the server shutting down)
    finally:
        server.shutdown()
        server.server_close()
    assert server.app.engine_down() == "the engine is closed: the server is shutting down"  # (shutting down)


def keyed(server, path, key=None, scheme="Bearer", body=None):
    """call() with an Authorization header: (status, parsed body, headers)."""
    url = f"http://127.0.0.1:{server.server_address[1]}{path}"
    req = urllib.request.Request(url, None if body is None else json.dumps(body).encode(),
                                 {} if key is None else {"Authorization": f"{scheme} {key}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            text = r.read().decode()
            return r.status, (json.loads(text) if r.headers["Content-Type"] == "application/json" else text), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode()), e.headers


def test_api_key_guards_every_path_but_health_version_and_metrics(run_folder, monkeypatch, capsys):
    from http.server import BaseHTTPRequestHandler

    key = "sk-tiny-0123"
    # the request log on (the other tests' servers silence it on the class): checked below
    monkeypatch.setattr(serve.Handler, "log_message", BaseHTTPRequestHandler.log_message)
    server = start(run_folder[0], "--api-key", key, "--max-batch", "1")
    try:
        for path, body in [("/v1/models", None), ("/v1/models/run", None), ("/v1/completions", {"prompt": "a"}),
                           ("/v1/chat/completions", {"messages": MESSAGES}), ("/tokenize", {"prompt": "a"}),
                           ("/detokenize", {"tokens": [5]}), ("/v1/nothing", None), ("/nothing", None)]:
            for sent, scheme, says in [(None, "Bearer", "needs an API key"), ("sk-tiny-0124", "Bearer", "not this"),
                                       (key[:-1], "Bearer", "not this"), (key, "Basic", "needs an API key")]:
                status, err, headers = keyed(server, path, sent, scheme, body)
                assert status == 401 and err["error"]["code"] == "invalid_api_key", (path, sent, scheme)
                assert says in err["error"]["message"] and headers["WWW-Authenticate"] == "Bearer"
        assert keyed(server, "/v1/models", key)[1]["data"][0]["object"] == "model"
        assert keyed(server, "/tokenize", key, "bearer", {"prompt": "the cat"})[1]["count"] == 2  # (any case)
        assert keyed(server, "/v1/completions", key, body={"prompt": "a", "max_tokens": 2})[0] == 200
        assert keyed(server, "/detokenize", key, body={"tokens": [5]})[0] == 200
        for path in ("/health", "/version", "/metrics"):  # (probes and scrapes: vLLM's asks no key there either)
            assert keyed(server, path)[0] == 200
        assert keyed(server, "/nothing", key)[0] == 404
    finally:
        server.shutdown()
        server.server_close()
    # the key is read from the environment where no flag gives it (vLLM's VLLM_API_KEY; the flag first)
    parse = build_parser(["serve"]).parse_args
    monkeypatch.setenv(serve.API_KEY_ENV, "from-env")
    assert serve.api_key(parse(["serve"])) == "from-env" and serve.api_key(parse(["serve", "--api-key", "k"])) == "k"
    monkeypatch.setenv(serve.API_KEY_ENV, "")
    assert serve.api_key(parse(["serve"])) is None
    for bad_key in ("", "two words", "cl\u00e9", "k\x00y"):  # (no header carries these as every client sends them)
        with pytest.raises(UserError, match="--api-key is empty or holds whitespace"):
            serve.api_key(parse(["serve", "--api-key", bad_key]))
    # never in the log, nor in what the command says at startup (the key here the environment's)
    monkeypatch.setattr(serve.Server, "serve_forever", lambda self: None)
    monkeypatch.setenv(serve.API_KEY_ENV, key)
    assert main(["serve", "--weights", str(run_folder[0]), "--port", "0", "--device", "cpu", "--max-batch", "1"]) == 0
    err = capsys.readouterr().err
    assert "an API key is needed on every path but /health, /version, /metrics" in err and "401" in err
    assert key not in err and key[:-1] not in err


def answer(server, req):
    """A completion's one choice and usage, and its streamed chunks' text and last finish_reason, checked alike."""
    body = call(server, "/v1/completions", req)[1]
    chunks = [c["choices"][0] for c in events(call(server, "/v1/completions", {**req, "stream": True})[1])]
    (choice,) = body["choices"]
    assert "".join(c["text"] for c in chunks) == choice["text"]
    assert (chunks[-1]["finish_reason"], chunks[-1]["stop_reason"]) == (choice["finish_reason"], choice["stop_reason"])
    return choice, body["usage"]["completion_tokens"]


def test_min_tokens_draws_the_masked_argmax_and_logprobs_stay_raw(both):
    """The EOS biased to the greedy choice at once: an empty answer; with min_tokens 3 the first 3 tokens are the
    argmax with the EOS masked (vLLM's MinTokensLogitsProcessor, in the draw), then the EOS ends it. The logprobs
    are the raw model's (vLLM's default raw_logprobs: taken before min_tokens' mask)."""
    server, tok = both
    prompt, eot = "the dog ran", server.app.eot  # (its 3 tokens drawn are whole UTF-8 characters)
    ids = tok.encode(prompt)
    req = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "logit_bias": {str(eot): 100}}
    assert answer(server, req) == ({"index": 0, "text": "", "logprobs": None, "finish_reason": "stop",
                                    "stop_reason": None}, 1)
    want = list(ids)
    for _ in range(3):
        logits = model_logprobs(server, want)[-1]
        logits[eot] = float("-inf")
        want.append(int(logits.argmax()))
    choice, count = answer(server, {**req, "min_tokens": 3})
    assert (choice["text"], choice["finish_reason"], count) == (new_text(tok, ids, want[len(ids):]), "stop", 4)
    lp = call(server, "/v1/completions", {**req, "min_tokens": 3, "logprobs": 1})[1]["choices"][0]["logprobs"]
    drawn = want + [eot]  # (the EOS that ended it among the logprobs too, vLLM's: its text none)
    logp = model_logprobs(server, drawn)
    assert lp["token_logprobs"] == pytest.approx([float(logp[len(ids) - 1 + j, drawn[len(ids) + j]])
                                                  for j in range(4)], abs=1e-5)
    assert lp["text_offset"][-1] == len(choice["text"])


def test_stop_token_ids_end_with_finish_stop_and_include_stop_str_in_output_keeps_the_stop(both):
    """A stop token ends the answer ("stop", counted), its text left out unless include_stop_str_in_output (vLLM's
    rule); a stop string is then kept in the text, and streamed as it comes."""
    server, tok = both
    prompt = "the dog ran"
    ids = tok.encode(prompt)
    new = reference(server, ids, 16)[0]
    j = next(j for j in range(3, 16) if new[j] not in new[:j])
    req = {"prompt": prompt, "max_tokens": 16, "temperature": 0, "stop_token_ids": [299, new[j]]}
    choice, count = answer(server, req)
    assert (choice["text"], choice["finish_reason"], count) == (new_text(tok, ids, new[:j]), "stop", j + 1)
    choice, count = answer(server, {**req, "include_stop_str_in_output": True})
    assert (choice["text"], choice["finish_reason"], count) == (new_text(tok, ids, new[:j + 1]), "stop", j + 1)
    full = new_text(tok, ids, new)
    stop = fresh_stop(full, 3)
    choice, _ = answer(server, {"prompt": prompt, "max_tokens": 16, "temperature": 0, "stop": stop,
                                "include_stop_str_in_output": True})
    assert choice["text"] == full[:full.find(stop) + len(stop)] and choice["finish_reason"] == "stop"


def test_min_tokens_ignores_a_stop_string_in_its_first_tokens_text(both):
    """vLLM's detokenizer looks for stop strings only where they end past the first min_tokens tokens' text."""
    server, tok = both
    prompt = "the bird"
    ids, new, full, stop = greedy_with_a_stop(server, tok, prompt)
    k = next(k for k in range(1, 21) if stop in new_text(tok, ids, new[:k]))  # the text first holds it here
    floor = len(new_text(tok, ids, new[:k]))
    at = full.find(stop, floor - len(stop) + 1)
    choice, count = answer(server, {"prompt": prompt, "max_tokens": 20, "temperature": 0, "stop": stop,
                                    "min_tokens": k})
    assert choice["text"] == (full[:at] if at >= 0 else full) != full[:full.find(stop)]
    assert choice["finish_reason"] == ("stop" if at >= 0 else "length")


def test_ignore_eos_runs_to_max_tokens_past_a_drawn_eos(both):
    """ignore_eos (vLLM's benchmark's --ignore-eos): an EOS drawn ends nothing; the answer is max_tokens long."""
    server, _ = both
    eot = server.app.eot
    req = {"prompt": "on the mat", "max_tokens": 5, "temperature": 0, "logit_bias": {str(eot): 100}}
    assert answer(server, req)[1] == 1
    choice, count = answer(server, {**req, "ignore_eos": True})
    assert (choice["finish_reason"], count) == ("length", 5)
    chat_req = {"messages": MESSAGES, "max_tokens": 4, "temperature": 0, "logit_bias": {str(eot): 100}}
    assert call(server, "/v1/chat/completions", chat_req)[1]["usage"]["completion_tokens"] == 1
    body = call(server, "/v1/chat/completions", {**chat_req, "ignore_eos": True})[1]
    assert body["usage"]["completion_tokens"] == 4 and body["choices"][0]["finish_reason"] == "length"


# -- vLLM's response extras: prompt_logprobs, stop_reason, skip_special_tokens, return_tokens_as_token_ids ----------


def check_prompt_logprobs(server, tok, ids, plp, k):
    """vLLM's prompt_logprobs: None, then per next prompt token {id (a string key): {logprob, rank, decoded_token}} of
    that token first (its rank against a sort of the float64 log-softmax) and the k likeliest (ranks 1..k)."""
    logp = model_logprobs(server, ids)
    assert plp[0] is None and len(plp) == len(ids)
    for t, (entry, i) in enumerate(zip(plp[1:], ids[1:])):
        order = logp[t].argsort(descending=True).tolist()
        want = [i] + [j for j in order[:k] if j != i]
        assert list(entry) == [str(j) for j in want]
        for j in want:
            e = entry[str(j)]
            assert e["logprob"] == pytest.approx(float(logp[t, j]), abs=1e-5) and e["rank"] == order.index(j) + 1
            assert e["decoded_token"] == text_of(tok, j)


def same_body(a, b) -> bool:
    """Two JSON bodies alike: the same keys in the same order, the same strings and ints, floats to fp32's
    rounding (a batched forward's logits differ from a one-row forward's by float rounding only)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same_body(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same_body(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return isinstance(b, float) and a == pytest.approx(b, rel=1e-5, abs=1e-5)
    return type(a) is type(b) and a == b


def test_prompt_logprobs_are_vllms_ranked_dicts_alike_with_the_engine_and_max_batch_1(run_folder, served):
    """prompt_logprobs k: each completion choice carries its prompt's (vLLM's), chat's response one; echo with
    logprobs gives them too (vLLM's default prompt_logprobs). The engine's prefill and --max-batch 1's forward: the
    same body."""
    folder, tok = run_folder
    server = served[0]
    alone = start(folder, "--served-model-name", "tiny-chat", "--max-batch", "1")
    alone.RequestHandlerClass.log_message = lambda *a: None
    try:
        prompt = "the dog ran in the park"
        ids = tok.encode(prompt)
        reqs = [("/v1/completions", {"prompt": [prompt, "a cat"], "max_tokens": 2, "temperature": 0, "n": 2,
                                     "prompt_logprobs": 3}),
                ("/v1/completions", {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 2}),
                ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2, "temperature": 0,
                                          "prompt_logprobs": 0})]
        for path, req in reqs:
            got, want = call(server, path, req)[1], call(alone, path, req)[1]
            for body in (got, want):
                body.pop("id"), body.pop("created")
            assert same_body(got, want)
            if path == "/v1/chat/completions":
                assert "prompt_logprobs" not in got["choices"][0]
                check_prompt_logprobs(server, tok, server.app.chat_prompt(MESSAGES), got["prompt_logprobs"], 0)
            else:
                assert "prompt_logprobs" not in got
                k = req.get("prompt_logprobs", req.get("logprobs"))
                for c in got["choices"]:
                    check_prompt_logprobs(server, tok, ids if c["index"] < req.get("n", 1) else tok.encode("a cat"),
                                          c["prompt_logprobs"], k)
        # without the field (or streamed with 0: vLLM's) there are none
        assert "prompt_logprobs" not in call(server, "/v1/completions", {"prompt": prompt, "max_tokens": 1})[1][
            "choices"][0]
        chunks = events(call(server, "/v1/completions", {"prompt": prompt, "max_tokens": 2, "stream": True,
                                                         "prompt_logprobs": 0})[1])
        assert not any("prompt_logprobs" in c["choices"][0] for c in chunks)
    finally:
        alone.shutdown()
        alone.server_close()


def test_stop_reason_names_the_stop_string_or_stop_token_and_is_null_for_the_eos_or_length(both):
    """vLLM's stop_reason on each choice and streamed chunk: the stop string that cut the text, the stop token id that
    ended it; None for the EOS (finish "stop") and max_tokens (finish "length")."""
    server, tok = both
    prompt, eot = "the dog ran", server.app.eot
    ids = tok.encode(prompt)
    new = reference(server, ids, 16)[0]
    j = next(j for j in range(3, 16) if new[j] not in new[:j])
    stop = fresh_stop(new_text(tok, ids, new), 3)
    base = {"prompt": prompt, "max_tokens": 16, "temperature": 0}
    for extra, finish, reason in [({"stop": ["zz", stop]}, "stop", stop),
                                  ({"stop_token_ids": [new[j]]}, "stop", new[j]),
                                  ({"logit_bias": {str(eot): 100}}, "stop", None), ({}, "length", None)]:
        choice, _ = answer(server, {**base, **extra})
        assert (choice["finish_reason"], choice["stop_reason"]) == (finish, reason)
    chat = call(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 4, "temperature": 0,
                                                 "stop_token_ids": [eot], "ignore_eos": True,
                                                 "logit_bias": {str(eot): 100}})[1]["choices"][0]
    assert (chat["finish_reason"], chat["stop_reason"]) == ("stop", eot)  # (ignore_eos: the EOS as a stop token)


def test_skip_special_tokens_leaves_a_drawn_eos_text_out_under_ignore_eos(both):
    """ignore_eos with the EOS forced: each drawn EOS is a token of the answer (counted, its logprob given, streamed
    alike) whose text is left out by default (vLLM's skip_special_tokens true), spelled with false."""
    server, tok = both
    eot = server.app.eot
    req = {"prompt": "on the mat", "max_tokens": 3, "temperature": 0, "logit_bias": {str(eot): 100},
           "ignore_eos": True}
    for skip, text in ((None, ""), (False, tok.decode([eot]) * 3)):
        choice, count = answer(server, {**req, **({} if skip is None else {"skip_special_tokens": skip})})
        assert (choice["text"], choice["finish_reason"], count) == (text, "length", 3)
    lp_req = {**req, "logprobs": 1}
    plain = call(server, "/v1/completions", lp_req)[1]["choices"][0]["logprobs"]
    chunks = events(call(server, "/v1/completions", {**lp_req, "stream": True})[1])
    assert plain["tokens"] == [text_of(tok, eot)] * 3 and plain["text_offset"] == [0, 0, 0]
    assert [t for c in chunks if c["choices"][0]["logprobs"] for t in c["choices"][0]["logprobs"]["tokens"]] == \
        plain["tokens"]
    chat = call(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2, "temperature": 0,
                                                 "logit_bias": {str(eot): 100}, "ignore_eos": True})[1]
    assert chat["choices"][0]["message"]["content"] == "" and chat["usage"]["completion_tokens"] == 2


def test_return_tokens_as_token_ids_spells_logprobs_tokens_as_their_ids(served):
    """return_tokens_as_token_ids (vLLM's): every logprobs token, drawn, echoed or top, spelled "token_id:{id}",
    the logprobs and (chat) bytes those of the tokens' own spelling."""
    server, tok = served
    prompt = "the bird sang"
    ids = tok.encode(prompt)
    req = {"prompt": prompt, "max_tokens": 4, "temperature": 0, "logprobs": 2, "echo": True}
    plain = call(server, "/v1/completions", req)[1]["choices"][0]["logprobs"]
    as_ids = call(server, "/v1/completions", {**req, "return_tokens_as_token_ids": True})[1]["choices"][0]["logprobs"]
    new = reference(server, ids, 4)[0]
    by_text = {text_of(tok, i): i for i in range(tok.vocab_size)}
    assert as_ids["tokens"] == [f"token_id:{i}" for i in ids + new]
    assert as_ids["token_logprobs"] == plain["token_logprobs"] and as_ids["text_offset"] == plain["text_offset"]
    assert as_ids["top_logprobs"] == [None if top is None else {f"token_id:{by_text[t]}": v for t, v in top.items()}
                                      for top in plain["top_logprobs"]]
    chat_req = {"messages": MESSAGES, "max_tokens": 3, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    plain = call(server, "/v1/chat/completions", chat_req)[1]["choices"][0]["logprobs"]["content"]
    as_ids = call(server, "/v1/chat/completions", {**chat_req, "return_tokens_as_token_ids": True})[1][
        "choices"][0]["logprobs"]["content"]
    spelled = [{**e, "token": f"token_id:{by_text[e['token']]}",
                "top_logprobs": [{**t, "token": f"token_id:{by_text[t['token']]}"} for t in e["top_logprobs"]]}
               for e in plain]
    assert as_ids == spelled and len(spelled) == 3


def gathered(engine, monkeypatch, wait=3.0):
    """The engine admits nothing until seen["count"] requests wait (or `wait` s pass since it first could): -> seen,
    where the requests waiting when it first admitted, the most requests one decode step ran and the decode steps
    are counted (seen["waiting"] = None: the gate closed again for the next request)."""
    import time

    seen = {"count": 0, "waiting": None, "since": None, "decoding": 0, "steps": 0, "delay": 0.0}
    fits, decode = engine._fits, engine._decode

    def gate(r):  # (under the engine's lock: it never blocks, the engine's loop asks again at its next step)
        if seen["waiting"] is None:
            seen["since"] = seen["since"] or time.time()
            if len(engine.waiting) < seen["count"] and time.time() - seen["since"] < wait:
                return False
            seen["waiting"], seen["since"] = len(engine.waiting), None
        return fits(r)

    def spy(decoding):
        seen["decoding"], seen["steps"] = max(seen["decoding"], len(decoding)), seen["steps"] + 1
        time.sleep(seen["delay"])  # (a slower model: a cancel's ~50 ms poll is then a few steps)
        return decode(decoding)
    monkeypatch.setattr(engine, "_fits", gate)
    monkeypatch.setattr(engine, "_decode", spy)
    return seen


def one_by_one(server, req, prompts):
    """The body of req's prompts sent one at a time: each prompt's choices indexed after the ones before (OpenAI's
    prompt * n + choice), the usage summed."""
    bodies = [call(server, "/v1/completions", {**req, "prompt": p})[1] for p in prompts]
    n = req.get("n", 1)
    return {"choices": [{**c, "index": p * n + c["index"]} for p, b in enumerate(bodies) for c in b["choices"]],
            "usage": {key: sum(b["usage"][key] for b in bodies) for key in bodies[0]["usage"]}}


def test_a_request_of_several_prompts_decodes_them_together_each_as_sent_alone(served, monkeypatch):
    """A list of prompts (lm-eval's batch_size > 1) goes to the engine at once, vLLM's: the prompts wait together
    and decode in the same steps, and the body is the one of the prompts sent one by one (greedy, n 2 with logprobs;
    lm-eval's token ids with echo, max_tokens 1, logprobs 1; streamed, each chunk's index and text reassembled)."""
    server, tok = served
    prompts = ["the cat sat on", "a dog", "Hello there! How are"]
    greedy = {"max_tokens": 5, "temperature": 0, "n": 2, "logprobs": 2}
    lm_eval = {"max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True, "seed": 1234}
    ids = [tok.encode(p) for p in prompts]
    want = [one_by_one(server, greedy, prompts), one_by_one(server, lm_eval, ids)]
    seen = gathered(server.app.engine, monkeypatch)
    seen["count"] = len(prompts)
    for req, ps, alone in ((greedy, prompts, want[0]), (lm_eval, ids, want[1])):
        seen["waiting"] = None
        body = call(server, "/v1/completions", {**req, "prompt": ps})[1]
        assert seen["waiting"] == len(prompts)  # all submitted before the engine admitted any
        assert same_body({"choices": body["choices"], "usage": body["usage"]}, alone)
    assert seen["decoding"] == len(prompts)  # greedy's decode steps ran every prompt's request
    seen["waiting"] = None
    chunks = events(call(server, "/v1/completions", {**greedy, "prompt": prompts, "stream": True})[1])
    assert seen["waiting"] == len(prompts)
    streamed = {}
    for c in chunks:
        ch = c["choices"][0]
        got = streamed.setdefault(ch["index"], {"text": "", "logprobs": {}, "finish_reason": None})
        got["text"] += ch["text"]
        for key, value in (ch["logprobs"] or {}).items():
            got["logprobs"][key] = got["logprobs"].get(key, []) + value
        got["finish_reason"] = ch["finish_reason"] or got["finish_reason"]
    assert sorted(streamed) == list(range(len(prompts) * 2))
    assert same_body([streamed[i] for i in range(len(prompts) * 2)],
                     [{key: c[key] for key in ("text", "logprobs", "finish_reason")} for c in want[0]["choices"]])


def test_a_failing_prompt_fails_its_request_and_cancels_the_others(served, monkeypatch):
    """One prompt of a request failing (its echo's scoring here) fails the request, as it did one prompt at a time,
    and the others' engine requests are cancelled, not decoded to their end: the engine is empty after it."""
    import time

    server, tok = served
    app = server.app
    engine, scoring = app.engine, app.prompt_logprobs
    bad = tok.encode("the bird sang")

    def fails(ids, *args):
        if ids == bad:
            raise RuntimeError("this prompt's scoring failed")
        return scoring(ids, *args)
    monkeypatch.setattr(app, "prompt_logprobs", fails)
    seen = gathered(engine, monkeypatch)
    seen["count"], seen["delay"] = 3, 0.005
    errors = app.metrics.finished["error"]
    status, body = call(server, "/v1/completions", {"prompt": [tok.encode("a dog"), tok.encode("the cat"), bad],
                                                    "max_tokens": 100, "ignore_eos": True, "echo": True,
                                                    "logprobs": 1, "temperature": 0})
    assert status == 500 and body["error"]["type"] == "server_error"
    assert seen["waiting"] == 3 and app.metrics.finished["error"] == errors + 1
    deadline = time.time() + 10
    # (the engine ends them at its next step; a request leaves `running` before its slots go back, under the
    # engine's lock: the free list too, or a read between the two sees a slot still held)
    while (engine.running or engine.waiting or len(engine.free) < engine.max_batch) and time.time() < deadline:
        time.sleep(0.01)
    assert not engine.running and not engine.waiting and engine.free == list(range(engine.max_batch))
    assert seen["steps"] < 50  # cancelled, not decoded to their 100 tokens


def test_a_client_that_leaves_mid_stream_cancels_every_prompts_request(served, monkeypatch):
    """A streamed request of three prompts, all running in the engine at once: the client hanging up cancels each
    prompt's engine request (three aborts), none decoded to its end."""
    import time

    server, tok = served
    engine = server.app.engine
    seen = gathered(engine, monkeypatch)
    seen["count"], seen["delay"] = 3, 0.005
    aborts = server.app.metrics.finished["abort"]
    sock, deadline = running_request(server, {"prompt": ["a dog", "the cat", "the bird sang"], "max_tokens": 100,
                                              "ignore_eos": True, "stream": True, "temperature": 0})
    while len(engine.running) < 3 and time.time() < deadline:
        time.sleep(0.01)
    assert len(engine.running) == 3
    sock.close()
    while (engine.running or server.app.metrics.finished["abort"] < aborts + 3) and time.time() < deadline:
        time.sleep(0.01)
    assert not engine.running and not engine.waiting and server.app.metrics.finished["abort"] == aborts + 3
    assert seen["steps"] < 50


def test_a_stream_write_that_times_out_ends_the_other_prompts_without_writing(served, monkeypatch):
    """A client that stops reading: the write that times out (60 s, the handler's timeout; 0.2 s here) ends the
    request, and the other prompts' threads, queued behind it to write, write nothing more (each would wait as long
    again on the same socket); their engine requests are cancelled. So too when the failing prompt's thread is slow
    to unwind (its cancel waiting for the engine's lock, here 0.2 s): the next thread to take the write lock must not
    write before that thread has told the others."""
    import time

    from tritongpt.train.engine import Request

    server, _ = served
    engine = server.app.engine
    seen = gathered(engine, monkeypatch)
    seen["count"] = 3
    writes, send, cancel = [], serve.Handler.send_event, Request.cancel

    def slow_cancel(self):
        if len(writes) == 1:
            time.sleep(0.2)
        return cancel(self)
    monkeypatch.setattr(Request, "cancel", slow_cancel)

    def stuck(self, obj):  # the first chunk's write blocks, then times out; the others are counted
        writes.append(time.time())
        if len(writes) == 1:
            time.sleep(0.2)
            raise TimeoutError("timed out")
        return send(self, obj)
    monkeypatch.setattr(serve.Handler, "send_event", stuck)
    call(server, "/v1/completions", {"prompt": ["a dog", "the cat", "the bird sang"], "max_tokens": 60,
                                     "ignore_eos": True, "stream": True, "temperature": 0})
    assert seen["waiting"] == 3 and len(writes) == 1
    deadline = time.time() + 10
    while engine.running and time.time() < deadline:
        time.sleep(0.01)
    assert not engine.running and seen["steps"] < 60


def test_a_stream_whose_last_write_fails_counts_its_prompts_as_aborted(served, monkeypatch):
    """The text held back for a stop string (here all of it) goes in the answer's last write, after the engine ended
    the request: a client gone by then still counts each prompt's request once, as aborted (/metrics' counters)."""
    server, _ = served
    finished = server.app.metrics.finished
    send = serve.Handler.send_event

    def gone(self, obj):  # every chunk with text fails, as a write to a closed socket
        if isinstance(obj, dict) and any(c.get("text") for c in obj["choices"]):
            raise BrokenPipeError("the client left")
        return send(self, obj)
    monkeypatch.setattr(serve.Handler, "send_event", gone)
    threads = serve.in_threads
    for workers in (None, 1):  # (1: the second prompt starts only after the first failed, then counted, not run)
        if workers:
            monkeypatch.setattr(serve, "in_threads", lambda fn, count, stop, _: threads(fn, count, stop, workers))
        before = dict(finished)
        call(server, "/v1/completions", {"prompt": ["a dog", "the cat"], "max_tokens": 3, "ignore_eos": True,
                                         "stream": True, "temperature": 0, "stop": "@" * 60})
        assert {r: finished[r] - before[r] for r in finished} == {"stop": 0, "length": 0, "abort": 2, "error": 0}


def test_a_stream_write_that_fails_by_the_servers_fault_is_the_requests_500(served, monkeypatch):
    """A prompt's write failing for a reason not the client's (here a RuntimeError) is the request's 500 event, not
    lost behind the BrokenPipeError the other prompts' threads end with, even with its thread slow to unwind (its
    cancel waiting for the engine's lock, 0.2 s here)."""
    import time

    from tritongpt.train.engine import Request

    server, _ = served
    failed, send, cancel = [], serve.Handler.send_event, Request.cancel

    def broken(self, obj):  # the first chunk with text fails
        if not failed and isinstance(obj, dict) and any(c.get("text") for c in obj.get("choices", [])):
            failed.append(threading.get_ident())
            raise RuntimeError("a bug")
        return send(self, obj)

    def slow_cancel(self):  # (the failing thread's only)
        if threading.get_ident() in failed:
            time.sleep(0.2)
        return cancel(self)
    monkeypatch.setattr(serve.Handler, "send_event", broken)
    monkeypatch.setattr(Request, "cancel", slow_cancel)
    text = call(server, "/v1/completions", {"prompt": ["a dog", "the cat", "the bird sang"], "max_tokens": 20,
                                            "ignore_eos": True, "stream": True, "temperature": 0})[1]
    assert failed and events(text)[-1]["error"]["type"] == "server_error"


def test_in_threads_raises_the_error_that_came_first_in_time_not_first_by_index():
    """Prompt 1 fails; prompt 0 then ends with the BrokenPipeError its stop cue gives it: the error raised is prompt
    1's, the cause, though prompt 0 comes first in the list."""
    stop = threading.Event()

    def fn(i):
        if i == 1:
            raise ValueError("prompt 1 failed")
        assert stop.wait(5), "stop was never set"
        raise BrokenPipeError("another prompt of the request failed")
    with pytest.raises(ValueError, match="prompt 1 failed"):
        serve.in_threads(fn, 2, stop, 2)


def test_a_request_whose_second_prompt_fails_first_is_a_500_naming_that_failure(served, monkeypatch, capsys):
    """The request's 500 (and the server's log) is the failing prompt's error, not the BrokenPipeError the first
    prompt's draw ends with once stop tells it the request failed (which alone would answer nothing)."""
    import time

    server, _ = served
    first = server.app.completion_prompt("a dog")

    def draw(ids, budget, s, stop_id, generator, on_delta, gone, on_prompt, timing, adapter=None, prediction=None,
             spent=None):
        if ids != first:
            raise RuntimeError("the second prompt broke")
        deadline = time.time() + 5
        while not gone() and time.time() < deadline:  # (the engine's wait, asking gone() between steps)
            time.sleep(0.005)
        raise BrokenPipeError("the client left")
    monkeypatch.setattr(server.app, "draw", draw)
    status, err = call(server, "/v1/completions", {"prompt": ["a dog", "the cat"], "max_tokens": 3})
    assert status == 500 and err["error"]["type"] == "server_error"
    assert "the second prompt broke" in capsys.readouterr().err


def test_a_list_of_prompts_of_different_lengths_is_scored_as_the_model_does_from_one_prefill(served, monkeypatch):
    """lm-eval's shape: one echo request of several prompts of different lengths (max_tokens 0, logprobs 1), the
    engine held until all of them wait, so they prefill in ONE forward (each right-padded to the longest): every
    prompt's token logprobs are the model's own, none read from another row's tokens or its padding."""
    server, tok = served
    engine, step, shapes, hidden = server.app.engine, server.app.engine.step, [], server.app.model.hidden
    texts = ["the cat sat on the mat", "on a mat sat the dog. Hello", "the mat sat on a cat. Hello there",
             "Hello there, the cat"]  # (6, 11, 12 and 8 tokens: 48 padded, within 1.5 x 37)
    ids = [tok.encode(t) for t in texts]
    waited = time.monotonic()

    def held():  # (the engine's thread: no step until the request's every prompt waits, or 10 s went by)
        if not engine.running and len(engine.waiting) < len(texts) and time.monotonic() - waited < 10:
            time.sleep(0.002)
            return False
        return step()
    monkeypatch.setattr(engine, "step", held)
    monkeypatch.setitem(PREFILL_PAD, "cpu", PREFILL_PAD["cuda"])  # (a GPU's padding rule: 1.5)
    monkeypatch.setattr(server.app.model, "hidden", lambda x, cache=None, *a, **k: shapes.append(tuple(x.shape))
                        or hidden(x, cache, *a, **k))
    status, body = call(server, "/v1/completions", {"prompt": texts, "echo": True, "max_tokens": 0, "logprobs": 1})
    monkeypatch.undo()
    assert status == 200 and shapes == [(len(texts), max(map(len, ids)))]
    for choice in body["choices"]:
        p = ids[choice["index"]]
        logp = model_logprobs(server, p)
        assert choice["text"] == texts[choice["index"]] and choice["logprobs"]["token_logprobs"][0] is None
        assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(
            [float(logp[t, i]) for t, i in enumerate(p[1:])], abs=1e-4)


def test_speculative_config_serves_generates_prompt_lookup_text_and_counts_vllms_spec_metrics(run_folder):
    """--speculative-config (vLLM's n-gram one): a greedy completion and a seeded sampled n=2 one are
    generate(prompt_lookup=N, num_draft_tokens=K)'s, and /metrics' spec decode counters are the engine's."""
    folder, tok = run_folder
    spec = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2, "prompt_lookup_min": 1}'
    server = start(folder, "--served-model-name", "tiny", "--speculative-config", spec)
    server.RequestHandlerClass.log_message = lambda *a: None
    try:
        prompt = "the cat sat on the mat. the cat sat on the"
        ids = tok.encode(prompt)
        for body, n, gen in [({"temperature": 0}, 1, None), ({"temperature": 1.0, "seed": 5, "n": 2}, 2, 5)]:
            status, out = call(server, "/v1/completions", {"prompt": prompt, "max_tokens": 12, **body})
            want = generate(server.app.model, torch.tensor([ids] * n), 12, eos_id=tok.eot_id, prompt_lookup=2,
                            num_draft_tokens=3, generator=None if gen is None else torch.Generator().manual_seed(gen),
                            temperature=body["temperature"])
            assert status == 200 and [c["text"] for c in out["choices"]] == \
                [new_text(tok, ids, [t for t in row[len(ids):] if t != tok.eot_id]) for row in want.tolist()]
        stats = server.app.engine.stats
        assert stats["spec_decode_num_accepted_tokens"] > 0
        s = scrape(server)
        for name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
            assert metric(s, f"spec_decode_{name}_total") == stats[f"spec_decode_{name}"]
    finally:
        server.shutdown()
        server.server_close()


def test_speculative_config_draft_model_serves_generates_draft_text(run_folder, tmp_path, capsys):
    """--speculative-config's "draft_model" (vLLM's): the served model as its own draft (loaded from its path as
    --weights is): a greedy completion is generate(draft=...)'s, every proposal accepted; a draft of another
    vocabulary is refused by name."""
    folder, tok = run_folder
    spec = json.dumps({"method": "draft_model", "model": str(folder), "num_speculative_tokens": 3})
    server = start(folder, "--served-model-name", "tiny", "--speculative-config", spec)
    server.RequestHandlerClass.log_message = lambda *a: None
    try:
        prompt = "the cat sat on the mat. the cat sat on the"
        ids = tok.encode(prompt)
        status, out = call(server, "/v1/completions", {"prompt": prompt, "max_tokens": 12, "temperature": 0})
        model = server.app.model
        want = generate(model, torch.tensor([ids]), 12, eos_id=tok.eot_id, draft=model, num_draft_tokens=3)
        assert status == 200 and out["choices"][0]["text"] == \
            new_text(tok, ids, [t for t in want[0, len(ids):].tolist() if t != tok.eot_id])
        stats = server.app.engine.stats
        assert stats["spec_decode_num_accepted_tokens"] == stats["spec_decode_num_draft_tokens"] > 0
    finally:
        server.shutdown()
        server.server_close()
    other = tmp_path / "other.safetensors"
    GPTModel(GPTConfig(vocab_size=tok.vocab_size + 1, context_length=16, n_embd=16, n_layer=1, n_head=2)).save(other)
    spec = json.dumps({"method": "draft_model", "model": str(other), "num_speculative_tokens": 3})
    assert main(["serve", "--weights", str(folder), "--device", "cpu", "--port", "0", "--speculative-config",
                 spec]) == 2
    assert f"--speculative-config's model {other} has a vocabulary of {tok.vocab_size + 1} tokens" in \
        capsys.readouterr().err


@pytest.mark.parametrize("spec,says", [
    ('{"method": "eagle", "num_speculative_tokens": 3}', "method 'eagle' is not served: only \"ngram\""),
    ('{"method": "draft_model", "num_speculative_tokens": 3}', "'model' must be the draft's weights"),
    ('{"method": "draft_model", "model": "x", "num_speculative_tokens": 3, "prompt_lookup_max": 2}',
     "'prompt_lookup_max' is not taken by method 'draft_model'"),
    ('{"method": "draft_model", "model": "x"}', "'num_speculative_tokens' must be a positive integer, got None"),
    ('{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2, "model": "x"}', "'model' is not taken"),
    ('{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 2}',
     "'prompt_lookup_min' 2 is not taken"),
    ('{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": true}',
     "'prompt_lookup_min' True is not taken"),
    ('{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 1.0}',
     "'prompt_lookup_min' 1.0 is not taken"),
    ('{"num_speculative_tokens": 3, "prompt_lookup_max": 4}', "method None is not served"),
    ('{"method": "ngram", "num_speculative_tokens": 0, "prompt_lookup_max": 2}',
     "'num_speculative_tokens' must be a positive integer, got 0"),
    ('{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": true}',
     "'prompt_lookup_max' must be a positive integer, got True"),
    ('{"method": "ngram", "prompt_lookup_max": 4}', "'num_speculative_tokens' must be a positive integer, got None"),
    ('[1]', "must be a JSON object"),
    ('{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2} --max-batch 1',
     "needs --max-batch above 1"),
])
def test_speculative_config_refusals_are_named(tmp_path, capsys, spec, says):
    spec, *more = spec.split(" --max-batch ")
    extra = ["--max-batch", more[0]] if more else []
    assert main(["serve", "--weights", str(tmp_path), "--speculative-config", spec, *extra]) == 2
    assert says in capsys.readouterr().err


def test_speculative_steps_stream_what_they_answer_whole_up_to_a_stop_string(run_folder):
    """--speculative-config: steps append several tokens at once; /metrics' inter-token latency observes a gap a
    step; streamed, the deltas add up to the whole answer, a stop string drawn after such steps cuts both alike, and
    usage counts the tokens up to it."""
    folder, tok = run_folder
    spec = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 2}'
    server = start(folder, "--served-model-name", "tiny", "--speculative-config", spec)
    server.RequestHandlerClass.log_message = lambda *a: None
    try:
        stats = server.app.engine.stats
        body = {"prompt": "1 2 3 1 2 3 1", "max_tokens": 24, "temperature": 0}
        out = call(server, "/v1/completions", body)[1]
        full, accepted = out["choices"][0]["text"], stats["spec_decode_num_accepted_tokens"]
        # its inter-token latencies: a gap between steps (vLLM's), not one a token
        steps = out["usage"]["completion_tokens"] - accepted
        assert metric(scrape(server), "time_per_output_token_seconds_count") == steps - 1
        # streamed, a step's tokens are one chunk (vLLM's): the text chunks are the steps', fewer than the tokens
        texts = [c["text"] for e in events(call(server, "/v1/completions", {**body, "stream": True})[1])
                 for c in e["choices"] if c["text"]]
        assert "".join(texts) == full and len(texts) <= steps < out["usage"]["completion_tokens"]
        text = full[:full.index("-")]
        whole = call(server, "/v1/completions", {**body, "stop": ["-"]})[1]
        assert stats["spec_decode_num_accepted_tokens"] > accepted > 0  # (several tokens a step before the stop)
        chunks = events(call(server, "/v1/completions", {**body, "stop": ["-"], "stream": True,
                                                         "stream_options": {"include_usage": True}})[1])
        assert whole["choices"][0]["text"] == text == "".join(c["text"] for e in chunks for c in e["choices"])
        assert whole["choices"][0]["finish_reason"] == chunks[-2]["choices"][0]["finish_reason"] == "stop"
        assert whole["usage"] == chunks[-1]["usage"] and 1 < whole["usage"]["completion_tokens"] < 24
        # return_token_ids: speculative steps' ids, whole and streamed, are the greedy ids up to the stop
        ids = tok.encode(body["prompt"])
        got = call(server, "/v1/completions", {**body, "stop": ["-"], "return_token_ids": True})[1]
        want = reference(server, ids, 24)[0][:whole["usage"]["completion_tokens"]]
        assert got["choices"][0]["token_ids"] == want
        assert streamed_ids(events(call(server, "/v1/completions", {**body, "stop": ["-"], "stream": True,
                                                                    "return_token_ids": True})[1])) == ([want], [ids])
    finally:
        server.shutdown()
        server.server_close()


def test_a_chat_template_file_that_is_not_utf8_is_refused_by_name(tmp_path):
    (tmp_path / "t.jinja").write_bytes(b"\xff\xfe{{ messages }}")
    with pytest.raises(UserError, match="t.jinja: not UTF-8 text"):
        serve.chat_template_arg(str(tmp_path / "t.jinja"))


def test_a_chat_template_longer_than_a_file_name_is_the_template():
    """--chat-template TEXT: a template longer than a file name may be (255 bytes: a real one is) is taken as the
    template, not an OSError (File name too long) from asking whether it is a file."""
    text = "{% for m in messages %}{{ m.content }}{% endfor %}" + "{# a long comment #}" * 20
    assert len(text) > 255 and serve.chat_template_arg(text) == text


def test_a_chat_template_given_to_serve_renders_its_chats(run_folder, tmp_path):
    """serve --chat-template (vLLM's): a file or the template's text renders the chats of a model (here one tuned on
    tritongpt's own chat format, whose BPE tokenizer has no template): /tokenize's ids are the rendering's, a chat
    completion answers after it and ends at the template's end of turn (a special token); /tokenizer_info shows it;
    no such file, a template that does not compile, refused before the model loads."""
    folder, tok = run_folder
    template = ("{% for m in messages %}{{ m.role }}: {{ m.content }}<|endoftext|>{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")
    (tmp_path / "t.jinja").write_text(template)
    for given in (str(tmp_path / "t.jinja"), template):
        server = start(folder, "--chat-template", given)
        server.RequestHandlerClass.log_message = lambda *a: None
        try:
            messages = [{"role": "user", "content": "the cat sat"}]
            ids = call(server, "/tokenize", {"messages": messages})[1]["tokens"]
            assert ids == tok.encode("user: the cat sat<|endoftext|>assistant:", allowed_special="all")
            status, body = call(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 3, "seed": 1})
            assert status == 200 and body["usage"]["prompt_tokens"] == len(ids), body
            assert call(server, "/tokenizer_info")[1]["chat_template"] == template
        finally:
            server.shutdown()
            server.server_close()
    for given, says in ((str(tmp_path / "none.jinja"), "no such file, and not a template"),
                        ("{% for m in messages %}", "the template does not compile")):
        with pytest.raises(UserError, match=says):
            start(folder, "--chat-template", given)


def test_served_chat_answers_the_same_with_a_prediction_and_counts_it(both):
    """serve's `prediction` (OpenAI's field) over the engine and --max-batch 1: the same content as without it,
    whole and streamed, OpenAI's usage counts of the proposals kept and refused; its content as a string or text
    parts."""
    server, _ = both
    # (the byte tokens past ASCII banned: a random model's lone ones decode to U+FFFD, which encodes otherwise)
    ask = dict(messages=MESSAGES, max_tokens=24, temperature=0, logit_bias={str(i): -100 for i in range(128, 256)})
    status, plain = call(server, "/v1/chat/completions", ask)
    assert status == 200 and "completion_tokens_details" not in plain["usage"]
    text = plain["choices"][0]["message"]["content"]
    edited = text[:len(text) // 3] + "zebra" + text[len(text) // 3 + 1:]
    for prediction in (text, edited, [{"type": "text", "text": text[:10]}, {"type": "text", "text": text[10:]}]):
        status, got = call(server, "/v1/chat/completions",
                           {**ask, "prediction": {"type": "content", "content": prediction}})
        assert status == 200 and got["choices"] == plain["choices"], prediction
        details = got["usage"].pop("completion_tokens_details")
        assert got["usage"] == plain["usage"]
        assert details["accepted_prediction_tokens"] > 0
        assert (details["rejected_prediction_tokens"] > 0) == (prediction is edited), (prediction, details)
        assert details["accepted_prediction_tokens"] < plain["usage"]["completion_tokens"]
    chunks = events(call(server, "/v1/chat/completions", {**ask, "stream": True, "stream_options": {
        "include_usage": True}, "prediction": {"type": "content", "content": edited}})[1])
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == text
    assert chunks[-1]["usage"]["completion_tokens_details"]["accepted_prediction_tokens"] > 0


def test_served_prediction_refusals(served):
    server, _ = served
    ask = dict(messages=MESSAGES, max_tokens=4)
    for prediction, field in (("text", "prediction"), ({"type": "text", "content": "x"}, "prediction"),
                              ({"type": "content"}, "prediction"), ({"type": "content", "content": 3},
                                                                    "prediction.content"),
                              ({"type": "content", "content": [{"type": "image", "text": "x"}]}, "prediction.content"),
                              ({"type": "content", "content": "x", "extra": 1}, "prediction.extra")):
        status, body = call(server, "/v1/chat/completions", {**ask, "prediction": prediction})
        assert status == 400 and body["error"]["param"] == field, (prediction, body)
    pred = {"type": "content", "content": "the cat"}
    for extra, field in (({"logprobs": True}, "logprobs"), ({"min_tokens": 2}, "min_tokens")):
        status, body = call(server, "/v1/chat/completions", {**ask, **extra, "prediction": pred})
        assert status == 400 and body["error"]["param"] == field and "prediction" in body["error"]["message"]
    status, body = call(server, "/v1/completions", {"prompt": "the", "prediction": pred})
    assert status == 400 and body["error"]["param"] == "prediction"
    status, body = call(server, "/v1/chat/completions", {**ask, "prediction": pred, "use_beam_search": True})
    assert status == 400 and body["error"]["param"] == "prediction" and "use_beam_search" in body["error"]["message"]


def beams_of(server, ids, max_new, n, eos, length_penalty=1.0):
    """beam_search()'s n best rows of new ids (what `generate --num-beams` prints), searched here."""
    from tritongpt.train.beam_search import beam_search

    out, _ = beam_search(server.app.model, torch.tensor([ids]), max_new, n, length_penalty, num_return_sequences=n,
                         eos_id=eos)
    return [row[len(ids):] for row in out.tolist()]


def beam_choices(tok, ids, rows, eos, keep_eos=False):
    """vLLM's beam search's (text, finish_reason, stop_reason, tokens) of each row: cut at the EOS, which counts
    among the tokens only with include_stop_str_in_output (keep_eos)."""
    out = []
    for new in rows:
        if eos in new:
            cut = new.index(eos)
            out.append((new_text(tok, ids, new[:cut]), "stop", eos, cut + keep_eos))
        else:
            out.append((new_text(tok, ids, new), "length", None, len(new)))
    return out


def test_beam_search_completions_are_beam_searchs_texts_best_first(both, monkeypatch):
    server, tok = both
    ids = tok.encode("the cat sat")
    calls = []  # it holds the model: its own loop between two of the engine's steps, or in the model's turn
    if server.app.engine is not None:
        monkeypatch.setattr(server.app.engine, "call", lambda fn, call=server.app.engine.call: calls.append(1)
                            or call(fn))
    else:
        monkeypatch.setattr(server.app, "turn", lambda timing=None, turn=server.app.turn: calls.append(1)
                            or turn(timing))
    free = beams_of(server, ids, 8, 3, None)
    eos = free[0][3]  # a token the best beam draws, made the model's end of text: the beams end at it or not
    monkeypatch.setattr(server.app, "eot", eos)
    seen = set()
    for n, lp, keep in ((1, None, False), (3, None, False), (3, 0.5, True), (3, 2.0, False)):
        body = {"prompt": "the cat sat", "max_tokens": 8, "n": n, "use_beam_search": True, "temperature": 1}
        body.update({} if lp is None else {"length_penalty": lp})
        body.update({"include_stop_str_in_output": True} if keep else {})
        status, out = call(server, "/v1/completions", body)
        want = beam_choices(tok, ids, beams_of(server, ids, 8, n, eos, 1.0 if lp is None else lp), eos, keep)
        assert status == 200, out
        assert [(c["index"], c["text"], c["finish_reason"], c["stop_reason"], c["logprobs"]) for c in out["choices"]] \
            == [(i, text, finish, reason, None) for i, (text, finish, reason, _) in enumerate(want)]
        tokens = sum(w[3] for w in want)  # the prompt once, every beam's tokens
        assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": tokens,
                                "total_tokens": len(ids) + tokens}
        seen |= {c["finish_reason"] for c in out["choices"]}
    assert seen == {"stop", "length"}  # (both endings checked)
    assert calls == [1] * 4
    # streamed (vLLM's): each beam's text a chunk once the search ends, then its finish, then the usage
    chunks = events(call(server, "/v1/completions", {**body, "stream": True, "stream_options": {
        "include_usage": True}})[1])
    texts, finish = {}, {}
    for k in chunks[:-1]:
        c = k["choices"][0]
        texts[c["index"]] = texts.get(c["index"], "") + c["text"]
        finish[c["index"]] = c["finish_reason"] or finish.get(c["index"])
    assert [(texts[i], finish[i]) for i in range(3)] == [(c["text"], c["finish_reason"]) for c in out["choices"]]
    assert chunks[-1]["usage"] == out["usage"] and chunks[-1]["choices"] == []


def test_beam_search_chat_answers_are_beam_searchs_texts(served, monkeypatch):
    server, tok = served
    conv = chat.Conversation("chat", "Be brief.")
    conv.add("Hello there!", "the cat sat.")
    ids = formats.encode_prompt(tok, conv.prompt("How are you?", 0, tok))
    free = beams_of(server, ids, 6, 2, None)
    monkeypatch.setattr(server.app, "chat_stop", free[1][2])  # the second beam's third token ends a turn
    seen = set()
    for n in (1, 2):
        status, out = call(server, "/v1/chat/completions", {"messages": MESSAGES, "max_completion_tokens": 6, "n": n,
                                                            "use_beam_search": True, "length_penalty": 0.5})
        want = beam_choices(tok, ids, beams_of(server, ids, 6, n, free[1][2], 0.5), free[1][2])
        assert status == 200 and out["object"] == "chat.completion", out
        assert [(c["message"], c["finish_reason"], c["stop_reason"]) for c in out["choices"]] == \
            [({"role": "assistant", "content": text}, finish, reason) for text, finish, reason, _ in want]
        assert out["usage"]["prompt_tokens"] == len(ids)
        assert out["usage"]["completion_tokens"] == sum(w[3] for w in want)
        seen |= {w[1] for w in want}
    assert "stop" in seen
    chunks = events(call(server, "/v1/chat/completions", {"messages": MESSAGES, "max_completion_tokens": 6, "n": 2,
                                                          "use_beam_search": True, "length_penalty": 0.5,
                                                          "stream": True})[1])
    assert [k["choices"][0]["delta"] for k in chunks if k["choices"][0]["delta"].get("role")] == \
        [{"role": "assistant", "content": ""}] * 2
    assert ["".join(k["choices"][0]["delta"].get("content") or "" for k in chunks if k["choices"][0]["index"] == i)
            for i in range(2)] == [c["message"]["content"] for c in out["choices"]]
    # ignore_eos: no beam ends at the EOS, all run to max_tokens
    out = call(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 6, "n": 2,
                                                "use_beam_search": True, "ignore_eos": True})[1]
    assert [c["finish_reason"] for c in out["choices"]] == ["length"] * 2 and out["usage"]["completion_tokens"] == 12


def test_beam_search_ends_when_its_client_leaves(both, monkeypatch):
    """A client gone mid-search ends the search at the next step (it holds the model, the engine's batch too), counted
    as aborted in /metrics, as draw()'s requests are."""
    server, _ = both
    asked, forwards = [], []
    monkeypatch.setattr(type(server.app.model), "hidden", lambda self, *a, hidden=type(server.app.model).hidden, **k:
                        forwards.append(1) or hidden(self, *a, **k))
    monkeypatch.setattr(serve.Handler, "client_gone", lambda self: asked.append(1) or len(asked) >= 3)
    before = dict(server.app.metrics.finished)
    with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
        call(server, "/v1/completions", {"prompt": "the cat", "max_tokens": 40, "n": 2, "use_beam_search": True,
                                         "ignore_eos": True})
    assert len(asked) == 3 and len(forwards) == 3  # (the prefill, two steps; then gone: 37 steps not run)
    finished = server.app.metrics.finished
    assert finished["abort"] - before["abort"] == 2 and finished["length"] == before["length"]


def test_a_streamed_beam_search_whose_client_left_before_its_first_chunk_counts_as_aborted(served, monkeypatch):
    """Chat's role chunks go out before the search: a client gone by then (the write fails) ends the request
    there, counted in /metrics as aborted, its n beams and its latency, as one()'s draws are (not left uncounted)."""
    server, _ = served
    m = server.app.metrics

    def gone(self, obj):
        raise BrokenPipeError("the client left")
    monkeypatch.setattr(serve.Handler, "send_event", gone)
    before, e2e = dict(m.finished), m.hist["e2e_request_latency_seconds"].count
    try:
        call(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 4, "n": 2, "use_beam_search": True,
                                              "stream": True})
    except (urllib.error.URLError, ConnectionError, http.client.HTTPException):
        pass  # (the stream's headers went, then nothing: how the client sees it is not the point)
    # (a beam a choice: vLLM's child requests, each with its e2e latency)
    assert m.finished["abort"] - before["abort"] == 2 and m.hist["e2e_request_latency_seconds"].count == e2e + 2


def test_a_beam_search_holding_the_engines_model_is_running_in_metrics(served, monkeypatch):
    """With the engine a beam search runs between its steps (Engine.call), not in its batch: /metrics counts it
    running while it holds the model (a request there, not an idle server), then 0 again."""
    from tritongpt.train import beam_search as bs_module

    server, _ = served
    held, go, out = threading.Event(), threading.Event(), []

    def search(*a, real=bs_module.beam_search, **k):
        held.set()
        go.wait(10)
        return real(*a, **k)
    monkeypatch.setattr(bs_module, "beam_search", search)
    t = threading.Thread(target=lambda: out.append(call(server, "/v1/completions", {
        "prompt": "the cat", "max_tokens": 2, "n": 2, "use_beam_search": True})))
    t.start()
    try:
        assert held.wait(10)
        s = scrape(server, "tiny-chat")
        assert metric(s, "num_requests_running", model_name="tiny-chat") == 1
        assert metric(s, "num_requests_waiting", model_name="tiny-chat") == 0
    finally:
        go.set()
        t.join()
    assert out[0][0] == 200
    s = scrape(server, "tiny-chat")
    assert metric(s, "num_requests_running", model_name="tiny-chat") == 0


def test_a_draw_without_the_engine_ends_when_its_client_leaves(run_folder, monkeypatch):
    """--max-batch 1 (generate() under the model's lock): a client gone mid-draw ends it at the next token, not at
    max_tokens (the model held for nobody, the other requests waiting), counted as aborted in /metrics, as the
    engine's requests are."""
    server = start(run_folder[0], "--max-batch", "1")
    server.RequestHandlerClass.log_message = lambda *a: None
    try:
        asked, forwards = [], []
        monkeypatch.setattr(type(server.app.model), "hidden", lambda self, *a, hidden=type(server.app.model).hidden,
                            **k: forwards.append(1) or hidden(self, *a, **k))
        monkeypatch.setattr(serve.Handler, "client_gone", lambda self: asked.append(1) or len(asked) >= 4)
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
            call(server, "/v1/completions", {"prompt": "the cat", "max_tokens": 40, "ignore_eos": True})
        # (asked as its turn at the model came, then after the prefill and two steps: gone, 37 steps not run)
        assert len(asked) == 4 and len(forwards) == 3
        assert server.app.metrics.finished["abort"] == 1 and server.app.metrics.finished["length"] == 0
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("beam", [False, True])
def test_a_client_gone_mid_request_counts_every_prompts_choices_aborted(both, beam, monkeypatch):
    """A request of 3 prompts whose client leaves: each prompt's n choices aborted in /metrics, whether the prompts
    run at once (the engine's threads) or in turn (--max-batch 1, beam search: those after the first end as they
    start, no forward run for them), as vLLM's, which submits them all."""
    server, _ = both
    m, forwards = server.app.metrics, []
    monkeypatch.setattr(type(server.app.model), "hidden", lambda self, *a, hidden=type(server.app.model).hidden, **k:
                        forwards.append(1) or hidden(self, *a, **k))
    monkeypatch.setattr(serve.Handler, "client_gone", lambda self: True)
    before, e2e = dict(m.finished), m.hist["e2e_request_latency_seconds"].count
    with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
        call(server, "/v1/completions", {"prompt": ["the cat", "a dog", "the bird"], "max_tokens": 40, "n": 2,
                                         "ignore_eos": True, "use_beam_search": beam})
    assert m.finished["abort"] - before["abort"] == 6 and m.hist["e2e_request_latency_seconds"].count == e2e + 6
    assert m.finished["length"] == before["length"]
    if beam:  # (the first prompt's prefill, then gone)
        assert len(forwards) == 1


def test_a_request_whose_client_left_while_it_waited_for_the_model_runs_no_forward(run_folder, monkeypatch):
    """--max-batch 1: a request waiting for the model's lock (another request's draw holding it) whose client leaves
    meanwhile, or whose server stops (Server.server_close: Ctrl-C), ends as it takes the lock, before its prefill:
    not a forward for nobody while the requests behind it wait (nor one more per queued request at Ctrl-C)."""
    server = start(run_folder[0], "--max-batch", "1")
    server.RequestHandlerClass.log_message = lambda *a: None
    try:
        forwards = []
        monkeypatch.setattr(type(server.app.model), "hidden", lambda self, *a, hidden=type(server.app.model).hidden,
                            **k: forwards.append(1) or hidden(self, *a, **k))
        monkeypatch.setattr(serve.Handler, "client_gone", lambda self: True)

        def post():  # (its connection closed unanswered: the client's error)
            try:
                call(server, "/v1/completions", {"prompt": "the cat", "max_tokens": 40, "ignore_eos": True})
            except (urllib.error.URLError, ConnectionError, http.client.HTTPException):
                pass

        t = threading.Thread(target=post)
        with server.app.lock:  # (another request's draw)
            t.start()
            deadline = time.monotonic() + 30
            while server.app.metrics.waiting == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert server.app.metrics.waiting == 1
        t.join(30)
        assert not t.is_alive() and forwards == []
        assert server.app.metrics.finished["abort"] == 1 and server.app.metrics.finished["length"] == 0
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("path,extra,param", [
    ("/v1/completions", {"logprobs": 2}, "logprobs"),
    ("/v1/chat/completions", {"logprobs": True}, "logprobs"),
    ("/v1/completions", {"echo": True}, "echo"),
    ("/v1/completions", {"stop": "cat"}, "stop"),
    ("/v1/completions", {"stop_token_ids": [5]}, "stop_token_ids"),
    ("/v1/completions", {"min_tokens": 2}, "min_tokens"),
    ("/v1/completions", {"temperature": 0.5}, "temperature"),
    ("/v1/completions", {"top_p": 0.9}, "top_p"),
    ("/v1/completions", {"frequency_penalty": 0.5}, "frequency_penalty"),
    ("/v1/completions", {"logit_bias": {"5": 10}}, "logit_bias"),
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"structured_outputs": {"choice": ["a"]}}, "structured_outputs"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
                              "tool_choice": "none"}, "tools"),
])
def test_beam_search_refuses_what_it_cannot_go_with_by_name(served, path, extra, param):
    server, _ = served
    body = {"prompt": "the cat"} if path == "/v1/completions" else {"messages": MESSAGES}
    status, err = call(server, path, {**body, "use_beam_search": True, "max_tokens": 2, **extra})
    assert status == 400 and err["error"]["param"] == param
    assert f"'{param}' cannot be used with 'use_beam_search'" in err["error"]["message"]
    # without beam search the same field is taken (it is the beam search that refuses it; a JSON grammar's compile
    # skipped: a second; best_of other than n is refused there too)
    if param not in ("response_format", "best_of"):
        assert call(server, path, {**body, "max_tokens": 2, **extra})[0] == 200


def test_beam_search_settings_checked_and_length_penalty_needs_it(served):
    server, _ = served
    for extra, param, says in (({"length_penalty": 2.0}, "length_penalty", "pass 'use_beam_search': true"),
                               ({"use_beam_search": "yes"}, "use_beam_search", "true or false"),
                               ({"use_beam_search": True, "length_penalty": "x"}, "length_penalty", "finite number"),
                               # (2 ** 1e308 overflows: Python's power raised OverflowError mid-search, a 500; 2 **
                               # -1e308 is 0, every score -inf)
                               *[({"use_beam_search": True, "n": 2, "length_penalty": lp}, "length_penalty",
                                  "out of range for 2 tokens") for lp in (1e308, -1e308)]):
        status, err = call(server, "/v1/completions", {"prompt": "the cat", "max_tokens": 2, **extra})
        assert status == 400 and err["error"]["param"] == param and says in err["error"]["message"]
    # the values that change nothing are taken (a client's defaults)
    assert call(server, "/v1/completions", {"prompt": "the cat", "max_tokens": 2, "use_beam_search": True,
                                            "temperature": 1.0, "top_p": 1, "top_k": -1, "stream": False,
                                            "stop": [], "frequency_penalty": 0})[0] == 200
    # best_of = n is the beam width already (vLLM's search reads n): taken, as without beam search
    for n in (1, 2):
        assert call(server, "/v1/completions", {"prompt": "the cat", "max_tokens": 2, "use_beam_search": True, "n": n,
                                                "best_of": n})[0] == 200


def test_truncate_prompt_tokens_keeps_a_prompts_last_tokens(both):
    """vLLM's truncate_prompt_tokens on both endpoints and serving modes: a completion of the prompt's last k tokens
    is the completion of those tokens sent alone; a chat's rendered prompt is cut alike (its usage); -1 the context;
    refusals by name."""
    server, tok = both
    ids = tok.encode("the cat sat on the mat. the dog sat on a log and the bird")
    status, cut = call(server, "/v1/completions", {"prompt": ids, "max_tokens": 6, "temperature": 0,
                                                   "truncate_prompt_tokens": 5})
    status2, alone = call(server, "/v1/completions", {"prompt": ids[-5:], "max_tokens": 6, "temperature": 0})
    assert status == status2 == 200 and cut["choices"][0]["text"] == alone["choices"][0]["text"]
    assert cut["usage"]["prompt_tokens"] == 5
    status, chat = call(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2,
                                                         "truncate_prompt_tokens": 7})
    assert status == 200 and chat["usage"]["prompt_tokens"] == 7
    status, whole = call(server, "/v1/completions", {"prompt": ids, "max_tokens": 1, "truncate_prompt_tokens": -1})
    assert status == 200 and whole["usage"]["prompt_tokens"] == len(ids)
    for extra, words in (({"truncate_prompt_tokens": 0}, "positive integer"),
                         ({"truncate_prompt_tokens": 1.5}, "positive integer"),
                         ({"truncate_prompt_tokens": 129}, "smaller truncation size"),
                         ({"truncate_prompt_tokens": 3, "echo": True}, "'echo'")):
        status, err = call(server, "/v1/completions", {"prompt": ids, "max_tokens": 1, **extra})
        assert status == 400 and err["error"]["param"] == "truncate_prompt_tokens" and words in \
            err["error"]["message"], (extra, err)


def test_prompt_tokens_details_count_the_prefix_caches_tokens(tmp_path):
    """vLLM's --enable-prompt-tokens-details: usage.prompt_tokens_details.cached_tokens, the prompt tokens a request's
    prefill read from the prefix cache (0 the first time, its full pages the second), on completions and chat, and the
    Responses API's input_tokens_details; none of it without the flag."""
    folder = tmp_path / "run"
    tiny_run(folder, "chat")
    flags = ["--max-batch", "2", "--kv-cache-pages", "32", "--kv-page-size", "4", "--enable-prefix-caching"]
    server = start(folder, *flags, "--enable-prompt-tokens-details")
    server.RequestHandlerClass.log_message = lambda *a: None
    try:
        long = "the cat sat on the mat. a dog ran in the park"
        P = len(server.app.completion_prompt(long))
        ask = {"prompt": long, "max_tokens": 2, "temperature": 0}
        first = call(server, "/v1/completions", ask)[1]["usage"]
        second = call(server, "/v1/completions", ask)[1]["usage"]
        # (the last prompt token is never looked up: its logits are the first draw's)
        assert first["prompt_tokens_details"] == {"cached_tokens": 0}
        assert second["prompt_tokens_details"] == {"cached_tokens": (P - 1) // 4 * 4} and P - 1 >= 8
        chat = [call(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1})[1]["usage"]
                for _ in range(2)]
        assert chat[1]["prompt_tokens_details"]["cached_tokens"] >= 8
        r = call(server, "/v1/responses", {"input": MESSAGES[1:2], "instructions": MESSAGES[0]["content"],
                                           "max_output_tokens": 1})[1]
        assert r["usage"]["input_tokens_details"]["cached_tokens"] > 0
    finally:
        server.shutdown()
        server.server_close()
    server = start(folder, *flags)
    server.RequestHandlerClass.log_message = lambda *a: None
    try:
        usage = call(server, "/v1/completions", {"prompt": "the cat", "max_tokens": 1})[1]["usage"]
        assert "prompt_tokens_details" not in usage
    finally:
        server.shutdown()
        server.server_close()


def test_completions_name_chat_only_fields_as_chats(served):
    """/v1/completions refuses chat's prediction and tools saying where they are served, not that the server has
    none (it does: on /v1/chat/completions); a field no endpoint serves keeps its plain refusal."""
    server, _ = served
    for key, value in (("prediction", {"type": "content", "content": "the cat"}), ("tool_choice", "none")):
        status, body = call(server, "/v1/completions", {"prompt": "the", "max_tokens": 1, key: value})
        assert status == 400 and body["error"]["param"] == key
        assert "/v1/chat/completions field" in body["error"]["message"], body
    status, body = call(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1, "audio": {}})
    assert status == 400 and body["error"]["message"] == "'audio' is not supported by this server"


def streamed_ids(chunks, chat=False):
    """return_token_ids' stream: (each choice's token_ids joined, in chunk order; the prompt ids each sent, in turn:
    chat's on its role chunks, a completion choice's on its first chunk)."""
    ids, prompts = {}, []
    for k in chunks:
        if not k["choices"]:
            continue
        c = k["choices"][0]
        if chat and "role" in c["delta"]:
            assert "token_ids" not in c
            prompts.append(k["prompt_token_ids"])
            continue
        if c["index"] not in ids and not chat:
            prompts.append(c["prompt_token_ids"])
        else:
            assert "prompt_token_ids" not in c and "prompt_token_ids" not in k
        ids[c["index"]] = ids.get(c["index"], []) + c["token_ids"]
    return [ids[i] for i in sorted(ids)], prompts


def test_return_token_ids_are_the_prompts_and_the_drawn_ids_whole_and_streamed(both):
    """vLLM's return_token_ids: a completion choice's prompt_token_ids and token_ids (chat's prompt ids on the
    response, the template applied), the drawn ids generate() draws, as many as usage counts: an end (stop) token
    among them, and a stop string's whole last token though the text is cut before it (vLLM's output token_ids);
    streamed, each chunk's new ids adding up to them, the prompt's once; n > 1 with logprobs (each choice's ids
    its logprobs' tokens), beam search (its beams' rows) and a prediction alike; echo and a non-bool refused."""
    server, tok = both
    ids, new, full, stop = greedy_with_a_stop(server, tok)
    base = {"prompt": "the bird", "max_tokens": 20, "temperature": 0, "return_token_ids": True}
    for extra, k in (({}, 20), ({"stop": stop}, next(k for k in range(1, 21) if stop in new_text(tok, ids, new[:k]))),
                     ({"stop_token_ids": [new[5]]}, new.index(new[5]) + 1)):
        status, out = call(server, "/v1/completions", {**base, **extra})
        (c,) = out["choices"]
        assert status == 200 and (c["prompt_token_ids"], c["token_ids"]) == (ids, new[:k]), (extra, out)
        assert out["usage"]["completion_tokens"] == k and new_text(tok, ids, new[:k]).startswith(c["text"])
        streamed, prompts = streamed_ids(events(call(server, "/v1/completions", {**base, **extra,
                                                                                 "stream": True})[1]))
        assert (streamed, prompts) == ([new[:k]], [ids]), extra
    # n samples with logprobs: each choice's ids are its logprobs' tokens (return_tokens_as_token_ids' spelling)
    ask = {**base, "prompt": ["the bird", "a dog"], "temperature": 1.0, "seed": 3, "n": 2, "max_tokens": 6,
           "logprobs": 1, "return_tokens_as_token_ids": True}
    out = call(server, "/v1/completions", ask)[1]
    assert [c["prompt_token_ids"] for c in out["choices"]] == [ids, ids, tok.encode("a dog"), tok.encode("a dog")]
    assert [c["token_ids"] for c in out["choices"]] == [
        [int(t.split(":")[1]) for t in c["logprobs"]["tokens"]] for c in out["choices"]]
    assert streamed_ids(events(call(server, "/v1/completions", {**ask, "stream": True})[1]))[0] == \
        [c["token_ids"] for c in out["choices"]]
    # chat: the prompt the template made, on the response (and on each streamed role chunk)
    chat = {"messages": MESSAGES, "max_tokens": 8, "temperature": 0, "return_token_ids": True, "n": 2}
    status, out = call(server, "/v1/chat/completions", chat)
    prompt = server.app.chat_prompt(MESSAGES)
    drawn = reference(server, prompt, 8)[0]
    assert status == 200 and out["prompt_token_ids"] == prompt, out
    assert [c["token_ids"] for c in out["choices"]] == [drawn[:out["usage"]["completion_tokens"] // 2]] * 2
    assert streamed_ids(events(call(server, "/v1/chat/completions", {**chat, "stream": True})[1]), chat=True) == \
        ([c["token_ids"] for c in out["choices"]], [prompt, prompt])
    predicted = call(server, "/v1/chat/completions", {**chat, "n": 1, "prediction": {
        "type": "content", "content": out["choices"][0]["message"]["content"]}})[1]
    assert predicted["choices"][0]["token_ids"] == out["choices"][0]["token_ids"]
    # beam search: each beam's row, through its end token only where it ended there (not kept: not counted)
    out = call(server, "/v1/completions", {**base, "max_tokens": 6, "n": 2, "use_beam_search": True,
                                           "temperature": None})[1]
    rows = beams_of(server, ids, 6, 2, server.app.eot)
    assert [c["token_ids"] for c in out["choices"]] == [r[:len(c["token_ids"])] for r, c in zip(rows, out["choices"])]
    assert [new_text(tok, ids, c["token_ids"]) for c in out["choices"]] == [c["text"] for c in out["choices"]]
    assert sum(len(c["token_ids"]) for c in out["choices"]) == out["usage"]["completion_tokens"]
    for body in ({**base, "echo": True}, {**base, "return_token_ids": "yes"}):
        status, out = call(server, "/v1/completions", body)
        assert status == 400 and out["error"]["param"] == "return_token_ids", out
    assert "token_ids" not in call(server, "/v1/completions", {**base, "return_token_ids": False})[1]["choices"][0]


def test_a_streamed_chunks_token_ids_are_the_tokens_its_logprobs_describe(both):
    """With logprobs, each streamed chunk's token_ids are its logprobs' tokens, in order (vLLM's chunk: both are
    its step's tokens), though a chunk's text waits for a character's last byte or a stop string's start (a random
    byte-level model draws partial UTF-8 often): a client zips them chunk by chunk. The finish chunk the rest."""
    server, tok = both
    body = {"prompt": "the bird", "max_tokens": 20, "temperature": 1.0, "seed": 1, "stop": ["zq"], "n": 2,
            "logprobs": 1, "return_tokens_as_token_ids": True, "return_token_ids": True, "stream": True}
    chat = {"messages": MESSAGES, **{k: v for k, v in body.items() if k not in ("prompt", "logprobs")},
            "logprobs": True, "top_logprobs": 1}
    for path, req, tokens in (("/v1/completions", body, lambda lp: lp["tokens"]),
                              ("/v1/chat/completions", chat, lambda lp: [e["token"] for e in lp["content"]])):
        chunks = [k["choices"][0] for k in events(call(server, path, req)[1]) if "token_ids" in k["choices"][0]]
        paired = [(c["token_ids"], [int(t.split(":")[1]) for t in tokens(c["logprobs"])] if c["logprobs"] else [])
                  for c in chunks]
        assert sum(len(ids) for ids, _ in paired) == 40 and all(ids == lp for ids, lp in paired), (path, paired)


def test_a_port_in_use_is_a_one_line_error_naming_it(run_folder, capsys):
    """serve on a port another process listens on: the address and what to do, not '[Errno 98] Address already in
    use' alone; the engine's thread is closed (the command returns)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["serve", "--weights", str(run_folder[0]), "--port", str(port), "--device", "cpu"]
        assert main(argv) == 2
        said = capsys.readouterr().err.splitlines()[-1]
        assert said == (f"error: cannot listen at 127.0.0.1:{port}: Address already in use (another --port, or stop "
                        "what listens there)")


def test_an_ipv6_host_is_listened_on_and_named_in_brackets(monkeypatch, capsys):
    """--host ::1 (or ::) listens over IPv6, where socketserver's IPv4 family said 'Address family for hostname not
    supported'; the address is named as a URL spells it, [::1]:PORT; a port the user may not bind (below 1024, not
    root) says so."""
    import errno
    import re
    import socket
    from argparse import Namespace

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    from tritongpt.bench.serve import serve_parser

    for given in ("::1", "[::1]"):  # (bare, or as a URL writes it)
        assert serve_parser().parse_args(["--host", given]).host == "::1"
    server = serve.listen(Namespace(host="::1", port=0))
    try:
        port = server.server_address[1]
        assert server.socket.family == socket.AF_INET6 and port > 0
        with pytest.raises(UserError, match=re.escape(f"cannot listen at [::1]:{port}: Address already in use")):
            serve.listen(Namespace(host="::1", port=port))
    finally:
        server.server_close()

    def refused(self):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(serve.Server, "server_bind", refused)
    with pytest.raises(UserError, match=r"^cannot listen at 127\.0\.0\.1:80: Permission denied \(a port below 1024 "
                                        r"needs root: another --port\)$"):
        serve.listen(Namespace(host="127.0.0.1", port=80))
    with pytest.raises(UserError, match=r"^cannot listen at 127\.0\.0\.1:8080: Permission denied \(--host, --port\)$"):
        serve.listen(Namespace(host="127.0.0.1", port=8080))  # (not the root's ports: no such hint)

    class Bound:  # (what make_server returns, bound to [::1]:8000: serve's first line names its URL)
        server_address, api_key, app = ("::1", 8000, 0, 0), None, Namespace(name="m")

        def serve_forever(self):
            pass

        def server_close(self):
            pass

    monkeypatch.setattr(serve, "make_server", lambda args: Bound())
    assert serve.cmd_serve(None) == 0
    assert "serving m at http://[::1]:8000/v1 (Ctrl-C stops)" in capsys.readouterr().err


def test_a_request_the_paged_cache_cannot_hold_is_a_400_before_its_stream(tmp_path):
    """A request whose KV pages (Engine.check_room: the engine's own count) pass the paged cache's is refused
    before anything is sent: a 400 naming n (one row of it fits: the pool holds a row of the whole context, or the
    server would not start; so the prompt or max_tokens alone is never to blame), streamed or not, on completions and
    chat (vLLM's length checks come before its stream), not a 200 and an error event; a stream that fits is
    unchanged."""
    folder = tmp_path / "run"
    tiny_run(folder, "chat")
    server = start(folder, "--max-batch", "2", "--kv-cache-pages", "32", "--kv-page-size", "4")  # (128: the context)
    server.RequestHandlerClass.log_message = lambda *a: None
    try:
        P = len(server.app.completion_prompt("the cat"))
        hi = [{"role": "user", "content": "Hi"}]
        assert P < 16 and len(server.app.chat_prompt(hi)) < 40
        fits = 64 - P + 1  # (a row of P + fits - 1 = 64 positions: 16 pages, two rows 32)
        for stream in (True, False):
            cases = [("/v1/completions", {"prompt": "the cat", "max_tokens": fits + 1, "n": 2}),
                     ("/v1/chat/completions", {"messages": hi, "n": 2})]  # (each row to the context's end)
            for path, body in cases:
                status, out = call(server, path, {**body, "stream": stream})
                assert status == 400 and out["error"]["param"] == "n", (path, body, out)
                assert "KV pages" in out["error"]["message"] and "more than the cache's 32" in out["error"]["message"]
        assert server.app.engine.stats["prompt_tokens"] == 0  # (none of them reached the engine)
        status, out = call(server, "/v1/completions", {"prompt": "the cat", "max_tokens": fits, "n": 2,
                                                       "stream": True, "temperature": 0, "ignore_eos": True})
        ends = [(c["choices"][0]["index"], c["choices"][0]["finish_reason"]) for c in events(out)
                if c["choices"] and c["choices"][0]["finish_reason"]]
        assert status == 200 and sorted(ends) == [(0, "length"), (1, "length")]
    finally:
        server.shutdown()
        server.server_close()


def test_serve_refuses_at_startup_a_paged_cache_too_small_for_one_request_of_the_context(tmp_path):
    """A paged cache that cannot hold one row of the model's context (128) is refused when the server starts, naming
    the pages it needs (Engine.context_pages) and the flags to change, as vLLM refuses a KV cache too small for
    max_model_len: else it would start and refuse every request that omits max_tokens (its budget the rest of the
    context). A pool of exactly that many pages starts and serves such a request to the context's end."""
    folder = tmp_path / "run"
    tiny_run(folder, "chat")
    for flags, need in ((("--kv-cache-pages", "31", "--kv-page-size", "4"), 32), (("--kv-cache-pages", "7"), 8)):
        with pytest.raises(UserError) as e:
            start(folder, "--max-batch", "2", *flags).server_close()
        assert f"--kv-cache-pages {flags[1]} of {128 // need} positions (--kv-page-size) cannot hold one request " \
            f"of the model's context length (128): that needs {need} pages" in str(e.value)
        most = int(flags[1]) * 128 // need + 1  # (the last token drawn takes no page)
        assert f"Pass --kv-cache-pages {need} or more, a larger --kv-page-size, or --max-model-len " \
            f"{most} or less" in str(e.value)
        server = start(folder, "--max-batch", "2", *flags, "--max-model-len", str(most))  # (the advice holds)
        server.shutdown()
        server.server_close()
        with pytest.raises(UserError, match=rf"the served context length \({most + 1}, --max-model-len\)"):
            start(folder, "--max-batch", "2", *flags, "--max-model-len", str(most + 1)).server_close()
    server = start(folder, "--max-batch", "2", "--kv-cache-pages", "32", "--kv-page-size", "4")
    server.RequestHandlerClass.log_message = lambda *a: None
    try:
        assert server.app.engine.context_pages() == server.app.engine.cache.num_pages == 32
        hi = [{"role": "user", "content": "Hi"}]  # (chat: no max_tokens is the rest of the context; completions' 16)
        status, out = call(server, "/v1/chat/completions", {"messages": hi, "temperature": 0, "ignore_eos": True})
        assert status == 200 and out["choices"][0]["finish_reason"] == "length"
        assert out["usage"]["completion_tokens"] == 128 - len(server.app.chat_prompt(hi))
    finally:
        server.shutdown()
        server.server_close()


def test_max_model_len_is_the_served_context(tmp_path):
    """vLLM's --max-model-len 64 on the 128-position model: a pool of 16 pages of 4 (one row of 64, not of 128)
    starts where it alone is refused; every context check is 64's: a request past it but within the model's 128 is
    the 400 of one past the context (completions, chat, the Responses API, truncate_prompt_tokens), a chat without
    max_tokens runs to 64 exactly, /v1/models and /tokenize report 64 (/metrics' token buckets end there), and the
    engine's rows are 64 long."""
    folder = tmp_path / "run"
    tiny_run(folder, "chat")
    pool = ("--max-batch", "2", "--kv-cache-pages", "16", "--kv-page-size", "4")
    with pytest.raises(UserError, match="that needs 32 pages"):
        start(folder, *pool).server_close()
    server = start(folder, *pool, "--max-model-len", "64")
    server.RequestHandlerClass.log_message = lambda *a: None
    try:
        assert server.app.engine.max_len == 64 and server.app.engine.context_pages() == 16
        assert call(server, "/v1/models")[1]["data"][0]["max_model_len"] == 64
        assert call(server, "/tokenize", {"prompt": "the cat"})[1]["max_model_len"] == 64
        assert server.app.metrics.hist["request_prompt_tokens"].buckets[-1] == 50  # (1, 2, 5, ... to 64: vLLM's)
        hi = [{"role": "user", "content": "Hi"}]
        P = len(server.app.completion_prompt("the cat"))
        for path, body, param in (("/v1/completions", {"prompt": "the cat", "max_tokens": 65 - P}, "max_tokens"),
                                  ("/v1/chat/completions", {"messages": hi, "max_tokens": 60}, "max_tokens"),
                                  ("/v1/responses", {"input": "Hi", "max_output_tokens": 60}, "max_output_tokens"),
                                  ("/v1/completions", {"prompt": "the cat", "max_tokens": 1,
                                                       "truncate_prompt_tokens": 65}, "truncate_prompt_tokens")):
            status, out = call(server, path, body)
            assert status == 400 and out["error"]["param"] == param and "64" in out["error"]["message"], (path, out)
        status, out = call(server, "/v1/completions", {"prompt": "the cat", "max_tokens": 64 - P, "temperature": 0,
                                                       "ignore_eos": True})
        assert status == 200 and out["usage"]["total_tokens"] == 64
        status, out = call(server, "/v1/chat/completions", {"messages": hi, "temperature": 0, "ignore_eos": True})
        assert status == 200 and out["choices"][0]["finish_reason"] == "length"
        assert out["usage"]["total_tokens"] == 64
    finally:
        server.shutdown()
        server.server_close()


def test_max_model_len_without_the_engine_and_its_refusals(tmp_path):
    """--max-batch 1 (generate(), no engine) keeps --max-model-len's context too; a value past the model's context
    (128) is refused naming both numbers, and one that is no positive integer naming the flag; vLLM's suffixes
    (k decimal, K binary) are read."""
    folder = tmp_path / "run"
    tiny_run(folder, "chat")
    server = start(folder, "--max-batch", "1", "--max-model-len", "40")
    server.RequestHandlerClass.log_message = lambda *a: None
    try:
        hi = [{"role": "user", "content": "Hi"}]
        status, out = call(server, "/v1/chat/completions", {"messages": hi, "temperature": 0, "ignore_eos": True})
        assert status == 200 and out["usage"]["total_tokens"] == 40
        status, out = call(server, "/v1/chat/completions", {"messages": hi, "max_tokens": 41})
        assert status == 400 and out["error"]["code"] == "context_length_exceeded"
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(UserError, match=r"--max-model-len 129 is more than the model's context length \(128"):
        start(folder, "--max-model-len", "129").server_close()
    for bad in ("0", "-2", "x", "1.5K", "2.5", "", "0k", "autos"):
        with pytest.raises(UserError, match="--max-model-len must be a positive integer of tokens"):
            start(folder, "--max-model-len", bad).server_close()
    read = serve.parse_max_model_len
    assert (read("1k"), read("1K"), read("25.6k"), read(" 64 "), read("2M")) == (1000, 1024, 25600, 64, 2**21)
    assert (read("-1"), read("auto"), read(" AUTO ")) == ("auto",) * 3  # (vLLM's human_readable_int_or_auto)
    # vLLM's plain numbers are python's int(): digit separators and a sign too, -01 its -1 (auto)
    assert (read("1_000"), read("+64"), read("-01")) == (1000, 64, "auto")


def test_max_model_len_auto_is_the_longest_one_row_of_the_pool_holds(tmp_path):
    """vLLM's --max-model-len -1 / auto: the model's context (128) where one row of it fits the paged cache, else
    the longest that does (15 pages of 4: 61, the last token drawn taking no page), served as the context (the
    engine's rows, /v1/models); without a paged cache, or with --max-batch 1 (no engine), the model's."""
    from argparse import Namespace
    from types import SimpleNamespace

    model = SimpleNamespace(config=SimpleNamespace(context_length=128))
    for flag, pool, want in (("auto", None, 128), ("-1", (32, 4), 128), ("auto", (31, 4), 125), ("AUTO", (1, 16), 17)):
        assert serve.max_model_len(Namespace(max_model_len=flag), model, pool) == want, (flag, pool)
    folder = tmp_path / "run"
    tiny_run(folder, "chat")
    server = start(folder, "--max-batch", "2", "--kv-cache-pages", "15", "--kv-page-size", "4", "--max-model-len",
                   "auto")
    try:
        assert server.app.engine.max_len == 61 and server.app.engine.context_pages() == 15
        assert server.app.max_model_len == 61 and call(server, "/v1/models")[1]["data"][0]["max_model_len"] == 61
    finally:
        server.shutdown()
        server.server_close()


def test_choices_stopped_finds_what_cutting_the_whole_rows_text_finds():
    """Choices.stopped grows each row's text by its new tokens' bytes (a BPETokenizer's) rather than decoding the
    prompt and every new id each step: on random rows (byte tokens cutting characters, U+FFFD, end tokens,
    stop_token_ids, min_tokens, include_stop, skip_special) each step's stopped rows and first_stop are those of
    cut() on the whole row, the old way (grown None)."""
    from random import Random

    from tritongpt.commands import Choices

    tok = BPETokenizer.train(CORPUS + " héllo wörld €€ 日本", 300)
    eot, rng, hits = tok.special_tokens["<|endoftext|>"], Random(0), 0
    text = tok.encode(CORPUS + " héllo wörld €€ 日本")
    pool = ["\ufffd", "e", " th", "é", "日本", "€", " ", "a", "\ufffd\ufffd", "at.", tok.decode([195])]
    for trial in range(150):
        ids = tok.encode(rng.choice(["the cat", "hé", "日本 a dog", "x"]))
        stops = [rng.choice(pool) + rng.choice(["", rng.choice(pool)]) for _ in range(rng.randint(1, 3))]
        kw = dict(stop_token_ids=rng.choice([(), (5,), (7, 9)]), ignore_eos=rng.random() < 0.2,
                  min_tokens=rng.choice([0, 0, 2, 5]), include_stop=rng.random() < 0.3,
                  skip_special=rng.random() < 0.3)
        n = rng.randint(1, 3)
        grown, whole = Choices(tok, ids, stops, eot, **kw), Choices(tok, ids, stops, eot, **kw)
        assert grown.grown is not None
        whole.grown = None
        rows = torch.tensor([ids] * n)
        for step in range(rng.randint(1, 20)):  # (ids below 256 are single bytes: characters cut across tokens)
            new = [[rng.choice(text) if u < 0.4 else rng.randrange(256) if u < 0.75 else
                    rng.randrange(tok.vocab_size) if u < 0.85 else rng.choice([eot, 5, 7, 9])]
                   for u in [rng.random() for _ in range(n)]]
            rows = torch.cat([rows, torch.tensor(new)], 1)
            assert torch.equal(grown.stopped(rows), whole.stopped(rows)), (ids, stops, kw, rows.tolist())
            assert grown.first_stop == whole.first_stop
        hits += len(whole.first_stop)
    assert hits > 50  # (the stop strings were found, at many steps)


def test_choices_stopped_grown_text_is_searched_less_its_trailing_replacement_characters():
    """cut_at_stop searches the text less the U+FFFDs it ends in (vLLM's detokenizer holds them back: a character
    the next token may complete), and so must the grown text: Grown searched its pending byte's U+FFFD and its
    committed ones, stopping "hi" + the first bytes of "🙂" on a "\ufffd" that the next byte completes. A run of
    U+FFFDs (lone continuation bytes) is searched once a character follows it, a stop string spanning it then
    found; min_tokens' `after` is its tokens' text less the U+FFFDs it ends in (vLLM's, held back then: a run there
    counts once a character follows it); the kept tail stays a stop string long through the run."""
    from tritongpt.commands import Choices

    tok = BPETokenizer.train(CORPUS, 300)  # (ids below 256: single bytes)
    eot, emoji, ids = tok.special_tokens["<|endoftext|>"], list("🙂".encode()), tok.encode("the")
    cases = [  # (stops, min_tokens, row's new ids, how many new ids when stopped: None, never)
        (["\ufffd"], 0, list(b"hi") + emoji + list(b"!"), None),
        (["\ufffd"], 0, list(b"hi") + [0x80] * 3 + list(b"!"), 6),
        (["i\ufffd\ufffd!"], 0, list(b"hi") + [0x80, 0x80] + list(b"!"), 5),
        (["i\ufffd\ufffd!"], 0, list(b"hi") + [0x80] * 30 + list(b"!"), None),
        (["\ufffd!"], 0, list(b"hi") + [0x80] * 30 + list(b"!"), 33),
        (["\ufffd"], 3, list(b"x") + [0x80, 0x80] + list(b"y") + [0x80] + list(b"z"), 4),
        (["\ufffd"], 4, list(b"x") + [0x80, 0x80] + list(b"y") + [0x80] + list(b"z"), 6)]
    for stops, min_tokens, new, want in cases:
        grown = Choices(tok, ids, stops, eot, min_tokens=min_tokens)
        whole = Choices(tok, ids, stops, eot, min_tokens=min_tokens)
        whole.grown = None
        row = list(ids)
        for t in new:
            row.append(t)
            assert grown.stopped(torch.tensor([row])).tolist() == whole.stopped(torch.tensor([row])).tolist()
            assert all(len(g.tail) <= max(map(len, stops)) - 1 for g in grown.grown.values())
        assert grown.first_stop == whole.first_stop == ({} if want is None else {0: want}), (stops, new)


def test_choices_stopped_decodes_each_new_token_once_not_the_whole_row_each_step():
    """A server's stop strings are checked every decode step for every row of the batch: the rows' text grown by
    the step's tokens, not the prompt and every token so far decoded again (a decode of the whole row per row per
    step, growing with the prompt and the answer). A counting spy on the tokenizer's decode_bytes: the prompt once
    (whether it ends on a whole character) and each new token once; the stop string found at the step it is drawn."""
    from tritongpt.commands import Choices

    tok = BPETokenizer.train(CORPUS, 300)
    ids = tok.encode(CORPUS[:200])
    decoded = []
    real = tok.decode_bytes
    tok.decode_bytes = lambda some: decoded.append(len(some)) or real(some)
    rows = Choices(tok, ids, ["0123"], tok.special_tokens["<|endoftext|>"])
    new = tok.encode(" the cat sat on the mat. a dog ran in the park" * 3 + " 0123")
    other = tok.encode(" a")[0]
    idx = torch.tensor([ids] * 2)
    for step, t in enumerate(new):
        idx = torch.cat([idx, torch.tensor([[t], [other]])], 1)
        assert rows.stopped(idx).tolist() == [step == len(new) - 1, False]
    assert rows.first_stop == {0: len(new)}
    # the prompt twice (its text, and whether it ends on a whole character), then a token a row a step (old: the
    # whole row, prompt and new ids, every step: 6736 ids here, growing with the prompt and the answer)
    assert sum(decoded) <= 2 * len(ids) + 2 * len(new), sum(decoded)
