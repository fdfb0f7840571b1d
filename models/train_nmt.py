"""Train a Transformer translation model with DeFINE or standard input layers.

    python -m models.train_nmt --data ../shared/data/multi30k --src en --tgt de               # base + DeFINE
    python -m models.train_nmt --data DIR --src en --tgt de --embedding standard              # nn.Embedding(V, 512)
    python -m models.train_nmt --data DIR --src en --tgt de --preset small --max-steps 300    # CPU-sized
    python -m models.train_nmt --resume runs/nmt/x/last.pt [--max-steps N]                    # continue exactly
    torchrun --nproc_per_node 2 -m models.train_nmt ...                                       # DDP (gloo on CPU)
    python -m models.translate runs/nmt/x/best.pt < test.en > hyp.de                          # decode

The training loop is models.trainer's (progress bar with tokens/s, atomic data-only checkpoints,
exact resume, SIGINT/SIGTERM, NaN stop, bf16 autocast, DDP); this file adds the data, the model and
the loss. A joint BPE model (sentencepiece) is trained on the training split at the start and saved
in the run directory (``spm.model``, ``vocab.json``) next to the checkpoints; translation reuses it.
Validation reports loss, perplexity and BLEU (sacrebleu, decoded with ``--eval-beam``); the best
checkpoint is chosen by ``--metric``. At the end the best weights translate the test split:
``test.hyp.<tgt>`` and ``test.bleu.json`` (score and sacrebleu signature) land in the run directory.

Settings resolve as: the ``base`` preset (the defaults) < ``--preset`` < flags given; on ``--resume``:
the checkpoint's settings < flags given. Exit status: 0 done, 1 non-finite loss, 2 bad
data/settings/checkpoint, 128 + signal number after SIGINT/SIGTERM (checkpoint saved).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

from .common import check_define_backend, optimizer_groups
from .data import DataError
from .nmt import INPUTS, OUTPUT_LAYERS, NMTConfig, Transformer, count_parameters
from .nmt_data import (
    PAD,
    Subwords,
    TokenBatcher,
    collate_source,
    collate_target,
    eval_batches,
    find_parallel_files,
    read_parallel,
)
from .trainer import (
    CheckpointError,
    Dist,
    StepResult,
    TrainConfig,
    Trainer,
    add_loop_arguments,
    all_reduce_sum,
    perplexity,
    resolve_run,
    run_command,
    run_stamp,
    seed_everything,
)
from .translate import corpus_bleu, translate_ids, truncate_sources

# Transformer base (Vaswani et al. 2017) with OpenNMT-py's recommended training settings, which the
# paper used (define_paper.md §5.4), and DeFINE n=128, k=1024, N=3, m=512 with the library's
# nmt_wmt14 preset (4 groups at most, dropout 0.1). OpenNMT-py's noam schedule (learning_rate 2,
# warm-up 8000, d=512) peaks at 2·512^-½·8000^-½; its 4096-token batches with accum_count 2 are one
# 8192-token batch here. The BPE size is ours (the paper does not state it): 8000 joint pieces.
BASE: dict[str, Any] = {
    "embedding": "define", "src_embedding": None, "tgt_embedding": None, "shared_vocab": True,
    "share_embeddings": True, "output_layer": "tied", "bpe_vocab_size": 8000, "table_dim": 128, "define_max_dim": 1024,
    "define_depth": 3, "define_max_groups": 4, "define_dropout": 0.1, "define_backend": "auto", "define_dedup": False,
    "define_group_width_multiple": 1,
    "define_lr_scale": 1.0, "d_model": 512, "n_heads": 8, "ffn_dim": 2048, "encoder_layers": 6, "decoder_layers": 6,
    "dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.1, "norm_first": True, "max_positions": 1024,
    "label_smoothing": 0.1, "lr": 2 * 512**-0.5 * 8000**-0.5, "warmup_steps": 8000, "adam_betas": [0.9, 0.998],
    "adam_eps": 1e-9, "weight_decay": 0.0, "clip": 0.0, "max_tokens": 8192, "accum_steps": 1, "max_len": 256,
    "epochs": 10_000, "max_steps": 200_000, "eval_every": 10_000, "save_every": 0, "log_every": 100, "seed": 1,
    "precision": "auto", "compile": "off",
    "eval_max_tokens": 8192, "eval_beam": 4, "lenpen": 0.6, "max_len_a": 1.0, "max_len_b": 50,
    "eval_bleu_lines": None, "metric": "bleu", "max_train_pairs": None, "max_eval_lines": None,
}  # fmt: skip
PRESETS: dict[str, dict[str, Any]] = {
    "base": {},
    # Minutes on a CPU: 2+2 layers of width 64, a 32-wide table expanded to 128, 1000 BPE pieces.
    "small": {
        "bpe_vocab_size": 1000, "table_dim": 32, "define_max_dim": 128, "define_depth": 2, "define_max_groups": 2,
        "d_model": 64, "n_heads": 4, "ffn_dim": 256, "encoder_layers": 2, "decoder_layers": 2, "max_positions": 256,
        "lr": 3e-3, "warmup_steps": 100, "adam_betas": [0.9, 0.98], "max_tokens": 2048, "max_len": 128,
        "max_steps": 1000, "eval_every": 250, "log_every": 25, "eval_max_tokens": 4096, "eval_beam": 1,
    },
}  # fmt: skip
# Settings a resumed run may change: budgets, logging, evaluation, compilation, where things are, and
# the learning rate (the schedule rescaled, see Trainer) and clipping, the remedies for a non-finite loss.
RESUME_IGNORE = {
    "data", "out", "epochs", "max_steps", "eval_every", "save_every", "log_every", "define_backend", "device",
    "eval_max_tokens", "eval_beam", "lenpen", "max_len_a", "max_len_b", "eval_bleu_lines", "max_eval_lines",
    "compile", "lr", "clip",
}  # fmt: skip
CONTROL = {"resume", "overwrite", "dry_run", "no_progress"}


# ----------------------------------------------------------------------------------- the task
class NMTTask:
    """Sentence-pair batches of about ``max_tokens`` padded tokens for the Trainer; label-smoothed
    cross-entropy; validation loss and BLEU. Its state is the epoch and the position in that epoch's
    batch list (rebuilt identically from the seed), so a resumed run sees the same batches."""

    def __init__(self, bpe: Subwords, corpus: dict[str, tuple[list[str], list[str]]], cfg: dict[str, Any],
                 dist: Dist, files: dict[str, tuple[Path, Path]] | None = None) -> None:  # fmt: skip
        self.bpe, self.cfg, self.dist = bpe, cfg, dist
        src, tgt = corpus["train"]
        src_ids, tgt_ids = bpe.encode(src, "src"), bpe.encode(tgt, "tgt")
        limit = cfg["max_len"] - 1  # room for eos / bos
        keep = [i for i, (s, t) in enumerate(zip(src_ids, tgt_ids, strict=True)) if 0 < len(s) <= limit
                and 0 < len(t) <= limit]  # fmt: skip
        self.dropped = len(src_ids) - len(keep)
        self.src, self.tgt = [src_ids[i] for i in keep], [tgt_ids[i] for i in keep]
        self.batcher = TokenBatcher([len(s) + 1 for s in self.src], [len(t) + 1 for t in self.tgt],
                                    max_tokens=cfg["max_tokens"], seed=cfg["seed"], rank=dist.rank,
                                    world_size=dist.world_size)  # fmt: skip
        self.eval_sets = {}
        for split in ("valid", "test"):
            s, t = corpus[split]
            where = " / ".join(map(str, files[split])) if files else split
            self.eval_sets[split] = self._eval_set(bpe.encode(s, "src"), bpe.encode(t, "tgt"), t, where)
        self.epoch, self.pos = -1, 0
        self.last_hypotheses: dict[str, list[str]] = {}

    def _eval_set(self, src: list[list[int]], tgt: list[list[int]], references: list[str],
                  where: str) -> tuple[list[list[int]], list[list[int]], list[str], list[int]]:  # fmt: skip
        """(sources for decoding, targets, references, indices of the pairs the loss scores). A pair
        longer than the model's positions (eos/bos included) cannot be scored: it is left out of
        the loss; its source is cut to fit for decoding, so BLEU still covers every line."""
        positions = self.cfg["max_positions"]
        decode_src, cut = truncate_sources(src, positions)
        too_long = set(cut) | {i for i, ids in enumerate(tgt) if len(ids) + 1 > positions}
        long, scored = sorted(too_long), [i for i in range(len(src)) if i not in too_long]
        if not scored:
            raise DataError(f"{where}: every pair is longer than --max-positions {positions} allows")
        if long and self.dist.is_main:
            named = ", ".join(str(i + 1) for i in long[:10]) + (f" and {len(long) - 10} more" if len(long) > 10 else "")
            print(f"warning: {where}: line(s) {named} hold more pieces than --max-positions {positions} (eos "
                  f"included): left out of the loss; sources cut to their first {positions - 1} pieces for BLEU",
                  file=sys.stderr, flush=True)  # fmt: skip
        return decode_src, tgt, references, scored

    def steps_per_epoch(self) -> int:
        return len(self.batcher.batches(max(self.epoch, 0)))

    def train_batches(self, epoch: int):
        if epoch != self.epoch:
            self.epoch, self.pos = epoch, 0
        batches = self.batcher.batches(epoch)
        while self.pos < len(batches):
            indices = batches[self.pos]
            self.pos += 1  # advanced before yielding: a checkpoint taken now resumes after this batch
            yield self._collate(self.src, self.tgt, indices)

    def _collate(self, src: list[list[int]], tgt: list[list[int]], indices: list[int]) -> tuple[Tensor, ...]:
        device = self.dist.device
        source = collate_source([src[i] for i in indices])
        tgt_in, tgt_out = collate_target([tgt[i] for i in indices])
        return source.to(device), tgt_in.to(device), tgt_out.to(device), int((tgt_out != PAD).sum())

    def losses(self, model: nn.Module, src: Tensor, tgt_in: Tensor, tgt_out: Tensor) -> tuple[Tensor, Tensor]:
        return smoothed_losses(model, src, tgt_in, tgt_out, self.cfg["label_smoothing"])

    def train_step(self, model: nn.Module, batch: tuple[Tensor, Tensor, Tensor, int]) -> StepResult:
        src, tgt_in, tgt_out, tokens = batch
        loss, nll = self.losses(model, src, tgt_in, tgt_out)
        return StepResult(loss / tokens, tokens, nll.detach() / tokens)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        cfg, dist = self.cfg, self.dist
        src, tgt, references, scored = self.eval_sets[split]
        total = torch.zeros((), dtype=torch.float64, device=dist.device)
        count = 0
        lengths = [len(src[i]) + 1 for i in scored]
        for batch in eval_batches(lengths, cfg["eval_max_tokens"], dist.rank, dist.world_size):
            source, tgt_in, tgt_out, tokens = self._collate(src, tgt, [scored[j] for j in batch])
            total += self.losses(model, source, tgt_in, tgt_out)[1].double()
            count += tokens
        total_sum, count_sum = all_reduce_sum([total.item(), float(count)], dist)
        metrics = {"loss": total_sum / count_sum, "ppl": perplexity(total_sum / count_sum)}
        lines = len(src) if cfg["eval_bleu_lines"] is None else min(cfg["eval_bleu_lines"], len(src))
        if lines:
            out = translate_ids(model, src[:lines], beam=cfg["eval_beam"], lenpen=cfg["lenpen"],
                                max_len_a=cfg["max_len_a"], max_len_b=cfg["max_len_b"],
                                max_tokens=cfg["eval_max_tokens"], rank=dist.rank,
                                world_size=dist.world_size)  # fmt: skip
            if dist.active:
                parts: list[Any] = [None] * dist.world_size
                torch_dist.all_gather_object(parts, out)
                out = {i: ids for part in parts for i, ids in part.items()}
            hypotheses = [self.bpe.decode(out[i]) for i in range(lines)]
            metrics["bleu"] = float(corpus_bleu(hypotheses, references[:lines])["score"])
            self.last_hypotheses[split] = hypotheses
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


# --------------------------------------------------------------------------- building blocks
def build_model(cfg: dict[str, Any]) -> Transformer:
    define = {
        "max_dim": cfg["define_max_dim"], "depth": cfg["define_depth"], "max_groups": cfg["define_max_groups"],
        # absent from checkpoints written before the option: the paper's widths
        "group_width_multiple": cfg.get("define_group_width_multiple", 1),
        "dropout": cfg["define_dropout"], "backend": cfg["define_backend"], "dedup": cfg["define_dedup"],
    }  # fmt: skip
    fields = ("table_dim", "d_model", "n_heads", "ffn_dim", "encoder_layers", "decoder_layers", "dropout",
              "attention_dropout", "activation_dropout", "norm_first", "max_positions", "share_embeddings")  # fmt: skip
    output_layer = cfg.get("output_layer", "tied")  # checkpoints from before the option: tied
    return Transformer(
        NMTConfig(
            src_vocab_size=cfg["src_vocab_size"],
            tgt_vocab_size=cfg["tgt_vocab_size"],
            src_embedding=cfg["src_embedding"],
            tgt_embedding=cfg["tgt_embedding"],
            pad_id=PAD,
            define=define,
            output_layer=output_layer,
            **{k: cfg[k] for k in fields},
        )  # fmt: skip
    )


def smoothed_losses(
    model: nn.Module, src: Tensor, tgt_in: Tensor, tgt_out: Tensor, label_smoothing: float
) -> tuple[Tensor, Tensor]:
    """(label-smoothed loss, NLL), both summed over the target tokens. The smoothed target puts
    1 - ε on the reference and ε spread evenly over the vocabulary. src [B, S], tgt_in/out [B, T]."""
    lprobs = model(src, tgt_in).float().log_softmax(-1)  # [B, T, V]
    real = (tgt_out != PAD).to(lprobs.dtype)
    nll = -lprobs.gather(-1, tgt_out[..., None]).squeeze(-1)  # [B, T]
    eps = label_smoothing
    smoothed = (1 - eps) * nll - eps * lprobs.mean(-1) if eps else nll
    return (smoothed * real).sum(), (nll * real).sum()


class InverseSqrt:
    """LR factor: linear warm-up to 1 over ``warmup`` steps, then ∝ 1/√step (the noam schedule)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = max(1, warmup)

    def __call__(self, step: int) -> float:
        step += 1
        return min(step / self.warmup, math.sqrt(self.warmup / step))


def build_optimizer(cfg: dict[str, Any], model: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    # absent from a checkpoint's settings from before the option: one group, as it was then
    groups = optimizer_groups(model, cfg["lr"], cfg.get("define_lr_scale", 1.0))
    optimizer = torch.optim.Adam(groups, lr=cfg["lr"], betas=tuple(cfg["adam_betas"]),
                                 eps=cfg["adam_eps"], weight_decay=cfg["weight_decay"])  # fmt: skip
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, InverseSqrt(cfg["warmup_steps"]))


def load_corpus(cfg: dict[str, Any]) -> tuple[dict[str, tuple[list[str], list[str]]], dict[str, tuple[Path, Path]]]:
    """({split: (source lines, target lines)}, {split: (source file, target file)})."""
    files = find_parallel_files(cfg["data"], cfg["src"], cfg["tgt"])
    corpus = {split: read_parallel(*paths) for split, paths in files.items()}
    if cfg["max_train_pairs"]:
        corpus["train"] = tuple(side[: cfg["max_train_pairs"]] for side in corpus["train"])
    if cfg["max_eval_lines"]:
        for split in ("valid", "test"):
            corpus[split] = tuple(side[: cfg["max_eval_lines"]] for side in corpus[split])
    return corpus, files


def prepare_bpe(cfg: dict[str, Any], corpus: dict, dist: Dist, source_dir: str | None) -> Subwords:
    """A fresh run (``source_dir`` None) trains the BPE model on rank 0 and saves it in the run
    directory; a resumed one reads it from ``source_dir`` (the checkpoint's directory) and checks it
    is the one the checkpoint was trained with. Adds the vocabulary sizes and digest to ``cfg``."""
    out = Path(cfg["out"])
    if dist.is_main:
        if source_dir is None:
            src, tgt = corpus["train"]
            bpe = Subwords.train(src, tgt, vocab_size=cfg["bpe_vocab_size"], shared=cfg["shared_vocab"],
                                 num_threads=min(8, os.cpu_count() or 1))  # fmt: skip
        else:
            bpe = Subwords.load(source_dir)
        if source_dir is None or Path(source_dir).resolve() != out.resolve():
            bpe.save(out)
    if dist.active:
        torch_dist.barrier()
    bpe = Subwords.load(out)
    if cfg.get("bpe_digest") not in (None, bpe.digest()):
        raise CheckpointError(f"the BPE model in {out} (digest {bpe.digest()}) is not the one the checkpoint was "
                              f"trained with ({cfg['bpe_digest']})")  # fmt: skip
    cfg.update(bpe_digest=bpe.digest(), src_vocab_size=bpe.vocab_size("src"), tgt_vocab_size=bpe.vocab_size("tgt"))
    return bpe


def build_trainer(cfg: dict[str, Any], dist: Dist, *, resume_dir: str | None = None,
                  progress: bool = True) -> Trainer:  # fmt: skip
    """Everything a run needs, from its resolved settings."""
    if "define" in (cfg["src_embedding"], cfg["tgt_embedding"]):
        check_define_backend(cfg["define_backend"], dist.device)
    corpus, files = load_corpus(cfg)
    bpe = prepare_bpe(cfg, corpus, dist, resume_dir)
    task = NMTTask(bpe, corpus, cfg, dist, files)
    seed_everything(cfg["seed"])  # same initial weights on every rank
    model = build_model(cfg).to(dist.device)
    optimizer, scheduler = build_optimizer(cfg, model)
    mode = "max" if cfg["metric"] == "bleu" else "min"
    train_cfg = TrainConfig.from_settings(cfg, metric=cfg["metric"], mode=mode, progress=progress)
    return Trainer(model, optimizer, task, train_cfg, cfg, scheduler=scheduler, dist=dist, resume_ignore=RESUME_IGNORE)


# ------------------------------------------------------------------------------- configuration
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    S = argparse.SUPPRESS  # unset flags stay absent, so defaults and presets can fill them
    p.add_argument("--data", default=S, help="directory of {train,val,test}.{SRC,TGT}")
    p.add_argument("--src", default=S, help="source language suffix (e.g. en)")
    p.add_argument("--tgt", default=S, help="target language suffix (e.g. de)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=S, help="base (the defaults) or small (CPU)")
    p.add_argument("--out", default=S, help="run directory (default runs/nmt/<src>-<tgt>-<embedding>-<time>)")
    p.add_argument("--resume", nargs="?", const="", default=None, help="continue from CHECKPOINT (default OUT/last.pt)")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an --out that holds a checkpoint")
    p.add_argument("--dry-run", action="store_true", help="2 steps on 200 pairs, 20-line evaluation (smoke test)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--device", default=S, help="cpu, cuda, cuda:1 (default: cuda if available)")
    g = p.add_argument_group("data and model")
    g.add_argument("--bpe-vocab-size", type=int, default=S, help="joint BPE pieces (a soft limit)")
    g.add_argument("--shared-vocab", type=int, choices=(0, 1), default=S, help="one vocabulary for both sides")
    g.add_argument(
        "--share-embeddings",
        type=int,
        choices=(0, 1),
        default=S,
        help="one input layer for source, target and output (needs --shared-vocab 1)",
    )
    g.add_argument("--embedding", choices=INPUTS, default=S, help="input layer of both sides (default define)")
    g.add_argument("--src-embedding", choices=INPUTS, default=S)
    g.add_argument("--tgt-embedding", choices=INPUTS, default=S)
    g.add_argument("--table-dim", type=int, default=S, help="n: DeFINE's table width, the tied output space")
    g.add_argument("--output-layer", choices=OUTPUT_LAYERS, default=S,
                   help="tied: scores against the target's table (through m -> n for DeFINE); untied: a [V, m] "
                        "matrix of its own")  # fmt: skip
    g.add_argument("--define-max-dim", type=int, default=S, help="k")
    g.add_argument("--define-depth", type=int, default=S, help="N")
    g.add_argument("--define-max-groups", type=int, default=S)
    g.add_argument("--define-group-width-multiple", type=int, default=S,
                   help="round DeFINE's layer widths so each group is a multiple of this many features (8: aligned "
                        "bf16 GEMMs on a GPU; 1: the paper's widths)")  # fmt: skip
    g.add_argument("--define-dropout", type=float, default=S)
    g.add_argument("--define-backend", default=S, help="auto | reference | cpu | cuda | triton")
    g.add_argument("--define-dedup", type=int, choices=(0, 1), default=S, help="DeFINE once per distinct token")
    g.add_argument(
        "--define-lr-scale",
        type=float,
        default=S,
        help="learning rate of the DeFINE transform (HGT layers, Reduce) as a multiple of --lr (default 1)",
    )
    for name in ("d-model", "n-heads", "ffn-dim", "encoder-layers", "decoder-layers", "max-positions", "max-len"):
        g.add_argument(f"--{name}", type=int, default=S)
    for name in ("dropout", "attention-dropout", "activation-dropout", "label-smoothing"):
        g.add_argument(f"--{name}", type=float, default=S)
    g.add_argument("--norm-first", type=int, choices=(0, 1), default=S, help="pre-norm blocks (1) or post-norm (0)")
    t = p.add_argument_group("training")
    t.add_argument("--lr", type=float, default=S, help="peak learning rate (reached after the warm-up)")
    t.add_argument("--warmup-steps", type=int, default=S)
    t.add_argument("--adam-betas", type=float, nargs=2, default=S)
    t.add_argument("--adam-eps", type=float, default=S)
    t.add_argument("--weight-decay", type=float, default=S)
    t.add_argument("--max-tokens", type=int, default=S, help="padded tokens per batch and process")
    t.add_argument("--max-train-pairs", type=int, default=S, help="use only the first N training pairs")
    add_loop_arguments(t)
    e = p.add_argument_group("evaluation")
    e.add_argument("--metric", choices=("bleu", "loss"), default=S, help="validation metric that picks best.pt")
    e.add_argument("--eval-beam", type=int, default=S, help="beam size of validation/test decoding (1: greedy)")
    e.add_argument("--lenpen", type=float, default=S)
    e.add_argument("--max-len-a", type=float, default=S)
    e.add_argument("--max-len-b", type=int, default=S)
    e.add_argument("--eval-max-tokens", type=int, default=S)
    e.add_argument("--eval-bleu-lines", type=int, default=S, help="decode only the first N lines for BLEU (0: none)")
    e.add_argument("--max-eval-lines", type=int, default=S, help="use only the first N valid/test pairs")
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The base preset < --preset < flags; with ``base`` (a checkpoint's settings): base < flags."""
    given = {k: v for k, v in vars(args).items() if k not in CONTROL}
    for key in ("shared_vocab", "share_embeddings", "define_dedup", "norm_first"):
        if key in given:
            given[key] = bool(given[key])
    if "adam_betas" in given:
        given["adam_betas"] = list(given["adam_betas"])
    if given.get("max_steps") == 0:
        given["max_steps"] = None
    if base is not None:
        for fixed in ("src", "tgt", "preset"):
            if fixed in given and given[fixed] != base.get(fixed):
                raise ValueError(f"--{fixed} cannot change on --resume (the checkpoint has {base.get(fixed)!r})")
        return {**base, **given}
    cfg = {**BASE, **PRESETS[given.get("preset", "base")], **given}
    cfg.setdefault("preset", "base")
    for side in ("src_embedding", "tgt_embedding"):
        cfg[side] = cfg[side] or cfg["embedding"]
    missing = [f"--{k}" for k in ("data", "src", "tgt") if k not in cfg]
    if missing:
        raise ValueError(f"{', '.join(missing)} required (e.g. --data ../shared/data/multi30k --src en --tgt de)")
    if cfg["share_embeddings"] and not cfg["shared_vocab"]:
        raise ValueError("--share-embeddings 1 needs --shared-vocab 1 (one vocabulary for both sides)")
    if cfg["share_embeddings"] and cfg["src_embedding"] != cfg["tgt_embedding"]:
        raise ValueError("--share-embeddings 1 needs the same embedding on both sides (or --share-embeddings 0)")
    if cfg["metric"] == "bleu" and cfg["eval_bleu_lines"] == 0:
        raise ValueError("--metric bleu needs BLEU at validation: drop --eval-bleu-lines 0 or use --metric loss")
    if not cfg["define_lr_scale"] >= 0:  # 0: the transform stays at its initialization
        raise ValueError(f"--define-lr-scale must be >= 0, got {cfg['define_lr_scale']}")
    return cfg


def _dry_run(cfg: dict[str, Any]) -> dict[str, Any]:
    return dict(cfg, max_steps=2, epochs=2, eval_every=0, log_every=1, max_train_pairs=200, max_eval_lines=20)


def _write_test_outputs(trainer: Trainer, cfg: dict[str, Any]) -> dict[str, Any] | None:
    """test.hyp.<tgt> and test.bleu.json (score and sacrebleu signature) in the run directory."""
    task: NMTTask = trainer.task  # type: ignore[assignment]
    hypotheses = task.last_hypotheses.get("test")
    if hypotheses is None or not trainer.dist.is_main:
        return None
    out = Path(cfg["out"])
    (out / f"test.hyp.{cfg['tgt']}").write_text("".join(f"{h}\n" for h in hypotheses), encoding="utf-8")
    report = corpus_bleu(hypotheses, task.eval_sets["test"][2][: len(hypotheses)])
    report.update(beam=cfg["eval_beam"], lenpen=cfg["lenpen"], lines=len(hypotheses))
    (out / "test.bleu.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return report


# ------------------------------------------------------------------------------------ running
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_command(getattr(args, "device", None), lambda dist: _run(args, dist), USER_ERRORS)


USER_ERRORS = (DataError, CheckpointError, ValueError)


def _run(args: argparse.Namespace, dist: Dist) -> int:
    def default_out(cfg: dict[str, Any]) -> str:
        name = f"{cfg['src']}-{cfg['tgt']}-{cfg['src_embedding']}-{cfg['tgt_embedding']}-{run_stamp(dist)}"
        return str(Path("runs") / "nmt" / name)

    cfg, resume = resolve_run(args, resolve_config, default_out, RESUME_IGNORE)
    resume_dir = str(Path(resume).parent) if resume is not None else None
    if args.dry_run:
        cfg = _dry_run(cfg)
    trainer = build_trainer(cfg, dist, resume_dir=resume_dir, progress=not args.no_progress)
    if dist.is_main:
        task: NMTTask = trainer.task  # type: ignore[assignment]
        params = count_parameters(trainer.model)  # type: ignore[arg-type]
        print(f"{cfg['src']}→{cfg['tgt']} | {cfg['src_embedding']}/{cfg['tgt_embedding']} inputs | vocab "
              f"{cfg['src_vocab_size']}/{cfg['tgt_vocab_size']} | {len(task.src)} training pairs "
              f"({task.dropped} dropped: empty or over {cfg['max_len']} tokens) | parameters "
              + ", ".join(f"{k} {v:,}" for k, v in params.items()) + f" | {dist.world_size} process(es) on "
              + f"{dist.device} | out {cfg['out']}", flush=True)  # fmt: skip
    result = trainer.fit(resume=resume)
    if result.status == "interrupted":
        return 128 + (result.signal or 0)
    report = _write_test_outputs(trainer, cfg)
    if dist.is_main and result.test is not None:
        valid = result.valid or {}
        bleu = f" | test BLEU {report['score']:.2f} ({report['signature']})" if report else ""
        best = result.best["value"] if result.best["value"] is not None else math.nan
        print(f"best valid {cfg['metric']} {best:.4g} (step {result.best['step']}) | "
              f"valid loss {valid.get('loss', float('nan')):.3f} | test loss {result.test['loss']:.3f}{bleu} | "
              f"train {result.tokens_per_s:,.0f} tokens/s | checkpoints in {cfg['out']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
