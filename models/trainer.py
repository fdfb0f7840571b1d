"""A task-agnostic training loop: progress, validation, checkpoints, exact resume, signals, NaN stop,
autocast, gradient clipping and DistributedDataParallel. Language models (``train_lm``) and
translation use it with their own ``Task``.

    dist = init_distributed()                       # torchrun env vars → process group (gloo on CPU)
    seed_everything(seed)
    model = build_model().to(dist.device)
    trainer = Trainer(model, optimizer, task, TrainConfig(out_dir="runs/x", epochs=3), run_config)
    result = trainer.fit(resume="runs/x/last.pt")   # or resume=None

A ``Task`` owns the data and the loss (see the Protocol below). Its ``state_dict`` must capture
its position in the data (and anything carried between batches, e.g. an LSTM's hidden state) so
that a resumed run sees exactly the batches the uninterrupted run would have seen.

Checkpoints (``last.pt``, ``best.pt`` in ``out_dir``) are written by rank 0 only, atomically
(temporary file, fsync, ``os.replace``), and hold plain data only: they are read back with
``torch.load(weights_only=True)``, so a crafted file cannot run code. Each records the run's
configuration; resuming under a different one is refused, naming the differing settings.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

from define_ops import DeFINE, TokenIdError

try:
    from tqdm import tqdm
except ImportError:  # progress bars are optional
    tqdm = None

CHECKPOINT_FORMAT = "define_ops.models.trainer/1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, unreadable, not plain data, or from another configuration."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient; the message names the step and the last good checkpoint."""


class BadTokenIdError(IndexError):
    """A batch held a token id outside a DeFINE layer's vocabulary (found by its id check, before
    the call or deferred); the message names the id, the step and the last good checkpoint."""


@dataclass
class StepResult:
    loss: Tensor  # what backward() sees (may include regularisers): a mean over ``tokens``
    tokens: int  # targets this rank's step covered: the weight of its loss and the tokens/s counter
    log_loss: Tensor | None = None  # what is logged, e.g. the NLL without AR/TAR (defaults to ``loss``)
    lr_scale: float = 1.0  # multiplies every group's lr for this step only (AWD-LSTM's variable BPTT)


class Task(Protocol):
    def train_batches(self, epoch: int) -> Iterable[Any]:
        """Batches of ``epoch``, continuing from the saved position if the task is mid-epoch."""

    def train_step(self, model: nn.Module, batch: Any) -> StepResult:
        """Forward (through ``model``, possibly DDP-wrapped) and the loss; the trainer does the rest."""

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        """Metrics of ``split`` (already reduced over ranks), including TrainConfig.metric."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")


@dataclass
class TrainConfig:
    out_dir: str
    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps in total (across resumes)
    eval_every: int = 0  # validate every N steps; 0: at the end of every epoch
    save_every: int = 0  # also write last.pt every N steps (validation always writes it)
    log_every: int = 50  # steps per JSON-lines train record
    clip: float = 0.0  # max gradient norm; 0: no clipping
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; CUDA only) | auto (bf16 on CUDA, else fp32)
    seed: int = 0
    metric: str = "loss"  # validation metric that decides best.pt
    mode: str = "min"  # min | max
    scheduler_interval: str = "step"  # when scheduler.step() runs: after each "step" or "epoch"
    test_split: str | None = "test"  # evaluated at the end with the best weights; None: skip
    progress: bool = True
    show_ppl: bool = True  # progress bar shows exp(loss)
    find_unused_parameters: bool = False
    accum_steps: int = 1  # batches per optimizer step (gradient accumulation); an epoch's last step may get fewer
    # torch.compile of the training forward: "off", "default", "reduce-overhead" (CUDA graphs: removes
    # the per-op host work that dominates small layers on a GPU) or "max-autotune"
    compile: str = "off"

    def __post_init__(self) -> None:
        if self.accum_steps < 1:
            raise ValueError(f"TrainConfig.accum_steps must be >= 1, got {self.accum_steps}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"TrainConfig.compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}")

    @classmethod
    def from_settings(cls, cfg: dict[str, Any], **extra: Any) -> TrainConfig:
        """The loop's part of a command's resolved settings (the flags of ``add_loop_arguments``)."""
        return cls(
            out_dir=cfg["out"], epochs=cfg["epochs"], max_steps=cfg["max_steps"], eval_every=cfg["eval_every"],
            save_every=cfg["save_every"], log_every=cfg["log_every"], clip=cfg["clip"], precision=cfg["precision"],
            accum_steps=cfg.get("accum_steps", 1),  # checkpoints from before the option have none
            compile=cfg.get("compile", "off"),
            seed=cfg["seed"], **extra,
        )  # fmt: skip


def add_loop_arguments(group: argparse._ArgumentGroup) -> None:
    """The flags every training command shares (TrainConfig's); unset ones stay absent, so a
    command's defaults and presets fill them."""
    S = argparse.SUPPRESS
    group.add_argument("--clip", type=float, default=S, help="max gradient norm (0: off)")
    group.add_argument("--accum-steps", type=int, default=S, help="batches per optimizer step (gradient accumulation)")
    group.add_argument("--epochs", type=int, default=S)
    group.add_argument("--max-steps", type=int, default=S, help="total optimizer steps (0: no limit)")
    group.add_argument("--eval-every", type=int, default=S, help="validate every N steps (0: every epoch)")
    group.add_argument("--save-every", type=int, default=S)
    group.add_argument("--log-every", type=int, default=S)
    group.add_argument("--seed", type=int, default=S)
    group.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default=S)
    group.add_argument("--compile", choices=COMPILE_MODES, default=S,
                       help="torch.compile the training forward (reduce-overhead: CUDA graphs on a GPU)")  # fmt: skip


@dataclass
class FitResult:
    status: str  # "done" | "interrupted"
    step: int
    epoch: int
    best: dict[str, Any] = field(default_factory=dict)  # {"value", "step"}
    valid: dict[str, float] | None = None
    test: dict[str, float] | None = None
    tokens_per_s: float = 0.0
    signal: int | None = None


def gradient_norm(params: list[Tensor], device: torch.device) -> Tensor:
    """The 2-norm of all of ``params``' gradients, a device scalar (no host read). A sparse gradient
    (an ``nn.Embedding(sparse=True)`` or ``DeFINE(sparse=True)`` table) counts by its coalesced values."""
    grads = [p.grad.coalesce()._values() if p.grad.is_sparse else p.grad for p in params]
    return nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=device)


def perplexity(loss: float) -> float:
    """exp(loss), inf where that overflows a float (a diverged model's perplexity is not 1e304)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


# ------------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str | None = None) -> torch.device:
    """The device ``--device NAME`` asks for (None: cuda if available, else cpu), with an index on
    CUDA; ValueError saying why where NAME is not a device this machine has."""
    if not name:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"--device {name}: training and translation run on cpu or cuda[:N], not {device.type}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ValueError(f"--device {name}: no CUDA device is available on this machine (use --device cpu)")
    if device.index is not None and device.index >= count:
        raise ValueError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def init_distributed(device: str | None = None) -> Dist:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and join the process group:
    NCCL on CUDA, gloo on the CPU. Without those variables: one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        if world > 1:  # one GPU per process, whichever --device named
            dev = resolve_device(f"cuda:{local}")
        torch.cuda.set_device(dev)
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local, dev)


def cleanup_distributed() -> None:
    if torch_dist.is_initialized():
        # every rank arrives before any tears the group down (otherwise gloo can hang a late rank)
        with contextlib.suppress(RuntimeError):
            torch_dist.barrier()
        torch_dist.destroy_process_group()


def all_reduce_sum(values: list[float], dist: Dist) -> list[float]:
    """Sum floats over ranks (identity in one process); float64 so token counts stay exact."""
    if not dist.active:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=dist.device)
    torch_dist.all_reduce(tensor)
    return tensor.tolist()


def _gather(obj: Any, dist: Dist) -> list[Any]:
    if not dist.active:
        return [obj]
    out: list[Any] = [None] * dist.world_size
    torch_dist.all_gather_object(out, obj)
    return out


def _barrier(dist: Dist) -> None:
    if dist.active:
        torch_dist.barrier()


# ----------------------------------------------------------------------------- command lines
def run_stamp(dist: Dist) -> str:
    """A timestamp for a default run directory that every rank agrees on (rank 0's)."""
    stamp = [time.strftime("%Y%m%d-%H%M%S")]
    if dist.active:
        torch_dist.broadcast_object_list(stamp, src=0)
    return stamp[0]


def resolve_run(
    args: Any,
    resolve_config: Callable[..., dict[str, Any]],
    default_out: Callable[[dict[str, Any]], str],
    resume_ignore: Iterable[str] = (),
) -> tuple[dict[str, Any], str | None]:
    """(settings, checkpoint to resume from or None) from a training command's arguments.

    ``--resume [CHECKPOINT]`` continues a run (default OUT/last.pt; the run directory is where the
    checkpoint is, unless --out says otherwise), its settings under the flags given, which may
    change only ``resume_ignore`` (checked here, before anything is built from the settings);
    otherwise a fresh run, in ``default_out(settings)`` without --out, which never silently
    replaces an existing run (``--overwrite`` allows it).
    """
    resume = args.resume
    if resume is not None:
        if resume == "":
            if not hasattr(args, "out"):
                raise ValueError("--resume without a path needs --out (the run directory)")
            resume = str(Path(args.out) / "last.pt")
        base = load_checkpoint(resume)["config"]
        cfg = resolve_config(args, base=base)
        # e.g. another --arch: its model would be built from settings of the checkpoint's kind
        check_compatible(base, _json_safe(cfg), resume_ignore, resume)
        if not hasattr(args, "out"):  # the run directory is where the checkpoint is now
            cfg["out"] = str(Path(resume).parent)
        return cfg, resume
    cfg = resolve_config(args)
    if "out" not in cfg:
        cfg["out"] = default_out(cfg)
    if (Path(cfg["out"]) / "last.pt").exists() and not args.overwrite:
        raise ValueError(f"{cfg['out']} already holds a checkpoint: pass --resume to continue it, "
                         f"--overwrite to start again there, or another --out")  # fmt: skip
    return cfg, None


def run_command(device: str | None, body: Callable[[Dist], int], user_errors: tuple[type[Exception], ...]) -> int:
    """A training command's exit status: ``body(dist)`` inside the process group; 1 with a one-line
    message for a non-finite loss, 2 for ``user_errors`` (bad data, checkpoints or settings)."""
    try:
        return body(init_distributed(device))
    except (NonFiniteLossError, BadTokenIdError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except user_errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        cleanup_distributed()


# ------------------------------------------------------------------------------------- RNG
def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed % 2**32)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    with contextlib.suppress(ImportError):
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached))
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        with contextlib.suppress(ImportError):
            import numpy as np

            kind, keys, pos, has_gauss, cached = state["numpy"]
            np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


# ------------------------------------------------------------------------------- checkpoints
def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same directory, fsync, then rename over ``path``:
    a reader (or a crash) never sees a half-written checkpoint."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _load_failure_reason(exc: Exception) -> str:
    """The line of torch.load's error that says what was refused (e.g. "Trying to load unsupported
    GLOBAL posix.system ..."), without the boilerplate around it, which advises weights_only=False."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:  # what follows this marker is the reason (on torch 2.13: a line below)
        text = text.split("WeightsUnpickler error:", 1)[1]
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue")
    causes = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(boilerplate)]
    reason = causes[0] if causes else type(exc).__name__
    return reason.split(" Please use `torch.serialization", 1)[0]


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint as data only (``weights_only=True``): tensors and plain Python values."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = _load_failure_reason(exc)
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain-data checkpoint or is damaged "
            f"(only tensors and basic Python values are accepted; loader said: {reason})"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint written by models.trainer (format {CHECKPOINT_FORMAT})")
    return state


def check_compatible(saved: dict[str, Any], current: dict[str, Any], ignore: Iterable[str], path: Any = "") -> None:
    """Raise CheckpointError listing every setting (outside ``ignore``) that differs."""
    ignored = set(ignore)
    missing = object()
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if key in ignored:
            continue
        before, now = saved.get(key, missing), current.get(key, missing)
        if before != now:
            show = lambda v: "(unset)" if v is missing else repr(v)
            diffs.append(f"  {key}: checkpoint {show(before)}, this run {show(now)}")
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} was written by a different configuration; refusing to resume from it:\n"
            + "\n".join(diffs)
            + "\n(resume with the checkpoint's settings, or start a fresh run in another output directory)"
        )


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _json_safe(config: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(config))  # tuples → lists, so a reloaded config compares equal


# -------------------------------------------------------------------------------------- loop
class Trainer:
    """Runs ``task`` on ``model`` with ``optimizer`` (and an optional LR ``scheduler``).

    ``run_config`` (JSON-able) is stored in every checkpoint; on resume every key outside
    ``resume_ignore`` must match. Optimizers with ``observe(metric)`` (NT-ASGD) are told every
    validation result; those with an ``averaged()`` context are evaluated under it.
    The model must already be on ``dist.device``; the trainer wraps it in DDP when world_size > 1
    and seeds every generator with ``config.seed + rank``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        task: Task,
        config: TrainConfig,
        run_config: dict[str, Any],
        *,
        scheduler: Any = None,
        dist: Dist | None = None,
        resume_ignore: Iterable[str] = (),
    ) -> None:
        self.model, self.optimizer, self.task, self.cfg = model, optimizer, task, config
        self.scheduler, self.dist = scheduler, dist or Dist(device=next(model.parameters()).device)
        self.run_config = _json_safe(run_config)
        self.resume_ignore = set(resume_ignore)
        self.out_dir = Path(config.out_dir)
        self.precision = self._resolve_precision(config.precision)
        device = self.dist.device
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.ddp_model: nn.Module = model
        if self.dist.active:
            ids = [device.index] if device.type == "cuda" else None
            self.ddp_model = nn.parallel.DistributedDataParallel(
                model, device_ids=ids, find_unused_parameters=config.find_unused_parameters
            )
        if config.compile != "off":
            # Only the training forward is compiled (evaluation runs self.model eagerly: its shapes
            # and no-grad mode would cost recompilations); checkpoints hold self.model's state, so
            # their keys are the same with or without compilation and a run resumes either way.
            mode = None if config.compile == "default" else config.compile
            self.ddp_model = torch.compile(self.ddp_model, mode=mode)
        # DeFINE layers with validate_ids="deferred" check ids without a host synchronisation; their
        # verdicts are read after the step's one host read, when they have arrived (collected once:
        # a module walk per step would cost more than the checks).
        self._define_layers = [m for m in model.modules() if isinstance(m, DeFINE)]
        self.step = 0
        self.epoch = 0
        self.best: dict[str, Any] = {"value": None, "step": None}
        self.last_saved_step: int | None = None
        self.last_valid_step: int | None = None
        self.last_valid: dict[str, float] | None = None
        self.train_time = 0.0
        self.train_tokens = 0
        self._signal: int | None = None
        self._stop = False
        self._step_lr = 0.0
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(config.seed + self.dist.rank)

    # ------------------------------------------------------------------ paths and logging
    @property
    def last_path(self) -> Path:
        return self.out_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.out_dir / "best.pt"

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line to metrics.jsonl (rank 0 only)."""
        if not self.dist.is_main:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def print(self, message: str) -> None:
        if self.dist.is_main:
            if tqdm is not None:
                tqdm.write(message)
            else:
                print(message, flush=True)

    def _resolve_precision(self, precision: str) -> str:
        cuda = self.dist.device.type == "cuda"
        if precision == "auto":
            return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"unknown precision {precision!r}; choose fp32, bf16, fp16 or auto")
        if precision != "fp32" and not cuda:
            raise ValueError(f"{precision} autocast needs a CUDA device; use --precision fp32 on the CPU")
        return precision

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.dist.device.type, dtype=dtype)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The full checkpoint (collective under DDP: every rank's RNG and task state are gathered)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.run_config,
            "world_size": self.dist.world_size,
            "torch_version": str(torch.__version__),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "trainer": {
                "step": self.step,
                "epoch": self.epoch,
                "best": dict(self.best),
                "last_valid_step": self.last_valid_step,
                "last_valid": self.last_valid,
                "train_time": self.train_time,
                "train_tokens": self.train_tokens,
            },
            "rng": _gather(_to_cpu(rng_state()), self.dist),
            "task": _gather(_to_cpu(self.task.state_dict()), self.dist),
        }

    def _weights_finite(self) -> bool:
        # the largest magnitude over every parameter in one fused reduction; NaN propagates
        params = [p.detach() for p in self.model.parameters()]
        return not params or bool(torch.isfinite(nn.utils.get_total_norm(params, norm_type=math.inf)))

    def save_last(self, *, best: bool = False) -> None:
        """Write last.pt (and best.pt as a link to it); refuses weights that are not finite, so a
        checkpoint on disk can always be resumed or evaluated."""
        if not self._weights_finite():  # every rank holds the same weights: all raise together
            self._raise_nonfinite("weights", math.nan, after_step=True)
        state = self.state_dict()  # every rank takes part in the gather
        if self.dist.is_main:
            atomic_save(state, self.last_path)
            if best:  # best.pt = a hard link to this last.pt (no second write); copy where links fail
                tmp = self.best_path.with_name(f".best.pt.tmp-{os.getpid()}")
                try:
                    os.link(self.last_path, tmp)
                except OSError:
                    shutil.copyfile(self.last_path, tmp)
                os.replace(tmp, self.best_path)
        self.last_saved_step = self.step

    def load(self, path: str | os.PathLike, *, full: bool = True, check_config: bool = True) -> dict[str, Any]:
        """Restore from ``path``. ``full``: everything needed to continue training (optimizer, scheduler,
        counters, RNG and data position); otherwise the weights and optimizer (for averaged evaluation)."""
        state = load_checkpoint(path)
        if check_config:
            check_compatible(state["config"], self.run_config, self.resume_ignore, path)
        if full and state["world_size"] != self.dist.world_size:
            raise CheckpointError(
                f"checkpoint {path} was written by {state['world_size']} processes and this run has "
                f"{self.dist.world_size}; exact resume needs the same number (each one's data shard and RNG)"
            )
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint {path} does not fit this model/optimizer: {exc}") from exc
        if not full:
            return state
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] is not None and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self._rescale_lr(state["config"].get("lr"), self.run_config.get("lr"))
        t = state["trainer"]
        self.step, self.epoch, self.best = t["step"], t["epoch"], dict(t["best"])
        self.last_valid_step, self.last_valid = t["last_valid_step"], t["last_valid"]
        self.train_time, self.train_tokens = t["train_time"], t["train_tokens"]
        self.last_saved_step = self.step
        set_rng_state(state["rng"][self.dist.rank])
        self.task.load_state_dict(state["task"][self.dist.rank])
        return state

    def _rescale_lr(self, saved: float | None, new: float | None) -> None:
        """A run resumed under another ``lr`` (its run_config's base or peak rate): every group's rate,
        and the base rates the scheduler multiplies by its factor, scale by new / saved, so the
        schedule goes on from where it was at the new height."""
        if saved is None or new is None or saved == new:
            return
        if saved == 0:
            raise CheckpointError(f"the checkpoint's learning rate is 0: a new --lr {new} cannot be scaled from it")
        ratio = new / saved
        for group in self.optimizer.param_groups:
            group["lr"] *= ratio
            if "initial_lr" in group:
                group["initial_lr"] = new if group["initial_lr"] == saved else group["initial_lr"] * ratio
        if self.scheduler is not None:
            self.scheduler.base_lrs = [new if lr == saved else lr * ratio for lr in self.scheduler.base_lrs]
            if hasattr(self.scheduler, "_last_lr"):
                self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _note_resume_changes(self, saved: dict[str, Any]) -> None:
        changed = {key: [saved.get(key), self.run_config.get(key)] for key in sorted(self.resume_ignore)
                   if saved.get(key) != self.run_config.get(key)}  # fmt: skip
        if changed:
            self.log({"event": "resume", "step": self.step, "changed": changed})
            self.print("note: resumed with changed settings: "
                       + ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items()))  # fmt: skip

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, split: str) -> dict[str, float]:
        averaged = getattr(self.optimizer, "averaged", None)
        was_training = self.model.training
        self.model.eval()
        try:
            with averaged() if averaged is not None else contextlib.nullcontext(), torch.no_grad(), self.autocast():
                metrics = self.task.evaluate(self.model, split)
            self._check_eval_ids(split)
            return metrics
        finally:
            self.model.train(was_training)

    def _is_better(self, value: float, scheduled: bool) -> bool:
        if not math.isfinite(value):  # a NaN/inf validation result is never the best
            return False
        best = self.best["value"]
        if best is None:
            return True
        if scheduled != self.best.get("scheduled", True):  # (checkpoints from before the flag: all scheduled)
            return scheduled  # a scheduled result replaces an off-schedule best; never the other way round
        return value < best if self.cfg.mode == "min" else value > best

    def _validate(self, *, scheduled: bool = True) -> dict[str, float]:
        """Validate, log, save last.pt, and best.pt where the result is the best so far. Results off
        the schedule (the final step's, when it is not a validation step) count only until a scheduled
        one exists: a run extended on resume then picks the best an uninterrupted run picks."""
        metrics = self.evaluate("valid")
        value = metrics[self.cfg.metric]
        if scheduled and hasattr(self.optimizer, "observe"):  # only on the schedule, so a later resume stays exact
            self.optimizer.observe(value)
        improved = self._is_better(value, scheduled)
        if improved:
            self.best = {"value": value, "step": self.step, "scheduled": scheduled}
        self.last_valid_step, self.last_valid = self.step, metrics
        self.log({"event": "valid", "step": self.step, "epoch": self.epoch, "scheduled": scheduled, **metrics})
        mark = " *" if improved else ""
        self.print(f"| step {self.step:6d} | epoch {self.epoch:3d} | valid {self._fmt(metrics)}{mark}")
        self.save_last(best=improved)
        return metrics

    @staticmethod
    def _fmt(metrics: dict[str, float]) -> str:
        return " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())

    # ------------------------------------------------------------------ one step
    def _train_step(self, micro_batches: list[Any]) -> tuple[float, int, float]:
        """One optimizer step over ``accum_steps`` micro-batches (fewer at the end of an epoch).

        The gradient is the mean over every token of every micro-batch on every rank, whatever
        their sizes. All but the last micro-batch run backward without DDP's all-reduce, each loss
        (a mean over its own tokens) weighted by its token count relative to the first one's so
        that backward sees values near 1 (no fp16 overflow from raw token counts). The last one's
        forward reveals this rank's token total; one small all-reduce gives the global total T;
        the accumulated gradients are rescaled and the last loss weighted so that DDP's average
        over ranks becomes the sum over all tokens / T. One batch on one process: weight 1 exactly.

        The step reads the device once, after the last backward: loss, tokens, stop flags and the
        gradient norm together. A non-finite loss or gradient (with or without clipping) raises
        before the optimizer touches the weights.
        """
        device = self.dist.device
        world = self.dist.world_size if self.dist.active else 1
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        nonfinite = torch.zeros((), dtype=torch.float64, device=device)
        local_tokens, lr_scale_sum = 0, 0.0
        unit = 1  # token count that a micro-batch's weight of 1 stands for
        lr_scale = 1.0
        for index, batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            # DDP decides in forward whether this backward all-reduces: only the last one does
            no_sync = self.ddp_model.no_sync() if self.dist.active and not last else contextlib.nullcontext()
            with no_sync:
                with self.autocast():
                    result = self.task.train_step(self.ddp_model, batch)
                loss, tokens = result.loss, int(result.tokens)
                if tokens > 0:  # an empty micro-batch's mean is NaN: it carries no loss and no weight
                    log_loss = (result.log_loss if result.log_loss is not None else loss).detach().float()
                    loss_sum += log_loss.to(device, torch.float64) * tokens
                    finite = torch.isfinite(loss.detach()) & torch.isfinite(log_loss)
                    nonfinite += (~finite).to(device, torch.float64)
                if index == 0:
                    unit, lr_scale = max(tokens, 1), result.lr_scale
                local_tokens += tokens
                lr_scale_sum += result.lr_scale * tokens
                if not last:
                    self.scaler.scale(loss * (tokens / unit)).backward()
        if len(micro_batches) > 1 and local_tokens > 0:
            lr_scale = lr_scale_sum / local_tokens  # AWD-LSTM's per-batch lr scale, token-weighted
        check = torch.stack([
            loss_sum,
            torch.tensor(float(local_tokens), dtype=torch.float64, device=device),
            nonfinite,
            torch.tensor(float(self._signal is not None), dtype=torch.float64, device=device),
        ])  # fmt: skip
        total: float | Tensor = float(max(local_tokens, 1))
        if self.dist.active:  # one small collective per step: global loss and tokens, NaN anywhere, stop anywhere
            torch_dist.all_reduce(check)
            total = check[1].clamp_min(1.0)  # stays on the device: the step's one host read comes later
        if len(micro_batches) > 1:
            rescale = unit * world / total  # one device scalar, not one division per parameter
            for param in self.model.parameters():
                if param.grad is not None:
                    param.grad.mul_(rescale)  # DDP then divides the ranks' sum by world
        weight = tokens * world / total  # exactly 1.0 for one batch on one process
        if isinstance(weight, Tensor):
            loss = loss * weight.to(loss.dtype)
        elif weight != 1.0:
            loss = loss * weight
        self.scaler.scale(loss).backward()
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)  # the norm (and clipping) of the true gradient
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = gradient_norm(params, device)
        if self.cfg.clip > 0:
            nn.utils.clip_grads_with_norm_(params, self.cfg.clip, norm)
        readout = torch.cat([check, norm.detach().to(device, torch.float64).reshape(1)])
        loss_total, total_tokens, nonfinite_count, stop, grad_norm = readout.tolist()
        # before the NaN checks, so a bad id's NaN is reported as its cause (fit names the step)
        self._check_pending_ids()
        self._stop = stop > 0
        total_tokens = max(total_tokens, 1.0)
        if nonfinite_count > 0:
            self.optimizer.zero_grad(set_to_none=True)
            self._raise_nonfinite("loss", loss_total / total_tokens)
        if not math.isfinite(grad_norm) and not self.scaler.is_enabled():  # fp16 skips such steps itself
            self.optimizer.zero_grad(set_to_none=True)
            self._raise_nonfinite("gradient norm", grad_norm)
        saved_lrs = [group["lr"] for group in self.optimizer.param_groups]
        if lr_scale != 1.0:
            for group in self.optimizer.param_groups:
                group["lr"] = group["lr"] * lr_scale
        self._step_lr = self.optimizer.param_groups[0]["lr"]  # logged: the rate this step used, not the next one's
        self.scaler.step(self.optimizer)
        self.scaler.update()
        for group, lr in zip(self.optimizer.param_groups, saved_lrs, strict=True):
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None and self.cfg.scheduler_interval == "step":
            self.scheduler.step()
        return loss_total / total_tokens, int(total_tokens), grad_norm

    def _kept_checkpoint(self) -> str:
        if self.last_saved_step is not None:
            return f"the last good checkpoint, {self.last_path} (step {self.last_saved_step}), is left as it was"
        return "no checkpoint had been written yet"

    def _check_pending_ids(self) -> None:
        """Raise the TokenIdError of a bad id that a DeFINE layer's deferred check found. Called after
        a host read of the results, so the checks have arrived: no wait."""
        for layer in self._define_layers:
            layer.check_pending_ids()

    def _check_eval_ids(self, split: str) -> None:
        """_check_pending_ids after an evaluation, on every rank: all raise when one found a bad id
        (one small collective; training steps need none, as the bad id's NaN loss stops every rank)."""
        found = None
        try:
            self._check_pending_ids()
        except TokenIdError as exc:
            found = exc
        if self.dist.active:
            flag = torch.tensor([float(found is not None)], device=self.dist.device)
            torch_dist.all_reduce(flag)
            if found is None and flag.item() > 0:
                found = TokenIdError("another rank's batch held a token id out of the model's vocabulary")
        if found is not None:
            self._raise_bad_id(found, f"evaluation on {split} after step {self.step}")

    def _raise_bad_id(self, found: TokenIdError, during: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        raise BadTokenIdError(
            f"{found}. During {during}, epoch {self.epoch}: training stopped without saving; "
            f"{self._kept_checkpoint()}. The data holds ids that the model's vocabulary does not."
        ) from found

    def _raise_nonfinite(self, what: str, value: float, *, after_step: bool = False) -> None:
        kept = self._kept_checkpoint()
        step = self.step if after_step else self.step + 1
        raise NonFiniteLossError(
            f"non-finite training {what} ({value}) at step {step}, epoch {self.epoch}: training stopped "
            f"without saving; {kept}. Resume from it with a lower --lr or a (tighter) --clip."
        )

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._signal is not None:  # a second signal: stop now, without a checkpoint
            raise KeyboardInterrupt
        self._signal = signum
        name = signal.Signals(signum).name
        print(f"\n{name} received: finishing this step, saving a checkpoint, then exiting "
              f"(send it again to abort without saving)", file=sys.stderr, flush=True)  # fmt: skip

    @contextlib.contextmanager
    def _signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _should_stop(self) -> bool:
        # Under DDP every rank must stop at the same step: use the consensus of the last step's
        # all-reduce. Alone, the local flag is the truth.
        return self._stop if self.dist.active else self._signal is not None

    # ------------------------------------------------------------------ the loop
    def _progress_total(self) -> int | None:
        per_epoch = None
        with contextlib.suppress(TypeError, AttributeError):
            per_epoch = -(-self.task.steps_per_epoch() // self.cfg.accum_steps)
        totals = [t for t in (self.cfg.max_steps, per_epoch and per_epoch * self.cfg.epochs) if t]
        return min(totals) if totals else None

    def _trim_metrics(self) -> None:
        # A run that died after its last checkpoint logged steps the resumed run will redo; a run
        # that had finished logged a test and end record that the resumed one writes anew.
        if not (self.dist.is_main and self.metrics_path.exists()):
            return
        kept = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(line)
                if record.get("step", 0) <= self.step and record.get("event") not in ("test", "end"):
                    kept.append(line)
        self.metrics_path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")

    def fit(
        self, resume: str | os.PathLike | None = None, on_step: Callable[[Trainer, float], None] | None = None
    ) -> FitResult:
        """Train until ``epochs`` or ``max_steps``, then test with the best weights.

        Returns a FitResult; status "interrupted" after SIGINT/SIGTERM (last.pt holds the state to
        resume from). Raises NonFiniteLossError on a NaN/inf loss and CheckpointError on a bad resume.
        ``on_step(trainer, loss)`` runs after every step (tests use it to inject faults).
        """
        cfg = self.cfg
        if resume is not None:
            saved = self.load(resume)
            self._trim_metrics()
            self.print(f"resumed from {resume} at step {self.step}, epoch {self.epoch}")
            self._note_resume_changes(saved["config"])
        else:
            if self.dist.is_main and self.metrics_path.exists():
                self.metrics_path.unlink()  # a fresh run starts a fresh log
            self.log({"event": "config", "step": 0, "config": self.run_config, "train": asdict(cfg)})
        if cfg.max_steps and cfg.eval_every and cfg.max_steps % cfg.eval_every:
            self.print(f"note: the last step ({cfg.max_steps}) is not a validation step (every {cfg.eval_every}): "
                       f"its validation is reported but best.pt (and the test) keep the best scheduled one; "
                       f"make --max-steps a multiple of --eval-every to let the final weights compete")  # fmt: skip
        bar = None
        if tqdm is not None and cfg.progress and self.dist.is_main:
            bar = tqdm(total=self._progress_total(), initial=self.step, unit="step", dynamic_ncols=True, leave=False)
        window = {"loss": 0.0, "tokens": 0, "steps": 0, "start": time.perf_counter()}
        self.model.train()
        try:
            with self._signal_handlers():
                while self.epoch < cfg.epochs and not self._done():
                    batches = iter(self.task.train_batches(self.epoch))
                    while not self._done():
                        if self._should_stop():
                            return self._interrupted()
                        started = time.perf_counter()
                        micro_batches = list(itertools.islice(batches, cfg.accum_steps))
                        if not micro_batches:
                            break
                        try:
                            loss, tokens, grad_norm = self._train_step(micro_batches)
                        except TokenIdError as bad_id:  # from a check before a DeFINE call or a deferred one
                            self._raise_bad_id(bad_id, f"training step {self.step + 1}")
                        self.step += 1
                        elapsed = time.perf_counter() - started
                        self.train_time += elapsed
                        self.train_tokens += tokens
                        window["loss"] += loss * tokens
                        window["tokens"] += tokens
                        window["steps"] += 1
                        self._report(bar, window, grad_norm)
                        if on_step is not None:
                            on_step(self, loss)
                        if cfg.eval_every and self.step % cfg.eval_every == 0:
                            self._validate()
                            window["start"] = time.perf_counter()
                        elif cfg.save_every and self.step % cfg.save_every == 0:
                            self.save_last()
                    else:
                        continue  # max_steps reached
                    if self._should_stop():
                        return self._interrupted()
                    # the epoch's batches are exhausted
                    self.epoch += 1
                    if self.scheduler is not None and cfg.scheduler_interval == "epoch":
                        self.scheduler.step()
                    if not cfg.eval_every:
                        self._validate()
                        window["start"] = time.perf_counter()
                    else:
                        self.save_last()
                return self._finish()
        finally:
            if bar is not None:
                bar.close()

    def _done(self) -> bool:
        return self.cfg.max_steps is not None and self.step >= self.cfg.max_steps

    def _report(self, bar: Any, window: dict[str, Any], grad_norm: float | None) -> None:
        if not self.dist.is_main:
            return
        span = max(time.perf_counter() - window["start"], 1e-9)
        loss = window["loss"] / max(window["tokens"], 1)
        tok_s = window["tokens"] / span
        if bar is not None:
            ppl = f" ppl {perplexity(loss):.1f}" if self.cfg.show_ppl else ""
            bar.set_postfix_str(f"ep {self.epoch} loss {loss:.3f}{ppl} {tok_s:,.0f} tok/s", refresh=False)
            bar.update(1)
        if window["steps"] >= self.cfg.log_every:
            record = {
                "event": "train", "step": self.step, "epoch": self.epoch, "loss": loss, "ppl": perplexity(loss),
                "lr": self._step_lr, "tokens_per_s": tok_s, "grad_norm": grad_norm,
            }  # fmt: skip
            self.log(record)
            window.update(loss=0.0, tokens=0, steps=0, start=time.perf_counter())

    def _interrupted(self) -> FitResult:
        if self.last_saved_step != self.step:
            self.save_last()
        signum = self._signal
        self.log({"event": "interrupted", "step": self.step, "epoch": self.epoch, "signal": signum})
        self.print(f"stopped at step {self.step}: state saved to {self.last_path}; continue with --resume")
        return FitResult("interrupted", self.step, self.epoch, dict(self.best), self.last_valid, None,
                         self._tokens_per_s(), signum)  # fmt: skip

    def _tokens_per_s(self) -> float:
        # train_tokens already counts every rank's tokens (each step's all-reduced total)
        return self.train_tokens / self.train_time if self.train_time else 0.0

    def _finish(self) -> FitResult:
        if self.last_valid_step != self.step:
            self._validate(scheduled=False)
        elif self.last_saved_step != self.step:
            self.save_last()
        test = None
        if self.cfg.test_split:
            _barrier(self.dist)  # best.pt is written by rank 0
            if self.best["step"] is not None and self.best["step"] != self.step and self.best_path.exists():
                self.load(self.best_path, full=False, check_config=False)
            test = self.evaluate(self.cfg.test_split)
            self.log({"event": "test", "step": self.step, "best_step": self.best["step"], **test})
            best = (f"{self.best['value']:.4g} (step {self.best['step']})" if self.best["value"] is not None
                    else "none (no finite validation result)")  # fmt: skip
            self.print(f"| end | best valid {self.cfg.metric} {best} | {self.cfg.test_split} {self._fmt(test)}")
        tok_s = self._tokens_per_s()
        self.log({"event": "end", "step": self.step, "epoch": self.epoch, "tokens_per_s": tok_s})
        return FitResult("done", self.step, self.epoch, dict(self.best), self.last_valid, test, tok_s)
