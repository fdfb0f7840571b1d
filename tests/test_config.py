"""Layer plans, parameter and MAC counts against the worked plans in shared/docs/layer_plans.md."""

from __future__ import annotations

import math

import pytest

from define_ops.config import PRESETS, DeFINEConfig, cyclic_groups, halving_groups

# (preset) -> per (width_rule, group_schedule): (layers "in->out gG", reduce "in->out", HGT+reduce params, LN params)
PLANS = {
    ("paper", "halving"): {
        "lstm_wt103": ("256->512 g4, 768->768 g2, 1024->1024 g1", "1280->256", 1_706_496, 3_072),
        "lstm_wt103_n7": (
            "384->480 g8, 864->568 g4, 952->664 g2, 1048->752 g1, 1136->848 g1, 1232->936 g1, 1320->1024 g1",
            "1408->384",
            5_264_376,
            8_188,
        ),
        "txl_wt103": ("384->1624 g4, 2008->2864 g2, 3248->4096 g1", "4480->384", 18_064_456, 11_868),
        "awd_ptb": (
            "128->256 g8, 384->384 g4, 512->512 g2, 640->640 g1, 768->768 g1, 896->896 g1, 1024->1024 g1",
            "1152->400",
            3_488_528,
            7_424,
        ),
        "nmt_wmt14": ("128->432 g4, 560->728 g2, 856->1024 g1", "1152->512", 1_686_728, 2_992),
    },
    ("paper", "cyclic"): {
        "lstm_wt103": ("256->512 g4, 768->768 g2, 1024->1024 g1", "1280->256", 1_706_496, 3_072),
        "lstm_wt103_n7": (
            "384->480 g4, 864->568 g2, 952->664 g1, 1048->752 g8, 1136->848 g4, 1232->936 g2, 1320->1024 g1",
            "1408->384",
            3_737_512,
            5_732,
        ),
        "txl_wt103": ("384->1624 g4, 2008->2864 g2, 3248->4096 g1", "4480->384", 18_064_456, 11_868),
        "awd_ptb": (
            "128->256 g4, 384->384 g2, 512->512 g1, 640->640 g8, 768->768 g4, 896->896 g2, 1024->1024 g1",
            "1152->400",
            2_458_384,
            5_024,
        ),
        "nmt_wmt14": ("128->432 g4, 560->728 g2, 856->1024 g1", "1152->512", 1_686_728, 2_992),
    },
    ("linspace", "halving"): {
        "lstm_wt103": ("256->640 g4, 896->1024 g2, 1280->1024 g1", "1280->256", 2_141_056, 3_392),
        "lstm_wt103_n7": (
            "384->496 g8, 880->600 g4, 984->704 g2, 1088->816 g1, 1200->920 g1, 1304->1024 g1, 1408->1024 g1",
            "1408->384",
            5_817_712,
            8_696,
        ),
        "txl_wt103": ("384->2240 g4, 2624->4096 g2, 4480->4096 g1", "4480->384", 25_670_208, 13_408),
        "awd_ptb": (
            "128->280 g8, 408->432 g4, 560->576 g2, 704->728 g1, 856->880 g1, 1008->1024 g1, 1152->1024 g1",
            "1152->400",
            4_153_600,
            8_174,
        ),
        "nmt_wmt14": ("128->576 g4, 704->1024 g2, 1152->1024 g1", "1152->512", 2_151_488, 3_360),
    },
    ("linspace", "cyclic"): {
        "lstm_wt103": ("256->640 g4, 896->1024 g2, 1280->1024 g1", "1280->256", 2_141_056, 3_392),
        "lstm_wt103_n7": (
            "384->496 g4, 880->600 g2, 984->704 g1, 1088->816 g8, 1200->920 g4, 1304->1024 g2, 1408->1024 g1",
            "1408->384",
            4_047_408,
            5_992,
        ),
        "txl_wt103": ("384->2240 g4, 2624->4096 g2, 4480->4096 g1", "4480->384", 25_670_208, 13_408),
        "awd_ptb": (
            "128->280 g4, 408->432 g2, 560->576 g1, 704->728 g8, 856->880 g4, 1008->1024 g2, 1152->1024 g1",
            "1152->400",
            2_833_920,
            5_418,
        ),
        "nmt_wmt14": ("128->576 g4, 704->1024 g2, 1152->1024 g1", "1152->512", 2_151_488, 3_360),
    },
}
CASES = [(rule, sched, name) for (rule, sched), presets in PLANS.items() for name in presets]


@pytest.mark.parametrize("width_rule,group_schedule,preset", CASES)
def test_layer_plans_match_worked_examples(width_rule, group_schedule, preset):
    layers, reduce, params, ln_params = PLANS[(width_rule, group_schedule)][preset]
    config = DeFINEConfig.from_preset(preset, width_rule=width_rule, group_schedule=group_schedule)
    plans = config.layer_plans()
    assert ", ".join(f"{p.in_features}->{p.out_features} g{p.groups}" for p in plans[:-1]) == layers
    assert f"{plans[-1].in_features}->{plans[-1].out_features}" == reduce
    assert config.num_parameters(include_embedding=False, include_norm=False) == params
    assert sum(p.num_norm for p in plans) == ln_params
    assert config.num_parameters() == params + ln_params + config.num_embeddings * config.input_dim
    assert config.macs_per_token() == sum(p.in_features * p.out_features // p.groups for p in plans)


def test_group_schedules():
    assert halving_groups(7, 8) == [8, 4, 2, 1, 1, 1, 1]
    assert cyclic_groups(3, 4) == [4, 2, 1]
    assert cyclic_groups(7, 8) == [4, 2, 1, 8, 4, 2, 1]
    assert cyclic_groups(7, 16) == [2, 1, 16, 8, 4, 2, 1]
    assert cyclic_groups(4, 8) == [8, 4, 2, 1]


def test_skip_variants_change_widths_and_layouts():
    mix = DeFINEConfig(100, 64, input_dim=64, max_dim=256, depth=3, max_groups=4)
    concat = mix.replace(skip="concat")
    plain = mix.replace(skip="none", skip_into_reduce=False)
    assert [p.in_features for p in mix.layer_plans()] == [p.in_features for p in concat.layer_plans()]
    assert [p.e_out_chunks for p in mix.layer_plans()] == [2, 1, 1, 0]
    assert [p.e_out_chunks for p in concat.layer_plans()] == [1, 1, 1, 0]
    assert [p.in_features for p in plain.layer_plans()] == [64, 128, 192, 256]
    assert [p.e_in_chunks for p in plain.layer_plans()] == [1, 0, 0, 0]
    no_reduce_skip = mix.replace(skip_into_reduce=False)
    assert no_reduce_skip.layer_plans()[-1].in_features == 256


def test_paper_literal_preset_has_nothing_the_paper_does_not_name():
    cfg = PRESETS["paper_literal"]
    assert cfg.norm is None and cfg.activation is None and cfg.dropout == 0.0


def test_shuffle_only_on_grouped_layers():
    cfg = DeFINEConfig(100, 64, input_dim=64, max_dim=256, depth=3, max_groups=4, shuffle=True)
    assert [p.shuffle for p in cfg.layer_plans()] == [True, True, False, False]


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(depth=0), "depth"),
        (dict(max_dim=64, input_dim=128), "max_dim"),
        (dict(input_dim=100, max_groups=8), "max_groups"),
        (dict(depth=1, max_dim=1002), "max_dim"),
        (dict(group_schedule="triangle"), "group_schedule"),
        (dict(width_rule="log"), "width_rule"),
        (dict(skip="residual"), "skip"),
        (dict(norm="batch"), "norm"),
        (dict(activation="tanh"), "activation"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(skip="none"), "skip_into_reduce"),
        (dict(padding_idx=1000), "padding_idx"),
        (dict(max_groups=0), "max_groups"),
        (dict(embedding_dim=0), "embedding_dim"),
        (dict(group_width_multiple=0), "group_width_multiple"),
        # flags: a string such as "no" would otherwise read as True
        (dict(bias="no"), "bias='no'"),
        (dict(skip_into_reduce=None), "skip_into_reduce=None"),
        (dict(shuffle=2), "shuffle=2"),
        (dict(scale_embedding="x"), "scale_embedding='x'"),
        (dict(norm_eps="x"), "norm_eps='x'"),
        (dict(norm_eps=math.inf), "norm_eps=inf"),
        (dict(norm_eps=0.0), "norm_eps=0.0"),
        (dict(dropout=math.nan), "dropout=nan"),
        (dict(map="adaptive", cutoffs=5), "cutoffs=5"),
        (dict(map="adaptive", cutoffs=(100.5,)), r"cutoffs=\(100.5,\)"),
        (dict(map="adaptive", cutoffs=("a",)), "cutoffs"),
        (dict(map="adaptive", cutoffs=(100,), adaptive_factor=0), "adaptive_factor=0 is invalid: must be >= 1"),
        (dict(map="adaptive", cutoffs=(100,), adaptive_factor=-2), "adaptive_factor=-2 is invalid: must be >= 1"),
        (dict(adaptive_factor=3), "adaptive_factor only applies with map='adaptive'"),
    ],
)
def test_impossible_configs_name_the_field(kwargs, field):
    base = dict(num_embeddings=1000, embedding_dim=64, input_dim=128, max_dim=1024, depth=3, max_groups=4)
    base.update(kwargs)
    with pytest.raises(ValueError, match=field):
        DeFINEConfig(**base)


def test_non_integer_dims_are_type_errors():
    with pytest.raises(TypeError, match="input_dim"):
        DeFINEConfig(100, 64, input_dim=64.0)
    with pytest.raises(TypeError, match="group_width_multiple"):
        DeFINEConfig(100, 64, group_width_multiple=True)


@pytest.mark.parametrize("preset", ["lstm_wt103", "lstm_wt103_n7", "txl_wt103", "awd_ptb", "nmt_wmt14"])
@pytest.mark.parametrize("schedule", ["halving", "cyclic"])
def test_group_width_multiple_puts_every_group_on_its_multiple(preset, schedule):
    # group_width_multiple=8: every group of every layer's input and output is a multiple of 8
    # features (16 bytes in bf16), the layers only as much wider as that takes.
    paper = PRESETS[preset].replace(group_schedule=schedule)
    aligned = paper.replace(group_width_multiple=8)
    assert paper.replace(group_width_multiple=1).layer_plans() == paper.layer_plans()
    groups = aligned.groups()
    for layer, (wide, narrow) in enumerate(zip(aligned.widths(), paper.widths(), strict=True)):
        unit = 8 * max(groups[layer], groups[min(layer + 1, len(groups) - 1)])
        assert narrow <= wide < narrow + unit
    for plan in aligned.layer_plans():
        assert (plan.in_features // plan.groups) % 8 == 0 and (plan.out_features // plan.groups) % 8 == 0, plan
    assert 1.0 <= aligned.num_parameters() / paper.num_parameters() < 1.01
    if preset in ("txl_wt103", "nmt_wmt14", "lstm_wt103_n7") and schedule == "halving":  # the unaligned presets
        assert aligned.widths() != paper.widths()
        assert "group widths ×8" in aligned.describe()


def test_integer_like_cutoffs_are_accepted():
    numpy = pytest.importorskip("numpy")
    cfg = DeFINEConfig(1000, 64, input_dim=128, map="adaptive", cutoffs=[numpy.int64(100), 500])
    assert cfg.cutoffs == (100, 500) and all(type(c) is int for c in cfg.cutoffs)


def test_negative_padding_idx_is_normalised():
    assert DeFINEConfig(100, 64, input_dim=64, max_dim=128, padding_idx=-1).padding_idx == 99


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown DeFINE preset"):
        DeFINEConfig.from_preset("gpt5")
