"""What each piece of an eager DeFINE training step costs the host, one call at a time.

    python scripts/host_costs.py [--preset awd_ptb] [--backend cuda] [--json F]

The H200 session at commit 9c44359 found the eager CUDA step host-bound (awd_ptb: 2.3 ms of wall
clock for 0.47 ms of kernels) with ~0.45 ms in one C++ op call, far more than its launches should
cost. Each row here is the host time of one call (define_ops.bench.enqueue_ms: behind a GPU sleep,
so no launch waits for the device; a row marked WAITED synchronised with the device somewhere),
from a bare launch up to the whole training step, at the preset's shapes and token count:

- ``launch``: one tiny elementwise kernel (x.zero_() on one element): the floor of a launch;
- ``bmm``: torch.bmm of the first HGT layer's grouped GEMM (strided group views, as the backend
  calls it) — cuBLAS through ATen, once;
- ``hgt_step``: that layer's forward op (GEMM + epilogue), called below the Autograd key;
- ``hgt_stack`` / ``hgt_stack_backward``: the whole stack's two C++ ops, below the Autograd key;
- ``forward (no grad)`` / ``forward (autograd)``: DeFINE's forward without and with autograd;
- ``training step``: zeroing the grads, forward and backward — what the benchmarks time.

On the CPU the same rows are plain wall-clock medians (the kernels run inline: a smoke test).
"""

from __future__ import annotations

import argparse
import json

import torch

from define_ops import DeFINE, DeFINEConfig
from define_ops.bench import PRESET_TOKENS, QUICK_TOKENS, QUICK_VOCAB, device, device_name, enqueue_ms, group_view
from define_ops.stack import TENSORS_PER_STEP, _below_autograd, _columns, _spec_lists, _specs_and_tensors


def host_costs(preset: str, backend: str, quick: bool) -> list[dict]:
    dev = device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    overrides = {"num_embeddings": QUICK_VOCAB} if quick else {}
    config = DeFINEConfig.from_preset(preset, **overrides)
    tokens = QUICK_TOKENS if quick else PRESET_TOKENS[preset]
    module = DeFINE.from_config(config, backend=backend, device=dev, dtype=dtype, validate_ids=False).train()
    ids = torch.randint(0, config.num_embeddings, (tokens,), device=dev)
    grad_out = torch.randn(tokens, config.embedding_dim, device=dev, dtype=dtype)
    params = list(module.parameters())

    # the stack ops' arguments, as DeFINE builds them (training: one dropout seed per layer)
    specs, tensors = _specs_and_tensors(module._stack_steps(module._dropout_seeds()), dev.type)
    columns, lists = _columns(tensors), _spec_lists(specs)
    with torch.no_grad():
        x = module.embed_ids(ids, backend)  # [T, n]
    with _below_autograd(), torch.no_grad():
        out, values, stats = torch.ops.define_ops.hgt_stack.default(x, *columns, *lists, True)
    grad_stack = torch.randn_like(out)

    weight, bias, gamma, beta, seed = tensors[:TENSORS_PER_STEP]
    groups = weight.shape[0]
    y = torch.empty(tokens, groups * weight.shape[2], device=dev, dtype=dtype)  # [T, b]
    tiny = torch.zeros(1, device=dev)

    def launch() -> None:
        tiny.zero_()

    def bmm() -> None:
        with torch.no_grad():
            torch.bmm(group_view(x, groups), weight, out=group_view(y, groups))

    def hgt_step() -> None:
        with _below_autograd():
            torch.ops.define_ops.hgt_step.default(x, weight, bias, gamma, beta, seed, *specs[0].args())

    def stack_forward() -> None:
        with _below_autograd():
            torch.ops.define_ops.hgt_stack.default(x, *columns, *lists, True)

    def stack_backward() -> None:
        with _below_autograd():
            torch.ops.define_ops.hgt_stack_backward.default(grad_stack, x, values, stats, *columns, *lists)

    def forward_no_grad() -> None:
        with torch.no_grad():
            module(ids)

    def forward_autograd() -> None:
        module(ids)

    def training_step() -> None:
        for p in params:
            p.grad = None
        module(ids).backward(grad_out)

    rows = []
    for name, call in (("launch", launch), ("bmm", bmm), ("hgt_step", hgt_step), ("hgt_stack", stack_forward),
                       ("hgt_stack_backward", stack_backward), ("forward (no grad)", forward_no_grad),
                       ("forward (autograd)", forward_autograd), ("training step", training_step)):  # fmt: skip
        ms, waited = enqueue_ms(call, rounds=20)
        rows.append({"call": name, "host_ms": ms, "waited": waited})
        print(f"  {name:<20} {ms * 1e3:9.1f} us{'  WAITED FOR THE DEVICE' if waited else ''}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="awd_ptb,nmt_wmt14")
    parser.add_argument("--backend", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="the benchmarks' small vocabulary and token count")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = {}
    for preset in args.presets.split(","):
        print(f"### {preset} {args.backend}: host time per call ({device_name()})")
        results[preset] = host_costs(preset, args.backend, args.quick)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": device_name(), "torch": torch.__version__, "backend": args.backend,
                       "results": results}, handle, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
