"""Triton's own launch path on a machine without a GPU: a stand-in CUDA driver (for tests and host profiling).

Under ``TRITON_INTERPRET=1`` the kernels run, but through the interpreter: none of the code that an
eager launch on a GPU runs (autotuner, ``JITFunction.run``, argument specialization, the compiled
kernel's launcher) is exercised. With this driver installed instead (``install()``, in a process
where TRITON_INTERPRET is unset, before the first launch), launches take that real path: each
kernel is compiled for ``TARGET`` (to cubin, with the ptxas that the triton wheel bundles) and
"launched" by a Python launcher that reads each tensor's address, as the C launcher does, and
runs nothing. Outputs are then uninitialised memory: what this measures and checks is host work
and which compiled kernel each launch picks, never values.

Used by ``tests/test_triton_launch.py`` (the eager launch path picks the same compiled kernels,
grids and arguments as the autotuner's) and ``scripts/host_profile.py --fake-driver`` (the eager
Triton step's host time, Triton's launcher included).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

TARGET = GPUTarget("cuda", 90, 32)  # an H100 / H200


@dataclass(frozen=True)
class Launch:
    """One launch as the launcher saw it: the compiled kernel (its hash names the binary, and so
    the config and specialization), the grid and each argument (tensors by layout, not address)."""

    kernel: str
    binary: str
    grid: tuple[int, int, int]
    args: tuple


@dataclass
class _Recorder:
    launches: list[Launch] = field(default_factory=list)
    recording: bool = False


RECORDER = _Recorder()


def _describe(arg: Any) -> Any:
    if isinstance(arg, torch.Tensor):
        return ("tensor", tuple(arg.shape), arg.stride(), str(arg.dtype))
    return arg


def _launcher(src: Any, metadata: Any) -> Any:
    name, binary = metadata.name, metadata.hash

    def run(grid_0, grid_1, grid_2, stream, function, packed, launch_metadata, enter_hook, exit_hook, *args):
        for arg in args:  # what the C launcher does per pointer argument
            if isinstance(arg, torch.Tensor):
                arg.data_ptr()
        if RECORDER.recording:
            RECORDER.launches.append(Launch(name, binary, (grid_0, grid_1, grid_2), tuple(map(_describe, args))))

    return run


class _Utils:
    def load_binary(self, name, kernel, shared, device):  # module, function, registers, spills, max threads
        return 1, 1, 32, 0, 1024

    def get_device_properties(self, device):
        from define_ops.triton._aot import SMEM_LIMIT  # the per-arch limits the ahead-of-time check uses

        return {"max_shared_mem": SMEM_LIMIT[TARGET.arch], "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32}  # fmt: skip

    def unload_module(self, module):
        pass


class FakeCudaDriver:
    """Just enough of Triton's driver interface for compiling and launching (see the module docstring).

    Its benchmarker times the n-th config it is asked about at 1/n ms, so the autotuner picks the
    last config it benchmarks: a launch path that ignored the autotuner's choice (say, took the
    first config) would launch a different binary than the autotuner does.
    """

    def __init__(self) -> None:
        self.utils = _Utils()
        self.launcher_cls = _launcher
        self.bench_calls = 0

    def is_active(self) -> bool:
        return True

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return TARGET

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_benchmarker(self) -> Any:
        def bench(kernel_call, quantiles=None, **kwargs):
            kernel_call()
            self.bench_calls += 1
            ms = 1.0 / self.bench_calls
            return [ms, ms, ms] if quantiles else ms

        return bench

    def get_empty_cache_for_benchmark(self) -> torch.Tensor:
        return torch.empty(16)

    def clear_cache(self, cache: torch.Tensor) -> None:
        pass


def install() -> None:
    """Make this process launch Triton kernels through ``FakeCudaDriver``, and let define_ops's
    Triton backend take CPU tensors (there it asks for CUDA tensors or the interpreter)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the fake driver replaces the interpreter: unset TRITON_INTERPRET before importing triton")
    from define_ops import _backend

    # Its own cache directory: the autotuner keeps its choices on disk, and choices made on the
    # stand-in benchmarker's made-up timings must never reach a run on a GPU (same target, same key).
    knobs.cache.dir = os.path.join(knobs.cache.dir, "fake-driver")
    driver.set_active(FakeCudaDriver())
    _backend._triton_runs_on = lambda device: None
    _backend._resolve.cache_clear()
