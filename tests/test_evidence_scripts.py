"""The GPU evidence scripts of issues 6 and 7 end to end, at smoke size on the CPU, and the GPU
profiling script: a GPU session has minutes, so their plumbing (training, summaries, tables, plot,
results JSON) is checked here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DEFINE_OPS_DATA", ROOT.parent / "shared" / "data"))


def run_script(script: str, env: dict[str, str]) -> str:
    done = subprocess.run(["bash", f"scripts/{script}", *env.pop("ARGS", "").split()], cwd=ROOT,
                          env={**os.environ, "PYTHON": sys.executable, **env}, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


# PARALLEL=1: the runs at once on one card (a GPU session's minutes); their results must be the same
# files and tables, with the speed column saying the card was shared.
@pytest.mark.skipif(not (DATA / "wikitext-2" / "train.txt").exists(), reason="needs ../shared/data/wikitext-2")
@pytest.mark.parametrize("parallel", ["0", "1"])
def test_lm_evidence_script_smoke(tmp_path, parallel):
    results = tmp_path / "results"
    out = run_script("gpu_lm_evidence.sh", {
        "ARGS": str(results), "DEFINE_OPS_DATA": str(DATA), "RUNS_DIR": str(tmp_path / "runs"), "STEPS": "2",
        "EVAL_EVERY": "1", "M": "32", "BENCH_ARGS": "--quick", "PARALLEL": parallel,
        "SEEDS": "1111 7" if parallel == "1" else "1111",
        "EXTRA": "--max-eval-tokens 500 --hidden 32 --layers 1 --batch-size 2 --bptt 4",
    })  # fmt: skip
    assert "| define |" in out and "| standard_256 |" in out and "| standard_m |" in out
    assert ("6 runs sharing the card" in out) == (parallel == "1")
    if parallel == "1":  # a second seed of each run, its own log, and a mean row per run
        for name in ("define", "standard_256", "standard_m", "define_seed7", "standard_256_seed7", "standard_m_seed7"):
            assert "test ppl" in (tmp_path / "runs" / "lm_wt2_cpu" / f"{name}.run.log").read_text()
        for name, seed in (("define", 1111), ("define_seed7", 7)):
            config = json.loads((results / "lm_wt2_cpu" / name / "metrics.jsonl").read_text().splitlines()[0])
            assert config["event"] == "config" and config["config"]["seed"] == seed
        assert "| define, mean of 2 seeds |" in out and "| standard_m, mean of 2 seeds |" in out
        # SKIP_DONE=1 adds a seed without training the six runs again; a run finished in RUNS_DIR but
        # missing from the results (a GPU session packs and clears them) is copied out, not retrained
        shutil.rmtree(results / "lm_wt2_cpu" / "define")
        out = run_script("gpu_lm_evidence.sh", {
            "ARGS": str(results), "DEFINE_OPS_DATA": str(DATA), "RUNS_DIR": str(tmp_path / "runs"), "STEPS": "2",
            "EVAL_EVERY": "1", "M": "32", "BENCH_ARGS": "--quick", "PARALLEL": "1", "SEEDS": "1111 7 9",
            "SKIP_DONE": "1", "EXTRA": "--max-eval-tokens 500 --hidden 32 --layers 1 --batch-size 2 --bptt 4",
        })  # fmt: skip
        assert out.count("done earlier") == 6 and "as each run measured it" in out
        assert (results / "lm_wt2_cpu" / "define" / "summary.json").exists()
        assert "| define_seed9 |" in out and "| define, mean of 3 seeds |" in out
    for name in ("define", "standard_256", "standard_m"):
        summary = json.loads((results / "lm_wt2_cpu" / name / "summary.json").read_text())
        assert summary["valid_ppl"] > 1 and summary["parameters"]["total"] > 0
    assert (results / "lm_wt2_cpu" / "summary.md").exists() and (results / "lm_wt2_cpu.png").exists()
    bench = json.loads((results / "lm_step_cpu.json").read_text())
    assert len(bench["benchmarks"]) >= 3


@pytest.mark.skipif(not (DATA / "multi30k" / "train.en").exists(), reason="needs ../shared/data/multi30k")
def test_nmt_evidence_script_smoke(tmp_path):
    out = run_script("gpu_nmt_evidence.sh", {
        "SMOKE": "1", "NMT_DATA": str(DATA / "multi30k"), "RUNS_DIR": str(tmp_path / "runs"),
        "NMT_RUNS": "define define_untied standard",
    })  # fmt: skip
    assert "| define |" in out and "| define_untied |" in out and "| standard |" in out and "sacrebleu: nrefs:1" in out
    results = json.loads((tmp_path / "runs" / "nmt_multi30k_cpu.json").read_text())
    assert list(results["runs"]) == ["define", "define_untied", "standard"]
    assert results["runs_sharing_the_card"] == 1 and "sharing the card" not in out
    assert "means_over_seeds" not in results
    runs = results["runs"]
    assert runs["define"]["parameters"]["total"] > 0 and runs["define"]["output_layer"] == "tied"
    assert runs["define_untied"]["output_layer"] == "untied" and runs["define_untied"]["parameters"]["output"] > 0


@pytest.mark.skipif(not (DATA / "multi30k" / "train.en").exists(), reason="needs ../shared/data/multi30k")
def test_nmt_evidence_script_runs_seeds_at_once(tmp_path):
    out = run_script("gpu_nmt_evidence.sh", {
        "SMOKE": "1", "NMT_DATA": str(DATA / "multi30k"), "RUNS_DIR": str(tmp_path / "runs"),
        "NMT_RUNS": "define standard", "NMT_SEEDS": "1 2", "PARALLEL": "1",
    })  # fmt: skip
    results = json.loads((tmp_path / "runs" / "nmt_multi30k_cpu.json").read_text())
    runs = results["runs"]
    assert list(runs) == ["define", "standard", "define_seed2", "standard_seed2"]
    assert [runs[name]["seed"] for name in runs] == [1, 1, 2, 2]
    assert results["runs_sharing_the_card"] == 4 and "4 runs sharing the card" in out
    means = results["means_over_seeds"]
    assert set(means) == {"define", "standard"} and means["define"]["seeds"] == [1, 2]
    expected = (runs["define"]["test_loss"] + runs["define_seed2"]["test_loss"]) / 2
    assert means["define"]["test_loss"] == pytest.approx(expected)
    assert "| define | 1, 2 |" in out
    for name in runs:  # each run's own log
        assert "test BLEU" in (tmp_path / "runs" / f"{name}.run.log").read_text()
    # a rerun with SKIP_DONE=1 trains nothing that is done and reports the same runs
    out = run_script("gpu_nmt_evidence.sh", {
        "SMOKE": "1", "NMT_DATA": str(DATA / "multi30k"), "RUNS_DIR": str(tmp_path / "runs"),
        "NMT_RUNS": "define standard", "NMT_SEEDS": "1 2", "PARALLEL": "1", "SKIP_DONE": "1",
    })  # fmt: skip
    assert out.count("done earlier") == 4 and "as each run measured it" in out
    again = json.loads((tmp_path / "runs" / "nmt_multi30k_cpu.json").read_text())
    assert again["runs"] == runs and again["runs_done_earlier"] == 4


def test_gpu_profile_script_runs_and_writes_its_json(tmp_path):
    # On the CPU there are no kernels to sum and no graphs to capture; the timing, the profiler
    # plumbing and the JSON are the same code the GPU session runs.
    out = tmp_path / "profile.json"
    done = subprocess.run(
        [sys.executable, "scripts/gpu_profile.py", "--presets", "awd_ptb", "--providers", "embedding",
         "--dtype", "float32", "--json", str(out), "--trace", str(tmp_path / "traces")],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "### awd_ptb embedding: wall" in done.stdout
    (row,) = json.loads(out.read_text())["results"]
    assert row["preset"] == "awd_ptb" and row["wall_ms"] > 0 and row["top_host_ops"]
    assert row["enqueue_ms"] > 0 and row["hidden_sync"] is False
    assert json.loads((tmp_path / "traces" / "trace-awd_ptb-embedding.json").read_text())["traceEvents"]


def test_host_costs_script_runs_and_writes_its_json(tmp_path):
    out = tmp_path / "host_costs.json"
    done = subprocess.run(
        [sys.executable, "scripts/host_costs.py", "--presets", "awd_ptb", "--quick", "--json", str(out)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]["awd_ptb"]
    assert [row["call"] for row in rows][:5] == ["launch", "bmm", "hgt_step", "hgt_stack", "hgt_stack_backward"]
    assert all(row["host_ms"] > 0 and row["waited"] is False for row in rows)


def test_gemm_census_script_runs_on_the_cpu():
    done = subprocess.run(
        [sys.executable, "scripts/gemm_census.py", "--device", "cpu", "--tokens", "16", "--dtype", "float32",
         "--presets", "nmt_wmt14"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split(" | ")[1:4] for row in rows] == [["4", "32", "108"], ["2", "280", "364"], ["1", "856", "1024"]]


def test_profile_diff_compares_two_profiles(tmp_path):
    """scripts/profile_diff.py (the A/B printout of a GPU session) on two made-up gpu_profile JSONs."""

    def row(wall, kernels, epilogue_name, epilogue_us):
        return {"preset": "awd_ptb", "provider": "cuda", "wall_ms": wall, "kernel_ms_per_step": kernels,
                "top_kernels": [[epilogue_name, 7.0, epilogue_us], ["nvjet_sm90_gemm", 1.0, 7.0]]}  # fmt: skip

    base, other = tmp_path / "base.json", tmp_path / "other.json"
    base.write_text(json.dumps({"results": [row(2.0, 0.5, "hgt_step_backward_kernel<bf16>", 222.0)]}))
    other.write_text(json.dumps({"results": [row(1.5, 0.4, "hgt_step_backward_warp_kernel<bf16>", 100.0)]}))
    done = subprocess.run([sys.executable, "scripts/profile_diff.py", str(base), str(other)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "awd_ptb cuda: wall 2.000 -> 1.500 ms (0.75x), kernels 0.500 -> 0.400 ms (0.80x)" in out
    assert "hgt_step_backward_kernel<bf16>:    222.0 ->      0.0 us" in out
    assert "hgt_step_backward_warp_kernel<bf16>:      0.0 ->    100.0 us" in out
    assert "matching kernels in all:    222.0 ->    100.0 us" in out and "nvjet" not in out

    # a configuration variant (gpu_profile.py --group-width-multiple 8) pairs with its preset
    variant = json.loads(other.read_text())
    variant["results"][0]["preset"] = "awd_ptb+gw8"
    other.write_text(json.dumps(variant))
    done = subprocess.run([sys.executable, "scripts/profile_diff.py", str(base), str(other), "--match", "."],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert "awd_ptb -> awd_ptb+gw8 cuda: wall 2.000 -> 1.500 ms" in done.stdout and "nvjet" in done.stdout


def test_nmt_step_profile_script_runs_and_writes_its_json(tmp_path):
    out = tmp_path / "nmt-step-profile.json"
    done = subprocess.run([sys.executable, "scripts/nmt_step_profile.py", "--quick", "--tokens", "64", "--steps", "2",
                           "--new-shapes", "3", "--json", str(out)],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"define", "standard"}
    assert all(r["step_ms"] > 0 and r["top_ops"] for r in runs.values())
    assert all(r["new_shape_step_ms"] > 0 and r["seen_shape_step_ms"] > 0 for r in runs.values())
    lengths = [runs[name]["new_shape_lengths"] for name in ("define", "standard")]
    assert len(lengths[0]) == 3 and not set(lengths[0]) & set(lengths[1])  # no shape shared between the inputs


def test_ab_interleaved_script_times_each_variant_in_turns(tmp_path):
    # On the CPU: the env switch every backend reads (the stack op against the step-op loop) and a
    # configuration variant; the GPU session runs the CUDA switches the same way.
    for variants, preset, names in ((["--env", "DEFINE_OPS_STACK_OP=1,0"], "awd_ptb", ["DEFINE_OPS_STACK_OP=1",
                                                                                      "DEFINE_OPS_STACK_OP=0"]),
                                    (["--group-width-multiple", "1,8"], "nmt_wmt14", ["gw1", "gw8"])):  # fmt: skip
        out = tmp_path / f"{preset}.json"
        done = subprocess.run(
            [sys.executable, "scripts/ab_interleaved.py", *variants, "--provider", "cpu", "--quick", "--presets",
             preset, "--rounds", "2", "--steps", "1", "--json", str(out)],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        rows = json.loads(out.read_text())["presets"][preset]
        assert list(rows) == names and rows[names[0]]["ratio"] == 1.0
        # two rounds: the ratio of the medians (means of two) lies between the two rounds' ratios
        for row in rows.values():
            assert row["median_ms"] > 0 and row["ratio_min"] - 1e-9 <= row["ratio"] <= row["ratio_max"] + 1e-9
    done = subprocess.run([sys.executable, "scripts/ab_interleaved.py", "--provider", "cpu"], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode != 0 and "give exactly one of --env" in done.stderr
