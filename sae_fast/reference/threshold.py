"""Plain-torch threshold selection over the encoder pre-activations, in row chunks.

Keeps the entries with ``pre > threshold`` and ``pre > 0`` (where ``relu(pre)·H(pre - θ)``
is non-zero; ``threshold`` a scalar or one per latent; options as the Triton kernel's), as CSR with ascending latent ids in
each row. ``pre`` is computed like ``topk_select`` (``x - b_dec`` rounded once to the
weights' dtype, fp32 accumulation for half types, then rounded to x's dtype, which is the
dtype compared), ``rows_per_chunk`` rows at a time so
the dense block stays bounded: the CPU path of the threshold-based encoders.
"""

from typing import Optional

import torch


def threshold_select(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: Optional[torch.Tensor],
    b_dec: Optional[torch.Tensor],
    threshold: torch.Tensor,
    *,
    relu: bool = True,
    half_band: Optional[float] = None,
    dense: Optional[torch.Tensor] = None,
    max_chunk_elements: int = 1 << 22,
):
    """(values [nnz] in x's dtype, indices [nnz] int64, row_offsets [N+1] int64) of the
    active entries (``pre > threshold``, and ``pre > 0`` when ``relu``) and, with
    ``half_band``, of every entry with ``|pre - threshold| < half_band`` (fp32; fp64 for fp64); ``dense``
    ([N, M]) receives the active values, zeros elsewhere (the triton kernel's options)."""
    n, m = x.shape[0], W_enc.shape[0]
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    W = W_enc.to(acc_dtype)
    thr = threshold.to(x.dtype)
    rows_per_chunk = max(1, max_chunk_elements // max(m, 1))
    values, indices, counts = [], [], []
    for r0 in range(0, n, rows_per_chunk):
        xc = x[r0:r0 + rows_per_chunk].to(acc_dtype)
        if b_dec is not None:
            xc = (xc - b_dec.to(acc_dtype)).to(W_enc.dtype).to(acc_dtype)
        pre = xc @ W.T
        if b_enc is not None:
            pre = pre + b_enc.to(acc_dtype)
        pre = pre.to(x.dtype)
        active = pre > thr
        if relu:
            active &= pre > 0
        active |= torch.isnan(pre)  # NaN is kept (as the kernel does): it must reach the output
        if dense is not None:
            dense[r0:r0 + rows_per_chunk] = torch.where(active, pre, 0)
        keep = active
        if half_band is not None:
            keep = keep | ((pre.to(acc_dtype) - thr.to(acc_dtype)).abs() < half_band)
        values.append(pre[keep])
        indices.append(keep.nonzero()[:, 1])
        counts.append(keep.sum(1))
    row_offsets = torch.zeros(n + 1, device=x.device, dtype=torch.int64)
    if n:
        torch.cumsum(torch.cat(counts), 0, out=row_offsets[1:])
        return torch.cat(values), torch.cat(indices), row_offsets
    return x.new_empty(0), torch.empty(0, device=x.device, dtype=torch.int64), row_offsets
