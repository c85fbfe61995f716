"""`tritongpt serve`: one model behind an OpenAI-compatible HTTP API (the standard library's http.server).

    tritongpt serve --weights runs/sft --port 8000
    curl localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}]}'

Endpoints and shapes follow OpenAI's API reference (GET /v1/models, POST /v1/completions, POST /v1/chat/completions,
streaming as server-sent events ending in `data: [DONE]`, errors as {"error": {message, type, param, code}}); GET
/metrics is Prometheus' text format under vLLM's metric names (train/metrics.py); the sampling fields beyond
OpenAI's (top_k, min_p, repetition_penalty; ignore_eos, min_tokens, stop_token_ids, include_stop_str_in_output: end
rules, as vLLM's SamplingParams and detokenizer apply them) are vLLM's (vllm/entrypoints/openai/protocol.py).
The text is generate()'s: a completion is what `tritongpt generate` prints after the prompt, a chat answer what
`tritongpt chat` answers to the same messages (its Conversation renders them), cut at the same stop strings. A field
this server does not implement (functions, suffix, ...) is refused by name, never ignored. Tool calling is vLLM's
(tool_setting): a named function or "required", held to the tools' schemas by structured outputs
(train/structured.py) and answered as message.tool_calls; "auto" with --enable-auto-tool-choice and a
--tool-call-parser (train/tool_calls.py: the calls found in the model's own syntax), else refused as vLLM refuses it.
logprobs (completions' `logprobs: k`, `echo`; chat's `logprobs: true, top_logprobs: k`) are the model's raw
log-softmax over its vocabulary (vLLM's default "raw_logprobs": before logit_bias, penalties, temperature and cuts)
at each drawn token, taken from the very logits its decode step drew from (generate.step_logprobs); the prompt's
(echo) from the engine's prefill of the request itself (Engine.submit's prompt_logprobs), or with no engine one
forward of the whole prompt. A token's text is its bytes as UTF-8, or "bytes:\\xe2\\x80" where
they are part of a character (OpenAI's spelling). vLLM's response extras: prompt_logprobs (its ranked dicts, from the
same scoring as echo's), stop_reason, skip_special_tokens, return_tokens_as_token_ids and return_token_ids
(output_settings).
One model; requests decode together in one batch (train/engine.py's continuous batching, --max-batch rows), a
completion's prompts too (each its own engine request, all at once: vLLM's), or with --max-batch 1 one request at a
time (a lock), the others waiting their turn. vLLM's use_beam_search (n the beam width, length_penalty) runs
train/beam_search.py's search outside the engine, holding the model while it runs (Model.beam_search).
vLLM's operational endpoints (vllm/entrypoints/openai/api_server.py, protocol.py): GET /health (200, or a 503 once the
engine's thread died), GET /version, POST /tokenize and /detokenize (TokenizeCompletionRequest, TokenizeChatRequest,
DetokenizeRequest); --api-key (or $TRITONGPT_API_KEY, vLLM's VLLM_API_KEY) asks every other path for the bearer key.
"""
import copy
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import select
import socket
import sys
import threading
import time
import traceback
import uuid
from contextlib import contextmanager, nullcontext
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tritongpt._types import is_int, is_real
from tritongpt.cli import command_help
from tritongpt.errors import EngineDown, FieldError, UserError, note, read_json_object
from tritongpt.train.metrics import Metrics
from tritongpt.train.pooling import CONVERTS, RUNNERS, check_pooling_args
from tritongpt.train.responses import Store
from tritongpt.train.tool_calls import AutoStream, CallStream, tool_call_id
from tritongpt.train.structured import KINDS, OPTIONS

# fields every generation request takes (OpenAI's, then vLLM's extra sampling settings)
COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "frequency_penalty",
                 "presence_penalty", "stream", "stream_options", "user", "top_k", "min_p", "repetition_penalty",
                 "ignore_eos", "min_tokens", "stop_token_ids", "include_stop_str_in_output", "prompt_logprobs",
                 "skip_special_tokens", "spaces_between_special_tokens", "return_tokens_as_token_ids",
                 "truncate_prompt_tokens", "return_token_ids",
                 "response_format", "structured_outputs", "use_beam_search", "length_penalty",
                 "allowed_token_ids", "bad_words"}
FIELDS = {"completions": COMMON_FIELDS | {"prompt", "echo", "best_of", "logprobs", "logit_bias"},
          "chat": COMMON_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "logit_bias",
                                   "tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs",
                                   "include_reasoning", "add_generation_prompt", "continue_final_message",
                                   "prediction"}}
# OpenAI's fields this server does not implement: refused unless null or false (their "off"); chat takes the tool
# fields (tool_setting), completions none
UNSUPPORTED = {"suffix", "tools", "tool_choice", "functions",
               "function_call", "parallel_tool_calls", "audio", "modalities", "prediction",
               "reasoning_effort", "web_search_options", "store", "metadata", "service_tier"}
# POST /tokenize's and /detokenize's fields (vLLM's)
FIELDS["tokenize"] = {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt", "return_token_strs",
                      "tools", "chat_template_kwargs", "continue_final_message"}
FIELDS["detokenize"] = {"model", "tokens"}
# --runner pooling's (train/pooling.py): OpenAI's EmbeddingCreateParams, vLLM's PoolingRequest (its chat form too)
FIELDS["embeddings"] = {"model", "input", "encoding_format", "dimensions", "user", "truncate_prompt_tokens"}
FIELDS["pooling"] = FIELDS["embeddings"] | {"messages"}
FIELDS["score"] = {"model", "text_1", "text_2", "truncate_prompt_tokens"}  # vLLM's ScoreRequest, RerankRequest
FIELDS["rerank"] = {"model", "query", "documents", "top_n", "truncate_prompt_tokens"}
# vLLM's tokenize fields this server does not implement: refused unless null or false
TOKENIZE_UNSUPPORTED = {"mm_processor_kwargs"}
# a chat template from the request (chat and tokenize's chat_template, or chat_template_kwargs' one, which
# transformers' apply_chat_template would take as its argument: a template or a template's name): vLLM refuses it
# unless started with --trust-request-chat-template, which this server does not have
REQUEST_TEMPLATE = ("a chat template from the request is not supported (vLLM refuses one without "
                    "--trust-request-chat-template, which this server does not have): start the server with "
                    "--chat-template FILE, the template, or the name of one of the tokenizer's templates")
API_KEY_ENV = "TRITONGPT_API_KEY"  # vLLM's VLLM_API_KEY
# the paths that answer without the API key (probes and scrapes); every other one needs it, unknown ones too (a 401,
# not a 404 that would map the routes): stricter than vLLM's middleware, which asks only paths under /v1
PUBLIC_PATHS = ("/health", "/version", "/metrics")
LORA_PATHS = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")  # vLLM's runtime LoRA updating
MAX_N = 128  # OpenAI's limit on n
MAX_BATCH = 8  # serve's --max-batch default
# vLLM decodes greedily below this temperature (vllm/v1/sample/sampler.py's _SAMPLING_EPS: Sampler.sample takes the
# argmax where temperature < _SAMPLING_EPS); generate, as transformers, samples at any temperature its fp32 division
# does not round to 0
SAMPLING_EPS = 1e-5
# the most top tokens a drawn token's logprobs list: vLLM's default --max-logprobs and OpenAI chat's top_logprobs
# limit (OpenAI's legacy completions took 5)
MAX_LOGPROBS = 20
# what use_beam_search cannot go with here, each with its value that changes nothing (None and false are off too):
# logprobs, echo (vLLM's beam search returns its beams at the end, its logprobs aside), sampling (the search is
# deterministic), the end rules beam_search() does not apply (stop strings, more end tokens, min_tokens), structured
# outputs and tools (no guide in the search), a prediction (no speculation in the search)
BEAM_REFUSED = {"echo": None, "logprobs": None, "top_logprobs": None,
                "prompt_logprobs": None, "prediction": None, "best_of": None, "top_p": 1, "top_k": -1, "min_p": 0,
                "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": None, "stop": None, "stop_token_ids": None,
                "min_tokens": 0, "response_format": None, "structured_outputs": None, "tools": None,
                "tool_choice": None, "parallel_tool_calls": None, "temperature": 1, "allowed_token_ids": None,
                "bad_words": None}
# the --generation-config defaults a beam search takes: the repetition penalty it applies (transformers' beam search
# takes the model's too); not the sampling ones, said at start (generation_config): vLLM's search takes the
# temperature, ours ranks the raw log-probabilities (temperature 1), top_p, top_k and min_p cut nothing in either
BEAM_DEFAULTS = ("repetition_penalty",)
# vLLM's fields for structured outputs before its 0.12, which took structured_outputs in their place: refused with that
REMOVED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar",
           "guided_whitespace_pattern": "whitespace_pattern", "guided_decoding_backend": None}
MAX_BODY = 32 * 2**20  # bytes: far past any prompt a context holds; a larger Content-Length is refused, not allocated


class APIError(Exception):
    """A request the server refuses: its HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, param=None, kind="invalid_request_error", code=None):
        super().__init__(message)
        self.status, self.param, self.kind, self.code = status, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


def check_body_length(length: int):
    """A body of `length` bytes past MAX_BODY: a 413 (read_body's, before reading it; run-batch's for a line's)."""
    if length > MAX_BODY:
        raise APIError(413, f"the body is {length} bytes (Content-Length); this server takes at most {MAX_BODY}",
                       code="request_too_large")


def bad(field, message):
    return APIError(400, message, param=field)


def served_name(weights) -> str:
    """The model id /v1/models lists by default: a Hub repo's id for its cached snapshot folder
    (.../models--owner--name/snapshots/HASH, where fetch_hub_repos put it), else --weights as given (vLLM's)."""
    from pathlib import Path

    for part in Path(weights).parts:
        if part.startswith("models--"):
            return part[len("models--"):].replace("--", "/")
    return str(weights)


def check_fields(body: dict, endpoint: str, served, unsupported=UNSUPPORTED):
    """An unknown field, or one the API has that this server does not implement, refused by name; a model other
    than the served ones (served: the model's name, then its LoRA adapters') a 404."""
    for key in body:
        if key == "chat_template" and endpoint in ("chat", "tokenize"):  # (vLLM's field: refused, and why)
            if body[key] is not None:
                raise bad(key, f"'chat_template': {REQUEST_TEMPLATE}")
        elif key in unsupported and key not in FIELDS[endpoint]:
            if body[key] is not None and body[key] is not False:  # (not `in (None, False)`: 0 == False)
                where = " on /v1/completions: it is a /v1/chat/completions field" \
                    if endpoint == "completions" and key in FIELDS["chat"] else " by this server"
                raise bad(key, f"'{key}' is not supported{where}")
        elif key in REMOVED and endpoint in ("completions", "chat"):
            use = f'"structured_outputs": {{"{REMOVED[key]}": ...}}' if REMOVED[key] else "nothing (one backend here)"
            if REMOVED[key] and REMOVED[key] not in KINDS + OPTIONS:  # (not a replacement refused in its turn)
                use = f"vLLM's structured_outputs.{REMOVED[key]}, not built here"
            raise bad(key, f"'{key}' is vLLM's field before 0.12, which removed it: use {use}")
        elif key not in FIELDS[endpoint]:
            raise bad(key, f"unknown field '{key}'")
    model, served = body.get("model"), (served,) if isinstance(served, str) else tuple(served)
    if model is not None and model not in served:
        raise APIError(404, f"the model '{model}' does not exist: this server serves "
                            f"{', '.join(repr(n) for n in served)}", "model", code="model_not_found")


def bool_field(body: dict, key: str, default: bool) -> bool:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise bad(key, f"'{key}' must be true or false, got {value!r}")
    return default if value is None else value


def check_token_ids(ids: list, vocab: int, field: str):
    if not all(0 <= t < vocab for t in ids):
        raise bad(field, f"'{field}' token ids must be in [0, {vocab}) (the model's vocabulary), got "
                         f"{min(ids)}..{max(ids)}")


def api_key(args) -> str | None:
    """The key requests must bear: --api-key, else $TRITONGPT_API_KEY (vLLM's rule: the flag first, an empty
    variable unset), else None (no key asked)."""
    key, where = (args.api_key, "--api-key") if args.api_key is not None else \
        (os.environ.get(API_KEY_ENV) or None, f"${API_KEY_ENV}")
    return None if key is None else check_api_key(key, where)


def check_api_key(key: str, where: str) -> str:
    """key, if a header carries it as every client sends it: printable ASCII, no space. (A header's value is
    stripped; other characters go as the client's encoding has them, Python's latin-1, curl's UTF-8, so no one key
    matches them all; a control character is an error in http.client that quotes the header, key and all.) Else a
    UserError naming where it came from, never the key."""
    if not key or not all("!" <= c <= "~" for c in key):
        raise UserError(f"{where} is empty or holds whitespace, a control character or one outside ASCII: no request "
                        f"could send it")
    return key


def sampled(s: dict) -> bool:
    """Whether a request's settings (sampling_settings') draw at random: vLLM's, a temperature of SAMPLING_EPS or
    more (below it greedy, its seed unused)."""
    return s["temperature"] >= SAMPLING_EPS


def sampling_settings(body: dict, endpoint: str, served, parser=None, defaults=None) -> dict:
    """The request's generation settings, each field checked against OpenAI's range (vLLM's for its own fields);
    an unknown field, or one OpenAI has that this server does not implement, refused by name. parser: the server's
    tool-call parser (--tool-call-parser), which "auto" tool choice needs. defaults: the server's
    (--generation-config: generation_config's), each taken where the request leaves its field out or null (vLLM's
    default_sampling_params); by a beam search only those it applies (BEAM_DEFAULTS: it samples nothing)."""
    check_fields(body, endpoint, served)
    beam = beam_setting(body)  # (first: a field beam search cannot take is named as that, not by its own checks)
    if defaults:
        body = {**body, **{k: v for k, v in defaults.items() if k != "max_tokens" and body.get(k) is None and (
            beam is None or k in BEAM_DEFAULTS)}}

    def number(key, default, low, high, low_open=False, integer=False):
        value = body.get(key)
        if value is None:
            return default
        ok = is_int(value) if integer else is_real(value) and math.isfinite(value)
        if not ok or value < low or value > high or (low_open and value == low):
            what = "an integer" if integer else "a number"
            where = f"{'>' if low_open else '>='} {low}" if high == math.inf else \
                f"in {'(' if low_open else '['}{low}, {high}]"
            raise bad(key, f"'{key}' must be {what} {where}, got {value!r}")
        return value

    s = dict(temperature=float(number("temperature", 1.0, 0, 2)), top_p=float(number("top_p", 1.0, 0, 1, True)),
             n=number("n", 1, 1, MAX_N, integer=True), seed=number("seed", None, -2**63, 2**63 - 1, integer=True),
             frequency_penalty=float(number("frequency_penalty", 0.0, -2, 2)),
             presence_penalty=float(number("presence_penalty", 0.0, -2, 2)),
             min_p=number("min_p", None, 0, 1),
             repetition_penalty=number("repetition_penalty", None, 0, math.inf, low_open=True))
    top_k = body.get("top_k")
    if top_k is not None and (not is_int(top_k) or top_k < -1):  # (0 or -1: every token, vLLM's "disable")
        raise bad("top_k", f"'top_k' must be a positive integer, or 0 or -1 for all tokens, got {top_k!r}")
    s["top_k"] = None if top_k in (None, 0, -1) else top_k
    # max_completion_tokens: chat's newer name for max_tokens
    names = [k for k in ("max_tokens", "max_completion_tokens") if body.get(k) is not None]
    if len(names) > 1:
        raise bad(names[1], "pass one of 'max_tokens' and 'max_completion_tokens'")
    s["echo"] = bool_field(body, "echo", False) if endpoint == "completions" else False
    if names and is_int(body[names[0]]) and body[names[0]] == 0 and not s["echo"]:  # (vLLM's rule too)
        why = " (0 is taken with 'echo': true, to score the prompt)" if endpoint == "completions" else ""
        raise bad(names[0], f"'{names[0]}' must be an integer >= 1, got 0{why}")
    s["max_tokens"] = number(names[0], None, 0, math.inf, integer=True) if names else \
        (16 if endpoint == "completions" else None)  # chat: to the end of the turn, or of the context
    s["logprobs"] = logprobs_setting(body, endpoint)
    s["logit_bias"] = logit_bias_setting(body.get("logit_bias"))
    allowed, words = body.get("allowed_token_ids"), body.get("bad_words")
    if allowed is not None and (not isinstance(allowed, list) or not allowed or
                                not all(is_int(t) and t >= 0 for t in allowed)):
        raise bad("allowed_token_ids", f"'allowed_token_ids' must be a non-empty list of token ids, got {allowed!r}")
    if words is not None and (not isinstance(words, list) or not all(isinstance(w, str) and w.strip() for w in words)):
        raise bad("bad_words", f"'bad_words' must be a list of non-empty strings, got {words!r}")
    s["allowed_token_ids"], s["bad_words"] = allowed or None, words or None
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(t, str) and t for t in stops):
        raise bad("stop", f"'stop' must be a non-empty string or a list of them, got {stop!r}")
    s["stops"] = stops
    s["structured"], s["structured_field"] = structured_setting(body)
    s.update(end_settings(body, s["max_tokens"]))
    s["stream"] = bool_field(body, "stream", False)
    s["tools"] = tool_setting(body, s, parser) if endpoint == "chat" else None
    s["template_kwargs"] = template_kwargs(body) if endpoint == "chat" else None
    s["prompt_mode"] = prompt_mode(body) if endpoint == "chat" else "generate"
    # vLLM's include_reasoning: false leaves a reasoning model's thought out of the answer (--reasoning-parser)
    s["include_reasoning"] = bool_field(body, "include_reasoning", True) if endpoint == "chat" else True
    s.update(output_settings(body, s))
    s["prediction"] = prediction_setting(body, s) if endpoint == "chat" else None
    if s["tools"] is not None and s["tools"]["choice"] == "auto" and parser.keeps_specials:
        s["skip_special_tokens"] = False  # (vLLM's adjust_request: tokenizers may mark <tool_call> special)
    s["include_usage"], s["continuous_usage"] = stream_options(body.get("stream_options"), s["stream"])
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad("user", "'user' must be a string")
    if endpoint == "completions":
        best_of = body.get("best_of")
        if best_of is not None and not is_int(best_of):  # (True == 1)
            raise bad("best_of", f"'best_of' must be an integer, got {best_of!r}")
        if best_of is not None and best_of != s["n"]:  # best_of = n draws n and returns them all: plain sampling
            raise bad("best_of", f"'best_of' other than n is not supported by this server, got {best_of!r}")
    s["beam"] = beam
    return s


def beam_setting(body: dict) -> dict | None:
    """vLLM's use_beam_search (protocol.py's to_beam_search_params: n the beam width, length_penalty, ignore_eos,
    include_stop_str_in_output, max_tokens, temperature) -> {"length_penalty": ...}, or None without it. A field in
    BEAM_REFUSED given a value that changes something is refused by name; length_penalty without beam search too
    (vLLM ignores it there)."""
    on = bool_field(body, "use_beam_search", False)
    penalty = body.get("length_penalty")
    if not on:
        if penalty is not None:
            raise bad("length_penalty", "'length_penalty' is a beam search setting: pass 'use_beam_search': true")
        return None
    if penalty is not None and (not is_real(penalty) or not math.isfinite(penalty)):
        raise bad("length_penalty", f"'length_penalty' must be a finite number, got {penalty!r}")
    for key, neutral in BEAM_REFUSED.items():
        if key == "best_of":  # (best_of = n: the beam width already, as vLLM's search reads n)
            neutral = body.get("n") if is_int(body.get("n")) else 1
        value = body.get(key)
        off = value is None or value is False or value in ([], {}) or (
            neutral is not None and is_real(value) and not isinstance(value, bool) and value == neutral) or (
            key == "top_k" and value == 0 and not isinstance(value, bool))  # (top_k 0: every token too)
        if not off:
            why = " (the search scores the model's log-probabilities as they are: temperature 1)" \
                if key == "temperature" else ""
            raise bad(key, f"'{key}' cannot be used with 'use_beam_search': true on this server{why}"[:300])
    return {"length_penalty": 1.0 if penalty is None else float(penalty)}


def prompt_mode(body: dict) -> str:
    """vLLM's add_generation_prompt (default true; false beside continue_final_message, which transformers'
    apply_chat_template refuses with it true) and continue_final_message (default false): "generate" (the
    template's generation prompt: a new assistant turn), "continue" (the final assistant message continued) or
    "none" (the messages rendered as they are)."""
    cont = bool_field(body, "continue_final_message", False)
    gen = bool_field(body, "add_generation_prompt", not cont)
    if cont and gen:
        raise bad("continue_final_message", "Cannot set both `continue_final_message` and `add_generation_prompt` to "
                                            "True.")
    return "continue" if cont else "generate" if gen else "none"


def template_kwargs(body: dict) -> dict | None:
    """vLLM's chat_template_kwargs: more variables for the chat template (transformers' apply_chat_template kwargs,
    e.g. Qwen3's {"enable_thinking": false}), an object whose keys are not the template's own variables (messages,
    tools, ...: the request's fields give those); None where not given."""
    from tritongpt.train.chat_template import RENDER_VARIABLES

    kwargs = body.get("chat_template_kwargs")
    if kwargs is None:
        return None
    if not isinstance(kwargs, dict):
        raise bad("chat_template_kwargs", f"'chat_template_kwargs' must be an object of the chat template's variables, "
                                          f"got {kwargs!r}"[:300])
    if "continue_final_message" in kwargs:  # (apply_chat_template's argument, no variable: the template never reads it)
        raise bad("chat_template_kwargs", "'chat_template_kwargs' may not set 'continue_final_message': it is no "
                                          "template variable; send it as the request's own field")
    if kwargs.get("chat_template") is not None:  # (apply_chat_template's argument, not a variable: it was ignored)
        raise bad("chat_template_kwargs", f"'chat_template_kwargs' may set no 'chat_template': {REQUEST_TEMPLATE}")
    taken = sorted(RENDER_VARIABLES & set(kwargs))
    if taken:
        raise bad("chat_template_kwargs", f"'chat_template_kwargs' may not set {taken[0]!r}: the request's fields "
                                          "and the server give the template its " + ", ".join(sorted(RENDER_VARIABLES)))
    return kwargs or None


def structured_setting(body: dict):
    """(The request's structured outputs (train/structured.py StructuredOutputs), from vLLM's structured_outputs or
    OpenAI's response_format (one of them), or None; the field it came from)."""
    from tritongpt.train.structured import StructureError, request_structure

    try:
        return request_structure(body)
    except StructureError as e:
        raise bad(e.field, str(e)) from None


TOOL_FIELDS = {"name", "description", "parameters", "strict"}  # OpenAI's function definition ("strict": the schema
# holds here whatever it says, as response_format's)
AUTO_REFUSED = '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'  # vLLM's words:
# "auto" lets the model write text or calls in its own syntax, which the server's parser finds (train/tool_calls.py)
NAMED_USAGE = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'


def check_tools(tools) -> list:
    """OpenAI's tools, [{"type": "function", "function": {"name", "description", "parameters"}}], each field checked
    (a 400 naming it: tools[1].function.parameters); -> the tools as the chat template gets them (vLLM's
    tool.model_dump(): type, and the function's name, description and parameters, null where not given)."""
    if not isinstance(tools, list):
        raise bad("tools", f"'tools' must be a list of {{\"type\": \"function\", \"function\": {{...}}}}, got "
                           f"{type(tools).__name__}")
    out, names = [], set()
    for j, tool in enumerate(tools):
        at = f"tools[{j}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise bad(at, f"'{at}' must be {{\"type\": \"function\", \"function\": {{...}}}} (function tools are "
                          f"the only kind), got {tool!r}"[:300])
        extra = sorted(set(tool) - {"type", "function"})
        if extra:
            raise bad(f"{at}.{extra[0]}", f"unknown field '{at}.{extra[0]}'")
        f = tool.get("function")
        if not isinstance(f, dict):
            raise bad(f"{at}.function", f"'{at}.function' must be an object with a name, got {f!r}"[:300])
        extra = sorted(set(f) - TOOL_FIELDS)
        if extra:
            raise bad(f"{at}.function.{extra[0]}", f"unknown field '{at}.function.{extra[0]}' (a function takes "
                                                   f"{sorted(TOOL_FIELDS)})")
        name = f.get("name")
        if not isinstance(name, str) or not name:
            raise bad(f"{at}.function.name", f"'{at}.function.name' must be a non-empty string, got {name!r}")
        if name in names:  # ("required"'s calls name their function: two alike could not be told apart)
            raise bad(f"{at}.function.name", f"two tools are named {name!r}")
        names.add(name)
        for key, kind, what in (("description", str, "a string"), ("parameters", dict, "a JSON schema object"),
                                ("strict", bool, "true or false")):
            if f.get(key) is not None and not isinstance(f[key], kind):
                raise bad(f"{at}.function.{key}", f"'{at}.function.{key}' must be {what}, got {f[key]!r}"[:300])
        kind = (f.get("parameters") or {}).get("type", "object")
        if kind != "object":  # (a call's arguments are an object's JSON text: OpenAI's, and what messages take back)
            raise bad(f"{at}.function.parameters", f"'{at}.function.parameters' must be an object's schema (a call's "
                                                   f"arguments are a JSON object), got type {kind!r}"[:300])
        out.append({"type": "function", "function": {"name": name, "description": f.get("description"),
                                                     "parameters": f.get("parameters")}})
    return out


def tool_schema(tools: list, name: str | None, parallel: bool) -> dict:
    """The JSON schema the output is held to (vLLM's ChatCompletionRequest._get_json_schema_from_tool): a named
    function's parameters (an object with no properties where it has none); for "required" an array of at least one
    {"name": one of the tools, "parameters": its schema} (at most one without parallel_tool_calls), each tool's local
    references rewritten to where its schema now is (vLLM gathers the tools' $defs at the top instead: "#" and
    "#/definitions/..." then point at the array, and two tools' $defs of one name clash)."""
    def params(t):  # (a copy: the template gets the tools as given)
        return copy.deepcopy(t["function"]["parameters"] or {"type": "object", "properties": {}})
    if name is not None:
        return params(next(t for t in tools if t["function"]["name"] == name))
    items = [{"properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                             "parameters": moved(params(t), f"#/items/anyOf/{k}/properties/parameters")},
              "required": ["name", "parameters"]} for k, t in enumerate(tools)]
    schema = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def moved(schema, to: str):
    """schema's local references ("#", "#/...") pointed at `to`, where it is placed inside another; values (enum,
    const, default, examples) left as they are: their "$ref" keys are data."""
    if isinstance(schema, list):
        return [moved(s, to) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and (value == "#" or value.startswith("#/")):  # (not "#anchor")
            out[key] = to + value[1:]
        elif key in ("enum", "const", "default", "examples"):
            out[key] = value
        elif key in ("properties", "patternProperties", "dependentSchemas", "$defs", "definitions") \
                and isinstance(value, dict):  # (its keys are names, not keywords: each value a schema)
            out[key] = {k: moved(v, to) for k, v in value.items()}
        else:
            out[key] = moved(value, to)
    return out


def tool_setting(body: dict, s: dict, parser=None) -> dict:
    """The request's tool calling, vLLM's (protocol.py's check_tool_usage, then serving_chat.py): {"tools": the tools
    for the chat template (None: none given), "choice": "none", "named", "required" or "auto", "name": the named
    function, "parser": the server's tool-call parser (train/tool_calls.py PARSERS; None: "auto" refused, as vLLM
    refuses it without --enable-auto-tool-choice), "parallel": parallel_tool_calls not false}. A tool_choice that
    holds the output (named, "required") sets s's structured outputs to its tool_schema; structured_outputs or
    response_format beside it is refused by name.
    "auto" leaves the text free (the request's own structured outputs kept) for the parser to find the calls in."""
    from tritongpt.train.structured import StructuredOutputs

    tools = check_tools(body["tools"]) if body.get("tools") is not None else None
    choice = body.get("tool_choice")
    if choice is None:  # (vLLM's default: "auto" once tools are given, which it then refuses without the flag)
        choice = "auto" if tools else "none"
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise bad("parallel_tool_calls", f"'parallel_tool_calls' must be true or false, got {parallel!r}")
    if parser is not None and parser.needs_tools:  # (qwen3_coder's values are typed by this request's tools)
        parser = type(parser)(tools)
    if parser is not None and parser.needs_ids:  # (Mistral v13's: an id the conversation's calls have is not kept)
        parser = type(parser)(call_ids(body.get("messages")))
    setting = {"tools": tools, "choice": "none", "name": None, "parser": parser, "parallel": parallel is not False}
    if choice == "none":
        return setting
    if tools is None:
        raise bad("tool_choice", "When using `tool_choice`, `tools` must be set.")
    if choice == "auto" and parser is None:
        raise bad("tool_choice", AUTO_REFUSED)
    if choice == "required" and not tools:  # (answered as "none", it would be text where a call was asked for, with
        # a 200: OpenAI refuses tools [] with a 400, as vLLM now does)
        raise bad("tools", 'tool_choice "required" calls one of the request\'s tools, and "tools" is empty: list the '
                           'tools to call, or ask for tool_choice "auto" or "none" to answer without one')
    if choice == "auto" and not tools:  # (none to call: "none"; the tools stay [], given: a "tool_use" template
        return setting  # renders the chat, as with tool_choice "none")
    if isinstance(choice, dict):
        f = choice.get("function")
        if choice.get("type", "function") != "function" or not isinstance(f, dict):
            raise bad("tool_choice", f"Invalid value for `function`: `{f}` in `tool_choice`! {NAMED_USAGE}")
        name = f.get("name")
        if not isinstance(name, str) or not name:
            raise bad("tool_choice", f"Invalid `name` in `function`: `{name}` in `tool_choice`! {NAMED_USAGE}")
        if name not in [t["function"]["name"] for t in tools]:
            raise bad("tool_choice", "The tool specified in `tool_choice` does not match any of the specified "
                                     f"`tools` ({name!r})")
        setting.update(choice="named", name=name)
    elif choice == "auto":
        return {**setting, "choice": "auto"}
    elif choice != "required":
        raise bad("tool_choice", f'Invalid value for `tool_choice`: {choice}! Only named tools, "none", "auto" or '
                                 '"required" are supported.'[:300])
    else:
        setting["choice"] = "required"
    if s["structured"] is not None:
        raise bad(s["structured_field"], f"'{s['structured_field']}' cannot be used with a tool_choice that calls a "
                                         "tool: that holds the output to the tool's parameters already")
    s["structured"] = StructuredOutputs(json=tool_schema(tools, setting["name"], parallel is not False))
    s["structured_field"] = "tools"
    return setting


def call_ids(messages) -> set:
    """The ids of the tool calls in a request's assistant messages (those a string; tool_messages checks them)."""
    if not isinstance(messages, list):
        return set()
    return {c["id"] for m in messages if isinstance(m, dict) and m.get("role") == "assistant"
            and isinstance(m.get("tool_calls"), list)
            for c in m["tool_calls"] if isinstance(c, dict) and isinstance(c.get("id"), str)}


def uses_tools(messages) -> bool:
    """Whether a request's messages carry tool use: an assistant's tool_calls, a role "tool" result."""
    return isinstance(messages, list) and any(isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls"))
                                              for m in messages)


def tool_messages(messages, mode: str = "generate") -> list:
    """OpenAI's messages with tool use, checked by field and made what chat templates read (vLLM's chat_utils):
    system (first only), user, assistant (content, or null beside tool_calls [{"id", "type": "function",
    "function": {"name", "arguments": JSON text of an object}}], the arguments parsed: templates write them as
    objects) and tool ({"tool_call_id": an earlier call's id, "content"}), ending with a user or tool message. As
    OpenAI's (not vLLM's, which renders whatever comes): an assistant's tool_calls are followed by tool messages
    answering every id before any other message or the end (a call left unanswered has no turn to be answered in);
    mode "none" (no generation prompt: the messages rendered as they stand) may end before they are all answered."""
    from tritongpt.train.formats import message_content

    def unanswered():
        return bad("messages", f"messages[{asked}]: an assistant message with 'tool_calls' must be followed by tool "
                               "messages responding to each 'tool_call_id'. The following tool_call_ids did not have "
                               f"response messages: {', '.join(pending)}")

    if not isinstance(messages, list) or not messages:
        raise bad("messages", "'messages' must be a non-empty list of messages")
    out, ids, pending, asked = [], set(), [], None  # pending: the last tool_calls' ids not answered yet
    for i, m in enumerate(messages):
        at = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "user", "assistant", "tool"):
            raise bad("messages", f"{at}: role {role!r} is not one of system, user, assistant, tool")
        if pending and role != "tool":
            raise unanswered()
        if role == "system" and i:
            raise bad("messages", f"{at}: a system message comes first or not at all")
        calls = m.get("tool_calls") if role == "assistant" else None
        try:
            # (an assistant's content may be empty, as OpenAI's: a stored response with no text nor call continued)
            content = "" if calls and m.get("content") in (None, "") else message_content(m, at, role == "assistant")
        except UserError as e:
            raise bad("messages", str(e)) from None
        clean = {"role": role, "content": content}
        if calls is not None:
            if not isinstance(calls, list):
                raise bad("messages", f"{at}.tool_calls must be a list of calls, got {type(calls).__name__}")
            clean["tool_calls"] = []
            for j, c in enumerate(calls):
                where = f"{at}.tool_calls[{j}]"
                f = c.get("function") if isinstance(c, dict) else None
                if not isinstance(f, dict) or not isinstance(c.get("id"), str) or not isinstance(f.get("name"), str) \
                        or not isinstance(f.get("arguments"), str) or c.get("type", "function") != "function":
                    raise bad("messages", f'{where} must be {{"id": ..., "type": "function", "function": {{"name": '
                                          f'..., "arguments": JSON text}}}}, got {c!r}'[:300])
                try:
                    args = json.loads(f["arguments"])
                except (ValueError, RecursionError):  # (RecursionError: nested past the parser's depth)
                    args = None
                if not isinstance(args, dict):
                    raise bad("messages", f"{where}.function.arguments must be the JSON text of an object, got "
                                          f"{f['arguments']!r}"[:300])
                ids.add(c["id"])
                pending, asked = pending + [c["id"]], i
                clean["tool_calls"].append({"id": c["id"], "type": "function",
                                            "function": {"name": f["name"], "arguments": args}})
        if role == "tool":
            if m.get("tool_call_id") not in ids:
                raise bad("messages", f"{at}: a tool message's tool_call_id must be an earlier assistant's tool "
                                      f"call's id, got {m.get('tool_call_id')!r}")
            clean["tool_call_id"] = m["tool_call_id"]
            pending = [p for p in pending if p != m["tool_call_id"]]
        out.append(clean)
    if mode == "continue" and (out[-1]["role"] != "assistant" or out[-1].get("tool_calls")):
        what = "an assistant's tool calls" if out[-1].get("tool_calls") else f"a {out[-1]['role']} message"
        raise bad("messages", "continue_final_message continues the final message: 'messages' must end with an "
                              f"assistant's text, not {what}")
    if mode == "generate" and out[-1]["role"] not in ("user", "tool"):
        raise bad("messages", f"'messages' must end with a user or tool message, not a {out[-1]['role']} one (an "
                              "assistant's answer is continued with continue_final_message)")
    if pending and mode != "none":  # ("none" renders the messages as they stand: no turn follows the calls yet)
        raise unanswered()
    return out


def tool_message(tools: dict | None, text: str, finish: str) -> tuple:
    """(A chat choice's message, its finish_reason), vLLM's (serving_chat.py's chat_completion_full_generator): the
    text as content; a named function's call with the text as its arguments (content "", the finish as drawn);
    "required"'s array parsed into its calls, each call's parameters its arguments (finish "tool_calls" where the
    text ended by itself). A "required" text that does not parse (cut by max_tokens or a stop string) stays content,
    with no calls (vLLM answers a 400 there). "auto": the calls the server's parser finds (tool_calls.PARSERS), the
    text before them the content (null where none; the first call alone with parallel_tool_calls false), finish
    "tool_calls"; a text with none all content."""
    if tools is None or tools["choice"] == "none":
        return {"role": "assistant", "content": text}, finish
    short = tools["parser"] is not None and tools["parser"].short_ids

    def calls_of(pairs):  # (a parser's call may hold the id its text gave: Mistral's v13)
        return [{"id": given[0] if given else tool_call_id(short), "type": "function",
                 "function": {"name": name, "arguments": args}} for name, args, *given in pairs]
    if tools["choice"] == "named":
        return {"role": "assistant", "content": "", "tool_calls": calls_of([(tools["name"], text)])}, finish
    if tools["choice"] == "auto":
        content, calls = tools["parser"].extract(text)
        if not calls:  # (a markup parser's content is never the raw text: harmony's headers are not the answer)
            return {"role": "assistant", "content": content if getattr(tools["parser"], "markup", False) else text}, \
                finish
        # (parallel_tool_calls false: the first call alone, vLLM's maybe_filter_parallel_tool_calls; no grammar
        # holds a free answer to one)
        return {"role": "assistant", "content": content,
                "tool_calls": calls_of(calls if tools["parallel"] else calls[:1])}, "tool_calls"
    try:  # (RecursionError: parameters nested past Python's limit, which a schema-less object lets the grammar draw)
        calls = calls_of([(c["name"], json.dumps(c["parameters"], ensure_ascii=False, allow_nan=False))
                          for c in json.loads(text)])
    except (ValueError, TypeError, KeyError, RecursionError):
        return {"role": "assistant", "content": text}, finish
    return {"role": "assistant", "content": "", "tool_calls": calls}, "tool_calls" if finish == "stop" else finish


def stream_options(options, stream: bool) -> tuple:
    """vLLM's stream_options (protocol.py's StreamOptions, read by entrypoints/utils.py's should_include_usage) ->
    (include_usage: a last chunk with the request's usage, on by default once stream_options is given;
    continuous_usage: every chunk with its prompt's and its choice's tokens so far, continuous_usage_stats, only
    with include_usage). Each field true or false, null taken as false (vLLM's bool(None)); another value, or a
    field vLLM does not have, a 400 naming it."""
    if options is None:
        return False, False
    if not stream:
        raise bad("stream_options", "'stream_options' is only allowed with 'stream': true")
    if not isinstance(options, dict):
        raise bad("stream_options", f"'stream_options' must be an object ({{\"include_usage\": true|false, "
                                    f"\"continuous_usage_stats\": true|false}}), got {options!r}"[:300])
    got = {}
    for key in options:
        if key not in ("include_usage", "continuous_usage_stats"):
            raise bad(f"stream_options.{key}", f"unknown field 'stream_options.{key}' (it takes include_usage and "
                                               "continuous_usage_stats)")
    for key, default in (("include_usage", True), ("continuous_usage_stats", False)):
        value = options.get(key, default)
        if value is not None and not isinstance(value, bool):
            raise bad(f"stream_options.{key}", f"'stream_options.{key}' must be true or false, got {value!r}"[:300])
        got[key] = bool(value)
    return got["include_usage"], got["include_usage"] and got["continuous_usage_stats"]


@contextmanager
def ended_if_failed(timing, n: int):
    """A request's clock (metrics.request()) ended for its n choices where the block fails: "abort" where the client
    left or stopped reading (draw()'s reasons), "error" otherwise; the exception raised again."""
    try:
        yield
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        timing.end(["abort"] * n)
        raise
    except Exception:
        timing.end(["error"] * n)
        raise


def usage_of(prompt_tokens: int, completion_tokens: int) -> dict:
    """OpenAI's usage object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def end_settings(body: dict, max_tokens) -> dict:
    """vLLM's ignore_eos, min_tokens (<= max_tokens), stop_token_ids and include_stop_str_in_output, checked (the ids'
    range is the model's: Completion checks it)."""
    out = {key: bool_field(body, key, False) for key in ("ignore_eos", "include_stop_str_in_output")}
    m = body.get("min_tokens")
    if m is not None and (not is_int(m) or m < 0):
        raise bad("min_tokens", f"'min_tokens' must be an integer >= 0, got {m!r}")
    if m and max_tokens is not None and m > max_tokens:
        raise bad("min_tokens", f"'min_tokens' ({m}) must be at most max_tokens ({max_tokens})")
    ids = body.get("stop_token_ids")
    if ids is not None and (not isinstance(ids, list) or not all(is_int(t) and t >= 0 for t in ids)):
        raise bad("stop_token_ids", f"'stop_token_ids' must be a list of token ids (integers >= 0), got {ids!r}")
    out["min_tokens"], out["stop_token_ids"] = m or 0, list(dict.fromkeys(ids or []))
    return out


def output_settings(body: dict, s: dict) -> dict:
    """vLLM's prompt_logprobs (refused above 0 with stream, as vLLM: 0 streamed sends nothing), skip_special_tokens
    (default true), spaces_between_special_tokens (taken, as vLLM's fast tokenizers take it: no effect, a special
    token's text is never spaced), return_tokens_as_token_ids and return_token_ids (token_ids; not with echo),
    checked; and score_k, the top tokens the prompt is scored with (echo's logprobs, prompt_logprobs'), or None (not
    scored). Echo with logprobs k gives prompt_logprobs k too unless asked otherwise (vLLM's CompletionRequest)."""
    out = {"prompt_logprobs": top_count(body, "prompt_logprobs")}
    if s["stream"] and out["prompt_logprobs"]:
        raise bad("prompt_logprobs", "'prompt_logprobs' is not available with 'stream': true (vLLM's rule too): "
                                     "send the request without stream")
    if s["stream"]:
        out["prompt_logprobs"] = None
    elif out["prompt_logprobs"] is None and s["echo"]:
        out["prompt_logprobs"] = s["logprobs"]
    out["skip_special_tokens"] = bool_field(body, "skip_special_tokens", True)
    bool_field(body, "spaces_between_special_tokens", True)
    out["as_ids"] = bool_field(body, "return_tokens_as_token_ids", False)
    # vLLM's return_token_ids: the prompt's ids and each choice's drawn ids, for a client that would re-tokenize
    out["token_ids"] = bool_field(body, "return_token_ids", False)
    if out["token_ids"] and s["echo"]:  # (vLLM's echo then drops the prompt's text for its ids: not built here)
        raise bad("return_token_ids", "'return_token_ids' cannot be used with 'echo': true on this server (the "
                                      "prompt's ids are the response's prompt_token_ids: send it without echo)")
    asked = [k for k in (out["prompt_logprobs"], s["logprobs"] if s["echo"] else None) if k is not None]
    out["score_k"] = max(asked) if asked else None
    return out


def top_count(body: dict, key: str):
    """A count of top logprobs (0..MAX_LOGPROBS), or None where not given."""
    k = body.get(key)
    if k is not None and (not is_int(k) or not 0 <= k <= MAX_LOGPROBS):
        raise bad(key, f"'{key}' must be an integer in [0, {MAX_LOGPROBS}] (this server's most top logprobs), "
                       f"got {k!r}")
    return k


def logprobs_setting(body: dict, endpoint: str):
    """The top tokens asked with each token's logprob (0..MAX_LOGPROBS), or None for no logprobs: completions'
    `logprobs: k`, chat's `logprobs: true` with `top_logprobs: k` (OpenAI's fields)."""
    if endpoint == "completions":
        return top_count(body, "logprobs")
    on = bool_field(body, "logprobs", False)
    k = top_count(body, "top_logprobs")
    if k is not None and not on:
        raise bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    return (k or 0) if on else None


def prediction_setting(body: dict, s: dict):
    """OpenAI's predicted outputs: prediction {"type": "content", "content": a string or a list of text parts} ->
    its text, or None. The answer is the model's own whatever the prediction (the engine verifies every token it
    proposes, generate.Prediction): what would decode without speculating is refused with it, as OpenAI refuses
    logprobs, so a prediction never silently does nothing (OpenAI's other refusals, n > 1, penalties and tools, are
    served: each row keeps its own place, and the penalties and grammars apply at every verified position)."""
    pred = body.get("prediction")
    if pred is None:
        return None
    want = '{"type": "content", "content": "the expected answer"}'
    if not isinstance(pred, dict) or pred.get("type") != "content" or "content" not in pred:
        raise bad("prediction", f"'prediction' must be an object {want}, got {pred!r}"[:300])
    unknown = [key for key in pred if key not in ("type", "content")]
    if unknown:
        raise bad(f"prediction.{unknown[0]}", f"unknown field 'prediction.{unknown[0]}' (it takes type and content)")
    content = pred["content"]
    parts = [content] if isinstance(content, str) else content
    if not isinstance(parts, list) or not all(
            isinstance(c, str) if isinstance(content, str) else
            isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str) and set(c) <= {
                "type", "text"} for c in parts):
        raise bad("prediction.content", "'prediction.content' must be a string or a list of "
                                        f'{{"type": "text", "text": ...}} parts, got {content!r}'[:300])
    for key, on in (("logprobs", s["logprobs"] is not None), ("min_tokens", s["min_tokens"] > 0),
                    ("prompt_logprobs", s["prompt_logprobs"] is not None)):
        if on:  # (decoded a token a step: the prediction would go unused)
            raise bad(key, f"'{key}' is not supported with 'prediction' (its tokens are decoded one at a time, so "
                           "the prediction would go unused)")
    return content if isinstance(content, str) else "".join(c["text"] for c in parts)


def truncation(body: dict, context: int):
    """vLLM's truncate_prompt_tokens: a prompt's (an input's) last k tokens only, left truncation; -1 the context's
    length; None: the whole prompt (a longer one refused as ever). -> k or None."""
    k = body.get("truncate_prompt_tokens")
    if k is None:
        return None
    if not is_int(k) or not (k >= 1 or k == -1):
        raise bad("truncate_prompt_tokens", f"'truncate_prompt_tokens' must be a positive integer (the prompt's "
                                            f"last tokens kept) or -1 (the model's context), got {k!r}")
    if k > context:  # (vLLM's rule)
        raise bad("truncate_prompt_tokens", f"'truncate_prompt_tokens' ({k}) is more than the model's context "
                                            f"({context}): select a smaller truncation size")
    return context if k == -1 else k


def logit_bias_setting(bias):
    """OpenAI's logit_bias {"token id": bias in [-100, 100]} as {id: bias}, or None. (The ids' range is the
    model's: Completion checks it.)"""
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise bad("logit_bias", f"'logit_bias' must be an object of token ids to biases, got {bias!r}")
    out = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()):
            raise bad("logit_bias", f"'logit_bias' keys must be token ids (non-negative integers), got {key!r}")
        if len(key) > 4300:  # (int() refuses more digits, a ValueError: no vocabulary is that large anyway)
            raise bad("logit_bias", f"'logit_bias' keys must be token ids of the model's vocabulary, got a key of "
                                    f"{len(key)} digits")
        if not is_real(value) or not -100 <= value <= 100:
            raise bad("logit_bias", f"'logit_bias' values must be numbers in [-100, 100], got {value!r} for {key!r}")
        out[int(key)] = float(value)
    return out or None


def bad_words_ids(encode, words: list, vocab: int) -> list:
    """vLLM's bad_words tokenized (generate.bad_words_tokens) by encode, App.encode (special: a special token's
    spelling its id, as vLLM's tokenizer reads it, without a BOS), each id checked against the model's. -> [[ids],
    ...]"""
    from tritongpt.train.generate import bad_words_tokens

    out = bad_words_tokens(lambda text: encode(text, bos=False, special=True), words)
    if out and max(max(ids) for ids in out) >= vocab:
        raise bad("bad_words", f"'bad_words' tokenize to token id {max(max(ids) for ids in out)}: the model's tokens "
                               f"are 0..{vocab - 1}")
    return out


def thought_tokens(drawn: list, wake) -> int:
    """A reasoning model's choice's thought (OpenAI's reasoning_tokens): its drawn tokens through the </think> token
    (wake), all of them where it drew none."""
    return drawn.index(wake) + 1 if wake in drawn else len(drawn)


def token_text(tok, i: int) -> tuple:
    """A token's (text, bytes): its bytes as UTF-8, or OpenAI's "bytes:\\xe2\\x80" where they are not valid on
    their own (part of a character)."""
    b = tok.decode_bytes([i])
    try:
        return b.decode("utf-8"), b
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{x:02x}" for x in b), b


def spelled(tok, i: int, as_ids: bool = False) -> str:
    """A token as logprobs name it: token_text's, or with vLLM's return_tokens_as_token_ids "token_id:{id}"."""
    return f"token_id:{i}" if as_ids else token_text(tok, i)[0]


def finite(x: float) -> float:
    """A logprob as JSON can carry it: -inf as vLLM's stand-in -9999.0; NaN (or +inf), which only NaN or infinite
    logits make (a broken model: the whole row is NaN), refused with a 500 saying so, as vLLM's strict JSON does
    (without saying why), never written as a NaN that clients cannot parse."""
    x = float(x)
    if math.isnan(x) or x == math.inf:
        raise APIError(500, f"the model's logprob is {x} (its logits hold NaN or infinity: broken weights, or a "
                            "value past its dtype's range); JSON cannot carry it", kind="server_error")
    return max(x, -9999.0)


def to_json(obj) -> str:
    """obj as strict JSON, every body the server writes: Python's json would write NaN and Infinity, which are not
    JSON (clients refuse the body), so a non-finite number is a 500 naming it instead."""
    try:
        return json.dumps(obj, allow_nan=False)
    except ValueError as e:
        raise APIError(500, f"the response holds a number that is not JSON ({e})", kind="server_error") from None


class Scored:
    """One choice's tokens with their logprobs, items (id, logprob or None, top ids, top logprobs, text offset), the
    text the tokens so far decode to (ends: its length after each) and how many of them a response has given (a
    stream's chunk gives the tokens its text takes, upto; the last the rest). An answer keeps every token drawn,
    up to the end token, stop token or the token a stop string ends in (draw: vLLM's)."""

    def __init__(self, tok, prompt_ids, hidden=()):
        from tritongpt.commands import ContinuationStream

        self.decoder = ContinuationStream(tok, prompt_ids)  # (the text after the prompt's, as Delta's)
        self.items, self.ends, self.given = [], [], 0
        self.hidden = hidden  # ids whose text is left out (Choices.hidden: skip_special_tokens)

    def add(self, item):
        """item: (id, logprob, top ids, top logprobs); its text offset is added."""
        start = self.ends[-1] if self.ends else 0
        self.items.append((*item, start))
        self.ends.append(start + (0 if item[0] in self.hidden else len(self.decoder.write([item[0]]))))

    def upto(self, length: int) -> int:
        from bisect import bisect_left

        return min(bisect_left(self.ends, length) + 1, len(self.items)) if length else 0

    def give(self, length: int, upto: int | None = None) -> list:
        """The items of the tokens the first `length` characters take (or the first `upto` tokens) that were not
        given yet."""
        end = max(self.upto(length) if upto is None else upto, self.given)
        out, self.given = self.items[self.given:end], end
        return out


def completion_logprobs(tok, items, start: int = 0, as_ids: bool = False) -> dict:
    """OpenAI's legacy completions logprobs object of Scored's items: tokens, token_logprobs, top_logprobs (each a
    dict of the top k and the token itself, OpenAI's "up to logprobs + 1"; null for the prompt's first token) and
    text_offset (from start: where the items' text begins in the choice's). as_ids: tokens spelled "token_id:{id}"
    (vLLM's return_tokens_as_token_ids)."""
    tokens, logprobs, tops = [], [], []
    for i, lp, top_ids, top_lps, _ in items:
        tokens.append(spelled(tok, i, as_ids))
        logprobs.append(None if lp is None else finite(lp))
        if lp is None:
            tops.append(None)
            continue
        top = {spelled(tok, t, as_ids): finite(v) for t, v in zip(top_ids, top_lps)}
        top.setdefault(tokens[-1], finite(lp))
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops,
            "text_offset": [start + item[4] for item in items]}


def chat_logprobs(tok, items, as_ids: bool = False) -> dict:
    """OpenAI's chat logprobs object: {content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}.
    as_ids: tokens spelled "token_id:{id}" (vLLM's return_tokens_as_token_ids), their bytes still the token's own
    (vLLM's for the drawn token; its top entries' bytes spell the "token_id:" text, which says nothing more)."""
    def entry(i, lp):
        return {"token": spelled(tok, i, as_ids), "logprob": finite(lp), "bytes": list(token_text(tok, i)[1])}
    return {"content": [{**entry(i, lp), "top_logprobs": [entry(t, v) for t, v in zip(top_ids, top_lps)]}
                        for i, lp, top_ids, top_lps, _ in items], "refusal": None}


def rows_of(step) -> list:
    """generate.step_logprobs' (logprob [n], top ids [n, k], top logprobs [n, k], and a prompt's rank [n]) as each
    row's (logprob, top ids, top logprobs[, rank]); a NaN among them refused (finite's 500) here, as they come:
    echo's forward and a draw's step then fail as errors (counted so, the draw stopped), not after a draw counted
    as finished."""
    rows = list(zip(*(t.tolist() for t in step)))
    for x, _, top, *_ in rows:
        for v in (x, *top):
            finite(v)
    return rows


def prompt_rows(model, idx, k: int, limit=None, chunk: int | None = None) -> list:
    """Each prompt position's (logprob of the next prompt token, top-k ids, top-k logprobs, its rank) (rows_of's),
    idx [1, T] -> T - 1 rows, from one forward of the whole prompt, its head in chunks (generate.prompt_logprobs,
    which the engine's prefill runs too: Engine.submit's prompt_logprobs)."""
    from tritongpt.train.generate import prompt_logprobs

    return rows_of(prompt_logprobs(model, idx, idx[0, 1:], k, limit=limit, chunk=chunk))


def vllm_prompt_logprobs(tok, ids, rows, k: int) -> list:
    """vLLM's prompt_logprobs of prompt_rows' rows: None for the first token (nothing comes before it), then for
    each next prompt token {id: {logprob, rank, decoded_token}} of that token (rank: its place in the distribution,
    1 the likeliest) and the k likeliest (ranks 1..k), the token first (vLLM's Logprob dicts, in its order; JSON
    writes the ids as string keys)."""
    out = [None]
    for t, (lp, top_ids, top_lps, rank) in zip(ids[1:], rows):
        entry = {t: (lp, rank)}
        for r, (i, v) in enumerate(zip(top_ids[:k], top_lps[:k])):
            entry[i] = (v, r + 1)
        out.append({i: {"logprob": finite(v), "rank": r, "decoded_token": token_text(tok, i)[0]}
                    for i, (v, r) in entry.items()})
    return out


def in_threads(fn, count: int, stop: threading.Event, workers: int) -> list:
    """[fn(0), ..., fn(count - 1)], each in a thread of its own (at most `workers` at once): the first to raise sets
    `stop`, the others' cue to end early (an fn started after it still runs, to end at once: its prompt then counts
    as aborted), and its exception is raised once every thread has ended (none is left running)."""
    from concurrent.futures import ThreadPoolExecutor

    errors = []

    def guarded(i):
        try:
            return fn(i)
        except BaseException as e:
            errors.append(e)  # (the first is the cause: the others end because of it)
            stop.set()
            raise
    with ThreadPoolExecutor(min(count, workers)) as pool:  # (its exit waits for every thread)
        futures = [pool.submit(guarded, i) for i in range(count)]
    if errors:
        raise errors[0]
    return [f.result() for f in futures]


def in_turn(fn, count: int, stop: threading.Event) -> list:
    """[fn(0), ..., fn(count - 1)], one after another: the first to raise sets `stop`, and the rest still start, to
    end at once (their prompts then count as aborted in /metrics, as in_threads' do: vLLM submits a request's
    prompts together, so a client gone aborts them all), its exception raised once all have run."""
    out, errors = [], []
    for i in range(count):
        try:
            out.append(fn(i))
        except BaseException as e:
            errors.append(e)  # (the first is the cause: the others end because of it)
            stop.set()
    if errors:
        raise errors[0]
    return out


class Model:
    """The served model, its tokenizer and its chat format; generates through its engine (continuous batching), or
    with none (--max-batch 1, a LongRoPE model) one request at a time."""

    def __init__(self, model, tok, device, dtype, limit, name: str, template: str | None, template_why: str = "",
                 cuda_graph: bool = False, kv_cache_dtype: str = "auto", engine=None, adapter_paths=None,
                 max_model_len: int | None = None):
        from tritongpt.train.tokenizer import eot_or_none

        self.model, self.tok, self.device, self.dtype, self.limit = model, tok, device, dtype, limit
        # the served context (--max-model-len, vLLM's max_model_len): every request's prompt and budget fit in it;
        # the model's own context_length where none is given
        self.max_model_len = model.config.context_length if max_model_len is None else max_model_len
        self.name, self.template, self.template_why = name, template, template_why
        # the LoRA adapters served beside the model (--lora-modules: model/lora.py serve_adapters), name -> path
        self.adapter_paths = dict(adapter_paths or {})
        # POST /v1/load_lora_adapter and /v1/unload_lora_adapter ($VLLM_ALLOW_RUNTIME_LORA_UPDATING, make_server)
        self.runtime_lora, self.max_lora_rank = False, 16
        # adapter name -> the requests holding it (held: their "model" checked, not yet ended), which an unload
        # refuses (unload_adapter), under adapters_lock: the engine refuses one only while its requests wait or
        # run, and a request is checked (its stream's headers sent) before it is submitted, its prompts one by one
        self.holders, self.adapters_lock = {}, threading.Lock()
        self.tool_parser = None  # "auto" tool choice's (--enable-auto-tool-choice --tool-call-parser): tool_calls.py
        self.reasoning_parser = None  # --reasoning-parser's (train/reasoning.py): chat answers' thought apart
        self.responses = Store()  # /v1/responses' stored responses (previous_response_id, GET /v1/responses/{id})
        self.cuda_graph = cuda_graph  # generate()'s: each request's decode steps CUDA-graph replays
        self.kv_cache_dtype = kv_cache_dtype  # generate()'s: "int8", each request's cache int8
        self.eot = eot_or_none(tok)
        self.chat_stop = self.eot
        # a chat with tools in the tokenizer's "tool_use" template (tool_template) ends at that template's end of
        # turn; None: it has none to find (tool_why), and such chats are refused by name
        self.tool_chat_stop, self.tool_why = None, None
        if template == "chat" and getattr(tok, "chat_template", None) is not None:
            from tritongpt.train.chat_template import template_name, turn_end_id

            try:
                self.chat_stop = turn_end_id(tok)
            except UserError as e:  # completions still work; chat completions say why not
                self.template, self.template_why = None, str(e)
            if self.template is not None and template_name(tok, []) == "tool_use":
                try:
                    self.tool_chat_stop = turn_end_id(tok, "tool_use")
                except UserError as e:
                    self.tool_why = str(e)
        self.lock = threading.Lock()
        self.engine = engine  # train/engine.py's Engine, started; None: generate() under the lock
        self.pooler = None  # --runner pooling's (train/pooling.py Pooler): embeddings or reward scores, no text
        # --generation-config's (generation_config()): the requests' defaults, and the end tokens besides the EOS
        self.defaults, self.ends_too = {}, []
        self.prompt_tokens_details = False  # vLLM's --enable-prompt-tokens-details: usage's cached_tokens
        self.metrics = Metrics(name, self.max_model_len, engine)  # GET /metrics
        self.created = int(time.time())

    def close(self):
        if self.engine is not None:
            from tritongpt.train.engine import prefix_caching_said, speculation_said

            self.engine.close()
            what = "prompt lookup" if self.engine.draft is None else "draft model"
            for said in (prefix_caching_said(self.engine.stats), speculation_said(self.engine.stats, what)):
                if said:
                    note(said)

    def engine_down(self) -> str | None:
        """Why the engine cannot serve (GET /health's 503), or None: it can, or there is none (--max-batch 1)."""
        engine = self.engine
        if engine is None:
            return None
        if engine.closed:
            return "the engine is closed: the server is shutting down"
        if engine.thread is None or not engine.thread.is_alive():  # (Request.wait's and Engine.call's check)
            return "the engine's thread is not running any more: no request would ever end (restart the server)"
        return None

    def encode(self, prompt: str, bos: bool = True, special: bool = False) -> list:
        """The prompt's ids, as `generate --prompt` encodes it (BOS first where the tokenizer adds one, with bos);
        special: a special token's spelling is its id (/tokenize's, as vLLM's tokenizer reads it), else refused."""
        from tritongpt.train.formats import with_bos
        from tritongpt.train.tokenizer import DisallowedSpecialToken

        try:
            ids = self.tok.encode(prompt, allowed_special="all" if special else "none_raise")
        except DisallowedSpecialToken as e:
            raise bad("prompt", f"the prompt contains the special token {e.token}: only text is taken") from None
        return with_bos(self.tok, ids) if bos else ids

    def completion_prompt(self, prompt) -> list:
        """The prompt's ids, as `generate --prompt` encodes it (BOS first where the tokenizer adds one)."""
        ids = self.encode(prompt)
        if not ids:
            raise bad("prompt", "the prompt is empty")
        return ids

    def chat_prompt(self, messages, tools: dict | None = None, template_kwargs: dict | None = None,
                    mode: str = "generate") -> list:
        """The messages' ids as `tritongpt chat` prompts them (its Conversation, in the model's template); a chat
        with tools (tools: tool_setting's), tool messages, chat_template_kwargs (template_kwargs) or a prompt mode
        other than "generate" (prompt_mode's: the final message continued, or no generation prompt) in the
        tokenizer's own template (tool_chat_prompt)."""
        from tritongpt.train import formats
        from tritongpt.train.chat import Conversation

        if self.template is None:
            raise bad("messages", f"the model '{self.name}' has no chat format ({self.template_why}): "
                                  "use /v1/completions")
        rendered = self.template == "chat" and getattr(self.tok, "chat_template", None) is not None
        asked = "chat_template_kwargs" if template_kwargs else {"continue": "continue_final_message",
                                                                 "none": "add_generation_prompt"}.get(mode)
        if asked:
            if not rendered:
                raise bad(asked, f"the model '{self.name}' is prompted in {self.own_format}, not a Hugging Face chat "
                                 f"template: '{asked}' has no template to go to")
            return self.tool_chat_prompt(messages, tools, template_kwargs, mode)
        if uses_tools(messages) or tools is not None and tools["tools"] and (tools["choice"] != "none" or rendered) \
                or self.tool_template(tools):
            return self.tool_chat_prompt(messages, tools)
        try:
            messages = formats.check_messages(messages, "request", ends_with="user", empty_answers=True)
        except UserError as e:
            raise bad("messages", str(e)) from None
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        turns = messages[1:] if system is not None else messages
        if self.template != "chat" and len(messages) > 1:
            raise bad("messages", f"the model '{self.name}' was tuned on {self.template} prompts, which have no "
                                  "system message or earlier turns: send one user message")
        conv = Conversation(self.template, system)
        conv.turns = [(u["content"], a["content"]) for u, a in zip(turns[:-1:2], turns[1::2])]
        try:
            return formats.encode_prompt(self.tok, conv.prompt(turns[-1]["content"], 0, self.tok))
        except UserError as e:  # (a message the template refuses: one that spells a special token)
            raise bad("messages", str(e)) from None

    @property
    def own_format(self) -> str:
        """The prompt format of a model served without its tokenizer's chat template, as refusals name it."""
        return f"its {self.template} prompts" if self.template != "chat" else "tritongpt's plain-text chat format"

    def tool_template(self, tools: dict | None) -> bool:
        """Whether a chat request with these tools (tool_setting's) renders in the tokenizer's "tool_use" template:
        tools given (even none listed, as transformers' get_chat_template and vLLM pick it) and a template so named
        (chat_template.template_name). Its turn's end then stops the answer (tool_chat_stop)."""
        from tritongpt.train.chat_template import template_name

        return self.template == "chat" and tools is not None and tools["tools"] is not None \
            and template_name(self.tok, tools["tools"]) == "tool_use"

    def tool_chat_prompt(self, messages, tools: dict | None, template_kwargs: dict | None = None,
                         mode: str = "generate") -> list:
        """A chat with tools or tool messages, rendered by the tokenizer's own chat template with tools= (as vLLM's
        apply_chat_template; the tools of tool_choice "none" too, where the template renders them). tritongpt's own
        chat format has no place for them: tool messages, and tools a tool_choice calls, refused by name (tools
        under "none" leave its prompt as it is)."""
        from tritongpt.train import formats
        from tritongpt.train.chat_template import tool_prompt

        listed = tools["tools"] if tools is not None else None
        if getattr(self.tok, "chat_template", None) is None or self.template != "chat":
            what = self.own_format
            if uses_tools(messages):
                raise bad("messages", f"messages with tool calls or role 'tool' results: the model '{self.name}' "
                                      f"is prompted in {what}, which has no place for them (a Hugging Face chat "
                                      "template that renders tools has)")
            raise bad("tool_choice", f"the model '{self.name}' is prompted in {what}, which has no place for tools: "
                                     "a tool_choice that calls one needs a chat template that renders them "
                                     "(tool_choice \"none\" answers without them)")
        if self.tool_template(tools) and self.tool_chat_stop is None:
            raise bad("tools", f"the model '{self.name}' renders chats with tools in its 'tool_use' chat template, "
                               f"whose answers' end is not known: {self.tool_why}")
        clean = tool_messages(messages, mode)
        try:
            text = tool_prompt(self.tok, clean, listed, shown=tools is not None and tools["choice"] != "none",
                               variables=template_kwargs, mode=mode)
        except UserError as e:  # (a value the template cannot use: chat_template_kwargs' where given, they alone
            # reach it unchecked)
            field = "tools" if "renders no tools" in str(e) or str(e).startswith("tools[") else "chat_template_kwargs" \
                if template_kwargs and "could not render a value" in str(e) else "messages"
            raise bad(field, str(e)) from None
        return formats.encode_prompt(self.tok, ((text, False),))

    def guide(self, spec, field: str, tools: dict | None = None, wake: int | None = None):
        """A Guide of the structured outputs spec (a request's draw's), or None without one; a spec that does not
        compile (or no xgrammar) a 400 naming the request's field: a tool_choice's (tools: tool_setting's), the tool
        whose parameters do not compile alone ("auto": the request's own; no tool's schema holds its answer). wake:
        the token its grammar waits for (Guide.wake: a reasoning model's </think>), None: none."""
        if spec is None:
            return None
        from tritongpt.train.structured import Grammars, StructuredOutputs

        grammars = None  # (Grammars.of: the tokenizer's, made at its first use and kept)
        try:
            grammars = Grammars.of(self.tok, self.limit or self.model.config.vocab_size)
            guide = grammars.guide(spec)
            guide.wake = wake  # (a reasoning model's grammar holds its answer after </think>: Completion's wake)
            return guide
        except UserError as e:
            calls = tools is not None and tools["choice"] in ("named", "required") and grammars is not None
            for j, t in enumerate(tools["tools"] if calls else ()):
                name = t["function"]["name"]
                if tools["name"] in (None, name):
                    try:
                        grammars.compile(StructuredOutputs(json=tool_schema([t], name, True)))
                    except UserError as why:
                        raise bad(f"tools[{j}].function.parameters", f"tools[{j}] ({name!r}): {why}") from None
            raise bad(field, str(e)) from None

    def fits(self, ids, max_tokens) -> int:
        """The prompt's budget: max_tokens, or the context left (None); a 400 where the prompt and it pass it. The
        context is the served one (max_model_len), which vLLM's messages call the model's."""
        ctx = self.max_model_len
        if max_tokens is None:  # as far as the context goes
            if len(ids) >= ctx:
                raise APIError(400, f"the prompt is {len(ids)} tokens; the model's context is {ctx}: nothing is "
                                    "left for an answer", "messages", code="context_length_exceeded")
            return ctx - len(ids)
        if len(ids) + max_tokens > ctx:
            raise APIError(400, f"the model's context is {ctx} tokens; the request asks {len(ids) + max_tokens} "
                                f"({len(ids)} in the prompt, max_tokens {max_tokens}): shorten the prompt or "
                                "max_tokens", "max_tokens", code="context_length_exceeded")
        return max_tokens

    def budget(self, ids, max_tokens) -> int:
        """A prompt's token budget (fits), at most generation_config's max_new_tokens (--generation-config: vLLM's
        get_max_tokens takes the least of the request's, the context's and that)."""
        most = self.defaults.get("max_tokens")
        return self.fits(ids, max_tokens) if most is None else min(self.fits(ids, max_tokens), most)

    @property
    def names(self) -> tuple:
        """What a request's "model" may be: the model's name, then its adapters'."""
        return (self.name, *self.adapter_paths)

    def adapted(self, adapter):
        """The context a forward of adapter's runs in (no engine: every row that adapter); None: nothing."""
        self.check_loaded(adapter)
        rows = self.model.adapters
        return rows.use(rows.slot(adapter)) if adapter is not None else nullcontext()

    def check_loaded(self, adapter):
        """The 404 of a request whose adapter was unloaded after its "model" was read (runtime LoRA updating)."""
        if adapter is not None and adapter not in self.model.adapters.names:
            raise APIError(404, f"the model '{adapter}' does not exist any more: it was unloaded", "model",
                           code="model_not_found")

    @contextmanager
    def holding(self, adapter):
        """adapter (None: the base model) held while the block runs, so that no unload takes it from a request
        between its check and the model's forwards (there, after the stream's headers, the 404 of check_loaded
        could only end the stream); one unloaded since the request's "model" was read is that 404 here."""
        if adapter is None:
            yield
            return
        with self.adapters_lock:
            if adapter not in self.adapter_paths:
                raise APIError(404, f"the model '{adapter}' does not exist any more: it was unloaded", "model",
                               code="model_not_found")
            self.holders[adapter] = self.holders.get(adapter, 0) + 1
        try:
            yield
        finally:
            with self.adapters_lock:
                self.holders[adapter] -= 1
                if not self.holders[adapter]:
                    del self.holders[adapter]

    def load_adapter(self, name: str, path: str):
        """POST /v1/load_lora_adapter: the adapter read (read_adapter) and served from the next step on; a name
        served already (loaded by another load meanwhile too) is vLLM's 400."""
        from tritongpt.model.lora import add_adapter
        from tritongpt.train.gpt2_weights import read_adapter

        modules = read_adapter(path, self.model)
        with self.adapters_lock:  # (another load of the name may have come since the endpoint's look-up)
            if name in self.names:
                raise bad("lora_name", f"The lora adapter '{name}' has already been loaded.")
            if self.engine is not None:
                self.engine.load_adapter(name, modules, self.max_lora_rank)
            else:
                with self.lock:  # (no engine: between two requests' forwards)
                    add_adapter(self.model, name, modules, self.max_lora_rank)
            self.adapter_paths[name] = path

    def unload_adapter(self, name: str):
        """POST /v1/unload_lora_adapter, refused while a request holds it (holding: from its check to its end; the
        engine's refusal, while one of its requests waits or runs, is the same). vLLM's lets such requests end with
        the adapter they were given (each keeps its LoRARequest, loaded again where need be); here an unload frees
        the adapter's rows at once, so it is refused instead: the request still ends with its adapter. A name not
        loaded (never, or unloaded by another unload meanwhile) is vLLM's 404."""
        from tritongpt.model.lora import remove_adapter

        with self.adapters_lock:  # (no request can take it between this count and the name's removal)
            # (looked up here, under the lock: another unload of the name may have come since the endpoint's look-up)
            if name not in self.adapter_paths:
                raise APIError(404, f"The lora adapter '{name}' cannot be found.", "lora_name", code="not_found")
            users = self.holders.get(name, 0)
            if users:
                raise UserError(f"the adapter {name!r} runs {users} request(s): unload it once they have ended")
            if self.engine is not None:
                self.engine.unload_adapter(name)
            else:
                with self.lock:
                    remove_adapter(self.model, name)
            del self.adapter_paths[name]

    def score_prompt(self, ids, k: int, step=None, timing=None, adapter=None) -> list:
        """prompt_rows' rows of the prompt ids with the k likeliest tokens. step: the engine's prefill's rows of them
        (draw's on_prompt: Engine.submit's prompt_logprobs); None (no engine) one forward of the whole prompt here,
        in the model's turn (the head in chunks: prompt_rows), timing's request admitted when it takes it."""
        import torch

        from tritongpt.train.common import autocast

        if step is not None:
            return rows_of(step)
        idx = torch.tensor([ids], dtype=torch.long, device=self.device)
        with self.turn(timing), torch.no_grad(), autocast(self.device, self.dtype), self.adapted(adapter):
            return prompt_rows(self.model, idx, k, self.limit) if len(ids) > 1 else []

    def prompt_logprobs(self, ids, rows, k: int, text: str) -> list:
        """The prompt's tokens' logprob items (echo; Scored's) from score_prompt's rows, with k top tokens: the
        first token's logprob None (nothing comes before it). text: the prompt's echoed text, which the text
        offsets index."""
        scored = Scored(self.tok, [])
        for item in [(ids[0], None, [], [])] + [(t, lp, top[:k], vals[:k]) for t, (lp, top, vals, _) in
                                                zip(ids[1:], rows)]:
            scored.add(item)
        # a BOS with_bos put first ("<s>") decodes to text the echoed prompt does not have: offsets count from
        # where the prompt's own text begins (the BOS at 0, taking no room), as the drawn tokens' do
        lead = max(scored.ends[-1] - len(text), 0)
        return [(*item[:4], max(item[4] - lead, 0)) for item in scored.items]

    def draw(self, ids, budget, s, stop_id, generator, on_delta=None, gone=None, on_prompt=None, timing=None,
             adapter=None, prediction=None, spent=None) -> list:
        """n choices after the prompt ids (one batch): [(text, finish_reason, completion tokens, logprob items or
        None, stop_reason, token ids)], the items those of every token drawn (Scored), the one that ended the
        choice too, the ids those completion tokens' (vLLM's output token_ids: the end token or the one a stop string
        ends in too, and any drawn past the cut text). on_prompt(step) (an engine only: the prompt scored with
        s["score_k"] top tokens (echo's logprobs, prompt_logprobs), the request's own prefill scoring its prompt,
        before any token; budget 0 then ends after its prefill): called with the prompt's rows (step_logprobs'), in
        this thread. on_delta(i, text, items, count, ids): each choice's new text as it is drawn (held back where a
        stop string may be starting), the deltas of a choice adding up to its text, with the items of the tokens that
        text takes (None without logprobs), the choice's tokens drawn so far (its completion tokens once it ends) and
        their ids (with logprobs only those the items given so far hold: a chunk's ids are its logprobs'); called in
        this thread (the engine's tokens come through the request's queue). gone(): whether the client left, asked while
        waiting for the engine (without one, after each token): its request is then cancelled (the draw stopped) and
        BrokenPipeError raised (as a write to its socket would). timing: the request's clock (metrics.request()),
        started by the caller when the request came (its scoring forward timed in it); None: one started here.
        adapter: the LoRA adapter the request names (--lora-modules), None the model.
        prediction: a predicted output (generate.Prediction, new for this draw), its tokens proposed and verified
        (the engine's or generate()'s speculation: the same text, in fewer forwards where it is right).
        spent: a dict the draw's usage details go to (Completion.spent): "cached" (a list) the prompt tokens the
        engine's prefix cache gave it appended; "thought" (where the answer begins in a reasoning model's thought)
        {choice: its tokens through the </think> token (s["wake"]), all of them where it drew none}."""
        import torch

        from tritongpt.commands import Choices
        from tritongpt.train.engine import Cancelled

        n, stops, k = s["n"], s["stops"], s["logprobs"]
        ends = dict(stop_token_ids=s["stop_token_ids"], ignore_eos=s["ignore_eos"], min_tokens=s["min_tokens"])
        hold = s.get("hold_ids") or None  # (min_tokens' alone: the choices' ends are the ids above)
        # the choices' texts, finish reasons and counts
        rows = Choices(self.tok, ids, stops, stop_id, include_stop=s["include_stop_str_in_output"],
                       skip_special=s["skip_special_tokens"], **ends)
        rows.hidden -= set(s.get("think_ids") or ())  # (a reasoning parser reads them: --reasoning-parser)
        stopped = rows.stopped
        streams = [Delta(self.tok, ids, rows) for _ in range(n)] if on_delta else None
        scored = [Scored(self.tok, ids, rows.hidden) for _ in range(n)] if k is not None else None

        def send(i, delta, length):  # the delta, and the tokens the text sent so far (length) takes
            if scored is None:
                on_delta(i, delta, None, streams[i].drawn, streams[i].tokens)
                return
            items = scored[i].give(length)  # (the ids then those the logprobs give: vLLM's chunk pairs them)
            on_delta(i, delta, items, streams[i].drawn, streams[i].tokens[:scored[i].given])

        pending = [""] * n  # each choice's text this step (a speculative step's tokens: one chunk, vLLM's)

        def on_token(new):
            for i, t in enumerate(new[:, 0].tolist()):
                pending[i] += streams[i].add(t)

        def flush():  # the step's text, a chunk a choice
            for i, delta in enumerate(pending):
                if delta:
                    pending[i] = ""
                    send(i, delta, len(streams[i].sent_text))

        # a prefill-only request (budget 0: echo's scoring) draws nothing: one row scores the prompt for its n
        # choices, not n rows of slots and pages
        idx = torch.tensor([ids] * (1 if budget == 0 else n), dtype=torch.long, device=self.device)
        # vLLM's sampler: greedy below SAMPLING_EPS, and min_p before top_k and top_p (sampling_logits' min_p_first)
        warp = dict(temperature=s["temperature"] if sampled(s) else 0.0, top_k=s["top_k"],
                    top_p=s["top_p"] if s["top_p"] < 1 else None, min_p=s["min_p"], min_p_first=True,
                    repetition_penalty=s["repetition_penalty"],
                    frequency_penalty=s["frequency_penalty"], presence_penalty=s["presence_penalty"],
                    logit_bias=s["logit_bias"], allowed_token_ids=s["allowed_token_ids"],
                    bad_words=s.get("bad_words_ids"))
        # (the caller's: its clock started when the request came; budget 0, echo's prefill-only: vLLM's max_tokens 1)
        timing = timing or self.metrics.request(n, max(budget, 1))
        guide = self.guide(s["structured"], s["structured_field"], wake=s.get("wake")) if budget else None

        # each choice's first end token's index among its new tokens (rows.end_of's, kept as they come: generate()
        # and the engine pad a row that ended with more), and the tokens each row was handed so far
        end_at, seen = [None] * n, 0

        def drawn_so_far(i):  # choice i's tokens drawn, up to its end as rows.ending() counts them
            if budget == 0:  # (prefill-only: vLLM's one token, once its prefill ran)
                return 1 if timing.steps else 0
            return min(seen if end_at[i] is None else end_at[i] + 1, rows.first_stop.get(i, seen))

        def drawing(i, j):  # whether choice i draws its token j: nothing ended it before (an end token, a stop string)
            # (rows.first_stop: the tokens a row had when its text first held a stop string; the engine's thread,
            # ahead of this one, may have set it already at a later step: a count, compared, not its presence)
            return (end_at[i] is None or end_at[i] >= j) and rows.first_stop.get(i, j + 1) > j

        def on_step(new, step=None):  # each step's tokens: the clock, their logprobs, then the stream
            nonlocal seen
            for i, t in enumerate(new[:, 0].tolist()):
                if end_at[i] is None and t in rows.ends:
                    end_at[i] = seen
            # the choices still drawing at this token (vLLM's child requests not finished): its gap observed for
            # each of them now (Timing.tokens), as vLLM's engine step does
            alive = [i for i in range(n) if drawing(i, seen)]
            seen += 1
            if request is None:  # (no engine: the request's step is the model's; the engine counts its own)
                # vLLM's count: the rows still drawing, and each row's prompt at its first token
                self.metrics.iteration(len(alive) + (n * len(ids) if timing.steps == 0 else 0))
            timing.tokens(request is not None and request.same_step, alive)
            if step is not None:
                for i, (t, row) in enumerate(zip(new[:, 0].tolist(), rows_of(step))):
                    scored[i].add((t, *row))
            if on_delta:
                on_token(new)
                if request is None:  # (generate()'s steps: a token each)
                    flush()
            # without the engine, asked after each token (the engine's wait asks it itself): the model, held under
            # the lock, is not drawing for nobody while the other requests wait
            if request is None and gone is not None and gone():
                raise BrokenPipeError("the client left")
        request = None  # the engine's handle: its phases' clocks (Timing.phases)
        if budget == 0 and on_prompt is not None:  # a prefill-only request: its scored prompt is its first token
            scored_prompt = on_prompt

            def on_prompt(step):
                timing.tokens()
                scored_prompt(step)
        try:
            if self.engine is not None:
                try:
                    request = self.engine.submit(idx, budget, eos_id=stop_id, generator=generator, copies=n,
                                                 vocab_limit=self.limit, stop=stopped if stops else None, logprobs=k,
                                                 **ends, hold_ids=hold, prompt_logprobs=s["score_k"] if on_prompt
                                                 is not None else None, adapter=adapter, guide=guide,
                                                 prediction=prediction, **warp)
                except UserError:
                    self.check_loaded(adapter)  # (the engine's refusal of an adapter unloaded meanwhile: the 404)
                    raise
                try:
                    out = request.wait(on_step, gone, on_prompt=on_prompt,
                                       on_step_end=flush if on_delta else None).tolist() * (n if budget == 0 else 1)
                except Cancelled:
                    raise BrokenPipeError("the client left") from None
                if spent is not None:
                    spent["cached"].append(request.cached)
            else:
                out = self.generate_alone(idx, budget, stop_id, generator, on_step, stopped if stops else None,
                                          dict(warp, logprobs=k, guide=guide, draft=prediction, hold_ids=hold,
                                               **ends), timing,
                                          adapter, gone)
            choices = []  # (in the try: a last write that fails, the text held back for a stop string, aborts)
            for i, row in enumerate(out):
                text, finish, count, reason = rows.ending(i, row)
                if spent is not None and "thought" in spent:  # (the reasoning tokens: OpenAI's usage detail)
                    spent["thought"][i] = thought_tokens(row[len(ids):len(ids) + count], s["wake"])
                count = count if budget else 1  # (prefill-only: vLLM's one token, drawn and dropped; Completion.draw)
                # the tokens drawn, each with its logprobs: at the budget all; ended by the end token, a stop token
                # or a stop string, every token up to the one that ended it, the one the stop string ends in too,
                # past the cut text (vLLM's: its detokenizer cuts output_text only, its logprobs processor keeps
                # every new token's, vllm/v1/engine/output_processor.py; lm-eval's echo request drops the drawn
                # token's entry, token_logprobs[ctxlen:-1], so an end token left out would drop the continuation's
                # last one instead). (Not the items' count: with no engine a row that ended is padded.)
                taken = None if scored is None else len(scored[i].items) if finish == "length" else count
                items = None if scored is None else scored[i].items[:taken]
                drawn = row[len(ids):len(ids) + count] if budget else []
                choices.append((text, finish, count, items, reason, drawn))
                if on_delta:
                    sent = streams[i].sent_text
                    if text[:len(sent)] != sent:  # cannot happen: the stream sends what decoding gives, held back
                        raise RuntimeError(f"streamed {sent!r}, which the text {text!r} does not start with")
                    if text[len(sent):] or scored is not None and scored[i].given < taken:
                        on_delta(i, text[len(sent):], None if scored is None else scored[i].give(len(text), taken),
                                 count, drawn)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):  # the client left, or stopped reading
            # (the tokens drawn so far counted, as vLLM's engine steps count them as they are made)
            timing.end(["abort"] * n, len(ids), [drawn_so_far(i) for i in range(n)], stamps=request)
            raise
        except Exception:
            timing.end(["error"] * n, len(ids), [drawn_so_far(i) for i in range(n)], stamps=request)
            raise
        timing.end([c[1] for c in choices], len(ids), [c[2] for c in choices], stamps=request)
        return choices

    def generate_alone(self, idx, budget, stop_id, generator, on_token, stop, warp, timing, adapter=None, gone=None):
        """generate() in the model's turn (no engine). gone(): whether the client left, asked once the turn comes
        (then BrokenPipeError, as on_token raises it after each token)."""
        from tritongpt.train.common import autocast
        from tritongpt.train.generate import generate

        with self.turn(timing), autocast(self.device, self.dtype), self.adapted(adapter):
            # (left while it waited for the model, or the server stopping: Server.server_close) not a prefill for
            # nobody while the requests behind it wait
            if gone is not None and gone():
                raise BrokenPipeError("the client left")
            # (a prediction's steps verify several tokens: no graph for them, as in the engine)
            return generate(self.model, idx, budget, eos_id=stop_id, generator=generator, vocab_limit=self.limit,
                            on_token=on_token, stop=stop, cuda_graph=self.cuda_graph and warp["draft"] is None,
                            kv_cache_dtype=self.kv_cache_dtype, **warp).tolist()

    def beam_search(self, ids, budget, s, stop_id, timing, adapter=None, gone=None, spent=None) -> list:
        """use_beam_search's n beams after the prompt ids, best first, as draw()'s choices (text, finish_reason,
        completion tokens, None, stop_reason, their ids): train/beam_search.py's search (transformers', as `generate
        --num-beams`: early_stopping false, n beams returned), the model's raw log-probabilities, its EOS (stop_id,
        none with ignore_eos) ending a beam. vLLM's output rules (serving_engine.py's beam_search): an EOS-ended beam
        finishes "stop" with stop_reason the EOS id, its text without it, the EOS among its tokens (usage) only with
        include_stop_str_in_output; else "length".
        Its own loop, not the engine's batch: it holds the model from its first step to its last, as a request with
        --max-batch 1 does (its lock; with the engine, Engine.call: the batch waits between two steps), so the other
        requests wait that long. Its n beams are rows of one KV cache of its own (n * (prompt + max_tokens)
        positions). gone(): whether the client left, asked before each step: the search then ends (BrokenPipeError,
        as draw()'s), not holding the model for nobody. spent: draw()'s, its "thought" (a reasoning model's) given
        each beam's."""
        import torch

        from tritongpt.commands import Choices
        from tritongpt.train.beam_search import beam_search
        from tritongpt.train.common import autocast

        eos = None if s["ignore_eos"] else stop_id
        idx = torch.tensor([ids], dtype=torch.long, device=self.device)

        def step():
            if gone is not None and gone():
                raise BrokenPipeError("the client left")

        def run():
            if timing.scheduled is None:  # (under Engine.call: turn() does not set it)
                timing.scheduled = time.monotonic()
            with autocast(self.device, self.dtype), self.adapted(adapter):
                out, _ = beam_search(self.model, idx, budget, s["n"], s["beam"]["length_penalty"],
                                     num_return_sequences=s["n"], eos_id=eos, vocab_limit=self.limit,
                                     repetition_penalty=s["repetition_penalty"], kv_cache_dtype=self.kv_cache_dtype,
                                     on_step=step)
            return out.tolist()
        with ended_if_failed(timing, s["n"]):
            if self.engine is not None:
                rows = self.called(run)
            else:
                with self.turn(timing):
                    rows = run()
            texts = Choices(self.tok, ids, [], stop_id, ignore_eos=s["ignore_eos"],
                            skip_special=s["skip_special_tokens"])
            texts.hidden -= set(s.get("think_ids") or ())  # (a reasoning parser reads them, as in draw())
            choices = []
            for i, row in enumerate(rows):
                text, finish, count, _ = texts.ending(i, row)
                reason = None
                if finish == "stop":  # (the EOS: vLLM's beam search names it, and counts it only if asked)
                    reason, count = stop_id, count - (not s["include_stop_str_in_output"])
                if spent is not None and "thought" in spent:
                    spent["thought"][i] = thought_tokens(row[len(ids):len(ids) + count], s["wake"])
                choices.append((text, finish, count, None, reason, row[len(ids):len(ids) + count]))
        timing.tokens()  # (the beams come at once: their first token is their last)
        # iteration_tokens_total: its n beams' prompts and tokens, one observation, as they come at once (vLLM's
        # beam search sends each step's beams as max_tokens 1 requests, each prefilling the prompt and the beam's
        # tokens so far: a step's tokens that ours, one KV cache of n rows drawing a token each, does not run)
        self.metrics.iteration(s["n"] * len(ids) + sum(c[2] for c in choices))
        timing.end([c[1] for c in choices], len(ids), [c[2] for c in choices])
        return choices

    def called(self, fn):
        """Engine.call(fn), the request counted in /metrics as turn() counts one: waiting until fn starts on the
        engine's thread, running while it holds the model there (the engine's own requests wait meanwhile; not
        counted, the server would read idle while a beam search holds it)."""
        m, started = self.metrics, []

        def run():
            started.append(True)
            with m.holding():
                return fn()
        m.count(waiting=1)
        try:
            return self.engine.call(run)
        finally:
            if not started:  # (the engine down before it ran: never taken off the waiting)
                m.count(waiting=-1)

    @contextmanager
    def turn(self, timing=None):
        """The model's lock (no engine: one forward at a time), the requests holding and waiting for it counted
        (/metrics' running and waiting), timing's request scheduled when it first takes it (a scoring forward and
        then the draw of the same request: its queue time the wait for the first, the rest its prefill)."""
        self.metrics.count(waiting=1)
        with self.lock:
            if timing is not None and timing.scheduled is None:
                timing.scheduled = time.monotonic()
            with self.metrics.holding():
                yield


class Delta:
    """One streamed choice: the text each new token adds (the tokenizer's stream_decoder, as `generate --stream`'s
    TextStream), less what may be the start of a stop string (commands.HeldBack), up to the first stop string or
    end token (done). rows: the prompt's Choices, whose end tokens, min_tokens and include_stop it follows (an end
    token's text sent only where the answer keeps it; a stop string only past the first min_tokens tokens' text)."""

    def __init__(self, tok, prompt_ids, rows):
        from tritongpt.commands import ContinuationStream, HeldBack

        self.rows, self.count = rows, 0
        self.drawn = 0  # the choice's tokens so far, the one that ended it included (usage's completion tokens)
        self.tokens = []  # their ids (return_token_ids')
        # the prompt's text read, not sent: a word's leading space is the new text's, a character the prompt's ids
        # cut is the answer's text as continuation() counts it (Choices' text, which the stream must add up to)
        self.decoder = ContinuationStream(tok, prompt_ids)
        self.held, self.done = HeldBack(rows.stops, rows.include_stop), False
        self.held.after = sys.maxsize if rows.min_tokens else 0  # (no stop string yet)

    @property
    def sent_text(self) -> str:
        return self.held.sent_text

    def add(self, token: int) -> str:
        if self.done:  # (with no engine, a row that ended is padded while the others draw)
            return ""
        self.drawn += 1
        self.tokens.append(token)
        ends = token in self.rows.ends
        if ends and token not in self.rows.shown:
            self.done = True
            return ""
        self.count += 1
        chunk = "" if token in self.rows.hidden else self.decoder.write([token])
        delta = self.held.add(chunk)
        if self.count == self.rows.min_tokens:  # a stop string counts from here on (vLLM's; Choices.cut's text
            # less a U+FFFD it ends in, held back). Its text decoded, not the stream's so far: a prompt's held run of
            # byte-fallback tokens leaves the stream undecided (nothing handed out) while the new ids are bytes too
            self.held.after = len(self.rows.text_of(self.tokens).rstrip("\ufffd"))
        self.done = self.held.done or ends
        return delta


class Handler(BaseHTTPRequestHandler):
    """Routes a request to its endpoint; every failure is an OpenAI error object, never a traceback."""
    server_version = "tritongpt"
    ROUTES = {"/v1/models": "GET", "/v1/completions": "POST", "/v1/chat/completions": "POST", "/metrics": "GET",
              "/v1/responses": "POST",
              "/health": "GET", "/version": "GET", "/tokenize": "POST", "/detokenize": "POST",
              "/tokenizer_info": "GET", "/v1/load_lora_adapter": "POST", "/v1/unload_lora_adapter": "POST",
              "/v1/embeddings": "POST", "/pooling": "POST", "/score": "POST", "/v1/score": "POST", "/rerank": "POST",
              "/v1/rerank": "POST", "/v2/rerank": "POST"}  # (from /v1/embeddings: --runner pooling's, train/pooling.py)
    # seconds a read or write of the socket may wait: a body shorter than its Content-Length, or a client that
    # stops reading a stream (which would block a write holding the model's lock), must not hold a thread forever
    timeout = 60

    def do_GET(self):
        self.route("GET")

    def do_POST(self):
        self.route("POST")

    def do_PUT(self):
        self.route("PUT")

    def do_DELETE(self):
        self.route("DELETE")

    def do_PATCH(self):
        self.route("PATCH")

    def do_HEAD(self):  # (405s, as vLLM's routes answer them, rather than http.server's 501 page)
        self.route("HEAD")

    def do_OPTIONS(self):
        self.route("OPTIONS")

    def route(self, method):
        path = self.path.split("?", 1)[0]
        app = self.server.app
        model_path = path.startswith("/v1/models/")
        # a stored response: GET /v1/responses/{id} (and its /input_items), DELETE /v1/responses/{id}
        stored_path = path.startswith("/v1/responses/")
        allowed = self.allowed = "GET" if model_path or path.endswith("/input_items") and stored_path else \
            "GET, DELETE" if stored_path else self.ROUTES.get(path)
        if path in LORA_PATHS and not app.runtime_lora:  # (vLLM's routes are there only with its switch)
            allowed = self.allowed = None
        self.streaming = False
        self.stream_failed = None  # a Responses stream's own ending where it fails midway (Response.failed)
        try:
            if self.server.api_key is not None and path not in PUBLIC_PATHS:  # (first, as vLLM's middleware)
                self.authorize(self.server.api_key)
            from tritongpt.train.pooling import EMBEDDINGS, POOLING, RERANK_PATHS, SCORE_PATHS, pool, refused, score

            why = refused(app, path)  # the other runner's routes (vLLM registers only its runner's)
            if why:
                raise APIError(404, why, code="not_found")
            if allowed is None:
                raise APIError(404, f"unknown path: {method} {path}", code="not_found")
            if method not in allowed.split(", "):
                raise APIError(405, f"{method} is not allowed on {path} (only {allowed})", code="method_not_allowed")
            if model_path:
                name = path[len("/v1/models/"):]
                root = None if name == app.name else app.adapter_paths.get(name)  # (one read: unloads meanwhile)
                if name != app.name and root is None:
                    raise APIError(404, f"the model '{name}' does not exist", "model", code="model_not_found")
                return self.send_json(200, self.model_card(name, root))
            if stored_path:
                return self.send_json(200, self.stored(method, path[len("/v1/responses/"):]))
            if path == "/metrics":  # Prometheus' scrape (train/metrics.py)
                return self.send_text(app.metrics.render(), "text/plain; version=0.0.4; charset=utf-8")
            if path == "/health":  # a load balancer's probe: vLLM's empty 200
                down = app.engine_down()
                if down:
                    raise APIError(503, down, kind="server_error", code="engine_dead")
                return self.send_text("", "text/plain; charset=utf-8")
            if path == "/version":
                from tritongpt import __version__

                return self.send_json(200, {"version": __version__})
            if path == "/tokenize":
                return self.send_json(200, self.tokenize(self.read_body()))
            if path == "/detokenize":
                return self.send_json(200, self.detokenize(self.read_body()))
            if path == "/tokenizer_info":
                return self.send_json(200, self.tokenizer_info())
            if path in (EMBEDDINGS, POOLING):
                return self.send_json(200, pool(self, path, self.read_body()))
            if path in SCORE_PATHS + RERANK_PATHS:
                return self.send_json(200, score(self, path, self.read_body()))
            if path in LORA_PATHS:
                return self.send_text(self.lora_update(path, self.read_body()), "text/plain; charset=utf-8")
            if path == "/v1/models":
                # (the adapters as of one moment: an unload on another thread meanwhile does not fail the list)
                adapters = list(app.adapter_paths.items())
                return self.send_json(200, {"object": "list", "data": [self.model_card(app.name)] + [
                    self.model_card(n, root) for n, root in adapters]})
            self.generate({"/v1/chat/completions": "chat", "/v1/responses": "responses"}.get(path, "completions"),
                          self.read_body())
        except APIError as e:
            self.fail(e)
        except EngineDown as e:  # the server's fault, not the request's: vLLM's EngineDeadError is a 500
            self.fail(APIError(500, str(e), kind="server_error", code="engine_dead"))
        except UserError as e:  # a setting generate() refuses (the field it names, where it names one: a FieldError)
            self.fail(APIError(400, str(e), e.field if isinstance(e, FieldError) else None))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client left
        except TimeoutError:  # (socket.timeout) mid-stream: the client stopped reading, nothing more can reach it
            if not self.streaming:
                self.fail(APIError(408, f"the request's body did not arrive in {self.timeout} s", code="timeout"))
        except Exception:  # the server's own fault: its traceback in the server's log, not to the client
            traceback.print_exc(file=sys.stderr)
            self.fail(APIError(500, "internal server error (see the server's log)", kind="server_error"))

    def fail(self, e: APIError):
        try:
            if self.streaming and self.stream_failed is not None:  # (typed events: error, response.failed)
                self.stream_failed(e)
            elif self.streaming:  # the 200 is sent: the error goes as an event, as vLLM's
                self.send_event(e.body())
                self.send_event("[DONE]")
            else:
                headers = {"Allow": self.allowed} if e.status == 405 else \
                    {"WWW-Authenticate": "Bearer"} if e.status == 401 else {}  # (RFC 9110's and RFC 6750's)
                self.send_json(e.status, e.body(), headers)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the client left, or stopped reading

    def authorize(self, key: str):
        """A 401 unless the request bears `Authorization: Bearer <key>` (the scheme in any case, as vLLM's); the keys
        compared in constant time, the one sent never written anywhere."""
        scheme, _, given = (self.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise APIError(401, "this server needs an API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        # (http.server decoded the header as latin-1: its bytes as sent, against the key's; their digests compared, as
        # vLLM's, since compare_digest's time still tells the lengths apart)
        sent = hashlib.sha256(given.strip().encode("latin-1", "replace")).digest()
        if not hmac.compare_digest(sent, hashlib.sha256(key.encode("ascii")).digest()):
            raise APIError(401, "the API key is not this server's", code="invalid_api_key")

    def stored(self, method: str, rest: str) -> dict:
        """A stored response (/v1/responses' store): GET {id}, its input items (GET {id}/input_items, OpenAI's list:
        ?order=desc|asc, limit 1-100, after an item's id) or DELETE {id} (OpenAI's deleted object)."""
        from urllib.parse import parse_qs, urlsplit

        store = self.server.app.responses
        rid, _, sub = rest.partition("/")
        if sub and (method == "DELETE" or sub != "input_items"):
            raise APIError(404, f"unknown path: {method} /v1/responses/{rest}", code="not_found")
        # (a blank value kept: `after=` is refused, not read as left out)
        query = {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query, keep_blank_values=True).items()}
        for key in query:  # (OpenAI's others, include, stream, starting_after, ...: not built here, never ignored)
            if not sub or key not in ("order", "limit", "after"):
                takes = "order, limit and after" if sub else "no query fields"
                raise bad(key, f"query field '{key}' is not supported on {method} /v1/responses/{{id}}"
                               f"{'/input_items' if sub else ''} by this server (it takes {takes})"[:300])
        if method == "DELETE":
            store.delete(rid)
            return {"id": rid, "object": "response", "deleted": True}
        if not sub:
            return store.get(rid, "response_id")[0]
        items = store.get(rid, "response_id")[2]
        order, limit = query.get("order", "desc"), query.get("limit", "20")
        if order not in ("asc", "desc"):
            raise bad("order", f"'order' must be asc or desc, got {order!r}")
        if not (limit.isascii() and limit.isdigit()) or not 1 <= int(limit) <= 100:  # ('²' is a digit, not an int)
            raise bad("limit", f"'limit' must be an integer in [1, 100], got {limit!r}")
        items = items[::-1] if order == "desc" else list(items)
        if "after" in query:
            at = next((i for i, item in enumerate(items) if item["id"] == query["after"]), None)
            if at is None:
                raise bad("after", f"'after': no input item {query['after']!r} in response {rid!r}")
            items = items[at + 1:]
        page = items[:int(limit)]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(items) > len(page)}

    def tokenize(self, body: dict) -> dict:
        """vLLM's POST /tokenize: a prompt's ids as /v1/completions encodes it (add_special_tokens, default true:
        the BOS the tokenizer adds), or messages' as /v1/chat/completions prompts them (the served chat template,
        ready for the answer, or as add_generation_prompt and continue_final_message ask; with `tools`, rendered with
        them as a chat completion calling one is) -> {count,
        max_model_len, tokens, token_strs (with return_token_strs: each token's text, as logprobs spell it)}. No
        context check: count against max_model_len is the client's."""
        app = self.server.app
        check_fields(body, "tokenize", app.names, TOKENIZE_UNSUPPORTED)
        strs = bool_field(body, "return_token_strs", False)
        if body.get("messages") is not None:
            if body.get("prompt") is not None:
                raise bad("prompt", "pass one of 'prompt' and 'messages'")
            if bool_field(body, "add_special_tokens", False):
                raise bad("add_special_tokens", "'add_special_tokens': true with 'messages' is not supported by "
                                                "this server: the ids are the chat request's (its template's, "
                                                "BOS included where the tokenizer adds one)")
            # tools (vLLM's TokenizeChatRequest): rendered as a chat request whose tool_choice calls one renders them
            # ([] too: a chat with tools given, none listed, renders in a "tool_use" template, as chat completions')
            tools = check_tools(body["tools"]) if body.get("tools") is not None else None
            ids = app.chat_prompt(body["messages"], None if tools is None else
                                  {"tools": tools, "choice": "required", "name": None, "parser": None},
                                  template_kwargs(body), prompt_mode(body))
        else:
            for key in ("tools", "chat_template_kwargs", "add_generation_prompt", "continue_final_message"):
                if body.get(key) is not None:
                    raise bad(key, f"'{key}' is taken with 'messages' (a chat's prompt), not 'prompt'")
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise bad("prompt", "'prompt' (a string) or 'messages' is required" if prompt is None else
                          f"'prompt' must be a string, got {prompt!r}"[:300])
            ids = app.encode(prompt, bos=bool_field(body, "add_special_tokens", True), special=True)
        return {"count": len(ids), "max_model_len": app.max_model_len, "tokens": ids,
                "token_strs": [token_text(app.tok, i)[0] for i in ids] if strs else None}

    def tokenizer_info(self) -> dict:
        """vLLM's GET /tokenizer_info (TokenizerInfoResponse: the tokenizer's class and its tokenizer_config.json
        fields), what lm-evaluation-harness's remote tokenizer reads (its eos_token, then /tokenize and /detokenize
        for every count): the end and BOS tokens' spellings (None where there is none), the folder's other special
        tokens as transformers' init_kwargs hold them (pad_token, unk_token... by name, None where there is no pad
        token; a model's own, image_token..., under model_specific_special_tokens), the served chat template where
        it is a Jinja one (the tokenizer's own; a run's prompt format is not), the context. A
        tokenizer with named templates ("tool_use" beside the default) shows them all, name -> text, as transformers
        holds them (tokenizer.chat_template, and the init_kwargs vLLM's TokenizerInfo returns, for a folder that
        transformers saved); --chat-template's one template is a string, as vLLM's override is."""
        app = self.server.app
        tok = app.tok
        bos = getattr(tok, "prepended_bos_id", None)
        info = {"tokenizer_class": type(tok).__name__,
                "eos_token": None if app.eot is None else tok.decode([app.eot]),
                "bos_token": None if bos is None else tok.decode([bos]), "pad_token": None,
                "model_max_length": app.model.config.context_length}
        # (transformers >= 5 keeps the named ones at the top of init_kwargs, a model's own in one object: vLLM's
        # TokenizerInfo returns init_kwargs, so a client reading pad_token gets the folder's, not None)
        from tritongpt.train.hf_tokenizer import as_init_kwargs

        info.update(as_init_kwargs(getattr(tok, "template_tokens", None) or {}))
        if app.template == "chat":
            named = getattr(tok, "chat_templates", None)
            info["chat_template"] = {"default": tok.chat_template, **named} if named else tok.chat_template
        return info

    def detokenize(self, body: dict) -> dict:
        """vLLM's POST /detokenize: {"tokens": [ids]} -> {"prompt": their text}."""
        app = self.server.app
        check_fields(body, "detokenize", app.names)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(is_int(t) for t in tokens):
            raise bad("tokens", "'tokens' (a list of token ids) is required" if tokens is None else
                      f"'tokens' must be a list of token ids, got {tokens!r}"[:300])
        check_token_ids(tokens, app.limit or app.model.config.vocab_size, "tokens")
        return {"prompt": app.tok.decode(tokens)}

    def lora_update(self, path: str, body: dict) -> str:
        """vLLM's POST /v1/load_lora_adapter {"lora_name", "lora_path"} and /v1/unload_lora_adapter {"lora_name"}
        (with $VLLM_ALLOW_RUNTIME_LORA_UPDATING and --enable-lora): its success texts and error messages."""
        app, load = self.server.app, path == "/v1/load_lora_adapter"
        fields = ("lora_name", "lora_path") if load else ("lora_name",)
        for key in body:
            if key not in fields:
                raise bad(key, f"'{key}' is not taken here (only {', '.join(fields)})")
        for key in fields:
            if not isinstance(body.get(key), str) or not body[key].strip():
                raise bad(key, f"'{key}' must be a non-empty string, got {body.get(key)!r}")
        name = body["lora_name"]
        if load:
            if name in app.names:
                raise bad("lora_name", f"The lora adapter '{name}' has already been loaded.")
            if not os.path.exists(body["lora_path"]):
                raise APIError(404, f"No adapter found at {body['lora_path']}", "lora_path", code="not_found")
            app.load_adapter(name, body["lora_path"])
            return f"Success: LoRA adapter '{name}' added successfully."
        app.unload_adapter(name)  # (vLLM's 404 for a name not loaded: its own look-up, under its lock)
        return f"Success: LoRA adapter '{name}' removed successfully."

    def model_card(self, name: str, root=None):
        """OpenAI's model object, with vLLM's extra fields (root, parent, max_model_len: clients read the context
        from it); a LoRA adapter's (vLLM's): root its path (None: the model's own card), parent the base model."""
        app = self.server.app
        return {"id": name, "object": "model", "created": app.created, "owned_by": "tritongpt",
                "root": name if root is None else root, "parent": None if root is None else app.name,
                "max_model_len": app.max_model_len}

    def read_body(self) -> dict:
        length = self.headers.get("Content-Length")
        # isascii: '²' is a digit to isdigit(), not to int()
        if length is None or not (length.isascii() and length.isdigit()):
            raise APIError(400, "the request needs a JSON body (with its Content-Length)")
        check_body_length(int(length))
        try:
            body = json.loads(self.rfile.read(int(length)).decode("utf-8"))
        except ValueError as e:  # (JSONDecodeError, UnicodeDecodeError, and an integer past Python's 4300 digits)
            raise APIError(400, f"the body is not valid JSON ({e})") from None
        except RecursionError:  # the parser's own limit, not the server's fault
            raise APIError(400, "the body is not valid JSON (nested too deep)") from None
        if not isinstance(body, dict):
            raise APIError(400, f"the body must be a JSON object, got {type(body).__name__}")
        return body

    def send_json(self, status: int, obj, headers=None):
        self.send_text(to_json(obj), "application/json", status, headers)

    def send_text(self, text: str, content_type: str, status: int = 200, headers=None):
        data = text.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":  # (a HEAD response's Content-Length is the body it would have had)
            self.wfile.write(data)

    def client_gone(self) -> bool:
        """Whether the client closed its connection (readable with nothing to read; so too once the server stops:
        Server.server_close), asked while its request decodes so that the engine stops drawing for it."""
        try:
            if not select.select([self.connection], [], [], 0)[0]:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):  # reset, or closed here
            return True

    def send_event(self, obj):
        self.wfile.write(f"data: {obj if isinstance(obj, str) else to_json(obj)}\n\n".encode("utf-8"))
        self.wfile.flush()

    def send_typed(self, obj: dict):
        """A typed event (the Responses API's stream: its type as the event's name too, as OpenAI's)."""
        self.wfile.write(f"event: {obj['type']}\ndata: {to_json(obj)}\n\n".encode("utf-8"))
        self.wfile.flush()

    def completion_prompts(self, prompt, vocab: int) -> tuple:
        """/v1/completions' prompt (a string, a list of them, a list of token ids or a list of such lists, as
        OpenAI's) -> (each prompt's ids, its text for echo). Text is encoded as `generate --prompt` does; token ids
        (what lm-eval's local-completions sends) are taken as they are."""
        app = self.server.app
        tokens = isinstance(prompt, list) and bool(prompt) and all(is_int(t) for t in prompt)
        prompts = [prompt] if isinstance(prompt, str) or tokens else prompt
        if not isinstance(prompts, list) or not prompts or not all(
                isinstance(p, str) or isinstance(p, list) and p and all(is_int(t) for t in p) for p in prompts):
            raise bad("prompt", f"'prompt' must be a string, a list of token ids, or a non-empty list of either, got "
                                f"{prompt!r}"[:300])
        for p in prompts:
            if not isinstance(p, str):
                check_token_ids(p, vocab, "prompt")
        ids = [app.completion_prompt(p) if isinstance(p, str) else p for p in prompts]
        return ids, [p if isinstance(p, str) else app.tok.decode(p) for p in prompts]

    def generate(self, endpoint: str, body: dict):
        """POST /v1/completions, /v1/chat/completions and /v1/responses: the request checked (Completion, Response),
        its prompts' choices drawn (one), then the response, or the stream's last events."""
        app = self.server.app
        c = Response(self, body) if endpoint == "responses" else Completion(self, endpoint, body)
        with app.holding(c.adapter):  # (its adapter kept until it ends: no unload between its check and its forwards)
            self.generate_checked(c)

    def generate_checked(self, c):
        """generate's request c, checked and its adapter held: its prompts' choices drawn, then its response."""
        app, s = self.server.app, c.s
        if s["stream"]:
            c.start_stream()
        if s["beam"] is not None:  # (its own loop, outside the engine: Model.beam_search)
            c.respond(in_turn(c.beams, len(c.prompts), c.stop))
            return
        # a request's prompts decode together (vLLM's): each its own engine request, all submitted at once, in
        # threads of their own; in turn with no engine, or when seeded draws share the request's one generator
        # (its draws in prompt order are what the seed reproduces)
        together = app.engine is not None and len(c.prompts) > 1 and not (
            s["seed"] is not None and sampled(s) and s["max_tokens"] != 0)
        done = in_threads(c.one, len(c.prompts), c.stop, 2 * app.engine.max_batch) if together else \
            in_turn(c.one, len(c.prompts), c.stop)
        c.respond(done)


class Completion:
    """One generation request (Handler.generate's), checked: its settings s (sampling_settings'), its prompts' ids,
    texts (echo's) and token budgets, its response's head and the generator its draws share (the seed's). Its
    prompts may run in threads of their own (one each, in_threads); they share the write lock (one chunk written at
    a time) and stop, set by a prompt that fails (a client gone, a write timed out), which ends the others' draws
    as if the client left, and their writes."""

    def __init__(self, handler, endpoint: str, body: dict):
        import torch

        from tritongpt.train.beam_search import length_penalty_overflows

        self.handler, app = handler, handler.server.app
        self.app, self.chat = app, endpoint == "chat"
        s = self.s = sampling_settings(body, endpoint, app.names, app.tool_parser, app.defaults)
        # a LoRA adapter's name (serve --lora-modules): its requests run it, their responses name it (vLLM's). Any
        # "model" but the base's passed sampling_settings' check as an adapter's: not looked up again (an unload
        # since would make it the base's), Model.holding's 404 where it is gone
        model = body.get("model")
        self.adapter = model if model is not None and model != app.name else None
        if app.engine is not None and s["n"] > app.engine.max_batch and s["beam"] is None:  # (beams: no engine)
            raise bad("n", f"'n' is {s['n']}, more than this server's --max-batch {app.engine.max_batch}: a "
                           "request's choices decode together in the batch")
        vocab = app.limit or app.model.config.vocab_size
        if s["logit_bias"] and max(s["logit_bias"]) >= vocab:
            raise bad("logit_bias", f"'logit_bias' has token id {max(s['logit_bias'])}: the model's tokens are "
                                    f"0..{vocab - 1}")
        if s["allowed_token_ids"] and max(s["allowed_token_ids"]) >= vocab:
            raise bad("allowed_token_ids", f"'allowed_token_ids' has token id {max(s['allowed_token_ids'])}: the "
                                           f"model's tokens are 0..{vocab - 1}")
        s["bad_words_ids"] = bad_words_ids(app.encode, s["bad_words"], vocab) if s["bad_words"] else None
        if s["stop_token_ids"] and max(s["stop_token_ids"]) >= vocab:
            raise bad("stop_token_ids", f"'stop_token_ids' has token id {max(s['stop_token_ids'])}: the model's "
                                        f"tokens are 0..{vocab - 1}")
        self.spent = {"cached": []}  # the usage details the draws give (Model.draw's spent)
        if self.chat:
            if "messages" not in body:
                raise bad("messages", "'messages' is required")
            self.prompts, self.texts = [app.chat_prompt(body["messages"], s["tools"], s["template_kwargs"],
                                                        s["prompt_mode"])], [None]
            self.stop_id = app.tool_chat_stop if app.tool_template(s["tools"]) else app.chat_stop
            # a reasoning model's answer (--reasoning-parser): in thought unless its prompt ended the thinking; its
            # think tokens' text kept for the parser, its structured outputs waking at </think>
            thinking = app.reasoning_parser
            self.thinks = thinking is not None and thinking.thinks(self.prompts[0], s["template_kwargs"])
            s["think_ids"] = thinking.ids if thinking is not None else ()
            s["wake"] = thinking.end_id if self.thinks else None
            if s["wake"] is not None:  # each choice's thought's tokens (Model.draw's; harmony's: no one end token)
                self.spent["thought"] = {}
        else:
            self.prompts, self.texts = handler.completion_prompts(body.get("prompt"), vocab)
            self.stop_id = app.eot
        keep = truncation(body, app.max_model_len)
        if keep is not None:  # (vLLM's left truncation; echo would show a prompt the model did not read)
            if s["echo"]:
                raise bad("truncate_prompt_tokens", "'truncate_prompt_tokens' is not supported with 'echo': true")
            self.prompts = [ids[-keep:] for ids in self.prompts]
        if app.ends_too and s["beam"] is None:  # (generation_config's: vLLM's stop ids)
            others = [t for t in app.ends_too if t != self.stop_id]
            if s["ignore_eos"]:  # they end nothing, but min_tokens still holds them back (vLLM's all_stop_token_ids)
                s["hold_ids"] = others
            else:
                s["stop_token_ids"] = list(dict.fromkeys(s["stop_token_ids"] + others))
        self.budgets = [app.budget(ids, s["max_tokens"]) for ids in self.prompts]  # every prompt checked first
        if s["beam"] is not None and length_penalty_overflows(s["beam"]["length_penalty"], max(self.budgets)):
            raise bad("length_penalty", f"'length_penalty' {s['beam']['length_penalty']!r} is out of range for "
                                        f"{max(self.budgets)} tokens: a beam's score divides by its length ** "
                                        "length_penalty, past a float's range there")
        if s["min_tokens"] > min(self.budgets):  # (the context's or generation_config's cut: vLLM's 400 too)
            raise bad("min_tokens", f"'min_tokens' ({s['min_tokens']}) must be at most max_tokens "
                                    f"({min(self.budgets)}: the most this prompt may draw, by the context left or "
                                    "generation_config's max_new_tokens)")
        if self.chat and s["structured"] is not None and self.thinks and s["wake"] is None:
            # (harmony's thought ends at a run of tokens, <|channel|>final<|message|>: a grammar wakes at one token)
            raise bad(s["structured_field"], f"'{s['structured_field']}' is not supported with --reasoning-parser "
                                             f"{thinking.name}: its grammar would hold the reasoning too (the final "
                                             "channel's header is several tokens, not one the grammar can wait for)")
        # (compiled now: a schema it cannot take, a 400)
        guide = app.guide(s["structured"], s["structured_field"], s["tools"], s.get("wake"))
        # a tool call ends a thought without </think> (qwen3's) only where no grammar holds the answer: a grammar
        # wakes at the </think> token, and the parser's split keeps to it
        self.thought_calls = guide is None
        # harmony's tool parser reads the answer's own markup (its calls are messages): handed the whole text, not the
        # reasoning parser's content (train/reasoning.py Harmony)
        tools = s["tools"]
        self.markup_calls = self.chat and app.reasoning_parser is not None and app.reasoning_parser.markup and \
            tools is not None and tools["choice"] == "auto" and getattr(tools["parser"], "markup", False)
        if guide is not None:  # (and an end token its text can have, before a stream's first event)
            from tritongpt.train.generate import end_rule, masked_ends

            ends = end_rule(self.stop_id, s["stop_token_ids"], 0, s["ignore_eos"])[1]
            try:
                guide.begin(1, ends, vocab)
            except UserError as e:
                raise bad("ignore_eos" if s["ignore_eos"] else s["structured_field"], str(e)) from None
            # (masks that leave the grammar's end no end token: a 400 now, not an error mid-answer)
            masked = masked_ends(ends, s["allowed_token_ids"], s["bad_words_ids"], lambda n: f"'{n}'",
                                 f"the '{s['structured_field']}'", guide.wake)
            if masked is not None:
                raise bad(*masked)
        # a predicted output's ids (train/generate.py Prediction: a new one for each draw, its rows' places its own)
        self.predicted, self.predictions = None, []
        if s["prediction"] is not None:
            if guide is not None and guide.wake is not None:  # (the engine does not speculate such a request)
                raise bad("prediction", "'prediction' is not supported with structured outputs or tools while the "
                                        "model reasons (--reasoning-parser): the grammar waits for the thought's end")
            try:
                self.predicted = app.encode(s["prediction"], bos=False, special=True)
            except (UserError, ValueError) as e:
                raise bad("prediction.content", f"'prediction.content' cannot be tokenized: {e}") from None
        self.check_room(guide)
        # echo: the prompt's text (and logprobs) first, then the choice's
        self.echoes = [text if s["echo"] else "" for text in self.texts]
        self.kind = "chat.completion" if self.chat else "text_completion"
        self.head = {"id": ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex, "object": self.kind,
                     "created": int(time.time()), "model": self.adapter or app.name}
        seed = s["seed"] if s["seed"] is not None else secrets.randbits(63)
        self.generator = torch.Generator(device=app.device).manual_seed(seed)
        self.write, self.stop = threading.Lock(), threading.Event()
        self.calls = {}  # a streamed choice's tool calls (CallStream, AutoStream), by its index
        self.thoughts = {}  # a streamed choice's reasoning (ReasoningStream), by its index
        self.ids_sent = {}  # a streamed choice's token ids sent so far (return_token_ids), by its index

    def check_room(self, guide):
        """Each prompt's engine request as draw() submits it, refused now where the engine could never admit it
        (Engine.check_room: its rows, context and a paged cache's pages, speculation's too): a 400 before a stream's
        200, as vLLM's (its length checks come before the stream; a request past its KV cache cannot come: vLLM
        refuses that at startup), not an error event after it. param: the prompt where it alone does not fit, else
        max_tokens, else n (its rows together)."""
        engine, s = self.app.engine, self.s
        if engine is None or s["beam"] is not None:  # (beams: no engine)
            return
        in_prefill = s["score_k"] is not None
        for ids, budget in zip(self.prompts, self.budgets):
            if budget == 0 and not in_prefill:  # (draw()'s: nothing submitted)
                continue
            rows = 1 if budget == 0 else s["n"]  # (a prefill-only request: one row, Model.draw's)

            def check(rows, budget):
                engine.check_room(rows, len(ids), budget, True, engine.speculates(
                    budget, s["logprobs"], s["min_tokens"], s["score_k"], guide, self.predicted is not None))
            try:
                check(rows, budget)
            except UserError as e:
                blame = "n"  # (one row of it would fit: its n rows together do not)
                for field, one_row_of in (("messages" if self.chat else "prompt", 0), ("max_tokens", budget)):
                    try:
                        check(1, one_row_of)
                    except UserError:
                        blame = field
                        break
                raise bad(blame, str(e)) from None

    def logprobs(self, items, start=0):
        """A choice's (or a chunk's) logprobs object, or None: chat's, or completions' (text offsets from start)."""
        if items is None:
            return None
        return chat_logprobs(self.app.tok, items, self.s["as_ids"]) if self.chat else \
            completion_logprobs(self.app.tok, items, start, self.s["as_ids"])

    def start_stream(self):
        """The stream's 200 and headers, before any prompt's work; its chunks are chat's "chat.completion.chunk"
        objects (completions' keep "text_completion", as OpenAI's)."""
        h = self.handler
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Cache-Control", "no-cache")
        h.end_headers()
        h.streaming = True
        self.head["object"] = self.kind + ".chunk" if self.chat else self.kind

    def chunk(self, index, text=None, finish=None, role=False, lp=None, reason=None, tokens=0, ids=None):
        """One streamed event of choice `index`: chat's role, or a text delta (with its logprobs), or its finish;
        tokens: the choice's completion tokens so far (continuous_usage_stats' usage), ids their ids (with
        return_token_ids the chunk's token_ids are those not sent yet, vLLM's delta; the prompt's ids on chat's role
        chunks, on a completion choice's first). Written under the write lock, from whichever prompt's thread; none
        once stop is set (BrokenPipeError)."""
        if self.chat:
            thought = None  # the reasoning this chunk sends (--reasoning-parser): the rest is the answer's text
            if self.app.reasoning_parser is not None and not role:
                stream = self.thoughts.setdefault(index, self.app.reasoning_parser.stream(self.thinks,
                                                                                          self.thought_calls))
                raw = text  # (harmony's tool parser reads it: markup_calls)
                thought, text = stream.add(text) if text is not None else (None, None)
                if finish is not None:
                    more, rest = stream.ends()
                    thought, text = (thought or "") + (more or "") or None, (text or "") + (rest or "") or None
                thought = thought if self.s["include_reasoning"] else None
                if self.markup_calls:
                    text = raw  # (the tool parser's stream sends the content: the same as the reasoning parser's)
                elif thought is None and text is None and finish is None and lp is None:
                    return  # (a tail that may begin </think>, held: no chunk)
            delta = {"role": "assistant", "content": ""} if role else {"content": text} if text is not None else {}
            tools = self.s["tools"]
            if tools is not None and tools["choice"] == "auto" and not role:  # content, then calls the parser finds
                stream = self.calls.setdefault(index, AutoStream(tools["parser"], tools["parallel"]))
                content, calls = stream.add(text) if text is not None else (None, [])
                if finish is not None:  # (what the stream held back: a tail that did not begin a call, calls' ends)
                    more, rest = stream.finish()
                    content, calls = (content or "") + (more or "") or None, calls + rest
                delta = {**({"content": content} if content else {}), **({"tool_calls": calls} if calls else {})}
                if not delta and finish is None and lp is None and thought is None:
                    return  # (nothing to send yet: no chunk, as vLLM)
                if finish is not None and stream.sent:
                    finish = "tool_calls"
            elif tools is not None and tools["choice"] != "none" and not role:  # its calls, as vLLM streams them
                short = tools["parser"] is not None and tools["parser"].short_ids
                calls = self.calls.setdefault(index, CallStream(tools["name"], short))
                if text is not None:
                    delta = {"tool_calls": calls.add(text)}
                    if not delta["tool_calls"]:
                        if lp is None and thought is None:
                            return  # (nothing of a call yet: no chunk, as vLLM)
                        delta = {}
                if finish is not None and calls.sent:  # (vLLM's stream: "tool_calls" once a call was streamed)
                    finish = "tool_calls"
            if thought is not None:
                delta = {"reasoning": thought, **delta}
            choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": lp, "finish_reason": finish}
        choice["stop_reason"] = reason  # (vLLM's, on every chunk)
        extra, sent = {}, self.ids_sent.get(index)
        if self.s["token_ids"]:  # (vLLM's places: chat's prompt ids on the chunk, a completion's on its choice)
            prompt = self.prompts[index // self.s["n"]]
            if role:
                extra["prompt_token_ids"] = prompt
            else:
                if not self.chat and sent is None:
                    choice["prompt_token_ids"] = prompt
                choice["token_ids"] = list((ids or [])[sent or 0:])
        # with include_usage, OpenAI's other chunks carry "usage": null; with continuous_usage_stats vLLM's the
        # prompt's tokens and the choice's so far (vllm/entrypoints/openai/serving_completion.py, serving_chat.py)
        null_usage = {"usage": None} if self.s["include_usage"] else {}
        if self.s["continuous_usage"]:
            null_usage["usage"] = usage_of(len(self.prompts[index // self.s["n"]]), tokens)
        with self.write:
            if self.stop.is_set():  # (not another write to a socket that just timed out: each would wait as long)
                raise BrokenPipeError("another prompt of the request failed")
            try:
                self.handler.send_event({**self.head, "choices": [choice], **null_usage, **extra})
                if "token_ids" in choice:
                    self.ids_sent[index] = (sent or 0) + len(choice["token_ids"])
            # the client gone (draw()'s reasons): told under the lock, else the thread next in line writes
            # before this one unwinds to in_threads (its cancel, its clock); another error sets stop there,
            # once raised, so that it stays the first (the request's 500, not the others' BrokenPipe)
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                self.stop.set()
                raise

    def one(self, p: int) -> tuple:
        """Prompt p's n choices: (their objects, its prompt tokens, their tokens, its prompt_logprobs). The prompt
        is scored where asked (echo's logprobs, prompt_logprobs: scored's "echo" and "prompt"), its choices drawn,
        and with stream each chunk written as it comes."""
        s = self.s
        # the prompt's clock, from here: its scoring forward (no engine) is in it, the draw ends it (or whatever
        # fails first)
        # (its n choices vLLM's n child requests; echo's max_tokens 0 runs vLLM's max_tokens 1: draw())
        timing = self.app.metrics.request(s["n"], max(self.budgets[p], 1))
        if self.stop.is_set():  # another prompt of the request failed before this one started: counted, not run
            timing.end(["abort"] * s["n"])
            raise BrokenPipeError("another prompt of the request failed")
        # the prompt scored (echo's logprobs, prompt_logprobs): with the engine, in the request's own prefill
        # (on_prompt, called by draw() before any token: one prefill a request); without it, one forward here
        in_prefill = s["score_k"] is not None and self.app.engine is not None
        scored = {"echo": None, "prompt": None}
        with ended_if_failed(timing, s["n"]):
            self.begin(p, in_prefill, scored, timing)
        drawn = self.draw(p, timing, in_prefill, scored)
        return self.choices(p, drawn, scored), len(self.prompts[p]), sum(c[2] for c in drawn), scored["prompt"]

    def beams(self, p: int) -> tuple:
        """Prompt p's n beams (use_beam_search), as one() gives its choices: the best first, the prompt counted once.
        With stream, each beam's text a chunk once the search ends (vLLM's: the beams are known only then)."""
        timing = self.app.metrics.request(self.s["n"], self.budgets[p])  # (its beams counted as n choices are)
        if self.stop.is_set():  # another prompt of the request failed before this one started: counted, not run
            timing.end(["abort"] * self.s["n"])
            raise BrokenPipeError("another prompt of the request failed")
        if self.s["stream"]:  # (chat's role chunks first, as a draw's; a client gone by then counted, as in one())
            with ended_if_failed(timing, self.s["n"]):
                self.begin(p, False, {"echo": None, "prompt": None})
        drawn = self.app.beam_search(self.prompts[p], self.budgets[p], self.s, self.stop_id, timing, self.adapter,
                                     lambda: self.stop.is_set() or self.handler.client_gone(), self.spent)
        for i, (text, _, count, _, _, ids) in enumerate(drawn if self.s["stream"] else ()):
            if text:
                self.chunk(p * self.s["n"] + i, text, tokens=count, ids=ids)
        return self.choices(p, drawn, {"echo": None, "prompt": None}), len(self.prompts[p]), sum(c[2] for c in drawn), \
            None

    def begin(self, p: int, in_prefill: bool, scored: dict, timing=None):
        """Prompt p's work before its draw: its scoring where no prefill scores it (timing: the prompt's clock, admitted
        when the scoring takes the model), and with stream its choices' first chunks (chat's role; echo's text,
        unless on_prompt writes it once the prefill scored it)."""
        s = self.s
        if s["score_k"] is not None and not in_prefill:
            self.scores(p, self.app.score_prompt(self.prompts[p], s["score_k"], timing=timing, adapter=self.adapter),
                        scored)
        if s["stream"]:
            for i in range(s["n"]):
                if self.chat:
                    self.chunk(p * s["n"] + i, role=True)
                elif s["echo"] and not in_prefill:
                    self.chunk(p * s["n"] + i, self.echoes[p], lp=scored["echo"])

    def scores(self, p: int, rows, scored: dict):
        """Echo's logprobs object and prompt_logprobs' list of prompt p's rows (score_prompt's), into scored."""
        s, ids = self.s, self.prompts[p]
        if s["echo"] and s["logprobs"] is not None:
            scored["echo"] = self.logprobs(self.app.prompt_logprobs(ids, rows, s["logprobs"], self.texts[p]))
        if s["prompt_logprobs"] is not None:
            scored["prompt"] = vllm_prompt_logprobs(self.app.tok, ids, rows, s["prompt_logprobs"])

    def on_prompt(self, p: int, scored: dict, step):
        """Prompt p scored by the engine's prefill of it (called within its draw(), before any token); with
        stream and echo, its choices' first chunks then: the prompt's text with its logprobs."""
        s = self.s
        self.scores(p, self.app.score_prompt(self.prompts[p], s["score_k"], step), scored)
        for i in range(s["n"]) if s["stream"] and s["echo"] else ():
            self.chunk(p * s["n"] + i, self.echoes[p], lp=scored["echo"])

    def draw(self, p: int, timing, in_prefill: bool, scored: dict) -> list:
        """Prompt p's n choices, Model.draw's (text, finish_reason, tokens, logprob items, stop_reason), with
        stream their text deltas written as they come. timing: the prompt's clock, ended here where nothing is
        drawn, else by Model.draw."""
        s, ids, base, echo = self.s, self.prompts[p], p * self.s["n"], self.echoes[p]
        on_delta = (lambda i, text, items, count, ids=None: self.chunk(
            base + i, text, lp=self.logprobs(items, len(echo)), tokens=count, ids=ids)) if s["stream"] else None
        if self.budgets[p] == 0 and not in_prefill:  # echo with max_tokens 0: the prompt scored, nothing drawn
            # vLLM draws one token a choice and drops it (protocol.py's to_sampling_params: echo with max_tokens 0
            # runs max_tokens 1): its usage (serving_completion.py: len(output.token_ids)) and metrics
            # (v1/metrics/stats.py: a first token, its TTFT, and those generation tokens) count it, and so do ours,
            # the scored (or echoed) prompt taken as its first token
            if timing.scheduled is None:  # (nothing scored: nothing waited for the model)
                timing.scheduled = time.monotonic()
            # vLLM's step of its n children: each one's prompt and its token (iteration_tokens_total); ours ran no
            # engine step (a scoring forward at most, outside the engine's steps), so it is its own observation
            self.app.metrics.iteration(s["n"] * (len(ids) + 1))
            timing.tokens()
            timing.end(["length"] * s["n"], len(ids), [1] * s["n"])  # (vLLM's finish "length")
            return [("", "length", 1, [] if s["logprobs"] is not None else None, None, [])] * s["n"]
        # (with the engine's echo, budget 0: a prefill-only request, its choices "length", counted alike: Model.draw)
        prediction = None
        if self.predicted is not None:
            from tritongpt.train.generate import Prediction

            prediction = Prediction(self.predicted)
            self.predictions.append(prediction)
        return self.app.draw(ids, self.budgets[p], s, self.stop_id, self.generator, on_delta,
                             lambda: self.stop.is_set() or self.handler.client_gone(),
                             (lambda step: self.on_prompt(p, scored, step)) if in_prefill else None, timing,
                             self.adapter, prediction, self.spent)

    def choices(self, p: int, drawn: list, scored: dict) -> list:
        """Prompt p's choice objects (OpenAI's index: the prompt's n choices in turn), echo's text and logprobs
        first; with stream, each choice's last chunk (its finish_reason) instead, and no objects."""
        s, base, echo = self.s, p * self.s["n"], self.echoes[p]
        choices = []
        for i, (text, finish, count, items, reason, ids) in enumerate(drawn):
            if s["stream"]:
                self.chunk(base + i, finish=finish, reason=reason, tokens=count, ids=ids)
                continue
            # vLLM's return_token_ids: each choice's ids (a completion's prompt ids too; chat's: the response's)
            given = {} if not s["token_ids"] else {"token_ids": ids} if self.chat else \
                {"prompt_token_ids": self.prompts[p], "token_ids": ids}
            lp = self.logprobs(items, len(echo))
            if scored["echo"] is not None:
                lp = {key: scored["echo"][key] + lp[key] for key in lp}
            if self.chat:  # (chat's prompt_logprobs: the response's, vLLM's)
                message, finish = self.message(text, finish)
                choices.append({"index": base + i, "message": message, "logprobs": lp, "finish_reason": finish,
                                "stop_reason": reason, **given})
            else:
                choices.append({"index": base + i, "text": echo + text, "logprobs": lp, "finish_reason": finish,
                                "stop_reason": reason, **given,
                                **({} if scored["prompt"] is None else {"prompt_logprobs": scored["prompt"]})})
        return choices

    def message(self, text: str, finish: str) -> tuple:
        """(A chat choice's message, its finish_reason): tool_message's; with a reasoning parser, the thought apart
        as "reasoning" (vLLM's field; null where the answer did not think, or include_reasoning is false) and the rest
        as the answer (content null where nothing follows the thought: no tool call either)."""
        if self.app.reasoning_parser is None:
            return tool_message(self.s["tools"], text, finish)
        from tritongpt.train.reasoning import answer

        reasoning, content = answer(self.app.reasoning_parser, text, self.thinks, self.thought_calls)
        if self.markup_calls:  # (harmony's: the tool parser reads the calls and the content from the whole text)
            message, finish = tool_message(self.s["tools"], text, finish)
        else:
            message, finish = ({"role": "assistant", "content": None}, finish) if content is None else \
                tool_message(self.s["tools"], content, finish)
        return {"role": "assistant", "reasoning": reasoning if self.s["include_reasoning"] else None, **message}, finish

    def usage(self, done: list) -> dict:
        """The prompts' one() results' usage (OpenAI's), with completion_tokens_details where there are any: a
        prediction's proposals kept and refused (Prediction's counts), a reasoning model's thought's tokens (the
        answer's tokens through its </think>, all of them where the thought did not end: Model.draw's)."""
        usage = usage_of(sum(d[1] for d in done), sum(d[2] for d in done))
        details = {}
        if "thought" in self.spent:
            details["reasoning_tokens"] = sum(self.spent["thought"].values())
        if self.predicted is not None:
            details.update(accepted_prediction_tokens=sum(p.accepted for p in self.predictions),
                           rejected_prediction_tokens=sum(p.rejected for p in self.predictions))
        if self.app.prompt_tokens_details:  # (vLLM's --enable-prompt-tokens-details)
            usage["prompt_tokens_details"] = {"cached_tokens": sum(self.spent["cached"])}
        return {**usage, "completion_tokens_details": details} if details else usage

    def respond(self, done: list):
        """The response of the prompts' one() results, in prompt order: their choices and usage; with stream, the
        usage chunk (include_usage) and [DONE] after the choices' chunks."""
        choices, prompt_lp = [c for d in done for c in d[0]], done[-1][3]  # (chat's prompt_logprobs: its one prompt's)
        usage = self.usage(done)
        if self.s["stream"]:
            if self.s["include_usage"]:
                self.handler.send_event({**self.head, "choices": [], "usage": usage})
            self.handler.send_event("[DONE]")
        else:
            self.handler.send_json(200, {**self.head, "choices": choices, "usage": usage,
                                         **({"prompt_logprobs": prompt_lp} if self.chat and prompt_lp is not None
                                            else {}),
                                         **({"prompt_token_ids": self.prompts[0]} if self.chat and self.s["token_ids"]
                                            else {})})


class Typed:
    """A Response's handler: the handler itself, but the chat chunks Completion writes (send_event) go to the
    response's typed events (train/responses.py Events) instead; the chat stream's [DONE] is not the API's."""

    def __init__(self, handler, on_chunk):
        object.__setattr__(self, "_handler", handler)
        object.__setattr__(self, "_on_chunk", on_chunk)

    def __getattr__(self, name):
        return getattr(self._handler, name)

    def __setattr__(self, name, value):
        setattr(self._handler, name, value)

    def send_event(self, obj):
        if isinstance(obj, dict) and "choices" in obj:
            self._on_chunk(obj)


class Response(Completion):
    """POST /v1/responses (train/responses.py): the request as a chat completion (to_chat), drawn as one; its answer
    as output items, streamed as typed events; kept (store) for GET /v1/responses/{id} and previous_response_id."""

    def __init__(self, handler, body: dict):
        from tritongpt.train import responses as R

        app = handler.server.app
        chat, self.conversation = R.to_chat(body, app.responses)
        self.body, self.rid, self.created, self.events = body, R.new_id("resp"), int(time.time()), None
        self.finish = None  # the stream's finish as drawn
        try:
            super().__init__(Typed(handler, lambda chunk: self.events.chunk(chunk)), "chat", chat)
        except APIError as e:  # (chat's checks name chat's fields)
            raise R.renamed(e) from None

    @property
    def echoed(self) -> dict:
        """The request as its response object echoes it, with the temperature and top_p it was drawn with (a null or
        left-out one: --generation-config's default, else 1; vLLM's from_request reads its sampling params too)."""
        return {**self.body, "temperature": self.s["temperature"], "top_p": self.s["top_p"]}

    def start_stream(self):
        from tritongpt.train import responses as R

        super().start_stream()
        head = R.response_object(self.echoed, self.rid, self.created, self.head["model"], [], None, None, "in_progress")
        self.events = R.Events(self.handler._handler.send_typed, head)
        self.handler.stream_failed = self.failed
        self.events.start()

    def chunk(self, index, text=None, finish=None, **kw):
        if finish is not None:  # (chat's stream says "tool_calls" once a call went, though max_tokens cut it)
            self.finish = finish
        super().chunk(index, text, finish, **kw)

    def failed(self, e: APIError):
        """A stream that failed midway: its typed end (Events.fail), the response kept as failed."""
        from tritongpt.train import responses as R

        self.events.cut()
        response = R.response_object(self.echoed, self.rid, self.created, self.head["model"], self.events.items, None,
                                     None, "failed", e)
        self.store(response)
        self.events.fail(e, response)

    def store(self, response: dict):
        from tritongpt.train import responses as R

        if response["store"]:
            self.app.responses.put(response, self.conversation + [R.assistant_turn(response["output"])],
                                   R.input_items(self.body["input"]))

    def respond(self, done: list):
        from tritongpt.train import responses as R

        choices, usage = done[0][0], self.usage(done)
        if self.s["stream"]:
            self.events.close()
            items, finish = self.events.items, self.finish
        else:
            items, finish = R.output_items(choices[0]["message"]), choices[0]["finish_reason"]
        response = R.response_object(self.echoed, self.rid, self.created, self.head["model"], items, finish, usage)
        self.store(response)
        if self.s["stream"]:
            self.events.end(response)
        else:
            self.handler.send_json(200, response)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    api_key = None  # --api-key's: the bearer key every path but PUBLIC_PATHS needs (None: none)
    # socketserver's listen backlog is 5: a sixth client connecting at once had its SYN dropped and retried after
    # ~1 s (seen: 8 concurrent requests batched in two waves); the OS's own limit instead
    request_queue_size = socket.SOMAXCONN
    # how long server_close waits for the requests in flight to stop (the engine's end as it stops; the others at
    # their next check whether their client left, Handler.client_gone: after each token without the engine, so once
    # the forward they are in ends); one still running then is not waited for (a thread inside torch as Python exits
    # aborts the process: cli.main ends it at once instead)
    stop_wait = 5.0

    def __init__(self, *a, **k):
        self.handlers_lock, self.handlers = threading.Lock(), {}
        super().__init__(*a, **k)

    def process_request(self, request, client_address):
        """socketserver's, each request's thread and socket kept (it keeps no daemon thread): server_close stops and
        joins them."""
        t = threading.Thread(target=self.process_request_thread, args=(request, client_address), daemon=True)
        with self.handlers_lock:
            self.handlers = {h: sock for h, sock in self.handlers.items() if h.is_alive()}
            self.handlers[t] = request
        t.start()

    def server_close(self):
        """The socket closed, the engine stopped (its requests end: a 500, engine_dead), then the other requests in
        flight stopped and every request's thread joined (stop_wait at most: one that does not stop by then said on
        stderr and marked abandoned, for cli.main)."""
        super().server_close()
        with self.handlers_lock:
            handlers = [(t, sock) for t, sock in self.handlers.items() if t.is_alive()]
        app, left = getattr(self, "app", None), []
        try:
            if app is not None:
                app.close()  # the engine's thread stopped, its cache freed
            # each request's socket shut for reading: its handler's client_gone() reads the end of the stream, as
            # from a client that left, so its work stops; a thread waiting for a request's bytes wakes
            for _, sock in handlers:
                try:
                    sock.shutdown(socket.SHUT_RD)
                except OSError:  # (closed already)
                    pass
            deadline = time.monotonic() + self.stop_wait
            for t, _ in handlers:
                t.join(max(0.0, deadline - time.monotonic()))
            left = [t for t, _ in handlers if t.is_alive()]
            if left:
                note(f"{len(left)} request{'s' if len(left) > 1 else ''} still running {self.stop_wait:g} s after "
                     "the server stopped (inside a forward longer than that): not waited for")
        except KeyboardInterrupt:  # (a second Ctrl-C: not waited for either)
            engine = app and app.engine
            left = [t for t, _ in handlers] + ([engine.thread] if engine and engine.thread else [])
            raise
        finally:
            for t in left:
                t.abandoned = True


class Server6(Server):
    address_family = socket.AF_INET6  # an IPv6 --host (::1, ::): socketserver's default family is IPv4's alone


def unbracketed(host: str) -> str:
    """--host as a URL writes an IPv6 address ([::1]) or bare (::1): the bare one, which a socket binds."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def host_port(host, port) -> str:
    """host:port as a URL spells it: an IPv6 address in brackets ([::1]:8000)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_engine_args(args, one_row_engine: bool = False):
    """--max-batch, --kv-cache-pages, --kv-page-size, --enable-prefix-caching and --max-prefill-tokens (serve's,
    `generate --prompts`'),
    checked before any model is built. one_row_engine: --max-batch 1 runs the engine too (generate --prompts), not
    generate() (serve)."""
    if args.max_batch < 1:
        raise UserError(f"--max-batch must be a positive integer, got {args.max_batch}")
    if args.kv_cache_pages is not None and (args.kv_cache_pages < 1 or args.max_batch == 1 and not one_row_engine):
        raise UserError(f"--kv-cache-pages must be a positive number of pages, with --max-batch above 1 (the batching "
                        f"engine's cache), got {args.kv_cache_pages} with --max-batch {args.max_batch}")
    if args.kv_page_size is not None and args.kv_cache_pages is None:
        raise UserError("--kv-page-size sizes the pages of --kv-cache-pages: pass --kv-cache-pages N too")
    if args.kv_page_size is not None and args.kv_page_size < 1:
        raise UserError(f"--kv-page-size must be a positive number of positions, got {args.kv_page_size}")
    if args.enable_prefix_caching and args.kv_cache_pages is None:
        raise UserError("--enable-prefix-caching shares the pages of the paged KV cache: pass --kv-cache-pages N too")
    if args.max_prefill_tokens is not None and (args.max_prefill_tokens < 1 or args.max_batch == 1
                                                and not one_row_engine):
        raise UserError(f"--max-prefill-tokens must be a positive number of tokens, with --max-batch above 1 (the "
                        f"batching engine's steps), got {args.max_prefill_tokens} with --max-batch {args.max_batch}")


SPECULATIVE_KEYS = {"ngram": ("method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"),
                    "draft_model": ("method", "model", "num_speculative_tokens")}  # (vLLM's, a method's)
LORA_KEYS = ("name", "path", "base_model_name")  # vLLM's LoRAModulePath, --lora-modules' JSON form


RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"  # vLLM's switch for its load/unload endpoints


def runtime_lora_updating() -> bool:
    """vLLM's envs.VLLM_ALLOW_RUNTIME_LORA_UPDATING: "1" or "true", any case."""
    return os.environ.get(RUNTIME_LORA_ENV, "0").strip().lower() in ("1", "true")


def lora_modules(args, runtime: bool = False) -> dict:
    """--lora-modules (vLLM's): each NAME=PATH or '{"name": ..., "path": ..., "base_model_name": ...}' ->
    {name: path}, checked before the model loads (--enable-lora given, names unique and not the model's own, each
    path there). --max-lora-rank and --max-loras checked too. runtime (serve with $VLLM_ALLOW_RUNTIME_LORA_UPDATING):
    --enable-lora may come alone, the adapters loaded later (POST /v1/load_lora_adapter); False: serve without the
    variable (its refusal of --enable-lora alone names it); None: offline, generate --prompts (no variable to name)."""
    from pathlib import Path

    if args.max_lora_rank is not None and args.max_lora_rank < 1:
        raise UserError(f"--max-lora-rank must be a positive integer, got {args.max_lora_rank}")
    if args.max_loras is not None and args.max_loras < 1:
        raise UserError(f"--max-loras must be a positive integer, got {args.max_loras}")
    if not args.lora_modules:
        if args.enable_lora and not runtime:
            raise UserError("--enable-lora: pass the adapters too, --lora-modules NAME=PATH ..." + (
                "" if runtime is None else f" (or, to load them while serving through POST /v1/load_lora_adapter, "
                                           f"set {RUNTIME_LORA_ENV}=true as for vLLM)"))
        for flag, value in (("--max-loras", args.max_loras), ("--max-lora-rank", args.max_lora_rank)):
            if value is not None and not args.enable_lora:
                raise UserError(f"{flag} is a setting of the adapters of --lora-modules: pass --lora-modules")
        return {}
    if not args.enable_lora:
        raise UserError("--lora-modules needs --enable-lora (vLLM's: it turns the adapters' path on)")
    modules = {}
    for spec in args.lora_modules:
        if spec.lstrip().startswith("{"):
            try:
                item = json.loads(spec)
            except ValueError as e:
                raise UserError(f"--lora-modules {spec!r}: not a JSON object ({e})") from None
            unknown = [k for k in item if k not in LORA_KEYS] if isinstance(item, dict) else []
            if not isinstance(item, dict) or unknown or not isinstance(item.get("name"), str) \
                    or not isinstance(item.get("path"), str):
                raise UserError(f"--lora-modules {spec!r}: a JSON module is an object with string 'name' and 'path' "
                                f"(and 'base_model_name'){f', not {unknown[0]!r}' if unknown else ''}")
            name, path = item["name"], item["path"]
        else:
            name, eq, path = spec.partition("=")
            if not eq:
                raise UserError(f"--lora-modules {spec!r}: give NAME=PATH (or vLLM's JSON form)")
        if not name.strip() or not path.strip():
            raise UserError(f"--lora-modules {spec!r}: the name and the path must not be empty")
        if name in modules:
            raise UserError(f"--lora-modules names {name!r} twice")
        if not Path(path).expanduser().exists():
            raise UserError(f"--lora-modules {name}: no adapter at {path}")
        modules[name] = str(Path(path).expanduser())
    return modules


def load_adapters(model, modules: dict, max_rank: int | None, served: str | None):
    """The --lora-modules adapters read (train/gpt2_weights.py read_adapter) and served beside `model`
    (model/lora.py serve_adapters): each request naming one runs it."""
    from tritongpt.model.lora import serve_adapters
    from tritongpt.train.gpt2_weights import read_adapter

    if served is not None and served in modules:
        raise UserError(f"--lora-modules {served}: that is the model's own name (--served-model-name)")
    serve_adapters(model, {name: read_adapter(path, model) for name, path in modules.items()}, max_rank or 16)


def json_object_flag(text: str, flag: str) -> dict:
    """A flag's JSON object (vLLM's JSON flags: --speculative-config, --override-generation-config, --pooler-config),
    refused by the flag's name where the text is not one."""
    try:
        got = json.loads(text)
    except ValueError as e:
        raise UserError(f"{flag} must be a JSON object, got {text!r} ({e})") from None
    if not isinstance(got, dict):
        raise UserError(f"{flag} must be a JSON object, got {text!r}")
    return got


GENERATION_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens")


def override_generation_config(text) -> dict:
    """serve --override-generation-config JSON: {key: value} of GENERATION_KEYS (vLLM's, which reads those alone
    from it; another key is refused here rather than silently dropped)."""
    if text is None:
        return {}
    got = json_object_flag(text, "--override-generation-config")
    unknown = [key for key in got if key not in GENERATION_KEYS]
    if unknown:
        raise UserError(f"--override-generation-config: '{unknown[0]}' is not taken (it sets "
                        f"{', '.join(GENERATION_KEYS)})")
    return got


def model_folder(args, tok):
    """The model's folder, where its generation config is read (vLLM's): --weights' (the folder, or a checkpoint
    file's), else --pretrained's snapshot, where its own tokenizer was read; not a run's tokenizer's recorded source
    (the folder it was once read from) nor --tokenizer elsewhere. None: neither."""
    source = getattr(tok, "info", {}).get("source")
    return (Path(args.weights) if Path(args.weights).is_dir() else Path(args.weights).parent) if args.weights \
        else Path(source) if source and not args.tokenizer else None


def generation_config(args, tok, vocab: int, override: dict, limit: int | None = None) -> tuple:
    """vLLM's --generation-config: (the requests' default settings {field: value}, with "max_tokens" the most an
    answer may draw; the end tokens the model folder's generation_config.json lists beside its EOS). auto: the
    model folder's file (--weights', or --pretrained's with its own tokenizer); vllm: no defaults; a folder: its file.
    The end tokens come from the file read, the model's own under vllm (vLLM's try_get_generation_config: without a
    generation_config.json, config.json's eos_token_id). Values are checked here, naming the file. vocab: the
    model's; limit: the tokenizer's size where the model's is padded past it (load_generation_model's)."""
    from tritongpt.train.generate import check_sampling
    from tritongpt.train.hf_tokenizer import generation_end_ids

    folder = model_folder(args, tok)
    own = folder / "generation_config.json" if folder is not None else None
    own = own if own is not None and own.is_file() else None
    mode = args.generation_config
    if mode in ("auto", "vllm"):
        path = own if mode == "auto" else None
    else:
        path = Path(mode) / "generation_config.json"
        if not path.is_file():
            raise UserError(f"--generation-config {mode}: no generation_config.json there (auto: the model's own; "
                            "vllm: none)")
    read = {} if path is None else read_json_object(path)
    config = {}
    for where, given in ((str(path), {key: read[key] for key in GENERATION_KEYS if read.get(key) is not None}),
                         ("--override-generation-config", override)):
        # null, and top_k 0 or -1 (transformers' and vLLM's "none"): no such default, the override's over the file's
        # too (vLLM's config.update(override), its None values then dropped)
        unset = [k for k, v in given.items() if v is None or (k == "top_k" and is_int(v) and v <= 0)]
        given = {k: v for k, v in given.items() if k not in unset}
        try:
            check_sampling(**{k: v for k, v in given.items() if k != "max_new_tokens"})
            if given.get("temperature", 0) > 2:  # (a request's range: OpenAI's)
                raise UserError(f"temperature must be in [0, 2], got {given['temperature']!r}")
            most = given.get("max_new_tokens")
            if most is not None and (not is_int(most) or most < 1):
                raise UserError(f"max_new_tokens must be a positive integer, got {most!r}")
        except UserError as e:  # (the override applies under vllm too: the hint is the file's alone)
            hint = "" if where == "--override-generation-config" else \
                " (--generation-config vllm serves OpenAI's defaults instead)"
            raise UserError(f"{where}: {e}{hint}") from None
        config = {k: v for k, v in config.items() if k not in unset} | given
    if "max_new_tokens" in config:  # (transformers' name: vLLM's max_tokens)
        config["max_tokens"] = config.pop("max_new_tokens")
    # the end tokens: the file read's (a folder's), else the model folder's own generation config, which without a
    # generation_config.json is config.json's eos_token_id (vLLM's try_get_generation_config falls back to it,
    # transformers' generate too): a tokenizer_config.json naming another EOS does not silence it
    ends = generation_end_ids(path.parent, vocab, limit)[0] if path is not None and path != own else \
        generation_end_ids(folder, vocab, limit)[0] if folder is not None else []
    if config:
        said = ", ".join(f"{k} {v}" for k, v in config.items())
        note(f"{path or '--override-generation-config'}: the requests' defaults are {said} (vLLM's "
             "--generation-config and --override-generation-config)")
        unused = [k for k in config if k not in BEAM_DEFAULTS + ("max_tokens",)]
        if unused:  # (once, here, rather than in every beam search's response)
            note(f"use_beam_search requests do not take the default {', '.join(unused)}: the search ranks the "
                 "model's raw log-probabilities (temperature 1, no cuts; vLLM's search takes the temperature)")
    return config, ends


def speculative_config(text, max_batch: int) -> dict:
    """serve --speculative-config JSON (vLLM's): {"method": "ngram", "num_speculative_tokens": K,
    "prompt_lookup_max": N} -> the Engine's {"prompt_lookup": N, "num_draft_tokens": K}; {"method": "draft_model",
    "model": PATH, "num_speculative_tokens": K} -> {"draft": PATH, "num_draft_tokens": K} (make_engine loads PATH);
    {} without it. Our lookup tries every n from N down to 1, so "prompt_lookup_min" is taken as 1 only; other
    methods and keys are refused by name. The batching engine speculates: --max-batch 1 (no engine) is refused."""
    if text is None:
        return {}
    spec = json_object_flag(text, "--speculative-config")
    method = spec.get("method")
    if method not in SPECULATIVE_KEYS:
        raise UserError(f"--speculative-config: method {method!r} is not served: only \"ngram\" (prompt lookup) and "
                        "\"draft_model\" (a smaller model of the same tokenizer)")
    unknown = [k for k in spec if k not in SPECULATIVE_KEYS[method]]
    if unknown:
        raise UserError(f"--speculative-config: '{unknown[0]}' is not taken by method {method!r} (its keys are "
                        f"{', '.join(SPECULATIVE_KEYS[method])})")
    if method == "draft_model":
        k = spec.get("num_speculative_tokens")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise UserError(f"--speculative-config: 'num_speculative_tokens' must be a positive integer, got {k!r}")
        if not isinstance(spec.get("model"), str) or not spec["model"]:
            raise UserError(f"--speculative-config: 'model' must be the draft's weights (a path, as --weights "
                            f"takes), got {spec.get('model')!r}")
        out = {"draft": spec["model"], "num_draft_tokens": k}
    else:
        out = ngram_config(spec)
    if max_batch == 1:
        raise UserError("--speculative-config speculates in the batching engine: it needs --max-batch above 1")
    return out


def ngram_config(spec) -> dict:
    """speculative_config's "ngram" method's keys checked: -> the Engine's keywords."""
    for key in ("num_speculative_tokens", "prompt_lookup_max"):
        value = spec.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"--speculative-config: '{key}' must be a positive integer, got {value!r}")
    low = spec.get("prompt_lookup_min", 1)
    if type(low) is not int or low != 1:  # (JSON's true and 1.0 equal 1 in Python: not the integer 1)
        raise UserError(f"--speculative-config: 'prompt_lookup_min' {spec['prompt_lookup_min']!r} is not taken: the "
                        "lookup tries every n-gram length from prompt_lookup_max down to 1 (give 1 or leave it out)")
    return {"prompt_lookup": spec["prompt_lookup_max"], "num_draft_tokens": spec["num_speculative_tokens"]}


def page_args(args) -> dict:
    """Engine's kv_pages, page_size, prefix_caching and max_prefill_tokens keywords from --kv-cache-pages,
    --kv-page-size (the engine's default page size where none is given), --enable-prefix-caching and
    --max-prefill-tokens."""
    return {"kv_pages": args.kv_cache_pages, "prefix_caching": args.enable_prefix_caching,
            "max_prefill_tokens": args.max_prefill_tokens,
            **({} if args.kv_page_size is None else {"page_size": args.kv_page_size})}


def add_engine_args(p, max_batch, max_batch_help: str):
    """--max-batch (default max_batch), --kv-cache-pages, --kv-page-size, --enable-prefix-caching and
    --max-prefill-tokens: the batching engine's (serve's, `generate --prompts`')."""
    p.add_argument("--max-batch", type=int, default=max_batch, help=max_batch_help)
    p.add_argument("--kv-cache-pages", type=int, default=None, metavar="N",
                   help="a paged KV cache of N pages shared by the batch's rows (vLLM's PagedAttention): a request "
                        "takes its prompt's pages, waiting while too few are free, and more as its rows grow; when "
                        "none is free the latest admitted request is preempted and recomputed later; serve and "
                        "run-batch refuse a pool that cannot hold one row of the served context (default: none, "
                        "each of --max-batch rows holds the whole context)")
    p.add_argument("--kv-page-size", type=int, default=None, metavar="P",
                   help="positions a page of --kv-cache-pages (default 16, vLLM's)")
    p.add_argument("--enable-prefix-caching", action="store_true",
                   help="vLLM's automatic prefix caching (with --kv-cache-pages): a prompt's full pages that an "
                        "earlier request prefilled (the same tokens from the start: a system prompt, a conversation "
                        "so far) are shared, not prefilled again; cached pages no request holds are reclaimed "
                        "least recently used first")
    p.add_argument("--max-prefill-tokens", type=int, default=None, metavar="N",
                   help="chunked prefill (vLLM's): a step prefills at most N prompt tokens in all, a long prompt "
                        "over several steps while the running requests keep decoding, so it does not stall their "
                        "next token for its whole prefill (default: every admitted prompt whole in one step)")


def add_lora_args(p):
    """--enable-lora, --lora-modules, --max-lora-rank, --max-loras (vLLM's multi-LoRA): serve's and
    `generate --prompts`' (lora_modules checks them, load_adapters loads them)."""
    p.add_argument("--enable-lora", action="store_true",
                   help="serve LoRA adapters beside the model (vLLM's; with --lora-modules, or for serve with "
                        "$VLLM_ALLOW_RUNTIME_LORA_UPDATING=true, alone too: adapters loaded and unloaded while serving "
                        "through POST /v1/load_lora_adapter and /v1/unload_lora_adapter)")
    p.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                   help="the adapters (vLLM's multi-LoRA): each NAME=PATH (or vLLM's JSON '{\"name\": ..., \"path\": "
                        "...}'), PATH a peft LoRA adapter folder (GPT-2, Llama family) or a LoRA checkpoint of ours "
                        "(sft --lora-rank); a request (serve) or --prompts record whose \"model\" is NAME runs its "
                        "adapter, unmerged beside the shared base weights, in the same batches as the others (default: "
                        "none)")
    p.add_argument("--max-lora-rank", type=int, default=None, metavar="R",
                   help="the largest adapter rank served (vLLM's; default 16): every adapter is padded to the "
                        "largest one loaded")
    p.add_argument("--max-loras", type=int, default=None, metavar="N",
                   help="the most adapters the running requests use at once (vLLM's); a request of another waits, "
                        "the base's requests behind it going first (default: all of --lora-modules: they all stay on "
                        "the device)")


def make_engine(args, model, device, dtype, tok=None):
    """serve's Engine (started), or None: --max-batch 1, or a model the engine refuses (said, then served one
    request at a time)."""
    from tritongpt.train.common import autocast
    from tritongpt.train.engine import Engine, check_engine

    if args.max_batch == 1:
        return None
    try:
        check_engine(model)
    except UserError as e:
        unused = "" if args.kv_cache_pages is None else \
            f"; --kv-cache-pages {args.kv_cache_pages} is not used (the engine's paged cache)"
        unused += "; --enable-prefix-caching is not used (the engine's)" if args.enable_prefix_caching else ""
        unused += f"; --max-prefill-tokens {args.max_prefill_tokens} is not used (the engine's)" \
            if args.max_prefill_tokens is not None else ""
        if args.speculative_config is not None:
            raise UserError(f"{e}: --speculative-config needs the batching engine") from None
        note(f"{e}: serving one request at a time{unused}")
        return None
    spec = speculative_config(args.speculative_config, args.max_batch)
    if "draft" in spec:  # (its path loaded as --weights is, refused by name where its vocabulary is not the model's)
        from tritongpt.commands import load_draft
        spec["draft"] = load_draft(args, model, tok, device, spec["draft"], "--speculative-config's model")
    engine = Engine(model, args.max_batch, args.kv_cache_dtype, lambda: autocast(device, dtype),
                    cuda_graph=args.cuda_graphs, **page_args(args), max_loras=args.max_loras, **spec,
                    max_len=max_model_len(args, model, engine_pool(args)))
    check_pool(engine)
    return engine.start()


def engine_pool(args):
    """The engine's paged cache as (pages, positions a page) from --kv-cache-pages and --kv-page-size (the engine's
    default page size where none is given), or None: no paged cache."""
    from tritongpt.train.engine import PAGE_SIZE

    if args.kv_cache_pages is None:
        return None
    return args.kv_cache_pages, page_args(args).get("page_size", PAGE_SIZE)


def check_pool(engine):
    """A paged cache too small for one row of the served context (the engine's max_len: --max-model-len, else the
    model's) refused at startup, as vLLM refuses one that cannot serve a request of max_model_len: a chat (or
    Responses) request that omits max_tokens runs to the context's end, so such a server would start and then refuse
    ordinary requests (check_room's 400). Counted by the engine (context_pages). vLLM's message offers a smaller
    max_model_len too: so does this one."""
    need = engine.context_pages()  # (0 without a paged cache)
    if engine.paged and need > engine.cache.num_pages:
        pages, size = engine.cache.num_pages, engine.cache.page_size
        most = pages * size + 1  # (the last token drawn is never fed back: pages_for(1, most - 1) is every page)
        context = f"the model's context length ({engine.max_len})" if engine.max_len == \
            engine.model.config.context_length else f"the served context length ({engine.max_len}, --max-model-len)"
        raise UserError(f"--kv-cache-pages {pages} of {size} positions (--kv-page-size) cannot hold one request of "
                        f"{context}: that needs {need} pages, "
                        f"and every chat request that omits max_tokens (the rest of the context its budget) would be "
                        f"refused. Pass --kv-cache-pages {need} or more, a larger --kv-page-size, or --max-model-len "
                        f"{most} or less")


MAX_MODEL_LEN_SUFFIXES = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
                          "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}  # (vLLM's human_readable_int)


def parse_max_model_len(text) -> int | str | None:
    """--max-model-len's value -> tokens, "auto", or None (not given): an integer as int() reads it (1_000 and +64
    too, as vLLM's), vLLM's human-readable form (1k = 1000, 25.6k = 25600 with a decimal suffix; 1K = 1024 with a
    binary one, whole numbers only), or vLLM's -1 / auto (any case): the longest context that fits (max_model_len
    resolves it); refused by name unless one of those."""
    if text is None:
        return None
    value = str(text).strip()
    if value.lower() == "auto":  # (vLLM's human_readable_int_or_auto)
        return "auto"
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgtKMGT])", value)
    tokens = None
    if match:
        number, suffix = match.groups()
        if suffix.islower():
            tokens = int(float(number) * MAX_MODEL_LEN_SUFFIXES[suffix])
        elif "." not in number:  # (vLLM's: a binary multiple of a fraction is refused)
            tokens = int(number) * MAX_MODEL_LEN_SUFFIXES[suffix]
    else:  # (vLLM's plain int(): 1_000 and +64 too, and -01 is its -1)
        try:
            tokens = int(value)
        except ValueError:
            pass
    if tokens == -1:  # (vLLM's only negative: auto)
        return "auto"
    if tokens is None or tokens < 1:
        raise UserError(f"--max-model-len must be a positive integer of tokens (or vLLM's 1k = 1000, 1K = 1024; "
                        f"decimals with k, m, g, t only; -1 or auto: the longest that fits), got {text!r}")
    return tokens


def max_model_len(args, model, pool=None) -> int:
    """The served context: --max-model-len (parsed), refused above the model's context_length (vLLM's rule without
    its VLLM_ALLOW_LONG_MAX_MODEL_LEN: positions the model never learned, or that its position table lacks), else
    the model's. -1 / auto (vLLM's): the model's where one row of it fits the engine's paged cache, pool (its pages,
    their size; None: no paged cache, every row the whole context), else the longest that does (check_pool's
    pages x size + 1: the last token drawn takes no page), as vLLM shortens it to fit the memory it has."""
    context = model.config.context_length
    tokens = parse_max_model_len(getattr(args, "max_model_len", None))
    if tokens is None:
        return context
    if tokens == "auto":
        if pool is None or pool[0] * pool[1] + 1 >= context:
            return context
        most = pool[0] * pool[1] + 1
        note(f"--max-model-len {args.max_model_len}: the served context is {most} tokens, the most one row of "
             f"--kv-cache-pages {pool[0]} of {pool[1]} positions holds (the model's is {context})")
        return most
    if tokens > context:
        raise UserError(f"--max-model-len {tokens} is more than the model's context length ({context}, its "
                        f"max_position_embeddings): pass --max-model-len {context} or less, or leave it out")
    return tokens


def tool_parser(args):
    """The parser "auto" tool choice finds calls with (train/tool_calls.py PARSERS), or None: vLLM's
    --enable-auto-tool-choice with --tool-call-parser, each refused without the other."""
    from tritongpt.train.tool_calls import PARSERS

    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise UserError(f"--enable-auto-tool-choice needs --tool-call-parser (one of {', '.join(PARSERS)}): the "
                        "syntax the model writes its tool calls in")
    if args.tool_call_parser is not None and not args.enable_auto_tool_choice:
        raise UserError("--tool-call-parser is used only with --enable-auto-tool-choice (\"auto\" tool choice): "
                        "pass both, or neither")
    return PARSERS[args.tool_call_parser]() if args.tool_call_parser else None


def chat_template_arg(value: str | None, tok=None) -> str | None:
    """serve --chat-template (vLLM's): a Jinja chat template's file, or the template itself (text with "{{" or
    "{%"), checked by compiling it; None: the tokenizer's own. Or the name of one of the tokenizer's named templates
    ("tool_use", "default"), as transformers' apply_chat_template(chat_template=NAME) takes one where the tokenizer
    has templates so named (vLLM's flag takes no name: it reads the value as a file): looked up in `tok`, the
    served tokenizer; before it is loaded (tok None), a name is let through (None), to be looked up then. A value
    with a "/" or ending .jinja is a file's name, never a template's: refused at once."""
    from pathlib import Path

    from tritongpt.errors import read_text_file
    from tritongpt.train.chat_template import _called, _compiled, from_file

    if value is None:
        return None
    path = Path(value)
    try:
        is_file = path.is_file()
    except OSError:  # (a template's own text, longer than a file name may be: ENAMETOOLONG, no file)
        is_file = False
    if is_file:
        text = from_file(read_text_file(path), path)  # (its errors, here and at a request, name the file)
    elif "{{" in value or "{%" in value:
        text = from_file(value, "--chat-template")
    elif "/" in value or os.sep in value or value.endswith(".jinja"):
        raise UserError(f"--chat-template {value!r}: no such file, and not a template (a Jinja template has "
                        "{{ ... }} or {% ... %})")
    elif tok is None:
        return None  # (perhaps a template's name: the tokenizer, once loaded, tells)
    else:
        # (transformers takes a name only where the tokenizer holds its templates by name: a dict)
        named = getattr(tok, "chat_templates", None) or {}
        templates = {"default": tok.chat_template, **named} if named else {}
        if value in templates:
            return templates[value]  # (compiled as it was read: templates_from_config)
        names = f"it has {', '.join(map(repr, templates))}" if templates else "it names none"
        raise UserError(f"--chat-template {value!r}: no such file, not a template (a Jinja template has "
                        f"{{{{ ... }}}} or {{% ... %}}), and not the name of one of the tokenizer's templates ({names})")
    try:
        _compiled(text, _called("default", text))
    except Exception as e:  # (jinja2's TemplateSyntaxError: the line it stops at)
        raise UserError(f"--chat-template: the template does not compile: {e}") from None
    return text


def check_server_args(args):
    """The model source and the engine's, runner's and requests' flags, checked before anything is read (run-batch's
    input too: it calls this first) or loaded; make_server reads the values again where it uses them."""
    from tritongpt.commands import check_model_source

    check_model_source(args)
    if not args.weights and not args.pretrained:
        raise UserError(f"{getattr(args, 'command', None) or 'serve'} needs a model: pass --weights, or --pretrained "
                        "(gpt2-small; --model NAME for another GPT-2)")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise UserError("--served-model-name is empty")
    check_pooling_args(args)  # (first: an engine flag that pooling ignores is named as that)
    check_engine_args(args)
    parse_max_model_len(args.max_model_len)  # (the model's context checks it again once loaded: max_model_len)
    chat_template_arg(args.chat_template)
    if args.runner == "generate":
        tool_parser(args)
        speculative_config(args.speculative_config, args.max_batch)
        override_generation_config(args.override_generation_config)


def make_server(args) -> ThreadingHTTPServer:
    """The model loaded (--weights or --pretrained) and a server bound to --host and --port (0: a free one)."""
    from tritongpt.commands import check_cuda_graphs, load_generation_model
    from tritongpt.train.chat import run_template

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in [0, 65535], got {args.port}")
    check_server_args(args)
    if args.runner == "pooling":
        return pooling_server(args)
    parser = tool_parser(args)
    chat_template_arg(args.chat_template)  # (a file or a template checked before the model loads; a name after)
    speculative_config(args.speculative_config, args.max_batch)
    runtime = runtime_lora_updating() and args.enable_lora
    modules = lora_modules(args, runtime)
    key = api_key(args)
    override = override_generation_config(args.override_generation_config)
    model, tok, device, dtype, limit = load_generation_model(args)
    chat_template = chat_template_arg(args.chat_template, tok)
    gen = generation_config(args, tok, model.config.vocab_size, override, limit)
    if chat_template is not None:  # (the served tokenizer's own, for chats: vLLM's override, with tools too)
        tok.chat_template, tok.chat_templates = chat_template, None
    thinking = None
    if args.reasoning_parser is not None:  # (its think tokens looked up in the tokenizer: vLLM's)
        from tritongpt.train.reasoning import PARSERS as THINKING

        thinking = THINKING[args.reasoning_parser](tok, args.reasoning_parser)
    name = model_name(args)
    if args.enable_lora:  # (none yet with runtime loading: the engine then has its adapter rows from the start)
        load_adapters(model, modules, args.max_lora_rank, name)
    check_cuda_graphs(args, device, model)
    context = max_model_len(args, model)  # (refused before the engine is built: its caches are that long)
    engine = make_engine(args, model, device, dtype, tok)
    if engine is not None:  # (-1 / auto: the engine's, as its paged cache holds it)
        context = engine.max_len
    # the chat format as `chat --template auto` picks it, except that a model with none is refused, not guessed;
    # --chat-template's is the chat's
    template, why = "chat" if chat_template is not None else run_template(args.weights), ""
    if template is None and getattr(tok, "chat_template", None) is not None:
        template = "chat"
    elif template is None:
        why = "it records no fine-tuning prompt format and its tokenizer has no chat template"
        note(f"{args.weights or args.model}: {why}: /v1/chat/completions is refused, /v1/completions served")
    try:
        server = listen(args)
    except BaseException:
        if engine is not None:
            engine.close()
        raise
    server.app = Model(model, tok, device, dtype, limit, name, template, why, args.cuda_graphs, args.kv_cache_dtype,
                       engine, modules, max_model_len=context)
    server.app.runtime_lora, server.app.max_lora_rank = runtime, args.max_lora_rank or 16
    server.app.defaults, server.app.ends_too = gen
    server.app.prompt_tokens_details = args.enable_prompt_tokens_details
    server.app.tool_parser, server.app.reasoning_parser = parser, thinking
    server.api_key = key
    return server


def listen(args) -> ThreadingHTTPServer:
    """The server bound to --host and --port: a port taken (or a host not this machine's) is one line naming them,
    not the system's bare '[Errno 98] Address already in use'."""
    import errno

    try:
        return (Server6 if ":" in args.host else Server)((args.host, args.port), Handler)
    except OSError as e:
        hint = {errno.EADDRINUSE: "another --port, or stop what listens there",
                errno.EACCES: "a port below 1024 needs root: another --port" if args.port < 1024 else None}
        hint = hint.get(e.errno) or "--host, --port"
        raise UserError(f"cannot listen at {host_port(args.host, args.port)}: {e.strerror or e} ({hint})") from None


def model_name(args) -> str:
    return args.served_model_name or (served_name(args.weights) if args.weights else args.model)


def pooling_server(args) -> ThreadingHTTPServer:
    """--runner pooling's server (train/pooling.py): the model's embeddings or reward scores, no engine, no chat."""
    from tritongpt.train.pooling import load_pooler, pooler_kind, served_path

    key = api_key(args)
    chat_template = chat_template_arg(args.chat_template)  # (a reward model's chats: its prompt's template)
    # (an embedder encodes texts: the template would be ignored; the kind read before the model loads)
    if args.chat_template is not None and pooler_kind(args)[0] != "reward":  # (a template's name too)
        raise UserError("--chat-template lays out a reward model's chats (/pooling's messages, /score's and "
                        "/rerank's pairs); an embedder reads texts alone")
    model, tok, device, dtype, limit, pooler = load_pooler(args)
    context = max_model_len(args, model)  # (the inputs' limit: pooling.fit)
    chat_template = chat_template_arg(args.chat_template, tok)  # (a template's name looked up: the tokenizer's)
    if chat_template is not None:
        tok.chat_template, tok.chat_templates = chat_template, None
    server = listen(args)
    server.app = Model(model, tok, device, dtype, limit, model_name(args), None,
                       f"--runner pooling serves {served_path(pooler)}, no text", max_model_len=context)
    server.app.pooler, server.api_key = pooler, key
    return server


def cmd_serve(args):
    server = make_server(args)
    host, port = server.server_address[:2]
    guarded = f"; an API key is needed on every path but {', '.join(PUBLIC_PATHS)}" if server.api_key else ""
    note(f"serving {server.app.name} at http://{host_port(host, port)}/v1{guarded} (Ctrl-C stops)")
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def add_cli(sub):
    p = sub.add_parser("serve", help=command_help("serve"))
    add_server_args(p, listen=True)
    # load_generation_model seeds the weights of a random model with it; requests take their own seed
    p.set_defaults(func=cmd_serve, seed=1337)


def add_server_args(p, listen: bool = False):
    """The model, engine and request-default flags of serve: run-batch's too, whose in-process server make_server
    builds from them; listen (serve's): --host, --port and --api-key as well, where serve's help has always listed
    them."""
    from tritongpt.commands import add_cuda_graphs_arg, add_dtype_arg, add_generation_model_args, add_kv_cache_dtype_arg
    from tritongpt.train.reasoning import PARSERS as THINKING
    from tritongpt.train.tool_calls import PARSERS

    # no tiny: check_server_args refuses a run without --weights or --pretrained
    add_generation_model_args(p, default_text="gpt2-small with --pretrained, or what --weights holds")
    add_cuda_graphs_arg(p)
    add_kv_cache_dtype_arg(p)
    if listen:
        p.add_argument("--host", default="127.0.0.1", type=unbracketed,
                       help="address to listen on (default %(default)s; 0.0.0.0: every interface, with no "
                            "authentication unless --api-key; an IPv6 one too: ::1, ::, or as a URL writes it, [::1])")
        p.add_argument("--port", type=int, default=8000, help="port to listen on (default %(default)s; 0: a free one)")
    add_engine_args(p, MAX_BATCH, "rows decoded together (default %(default)s): requests are batched as they arrive, a "
                          "request of n choices taking n rows; 1: one request at a time")
    p.add_argument("--max-model-len", default=None, metavar="N",
                   help="the served context (vLLM's): a request's prompt and answer together at most N tokens (a "
                        "chat without max_tokens answers to it), the engine's cache rows that long (a long-context "
                        "model in less memory; --kv-cache-pages must hold one row of it); also 1k (1000), 32K "
                        "(32768); at most the model's context length; -1 or auto (vLLM's): the model's, or the longest one row of "
                        "--kv-cache-pages holds (default: the model's)")
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help="vLLM's speculative decoding in the batching engine: "
                        "'{\"method\": \"ngram\", \"num_speculative_tokens\": K, \"prompt_lookup_max\": N}': each "
                        "decode step a request proposes up to K tokens that followed its text's last n-gram (n from "
                        "N down to 1) and one forward checks them all; '{\"method\": \"draft_model\", \"model\": "
                        "PATH, \"num_speculative_tokens\": K}': a smaller model of the same tokenizer (loaded as "
                        "--weights is) proposes them; greedy text unchanged, samples the same distribution (default: "
                        "none)")
    add_lora_args(p)
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='tool_choice "auto" (the default once a request has tools): the model answers or calls a '
                        "tool in its own syntax, read by --tool-call-parser (vLLM's; without it \"auto\" is refused, "
                        'named and "required" tool choices work)')
    p.add_argument("--tool-call-parser", default=None, choices=sorted(PARSERS),
                   help="the syntax the model writes tool calls in, with --enable-auto-tool-choice: hermes "
                        "(<tool_call> blocks: Qwen2.5, Qwen3, Hermes), llama3_json (JSON objects: Llama 3.1+), "
                        "mistral ([TOOL_CALLS] and an array, or name[ARGS]{...} per call; 9-character call ids), "
                        "openai (gpt-oss's harmony: to=functions.NAME messages), "
                        "pythonic ([f(a=1), g(b=\"x\")]: Llama 3.2, Llama 4), qwen3_coder (<function=f> and "
                        "<parameter=a> XML, typed by the tools' schemas: Qwen3-Coder, Qwen3.5) (default: none)")
    p.add_argument("--chat-template", default=None, metavar="FILE_OR_TEMPLATE",
                   help="the Jinja chat template chats are rendered with (vLLM's): a file, the template's text, or "
                        "the name of one of the tokenizer's named templates (tool_use: transformers'); "
                        "instead of the tokenizer's own, or for a model that has none (its end of turn must be a "
                        "special token of the tokenizer) (default: the tokenizer's, else the run's own format)")
    p.add_argument("--reasoning-parser", default=None, choices=sorted(THINKING),
                   help="a reasoning model's chat answers split into message.reasoning (the text between <think> "
                        "and </think>) and content, streamed as delta.reasoning and delta.content (vLLM's): "
                        "deepseek_r1 (DeepSeek-R1, QwQ) or qwen3 (chat_template_kwargs enable_thinking false: all "
                        "content); structured outputs and tool calls hold the answer after </think>. The tokenizer "
                        "must have <think> and </think> tokens; or openai_gptoss (gpt-oss's harmony: the analysis "
                        "channel the reasoning, the final channel the content; its marker tokens the tokenizer's; no "
                        "structured outputs) (default: none)")
    if listen:
        p.add_argument("--api-key", default=None, metavar="KEY",
                       help="every path but /health, /version and /metrics needs the header 'Authorization: Bearer "
                            f"KEY' (vLLM's --api-key; else a 401) (default: ${API_KEY_ENV}, which keeps the key out "
                            "of the process list, else none)")
    p.add_argument("--runner", default="generate", choices=RUNNERS,
                   help="generate: text (completions, chat, responses); pooling: POST /v1/embeddings (OpenAI's: the "
                        "final-norm hidden state pooled, L2-normalized) or, for a reward model, POST /pooling (its "
                        "score per input or chat), and vLLM's POST /score and /rerank (cosine of the embeddings, or "
                        "the reward of the user-assistant chat); the other runner's routes are 404s (vLLM's) "
                        "(default %(default)s)")
    p.add_argument("--convert", default=None, choices=CONVERTS,
                   help="with --runner pooling: embed (a language model's default) or reward (a `tritongpt reward` "
                        "checkpoint's default, read at its last token) (default: auto, by the checkpoint)")
    p.add_argument("--pooler-config", default=None, metavar="JSON",
                   help="with --runner pooling, vLLM's PoolerConfig: '{\"pooling_type\": \"LAST\"|\"MEAN\", "
                        "\"normalize\": true|false}' (default LAST, normalized; a reward model LAST, raw)")
    p.add_argument("--generation-config", default="auto", metavar="auto|vllm|FOLDER",
                   help="the requests' default sampling settings (vLLM's): auto, the model folder's "
                        "generation_config.json (its temperature, top_p, top_k, min_p, repetition_penalty; its "
                        "max_new_tokens caps every answer); vllm, none (OpenAI's defaults); or FOLDER's "
                        "generation_config.json. The file's eos_token_id list ends answers too (vllm: the model's; "
                        "without the file, config.json's) "
                        "(default %(default)s)")
    p.add_argument("--override-generation-config", default=None, metavar="JSON",
                   help="those defaults overridden, e.g. '{\"temperature\": 0.5}' (vLLM's) (default: none)")
    p.add_argument("--enable-prompt-tokens-details", action="store_true",
                   help="usage.prompt_tokens_details.cached_tokens (vLLM's flag): the prompt tokens read from the "
                        "prefix cache (--enable-prefix-caching; else 0)")
    p.add_argument("--served-model-name", default=None,
                   help="the model's id in the API (default: --weights as given, a Hub repo's id)")
    add_dtype_arg(p)
