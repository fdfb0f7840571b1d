"""Random valid configurations: every fast backend against the reference, in float64.

The option grids of test_layer.py cover each option on its own and a few combinations; this draws
whole configurations at random (every field of DeFINEConfig, the Map, dedup, sparse, id shapes
with 0 and 1 tokens, padding ids, dropout through the shared seeds) so that interactions nobody
listed get checked too. Each case compares the layer's output, every parameter's gradient and the
eval-mode output the fast layer serves from its cached table with the reference backend's, within
1e-10 of the larger of 1 and the reference's largest magnitude.

One known difference is not ours: a LayerNorm group of one feature normalizes to exactly 0, so
its γ gradient is exactly 0; PyTorch's layer_norm backward (the reference) recomputes x̂ as
x·rstd − mean·rstd, which does not cancel, and rstd = 1/√eps ≈ 316 amplifies the rounding (up
to ~1e-5 seen). There the fast backends are held to the exact 0 instead.

Longer runs print each failing case's seed (its configuration is drawn from the seed alone):

    python -m tests.test_fuzz --backends cpu,triton --seconds 600 [--first-seed 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import sys
import time

# Run as a script the Triton kernels need the interpreter too (conftest.py chooses it for pytest),
# chosen before define_ops.triton loads.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import define_ops  # noqa: E402
from define_ops import DeFINE, DeFINEConfig  # noqa: E402

HAS_CPU_KERNELS = "cpu" in define_ops.available_backends("cpu")

TOLERANCE = 1e-10
FAST_BACKENDS = [b for b in ("cpu", "triton") if b in define_ops.available_backends("cpu")]
# Cases per backend in the test suite (the interpreter runs each Triton kernel in Python: slower).
CASES = {"cpu": 300, "triton": 80}


def random_config(rng: random.Random) -> DeFINEConfig:
    """A valid configuration drawn from ``rng`` (draws again where the widths and groups clash)."""
    while True:
        vocab = rng.choice([1, 2, 7, 33, 100, 257])
        n = rng.choice([1, 2, 3, 4, 6, 8, 12, 16, 20, 24, 32])
        fields = dict(
            num_embeddings=vocab, embedding_dim=rng.choice([1, 3, 8, 17, 32]), input_dim=n,
            max_dim=n * rng.choice([1, 2, 3, 4]) + rng.choice([0, 0, 4, 8]), depth=rng.choice([1, 2, 3, 4, 5, 7]),
            max_groups=rng.choice([1, 2, 4, 8, 16]), group_schedule=rng.choice(["halving", "cyclic"]),
            width_rule=rng.choice(["paper", "linspace"]), group_width_multiple=rng.choice([1, 1, 2, 4, 8]),
            skip=rng.choice(["mix", "concat", "none"]), skip_into_reduce=rng.random() < 0.7,
            shuffle=rng.random() < 0.5, norm=rng.choice(["layer", None]),
            activation=rng.choice(["gelu", "relu", "swish", None]), dropout=rng.choice([0.0, 0.0, 0.1, 0.5]),
            bias=rng.random() < 0.7, scale_embedding=rng.random() < 0.7,
            padding_idx=rng.choice([None, None, 0, vocab - 1, -1]),
        )  # fmt: skip
        if vocab >= 7 and rng.random() < 0.25:
            first = rng.randint(1, vocab - 2)
            cutoffs = (first,) if rng.random() < 0.5 else (first, rng.randint(first + 1, vocab - 1))
            fields.update(map="adaptive", cutoffs=cutoffs, adaptive_factor=rng.choice([1, 2, 4]))
        try:
            return DeFINEConfig(**fields)
        except ValueError:
            continue


def exact_zero_gradients(config: DeFINEConfig) -> set[str]:
    """γ of the LayerNorm groups of one feature: x̂ ≡ 0 there, so their gradient is exactly 0."""
    return {
        f"layers.{i}.norm.weight"
        for i, plan in enumerate(config.layer_plans()[:-1])
        if plan.norm and plan.out_features // plan.groups == 1
    }


def check_case(seed: int, backend: str) -> list[str]:
    """What differs between ``backend`` and the reference in case ``seed`` (empty: nothing)."""
    rng = random.Random(seed)
    config = random_config(rng)
    options = dict(dedup=config.dropout == 0.0 and rng.random() < 0.3, sparse=rng.random() < 0.2)
    shape = rng.choice([(0,), (1,), (5,), (3, 7), (2, 1, 9), (64,)])
    torch.manual_seed(seed)
    reference = DeFINE.from_config(config, backend="reference", dtype=torch.float64, **options)
    fast = DeFINE.from_config(config, backend=backend, dtype=torch.float64, **options)
    fast.load_state_dict(reference.state_dict())
    ids = torch.randint(0, config.num_embeddings, shape)
    if config.padding_idx is not None and ids.numel():
        ids.view(-1)[0] = config.padding_idx % config.num_embeddings
    grad = torch.randn(*shape, config.embedding_dim, dtype=torch.float64)
    results = []
    for layer in (reference, fast):
        torch.manual_seed(seed + 1)  # the same dropout seeds for both
        out = layer(ids)
        out.backward(grad)
        results.append((out, dense_grads(layer)))
    (ref_out, ref_grads), (out, grads) = results
    reference.cache = "off"  # eval mode: the reference computes, the fast layer serves its [V, m] table
    with torch.no_grad():
        eval_outputs = [layer.eval()(ids) for layer in (reference, fast)]
    where = f"case {seed} ({backend}, ids {tuple(shape)}, {options}): {config}"
    problems = [f"output: {error}" for error in [_mismatch(out, ref_out)] if error]
    problems += [f"eval output from the table: {error}" for error in [_mismatch(*reversed(eval_outputs))] if error]
    if fast._cache_table is None:
        problems.append("eval mode built no table")
    zero = exact_zero_gradients(config)
    for name, ref_grad in ref_grads.items():
        ours = grads[name]
        if ours is None or ref_grad is None:  # no gradient on one side: the other's must be all zero
            if not all(g is None or not g.any() for g in (ours, ref_grad)):
                problems.append(f"{name}: a gradient on one side only")
            continue
        error = _mismatch(ours, torch.zeros_like(ref_grad) if name in zero else ref_grad)
        if error:
            problems.append(f"{name} gradient: {error}")
    return [f"{where}\n  {problem}" for problem in problems]


def dense_grads(layer: DeFINE) -> dict[str, torch.Tensor | None]:
    """Every parameter's gradient by name (None where it has none), a sparse one made dense."""
    grads = {name: p.grad for name, p in layer.named_parameters()}
    return {name: g.to_dense() if g is not None and g.is_sparse else g for name, g in grads.items()}


def _mismatch(ours: torch.Tensor, expected: torch.Tensor) -> str | None:
    if ours.shape != expected.shape:
        return f"shape {tuple(ours.shape)} != {tuple(expected.shape)}"
    if not ours.numel():
        return None
    error = (ours - expected).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    return None if error <= TOLERANCE * scale else f"max error {error:.3g} (scale {scale:.3g})"


@pytest.mark.skipif(not HAS_CPU_KERNELS, reason="compiled CPU kernels not loaded")
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_random_configurations_match_the_reference(backend):
    problems = [problem for seed in range(CASES[backend]) for problem in check_case(seed, backend)]
    assert not problems, "\n".join(problems[:10])


@pytest.mark.skipif(not HAS_CPU_KERNELS, reason="compiled CPU kernels not loaded")
def test_random_configurations_compile_fullgraph_and_match_eager():
    # torch.compile(fullgraph=True) of random layers (dropout off: compiled code draws its own
    # random numbers), CPU backend: outputs and gradients equal the eager ones.
    problems = []
    for seed in range(6):
        rng = random.Random(10_000 + seed)
        config = dataclasses.replace(random_config(rng), dropout=0.0)
        options = dict(dedup=rng.random() < 0.3, sparse=rng.random() < 0.3)
        ids = torch.randint(0, config.num_embeddings, rng.choice([(1,), (5,), (3, 7)]))
        torch.manual_seed(seed)
        layer = DeFINE.from_config(config, backend="cpu", dtype=torch.float64, **options)
        results = []
        torch._dynamo.reset()
        for module in (layer, torch.compile(layer, fullgraph=True)):
            layer.zero_grad(set_to_none=True)
            out = module(ids)
            out.pow(2).sum().backward()
            results.append((out, {name: g for name, g in dense_grads(layer).items() if g is not None}))
        (eager, eager_grads), (compiled, compiled_grads) = results
        where = f"case {10_000 + seed} ({options}, ids {tuple(ids.shape)}): {config}"
        problems += [f"{where}\n  output: {error}" for error in [_mismatch(compiled, eager)] if error]
        if eager_grads.keys() != compiled_grads.keys():
            problems.append(f"{where}\n  gradients of {sorted(eager_grads)} vs {sorted(compiled_grads)}")
        for name in eager_grads.keys() & compiled_grads.keys():
            error = _mismatch(compiled_grads[name], eager_grads[name])
            if error:
                problems.append(f"{where}\n  {name} gradient: {error}")
    assert not problems, "\n".join(problems)


def bad_id_outcome(seed: int) -> tuple[str, str]:
    """(what case ``seed`` is, what a layer did with one out-of-range id among good ones): a random
    configuration, backend, ``validate_ids`` mode, training or eval, bad value and position."""
    rng = random.Random(seed)
    config = random_config(rng)
    backend = rng.choice(["reference", *FAST_BACKENDS])
    mode = rng.choice([True, False, "deferred"])
    options = dict(dedup=rng.random() < 0.3, sparse=rng.random() < 0.2, validate_ids=mode)
    training = rng.random() < 0.5
    bad = rng.choice([config.num_embeddings, -1, -config.num_embeddings - 1, 2**40, -(2**40)])
    ids = torch.randint(
        0, config.num_embeddings, (rng.choice([1, 5, 20]),), generator=torch.Generator().manual_seed(seed)
    )
    position = rng.randrange(ids.numel())
    ids[position] = bad
    where = f"case {seed} ({backend}, validate_ids={mode!r}, {options}, training={training}, id {bad}): {config}"
    layer = DeFINE.from_config(config, backend=backend, dtype=torch.float64, **options).train(training)
    try:
        with torch.set_grad_enabled(training):
            out = layer(ids)
            if training:
                out.sum().backward()
        if mode == "deferred":
            layer.check_pending_ids()
    except define_ops.TokenIdError as error:
        return where, "TokenIdError" if str(bad) in str(error) else "TokenIdError without the id"
    except (IndexError, RuntimeError) as error:  # validate_ids=False: the lookup's own error
        return where, type(error).__name__
    others = torch.cat([out[:position], out[position + 1 :]])
    if not torch.isfinite(others).all():
        return where, "NaN in a good id's row"
    return where, "NaN row" if out[position].isnan().all() else "a finite row for the bad id"


def test_a_bad_id_never_gives_a_finite_row():
    # validate_ids=True: the error names the id. False or "deferred": an error, or the bad id's row
    # all NaN and every other row finite (the deferred check then names it).
    wrong = []
    for seed in range(150):
        where, outcome = bad_id_outcome(seed)
        allowed = {"TokenIdError"} if "validate_ids=True" in where else {"TokenIdError", "IndexError", "NaN row"}
        if outcome not in allowed:
            wrong.append(f"{where}\n  {outcome}")
    assert not wrong, "\n".join(wrong[:10])


def test_the_known_reference_error_is_real_and_the_exact_value_is_zero():
    # Why exact_zero_gradients exists: a one-feature group's γ gradient from PyTorch's layer_norm.
    z = torch.tensor([[[1234.5678]], [[-987.6]]], dtype=torch.float64)
    gamma = torch.ones(1, dtype=torch.float64, requires_grad=True)
    out = torch.nn.functional.layer_norm(z, (1,), gamma, torch.zeros(1, dtype=torch.float64), 1e-5)
    assert not out.any()  # x̂ = 0 exactly
    out.backward(torch.ones_like(out))
    assert gamma.grad.abs().item() > 1e-12  # ...but its γ gradient is not


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default=",".join(FAST_BACKENDS))
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--first-seed", type=int, default=0)
    args = parser.parse_args()
    backends = args.backends.split(",")
    start, seed, failures = time.perf_counter(), args.first_seed, 0
    while time.perf_counter() - start < args.seconds:
        for backend in backends:
            for problem in check_case(seed, backend):
                failures += 1
                print(problem, flush=True)
        seed += 1
    print(f"{seed - args.first_seed} cases on {backends}, {failures} mismatches")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
