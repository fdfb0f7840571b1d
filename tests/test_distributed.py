"""DeFINE under FSDP2 (``torch.distributed.fsdp.fully_shard``): two CPU processes on gloo.

FSDP2 frees a sharded module's gathered parameters after its forward and gathers them again in a
hook it places on the module's output. An in-place op on that output (``x += positions``) must
not lose the hook: it did while the layer returned a view of its [T, m] result (the backward then
read freed parameter storage), where ``nn.Embedding`` returns a tensor of its own. Also here: the
meta-device initialisation that sharded training starts from (``to_empty`` + ``reset_parameters``).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import define_ops

from .conftest import free_port

VOCAB, WIDTH = 64, 12
AVAILABLE = define_ops.available_backends("cpu")  # the reference, cpu, triton (interpreter) where they run

CASES = [  # (backend, dedup, padding_idx, wrapped Reduce)
    (backend, dedup, padding_idx, wrapped)
    for backend in ("reference", "cpu", "triton")
    for dedup, padding_idx, wrapped in (
        (False, None, False),
        (True, 0, False),
        (False, None, True),
        (False, 0, True),
        (True, None, True),
    )
]


class _Model(nn.Module):
    """Embedding → in-place positional add → a linear head: the pattern that lost FSDP2's hook."""

    def __init__(self, backend: str, dedup: bool, padding_idx: int | None, wrapped: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = define_ops.DeFINE(VOCAB, WIDTH, input_dim=8, max_dim=16, depth=3, dropout=0.0,
                                       backend=backend, dedup=dedup, padding_idx=padding_idx)  # fmt: skip
        if wrapped:  # a parametrized Reduce runs as its module, on the stack's output
            torch.nn.utils.parametrizations.weight_norm(self.embed.reduce)
        self.positions = nn.Parameter(torch.randn(5, WIDTH))
        self.head = nn.Linear(WIDTH, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids [B, 5]
        x = self.embed(ids)
        x += self.positions  # in place, on the layer's output
        return self.head(x).square().mean()


def _worker(rank: int, world: int, port: int, cases: list, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    from torch.distributed.fsdp import fully_shard

    results = []
    try:
        for backend, dedup, padding_idx, wrapped in cases:
            model = _Model(backend, dedup, padding_idx, wrapped)
            single = _Model("reference", False, padding_idx, wrapped)  # one process, the whole batch
            single.load_state_dict(model.state_dict())
            fully_shard(model.embed)
            fully_shard(model)
            torch.manual_seed(1)
            batch = torch.randint(0, VOCAB, (2 * world, 5))
            batch[0, :2] = 0  # a padding id where there is one, repeats for dedup
            model(batch.chunk(world)[rank]).backward()
            single(batch).backward()  # the mean over both ranks' halves: what FSDP's averaged grads give
            worst = 0.0
            for p, q in zip(model.parameters(), single.parameters(), strict=True):
                worst = max(worst, (p.grad.full_tensor() - q.grad).abs().max().item())
            results.append(worst)
    finally:
        dist.destroy_process_group()
    torch.save(results, f"{out}.rank{rank}")


def test_fsdp2_with_an_in_place_op_on_the_output_matches_one_process(tmp_path):
    cases = [case for case in CASES if case[0] in AVAILABLE]
    if not cases:
        pytest.skip("no backend available")
    mp.spawn(_worker, args=(2, free_port(), cases, str(tmp_path / "result")), nprocs=2, join=True)
    for rank in range(2):
        worst = torch.load(tmp_path / f"result.rank{rank}", weights_only=True)
        for case, error in zip(cases, worst, strict=True):
            assert error < 1e-10, f"rank {rank}, (backend, dedup, padding_idx, wrapped) = {case}: off by {error}"


class _TanhReduce(nn.Module):
    """A Reduce wrapper whose backward saves its output (tanh's)."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.base(x))


@pytest.mark.parametrize(("backend", "dedup", "padding_idx", "wrapped"), CASES)
def test_the_output_is_a_tensor_of_its_own_and_in_place_ops_on_it_stay_exact(backend, dedup, padding_idx, wrapped):
    """On every path the output is no view (as nn.Embedding's), and an in-place op on it gives the
    gradients of the out-of-place op: where the result is a Reduce module's own (which may have
    saved it for its backward, as tanh does) the layer hands out a copy, never an alias."""
    if backend not in AVAILABLE:
        pytest.skip(f"{backend} unavailable")
    layers = []
    for _ in range(2):  # two equal layers: in place on one, out of place on the other
        torch.manual_seed(0)
        layer = define_ops.DeFINE(VOCAB, WIDTH, input_dim=8, max_dim=16, depth=3, dropout=0.0, backend=backend,
                                  dedup=dedup, padding_idx=padding_idx, dtype=torch.float64)  # fmt: skip
        if wrapped:
            layer.reduce = _TanhReduce(layer.reduce)
        layers.append(layer)
    ids = torch.randint(0, VOCAB, (3, 4))
    ids[0, 0] = 0
    shift = torch.randn(3, 4, WIDTH, dtype=torch.float64)
    in_place = layers[0](ids)
    assert in_place._base is None and in_place.shape == (3, 4, WIDTH)
    in_place += shift
    in_place.square().sum().backward()
    (layers[1](ids) + shift).square().sum().backward()
    for (name, p), q in zip(layers[0].named_parameters(), layers[1].parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)
    layers[0].eval()
    with torch.no_grad():  # the cached table's lookup too
        assert layers[0](ids)._base is None


@pytest.mark.parametrize("options", [
    dict(),  # norm, bias, shuffle: the paper's layer
    dict(norm=None, bias=False, padding_idx=3),
    dict(map="adaptive", cutoffs=[10, 30], adaptive_factor=2),
])  # fmt: skip
def test_meta_device_init_then_reset_parameters_sets_every_parameter(options):
    """Large models are built on the meta device, given memory with ``to_empty`` (FSDP2 and
    torchtitan do) and initialised with each module's ``reset_parameters()``: every parameter must
    get its initial value then, as in a layer built normally (the LayerNorm γ/β kept whatever the
    memory held)."""
    with torch.device("meta"):
        lazy = define_ops.DeFINE(VOCAB, WIDTH, input_dim=8, max_dim=16, depth=3, **options)
    lazy.to_empty(device="cpu")
    with torch.no_grad():
        for p in lazy.parameters():
            p.fill_(float("nan"))  # what to_empty leaves is arbitrary: make a missed parameter show
    eager = define_ops.DeFINE(VOCAB, WIDTH, input_dim=8, max_dim=16, depth=3, **options)
    for layer in (lazy, eager):
        torch.manual_seed(7)
        layer.reset_parameters()
    for (name, p), q in zip(lazy.named_parameters(), eager.parameters(), strict=True):
        assert torch.equal(p, q), name
    norms = [layer.norm for layer in lazy.layers if layer.norm is not None]
    assert all(torch.equal(n.weight, torch.ones_like(n.weight)) and not n.bias.any() for n in norms)
    ids = torch.randint(0, VOCAB, (2, 5))
    torch.testing.assert_close(lazy(ids), eager(ids))


class _ViewReduce(nn.Module):
    """A Reduce wrapper that returns a view of its result."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x)[:, : self.base.out_features]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_reduce_that_returns_a_view_still_gives_an_output_of_its_own(backend):
    if backend not in AVAILABLE:
        pytest.skip(f"{backend} unavailable")
    layer = define_ops.DeFINE(VOCAB, WIDTH, input_dim=8, max_dim=16, depth=3, backend=backend)
    layer.reduce = _ViewReduce(layer.reduce)
    out = layer(torch.randint(0, VOCAB, (7,)))  # 1-D ids: the Reduce's [T, m] already has the output's shape
    assert out._base is None and out.shape == (7, WIDTH)
