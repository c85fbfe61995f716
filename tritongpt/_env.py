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


def unshadow_pypi_kernels() -> None:
    """Python started in the checkout (`python -m pytest`, a script there) has its root on sys.path, where
    kernels/ (installed as tritongpt.kernels) would be found as the top-level `kernels`: the name of the PyPI
    package transformers imports (a dependency since 5.x), which then fails on our folder. Bind the name to
    the installed package first, loaded lazily (importlib's LazyLoader: nothing runs until it is used)."""
    import importlib.machinery
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    here = [p for p in sys.path if os.path.abspath(p or os.curdir) == root]
    if not here or "kernels" in sys.modules:
        return
    spec = importlib.machinery.PathFinder.find_spec("kernels", [p for p in sys.path if p not in here])
    if spec is None or spec.loader is None:  # not installed: transformers does not look for it either
        return
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    spec.loader.exec_module(module)
