"""Helpers shared by every Triton kernel file: input checks, the interpreter switch, and how autotuned kernels
launch (`launch_tuned`: one search per key, then the pick; CUDA-graph captures) and timed choices are made.

Kernels call these before launching, so that bad input gives a one-line ValueError /
TypeError / RuntimeError naming the tensor, instead of a Triton crash or a wrong answer.
"""
import dataclasses
import functools
import math
import re
import warnings
import weakref

import numpy as np
import torch
import triton
import triton.language as tl

from tritongpt._env import triton_interpreting

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def autocast_dtype(device: torch.device):
    """The dtype autocast gives matmul inputs on device, or None where it is off (and on meta
    tensors, which autocast does not know: torch.is_autocast_enabled("meta") raises)."""
    if device.type == "meta" or not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def check_tensor(t, name: str, dtypes=FLOAT_DTYPES, device=None, ndim=None, shape=None):
    """Check one kernel input: a torch.Tensor of an allowed dtype (and device/ndim/shape if given)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; expected one of: {allowed}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name} is on {t.device}, expected {torch.device(device)}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t


def _first_mismatch(attr: str, tensors: dict):
    """The first named tensor (None skipped) and the first other one whose `attr` differs, or None."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    for name, t in items[1:]:
        if getattr(t, attr) != getattr(items[0][1], attr):
            return items[0], (name, t)
    return None


def first_order_only(kernel: str) -> None:
    """Called first in each kernel's backward. Grad mode is on there only for a double backward
    (create_graph=True: a Hessian, a gradient penalty), which the kernels do not give: their
    backward ops have no derivative of their own, and a gradient made in forward (the fused LM
    head's) is a constant there, so the second derivative would come out silently 0."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{kernel}: the Triton kernel has no second derivative (double backward, "
                           "create_graph=True); use the reference path (model.set_kernels('reference'))")


def no_func_transform(kernel: str, vmap_ok: bool = False) -> None:
    """Called first by each public kernel function: refuse torch.func's grad / jvp / vmap (jacrev,
    hessian, ...) with a message naming the kernel. Their autograd functions are not written for
    torch.func, whose own error ("must override the setup_context staticmethod") asks the caller
    to change the library. vmap_ok: the kernel is a plain custom op under vmap, which PyTorch
    runs once per batch element (flash_attention's forward: correct, with a warning)."""
    if torch.compiler.is_compiling():  # Dynamo cannot trace the check; compile reports its own
        return
    stack = getattr(torch._C._functorch, "get_interpreter_stack", lambda: None)()
    if not stack:
        return
    from torch._C._functorch import TransformType

    refused = {TransformType.Grad, TransformType.Jvp} | (set() if vmap_ok else {TransformType.Vmap})
    if any(level.key() in refused for level in stack):
        raise RuntimeError(f"{kernel}: the Triton kernel does not support torch.func transforms (grad, jvp, "
                           f"vmap, jacrev, ...); use torch.autograd (loss.backward(), torch.autograd.grad) "
                           "or the reference path (model.set_kernels('reference'))")


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def plain_eager(args) -> bool:
    """Whether a call with these arguments may run a custom op's Python function directly instead of
    going through the dispatcher: plain eager execution, no torch.compile tracing, no dispatch mode
    (FakeTensorMode, make_fx, export; make_fx(pre_dispatch=True)'s, which sits on a stack of its own),
    no torch.func transform, no torch.jit.trace (nor the ONNX exporter on it: it records dispatched ops
    only), no tensor subclass, no meta tensor, no tensor without dense storage of its own, though a plain
    torch.Tensor by type: C++ functionalization's wrapper, the legacy vmap's BatchedTensorImpl (the
    gradients of autograd.grad(is_grads_batched=True), autograd.functional.jacobian(vectorize=True)).

    The dispatcher's eager path (autograd_impl, redispatch below autograd, the torch._dynamo.disable
    wrapper around the Python kernel) cost ~20-40 us of host time per op call, more than some
    kernels take on a GPU (bench cpu's host-* rows). Inside the autograd Functions grad mode is
    already off, so the op's autograd layer adds nothing there; the registered op is what
    torch.compile and the other modes see, with its fake impl."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._dispatch_tls_is_dispatch_key_included(torch._C.DispatchKey.PreDispatch)
            or torch._C._are_functorch_transforms_active() or torch._C._get_tracing_state() is not None):
        return False
    return all(type(a) in _PLAIN_TENSORS and not a.is_meta and not torch._is_functional_tensor(a)
               and torch._C._dispatch_keys(a).has(torch._C.DispatchKey.Dense)
               for a in args if isinstance(a, torch.Tensor))


def custom_op(name: str, mutates_args=()):
    """torch.library.custom_op, plus two attributes on the op: .eager, the decorated function itself,
    and .call(*args), which runs that function when plain_eager(args) and the registered op otherwise
    (the autograd Functions' forwards and backwards call their ops through it)."""
    def wrap(fn):
        op = torch.library.custom_op(name, mutates_args=mutates_args)(fn)

        def call(*args):
            # a mutating op also bumps the mutated tensors' version counters: always dispatched
            return fn(*args) if not mutates_args and plain_eager(args) else op(*args)

        op.eager, op.call = fn, call
        return op

    return wrap


def as_rows(t):
    """[..., N] -> [M, N] with unit stride on the last dim (what the row kernels read); a copy only when needed."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def cdiv(a: int, b: int) -> int:
    """triton.cdiv for the launchers' host ints: triton's is a constexpr_function, which unwraps its
    arguments first, a few microseconds a call on every launch."""
    return -(a // -b)


@functools.lru_cache(maxsize=None)
def next_pow2(n: int) -> int:
    """triton.next_power_of_2, cached: the few sizes a run has, computed once (see cdiv)."""
    return triton.next_power_of_2(n)


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """The GPU's SM count, what the launchers size persistent or split grids by (LayerNorm, split-KV decode). The
    modules bind it as their own `_sm_count`, the name bench/compile_check.py and the tests patch."""
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=None)
def cuda_has_tma(device: torch.device) -> bool:
    """The GPU has TMA (Hopper's tensor memory accelerator, sm_90+): the tensor-descriptor loads may run.
    Bound as attention's and mlp's `_has_tma`, the name bench/compile_check.py patches."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def tma_scratch(size: int, alignment: int, stream):
    """Triton's allocator (triton.set_allocator) for the descriptors a TMA launch builds in global memory, 128 bytes
    each a program. A context variable: the launchers set it in the thread that launches (serve's engine thread)."""
    return torch.empty(size, device="cuda", dtype=torch.int8)


def tma_strides_ok(t: torch.Tensor, dims) -> bool:
    """t's base and its strides along dims 16-byte aligned (and positive): what a descriptor over t asks of the
    dims it steps through, the last one being contiguous."""
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(t.stride(d) > 0 and t.stride(d) * size % 16 == 0 for d in dims)


def check_same_device(**tensors):
    """All named tensors (None entries skipped) must live on one device."""
    bad = _first_mismatch("device", tensors)
    if bad:
        (n0, t0), (n, t) = bad
        raise ValueError(f"tensors on different devices: {n0} is on {t0.device}, {n} is on {t.device}")


def check_same_dtype(**tensors):
    """All named tensors (None entries skipped) must share one dtype."""
    bad = _first_mismatch("dtype", tensors)
    if bad:
        (n0, t0), (n, t) = bad
        raise TypeError(f"dtype mismatch: {n0} is {str(t0.dtype).replace('torch.', '')}, "
                        f"{n} is {str(t.dtype).replace('torch.', '')}")


def check_runnable(t, name: str = "input"):
    """Triton can run on this tensor's device: CUDA, or CPU with the interpreter switched on."""
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu":
        if not triton_interpreting():
            raise RuntimeError(
                f"{name} is a CPU tensor but Triton's interpreter is off: set TRITON_INTERPRET=1 "
                "before importing triton (or `import tritongpt` first)")
        if INTERPRETER_PROBLEM:
            raise RuntimeError(INTERPRETER_PROBLEM)
        return
    raise ValueError(f"{name} is on {t.device}; Triton kernels run on CUDA, or on CPU with TRITON_INTERPRET=1")


def device_name(device: torch.device) -> str:
    """A GPU's name and architecture ("NVIDIA T4 (sm_75)"), for messages about what it cannot run."""
    if device.type != "cuda":
        return f"{device} (Triton's interpreter)" if device.type == "cpu" else str(device)
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"


def out_of_resources(launch_name: str, tensors, error) -> RuntimeError:
    """The error for a launch whose every tile was too big for this GPU. Autotune skips a config
    that does not fit (OutOfResources) and launches the best of the rest; when none fits, it
    launches one anyway and Triton raises its own message, which names neither the kernel nor
    the input that asked for it (attention backward at head dim 256 in fp32 on a T4's 64 KB)."""
    inputs = ", ".join(f"{str(t.dtype).replace('torch.', '')} {list(t.shape)}" for t in tensors[:3])
    device = tensors[0].device if tensors else torch.device("cpu")
    return RuntimeError(
        f"{launch_name}: no tile of this Triton kernel fits {device_name(device)} for inputs {inputs} "
        f"({error}). A 16-bit dtype (--dtype bf16/fp16) halves each tile, a smaller head dim or width "
        "shrinks it; or use the reference path (--kernels reference, model.set_kernels('reference')).")


def on_tensor_device(launch):
    """Decorate a launcher so its kernels run on its first tensor argument's GPU, and a launch
    with no tile that fits the GPU says which kernel and which inputs (out_of_resources).

    Triton launches on the *current* CUDA device, not on the tensors' one: inputs on cuda:1
    while cuda:0 is current would run on the wrong GPU. DDP sets each rank's device, but a
    caller using several GPUs in one process need not.
    """
    stem = launch.__name__.strip("_").replace("launch", "").strip("_")  # _bwd_launch -> bwd
    part = {"fwd": "forward", "bwd": "backward", "mask": "dropout mask"}.get(stem, stem)
    name = ".".join(filter(None, [launch.__module__.rsplit(".", 1)[-1], part]))  # attention.backward

    @functools.wraps(launch)
    def run(*args, **kwargs):
        t = next((a for a in args if isinstance(a, torch.Tensor)), None)
        try:
            if t is not None and t.device.type == "cuda" and t.device.index != torch.cuda.current_device():
                with torch.cuda.device(t.device):
                    return launch(*args, **kwargs)
            return launch(*args, **kwargs)
        except triton.OutOfResources as e:  # the inputs are listed only then: nothing more on every launch
            raise out_of_resources(name, [a for a in args if isinstance(a, torch.Tensor)], e) from e

    return run


def _version(text: str) -> tuple:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:2])


def interpreter_problem(triton_version: str, numpy_version: str):
    """Why this Triton's interpreter cannot run the kernels with this NumPy, or None.

    Measured: Triton 3.6's interpreter turns 1-element arrays into Python ints (loop bounds),
    which NumPy 2.4 refuses ("only 0-dimensional arrays can be converted"); 3.6 with NumPy 2.3
    and 3.7 / 3.8 with NumPy 2.4 run the whole kernel suite.
    """
    if _version(triton_version) < (3, 7) and _version(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s CPU interpreter fails with NumPy {numpy_version}: "
                "install triton>=3.7 or numpy<2.4 to run the Triton kernels on the CPU")
    return None


# Decided once: check_runnable runs on every kernel call, also inside torch.compile's tracing.
INTERPRETER_PROBLEM = interpreter_problem(triton.__version__, np.__version__)


# Two Triton 3.8 interpreter bugs with bf16, which numpy lacks (the interpreter keeps it as raw
# uint16): tl.dot multiplies the bit patterns as integers, and fp32 -> bf16 casts truncate
# instead of rounding to nearest even (which doubles and biases the error a 1e-2 bf16 parity
# bound sees). Every kernel multiplies through dot() and narrows through cast() below; under
# the interpreter they upcast bf16 operands to fp32 (exact: tensor cores also accumulate bf16
# products in fp32) and round by hand. In compiled GPU code INTERPRETER_BF16_FIX is a
# compile-time False, so both are plain tl.dot / .to() (bench/compile_check.py's PTX
# fingerprints show the GPU binaries are the same with or without these helpers).
INTERPRETER_BF16_FIX = tl.constexpr(triton_interpreting())


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr):
    """tl.dot(a, b, acc) with fp32 accumulation; PRECISION "ieee" keeps fp32 inputs exact (no TF32)."""
    if INTERPRETER_BF16_FIX and a.dtype == tl.bfloat16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program pid over an [M, N] output in BLOCK_M x BLOCK_N tiles, in Triton's grouped order
    (03-matrix-multiplication): GROUP_M row-tiles sweep the column-tiles together, so the B tiles they share stay
    in L2 (the matmuls of kernels/mlp.py and kernels/quant.py)."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % (GROUP_M * num_n)) % group_size, (pid % (GROUP_M * num_n)) // group_size


@triton.jit
def cast(x, dtype: tl.constexpr):
    """x.to(dtype), rounding to nearest even into bf16 on the interpreter too."""
    if INTERPRETER_BF16_FIX and dtype == tl.bfloat16:
        x = x.to(tl.float32)
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))  # round half to even on the 16 dropped bits
        # a NaN whose payload is all ones below bit 16 would carry into the sign (0x7FFFFFFF -> -0.0), and one
        # with its payload below bit 16 alone would truncate to inf: any NaN is narrowed to a NaN (torch's 0x7FC0), as the
        # GPU keeps it one
        bits = tl.where(x != x, 0x7FC00000, bits)
        y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(dtype)
    return y


@triton.jit
def tanh(u):
    """tanh(u) in fp32 for the soft caps (cross-entropy's logits, attention's scores); tl has no tanh
    of its own that the interpreter runs too. 2 sigmoid(2u) - 1 is exact in the limits but off by
    ~1e-7 absolute near 0 (fp32's rounding of numbers near 1/2), which is all of a small u: a cap c
    far above the scores (u = s / c) multiplied that into an error of ~1e-7 c in every score (0.1
    at c = 1e6). Below |u| = 0.1 the Taylor series to u^7 instead (first term left out < 3e-10
    relative). Measured in the interpreter against float64: < 1e-6 relative for every u."""
    u2 = u * u
    near0 = u * (1.0 + u2 * (-1.0 / 3.0 + u2 * (2.0 / 15.0 + u2 * (-17.0 / 315.0))))
    return tl.where(tl.abs(u) < 0.1, near0, 2.0 * tl.sigmoid(2.0 * u) - 1.0)


def saved_tensor_bytes(fn, *args, exclude=()):
    """(bytes autograd saves for backward while running fn(*args), fn's output).

    Tensors sharing storage with one in `exclude` (e.g. weights, which live anyway) are not
    counted; each other storage is counted once, so views of one buffer are not double-counted.
    Custom autograd Functions count too: save_for_backward goes through the same hooks.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude if t is not None}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return int(sum(seen.values())), out


# Autotuned launchers by a reader's name ("attention.forward"), so a benchmark can say which
# tile each configuration ran with. Under the interpreter nothing here is tuned.
AUTOTUNED = {}


def autotuned(name: str, tuner):
    """Register a triton.autotune-wrapped kernel under name; returns it unchanged."""
    AUTOTUNED[name] = tuner
    return tuner


def _tuned_name(tuner) -> str:
    return next((n for n, t in AUTOTUNED.items() if t is tuner), getattr(getattr(tuner, "fn", None), "__name__", "?"))


def _launch_key(tuner, args, kwargs) -> tuple:
    """The key autotune searches per, as Triton's Autotuner.run makes it (the `key` arguments' values, then every
    tensor argument's dtype), built from positions found once rather than from a dict of all ~40 arguments."""
    where = tuner.__dict__.get("tritongpt_key_at")
    if where is None:
        where = tuner.__dict__["tritongpt_key_at"] = [(k, tuner.arg_names.index(k)) for k in tuner.keys]
    n = len(args)
    key = [args[i] if i < n else kwargs.get(k) for k, i in where]
    key += [a.dtype for a in args if isinstance(a, torch.Tensor)]
    key += [v.dtype for v in kwargs.values() if isinstance(v, torch.Tensor)]
    return tuple(key)


def _launch_untimed(kernel, grid, args, kwargs):
    """launch_tuned's launch of a key first met inside a CUDA-graph capture: the first config the kernel's prune
    leaves that this GPU builds and fits, untimed, with a warning; not kept. A config that does not fit is refused
    before anything is enqueued (OutOfResources), and autotune's search would have skipped it (it times it inf): so
    does this, or a GPU with less shared memory (sm_86/89's 99 KB: attention's first fp32 tiles) would fail the
    capture, and on_tensor_device would say no tile fits. When none does, the last config's error is raised."""
    from triton.compiler.errors import CompileTimeAssertionFailure
    from triton.runtime.errors import PTXASError

    prune = getattr(kernel, "early_config_prune", None)
    configs = prune(kernel.configs, dict(zip(kernel.arg_names, args)), **kwargs) if prune else kernel.configs
    for i, config in enumerate(configs):
        try:
            out = kernel.fn[grid](*args, **kwargs, **config.all_kwargs())
        except (triton.OutOfResources, CompileTimeAssertionFailure, PTXASError):  # those autotune's search skips
            if i == len(configs) - 1:
                raise
            continue
        warnings.warn(f"{_tuned_name(kernel)}: a shape first met inside a CUDA-graph capture, where autotune "
                      f"cannot time; launched untimed with {config}. Run one eager step before capturing to tune it.",
                      stacklevel=3)
        return out


def launch_tuned(kernel, grid, *args, **kwargs):
    """kernel[grid](*args, **kwargs) for a triton.autotune kernel, with the search's pick kept per key here.

    The first launch of a key runs Triton's autotuner as usual (it times the configs its prune keeps); later ones
    launch its pick on the kernel itself. Two reasons not to go through the Autotuner every time:
    - host time: Autotuner.run rebuilds its key from a dict of every argument on each call (attention's forward
      launcher took 34 us through it, 26 this way, on a 2-core Xeon with Triton's own launch stubbed), which a
      20 us kernel waits on;
    - CUDA graphs: a key first met inside a capture would be timed there, and timing synchronizes, which breaks
      the capture. There the kernel's first config left by its prune that this GPU fits is launched untimed,
      with a warning, and not kept: the next eager launch of the key runs the search (_launch_untimed).
    Anything else (the interpreter's plain JITFunction, a test's stand-in) is launched as kernel[grid]."""
    configs = getattr(kernel, "configs", None)
    if configs is None or not hasattr(kernel, "fn"):
        return kernel[grid](*args, **kwargs)
    if len(configs) == 1:
        return kernel.fn[grid](*args, **kwargs, **configs[0].all_kwargs())
    picks = kernel.__dict__.setdefault("tritongpt_picks", {})
    key = _launch_key(kernel, args, kwargs)
    config = picks.get(key)
    if config is None and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return _launch_untimed(kernel, grid, args, kwargs)
    if config is not None:  # (none of this package's configs has a pre_hook, which Autotuner.run would call)
        return kernel.fn[grid](*args, **kwargs, **config.all_kwargs())
    kernel.best_config = None
    out = kernel[grid](*args, **kwargs)
    if getattr(kernel, "best_config", None) is not None:  # the config this very launch ran with (Autotuner.run)
        picks[key] = kernel.best_config
    return out


def named_key(names, key) -> tuple:
    """Triton's autotune cache key (the `key` arguments' values, then the dtype of every tensor
    argument) as ({key name: value}, [dtype, ...]), each dtype once, in order."""
    key = list(key)
    dtypes = dict.fromkeys(str(v).replace("torch.", "") for v in key[len(names):])
    return dict(zip(names, key)), list(dtypes)


# Jobs with two implementations (kernels/mlp.py's plain products: the Triton matmul or cuBLAS) pick one by timing
# both on a key's first call: {name: (key names, {key: {"path": the pick, "<path>_ms": each one's time}})}.
TIMED = {}


def register_timed(name: str, key_names) -> dict:
    """Register a timed choice's name and key names; -> its {key: pick} dict, which callers look a key up in."""
    picks = {}
    TIMED[name] = (tuple(key_names), picks)
    return picks


def is_oom(e: BaseException) -> bool:
    """Out of memory: CUDA raises torch.OutOfMemoryError; the CPU allocator, cuBLAS and others a RuntimeError saying
    so. (train/common.py's trainers and the benchmarks use it too.)"""
    msg = str(e).lower()
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in msg or "can't allocate memory" in msg


def _gpu_median_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def timed_pick(picks: dict, key: tuple, candidates: dict, default: str, timer=None, note=None) -> str:
    """The fastest of candidates ({path: fn of no arguments}) for key: each is timed (the median of
    triton.testing.do_bench after a warm-up; timer replaces it in tests) and the pick is kept in picks, with
    every time, for the rest of the process. During a CUDA-graph capture nothing can be timed: default, not
    kept. note (e.g. "untimed: ..."): keep default with that note instead of timing. The timing runs on a shape's
    first call, often inside the first backward near peak memory, and do_bench allocates (its 256 MB L2 flush,
    the candidates' outputs): out of memory there (torch's error, or a library's RuntimeError saying so), default,
    kept with a note: timing again would run out again, every step."""
    if note is not None:
        picks[key] = {"path": default, "note": note}
        return default
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return default
    try:
        times = {path: (timer or _gpu_median_ms)(fn) for path, fn in candidates.items()}
    except RuntimeError as e:  # torch.OutOfMemoryError is one
        if not is_oom(e):
            raise
        picks[key] = {"path": default, "note": "untimed: out of memory while timing"}
        return default
    best = min(times, key=times.get)
    picks[key] = {"path": best, **{f"{path}_ms": round(float(ms), 5) for path, ms in times.items()}}
    return best


def autotune_choices() -> list:
    """Every configuration autotune has picked in this process, one dict per (kernel, key):
    {"kernel", "key": {key name: value}, "dtypes": [...], "config": {meta-parameters,
    num_warps, num_stages}}; then each timed choice (TIMED) with its "config" the pick and the times."""
    out = []
    for name, tuner in AUTOTUNED.items():
        cache = getattr(tuner, "cache", None)
        if not isinstance(cache, dict):
            continue  # a plain JITFunction (interpreter): no search ran
        for key, cfg in cache.items():
            values, dtypes = named_key(list(tuner.keys), key)
            config = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            out.append({"kernel": name, "key": values, "dtypes": dtypes, "config": config})
    for name, (names, picks) in TIMED.items():
        for key, pick in picks.items():
            values = {n: str(v).replace("torch.", "") for n, v in zip(names, key)}
            out.append({"kernel": name, "key": values, "dtypes": [], "config": dict(pick)})
    return out


# Below every @triton.jit function of this file on purpose: Triton's cache keys hash a device function's line
# number, so code added above them would make every kernel's compiled cache stale (a cold sm_90 build: minutes).
def skip_interpreter_repatching() -> bool:
    """Make Triton's CPU interpreter stop re-patching triton.language on every device-function call; True if
    installed (this Triton's interpreter has the pieces it wraps), False otherwise (nothing changed).

    The interpreter swaps triton.language's builtins for NumPy ones when a launch starts (GridExecutor, undone
    when it ends) and again on every call of a @triton.jit device function inside it (tl.sum, tl.cdiv, our
    helpers): each time inspect.getmembers over up to five modules, in every program of the grid, though after
    the first time there is nothing left to swap (the members already are the NumPy ones, and the few attributes
    it sets again are the same functions). A device call's swap is never undone, so a module it patched stays
    patched for good. This skips a device call's patching when the modules it reads (tl, tl.core) are the
    running launch's or ones a device call patched before: the same code runs on the same functions, sooner (a
    third less time over test_attention, test_layernorm and test_decode_graph: 114 -> 79 s on this 2-core CPU).
    """
    import threading

    try:
        from triton.runtime import interpreter
        patch, grid_call = interpreter._patch_lang, interpreter.GridExecutor.__call__
    except (ImportError, AttributeError):
        return False
    if getattr(patch, "skips_repatching", False):
        return True
    state = threading.local()  # a stack of the running launches' modules; a thread's own
    kept = set()  # modules a device call patched: Triton never undoes those

    class NoScope:
        def restore(self):
            pass

    seen = weakref.WeakKeyDictionary()  # a device function's modules: its globals, walked once, not every call

    def modules(fn):
        langs = seen.get(fn)
        if langs is None:
            langs = seen[fn] = frozenset(id(v) for v in fn.__globals__.values() if v is tl or v is tl.core)
        return langs

    def patch_lang(fn):
        stack = getattr(state, "stack", None)
        if not stack:  # not inside a launch: as Triton does
            return patch(fn)
        langs = modules(fn)
        if stack[-1] is None:  # the launch's own patching, undone when it ends
            stack[-1] = langs
            return patch(fn)
        if langs <= stack[-1] | kept:
            return NoScope()  # (a device call's scope is never restored: nothing to undo)
        scope = patch(fn)
        kept.update(langs - stack[-1])  # (the launch's own modules are unpatched when it ends)
        return scope

    def launch(self, *args, **kwargs):
        if not hasattr(state, "stack"):
            state.stack = []
        state.stack.append(None)
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            state.stack.pop()

    patch_lang.skips_repatching, patch_lang.triton_patch = True, patch  # (the latter: tests switch it off)
    interpreter._patch_lang = patch_lang
    interpreter.GridExecutor.__call__ = functools.wraps(grid_call)(launch)
    return True


INTERPRETER_FAST = triton_interpreting() and skip_interpreter_repatching()


def skip_discarded_overflow_checks() -> bool:
    """Make Triton's CPU interpreter stop computing integer-overflow checks it throws away; True if its options
    now say so (or it had nothing to skip), False where it keeps them (debug on, or a Triton without the pieces).

    Triton's `+`, `-` and `*` on int32 tensors (sanitize_overflow, on by default) redo the op in int64, compare the
    result with int32's range and hand the comparison to device_assert, which does nothing unless the options'
    debug is on. Compiled, the dead check folds away; the interpreter, whose debug is always off, builds it in
    NumPy on every integer op of every program, then drops it: a third of the Python calls of an interpreted decode step
    (test_model_gqa.py: 28.2-28.8 -> 22.6-25.9 s on this 2-core CPU). An int32 index that overflows wraps as it does
    on a GPU, with this or without."""
    try:
        from triton.runtime import interpreter
        builder, options = interpreter.interpreter_builder, interpreter.interpreter_builder.options
        options.sanitize_overflow, options.debug
    except (ImportError, AttributeError):
        return False
    if options.debug:
        return False  # (the checks would be asserted: kept)
    if options.sanitize_overflow:
        builder.options = dataclasses.replace(options, sanitize_overflow=False)
    return True


INTERPRETER_NO_OVERFLOW_CHECKS = triton_interpreting() and skip_discarded_overflow_checks()


def memoize_interpreter_dtypes() -> bool:
    """Make Triton's CPU interpreter look up a Triton dtype's NumPy one in a table built once; True if installed.

    Its _get_np_dtype, called for every cast, splat, load and constant of every program, builds its table of 18
    dtypes anew on each call (hashing each dtype by its name): ~18 us a call, 14 of the 180 s of test_flash_decoding
    and test_kv_cache_int8 under a profiler. The same answers (a dtype's NumPy type is its name's), from a dict."""
    try:
        from triton.runtime import interpreter
        slow = interpreter._get_np_dtype
    except (ImportError, AttributeError):
        return False
    if getattr(slow, "triton_get_np_dtype", None) is not None:
        return True
    table = {}  # a scalar dtype's name -> its NumPy dtype (Triton's answer, asked once)

    def np_dtype(tt_dtype):
        scalar = tt_dtype.element_ty if isinstance(tt_dtype, tl.block_type) else tt_dtype
        name = "pointer" if isinstance(scalar, tl.pointer_type) else scalar.name
        got = table.get(name)
        if got is None:
            got = table[name] = slow(scalar)
        return got

    np_dtype.triton_get_np_dtype = slow  # (a test compares the two)
    interpreter._get_np_dtype = np_dtype
    return True


INTERPRETER_DTYPES_MEMOIZED = triton_interpreting() and memoize_interpreter_dtypes()


def share_interpreter_shapes() -> bool:
    """Make every Triton tensor of one block shape share its shape and numel under the interpreter; True if
    installed.

    tl.tensor's constructor, run for every value every op of every program makes, builds its shape as a new
    tl.tuple of constexprs (its type a tuple_type of constexpr_types) and its numel as a new constexpr
    (test_flash_decoding.py: 33.7 s with those, 30.9 s shared, on this 2-core CPU). Neither is ever changed in place
    (a tl.tuple has no __setitem__ in Python), so tensors of one shape can hold the same two objects, made once a
    shape."""
    init = tl.core.tensor.__init__
    if getattr(init, "triton_init", None) is not None:
        return True
    if tl.core.base_value.__init__ is not object.__init__:
        return False  # (a Triton whose base_value sets something up: its own constructor kept)
    made = {}  # a block type's shape, a Python tuple of ints (() a scalar's) -> (numel, shape) as tl.tensor has

    def tensor_init(self, handle, type):
        self.handle, self.type, self.dtype = handle, type, type.scalar
        shape = (*type.shape,) if type.is_block() else ()  # (a Python tuple: a tl.tuple's == unwraps each item)
        got = made.get(shape)
        if got is None:
            got = made[shape] = (tl.constexpr(math.prod(shape)), tl.tuple([tl.constexpr(d) for d in shape]))
        self.numel, self.shape = got

    tensor_init.triton_init = init
    tl.core.tensor.__init__ = tensor_init
    return True


INTERPRETER_SHAPES_SHARED = triton_interpreting() and share_interpreter_shapes()


def share_interpreter_block_types() -> bool:
    """Make Triton's block types of one element type and shape read their checked shape, numel and name from a table
    under the interpreter; True if installed.

    tl.block_type's constructor, run for most ops of every program (a result's type, a broadcast, a splat),
    unwraps the shape's constexprs, checks each dimension is a power of 2 and formats its name each time. The first
    block type of an (element type, shape) runs Triton's own constructor (its checks raise there, as ever); the
    next ones copy what it made."""
    init = tl.core.block_type.__init__
    if getattr(init, "triton_init", None) is not None:
        return True
    made = {}  # (element type's name, *shape) -> (shape, numel, name) as Triton's constructor set them

    def block_init(self, element_ty, shape):
        try:
            key = (element_ty.name, *shape) if isinstance(shape, (list, tl.core.tuple)) else None  # (Triton's test)
            got = made.get(key)
        except (AttributeError, TypeError):  # (no name, an unhashable dimension: Triton's constructor judges)
            key = got = None
        if got is None:
            init(self, element_ty, shape)
            if key is not None:
                made[key] = (self.shape, self.numel, self.name)
            return
        self.element_ty = element_ty
        self.shape, self.numel, self.name = got

    block_init.triton_init = init
    tl.core.block_type.__init__ = block_init
    return True


INTERPRETER_BLOCK_TYPES_SHARED = triton_interpreting() and share_interpreter_block_types()


def skip_interpreter_no_op_broadcasts_and_casts() -> bool:
    """Make Triton's CPU interpreter return at once from a broadcast of two operands of one shape and a cast to the
    dtype a value already has; True if installed (on the interpreter's own semantic object only: compiling is
    untouched), False where this Triton lacks the pieces.

    Every binary op of every program (offsets + pointers, a * b) first casts both operands to a common dtype and
    broadcasts them to a common shape; in our kernels both are nearly always no-ops, which Triton finds the slow way:
    a broadcast compares the two shapes as tl.tuples of constexprs (unwrapping each, ~10 us), a cast compares
    dtypes through constexpr unwrapping too. The fast answers here are the ones Triton's code reaches for the same
    operands (one shape: nothing to broadcast; the same dtype object: nothing to cast); anything else goes to it."""
    try:
        from triton.runtime import interpreter
        semantic = interpreter.interpreter_semantic
        broadcast, cast = type(semantic).broadcast_impl_value, type(semantic).cast
    except (ImportError, AttributeError):
        return False
    if "broadcast_impl_value" in vars(semantic):
        return True
    if not isinstance(tl.block_type(tl.float32, [2]).shape.values, list):
        return False  # (a Triton whose block shapes hold no list to compare: its own code kept)

    def broadcast_impl_value(lhs, rhs):
        lhs_ty, rhs_ty = lhs.type, rhs.type
        if lhs_ty.is_block():
            if rhs_ty.is_block() and lhs_ty.shape.values == rhs_ty.shape.values:
                return lhs, rhs
        elif not rhs_ty.is_block():
            return lhs, rhs  # (two scalars: Triton returns them as they are)
        return broadcast(semantic, lhs, rhs)

    def cast_to(input, dst_ty, fp_downcast_rounding=None):
        if input.type.scalar is dst_ty.scalar:
            return input  # (Triton's first test: a dtype equal to the source's returns the input)
        return cast(semantic, input, dst_ty, fp_downcast_rounding)

    broadcast_impl_value.triton_method, cast_to.triton_method = broadcast, cast  # (a test compares them)
    semantic.broadcast_impl_value, semantic.cast = broadcast_impl_value, cast_to
    return True


INTERPRETER_NO_OP_CASTS_SKIPPED = triton_interpreting() and skip_interpreter_no_op_broadcasts_and_casts()
