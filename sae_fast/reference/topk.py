"""Plain-torch TopK selection over the encoder pre-activations, streamed over latent blocks.

``pre = (x - b_dec) @ W_encᵀ + b_enc`` is computed ``block_m`` latents at a time and merged
into a running top-k per row, so extra memory is O(N·(k + block_m)), never O(N·M): the
same plan as the fused kernels, and the CPU path of ``sae_fast.topk_encode``.

Numerics, as the fused kernels: ``x - b_dec`` is formed in fp32 and rounded once to the
weights' dtype (the GEMM's operand; a plain half-precision torch computation rounds it too),
products accumulate in fp32, and the selection orders the fp32 pre-activations, which are
rounded to x's dtype only when returned (so in half precision, equal returned values may
come in either id order).

Order (the package's documented tie rule): descending ``pre``, and among equal values the
smaller latent index first. Merging keeps it: the running list is already in that order and
every latent of a new block has a larger index than every latent seen before, so a stable
descending sort of ``[running, block]`` puts an old entry before a new one of equal value.
A NaN pre-activation ranks above every number (torch.sort's order, and the kernels').
"""

from typing import NamedTuple, Optional

import torch


class TopKSelection(NamedTuple):
    pre: torch.Tensor  # [N, k] selected pre-activations (before ReLU), descending
    indices: torch.Tensor  # [N, k] int64 latent ids
    aux_pre: Optional[torch.Tensor]  # [N, k_aux] among dead latents, or None
    aux_indices: Optional[torch.Tensor]


def _merge(run_v, run_i, new_v, new_i, k):
    """The k first of ``[running, block]`` in (descending value, position) order, without a
    full sort: the k-th value by ``torch.topk`` (a value, so its tie order does not matter),
    every entry above it, and the first entries equal to it by position; then a stable sort
    of those k alone. Position order is latent order among equal values (see module doc)."""
    v = torch.cat([run_v, new_v], dim=1)
    i = torch.cat([run_i, new_i], dim=1)
    if v.shape[1] <= k or bool(torch.isnan(v).any()):  # NaN rows: order unspecified, any k will do
        v, order = torch.sort(v, dim=1, descending=True, stable=True)
        return v[:, :k], torch.gather(i, 1, order[:, :k])
    kth = torch.topk(v, k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    above = v > kth
    equal = v == kth
    room = k - above.sum(dim=1, keepdim=True)
    keep = above | (equal & (torch.cumsum(equal, dim=1) <= room))
    pos = keep.nonzero()[:, 1].view(v.shape[0], k)  # row-major: each row's positions ascending
    v, i = torch.gather(v, 1, pos), torch.gather(i, 1, pos)
    v, order = torch.sort(v, dim=1, descending=True, stable=True)
    return v, torch.gather(i, 1, order)


def topk_select(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: Optional[torch.Tensor],
    k: int,
    *,
    b_dec: Optional[torch.Tensor] = None,
    dead_mask: Optional[torch.Tensor] = None,
    k_aux: int = 0,
    block_m: int = 4096,
) -> TopKSelection:
    """Top-``k`` pre-activations per row (and top-``k_aux`` among ``dead_mask`` latents), in
    the dtype of ``x`` with fp32 accumulation for half types. Rows with fewer than ``k_aux``
    dead latents get ``-inf`` values and index 0 in the missing slots."""
    n, m = x.shape[0], W_enc.shape[0]
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xc = x.to(acc_dtype)
    if b_dec is not None:
        xc = (xc - b_dec.to(acc_dtype)).to(W_enc.dtype).to(acc_dtype)
    dev = x.device
    run_v = torch.empty(n, 0, device=dev, dtype=acc_dtype)
    run_i = torch.empty(n, 0, device=dev, dtype=torch.int64)
    aux_v, aux_i = run_v, run_i
    want_aux = dead_mask is not None and k_aux > 0
    for m0 in range(0, m, block_m):
        m1 = min(m, m0 + block_m)
        pre = xc @ W_enc[m0:m1].to(acc_dtype).T
        if b_enc is not None:
            pre = pre + b_enc[m0:m1].to(acc_dtype)
        ids = torch.arange(m0, m1, device=dev).expand(n, -1)
        run_v, run_i = _merge(run_v, run_i, pre, ids, k)
        if want_aux:  # only dead columns compete (a dead latent's real -inf must not tie with live ones)
            cols = dead_mask[m0:m1].to(dev).nonzero().view(-1)
            aux_v, aux_i = _merge(aux_v, aux_i, pre[:, cols], ids[:, cols], k_aux)
    if want_aux:
        short = k_aux - aux_v.shape[1]  # fewer dead latents than k_aux: pad the missing slots
        if short > 0:
            aux_v = torch.cat([aux_v, aux_v.new_full((n, short), float("-inf"))], dim=1)
            aux_i = torch.cat([aux_i, aux_i.new_zeros((n, short))], dim=1)
        missing = torch.arange(aux_v.shape[1], device=dev) >= dead_mask.to(dev).sum()  # (a real -inf stays)
        aux_i = aux_i.masked_fill(missing, 0)
        return TopKSelection(run_v.to(x.dtype).contiguous(), run_i.contiguous(), aux_v.to(x.dtype).contiguous(), aux_i.contiguous())
    return TopKSelection(run_v.to(x.dtype).contiguous(), run_i.contiguous(), None, None)
