"""Autograd for the two op families, shared by every compiled backend (C++/CUDA and Triton).

Each backend registers its own forward and backward ops; what autograd saves and how the backward
op's outputs map onto the inputs' gradients is the same for all of them, so it lives here once.

Second derivatives: the backward kernels have none of their own. Where a backward must itself be
differentiable (``create_graph=True``: Hessian-vector products, gradient penalties,
``torch.autograd.functional.hessian``), the backward recomputes its forward through the reference
ops and differentiates that with autograd, so the result is a graph like the reference's and
second-order terms are exact, at the reference's speed. A plain backward never takes this path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from . import reference


def hgt_step_autograd(backward_op: Callable[..., Any], trailing_tensors: int = 0) -> tuple[Callable, Callable]:
    """(setup_context, backward) for an op with the inputs (x, weight, bias, norm_weight,
    norm_bias, seed, *params, *trailing) and the outputs (out, saved, mean, rstd).

    ``backward_op`` takes (grad_out, x, weight, bias, norm_weight, norm_bias, seed, saved, mean,
    rstd, *params, *trailing) and returns (grad_x, grad_weight, grad_bias, grad_gamma, grad_beta).
    ``trailing_tensors`` optional tensor inputs after the plain parameters (Triton's row count)
    are saved for the backward, never differentiated.
    """

    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, norm_weight, norm_bias, seed, *rest = inputs
        split = len(rest) - trailing_tensors
        _, saved, mean, rstd = output
        ctx.save_for_backward(x, weight, bias, norm_weight, norm_bias, seed, saved, mean, rstd, *rest[split:])
        ctx.params = rest[:split]
        ctx.mark_non_differentiable(saved, mean, rstd)
        # The saved/stats outputs never get gradients: do not let autograd zero-fill [T, b]
        # tensors for them on every backward.
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_out: Tensor | None, _saved, _mean, _rstd):
        x, weight, bias, norm_weight, norm_bias, seed, saved, mean, rstd, *trailing = ctx.saved_tensors
        not_differentiable = [None] * (1 + len(ctx.params) + len(trailing))  # seed, params, trailing
        if grad_out is None:  # the output was not used
            return (None,) * 5 + tuple(not_differentiable)
        if torch.is_grad_enabled():  # create_graph=True: through the reference ops (module docstring)
            out = reference_step(x, weight, bias, norm_weight, norm_bias, seed, ctx.params, *trailing)
            grads = differentiable_grads(out, (x, weight, bias, norm_weight, norm_bias), grad_out)
            return (*grads, *not_differentiable)
        grad_x, grad_weight, grad_bias, grad_gamma, grad_beta = backward_op(
            grad_out, x, weight, bias, norm_weight, norm_bias, seed, saved, mean, rstd, *ctx.params, *trailing
        )
        norm = norm_weight is not None
        return (
            grad_x,
            grad_weight,
            grad_bias if bias is not None else None,
            grad_gamma if norm else None,
            grad_beta if norm else None,
            *not_differentiable,
        )

    return setup_context, backward


def embedding_autograd(backward_op: Callable[..., Tensor]) -> tuple[Callable, Callable]:
    """(setup_context, backward) for a lookup op (weight, ids, padding_idx, scale) → e, whose
    ``backward_op(grad, ids, num_embeddings, padding_idx, scale)`` returns the table's gradient."""

    def setup_context(ctx, inputs, output) -> None:
        weight, ids, padding_idx, scale = inputs
        ctx.save_for_backward(ids)
        ctx.num_embeddings = weight.shape[0]
        ctx.padding_idx = padding_idx
        ctx.scale = scale

    def backward(ctx, grad: Tensor):
        (ids,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a gradient that is differentiable in `grad`
            return lookup_grad_ref(grad, ids, ctx.num_embeddings, ctx.padding_idx, ctx.scale), None, None, None
        return backward_op(grad, ids, ctx.num_embeddings, ctx.padding_idx, ctx.scale), None, None, None

    return setup_context, backward


# ------------------------------------------------------------------ differentiable backwards
def differentiable_grads(out: Tensor, inputs: Sequence[Tensor | None], grad: Tensor) -> list[Tensor | None]:
    """The gradients of ``out`` (recomputed through reference ops) for ``inputs``, weighted by ``grad``,
    as a graph of their own (``create_graph``): None for the inputs that need none."""
    chosen = [i for i, t in enumerate(inputs) if t is not None and t.requires_grad]
    found = torch.autograd.grad(out, [inputs[i] for i in chosen], grad, create_graph=True, allow_unused=True)
    grads: list[Tensor | None] = [None] * len(inputs)
    for i, g in zip(chosen, found, strict=True):
        grads[i] = g
    return grads


def reference_step(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    seed: Tensor | None,
    params: Sequence[Any],
    row_count: Tensor | None = None,
) -> Tensor:
    """``hgt_step``'s output [T, b(+n)] through the reference ops, differentiable; ``params`` in
    schema order (e_width, e_in_chunks, e_out_chunks, shuffle, activation, dropout_p, norm_eps).
    Rows past ``row_count`` (Triton's dedup padding) are no rows of the op: zeros here, so that they
    take no part in any gradient."""
    e_width, e_in_chunks, e_out_chunks, shuffle, activation, dropout_p, norm_eps = params
    if row_count is not None:
        x = zero_rows_past(x, row_count)
    return reference.hgt_step_ref(
        x, weight, bias, norm_weight, norm_bias, seed if dropout_p > 0 else None, e_width=e_width,
        e_in_chunks=e_in_chunks, e_out_chunks=e_out_chunks, shuffle=shuffle, activation=activation,
        dropout_p=dropout_p, norm_eps=norm_eps,
    )  # fmt: skip


def zero_rows_past(x: Tensor, row_count: Tensor) -> Tensor:
    """x [T, w] with its rows from ``row_count`` (a device scalar: Triton's dedup count) on set to 0:
    padding rows that hold whatever the kernels left there, kept out of every later sum."""
    return torch.where((torch.arange(x.shape[0], device=x.device) < row_count)[:, None], x, 0)


def reference_lookup(table: Tensor, ids: Tensor, padding_idx: int | None, scale: float) -> Tensor:
    """The lookup op's output [T, n] through the reference, differentiable. An id outside [0, V)
    gets a NaN row, as the kernels give it (the reference would raise, or assert on a GPU)."""
    in_range = (ids >= 0) & (ids < table.shape[0])
    rows = reference.lookup_ref(table, torch.where(in_range, ids, 0), padding_idx, scale)
    return torch.where(in_range[:, None], rows, torch.nan)


def lookup_grad_ref(grad: Tensor, ids: Tensor, num_embeddings: int, padding_idx: int | None, scale: float) -> Tensor:
    """The table gradient [V, n] of e = table[ids] · scale for ``grad`` [T, n], as differentiable
    torch ops (it is linear in ``grad``). The padding id and ids outside [0, V) get none, as in the
    kernels."""
    ids = ids.reshape(-1).long()
    padding = reference.normalized_padding_idx(padding_idx, num_embeddings)
    keep = (ids >= 0) & (ids < num_embeddings)
    if padding is not None:
        keep = keep & (ids != padding)
    rows = torch.where(keep[:, None], grad.reshape(ids.shape[0], -1) * scale, 0)
    return grad.new_zeros(num_embeddings, rows.shape[1]).index_add(0, torch.where(keep, ids, 0), rows)
