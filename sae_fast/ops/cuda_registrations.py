"""Python side of the ops declared in csrc (``TORCH_LIBRARY(sae_fast, ...)``): their fake
kernels for tracing, and the torch reference as their CPU kernel so that schema, fake and
autograd paths are exercised on machines without a GPU. Imported once ``sae_fast._C`` loads.

Also exposes the primitives with the same Python signature as the Triton launchers."""

from typing import Optional

import torch

from .. import _C  # noqa: F401  loads the schemas
from ..reference import sparse_gather as _ref


@torch.library.register_fake("sae_fast::csr_gather_sum")
def _csr_gather_sum_fake(coef, col, row_offsets, num_rows, src, bias):
    return src.new_empty((num_rows, src.shape[1]))


@torch.library.register_fake("sae_fast::gathered_dot")
def _gathered_dot_fake(grad, col, src):
    return grad.new_empty(col.shape)


torch.library.impl("sae_fast::csr_gather_sum", "CPU")(_ref.csr_gather_sum)
torch.library.impl("sae_fast::gathered_dot", "CPU")(_ref.gathered_dot)


def csr_gather_sum(
    coef: torch.Tensor,
    col: torch.Tensor,
    row_offsets: Optional[torch.Tensor],
    num_rows: int,
    src: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    return torch.ops.sae_fast.csr_gather_sum(coef, col, row_offsets, num_rows, src, bias)


def gathered_dot(grad: torch.Tensor, col: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    return torch.ops.sae_fast.gathered_dot(grad, col, src)


def entry_dot(grad: torch.Tensor, rows: torch.Tensor, col: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """No CUDA kernel for the per-entry dot of CSR codes (yet): the Triton one serves."""
    from ..triton_kernels import sparse_gather

    return sparse_gather.entry_dot(grad, rows, col, src)
