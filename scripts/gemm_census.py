"""Every grouped GEMM of a preset's layer step, timed as the CUDA backend runs it and as it could run.

    python scripts/gemm_census.py [--presets nmt_wmt14,txl_wt103] [--dtype bfloat16]

The H100 profile (benchmarks/results/h100-profile-bf16.json) showed cuBLAS picking CUTLASS
``align2`` kernels where a group's width is not a multiple of 8 elements: at ``nmt_wmt14`` two
weight-gradient GEMMs (M = a/g and N = b/g small, K = the token count) took ~49 us each, at
``txl_wt103`` the layer-2 GEMMs ~280 us against ~86 us on a padded copy. Per layer this prints,
in microseconds (CUDA events, median of 20 after warm-up):

- ``fwd``, ``dgrad``, ``wgrad``: the three strided-batched GEMMs exactly as csrc/cuda/hgt_step.cu
  calls them (x, y, dY as [g, T, width / g] views of [T, width] rows; W [g, a/g, b/g]);
- ``wgrad dense``: xᵀ dY as ONE [a, b] GEMM (g times the FLOPs, every operand 16-byte aligned
  whenever a and b are multiples of 8), whose diagonal blocks are the weight gradient: a view
  with strides ((a/g)·b + b/g, b, 1), and ``+copy`` with those blocks copied out;
- ``*-padded``: the same GEMMs on copies padded to 8 features per group (copy not included), the
  alignment's own effect;
- ``fwd dense``, ``dgrad dense``: the layer as ONE [T, a] x [a, b] GEMM against the block-diagonal
  weight (g times the FLOPs, aligned operands, no copies of the activations), and the forward
  with the diagonal blocks refreshed from the weight first (once per optimizer step in training).

Nothing is written (the table goes to stdout for the session log). ``--device cpu --tokens 64``
runs the same code on the CPU (a smoke test of the script; its times mean nothing for the GPU).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from define_ops import DeFINEConfig
from define_ops.bench import PRESET_TOKENS, group_view, median_ms


def time_us(fn, device: torch.device, repeats: int = 20) -> float:
    """Median time of fn: CUDA events on a GPU (device time, no launch or sync overhead), else the
    benchmarks' wall-clock median."""
    if device.type != "cuda":
        return median_ms(fn, rounds=repeats, warmup=3) * 1e3
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def padded_copy(t: torch.Tensor, groups: int, multiple: int = 8) -> torch.Tensor:
    """[T, width] → [g, T, pad(width / g)], zero columns after each group's."""
    tokens, width = t.shape
    per = width // groups
    padded = torch.zeros(groups, tokens, (per + multiple - 1) // multiple * multiple, device=t.device, dtype=t.dtype)
    padded[:, :, :per] = group_view(t, groups)
    return padded


def layer_times(plan, tokens: int, dtype: torch.dtype, dev: torch.device) -> list[float]:
    """us of (fwd, dgrad, wgrad, wgrad dense, wgrad dense + copy, fwd padded, wgrad padded, fwd dense,
    fwd dense + the block-diagonal weight's refresh, dgrad dense) of one layer."""
    g, a, b = plan.groups, plan.in_features, plan.out_features
    a_g, b_g = a // g, b // g
    x = torch.randn(tokens, a, device=dev, dtype=dtype)  # [T, a]
    weight = torch.randn(g, a_g, b_g, device=dev, dtype=dtype)  # [g, a/g, b/g]
    y = torch.empty(tokens, b, device=dev, dtype=dtype)  # [T, b]
    dy = torch.randn(tokens, b, device=dev, dtype=dtype)  # [T, b]
    grad_x = torch.randn(tokens, a, device=dev, dtype=dtype)  # [T, a]
    grad_weight = torch.empty_like(weight)  # [g, a/g, b/g]
    dense = torch.empty(a, b, device=dev, dtype=dtype)  # [a, b]
    blocks = dense.as_strided((g, a_g, b_g), (a_g * b + b_g, b, 1))  # its diagonal blocks: the weight gradient
    x_pad, dy_pad = padded_copy(x, g), padded_copy(dy, g)  # [g, T, pad(a/g)], [g, T, pad(b/g)]
    w_pad = torch.zeros(g, x_pad.shape[2], dy_pad.shape[2], device=dev, dtype=dtype)
    w_pad[:, :a_g, :b_g] = weight
    y_pad = torch.empty(g, tokens, dy_pad.shape[2], device=dev, dtype=dtype)
    gw_pad = torch.empty_like(w_pad)
    w_dense = torch.zeros(a, b, device=dev, dtype=dtype)  # [a, b] block-diagonal: W_j on the diagonal
    w_blocks = w_dense.as_strided((g, a_g, b_g), (a_g * b + b_g, b, 1))
    w_blocks.copy_(weight)

    def fwd() -> None:
        torch.bmm(group_view(x, g), weight, out=group_view(y, g))

    def dgrad() -> None:
        group_view(grad_x, g).baddbmm_(group_view(dy, g), weight.transpose(1, 2))

    def wgrad() -> None:
        torch.bmm(group_view(x, g).transpose(1, 2), group_view(dy, g), out=grad_weight)

    def wgrad_dense() -> None:
        torch.mm(x.t(), dy, out=dense)

    def wgrad_dense_copy() -> None:
        torch.mm(x.t(), dy, out=dense)
        grad_weight.copy_(blocks)

    def fwd_padded() -> None:
        torch.bmm(x_pad, w_pad, out=y_pad)

    def wgrad_padded() -> None:
        torch.bmm(x_pad.transpose(1, 2), dy_pad, out=gw_pad)

    # The whole layer as ONE dense GEMM against the block-diagonal weight: g times the FLOPs, but
    # every operand 16-byte aligned whenever a and b are multiples of 8 (the refresh: the blocks
    # copied in after each optimizer step, the zeros kept).
    def fwd_dense() -> None:
        torch.mm(x, w_dense, out=y)

    def fwd_dense_refresh() -> None:
        w_blocks.copy_(weight)
        torch.mm(x, w_dense, out=y)

    def dgrad_dense() -> None:
        grad_x.addmm_(dy, w_dense.t())

    variants = (fwd, dgrad, wgrad, wgrad_dense, wgrad_dense_copy, fwd_padded, wgrad_padded, fwd_dense,
                fwd_dense_refresh, dgrad_dense)  # fmt: skip
    return [time_us(fn, dev) for fn in variants]


def census(preset: str, dtype: torch.dtype, dev: torch.device, tokens: int | None = None) -> None:
    config = DeFINEConfig.from_preset(preset)
    tokens = tokens or PRESET_TOKENS[preset]
    card = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"### {preset}: T = {tokens}, {dtype}, {card}")
    print("| layer | g | a/g | b/g | fwd | dgrad | wgrad | wgrad dense (view / +copy) | fwd-padded | wgrad-padded "
          "| fwd dense (/ +refresh) | dgrad dense |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for index, plan in enumerate(config.layer_plans()[:-1]):  # the Reduce layer is one dense addmm
        t = layer_times(plan, tokens, dtype, dev)
        g = plan.groups
        print(f"| {index + 1} | {g} | {plan.in_features // g} | {plan.out_features // g} | {t[0]:.1f} | {t[1]:.1f} | "
              f"{t[2]:.1f} | {t[3]:.1f} / {t[4]:.1f} | {t[5]:.1f} | {t[6]:.1f} | {t[7]:.1f} / {t[8]:.1f} | "
              f"{t[9]:.1f} |")  # fmt: skip
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="nmt_wmt14,lstm_wt103_n7,txl_wt103,awd_ptb,lstm_wt103")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, default=None, help="default: the benchmarks' token count of each preset")
    args = parser.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gemm_census.py: no CUDA GPU here (--device cpu runs a smoke test)")
    for preset in args.presets.split(","):
        census(preset, getattr(torch, args.dtype), dev, args.tokens)


if __name__ == "__main__":
    main()
