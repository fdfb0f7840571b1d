"""define_ops: fused, tested DeFINE embeddings for PyTorch.

    import define_ops
    embed = define_ops.DeFINE(num_embeddings=10_000, embedding_dim=400, input_dim=128, depth=7, max_groups=8)
    out = embed(token_ids)            # [*, 400], a drop-in for nn.Embedding(10_000, 400)
"""

from __future__ import annotations

from . import _build, reference
from ._backend import BACKENDS, BackendUnavailableError, available_backends, resolve_backend
from .config import PRESET_TOKENS, PRESETS, DeFINEConfig, LayerPlan
from .layer import DeFINE, GroupLayerNorm, HGTLayer, TokenIdError, check_pending_ids
from .memory import cpu_cache_stats, empty_cpu_cache
from .ops import embedding_lookup, feature_shuffle, grouped_linear, hgt_step, split_mix

__version__ = "0.1.0"
HAS_EXTENSION = _build.HAS_EXTENSION

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "DeFINE",
    "DeFINEConfig",
    "GroupLayerNorm",
    "HAS_EXTENSION",
    "HGTLayer",
    "LayerPlan",
    "PRESETS",
    "PRESET_TOKENS",
    "TokenIdError",
    "available_backends",
    "check_pending_ids",
    "cpu_cache_stats",
    "embedding_lookup",
    "empty_cpu_cache",
    "feature_shuffle",
    "grouped_linear",
    "hgt_step",
    "reference",
    "resolve_backend",
    "split_mix",
]
