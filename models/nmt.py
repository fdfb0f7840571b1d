"""Transformer encoder-decoder for translation (Vaswani et al. 2017) with DeFINE or standard inputs
(define_paper.md §5.4: Transformer base with DeFINE n=128, k=1024, N=3, m=512).

Pre-norm residual blocks with a final LayerNorm on each stack, as in OpenNMT-py, which the paper's
translation runs used; ``norm_first=False`` gives the original post-norm blocks. Sinusoidal
positions are added to the input layer's output. Each side's input is ``define`` (DeFINE: an
[V, n] table expanded to m) or ``standard`` (an [V, m] table read scaled by √m, i.e. nn.Embedding);
with ``share_embeddings`` one input layer serves source, target and output (one vocabulary). The
output layer is tied to the target's lookup table: decoder state [*, m] → bias-free Linear(m → n)
→ · table[V, n]ᵀ (for a standard input n = m and the projection is left out: Vaswani's tied softmax).
With ``output_layer="untied"`` it is a [V, m] matrix of its own instead, as in a Transformer that
does not share its softmax with an embedding: the paper leaves DeFINE's tying open (§5.4), and its
68M parameters against the base model's 92M fit DeFINE inputs with an untied m-wide softmax.

Shapes are batch-first: ids [B, T], states [B, T, m]; attention runs on [B, H, T, d_head].
``decode_step`` runs the decoder one position at a time with cached keys/values (beam search).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import build_input

INPUTS = ("define", "standard")
OUTPUT_LAYERS = ("tied", "untied")


@dataclass
class NMTConfig:
    src_vocab_size: int
    tgt_vocab_size: int
    src_embedding: str = "define"  # define | standard
    tgt_embedding: str = "define"
    share_embeddings: bool = False  # one input layer for source, target and output (needs one vocabulary)
    table_dim: int = 128  # n of a DeFINE input (a standard input's table is d_model wide)
    d_model: int = 512  # m
    n_heads: int = 8
    ffn_dim: int = 2048
    encoder_layers: int = 6
    decoder_layers: int = 6
    dropout: float = 0.1  # on embeddings + positions and on every residual branch
    attention_dropout: float = 0.1
    activation_dropout: float = 0.1  # after the FFN's ReLU
    norm_first: bool = True
    max_positions: int = 1024
    pad_id: int = 0
    define: dict[str, Any] = field(default_factory=dict)  # DeFINE settings (max_dim, depth, max_groups, dropout, ...)
    output_layer: str = "tied"  # tied (to the target's [V, n] table, through m → n) | untied (its own [V, m])


def sinusoid_table(length: int, dim: int) -> Tensor:
    """[length, dim]: even features sin(p·f_i), odd features cos(p·f_i), f_i = 10000^(-2i/dim)."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq)
    return table


class Attention(nn.Module):
    """Multi-head attention; ``cache`` holds keys/values for incremental decoding."""

    def __init__(self, c: NMTConfig) -> None:
        super().__init__()
        self.heads, self.dropout = c.n_heads, c.attention_dropout
        self.q = nn.Linear(c.d_model, c.d_model)
        self.kv = nn.Linear(c.d_model, 2 * c.d_model)
        self.out = nn.Linear(c.d_model, c.d_model)

    def _split(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # [B, H, T, dh]

    def forward(
        self, x: Tensor, source: Tensor, *, mask: Tensor | None = None, causal: bool = False,
        cache: dict[str, Tensor] | None = None, static: bool = False,
    ) -> Tensor:  # fmt: skip
        """x [B, T, m] attends to ``source`` [B, S, m]; ``mask`` [B, 1, 1, S] is True where a key may be
        read. With ``cache``: ``static`` keys (cross-attention) are computed once, others appended."""
        q = self._split(self.q(x))
        if cache is not None and static and "k" in cache:
            k, v = cache["k"], cache["v"]
        else:
            k, v = (self._split(t) for t in self.kv(source).chunk(2, dim=-1))
            if cache is not None:
                if not static and "k" in cache:
                    k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        b, _, t, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Sequential):
    def __init__(self, c: NMTConfig) -> None:
        super().__init__(
            nn.Linear(c.d_model, c.ffn_dim), nn.ReLU(), nn.Dropout(c.activation_dropout),
            nn.Linear(c.ffn_dim, c.d_model),
        )  # fmt: skip


class Block(nn.Module):
    """Self-attention (+ cross-attention in the decoder) and FFN, each a residual branch."""

    def __init__(self, c: NMTConfig, cross: bool) -> None:
        super().__init__()
        self.norm_first = c.norm_first
        self.self_attn = Attention(c)
        self.cross_attn = Attention(c) if cross else None
        self.ffn = FeedForward(c)
        self.norms = nn.ModuleList(nn.LayerNorm(c.d_model) for _ in range(3 if cross else 2))
        self.drop = nn.Dropout(c.dropout)

    def _residual(self, x: Tensor, norm: nn.Module, branch) -> Tensor:
        if self.norm_first:
            return x + self.drop(branch(norm(x)))
        return norm(x + self.drop(branch(x)))

    def forward(
        self, x: Tensor, *, self_mask: Tensor | None = None, causal: bool = False, memory: Tensor | None = None,
        memory_mask: Tensor | None = None, cache: dict[str, dict[str, Tensor]] | None = None,
    ) -> Tensor:  # fmt: skip
        x = self._residual(x, self.norms[0], lambda h: self.self_attn(
            h, h, mask=self_mask, causal=causal, cache=None if cache is None else cache["self"]))  # fmt: skip
        if self.cross_attn is not None:
            x = self._residual(x, self.norms[1], lambda h: self.cross_attn(
                h, memory, mask=memory_mask, cache=None if cache is None else cache["cross"], static=True))  # fmt: skip
        return self._residual(x, self.norms[-1], self.ffn)


class Transformer(nn.Module):
    def __init__(self, config: NMTConfig) -> None:
        super().__init__()
        c = self.config = config
        for kind in (c.src_embedding, c.tgt_embedding):
            if kind not in INPUTS:
                raise ValueError(f"unknown embedding {kind!r}; choose one of {INPUTS}")
        if c.d_model % c.n_heads:
            raise ValueError(f"d_model {c.d_model} is not divisible by {c.n_heads} heads")
        if c.output_layer not in OUTPUT_LAYERS:
            raise ValueError(f"unknown output_layer {c.output_layer!r}; choose one of {OUTPUT_LAYERS}")
        if c.share_embeddings and (c.src_vocab_size != c.tgt_vocab_size or c.src_embedding != c.tgt_embedding):
            raise ValueError("shared embeddings need one vocabulary and the same embedding on both sides")
        self.encoder = nn.ModuleList(Block(c, cross=False) for _ in range(c.encoder_layers))
        self.decoder = nn.ModuleList(Block(c, cross=True) for _ in range(c.decoder_layers))
        for p in (*self.encoder.parameters(), *self.decoder.parameters()):
            if p.dim() > 1:  # Xavier-uniform matrices (OpenNMT-py's -param_init_glorot); input layers keep their own
                nn.init.xavier_uniform_(p)
        self.encoder_norm = nn.LayerNorm(c.d_model) if c.norm_first else nn.Identity()
        self.decoder_norm = nn.LayerNorm(c.d_model) if c.norm_first else nn.Identity()
        self.src_embed = self._input(c.src_embedding, c.src_vocab_size)
        self.tgt_embed = self.src_embed if c.share_embeddings else self._input(c.tgt_embedding, c.tgt_vocab_size)
        self.output = None  # the untied softmax matrix, [V, m] as an nn.Linear(m → V)
        if c.output_layer == "untied":
            self.output = nn.Linear(c.d_model, c.tgt_vocab_size, bias=False)
            nn.init.normal_(self.output.weight, std=c.d_model**-0.5)  # as a standard input's table
        table_width = self.output_table().size(1) if self.output is None else c.d_model  # n where tied
        self.out_proj = nn.Linear(c.d_model, table_width, bias=False) if table_width != c.d_model else None
        if self.out_proj is not None:
            nn.init.xavier_uniform_(self.out_proj.weight)
        self.drop = nn.Dropout(c.dropout)
        self.register_buffer("positions", sinusoid_table(c.max_positions, c.d_model), persistent=False)

    def _input(self, kind: str, vocab_size: int) -> nn.Module:
        c = self.config
        if kind == "define":
            define = {"padding_idx": c.pad_id, **c.define}
            return build_input("define", vocab_size, c.d_model, c.table_dim, define=define)
        return build_input("standard", vocab_size, c.d_model, c.d_model)

    def output_table(self) -> Tensor:
        """The target side's [V, n] lookup table, which the output layer reuses."""
        return self.tgt_embed.band_tables()[0]

    # ------------------------------------------------------------------ pieces
    def _positioned(self, vectors: Tensor, start: int = 0) -> Tensor:
        """Input vectors [B, T, m] of the positions start… → plus their sinusoids, then dropout."""
        t = vectors.size(1)
        if start + t > self.config.max_positions:
            raise ValueError(f"sequence of {start + t} tokens exceeds max_positions={self.config.max_positions}")
        return self.drop(vectors + self.positions[start : start + t].to(vectors.device))

    def _embed(self, embed: nn.Module, ids: Tensor, start: int = 0) -> Tensor:
        return self._positioned(embed(ids), start)  # ids [B, T] → [B, T, m]

    def embed_pair(self, src: Tensor, tgt_in: Tensor) -> tuple[Tensor, Tensor]:
        """Both sides' inputs, src [B, S] and tgt_in [B, T] → [B, S, m], [B, T, m]. With one shared
        input layer it runs once on both sides' ids: a DeFINE call costs a fixed number of kernel
        launches and of host work whatever its token count (the eager GPU step is host-bound), so
        one call on S + T tokens costs about half of two calls."""
        if self.src_embed is not self.tgt_embed:
            return self._embed(self.src_embed, src), self._embed(self.tgt_embed, tgt_in)
        vectors = self.src_embed(torch.cat([src.reshape(-1), tgt_in.reshape(-1)]))  # [B·S + B·T, m]
        src_vectors, tgt_vectors = vectors.split([src.numel(), tgt_in.numel()])
        return (self._positioned(src_vectors.view(*src.shape, -1)),
                self._positioned(tgt_vectors.view(*tgt_in.shape, -1)))  # fmt: skip

    def encode(self, src: Tensor, inputs: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """src [B, S] → (memory [B, S, m], key mask [B, 1, 1, S]: True on real tokens). ``inputs``:
        src's input vectors where the caller has them (``embed_pair``)."""
        mask = (src != self.config.pad_id)[:, None, None, :]
        x = self._embed(self.src_embed, src) if inputs is None else inputs
        for block in self.encoder:
            x = block(x, self_mask=mask)
        return self.encoder_norm(x), mask

    def decode(self, tgt_in: Tensor, memory: Tensor, memory_mask: Tensor, inputs: Tensor | None = None) -> Tensor:
        """Teacher-forced decoder: tgt_in [B, T] → states [B, T, m]. Padding sits after the real
        tokens, so the causal mask alone keeps real positions from reading it. ``inputs``: tgt_in's
        input vectors where the caller has them."""
        x = self._embed(self.tgt_embed, tgt_in) if inputs is None else inputs
        for block in self.decoder:
            x = block(x, causal=True, memory=memory, memory_mask=memory_mask)
        return self.decoder_norm(x)

    def logits(self, h: Tensor) -> Tensor:
        """States [*, m] → scores [*, V] through the tied table (projected m → n first) or the untied matrix."""
        if self.output is not None:
            return self.output(h)
        if self.out_proj is not None:
            h = self.out_proj(h)
        return F.linear(h, self.output_table())

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """src [B, S], tgt_in [B, T] → logits [B, T, V_tgt]."""
        src_inputs, tgt_inputs = self.embed_pair(src, tgt_in)
        memory, mask = self.encode(src, src_inputs)
        return self.logits(self.decode(tgt_in, memory, mask, tgt_inputs))

    # ------------------------------------------------------------------ incremental decoding
    def init_cache(self) -> list[dict[str, dict[str, Tensor]]]:
        return [{"self": {}, "cross": {}} for _ in self.decoder]

    def decode_step(self, tokens: Tensor, step: int, memory: Tensor, memory_mask: Tensor, cache: list) -> Tensor:
        """The last tokens [N, 1] at position ``step`` → logits [N, V], extending ``cache``."""
        x = self._embed(self.tgt_embed, tokens, start=step)
        for block, layer_cache in zip(self.decoder, cache, strict=True):
            x = block(x, memory=memory, memory_mask=memory_mask, cache=layer_cache)
        return self.logits(self.decoder_norm(x))[:, -1]

    @staticmethod
    def reorder_cache(cache: list, order: Tensor) -> None:
        """Keep rows ``order`` of the self-attention caches (beam search). Cross-attention keys
        are left alone: beams only move within their sentence, whose rows hold the same memory."""
        for layer_cache in cache:
            for name in ("k", "v"):
                layer_cache["self"][name] = layer_cache["self"][name].index_select(0, order)


def count_parameters(model: Transformer) -> dict[str, int]:
    """Distinct parameters of the input layers (shared ones once), the output projection, the
    encoder and decoder stacks (with their final norms), and the total."""
    seen: set[int] = set()

    def total(*modules: nn.Module | None) -> int:
        n = 0
        for module in modules:
            for p in module.parameters() if module is not None else ():
                if id(p) not in seen:
                    seen.add(id(p))
                    n += p.numel()
        return n

    parts = {
        "src_embed": total(model.src_embed), "tgt_embed": total(model.tgt_embed), "out_proj": total(model.out_proj),
        "output": total(model.output),
        "encoder": total(model.encoder, model.encoder_norm), "decoder": total(model.decoder, model.decoder_norm),
    }  # fmt: skip
    parts["total"] = sum(parts.values())
    assert parts["total"] == sum(p.numel() for p in model.parameters())
    return parts
