"""Under DDP, ranks that hold different numbers of tokens (translation batches) must still produce
the gradient of the mean over all tokens, not the mean of the ranks' means; so must micro-batches
of different sizes accumulated into one optimizer step."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from models.trainer import StepResult, TrainConfig, Trainer, cleanup_distributed, init_distributed
from tests.conftest import free_port

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


def fit(batches, out_dir, dist=None, *, steps=1, accum_steps=1, epochs=1):
    torch.manual_seed(0)
    model = nn.Linear(2, 1).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = TrainConfig(out_dir=str(out_dir), max_steps=steps, epochs=epochs, eval_every=1, progress=False,
                         test_split=None, accum_steps=accum_steps)  # fmt: skip
    task = RegressionTask([(x.double(), y.double()) for x, y in batches])
    trainer = Trainer(model, optimizer, task, config, {"task": "regression"}, dist=dist)
    result = trainer.fit()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, result


def _split(batch, sizes):
    inputs, targets = batch
    return list(zip(inputs.split(sizes), targets.split(sizes), strict=True))


def _worker(rank, world, port, out, accum_steps):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    dist = init_distributed("cpu")
    try:
        # with accumulation rank 0 splits its 3 tokens into micro-batches of 2 and 1, rank 1 its
        # single token into a micro-batch of 1 and an empty one
        batches = [BATCHES[rank]] if accum_steps == 1 else _split(BATCHES[rank], [2, 1] if rank == 0 else [1, 0])
        params, _ = fit(batches, f"{out}/run", dist, accum_steps=accum_steps)
        torch.save(params, f"{out}/rank{rank}.pt")
    finally:
        cleanup_distributed()


@pytest.mark.parametrize("accum_steps", [1, 2])
def test_ddp_gradient_is_the_mean_over_all_tokens(tmp_path, accum_steps):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), accum_steps), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    inputs = torch.cat([b[0] for b in BATCHES])
    targets = torch.cat([b[1] for b in BATCHES])
    single, _ = fit([(inputs, targets)], tmp_path / "single")  # one process, all four tokens
    for name, value in single.items():
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-12, atol=1e-12)
        assert torch.equal(ranks[0][name], ranks[1][name])


def test_accumulated_micro_batches_equal_the_whole_batch(tmp_path):
    torch.manual_seed(1)
    inputs, targets = torch.randn(24, 2), torch.randn(24)
    # five micro-batches of 3, 7, 9, 1 and 4 tokens, three per step: steps of 19 and (the epoch's
    # last, short of micro-batches) 5 tokens
    micro = _split((inputs, targets), [3, 7, 9, 1, 4])
    got, result = fit(micro, tmp_path / "micro", steps=None, accum_steps=3)
    assert result.step == 2
    expected, _ = fit(_split((inputs, targets), [19, 5]), tmp_path / "whole", steps=2)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-12, atol=1e-12)
    # and not the mean of the micro-batches' means, nor other groupings
    other, _ = fit(_split((inputs, targets), [10, 14]), tmp_path / "other", steps=2)
    assert not torch.allclose(other["weight"], got["weight"], rtol=1e-6, atol=0)


def test_accum_steps_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="accum_steps must be >= 1, got 0"):
        TrainConfig(out_dir=str(tmp_path), accum_steps=0)
