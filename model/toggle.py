"""The one place that decides which path runs: reference modules or Triton kernels.

A spec is "reference", "triton", "auto" (Triton on CUDA, reference on CPU), or a set /
comma-separated list of kernel names. The answer is a frozenset of the kernels to use.
"mlp" is the model's MLP, whichever GPTConfig.mlp builds: GPT-2's GELU one (kernels/mlp.py) or
Llama's SwiGLU (kernels/swiglu.py, on the same matmul kernel); there is no separate name.

The int8 and int4 matmuls of a quantized model (model/quant.py's Int8Linear and Int4Linear <-> kernels/quant.py)
follow "mlp" too: the name of the matmul kernels.

"layernorm" names the model's norm layers whichever they are (GPTConfig.norm): LayerNorm or RMSNorm
run through the same Triton kernels (kernels/layernorm.py), so an RMSNorm model has no name of its own.

On a GPU older than Ampere (compute capability < 8.0: V100, T4) Triton compiles tl.dot to
scalar FMAs, not tensor-core MMAs (checked offline for sm_75: bench/results/sm75-offline), so
there "auto" keeps only the kernels without a dot (the LayerNorm, RoPE and the fused loss, whose
matmuls are cuBLAS's): the Triton MLP and attention would be slower than the reference path.
"""
import torch

from tritongpt._env import triton_interpreting
from tritongpt.errors import UserError

KERNEL_NAMES = ("layernorm", "mlp", "attention", "cross_entropy", "rope")
DOT_KERNELS = ("mlp", "attention")  # built on tl.dot: tensor cores from compute capability 8.0


def ampere_or_later(device) -> bool:
    """A CUDA device of compute capability 8.0+, where bf16 arithmetic and Triton's tensor-core
    tl.dot begin (asked only of a GPU that is there: unknown, e.g. a name check, is yes)."""
    device = torch.device(device)
    return device.type == "cuda" and (not torch.cuda.is_available() or
                                      torch.cuda.get_device_capability(device) >= (8, 0))


def resolve_kernels(spec, device, check_device: bool = True) -> frozenset:
    """check_device=False: names only (a model built on the CPU, to be moved to a GPU; the
    kernels check their tensors' device when they run)."""
    device = torch.device(device)
    if spec is None or spec == "reference" or spec == "":
        return frozenset()
    if spec == "triton":
        names = set(KERNEL_NAMES)
    elif spec == "auto":
        if device.type != "cuda":
            return frozenset()
        return frozenset(n for n in KERNEL_NAMES if ampere_or_later(device) or n not in DOT_KERNELS)
    else:
        if isinstance(spec, str):
            parts = spec.split(",")
        elif isinstance(spec, (set, frozenset, list, tuple)) and all(isinstance(p, str) for p in spec):
            parts = list(spec)  # not a dict: {"mlp": False} would read as "mlp" on
        else:
            raise UserError(f"kernels must be 'reference', 'triton', 'auto', a comma list or a set of "
                            f"names from {list(KERNEL_NAMES)}, got {spec!r}")
        names = {p.strip() for p in parts if p.strip()}
        unknown = sorted(names - set(KERNEL_NAMES))
        if unknown:
            raise UserError(f"unknown kernel(s) {unknown}; use 'reference', 'triton', 'auto' "
                            f"or a subset of {list(KERNEL_NAMES)}")
    if not check_device or not names:
        return frozenset(names)
    if device.type == "cpu" and not triton_interpreting():
        gpu = " (this machine has a GPU: move the model there first, model.to('cuda'))" \
            if torch.cuda.is_available() else ""
        raise UserError(f"the model is on the CPU, where the Triton kernels run only through Triton's "
                        f"interpreter{gpu}; for the interpreter, set TRITON_INTERPRET=1 before triton "
                        "is imported (or import tritongpt first)")
    if device.type == "cpu":
        from tritongpt.kernels._common import INTERPRETER_PROBLEM

        if INTERPRETER_PROBLEM:
            raise UserError(INTERPRETER_PROBLEM)
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"the Triton path needs a CUDA or CPU device, not {device.type}")
    return frozenset(names)


def spec_string(names: frozenset) -> str:
    """Canonical text for a resolved set, as stored in GPTConfig.kernels."""
    if not names:
        return "reference"
    if set(names) == set(KERNEL_NAMES):
        return "triton"
    return ",".join(n for n in KERNEL_NAMES if n in names)
