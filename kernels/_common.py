"""Helpers shared by every Triton kernel file: input checks and the interpreter switch.

Kernels call these before launching, so that bad input gives a one-line ValueError /
TypeError / RuntimeError naming the tensor, instead of a Triton crash or a wrong answer.
"""
import torch
import triton
import triton.language as tl

from tritongpt._env import triton_interpreting

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
        return
    raise ValueError(f"{name} is on {t.device}; Triton kernels run on CUDA, or on CPU with TRITON_INTERPRET=1")


def fix_bf16_rounding(dtype) -> bool:
    """Whether kernels must round fp32 -> bf16 themselves (pass as the ROUND constexpr below).

    Triton 3.8's interpreter converts fp32 to bf16 by truncating the mantissa (round toward
    zero), not round-to-nearest-even as the GPU does. Truncation doubles the error and biases it,
    which a 1e-2 bf16 parity bound notices; so under the interpreter we round first.
    """
    return triton_interpreting() and dtype == torch.bfloat16


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
