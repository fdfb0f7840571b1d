"""Distinct tokens once, the eval-mode inference table, and adaptive input as the Map."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import define_ops
from define_ops import DeFINE, DeFINEConfig, reference

from .conftest import max_err

BACKENDS = ["reference", *[b for b in ("cpu", "triton") if b in define_ops.available_backends("cpu")]]


def small_layer(backend: str, **overrides) -> DeFINE:
    kwargs = dict(input_dim=16, max_dim=64, depth=3, max_groups=4, padding_idx=1, backend=backend, dtype=torch.float64)
    kwargs.update(overrides)
    return DeFINE(50, 24, **kwargs)


def repeated_ids() -> torch.Tensor:
    return torch.tensor([[3, 1, 7, 3, 3, 9], [7, 7, 0, 1, 49, 3]])


# ----------------------------------------------------------------------------- dedup
@pytest.mark.parametrize("backend", BACKENDS)
def test_dedup_equals_plain_path_without_dropout(backend):
    layer = small_layer(backend).train()
    ids = repeated_ids()
    grads = []
    for dedup in (False, True):
        layer.zero_grad(set_to_none=True)
        out = layer(ids, dedup=dedup)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape))
        grads.append((out.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()}))
    (out_plain, g_plain), (out_dedup, g_dedup) = grads
    assert max_err(out_dedup, out_plain) < 1e-12
    for name in g_plain:
        assert max_err(g_dedup[name], g_plain[name]) < 1e-10, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_dedup_dropout_is_one_mask_per_distinct_token(backend):
    layer = small_layer(backend, dropout=0.5, dedup=True).train()
    ids = repeated_ids().reshape(-1)
    out = layer(ids)
    threes = out[ids == 3]
    assert torch.equal(threes[0], threes[1]) and torch.equal(threes[0], threes[2])
    plain = layer(ids, dedup=False)
    assert not torch.equal(plain[ids == 3][0], plain[ids == 3][1])  # one mask per occurrence


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_dedup_under_compile(backend):
    layer = small_layer(backend, dedup=True).eval()
    compiled = torch.compile(layer, fullgraph=True)
    ids = repeated_ids()
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), layer(ids, dedup=False))
    # With dropout, repeated ids share a mask only when dedup really ran inside the graph: Triton
    # does (static shapes, no host sync); the backends that need torch.unique run the plain path.
    layer = small_layer(backend, dedup=True, dropout=0.5).train()
    flat = repeated_ids().reshape(-1)
    threes = torch.compile(layer, fullgraph=True)(flat)[flat == 3]
    shared = torch.equal(threes[0], threes[1]) and torch.equal(threes[0], threes[2])
    assert shared == (backend == "triton")


@pytest.mark.skipif("triton" not in BACKENDS, reason="the Triton backend runs on the CPU under TRITON_INTERPRET=1")
def test_triton_dedup_without_sync_gives_the_unique_paths_masks():
    # the sync-free distinct ids have torch.unique's order, so the dropout rows (and masks) agree
    flat = torch.cat([repeated_ids().reshape(-1), torch.tensor([42, 0, 42])])
    layers = {b: small_layer(b, dropout=0.5, dedup=True).train() for b in ("reference", "triton")}
    layers["triton"].load_state_dict(layers["reference"].state_dict())
    outs, grads = {}, {}
    for backend, layer in layers.items():
        torch.manual_seed(3)
        outs[backend] = layer(flat)
        outs[backend].backward(torch.linspace(-1, 1, outs[backend].numel(), dtype=torch.float64).reshape(-1, 24))
        grads[backend] = {n: p.grad for n, p in layer.named_parameters()}
    assert max_err(outs["triton"], outs["reference"]) < 1e-12
    for name, g in grads["reference"].items():
        assert max_err(grads["triton"][name], g) < 1e-10, name


def test_distinct_ids_match_torch_unique():
    from define_ops.layer import distinct_ids

    for flat in (torch.tensor([5, 3, 5, 9, 3, 3, 0]), torch.tensor([7]), torch.randint(0, 50, (1000,)),
                 torch.arange(10, dtype=torch.int32)):  # fmt: skip
        distinct, inverse, count = distinct_ids(flat)
        expected, expected_inverse = torch.unique(flat, return_inverse=True)
        n = int(count)
        assert n == expected.numel() and torch.equal(distinct[:n], expected)
        assert torch.equal(inverse, expected_inverse) and torch.equal(distinct[inverse], flat)
        assert (distinct[n:] == expected[0]).all()  # padding: a valid id


# ----------------------------------------------------------------------------- cache
@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_matches_uncached_eval_output_for_every_id(backend):
    layer = small_layer(backend).eval()
    every_id = torch.arange(50)
    with torch.enable_grad():
        uncached = layer(every_id)  # grad enabled: the cache is bypassed
    assert layer._cache_table is None
    with torch.no_grad():
        cached = layer(every_id)
        assert layer._cache_table is not None
        table = layer._cache_table
        layer(every_id)
        assert layer._cache_table is table  # built once
    assert max_err(cached, uncached) < 1e-12
    assert (cached[1] == 0).all()  # padding id
    assert max_err(layer.export_table(chunk_size=7), uncached) < 1e-12
    assert max_err(layer.to_embedding()(every_id), uncached) < 1e-12



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [50, -1, 10**6])
def test_cached_call_names_a_bad_id(backend, bad):
    """The cached CPU call leaves the range check to F.embedding's own and names the bad id only
    when that fails: the same TokenIdError as the check before the call gives."""
    layer = small_layer(backend).eval()
    ids = torch.tensor([[3, 4], [bad, 7]])
    with torch.no_grad():
        layer(torch.tensor([0, 1]))  # the table is built
        assert layer._cache_table is not None
        with pytest.raises(define_ops.TokenIdError, match=f"token id {bad} at flat position 2 is out of range"):
            layer(ids)
        assert layer(ids[:1]).shape == (1, 2, layer.config.embedding_dim)  # and it still serves good ids

def test_cache_is_rebuilt_after_an_optimizer_step_and_not_saved():
    layer = small_layer(BACKENDS[-1]).train()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    ids = torch.arange(50)
    layer.eval()
    with torch.no_grad():
        before = layer(ids)
    assert not any("cache" in key for key in layer.state_dict())
    layer.train()
    layer(ids).pow(2).sum().backward()
    optimizer.step()
    layer.eval()
    with torch.no_grad():
        after = layer(ids)
    layer.cache = "off"
    with torch.no_grad():
        fresh = layer(ids)
    assert not torch.allclose(before, after)
    assert max_err(after, fresh) < 1e-12


def test_compiled_eval_never_serves_a_stale_table():
    # Under torch.compile the layer runs uncached (its staleness checks are Python state a compiled
    # graph would not re-run): an in-place edit between two compiled calls shows in the second.
    layer = small_layer("cpu" if "cpu" in BACKENDS else "reference").eval()
    ids = torch.arange(50)
    compiled = torch.compile(layer, fullgraph=True)
    with torch.no_grad():
        first = compiled(ids)
        torch.testing.assert_close(first, layer(ids), rtol=0, atol=1e-12)
        layer.reduce.bias.add_(1.0)
        second = compiled(ids)
    assert layer._cache_table is not None  # the eager call above built one; compiled calls ignore it
    expected = first + 1.0
    expected[1] = 0.0  # the padding id's vector stays zero
    torch.testing.assert_close(second, expected, rtol=0, atol=1e-12)


def test_cache_detects_load_state_dict_and_is_skipped_in_training():
    layer = small_layer(BACKENDS[-1]).eval()
    other = small_layer(BACKENDS[-1]).eval()
    ids = torch.arange(50)
    with torch.no_grad():
        layer(ids)
        layer.load_state_dict(other.state_dict())
        torch.testing.assert_close(layer(ids), other(ids))
        assert layer._cache_table is not None
        layer.train()  # training mode drops the table (untracked edits happen there) and never builds one
        assert layer._cache_table is None
        layer(ids)
    assert layer._cache_table is None


def test_cache_detects_replaced_parameters_and_submodules_and_data_edits_on_request():
    layer = small_layer(BACKENDS[-1]).eval()
    ids = torch.arange(50)

    def uncached():
        layer.cache = "off"
        try:
            return layer(ids)
        finally:
            layer.cache = "auto"

    with torch.no_grad():
        layer(ids)
        layer.reduce.bias = nn.Parameter(torch.randn_like(layer.reduce.bias))  # a new parameter
        assert max_err(layer(ids), uncached()) < 1e-12
        old = layer(ids)
        replacement = nn.Linear(layer.reduce.in_features, layer.reduce.out_features).double()
        layer.reduce = replacement  # a new submodule
        assert max_err(layer(ids), uncached()) < 1e-12 and not torch.allclose(layer(ids), old)
        layer.layers[0].weight.data = layer.layers[0].weight.data * 3.0  # new storage, same version
        assert max_err(layer(ids), uncached()) < 1e-12
        norm = layer.layers[0].norm
        replacement_norm = type(norm)(norm.weight.numel(), norm.eps, dtype=torch.float64)
        nn.init.uniform_(replacement_norm.weight, 0.5, 1.5)
        layer.layers[0].norm = replacement_norm  # a submodule deep in the tree
        assert max_err(layer(ids), uncached()) < 1e-12
        layer.weight.data.mul_(2.0)  # bypasses the version counter: documented, needs invalidate_cache()
        layer.invalidate_cache()
        assert max_err(layer(ids), uncached()) < 1e-12


def uncached_eval(layer: DeFINE, ids: torch.Tensor) -> torch.Tensor:
    """The eval output computed without the table (the cache switched off for one call)."""
    layer.cache = "off"
    try:
        return layer(ids)
    finally:
        layer.cache = "auto"


def test_cache_is_not_fooled_by_functional_call():
    # functional_call swaps tensors into the modules' dicts without registering them: the table
    # must follow whatever parameters the call runs with, and the layer's own after it.
    layer = small_layer(BACKENDS[-1]).eval()
    ids = torch.arange(50)
    doubled = {name: p.detach() * 2 for name, p in layer.named_parameters()}
    with torch.no_grad():
        own = uncached_eval(layer, ids)
        swapped = torch.func.functional_call(layer, doubled, (ids,))
        assert max_err(swapped, torch.func.functional_call(layer, doubled, (ids,), strict=True)) == 0
        assert max_err(layer(ids), own) < 1e-12
        tripled = {name: t * 1.5 for name, t in doubled.items()}
        again = torch.func.functional_call(layer, tripled, (ids,))
        layer.cache = "off"
        expected = torch.func.functional_call(layer, tripled, (ids,))
        layer.cache = "auto"
    assert max_err(again, expected) < 1e-12 and not torch.allclose(again, swapped)


@pytest.mark.parametrize("stay_in_eval", [False, True])
@pytest.mark.parametrize("optimizer", ["adam_fused", "sgd_fused", "adamw_foreach"])
def test_cache_is_rebuilt_after_any_optimizer_step(optimizer, stay_in_eval):
    # Fused optimizers write the parameters without bumping their version counters; a step taken
    # while the layer stays in eval mode (grad enabled: the uncached path) must be seen too.
    layer = small_layer(BACKENDS[-1], dtype=torch.float32).eval()
    name, mode = optimizer.split("_")
    kind = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[name]
    opt = kind(layer.parameters(), lr=0.1, **{mode: True})
    ids = torch.arange(50)
    with torch.no_grad():
        before = layer(ids)  # builds the table
    layer.train(not stay_in_eval)
    layer(ids).pow(2).sum().backward()
    opt.step()
    layer.eval()
    with torch.no_grad():
        after = layer(ids)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, uncached_eval(layer, ids), rtol=0, atol=0)


def test_a_frozen_layer_keeps_its_table_while_other_parameters_train():
    # A frozen DeFINE in eval mode (a distillation teacher) beside a model trained by torch's
    # optimizers: their steps bump versions of their own parameters only and never drop its table.
    teacher = small_layer(BACKENDS[-1], dtype=torch.float32).eval().requires_grad_(False)
    student = nn.Linear(24, 24)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    ids = torch.arange(50)
    for _ in range(3):
        with torch.no_grad():
            target = teacher(ids)
        table = teacher._cache_table
        student(target).pow(2).sum().backward()
        opt.step()
    with torch.no_grad():
        teacher(ids)
    assert teacher._cache_table is table  # built once


def test_functional_call_with_plain_tensors_builds_no_table():
    layer = small_layer(BACKENDS[-1]).eval()
    ids = torch.arange(50)
    doubled = {name: p.detach() * 2 for name, p in layer.named_parameters()}
    with torch.no_grad():
        own = layer(ids)
        table = layer._cache_table
        torch.func.functional_call(layer, doubled, (ids,))
        assert layer._cache_table is table  # neither rebuilt for the call nor kept for it
        assert torch.equal(layer(ids), own) and layer._cache_table is table


def test_cache_does_not_survive_a_dtype_round_trip():
    layer = small_layer(BACKENDS[-1], dtype=torch.float32).eval()
    ids = torch.arange(50)
    with torch.no_grad():
        layer(ids)
        layer.half().float()  # values rounded; storage addresses could come back without the pins
        torch.testing.assert_close(layer(ids), uncached_eval(layer, ids), rtol=0, atol=0)


def test_compiled_layer_pickles_and_deepcopies_as_a_copy():
    import copy
    import pickle

    layer = small_layer(BACKENDS[-1])
    layer.compile()
    clone = copy.deepcopy(layer)
    with torch.no_grad():
        for p in clone.parameters():
            p.zero_()
    ids = torch.arange(5)
    assert clone(ids).abs().max() < layer(ids).abs().max()  # the copy runs its own parameters
    assert pickle.loads(pickle.dumps(layer)) is not None


def test_cache_follows_autocast():
    layer = small_layer(BACKENDS[-1], dtype=torch.float32).eval()
    ids = torch.arange(50)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cast = layer(ids)
            assert cast.dtype == uncached_eval(layer, ids).dtype == torch.bfloat16
            torch.testing.assert_close(cast, uncached_eval(layer, ids), rtol=0, atol=0)
        plain = layer(ids)  # not the bf16 table
        assert plain.dtype == torch.float32
        torch.testing.assert_close(plain, uncached_eval(layer, ids), rtol=0, atol=0)


def test_cache_is_dropped_by_training_mode_and_left_out_of_copies():
    import copy
    import pickle

    layer = small_layer(BACKENDS[-1]).eval()
    ids = torch.arange(50)
    with torch.no_grad():
        layer(ids)
        assert layer._cache_table is not None
        for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
            assert clone._cache_table is None and clone._cache_sources == []
            torch.testing.assert_close(clone(ids), layer(ids), rtol=0, atol=0)
            assert clone._cache_table is not None and clone._cache_table is not layer._cache_table
        # A hand-written update through .data bumps no version; it happens in training mode.
        layer.train()
        for p in layer.parameters():
            p.data.add_(0.01)
        layer.eval()
        torch.testing.assert_close(layer(ids), uncached_eval(layer, ids), rtol=0, atol=0)


def test_meta_layer_runs_like_nn_embedding():
    layer = small_layer(BACKENDS[0], device="meta", validate_ids=True)
    out = layer(torch.zeros(2, 3, dtype=torch.long, device="meta"))
    assert out.shape == (2, 3, 24) and out.is_meta
    with torch.no_grad():
        assert layer.eval()(torch.zeros(4, dtype=torch.long, device="meta")).shape == (4, 24)


def test_cache_option_is_validated():
    with pytest.raises(ValueError, match="cache"):
        DeFINE(10, 8, input_dim=16, max_dim=32, cache="always")


# ----------------------------------------------------------------------------- adaptive Map
def test_adaptive_parameter_count_of_the_wt103_lstm():
    cfg = DeFINEConfig(267_735, 256, input_dim=256, map="adaptive", cutoffs=(20_000, 40_000, 200_000))
    assert cfg.num_map_parameters() == 9_252_444  # the paper's 9.25M (tied with adaptive softmax)
    assert [w for _, _, w in cfg.bands()] == [256, 64, 16, 4]


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(map="adaptive"), "cutoffs"),
        (dict(map="adaptive", cutoffs=(30, 20)), "cutoffs"),
        (dict(map="adaptive", cutoffs=(20, 60)), "cutoffs"),
        (dict(map="adaptive", cutoffs=(10, 20, 30), adaptive_factor=4), "adaptive_factor"),
        (dict(cutoffs=(10,)), "cutoffs"),
        (dict(map="hash"), "map"),
    ],
)
def test_adaptive_config_errors(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DeFINEConfig(50, 24, input_dim=16, max_dim=64, **kwargs)


@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_adaptive_map_matches_straightforward_reference(backend, scale):
    layer = small_layer(
        backend, map="adaptive", cutoffs=(10, 30), adaptive_factor=2, padding_idx=None, scale_embedding=scale
    )
    ids = torch.tensor([0, 9, 10, 29, 30, 49, 12, 12, 3])
    tables = [band.weight for band in layer.map.bands]
    projections = [band.projection.weight if band.projection is not None else None for band in layer.map.bands]
    bounds = layer.map.bounds
    e = layer.embed_ids(ids)
    e_ref = reference.adaptive_map_ref(ids, tables, projections, bounds, scale=scale)
    # The authors' convention: band b's lookup times √width_b (16, 8, 4 here), no √n on top.
    in_band_0 = layer.map.bands[0].weight[ids[:2]] * (4.0 if scale else 1.0)
    assert max_err(e[:2], in_band_0) < 1e-12
    assert max_err(e, e_ref) < 1e-12
    g = torch.randn_like(e)
    grads = torch.autograd.grad(e, tables + [p for p in projections if p is not None], g)
    grads_ref = torch.autograd.grad(e_ref, tables + [p for p in projections if p is not None], g)
    for ours, ref in zip(grads, grads_ref, strict=True):
        assert max_err(ours, ref) < 1e-12
    table, projection = layer.map.weights_for_band(1)
    assert table.shape == (20, 8) and projection.shape == (16, 8)
    assert layer.map.weights_for_band(0)[1] is None


@pytest.mark.parametrize("compiled", [False, True])
def test_adaptive_map_gives_nan_rows_for_unchecked_bad_ids(compiled):
    # Out-of-range ids that reach the Map unchecked must show (NaN, like the GPU table lookups), not embed to zeros.
    layer = small_layer("reference", map="adaptive", cutoffs=(10, 30), adaptive_factor=2, validate_ids=False)
    embed = torch.compile(layer.embed_ids, fullgraph=True) if compiled else layer.embed_ids
    e = embed(torch.tensor([3, 50, -1, 49, 1]))
    assert e[[1, 2]].isnan().all()
    assert not e[[0, 3, 4]].isnan().any() and (e[4] == 0).all()  # 1: the padding id


@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_adaptive_define_backends_agree(backend):
    ref = small_layer("reference", map="adaptive", cutoffs=(10, 30), adaptive_factor=2).train()
    fast = small_layer(backend, map="adaptive", cutoffs=(10, 30), adaptive_factor=2).train()
    fast.load_state_dict(ref.state_dict())
    ids = repeated_ids()
    outs = []
    for module in (ref, fast):
        out = module(ids)
        out.sum().backward()
        outs.append((out, [p.grad for p in module.parameters()]))
    assert max_err(outs[0][0], outs[1][0]) < 1e-12
    for a, b in zip(outs[0][1], outs[1][1], strict=True):
        assert max_err(a, b) < 1e-10
    assert (outs[1][0][ids == 1] == 0).all()


def test_adaptive_map_compiles_fullgraph():
    layer = small_layer(BACKENDS[-1], map="adaptive", cutoffs=(10, 30), adaptive_factor=2).train()
    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(repeated_ids())
    out.sum().backward()
    assert layer.map.bands[2].weight.grad is not None


# ----------------------------------------------------------------------------- autocast
@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_autocast_runs_the_layer_in_bfloat16(backend):
    layer = DeFINE(50, 24, input_dim=16, max_dim=64, backend=backend).train()
    ids = repeated_ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(ids)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.layers[0].weight.grad.dtype == torch.float32
    reference_layer = DeFINE(50, 24, input_dim=16, max_dim=64, backend="reference").train()
    reference_layer.load_state_dict(layer.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference_layer(ids)
    torch.testing.assert_close(out.float(), expected.float(), rtol=0.05, atol=0.05)


# ----------------------------------------------------------------------------- sparse table gradient
@pytest.mark.parametrize("adaptive", [False, True])
def test_sparse_table_gradient_equals_the_dense_one(adaptive):
    extra = dict(map="adaptive", cutoffs=(10, 30), adaptive_factor=2) if adaptive else {}
    dense = small_layer(BACKENDS[-1], **extra).train()
    sparse = small_layer(BACKENDS[-1], sparse=True, **extra).train()
    sparse.load_state_dict(dense.state_dict())
    ids = repeated_ids()
    outs = []
    for module in (dense, sparse):
        out = module(ids)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape))
        outs.append(out)
    assert max_err(outs[0], outs[1]) < 1e-12
    tables = ["weight"] if not adaptive else [f"map.bands.{b}.weight" for b in range(3)]
    grads_dense, grads_sparse = dict(dense.named_parameters()), dict(sparse.named_parameters())
    for name in tables:
        assert grads_sparse[name].grad.is_sparse, name
        assert max_err(grads_sparse[name].grad.to_dense(), grads_dense[name].grad) < 1e-12, name
    for name, p in grads_dense.items():
        if name not in tables:
            assert max_err(grads_sparse[name].grad, p.grad) < 1e-12, name
    if not adaptive:
        assert (grads_sparse["weight"].grad.to_dense()[1] == 0).all()  # padding row


def test_sparse_gradient_under_torch_compile_with_a_padding_id():
    # Compiled, nn.Embedding(sparse=True, padding_idx=...)'s backward fails on its data-dependent
    # entry count (torch 2.13); ours keeps the padding id's entries, as zeros.
    eager = small_layer(BACKENDS[-1], sparse=True).train()
    compiled_layer = small_layer(BACKENDS[-1], sparse=True).train()
    compiled_layer.load_state_dict(eager.state_dict())
    ids = repeated_ids()
    torch._dynamo.reset()
    for module in (eager, torch.compile(compiled_layer, fullgraph=True)):
        module(ids).pow(2).sum().backward()
    grad, expected = compiled_layer.weight.grad, eager.weight.grad
    assert grad.is_sparse and max_err(grad.to_dense(), expected.to_dense()) < 1e-12
    assert (grad.to_dense()[1] == 0).all()  # the padding row
    for name, p in eager.named_parameters():
        if name != "weight":
            assert max_err(dict(compiled_layer.named_parameters())[name].grad, p.grad) < 1e-12, name


def test_sparse_gradient_trains_with_sparse_adam():
    layer = small_layer(BACKENDS[-1], sparse=True, dtype=torch.float32).train()
    table_optimizer = torch.optim.SparseAdam([layer.weight], lr=1e-2)
    rest = torch.optim.Adam([p for n, p in layer.named_parameters() if n != "weight"], lr=1e-2)
    ids = repeated_ids()
    before = layer.weight.detach().clone()
    layer(ids).pow(2).mean().backward()
    table_optimizer.step()
    rest.step()
    touched = torch.zeros(50, dtype=torch.bool)
    touched[ids.unique()] = True
    touched[1] = False  # padding
    changed = (layer.weight.detach() != before).any(dim=1)
    assert torch.equal(changed, touched)


@pytest.mark.parametrize("variant", ["sparse", "adaptive", "no_grad"])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_dedup_equals_plain_path_beyond_the_folded_lookup(backend, variant):
    # the Map outside the stack's node (sparse table, adaptive input), and inference without autograd
    overrides = {"sparse": dict(sparse=True), "adaptive": dict(map="adaptive", cutoffs=[10, 30], adaptive_factor=2),
                 "no_grad": {}}[variant]  # fmt: skip
    layer = small_layer(backend, **overrides).train()
    ids = repeated_ids()
    results = []
    for dedup in (False, True):
        layer.zero_grad(set_to_none=True)
        if variant == "no_grad":
            with torch.no_grad():
                results.append((layer(ids, dedup=dedup), {}))
            continue
        out = layer(ids, dedup=dedup)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape))
        results.append((out.detach(), {n: p.grad for n, p in layer.named_parameters()}))
    (out_plain, g_plain), (out_dedup, g_dedup) = results
    assert max_err(out_dedup, out_plain) < 1e-12
    assert out_dedup[ids == 1].abs().max() == 0  # padding rows
    for name, grad in g_plain.items():
        grad, other = (g.to_dense() if g is not None and g.is_sparse else g for g in (grad, g_dedup[name]))
        assert max_err(other, grad) < 1e-10, name


@pytest.mark.skipif("triton" not in BACKENDS, reason="the Triton backend runs on the CPU under TRITON_INTERPRET=1")
def test_triton_dedup_table_gradient_skips_the_padding_rows(monkeypatch):
    # The sync-free distinct ids are padded to the batch size with the smallest id; as ids of the
    # table gradient those rows would form one long run (a whole batch's worth on real text) summed
    # by one program. They reach the table gradient as out-of-range ids, which get no work.
    from define_ops import stack

    seen = []
    eager = stack._eager_ops("triton")
    original = eager.lookup_backward

    def recording(grad, ids, *args):
        seen.append(ids.clone())
        return original(grad, ids, *args)

    monkeypatch.setattr(stack, "_eager_ops", lambda backend: dataclasses.replace(eager, lookup_backward=recording))
    layer = small_layer("triton", dedup=True).train()
    flat = repeated_ids().reshape(-1)
    layer(flat).sum().backward()
    distinct = torch.unique(flat)
    table_ids = seen[-1]  # the expansion's backward comes first, the table's last
    assert table_ids.numel() == flat.numel()
    assert torch.equal(table_ids[: distinct.numel()], distinct) and (table_ids[distinct.numel() :] == -1).all()
    reference_layer = small_layer("reference", dedup=True).train()
    reference_layer.load_state_dict(layer.state_dict())
    reference_layer(flat).sum().backward()
    assert max_err(layer.weight.grad, reference_layer.weight.grad) < 1e-12


@pytest.mark.skipif("triton" not in BACKENDS, reason="the Triton backend runs on the CPU under TRITON_INTERPRET=1")
def test_triton_dedup_gradients_under_compile_equal_the_plain_path():
    layer = small_layer("triton", dedup=True).train()
    reference_layer = small_layer("reference").train()
    reference_layer.load_state_dict(layer.state_dict())
    ids = repeated_ids()
    grads = []
    for module in (torch.compile(layer, fullgraph=True), reference_layer):
        out = module(ids)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape))
        grads.append(out.detach())
    assert max_err(grads[0], grads[1]) < 1e-12
    for (name, p), q in zip(layer.named_parameters(), reference_layer.parameters(), strict=True):
        assert max_err(p.grad, q.grad) < 1e-10, name
