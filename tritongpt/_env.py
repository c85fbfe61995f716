"""Decides, once and early, whether Triton runs compiled (CUDA) or interpreted (CPU)."""
import os
import sys


def _cuda_present() -> bool:
    # torch.cuda.is_available() would import torch (2 s); a cheap look at the driver is enough
    # to decide, and torch gives the final word later when a kernel is launched.
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")


def setup_triton_env() -> None:
    """Turn on Triton's interpreter when there is no GPU and the user has not decided."""
    if "TRITON_INTERPRET" in os.environ or "triton" in sys.modules:
        return
    if not _cuda_present():
        os.environ["TRITON_INTERPRET"] = "1"


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
