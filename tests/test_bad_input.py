"""The raw ops (``torch.ops.define_ops.*``) and the op wrappers under bad input: a clear Python
exception naming the bad value, never a crash, a hang, a write out of bounds or a silent result.
Cases found by fuzzing every op with invalid arguments, each one a crash or a silent result before."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import define_ops
from define_ops import reference

from .conftest import HAS_CPU_KERNELS

pytestmark = pytest.mark.skipif(not HAS_CPU_KERNELS, reason="compiled CPU kernels not loaded")
OPS = torch.ops.define_ops if HAS_CPU_KERNELS else None


def test_crashes_found_by_fuzzing_now_raise():
    # In a child process: before the fixes these wrote out of bounds (SIGSEGV/SIGABRT), divided by
    # zero (SIGFPE) or ran for minutes; a crash must fail this test, not take the test run with it.
    script = textwrap.dedent(
        """
        import time, torch, define_ops
        O = torch.ops.define_ops
        cases = {
            "id past the table": lambda: O.embedding_lookup_backward(
                torch.randn(2, 64), torch.tensor([0, 10**12]), 7, None, 1.0),
            "negative id": lambda: O.embedding_lookup_backward(torch.randn(2, 64), torch.tensor([0, -1]), 7, None, 1.0),
            "id == V": lambda: O.embedding_lookup_backward(torch.ones(1, 4), torch.tensor([4]), 4, None, 1.0),
            "empty table": lambda: O.embedding_lookup_backward(torch.randn(2, 3), torch.tensor([0, 1]), 0, None, 1.0),
            "negative V": lambda: O.embedding_lookup_backward(torch.randn(1, 3), torch.tensor([0]), -1, None, 1.0),
            "no output features, e carried": lambda: O.hgt_step(
                torch.randn(2, 8), torch.randn(2, 4, 0), None, None, None, None, 8, 1, 1, False, "none", 0.0, 1e-5),
            "a billion empty groups": lambda: O.hgt_step(
                torch.randn(1, 0), torch.empty(10**9, 0, 0), None, None, None, None, 0, 0, 0, False, "none", 0.0, 1e-5),
            "negative e_out_chunks": lambda: O.hgt_step(
                torch.randn(2, 8), torch.randn(1, 8, 4), None, None, None, None, 0, 0, -1, False, "none", 0.0, 1e-5),
        }
        for name, call in cases.items():
            start = time.perf_counter()
            try:
                call()
                print(name, "| no error")
            except (IndexError, ValueError) as exc:
                seconds = round(time.perf_counter() - start, 2)
                print(name, "|", type(exc).__name__, "|", seconds, "|", str(exc).splitlines()[0])
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"crashed with {done.returncode}:\n{done.stdout}\n{done.stderr[-2000:]}"
    lines = dict(line.split(" | ", 1) for line in done.stdout.splitlines())
    assert len(lines) == 8 and not [name for name, said in lines.items() if said == "no error"], done.stdout
    for name in ("id past the table", "negative id", "id == V", "empty table"):
        assert lines[name].startswith("IndexError") and "out of range for num_embeddings" in lines[name]
    assert "num_embeddings=-1" in lines["negative V"]
    assert "empty groups" in lines["no output features, e carried"]
    billion = lines["a billion empty groups"]
    assert "empty groups" in billion and float(billion.split(" | ")[1]) < 1  # at once, not after minutes
    assert "must not be negative" in lines["negative e_out_chunks"]


@pytest.mark.parametrize("op", ["hgt_step", "hgt_step_backward", "embedding_lookup", "hgt_stack"])
def test_a_meta_tensor_among_cpu_ones_is_refused(op):
    # The Meta key's fake kernels won the dispatch and returned uninitialised CPU memory.
    x, weight = torch.randn(3, 8), torch.randn(2, 4, 6, device="meta")
    none = (None, None, None, None)
    with pytest.raises(ValueError, match="every tensor must be on cpu, got one on meta"):
        if op == "hgt_step":
            OPS.hgt_step(x, weight, *none, 0, 0, 0, False, "none", 0.0, 1e-5)
        elif op == "hgt_step_backward":
            saved = torch.empty(0, device="meta")
            OPS.hgt_step_backward(torch.randn(3, 12), x, weight, *none, saved, saved, saved, 0, 0, 0, False, "none",
                                  0.0, 1e-5)  # fmt: skip
        elif op == "embedding_lookup":
            OPS.embedding_lookup(torch.randn(5, 4), torch.tensor([1, 2], device="meta"), None, 1.0)
        else:
            OPS.hgt_stack(x, [weight], [None], [None], [None], [None], [0], [0], [0], [False], ["none"], [0.0], [1e-5],
                          False)  # fmt: skip


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_padding_idx_counts_from_the_end_and_out_of_range_is_an_error(backend):
    weight = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([0, 5, 2, 5])
    e = define_ops.ops.embedding_lookup(weight, ids, -1, 1.0, backend=backend)  # -1: row 5, as nn.Embedding
    assert (e[[1, 3]] == 0).all() and (e[0] != 0).all()
    e.sum().backward()
    assert (weight.grad[5] == 0).all() and (weight.grad[0] == 1).all()
    with pytest.raises(ValueError, match="padding_idx=6 is out of range"):
        define_ops.ops.embedding_lookup(weight, ids, 6, 1.0, backend=backend)
    if backend == "cpu":
        with pytest.raises(ValueError, match="padding_idx=-7 is out of range"):
            OPS.embedding_lookup_backward(torch.randn(4, 3), ids, 6, -7, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_scale_near_one_is_exact_in_low_precision(dtype):
    # 1 / (1 - p) was taken in the input's precision: at p = 0.999999 a kept value came out 986,895.
    p = 0.999999
    x = torch.ones(4096, 16, dtype=dtype)
    weight = torch.eye(16, dtype=dtype).reshape(1, 16, 16)
    out = define_ops.ops.hgt_step(x, weight, seed=7, dropout_p=p, backend="cpu").float()
    kept = out[out != 0]
    assert kept.numel() > 0
    expected = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32).to(dtype).float()
    torch.testing.assert_close(kept, expected.expand_as(kept), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(dropout_p=1.5), "dropout_p must be in"),
        (dict(dropout_p=-0.5), "dropout_p must be in"),
        (dict(norm_eps=-0.5), "norm_eps must be > 0"),
        (dict(e_out_chunks=-1), "must not be negative"),
    ],
)
def test_op_wrapper_validates_on_every_backend(backend, kwargs, message):
    with pytest.raises(ValueError, match=message):
        define_ops.ops.hgt_step(torch.randn(3, 8), torch.randn(2, 4, 3), seed=1, backend=backend, **kwargs)


def test_reference_agrees_on_what_is_valid():
    # the reference's own padding (F.embedding semantics) is what the fixed ops now match
    weight = torch.randn(6, 3)
    torch.testing.assert_close(
        define_ops.ops.embedding_lookup(weight, torch.tensor([5, 1]), -1, 1.0, backend="cpu"),
        reference.lookup_ref(weight, torch.tensor([5, 1]), -1, 1.0),
    )


def test_stack_step_arguments_are_named_before_sizes_are_derived():
    x, weight = torch.randn(3, 8), torch.randn(2, 4, 6)
    with pytest.raises(ValueError, match="step 0 has e_width=-88.*none may be negative"):
        OPS.hgt_stack(x, [weight], [None], [None], [None], [None], [-88], [1], [1], [False], ["none"], [0.0], [1e-5],
                      False)  # fmt: skip


def test_a_seed_of_64_bits_gives_the_references_mask():
    seed = 2**64 - 1  # the reference takes any 64-bit key; the wrapper overflowed int64 on it
    x, weight = torch.randn(5, 8, dtype=torch.float64), torch.randn(2, 4, 3, dtype=torch.float64)
    ours = define_ops.ops.hgt_step(x, weight, seed=seed, dropout_p=0.5, backend="cpu")
    ref = define_ops.ops.hgt_step(x, weight, seed=seed, dropout_p=0.5, backend="reference")
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_standalone_layout_helpers_name_a_bad_count():
    with pytest.raises(ValueError, match="groups=0 must be >= 1"):
        define_ops.ops.feature_shuffle(torch.randn(2, 8), 0)
    with pytest.raises(ValueError, match="groups=3 must be >= 1 and divide the width 8"):
        define_ops.ops.feature_shuffle(torch.randn(2, 8), 3)
    with pytest.raises(ValueError, match="chunks=0 must be >= 1"):
        define_ops.ops.split_mix(torch.randn(2, 4), torch.randn(2, 8), 0)


@pytest.mark.parametrize("backend", [b for b in ("cpu", "triton") if b in define_ops.available_backends("cpu")])
def test_every_stack_backend_refuses_a_negative_chunk_count(backend):
    # The kernels' own argument checks (C++ make_step_params / hgt_stack, Triton's _Step) catch it.
    from define_ops.stack import StepSpec, hgt_stack

    spec = StepSpec(e_width=8, e_in_chunks=1, e_out_chunks=-1, shuffle=False, activation=None, dropout_p=0.0,
                    norm_eps=1e-5)  # fmt: skip
    with pytest.raises(ValueError, match="e_out_chunks=-1.* negative"):
        hgt_stack(torch.randn(3, 8), [(torch.randn(2, 4, 3), None, None, None, None, spec)], backend=backend)
