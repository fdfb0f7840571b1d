"""What the id range check costs a training loop: ``validate_ids`` True (a host read before each
call) vs "deferred" (an asynchronous copy read later) vs False (none).

A synchronisation costs more than its own microseconds: the host stops queueing until the device
has drained its queue, and then the device idles while the host queues the rest. So the step here
is a short loop, as a training loop is: per iteration the layer's forward and backward and a
stand-in for the model behind it (two GEMMs of the model width), and one synchronisation at the
end, not one per iteration.

    pytest benchmarks/test_bench_id_check.py --benchmark-only --benchmark-json benchmarks/results/<card>-id-check.json
"""

from __future__ import annotations

import pytest
import torch

from define_ops import PRESET_TOKENS, DeFINE, DeFINEConfig
from define_ops.bench import device, device_name, synchronize

PRESET = "lstm_wt103"
ITERATIONS = 8


@pytest.mark.parametrize("validate_ids", [True, "deferred", False], ids=["before", "deferred", "off"])
def test_id_check_in_a_loop(benchmark, bench_options, validate_ids):
    quick, dtype, dev = bench_options["quick"], bench_options["dtype"], device()
    overrides = {"num_embeddings": 2_000, "max_dim": 64, "embedding_dim": 32, "input_dim": 32} if quick else {}
    config = DeFINEConfig.from_preset(PRESET, **overrides)
    layer = DeFINE.from_config(config, device=dev, dtype=dtype, validate_ids=validate_ids).train()
    tokens = 256 if quick else PRESET_TOKENS[PRESET]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.num_embeddings, (tokens,), generator=generator).to(dev)
    width = config.embedding_dim
    model = torch.randn(width, 4 * width, device=dev, dtype=dtype) / width**0.5  # the model behind the layer
    back = torch.randn(4 * width, width, device=dev, dtype=dtype) / (4 * width) ** 0.5

    def step() -> None:
        for _ in range(ITERATIONS):
            hidden = layer(ids) @ model
            (hidden @ back).float().square().mean().backward()
        layer.check_pending_ids()  # what a trainer does after its one host read per step
        synchronize()

    benchmark.group = f"{PRESET}-id-check-loop"
    benchmark.extra_info.update({
        "validate_ids": validate_ids, "backend": layer.active_backend(), "tokens": tokens, "iterations": ITERATIONS,
        "device": device_name(), "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
    })  # fmt: skip
    benchmark.pedantic(step, rounds=3 if quick else 10, warmup_rounds=1, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # absent under --benchmark-disable
        benchmark.extra_info["median_ms_per_iteration"] = stats.stats.median * 1e3 / ITERATIONS
