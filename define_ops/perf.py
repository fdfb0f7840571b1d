"""Measurement helpers shared by benchmarks/ and tests/: kernel-launch counts from the torch
profiler, the card's ceilings (bf16 matmul rate, copy bandwidth) and the floor of a preset.

The floor of a forward + backward of the whole layer is max(FLOPs / matmul rate, bytes that must
move / copy bandwidth), with both ceilings measured in the same run (../shared/docs/baseline.md).
The bytes that must move: the ids, the looked-up table rows (read) and their gradient rows
(written), the output (written) and its gradient (read), and every parameter except the table read
twice (forward, backward) and its gradient written once. Activations between layers are not
counted: a fully fused unit would never store them.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

import torch

from .config import DeFINEConfig


def kernel_launches(fn: Callable[[], object], warmup: int = 1) -> dict:
    """Runs ``fn`` under the profiler; returns {"kernels": [names], "memsets": n, "memcpys": n}
    for the device activity it caused (after ``warmup`` unprofiled calls)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels, memsets, memcpys = [], 0, 0
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = event.name
        if name.startswith("Memset"):
            memsets += 1
        elif name.startswith("Memcpy"):
            memcpys += 1
        else:
            kernels.append(name)
    return {"kernels": kernels, "memsets": memsets, "memcpys": memcpys}


def ours(kernel_names: list[str]) -> list[str]:
    """The kernels of this package (the rest are cuBLAS / ATen)."""
    return [name for name in kernel_names if "define_ops" in name]


def _time_ms(fn: Callable[[], object], rounds: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(rounds):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / rounds
    begin = time.perf_counter()
    for _ in range(rounds):
        fn()
    return (time.perf_counter() - begin) * 1e3 / rounds


def measure_ceilings(device: torch.device | str, quick: bool = False) -> dict:
    """The card's matmul rate (bf16 8192³ on a GPU; fp32 on the CPU) in TFLOP/s and its copy
    bandwidth (bytes read + written) in TB/s, means of timed rounds after warm-ups."""
    device = torch.device(device)
    gpu = device.type == "cuda"
    size = (8192 if gpu else 2048) if not quick else (2048 if gpu else 256)
    dtype = torch.bfloat16 if gpu else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    matmul_ms = _time_ms(lambda: a @ b, rounds=10, warmup=3, device=device)
    numel = (1 << 29 if gpu else 1 << 22) if not quick else 1 << 22  # 1 GiB of bf16 on a GPU
    src = torch.empty(numel, device=device, dtype=torch.bfloat16).fill_(1)
    dst = torch.empty_like(src)
    copy_ms = _time_ms(lambda: dst.copy_(src), rounds=10, warmup=3, device=device)
    return {
        "matmul_tflops": 2 * size**3 / (matmul_ms * 1e-3) / 1e12,
        "matmul_dtype": str(dtype).replace("torch.", ""),
        "copy_tbps": 2 * numel * src.element_size() / (copy_ms * 1e-3) / 1e12,
    }


def floor_ms(config: DeFINEConfig, tokens: int, ceilings: dict, dtype_bytes: int = 2) -> dict:
    """Lower bound of one forward + backward of the whole layer at ``tokens`` tokens."""
    flops = 2 * config.macs_per_token() * tokens * 3
    table = config.num_embeddings * config.input_dim if config.map == "table" else 0
    params = config.num_parameters() - table
    moved = tokens * 8  # ids
    moved += 2 * tokens * config.input_dim * dtype_bytes  # table rows read, their gradient rows written
    moved += 2 * tokens * config.embedding_dim * dtype_bytes  # output written, its gradient read
    moved += 3 * params * dtype_bytes  # parameters read twice, gradients written once
    compute_ms = flops / (ceilings["matmul_tflops"] * 1e12) * 1e3
    memory_ms = moved / (ceilings["copy_tbps"] * 1e12) * 1e3
    return {
        "floor_ms": max(compute_ms, memory_ms),
        "floor_bound": "flops" if compute_ms >= memory_ms else "bytes",
        "floor_compute_ms": compute_ms,
        "floor_memory_ms": memory_ms,
        "gflop_fwd_bwd": flops / 1e9,
        "mbytes_moved": moved / 1e6,
    }


def driver_version() -> str | None:
    """The NVIDIA driver version from nvidia-smi, or None."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
