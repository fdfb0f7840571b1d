"""The whole HGT stack (every layer and the Reduce) as ONE autograd node over a backend's step ops.

Why: through ``torch.library.register_autograd`` each layer step costs ~0.2 ms of Python on the
host (measured on an H200 machine: benchmarks/results/h200-profile-bf16.log), 3-8x the GPU time
of the step at the presets, so the training step was host-bound. This Function calls the forward
and backward ops directly and keeps what the backward needs (each layer's input, saved
pre-activation and LayerNorm statistics) on its one context.

On the C++ backends (cpu, cuda) the whole loop is one op per direction, ``define_ops::hgt_stack``
and ``hgt_stack_backward`` (csrc/common/hgt_stack.h): one Python call and a handful of allocations
per direction instead of one call and ~5 allocations per layer. The Triton backend loops here over
its step ops. The table lookup can run inside the node too (``lookup``).
Either way the ops are called below the Autograd dispatch key (what torch's own
custom-op autograd does): the call goes straight to the backend kernel instead of through the ops'
Python autograd wrapper, which would only find that grad mode is off (~15 µs per call on a 2-core VM).

The per-step ops keep their own autograd (``ops.hgt_step``). Under ``torch.compile`` ``hgt_stack``
calls them one by one instead, through that autograd, which the compiler traces (a compiled graph
has no per-op Python to save).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import ops
from ._autograd import differentiable_grads, reference_lookup, reference_step, zero_rows_past
from .ops import _activation_name, _autocast, split_stack_grads

TENSORS_PER_STEP = 5  # weight, bias, norm_weight, norm_bias, seed
# The guard torch's custom-op autograd uses to run the kernel below it; a no-op where absent.
_below_autograd = getattr(torch._C, "_AutoDispatchBelowAutograd", contextlib.nullcontext)


@dataclass(frozen=True)
class StepSpec:
    """The non-tensor arguments of one step op, in schema order."""

    e_width: int
    e_in_chunks: int
    e_out_chunks: int
    shuffle: bool
    activation: str | None
    dropout_p: float
    norm_eps: float

    def __post_init__(self) -> None:  # the ops' own names; a clear error for an unknown one
        object.__setattr__(self, "activation", _activation_name(self.activation))

    def args(self) -> tuple:
        return (self.e_width, self.e_in_chunks, self.e_out_chunks, self.shuffle, self.activation,
                float(self.dropout_p), float(self.norm_eps))  # fmt: skip


def _step_tensors(tensors: Sequence[Tensor | None], index: int) -> Sequence[Tensor | None]:
    """Step ``index``'s (weight, bias, norm_weight, norm_bias, seed) out of the flat tensor list."""
    return tensors[index * TENSORS_PER_STEP : (index + 1) * TENSORS_PER_STEP]


def _uses_stack_op(backend: str) -> bool:
    """Whether the eager path runs the C++ stack ops (cpu, cuda) or loops over the step ops here
    (triton; or any backend with DEFINE_OPS_STACK_OP=0, for measuring one against the other)."""
    return backend != "triton" and os.environ.get("DEFINE_OPS_STACK_OP", "1") != "0"


def _ops_for(backend: str) -> tuple[Callable[..., Any], Callable[..., Any], bool]:
    """(forward op, backward op, whether they take a trailing row_count) of a compiled backend:
    the registered ops, with their autograd, which torch.compile traces."""
    if backend == "triton":
        from .triton.hgt_step import hgt_step_backward_op, hgt_step_op

        return hgt_step_op, hgt_step_backward_op, True
    return torch.ops.define_ops.hgt_step.default, torch.ops.define_ops.hgt_step_backward.default, False


@dataclass(frozen=True)
class _EagerOps:
    """What the eager node calls, each below autograd, inside ``context()``. For Triton these are
    the ops' implementations themselves: a registered Triton op's Python wrapper (alias checks, a
    dynamo-disable frame) cost ~40 µs a call on a 2-core VM, more than our own launcher code. Like
    that wrapper, the context turns wrap_triton's higher-order-op dispatch off (torch documents it
    at ~1 ms a launch in eager mode); where torch has no such switch the registered ops are used."""

    lookup: Callable[..., Tensor]  # (table, ids, padding_idx, scale) → e
    lookup_backward: Callable[..., Tensor]  # (grad_e, ids, num_embeddings, padding_idx, scale) → table grad
    step: Callable[..., tuple]
    step_backward: Callable[..., tuple]
    takes_rows: bool
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def _triton_direct_launch_context() -> Callable[[], contextlib.AbstractContextManager] | None:
    try:
        from torch._library.triton import set_wrap_triton_enabled
    except ImportError:
        return None
    return functools.partial(set_wrap_triton_enabled, False)


@functools.cache
def _eager_ops(backend: str) -> _EagerOps:
    if backend == "triton":
        from .triton.embedding import (
            _lookup_backward_impl,
            _lookup_impl,
            embedding_lookup_backward_op,
            embedding_lookup_op,
        )
        from .triton.hgt_step import _hgt_step_backward_impl, _hgt_step_impl, hgt_step_backward_op, hgt_step_op

        context = _triton_direct_launch_context()
        if context is None:
            return _EagerOps(embedding_lookup_op, embedding_lookup_backward_op, hgt_step_op, hgt_step_backward_op, True)
        return _EagerOps(_lookup_impl, _lookup_backward_impl, _hgt_step_impl, _hgt_step_backward_impl, True, context)
    ops_ = torch.ops.define_ops
    return _EagerOps(ops_.embedding_lookup.default, ops_.embedding_lookup_backward.default, ops_.hgt_step.default,
                     ops_.hgt_step_backward.default, False)  # fmt: skip


def _spec_lists(specs: tuple[StepSpec, ...]) -> tuple[list, ...]:
    """The stack ops' per-step argument lists (e_widths, e_in_chunks, e_out_chunks, shuffles,
    activations, dropout_ps, norm_eps), built once per spec tuple. Looked up by identity (the layer
    passes the same cached tuple on every call; hashing its dataclasses cost ~8 µs a step)."""
    entry = _SPEC_LISTS.get(id(specs))
    if entry is not None and entry[0] is specs:
        return entry[1]
    if len(_SPEC_LISTS) >= 256:  # tuples built per call (not DeFINE's way): stay bounded
        _SPEC_LISTS.clear()
    lists = tuple(list(column) for column in zip(*(spec.args() for spec in specs), strict=True))
    _SPEC_LISTS[id(specs)] = (specs, lists)  # holding `specs` keeps its id from being reused
    return lists


_SPEC_LISTS: dict[int, tuple[tuple[StepSpec, ...], tuple[list, ...]]] = {}


def _columns(tensors: Sequence[Tensor | None]) -> list[list[Tensor | None]]:
    """The flat per-step tensors as the stack ops' (weights, biases, norm_weights, norm_biases, seeds)."""
    return [list(tensors[k::TENSORS_PER_STEP]) for k in range(TENSORS_PER_STEP)]


# _HGTStack.forward's leading non-tensor arguments; x, table and the step tensors follow them.
_NODE_OPTIONS = 7
_TABLE_INPUT = _NODE_OPTIONS + 1  # table's position among the forward's inputs (needs_input_grad)


class _HGTStack(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, backend: str, stack_op: bool, specs: tuple[StepSpec, ...], row_count: Tensor | None,
        lookup: _Lookup | None, expand: Tensor | None, compute_dtype: torch.dtype | None, x: Tensor,
        table: Tensor | None, *tensors: Tensor,
    ):  # fmt: skip
        # x [T, a0], or with `lookup` the ids [T] of the rows of table [V, n] that make it (the
        # lookup then runs inside this node too); tensors: per step (weight [g, a/g, b/g], bias [b]?,
        # norm_weight [b/g]?, norm_bias [b/g]?, seed [1]?) → [T, width of the last step], or with
        # `expand` (int64 [T']) its rows gathered by it: [T', width] (dedup's expansion). With
        # `compute_dtype` (autocast's) the parameters are cast to it here, in one copy, and their
        # gradients back to the parameters' dtype in one copy too.
        ctx.backend, ctx.stack_op, ctx.specs, ctx.lookup = backend, stack_op, specs, lookup
        ctx.compute_dtype = compute_dtype
        ctx.set_materialize_grads(False)
        eager = _eager_ops(backend)
        ids = x if lookup is not None else None
        ctx.grad_dtype = None
        # The inputs as given, kept beside their autocast copies (which the kernels' backward reads)
        # for a backward that must be differentiable (_reference_backward); () where nothing was cast.
        originals = ()
        with _below_autograd(), eager.context():
            if compute_dtype is not None:
                floating = [t for t in tensors if t is not None and t.is_floating_point()]
                if floating and floating[0].dtype != compute_dtype:
                    ctx.grad_dtype = floating[0].dtype
                    originals = tensors
                tensors = _cast_together(tensors, compute_dtype)
            if lookup is not None:  # cast to the autocast dtype of the stack, if any
                x = eager.lookup(table, ids, lookup.padding_idx, lookup.scale).to(lookup.dtype)
            if ctx.stack_op:  # one C++ op for the whole stack; values/stats: what its backward reads
                out, values, stats = torch.ops.define_ops.hgt_stack.default(
                    x, *_columns(tensors), *_spec_lists(specs), True
                )
                ctx.save_for_backward(ids, table, expand, x, values, stats, *tensors, None, *originals)
                return _expand_rows(eager, out, expand)
            trailing = (row_count,) if eager.takes_rows else ()
            inputs, saved, means, rstds = [], [], [], []
            for index, spec in enumerate(specs):
                out, pre_activation, mean, rstd = eager.step(x, *_step_tensors(tensors, index), *spec.args(), *trailing)
                inputs.append(x)
                saved.append(pre_activation)
                means.append(mean)
                rstds.append(rstd)
                x = out
            x = _expand_rows(eager, x, expand)
        ctx.save_for_backward(ids, table, expand, *inputs, *saved, *means, *rstds, *tensors, row_count, *originals)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor | None):
        specs = ctx.specs
        steps = len(specs)
        ids, table, expand, *stored = ctx.saved_tensors
        grads: list[Tensor | None] = [None] * (steps * TENSORS_PER_STEP)
        if grad is None:  # the output was not used
            return (*[None] * (_NODE_OPTIONS + 2), *grads)
        if torch.is_grad_enabled():  # create_graph=True: the backward must be differentiable itself
            return _reference_backward(ctx, grad, ids, table, expand, stored)
        eager = _eager_ops(ctx.backend)
        with _below_autograd(), eager.context():
            if expand is not None:  # each distinct row's gradient: its tokens' gradients summed in order
                rows = (ids if ids is not None else stored[0]).shape[0]
                grad = eager.lookup_backward(grad, expand, rows, None, 1.0)
            if ctx.stack_op:
                x, values, stats, *tensors = stored[: 3 + steps * TENSORS_PER_STEP]
                columns = _columns(tensors)
                grad, flat = torch.ops.define_ops.hgt_stack_backward.default(
                    grad, x, values, stats, *columns, *_spec_lists(specs)
                )
                if ctx.grad_dtype is not None:  # back to the parameters' dtype, all in one copy
                    flat = flat.to(ctx.grad_dtype)
                for k, per_step in enumerate(split_stack_grads(flat, *columns[:3])):
                    grads[k::TENSORS_PER_STEP] = per_step
            else:
                inputs, saved, means, rstds = (stored[k * steps : (k + 1) * steps] for k in range(4))
                tensors = stored[4 * steps : 4 * steps + steps * TENSORS_PER_STEP]
                trailing = (stored[4 * steps + steps * TENSORS_PER_STEP],) if eager.takes_rows else ()
                for index in reversed(range(steps)):
                    first = index * TENSORS_PER_STEP
                    weight, bias, norm_weight, norm_bias, seed = _step_tensors(tensors, index)
                    grad_x, grad_weight, grad_bias, grad_gamma, grad_beta = eager.step_backward(
                        grad, inputs[index], weight, bias, norm_weight, norm_bias, seed, saved[index], means[index],
                        rstds[index], *specs[index].args(), *trailing,
                    )  # fmt: skip
                    grads[first] = grad_weight
                    grads[first + 1] = grad_bias if bias is not None else None
                    grads[first + 2] = grad_gamma if norm_weight is not None else None
                    grads[first + 3] = grad_beta if norm_weight is not None else None
                    grad = grad_x
                if ctx.grad_dtype is not None:  # back to the parameters' dtype, in one copy
                    grads = _cast_together(grads, ctx.grad_dtype)
            lookup = ctx.lookup
            if lookup is None:
                return (*[None] * _NODE_OPTIONS, grad, None, *grads)
            grad_table = None
            if ctx.needs_input_grad[_TABLE_INPUT]:
                grad_table = eager.lookup_backward(
                    grad.to(table.dtype), ids, table.shape[0], lookup.padding_idx, lookup.scale
                )
        return (*[None] * (_NODE_OPTIONS + 1), grad_table, *grads)


def _reference_backward(
    ctx, grad: Tensor, ids: Tensor | None, table: Tensor | None, expand: Tensor | None, stored: Sequence[Tensor | None]
) -> tuple:
    """_HGTStack's gradients as a graph of their own (``create_graph=True``: Hessian-vector
    products, gradient penalties): its forward again through the reference ops, from the node's
    own inputs, differentiated by autograd (see _autograd.py). Same values as the kernels' backward
    up to rounding, at the reference's speed; dropout masks are the kernels' (same Philox seeds)."""
    steps = len(ctx.specs)
    per_step = steps * TENSORS_PER_STEP
    # saved after (ids, table, expand): stack op: x, values, stats, tensors, None, originals;
    # step loop: 4 lists of `steps` (inputs, pre-activations, means, rstds), tensors, row_count, originals
    start = 3 if ctx.stack_op else 4 * steps
    row_count = stored[start + per_step]
    given = stored[start + per_step + 1 :] or stored[start : start + per_step]  # step tensors as the node got them
    step_tensors = given
    if ctx.compute_dtype is not None:  # autocast's copies, made differentiably this time
        step_tensors = [t.to(ctx.compute_dtype) if t is not None and t.is_floating_point() else t for t in given]
    if ctx.lookup is not None:
        x = reference_lookup(table, ids, ctx.lookup.padding_idx, ctx.lookup.scale).to(ctx.lookup.dtype)
    else:
        x = stored[0]  # the node's x input
    out = x if row_count is None else zero_rows_past(x, row_count)  # rows past the distinct count are no rows
    for index, spec in enumerate(ctx.specs):
        out = reference_step(out, *_step_tensors(step_tensors, index), spec.args())
    if expand is not None:
        out = out.index_select(0, expand)
    inputs = [None if ctx.lookup is not None else stored[0], table, *given]
    return (*[None] * _NODE_OPTIONS, *differentiable_grads(out, inputs, grad))


def gather_rows(table: Tensor, ids: Tensor, backend: str) -> Tensor:
    """table [V, m] → its rows of ids [T] → [T, m] through the backend's lookup op, below autograd:
    no gradient (the eval-mode table), and a NaN row for an out-of-range id. What ``F.embedding``
    costs on the host (~4 µs on a 2-core VM), where the autograd-registered op costs ~16 µs."""
    eager = _eager_ops(backend)
    with _below_autograd(), eager.context():
        return eager.lookup(table, ids, None, 1.0)


def _expand_rows(eager: _EagerOps, rows: Tensor, expand: Tensor | None) -> Tensor:
    """rows [U, m] gathered by ``expand`` [T] → [T, m] (rows itself without ``expand``)."""
    return rows if expand is None else eager.lookup(rows, expand, None, 1.0)


@dataclass(frozen=True)
class _Lookup:
    """The Map step folded into the stack's node: e = table[ids] · scale, cast to ``dtype``."""

    padding_idx: int | None
    scale: float
    dtype: torch.dtype


def _specs_and_tensors(
    steps: Sequence[tuple], device_type: str, cast: bool = True
) -> tuple[tuple[StepSpec, ...], list[Tensor | None]]:
    """``hgt_stack``'s steps as (their StepSpecs, their tensors flat: per step weight, bias, γ, β —
    in the autocast dtype if any, unless ``cast`` is False — and the seed where the step drops out,
    else None)."""
    tensors: list[Tensor | None] = []
    for weight, bias, norm_weight, norm_bias, seed, spec in steps:
        parameters = (weight, bias, norm_weight, norm_bias)
        tensors += _autocast(parameters, device_type) if cast else parameters
        tensors.append(seed if spec.dropout_p > 0 else None)
    return tuple(spec for *_, spec in steps), tensors


def _cast_together(tensors: Sequence[Tensor | None], dtype: torch.dtype) -> list[Tensor | None]:
    """``tensors`` with every floating one not yet in ``dtype`` cast to it, all in one copy: a
    concatenation and one conversion (two launches on a GPU, where one cast per tensor was ~30
    launches and 30 autograd nodes each way per training step under autocast), as contiguous views
    of the one buffer. The stack's autograd node casts the parameters with it, and the step loop's
    gradients back (the stack op's come back in one buffer, cast whole)."""
    chosen = [i for i, t in enumerate(tensors) if t is not None and t.is_floating_point() and t.dtype != dtype]
    out = list(tensors)
    if len(chosen) < 2:
        for i in chosen:
            out[i] = tensors[i].to(dtype)
        return out
    originals = [tensors[i] for i in chosen]
    # torch's own bucket (un)flattening (DDP's): one C++ call each way instead of ~60 Python-level views
    flat = torch._utils._flatten_dense_tensors(originals).to(dtype)
    for i, piece in zip(chosen, torch._utils._unflatten_dense_tensors(flat, originals), strict=True):
        out[i] = piece
    return out


def hgt_stack(
    x: Tensor | None,
    steps: Sequence[tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None, StepSpec]],
    *,
    backend: str,
    row_count: Tensor | None = None,
    lookup: tuple[Tensor, Tensor, int | None, float] | None = None,
    expand: Tensor | None = None,
) -> Tensor:
    """Run ``steps`` one after the other (each as ``ops.hgt_step`` with the same arguments) with
    one autograd node for all of them (under ``torch.compile``: each step's own autograd).

    Args:
        x: [T, a] the first step's input, or None with ``lookup``.
        lookup: (table [V, n], ids [T], padding_idx, scale): x = ``ops.embedding_lookup`` of them,
            run inside the same autograd node in eager mode (one node and no Python autograd
            wrapper for the Map step: on the GPU host every node and wrapper is time).
        steps: per step (weight [g, a/g, b/g], bias [b] or None, norm_weight [b/g] or None,
            norm_bias [b/g] or None, seed [1] int64 or None, StepSpec).
        backend: "cpu", "cuda" or "triton" (already resolved).
        row_count: as in ``ops.hgt_step`` (Triton only).
        expand: [T'] int64 row indices (dedup's inverse): the output rows gathered by them, also
            inside the node (``ops.embedding_lookup`` of the rows, whose backward sums each
            row's gradients in a fixed order).
    Returns:
        [T, width of the last step's output], or [T', width] with ``expand``.
    """
    if backend not in ("cpu", "cuda", "triton"):
        raise ValueError(f"define_ops.hgt_stack: backend must be a compiled backend, got {backend!r}")
    device_type = (x if lookup is None else lookup[0]).device.type
    compiling = torch.compiler.is_compiling()
    # Eager: the parameters reach the node in their own dtype and it casts them for autocast in one
    # copy; torch.compile gets one cast per tensor, which it fuses.
    specs, tensors = _specs_and_tensors(steps, device_type, cast=compiling)
    compute_dtype = None
    if not compiling and torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    fold = None  # the lookup inside the node (eager), or x made here by the registered op (compile)
    if lookup is not None:
        table, ids, padding_idx, scale = lookup
        if row_count is not None:
            # dedup's padding rows (past the distinct count) all repeat one id: as ids they would
            # make one run of thousands of zero rows that a single program of the table gradient
            # sums in turn. As out-of-range ids they get no gradient and no work; their NaN rows
            # of e are never read (every step stops at the count).
            ids = torch.where(torch.arange(ids.shape[0], device=ids.device) < row_count, ids, -1)
        if compiling:
            x = ops.embedding_lookup(table, ids, padding_idx, scale, backend=backend)
        else:  # e in the autocast dtype, as _autocast would cast an e made outside
            autocast = torch.is_autocast_enabled(device_type)
            dtype = torch.get_autocast_dtype(device_type) if autocast else table.dtype
            fold = _Lookup(padding_idx, float(scale), dtype)
    if fold is None:
        (x,) = _autocast((x,), device_type)
    if compiling:  # the step ops with their registered autograd, which compile traces
        forward_op, _, takes_rows = _ops_for(backend)
        trailing = (row_count,) if takes_rows else ()
        for index, spec in enumerate(specs):
            x = forward_op(x, *_step_tensors(tensors, index), *spec.args(), *trailing)[0]
        return x if expand is None else ops.embedding_lookup(x, expand, None, 1.0, backend=backend)
    stack_op = _uses_stack_op(backend)
    leaves = (table if fold is not None else x, *tensors)
    if stack_op and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in leaves)):
        # inference: no autograd node, and each step's memory is freed as soon as the next has read it
        eager = _eager_ops(backend)
        with _below_autograd():
            if compute_dtype is not None:
                tensors = _cast_together(tensors, compute_dtype)
            if fold is not None:
                x = eager.lookup(table, ids, padding_idx, fold.scale).to(fold.dtype)
            rows = torch.ops.define_ops.hgt_stack.default(x, *_columns(tensors), *_spec_lists(specs), False)[0]
            return _expand_rows(eager, rows, expand)
    if fold is not None:
        return _HGTStack.apply(backend, stack_op, specs, row_count, fold, expand, compute_dtype, ids, table, *tensors)
    return _HGTStack.apply(backend, stack_op, specs, row_count, None, expand, compute_dtype, x, None, *tensors)
