"""Pure-PyTorch reference of DeFINE, written for clarity: one function per step.

This module is the oracle every fast path is tested against, and (with ``dropout_rng="torch"``)
the "authors' way" baseline the benchmarks compare with: grouped linear from ``bmm`` on
transposed views, shuffle from ``transpose(...).reshape``, the skip from ``torch.cat``, then
per-group LayerNorm, activation and dropout as separate ops (define_paper.md §3.2–3.10).

Shapes: T tokens, a = layer input width, b = layer output width, g = groups, n = e width.

Dropout masks come from a counter-based Philox4x32-10 generator, so every backend (reference,
C++, CUDA, Triton) draws the same mask from the same seed. Element (row t, feature p) of a
layer's output uses output ``p % 4`` of ``philox(key=seed, counter=(p // 4, t, 0, 0))`` and is
kept when that 32-bit value is >= ``dropout_threshold(p)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import DeFINEConfig, LayerPlan

_MASK32 = 0xFFFFFFFF
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10


# ----------------------------------------------------------------------------- random numbers
def philox4x32(
    seed: Tensor | int, c0: Tensor, c1: Tensor, c2: Tensor | None = None, c3: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-10 with key (seed_lo, seed_hi) and counter (c0, c1, c2, c3); c2 = c3 = 0 for dropout.

    Integers are carried in int64 tensors holding uint32 values; a product of two uint32 fits
    in 64 bits, and its high word is read back with an arithmetic shift plus a mask.
    """
    if isinstance(seed, int) and seed >= 2**63:  # a uint64 key, carried as its int64 bit pattern
        seed -= 2**64
    seed = torch.as_tensor(seed, dtype=torch.int64, device=c0.device)
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    c0 = c0.to(torch.int64) & _MASK32
    c1 = c1.to(torch.int64) & _MASK32
    c2 = torch.zeros_like(c0) if c2 is None else c2.to(torch.int64) & _MASK32
    c3 = torch.zeros_like(c0) if c3 is None else c3.to(torch.int64) & _MASK32
    for _ in range(PHILOX_ROUNDS):
        prod_b = c2 * PHILOX_ROUND_B
        prod_a = c0 * PHILOX_ROUND_A
        c0, c1, c2, c3 = (
            ((prod_b >> 32) & _MASK32) ^ c1 ^ k0,
            prod_b & _MASK32,
            ((prod_a >> 32) & _MASK32) ^ c3 ^ k1,
            prod_a & _MASK32,
        )
        k0 = (k0 + PHILOX_KEY_A) & _MASK32
        k1 = (k1 + PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def dropout_threshold(p: float) -> int:
    """32-bit threshold: a random word below it drops the element (P(drop) = p within 2^-32)."""
    return min(math.floor(p * 2.0**32), _MASK32)


def dropout_keep_mask(seed: Tensor | int, rows: int, cols: int, p: float, device: torch.device | str = "cpu") -> Tensor:
    """Boolean keep mask [rows, cols] of the layer output, regenerated from the seed."""
    quads = (cols + 3) // 4
    c0 = torch.arange(quads, device=device, dtype=torch.int64).expand(rows, quads)
    c1 = torch.arange(rows, device=device, dtype=torch.int64).unsqueeze(1).expand(rows, quads)
    words = torch.stack(philox4x32(seed, c0, c1), dim=-1).reshape(rows, quads * 4)[:, :cols]
    return words >= dropout_threshold(p)


# ----------------------------------------------------------------------------- the steps
def normalized_padding_idx(padding_idx: int | None, num_embeddings: int) -> int | None:
    """padding_idx as nn.Embedding takes it (none, or a row in [-V, V), a negative one counted from
    the end) → its row in [0, V), or None; out of range is an error (csrc/common/embedding_args.h
    does the same for the C++ ops)."""
    if padding_idx is None:
        return None
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(f"define_ops: padding_idx={padding_idx} is out of range for num_embeddings={num_embeddings}")
    return padding_idx % num_embeddings


def lookup_ref(weight: Tensor, ids: Tensor, padding_idx: int | None = None, scale: float = 1.0) -> Tensor:
    """Map: e = weight[ids] · scale; padding ids give zero vectors.  weight [V, n], ids [T] → [T, n].
    ``padding_idx`` as nn.Embedding takes it: in [-V, V), a negative one counted from the end."""
    padding_idx = normalized_padding_idx(padding_idx, weight.shape[0])
    e = F.embedding(ids, weight, padding_idx=padding_idx)
    if scale != 1.0:
        e = e * scale
    if padding_idx is not None:
        e = e.masked_fill((ids == padding_idx).unsqueeze(-1), 0.0)
    return e


def grouped_linear_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F_G: group j of the output reads only group j of the input (define_paper.md §3.2).

    x [T, a], weight [g, a/g, b/g], bias [b] → y [T, b].
    """
    g, a_g, b_g = weight.shape
    tokens = x.shape[0]
    x_groups = x.reshape(tokens, g, a_g).transpose(0, 1)  # [g, T, a/g]
    y = torch.bmm(x_groups, weight).transpose(0, 1).reshape(tokens, g * b_g)  # [T, b]
    return y if bias is None else y + bias


def feature_shuffle_ref(y: Tensor, groups: int) -> Tensor:
    """ShuffleNet channel shuffle: z[t·g + i] = y[i·s + t], s = b/g.  y [T, b] → z [T, b]."""
    tokens, width = y.shape
    return y.reshape(tokens, groups, width // groups).transpose(1, 2).reshape(tokens, width)


def split_mix_ref(e: Tensor, h: Tensor, chunks: int) -> Tensor:
    """The DeFINE skip: chunk j of the result is [e_j ‖ h_j].  e [T, n], h [T, b] → [T, n + b].

    chunks = 1 is the plain concat [e ‖ h].
    """
    tokens = e.shape[0]
    e_chunks = e.reshape(tokens, chunks, e.shape[1] // chunks)
    h_chunks = h.reshape(tokens, chunks, h.shape[1] // chunks)
    return torch.cat([e_chunks, h_chunks], dim=-1).reshape(tokens, e.shape[1] + h.shape[1])


def extract_e_ref(x: Tensor, e_width: int, chunks: int) -> Tensor:
    """Inverse of split_mix_ref for the e part: x = mix(e, h, chunks) [T, n + b] → e [T, n]."""
    tokens = x.shape[0]
    return x.reshape(tokens, chunks, x.shape[1] // chunks)[:, :, : e_width // chunks].reshape(tokens, e_width)


def group_layer_norm_ref(z: Tensor, groups: int, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """LayerNorm over each group's b/g features with one γ/β [b/g] shared by all groups."""
    tokens, width = z.shape
    s = width // groups
    return F.layer_norm(z.reshape(tokens, groups, s), (s,), weight, bias, eps).reshape(tokens, width)


def activation_ref(a: Tensor, name: str | None) -> Tensor:
    if name is None or name == "none":
        return a
    if name == "gelu":
        return F.gelu(a)  # exact erf form
    if name == "relu":
        return F.relu(a)
    if name == "swish":
        return F.silu(a)
    raise ValueError(f"unknown activation {name!r}")


def dropout_ref(a: Tensor, p: float, seed: Tensor | int | None, rng: str = "philox", training: bool = True) -> Tensor:
    """Inverted dropout.  ``rng="philox"`` draws the cross-backend mask from ``seed``;
    ``rng="torch"`` uses ``F.dropout`` (the authors' way, torch's generator)."""
    if p == 0.0 or not training:
        return a
    if rng == "torch":
        return F.dropout(a, p, training=True)
    if seed is None:
        raise ValueError("dropout with rng='philox' needs a seed")
    keep = dropout_keep_mask(seed, a.shape[0], a.shape[1], p, a.device)
    return a * keep.to(a.dtype) * (1.0 / (1.0 - p))


def hgt_step_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    seed: Tensor | int | None,
    *,
    e_width: int,
    e_in_chunks: int,
    e_out_chunks: int,
    shuffle: bool,
    activation: str | None,
    dropout_p: float,
    norm_eps: float = 1e-5,
) -> Tensor:
    """One fused HGT layer step, as the ``define_ops::hgt_step`` op defines it.

    x [T, a] is this layer's input; if e_out_chunks > 0 the output is mix(e, h, e_out_chunks)
    [T, n + b], with e read from its place in x (layout e_in_chunks); otherwise it is h [T, b].
    The per-group LayerNorm runs when ``norm_weight`` is given (then ``norm_bias`` too).
    """
    g = weight.shape[0]
    h = grouped_linear_ref(x, weight, bias)
    if shuffle:
        h = feature_shuffle_ref(h, g)
    if norm_weight is not None:
        h = group_layer_norm_ref(h, g, norm_weight, norm_bias, norm_eps)
    h = activation_ref(h, activation)
    h = dropout_ref(h, dropout_p, seed)
    if e_out_chunks:
        h = split_mix_ref(extract_e_ref(x, e_width, e_in_chunks), h, e_out_chunks)
    return h


# ----------------------------------------------------------------------------- the whole unit
def adaptive_map_ref(
    ids: Tensor,
    tables: Sequence[Tensor],
    projections: Sequence[Tensor | None],
    bounds: Sequence[tuple[int, int]],
    scale: bool = True,
) -> Tensor:
    """Adaptive input (Baevski & Auli), the straightforward way: select each band's tokens,
    look them up in the band's table (times √width_b with ``scale``, as the authors' code does),
    project to n.  ids [T] → e [T, n].

    ``projections[b]`` is a [n, width_b] weight, or None where the band is already n wide.
    """
    n = tables[0].shape[1] if projections[0] is None else projections[0].shape[0]
    e = tables[0].new_zeros(ids.shape[0], n)
    for table, projection, (lo, hi) in zip(tables, projections, bounds, strict=True):
        rows = ((ids >= lo) & (ids < hi)).nonzero().squeeze(1)  # data-dependent size
        vectors = F.embedding(ids[rows] - lo, table) * (math.sqrt(table.shape[1]) if scale else 1.0)
        e = e.index_put((rows,), vectors if projection is None else F.linear(vectors, projection))
    return e


def hgt_forward_ref(
    e: Tensor,
    layers: Sequence[tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]],
    reduce_weight: Tensor | None,
    reduce_bias: Tensor | None,
    config: DeFINEConfig,
    *,
    training: bool = False,
    seeds: Sequence[Tensor | int] | None = None,
    dropout_rng: str = "philox",
    plans: Sequence[LayerPlan] | None = None,
) -> Tensor:
    """Expand and Reduce, the paper's way (define_paper.md §3.8).  e [T, n] → [T, m].

    ``layers[l]`` = (weight [g, a/g, b/g], bias [b], norm γ [b/g], norm β [b/g]).  The skip
    rebuilds mix(e, h) with torch.cat before every layer, independently of the op layouts.
    ``plans``: ``config.layer_plans()``, given when already at hand (``torch.compile`` cannot
    trace their exact-rational arithmetic). ``reduce_weight`` None: no Reduce, the result is its
    input [T, k (+ n)].
    """
    plans = config.layer_plans() if plans is None else plans
    h = e
    for layer, (plan, (w, b, nw, nb)) in enumerate(zip(plans[:-1], layers, strict=True)):
        if layer == 0:
            x = e
        elif plan.e_in_chunks:
            x = split_mix_ref(e, h, plan.e_in_chunks)  # [T, n + k_{l-1}]
        else:
            x = h
        h = grouped_linear_ref(x, w, b)
        if plan.shuffle:
            h = feature_shuffle_ref(h, plan.groups)
        if plan.norm:
            h = group_layer_norm_ref(h, plan.groups, nw, nb, config.norm_eps)
        h = activation_ref(h, plan.activation)
        seed = seeds[layer] if seeds is not None else None
        h = dropout_ref(h, plan.dropout, seed, rng=dropout_rng, training=training)
    x = split_mix_ref(e, h, 1) if config.skip_into_reduce else h
    if reduce_weight is None:  # the caller runs a Reduce of its own (DeFINE with a wrapped or hooked one)
        return x
    return F.linear(x, reduce_weight, reduce_bias)  # Reduce


def define_forward_ref(
    ids: Tensor,
    weight: Tensor,
    layers: Sequence[tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]],
    reduce_weight: Tensor,
    reduce_bias: Tensor,
    config: DeFINEConfig,
    *,
    training: bool = False,
    seeds: Sequence[Tensor | int] | None = None,
    dropout_rng: str = "philox",
) -> Tensor:
    """The whole unit with a [V, n] table as the Map.  ids [*] → [*, m].

    Padding ids give a zero output vector, as ``nn.Embedding`` does.
    """
    scale = math.sqrt(config.input_dim) if config.scale_embedding else 1.0
    flat = ids.reshape(-1)
    e = lookup_ref(weight, flat, config.padding_idx, scale)  # [T, n]
    out = hgt_forward_ref(
        e, layers, reduce_weight, reduce_bias, config, training=training, seeds=seeds, dropout_rng=dropout_rng
    )
    if config.padding_idx is not None:
        out = out.masked_fill((flat == config.padding_idx).unsqueeze(-1), 0.0)
    return out.reshape(*ids.shape, config.embedding_dim)
