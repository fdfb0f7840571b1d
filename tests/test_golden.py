"""Golden outputs: the function a DeFINE layer computes from its state_dict, pinned across releases.

Every backend is tested against the reference, so a change to the reference itself (the order of
the split-mix chunks, the shuffle, the √n scale, where the norm sits, the Philox counter layout)
would pass every other test while a checkpoint saved before it computed a different function after
it. Here the parameters are filled by a formula of their state_dict position and shape alone (no
RNG, so no torch release can move them), and the eval-mode outputs for fixed ids, the
training-mode outputs for fixed dropout seeds, and the state_dict's names and shapes are compared
with ``tests/golden/define_ops_v1.json``, written by define_ops 0.1.0 with the reference backend in
float64. Every backend that runs here must reproduce it to 1e-10 (relative to the largest value).

Rewriting the file is a breaking change for users' checkpoints: do it only on purpose, say so in
the README, and bump the file's version:

    python -m tests.test_golden --write
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("TRITON_INTERPRET", "1")  # run as a script too: the interpreter, chosen before triton loads

import pytest  # noqa: E402
import torch  # noqa: E402

import define_ops  # noqa: E402
from define_ops import DeFINE, DeFINEConfig  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "golden" / "define_ops_v1.json"
TOLERANCE = 1e-10

# Small configurations that between them take a non-default value of every configuration field
# (every activation, skip, schedule and width rule; the adaptive Map), and three of the paper's
# presets at their real widths (a small vocabulary keeps the table small).
CASES: dict[str, dict[str, Any]] = {
    "defaults_padding": dict(num_embeddings=17, embedding_dim=12, input_dim=8, max_dim=24, depth=3, max_groups=4,
                             padding_idx=2, dropout=0.1),
    "shuffle_relu_concat": dict(num_embeddings=17, embedding_dim=10, input_dim=8, max_dim=32, depth=4, max_groups=4,
                                shuffle=True, activation="relu", skip="concat", skip_into_reduce=False, bias=False,
                                dropout=0.5),
    "cyclic_linspace_swish_nonorm": dict(num_embeddings=17, embedding_dim=9, input_dim=6, max_dim=24, depth=3,
                                         max_groups=2, group_schedule="cyclic", width_rule="linspace",
                                         activation="swish", norm=None, scale_embedding=False,
                                         group_width_multiple=4, skip="none", skip_into_reduce=False),
    "adaptive_map": dict(num_embeddings=40, embedding_dim=12, input_dim=16, max_dim=32, depth=2, max_groups=2,
                         map="adaptive", cutoffs=[10, 25], adaptive_factor=2, padding_idx=0, dropout=0.1,
                         norm_eps=1e-3),
    "preset_awd_ptb": dict(preset="awd_ptb", num_embeddings=20, dropout=0.0),
    "preset_nmt_wmt14": dict(preset="nmt_wmt14", num_embeddings=20, dropout=0.0),
    # Equation 1 of the paper alone (lstm_wt103's widths; no norm, no activation, no dropout).
    "preset_paper_literal": dict(preset="paper_literal", num_embeddings=20),
}  # fmt: skip


def build(case: dict[str, Any], backend: str = "reference") -> DeFINE:
    """The case's layer in float64, every parameter filled by ``fill`` (state_dict order)."""
    kwargs = dict(case)
    preset = kwargs.pop("preset", None)
    config = DeFINEConfig.from_preset(preset, **kwargs) if preset else DeFINEConfig(**kwargs)
    layer = DeFINE.from_config(config, backend=backend, dtype=torch.float64, cache="off")
    with torch.no_grad():
        for position, (name, tensor) in enumerate(layer.state_dict().items()):
            tensor.copy_(fill(name, tuple(tensor.shape), position))
    return layer


def fill(name: str, shape: tuple[int, ...], position: int) -> torch.Tensor:
    """Deterministic values of a unit-ish scale: sin of the element index, phase-shifted by the
    tensor's position; weights scaled by 1/√fan-in, norm gains around 1."""
    count = math.prod(shape)
    wave = torch.sin(torch.arange(count, dtype=torch.float64) * 0.7 + 1.3 * position + 0.1).reshape(shape)
    if name.endswith("norm.weight"):
        return 1.0 + 0.5 * wave
    if len(shape) == 1:
        return 0.5 * wave
    fan_in = shape[-2] if len(shape) == 3 else shape[-1]
    return wave / math.sqrt(fan_in)


def case_ids(layer: DeFINE) -> torch.Tensor:
    """[2, 4] ids: the first and last id, a repeated id, and the padding id where there is one."""
    v = layer.num_embeddings
    pad = layer.padding_idx if layer.padding_idx is not None else 1
    return torch.tensor([[0, v - 1, 3, 3], [pad, 7, v // 2, 1]], dtype=torch.int64)


def dropout_seeds(layer: DeFINE) -> torch.Tensor:
    return torch.tensor([(977 * (i + 1)) % 2**31 + 2**40 * i for i in range(layer.config.depth)], dtype=torch.int64)


def outputs(layer: DeFINE) -> dict[str, torch.Tensor]:
    """Eval-mode output, and the training-mode output with fixed dropout seeds where dropout is on."""
    ids = case_ids(layer).to(layer.device)
    with torch.no_grad():
        result = {"eval": layer.eval()(ids)}
        if layer.config.dropout > 0:
            layer.train()
            seeds = dropout_seeds(layer).to(layer.device)
            layer._dropout_seeds = lambda: seeds  # the draw from torch's generator, pinned
            try:
                result["train"] = layer(ids)
            finally:
                del layer._dropout_seeds
    return result


def write() -> None:
    golden: dict[str, Any] = {"version": 1, "written_by": f"define_ops {define_ops.__version__}", "cases": {}}
    for name, case in CASES.items():
        layer = build(case)
        golden["cases"][name] = {
            "case": case,
            "state_dict": {key: list(t.shape) for key, t in layer.state_dict().items()},
            "ids": case_ids(layer).tolist(),
            "outputs": {mode: out.tolist() for mode, out in outputs(layer).items()},
        }
    # One line per case: the file stays readable as data, and a diff names the case that changed.
    cases = [f"  {json.dumps(name)}: {json.dumps(entry)}" for name, entry in golden.pop("cases").items()]
    head = json.dumps(golden)[:-1]
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(head + ', "cases": {\n' + ",\n".join(cases) + "\n}}\n")
    print(f"wrote {GOLDEN}")


@functools.cache
def _golden() -> dict[str, Any]:
    """The golden file, read and parsed once per process (every test here reads it)."""
    return json.loads(GOLDEN.read_text())


def _targets() -> list[tuple[str, str]]:
    """(backend, device) pairs that run here: every backend on the CPU, and on a GPU those there."""
    targets = [(backend, "cpu") for backend in define_ops.available_backends("cpu")]
    if torch.cuda.is_available():
        targets += [(backend, "cuda") for backend in define_ops.available_backends("cuda") if backend != "reference"]
    return targets


def test_the_golden_file_covers_every_case():
    assert set(_golden()["cases"]) == set(CASES)
    for name, entry in _golden()["cases"].items():
        assert entry["case"] == json.loads(json.dumps(CASES[name])), name


@pytest.mark.parametrize("name", list(CASES))
def test_state_dict_names_and_shapes_are_unchanged(name):
    entry = _golden()["cases"][name]
    layer = build(CASES[name])
    assert {k: list(t.shape) for k, t in layer.state_dict().items()} == entry["state_dict"]
    assert list(layer.state_dict()) == list(entry["state_dict"]), "state_dict order (the fill depends on it)"


@pytest.mark.parametrize(("backend", "device"), _targets())
@pytest.mark.parametrize("name", list(CASES))
def test_outputs_match_the_golden_file(name, backend, device):
    entry = _golden()["cases"][name]
    layer = build(CASES[name], backend).to(device)
    assert case_ids(layer).tolist() == entry["ids"]
    results = outputs(layer)
    assert set(results) == set(entry["outputs"]), "modes"
    for mode, out in results.items():
        expected = torch.tensor(entry["outputs"][mode], dtype=torch.float64)
        assert out.shape == expected.shape, (mode, tuple(out.shape))
        scale = max(1.0, expected.abs().max().item())
        error = (out.cpu() - expected).abs().max().item()
        assert error <= TOLERANCE * scale, f"{name} {backend} on {device} {mode}: max error {error:.3e}"


def test_the_golden_values_are_not_degenerate():
    """Rows differ from each other, the padding row is zero and the others are not: a fill or a
    layer that made everything equal (or zero) would pin nothing."""
    for name, entry in _golden()["cases"].items():
        evaluated = torch.tensor(entry["outputs"]["eval"], dtype=torch.float64)
        out = evaluated.reshape(-1, evaluated.shape[-1])  # [8, m]
        ids = torch.tensor(entry["ids"]).reshape(-1)
        pad = CASES[name].get("padding_idx")
        real = ids != pad if pad is not None else torch.ones_like(ids, dtype=torch.bool)
        assert (out[real].abs().amax(dim=1) > 1e-3).all(), name
        distinct_rows = torch.unique(out[real].round(decimals=6), dim=0).shape[0]
        assert distinct_rows == torch.unique(ids[real]).numel(), name
        assert (out[~real] == 0).all(), name
        if "train" in entry["outputs"]:
            assert not torch.equal(torch.tensor(entry["outputs"]["train"], dtype=torch.float64), evaluated), name


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="rewrite the golden file from the reference backend")
    if parser.parse_args().write:
        write()
