"""``python -m models.train_lm``: smoke runs of every architecture × input, real training on a PTB
slice, overfitting a tiny slice, presets, command-line errors, --eval-only, a real SIGTERM, torchrun."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from models import train_lm
from models.train_lm import main, parse_args, resolve_config
from tests.lm_fixtures import REPO, TINY, TINY_DEFINE, one_thread, ptb_slice, write_corpus

_one_thread = pytest.fixture(autouse=True)(one_thread)
ARCHS = ["lstm", "awd-lstm", "transformer-xl"]
EMBEDDINGS = ["define", "standard", "adaptive"]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return ptb_slice(tmp_path_factory.mktemp("ptb"), train_lines=1500, eval_lines=100)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def argv(arch, corpus_dir, cache_dir, out, *extra):
    return ["--arch", arch, "--data", str(corpus_dir), "--cache-dir", str(cache_dir), "--out", str(out),
            *TINY[arch], *TINY_DEFINE, "--no-progress", "--precision", "fp32", *extra]  # fmt: skip


def records(out: Path, event: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


@pytest.mark.parametrize("embedding", EMBEDDINGS)
@pytest.mark.parametrize("arch", ARCHS)
def test_dry_run_every_arch_and_input(arch, embedding, corpus_dir, cache_dir, tmp_path, capsys):
    assert main(argv(arch, corpus_dir, cache_dir, tmp_path, "--embedding", embedding, "--dry-run")) == 0
    printed = capsys.readouterr().out
    assert f"{arch} + {embedding}" in printed and "valid ppl" in printed and "test ppl" in printed
    assert [r["step"] for r in records(tmp_path, "train")] == [1, 2]
    assert (tmp_path / "last.pt").exists() and (tmp_path / "best.pt").exists()


# Learning rates for a few dozen steps of the tiny models (Transformer-XL takes Adam's).
LEARN = {"lstm": ["--lr", "3e-3"], "awd-lstm": ["--lr", "10", "--variable-bptt", "0"],
         "transformer-xl": ["--lr", "3e-3", "--warmup-steps", "5"]}  # fmt: skip


@pytest.mark.parametrize("arch", ARCHS)
def test_training_on_a_ptb_slice_lowers_the_loss(arch, corpus_dir, cache_dir, tmp_path):
    steps = 60
    code = main(argv(arch, corpus_dir, cache_dir, tmp_path, "--batch-size", "8", "--bptt", "16", "--max-steps",
                     str(steps), "--epochs", "50", "--eval-every", "30", "--log-every", "5", "--max-eval-tokens",
                     "2000", *LEARN[arch]))  # fmt: skip
    assert code == 0
    train = [r["loss"] for r in records(tmp_path, "train")]
    valid = [r["loss"] for r in records(tmp_path, "valid")]
    vocab = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["config"]["vocab_size"]
    assert train[0] > math.log(vocab) - 1.5  # starts near uniform
    assert train[-1] < train[0] - 0.1 * math.log(vocab) and valid[-1] < valid[0] < math.log(vocab)
    assert records(tmp_path, "test")[0]["ppl"] < math.exp(valid[0])


def test_a_budget_that_ends_off_the_validation_schedule_is_named(corpus_dir, cache_dir, tmp_path, capsys):
    def run(out, steps):
        assert main(argv("lstm", corpus_dir, cache_dir, tmp_path / out, "--max-steps", str(steps), "--eval-every", "2",
                         "--max-eval-tokens", "2000")) == 0  # fmt: skip
        return capsys.readouterr().out

    assert "note: the last step (3) is not a validation step (every 2)" in run("off", 3)
    assert "is not a validation step" not in run("on", 4)


def test_overfits_a_tiny_slice(tmp_path, cache_dir):
    lines = (REPO / "README.md").read_text().split()[:300]  # any text: 300 words, learnt by heart
    text = [" ".join(lines[i : i + 15]) + "\n" for i in range(0, 300, 15)]
    root = write_corpus(tmp_path / "tiny", text, text, text, "plain")
    code = main(argv("lstm", root, cache_dir, tmp_path / "out", "--layers", "1", "--hidden", "64", "--table-dim", "32",
                     "--input-dim", "32", "--define-max-dim", "64", "--softmax", "full", "--dropout", "0", "--dropouth",
                     "0", "--dropouti", "0", "--batch-size", "4", "--bptt", "20", "--epochs", "100", "--max-steps",
                     "0", "--eval-every", "0", "--optimizer", "adam", "--lr", "0.01", "--log-every", "20"))  # fmt: skip
    assert code == 0
    assert records(tmp_path / "out", "test")[0]["ppl"] < 1.5  # valid = test = train: memorised


def test_eval_only_reports_the_checkpoint(corpus_dir, cache_dir, tmp_path, capsys):
    assert main(argv("lstm", corpus_dir, cache_dir, tmp_path, "--max-steps", "4", "--eval-every", "2")) == 0
    best = records(tmp_path, "test")[0]
    capsys.readouterr()
    assert main(["--eval-only", str(tmp_path / "best.pt"), "--cache-dir", str(cache_dir)]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[0])
    assert report["test"]["ppl"] == pytest.approx(best["ppl"], rel=1e-9)


def test_eval_only_scores_the_whole_splits_unless_told_and_says_how_much(corpus_dir, cache_dir, tmp_path, capsys):
    assert main(argv("lstm", corpus_dir, cache_dir, tmp_path, "--max-steps", "2", "--max-eval-tokens", "300")) == 0
    sliced = records(tmp_path, "test")[0]
    capsys.readouterr()
    assert main(["--eval-only", str(tmp_path / "best.pt"), "--cache-dir", str(cache_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    report = json.loads(out[0])
    whole = report["valid"]["split_tokens"]
    assert whole > 300 and report["valid"]["tokens"] == (whole // 10 - 1) * 10  # 10 streams, all of the split
    assert "slice" not in out[1] and f"({report['valid']['tokens']} tokens scored)" in out[1]
    # asked for a slice: the training run's own numbers, and the output says it is one
    assert main(["--eval-only", str(tmp_path / "best.pt"), "--cache-dir", str(cache_dir), "--max-eval-tokens",
                 "300"]) == 0  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    report = json.loads(out[0])
    assert report["test"]["ppl"] == pytest.approx(sliced["ppl"], rel=1e-9) and report["test"]["tokens"] == 290
    assert f"test ppl {report['test']['ppl']:.2f} (290 tokens scored, a slice: the first 300 of " in out[1]


def test_presets_carry_the_paper_settings():
    table9 = resolve_config(parse_args(["--preset", "lstm_wt103", "--data", "x"]))
    assert table9["arch"] == "lstm" and table9["optimizer"] == "sgd" and table9["lr"] == 20.0
    assert (table9["bptt"], table9["batch_size"], table9["epochs"], table9["lr_milestones"]) == (140, 60, 20, [15])
    assert (table9["layers"], table9["hidden"], table9["define_max_dim"], table9["weight_decay"]) == (4, 1024, 1024, 0)
    awd = resolve_config(parse_args(["--preset", "awd_ptb", "--data", "x"]))
    assert (awd["table_dim"], awd["define_max_dim"], awd["define_depth"], awd["input_dim"]) == (128, 1024, 7, 400)
    assert (awd["optimizer"], awd["lr"], awd["clip"], awd["bptt"], awd["wdrop"], awd["dropoute"]) == (
        "ntasgd", 30.0, 0.25, 70, 0.5, 0.1)  # fmt: skip
    assert (awd["batch_size"], awd["dropouti"], awd["dropouth"], awd["seed"], awd["variable_bptt"]) == (
        20, 0.4, 0.25, 141, True)  # fmt: skip
    txl = resolve_config(parse_args(["--preset", "txl_wt103", "--data", "x", "--table-dim", "128"]))
    assert (txl["define_depth"], txl["define_max_dim"], txl["d_model"], txl["table_dim"]) == (3, 4096, 384, 128)
    assert (txl["mem_len"], txl["bptt"], txl["lr_decay_steps"]) == (150, 150, 200_000)


def test_output_bias_and_band_scale_are_recorded_and_old_checkpoints_keep_their_model():
    from models.train_lm import build_model

    awd = resolve_config(parse_args(["--preset", "awd_ptb", "--data", "x", "--define-depth", "2"]))
    assert awd["softmax_bias"] is True
    awd["cutoffs"] = []  # (build_trainer picks them from the vocabulary)
    assert "softmax.biases.0" in build_model(awd, 50).state_dict()
    before_the_bias = {k: v for k, v in awd.items() if k != "softmax_bias"}  # a checkpoint's settings from before
    assert "softmax.biases.0" not in build_model(before_the_bias, 50).state_dict()
    lstm = resolve_config(parse_args(["--arch", "lstm", "--data", "x"]))
    assert lstm["softmax_bias"] is False
    # The adaptive Map's bands are scaled by √width since that was added; older checkpoints were not.
    adaptive = dict(lstm, define_map="adaptive", cutoffs=[10, 30], div_val=4, define_depth=2, table_dim=16,
                    input_dim=16, hidden=16, layers=1, define_max_dim=32, softmax="full", tie="none")  # fmt: skip
    assert build_model(adaptive, 50).embed.define.map.scales == [4.0, 2.0, 1.0]
    old = {k: v for k, v in adaptive.items() if k != "define_band_scale"}
    assert build_model(old, 50).embed.define.map.scales == [1.0, 1.0, 1.0]


def test_define_transform_gets_its_own_rate_under_sgd_and_old_checkpoints_keep_one_group():
    from models.train_lm import build_model, build_optimizer

    def groups(cfg):
        cfg = dict(cfg, cutoffs=[], hidden=16, layers=1, input_dim=16, table_dim=8, define_max_dim=32)
        model = build_model(cfg, 50)
        optimizer = build_optimizer(cfg, model)[0]
        return model, optimizer.param_groups

    sgd = resolve_config(parse_args(["--arch", "lstm", "--optimizer", "sgd", "--lr", "20", "--data", "x"]))
    assert sgd["define_lr_scale"] == train_lm.SGD_DEFINE_LR_SCALE
    model, (rest, transform) = groups(sgd)
    assert rest["lr"] == 20 and transform["lr"] == pytest.approx(20 * train_lm.SGD_DEFINE_LR_SCALE)
    define = model.embed.define
    assert {id(p) for p in transform["params"]} == {id(p) for p in define.transform_parameters()}
    assert define.weight in rest["params"]  # the table (tied to the softmax) keeps the full rate
    assert len(rest["params"]) + len(transform["params"]) == len(list(model.parameters()))
    awd = resolve_config(parse_args(["--preset", "awd_ptb", "--data", "x", "--define-depth", "2"]))
    assert awd["define_lr_scale"] == train_lm.SGD_DEFINE_LR_SCALE  # NT-ASGD is SGD until it averages
    adam = resolve_config(parse_args(["--arch", "lstm", "--data", "x"]))
    assert adam["optimizer"] == "adam" and adam["define_lr_scale"] == 1.0 and len(groups(adam)[1]) == 1
    chosen = resolve_config(
        parse_args(["--arch", "lstm", "--data", "x", "--optimizer", "sgd", "--define-lr-scale", "1"])
    )
    assert len(groups(chosen)[1]) == 1
    standard = dict(sgd, embedding="standard")
    assert len(groups(standard)[1]) == 1  # nothing to split
    before = {k: v for k, v in sgd.items() if k != "define_lr_scale"}  # a checkpoint's settings from before
    assert len(groups(before)[1]) == 1  # its optimizer state has one group: it still loads
    with pytest.raises(ValueError, match="--define-lr-scale must be >= 0, got -1"):
        resolve_config(parse_args(["--arch", "lstm", "--data", "x", "--define-lr-scale", "-1"]))


def test_command_line_errors_are_clear(corpus_dir, cache_dir, tmp_path, capsys):
    def error(*args):
        assert main(list(args)) == 2
        return capsys.readouterr().err

    assert "does not exist" in error("--arch", "lstm", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o"))
    assert "--hidden does not apply to --arch transformer-xl" in error(
        "--arch", "transformer-xl", "--data", str(corpus_dir), "--hidden", "10"
    )
    assert "is for --arch awd-lstm" in error("--arch", "lstm", "--preset", "awd_ptb", "--data", str(corpus_dir))
    assert "--data DIR is required" in error("--arch", "lstm")
    assert "cutoffs" in error(*argv("lstm", corpus_dir, cache_dir, tmp_path / "c", "--cutoffs", "99999"))
    assert main(argv("lstm", corpus_dir, cache_dir, tmp_path / "run", "--dry-run")) == 0
    assert "already holds a checkpoint" in error(*argv("lstm", corpus_dir, cache_dir, tmp_path / "run"))
    message = error("--resume", str(tmp_path / "run" / "last.pt"), "--hidden", "48")
    assert "different configuration" in message and "hidden: checkpoint 32, this run 48" in message
    assert "not a plain-data checkpoint" in error("--eval-only", str(REPO / "README.md"))


def test_resume_under_another_arch_is_refused_before_building(corpus_dir, cache_dir, tmp_path, capsys):
    assert main(argv("lstm", corpus_dir, cache_dir, tmp_path, "--dry-run")) == 0
    capsys.readouterr()
    for arch in ("transformer-xl", "awd-lstm"):  # their models need settings an LSTM run never had
        assert main(["--resume", str(tmp_path / "last.pt"), "--arch", arch, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "refusing to resume" in err and f"arch: checkpoint 'lstm', this run '{arch}'" in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages of a machine without CUDA")
def test_device_and_backend_errors_are_clear(corpus_dir, cache_dir, tmp_path, capsys):
    def error(*extra):
        assert main(argv("lstm", corpus_dir, cache_dir, tmp_path / "o", "--dry-run", *extra)) == 2
        return capsys.readouterr().err

    assert "--define-backend cuda cannot run here" in error("--define-backend", "cuda")
    assert "--device 'gpu' is not a device: use cpu, cuda or cuda:N" in error("--device", "gpu")
    assert "--device cuda: no CUDA device is available" in error("--device", "cuda")
    assert not (tmp_path / "o").exists()  # refused before anything was built

    # a checkpoint trained with the CUDA kernels evaluates on the CPU under another backend
    assert main(argv("lstm", corpus_dir, cache_dir, tmp_path / "run", "--dry-run")) == 0
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    state["config"]["define_backend"] = "cuda"
    torch.save(state, tmp_path / "run" / "gpu.pt")
    capsys.readouterr()
    assert main(["--eval-only", str(tmp_path / "run" / "gpu.pt")]) == 2
    assert "--define-backend cuda cannot run here" in capsys.readouterr().err
    assert main(["--eval-only", str(tmp_path / "run" / "gpu.pt"), "--define-backend", "reference"]) == 0
    assert "valid ppl" in capsys.readouterr().out


def test_resume_past_the_end_of_the_cosine_schedule_is_refused(corpus_dir, cache_dir, tmp_path, capsys):
    # Transformer-XL's default schedule reaches lr 0 at the first run's --max-steps
    small = ("--batch-size", "4", "--bptt", "8", "--max-train-tokens", "400", "--max-eval-tokens", "200")
    assert main(argv("transformer-xl", corpus_dir, cache_dir, tmp_path, *small, "--max-steps", "3")) == 0
    capsys.readouterr()
    for budget in ("6", "0"):  # more steps, or no limit
        assert main(["--resume", str(tmp_path / "last.pt"), "--max-steps", budget, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "goes past the end of this run's cosine schedule, which reaches lr 0 at step 3" in err
        assert "--lr-decay-steps" in err and "--max-steps 3 at most" in err
    assert torch.load(tmp_path / "last.pt", weights_only=True)["trainer"]["step"] == 3  # nothing trained at lr 0


def test_eval_split_too_small_for_its_batch_is_refused_before_training(corpus_dir, cache_dir, tmp_path, capsys):
    code = main(argv("lstm", corpus_dir, cache_dir, tmp_path, "--max-steps", "2", "--max-eval-tokens", "15"))
    assert code == 2
    err = capsys.readouterr().err
    assert "the valid split's 15 tokens (cut to --max-eval-tokens 15) are too few for --eval-batch-size 10" in err
    assert "give --max-eval-tokens at least 20" in err
    assert not (tmp_path / "metrics.jsonl").exists()  # before any step


def _spawn(cmd: list[str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    # own session: on a timeout the whole group (torchrun's workers included) can be killed
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise


def _run_cli(args: list[str]) -> subprocess.Popen:
    return _spawn([sys.executable, "-m", "models.train_lm", *args])


def test_sigterm_saves_and_exits_cleanly_then_resume_finishes(corpus_dir, cache_dir, tmp_path):
    out = tmp_path / "run"
    proc = _run_cli(argv("lstm", corpus_dir, cache_dir, out, "--max-steps", "100000", "--epochs", "1000",
                         "--log-every", "1"))  # fmt: skip
    deadline = time.time() + 60
    while not ((out / "metrics.jsonl").exists() and records(out, "train")) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = _finish(proc, 60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "SIGTERM received" in stderr and "Traceback" not in stderr
    assert "continue with --resume" in stdout
    step = records(out, "interrupted")[0]["step"]
    assert step >= 1 and (out / "last.pt").exists()
    done = _run_cli(["--resume", str(out / "last.pt"), "--max-steps", str(step + 3), "--no-progress"])
    stdout, stderr = _finish(done, 120)
    assert done.returncode == 0, stderr
    assert "test ppl" in stdout and max(r["step"] for r in records(out, "train")) == step + 3


def test_torchrun_two_processes(corpus_dir, cache_dir, tmp_path):
    args = argv("lstm", corpus_dir, cache_dir, tmp_path / "ddp", "--dry-run", "--batch-size", "4")
    proc = _spawn([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "-m", "models.train_lm", *args])  # fmt: skip
    stdout, stderr = _finish(proc, 240)
    assert proc.returncode == 0, stderr[-3000:]
    assert "2 process(es)" in stdout and stdout.count("test ppl") == 1  # rank 0 reports alone
    assert [r["step"] for r in records(tmp_path / "ddp", "train")] == [1, 2]


def test_auto_cutoffs():
    assert train_lm.auto_cutoffs(33_278) == [1997, 9983]
    assert train_lm.auto_cutoffs(50) == []


def test_validation_curves_plot_from_the_logs(corpus_dir, cache_dir, tmp_path):
    # scripts/plot_lm_curves.py renders the GPU evidence's figure: check it on two tiny real runs
    runs = []
    for embedding in ("define", "standard"):
        out = tmp_path / embedding
        assert main(argv("lstm", corpus_dir, cache_dir, out, "--embedding", embedding, "--max-steps", "4",
                         "--eval-every", "2")) == 0  # fmt: skip
        assert len(records(out, "valid")) == 2 and (out / "summary.json").exists()
        runs.append(str(out))
    png = tmp_path / "curves.png"
    done = subprocess.run([sys.executable, "scripts/plot_lm_curves.py", *runs, "--out", str(png)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert png.stat().st_size > 1000


def test_curves_take_the_last_record_of_a_step(tmp_path):
    # a step logged twice (e.g. an epoch-end validation redone after a resume) is one point, the last
    spec = importlib.util.spec_from_file_location("plot_lm_curves", REPO / "scripts" / "plot_lm_curves.py")
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    logged = [{"event": "valid", "step": 2, "ppl": 9.0}, {"event": "valid", "step": 4, "ppl": 7.0},
              {"event": "valid", "step": 4, "ppl": 6.0}]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in logged))
    _, steps, ppl = plot.load_run(tmp_path)
    assert (steps, ppl) == ([2, 4], [9.0, 6.0])


def test_compiled_training_matches_eager_and_resumes_either_way(corpus_dir, cache_dir, tmp_path):
    # --compile compiles the training forward only; checkpoints hold the plain model's state (no
    # "_orig_mod." keys), so a compiled run resumes eagerly and the other way round.
    run = ("--max-steps", "4", "--eval-every", "2", "--log-every", "1", "--dropout", "0", "--dropouth", "0",
           "--dropouti", "0", "--define-dropout", "0")  # fmt: skip
    assert main(argv("lstm", corpus_dir, cache_dir, tmp_path / "eager", *run)) == 0
    from torch._dynamo.utils import counters

    counters.clear()
    assert main(argv("lstm", corpus_dir, cache_dir, tmp_path / "compiled", *run, "--compile", "default")) == 0
    assert counters["stats"]["unique_graphs"] >= 1  # Dynamo did compile the training forward
    eager = [r["loss"] for r in records(tmp_path / "eager", "train")]
    compiled = [r["loss"] for r in records(tmp_path / "compiled", "train")]
    assert len(compiled) == 4 and compiled == pytest.approx(eager, rel=1e-4)
    state = torch.load(tmp_path / "compiled" / "last.pt", weights_only=True)
    assert not any("_orig_mod" in key for key in state["model"])
    resumed = argv("lstm", corpus_dir, cache_dir, tmp_path / "compiled", *run)
    assert main([*resumed, "--resume", str(tmp_path / "compiled" / "last.pt"), "--max-steps", "6"]) == 0
    assert [r["step"] for r in records(tmp_path / "compiled", "train")][-2:] == [5, 6]


def test_define_group_width_multiple_reaches_the_layer_and_old_checkpoints_resume(corpus_dir, cache_dir, tmp_path):
    run = tmp_path / "run"
    assert main(argv("lstm", corpus_dir, cache_dir, run, "--dry-run", "--define-group-width-multiple", "8")) == 0
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["config"]["define_group_width_multiple"] == 8
    model = train_lm.build_model(state["config"], vocab_size=state["model"]["embed.define.weight"].shape[0])
    plans = model.embed.define.config.layer_plans()
    assert model.embed.define.config.group_width_multiple == 8
    assert all((p.out_features // p.groups) % 8 == 0 for p in plans)
    # a checkpoint from before the option (no such key) resumes with the paper's widths
    old = tmp_path / "old"
    assert main(argv("lstm", corpus_dir, cache_dir, old, "--dry-run")) == 0
    state = torch.load(old / "last.pt", weights_only=True)
    del state["config"]["define_group_width_multiple"]
    torch.save(state, old / "before.pt")
    assert main(["--resume", str(old / "before.pt"), "--max-steps", "3", "--no-progress"]) == 0
