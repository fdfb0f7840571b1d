"""Compile, ahead of a GPU session's Triton stages, every kernel and autotuning candidate they launch.

    python scripts/triton_warm.py [--presets P1,P2] [--dtypes bfloat16] [--threads 8] [--quick]

The Triton benchmarks of earlier GPU sessions ran out of their minutes compiling (each autotuned
launch compiles every candidate config, ~100 for an awd_ptb training step). The kernels depend
only on the triton release, the target and the launch's specialization (dtypes, sizes, alignment),
not on the card being there: this script runs the benchmarks' workloads on CPU tensors through
define_ops's stand-in CUDA driver (``define_ops/triton/_fake_driver.py``: Triton's real launch path,
kernels compiled for sm_90, launches that run nothing), with Triton's cache directory left where
the later stages look, so those stages find every binary compiled. ``scripts/gpu_session.sh``
runs it on the GPU machine itself (same Python, triton and ptxas, so the cache keys are the ones
the real launches compute) in the background while the CUDA extension builds.

The stand-in benchmarker's timings are made up, so the autotuners' choices must not be kept:
DEFINE_OPS_TRITON_AUTOTUNE_CACHE=0 is set here, and the later stages benchmark the candidates on
the card as before (cheap once compiled). CUDA_VISIBLE_DEVICES is emptied: the card stays free.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "0"
os.environ["DEFINE_OPS_TRITON_AUTOTUNE_CACHE"] = "0"  # the stand-in's timings: no choice may reach the disk
os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU tensors; the card stays free for the stages beside this

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from triton import knobs  # noqa: E402

from define_ops.bench import make_workload  # noqa: E402
from define_ops.config import PRESETS  # noqa: E402

# What the session's Triton stages launch (bench-triton-<preset>, bench-issue8, profile-triton):
# every preset's training step and eval forward, and dedup's kernels (a device-side row count).
MODES = ("fwd_bwd", "fwd")
DEDUP_PRESETS = ("lstm_wt103", "awd_ptb", "nmt_wmt14")


def cached_kernels(cache_dir: Path) -> int:
    """Compiled binaries in Triton's cache directory."""
    return sum(1 for _ in cache_dir.glob("*/*.cubin")) if cache_dir.is_dir() else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="lstm_wt103,lstm_wt103_n7,txl_wt103,awd_ptb,nmt_wmt14")
    parser.add_argument("--dtypes", default="bfloat16")
    parser.add_argument("--threads", type=int, default=0, help="compile threads (default: all cores)")
    parser.add_argument("--quick", action="store_true", help="the benchmarks' quick sizes (tests)")
    parser.add_argument("--modes", default=",".join(MODES), help="fwd_bwd (with dedup's where timed) and/or fwd")
    opts = parser.parse_args()
    presets = [p for p in opts.presets.split(",") if p]
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        parser.error(f"unknown preset(s) {unknown}; choose from {sorted(PRESETS)}")
    dtypes = [getattr(torch, name) for name in opts.dtypes.split(",") if name]
    modes = [mode for mode in opts.modes.split(",") if mode]
    if not set(modes) <= set(MODES):
        parser.error(f"unknown mode(s) {sorted(set(modes) - set(MODES))}; choose from {list(MODES)}")
    runs = [(mode, False) for mode in modes] + ([("fwd_bwd", True)] if "fwd_bwd" in modes else [])
    if opts.threads:  # read when define_ops.triton is first imported, just below
        os.environ["DEFINE_OPS_TRITON_COMPILE_THREADS"] = str(opts.threads)

    cache_dir = Path(knobs.cache.dir)  # where the real launches of this machine look
    from define_ops.triton import _common, _fake_driver

    assert not opts.threads or _common.COMPILE_THREADS == opts.threads, "compile threads read too early"
    _fake_driver.install()
    # install() points the cache elsewhere so that its made-up autotuning choices never reach a GPU
    # run; here no choice is written (DEFINE_OPS_TRITON_AUTOTUNE_CACHE=0), and the binaries are the point.
    knobs.cache.dir = str(cache_dir)
    before, start = cached_kernels(cache_dir), time.time()
    for preset in presets:
        for dtype in dtypes:
            for mode, dedup in runs:
                if dedup and preset not in DEDUP_PRESETS:
                    continue
                t0 = time.time()
                make_workload(preset, "triton", mode, opts.quick, dtype, dedup=dedup).step()
                print(f"triton_warm: {preset} {str(dtype).removeprefix('torch.')} {mode}{' dedup' if dedup else ''} "
                      f"{time.time() - t0:.1f} s, {cached_kernels(cache_dir)} kernels cached", flush=True)  # fmt: skip
    print(f"triton_warm: {cached_kernels(cache_dir) - before} kernels compiled into {cache_dir} in "
          f"{time.time() - start:.0f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
