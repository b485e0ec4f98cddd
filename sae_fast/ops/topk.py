"""``sae_fast::topk_encode``: the k largest encoder pre-activations per row, with AuxK.

``pre = (x - b_dec) @ W_encᵀ + b_enc``; the op returns the selected pre-activations (ReLU is
applied by the public wrapper, so autograd masks it), their latent ids, and optionally the
top-``k_aux`` pre-activations among dead latents. Its backward touches only the selected
entries and reuses sparse decode's two products (see ``_backward``): no ``[N, M]`` tensor in
either direction.

Selection: the fused Triton kernel (``triton_kernels/topk_encode.py``: GEMM tiles folded
into a running top-k, O(N·k·splits) extra memory) for the triton / cuda / fastest backends,
the streamed torch reference (``reference/topk.py``, O(N·(k+block))) for ``reference``. The
gradient products use the requested backend's kernels.
"""

from typing import NamedTuple, Optional

import torch

from .. import _backend
from ..reference.topk import topk_select
from . import _checks
from .decode import sparse_decode_grad_weight, sparse_decode_op

_OP = "topk_encode"


class TopKCodes(NamedTuple):
    """``values`` [N, k] = ReLU of the selected pre-activations, descending; ``indices`` [N, k]
    latent ids (ties: the smaller id first, decided on the fp32 pre-activation, so in half
    precision equal returned values may come in either id order). ``aux_values`` / ``aux_indices`` [N, k_aux]:
    pre-activations (no ReLU) of the top dead latents, or None; a row with fewer dead latents
    than k_aux has value 0 and index 0 in the missing slots."""

    values: torch.Tensor
    indices: torch.Tensor
    aux_values: Optional[torch.Tensor] = None
    aux_indices: Optional[torch.Tensor] = None


@torch.library.custom_op("sae_fast::topk_encode", mutates_args=())
def topk_encode_op(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: Optional[torch.Tensor],
    b_dec: Optional[torch.Tensor],
    dead_mask: Optional[torch.Tensor],
    k: int,
    k_aux: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend != "reference":
        # One fused kernel for every GPU backend: selection is Triton; the backward's
        # gather products still follow the backend.
        from ..triton_kernels import topk_encode as fused

        return fused.topk_encode(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux)
    sel = topk_select(x, W_enc, b_enc, k, b_dec=b_dec, dead_mask=dead_mask, k_aux=k_aux)
    if sel.aux_pre is None:
        return sel.pre, sel.indices, x.new_zeros((x.shape[0], 0)), sel.indices.new_zeros((x.shape[0], 0))
    # Missing aux slots (fewer dead latents than k_aux; every row has the same dead set) hold
    # -inf: return 0 there (index 0); the backward gives them no gradient. A real dead
    # latent's ±inf stays.
    missing = torch.arange(sel.aux_pre.shape[1], device=x.device) >= dead_mask.sum()
    aux_pre = sel.aux_pre.masked_fill(missing, 0)
    return sel.pre, sel.indices, aux_pre, sel.aux_indices


@topk_encode_op.register_fake
def _(x, W_enc, b_enc, b_dec, dead_mask, k, k_aux, backend):
    n = x.shape[0]
    k_aux = k_aux if dead_mask is not None else 0
    return (x.new_empty((n, k)), x.new_empty((n, k), dtype=torch.int64),
            x.new_empty((n, k_aux)), x.new_empty((n, k_aux), dtype=torch.int64))


def _setup_context(ctx, inputs, output):
    x, W_enc, b_enc, b_dec, dead_mask, k, k_aux, backend = inputs
    _, indices, aux_pre, aux_indices = output
    k_aux = aux_pre.shape[1]
    # dead_mask is per latent, so every row has the same number of real aux slots: the first
    # min(k_aux, #dead). The rest (value 0, index 0) must get no gradient.
    aux_valid = (torch.arange(k_aux, device=x.device) < dead_mask.sum()) if k_aux else x.new_zeros(0, dtype=torch.bool)
    ctx.save_for_backward(x, W_enc, b_dec, indices, aux_indices, aux_valid)
    ctx.has_b_enc = b_enc is not None
    ctx.has_aux = k_aux > 0
    ctx.backend = backend


def _backward(ctx, grad_pre, _grad_indices, grad_aux, _grad_aux_indices):
    """Entries (n, j) with latent I[n, j] and upstream gradient G[n, j] (selected + aux):
    ∂W_enc[m] = Σ_{I=m} G·x̄_n and ∂b_enc[m] = Σ_{I=m} G   (sparse decode's weight gradient)
    ∂x̄_n = Σ_j G[n, j]·W_enc[I[n, j]]                      (sparse decode's forward)
    ∂x = ∂x̄, ∂b_dec = -Σ_n ∂x̄_n."""
    x, W_enc, b_dec, indices, aux_indices, aux_valid = ctx.saved_tensors
    n, m = x.shape[0], W_enc.shape[0]
    if grad_pre is None:
        grad_pre = x.new_zeros(indices.shape)
    G, I = grad_pre, indices
    if ctx.has_aux:
        g_aux = grad_aux if grad_aux is not None else x.new_zeros(aux_indices.shape)
        G = torch.cat([G, g_aux * aux_valid.to(g_aux.dtype)], dim=1)
        I = torch.cat([I, aux_indices], dim=1)
    G = G.contiguous()
    grad_x = grad_W = grad_b_enc = grad_b_dec = None
    need_x, need_W, need_b_enc, need_b_dec = (ctx.needs_input_grad[i] for i in range(4))
    if need_x or need_b_dec:
        dx = sparse_decode_op(G, I, W_enc, None, ctx.backend, False)
        grad_x = dx if need_x else None
        grad_b_dec = -dx.sum(0, dtype=_checks.accumulation_dtype(dx.dtype)).to(dx.dtype) if need_b_dec else None
    if need_W:
        x_bar = x if b_dec is None else x - b_dec
        grad_W = sparse_decode_grad_weight(x_bar.contiguous(), G, I, m, ctx.backend)
    if need_b_enc and ctx.has_b_enc:
        ones = x.new_ones((n, 1))
        grad_b_enc = sparse_decode_grad_weight(ones, G, I, m, ctx.backend).view(m)
    return grad_x, grad_W, grad_b_enc, grad_b_dec, None, None, None, None


topk_encode_op.register_autograd(_backward, setup_context=_setup_context)


def topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: Optional[torch.Tensor],
    k: int,
    *,
    b_dec: Optional[torch.Tensor] = None,
    dead_mask: Optional[torch.Tensor] = None,
    k_aux: int = 0,
    index_dtype: torch.dtype = torch.int64,
    backend: Optional[str] = None,
) -> TopKCodes:
    """TopK SAE encoding without a dense ``[N, M]`` tensor.

    Args:
        x: ``[N, d]`` float32 / float16 / bfloat16 (float64 for tests).
        W_enc: ``[M, d]`` latent-major, any strides (a ``[d, M]`` storage transposed works).
        b_enc: ``[M]`` or None. b_dec: ``[d]`` or None, subtracted from x first.
        k: latents kept per row, 1 <= k <= M.
        dead_mask: ``[M]`` bool, latents counted as dead for AuxK; with ``k_aux`` > 0 the
            top-``k_aux`` pre-activations among them are returned too, differentiably.
        index_dtype: torch.int64 (default) or torch.int32 for the returned indices.

    Returns TopKCodes(values, indices, aux_values, aux_indices). Differentiable with respect
    to x, W_enc, b_enc and b_dec through the selected (and aux) entries only.

    Numerics (every backend): ``x - b_dec`` is rounded once to W_enc's dtype (the GEMM
    operand, as a half-precision torch computation would), products accumulate in fp32, the
    selection orders fp32 pre-activations. A NaN pre-activation ranks above every number
    (torch.topk's order), so NaN inputs show up in the codes and the loss; a dead latent's
    ±inf pre-activation is a real AuxK entry.
    """
    n, d, m = _checks.check_encoder_inputs(_OP, x, W_enc, b_enc, b_dec)
    k_int, k_aux_int = _checks.integer(k), _checks.integer(k_aux)
    if k_int is None or not 1 <= k_int <= m:
        raise ValueError(f"{_OP}: k must be an int in [1, M={m}], got {k!r}")
    if k_aux_int is None or not 0 <= k_aux_int <= m:
        raise ValueError(f"{_OP}: k_aux must be an int in [0, M={m}], got {k_aux!r}")
    k, k_aux = k_int, k_aux_int
    if k_aux > 0 and dead_mask is None:
        raise ValueError(f"{_OP}: k_aux={k_aux} needs dead_mask")
    if dead_mask is not None:
        _checks.check_tensor(_OP, "dead_mask", dead_mask, dim=1, dtypes=(torch.bool,))
        if dead_mask.shape[0] != m:
            raise ValueError(f"{_OP}: dead_mask must be [{m}], got {tuple(dead_mask.shape)}")
    if index_dtype not in _checks.INDEX_DTYPES:
        raise TypeError(f"{_OP}: index_dtype must be torch.int64 or torch.int32, got {index_dtype}")
    _checks.check_same_device(_OP, x=x, dead_mask=dead_mask)
    resolved = _backend.resolve_backend(backend, x.device, x.dtype, _OP)
    pre, indices, aux_pre, aux_indices = topk_encode_op(
        x, W_enc, b_enc, b_dec, dead_mask if k_aux > 0 else None, k, k_aux if dead_mask is not None else 0, resolved
    )
    # Built in one call, not with NamedTuple._replace: torch 2.5's dynamo cannot trace _replace
    # ("inline in skipfiles: ..._replace"), which broke torch.compile(fullgraph=True) with AuxK.
    if k_aux > 0:
        return TopKCodes(torch.relu(pre), indices.to(index_dtype), aux_pre, aux_indices.to(index_dtype))
    return TopKCodes(torch.relu(pre), indices.to(index_dtype))
