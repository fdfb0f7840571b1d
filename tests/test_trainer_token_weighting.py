"""Under DDP, ranks that hold different numbers of tokens (translation batches) must still produce
the gradient of the mean over all tokens, not the mean of the ranks' means."""

from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp
from torch import nn

from models.trainer import StepResult, TrainConfig, Trainer, cleanup_distributed, init_distributed

# Rank r's single batch: (inputs [tokens, 2], targets [tokens]); rank 0 holds 3 tokens, rank 1 one.
BATCHES = [
    (torch.tensor([[1.0, 2.0], [0.5, -1.0], [2.0, 0.0]]), torch.tensor([1.0, -2.0, 0.5])),
    (torch.tensor([[-3.0, 1.0]]), torch.tensor([4.0])),
]


class RegressionTask:
    """Squared error of a linear model, averaged over this rank's tokens."""

    def __init__(self, batches):
        self.batches = batches

    def train_batches(self, epoch):
        return iter(self.batches)

    def train_step(self, model, batch):
        inputs, targets = batch
        loss = (model(inputs).squeeze(-1) - targets).pow(2).mean()
        return StepResult(loss, targets.numel())

    def evaluate(self, model, split):
        return {"loss": 0.0}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def fit(batches, out_dir, dist=None):
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = TrainConfig(out_dir=str(out_dir), max_steps=1, eval_every=1, progress=False, test_split=None)
    trainer = Trainer(model, optimizer, RegressionTask(batches), config, {"task": "regression"}, dist=dist)
    trainer.fit()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(rank, world, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    dist = init_distributed("cpu")
    try:
        params = fit([BATCHES[rank]], f"{out}/run", dist)
        torch.save(params, f"{out}/rank{rank}.pt")
    finally:
        cleanup_distributed()


def test_ddp_gradient_is_the_mean_over_all_tokens(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    inputs = torch.cat([b[0] for b in BATCHES])
    targets = torch.cat([b[1] for b in BATCHES])
    single = fit([(inputs, targets)], tmp_path / "single")  # one process, all four tokens
    for name, value in single.items():
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-6, atol=1e-7)
        assert torch.equal(ranks[0][name], ranks[1][name])
