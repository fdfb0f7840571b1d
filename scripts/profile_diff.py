"""Two scripts/gpu_profile.py JSONs side by side: the A/B of a tuning switch in one GPU session.

    python scripts/profile_diff.py BASE.json OTHER.json [--match REGEX]

Per preset × provider found in both (a configuration variant ``<preset>+gw8`` of
``--group-width-multiple`` pairs with its preset): the wall-clock step, the kernel time per step and their
ratios (OTHER / BASE), then the per-step time of every kernel whose name matches REGEX (default
our epilogue kernels, ``hgt_step_``), from each side's top kernels. E.g. the warp-row epilogues
(scripts/gpu_session.sh writes profile.json and profile-warp-rows.json):

    python scripts/profile_diff.py profile.json profile-warp-rows.json
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def load(path: Path) -> dict[tuple[str, str], dict]:
    return {(row["preset"].split("+")[0], row["provider"]): row for row in json.loads(path.read_text())["results"]}


def kernel_times(row: dict, pattern: re.Pattern[str]) -> dict[str, float]:
    """µs per step of the matching kernels among the row's top kernels, by name."""
    return {name: us for name, _, us in row.get("top_kernels", []) if pattern.search(name)}


def compare(base: dict, other: dict, pattern: re.Pattern[str]) -> list[str]:
    lines = []
    for key in (k for k in base if k in other):
        a, b = base[key], other[key]
        wall, kernels = (a["wall_ms"], b["wall_ms"]), (a["kernel_ms_per_step"], b["kernel_ms_per_step"])
        name = a["preset"] if a["preset"] == b["preset"] else f"{a['preset']} -> {b['preset']}"
        lines.append(
            f"{name} {key[1]}: wall {wall[0]:.3f} -> {wall[1]:.3f} ms ({wall[1] / wall[0]:.2f}x), "
            f"kernels {kernels[0]:.3f} -> {kernels[1]:.3f} ms ({kernels[1] / kernels[0]:.2f}x)"
        )
        before, after = kernel_times(a, pattern), kernel_times(b, pattern)
        for name in sorted(set(before) | set(after), key=lambda n: -max(before.get(n, 0.0), after.get(n, 0.0))):
            short = re.sub(r"^void |[a-z_:]*\(anonymous namespace\)::|at::native::", "", name).split("(")[0]
            lines.append(f"    {short[:90]}: {before.get(name, 0.0):8.1f} -> {after.get(name, 0.0):8.1f} us")
        total_before, total_after = sum(before.values()), sum(after.values())
        lines.append(f"    matching kernels in all: {total_before:8.1f} -> {total_after:8.1f} us")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path)
    parser.add_argument("other", type=Path)
    parser.add_argument("--match", default="hgt_step_", help="regex on kernel names (default: our epilogues)")
    args = parser.parse_args()
    print("\n".join(compare(load(args.base), load(args.other), re.compile(args.match))))


if __name__ == "__main__":
    main()
