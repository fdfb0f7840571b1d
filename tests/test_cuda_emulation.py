"""The CUDA kernels' own code, run on CPU threads (csrc/emulation/cuda_emulation.h), against the C++ CPU ops.

No GPU here: this is how CI executes the CUDA backend's index math, barriers, warp and block
reductions, grid barrier and host launchers. The sources in csrc/cuda/ are compiled as C++ into
a test-only library whose ops live under ``torch.ops.define_ops_emu`` (CPU tensors, no autograd),
and every output and gradient is compared with the CPU op of the same name. The emulated device
has 2 SMs with 2 blocks each, so each block walks several rows; ``DEFINE_OPS_EMU_SMEM`` shrinks
its shared memory to run the global-workspace fallback. What it cannot show (memory model, warp
scheduling, speed) is left to tests/test_cuda.py on a GPU.

Building the library takes about a minute the first time (cached in torch's extension directory).
"""

from __future__ import annotations

import functools
import os
import random
from pathlib import Path

import pytest
import torch

from .conftest import HAS_CPU_KERNELS, assert_within_reference_error, max_err
from .test_fuzz import random_config
from .test_ops import (
    LAYOUTS,
    OPTIONS,
    WARP_FALLBACK_LAYOUTS,
    WARP_LAYOUTS,
    _op_args,
    assert_same_with_nan,
    make_step_inputs,
    with_nan_inputs,
)
from .test_stack import assert_stack_matches_steps, stack_case, stack_case_of

CSRC = Path(__file__).resolve().parents[1] / "csrc"

pytestmark = [
    pytest.mark.skipif(not HAS_CPU_KERNELS, reason="compiled CPU kernels not loaded (the comparison baseline)"),
    pytest.mark.skipif(os.environ.get("DEFINE_OPS_SKIP_EMULATION") == "1", reason="DEFINE_OPS_SKIP_EMULATION=1"),
]


@functools.cache
def emulated_ops():
    from torch.utils.cpp_extension import load

    load(
        name="define_ops_cuda_emulation",
        sources=[
            str(CSRC / "emulation" / f"{name}.cpp")
            for name in ("emu_schemas", "emu_hgt_step", "emu_embedding", "emu_checks")
        ],
        extra_include_paths=[str(CSRC)],
        extra_cflags=["-O1", "-std=c++20", "-DDEFINE_OPS_CUDA_EMULATION", "-Wno-unknown-pragmas"],
        is_python_module=False,
    )
    return torch.ops.define_ops_emu


def forward_backward(ops, tensors, params, grad_seed=0):
    """(out, saved, mean, rstd, grad_x, grad_weight, grad_bias, grad_gamma, grad_beta) of one step."""
    args = _op_args(tensors, params)
    outputs = ops.hgt_step(*args)
    gen = torch.Generator().manual_seed(grad_seed)
    grad = torch.randn(outputs[0].shape, generator=gen, dtype=torch.float64).to(outputs[0].dtype)
    grads = ops.hgt_step_backward(grad, *args[:6], *outputs[1:], *args[6:])
    return list(outputs) + list(grads)


NAMES = ["out", "saved", "mean", "rstd", "grad_x", "grad_weight", "grad_bias", "grad_gamma", "grad_beta"]


def assert_float64_matches(ours, cpu):
    """Every output and gradient of a float64 step within 1e-10 of the CPU op's (relative to its magnitude)."""
    for name, a, b in zip(NAMES, ours, cpu, strict=True):
        assert max_err(a, b) <= 1e-10 * max(1.0, b.abs().max().item() if b.numel() else 1.0), name


def assert_same_layout(ours, theirs):
    for name, a, b in zip(NAMES, ours, theirs, strict=True):
        assert (a.shape, a.dtype, a.stride()) == (b.shape, b.dtype, b.stride()), name


def assert_low_precision_within_cpu_error(tensors, params, dtype):
    """Every output and gradient of the emulated op in ``dtype`` within 2x the CPU op's own error
    in ``dtype``, both measured against the CPU op in float64 (``tensors`` are float64)."""
    low = {k: v.to(dtype) if v is not None else None for k, v in tensors.items()}
    high = forward_backward(torch.ops.define_ops, tensors, params)
    ours = forward_backward(emulated_ops(), low, params)
    theirs = forward_backward(torch.ops.define_ops, low, params)
    floor = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for name, a, b, h in zip(NAMES, ours, theirs, high, strict=True):
        if name in ("mean", "rstd") or not h.numel():
            continue
        assert_within_reference_error(a, b, h, floor=floor, what=name)


@pytest.mark.parametrize("tokens", [0, 1, 37])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(str(v) for v in o))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_hgt_step_float64_matches_cpu(layout, options, tokens):
    tensors, params = make_step_inputs(layout, options, tokens, torch.float64)
    ours = forward_backward(emulated_ops(), tensors, params)
    cpu = forward_backward(torch.ops.define_ops, tensors, params)
    assert_same_layout(ours, cpu)
    assert_float64_matches(ours, cpu)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 37, 300])
@pytest.mark.parametrize("layout", [(16, 32, 4, 24, 0, 0), (16, 56, 1, 64, 0, 0), (16, 56, 1, 61, 0, 0)],
                         ids=["grouped", "reduce", "reduce-odd-width"])  # fmt: skip
def test_plain_step_with_bias_matches_cpu(layout, tokens, dtype):
    """A step with no norm, activation, dropout or skip (the Reduce layer is one): its bias gradient
    is ATen's sum over the tokens."""
    options = (False, False, None, 0.0, True)
    tensors, params = make_step_inputs(layout, options, tokens, torch.float64)
    if dtype == torch.float64:
        ours = forward_backward(emulated_ops(), tensors, params)
        assert_float64_matches(ours, forward_backward(torch.ops.define_ops, tensors, params))
        return
    assert_low_precision_within_cpu_error(tensors, params, dtype)


@pytest.mark.parametrize("smem", ["64", "200"], ids=["stage-in-global", "tight"])
@pytest.mark.parametrize("layout", ["first-layer", "eight-groups", "dense-last"])
def test_hgt_step_global_workspace_fallback(monkeypatch, layout, smem):
    """With too little shared memory for the row stage, the kernels keep it in a global workspace."""
    monkeypatch.setenv("DEFINE_OPS_EMU_SMEM", smem)
    tensors, params = make_step_inputs(layout, OPTIONS[2], 23, torch.float64)
    try:
        ours = forward_backward(emulated_ops(), tensors, params)
    except RuntimeError as error:  # "tight" may not even fit the reduction slots
        assert "shared memory" in str(error)
        return
    cpu = forward_backward(torch.ops.define_ops, tensors, params)
    assert_float64_matches(ours, cpu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", OPTIONS[1:4], ids=lambda o: "-".join(str(v) for v in o))
@pytest.mark.parametrize("layout", ["first-layer", "mix-middle", "eight-groups", "dense-last"])
def test_hgt_step_low_precision_within_cpu_error(layout, options, dtype):
    """Within 2x the CPU op's own error against float64 (fp16 is left to the GPU tests: ATen's
    fp16 GEMM on the CPU is not a path worth a bound)."""
    tensors, params = make_step_inputs(layout, options, 53, torch.float64)
    assert_low_precision_within_cpu_error(tensors, params, dtype)


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(str(v) for v in o))
@pytest.mark.parametrize("layout", ["first-layer", "no-skip", "eight-groups"])
def test_nan_inputs_propagate_as_on_the_cpu(layout, options):
    # ReLU keeps a NaN and a dropped NaN stays NaN (test_ops.py ties the CPU op to the reference).
    tensors, params = make_step_inputs(layout, options, 5, torch.float64)
    tensors = with_nan_inputs(tensors)
    ours = forward_backward(emulated_ops(), tensors, params)
    cpu = forward_backward(torch.ops.define_ops, tensors, params)
    assert cpu[0].isnan().any()
    for name, a, b in zip(NAMES, ours, cpu, strict=True):
        assert_same_with_nan(a, b, name)


def test_backward_is_bitwise_deterministic():
    tensors, params = make_step_inputs("first-layer", OPTIONS[2], 37, torch.float32)
    first = forward_backward(emulated_ops(), tensors, params)
    again = forward_backward(emulated_ops(), tensors, params)
    for name, a, b in zip(NAMES, first, again, strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("tokens", [0, 1, 37])
@pytest.mark.parametrize("preset", ["awd_ptb", "lstm_wt103", "paper_literal"])
def test_stack_ops_match_the_step_ops_and_the_cpu(preset, tokens):
    """The CUDA stack ops (csrc/common/hgt_stack.h over the CUDA step bodies): against the CUDA step
    ops one by one, and, float64, against the CPU stack ops to 1e-10."""
    x, tensors, lists = stack_case(preset, tokens, torch.float64)
    assert_stack_matches_steps(emulated_ops(), x, tensors, lists)
    assert_stack_ops_match_cpu(x, tensors, lists)


def assert_stack_ops_match_cpu(x, tensors, lists):
    """The emulated CUDA stack ops against the CPU ones, float64: every output and gradient to 1e-10."""
    ops = emulated_ops()
    ours = ops.hgt_stack(x, *tensors, *lists, True)
    cpu = torch.ops.define_ops.hgt_stack(x, *tensors, *lists, True)
    grad = torch.randn(cpu[0].shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ours_grads = ops.hgt_stack_backward(grad, x, ours[1], ours[2], *tensors, *lists)
    cpu_grads = torch.ops.define_ops.hgt_stack_backward(grad, x, cpu[1], cpu[2], *tensors, *lists)
    for name, a, b in zip(("out", "values", "stats", "grad_x", "grads"), (*ours, *ours_grads), (*cpu, *cpu_grads),
                          strict=True):  # fmt: skip
        assert a.shape == b.shape, name
        assert max_err(a, b) <= 1e-10 * max(1.0, b.abs().max().item() if b.numel() else 1.0), name


def test_random_configurations_match_the_cpu():
    """Whole stacks of random configurations (tests/test_fuzz.py draws them; there the CPU ops are
    checked against the reference), token counts from 0 to 130, float64."""
    failed = []
    for seed in range(40):
        rng = random.Random(seed)
        config = random_config(rng)
        tokens = rng.choice([0, 1, 2, 5, 37, 64, 130])
        try:
            assert_stack_ops_match_cpu(*stack_case_of(config, tokens, torch.float64, seed=seed))
        except AssertionError as exc:
            failed.append(f"case {seed}, {tokens} tokens, {config}: {exc}")
    assert not failed, "\n".join(failed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stack_ops_low_precision_match_the_step_ops(dtype):
    x, tensors, lists = stack_case("awd_ptb", 29, dtype)
    assert_stack_matches_steps(emulated_ops(), x, tensors, lists)


_BLOCKS_CAP_CHECK = """
import torch
from tests.test_cuda_emulation import assert_float64_matches, emulated_ops, forward_backward
from tests.test_ops import OPTIONS, make_step_inputs
tensors, params = make_step_inputs("first-layer", OPTIONS[2], 37, torch.float64)
ours = forward_backward(emulated_ops(), tensors, params)
assert_float64_matches(ours, forward_backward(torch.ops.define_ops, tensors, params))
print("matches")
"""


@pytest.mark.parametrize(
    ("variable", "value", "error"),
    [
        ("DEFINE_OPS_CUDA_BWD_BLOCKS_PER_SM", "1", None),
        ("DEFINE_OPS_CUDA_BWD_BLOCKS_PER_SM", "0", "must be an integer in 1..32, got '0'"),
        ("DEFINE_OPS_CUDA_BWD_BLOCKS_PER_SM", "lots", "must be an integer in 1..32, got 'lots'"),
        ("DEFINE_OPS_CUDA_MAX_THREADS", "64", None),
        ("DEFINE_OPS_CUDA_MAX_THREADS", "100", "must be a multiple of 32 in 64..512, got '100'"),
    ],
)  # fmt: skip
def test_tuning_overrides(variable, value, error):
    """The kernels' tuning variables (read once per process, hence a subprocess): 1 backward block
    per SM or 64-thread row blocks change the launch but not the results; a bad value is a clear
    error naming the variable."""
    import subprocess
    import sys

    emulated_ops()  # build here (cached), so the subprocess only loads it
    env = {**os.environ, variable: value}
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", _BLOCKS_CAP_CHECK], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    if error is None:
        assert done.returncode == 0 and "matches" in done.stdout, done.stderr[-3000:]
    else:
        assert done.returncode != 0
        assert f"{variable} {error}" in done.stderr


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("width", [12, 16, 3])
@pytest.mark.parametrize("padding_idx", [None, 3])
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
def test_embedding_matches_cpu(padding_idx, ids_dtype, width, dtype):
    weight = torch.randn(20, width, dtype=torch.float64).to(dtype)
    ids = torch.tensor([[3, 0, 19, 3], [3, 7, 3, 5], [19, 19, 19, 19], [3, 3, 3, 3]], dtype=ids_dtype)
    grad = torch.randn(ids.numel(), width, dtype=torch.float64).to(dtype)
    for ops_ids in (ids, ids[:0]):
        e = emulated_ops().embedding_lookup(weight, ops_ids.reshape(-1), padding_idx, 2.5)
        e_cpu = torch.ops.define_ops.embedding_lookup(weight, ops_ids.reshape(-1), padding_idx, 2.5)
        assert torch.equal(e, e_cpu)
        g = emulated_ops().embedding_lookup_backward(grad[: ops_ids.numel()], ops_ids, 20, padding_idx, 2.5)
        g_cpu = torch.ops.define_ops.embedding_lookup_backward(grad[: ops_ids.numel()], ops_ids, 20, padding_idx, 2.5)
        tol = 1e-12 if dtype == torch.float64 else 1e-2
        assert g.shape == g_cpu.shape and g.dtype == g_cpu.dtype
        assert max_err(g, g_cpu) <= tol * max(1.0, g_cpu.abs().max().item())
    if padding_idx is not None:
        assert (g[padding_idx] == 0).all()


_EMBEDDING_PATHS_CHECK = """
import torch
from tests.test_cuda_emulation import emulated_ops
gen = torch.Generator().manual_seed(0)
ids = torch.randint(0, 40, (301,), generator=gen)  # repeats, and more than one shuffle chunk of 32
ids[::7] = 5
ids[3] = 99  # out of range: skipped
grad = torch.randn(301, 24, generator=gen)
g = emulated_ops().embedding_lookup_backward(grad, ids, 40, 0, 1.5)
torch.save(g, "{out}")
"""


def test_embedding_backward_sort_free_and_sorted_paths_agree(tmp_path):
    """Batches of up to DEFINE_OPS_CUDA_SMALL_BATCH_TOKENS ids (read once per process, hence
    subprocesses) skip the sort; both paths add each id's rows in token order, so they agree bit
    for bit, and both match the CPU op."""
    import subprocess
    import sys

    emulated_ops()  # build here (cached), so the subprocesses only load it
    root = Path(__file__).resolve().parents[1]
    results = {}
    for limit in ("0", "4096"):
        out = tmp_path / f"g{limit}.pt"
        env = {**os.environ, "DEFINE_OPS_CUDA_SMALL_BATCH_TOKENS": limit}
        done = subprocess.run([sys.executable, "-c", _EMBEDDING_PATHS_CHECK.format(out=out)], cwd=root, env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        results[limit] = torch.load(out)
    assert torch.equal(results["0"], results["4096"])
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 40, (301,), generator=gen)
    ids[::7] = 5
    ids[3] = 99
    grad = torch.randn(301, 24, generator=gen)
    keep = ids < 40
    expected = torch.ops.define_ops.embedding_lookup_backward(grad[keep], ids[keep], 40, 0, 1.5)
    assert max_err(results["0"], expected) <= 1e-5 * expected.abs().max().item()
    assert (results["0"][0] == 0).all()  # padding_idx 0


def test_embedding_out_of_range_ids_give_nan_rows_and_no_gradient():
    weight = torch.randn(10, 8)
    ids = torch.tensor([1, 10, -1, 2])
    e = emulated_ops().embedding_lookup(weight, ids, None, 1.0)
    assert torch.equal(e[0], weight[1]) and torch.equal(e[3], weight[2])
    assert e[1].isnan().all() and e[2].isnan().all()
    g = emulated_ops().embedding_lookup_backward(torch.ones(4, 8), ids, 10, None, 1.0)
    assert g.sum().item() == 16.0 and (g[1] == 1).all() and (g[2] == 1).all()
    # int64 ids that a plain narrowing to the backward's 32-bit sort keys would wrap onto row 1
    wrapping = torch.tensor([1, (1 << 32) + 1, -(1 << 32) + 1, 2])
    g = emulated_ops().embedding_lookup_backward(torch.ones(4, 8), wrapping, 10, None, 1.0)
    assert g.sum().item() == 16.0 and (g[1] == 1).all() and (g[2] == 1).all()


def test_fast_divmod_is_exact():
    """The kernels' multiply-shift division (cuda_utils.cuh FastDivmod) against / and %: every
    divisor up to 4096, powers of two and their neighbours up to 2^30, against small numerators,
    numerators near 2^31 and the multiples of each divisor and their neighbours."""
    divisors = list(range(1, 4097))
    divisors += [v for k in range(12, 31) for v in ((1 << k) - 1, 1 << k, (1 << k) + 1)]
    divisors += [1000003, 123456789, (1 << 30) - 35]
    gen = torch.Generator().manual_seed(0)
    numerators = torch.cat([
        torch.arange(0, 20000),
        torch.arange((1 << 31) - 2000, 1 << 31),
        torch.randint(0, 1 << 31, (3000,), generator=gen),
    ])  # fmt: skip
    ops = emulated_ops()
    assert ops.fast_divmod_mismatches(torch.tensor(divisors), numerators) == 0
    for d in divisors[::97] + divisors[4096:]:  # each divisor's own multiples, ±1, up to 2^31
        multiples = torch.arange(1, (1 << 31) // d + 1, max(1, (1 << 31) // d // 500), dtype=torch.int64) * d
        near = torch.cat([multiples - 1, multiples, multiples + 1]).clamp(0, (1 << 31) - 1)
        assert ops.fast_divmod_mismatches(torch.tensor([d]), near) == 0, d


# Grouped layers as one GEMM against the block-diagonal weight (DEFINE_OPS_CUDA_DENSE_GROUPS): in
# float64 "unaligned" means an odd group width (16 bytes hold 2 elements), in bf16 one not a multiple of 8.
DENSE_LAYOUTS = {
    "mix-middle": LAYOUTS["mix-middle"],
    "eight-groups": LAYOUTS["eight-groups"],  # b/g = 3
    "odd-groups": (8, 18, 2, 22, 0, 0),
    "odd-groups-skip": (8, 18, 2, 22, 2, 1),  # x = mix(e, h, 2) with 4 + 5 features a group
    "unaligned-bf16-groups": (8, 24, 2, 40, 0, 0),  # a/g = 12, b/g = 20: whole rows multiples of 8
}


def gemm_calls(run) -> set[str]:
    """The ATen GEMMs a call of ``run()`` makes (the emulated ops run on the CPU, so the profiler sees them)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()
    return {e.name for e in prof.events() if e.name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")}


@pytest.mark.parametrize("options", [OPTIONS[0], OPTIONS[2], OPTIONS[4]], ids=lambda o: "-".join(str(v) for v in o))
@pytest.mark.parametrize("mode", ["1", "2"])
@pytest.mark.parametrize("layout", list(DENSE_LAYOUTS))
def test_dense_group_gemms_match_cpu(monkeypatch, layout, mode, options):
    monkeypatch.setenv("DEFINE_OPS_CUDA_DENSE_GROUPS", mode)
    tensors, params = make_step_inputs(DENSE_LAYOUTS[layout], options, 37, torch.float64)
    ours = []
    calls = gemm_calls(lambda: ours.extend(forward_backward(emulated_ops(), tensors, params)))
    assert_float64_matches(ours, forward_backward(torch.ops.define_ops, tensors, params))
    _, a, g, b, _, _ = DENSE_LAYOUTS[layout]
    dense = mode == "2" or ((a // g) % 2 + (b // g) % 2 > 0 and a % 2 == 0 and b % 2 == 0)
    assert ("aten::bmm" in calls) != dense and ("aten::mm" in calls) == dense, calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_group_gemms_low_precision_within_cpu_error(monkeypatch, dtype):
    monkeypatch.setenv("DEFINE_OPS_CUDA_DENSE_GROUPS", "1")
    tensors, params = make_step_inputs(DENSE_LAYOUTS["unaligned-bf16-groups"], OPTIONS[2], 53, torch.float64)
    low = {k: v.to(dtype) if v is not None else None for k, v in tensors.items()}
    calls = gemm_calls(lambda: forward_backward(emulated_ops(), low, params))
    assert ("aten::bmm" in calls) == (dtype == torch.float32), calls  # fp32: 4 elements per 16 bytes
    assert_low_precision_within_cpu_error(tensors, params, dtype)


def test_dense_group_gemms_in_the_stack_ops(monkeypatch):
    monkeypatch.setenv("DEFINE_OPS_CUDA_DENSE_GROUPS", "2")
    assert_stack_ops_match_cpu(*stack_case("awd_ptb", 23, torch.float64))


def test_dense_groups_setting_is_checked(monkeypatch):
    monkeypatch.setenv("DEFINE_OPS_CUDA_DENSE_GROUPS", "3")
    tensors, params = make_step_inputs("mix-middle", OPTIONS[0], 5, torch.float64)
    with pytest.raises(ValueError, match="DEFINE_OPS_CUDA_DENSE_GROUPS must be an integer in 0..2, got '3'"):
        forward_backward(emulated_ops(), tensors, params)


# The warp-per-row epilogue kernels (DEFINE_OPS_CUDA_WARP_ROWS=1), WARP_LAYOUTS and
# WARP_FALLBACK_LAYOUTS (tests/test_ops.py): where they run, and where the block-per-row kernels stay.
WARP_KERNELS = ("hgt_step_forward_warp_kernel", "hgt_step_backward_warp_kernel")


def warp_launches() -> tuple[int, int]:
    return tuple(emulated_ops().launch_count(name) for name in WARP_KERNELS)


@pytest.mark.parametrize("tokens", [0, 1, 37])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(str(v) for v in o))
@pytest.mark.parametrize("layout", list(WARP_LAYOUTS) + list(WARP_FALLBACK_LAYOUTS))
def test_warp_rows_float64_match_cpu(monkeypatch, layout, options, tokens):
    """Every output and gradient to 1e-10 of the CPU op, and the warp-row kernels ran exactly where
    the layer qualifies (with tokens; the 0-token step launches nothing)."""
    monkeypatch.setenv("DEFINE_OPS_CUDA_WARP_ROWS", "1")
    shape = WARP_LAYOUTS.get(layout) or WARP_FALLBACK_LAYOUTS[layout]
    tensors, params = make_step_inputs(shape, options, tokens, torch.float64)
    before = warp_launches()
    ours = forward_backward(emulated_ops(), tensors, params)
    launched = tuple(after - was for after, was in zip(warp_launches(), before, strict=True))
    cpu = forward_backward(torch.ops.define_ops, tensors, params)
    assert_same_layout(ours, cpu)
    assert_float64_matches(ours, cpu)
    shuffle, norm, _, _, _ = options
    shuffled = shuffle and shape[2] > 1  # one group: the shuffle is the identity
    expected = int(layout in WARP_LAYOUTS and not shuffled and tokens > 0)
    if layout == "sixteen-groups":  # group width 4: only the norm's group limit keeps it out
        expected = int(not shuffled and not norm and tokens > 0)
    # The backward's column sums (d bias, d γ and d β per feature, float64) for its 4 warps must fit
    # the emulated device's 48 KB of shared memory (an H100 has 227 KB), else the block-row kernel runs.
    b, bias = shape[3], options[4]
    sums_fit = 4 * 8 * ((b if bias else 0) + (2 * b if norm else 0)) <= 48 * 1024
    assert launched == (expected, expected * sums_fit), (launched, expected, sums_fit)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", OPTIONS[:2] + OPTIONS[4:5], ids=lambda o: "-".join(str(v) for v in o))
@pytest.mark.parametrize("layout", ["first-layer", "eight-groups-wide", "wide"])
def test_warp_rows_low_precision_within_cpu_error(monkeypatch, layout, options, dtype):
    monkeypatch.setenv("DEFINE_OPS_CUDA_WARP_ROWS", "1")
    before = warp_launches()
    tensors, params = make_step_inputs(WARP_LAYOUTS[layout], options, 53, torch.float64)
    assert_low_precision_within_cpu_error(tensors, params, dtype)
    assert all(after > was for after, was in zip(warp_launches(), before, strict=True))


def test_warp_rows_match_the_block_rows_and_are_deterministic(monkeypatch):
    """The two kernel families compute the same step (to rounding: their sums run in other orders),
    and the warp-row backward repeats itself bit for bit (no atomics; fixed orders)."""
    tensors, params = make_step_inputs(WARP_LAYOUTS["eight-groups-wide"], OPTIONS[1], 45, torch.float32)
    block_rows = forward_backward(emulated_ops(), tensors, params)
    monkeypatch.setenv("DEFINE_OPS_CUDA_WARP_ROWS", "1")
    first = forward_backward(emulated_ops(), tensors, params)
    again = forward_backward(emulated_ops(), tensors, params)
    for name, a, b, c in zip(NAMES, first, again, block_rows, strict=True):
        assert torch.equal(a, b), name
        assert max_err(a, c) <= 1e-5 * max(1.0, c.abs().max().item() if c.numel() else 1.0), name


@pytest.mark.parametrize("preset", ["awd_ptb", "nmt_wmt14"])
def test_warp_rows_in_the_stack_ops(monkeypatch, preset):
    monkeypatch.setenv("DEFINE_OPS_CUDA_WARP_ROWS", "1")
    before = warp_launches()
    x, tensors, lists = stack_case(preset, 29, torch.float64)
    assert_stack_matches_steps(emulated_ops(), x, tensors, lists)
    assert_stack_ops_match_cpu(x, tensors, lists)
    assert all(after > was for after, was in zip(warp_launches(), before, strict=True))


def test_warp_rows_setting_is_checked(monkeypatch):
    monkeypatch.setenv("DEFINE_OPS_CUDA_WARP_ROWS", "2")
    tensors, params = make_step_inputs("first-layer", OPTIONS[1], 5, torch.float64)
    with pytest.raises(ValueError, match="DEFINE_OPS_CUDA_WARP_ROWS must be an integer in 0..1, got '2'"):
        forward_backward(emulated_ops(), tensors, params)
