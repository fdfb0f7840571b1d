"""Record the Triton launches of DeFINE training steps through Triton's real launch path (no GPU).

    python tests/triton_launch_check.py {direct,autotuner} OUT.json

Run by tests/test_triton_launch.py, each mode in its own process (TRITON_INTERPRET unset, the
stand-in driver of define_ops/triton/_fake_driver.py installed): ``direct`` is the eager path as it
ships (define_ops's own config lookup and compiled-kernel reuse, ``_common._tuned_meta`` and
``_common._run``); ``autotuner`` routes every launch through ``wrap_triton``, Triton's autotuner and
``JITFunction.run``, as before those shortcuts existed. Both
write every launch of steady-state steps (compiled kernel, grid, arguments) to OUT.json, with the
number of configs the autotuner benchmarked (none when every key had a single config left) and
every compile of the layers' first steps (kernel, whether it was compiled ahead of its launch).
"""

from __future__ import annotations

import json
import sys

from define_ops.triton import _fake_driver


def step_on_shifted_inputs() -> None:
    """One step op forward and backward on x and grad_out at 16-byte-aligned addresses, then the
    same shapes 4 bytes off them (Triton compiles a kernel per alignment: reusing the aligned one
    would be wrong), then aligned again."""
    import torch
    from torch._library.triton import set_wrap_triton_enabled

    from define_ops.triton.hgt_step import _hgt_step_backward_impl, _hgt_step_impl

    tokens, width, groups = 40, 32, 4
    weight = torch.randn(groups, width // groups, 16)
    norm = torch.ones(16), torch.zeros(16)
    for offset in (0, 1, 0):
        x = torch.randn(tokens * width + offset)[offset:].view(tokens, width)
        grad_out = torch.randn(tokens * 64 + offset)[offset:].view(tokens, 64)
        options = (0, 0, 0, False, "gelu", 0.0, 1e-5)
        with set_wrap_triton_enabled(False):
            out, saved, mean, rstd = _hgt_step_impl(x, weight, None, *norm, None, *options)
            _hgt_step_backward_impl(grad_out, x, weight, None, *norm, None, saved, mean, rstd, *options)


def main(mode: str, out_path: str) -> None:
    _fake_driver.install()
    import torch

    from define_ops import DeFINE, DeFINEConfig
    from define_ops.triton import _common

    if mode == "autotuner":  # the launch as before the direct path: wrap_triton's branch, its tracer off
        _common.is_wrap_triton_enabled = lambda: True
        _common.wrap_triton = lambda kernel: kernel
    elif mode != "direct":
        raise SystemExit(f"mode must be direct or autotuner, got {mode!r}")
    torch.manual_seed(0)
    # Every kernel and flag the layer uses: norm with and without the shuffle (the fused and the
    # row-wise forward epilogue), dropout, the carried e, bias, the Reduce; 1,100 tokens split the
    # weight-gradient launch over several token ranges. Dedup adds the row-count variants, and
    # step_on_shifted_inputs the same kernels at unaligned addresses.
    steps = []
    for shuffle, dedup in ((False, False), (True, True)):
        config = DeFINEConfig.from_preset("awd_ptb", num_embeddings=300, input_dim=16, max_dim=64, embedding_dim=24,
                                          depth=3, max_groups=4, shuffle=shuffle)  # fmt: skip
        for dtype in (torch.float32, torch.bfloat16):
            layer = DeFINE.from_config(config, backend="triton", validate_ids=False, dedup=dedup, dtype=dtype).train()
            ids = torch.randint(0, 300, (1100,))
            steps.append((layer, ids, torch.ones(1100, 24, dtype=dtype)))
    compiles = record_compiles()

    def run_layers() -> None:
        for layer, ids, grad in steps:
            layer.zero_grad(set_to_none=True)
            layer(ids).backward(grad)

    run_layers()  # compiles and autotunes
    layer_compiles = list(compiles)
    step_on_shifted_inputs()

    def run_all() -> None:
        run_layers()
        step_on_shifted_inputs()

    run_all()
    _fake_driver.RECORDER.recording = True
    run_all()
    _fake_driver.RECORDER.recording = False
    from triton.runtime import driver

    launches = [[launch.kernel, launch.binary, list(launch.grid), [repr(a) for a in launch.args]]
                for launch in _fake_driver.RECORDER.launches]  # fmt: skip
    with open(out_path, "w") as out:
        json.dump({"launches": launches, "bench_calls": driver.active.bench_calls, "compiles": layer_compiles}, out)


def record_compiles() -> list:
    """(kernel name, whether ahead of its launch) of every compile from now on: the autotuned
    kernels' candidates are compiled ahead (``_common._precompile``) on the direct path."""
    from triton.runtime.jit import JITFunction

    compiles: list = []
    original = JITFunction._do_compile

    def recording(self, key, signature, device, constexprs, options, attrs, warmup):
        compiles.append((self.fn.__name__, bool(warmup)))
        return original(self, key, signature, device, constexprs, options, attrs, warmup)

    JITFunction._do_compile = recording
    return compiles


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
