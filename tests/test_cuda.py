"""The CUDA backend on a GPU against the reference: every output and gradient, presets, the option
grid, awkward shapes, low precision, opcheck, torch.compile, determinism, no host syncs, launch counts.

Skipped without a CUDA device (tests/test_cuda_emulation.py runs the same kernel code on CPU
threads). Low-precision tolerances: at most 2x the reference's own error in that precision
against float64 (tests/conftest.py), plus a floor relative to the magnitude.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import define_ops
from define_ops import PRESETS, DeFINE, DeFINEConfig, perf

from .conftest import assert_within_reference_error, max_err
from .test_ops import LAYOUTS, OPTIONS, WARP_FALLBACK_LAYOUTS, WARP_LAYOUTS, _op_args, make_step_inputs, run_step
from .test_stack import assert_stack_matches_steps, graph_node_names, stack_case

HAS_CUDA_BACKEND = torch.cuda.is_available() and "cuda" in define_ops.available_backends("cuda")
pytestmark = pytest.mark.skipif(not HAS_CUDA_BACKEND, reason="needs a CUDA device and the compiled CUDA kernels")
DEVICE = "cuda"


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return max_err(a, b) / max(1.0, b.abs().max().item()) if b.numel() else 0.0


# ----------------------------------------------------------------------------- the op, float64
@pytest.mark.parametrize("tokens", [0, 1, 37])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(str(v) for v in o))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_step_float64_matches_reference(layout, options, tokens):
    check_step_float64(layout, options, tokens)


@pytest.mark.parametrize("options", [OPTIONS[2], OPTIONS[4]], ids=["shuffle-norm-gelu-drop", "norm-swish-drop"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_step_float64_many_tokens(layout, options):
    """4099 rows: every block of the persistent grid walks several rows."""
    check_step_float64(layout, options, 4099)


def check_step_float64(layout, options, tokens):
    tensors, params = make_step_inputs(layout, options, tokens, torch.float64, DEVICE)
    out_ref, grads_ref = run_step("reference", tensors, params)
    out, grads = run_step("cuda", tensors, params)
    assert out.shape == out_ref.shape and out.is_contiguous()
    assert relative(out, out_ref) <= 1e-10
    for name, g_ref in grads_ref.items():
        assert grads[name] is not None and grads[name].shape == g_ref.shape, name
        assert relative(grads[name], g_ref) <= 1e-10, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", OPTIONS[1:5], ids=lambda o: "-".join(str(v) for v in o))
@pytest.mark.parametrize("layout", ["first-layer", "mix-middle", "eight-groups", "dense-last"])
def test_step_low_precision_within_reference_error(layout, options, dtype):
    check_step_low_precision(layout, options, dtype)


def check_step_low_precision(layout, options, dtype):
    tensors, params = make_step_inputs(layout, options, 301, torch.float64, DEVICE)
    low = {k: v.to(dtype) if v is not None else None for k, v in tensors.items()}
    out_hi, grads_hi = run_step("reference", tensors, params)
    out_ref, grads_ref = run_step("reference", low, params)
    out, grads = run_step("cuda", low, params)
    floor = {torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    assert_within_reference_error(out, out_ref, out_hi, floor=floor, what="out")
    for name in grads_hi:
        assert_within_reference_error(grads[name], grads_ref[name], grads_hi[name], floor=floor, what=name)


def test_wide_layers_use_the_global_workspace_path():
    """A 16384-wide single-group layer: the backward's stage (3 rows of fp32 + γ/β sums) exceeds
    any SM's shared memory, so the kernels stage rows in a global workspace."""
    x = torch.randn(33, 512, device=DEVICE, dtype=torch.float64)
    weight = torch.randn(1, 512, 16384, device=DEVICE, dtype=torch.float64) * 512**-0.5
    tensors = dict(
        x=x, weight=weight, bias=torch.randn(16384, device=DEVICE, dtype=torch.float64) * 0.1,
        norm_weight=torch.ones(16384, device=DEVICE, dtype=torch.float64),
        norm_bias=torch.zeros(16384, device=DEVICE, dtype=torch.float64),
    )  # fmt: skip
    params = dict(seed=torch.tensor(5, device=DEVICE), e_width=0, e_in_chunks=0, e_out_chunks=0, shuffle=False,
                  activation="gelu", dropout_p=0.1)  # fmt: skip
    out_ref, grads_ref = run_step("reference", tensors, params)
    out, grads = run_step("cuda", tensors, params)
    assert relative(out, out_ref) <= 1e-10
    for name, g_ref in grads_ref.items():
        assert relative(grads[name], g_ref) <= 1e-10, name


@pytest.mark.slow
def test_int64_row_offsets():
    """T · out_width > 2^31: row offsets must be 64-bit (bf16, about 13 GB of GPU memory)."""
    tokens, width = (1 << 21) + 3, 1032
    x = torch.randn(tokens, 16, device=DEVICE, dtype=torch.bfloat16)
    weight = torch.randn(1, 16, width - 16, device=DEVICE, dtype=torch.bfloat16)
    out = define_ops.hgt_step(x, weight, e_width=16, e_in_chunks=1, e_out_chunks=1, activation="relu", backend="cuda")
    tail = slice(tokens - 5, tokens)
    expected = define_ops.hgt_step(x[tail], weight, e_width=16, e_in_chunks=1, e_out_chunks=1, activation="relu",
                                   backend="reference")  # fmt: skip
    assert out.shape == (tokens, width)
    torch.testing.assert_close(out[tail], expected, rtol=2e-2, atol=2e-2)


def test_no_host_synchronisation_in_the_step():
    """The dropout seed is read on the device: forward and backward never wait for the GPU."""
    tensors, params = make_step_inputs("first-layer", OPTIONS[2], 64, torch.float32, DEVICE)
    leaves = {k: v.requires_grad_(True) for k, v in tensors.items() if v is not None}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = define_ops.hgt_step(**leaves, **params, backend="cuda")
        out.backward(torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend", [b for b in ("cuda", "triton") if b in define_ops.available_backends(DEVICE)])
@pytest.mark.parametrize("cached", [False, True])
def test_deferred_id_check_never_waits_for_the_gpu(backend, cached):
    """validate_ids="deferred": training steps (and eval-table lookups) with no host synchronisation;
    a bad id gets a NaN row and the next call raises naming it."""
    layer = DeFINE(500, 64, input_dim=32, max_dim=128, depth=2, backend=backend, device=DEVICE,
                   validate_ids="deferred").train(not cached)  # fmt: skip
    ids = torch.randint(0, 500, (4, 33), device=DEVICE)
    bad = ids.clone()
    bad[2, 5] = 500

    def step(token_ids):
        if cached:
            with torch.no_grad():
                return layer(token_ids)
        out = layer(token_ids)
        out.float().sum().backward()
        return out

    step(ids)  # warm-up: kernels loaded, the table built, the pinned-memory pool primed
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step(ids)
        out = step(bad)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    nan_rows = out.isnan().all(-1)
    assert nan_rows[2, 5] and nan_rows.sum() == 1 and torch.isfinite(out[~nan_rows]).all()
    with pytest.raises(IndexError, match="token id 500 is out of range"):
        layer.check_pending_ids()
    step(ids)
    layer.check_pending_ids()


def test_backward_is_bitwise_deterministic():
    tensors, params = make_step_inputs("first-layer", OPTIONS[2], 20000, torch.bfloat16, DEVICE)
    first = run_step("cuda", tensors, params)
    again = run_step("cuda", tensors, params)
    assert torch.equal(first[0], again[0])
    for name in first[1]:
        assert torch.equal(first[1][name], again[1][name]), name
    ids = torch.randint(0, 50, (20000,), device=DEVICE)  # heavy repetition
    grad = torch.randn(20000, 64, device=DEVICE, dtype=torch.bfloat16)
    g1 = torch.ops.define_ops.embedding_lookup_backward(grad, ids, 500, None, 1.5)
    g2 = torch.ops.define_ops.embedding_lookup_backward(grad, ids, 500, None, 1.5)
    assert torch.equal(g1, g2)


def _parameter_grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters()}


def _assert_grads_close(module: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    """Within fp32 rounding: cuBLAS may pick another algorithm under capture."""
    for name, p in module.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_dedup_layer_gradients_are_bitwise_deterministic():
    """With dedup, repeated ids' gradients are summed by the lookup op's ordered backward (not
    index_select's atomics): every parameter gradient repeats bit for bit."""
    config = DeFINEConfig.from_preset("nmt_wmt14", num_embeddings=500, dropout=0.0)
    module = DeFINE.from_config(config, backend="cuda", device=DEVICE, dedup=True)
    ids = torch.randint(0, 50, (8000,), device=DEVICE)  # heavy repetition
    grad = torch.randn(8000, config.embedding_dim, device=DEVICE)
    runs = []
    for _ in range(3):
        module.zero_grad(set_to_none=True)
        module(ids).backward(grad)
        runs.append(_parameter_grads(module))
    for other in runs[1:]:
        for name, value in runs[0].items():
            assert torch.equal(value, other[name]), name


# ----------------------------------------------------------------------------- the embedding op
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [3, 16, 256])
@pytest.mark.parametrize("padding_idx", [None, 3])
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
def test_embedding_matches_reference(ids_dtype, padding_idx, width, dtype):
    weight = torch.randn(1000, width, device=DEVICE, dtype=torch.float64)
    ids = torch.randint(0, 40, (7, 301), device=DEVICE, dtype=ids_dtype)
    ids[0, :5] = 3
    grad_out = torch.linspace(-1, 1, ids.numel() * width, device=DEVICE, dtype=torch.float64).reshape(7, 301, width)
    results = []
    for backend, precision in (("reference", torch.float64), ("reference", dtype), ("cuda", dtype)):
        w = weight.to(precision).clone().requires_grad_(True)  # clone: .to(float64) would alias `weight`
        e = define_ops.embedding_lookup(w, ids, padding_idx, 2.5, backend=backend)
        # the same low-precision gradient values for every run, so only the accumulation differs
        e.backward(grad_out.to(dtype).to(precision))
        results.append((e.detach(), w.grad))
    (e_exact, g_exact), (e_ref, g_ref), (e, g) = results
    assert e.shape == (7, 301, width) and g.shape == (1000, width)
    assert torch.equal(e, e_ref)
    # Rows sum ~50 gradients. ATen's bf16 embedding backward accumulates in bf16 (rows come out
    # up to ~3% off the exact sum); ours accumulates in fp32 and rounds once, so it stays within
    # one bf16 ulp of the float64 sum whatever the reference does; fp32: 50 fp32 additions.
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: torch.finfo(torch.bfloat16).eps}[dtype]
    assert relative(g, g_exact) <= tol, f"error {relative(g, g_exact):.2e} (reference: {relative(g_ref, g_exact):.2e})"
    if padding_idx is not None:
        assert (g[padding_idx] == 0).all()


_SORTED_TABLE_GRADIENT = """
import sys, torch
import define_ops  # noqa: F401  (registers the ops)
ids, grad = torch.load(sys.argv[1])
g = torch.ops.define_ops.embedding_lookup_backward(grad.cuda(), ids.cuda(), 1000, 3, 2.5)
torch.save(g.cpu(), sys.argv[2])
"""


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_backward_sort_free_equals_sorted_bitwise(tmp_path, dtype):
    """Batches up to DEFINE_OPS_CUDA_SMALL_BATCH_TOKENS (read once per process: the sorted run is a
    subprocess with 0) skip the sort; both paths add each id's rows in token order."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    ids = torch.randint(0, 40, (2107,))
    ids[::5] = 3  # the padding id
    ids[::7] = 11
    grad = torch.randn(2107, 24).to(dtype)
    torch.save((ids, grad), tmp_path / "inputs.pt")
    env = {**os.environ, "DEFINE_OPS_CUDA_SMALL_BATCH_TOKENS": "0"}
    done = subprocess.run([sys.executable, "-c", _SORTED_TABLE_GRADIENT, str(tmp_path / "inputs.pt"),
                           str(tmp_path / "sorted.pt")], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    sort_free = torch.ops.define_ops.embedding_lookup_backward(grad.to(DEVICE), ids.to(DEVICE), 1000, 3, 2.5)
    assert torch.equal(sort_free.cpu(), torch.load(tmp_path / "sorted.pt"))


def test_embedding_out_of_range_ids_give_nan_rows_not_a_crash():
    weight = torch.randn(10, 8, device=DEVICE)
    e = torch.ops.define_ops.embedding_lookup(weight, torch.tensor([1, 10, -1], device=DEVICE), None, 1.0)
    torch.cuda.synchronize()
    assert torch.equal(e[0], weight[1]) and e[1:].isnan().all()


# ----------------------------------------------------------------------------- the module
@pytest.mark.parametrize("mode", ["1", "2"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("preset", ["nmt_wmt14", "lstm_wt103_n7"])  # unaligned group widths
def test_dense_group_gemms_match_reference(monkeypatch, preset, dtype, mode):
    """DEFINE_OPS_CUDA_DENSE_GROUPS: grouped layers as one GEMM against the block-diagonal weight."""
    monkeypatch.setenv("DEFINE_OPS_CUDA_DENSE_GROUPS", mode)
    check_training_step_against_reference(DeFINEConfig.from_preset(preset, num_embeddings=300, dropout=0.0), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("preset", ["nmt_wmt14", "lstm_wt103_n7", "txl_wt103"])  # unaligned by default
def test_aligned_group_widths_match_reference(preset, dtype):
    """group_width_multiple=8: the widths under which cuBLAS can take its aligned kernels."""
    config = DeFINEConfig.from_preset(preset, num_embeddings=300, dropout=0.0, group_width_multiple=8)
    check_training_step_against_reference(config, dtype)


def check_training_step_against_reference(config: DeFINEConfig, dtype: torch.dtype) -> None:
    """One training step of the cuda backend against the float64 reference (float64 to 1e-10;
    lower precisions within the reference's own error in that dtype)."""
    high = DeFINE.from_config(config, backend="reference", device=DEVICE, dtype=torch.float64)
    ref = DeFINE.from_config(config, backend="reference", device=DEVICE, dtype=dtype)
    fast = DeFINE.from_config(config, backend="cuda", device=DEVICE, dtype=dtype)
    ref.load_state_dict(high.state_dict())
    fast.load_state_dict(high.state_dict())
    ids = torch.randint(0, 300, (5, 61), device=DEVICE)
    grad = torch.randn(5, 61, config.embedding_dim, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    results = []
    for module in (high, ref, fast):
        module.train().zero_grad(set_to_none=True)
        out = module(ids)
        out.backward(grad.to(DEVICE, out.dtype))
        results.append((out.detach(), {n: p.grad for n, p in module.named_parameters()}))
    (out_hi, g_hi), (out_ref, g_ref), (out, g) = results
    if dtype == torch.float64:
        assert relative(out, out_hi) <= 1e-10
        for name in g_hi:
            assert relative(g[name], g_hi[name]) <= 1e-10, name
        return
    assert_within_reference_error(out, out_ref, out_hi, floor=2e-2, what="out")
    for name in g_hi:
        assert_within_reference_error(g[name], g_ref[name], g_hi[name], floor=2e-2, what=name)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_float64_match_reference(preset):
    check_preset_float64(preset)


def check_preset_float64(preset):
    config = DeFINEConfig.from_preset(preset, num_embeddings=300)
    ref = DeFINE.from_config(config, backend="reference", device=DEVICE, dtype=torch.float64)
    fast = DeFINE.from_config(config, backend="cuda", device=DEVICE, dtype=torch.float64)
    fast.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 300, (3, 41), device=DEVICE)
    for training in (False, True):
        results = []
        for module in (ref, fast):
            module.train(training).zero_grad(set_to_none=True)
            torch.manual_seed(0)
            out = module(ids)
            out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=out.dtype).to(DEVICE))
            results.append((out.detach(), {n: p.grad for n, p in module.named_parameters()}))
        (out_ref, g_ref), (out, g) = results
        assert relative(out, out_ref) <= 1e-10
        for name in g_ref:
            assert relative(g[name], g_ref[name]) <= 1e-10, name


@pytest.mark.parametrize(
    "schedule,width_rule,skip,shuffle",
    list(itertools.product(["halving", "cyclic"], ["paper", "linspace"], ["mix", "concat", "none"], [False, True])),
)
def test_option_grid_float64_matches_reference(schedule, width_rule, skip, shuffle):
    for norm, activation in [("layer", "gelu"), (None, None), (None, "swish"), ("layer", "relu")]:
        config = DeFINEConfig(
            97, 40, input_dim=16, max_dim=96, depth=4, max_groups=8, group_schedule=schedule, width_rule=width_rule,
            skip=skip, skip_into_reduce=skip != "none", shuffle=shuffle, norm=norm, activation=activation,
            dropout=0.2, padding_idx=5,
        )  # fmt: skip
        ref = DeFINE.from_config(config, backend="reference", device=DEVICE, dtype=torch.float64).train()
        fast = DeFINE.from_config(config, backend="cuda", device=DEVICE, dtype=torch.float64).train()
        fast.load_state_dict(ref.state_dict())
        ids = torch.randint(0, 97, (29,), device=DEVICE)
        ids[3] = 5
        outs = []
        for module in (ref, fast):
            torch.manual_seed(1)
            out = module(ids)
            out.sum().backward()
            outs.append((out.detach(), {n: p.grad for n, p in module.named_parameters()}))
        assert relative(outs[1][0], outs[0][0]) <= 1e-10
        for name in outs[0][1]:
            assert relative(outs[1][1][name], outs[0][1][name]) <= 1e-10, name


def test_torch_compile_fullgraph():
    config = DeFINEConfig.from_preset("nmt_wmt14", num_embeddings=200, depth=3)
    eager = DeFINE.from_config(config, backend="cuda", device=DEVICE).train()
    compiled = torch.compile(eager, fullgraph=True, dynamic=False)
    ids = torch.randint(0, 200, (6, 7), device=DEVICE)
    with torch._inductor.config.patch(fx_graph_cache=False):
        out = compiled(ids)
        out.sum().backward()
        assert eager.weight.grad is not None and eager.layers[0].weight.grad is not None
        eager.eval()
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids), eager(ids))


@pytest.mark.parametrize("preset", ["awd_ptb", "nmt_wmt14"])
def test_autocast_step_matches_a_bfloat16_layer(preset):
    """float32 parameters under bf16 autocast (cast in one copy inside the stack's node, gradients
    back in one) against the same values held in bf16: outputs and gradients within bf16 rounding,
    float32 gradients, no per-parameter cast node."""
    config = DeFINEConfig.from_preset(preset, num_embeddings=300, dropout=0.0)
    mixed = DeFINE.from_config(config, backend="cuda", device=DEVICE).train()
    held = DeFINE.from_config(config, backend="cuda", device=DEVICE, dtype=torch.bfloat16).train()
    held.load_state_dict(mixed.state_dict())
    ids = torch.randint(0, 300, (4, 37), device=DEVICE)
    grad = torch.randn(4, 37, config.embedding_dim, device=DEVICE, dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = mixed(ids)
    assert "ToCopyBackward0" not in graph_node_names(out)
    out.backward(grad)
    expected = held(ids)
    expected.backward(grad)

    def off(a, b):  # largest difference relative to the largest value; on the CPU backend (same
        # check) 0.7 % and 1.6 % at most: e is scaled in float32 before its cast on one side only
        return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()

    assert out.dtype == torch.bfloat16 and off(out, expected) <= 3e-2
    for (name, p), q in zip(mixed.named_parameters(), held.parameters(), strict=True):
        assert p.grad.dtype == torch.float32 and off(p.grad, q.grad) <= 5e-2, name


# ----------------------------------------------------------------------------- opcheck
def _cuda_samples():
    cases = [("first-layer", OPTIONS[2], 9), ("mix-middle", OPTIONS[4], 6), ("no-skip", OPTIONS[0], 4),
             ("concat-grouped", OPTIONS[3], 0), ("eight-groups", OPTIONS[5], 1)]  # fmt: skip
    return [make_step_inputs(layout, options, tokens, torch.float32, DEVICE) for layout, options, tokens in cases]


@pytest.mark.parametrize("sample", range(5))
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_hgt_step(sample, requires_grad):
    tensors, params = _cuda_samples()[sample]
    if requires_grad:
        tensors = {k: v.requires_grad_(True) if v is not None else None for k, v in tensors.items()}
    torch.library.opcheck(torch.ops.define_ops.hgt_step.default, _op_args(tensors, params))


@pytest.mark.parametrize("sample", range(5))
def test_opcheck_hgt_step_backward(sample):
    tensors, params = _cuda_samples()[sample]
    args = _op_args(tensors, params)
    out, saved, mean, rstd = torch.ops.define_ops.hgt_step(*args)
    grad = torch.randn_like(out)
    backward_args = (grad, *args[:6], saved, mean, rstd, *args[6:])
    torch.library.opcheck(torch.ops.define_ops.hgt_step_backward.default, backward_args)


@pytest.mark.parametrize("padding_idx", [None, 2])
def test_opcheck_embedding(padding_idx):
    weight = torch.randn(10, 8, device=DEVICE, requires_grad=True)
    ids = torch.tensor([1, 2, 9, 2, 0], device=DEVICE)
    torch.library.opcheck(torch.ops.define_ops.embedding_lookup.default, (weight, ids, padding_idx, 1.5))
    grad = torch.randn(5, 8, device=DEVICE)
    torch.library.opcheck(torch.ops.define_ops.embedding_lookup_backward.default, (grad, ids, 10, padding_idx, 1.5))


# ----------------------------------------------------------------------------- the stack ops
@pytest.mark.parametrize("tokens", [0, 1, 37, 1000])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset", ["awd_ptb", "lstm_wt103", "paper_literal"])
def test_stack_ops_equal_the_step_ops(preset, dtype, tokens):
    x, tensors, lists = stack_case(preset, tokens, dtype, DEVICE)
    assert_stack_matches_steps(torch.ops.define_ops, x, tensors, lists)


@pytest.mark.parametrize("tokens", [0, 5])
def test_opcheck_stack_ops(tokens):
    x, tensors, lists = stack_case("awd_ptb", tokens, torch.float32, DEVICE)
    for keep in (True, False):
        torch.library.opcheck(torch.ops.define_ops.hgt_stack.default, (x, *tensors, *lists, keep))
    out, values, stats = torch.ops.define_ops.hgt_stack(x, *tensors, *lists, True)
    args = (torch.randn_like(out), x, values, stats, *tensors, *lists)
    torch.library.opcheck(torch.ops.define_ops.hgt_stack_backward.default, args)


def test_stack_training_step_has_no_host_synchronisation():
    config = DeFINEConfig.from_preset("awd_ptb", num_embeddings=500)
    module = DeFINE.from_config(config, backend="cuda", device=DEVICE, validate_ids=False).train()
    ids = torch.randint(0, 500, (64,), device=DEVICE)
    module(ids).sum().backward()  # warm-up: allocator, cuBLAS handles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        module(ids).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ----------------------------------------------------------------------------- launch budget
@pytest.mark.parametrize("layout", ["first-layer", "mix-middle", "no-skip"])
def test_one_fused_kernel_per_step_and_pass(layout):
    """Ours: exactly one kernel in the forward and one in the backward of a step; everything else
    is the GEMMs (reported: cuBLAS may add a split-K reduction kernel for some shapes)."""
    tensors, params = make_step_inputs(layout, OPTIONS[2], 1000, torch.bfloat16, DEVICE)
    args = _op_args(tensors, params)
    forward = perf.kernel_launches(lambda: torch.ops.define_ops.hgt_step(*args))
    out, saved, mean, rstd = torch.ops.define_ops.hgt_step(*args)
    grad = torch.randn_like(out)
    backward = perf.kernel_launches(
        lambda: torch.ops.define_ops.hgt_step_backward(grad, *args[:6], saved, mean, rstd, *args[6:])
    )
    print(f"\n{layout}: forward {forward}\nbackward {backward}")
    assert len(perf.ours(forward["kernels"])) == 1 and len(perf.ours(backward["kernels"])) == 1
    assert forward["memcpys"] == 0 and backward["memcpys"] == 0
    assert len(forward["kernels"]) <= 3 and len(backward["kernels"]) <= 5  # 2 and 3 unless cuBLAS splits K


# ----------------------------------------------------------------------------- CUDA graphs
def check_graph_replay(backend: str, dedup: bool = False) -> None:
    """The benchmarks' graph providers (and users' make_graphed_callables / reduce-overhead) rely
    on the step being capturable: no host synchronisation, no allocation outside the graph's pool.
    Without dropout a replay must give the eager step's gradients (to fp32 rounding: cuBLAS may
    pick another algorithm under capture). Shared with tests/test_triton_gpu.py."""
    from define_ops.bench import graph_replay, make_workload

    make_workload("nmt_wmt14", f"{backend}_graph", "fwd_bwd", quick=True, dtype=torch.float32, dedup=dedup).step()
    config = DeFINEConfig.from_preset("nmt_wmt14", num_embeddings=2000, dropout=0.0)
    module = DeFINE.from_config(config, backend=backend, device=DEVICE, dedup=dedup)
    ids = torch.randint(0, 2000 if not dedup else 150, (300,), device=DEVICE)  # with dedup: repeated ids
    grad = torch.randn(300, config.embedding_dim, device=DEVICE)
    module(ids).backward(grad)
    eager = _parameter_grads(module)
    graph_replay(module, module, ids, grad)()  # capture (the benchmarks' recipe), replay
    _assert_grads_close(module, eager)


def test_training_step_replays_as_a_cuda_graph():
    check_graph_replay("cuda")


def check_reduce_overhead(backend: str) -> None:
    """torch.compile(mode="reduce-overhead") of the layer (CUDA graphs via cudagraph trees, how a
    user removes the host time) trains as the eager layer does: same gradients, several steps.
    Shared with tests/test_triton_gpu.py."""
    config = DeFINEConfig.from_preset("nmt_wmt14", num_embeddings=2000, dropout=0.0)
    module = DeFINE.from_config(config, backend=backend, device=DEVICE)
    compiled = torch.compile(module, mode="reduce-overhead", fullgraph=True)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    for _ in range(4):  # warm-up, recording, then replays
        ids = torch.randint(0, 2000, (300,), device=DEVICE, generator=gen)
        grad = torch.randn(300, config.embedding_dim, device=DEVICE, generator=gen)
        module.zero_grad(set_to_none=True)
        module(ids).backward(grad)
        eager = _parameter_grads(module)
        module.zero_grad(set_to_none=True)
        torch.compiler.cudagraph_mark_step_begin()
        compiled(ids).backward(grad)
        _assert_grads_close(module, eager)


def test_reduce_overhead_compile_trains_like_eager():
    check_reduce_overhead("cuda")


# ----------------------------------------------------------------------------- warp-per-row epilogues
# DEFINE_OPS_CUDA_WARP_ROWS=1 (off by default until timed): the same checks on the warp-row kernels,
# which run where a layer qualifies (tests/test_cuda_emulation.py checks where that is).
@pytest.mark.parametrize("tokens", [1, 37, 4099])
@pytest.mark.parametrize("options", [OPTIONS[1], OPTIONS[4], OPTIONS[6]], ids=lambda o: "-".join(str(v) for v in o))
@pytest.mark.parametrize("layout", list(WARP_LAYOUTS) + list(WARP_FALLBACK_LAYOUTS))
def test_warp_rows_step_float64_matches_reference(monkeypatch, layout, options, tokens):
    monkeypatch.setenv("DEFINE_OPS_CUDA_WARP_ROWS", "1")
    check_step_float64(WARP_LAYOUTS.get(layout) or WARP_FALLBACK_LAYOUTS[layout], options, tokens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", [OPTIONS[1], OPTIONS[4]], ids=lambda o: "-".join(str(v) for v in o))
@pytest.mark.parametrize("layout", ["first-layer", "wide", "eight-groups-wide"])
def test_warp_rows_low_precision_within_reference_error(monkeypatch, layout, options, dtype):
    monkeypatch.setenv("DEFINE_OPS_CUDA_WARP_ROWS", "1")
    check_step_low_precision(WARP_LAYOUTS[layout], options, dtype)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_warp_rows_presets_float64_match_reference(monkeypatch, preset):
    monkeypatch.setenv("DEFINE_OPS_CUDA_WARP_ROWS", "1")
    check_preset_float64(preset)


def test_warp_rows_backward_is_bitwise_deterministic(monkeypatch):
    monkeypatch.setenv("DEFINE_OPS_CUDA_WARP_ROWS", "1")
    tensors, params = make_step_inputs(WARP_LAYOUTS["eight-groups-wide"], OPTIONS[4], 20000, torch.bfloat16, DEVICE)
    first = run_step("cuda", tensors, params)
    again = run_step("cuda", tensors, params)
    assert torch.equal(first[0], again[0])
    for name in first[1]:
        assert torch.equal(first[1][name], again[1][name]), name
