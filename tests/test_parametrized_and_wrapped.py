"""DeFINE with parametrized weights (weight_norm, spectral_norm), a wrapped Reduce (a LoRA-style
adapter, as PEFT's "all-linear" puts on every nn.Linear) and hooks on the Reduce.

The fast paths read the parameters straight from the modules' dicts and run the Reduce as the
stack's last step. A parametrization moves a weight out of its dict (it raised KeyError), and a
wrapper or a hook on the Reduce would have been skipped (the stack never calls the module): now
parametrized weights are read through the attribute, and a Reduce that is not a plain,
unhooked nn.Linear is called as a module on the stack's output.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import define_ops
from define_ops import DeFINE

BACKENDS = [b for b in ("cpu", "triton") if b in define_ops.available_backends("cpu")]
IDS = torch.tensor([[4, 0, 17, 4, 49], [3, 22, 3, 11, 40]])


def make_layer(backend, **options):
    torch.manual_seed(11)
    kwargs = dict(input_dim=16, max_dim=64, depth=3, dropout=0.1, padding_idx=0, backend=backend, dtype=torch.float64)
    return DeFINE(50, 24, **{**kwargs, **options})


class LowRankAdapter(nn.Module):
    """base(x) + x·Aᵀ·Bᵀ·s, the shape of a LoRA adapter around an nn.Linear."""

    def __init__(self, base: nn.Linear, rank: int = 2, scale: float = 0.5) -> None:
        super().__init__()
        self.base, self.scale = base, scale
        self.down = nn.Parameter(torch.randn(rank, base.in_features, dtype=base.weight.dtype) * 0.1)
        self.up = nn.Parameter(torch.randn(base.out_features, rank, dtype=base.weight.dtype) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.down.t() @ self.up.t()) * self.scale

    def merged(self) -> torch.Tensor:
        return self.base.weight + self.up @ self.down * self.scale


def run(layer, dedup=False):
    torch.manual_seed(5)  # dropout seeds
    out = layer(IDS, dedup=dedup)
    out.pow(2).sum().backward()
    return out.detach(), {name: p.grad for name, p in layer.named_parameters()}


def assert_close(a, b):
    assert (a - b).abs().max().item() <= 1e-10 * max(1.0, b.abs().max().item())


PARAMETRIZE = {
    "reduce-weight-norm": lambda m: parametrizations.weight_norm(m.reduce),
    "layer-weight-norm": lambda m: parametrizations.weight_norm(m.layers[1], dim=0),
    "norm-weight-norm": lambda m: parametrizations.weight_norm(m.layers[0].norm, dim=0),
    "table-spectral-norm": lambda m: parametrizations.spectral_norm(m, "weight"),
}


@pytest.mark.parametrize("dedup", [False, True])
@pytest.mark.parametrize("case", list(PARAMETRIZE))
@pytest.mark.parametrize("backend", BACKENDS)
def test_parametrized_weights_match_the_reference_and_the_plain_layer(backend, case, dedup):
    results = {}
    for name in ("reference", backend):
        layer = make_layer(name)
        PARAMETRIZE[case](layer)
        results[name] = run(layer, dedup)
    out, grads = results[backend]
    assert_close(out, results["reference"][0])
    for name, grad in results["reference"][1].items():
        assert_close(grads[name], grad)
    # the parametrized values in a plain layer give the same output (spectral norm: one power step
    # per training call, so compare in eval mode, where the parametrization is fixed)
    layer = make_layer(backend)
    PARAMETRIZE[case](layer)
    layer.eval()
    plain = make_layer(backend).eval()
    with torch.no_grad():
        for name, value in plain.named_parameters():
            module_name, _, attr = name.rpartition(".")
            value.copy_(getattr(layer.get_submodule(module_name), attr))
        assert_close(layer(IDS), plain(IDS))


@pytest.mark.parametrize("dedup", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_wrapped_reduce_is_applied(backend, dedup):
    results = {}
    for name in ("reference", backend):
        layer = make_layer(name)
        layer.reduce = LowRankAdapter(layer.reduce)
        results[name] = run(layer, dedup)
    out, grads = results[backend]
    assert_close(out, results["reference"][0])
    for name, grad in results["reference"][1].items():
        assert_close(grads[name], grad)
    assert grads["reduce.down"].abs().max() > 0 and grads["reduce.up"].abs().max() > 0
    # the oracle: a plain layer whose Reduce holds the merged weight
    layer = make_layer(backend)
    layer.reduce = LowRankAdapter(layer.reduce)
    plain = make_layer(backend)
    with torch.no_grad():
        plain.reduce.weight.copy_(layer.reduce.merged())
    torch.manual_seed(5)
    wrapped_out = layer(IDS, dedup=dedup)
    torch.manual_seed(5)
    assert_close(wrapped_out, plain(IDS, dedup=dedup))


@pytest.mark.parametrize("backend", BACKENDS)
def test_hooks_on_the_reduce_fire_and_take_effect(backend):
    layer = make_layer(backend, dropout=0.0)
    plain = layer(IDS)
    seen = []
    handle = layer.reduce.register_forward_hook(lambda module, args, out: seen.append(args[0].shape) or out * 2)
    assert_close(layer(IDS), 2 * plain)
    assert seen == [torch.Size([IDS.numel(), layer.reduce.in_features])]
    layer.eval()  # the cached table is built through the hook too
    with torch.no_grad():
        assert_close(layer(IDS), 2 * plain)
        handle.remove()  # the cache key holds the Reduce's hooks: the table is rebuilt without it
        assert_close(layer(IDS), plain)
        handle = layer.reduce.register_forward_pre_hook(lambda module, args: (args[0] * 0,))
        bias_rows = layer.reduce.bias.expand_as(plain).masked_fill((IDS == 0)[..., None], 0.0)  # id 0 pads
        assert_close(layer(IDS), bias_rows)  # a Reduce of zeros gives its bias
        handle.remove()


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_table_follows_the_adapter(backend):
    layer = make_layer(backend).eval()
    layer.reduce = LowRankAdapter(layer.reduce)
    with torch.no_grad():
        before = layer(IDS)
        layer.reduce.up.add_(1.0)  # an in-place update of the adapter: the table must be rebuilt
        after = layer(IDS)
        layer.invalidate_cache()
        assert_close(after, layer(IDS))
    assert (after - before).abs().max() > 0
