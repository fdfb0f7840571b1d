"""Ahead-of-time compile check of every Triton kernel for sm_80 and sm_90, without a GPU.

The interpreter accepts programs the GPU compiler rejects (and vice versa), so CI also
compiles each kernel to PTX and cubin. The launches are not written out by hand: the real
launchers run on meta tensors with ``launch`` replaced by a recorder, so the check compiles
exactly the argument lists, flags and (pruned) autotune configs that a GPU run would use.

Run in a process WITHOUT ``TRITON_INTERPRET=1`` (``@triton.jit`` must build real JIT functions):

    python -m define_ops.triton._aot [--jobs N]
"""

import argparse
import importlib
import logging
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise SystemExit("define_ops.triton._aot: run without TRITON_INTERPRET=1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

# The package re-exports functions under the submodules' names: fetch the modules themselves.
hgt_step = importlib.import_module("define_ops.triton.hgt_step")
embedding = importlib.import_module("define_ops.triton.embedding")

# (dtype, archs): the half and single precision kernels on both; float64 (run by the GPU parity
# tests) on sm_90, the H100/H200 those tests run on.
TARGETS = [(torch.float16, (80, 90)), (torch.bfloat16, (80, 90)), (torch.float32, (80, 90)), (torch.float64, (90,))]
ARCHS = (80, 90)
# Shared memory per block (bytes) on each arch.
SMEM_LIMIT = {80: 166912, 90: 232448}
_TYPE_NAMES = {
    torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
    torch.int64: "i64", torch.int32: "i32",
}  # fmt: skip


def _record(calls: list) -> Any:
    def fake_launch(kernel, tuned, grid, args, flags, interpret_meta, gpu_meta=None):
        calls.append((kernel, tuned, args, flags, gpu_meta))

    return fake_launch


def _scenarios(dtype: torch.dtype) -> list:
    """Launches of every kernel and flag combination the layer uses, at preset-like sizes."""
    calls: list = []
    originals = hgt_step.launch, embedding.launch
    hgt_step.launch = embedding.launch = _record(calls)
    try:
        _run_scenarios(dtype)
    finally:
        hgt_step.launch, embedding.launch = originals
    return calls


def _run_scenarios(dtype: torch.dtype) -> None:
    meta = dict(device="meta", dtype=dtype)
    seed = torch.empty((), device="meta", dtype=torch.int64)
    tokens = 4096

    rows = torch.empty(1, device="meta", dtype=torch.int64)  # dedup's device-side row count

    def step(a, g, b, n, e_in, e_out, shuffle, norm, act, p, bias=True, transposed=False, row_count=None):
        x = torch.empty(tokens, a, **meta)
        w = torch.empty(b, a, **meta).t().unsqueeze(0) if transposed else torch.empty(g, a // g, b // g, **meta)
        bb = torch.empty(b, **meta) if bias else None
        gamma = torch.empty(b // g, **meta) if norm else None
        beta = torch.empty(b // g, **meta) if norm else None
        args = (x, w, bb, gamma, beta, seed if p else None, n, e_in, e_out, shuffle, act, p, 1e-5)
        out, saved, mean, rstd = hgt_step._forward(*args, run=True, row_count=row_count)
        grad = torch.empty(out.shape, **meta)
        hgt_step._backward(grad, *args[:6], saved, mean, rstd, *args[6:], run=True, row_count=row_count)

    step(256, 1, 512, 256, 1, 2, False, True, "gelu", 0.1)  # first layer, fused norm over a 512-wide group
    step(768, 2, 768, 256, 2, 1, True, False, "relu", 0.1, bias=False)  # shuffle without norm or bias
    step(864, 4, 568, 384, 4, 2, True, True, "swish", 0.1)  # shuffle + norm: row-wise epilogue
    step(3248, 1, 4096, 384, 1, 1, False, True, "gelu", 0.0)  # norm group too wide to fuse
    step(1280, 1, 256, 256, 1, 0, False, False, "none", 0.0, transposed=True)  # Reduce layer
    # the same kernels with dedup's row count (HAS_ROWS: device-side count, early exit)
    step(256, 1, 512, 256, 1, 2, False, True, "gelu", 0.1, row_count=rows)
    step(864, 4, 568, 384, 4, 2, True, True, "swish", 0.1, row_count=rows)
    step(1280, 1, 256, 256, 1, 0, False, False, "none", 0.0, transposed=True, row_count=rows)
    table = torch.empty(1000, 256, **meta)
    ids = torch.empty(tokens, device="meta", dtype=torch.int64)
    embedding._lookup(table, ids, 0, 16.0, run=True)
    embedding._lookup_backward(torch.empty(tokens, 256, **meta), ids, 1000, 0, 16.0, run=True)  # no sort
    many = torch.empty(2 * embedding.SMALL_BATCH_TOKENS + 1, device="meta", dtype=torch.int64)
    embedding._lookup_backward(torch.empty(many.numel(), 256, **meta), many, 1000, 0, 16.0, run=True)  # sorted


def _signature(kernel, args: tuple, constexprs: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    signature: dict[str, str] = {}
    constants = dict(constexprs)
    positional = [p.name for p in kernel.params if not p.is_constexpr]
    for name, value in zip(positional, args, strict=True):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPE_NAMES[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:  # the runtime specializes ints equal to 1 as constants
                signature[name], constants[name] = "constexpr", 1
            else:
                signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value is None:
            signature[name], constants[name] = "constexpr", None
        else:
            raise TypeError(f"{kernel.fn.__name__}: cannot type argument {name}={value!r}")
    for p in kernel.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
    ordered = {p.name: signature[p.name] for p in kernel.params}
    return ordered, constants


def _launches() -> list[tuple[str, str, int, list[tuple]]]:
    """(label, kernel name, arch, candidate builds) per distinct launch; a build is
    (signature, constants, num_warps, num_stages), in the autotuner's (pruned) config order."""
    launches, seen = [], set()
    for dtype, archs in TARGETS:
        for kernel, tuned, args, flags, gpu_meta in _scenarios(dtype):
            if tuned is not None:
                named = dict(zip([p.name for p in kernel.params], args, strict=False))
                configs = tuned.early_config_prune(tuned.configs, named, **flags)
                metas = [(c.kwargs, c.num_warps, c.num_stages) for c in configs]
            else:
                meta = dict(gpu_meta or {})
                warps = meta.pop("num_warps", 4)
                metas = [(meta, warps, meta.pop("num_stages", 3))]
            builds = [(*_signature(kernel, args, {**flags, **block}), warps, stages) for block, warps, stages in metas]
            signature, constants = _signature(kernel, args, flags)
            for arch in archs:
                key = (kernel.fn.__name__, tuple(signature.items()), repr(sorted(constants.items())), arch)
                if key not in seen:
                    seen.add(key)
                    label = f"{kernel.fn.__name__} {_TYPE_NAMES[dtype]} sm_{arch} {flags}"
                    launches.append((label, kernel.fn.__name__, arch, builds))
    return launches


_KERNELS = {
    k.fn.__name__: k
    for k in (
        hgt_step._hgt_step_fwd_kernel, hgt_step._hgt_step_fwd_rows_kernel, hgt_step._hgt_step_bwd_dy_kernel,
        hgt_step._hgt_step_bwd_dx_kernel, hgt_step._hgt_step_bwd_dw_kernel,
        embedding._embedding_fwd_kernel,
        embedding._embedding_bwd_kernel,
        embedding._embedding_bwd_small_kernel,
    )
}  # fmt: skip


def _compile(job: tuple) -> tuple[int | None, str | None]:
    """(shared memory bytes, None) or (None, error) for one build."""
    name, (signature, constants, warps, stages), arch = job
    try:
        src = ASTSource(fn=_KERNELS[name], signature=signature, constexprs=constants)
        options = {"num_warps": warps, "num_stages": stages}
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        assert compiled.asm["cubin"], "no cubin"
        return compiled.metadata.shared, None
    except Exception as exc:  # reported with its launch's label
        return None, f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"


def trace_check() -> str | None:
    """What torch.compile does with the GPU ops: AOTAutograd must decompose every triton_op,
    forward and backward, into Triton kernel calls (a Python-side error in a launcher, e.g. a
    data-dependent branch, shows up here). Returns None, or what went wrong."""
    from functorch.compile import aot_function, default_partition

    # Without a GPU the kernels' mutation analysis cannot compile them and says so at length;
    # it then assumes every argument is written, which is harmless for this check.
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    joint = []

    def partition(graph, inputs, **kwargs):
        joint.append(graph)
        return default_partition(graph, inputs, **kwargs)

    def unit(table, ids, w1, b1, gamma, beta, seed, reduce_w, reduce_b):
        e = embedding.embedding_lookup(table, ids, 0, 4.0)
        h = hgt_step.hgt_step(e, w1, b1, gamma, beta, seed, 16, 1, 2, True, "gelu", 0.1, 1e-5)
        return hgt_step.hgt_step(h, reduce_w.t().unsqueeze(0), reduce_b, None, None, None, 16, 2, 0, False, "none",
                                 0.0, 1e-5).sum()  # fmt: skip

    def leaf(*shape):
        return torch.randn(*shape, requires_grad=True)

    args = (leaf(50, 16), torch.randint(0, 50, (24,)), leaf(4, 4, 10), leaf(40), leaf(10), leaf(10),
            torch.tensor(7), leaf(24, 56), leaf(24))  # fmt: skip
    try:
        aot_function(unit, fw_compiler=lambda gm, _: gm, partition_fn=partition)(*args)
    except Exception as exc:  # running the compiled graph needs a GPU; tracing happened before
        if not joint:
            return f"tracing failed: {type(exc).__name__}: {exc}"
    kernels = [n for n in joint[0].graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    # forward: lookup, GEMM + row-wise epilogue (shuffle + norm), Reduce GEMM; backward: lookup,
    # dY + dW + dx (dx's extra programs add up the dγ/dβ partial sums), dW + dx (the Reduce
    # layer's dY is grad_out itself)
    expected = 4 + 6
    if len(kernels) != expected:
        return f"expected {expected} Triton kernel calls in the joint graph, found {len(kernels)}"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    opts = parser.parse_args()
    start = time.time()
    launches = _launches()
    # Each launch's first pruned config must build and fit in shared memory: it is the one used
    # with autotuning off, and the autotuner then has at least one config it can run.
    jobs = [(name, builds[0], arch) for _, name, arch, builds in launches]
    failed: list[str] = []
    with ProcessPoolExecutor(max_workers=opts.jobs) as pool:
        for (label, _, arch, _), (shared, error) in zip(launches, pool.map(_compile, jobs), strict=True):
            if error is None and shared > SMEM_LIMIT[arch]:
                error = f"needs {shared} bytes of shared memory (> {SMEM_LIMIT[arch]})"
            if error is not None:
                failed.append(label)
                print(f"FAILED {label}\n    {error}", file=sys.stderr)
    problem = trace_check()
    if problem:
        failed.append("trace check")
        print(f"FAILED trace check: {problem}", file=sys.stderr)
    print(f"{len(launches) - len(failed)}/{len(launches)} kernel launches built for {ARCHS} "
          f"(triton {triton.__version__}) in {time.time() - start:.1f}s")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
