"""The CPU epilogues' own float16/bfloat16 conversions (csrc/cpu/convert.h) against torch's, on every input.

The CPU kernels convert between the 16-bit storage types and float32 with branch-free bit
arithmetic of their own (c10's conversions did not vectorize in their loops). These tests build
the header into a test-only library (tests/cpu_convert_ops.cpp, about half a minute the first
time, cached in torch's extension directory) and compare it bit for bit with ATen's conversions
for all 65,536 16-bit patterns and a sample of float32 ones, and with c10's for all 2^32 float32
patterns (a NaN only needs to stay a NaN: payloads differ between ATen's scalar and vector paths
too). The kernels' use of the header is checked end to end by ``test_epilogue_rounds_like_aten``
and, within the reference's error, by tests/test_ops.py and tests/test_layer.py.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch

from .conftest import HAS_CPU_KERNELS

ROOT = Path(__file__).resolve().parents[1]
FORMATS = {"float16": (torch.float16, True), "bfloat16": (torch.bfloat16, False)}

pytestmark = pytest.mark.skipif(
    os.environ.get("DEFINE_OPS_SKIP_EMULATION") == "1", reason="DEFINE_OPS_SKIP_EMULATION=1 (no test-only builds)"
)


@functools.cache
def convert_ops():
    from torch.utils.cpp_extension import load

    load(
        name="define_ops_convert_test",
        sources=[str(ROOT / "tests" / "cpu_convert_ops.cpp")],
        extra_include_paths=[str(ROOT / "csrc")],
        extra_cflags=["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
    )
    return torch.ops.define_ops_convert_test


def _assert_bits_equal(ours: torch.Tensor, ref: torch.Tensor, is_nan: torch.Tensor, what: str) -> None:
    """ours, ref: int bits of the same format; is_nan: where the value is a NaN (only NaN-ness compared)."""
    bad = (ours != ref) & ~is_nan
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        mask = (1 << (8 * ours.element_size())) - 1  # the bit pattern, unsigned
        first = f"ours {int(ours[i]) & mask:#x}, ATen {int(ref[i]) & mask:#x}"
        raise AssertionError(f"{what}: {int(bad.sum())} mismatches, the first at index {i}: {first}")


@pytest.mark.parametrize("name", FORMATS)
def test_widening_every_16_bit_pattern(name: str) -> None:
    dtype, half = FORMATS[name]
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    ours = convert_ops().widen_bits(bits, half)
    ref = bits.view(dtype).float()
    _assert_bits_equal(ours.view(torch.int32), ref.view(torch.int32), ref.isnan(), f"{name} → float32")
    assert torch.equal(ours.isnan(), ref.isnan())


@pytest.mark.parametrize("name", FORMATS)
def test_rounding_every_float32(name: str) -> None:
    """All 2^32 inputs, in C++ (in Python with ATen it took ~30 s a format on 2 cores), against
    c10's scalar conversion (IEEE round to nearest even in software)."""
    _, half = FORMATS[name]
    mismatches, first, ours, theirs = convert_ops().compare_every_float32(half).tolist()
    assert mismatches == 0, (
        f"float32 → {name}: {mismatches} mismatches, the first for input bits {first:#010x}: ours {ours:#06x}, "
        f"c10 {theirs:#06x}"
    )


@pytest.mark.parametrize("name", FORMATS)
def test_rounding_matches_aten_tensor_conversion(name: str) -> None:
    """A strided sample of the float32 patterns (every 4,099th, with ties, subnormal, overflow and
    NaN cases added) against ATen's vectorized tensor conversion, the one the rest of torch uses."""
    dtype, half = FORMATS[name]
    sample = torch.arange(-(2**31), 2**31, 4099, dtype=torch.int64)
    # ties and near-ties at every exponent (low 13 / 16 bits at the halfway point and next to it)
    exponents = torch.arange(0, 256, dtype=torch.int64) << 23
    halfway = 0x1000 if half else 0x8000
    low = torch.tensor([halfway - 1, halfway, halfway + 1, 3 * halfway, 0x7FFFFF], dtype=torch.int64)
    ties = (exponents[:, None] | low[None, :]).reshape(-1)
    sample = torch.cat([sample, ties, ties | (1 << 31)])
    values = sample.to(torch.int32).view(torch.float32)  # int64 → int32 wraps to the bit pattern
    ours = convert_ops().round_to_bits(values, half)
    ref = values.to(dtype).view(torch.int16)
    nan = values.isnan()
    _assert_bits_equal(ours, ref, nan, f"float32 → {name}")
    assert ours[nan].view(dtype).isnan().all(), f"float32 → {name}: a NaN input did not stay a NaN"


@pytest.mark.skipif(not HAS_CPU_KERNELS, reason="compiled CPU kernels not loaded")
@pytest.mark.parametrize("name", FORMATS)
def test_epilogue_rounds_like_aten(name: str) -> None:
    """The CPU kernel's forward epilogue, bit for bit: x @ I is exact, so the saved pre-activation
    is ATen's rounding of float32(x) + float32(bias) and the output its ReLU — with magnitudes
    across the format's range, overflow to infinity, and infinities, NaN and subnormals in the bias."""
    dtype, _ = FORMATS[name]
    gen = torch.Generator().manual_seed(0)
    tokens, width, e_width = 67, 48, 8
    finfo = torch.finfo(dtype)
    # magnitudes from float16's subnormals to a quarter of the format's largest value (x stays finite:
    # an infinity in x would meet the zeros of the weight)
    scales = torch.tensor([2**-20, finfo.tiny, 1e-3, 1.0, 1e3, finfo.max / 16], dtype=torch.float32)
    normal = torch.randn(tokens, width, generator=gen).clamp(-4, 4)
    x = (normal * scales[torch.randint(0, 6, (tokens, width), generator=gen)]).to(dtype)
    # x normal: oneDNN's bfloat16 GEMM flushes subnormal inputs to zero (the bias may be subnormal)
    x = torch.where(x.abs() < finfo.tiny, torch.full_like(x, finfo.tiny), x)
    normal = torch.randn(width, generator=gen).clamp(-4, 4)
    bias = (normal * scales[torch.randint(0, 6, (width,), generator=gen)]).to(dtype)
    bias[:4] = torch.tensor([float("inf"), float("-inf"), float("nan"), finfo.max], dtype=dtype)
    e = torch.randn(tokens, e_width, generator=gen).to(dtype)
    weight = torch.eye(width, dtype=dtype).unsqueeze(0)  # one group: y = x exactly
    inputs = torch.cat([e, x], dim=1)
    # weight: [1, e_width + width, width] reading only x's columns
    weight = torch.cat([torch.zeros(1, e_width, width, dtype=dtype), weight], dim=1)
    # the CPU op itself: it also returns the saved pre-activation
    out, saved, _, _ = torch.ops.define_ops.hgt_step.default(
        inputs, weight, bias, None, None, None, e_width, 1, 1, False, "relu", 0.0, 1e-5
    )
    expected = (x.float() + bias.float()).to(dtype)
    assert torch.equal(saved.view(torch.int16)[~expected.isnan()], expected.view(torch.int16)[~expected.isnan()])
    assert torch.equal(saved.isnan(), expected.isnan())
    h = out[:, e_width:]
    relu = torch.where(expected < 0, torch.zeros_like(expected), expected)  # as the kernel: NaN and -0.0 pass
    assert torch.equal(h.isnan(), relu.isnan())
    assert torch.equal(h.view(torch.int16)[~relu.isnan()], relu.view(torch.int16)[~relu.isnan()])
    assert torch.equal(out[:, :e_width], e)  # e's copy is a copy
