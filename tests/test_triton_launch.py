"""The eager Triton launch path, checked through Triton's real launch machinery without a GPU.

The interpreter (TRITON_INTERPRET=1, the rest of the Triton tests) never runs the code an eager
launch runs on a GPU: the autotuner, ``JITFunction.run``, the argument specialization. Eager
launches bypass the autotuner's per-launch key building (``_common._tuned_meta``) and, once a
launch key has been seen, ``JITFunction.run``'s argument binding (``_common._run``), so a mistake
there (a key that conflates two shapes or two alignments, a config other than the autotuner's
choice) would launch the wrong binary on a GPU while every interpreter test passed. Here both paths run DeFINE training
steps under a stand-in CUDA driver (define_ops/triton/_fake_driver.py: kernels compiled for sm_90,
launches recorded, nothing executed) and must launch the same compiled kernels with the same
grids and arguments; the driver's benchmarker makes the autotuner's choice the last config it
tries, so "the first config" is a detectable mistake.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def triton_cache(tmp_path_factory) -> Path:
    """One Triton cache directory for every run here: the runs compile the same kernels (the first
    one compiles, the others load), and the autotuner choices that the runs keep on disk (made on
    the stand-in driver's made-up timings) start from none and stay out of any other cache."""
    return tmp_path_factory.mktemp("triton-cache")


def _record(mode: str, out: Path, autotune: bool, cache: Path, disk_choices: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache)
    env["DEFINE_OPS_TRITON_AUTOTUNE"] = "1" if autotune else "0"
    env["DEFINE_OPS_TRITON_AUTOTUNE_CACHE"] = "1" if disk_choices else "0"
    env["DEFINE_OPS_TRITON_COMPILE_THREADS"] = "4"  # whatever this machine's core count
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "triton_launch_check.py"), mode, str(out)], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, f"{mode}:\n{proc.stdout}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("autotune", [True, False], ids=["autotuned", "first-pruned-config"])
def test_eager_launches_pick_the_autotuners_kernels(tmp_path, triton_cache, autotune):
    direct = _record("direct", tmp_path / "direct.json", autotune, triton_cache)
    through_autotuner = _record("autotuner", tmp_path / "autotuner.json", autotune, triton_cache)
    kernels = {launch[0] for launch in direct["launches"]}
    assert {"_hgt_step_fwd_kernel", "_hgt_step_fwd_rows_kernel", "_hgt_step_bwd_dy_kernel", "_hgt_step_bwd_dw_kernel",
            "_hgt_step_bwd_dx_kernel", "_embedding_fwd_kernel"} <= kernels  # fmt: skip
    if autotune:  # some key had configs to choose between, or the check could not tell them apart
        assert direct["bench_calls"] > 0 and through_autotuner["bench_calls"] == direct["bench_calls"]
    # Compiling the autotuner's candidates ahead, all at once (_common._precompile), must compile
    # exactly what it would have compiled itself: a candidate compiled under another cache key
    # would be compiled again when benchmarked, and show up twice here.
    ahead = [name for name, early in direct["compiles"] if early]
    assert sorted(name for name, _ in direct["compiles"]) == sorted(name for name, _ in through_autotuner["compiles"])
    assert not any(early for _, early in through_autotuner["compiles"])
    if autotune:
        assert set(ahead) == {"_hgt_step_fwd_kernel", "_hgt_step_bwd_dw_kernel", "_hgt_step_bwd_dx_kernel"}
    else:  # one config per key: nothing to compile ahead
        assert not ahead
    assert len(direct["launches"]) == len(through_autotuner["launches"])
    for index, (ours, theirs) in enumerate(zip(direct["launches"], through_autotuner["launches"], strict=True)):
        assert ours == theirs, f"launch {index} differs"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_autotuner_choices_kept_on_disk_serve_the_next_process(tmp_path, triton_cache):
    """DEFINE_OPS_TRITON_AUTOTUNE_CACHE (on by default): the first process benchmarks and keeps
    its choices in the cache directory; the next benchmarks nothing and launches the same kernels."""
    first = _record("direct", tmp_path / "first.json", True, triton_cache, disk_choices=True)
    second = _record("direct", tmp_path / "second.json", True, triton_cache, disk_choices=True)
    assert first["bench_calls"] > 0 and second["bench_calls"] == 0
    assert second["launches"] == first["launches"]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize(
    "value, expected", [("", len(os.sched_getaffinity(0))), ("1", 1), ("12", 12), ("0", None), ("x", None)]
)
def test_compile_threads_setting(monkeypatch, value, expected):
    from define_ops.triton import _common

    monkeypatch.setenv("DEFINE_OPS_TRITON_COMPILE_THREADS", value)
    if expected is None:
        with pytest.raises(
            ValueError, match=f"DEFINE_OPS_TRITON_COMPILE_THREADS must be a positive integer, got '{value}'"
        ):
            _common._compile_threads()
    else:
        assert _common._compile_threads() == expected


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_warm_fills_the_cache_that_later_runs_load(tmp_path):
    """scripts/triton_warm.py (the GPU session runs it while the extension builds) compiles the
    workloads' kernels into Triton's own cache directory: a second run compiles nothing (same
    keys in a new process), and no autotuning choice made on the stand-in's timings is kept."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    # The forward's kernels alone: the backward's add compile time (CI's), not coverage of the mechanism.
    command = [sys.executable, str(ROOT / "scripts" / "triton_warm.py"), "--presets", "awd_ptb", "--quick",
               "--modes", "fwd", "--threads", "2"]  # fmt: skip
    reports = []
    for _ in range(2):
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-6000:]}"
        reports.append(proc.stdout.strip().splitlines()[-1])
    compiled = [int(report.split()[1]) for report in reports]
    assert compiled[0] > 2 and compiled[1] == 0, reports
    assert len(list((tmp_path / "cache").glob("*/*.cubin"))) == compiled[0]
    assert not list((tmp_path / "cache").rglob("*autotune*")), "an autotuning choice was kept"
