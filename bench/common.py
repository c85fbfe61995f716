"""What every benchmark shares: timers, FLOP/byte formulas, result rows, targets, environment.

Rules this module enforces so that a number in a results file means one thing:
- GPU time is `triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])`
  (median ms, then the 20th and 80th percentiles), after the function ran a few times so
  that compilation and autotuning are not timed. CPU time is the median of time.perf_counter.
- Throughput is computed from formulas here, never typed in: bytes for memory-bound ops
  (LayerNorm, the cross-entropy on given logits), FLOPs for matmul-bound ops (MLP, attention,
  the LM head + loss, a training step).
- A row whose provider could not run says why: status "skipped: ..." or "failed: ...".
"""
import datetime as _dt
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SCHEMA = "tritongpt-bench/1"
MODES = ("fwd", "bwd", "fwd+bwd")
QUANTILES = [0.5, 0.2, 0.8]


# -- FLOP and byte formulas ---------------------------------------------------------------------
def matmul_flops(m: int, n: int, k: int) -> int:
    """An [m, k] @ [k, n] product: m*n dot products of length k, a multiply and an add each."""
    return 2 * m * n * k


def mlp_flops(m: int, c: int, mode: str, hidden: int | None = None) -> int:
    """GELU-MLP on m rows: x @ W1^T ([c] -> [4c]) then @ W2^T ([4c] -> [c]).

    Backward does two matmuls per forward matmul (grad of the input, grad of the weight), so
    it is 2x the forward. Bias adds and the GELU are elementwise and left out.
    """
    h = hidden or 4 * c
    fwd = matmul_flops(m, h, c) + matmul_flops(m, c, h)
    return {"fwd": fwd, "bwd": 2 * fwd, "fwd+bwd": 3 * fwd}[_check_mode(mode)]


def swiglu_flops(m: int, c: int, hidden: int, mode: str) -> int:
    """SwiGLU MLP on m rows: x @ W_gate^T and x @ W_up^T ([c] -> [hidden]), then @ W_down^T
    ([hidden] -> [c]); backward 2x forward, as mlp_flops. silu(g) * u is elementwise, left out."""
    fwd = 2 * matmul_flops(m, hidden, c) + matmul_flops(m, c, hidden)
    return {"fwd": fwd, "bwd": 2 * fwd, "fwd+bwd": 3 * fwd}[_check_mode(mode)]


def attention_flops(b: int, h: int, tq: int, tk: int, d: int, causal: bool, mode: str) -> float:
    """Attention core: S = Q K^T and O = P V, 2*Tq*Tk*D FLOPs each, per (batch, head).

    Causal masking (bottom-right aligned, as the model's KV-cache decode; Tq <= Tk) counts only
    the visible pairs, Tq*Tk - Tq^2/2: for Tq = Tk half the score matrix, FlashAttention's
    convention. Backward is counted as 2.5x forward (five matmuls against two), as FlashAttention's
    benchmarks do.
    """
    if causal and tq > tk:
        raise ValueError(f"causal attention needs tq <= tk (queries are the last tq of tk positions), "
                         f"got tq={tq}, tk={tk}")
    pairs = tq * tk - tq * tq / 2 if causal else tq * tk
    fwd = 4 * b * h * pairs * d
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[_check_mode(mode)]


def document_attention_flops(b: int, h: int, lengths, d: int, mode: str) -> float:
    """Attention over packed documents: each document's own causal attention, nothing across
    them (the pairs a document mask leaves), counted as attention_flops counts one sequence."""
    return sum(attention_flops(b, h, n, n, d, True, mode) for n in lengths)


def window_attention_flops(b: int, h: int, t: int, window: int, d: int, mode: str) -> float:
    """Local causal attention, each query over the last `window` positions: the visible pairs
    T W - W^2 / 2 (the causal count's convention: T^2 / 2 at W = T), counted as attention_flops."""
    if window >= t:
        return attention_flops(b, h, t, t, d, True, mode)
    return attention_flops(b, h, 1, 1, d, False, mode) * (t * window - window * window / 2)


def layernorm_bytes(m: int, n: int, elem: int, mode: str, param_elem: int | None = None, bias: bool = True) -> int:
    """The least memory traffic a LayerNorm over [m, n] can do (statistics not counted).

    forward reads x, weight, bias and writes y; backward reads x, dy, weight and writes dx,
    dweight, dbias. bias False: RMSNorm's, which has no bias to read or gradient to write.
    """
    pe = elem if param_elem is None else param_elem
    params = 2 if bias else 1
    fwd = 2 * m * n * elem + params * n * pe
    bwd = 3 * m * n * elem + (params + 1) * n * pe
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[_check_mode(mode)]


def add_layernorm_bytes(m: int, n: int, stream_elem: int, delta_elem: int, mode: str, param_elem: int = 4,
                        bias: bool = True) -> int:
    """The least memory traffic of s = x + delta, y = LayerNorm(s) over [m, n], x and s in the
    residual stream's dtype (stream_elem bytes), delta in the sublayer's (statistics not counted).

    forward reads x, delta, weight, bias and writes s, y; backward reads dy, ds (s's gradient from
    its other uses), s and weight, and writes the gradients of x and delta, dweight and dbias.
    bias False: RMSNorm's (add_rmsnorm).
    """
    params = 2 if bias else 1
    fwd = m * n * (3 * stream_elem + delta_elem) + params * n * param_elem
    bwd = m * n * (4 * stream_elem + delta_elem) + (params + 1) * n * param_elem
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[_check_mode(mode)]


def rope_bytes(tokens: int, heads: int, head_dim: int, elem: int, mode: str, kv_heads: int | None = None) -> int:
    """The least memory traffic of RoPE on q and k ([tokens, heads, head_dim] each; k kv_heads wide when given):
    forward reads both and writes both rotated; backward the same for their gradients (positions, and cos/sin or
    their table, not counted). Under partial rotary the pass-through columns are read and written too."""
    one = 2 * tokens * (heads + (heads if kv_heads is None else kv_heads)) * head_dim * elem
    return {"fwd": one, "bwd": one, "fwd+bwd": 2 * one}[_check_mode(mode)]


def lm_head_flops(n: int, c: int, v: int, mode: str) -> int:
    """LM head on n rows: [n, c] @ [c, v] forward; backward two such products (dhidden, dweight).
    The softmax is elementwise and left out."""
    fwd = matmul_flops(n, v, c)
    return {"fwd": fwd, "bwd": 2 * fwd, "fwd+bwd": 3 * fwd}[_check_mode(mode)]


def cross_entropy_bytes(n: int, v: int, elem: int, mode: str) -> int:
    """Memory traffic of a loss over [n, v] logits that saves a few floats per row for backward.

    forward reads the logits; backward reads them again and writes the gradient. (Per-row
    targets, losses, maxima and log-sums are not counted.)
    """
    fwd = n * v * elem
    bwd = 2 * n * v * elem
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[_check_mode(mode)]


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


# -- timers ---------------------------------------------------------------------------------------
class GpuTimer:
    """triton.testing.do_bench with the team's settings; peak memory from the CUDA allocator.

    cuda_graphs: time each call replayed from a CUDA graph (triton.testing.do_bench_cudagraph) instead: the
    device's time without the host's, for rows whose eager time is the host's (small ops, Triton's and our
    Python per launch). A call that cannot be captured (a sync, a CPU tensor) fails its row."""

    device = torch.device("cuda")

    def __init__(self, warmup_ms: int = 25, rep_ms: int = 100, warm_calls: int = 3, cuda_graphs: bool = False):
        self.warmup_ms, self.rep_ms, self.warm_calls, self.cuda_graphs = warmup_ms, rep_ms, warm_calls, cuda_graphs

    def sync(self):
        torch.cuda.synchronize()

    def bench(self, fn, grad_to_none=None):
        """(median, p20, p80) in ms."""
        import triton.testing

        for _ in range(self.warm_calls):  # compile, autotune and allocate outside the timing (and the capture)
            fn()
        self.sync()
        if self.cuda_graphs:
            # the capture runs each autotuned kernel's pick: the warm calls above made every pick
            med, p20, p80 = triton.testing.do_bench_cudagraph(fn, rep=self.rep_ms, grad_to_none=grad_to_none,
                                                              quantiles=QUANTILES)
        else:
            med, p20, p80 = triton.testing.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms,
                                                    grad_to_none=grad_to_none, quantiles=QUANTILES)
        return float(med), float(p20), float(p80)

    def host_ms(self, fn, grad_to_none=None, calls: int = 10) -> float:
        """Host time per call while the GPU runs behind (no sync between calls): Python, dispatch and
        launch cost. A row whose host time reaches its GPU median is host-bound: do_bench's events then
        time the CPU, not the kernels (the H200 run's Triton rows at small sizes). A call that syncs
        waits for the GPU here, so its host time includes the GPU's."""
        self.sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            for t in grad_to_none or ():
                t.grad = None
            fn()
        host = (time.perf_counter() - t0) * 1e3 / calls
        self.sync()
        return host

    def peak_bytes(self, fn):
        """Peak allocation while fn runs, above what was allocated before (inputs, weights)."""
        self.sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        self.sync()
        return int(torch.cuda.max_memory_allocated() - base)

    def cleanup(self, full: bool = False):
        """Give cached blocks back; `full` also runs the cycle collector (0.1-0.3 s a call, so
        only after compiled providers and failures, which leave reference cycles)."""
        if full:
            import gc

            gc.collect()
        torch.cuda.empty_cache()


class CpuTimer:
    """Median of time.perf_counter over `reps` calls after untimed ones: at least `warm_calls`,
    and (when warm_calls > 0) more until `warm_s` has passed, at most 50. A training step's first
    calls allocate the optimizer state and the allocator's pools, and wake the OpenMP threads:
    several times slower than the rest, which one warm-up call did not absorb."""

    device = torch.device("cpu")

    def __init__(self, reps: int = 5, warm_calls: int = 1, warm_s: float = 0.5):
        self.reps, self.warm_calls, self.warm_s = reps, warm_calls, warm_s

    def sync(self):
        pass

    def bench(self, fn, grad_to_none=None):
        end, n = time.perf_counter() + self.warm_s, 0
        while n < self.warm_calls or (self.warm_calls and n < 50 and time.perf_counter() < end):
            fn()
            n += 1
        times = []
        for _ in range(self.reps):
            for t in grad_to_none or ():
                t.grad = None
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return median_quantiles(times)

    def peak_bytes(self, fn):
        return None  # the CPU allocator keeps no peak statistics

    def cleanup(self, full: bool = False):
        if full:
            import gc

            gc.collect()


def median_quantiles(times_ms):
    """(median, p20, p80) of a list of timings, in the order do_bench returns them."""
    if not times_ms:
        raise ValueError("no timings")
    xs = sorted(times_ms)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=10, method="inclusive")  # deciles: q[1] = p20, q[7] = p80
    return statistics.median(xs), q[1], q[7]


def time_cpu(fn, reps: int = 5, warm_calls: int = 1):
    return CpuTimer(reps, warm_calls).bench(fn)


# -- time budget ----------------------------------------------------------------------------------
def check_out_dir(path) -> None:
    """--out before any work, so a run does not measure for minutes and then fail to write:
    the folder is made now (a file of that name, or a place it cannot be made, is a UserError)."""
    from tritongpt.errors import UserError

    if Path(path).exists() and not Path(path).is_dir():
        raise UserError(f"--out {path} is a file, not a folder")
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {path}: cannot make the folder ({e.strerror or e})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"--out {path}: the folder is not writable")


class Budget:
    """A wall-clock deadline. Work that would start after it is recorded as skipped, not run.

    interrupt() (Ctrl-C, or SIGINT from a session's hard time limit) expires it, and the budget
    it was cut from, at once: the rows measured so far are still written, the rest skipped.
    """

    def __init__(self, seconds: float | None, parent: "Budget | None" = None):
        self.start = time.monotonic()
        self.deadline = None if seconds is None else self.start + seconds
        self.parent = parent
        self.interrupted = False

    def interrupt(self) -> None:
        self.interrupted = True
        if self.parent is not None:
            self.parent.interrupt()

    def _interrupted(self) -> bool:
        """Here or in the budget it was cut from (interrupt() marks upwards only)."""
        return self.interrupted or (self.parent is not None and self.parent._interrupted())

    def expired(self) -> bool:
        return self._interrupted() or (self.deadline is not None and time.monotonic() >= self.deadline)

    def skip_reason(self) -> str:
        """The status of work not started because the budget expired."""
        return "skipped: interrupted (Ctrl-C or a hard time limit)" if self._interrupted() else \
            "skipped: time budget (--max-minutes)"

    def remaining(self) -> float:
        return float("inf") if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def sub(self, fraction: float) -> "Budget":
        """A budget ending `fraction` of the remaining time from now."""
        if self.deadline is None:
            return Budget(None, parent=self)
        return Budget(max(0.0, self.deadline - time.monotonic()) * fraction, parent=self)


# -- result rows -----------------------------------------------------------------------------------
def make_row(section: str, op: str, provider: str, config: dict, mode: str | None = None,
             status: str = "ok", **metrics) -> dict:
    row = {"section": section, "op": op, "mode": mode, "provider": provider,
           "config": dict(config), "status": status}
    row.update(metrics)
    return row


def is_ok(row: dict) -> bool:
    return row.get("status") == "ok"


def reason_of(exc: BaseException, limit: int = 160) -> str:
    """One line naming the exception: the kind, then the first line of its message."""
    lines = str(exc).strip().splitlines()
    first = lines[0] if lines else ""
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def find_row(rows, **match):
    """The first row whose fields (and config fields, given as config={...}) equal `match`."""
    config = match.pop("config", {})
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()) and \
                all(row.get("config", {}).get(k) == v for k, v in config.items()):
            return row
    return None


# -- targets ------------------------------------------------------------------------------------------
def target(name: str, config: str, value, threshold: float, op: str = ">=", unit: str = "",
           note: str = "") -> dict:
    """A PASS/FAIL line. value None (an input row was missing, skipped or failed) gives "N/A"."""
    if op not in (">=", "<="):
        raise ValueError(f"target op must be '>=' or '<=', got {op!r}")
    if value is None or (isinstance(value, float) and value != value):  # None or NaN
        status = "N/A"
        value = None
    else:
        status = "PASS" if (value >= threshold if op == ">=" else value <= threshold) else "FAIL"
    return {"target": name, "config": config, "value": value, "op": op, "threshold": threshold,
            "unit": unit, "status": status, "note": note}


def ratio(a, b):
    """a / b, or None when either is missing or b is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b


# -- environment --------------------------------------------------------------------------------------
def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_slug(cuda: bool | None = None) -> str:
    """Folder name for a machine's results: the GPU's name, or cpu-<processor name>."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda:
        return slugify(torch.cuda.get_device_name(0))
    return "cpu-" + slugify(cpu_name())


def git_commit(repo_dir=None) -> str:
    """HEAD of the checkout, with "+dirty" when tracked files outside bench/results differ from
    it (the figures then come from code no commit holds); where there is no .git (a copied tree
    on a device machine), the commit the caller names in TRITONGPT_GIT_COMMIT
    (bench/gpu_session.sh passes it on)."""
    repo_dir = repo_dir or Path(__file__).resolve().parent.parent
    fallback = os.environ.get("TRITONGPT_GIT_COMMIT", "").strip() or "unknown"
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True,
                             text=True, timeout=10)
        if out.returncode != 0 or not out.stdout.strip():
            return fallback
        # results written by an earlier run are not code: they do not make the tree dirty
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                 ":(exclude)bench/results"], cwd=repo_dir, capture_output=True, text=True,
                                timeout=10)
    except (OSError, subprocess.SubprocessError):
        return fallback
    return out.stdout.strip() + ("+dirty" if status.returncode == 0 and status.stdout.strip() else "")


def nvidia_driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:  # the kernel module's version file names the driver too
        text = Path("/proc/driver/nvidia/version").read_text()
        m = re.search(r"Kernel Module\s+([\d.]+)", text)
        if m:
            return m.group(1)
    except OSError:
        pass
    return "unknown"


def environment() -> dict:
    """Who measured: device, driver, CUDA, library versions, commit, time."""
    cuda = torch.cuda.is_available()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    env = {
        "device": torch.cuda.get_device_name(0) if cuda else cpu_name(),
        "device_slug": device_slug(cuda),
        "cuda_available": cuda,
        "driver": nvidia_driver() if cuda else None,
        "cuda_version": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        # Other work on the machine slows CPU timings; the 1-minute load average tells readers.
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env["gpu_memory_bytes"] = int(props.total_memory)
        env["gpu_sm_count"] = int(props.multi_processor_count)
        env["compute_capability"] = f"{props.major}.{props.minor}"
    # the other kernel libraries a provider times, by (env key, module, distribution): None if absent
    for key, module, dist in (("liger_kernel", "liger_kernel", "liger-kernel"),
                              ("flash_attn", "flash_attn", "flash-attn"),
                              ("flash_attn_3", "flash_attn_interface", "flash_attn_3")):
        env[key] = _installed_version(module, dist)
    return env


def _installed_version(module: str, dist: str) -> str | None:
    """dist's version when `module` imports, else None (a broken install is as good as none)."""
    from importlib.metadata import PackageNotFoundError, version

    if try_import(module)[0] is None:
        return None
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


# -- optional imports -----------------------------------------------------------------------------------
def try_import(dotted: str, attr: str | None = None):
    """(object, None) or (None, reason). Other engineers' modules may not exist yet."""
    import importlib

    try:
        mod = importlib.import_module(dotted)
        return (getattr(mod, attr) if attr else mod), None
    except Exception as e:  # ImportError, or a half-written module raising anything
        return None, f"{dotted}{'.' + attr if attr else ''} not importable ({reason_of(e, 120)})"


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))
