"""The one-autograd-node stack (define_ops/stack.py) that DeFINE runs in eager mode: the same
numbers as the step-by-step ops (whose autograd torch.compile traces), gradcheck, frozen
parameters, autocast and its errors."""

from __future__ import annotations

import pytest
import torch

import define_ops
from define_ops import DeFINE, DeFINEConfig
from define_ops.ops import split_stack_grads
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


def _with_tensors(steps, flat):
    """``steps`` with their (weight, bias, γ, β) taken in order from ``flat`` where present (gradcheck's inputs)."""
    it = iter(flat)
    return [tuple(next(it) if t is not None else None for t in step[:4]) + step[4:] for step in steps]


@needs_cpu_kernels
def test_stack_gradcheck():
    steps = _small_steps()
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    tensors = [t for step in steps for t in step[:4] if t is not None]

    def run(x, *flat):
        return hgt_stack(x, _with_tensors(steps, flat), backend="cpu")

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


def graph_node_names(output: torch.Tensor) -> list[str]:
    """Every node of ``output``'s autograd graph, by type name."""
    seen, names, stack = set(), [], [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def _inside_define_ops(event) -> bool:
    """Whether a profiler event ran inside one of our ops (the CPU kernels convert γ/β themselves)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("define_ops::"):
            return True
        parent = parent.cpu_parent
    return False


@needs_cpu_kernels
@pytest.mark.parametrize("stack_op", ["1", "0"], ids=["stack-op", "step-loop"])
def test_autocast_casts_the_parameters_in_one_copy(monkeypatch, stack_op):
    """Under autocast the node casts every parameter in one copy and every gradient back in one: no
    cast node per parameter in the graph, no per-parameter cast op, and the outputs and gradients
    of casting each parameter by hand."""
    monkeypatch.setenv("DEFINE_OPS_STACK_OP", stack_op)
    steps = _small_steps(torch.float32)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    grad = torch.randn(5, 6, generator=torch.Generator().manual_seed(4), dtype=torch.bfloat16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = hgt_stack(x, steps, backend="cpu")
        out.backward(grad)
    assert out.dtype == torch.bfloat16
    assert "ToCopyBackward0" not in graph_node_names(out)
    casts = [e for e in prof.events() if e.name == "aten::_to_copy" and not _inside_define_ops(e)]
    assert len(casts) == 3, [e.input_shapes for e in casts]  # x, the parameters, the gradients

    def cast(t):
        floating = isinstance(t, torch.Tensor) and t.is_floating_point()
        return t.detach().to(torch.bfloat16).requires_grad_(True) if floating else t

    by_hand = [tuple(cast(t) for t in step) for step in steps]
    expected = hgt_stack(x.to(torch.bfloat16), by_hand, backend="cpu")
    expected.backward(grad)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for step, reference in zip(steps, by_hand, strict=True):
        for ours, theirs in zip(step[:4], reference[:4], strict=True):
            if ours is not None and ours.is_leaf:  # (γ = 1 + a leaf is not)
                assert ours.grad.dtype == torch.float32
                torch.testing.assert_close(ours.grad, theirs.grad.float(), rtol=1e-2, atol=1e-2)


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


# ----------------------------------------------------------------------------- the C++ stack ops
def stack_case(preset: str, tokens: int, dtype: torch.dtype, device="cpu", dropout: bool = True):
    """(x, tensor lists, per-step argument lists) of a small DeFINE layer's whole stack, as
    ``define_ops::hgt_stack`` takes them (seeds on ``device``: the CPU reads them on the host)."""
    config = DeFINEConfig.from_preset(preset, num_embeddings=50, input_dim=16, max_dim=64, embedding_dim=24)
    return stack_case_of(config, tokens, dtype, device, dropout, seed=tokens)


def stack_case_of(config: DeFINEConfig, tokens: int, dtype: torch.dtype, device="cpu", dropout: bool = True,
                  seed: int = 0):  # fmt: skip
    """stack_case for any configuration, its parameters and inputs drawn after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    module = DeFINE.from_config(config, backend="reference", dtype=dtype)
    specs = module._build_step_specs(dropout)
    params = module._layer_params() + [(module.reduce.weight.t().unsqueeze(0), module.reduce.bias, None, None)]
    seeds = torch.randint(0, 2**62, (len(specs),))
    tensors = [[p[k].detach().to(device) if p[k] is not None else None for p in params] for k in range(4)]
    tensors.append([seeds[i].to(device) if spec.dropout_p > 0 else None for i, spec in enumerate(specs)])
    lists = [list(column) for column in zip(*(spec.args() for spec in specs), strict=True)]
    x = torch.randn(tokens, config.input_dim, dtype=dtype, device=device)
    return x, tensors, lists


def _same(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Equal up to the last bit of a GEMM sum: the stack's intermediates are views into one buffer,
    the step ops' fresh allocations, and a BLAS may pick a pointer-alignment-dependent path."""
    if ours.shape != theirs.shape or ours.dtype != theirs.dtype:
        return False
    if torch.equal(ours, theirs) or not ours.numel():
        return True
    rel = {torch.float64: 1e-12, torch.float32: 1e-5}.get(ours.dtype, 1e-2)
    scale = max(1.0, theirs.abs().max().item())
    return (ours.double() - theirs.double()).abs().max().item() <= rel * scale


def assert_stack_matches_steps(ops, x, tensors, lists):
    """ops.hgt_stack / hgt_stack_backward against ops.hgt_step / hgt_step_backward called step by
    step: the same step bodies in the same order (equal but for a GEMM's last bit, see _same)."""
    out, values, stats = ops.hgt_stack(x, *tensors, *lists, True)
    steps = len(tensors[0])
    inputs, step_results = [x], []
    for i in range(steps):
        step_results.append(ops.hgt_step(inputs[-1], *(t[i] for t in tensors), *(a[i] for a in lists)))
        inputs.append(step_results[-1][0])
    assert _same(out, inputs[-1])
    # what the backward reads, in the buffers' order (csrc/common/hgt_stack.h): every output but the
    # last and the pre-norm values, step by step, in `values`; the statistics in `stats`
    kept_values = [
        t for i, r in enumerate(step_results) for t in ([r[0]] if i + 1 < steps else []) + [r[1]] if t.dim() == 2
    ]
    kept_stats = [t for r in step_results for t in r[2:] if t.dim() == 2]
    for buffer, kept in ((values, kept_values), (stats, kept_stats)):
        expected = torch.cat([t.reshape(-1) for t in kept]) if kept else buffer[:0]
        assert _same(buffer, expected)
    inference = ops.hgt_stack(x, *tensors, *lists, False)
    assert torch.equal(inference[0], out) and inference[1].numel() == inference[2].numel() == 0

    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(out)
    grad_x, flat = ops.hgt_stack_backward(grad, x, values, stats, *tensors, *lists)
    param_grads = split_stack_grads(flat, *tensors[:3])
    g = grad
    for i in reversed(range(steps)):
        expected = ops.hgt_step_backward(g, inputs[i], *(t[i] for t in tensors), *step_results[i][1:],
                                         *(a[i] for a in lists))  # fmt: skip
        for k, name in enumerate(("grad_weight", "grad_bias", "grad_gamma", "grad_beta")):
            ours, theirs = param_grads[k][i], expected[k + 1]
            if ours is None:
                assert tensors[k][i] is None and theirs.numel() == 0, f"step {i} {name}"
                continue
            assert ours.shape == theirs.shape and ours.stride() == theirs.stride(), f"step {i} {name}"
            assert _same(ours, theirs), f"step {i} {name}"
        g = expected[0]
    assert _same(grad_x, g)


@needs_cpu_kernels
@pytest.mark.parametrize("tokens", [0, 1, 37])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset", ["awd_ptb", "lstm_wt103", "paper_literal"])
def test_stack_ops_equal_the_step_ops(preset, dtype, tokens):
    x, tensors, lists = stack_case(preset, tokens, dtype)
    assert_stack_matches_steps(torch.ops.define_ops, x, tensors, lists)


@needs_cpu_kernels
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("tokens", [0, 5])
def test_opcheck_stack_ops(tokens, requires_grad):
    x, tensors, lists = stack_case("awd_ptb", tokens, torch.float32)
    if requires_grad:
        x.requires_grad_(True)
        for column in tensors[:4]:
            for t in column:
                if t is not None:
                    t.requires_grad_(True)
    for keep in (True, False):
        torch.library.opcheck(torch.ops.define_ops.hgt_stack.default, (x, *tensors, *lists, keep))
    with torch.no_grad():
        out, values, stats = torch.ops.define_ops.hgt_stack(x, *tensors, *lists, True)
    grad = torch.randn_like(out)
    detached = [[t.detach() if t is not None else None for t in column] for column in tensors]
    args = (grad, x.detach(), values, stats, *detached, *lists)
    torch.library.opcheck(torch.ops.define_ops.hgt_stack_backward.default, args)
    if requires_grad:  # a clear error instead of a double backward that does not exist
        with pytest.raises(NotImplementedError, match="not differentiable"):
            torch.ops.define_ops.hgt_stack_backward(grad, x, values, stats, *tensors, *lists)


@needs_cpu_kernels
def test_stack_ops_reject_mismatched_steps():
    x, tensors, lists = stack_case("awd_ptb", 3, torch.float32)
    short = [column[:-1] if k == 1 else column for k, column in enumerate(tensors)]
    with pytest.raises(ValueError, match="every per-step list must have 8 entries"):
        torch.ops.define_ops.hgt_stack(x, *short, *lists, True)
    swapped = [list(column) for column in tensors]
    for column in swapped:
        column[1], column[2] = column[2], column[1]
    swapped_lists = [list(column) for column in lists]
    for column in swapped_lists:
        column[1], column[2] = column[2], column[1]
    with pytest.raises(ValueError, match="step 1 reads .* features .* but its input has"):
        torch.ops.define_ops.hgt_stack(x, *swapped, *swapped_lists, True)
    with pytest.raises(ValueError, match="x must be 2-D"):
        torch.ops.define_ops.hgt_stack(x[0], *tensors, *lists, True)
    out, values, stats = torch.ops.define_ops.hgt_stack(x, *tensors, *lists, True)
    with pytest.raises(ValueError, match="values and stats must be what hgt_stack"):
        torch.ops.define_ops.hgt_stack_backward(out, x, values[1:], stats, *tensors, *lists)
    with pytest.raises(ValueError, match="values and stats must be what hgt_stack"):  # the inference call's
        torch.ops.define_ops.hgt_stack_backward(out, x, values[:0], stats[:0], *tensors, *lists)
    with pytest.raises(ValueError, match="grad_out must be"):
        torch.ops.define_ops.hgt_stack_backward(out[:, :3], x, values, stats, *tensors, *lists)


@needs_cpu_kernels
def test_stack_parameter_gradients_are_views_of_one_buffer_with_the_weight_layout():
    """The backward returns every parameter gradient in one allocation; the Reduce layer's
    transposed weight view gets a gradient with the same strides (what AccumulateGrad expects)."""
    x, tensors, lists = stack_case("awd_ptb", 6, torch.float32)
    out, values, stats = torch.ops.define_ops.hgt_stack(x, *tensors, *lists, True)
    _, flat = torch.ops.define_ops.hgt_stack_backward(torch.ones_like(out), x, values, stats, *tensors, *lists)
    weights, biases, gammas, betas = split_stack_grads(flat, *tensors[:3])
    present = [g for column in (weights, biases, gammas, betas) for g in column if g is not None]
    assert all(g.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for g in present)
    assert weights[-1].stride() == tensors[0][-1].stride() and not weights[-1].is_contiguous()
    assert gammas[-1] is None and biases[-1] is not None  # the Reduce layer: a bias, no norm


@needs_cpu_kernels
@pytest.mark.parametrize("keep", [True, False])
def test_stack_op_gradcheck_through_its_own_autograd(keep):
    """The raw op called with autograd (not DeFINE's path): keep_for_backward=False is a memory
    hint that a caller needing the gradient does not lose it by."""
    steps = _small_steps()
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    lists = [list(column) for column in zip(*(spec.args() for *_, spec in steps), strict=True)]
    present = [step[k] for k in range(4) for step in steps if step[k] is not None]  # column by column

    def run(x, *flat):
        it = iter(flat)
        columns = [[next(it) if step[k] is not None else None for step in steps] for k in range(4)]
        seeds = [step[4] if step[5].dropout_p > 0 else None for step in steps]
        out, values, stats = torch.ops.define_ops.hgt_stack(x, *columns, seeds, *lists, keep)
        assert not values.requires_grad and not stats.requires_grad
        return out

    assert torch.autograd.gradcheck(run, (x, *present), eps=1e-6, atol=1e-7)


@needs_cpu_kernels
@pytest.mark.parametrize("preset", ["awd_ptb", "lstm_wt103"])
def test_eager_step_loop_switch_agrees_with_the_stack_op(preset, monkeypatch):
    """DEFINE_OPS_STACK_OP=0 (the per-step loop, kept to measure one path against the other)."""
    config = DeFINEConfig.from_preset(preset, num_embeddings=200, input_dim=16, max_dim=64, embedding_dim=24)
    module = DeFINE.from_config(config, backend="cpu", dtype=torch.float64).train()
    ids = torch.randint(0, 200, (3, 11))
    out, grads = forward_backward(module, ids)
    monkeypatch.setenv("DEFINE_OPS_STACK_OP", "0")
    out_loop, grads_loop = forward_backward(module, ids)
    torch.testing.assert_close(out, out_loop, rtol=1e-12, atol=1e-12)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_loop[name], rtol=1e-12, atol=1e-12, msg=name)


@needs_cpu_kernels
@pytest.mark.parametrize("frozen_table", [False, True])
def test_folded_lookup_under_autocast_matches_the_separate_lookup(frozen_table, monkeypatch):
    """The table lookup inside the eager node against the lookup as its own registered op (what
    DeFINE runs under torch.compile), under bf16 autocast: e is cast to bf16 in the node and its
    gradient back to the table's float32; a frozen table gets no gradient and costs no table backward."""
    config = DeFINEConfig.from_preset("awd_ptb", num_embeddings=200, input_dim=16, max_dim=64, embedding_dim=24,
                                      padding_idx=3)  # fmt: skip
    module = DeFINE.from_config(config, backend="cpu").train()
    module.weight.requires_grad_(not frozen_table)
    ids = torch.tensor([[3, 5, 7, 5], [199, 0, 3, 11]])
    results = []
    for compiling in (False, True):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda compiling=compiling: compiling)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, grads = forward_backward(module, ids)
        results.append((out, grads))
    (out, grads), (out_separate, grads_separate) = results
    assert out.dtype == torch.bfloat16 and torch.equal(out, out_separate)
    assert (grads["weight"] is None) is frozen_table
    for name, grad in grads.items():
        if grad is None:
            continue
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, grads_separate[name], rtol=1e-6, atol=1e-6, msg=name)
    if not frozen_table:
        assert grads["weight"][3].abs().max() == 0  # padding row


@pytest.mark.skipif("triton" not in FAST, reason="Triton backend not available")
def test_eager_triton_node_launches_without_wrap_triton_dispatch(monkeypatch):
    """The eager node calls the Triton ops' implementations directly: every launch must then run
    with wrap_triton's higher-order-op dispatch off, as inside a registered triton_op (on a GPU that
    dispatch costs on the order of a millisecond a launch)."""
    import importlib

    from torch._library.triton import is_wrap_triton_enabled

    seen = []
    for name in ("define_ops.triton.hgt_step", "define_ops.triton.embedding"):
        module = importlib.import_module(name)
        original = module.launch

        def recording(*args, _original=original, **kwargs):
            seen.append(is_wrap_triton_enabled())
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, "launch", recording)
    config = DeFINEConfig.from_preset("awd_ptb", num_embeddings=50, input_dim=16, max_dim=64, embedding_dim=24)
    module = DeFINE.from_config(config, backend="triton").train()
    module(torch.randint(0, 50, (6,))).sum().backward()
    assert seen and not any(seen)
    assert is_wrap_triton_enabled()  # restored afterwards


@pytest.mark.parametrize("stack_op", [True, False])
@pytest.mark.parametrize("trainable", ["table", "hgt", "reduce"])
@pytest.mark.parametrize("backend", FAST)
def test_each_trainable_subset_gets_exactly_its_gradients(backend, trainable, stack_op, monkeypatch):
    # The node used to ask needs_input_grad about the first weight instead of the table: a trainable
    # table under a frozen transformation silently got no gradient.
    monkeypatch.setenv("DEFINE_OPS_STACK_OP", "1" if stack_op else "0")
    module = DeFINE(100, 16, input_dim=8, max_dim=32, depth=2, max_groups=2, backend=backend, dtype=torch.float64)
    reference_module = DeFINE(100, 16, input_dim=8, max_dim=32, depth=2, max_groups=2, backend="reference",
                              dtype=torch.float64)  # fmt: skip
    reference_module.load_state_dict(module.state_dict())
    ids = torch.tensor([[1, 2, 3, 2], [99, 0, 2, 5]])
    grads = []
    for m in (module, reference_module):
        for name, p in m.named_parameters():
            group = "table" if name == "weight" else "reduce" if name.startswith("reduce") else "hgt"
            p.requires_grad_(group == trainable)
        m.train()
        torch.manual_seed(0)
        m(ids).pow(2).sum().backward()
        grads.append({name: p.grad for name, p in m.named_parameters()})
    ours, expected = grads
    for name, grad in expected.items():
        assert (ours[name] is None) == (grad is None), name
        if grad is not None:
            assert grad.abs().sum() > 0, name
            torch.testing.assert_close(ours[name], grad, rtol=1e-10, atol=1e-12, msg=name)


@needs_cpu_kernels
@pytest.mark.parametrize("lookup", [False, True])
def test_stack_gradcheck_with_the_expansion(lookup):
    # dedup's gather of the rows folded into the node: its backward sums each row's gradients
    steps = _small_steps()
    tensors = [t for step in steps for t in step[:4] if t is not None]
    expand = torch.tensor([2, 0, 2, 1, 2, 0])
    table = torch.randn(7, 8, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([4, 0, 6])
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)

    def run(first, *flat):
        rebuilt = _with_tensors(steps, flat)
        if lookup:
            return hgt_stack(None, rebuilt, backend="cpu", lookup=(first, ids, 6, 1.5), expand=expand)
        return hgt_stack(first, rebuilt, backend="cpu", expand=expand)

    first = table if lookup else x
    assert torch.autograd.gradcheck(run, (first, *tensors), eps=1e-6, atol=1e-7)
    expected = run(first, *tensors).detach()
    rows = hgt_stack(None if lookup else x, steps, backend="cpu",
                     lookup=(table, ids, 6, 1.5) if lookup else None)  # fmt: skip
    assert torch.equal(expected, rows[expand])
    with torch.no_grad():  # the inference path expands too
        assert torch.equal(run(first, *tensors), expected)
