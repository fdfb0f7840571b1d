"""The training loop's guarantees, on tiny language models: exact resume (after a budget, SIGINT
or SIGTERM), NaN stop, refused checkpoints, data-only loading, atomic writes, and DDP on 2 CPU
processes (gloo) keeping every rank's parameters identical."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from models import trainer as trainer_mod
from models.train_lm import build_trainer, parse_args, resolve_config
from models.trainer import (
    CheckpointError,
    Dist,
    NonFiniteLossError,
    TrainConfig,
    cleanup_distributed,
    init_distributed,
)
from tests.lm_fixtures import TINY, TINY_DEFINE, one_thread, ptb_slice

STEPS = 12

_one_thread = pytest.fixture(autouse=True)(one_thread)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return ptb_slice(tmp_path_factory.mktemp("ptb"), train_lines=300, eval_lines=40)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def config(corpus_dir, cache_dir, out, arch="lstm", *extra):
    argv = ["--arch", arch, "--data", str(corpus_dir), "--out", str(out), "--cache-dir", str(cache_dir),
            *TINY[arch], *TINY_DEFINE, "--softmax", "full", "--batch-size", "4", "--bptt", "8",
            "--max-train-tokens", "164", "--max-eval-tokens", "300", "--eval-every", "4", "--log-every", "1",
            "--epochs", "100", "--max-steps", str(STEPS), *(["--optimizer", "sgd"] if arch == "lstm" else []),
            "--lr", "1.0" if arch != "transformer-xl" else "3e-3",
            "--define-dropout", "0.1", "--precision", "fp32", *extra]  # fmt: skip
    return resolve_config(parse_args(argv))


def train_losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["event"] == "train"}


def run(cfg, resume=None, on_step=None):
    trainer = build_trainer(dict(cfg), Dist(), progress=False)
    result = trainer.fit(resume=resume, on_step=on_step)
    return trainer, result


def force_averaging(trainer, loss):
    # NT-ASGD's switch happens on validation plateaus; force it early so resume must carry it
    if trainer.step == 3 and hasattr(trainer.optimizer, "triggered"):
        trainer.optimizer.param_groups[0]["averaging"] = True


# (arch, how the first part stops, batches per optimizer step)
CASES = [("lstm", "budget", 1), ("lstm", "SIGINT", 1), ("lstm", "SIGTERM", 1), ("awd-lstm", "budget", 1),
         ("awd-lstm", "SIGINT", 1), ("transformer-xl", "budget", 1), ("transformer-xl", "SIGTERM", 1),
         ("lstm", "SIGTERM", 2), ("awd-lstm", "budget", 3)]  # fmt: skip


@pytest.mark.parametrize("arch,stop,accum", CASES)
def test_resumed_run_reproduces_the_uninterrupted_one(corpus_dir, cache_dir, tmp_path, arch, stop, accum):
    accum_args = ("--accum-steps", str(accum))
    full, _ = run(config(corpus_dir, cache_dir, tmp_path / "full", arch, *accum_args), on_step=force_averaging)
    expected = train_losses(tmp_path / "full")
    assert sorted(expected) == list(range(1, STEPS + 1))

    cfg = config(corpus_dir, cache_dir, tmp_path / "split", arch, *accum_args)

    def interrupt(trainer, loss):
        force_averaging(trainer, loss)
        if stop != "budget" and trainer.step == 6:
            os.kill(os.getpid(), getattr(signal, stop))

    first, result = run(dict(cfg, max_steps=7) if stop == "budget" else cfg, on_step=interrupt)
    assert result.status == ("done" if stop == "budget" else "interrupted")
    assert result.step == (7 if stop == "budget" else 6)
    if stop != "budget":
        assert result.signal == getattr(signal, stop)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    resumed, result = run(cfg, resume=tmp_path / "split" / "last.pt", on_step=force_averaging)
    assert result.status == "done" and result.step == STEPS
    assert train_losses(tmp_path / "split") == expected  # exact, step by step
    for (name, a), b in zip(full.state_dict()["model"].items(), resumed.state_dict()["model"].values(), strict=True):
        assert torch.equal(a, b), name


def test_nan_loss_stops_and_leaves_the_last_good_checkpoint(corpus_dir, cache_dir, tmp_path):
    cfg = config(corpus_dir, cache_dir, tmp_path, "lstm", "--save-every", "3", "--eval-every", "0")
    last = tmp_path / "last.pt"
    snapshot = {}

    def poison(trainer, loss):
        if trainer.step == 4:
            snapshot["hash"] = hashlib.sha256(last.read_bytes()).hexdigest()
            with torch.no_grad():
                next(trainer.model.rnns.parameters()).fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss \(nan\) at step 5.*last\.pt \(step 3\)"):
        run(cfg, on_step=poison)
    assert hashlib.sha256(last.read_bytes()).hexdigest() == snapshot["hash"]
    assert max(train_losses(tmp_path)) == 4
    state = trainer_mod.load_checkpoint(last)
    assert state["trainer"]["step"] == 3
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_checkpoint_from_another_configuration_is_refused(corpus_dir, cache_dir, tmp_path):
    cfg = config(corpus_dir, cache_dir, tmp_path / "a", "lstm", "--max-steps", "2")
    run(cfg)
    other = config(corpus_dir, cache_dir, tmp_path / "b", "lstm", "--hidden", "48", "--lr", "0.5")
    with pytest.raises(CheckpointError, match=r"different configuration(.|\n)*hidden: checkpoint 32, this run 48"
                                              r"(.|\n)*lr: checkpoint 1\.0, this run 0\.5"):  # fmt: skip
        run(other, resume=tmp_path / "a" / "last.pt")
    awd = config(corpus_dir, cache_dir, tmp_path / "c", "awd-lstm")
    with pytest.raises(CheckpointError, match="arch: checkpoint 'lstm', this run 'awd-lstm'"):
        run(awd, resume=tmp_path / "a" / "last.pt")
    # budgets may change on resume; the number of processes may not
    state = trainer_mod.load_checkpoint(tmp_path / "a" / "last.pt")
    state["world_size"] = 2
    torch.save(state, tmp_path / "a" / "two.pt")
    with pytest.raises(CheckpointError, match="written by 2 processes"):
        run(dict(cfg, max_steps=4), resume=tmp_path / "a" / "two.pt")


def test_checkpoint_from_before_accum_steps_resumes(corpus_dir, cache_dir, tmp_path):
    run(config(corpus_dir, cache_dir, tmp_path, "lstm", "--max-steps", "2"))
    state = trainer_mod.load_checkpoint(tmp_path / "last.pt")
    del state["config"]["accum_steps"]  # as written before gradient accumulation existed
    torch.save(state, tmp_path / "old.pt")
    args = parse_args(["--resume", str(tmp_path / "old.pt"), "--max-steps", "3"])
    trainer, result = run(resolve_config(args, base=state["config"]), resume=tmp_path / "old.pt")
    assert result.step == 3 and trainer.cfg.accum_steps == 1


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("fmt", ["torch.save", "pickle"])
def test_crafted_checkpoint_is_not_executed(tmp_path, fmt):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    payload = {"format": trainer_mod.CHECKPOINT_FORMAT, "model": _Payload(marker)}
    if fmt == "torch.save":
        torch.save(payload, evil)
    else:
        evil.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(CheckpointError, match="not a plain-data checkpoint"):
        trainer_mod.load_checkpoint(evil)
    assert not marker.exists()
    # the file really is armed: an unrestricted unpickler runs it
    if fmt == "torch.save":
        torch.load(evil, weights_only=False)
    else:
        pickle.loads(evil.read_bytes())
    assert marker.exists()


def test_crafted_checkpoint_refused_on_resume(corpus_dir, cache_dir, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"format": trainer_mod.CHECKPOINT_FORMAT, "x": _Payload(marker)}, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match="not a plain-data checkpoint"):
        run(config(corpus_dir, cache_dir, tmp_path / "run"), resume=tmp_path / "last.pt")
    assert not marker.exists()


def test_failed_write_leaves_the_previous_checkpoint(corpus_dir, cache_dir, tmp_path, monkeypatch):
    cfg = config(corpus_dir, cache_dir, tmp_path, "lstm", "--max-steps", "2")
    run(cfg)
    before = (tmp_path / "last.pt").read_bytes()

    def broken_save(obj, handle):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(trainer_mod.torch, "save", broken_save)
    trainer = build_trainer(dict(cfg), Dist(), progress=False)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_last()
    assert (tmp_path / "last.pt").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_metrics_log_and_bad_precision(corpus_dir, cache_dir, tmp_path):
    _, result = run(config(corpus_dir, cache_dir, tmp_path, "lstm", "--max-steps", "5"))
    events = [json.loads(line)["event"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert events == ["config"] + ["train"] * 4 + ["valid"] + ["train"] + ["valid", "test", "end"]
    assert result.test["ppl"] > 1 and result.tokens_per_s > 0
    assert (tmp_path / "best.pt").exists() and (tmp_path / "last.pt").exists()
    with pytest.raises(ValueError, match="needs a CUDA device"):
        build_trainer(config(corpus_dir, cache_dir, tmp_path / "x", "lstm", "--precision", "bf16"), Dist())


# ------------------------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, cfg: dict, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    dist = init_distributed("cpu")
    try:
        snapshots = {}

        def snapshot(trainer, loss):  # the weights each rank trained, before the end loads best.pt
            if trainer.step == cfg["max_steps"]:
                snapshots["params"] = {k: v.clone() for k, v in trainer.model.state_dict().items()}

        trainer = build_trainer(dict(cfg), dist, progress=False)
        result = trainer.fit(on_step=snapshot)
        torch.save({**snapshots, "valid": result.valid}, f"{out}.rank{rank}")
    finally:
        cleanup_distributed()


def test_ddp_two_cpu_processes_keep_parameters_identical(corpus_dir, cache_dir, tmp_path):
    steps = 6
    cfg = config(corpus_dir, cache_dir, tmp_path / "ddp", "lstm", "--max-steps", str(steps), "--dropout", "0",
                 "--dropouth", "0", "--dropouti", "0", "--define-dropout", "0", "--eval-every", "3")  # fmt: skip
    mp.spawn(_ddp_worker, args=(2, _free_port(), cfg, str(tmp_path / "result")), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"result.rank{r}", weights_only=True) for r in range(2))
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), f"{name} differs between ranks"
    # only rank 0 logged: every step once
    assert sorted(train_losses(tmp_path / "ddp")) == list(range(1, steps + 1))

    # each rank trained on its own half of the streams; together that is the one-process run
    single = {}

    def snapshot(trainer, loss):
        if trainer.step == steps:
            single.update({k: v.clone() for k, v in trainer.model.state_dict().items()})

    _, result = run(dict(cfg, out=str(tmp_path / "single")), on_step=snapshot)
    for name, value in single.items():
        torch.testing.assert_close(rank0["params"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert rank0["valid"]["loss"] == pytest.approx(result.valid["loss"], rel=1e-5)


def test_compile_mode_is_validated(tmp_path):
    with pytest.raises(ValueError, match="compile must be one of off, default, reduce-overhead, max-autotune"):
        TrainConfig(out_dir=str(tmp_path), compile="fast")
