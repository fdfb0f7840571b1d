"""End-to-end training step of the LSTM LM at the ``lstm_wt103`` preset's shapes (Table 9: V = 267,735,
4 LSTM layers of 1024, n = m = 256, batch 60 × BPTT 140, tied adaptive softmax 20k/40k/200k):
DeFINE on each backend (with adaptive input as its Map, as Table 1a R3, plain and with ``dedup``)
vs a standard embedding vs adaptive input. Target: DeFINE's step at most 1.1× the standard
embedding's. Ids are Zipf-distributed like word frequencies; under ``--quick``
the shapes shrink so CI runs every body once.

    pytest benchmarks/test_bench_lm.py --benchmark-only --benchmark-json benchmarks/results/lm_step_<card>.json
"""

from __future__ import annotations

import pytest
import torch

import define_ops
from define_ops.bench import device, device_name, synchronize
from models.lstm_lm import LSTMLM, LSTMLMConfig

FULL = {"vocab": 267_735, "n": 256, "hidden": 1024, "layers": 4, "batch": 60, "bptt": 140,
        "cutoffs": [20_000, 40_000, 200_000]}  # fmt: skip
QUICK = {"vocab": 2_000, "n": 32, "hidden": 64, "layers": 2, "batch": 4, "bptt": 16, "cutoffs": [200, 800]}


def lm_providers() -> list[str]:
    dev = device()
    backends = [b for b in define_ops.available_backends(dev) if not (dev.type == "cpu" and b == "triton")]
    ours = [f"define-{b}" for b in backends] + [f"define-{b}-dedup" for b in backends if b != "reference"]
    return ours + ["standard", "adaptive"]


def zipf_ids(shape: tuple[int, int], vocab: int, generator: torch.Generator) -> torch.Tensor:
    ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
    return torch.multinomial(1.0 / ranks, shape[0] * shape[1], replacement=True, generator=generator).view(shape)


@pytest.mark.parametrize("lm_provider", lm_providers())
def test_lstm_lm_training_step(benchmark, bench_options, lm_provider):
    s = QUICK if bench_options["quick"] else FULL
    dev = device()
    embedding, _, rest = lm_provider.partition("-")
    backend, _, variant = rest.partition("-")
    config = LSTMLMConfig(
        s["vocab"], embedding, table_dim=s["n"], input_dim=s["n"], hidden=s["hidden"], layers=s["layers"],
        cutoffs=s["cutoffs"], div_val=1 if embedding == "standard" else 4,
        define={"max_dim": 1024 if not bench_options["quick"] else 64, "depth": 3, "max_groups": 4, "dropout": 0.1,
                "backend": backend or "auto", "map": "adaptive", "dedup": variant == "dedup",
                "validate_ids": "deferred"},  # what the models (and their trainers) run
    )  # fmt: skip
    torch.manual_seed(0)
    model = LSTMLM(config).to(dev).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    g = torch.Generator().manual_seed(0)
    ids = zipf_ids((s["bptt"] + 1, s["batch"]), s["vocab"], g).to(dev)  # [T + 1, B]
    state = model.init_state(s["batch"], dev)
    autocast = torch.autocast(dev.type, dtype=bench_options["dtype"], enabled=dev.type == "cuda")

    def step() -> None:
        with autocast:
            out = model(ids[:-1], ids[1:], state)
        out.nll.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize()

    benchmark.group = "lstm_lm-step"
    tokens = s["bptt"] * s["batch"]
    benchmark.extra_info.update({"provider": lm_provider, "tokens": tokens, "device": device_name(), "shapes": s,
                                 "dtype": str(bench_options["dtype"]).replace("torch.", ""),
                                 "torch": torch.__version__})  # fmt: skip
    benchmark.pedantic(step, rounds=3 if bench_options["quick"] else 10, warmup_rounds=1, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # absent under --benchmark-disable
        benchmark.extra_info["median_ms"] = stats.stats.median * 1e3
        benchmark.extra_info["tokens_per_s"] = tokens / stats.stats.median
