"""The drop-in DeFINE module: every backend against the reference, compile, and the contract."""

from __future__ import annotations

import itertools
import math
import os
import platform
import re
from pathlib import Path

import pytest
import torch

import define_ops
from define_ops import PRESETS, DeFINE, DeFINEConfig

from .conftest import HAS_CPU_KERNELS, assert_within_reference_error, max_err

FAST = [b for b in ("cpu", "triton") if b in define_ops.available_backends("cpu")]


def paired(config: DeFINEConfig, backend: str, dtype=torch.float64):
    ref = DeFINE.from_config(config, backend="reference", dtype=dtype)
    fast = DeFINE.from_config(config, backend=backend, dtype=dtype)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def forward_backward(module: DeFINE, ids: torch.Tensor, seed: int = 0):
    module.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # same dropout seeds for both modules
    out = module(ids)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64).to(out.dtype)
    out.backward(grad)
    return out.detach(), {name: p.grad for name, p in module.named_parameters()}


def assert_same(ref_result, fast_result, tol: float):
    """Max error at most ``tol`` relative to the largest magnitude (at least 1): without a norm
    the paper-literal stack's gradients reach 1e9, where float64 itself carries 1e-7."""
    (out_ref, grads_ref), (out, grads) = ref_result, fast_result
    assert out.shape == out_ref.shape

    def bound(ref):
        return tol * max(1.0, ref.abs().max().item()) if ref.numel() else tol

    assert max_err(out, out_ref) <= bound(out_ref), "output"
    for name, g_ref in grads_ref.items():
        assert grads[name] is not None, f"no gradient for {name}"
        assert max_err(grads[name], g_ref) <= bound(g_ref), name


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("backend", FAST)
def test_presets_float64_match_reference(preset, backend):
    config = DeFINEConfig.from_preset(preset, num_embeddings=300)
    ref, fast = paired(config, backend)
    ids = torch.randint(0, 300, (3, 11))
    # The Triton interpreter pays per weight element loaded (txl_wt103: ~30 s a pass): there, only the
    # training pass (dropout on); eval (dropout off) is covered op by op in test_ops.py.
    modes = (True,) if backend == "triton" else (False, True)
    for training in modes:
        ref.train(training)
        fast.train(training)
        assert_same(forward_backward(ref, ids), forward_backward(fast, ids), tol=1e-10)


OPTION_GRID = list(
    itertools.product(["halving", "cyclic"], ["paper", "linspace"], ["mix", "concat", "none"], [False, True])
)


@pytest.mark.parametrize("schedule,width_rule,skip,shuffle", OPTION_GRID)
@pytest.mark.parametrize("backend", FAST)
def test_option_grid_float64_matches_reference(backend, schedule, width_rule, skip, shuffle):
    for norm, activation in [("layer", "gelu"), (None, None), (None, "swish"), ("layer", "relu")]:
        config = DeFINEConfig(
            97, 40, input_dim=16, max_dim=96, depth=4, max_groups=8, group_schedule=schedule, width_rule=width_rule,
            skip=skip, skip_into_reduce=skip != "none", shuffle=shuffle, norm=norm, activation=activation,
            dropout=0.2, padding_idx=5,
        )  # fmt: skip
        ref, fast = paired(config, backend)
        ids = torch.randint(0, 97, (29,))
        ids[3] = 5
        ref.train()
        fast.train()
        assert_same(forward_backward(ref, ids), forward_backward(fast, ids), tol=1e-10)


@pytest.mark.parametrize("backend", FAST)
def test_group_width_multiple_float64_matches_reference(backend):
    # nmt_wmt14's widths with every group a multiple of 8 (448 and 736 instead of 432 and 728)
    config = DeFINEConfig.from_preset("nmt_wmt14", num_embeddings=300, group_width_multiple=8)
    assert [p.out_features for p in config.layer_plans()] == [448, 736, 1024, 512]
    ref, fast = paired(config, backend)
    ids = torch.randint(0, 300, (2, 7))
    ref.train()
    fast.train()
    assert_same(forward_backward(ref, ids), forward_backward(fast, ids), tol=1e-10)


@pytest.mark.parametrize("preset", ["awd_ptb", "nmt_wmt14"])
@pytest.mark.parametrize("backend", FAST)
def test_float32_within_reference_error(preset, backend):
    config = DeFINEConfig.from_preset(preset, num_embeddings=500)
    ref64, _ = paired(config, backend)
    ref32 = DeFINE.from_config(config, backend="reference", dtype=torch.float32)
    fast32 = DeFINE.from_config(config, backend=backend, dtype=torch.float32)
    ref32.load_state_dict(ref64.state_dict())
    fast32.load_state_dict(ref64.state_dict())
    ids = torch.randint(0, 500, (4, 33))
    results = [forward_backward(m.train(), ids) for m in (ref64, ref32, fast32)]
    (out64, g64), (out_ref, g_ref), (out, g) = results
    assert_within_reference_error(out, out_ref, out64, floor=1e-6, what="out")
    for name in g64:
        assert_within_reference_error(g[name], g_ref[name], g64[name], floor=1e-6, what=name)


# The CPU kernels' float16/bfloat16 GEMMs: this CPU's rule (csrc/cpu/gemm.cpp), ATen's own, in float32.
@pytest.mark.parametrize("gemm_upcast", ["", "0", "1"], ids=["auto", "native", "float32"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.skipif(not HAS_CPU_KERNELS, reason="needs the compiled CPU kernels")
def test_cpu_half_precision_within_reference_error(dtype, gemm_upcast, monkeypatch):
    monkeypatch.setenv("DEFINE_OPS_CPU_GEMM_UPCAST", gemm_upcast)
    # awd_ptb's structure (7 layers, 8 → 1 groups, norms, dropout) at widths ATen's generic
    # float16 GEMM (the reference's here) takes in milliseconds
    config = DeFINEConfig.from_preset("awd_ptb", num_embeddings=500, input_dim=32, max_dim=128, embedding_dim=48)
    ref64, _ = paired(config, "cpu")
    with torch.no_grad():  # no zero biases (DeFINE's init): each GEMM's bias term must count
        for p in ref64.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype) * 0.1)
    ref_low = DeFINE.from_config(config, backend="reference", dtype=dtype)
    ours = DeFINE.from_config(config, backend="cpu", dtype=dtype)
    ref_low.load_state_dict(ref64.state_dict())
    ours.load_state_dict(ref64.state_dict())
    ids = torch.randint(0, 500, (4, 33))
    results = [forward_backward(m.train(), ids) for m in (ref64, ref_low, ours)]
    (out64, g64), (out_ref, g_ref), (out, g) = results
    floor = {torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    assert_within_reference_error(out, out_ref, out64, floor=floor, what="out")
    for name in g64:
        assert_within_reference_error(g[name], g_ref[name], g64[name], floor=floor, what=name)


@pytest.mark.skipif(not HAS_CPU_KERNELS, reason="needs the compiled CPU kernels")
def test_cpu_half_precision_gemm_rule(monkeypatch):
    in_float32 = torch.ops.define_ops.cpu_gemm_in_float32
    monkeypatch.delenv("DEFINE_OPS_CPU_GEMM_UPCAST", raising=False)
    assert not in_float32(torch.float32) and not in_float32(torch.float64)
    if platform.machine() in ("x86_64", "AMD64") and os.path.exists("/proc/cpuinfo"):
        # the flags the rule reads through torch's cpuinfo, as the kernel reports them
        flags = set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).split())
        fast_fp16 = bool(flags & {"avx512_fp16", "amx_fp16", "avx_ne_convert"})
        avx512_core = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
        fast_bf16 = avx512_core or bool(flags & {"avx_ne_convert", "amx_bf16"})
        assert in_float32(torch.float16) == (not fast_fp16)
        assert in_float32(torch.bfloat16) == (not fast_bf16)
    monkeypatch.setenv("DEFINE_OPS_CPU_GEMM_UPCAST", "1")
    assert in_float32(torch.float16) and in_float32(torch.bfloat16) and not in_float32(torch.float32)
    monkeypatch.setenv("DEFINE_OPS_CPU_GEMM_UPCAST", "0")
    assert not in_float32(torch.float16) and not in_float32(torch.bfloat16)
    monkeypatch.setenv("DEFINE_OPS_CPU_GEMM_UPCAST", "yes")
    with pytest.raises(ValueError, match="DEFINE_OPS_CPU_GEMM_UPCAST must be 0 or 1, got 'yes'"):
        in_float32(torch.float16)


@pytest.mark.parametrize("backend", ["reference", *FAST])  # reference: auto's fallback without the extension
def test_torch_compile_fullgraph(backend):
    config = DeFINEConfig.from_preset("nmt_wmt14", num_embeddings=200, depth=3)
    eager = DeFINE.from_config(config, backend=backend).train()
    compiled = torch.compile(eager, fullgraph=True, dynamic=False)
    ids = torch.randint(0, 200, (6, 7))
    with torch._inductor.config.patch(fx_graph_cache=False):  # always trace the current ops
        out = compiled(ids)
        out.sum().backward()
        assert eager.weight.grad is not None and eager.layers[0].weight.grad is not None
        eager.eval()
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids), eager(ids))
    # What the compiler traced: our ops, not a silent fallback to the reference.
    targets: list[str] = []

    def record(graph_module, example_inputs):
        targets.extend(str(node.target) for node in graph_module.graph.nodes)
        return graph_module

    torch.compile(eager.train(), backend=record, fullgraph=True)(ids)
    assert any("define_ops" in target for target in targets) == (backend != "reference")


@pytest.mark.parametrize("backend", ["reference", *FAST])
def test_padding_idx_gives_zero_vector_and_no_gradient(backend):
    layer = DeFINE(50, 24, input_dim=16, max_dim=64, padding_idx=0, backend=backend, dtype=torch.float64)
    ids = torch.tensor([[0, 3, 0, 7]])
    e = define_ops.embedding_lookup(layer.weight, ids, 0, layer.embedding_scale, backend=backend)
    assert (e[0, 0] == 0).all() and (e[0, 2] == 0).all()
    layer(ids).sum().backward()
    assert (layer.weight.grad[0] == 0).all()
    assert (layer.weight.grad[3] != 0).any()
    assert (layer.weight[0] == 0).all()  # initialised to zero, like nn.Embedding


@pytest.mark.parametrize("backend", ["reference", *FAST])
def test_dropout_reproducible_from_seed_and_different_across_seeds(backend):
    layer = DeFINE(60, 24, input_dim=16, max_dim=64, dropout=0.3, backend=backend).train()
    ids = torch.randint(0, 60, (5, 9))
    torch.manual_seed(3)
    first = layer(ids)
    torch.manual_seed(3)
    again = layer(ids)
    torch.manual_seed(4)
    other = layer(ids)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    layer.eval()
    assert torch.equal(layer(ids), layer(ids))


@pytest.mark.parametrize("backend", FAST)
def test_dropout_masks_are_the_same_on_every_backend(backend):
    config = DeFINEConfig(60, 24, input_dim=16, max_dim=64, dropout=0.5)
    ref, fast = paired(config, backend, dtype=torch.float32)
    ids = torch.randint(0, 60, (40,))
    torch.manual_seed(8)
    out_ref = ref.train()(ids)
    torch.manual_seed(8)
    out_fast = fast.train()(ids)
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-5, atol=1e-5)


def test_parameter_names_and_shapes_are_the_documented_ones():
    layer = DeFINE.from_preset("lstm_wt103", num_embeddings=1000)
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert shapes == {
        "weight": (1000, 256),
        "layers.0.weight": (4, 64, 128),
        "layers.0.bias": (512,),
        "layers.0.norm.weight": (128,),
        "layers.0.norm.bias": (128,),
        "layers.1.weight": (2, 384, 384),
        "layers.1.bias": (768,),
        "layers.1.norm.weight": (384,),
        "layers.1.norm.bias": (384,),
        "layers.2.weight": (1, 1024, 1024),
        "layers.2.bias": (1024,),
        "layers.2.norm.weight": (1024,),
        "layers.2.norm.bias": (1024,),
        "reduce.weight": (256, 1280),
        "reduce.bias": (256,),
    }
    assert sum(p.numel() for p in layer.parameters()) == layer.config.num_parameters()


@pytest.mark.parametrize("backend", ["reference", *FAST])
def test_state_dict_round_trip(backend, tmp_path):
    first = DeFINE(80, 32, input_dim=16, max_dim=64, depth=3, backend=backend).eval()
    torch.save(first.state_dict(), tmp_path / "define.pt")
    second = DeFINE(80, 32, input_dim=16, max_dim=64, depth=3, backend=backend).eval()
    second.load_state_dict(torch.load(tmp_path / "define.pt", weights_only=True))
    ids = torch.randint(0, 80, (4, 4))
    assert torch.equal(first(ids), second(ids))
    wrong = DeFINE(80, 32, input_dim=16, max_dim=128, depth=3)
    with pytest.raises(RuntimeError, match="size mismatch"):
        wrong.load_state_dict(first.state_dict())


@pytest.mark.parametrize("backend", ["reference", *FAST])
@pytest.mark.parametrize("shape", [(), (0,), (1,), (2, 0), (3, 1, 2)])
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
def test_any_id_shape(backend, shape, ids_dtype):
    layer = DeFINE(30, 20, input_dim=16, max_dim=32, depth=2, backend=backend)
    ids = torch.randint(0, 30, shape, dtype=ids_dtype)
    out = layer(ids)
    assert out.shape == (*shape, 20)
    out.sum().backward()
    assert layer.weight.grad.shape == (30, 16)


@pytest.mark.parametrize("backend", ["reference", *FAST])
def test_bad_ids_raise_clear_errors(backend):
    layer = DeFINE(30, 20, input_dim=16, max_dim=32, depth=2, backend=backend)
    with pytest.raises(IndexError, match="token id 30 at flat position 4"):
        layer(torch.tensor([[0, 1], [2, 3], [30, 5]]))
    with pytest.raises(IndexError, match="token id -2"):
        layer(torch.tensor([1, -2]))
    with pytest.raises(TypeError, match="torch.float32"):
        layer(torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="torch.bool"):
        layer(torch.tensor([True, False]))
    with pytest.raises(TypeError, match="tensor of token ids"):
        layer([1, 2])
    with pytest.raises(ValueError, match="meta"):
        layer(torch.tensor([1, 2], device="meta"))


@pytest.mark.skipif(not HAS_CPU_KERNELS, reason="compiled CPU kernels not loaded")
def test_mismatched_parameter_shape_raises():
    layer = DeFINE(30, 20, input_dim=16, max_dim=32, depth=2, backend="cpu")
    layer.layers[1].weight = torch.nn.Parameter(torch.randn(3, 5, 7))
    # the stack op names the step and both widths; the step op (under torch.compile) the shapes
    with pytest.raises(ValueError, match=r"step 1 reads 15 features \(weight \[3, 5, 7\]\) but its input has 40"):
        layer(torch.tensor([1, 2]))


def test_backend_selection_and_errors(monkeypatch):
    layer = DeFINE(30, 20, input_dim=16, max_dim=32, depth=2)
    assert layer.active_backend() == ("cpu" if HAS_CPU_KERNELS else "reference")
    with pytest.raises(define_ops.BackendUnavailableError, match="'cuda' backend runs on CUDA tensors"):
        DeFINE(30, 20, input_dim=16, max_dim=32, depth=2, backend="cuda")(torch.tensor([1]))
    with pytest.raises(ValueError, match="unknown backend"):
        DeFINE(30, 20, input_dim=16, max_dim=32, backend="tpu")
    monkeypatch.setenv("DEFINE_OPS_BACKEND", "reference")
    assert DeFINE(30, 20, input_dim=16, max_dim=32, depth=2, backend="cpu").active_backend() == "reference"
    monkeypatch.setenv("DEFINE_OPS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="DEFINE_OPS_BACKEND"):
        DeFINE(30, 20, input_dim=16, max_dim=32)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(dedup="yes"), "dedup='yes' is invalid"),
        (dict(validate_ids="x"), "validate_ids='x' is invalid"),
        (dict(sparse=1), "sparse=1 is invalid"),
        (dict(dtype=torch.int64), "dtype=torch.int64 is invalid"),
        (dict(cache="always"), "cache='always' is invalid"),
    ],
)
def test_module_options_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DeFINE(30, 20, input_dim=16, max_dim=32, **kwargs)


def test_repr_shows_what_differs_from_the_defaults():
    plain = repr(DeFINE(30, 20, input_dim=16, max_dim=32)).splitlines()[1].strip()
    assert plain == "30, 20, input_dim=16, max_dim=32, depth=3, max_groups=4, skip=mix, backend=auto"
    text = repr(DeFINE(30, 20, input_dim=16, max_dim=32, padding_idx=0, dropout=0.1, map="adaptive", cutoffs=[10],
                       dedup=True, cache="off"))  # fmt: skip
    for shown in ("padding_idx=0", "dropout=0.1", "map='adaptive'", "cutoffs=(10,)", "dedup=True", "cache='off'"):
        assert shown in text


@pytest.mark.parametrize("backend", ["reference", *FAST])
def test_torch_func_transforms(backend):
    # grad, vmap, per-sample gradients (vmap of grad) and jacrev: under a transform the layer computes
    # with the reference backend, whose plain PyTorch the transforms understand.
    from torch.func import functional_call, grad, jacrev, vmap

    layer = DeFINE(50, 8, input_dim=16, max_dim=32, depth=2, backend=backend, dtype=torch.float64, dedup=True)
    ids = torch.tensor([1, 2, 7, 7])
    params = {name: p.detach() for name, p in layer.named_parameters()}

    def loss(parameters, token_ids):
        return functional_call(layer, parameters, (token_ids,)).pow(2).sum()

    grads = grad(loss)(params, ids)
    expected = torch.autograd.grad(layer(ids).pow(2).sum(), list(layer.parameters()))
    for name, want in zip(params, expected, strict=True):
        assert max_err(grads[name], want) < 1e-12, name
    assert max_err(vmap(layer)(ids.reshape(2, 2)), layer(ids.reshape(2, 2))) < 1e-12
    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, ids.reshape(4, 1))
    third = torch.autograd.grad(layer(ids[2:3]).pow(2).sum(), layer.reduce.weight)[0]
    assert max_err(per_sample["reduce.weight"][2], third) < 1e-12
    with_bias = lambda bias: functional_call(layer, {**params, "reduce.bias": bias}, (ids,))  # noqa: E731
    jacobian = jacrev(with_bias)(params["reduce.bias"])
    assert max_err(jacobian, torch.eye(8, dtype=torch.float64).expand(4, 8, 8)) < 1e-12  # d out / d bias = I
    layer.eval()
    with torch.no_grad():
        vmap(layer)(ids.reshape(2, 2))
    assert layer._cache_table is None  # no table built from transformed parameters
    with pytest.raises(IndexError):
        vmap(layer)(torch.tensor([[1, 50]]))


def test_embedding_scale_and_init():
    layer = DeFINE(2000, 32, input_dim=64, max_dim=128)
    assert layer.embedding_scale == math.sqrt(64)
    assert abs(layer.weight.std().item() - 64**-0.5) < 0.01
    assert DeFINE(10, 8, input_dim=16, max_dim=32, scale_embedding=False).embedding_scale == 1.0


@pytest.mark.skipif(not HAS_CPU_KERNELS, reason="compiled CPU kernels not loaded")
def test_compiled_provider_runs_training_and_eval_steps():
    """The benchmarks' <backend>_compiled provider (torch.compile of our layer; reduce-overhead on a
    GPU) runs a training step and an eval step; it refuses dedup."""
    from define_ops.bench import make_workload

    for mode in ("fwd_bwd", "fwd"):
        work = make_workload("nmt_wmt14", "cpu_compiled", mode, quick=True, dtype=torch.float32)
        assert work.provider == "cpu_compiled"
        work.step()
    with pytest.raises(ValueError, match="torch.compile of one of our backends"):
        make_workload("nmt_wmt14", "cpu_compiled", "fwd_bwd", quick=True, dtype=torch.float32, dedup=True)


def test_graph_providers_need_a_gpu_backend():
    from define_ops.bench import make_workload

    with pytest.raises(ValueError, match="CUDA graph of the cuda or triton backend"):
        make_workload("awd_ptb", "cpu_graph", "fwd_bwd", quick=True, dtype=torch.float32)


@pytest.mark.parametrize("map_kind", ["table", "adaptive"])
def test_map_and_transform_parameters_split_the_layer(map_kind):
    extra = {"map": "adaptive", "cutoffs": (20, 60)} if map_kind == "adaptive" else {}
    layer = define_ops.DeFINE(100, 24, input_dim=16, max_dim=64, depth=3, **extra)
    map_ids = [id(p) for p in layer.map_parameters()]
    transform_ids = [id(p) for p in layer.transform_parameters()]
    assert set(map_ids).isdisjoint(transform_ids)
    assert sorted(map_ids + transform_ids) == sorted(id(p) for p in layer.parameters())
    names = {id(p): n for n, p in layer.named_parameters()}
    assert all(names[i].startswith(("layers.", "reduce.")) for i in transform_ids)
    assert all(names[i] == "weight" or names[i].startswith("map.") for i in map_ids)
