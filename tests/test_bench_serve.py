"""`tritongpt bench serve` (bench/serve.py): a load generator for OpenAI-compatible servers.

End to end on the `saved` tiny model (our server started in process, and again by the test and given as --base-url),
a few requests of a few tokens each; the scheduling, the concurrency limit and failures against a fake server that
streams as vLLM's does (HTTP/1.1, chunked) and counts the requests it holds at once; the metrics against vLLM's
definitions on records made by hand."""
import dataclasses
import json
import math
import re
import socket
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from tritongpt.bench import serve as bs
from tritongpt.cli import build_parser, main
from tritongpt.errors import UserError
from tritongpt.train import serve

pytestmark = pytest.mark.usefixtures("one_thread")


def bench(*flags, plots=False):
    return main(["bench", "serve", *flags, *([] if plots else ["--no-plots"])])


def only_file(folder, pattern):
    files = sorted(folder.rglob(pattern))
    assert len(files) == 1, files
    return files[0]


def p99(xs):
    """numpy's linear percentile, written out: the value at rank 0.99 (n - 1) between its two neighbours."""
    xs, k = sorted(xs), 0.99 * (len(xs) - 1)
    lo = math.floor(k)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (k - lo)


def test_the_in_process_server_end_to_end(saved, tmp_path, capsys):
    rc = bench("--weights", str(saved), "--device", "cpu", "--num-prompts", "5", "--input-len", "6",
               "--output-len", "5", "--out", str(tmp_path), plots=True)
    out = capsys.readouterr().out
    assert rc == 0
    assert "| output token throughput (tok/s) |" in out and "| p99 ITL (ms) |" in out
    result = json.loads(only_file(tmp_path, "serve.json").read_text())
    assert only_file(tmp_path, "serve.png").stat().st_size > 1000
    md = only_file(tmp_path, "serve.md").read_text()
    assert "| mean TTFT (ms) |" in md and str(saved) in md
    env = result["env"]
    assert env["device"] and env["torch"] and env["triton"] and env["git_commit"]
    assert result["server"]["in_process"] and result["server"]["flags"]["weights"] == str(saved)
    (run,) = result["runs"]
    m, reqs = run["metrics"], run["requests"]
    assert m["completed"] == 5 and m["failed"] == 0 and len(reqs) == 5
    assert m["total_output_tokens"] == sum(r["output_tokens"] for r in reqs)
    assert m["total_input_tokens"] == sum(r["prompt_tokens"] for r in reqs) == 5 * 6  # the prompts' cut: 6 tokens
    for r in reqs:
        assert 1 <= r["output_tokens"] <= 5
        assert 0 < r["ttft_ms"] <= r["e2e_ms"]
        # a text chunk a token, then the finish chunk (empty text): every chunk with choices a gap after the first
        assert len(r["itl_ms"]) == r["output_tokens"] == r["text_chunks"]
        assert r["e2e_ms"] >= r["ttft_ms"] + sum(r["itl_ms"]) - 1e-6
        assert r["tpot_ms"] == pytest.approx((r["e2e_ms"] - r["ttft_ms"]) / (r["output_tokens"] - 1))
    assert m["mean_ttft_ms"] == pytest.approx(statistics.mean(r["ttft_ms"] for r in reqs))
    assert m["p99_itl_ms"] == pytest.approx(p99([x for r in reqs for x in r["itl_ms"]]))
    assert m["output_throughput"] == pytest.approx(m["total_output_tokens"] / m["duration_s"])
    assert max(r["e2e_ms"] for r in reqs) <= m["duration_s"] * 1e3


def test_the_chat_endpoint_times_the_answers_text_chunks(tmp_path, capsys):
    """--endpoint /v1/chat/completions (vLLM's openai-chat backend): the prompt as the user's message in the served
    model's chat format (more prompt tokens than the cut), the first text-bearing chunk its first token (not the
    role chunk), the gaps between text chunks its ITL; the results name the endpoint."""
    from test_serve import tiny_run

    run = tmp_path / "run"
    tiny_run(run, "chat")
    rc = bench("--weights", str(run), "--device", "cpu", "--endpoint", "/v1/chat/completions", "--num-prompts", "3",
               "--input-len", "6", "--output-len", "4", "--out", str(tmp_path / "out"))
    assert rc == 0, capsys.readouterr().err
    result = json.loads(only_file(tmp_path / "out", "serve.json").read_text())
    assert result["settings"]["endpoint"] == "/v1/chat/completions"
    (r,) = result["runs"]
    assert r["metrics"]["completed"] == 3
    for q in r["requests"]:
        assert q["prompt_tokens"] > 6 and 1 <= q["text_chunks"] <= q["output_tokens"] <= 4
        assert len(q["itl_ms"]) == q["text_chunks"] - 1 and q["finish_reason"] in ("stop", "length")


def test_ignore_eos_makes_every_answer_output_len_tokens(saved, tmp_path, capsys, monkeypatch):
    """--ignore-eos sends vLLM's field, which our server takes: with the end token made every answer's greedy first
    choice, the answers end at once without it and run to --output-len with it; the report says it was used."""
    real = serve.Model.draw

    def eos_first(self, ids, budget, s, stop_id, *rest):  # (the end token biased to the top: every answer would end)
        return real(self, ids, budget, {**s, "logit_bias": {stop_id: 100.0}}, stop_id, *rest)
    monkeypatch.setattr(serve.Model, "draw", eos_first)
    flags = ["--weights", str(saved), "--device", "cpu", "--num-prompts", "3", "--input-len", "4", "--output-len", "4",
             "--out", str(tmp_path)]
    for extra, tokens in (([], 1), (["--ignore-eos"], 4)):
        assert bench(*flags, *extra, "--label", f"eos{len(extra)}") == 0
        result = json.loads(only_file(tmp_path, f"serve-eos{len(extra)}.json").read_text())
        (run,) = result["runs"]
        assert [r["output_tokens"] for r in run["requests"]] == [tokens] * 3
        assert run["metrics"]["ended_early"] == (0 if extra else 3)
        assert ("ignore_eos" in only_file(tmp_path, f"serve-eos{len(extra)}.md").read_text()) == bool(extra)
    capsys.readouterr()


def start_served(saved, name="tiny-served", *flags):
    args = build_parser(["serve"]).parse_args(["serve", "--weights", str(saved), "--port", "0", "--device", "cpu",
                                               "--served-model-name", name, *flags])
    server = bs.start_server(args)
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


def test_base_url_a_sweep_of_concurrencies_and_results_never_overwritten(saved, tmp_path, capsys):
    server, url = start_served(saved)
    try:
        rc = bench("--base-url", url, "--num-prompts", "4", "--input-len", "5", "--output-len", "3",
                   "--max-concurrency", "1,3", "--out", str(tmp_path), "--label", "sweep", plots=True)
        assert rc == 0
        with pytest.raises(UserError, match="--model other: the server at .* does not list it .*tiny-served"):
            bs.run_serve(build_parser(["bench"]).parse_args(["bench", "serve", "--base-url", url, "--model", "other"]))
    finally:
        server.shutdown()
        server.server_close()
    path = only_file(tmp_path, "serve-sweep.json")
    assert path.parent.name == "remote-tiny-served"
    result = json.loads(path.read_text())
    assert result["settings"]["model"] == "tiny-served"  # the first of /v1/models
    assert not result["server"]["in_process"] and result["server"]["models"] == ["tiny-served"]
    assert [r["max_concurrency"] for r in result["runs"]] == [1, 3]
    assert all(r["metrics"]["completed"] == 4 for r in result["runs"])
    assert (path.parent / "serve-sweep.png").is_file()
    again = bs.write_serve(result, path.parent, "sweep", plots=False)
    assert [p.name for p in again] == ["serve-sweep-2.json", "serve-sweep-2.md"]
    assert json.loads(path.read_text()) == result  # the first run's file as it was
    assert "max concurrency 1 | max concurrency 3 |" in capsys.readouterr().out


def test_requests_bear_the_servers_api_key_which_the_results_never_hold(saved, tmp_path, monkeypatch, capsys):
    """A server started with --api-key: bench serve sends the key it is given (--api-key, else $OPENAI_API_KEY, as
    vLLM's benchmark), a 401 named; the in-process server's key is sent too, and written in no result."""
    key = "sk-bench-0123"
    server, url = start_served(saved, "tiny-served", "--api-key", key, "--max-batch", "1")
    small = ["--num-prompts", "1", "--input-len", "4", "--output-len", "2"]
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    try:
        assert bench("--base-url", url, *small) == 2
        assert "/models answered HTTP 401: this server needs an API key" in capsys.readouterr().err
        assert bench("--base-url", url, "--api-key", key, *small) == 0
        monkeypatch.setenv("OPENAI_API_KEY", key)
        assert bench("--base-url", url, *small) == 0
        # a key no header carries as sent (a file's \r, a non-ASCII character) refused by its source's name, never
        # echoed (http.client's error quotes the header: it was in every failed request's record)
        for bad, where in [(key + "\r", "$OPENAI_API_KEY"), ("sk-b\u00e9nch", "$OPENAI_API_KEY")]:
            monkeypatch.setenv("OPENAI_API_KEY", bad)
            assert bench("--base-url", url, *small) == 2
            err = capsys.readouterr().err
            assert f"{where} is empty or holds whitespace" in err and key not in err
        assert bench("--base-url", url, "--api-key", "sk-\u20ac", *small) == 2
        assert "--api-key is empty or holds whitespace" in capsys.readouterr().err
    finally:
        server.shutdown()
        server.server_close()
    assert bench("--weights", str(saved), "--device", "cpu", "--api-key", key, *small, "--out", str(tmp_path)) == 0
    result = only_file(tmp_path, "serve.json").read_text()
    assert json.loads(result)["runs"][0]["metrics"]["completed"] == 1 and key not in result
    assert key not in capsys.readouterr().out + only_file(tmp_path, "serve.md").read_text()


def test_failed_requests_are_counted_and_the_first_error_shown(saved, tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    long = "the cat sat on the mat " * 20  # past the tiny model's 32-token context
    data.write_text("\n".join(json.dumps({"prompt": p}) for p in ("Hello there", long, "a dog ran", long)) + "\n")
    rc = bench("--weights", str(saved), "--device", "cpu", "--dataset", str(data), "--num-prompts", "4",
               "--output-len", "3")
    out = capsys.readouterr().out
    assert rc == 1
    assert "| completed requests | 2 |" in out and "| failed requests | 2 |" in out
    assert "2 request(s) failed; the first: HTTP 400: the model's context is 32 tokens" in out


def test_the_scoring_load_sends_lm_evals_loglikelihood_requests_and_checks_their_answers(saved, tmp_path, capsys):
    """--scoring: P token-id prompts a request, echo, logprobs 1, max_tokens 1 (lm-eval's) or 0 (vLLM's scoring),
    each answer checked as lm-eval reads it (a logprob a prompt token, the first None, then one a drawn token); the
    counts and throughputs from the records, the files named serve-scoring.*; our server in process, and at
    --base-url (the prompts cut with the embedded tokenizer there)."""
    load = ["--scoring", "--num-prompts", "3", "--prompts-per-request", "3", "--input-len", "5", "--max-concurrency",
            "2", "--out", str(tmp_path)]
    assert bench(*load, "--weights", str(saved), "--device", "cpu", plots=True) == 0
    server, url = start_served(saved)
    try:
        assert bench(*load, "--base-url", url, "--output-len", "0", "--label", "zero") == 0
    finally:
        server.shutdown()
        server.server_close()
    out = capsys.readouterr().out
    assert "| prompt token throughput (tok/s) |" in out and "| p99 latency (ms) |" in out
    assert only_file(tmp_path, "serve-scoring.png").stat().st_size > 1000
    assert "lm-eval loglikelihood requests" in only_file(tmp_path, "serve-scoring.md").read_text()
    for name, max_tokens in (("serve-scoring.json", 1), ("serve-zero.json", 0)):
        result = json.loads(only_file(tmp_path, name).read_text())
        s = result["settings"]
        assert s["scoring"] and (s["output_len"], s["prompts_per_request"]) == (max_tokens, 3)
        assert result["server"]["in_process"] == (max_tokens == 1)
        assert result["env"]["device"] and result["env"]["torch"]
        (run,) = result["runs"]
        m, reqs = run["metrics"], run["requests"]
        assert (m["completed"], m["failed"], m["failed_checks"], m["bad_choices"]) == (3, 0, 0, 0)
        assert (m["total_prompts"], m["total_input_tokens"]) == (9, 45)  # the server's usage: 3 x 3 prompts of 5
        assert m["prompt_throughput"] == pytest.approx(9 / m["duration_s"])
        assert m["input_throughput"] == pytest.approx(45 / m["duration_s"])
        assert m["median_latency_ms"] == pytest.approx(statistics.median(r["latency_ms"] for r in reqs))
        assert m["p99_latency_ms"] == pytest.approx(p99([r["latency_ms"] for r in reqs]))
        assert all(0 < r["latency_ms"] <= m["duration_s"] * 1e3 for r in reqs)


def test_answers_lm_eval_cannot_read_are_failed_requests_not_a_crash(saved, tmp_path, capsys, monkeypatch):
    """A server that answers one token_logprobs too few once the load starts (the warm-up answered right: the drawn
    token's left out, which lm-eval's token_logprobs[ctxlen:-1] would take for the continuation's last) fails every
    request of the load, each counted with its choices, the first reason shown and written."""
    real, real_load, broken = serve.completion_logprobs, bs.run_load, []

    def short(tok, items, start=0, *a):  # (start > 0: the drawn tokens' part, after the echoed prompt's)
        out = real(tok, items, start, *a)
        return {**out, "token_logprobs": out["token_logprobs"][:-1]} if broken and start else out

    def load(*a, **k):
        broken.append(True)
        return real_load(*a, **k)
    monkeypatch.setattr(serve, "completion_logprobs", short)
    monkeypatch.setattr(bs, "run_load", load)
    rc = bench("--scoring", "--weights", str(saved), "--device", "cpu", "--num-prompts", "2", "--prompts-per-request",
               "2", "--input-len", "4", "--max-concurrency", "1", "--out", str(tmp_path), "--label", "short")
    out = capsys.readouterr().out
    assert rc == 1 and "| answers failing lm-eval's check (requests) | 2 |" in out
    m = json.loads(only_file(tmp_path, "serve-short.json").read_text())["runs"][0]["metrics"]
    assert (m["completed"], m["failed"], m["failed_checks"], m["bad_choices"]) == (0, 2, 2, 4)
    assert m["first_error"] == ("2 answer(s) fail lm-eval's reading; the first: choice 0: 4 token_logprobs for a "
                                "prompt of 4 tokens and max_tokens 1 (want 5)")


# -- LoRA adapters: --lora-modules, --random-loras; /metrics' lora_requests_info -------------------------------------
def test_random_loras_are_adapter_files_read_adapter_reads(saved, tmp_path):
    """--random-loras' files: add_lora's modules (attn,mlp) at the rank asked, A as add_lora starts it, B random
    (not add_lora's zeros: a no-op adapter) and another in each adapter, the base left out of the file."""
    import copy

    from tritongpt.model.gpt import GPTModel
    from tritongpt.model.lora import add_lora
    from tritongpt.train.gpt2_weights import read_adapter

    model = GPTModel.load(saved)
    paths = bs.write_random_loras(model.config, 2, 3, tmp_path, seed=1)
    assert list(paths) == ["lora0", "lora1"]
    assert all(p.stat().st_size < saved.stat().st_size / 4 for p in paths.values())
    a0, a1 = (read_adapter(p, model) for p in paths.values())
    want = {n.split(".parametrizations")[0] for n, _ in add_lora(copy.deepcopy(model), 3).named_parameters()
            if n.endswith("lora_A")}
    assert set(a0) == set(a1) == want and len(want) == 6  # q, k, v, out, fc1, fc2 of the one layer
    for name, (a, b) in a0.items():
        assert a.shape[0] == b.shape[1] == 3 and a.abs().max() <= 1 / a.shape[1] ** 0.5
        assert 0.6 * bs.RANDOM_B_STD < (b / (16 / 3)).std() < 1.4 * bs.RANDOM_B_STD  # (scale alpha / r folded in)
        assert not torch.equal(b, a1[name][1])
    # a mixture-of-experts model: its attention's four projections (LoRA adapts no expert; add_lora refuses "mlp")
    moe = GPTModel(dataclasses.replace(model.config, position_encoding="rope", norm="rmsnorm", mlp="swiglu",
                                       n_experts=4, experts_per_token=2))
    (path,) = bs.write_random_loras(moe.config, 1, 2, tmp_path).values()
    assert sorted(n.rpartition(".")[2] for n in read_adapter(path, moe)) == ["W_key", "W_query", "W_value", "out_proj"]


def test_random_loras_config_of_pretrained_without_model_is_gpt2_small(monkeypatch):
    """--random-loras reads the served model's config before the server starts: --pretrained with no --model is
    gpt2-small there as in the server (check_model_source), not load_pretrained(None)'s "unknown GPT-2 model None"."""
    import argparse
    import types

    from tritongpt.train import gpt2_weights

    asked = []
    monkeypatch.setattr(gpt2_weights, "load_pretrained",
                        lambda name: asked.append(name) or types.SimpleNamespace(config=f"config of {name}"))
    ns = argparse.Namespace(weights=None, pretrained=True, model=None)
    assert bs.served_config(ns) == "config of gpt2-small" and asked == ["gpt2-small"]


def test_random_loras_in_process_spread_the_requests_and_the_results_record_them(saved, tmp_path, capsys,
                                                                                monkeypatch):
    """Each request's model a seeded random pick among the adapters (vLLM's rule), run by the server as that
    adapter (the engine counts them), generation and scoring alike; the picks and their counts in the results, the
    adapters' folder gone after."""
    started, real = [], bs.start_server
    monkeypatch.setattr(bs, "start_server", lambda ns: started.append(real(ns)) or started[-1])
    load = ["--weights", str(saved), "--device", "cpu", "--random-loras", "3", "--lora-rank", "2", "--num-prompts",
            "6", "--input-len", "4", "--max-batch", "4", "--out", str(tmp_path)]
    assert bench(*load, "--output-len", "2") == 0
    assert bench(*load, "--scoring", "--prompts-per-request", "2") == 0
    picks = bs.adapter_picks(["lora0", "lora1", "lora2"], 6, 0)
    assert len(set(picks)) == 3 and picks == bs.adapter_picks(["lora0", "lora1", "lora2"], 6, 0)
    # the warm-up and the load's requests, each run with its adapter (scoring: a request an engine request a prompt)
    assert [s.app.engine.stats["lora_requests"] for s in started] == [1 + 6, 2 * (1 + 6)]
    for name in ("serve.json", "serve-scoring.json"):
        result = json.loads(only_file(tmp_path, name).read_text())
        s, (run,) = result["settings"], result["runs"]
        assert s["lora_modules"] == ["lora0", "lora1", "lora2"] and s["random_loras"] == {"count": 3, "rank": 2}
        assert s["adapter_requests"] == {n: picks.count(n) for n in ("lora0", "lora1", "lora2")}
        assert [r["model"] for r in run["requests"]] == picks and run["metrics"]["completed"] == 6
        folder = Path(result["server"]["flags"]["lora_modules"][0].split("=", 1)[1]).parent
        assert not folder.exists()
    counts = ", ".join(f"lora{i} {picks.count(f'lora{i}')}" for i in range(3))
    md = only_file(tmp_path, "serve.md").read_text()
    assert f"(3 random adapters of rank 2, targets attn,mlp): each request's model a random pick among lora0, lora1, " \
           f"lora2 (vLLM's --lora-modules rule, seed 0); requests: {counts}." in md
    capsys.readouterr()


def test_a_second_ctrl_c_as_the_server_closes_still_removes_the_adapters_folder(saved, monkeypatch):
    """Ctrl-C, then another while the in-process server closes (its engine's last step, its requests' threads): the
    --random-loras folder is removed all the same. cli.main then ends the process with os._exit (a thread left in
    torch), which runs no atexit hook: the TemporaryDirectory's own cleanup would never come."""
    folders, real = [], bs.write_random_loras

    def write(config, k, rank, folder, seed):
        folders.append(Path(folder))
        return real(config, k, rank, folder, seed)

    class Server:  # (the first Ctrl-C as the load begins, the second in server_close)
        @property
        def app(self):
            raise KeyboardInterrupt

        def shutdown(self):
            pass

        def server_close(self):
            raise KeyboardInterrupt

    monkeypatch.setattr(bs, "write_random_loras", write)
    monkeypatch.setattr(bs, "start_server", lambda ns: Server())
    args = build_parser(["bench"]).parse_args(["bench", "serve", "--weights", str(saved), "--device", "cpu",
                                               "--random-loras", "1", "--lora-rank", "2"])
    with pytest.raises(KeyboardInterrupt) as e:  # (kept: its frames hold the folder's TemporaryDirectory)
        bs.run_serve(args)
    assert folders and not folders[0].exists(), e


def test_base_url_spreads_over_the_adapter_names_and_metrics_show_them(saved, tmp_path, capsys):
    """--base-url with --lora-modules NAME ...: the names the server lists, each request a pick among them; /metrics
    has vLLM's lora_requests_info (idle: no adapter running or waiting, max_lora the engine's, the value the time)."""
    from test_serve import scrape

    from tritongpt.model.gpt import GPTModel

    paths = bs.write_random_loras(GPTModel.load(saved).config, 2, 2, tmp_path)
    server, url = start_served(saved, "tiny", "--max-batch", "4", "--enable-lora", "--lora-modules",
                               *(f"{n}={p}" for n, p in paths.items()))
    try:
        before = time.time()
        (key, value), = [(k, v) for k, v in scrape(server).items() if k[0] == "tritongpt:lora_requests_info"]
        assert dict(key[1]) == {"model_name": "tiny", "max_lora": "2", "running_lora_adapters": "",
                                "waiting_lora_adapters": ""} and before - 1 <= value <= time.time() + 1
        assert bench("--base-url", url, "--lora-modules", "lora1", "lora0", "--num-prompts", "5", "--input-len", "4",
                     "--output-len", "2", "--seed", "3", "--out", str(tmp_path)) == 0
        assert server.app.engine.stats["lora_requests"] == 1 + 5
        with pytest.raises(UserError, match="--lora-modules nope: the server at .* does not list it .*lora0, lora1"):
            bs.run_serve(build_parser(["bench"]).parse_args(["bench", "serve", "--base-url", url, "--lora-modules",
                                                              "nope"]))
    finally:
        server.shutdown()
        server.server_close()
    result = json.loads(only_file(tmp_path, "serve.json").read_text())
    picks = bs.adapter_picks(["lora1", "lora0"], 5, 3)
    assert result["settings"]["lora_modules"] == ["lora1", "lora0"] and result["settings"]["random_loras"] is None
    assert [r["model"] for r in result["runs"][0]["requests"]] == picks and len(set(picks)) == 2
    assert result["settings"]["adapter_requests"] == {"lora0": picks.count("lora0"), "lora1": picks.count("lora1")}
    capsys.readouterr()


def test_lora_requests_info_names_the_running_and_waiting_requests_adapters():
    """vLLM's labels: each adapter once, in the order the requests show it, the base's requests (-1) none; no
    gauge for an engine serving no adapter (vLLM's: none without --enable-lora)."""
    from types import SimpleNamespace as NS

    from tritongpt.train.metrics import Metrics

    stats = {"prompt_tokens": 0, "cached_prompt_tokens": 0, "preemptions": 0}
    engine = NS(cond=threading.Condition(), paged=False, max_batch=8, free=[], stats=stats, max_loras=3,
                adapters=NS(names=["a", 'b"q', "c"]), running=[NS(adapter=a) for a in (2, -1, 0, 2)],
                waiting=[NS(adapter=a) for a in (-1, 1, 1)])
    before = time.time()
    (line,) = [x for x in Metrics("m", 32, engine).render().splitlines() if x.startswith("tritongpt:lora_requests")]
    labels, value = line.rsplit(" ", 1)
    assert labels == ('tritongpt:lora_requests_info{model_name="m",max_lora="3",waiting_lora_adapters="b\\"q",'
                      'running_lora_adapters="c,a"}') and before <= float(value) <= time.time()
    engine.adapters = None
    assert "lora_requests_info" not in Metrics("m", 32, engine).render()


@pytest.mark.parametrize("max_tokens, choices, says", [
    (1, [[None, -1.0, -2.0]], "1 choices (indices [0]) for 2 prompts"),
    (1, [[None, -1.0, -2.0], [None, -1.0]], "choice 1: 2 token_logprobs for a prompt of 2 tokens and max_tokens 1 "
                                            "(want 3)"),
    (0, [[None, -1.0, -2.0], [None, -1.0]], "choice 0: 3 token_logprobs for a prompt of 2 tokens and max_tokens 0 "
                                            "(want 2)"),
    (3, [[None, -1.0, -2.0, -3.0, -4.0, -5.0], [None, -1.0, -2.0]],
     "choice 0: 6 token_logprobs for a prompt of 2 tokens and max_tokens 3 (want 3 to 5)"),
    (1, [[-0.5, -1.0, -2.0], [None, -1.0, -2.0]], "choice 0: the first token's logprob is -0.5, not None"),
    (1, [[None, -1.0, -2.0], [None, float("nan"), -2.0]], "choice 1: a logprob nan is not a finite number"),
    (1, [[None, None, -2.0], [None, -1.0, -2.0]], "choice 0: a logprob None is not a finite number"),
])
def test_the_scoring_check_names_what_lm_eval_could_not_read(max_tokens, choices, says):
    answer = {"choices": [{"index": i, "logprobs": {"token_logprobs": lps}} for i, lps in enumerate(choices)]}
    problems = bs.check_scored(answer, [[5, 6], [7, 8]], max_tokens)
    assert problems == [says]
    fine = [[None, -1.0] + [-0.5] * min(max_tokens, 1)] * 2
    answer = {"choices": [{"index": i, "logprobs": {"token_logprobs": lps}} for i, lps in enumerate(fine)][::-1]}
    assert bs.check_scored(answer, [[5, 6], [7, 8]], max_tokens) == []  # (choices in any order: by their index)


class Fake(BaseHTTPRequestHandler):
    """vLLM's way of streaming (HTTP/1.1, chunked), a token a chunk with a pause between; counts the requests it holds
    at once. A prompt "refuse" gets a 400, "mid" an error event after a token, "cut" a stream without [DONE],
    "empty" a first token with no text (vLLM streams such a chunk: a byte of a character, a special token)."""
    protocol_version = "HTTP/1.1"
    lock, now, most = threading.Lock(), 0, 0

    def log_message(self, *a):
        pass

    def do_GET(self):
        self.send(200, json.dumps({"object": "list", "data": [{"id": "fake-model"}]}).encode(), "application/json")

    def send(self, status, data, kind):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def chunk(self, text):
        data = f"data: {text}\n\n".encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.released = False  # (a kept-alive connection's handler serves its next request too)
        with Fake.lock:
            Fake.now += 1
            Fake.most = max(Fake.most, Fake.now)
        try:
            if body["prompt"] == "refuse":
                return self.send(400, json.dumps({"error": {"message": "no thanks"}}).encode(), "application/json")
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(body["max_tokens"]):
                time.sleep(0.02)
                text = "" if body["prompt"] == "empty" and i == 0 else f" t{i}"
                self.chunk(json.dumps({"choices": [{"index": 0, "text": text, "finish_reason": None}],
                                       "usage": None}))
                if body["prompt"] == "mid":
                    self.chunk(json.dumps({"error": {"message": "went wrong"}}))
                    break
            self.release()  # (before the end: a client that has read [DONE] may send its next request at once)
            if body["prompt"] != "cut":
                self.chunk(json.dumps({"choices": [], "usage": {"prompt_tokens": 2,
                                                                "completion_tokens": body["max_tokens"]}}))
                self.chunk("[DONE]")
            self.wfile.write(b"0\r\n\r\n")
        finally:
            self.release()

    def release(self):
        """This request no longer held (once, whichever comes first)."""
        if not getattr(self, "released", False):
            self.released = True
            with Fake.lock:
                Fake.now -= 1


@pytest.fixture
def fake():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Fake)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    Fake.most = 0
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("limit", [2, None])
def test_max_concurrency_is_the_most_requests_the_server_holds_at_once(fake, limit):
    records, duration = bs.run_load(fake, "fake-model", ["p"] * 6, 3, concurrency=limit)
    assert all(r["success"] for r in records)
    assert [len(r["itl_ms"]) for r in records] == [2] * 6 and [r["output_tokens"] for r in records] == [3] * 6
    # the server's 20 ms between tokens, seen through its chunks (on average: on a loaded machine a late read of one
    # chunk shortens the next gap by as much, which failed a check of each gap in one clean-clone run)
    gaps = [g for r in records for g in r["itl_ms"]]
    assert sum(gaps) / len(gaps) >= 15, gaps
    assert Fake.most == 2 if limit else Fake.most > 2


def test_failures_are_kept_with_their_reasons(fake):
    prompts = ["ok", "refuse", "mid", "cut", "ok"]
    records, duration = bs.run_load(fake, "fake-model", prompts, 2)
    assert [r["success"] for r in records] == [True, False, False, False, True]
    assert records[1]["error"] == "HTTP 400: no thanks"
    assert records[2]["error"] == "error event: went wrong"
    assert records[3]["error"] == "the stream ended without data: [DONE]"
    m = bs.summarize(records, duration, 2)
    assert (m["completed"], m["failed"], m["first_error"]) == (2, 3, "HTTP 400: no thanks")
    assert m["total_output_tokens"] == 4


def test_a_chunk_with_no_text_is_a_token_in_ttft_and_itl_as_vllm_counts_it(fake):
    """vLLM's async_request_openai_completions: every chunk with choices is a token's, empty text or not: the first
    one stops TTFT, each later one is an ITL gap (3 tokens: 2 gaps), and the usage chunk (no choices) is none."""
    (r,) = bs.run_load(fake, "fake-model", ["empty"], 3)[0]
    assert r["success"] and r["output_tokens"] == 3 and r["text_chunks"] == 2
    assert len(r["itl_ms"]) == 2 and sum(r["itl_ms"]) >= 35  # (the server's 20 ms before each of the last two)
    assert 15 <= r["ttft_ms"] and r["ttft_ms"] + sum(r["itl_ms"]) <= r["e2e_ms"]


def test_poisson_arrivals_from_a_seed():
    a = bs.arrival_offsets(20000, 4.0, seed=3)
    assert a == bs.arrival_offsets(20000, 4.0, seed=3) and a != bs.arrival_offsets(20000, 4.0, seed=4)
    gaps = [y - x for x, y in zip(a, a[1:])]
    assert a[0] == 0 and min(gaps) > 0
    assert statistics.mean(gaps) == pytest.approx(1 / 4.0, rel=0.03)
    assert statistics.pstdev(gaps) == pytest.approx(1 / 4.0, rel=0.05)  # exponential: its std is its mean
    assert bs.arrival_offsets(5, math.inf, seed=3) == [0.0] * 5


def test_requests_are_sent_on_their_schedule(fake):
    offsets = bs.arrival_offsets(4, 20.0, seed=1)
    records, _ = bs.run_load(fake, "fake-model", ["p"] * 4, 1, rate=20.0, seed=1)
    sent = [r["sent_s"] for r in records]
    assert all(s >= at for s, at in zip(sent, offsets)) and all(s < at + 0.05 for s, at in zip(sent, offsets))


def test_the_metrics_are_vllms():
    def rec(ttft, itl, e2e, out, prompt=10):
        return {"success": True, "error": None, "ttft_ms": ttft, "itl_ms": itl, "e2e_ms": e2e, "output_tokens": out,
                "prompt_tokens": prompt, "tpot_ms": (e2e - ttft) / (out - 1) if out > 1 else None}

    records = [rec(10, [1, 2], 13, 3), rec(20, [4], 24, 2), rec(30, [], 30, 1),
               {"success": False, "error": "HTTP 500: boom", "itl_ms": []}]
    m = bs.summarize(records, 2.0, max_tokens=3)
    assert (m["completed"], m["failed"], m["first_error"], m["ended_early"]) == (3, 1, "HTTP 500: boom", 2)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (30, 6)
    assert (m["request_throughput"], m["output_throughput"], m["total_token_throughput"]) == (1.5, 3.0, 18.0)
    assert (m["mean_ttft_ms"], m["median_ttft_ms"], m["p99_ttft_ms"]) == pytest.approx((20, 20, 29.8))
    assert (m["mean_itl_ms"], m["median_itl_ms"]) == pytest.approx((7 / 3, 2))  # every gap of every request
    # numpy's std (the population's, as vLLM's)
    assert (m["std_ttft_ms"], m["std_itl_ms"]) == pytest.approx((statistics.pstdev([10, 20, 30]),
                                                                statistics.pstdev([1, 2, 4])))
    assert (m["std_tpot_ms"], m["std_e2e_ms"]) == pytest.approx((statistics.pstdev([1.5, 4]),
                                                                statistics.pstdev([13, 24, 30])))
    assert (m["mean_tpot_ms"], m["p99_tpot_ms"]) == pytest.approx((2.75, 3.975))  # (13-10)/2, (24-20)/1
    assert m["mean_e2e_ms"] == pytest.approx(67 / 3)


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("flags, says", [
    (["--num-prompts", "0"], "--num-prompts must be a positive integer"),
    (["--request-rate", "0"], "--request-rate must be a positive number"),
    (["--max-concurrency", "2,x"], "--max-concurrency must be a positive integer or a comma list"),
    (["--max-concurrency", "0"], "--max-concurrency must be a positive integer or a comma list"),
    (["--base-url", "ftp://host/v1"], "--base-url must be http://HOST:PORT/v1"),
    (["--base-url", "http://127.0.0.1:1/v1", "--weights", "x", "--quantize", "int8"],
     "--weights, --quantize set the in-process server; with --base-url"),
    (["--base-url", "http://127.0.0.1:{port}/v1"], "cannot reach the server at http://127.0.0.1:{port}/v1"),
    (["--weights", "{saved}", "--device", "cpu", "--input-len", "30", "--output-len", "3"],
     "--input-len 30 \\+ --output-len 3 > the model's context \\(32\\)"),
    (["--weights", "{saved}", "--device", "cpu", "--max-model-len", "16", "--input-len", "14", "--output-len", "3"],
     "--input-len 14 \\+ --output-len 3 > --max-model-len's context \\(16\\)"),
    (["--weights", "{saved}", "--device", "cpu", "--max-model-len", "-1", "--kv-cache-pages", "1", "--input-len",
      "15", "--output-len", "3"], "--input-len 15 \\+ --output-len 3 > --max-model-len's context \\(17\\)"),
    (["--dtype", "fp64", "--weights", "{saved}"], "--dtype 'fp64': serve takes one of"),
    (["--scoring", "--prompts-per-request", "0"], "--prompts-per-request must be a positive integer, got 0"),
    (["--scoring", "--output-len", "-1"], "--output-len must be a non-negative integer with --scoring, got -1"),
    (["--output-len", "0"], "--output-len must be a positive integer, got 0"),
    (["--scoring", "--ignore-eos"], "--ignore-eos is the generation load's: --scoring sends"),
    (["--scoring", "--dataset", "x.jsonl"], "--dataset is the generation load's: --scoring sends"),
    (["--scoring", "--endpoint", "/v1/chat/completions"], "--endpoint /v1/chat/completions is the generation load's"),
    (["--weights", "{saved}", "--device", "cpu", "--endpoint", "/v1/chat/completions"],
     "--endpoint /v1/chat/completions: the served model has no chat format"),
    (["--prompts-per-request", "4"], "--prompts-per-request is --scoring's"),
    (["--runner", "pooling", "--weights", "nowhere"], "--runner pooling serves embeddings and scores, no text"),
    (["--base-url", "http://127.0.0.1:1/v1", "--random-loras", "2"],
     "--random-loras writes adapters for the in-process server: with --base-url name the server's own"),
    (["--base-url", "http://127.0.0.1:1/v1", "--lora-modules", "a=/x"],
     "--lora-modules 'a=/x': with --base-url give the adapters' names alone"),
    (["--lora-rank", "8"], "--lora-rank is the rank of --random-loras' adapters"),
    (["--random-loras", "0"], "--random-loras must be a positive integer, got 0"),
    (["--random-loras", "2", "--enable-lora", "--lora-modules", "a=b"], "--random-loras serves adapters of its own"),
    (["--scoring", "--weights", "{saved}", "--device", "cpu", "--input-len", "32", "--output-len", "1"],
     "--input-len 32 \\+ --output-len 1 > the model's context \\(32\\)"),
])
def test_bad_flags_are_named(saved, capsys, flags, says):
    port = closed_port()
    flags = [f.format(port=port, saved=saved) for f in flags]
    assert main(["bench", "serve", *flags]) == 2
    assert re.search(says.format(port=port), capsys.readouterr().err)


def test_bench_serves_flags_are_refused_by_the_other_benches(capsys):
    assert main(["bench", "decode", "--model", "gpt2-small"]) == 2
    assert "--model: bench serve's flags, not bench decode's (--models names" in capsys.readouterr().err


def test_a_flag_serve_gains_reaches_the_in_process_server(monkeypatch):
    real = serve.add_cli

    def more(sub):
        real(sub)
        p = getattr(sub, "choices", {}).get("serve") or sub.add_parser("serve")  # (bench's stand-in: itself)
        p.add_argument("--max-widgets", type=int, default=1)

    monkeypatch.setattr(serve, "add_cli", more)
    args = build_parser(["bench"]).parse_args(["bench", "serve", "--max-widgets", "7", "--weights", "w"])
    ns = bs.server_args(args)
    assert (ns.max_widgets, ns.weights, ns.port, ns.dtype, ns.seed) == (7, "w", 0, "auto", 1337)


@pytest.mark.parametrize("spec,text,valid", [
    ({"choice": ["a", "b"]}, "b", True), ({"choice": ["a", "b"]}, "c", False), ({"regex": "[0-9]+"}, "12", True),
    ({"regex": "[0-9]+"}, "12a", False), ({"json_object": True}, '{"x": 1}', True), ({"json_object": True}, "[1]", False),
    ({"json": {"type": "object", "required": ["a"]}}, '{"a": "\x04"}', True),
    ({"json": '{"type": "object", "required": ["a"]}'}, '{"b": 1}', False), ({"json": {}}, '{"a": ', False),
    ({"grammar": "root ::= \"x\""}, "x", None)])
def test_structured_answers_are_checked_apart_from_the_server(spec, text, valid):
    if isinstance(spec.get("json"), (dict, str)) and "required" in str(spec["json"]):
        pytest.importorskip("jsonschema")
    assert bs.structured_valid(spec, text) is valid


def test_gpu_session_serve_stage_runs_each_load_into_its_own_files(tmp_path):
    """`bash bench/gpu_session.sh serve` makes GPT-2 124M's shape with random weights, then runs `bench serve` once
    a server setting (one request at a time, batched, batched over 4 random LoRA adapters, batched under a JSON
    schema, paged, graphs, prefix
    caching, n-gram speculation; lm-eval's scoring load alone and batched), each labelled, each parsed by the
    bench's own parser; `all` does not run it.
    Python is a stand-in."""
    from session_stub import run_gpu_session
    from tritongpt.cli import build_parser

    runs, work, stdout = run_gpu_session(tmp_path, "serve", SERVE_SECONDS="30")
    assert "get_config('gpt2-small')" in runs[-11][1] and f"{work}/gpt2-random.safetensors" in runs[-11][1]
    loads = [c[2:] for c in runs if c[:4] == ["-m", "tritongpt.cli", "bench", "serve"]]
    labels = [c[c.index("--label") + 1] for c in loads]
    assert labels == ["mb1", "mb32", "mb32-lora4", "mb32-json", "mb32-paged", "mb32-graphs", "mb32-prefix", "mb32-ngram",
                      "scoring-mb1", "scoring-mb32"]
    by = {label: build_parser().parse_args(argv) for label, argv in zip(labels, loads)}
    for label, args in by.items():
        scoring = label.startswith("scoring")
        assert (args.weights, args.num_prompts, args.out, args.scoring) == (
            f"{work}/gpt2-random.safetensors", 32 if scoring else 64, f"{work}/results-serve", scoring)
    assert by["mb32-lora4"].max_batch == 32 and (by["mb32-lora4"].random_loras, by["mb32-lora4"].lora_rank) == (4, None)
    spec = by["mb32-json"].structured_outputs
    assert spec.startswith("@") and json.loads(open(spec[1:]).read())["json"]["required"] == ["name", "age"]
    assert not any(args.structured_outputs for label, args in by.items() if label != "mb32-json")
    assert not any(args.random_loras for label, args in by.items() if label != "mb32-lora4")
    assert by["mb1"].max_batch == 1 and by["mb32-paged"].kv_cache_pages == 2048 and by["mb32-graphs"].cuda_graphs
    assert by["mb32-prefix"].enable_prefix_caching and "== tritongpt bench serve" in stdout
    assert by["scoring-mb1"].max_batch == 1 and by["scoring-mb32"].max_batch == 32
    assert serve.speculative_config(by["mb32-ngram"].speculative_config, 32) == {"prompt_lookup": 2,
                                                                                 "num_draft_tokens": 8}
    assert by["scoring-mb32"].prompts_per_request == 8 and by["scoring-mb32"].max_concurrency == "4"


def test_structured_outputs_go_with_every_request_and_the_results_say_so(saved, tmp_path, capsys):
    """--structured-outputs sends vLLM's object with every request (the warm-up's too): each answer is one of the
    choices, ended by the grammar (finish_reason stop; at most 3 tokens and the end token); the results record the object; refusals by flag."""
    pytest.importorskip("xgrammar")
    spec = tmp_path / "spec.json"
    spec.write_text('{"choice": ["yes", "no"]}')
    assert bench("--weights", str(saved), "--device", "cpu", "--num-prompts", "3", "--input-len", "4",
                 "--output-len", "8", "--out", str(tmp_path), "--structured-outputs", "@" + str(spec)) == 0
    result = json.loads(only_file(tmp_path, "serve.json").read_text())
    assert result["settings"]["structured_outputs"] == {"choice": ["yes", "no"]}
    (run,) = result["runs"]
    assert run["metrics"]["failed"] == 0
    assert all(r["finish_reason"] == "stop" and r["output_tokens"] <= 4 for r in run["requests"]), run["requests"]
    assert all(r["text"] in ("yes", "no") and r["valid"] for r in run["requests"])
    assert run["metrics"]["structured_valid"] == "3/3"
    assert "| valid structured answers (of those the grammar ended) | 3/3 |" in capsys.readouterr().out
    assert '{"choice": ["yes", "no"]}' in only_file(tmp_path, "serve.md").read_text()
    for flags, says in ((["--ignore-eos"], "not with --ignore-eos"), (["--scoring"], "--structured-outputs is the "
                        "generation load's"), ([], "exactly one of")):
        extra = '{"regex": "a", "choice": ["b"]}' if not flags else '{"regex": "a"}'
        assert bench("--weights", str(saved), "--device", "cpu", "--structured-outputs", extra, *flags) == 2
        assert says in capsys.readouterr().err
