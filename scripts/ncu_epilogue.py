"""One training step of the layer on the CUDA backend, for Nsight Compute to look inside the
epilogue kernels (the H200 profile found them far below the copy bandwidth):

    ncu --profile-from-start off --kernel-name regex:hgt_step_ --launch-count 8 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
        --section WarpStateStats python scripts/ncu_epilogue.py --preset txl_wt103

(The grouped GEMMs themselves, aligned or not: scripts/gemm_census.py.)
"""

from __future__ import annotations

import argparse

import torch

from define_ops.bench import make_workload


def profiled_step(preset: str, dtype: torch.dtype) -> None:
    step = make_workload(preset, "cuda", "fwd_bwd", quick=False, dtype=dtype).step  # ends with a synchronize
    for _ in range(2):  # warm-up outside the profiled range
        step()
    torch.cuda.profiler.start()
    step()
    torch.cuda.profiler.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="txl_wt103")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("ncu_epilogue.py: needs a CUDA GPU")
    dtype = getattr(torch, args.dtype)
    profiled_step(args.preset, dtype)


if __name__ == "__main__":
    main()
