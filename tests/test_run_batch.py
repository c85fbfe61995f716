"""`tritongpt run-batch` (train/run_batch.py): a .jsonl file of OpenAI Batch API requests through serve's own
server in process. Each line's body is what a server started with the same flags answers the same request (its ids
and timestamps aside), in the input's order, wrapped as vLLM's run-batch wraps it; a request refused gets its status
and error; a bad file is an error naming its line before any model loads."""
import io
import json
import os
import re

import pytest

from test_serve import call, start, tiny_run
from tritongpt.cli import main
from tritongpt.train.run_batch import STREAM_REFUSED

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = {"max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batch") / "run"
    tiny_run(folder, "chat", loud=True)
    return folder


def write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def line(custom_id, url, body):
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def run_batch(folder, requests, out, *flags):
    assert main(["run-batch", "-i", str(requests), "-o", str(out), "--weights", str(folder), "--device", "cpu",
                 *flags]) == 0
    return [json.loads(x) for x in out.read_text().splitlines()]


def served_bodies(folder, requests, *flags) -> list:
    """(status, reply) of each request posted to a server started with flags."""
    server = start(folder, *flags)
    server.RequestHandlerClass.log_message = lambda *a: None
    try:
        return [call(server, r["url"], r["body"]) for r in requests]
    finally:
        server.shutdown()
        server.server_close()


def without_ids(body):
    return {k: v for k, v in body.items() if k not in ("id", "created")}


def check_wrapping(out, requests):
    """vLLM's BatchRequestOutput, a line a request in the input's order."""
    assert [o["custom_id"] for o in out] == [r["custom_id"] for r in requests]
    for o in out:
        assert list(o) == ["id", "custom_id", "response", "error"] and re.fullmatch(r"vllm-[0-9a-f]{32}", o["id"])
        assert list(o["response"]) == ["status_code", "request_id", "body"]
        assert re.fullmatch(r"vllm-batch-[0-9a-f]{32}", o["response"]["request_id"])
    assert len({o["id"] for o in out}) == len(out)


def test_lines_get_the_servers_own_answers_in_order(folder, tmp_path, capsys):
    """Chat and completion lines (the first the longest, so that it ends last) answered as the server answers them;
    refusals: a bad field (the server's 400 and error object), the pooling runner's url (its 404), an url vLLM's
    runner does not take and stream (vLLM's 400s and words)."""
    chat = {"messages": [{"role": "user", "content": "Hello there!"}]}
    requests = [line("long", "/v1/completions", {"prompt": "the cat", "max_tokens": 16, "temperature": 0}),
                line("chat", "/v1/chat/completions", {**chat, **GREEDY}),
                line("two", "/v1/completions", {"prompt": ["a dog", "the bird"], **GREEDY}),
                line("seeded", "/v1/chat/completions", {**chat, "max_tokens": 4, "seed": 3, "n": 2}),
                line("hot", "/v1/completions", {"prompt": "a", "temperature": 7}),
                line("embed", "/v1/embeddings", {"input": "a"}),
                line("ids", "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 1, "temperature": 0})]
    odd = [line("responses", "/v1/responses", {"input": "a"}),
           line("stream", "/v1/completions", {"prompt": "a", "stream": True})]
    out = run_batch(folder, write(tmp_path / "in.jsonl", requests + odd), tmp_path / "out.jsonl")
    check_wrapping(out, requests + odd)
    served = served_bodies(folder, requests)
    for o, (status, reply), r in zip(out, served, requests):
        assert o["response"]["status_code"] == status, r["custom_id"]
        if status == 200:
            assert o["error"] is None and without_ids(o["response"]["body"]) == without_ids(reply), r["custom_id"]
        else:
            assert o["response"]["body"] is None and o["error"] == reply, r["custom_id"]
    assert [o["response"]["status_code"] for o in out] == [200, 200, 200, 200, 400, 404, 200, 400, 400]
    assert out[4]["error"]["error"]["param"] == "temperature"
    assert out[7]["error"].startswith("URL /v1/responses was used. Supported endpoints: /v1/chat/completions, ")
    assert out[8]["error"] == STREAM_REFUSED
    assert out[0]["response"]["body"]["usage"]["completion_tokens"] > 1  # (not an empty answer matching another)
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    assert summary.startswith("note: 9 requests (5 ok, 4 failed) in ") and "written to" in summary
    usage = [o["response"]["body"]["usage"] for o in out if o["error"] is None]
    tokens = re.search(r": (\d+) prompt and (\d+) completion tokens, ", summary).groups()
    assert [int(t) for t in tokens] == [sum(u["prompt_tokens"] for u in usage),
                                        sum(u["completion_tokens"] for u in usage)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]  # (no temporary file left)


def test_pooling_urls_with_the_pooling_runner(folder, tmp_path, monkeypatch, capsys):
    """--runner pooling: embeddings, score and rerank lines answered as its server answers them, a chat line its
    404; stdin to stdout ("-")."""
    requests = [line("emb", "/v1/embeddings", {"input": ["the cat", "a dog"]}),
                line("score", "/score", {"text_1": "the cat", "text_2": ["a dog", "the mat"]}),
                line("rerank", "/v1/rerank", {"query": "the cat", "documents": ["a dog", "the mat", "sang"],
                                              "top_n": 2}),
                line("chat", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})]
    text = "".join(json.dumps(r) + "\n" for r in requests)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    capsys.readouterr()
    assert main(["run-batch", "-i", "-", "-o", "-", "--weights", str(folder), "--device", "cpu", "--runner",
                 "pooling"]) == 0
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    check_wrapping(out, requests)
    served = served_bodies(folder, requests, "--runner", "pooling")
    assert [s for s, _ in served] == [o["response"]["status_code"] for o in out] == [200, 200, 200, 404]
    for o, (_, reply) in zip(out[:3], served):
        assert o["error"] is None and without_ids(o["response"]["body"]) == without_ids(reply)
    assert len(out[0]["response"]["body"]["data"]) == 2 and len(out[2]["response"]["body"]["results"]) == 2
    assert out[3]["error"] == served[3][1] and "--runner pooling" in out[3]["error"]["error"]["message"]


@pytest.mark.parametrize("lines, said", [
    (['{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}', ""], "line 1) is not valid JSON"),
    # (json.loads raises a plain ValueError for an integer past 4300 digits, RecursionError past its depth)
    (['{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"seed": ' + "9" * 5000 + "}}"],
     "line 1) is not valid JSON (Exceeds the limit (4300 digits)"),
    (["[" * 100_000 + "]" * 100_000], "line 1) is not valid JSON (nested too deep)"),
    ([line("a", "/v1/completions", {}), "", {"custom_id": "b", "method": "POST", "body": {}}],
     "record 1 (line 3): missing field 'url'"),
    ([line("a", "/v1/completions", {}), line("a", "/v1/completions", {})],
     "record 1 (line 2): 'custom_id' 'a' is record 0 (line 1)'s too"),
    ([{**line("a", "/v1/completions", {}), "method": "GET"}], "'method' must be \"POST\""),
    ([line("a", "/v1/completions", "hi")], "line 1): 'body' must be a JSON object"),
    ([{**line("a", "/v1/completions", {}), "extra": 1}], "line 1): unknown field 'extra'"),
    ([["a"]], "line 1): expected a JSON object"),
    (["", " "], "no requests"),
])
def test_a_bad_line_is_an_error_naming_it(tmp_path, capsys, lines, said):
    """Before any model loads (--weights names none here): exit 2 and the line's fault."""
    path = write(tmp_path / "in.jsonl", lines)
    assert main(["run-batch", "-i", str(path), "-o", str(tmp_path / "out.jsonl"), "--weights",
                 str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: ") and said in err, err
    assert not (tmp_path / "out.jsonl").exists()


def test_input_and_output_paths(folder, tmp_path, capsys, monkeypatch):
    """A missing -i, an -o that exists (unless --overwrite, then replaced whole), in a missing folder, or a URL: exit
    2, naming the path; a run that fails midway leaves -o as it was, and no temporary file."""
    from tritongpt.train import run_batch as runner

    requests = write(tmp_path / "in.jsonl", [line(c, "/v1/completions", {"prompt": "a", **GREEDY}) for c in "ab"])
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    for i, o, said in [(tmp_path / "none.jsonl", out, "file not found"),
                       (requests, out, "already exists: pass --overwrite"),
                       (requests, tmp_path / "no" / "out.jsonl", "does not exist"),
                       ("https://example.com/in.jsonl", out, "a URL"), (requests, "http://example.com/o", "a URL")]:
        assert main(["run-batch", "-i", str(i), "-o", str(o), "--weights", str(folder), "--device", "cpu"]) == 2
        assert said in capsys.readouterr().err
    assert out.read_text() == "old\n"
    post, posted = runner.post, []

    def failing(*a):  # (the second request posted fails)
        posted.append(1)
        if len(posted) == 2:
            raise RuntimeError("lost")
        return post(*a)

    monkeypatch.setattr(runner, "post", failing)
    with pytest.raises(RuntimeError, match="lost"):
        main(["run-batch", "-i", str(requests), "-o", str(out), "--weights", str(folder), "--device", "cpu",
              "--overwrite", "--max-batch", "1"])
    assert len(posted) == 2 and out.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]
    monkeypatch.undo()
    got = run_batch(folder, requests, out, "--overwrite")
    assert [o["custom_id"] for o in got] == ["a", "b"] and got[0]["response"]["status_code"] == 200


def test_an_output_that_cannot_be_written_is_said_before_the_model_loads(tmp_path, capsys):
    """-o in a folder no file can be made in (read-only; for root, whom modes do not stop, /sys), or a device with
    --overwrite (the rename would replace the device itself): exit 2 naming it before any model loads (--weights names
    none here), not once every request ran."""
    import os
    from pathlib import Path

    requests = write(tmp_path / "in.jsonl", [line("a", "/v1/completions", {"prompt": "a", **GREEDY})])
    locked = tmp_path / "read-only"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):  # (root)
        locked = Path("/sys")
        if not locked.is_dir():
            pytest.skip("running as root, and no /sys: no folder this process cannot write in")
    for out, flags, said in [(locked / "out.jsonl", [], f"-o {locked / 'out.jsonl'}: cannot write in the folder "
                                                         f"{locked} ("),
                             (Path("/dev/null"), ["--overwrite"], "-o /dev/null is not a regular file"),
                             # (not told to pass --overwrite, then refused with it)
                             (Path("/dev/null"), [], "-o /dev/null is not a regular file"),
                             # (a folder's name, not a file "new" made)
                             (f"{tmp_path / 'new'}/", [], f"-o {tmp_path / 'new'}/: a folder's name")]:
        assert main(["run-batch", "-i", str(requests), "-o", str(out), "--weights", str(tmp_path / "none"),
                     *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {said}"), err
    assert not list(locked.glob(".out.jsonl*")) and sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl",
                                                                                                    "read-only"]


def test_ctrl_c_while_the_output_is_checked_leaves_no_file(tmp_path, monkeypatch, capsys):
    """Ctrl-C just as the up-front check of -o made its temporary file: exit 130 and the file removed, not left."""
    import builtins

    from tritongpt.train import run_batch as runner

    def interrupted(name, *a, **k):  # (the file made, then the interrupt)
        builtins.open(name, *a, **k).close()
        raise KeyboardInterrupt

    requests = write(tmp_path / "in.jsonl", [line("a", "/v1/completions", {"prompt": "a", **GREEDY})])
    monkeypatch.setattr(runner, "open", interrupted, raising=False)
    assert main(["run-batch", "-i", str(requests), "-o", str(tmp_path / "out.jsonl"), "--weights",
                 str(tmp_path / "none")]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_an_output_that_is_a_symlink_is_written_through(folder, tmp_path):
    """-o a symlink (to an existing file, with --overwrite; or to none yet): its target written, the link kept, as
    the shell's > and vLLM's open() write it, not the link replaced by a file of its own beside it."""
    requests = write(tmp_path / "in.jsonl", [line("a", "/v1/completions", {"prompt": "a", **GREEDY})])
    (tmp_path / "real").mkdir()
    target, dangling = tmp_path / "real" / "out.jsonl", tmp_path / "real" / "new.jsonl"
    target.write_text("old\n")
    (tmp_path / "link.jsonl").symlink_to(target)
    (tmp_path / "dangling.jsonl").symlink_to(dangling)
    out = run_batch(folder, requests, tmp_path / "link.jsonl", "--overwrite")
    assert [o["custom_id"] for o in out] == ["a"] and out[0]["response"]["status_code"] == 200
    assert run_batch(folder, requests, tmp_path / "dangling.jsonl")[0]["custom_id"] == "a"
    assert (tmp_path / "link.jsonl").is_symlink() and (tmp_path / "dangling.jsonl").is_symlink()
    assert json.loads(target.read_text())["custom_id"] == "a" and json.loads(dangling.read_text())["custom_id"] == "a"
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["new.jsonl", "out.jsonl"]


def test_the_bar_in_a_log_is_a_few_frames(folder, tmp_path, monkeypatch, capsys):
    """stderr not a terminal (a log file): the bar drawn as it opens and then every 30 s at most, not tqdm's every
    0.1 s (its carriage returns do not overwrite one another in a file); on a terminal, tqdm's own frames."""
    import io
    import time

    from tritongpt.train import run_batch as runner

    def slow(client, url, body):  # (~0.6 s of requests, a 0.15 s each, two at a time)
        time.sleep(0.15)
        return 200, {"usage": {"prompt_tokens": 1, "completion_tokens": 1}}

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(runner, "post", slow)
    requests = write(tmp_path / "in.jsonl", [line(f"r{i}", "/v1/completions", {"prompt": "a"}) for i in range(8)])
    frames = {}
    for where, stderr in (("log", None), ("terminal", Terminal())):
        capsys.readouterr()
        if stderr is not None:
            monkeypatch.setattr("sys.stderr", stderr)
        assert len(run_batch(folder, requests, tmp_path / f"{where}.jsonl", "--max-batch", "1")) == 8
        text = capsys.readouterr().err if stderr is None else stderr.getvalue()
        assert text.strip().splitlines()[-1].split("\r")[-1].startswith("note: 8 requests (8 ok, 0 failed)"), text
        frames[where] = text.count("run-batch:")
    assert frames["log"] == 1 and frames["terminal"] >= 3, frames


def interrupted(argv, ready, settle: float, timeout: float) -> tuple:
    """argv run (stderr read on a thread) until ready(its stderr so far) (asked every 50 ms, the process alive, 120 s
    at most), then settle seconds, then SIGINT: (its exit code, the seconds from the signal to its exit, its stderr);
    the process killed if it outlives timeout."""
    import signal
    import subprocess
    import threading
    import time

    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    err = []

    def read():
        while chunk := os.read(proc.stderr.fileno(), 4096):
            err.append(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not ready(b"".join(err)):
            assert proc.poll() is None and time.monotonic() < deadline, b"".join(err).decode()
            time.sleep(0.05)
        time.sleep(settle)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=timeout)
        return rc, time.monotonic() - t0, b"".join(err).decode()
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join()


def test_ctrl_c_stops_the_run_at_once(folder, tmp_path):
    """SIGINT to the CLI mid-run, --max-batch 1, a request of 64 prompts of 120 tokens in flight (~20 s of drawing
    under the model's lock, another request waiting for it): both hung up, the server drawing for neither, the pool's
    threads joined (none left for the interpreter's exit to wait on); exit 130 ("interrupted") in about a second
    (most of it the interpreter's own exit), -o not written and no temporary file left."""
    import sys

    body = {"prompt": ["a"] * 64, "max_tokens": 120, "temperature": 0, "ignore_eos": True}
    requests = write(tmp_path / "in.jsonl", [line(f"r{i}", "/v1/completions", body) for i in range(3)])
    # `python -m tritongpt` (cli.main), then the names of the run's threads still alive
    code = ("import sys, threading; from tritongpt.cli import main; rc = main(sys.argv[1:]); print('alive:', "
            "[t.name for t in threading.enumerate() if t.name.startswith('run-batch')], file=sys.stderr); sys.exit(rc)")
    # (the bar: the model loaded, the requests about to be posted; then the first request drawing, the second waiting
    # for the model)
    rc, seconds, text = interrupted([sys.executable, "-c", code, "run-batch", "-i", str(requests), "-o",
                                     str(tmp_path / "out.jsonl"), "--weights", str(folder), "--device", "cpu",
                                     "--max-batch", "1"], lambda err: b"run-batch:" in err, 0.5, 120)
    assert rc == 130 and "interrupted\n" in text and "alive: []" in text, text
    # (~1.5 s measured on a loaded 2-core machine, 5.7 s for the test below with helpers' tests beside the suite; a
    # hang waits out the 120 s timeout)
    assert seconds < 15, f"{seconds:.1f} s from SIGINT to exit"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_a_body_past_the_servers_limit_is_its_lines_413(folder, tmp_path):
    """A body larger than serve takes (MAX_BODY): that line's 413 and the server's error object, the others
    answered; not the whole run lost to the reset connection the server's refusal of an unread body makes."""
    from tritongpt.train.serve import MAX_BODY

    big = line("big", "/v1/completions", {"prompt": "a " * (MAX_BODY // 2 + 1), "max_tokens": 1})
    requests = [line("a", "/v1/completions", {"prompt": "a", **GREEDY}), big,
                line("b", "/v1/completions", {"prompt": "b", **GREEDY})]
    out = run_batch(folder, write(tmp_path / "in.jsonl", requests), tmp_path / "out.jsonl")
    check_wrapping(out, requests)
    assert [o["response"]["status_code"] for o in out] == [200, 413, 200]
    assert out[1]["response"]["body"] is None and out[1]["error"]["error"]["code"] == "request_too_large"
    assert f"at most {MAX_BODY}" in out[1]["error"]["error"]["message"]


def test_a_dropped_connection_is_not_a_user_error(folder, tmp_path, monkeypatch):
    """The in-process server closing a connection unanswered is this program's fault, not the file's: an error
    saying so (a traceback, exit 1), never cli's `error: [Errno 104] ...`, exit 2 (an OSError: a path's); -o left
    unwritten."""
    from tritongpt.train import serve

    def hang_up(self, endpoint, body):
        raise ConnectionResetError("gone")  # (the handler takes it for a client that left: no answer)

    monkeypatch.setattr(serve.Handler, "generate", hang_up)
    requests = write(tmp_path / "in.jsonl", [line("a", "/v1/completions", {"prompt": "a", **GREEDY})])
    with pytest.raises(RuntimeError, match="run-batch's own server .* no JSON answer to 'a'"):
        main(["run-batch", "-i", str(requests), "-o", str(tmp_path / "out.jsonl"), "--weights", str(folder),
              "--device", "cpu"])
    assert not (tmp_path / "out.jsonl").exists()


def test_flags_the_in_process_server_cannot_use(folder, tmp_path, monkeypatch, capsys):
    """--enable-lora without --lora-modules: serve's with $VLLM_ALLOW_RUNTIME_LORA_UPDATING loads adapters through
    POST /v1/load_lora_adapter, which no line of a batch reaches: refused (exit 2) before the model loads, not a
    run that serves none."""
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "true")
    requests = write(tmp_path / "in.jsonl", [line("a", "/v1/completions", {"prompt": "a", **GREEDY})])
    assert main(["run-batch", "-i", str(requests), "-o", str(tmp_path / "out.jsonl"), "--weights", str(folder),
                 "--device", "cpu", "--enable-lora"]) == 2
    assert "--lora-modules" in capsys.readouterr().err and not (tmp_path / "out.jsonl").exists()


def test_a_paged_cache_too_small_for_the_context_is_refused_at_startup(folder, tmp_path, capsys):
    """run-batch builds serve's server: a --kv-cache-pages pool that cannot hold one row of the context (128: 32
    pages of 4) is refused (exit 2) naming the pages needed, no output written, not a run whose chat lines without
    max_tokens are all 400s; 32 pages serve such a line to the context's end."""
    hi = {"messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "ignore_eos": True}
    requests = write(tmp_path / "in.jsonl", [line("a", "/v1/chat/completions", hi)])
    flags = ["--device", "cpu", "--max-batch", "2", "--kv-page-size", "4", "--kv-cache-pages"]
    assert main(["run-batch", "-i", str(requests), "-o", str(tmp_path / "out.jsonl"), "--weights", str(folder),
                 *flags, "31"]) == 2
    assert "cannot hold one request of the model's context length (128): that needs 32 pages" in \
        capsys.readouterr().err and not (tmp_path / "out.jsonl").exists()
    body = run_batch(folder, requests, tmp_path / "out.jsonl", *flags[2:], "32")[0]["response"]["body"]
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["total_tokens"] == 128


@pytest.mark.parametrize("flags,said", [
    (["--weights", "w", "--kv-page-size", "8"], "--kv-page-size sizes the pages of --kv-cache-pages"),
    (["--weights", "w", "--max-batch", "0"], "--max-batch must be a positive integer, got 0"),
    (["--weights", "w", "--pretrained"], "--pretrained downloads published weights and --weights loads a file"),
    ([], "run-batch needs a model: pass --weights"),
    (["--weights", "w", "--served-model-name", " "], "--served-model-name is empty"),
    (["--weights", "w", "--tool-call-parser", "hermes"], "--tool-call-parser is used only with --enable-auto-tool"),
    # (a file's name; a bare word may name one of the tokenizer's templates, looked up once it is loaded)
    (["--weights", "w", "--chat-template", "none.jinja"], "--chat-template 'none.jinja': no such file, and not a "
                                                          "template"),
    (["--weights", "w", "--speculative-config", "{}"], "--speculative-config: method None is not served"),
    (["--weights", "w", "--override-generation-config", '{"x": 1}'], "--override-generation-config: 'x' is not"),
    (["--weights", "w", "--enable-lora"], "--enable-lora: pass the adapters too, --lora-modules NAME=PATH"),
    (["--weights", "w", "--max-model-len", "32x"], "--max-model-len must be a positive integer of tokens"),
])
def test_server_flags_are_checked_before_the_input_is_read(tmp_path, capsys, flags, said):
    """serve's checks of its flags come before the input file is read (here: none there), not after a long file
    was read through."""
    assert main(["run-batch", "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"), *flags]) == 2
    err = capsys.readouterr().err
    assert said in err and "in.jsonl" not in err
    assert list(tmp_path.iterdir()) == []


def test_hanging_up_while_a_reply_is_read(monkeypatch):
    """hang_up (Ctrl-C, an error midway) while a request's reply is read: serve answers HTTP/1.0, so http.client has
    closed that connection (its socket handed to the reply, conn.sock None); that request still ends with its reply,
    the others in flight shut down, and no AttributeError in place of the interrupt (exit 1, not 130)."""
    import http.client
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from tritongpt.train import run_batch as runner

    class Fake(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"ok": 1}')

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Fake)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        client = runner.Client(server.server_address[1], "key")
        waiting = client.connect()  # (another request in flight, its reply not come)
        read = http.client.HTTPResponse.read
        monkeypatch.setattr(http.client.HTTPResponse, "read", lambda self, *a: client.hang_up() or read(self, *a))
        assert runner.post(client, "/v1/completions", {"prompt": "a"}) == (200, {"ok": 1})
        waiting.sock.settimeout(5)
        assert waiting.sock.recv(1) == b""  # (shut down: the thread waiting on it returns at once)
        client.release(waiting)
    finally:
        server.shutdown()
        server.server_close()


def test_the_server_is_keyed_bounded_and_stopped(folder, tmp_path, monkeypatch):
    """The in-process server: behind a key of its own (not $TRITONGPT_API_KEY's; a request without it a 401),
    2 * --max-batch requests in flight at once, and after a run, whole or failed, its socket closed, its engine
    stopped."""
    import socket
    import threading
    import time
    import urllib.error
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from tritongpt.bench import serve as bench_serve
    from tritongpt.train import run_batch as runner

    servers, start = [], bench_serve.start_server
    monkeypatch.setattr(bench_serve, "start_server", lambda ns, *a: servers.append(start(ns, *a)) or servers[-1])
    monkeypatch.setenv("TRITONGPT_API_KEY", "from-the-environment")
    post, lock, flight, fail = runner.post, threading.Lock(), {"now": 0, "most": 0, "calls": 0}, [False]

    def counted(client, url, body):
        with lock:
            flight["now"] += 1
            flight["most"] = max(flight["most"], flight["now"])
            flight["calls"] += 1
            if fail[0] and flight["calls"] == 3:
                raise RuntimeError("planted")
            first = flight["calls"] == 1 and not fail[0]
        if first:  # (a request without the key, while the run's server is up)
            try:
                urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{client.port}{url}",
                                                              json.dumps(body).encode(),
                                                              {"Content-Type": "application/json"}), timeout=30)
            except urllib.error.HTTPError as e:
                flight["keyless"] = e.code
        try:
            time.sleep(0.3)  # (long enough that every worker's request is in flight at once)
            return post(client, url, body)
        finally:
            with lock:
                flight["now"] -= 1

    monkeypatch.setattr(runner, "post", counted)
    # the requests handed to the pool and not yet answered, counted as each is handed over
    submit, queued = ThreadPoolExecutor.submit, {"futures": [], "most": 0}

    def counted_submit(pool, fn, *a, **k):
        fut = submit(pool, fn, *a, **k)
        if fn is runner.answer:
            queued["futures"].append(fut)
            queued["most"] = max(queued["most"], sum(not f.done() for f in queued["futures"]))
        return fut

    monkeypatch.setattr(ThreadPoolExecutor, "submit", counted_submit)
    requests = write(tmp_path / "in.jsonl", [line(f"r{i}", "/v1/completions", {"prompt": "a", **GREEDY})
                                             for i in range(10)])
    out = run_batch(folder, requests, tmp_path / "out.jsonl", "--max-batch", "2")
    assert [o["response"]["status_code"] for o in out] == [200] * 10 and flight["most"] == 4
    assert queued["most"] == 4  # (vLLM's semaphore: the file's other lines wait unsubmitted, not in the pool's queue)
    assert flight["keyless"] == 401
    server = servers[0]
    assert server.api_key not in (None, "from-the-environment") and len(server.api_key) >= 32
    fail[0], flight["calls"] = True, 0
    with pytest.raises(RuntimeError, match="planted"):
        main(["run-batch", "-i", str(requests), "-o", str(tmp_path / "again.jsonl"), "--weights", str(folder),
              "--device", "cpu", "--max-batch", "2"])
    # the requests in flight when it failed hung up, their threads joined (not left to the interpreter's exit)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("run-batch")]
    for server in servers:
        assert server.app.engine.closed and server.socket.fileno() == -1
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(server.server_address, timeout=5).close()


def test_a_server_error_midway_is_its_lines_500(folder, tmp_path, monkeypatch):
    """A request the server fails on (its own fault: a 500 and its error object) is that line's error; the lines
    after it are answered, the run ends (exit 0) with -o written."""
    from tritongpt.train import serve

    generate = serve.Handler.generate

    def broken(self, endpoint, body):
        if body.get("prompt") == "boom":
            raise ZeroDivisionError("planted")
        return generate(self, endpoint, body)

    monkeypatch.setattr(serve.Handler, "generate", broken)
    requests = [line(c, "/v1/completions", {"prompt": p, **GREEDY}) for c, p in (("a", "a"), ("b", "boom"), ("c", "c"))]
    out = run_batch(folder, write(tmp_path / "in.jsonl", requests), tmp_path / "out.jsonl", "--max-batch", "1")
    check_wrapping(out, requests)
    assert [o["response"]["status_code"] for o in out] == [200, 500, 200]
    assert out[1]["response"]["body"] is None and out[1]["error"]["error"]["type"] == "server_error"



def test_ctrl_c_while_waiting_for_the_requests_ends_the_run(monkeypatch):
    """Ctrl-C while the run waits for its requests, raised where a signal lands: in the queue's get, or halfway
    through a loop taking the futures' locks (concurrent.futures.wait's, as_completed's: the next lock not taken, the
    one taken never given back). The run ends at once, its threads joined: not a future's thread stuck on a lock the
    interrupted loop holds, and the pool's shutdown waiting for it for ever."""
    import queue
    import threading
    import time
    from concurrent.futures import _base

    from tritongpt.train import run_batch as runner

    def slow(client, url, body):  # (the requests still in flight when the interrupt comes)
        time.sleep(0.3)
        return 200, {}

    def interrupted_loop(self):  # the first lock taken, then the interrupt at the loop's jump back
        next(iter(self.futures))._condition.acquire()
        raise KeyboardInterrupt

    class Interrupted(queue.SimpleQueue):  # (the pool's own queue one too: its threads' gets left alone)
        def get(self, *a, **k):
            if threading.current_thread() is t:
                raise KeyboardInterrupt
            return super().get(*a, **k)

    monkeypatch.setattr(runner, "post", slow)
    monkeypatch.setattr(_base._AcquireFutures, "__enter__", interrupted_loop)
    monkeypatch.setattr(queue, "SimpleQueue", Interrupted)
    requests, out = [line(f"r{i}", "/v1/completions", {"prompt": "a"}) for i in range(4)], {}

    class Bar:
        def update(self):
            pass

    def run():
        try:
            list(runner.answers(runner.Client(1, "key"), requests, 2, Bar()))
        except KeyboardInterrupt:
            out["interrupted"] = time.monotonic()

    t0 = time.monotonic()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=20)
    assert not t.is_alive(), "interrupted while waiting for its requests: the run never ended"
    assert "interrupted" in out and out["interrupted"] - t0 < 5
    assert not [t.name for t in threading.enumerate() if t.name.startswith("run-batch")]


@pytest.mark.parametrize("command", ["run-batch", "generate"])
def test_stdout_a_pipe_its_reader_closed(folder, tmp_path, monkeypatch, capsys, command):
    """stdout a pipe whose reader left (`tritongpt run-batch -o - ... | head -1`, `tritongpt generate ... | head -1`):
    the command ends quietly with the shell's code for SIGPIPE, 141: not `error: [Errno 32] Broken pipe`, exit 2 (an
    OSError read as a path's), and stdout is /dev/null after it, so that Python's own flush at its exit does not fail
    again (exit 120)."""
    import sys

    requests = write(tmp_path / "in.jsonl", [line("a", "/v1/completions", {"prompt": "a", **GREEDY})])
    flags = {"run-batch": ["-i", str(requests), "-o", "-"],
             "generate": ["--prompt", "the cat", "--max-new-tokens", "4"]}[command]
    read, written = os.pipe()
    os.close(read)  # (the reader gone before the first line: every write fails)
    monkeypatch.setattr("sys.stdout", open(written, "w"))
    assert main([command, *flags, "--weights", str(folder), "--device", "cpu"]) == 141
    assert "error" not in capsys.readouterr().err
    sys.stdout.write("x" * 100_000)
    sys.stdout.close()


# `python -c` of the shutdown tests: the CLI with serve's draw (no engine: --max-batch 1) replaced by a loop of torch
# ops, the request's client asked whether it left after each ~0.1 s (as generate() asks after each token), or never
# ("stubborn": a forward that outlasts Server.stop_wait, set to argv[1]'s seconds)
IN_TORCH = """
import sys, torch
from tritongpt.cli import main
from tritongpt.train import serve

serve.Server.stop_wait, stubborn = float(sys.argv.pop(1)), sys.argv.pop(1) == "stubborn"

def in_torch(self, idx, budget, stop_id, generator, on_token, *a, **k):
    x = torch.rand(300, 300)
    print("in torch", file=sys.stderr, flush=True)
    for _ in range(10 ** 6):
        for _ in range(20):
            x = torch.tanh(x @ x)
        if not stubborn:
            on_token(torch.zeros(idx.shape[0], 1, dtype=torch.long))

serve.Model.generate_alone = in_torch
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command, stubborn", [("serve", False), ("run-batch", True)])
def test_ctrl_c_with_a_request_inside_torch(folder, tmp_path, command, stubborn):
    """SIGINT while the server's thread for a request is inside torch ops (a large model's forward): the server stops
    the request (its next check whether its client left) and joins its thread before Python exits: exit 130, not
    an abort (-6: the thread killed inside torch's C++ code as Python exits). A request that does not stop within
    Server.stop_wait (1 s here): said on stderr, and the process ends at once with 130 all the same, not hung, no
    file left (run-batch's -o, its temporary file)."""
    import http.client
    import sys
    import threading

    body = {"prompt": "a", "max_tokens": 100, "temperature": 0}
    flags = {"run-batch": ["-i", str(write(tmp_path / "in.jsonl", [line("a", "/v1/completions", body)])), "-o",
                           str(tmp_path / "out.jsonl")],
             "serve": ["--port", "0"]}[command]
    posted = []

    def post(port):  # (serve's client; the connection left open until the process ends)
        conn = http.client.HTTPConnection("127.0.0.1", port)
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        try:
            conn.getresponse()
        except (OSError, http.client.HTTPException):
            pass

    def ready(err):  # (serve: its request posted once it listens) a request's thread inside torch
        port = re.search(rb"at http://127\.0\.0\.1:(\d+)/v1", err)
        if port and not posted:
            threading.Thread(target=post, args=(int(port.group(1)),), daemon=True).start()
            posted.append(port)
        return b"in torch" in err
    rc, seconds, text = interrupted([sys.executable, "-c", IN_TORCH, "1", "stubborn" if stubborn else "-", command,
                                     *flags, "--weights", str(folder), "--device", "cpu", "--max-batch", "1"], ready,
                                    0.3, 60)
    assert rc == 130 and "interrupted\n" in text, text
    stopped = "note: 1 request still running 1 s after the server stopped" in text
    assert stopped == stubborn, text
    # (a request's thread that kept the process: the 60 s timeout; 5.7 s was measured from SIGINT to exit with other
    # work beside the suite)
    assert seconds < 15, f"{seconds:.1f} s from SIGINT to exit"
    # (run-batch: no -o and no temporary file left, though the process ends by os._exit: no atexit cleanup)
    assert [p.name for p in tmp_path.iterdir()] == ["in.jsonl"]


def test_a_second_ctrl_c_while_the_server_waits_for_its_requests_leaves_them_abandoned():
    """A second Ctrl-C while Server.server_close joins the requests' threads is not waited for either: it goes on
    up, and the threads still running are marked abandoned, so cli.main ends the process at once (os._exit, exit
    130 all the same) instead of Python's exit waiting on them or aborting inside torch (-6)."""
    import socket
    import threading

    from tritongpt.cli import abandoned
    from tritongpt.train import serve

    release = threading.Event()

    class Request(threading.Thread):
        def join(self, timeout=None):  # (the second Ctrl-C lands while the server waits for this request)
            raise KeyboardInterrupt

    t = Request(target=release.wait, daemon=True)
    t.start()
    server = serve.Server(("127.0.0.1", 0), serve.Handler)
    a, b = socket.socketpair()
    server.handlers[t] = a
    try:
        with pytest.raises(KeyboardInterrupt):
            server.server_close()
        assert getattr(t, "abandoned", False) and abandoned()
    finally:
        release.set()
        threading.Thread.join(t)
        a.close()
        b.close()
    assert not abandoned()
