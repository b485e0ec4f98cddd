"""Reference for the two sparse products that sparse decode (and the encoders' backward
passes) are built from.

``csr_gather_sum``: out[r] = sum_{e in row r} coef[e] * src[col[e]] (+ bias)
``gathered_dot``:   out[n, j] = <grad[n], src[col[n, j]]>

Neither ever builds an [N, M] or [N, k, d] tensor: the first is an ``embedding_bag`` over
bags, the second works through rows in chunks of bounded size.
"""

from typing import Optional

import torch
import torch.nn.functional as F

_CHUNK_ELEMENTS = 1 << 22  # bound on the [rows, k, d] temporary of gathered_dot


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def csr_gather_sum(
    coef: torch.Tensor,
    col: torch.Tensor,
    row_offsets: Optional[torch.Tensor],
    num_rows: int,
    src: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """out [num_rows, d] in src's dtype. Rows are CSR segments of (coef, col); with
    ``row_offsets=None`` every row holds ``coef.numel() // num_rows`` consecutive entries."""
    d = src.shape[1]
    cdt = _compute_dtype(src.dtype)
    out_dtype = src.dtype
    if num_rows == 0 or d == 0:  # (embedding_bag rejects a zero-width table)
        return src.new_empty((num_rows, d))
    if row_offsets is None:
        k = coef.numel() // num_rows
        row_offsets = torch.arange(0, num_rows + 1, device=src.device, dtype=torch.int64) * k
    if coef.numel() == 0:
        out = torch.zeros(num_rows, d, device=src.device, dtype=cdt)
    else:
        out = F.embedding_bag(
            col.to(torch.int64),
            src.to(cdt),
            row_offsets.to(torch.int64),
            mode="sum",
            per_sample_weights=coef.to(cdt),
            include_last_offset=True,
        )
    if bias is not None:
        out = out + bias.to(cdt)
    return out.to(out_dtype)


def gathered_dot(grad: torch.Tensor, col: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """out [N, k] in grad's dtype: dot products of each row of grad with the src rows it names."""
    n_rows, k = col.shape
    d = grad.shape[1]
    cdt = _compute_dtype(grad.dtype)
    out = torch.empty(n_rows, k, device=grad.device, dtype=cdt)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, k * d))
    for start in range(0, n_rows, rows_per_chunk):
        stop = min(n_rows, start + rows_per_chunk)
        gathered = src[col[start:stop].to(torch.int64)].to(cdt)  # [rows, k, d], bounded
        out[start:stop] = torch.einsum("rkd,rd->rk", gathered, grad[start:stop].to(cdt))
    return out.to(grad.dtype)


def entry_dot(grad: torch.Tensor, rows: torch.Tensor, col: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """out [nnz] in grad's dtype: <grad[rows[e]], src[col[e]]>, in bounded chunks."""
    nnz, d = col.numel(), grad.shape[1]
    cdt = _compute_dtype(grad.dtype)
    out = torch.empty(nnz, device=grad.device, dtype=cdt)
    step = max(1, _CHUNK_ELEMENTS // max(1, d))
    for start in range(0, nnz, step):
        r, c = rows[start:start + step].long(), col[start:start + step].long()
        out[start:start + step] = (grad[r].to(cdt) * src[c].to(cdt)).sum(1)
    return out.to(grad.dtype)
