"""`tritongpt run-batch`: vLLM's offline batch runner (`vllm run-batch`, vllm/entrypoints/openai/run_batch.py) over
OpenAI's Batch API file format.

    tritongpt run-batch -i requests.jsonl -o results.jsonl --weights runs/sft

Each line of -i is one request, {"custom_id", "method": "POST", "url", "body"}. It goes to serve's own server,
started in this process on a free loopback port (make_server: the same checks, the same responses, byte for byte),
from 2 * --max-batch threads at once, so that the engine batches them as it batches a server's clients (vLLM's
run-batch keeps 2 * max_num_seqs requests in flight, the next submitted as one ends). -o gets a line a request, in
the input's order, vLLM's BatchRequestOutput: {"id": "vllm-<hex>", "custom_id", "response": {"status_code",
"request_id": "vllm-batch-<hex>", "body"}, "error"}: the endpoint's JSON as body and a null error, or for a request
it refuses its status, a null body and its error object as error (serve's: its "code" OpenAI's string or null, where
vLLM's is the status again); a request this runner refuses (an url it does not take, stream true) a 400 with vLLM's
message as error.

Where it differs from vLLM's runner, and why:
- /v1/completions is taken too: serve answers it and OpenAI's Batch API takes it (vLLM's runner takes chat,
  embeddings, score and rerank only).
- The file is checked whole before the model loads: a line that is not JSON, lacks a field or has one of another
  type, a method other than POST, or a custom_id an earlier line has (the Batch API's rule, which vLLM's runner does
  not check) is an error naming its line (exit 2), where vLLM's stops midway with pydantic's traceback.
- A body's fields are checked by the endpoint, request by request: a refused one is that line's error, where vLLM's
  runner validates every body as it reads the file and stops at the first bad one.
- A url the runner does not serve (the generation ones with --runner pooling, the pooling ones without) gets the
  server's own 404 and error object (vLLM's: a 400 saying "The model does not support ... API").
- "-" is stdin (-i) or stdout (-o); http(s) URLs, which vLLM's runner GETs and PUTs, are refused: no network here.
- -o is written to a temporary file renamed into place at the end (never half a file under its name), and an
  existing one is refused unless --overwrite (a symlink: its target written, as vLLM's open() writes it); a folder
  it cannot be written in is said before the model loads.
- The input is held in memory whole (vLLM's runner streams it); a result waits there for the lines before it.
- A body past serve's MAX_BODY is its line's 413, as the server answers it (vLLM's has no limit); a request the
  server leaves unanswered stops the run with a RuntimeError (vLLM's: that line's 400 with the exception's text).
"""
import http.client
import itertools
import json
import os
import secrets
import socket
import sys
import threading
import time
import uuid
from argparse import Namespace
from pathlib import Path

from tritongpt.cli import command_help
from tritongpt.errors import UserError, note, read_text_file
from tritongpt.train.pooling import EMBEDDINGS, RERANK_PATHS, SCORE_PATHS

FIELDS = ("custom_id", "method", "url", "body")  # a line's (OpenAI's batch input)
# the urls vLLM's runner takes that serve answers (the pooling ones with --runner pooling), and /v1/completions
URLS = ("/v1/chat/completions", "/v1/completions", EMBEDDINGS) + SCORE_PATHS + RERANK_PATHS
STREAM_REFUSED = "Request must not be sent in stream mode"  # (vLLM's words, as its other refusals below)


def is_url(name: str) -> bool:
    return name.startswith(("http://", "https://"))


def read_requests(name: str) -> list:
    """(where, request) pairs of -i (a file, or "-": stdin), every line checked: a JSON object of FIELDS alone, a
    string custom_id no earlier line has, method POST, a string url, an object body; else a UserError naming the
    line. (The url and the body are the request's own: a wrong one is its line's error in -o.)"""
    from tritongpt.train.sft import jsonl_records

    if is_url(name):
        raise UserError(f"-i {name}: a URL (vLLM's run-batch GETs one); this command reads no network: download the "
                        "file and pass its path")
    if name == "-":
        try:
            text, name = sys.stdin.buffer.read().decode("utf-8"), "stdin"
        except UnicodeDecodeError as e:
            raise UserError(f"-i -: stdin is not UTF-8 text (byte {e.start}: {e.reason})") from None
    else:
        text = read_text_file(name)
    requests = jsonl_records(text.removeprefix("\ufeff"), name)  # (a byte-order mark, as Windows editors write)
    if not requests:
        raise UserError(f"{name}: no requests (every line is blank)")
    takes, seen = f"a line takes {', '.join(FIELDS)}", {}
    for where, r in requests:
        if not isinstance(r, dict):
            raise UserError(f"{where}: expected a JSON object ({takes}), got {type(r).__name__}")
        for key in r:
            if key not in FIELDS:
                raise UserError(f"{where}: unknown field '{key}' ({takes})")
        for key, kind, what in (("custom_id", str, "a string"), ("method", str, "a string"), ("url", str, "a string"),
                                ("body", dict, "a JSON object")):
            if key not in r:
                raise UserError(f"{where}: missing field '{key}' ({takes})")
            if not isinstance(r[key], kind):
                raise UserError(f"{where}: '{key}' must be {what}, got {json.dumps(r[key])}"[:300])
        if r["method"] != "POST":
            raise UserError(f"{where}: 'method' must be \"POST\" (the Batch API's only one), got {r['method']!r}")
        if r["custom_id"] in seen:
            raise UserError(f"{where}: 'custom_id' {r['custom_id']!r} is {seen[r['custom_id']]}'s too: each "
                            "request's must be unique (they match the results to the requests)")
        seen[r["custom_id"]] = where.split(": ")[-1]
    return requests


def output_path(args) -> Path | None:
    """-o as a path to write (None: "-", stdout), checked before the model loads."""
    out = args.output_file
    if out == "-":
        if args.overwrite:
            raise UserError("--overwrite replaces an existing -o file; -o - writes to stdout")
        return None
    if is_url(out):
        raise UserError(f"-o {out}: a URL (vLLM's run-batch PUTs one); this command writes no network: write a file "
                        "and upload it")
    path = Path(out)
    if path.is_symlink():  # its target written, the link kept (the shell's > and vLLM's open(), not a file beside it)
        try:
            path = path.resolve(strict=False)
        except (OSError, RuntimeError) as e:  # (a loop of links)
            raise UserError(f"-o {out}: a symlink that leads nowhere ({e})") from None
    if path.is_dir():
        raise UserError(f"-o {out} is a folder: name the .jsonl file to write")
    if out.endswith(("/", os.sep)):  # (Path drops the slash: a file named the folder would be written)
        raise UserError(f"-o {out}: a folder's name: name the .jsonl file to write")
    if not path.parent.is_dir():
        raise UserError(f"-o {out}: the folder {path.parent} does not exist")
    if path.exists() and not path.is_file():  # (the rename at the end would replace the device or pipe itself)
        raise UserError(f"-o {out} is not a regular file (a device, a pipe): name a file, or - for stdout")
    if path.exists() and not args.overwrite:
        raise UserError(f"-o {out} already exists: pass --overwrite to replace it, or another -o")
    # the temporary file write_lines renames into place, made and removed now: a folder it cannot be written in
    # (read-only, not ours) is said before the model loads, not after every request ran
    tmp = temp_path(path)
    try:
        open(tmp, "w").close()
    except OSError as e:
        raise UserError(f"-o {out}: cannot write in the folder {path.parent} ({e.strerror or e})") from None
    finally:  # (a Ctrl-C between the two too: no stray file)
        tmp.unlink(missing_ok=True)
    return path


class Client:
    """The in-process server's address and key, and the connections open to it (a request each). hang_up() (an
    interrupt, an error midway) shuts those down and refuses new ones: the threads waiting on them return at once,
    and the server, its clients gone, stops drawing for them (with the engine or --max-batch 1 alike)."""

    def __init__(self, port: int, key: str):
        self.port, self.key = port, key
        self.lock, self.open, self.stopped = threading.Lock(), set(), False

    def connect(self) -> http.client.HTTPConnection:
        with self.lock:  # (connected under the lock: hang_up() never misses one that is connecting)
            if self.stopped:
                raise ConnectionAbortedError("run-batch is stopping: no new requests")
            conn = http.client.HTTPConnection("127.0.0.1", self.port)
            conn.connect()
            self.open.add(conn)
            return conn

    def release(self, conn):
        with self.lock:
            self.open.discard(conn)
        conn.close()

    def hang_up(self):
        with self.lock:
            self.stopped = True
            for conn in self.open:  # (shut down, not closed: the thread using it closes it, in release)
                # no socket: its reply being read (serve's HTTP/1.0 closes: http.client gave the reply the socket,
                # and that reply is whole on its way)
                if conn.sock is None:
                    continue
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:  # (the server closed it first)
                    pass


def post(client: Client, url: str, body: dict) -> tuple:
    """(status, JSON reply) of body posted to the in-process server."""
    from tritongpt.train.serve import APIError, check_body_length

    data = json.dumps(body).encode("utf-8")
    try:  # (the server refuses a body past its limit unread and hangs up: sent, it would end in a reset connection)
        check_body_length(len(data))
    except APIError as e:
        return e.status, e.body()
    conn = client.connect()
    try:
        conn.request("POST", url, data, {"Content-Type": "application/json",
                                         "Authorization": f"Bearer {client.key}"})
        reply = conn.getresponse()
        return reply.status, json.loads(reply.read().decode("utf-8"))
    finally:
        client.release(conn)


def answer(client: Client, request: dict) -> dict:
    """A request's output line (vLLM's BatchRequestOutput): the server's answer, or this runner's refusal."""
    url, body = request["url"], request["body"]
    if url not in URLS:
        status, reply = 400, f"URL {url} was used. Supported endpoints: {', '.join(URLS)}."
    elif body.get("stream") is True:  # (another value is the endpoint's to refuse)
        status, reply = 400, STREAM_REFUSED
    else:
        try:
            status, reply = post(client, url, body)
        except (OSError, http.client.HTTPException, ValueError) as e:
            # serve answers every request it reads with JSON, its refusals and its own faults (500s) too: none, or
            # another, is this program's fault, not the file's (cli reads an OSError as a path's: exit 2)
            raise RuntimeError(f"run-batch's own server (127.0.0.1:{client.port}) gave no JSON answer to "
                               f"{request['custom_id']!r} ({type(e).__name__}: {e})") from e
    ok = status == 200
    return {"id": f"vllm-{uuid.uuid4().hex}", "custom_id": request["custom_id"],
            "response": {"status_code": status, "request_id": f"vllm-batch-{uuid.uuid4().hex}",
                         "body": reply if ok else None},
            "error": None if ok else reply}


def answers(client: Client, requests: list, workers: int, bar):
    """Each request's output line (answer's), in the input's order, `workers` requests in flight at once and no more
    submitted (vLLM's runner holds 2 * max_num_seqs requests at a time by a semaphore, reading on as one ends)."""
    from concurrent.futures import ThreadPoolExecutor
    from queue import SimpleQueue

    # the requests as they end, put here by the thread that ends each: the loop waits on this queue (a C one, no
    # lock of the futures'), not concurrent.futures.wait, whose loop taking each future's lock a Ctrl-C can stop
    # halfway: a lock left held, its future's thread could never end and the pool's shutdown below waited for ever
    pool = ThreadPoolExecutor(workers, thread_name_prefix="run-batch")
    ended, todo, flight, done, given = SimpleQueue(), iter(enumerate(requests)), {}, {}, 0

    def submit(i, r):
        fut = pool.submit(answer, client, r)
        flight[fut] = i
        fut.add_done_callback(ended.put)

    try:
        for i, r in itertools.islice(todo, workers):
            submit(i, r)
        while flight:
            fut = ended.get()
            done[flight.pop(fut)] = fut.result()
            bar.update()
            for i, r in itertools.islice(todo, 1):
                submit(i, r)
            while given in done:  # (the finished ones held until those before them end: vLLM's ordered writer)
                yield done.pop(given)
                given += 1
    finally:  # (an error or Ctrl-C: the requests in flight hung up, their threads joined, the rest never sent)
        client.hang_up()
        pool.shutdown(wait=True, cancel_futures=True)


def temp_path(path: Path) -> Path:
    """Where write_lines writes path's lines before renaming it path: beside it (a rename within one folder)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_lines(path: Path | None, lines):
    """lines to stdout (path None), or to a temporary file renamed path once all are written: a reader never sees
    half the results under path, and an error midway leaves an earlier file as it was."""
    if path is None:
        for text in lines:
            sys.stdout.write(text)
        sys.stdout.flush()
        return
    tmp = temp_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for text in lines:
                f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def cmd_run_batch(args):
    from tqdm import tqdm

    from tritongpt.bench.serve import start_server
    from tritongpt.train.serve import check_server_args, lora_modules

    check_server_args(args)  # (make_server checks them again, but only after the whole input is read)
    # --enable-lora alone is serve's with $VLLM_ALLOW_RUNTIME_LORA_UPDATING (adapters loaded through POST
    # /v1/load_lora_adapter, which no line reaches): refused as offline commands refuse it
    lora_modules(args, None)
    requests = [r for _, r in read_requests(args.input_file)]
    path = output_path(args)
    # serve's server on a free loopback port, behind a key of its own: no other local client reaches it meanwhile
    key = secrets.token_urlsafe(32)
    # (polled every 50 ms, not socketserver's 500: its shutdown, at the end or on Ctrl-C, waits for the next poll)
    server = start_server(Namespace(**{**vars(args), "host": "127.0.0.1", "port": 0, "api_key": key}), 0.05)
    ok = prompt_tokens = completion_tokens = 0

    def counted(outs):
        nonlocal ok, prompt_tokens, completion_tokens
        for out in outs:
            if out["error"] is None:
                ok += 1
                usage = out["response"]["body"].get("usage") or {}
                prompt_tokens += usage.get("prompt_tokens") or 0
                completion_tokens += usage.get("completion_tokens") or 0
            yield json.dumps(out, ensure_ascii=False) + "\n"

    t0 = time.perf_counter()
    # stderr a log file, not a terminal: a frame every 30 s, not tqdm's every 0.1 s (its carriage returns do not
    # overwrite one another there: a long run would leave thousands)
    frames = {} if sys.stderr.isatty() else {"mininterval": 30, "maxinterval": 30}
    try:
        with tqdm(total=len(requests), desc="run-batch", unit="req", file=sys.stderr, leave=False, **frames) as bar:
            outs = answers(Client(server.server_address[1], key), requests, 2 * args.max_batch, bar)
            try:
                write_lines(path, counted(outs))
            finally:  # (Ctrl-C while a line is written: the requests in flight hung up now, not when collected)
                outs.close()
    finally:
        server.shutdown()
        server.server_close()  # (the engine stopped: a request still in flight ends)
    seconds = time.perf_counter() - t0
    # (throughput in the tokens the runner makes: drawn ones; a pooling runner's, the inputs it reads)
    kind = "completion" if args.runner == "generate" else "prompt"
    rate = (completion_tokens if kind == "completion" else prompt_tokens) / seconds
    batch = f" (--max-batch {args.max_batch})" if args.runner == "generate" else ""  # (pooling runs no engine)
    note(f"{len(requests)} requests ({ok} ok, {len(requests) - ok} failed) in {seconds:.2f} s: {prompt_tokens} prompt "
         f"and {completion_tokens} completion tokens, {rate:.1f} {kind} tokens/s{batch}; "
         f"written to {'stdout' if path is None else path}")
    return 0


def add_cli(sub):
    from tritongpt.train.serve import add_server_args

    p = sub.add_parser("run-batch", help=command_help("run-batch"))
    p.add_argument("-i", "--input-file", required=True, metavar="FILE",
                   help="OpenAI's batch input: a .jsonl file of one request a line, {\"custom_id\": ID, \"method\": "
                        "\"POST\", \"url\": \"/v1/chat/completions\", \"body\": {...}} (urls: /v1/chat/completions, "
                        "/v1/completions; with --runner pooling /v1/embeddings, /score, /rerank); -: stdin")
    p.add_argument("-o", "--output-file", required=True, metavar="FILE",
                   help="the results, a line a request in the input's order (vLLM's run-batch output: custom_id, "
                        "response {status_code, request_id, body}, error); -: stdout")
    p.add_argument("--overwrite", action="store_true", help="replace -o if it exists")
    add_server_args(p)
    p.set_defaults(func=cmd_run_batch, seed=1337)  # (serve's: a random model's weights)
