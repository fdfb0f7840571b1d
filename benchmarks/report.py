"""Renders pytest-benchmark JSON from benchmarks/ into the README's results table and a plot.

    python benchmarks/report.py benchmarks/results/h100.json [--png benchmarks/results/h100.png]

Per dtype: per preset, the median ms of a whole-layer forward + backward (test_bench_layer.py) for
each provider, our backends' speed-ups against the reference, torch.compile of it and the plain
embedding, and the fraction of the floor reached (floor / ours, from test_bench_floor.py); then the
forward alone and, where counted, kernel launches per layer; then issue 8's dedup (test_bench_dedup.py)
and cached-inference (test_bench_inference.py) timings. The PNG shows the layer times as grouped
bars (log scale) with the floor marked.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

PRESET_ORDER = ["lstm_wt103", "lstm_wt103_n7", "txl_wt103", "awd_ptb", "nmt_wmt14"]
PROVIDER_ORDER = [
    "reference", "reference_compiled", "cuda", "triton", "cpu", "cuda_graph", "triton_graph", "cuda_compiled",
    "triton_compiled", "cpu_compiled", "embedding",
]  # fmt: skip
OURS = ("cuda", "triton", "cpu", "cuda_graph", "triton_graph", "cuda_compiled", "triton_compiled", "cpu_compiled")


def load(paths: list[Path]) -> tuple[dict, dict, dict, dict, dict]:
    """(times[dtype][mode][preset][provider] ms, floors[dtype][preset], launches[backend][preset], machine,
    extra: {"dedup": [dtype, preset][provider] {plain, dedup ms, distinct_fraction}, "inference":
    [dtype][preset][provider, mode] ms})."""
    times: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    floors: dict = defaultdict(dict)
    launches: dict = {}
    machine: dict = {}
    extra: dict = {"dedup": defaultdict(lambda: defaultdict(dict)), "inference": defaultdict(lambda: defaultdict(dict))}
    for path in paths:
        for bench in json.loads(path.read_text())["benchmarks"]:
            info = bench.get("extra_info", {})
            name = bench.get("name", "")
            if info.get("kind") == "floor":
                floors[info["dtype"]][info["preset"]] = info
            elif info.get("kind") == "launch_count":
                launches.setdefault(info.get("backend", "cuda"), {})[info["preset"]] = info
            elif info.get("kind") == "ceilings":
                machine.update({k: info.get(k) for k in ("device", "torch", "cuda", "driver")})
                machine.update(
                    matmul_tflops=info.get("matmul_tflops"),
                    matmul_dtype=info.get("matmul_dtype", "bfloat16"),
                    copy_tbps=info.get("copy_tbps"),
                )
            elif name.startswith("test_layer[") and bench.get("stats"):
                times[info["dtype"]][info["mode"]][info["preset"]][info["provider"]] = bench["stats"]["median"] * 1e3
            elif name.startswith("test_dedup[") and bench.get("stats"):
                row = extra["dedup"][info["dtype"], info["preset"]][info["provider"]]
                row["dedup" if info["dedup"] else "plain"] = bench["stats"]["median"] * 1e3
                row["distinct_fraction"] = info.get("distinct_fraction")
            elif name.startswith("test_inference[") and bench.get("stats"):
                extra["inference"][info["dtype"]][info["preset"]][(info["provider"], info["mode"])] = (
                    bench["stats"]["median"] * 1e3
                )
            if info.get("device") and name.startswith(("test_layer[", "test_dedup[", "test_inference[")):
                machine.setdefault("device", info.get("device"))
                machine.setdefault("torch", info.get("torch"))
    return times, floors, launches, machine, extra


def _ms(value: float | None) -> str:
    return "—" if value is None else (f"{value:.3f}" if value < 1 else f"{value:.2f}")


def _ratio(num: float | None, den: float | None) -> str:
    if num is None or den is None or den == 0:
        return "—"
    ratio = num / den
    return f"{ratio:.2f}×" if ratio >= 0.1 else f"{ratio:.3g}×"


def table(times: dict, floors: dict, dtype: str, mode: str) -> str:
    presets = [p for p in PRESET_ORDER if p in times[dtype][mode]] + sorted(
        p for p in times[dtype][mode] if p not in PRESET_ORDER
    )
    providers = [p for p in PROVIDER_ORDER if any(p in times[dtype][mode][q] for q in presets)]
    ours = [p for p in OURS if p in providers]
    head = ["preset", *(f"{p} ms" for p in providers)]
    if mode == "fwd_bwd":
        head.append("floor ms")
    for p in ours:
        head += [f"{p} vs ref", f"{p} vs compile", f"{p} vs embedding"]
        if mode == "fwd_bwd":
            head.append(f"{p} floor fraction")
    both = "cuda" in ours and "triton" in ours
    if both:
        head.append("triton vs cuda")  # issue 5: at least 1/1.25 = 0.80×
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for preset in presets:
        row = times[dtype][mode][preset]
        floor = floors.get(dtype, {}).get(preset, {}).get("floor_ms")
        cells = [preset, *(_ms(row.get(p)) for p in providers)]
        if mode == "fwd_bwd":
            cells.append(_ms(floor))
        for p in ours:
            cells += [
                _ratio(row.get("reference"), row.get(p)),
                _ratio(row.get("reference_compiled"), row.get(p)),
                _ratio(row.get("embedding"), row.get(p)),
            ]
            if mode == "fwd_bwd":
                cells.append(_ratio(floor, row.get(p)))
        if both:
            cells.append(_ratio(row.get("cuda"), row.get("triton")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def launch_table(launches: dict) -> str:
    lines = [
        "| backend | preset | kernels per layer, forward (max) | backward (max) | whole unit forward | "
        "forward + backward |",
        "|---|---|---|---|---|---|",
    ]
    for backend in sorted(launches):
        for preset in [p for p in PRESET_ORDER if p in launches[backend]]:
            info = launches[backend][preset]
            lines.append(
                f"| {backend} | {preset} | {info['max_forward_kernels_per_layer']} | "
                f"{info['max_backward_kernels_per_layer']} | {info['unit_forward_kernels']} | "
                f"{info['unit_forward_backward_kernels']} |"
            )
    return "\n".join(lines)


def dedup_table(rows: dict) -> str:
    lines = ["| provider | plain ms | dedup ms | speed-up | distinct tokens |", "|---|---|---|---|---|"]
    for provider in [p for p in PROVIDER_ORDER if p in rows]:
        row = rows[provider]
        fraction = row.get("distinct_fraction")
        lines.append(
            f"| {provider} | {_ms(row.get('plain'))} | {_ms(row.get('dedup'))} | "
            f"{_ratio(row.get('plain'), row.get('dedup'))} | {'—' if fraction is None else f'{fraction:.1%}'} |"
        )
    return "\n".join(lines)


def inference_table(rows: dict) -> str:
    """Per preset: eval forward without and with the cached table, and the plain embedding."""
    ours = [p for p in OURS if any((p, "fwd") in r or (p, "fwd_cached") in r for r in rows.values())]
    head = ["preset", "reference ms", *(f"{p} ms" for p in ours), *(f"{p} cached ms" for p in ours), "embedding ms"]
    head += [f"{p} cached vs embedding" for p in ours]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for preset in [p for p in PRESET_ORDER if p in rows]:
        row = rows[preset]
        cells = [preset, _ms(row.get(("reference", "fwd")))]
        cells += [_ms(row.get((p, "fwd"))) for p in ours] + [_ms(row.get((p, "fwd_cached"))) for p in ours]
        cells.append(_ms(row.get(("embedding", "fwd"))))
        cells += [_ratio(row.get(("embedding", "fwd")), row.get((p, "fwd_cached"))) for p in ours]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(times: dict, floors: dict, launches: dict, machine: dict, extra: dict | None = None) -> str:
    ceilings = ""
    if machine.get("matmul_tflops"):
        ceilings = (f"; measured ceilings: {machine['matmul_tflops']:.3g} TFLOP/s {machine.get('matmul_dtype')} "
                    f"matmul, {machine.get('copy_tbps') or 0:.3g} TB/s copy")  # fmt: skip
    parts = [
        f"Device: {machine.get('device')}, torch {machine.get('torch')}, CUDA {machine.get('cuda')}, "
        f"driver {machine.get('driver')}{ceilings}. Medians; speed-ups are other / ours; floor fraction = floor / ours."
    ]
    for dtype in sorted(times):
        for mode, title in (("fwd_bwd", "forward + backward"), ("fwd", "forward only (eval, no cache)")):
            if times[dtype].get(mode):
                parts += [f"\n**{dtype}, {title}**\n", table(times, floors, dtype, mode)]
    if launches:
        parts += ["\n**Kernel launches**\n", launch_table(launches)]
    extra = extra or {}
    for (dtype, preset), rows in sorted(extra.get("dedup", {}).items()):
        parts += [f"\n**{dtype}, distinct tokens once (dedup): {preset} shapes, a WikiText-2 window, "
                  "forward + backward**\n", dedup_table(rows)]  # fmt: skip
    for dtype, rows in sorted(extra.get("inference", {}).items()):
        parts += [f"\n**{dtype}, inference: eval forward with and without the cached table**\n",
                  inference_table(rows)]  # fmt: skip
    return "\n".join(parts) + "\n"


def plot(times: dict, floors: dict, png: Path, dtype: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = times[dtype]["fwd_bwd"]
    presets = [p for p in PRESET_ORDER if p in data]
    providers = [p for p in PROVIDER_ORDER if any(p in data[q] for q in presets)]
    width = 0.8 / max(1, len(providers))
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(presets)), 4.2))
    for i, provider in enumerate(providers):
        xs = [k + i * width for k in range(len(presets)) if provider in data[presets[k]]]
        ys = [data[p][provider] for p in presets if provider in data[p]]
        ax.bar(xs, ys, width=width, label=provider)
    for k, preset in enumerate(presets):
        floor = floors.get(dtype, {}).get(preset, {}).get("floor_ms")
        if floor:
            ax.hlines(floor, k - width / 2, k + 0.8 - width / 2, colors="black", linestyles="dashed")
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(presets))], presets)
    ax.set_yscale("log")
    ax.set_ylabel("ms per forward + backward (log)")
    ax.set_title(f"DeFINE layer, {dtype}: providers vs the floor (dashed)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+", type=Path, help="pytest-benchmark JSON files (one run, one card)")
    parser.add_argument("--png", type=Path, default=None, help="write the fwd+bwd plot here")
    parser.add_argument("--plot-dtype", default="bfloat16")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables here")
    args = parser.parse_args()
    times, floors, launches, machine, extra = load(args.json)
    text = render(times, floors, launches, machine, extra)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.png and times.get(args.plot_dtype, {}).get("fwd_bwd"):
        plot(times, floors, args.png, args.plot_dtype)


if __name__ == "__main__":
    main()
