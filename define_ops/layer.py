"""``define_ops.DeFINE``: the drop-in replacement for ``nn.Embedding(V, m)``.

Parameter names and shapes are part of the API (checkpoints and tied output layers rely on them):

    weight                 [V, n]            the Map table (an output layer ties to it)
    layers[i].weight       [g, in/g, out/g]  grouped linear of HGT layer i
    layers[i].bias         [out]
    layers[i].norm.weight  [out/g]           per-group LayerNorm γ, shared by the groups
    layers[i].norm.bias    [out/g]
    reduce.weight          [m, k (+ n)]      the Reduce layer (nn.Linear), reads [e ‖ h_N]
    reduce.bias            [m]
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from . import ops, reference
from ._backend import requested_backend, resolve_backend
from .config import DeFINEConfig, LayerPlan


class GroupLayerNorm(nn.Module):
    """LayerNorm over each group's features with one γ/β shared by all groups (the authors' code)."""

    def __init__(self, group_width: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(group_width, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(group_width, device=device, dtype=dtype))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class HGTLayer(nn.Module):
    """Parameters of one grouped layer of the hierarchical group transformation."""

    def __init__(self, plan: LayerPlan, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        self.plan = plan
        self.weight = nn.Parameter(torch.empty(plan.weight_shape, device=device, dtype=dtype))
        if plan.bias:
            self.bias = nn.Parameter(torch.zeros(plan.out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.norm = GroupLayerNorm(plan.out_features // plan.groups, eps, device, dtype) if plan.norm else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Xavier-uniform per group: each group is an (in/g) → (out/g) linear map.
        _, fan_in, fan_out = self.weight.shape
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        p = self.plan
        return f"{p.in_features} -> {p.out_features}, groups={p.groups}, shuffle={p.shuffle}, activation={p.activation}"


def _config_from_kwargs(num_embeddings: int, embedding_dim: int, kwargs: dict[str, Any]) -> DeFINEConfig:
    return DeFINEConfig(num_embeddings=num_embeddings, embedding_dim=embedding_dim, **kwargs)


class DeFINE(nn.Module):
    """Deep factorized input token embeddings (Mehta et al., ICLR 2020).

    ids [*] (int64/int32) → [*, embedding_dim]: lookup e = weight[ids] (dim n, scaled by √n when
    ``scale_embedding``), then ``depth`` grouped layers whose group count halves while the
    width grows n → k, each reading e again through the split-mix skip, then a dense Reduce to m.

    Defaults follow the paper where it speaks (halving groups, linear widths, mix skip, skip into
    Reduce, no shuffle, bias); where it is silent we follow the authors' code for the per-group
    LayerNorm, GELU and √n scaling, and keep ``dropout=0.0`` so that, like ``nn.Embedding``, the
    layer is deterministic unless asked otherwise (the benchmark presets use 0.1).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        input_dim: int = 128,
        max_dim: int = 1024,
        depth: int = 3,
        max_groups: int = 4,
        group_schedule: str = "halving",
        width_rule: str = "paper",
        skip: str = "mix",
        skip_into_reduce: bool = True,
        shuffle: bool = False,
        norm: str | None = "layer",
        activation: str | None = "gelu",
        dropout: float = 0.0,
        bias: bool = True,
        scale_embedding: bool = True,
        padding_idx: int | None = None,
        norm_eps: float = 1e-5,
        backend: str = "auto",
        validate_ids: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        config = DeFINEConfig(
            num_embeddings=num_embeddings, embedding_dim=embedding_dim, input_dim=input_dim, max_dim=max_dim,
            depth=depth, max_groups=max_groups, group_schedule=group_schedule, width_rule=width_rule, skip=skip,
            skip_into_reduce=skip_into_reduce, shuffle=shuffle, norm=norm, activation=activation, dropout=dropout,
            bias=bias, scale_embedding=scale_embedding, padding_idx=padding_idx, norm_eps=norm_eps,
        )  # fmt: skip
        self.config = config
        self.backend = requested_backend(backend)
        self.validate_ids = validate_ids
        plans = config.layer_plans()
        self.plans = plans
        self.weight = nn.Parameter(torch.empty(num_embeddings, input_dim, device=device, dtype=dtype))
        self.layers = nn.ModuleList(HGTLayer(plan, config.norm_eps, device, dtype) for plan in plans[:-1])
        self.reduce = nn.Linear(plans[-1].in_features, embedding_dim, bias=True, device=device, dtype=dtype)
        self.reset_parameters()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: DeFINEConfig, **module_kwargs: Any) -> DeFINE:
        fields = config.to_dict()
        num_embeddings, embedding_dim = fields.pop("num_embeddings"), fields.pop("embedding_dim")
        return cls(num_embeddings, embedding_dim, **fields, **module_kwargs)

    @classmethod
    def from_preset(cls, name: str, *, backend: str = "auto", device=None, dtype=None, **overrides: Any) -> DeFINE:
        return cls.from_config(
            DeFINEConfig.from_preset(name, **overrides), backend=backend, device=device, dtype=dtype
        )

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.config.input_dim**-0.5)
        if self.config.padding_idx is not None:
            with torch.no_grad():
                self.weight[self.config.padding_idx].zero_()
        for layer in self.layers:
            layer.reset_parameters()
        nn.init.xavier_uniform_(self.reduce.weight)
        nn.init.zeros_(self.reduce.bias)

    # ------------------------------------------------------------------ properties
    @property
    def num_embeddings(self) -> int:
        return self.config.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.config.embedding_dim

    @property
    def padding_idx(self) -> int | None:
        return self.config.padding_idx

    @property
    def embedding_scale(self) -> float:
        return math.sqrt(self.config.input_dim) if self.config.scale_embedding else 1.0

    def active_backend(self) -> str:
        """The backend ``forward`` runs on for this module's device."""
        return resolve_backend(self.backend, self.weight.device)

    # ------------------------------------------------------------------ checks
    def _check_ids(self, ids: Tensor) -> None:
        if not isinstance(ids, Tensor):
            raise TypeError(f"DeFINE expects a tensor of token ids, got {type(ids).__name__}")
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"DeFINE expects integer token ids (torch.int64 or torch.int32), got dtype {ids.dtype}")
        if ids.device != self.weight.device:
            raise ValueError(f"DeFINE: ids are on {ids.device} but the layer's parameters are on {self.weight.device}")
        if not self.validate_ids or ids.numel() == 0 or torch.compiler.is_compiling():
            return  # under compile the ops check ids themselves
        low, high = torch.aminmax(ids)
        if low.item() < 0 or high.item() >= self.num_embeddings:
            bad = ((ids < 0) | (ids >= self.num_embeddings)).reshape(-1).nonzero()[0, 0].item()
            value = ids.reshape(-1)[bad].item()
            raise IndexError(
                f"DeFINE: token id {value} at flat position {bad} is out of range for num_embeddings="
                f"{self.num_embeddings} (valid ids are 0..{self.num_embeddings - 1})"
            )

    # ------------------------------------------------------------------ forward
    def _dropout_seeds(self) -> Tensor | None:
        if not self.training or self.config.dropout == 0.0:
            return None
        # One seed per layer per call, from torch's generator (so torch.manual_seed reproduces).
        return torch.randint(0, 2**62, (self.config.depth,), dtype=torch.int64, device=self.weight.device)

    def _layer_params(self) -> list[tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]]:
        return [
            (
                layer.weight,
                layer.bias,
                layer.norm.weight if layer.norm is not None else None,
                layer.norm.bias if layer.norm is not None else None,
            )
            for layer in self.layers
        ]

    def forward(self, ids: Tensor) -> Tensor:
        self._check_ids(ids)
        backend = resolve_backend(self.backend, self.weight.device)
        seeds = self._dropout_seeds()
        cfg = self.config
        if backend == "reference":
            return reference.define_forward_ref(
                ids, self.weight, self._layer_params(), self.reduce.weight, self.reduce.bias, cfg,
                training=self.training, seeds=seeds,
            )  # fmt: skip
        e = ops.embedding_lookup(self.weight, ids.reshape(-1), cfg.padding_idx, self.embedding_scale, backend=backend)
        x = e
        layer_params = zip(self.plans[:-1], self._layer_params(), strict=True)
        for index, (plan, (weight, bias, gamma, beta)) in enumerate(layer_params):
            x = ops.hgt_step(
                x, weight, bias, gamma, beta, seeds[index] if seeds is not None else None,
                e_width=plan.e_width, e_in_chunks=plan.e_in_chunks, e_out_chunks=plan.e_out_chunks,
                shuffle=plan.shuffle, activation=plan.activation,
                dropout_p=plan.dropout if seeds is not None else 0.0, norm_eps=cfg.norm_eps, backend=backend,
            )  # fmt: skip
        reduce_plan = self.plans[-1]
        out = ops.hgt_step(
            x, self.reduce.weight.t().unsqueeze(0), self.reduce.bias,
            e_width=reduce_plan.e_width, e_in_chunks=reduce_plan.e_in_chunks, e_out_chunks=0, backend=backend,
        )  # fmt: skip
        return out.reshape(*ids.shape, cfg.embedding_dim)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"{c.num_embeddings}, {c.embedding_dim}, input_dim={c.input_dim}, max_dim={c.max_dim}, depth={c.depth}, "
            f"max_groups={c.max_groups}, skip={c.skip}, backend={self.backend}"
        )
