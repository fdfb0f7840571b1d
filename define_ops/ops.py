"""The op registry: Python signatures, fake (meta) kernels, autograd, and backend dispatch.

The C++ ops (schemas in csrc/define_ops.cpp) are:

- ``define_ops::embedding_lookup(weight, ids, padding_idx, scale) -> e`` and its backward;
- ``define_ops::hgt_step(x, weight, bias, norm_weight, norm_bias, seed, e_width, e_in_chunks,
  e_out_chunks, shuffle, activation, dropout_p, norm_eps) -> (out, saved, mean, rstd)`` — one
  whole HGT layer (grouped GEMM, bias, shuffle, per-group LayerNorm, activation, dropout), its
  output written straight into the layout the next layer reads — and its backward.

This module is the only place that knows how to call them; ``layer.py`` calls the functions
below. Each public function takes ``backend=`` (see ``_backend.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _build, reference
from ._autograd import embedding_autograd, hgt_step_autograd
from ._backend import resolve_backend

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
    return torch.tensor(int(seed), dtype=torch.int64, device=device)


# ----------------------------------------------------------------------------- fake kernels + autograd
if _build.HAS_EXTENSION:

    @torch.library.register_fake("define_ops::embedding_lookup")
    def _embedding_lookup_fake(weight: Tensor, ids: Tensor, padding_idx: int | None, scale: float) -> Tensor:
        torch._check(weight.dim() == 2, lambda: "embedding_lookup: weight must be [V, n]")
        return weight.new_empty((ids.numel(), weight.shape[1]))

    @torch.library.register_fake("define_ops::embedding_lookup_backward")
    def _embedding_lookup_backward_fake(
        grad: Tensor, ids: Tensor, num_embeddings: int, padding_idx: int | None, scale: float
    ) -> Tensor:
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
        groups, _, out_group = weight.shape
        empty = x.new_empty((0,))
        grad_bias = x.new_empty((groups * out_group,)) if bias is not None else empty
        grad_gamma = x.new_empty((out_group,)) if norm_weight is not None else x.new_empty((0,))
        grad_beta = x.new_empty((out_group,)) if norm_weight is not None else x.new_empty((0,))
        return x.new_empty(x.shape), torch.empty_like(weight), grad_bias, grad_gamma, grad_beta

    _hgt_step_setup, _hgt_step_backward = hgt_step_autograd(torch.ops.define_ops.hgt_step_backward)
    torch.library.register_autograd("define_ops::hgt_step", _hgt_step_backward, setup_context=_hgt_step_setup)


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
    return reference.feature_shuffle_ref(y, groups)


def split_mix(e: Tensor, h: Tensor, chunks: int) -> Tensor:
    """mix(e, h, c): chunk j = [e_j ‖ h_j]; e [T, n], h [T, b] → [T, n + b]. (Fused into
    hgt_step's output; this standalone version is a pass over memory.)"""
    return reference.split_mix_ref(e, h, chunks)
