"""The one-autograd-node stack (define_ops/stack.py) that DeFINE runs in eager mode: the same
numbers as the step-by-step ops (whose autograd torch.compile traces), gradcheck, frozen
parameters, autocast and its errors."""

from __future__ import annotations

import pytest
import torch

import define_ops
from define_ops import DeFINE, DeFINEConfig
from define_ops.stack import StepSpec, hgt_stack

from .conftest import HAS_CPU_KERNELS

FAST = [b for b in ("cpu", "triton") if b in define_ops.available_backends("cpu")]
needs_cpu_kernels = pytest.mark.skipif(not HAS_CPU_KERNELS, reason="compiled CPU kernels not loaded")


def forward_backward(module: DeFINE, ids: torch.Tensor):
    module.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # the same dropout seeds on both paths
    out = module(ids)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype))
    return out.detach(), {name: p.grad for name, p in module.named_parameters()}


@pytest.mark.parametrize("preset", ["awd_ptb", "nmt_wmt14", "paper_literal"])
@pytest.mark.parametrize("backend", FAST)
def test_stack_equals_the_step_by_step_ops(backend, preset, monkeypatch):
    config = DeFINEConfig.from_preset(preset, num_embeddings=200, input_dim=16, max_dim=64, embedding_dim=24)
    module = DeFINE.from_config(config, backend=backend, dtype=torch.float64).train()
    ids = torch.randint(0, 200, (2, 9))
    out, grads = forward_backward(module, ids)
    # What DeFINE runs under torch.compile: each step through its own registered autograd.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    out_steps, grads_steps = forward_backward(module, ids)
    assert torch.equal(out, out_steps)  # the same kernels in the same order: bitwise
    assert grads.keys() == grads_steps.keys()
    for name, grad in grads.items():
        assert torch.equal(grad, grads_steps[name]), name


def _small_steps(dtype=torch.float64, requires_grad=True):
    """Two HGT steps (4 groups with e mixed into 2 chunks, then 2 groups) and a Reduce."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, scale=0.3):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).requires_grad_(requires_grad)

    seed = torch.tensor(1234)
    return [
        (rand(4, 2, 4), rand(16), 1 + rand(4), rand(4), seed, StepSpec(8, 1, 2, True, "gelu", 0.2, 1e-5)),
        (rand(2, 12, 8), rand(16), 1 + rand(8), rand(8), seed + 1, StepSpec(8, 2, 1, False, "swish", 0.1, 1e-5)),
        (rand(1, 24, 6), rand(6), None, None, None, StepSpec(8, 1, 0, False, None, 0.0, 1e-5)),
    ]


@needs_cpu_kernels
def test_stack_gradcheck():
    steps = _small_steps()
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    tensors = [t for step in steps for t in step[:4] if t is not None]

    def run(x, *flat):
        it = iter(flat)
        rebuilt = [tuple(next(it) if t is not None else None for t in step[:4]) + step[4:] for step in steps]
        return hgt_stack(x, rebuilt, backend="cpu")

    assert torch.autograd.gradcheck(run, (x, *tensors), eps=1e-6, atol=1e-7)


@needs_cpu_kernels
def test_frozen_parameters_and_unused_output():
    steps = _small_steps()
    steps[0][0].requires_grad_(False)  # a frozen first weight: no gradient, the rest still flows
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    hgt_stack(x, steps, backend="cpu").sum().backward()
    assert steps[0][0].grad is None
    assert x.grad is not None and steps[1][0].grad is not None and steps[2][1].grad is not None
    assert steps[0][1].grad is not None  # the first bias still trains
    with torch.no_grad():
        out = hgt_stack(x, steps, backend="cpu")
    assert out.shape == (5, 6) and not out.requires_grad


@needs_cpu_kernels
def test_stack_under_autocast_runs_in_the_autocast_dtype():
    steps = _small_steps(torch.float32)
    x = torch.randn(5, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = hgt_stack(x, steps, backend="cpu")
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and steps[0][0].grad.dtype == torch.float32


def test_stack_rejects_the_reference_backend_and_unknown_activations():
    with pytest.raises(ValueError, match="compiled backend"):
        hgt_stack(torch.zeros(1, 8), [], backend="reference")
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        StepSpec(8, 0, 1, False, "tanh", 0.0, 1e-5)


@pytest.mark.parametrize("backend", FAST)
def test_layer_under_inference_mode_and_no_grad(backend):
    config = DeFINEConfig.from_preset("awd_ptb", num_embeddings=100, input_dim=16, max_dim=64, embedding_dim=24)
    module = DeFINE.from_config(config, backend=backend, dtype=torch.float64, cache="off").eval()
    ids = torch.randint(0, 100, (7,))
    expected = module(ids).detach()
    with torch.inference_mode():
        assert torch.equal(module(ids), expected)
    with torch.no_grad():
        out = module(ids)
    assert torch.equal(out, expected) and out.grad_fn is None
