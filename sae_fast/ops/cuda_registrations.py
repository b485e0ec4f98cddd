"""Python side of the ops declared in csrc (``TORCH_LIBRARY(sae_fast, ...)``): their fake
kernels for tracing, and the torch reference as their CPU kernel so that schema, fake and
autograd paths are exercised on machines without a GPU. Imported once ``sae_fast._C`` loads.

Also exposes the primitives with the same Python signature as the Triton launchers."""

from typing import Optional

import torch

from .. import _C  # noqa: F401  loads the schemas
from ..reference import attention_index as _ref_index
from ..reference import sparse_gather as _ref


@torch.library.register_fake("sae_fast::csr_gather_sum")
def _csr_gather_sum_fake(coef, col, row_offsets, num_rows, src, bias):
    return src.new_empty((num_rows, src.shape[1]))


@torch.library.register_fake("sae_fast::gathered_dot")
def _gathered_dot_fake(grad, col, src):
    return grad.new_empty(col.shape)


# An extension built before this op existed lacks its schema: leave it out (the op then
# runs on the torch reference) rather than fail to load the others.
HAS_VERTICAL_SLASH_INDEX = hasattr(torch.ops.sae_fast, "convert_vertical_slash_index")


def _convert_vertical_slash_index_fake(vertical_idx, slash_idx, seq_lens, context_len, block_m, block_n):
    B, H, nv = vertical_idx.shape
    nqb, max_blocks, max_cols = _ref_index.index_buffer_sizes(context_len, block_m, block_n, nv, slash_idx.shape[2])
    i32 = torch.int32
    return (
        vertical_idx.new_empty((B, H, nqb), dtype=i32),
        vertical_idx.new_empty((B, H, nqb, max_blocks), dtype=i32),
        vertical_idx.new_empty((B, H, nqb), dtype=i32),
        vertical_idx.new_empty((B, H, nqb, max_cols), dtype=i32),
    )


def _convert_vertical_slash_index_cpu(vertical_idx, slash_idx, seq_lens, context_len, block_m, block_n):
    from .attention_index import check_index_arguments

    check_index_arguments(vertical_idx, slash_idx, seq_lens, context_len, block_m, block_n)
    return _ref_index.vertical_slash_index(vertical_idx, slash_idx, seq_lens, context_len, block_m, block_n)


torch.library.impl("sae_fast::csr_gather_sum", "CPU")(_ref.csr_gather_sum)
torch.library.impl("sae_fast::gathered_dot", "CPU")(_ref.gathered_dot)
if HAS_VERTICAL_SLASH_INDEX:
    torch.library.register_fake("sae_fast::convert_vertical_slash_index")(_convert_vertical_slash_index_fake)
    torch.library.impl("sae_fast::convert_vertical_slash_index", "CPU")(_convert_vertical_slash_index_cpu)


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


def convert_vertical_slash_index(vertical_idx, slash_idx, seq_lens, context_len: int, block_m: int, block_n: int):
    """The extension's vertical-slash index conversion (CUDA kernel on CUDA tensors, the torch
    reference on CPU ones); the format is specified in ``sae_fast.ops.attention_index``."""
    return torch.ops.sae_fast.convert_vertical_slash_index(vertical_idx, slash_idx, seq_lens, context_len, block_m, block_n)
