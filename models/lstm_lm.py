"""LSTM language model in the style of Merity et al. 2018a (define_paper.md §5.1).

ids [T, B] → input layer (DeFINE, a standard table, or adaptive input) → [T, B, m] → stacked
LSTM (locked dropout between layers) → [T, B, H_last] → (projection to n) → softmax tied to the
input's n-dim lookup table (adaptive or full).

Tying (``tie``): "width" makes the last LSTM layer n wide, so its output already lives in the
table's space (the paper's setting, m = n); "proj" adds a bias-free [H → n] projection; "none"
gives the softmax its own tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .adaptive import AdaptiveSoftmax, band_dims, check_cutoffs, slice_bands
from .common import LMOutput, LSTMLayer, build_input, locked_dropout

TIES = ("width", "proj", "none")


@dataclass
class LSTMLMConfig:
    vocab_size: int
    embedding: str = "define"  # define | standard | adaptive
    table_dim: int = 256  # n: width of the lookup table (the tied output space)
    input_dim: int = 256  # m: width the input layer hands to the first LSTM layer
    hidden: int = 1024
    layers: int = 4
    tie: str = "width"  # width | proj | none
    softmax: str = "adaptive"  # adaptive | full
    cutoffs: list[int] = field(default_factory=list)
    div_val: int = 1  # band width factor of adaptive input/softmax
    dropout: float = 0.1  # on the last LSTM layer's output
    dropouth: float = 0.1  # between LSTM layers
    dropouti: float = 0.1  # on the input layer's output
    define: dict[str, Any] = field(default_factory=dict)  # DeFINE options (max_dim, depth, max_groups, …)
    softmax_bias: bool = False  # an output bias per word (AWD-LSTM's decoder has one)


class LSTMLM(nn.Module):
    def __init__(self, config: LSTMLMConfig, weight_drop: float = 0.0) -> None:
        super().__init__()
        c = self.config = config
        if c.tie not in TIES:
            raise ValueError(f"unknown tie mode {c.tie!r}; choose one of {TIES}")
        banded_input = c.embedding == "adaptive" or (c.embedding == "define" and c.define.get("map") == "adaptive")
        in_cutoffs = c.cutoffs if banded_input else []
        out_cutoffs = c.cutoffs if c.softmax == "adaptive" else []
        self.embed = build_input(
            c.embedding, c.vocab_size, c.input_dim, c.table_dim, cutoffs=in_cutoffs, div_val=c.div_val, define=c.define
        )
        last = c.table_dim if c.tie == "width" else c.hidden
        sizes = [c.hidden] * (c.layers - 1) + [last]
        inputs = [c.input_dim] + sizes[:-1]
        self.rnns = nn.ModuleList(LSTMLayer(i, h, weight_drop) for i, h in zip(inputs, sizes, strict=True))
        self.proj = nn.Linear(c.hidden, c.table_dim, bias=False) if c.tie == "proj" else None
        out_dim = c.table_dim if c.tie != "none" else last
        self.bounds = check_cutoffs(out_cutoffs, c.vocab_size)
        banded = len(self.embed.band_tables()) > 1
        if c.tie == "none":
            dims = band_dims(out_dim, len(self.bounds), c.div_val)
        elif banded and c.softmax == "adaptive":
            dims = self.embed.dims  # the same bands on both sides
        elif banded and len(set(self.embed.dims)) > 1:
            raise ValueError("a full softmax ties to adaptive input only when every band is n wide (--div-val 1)")
        else:
            dims = [c.table_dim] * len(self.bounds)  # bands are slices of one [V, n] table
        # tie the softmax's band projections to the adaptive input's where both map n <-> d_i
        self.tied_proj = c.tie != "none" and banded and c.softmax == "adaptive" and self.embed.projection_dim == out_dim
        tied_proj = [p is not None for p in self.embed.projections()] if self.tied_proj else None
        self.softmax = AdaptiveSoftmax(
            c.vocab_size, out_dim, out_cutoffs, dims, tied=c.tie != "none", tied_projections=tied_proj,
            bias=c.softmax_bias,
        )  # fmt: skip

    # ------------------------------------------------------------------ state
    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> list[tuple[Tensor, Tensor]]:
        device = device or next(self.parameters()).device
        return [
            (torch.zeros(1, batch_size, rnn.hidden_size, device=device),) * 2  # (h, c): [1, B, H]
            for rnn in self.rnns
        ]

    # ------------------------------------------------------------------ pieces
    def output_tables(self) -> list[Tensor]:
        tables = self.embed.band_tables()
        if len(tables) == 1:
            return slice_bands(tables[0], self.bounds)
        return tables if len(self.bounds) > 1 else [torch.cat(tables)]  # [V, n] for a full softmax

    def embed_tokens(self, ids: Tensor) -> Tensor:
        return self.embed(ids)  # [T, B, m]

    def run_rnns(self, x: Tensor, state: list) -> tuple[Tensor, Tensor, list]:
        """[T, B, m] → (last layer's output after dropout, before dropout, new state)."""
        c = self.config
        new_state = []
        raw = x
        for i, rnn in enumerate(self.rnns):
            raw, s = rnn(x, state[i])  # [T, B, H_i]
            new_state.append(s)
            x = locked_dropout(raw, c.dropout if i == len(self.rnns) - 1 else c.dropouth, self.training)
        return x, raw, new_state

    def nll(self, hidden: Tensor, target: Tensor) -> Tensor:
        """hidden [T, B, H] → per-token NLL [T * B]."""
        if self.proj is not None:
            hidden = self.proj(hidden)  # [T, B, n]
        tied = self.config.tie != "none"
        return self.softmax(
            hidden.reshape(-1, hidden.size(-1)),  # [T * B, n]
            target.reshape(-1),
            self.output_tables() if tied else None,
            self.embed.projections() if self.tied_proj else None,
        )

    def forward(self, ids: Tensor, target: Tensor, state: list) -> LMOutput:
        x = locked_dropout(self.embed_tokens(ids), self.config.dropouti, self.training)
        out, _, new_state = self.run_rnns(x, state)
        nll = self.nll(out, target).mean()
        return LMOutput(nll, new_state, nll.new_zeros(()))
