"""`serve --runner pooling`: embeddings and reward scores over HTTP, after vLLM's pooling runner.

    tritongpt serve --weights runs/sft --runner pooling          # POST /v1/embeddings (OpenAI's)
    tritongpt serve --weights runs/reward --runner pooling       # POST /pooling: the reward model's score

vLLM's `--runner pooling` serves a model's pooled hidden states instead of its text (vllm/config/pooler.py,
vllm/entrypoints/openai/serving_embedding.py, serving_pooling.py); `--convert embed` turns a generative model into
an embedder, `--convert reward` reads a reward head. Here:
- embed (a language model's default): the final hidden state after the model's final norm (GPTModel.hidden, what
  the LM head reads), pooled LAST (the last token's: vLLM's default for a converted generative model, whose causal
  attention gathers the whole input only there) or MEAN over the input's tokens, L2-normalized unless
  --pooler-config '{"normalize": false}'. OpenAI's /v1/embeddings: float lists or base64 (little-endian float32).
- reward (detected for a `tritongpt reward` checkpoint or a Hugging Face sequence classifier, or --convert reward):
  RewardModel's scalar, read at the last token as `reward` trains and `rlhf` scores it; POST /pooling answers
  vLLM's PoolingResponse, each input's data [score]. `messages` (a chat ending in the assistant's answer) is laid
  out as reward and rlhf lay out a chat record: its prompt (formats.encode_prompt), the answer, the end token.
A request's inputs run right-padded, in forwards of at most MAX_TOKENS positions: under causal attention a token
never sees the pads after it, and LAST and MEAN read only each input's own positions, so padding changes no input's
result. /metrics counts each input as a request (vLLM's: an engine request an input), its tokens prompt tokens.
vLLM's POST /score (text_1 against text_2) and /rerank (a query against documents, vllm/entrypoints/openai/
serving_score.py): an embedder's score is the cosine of the two texts' embeddings (vLLM's rule for an embedding
model), a reward model's its reward of the chat [user: text_1, assistant: text_2] laid out as chat_ids lays one out.
The other runner's routes are not there (404s), as vLLM registers only its runner's (api_server.build_app).
"""
import base64
import threading
import time
import uuid

from tritongpt._types import is_int
from tritongpt.errors import UserError

RUNNERS = ("generate", "pooling")
CONVERTS = ("auto", "embed", "reward")
POOLING_TYPES = ("LAST", "MEAN")
# vLLM's PoolerConfig fields this server does not implement, and why (refused by name, not ignored)
NOT_POOLING = {"CLS": "CLS reads a bidirectional encoder's first token; these models are causal (use LAST)",
               "ALL": "ALL returns every token's state (token-level pooling); not served here",
               "STEP": "STEP is a process reward model's per-step pooling; not served here"}
EMBEDDINGS, POOLING = "/v1/embeddings", "/pooling"
SCORE_PATHS, RERANK_PATHS = ("/score", "/v1/score"), ("/rerank", "/v1/rerank", "/v2/rerank")  # (vLLM's)
GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/responses")
# serve's generation flags (their dests), which mean nothing to a pooling server: refused with --runner pooling when
# given, i.e. off serve's own parser defaults (as bench refuses another benchmark's flags; a default is not given)
GENERATION_FLAGS = ("speculative_config", "enable_lora", "lora_modules", "enable_auto_tool_choice", "tool_call_parser",
                    "reasoning_parser", "kv_cache_pages", "enable_prefix_caching", "max_prefill_tokens", "cuda_graphs",
                    "kv_cache_dtype",  # (a forward here keeps no KV cache)
                    "generation_config", "override_generation_config",
                    "enable_prompt_tokens_details",  # (no prefix cache here)
                    # (no engine: a request's inputs run in forwards of at most MAX_TOKENS positions, no KV cache)
                    "max_batch", "kv_page_size", "max_loras", "max_lora_rank")


def pooler_config(text: str | None, kind: str) -> dict:
    """--pooler-config's JSON (vLLM's PoolerConfig: pooling_type, normalize) -> {"pooling_type", "normalize"};
    unknown keys and pooling types not built here refused by name. A reward model reads its head at the last token
    (what it was trained on): only LAST, and no normalizing of a scalar."""
    config = {"pooling_type": "LAST", "normalize": kind == "embed"}
    if text is None:
        return config
    from tritongpt.train.serve import json_object_flag

    given = json_object_flag(text, "--pooler-config")
    for key, value in given.items():
        if key not in config:
            raise UserError(f"--pooler-config: unknown key {key!r} (this server takes pooling_type and normalize)")
        if key == "normalize" and not isinstance(value, bool):
            raise UserError(f"--pooler-config: normalize must be true or false, got {value!r}")
        if key == "pooling_type" and value not in POOLING_TYPES:
            why = NOT_POOLING.get(value, f"one of {', '.join(POOLING_TYPES)}")
            raise UserError(f"--pooler-config: pooling_type {value!r}: {why}")
    config.update(given)
    if kind == "reward" and (config["pooling_type"] != "LAST" or config["normalize"]):
        raise UserError("--pooler-config: a reward model is read at the last token (pooling_type LAST) and its "
                        "score is not normalized (normalize false), as `reward` trained it")
    return config


def check_pooling_args(args):
    """The pooling flags only with --runner pooling, and the generation flags not with it."""
    if args.runner != "pooling":
        for flag, value in (("--convert", args.convert), ("--pooler-config", args.pooler_config)):
            if value is not None:
                raise UserError(f"{flag} is used only with --runner pooling (embeddings, reward scores)")
        return
    from tritongpt.bench.serve import serve_parser

    actions = {a.dest: a for a in serve_parser()._actions}
    for dest in GENERATION_FLAGS:  # (!= the default: --max-loras 0 is given, its default None)
        if getattr(args, dest) != actions[dest].default:
            raise UserError(f"{actions[dest].option_strings[0]} is a generation setting: --runner pooling serves "
                            "embeddings and reward scores, it generates nothing")


def pooler_kind(args) -> tuple:
    """(kind: "embed" or "reward", whether --weights holds a reward model), read from the checkpoint without
    loading it: --convert, else "reward" for a reward model, else "embed"."""
    from tritongpt.train.common import resolve_checkpoint
    from tritongpt.train.reward import is_reward_model

    if args.weights:  # (a missing or empty path: the load's own error, not "not a reward model" or an embedder's)
        resolve_checkpoint(args.weights)
    reward = bool(args.weights) and is_reward_model(args.weights)
    kind = args.convert if args.convert not in (None, "auto") else "reward" if reward else "embed"
    if kind == "reward" and not reward:
        raise UserError(f"--convert reward needs a reward model (a `tritongpt reward` checkpoint or a Hugging Face "
                        f"sequence classifier with one label): {args.weights or args.model} is not one")
    return kind, reward


def load_pooler(args):
    """(model, tokenizer, device, dtype, limit, Pooler) for --runner pooling: a reward model by RewardModel.load
    (detected, or --convert reward), else the language model as generate loads it."""
    from tritongpt.commands import load_generation_model
    from tritongpt.train.common import note_slow_kernels, pick_device, pick_dtype
    from tritongpt.train.reward import RewardModel
    from tritongpt.train.sft import pick_tokenizer

    kind, reward = pooler_kind(args)
    config = pooler_config(args.pooler_config, kind)
    if not reward:
        model, tok, device, dtype, limit = load_generation_model(args)
    else:
        # (load_generation_model's flags that RewardModel.load would leave unread: refused as `info` refuses them)
        given = next((f for f, v in (("--quantize", args.quantize), ("--group-size", args.group_size)) if v), None)
        if given is not None:
            raise UserError(f"{given} is not applied to a reward model (quantize it with `reward --quantize`)")
        if args.model:
            raise UserError(f"--model names the heads of a GPT-2 file without config.json; {args.weights} is a reward "
                            "model, with its own config: leave --model out")
        device, dtype = pick_device(args.device), pick_dtype(args.dtype, pick_device(args.device))
        model = RewardModel.load(args.weights, map_location=device, kernels=args.kernels, quantized_ok=True).eval()
        note_slow_kernels([model], device)  # as load_generation_model says it for an embedder
        tok = pick_tokenizer(args.tokenizer, args.weights, model.config.vocab_size)
        limit = tok.vocab_size if tok.vocab_size < model.config.vocab_size else None
    return model, tok, device, dtype, limit, Pooler(model, tok, device, dtype, kind, **config)


# the most right-padded positions one forward runs (after vLLM's max_num_batched_tokens, which caps a step): a
# request of many long inputs runs in several forwards, not one [N, T] one that holds N * T hidden states at once
MAX_TOKENS = 8192


def batches(lengths: list, max_tokens: int):
    """Consecutive slices of the inputs, each one forward of at most max_tokens right-padded positions (one input
    at least: an input is never longer than the context, and max_tokens is at least that)."""
    start = longest = 0
    for i, n in enumerate(lengths):
        if i > start and (i - start + 1) * max(longest, n) > max_tokens:
            yield slice(start, i)
            start, longest = i, 0
        longest = max(longest, n)
    yield slice(start, len(lengths))


class Pooler:
    """One model's pooled outputs: embeddings (kind "embed") or reward scores (kind "reward") of token id lists,
    in right-padded forwards of at most max_tokens positions (one forward at a time: the lock)."""

    def __init__(self, model, tok, device, dtype, kind: str, pooling_type: str = "LAST", normalize: bool = True):
        self.model, self.tok, self.device, self.dtype, self.kind = model, tok, device, dtype, kind
        self.pooling_type, self.normalize = pooling_type, normalize
        self.max_tokens = max(MAX_TOKENS, model.config.context_length)
        self.lock = threading.Lock()

    def __call__(self, seqs: list, hold=None):
        """[N, C] embeddings, or [N] scores, float32 on the CPU. hold: what the forwards run under (serve's
        Model.turn, which /metrics counts), else the Pooler's own lock."""
        import torch

        with hold or self.lock:
            return torch.cat([self.forward(seqs[part]) for part in batches(list(map(len, seqs)), self.max_tokens)])

    def forward(self, seqs: list):
        import torch
        import torch.nn.functional as F

        from tritongpt.train.common import autocast
        from tritongpt.train.preference import pad_sequences

        idx, lengths = pad_sequences(seqs, 0, self.device)  # (any id pads: no kept position sees it)
        with torch.no_grad(), autocast(self.device, self.dtype):
            if self.kind == "reward":
                return self.model(idx, lengths).float().cpu()
            backbone = getattr(self.model, "backbone", self.model)  # (a reward checkpoint's, with --convert embed)
            h = backbone.hidden(idx).float()
        if self.pooling_type == "LAST":
            out = h[torch.arange(len(seqs), device=h.device), lengths - 1]
        else:  # MEAN over each input's own positions, the pads after it left out
            keep = torch.arange(idx.size(1), device=h.device) < lengths.unsqueeze(1)
            out = (h * keep.unsqueeze(-1)).sum(1) / lengths.unsqueeze(1)
        return (F.normalize(out, dim=-1) if self.normalize else out).cpu()


def encoded(values: list, encoding_format: str):
    """A float vector as OpenAI sends it: a list, or base64 of its little-endian float32 bytes."""
    import numpy as np

    if encoding_format == "float":
        return values
    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode()


def input_ids(app, body: dict) -> list:
    """`input` (a string, a list of strings, a list of token ids, a list of lists of ids: OpenAI's) -> each input's
    ids, text encoded as completions encode a prompt; empty and over-long inputs refused by index."""
    from tritongpt.train.serve import bad, check_token_ids

    value = body.get("input")
    one = isinstance(value, str) or isinstance(value, list) and bool(value) and all(is_int(t) for t in value)
    inputs = [value] if one else value
    if not isinstance(inputs, list) or not inputs or not all(
            isinstance(x, str) or isinstance(x, list) and all(is_int(t) for t in x) for x in inputs):
        raise bad("input", f"'input' must be a string, a list of token ids, or a non-empty list of either, got "
                           f"{value!r}"[:300])
    vocab = app.limit or app.model.config.vocab_size
    out = []
    for i, x in enumerate(inputs):
        where = "'input'" if one else f"'input[{i}]'"
        if not x:
            raise bad("input", f"{where} is empty")
        if not isinstance(x, str):
            check_token_ids(x, vocab, "input")
        out.append(app.encode(x) if isinstance(x, str) else list(x))
        if not out[-1]:
            raise bad("input", f"{where} is empty (no tokens)")
    return out


def chat_ids(app, messages) -> list:
    """A chat ending in the assistant's answer, as reward and rlhf lay out a chat record: the prompt of the messages
    before it (formats.encode_prompt), then the answer and its end token (preference.encode_answers)."""
    from tritongpt.train.formats import ChatPrompt
    from tritongpt.train.preference import encode_answers
    from tritongpt.train.serve import bad

    roles = ("system", "user", "assistant")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and m.get("role") in roles and isinstance(m.get("content"), str) for m in messages):
        raise bad("messages", f"'messages' must be a non-empty list of {{role: {'|'.join(roles)}, content: "
                              "string}} objects")
    if messages[-1]["role"] != "assistant" or not any(m["role"] == "user" for m in messages[:-1]):
        raise bad("messages", "'messages' must end with the assistant's answer to score, after a user message")
    prompt, (answer,) = encode_answers(app.tok, ChatPrompt(messages[:-1]), [messages[-1]["content"]], {})
    return [prompt + answer]


def fit(app, body: dict, seqs: list, names: list, params: list) -> list:
    """vLLM's truncate_prompt_tokens (left truncation: a long document's last tokens) on each input, then one still
    longer than the context refused by its name (names[i], params[i])."""
    from tritongpt.train.serve import APIError, truncation

    context = app.max_model_len  # (--max-model-len, else the model's)
    keep = truncation(body, context)
    if keep is not None:
        seqs = [s[-keep:] for s in seqs]
    for s, name, param in zip(seqs, names, params):
        if len(s) > context:
            raise APIError(400, f"{name} is {len(s)} tokens; this model's maximum context length is {context} "
                                "tokens: shorten it", param=param)
    return seqs


def run(app, seqs: list):
    """The Pooler's outputs of seqs under the model's turn, each input a request in /metrics (vLLM's: an engine
    request an input) finished "stop" with its tokens as prompt tokens, or "error" if the forward fails."""
    timings = [app.metrics.request() for _ in seqs]
    try:
        out = app.pooler(seqs, app.turn(timings[0]))
    except Exception:
        for timing in timings:
            timing.end(["error"])
        raise
    for timing, s in zip(timings, seqs):
        timing.scheduled = timings[0].scheduled  # (they took the model together)
        timing.end(["stop"], len(s))
    return out


def pool(handler, path: str, body: dict) -> dict:
    """POST /v1/embeddings (OpenAI's EmbeddingResponse) or /pooling (vLLM's PoolingResponse)."""
    from tritongpt.train.serve import bad, check_fields

    app = handler.server.app
    pooler = app.pooler
    endpoint = "embeddings" if path == EMBEDDINGS else "pooling"
    check_fields(body, endpoint, app.name)
    # (null is the default; another falsy value, "", 0, false, [], is no format: refused, not read as float)
    encoding_format = "float" if body.get("encoding_format") is None else body["encoding_format"]
    if encoding_format not in ("float", "base64"):
        raise bad("encoding_format", f"'encoding_format' must be \"float\" or \"base64\", got {encoding_format!r}")
    if body.get("user") is not None and not isinstance(body["user"], str):  # (as completions refuse it)
        raise bad("user", "'user' must be a string")
    if body.get("dimensions") is not None:  # (vLLM's: only a Matryoshka model takes it)
        raise bad("dimensions", f"'dimensions' is not supported: this model's embeddings have "
                                f"{app.model.config.n_embd} dimensions (it is not a Matryoshka model)")
    if "messages" in body and "input" in body:
        raise bad("messages", "pass 'input' or 'messages', not both")
    if "messages" in body:
        if pooler.kind != "reward":
            raise bad("messages", "'messages' is scored by a reward model; this server embeds: send 'input'")
        seqs = chat_ids(app, body["messages"])
    else:
        seqs = input_ids(app, body)
    param = "messages" if "messages" in body else "input"
    seqs = fit(app, body, seqs, [f"input {i}" for i in range(len(seqs))], [param] * len(seqs))
    out = run(app, seqs)
    kind = "embedding" if endpoint == "embeddings" else "pooling"
    field = "embedding" if endpoint == "embeddings" else "data"
    data = [{"index": i, "object": kind, field: encoded(v.reshape(-1).tolist(), encoding_format)}
            for i, v in enumerate(out)]
    tokens = sum(map(len, seqs))
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return {"id": f"{'embd' if kind == 'embedding' else 'pool'}-{uuid.uuid4().hex}", "object": "list",
            "created": int(time.time()), "model": app.name, "data": data, "usage": usage}


def texts(body: dict, field: str, one: bool = False, listed: bool = False) -> list:
    """A field of text (a string, or unless one a non-empty list of strings; with listed only the list, as vLLM's
    rerank documents) -> its strings, an empty one refused by name."""
    from tritongpt.train.serve import bad

    value = body.get(field)
    items = [value] if isinstance(value, str) and not listed else value
    if one and not isinstance(value, str) or not isinstance(items, list) or not items or not all(
            isinstance(x, str) for x in items):
        want = "a string" if one else "a non-empty list of strings" if listed else \
            "a string or a non-empty list of strings"
        raise bad(field, f"'{field}' must be {want}, got {value!r}"[:300])
    for i, x in enumerate(items):
        if not x:
            raise bad(field, f"'{field}' is empty" if isinstance(value, str) else f"'{field}[{i}]' is empty")
    return items


def pair_scores(app, body: dict, first: list, second: list, fields: tuple) -> tuple:
    """(each pair's score, the pairs' prompt tokens) of first[0] against every text of second (1:N) or first[i]
    against second[i] (N:N), vLLM's rule. An embedder's score is the cosine similarity of the two texts' embeddings
    (vLLM's for an embedding model; a 1:N query embedded once, but counted in every pair as vLLM's usage counts
    each pair's two texts: score_utils' _cosine_similarity, less the pad token it puts between them where its
    tokenizer has one); a reward model's is its reward of the chat [user: first, assistant: second], laid out as
    chat_ids lays out `reward`'s and `rlhf`'s."""
    import torch.nn.functional as F

    def name(field, given, i):
        return f"'{field}'" if len(given) == 1 else f"'{field}[{i}]'"

    if app.pooler.kind == "reward":
        pairs = [(first[0] if len(first) == 1 else first[i], t) for i, t in enumerate(second)]
        seqs = [chat_ids(app, [{"role": "user", "content": a}, {"role": "assistant", "content": b}])[0]
                for a, b in pairs]
        seqs = fit(app, body, seqs, [f"the chat of {name(fields[1], second, i)}" for i in range(len(seqs))],
                   [fields[1]] * len(seqs))
        return run(app, seqs).tolist(), sum(map(len, seqs))
    seqs = [app.encode(t) for t in first + second]
    names = [name(fields[0], first, i) for i in range(len(first))] + [
        name(fields[1], second, i) for i in range(len(second))]
    seqs = fit(app, body, seqs, names, [fields[0]] * len(first) + [fields[1]] * len(second))
    out = run(app, seqs).double()  # ([1, C] against [N, C] broadcasts: one query, many texts)
    firsts = seqs[:len(first)] * (len(second) if len(first) == 1 else 1)
    return F.cosine_similarity(out[:len(first)], out[len(first):], dim=-1).tolist(), \
        sum(map(len, firsts + seqs[len(first):]))


def score(handler, path: str, body: dict) -> dict:
    """POST /score (vLLM's ScoreResponse) or /rerank (vLLM's RerankResponse, Jina's and Cohere's shape)."""
    from tritongpt.train.serve import bad, check_fields

    app = handler.server.app
    if path in SCORE_PATHS:
        check_fields(body, "score", app.name)
        first, second = texts(body, "text_1"), texts(body, "text_2")
        if len(first) > 1 and len(first) != len(second):  # (vLLM's rule: 1:1, 1:N or N:N)
            raise bad("text_2", f"'text_1' has {len(first)} texts and 'text_2' {len(second)}: score one text_1 "
                                "against one or many text_2, or pairwise lists of equal length")
        scores, tokens = pair_scores(app, body, first, second, ("text_1", "text_2"))
        data = [{"index": i, "object": "score", "score": v} for i, v in enumerate(scores)]
        return {"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": app.name,
                "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}}
    check_fields(body, "rerank", app.name)
    query, documents = texts(body, "query", one=True), texts(body, "documents", listed=True)
    top_n = body.get("top_n")
    if top_n is not None and (not is_int(top_n) or top_n < 0):
        raise bad("top_n", f"'top_n' must be a non-negative integer (the best documents returned; 0 or left out: "
                           f"all), got {top_n!r}")
    scores, tokens = pair_scores(app, body, query, documents, ("query", "documents"))
    # (stable: ties keep their order; top_n 0 is vLLM's default, every document)
    order = sorted(range(len(documents)), key=lambda i: -scores[i])[:top_n or None]
    results = [{"index": i, "document": {"text": documents[i]}, "relevance_score": scores[i]} for i in order]
    return {"id": f"rerank-{uuid.uuid4().hex}", "model": app.name, "usage": {"prompt_tokens": tokens,
            "total_tokens": tokens}, "results": results}


def refused(app, path: str) -> str | None:
    """Why path is not served by this runner (a 404, as vLLM registers only its runner's routes), or None."""
    pooler = app.pooler
    if pooler is None and path in (EMBEDDINGS, POOLING) + SCORE_PATHS + RERANK_PATHS:
        return f"{path} is served with --runner pooling; this server generates"
    if pooler is not None and (path in GENERATE_PATHS or path.startswith("/v1/responses/")):
        return f"{path} is not served with --runner pooling (this server answers {served_path(pooler)})"
    if pooler is not None and path == EMBEDDINGS and pooler.kind == "reward":
        return f"{path} is not served for a reward model: its scores are at POST {POOLING} (or --convert embed)"
    return None


def served_path(pooler) -> str:
    return f"POST {POOLING}, /score and /rerank" if pooler.kind == "reward" else \
        f"POST {EMBEDDINGS}, {POOLING}, /score and /rerank"
