"""Backend choice: ``reference`` | ``cpu`` | ``cuda`` | ``triton`` | ``auto``.

The C++ CPU and CUDA kernels share op names and the dispatcher picks them by device; Triton
kernels sit on the same devices as CUDA, so the choice between them is made here. ``auto`` may
fall back quietly; an explicitly requested backend that cannot run raises with the reason.
The environment variable ``DEFINE_OPS_BACKEND`` overrides the backend given in code.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from . import _build

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
ENV_VAR = "DEFINE_OPS_BACKEND"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


def requested_backend(backend: str) -> str:
    """The backend asked for, after the environment override; validates the name."""
    env = os.environ.get(ENV_VAR, "").strip()
    chosen = env or backend
    if chosen not in BACKENDS:
        where = f"environment variable {ENV_VAR}" if env else "backend argument"
        raise ValueError(f"define_ops: unknown backend {chosen!r} from the {where}; choose one of {BACKENDS}")
    return chosen


def _triton_runs_on(device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    if importlib.util.find_spec("define_ops.triton") is None:
        return "the Triton kernels are not part of this build of define_ops yet"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None
    return f"Triton kernels run on CUDA tensors (or on the CPU under TRITON_INTERPRET=1), got device {device}"


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run on ``device``, else the reason it cannot."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the 'cpu' backend runs on CPU tensors, got device {device}"
        if not _build.has_kernel("hgt_step", "CPU"):
            return f"the compiled CPU kernels are not loaded ({_build.EXTENSION_ERROR})"
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"the 'cuda' backend runs on CUDA tensors, got device {device}"
        if not _build.has_kernel("hgt_step", "CUDA"):
            reason = _build.EXTENSION_ERROR or "define_ops was built without CUDA kernels"
            return f"the compiled CUDA kernels are not loaded ({reason})"
        return None
    if backend == "triton":
        return _triton_runs_on(device)
    raise ValueError(f"define_ops: unknown backend {backend!r}; choose one of {BACKENDS}")


# Fastest first, per device type (measured in benchmarks/; the reference is the last resort).
_AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


@torch.compiler.assume_constant_result  # evaluated once while tracing, never a graph break
def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The concrete backend that runs ``backend`` (possibly ``auto``) on ``device``."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    # Every input of the answer is in the key: what is built and registered does not change after
    # import, the environment may (tests, DEFINE_OPS_BACKEND). Uncached, the dispatcher queries
    # and module lookups cost ~27 µs a call on a 2-core VM, on every forward.
    return _resolve(backend, device_type, os.environ.get(ENV_VAR), os.environ.get("TRITON_INTERPRET"))


@functools.cache
def _resolve(backend: str, device_type: str, env_backend: str | None, triton_interpret: str | None) -> str:
    device = torch.device(device_type)
    chosen = requested_backend(backend)
    if chosen == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ("reference",)):
            if unavailable_reason(candidate, device) is None:
                return candidate
        return "reference"
    reason = unavailable_reason(chosen, device)
    if reason is not None:
        raise BackendUnavailableError(f"define_ops: backend {chosen!r} is unavailable: {reason}")
    return chosen


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    device = torch.device(device)
    return [name for name in BACKENDS[1:] if unavailable_reason(name, device) is None]
