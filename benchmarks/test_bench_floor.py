"""The card's ceilings, each preset's floor, and kernel launches per layer (issue 4's targets).

- ``test_ceilings``: bf16 8192³ matmul rate and copy bandwidth, measured in this run;
- ``test_floor``: per preset, max(FLOPs at that rate, bytes that must move at that bandwidth)
  (define_ops/perf.py says what is counted), next to the times of test_bench_layer.py;
- ``test_launch_count``: kernels per HGT layer in the forward and backward of each GPU backend
  (cuda, triton), counted with the torch profiler on each layer's real shapes (target: at most 2
  and 3), and the whole unit's totals (lookup, Reduce and padding mask included).

``extra_info`` carries the numbers; benchmarks/report.py turns the JSON into the README table.
"""

from __future__ import annotations

import functools

import pytest
import torch

from define_ops import PRESET_TOKENS, DeFINE, DeFINEConfig, perf
from define_ops.bench import QUICK_TOKENS, QUICK_VOCAB, device, device_name


@functools.cache
def ceilings(quick: bool) -> dict:
    return perf.measure_ceilings(device(), quick=quick)


def machine_info() -> dict:
    return {
        "device": device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "driver": perf.driver_version() if torch.cuda.is_available() else None,
    }


def test_ceilings(benchmark, bench_options):
    values = ceilings(bench_options["quick"])
    benchmark.group = "ceilings"
    benchmark.extra_info.update(kind="ceilings", **values, **machine_info())
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


def test_floor(benchmark, bench_options, preset):
    quick = bench_options["quick"]
    config = DeFINEConfig.from_preset(preset, **({"num_embeddings": QUICK_VOCAB} if quick else {}))
    tokens = QUICK_TOKENS if quick else PRESET_TOKENS[preset]
    dtype_bytes = torch.empty(0, dtype=bench_options["dtype"]).element_size()
    values = ceilings(quick)
    benchmark.group = "floor"
    benchmark.extra_info.update(
        kind="floor", preset=preset, tokens=tokens, dtype=str(bench_options["dtype"]).replace("torch.", ""),
        **perf.floor_ms(config, tokens, values, dtype_bytes), **values, **machine_info(),
    )  # fmt: skip
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


def _layer_counts(module: DeFINE, ids: torch.Tensor) -> list[dict]:
    """Per HGT layer (and the Reduce layer): kernels of its forward and of its backward."""
    suffix = "_triton" if module.backend == "triton" else ""
    if suffix:  # the Triton ops register on first import, which a forward would do lazily
        import define_ops.triton  # noqa: F401
    step_op = getattr(torch.ops.define_ops, f"hgt_step{suffix}")
    step_backward_op = getattr(torch.ops.define_ops, f"hgt_step{suffix}_backward")
    counts = []
    seeds = torch.randint(0, 2**62, (module.config.depth,), device=ids.device)
    x = module.embed_ids(ids.reshape(-1)).detach()
    plans = module.plans
    for index, plan in enumerate(plans):
        if index < len(plans) - 1:
            layer = module.layers[index]
            gamma, beta = (layer.norm.weight, layer.norm.bias) if layer.norm is not None else (None, None)
            args = (x, layer.weight, layer.bias, gamma, beta, seeds[index] if plan.dropout else None, plan.e_width,
                    plan.e_in_chunks, plan.e_out_chunks, plan.shuffle, plan.activation or "none", float(plan.dropout),
                    module.config.norm_eps)  # fmt: skip
        else:
            args = (x, module.reduce.weight.t().unsqueeze(0), module.reduce.bias, None, None, None, plan.e_width,
                    plan.e_in_chunks, 0, False, "none", 0.0, module.config.norm_eps)  # fmt: skip
        outputs = step_op(*args)  # also the warm-up (Triton autotunes on its first call)
        grad = torch.randn_like(outputs[0])
        step_backward_op(grad, *args[:6], *outputs[1:], *args[6:])
        forward = perf.kernel_launches(lambda args=args: step_op(*args))
        backward = perf.kernel_launches(
            lambda args=args, outputs=outputs, grad=grad: step_backward_op(grad, *args[:6], *outputs[1:], *args[6:])
        )
        counts.append(
            {
                "layer": index if index < len(plans) - 1 else "reduce",
                "forward_kernels": len(forward["kernels"]),
                "backward_kernels": len(backward["kernels"]),
                "forward_memsets": forward["memsets"],
                "backward_memsets": backward["memsets"],
                "forward_names": forward["kernels"],
                "backward_names": backward["kernels"],
            }
        )
        x = outputs[0].detach()
    return counts


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_launch_count(benchmark, bench_options, preset, backend):
    if not torch.cuda.is_available():
        pytest.skip("kernel launches are counted on a GPU")
    from define_ops import available_backends

    if backend not in available_backends("cuda"):
        pytest.skip(f"the {backend} backend is unavailable on this GPU")
    quick = bench_options["quick"]
    config = DeFINEConfig.from_preset(preset, **({"num_embeddings": QUICK_VOCAB} if quick else {}))
    tokens = QUICK_TOKENS if quick else PRESET_TOKENS[preset]
    module = DeFINE.from_config(config, backend=backend, device="cuda", dtype=bench_options["dtype"]).train()
    ids = torch.randint(0, config.num_embeddings, (tokens,), device="cuda")
    with torch.no_grad():
        layers = _layer_counts(module, ids)
    grad = torch.randn(tokens, config.embedding_dim, device="cuda", dtype=bench_options["dtype"])
    whole_forward = perf.kernel_launches(lambda: module(ids))
    whole_backward = perf.kernel_launches(lambda: module(ids).backward(grad), warmup=1)
    hgt = [c for c in layers if c["layer"] != "reduce"]
    benchmark.group = "launch-count"
    benchmark.extra_info.update(
        kind="launch_count", backend=backend, preset=preset, tokens=tokens,
        dtype=str(bench_options["dtype"]).replace("torch.", ""), layers=layers,
        max_forward_kernels_per_layer=max(c["forward_kernels"] for c in hgt),
        max_backward_kernels_per_layer=max(c["backward_kernels"] for c in hgt),
        unit_forward_kernels=len(whole_forward["kernels"]),
        unit_forward_backward_kernels=len(whole_backward["kernels"]),
        unit_forward_names=whole_forward["kernels"],
        unit_forward_backward_names=whole_backward["kernels"],
        **machine_info(),
    )  # fmt: skip

    def step():
        module.zero_grad(set_to_none=True)
        module(ids).backward(grad)
        torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=3, warmup_rounds=1, iterations=1)
