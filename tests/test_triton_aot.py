"""Every Triton kernel compiles for sm_80 and sm_90 (PTX and cubin, no GPU needed), and
torch.compile's decomposition of the GPU ops traces: so that a kernel only the interpreter
accepts never lands. Runs ``python -m define_ops.triton._aot`` in a process without
``TRITON_INTERPRET`` (set for this one by conftest.py)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_compile_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_CACHE_DIR", str(ROOT / ".triton-cache"))
    proc = subprocess.run(
        [sys.executable, "-m", "define_ops.triton._aot"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-6000:]}"
    assert "kernel launches built" in proc.stdout
