"""The training loop's guarantees, on tiny language models: exact resume (after a budget, SIGINT
or SIGTERM), NaN stop, refused checkpoints, data-only loading, atomic writes, and DDP on 2 CPU
processes (gloo) keeping every rank's parameters identical."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import signal
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import define_ops
from models import trainer as trainer_mod
from models.train_lm import build_trainer, parse_args, resolve_config
from models.trainer import (
    BadTokenIdError,
    CheckpointError,
    Dist,
    NonFiniteLossError,
    TrainConfig,
    cleanup_distributed,
    init_distributed,
)
from tests.conftest import free_port
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

    # what the process had before (SIG_IGN for SIGINT where a shell started it in the background)
    handlers = [signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)]
    first, result = run(dict(cfg, max_steps=7) if stop == "budget" else cfg, on_step=interrupt)
    assert result.status == ("done" if stop == "budget" else "interrupted")
    assert result.step == (7 if stop == "budget" else 6)
    if stop != "budget":
        assert result.signal == getattr(signal, stop)
        assert [signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)] == handlers  # restored
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


@pytest.mark.parametrize("backend", [b for b in ("cpu", "triton") if b in define_ops.available_backends("cpu")])
def test_bad_token_id_stops_training_naming_the_id(corpus_dir, cache_dir, tmp_path, monkeypatch, backend):
    # The models' DeFINE checks ids with validate_ids="deferred" (no host synchronisation on a GPU):
    # on the Triton backend a bad id gets a NaN row and the trainer names the id, read after the
    # step, before the NaN loss it causes would stop the run; the CPU backend's lookup cannot take
    # a bad id, so the check runs before the call there. Either way: one error naming the id.
    cfg = config(corpus_dir, cache_dir, tmp_path, "lstm", "--save-every", "3", "--eval-every", "0",
                 "--define-backend", backend)  # fmt: skip
    trainer = build_trainer(dict(cfg), Dist(), progress=False)
    vocab = next(m for m in trainer.model.modules() if isinstance(m, define_ops.DeFINE)).num_embeddings
    train_step = trainer.task.train_step

    def poisoned(model, batch):
        if trainer.step == 4:
            inputs, targets, seq_len = batch
            inputs = inputs.clone()
            inputs[1, 2] = vocab
            batch = (inputs, targets, seq_len)
        return train_step(model, batch)

    monkeypatch.setattr(trainer.task, "train_step", poisoned)
    expected = rf"token id {vocab} (is out of range|at flat position 6 ).*training step 5.*last\.pt \(step 3\)"
    with pytest.raises(BadTokenIdError, match=expected):
        trainer.fit()
    assert max(train_losses(tmp_path)) == 4

    def body(dist):
        raise BadTokenIdError("token id 7 is out of range")

    assert trainer_mod.run_command("cpu", body, ()) == 1  # the commands print it as one line and exit 1


def _checkpoints_are_finite(out: Path) -> bool:
    for path in out.glob("*.pt"):
        state = trainer_mod.load_checkpoint(path)
        if not all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point()):
            return False
    return True


def test_nan_gradient_without_clipping_stops_before_the_step(corpus_dir, cache_dir, tmp_path):
    # a finite loss with a NaN gradient: only the gradient check can see it, and --clip 0 must not skip it
    cfg = config(corpus_dir, cache_dir, tmp_path, "lstm", "--clip", "0", "--eval-every", "5")
    seen = {}

    def poison_gradient(trainer, loss):
        seen["trainer"] = trainer
        if trainer.step == 4:
            next(trainer.model.rnns.parameters()).register_hook(lambda grad: torch.full_like(grad, float("nan")))

    with pytest.raises(NonFiniteLossError, match=r"non-finite training gradient norm \(nan\) at step 5.*no checkpoint"):
        run(cfg, on_step=poison_gradient)
    assert all(torch.isfinite(p).all() for p in seen["trainer"].model.parameters())  # the step never ran
    assert not list(tmp_path.glob("*.pt")) and _checkpoints_are_finite(tmp_path)


def test_gradient_norm_counts_dense_and_sparse_gradients():
    dense = nn.Linear(3, 2)
    table = nn.Embedding(10, 4, sparse=True)
    (dense(table(torch.tensor([1, 1, 7])).sum(0)[:3]).sum() * 3).backward()
    assert table.weight.grad.is_sparse
    params = [*dense.parameters(), table.weight]
    expected = torch.cat([p.grad.to_dense().reshape(-1) for p in params]).norm()
    torch.testing.assert_close(trainer_mod.gradient_norm(params, torch.device("cpu")), expected)
    assert trainer_mod.gradient_norm([], torch.device("cpu")) == 0


def test_nan_validation_is_never_the_best(corpus_dir, cache_dir, tmp_path, monkeypatch):
    cfg = config(corpus_dir, cache_dir, tmp_path, "lstm")  # validates at steps 4, 8 and 12
    evaluate = trainer_mod.Trainer.evaluate

    def nan_first(trainer, split):
        metrics = evaluate(trainer, split)
        return dict(metrics, loss=float("nan")) if split == "valid" and trainer.step == 4 else metrics

    monkeypatch.setattr(trainer_mod.Trainer, "evaluate", nan_first)
    _, result = run(cfg)
    assert result.best["step"] in (8, 12) and math.isfinite(result.best["value"])
    assert trainer_mod.load_checkpoint(tmp_path / "best.pt")["trainer"]["step"] == result.best["step"]


def test_checkpoint_of_non_finite_weights_is_refused(corpus_dir, cache_dir, tmp_path):
    trainer = build_trainer(config(corpus_dir, cache_dir, tmp_path, "lstm"), Dist(), progress=False)
    with torch.no_grad():
        next(trainer.model.parameters())[0].fill_(float("inf"))
    with pytest.raises(NonFiniteLossError, match="non-finite training weights"):
        trainer.save_last(best=True)
    assert not list(tmp_path.glob("*.pt"))


def test_checkpoint_from_another_configuration_is_refused(corpus_dir, cache_dir, tmp_path):
    cfg = config(corpus_dir, cache_dir, tmp_path / "a", "lstm", "--max-steps", "2")
    run(cfg)
    other = config(corpus_dir, cache_dir, tmp_path / "b", "lstm", "--hidden", "48", "--weight-decay", "0.5")
    with pytest.raises(CheckpointError, match=r"different configuration(.|\n)*hidden: checkpoint 32, this run 48"
                                              r"(.|\n)*weight_decay: checkpoint 0\.0, this run 0\.5"):  # fmt: skip
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


def train_lrs(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lr"] for r in records if r["event"] == "train"}


@pytest.mark.parametrize("schedule", [["--scheduler", "cosine", "--lr-decay-steps", str(STEPS)], []])
def test_resume_with_a_new_lr_and_clip_rescales_the_schedule(corpus_dir, cache_dir, tmp_path, capsys, schedule):
    # the remedy the NaN stop suggests: resume under a lower --lr and a --clip
    run(config(corpus_dir, cache_dir, tmp_path / "a", "lstm", *schedule, "--max-steps", "6"))
    args = parse_args(["--resume", str(tmp_path / "a" / "last.pt"), "--lr", "0.5", "--clip", "0.1",
                       "--max-steps", str(STEPS)])  # fmt: skip
    base = trainer_mod.load_checkpoint(tmp_path / "a" / "last.pt")["config"]
    resumed, result = run(resolve_config(args, base=base), resume=tmp_path / "a" / "last.pt")
    assert result.step == STEPS and resumed.cfg.clip == 0.1
    assert "note: resumed with changed settings: clip 0.25 -> 0.1, lr 1.0 -> 0.5" in capsys.readouterr().out
    # from step 7 on, the rates of a run that had used lr 0.5 from the start
    run(config(corpus_dir, cache_dir, tmp_path / "b", "lstm", *schedule, "--lr", "0.5"))
    expected = {step: lr for step, lr in train_lrs(tmp_path / "b").items() if step > 6}
    got = {step: lr for step, lr in train_lrs(tmp_path / "a").items() if step > 6}
    assert got == pytest.approx(expected, rel=1e-12) and len(got) == STEPS - 6


def test_logged_lr_is_the_rate_the_step_used(corpus_dir, cache_dir, tmp_path):
    from models.train_lm import WarmupCosine

    run(config(corpus_dir, cache_dir, tmp_path, "lstm", "--scheduler", "cosine", "--lr-decay-steps", "12",
               "--warmup-steps", "4"))  # fmt: skip
    schedule = WarmupCosine(4, 12)  # step k (from 1) trains at the factor of scheduler position k - 1
    assert train_lrs(tmp_path) == {k: pytest.approx(schedule(k - 1), rel=1e-12) for k in range(1, STEPS + 1)}


def test_perplexity_of_a_diverged_model_is_inf():
    assert trainer_mod.perplexity(800.0) == math.inf and trainer_mod.perplexity(1.0) == pytest.approx(math.e)


def test_a_finished_run_resumed_logs_one_test_and_end(corpus_dir, cache_dir, tmp_path):
    cfg = config(corpus_dir, cache_dir, tmp_path, "lstm", "--max-steps", "5")
    run(cfg)
    run(dict(cfg, max_steps=6), resume=tmp_path / "last.pt")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["event"], r["step"]) for r in records if r["event"] in ("test", "end")] == [("test", 6), ("end", 6)]


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
    with pytest.raises(CheckpointError, match="not a plain-data checkpoint") as refused:
        trainer_mod.load_checkpoint(evil)
    assert not marker.exists()
    # the message says what was refused, not torch's advice to load with weights_only=False
    reason = str(refused.value).split("loader said: ", 1)[1]
    assert "GLOBAL getattr" in reason and "weights_only" not in str(refused.value), reason
    # the file really is armed: an unrestricted unpickler runs it
    if fmt == "torch.save":
        torch.load(evil, weights_only=False)
    else:
        pickle.loads(evil.read_bytes())
    assert marker.exists()


class _BlockedModule:
    def __reduce__(self):
        return (os.getpid, ())  # harmless, but from a module (posix) the safe unpickler blocks


@pytest.mark.parametrize("fmt", ["torch.save", "pickle"])
def test_refused_checkpoint_names_what_was_refused(tmp_path, fmt):
    evil = tmp_path / "evil.pt"
    payload = {"format": trainer_mod.CHECKPOINT_FORMAT, "model": _BlockedModule()}
    if fmt == "pickle":
        evil.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, evil)
    with pytest.raises(CheckpointError, match=r"loader said: Trying to load unsupported GLOBAL posix\.getpid"):
        trainer_mod.load_checkpoint(evil)
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"# not a checkpoint\n")
    with pytest.raises(CheckpointError, match=r"loader said: \S") as refused:  # a reason, never an empty one
        trainer_mod.load_checkpoint(damaged)
    assert "weights_only" not in str(refused.value)


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
        speed = {"tokens_per_s": result.tokens_per_s, "train_time": trainer.train_time}
        torch.save({**snapshots, "valid": result.valid, **speed}, f"{out}.rank{rank}")
    finally:
        cleanup_distributed()


def test_ddp_two_cpu_processes_keep_parameters_identical(corpus_dir, cache_dir, tmp_path):
    steps = 6
    cfg = config(corpus_dir, cache_dir, tmp_path / "ddp", "lstm", "--max-steps", str(steps), "--dropout", "0",
                 "--dropouth", "0", "--dropouti", "0", "--define-dropout", "0", "--eval-every", "3")  # fmt: skip
    mp.spawn(_ddp_worker, args=(2, free_port(), cfg, str(tmp_path / "result")), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"result.rank{r}", weights_only=True) for r in range(2))
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), f"{name} differs between ranks"
    # only rank 0 logged: every step once
    assert sorted(train_losses(tmp_path / "ddp")) == list(range(1, steps + 1))
    # the speed counts each token once: steps x batch 4 x bptt 8 over both ranks, in the training time
    end = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()][-1]
    assert end["event"] == "end" and end["tokens_per_s"] == rank0["tokens_per_s"]
    assert rank0["tokens_per_s"] * rank0["train_time"] == pytest.approx(steps * 4 * 8, rel=1e-9)

    # each rank trained on its own half of the streams; together that is the one-process run
    single = {}

    def snapshot(trainer, loss):
        if trainer.step == steps:
            single.update({k: v.clone() for k, v in trainer.model.state_dict().items()})

    _, result = run(dict(cfg, out=str(tmp_path / "single")), on_step=snapshot)
    for name, value in single.items():
        torch.testing.assert_close(rank0["params"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert rank0["valid"]["loss"] == pytest.approx(result.valid["loss"], rel=1e-5)


def test_device_names_resolve_or_say_why(monkeypatch):
    assert trainer_mod.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="--device 'gpu' is not a device"):
        trainer_mod.resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device cuda: no CUDA device is available"):
        trainer_mod.resolve_device("cuda")
    assert trainer_mod.resolve_device(None) == torch.device("cpu")
    # with GPUs, plain "cuda" gets an index (torch.cuda.set_device refuses a device without one)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert trainer_mod.resolve_device("cuda") == torch.device("cuda", 0)
    assert trainer_mod.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="has 2 CUDA device"):
        trainer_mod.resolve_device("cuda:2")


def test_compile_mode_is_validated(tmp_path):
    with pytest.raises(ValueError, match="compile must be one of off, default, reduce-overhead, max-autotune"):
        TrainConfig(out_dir=str(tmp_path), compile="fast")
