"""Where the translation training step's time goes, DeFINE inputs against standard ones.

    python scripts/nmt_step_profile.py [--tokens 8192] [--steps 20] [--json F]

The H200 evidence run (2026-11-27, commit f51cbd1) trained the Transformer base 26% slower in
tokens/s with DeFINE inputs (104k vs 140k) although the layer's own benchmark (nmt_wmt14: 1.7 ms
fwd+bwd for 4,096 tokens) predicts a few ms of a ~60 ms step, and on the CPU the step is no slower.
For each input this prints and records, at a batch of --tokens source and as many target tokens
(bf16 autocast on a GPU): the step's wall clock (forward, label-smoothed loss, backward, Adam), its
host time behind a GPU sleep (define_ops.bench.enqueue_ms: a step that waited for the device
synchronised somewhere), whether torch's sync debug mode saw a synchronisation, and the profiler's
top operators by device time (by host time on the CPU), DeFINE's own ops included.

The trainer's token-count batches come in a few dozen shapes (Multi30k at 8,192 tokens: 39
batch shapes, 28 DeFINE token counts over the evidence runs' 1,000 steps), each paying whatever a
new shape costs once; the fixed batch above never does. ``--new-shapes K`` also times K steps whose
batches have shapes this process has not run yet (sentence lengths of their own per input, so
neither run warms the other's GEMM plans), then the same K shapes again, seen. Their difference is
what a new shape costs (cuBLAS plan and heuristic choice, allocator growth), DeFINE's extra GEMM
shapes included.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
import warnings
from typing import Any

import torch

from define_ops.bench import device, device_name, enqueue_ms, median_ms, synchronize
from models.nmt_data import PAD
from models.train_nmt import BASE, build_model, smoothed_losses

VOCAB = 8000  # the evidence runs' joint BPE


def make_step(embedding: str, tokens: int, dev: torch.device, quick: bool):
    """(step(src, tgt), fixed (src, tgt) batch of ``tokens`` source tokens, parameter count)."""
    cfg = dict(BASE, src_embedding=embedding, tgt_embedding=embedding, src_vocab_size=VOCAB, tgt_vocab_size=VOCAB)
    if quick:  # a CPU smoke run: the small model, a few tokens
        cfg.update(d_model=64, n_heads=4, ffn_dim=128, encoder_layers=1, decoder_layers=1, table_dim=16,
                   define_max_dim=64)  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg).to(dev).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

    def step(src: torch.Tensor, tgt: torch.Tensor) -> None:
        with autocast:  # as the trainer's step: the loss in autocast too, its log-softmax in fp32
            loss, _ = smoothed_losses(model, src, tgt[:, :-1], tgt[:, 1:], cfg["label_smoothing"])
        (loss / tgt[:, 1:].numel()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # Multi30k's sentences are ~13 words, ~28 BPE pieces with the end token at most
    return step, make_batch(tokens, 28, dev), sum(p.numel() for p in model.parameters())


def make_batch(tokens: int, length: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Source [rows, length] and target [rows, length + 1] with ``rows * length`` ≈ ``tokens``."""
    rows = max(1, tokens // length)
    src = torch.randint(4, VOCAB, (rows, length), device=dev)
    tgt = torch.randint(4, VOCAB, (rows, length + 1), device=dev)
    src[:, -3:] = PAD  # some padding, as token-count batches have
    tgt[:, -3:] = PAD
    return src, tgt


def new_shape_ms(step, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """Median ms of one synchronised step over ``batches`` (shapes not run before), then over the
    same batches again (shapes seen)."""

    def timed(batch) -> float:
        synchronize()
        start = time.perf_counter()
        step(*batch)
        synchronize()
        return (time.perf_counter() - start) * 1e3

    first = [timed(batch) for batch in batches]
    again = [timed(batch) for batch in batches]
    return statistics.median(first), statistics.median(again)


def saw_a_sync(step) -> bool:
    if not torch.cuda.is_available():
        return False
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return any("synchroniz" in str(w.message).lower() for w in caught)


def top_ops(step, rows: int = 15) -> list[dict[str, Any]]:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            step()
        synchronize()
    key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)[:rows]
    return [{"name": e.key, "calls": e.count // 3, "self_device_ms": getattr(e, "self_device_time_total", 0) / 3e3,
             "self_host_ms": e.self_cpu_time_total / 3e3} for e in events]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="a tiny model: a smoke run of the script on a CPU")
    p.add_argument("--new-shapes", type=int, default=0, help="also time K steps on batch shapes not run before")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    dev = device()
    results: dict[str, Any] = {"device": device_name(), "torch": torch.__version__, "tokens": args.tokens, "runs": {}}
    for index, embedding in enumerate(("define", "standard")):
        step_on, batch, parameters = make_step(embedding, args.tokens, dev, args.quick)
        step = functools.partial(step_on, *batch)
        for _ in range(3):  # warm-up: allocator, cuBLAS plans
            step()

        def synchronized_step(step=step) -> None:
            step()
            synchronize()

        wall = median_ms(synchronized_step, rounds=args.steps, warmup=0)
        host, waited = enqueue_ms(step, rounds=max(3, args.steps // 4))
        run = {"parameters": parameters, "step_ms": wall, "host_ms": host, "host_waited_for_device": waited,
               "sync_debug_saw_sync": saw_a_sync(step), "top_ops": top_ops(step)}  # fmt: skip
        new_note = ""
        if args.new_shapes:
            # each input its own lengths (interleaved, none 28), so that no shape is seen twice
            lengths = [length for length in range(12 + index, 80, 2) if length != 28][: args.new_shapes]
            first, again = new_shape_ms(step_on, [make_batch(args.tokens, length, dev) for length in lengths])
            run.update(new_shape_step_ms=first, seen_shape_step_ms=again, new_shape_lengths=lengths)
            new_note = f" | new shapes {first:8.2f} ms, seen {again:8.2f} ms"
        results["runs"][embedding] = run
        waited_note = " (WAITED: a synchronisation)" if waited else ""
        print(f"{embedding:9s} step {wall:8.2f} ms | host {host:8.2f} ms{waited_note} | sync seen: "
              f"{run['sync_debug_saw_sync']} | {parameters / 1e6:.2f}M parameters{new_note}")  # fmt: skip
        for op in run["top_ops"][:10]:
            print(f"    {op['name'][:60]:60s} x{op['calls']:<4d} device {op['self_device_ms']:8.3f} ms "
                  f"host {op['self_host_ms']:8.3f} ms")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
