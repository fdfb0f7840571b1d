"""Adaptive input (Baevski & Auli, 2019) and adaptive softmax (Grave et al., 2017), written so that
the output layer can tie to any input's lookup tables.

The vocabulary (ordered by frequency) is cut at ``cutoffs`` into bands; band i holds ids
[c_i, c_{i+1}) in a table of width d_i. A full softmax is the one-band case (no cutoffs).

Tying works by passing the input's tables (and projections) to ``AdaptiveSoftmax.forward``
instead of registering them twice: a single [V, n] table (DeFINE's ``weight``, a standard
embedding) is sliced into the bands, an adaptive input hands over its band tables as they are.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def check_cutoffs(cutoffs: list[int], vocab_size: int) -> list[int]:
    """Validated cutoffs with the vocabulary size appended: [c_1, …, c_{K-1}, V]."""
    cutoffs = list(cutoffs)
    if cutoffs != sorted(set(cutoffs)) or (cutoffs and (cutoffs[0] <= 0 or cutoffs[-1] >= vocab_size)):
        raise ValueError(
            f"adaptive cutoffs {cutoffs} must be increasing, distinct and inside (0, {vocab_size}) "
            f"for a vocabulary of {vocab_size} words (pass smaller --cutoffs for this corpus)"
        )
    return cutoffs + [vocab_size]


def band_dims(base_dim: int, num_bands: int, div_val: int) -> list[int]:
    """Band widths base_dim / div_val^i (Baevski & Auli's factor), each at least 1."""
    dims = [base_dim // div_val**i for i in range(num_bands)]
    if min(dims) < 1:
        raise ValueError(f"width {base_dim} divided by {div_val} per band leaves a band of width 0 ({dims})")
    return dims


def slice_bands(table: Tensor, bounds: list[int]) -> list[Tensor]:
    """One [V, d] table as band views [c_i, c_{i+1}) (split, not slicing: its backward is one
    concatenation instead of a zero-filled [V, d] gradient per band)."""
    sizes = [hi - lo for lo, hi in zip([0, *bounds[:-1]], bounds, strict=True)]
    return list(table.split(sizes))


def touch(*tensors: Tensor) -> Tensor:
    """A zero that depends on ``tensors``: a band no token of the batch falls in still takes part
    in the graph, so DistributedDataParallel sees the same parameters used on every step."""
    return sum((t.reshape(-1)[:1].sum() * 0.0 for t in tensors), torch.zeros((), device=tensors[0].device))


class AdaptiveInput(nn.Module):
    """ids [*] → [*, out_dim]; band i is a [V_i, d_i] table (d_i = base_dim / div_val^i) projected
    to ``out_dim`` when d_i differs. Tables start N(0, d_i^-1/2) and are read scaled by √d_i,
    the convention of DeFINE's Map, so every input kind starts at unit scale."""

    def __init__(self, vocab_size: int, out_dim: int, base_dim: int, cutoffs: list[int], div_val: int = 4) -> None:
        super().__init__()
        self.bounds = check_cutoffs(cutoffs, vocab_size)
        self.dims = band_dims(base_dim, len(self.bounds), div_val)
        self.out_dim = out_dim
        self.projection_dim = out_dim  # band projections map d_i → out_dim
        sizes = [hi - lo for lo, hi in zip([0, *self.bounds[:-1]], self.bounds, strict=True)]
        self.tables = nn.ParameterList(
            nn.Parameter(torch.randn(v, d) * d**-0.5) for v, d in zip(sizes, self.dims, strict=True)
        )
        # projection i: [out_dim, d_i] (maps band i up to out_dim); None where d_i == out_dim
        self.projs = nn.ParameterList(
            nn.Parameter(torch.empty(out_dim, d)) if d != out_dim else None for d in self.dims
        )
        for proj in self.projs:
            if proj is not None:
                nn.init.xavier_uniform_(proj)

    def band_tables(self) -> list[Tensor]:
        return list(self.tables)

    def projections(self) -> list[Tensor | None]:
        return list(self.projs)

    def forward(self, ids: Tensor, tables: list[Tensor] | None = None) -> Tensor:
        tables = self.band_tables() if tables is None else tables
        flat = ids.reshape(-1)
        out = flat.new_zeros(flat.numel(), self.out_dim, dtype=tables[0].dtype)  # [N, out_dim]
        unused = torch.zeros((), device=flat.device)
        start = 0
        for table, proj, end in zip(tables, self.projs, self.bounds, strict=True):
            index = ((flat >= start) & (flat < end)).nonzero().squeeze(1)
            if index.numel() == 0:
                unused = unused + touch(table, *([proj] if proj is not None else []))
            else:
                band = F.embedding(flat[index] - start, table) * math.sqrt(table.size(1))  # [n_i, d_i]
                if proj is not None:
                    band = F.linear(band, proj)  # [n_i, out_dim]
                out = out.index_copy(0, index, band.to(out.dtype))
            start = end
        return (out + unused).view(*ids.shape, self.out_dim)


class AdaptiveSoftmax(nn.Module):
    """Negative log-likelihood of each target under an adaptive (or, with no cutoffs, full) softmax.

    hidden [N, in_dim], target [N] → nll [N]. The head scores the first band's words and one
    logit per tail cluster; a word in tail band i costs -log p(cluster i) - log p(word | cluster i).
    Band i reads ``hidden`` through a projection [in_dim, d_i] when d_i != in_dim.

    ``tied=True``: the band tables (and, where given, the projections) are passed to ``forward``
    and not owned. ``tied_projections[i]`` is an input projection [in_dim, d_i] that maps band i up
    to in_dim; used transposed here. Own projections are created where d_i != in_dim and no tied
    one is given.
    """

    def __init__(
        self,
        vocab_size: int,
        in_dim: int,
        cutoffs: list[int],
        dims: list[int],
        *,
        tied: bool = False,
        tied_projections: list[bool] | None = None,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.bounds = check_cutoffs(cutoffs, vocab_size)
        if len(dims) != len(self.bounds):
            raise ValueError(f"{len(self.bounds)} bands need {len(self.bounds)} widths, got {dims}")
        self.in_dim, self.dims, self.tied = in_dim, list(dims), tied
        starts = [0, *self.bounds[:-1]]
        sizes = [hi - lo for lo, hi in zip(starts, self.bounds, strict=True)]
        tied_projections = tied_projections or [False] * len(dims)
        self.tables = None
        if not tied:
            self.tables = nn.ParameterList(
                nn.Parameter(torch.randn(v, d) * d**-0.5) for v, d in zip(sizes, dims, strict=True)
            )
        self.projs = nn.ParameterList(
            nn.Parameter(nn.init.xavier_uniform_(torch.empty(in_dim, d))) if d != in_dim and not tp else None
            for d, tp in zip(dims, tied_projections, strict=True)
        )
        num_clusters = len(dims) - 1
        self.cluster_weight = nn.Parameter(torch.zeros(num_clusters, dims[0])) if num_clusters else None
        self.cluster_bias = nn.Parameter(torch.zeros(num_clusters)) if num_clusters else None
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(v)) for v in sizes) if bias else None

    def _project(self, hidden: Tensor, band: int, projections: list[Tensor | None] | None) -> Tensor:
        if self.dims[band] == self.in_dim:
            return hidden
        own = self.projs[band]
        if own is not None:
            return hidden @ own  # [n, in_dim] @ [in_dim, d_i]
        return hidden @ projections[band]  # tied input projection [in_dim, d_i], applied transposed

    def forward(
        self,
        hidden: Tensor,
        target: Tensor,
        tables: list[Tensor] | None = None,
        projections: list[Tensor | None] | None = None,
    ) -> Tensor:
        if self.tied:
            if tables is None or len(tables) != len(self.dims):
                raise ValueError(f"a tied AdaptiveSoftmax needs the input's {len(self.dims)} band tables")
        else:
            tables = list(self.tables)
        biases = list(self.biases) if self.biases is not None else [None] * len(tables)
        shortlist = self.bounds[0]

        head_weight, head_bias = tables[0], biases[0]
        if self.cluster_weight is not None:  # head = [first band's words ‖ one logit per cluster]
            head_weight = torch.cat([head_weight, self.cluster_weight.to(head_weight.dtype)])
            if head_bias is not None:
                head_bias = torch.cat([head_bias, self.cluster_bias])
            else:
                head_bias = torch.cat([head_weight.new_zeros(shortlist), self.cluster_bias.to(head_weight.dtype)])
        head_logits = F.linear(self._project(hidden, 0, projections), head_weight, head_bias)  # [N, shortlist + K]
        head_logprob = F.log_softmax(head_logits.float(), -1)  # float32 whatever autocast chose for the matmul
        nll = -head_logprob.gather(1, target.clamp(max=shortlist - 1).unsqueeze(1)).squeeze(1)  # right for head words
        unused = torch.zeros((), device=hidden.device)
        for band in range(1, len(tables)):
            lo, hi = self.bounds[band - 1], self.bounds[band]
            index = ((target >= lo) & (target < hi)).nonzero().squeeze(1)
            extras = [p for p in (self.projs[band], biases[band]) if p is not None]
            if index.numel() == 0:
                unused = unused + touch(tables[band], *extras)
                continue
            h = self._project(hidden.index_select(0, index), band, projections)  # [n_i, d_i]
            tail_logprob = F.log_softmax(F.linear(h, tables[band], biases[band]).float(), -1)  # [n_i, V_i]
            word = tail_logprob.gather(1, (target.index_select(0, index) - lo).unsqueeze(1)).squeeze(1)
            cluster = head_logprob.index_select(0, index)[:, shortlist + band - 1]
            nll = nll.index_copy(0, index, -(cluster + word))
        return nll + unused
