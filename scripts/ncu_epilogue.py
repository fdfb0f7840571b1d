"""One training step of the layer on the CUDA backend, for Nsight Compute to look inside the
epilogue kernels (the H200 profile found them far below the copy bandwidth):

    ncu --profile-from-start off --kernel-name regex:hgt_step_ --launch-count 8 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
        --section WarpStateStats python scripts/ncu_epilogue.py --preset txl_wt103

Also, with ``--gemm-alignment``, times the grouped GEMM of a layer whose group width is not a
multiple of 8 elements (txl_wt103's second layer: 2 groups of 1004 inputs) on its strided view,
as the backend runs it, against a copy into a padded, 16-byte-aligned buffer plus the GEMM on it:
whether cuBLAS's unaligned kernels cost more than the copy.
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


def gemm_alignment(
    dtype: torch.dtype, tokens: int = 9000, groups: int = 2, in_group: int = 1004, out_group: int = 1432
) -> None:
    x = torch.randn(tokens, groups * in_group, device="cuda", dtype=dtype)  # [T, a]
    weight = torch.randn(groups, in_group, out_group, device="cuda", dtype=dtype)  # [g, a/g, b/g]
    out = torch.empty(groups, tokens, out_group, device="cuda", dtype=dtype)
    padded_group = (in_group + 7) // 8 * 8
    padded = torch.zeros(groups, tokens, padded_group, device="cuda", dtype=dtype)
    padded_weight = torch.zeros(groups, padded_group, out_group, device="cuda", dtype=dtype)
    padded_weight[:, :in_group] = weight

    def strided() -> None:  # x as [g, T, a/g] with strides (a/g, a, 1): what the backend runs
        torch.bmm(x.as_strided((groups, tokens, in_group), (in_group, groups * in_group, 1)), weight, out=out)

    def copy_then_aligned() -> None:
        padded[:, :, :in_group].copy_(x.view(tokens, groups, in_group).transpose(0, 1))
        torch.bmm(padded, padded_weight, out=out)

    def aligned_only() -> None:
        torch.bmm(padded, padded_weight, out=out)

    for name, fn in (("strided view", strided), ("copy + aligned", copy_then_aligned), ("aligned only", aligned_only)):
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            fn()
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / 20
        tflops = 2 * tokens * groups * in_group * out_group / ms / 1e9
        shape = f"T={tokens} g={groups} a/g={in_group} b/g={out_group}"
        print(f"gemm {shape}: {name:15s} {ms * 1e3:8.1f} us {tflops:6.0f} TFLOP/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="txl_wt103")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--gemm-alignment", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("ncu_epilogue.py: needs a CUDA GPU")
    dtype = getattr(torch, args.dtype)
    if args.gemm_alignment:
        gemm_alignment(dtype)
    else:
        profiled_step(args.preset, dtype)


if __name__ == "__main__":
    main()
