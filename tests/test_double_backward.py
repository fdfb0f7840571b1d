"""Second derivatives through every backend: Hessian-vector products, gradient penalties,
``torch.autograd.functional``, forward-mode AD.

The kernels' backward has no derivative of its own. A backward that must be differentiable
(``create_graph=True``) recomputes its forward through the reference ops and lets autograd
differentiate that (define_ops/_autograd.py); forward-mode AD runs the layer on the reference
backend. Before, the fused backends returned first-order gradients detached from the parameters:
``torch.autograd.functional.hvp`` gave a silent 0 where the reference gave 5e4.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from torch.func import functional_call

import define_ops
from define_ops import DeFINE

from .conftest import HAS_CUDA
from .test_ops import OPTIONS, make_step_inputs

BACKENDS = [(b, "cpu") for b in ("cpu", "triton") if b in define_ops.available_backends("cpu")]
if HAS_CUDA:
    BACKENDS += [(b, "cuda") for b in ("cuda", "triton") if b in define_ops.available_backends("cuda")]
IDS = [f"{b}-{d}" for b, d in BACKENDS]

LAYERS = {
    "dropout-padding": dict(dropout=0.2, padding_idx=0),
    "norm-off-relu-shuffle": dict(norm=None, activation="relu", shuffle=True, dropout=0.1),
    "adaptive-map": dict(map="adaptive", cutoffs=[10, 30], dropout=0.1, padding_idx=3),
    "no-skip-into-reduce": dict(skip_into_reduce=False, max_groups=2, depth=4, padding_idx=-1),
}


def make_layer(backend, device, dtype=torch.float64, **options):
    torch.manual_seed(11)
    kwargs = dict(input_dim=16, max_dim=64, depth=3, backend=backend, device=device, dtype=dtype)
    return DeFINE(50, 24, **{**kwargs, **options})


def ids_on(device):
    return torch.tensor([[4, 0, 17, 4, 49], [3, 22, 3, 11, 40]], device=device)  # repeats, padding ids 0 and 3


def penalty_grads(layer, ids, dedup=False):
    """First-order gradients (create_graph) of a cubic loss and the gradients of their squared
    norm — a gradient penalty: the second derivatives contracted with the first."""
    params = list(layer.parameters())
    torch.manual_seed(5)  # the dropout seeds
    out = layer(ids, dedup=dedup)
    grads = torch.autograd.grad(out.pow(3).sum(), params, create_graph=True)
    second = torch.autograd.grad(sum(g.square().sum() for g in grads), params, allow_unused=True)
    second = [torch.zeros_like(p) if s is None else s for s, p in zip(second, params, strict=True)]
    return [g.detach() for g in grads], second


def assert_close(ours, ref, what):
    for name, a, b in zip(what, ours, ref, strict=True):
        scale = max(1.0, b.abs().max().item())
        assert (a - b).abs().max().item() <= 1e-10 * scale, name


@pytest.mark.parametrize("dedup", [False, True])
@pytest.mark.parametrize("case", list(LAYERS))
@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
def test_gradient_penalty_matches_the_reference(backend, device, case, dedup):
    ids = ids_on(device)
    names = [name for name, _ in make_layer("reference", device, **LAYERS[case]).named_parameters()]
    grads_ref, second_ref = penalty_grads(make_layer("reference", device, **LAYERS[case]), ids, dedup)
    grads, second = penalty_grads(make_layer(backend, device, **LAYERS[case]), ids, dedup)
    assert_close(grads, grads_ref, names)
    assert any(s.abs().max() > 0 for s in second_ref)
    assert_close(second, second_ref, names)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
def test_hessian_vector_product_and_forward_mode_match_the_reference(backend, device):
    ids = ids_on(device)
    results = {}
    for name in ("reference", backend):
        layer = make_layer(name, device, dropout=0.0, padding_idx=0)
        params = dict(layer.named_parameters())

        def loss(reduce_weight, table, layer=layer, params=params):
            swapped = {**params, "reduce.weight": reduce_weight, "weight": table}
            return functional_call(layer, swapped, (ids,)).pow(3).sum()

        primals = (params["reduce.weight"].detach(), params["weight"].detach())
        gen = torch.Generator().manual_seed(3)
        tangents = tuple(torch.randn(p.shape, generator=gen, dtype=p.dtype).to(device) for p in primals)
        _, hvp = torch.autograd.functional.hvp(loss, primals, tangents)
        with forward_ad.dual_level():
            duals = [forward_ad.make_dual(p, t) for p, t in zip(primals, tangents, strict=True)]
            swapped = {**params, "reduce.weight": duals[0], "weight": duals[1]}
            jvp = forward_ad.unpack_dual(functional_call(layer, swapped, (ids,))).tangent
        results[name] = (*hvp, jvp)
    assert results["reference"][0].abs().max() > 0
    assert_close(results[backend], results["reference"], ("hvp reduce.weight", "hvp table", "jvp"))


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
def test_second_derivatives_under_autocast_reach_the_float32_parameters(backend, device):
    # Under autocast the node runs on bfloat16 copies of the parameters; the differentiable backward
    # must start from the parameters themselves (through a differentiable cast), not from the copies.
    autocast_dtype = torch.bfloat16
    results = {}
    for name in ("reference", backend):
        layer = make_layer(name, device, dtype=torch.float32, dropout=0.1)
        with torch.autocast(device_type=device, dtype=autocast_dtype):
            results[name] = penalty_grads(layer, ids_on(device))
    for first, second in (results["reference"], results[backend]):
        assert all(g.dtype == torch.float32 for g in first + second)
    for ours, ref in zip(results[backend][1], results["reference"][1], strict=True):
        # bf16 recomputation on both sides, along slightly different op orders: a loose bound
        assert (ours - ref).abs().max().item() <= 0.05 * max(1.0, ref.abs().max().item())
    assert any(s.abs().max() > 0 for s in results[backend][1])


# (n, a, g, b, e_in_chunks, e_out_chunks) as tests/test_ops.py's LAYOUTS, small enough for the
# numerical second derivatives (every input element and every output element, perturbed in turn)
SMALL_LAYOUTS = {"first-layer": (4, 4, 2, 8, 1, 2), "mix-middle": (4, 12, 2, 8, 2, 1), "no-skip": (4, 8, 4, 4, 0, 0)}


# Every option set and layout on the C++ backend; the others share its autograd code (_autograd.py)
# and differ only in the first-order kernels, tested elsewhere: two cases each (the Triton
# interpreter takes seconds for one gradgradcheck even at these sizes).
STEP_CASES = [("cpu", "cpu", layout, o) for layout in SMALL_LAYOUTS for o in OPTIONS if ("cpu", "cpu") in BACKENDS]
STEP_CASES += [(b, d, "first-layer", o) for b, d in BACKENDS if b != "cpu" for o in (OPTIONS[0], OPTIONS[2])]


@pytest.mark.parametrize(
    "backend,device,layout,options", STEP_CASES,
    ids=[f"{b}-{d}-{layout}-" + "-".join(map(str, o)) for b, d, layout, o in STEP_CASES],
)  # fmt: skip
def test_hgt_step_op_gradgradcheck(backend, device, layout, options):
    tensors, params = make_step_inputs(SMALL_LAYOUTS[layout], options, 2, torch.float64, device)
    names = [k for k, v in tensors.items() if v is not None]
    inputs = tuple(tensors[k].detach().requires_grad_(True) for k in names)

    def step(*values):
        args = {**dict.fromkeys(tensors), **dict(zip(names, values, strict=True))}
        return define_ops.hgt_step(**args, **params, backend=backend)

    assert torch.autograd.gradgradcheck(step, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
def test_lookup_op_gradgradcheck_and_padding(backend, device):
    table = torch.randn(7, 5, dtype=torch.float64, device=device, requires_grad=True)
    ids = torch.tensor([1, 6, 1, 0, 3], device=device)
    lookup = define_ops.ops.embedding_lookup
    assert torch.autograd.gradgradcheck(lambda t: lookup(t, ids, 6, 1.5, backend=backend), (table,))
    # the table gradient of the differentiable backward equals the kernels' for padding and repeats
    e = lookup(table, ids, -1, 1.5, backend=backend)
    grad_out = torch.randn_like(e).requires_grad_(True)  # as in a Hessian-vector product: grad_out has a graph
    (created,) = torch.autograd.grad(e, table, grad_out, create_graph=True)
    (plain,) = torch.autograd.grad(lookup(table, ids, -1, 1.5, backend=backend), table, grad_out)
    assert (created.detach() - plain).abs().max().item() <= 1e-12 * plain.abs().max().item()  # summation order
    (back,) = torch.autograd.grad(created, grad_out, torch.ones_like(created))  # gathers: the padding row's is 0
    assert torch.equal(back, torch.where((ids == 6)[:, None], 0.0, 1.5).expand_as(e).to(back))


@pytest.mark.skipif("cpu" not in define_ops.available_backends("cpu"), reason="compiled CPU kernels not loaded")
def test_stack_op_called_directly_has_a_second_derivative():
    from .test_stack import stack_case

    x, tensors, lists = stack_case("awd_ptb", 4, torch.float64, dropout=True)
    x.requires_grad_(True)
    leaves = [[t.requires_grad_(True) if t is not None and t.is_floating_point() else t for t in column]
              for column in tensors]  # fmt: skip
    out = torch.ops.define_ops.hgt_stack(x, *leaves, *lists, True)[0]
    weight = leaves[0][2]
    (grad_x,) = torch.autograd.grad(out.pow(3).sum(), x, create_graph=True)
    (second,) = torch.autograd.grad(grad_x.square().sum(), weight)
    # the same through the per-step ops
    names = ("e_width", "e_in_chunks", "e_out_chunks", "shuffle", "activation", "dropout_p", "norm_eps")
    step_out = x
    for index in range(len(leaves[0])):
        step_args = {name: column[index] for name, column in zip(names, lists, strict=True)}
        step_out = define_ops.ops.hgt_step(step_out, *(col[index] for col in leaves), **step_args, backend="cpu")
    (grad_x_steps,) = torch.autograd.grad(step_out.pow(3).sum(), x, create_graph=True)
    (second_steps,) = torch.autograd.grad(grad_x_steps.square().sum(), weight)
    assert second.abs().max() > 0
    assert (second - second_steps).abs().max().item() <= 1e-10 * max(1.0, second_steps.abs().max().item())


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
def test_forward_mode_keeps_the_id_check(backend, device):
    layer = make_layer(backend, device)
    with forward_ad.dual_level(), pytest.raises(define_ops.TokenIdError, match="token id 50 "):
        layer(torch.tensor([1, 50], device=device))
