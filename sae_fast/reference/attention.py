"""Dense reference of block-sparse attention: the expanded boolean mask, then plain softmax
attention, computed in fp32 (fp64 for fp64 inputs). Same signature as the Triton launchers in
``sae_fast.triton_kernels.block_sparse_attention``. No Triton or CUDA imports here.

Index format (MInference's, with a batch dimension), per batch b, query head h and query
block qb of ``block_m`` rows:

* ``block_count [B, Hq, NQB]`` and ``block_offset [B, Hq, NQB, MAX_BLOCKS]``: key ranges
  ``[s, s + block_n)``, ``s`` any integer (not necessarily aligned);
* ``column_count [B, Hq, NQB]`` and ``column_index [B, Hq, NQB, MAX_COLS]``: single keys.

A query row sees the union of its block's ranges and columns, restricted to keys in
``[0, S)`` and, when ``causal``, to ``j <= i + (S - T)`` (bottom-right alignment). Entries
beyond the counts are ignored; negative counts are 0 and counts above the list length are
clipped to it. Query head h reads key/value head ``h // (Hq // Hkv)``.
"""

from typing import Optional

import torch


def expand_block_sparse_mask(
    block_count: torch.Tensor,
    block_offset: torch.Tensor,
    column_count: torch.Tensor,
    column_index: torch.Tensor,
    T: int,
    S: int,
    *,
    causal: bool = True,
    block_m: int = 64,
    block_n: int = 64,
) -> torch.Tensor:
    """The boolean mask ``[B, Hq, T, S]`` (True = attended) that the four index tensors
    describe."""
    B, H, NQB = block_count.shape
    dev = block_count.device
    keys = torch.zeros(B, H, NQB, S + 1, dtype=torch.bool, device=dev)  # column S: discard bin
    n_blocks = block_offset.shape[-1]
    if n_blocks:
        listed = torch.arange(n_blocks, device=dev) < block_count[..., None].long()
        cols = block_offset[..., None].long() + torch.arange(block_n, device=dev)
        ok = listed[..., None] & (cols >= 0) & (cols < S)
        keys.scatter_(-1, torch.where(ok, cols, S).flatten(-2), True)
    n_cols = column_index.shape[-1]
    if n_cols:
        listed = torch.arange(n_cols, device=dev) < column_count[..., None].long()
        cols = column_index.long()
        ok = listed & (cols >= 0) & (cols < S)
        keys.scatter_(-1, torch.where(ok, cols, S), True)
    rows = torch.arange(T, device=dev)
    mask = keys[:, :, rows // block_m, :S]
    if causal:
        mask = mask & (torch.arange(S, device=dev)[None, :] <= rows[:, None] + (S - T))
    return mask


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _probabilities(q, k, mask, scale):
    """(P [B, Hq, T, S], lse [B, Hq, T]) in the compute dtype; rows that see nothing: P = 0,
    lse = -inf."""
    ct = _compute_dtype(q.dtype)
    group = q.shape[1] // k.shape[1]
    kr = k.to(ct).repeat_interleave(group, dim=1)
    scores = (q.to(ct) @ kr.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.where(mask, torch.exp(scores - safe[..., None]), torch.zeros_like(scores))
    return p, lse


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_count: torch.Tensor,
    block_offset: torch.Tensor,
    column_count: torch.Tensor,
    column_index: torch.Tensor,
    causal: bool = True,
    scale: Optional[float] = None,
    block_m: int = 64,
    block_n: int = 64,
):
    """(out [B, Hq, T, D] in q's dtype, lse [B, Hq, T] fp32, fp64 for fp64 inputs)."""
    T, S = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = expand_block_sparse_mask(block_count, block_offset, column_count, column_index, T, S,
                                    causal=causal, block_m=block_m, block_n=block_n)
    p, lse = _probabilities(q, k, mask, scale)
    group = q.shape[1] // k.shape[1]
    out = p @ v.to(p.dtype).repeat_interleave(group, dim=1)
    return out.to(q.dtype), lse


def block_sparse_attention_backward(
    grad_out: torch.Tensor,
    grad_lse: Optional[torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    block_count: torch.Tensor,
    block_offset: torch.Tensor,
    column_count: torch.Tensor,
    column_index: torch.Tensor,
    causal: bool = True,
    scale: Optional[float] = None,
    block_m: int = 64,
    block_n: int = 64,
):
    """(dq, dk, dv) of ``block_sparse_attention`` given the gradients of out and (optionally)
    lse: with P the masked softmax, dV = Pᵀ·dO, dP = dO·Vᵀ, dS = P∘(dP - rowsum(P∘dP) + dlse),
    dQ = scale·dS·K, dK = scale·dSᵀ·Q; a kv head's dK/dV sum over its query heads."""
    T, S = q.shape[2], k.shape[2]
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    mask = expand_block_sparse_mask(block_count, block_offset, column_count, column_index, T, S,
                                    causal=causal, block_m=block_m, block_n=block_n)
    p, _ = _probabilities(q, k, mask, scale)
    ct = p.dtype
    do = grad_out.to(ct)
    kr = k.to(ct).repeat_interleave(group, dim=1)
    vr = v.to(ct).repeat_interleave(group, dim=1)
    dp = do @ vr.transpose(-1, -2)
    delta = (p * dp).sum(-1, keepdim=True)
    if grad_lse is not None:
        delta = delta - grad_lse.to(ct)[..., None]
    ds = p * (dp - delta)
    dq = (ds @ kr) * scale
    dk = ((ds.transpose(-1, -2) @ q.to(ct)) * scale).view(B, Hkv, group, S, D).sum(2)
    dv = (p.transpose(-1, -2) @ do).view(B, Hkv, group, S, D).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
