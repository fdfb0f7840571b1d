"""Every fast backend's ops against the pure-PyTorch reference: outputs and every gradient."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

import define_ops
from define_ops import reference

from .conftest import HAS_CPU_KERNELS, assert_within_reference_error, max_err

# (backend, device) pairs that can run here; the reference is what they are compared with.
FAST = [(b, "cpu") for b in ("cpu", "triton") if b in define_ops.available_backends("cpu")]
if torch.cuda.is_available():
    FAST += [(b, "cuda") for b in ("cuda", "triton") if b in define_ops.available_backends("cuda")]
FAST_IDS = [f"{b}-{d}" for b, d in FAST]

# Layouts: (n = e width, a = input width, groups, b = output width, e_in_chunks, e_out_chunks)
LAYOUTS = {
    "first-layer": (16, 16, 4, 32, 1, 2),  # x = e, output mix(e, h, 2)
    "mix-middle": (16, 48, 2, 40, 2, 1),  # x = mix(e, h, 2), output [e ‖ h]
    "dense-last": (16, 56, 1, 64, 1, 1),
    "no-skip": (16, 32, 4, 24, 0, 0),
    "concat-grouped": (16, 64, 4, 32, 1, 1),  # e sits in group 0 only
    "eight-groups": (8, 64, 8, 24, 8, 4),
}
# Layouts for the CUDA backend's warp-per-row epilogue kernels (DEFINE_OPS_CUDA_WARP_ROWS=1): rows of up
# to 1024 features, no shuffle, at most 8 norm groups, 4-aligned quads inside one group; and layouts
# where the block-per-row kernels stay.
WARP_LAYOUTS = {
    **{name: LAYOUTS[name] for name in ("first-layer", "mix-middle", "dense-last", "concat-grouped")},
    "wide": (16, 64, 1, 1024, 1, 1),  # every lane holds 8 quads of the row
    "eight-groups-wide": (32, 256, 8, 512, 8, 4),  # group width 64: each lane's quads span groups
    "narrow-groups": (16, 48, 8, 32, 4, 4),  # group width 4: one quad per group, 8 warp sums per pass
    "narrow-e-chunks": (8, 32, 4, 32, 4, 1),  # e in chunks of 2: copied and its gradient prefilled 1 at a time
}
WARP_FALLBACK_LAYOUTS = {
    "no-skip": LAYOUTS["no-skip"],  # group width 6: a quad straddles two groups
    "eight-groups": LAYOUTS["eight-groups"],  # group width 3
    "too-wide": (16, 64, 1, 1028, 1, 1),  # more than 1024 features
    "sixteen-groups": (16, 80, 16, 64, 1, 1),  # more than 8 norm groups (group width 4)
}
# (shuffle, norm, activation, dropout, bias): every value of every option appears.
OPTIONS = [
    (False, False, None, 0.0, False),
    (False, True, "gelu", 0.0, True),
    (True, True, "gelu", 0.25, True),
    (True, False, "relu", 0.0, True),
    (False, True, "swish", 0.5, False),
    (True, True, None, 0.1, True),
    (False, False, "gelu", 0.3, True),
]
TOKENS = [0, 1, 37]


def make_step_inputs(layout, options, tokens, dtype, device="cpu", seed=987654321):
    """Inputs of one step: ``layout`` names a LAYOUTS entry or is an (n, a, g, b, e_in, e_out) tuple."""
    n, a, g, b, e_in, e_out = LAYOUTS[layout] if isinstance(layout, str) else layout
    shuffle, norm, activation, dropout, bias = options
    gen = torch.Generator().manual_seed(zlib.crc32(repr((layout, options, tokens)).encode()))

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    tensors = dict(
        x=rand(tokens, a),
        weight=rand(g, a // g, b // g, scale=(a // g) ** -0.5),
        bias=rand(b, scale=0.1) if bias else None,
        norm_weight=(1 + rand(b // g, scale=0.1)) if norm else None,
        norm_bias=rand(b // g, scale=0.1) if norm else None,
    )
    params = dict(
        seed=torch.tensor(seed, dtype=torch.int64, device=device) if dropout else None,
        e_width=n, e_in_chunks=e_in, e_out_chunks=e_out, shuffle=shuffle, activation=activation, dropout_p=dropout,
    )  # fmt: skip
    return tensors, params


def run_step(backend, tensors, params, grad_seed=0):
    """Forward + backward with a shared upstream gradient; returns (out, {name: grad})."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in tensors.items() if v is not None}
    args = {k: leaves.get(k) for k in tensors}
    out = define_ops.hgt_step(**args, **params, backend=backend)
    gen = torch.Generator().manual_seed(grad_seed)
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    out.backward(grad)
    return out.detach(), {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(str(v) for v in o))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("backend,device", FAST, ids=FAST_IDS)
def test_hgt_step_float64_matches_reference(backend, device, layout, options, tokens):
    tensors, params = make_step_inputs(layout, options, tokens, torch.float64, device)
    out_ref, grads_ref = run_step("reference", tensors, params)
    out, grads = run_step(backend, tensors, params)
    assert out.shape == out_ref.shape
    assert max_err(out, out_ref) <= 1e-10
    for name, g_ref in grads_ref.items():
        assert grads[name] is not None, name
        assert max_err(grads[name], g_ref) <= 1e-10, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", OPTIONS[1:4], ids=lambda o: "-".join(str(v) for v in o))
@pytest.mark.parametrize("layout", ["first-layer", "mix-middle", "eight-groups"])
@pytest.mark.parametrize("backend,device", FAST, ids=FAST_IDS)
def test_hgt_step_low_precision_within_reference_error(backend, device, layout, options, dtype):
    tensors, params = make_step_inputs(layout, options, 53, torch.float64, device)
    low = {k: v.to(dtype) if v is not None else None for k, v in tensors.items()}
    out_hi, grads_hi = run_step("reference", tensors, params)
    out_ref, grads_ref = run_step("reference", low, params)
    out, grads = run_step(backend, low, params)
    floor = {torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    assert_within_reference_error(out, out_ref, out_hi, floor=floor, what="out")
    for name in grads_hi:
        assert_within_reference_error(grads[name], grads_ref[name], grads_hi[name], floor=floor, what=name)


def with_nan_inputs(tensors):
    """A whole row of x NaN (what a bad id's lookup gives on the GPU backends) and one element."""
    x = tensors["x"].clone()
    x[1] = math.nan
    x[3, 0] = math.nan
    return {**tensors, "x": x}


def assert_same_with_nan(ours, theirs, what=""):
    """NaN exactly where ``theirs`` has NaN, the other values within 1e-10."""
    assert torch.equal(ours.isnan(), theirs.isnan()), f"{what}: NaN at other places"
    assert max_err(ours.nan_to_num(0.0), theirs.nan_to_num(0.0)) <= 1e-10, what


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(str(v) for v in o))
@pytest.mark.parametrize("layout", ["first-layer", "no-skip", "eight-groups"])
@pytest.mark.parametrize("backend,device", FAST, ids=FAST_IDS)
def test_hgt_step_propagates_nan_as_the_reference_does(backend, device, layout, options):
    # As F.relu and F.dropout do: ReLU keeps a NaN, a dropped NaN is NaN · 0 = NaN. (Selecting 0
    # instead once let a bad id's NaN row, with validate_ids=False, come out as a finite row.)
    tensors, params = make_step_inputs(layout, options, 5, torch.float64, device)
    tensors = with_nan_inputs(tensors)
    out_ref, grads_ref = run_step("reference", tensors, params)
    out, grads = run_step(backend, tensors, params)
    assert out_ref.isnan().any() and not out_ref.isnan().all()
    assert_same_with_nan(out, out_ref, "out")
    for name, grad_ref in grads_ref.items():
        assert_same_with_nan(grads[name], grad_ref, name)


@pytest.mark.parametrize("options", [OPTIONS[2], OPTIONS[4]], ids=["shuffle-norm-gelu-drop", "norm-swish-drop"])
@pytest.mark.parametrize("backend,device", FAST, ids=FAST_IDS)
def test_hgt_step_gradcheck(backend, device, options):
    tensors, params = make_step_inputs("mix-middle", options, 5, torch.float64, device)
    names = [k for k, v in tensors.items() if v is not None]

    def fn(*leaves):
        return define_ops.hgt_step(**dict(zip(names, leaves, strict=True)), **params, backend=backend)

    leaves = [tensors[k].clone().requires_grad_(True) for k in names]
    # The Triton interpreter costs ~0.1 s a call: there, check random directions (fast mode)
    # instead of every Jacobian column (~2,800 calls, ~7 minutes).
    fast = backend == "triton" and device == "cpu"
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, fast_mode=fast)


@pytest.mark.parametrize("backend,device", FAST, ids=FAST_IDS)
@pytest.mark.parametrize("padding_idx", [None, 3])
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
def test_embedding_lookup_matches_reference(backend, device, padding_idx, ids_dtype):
    weight = torch.randn(20, 12, dtype=torch.float64, device=device)
    ids = torch.tensor([[3, 0, 19], [3, 7, 3]], dtype=ids_dtype, device=device)
    results = []
    for name in ("reference", backend):
        w = weight.clone().requires_grad_(True)
        e = define_ops.embedding_lookup(w, ids, padding_idx, 2.5, backend=name)
        e.backward(torch.arange(e.numel(), dtype=e.dtype, device=device).reshape(e.shape))
        results.append((e.detach(), w.grad))
    (e_ref, g_ref), (e, g) = results
    assert e.shape == (2, 3, 12)
    assert max_err(e, e_ref) == 0.0
    assert max_err(g, g_ref) <= 1e-12
    if padding_idx is not None:
        assert (e[ids == padding_idx] == 0).all() and (g[padding_idx] == 0).all()


# ----------------------------------------------------------------------------- opcheck (C++ ops)
def _opcheck_samples():
    samples = []
    for layout, options, tokens in [
        ("first-layer", OPTIONS[2], 9),
        ("mix-middle", OPTIONS[4], 6),
        ("no-skip", OPTIONS[0], 4),
        ("concat-grouped", OPTIONS[3], 0),
        ("eight-groups", OPTIONS[5], 1),
    ]:
        samples.append(make_step_inputs(layout, options, tokens, torch.float32))
    return samples


def _op_args(tensors, params):
    return (
        tensors["x"], tensors["weight"], tensors["bias"], tensors["norm_weight"], tensors["norm_bias"],
        params["seed"], params["e_width"], params["e_in_chunks"], params["e_out_chunks"], params["shuffle"],
        params["activation"] or "none", float(params["dropout_p"]), 1e-5,
    )  # fmt: skip


@pytest.mark.skipif(not HAS_CPU_KERNELS, reason="compiled CPU kernels not loaded")
@pytest.mark.parametrize("sample", range(5))
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_hgt_step(sample, requires_grad):
    tensors, params = _opcheck_samples()[sample]
    if requires_grad:
        tensors = {k: v.requires_grad_(True) if v is not None else None for k, v in tensors.items()}
    torch.library.opcheck(torch.ops.define_ops.hgt_step.default, _op_args(tensors, params))


@pytest.mark.skipif(not HAS_CPU_KERNELS, reason="compiled CPU kernels not loaded")
@pytest.mark.parametrize("sample", range(5))
def test_opcheck_hgt_step_backward(sample):
    tensors, params = _opcheck_samples()[sample]
    args = _op_args(tensors, params)
    out, saved, mean, rstd = torch.ops.define_ops.hgt_step(*args)
    grad = torch.randn_like(out)
    backward_args = (grad, *args[:6], saved, mean, rstd, *args[6:])
    torch.library.opcheck(torch.ops.define_ops.hgt_step_backward.default, backward_args)


@pytest.mark.skipif(not HAS_CPU_KERNELS, reason="compiled CPU kernels not loaded")
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_opcheck_embedding(padding_idx):
    weight = torch.randn(10, 8, requires_grad=True)
    ids = torch.tensor([1, 2, 9, 2, 0])
    torch.library.opcheck(torch.ops.define_ops.embedding_lookup.default, (weight, ids, padding_idx, 1.5))
    grad = torch.randn(5, 8)
    torch.library.opcheck(torch.ops.define_ops.embedding_lookup_backward.default, (grad, ids, 10, padding_idx, 1.5))


# ----------------------------------------------------------------------------- bad arguments
@pytest.mark.skipif(not HAS_CPU_KERNELS, reason="compiled CPU kernels not loaded")
@pytest.mark.parametrize(
    "change,message",
    [
        (dict(weight=torch.randn(3, 5, 8)), "does not match x width"),
        (dict(bias=torch.randn(7)), "bias must have shape"),
        (dict(norm_weight=torch.ones(8), norm_bias=None), "given together"),
        (dict(x=torch.randn(4, 16, dtype=torch.float64)), "dtype"),
        (dict(activation="tanh"), "unknown activation"),
        (dict(dropout_p=1.0), "dropout_p"),
        (dict(dropout_p=0.5, seed=None), "seed"),
        (dict(e_out_chunks=3), "divisible by e_out_chunks"),
    ],
)
def test_bad_step_arguments_raise(change, message):
    args = dict(
        x=torch.randn(4, 16), weight=torch.randn(4, 4, 8), bias=torch.randn(32), norm_weight=None, norm_bias=None,
        seed=torch.tensor(1), e_width=16, e_in_chunks=1, e_out_chunks=2, shuffle=False, activation="gelu",
        dropout_p=0.0,
    )  # fmt: skip
    args.update(change)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=message):
        define_ops.hgt_step(**args, backend="cpu")


@pytest.mark.skipif(not HAS_CPU_KERNELS, reason="compiled CPU kernels not loaded")
def test_lookup_op_rejects_out_of_range_ids_by_value():
    weight = torch.randn(10, 4)
    with pytest.raises(IndexError, match="token id 10 at flat position 2"):
        torch.ops.define_ops.embedding_lookup(weight, torch.tensor([0, 9, 10]), None, 1.0)
    with pytest.raises(IndexError, match="token id -1"):
        torch.ops.define_ops.embedding_lookup(weight, torch.tensor([-1]), None, 1.0)
    with pytest.raises(TypeError, match="int64 or int32"):
        torch.ops.define_ops.embedding_lookup(weight, torch.tensor([0.0]), None, 1.0)


def test_functional_pieces_match_reference():
    y = torch.randn(5, 12)
    assert torch.equal(define_ops.feature_shuffle(y, 3), reference.feature_shuffle_ref(y, 3))
    e, h = torch.randn(5, 4), torch.randn(5, 8)
    assert torch.equal(define_ops.split_mix(e, h, 2), reference.split_mix_ref(e, h, 2))
    x, w = torch.randn(5, 8, dtype=torch.float64), torch.randn(2, 4, 3, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    for backend in ["reference", *[b for b, d in FAST if d == "cpu"]]:
        ours = define_ops.grouped_linear(x, w, b, backend=backend)
        assert max_err(ours, reference.grouped_linear_ref(x, w, b)) < 1e-12
