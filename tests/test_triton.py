"""Triton-only checks: multi-tile paths, layouts and registrations the shared backend tests miss.

Under the interpreter the kernels run with large blocks (one tile per test-sized problem), so
these tests shrink the blocks to exercise K loops, column and token tiles, masks at ragged
edges, the row-wise LayerNorm path and the split dW reduction.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import define_ops
from define_ops import reference

from .conftest import max_err
from .test_ops import make_step_inputs, run_step

pytestmark = pytest.mark.skipif(
    "triton" not in define_ops.available_backends("cpu"), reason="Triton backend not available here"
)


def _modules():
    # define_ops.triton re-exports functions under its submodules' names: import the modules.
    return importlib.import_module("define_ops.triton.hgt_step"), importlib.import_module("define_ops.triton.embedding")


@pytest.fixture
def small_blocks(monkeypatch):
    step, embedding = _modules()
    monkeypatch.setattr(step, "INTERPRET_MAX_BLOCK", {"T": 16, "N": 16, "K": 16})
    monkeypatch.setattr(step, "FUSED_NORM_MAX", 64)  # s = 100 takes the row-wise epilogue, s = 40 stays fused
    monkeypatch.setattr(step, "DW_SPLITS_INTERPRET", 3)
    monkeypatch.setattr(embedding, "INTERPRET_BLOCK_IDS", 16)
    monkeypatch.setattr(embedding, "INTERPRET_MAX_BLOCK_N", 16)


# (n, a, groups, b, e_in_chunks, e_out_chunks): group widths that are no multiple of any block.
AWKWARD = {
    "three-groups": (24, 120, 3, 120, 3, 3),  # a/g = s = 40: three K and N tiles of 16
    "five-groups-first": (20, 20, 5, 45, 1, 5),  # x = e, s = 9
    "dense-wide": (8, 72, 1, 100, 1, 1),  # s = 100 > FUSED_NORM_MAX: row-wise norm
    "no-skip": (0, 66, 2, 34, 0, 0),
}
OPTIONS = [
    (True, True, "gelu", 0.3, True),
    (True, False, "relu", 0.2, True),
    (False, True, "swish", 0.0, False),
    (False, False, None, 0.0, True),
]


def _inputs(layout, options, tokens, dtype=torch.float64):
    return make_step_inputs(layout, options, tokens, dtype, seed=2**40 + 12345)


def _assert_step_matches(tensors, params, tol=1e-10):
    out_ref, grads_ref = run_step("reference", tensors, params)
    out, grads = run_step("triton", tensors, params)
    assert out.shape == out_ref.shape
    assert max_err(out, out_ref) <= tol
    for name, g_ref in grads_ref.items():
        assert max_err(grads[name], g_ref) <= tol, name


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(str(v) for v in o))
@pytest.mark.parametrize("layout", list(AWKWARD))
def test_multi_tile_float64_matches_reference(small_blocks, layout, options):
    tensors, params = _inputs(AWKWARD[layout], options, 37)
    _assert_step_matches(tensors, params)


# every epilogue (dropout + shuffle + norm) and none (the Reduce layer's plain GEMM path)
@pytest.mark.parametrize("options", [OPTIONS[0], OPTIONS[3]], ids=lambda o: "-".join(str(v) for v in o))
@pytest.mark.parametrize("layout", list(AWKWARD))
@pytest.mark.parametrize("count", [1, 23, 37])
def test_row_count_computes_exactly_the_leading_rows(small_blocks, layout, options, count):
    # Dedup pads the distinct ids to the batch size and passes their count on the device: the
    # first `count` rows must be what a `count`-row call gives (dropout masks included: they key on
    # the row), the padding rows must send no gradient back, and no host sync is involved.
    tokens = 37
    tensors, params = _inputs(AWKWARD[layout], options, tokens)

    def step(rows, row_count):
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in tensors.items() if v is not None}
        args = {k: leaves.get(k) for k in tensors}
        args["x"] = args["x"][:rows]
        out = define_ops.hgt_step(**args, **params, backend="triton", row_count=row_count)
        grad = torch.randn(tokens, out.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        grad[count:] = 0  # what index_select's backward hands the padding rows
        out.backward(grad[:rows])
        return out.detach(), {k: v.grad for k, v in leaves.items()}

    out_k, grads_k = step(count, None)
    out, grads = step(tokens, torch.tensor([count], dtype=torch.int64))
    assert max_err(out[:count], out_k) <= 1e-12
    assert (out[count:] == 0).all() and (grads["x"][count:] == 0).all()
    for name, g_k in grads_k.items():
        assert max_err(grads[name], g_k) <= 1e-10, name


def test_row_count_is_validated():
    tensors, params = _inputs(AWKWARD["no-skip"], OPTIONS[3], 5)
    for bad in (torch.tensor([2], dtype=torch.int32), torch.tensor([1, 2])):
        with pytest.raises(ValueError, match="row_count must be a one-element int64 tensor"):
            define_ops.hgt_step(**tensors, **params, backend="triton", row_count=bad)


@pytest.mark.parametrize("tokens", [1, 16, 17])
def test_token_tile_edges(small_blocks, tokens):
    tensors, params = _inputs(AWKWARD["three-groups"], OPTIONS[0], tokens)
    _assert_step_matches(tensors, params)


def test_reduce_layer_transposed_weight_and_expanded_grad(small_blocks):
    """The Reduce layer passes nn.Linear's weight as weight.t().unsqueeze(0); its gradient keeps that
    layout. out.sum().backward() hands the op an expanded (stride 0) grad_out."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(21, 40, generator=gen, dtype=torch.float64)
    linear = torch.randn(30, 40, generator=gen, dtype=torch.float64)
    bias = torch.randn(30, generator=gen, dtype=torch.float64)
    results = []
    for backend in ("reference", "triton"):
        leaves = [t.clone().requires_grad_(True) for t in (x, linear, bias)]
        out = define_ops.hgt_step(
            leaves[0], leaves[1].t().unsqueeze(0), leaves[2], e_width=16, e_in_chunks=1, backend=backend
        )
        out.sum().backward()
        results.append((out.detach(), [t.grad for t in leaves]))
    (out_ref, grads_ref), (out, grads) = results
    assert max_err(out, out_ref) <= 1e-10
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert max_err(g, g_ref) <= 1e-10


@pytest.mark.parametrize("shuffle,groups,width", [(True, 4, 48), (False, 4, 48), (False, 3, 30)])
@pytest.mark.parametrize("seed", [987654321, 2**40 + 12345, 2**62 - 1])
def test_dropout_mask_is_the_reference_mask(seed, shuffle, groups, width):
    """Dropped elements (exact zeros) sit exactly where the reference's Philox mask drops them,
    across token tiles (300 rows), after the shuffle (one Philox call per element) and without it
    (one call per four features when group widths are multiples of 4, here 12 but not 10)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8 * groups, generator=gen)
    weight = torch.randn(groups, 8, width // groups, generator=gen)
    seed_t = torch.tensor(seed, dtype=torch.int64)
    kwargs = dict(e_width=0, e_in_chunks=0, e_out_chunks=0, shuffle=shuffle, dropout_p=0.35)
    out = define_ops.hgt_step(x, weight, None, None, None, seed_t, backend="triton", **kwargs)
    keep = reference.dropout_keep_mask(seed, 300, width, 0.35)
    assert torch.equal(out != 0, keep)
    out_ref = define_ops.hgt_step(x, weight, None, None, None, seed_t, backend="reference", **kwargs)
    torch.testing.assert_close(out, out_ref)


@pytest.mark.parametrize("sort", [False, True], ids=["sort-free", "sorted"])
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
def test_embedding_gradient_touched_rows_deterministic(small_blocks, ids_dtype, sort, monkeypatch):
    if sort:  # 200 ids: above the threshold, the backward sorts
        monkeypatch.setattr(importlib.import_module("define_ops.triton.embedding"), "SMALL_BATCH_TOKENS", 100)
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(50, 20, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, 12, (200,), generator=gen).to(ids_dtype)  # heavy repeats; rows 12.. untouched
    ids[::7] = 3
    grads = []
    for backend in ("reference", "triton", "triton"):
        w = weight.clone().requires_grad_(True)
        e = define_ops.embedding_lookup(w, ids, 3, 1.7, backend=backend)
        e.backward(torch.linspace(-1, 1, e.numel(), dtype=e.dtype).reshape(e.shape))
        grads.append(w.grad)
    ref, first, again = grads
    assert max_err(first, ref) <= 1e-12
    assert torch.equal(first, again)  # bitwise: fixed summation order
    assert (first[12:] == 0).all() and (first[3] == 0).all()


def test_embedding_out_of_range_ids_give_nan_rows_and_no_gradient():
    # same contract as the CUDA lookup: no out-of-bounds access, and the error cannot pass silently
    weight = torch.randn(10, 8)
    ids = torch.tensor([1, 10, -1, 2, 0])
    e = torch.ops.define_ops.embedding_lookup_triton(weight, ids, 0, 1.0)
    assert torch.equal(e[0], weight[1]) and torch.equal(e[3], weight[2])
    assert e[1].isnan().all() and e[2].isnan().all()
    assert (e[4] == 0).all()  # the padding id
    g = torch.ops.define_ops.embedding_lookup_triton_backward(torch.ones(5, 8), ids, 10, 0, 1.0)
    assert g.sum().item() == 16.0 and (g[1] == 1).all() and (g[2] == 1).all()


def test_bfloat16_runs_in_the_interpreter():
    """bf16 tl.dot is wrong in the interpreter; the kernels upcast the operands there."""
    tensors, params = _inputs(AWKWARD["three-groups"], OPTIONS[0], 19)
    low = {k: v.to(torch.bfloat16) if v is not None else None for k, v in tensors.items()}
    out_ref, _ = run_step("reference", tensors, params)
    out, grads = run_step("triton", low, params)
    assert max_err(out, out_ref) < 0.1
    assert all(torch.isfinite(g.float()).all() for g in grads.values())


def _opcheck_args(layout, options, tokens):
    tensors, params = _inputs(AWKWARD[layout], options, tokens, torch.float32)
    return (
        tensors["x"], tensors["weight"], tensors["bias"], tensors["norm_weight"], tensors["norm_bias"],
        params["seed"], params["e_width"], params["e_in_chunks"], params["e_out_chunks"], params["shuffle"],
        params["activation"] or "none", float(params["dropout_p"]), 1e-5,
    )  # fmt: skip


@pytest.mark.parametrize(
    "sample",
    [("three-groups", OPTIONS[0], 6), ("five-groups-first", OPTIONS[2], 1), ("no-skip", OPTIONS[3], 0),
     ("three-groups", OPTIONS[0], 7, 4), ("dense-wide", OPTIONS[2], 5, 2)],
)  # fmt: skip
def test_opcheck_triton_ops(sample):
    step, _ = _modules()
    args = _opcheck_args(*sample[:3])
    if len(sample) > 3:  # dedup's device-side row count
        args = (*args, torch.tensor([sample[3]], dtype=torch.int64))
    grad_args = tuple(a.clone().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                      for a in args)  # fmt: skip
    torch.library.opcheck(step.hgt_step_op, grad_args)
    out, saved, mean, rstd = step.hgt_step_op(*args)
    backward_args = (torch.randn_like(out), *args[:6], saved, mean, rstd, *args[6:])
    torch.library.opcheck(step.hgt_step_backward_op, backward_args)


def test_opcheck_triton_embedding():
    _, embedding = _modules()
    weight = torch.randn(10, 8, requires_grad=True)
    ids = torch.tensor([1, 2, 9, 2, 0])
    torch.library.opcheck(embedding.embedding_lookup_op, (weight, ids, 2, 1.5))
    torch.library.opcheck(embedding.embedding_lookup_backward_op, (torch.randn(5, 8), ids, 10, 2, 1.5))


@pytest.mark.parametrize("run", [1, 7, 8, 9, 16, 17, 40])
@pytest.mark.parametrize("at_end", [False, True])
def test_embedding_sorted_gradient_runs_across_blocks(run, at_end, monkeypatch):
    # The sorted backward sums a run of equal ids 8 positions at a time (the interpreter's block):
    # runs shorter than, equal to and longer than a block, ending inside or at the end of the batch.
    monkeypatch.setattr(importlib.import_module("define_ops.triton.embedding"), "SMALL_BATCH_TOKENS", 0)
    gen = torch.Generator().manual_seed(run)
    weight = torch.randn(30, 12, generator=gen, dtype=torch.float64)
    others = torch.tensor([0, 5, 5, 2, 0, 9]) if not at_end else torch.tensor([0, 2, 0])
    ids = torch.cat([others, torch.full((run,), 29 if at_end else 4)])[torch.randperm(len(others) + run, generator=gen)]
    grads = []
    for backend in ("reference", "triton"):
        w = weight.clone().requires_grad_(True)
        e = define_ops.embedding_lookup(w, ids, None, 1.0, backend=backend)
        e.backward(torch.randn(e.shape, generator=torch.Generator().manual_seed(7), dtype=e.dtype))
        grads.append(w.grad)
    assert max_err(grads[1], grads[0]) <= 1e-12
