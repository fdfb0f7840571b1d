"""Inference (issue 8): eval forward with the cached |V|×m table vs without vs nn.Embedding."""

from __future__ import annotations

import pytest

from define_ops.bench import make_workload


@pytest.mark.parametrize("mode", ["fwd", "fwd_cached"])
def test_inference(benchmark, bench_options, preset, provider, mode):
    if provider == "embedding" and mode == "fwd_cached":
        pytest.skip("the plain embedding has no table to cache (its 'fwd' row is the target)")
    if provider.startswith("reference") and mode == "fwd_cached":
        pytest.skip("the cache is measured on our backends")
    work = make_workload(preset, provider, mode, bench_options["quick"], bench_options["dtype"])
    benchmark.group = f"inference-{preset}"
    benchmark.extra_info.update(work.extra_info())
    benchmark.pedantic(work.step, rounds=5 if bench_options["quick"] else 20, warmup_rounds=2, iterations=1)
