"""Triton backend of define_ops: the same ops as the C++ kernels, forward and backward.

``hgt_step`` and ``embedding_lookup`` take the arguments ``define_ops.ops`` passes and are
differentiable. The ops are ``define_ops::hgt_step_triton`` / ``..._backward`` and
``define_ops::embedding_lookup_triton`` / ``..._backward``: ``torch.library.triton_op``s on a
GPU (``torch.compile`` traces into the kernels), opaque custom ops on the CPU under
``TRITON_INTERPRET=1`` (see ``_common.py``).
"""

from .embedding import embedding_lookup
from .hgt_step import hgt_step

__all__ = ["embedding_lookup", "hgt_step"]
