"""The Triton backend on a real GPU (compiled kernels, autotuning): whole-layer parity, bf16,
torch.compile through triton_op. Skipped without CUDA; run with the interpreter off (and,
for a quick correctness pass, autotuning off: each kernel then runs its first pruned config):

    TRITON_INTERPRET=0 DEFINE_OPS_TRITON_AUTOTUNE=0 python -m pytest tests/test_ops.py tests/test_triton_gpu.py \
        -k "triton or gpu" -q
"""

from __future__ import annotations

import os

import pytest
import torch

import define_ops
from define_ops import DeFINE, DeFINEConfig

from .conftest import assert_within_reference_error, max_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="set TRITON_INTERPRET=0 for the GPU run"),
]


def _pair(config: DeFINEConfig, dtype: torch.dtype, backend: str = "triton"):
    ref = DeFINE.from_config(config, backend="reference", dtype=torch.float64, device="cuda")
    ours = DeFINE.from_config(config, backend=backend, dtype=dtype, device="cuda")
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _run(module: DeFINE, ids: torch.Tensor, seed: int = 0):
    module.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout seeds for every module
    out = module(ids)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    out.backward(grad.to(device=out.device, dtype=out.dtype))
    return out.detach(), {name: p.grad for name, p in module.named_parameters()}


@pytest.mark.parametrize("preset", sorted(define_ops.PRESETS))
def test_presets_float64_match_reference_on_gpu(preset):
    config = DeFINEConfig.from_preset(preset, num_embeddings=1000)
    ref, ours = _pair(config, torch.float64)
    ids = torch.randint(0, 1000, (8, 129), device="cuda")  # 1,032 tokens: several token tiles
    for training in (False, True):
        (out_ref, grads_ref), (out, grads) = _run(ref.train(training), ids), _run(ours.train(training), ids)
        scale = max(1.0, out_ref.abs().max().item())
        assert max_err(out, out_ref) <= 1e-10 * scale
        for name, g_ref in grads_ref.items():
            assert max_err(grads[name], g_ref) <= 1e-10 * max(1.0, g_ref.abs().max().item()), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("preset", ["awd_ptb", "txl_wt103"])
def test_low_precision_within_reference_error_on_gpu(preset, dtype):
    config = DeFINEConfig.from_preset(preset, num_embeddings=1000)
    ref64, ours = _pair(config, dtype)
    ref_low = DeFINE.from_config(config, backend="reference", dtype=dtype, device="cuda")
    ref_low.load_state_dict(ref64.state_dict())
    ids = torch.randint(0, 1000, (4, 257), device="cuda")
    (out64, g64), (out_ref, g_ref), (out, g) = (_run(m.train(), ids) for m in (ref64, ref_low, ours))
    floor = {torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    assert_within_reference_error(out, out_ref, out64, floor=floor, what="out")
    for name in g64:
        assert_within_reference_error(g[name], g_ref[name], g64[name], floor=floor, what=name)


def test_dropout_masks_match_the_reference_on_gpu():
    config = DeFINEConfig(600, 64, input_dim=32, max_dim=256, dropout=0.4, shuffle=True)
    ref, ours = _pair(config, torch.float32)
    ids = torch.randint(0, 600, (3000,), device="cuda")
    torch.manual_seed(5)
    out_ref = ref.train()(ids)
    torch.manual_seed(5)
    out = ours.train()(ids)
    torch.testing.assert_close(out, out_ref.float(), rtol=1e-4, atol=1e-4)


def test_torch_compile_fullgraph_traces_the_triton_ops(monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)  # eager's dropout seeds
    config = DeFINEConfig.from_preset("nmt_wmt14", num_embeddings=500, dropout=0.1)
    eager = DeFINE.from_config(config, backend="triton", device="cuda").train()
    compiled = torch.compile(eager, fullgraph=True)
    ids = torch.randint(0, 500, (16, 33), device="cuda")
    torch.manual_seed(1)
    out = compiled(ids)
    out.float().pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in eager.named_parameters()}
    eager.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    eager(ids).float().pow(2).sum().backward()
    for name, p in eager.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-4, msg=name)


def test_embedding_gradient_is_deterministic_on_gpu():
    weight = torch.randn(5000, 128, device="cuda", requires_grad=True)
    ids = torch.randint(0, 50, (20000,), device="cuda")  # heavy repeats
    grads = []
    for _ in range(2):
        weight.grad = None
        define_ops.embedding_lookup(weight, ids, 0, 2.0, backend="triton").sum().backward()
        grads.append(weight.grad.clone())
    assert torch.equal(grads[0], grads[1])
    ref = weight.detach().clone().requires_grad_(True)
    define_ops.embedding_lookup(ref, ids, 0, 2.0, backend="reference").sum().backward()
    torch.testing.assert_close(grads[0], ref.grad)


@pytest.mark.parametrize("preset", ["awd_ptb", "txl_wt103"])  # fused norm; wide norm (row-wise kernel)
def test_dedup_without_sync_matches_the_plain_path_and_compiles_on_gpu(preset):
    # compiled kernels with a device-side row count: tiles past it exit early (HAS_ROWS)
    config = DeFINEConfig.from_preset(preset, num_embeddings=1000, dropout=0.0)
    ref, ours = _pair(config, torch.float64)
    ids = torch.randint(0, 300, (8, 129), device="cuda")  # ~290 distinct of 1,032: most tiles skipped
    out_ref, grads_ref = _run(ref.train(), ids)
    ours.dedup = True
    out, grads = _run(ours.train(), ids)
    assert max_err(out, out_ref) <= 1e-10 * max(1.0, out_ref.abs().max().item())
    for name, g_ref in grads_ref.items():
        assert max_err(grads[name], g_ref) <= 1e-10 * max(1.0, g_ref.abs().max().item()), name
    if preset == "awd_ptb":  # one compile keeps the GPU session's Triton stage short
        compiled = torch.compile(ours, fullgraph=True)  # static shapes: traces with dedup on
        torch.testing.assert_close(compiled(ids), out, rtol=1e-10, atol=1e-10)


def test_training_step_replays_as_a_cuda_graph_on_gpu():
    from .test_cuda import check_graph_replay

    check_graph_replay("triton")


def test_dedup_training_step_replays_as_a_cuda_graph_on_gpu():
    """Triton's dedup has static shapes and no host read: the step captures, and a replay gives
    the eager dedup step's gradients."""
    from .test_cuda import check_graph_replay

    check_graph_replay("triton", dedup=True)


def test_reduce_overhead_compile_trains_like_eager_on_gpu():
    from .test_cuda import check_reduce_overhead

    check_reduce_overhead("triton")
