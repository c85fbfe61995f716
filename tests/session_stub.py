"""bench/gpu_session.sh run with a stand-in python that records its arguments: no install, no GPU.

The stage tests (tests/test_bench.py, tests/test_bench_profile.py) read back what the script would have run."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu_session.sh"


def run_gpu_session(tmp_path, stage, **env):
    """Run `bash bench/gpu_session.sh STAGE` with PYTHON a stand-in, OUT and WORK under tmp_path and env's
    variables; -> (each python call's argv as a list, the WORK folder, the script's stdout). Skips without bash
    or tar."""
    if shutil.which("bash") is None or shutil.which("tar") is None:
        pytest.skip("needs bash and tar")
    calls, stub = tmp_path / "calls", tmp_path / "python"
    # one call's arguments separated by \037 (unit separator), calls by \036 (record separator)
    stub.write_text(f'#!/bin/sh\nprintf "%s\\037" "$@" >> {calls}\nprintf "\\036" >> {calls}\n')
    stub.chmod(0o755)
    work = tmp_path / "work"
    full = {**os.environ, "PYTHON": str(stub), "OUT": str(tmp_path / "out"), "WORK": str(work), **env}
    done = subprocess.run(["bash", str(SCRIPT), stage], env=full, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    text = calls.read_text() if calls.exists() else ""
    return [c.split("\x1f")[:-1] for c in text.split("\x1e") if c], work, done.stdout
