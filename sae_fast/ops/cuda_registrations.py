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


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)


def _require(ok, exc, op, message):
    if not ok:
        raise exc(f"{op}: {message}")


def _check_csr_gather_sum(coef, col, row_offsets, num_rows, src, bias):
    """The argument checks of csr_gather_sum_cuda (csrc/sparse_gather.cu), device aside: the
    CPU kernel stands in for the CUDA one in tests, so it must refuse what the CUDA kernel
    refuses (the bare reference dropped entries of an uneven split, returned num_rows - 1
    rows for a short row_offsets, and took any dtype)."""
    op = "csr_gather_sum"
    _require(src.dim() == 2, ValueError, op, f"src must be 2-D [S, d], got shape {tuple(src.shape)}")
    _require(src.dtype in _KERNEL_DTYPES, TypeError, op, f"src must be float32, float16 or bfloat16, got {src.dtype}")
    _require(coef.dim() == 1, ValueError, op, f"coef must be 1-D [E], got shape {tuple(coef.shape)}")
    _require(coef.dtype == src.dtype, TypeError, op, f"coef must have src's dtype {src.dtype}, got {coef.dtype}")
    _require(col.dim() == 1, ValueError, op, f"col must be 1-D [E], got shape {tuple(col.shape)}")
    _require(col.dtype in _INDEX_DTYPES, TypeError, op, f"col must be int32 or int64, got {col.dtype}")
    _require(
        col.numel() == coef.numel(), ValueError, op,
        f"col and coef must have the same length, got {col.numel()} and {coef.numel()}",
    )
    _require(num_rows >= 0, ValueError, op, f"num_rows must be >= 0, got {num_rows}")
    entries = coef.numel()
    if row_offsets is not None:
        _require(
            row_offsets.dim() == 1 and row_offsets.shape[0] == num_rows + 1, ValueError, op,
            f"row_offsets must have shape [num_rows + 1] = [{num_rows + 1}], got {tuple(row_offsets.shape)}",
        )
        _require(row_offsets.dtype == torch.int64, TypeError, op, f"row_offsets must be int64, got {row_offsets.dtype}")
    else:
        _require(
            entries % num_rows == 0 if num_rows > 0 else entries == 0, ValueError, op,
            f"without row_offsets the {entries} entries must split evenly into num_rows = {num_rows} rows",
        )
    if bias is not None:
        _require(
            bias.dim() == 1 and bias.shape[0] == src.shape[1], ValueError, op,
            f"bias must have shape [d] = [{src.shape[1]}], got {tuple(bias.shape)}",
        )
        _require(bias.dtype == src.dtype, TypeError, op, f"bias must have src's dtype {src.dtype}, got {bias.dtype}")
    _require(entries == 0 or src.shape[0] > 0, ValueError, op, f"src has no rows but {entries} entries index it")


def _check_gathered_dot(grad, col, src):
    """The argument checks of gathered_dot_cuda, device aside (see _check_csr_gather_sum)."""
    op = "gathered_dot"
    _require(grad.dim() == 2, ValueError, op, f"grad must be 2-D [N, d], got shape {tuple(grad.shape)}")
    _require(grad.dtype in _KERNEL_DTYPES, TypeError, op, f"grad must be float32, float16 or bfloat16, got {grad.dtype}")
    _require(src.dim() == 2, ValueError, op, f"src must be 2-D [S, d], got shape {tuple(src.shape)}")
    _require(src.dtype == grad.dtype, TypeError, op, f"src must have grad's dtype {grad.dtype}, got {src.dtype}")
    _require(
        src.shape[1] == grad.shape[1], ValueError, op,
        f"src [S, d] and grad [N, d] must share d, got src {tuple(src.shape)} and grad {tuple(grad.shape)}",
    )
    _require(col.dim() == 2, ValueError, op, f"col must be 2-D [N, k], got shape {tuple(col.shape)}")
    _require(col.dtype in _INDEX_DTYPES, TypeError, op, f"col must be int32 or int64, got {col.dtype}")
    _require(
        col.shape[0] == grad.shape[0], ValueError, op,
        f"col [N, k] and grad [N, d] must share N, got col {tuple(col.shape)} and grad {tuple(grad.shape)}",
    )
    _require(col.numel() == 0 or src.shape[0] > 0, ValueError, op, "src has no rows but col indexes it")


def _csr_gather_sum_cpu(coef, col, row_offsets, num_rows, src, bias):
    _check_csr_gather_sum(coef, col, row_offsets, num_rows, src, bias)
    return _ref.csr_gather_sum(coef, col, row_offsets, num_rows, src, bias)


def _gathered_dot_cpu(grad, col, src):
    _check_gathered_dot(grad, col, src)
    return _ref.gathered_dot(grad, col, src)


torch.library.impl("sae_fast::csr_gather_sum", "CPU")(_csr_gather_sum_cpu)
torch.library.impl("sae_fast::gathered_dot", "CPU")(_gathered_dot_cpu)
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
