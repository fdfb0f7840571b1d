"""The op registry: Python signatures, fake (meta) kernels, autograd, and backend dispatch.

The C++ ops (schemas in csrc/define_ops.cpp) are:

- ``define_ops::embedding_lookup(weight, ids, padding_idx, scale) -> e`` and its backward;
- ``define_ops::hgt_step(x, weight, bias, norm_weight, norm_bias, seed, e_width, e_in_chunks,
  e_out_chunks, shuffle, activation, dropout_p, norm_eps) -> (out, saved, mean, rstd)`` — one
  whole HGT layer (grouped GEMM, bias, shuffle, per-group LayerNorm, activation, dropout), its
  output written straight into the layout the next layer reads — and its backward;
- ``define_ops::hgt_stack(x, <per-step lists of hgt_step's arguments>, keep_for_backward) -> (out,
  values, stats)`` and ``hgt_stack_backward(grad_out, x, values, stats, ...) -> (grad_x, grads)``:
  every step of a stack in one call per direction (csrc/common/hgt_stack.h), what DeFINE's eager
  node runs (stack.py); ``split_stack_grads`` cuts ``grads`` into per-parameter views.

This module is the only place that knows how to call the single-step ops; ``layer.py`` calls the
functions below and ``stack.py`` the stack. Each public function takes ``backend=`` (see
``_backend.py``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _build, reference
from ._autograd import differentiable_grads, embedding_autograd, hgt_step_autograd, reference_step
from ._backend import resolve_backend

# The guard torch's custom-op autograd uses to run the kernel below it; a no-op where absent.
_below_autograd = getattr(torch._C, "_AutoDispatchBelowAutograd", contextlib.nullcontext)

_ACTIVATION_NAMES = {None: "none", "none": "none", "gelu": "gelu", "relu": "relu", "swish": "swish"}


def _activation_name(activation: str | None) -> str:
    if activation not in _ACTIVATION_NAMES:
        raise ValueError(f"define_ops: unknown activation {activation!r}; choose gelu, relu, swish or None")
    return _ACTIVATION_NAMES[activation]


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as_seed(seed: Tensor | int | None, device: torch.device) -> Tensor | None:
    if seed is None or isinstance(seed, Tensor):
        return seed
    # The kernels use the seed's 64 bits, as the reference does for any Python int: wrap into int64.
    return torch.tensor((int(seed) + 2**63) % 2**64 - 2**63, dtype=torch.int64, device=device)


def _check_devices(where: str, anchor: Tensor, *tensors: Tensor | Sequence[Tensor | None] | None) -> None:
    """The fake kernels also run when only some inputs are meta tensors (the Meta key wins the
    dispatch): they would return empty tensors on the others' device. Every tensor must be on
    ``anchor``'s device, as the real kernels require."""
    for entry in tensors:
        for t in entry if isinstance(entry, (list, tuple)) else (entry,):
            if t is not None and t.device != anchor.device:
                raise ValueError(f"define_ops::{where}: every tensor must be on {anchor.device}, got one on {t.device}")


# ----------------------------------------------------------------------------- fake kernels + autograd
if _build.HAS_EXTENSION:

    @torch.library.register_fake("define_ops::embedding_lookup")
    def _embedding_lookup_fake(weight: Tensor, ids: Tensor, padding_idx: int | None, scale: float) -> Tensor:
        _check_devices("embedding_lookup", weight, ids)
        torch._check(weight.dim() == 2, lambda: "embedding_lookup: weight must be [V, n]")
        return weight.new_empty((ids.numel(), weight.shape[1]))

    @torch.library.register_fake("define_ops::embedding_lookup_backward")
    def _embedding_lookup_backward_fake(
        grad: Tensor, ids: Tensor, num_embeddings: int, padding_idx: int | None, scale: float
    ) -> Tensor:
        _check_devices("embedding_lookup_backward", grad, ids)
        return grad.new_empty((num_embeddings, grad.shape[1]))

    _embedding_setup, _embedding_backward = embedding_autograd(torch.ops.define_ops.embedding_lookup_backward)
    torch.library.register_autograd("define_ops::embedding_lookup", _embedding_backward, setup_context=_embedding_setup)

    @torch.library.register_fake("define_ops::hgt_step")
    def _hgt_step_fake(
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        norm_weight: Tensor | None,
        norm_bias: Tensor | None,
        seed: Tensor | None,
        e_width: int,
        e_in_chunks: int,
        e_out_chunks: int,
        shuffle: bool,
        activation: str,
        dropout_p: float,
        norm_eps: float,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        _check_devices("hgt_step", x, weight, bias, norm_weight, norm_bias, seed)
        groups, in_group, out_group = weight.shape
        torch._check(x.dim() == 2 and x.shape[1] == groups * in_group, lambda: "hgt_step: x does not match weight")
        tokens, out_h = x.shape[0], groups * out_group
        out_width = out_h + (e_width if e_out_chunks > 0 else 0)
        norm = norm_weight is not None
        needs_saved = norm or activation not in ("none", "")
        stats = _stats_dtype(x.dtype)
        out = x.new_empty((tokens, out_width))
        saved = x.new_empty((tokens, out_h)) if needs_saved else x.new_empty((0,))
        mean = x.new_empty((tokens, groups), dtype=stats) if norm else x.new_empty((0,), dtype=stats)
        rstd = x.new_empty((tokens, groups), dtype=stats) if norm else x.new_empty((0,), dtype=stats)
        return out, saved, mean, rstd

    @torch.library.register_fake("define_ops::hgt_step_backward")
    def _hgt_step_backward_fake(
        grad_out: Tensor,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        norm_weight: Tensor | None,
        norm_bias: Tensor | None,
        seed: Tensor | None,
        saved: Tensor,
        mean: Tensor,
        rstd: Tensor,
        e_width: int,
        e_in_chunks: int,
        e_out_chunks: int,
        shuffle: bool,
        activation: str,
        dropout_p: float,
        norm_eps: float,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        _check_devices("hgt_step_backward", x, grad_out, weight, bias, norm_weight, norm_bias, seed, saved, mean, rstd)
        groups, _, out_group = weight.shape
        empty = x.new_empty((0,))
        grad_bias = x.new_empty((groups * out_group,)) if bias is not None else empty
        grad_gamma = x.new_empty((out_group,)) if norm_weight is not None else x.new_empty((0,))
        grad_beta = x.new_empty((out_group,)) if norm_weight is not None else x.new_empty((0,))
        return x.new_empty(x.shape), torch.empty_like(weight), grad_bias, grad_gamma, grad_beta

    @torch.library.register_fake("define_ops::hgt_stack")
    def _hgt_stack_fake(
        x: Tensor,
        weights: list[Tensor],
        biases: list[Tensor | None],
        norm_weights: list[Tensor | None],
        norm_biases: list[Tensor | None],
        seeds: list[Tensor | None],
        e_widths: list[int],
        e_in_chunks: list[int],
        e_out_chunks: list[int],
        shuffles: list[bool],
        activations: list[str],
        dropout_ps: list[float],
        norm_eps: list[float],
        keep_for_backward: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        _check_devices("hgt_stack", x, weights, biases, norm_weights, norm_biases, seeds)
        per_step = zip(weights, biases, norm_weights, norm_biases, seeds, e_widths, e_in_chunks, e_out_chunks,
                       shuffles, activations, dropout_ps, norm_eps, strict=True)  # fmt: skip
        out = x
        for step_args in per_step:  # the shapes (and the checks) of the steps one by one
            out = _hgt_step_fake(out, *step_args)[0]
        layout = StackLayout(x.shape[0], weights, norm_weights, e_widths, e_out_chunks, activations)
        values = x.new_empty((layout.values_size if keep_for_backward else 0,))
        stats = x.new_empty((layout.stats_size if keep_for_backward else 0,), dtype=_stats_dtype(x.dtype))
        return out, values, stats

    @torch.library.register_fake("define_ops::hgt_stack_backward")
    def _hgt_stack_backward_fake(
        grad_out: Tensor,
        x: Tensor,
        values: Tensor,
        stats: Tensor,
        weights: list[Tensor],
        biases: list[Tensor | None],
        norm_weights: list[Tensor | None],
        norm_biases: list[Tensor | None],
        seeds: list[Tensor | None],
        e_widths: list[int],
        e_in_chunks: list[int],
        e_out_chunks: list[int],
        shuffles: list[bool],
        activations: list[str],
        dropout_ps: list[float],
        norm_eps: list[float],
    ) -> tuple[Tensor, Tensor]:
        _check_devices("hgt_stack_backward", x, grad_out, values, stats, weights, biases, norm_weights, norm_biases,
                       seeds)  # fmt: skip
        layout = StackLayout(x.shape[0], weights, norm_weights, e_widths, e_out_chunks, activations)
        torch._check(values.shape == (layout.values_size,) and stats.shape == (layout.stats_size,),
                     lambda: "hgt_stack_backward: values and stats must be what hgt_stack returned")  # fmt: skip
        sizes, _ = _grad_pieces(_grad_key(weights, biases, norm_weights))
        return x.new_empty(x.shape), x.new_empty((sum(sizes),))

    # hgt_stack's own autograd, for callers of the op itself (DeFINE calls it below autograd from
    # one autograd.Function in stack.py instead). torch.library.register_autograd cannot give
    # gradients to a list holding None (a step without bias or norm), so this is an Autograd-key
    # kernel around an autograd.Function over the flat list of the tensors that are present. Only
    # the result is differentiable: values and stats are what the backward reads.
    class _HGTStackOp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, layout, per_step, x, *present):
            # layout: per (weights, biases, norm_weights, norm_biases, seeds) which entries are present
            columns = _unflatten(layout, present)
            with _below_autograd():
                out, values, stats = torch.ops.define_ops.hgt_stack.default(x, *columns, *per_step, True)
            ctx.layout, ctx.per_step = layout, per_step
            ctx.set_materialize_grads(False)
            ctx.save_for_backward(x, values, stats, *present)
            return out

        @staticmethod
        def backward(ctx, grad):
            x, values, stats, *present = ctx.saved_tensors
            if grad is None:
                return None, None, None, *([None] * len(present))
            columns = _unflatten(ctx.layout, present)
            if torch.is_grad_enabled():  # create_graph=True: through the reference ops (_autograd.py)
                out = x
                for index, args in enumerate(zip(*ctx.per_step, strict=True)):
                    out = reference_step(out, *(column[index] for column in columns), args)
                return None, None, *differentiable_grads(out, [x, *present], grad)
            with _below_autograd():
                grad_x, grads = torch.ops.define_ops.hgt_stack_backward.default(
                    grad, x, values, stats, *columns, *ctx.per_step
                )
            # column by column, as `present` is: weights, biases, γ, β (then the seeds: no gradient)
            per_param = split_stack_grads(grads, *columns[:3])
            present_grads = [g for column in per_param for g in column if g is not None]
            return None, None, grad_x, *present_grads, *([None] * sum(ctx.layout[4]))

    def _unflatten(layout: tuple[tuple[bool, ...], ...], present: Sequence[Tensor]) -> list[list[Tensor | None]]:
        it = iter(present)
        return [[next(it) if flag else None for flag in flags] for flags in layout]

    # Autograd-key kernels through torch.library.Library (stable across the torch versions we pin).
    _AUTOGRAD_LIBRARY = torch.library.Library("define_ops", "IMPL")

    def _hgt_stack_autograd(x, weights, biases, norm_weights, norm_biases, seeds, *per_step_and_keep):
        *per_step, keep = per_step_and_keep
        columns = (weights, biases, norm_weights, norm_biases, seeds)
        present = [t for column in columns for t in column if t is not None]
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, *present))):
            with _below_autograd():
                return torch.ops.define_ops.hgt_stack.default(x, *columns, *per_step, keep)
        layout = tuple(tuple(t is not None for t in column) for column in columns)
        out = _HGTStackOp.apply(layout, tuple(per_step), x, *present)
        empty = x.new_empty((0,))
        return out, empty, empty.to(_stats_dtype(x.dtype))

    def _hgt_stack_backward_no_double_backward(*args):
        if torch.is_grad_enabled() and any(
            t.requires_grad for arg in args for t in (arg if isinstance(arg, list) else [arg]) if isinstance(t, Tensor)
        ):
            raise NotImplementedError(
                "define_ops::hgt_stack_backward is not differentiable (no double backward through DeFINE's stack)"
            )
        with _below_autograd():
            return torch.ops.define_ops.hgt_stack_backward.default(*args)

    _AUTOGRAD_LIBRARY.impl("hgt_stack", _hgt_stack_autograd, "Autograd")
    _AUTOGRAD_LIBRARY.impl("hgt_stack_backward", _hgt_stack_backward_no_double_backward, "Autograd")

    _hgt_step_setup, _hgt_step_backward = hgt_step_autograd(torch.ops.define_ops.hgt_step_backward)
    torch.library.register_autograd("define_ops::hgt_step", _hgt_step_backward, setup_context=_hgt_step_setup)


class StackLayout:
    """Sizes of the buffers of ``define_ops::hgt_stack`` (values, stats), for the fake kernels: the
    Python twin of csrc/common/hgt_stack.h's StackLayout (same pieces, packed; opcheck compares the
    two). ``hgt_stack_backward``'s grads buffer is laid out by _grad_pieces."""

    def __init__(self, tokens, weights, norm_weights, e_widths, e_out_chunks, activations) -> None:
        values, stats = 0, 0
        steps = len(weights)
        for i, weight in enumerate(weights):
            groups, _, out_group = weight.shape
            out_h = groups * out_group
            norm = norm_weights[i] is not None
            saved = norm or _activation_name(activations[i]) != "none"
            if i + 1 < steps:  # the last output has its own allocation
                values += tokens * (out_h + (e_widths[i] if e_out_chunks[i] > 0 else 0))
            values += tokens * out_h if saved else 0
            stats += 2 * tokens * groups if norm else 0
        self.values_size, self.stats_size = values, stats


def _grad_pieces(key: tuple) -> tuple[list[int], list]:
    """split_with_sizes sizes of ``grads`` and, per step, (index of the weight piece, the strides to
    view it with, indices of the bias, γ and β pieces or None where absent). ``key``: per step
    (weight shape, weight strides, has bias, has norm)."""
    sizes: list[int] = []
    steps = []

    def take(numel: int) -> int:
        sizes.append(numel)
        return len(sizes) - 1

    for shape, stride, has_bias, has_norm in key:
        groups, in_group, out_group = shape
        # the weight's own layout where it is dense (as the C++ backward writes it), else contiguous
        strides = stride if _is_dense(shape, stride) else (in_group * out_group, out_group, 1)
        steps.append((
            take(groups * in_group * out_group),
            strides,
            take(groups * out_group) if has_bias else None,
            take(out_group) if has_norm else None,
            take(out_group) if has_norm else None,
        ))  # fmt: skip
    return sizes, steps


def _grad_key(
    weights: Sequence[Tensor], biases: Sequence[Tensor | None], norm_weights: Sequence[Tensor | None]
) -> tuple:
    """_grad_pieces' key: per step (weight shape, weight strides, has bias, has norm)."""
    return tuple(
        (w.shape, w.stride(), b is not None, n is not None)
        for w, b, n in zip(weights, biases, norm_weights, strict=True)
    )


def _is_dense(shape: Sequence[int], stride: Sequence[int]) -> bool:
    """Tensor::is_non_overlapping_and_dense: the strides, sorted, are a contiguous layout's."""
    expected = 1
    for step, size in sorted((st, n) for st, n in zip(stride, shape, strict=True) if n != 1):
        if step != expected:
            return False
        expected *= size
    return True


_cached_grad_pieces = functools.lru_cache(maxsize=256)(_grad_pieces)


def split_stack_grads(
    grads: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None], norm_weights: Sequence[Tensor | None]
) -> tuple[list[Tensor], list[Tensor | None], list[Tensor | None], list[Tensor | None]]:
    """``hgt_stack_backward``'s one gradient buffer as per-step views: (weight gradients, each with
    its weight's strides where the weight is dense; bias, γ and β gradients, None where absent).
    One split and one view per weight: this runs on every training step."""
    key = _grad_key(weights, biases, norm_weights)
    try:  # shapes are symbolic while torch.compile traces: not hashable, not cached
        sizes, steps = _cached_grad_pieces(key)
    except TypeError:
        sizes, steps = _grad_pieces(key)
    pieces = grads.split_with_sizes(sizes)
    weight_grads, bias_grads, gamma_grads, beta_grads = [], [], [], []
    for weight, (w, strides, b, g, be) in zip(weights, steps, strict=True):
        weight_grads.append(pieces[w].as_strided(weight.shape, strides))
        bias_grads.append(pieces[b] if b is not None else None)
        gamma_grads.append(pieces[g] if g is not None else None)
        beta_grads.append(pieces[be] if be is not None else None)
    return weight_grads, bias_grads, gamma_grads, beta_grads


def _triton():
    # An import statement, not importlib.import_module: torch.compile traces the former.
    from . import triton

    return triton


def _autocast(tensors: tuple[Tensor | None, ...], device_type: str) -> tuple[Tensor | None, ...]:
    """Inside ``torch.autocast``, run the step in the autocast dtype (as matmuls are): floating
    inputs are cast, and autograd casts the gradients back to the parameters' dtype."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


# ----------------------------------------------------------------------------- public functional API
def embedding_lookup(
    weight: Tensor, ids: Tensor, padding_idx: int | None = None, scale: float = 1.0, *, backend: str = "auto"
) -> Tensor:
    """Map step: ``weight[ids] * scale``; padding ids give zero vectors and no gradient.

    Args:
        weight: [V, n] lookup table.
        ids: [*] int64/int32 token ids.
    Returns:
        e: [*, n].
    """
    name = resolve_backend(backend, weight.device)
    if name == "reference":
        return reference.lookup_ref(weight, ids, padding_idx, scale)
    if name == "triton":
        e = _triton().embedding_lookup(weight, ids.reshape(-1), padding_idx, float(scale))
    else:
        e = torch.ops.define_ops.embedding_lookup(weight, ids.reshape(-1), padding_idx, float(scale))
    return e.reshape(*ids.shape, weight.shape[1])


def hgt_step(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    norm_weight: Tensor | None = None,
    norm_bias: Tensor | None = None,
    seed: Tensor | int | None = None,
    *,
    e_width: int = 0,
    e_in_chunks: int = 0,
    e_out_chunks: int = 0,
    shuffle: bool = False,
    activation: str | None = None,
    dropout_p: float = 0.0,
    norm_eps: float = 1e-5,
    backend: str = "auto",
    row_count: Tensor | None = None,
) -> Tensor:
    """One HGT layer: grouped linear → +bias → shuffle → per-group LayerNorm → activation → dropout.

    Args:
        x: [T, a] the layer input. If it carries the map vector e (width ``e_width``), it is laid
            out as mix(e, h, ``e_in_chunks``): chunk j = [e_j ‖ h_j].
        weight: [g, a/g, b/g]; group j of the output reads only group j of x.
        bias: [b], added in GEMM order (before the shuffle).
        norm_weight, norm_bias: [b/g] γ and β shared by all groups; LayerNorm runs when given.
        seed: one-element int64 tensor (or int); dropout masks are Philox(seed) of (row, feature).
        e_out_chunks: 0 → the output is h [T, b]; c ≥ 1 → mix(e, h, c) [T, n + b], ready for a
            next layer with c groups (c = 1 is [e ‖ h]).
        shuffle: ShuffleNet channel shuffle z[t·g + i] = y[i·s + t] after the bias.
        activation: "gelu" (exact), "relu", "swish" or None.
        row_count: optional one-element int64 tensor on x's device: only rows [0, row_count) are
            needed (the rest is padding, e.g. distinct ids padded to T). The Triton backend skips
            the other rows without a host synchronisation (their output and their gradient into x
            are zero); the other backends compute every row.
    Returns:
        [T, b] or [T, n + b].
    """
    name = resolve_backend(backend, x.device)
    activation_name = _activation_name(activation)
    # The kernels check these too; here they hold for the reference path as well.
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"define_ops.hgt_step: dropout_p must be in [0, 1), got {dropout_p}")
    if not norm_eps > 0.0:
        raise ValueError(f"define_ops.hgt_step: norm_eps must be > 0, got {norm_eps}")
    if min(e_width, e_in_chunks, e_out_chunks) < 0:
        raise ValueError(
            f"define_ops.hgt_step: e_width={e_width}, e_in_chunks={e_in_chunks} and e_out_chunks={e_out_chunks} "
            "must not be negative"
        )
    if name == "reference":
        return reference.hgt_step_ref(
            x, weight, bias, norm_weight, norm_bias, seed,
            e_width=e_width, e_in_chunks=e_in_chunks, e_out_chunks=e_out_chunks, shuffle=shuffle,
            activation=activation, dropout_p=dropout_p, norm_eps=norm_eps,
        )  # fmt: skip
    seed_tensor = _as_seed(seed, x.device) if dropout_p > 0 else None
    x, weight, bias, norm_weight, norm_bias = _autocast((x, weight, bias, norm_weight, norm_bias), x.device.type)
    args = (x, weight, bias, norm_weight, norm_bias, seed_tensor, e_width, e_in_chunks, e_out_chunks)
    args += (shuffle, activation_name, float(dropout_p), float(norm_eps))
    if name == "triton":
        return _triton().hgt_step(*args, row_count)
    return torch.ops.define_ops.hgt_step(*args)[0]


def grouped_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, backend: str = "auto") -> Tensor:
    """F_G(x, W, g): x [T, a], weight [g, a/g, b/g], bias [b] → [T, b]."""
    return hgt_step(x, weight, bias, backend=backend)


def feature_shuffle(y: Tensor, groups: int) -> Tensor:
    """z[t·g + i] = y[i·s + t] for y [T, b], s = b/g. (Fused into hgt_step as addressing; this
    standalone version is a pass over memory, for users composing their own stacks.)"""
    if groups < 1 or y.shape[-1] % groups:
        raise ValueError(f"define_ops.feature_shuffle: groups={groups} must be >= 1 and divide the width {y.shape[-1]}")
    return reference.feature_shuffle_ref(y, groups)


def split_mix(e: Tensor, h: Tensor, chunks: int) -> Tensor:
    """mix(e, h, c): chunk j = [e_j ‖ h_j]; e [T, n], h [T, b] → [T, n + b]. (Fused into
    hgt_step's output; this standalone version is a pass over memory.)"""
    if chunks < 1 or e.shape[-1] % chunks or h.shape[-1] % chunks:
        widths = f"{e.shape[-1]} and {h.shape[-1]}"
        raise ValueError(f"define_ops.split_mix: chunks={chunks} must be >= 1 and divide both widths ({widths})")
    return reference.split_mix_ref(e, h, chunks)
