"""Train or evaluate a word-level language model with a DeFINE, standard or adaptive input.

    python -m models.train_lm --arch lstm --embedding define --data ../shared/data/wikitext-2
    python -m models.train_lm --preset awd_ptb --data ../shared/data/ptb            # AWD-LSTM + DeFINE
    python -m models.train_lm --preset txl_wt103 --data DIR                          # Transformer-XL
    python -m models.train_lm --resume runs/lm/x/last.pt [--max-steps N]             # continue exactly
    python -m models.train_lm --eval-only runs/lm/x/best.pt                          # valid/test ppl
    torchrun --nproc_per_node 2 -m models.train_lm ...                               # DDP (gloo on CPU)

Settings resolve as: the architecture's defaults < ``--preset`` < flags given on the command line
(on ``--resume``: the checkpoint's settings < flags given). Exit status: 0 done, 1 non-finite loss,
2 bad data/settings/checkpoint, 128 + signal number after SIGINT/SIGTERM (checkpoint saved).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

from .adaptive import check_cutoffs
from .awd_lstm import AWDLSTM, NTASGD, AWDLSTMConfig
from .common import EMBEDDINGS, check_define_backend, detach_state, optimizer_groups, state_to
from .data import BpttBatcher, Corpus, DataError, batchify, shard_streams
from .lstm_lm import LSTMLM, LSTMLMConfig
from .trainer import (
    CheckpointError,
    Dist,
    StepResult,
    TrainConfig,
    Trainer,
    add_loop_arguments,
    all_reduce_sum,
    load_checkpoint,
    perplexity,
    resolve_run,
    run_command,
    run_stamp,
    seed_everything,
)
from .transformer_xl import TransformerXL, TransformerXLConfig

ARCHS = ("lstm", "awd-lstm", "transformer-xl")
# SGD at an LSTM language model's rate (20-30) trains the LSTM and the tables well but collapses the
# DeFINE transform (WikiText-2, H200, 1,200 steps: valid ppl 1931 vs 467 for a standard embedding);
# the transform at this fraction of it trains (see the README's language-model section).
SGD_DEFINE_LR_SCALE = 0.05

COMMON = {
    "embedding": "define", "table_dim": 128, "softmax": "adaptive", "cutoffs": None, "div_val": None,
    "define_max_dim": 1024, "define_depth": 3, "define_max_groups": 4, "define_dropout": 0.0,
    "define_group_width_multiple": 1,
    "define_map": "table", "define_backend": "auto", "define_lr_scale": None, "optimizer": "sgd", "lr": 20.0,
    "weight_decay": 0.0, "clip": 0.25,
    "scheduler": "none", "lr_milestones": [], "lr_gamma": 0.1, "warmup_steps": 0, "lr_decay_steps": None, "nonmono": 5,
    "epochs": 1, "max_steps": None, "batch_size": 20, "eval_batch_size": 10, "test_batch_size": 10,
    "bptt": 35, "eval_bptt": None, "variable_bptt": False, "max_train_tokens": None, "max_eval_tokens": None,
    "eval_every": 0, "save_every": 0, "accum_steps": 1, "log_every": 50, "seed": 1111, "precision": "auto",
    "compile": "off",
}  # fmt: skip
# Without a preset each architecture gets a small configuration that trains in minutes on a CPU
# (the LSTM: 600 steps of 20 x 35 tokens with Adam, which beats SGD at so short a budget).
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "lstm": {
        "input_dim": 128, "hidden": 512, "layers": 2, "tie": "width", "dropout": 0.1, "dropouth": 0.1,
        "dropouti": 0.1, "optimizer": "adam", "lr": 2e-3, "max_steps": 600, "eval_every": 0,
    },
    "awd-lstm": {  # AWD-LSTM's own argument defaults (its main.py), DeFINE as in the paper
        "table_dim": 128, "input_dim": 400, "hidden": 1150, "layers": 3, "tie": "width", "softmax": "full",
        "dropout": 0.4, "dropouth": 0.3, "dropouti": 0.65, "dropoute": 0.1, "wdrop": 0.5, "alpha": 2.0,
        "beta": 1.0, "optimizer": "ntasgd", "lr": 30.0, "weight_decay": 1.2e-6, "batch_size": 80, "bptt": 70,
        "variable_bptt": True, "test_batch_size": 1, "epochs": 8000, "seed": 1111, "define_max_dim": 1024,
        "define_depth": 7, "define_max_groups": 8, "define_dropout": 0.1,
    },
    "transformer-xl": {
        "table_dim": 128, "d_model": 128, "n_layer": 4, "n_head": 4, "d_head": 32, "d_inner": 512,
        "dropout": 0.1, "dropatt": 0.0, "mem_len": 64, "eval_mem_len": 64, "clamp_len": 0, "tie": "width",
        "optimizer": "adam", "lr": 2.5e-4, "scheduler": "cosine", "bptt": 64, "batch_size": 16,
        "max_steps": 1500, "eval_every": 500,
    },
}  # fmt: skip
PRESETS: dict[str, dict[str, Any]] = {
    # Table 9 of the paper (LSTM LM on WikiText-103), dropout as in Merity et al. 2018a's WT-103 run;
    # DeFINE n = m = 256, k = 1024, N = 3 (Table 1a R3) with adaptive input as its Map (cutoffs
    # 20k/40k/200k, factor 4), the adaptive softmax tied to the band tables and projections: the
    # paper's 9.25M input/output parameters.
    "lstm_wt103": {
        "arch": "lstm", "table_dim": 256, "input_dim": 256, "hidden": 1024, "layers": 4, "tie": "width",
        "softmax": "adaptive", "cutoffs": [20000, 40000, 200000], "div_val": 4, "dropout": 0.1, "dropouth": 0.1,
        "dropouti": 0.1, "define_max_dim": 1024, "define_depth": 3, "define_max_groups": 4, "define_dropout": 0.1,
        "define_map": "adaptive",
        "optimizer": "sgd", "lr": 20.0, "weight_decay": 0.0, "bptt": 140, "batch_size": 60, "epochs": 20,
        "scheduler": "multistep", "lr_milestones": [15], "lr_gamma": 0.1, "max_steps": None, "eval_every": 0,
    },
    # AWD-LSTM's PTB command (batch 20, dropouti 0.4, dropouth 0.25, seed 141, 500 epochs) with
    # DeFINE n=128, k=1024, N=7, m=400 (define_paper.md §5.3).
    "awd_ptb": {
        "arch": "awd-lstm", "batch_size": 20, "dropouti": 0.4, "dropouth": 0.25, "seed": 141, "epochs": 500,
    },
    # Transformer-XL base on WikiText-103 with DeFINE N=3, k=4096, m=384 (Table 2: 16 layers,
    # 10 heads of 41, inner 1920); training and evaluation lengths of the base model's scripts.
    "txl_wt103": {
        "arch": "transformer-xl", "table_dim": 384, "d_model": 384, "n_layer": 16, "n_head": 10, "d_head": 41,
        "d_inner": 1920, "dropout": 0.1, "dropatt": 0.0, "bptt": 150, "mem_len": 150, "eval_bptt": 64,
        "eval_mem_len": 640, "clamp_len": 400, "cutoffs": [20000, 40000, 200000], "div_val": 1,
        "define_max_dim": 4096, "define_depth": 3, "define_max_groups": 4, "define_dropout": 0.1,
        "optimizer": "adam", "lr": 2.5e-4, "scheduler": "cosine", "max_steps": 200000, "batch_size": 60,
        "epochs": 1000, "eval_every": 4000,
    },
}  # fmt: skip
MODEL_KEYS = {
    "lstm": {"input_dim", "hidden", "layers", "tie", "dropout", "dropouth", "dropouti"},
    "awd-lstm": {"input_dim", "hidden", "layers", "tie", "dropout", "dropouth", "dropouti", "dropoute", "wdrop",
                 "alpha", "beta"},
    "transformer-xl": {"d_model", "n_layer", "n_head", "d_head", "d_inner", "dropout", "dropatt", "mem_len",
                       "eval_mem_len", "clamp_len", "tie"},
}  # fmt: skip
# Settings a resumed run may change: budgets, logging, evaluation, compilation, where things are, and
# the learning rate (the schedule rescaled, see Trainer) and clipping, the remedies for a non-finite loss.
RESUME_IGNORE = {
    "data", "cache_dir", "out", "epochs", "max_steps", "eval_every", "save_every", "log_every", "define_backend",
    "device", "progress", "eval_batch_size", "test_batch_size", "eval_bptt", "eval_mem_len", "max_eval_tokens",
    "compile", "lr", "clip",
}  # fmt: skip


# ----------------------------------------------------------------------------------- the task
class LMTask:
    """Language-model batches for the Trainer: this rank's block of B parallel streams cut into BPTT
    windows, the recurrent state (LSTM hidden / Transformer-XL memory) carried between windows."""

    def __init__(self, model: nn.Module, corpus: Corpus, cfg: dict[str, Any], dist: Dist) -> None:
        self.model, self.cfg, self.dist, self.corpus = model, cfg, dist, corpus
        train = corpus.train[: cfg["max_train_tokens"]] if cfg["max_train_tokens"] else corpus.train
        self.streams = shard_streams(batchify(train, cfg["batch_size"]), dist.rank, dist.world_size)  # [L, B/W]
        self.batcher = BpttBatcher(self.streams, cfg["bptt"], variable=cfg["variable_bptt"], seed=cfg["seed"])
        limit = cfg["max_eval_tokens"]
        self.eval_sets = {
            "valid": (corpus.valid[:limit] if limit else corpus.valid, cfg["eval_batch_size"]),
            "test": (corpus.test[:limit] if limit else corpus.test, cfg["test_batch_size"]),
        }
        for split, (ids, streams) in self.eval_sets.items():  # here, not after hours of training
            if ids.numel() // max(streams, 1) < 2:
                flag = "--eval-batch-size" if split == "valid" else "--test-batch-size"
                sliced = bool(limit) and limit < len(getattr(corpus, split))
                cut = f" (cut to --max-eval-tokens {limit})" if sliced else ""
                more = f"give --max-eval-tokens at least {2 * streams} or " if sliced else ""
                raise DataError(f"the {split} split's {ids.numel()} tokens{cut} are too few for {flag} {streams} "
                                f"(every stream needs at least 2 tokens): {more}use a smaller {flag}")  # fmt: skip
        self.epoch = -1
        self.state: Any = None

    def steps_per_epoch(self) -> int:
        return len(self.batcher)

    def train_batches(self, epoch: int):
        if epoch != self.epoch:  # a new epoch: from the start of the streams, with a fresh state
            self.epoch, self.state = epoch, None
            self.batcher.reset()
        device = self.dist.device
        for inputs, targets, seq_len in self.batcher:
            yield inputs.to(device), targets.to(device), seq_len

    def train_step(self, model: nn.Module, batch: tuple[Tensor, Tensor, int]) -> StepResult:
        inputs, targets, seq_len = batch
        if self.state is None:
            self.state = self.model.init_state(inputs.size(1), inputs.device)
        out = model(inputs, targets, self.state)
        self.state = detach_state(out.state)
        scale = seq_len / self.cfg["bptt"] if self.cfg["variable_bptt"] else 1.0  # AWD-LSTM: lr ∝ window length
        return StepResult(out.nll + out.penalty, targets.numel(), out.nll.detach(), scale)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        ids, batch_size = self.eval_sets[split]
        window = self.cfg["eval_bptt"] or self.cfg["bptt"]
        # Every rank takes every world_size-th stream: together they score exactly what one process would.
        streams = batchify(ids, batch_size)[:, self.dist.rank :: self.dist.world_size]  # [L, b]
        device = self.dist.device
        total = torch.zeros((), dtype=torch.float64, device=device)
        count = 0
        if streams.size(1):
            state = self.model.init_state(streams.size(1), device)
            for start in range(0, streams.size(0) - 1, window):
                n = min(window, streams.size(0) - 1 - start)
                inputs = streams[start : start + n].to(device)
                targets = streams[start + 1 : start + 1 + n].to(device)
                out = model(inputs, targets, state)
                state = out.state
                total += out.nll.double() * targets.numel()
                count += targets.numel()
        total_sum, count_sum = all_reduce_sum([total.item(), float(count)], self.dist)
        loss = total_sum / count_sum
        return {"loss": loss, "ppl": perplexity(loss)}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batcher": self.batcher.state_dict(), "state": self.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = state["epoch"]
        self.batcher.load_state_dict(state["batcher"])
        self.state = state_to(state["state"], self.dist.device)


# --------------------------------------------------------------------------- building blocks
def auto_cutoffs(vocab_size: int) -> list[int]:
    """Two cutoffs at about 6% and 30% of the vocabulary (e.g. WikiText-2: 1997, 9983); none for tiny ones."""
    if vocab_size < 100:
        return []
    return sorted({max(1, round(vocab_size * 0.06)), round(vocab_size * 0.3)})


def build_model(cfg: dict[str, Any], vocab_size: int) -> nn.Module:
    define = {
        "max_dim": cfg["define_max_dim"], "depth": cfg["define_depth"], "max_groups": cfg["define_max_groups"],
        # absent from checkpoints written before the option: the paper's widths
        "group_width_multiple": cfg.get("define_group_width_multiple", 1),
        "dropout": cfg["define_dropout"], "backend": cfg["define_backend"], "map": cfg["define_map"],
    }  # fmt: skip
    if cfg["define_map"] == "adaptive":  # absent: a checkpoint from before the bands were scaled by √width
        define["scale_embedding"] = cfg.get("define_band_scale", False)
    check_cutoffs(cfg["cutoffs"], vocab_size)
    arch = cfg["arch"]
    if arch in ("lstm", "awd-lstm"):
        fields = {k: cfg[k] for k in MODEL_KEYS[arch]}
        common = dict(
            vocab_size=vocab_size, embedding=cfg["embedding"], table_dim=cfg["table_dim"], softmax=cfg["softmax"],
            cutoffs=cfg["cutoffs"], div_val=cfg["div_val"], define=define,
        )  # fmt: skip
        common["softmax_bias"] = cfg.get("softmax_bias", False)  # absent: a checkpoint from before the bias
        if arch == "lstm":
            return LSTMLM(LSTMLMConfig(**common, **fields))
        return AWDLSTM(AWDLSTMConfig(**common, **fields))
    fields = {k: cfg[k] for k in MODEL_KEYS[arch] if k != "tie"}
    cutoffs = cfg["cutoffs"] if cfg["softmax"] == "adaptive" else []  # input and softmax share the bands
    return TransformerXL(
        TransformerXLConfig(
            vocab_size=vocab_size, embedding=cfg["embedding"], table_dim=cfg["table_dim"], cutoffs=cutoffs,
            div_val=cfg["div_val"], tgt_len=cfg["bptt"], tie=cfg["tie"] != "none", define=define, **fields,
        )
    )  # fmt: skip


class WarmupCosine:
    """LR factor: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total`` steps."""

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup, self.total = warmup, total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(cfg: dict[str, Any], model: nn.Module) -> tuple[torch.optim.Optimizer, Any, str]:
    name, lr, wd = cfg["optimizer"], cfg["lr"], cfg["weight_decay"]
    # absent: a checkpoint from before the transform had its own rate (one group at lr)
    params = optimizer_groups(model, lr, cfg.get("define_lr_scale", 1.0))
    if name == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, weight_decay=wd)
    elif name == "adam":
        optimizer = torch.optim.Adam(params, lr=lr, weight_decay=wd)
    elif name == "ntasgd":
        optimizer = NTASGD(params, lr=lr, weight_decay=wd, nonmono=cfg["nonmono"])
    else:
        raise ValueError(f"unknown optimizer {name!r}; choose sgd, adam or ntasgd")
    if cfg["scheduler"] == "none":
        return optimizer, None, "step"
    if cfg["scheduler"] == "multistep":
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, cfg["lr_milestones"], cfg["lr_gamma"])
        return optimizer, scheduler, "epoch"
    if cfg["scheduler"] == "cosine":
        if not cfg["lr_decay_steps"]:
            raise ValueError("the cosine schedule needs --lr-decay-steps or --max-steps (where the rate reaches 0)")
        schedule = WarmupCosine(cfg["warmup_steps"], cfg["lr_decay_steps"])
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule), "step"
    raise ValueError(f"unknown scheduler {cfg['scheduler']!r}; choose none, multistep or cosine")


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameters of the input layer, the context model and the output layer's own (untied) part."""
    parts = {"input": 0, "context": 0, "output": 0}
    for name, p in model.named_parameters():
        if name.startswith("embed."):
            parts["input"] += p.numel()
        else:
            parts["output" if name.startswith(("softmax.", "proj.")) else "context"] += p.numel()
    parts["total"] = sum(parts.values())
    return parts


# ------------------------------------------------------------------------------- configuration
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    S = argparse.SUPPRESS  # unset flags stay absent, so defaults and presets can fill them
    p.add_argument("--arch", choices=ARCHS, default=S)
    p.add_argument("--embedding", choices=EMBEDDINGS, default=S, help="input layer (default define)")
    p.add_argument("--data", default=S, help="corpus directory (train/valid/test .txt, wiki.*.tokens or ptb.*.txt)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=S, help="paper configuration: " + ", ".join(PRESETS))
    p.add_argument("--out", default=S, help="output directory (default runs/lm/<arch>-<embedding>-<time>)")
    p.add_argument("--cache-dir", default=S, help="where token ids are cached (default ~/.cache/define_ops)")
    p.add_argument("--resume", nargs="?", const="", default=None, help="continue from CHECKPOINT (default OUT/last.pt)")
    p.add_argument("--eval-only", metavar="CHECKPOINT", default=None,
                   help="report valid/test perplexity of the whole splits and exit (--max-eval-tokens N: of their "
                   "first N tokens; the limit the checkpoint trained with is not reused)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="start afresh in an --out that holds a checkpoint")
    p.add_argument("--dry-run", action="store_true", help="2 steps on a few windows, tiny evaluation (smoke test)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--device", default=S, help="cpu, cuda, cuda:1 (default: cuda if available)")
    g = p.add_argument_group("model")
    g.add_argument("--table-dim", type=int, default=S, help="n: lookup-table width, the tied output space")
    g.add_argument("--input-dim", type=int, default=S, help="m: input layer width (LSTM)")
    g.add_argument("--hidden", type=int, default=S, help="LSTM hidden size")
    g.add_argument("--layers", type=int, default=S, help="LSTM layers")
    g.add_argument(
        "--tie",
        choices=("width", "proj", "none"),
        default=S,
        help="tie the softmax to the n-dim table: last LSTM layer n wide, a projection, or not",
    )
    g.add_argument("--softmax", choices=("adaptive", "full"), default=S)
    g.add_argument("--cutoffs", type=int, nargs="*", default=S, help="adaptive cutoffs (default ~6%% and 30%% of V)")
    g.add_argument("--div-val", type=int, default=S, help="band width factor of adaptive input/softmax")
    for name in ("dropout", "dropouth", "dropouti", "dropoute", "wdrop", "alpha", "beta", "dropatt"):
        g.add_argument(f"--{name}", type=float, default=S)
    for name in ("d-model", "n-layer", "n-head", "d-head", "d-inner", "mem-len", "eval-mem-len", "clamp-len"):
        g.add_argument(f"--{name}", type=int, default=S, help="Transformer-XL")
    g.add_argument("--define-max-dim", type=int, default=S, help="k")
    g.add_argument("--define-depth", type=int, default=S, help="N")
    g.add_argument("--define-max-groups", type=int, default=S, help="g_max")
    g.add_argument("--define-group-width-multiple", type=int, default=S,
                   help="round DeFINE's layer widths so each group is a multiple of this many features (8: aligned "
                        "bf16 GEMMs on a GPU; 1: the paper's widths)")  # fmt: skip
    g.add_argument("--define-dropout", type=float, default=S)
    g.add_argument(
        "--define-map",
        choices=("table", "adaptive"),
        default=S,
        help="DeFINE's Map: one [V, n] table, or adaptive input over --cutoffs/--div-val bands",
    )
    g.add_argument("--define-backend", default=S, help="auto | reference | cpu | cuda | triton")
    g.add_argument("--define-lr-scale", type=float, default=S,
                   help="learning rate of the DeFINE transform (HGT layers and Reduce, not the Map) as a multiple "
                   f"of --lr (default {SGD_DEFINE_LR_SCALE} with sgd/ntasgd, 1 with adam)")  # fmt: skip
    t = p.add_argument_group("training")
    t.add_argument("--optimizer", choices=("sgd", "adam", "ntasgd"), default=S)
    t.add_argument("--lr", type=float, default=S)
    t.add_argument("--weight-decay", type=float, default=S)
    t.add_argument("--scheduler", choices=("none", "multistep", "cosine"), default=S)
    t.add_argument("--lr-milestones", type=int, nargs="*", default=S, help="epochs where multistep divides the lr")
    t.add_argument("--lr-gamma", type=float, default=S)
    t.add_argument("--warmup-steps", type=int, default=S)
    t.add_argument("--lr-decay-steps", type=int, default=S,
                   help="cosine: steps to reach 0 (default --max-steps), fixed for the run")  # fmt: skip
    t.add_argument("--nonmono", type=int, default=S, help="NT-ASGD patience in validations")
    t.add_argument("--batch-size", type=int, default=S, help="parallel streams, over all processes")
    t.add_argument("--eval-batch-size", type=int, default=S)
    t.add_argument("--test-batch-size", type=int, default=S)
    t.add_argument("--bptt", type=int, default=S, help="training window (Transformer-XL: tgt_len)")
    t.add_argument("--eval-bptt", type=int, default=S, help="evaluation window (default: --bptt)")
    t.add_argument("--variable-bptt", type=int, choices=(0, 1), default=S, help="AWD-LSTM's random window lengths")
    t.add_argument("--max-train-tokens", type=int, default=S, help="use only the first N training tokens")
    t.add_argument("--max-eval-tokens", type=int, default=S, help="use only the first N valid/test tokens")
    add_loop_arguments(t)
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Defaults < preset < flags; with ``base`` (a checkpoint's settings): base < flags."""
    given = {k: v for k, v in vars(args).items() if k not in CONTROL}
    if "variable_bptt" in given:
        given["variable_bptt"] = bool(given["variable_bptt"])
    if given.get("max_steps") == 0:
        given["max_steps"] = None
    if base is not None:
        cfg = {**base, **given}
        _check_schedule_horizon(base, cfg)
        return cfg
    preset = PRESETS[given["preset"]] if "preset" in given else {}
    arch = given.get("arch", preset.get("arch"))
    if arch is None:
        raise ValueError("say which model: --arch {lstm,awd-lstm,transformer-xl} (or a --preset)")
    if preset and preset["arch"] != arch:
        raise ValueError(f"--preset {given['preset']} is for --arch {preset['arch']}, not {arch}")
    allowed = set(COMMON) | MODEL_KEYS[arch] | {"arch", "data", "preset", "out", "cache_dir", "device"}
    stray = sorted(k for k in given if k not in allowed)
    if stray:
        flags = ", ".join("--" + k.replace("_", "-") for k in stray)
        raise ValueError(f"{flags} does not apply to --arch {arch}")
    cfg = {**COMMON, **ARCH_DEFAULTS[arch], **preset, **given, "arch": arch}
    cfg.setdefault("preset", None)
    # Recorded, so a checkpoint says which output layer it has (those written before had no bias).
    cfg["softmax_bias"] = arch == "awd-lstm"
    cfg["define_band_scale"] = True  # DeFINE's adaptive Map scales band b by √width_b (the authors' code)
    if cfg["define_lr_scale"] is None:
        cfg["define_lr_scale"] = SGD_DEFINE_LR_SCALE if cfg["optimizer"] in ("sgd", "ntasgd") else 1.0
    if not cfg["define_lr_scale"] >= 0:  # 0: the transform stays at its initialization
        raise ValueError(f"--define-lr-scale must be >= 0, got {cfg['define_lr_scale']}")
    if cfg["lr_decay_steps"] is None and cfg["scheduler"] == "cosine":
        cfg["lr_decay_steps"] = cfg["max_steps"]  # fixed now, so extending --max-steps on resume keeps the schedule
    if "data" not in cfg:
        raise ValueError("--data DIR is required (e.g. ../shared/data/wikitext-2)")
    return cfg


CONTROL = {"resume", "eval_only", "overwrite", "dry_run", "no_progress"}


def _check_schedule_horizon(base: dict[str, Any], cfg: dict[str, Any]) -> None:
    """The cosine schedule reaches lr 0 at the lr_decay_steps its run started with (the checkpoint
    holds it): a budget extended past that on resume would train on at lr 0, learning nothing."""
    end, budget = cfg["lr_decay_steps"], cfg["max_steps"]
    if cfg["scheduler"] != "cosine" or end is None or budget == base["max_steps"]:
        return  # (a changed --scheduler is refused by the configuration check)
    if budget is not None and budget <= end:
        return
    raise ValueError(
        f"--max-steps {budget or 0} goes past the end of this run's cosine schedule, which reaches lr 0 at step "
        f"{end} (its --lr-decay-steps, fixed when the run started): the steps after it would not learn. Resume "
        f"with --max-steps {end} at most, or start a new run whose --lr-decay-steps (default: --max-steps) covers "
        f"the whole budget"
    )


def _dry_run(cfg: dict[str, Any]) -> dict[str, Any]:
    cfg = dict(cfg, max_steps=2, epochs=1, eval_every=0, log_every=1)
    cfg["max_train_tokens"] = cfg["batch_size"] * cfg["bptt"] * 3 + cfg["batch_size"]
    cfg["max_eval_tokens"] = max(cfg["eval_batch_size"], cfg["test_batch_size"]) * (cfg["eval_bptt"] or cfg["bptt"]) * 2
    return cfg


# ------------------------------------------------------------------------------------ running
def load_corpus(cfg: dict[str, Any], dist: Dist) -> Corpus:
    # rank 0 builds the id cache first; the others then read it instead of tokenizing too
    corpus = Corpus.load(cfg["data"], cfg.get("cache_dir")) if dist.is_main else None
    if dist.active:
        torch_dist.barrier()
    return corpus or Corpus.load(cfg["data"], cfg.get("cache_dir"))


def build_trainer(cfg: dict[str, Any], dist: Dist, corpus: Corpus | None = None, *, progress: bool = True) -> Trainer:
    """Everything a run needs, from its resolved settings. Adds vocab_size/vocab_digest to ``cfg``."""
    if cfg["embedding"] == "define":
        check_define_backend(cfg["define_backend"], dist.device)
    corpus = corpus or load_corpus(cfg, dist)
    if cfg.get("vocab_digest") not in (None, corpus.vocab_digest()):
        raise CheckpointError(
            f"the corpus in {cfg['data']} has another vocabulary than the checkpoint's run "
            f"({corpus.vocab_size} words, digest {corpus.vocab_digest()}; checkpoint: {cfg.get('vocab_size')} words, "
            f"digest {cfg['vocab_digest']})"
        )
    cfg.update(vocab_size=corpus.vocab_size, vocab_digest=corpus.vocab_digest())
    adaptive = cfg["softmax"] == "adaptive", cfg["embedding"] == "adaptive"
    if cfg["cutoffs"] is None:
        cfg["cutoffs"] = auto_cutoffs(corpus.vocab_size) if any(adaptive) else []
    if cfg["div_val"] is None:  # Baevski & Auli's factor 4 where both sides are adaptive, else equal widths
        cfg["div_val"] = 4 if all(adaptive) else 1
    seed_everything(cfg["seed"])  # same initial weights on every rank
    model = build_model(cfg, corpus.vocab_size).to(dist.device)
    optimizer, scheduler, interval = build_optimizer(cfg, model)
    task = LMTask(model, corpus, cfg, dist)
    train_cfg = TrainConfig.from_settings(cfg, scheduler_interval=interval, progress=progress)
    return Trainer(model, optimizer, task, train_cfg, cfg, scheduler=scheduler, dist=dist, resume_ignore=RESUME_IGNORE)


def _eval_only(args: argparse.Namespace, dist: Dist) -> int:
    state = load_checkpoint(args.eval_only)
    cfg = dict(state["config"])
    # where and how it runs and what it is scored on; never what the checkpoint's model is
    overrides = ("data", "cache_dir", "device", "define_backend", "eval_batch_size", "test_batch_size", "eval_bptt")
    for key in overrides:
        if hasattr(args, key):
            cfg[key] = getattr(args, key)
    # the whole splits unless asked: a training run's quick-validation slice is not the checkpoint's score
    cfg["max_eval_tokens"] = getattr(args, "max_eval_tokens", None)
    cfg["out"] = getattr(args, "out", str(Path(args.eval_only).parent))
    trainer = build_trainer(cfg, dist, progress=False)
    trainer.load(args.eval_only, full=False, check_config=False)
    task: LMTask = trainer.task  # type: ignore[assignment]
    results, scope = {}, []
    for split in ("valid", "test"):
        ids, streams = task.eval_sets[split]
        whole = len(getattr(task.corpus, split))
        # batchify keeps streams x (n // streams) tokens; the first token of each stream is only an input
        scored = (ids.numel() // streams - 1) * streams
        results[split] = {**trainer.evaluate(split), "tokens": scored, "split_tokens": whole}
        sliced = f", a slice: the first {ids.numel()} of {whole} (--max-eval-tokens)" if ids.numel() < whole else ""
        scope.append(f"{split} ppl {results[split]['ppl']:.2f} ({scored} tokens scored{sliced})")
    if dist.is_main:
        print(json.dumps({"checkpoint": str(args.eval_only), "step": state["trainer"]["step"], **results}))
        print(" | ".join(scope))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_command(getattr(args, "device", None), lambda dist: _run(args, dist), USER_ERRORS)


USER_ERRORS = (DataError, CheckpointError, ValueError)


def _run(args: argparse.Namespace, dist: Dist) -> int:
    if args.eval_only:
        return _eval_only(args, dist)
    default_out = lambda cfg: str(Path("runs") / "lm" / f"{cfg['arch']}-{cfg['embedding']}-{run_stamp(dist)}")
    cfg, resume = resolve_run(args, resolve_config, default_out, RESUME_IGNORE)
    if args.dry_run:
        cfg = _dry_run(cfg)
    cfg.setdefault("cache_dir", None)
    trainer = build_trainer(cfg, dist, progress=not args.no_progress)
    if dist.is_main:
        params = count_parameters(trainer.model)
        print(f"{cfg['arch']} + {cfg['embedding']} | vocab {cfg['vocab_size']} | parameters "
              + ", ".join(f"{k} {v:,}" for k, v in params.items()) + f" | {dist.world_size} process(es) on "
              + f"{dist.device} | out {cfg['out']}", flush=True)  # fmt: skip
    result = trainer.fit(resume=resume)
    if result.status == "interrupted":
        return 128 + (result.signal or 0)
    if dist.is_main and result.test is not None:
        best_ppl = perplexity(result.best["value"]) if result.best["value"] is not None else math.nan
        summary = {"arch": cfg["arch"], "embedding": cfg["embedding"], "steps": result.step,
                   "best_step": result.best["step"], "valid_ppl": best_ppl, "test_ppl": result.test["ppl"],
                   "tokens_per_s": result.tokens_per_s, "parameters": count_parameters(trainer.model),
                   "world_size": dist.world_size, "device": str(dist.device)}  # fmt: skip
        (Path(cfg["out"]) / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(f"valid ppl {best_ppl:.2f} | test ppl {result.test['ppl']:.2f} | "
              f"train {result.tokens_per_s:,.0f} tokens/s | checkpoints in {cfg['out']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
