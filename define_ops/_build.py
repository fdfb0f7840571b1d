"""Loads the compiled kernels (``define_ops._C``), or says once, clearly, why they are missing.

Importing ``_C`` runs its static ``TORCH_LIBRARY`` registrations, after which the ops are reached
through ``torch.ops.define_ops``. Without it, ``define_ops`` still works on the reference (and,
where Triton runs, the Triton) backend.
"""

from __future__ import annotations

import warnings

import torch

EXTENSION_ERROR: str | None = None

try:
    from . import _C  # noqa: F401
except (ImportError, OSError) as exc:  # missing build, ABI mismatch, missing shared library
    EXTENSION_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "define_ops: the compiled kernels could not be loaded, so only the 'reference' backend (and "
        f"'triton' where it runs) is available. Reason: {EXTENSION_ERROR}. Rebuild against the torch you run "
        "with: `pip install --no-build-isolation .`",
        RuntimeWarning,
        stacklevel=2,
    )

HAS_EXTENSION = EXTENSION_ERROR is None


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``define_ops::<op>`` has a compiled kernel for ``dispatch_key`` ("CPU", "CUDA")."""
    if not HAS_EXTENSION:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"define_ops::{op}", dispatch_key)
