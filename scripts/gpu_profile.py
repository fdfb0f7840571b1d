"""Where a training step's time goes on the GPU: wall clock vs kernel time vs host time.

    python scripts/gpu_profile.py [--presets awd_ptb,lstm_wt103] [--providers reference,cuda] [--json F]

Per preset × provider (bf16, forward + backward of the whole layer, as benchmarks/test_bench_layer.py
runs it): the median wall-clock step, the kernel time per step summed from the torch profiler
(busy GPU time: when it is far below the wall clock, the host is the bottleneck), the top kernels
and the top host-side ops. For the compiled backends also the step replayed as a CUDA graph (no
host work at all): the time the kernels alone need, launch gaps included.

``enqueue_ms``: the host time of one step alone, measured while a sleep kernel keeps the GPU busy
far longer than the step takes, so that no launch waits for the device: when it is close to the
wall clock, the step is host-bound. A step whose enqueue time reaches the sleep's length waited for
the device somewhere (a hidden host synchronisation): ``hidden_sync`` says so. ``--trace DIR``
writes a Chrome trace per preset x provider (open in Perfetto) to see the gaps between launches.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from define_ops.bench import device_name, enqueue_ms, make_workload, median_ms


def profile_step(step, steps: int = 5) -> dict:
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
    kernels: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    host: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = kernels[event.name[:110]]
            entry[0] += 1
            entry[1] += event.device_time_total
        elif event.device_type == torch.autograd.DeviceType.CPU:
            entry = host[event.name[:80]]
            entry[0] += 1
            entry[1] += event.self_cpu_time_total
    busy_us = sum(t for _, t in kernels.values()) / steps
    top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:14]
    top_host = sorted(host.items(), key=lambda kv: -kv[1][1])[:14]
    return {
        "kernel_ms_per_step": busy_us / 1e3,
        "kernels_per_step": sum(n for n, _ in kernels.values()) / steps,
        "top_kernels": [(name, n / steps, t / steps) for name, (n, t) in top],
        "top_host_ops": [(name, n / steps, t / steps) for name, (n, t) in top_host],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="awd_ptb,lstm_wt103,txl_wt103,nmt_wmt14")
    parser.add_argument("--providers", default="reference,cuda,embedding")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--json", default=None)
    parser.add_argument("--trace", default=None, help="directory for one Chrome trace per preset x provider")
    parser.add_argument("--group-width-multiple", type=int, default=1,
                        help="DeFINEConfig.group_width_multiple (rows named <preset>+gw<N>)")  # fmt: skip
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    results = []
    for preset in args.presets.split(","):
        for provider in args.providers.split(","):
            work = make_workload(preset, provider, "fwd_bwd", quick=False, dtype=dtype,
                                 group_width_multiple=args.group_width_multiple)  # fmt: skip
            row = {"preset": work.preset, "provider": provider, "wall_ms": median_ms(work.step, rounds=20, warmup=3)}
            row.update(profile_step(work.step))
            row["enqueue_ms"], row["hidden_sync"] = enqueue_ms(work.enqueue)
            if args.trace:
                Path(args.trace).mkdir(parents=True, exist_ok=True)
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(3):
                        work.step()
                prof.export_chrome_trace(str(Path(args.trace) / f"trace-{preset}-{provider}.json"))
            if provider in ("cuda", "triton"):
                try:
                    graphed = make_workload(preset, f"{provider}_graph", "fwd_bwd", quick=False, dtype=dtype,
                                            group_width_multiple=args.group_width_multiple)  # fmt: skip
                    row["graph_ms"] = median_ms(graphed.step, rounds=20, warmup=3)
                except Exception as error:  # report, keep profiling the rest
                    row["graph_error"] = f"{type(error).__name__}: {str(error)[:300]}"
            results.append(row)
            print(
                f"\n### {preset} {provider}: wall {row['wall_ms']:.3f} ms, host enqueue {row['enqueue_ms']:.3f} ms"
                f"{' (WAITED FOR THE DEVICE: a hidden synchronisation)' if row['hidden_sync'] else ''}, kernels "
                f"{row['kernel_ms_per_step']:.3f} ms ({row['kernels_per_step']:.0f}/step), "
                f"graph {row.get('graph_ms', row.get('graph_error'))}"
            )
            for name, count, us in row["top_kernels"]:
                print(f"  gpu  {us:9.1f} us  x{count:4.1f}  {name}")
            for name, count, us in row["top_host_ops"]:
                print(f"  host {us:9.1f} us  x{count:4.1f}  {name}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": device_name(), "torch": torch.__version__, "results": results}, handle)


if __name__ == "__main__":
    main()
