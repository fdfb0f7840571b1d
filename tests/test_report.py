"""benchmarks/report.py turns the benchmark JSON into the README tables and plot. A GPU session has
minutes, so the report must not be the step that fails there: render it here from a real (quick)
CPU run of our harness, plus the GPU-only records (cuda/triton rows, launch counts) it will see."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("report") / "bench.json"
    command = [
        sys.executable, "-m", "pytest", "benchmarks/test_bench_layer.py", "benchmarks/test_bench_floor.py",
        "benchmarks/test_bench_dedup.py", "benchmarks/test_bench_inference.py", "-q",
        "-p", "no:cacheprovider", "--quick", "--benchmark-only", "--presets", "awd_ptb",
        "--providers", "reference,cpu,embedding", "--dtype", "float32", f"--benchmark-json={out}",
    ]  # fmt: skip
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True, timeout=600)
    return json.loads(out.read_text())


def with_gpu_records(run: dict) -> dict:
    """The CPU run, plus what a GPU run adds: cuda and triton rows (2 and 4 times faster than the
    cpu rows, so the ratios are known) and one launch-count record per GPU backend."""
    run = copy.deepcopy(run)
    added = []
    for bench in run["benchmarks"]:
        if bench["extra_info"].get("provider") == "cpu":
            for provider, speedup in (("cuda", 2.0), ("triton", 4.0)):
                row = copy.deepcopy(bench)
                row["name"] = bench["name"].replace("-cpu-", f"-{provider}-")
                row["extra_info"]["provider"] = provider
                row["stats"] = {k: v / speedup for k, v in bench["stats"].items() if isinstance(v, float)}
                added.append(row)
    for backend, forward in (("cuda", 2), ("triton", 3)):
        added.append({
            "name": f"test_launch_count[awd_ptb-{backend}]", "group": "launch-count", "stats": {"median": 0.0},
            "extra_info": {
                "kind": "launch_count", "backend": backend, "preset": "awd_ptb",
                "max_forward_kernels_per_layer": forward, "max_backward_kernels_per_layer": 3,
                "unit_forward_kernels": 17, "unit_forward_backward_kernels": 41,
            },
        })  # fmt: skip
    run["benchmarks"] += added
    return run


def render(tmp_path: Path, run: dict) -> tuple[str, Path]:
    source = tmp_path / "in.json"
    source.write_text(json.dumps(run))
    markdown, png = tmp_path / "report.md", tmp_path / "bench.png"
    subprocess.run(
        [sys.executable, "benchmarks/report.py", str(source), "--markdown", str(markdown), "--png", str(png),
         "--plot-dtype", "float32"],
        cwd=ROOT, check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return markdown.read_text(), png


def test_report_renders_a_cpu_run(cpu_run, tmp_path):
    text, png = render(tmp_path, cpu_run)
    assert "**float32, forward + backward**" in text and "**float32, forward only" in text
    assert "| awd_ptb |" in text and "cpu vs ref" in text and "cpu floor fraction" in text
    assert "triton vs cuda" not in text and "Kernel launches" not in text
    assert "inference: eval forward" in text and "cpu cached vs embedding" in text
    if any(b["name"].startswith("test_dedup[") for b in cpu_run["benchmarks"]):  # needs WikiText-2
        assert "distinct tokens once (dedup)" in text and "| cpu |" in text
    assert png.stat().st_size > 1000


def test_report_renders_gpu_records(cpu_run, tmp_path):
    text, _ = render(tmp_path, with_gpu_records(cpu_run))
    table = text.split("**float32, forward + backward**")[1].split("**")[0]
    header, _, row = (line for line in table.strip().splitlines() if line.startswith("|"))
    split = lambda line: [cell.strip() for cell in line.strip().strip("|").split("|")]
    cells = dict(zip(split(header), split(row), strict=True))
    assert cells["triton vs cuda"] == "2.00×"  # cuda time / triton time
    assert cells["cuda vs ref"] != "—" and cells["triton floor fraction"] != "—"
    assert "| cuda | awd_ptb | 2 | 3 | 17 | 41 |" in text
    assert "| triton | awd_ptb | 3 | 3 | 17 | 41 |" in text
