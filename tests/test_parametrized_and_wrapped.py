"""DeFINE with parametrized weights (weight_norm, spectral_norm), a wrapped Reduce (a LoRA-style
adapter, as PEFT's "all-linear" puts on every nn.Linear), hooks on the Reduce, and hooks on the
HGT layers and their norms (torch.nn.utils.prune among them).

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
from torch.nn.utils import parametrizations, prune

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


# ---------------------------------------------------------------- hooks on the HGT layers, pruning
# The fused stack reads the HGT layers' parameters and never calls the modules, so a hook on one of
# them (torch.nn.utils.prune's pre-hook, which recomputes the weight from weight_orig and its mask,
# included) would be skipped: pruned, the second training step raised "Trying to backward through
# the graph a second time" on every backend (the weight computed once at pruning time). Now any
# such hook makes the layers run one by one as modules.
def hook_everything(layer):
    """A forward hook that changes nothing on every HGT layer and norm; returns the handles."""
    modules = [m for hgt in layer.layers for m in (hgt, hgt.norm) if m is not None]
    return [m.register_forward_hook(lambda module, args, out: None) for m in modules]


@pytest.mark.parametrize("dedup", [False, True])
@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_hooked_layers_compute_what_the_fused_stack_computes(backend, dedup):
    """Same dropout masks (same seeds), same outputs and gradients, padding and dedup included."""
    plain_out, plain_grads = run(make_layer(backend), dedup)
    layer = make_layer(backend)
    hook_everything(layer)
    assert layer._layers_run_as_modules()
    out, grads = run(layer, dedup)
    assert_close(out, plain_out)
    for name, grad in plain_grads.items():
        assert_close(grads[name], grad)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_forward_hooks_on_layers_see_their_input_and_output_and_take_effect(backend):
    layer = make_layer(backend, dropout=0.0, padding_idx=None)
    seen = {}
    handles = []
    for index, hgt in enumerate(layer.layers):
        record = (lambda module, args, out, index=index: seen.update({index: (args[0], out)}))
        handles.append(hgt.register_forward_hook(record))
    out = layer(IDS)
    flat = IDS.reshape(-1)
    e = layer.weight[flat] * layer.embedding_scale
    plans = layer.plans
    assert_close(seen[0][0], e)
    for index in range(1, len(layer.layers)):  # each layer reads mix(e, previous output)
        mixed = define_ops.reference.split_mix_ref(e, seen[index - 1][1], plans[index].e_in_chunks)
        assert_close(seen[index][0], mixed)
    last = seen[len(layer.layers) - 1][1]
    assert last.shape == (flat.numel(), plans[-2].out_features)
    reduce_input = define_ops.reference.split_mix_ref(e, last, 1)
    assert_close(out.reshape(flat.numel(), -1), layer.reduce(reduce_input))
    # a hook's result replaces the layer's output: zeros from the last layer leave e alone in the Reduce
    layer.layers[-1].register_forward_hook(lambda module, args, out: torch.zeros_like(out))
    expected = layer.reduce(define_ops.reference.split_mix_ref(e, torch.zeros_like(last), 1))
    assert_close(layer(IDS).reshape(flat.numel(), -1), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_hook_on_a_norm_runs_it_as_a_module(backend):
    layer = make_layer(backend)
    calls = []
    layer.layers[1].norm.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape))
    out, grads = run(layer)
    assert calls == [torch.Size([IDS.numel(), layer.plans[1].out_features])]
    plain_out, plain_grads = run(make_layer(backend))
    assert_close(out, plain_out)
    for name, grad in plain_grads.items():
        assert_close(grads[name], grad)
    # and a pre-hook that changes its input takes effect: a norm of a doubled input is the norm of it
    # (LayerNorm is scale-invariant up to eps), a norm of zeros is β (zero at init), so compare outputs
    layer.layers[1].norm.register_forward_pre_hook(lambda module, args: (args[0] * 0,))
    assert (run(layer)[0] - plain_out).abs().max() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_and_global_hooks_fire_on_every_layer(backend):
    layer = make_layer(backend)
    grads_out = []
    layer.layers[1].register_full_backward_hook(lambda module, grad_in, grad_out: grads_out.append(grad_out[0].shape))
    run(layer)
    assert grads_out == [torch.Size([IDS.numel(), layer.plans[1].out_features])]
    called = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: called.append(module))
    try:
        plain = make_layer(backend)
        out = run(plain)[0]
    finally:
        handle.remove()
    assert [m for m in called if m in list(plain.layers)] == list(plain.layers)
    assert_close(out, run(make_layer(backend))[0])


def masked_oracle_steps(backend, prune_target, steps, dedup, **options):
    """Losses of SGD steps on an unpruned layer whose pruned weight is set to orig·mask before
    each step and whose orig gets the masked gradient: what pruning means, without its hooks."""
    pruned = make_layer(backend, **options)
    module, name = prune_target(pruned)
    prune.l1_unstructured(module, name, amount=0.5)
    mask = getattr(module, name + "_mask").clone()
    layer = make_layer(backend, **options)  # the same initial values (same seed)
    target = prune_target(layer)
    orig = getattr(*target).detach().clone()
    others = [p for p in layer.parameters() if p is not getattr(*target)]
    losses = []
    for _ in range(steps):
        with torch.no_grad():
            getattr(*target).copy_(orig * mask)
        torch.manual_seed(5)
        loss = layer(IDS, dedup=dedup).pow(2).sum()
        layer.zero_grad()
        loss.backward()
        with torch.no_grad():
            orig -= 0.01 * getattr(*target).grad * mask
            for p in others:
                p -= 0.01 * p.grad
        losses.append(loss.item())
    return losses


ADAPTIVE = dict(map="adaptive", cutoffs=[10, 30], adaptive_factor=2)
PRUNE_TARGETS = {  # name: (layer options, the module and the name of the pruned weight)
    "layer-weight": ({}, lambda m: (m.layers[1], "weight")),
    "norm-weight": ({}, lambda m: (m.layers[0].norm, "weight")),
    "reduce-weight": ({}, lambda m: (m.reduce, "weight")),
    "table": ({}, lambda m: (m, "weight")),
    "adaptive-band": (ADAPTIVE, lambda m: (m.map.bands[1], "weight")),  # a band's own pre-hook
}


@pytest.mark.parametrize("dedup", [False, True])
@pytest.mark.parametrize("target", list(PRUNE_TARGETS))
@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_pruned_layers_train_like_masked_weights(backend, target, dedup):
    options, prune_target = PRUNE_TARGETS[target]
    layer = make_layer(backend, **options)
    prune.l1_unstructured(*prune_target(layer), amount=0.5)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.01)
    losses = []
    for _ in range(3):
        torch.manual_seed(5)
        loss = layer(IDS, dedup=dedup).pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    expected = masked_oracle_steps("reference", prune_target, 3, dedup, **options)
    assert losses == pytest.approx(expected, rel=1e-10)
    assert losses[2] != pytest.approx(losses[0], rel=1e-6)  # the steps did change the layer


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_table_follows_layer_hooks_and_prune_masks(backend):
    layer = make_layer(backend).eval()
    with torch.no_grad():
        plain = layer(IDS)
        handle = layer.layers[-1].register_forward_hook(lambda module, args, out: out * 0)
        hooked = layer(IDS)  # the cache key holds the layers' hooks: rebuilt with the hook
        assert (hooked - plain).abs().max() > 1e-3
        handle.remove()
        assert_close(layer(IDS), plain)
        prune.l1_unstructured(layer.layers[0], "weight", amount=0.3)
        pruned = layer(IDS)
        layer.layers[0].weight_mask.zero_()  # an in-place edit of the mask (a buffer) rebuilds it too
        masked = layer(IDS)
        layer.invalidate_cache()
        assert_close(masked, layer(IDS))
    assert (masked - pruned).abs().max() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_pruned_layer_compiles_with_fullgraph(backend):
    """torch.compile traces the hooks (dropout off: compiled code draws its own random numbers)."""
    torch._dynamo.reset()
    eager, compiled = make_layer(backend, dropout=0.0), make_layer(backend, dropout=0.0)
    for layer in (eager, compiled):
        prune.l1_unstructured(layer.layers[1], "weight", amount=0.5)
    outputs = []
    for layer, call in ((eager, eager), (compiled, torch.compile(compiled, fullgraph=True))):
        out = call(IDS)
        out.pow(2).sum().backward()
        outputs.append((out, layer.layers[1].weight_orig.grad))
    assert_close(outputs[1][0], outputs[0][0])
    assert_close(outputs[1][1], outputs[0][1])
    assert (outputs[0][1] * (1 - eager.layers[1].weight_mask)).abs().max() == 0  # pruned entries get no gradient


class ScaledGroupLayerNorm(define_ops.layer.GroupLayerNorm):
    """A norm of the user's own (a forward that is not ours): GroupLayerNorm's output, doubled."""

    def forward(self, z):
        return 2 * super().forward(z)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_norms_and_layers_of_the_users_own_run_as_modules(backend):
    # an identity in the norm's place: a layer built without norms, holding the same weights
    layer = make_layer(backend)
    for hgt in layer.layers:
        hgt.norm = nn.Identity()
    assert layer._layers_run_as_modules()
    plain = make_layer(backend, norm=None)
    with torch.no_grad():
        for name, value in plain.named_parameters():
            value.copy_(layer.get_parameter(name))
    out, grads = run(layer)
    plain_out, plain_grads = run(plain)
    assert_close(out, plain_out)
    for name, grad in plain_grads.items():
        assert_close(grads[name], grad)
    # a norm subclass with its own forward, against the reference composed by hand
    layer = make_layer(backend, dropout=0.0, padding_idx=None)
    layer.layers[1].norm = ScaledGroupLayerNorm(layer.layers[1].norm.weight.shape[0]).double()
    ref = define_ops.reference
    e = layer.weight[IDS.reshape(-1)] * layer.embedding_scale
    h = e
    for index, hgt in enumerate(layer.layers):
        plan = layer.plans[index]
        x = e if index == 0 else ref.split_mix_ref(e, h, plan.e_in_chunks) if plan.e_in_chunks else h
        z = ref.grouped_linear_ref(x, hgt.weight, hgt.bias)
        norm_scale = 2 if index == 1 else 1
        z = norm_scale * ref.group_layer_norm_ref(z, plan.groups, hgt.norm.weight, hgt.norm.bias, 1e-5)
        h = ref.activation_ref(z, plan.activation)
    expected = layer.reduce(ref.split_mix_ref(e, h, 1))
    assert_close(layer(IDS).reshape(IDS.numel(), -1), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_parametrized_layers_keep_the_fused_stack(backend):
    """A parametrized module's class is a generated subclass with our forward: no module path."""
    layer = make_layer(backend)
    parametrizations.weight_norm(layer.layers[1], dim=0)
    parametrizations.weight_norm(layer.layers[0].norm, dim=0)
    assert type(layer.layers[1]) is not define_ops.layer.HGTLayer
    assert not layer._layers_run_as_modules()
