"""validate_ids="deferred": the id range check without a host synchronisation.

The check runs behind the call: a bad id gets a NaN row (the Triton/CUDA lookups, the adaptive
Map) and the IndexError comes from the next call or check_pending_ids(). On the CPU the Triton
backend (interpreted) and the adaptive Map exercise the same code as CUDA, without the event.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import define_ops
from define_ops import DeFINE

from .conftest import HAS_CPU_KERNELS, max_err

V = 30
NAN_ROW_CASES = [("triton", {})] if "triton" in define_ops.available_backends("cpu") else []
NAN_ROW_CASES.append(("reference", {"map": "adaptive", "cutoffs": (10, 20), "adaptive_factor": 2}))


def make(backend: str, validate_ids, **kwargs) -> DeFINE:
    torch.manual_seed(0)
    return DeFINE(V, 12, input_dim=16, max_dim=32, depth=2, backend=backend, validate_ids=validate_ids, **kwargs)


@pytest.mark.parametrize("backend,options", NAN_ROW_CASES)
@pytest.mark.parametrize("bad", [V, V + 7, -1, -4])
def test_bad_id_gives_nan_rows_now_and_an_error_at_the_next_call(backend, options, bad):
    layer = make(backend, "deferred", **options)
    ids = torch.tensor([[1, 2], [bad, 4], [5, bad]])
    out = layer(ids)  # no error yet: the verdict is in flight
    nan_rows = out.isnan().all(-1)
    assert nan_rows.tolist() == [[False, False], [True, False], [False, True]]
    assert torch.isfinite(out[~nan_rows]).all()
    expected = rf"token id {bad} is out of range for num_embeddings={V}.*deferred"
    with pytest.raises(define_ops.TokenIdError, match=expected):
        layer(torch.tensor([1, 2]))
    out = layer(torch.tensor([1, 2]))  # reported once; the queue starts afresh
    layer.check_pending_ids()
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend,options", NAN_ROW_CASES)
@pytest.mark.parametrize("validate_ids", [False, "deferred"])
def test_relu_and_dropout_keep_a_bad_ids_row_nan(backend, options, validate_ids):
    # No skip into the Reduce: only the HGT layers carry the NaN there. ReLU and dropout used to
    # turn it into zeros (ReLU of NaN, a dropped NaN) on the Triton/CUDA kernels: a finite wrong row.
    layer = make(backend, validate_ids, activation="relu", dropout=0.5, skip="none", skip_into_reduce=False, **options)
    out = layer.train()(torch.tensor([[1, V, 2, -1], [3, 4, 5, 6]]))
    assert out.isnan().all(-1).tolist() == [[False, True, False, True], [False] * 4]
    assert torch.isfinite(out[:, [0, 2]]).all() and torch.isfinite(out[1]).all()
    if validate_ids == "deferred":
        with pytest.raises(define_ops.TokenIdError):
            layer.check_pending_ids()


@pytest.mark.parametrize("backend,options", NAN_ROW_CASES)
def test_check_pending_ids_raises_at_once_and_the_module_helper_finds_nested_layers(backend, options):
    layer = make(backend, "deferred", **options)
    model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.ModuleList([layer]))
    layer(torch.tensor([3, V]))
    with pytest.raises(IndexError, match=f"token id {V}"):
        define_ops.check_pending_ids(model)
    define_ops.check_pending_ids(model)  # nothing left


@pytest.mark.parametrize("backend,options", NAN_ROW_CASES)
def test_valid_ids_give_the_checked_result_and_the_queue_stays_short(backend, options):
    checked, deferred = make(backend, True, **options), make(backend, "deferred", **options)
    ids = torch.randint(0, V, (4, 5))
    for _ in range(3 * 16):
        deferred(ids)
        assert len(deferred._pending_id_checks) <= 16
    assert torch.equal(deferred(ids), checked(ids))
    deferred.check_pending_ids()
    assert len(deferred._pending_id_checks) == 0
    deferred(torch.empty(0, dtype=torch.int64))  # empty: nothing queued, nothing raised
    assert len(deferred._pending_id_checks) == 0


@pytest.mark.parametrize("backend,options", NAN_ROW_CASES)
def test_eval_table_serves_unchecked_ids_as_nan_rows(backend, options):
    # On the Triton and CUDA backends the eval-mode table is read by the backend's lookup op for
    # unchecked ids (F.embedding asserts on the device on CUDA); the reference backend's table path
    # is F.embedding, so "deferred" checks before the call there.
    for mode in ("deferred", False):
        layer = make(backend, mode, **options).eval()
        with torch.no_grad():
            good = layer(torch.tensor([1, 2, 3]))
            assert layer._cache_table is not None
            if backend == "reference":
                with pytest.raises(IndexError, match=f"token id {V} at flat position 1" if mode else "out of range"):
                    layer(torch.tensor([1, V, 3]))
                continue
            out = layer(torch.tensor([1, V, 3]))
        assert out[1].isnan().all() and max_err(out[[0, 2]], good[[0, 2]]) == 0
        if mode == "deferred":
            with pytest.raises(IndexError, match=f"token id {V}"):
                layer.check_pending_ids()


@pytest.mark.skipif(not HAS_CPU_KERNELS, reason="compiled CPU kernels not loaded")
def test_paths_without_nan_rows_check_before_the_call():
    # The CPU backend's table lookup and sparse=True (F.embedding) cannot take a bad id: "deferred"
    # checks them as True does, with the position.
    for kwargs in ({}, {"sparse": True}):
        layer = make("cpu", "deferred", **kwargs)
        with pytest.raises(define_ops.TokenIdError, match=f"token id {V} at flat position 1"):  # an IndexError
            layer(torch.tensor([0, V]))
        assert len(layer._pending_id_checks) == 0


@pytest.mark.parametrize("backend,options", NAN_ROW_CASES)
def test_pending_checks_stay_behind_in_copies(backend, options):
    layer = make(backend, "deferred", **options)
    layer(torch.tensor([V]))
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert len(twin._pending_id_checks) == 0
        twin.check_pending_ids()
    with pytest.raises(IndexError):
        layer.check_pending_ids()


def test_validate_ids_option_is_validated():
    for value in ("later", 1, None, "True"):
        with pytest.raises(ValueError, match=f"validate_ids={value!r} is invalid; choose True, False or 'deferred'"):
            DeFINE(V, 12, input_dim=16, max_dim=32, validate_ids=value)
    assert "validate_ids='deferred'" in repr(DeFINE(V, 12, input_dim=16, max_dim=32, validate_ids="deferred"))


def test_a_check_no_call_read_is_reported_at_exit():
    # A script whose last call met a bad id (its rows NaN) exits: the id is still named, on stderr.
    import subprocess
    import sys
    from pathlib import Path

    script = f"""
import torch, define_ops
layer = define_ops.DeFINE({V}, 12, input_dim=16, max_dim=32, depth=2, backend="reference", map="adaptive",
                          cutoffs=(10, 20), adaptive_factor=2, validate_ids="deferred")
print(bool(layer(torch.tensor([3, {V + 5}])).isnan().any()))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr[-2000:]
    assert f"define_ops: at exit, a deferred id check that no call read: DeFINE: token id {V + 5}" in done.stderr
