"""Build a DeFINE layer from a preset, check every backend against the reference, and time them.

    python examples/layer_check.py --preset awd_ptb

1. prints the layer plan (widths, groups, parameters, MACs per token);
2. float64, small batch: each available backend vs the pure-PyTorch reference (output and
   every gradient, training mode with dropout: the masks are the same on every backend);
3. the preset's real token count, in float32 on the CPU (bf16 on a GPU): forward + backward and
   forward-only times of the reference, torch.compile(reference), our backends and a plain
   nn.Embedding(V, m) step.
"""

from __future__ import annotations

import argparse

import torch

import define_ops
from define_ops import DeFINE, DeFINEConfig
from define_ops.bench import device, device_name, make_workload, median_ms, providers_for


def parity(config: DeFINEConfig, backend: str, dev: torch.device) -> tuple[float, float]:
    small = config.replace(num_embeddings=min(config.num_embeddings, 1000))
    ref = DeFINE.from_config(small, backend="reference", device=dev, dtype=torch.float64).train()
    fast = DeFINE.from_config(small, backend=backend, device=dev, dtype=torch.float64).train()
    fast.load_state_dict(ref.state_dict())
    ids = torch.randint(0, small.num_embeddings, (4, 37), device=dev)
    results = []
    for module in (ref, fast):
        torch.manual_seed(0)
        out = module(ids)
        out.backward(torch.ones_like(out))
        results.append((out.detach(), [p.grad for p in module.parameters()]))
    (out_ref, grads_ref), (out, grads) = results
    grad_err = max((g - r).abs().max().item() for g, r in zip(grads, grads_ref, strict=True))
    return (out - out_ref).abs().max().item(), grad_err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="awd_ptb", choices=sorted(define_ops.PRESETS))
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per provider (median reported)")
    parser.add_argument("--quick", action="store_true", help="small vocabulary and token count")
    args = parser.parse_args()

    dev = device()
    config = DeFINEConfig.from_preset(args.preset)
    print(config.describe())
    print(f"\ndevice: {device_name()}; backends: {', '.join(define_ops.available_backends(dev))}")

    print("\nparity with the reference (float64, training mode, max abs error):")
    for backend in define_ops.available_backends(dev):
        if backend == "reference" or (backend == "triton" and dev.type == "cpu"):
            continue
        out_err, grad_err = parity(config, backend, dev)
        status = "ok" if max(out_err, grad_err) < 1e-9 else "MISMATCH"
        print(f"  {backend:10s} output {out_err:.1e}  gradients {grad_err:.1e}  {status}")

    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    print(f"\ntimings ({str(dtype).replace('torch.', '')}, median of {args.rounds}):")
    print(f"  {'provider':20s} {'fwd+bwd ms':>11s} {'fwd ms':>9s} {'vs reference':>13s}")
    baseline = None
    for provider in providers_for(dev):
        times = {}
        for mode in ("fwd_bwd", "fwd"):
            work = make_workload(args.preset, provider, mode, args.quick, dtype)
            times[mode] = median_ms(work.step, rounds=args.rounds)
        baseline = baseline or times["fwd_bwd"]
        speedup = baseline / times["fwd_bwd"]
        print(f"  {provider:20s} {times['fwd_bwd']:11.2f} {times['fwd']:9.2f} {speedup:12.2f}x")
    print(f"\ntokens per step: {work.tokens}")


if __name__ == "__main__":
    main()
