"""A small run of every CUDA kernel path, for compute-sanitizer (memcheck, racecheck, synccheck).

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 scripts/cuda_smoke.py

Forward + backward of hgt_step over layouts (skip in/out, groups 1..8, plain Reduce) and options
(shuffle, norm, activations, dropout) in fp32 and bf16, the same with the warp-per-row epilogue
kernels (DEFINE_OPS_CUDA_WARP_ROWS=1) where the layouts qualify, the wide-layer global-workspace path, the
embedding lookup and its backward with padding and repeated ids, and a small DeFINE unit.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import define_ops  # noqa: E402
from tests.test_ops import LAYOUTS, OPTIONS, WARP_LAYOUTS, make_step_inputs  # noqa: E402


def step(tensors: dict, params: dict) -> None:
    leaves = {k: v.requires_grad_(True) for k, v in tensors.items() if v is not None}
    out = define_ops.hgt_step(**leaves, **params, backend="cuda")
    out.backward(torch.randn_like(out))


def main() -> None:
    assert "cuda" in define_ops.available_backends("cuda"), "the CUDA kernels are not built"
    for dtype in (torch.float32, torch.bfloat16):
        for layout in LAYOUTS:
            for options in (OPTIONS[0], OPTIONS[2], OPTIONS[4]):
                for tokens in (1, 37):
                    step(*make_step_inputs(layout, options, tokens, dtype, "cuda"))
        os.environ["DEFINE_OPS_CUDA_WARP_ROWS"] = "1"  # read at every call
        for shape in WARP_LAYOUTS.values():
            for options in (OPTIONS[1], OPTIONS[4]):
                for tokens in (1, 37, 300):
                    step(*make_step_inputs(shape, options, tokens, dtype, "cuda"))
        del os.environ["DEFINE_OPS_CUDA_WARP_ROWS"]
    wide = dict(
        x=torch.randn(5, 64, device="cuda"), weight=torch.randn(1, 64, 16384, device="cuda") * 0.1,
        bias=torch.zeros(16384, device="cuda"), norm_weight=torch.ones(16384, device="cuda"),
        norm_bias=torch.zeros(16384, device="cuda"),
    )  # fmt: skip
    step(wide, dict(seed=torch.tensor(3, device="cuda"), activation="gelu", dropout_p=0.2))
    weight = torch.randn(50, 24, device="cuda", requires_grad=True)
    ids = torch.tensor([[3, 0, 49, 3], [3, 3, 7, 0]], device="cuda")
    define_ops.embedding_lookup(weight, ids, 0, 2.0, backend="cuda").sum().backward()
    layer = define_ops.DeFINE(300, 40, input_dim=32, max_dim=96, depth=3, max_groups=4, dropout=0.1, padding_idx=1,
                              shuffle=True, backend="cuda", device="cuda").train()  # fmt: skip
    layer(torch.randint(0, 300, (3, 17), device="cuda")).sum().backward()
    torch.cuda.synchronize()
    print("cuda_smoke: ok")


if __name__ == "__main__":
    main()
