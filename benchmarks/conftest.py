"""Options and parametrization of the benchmark suite (the workloads live in define_ops/bench.py).

    pytest benchmarks/ --benchmark-only                       # full sizes on whatever device is present
    pytest benchmarks/ --benchmark-only --benchmark-json benchmarks/results/<card>.json
    pytest benchmarks/ --benchmark-disable --quick            # CI: every body once, small shapes
"""

from __future__ import annotations

import pytest
import torch

from define_ops.bench import device, providers_for

BENCH_PRESETS = ["lstm_wt103", "lstm_wt103_n7", "txl_wt103", "awd_ptb", "nmt_wmt14"]
QUICK_PRESETS = ["awd_ptb", "nmt_wmt14"]


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="small shapes, two presets (CI smoke run)")
    parser.addoption("--presets", default=None, help="comma-separated presets to run (default: all five)")
    parser.addoption("--providers", default=None, help="comma-separated providers to run (default: all available)")
    parser.addoption("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    parser.addoption("--group-width-multiple", type=int, default=1,
                     help="DeFINEConfig.group_width_multiple for the presets (results as <preset>+gw<N>)")  # fmt: skip


@pytest.fixture
def bench_options(request):
    quick = request.config.getoption("--quick")
    dtype_name = request.config.getoption("--dtype") or ("bfloat16" if torch.cuda.is_available() else "float32")
    return {"quick": quick, "dtype": getattr(torch, dtype_name),
            "group_width_multiple": request.config.getoption("--group-width-multiple")}  # fmt: skip


def pytest_generate_tests(metafunc):
    if "preset" in metafunc.fixturenames:
        quick = metafunc.config.getoption("--quick")
        names = metafunc.config.getoption("--presets")
        presets = names.split(",") if names else (QUICK_PRESETS if quick else BENCH_PRESETS)
        metafunc.parametrize("preset", presets)
    if "provider" in metafunc.fixturenames:
        names = metafunc.config.getoption("--providers")
        providers = names.split(",") if names else providers_for(device())
        metafunc.parametrize("provider", providers)
