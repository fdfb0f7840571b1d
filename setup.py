"""Builds define_ops and its compiled kernels against the torch of the interpreter running pip.

The extension must be compiled against the exact torch it will be imported with (C++ ABI), so:
- ``pip install --no-build-isolation .`` (recommended) builds in the current environment;
- plain ``pip install .`` runs this file in pip's isolated build environment, which has no torch
  (pyproject.toml deliberately does not list it); we then put the target environment's
  site-packages on sys.path and build against its torch, never a second copy.

Switches: ``DEFINE_OPS_SKIP_CUDA_BUILD=1`` (CPU kernels only), ``TORCH_CUDA_ARCH_LIST``
(default "8.0;9.0" when building CUDA kernels), ``MAX_JOBS``, ``DEBUG=1`` (-O0 -g).
"""

from __future__ import annotations

import glob
import os
import sys
import sysconfig

from setuptools import find_packages, setup


def _import_target_torch():
    try:
        import torch  # noqa: F401
    except ImportError:
        for key in ("purelib", "platlib"):
            path = sysconfig.get_paths()[key]
            if path not in sys.path:
                sys.path.append(path)
        import torch  # noqa: F401  (raises with a clear message if torch is really missing)
    return torch


torch = _import_target_torch()
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
DEBUG = os.getenv("DEBUG", "0") == "1"


def _extensions():
    cxx_flags = ["-O0", "-g"] if DEBUG else ["-O3"]
    # -fopenmp: at::parallel_for and `omp simd`; no errno / FP traps so GCC can vectorize the
    # epilogue loops (PyTorch builds with the same two flags).
    cxx_flags += ["-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-DPy_LIMITED_API=0x030A0000"]
    sources = ["csrc/define_ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    build_cuda = (
        os.getenv("DEFINE_OPS_SKIP_CUDA_BUILD", "0") != "1"
        and torch.version.cuda is not None
        and bool(cuda_sources)
        and torch.utils.cpp_extension.CUDA_HOME is not None
    )
    common = dict(
        name="define_ops._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )
    if build_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        # No --use_fast_math: the epilogues' erf/exp/sqrt/division must stay IEEE-exact enough for the
        # float32/float64 parity tests; they are memory-bound, so precise math costs nothing measurable.
        nvcc_flags = ["-O0", "-g", "-G"] if DEBUG else ["-O3"]
        nvcc_flags += ["-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        ext = CUDAExtension(
            sources=sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags + ["-DDEFINE_OPS_WITH_CUDA"], "nvcc": nvcc_flags},
            **common,
        )
    else:
        ext = CppExtension(sources=sources, extra_compile_args={"cxx": cxx_flags}, **common)
    return [ext]


setup(
    packages=find_packages(include=["define_ops", "define_ops.*"]),
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
