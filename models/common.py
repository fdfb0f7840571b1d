"""Pieces the language models share: the three input layers, dropout helpers, the weight-dropped
LSTM layer and recurrent-state utilities.

Every input layer maps ids [*] → [*, m] and exposes the lookup tables an output layer ties to:
``band_tables()`` (tables covering the vocabulary in id order) and ``projections()`` (for each
band, a linear map [m, d] from the table width up to m, or None). ``forward(ids, tables=...)``
accepts replacement tables, which is how embedding dropout reaches the lookup table of any kind.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import define_ops

from .adaptive import AdaptiveInput

EMBEDDINGS = ("define", "standard", "adaptive")


class LMOutput(NamedTuple):
    nll: Tensor  # mean negative log-likelihood per target token (scalar)
    state: Any  # recurrent state / memory to carry into the next window
    penalty: Tensor  # extra training loss (AWD-LSTM's AR/TAR); 0 elsewhere


class StandardInput(nn.Module):
    """A [V, n] table read scaled by √n (DeFINE's Map convention), projected to m when n != m."""

    def __init__(self, vocab_size: int, out_dim: int, table_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab_size, table_dim) * table_dim**-0.5)
        self.proj = nn.Linear(table_dim, out_dim, bias=False) if table_dim != out_dim else None
        self.projection_dim = out_dim

    def band_tables(self) -> list[Tensor]:
        return [self.weight]

    def projections(self) -> list[Tensor | None]:
        return [self.proj.weight if self.proj is not None else None]

    def forward(self, ids: Tensor, tables: list[Tensor] | None = None) -> Tensor:
        weight = self.weight if tables is None else tables[0]
        out = F.embedding(ids, weight) * math.sqrt(weight.size(1))
        return self.proj(out) if self.proj is not None else out


class DeFINEInput(nn.Module):
    """``define_ops.DeFINE``. Its Map is what an output layer ties to: the [V, n] table
    ``define.weight``, or with ``map="adaptive"`` the band tables ``define.map.bands[i].weight``
    and their projections up to n (linear, so a tied adaptive softmax reuses them, as it does with
    adaptive input)."""

    def __init__(
        self, vocab_size: int, out_dim: int, table_dim: int, cutoffs: list[int] | None = None, div_val: int = 1,
        **define_kwargs: Any,
    ) -> None:  # fmt: skip
        super().__init__()
        if define_kwargs.get("map") == "adaptive":
            define_kwargs.update(cutoffs=tuple(cutoffs or ()), adaptive_factor=div_val)
        # A host-side range check would cost a synchronisation per call on a GPU; the deferred one
        # costs none: a bad id gets a NaN row, and the trainer reads the verdict after the step's own
        # host read, naming the id before its NaN loss stops the run (Trainer._check_pending_ids).
        define_kwargs.setdefault("validate_ids", "deferred")
        self.define = define_ops.DeFINE(vocab_size, out_dim, input_dim=table_dim, **define_kwargs)
        self.adaptive = self.define.config.map == "adaptive"
        self.dims = [width for _, _, width in self.define.config.bands()]
        self.projection_dim = table_dim  # band projections map d_i → n

    def band_tables(self) -> list[Tensor]:
        if self.adaptive:
            return [band.weight for band in self.define.map.bands]
        return [self.define.weight]

    def projections(self) -> list[Tensor | None]:
        if self.adaptive:
            return [self.define.map.weights_for_band(i)[1] for i in range(len(self.dims))]
        return [None]  # the expansion is not linear: an output layer has no input projection to tie to

    def forward(self, ids: Tensor, tables: list[Tensor] | None = None) -> Tensor:
        if tables is None:
            return self.define(ids)
        names = [f"map.bands.{i}.weight" for i in range(len(tables))] if self.adaptive else ["weight"]
        return functional_call(self.define, dict(zip(names, tables, strict=True)), (ids,))


def optimizer_groups(model: nn.Module, lr: float, define_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """The model's parameters as optimizer groups: one at ``lr``, and where ``define_lr_scale`` is not 1
    a second, after it, with the DeFINE transforms' parameters (``DeFINE.transform_parameters``: the
    HGT layers and the Reduce, not the Map) at ``lr * define_lr_scale``. Plain SGD at an LSTM's rate
    (lr 20) wrecks the transform's LayerNorm/GELU stack within a few hundred steps while the LSTM
    needs that rate: see the README's language-model section for the measurements."""
    params = list(model.parameters())
    if define_lr_scale == 1.0:
        return [{"params": params}]
    transform = {id(p) for m in model.modules() if isinstance(m, define_ops.DeFINE) for p in m.transform_parameters()}
    if not transform:
        return [{"params": params}]
    return [
        {"params": [p for p in params if id(p) not in transform]},
        {"params": [p for p in params if id(p) in transform], "lr": lr * define_lr_scale},
    ]


def check_define_backend(backend: str, device: torch.device) -> None:
    """ValueError naming ``--define-backend`` where that backend cannot run on ``device``: found
    before anything is built or trained, not at the first forward."""
    try:
        define_ops.resolve_backend(backend, device)
    except define_ops.BackendUnavailableError as exc:
        raise ValueError(f"--define-backend {backend} cannot run here: {exc} (--define-backend auto picks the "
                         f"fastest one that can)") from None  # fmt: skip


def build_input(
    kind: str,
    vocab_size: int,
    out_dim: int,
    table_dim: int,
    *,
    cutoffs: list[int] | None = None,
    div_val: int = 1,
    define: dict[str, Any] | None = None,
) -> nn.Module:
    """The input layer ``kind`` ∈ {define, standard, adaptive}: ids → [*, out_dim] through tables
    of width ``table_dim`` (n)."""
    if kind == "define":
        return DeFINEInput(vocab_size, out_dim, table_dim, cutoffs=cutoffs, div_val=div_val, **(define or {}))
    if kind == "standard":
        return StandardInput(vocab_size, out_dim, table_dim)
    if kind == "adaptive":
        return AdaptiveInput(vocab_size, out_dim, table_dim, cutoffs or [], div_val)
    raise ValueError(f"unknown embedding {kind!r}; choose one of {EMBEDDINGS}")


# -------------------------------------------------------------------------------------- dropout
def locked_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Variational dropout on [T, B, D]: one mask per sequence and feature, shared by all T steps."""
    if not training or p == 0.0:
        return x
    mask = x.new_empty(1, x.size(1), x.size(2)).bernoulli_(1 - p) / (1 - p)  # [1, B, D]
    return x * mask


def embedding_dropout_tables(tables: list[Tensor], p: float, training: bool) -> list[Tensor] | None:
    """Drop whole words: zero rows of the lookup table(s), rescale the rest by 1/(1-p)
    (Gal & Ghahramani's word dropout, as AWD-LSTM applies it). None when inactive."""
    if not training or p == 0.0:
        return None
    vocab = sum(t.size(0) for t in tables)
    mask = tables[0].new_empty(vocab, 1).bernoulli_(1 - p) / (1 - p)  # [V, 1]
    out, start = [], 0
    for table in tables:
        out.append(table * mask[start : start + table.size(0)])
        start += table.size(0)
    return out


# ----------------------------------------------------------------------------------------- LSTM
class LSTMLayer(nn.Module):
    """One LSTM layer [T, B, in] → [T, B, hidden], with DropConnect on its hidden-to-hidden weights
    (AWD-LSTM's weight drop: one mask per forward call, shared by every time step)."""

    def __init__(self, input_size: int, hidden_size: int, weight_drop: float = 0.0) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size)
        self.weight_drop = weight_drop
        self.hidden_size = hidden_size

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        if self.training and self.weight_drop > 0:
            dropped = F.dropout(self.lstm.weight_hh_l0, self.weight_drop, training=True)
            return functional_call(self.lstm, {"weight_hh_l0": dropped}, (x, state))
        return self.lstm(x, state)


def detach_state(state: Any) -> Any:
    """Cut the graph between windows (truncated BPTT): every tensor in a nested tuple/list detached."""
    if isinstance(state, Tensor):
        return state.detach()
    if isinstance(state, (list, tuple)):
        return type(state)(detach_state(s) for s in state)
    return state


def state_to(state: Any, device: torch.device | str) -> Any:
    if isinstance(state, Tensor):
        return state.to(device)
    if isinstance(state, (list, tuple)):
        return type(state)(state_to(s, device) for s in state)
    return state
