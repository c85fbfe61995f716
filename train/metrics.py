"""`GET /metrics` for `tritongpt serve` (train/serve.py): Prometheus' text exposition format 0.0.4, written with the
standard library. Names and histogram buckets are vLLM's (vllm/v1/metrics/loggers.py) with `tritongpt:` for
`vllm:`, so a dashboard built for vLLM reads this server too.

The handler threads count what their requests drew. A request here is one prompt's n choices (the engine's unit);
vLLM splits it into n child requests (vllm/v1/engine/parallel_sampling.py), each prefilling the prompt, so what it
counts per request counts here once per choice: request_success, prompt_tokens_total (the prompt n times), the time
to first token (n observations of the one step's clock), the inter-token latencies (each step's gap observed at the
step, once for each choice still drawing in it, as vLLM's engine steps observe each running child's: a choice that
ended early has none of its siblings' later steps), e2e, the phases and the per-request time per output token (the
request's clocks, each choice's ending at its own last token, as a vLLM child request finishes then),
request_prompt_tokens, request_generation_tokens (each choice's own count) and request_params_max_tokens. Once per
request (vLLM's ParentRequest, once its n children ended): request_params_n and request_max_num_generation_tokens
(the most tokens of its choices). A beam search (use_beam_search) counts as its n beams (vLLM's runs each step's
beams as max_tokens 1 requests, counted each; not copied: a dashboard would read each step's beam as a request), its
iteration_tokens_total one observation of its beams' prompts and tokens (vLLM's: each step's requests, the prompt and
the beam's tokens so far each, a recompute ours does not run). prompt_tokens_total and generation_tokens_total count
an aborted or failed request too (vLLM counts each engine step's tokens as they are made): its prompt once it drew
its first token, each choice's tokens drawn until it stopped. A pooling request (train/pooling.py) counts once, with
no sampling parameters (no request_params_*).

The gauges are read from the engine at scrape time (its waiting queue, running requests and cache, plus the beam
searches holding or waiting for the model between its steps), or, with no engine (--max-batch 1), from the requests
holding and waiting for the model's lock. One small lock guards it all.

With LoRA adapters served by the engine (serve --enable-lora --lora-modules), vLLM's lora_requests_info gauge too
(vllm/v1/metrics/loggers.py): its labels max_lora (the engine's max_loras), waiting_lora_adapters and
running_lora_adapters (the adapters' names of the waiting and the running requests, comma-separated, each once, in
the order the requests first show them), its value the time the labels were read (set_to_current_time: seconds
since the epoch; vLLM's at each logging step, ours at the scrape). It bears model_name too, as every family
here (vLLM's has none: a query matching its own labels reads both).

Every other series bears vLLM's engine label too, "0" (its data-parallel engine's index; one engine here).
vLLM's cache_config_info gauge (value 1, the cache config as labels) is here with a paged cache only
(--kv-cache-pages): block_size, num_gpu_blocks, cache_dtype and enable_prefix_caching, the labels that mean the
same here (vLLM's others, gpu_memory_utilization, swap_space, cpu_offload_gb, ..., have no counterpart).
"""
import threading
import time
from contextlib import contextmanager

# vLLM's buckets (seconds)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)
N_BUCKETS = (1, 2, 5, 10, 20)
# vLLM's iteration_tokens_total buckets without CUDA graphs (build_cudagraph_buckets' enforce_eager list, its 8096
# too); with them, its capture sizes: ours the engine's graph batch sizes (--cuda-graphs)
ITERATION_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8096)
ITERATION_HELP = ("Histogram of number of tokens per engine_step: the prompts of the rows (choices) that drew "
                  "their first token in it and the rows' new tokens (--max-batch 1: a request's step; echo with "
                  "max_tokens 0: each choice's prompt and one token, vLLM's step of it; a beam search: its beams' "
                  "prompts and tokens at once).")
REASONS = ("stop", "length", "abort", "error")
PHASES = ("queue", "prefill", "decode", "inference")
HISTOGRAMS = {  # name: (buckets, help)
    "time_to_first_token_seconds": (TTFT_BUCKETS, "Histogram of time to first token in seconds (from the request's "
                                                  "prompt reaching the model's queue)."),
    "time_per_output_token_seconds": (TPOT_BUCKETS, "Histogram of time per output token in seconds (each gap "
                                                    "between a choice's decode steps: inter-token latency). "
                                                    "DEPRECATED: Use inter_token_latency_seconds instead."),
    # vLLM 0.11's name for the one above (whose own it hides from 0.12 on): both, for dashboards of either
    "inter_token_latency_seconds": (TPOT_BUCKETS, "Histogram of inter-token latency in seconds (each gap between a "
                                                  "choice's decode steps, observed at the step)."),
    "e2e_request_latency_seconds": (E2E_BUCKETS, "Histogram of end to end request latency in seconds (each choice "
                                                 "of a prompt, whatever ended them, to its own last token where "
                                                 "it ended before its siblings)."),
    # vLLM's per-phase ones (vllm/v1/metrics/stats.py, update_from_finished_request): queue = first scheduled -
    # queued, prefill = first token - first scheduled, decode = last token - first token, inference = last token -
    # first scheduled (prefill + decode), each observed once a request ends, if it got that far
    "request_queue_time_seconds": (E2E_BUCKETS, "Histogram of time spent in WAITING phase for request: from its "
                                                "queueing to its first admission (--max-batch 1: to taking the "
                                                "model's lock)."),
    "request_prefill_time_seconds": (E2E_BUCKETS, "Histogram of time spent in PREFILL phase for request: from its "
                                                  "first admission to its first token (a preemption's recompute "
                                                  "counts here or in decode, as vLLM's)."),
    "request_decode_time_seconds": (E2E_BUCKETS, "Histogram of time spent in DECODE phase for request: from its "
                                                 "first token to its last (each choice's)."),
    "request_inference_time_seconds": (E2E_BUCKETS, "Histogram of time spent in RUNNING phase for request: from its "
                                                    "first admission to its last token (prefill + decode)."),
    "request_time_per_output_token_seconds": (TPOT_BUCKETS, "Histogram of time_per_output_token_seconds per "
                                                            "request: a choice's decode time / (its tokens - 1), 0 for "
                                                            "one token."),
    "request_params_n": (N_BUCKETS, "Histogram of the n request parameter."),
}
TOKEN_HISTOGRAMS = {  # name: help; buckets 1, 2, 5, 10, ... up to the context length (vLLM's build_1_2_5_buckets)
    "request_prompt_tokens": "Number of prefill tokens processed: a choice's prompt tokens, when its request ends "
                             "with its choices (not aborted or failed).",
    "request_generation_tokens": "Number of generation tokens processed: a choice's completion tokens, when its "
                                 "request ends with its choices (not aborted or failed).",
    "request_max_num_generation_tokens": "Histogram of maximum number of requested generation tokens: the most "
                                         "completion tokens of a request's n choices, when it ends with its choices "
                                         "(not aborted or failed).",
    "request_params_max_tokens": "Histogram of the max_tokens request parameter (each choice's: the prompt's "
                                 "budget, vLLM's default where none was asked).",
}


def buckets_1_2_5(most: int) -> tuple:
    """1, 2, 5, 10, 20, 50, ... up to most (vLLM's build_1_2_5_buckets)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > most:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


class Histogram:
    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, x: float):
        for i, le in enumerate(self.buckets):
            if x <= le:
                self.counts[i] += 1
                break
        self.sum += x
        self.count += 1


def escape(value: str) -> str:
    """A label value as Prometheus' text format writes it."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def number(x) -> str:
    return repr(float(x)) if isinstance(x, float) else str(x)


class Metrics:
    """The server's counters and histograms (under self.lock) and its /metrics text (render)."""

    def __init__(self, model_name: str, max_model_len: int, engine=None):
        self.model_name, self.engine = model_name, engine
        self.lock = threading.Lock()
        self.prompt_tokens = self.generation_tokens = 0
        self.finished = dict.fromkeys(REASONS, 0)
        self.hist = {name: Histogram(b) for name, (b, _) in HISTOGRAMS.items()}
        self.hist.update({name: Histogram(buckets_1_2_5(max_model_len)) for name in TOKEN_HISTOGRAMS})
        graphs = engine is not None and getattr(engine, "cuda_graph", False)
        self.hist["iteration_tokens_total"] = Histogram(tuple(engine.buckets) if graphs else ITERATION_BUCKETS)
        if engine is not None:
            engine.on_iteration = self.iteration  # (the engine's thread, after each step)
        # requests holding, and waiting for, the model outside an engine batch (no engine: the model's lock; with one, a
        # beam search's Engine.call)
        self.running = self.waiting = 0

    def count(self, waiting: int = 0, running: int = 0):
        """The requests outside an engine batch (gauges' own count) waiting for the model and holding it, moved."""
        with self.lock:
            self.waiting += waiting
            self.running += running

    @contextmanager
    def holding(self):
        """A request counted waiting (count(waiting=1)) holds the model until the block ends."""
        self.count(waiting=-1, running=1)
        try:
            yield
        finally:
            self.count(running=-1)

    def iteration(self, tokens: int):
        """An engine step's (no engine: a request's step's) tokens, vLLM's iteration_tokens_total."""
        with self.lock:
            self.hist["iteration_tokens_total"].observe(tokens)

    def request(self, n: int = 1, max_tokens=None) -> "Timing":
        """A request's clock: n choices (vLLM's n child requests), max_tokens its budget (None: a pooling request,
        no sampling parameters to count)."""
        return Timing(self, n, max_tokens)

    def gauges(self):
        """(running, waiting, KV-cache usage or None) now. With the engine, its requests and those holding or
        waiting for the model outside its batch (a beam search's Engine.call: Model.called; its own count here)."""
        e = self.engine
        with self.lock:
            running, waiting = self.running, self.waiting
        if e is None:
            return running, waiting, None
        with e.cond:  # (the engine frees slots and pages under it)
            if e.paged:
                usage = (e.cache.num_pages - e.cache.num_free) / e.cache.num_pages
            else:
                usage = (e.max_batch - len(e.free)) / e.max_batch
            return running + len(e.running), waiting + len(e.waiting), usage

    def lora_info(self):
        """(max_lora, waiting adapters, running adapters: names, comma-joined) now, or None: no engine serving
        adapters (vLLM's gauge is there only with --enable-lora)."""
        e = self.engine
        if e is None or getattr(e, "adapters", None) is None:
            return None
        with e.cond:

            def used(requests):  # (each adapter once, in order of appearance: vLLM's dict keys)
                return ",".join(dict.fromkeys(e.adapters.names[r.adapter] for r in requests if r.adapter >= 0))
            # (max_loras None: every adapter served, as many as are loaded now)
            most = len(e.adapters.served) if e.max_loras is None else e.max_loras
            return most, used(e.waiting), used(e.running)

    def cache_info(self):
        """vLLM's cache_config_info labels, {name: str}, or None: no paged cache (--max-batch 1, or the engine's rows
        without --kv-cache-pages: no blocks to tell)."""
        e = self.engine
        if e is None or not e.paged:
            return None
        return {"block_size": str(e.cache.page_size), "num_gpu_blocks": str(e.cache.num_pages),
                "cache_dtype": str(e.kv_cache_dtype), "enable_prefix_caching": str(bool(e.prefix_caching))}

    def render(self) -> str:
        # (vLLM's engine label: its data-parallel engine's index, "0" for its one engine; ours is always one)
        label = f'model_name="{escape(self.model_name)}",engine="0"'
        running, waiting, usage = self.gauges()
        lora = self.lora_info()
        stats = self.engine.stats if self.engine is not None else {"prompt_tokens": 0, "cached_prompt_tokens": 0,
                                                                   "preemptions": 0}
        one = "" if self.engine is not None else " (--max-batch 1: no engine, the requests take the model in turn)"
        out = []

        def family(name, kind, text, samples):
            out.append(f"# HELP tritongpt:{name} {text}")
            out.append(f"# TYPE tritongpt:{name} {kind}")
            for suffix, labels, value in samples:
                out.append(f"tritongpt:{name}{suffix}{{{labels}}} {number(value)}")

        family("num_requests_running", "gauge", "Number of requests decoding now" + one + ".", [("", label, running)])
        family("num_requests_waiting", "gauge", "Number of requests waiting for the model" + one + ".",
               [("", label, waiting)])
        if usage is not None:
            family("kv_cache_usage_perc", "gauge", "KV-cache usage, 1 = full: the share of pages held (a paged cache; "
                   "cached pages no request holds count as free) or of rows (slots) held.", [("", label, usage)])
        if lora is not None:
            family("lora_requests_info", "gauge", "Running stats on lora requests: the adapters of the waiting and of "
                   "the running requests, and max_lora (--max-loras); the value the time they were read (seconds "
                   "since the epoch).", [("", f'model_name="{escape(self.model_name)}",max_lora="{lora[0]}",'
                                              f'waiting_lora_adapters="{escape(lora[1])}",'
                                              f'running_lora_adapters="{escape(lora[2])}"', time.time())])
        cache = self.cache_info()
        if cache is not None:
            family("cache_config_info", "gauge", "Information of the LLMEngine CacheConfig: the paged KV cache's "
                   "block_size (--kv-page-size), num_gpu_blocks (--kv-cache-pages), cache_dtype (--kv-cache-dtype) "
                   "and enable_prefix_caching (vLLM's are strings: True/False); the value 1.",
                   [("", label + "".join(f',{k}="{escape(v)}"' for k, v in cache.items()), 1)])
        family("prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache (0 unless "
               "--enable-prefix-caching).", [("", label, stats["prompt_tokens"])])
        family("prefix_cache_hits_total", "counter", "Prompt tokens read from the prefix cache (0 unless "
               "--enable-prefix-caching).", [("", label, stats["cached_prompt_tokens"])])
        family("num_preemptions_total", "counter", "Cumulative number of preemptions from the engine (a running "
               "request's KV pages taken back when the paged cache ran short; it is recomputed later).",
               [("", label, stats["preemptions"])])
        if "spec_decode_num_drafts" in stats:  # (an engine with --speculative-config: vLLM's spec decode counters)
            family("spec_decode_num_drafts_total", "counter", "Number of spec decoding drafts (a row's proposals a "
                   "step).", [("", label, stats["spec_decode_num_drafts"])])
            family("spec_decode_num_draft_tokens_total", "counter", "Number of draft tokens.",
                   [("", label, stats["spec_decode_num_draft_tokens"])])
            family("spec_decode_num_accepted_tokens_total", "counter", "Number of accepted tokens.",
                   [("", label, stats["spec_decode_num_accepted_tokens"])])
        with self.lock:
            family("prompt_tokens_total", "counter", "Number of prompt tokens processed (a prompt's once a choice, as "
                   "vLLM's child requests each prefill it, when its request ends; an aborted or failed one's once "
                   "it drew its first token).",
                   [("", label, self.prompt_tokens)])
            family("generation_tokens_total", "counter", "Number of generation tokens processed (the choices' "
                   "completion tokens, when their request ends; an aborted or failed request's those drawn until it "
                   "stopped; a prefill-only one's 1 a choice, vLLM's drawn and dropped token).",
                   [("", label, self.generation_tokens)])
            family("request_success_total", "counter", "Count of finished choices by finish reason (abort: the "
                   "client left; error: the server failed it).",
                   [("", f'{label},finished_reason="{r}"', self.finished[r]) for r in REASONS])
            helps = {**{name: text for name, (_, text) in HISTOGRAMS.items()}, **TOKEN_HISTOGRAMS,
                     "iteration_tokens_total": ITERATION_HELP}
            for name, text in helps.items():
                h, cum, samples = self.hist[name], 0, []
                for le, c in zip(h.buckets, h.counts):
                    cum += c
                    samples.append(("_bucket", f'{label},le="{number(float(le))}"', cum))
                samples += [("_bucket", f'{label},le="+Inf"', h.count), ("_sum", label, h.sum),
                            ("_count", label, h.count)]
                family(name, "histogram", text, samples)
        return "\n".join(out) + "\n"


class Timing:
    """One request's clock, in its handler's thread: tokens() at each step's tokens, end() once, with what ended it.
    The phases' stamps (queued, scheduled, first and last token: time.monotonic) are its own with no engine
    (scheduled: set by the caller when it takes the model's lock), the engine Request's (end(stamps=request))."""

    def __init__(self, metrics, n: int = 1, max_tokens=None):
        self.metrics, self.n, self.max_tokens = metrics, n, max_tokens
        self.start = self.last = time.monotonic()
        self.scheduled = self.first = self.step = None  # (step: the clock at the last step's first token)
        self.steps = 0
        # each choice's last token's clock (vLLM's child request's last_token_ts): its e2e, decode and inference time
        # end there (end())
        self.own = [None] * n

    def tokens(self, same_step: bool = False, alive=None):
        """same_step: a token of the step before's (a speculative step's after its first): counted in steps (per
        token, as vLLM's per-request time per output token), no inter-token gap of its own (vLLM's: a step's).
        alive: the choices (indices) still drawing at this token, None all n: not those that ended before it (on an
        end token, a stop string). The step's gap is observed now, once for each of them, as vLLM's
        IterationStats.update_from_output does at each engine step for each child request still running, so a
        dashboard sees a long stream's gaps as it goes, not once it ends."""
        now = time.monotonic()
        alive = range(self.n) if alive is None else alive
        if self.steps == 0:
            self.first = self.step = now
            with self.metrics.lock:
                for _ in range(self.n):  # (each choice's first token: a child request's, in the same step)
                    self.metrics.hist["time_to_first_token_seconds"].observe(now - self.start)
        elif not same_step:
            gap, self.step = now - self.step, now
            with self.metrics.lock:
                for _ in alive:
                    self.metrics.hist["time_per_output_token_seconds"].observe(gap)
                    self.metrics.hist["inter_token_latency_seconds"].observe(gap)
        for i in alive:
            self.own[i] = now
        self.last, self.steps = now, self.steps + 1

    def phases(self, stamps=None) -> dict:
        """{phase: seconds} of PHASES as far as the request got (vLLM's definitions: HISTOGRAMS), plus the per
        request time per output token. stamps: an engine Request (its queued, scheduled, first_token, last_token),
        None: this clock's own."""
        if stamps is not None:
            queued, scheduled, first, last = stamps.queued, stamps.scheduled, stamps.first_token, stamps.last_token
        else:
            queued, scheduled, first, last = self.start, self.scheduled, self.first, self.last
        if scheduled is None:  # never admitted (aborted or failed while waiting): no phase to time
            return {}
        out = {"queue": scheduled - queued}
        if first is not None:
            out.update(prefill=first - scheduled, decode=last - first, inference=last - scheduled)
            out["time_per_output_token"] = out["decode"] / (self.steps - 1) if self.steps > 1 else 0.0
        return out

    def end(self, reasons, prompt_tokens: int = 0, generation_tokens=(), stamps=None):
        """reasons: a finish reason a choice. prompt_tokens: the prompt's; generation_tokens: each choice's tokens
        drawn (an aborted or failed request's so far; none where unknown: each taken as the request's steps, none
        counted). As vLLM counts each engine step's tokens as they are made, an aborted or failed request's count
        too, its prompt once it drew its first token; the token histograms only a request that ended with its
        choices. stamps: Timing.phases'. Each choice counts as one of vLLM's child requests (the module's
        docstring): its e2e, decode and inference time end with its own last token (its gaps were observed at its
        steps: tokens())."""
        m, phases, n = self.metrics, self.phases(stamps), len(reasons)
        counts = list(generation_tokens)
        done = all(r in ("stop", "length") for r in reasons)
        with m.lock:
            e2e = time.monotonic() - self.start
            for i, r in enumerate(reasons):  # (vLLM's finished_requests: one a child request)
                # the choice's tokens (a beam search's come in one step), and how long before the request's last
                # token its own last came (0 for the longest): its clocks stop there
                k = min(counts[i], self.steps) if counts else self.steps
                early = self.last - self.own[i] if self.own[i] is not None else 0.0
                m.hist["e2e_request_latency_seconds"].observe(e2e - early)
                own = dict(phases)
                if "decode" in own:  # (the engine's clocks less the handler's: never below 0)
                    own["decode"] = max(own["decode"] - early, 0.0)
                    own["inference"] = own["prefill"] + own["decode"]
                    own["time_per_output_token"] = own["decode"] / (k - 1) if k > 1 else 0.0
                for phase, seconds in own.items():
                    m.hist[f"request_{phase}_time_seconds" if phase in PHASES else
                           "request_time_per_output_token_seconds"].observe(seconds)
                m.finished[r] += 1
                if self.max_tokens:  # (vLLM's: a child's max_tokens, none for a pooling request)
                    m.hist["request_params_max_tokens"].observe(self.max_tokens)
                if done:
                    m.hist["request_prompt_tokens"].observe(prompt_tokens)
                    m.hist["request_generation_tokens"].observe(counts[i] if counts else 0)
            # each child prefills its prompt (vLLM's num_prompt_tokens: the prompt's length at a child's first token;
            # a pooling request's, which draws none, once it ends)
            if done or self.steps:
                m.prompt_tokens += prompt_tokens * n
            m.generation_tokens += sum(counts)
            if self.max_tokens is not None:  # (vLLM's ParentRequest.observe_finished_request: once the n children end)
                m.hist["request_params_n"].observe(n)
                if done:
                    m.hist["request_max_num_generation_tokens"].observe(max(counts or [0]))
