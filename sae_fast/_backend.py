"""Which implementation computes an op: the one place that decides it.

Backends: ``"cuda"`` (the compiled extension ``sae_fast._C``), ``"triton"``,
``"reference"`` (plain torch) and ``"fastest"`` (per product, the CUDA or the Triton kernel,
whichever measured faster on an H100 for that kind of input; see ``_FastestKernels``).
``None``/``"auto"`` means:

* CUDA tensors: ``"fastest"`` when the extension is built, else ``"triton"``.
* CPU tensors: ``"triton"`` under the Triton interpreter (``TRITON_INTERPRET=1``), else
  ``"reference"``.
* float64 (tests, gradcheck): ``"reference"``, the only backend that keeps fp64 accuracy.

``SAE_FAST_BACKEND`` overrides the default for every op.
"""

import functools
import os

import torch

BACKENDS = ("auto", "fastest", "cuda", "triton", "reference")
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
            return "fastest" if cuda_extension_available() else "triton"
        return "triton" if triton_interpreter_on() else "reference"
    if choice == "reference":
        return choice
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"{op}: backend {choice!r} supports {KERNEL_DTYPES}, got {dtype}; use backend='reference'")
    if choice in ("cuda", "fastest"):
        if device.type != "cuda":
            raise ValueError(f"{op}: backend {choice!r} needs CUDA tensors, got device {device}")
        if not cuda_extension_available():
            raise RuntimeError(
                f"{op}: backend {choice!r} needs the compiled extension sae_fast._C, which is not built; "
                "reinstall with SAE_FAST_BUILD_CUDA=1 (see README) or use backend='triton'"
            )
    if choice == "triton" and device.type == "cpu" and not triton_interpreter_on():
        raise ValueError(
            f"{op}: backend 'triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before importing sae_fast"
        )
    return choice


class _FastestKernels:
    """CUDA kernels, except CSR gather-sums whose rows are short on average (the decoder
    weight gradient of a large dictionary: N*k/M entries per latent), where the Triton
    kernel's one-wide-program-per-row launch beats the CUDA kernel's warp-per-row one.
    H100, bf16, d=2304, weight-gradient backward: 4 entries/row Triton 2.09 ms vs CUDA
    2.50; 0.5/row (M=1M) 4.04 vs 8.47; 16/row 6.51 vs 5.97; 32/row 1.83 vs 1.23
    (benchmarks/results/README.md)."""

    SHORT_ROW_ENTRIES = 12

    @staticmethod
    def csr_gather_sum(coef, col, row_offsets, num_rows, src, bias=None):
        from .ops import cuda_registrations
        from .triton_kernels import sparse_gather

        short = row_offsets is not None and num_rows > 0 and coef.numel() < _FastestKernels.SHORT_ROW_ENTRIES * num_rows
        impl = sparse_gather if short else cuda_registrations
        return impl.csr_gather_sum(coef, col, row_offsets, num_rows, src, bias)

    @staticmethod
    def gathered_dot(grad, col, src):
        from .ops import cuda_registrations

        return cuda_registrations.gathered_dot(grad, col, src)

    @staticmethod
    def entry_dot(grad, rows, col, src):
        from .triton_kernels import sparse_gather

        return sparse_gather.entry_dot(grad, rows, col, src)


def kernels(backend: str):
    """The module implementing the sparse-gather primitives for a resolved backend."""
    if backend == "triton":
        from .triton_kernels import sparse_gather

        return sparse_gather
    if backend == "fastest":
        return _FastestKernels
    if backend == "cuda":
        from .ops import cuda_registrations

        return cuda_registrations
    from .reference import sparse_gather

    return sparse_gather
