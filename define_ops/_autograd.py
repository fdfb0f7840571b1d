"""Autograd for the two op families, shared by every compiled backend (C++/CUDA and Triton).

Each backend registers its own forward and backward ops; what autograd saves and how the backward
op's outputs map onto the inputs' gradients is the same for all of them, so it lives here once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor
from torch.autograd.function import once_differentiable


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

    @once_differentiable  # the backward ops have no derivative: a double backward raises, never a silent zero
    def backward(ctx, grad_out: Tensor | None, _saved, _mean, _rstd):
        x, weight, bias, norm_weight, norm_bias, seed, saved, mean, rstd, *trailing = ctx.saved_tensors
        not_differentiable = [None] * (1 + len(ctx.params) + len(trailing))  # seed, params, trailing
        if grad_out is None:  # the output was not used
            return (None,) * 5 + tuple(not_differentiable)
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

    @once_differentiable
    def backward(ctx, grad: Tensor):
        (ids,) = ctx.saved_tensors
        return backward_op(grad, ids, ctx.num_embeddings, ctx.padding_idx, ctx.scale), None, None, None

    return setup_context, backward
