"""Compile Triton kernels ahead of time for sm_90 without a GPU: run a script in a fresh interpreter (no
TRITON_INTERPRET, private cache) and return the JSON it prints on its last line."""
import json
import os
import subprocess
import sys

import pytest


def run_sm90_script(script: str, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    if proc.returncode != 0 and ("ptxas" in proc.stderr and "not found" in proc.stderr):
        pytest.skip("Triton's bundled ptxas is not runnable here")  # pragma: no cover
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
