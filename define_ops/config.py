"""Configuration of one DeFINE unit and the layer plan derived from it.

Everything the kernels need to know about a layer (widths, groups, where the map vector ``e``
sits inside the layer's input and output) is computed here once, from the rules of the paper
(define_paper.md §3.3–3.5) or of the authors' code, so the backends never re-derive it.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, fields, replace
from fractions import Fraction
from typing import Any, Literal

GroupSchedule = Literal["halving", "cyclic"]
WidthRule = Literal["paper", "linspace"]
Skip = Literal["mix", "concat", "none"]
MapKind = Literal["table", "adaptive"]
Norm = Literal["layer"] | None
Activation = Literal["gelu", "relu", "swish"] | None

GROUP_SCHEDULES = ("halving", "cyclic")
WIDTH_RULES = ("paper", "linspace")
SKIPS = ("mix", "concat", "none")
NORMS = ("layer", None)
ACTIVATIONS = ("gelu", "relu", "swish", None)
MAPS = ("table", "adaptive")


@dataclass(frozen=True)
class LayerPlan:
    """One grouped linear layer of the unit (the Reduce layer is a 1-group plan).

    ``e_in_chunks`` / ``e_out_chunks`` say how the map vector ``e`` (width ``e_width``) is laid out
    inside this layer's input and output: 0 means absent, c >= 1 means the tensor is
    ``mix(e, h, c)``: c chunks, chunk j = [e_j ‖ h_j] (c = 1 is the plain concat [e ‖ h]).
    """

    in_features: int
    out_features: int
    groups: int
    e_width: int
    e_in_chunks: int
    e_out_chunks: int
    norm: bool
    activation: str | None
    dropout: float
    shuffle: bool
    bias: bool

    @property
    def out_width(self) -> int:
        """Width of the tensor this layer writes (h, plus e when it carries the skip)."""
        return self.out_features + (self.e_width if self.e_out_chunks else 0)

    @property
    def weight_shape(self) -> tuple[int, int, int]:
        g = self.groups
        return (g, self.in_features // g, self.out_features // g)

    @property
    def num_weights(self) -> int:
        return self.in_features * self.out_features // self.groups

    @property
    def num_bias(self) -> int:
        return self.out_features if self.bias else 0

    @property
    def num_norm(self) -> int:
        return 2 * (self.out_features // self.groups) if self.norm else 0

    @property
    def macs(self) -> int:
        """Multiply-accumulates per token of the grouped GEMM (define_paper.md §4.1)."""
        return self.num_weights


def _round_up(value: Fraction | int, multiple: int) -> int:
    return math.ceil(Fraction(value) / multiple) * multiple


def halving_groups(depth: int, max_groups: int) -> list[int]:
    """Paper Eq. 1: g_l = max(g_max // 2^(l-1), 1) for l = 1..N."""
    return [max(max_groups // 2**layer, 1) for layer in range(depth)]


def cyclic_groups(depth: int, max_groups: int) -> list[int]:
    """The authors' code: powers of two counted up to g_max, restarting at 1, list reversed."""
    groups, power = [], 1
    for _ in range(depth):
        if power > max_groups:
            power = 1
        groups.append(power)
        power *= 2
    return groups[::-1]


def paper_widths(input_dim: int, max_dim: int, depth: int) -> list[Fraction]:
    """k_l = n + l·(k−n)/N for l = 1..N (exact; rounding happens later)."""
    return [input_dim + Fraction(layer * (max_dim - input_dim), depth) for layer in range(1, depth + 1)]


def linspace_widths(input_dim: int, max_dim: int, depth: int) -> list[Fraction]:
    """The authors' code: int(linspace(n, k, N))[1:] for the first N−1 layers, then k.

    Computed with exact rationals and truncated, as ``astype(int)`` intends.
    """
    if depth == 1:
        return [Fraction(max_dim)]
    step = Fraction(max_dim - input_dim, depth - 1)
    return [Fraction(math.floor(input_dim + i * step)) for i in range(1, depth)] + [Fraction(max_dim)]


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _bad(field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"DeFINE config: {field}={value!r} is invalid: {why}")


@dataclass(frozen=True)
class DeFINEConfig:
    """Full description of one DeFINE unit: Map (lookup) → HGT (``depth`` grouped layers) → Reduce.

    Field names follow the paper's symbols: V = ``num_embeddings``, n = ``input_dim``,
    k = ``max_dim``, m = ``embedding_dim``, N = ``depth``, g_max = ``max_groups``.
    """

    num_embeddings: int
    embedding_dim: int
    input_dim: int = 128
    max_dim: int = 1024
    depth: int = 3
    max_groups: int = 4
    group_schedule: GroupSchedule = "halving"
    width_rule: WidthRule = "paper"
    # 1: the layer widths as the plans of the paper's rule round them. m > 1: every layer width
    # rounded up so that each group's share of it is a multiple of m features (8 puts every group of
    # a bf16/fp16 activation on a 16-byte boundary, which tensor-core GEMMs on its strided group
    # views need to run their aligned kernels). Widths grow by less than m·g features. n and k are
    # kept as given: the input's and the last layer's groups are aligned where n/g and k/g are
    # multiples of m (at every preset).
    group_width_multiple: int = 1
    skip: Skip = "mix"
    skip_into_reduce: bool = True
    shuffle: bool = False
    norm: Norm = "layer"
    activation: Activation = "gelu"
    dropout: float = 0.0
    bias: bool = True
    scale_embedding: bool = True
    padding_idx: int | None = None
    norm_eps: float = 1e-5
    # The Map: one [V, n] table, or adaptive input (Baevski & Auli): frequency bands split at
    # ``cutoffs``, band b a [|V_b|, n / factor^b] table projected up to n (define_paper.md §4.1).
    map: MapKind = "table"
    cutoffs: tuple[int, ...] = ()
    adaptive_factor: int = 4

    def __post_init__(self) -> None:
        self._validate_fields()
        self.layer_plans()  # raises on impossible widths / groups

    # ------------------------------------------------------------------ validation
    def _validate_fields(self) -> None:
        for name in ("num_embeddings", "embedding_dim", "input_dim", "max_dim", "depth", "max_groups",
                     "group_width_multiple"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"DeFINE config: {name} must be an int, got {type(value).__name__} {value!r}")
            if value < 1:
                raise _bad(name, value, "must be >= 1")
        if self.max_dim < self.input_dim:
            raise _bad("max_dim", self.max_dim, f"must be >= input_dim={self.input_dim} (k >= n)")
        if self.group_schedule not in GROUP_SCHEDULES:
            raise _bad("group_schedule", self.group_schedule, f"choose one of {GROUP_SCHEDULES}")
        if self.width_rule not in WIDTH_RULES:
            raise _bad("width_rule", self.width_rule, f"choose one of {WIDTH_RULES}")
        if self.skip not in SKIPS:
            raise _bad("skip", self.skip, f"choose one of {SKIPS}")
        if self.norm not in NORMS:
            raise _bad("norm", self.norm, f"choose one of {NORMS}")
        if self.activation not in ACTIVATIONS:
            raise _bad("activation", self.activation, f"choose one of {ACTIVATIONS}")
        for name in ("skip_into_reduce", "shuffle", "bias", "scale_embedding"):
            if not isinstance(getattr(self, name), bool):  # a string like "no" would read as True
                raise _bad(name, getattr(self, name), "must be True or False")
        if not _is_real(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise _bad("dropout", self.dropout, "must be a float in [0, 1)")
        if not _is_real(self.norm_eps) or not 0 < self.norm_eps < math.inf:
            raise _bad("norm_eps", self.norm_eps, "must be a finite float > 0")
        if self.skip == "none" and self.skip_into_reduce:
            raise _bad(
                "skip_into_reduce",
                True,
                "with skip='none' the layers do not carry e to the Reduce layer; "
                "set skip_into_reduce=False or use skip='mix'/'concat'",
            )
        if self.map not in MAPS:
            raise _bad("map", self.map, f"choose one of {MAPS}")
        try:  # ints (NumPy's too), never floats or strings cut down to an int
            cutoffs = tuple(operator.index(c) for c in self.cutoffs)
        except TypeError:
            raise _bad("cutoffs", self.cutoffs, "must be a sequence of ints (band boundaries)") from None
        object.__setattr__(self, "cutoffs", cutoffs)
        if self.map == "adaptive":
            bounds = (0, *self.cutoffs, self.num_embeddings)
            if not self.cutoffs or any(lo >= hi for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)):
                raise _bad("cutoffs", self.cutoffs, f"need increasing band boundaries in (0, {self.num_embeddings})")
            if isinstance(self.adaptive_factor, bool) or not isinstance(self.adaptive_factor, int):
                raise _bad("adaptive_factor", self.adaptive_factor, "must be an int")
            if self.adaptive_factor < 1:
                raise _bad("adaptive_factor", self.adaptive_factor, "must be >= 1 (each band's width is n / factor^b)")
            if self.input_dim % self.adaptive_factor ** len(self.cutoffs):
                raise _bad(
                    "adaptive_factor",
                    self.adaptive_factor,
                    f"input_dim={self.input_dim} must be divisible by factor^{len(self.cutoffs)} (one power per band)",
                )
        elif self.cutoffs:
            raise _bad("cutoffs", self.cutoffs, "cutoffs only apply with map='adaptive'")
        elif self.adaptive_factor != 4:  # the default: anything else means the user expected adaptive input
            raise _bad("adaptive_factor", self.adaptive_factor, "adaptive_factor only applies with map='adaptive'")
        if self.padding_idx is not None:
            if isinstance(self.padding_idx, bool) or not isinstance(self.padding_idx, int):
                raise _bad("padding_idx", self.padding_idx, "must be an int or None")
            if not -self.num_embeddings <= self.padding_idx < self.num_embeddings:
                raise _bad(
                    "padding_idx", self.padding_idx, f"must be in [-{self.num_embeddings}, {self.num_embeddings})"
                )
            if self.padding_idx < 0:  # normalise like nn.Embedding
                object.__setattr__(self, "padding_idx", self.padding_idx + self.num_embeddings)

    # ------------------------------------------------------------------ derived plan
    def groups(self) -> list[int]:
        if self.group_schedule == "halving":
            return halving_groups(self.depth, self.max_groups)
        return cyclic_groups(self.depth, self.max_groups)

    def widths(self) -> list[int]:
        """Output width k_l of every HGT layer: rounded up to a multiple of max(g_l, g_{l+1}, 8)
        (with ``group_width_multiple`` m > 1: of lcm(m·lcm(g_l, g_{l+1}), 8), so that both the
        layer's groups and the next layer's have widths that are multiples of m), except the last,
        which is k."""
        n, k, depth, m = self.input_dim, self.max_dim, self.depth, self.group_width_multiple
        raw = paper_widths(n, k, depth) if self.width_rule == "paper" else linspace_widths(n, k, depth)
        groups = self.groups()
        widths = []
        for layer, value in enumerate(raw[:-1]):
            g_here, g_next = groups[layer], groups[layer + 1]
            unit = max(g_here, g_next, 8) if m == 1 else math.lcm(m * math.lcm(g_here, g_next), 8)
            widths.append(_round_up(value, unit))
        widths.append(k)
        return widths

    def layer_plans(self) -> list[LayerPlan]:
        """The N HGT layers followed by the Reduce layer (always last, 1 group)."""
        n, groups, widths = self.input_dim, self.groups(), self.widths()
        plans: list[LayerPlan] = []
        e_in = 1  # layer 1 reads e itself: a 1-chunk layout with no h
        in_features = n
        for layer in range(self.depth):
            g, out = groups[layer], widths[layer]
            last = layer == self.depth - 1
            if last:
                e_out = 1 if self.skip_into_reduce else 0
            elif self.skip == "mix":
                e_out = groups[layer + 1]
            elif self.skip == "concat":
                e_out = 1
            else:
                e_out = 0
            where = f"layer {layer + 1} (in={in_features}, out={out}, groups={g})"
            if in_features % g:
                why = f"{where}: in width {in_features} not divisible by {g} groups"
                raise _bad("max_groups", self.max_groups, why)
            if out % g:
                raise _bad("max_dim", self.max_dim, f"{where}: width {out} not divisible by {g} groups")
            if e_out and (n % e_out or out % e_out):
                raise _bad(
                    "input_dim",
                    n,
                    f"{where}: the skip splits e (n={n}) and h (width {out}) into {e_out} chunks; both must divide",
                )
            plans.append(
                LayerPlan(
                    in_features=in_features,
                    out_features=out,
                    groups=g,
                    e_width=n,
                    e_in_chunks=e_in,
                    e_out_chunks=e_out,
                    norm=self.norm == "layer",
                    activation=self.activation,
                    dropout=float(self.dropout),
                    shuffle=self.shuffle and g > 1,
                    bias=self.bias,
                )
            )
            e_in = e_out
            in_features = out + (n if e_out else 0)
        plans.append(
            LayerPlan(
                in_features=in_features,
                out_features=self.embedding_dim,
                groups=1,
                e_width=n,
                e_in_chunks=e_in,
                e_out_chunks=0,
                norm=False,
                activation=None,
                dropout=0.0,
                shuffle=False,
                bias=True,
            )
        )
        return plans

    # ------------------------------------------------------------------ the Map
    def bands(self) -> list[tuple[int, int, int]]:
        """(first id, end id, width) of each Map band: one band for map='table'."""
        if self.map == "table":
            return [(0, self.num_embeddings, self.input_dim)]
        bounds = (0, *self.cutoffs, self.num_embeddings)
        return [
            (lo, hi, self.input_dim // self.adaptive_factor**band)
            for band, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))
        ]

    def num_map_parameters(self) -> int:
        """Band tables, plus the projections of bands narrower than n up to n."""
        n = self.input_dim
        return sum((hi - lo) * width + (width * n if width != n else 0) for lo, hi, width in self.bands())

    # ------------------------------------------------------------------ accounting
    def num_parameters(self, include_embedding: bool = True, include_norm: bool = True) -> int:
        """Weights + biases of every layer (+ per-group LayerNorm γ/β, + the Map)."""
        total = sum(p.num_weights + p.num_bias + (p.num_norm if include_norm else 0) for p in self.layer_plans())
        if include_embedding:
            total += self.num_map_parameters()
        return total

    def macs_per_token(self) -> int:
        """Multiply-accumulates of one token's forward pass: the grouped GEMMs and the Reduce
        (the lookup, bias, norm and activation count 0, as in define_paper.md §4.1)."""
        return sum(p.macs for p in self.layer_plans())

    def describe(self) -> str:
        lines = [
            f"DeFINE V={self.num_embeddings} n={self.input_dim} k={self.max_dim} m={self.embedding_dim} "
            f"N={self.depth} g_max={self.max_groups} ({self.group_schedule}, {self.width_rule}, skip={self.skip}"
            + (f", group widths ×{self.group_width_multiple})" if self.group_width_multiple > 1 else ")")
        ]
        for i, p in enumerate(self.layer_plans()):
            name = "reduce" if i == self.depth else f"layer {i + 1}"
            lines.append(f"  {name:8s} {p.in_features:5d} -> {p.out_features:5d}  g={p.groups}")
        table = self.num_embeddings * self.input_dim
        params = self.num_parameters(include_embedding=False)
        lines.append(f"  parameters {params:,} (+ table {table:,}), MACs/token {self.macs_per_token():,}")
        return "\n".join(lines)

    def replace(self, **changes: Any) -> DeFINEConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> DeFINEConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown DeFINE preset {name!r}; choose one of {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)


# The five benchmark configurations of shared/docs/baseline.md (paper tables; g_max is our
# choice, the paper does not state it) with the authors' code's per-layer LN, GELU, dropout 0.1.
PRESETS: dict[str, DeFINEConfig] = {
    "lstm_wt103": DeFINEConfig(267_735, 256, input_dim=256, max_dim=1024, depth=3, max_groups=4, dropout=0.1),
    "lstm_wt103_n7": DeFINEConfig(267_735, 384, input_dim=384, max_dim=1024, depth=7, max_groups=8, dropout=0.1),
    "txl_wt103": DeFINEConfig(267_735, 384, input_dim=384, max_dim=4096, depth=3, max_groups=4, dropout=0.1),
    "awd_ptb": DeFINEConfig(10_000, 400, input_dim=128, max_dim=1024, depth=7, max_groups=8, dropout=0.1),
    "nmt_wmt14": DeFINEConfig(40_000, 512, input_dim=128, max_dim=1024, depth=3, max_groups=4, dropout=0.1),
}
# Equation 1 of the paper with nothing the paper does not name: no norm, activation or dropout.
PRESETS["paper_literal"] = replace(PRESETS["lstm_wt103"], norm=None, activation=None, dropout=0.0)

# Token counts per training step of each preset (baseline.md), used by benchmarks.
PRESET_TOKENS: dict[str, int] = {
    "lstm_wt103": 60 * 140,
    "lstm_wt103_n7": 60 * 140,
    "txl_wt103": 60 * 150,
    "awd_ptb": 20 * 70,
    "nmt_wmt14": 4096,
    "paper_literal": 60 * 140,
}
