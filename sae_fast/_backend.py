"""Which implementation computes an op: the one place that decides it.

Backends: ``"cuda"`` (the compiled extension ``sae_fast._C``), ``"triton"`` and
``"reference"`` (plain torch). ``None``/``"auto"`` means:

* CUDA tensors: ``"cuda"`` when the extension is built, else ``"triton"``.
* CPU tensors: ``"triton"`` under the Triton interpreter (``TRITON_INTERPRET=1``), else
  ``"reference"``.
* float64 (tests, gradcheck): ``"reference"``, the only backend that keeps fp64 accuracy.

``SAE_FAST_BACKEND`` overrides the default for every op.
"""

import functools
import os

import torch

BACKENDS = ("auto", "cuda", "triton", "reference")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def cuda_extension_available() -> bool:
    """True when ``sae_fast._C`` was built and loads (a GPU is not needed to load it)."""
    try:
        from . import _C  # noqa: F401
    except ImportError:
        return False
    from .ops import cuda_registrations  # noqa: F401  CPU and fake kernels of its ops
    return True


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(requested, device: torch.device, dtype: torch.dtype, op: str) -> str:
    choice = requested if requested is not None else os.environ.get("SAE_FAST_BACKEND", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {choice!r}")
    if choice == "auto":
        if dtype not in KERNEL_DTYPES:
            return "reference"
        if device.type == "cuda":
            return "cuda" if cuda_extension_available() else "triton"
        return "triton" if triton_interpreter_on() else "reference"
    if choice == "reference":
        return choice
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"{op}: backend {choice!r} supports {KERNEL_DTYPES}, got {dtype}; use backend='reference'")
    if choice == "cuda":
        if device.type != "cuda":
            raise ValueError(f"{op}: backend 'cuda' needs CUDA tensors, got device {device}")
        if not cuda_extension_available():
            raise RuntimeError(
                f"{op}: backend 'cuda' needs the compiled extension sae_fast._C, which is not built; "
                "reinstall with SAE_FAST_BUILD_CUDA=1 (see README) or use backend='triton'"
            )
    if choice == "triton" and device.type == "cpu" and not triton_interpreter_on():
        raise ValueError(
            f"{op}: backend 'triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before importing sae_fast"
        )
    return choice


def kernels(backend: str):
    """The module implementing the sparse-gather primitives for a resolved backend."""
    if backend == "triton":
        from .triton_kernels import sparse_gather

        return sparse_gather
    if backend == "cuda":
        from .ops import cuda_registrations

        return cuda_registrations
    from .reference import sparse_gather

    return sparse_gather
