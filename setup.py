"""Build script: the Python package plus, when asked, the CUDA extension ``sae_fast._C``.

Environment variables (all optional):

SAE_FAST_BUILD_CUDA   auto (default) | 1 | 0. ``auto`` builds the extension when torch is a
                      CUDA build and nvcc is found; ``1`` makes a missing toolchain an error;
                      ``0`` skips it. A GPU is never needed (nor queried) to build.
SAE_FAST_CUDA_ARCHS   semicolon list of compute capabilities, default ``80;90``. Machine code
                      is emitted for each, plus PTX for the newest so later GPUs can JIT it.
SAE_FAST_PTXAS_VERBOSE  1 to print ptxas register / shared memory / spill reports.
MAX_JOBS              parallel compile jobs (read by torch's ninja builder).
CUDA_HOME             CUDA toolkit root; defaults to /usr/local/cuda when that exists.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

PACKAGES = find_packages(include=["sae_fast", "sae_fast.*"]) + ["sae_fast.triton_kernels"]
# triton_kernels/ lives at the top of the repository but is installed *inside* our package:
# a top-level ``triton_kernels`` module would shadow OpenAI's package of that name.
PACKAGE_DIR = {"sae_fast.triton_kernels": "triton_kernels"}


def _want_cuda():
    mode = os.environ.get("SAE_FAST_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"SAE_FAST_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
        # Set before torch.utils.cpp_extension is imported: it resolves CUDA_HOME once.
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        if mode == "1":
            sys.exit(f"SAE_FAST_BUILD_CUDA=1 but torch cannot be imported: {e}")
        return False
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is not a CUDA build")
    home = cpp_extension.CUDA_HOME
    if home is None or not os.path.exists(os.path.join(home, "bin", "nvcc")):
        problems.append("nvcc not found (set CUDA_HOME)")
    if problems:
        if mode == "1":
            sys.exit("SAE_FAST_BUILD_CUDA=1 but the extension cannot be built: " + "; ".join(problems))
        print("sae_fast: skipping the CUDA extension: " + "; ".join(problems), file=sys.stderr)
        return False
    return True


def _arch_flags():
    archs = [a.strip().replace(".", "") for a in os.environ.get("SAE_FAST_CUDA_ARCHS", "80;90").split(";") if a.strip()]
    if not archs or not all(a.isdigit() for a in archs):
        sys.exit(f"SAE_FAST_CUDA_ARCHS must look like '80;90', got {os.environ.get('SAE_FAST_CUDA_ARCHS')!r}")
    archs = sorted(set(archs), key=int)
    # Explicit flags: with no GPU present torch's own arch detection would fail.
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a[:-1]}.{a[-1]}" for a in archs)
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    flags.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    return flags


def _extensions():
    if not _want_cuda():
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/*.cu"))
    # No -std flag: torch adds the standard its headers need (C++17 up to 2.x, C++20 from 2.14).
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + _arch_flags()
    if os.environ.get("SAE_FAST_PTXAS_VERBOSE") == "1":
        nvcc.append("-Xptxas=-v")
    ext = CUDAExtension(
        name="sae_fast._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
