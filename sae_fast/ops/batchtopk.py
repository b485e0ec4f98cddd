"""``sae_fast::batchtopk_encode``: the k·N largest encoder activations of a whole batch, as CSR.

Training mode keeps the ``k·N`` largest ``relu(pre)`` over all N rows and M latents (rows
get different counts); inference mode (a ``threshold`` given) keeps ``pre > threshold``.
Either way the result is compact CSR with ascending latent ids in each row, and entries whose
activation is zero are not stored (they decode to nothing and get no gradient through the
ReLU), so ``values`` are the positive pre-activations themselves.

Order of the batch selection (the tie rule): descending value, then the smaller row, then
the smaller latent id, i.e. row-major order among equal values. It is computed exactly
without an ``[N, M]`` tensor:

1. every row's ``C = 2k`` best candidates come from the fused TopK selection;
2. ``v*`` = the k·N-th largest candidate (over the union of the lists);
3. a row whose list is full (C < M) and whose last candidate is positive and ``>= v*`` may hold more
   winners beyond it: those rows only are recomputed with 4x the capacity, and 2-3 repeat.
   When no row is saturated, the union's top k·N is the batch's top k·N (a winner beyond a
   row's list would be below that row's last candidate, itself below k·N union entries).

Backward: the same sparse products as TopK, with explicit row ids (``csr_grad_weight``).
"""

from typing import NamedTuple, Optional

import torch

from .. import _backend
from ..reference.threshold import threshold_select
from ..reference.topk import topk_select
from . import _checks
from .decode import csr_encoder_backward

_OP = "batchtopk_encode"


class BatchTopKCodes(NamedTuple):
    """CSR codes: row n holds ``values[row_offsets[n]:row_offsets[n+1]]`` at latents
    ``indices[...]`` (ascending). ``threshold`` (0-d, x's dtype): in training mode the smallest
    kept value (0 when nothing is kept), for a running inference threshold; in inference mode
    the threshold used."""

    values: torch.Tensor
    indices: torch.Tensor
    row_offsets: torch.Tensor
    threshold: torch.Tensor


def _candidates(x, W_enc, b_enc, b_dec, c, backend):
    """Each row's c best (pre [r, c] descending, latent [r, c]) under the TopK tie rule."""
    if backend == "reference":
        sel = topk_select(x, W_enc, b_enc, c, b_dec=b_dec)
        return sel.pre, sel.indices
    from ..triton_kernels import topk_encode as fused

    pre, idx, _, _ = fused.topk_encode(x, W_enc, b_enc, b_dec, c)
    return pre, idx


def _batch_select(x, W_enc, b_enc, b_dec, k, backend):
    n, m = x.shape[0], W_enc.shape[0]
    total = k * n
    cap = min(m, 2 * k)
    pre, idx = _candidates(x, W_enc, b_enc, b_dec, cap, backend)
    vals, lats = pre.reshape(-1), idx.reshape(-1)
    rows = torch.arange(n, device=x.device).repeat_interleave(cap)
    caps = torch.full((n,), cap, device=x.device, dtype=torch.int64)
    last = pre[:, -1]
    while True:
        v_star = torch.topk(vals, total, sorted=False).values.min()
        # (an entry beyond a list is <= its last one: if that is <= 0 it is dropped anyway)
        saturated = (caps < m) & (last >= v_star) & (last > 0)
        if not bool(saturated.any()):
            break
        again = saturated.nonzero().view(-1)
        new_cap = min(m, 4 * int(caps[again].max()))
        pre2, idx2 = _candidates(x[again], W_enc, b_enc, b_dec, new_cap, backend)
        keep = ~saturated[rows]  # drop the old, shorter lists of the recomputed rows
        vals = torch.cat([vals[keep], pre2.reshape(-1)])
        lats = torch.cat([lats[keep], idx2.reshape(-1)])
        rows = torch.cat([rows[keep], again.repeat_interleave(new_cap)])
        caps[again] = new_cap
        last[again] = pre2[:, -1]
    # Winners: everything above v*, then the first (row, latent)-ordered entries equal to it.
    above = vals > v_star
    tied = (vals == v_star).nonzero().view(-1)
    room = total - int(above.sum())
    tie_order = torch.argsort(rows[tied] * m + lats[tied])
    winners = above.clone()
    winners[tied[tie_order[:room]]] = True
    winners &= vals > 0
    vals, lats, rows = vals[winners], lats[winners], rows[winners]
    order = torch.argsort(rows * m + lats)
    counts = torch.bincount(rows, minlength=n)
    row_offsets = torch.zeros(n + 1, device=x.device, dtype=torch.int64)
    torch.cumsum(counts, 0, out=row_offsets[1:])
    threshold = vals.min() if vals.numel() else x.new_zeros(())
    return vals[order], lats[order], row_offsets, threshold.reshape(())


def _threshold_select(x, W_enc, b_enc, b_dec, threshold, k, backend):
    if backend == "reference":
        return threshold_select(x, W_enc, b_enc, b_dec, threshold)
    from ..triton_kernels import threshold_encode as fused

    return fused.threshold_encode(x, W_enc, b_enc, b_dec, threshold, capacity=max(16, 2 * k))


@torch.library.custom_op("sae_fast::batchtopk_encode", mutates_args=())
def batchtopk_encode_op(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: Optional[torch.Tensor],
    b_dec: Optional[torch.Tensor],
    threshold: Optional[torch.Tensor],
    k: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if threshold is None:
        return _batch_select(x, W_enc, b_enc, b_dec, k, backend)
    vals, idx, row_offsets = _threshold_select(x, W_enc, b_enc, b_dec, threshold, k, backend)
    return vals, idx, row_offsets, threshold.to(x.dtype).clone()


@batchtopk_encode_op.register_fake
def _(x, W_enc, b_enc, b_dec, threshold, k, backend):
    nnz = torch.library.get_ctx().new_dynamic_size()
    return (x.new_empty((nnz,)), x.new_empty((nnz,), dtype=torch.int64),
            x.new_empty((x.shape[0] + 1,), dtype=torch.int64), x.new_empty(()))


def _setup_context(ctx, inputs, output):
    x, W_enc, b_enc, b_dec, threshold, k, backend = inputs
    _, indices, row_offsets, _ = output
    ctx.save_for_backward(x, W_enc, b_dec, indices, row_offsets)
    ctx.has_b_enc = b_enc is not None
    ctx.backend = backend


def _backward(ctx, grad_values, _gi, _go, _gt):
    x, W_enc, b_dec, indices, row_offsets = ctx.saved_tensors
    grads = csr_encoder_backward(grad_values, x, W_enc, b_dec, indices, row_offsets, ctx.needs_input_grad[:4],
                                 ctx.has_b_enc, ctx.backend)
    return (*grads, None, None, None)


batchtopk_encode_op.register_autograd(_backward, setup_context=_setup_context)


def batchtopk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: Optional[torch.Tensor],
    k: int,
    *,
    b_dec: Optional[torch.Tensor] = None,
    threshold=None,
    index_dtype: torch.dtype = torch.int64,
    backend: Optional[str] = None,
) -> BatchTopKCodes:
    """BatchTopK SAE encoding as CSR codes, without a dense ``[N, M]`` tensor.

    Args:
        x: ``[N, d]`` float32 / float16 / bfloat16 (float64 for tests).
        W_enc: ``[M, d]`` latent-major, any strides. b_enc: ``[M]`` or None. b_dec: ``[d]``
            or None, subtracted from x first.
        k: mean latents kept per row; training mode keeps the k·N largest ``relu(pre)`` of
            the batch (ties: row-major order), 1 <= k <= M.
        threshold: None for training mode; a float or 0-d tensor for inference mode, which
            keeps every entry with ``pre > threshold`` (and ``pre > 0``).
        index_dtype: torch.int64 (default) or torch.int32 for the returned indices.

    Returns BatchTopKCodes(values, indices, row_offsets, threshold); see its docstring.
    Differentiable with respect to x, W_enc, b_enc and b_dec through the kept entries.
    """
    n, d, m = _checks.check_encoder_inputs(_OP, x, W_enc, b_enc, b_dec)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= m:
        raise ValueError(f"{_OP}: k must be an int in [1, M={m}], got {k!r}")
    if index_dtype not in _checks.INDEX_DTYPES:
        raise TypeError(f"{_OP}: index_dtype must be torch.int64 or torch.int32, got {index_dtype}")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float, torch.Tensor)):
            raise TypeError(f"{_OP}: threshold must be None, a float or a 0-d tensor, got {type(threshold).__name__}")
        if isinstance(threshold, torch.Tensor):
            if threshold.dim() != 0 or not threshold.is_floating_point():
                raise ValueError(f"{_OP}: threshold must be a 0-d float tensor, got shape {tuple(threshold.shape)} "
                                 f"{threshold.dtype}")
            # (a NaN check reads the value back: eager only, compiled graphs stay sync-free)
            if not torch.compiler.is_compiling() and torch.isnan(threshold):
                raise ValueError(f"{_OP}: threshold is NaN")
            threshold = threshold.detach().to(x.device, x.dtype)
        else:
            if threshold != threshold:
                raise ValueError(f"{_OP}: threshold is NaN")
            threshold = torch.tensor(float(threshold), device=x.device, dtype=x.dtype)
    resolved = _backend.resolve_backend(backend, x.device, x.dtype, _OP)
    values, indices, row_offsets, thr = batchtopk_encode_op(x, W_enc, b_enc, b_dec, threshold, k, resolved)
    return BatchTopKCodes(values, indices.to(index_dtype), row_offsets, thr)
