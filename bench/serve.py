"""`tritongpt bench serve`: a load generator for OpenAI-compatible servers (ours, train/serve.py, or vLLM's, SGLang's),
measured as vLLM's benchmarks/benchmark_serving.py (`vllm bench serve`) measures one.

Every request is a streamed POST /v1/completions (temperature 0, max_tokens = --output-len, usage asked for with
stream_options.include_usage), sent at its arrival time (--request-rate R: a Poisson process, exponential gaps of mean
1/R from --seed; inf: all at once) and at most --max-concurrency at a time (a semaphore; a comma list runs the load
once per value: a sweep). Clients are threads of the standard library's http.client reading the server-sent events.

Per request, as vLLM defines them:
    TTFT  time to first token: from sending the request to the first chunk with choices (text or not: a token that
          decodes to no text yet, a byte of a character, is still a token; vLLM's async_request_openai_completions)
    ITL   inter-token latency: the gaps between successive chunks with choices, empty-text ones too (each one a gap,
          pooled over every request; vLLM's rule)
    TPOT  time per output token after the first: (E2E - TTFT) / (output tokens - 1), requests of 2 tokens or more
    E2E   end-to-end latency: from sending the request to the stream's `data: [DONE]`
Output and prompt tokens are the server's counts (the usage chunk), throughputs over the duration: from the first
request's send to the last one's end. mean / median / std / p99 in ms (numpy's std and percentile, linear, as
vLLM's: mean_ttft_ms, median_tpot_ms, std_itl_ms, p99_e2e_ms ...).

Without --base-url it starts `tritongpt serve` in this process on a free port, with the model flags serve takes
(--weights, --pretrained --model, --kernels, --quantize, ...: serve's own argument definitions), and stops it after.
Every request bears the server's API key (`Authorization: Bearer`): the in-process server's (serve's --api-key or
$TRITONGPT_API_KEY); with --base-url, --api-key or else $OPENAI_API_KEY (vLLM's benchmark's), none if neither.
"""
import argparse
import http.client
import json
import math
import os
import random
import sys
import threading
import time
import urllib.parse
from pathlib import Path

from tritongpt.errors import UserError

TIMEOUT_S = 600  # seconds a read of a stream may wait: a server generating the whole load in turn is slow, not dead
ENDPOINT = "/completions"
STATS = ("ttft", "tpot", "itl", "e2e")


# -- the server's flags ---------------------------------------------------------------------------------------------
class _Collect:
    """Stands in for serve's parser while its add_cli runs: each flag lands in `group`, less those the bench parser
    already has (bench's --dtype and --cuda-graphs, which bench serve then passes on), so that any flag serve gains
    reaches the in-process server without a line here naming it."""

    def __init__(self, group, taken):
        self.group, self.taken, self.actions = group, taken, []

    def add_parser(self, *a, **k):  # (as the subparsers object add_cli is given)
        return self

    def add_argument_group(self, *a, **k):
        return self

    def add_mutually_exclusive_group(self, *a, **k):  # (its flags still parse; serve itself checks them together)
        return self

    def add_argument(self, *flags, **kw):
        if not set(flags) & self.taken:
            if "--port" in flags:
                kw = {**kw, "default": 0, "help": "the in-process server's port (default 0: a free one)"}
            if "--api-key" in flags:
                kw = {**kw, "help": "the in-process server's --api-key (default: $TRITONGPT_API_KEY, else none); with "
                                    "--base-url, the key the requests bear (default: $OPENAI_API_KEY, vLLM's "
                                    "benchmark's, else none)"}
            self.actions.append(self.group.add_argument(*flags, **kw))

    def set_defaults(self, **kw):
        pass


def serve_parser() -> argparse.ArgumentParser:
    """`tritongpt serve`'s own parser (its defaults, its choices)."""
    from tritongpt.train import serve

    sub = argparse.ArgumentParser(prog="tritongpt").add_subparsers()
    serve.add_cli(sub)
    return sub.choices["serve"]


def add_cli(p):
    """bench serve's flags, then serve's (the in-process server's) on bench's parser p."""
    from tritongpt.train import serve

    g = p.add_argument_group("serve (with --out, --no-plots, --dtype and --cuda-graphs for the in-process server)")
    taken = {s for a in p._actions for s in a.option_strings}
    collect = _Collect(g, taken)
    g = collect  # bench serve's own flags too: every flag of the group noted, for bench's other commands to refuse
    g.add_argument("--base-url", default=None, metavar="URL",
                   help="an OpenAI-compatible server's API root, e.g. http://127.0.0.1:8000/v1, --model then naming "
                        "the served model's id (default: the first of its /v1/models) (default: start `tritongpt "
                        "serve` in this process with the model flags below)")
    g.add_argument("--num-prompts", type=int, default=64, help="requests sent (default %(default)s)")
    g.add_argument("--input-len", type=int, default=64, help="prompt tokens, cut from the embedded pydoc corpus "
                   "by the server's tokenizer (--tokenizer's with --base-url; default %(default)s)")
    g.add_argument("--output-len", type=int, default=64, help="max_tokens of every request (default %(default)s)")
    g.add_argument("--dataset", default=None, metavar="FILE",
                   help='a .jsonl file of {"prompt": TEXT} records, used in order, in place of the corpus\'s cuts')
    g.add_argument("--request-rate", type=float, default=math.inf, metavar="R",
                   help="requests a second, arriving as a Poisson process (default inf: all at once)")
    g.add_argument("--max-concurrency", default=None, metavar="C",
                   help="at most C requests in flight; a comma list runs the load once for each (a sweep) "
                        "(default: no limit)")
    g.add_argument("--seed", type=int, default=0, help="the prompts' offsets and the arrivals (default %(default)s)")
    g.add_argument("--ignore-eos", action="store_true",
                   help="send ignore_eos: true (vLLM's and SGLang's field, which tritongpt serve takes too), so "
                        "every answer is --output-len tokens: a drawn end token ends none (the report says so)")
    g.add_argument("--label", default=None, help="the results' name: serve-LABEL.json, .md, .png (default: serve; "
                   "an existing file is never overwritten: the run takes the next free -2, -3, ...)")
    serve.add_cli(collect)
    p.set_defaults(serve_flags={a.dest: a.default for a in collect.actions})


def server_args(args) -> argparse.Namespace:
    """The in-process server's arguments: serve's defaults, with every serve flag bench serve was given (--dtype
    only when given: bench's default is its kernels' bf16, serve's auto)."""
    sp = serve_parser()
    ns = sp.parse_args([])
    for a in sp._actions:
        if a.dest == "help" or not hasattr(args, a.dest):
            continue
        if a.dest == "dtype" and not getattr(args, "dtype_given", False):
            continue
        value = getattr(args, a.dest)
        if a.choices is not None and value is not None and value not in a.choices:
            raise UserError(f"{a.option_strings[0]} {value!r}: serve takes one of {', '.join(map(str, a.choices))}")
        setattr(ns, a.dest, value)
    ns.port = args.port
    return ns


def server_flags_given(args) -> list:
    """The in-process server's flags given a value other than serve's default (--model and --tokenizer aside:
    with --base-url they name the served model and the prompts' tokenizer)."""
    sp = serve_parser()
    given = []
    for a in sp._actions:
        # (--api-key too: with --base-url, the key sent)
        if a.dest in ("help", "model", "tokenizer", "port", "dtype", "cuda_graphs", "api_key") or \
                not hasattr(args, a.dest):
            continue
        if getattr(args, a.dest) != a.default:
            given.append(a.option_strings[0])
    if getattr(args, "dtype_given", False):
        given.append("--dtype")
    if args.cuda_graphs:
        given.append("--cuda-graphs")
    if args.port:
        given.append("--port")
    return given


def check_args(args) -> tuple:
    """The checked settings: (concurrencies: a tuple of ints or (None,), the request rate)."""
    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if not args.request_rate > 0 or math.isnan(args.request_rate):
        raise UserError(f"--request-rate must be a positive number of requests a second (inf: all at once), got "
                        f"{args.request_rate:g}")
    conc = (None,)
    if args.max_concurrency is not None:
        try:
            conc = tuple(int(v) for v in args.max_concurrency.split(",") if v.strip())
        except ValueError:
            conc = ()
        if not conc or any(c < 1 for c in conc):
            raise UserError(f"--max-concurrency must be a positive integer or a comma list of them, got "
                            f"{args.max_concurrency!r}")
    if args.label is not None and not args.label.strip():
        raise UserError("--label is empty")
    if args.base_url is not None:
        parse_url(args.base_url)
        given = server_flags_given(args)
        if given:
            raise UserError(f"{', '.join(given)} set the in-process server; with --base-url the server is already "
                            "running: drop them, or drop --base-url")
    return conc, args.request_rate


# -- workload -------------------------------------------------------------------------------------------------------
def arrival_offsets(n: int, rate: float, seed: int) -> list:
    """Each request's send time in seconds from the start: all 0 at rate inf, else a Poisson process (the first at 0,
    then exponential gaps of mean 1 / rate, from the seed: the same schedule every run)."""
    if math.isinf(rate):
        return [0.0] * n
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def corpus_prompts(tok, n: int, input_len: int, seed: int) -> list:
    """n prompts of input_len tokens of the embedded corpus (the one `tritongpt pretrain` trains on), each from a
    random offset: a window of text encoded, its first token dropped (a word cut in two), input_len kept, decoded."""
    from tritongpt.train.data import load_text

    text, rng, out = load_text("pydoc"), random.Random(seed), []
    for _ in range(n):
        width = 8 * (input_len + 1)
        while True:
            start = rng.randrange(max(1, len(text) - width))
            ids = tok.encode(text[start:start + width])[1:input_len + 1]
            if len(ids) == input_len or width >= len(text):
                break
            width *= 2
        out.append(tok.decode(ids))
    return out


def dataset_prompts(path, n: int) -> list:
    """The first n prompts of a .jsonl file of {"prompt": TEXT} records (taken again from the top if it has fewer)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--dataset {path}: no such file")
    prompts = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"--dataset {path}, line {i}: not JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not rec["prompt"]:
                raise UserError(f'--dataset {path}, line {i}: a record must be {{"prompt": TEXT}} with a non-empty '
                                f"string, got {line.strip()[:80]}")
            prompts.append(rec["prompt"])
            if len(prompts) == n:
                break
    if not prompts:
        raise UserError(f"--dataset {path}: no records")
    if len(prompts) < n:
        print(f"--dataset {path}: {len(prompts)} records for {n} requests: taken again from the top",
              file=sys.stderr)
    return [prompts[i % len(prompts)] for i in range(n)]


# -- the client -------------------------------------------------------------------------------------------------------
def parse_url(base_url: str) -> urllib.parse.SplitResult:
    url = urllib.parse.urlsplit(base_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise UserError(f"--base-url must be http://HOST:PORT/v1 (or https://...), got {base_url!r}")
    try:
        url.port
    except ValueError:
        raise UserError(f"--base-url {base_url}: the port is not a number in [0, 65535]") from None
    return url


def _connection(url, timeout):
    kind = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    return kind(url.hostname, url.port, timeout=timeout)


def _auth(api_key) -> dict:
    return {} if api_key is None else {"Authorization": f"Bearer {api_key}"}


def _error_text(data: bytes) -> str:
    """An error body's message: OpenAI's {"error": {"message"}} (vLLM's too), else the body's start."""
    try:
        obj = json.loads(data)
        err = obj.get("error", obj) if isinstance(obj, dict) else obj
        msg = err.get("message") if isinstance(err, dict) else None
        return str(msg if msg is not None else err)[:300]
    except (ValueError, AttributeError):
        return data[:300].decode("utf-8", "replace")


def served_models(base_url: str, api_key=None) -> list:
    """The model ids GET /v1/models lists; an unreachable server or a reply not OpenAI's is a UserError."""
    url = parse_url(base_url)
    conn = _connection(url, 30)
    try:
        conn.request("GET", url.path.rstrip("/") + "/models", headers=_auth(api_key))
        resp = conn.getresponse()
        data = resp.read()
    except (OSError, http.client.HTTPException) as e:
        raise UserError(f"cannot reach the server at {base_url} ({type(e).__name__}: {e})") from None
    finally:
        conn.close()
    if resp.status != 200:
        raise UserError(f"GET {base_url.rstrip('/')}/models answered HTTP {resp.status}: {_error_text(data)}")
    try:
        return [m["id"] for m in json.loads(data)["data"]]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"GET {base_url.rstrip('/')}/models is not OpenAI's model list: {data[:200]!r}") from None


def stream_completion(base_url, model, prompt, max_tokens, ignore_eos=False, timeout=TIMEOUT_S,
                      api_key=None) -> dict:
    """One streamed completion, timed: its record (success, error, ttft_ms, itl_ms, e2e_ms, tpot_ms, the usage's
    prompt_tokens and output_tokens, text_chunks, finish_reason)."""
    url = parse_url(base_url)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    rec = {"success": False, "error": None, "ttft_ms": None, "itl_ms": [], "e2e_ms": None, "tpot_ms": None,
           "prompt_tokens": None, "output_tokens": None, "text_chunks": 0, "finish_reason": None}
    conn = _connection(url, timeout)
    usage, first, last, done = None, None, None, False
    t0 = time.perf_counter()
    try:
        conn.request("POST", url.path.rstrip("/") + ENDPOINT, json.dumps(body).encode("utf-8"),
                     {"Content-Type": "application/json", "Accept": "text/event-stream", **_auth(api_key)})
        resp = conn.getresponse()
        if resp.status != 200:
            rec["error"] = f"HTTP {resp.status}: {_error_text(resp.read())}"
            return rec
        for raw in resp:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue  # blank separators, comments, event names
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                done = True
                break
            now = time.perf_counter()
            obj = json.loads(data)
            if "error" in obj:  # a failure after the 200: an error event (ours, vLLM's)
                rec["error"] = f"error event: {_error_text(data.encode())}"
                return rec
            choices = obj.get("choices") or []
            if choices:  # (the usage chunk has none)
                if first is None:
                    first = now
                else:
                    rec["itl_ms"].append((now - last) * 1e3)
                last = now
                rec["text_chunks"] += bool(choices[0].get("text"))
                rec["finish_reason"] = choices[0].get("finish_reason") or rec["finish_reason"]
            usage = obj.get("usage") or usage
        end = time.perf_counter()
    except (OSError, http.client.HTTPException, ValueError) as e:  # (ValueError: JSON or UTF-8 that does not parse)
        rec["error"] = f"{type(e).__name__}: {e}"[:300]
        return rec
    finally:
        conn.close()
    if not done:
        rec["error"] = "the stream ended without data: [DONE]"
        return rec
    if first is None:
        rec["error"] = "the stream carried no completion chunk"
        return rec
    rec["ttft_ms"], rec["e2e_ms"] = (first - t0) * 1e3, (end - t0) * 1e3
    if usage:
        rec["prompt_tokens"], rec["output_tokens"] = usage.get("prompt_tokens"), usage.get("completion_tokens")
    else:  # a server that ignored include_usage: the text chunks stand in for the tokens
        rec["output_tokens"] = rec["text_chunks"]
    if rec["output_tokens"] and rec["output_tokens"] > 1:
        rec["tpot_ms"] = (rec["e2e_ms"] - rec["ttft_ms"]) / (rec["output_tokens"] - 1)
    rec["success"] = True
    return rec


def run_load(base_url, model, prompts, max_tokens, rate=math.inf, concurrency=None, seed=0, ignore_eos=False,
             timeout=TIMEOUT_S, api_key=None):
    """Every prompt sent at its arrival time (arrival_offsets), at most `concurrency` in flight: (the records in
    prompt order, each with its index and its send time sent_s from the start, the duration in seconds)."""
    offsets = arrival_offsets(len(prompts), rate, seed)
    gate = threading.BoundedSemaphore(concurrency) if concurrency else None
    records = [None] * len(prompts)
    start = time.perf_counter()

    def one(i):
        if gate:
            gate.acquire()
        try:
            sent = time.perf_counter() - start
            rec = stream_completion(base_url, model, prompts[i], max_tokens, ignore_eos, timeout, api_key)
        except Exception as e:  # never lose a request: a client bug is a failure with its reason
            rec = {"success": False, "error": f"{type(e).__name__}: {e}", "itl_ms": []}
        finally:
            if gate:
                gate.release()
        records[i] = {"index": i, "sent_s": sent, **rec}

    threads = []
    for i, at in enumerate(offsets):
        wait = start + at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        threads.append(threading.Thread(target=one, args=(i,), daemon=True))
        threads[-1].start()
    for t in threads:
        t.join()
    return records, time.perf_counter() - start


# -- metrics ----------------------------------------------------------------------------------------------------------
def summarize(records, duration_s: float, max_tokens=None) -> dict:
    """vLLM's benchmark_serving metrics of one load: counts, throughputs, and mean / median / std / p99 (ms) of TTFT,
    TPOT, ITL (every gap of every request) and E2E, over the requests that succeeded."""
    import numpy as np

    ok = [r for r in records if r["success"]]
    failed = [r for r in records if not r["success"]]
    tokens_in = sum(r["prompt_tokens"] or 0 for r in ok)
    tokens_out = sum(r["output_tokens"] or 0 for r in ok)
    m = {"completed": len(ok), "failed": len(failed), "first_error": failed[0]["error"] if failed else None,
         "duration_s": duration_s, "total_input_tokens": tokens_in, "total_output_tokens": tokens_out,
         "request_throughput": len(ok) / duration_s, "output_throughput": tokens_out / duration_s,
         "total_token_throughput": (tokens_in + tokens_out) / duration_s,
         "ended_early": None if max_tokens is None else sum((r["output_tokens"] or 0) < max_tokens for r in ok)}
    values = {"ttft": [r["ttft_ms"] for r in ok], "tpot": [r["tpot_ms"] for r in ok if r["tpot_ms"] is not None],
              "itl": [x for r in ok for x in r["itl_ms"]], "e2e": [r["e2e_ms"] for r in ok]}
    for name in STATS:
        xs = np.asarray(values[name], dtype=np.float64)
        m[f"mean_{name}_ms"] = float(xs.mean()) if xs.size else None
        m[f"median_{name}_ms"] = float(np.median(xs)) if xs.size else None
        m[f"std_{name}_ms"] = float(xs.std()) if xs.size else None
        m[f"p99_{name}_ms"] = float(np.percentile(xs, 99)) if xs.size else None
    return m


# -- the command ------------------------------------------------------------------------------------------------------
def start_server(ns):
    """`tritongpt serve` in a thread of this process (make_server: the model loaded, a free port), its request log
    silenced (the table is the output)."""
    from tritongpt.train.serve import make_server

    server = make_server(ns)
    server.RequestHandlerClass = type("QuietHandler", (server.RequestHandlerClass,),
                                      {"log_message": lambda *a: None})
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def run_serve(args) -> int:
    """bench serve from its flags: the server (ours started here, or --base-url's), one warm-up request, the load
    once per --max-concurrency, the table; files with --out (or under bench/results for our server on CUDA)."""
    from tritongpt.bench.common import check_out_dir, environment, slugify

    concurrencies, rate = check_args(args)
    server, served = None, {}
    try:
        if args.base_url is None:
            ns = server_args(args)
            server = start_server(ns)
            app = server.app
            base_url = f"http://{ns.host}:{server.server_address[1]}/v1"
            ctx = app.model.config.context_length
            if args.dataset is None and args.input_len + args.output_len > ctx:
                raise UserError(f"--input-len {args.input_len} + --output-len {args.output_len} > the model's "
                                f"context ({ctx})")
            model, tok, key = app.name, app.tok, server.api_key
            served = {"in_process": True, "device": str(app.device), "flags": {  # (the key never written)
                k: v for k, v in vars(ns).items() if k not in ("func", "api_key")}}
            device_cuda = app.device.type == "cuda"
        else:
            from tritongpt.train.tokenizer import get_tokenizer

            base_url = args.base_url.rstrip("/")
            from tritongpt.train.serve import check_api_key

            key, where = (args.api_key, "--api-key") if args.api_key else \
                (os.environ.get("OPENAI_API_KEY") or None, "$OPENAI_API_KEY")
            key = key and check_api_key(key, where)
            listed = served_models(base_url, key)
            model = args.model or (listed[0] if listed else None)
            if model is None:
                raise UserError(f"the server at {base_url} lists no model")
            if model not in listed:
                raise UserError(f"--model {model}: the server at {base_url} does not list it (it serves "
                                f"{', '.join(listed)})")
            tok = None if args.dataset else get_tokenizer(args.tokenizer or "default")
            served = {"in_process": False, "base_url": base_url, "models": listed}
            device_cuda = False
        prompts = dataset_prompts(args.dataset, args.num_prompts) if args.dataset else \
            corpus_prompts(tok, args.num_prompts, args.input_len, args.seed)
        env = environment()
        out_root = args.out or ("bench/results" if device_cuda else None)
        folder = None
        if out_root is not None:
            folder = Path(out_root) / (env["device_slug"] if server else "remote-" + slugify(model))
            check_out_dir(folder)
        print(f"bench serve: {base_url} ({model}{', in this process on ' + served['device'] if server else ''}): "
              f"{args.num_prompts} prompts, {args.input_len if not args.dataset else 'dataset'} in / "
              f"{args.output_len} out, rate {rate:g}/s", file=sys.stderr, flush=True)
        warm = stream_completion(base_url, model, prompts[0], args.output_len, args.ignore_eos, api_key=key)
        if not warm["success"]:
            raise UserError(f"the warm-up request to {base_url} failed: {warm['error']}")
        runs = []
        for c in concurrencies:
            records, duration = run_load(base_url, model, prompts, args.output_len, rate, c, args.seed,
                                         args.ignore_eos, api_key=key)
            metrics = summarize(records, duration, args.output_len)
            runs.append({"max_concurrency": c, "request_rate": None if math.isinf(rate) else rate,
                         "metrics": metrics, "requests": records})
            print(f"  max concurrency {c or 'none'}: {metrics['completed']} done, {metrics['failed']} failed in "
                  f"{duration:.1f} s", file=sys.stderr, flush=True)
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
    settings = {k: getattr(args, k) for k in ("num_prompts", "input_len", "output_len", "dataset", "seed",
                                              "ignore_eos", "label")}
    settings.update(request_rate=None if math.isinf(rate) else rate, max_concurrency=list(concurrencies),
                    model=model, endpoint=ENDPOINT, temperature=0)
    result = make_serve_result(env, settings, served, runs)
    print()
    print(metrics_table(runs))
    for r in runs:
        if r["metrics"]["failed"]:
            print(f"\nmax concurrency {r['max_concurrency'] or 'none'}: {r['metrics']['failed']} request(s) failed; "
                  f"the first: {r['metrics']['first_error']}")
    if folder is not None:
        paths = write_serve(result, folder, args.label, plots=not args.no_plots)
        print(f"\nwrote {folder}/ ({', '.join(p.name for p in paths)})")
    else:
        print("\n(results not written: pass --out DIR to save them)")
    return 1 if any(r["metrics"]["failed"] for r in runs) else 0


# -- results ----------------------------------------------------------------------------------------------------------
ROWS = (("completed requests", "completed", "d"), ("failed requests", "failed", "d"),
        ("answers shorter than --output-len", "ended_early", "d"), ("duration (s)", "duration_s", ".2f"),
        ("input tokens", "total_input_tokens", "d"), ("output tokens", "total_output_tokens", "d"),
        ("request throughput (req/s)", "request_throughput", ".2f"),
        ("output token throughput (tok/s)", "output_throughput", ".1f"),
        ("total token throughput (tok/s)", "total_token_throughput", ".1f"))


def make_serve_result(env, settings, server, runs) -> dict:
    from tritongpt.bench.common import SCHEMA

    return {"schema": SCHEMA, "section": "serve", "env": env, "settings": settings, "server": server, "runs": runs}


def metrics_table(runs) -> str:
    """Metric a row, a load (a --max-concurrency) a column."""
    from tritongpt.bench.report import markdown_table

    def cell(v, spec):
        return "-" if v is None else format(v, spec)

    rows = [[name] + [cell(r["metrics"][key], spec) for r in runs] for name, key, spec in ROWS]
    for stat in STATS:
        for kind in ("mean", "median", "std", "p99"):
            rows.append([f"{kind} {stat.upper()} (ms)"] + [cell(r["metrics"][f"{kind}_{stat}_ms"], ".2f")
                                                           for r in runs])
    heads = ["metric"] + [f"max concurrency {r['max_concurrency'] or 'none'}" for r in runs]
    return markdown_table(heads, rows)


def render_markdown(result) -> str:
    from tritongpt.bench.report import env_lines

    s, srv = result["settings"], result["server"]
    where = f"`tritongpt serve` in process on {srv['device']}" if srv["in_process"] else srv["base_url"]
    rate = "all at once" if s["request_rate"] is None else f"{s['request_rate']:g} requests/s (Poisson)"
    lines = ["# bench serve", "", env_lines(result["env"]), "",
             f"Server: {where}, model `{s['model']}`. Load: {s['num_prompts']} streamed completions, "
             f"{'the prompts of ' + s['dataset'] if s['dataset'] else str(s['input_len']) + ' prompt tokens'} and "
             f"max_tokens {s['output_len']} at temperature 0{', ignore_eos' if s['ignore_eos'] else ''}, {rate}, "
             f"seed {s['seed']}. Token counts are the server's (usage).", ""]
    if srv["in_process"]:
        flags = ", ".join(f"{k}={v}" for k, v in srv["flags"].items() if v not in (None, False))
        lines += [f"Server flags: {flags}", ""]
    lines.append(metrics_table(result["runs"]))
    for r in result["runs"]:
        if r["metrics"]["failed"]:
            lines += ["", f"Max concurrency {r['max_concurrency'] or 'none'}: {r['metrics']['failed']} failed; "
                          f"the first: {r['metrics']['first_error']}"]
    return "\n".join(lines) + "\n"


def plot_serve(result, out_path) -> Path | None:
    """One load: TTFT's and ITL's distributions. A sweep: output tokens/s and median TTFT and ITL against the
    concurrency."""
    from tritongpt.bench.report import _plt

    runs = [r for r in result["runs"] if r["metrics"]["completed"]]
    if not runs:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    if len(runs) == 1:
        ok = [q for q in runs[0]["requests"] if q["success"]]
        for ax, name, xs in ((axes[0], "TTFT", [q["ttft_ms"] for q in ok]),
                             (axes[1], "ITL", [x for q in ok for x in q["itl_ms"]])):
            ax.hist(xs or [0], bins=30)
            ax.set_xlabel(f"{name} (ms)")
            ax.set_ylabel("count")
            ax.set_title(f"{name}: {len(xs)} values")
    else:
        xs = [r["max_concurrency"] for r in runs]
        axes[0].plot(xs, [r["metrics"]["output_throughput"] for r in runs], "o-")
        axes[0].set_ylabel("output tokens/s")
        for key in ("median_ttft_ms", "median_itl_ms"):
            axes[1].plot(xs, [r["metrics"][key] for r in runs], "o-", label=key.split("_")[1].upper() + " median")
        axes[1].set_ylabel("ms")
        axes[1].legend()
        for ax in axes:
            ax.set_xlabel("max concurrency")
            ax.set_xscale("log", base=2)
            ax.set_ylim(bottom=0)
    fig.suptitle(f"bench serve: {result['settings']['model']} on {result['env']['device']}")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def results_stem(folder, label) -> str:
    """serve or serve-LABEL, with -2, -3, ... after it while a file of that name is there: never overwritten."""
    from tritongpt.bench.common import slugify

    base = "serve" if label is None else f"serve-{slugify(label)}"
    stem, k = base, 1
    while any((Path(folder) / f"{stem}{ext}").exists() for ext in (".json", ".md", ".png")):
        k += 1
        stem = f"{base}-{k}"
    return stem


def write_serve(result, folder, label=None, plots=True) -> list:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = results_stem(folder, label)
    paths = [folder / f"{stem}.json", folder / f"{stem}.md"]
    paths[0].write_text(json.dumps(result, indent=1) + "\n")
    paths[1].write_text(render_markdown(result))
    if plots:
        png = plot_serve(result, folder / f"{stem}.png")
        if png is not None:
            paths.append(png)
    return paths
