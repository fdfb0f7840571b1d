"""The pool of large CPU buffers that the compiled CPU kernels allocate from.

glibc returns every freed allocation above 32 MiB to the system and maps fresh, zeroed pages for
the next one, so a training step that allocates the same large buffers every step (the stack's
saved activations, the dense ``[V, n]`` table gradient) paid for page faults every step. The
kernels' buffers of 8 MiB or more come from a pool instead (csrc/common/cpu_buffer_pool.h): freed
blocks are kept and handed to later requests of about the same size, as PyTorch's CUDA caching
allocator does on the GPU. At ``lstm_wt103`` (8,400 tokens, float32, 2 threads of a 2-core VM) the
layer's forward + backward took 733 ms without it and 589 ms with it (README, Results on the CPU).

``DEFINE_OPS_CPU_CACHE_MB`` (read once, default 2048) bounds the memory kept in freed blocks (the
oldest go first); 0 turns the pool off. ``empty_cpu_cache()`` releases what is kept now.
"""

from __future__ import annotations

import torch

from . import _build


def cpu_cache_stats() -> dict[str, int]:
    """The pool's state: bytes and blocks kept for reuse now, and how many requests it served from
    them (``hits``) or from new memory (``misses``). All zero without the compiled kernels."""
    if not _build.HAS_EXTENSION:
        return {"cached_bytes": 0, "cached_blocks": 0, "hits": 0, "misses": 0}
    cached_bytes, cached_blocks, hits, misses = torch.ops.define_ops.cpu_cache_stats()
    return {"cached_bytes": cached_bytes, "cached_blocks": cached_blocks, "hits": hits, "misses": misses}


def empty_cpu_cache() -> None:
    """Give every buffer the pool keeps back to the system (buffers in use stay)."""
    if _build.HAS_EXTENSION:
        torch.ops.define_ops.empty_cpu_cache()
