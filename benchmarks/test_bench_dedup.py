"""Distinct tokens once (issue 8): forward + backward with and without ``dedup`` on real text.

A window of WikiText-2 (60 streams × 140 tokens, as the lstm_wt103 preset trains) at the
lstm_wt103 shapes; the distinct-token fraction goes into extra_info beside the time. Eager, the
layer's step is host-bound on a GPU (the launches do not shrink with the row count), so the
Triton CUDA-graph replay (``triton_graph``) is measured too: there only the device time counts.
"""

from __future__ import annotations

import pytest

from define_ops.bench import make_workload, wikitext2_batch


@pytest.mark.parametrize("dedup", [False, True], ids=["plain", "dedup"])
def test_dedup(benchmark, bench_options, provider, dedup):
    if provider in ("embedding", "reference_compiled") or (provider.endswith("_graph") and provider != "triton_graph"):
        # triton_graph: Triton's dedup has static shapes and no host read, so the step captures as a
        # CUDA graph, which takes away the host time that eager dedup cannot shrink
        pytest.skip("dedup is measured on the eager DeFINE providers and the Triton graph")
    quick = bench_options["quick"]
    try:
        ids = wikitext2_batch(*((10, 35) if quick else (60, 140)))
    except FileNotFoundError as missing:
        pytest.skip(str(missing))
    work = make_workload("lstm_wt103", provider, "fwd_bwd", quick, bench_options["dtype"], ids=ids, dedup=dedup)
    benchmark.group = "dedup-lstm_wt103-wikitext2"
    benchmark.extra_info.update(work.extra_info())
    benchmark.extra_info.update(
        dedup=dedup, distinct_tokens=int(ids.unique().numel()), distinct_fraction=ids.unique().numel() / ids.numel()
    )
    benchmark.pedantic(work.step, rounds=3 if quick else 8, warmup_rounds=1, iterations=1)
