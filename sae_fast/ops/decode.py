"""``sae_fast::sparse_decode``: x_hat[n] = sum_j values[n, j] * W_dec[indices[n, j]] + bias.

Three custom ops: the forward and its two gradient products, so that each stays opaque
to torch.compile and every backend serves all three. The decoder-weight gradient is a
CSR gather-sum over entries sorted (stably) by latent: no atomics, deterministic.
"""

from typing import Optional

import torch

from .. import _backend
from . import _checks

_OP = "sparse_decode"
_CSR_OP = "sparse_decode_csr"


@torch.library.custom_op("sae_fast::sparse_decode", mutates_args=())
def sparse_decode_op(
    values: torch.Tensor,
    indices: torch.Tensor,
    W_dec: torch.Tensor,
    bias: Optional[torch.Tensor],
    backend: str,
    check_indices: bool,
) -> torch.Tensor:
    if check_indices:
        _checks.check_index_range(_OP, "indices", indices, W_dec.shape[0])
    n_rows = values.shape[0]
    return _backend.kernels(backend).csr_gather_sum(
        values.contiguous().view(-1), indices.contiguous().view(-1), None, n_rows, W_dec, bias
    )


@sparse_decode_op.register_fake
def _(values, indices, W_dec, bias, backend, check_indices):
    return values.new_empty((values.shape[0], W_dec.shape[1]))


@torch.library.custom_op("sae_fast::sparse_decode_grad_values", mutates_args=())
def sparse_decode_grad_values(grad: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor, backend: str) -> torch.Tensor:
    """d(loss)/d(values)[n, j] = <grad[n], W_dec[indices[n, j]]>."""
    return _backend.kernels(backend).gathered_dot(grad, indices.contiguous(), W_dec)


@sparse_decode_grad_values.register_fake
def _(grad, indices, W_dec, backend):
    return grad.new_empty(indices.shape)


def _transposed_gather_sum(grad, coef, latents, rows, num_latents, backend):
    """out[m] = Σ over entries e with latents[e] == m of coef[e] · grad[rows[e]] (flat
    entries): the sparseᵀ·dense product behind every weight gradient. Entries are grouped by
    latent with a stable sort (token order kept), then one CSR gather-sum: no atomics,
    deterministic."""
    # Narrow keys halve the radix-sort passes; the indices were range-checked on the way in.
    keys = latents.to(torch.int32) if num_latents <= torch.iinfo(torch.int32).max else latents
    sorted_keys, order = torch.sort(keys, stable=True)
    # Row m of the CSR is [first entry >= m, first entry >= m + 1). searchsorted, unlike
    # bincount, needs no device sync (bincount reads the maximum back to size its output).
    boundaries = torch.arange(num_latents + 1, device=latents.device, dtype=sorted_keys.dtype)
    offsets = torch.searchsorted(sorted_keys, boundaries)
    return _backend.kernels(backend).csr_gather_sum(coef[order], rows[order], offsets, num_latents, grad, None)


@torch.library.custom_op("sae_fast::sparse_decode_grad_weight", mutates_args=())
def sparse_decode_grad_weight(
    grad: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, num_latents: int, backend: str
) -> torch.Tensor:
    """d(loss)/d(W_dec)[m] = sum over (n, j) with indices[n, j] == m of values[n, j] * grad[n].

    Rows of latents that no entry selects are zero."""
    k = max(indices.shape[1], 1)
    flat = indices.reshape(-1)
    rows = torch.arange(flat.numel(), device=flat.device) // k
    return _transposed_gather_sum(grad, values.reshape(-1), flat, rows, num_latents, backend)


@sparse_decode_grad_weight.register_fake
def _(grad, values, indices, num_latents, backend):
    return grad.new_empty((num_latents, grad.shape[1]))


@torch.library.custom_op("sae_fast::csr_grad_weight", mutates_args=())
def csr_grad_weight(
    grad: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor, num_latents: int, backend: str
) -> torch.Tensor:
    """The weight gradient of CSR codes (rows get different counts): out[m] = Σ over entries
    e with indices[e] == m of values[e] · grad[rows[e]]; values, indices, rows flat [nnz]."""
    return _transposed_gather_sum(grad, values, indices, rows, num_latents, backend)


@csr_grad_weight.register_fake
def _(grad, values, indices, rows, num_latents, backend):
    return grad.new_empty((num_latents, grad.shape[1]))


def _setup_context(ctx, inputs, output):
    values, indices, W_dec, bias, backend, _check = inputs
    ctx.save_for_backward(values, indices, W_dec)
    ctx.has_bias = bias is not None
    ctx.backend = backend


def _backward(ctx, grad):
    values, indices, W_dec = ctx.saved_tensors
    grad_values = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_values = sparse_decode_grad_values(grad, indices, W_dec, ctx.backend)
    if ctx.needs_input_grad[2]:
        grad_weight = sparse_decode_grad_weight(grad, values, indices, W_dec.shape[0], ctx.backend)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = grad.sum(0, dtype=_checks.accumulation_dtype(grad.dtype)).to(grad.dtype)
    return grad_values, None, grad_weight, grad_bias, None, None


sparse_decode_op.register_autograd(_backward, setup_context=_setup_context)


def sparse_decode(
    values: torch.Tensor,
    indices: torch.Tensor,
    W_dec: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    backend: Optional[str] = None,
    check_indices: bool = True,
) -> torch.Tensor:
    """Decode sparse codes: ``out[n] = sum_j values[n, j] * W_dec[indices[n, j]] + bias``.

    Args:
        values: ``[..., k]`` float32 / float16 / bfloat16 (float64 runs on the reference).
        indices: ``[..., k]`` int32 or int64 latent ids in ``[0, M)``; duplicates add up.
        W_dec: ``[M, d]`` decoder, same dtype as ``values``, any strides (a transposed
            ``[d, M]`` storage viewed as ``[M, d]`` works without a copy, at lower speed).
        bias: ``[d]`` or None, same dtype.
        backend: ``"fastest"``, ``"cuda"``, ``"triton"``, ``"reference"`` or None for the
            default (see ``sae_fast._backend``).
        check_indices: verify the index range first (one device sync); an out-of-range
            index raises IndexError. Skipping it with False trades safety for speed: an
            out-of-range index is then undefined behaviour on GPU.

    Returns ``[..., d]`` in the dtype of ``values``, accumulated in fp32. Differentiable
    with respect to ``values``, ``W_dec`` and ``bias`` (once: no double backward). NaN or
    Inf in values or weights propagate to the rows that use them.
    """
    _checks.check_tensor(_OP, "values", values, dtypes=_checks.FLOAT_DTYPES)
    _checks.check_tensor(_OP, "indices", indices, dtypes=_checks.INDEX_DTYPES)
    _checks.check_tensor(_OP, "W_dec", W_dec, dim=2)
    if values.dim() < 1:
        raise ValueError(f"{_OP}: values must be [..., k], got a scalar")
    if indices.shape != values.shape:
        raise ValueError(f"{_OP}: indices must have the shape of values {tuple(values.shape)}, got {tuple(indices.shape)}")
    if bias is not None:
        _checks.check_tensor(_OP, "bias", bias, dim=1)
        if bias.shape[0] != W_dec.shape[1]:
            raise ValueError(f"{_OP}: bias must be [{W_dec.shape[1]}] (W_dec is {tuple(W_dec.shape)}), got {tuple(bias.shape)}")
    _checks.check_same_device(_OP, values=values, indices=indices, W_dec=W_dec, bias=bias)
    _checks.check_same_dtype(_OP, values=values, W_dec=W_dec, bias=bias)
    resolved = _backend.resolve_backend(backend, values.device, values.dtype, _OP)
    lead = values.shape[:-1]
    rows = lead.numel()
    out = sparse_decode_op(
        values.reshape(rows, -1) if rows else values.reshape(0, values.shape[-1]),
        indices.reshape(rows, -1) if rows else indices.reshape(0, values.shape[-1]),
        W_dec,
        bias,
        resolved,
        bool(check_indices),
    )
    return out.reshape(*lead, W_dec.shape[1])


# ---- CSR codes (BatchTopK, JumpReLU): rows hold different numbers of entries.


@torch.library.custom_op("sae_fast::sparse_decode_csr", mutates_args=())
def sparse_decode_csr_op(
    values: torch.Tensor,
    indices: torch.Tensor,
    row_offsets: torch.Tensor,
    W_dec: torch.Tensor,
    bias: Optional[torch.Tensor],
    backend: str,
) -> torch.Tensor:
    num_rows = row_offsets.shape[0] - 1
    return _backend.kernels(backend).csr_gather_sum(
        values.contiguous(), indices.contiguous(), row_offsets.contiguous(), num_rows, W_dec, bias
    )


@sparse_decode_csr_op.register_fake
def _(values, indices, row_offsets, W_dec, bias, backend):
    return values.new_empty((row_offsets.shape[0] - 1, W_dec.shape[1]))


@torch.library.custom_op("sae_fast::sparse_decode_csr_grad_values", mutates_args=())
def sparse_decode_csr_grad_values(
    grad: torch.Tensor, rows: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor, backend: str
) -> torch.Tensor:
    """d(loss)/d(values)[e] = <grad[rows[e]], W_dec[indices[e]]>."""
    return _backend.kernels(backend).entry_dot(grad, rows, indices, W_dec)


@sparse_decode_csr_grad_values.register_fake
def _(grad, rows, indices, W_dec, backend):
    return grad.new_empty(indices.shape)


def csr_rows(row_offsets: torch.Tensor, nnz: int) -> torch.Tensor:
    """The row of every CSR entry (no device sync: the output size is given)."""
    n = row_offsets.shape[0] - 1
    return torch.repeat_interleave(torch.arange(n, device=row_offsets.device), row_offsets.diff(), output_size=nnz)


def _csr_setup_context(ctx, inputs, output):
    values, indices, row_offsets, W_dec, bias, backend = inputs
    ctx.save_for_backward(values, indices, row_offsets, W_dec)
    ctx.has_bias = bias is not None
    ctx.backend = backend


def _csr_backward(ctx, grad):
    values, indices, row_offsets, W_dec = ctx.saved_tensors
    rows = csr_rows(row_offsets, indices.shape[0])
    grad_values = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_values = sparse_decode_csr_grad_values(grad, rows, indices, W_dec, ctx.backend)
    if ctx.needs_input_grad[3]:
        grad_weight = csr_grad_weight(grad, values, indices, rows, W_dec.shape[0], ctx.backend)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        grad_bias = grad.sum(0, dtype=_checks.accumulation_dtype(grad.dtype)).to(grad.dtype)
    return grad_values, None, None, grad_weight, grad_bias, None


sparse_decode_csr_op.register_autograd(_csr_backward, setup_context=_csr_setup_context)


def sparse_decode_csr(
    values: torch.Tensor,
    indices: torch.Tensor,
    row_offsets: torch.Tensor,
    W_dec: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    backend: Optional[str] = None,
    check_indices: bool = True,
) -> torch.Tensor:
    """Decode CSR codes (``BatchTopKCodes`` / ``JumpReLUCodes``): ``out[n] = Σ_{e in row n}
    values[e] · W_dec[indices[e]] + bias``, rows given by ``row_offsets [N+1]``.

    values [nnz] float, indices [nnz] int32/int64, row_offsets [N+1] int64 non-decreasing
    from 0 to nnz. Differentiable with respect to values, W_dec and bias (the W_dec gradient
    is the same deterministic segment reduction as ``sparse_decode``'s).

    ``check_indices=False`` skips every data check (index range and row_offsets shape, one
    device sync): out-of-range values then read out of bounds. Under ``torch.compile`` the
    data checks are skipped (they would break the graph).
    """
    _OP = _CSR_OP
    _checks.check_tensor(_OP, "values", values, dim=1, dtypes=_checks.FLOAT_DTYPES)
    _checks.check_tensor(_OP, "indices", indices, dim=1, dtypes=_checks.INDEX_DTYPES)
    _checks.check_tensor(_OP, "row_offsets", row_offsets, dim=1, dtypes=(torch.int64,))
    _checks.check_tensor(_OP, "W_dec", W_dec, dim=2)
    if indices.shape != values.shape:
        raise ValueError(f"{_OP}: indices must have the shape of values {tuple(values.shape)}, got {tuple(indices.shape)}")
    if row_offsets.shape[0] < 1:
        raise ValueError(f"{_OP}: row_offsets must be [N+1], got an empty tensor")
    if bias is not None:
        _checks.check_tensor(_OP, "bias", bias, dim=1)
        if bias.shape[0] != W_dec.shape[1]:
            raise ValueError(f"{_OP}: bias must be [{W_dec.shape[1]}], got {tuple(bias.shape)}")
    _checks.check_same_device(_OP, values=values, indices=indices, row_offsets=row_offsets, W_dec=W_dec, bias=bias)
    _checks.check_same_dtype(_OP, values=values, W_dec=W_dec, bias=bias)
    if check_indices and not torch.compiler.is_compiling():
        _checks.check_index_range(_OP, "indices", indices, W_dec.shape[0])
        ro = row_offsets
        if ro[0] != 0 or ro[-1] != values.shape[0] or (ro.diff() < 0).any():
            raise ValueError(f"{_OP}: row_offsets must rise from 0 to nnz={values.shape[0]}")
    resolved = _backend.resolve_backend(backend, values.device, values.dtype, _OP)
    return sparse_decode_csr_op(values, indices, row_offsets, W_dec, bias, resolved)


def csr_encoder_backward(grad_values, x, W_enc, b_dec, indices, row_offsets, needs, has_b_enc, backend):
    """Gradients (x, W_enc, b_enc, b_dec) of CSR encoder outputs ``pre[e]`` (entry e: row from
    row_offsets, latent indices[e]) given ``grad_values`` [nnz], through those entries only,
    with the same sparse products as TopK's backward (ops/topk.py) and explicit row ids:
    ∂x = Σ_e G_e·W_enc[i_e] (CSR decode of G), ∂W_enc / ∂b_enc = the weight gradient against
    x̄ / ones, ∂b_dec = -Σ_n ∂x_n. Shared by BatchTopK and JumpReLU."""
    n, m = x.shape[0], W_enc.shape[0]
    nnz = indices.shape[0]
    G = grad_values.contiguous() if grad_values is not None else x.new_zeros(nnz)
    rows = csr_rows(row_offsets, nnz)
    need_x, need_W, need_b_enc, need_b_dec = needs
    grad_x = grad_W = grad_b_enc = grad_b_dec = None
    if need_x or need_b_dec:
        dx = sparse_decode_csr_op(G, indices, row_offsets, W_enc, None, backend)
        grad_x = dx if need_x else None
        grad_b_dec = -dx.sum(0, dtype=_checks.accumulation_dtype(dx.dtype)).to(dx.dtype) if need_b_dec else None
    if need_W:
        x_bar = x if b_dec is None else x - b_dec
        grad_W = csr_grad_weight(x_bar.contiguous(), G, indices, rows, m, backend)
    if need_b_enc and has_b_enc:
        grad_b_enc = csr_grad_weight(x.new_ones((n, 1)), G, indices, rows, m, backend).view(m)
    return grad_x, grad_W, grad_b_enc, grad_b_dec
