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

--scoring sends the other load evaluators put on a server, lm-evaluation-harness's `loglikelihood` (0.4's
LocalCompletionsAPI, _create_payload with generate=False): each request a non-streamed POST /v1/completions whose prompt
is a list of --prompts-per-request token-id lists (lm-eval's batch_size), echo, max_tokens --output-len (lm-eval's 1;
0, vLLM's prompt-only scoring, taken too), logprobs 1, temperature 0, seed 1234. It reports requests, prompts and
prompt tokens a second and each request's latency (send to the whole body read), and checks every answer as lm-eval
reads it (choices[i].logprobs.token_logprobs): a choice a prompt, each with a logprob a prompt token, the first None
and the rest finite, and then one a drawn token; an answer that fails the check is a failed request with its reason.

LoRA adapters (vLLM's benchmark_serving.py --lora-modules): each request's "model" is a random pick among the adapters'
names, drawn from --seed (vLLM's rule: random.choice per request, its random seeded with --seed; the same rule, not
vLLM's picks), the base model never; the results record the names and the requests each got. The names are the
in-process server's own --enable-lora --lora-modules NAME=PATH (serve's flags), or, with --base-url, the names alone
(--lora-modules a b: vLLM's benchmark's form; the server must list them). --random-loras K writes K random rank-R
adapters (--lora-rank, default 16: vLLM's --max-lora-rank default) of the served model into a temporary folder and
serves them in process, as lora0 ... loraK-1: an adapter's cost measured without a trained one.
"""
import argparse
import collections
import http.client
import json
import math
import os
import random
import re
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

from tritongpt.errors import UserError

TIMEOUT_S = 600  # seconds a read of a stream may wait: a server generating the whole load in turn is slow, not dead
ENDPOINT = "/completions"
ENDPOINTS = ("/v1/completions", "/v1/chat/completions")  # (--endpoint: vLLM's, with its openai-chat backend's)
STATS = ("ttft", "tpot", "itl", "e2e")
SCORING_STATS = ("latency",)
LM_EVAL_SEED = 1234  # (the seed lm-eval's LocalCompletionsAPI sends with every request)


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
            if "--lora-modules" in flags:
                kw = {**kw, "metavar": "NAME[=PATH]", "help": "the in-process server's adapters, with --enable-lora: "
                      "NAME=PATH ... (serve's); with --base-url the served adapters' names alone, NAME ... (vLLM's "
                      "benchmark's form); each request's model a seeded random pick among them"}
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
    g.add_argument("--num-prompts", type=int, default=64, help="requests sent (default %(default)s; with --scoring "
                   "each carries --prompts-per-request prompts)")
    g.add_argument("--input-len", type=int, default=64, help="prompt tokens, cut from the embedded pydoc corpus "
                   "by the server's tokenizer (--tokenizer's with --base-url; default %(default)s)")
    g.add_argument("--output-len", type=int, default=None, help="max_tokens of every request (default 64; with "
                   "--scoring 1, lm-eval's, and 0 is taken: the prompts scored only)")
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
    g.add_argument("--scoring", action="store_true",
                   help="lm-evaluation-harness's loglikelihood load in place of streamed generation: non-streamed "
                        "requests of token-id prompts with echo and logprobs 1, every answer's token_logprobs checked")
    g.add_argument("--prompts-per-request", type=int, default=None, metavar="P",
                   help="with --scoring, the token-id prompts a request carries (lm-eval's batch_size; default 8, "
                        "lm-eval's common one)")
    g.add_argument("--random-loras", type=int, default=None, metavar="K",
                   help="serve K random LoRA adapters (targets attn,mlp) of the model in process, lora0 ... "
                        "loraK-1, written to a temporary folder, and spread the requests over them (as "
                        "--enable-lora --lora-modules would); not with --base-url")
    g.add_argument("--lora-rank", type=int, default=None, metavar="R",
                   help="with --random-loras, the adapters' rank (default 16, vLLM's --max-lora-rank default)")
    g.add_argument("--structured-outputs", default=None, metavar="SPEC",
                   help="send every request this structured_outputs (vLLM's object, as JSON text or @FILE: e.g. "
                        "'{\"json\": SCHEMA}'), the grammar's cost under load (vLLM's structured-output benchmark "
                        "sends one a request); not with --scoring or --ignore-eos")
    g.add_argument("--endpoint", default="/v1/completions", choices=ENDPOINTS,
                   help="the path each generation request goes to (vLLM's --endpoint): completions, or chat "
                        "completions with the prompt as the user's message (the served model's chat format) "
                        "(default %(default)s)")
    g.add_argument("--label", default=None,
                   help="the results' name: serve-LABEL.json, .md, .png (default: serve.json, ..., --scoring: "
                        "serve-scoring.json, ...; an existing file is never overwritten: the run takes the next "
                        "free -2, -3, ...)")
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
    with --base-url they name the served model and the prompts' tokenizer; --lora-modules too: there, the adapters'
    names)."""
    sp = serve_parser()
    given = []
    for a in sp._actions:
        # (--api-key too: with --base-url, the key sent)
        if a.dest in ("help", "model", "tokenizer", "port", "dtype", "cuda_graphs", "api_key", "lora_modules") or \
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
    """The checked settings: (concurrencies: a tuple of ints or (None,), the request rate); the defaults of
    args.output_len (64, or 1 with --scoring) and args.prompts_per_request (8 with --scoring) set."""
    if args.prompts_per_request is not None and not args.scoring:
        raise UserError("--prompts-per-request is --scoring's: the generation load sends one prompt a request")
    if args.runner == "pooling":  # (the server would answer every request of the load with a 404)
        raise UserError("--runner pooling serves embeddings and scores, no text: bench serve times completions "
                        "(--endpoint, --scoring), which it does not answer")
    if args.output_len is None:
        args.output_len = 1 if args.scoring else 64
    if args.prompts_per_request is None:
        args.prompts_per_request = 8
    for name in ("num_prompts", "input_len", "output_len", "prompts_per_request"):
        least = 0 if name == "output_len" and args.scoring else 1
        if getattr(args, name) < least:
            what = "a non-negative integer with --scoring" if least == 0 else "a positive integer"
            raise UserError(f"--{name.replace('_', '-')} must be {what}, got {getattr(args, name)}")
    if args.structured_outputs is not None:
        from tritongpt.train.structured import StructuredOutputs, flag_object

        if args.ignore_eos:  # (the server refuses it: the grammar's end could not end the text)
            raise UserError("--structured-outputs ends each answer at its grammar's end with the end token: not with "
                            "--ignore-eos")
        obj = flag_object(args.structured_outputs)
        StructuredOutputs.from_dict(*obj)  # (checked here, before the server starts)
        args.structured_outputs = obj[0]
    if args.scoring:
        for flag, given in (("--ignore-eos", args.ignore_eos), ("--dataset", args.dataset is not None),
                            ("--structured-outputs", args.structured_outputs is not None),
                            ("--endpoint /v1/chat/completions", args.endpoint == "/v1/chat/completions")):
            if given:
                raise UserError(f"{flag} is the generation load's: --scoring sends lm-eval's requests of token-id "
                                "prompts cut from the corpus (--input-len), which do not take it")
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
    check_lora_args(args)
    if args.base_url is not None:
        parse_url(args.base_url)
        given = server_flags_given(args)
        if given:
            raise UserError(f"{', '.join(given)} set the in-process server; with --base-url the server is already "
                            "running: drop them, or drop --base-url")
    return conc, args.request_rate


def check_lora_args(args):
    """--random-loras and --lora-rank (in process only, not with --lora-modules); --lora-modules with --base-url:
    names alone. The --lora-rank default (16) set."""
    if args.lora_rank is not None and args.random_loras is None:
        raise UserError("--lora-rank is the rank of --random-loras' adapters: pass --random-loras K")
    if args.lora_rank is None:
        args.lora_rank = 16
    if args.random_loras is not None:
        if args.base_url is not None:
            raise UserError("--random-loras writes adapters for the in-process server: with --base-url name the "
                            "server's own with --lora-modules NAME ...")
        if args.lora_modules:
            raise UserError("--random-loras serves adapters of its own: drop --lora-modules (or --random-loras)")
        for flag, v in (("--random-loras", args.random_loras), ("--lora-rank", args.lora_rank)):
            if v < 1:
                raise UserError(f"{flag} must be a positive integer, got {v}")
    if args.base_url is not None and args.lora_modules:
        for name in args.lora_modules:
            if "=" in name or name.lstrip().startswith("{") or not name.strip():
                raise UserError(f"--lora-modules {name!r}: with --base-url give the adapters' names alone (vLLM's "
                                "benchmark's form, --lora-modules NAME ...): the server loaded them")
        if len(set(args.lora_modules)) != len(args.lora_modules):
            raise UserError("--lora-modules names an adapter twice")


def served_config(ns):
    """The config of the model the in-process server will load (--weights or --pretrained, read on the CPU)."""
    from tritongpt.commands import check_model_source

    check_model_source(ns)  # --pretrained alone is gpt2-small, as the server takes it (not load_pretrained(None))
    if ns.weights:
        from tritongpt.train.gpt2_weights import load_checkpoint

        return load_checkpoint(ns.weights, ns.model, quantized_ok=True).config
    if ns.pretrained:
        from tritongpt.train.gpt2_weights import load_pretrained

        return load_pretrained(ns.model).config
    raise UserError("serve needs a model: pass --weights, or --pretrained (gpt2-small; --model NAME for another GPT-2)")


RANDOM_B_STD = 0.02  # GPT-2's init std: B A x then moves a layer's output by some percent, as a trained adapter does


def write_random_loras(config, k: int, rank: int, folder, seed: int = 0) -> dict:
    """k random LoRA adapters of a model of `config` (model/lora.py add_lora, targets attn,mlp, a mixture-of-experts
    model's attn, alpha 16): A as
    add_lora starts it (kaiming uniform), B ~ N(0, RANDOM_B_STD) where add_lora's is 0 (a no-op adapter), each a
    safetensors file of the adapter alone: its config (lora_rank, lora_alpha, lora_targets) in the metadata and
    the lora_A and lora_B tensors, which is what read_adapter reads of our LoRA checkpoints (model.save would write
    the whole frozen base too: 500 MB a GPT-2 124M adapter). The model is built on the meta device: no weights
    made. {name: path}, names lora0 ... lora{k-1}."""
    import torch
    from safetensors.torch import save_file

    from tritongpt.model.config import GPTConfig
    from tritongpt.model.gpt import GPTModel
    from tritongpt.model.lora import add_lora

    with torch.device("meta"):
        # (a mixture-of-experts model's MLPs are experts, which LoRA does not adapt: its attention only)
        model = add_lora(GPTModel(GPTConfig(**{**config.to_dict(), "lora_rank": 0})), rank,
                         targets="attn" if config.n_experts else "attn,mlp")
    shapes = {n: p.shape for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}
    meta = {"config": json.dumps(model.config.to_dict()), "format": "tritongpt"}
    gen, out = torch.Generator().manual_seed(seed), {}
    for i in range(k):
        tensors = {}
        for n, shape in shapes.items():
            if n.endswith(".lora_A"):  # (nn.init.kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)))
                bound = 1 / math.sqrt(shape[1])
                tensors[n] = (torch.rand(shape, generator=gen) * 2 - 1) * bound
            else:
                tensors[n] = torch.randn(shape, generator=gen) * RANDOM_B_STD
        out[f"lora{i}"] = Path(folder) / f"lora{i}.safetensors"
        save_file(tensors, str(out[f"lora{i}"]), metadata=meta)
    return out


def adapter_picks(names, n: int, seed: int) -> list:
    """Each request's adapter: random.choice among the names, from the seed (vLLM's benchmark_serving.py picks so,
    after random.seed(args.seed), a LoRA module a request; the base model is never picked)."""
    rng = random.Random(seed)
    return [rng.choice(names) for _ in range(n)]


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
    """n prompts of input_len tokens of the embedded corpus (corpus_ids'), as text."""
    return [tok.decode(ids) for ids in corpus_ids(tok, n, input_len, seed)]


def corpus_ids(tok, n: int, input_len: int, seed: int) -> list:
    """n prompts of input_len token ids of the embedded corpus (the one `tritongpt pretrain` trains on), each from a
    random offset: a window of text encoded, its first token dropped (a word cut in two), input_len kept."""
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
        out.append(ids)
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
                      api_key=None, structured=None, chat=False) -> dict:
    """One streamed completion, timed: its record (success, error, ttft_ms, itl_ms, e2e_ms, tpot_ms, the usage's
    prompt_tokens and output_tokens, text_chunks, finish_reason). structured: its structured_outputs object; the
    record then has the answer's text and "valid" (structured_valid's, for an answer the grammar ended: "stop").
    chat: a chat completion instead, the prompt its one user message (vLLM's openai-chat backend: the first token
    is the first chunk whose delta has text, content or reasoning; the gaps between such chunks are the ITL)."""
    url = parse_url(base_url)
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    body.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
    if ignore_eos:
        body["ignore_eos"] = True
    if structured is not None:
        body["structured_outputs"] = structured
    rec = {"success": False, "error": None, "ttft_ms": None, "itl_ms": [], "e2e_ms": None, "tpot_ms": None,
           "prompt_tokens": None, "output_tokens": None, "text_chunks": 0, "finish_reason": None}
    conn = _connection(url, timeout)
    usage, first, last, done, pieces = None, None, None, False, []
    t0 = time.perf_counter()
    try:
        conn.request("POST", url.path.rstrip("/") + ("/chat" if chat else "") + ENDPOINT,
                     json.dumps(body).encode("utf-8"),
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
            if chat and choices:  # (the role chunk and the finish chunk carry no text: not tokens' arrivals)
                delta = choices[0].get("delta") or {}
                piece = (delta.get("reasoning") or "") + (delta.get("content") or "")
                rec["finish_reason"] = choices[0].get("finish_reason") or rec["finish_reason"]
                choices = [{"text": piece, "finish_reason": choices[0].get("finish_reason")}] if piece else []
            if choices:  # (the usage chunk has none)
                if first is None:
                    first = now
                else:
                    rec["itl_ms"].append((now - last) * 1e3)
                last = now
                rec["text_chunks"] += bool(choices[0].get("text"))
                if structured is not None:
                    pieces.append(choices[0].get("text") or "")
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
    if structured is not None:
        rec["text"] = "".join(pieces)
        rec["valid"] = structured_valid(structured, rec["text"]) if rec["finish_reason"] == "stop" else None
    rec["success"] = True
    return rec


def structured_valid(spec: dict, text: str):
    """Whether an answer is what its structured_outputs allows, checked apart from the server's grammar (vLLM's
    structured-output benchmark's correct rate): JSON parsed (its control characters taken, strict=False: xgrammar's
    strings admit them) and, where the jsonschema package is installed, validated against the schema; a regex by
    Python's re.fullmatch; a choice by equality; None for a grammar (no checker here)."""
    if spec.get("choice") is not None:
        return text in spec["choice"]
    if spec.get("regex") is not None:
        return re.fullmatch(spec["regex"], text) is not None
    if spec.get("json") is None and not spec.get("json_object"):
        return None
    try:
        value = json.loads(text, strict=False)
    except ValueError:
        return False
    if spec.get("json_object"):
        return isinstance(value, dict)
    try:
        import jsonschema
    except ImportError:
        return True
    schema = json.loads(spec["json"]) if isinstance(spec["json"], str) else spec["json"]
    return jsonschema.Draft202012Validator(schema).is_valid(value)


def score_completion(base_url, model, prompts, max_tokens, timeout=TIMEOUT_S, api_key=None) -> dict:
    """One lm-eval loglikelihood request (prompts: a list of token-id lists), timed and its answer checked
    (check_scored): its record (success, error, latency_ms, prompts, the usage's prompt_tokens, bad_choices)."""
    url = parse_url(base_url)
    body = {"model": model, "prompt": prompts, "temperature": 0, "max_tokens": max_tokens, "logprobs": 1,
            "seed": LM_EVAL_SEED, "echo": True}
    rec = {"success": False, "error": None, "latency_ms": None, "prompts": len(prompts),
           "prompt_tokens": None, "bad_choices": 0}
    conn = _connection(url, timeout)
    t0 = time.perf_counter()
    try:
        conn.request("POST", url.path.rstrip("/") + ENDPOINT, json.dumps(body).encode("utf-8"),
                     {"Content-Type": "application/json", **_auth(api_key)})
        resp = conn.getresponse()
        data = resp.read()
        end = time.perf_counter()
        if resp.status != 200:
            rec["error"] = f"HTTP {resp.status}: {_error_text(data)}"
            return rec
        obj = json.loads(data)
    except (OSError, http.client.HTTPException, ValueError) as e:  # (ValueError: JSON or UTF-8 that does not parse)
        rec["error"] = f"{type(e).__name__}: {e}"[:300]
        return rec
    finally:
        conn.close()
    rec["latency_ms"] = (end - t0) * 1e3
    problems = check_scored(obj, prompts, max_tokens)
    rec["bad_choices"] = len(problems)
    if problems:
        rec["error"] = f"{len(problems)} answer(s) fail lm-eval's reading; the first: {problems[0]}"
        return rec
    usage = obj.get("usage") or {}
    # (a server without usage: the tokens sent stand in)
    rec["prompt_tokens"] = usage.get("prompt_tokens", sum(map(len, prompts)))
    rec["success"] = True
    return rec


def check_scored(obj, prompts, max_tokens) -> list:
    """What lm-eval's parse_logprobs needs of a loglikelihood answer, as a list of problems (empty: fine): a choice a
    prompt (index 0..P-1 each once), its logprobs.token_logprobs a logprob a prompt token (the first None: nothing
    comes before it; the rest finite numbers) and then one a drawn token: exactly 1 with max_tokens 1, 0 with 0 (more
    may end early at the end token: 1 to max_tokens)."""
    choices = obj.get("choices") if isinstance(obj, dict) else None
    if not isinstance(choices, list):
        return ["the answer has no choices list"]
    by = {c.get("index"): c for c in choices if isinstance(c, dict)}
    if len(choices) != len(prompts) or set(by) != set(range(len(prompts))):
        return [f"{len(choices)} choices (indices {list(by)}) for {len(prompts)} prompts"]
    problems = []
    for i, ids in enumerate(prompts):
        lps = ((by[i].get("logprobs") or {}).get("token_logprobs"))
        least, most = len(ids) + min(max_tokens, 1), len(ids) + max_tokens
        if not isinstance(lps, list) or not least <= len(lps) <= most:
            got = f"{len(lps)} token_logprobs" if isinstance(lps, list) else "no token_logprobs"
            want = least if least == most else f"{least} to {most}"
            problems.append(f"choice {i}: {got} for a prompt of {len(ids)} tokens and max_tokens {max_tokens} "
                            f"(want {want})")
        elif lps[0] is not None:
            problems.append(f"choice {i}: the first token's logprob is {lps[0]!r}, not None")
        else:
            bad = [x for x in lps[1:] if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x)]
            if bad:
                problems.append(f"choice {i}: a logprob {bad[0]!r} is not a finite number")
    return problems


def run_load(base_url, model, prompts, max_tokens, rate=math.inf, concurrency=None, seed=0, ignore_eos=False,
             timeout=TIMEOUT_S, api_key=None, scoring=False, models=None, structured=None, chat=False):
    """Every prompt sent at its arrival time (arrival_offsets), at most `concurrency` in flight: (the records in
    prompt order, each with its index, its "model" and its send time sent_s from the start, the duration in
    seconds). scoring: each prompt a list of token-id lists sent as one lm-eval loglikelihood request
    (score_completion). models: a "model" a prompt (LoRA adapters' names: adapter_picks), else `model` for all.
    structured: every generation request's structured_outputs. chat: chat completions (stream_completion's)."""
    offsets = arrival_offsets(len(prompts), rate, seed)
    gate = threading.BoundedSemaphore(concurrency) if concurrency else None
    records = [None] * len(prompts)
    start = time.perf_counter()

    def one(i):
        if gate:
            gate.acquire()
        name = models[i] if models else model
        try:
            sent = time.perf_counter() - start
            if scoring:
                rec = score_completion(base_url, name, prompts[i], max_tokens, timeout, api_key)
            else:
                rec = stream_completion(base_url, name, prompts[i], max_tokens, ignore_eos, timeout, api_key,
                                        structured, chat)
        except Exception as e:  # never lose a request: a client bug is a failure with its reason
            rec = {"success": False, "error": f"{type(e).__name__}: {e}", "itl_ms": [], "bad_choices": 0}
        finally:
            if gate:
                gate.release()
        records[i] = {"index": i, "model": name, "sent_s": sent, **rec}

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
    ok, m = outcome(records, duration_s)
    tokens_in = sum(r["prompt_tokens"] or 0 for r in ok)
    tokens_out = sum(r["output_tokens"] or 0 for r in ok)
    m.update({"total_input_tokens": tokens_in, "total_output_tokens": tokens_out,
              "output_throughput": tokens_out / duration_s,
              "total_token_throughput": (tokens_in + tokens_out) / duration_s,
              "ended_early": None if max_tokens is None else sum((r["output_tokens"] or 0) < max_tokens for r in ok)})
    checked = [r["valid"] for r in ok if r.get("valid") is not None]  # (--structured-outputs: the grammar's ends)
    m["structured_valid"] = f"{sum(checked)}/{len(checked)}" if checked else None
    values = {"ttft": [r["ttft_ms"] for r in ok], "tpot": [r["tpot_ms"] for r in ok if r["tpot_ms"] is not None],
              "itl": [x for r in ok for x in r["itl_ms"]], "e2e": [r["e2e_ms"] for r in ok]}
    return add_stats(m, values)


def outcome(records, duration_s: float) -> tuple:
    """(the records that succeeded, the counts every load reports: completed, failed, the first failure's reason,
    the duration and the requests a second)."""
    ok = [r for r in records if r["success"]]
    failed = [r for r in records if not r["success"]]
    return ok, {"completed": len(ok), "failed": len(failed), "first_error": failed[0]["error"] if failed else None,
                "duration_s": duration_s, "request_throughput": len(ok) / duration_s}


def add_stats(m: dict, values: dict) -> dict:
    """m with mean / median / std / p99 (numpy's, as vLLM's) of each named list of ms: mean_NAME_ms, ..."""
    import numpy as np

    for name, v in values.items():
        xs = np.asarray(v, dtype=np.float64)
        m[f"mean_{name}_ms"] = float(xs.mean()) if xs.size else None
        m[f"median_{name}_ms"] = float(np.median(xs)) if xs.size else None
        m[f"std_{name}_ms"] = float(xs.std()) if xs.size else None
        m[f"p99_{name}_ms"] = float(np.percentile(xs, 99)) if xs.size else None
    return m


def summarize_scoring(records, duration_s: float) -> dict:
    """A scoring load's metrics: counts (answers failing the check among the failed, their choices counted),
    requests, prompts and prompt tokens a second (the server's usage) over the duration, and the latency's mean /
    median / std / p99 (ms) over the requests that succeeded."""
    ok, m = outcome(records, duration_s)
    tokens_in, prompts = sum(r["prompt_tokens"] or 0 for r in ok), sum(r["prompts"] for r in ok)
    m.update({"failed_checks": sum(1 for r in records if r.get("bad_choices")),
              "bad_choices": sum(r.get("bad_choices") or 0 for r in records), "total_prompts": prompts,
              "total_input_tokens": tokens_in, "prompt_throughput": prompts / duration_s,
              "input_throughput": tokens_in / duration_s})
    return add_stats(m, {"latency": [r["latency_ms"] for r in ok]})


# -- the command ------------------------------------------------------------------------------------------------------
def start_server(ns, poll_interval: float = 0.05):
    """`tritongpt serve` in a thread of this process (make_server: the model loaded, a free port), its request log
    silenced (the table is the output). poll_interval: serve_forever's, how long its shutdown() may wait (50 ms, not
    socketserver's 500: the run's end waited for the next poll)."""
    from tritongpt.train.serve import make_server

    server = make_server(ns)
    server.RequestHandlerClass = type("QuietHandler", (server.RequestHandlerClass,),
                                      {"log_message": lambda *a: None})
    threading.Thread(target=server.serve_forever, args=(poll_interval,), daemon=True).start()
    return server


def run_serve(args) -> int:
    """bench serve from its flags: the server (ours started here, or --base-url's), one warm-up request, the load
    once per --max-concurrency, the table; files with --out (or under bench/results for our server on CUDA)."""
    from tritongpt.bench.common import check_out_dir, environment, slugify
    from tritongpt.train.serve import host_port

    concurrencies, rate = check_args(args)
    server, served, adapters, scratch = None, {}, [], None
    chat = args.endpoint == "/v1/chat/completions"
    try:
        if args.base_url is None:
            ns = server_args(args)
            if args.random_loras:  # (read by the server as it starts: the folder goes when the run ends)
                scratch = tempfile.TemporaryDirectory(prefix="bench-serve-loras-")
                paths = write_random_loras(served_config(ns), args.random_loras, args.lora_rank, scratch.name,
                                           args.seed)
                ns.enable_lora, ns.lora_modules = True, [f"{n}={p}" for n, p in paths.items()]
            server = start_server(ns)
            app = server.app
            if chat and app.template is None:  # (every request would be a 400: said once, before the load)
                raise UserError(f"--endpoint /v1/chat/completions: the served model has no chat format "
                                f"({app.template_why}); serve an instruct model or use /v1/completions")
            adapters = list(app.adapter_paths)
            base_url = f"http://{host_port(ns.host, server.server_address[1])}/v1"
            # the served context (--max-model-len's where given): past it every request would be a 400
            ctx = app.max_model_len
            if args.dataset is None and args.input_len + args.output_len > ctx:
                whose = "the model's" if ctx == app.model.config.context_length else "--max-model-len's"
                raise UserError(f"--input-len {args.input_len} + --output-len {args.output_len} > {whose} "
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
            adapters = list(args.lora_modules or [])
            missing = [a for a in adapters if a not in listed]
            if missing:
                raise UserError(f"--lora-modules {', '.join(missing)}: the server at {base_url} does not list "
                                f"{'it' if len(missing) == 1 else 'them'} (it serves {', '.join(listed)})")
            tok = None if args.dataset else get_tokenizer(args.tokenizer or "default")
            served = {"in_process": False, "base_url": base_url, "models": listed}
            device_cuda = False
        if args.scoring:  # a request a list of P prompts of ids, lm-eval's batch
            per = args.prompts_per_request
            ids = corpus_ids(tok, args.num_prompts * per, args.input_len, args.seed)
            prompts = [ids[i:i + per] for i in range(0, len(ids), per)]
        else:
            prompts = dataset_prompts(args.dataset, args.num_prompts) if args.dataset else \
                corpus_prompts(tok, args.num_prompts, args.input_len, args.seed)
        env = environment()
        out_root = args.out or ("bench/results" if device_cuda else None)
        folder = None
        if out_root is not None:
            folder = Path(out_root) / (env["device_slug"] if server else "remote-" + slugify(model))
            check_out_dir(folder)
        load = f"scoring requests of {args.prompts_per_request} prompts" if args.scoring else "prompts"
        print(f"bench serve: {base_url} ({model}{', in this process on ' + served['device'] if server else ''}): "
              f"{args.num_prompts} {load}, {args.input_len if not args.dataset else 'dataset'} in / "
              f"{args.output_len} out, rate {rate:g}/s", file=sys.stderr, flush=True)
        picks = adapter_picks(adapters, len(prompts), args.seed) if adapters else None
        if picks:
            print(f"  LoRA adapters: {', '.join(adapters)}, a random pick a request", file=sys.stderr, flush=True)
        # (vLLM's warm-up request runs the base model; ours the first pick's adapter: its path compiled before
        # the load too)
        first = picks[0] if picks else model
        warm = score_completion(base_url, first, prompts[0], args.output_len, api_key=key) if args.scoring else \
            stream_completion(base_url, first, prompts[0], args.output_len, args.ignore_eos, api_key=key,
                              structured=args.structured_outputs, chat=chat)
        if not warm["success"]:
            raise UserError(f"the warm-up request to {base_url} failed: {warm['error']}")
        runs = []
        for c in concurrencies:
            records, duration = run_load(base_url, model, prompts, args.output_len, rate, c, args.seed,
                                         args.ignore_eos, api_key=key, scoring=args.scoring, models=picks,
                                         structured=args.structured_outputs, chat=chat)
            metrics = summarize_scoring(records, duration) if args.scoring else \
                summarize(records, duration, args.output_len)
            runs.append({"max_concurrency": c, "request_rate": None if math.isinf(rate) else rate,
                         "metrics": metrics, "requests": records})
            print(f"  max concurrency {c or 'none'}: {metrics['completed']} done, {metrics['failed']} failed in "
                  f"{duration:.1f} s", file=sys.stderr, flush=True)
    finally:
        try:
            if server is not None:
                server.shutdown()
                server.server_close()
        finally:  # (a second Ctrl-C as the server closes too: cli.main's os._exit then runs no atexit cleanup)
            if scratch is not None:
                scratch.cleanup()
    settings = {k: getattr(args, k) for k in ("num_prompts", "input_len", "output_len", "dataset", "seed",
                                              "ignore_eos", "label", "scoring", "structured_outputs")}
    settings.update(request_rate=None if math.isinf(rate) else rate, max_concurrency=list(concurrencies),
                    model=model, endpoint="/v1/completions" if args.scoring else args.endpoint, temperature=0,
                    prompts_per_request=args.prompts_per_request if args.scoring else 1,
                    lora_modules=adapters or None,  # (each sweep's load sends the same picks)
                    adapter_requests=dict(sorted(collections.Counter(picks).items())) if picks else None,
                    random_loras={"count": args.random_loras, "rank": args.lora_rank} if args.random_loras else None)
    result = make_serve_result(env, settings, served, runs)
    print()
    print(metrics_table(runs, args.scoring))
    for r in runs:
        if r["metrics"]["failed"]:
            print(f"\nmax concurrency {r['max_concurrency'] or 'none'}: {r['metrics']['failed']} request(s) failed; "
                  f"the first: {r['metrics']['first_error']}")
    if folder is not None:
        label = args.label or ("scoring" if args.scoring else None)  # (serve-scoring.*: the other load's files)
        paths = write_serve(result, folder, label, plots=not args.no_plots)
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
SCORING_ROWS = (("completed requests", "completed", "d"), ("failed requests", "failed", "d"),
                ("answers failing lm-eval's check (requests)", "failed_checks", "d"),
                ("choices failing it", "bad_choices", "d"), ("duration (s)", "duration_s", ".2f"),
                ("prompts scored", "total_prompts", "d"), ("prompt tokens", "total_input_tokens", "d"),
                ("request throughput (req/s)", "request_throughput", ".2f"),
                ("prompt throughput (prompts/s)", "prompt_throughput", ".1f"),
                ("prompt token throughput (tok/s)", "input_throughput", ".1f"))


def make_serve_result(env, settings, server, runs) -> dict:
    from tritongpt.bench.common import SCHEMA

    return {"schema": SCHEMA, "section": "serve", "env": env, "settings": settings, "server": server, "runs": runs}


def metrics_table(runs, scoring=False) -> str:
    """Metric a row, a load (a --max-concurrency) a column."""
    from tritongpt.bench.report import markdown_table

    def cell(v, spec):
        return "-" if v is None else format(v, spec)

    rows = [[name] + [cell(r["metrics"][key], spec) for r in runs]
            for name, key, spec in (SCORING_ROWS if scoring else ROWS)]
    if any(r["metrics"].get("structured_valid") for r in runs):  # (--structured-outputs)
        rows.append(["valid structured answers (of those the grammar ended)"] +
                    [cell(r["metrics"].get("structured_valid"), "s") for r in runs])
    for stat in SCORING_STATS if scoring else STATS:
        for kind in ("mean", "median", "std", "p99"):
            name = stat.upper() if stat in STATS else stat
            rows.append([f"{kind} {name} (ms)"] + [cell(r["metrics"][f"{kind}_{stat}_ms"], ".2f") for r in runs])
    heads = ["metric"] + [f"max concurrency {r['max_concurrency'] or 'none'}" for r in runs]
    return markdown_table(heads, rows)


def render_markdown(result) -> str:
    from tritongpt.bench.report import env_lines

    s, srv = result["settings"], result["server"]
    where = f"`tritongpt serve` in process on {srv['device']}" if srv["in_process"] else srv["base_url"]
    rate = "all at once" if s["request_rate"] is None else f"{s['request_rate']:g} requests/s (Poisson)"
    scoring = s.get("scoring", False)
    if scoring:
        load = (f"{s['num_prompts']} lm-eval loglikelihood requests (non-streamed, echo, logprobs 1), each "
                f"{s['prompts_per_request']} token-id prompts of {s['input_len']} tokens and max_tokens "
                f"{s['output_len']} at temperature 0")
    else:
        load = (f"{s['num_prompts']} streamed completions, "
                f"{'the prompts of ' + s['dataset'] if s['dataset'] else str(s['input_len']) + ' prompt tokens'} "
                f"and max_tokens {s['output_len']} at temperature 0{', ignore_eos' if s['ignore_eos'] else ''}")
    lines = ["# bench serve" + (" --scoring" if scoring else ""), "", env_lines(result["env"]), "",
             f"Server: {where}, model `{s['model']}`. Load: {load}, {rate}, seed {s['seed']}. Token counts are the "
             "server's (usage).", ""]
    if s.get("lora_modules"):
        made = f" ({s['random_loras']['count']} random adapters of rank {s['random_loras']['rank']}, targets " \
               "attn,mlp)" if s.get("random_loras") else ""
        counts = ", ".join(f"{name} {n}" for name, n in s["adapter_requests"].items())
        lines += [f"LoRA adapters{made}: each request's model a random pick among {', '.join(s['lora_modules'])} "
                  f"(vLLM's --lora-modules rule, seed {s['seed']}); requests: {counts}.", ""]
    if s.get("structured_outputs") is not None:
        lines += [f"Every request's structured_outputs: `{json.dumps(s['structured_outputs'])}`.", ""]
    if srv["in_process"]:
        flags = ", ".join(f"{k}={v}" for k, v in srv["flags"].items() if v not in (None, False))
        lines += [f"Server flags: {flags}", ""]
    lines.append(metrics_table(result["runs"], scoring))
    for r in result["runs"]:
        if r["metrics"]["failed"]:
            lines += ["", f"Max concurrency {r['max_concurrency'] or 'none'}: {r['metrics']['failed']} failed; "
                          f"the first: {r['metrics']['first_error']}"]
    return "\n".join(lines) + "\n"


def plot_serve(result, out_path) -> Path | None:
    """One load: TTFT's and ITL's distributions (a scoring load: the latency's, and it against the send time). A
    sweep: output tokens/s (prompt tokens/s) and median TTFT and ITL (median and p99 latency) against the
    concurrency."""
    from tritongpt.bench.report import _plt

    runs = [r for r in result["runs"] if r["metrics"]["completed"]]
    if not runs:
        return None
    scoring = result["settings"].get("scoring", False)
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    if len(runs) == 1 and scoring:
        ok = [q for q in runs[0]["requests"] if q["success"]]
        axes[0].hist([q["latency_ms"] for q in ok], bins=30)
        axes[0].set_xlabel("request latency (ms)")
        axes[0].set_ylabel("count")
        axes[0].set_title(f"latency: {len(ok)} requests")
        axes[1].plot([q["sent_s"] for q in ok], [q["latency_ms"] for q in ok], "o")
        axes[1].set_xlabel("sent at (s from the start)")
        axes[1].set_ylabel("request latency (ms)")
        axes[1].set_ylim(bottom=0)
    elif len(runs) == 1:
        ok = [q for q in runs[0]["requests"] if q["success"]]
        for ax, name, xs in ((axes[0], "TTFT", [q["ttft_ms"] for q in ok]),
                             (axes[1], "ITL", [x for q in ok for x in q["itl_ms"]])):
            ax.hist(xs or [0], bins=30)
            ax.set_xlabel(f"{name} (ms)")
            ax.set_ylabel("count")
            ax.set_title(f"{name}: {len(xs)} values")
    else:
        xs = [r["max_concurrency"] for r in runs]
        rate, keys = ("input_throughput", "prompt tokens/s") if scoring else ("output_throughput", "output tokens/s")
        axes[0].plot(xs, [r["metrics"][rate] for r in runs], "o-")
        axes[0].set_ylabel(keys)
        lines = (("median_latency_ms", "latency median"), ("p99_latency_ms", "latency p99")) if scoring else \
            (("median_ttft_ms", "TTFT median"), ("median_itl_ms", "ITL median"))
        for key, name in lines:
            axes[1].plot(xs, [r["metrics"][key] for r in runs], "o-", label=name)
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
