"""Workloads shared by the benchmark suite and examples/layer_check.py: one DeFINE preset at one
size on one provider, as a ``step()`` to time.

Providers: ``reference`` (the authors' way, eager, torch dropout), ``reference_compiled``
(torch.compile of it), our backends (``cpu``, ``cuda``, ``triton`` where they run), the GPU
backends' step captured once as a CUDA graph and replayed (``cuda_graph``, ``triton_graph``: the
same kernels with no host work, what ``torch.compile(mode="reduce-overhead")`` or
``torch.cuda.make_graphed_callables`` give a training loop), and ``embedding`` (a plain
``nn.Embedding(V, m)`` step at the same token count).
"""

from __future__ import annotations

import functools
import os
import platform
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import _backend, reference
from .config import PRESET_TOKENS, DeFINEConfig
from .layer import DeFINE

QUICK_TOKENS = 128
QUICK_VOCAB = 2_000


def _version() -> str:
    from . import __version__

    return __version__


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def providers_for(dev: torch.device) -> list[str]:
    ours = [b for b in ("cpu", "cuda", "triton") if b in _backend.available_backends(dev)]
    if dev.type == "cpu":  # the Triton interpreter is a correctness tool, not a CPU backend
        ours = [b for b in ours if b != "triton"]
    graphs = [f"{b}_graph" for b in ours if dev.type == "cuda"]
    # torch.compile of our layer: on a GPU with mode="reduce-overhead" (CUDA graphs), what a user
    # removes the host time with; not among the CPU defaults (it would only add compile time to CI)
    compiled = [f"{b}_compiled" for b in ours if dev.type == "cuda"]
    return ["reference", "reference_compiled", *ours, *graphs, *compiled, "embedding"]


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@dataclass
class Workload:
    """One preset at one size on one provider: ``step()`` runs the timed work; ``enqueue()`` is the
    same work without the final synchronisation (its host time alone, see scripts/gpu_profile.py)."""

    preset: str
    provider: str
    mode: str  # "fwd_bwd", "fwd" or "fwd_cached" (see make_workload)
    tokens: int
    config: DeFINEConfig
    dtype: torch.dtype
    step: Callable[[], None]
    enqueue: Callable[[], None]

    def extra_info(self) -> dict:
        c = self.config
        flops = 2 * c.macs_per_token() * self.tokens * (3 if self.mode == "fwd_bwd" else 1)
        return {
            "preset": self.preset,
            "provider": self.provider,
            "mode": self.mode,
            "tokens": self.tokens,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": device_name(),
            "torch": torch.__version__,
            "define_ops": _version(),
            "gflop": flops / 1e9,
            "config": {k: v for k, v in c.to_dict().items()},
        }


def make_workload(
    preset: str,
    provider: str,
    mode: str,
    quick: bool,
    dtype: torch.dtype,
    ids: torch.Tensor | None = None,
    dedup: bool = False,
    group_width_multiple: int = 1,
) -> Workload:
    """``mode``: "fwd_bwd" (training step), "fwd" (eval, no grad, no cache: inference without
    the table) or "fwd_cached" (eval, no grad, with the inference table). ``group_width_multiple``
    > 1 runs the preset with that config option; the workload is then labelled
    ``<preset>+gw<multiple>``, a configuration of its own in the results."""
    dev = device()
    overrides = {"num_embeddings": QUICK_VOCAB} if quick and ids is None else {}
    config = DeFINEConfig.from_preset(preset, group_width_multiple=group_width_multiple, **overrides)
    label = preset if group_width_multiple == 1 else f"{preset}+gw{group_width_multiple}"
    if ids is None:
        tokens = QUICK_TOKENS if quick else PRESET_TOKENS[preset]
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, config.num_embeddings, (tokens,), generator=gen)
    ids = ids.reshape(-1).to(dev)
    tokens = ids.numel()
    training = mode == "fwd_bwd"

    graphed = provider.endswith("_graph")
    if graphed:
        provider = provider.removesuffix("_graph")
        # dedup captures on Triton only: its distinct ids have static shapes; the cuda backend's need a host read
        if provider not in ("cuda", "triton") or dev.type != "cuda" or (dedup and provider != "triton"):
            raise ValueError(
                f"provider {provider}_graph: a CUDA graph of the cuda or triton backend (with dedup: triton only)"
            )
    compiled = provider.endswith("_compiled") and provider != "reference_compiled"
    if compiled:
        provider = provider.removesuffix("_compiled")
        if provider not in ("cpu", "cuda", "triton") or (dedup and provider != "triton"):
            raise ValueError(
                f"provider {provider}_compiled: torch.compile of one of our backends (with dedup: triton only; the "
                f"others run the plain path under compile)"
            )
    if provider == "embedding":
        module = torch.nn.Embedding(config.num_embeddings, config.embedding_dim, device=dev, dtype=dtype)
        forward = module
    else:
        backend = provider if provider in ("cpu", "cuda", "triton") else "reference"
        # validate_ids=False: the id range check costs a host synchronisation per call on CUDA,
        # which a training loop with known-good ids turns off (nn.Embedding does not check either).
        module = DeFINE.from_config(config, backend=backend, device=dev, dtype=dtype, dedup=dedup, validate_ids=False)
        module.cache = "auto" if mode == "fwd_cached" else "off"
        if provider == "reference":
            forward = _authors_way(module)
        elif provider == "reference_compiled":
            forward = torch.compile(_authors_way(module))
        elif compiled:  # reduce-overhead: CUDA graphs (cudagraph trees) around the compiled step
            forward = torch.compile(module, mode="reduce-overhead" if dev.type == "cuda" else None, fullgraph=True)
        else:
            forward = module
    module.train(training)
    params = [p for p in module.parameters()]
    grad_out = torch.randn(tokens, config.embedding_dim, device=dev, dtype=dtype)

    if training:

        def enqueue() -> None:
            for p in params:
                p.grad = None
            forward(ids).backward(grad_out)

    else:

        def enqueue() -> None:
            with torch.no_grad():
                forward(ids)

    if graphed:
        enqueue = graph_replay(module, forward, ids, grad_out if training else None)
        provider = f"{provider}_graph"
    elif compiled:
        provider = f"{provider}_compiled"

    def step() -> None:
        enqueue()
        synchronize()

    return Workload(label, provider, mode, tokens, config, dtype, step, enqueue)


def graph_replay(
    module: torch.nn.Module,
    forward: Callable[[torch.Tensor], torch.Tensor],
    ids: torch.Tensor,  # [T]
    grad_out: torch.Tensor | None,  # [T, m], or None for a forward-only step
) -> Callable[[], None]:
    """``forward(ids)`` (and its backward with ``grad_out``) captured once as a CUDA graph; the
    returned function replays it (without synchronising). Dropout seeds are drawn inside the graph,
    so replays differ."""

    def body() -> None:
        if grad_out is None:
            with torch.no_grad():
                forward(ids)
        else:
            forward(ids).backward(grad_out)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capturing stream, as capture requires
        for _ in range(3):
            body()
    torch.cuda.current_stream().wait_stream(side)
    module.zero_grad(set_to_none=True)  # the captured backward allocates the grads from the graph's pool
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()

    def replay() -> None:
        graph.replay()

    replay.graph = graph  # keeps the graph (and its memory pool) alive with the function
    return replay


def _authors_way(module: DeFINE) -> Callable[[torch.Tensor], torch.Tensor]:
    """The reference unit with torch's own dropout: what users write today."""

    def plain(ids: torch.Tensor) -> torch.Tensor:
        return reference.define_forward_ref(
            ids, module.weight, module._layer_params(), module.reduce.weight, module.reduce.bias, module.config,
            training=module.training, dropout_rng="torch",
        )  # fmt: skip

    def forward(ids: torch.Tensor) -> torch.Tensor:
        if module.dedup:  # the same distinct-ids trick, written the straightforward way
            distinct, inverse = torch.unique(ids, return_inverse=True)
            return plain(distinct).index_select(0, inverse)
        return plain(ids)

    return forward


def median_ms(step: Callable[[], None], rounds: int = 10, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def group_view(t: torch.Tensor, groups: int) -> torch.Tensor:
    """[T, width] as [g, T, width / g] with strides (width / g, width, 1): the grouped GEMMs'
    operands as the CUDA backend views them (csrc/cuda/hgt_step.cu's group_view)."""
    tokens, width = t.shape
    return t.as_strided((groups, tokens, width // groups), (width // groups, width, 1))


@functools.cache
def _sleep_cycles_per_ms() -> float:
    """GPU clock cycles that torch.cuda._sleep spins per millisecond on this device."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    return 10_000_000 / start.elapsed_time(end)


def enqueue_ms(enqueue: Callable[[], object], rounds: int = 10, sleep_ms: float = 50.0) -> tuple[float, bool]:
    """The host time of one ``enqueue()`` (median of ``rounds``, after one warm-up call), and whether
    it waited for the device. On a GPU each call is made behind a sleep kernel that keeps the
    device busy for ``sleep_ms``, far longer than the call's launches take: no launch waits for
    the device, so the time is the host's alone, and a call that took half the sleep or more
    waited somewhere (a hidden host synchronisation). On the CPU the host time is the whole call."""
    if not torch.cuda.is_available():
        return median_ms(enqueue, rounds=rounds, warmup=1), False
    cycles = int(sleep_ms * _sleep_cycles_per_ms())
    enqueue()
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        torch.cuda._sleep(cycles)
        start = time.perf_counter()
        enqueue()
        times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    return sorted(times)[len(times) // 2], max(times) >= sleep_ms / 2


# ----------------------------------------------------------------------------- real-text batches
def data_dir() -> Path:
    """Where the shared corpora live: $DEFINE_OPS_DATA, else ../shared/data beside the repo."""
    env = os.environ.get("DEFINE_OPS_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


@functools.lru_cache(maxsize=4)
def wikitext2_batch(batch: int = 60, bptt: int = 140, window: int = 0) -> torch.Tensor:
    """One [bptt, batch] window of WikiText-2's training stream, as a word-level LM sees it:
    whitespace tokens plus <eos> per line, ids by descending train frequency (the order
    adaptive input and softmax assume), split into ``batch`` contiguous streams."""
    path = data_dir() / "wikitext-2" / "train.txt"
    if not path.is_file():
        raise FileNotFoundError(f"WikiText-2 not found at {path} (set DEFINE_OPS_DATA)")
    stream = _wikitext2_stream(str(path))
    per_stream = stream.numel() // batch
    streams = stream[: per_stream * batch].reshape(batch, per_stream).t()  # [steps, batch]
    return streams[window * bptt : (window + 1) * bptt].clone()


@functools.lru_cache(maxsize=2)
def _wikitext2_stream(path: str) -> torch.Tensor:
    # ~3 s for the 2M-token file: read once per process, not once per benchmark case
    tokens = [word for line in Path(path).read_text(encoding="utf-8").splitlines() for word in [*line.split(), "<eos>"]]
    ids_of = {word: rank for rank, (word, _) in enumerate(Counter(tokens).most_common())}
    return torch.tensor([ids_of[word] for word in tokens], dtype=torch.int64)
