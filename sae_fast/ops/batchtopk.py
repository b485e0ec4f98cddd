"""``sae_fast::batchtopk_encode``: the k·N largest encoder activations of a whole batch, as CSR.

Training mode keeps the ``⌊k·N⌋`` largest ``relu(pre)`` over all N rows and M latents (rows
get different counts; k may be fractional, as SAELens's BatchTopK allows); inference mode (a ``threshold`` given) keeps ``pre > threshold``.
Either way the result is compact CSR with ascending latent ids in each row, and entries whose
activation is zero are not stored (they decode to nothing and get no gradient through the
ReLU), so ``values`` are the positive pre-activations themselves.

Order of the batch selection (the tie rule): descending value, then the smaller row, then
the smaller latent id, i.e. row-major order among equal values. It is computed exactly
without an ``[N, M]`` tensor:

1. every row's ``C = 2⌈k⌉`` best candidates come from the fused TopK selection;
2. ``v*`` = the k·N-th largest candidate (over the union of the lists);
3. a row whose list is full (C < M) and whose last candidate is positive and ``>= v*`` may hold more
   winners beyond it: those rows only are recomputed with 4x the capacity, and 2-3 repeat.
   When no row is saturated, the union's top k·N is the batch's top k·N (a winner beyond a
   row's list would be below that row's last candidate, itself below k·N union entries).

AuxK (training mode, ``dead_mask`` and ``k_aux`` > 0): each row's top-``k_aux`` pre-activations
among dead latents, exactly as ``topk_encode`` returns them (raw ``pre``, descending, ties: the
smaller latent id; slots beyond the number of dead latents hold value 0 and index 0 and get no
gradient). They come from the same fused pass as step 1; the recomputation of saturated rows
(step 3) widens the batch candidates only and leaves the aux lists as they are (they do not
depend on the capacity).

Backward: the same sparse products as TopK, with explicit row ids (``csr_grad_weight``); the
aux entries add TopK's dense-[N, k_aux] products.
"""

import math
from typing import NamedTuple, Optional

import torch

from .. import _backend
from ..reference.threshold import threshold_select
from ..reference.topk import topk_select
from . import _checks
from .decode import csr_encoder_backward, sparse_decode_grad_weight, sparse_decode_op

_OP = "batchtopk_encode"


class BatchTopKCodes(NamedTuple):
    """CSR codes: row n holds ``values[row_offsets[n]:row_offsets[n+1]]`` at latents
    ``indices[...]`` (ascending). ``threshold`` (0-d, x's dtype): in training mode the smallest
    kept value (0 when nothing is kept), for a running inference threshold; in inference mode
    the threshold used. ``aux_values`` / ``aux_indices`` [N, k_aux] (training mode with a dead
    mask and k_aux > 0, else None): as ``TopKCodes``' — the pre-activations (no ReLU) of each
    row's top dead latents; a row with fewer dead latents than k_aux has value 0 and index 0 in
    the missing slots."""

    values: torch.Tensor
    indices: torch.Tensor
    row_offsets: torch.Tensor
    threshold: torch.Tensor
    aux_values: Optional[torch.Tensor] = None
    aux_indices: Optional[torch.Tensor] = None


def _candidates(x, W_enc, b_enc, b_dec, c, backend, dead_mask=None, k_aux=0):
    """Each row's c best (pre [r, c] descending, latent [r, c]) under the TopK tie rule, and
    with a dead mask and k_aux > 0 the top-k_aux among dead latents (aux_pre [r, k_aux], 0 in
    missing slots; aux_indices, 0 there), else two empty [r, 0] tensors: TopK's AuxK part."""
    want_aux = dead_mask is not None and k_aux > 0
    if backend == "reference":
        sel = topk_select(x, W_enc, b_enc, c, b_dec=b_dec, dead_mask=dead_mask if want_aux else None,
                          k_aux=k_aux if want_aux else 0)
        if sel.aux_pre is None:
            return sel.pre, sel.indices, x.new_zeros((x.shape[0], 0)), sel.indices.new_zeros((x.shape[0], 0))
        missing = torch.arange(sel.aux_pre.shape[1], device=x.device) >= dead_mask.sum()  # (not a real ±inf)
        return sel.pre, sel.indices, sel.aux_pre.masked_fill(missing, 0), sel.aux_indices
    from ..triton_kernels import topk_encode as fused

    if not want_aux:
        pre, idx, _, _ = fused.topk_encode(x, W_enc, b_enc, b_dec, c)
        return pre, idx, x.new_zeros((x.shape[0], 0)), idx.new_zeros((x.shape[0], 0))
    return fused.topk_encode(x, W_enc, b_enc, b_dec, c, dead_mask, k_aux)


def _batch_select(x, W_enc, b_enc, b_dec, k, backend, dead_mask=None, k_aux=0):
    n, m = x.shape[0], W_enc.shape[0]
    total = int(k * n)  # SAELens's count for a fractional k; k·N exactly for an integral one
    cap = min(m, 2 * math.ceil(k))
    pre, idx, aux_pre, aux_idx = _candidates(x, W_enc, b_enc, b_dec, cap, backend, dead_mask, k_aux)
    vals, lats = pre.reshape(-1), idx.reshape(-1)
    rows = torch.arange(n, device=x.device).repeat_interleave(cap)
    # NaN ranks above every number (torch.topk's order, and topk_encode's): a row with NaN input
    # keeps NaN codes, so the loss shows it, rather than a NaN v* silently emptying every row.
    rank = lambda v: v.masked_fill(torch.isnan(v), float("inf"))  # noqa: E731
    caps = torch.full((n,), cap, device=x.device, dtype=torch.int64)
    last = pre[:, -1]
    if total == 0:  # k·N < 1 (a fractional k and a tiny batch): nothing is kept
        vals, lats, rows = vals[:0], lats[:0], rows[:0]
    while total:
        v_star = torch.topk(rank(vals), total, sorted=False).values.min()
        # (an entry beyond a list is <= its last one: if that is <= 0 it is dropped anyway)
        saturated = (caps < m) & (last >= v_star) & (last > 0)
        if not bool(saturated.any()):
            break
        again = saturated.nonzero().view(-1)
        new_cap = min(m, 4 * int(caps[again].max()))
        pre2, idx2, _, _ = _candidates(x[again], W_enc, b_enc, b_dec, new_cap, backend)  # (no aux: kept)
        keep = ~saturated[rows]  # drop the old, shorter lists of the recomputed rows
        vals = torch.cat([vals[keep], pre2.reshape(-1)])
        lats = torch.cat([lats[keep], idx2.reshape(-1)])
        rows = torch.cat([rows[keep], again.repeat_interleave(new_cap)])
        caps[again] = new_cap
        last[again] = pre2[:, -1]
    if total:
        # Winners: everything above v*, then the first (row, latent)-ordered entries equal to it.
        ranked = rank(vals)
        above = ranked > v_star
        tied = (ranked == v_star).nonzero().view(-1)
        room = total - int(above.sum())
        tie_order = torch.argsort(rows[tied] * m + lats[tied])
        winners = above.clone()
        winners[tied[tie_order[:room]]] = True
        winners &= ranked > 0
        vals, lats, rows = vals[winners], lats[winners], rows[winners]
    order = torch.argsort(rows * m + lats)
    counts = torch.bincount(rows, minlength=n)
    row_offsets = torch.zeros(n + 1, device=x.device, dtype=torch.int64)
    torch.cumsum(counts, 0, out=row_offsets[1:])
    finite = vals[~torch.isnan(vals)]
    threshold = finite.min() if finite.numel() else vals.sum() if vals.numel() else x.new_zeros(())  # (all NaN: NaN)
    return vals[order], lats[order], row_offsets, threshold.reshape(()), aux_pre, aux_idx


def _threshold_select(x, W_enc, b_enc, b_dec, threshold, k, backend):
    if backend == "reference":
        return threshold_select(x, W_enc, b_enc, b_dec, threshold)
    from ..triton_kernels import threshold_encode as fused

    return fused.threshold_encode(x, W_enc, b_enc, b_dec, threshold, capacity=max(16, 2 * math.ceil(k)))


@torch.library.custom_op("sae_fast::batchtopk_encode", mutates_args=())
def batchtopk_encode_op(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: Optional[torch.Tensor],
    b_dec: Optional[torch.Tensor],
    threshold: Optional[torch.Tensor],
    k: float,
    backend: str,
    dead_mask: Optional[torch.Tensor] = None,
    k_aux: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, indices, row_offsets, threshold, aux_pre [N, k_aux'], aux_indices [N, k_aux']),
    k_aux' = k_aux with a dead mask in training mode, else 0."""
    if threshold is None:
        return _batch_select(x, W_enc, b_enc, b_dec, k, backend, dead_mask, k_aux)
    if dead_mask is not None and k_aux > 0:
        raise ValueError(f"{_OP}: AuxK (k_aux={k_aux}) needs training mode (threshold=None)")
    vals, idx, row_offsets = _threshold_select(x, W_enc, b_enc, b_dec, threshold, k, backend)
    n = x.shape[0]
    return (vals, idx, row_offsets, threshold.to(x.dtype).clone(), x.new_zeros((n, 0)),
            idx.new_zeros((n, 0), dtype=torch.int64))


@batchtopk_encode_op.register_fake
def _(x, W_enc, b_enc, b_dec, threshold, k, backend, dead_mask=None, k_aux=0):
    nnz = torch.library.get_ctx().new_dynamic_size()
    n = x.shape[0]
    k_aux = k_aux if dead_mask is not None and threshold is None else 0
    return (x.new_empty((nnz,)), x.new_empty((nnz,), dtype=torch.int64),
            x.new_empty((n + 1,), dtype=torch.int64), x.new_empty(()),
            x.new_empty((n, k_aux)), x.new_empty((n, k_aux), dtype=torch.int64))


def _setup_context(ctx, inputs, output):
    x, W_enc, b_enc, b_dec, threshold, k, backend, dead_mask, k_aux = inputs
    _, indices, row_offsets, _, aux_pre, aux_indices = output
    k_aux = aux_pre.shape[1]
    # As topk: dead_mask is per latent, so every row has the same number of real aux slots, the
    # first min(k_aux, #dead); the rest (value 0, index 0) get no gradient.
    aux_valid = (torch.arange(k_aux, device=x.device) < dead_mask.sum()) if k_aux else x.new_zeros(0, dtype=torch.bool)
    ctx.save_for_backward(x, W_enc, b_dec, indices, row_offsets, aux_indices, aux_valid)
    ctx.has_b_enc = b_enc is not None
    ctx.has_aux = k_aux > 0
    ctx.backend = backend


def _aux_backward(grad_aux, x, W_enc, b_dec, aux_indices, aux_valid, needs, has_b_enc, backend):
    """TopK's AuxK gradients (ops/topk.py): entries (n, j) at latent aux_indices[n, j] with
    upstream G = grad_aux·valid: ∂x = Σ_j G·W_enc[I] (sparse decode), ∂W_enc / ∂b_enc = the
    weight gradient against x̄ / ones, ∂b_dec = -Σ_n ∂x_n."""
    n, m = x.shape[0], W_enc.shape[0]
    G = (grad_aux * aux_valid.to(grad_aux.dtype)).contiguous()
    need_x, need_W, need_b_enc, need_b_dec = needs
    grad_x = grad_W = grad_b_enc = grad_b_dec = None
    if need_x or need_b_dec:
        dx = sparse_decode_op(G, aux_indices, W_enc, None, backend, False)
        grad_x = dx if need_x else None
        grad_b_dec = -dx.sum(0, dtype=_checks.accumulation_dtype(dx.dtype)).to(dx.dtype) if need_b_dec else None
    if need_W:
        x_bar = x if b_dec is None else x - b_dec
        grad_W = sparse_decode_grad_weight(x_bar.contiguous(), G, aux_indices, m, backend)
    if need_b_enc and has_b_enc:
        grad_b_enc = sparse_decode_grad_weight(x.new_ones((n, 1)), G, aux_indices, m, backend).view(m)
    return grad_x, grad_W, grad_b_enc, grad_b_dec


def _backward(ctx, grad_values, _gi, _go, _gt, grad_aux, _gai):
    x, W_enc, b_dec, indices, row_offsets, aux_indices, aux_valid = ctx.saved_tensors
    needs = ctx.needs_input_grad[:4]
    grads = csr_encoder_backward(grad_values, x, W_enc, b_dec, indices, row_offsets, needs, ctx.has_b_enc,
                                 ctx.backend)
    if ctx.has_aux and grad_aux is not None:
        aux = _aux_backward(grad_aux, x, W_enc, b_dec, aux_indices, aux_valid, needs, ctx.has_b_enc, ctx.backend)
        grads = tuple(a if b is None else (b if a is None else a + b) for a, b in zip(grads, aux))
    return (*grads, None, None, None, None, None)


batchtopk_encode_op.register_autograd(_backward, setup_context=_setup_context)


def batchtopk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: Optional[torch.Tensor],
    k: float,
    *,
    b_dec: Optional[torch.Tensor] = None,
    threshold=None,
    dead_mask: Optional[torch.Tensor] = None,
    k_aux: int = 0,
    index_dtype: torch.dtype = torch.int64,
    backend: Optional[str] = None,
) -> BatchTopKCodes:
    """BatchTopK SAE encoding as CSR codes, without a dense ``[N, M]`` tensor.

    Args:
        x: ``[N, d]`` float32 / float16 / bfloat16 (float64 for tests).
        W_enc: ``[M, d]`` latent-major, any strides. b_enc: ``[M]`` or None. b_dec: ``[d]``
            or None, subtracted from x first.
        k: mean latents kept per row, 0 < k <= M, an int or a float; training mode keeps the
            ``int(k·N)`` largest ``relu(pre)`` of the batch (ties: row-major order), the count
            SAELens's BatchTopK keeps for a fractional k.
        threshold: None for training mode; a float or 0-d tensor for inference mode, which
            keeps every entry with ``pre > threshold`` (and ``pre > 0``).
        dead_mask: ``[M]`` bool, latents counted as dead for AuxK; with ``k_aux`` > 0 (training
            mode only) each row's top-``k_aux`` pre-activations among them are returned too,
            differentiably, exactly as ``topk_encode`` returns them.
        index_dtype: torch.int64 (default) or torch.int32 for the returned indices.

    Returns BatchTopKCodes(values, indices, row_offsets, threshold, aux_values, aux_indices);
    see its docstring. Differentiable with respect to x, W_enc, b_enc and b_dec through the
    kept (and aux) entries.

    Numerics as ``topk_encode``'s. NaN pre-activations rank above every number and are kept
    (within the batch budget), so a NaN row shows in the loss instead of hiding; the returned
    threshold is the smallest non-NaN kept value (0 when none, NaN when every kept one is).
    Inference mode compares ``pre > threshold`` in x's dtype (the threshold rounded to it) and
    keeps NaN entries.
    """
    n, d, m = _checks.check_encoder_inputs(_OP, x, W_enc, b_enc, b_dec)
    k_real, k_aux_int = _checks.real(k), _checks.integer(k_aux)
    if k_real is None or not 0 < k_real <= m:  # (NaN fails 0 < k)
        raise ValueError(f"{_OP}: k must be a number in (0, M={m}], got {k!r}")
    if k_aux_int is None or not 0 <= k_aux_int <= m:
        raise ValueError(f"{_OP}: k_aux must be an int in [0, M={m}], got {k_aux!r}")
    k, k_aux = k_real, k_aux_int
    if k_aux > 0 and dead_mask is None:
        raise ValueError(f"{_OP}: k_aux={k_aux} needs dead_mask")
    if k_aux > 0 and threshold is not None:
        raise ValueError(f"{_OP}: AuxK (k_aux={k_aux}) is for training mode; got a threshold (inference mode)")
    if dead_mask is not None:
        _checks.check_tensor(_OP, "dead_mask", dead_mask, dim=1, dtypes=(torch.bool,))
        if dead_mask.shape[0] != m:
            raise ValueError(f"{_OP}: dead_mask must be [{m}], got {tuple(dead_mask.shape)}")
        _checks.check_same_device(_OP, x=x, dead_mask=dead_mask)
    if index_dtype not in _checks.INDEX_DTYPES:
        raise TypeError(f"{_OP}: index_dtype must be torch.int64 or torch.int32, got {index_dtype}")
    if threshold is not None:
        if not isinstance(threshold, torch.Tensor) and _checks.real(threshold) is None:
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
    use_aux = k_aux > 0  # (implies a dead mask and training mode, checked above)
    values, indices, row_offsets, thr, aux_pre, aux_indices = batchtopk_encode_op(
        x, W_enc, b_enc, b_dec, threshold, float(k), resolved, dead_mask if use_aux else None, k_aux if use_aux else 0)
    # Built in one call, not with NamedTuple._replace: torch 2.5's dynamo cannot trace _replace
    # ("inline in skipfiles: ..._replace"), which broke torch.compile(fullgraph=True) with AuxK.
    if use_aux:
        return BatchTopKCodes(values, indices.to(index_dtype), row_offsets, thr, aux_pre, aux_indices.to(index_dtype))
    return BatchTopKCodes(values, indices.to(index_dtype), row_offsets, thr)
