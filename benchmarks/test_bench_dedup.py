"""Distinct tokens once (issue 8): forward + backward with and without ``dedup`` on real text.

A window of WikiText-2 (60 streams × 140 tokens, as the lstm_wt103 preset trains) at the
lstm_wt103 shapes, the target's case; and 60 × 150 at the txl_wt103 shapes, whose k = 4096 layers
make the step compute-bound on a GPU, where fewer rows pay even in eager mode. The distinct-token
fraction goes into extra_info beside the time. Eager, the lstm_wt103 step is host-bound on a GPU
(the launches do not shrink with the row count), so the Triton CUDA-graph replay
(``triton_graph``) is measured too: there only the device time counts. ``--presets`` picks among
the two; ``--quick`` runs the first only.
"""

from __future__ import annotations

import pytest

from define_ops.bench import make_workload, wikitext2_batch

# (preset, streams, tokens per stream): the window each preset trains on
WINDOWS = {"lstm_wt103": (60, 140), "txl_wt103": (60, 150)}


@pytest.mark.parametrize("dedup", [False, True], ids=["plain", "dedup"])
@pytest.mark.parametrize("shapes", list(WINDOWS))
def test_dedup(benchmark, bench_options, provider, dedup, shapes, request):
    chosen = request.config.getoption("--presets")
    if (chosen and shapes not in chosen.split(",")) or (bench_options["quick"] and shapes != "lstm_wt103"):
        pytest.skip(f"{shapes} not among the presets of this run")
    if provider in ("embedding", "reference_compiled") or (provider.endswith("_graph") and provider != "triton_graph"):
        # triton_graph: Triton's dedup has static shapes and no host read, so the step captures as a
        # CUDA graph, which takes away the host time that eager dedup cannot shrink
        pytest.skip("dedup is measured on the eager DeFINE providers and the Triton graph")
    quick = bench_options["quick"]
    try:
        ids = wikitext2_batch(*((10, 35) if quick else WINDOWS[shapes]))
    except FileNotFoundError as missing:
        pytest.skip(str(missing))
    work = make_workload(shapes, provider, "fwd_bwd", quick, bench_options["dtype"], ids=ids, dedup=dedup)
    benchmark.group = f"dedup-{shapes}-wikitext2"
    benchmark.extra_info.update(work.extra_info())
    benchmark.extra_info.update(
        dedup=dedup, distinct_tokens=int(ids.unique().numel()), distinct_fraction=ids.unique().numel() / ids.numel()
    )
    benchmark.pedantic(work.step, rounds=3 if quick else 8, warmup_rounds=1, iterations=1)
