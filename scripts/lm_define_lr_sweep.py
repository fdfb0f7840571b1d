"""How fast may SGD move the DeFINE transform? A small LSTM LM on WikiText-2 trained with plain SGD
(lr 20, global clip 0.25, as Merity et al.'s LSTM recipes) where the DeFINE transform's parameters
(HGT layers and Reduce; ``DeFINE.transform_parameters()``) get their own rate, against a standard
table. The measurement behind ``--define-lr-scale`` (README, Models); CPU-sized.

    python scripts/lm_define_lr_sweep.py --transform-lr 20 1 0.1 0 --standard --steps 600

Prints, per run, the mean training loss of each 50 steps and the validation perplexity (eval mode,
the first --eval-tokens tokens of the valid split)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.common import optimizer_groups  # noqa: E402
from models.data import Corpus  # noqa: E402
from models.lstm_lm import LSTMLM, LSTMLMConfig  # noqa: E402
from models.train_lm import auto_cutoffs  # noqa: E402


def build(vocab_size: int, embedding: str, args: argparse.Namespace) -> LSTMLM:
    define = {"max_dim": args.k, "depth": 3, "max_groups": 4, "dropout": 0.1, "validate_ids": False}
    config = LSTMLMConfig(vocab_size, embedding, table_dim=args.n, input_dim=args.m, hidden=args.hidden, layers=2,
                          cutoffs=auto_cutoffs(vocab_size), tie="proj", softmax="adaptive", dropout=0.25,
                          dropouth=0.25, dropouti=0.25, define=define)  # fmt: skip
    return LSTMLM(config)


@torch.no_grad()
def valid_ppl(model: LSTMLM, tokens: torch.Tensor, streams: int = 10, window: int = 70) -> float:
    model.eval()
    data = tokens[: tokens.numel() // streams * streams].view(streams, -1).t()  # [T, streams]
    state, total, count = model.init_state(streams), 0.0, 0
    for i in range(0, data.size(0) - 1, window):
        target = data[i + 1 : i + 1 + window]
        out = model(data[i : i + target.size(0)], target, state)
        state, total, count = out.state, total + out.nll.item() * target.numel(), count + target.numel()
    return math.exp(total / count)


def run(corpus: Corpus, embedding: str, transform_lr: float | None, args: argparse.Namespace) -> str:
    torch.manual_seed(args.seed)
    model = build(corpus.vocab_size, embedding, args)
    scale = 1.0 if transform_lr is None else transform_lr / args.lr
    optimizer = torch.optim.SGD(optimizer_groups(model, args.lr, scale), lr=args.lr)
    streams = corpus.train[: corpus.train.numel() // args.batch * args.batch].view(args.batch, -1).t()  # [T, B]
    state, losses = model.init_state(args.batch), []
    model.train()
    for step in range(args.steps):
        start = (step * args.bptt) % (streams.size(0) - args.bptt - 1)
        state = [(h.detach(), c.detach()) for h, c in state]
        out = model(streams[start : start + args.bptt], streams[start + 1 : start + 1 + args.bptt], state)
        state = out.state
        optimizer.zero_grad(set_to_none=True)
        out.nll.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        losses.append(out.nll.item())
    curve = " ".join(f"{sum(losses[i : i + 50]) / len(losses[i : i + 50]):.2f}" for i in range(0, len(losses), 50))
    name = "standard" if embedding == "standard" else f"define, transform lr {transform_lr:g}"
    ppl = valid_ppl(model, corpus.valid[: args.eval_tokens])
    return f"{name:28s} | train loss per 50 steps {curve} | valid ppl {ppl:.0f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = Path(os.environ.get("DEFINE_OPS_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--data", default=str(data / "wikitext-2"))
    p.add_argument("--transform-lr", type=float, nargs="*", default=[20.0, 1.0, 0.1, 0.0])
    p.add_argument("--standard", action="store_true", help="also the standard n-wide table")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=20.0)
    p.add_argument("--clip", type=float, default=0.25)
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--bptt", type=int, default=35)
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--k", type=int, default=512)
    p.add_argument("--m", type=int, default=256)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=1111)
    args = p.parse_args()
    torch.set_num_threads(1)
    corpus = Corpus.load(args.data)
    for lr in args.transform_lr:
        print(run(corpus, "define", lr, args), flush=True)
    if args.standard:
        print(run(corpus, "standard", None, args), flush=True)


if __name__ == "__main__":
    main()
