from __future__ import annotations

import os
import socket

# The Triton interpreter must be chosen before any @triton.jit kernel is defined.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import define_ops  # noqa: E402

HAS_CPU_KERNELS = "cpu" in define_ops.available_backends("cpu")
HAS_CUDA = torch.cuda.is_available()

requires_cpu_kernels = pytest.mark.skipif(not HAS_CPU_KERNELS, reason="compiled CPU kernels not loaded")
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(1234)
    yield


@pytest.fixture(autouse=True)
def _fresh_dynamo(request):
    # Dynamo's recompile limit counts per code object for the whole process: the many tests that
    # compile DeFINE.forward (modes, backends, dropout) must not use up each other's budget.
    if "compile" in request.node.name:
        torch._dynamo.reset()
    yield


def free_port() -> int:
    """A TCP port free on this host now: the rendezvous of a test's torch.distributed processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_within_reference_error(
    ours: torch.Tensor, ref_low: torch.Tensor, ref_high: torch.Tensor, factor: float = 2.0, floor: float = 0.0, what=""
) -> None:
    """Our low-precision result may be at most ``factor`` times as far from the float64 reference
    as the reference itself is when run in the same low precision (plus a floor relative to the
    values' magnitude, for results the reference happens to round luckily): the tolerance comes
    from the reference's own rounding error, not from a guess."""
    assert ours.shape == ref_high.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref_high.shape)}"
    ours_err = max_err(ours, ref_high)
    ref_err = max_err(ref_low, ref_high)
    scale = max(1.0, ref_high.abs().max().item()) if ref_high.numel() else 1.0
    bound = factor * ref_err + floor * scale
    assert ours_err <= bound, f"{what}: error {ours_err:.3e} > {factor} x reference error {ref_err:.3e} + {floor:.1e}"
