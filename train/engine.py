"""Continuous batching (Orca, Yu et al. 2022; vLLM's scheduler): one Engine owns the model and a KV cache of
max_batch rows ("slots"); requests wait in a FIFO, are admitted while enough slots are free, and all running
requests decode together, ONE batched forward a step, every row at its own position (the cache's per-row fill); the
prompts admitted prefill together too, right-padded in a forward a group.
A request that finishes frees its slots for the next one at once, not when the whole batch ends. With a paged cache
a request's rows take pages as they grow, and a pool run short preempts the latest admitted request (recomputed
later, its tokens unchanged).

A request is one generate() call: its n rows draw together with its own settings, generator, stop rule and EOS
(generate.decode_step, the step _generate runs), so its tokens are generate()'s for it whatever else is in the
batch (a batched forward's logits differ from a one-row forward's only by float rounding). The step's plain
requests draw in one batched pass (Engine._draw_plain, generate.sample_rows: per-row settings, each seeded
request's uniforms from its own generator), the very tokens each would draw alone. Its rows keep their
slots until the whole request ends, finished rows padded with the EOS, as generate's are.

    engine = Engine(model, max_batch=8).start()
    handle = engine.submit(ids, 32, temperature=0.8, generator=g, eos_id=eot)  # from any thread
    ids_out = handle.wait(on_token=print)                                       # [n, T + new]
    engine.close()
"""
import contextlib
import queue
import threading
import time
from collections import deque

import torch

from tritongpt._types import is_int
from tritongpt.errors import EngineDown, UserError
from tritongpt.model.sampling import sampling_with_triton
from tritongpt.train.generate import (ROW_CUTS, DecodeGraph, Prediction, PromptLookup, _draw, append_taken,
                                     check_cache_dtype, check_draft, check_graphable, check_logprobs,
                                     check_masks_reach_end, check_sampling, decode_step, draft_width, end_rule,
                                     held_back, hidden_and_head, late_cut, last_logits, new_cache, sample_rows,
                                     sampling_logits, score_positions, take_rows, take_step, verify_step)

# Batched prefill (_groups): several requests' prompt chunks run in one forward, each right-padded to the longest.
# A group takes a chunk only while its padded tokens stay within PREFILL_GROUP_TOKENS (the forward's activations:
# a lone chunk may be longer, as it always could) and at most PREFILL_PAD[device type] times its real tokens.
# Padding is compute thrown away: on a GPU a forward of a few short rows costs its launches more than its FLOPs, so
# up to half again pays (not yet measured there); on a CPU the FLOPs are the cost (the mini preset's 16 prompts of
# 30 to 150 tokens prefilled slower at 1.5 than one forward each), so only near-equal lengths go together.
PREFILL_GROUP_TOKENS = 2048
PREFILL_PAD = {"cuda": 1.5, "cpu": 1.1}
PAGE_SIZE = 16  # a paged cache's positions a page where none is given (vLLM's block_size)
# Engine._draw_plain: the most logits a batched draw's pass takes on a CPU. Measured (one thread, 64 requests of
# mixed settings): at GPT-2's 50257 tokens one pass of all 64 rows drew ~1.4x slower than each request alone (its
# float64 sort and softmax tensors, tens of MB, out of the cache), passes of 8 to 16 rows about as fast; at 97 or
# 8192 tokens the whole batch in one pass was the fastest.
SAMPLE_PASS_CPU = 2**19


def rows_of(out, slots: list):
    """A request's rows of the decode's logits out [rows, V], at its slots (ascending: taken from the sorted free
    list): a view where they are consecutive, as a 1-row request's always are, else a gather. (A gather a request a
    step was an index op each, on a GPU a kernel launch each.)"""
    first = slots[0]
    if len(slots) == 1 or slots == list(range(first, first + len(slots))):
        return out[first:first + len(slots)]
    return out[slots]


def cut(logits, vocab_limit):
    """logits [n, V]'s first vocab_limit columns (None: all of them, logits itself: no view op a request a step)."""
    return logits if vocab_limit is None else logits[:, :vocab_limit]


class Cancelled(Exception):
    """Request.wait's exception once its `cancelled` callback says the caller has gone (a client that left)."""


class Request:
    """The handle submit returns: what the engine thread draws for the request arrives through `queue` as
    ("token", on_token's arguments: (nxt [n, 1],), with logprobs (nxt, step_logprobs)) each step (a speculative
    step's: ("step", [(nxt,), ...]), put_step), then ("end", ids [n, T + new]) or ("error", exception); with
    prompt_logprobs ("prompt", its rows) once, before any token.
    The engine never calls the caller's code but stop(): the consumer's thread (an HTTP handler) reads the queue, so
    a slow client never stalls the batch."""

    def __init__(self, engine, idx, max_new_tokens, warp, eos_id, generator, vocab_limit, stop, logprobs=None,
                 ends=None, hold=None, prompt_logprobs=None):
        self.engine, self.idx, self.budget, self.warp, self.logprobs = engine, idx, max_new_tokens, warp, logprobs
        # prompt_logprobs k: its prefill scores the prompt (Engine.submit); scoring: not yet done (a preemption
        # before its end drops the parts, `scores`, its recompute scores again; one after it scores nothing)
        self.prompt_logprobs, self.scoring, self.scores = prompt_logprobs, prompt_logprobs is not None, []
        # eos_id: the padding id (end_rule's pad), ends and hold: end_rule's
        self.eos_id, self.generator, self.vocab_limit, self.stop = eos_id, generator, vocab_limit, stop
        self.ends, self.hold = ends, hold
        self.start = idx.size(1)  # where the generated ids begin (the frequency/presence penalties count from it)
        self.done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        self.ended = [False] * idx.size(0)  # done's host copy (decode_step's): its EOS-padded rows (_grow)
        self.slots = None  # the cache rows it holds while running
        self.same, self.hits = False, []  # prefix caching's (Engine._plan): whether its rows are equal, their hits
        self.copies = 1  # the choices its rows stand for (submit's copies: a prefill-only request's, /metrics')
        self.cached = 0  # the prompt tokens its first prefill read from the prefix cache (vLLM's num_cached_tokens)
        self.prefilled = False
        self.todo, self.rows = None, []  # its prefill's rows still to run ([row, slot, fill]) and the logits done
        self.queue = queue.Queue()
        self.cancelled = False
        self.same_step = False  # (wait()'s last token: a speculative step's after its first, put_step)
        # prompt lookup (Engine's): whether it speculates (submit), and each row's positions whose keys are its ids'
        # (None: all; a row padded with the EOS after its end holds its proposals' keys: _accept)
        self.lookup, self.cut = False, [None] * idx.size(0)
        self.draft = None  # what it speculates with: the engine's PromptLookup or draft model, or its Prediction
        self.draft_fill = 0  # a draft model's: the positions its rows hold in the engine's draft cache (_draft_tokens)
        # a served LoRA adapter (model/lora.py serve_adapters): its slot, -1 the base; salt: its prefix-cache keys'
        self.adapter, self.salt = -1, b""
        self.guide = None  # structured outputs' (train/structured.py Guide): decode_step masks its draws
        # host clocks (time.monotonic, no GPU sync) where its phases change, for /metrics (train/metrics.py): queued
        # at submit, scheduled at its first admission (vLLM's: a preempted request's re-queue and recompute count in
        # its prefill or decode time, not its queue time), its first and its latest step's tokens
        self.queued, self.scheduled, self.first_token, self.last_token = time.monotonic(), None, None, None

    def put_token(self, *item):
        """decode_step's on_token: the step's tokens (with logprobs, and their logprobs) to the queue, for wait()."""
        self.queue.put(("token", item))

    def put_step(self, items: list):
        """put_token for a speculative step's tokens, all at once (wait() hands on each, same_step True after the
        first, then says the step ended: serve sends a step's text as one chunk, and counts a gap between steps as
        an inter-token latency, as vLLM's)."""
        self.queue.put(("step", items))

    @property
    def n(self) -> int:
        return self.idx.size(0)

    def cancel(self):
        """Ends the request at the engine's next step (its slots freed, nothing more drawn): wait() raises
        Cancelled."""
        self.cancelled = True
        with self.engine.cond:
            self.engine.cond.notify_all()

    def wait(self, on_token=None, cancelled=None, poll: float = 0.05, on_prompt=None, on_step_end=None):
        """In the caller's thread: with prompt_logprobs on_prompt(rows) first (Engine.submit's), on_token(nxt [n, 1])
        for each step's tokens as they arrive (with logprobs, on_token(nxt, step_logprobs(...)) as generate's; while
        it hands on a speculative step's tokens after its first, self.same_step is True), on_step_end() after each
        step's tokens, then the request's ids [n, T + new] (generate's return). cancelled(): asked every `poll`
        seconds while nothing arrives; True cancels the request and raises Cancelled. An exception raised by on_token (or on_prompt)
        cancels it too. A started engine whose thread died raises EngineDown (a UserError; serve's 500) rather than
        wait for ever."""
        asked = time.monotonic()
        try:
            while True:
                try:
                    kind, item = self.queue.get(timeout=poll)
                except queue.Empty:
                    kind = None
                    # (a thread killed by a BaseException ends nothing: wait no longer for it; a closing engine
                    # ends its requests itself, and one stepped by hand has no thread)
                    thread = self.engine.thread
                    if thread is not None and not thread.is_alive() and not self.engine.closed and self.queue.empty():
                        raise EngineDown("the engine's thread is not running any more: the request will never end")
                # asked every poll seconds whether tokens arrive or not (they may come faster than that)
                if cancelled is not None and time.monotonic() - asked >= poll:
                    asked = time.monotonic()
                    if cancelled():
                        raise Cancelled("the request was cancelled")
                if kind in ("token", "step"):
                    for j, one in enumerate(item if kind == "step" else [item]):
                        self.same_step = j > 0
                        if on_token is not None:
                            on_token(*one)
                    if on_step_end is not None:
                        on_step_end()
                elif kind == "prompt":
                    if on_prompt is not None:
                        on_prompt(item)
                elif kind == "end":
                    return item
                elif kind == "error":
                    raise item
        except BaseException:
            self.cancel()
            raise


class Chunk:
    """A prefill chunk: request r's row i (its prompt's, or after a preemption its ids') positions [start, end),
    written into slot `slot`; after its forward, `part` (a scoring request's rows of it) and `logits` (its row's
    last chunk's last position's)."""

    def __init__(self, r, i: int, slot: int, start: int, end: int):
        self.r, self.i, self.slot, self.start, self.end = r, i, slot, start, end
        self.part = self.logits = None

    @property
    def ids(self):
        return self.r.idx[self.i, self.start:self.end]


def prefix_caching_said(stats) -> str | None:
    """Engine.stats as serve and `generate --prompts` say them at the end: the prompt tokens read from the cache (None
    when no prompt was prefilled with prefix caching on)."""
    if not stats["prompt_tokens"]:
        return None
    return (f"prefix caching: {stats['cached_prompt_tokens']} of {stats['prompt_tokens']} prompt tokens read from the "
            f"cache ({stats['cached_prompt_tokens'] / stats['prompt_tokens']:.0%})")


def speculation_said(stats, what: str = "prompt lookup") -> str | None:
    """Engine.stats' speculation counts as serve and `generate --prompts` say them at the end (None without it);
    what: its method ("draft model" for a draft's)."""
    if "spec_decode_num_drafts" not in stats:
        return None
    drafted, accepted = stats["spec_decode_num_draft_tokens"], stats["spec_decode_num_accepted_tokens"]
    return (f"{what}: {stats['spec_decode_num_drafts']} drafts of {drafted} tokens, {accepted} accepted"
            + (f" ({accepted / drafted:.0%})" if drafted else ""))


def check_engine(model) -> None:
    """Refuses by name a model the engine cannot batch (serve then serves it one request at a time)."""
    scaling = model.config.rope_scaling
    if scaling and scaling.get("rope_type") == "longrope":
        raise UserError("the batching engine does not take LongRoPE models (their RoPE factors follow one length "
                        "for the whole forward; the engine's rows are each at their own)")


class Engine:
    """Continuous batching over one model (the module docstring). step() is one scheduling step; start() runs it
    on a background thread while there is work (sleeping on a condition variable otherwise), close() stops it.
    submit() and Request.cancel() may be called from any thread. autocast: a callable giving the context each
    step's forwards run in (serve's mixed precision).

    cuda_graph: each decode step a replay of a CUDA graph (generate.py's DecodeGraph, row_fill) captured for the
    smallest bucket of rows >= the rows the step runs (buckets: the powers of two below max_batch, and max_batch;
    vLLM's padding of the batch to a captured size): 1, 2, 4, 6 for 6. Each is captured at
    the first step that needs it, not at start: a bucket the load never reaches costs no capture and no graph
    memory, and the capture's warm-up runs are that very step (each row's keys written at its fill, as the replay
    writes them again). The rows past the running ones are free rows, as in an eager step: a slot cache's write at
    their stale fill, which nothing reads, a paged cache's to its scratch page. capture(fn, device) -> replay():
    DecodeGraph's (capture_cuda_graph by default; tests pass one that records fn on the CPU).

    prefix_caching (vLLM's automatic prefix caching; a paged cache only): a request's prompt takes the cached pages
    of its longest run of full blocks already prefilled (PagedKVCache.lookup: by a hash chain of their token ids),
    shared and read-only, and prefills only the rest, from their end, attending over them. The hits stop before
    the prompt's last token (vLLM's rule): its logits are always computed, so a prompt all cached still prefills
    its last block. After its prefill a request's full prompt blocks enter the index, for the requests after it
    (not those admitted in the same step), and when it ends, is cancelled or preempted, its rows' full blocks of
    the ids they fed, drawn ones too (_cache_fed; vLLM caches a finished sequence's output blocks): a chat's next
    turn reads the last answer's pages back. A request's n rows of one prompt share its full blocks' pages (the
    partial last one copied). stats: "prompt_tokens" (a prefilled row's prompt, a request of n equal rows once)
    and "cached_prompt_tokens", the ones of them read from the cache (a preempted request's recompute counts again,
    its drawn tokens with its prompt; a request scoring its prompt, which looks nothing up, is not counted).

    Batched prefill (_groups): the chunks a step prefills, several requests' at once, run a group a forward, each
    right-padded to its group's longest (KVCache.rows); a lone chunk runs in its row's own view.

    max_prefill_tokens (vLLM's chunked prefill, Sarathi-Serve): a step prefills at most that many prompt tokens in
    all, so a long prompt no longer stalls the running requests' next token for its whole prefill: the admitted
    requests' prompts are prefilled in FIFO order in chunks of what is left of the step's budget, each chunk from
    where the last one ended (row(i, start)), the rest in the next steps, the running requests decoding in each. A
    request whose prefill is unfinished holds its slots and pages but stays out of the decode until its last chunk,
    whose logits draw its first token. None: every admitted prompt whole in its admission step.

    preemption (vLLM's scheduler; a paged cache only): a request is admitted with the pages of its prompt and its
    first decode position, and each decode step first gives every running row whose next write crosses into a new
    page that page (_grow), so the pool holds the requests that end early (EOS, a stop string) at what they used,
    not their whole max_new_tokens, and a request's rows that drew their EOS at theirs. When none is free the
    latest admitted request is preempted by recompute (_preempt; stats "preemptions"): it waits again in front and,
    readmitted, prefills its prompt and the tokens it drew, then draws on exactly as it would have. submit refuses
    a request whose rows could not hold their whole budget in the pool unshared, so a request alone always fits.
    False: the old rule, every position a request's budget can fill reserved at admission: fewer requests at once,
    but none ever preempted (no recompute).

    prompt_lookup N (vLLM's n-gram speculation, speculative_config {"method": "ngram", "prompt_lookup_max": N,
    "num_speculative_tokens": num_draft_tokens}): each request's tokens are generate(prompt_lookup=N,
    num_draft_tokens=...)'s for it, drawn as its _speculative draws them (_propose, _verify, _accept). Such a
    request prefills its prompt but its last token (its cache holds the text but its last token, as _speculative's)
    and draws from its first decode step on. Each decode step every speculating request proposes per row
    (lookup_proposals, k as _speculative's for it: its budget left, the context), and all decoding rows run in one
    forward (KVCache.rows), right-padded to 1 + the most proposals (a forward more only where a row's padding would
    pass the context); each request then keeps its rows' common m accepted tokens (keep_common) and its fill is
    L + m. A step where no request proposes is the plain decode (_decode; with cuda_graph its graphs, which the
    speculative steps never use). A paged cache gives the verified positions their pages before the forward
    (earliest admitted first); a pool that cannot proposes fewer tokens, none at worst, never preempting for them
    (the tokens then still the model's distribution's, greedy ones generate's, but a sampled request's generator
    used as for fewer proposals). Requests with logprobs, min_tokens (generate refuses them with prompt_lookup) or
    prompt_logprobs, and prefill-only ones, decode plainly. With prefix caching, a speculating row that ended (EOS
    padding) caches only the blocks before the step it ended in (the positions after hold its proposals' keys).
    stats: vLLM's "spec_decode_num_drafts" (a live row's proposals a step), "spec_decode_num_draft_tokens" and
    "spec_decode_num_accepted_tokens" (generate's stats' drafted and accepted).

    draft (vLLM's speculative_config {"method": "draft_model", "model": ..., "num_speculative_tokens": K}; not with
    prompt_lookup): a smaller model of the model's vocabulary, as generate(draft=...) takes it; each request's tokens
    are generate(draft=draft, num_draft_tokens=K)'s for it (greedy ones token for token, seeded samples too: its
    generator drawn as _speculative draws it, unless the pool cuts its k), under prompt lookup's rules above (who
    speculates, the verification forward, the paged pool's cut, the stats: a live row's k proposals a step). The
    draft keeps a slot cache of its own (_draft_tokens: a row of its whole context a slot, never int8 nor paged,
    whatever the model's; prefix caching does not apply to it): a request's draft rows are prefilled at its first
    decode step (one forward a request, its prompt but its last token) and again after a preemption; each step the
    speculating requests' rows run k draft forwards together, a token a row at its own fill, each request its own
    k (_speculative's, the draft's context too) and its own warp and grammar mask on its q_logits, then the
    model's verification forward and verify_step with them; both caches' fills go back to L + m. num_draft_tokens
    defaults to 4 with a draft (generate's), 10 otherwise.

    A request's prediction (submit's; generate.Prediction, OpenAI's predicted outputs) speculates the same way with or
    without prompt_lookup: its rows propose the prediction's tokens instead of the text's n-grams (num_draft_tokens
    at most a step), under the conditions above; its Prediction counts what the model kept and refused.

    Adapters (vLLM's multi-LoRA; a model given them by model/lora.py serve_adapters): a request names its adapter
    (submit's adapter), and each forward's rows run their requests' (slot_adapter: a slot a cache row, -1 the base,
    read by every AdapterLinear through model.adapters). Its prefix-cache keys start from the adapter's name (its
    keys and values are not the base's). max_loras (vLLM's): the most adapters the running requests use at once; a
    waiting request of another one is passed over (vLLM's scheduler skips it) until one of them has no request
    left, and the adapters' requests behind it wait with it (vLLM's runs them: a steady stream of them starves it);
    the base's still pass. None: every served adapter (they all stay on the device: vLLM's default is 1, its slots
    on the GPU). stats: "lora_requests" a request run with an adapter.

    max_len (vLLM's max_model_len; serve's --max-model-len): the longest row, prompt and budget, the engine takes;
    the slot cache's rows and a paged cache's tables hold that many positions, not the model's whole context (what
    lets a long-context model serve in less memory); None: the model's context_length."""

    def __init__(self, model, max_batch: int = 8, kv_cache_dtype: str = "auto", autocast=None,
                 kv_pages: int | None = None, page_size: int = PAGE_SIZE, cuda_graph: bool = False, capture=None,
                 prefix_caching: bool = False, max_prefill_tokens: int | None = None, preemption: bool = True,
                 prompt_lookup: int | None = None, num_draft_tokens: int | None = None, max_loras: int | None = None,
                 draft=None, max_len: int | None = None):
        if not is_int(max_batch) or max_batch < 1:
            raise UserError(f"max_batch must be a positive integer (the requests' rows decoded at once), "
                            f"got {max_batch!r}")
        for name, flag in (("cuda_graph", cuda_graph), ("prefix_caching", prefix_caching), ("preemption", preemption)):
            if not isinstance(flag, bool):
                raise UserError(f"{name} must be a bool, got {flag!r}")
        if prefix_caching and kv_pages is None:
            raise UserError("prefix caching shares the pages of a paged KV cache: give the engine kv_pages "
                            "(serve: --enable-prefix-caching needs --kv-cache-pages)")
        if max_prefill_tokens is not None and (not is_int(max_prefill_tokens) or max_prefill_tokens < 1):
            raise UserError(f"max_prefill_tokens must be a positive integer (the prompt tokens a step prefills) or "
                            f"None, got {max_prefill_tokens!r}")
        check_cache_dtype(kv_cache_dtype)
        self.batch_bitmask = None  # _mask_decode's host buffer [max_batch, words] (pinned on CUDA), kept across steps
        self.lookup = None if prompt_lookup is None else PromptLookup(prompt_lookup)  # (checks it)
        if draft is not None and prompt_lookup is not None:
            raise UserError("draft and prompt_lookup are two drafts: pass one")
        if num_draft_tokens is None:  # (generate's defaults)
            num_draft_tokens = 4 if draft is not None else 10
        if not is_int(num_draft_tokens) or num_draft_tokens < 1:
            raise UserError(f"num_draft_tokens must be a positive integer (the tokens a row proposes a step), got "
                            f"{num_draft_tokens!r}")
        self.num_draft_tokens = int(num_draft_tokens)
        check_engine(model)
        self.draft = draft
        if draft is not None:  # (its vocabulary the model's, refused by name otherwise)
            if not isinstance(draft, torch.nn.Module) or not hasattr(draft, "new_cache"):
                raise UserError(f"draft must be a model of the model's vocabulary (prompt lookup is prompt_lookup=N, "
                                f"a prediction submit's prediction=), got {type(draft).__name__}")
            check_draft(model, draft, torch.zeros(1, 1, dtype=torch.long), 0, num_draft_tokens)
            try:
                check_engine(draft)
            except UserError as e:  # (else read as the model's refusal)
                raise UserError(f"the draft model: {e}") from None
            where = [next(m.parameters()).device for m in (model, draft)]
            if where[0] != where[1]:  # (else a failure deep in the draft's first forward, for every request)
                raise UserError(f"the draft model is on {where[1]}, the model on {where[0]}: put both on one device")
            draft.eval()
        if cuda_graph:
            check_graphable(model)
        self.model, self.max_batch = model.eval(), int(max_batch)
        context = model.config.context_length
        if max_len is not None and (not is_int(max_len) or not 1 <= max_len <= context):
            raise UserError(f"max_len must be a positive integer of at most the model's context length ({context}), "
                            f"got {max_len!r}")
        self.max_len = context if max_len is None else int(max_len)
        self.autocast = autocast or contextlib.nullcontext
        with self.autocast():  # the cache in the dtype the keys will have (an fp32 one would be cast every layer)
            if kv_pages is None:  # a row of the whole context a slot
                self.cache = new_cache(model, self.max_batch, self.max_len, kv_cache_dtype)
                device = self.cache.k.device
                self.cache.fill = torch.zeros(self.max_batch, dtype=torch.int64, device=device)  # a fill a row
            else:  # rows hold the pages their requests need (PagedKVCache)
                self.cache = model.new_paged_cache(self.max_batch, kv_pages, page_size, self.max_len,
                                                   kv_dtype=kv_cache_dtype)
            # the draft's: a row of its whole context a slot, never int8 nor paged, whatever the model's (a draft is
            # small); no prefix caching there (_draft_tokens prefills a request's rows itself)
            self.draft_cache = None if draft is None else draft.new_cache(
                self.max_batch, min(draft.config.context_length, self.max_len))
        if cuda_graph and capture is None and self.cache.k.device.type != "cuda":
            raise UserError(f"CUDA graphs need the model on a CUDA device; it is on {self.cache.k.device}")
        self.cuda_graph, self.capture, self.graphs = cuda_graph, capture, {}  # graphs: a DecodeGraph a bucket
        self.buckets = sorted({1 << i for i in range(self.max_batch.bit_length())} | {self.max_batch})
        self.free = list(range(self.max_batch))  # free slots, lowest first
        self.waiting, self.running = deque(), []
        self.cond = threading.Condition()  # guards waiting (submit's) and closed; wakes the thread
        self.closed, self.thread = False, None
        self.calls = []  # call()'s functions, run on the engine's thread between steps: [(fn, done, result)]
        self.prefix_caching, self.max_prefill_tokens = prefix_caching, max_prefill_tokens
        self.kv_cache_dtype = kv_cache_dtype  # (/metrics' cache_config_info tells it)
        # on_iteration(tokens) after each step that drew any, or ended a prefill-only request (its rows' prompts and
        # one token each, times its copies: vLLM's max_tokens 1 children) (/metrics' iteration_tokens)
        self.on_iteration = None
        self.preemption = preemption and self.paged  # (a slot cache's row holds the whole context: nothing to grow)
        self.stats = {"prompt_tokens": 0, "cached_prompt_tokens": 0, "preemptions": 0}
        self.adapters = getattr(model, "adapters", None)  # (model/lora.py AdapterRows, or None)
        if max_loras is not None and (self.adapters is None or not is_int(max_loras) or max_loras < 1):
            raise UserError(f"max_loras must be a positive integer, and only for a model serving adapters, got "
                            f"{max_loras!r}" + ("" if self.adapters is not None else " for a model serving none"))
        if self.adapters is not None:
            self.max_loras = None if max_loras is None else int(max_loras)  # (None: every adapter)
            self.slot_adapter = torch.full((self.max_batch,), -1, dtype=torch.int32, device=self.cache.k.device)
            self.stats["lora_requests"] = 0
        if self.lookup is not None or draft is not None:  # (the class's docstring)
            self.stats.update(spec_decode_num_drafts=0, spec_decode_num_draft_tokens=0,
                              spec_decode_num_accepted_tokens=0)

    def submit(self, idx, max_new_tokens: int, *, eos_id: int | None = None, generator=None,
               vocab_limit: int | None = None, stop=None, logprobs: int | None = None, stop_token_ids=None,
               min_tokens: int = 0, ignore_eos: bool = False, prompt_logprobs: int | None = None,
               adapter: str | None = None, guide=None, prediction=None, hold_ids=None, copies: int = 1,
               **warp) -> Request:
        """Queue generate(model, idx, max_new_tokens, eos_id=..., generator=..., vocab_limit=..., stop=...,
        logprobs=..., stop_token_ids=..., min_tokens=..., ignore_eos=..., hold_ids=..., **warp) (warp: its sampling
        settings) and return its handle. idx [n, T]: n rows (n <= max_batch), T + max_new_tokens within the context
        (the engine does not slide the window).

        prompt_logprobs k (vLLM's SamplingParams.prompt_logprobs; serve's echo): the request's own prefill scores
        its prompt, from the forward that fills its cache (no second forward): each position but the last's
        step_logprobs (logprob of the next prompt token [T - 1], top ids, top logprobs [T - 1, k], rank), the head and
        log-softmax a chunk of rows at a time (generate.score_positions), a prefill chunk's last position scoring
        the next chunk's first token; handed to wait()'s on_prompt before any token, once (n equal rows prefill
        once; a preemption's recompute scores nothing again). Such a request reads no cached prefix (vLLM's:
        positions served from cached pages have no forward to score them) but caches its pages for the requests
        after it. With max_new_tokens 0 it ends after its prefill, nothing drawn (echo with max_tokens 0).

        adapter: the name of a LoRA adapter the model serves (the class's docstring), None: the base model.
        guide: structured outputs (train/structured.py Grammars.guide's, not begun), generate's: its grammar's mask
        on each of the request's draws, its n-gram speculation's verifications too (not with no_repeat_ngram_size:
        such a request does not speculate).
        prediction: a predicted output (generate.Prediction, new for this request: it keeps its rows' places), the
        request's draft (the class's docstring); where the request cannot speculate it decodes plainly.
        copies: the choices a max_new_tokens 0 request's rows stand for (serve's echo with max_tokens 0 and n choices
        scores the prompt in one row): on_iteration counts each, as vLLM's n child requests, each its prompt and one
        token (vLLM runs max_tokens 1 and drops the token)."""
        if not is_int(copies) or copies < 1:
            raise UserError(f"a request's copies must be an integer >= 1, got {copies!r}")
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.size(1) == 0 or idx.is_floating_point():
            what = f"shape {tuple(idx.shape)} {idx.dtype}" if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise UserError(f"a request's prompt must be a non-empty [n, time] tensor of token ids, got {what}")
        vocab = self.model.config.vocab_size
        if bool(((idx < 0) | (idx >= vocab)).any()):  # (checked here: in the batch's forward it would fail them all)
            raise UserError(f"a request's token ids must be in [0, {vocab}) (the model's vocabulary), got "
                            f"{int(idx.min())}..{int(idx.max())}")
        if not is_int(max_new_tokens) or max_new_tokens < 0:
            raise UserError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if prediction is not None and not isinstance(prediction, Prediction):
            raise UserError(f"a request's prediction must be a generate.Prediction, got {type(prediction).__name__}")
        draft = prediction if prediction is not None else self.lookup if self.lookup is not None else self.draft
        speculates = self.speculates(max_new_tokens, logprobs, min_tokens, prompt_logprobs, guide,
                                     prediction is not None, **warp)
        self.check_room(idx.size(0), idx.size(1), max_new_tokens, bool((idx == idx[:1]).all()), speculates)
        if vocab_limit is not None and (not is_int(vocab_limit) or vocab_limit <= 0):
            raise UserError(f"vocab_limit must be a positive integer, got {vocab_limit!r}")
        check_sampling(**warp)
        device = self.cache.k.device
        # (checked here: the step's plain requests draw in one pass, _draw_plain, where a generator torch.rand
        # refuses would fail them all; a greedy request draws nothing from it)
        if generator is not None and warp.get("temperature", 0.0) >= torch.finfo(torch.float32).tiny and (
                not isinstance(generator, torch.Generator) or generator.device.type != device.type):
            what = f"one on {generator.device}" if isinstance(generator, torch.Generator) else type(generator).__name__
            raise UserError(f"a request's generator must be a torch.Generator on the engine's device ({device}), "
                            f"got {what}")
        check_logprobs(logprobs)
        check_logprobs(prompt_logprobs)
        if prompt_logprobs is not None and not bool((idx == idx[:1]).all()):
            raise UserError("prompt_logprobs scores one prompt: a request's rows must all be that prompt (its n "
                            "choices)")
        if prompt_logprobs is not None and vocab_limit is not None and bool((idx >= vocab_limit).any()):
            raise UserError(f"prompt_logprobs: the prompt's token id {int(idx.max())} is not among the vocab_limit "
                            f"{vocab_limit} tokens drawn from, so it has no logprob to give")
        self._adapter_slot(adapter)  # (refused now by name; its slot and salt taken below, under the cond)
        pad, ends, hold = end_rule(eos_id, stop_token_ids, min_tokens, ignore_eos, vocab_limit or vocab, hold_ids)
        if guide is not None:
            guide.begin(idx.size(0), ends, vocab_limit or vocab, sampling_with_triton(self.model))
            check_masks_reach_end(ends, warp.get("allowed_token_ids"), warp.get("bad_words"), guide.wake)
        if prediction is not None:  # (its ids checked here: in the batch's forward they would fail them all)
            prediction.begin(idx.size(0), vocab)
        r = Request(self, idx.to(self.cache.k.device), max_new_tokens, warp, pad, generator, vocab_limit, stop,
                    logprobs, ends, hold, prompt_logprobs)
        r.lookup, r.guide, r.draft = speculates, guide, draft if speculates else None
        r.copies = copies
        if max_new_tokens == 0 and prompt_logprobs is None:  # generate's: the prompt back, nothing run
            r.queue.put(("end", r.idx))
            return r
        with self.cond:
            if self.closed:
                raise EngineDown("the engine is closed")
            if adapter is not None:  # (as of the load serving it now: an unload and a reload may have come between)
                r.adapter = self._adapter_slot(adapter)
                r.salt = self.adapters.salts[r.adapter]
            self.waiting.append(r)
            self.cond.notify_all()
        return r

    def speculates(self, max_new_tokens: int, logprobs=None, min_tokens: int = 0, prompt_logprobs=None, guide=None,
                   predicted: bool = False, **warp) -> bool:
        """Whether a request of submit's settings drafts (predicted: it brings a prediction), which its pages count
        (_new_pages' lookup): its draws' logprobs, min_tokens, prompt scoring and a grammar waking late each keep it
        plain."""
        drafts = predicted or self.lookup is not None or self.draft is not None
        return drafts and logprobs is None and not min_tokens and prompt_logprobs is None and max_new_tokens > 0 \
            and (guide is None or not warp.get("no_repeat_ngram_size") and guide.wake is None)

    def check_room(self, rows: int, prompt: int, max_new_tokens: int, same: bool = True, speculates: bool = False):
        """submit's refusal of a request the engine could never admit however long it waited: more rows than
        max_batch, a prompt and budget past the context, more pages than a paged cache holds (rows of `prompt`
        tokens, `same`: all one prompt; speculates: speculates()'s). Shared so that a server can refuse such a
        request before it answers (serve's 400 before a stream's 200), by the engine's own arithmetic."""
        if rows > self.max_batch:
            raise UserError(f"the request has {rows} rows (n), more than the engine's max_batch "
                            f"{self.max_batch}: it could never be admitted")
        if prompt + max_new_tokens > self.max_len:
            raise UserError(f"prompt {prompt} + max_new_tokens {max_new_tokens} > the context length "
                            f"{self.max_len}: the engine does not slide the window")
        if not self.paged:
            return
        # The most it can hold (no cache hit): equal rows prefill once and share their prompt's full pages, but a
        # request preempted after its rows drew different tokens recomputes each row, with pages of its own
        prefilled = 1 if same and not self.preemption else rows
        most = self._new_pages((rows, prompt), prompt + max(max_new_tokens, 1) - 1, [[]] * prefilled, speculates)
        if most > self.cache.num_pages:
            raise UserError(f"the request needs {most} KV pages "
                            f"of {self.cache.page_size} positions ({rows} rows of {prompt} + "
                            f"{max_new_tokens}), more than the cache's {self.cache.num_pages}: it could never be "
                            "admitted")

    def context_pages(self) -> int:
        """The pages one row of the whole context takes (pages_for: a one-row request whose prompt and budget fill
        the context, serve's that omits max_tokens, takes as many whatever its prompt's length). A paged cache of
        fewer pages refuses every such request (check_room), so a server refuses it at startup (serve.make_engine,
        as vLLM does); 0 for a slot cache (each slot holds the whole context)."""
        return self.pages_for(1, self.max_len - 1) if self.paged else 0

    def call(self, fn):
        """fn() on the engine's thread between two steps (so no forward runs while it changes the model), -> its
        result, or its error raised here; with no thread running (stepped by hand), here and now."""
        if self.thread is None:
            return fn()
        done, result = threading.Event(), {}
        with self.cond:
            if self.closed:
                raise EngineDown("the engine is closed")
            self.calls.append((fn, done, result))
            self.cond.notify_all()
        while not done.wait(0.05):
            if not self.thread.is_alive():
                raise EngineDown("the engine's thread is not running any more")
        if "error" in result:
            raise result["error"]
        return result["value"]

    def load_adapter(self, name: str, modules: dict, max_rank: int = 16) -> int:
        """Serves one more LoRA adapter (model/lora.py add_adapter), between steps; the CUDA graphs captured before
        are dropped (the adapters' buffers may be new ones), each bucket captured again at its next step."""
        from tritongpt.model.lora import add_adapter

        def load():
            with self.cond:  # (submit resolves a name to its slot and salt under it: never half of a load)
                slot = add_adapter(self.model, name, modules, max_rank)
            self.graphs.clear()
            return slot
        return self.call(load)

    def unload_adapter(self, name: str):
        """The adapter unloaded (model/lora.py remove_adapter), between steps; refused while a request waiting or
        running uses it."""
        from tritongpt.model.lora import remove_adapter

        def unload():
            slot = self._adapter_slot(name)
            # (a request cancelled since the last step, its client gone, no longer runs it: dropped now, as the next
            # step would, not counted below; serve's hold on the adapter ended when the client left)
            self._drop_cancelled()
            with self.cond:  # (submit appends under it: no request of it can join between the check and the removal)
                users = sum(r.adapter == slot for r in [*self.running, *self.waiting])
                if users:
                    raise UserError(f"the adapter {name!r} runs {users} request(s): unload it once they have ended")
                remove_adapter(self.model, name)
        self.call(unload)

    def _drop_cancelled(self):
        """The cancelled requests (their callers gone) out of the waiting and running lists, each told, so that a
        wait() on it ends; between steps only (step's first act, and an unload's)."""
        with self.cond:
            gone = [r for r in self.waiting if r.cancelled]
            for r in gone:
                self.waiting.remove(r)
        self._finish_all([(r, Cancelled("the request was cancelled")) for r in
                          [r for r in self.running if r.cancelled] + gone])

    def _adapter_slot(self, adapter) -> int:
        if adapter is None:
            return -1
        names = [] if self.adapters is None else self.adapters.served
        if adapter not in names:
            served = f"its adapters are {', '.join(map(repr, names))}" if names else "it serves no adapter"
            raise UserError(f"the model has no LoRA adapter {adapter!r}: {served}")
        return self.adapters.slot(adapter)  # (its slot, not its place among those served: an unload leaves a gap)

    def _adapted(self, slots):
        """The context a forward over cache rows `slots` runs in: each row its request's adapter (the first `slots`
        rows: a view of slot_adapter, which a CUDA graph captured over it replays as it is then). No adapters:
        nothing."""
        if self.adapters is None:
            return contextlib.nullcontext()
        index = self.slot_adapter[:slots] if isinstance(slots, int) else self.slot_adapter[slots]
        return self.adapters.use(index)

    def _lora_room(self, r, admitted, passed) -> bool:
        """Whether r's adapter can join the running and admitted requests' (max_loras). None behind a request passed
        over (passed: this step's): one of a running adapter would renew its hold, and the passed-over one could
        wait for as long as they come."""
        if r.adapter < 0:
            return True
        if passed:
            return False
        used = {x.adapter for x in self.running + admitted if x.adapter >= 0}
        return r.adapter in used or self.max_loras is None or len(used) < self.max_loras

    @property
    def paged(self) -> bool:
        return self.cache.block_table is not None

    def pages_for(self, prompt: int, budget: int) -> int:
        """A row's pages for every position it can fill, the prompt's and all its budget's (the last token drawn
        is never fed back, hence the - 1): what it holds at most."""
        return self.cache.pages_for(prompt + max(budget, 1) - 1)

    def _length(self, r) -> int:
        """The positions each of r's rows takes pages for at admission: its prefill's (the prompt, and after a
        preemption the tokens it drew) and, with preemption, the first decode step's (when it feeds one) only, the
        rest taken as its rows grow (_grow); without it, all its budget's, so it never waits for a page. (A
        prefill-only request, max_new_tokens 0, still writes its whole prompt.)"""
        T, left = r.idx.size(1), r.budget - (r.idx.size(1) - r.start)
        return T + max(min(left, 2) if self.preemption else left, 1) - 1

    def _new_pages(self, shape, length: int, hits, lookup: bool = False) -> int:
        """The pages a request of rows of shape (n, T) takes beyond `hits`, its prefilled rows' cached pages (one
        prefilled row for n equal rows, n otherwise), its rows holding `length` positions: each prefilled row's
        pages less its hits, and with prefix caching the other equal rows' own pages past the prefill's full blocks
        (the prompt's; a speculating request's but its last token), which they share (without it they hold the
        whole prompt's, copied)."""
        n, T = shape
        pages = self.cache.pages_for(length)
        shared = (T - lookup) // self.cache.page_size if self.prefix_caching else 0
        return sum(pages - len(h) for h in hits) + (n - len(hits)) * (pages - shared)

    def _fits(self, r) -> bool:
        """Whether r's rows, and a paged cache's pages, are free now; sets r.same and r.hits (_plan)."""
        if r.n > len(self.free):
            return False
        return not self.paged or self._plan(r) <= self.cache.num_free

    def _plan(self, r) -> int:
        """r.same (its rows all one prompt: prefilled once), r.hits (each prefilled row's cached pages: none
        without prefix caching) and the free pages r takes: the new ones, and the cached ones it holds again (those
        no row holds count as free)."""
        cache = self.cache
        # (a 1-row request is one prompt: no comparison, on a GPU no host sync, a request admitted)
        r.same = r.n == 1 or bool((r.idx == r.idx[:1]).all())
        prefilled = r.idx[:1] if r.same else r.idx
        # (the last token always computed; a request scoring its prompt reads none: each position needs its forward)
        r.hits = [cache.lookup(row[:-1], r.salt) if self.prefix_caching and not r.scoring else [] for row in prefilled]
        if not self.paged:
            return 0
        cached = {p for h in r.hits for p in h if p in cache.cached} if self.prefix_caching else ()
        return self._new_pages(r.idx.shape, self._length(r), r.hits, r.lookup) + len(cached)

    def start(self):
        """step() on a background thread while there is work; returns self."""
        self.thread = threading.Thread(target=self._loop, name="tritongpt-engine", daemon=True)
        self.thread.start()
        return self

    def close(self):
        """Stops the thread; requests still waiting or running end with EngineDown."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join()
        for _, done, result in self.calls:
            result["error"] = EngineDown("the engine is closed")
            done.set()
        for r in [*self.running, *self.waiting]:
            self._finish(r, EngineDown("the engine is closed: the server is shutting down"))
        self.waiting.clear()

    def _loop(self):
        while True:
            with self.cond:
                while not self.closed and not self.waiting and not self.running and not self.calls:
                    self.cond.wait()
                if self.closed:
                    return
                calls, self.calls = self.calls, []
            for fn, done, result in calls:  # (between steps: no forward sees half of what one changes)
                try:
                    result["value"] = fn()
                except Exception as e:
                    result["error"] = e
                done.set()
            try:
                self.step()
            except Exception as e:  # (step fails requests itself; this is the engine's own fault) fail them all,
                with self.cond:     # never leave a caller waiting on a thread that died
                    stranded, self.waiting = [*self.running, *self.waiting], deque()
                for r in stranded:
                    self._finish(r, e)

    @torch.no_grad()
    def step(self) -> bool:
        """Admits what fits, prefills it, decodes every running request one token (one forward), finishes what
        ended. Returns whether any request ran."""
        self._drop_cancelled()  # (first: their slots serve this step's admissions)
        with self.cond:  # (/metrics reads the pages held under it)
            # (before admission, vLLM's order: the running requests' next pages come first; a step that preempted
            # one admits none, or it would take back the pages just freed)
            preempted = self._grow() if self.preemption else False
            admitted, passed = [], []
            # FIFO: the first request that does not fit (slots, or a paged cache's pages) waits, and the ones
            # behind it with it; one whose adapter would pass max_loras is passed over (vLLM's), keeping its place
            while not preempted and self.waiting:
                if self.adapters is not None and not self._lora_room(self.waiting[0], admitted, passed):
                    passed.append(self.waiting.popleft())
                    continue
                if not self._fits(self.waiting[0]):
                    break
                r = self.waiting.popleft()
                r.slots, self.free = self.free[:r.n], self.free[r.n:]
                try:
                    if self.prefix_caching:
                        self._attach(r)
                    for slot in r.slots if self.paged else ():
                        self.cache.reserve(slot, self._length(r))
                except Exception as e:  # (_fits counted its pages: not expected) it alone fails, nothing kept
                    self._finish(r, e)
                    continue
                self._begin(r)
                if r.scheduled is None:
                    r.scheduled = time.monotonic()
                    if r.adapter >= 0:
                        self.stats["lora_requests"] += 1
                admitted.append(r)
            self.waiting.extendleft(reversed(passed))
        decoding = [r for r in self.running if not r.todo]  # (a request still prefilling draws nothing yet)
        self.running = self.running + admitted
        if not self.running:
            return False
        logits, out = {}, None
        with self.autocast():
            prefilled = self._prefill(logits)  # (the prefill-only requests' tokens, ended in it)
            drafts = {}
            try:
                drafts = self._propose(decoding) if any(r.lookup for r in decoding) else {}
                if drafts:
                    logits.update(self._verify(decoding, drafts))
                elif decoding:
                    out = self._decode(decoding)
                    for r in decoding:
                        logits[r] = rows_of(out, r.slots)
            except Exception as e:  # the batch's forward failed: every request in it fails with the error
                self._finish_all([(r, e) for r in decoding])
        for r in list(logits):  # (the grammars' host work while the GPU runs the step's forwards: Guide.fill)
            try:
                if r.guide is not None and r not in drafts:
                    r.guide.fill()
            except Exception as e:  # (as a decode_step failure below: it alone fails)
                del logits[r]
                self._finish(r, e)
        if out is not None:
            self._mask_decode(out, [r for r in decoding if r in logits], logits)
        drawn = self._draw_plain(logits, drafts)
        taken = self._take_plain(logits, drawn)
        tokens = prefilled  # the step's tokens as vLLM's iteration_tokens_total counts them (on_iteration)
        ending = []  # [(r, its error or None)]: the requests the step ends, finished together after it (_finish_all)
        for r, lg in logits.items():
            alive, length = r.ended.count(False), r.idx.size(1)  # (before the step: its rows still drawing)
            try:
                if r in drafts:
                    finished, ended = self._accept(r, lg, *drafts[r])
                elif r in taken:  # (take_step's, its batch work done together: _take_plain)
                    nxt, was, ended, lp = taken[r]
                    r.idx, finished, ended = append_taken(r.idx, nxt, r.done, was, ended, r.put_token, r.stop, lp)
                elif r in drawn:  # (decode_step's after its draw)
                    r.idx, finished, ended = take_step(cut(lg, r.vocab_limit), r.idx, drawn[r], r.done, r.eos_id,
                                                       r.put_token, r.stop, r.logprobs, r.ends)
                else:
                    r.idx, finished, ended = decode_step(cut(lg, r.vocab_limit), r.idx, r.start, r.done, r.warp,
                                                         r.eos_id, r.generator, r.put_token, r.stop, r.logprobs,
                                                         r.ends, r.hold, r.guide, sampling_with_triton(self.model))
                if r.eos_id is not None:  # (without an EOS a done row draws on: its tokens are still returned)
                    r.ended = ended
            except Exception as e:  # this request's settings or stop rule: it alone fails
                ending.append((r, e))
                continue
            # (with an EOS or a stop rule decode_step has read the step's tokens back: it has run on the device;
            # without either, the stamp is its launch)
            r.last_token = time.monotonic()
            # vLLM's: a child request's (a row's) new tokens, and its prompt at its first token
            tokens += alive * (r.idx.size(1) - length) + (r.idx.size(0) * r.start if r.first_token is None else 0)
            if r.first_token is None:
                r.first_token = r.last_token
            if finished or r.idx.size(1) - r.start >= r.budget:
                ending.append((r, None))
        self._finish_all(ending)
        if tokens and self.on_iteration is not None:
            self.on_iteration(tokens)
        return True

    def _draw_plain(self, logits, drafts) -> dict:
        """{r: nxt [n, 1]} for the step's plain decode requests (no speculation, no grammar, no late_cut),
        drawn together by generate.sample_rows, a pass for the rows of each width (vocab_limit; on a CPU at most
        SAMPLE_PASS_CPU logits a pass): one batched draw a step, not decode_step's ~20 ops (GPU launches) a
        request; with Triton sampling on (sampling_with_triton), one launch of the sampling kernel a width. A
        request's hold and its biases and penalties (sampling_logits at temperature 0) still run on its
        own rows first, as decode_step's; one of them failing leaves the request to decode_step, where the error
        fails it alone. sample_rows failing leaves its pass's requests to decode_step too, their generators put back
        as they were (vLLM's: one request's error fails that request, not the batch beside it): each then draws
        alone, the very tokens it would have drawn in the pass, and what failed fails only its own request."""
        widths, out = {}, {}
        triton = sampling_with_triton(self.model)
        for r, lg in logits.items():
            # (a late cut at its "off" value, typical_p 1 or a cutoff 0, cuts nothing: such a request is plain)
            if r in drafts or r.guide is not None or late_cut(r.warp):
                continue
            try:
                x = cut(lg, r.vocab_limit)
                if r.hold is not None and r.idx.size(1) - r.start < r.hold[0]:
                    x = held_back(x, r.hold[1])
                rest = {k: v for k, v in r.warp.items() if k not in ROW_CUTS}
                if any(v is not None for v in rest.values()):
                    x = sampling_logits(x, seen=r.idx, generated_from=r.start, live=~r.done, **rest)
            except Exception:
                continue
            widths.setdefault(x.size(-1), []).append((r, x))
        passes = []
        for group in widths.values():
            passes.append([])
            size = 0
            for r, x in group:
                # (a CPU's pass at most SAMPLE_PASS_CPU logits: there launches cost little, and a pass's tensors
                # out of the cache cost more than the ops saved; a GPU's requests of a width all in one, and the
                # Triton kernel's too: it holds no pass-sized tensors, a row at a time)
                if passes[-1] and x.is_cpu and not triton and size + x.numel() > SAMPLE_PASS_CPU:
                    passes.append([])
                    size = 0
                passes[-1].append((r, x))
                size += x.numel()
        for group in passes:
            reqs = [r for r, _ in group]
            # (a pass may fail after its torch.rand: the sampled requests' generators kept to put back, so a seeded
            # request drawing alone after it draws its own uniforms again; submit checked they are Generators)
            kept = [(r.generator, r.generator.get_state()) for r in reqs if r.generator is not None and
                    r.warp.get("temperature", 0.0) >= torch.finfo(torch.float32).tiny]
            try:
                nxt = sample_rows(torch.cat([x for _, x in group]), [r.warp for r in reqs],
                                  [r.generator for r in reqs], [r.n for r in reqs], triton=triton)
            except Exception:  # (not in out: each draws alone, decode_step's, whose error fails it alone)
                for g, state in kept:
                    g.set_state(state)
                continue
            row = 0
            for r in reqs:
                out[r], row = nxt[row:row + r.n], row + r.n
        return out

    def _take_plain(self, logits, drawn) -> dict:
        """{r: take_rows' (tokens, done before, ended, logprobs)} for the requests _draw_plain drew: their tokens
        and done rows read to the host in one copy a step (on a GPU one sync, not take_step's done.tolist() a
        request), the logprobs once for the rows of each width and k (generate.take_rows). take_rows failing (one
        request's logprobs, say) leaves them all to take_step, a request at a time (it changes nothing before it
        returns: nothing to undo), so the error fails only the request it is in, as sample_rows' does."""
        reqs = [r for r in logits if r in drawn]
        if not reqs:
            return {}
        try:
            took = take_rows([cut(logits[r], r.vocab_limit) for r in reqs], [drawn[r] for r in reqs],
                             [r.done for r in reqs], [r.eos_id for r in reqs], [r.ends for r in reqs],
                             [r.eos_id is not None or r.stop is not None for r in reqs], [r.logprobs for r in reqs])
        except Exception:
            return {}
        return dict(zip(reqs, took))

    def _grow(self) -> bool:
        """Preemption (vLLM's scheduler): before the decode step each running request whose rows' next write
        crosses into a new page takes it (the host knows each fill: a decoding row feeds its last token at
        position idx.size(1) - 1). A row that ended (r.ended: padded with the EOS) takes none: its writes past its
        pages go to the scratch page, and what it reads there only draws the EOS padding's logits (its logprobs
        past its end are padding too, never shown). Earliest admitted first; when too few pages are free (cached
        pages no row holds count as free), the latest admitted running request is preempted (_preempt), the one
        growing itself when it is the latest. -> whether any was."""
        # (victims: the ones preempted so far, a set: `r in self.running` each would scan the list, a step's
        # requests squared)
        cache, preempted, victims = self.cache, False, set()
        for r in [r for r in self.running if not r.todo]:
            if r in victims:  # preempted already, for an earlier one's pages
                continue
            length, slots = r.idx.size(1), [s for s, ended in zip(r.slots, r.ended) if not ended]
            while sum(cache.pages_for(length) - len(cache.pages[s]) for s in slots) > cache.num_free:
                victim, preempted = self.running[-1], True
                if victim is r and len(self.running) == 1:  # (not expected: submit refuses a request the pool
                    self._finish(r, RuntimeError(       # cannot hold alone) it fails, never preempted for ever
                        f"the request's rows need more than the cache's {cache.num_pages} KV pages"))
                    break
                self._preempt(victim)
                victims.add(victim)
                if victim is r:
                    break
            else:
                for slot in slots:
                    cache.reserve(slot, length)
        return preempted

    def _preempt(self, r):
        """Preemption by recompute (vLLM V1's): r's pages and slots go back (shared pages by their refcounts; with
        prefix caching its full pages stay cached for its return), its ids drawn so far are kept, and it goes to the
        front of the waiting queue. Readmitted, it prefills its prompt and those ids (chunked, prefix-cached like
        any prompt) and draws on from their logits: its generator, done rows and penalties (counted from r.start)
        are untouched while it waits, so its tokens are the ones it would have drawn, none sent twice."""
        self.running.remove(r)
        with self.cond:
            # (its fed pages cached first, so its recompute reads them back and prefills only its last partial page,
            # as vLLM's does)
            self._let_go(r, cache=True)
            self.free.sort()
            r.todo, r.rows, r.scores = None, [], []
            self.waiting.appendleft(r)
        self.stats["preemptions"] += 1

    def _let_go(self, r, cache: bool):
        """r's slots free again (under self.cond): with `cache`, its fed pages into the prefix index first
        (_cache_fed), then its pages released (shared ones by their refcounts), or a slot row's fill back to 0 (a
        free row's fill within the next steps' bound, _decode). Its slots join self.free unsorted: the caller sorts it,
        once for all the requests it lets go."""
        if cache:
            self._cache_fed(r)
        for slot in r.slots if self.paged else ():
            self.cache.release(slot)
        if not self.paged:
            self.cache.fill[r.slots] = 0
        if self.adapters is not None:
            self.slot_adapter[r.slots] = -1
        self.free += r.slots
        r.slots = None

    def _cache_fed(self, r):
        """Prefix caching (vLLM caches every full block of a sequence, prompt and output): r's rows' full pages of
        the ids they fed (idx[:, :-1]: the last drawn token never was) enter the index before r lets them go. Not
        for a request still prefilling: its last chunk's pages are not all written. A row that ended holds fewer
        pages than it fed (_grow): the ids in its pages."""
        for i, slot in enumerate(r.slots if self.prefix_caching and not r.todo else ()):
            self.cache.register(slot, r.idx[i, :-1][:len(self.cache.pages[slot]) * self.cache.page_size][:r.cut[i]],
                                r.salt)

    def _attach(self, r):
        """Prefix caching, at admission (r.hits from _plan): each prefilled row takes its cached pages; a request's
        other equal rows take the first row's pages of the prompt's full blocks (shared: prefilled once, by it)."""
        cache, full = self.cache, self._prefill_end(r) // self.cache.page_size
        for slot, hits in zip(r.slots, r.hits):
            cache.attach(slot, hits)
        if r.same and r.n > 1:
            cache.reserve(r.slots[0], self._length(r))
            for slot in r.slots[1:]:
                cache.attach(slot, cache.pages[r.slots[0]][:full])

    def _begin(self, r):
        """At admission: the rows r's prefill runs (one for a request of equal rows), each from the end of its
        cached pages. Each of r's slots gets a fill where a decode step's write is harmless: the decode's forward
        runs every row up to the last busy one, so one still prefilling writes a key at its fill, which must never
        be in its shared pages (other rows read them). Past them it is overwritten before anything reads it: a
        prefilled row's fill is its next chunk's first position (the end of its cached pages, then of its last
        chunk), and the equal rows that copy the prompt at the end get copy_row's keys (or their own decode's)."""
        if not self.paged:  # (_fits planned a paged cache's requests)
            self._plan(r)
        size = self.cache.page_size if self.paged else 0
        r.todo, r.rows = deque([i, slot, len(h) * size] for i, (slot, h) in enumerate(zip(r.slots, r.hits))), []
        for slot in r.slots:
            self.cache.fill[slot] = self.cache.shared[slot] * size if self.paged else 0
        r.draft_fill = 0  # (a draft model's rows: prefilled again, _draft_tokens)
        if self.adapters is not None:
            self.slot_adapter[r.slots] = r.adapter

    def _prefill(self, logits: dict):
        """This step's prefill: the prompt chunks within max_prefill_tokens (_chunks), run a group of them a forward
        (_groups, _forward), then each request's rows advanced (_prefilled). A request whose last chunk ran gets
        its first token's logits in `logits`, or, prefill-only (its prompt scored, nothing to draw), ends here: its
        first token's stamp where vLLM's (which draws one token for it, dropped) would be, and before the decode,
        its slot a free row there (at its fill, a prompt of the whole context would run a row past the last
        position). A group's forward that fails fails its requests; a request's own bookkeeping, it alone.
        -> the tokens of the prefill-only requests it ended, as on_iteration counts them."""
        chunks, tokens = self._chunks(), 0
        # (each request's chunks, in order, and the ones a failed forward ended, gathered once: a scan of the chunks
        # or of the running list a request would be a burst's requests squared)
        failed, mine = set(), {}
        for c in chunks:
            mine.setdefault(c.r, []).append(c)
        for group in self._groups([c for c in chunks if c.end > c.start]):  # (a speculating prompt of 1 token: none)
            group = [c for c in group if c.r not in failed]  # (not a request an earlier group's failure ended)
            try:
                if group:
                    self._forward(group)
            except Exception as e:
                for r in dict.fromkeys(c.r for c in group):
                    failed.add(r)
                    self._finish(r, e)
        for r, own in mine.items():
            if r in failed:
                continue
            try:
                lg = self._prefilled(r, own)
                if lg is not None and r.budget == 0:
                    r.first_token = r.last_token = time.monotonic()
                    # vLLM's max_tokens 1 request a copy: its prompt and the token it draws and drops
                    tokens += r.copies * r.n * (r.start + 1)
                    self._finish(r)
                elif lg is not None:
                    logits[r] = lg
            except Exception as e:
                self._finish(r, e)
        return tokens

    def _chunks(self) -> list:
        """The admitted requests' prompt rows to prefill this step, FIFO (the earliest admitted first), each from
        where its row's last chunk ended, at most max_prefill_tokens in all (None: every one whole): [Chunk]."""
        budget, chunks = self.max_prefill_tokens, []
        for r in [r for r in self.running if r.todo]:
            T = self._prefill_end(r)  # (the prompt, and after a preemption the ids drawn)
            for i, slot, fill in r.todo:
                if budget == 0:
                    break
                end = T if budget is None else min(T, fill + budget)
                chunks.append(Chunk(r, i, slot, fill, end))
                budget = None if budget is None else budget - (end - fill)
            if budget == 0:
                break
        return chunks

    def _groups(self, chunks) -> list:
        """The chunks in groups, a forward each (vLLM batches a step's prefills too; it packs them, with
        variable-length attention, where ours pads each to its group's longest). A chunk joins the group being
        made, longest first (like lengths pad least), while the padding rules hold (PREFILL_GROUP_TOKENS,
        PREFILL_PAD; and max_prefill_tokens, which bounds a forward's tokens, padding included) and every row's
        padded end stays within the context (its keys' positions, its position embeddings)."""
        groups, most = [], min(PREFILL_GROUP_TOKENS, self.max_prefill_tokens or PREFILL_GROUP_TOKENS)
        pad = PREFILL_PAD.get(self.cache.k.device.type, PREFILL_PAD["cpu"])
        held = 0  # the last group's real tokens, kept as it grows (summed again a chunk: a burst's chunks squared)
        for c in sorted(chunks, key=lambda c: c.start - c.end):
            if groups:
                g = groups[-1]
                width = g[0].end - g[0].start  # (its first, the longest)
                padded, real = width * (len(g) + 1), held + c.end - c.start
                if padded <= most and padded <= pad * real and c.start + width <= self.max_len:
                    g.append(c)
                    held = real
                    continue
            groups.append([c])
            held = c.end - c.start
        return groups

    def _forward(self, group):
        """One forward over a group's chunks, each chunk's results on it: its prompt's scores (a request scoring
        its prompt: each position's next prompt token, its last the next chunk's first) and, its row's last chunk,
        the last position's logits [1, V]. A lone chunk runs in its row's own view (row(): its exact length; a
        paged row's rows(), its pages up to the chunk's end);
        several right-padded to the longest in rows() (the cache's fill a row: each row's keys at its own
        positions, its real tokens never attending to its padding, which comes after them)."""
        if len(group) == 1:  # (a paged row bounded by its chunk's end: row() would read the table's whole width)
            c = group[0]
            view = self.cache.rows([c.slot], [c.start], c.end) if self.paged else self.cache.row(c.slot, start=c.start)
            ids = c.r.idx[c.i:c.i + 1, c.start:c.end]
        else:
            width = max(c.end - c.start for c in group)
            ids = torch.stack([torch.cat([t, t[-1:].expand(width - len(t))]) for t in (c.ids for c in group)])
            view = self.cache.rows([c.slot for c in group], [c.start for c in group],
                                   max(c.start for c in group) + width)
        with self._adapted([c.slot for c in group]):
            h, head, vocab = hidden_and_head(self.model, ids, view)
        for c, hc in zip(group, h):
            r, T = c.r, c.r.idx.size(1)
            hc = hc[:c.end - c.start]
            if r.scoring:
                c.part = score_positions(hc, head, vocab, r.idx[c.i, c.start + 1:min(c.end + 1, T)],
                                         r.prompt_logprobs, r.vocab_limit)
            c.logits = head(hc[-1:]) if c.end == T else None

    def _prefilled(self, r, chunks):
        """r's rows advanced by its chunks that ran (in order: its todo's first rows): -> the logits of its rows'
        next token [n, V] once its last chunk ran, else None. Equal rows (a request's n choices) ran once, the keys
        copied to the other slots at the end; with prefix caching a row's full prompt blocks enter the index once
        it is prefilled."""
        cache, T = self.cache, self._prefill_end(r)
        for c in chunks:
            if r.scoring:
                r.scores.append(c.part)
            r.todo[0][2] = c.end
            cache.fill[c.slot] = c.end
            if c.end < T:  # (the step's budget ran out in it: the rest next step)
                break
            r.todo.popleft()
            r.rows.append(c.logits)
            if self.prefix_caching:
                cache.register(c.slot, r.idx[c.i, :T], r.salt)
            if self.prefix_caching and not r.scoring:  # (the stats count the prompts looked up in the cache: vLLM's)
                self.stats["prompt_tokens"] += r.idx.size(1)
                self.stats["cached_prompt_tokens"] += len(r.hits[c.i]) * cache.page_size
                if not r.prefilled:  # (its first prefill's: a preempted request's recompute is not its usage)
                    r.cached, r.prefilled = len(r.hits[c.i]) * cache.page_size, True
        if r.todo:
            return None
        if r.scoring:  # (on the device: the consumer's tolist waits in its own thread, as for the drawn tokens')
            r.queue.put(("prompt", tuple(torch.cat(p) for p in zip(*r.scores))))
            r.scoring, r.scores = False, []
        for slot in r.slots[1:] if r.same else ():
            cache.copy_row(r.slots[0], slot, T)
        cache.fill[r.slots] = T
        if r.lookup:  # (its first token from its first decode step: nothing drawn here)
            return None
        return r.rows[0].expand(r.n, -1) if r.same else torch.cat(r.rows)

    def _prefill_end(self, r) -> int:
        """Where r's prefill ends: its ids' end, a speculating request's but its last token (the class's)."""
        return r.idx.size(1) - r.lookup

    def _propose(self, decoding) -> dict:
        """{r: (drafted [n, k], lens [n] or None, the draft model's q_logits or None)} of the decoding requests whose
        rows propose anything, k as _speculative's for r: prompt lookup's and a prediction's (their propose: a row
        proposes lens[b] tokens), a draft model's (_draft_tokens, every row k). A paged cache gives each row's
        verified positions, L + k, their pages first (earliest admitted first; not a row that ended: its writes go to
        the scratch page, as in _grow): where the pool is short, r proposes the most tokens it can hold, none at
        worst (never a preemption)."""
        drafts, widths = {}, {}
        with self.cond:  # (/metrics reads the pages held under it)
            for r in [r for r in decoding if r.lookup]:
                L = r.idx.size(1)
                k = draft_width(L, r.start, r.budget, self.num_draft_tokens, self.max_len)
                if r.draft is self.draft:  # (its tokens below, with the other such requests')
                    k = self._room(r, max(min(k, self.draft_cache.max_len - L + 1), 0))
                    for s in self._live_slots(r) if self.paged and k else ():
                        self.cache.reserve(s, L + k)
                    if k:
                        widths[r] = k
                    continue
                drafted, lens = r.draft.propose(r.idx, r.start, k, r.vocab_limit)
                if self.paged and drafted.size(1):
                    k = self._room(r, drafted.size(1))
                    if k < drafted.size(1):  # (the proposals of a smaller k: these cut to it)
                        drafted, lens = r.draft.propose(r.idx, r.start, k, r.vocab_limit)
                    for s in self._live_slots(r) if drafted.size(1) else ():
                        self.cache.reserve(s, L + drafted.size(1))
                if drafted.size(1):
                    drafts[r] = (drafted, lens, None)
        if widths:
            drafts.update(self._draft_tokens(widths))
        return drafts

    def _live_slots(self, r) -> list:
        return [s for s, ended in zip(r.slots, r.ended) if not ended]

    def _room(self, r, k: int) -> int:
        """The most of k proposals r's live rows' pages can hold (a paged cache's free pages; k with a slot cache)."""
        slots, L = self._live_slots(r), r.idx.size(1)
        while self.paged and k and sum(self.cache.pages_for(L + k) - len(self.cache.pages[s]) for s in slots) \
                > self.cache.num_free:
            k -= 1
        return k

    def _draft_tokens(self, widths) -> dict:
        """A draft model's proposals, k = widths[r] for request r, as _speculative draws them: the requests' rows
        in one draft forward a position (KVCache.rows over the draft's own slot cache, each row at its own fill),
        the rows of a request whose k is spent left out of the later ones; each position's logits warped with r's
        settings (sampling_logits, Guide.mask_after: the q_logits verify_step judges with) and drawn with r's
        generator. A request's draft rows hold its text but its last token after the step before (fill L - 1),
        or one token less where the model kept every proposal (or none was made): the first forward feeds those
        1 or 2 tokens, right-padded. Rows further behind (a prompt, a preempted request's ids) first run them in a
        forward of their own, a request a forward: the draft's prefill, done at its first decode step, not with the
        model's prefill. -> {r: (drafted [n, k], None, q_logits)}."""
        cache, text, q = self.draft_cache, {r: r.idx for r in widths}, {r: [] for r in widths}
        for r in widths:  # (the draft's prefill)
            L = r.idx.size(1)
            if r.draft_fill < L - 2:
                hidden_and_head(self.draft, r.idx[:, r.draft_fill:L - 1], cache.rows(r.slots, [r.draft_fill] * r.n,
                                                                                      L - 1))
                r.draft_fill = L - 1
        for j in range(max(widths.values())):
            live = [r for r in widths if widths[r] > j]
            fed = {r: text[r].size(1) - r.draft_fill for r in live}  # (1 or 2 the first forward, then 1)
            groups = []  # (a row whose padded end would pass the draft's context in a forward of narrower rows)
            for r in sorted(live, key=lambda r: -fed[r]):
                if groups and r.draft_fill + fed[groups[-1][0]] <= cache.max_len:
                    groups[-1].append(r)
                else:
                    groups.append([r])
            for group in groups:
                W, ids, slots, starts = fed[group[0]], [], [], []
                for r in group:
                    t = text[r][:, r.draft_fill:]
                    ids.append(torch.cat([t, t[:, -1:].expand(-1, W - t.size(1))], dim=1))
                    slots, starts = slots + r.slots, starts + [r.draft_fill] * r.n
                h, head, _ = hidden_and_head(self.draft, torch.cat(ids), cache.rows(slots, starts, max(starts) + W))
                row = 0
                for r in group:
                    logits = head(h[row:row + r.n, fed[r] - 1])[:, :r.vocab_limit]
                    row, r.draft_fill = row + r.n, r.draft_fill + fed[r]
                    if r.guide is not None:  # (what the grammar allows: more of it accepted)
                        logits = r.guide.mask_after(logits, text[r][:, r.idx.size(1):])
                    w = sampling_logits(logits, seen=text[r], generated_from=r.start,
                                        live=torch.zeros(r.n, dtype=torch.bool, device=logits.device), **r.warp)
                    q[r].append(w)
                    greedy = r.warp.get("temperature", 0.0) < torch.finfo(torch.float32).tiny
                    text[r] = torch.cat([text[r], _draw(w, greedy, r.generator)], dim=1)
        return {r: (text[r][:, r.idx.size(1):], None, q[r]) for r in widths}

    def _verify(self, decoding, drafts) -> dict:
        """The decoding rows in one forward (KVCache.rows), each its last token and its request's proposals at its
        own fill (the text but its last token), right-padded to the widest (the padding's keys past the row's
        proposals, never read: its fill moves back over them): {r: its logits [n, 1 + k, V]} (a request proposing
        nothing: [n, 1, V]). A row whose padded end would pass the context goes in a forward of narrower rows."""
        width = {r: 1 + (drafts[r][0].size(1) if r in drafts else 0) for r in decoding}
        groups = []
        for r in sorted(decoding, key=lambda r: -width[r]):  # (stable: the earliest admitted first)
            if groups and r.idx.size(1) - 1 + width[groups[-1][0]] <= self.max_len:
                groups[-1].append(r)
            else:
                groups.append([r])
        out = {}
        for group in groups:
            W, tokens, slots, starts = width[group[0]], [], [], []
            for r in group:
                text = torch.cat([r.idx[:, -1:], drafts[r][0]], dim=1) if r in drafts else r.idx[:, -1:]
                tokens.append(torch.cat([text, text[:, -1:].expand(-1, W - text.size(1))], dim=1))
                slots, starts = slots + r.slots, starts + [r.idx.size(1) - 1] * r.n
            with self._adapted(slots):
                h, head, _ = hidden_and_head(self.model, torch.cat(tokens), self.cache.rows(slots, starts,
                                                                                            max(starts) + W))
            row = 0
            for r in group:
                out[r] = head(h[row:row + r.n, :width[r]])
                row += r.n
                if r not in drafts:  # (drawn by decode_step from its one position, as after _decode)
                    self.cache.fill[r.slots] = r.idx.size(1)
                    out[r] = out[r][:, 0]
        return out

    def _accept(self, r, logits, drafted, lens, q_logits) -> tuple:
        """r's speculative step after _verify's forward (generate.verify_step, _speculative's): its tokens appended
        one at a time (EOS, stop, put_token), its fill L + m (the rejected positions' keys stale, never read; a draft
        model's rows at most L + m too), the stats counted. -> (whether every row is done, the rows done on the host,
        as decode_step's)."""
        L, before, sent = r.idx.size(1), r.done.clone(), []  # (verify_step updates done in place)
        r.idx, m, finished, ended, _, offered, accepted = verify_step(
            logits[..., :r.vocab_limit], torch.cat([r.idx, drafted], dim=1), L, r.start, r.done, r.warp,
            r.generator, r.eos_id, lambda *item: sent.append(item), r.stop, r.ends, lens, q_logits, guide=r.guide,
            prediction=r.draft if isinstance(r.draft, Prediction) else None)
        if sent:  # (the step's tokens as one: Request.put_step)
            r.put_step(sent)
        self.cache.fill[r.slots] = L + m
        r.draft_fill = min(r.draft_fill, L + m)
        for i, ended_row in enumerate(ended if r.eos_id is not None else ()):
            if ended_row:  # (its keys from L on are its proposals', not the EOS padding it holds)
                r.cut[i] = L if r.cut[i] is None else min(r.cut[i], L)
        if "spec_decode_num_drafts" in self.stats:  # (vLLM's counters: a server that speculates; a prediction's too)
            self.stats["spec_decode_num_drafts"] += int(((lens > 0) & ~before).sum() if lens is not None
                                                        else (~before).sum())
            self.stats["spec_decode_num_draft_tokens"] += offered
            self.stats["spec_decode_num_accepted_tokens"] += accepted
        return finished, ended

    def _decode(self, decoding) -> torch.Tensor:
        """One forward over the cache's rows up to the last busy one, each running row's last token at its own
        fill: logits [rows, V]. Slots go lowest first, so that is mostly just the running rows (a lone request runs
        one row, not max_batch); a row between them not decoding (free, or prefilled this step) writes a key at its
        fill that nothing reads before its own next token overwrites it."""
        slots = [s for r in decoding for s in r.slots]
        rows = max(slots) + 1
        if self.cuda_graph:  # (the class's docstring: the bucket's graph, its rows past `rows` free ones)
            rows = next(b for b in self.buckets if b >= rows)
        tokens = torch.zeros(rows, 1, dtype=torch.long, device=self.cache.fill.device)
        tokens[slots] = torch.cat([r.idx[:, -1:] for r in decoding])
        with self._adapted(rows):  # (a view of slot_adapter: what a graph replays reads it as it is then)
            if self.cuda_graph:
                if rows not in self.graphs:
                    # Autocast's weight cache off (DecodeGraph's default) though a server's weights never change: each
                    # step is an autocast region of its own, and autocast frees its cached casts when a region ends,
                    # so a graph that kept them would replay reads of freed memory. Each replay casts the weights
                    # again (~6 bytes a fp32 parameter a step); 16-bit weights cast nothing.
                    self.graphs[rows] = DecodeGraph(self.model, self.cache.first_rows(rows), self.capture,
                                                    row_fill=True)
                # (the graph's buffer, which its next replay rewrites: the step's requests read their rows of it, views
                # (rows_of), before the next step's replay)
                logits = self.graphs[rows](tokens)[:, -1]
            else:
                # (a host bound on every row's kv_len, so the reference core reads that many keys, not max_len: a
                # decoding row's is its ids', a prefilling one's at most its ids' + 1, a free row's 1, its fill reset)
                bound = min(max(r.idx.size(1) for r in self.running) + 1, self.max_len)
                cache = self.cache.first_rows(rows, bound)
                cache.on_device = True
                logits = last_logits(self.model, tokens, cache)[:, -1]
        self.cache.fill[slots] += 1
        return logits

    def _mask_decode(self, out, decoding, logits):
        """The decode batch's guided rows (structured outputs) masked in one op, out [rows, V] (_decode's), their
        bitmasks (Guide.fill's) gathered into one at their slots: a copy and a kernel a step, not one a request
        (vLLM's one bitmask a batch). Each request's logits are then taken from it again, and its guide told its
        rows are masked (Guide.took: decode_step masks nothing more)."""
        from tritongpt.model.sampling import apply_token_bitmask

        guided = [r for r in decoding if r.guide is not None and r.guide.live]
        if not guided:
            return
        words = (out.size(-1) + 31) // 32
        # (max_batch rows, the most a step decodes, and the step's first rows taken: one buffer pinned once, not one
        # a change of the batch's rows or graph bucket)
        if self.batch_bitmask is None or self.batch_bitmask.size(1) != words:
            self.batch_bitmask = torch.empty(self.max_batch, words, dtype=torch.int32, pin_memory=out.is_cuda)
        bitmask, slots = self.batch_bitmask[:out.size(0)], []
        bitmask.fill_(-1)  # (a row's tokens past its grammar's vocabulary, vocab_limit's, are cut before its draw)
        for r in guided:
            for i in r.guide.live:
                row = r.guide.bitmask[i]
                bitmask[r.slots[i], :row.size(0)] = row[:words]
                slots.append(r.slots[i])
            r.guide.took()
        try:
            out = apply_token_bitmask(out, bitmask.to(out.device, non_blocking=True), slots,
                                      triton=sampling_with_triton(self.model))
        except Exception as e:  # (the guided requests alone fail, as in their own decode_step; the others draw on)
            for r in guided:
                del logits[r]
                self._finish(r, e)
            return
        for r in decoding:
            if r in logits:
                logits[r] = rows_of(out, r.slots)

    def _finish(self, r, error=None):
        """The request ends (its ids, or the error, to its queue) and its slots are free again."""
        self._finish_all([(r, error)])

    def _finish_all(self, ending):
        """_finish for each (r, error or None) of `ending`, in order: the running list filtered and the free slots
        sorted once for them all, not a list.remove and a sort a request (a step whose many requests end together
        would take their number squared)."""
        if not ending:
            return
        gone = {r for r, _ in ending}
        self.running = [r for r in self.running if r not in gone]
        let_go = 0  # (how many of `ending` are let go: the rest get the error if one of them fails)
        try:
            with self.cond:
                for r, error in ending:
                    if r.slots is not None:
                        # (a normal end or a cancel, between steps: its pages hold its fed ids' keys; an error may
                        # come from a forward that wrote some layers' keys only)
                        self._let_go(r, cache=error is None or isinstance(error, Cancelled))
                    let_go += 1
        except Exception as e:
            # (the engine's own fault, _loop's to handle: the requests not let go are out of the running list
            # already, where _loop would find them, so each is told the error here, or its wait() hangs for ever)
            ending = ending[:let_go] + [(r, e) for r, _ in ending[let_go:]]
            raise
        finally:
            with self.cond:
                self.free.sort()
            for r, error in ending:
                r.queue.put(("error", error) if error is not None else ("end", r.idx))
