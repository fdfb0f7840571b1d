"""The whole DeFINE layer (lookup included) per preset × provider × {fwd, fwd_bwd}."""

from __future__ import annotations

import pytest

from define_ops.bench import make_workload


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_layer(benchmark, bench_options, preset, provider, mode):
    work = make_workload(preset, provider, mode, bench_options["quick"], bench_options["dtype"],
                         group_width_multiple=bench_options["group_width_multiple"])  # fmt: skip
    benchmark.group = f"{work.preset}-{mode}"
    benchmark.extra_info.update(work.extra_info())
    # Warm-up rounds absorb torch.compile / autotuning / allocator growth.
    benchmark.pedantic(work.step, rounds=5 if bench_options["quick"] else 15, warmup_rounds=2, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # absent under --benchmark-disable
        median = stats.stats.median
        benchmark.extra_info["median_ms"] = median * 1e3
        benchmark.extra_info["tokens_per_s"] = work.tokens / median
