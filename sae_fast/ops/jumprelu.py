"""JumpReLU encoding (``sae_fast::jumprelu_select``) and the fused training forward.

``pre = (x - b_dec) @ W_encᵀ + b_enc``; a latent is active where ``pre > θ`` (per latent).
Encoding returns ``relu(pre)·H(pre - θ)`` (the reference libraries' rule, which only matters
for θ < 0) as CSR, or dense when asked. The training forward follows the straight-through
rules of shared/DESIGN.md with the rectangle kernel ``K(u) = 1[|u| < 1/2]`` and bandwidth ε:

* ``f = pre·H(pre - θ)``: gradient to ``pre`` on active entries; to θ as ``-(θ/ε)·K((pre-θ)/ε)``
  times the entry's downstream gradient, on every entry within ε/2 of θ, active or not;
* ``l0`` = mean active latents per row: gradient to θ only, ``-(1/ε)·K((pre-θ)/ε)``.

One fused pass (the threshold kernel with a band) emits the union of the active entries and
the near-threshold ones as one CSR list; inactive near entries carry f = 0, so the CSR decode
gives their downstream gradient ``⟨∂x̂_n, W_dec[m]⟩`` for free. No ``[N, M]`` tensor.
"""

import math
import os
from typing import NamedTuple, Optional

import torch

from .. import _backend
from ..reference.threshold import threshold_select
from . import _checks
from .decode import csr_encoder_backward, csr_rows, sparse_decode_csr_op

_OP = "jumprelu_encode"
_TRAIN_OP = "jumprelu_training_forward"


class JumpReLUCodes(NamedTuple):
    """CSR codes: row n holds ``values[row_offsets[n]:row_offsets[n+1]]`` at latents
    ``indices[...]``, ascending."""

    values: torch.Tensor
    indices: torch.Tensor
    row_offsets: torch.Tensor


@torch.library.custom_op("sae_fast::jumprelu_select", mutates_args=())
def jumprelu_select_op(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: Optional[torch.Tensor],
    b_dec: Optional[torch.Tensor],
    threshold: torch.Tensor,
    half_band: Optional[float],
    relu: bool,
    dense: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pre [u], indices [u], row_offsets [N+1], dense [N, M] or [0, 0]) of the active
    entries (``pre > θ``, and ``pre > 0`` with ``relu``) and, with ``half_band``, those with
    ``|pre - θ| < half_band``; ``dense`` holds the active values, zeros elsewhere."""
    n, m = x.shape[0], W_enc.shape[0]
    out = None
    if dense:  # every element is written by the selection (NaN first under SAE_FAST_POISON_OUTPUTS=1)
        poison = os.environ.get("SAE_FAST_POISON_OUTPUTS") == "1"
        out = torch.full((n, m), float("nan"), device=x.device, dtype=x.dtype) if poison else x.new_empty((n, m))
    if backend == "reference":
        vals, idx, ro = threshold_select(x, W_enc, b_enc, b_dec, threshold, relu=relu, half_band=half_band, dense=out)
    else:
        from ..triton_kernels import threshold_encode as fused

        # First guess of listed entries per row and split: real JumpReLU SAEs keep tens to a
        # few hundred per row; a row above it costs a recompute of that row, never an entry.
        vals, idx, ro = fused.threshold_encode(x, W_enc, b_enc, b_dec, threshold, relu=relu, half_band=half_band,
                                               dense=out, capacity=512)
    return vals, idx, ro, out if dense else x.new_zeros((0, 0))


@jumprelu_select_op.register_fake
def _(x, W_enc, b_enc, b_dec, threshold, half_band, relu, dense, backend):
    u = torch.library.get_ctx().new_dynamic_size()
    shape = (x.shape[0], W_enc.shape[0]) if dense else (0, 0)
    return (x.new_empty((u,)), x.new_empty((u,), dtype=torch.int64), x.new_empty((x.shape[0] + 1,), dtype=torch.int64),
            x.new_empty(shape))


def _select_setup(ctx, inputs, output):
    x, W_enc, b_enc, b_dec, threshold, half_band, relu, dense, backend = inputs
    _, indices, row_offsets, _ = output
    ctx.save_for_backward(x, W_enc, b_dec, indices, row_offsets)
    ctx.has_b_enc, ctx.dense, ctx.backend = b_enc is not None, dense, backend


def _select_backward(ctx, grad_pre, _gi, _go, grad_dense):
    """Through the listed entries only (the selection itself is piecewise constant: θ gets
    its straight-through gradient from jumprelu_gate / jumprelu_l0, not here)."""
    x, W_enc, b_dec, indices, row_offsets = ctx.saved_tensors
    G = grad_pre
    if ctx.dense and grad_dense is not None:
        # every listed entry is active when dense output is asked for (encoding: no band)
        rows = csr_rows(row_offsets, indices.shape[0])
        from_dense = grad_dense[rows, indices]
        G = from_dense if G is None else G + from_dense
    grads = csr_encoder_backward(G, x, W_enc, b_dec, indices, row_offsets, ctx.needs_input_grad[:4], ctx.has_b_enc,
                                 ctx.backend)
    return (*grads, None, None, None, None, None)


jumprelu_select_op.register_autograd(_select_backward, setup_context=_select_setup)


def _near(pre, indices, threshold, half_band):
    """Listed entries within half_band of their threshold, compared like the kernel (fp32 on
    values rounded to pre's dtype)."""
    cdt = torch.float64 if pre.dtype == torch.float64 else torch.float32
    theta = threshold.to(pre.dtype)[indices]
    return (pre.to(cdt) - theta.to(cdt)).abs() < half_band, (pre > theta) | torch.isnan(pre)


@torch.library.custom_op("sae_fast::jumprelu_gate", mutates_args=())
def jumprelu_gate_op(pre: torch.Tensor, indices: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """f = pre·H(pre - θ[indices]) over listed entries; a NaN pre stays NaN (it must reach the loss)."""
    return torch.where((pre > threshold.to(pre.dtype)[indices]) | torch.isnan(pre), pre, torch.zeros_like(pre))


@jumprelu_gate_op.register_fake
def _(pre, indices, threshold, bandwidth):
    return torch.empty_like(pre)


def _gate_setup(ctx, inputs, output):
    pre, indices, threshold, bandwidth = inputs
    ctx.save_for_backward(pre, indices, threshold)
    ctx.bandwidth = bandwidth


def _gate_backward(ctx, grad_f):
    pre, indices, threshold = ctx.saved_tensors
    eps = ctx.bandwidth
    near, active = _near(pre, indices, threshold, eps / 2)
    grad_pre = torch.where(active, grad_f, torch.zeros_like(grad_f))
    grad_theta = None
    if ctx.needs_input_grad[2]:
        acc = _checks.accumulation_dtype(threshold.dtype)
        contrib = torch.where(near, grad_f.to(acc), torch.zeros((), dtype=acc, device=pre.device))
        per_latent = torch.zeros(threshold.shape[0], dtype=acc, device=pre.device).index_add_(0, indices, contrib)
        grad_theta = (-(threshold.to(acc) / eps) * per_latent).to(threshold.dtype)
    return grad_pre, None, grad_theta, None


jumprelu_gate_op.register_autograd(_gate_backward, setup_context=_gate_setup)


@torch.library.custom_op("sae_fast::jumprelu_l0", mutates_args=())
def jumprelu_l0_op(pre: torch.Tensor, indices: torch.Tensor, threshold: torch.Tensor, bandwidth: float,
                   num_rows: int) -> torch.Tensor:
    """Mean number of active latents per row (0-d, fp32 for half-precision thresholds, else
    the threshold's dtype: bf16 would report an L0 of 500 in steps of 2)."""
    active = pre > threshold.to(pre.dtype)[indices]
    return (active.sum(dtype=torch.float64) / max(num_rows, 1)).to(_checks.accumulation_dtype(threshold.dtype))


@jumprelu_l0_op.register_fake
def _(pre, indices, threshold, bandwidth, num_rows):
    return threshold.new_empty((), dtype=_checks.accumulation_dtype(threshold.dtype))


def _l0_setup(ctx, inputs, output):
    pre, indices, threshold, bandwidth, num_rows = inputs
    ctx.save_for_backward(pre, indices, threshold)
    ctx.bandwidth, ctx.num_rows = bandwidth, num_rows


def _l0_backward(ctx, grad_l0):
    pre, indices, threshold = ctx.saved_tensors
    eps = ctx.bandwidth
    near, _ = _near(pre, indices, threshold, eps / 2)
    acc = _checks.accumulation_dtype(threshold.dtype)
    counts = torch.zeros(threshold.shape[0], dtype=acc, device=pre.device).index_add_(0, indices, near.to(acc))
    grad_theta = (-(grad_l0.to(acc) / (eps * max(ctx.num_rows, 1))) * counts).to(threshold.dtype)
    return None, None, grad_theta, None, None


jumprelu_l0_op.register_autograd(_l0_backward, setup_context=_l0_setup)


def _check_encoder_args(op, x, W_enc, b_enc, threshold, b_dec):
    _, _, m = _checks.check_encoder_inputs(op, x, W_enc, b_enc, b_dec)
    _checks.check_tensor(op, "threshold", threshold, dim=1, dtypes=_checks.FLOAT_DTYPES)
    if threshold.shape[0] != m:
        raise ValueError(f"{op}: threshold must be [{m}] (one per latent), got {tuple(threshold.shape)}")
    _checks.check_same_device(op, x=x, threshold=threshold)


def jumprelu_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: Optional[torch.Tensor],
    threshold: torch.Tensor,
    *,
    b_dec: Optional[torch.Tensor] = None,
    dense: bool = False,
    index_dtype: torch.dtype = torch.int64,
    backend: Optional[str] = None,
):
    """JumpReLU SAE encoding: ``relu(pre)·H(pre - threshold)``, ``pre = (x - b_dec) @ W_encᵀ + b_enc``.

    Returns ``JumpReLUCodes(values, indices, row_offsets)`` (CSR, latents ascending per row;
    no active entry is ever dropped: rows overflowing the kernel's first capacity guess are
    recomputed), or with ``dense=True`` the ``[N, M]`` activations written by the kernel.
    Differentiable to x, W_enc, b_enc, b_dec through the active entries. ``threshold`` [M]
    must not require grad: these codes cannot give its straight-through gradient (it needs
    the inactive entries near the threshold) — use ``jumprelu_training_forward``.

    Numerics: ``x - b_dec`` is rounded once to W_enc's dtype, products accumulate in fp32,
    ``pre`` is rounded to x's dtype and compared with the threshold rounded to x's dtype. A NaN
    pre-activation is kept as an active NaN entry, so NaN inputs reach the output and the loss.
    """
    _check_encoder_args(_OP, x, W_enc, b_enc, threshold, b_dec)
    if threshold.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{_OP}: threshold requires grad, but the codes of jumprelu_encode cannot give its "
                         "straight-through gradient (it needs inactive entries near the threshold): train with "
                         "sae_fast.jumprelu_training_forward, or pass threshold.detach()")
    if index_dtype not in _checks.INDEX_DTYPES:
        raise TypeError(f"{_OP}: index_dtype must be torch.int64 or torch.int32, got {index_dtype}")
    resolved = _backend.resolve_backend(backend, x.device, x.dtype, _OP)
    vals, idx, ro, out = jumprelu_select_op(x, W_enc, b_enc, b_dec, threshold, None, True, dense, resolved)
    if dense:
        return out
    return JumpReLUCodes(vals, idx.to(index_dtype), ro)


def jumprelu_training_forward(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: Optional[torch.Tensor],
    threshold: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: Optional[torch.Tensor],
    *,
    bandwidth: float = 0.05,
    apply_b_dec_to_input: bool = True,
    return_codes: bool = False,
    backend: Optional[str] = None,
):
    """Fused JumpReLU SAE training forward: ``(x_hat [N, d_out], l0)``, and with
    ``return_codes`` also the listed entries as ``JumpReLUCodes`` (values f, detached: the
    active entries, plus near-threshold inactive ones with value 0).

    ``f = pre·H(pre - θ)`` with ``pre = (x - b_dec·c) @ W_encᵀ + b_enc`` (c = 1 when
    ``apply_b_dec_to_input``), ``x_hat = f @ W_dec + b_dec`` decoded sparsely, ``l0`` the mean
    number of active latents per row (a differentiable 0-d tensor; fp32 for half-precision
    inputs). Gradients reach every argument, θ through the straight-through rules in this module's docstring (rectangle
    kernel, ``bandwidth`` ε). Loss = ‖x - x_hat‖² terms + λ·l0, in plain torch on top.
    """
    _check_encoder_args(_TRAIN_OP, x, W_enc, b_enc, threshold, None)
    _checks.check_tensor(_TRAIN_OP, "W_dec", W_dec, dim=2)
    m = W_enc.shape[0]
    if W_dec.shape[0] != m:
        raise ValueError(f"{_TRAIN_OP}: W_dec must be [{m}, d_out] (latent-major), got {tuple(W_dec.shape)}")
    if b_dec is not None:
        _checks.check_tensor(_TRAIN_OP, "b_dec", b_dec, dim=1)
        if b_dec.shape[0] != W_dec.shape[1]:
            raise ValueError(f"{_TRAIN_OP}: b_dec must be [{W_dec.shape[1]}], got {tuple(b_dec.shape)}")
        if apply_b_dec_to_input and b_dec.shape[0] != x.shape[1]:
            raise ValueError(f"{_TRAIN_OP}: apply_b_dec_to_input needs d_out == d_in, got b_dec {tuple(b_dec.shape)} "
                             f"for x {tuple(x.shape)}")
    _checks.check_same_device(_TRAIN_OP, x=x, W_dec=W_dec, b_dec=b_dec)
    _checks.check_same_dtype(_TRAIN_OP, x=x, W_dec=W_dec, b_dec=b_dec)
    bw = _checks.real(bandwidth)
    if bw is None or not (math.isfinite(bw) and bw > 0):
        raise ValueError(f"{_TRAIN_OP}: bandwidth must be a finite float > 0, got {bandwidth!r}")
    bandwidth = bw
    resolved = _backend.resolve_backend(backend, x.device, x.dtype, _TRAIN_OP)
    centre = b_dec if (apply_b_dec_to_input and b_dec is not None) else None
    pre, idx, ro, _ = jumprelu_select_op(x, W_enc, b_enc, centre, threshold, bandwidth / 2, False, False, resolved)
    f = jumprelu_gate_op(pre, idx, threshold, float(bandwidth))
    x_hat = sparse_decode_csr_op(f, idx, ro, W_dec, b_dec, resolved)
    l0 = jumprelu_l0_op(pre, idx, threshold, float(bandwidth), x.shape[0])
    if return_codes:
        return x_hat, l0, JumpReLUCodes(f.detach(), idx, ro)
    return x_hat, l0
