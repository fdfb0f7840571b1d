"""Deploying DeFINE: torch.export (dynamic batch and sequence length, save/load), AOTInductor
packages, and the cached table as a plain nn.Embedding.

The exported graph holds our custom ops by name (define_ops::hgt_step, ...): a process that loads
it must import define_ops first, which registers them. TorchScript (torch.jit.trace/script) is not
supported: the tracer cannot take the ops' optional-tensor lists; to_embedding() is the route there.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch.export import Dim

import define_ops
from define_ops import DeFINE

from .conftest import HAS_CUDA, max_err

CPU_BACKENDS = ["reference", *(b for b in ("cpu", "triton") if b in define_ops.available_backends("cpu"))]
EXAMPLE = torch.tensor([[1, 2, 3], [4, 5, 6]])
# other batch and sequence sizes than the example's, a padding id (0) and the last id (49) included
OTHER = torch.tensor([[0, 7, 9, 11, 3], [4, 4, 4, 4, 4], [49, 1, 2, 3, 0]])
DYNAMIC = {"ids": {0: Dim("batch", min=1, max=64), 1: Dim("length", min=1, max=512)}}


def make_layer(backend: str, device: str = "cpu", **options) -> DeFINE:
    torch.manual_seed(3)
    kwargs = dict(input_dim=8, max_dim=32, depth=3, max_groups=4, padding_idx=0, backend=backend, device=device)
    return DeFINE(50, 24, **{**kwargs, **options})


def our_ops(program: torch.export.ExportedProgram) -> set[str]:
    return {str(n.target) for n in program.graph.nodes if n.op == "call_function" and "define_ops" in str(n.target)}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_export_with_dynamic_shapes_and_save_load(backend):
    layer = make_layer(backend).eval()  # cache="auto": export traces the computation, not a table
    program = torch.export.export(layer, (EXAMPLE,), dynamic_shapes=DYNAMIC)
    assert bool(our_ops(program)) == (backend != "reference")  # our ops by name, not decomposed
    with torch.no_grad():
        # The same computation at the same shapes, bit for bit: uncached. (The eval table is built
        # over all 50 ids at once, and a GEMM of another row count may round differently: 3.6e-7
        # for the reference's float32 GEMMs on an AVX-512/AMX Xeon.)
        layer.cache = "off"
        expected = layer(OTHER)
    assert max_err(program.module()(OTHER), expected) == 0.0
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    assert max_err(loaded.module()(OTHER), expected) == 0.0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_exported_training_graph_gives_the_layers_gradients(backend):
    layer = make_layer(backend)
    program = torch.export.export(layer, (EXAMPLE,), dynamic_shapes=DYNAMIC)
    exported = program.module()
    exported(OTHER).pow(2).sum().backward()
    layer(OTHER).pow(2).sum().backward()
    exported_grads = dict(exported.named_parameters())
    for name, parameter in layer.named_parameters():
        assert max_err(exported_grads[name].grad, parameter.grad) <= 1e-6 * max(1.0, parameter.grad.abs().max().item())


@pytest.mark.skipif("cpu" not in define_ops.available_backends("cpu"), reason="compiled CPU kernels not loaded")
def test_aot_inductor_package_runs_our_ops(tmp_path):
    layer = make_layer("cpu").eval()
    program = torch.export.export(layer, (EXAMPLE,), dynamic_shapes=DYNAMIC)
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "define.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    with torch.no_grad():
        assert max_err(runner(OTHER), layer(OTHER)) <= 1e-6


def test_the_table_route_traces_and_scripts():
    """to_embedding(): the trained unit as an nn.Embedding, which every runtime takes."""
    layer = make_layer("reference").eval()
    embedding = layer.to_embedding()
    traced = torch.jit.trace(embedding, (EXAMPLE,))
    with torch.no_grad():
        assert max_err(traced(OTHER), layer(OTHER)) <= 1e-6
        assert max_err(torch.jit.script(embedding)(OTHER), layer(OTHER)) <= 1e-6


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_export_and_aot_inductor_on_the_gpu(backend, tmp_path):
    if backend not in define_ops.available_backends("cuda"):
        pytest.skip(f"the {backend} backend is not available")
    layer = make_layer(backend, device="cuda").eval()
    ids, other = EXAMPLE.cuda(), OTHER.cuda()
    program = torch.export.export(layer, (ids,), dynamic_shapes=DYNAMIC)
    with torch.no_grad():
        expected = layer(other)
    assert max_err(program.module()(other), expected) == 0.0
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "define.pt2"))
    assert max_err(torch._inductor.aoti_load_package(path)(other), expected) <= 1e-5
