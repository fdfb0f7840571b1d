"""The reference itself: formulas of the paper, Philox known answers, and the op-level chain."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from define_ops import DeFINE, DeFINEConfig, reference

# Known-answer vectors of Philox4x32-10 from the Random123 distribution (kat_vectors).
PHILOX_KAT = [
    ((0, 0), (0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF,) * 4, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0xA4093822, 0x299F31D0),
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("key,counter,expected", PHILOX_KAT)
def test_philox_known_answers(key, counter, expected):
    seed = key[0] | (key[1] << 32)
    words = reference.philox4x32(seed, *(torch.tensor([c]) for c in counter))
    assert tuple(w.item() for w in words) == expected


def test_dropout_mask_rate_and_seed_dependence():
    p = 0.3
    mask = reference.dropout_keep_mask(7, 200, 301, p)
    assert mask.shape == (200, 301)
    assert abs((~mask).float().mean().item() - p) < 0.01
    assert torch.equal(mask, reference.dropout_keep_mask(7, 200, 301, p))
    assert not torch.equal(mask, reference.dropout_keep_mask(8, 200, 301, p))
    # Rows and features are independent streams: the first rows do not depend on how many follow.
    assert torch.equal(mask[:10, :17], reference.dropout_keep_mask(7, 10, 17, p))
    assert reference.dropout_keep_mask(7, 5, 5, 0.0).all()


def test_feature_shuffle_formula():
    tokens, groups, width = 3, 4, 12
    s = width // groups
    y = torch.arange(tokens * width, dtype=torch.float64).reshape(tokens, width)
    z = reference.feature_shuffle_ref(y, groups)
    for t in range(s):
        for i in range(groups):
            assert torch.equal(z[:, t * groups + i], y[:, i * s + t])


def test_split_mix_layout():
    e = torch.arange(6.0).reshape(1, 6)  # n = 6
    h = 100 + torch.arange(9.0).reshape(1, 9)  # b = 9
    mixed = reference.split_mix_ref(e, h, 3)
    assert mixed.tolist() == [[0, 1, 100, 101, 102, 2, 3, 103, 104, 105, 4, 5, 106, 107, 108]]
    assert reference.split_mix_ref(e, h, 1).tolist() == [e.tolist()[0] + h.tolist()[0]]
    assert torch.equal(reference.extract_e_ref(mixed, 6, 3), e)


def test_grouped_linear_with_one_group_is_linear():
    x = torch.randn(5, 12, dtype=torch.float64)
    w = torch.randn(1, 12, 7, dtype=torch.float64)
    b = torch.randn(7, dtype=torch.float64)
    torch.testing.assert_close(reference.grouped_linear_ref(x, w, b), F.linear(x, w[0].t(), b))


def test_grouped_linear_is_block_diagonal():
    g, a_g, b_g = 3, 4, 5
    x = torch.randn(6, g * a_g, dtype=torch.float64)
    w = torch.randn(g, a_g, b_g, dtype=torch.float64)
    dense = torch.block_diag(*w)  # [a, b]
    torch.testing.assert_close(reference.grouped_linear_ref(x, w), x @ dense)


def test_fixed_groups_without_skip_is_a_glt_stack():
    """HGT with g_l = g for every layer and no skip is a plain GLT stack: layer outputs of group
    j depend only on input group j."""
    cfg = DeFINEConfig(50, 16, input_dim=16, max_dim=64, depth=3, max_groups=1, skip="none", skip_into_reduce=False)
    assert [p.groups for p in cfg.layer_plans()] == [1, 1, 1, 1]
    layer = DeFINE.from_config(cfg, backend="reference", dtype=torch.float64)
    ids = torch.arange(10)
    out = layer(ids)
    h = layer.weight[ids] * math.sqrt(16)
    for hgt in layer.layers:
        h = reference.grouped_linear_ref(h, hgt.weight, hgt.bias)
        h = F.gelu(F.layer_norm(h, h.shape[-1:], hgt.norm.weight, hgt.norm.bias))
    torch.testing.assert_close(out, F.linear(h, layer.reduce.weight, layer.reduce.bias))


@pytest.mark.parametrize("skip", ["mix", "concat", "none"])
@pytest.mark.parametrize("shuffle", [False, True])
def test_op_chain_equals_paper_style_unit(skip, shuffle):
    """A chain of hgt_step_ref calls (e carried through each layer's output) equals the
    paper-style unit that rebuilds mix(e, h) with torch.cat before every layer."""
    cfg = DeFINEConfig(
        40, 24, input_dim=16, max_dim=64, depth=3, max_groups=4, skip=skip, skip_into_reduce=skip != "none",
        shuffle=shuffle, dropout=0.2,
    )  # fmt: skip
    layer = DeFINE.from_config(cfg, backend="reference", dtype=torch.float64).train()
    ids = torch.randint(0, 40, (3, 5))
    seeds = torch.tensor([11, 12, 13])
    expected = reference.define_forward_ref(
        ids, layer.weight, layer._layer_params(), layer.reduce.weight, layer.reduce.bias, cfg, training=True,
        seeds=seeds,
    )  # fmt: skip
    x = reference.lookup_ref(layer.weight, ids.reshape(-1), None, math.sqrt(16))
    for plan, (w, b, nw, nb), seed in zip(cfg.layer_plans()[:-1], layer._layer_params(), seeds, strict=True):
        x = reference.hgt_step_ref(
            x, w, b, nw, nb, seed, e_width=16, e_in_chunks=plan.e_in_chunks, e_out_chunks=plan.e_out_chunks,
            shuffle=plan.shuffle, activation=plan.activation, dropout_p=plan.dropout,
        )  # fmt: skip
    out = F.linear(x, layer.reduce.weight, layer.reduce.bias).reshape(3, 5, 24)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
