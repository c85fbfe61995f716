"""Helpers shared by every Triton kernel file: input checks and the interpreter switch.

Kernels call these before launching, so that bad input gives a one-line ValueError /
TypeError / RuntimeError naming the tensor, instead of a Triton crash or a wrong answer.
"""
import os

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def is_interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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


def _same(attr: str, tensors: dict):
    """(value, None) if every named tensor (None skipped) has the same `attr`, else the first
    name and tensor and the first one that differs: (None, (name0, t0, name, t))."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    if not items:
        return None, None
    first_name, first = items[0]
    for name, t in items[1:]:
        if getattr(t, attr) != getattr(first, attr):
            return None, (first_name, first, name, t)
    return getattr(first, attr), None


def check_same_device(**tensors):
    """All named tensors (None entries skipped) must live on one device; returns that device."""
    device, bad = _same("device", tensors)
    if bad:
        n0, t0, n, t = bad
        raise ValueError(f"tensors on different devices: {n0} is on {t0.device}, {n} is on {t.device}")
    return device


def check_same_dtype(**tensors):
    """All named tensors (None entries skipped) must share one dtype; returns it."""
    dtype, bad = _same("dtype", tensors)
    if bad:
        n0, t0, n, t = bad
        raise TypeError(f"dtype mismatch: {n0} is {str(t0.dtype).replace('torch.', '')}, "
                        f"{n} is {str(t.dtype).replace('torch.', '')}")
    return dtype


def check_runnable(t, name: str = "input"):
    """Triton can run on this tensor's device: CUDA, or CPU with the interpreter switched on."""
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu":
        if not is_interpreting():
            raise RuntimeError(
                f"{name} is a CPU tensor but Triton's interpreter is off: set TRITON_INTERPRET=1 "
                "before importing triton (or `import tritongpt` first)")
        return
    raise ValueError(f"{name} is on {t.device}; Triton kernels run on CUDA, or on CPU with TRITON_INTERPRET=1")


def fix_bf16_rounding(dtype) -> bool:
    """Whether kernels must round fp32 -> bf16 themselves (pass as the ROUND constexpr below).

    Triton 3.8's interpreter converts fp32 to bf16 by truncating the mantissa (round toward
    zero), not round-to-nearest-even as the GPU does. Truncation doubles the error and biases it,
    which a 1e-2 bf16 parity bound notices; so under the interpreter we round first.
    """
    return is_interpreting() and dtype == torch.bfloat16


@triton.jit
def round_for_bf16(x, ROUND: tl.constexpr):
    """fp32 x -> the nearest bf16 value (ties to even), still as fp32, when ROUND; else x.

    Use right before a bf16 store/cast with ROUND=fix_bf16_rounding(dtype): the following
    (truncating) conversion is then exact. Compiled GPU code passes ROUND=False: a no-op.
    """
    if ROUND:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        x = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
    return x


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def saved_tensor_bytes(fn, *args, exclude=()) -> int:
    """Bytes of the tensors autograd saves for backward while running fn(*args).

    Tensors sharing storage with one in `exclude` (e.g. weights, which live anyway) are not
    counted; each other storage is counted once, so views of one buffer are not double-counted.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude if t is not None}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(seen.values())
