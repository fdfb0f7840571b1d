"""The whole HGT stack (every layer and the Reduce) as ONE autograd node over a backend's step ops.

Why: through ``torch.library.register_autograd`` each layer step costs ~0.2 ms of Python on the
host (measured on an H200 machine: benchmarks/results/h200-profile-bf16.log), 3-8x the GPU time
of the step at the presets, so the training step was host-bound. This Function calls the forward
and backward ops directly, one dispatch per layer and direction, and keeps what the backward
needs (each layer's input, saved pre-activation and LayerNorm statistics) on its one context.

Inside, the ops are called below the Autograd dispatch key (what torch's own custom-op autograd
does): the call goes straight to the backend kernel instead of through the ops' Python autograd
wrapper, which would only find that grad mode is off (~15 µs per call on a 2-core VM).

The per-step ops keep their own autograd (``ops.hgt_step``). Under ``torch.compile`` ``hgt_stack``
calls them one by one instead, through that autograd, which the compiler traces (a compiled graph
has no per-op Python to save).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .ops import _activation_name, _autocast

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


def _ops_for(backend: str) -> tuple[Callable[..., Any], Callable[..., Any], bool]:
    """(forward op, backward op, whether they take a trailing row_count) of a compiled backend."""
    if backend == "triton":
        from .triton.hgt_step import hgt_step_backward_op, hgt_step_op

        return hgt_step_op, hgt_step_backward_op, True
    return torch.ops.define_ops.hgt_step.default, torch.ops.define_ops.hgt_step_backward.default, False


class _HGTStack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend: str, specs: tuple[StepSpec, ...], row_count: Tensor | None, x: Tensor, *tensors: Tensor):
        # x [T, a0]; tensors: per step (weight [g, a/g, b/g], bias [b]?, norm_weight [b/g]?,
        # norm_bias [b/g]?, seed [1]?) → [T, width of the last step]
        forward_op, backward_op, takes_rows = _ops_for(backend)
        trailing = (row_count,) if takes_rows else ()
        inputs, saved, means, rstds = [], [], [], []
        with _below_autograd():
            for index, spec in enumerate(specs):
                out, pre_activation, mean, rstd = forward_op(x, *_step_tensors(tensors, index), *spec.args(), *trailing)
                inputs.append(x)
                saved.append(pre_activation)
                means.append(mean)
                rstds.append(rstd)
                x = out
        ctx.save_for_backward(*inputs, *saved, *means, *rstds, *tensors, *trailing)
        ctx.backward_op = backward_op
        ctx.specs = specs
        ctx.set_materialize_grads(False)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor | None):
        specs = ctx.specs
        steps = len(specs)
        stored = ctx.saved_tensors
        inputs, saved, means, rstds = (stored[k * steps : (k + 1) * steps] for k in range(4))
        tensors = stored[4 * steps : 4 * steps + steps * TENSORS_PER_STEP]
        trailing = stored[4 * steps + steps * TENSORS_PER_STEP :]
        grads: list[Tensor | None] = [None] * len(tensors)
        if grad is None:  # the output was not used
            return (None, None, None, None, *grads)
        with _below_autograd():
            for index in reversed(range(steps)):
                first = index * TENSORS_PER_STEP
                weight, bias, norm_weight, norm_bias, seed = _step_tensors(tensors, index)
                grad_x, grad_weight, grad_bias, grad_gamma, grad_beta = ctx.backward_op(
                    grad, inputs[index], weight, bias, norm_weight, norm_bias, seed, saved[index], means[index],
                    rstds[index], *specs[index].args(), *trailing,
                )  # fmt: skip
                grads[first] = grad_weight
                grads[first + 1] = grad_bias if bias is not None else None
                grads[first + 2] = grad_gamma if norm_weight is not None else None
                grads[first + 3] = grad_beta if norm_weight is not None else None
                grad = grad_x
        return (None, None, None, grad, *grads)


def hgt_stack(
    x: Tensor,
    steps: Sequence[tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None, StepSpec]],
    *,
    backend: str,
    row_count: Tensor | None = None,
) -> Tensor:
    """Run ``steps`` one after the other (each as ``ops.hgt_step`` with the same arguments) with
    one autograd node for all of them (under ``torch.compile``: each step's own autograd).

    Args:
        x: [T, a] the first step's input.
        steps: per step (weight [g, a/g, b/g], bias [b] or None, norm_weight [b/g] or None,
            norm_bias [b/g] or None, seed [1] int64 or None, StepSpec).
        backend: "cpu", "cuda" or "triton" (already resolved).
        row_count: as in ``ops.hgt_step`` (Triton only).
    Returns:
        [T, width of the last step's output].
    """
    if backend not in ("cpu", "cuda", "triton"):
        raise ValueError(f"define_ops.hgt_stack: backend must be a compiled backend, got {backend!r}")
    specs = tuple(spec for *_, spec in steps)
    tensors: list[Tensor | None] = []
    for weight, bias, norm_weight, norm_bias, seed, spec in steps:
        tensors += _autocast((weight, bias, norm_weight, norm_bias), x.device.type)
        tensors.append(seed if spec.dropout_p > 0 else None)
    (x,) = _autocast((x,), x.device.type)
    if torch.compiler.is_compiling():  # the step ops with their registered autograd, which compile traces
        forward_op, _, takes_rows = _ops_for(backend)
        trailing = (row_count,) if takes_rows else ()
        for index, spec in enumerate(specs):
            x = forward_op(x, *_step_tensors(tensors, index), *spec.args(), *trailing)[0]
        return x
    return _HGTStack.apply(backend, specs, row_count, x, *tensors)
