"""The one place that decides which path runs: reference modules or Triton kernels.

A spec is "reference", "triton", "auto" (Triton on CUDA, reference on CPU), or a set /
comma-separated list of kernel names. The answer is a frozenset of the kernels to use.
"""
import torch

from tritongpt._env import triton_interpreting
from tritongpt.errors import UserError

KERNEL_NAMES = ("layernorm", "mlp", "attention", "cross_entropy")


def resolve_kernels(spec, device) -> frozenset:
    device = torch.device(device)
    if spec is None or spec == "reference" or spec == "":
        return frozenset()
    if spec == "triton":
        names = set(KERNEL_NAMES)
    elif spec == "auto":
        return frozenset(KERNEL_NAMES) if device.type == "cuda" else frozenset()
    else:
        parts = spec.split(",") if isinstance(spec, str) else list(spec)
        names = {str(p).strip() for p in parts if str(p).strip()}
        unknown = sorted(names - set(KERNEL_NAMES))
        if unknown:
            raise UserError(f"unknown kernel(s) {unknown}; use 'reference', 'triton', 'auto' "
                            f"or a subset of {list(KERNEL_NAMES)}")
    if device.type == "cpu" and not triton_interpreting():
        raise UserError("the Triton path on CPU runs through Triton's interpreter: set "
                        "TRITON_INTERPRET=1 before triton is imported (or import tritongpt first)")
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
