"""`serve --runner pooling` (train/pooling.py): /v1/embeddings gives the model's own final-norm hidden state pooled
LAST or MEAN (normalized or not), unchanged by the padding of a batch, as floats or base64, read by OpenAI's client;
/pooling gives a reward model's own score of a text and of a chat laid out as `reward` lays one out; refusals name
their field, and each runner 404s the other's routes."""
import base64
import json

import numpy as np
import pytest
import torch

from test_serve import CORPUS, call, start, tiny_run
from tritongpt.errors import UserError
from tritongpt.model.gpt import GPTModel
from tritongpt.train.formats import ChatPrompt
from tritongpt.train.preference import encode_answers
from tritongpt.train.reward import RewardModel
from tritongpt.train.tokenizer import BPETokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
TEXTS = ["the cat sat on the mat.", "a dog", "Hello there! How are you? the bird sang"]  # (lengths differ: pads)


def serving(folder, *flags):
    server = start(folder, "--runner", "pooling", *flags)
    server.RequestHandlerClass.log_message = lambda *a: None
    return server


def stop(server):
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pool") / "run"
    return folder, tiny_run(folder, "chat")


@pytest.fixture(scope="module")
def reward_folder(tmp_path_factory):
    """A run folder as `tritongpt reward` leaves one: its tokenizer and a reward checkpoint (random head)."""
    folder = tmp_path_factory.mktemp("pool") / "reward"
    (folder / "ckpt-0000001").mkdir(parents=True)
    tok = BPETokenizer.train(CORPUS, 300)
    tok.save(folder / "tokenizer.json")
    torch.manual_seed(3)
    from tritongpt.model.config import GPTConfig

    rm = RewardModel(GPTModel(GPTConfig(vocab_size=tok.vocab_size, context_length=64, n_embd=32, n_layer=2,
                                        n_head=2)))
    rm.save(folder / "ckpt-0000001" / "model.safetensors")
    torch.save({"step": 1}, folder / "ckpt-0000001" / "state.pt")
    return folder, tok


def direct(model, ids, pooling, normalize, dtype=torch.float64):
    """One input alone, no padding, in dtype: the final-norm hidden state pooled as asked."""
    m = GPTModel(model.config)
    m.load_state_dict(model.state_dict())
    h = m.to(dtype).eval().hidden(torch.tensor([ids]))[0]
    v = h[-1] if pooling == "LAST" else h.mean(0)
    return torch.nn.functional.normalize(v, dim=0) if normalize else v


@pytest.mark.parametrize("pooling,normalize", [("LAST", True), ("MEAN", False)])
def test_embeddings_are_the_models_own_pooled_hidden_state(lm_folder, pooling, normalize):
    folder, tok = lm_folder
    server = serving(folder, "--pooler-config", json.dumps({"pooling_type": pooling, "normalize": normalize}))
    try:
        app = server.app
        ids = [app.encode(t) for t in TEXTS]
        status, out = call(server, "/v1/embeddings", {"input": TEXTS, "model": app.name, "user": "u"})
        assert status == 200, out
        assert out["object"] == "list" and [d["index"] for d in out["data"]] == [0, 1, 2]
        assert out["usage"] == {"prompt_tokens": sum(map(len, ids)), "total_tokens": sum(map(len, ids))}
        got = torch.tensor([d["embedding"] for d in out["data"]], dtype=torch.float64)
        want = torch.stack([direct(app.model, x, pooling, normalize) for x in ids])
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # (fp32 served against a float64 reference)
        # padding changes nothing: each input alone (token ids) gives the batch's floats, to fp32's rounding of
        # another matmul shape
        for i, x in enumerate(ids):
            status, alone = call(server, "/v1/embeddings", {"input": x})
            assert status == 200
            torch.testing.assert_close(torch.tensor(alone["data"][0]["embedding"]), got[i].float(), rtol=0,
                                       atol=1e-6)
        # vLLM's truncate_prompt_tokens: an input's last k tokens (left truncation), -1 the whole context
        status, cut = call(server, "/v1/embeddings", {"input": TEXTS[2], "truncate_prompt_tokens": 4})
        assert status == 200 and cut["usage"]["prompt_tokens"] == 4
        torch.testing.assert_close(torch.tensor(cut["data"][0]["embedding"], dtype=torch.float64),
                                   direct(app.model, ids[2][-4:], pooling, normalize), rtol=1e-5, atol=1e-6)
        status, whole = call(server, "/v1/embeddings", {"input": TEXTS[2], "truncate_prompt_tokens": -1})
        assert status == 200 and whole["usage"]["prompt_tokens"] == len(ids[2])
        # base64: little-endian float32 of the same floats (the same batch: the same forward)
        status, b64 = call(server, "/v1/embeddings", {"input": TEXTS, "encoding_format": "base64"})
        floats = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4").tolist() for d in b64["data"]]
        assert status == 200 and floats == [d["embedding"] for d in out["data"]]
    finally:
        stop(server)


def test_openai_client_and_refusals(lm_folder):
    openai = pytest.importorskip("openai")
    folder, tok = lm_folder
    server = serving(folder, "--served-model-name", "emb")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="x",
                               max_retries=0)
        _, ref = call(server, "/v1/embeddings", {"input": ["a dog", "the cat"]})
        got = client.embeddings.create(model="emb", input=["a dog", "the cat"])  # (the client asks base64)
        assert [e.embedding for e in got.data] == [pytest.approx(d["embedding"], abs=0) for d in ref["data"]]
        assert got.usage.total_tokens == ref["usage"]["total_tokens"]
        context = server.app.model.config.context_length
        for body, status, param, words in [
                ({"input": ""}, 400, "input", "empty"),
                ({"input": ["a", []]}, 400, "input", "input[1]' is empty"),
                ({"input": []}, 400, "input", "must be"),
                ({"input": [1] * (context + 1)}, 400, "input", f"{context + 1} tokens"),
                ({"input": "a", "dimensions": 8}, 400, "dimensions", "Matryoshka"),
                ({"input": "a", "encoding_format": "int8"}, 400, "encoding_format", "base64"),
                # (falsy: these were read as "float", the default that only null or leaving it out asks)
                *[({"input": "a", "encoding_format": f}, 400, "encoding_format", "base64") for f in ("", 0, False)],
                ({"input": "a", "user": 5}, 400, "user", "must be a string"),
                ({"input": "a", "truncate": 3}, 400, "truncate", "unknown field"),
                ({"input": "a", "truncate_prompt_tokens": 0}, 400, "truncate_prompt_tokens", "positive integer"),
                ({"input": "a", "truncate_prompt_tokens": context + 1}, 400, "truncate_prompt_tokens",
                 "smaller truncation size"),
                ({"input": "a", "model": "other"}, 404, "model", "does not exist"),
                ({"messages": [{"role": "user", "content": "hi"}]}, 400, "messages", "reward model"),  # (to /pooling)
        ]:
            path = "/pooling" if "messages" in body else "/v1/embeddings"
            got_status, out = call(server, path, body)
            assert got_status == status and out["error"]["param"] == param and words in out["error"]["message"], out
        status, out = call(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
        assert status == 404 and "--runner pooling" in out["error"]["message"]
    finally:
        stop(server)
    generating = start(folder, "--max-batch", "1")
    generating.RequestHandlerClass.log_message = lambda *a: None
    try:
        for path in ("/v1/embeddings", "/score", "/v2/rerank"):
            status, out = call(generating, path, {"input": "a"})
            assert status == 404 and "--runner pooling" in out["error"]["message"]
    finally:
        stop(generating)


def test_reward_served_is_reward_models_own_score(reward_folder):
    folder, tok = reward_folder
    server = serving(folder)
    try:
        rm = RewardModel.load(folder)
        chat = [{"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "the cat sat"}]
        prompt, (answer,) = encode_answers(tok, ChatPrompt(chat[:1]), [chat[1]["content"]], {})
        seqs = [server.app.encode(t) for t in TEXTS] + [prompt + answer]  # (texts as given; the chat as reward's)
        want = [rm(torch.tensor([s]), torch.tensor([len(s)])).item() for s in seqs]
        status, out = call(server, "/pooling", {"input": TEXTS})
        assert status == 200 and [d["object"] for d in out["data"]] == ["pooling"] * 3, out
        status, chat_out = call(server, "/pooling", {"messages": chat})
        assert status == 200, chat_out
        got = [d["data"][0] for d in out["data"] + chat_out["data"]]
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6) and len(set(got)) == 4
        status, out = call(server, "/pooling", {"messages": chat[:1]})
        assert status == 400 and out["error"]["param"] == "messages" and "assistant" in out["error"]["message"]
        status, out = call(server, "/v1/embeddings", {"input": "a"})
        assert status == 404 and "/pooling" in out["error"]["message"]
    finally:
        stop(server)


@pytest.mark.parametrize("flags,words", [
    (["--pooler-config", '{"pooling_type": "CLS"}'], "CLS"),
    (["--pooler-config", '{"normalise": true}'], "unknown key 'normalise'"),
    (["--convert", "reward"], "not one"),
    (["--enable-lora"], "--enable-lora"),
    (["--kv-cache-dtype", "int8"], "--kv-cache-dtype"),
    (["--override-generation-config", '{"top_k": 5}'], "--override-generation-config is a generation setting"),
    (["--generation-config", "vllm"], "--generation-config is a generation setting"),
    (["--enable-prompt-tokens-details"], "--enable-prompt-tokens-details is a generation setting"),
    (["--max-batch", "4"], "--max-batch is a generation setting"),
    (["--kv-page-size", "32"], "--kv-page-size is a generation setting"),
    (["--max-loras", "2"], "--max-loras is a generation setting"),
    (["--max-lora-rank", "8"], "--max-lora-rank is a generation setting"),
    (["--max-loras", "0"], "--max-loras is a generation setting"),  # (0 == False: still not the default, None)
    (["--max-lora-rank", "0"], "--max-lora-rank is a generation setting"),
    (["--chat-template", "{{ messages }}"], "--chat-template lays out a reward model's chats"),  # (an embedder's)
    (["--chat-template", "tool_use"], "--chat-template lays out a reward model's chats"),  # (a template's name too)
])
def test_flags_refused_by_name(lm_folder, flags, words):
    folder, _ = lm_folder
    with pytest.raises(UserError, match=words):
        start(folder, "--runner", "pooling", *flags)


@pytest.mark.parametrize("flags,words", [
    (["--quantize", "int8"], "--quantize is not applied to a reward model"),
    (["--group-size", "64"], "--group-size is not applied to a reward model"),
    (["--model", "gpt2-small"], "--model names the heads of a GPT-2 file without config.json; .* is a reward model"),
])
def test_model_flags_a_reward_model_does_not_read_are_refused(reward_folder, flags, words):
    """load_generation_model's flags that RewardModel.load has no use for: refused, not left unread."""
    with pytest.raises(UserError, match=words):
        start(reward_folder[0], "--runner", "pooling", *flags)


def test_every_serve_flag_is_read_by_the_pooling_runner_or_refused():
    """Each flag of serve's parser (run-batch's are the same, add_server_args') is one the pooling runner reads or
    one of GENERATION_FLAGS, which it refuses when given: a flag added later is placed here or fails."""
    from tritongpt.bench.serve import serve_parser
    from tritongpt.train.pooling import GENERATION_FLAGS

    reads = {"help", "model", "kernels", "device", "weights", "pretrained", "tokenizer", "quantize", "group_size",
             "host", "port", "api_key", "runner", "convert", "pooler_config", "chat_template", "served_model_name",
             "dtype", "max_model_len"}  # (load_generation_model's, the listener's, pooling's own; --chat-template
    # a reward model's; --max-model-len the inputs' limit, pooling.fit's)
    flags = {a.dest for a in serve_parser()._actions}
    assert sorted(flags - reads - set(GENERATION_FLAGS)) == [] and set(GENERATION_FLAGS) <= flags


def test_max_model_len_limits_the_inputs(lm_folder):
    """--max-model-len (vLLM's, a pooling model's too) is the inputs' limit: one of 17 tokens past 16 is the 400 of
    one past the context, as is a truncate_prompt_tokens past it, though the model's context is 128; 16 are
    embedded; /v1/models reports 16."""
    server = serving(lm_folder[0], "--max-model-len", "16")
    try:
        assert call(server, "/v1/models")[1]["data"][0]["max_model_len"] == 16
        for body, param, words in (({"input": [5] * 17}, "input", "17 tokens; this model's maximum context length is "
                                                                  "16"),
                                   ({"input": "a", "truncate_prompt_tokens": 17}, "truncate_prompt_tokens", "(16)")):
            status, out = call(server, "/v1/embeddings", body)
            assert status == 400 and out["error"]["param"] == param and words in out["error"]["message"], out
        status, out = call(server, "/v1/embeddings", {"input": [5] * 16})
        assert status == 200 and out["usage"]["total_tokens"] == 16
    finally:
        stop(server)


def test_pooling_flags_need_the_pooling_runner(lm_folder):
    with pytest.raises(UserError, match="--pooler-config is used only with --runner pooling"):
        start(lm_folder[0], "--pooler-config", "{}")


def test_many_inputs_run_in_forwards_of_at_most_max_tokens_positions(lm_folder):
    """One request of many inputs is cut into forwards of at most Pooler.max_tokens padded positions (vLLM's
    max_num_batched_tokens), not one [N, T] forward: each input's embedding is still its own, in order."""
    folder, _ = lm_folder
    server = serving(folder, "--pooler-config", '{"pooling_type": "MEAN"}')
    try:
        app, shapes = server.app, []
        hidden = app.model.hidden
        app.model.hidden = lambda idx, *a, **k: shapes.append(tuple(idx.shape)) or hidden(idx, *a, **k)
        app.pooler.max_tokens = 64
        g = torch.Generator().manual_seed(5)
        seqs = [torch.randint(0, app.tok.vocab_size, (n,), generator=g).tolist() for n in (30, 9, 50, 21, 13, 61)]
        status, out = call(server, "/v1/embeddings", {"input": seqs})
        assert status == 200, out
        assert len(shapes) > 1 and all(b * t <= 64 for b, t in shapes) and sum(b for b, _ in shapes) == len(seqs)
        got = torch.tensor([d["embedding"] for d in out["data"]], dtype=torch.float64)
        want = torch.stack([direct(app.model, x, "MEAN", True) for x in seqs])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    finally:
        stop(server)


def test_pooling_requests_count_in_metrics(lm_folder):
    """Each input of an embeddings request is a request finished "stop" in /metrics (vLLM's: one engine request an
    input), its tokens the prompt tokens; a request refused before the forward counts nothing."""
    from test_serve import metric, scrape

    folder, _ = lm_folder
    server = serving(folder, "--served-model-name", "tiny")
    try:
        status, out = call(server, "/v1/embeddings", {"input": TEXTS})
        assert status == 200 and call(server, "/v1/embeddings", {"input": ""})[0] == 400
        s = scrape(server)
        assert metric(s, "request_success_total", finished_reason="stop") == len(TEXTS)
        assert metric(s, "prompt_tokens_total") == out["usage"]["prompt_tokens"]
        assert metric(s, "generation_tokens_total") == 0 and metric(s, "request_prompt_tokens_count") == len(TEXTS)
    finally:
        stop(server)


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


def test_score_and_rerank_of_an_embedder_are_cosines_of_its_embeddings(lm_folder):
    """vLLM's /score and /rerank on an embedding model: the cosine similarity of the two texts' embeddings (float64
    reference, each text alone), 1:N and N:N; rerank sorted by it, top_n the best; each text embedded a request in
    /metrics; refusals by field."""
    from test_serve import metric, scrape

    folder, _ = lm_folder
    server = serving(folder, "--served-model-name", "tiny")
    try:
        app = server.app
        ids = {t: app.encode(t) for t in TEXTS + ["a cat"]}
        emb = {t: direct(app.model, x, "LAST", True) for t, x in ids.items()}
        status, out = call(server, "/score", {"text_1": "a cat", "text_2": TEXTS, "model": "tiny"})
        assert status == 200 and out["object"] == "list", out
        assert [(d["index"], d["object"]) for d in out["data"]] == [(0, "score"), (1, "score"), (2, "score")]
        want = [cosine(emb["a cat"], emb[t]) for t in TEXTS]
        assert [d["score"] for d in out["data"]] == pytest.approx(want, rel=1e-5, abs=1e-6)
        assert len(set(round(w, 4) for w in want)) == 3  # (distinct: an order to test below)
        tokens = len(ids["a cat"]) + sum(len(ids[t]) for t in TEXTS)  # (the query embedded once)
        paired = tokens + 2 * len(ids["a cat"])  # (usage: each pair's two texts, vLLM's, the query in all three)
        assert out["usage"] == {"prompt_tokens": paired, "total_tokens": paired, "completion_tokens": 0}
        s = scrape(server)
        assert metric(s, "request_success_total", finished_reason="stop") == 1 + len(TEXTS)
        assert metric(s, "prompt_tokens_total") == tokens
        # N:N pairs, and truncate_prompt_tokens on each text (its last k tokens)
        status, out = call(server, "/v1/score", {"text_1": TEXTS[:2], "text_2": [TEXTS[2], "a cat"]})
        assert status == 200 and [d["score"] for d in out["data"]] == pytest.approx(
            [cosine(emb[TEXTS[0]], emb[TEXTS[2]]), cosine(emb[TEXTS[1]], emb["a cat"])], rel=1e-5, abs=1e-6)
        status, out = call(server, "/score", {"text_1": TEXTS[2], "text_2": TEXTS[0], "truncate_prompt_tokens": 3})
        cut = [direct(app.model, ids[t][-3:], "LAST", True) for t in (TEXTS[2], TEXTS[0])]
        assert status == 200 and out["usage"]["prompt_tokens"] == 6
        assert out["data"][0]["score"] == pytest.approx(cosine(*cut), rel=1e-5, abs=1e-6)
        # rerank: the documents by score, best first; top_n the best n
        best = sorted(range(3), key=lambda i: -want[i])
        for path, extra, n in [("/rerank", {"top_n": 2}, 2), ("/v1/rerank", {"top_n": 7}, 3), ("/v2/rerank", {}, 3),
                               ("/rerank", {"top_n": 0}, 3)]:  # (0: vLLM's default, every document)
            status, out = call(server, path, {"query": "a cat", "documents": TEXTS, **extra})
            assert status == 200 and out["id"].startswith("rerank-") and out["model"] == "tiny", out
            assert [r["index"] for r in out["results"]] == best[:n]
            assert [r["document"]["text"] for r in out["results"]] == [TEXTS[i] for i in best[:n]]
            assert [r["relevance_score"] for r in out["results"]] == pytest.approx([want[i] for i in best[:n]],
                                                                                   rel=1e-5, abs=1e-6)
            assert out["usage"]["total_tokens"] == paired
        done = metric(scrape(server), "request_success_total", finished_reason="stop")
        assert done == 4 + 4 + 2 + 4 * 4  # (a score's texts and a rerank's query and documents, each a request)
        context = app.model.config.context_length
        long = "the cat sat on the mat. " * context
        for path, body, param, words in [
                ("/score", {"text_1": [], "text_2": "a"}, "text_1", "non-empty list"),
                ("/score", {"text_1": "a", "text_2": ["b", ""]}, "text_2", "'text_2[1]' is empty"),
                ("/score", {"text_1": ["a", "b"], "text_2": ["a", "b", "c"]}, "text_2", "equal length"),
                ("/score", {"text_1": ["a", "b"], "text_2": "c"}, "text_2", "equal length"),
                ("/score", {"text_1": "a", "text_2": ["b", long]}, "text_2", "'text_2[1]' is"),
                ("/score", {"text_1": "a", "text_2": "b", "text_3": "c"}, "text_3", "unknown field"),
                ("/score", {"text_1": "a", "text_2": "b", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens",
                 "positive integer"),
                ("/rerank", {"query": ["a"], "documents": ["b"]}, "query", "must be a string"),
                ("/rerank", {"query": "a", "documents": []}, "documents", "non-empty list"),
                ("/rerank", {"query": "a", "documents": "b"}, "documents", "must be a non-empty list of strings"),
                ("/rerank", {"query": "a", "documents": ["b"], "top_n": -1}, "top_n", "non-negative integer"),
                ("/rerank", {"query": "a", "documents": ["b"], "top_n": 1.5}, "top_n", "non-negative integer"),
                ("/rerank", {"query": long, "documents": ["b"]}, "query", "'query' is"),
                ("/rerank", {"query": "a", "documents": ["b"], "return_documents": True}, "return_documents",
                 "unknown field"),
        ]:
            status, out = call(server, path, body)
            assert status == 400 and out["error"]["param"] == param and words in out["error"]["message"], out
        assert metric(scrape(server), "request_success_total", finished_reason="stop") == done  # (refused: none ran)
    finally:
        stop(server)


def test_score_and_rerank_of_a_reward_model_are_its_rewards_of_the_chats(reward_folder):
    """A reward model's score of (text_1, text_2) is its reward of the chat [user: text_1, assistant: text_2], laid
    out as `reward` lays out a chat record; rerank orders documents by it."""
    folder, tok = reward_folder
    server = serving(folder)
    try:
        rm = RewardModel.load(folder)
        answers = ["the cat sat", "a dog", "Hello there!", "the bird sang on the mat"]
        seqs = [p + a for p, (a,) in (encode_answers(tok, ChatPrompt([{"role": "user", "content": "How are you?"}]),
                                                     [a], {}) for a in answers)]
        want = [rm(torch.tensor([s]), torch.tensor([len(s)])).item() for s in seqs]
        assert len(set(round(w, 4) for w in want)) == len(want)
        status, out = call(server, "/score", {"text_1": "How are you?", "text_2": answers})
        assert status == 200, out
        assert [d["score"] for d in out["data"]] == pytest.approx(want, rel=1e-5, abs=1e-6)
        assert out["usage"]["prompt_tokens"] == sum(map(len, seqs))
        status, out = call(server, "/v1/rerank", {"query": "How are you?", "documents": answers, "top_n": 1})
        best = max(range(len(want)), key=lambda i: want[i])
        assert status == 200 and [(r["index"], r["document"]["text"]) for r in out["results"]] == [
            (best, answers[best])]
        assert out["results"][0]["relevance_score"] == pytest.approx(want[best], rel=1e-5, abs=1e-6)
    finally:
        stop(server)


@pytest.mark.parametrize("kernels", ["triton", "reference"])
def test_the_interpreter_s_slowness_is_said_once_for_a_reward_model_as_for_an_embedder(lm_folder, reward_folder,
                                                                                       kernels, capsys):
    """--kernels triton on the CPU: the note that the interpreter is slow (load_generation_model's, an embedder's)
    is a reward model's too, once; none with --kernels reference."""
    from tritongpt.cli import build_parser
    from tritongpt.train.pooling import load_pooler

    for folder in (lm_folder[0], reward_folder[0]):
        args = build_parser(["serve"]).parse_args(["serve", "--weights", str(folder), "--runner", "pooling",
                                                   "--device", "cpu", "--kernels", kernels])
        load_pooler(args)
        said = capsys.readouterr().err.count("Triton kernels on the CPU run through Triton's interpreter")
        assert said == (kernels == "triton"), (folder, said)
