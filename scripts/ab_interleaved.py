"""A/B of a tuning switch, interleaved in one process: the verdict that separate runs cannot give.

    python scripts/ab_interleaved.py --env DEFINE_OPS_CUDA_WARP_ROWS=0,1 [--presets awd_ptb,nmt_wmt14]
    python scripts/ab_interleaved.py --group-width-multiple 1,8 --presets nmt_wmt14,txl_wt103
    python scripts/ab_interleaved.py --env DEFINE_OPS_STACK_OP=1,0 --provider cpu --quick   # CPU smoke run

On the GPU host, the same step timed in two stages minutes apart differed by more than the effect
being measured (H200, commit 9c44359: the stack-op A/B, 2.75 vs 2.38 ms in one stage, 2.28 ms a
few minutes earlier). Here every variant of a preset is built once, then timed in alternating
blocks (``--rounds`` blocks of ``--steps`` synchronised steps each, the variants' order rotating
from round to round), so drift and noise fall on all of them alike. Per preset and variant it
prints and records the median step time and its ratio to the first variant, with the lowest and
highest ratio over the rounds (a ratio whose range straddles 1.0 is no verdict).

Variants are either values of one environment variable that the backend reads at every call
(``--env NAME=V1,V2``: ``DEFINE_OPS_CUDA_WARP_ROWS``, ``DEFINE_OPS_CUDA_DENSE_GROUPS``,
``DEFINE_OPS_STACK_OP``), all on one workload; or configurations (``--group-width-multiple
1,8``), one workload each. ``--graph`` times the step captured as a CUDA graph instead (one graph
per variant, captured with its setting in force), where only device time counts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from define_ops.bench import device_name, make_workload, synchronize


@contextlib.contextmanager
def environment(name: str | None, value: str | None) -> Iterator[None]:
    """``name=value`` in os.environ for the block (nothing when name is None)."""
    if name is None:
        yield
        return
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def block_ms(step: Callable[[], None], steps: int) -> float:
    """Median ms of ``steps`` synchronised steps."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def interleave(steps_of: dict[str, Callable[[], None]], env_of: dict[str, tuple[str | None, str | None]],
               rounds: int, steps: int) -> dict[str, list[float]]:  # fmt: skip
    """Per variant, its block medians over ``rounds`` rounds, the variants' order rotating."""
    names = list(steps_of)
    for name in names:  # warm-up: allocator, cuBLAS plans, autotuning, each with its own setting
        with environment(*env_of[name]):
            block_ms(steps_of[name], 3)
    blocks: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            with environment(*env_of[name]):
                blocks[name].append(block_ms(steps_of[name], steps))
    return blocks


def summarise(blocks: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Median ms per variant, and its ratio to the first variant: over the rounds' medians, and
    the lowest and highest ratio of one round."""
    first = next(iter(blocks))
    out = {}
    for name, times in blocks.items():
        ratios = [t / b for t, b in zip(times, blocks[first], strict=True)]
        out[name] = {"median_ms": statistics.median(times), "ratio": statistics.median(times) /
                     statistics.median(blocks[first]), "ratio_min": min(ratios), "ratio_max": max(ratios)}  # fmt: skip
    return out


def parse_variants(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """(the environment variable or None, the variants' values)."""
    if (args.env is None) == (args.group_width_multiple is None):
        raise SystemExit("ab_interleaved.py: give exactly one of --env NAME=V1,V2 and --group-width-multiple M1,M2")
    if args.env is not None:
        name, _, values = args.env.partition("=")
        if not name or not values:
            raise SystemExit(f"ab_interleaved.py: --env wants NAME=V1,V2, got {args.env!r}")
        return name, values.split(",")
    return None, args.group_width_multiple.split(",")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default=None, help="NAME=V1,V2[,...]: values of a per-call environment switch")
    parser.add_argument("--group-width-multiple", default=None, help="M1,M2[,...]: DeFINEConfig variants")
    parser.add_argument("--presets", default="awd_ptb,nmt_wmt14,lstm_wt103")
    parser.add_argument("--provider", default="cuda", help="cuda, triton or cpu (default cuda)")
    parser.add_argument("--mode", default="fwd_bwd", choices=("fwd_bwd", "fwd"))
    parser.add_argument("--graph", action="store_true", help="time the step replayed as a CUDA graph")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", default=None, help="default bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    env_name, values = parse_variants(args)
    dtype = getattr(torch, args.dtype or ("bfloat16" if torch.cuda.is_available() else "float32"))
    provider = f"{args.provider}_graph" if args.graph else args.provider
    what = f"{env_name}={','.join(values)}" if env_name else f"group_width_multiple={','.join(values)}"
    results: dict[str, Any] = {"device": device_name(), "torch": torch.__version__, "provider": provider,
                               "mode": args.mode, "dtype": str(dtype).removeprefix("torch."), "variants": what,
                               "rounds": args.rounds, "steps": args.steps, "presets": {}}  # fmt: skip
    for preset in args.presets.split(","):

        def build(value: str, preset: str = preset) -> Any:
            multiple = 1 if env_name else int(value)
            return make_workload(preset, provider, args.mode, args.quick, dtype, group_width_multiple=multiple)

        # an env switch read at every call: the variants time one eager workload; a graph captures
        # the kernels of the setting in force, and a config variant is a workload of its own
        shared = build(values[0]) if env_name and not args.graph else None
        steps_of, env_of = {}, {}
        for value in values:
            name = f"{env_name}={value}" if env_name else f"gw{value}"
            env_of[name] = (env_name, value)
            with environment(env_name, value):
                steps_of[name] = (shared or build(value)).enqueue
        summary = summarise(interleave(steps_of, env_of, args.rounds, args.steps))
        results["presets"][preset] = summary
        print(f"### {preset} {provider} {args.mode} ({results['dtype']}, {args.rounds} rounds x {args.steps} steps)")
        for name, row in summary.items():
            print(f"    {name:40s} {row['median_ms']:9.3f} ms  x{row['ratio']:.3f} "
                  f"(rounds {row['ratio_min']:.3f}-{row['ratio_max']:.3f})")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
