"""Transformer-XL (Dai et al. 2019) with a DeFINE input (define_paper.md §5.2).

Segments of ``tgt_len`` tokens attend to themselves and to a memory of the previous ``mem_len``
hidden states of every layer (kept without gradient), through relative positional attention:
score(i, j) = (q_i + u)·k_j + (q_i + v)·W_r r_{i-j}, with sinusoid r and learned global biases
u, v. Positions beyond ``clamp_len`` share the embedding of ``clamp_len``. Evaluation runs with
its own (usually longer) memory, ``eval_mem_len``. Post-norm residual blocks, as in the base model.

Shapes are sequence-first: [T, B] ids, [T, B, d] hidden states, memories [M, B, d].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adaptive import AdaptiveSoftmax, check_cutoffs, slice_bands
from .common import LMOutput, build_input


@dataclass
class TransformerXLConfig:
    vocab_size: int
    embedding: str = "define"  # define | standard | adaptive
    table_dim: int = 384  # n: lookup-table width (the tied output space)
    d_model: int = 384  # m
    n_layer: int = 16
    n_head: int = 10
    d_head: int = 41
    d_inner: int = 1920
    dropout: float = 0.1
    dropatt: float = 0.0
    tgt_len: int = 150
    mem_len: int = 150
    eval_mem_len: int = 150
    clamp_len: int = 0  # 0: no clamping
    cutoffs: list[int] = field(default_factory=list)
    div_val: int = 1
    tie: bool = True
    define: dict[str, Any] = field(default_factory=dict)


def sinusoid(positions: Tensor, dim: int) -> Tensor:
    """positions [R] → [R, dim]: [sin(p·f) ‖ cos(p·f)], f_i = 10000^(-2i/dim)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2.0, device=positions.device) / dim))
    angles = positions[:, None] * inv_freq[None, :]  # [R, dim/2]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def rel_shift(x: Tensor) -> Tensor:
    """[T, R, B, H] scores indexed by relative distance → aligned to key positions: row i moves
    left by (T - 1 - i), the standard pad-and-reshape trick."""
    t, r = x.size(0), x.size(1)
    padded = torch.cat([x.new_zeros(t, 1, *x.shape[2:]), x], dim=1)  # [T, R + 1, B, H]
    return padded.view(r + 1, t, *x.shape[2:])[1:].view_as(x)


class RelMultiHeadAttention(nn.Module):
    def __init__(self, c: TransformerXLConfig) -> None:
        super().__init__()
        self.n_head, self.d_head = c.n_head, c.d_head
        inner = c.n_head * c.d_head
        self.qkv = nn.Linear(c.d_model, 3 * inner, bias=False)
        self.r_net = nn.Linear(c.d_model, inner, bias=False)
        self.out = nn.Linear(inner, c.d_model, bias=False)
        self.norm = nn.LayerNorm(c.d_model)
        self.drop, self.dropatt = nn.Dropout(c.dropout), nn.Dropout(c.dropatt)
        self.scale = c.d_head**-0.5

    def forward(self, h: Tensor, r: Tensor, u: Tensor, v: Tensor, mask: Tensor, mem: Tensor) -> Tensor:
        t, b = h.size(0), h.size(1)
        cat = torch.cat([mem, h], dim=0)  # [K = M + T, B, d]
        k_len = cat.size(0)
        q, k, val = self.qkv(cat).chunk(3, dim=-1)  # each [K, B, H*dh]
        q = q[-t:].view(t, b, self.n_head, self.d_head)  # [T, B, H, dh]
        k = k.view(k_len, b, self.n_head, self.d_head)  # [K, B, H, dh]
        val = val.view(k_len, b, self.n_head, self.d_head)
        r_k = self.r_net(r).view(k_len, self.n_head, self.d_head)  # [K, H, dh]
        content = torch.einsum("ibnd,jbnd->ijbn", q + u, k)  # [T, K, B, H]
        position = rel_shift(torch.einsum("ibnd,jnd->ijbn", q + v, r_k))  # [T, K, B, H]
        score = (content + position) * self.scale
        score = score.float().masked_fill(mask[:, :, None, None], float("-inf"))
        prob = self.dropatt(F.softmax(score, dim=1).to(val.dtype))  # over keys j
        attended = torch.einsum("ijbn,jbnd->ibnd", prob, val).reshape(t, b, -1)  # [T, B, H*dh]
        return self.norm(h + self.drop(self.out(attended)))


class TXLBlock(nn.Module):
    def __init__(self, c: TransformerXLConfig) -> None:
        super().__init__()
        self.attn = RelMultiHeadAttention(c)
        self.ff = nn.Sequential(
            nn.Linear(c.d_model, c.d_inner), nn.ReLU(), nn.Dropout(c.dropout),
            nn.Linear(c.d_inner, c.d_model), nn.Dropout(c.dropout),
        )  # fmt: skip
        self.norm = nn.LayerNorm(c.d_model)

    def forward(self, h: Tensor, r: Tensor, u: Tensor, v: Tensor, mask: Tensor, mem: Tensor) -> Tensor:
        h = self.attn(h, r, u, v, mask, mem)
        return self.norm(h + self.ff(h))


class TransformerXL(nn.Module):
    def __init__(self, config: TransformerXLConfig) -> None:
        super().__init__()
        c = self.config = config
        self.embed = build_input(
            c.embedding, c.vocab_size, c.d_model, c.table_dim, cutoffs=c.cutoffs, div_val=c.div_val, define=c.define
        )
        self.drop = nn.Dropout(c.dropout)
        self.layers = nn.ModuleList(TXLBlock(c) for _ in range(c.n_layer))
        self.u = nn.Parameter(torch.zeros(c.n_head, c.d_head))  # global content bias
        self.v = nn.Parameter(torch.zeros(c.n_head, c.d_head))  # global position bias
        self.bounds = check_cutoffs(c.cutoffs, c.vocab_size)
        tables = self.embed.band_tables()
        dims = [t.size(1) for t in tables] if len(tables) == len(self.bounds) else [c.table_dim] * len(self.bounds)
        projections = self.embed.projections()
        self.tied_proj = [c.tie and p is not None for p in self._per_band(projections)]
        self.softmax = AdaptiveSoftmax(
            c.vocab_size, c.d_model, c.cutoffs, dims, tied=c.tie, tied_projections=self.tied_proj, bias=True
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if name.startswith(("embed.", "softmax.")):
                continue
            if p.dim() >= 2 or name in ("u", "v"):
                nn.init.normal_(p, 0.0, 0.02)
            elif name.endswith("bias") and ".norm." not in name:
                nn.init.zeros_(p)

    def _per_band(self, items: list) -> list:
        return items if len(items) == len(self.bounds) else items * len(self.bounds)

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> list[Tensor]:
        device = device or self.u.device
        return [torch.zeros(0, batch_size, self.config.d_model, device=device) for _ in self.layers]  # [M=0, B, d]

    def hidden_states(self, ids: Tensor, mems: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """ids [T, B], memories [M, B, d] per layer → last layer's output [T, B, d], new memories."""
        c = self.config
        t = ids.size(0)
        m = mems[0].size(0)
        h = self.drop(self.embed(ids))  # [T, B, d]
        mems = [mem.to(h.dtype) for mem in mems]
        k_len = m + t
        # query i (absolute m + i) may see keys j <= m + i
        mask = torch.ones(t, k_len, dtype=torch.bool, device=ids.device).triu(diagonal=1 + m)  # [T, K], True = hidden
        positions = torch.arange(k_len - 1, -1, -1.0, device=ids.device)  # distances K-1 … 0
        if c.clamp_len > 0:
            positions = positions.clamp(max=c.clamp_len)
        r = self.drop(sinusoid(positions, c.d_model).to(h.dtype))  # [K, d]
        hiddens = []
        for layer, mem in zip(self.layers, mems, strict=True):
            hiddens.append(h)
            h = layer(h, r, self.u, self.v, mask, mem)
        h = self.drop(h)
        mem_len = c.mem_len if self.training else c.eval_mem_len
        with torch.no_grad():  # memories carry no gradient into the next segment
            new_mems = [
                torch.cat([mem, x], dim=0)[-mem_len:] if mem_len else mem for mem, x in zip(mems, hiddens, strict=True)
            ]  # [min(M + T, mem_len), B, d] per layer
        return h, new_mems

    def forward(self, ids: Tensor, target: Tensor, mems: list[Tensor]) -> LMOutput:
        c = self.config
        h, new_mems = self.hidden_states(ids, mems)
        tables = self.embed.band_tables()
        tables = tables if len(tables) == len(self.bounds) else slice_bands(tables[0], self.bounds)
        nll = self.softmax(
            h.reshape(-1, c.d_model),  # [T * B, d]
            target.reshape(-1),
            tables if c.tie else None,
            self._per_band(self.embed.projections()),
        )
        return LMOutput(nll.mean(), new_mems, nll.new_zeros(()))
