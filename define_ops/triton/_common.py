"""Pieces shared by the Triton ops: interpreter detection, op registration, launching, configs.

Two ways to run the same kernels:

- on a GPU, ops are ``torch.library.triton_op``s whose kernels are launched through
  ``wrap_triton`` and autotuned, so ``torch.compile`` traces into them;
- on the CPU under ``TRITON_INTERPRET=1`` (CI), ``@triton.jit`` yields interpreted functions that
  ``wrap_triton`` hands back unwrapped and fake tensors cannot run, so the same Python bodies are
  registered as opaque ``custom_op``s with explicit fake kernels, and each kernel runs one
  configuration (multi-config autotuning needs a GPU benchmarker).
"""

import functools
import operator
import os
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import triton
from torch.library import wrap_triton
from triton import knobs
from triton.runtime import driver

try:  # Triton's asynchronous compile mode (Triton 3.4 and later)
    from triton.runtime._async_compile import AsyncCompileMode, active_mode
except ImportError:
    AsyncCompileMode = active_mode = None

try:
    from torch._library.triton import is_wrap_triton_enabled
except ImportError:  # a torch without the switch: every launch goes through wrap_triton

    def is_wrap_triton_enabled() -> bool:
        return True


# Decided once, like @triton.jit decides at decoration time.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# DEFINE_OPS_TRITON_AUTOTUNE=0 on a GPU: launch each kernel with its first pruned config instead of
# benchmarking them all (correctness runs, where autotuning every shape would cost minutes).
AUTOTUNE = os.environ.get("DEFINE_OPS_TRITON_AUTOTUNE", "1") != "0"


def _compile_threads() -> int:
    """Threads that compile an autotuner's candidate configs at once (see _precompile): the cores
    this process may run on (its affinity: a launcher that pins each rank to its own cores keeps the
    ranks' compiles apart) unless DEFINE_OPS_TRITON_COMPILE_THREADS says otherwise (1: one by one,
    as the autotuner)."""
    value = os.environ.get("DEFINE_OPS_TRITON_COMPILE_THREADS", "")
    if not value:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"DEFINE_OPS_TRITON_COMPILE_THREADS must be a positive integer, got {value!r}")
    return int(value)


COMPILE_THREADS = _compile_threads()


# Host-side integer helpers in plain Python: triton.cdiv and triton.next_power_of_2 are
# constexpr_functions since Triton 3.5, whose host calls cost a few microseconds each (argument
# unwrapping), a measurable part of an eager launch's Python.
def next_pow2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for non-negative ints (also SymInts: no int() conversion)."""
    return (a + b - 1) // b


@functools.lru_cache(maxsize=1024)  # a layer passes the same few constants on every call
def split_float(value: float) -> tuple[float, float, float]:
    """Three float32-representable parts whose float64 sum is exactly ``value``.

    Triton passes Python floats to kernels as float32; the kernels rebuild an exact float64 (or
    the float32) constant as hi + mid + lo, so eps, dropout and embedding scales lose nothing in
    float64 (53 bits fit in 3 × 24).
    """

    def f32(x: float) -> float:
        return struct.unpack("f", struct.pack("f", x))[0]

    hi = f32(value)
    mid = f32(value - hi)
    return hi, mid, f32(value - hi - mid)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation (and LayerNorm statistics) dtype: float64 stays float64, the rest use float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def allow_tf32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32


def dot_in_f32(dtype: torch.dtype) -> bool:
    # The interpreter multiplies bf16 bit patterns as integers (triton#11584): upcast there only.
    return INTERPRET and dtype == torch.bfloat16


def register_op(name: str, fn: Callable, fake: Callable) -> Any:
    """``fn`` as ``define_ops::<name>``: a triton_op on a GPU, an opaque custom_op in the interpreter."""
    qualname = f"define_ops::{name}"
    if INTERPRET:
        op = torch.library.custom_op(qualname, fn, mutates_args=())
        op.register_fake(fake)
        return op
    return torch.library.triton_op(qualname, fn, mutates_args=())


def launch(
    kernel: Any,
    tuned: Any,
    grid: Callable[[dict[str, Any]], tuple[int, ...]],
    args: Sequence[Any],
    flags: dict[str, Any],
    interpret_meta: dict[str, Any],
    gpu_meta: dict[str, Any] | None = None,
) -> None:
    """Launch ``kernel`` (the ``@triton.jit`` function) or its autotuned wrapper ``tuned``.

    In the interpreter the single configuration ``interpret_meta`` is passed explicitly. On a GPU
    ``tuned`` (if given) picks the block sizes; otherwise ``gpu_meta`` is used as is. Eager
    launches (wrap_triton's dispatch off: the stack's node, a registered op's eager call) go
    straight to the kernel's ``run``; while torch traces (``torch.compile``, ``make_fx``) every
    launch goes through ``wrap_triton`` so that the tracer sees it.
    """
    if INTERPRET:
        kernel[grid](*args, **flags, **interpret_meta)
    elif is_wrap_triton_enabled():
        if tuned is not None and AUTOTUNE:
            wrap_triton(tuned)[grid](*args, **flags)
        elif tuned is not None:
            wrap_triton(kernel)[grid](*args, **flags, **_first_pruned_config(kernel, tuned, args, flags))
        else:
            wrap_triton(kernel)[grid](*args, **flags, **(gpu_meta or {}))
    elif tuned is None:
        _run(kernel, grid, args, flags, gpu_meta or {})
    else:
        meta = _tuned_meta(kernel, tuned, grid, args, flags)
        if meta is not None:
            _run(kernel, grid, args, flags, meta)


# Compiled kernels per launch key (see _run), bounded (bounded_put).
_COMPILED: dict[tuple, tuple[Any, tuple]] = {}
# Per (kernel, argument count, flag names): getters of the scalar and of the tensor arguments.
_ARG_LAYOUT: dict[tuple, tuple[Callable, Callable]] = {}
_dtype_of = operator.attrgetter("dtype")
_low_address_bits = (15).__and__  # an address's offset from 16-byte alignment


def bounded_put(cache: dict, key: Any, value: Any, limit: int = 4096) -> None:
    """``cache[key] = value``, emptying ``cache`` first when it holds ``limit`` entries: the launch
    caches are keyed by exact token counts, and a run with varying batch sizes must not grow them
    without end."""
    if len(cache) >= limit:
        cache.clear()
    cache[key] = value


def _arg_layout(kernel: Any, args: Sequence[Any], flags: dict[str, Any]) -> tuple[tuple, Callable, Callable]:
    """(layout key, getter of the scalar arguments, getter of the tensor arguments) of a launch.
    Fixed per call site (absent tensors are passed as a stand-in tensor, never as None), so worked
    out once per (kernel, argument count, flag names)."""
    layout_key = (id(kernel), len(args), tuple(flags))  # id: kernels are module globals (their hash is slow)
    layout = _ARG_LAYOUT.get(layout_key)
    if layout is None:
        tensors = [i for i, arg in enumerate(args) if isinstance(arg, torch.Tensor)]
        scalars = [i for i in range(len(args)) if i not in tensors]
        layout = _ARG_LAYOUT[layout_key] = _getter(scalars), _getter(tensors)
    return layout_key, *layout


def _run(kernel: Any, grid: Any, args: Sequence[Any], flags: dict[str, Any], meta: dict[str, Any]) -> None:
    """``kernel.run(*args, grid=grid, warmup=False, **flags, **meta)``, without re-binding the
    arguments on every launch once a launch key has been seen.

    ``JITFunction.run`` binds all ~40 arguments, works out each one's specialization (dtype,
    16-byte alignment, divisibility by 16, value 1) and builds its cache key on every launch: after
    the autotuner, most of what is left of Triton's host time per launch. The key here holds the
    device, every scalar argument's exact value and every tensor's dtype and offset from 16-byte
    alignment, finer than Triton's specialization, so it names one compiled kernel; it is built
    with C-level getters and maps, not a Python loop over the arguments. A key's first launch
    goes through ``JITFunction.run`` (which compiles if needed) and keeps the kernel it returns
    with the key's constexpr values; later ones call that kernel's launcher with the arguments
    ``JITFunction.run`` would pass. Unlike ``JITFunction.run`` they do not re-check that the
    module-level globals a kernel reads are unchanged, nor see Triton's debug setting changed after
    the key's first launch (the launch hooks are still read per launch).
    """
    layout_key, scalars_of, tensors_of = _arg_layout(kernel, args, flags)
    tensors = tensors_of(args)
    device = driver.active.get_current_device()  # a loaded kernel belongs to one device
    key = (
        layout_key, device, tuple(flags.values()), tuple(meta.items()), scalars_of(args),
        tuple(map(_dtype_of, tensors)), tuple(map(_low_address_bits, map(torch.Tensor.data_ptr, tensors))),
    )  # fmt: skip
    entry = _COMPILED.get(key)
    if entry is None:
        compiled = kernel.run(*args, grid=grid, warmup=False, **flags, **meta)
        if hasattr(compiled, "result"):  # a compile future (Triton's asynchronous compile mode)
            compiled = compiled.result()
        keywords = {**flags, **meta}
        constexpr_names = kernel.arg_names[len(args) :]
        if compiled is not None and all(name in keywords for name in constexpr_names):
            bounded_put(_COMPILED, key, (compiled, tuple(keywords[name] for name in constexpr_names)))
        return
    compiled, constexprs = entry
    bound = tuple(args) + constexprs
    grid = grid(meta) if callable(grid) else grid
    stream = driver.active.get_current_stream(device)
    runtime = knobs.runtime
    compiled.run(
        grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream, compiled.function,
        compiled.packed_metadata, compiled.launch_metadata(grid, stream, *bound), runtime.launch_enter_hook,
        runtime.launch_exit_hook, *bound,
    )  # fmt: skip


def _getter(positions: list[int]) -> Callable[[tuple], tuple]:
    """The items of a tuple at ``positions``, as a tuple (also for none or one position)."""
    if len(positions) > 1:
        return operator.itemgetter(*positions)
    return lambda values: tuple(values[i] for i in positions)


def _pruned_configs(kernel: Any, tuned: Any, args: Sequence[Any], flags: dict[str, Any]) -> list:
    """The configs ``tuned``'s pruning keeps for this launch (what its autotuner benchmarks)."""
    named = dict(zip(kernel.arg_names, args, strict=False))
    return tuned.early_config_prune(tuned.configs, named, **flags)


def _first_pruned_config(kernel: Any, tuned: Any, args: Sequence[Any], flags: dict[str, Any]) -> dict[str, Any]:
    """The first config that ``tuned``'s pruning keeps for this launch, as launch keywords: what
    runs with autotuning off (``AUTOTUNE``)."""
    config = _pruned_configs(kernel, tuned, args, flags)[0]
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


# The launch keywords of the config chosen per (autotuner, its key). Why not the autotuner's own
# run: it rebuilds its key from dicts of all ~40 arguments on every launch (a list-membership test
# per argument, str() of every dtype), ~35 µs a launch under cProfile on the 2-core VM and the
# largest single host cost of the eager Triton step (scripts/host_profile.py --fake-driver).
_TUNED_META: dict[tuple, dict[str, Any]] = {}
# Per (autotuner, argument count, flag names): where each of its key names sits, an argument
# position or a flag name (names that are neither are not part of its key, as in the autotuner).
_KEY_LAYOUT: dict[tuple, tuple[int | str, ...]] = {}


def _tuned_meta(
    kernel: Any, tuned: Any, grid: Callable, args: Sequence[Any], flags: dict[str, Any]
) -> dict[str, Any] | None:
    """The launch keywords of the config ``tuned`` chose for this launch's key; None when the
    launch has just gone through ``tuned`` itself (a key's first launch: it benchmarks the configs
    once, keeps the fastest and launches it, and we keep its choice).

    The key holds what the autotuner's holds (its key arguments' values and every tensor
    argument's dtype; the launches pass tensors and Python scalars only), so each key maps to the
    one config the autotuner would pick for it.
    """
    layout_key = (tuned, len(args), tuple(flags))
    named = _KEY_LAYOUT.get(layout_key)
    if named is None:
        positions = {name: i for i, name in enumerate(kernel.arg_names[: len(args)])}
        named = tuple(name if name in flags else positions[name] for name in tuned.keys
                      if name in flags or name in positions)  # fmt: skip
        _KEY_LAYOUT[layout_key] = named
    _, _, tensors_of = _arg_layout(kernel, args, flags)
    key = (
        tuned,
        *[flags[at] if at.__class__ is str else args[at] for at in named],
        *map(_dtype_of, tensors_of(args)),
    )
    meta = _TUNED_META.get(key)
    if meta is not None:
        return meta
    if not AUTOTUNE:
        meta = _first_pruned_config(kernel, tuned, args, flags)
        _TUNED_META[key] = meta
        return meta
    _precompile(kernel, tuned, grid, args, flags)
    tuned[grid](*args, **flags)
    _TUNED_META[key] = tuned.best_config.all_kwargs()
    return None


def _precompile(kernel: Any, tuned: Any, grid: Callable, args: Sequence[Any], flags: dict[str, Any]) -> None:
    """Compile every config ``tuned`` is about to benchmark for a new key, on ``COMPILE_THREADS``
    threads at once (Triton's asynchronous compile mode; ptxas runs as a process of its own); the
    autotuner then finds them compiled. It compiles them one after another otherwise: ~100 configs
    over an ``awd_ptb`` training step's keys, 30 s on the 2-core VM, over a minute on a GPU host
    (the GPU sessions' Triton benchmarks ran out of time in it). A config that fails to compile
    fails again, as before, when the autotuner launches it (and is dropped from its choice).
    """
    if AsyncCompileMode is None or COMPILE_THREADS < 2 or active_mode.get() is not None:
        return
    configs = _pruned_configs(kernel, tuned, args, flags)
    if len(configs) < 2:
        return
    with ThreadPoolExecutor(min(len(configs), COMPILE_THREADS)) as pool, AsyncCompileMode(pool, ignore_errors=True):
        for config in configs:
            kernel.warmup(*args, grid=grid, **flags, **config.all_kwargs())


# The autotuner's choices kept on disk, in Triton's cache directory beside the compiled kernels,
# keyed by Triton's version, the target, the kernel's source, the key and the candidates: a second
# process (the next training run, the next benchmark) takes the choice instead of benchmarking
# every candidate again. DEFINE_OPS_TRITON_AUTOTUNE_CACHE=0 benchmarks in every process.
AUTOTUNE_CACHE = os.environ.get("DEFINE_OPS_TRITON_AUTOTUNE_CACHE", "1") != "0"


def autotuned(configs: list[triton.Config], key: list[str], prune: Callable) -> Callable:
    """``triton.autotune`` on a GPU; the bare kernel in the interpreter (see module docstring)."""

    def wrap(kernel: Any) -> Any:
        if INTERPRET:
            return None
        return triton.autotune(
            configs=configs, key=key, prune_configs_by={"early_config_prune": prune}, cache_results=AUTOTUNE_CACHE
        )(kernel)

    return wrap


def keep_fitting(configs: list[triton.Config], fits: Callable[[dict[str, Any]], bool]) -> list[triton.Config]:
    """The configs whose block sizes ``fits``; if none does, the one with the smallest tiles.

    Only filters (never builds configs), as torch.compile runs pruning functions in a sandbox.
    The first config kept is the one used when autotuning is off (``AUTOTUNE``).
    """
    kept = [c for c in configs if fits(c.kwargs)]
    if kept:
        return kept
    return [min(configs, key=lambda c: (sum(c.kwargs.values()), c.num_stages))]


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (132, an H100's, for meta tensors in the AOT check)."""
    if device.type != "cuda":
        return 132
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def interpret_block(size: int, cap: int) -> int:
    """Interpreter block: large (cost is per program × loop step), at least 16 (tl.dot)."""
    return max(16, min(next_pow2(size), cap))
