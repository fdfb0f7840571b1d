"""Where the host's time goes in one training step: Python functions, not kernels.

    python scripts/host_profile.py [--preset awd_ptb] [--provider triton] [--steps 20] [--top 30]

Builds the benchmarks' workload (define_ops.bench.make_workload: the whole layer, forward +
backward, bf16 on a GPU, float32 on the CPU), warms it up (compiles and autotunes), then runs it
under cProfile and prints the functions with the most time of their own and the most cumulative
time per step. On the GPU the torch profiler (scripts/gpu_profile.py) names the slow host ops;
this names the Python behind them: e.g. the Triton backend's eager step spent ~0.65 ms of host
per layer backward on an H200 (benchmarks/results/h200-profile-triton-bf16.json), 40x its launches.

Without a GPU, ``--stub-launches`` (with TRITON_INTERPRET=1, so that the Triton backend exists on
the CPU) replaces every Triton kernel launch by a no-op: what is left is define_ops's own host
work around the launches (layer, autograd node, op dispatch, argument checks, allocations), timed
per step. Outputs are then uninitialised memory: the numbers are host time only.

    TRITON_INTERPRET=1 python scripts/host_profile.py --provider triton --quick --stub-launches

``--fake-driver`` (TRITON_INTERPRET unset) goes further: Triton's own launch path runs too
(autotuner, ``JITFunction.run``, argument specialization; kernels compiled for sm_90, launched by a
no-op launcher: define_ops/triton/_fake_driver.py), so the per-step figure is the eager Triton
step's whole host cost bar the driver call itself. With ``--tiny``, the awd_ptb layer on the 2-core
VM: 2.7-2.9 ms per step at commit 564d6f4, 1.15-1.3 ms since eager launches skip the autotuner's
and JITFunction.run's per-launch work (README, Triton kernels).

    python scripts/host_profile.py --provider triton --tiny --fake-driver

``--tiny`` keeps the preset's structure (depth, groups, skip, norm, dropout) at widths 16/64/16
and 2 tokens on one thread: the CPU backend's kernels then take a few µs and the step time is
almost all host work (Python, dispatch, allocations, autograd), the CPU-side proxy of what the
eager GPU step pays per call. ``DEFINE_OPS_STACK_OP=0`` there gives the step-op loop to compare.

    python scripts/host_profile.py --provider cpu --tiny --preset awd_ptb
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import time
from types import SimpleNamespace

import torch

from define_ops import DeFINE, DeFINEConfig
from define_ops.bench import device, make_workload, synchronize


def stub_triton_launches() -> None:
    """Every Triton kernel launch of define_ops becomes a no-op (see the module docstring)."""
    import importlib

    for name in ("define_ops.triton.hgt_step", "define_ops.triton.embedding"):
        module = importlib.import_module(name)  # the package re-exports functions of the same names
        module.launch = lambda *args, **kwargs: None


def tiny_workload(preset: str, provider: str, dtype: torch.dtype, dedup: bool = False) -> SimpleNamespace:
    """The preset's layer at widths 16/64/16 and 2 tokens (see the module docstring); with
    ``dedup``, 4 tokens of 2 distinct ids through ``dedup=True``."""
    config = DeFINEConfig.from_preset(preset, num_embeddings=1000, input_dim=16, max_dim=64, embedding_dim=16)
    module = DeFINE.from_config(
        config, backend=provider, device=device(), dtype=dtype, validate_ids=False, dedup=dedup
    ).train()
    ids = torch.tensor([5, 9, 5, 9] if dedup else [5, 9], device=device())
    grad = torch.randn(ids.numel(), 16, device=device(), dtype=dtype)
    params = list(module.parameters())

    def step() -> None:
        for p in params:
            p.grad = None
        module(ids).backward(grad)
        synchronize()

    return SimpleNamespace(step=step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="awd_ptb")
    parser.add_argument("--provider", default="triton" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="the benchmarks' small vocabulary and token count")
    parser.add_argument("--stub-launches", action="store_true", help="Triton launches become no-ops (host time only)")
    parser.add_argument(
        "--fake-driver", action="store_true", help="Triton's launch path, stand-in driver, no GPU (host time only)"
    )
    parser.add_argument("--tiny", action="store_true", help="widths 16/64/16, 2 tokens, one thread: host time only")
    parser.add_argument("--dedup", action="store_true", help="with --tiny: the dedup=True path")
    parser.add_argument("--out", default=None, help="write the report to this file instead of stdout")
    args = parser.parse_args()
    with open(args.out, "w") if args.out else contextlib.nullcontext(None) as out:
        with contextlib.redirect_stdout(out) if out else contextlib.nullcontext():
            run(args)


def run(args: argparse.Namespace) -> None:
    if args.stub_launches:
        stub_triton_launches()
    if args.fake_driver:
        from define_ops.triton import _fake_driver

        _fake_driver.install()
    dtype = torch.bfloat16 if device().type == "cuda" else torch.float32
    if args.tiny:
        torch.set_num_threads(1)
        work = tiny_workload(args.preset, args.provider, dtype, dedup=args.dedup)
    else:
        work = make_workload(args.preset, args.provider, "fwd_bwd", quick=args.quick, dtype=dtype)
    for _ in range(3):
        work.step()
    best = float("inf")
    for _ in range(5):  # best of five: the VM's neighbours come and go
        start = time.perf_counter()
        for _ in range(args.steps):
            work.step()
        best = min(best, (time.perf_counter() - start) / args.steps)
    print(f"{args.preset} {args.provider}: {best * 1e3:.3f} ms per step (wall, best of 5 x {args.steps})")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.steps):
        work.step()
    profiler.disable()
    for order in ("tottime", "cumulative"):
        buffer = io.StringIO()
        stats = pstats.Stats(profiler, stream=buffer)
        stats.sort_stats(order).print_stats(args.top)
        print(f"### {args.preset} {args.provider} {dtype}: {args.steps} steps, by {order}")
        text = buffer.getvalue()
        print(text[text.find("   ncalls") :])  # from the column header on


if __name__ == "__main__":
    main()
