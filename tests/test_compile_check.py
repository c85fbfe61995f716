"""The GPU path builds for Hopper: every kernel launch compiled for sm_90 with Triton's compiler
and ptxas, on this GPU-less machine (bench/compile_check.py). The interpreter tests prove the
arithmetic; this proves the same launches compile, fit an SM and do not spill."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

from tritongpt.bench import compile_check

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
KERNELS = {"_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel", "_matmul_kernel", "_attn_fwd",
           "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq"}


@pytest.mark.skipif(not PTXAS.exists(), reason="this Triton build ships no ptxas")
def test_every_kernel_launch_builds_for_sm90(tmp_path):
    # Through the CLI, which starts the check with the interpreter off (it is on in this process).
    proc = subprocess.run([sys.executable, "-m", "tritongpt.cli", "bench", "compile", "--quick", "--strict",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((tmp_path / "sm90-offline" / "compile.json").read_text())
    assert data["env"]["target"] == "sm_90" and data["env"]["triton"] == triton.__version__
    rows = data["rows"]
    assert {r["kernel"] for r in rows} == KERNELS
    assert all(launch["clean_config"] for launch in data["launches"]), data["launches"]
    for r in rows:
        assert r["status"] != "error", r
    # bf16 matmuls and attention must reach the tensor cores (wgmma/mma), or they will be slow
    for kernel in ("_matmul_kernel", "_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"):
        bf16 = [r for r in rows if r["kernel"] == kernel and "bfloat16" in r["case"]]
        assert bf16 and all(r["tensor_core_ops"] > 0 for r in bf16), kernel
    assert "have a config that builds, fits and does not spill" in (tmp_path / "sm90-offline" / "compile.md").read_text()


def test_status_flags_what_autotune_would_skip_or_regret():
    ok = dict(shared=65536, registers=200, num_warps=4, local_bytes=0)
    assert compile_check._status(ok) == "ok"
    assert compile_check._status({**ok, "shared": compile_check.MAX_SHARED_BYTES[90] + 1}) == "too much shared memory"
    assert compile_check._status({**ok, "shared": 120_000}, arch=89) == "too much shared memory"  # 99 KB there
    assert compile_check._status({**ok, "registers": 255, "num_warps": 16}) == "too many registers"
    assert compile_check._status({**ok, "local_bytes": 64}) == "spills"


def test_refuses_to_run_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit, match="TRITON_INTERPRET=0"):
        compile_check.main(["--quick"])
