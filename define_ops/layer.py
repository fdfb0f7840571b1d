"""``define_ops.DeFINE``: the drop-in replacement for ``nn.Embedding(V, m)``.

Parameter names and shapes are part of the API (checkpoints and tied output layers rely on them):

    weight                 [V, n]            the Map table (an output layer ties to it)
    map.bands[b].weight    [|V_b|, n/f^b]    with map="adaptive": band b's table ...
    map.bands[b].projection.weight [n, n/f^b] ... and its projection to n (bands b >= 1)
    layers[i].weight       [g, in/g, out/g]  grouped linear of HGT layer i
    layers[i].bias         [out]
    layers[i].norm.weight  [out/g]           per-group LayerNorm γ, shared by the groups
    layers[i].norm.bias    [out/g]
    reduce.weight          [m, k (+ n)]      the Reduce layer (nn.Linear), reads [e ‖ h_N]
    reduce.bias            [m]
"""

from __future__ import annotations

import atexit
import math
import operator
import sys
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module_hooks
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import ops, reference
from ._autograd import zero_rows_past
from ._backend import requested_backend, resolve_backend
from .config import DeFINEConfig, LayerPlan
from .stack import StepSpec, gather_rows, hgt_stack


class GroupLayerNorm(nn.Module):
    """LayerNorm over each group's features with one γ/β shared by all groups (the authors' code)."""

    def __init__(self, group_width: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(group_width, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(group_width, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, z: Tensor) -> Tensor:
        """z [T, b] (g groups of the width of γ) → the per-group LayerNorm of z [T, b]. Called as a
        module only where a hook watches it (see HGTLayer.forward); the kernels fuse it otherwise."""
        groups = z.shape[-1] // self.weight.shape[0]
        return reference.group_layer_norm_ref(z, groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class HGTLayer(nn.Module):
    """One grouped layer of the hierarchical group transformation: its parameters, which DeFINE's
    fused stack reads, and a forward that DeFINE calls only where a hook watches the layer."""

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
        if self.norm is not None:  # after to_empty() (meta-device init) γ/β hold whatever memory held
            self.norm.reset_parameters()

    def forward(self, x: Tensor, seed: Tensor | None = None, *, backend: str = "auto") -> Tensor:
        """x [T, a] (this layer's input: e for the first layer, mix(e, h) after it) → h [T, b];
        ``seed`` [] int64 draws the dropout mask in training mode (None: no dropout).

        DeFINE runs its layers through this call only where a hook watches a layer or its norm
        (``torch.nn.utils.prune`` is one: its pre-hook recomputes the weight), so that the hooks fire
        with the layer's own input and output; otherwise its fused stack reads the parameters and
        never calls the modules. A hooked norm, or a module with a forward of its own put in the
        place of the GroupLayerNorm (any [T, b] → [T, b] module), is called as a module between the
        GEMM and the activation; the step op fuses the GroupLayerNorm otherwise."""
        plan, norm = self.plan, self.norm
        dropout_p = plan.dropout if self.training and seed is not None else 0.0
        if norm is not None and (type(norm).forward is not GroupLayerNorm.forward or _watched(norm)):
            h = ops.hgt_step(x, self.weight, self.bias, shuffle=plan.shuffle, backend=backend)
            h = reference.activation_ref(norm(h), plan.activation)
            return reference.dropout_ref(h, dropout_p, seed)
        gamma, beta, eps = (norm.weight, norm.bias, norm.eps) if norm is not None else (None, None, 1e-5)
        return ops.hgt_step(x, self.weight, self.bias, gamma, beta, seed, shuffle=plan.shuffle,
                            activation=plan.activation, dropout_p=dropout_p, norm_eps=eps, backend=backend)  # fmt: skip

    def extra_repr(self) -> str:
        p = self.plan
        return f"{p.in_features} -> {p.out_features}, groups={p.groups}, shuffle={p.shuffle}, activation={p.activation}"


class AdaptiveBand(nn.Module):
    """One frequency band of the adaptive-input Map: a narrow table, projected up to n."""

    def __init__(self, rows: int, width: int, input_dim: int, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, width, device=device, dtype=dtype))
        self.projection = (
            nn.Linear(width, input_dim, bias=False, device=device, dtype=dtype) if width != input_dim else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.weight.shape[1] ** -0.5)
        if self.projection is not None:
            nn.init.xavier_uniform_(self.projection.weight)

    def forward(self, local_ids: Tensor, scale: float = 1.0, sparse: bool = False) -> Tensor:
        """local_ids [T] (rows of this band) → their rows, times ``scale``, projected to n: [T, n]."""
        vectors = F.embedding(local_ids, self.weight, sparse=sparse)
        if scale != 1.0:
            vectors = vectors * scale
        return vectors if self.projection is None else self.projection(vectors)


class AdaptiveMap(nn.Module):
    """Adaptive input (Baevski & Auli, 2019) as DeFINE's Map: ids [T] → e [T, n].

    Every band is looked up for every token (ids clamped into the band) and the band that owns
    the token is selected with ``torch.where``: static shapes, no host synchronisation, so
    ``torch.compile(fullgraph=True)`` traces it. The extra work is Σ_b width_b·n MACs per token,
    small next to the HGT. ``weights_for_band(b)`` gives the tensors an adaptive softmax ties to.
    With ``scale_embedding`` each band's lookup is scaled by √width_b before its projection (the
    authors' adaptive input; DeFINE's √n scale is then not applied). An id outside [0, V) that
    reaches the Map unchecked (``validate_ids=False``, ``torch.compile``) gets a row of NaN, as
    the GPU table lookups give it: never a silent zero.
    """

    def __init__(self, config: DeFINEConfig, device=None, dtype=None) -> None:
        super().__init__()
        self.bounds = [(lo, hi) for lo, hi, _ in config.bands()]
        self.scales = [math.sqrt(width) if config.scale_embedding else 1.0 for _, _, width in config.bands()]
        self.bands = nn.ModuleList(
            AdaptiveBand(hi - lo, width, config.input_dim, device, dtype) for lo, hi, width in config.bands()
        )

    def weights_for_band(self, band: int) -> tuple[Tensor, Tensor | None]:
        """(table [|V_b|, width_b], projection [n, width_b] or None) of band ``band``."""
        module = self.bands[band]
        return module.weight, module.projection.weight if module.projection is not None else None

    def reset_parameters(self) -> None:
        for band in self.bands:
            band.reset_parameters()

    def forward(self, ids: Tensor, sparse: bool = False) -> Tensor:
        # Band 0 starts the result: ids below it (negative) and past the last band keep its NaN fill.
        e = None
        for (lo, hi), scale, band in zip(self.bounds, self.scales, self.bands, strict=True):
            local = (ids - lo).clamp(0, hi - lo - 1)
            vectors = band(local, scale, sparse)  # a module call: hooks on a band (prune's) fire
            inside = ((ids >= lo) & (ids < hi)).unsqueeze(-1)
            e = vectors.masked_fill(~inside, math.nan) if e is None else torch.where(inside, vectors, e)
        return e


def _own(module: nn.Module, name: str) -> Tensor | None:
    """``module.<name>`` straight from its parameter dict (nn.Module.__getattr__ costs ~0.5 µs), or
    through the attribute where a parametrization (weight_norm, spectral_norm, ...) computes it."""
    params = module._parameters
    return params[name] if name in params else getattr(module, name)


def _hook_dicts(module: nn.Module) -> tuple[dict, ...]:
    """The module's own forward, forward-pre, backward and backward-pre hook dicts."""
    return (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)


def _global_hook_dicts() -> tuple[dict, ...]:
    """torch's global module hooks (``register_module_forward_hook`` ...), which fire for every module call."""
    h = _module_hooks
    return (h._global_forward_hooks, h._global_forward_pre_hooks,
            h._global_backward_hooks, h._global_backward_pre_hooks)  # fmt: skip


def _watched(module: nn.Module) -> bool:
    """Whether a hook of its own or a global one would fire if the module were called."""
    return any(_hook_dicts(module)) or any(_global_hook_dicts())


def _in_autodiff_transform() -> bool:
    """Inside a torch.func transform (grad, vmap, jacrev, functional autodiff...) or a forward-mode
    AD level (``torch.autograd.forward_ad.dual_level``): the compiled backends' autograd Functions
    cannot take part (functorch needs its own Function protocol; they have no jvp), so the layer
    computes with the reference backend there (~0.3 µs to ask)."""
    # Not while torch.compile traces: it runs its own functorch levels, and traces our ops fine.
    if torch.compiler.is_compiling():
        return False
    return torch._C._functorch.peek_interpreter_stack() is not None or getattr(forward_ad, "_current_level", -1) >= 0


# Constructor options that are not part of DeFINEConfig (how the layer runs, not what it computes).
_MODULE_OPTIONS = ("backend", "dedup", "cache", "validate_ids", "sparse", "device", "dtype")


class TokenIdError(IndexError):
    """A token id outside [0, num_embeddings), found by ``DeFINE``'s id check (``validate_ids``);
    an ``IndexError``, so code that catches those catches it."""


_version_of = operator.attrgetter("_version")  # a tensor's in-place update counter, read at C speed by map()

# Backends whose table lookups give an out-of-range id a row of NaN (and no gradient) instead of
# reading out of bounds: with them an id check may run behind the computation (validate_ids="deferred").
_NAN_ROW_BACKENDS = ("cuda", "triton")
# Deferred checks still in flight before a call waits for the oldest: bounds their pinned buffers.
_MAX_PENDING_ID_CHECKS = 16


def distinct_ids(flat_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sorted distinct ids without a host synchronisation: static shapes only.

    flat_ids [T] → (distinct [T]: the distinct ids in ascending order, then padding repeating the
    smallest id; inverse [T] int64: flat_ids == distinct[inverse]; count [1] int64: how many are
    distinct). The same order and positions as ``torch.unique(sorted=True, return_inverse=True)``.
    """
    sorted_ids, order = torch.sort(flat_ids)
    first = torch.ones(1, dtype=torch.bool, device=flat_ids.device)
    starts = torch.cat([first, sorted_ids[1:] != sorted_ids[:-1]])  # [T]: a new id starts here
    segment = torch.cumsum(starts, 0) - 1  # [T] int64: position of each sorted id among the distinct ones
    distinct = sorted_ids[:1].expand_as(sorted_ids).clone().scatter_(0, segment, sorted_ids)
    inverse = torch.empty_like(segment).scatter_(0, order, segment)
    return distinct, inverse, segment[-1:] + 1


# Bumped whenever any module anywhere gets a submodule, a parameter or a buffer assigned (nn.Module.__setattr__,
# register_parameter/register_buffer, ModuleList/ModuleDict updates, add_module): the cache's version check
# collects its parameters again only then, and a table built before never serves after. Raw
# edits of a module's `_modules` or `_parameters` dict bypass it (call invalidate_cache()).
_registration_epoch = [0]


def _count_registration(module: nn.Module, name: str, value: object) -> None:
    _registration_epoch[0] += 1


torch.nn.modules.module.register_module_module_registration_hook(_count_registration)
torch.nn.modules.module.register_module_parameter_registration_hook(_count_registration)
torch.nn.modules.module.register_module_buffer_registration_hook(_count_registration)

# Bumped after each step of an optimizer that may write parameters without bumping their version
# counters (torch.optim's global post-step hook): torch's fused ones (``fused=True``), and any from
# outside torch.optim (hand-written ones often update ``p.data``). torch's other optimizers bump
# versions, so their steps (e.g. a student's, beside a frozen DeFINE teacher) never drop a table.
_untracked_optimizer_steps = [0]


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if optimizer.defaults.get("fused") or not type(optimizer).__module__.startswith("torch.optim"):
        _untracked_optimizer_steps[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


class DeFINE(nn.Module):
    """Deep factorized input token embeddings (Mehta et al., ICLR 2020).

    ids [*] (int64/int32) → [*, embedding_dim]: lookup e = weight[ids] (dim n, scaled by √n when
    ``scale_embedding``), then ``depth`` grouped layers whose group count halves while the
    width grows n → k, each reading e again through the split-mix skip, then a dense Reduce to m.

    Defaults follow the paper where it speaks (halving groups, linear widths, mix skip, skip into
    Reduce, no shuffle, bias); where it is silent we follow the authors' code for the per-group
    LayerNorm, GELU and √n scaling, and keep ``dropout=0.0`` so that, like ``nn.Embedding``, the
    layer is deterministic unless asked otherwise (the benchmark presets use 0.1).

    ``validate_ids``: True checks the id range before the call (one host read: a synchronisation
    on CUDA); "deferred" queues the check and reads its verdict at a later call or in
    ``check_pending_ids()``, while the bad id's row is NaN (no synchronisation); False skips it.
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
        group_width_multiple: int = 1,
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
        map: str = "table",
        cutoffs: tuple[int, ...] | list[int] = (),
        adaptive_factor: int = 4,
        backend: str = "auto",
        dedup: bool = False,
        cache: str = "auto",
        validate_ids: bool = True,
        sparse: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        config = DeFINEConfig(
            num_embeddings=num_embeddings, embedding_dim=embedding_dim, input_dim=input_dim, max_dim=max_dim,
            depth=depth, max_groups=max_groups, group_schedule=group_schedule, width_rule=width_rule,
            group_width_multiple=group_width_multiple, skip=skip, skip_into_reduce=skip_into_reduce, shuffle=shuffle,
            norm=norm, activation=activation, dropout=dropout, bias=bias, scale_embedding=scale_embedding,
            padding_idx=padding_idx, norm_eps=norm_eps, map=map, cutoffs=cutoffs, adaptive_factor=adaptive_factor,
        )  # fmt: skip
        if cache not in ("auto", "off"):
            raise ValueError(f"DeFINE: cache={cache!r} is invalid; choose 'auto' or 'off'")
        for name, flag in (("dedup", dedup), ("sparse", sparse)):
            if not isinstance(flag, bool):
                raise ValueError(f"DeFINE: {name}={flag!r} is invalid; it must be True or False")
        if not (isinstance(validate_ids, bool) or (isinstance(validate_ids, str) and validate_ids == "deferred")):
            raise ValueError(f"DeFINE: validate_ids={validate_ids!r} is invalid; choose True, False or 'deferred'")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"DeFINE: dtype={dtype!r} is invalid; the parameters need a floating-point dtype")
        self.config = config
        self.backend = requested_backend(backend)
        self.validate_ids = validate_ids
        self.dedup = dedup
        self.cache = cache
        self.sparse = sparse
        self._drop_cache_state()
        self._pending_id_checks: deque[tuple[Tensor, torch.cuda.Event | None]] = deque()  # see _defer_id_check
        plans = config.layer_plans()
        self.plans = plans
        if config.map == "table":
            self.weight = nn.Parameter(torch.empty(num_embeddings, input_dim, device=device, dtype=dtype))
        else:
            self.map = AdaptiveMap(config, device, dtype)
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
    def from_preset(cls, name: str, **kwargs: Any) -> DeFINE:
        """A preset of ``PRESETS``; keyword arguments override its configuration fields or set the
        module's own options (backend, dedup, cache, validate_ids, device, dtype)."""
        module_kwargs = {k: kwargs.pop(k) for k in _MODULE_OPTIONS if k in kwargs}
        return cls.from_config(DeFINEConfig.from_preset(name, **kwargs), **module_kwargs)

    def reset_parameters(self) -> None:
        if self.config.map == "table":
            nn.init.normal_(self.weight, mean=0.0, std=self.config.input_dim**-0.5)
            if self.config.padding_idx is not None:
                with torch.no_grad():
                    self.weight[self.config.padding_idx].zero_()
        else:
            self.map.reset_parameters()
        for layer in self.layers:
            layer.reset_parameters()
        nn.init.xavier_uniform_(self.reduce.weight)
        nn.init.zeros_(self.reduce.bias)

    def map_parameters(self) -> Iterator[nn.Parameter]:
        """The Map's parameters: the [V, n] table, or the adaptive bands' tables and projections.
        These are what an output layer ties to."""
        return self.map.parameters() if self.config.map == "adaptive" else iter([self.weight])

    def transform_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters of the expansion (the HGT layers with their biases and norms) and of the
        Reduce: everything but the Map. Optimizer groups split on this, e.g. a lower learning rate
        for the transform under SGD at the rates LSTM language models use (lr 20: see README)."""
        for module in (*self.layers, self.reduce):
            yield from module.parameters()

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
        """√n with ``scale_embedding`` (the authors' code); 1 for adaptive input, whose bands
        carry their own scale (√width_b, see ``AdaptiveMap``)."""
        if self.config.map == "adaptive" or not self.config.scale_embedding:
            return 1.0
        return math.sqrt(self.config.input_dim)

    @property
    def device(self) -> torch.device:
        # Straight from the dicts: nn.Module.__getattr__ twice cost ~1.3 µs of a ~20 µs cached call.
        weight = self._modules["reduce"]._parameters.get("weight")
        if weight is None:  # a parametrized or wrapped Reduce (weight_norm, LoRA): any parameter will do
            weight = next(self.parameters())
        return weight.device

    def active_backend(self) -> str:
        """The backend ``forward`` runs on for this module's device."""
        return resolve_backend(self.backend, self.device)

    # ------------------------------------------------------------------ checks
    def _check_id_tensor(self, ids: Tensor) -> None:
        if not isinstance(ids, Tensor):
            raise TypeError(f"DeFINE expects a tensor of token ids, got {type(ids).__name__}")
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"DeFINE expects integer token ids (torch.int64 or torch.int32), got dtype {ids.dtype}")
        if ids.device != self.device:
            raise ValueError(f"DeFINE: ids are on {ids.device} but the layer's parameters are on {self.device}")

    def _check_id_values(self, ids: Tensor, nan_rows: bool) -> bool:
        """Range-check ``ids`` as ``validate_ids`` asks; True where they were verified now. With
        ``nan_rows`` (this call's path gives a bad id a NaN row) "deferred" queues the check instead;
        on any other path it checks now."""
        mode = self.validate_ids
        if not mode or ids.is_meta or torch.compiler.is_compiling():
            return False  # under compile the ops check ids themselves; meta tensors have no values
        if torch._C._functorch.peek_interpreter_stack() is not None:
            return False  # vmap's ids have no host values; the reference backend's lookup checks them
        if ids.is_cuda and torch.cuda.is_current_stream_capturing():
            return False  # a host read is illegal in a CUDA graph capture; the ops flag bad ids (NaN rows)
        if mode == "deferred":
            self.check_pending_ids(wait=False)  # what earlier calls' checks found, where it has arrived
            if nan_rows:
                if ids.numel() > 0:
                    self._defer_id_check(ids)
                return False
        if ids.numel() == 0:
            return True
        low, high = torch.stack(torch.aminmax(ids.reshape(-1))).tolist()  # one host read, not two
        if low < 0 or high >= self.num_embeddings:
            bad = ((ids < 0) | (ids >= self.num_embeddings)).reshape(-1).nonzero()[0, 0].item()
            value = ids.reshape(-1)[bad].item()
            raise TokenIdError(
                f"DeFINE: token id {value} at flat position {bad} is out of range for num_embeddings="
                f"{self.num_embeddings} (valid ids are 0..{self.num_embeddings - 1})"
            )
        return True

    def _defer_id_check(self, ids: Tensor) -> None:
        """Queue the range check of ``ids`` without waiting for it: their smallest and largest id go
        to pinned host memory by an asynchronous copy, read by a later call or ``check_pending_ids``
        once the device has written them. Three launches, no host synchronisation."""
        low_high = torch.stack(torch.aminmax(ids.reshape(-1)))  # [2] on ids' device
        event = None
        if low_high.is_cuda:
            host = torch.empty(2, dtype=low_high.dtype, pin_memory=True)
            host.copy_(low_high, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(low_high.device))  # the copy's stream, whatever the current device
            low_high = host
        self._pending_id_checks.append((low_high, event))
        _layers_with_pending_checks.add(self)
        self._resolve_pending_ids(wait=True, keep=_MAX_PENDING_ID_CHECKS)  # waits only past the bound

    def check_pending_ids(self, wait: bool = True) -> None:
        """Raise the ``TokenIdError`` of an out-of-range id that an earlier call met under
        ``validate_ids="deferred"`` (that call's rows for it were NaN). Every deferred call checks
        what has arrived without waiting; this waits for the rest (``wait=False``: only what has
        arrived). Training loops call it after the step's own host read, when it costs nothing."""
        self._resolve_pending_ids(wait, keep=0)

    def _resolve_pending_ids(self, wait: bool, keep: int) -> None:
        """Read the oldest pending checks, in order, until ``keep`` are left (or, without ``wait``,
        until one has not landed)."""
        while len(self._pending_id_checks) > keep:
            low_high, event = self._pending_id_checks[0]
            if event is not None and not event.query():  # a query never waits
                if not wait:
                    return
                event.synchronize()
            self._pending_id_checks.popleft()
            self._resolve_id_check(low_high)

    def _resolve_id_check(self, low_high: Tensor) -> None:
        """Raise for a deferred check's (smallest, largest) id [2], read on the host once it has landed."""
        low, high = low_high.tolist()
        if low < 0 or high >= self.num_embeddings:
            self._pending_id_checks.clear()  # reported once; later calls' checks start afresh
            value = low if low < 0 else high
            raise TokenIdError(
                f"DeFINE: token id {value} is out of range for num_embeddings={self.num_embeddings} (valid ids are "
                f"0..{self.num_embeddings - 1}); found by validate_ids='deferred' after the call that received it "
                f"had returned: that call's output rows for it are NaN"
            )

    # ------------------------------------------------------------------ forward
    def _dropout_seeds(self) -> Tensor | None:
        if not self.training or self.config.dropout == 0.0:
            return None
        # One seed per layer per call, from torch's generator (so torch.manual_seed reproduces).
        return torch.randint(0, 2**62, (self.config.depth,), dtype=torch.int64, device=self.device)

    def _layer_params(self) -> list[tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]]:
        # Straight from the modules' dicts: what attribute access finds, without nn.Module.__getattr__
        # (~0.5 µs a lookup; this runs on every call: 38 → 2 µs at awd_ptb on a 2-core VM).
        params = []
        for layer in self._modules["layers"]:
            own = layer._parameters
            norm = layer._modules.get("norm")
            norm_params = norm._parameters if norm is not None else None
            try:
                params.append((
                    own["weight"],
                    own["bias"],
                    norm_params["weight"] if norm_params is not None else None,
                    norm_params["bias"] if norm_params is not None else None,
                ))  # fmt: skip
            except KeyError:  # a parametrized tensor (weight_norm, ...) is not in the dict: its attribute computes it
                params.append((
                    _own(layer, "weight"),
                    _own(layer, "bias"),
                    _own(norm, "weight") if norm is not None else None,
                    _own(norm, "bias") if norm is not None else None,
                ))  # fmt: skip
        return params

    def _reduce_runs_fused(self) -> bool:
        """Whether the Reduce can run as the stack's last step, its weight read straight from the
        module: a plain ``nn.Linear`` that no hook watches. Anything else (a parametrization such as
        weight_norm, a wrapper such as a LoRA adapter, a forward or backward hook) is called as the
        module it is, on the stack's output, so that whatever it adds takes effect."""
        reduce = self._modules["reduce"]
        return type(reduce) is nn.Linear and not _watched(reduce)

    def _layer_hook_dicts(self) -> list[dict]:
        """Every hook dict of the HGT layers and their norms, collected again only when a module or
        parameter was registered anywhere (a new layer or norm module comes with new dicts); also
        notes whether a layer or norm is another module than ours (``_cache_layers_replaced``)."""
        epoch = _registration_epoch[0]
        if self._cache_hooks_epoch != epoch:
            layers = self._modules["layers"]
            norms = [layer._modules.get("norm") for layer in layers]
            modules = [m for layer, norm in zip(layers, norms, strict=True) for m in (layer, norm) if m is not None]
            self._cache_layer_hooks = [d for m in modules for d in _hook_dicts(m)]
            # Our forward (a parametrized module's class is a subclass that keeps it) or another one.
            own_forward = [type(layer).forward is HGTLayer.forward for layer in layers]
            own_forward += [type(norm).forward is GroupLayerNorm.forward for norm in norms if norm is not None]
            self._cache_layers_replaced = not all(own_forward)
            self._cache_hooks_epoch = epoch
        return self._cache_layer_hooks

    def _layers_run_as_modules(self) -> bool:
        """Whether a hook watches an HGT layer or its norm (its own, e.g. torch.nn.utils.prune's
        pre-hook, or a global one), or a module with a forward of its own stands in for one (an
        HGTLayer subclass that overrides it, a norm of the user's own): then the layers run one by
        one as modules (``layer(x, seed, backend=...)``, HGTLayer.forward's signature), so that the
        hooks fire and the modules' own code runs, instead of the fused stack, which only reads our
        modules' parameters.
        ~0.7 µs a call at awd_ptb's 14 modules on a 2-core VM."""
        return any(self._layer_hook_dicts()) or self._cache_layers_replaced or any(_global_hook_dicts())

    def _step_specs(self, dropout: bool) -> tuple[StepSpec, ...]:
        """The stack's per-step arguments (HGT layers, then the Reduce), built once per dropout state
        in eager mode. Under torch.compile they are rebuilt while tracing (free in the compiled graph):
        dynamo on torch 2.11 cannot trace the cache's ``__dict__.setdefault``."""
        if torch.compiler.is_compiling():
            return self._build_step_specs(dropout)
        cached = self.__dict__.setdefault("_step_specs_cache", {})
        if dropout not in cached:
            cached[dropout] = self._build_step_specs(dropout)
        return cached[dropout]

    def _build_step_specs(self, dropout: bool) -> tuple[StepSpec, ...]:
        cfg = self.config
        specs = [
            StepSpec(plan.e_width, plan.e_in_chunks, plan.e_out_chunks, plan.shuffle, plan.activation,
                     plan.dropout if dropout else 0.0, cfg.norm_eps)
            for plan in self.plans[:-1]
        ]  # fmt: skip
        reduce_plan = self.plans[-1]
        specs.append(StepSpec(reduce_plan.e_width, reduce_plan.e_in_chunks, 0, False, None, 0.0, cfg.norm_eps))
        return tuple(specs)

    def embed_ids(self, flat_ids: Tensor, backend: str | None = None) -> Tensor:
        """The Map step alone: ids [T] → e [T, n] (padding ids give zeros)."""
        backend = backend or resolve_backend(self.backend, self.device)
        pad = self.config.padding_idx
        if self.config.map == "table" and not self.sparse:
            return ops.embedding_lookup(self.weight, flat_ids, pad, self.embedding_scale, backend=backend)
        if self.config.map == "table":  # sparse: ATen's lookup, whose gradient is a sparse COO tensor
            # The masked_fill below gives padding ids zero gradients; padding_idx also drops their
            # entries from the sparse gradient, a data-dependent size that torch.compile's sparse
            # backward cannot take (it fails for nn.Embedding too): compiled, they stay, as zeros.
            lookup_pad = None if torch.compiler.is_compiling() else pad
            e = F.embedding(flat_ids, self.weight, padding_idx=lookup_pad, sparse=True)
            e = e * self.embedding_scale if self.embedding_scale != 1.0 else e
        else:
            e = self.map(flat_ids, sparse=self.sparse)
        return e if pad is None else e.masked_fill((flat_ids == pad).unsqueeze(-1), 0.0)

    def _unit(
        self, flat_ids: Tensor, row_count: Tensor | None = None, inverse: Tensor | None = None,
        shape: Sequence[int] | None = None,
    ) -> Tensor:  # fmt: skip
        """Map → HGT → Reduce for ids [T] → [T, m]; padding ids give zero vectors. With
        ``row_count`` (a device scalar) only the first rows are needed (see ``ops.hgt_step``).
        With ``inverse`` (int64 [T']: dedup's, ``flat_ids`` then the distinct ids) the rows are
        gathered by it → [T', m], inside the stack's autograd node on the compiled backends.
        With ``shape`` (the ids' shape, T' elements) the result is [*shape, m] and, like
        ``nn.Embedding``'s, a tensor of its own rather than a view: a hook placed on the output
        (FSDP2's pre-backward all-gather) survives an in-place op on it (``x += pos``), which on a
        view would replace the node the hook sits on."""
        backend = "reference" if _in_autodiff_transform() else resolve_backend(self.backend, self.device)
        seeds = self._dropout_seeds()
        cfg = self.config
        by_modules = self._layers_run_as_modules()
        # A plain table lookup runs inside the stack's autograd node (see hgt_stack's `lookup`).
        fold_lookup = backend != "reference" and cfg.map == "table" and not self.sparse and not by_modules
        e = None if fold_lookup else self.embed_ids(flat_ids, backend)
        fused_reduce = not by_modules and self._reduce_runs_fused()
        if by_modules:  # a hooked layer: each one called as a module, on the backend's step op
            out = self._hgt_by_modules(e, seeds, backend)
            if row_count is not None:
                out = zero_rows_past(out, row_count)
        elif backend == "reference":
            reduce_weight, reduce_bias = (self.reduce.weight, self.reduce.bias) if fused_reduce else (None, None)
            out = reference.hgt_forward_ref(
                e, self._layer_params(), reduce_weight, reduce_bias, cfg, training=self.training, seeds=seeds,
                plans=self.plans,
            )  # fmt: skip
            if fused_reduce and inverse is not None:
                out = self._expand(out, inverse, backend)
        else:
            lookup = (self.weight, flat_ids, cfg.padding_idx, self.embedding_scale) if fold_lookup else None
            out = hgt_stack(e, self._stack_steps(seeds, fused_reduce), backend=backend, row_count=row_count,
                            lookup=lookup, expand=inverse if fused_reduce else None)  # fmt: skip
            if not fused_reduce and row_count is not None:  # dedup's padding rows are no rows: zeros
                out = zero_rows_past(out, row_count)
        out_shape = None if shape is None else (*shape, cfg.embedding_dim)
        if not fused_reduce:  # the Reduce module itself, on the Reduce's input [T, k (+ n)]
            out = self.reduce(out)
            out = out if inverse is None else self._expand(out, inverse, backend)
        if cfg.padding_idx is not None:  # like nn.Embedding: a padding token embeds to zeros
            row_ids = flat_ids if inverse is None else flat_ids[inverse]
            mask = (row_ids == cfg.padding_idx).unsqueeze(-1)
            if out_shape is not None:
                out, mask = out.reshape(out_shape), mask.reshape(*shape, 1)
            return out.masked_fill(mask, 0.0)  # a new tensor, not a view
        if out_shape is None:
            return out
        if not fused_reduce and inverse is None:
            # The Reduce module's own result, which its backward may have saved (a wrapper ending in
            # tanh saves it): an alias that is no view would hide an in-place op on the output from
            # autograd's version check, a view would lose FSDP2's hook. A copy where it must change
            # shape or is a view already, on this path only.
            same = out._base is None and tuple(out.shape) == out_shape
            return out if same else out.reshape(out_shape).clone()
        if tuple(out.shape) == out_shape:
            return out
        # Our ops' result [T', m] (the stack's, the reference's or the expansion's), which nothing
        # saved for its backward and nothing else holds: it takes the shape without becoming a view.
        return torch.ops.aten._unsafe_view(out, out_shape)

    def _hgt_by_modules(self, e: Tensor, seeds: Tensor | None, backend: str) -> Tensor:
        """e [T, n] → the Reduce's input [T, k (+ n)], each HGT layer called as a module (the
        split-mix skip between them as its own op): what the fused stack computes, with the same
        dropout masks, but every hook on a layer or its norm fires."""
        plans = self.plans
        h = e
        for index, layer in enumerate(self._modules["layers"]):
            chunks = plans[index].e_in_chunks
            x = e if index == 0 else ops.split_mix(e, h, chunks) if chunks else h
            h = layer(x, seeds[index] if seeds is not None else None, backend=backend)
        return ops.split_mix(e, h, 1) if self.config.skip_into_reduce else h

    def _stack_steps(self, seeds: Tensor | None, with_reduce: bool = True) -> list[tuple]:
        """``hgt_stack``'s steps: per HGT layer (weight, bias, γ, β, seed, StepSpec), then (with
        ``with_reduce``) the Reduce layer as a one-group step (its nn.Linear weight transposed);
        ``seeds`` [depth] or None."""
        specs = self._step_specs(dropout=seeds is not None)
        layer_seeds = seeds.unbind(0) if seeds is not None else [None] * self.config.depth  # one call, not one a layer
        layers = zip(specs[:-1], self._layer_params(), layer_seeds, strict=True)
        steps = [(weight, bias, gamma, beta, seed, spec) for spec, (weight, bias, gamma, beta), seed in layers]
        if with_reduce:
            steps.append((self.reduce.weight.t().unsqueeze(0), self.reduce.bias, None, None, None, specs[-1]))
        return steps

    def forward(self, ids: Tensor, *, dedup: bool | None = None) -> Tensor:
        """ids [*] (int64/int32) → [*, embedding_dim].

        ``dedup`` (default: the module's ``dedup``) runs the transformation once per distinct id
        of the batch and gathers the result; the backward sums the gradients of repeated ids
        before the transformation's backward. Results equal the plain path when dropout is off;
        with dropout, each distinct token gets one mask per call (like word-level embedding
        dropout) instead of one per occurrence. The Triton backend needs no host synchronisation
        and traces under ``torch.compile``: the distinct ids are padded to the batch size and the
        kernels read their count from device memory, skipping the padding. The other backends
        use ``torch.unique``, which needs the count on the host (one synchronisation on CUDA);
        under ``torch.compile`` they run the plain path instead.
        """
        self._check_id_tensor(ids)
        table = self._cached_table() if self._cache_usable(ids) else None
        if table is not None and self.validate_ids is True and ids.device.type == "cpu":
            # F.embedding checks every id on the CPU: only a failure needs the check that names the
            # id (~4 µs of a ~21 µs cached call saved where all ids are good).
            try:
                return F.embedding(ids, table)
            except IndexError:
                self._check_id_values(ids, False)  # raises TokenIdError naming the first bad id
                raise
        # Whether this call's lookup gives an out-of-range id a NaN row (then its check may be deferred):
        # the backend's own lookup op does, the Map's adaptive bands do, F.embedding does not. (Moot
        # where validate_ids=True checks before the call: no backend lookup on the cached path then.)
        lookup_backend = None if self.validate_ids is True else resolve_backend(self.backend, ids.device)
        backend_rows = lookup_backend in _NAN_ROW_BACKENDS
        if table is None:
            nan_rows = self.config.map == "adaptive" or (backend_rows and not self.sparse)
        else:
            nan_rows = backend_rows
        verified = self._check_id_values(ids, nan_rows)
        if table is not None:  # the eval-mode table: one lookup, any ids shape
            if verified or not backend_rows:
                return F.embedding(ids, table)
            # Unchecked ids: the backend's lookup gives a bad one a NaN row; F.embedding asserts on CUDA.
            rows = gather_rows(table, ids.reshape(-1), lookup_backend)  # [T, m] of its own: shaped, not a view
            return torch.ops.aten._unsafe_view(rows, (*ids.shape, table.shape[1]))
        flat = ids.reshape(-1)
        use_dedup = (self.dedup if dedup is None else dedup) and flat.numel() > 0 and not _in_autodiff_transform()
        backend = self.active_backend() if use_dedup else None
        # (A hooked layer sees the distinct ids alone: no padding rows.)
        if backend == "triton" and not self._layers_run_as_modules():
            distinct, inverse, count = distinct_ids(flat)
            return self._unit(distinct, row_count=count, inverse=inverse, shape=ids.shape)
        if use_dedup and not torch.compiler.is_compiling():
            distinct, inverse = torch.unique(flat, return_inverse=True)
            return self._unit(distinct, inverse=inverse, shape=ids.shape)
        return self._unit(flat, shape=ids.shape)

    @staticmethod
    def _expand(rows: Tensor, inverse: Tensor, backend: str) -> Tensor:
        """rows [U, m] of the distinct ids → [T, m] by ``inverse`` [T], through the backend's lookup
        op: its backward sums each distinct id's gradients in token order (deterministic), where
        ``index_select``'s backward adds them with atomics on CUDA."""
        return ops.embedding_lookup(rows, inverse, None, 1.0, backend=backend)

    # ------------------------------------------------------------------ inference table
    @torch.no_grad()
    def export_table(self, chunk_size: int = 2048, dtype: torch.dtype | None = None) -> Tensor:
        """The whole unit as a [V, m] table (eval mode: no dropout), computed ``chunk_size`` ids
        at a time, so the extra memory is bounded by one chunk's activations. ``dtype`` defaults to
        the unit's output dtype: the parameters', or autocast's under ``torch.autocast``."""
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"DeFINE.export_table: chunk_size must be an integer >= 1, got {chunk_size!r}")
        cfg = self.config
        table = None
        was_training = self.training
        self.eval()
        try:
            for start in range(0, cfg.num_embeddings, chunk_size):
                ids = torch.arange(start, min(start + chunk_size, cfg.num_embeddings), device=self.device)
                rows = self._unit(ids)
                if table is None:
                    table = rows.new_empty(cfg.num_embeddings, cfg.embedding_dim, dtype=dtype or rows.dtype)
                table[start : start + ids.numel()] = rows
        finally:
            self.train(was_training)
        return table

    def to_embedding(self, chunk_size: int = 2048, freeze: bool = True) -> nn.Embedding:
        """An ``nn.Embedding(V, m)`` holding the exported table: DeFINE's output at the cost of a lookup."""
        return nn.Embedding.from_pretrained(
            self.export_table(chunk_size), freeze=freeze, padding_idx=self.config.padding_idx
        )

    def _drop_cache_state(self) -> None:
        self._cache_table: Tensor | None = None  # a plain attribute: never in state_dict, pickles or copies
        self._cache_key: tuple | None = None  # _cache_state()'s key of the table
        self._cache_sources: list[tuple[Tensor, Any]] = []  # (parameter, its storage) the table was built from
        self._cache_slots: list[tuple[dict[str, Any], str]] = []  # (a module's _parameters or _buffers, name)
        self._cache_slots_epoch = -1
        self._cache_parameter_count = 0  # the first slots are parameters, the rest buffers
        self._cache_layer_hooks: list[dict] = []  # _layer_hook_dicts(), and the epoch it was collected in
        self._cache_hooks_epoch = -1
        self._cache_layers_replaced = False

    def _cache_state(self) -> tuple[tuple, list[Tensor]]:
        """(key, the parameter and buffer tensors now in the modules' dicts): the table serves only while
        the key is equal: the same tensor objects, versions and storages, and the same autocast state.

        In-place updates (optimizer steps, load_state_dict, no_grad edits, .to()) bump _version;
        new data (`p.data = t`) changes the storage; new parameters, buffers or submodules anywhere bump the
        registration epoch (the only time the dict slots are collected again); tensors swapped into
        the dicts without registration (``torch.func.functional_call``) are other objects; steps of
        the optimizers that may bump no version are counted (see _count_optimizer_step); autocast
        changes the values and dtype of the output, so its state is part of the key, as are the
        hooks on the Reduce, the HGT layers and their norms (which then run as modules; a pruned
        layer's mask is a buffer). Runs on every
        cached call (a few µs for awd_ptb's 31 parameters on a 2-core VM)."""
        epoch = _registration_epoch[0]
        if self._cache_slots_epoch != epoch:
            modules = list(self.modules())
            # Parameters first, then buffers (none of DeFINE's own; torch.nn.utils.prune's masks).
            self._cache_slots = [(m._parameters, n) for m in modules for n, p in m._parameters.items() if p is not None]
            self._cache_parameter_count = len(self._cache_slots)
            self._cache_slots += [(m._buffers, n) for m in modules for n, b in m._buffers.items() if b is not None]
            self._cache_slots_epoch = epoch
        tensors = [parameters[name] for parameters, name in self._cache_slots]
        # id and data_ptr: the table holds these tensors and their storages (_cache_sources), so no
        # other tensor or allocation can reuse one meanwhile (e.g. after .half().float()).
        state = (tuple(map(id, tensors)), tuple(map(_version_of, tensors)), tuple(map(Tensor.data_ptr, tensors)))
        device_type = tensors[0].device.type
        autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        # Forward hooks that the Reduce's module call would run (see _reduce_runs_fused): adding or
        # removing one changes the table. Their handles' ids, ~0.3 µs for the empty dicts.
        reduce = self._modules["reduce"]
        # The same for the HGT layers and their norms (every hook makes them run as modules).
        layer_hooks = self._layer_hook_dicts()
        hooks = (tuple(reduce._forward_hooks), tuple(reduce._forward_pre_hooks),
                 tuple(_module_hooks._global_forward_hooks),
                 tuple(_module_hooks._global_forward_pre_hooks),
                 tuple(map(tuple, layer_hooks)) if any(layer_hooks) else ())  # fmt: skip
        return (epoch, _untracked_optimizer_steps[0], autocast, hooks, state), tensors

    def _cache_usable(self, ids: Tensor) -> bool:
        if self.cache != "auto" or self.training or ids.is_meta or torch.compiler.is_compiling():
            return False
        if _in_autodiff_transform():  # a table built from transformed parameters must not outlive the transform
            return False
        # A cached table is detached: never serve it where gradients are expected.
        return not (torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()))

    def _cached_table(self) -> Tensor | None:
        """The table for the parameters in the modules now, or None where none should be built."""
        key, sources = self._cache_state()
        if self._cache_table is None or key != self._cache_key:
            parameters = sources[: self._cache_parameter_count]
            if not all(isinstance(t, nn.Parameter) for t in parameters):
                # Tensors swapped in for one call (torch.func.functional_call): computing all V rows
                # for it and keeping them alive would cost far more than the call itself.
                return None
            self.invalidate_cache()  # the old table goes before the new one is built: one table at peak
            self._cache_table = self.export_table()
            self._cache_key = key
            self._cache_sources = [(t, t.untyped_storage()) for t in sources]  # pins their ids and addresses
        return self._cache_table

    def invalidate_cache(self) -> None:
        """Drop the eval-mode table. Needed only after edits that nothing tracks while the layer
        stays in eval mode: in-place writes through ``.data`` or a NumPy view of a parameter, raw
        edits of a module's ``_modules`` dict. (Switching to training mode drops it too.)"""
        self._cache_table = None
        self._cache_key = None
        self._cache_sources = []

    def train(self, mode: bool = True) -> DeFINE:
        # Training is where untracked edits happen (e.g. a hand-written SGD step through p.data).
        if mode:
            self.invalidate_cache()
        return super().train(mode)

    def __getstate__(self) -> dict[str, Any]:
        # pickle and copy.deepcopy (e.g. an EMA copy of the model) leave the table and its
        # bookkeeping (the _cache_* attributes of _drop_cache_state) behind; __setstate__ resets them.
        state = super().__getstate__()  # a copy, without what nn.Module leaves out (a compiled call)
        left_out = ("_cache_", "_pending_id_checks")  # the pending checks hold CUDA events, which do not copy
        return {name: value for name, value in state.items() if not name.startswith(left_out)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._drop_cache_state()
        self._pending_id_checks = deque()

    def extra_repr(self) -> str:
        c = self.config
        text = (
            f"{c.num_embeddings}, {c.embedding_dim}, input_dim={c.input_dim}, max_dim={c.max_dim}, depth={c.depth}, "
            f"max_groups={c.max_groups}, skip={c.skip}, backend={self.backend}"
        )
        # Then, as nn.Embedding's repr does, whatever differs from the defaults.
        defaults = DeFINEConfig(c.num_embeddings, c.embedding_dim)
        shown = ("group_schedule", "width_rule", "group_width_multiple", "skip_into_reduce", "shuffle", "norm",
                 "activation", "dropout", "bias", "scale_embedding", "padding_idx", "norm_eps", "map", "cutoffs",
                 "adaptive_factor")  # fmt: skip
        changed = [f"{name}={getattr(c, name)!r}" for name in shown if getattr(c, name) != getattr(defaults, name)]
        options = (("dedup", self.dedup, False), ("cache", self.cache, "auto"), ("sparse", self.sparse, False),
                   ("validate_ids", self.validate_ids, True))  # fmt: skip
        changed += [f"{name}={value!r}" for name, value, default in options if value != default]
        return ", ".join([text, *changed])


# Layers that have queued deferred id checks. At exit, what their unread checks found is printed on
# stderr (no caller is left to raise to): a bad id that a script's last calls met is still named.
_layers_with_pending_checks: weakref.WeakSet[DeFINE] = weakref.WeakSet()


@atexit.register
def _report_unread_id_checks() -> None:
    for layer in list(_layers_with_pending_checks):
        try:
            layer.check_pending_ids(wait=True)
        except TokenIdError as error:
            print(f"define_ops: at exit, a deferred id check that no call read: {error}", file=sys.stderr)
        except RuntimeError as error:  # e.g. the device failed before exit: nothing left to read
            print(f"define_ops: at exit, deferred id checks could not be read: {error}", file=sys.stderr)


def check_pending_ids(module: nn.Module, wait: bool = True) -> None:
    """``DeFINE.check_pending_ids`` of every DeFINE layer in ``module`` (itself included)."""
    for layer in module.modules():
        if isinstance(layer, DeFINE):
            layer.check_pending_ids(wait)
