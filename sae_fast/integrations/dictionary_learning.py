"""dictionary_learning (PyPI ``dictionary-learning``, module ``dictionary_learning``) on the sae_fast ops.

``accelerate(obj, backend=None)`` patches one object in place and returns an ``Acceleration``
handle (``undo()`` or a ``with`` block restores it). Supported objects:

==========================  =====================================================================
``AutoEncoderTopK``         ``encode(x, return_topk=False, use_threshold=False)`` and
                            ``forward(x, output_features=False)``: ``topk_encode`` (ReLU of the
                            top-k pre-activations) + ``sparse_decode``; with ``use_threshold`` the
                            scalar ``threshold`` buffer through the threshold kernel.
``BatchTopKSAE``            ``encode(x, return_active=False, use_threshold=True)`` and ``forward``:
                            ``batchtopk_encode`` (the k·N largest ReLU activations of the batch,
                            CSR) or, with ``use_threshold`` (its default, so also ``forward``), the
                            scalar threshold; ``sparse_decode_csr``.
``JumpReluAutoEncoder``     ``encode(x, output_pre_jump=False)`` and ``forward``: ``jumprelu_encode``
                            (``b_dec`` subtracted only when ``apply_b_dec_to_input``);
                            ``sparse_decode_csr``.
``TopKTrainer``             ``loss(x, step=None, logging=False)`` (so ``update(step, x)``), and its
                            ``ae`` as above: one fused ``topk_encode`` gives the codes and the AuxK
                            candidates among dead latents.
``BatchTopKTrainer``        ``loss`` and its ``ae``.
``JumpReluTrainer``         ``loss(x, step, logging=False)`` and its ``ae``:
                            ``jumprelu_training_forward`` + the library's L0 rule (see below).
==========================  =====================================================================

The trainers' losses keep the library's arithmetic and side effects: the running inference
``threshold`` (updated by the trainer's own ``update_threshold`` after
``threshold_start_step``), ``num_tokens_since_fired`` / ``dead_features`` /
``effective_l0`` / ``pre_norm_auxk_loss``, the AuxK loss (top ``min(top_k_aux, #dead)`` ReLU
pre-activations among latents dead *after* this batch's update, decoded without bias,
normalised by the residual's variance, ``nan_to_num``), the ``logging=True`` named tuple
(with the dense features scattered from the sparse codes).

Nothing here builds the dense ``[N, M]`` pre-activations. Dense outputs that the library's
API returns (``encode``'s features, ``forward(..., output_features=True)``) are written from
the sparse codes (a scatter) or by the threshold kernel directly. Parameters stay the
library's tensors, read at every call (``decoder.weight`` ``[d, M]`` is passed as its ``.T``
view, ``W_enc`` ``[d, M]`` likewise): its optimizer, state dict and in-place updates of ``.data``
keep working.

Left to the library (called unchanged): ``decode(f)`` (its input is a dense ``[.., M]`` tensor
whose every entry may need a gradient), and the calls that return the dense pre-activations
themselves: ``AutoEncoderTopK.encode(return_topk=True)``, ``BatchTopKSAE.encode(return_active=
True)``, ``JumpReluAutoEncoder.encode(output_pre_jump=True)``, BatchTopK's batch selection on
an input that is not 2-D (the library then keeps ``k·x.size(0)`` entries over all rows), and
a trainer loss on an input that is not ``[N, d]``. Every other class (``AutoEncoder``,
``GatedAutoEncoder``, ``AutoEncoderNew``, Matryoshka BatchTopK, the standard / gated / p-anneal
trainers, subclasses that override the methods patched here, ...) is left untouched with a
warning.

Documented differences (everything else matches to rounding):

* TopK ties: the library takes ReLU then ``torch.topk``; ``topk_encode`` takes the top-k
  pre-activations then ReLU, ties to the smaller latent id. The values and the dense
  features agree; when a row has fewer than k positive pre-activations, the *indices* of its
  zero-valued entries differ (ours: the largest negative pre-activations; the library:
  whichever zeros ``torch.topk`` returns). ``TopKTrainer`` marks every selected index as
  fired, zero or not, so for such rows ``num_tokens_since_fired`` resets different latents.
* BatchTopK: exact, including the zero handling (zeros are never "active" in the library
  either: it tests ``f.sum(0) > 0`` and ``f > 0``); only exact ties at the k·N-th value may
  choose different entries (ours: the smaller row, then the smaller latent id).
* Thresholds (``threshold`` buffers, JumpReLU θ) are compared in the input's dtype (the
  library promotes to fp32 for fp16/bf16 inputs).
* JumpReLU training: the library applies its L0 step function to ``f = pre·H(pre-θ)``, not to
  ``pre``: an inactive entry counts ``H(-θ)`` in L0 and gives θ the pseudo-gradient
  ``-(1/ε)·K(-θ/ε)`` whatever its pre-activation, so near-threshold *inactive* entries get no
  L0 gradient unless ``|θ| < ε/2``. We reproduce that rule (``_LibraryL0``) rather than
  ``jumprelu_training_forward``'s own ``l0`` (the paper's rule on ``pre``). The
  reconstruction's θ gradient ``-(θ/ε)·K((pre-θ)/ε)·∂f`` is the op's and the library's.
  The ``f`` of ``logging=True`` is detached.
* Autocast (the library's ``trainSAE`` wraps ``update`` in ``torch.autocast``): inputs and
  weights are cast to the autocast dtype, as autocast casts the library's matmuls, and
  ``b_dec`` is added after the decode so ``x_hat`` is promoted like the library's
  ``decoder(f) + b_dec``. Features come back in the autocast dtype (the library's JumpReLU
  returns fp32 there).
* Forward hooks on the ``encoder`` / ``decoder`` submodules do not fire (those submodules are
  not called); hooks on the SAE module itself do.

Beware, whatever the adapter: importing dictionary_learning imports nnsight (0.3), which
replaces torch attributes for the whole process, among them ``FakeTensor.__new__`` with a
wrapper that rejects current torch's ``pytype`` argument. ``torch.compile`` and
``torch.library.opcheck`` of any custom op (ours included) then fail with "unexpected keyword
argument 'pytype'". ``sys.modules["nnsight"].DEFAULT_PATCHER.__exit__(None, None, None)``
restores torch (nnsight's own tracing then no longer works); this module leaves that choice
to the user.
"""

from __future__ import annotations

import warnings
from collections import namedtuple
from typing import Any, Optional

import torch

from ..ops import (
    batchtopk_encode,
    jumprelu_encode,
    jumprelu_training_forward,
    sparse_decode,
    sparse_decode_csr,
    topk_encode,
)
from ._patch import Acceleration

LIBRARY = "dictionary_learning"


# ----------------------------------------------------------------------------- helpers


def _classes():
    """The library's classes (imported lazily: only when an object of theirs is accelerated)."""
    from dictionary_learning.dictionary import JumpReluAutoEncoder
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE, BatchTopKTrainer
    from dictionary_learning.trainers.jumprelu import JumpReluTrainer
    from dictionary_learning.trainers.top_k import AutoEncoderTopK, TopKTrainer

    return AutoEncoderTopK, BatchTopKSAE, JumpReluAutoEncoder, TopKTrainer, BatchTopKTrainer, JumpReluTrainer


def _keeps(obj: Any, base: type, names) -> bool:
    """``obj`` is a ``base`` whose class does not override ``names`` (our replacements follow
    ``base``'s code; an override is someone else's semantics)."""
    return isinstance(obj, base) and all(getattr(type(obj), n) is getattr(base, n) for n in names)


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    try:
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
    except (AttributeError, RuntimeError, TypeError):  # device types without autocast
        pass
    return None


def _cast(dtype: Optional[torch.dtype], t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t if t is None or dtype is None or t.dtype == dtype else t.to(dtype)


class _Weights:
    """One call's view of an SAE's tensors: latent-major ``W_enc`` [M, d] / ``W_dec`` [M, d]
    (strided views of the library's storage), cast to the autocast dtype when autocast is on
    (as autocast casts the library's matmuls). ``b_dec`` is added after the decode under
    autocast (``decoder(f) + b_dec`` promotes there)."""

    def __init__(self, x, W_enc, b_enc, b_dec, W_dec, *, subtract_b_dec: bool):
        ac = _autocast_dtype(x.device)
        if ac is None and torch.promote_types(x.dtype, W_enc.dtype) == W_enc.dtype:
            # bf16 activations into an fp32 SAE: the library's ``x - b_dec`` promotes them
            x = _cast(W_enc.dtype, x)
        self.x = _cast(ac, x)
        self.W_enc, self.b_enc, self.W_dec = _cast(ac, W_enc), _cast(ac, b_enc), _cast(ac, W_dec)
        self.b_dec = b_dec
        self.b_dec_c = _cast(ac, b_dec)
        self.centre = self.b_dec_c if subtract_b_dec else None
        self.bias_in_decode = b_dec is None or b_dec.dtype == self.W_dec.dtype

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        """Add b_dec after a decode that was given no bias."""
        return out if self.bias_in_decode else out + self.b_dec

    @property
    def decode_bias(self):
        return self.b_dec if self.bias_in_decode else None


def _topk_weights(ae, x):
    return _Weights(x, ae.encoder.weight, ae.encoder.bias, ae.b_dec, ae.decoder.weight.T, subtract_b_dec=True)


def _jumprelu_weights(ae, x, subtract_b_dec):
    return _Weights(x, ae.W_enc.T, ae.b_enc, ae.b_dec, ae.W_dec, subtract_b_dec=subtract_b_dec)


class _IntBuffer:
    """``int(buffer)`` without a device sync per call: re-read only when the tensor or its
    version counter (bumped by in-place writes such as ``load_state_dict``) changes."""

    def __init__(self):
        self._key = None
        self._value = None

    def __call__(self, t: torch.Tensor) -> int:
        try:
            key = (t, t._version)
        except RuntimeError:  # inference tensors have no version counter
            return int(t)
        if self._key is None or self._key[0] is not t or self._key[1] != key[1]:
            self._key, self._value = key, int(t)
        return self._value


def _rows_of(row_offsets: torch.Tensor, nnz: int) -> torch.Tensor:
    n = row_offsets.shape[0] - 1
    counts = row_offsets[1:] - row_offsets[:-1]
    return torch.repeat_interleave(torch.arange(n, device=row_offsets.device), counts, output_size=nnz)


def _dense_from_csr(values, indices, row_offsets, n: int, m: int) -> torch.Tensor:
    rows = _rows_of(row_offsets, values.shape[0])
    return values.new_zeros((n, m)).index_put((rows, indices.long()), values)


def _forward_from_csr(w, codes, lead, n: int, m: int, output_features: bool, backend):
    """The library's ``forward`` return from CSR codes: x_hat (and the dense features)."""
    x_hat = w.finish(sparse_decode_csr(codes.values, codes.indices, codes.row_offsets, w.W_dec, w.decode_bias,
                                       backend=backend))
    x_hat = x_hat.reshape(*lead, x_hat.shape[-1])
    if not output_features:
        return x_hat
    return x_hat, _dense_from_csr(codes.values, codes.indices, codes.row_offsets, n, m).reshape(*lead, m)


def _dense_from_topk(values, indices, m: int) -> torch.Tensor:
    return values.new_zeros((values.shape[0], m)).scatter(1, indices.long(), values)


def _plain(x: torch.Tensor) -> bool:
    """Inputs the ops take after flattening the leading dims (else: the library's own code)."""
    return x.dim() >= 1 and x.numel() > 0 and x.is_floating_point()


def _threshold_dense(w: _Weights, threshold: torch.Tensor, m: int, backend):
    """``relu(pre)·(relu(pre) > θ)`` for a scalar θ, dense, written by the threshold kernel."""
    theta = threshold.detach().reshape(1).expand(m)
    return jumprelu_encode(w.x, w.W_enc, w.b_enc, theta, b_dec=w.centre, dense=True, backend=backend)


# ----------------------------------------------------------------------------- SAE modules


def _patch_topk_ae(handle: Acceleration, ae, backend) -> None:
    prev_encode, prev_forward, k_of = type(ae).encode, type(ae).forward, _IntBuffer()  # (class functions:
    # a deep copy of the patched object must fall back on itself, not on this instance)

    def encode(self, x, return_topk: bool = False, use_threshold: bool = False):
        if return_topk or not _plain(x):  # the dense post-ReLU activations are asked for
            return prev_encode(self, x, return_topk=return_topk, use_threshold=use_threshold)
        lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
        w, m = _topk_weights(self, x2), self.encoder.weight.shape[0]
        if use_threshold:
            f = _threshold_dense(w, self.threshold, m, backend)
        else:
            codes = topk_encode(w.x, w.W_enc, w.b_enc, k_of(self.k), b_dec=w.centre, backend=backend)
            f = _dense_from_topk(codes.values, codes.indices, m)
        return f.reshape(*lead, m)

    def forward(self, x, output_features: bool = False):
        if not _plain(x):
            return prev_forward(self, x, output_features=output_features)
        lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
        w, m = _topk_weights(self, x2), self.encoder.weight.shape[0]
        codes = topk_encode(w.x, w.W_enc, w.b_enc, k_of(self.k), b_dec=w.centre, backend=backend)
        x_hat = w.finish(sparse_decode(codes.values, codes.indices, w.W_dec, w.decode_bias, backend=backend))
        x_hat = x_hat.reshape(*lead, x_hat.shape[-1])
        if not output_features:
            return x_hat
        return x_hat, _dense_from_topk(codes.values, codes.indices, m).reshape(*lead, m)

    handle.set(ae, "encode", encode)
    handle.set(ae, "forward", forward)


def _patch_batchtopk_ae(handle: Acceleration, ae, backend) -> None:
    prev_encode, prev_forward, k_of = type(ae).encode, type(ae).forward, _IntBuffer()  # (class functions:
    # a deep copy of the patched object must fall back on itself, not on this instance)

    def encode(self, x, return_active: bool = False, use_threshold: bool = True):
        # return_active returns the dense post-ReLU activations; the batch selection of a
        # non-2-D input keeps k·x.size(0) entries over all rows (not k per row on average).
        if return_active or not _plain(x) or (not use_threshold and x.dim() != 2):
            return prev_encode(self, x, return_active=return_active, use_threshold=use_threshold)
        lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
        w, m = _topk_weights(self, x2), self.encoder.weight.shape[0]
        if use_threshold:
            return _threshold_dense(w, self.threshold, m, backend).reshape(*lead, m)
        codes = batchtopk_encode(w.x, w.W_enc, w.b_enc, k_of(self.k), b_dec=w.centre, backend=backend)
        return _dense_from_csr(codes.values, codes.indices, codes.row_offsets, x2.shape[0], m)

    def forward(self, x, output_features: bool = False):
        if not _plain(x):
            return prev_forward(self, x, output_features=output_features)
        lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
        w, m = _topk_weights(self, x2), self.encoder.weight.shape[0]
        # forward encodes with encode's default, use_threshold=True: the scalar threshold
        codes = batchtopk_encode(w.x, w.W_enc, w.b_enc, k_of(self.k), b_dec=w.centre, threshold=self.threshold,
                                 backend=backend)
        return _forward_from_csr(w, codes, lead, x2.shape[0], m, output_features, backend)

    handle.set(ae, "encode", encode)
    handle.set(ae, "forward", forward)


def _patch_jumprelu_ae(handle: Acceleration, ae, backend) -> None:
    prev_encode, prev_forward = type(ae).encode, type(ae).forward  # (class functions: see above)

    def encode(self, x, output_pre_jump: bool = False):
        if output_pre_jump or not _plain(x):  # the dense pre-activations are asked for
            return prev_encode(self, x, output_pre_jump=output_pre_jump)
        lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
        w, m = _jumprelu_weights(self, x2, bool(self.apply_b_dec_to_input)), self.W_enc.shape[1]
        # θ gets no gradient from the library's encode either (a comparison)
        f = jumprelu_encode(w.x, w.W_enc, w.b_enc, self.threshold.detach(), b_dec=w.centre, dense=True,
                            backend=backend)
        return f.reshape(*lead, m)

    def forward(self, x, output_features: bool = False):
        if not _plain(x):
            return prev_forward(self, x, output_features=output_features)
        lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
        w, m = _jumprelu_weights(self, x2, bool(self.apply_b_dec_to_input)), self.W_enc.shape[1]
        codes = jumprelu_encode(w.x, w.W_enc, w.b_enc, self.threshold.detach(), b_dec=w.centre, backend=backend)
        return _forward_from_csr(w, codes, lead, x2.shape[0], m, output_features, backend)

    handle.set(ae, "encode", encode)
    handle.set(ae, "forward", forward)


# ----------------------------------------------------------------------------- trainers


def _auxk_loss(trainer, residual, x_rec_aux):
    """The library's normalised AuxK loss from the auxiliary reconstruction (no bias)."""
    l2_loss_aux = (residual.float() - x_rec_aux.float()).pow(2).sum(dim=-1).mean()
    trainer.pre_norm_auxk_loss = l2_loss_aux
    residual_mu = residual.mean(dim=0)[None, :].broadcast_to(residual.shape)
    loss_denom = (residual.float() - residual_mu.float()).pow(2).sum(dim=-1).mean()
    return (l2_loss_aux / loss_denom).nan_to_num(0.0)


def _aux_reconstruction(w: _Weights, aux_values, aux_indices, k_aux: int, backend):
    """Decode ReLU of the dead latents' pre-activations, without bias (``ae.decoder(...)``)."""
    if k_aux == 0:  # the library's topk(0): an all-zero reconstruction
        return w.x.new_zeros(w.x.shape[0], w.W_dec.shape[1])
    return sparse_decode(torch.relu(aux_values), aux_indices, w.W_dec, None, backend=backend)


def _aux_codes(w: _Weights, dead: torch.Tensor, k_aux: int, backend):
    """Top-``k_aux`` pre-activations among ``dead`` latents (a pass of its own: k=1 main codes,
    unused)."""
    codes = topk_encode(w.x, w.W_enc, w.b_enc, 1, b_dec=w.centre, dead_mask=dead.to(w.x.device), k_aux=k_aux,
                        backend=backend)
    return codes.aux_values, codes.aux_indices


def _dead_guess(trainer, n: int):
    """(superset of the latents dead after this batch, its AuxK width): those dead if nothing
    fires in the n rows. Known before the selection, so the fused encode can take its aux
    candidates there; (None, 0) without AuxK."""
    if trainer.top_k_aux <= 0:
        return None, 0
    dead_guess = (trainer.num_tokens_since_fired + n) >= trainer.dead_feature_threshold
    return dead_guess, min(trainer.top_k_aux, int(dead_guess.sum()))


def _auxk_after_batch(trainer, w: _Weights, codes, residual, dead_guess, k_aux_guess: int, backend):
    """The library's AuxK loss on the latents dead after this batch's counter update: the fused
    aux entries when the guess was exact, else one aux pass on the exact set. Sets the
    trainer's ``dead_features`` / ``pre_norm_auxk_loss`` as the library does."""
    dead = trainer.num_tokens_since_fired >= trainer.dead_feature_threshold
    trainer.dead_features = int(dead.sum())
    if trainer.dead_features == 0:
        trainer.pre_norm_auxk_loss = -1
        return torch.tensor(0, dtype=residual.dtype, device=residual.device)
    k_aux = min(trainer.top_k_aux, trainer.dead_features)
    if k_aux > 0 and k_aux == k_aux_guess and torch.equal(dead, dead_guess):
        aux_values, aux_indices = codes.aux_values, codes.aux_indices
    elif k_aux > 0:
        aux_values, aux_indices = _aux_codes(w, dead, k_aux, backend)
    else:
        aux_values = aux_indices = None
    return _auxk_loss(trainer, residual, _aux_reconstruction(w, aux_values, aux_indices, k_aux, backend))


def _mark_fired(trainer, num_tokens: int, fired_indices: torch.Tensor) -> None:
    did_fire = torch.zeros_like(trainer.num_tokens_since_fired, dtype=torch.bool)
    did_fire[fired_indices.to(did_fire.device)] = True
    trainer.num_tokens_since_fired += num_tokens
    trainer.num_tokens_since_fired[did_fire] = 0


_LossLogTopK = namedtuple("LossLog", ["x", "x_hat", "f", "losses"])
_LossLogJumpRelu = namedtuple("LossLog", ["x", "recon", "f", "losses"])


def _patch_topk_trainer(handle: Acceleration, trainer, backend) -> None:
    prev_loss, k_of = type(trainer).loss, _IntBuffer()  # (class function: see _patch_topk_ae)

    def loss(self, x, step=None, logging=False):
        if x.dim() != 2 or not _plain(x):
            return prev_loss(self, x, step=step, logging=logging)
        ae = self.ae
        n, m = x.shape[0], ae.encoder.weight.shape[0]
        w = _topk_weights(ae, x)
        # AuxK looks at the latents dead *after* this batch's update. Before the selection we
        # know a superset: those dead if nothing fires (all of them when the threshold is
        # <= 0). The fused selection takes its aux candidates there; if a latent of that set
        # fires in this batch, the aux candidates are recomputed on the exact set.
        dead_guess, k_aux_guess = _dead_guess(self, n) if self.auxk_alpha > 0 else (None, 0)
        codes = topk_encode(w.x, w.W_enc, w.b_enc, k_of(ae.k), b_dec=w.centre,
                            dead_mask=dead_guess.to(x.device) if k_aux_guess else None, k_aux=k_aux_guess,
                            backend=backend)
        top_acts, top_indices = codes.values, codes.indices

        if step > self.threshold_start_step:
            self.update_threshold(top_acts)

        x_hat = w.finish(sparse_decode(top_acts, top_indices, w.W_dec, w.decode_bias, backend=backend))
        e = x - x_hat
        self.effective_l0 = top_acts.size(1)
        _mark_fired(self, n, top_indices.flatten())

        l2_loss = e.pow(2).sum(dim=-1).mean()
        if self.auxk_alpha > 0:
            auxk_loss = _auxk_after_batch(self, w, codes, e.detach(), dead_guess, k_aux_guess, backend)
        else:
            auxk_loss = 0
        total = l2_loss + self.auxk_alpha * auxk_loss

        if not logging:
            return total
        f = _dense_from_topk(top_acts, top_indices, m)
        return _LossLogTopK(x, x_hat, f, {"l2_loss": l2_loss.item(), "auxk_loss": auxk_loss.item(),
                                          "loss": total.item()})

    handle.set(trainer, "loss", loss)


def _patch_batchtopk_trainer(handle: Acceleration, trainer, backend) -> None:
    prev_loss, k_of = type(trainer).loss, _IntBuffer()  # (class function: see _patch_topk_ae)

    def loss(self, x, step=None, logging=False):
        if x.dim() != 2 or not _plain(x):
            return prev_loss(self, x, step=step, logging=logging)
        ae = self.ae
        n, m = x.shape[0], ae.encoder.weight.shape[0]
        w = _topk_weights(ae, x)
        # AuxK's dead set, as in the TopK trainer: the superset known before the selection
        # feeds the fused aux candidates; if one of those latents fires in this batch, the aux
        # candidates are recomputed on the exact set.
        dead_guess, k_aux_guess = _dead_guess(self, n)
        codes = batchtopk_encode(w.x, w.W_enc, w.b_enc, k_of(ae.k), b_dec=w.centre,
                                 dead_mask=dead_guess.to(x.device) if k_aux_guess else None, k_aux=k_aux_guess,
                                 backend=backend)

        if step > self.threshold_start_step:
            # the library's update_threshold reads f[f > 0]: exactly the stored CSR values
            self.update_threshold(codes.values.detach())

        x_hat = w.finish(sparse_decode_csr(codes.values, codes.indices, codes.row_offsets, w.W_dec, w.decode_bias,
                                           backend=backend))
        e = x - x_hat
        self.effective_l0 = self.k
        # active latents (f.sum(0) > 0): those holding a stored (positive) entry
        _mark_fired(self, n, codes.indices)

        l2_loss = e.pow(2).sum(dim=-1).mean()
        auxk_loss = _auxk_after_batch(self, w, codes, e.detach(), dead_guess, k_aux_guess, backend)
        total = l2_loss + self.auxk_alpha * auxk_loss

        if not logging:
            return total
        f = _dense_from_csr(codes.values, codes.indices, codes.row_offsets, n, m)
        return _LossLogTopK(x, x_hat, f, {"l2_loss": l2_loss.item(), "auxk_loss": auxk_loss.item(),
                                          "loss": total.item()})

    handle.set(trainer, "loss", loss)


class _LibraryL0(torch.autograd.Function):
    """dictionary_learning's JumpReLU L0: ``mean_n Σ_m H(f_nm - θ_m)`` with its StepFunction
    applied to ``f`` (not ``pre``), θ's pseudo-gradient ``-(1/ε)·K((f-θ)/ε)`` (``K`` the open
    rectangle ``|u| < 1/2``), none to f. From the listed entries (``f`` values, latent ids) and
    ``N - listed`` implicit entries per latent with ``f = 0``."""

    @staticmethod
    def forward(ctx, f_values, indices, theta, bandwidth, num_rows):
        m = theta.shape[0]
        listed = torch.bincount(indices, minlength=m)
        unlisted = (num_rows - listed).to(torch.float64)
        steps = (f_values > theta[indices]).sum(dtype=torch.float64) + ((theta < 0).to(torch.float64) * unlisted).sum()
        ctx.save_for_backward(f_values, indices, theta, unlisted)
        ctx.bandwidth, ctx.num_rows = bandwidth, num_rows
        # the library's StepFunction returns .float(): its l0 is fp32 whatever the dtypes
        return (steps / num_rows).to(torch.float32)

    @staticmethod
    def backward(ctx, grad_l0):
        f_values, indices, theta, unlisted = ctx.saved_tensors
        eps, n = ctx.bandwidth, ctx.num_rows

        def rect(u):
            return ((u > -0.5) & (u < 0.5)).to(torch.float64)

        counts = torch.zeros(theta.shape[0], dtype=torch.float64, device=theta.device)
        counts.index_add_(0, indices, rect((f_values - theta[indices]) / eps))
        counts += rect((0 - theta) / eps) * unlisted
        grad_theta = (-(grad_l0.to(torch.float64) / (eps * n)) * counts).to(theta.dtype)
        return None, None, grad_theta, None, None


def _patch_jumprelu_trainer(handle: Acceleration, trainer, backend) -> None:
    prev_loss = type(trainer).loss  # (class function: see _patch_topk_ae)

    def loss(self, x, step, logging=False, **kwargs):
        ae = self.ae
        if x.dim() != 2 or not _plain(x):
            return prev_loss(self, x, step=step, logging=logging, **kwargs)
        sparsity_scale = self.sparsity_warmup_fn(step)
        x = x.to(ae.W_enc.dtype)
        n, m = x.shape[0], ae.W_enc.shape[1]
        # the library's trainer computes pre = x @ W_enc + b_enc whatever apply_b_dec_to_input says
        w = _jumprelu_weights(ae, x, subtract_b_dec=False)
        recon, _, codes = jumprelu_training_forward(
            w.x, w.W_enc, w.b_enc, ae.threshold, w.W_dec, w.decode_bias, bandwidth=self.bandwidth,
            apply_b_dec_to_input=False, return_codes=True, backend=backend)
        recon = w.finish(recon)
        f_values, indices = codes.values, codes.indices  # f = pre·H(pre-θ), detached

        # f.sum(0) > 0 (f < 0 where 0 > pre > θ)
        col_sum = torch.zeros(m, dtype=f_values.dtype, device=f_values.device).index_add_(0, indices, f_values)
        active = (col_sum > 0).to(self.num_tokens_since_fired.device)
        self.num_tokens_since_fired += x.size(0)
        self.num_tokens_since_fired[active] = 0
        self.dead_features = (self.num_tokens_since_fired > self.dead_feature_threshold).sum().item()

        recon_loss = (x - recon).pow(2).sum(dim=-1).mean()
        l0 = _LibraryL0.apply(f_values, indices, ae.threshold, float(self.bandwidth), n)
        sparsity_loss = self.sparsity_coefficient * ((l0 / self.target_l0) - 1).pow(2) * sparsity_scale
        total = recon_loss + sparsity_loss

        if not logging:
            return total
        f = _dense_from_csr(f_values, indices, codes.row_offsets, n, m)
        return _LossLogJumpRelu(x, recon, f, {"l2_loss": recon_loss.item(), "loss": total.item()})

    handle.set(trainer, "loss", loss)


# ----------------------------------------------------------------------------- entry point


def accelerate(obj: Any, *, backend: Optional[str] = None) -> Acceleration:
    """Route a dictionary_learning SAE's ``encode`` / ``forward``, or a trainer's ``loss`` (and
    its ``ae``), through the sae_fast ops, in place; see the module docstring for what is
    covered and the documented differences. ``backend``: passed to every op (None = the
    default choice of ``sae_fast._backend``). Unsupported objects get a warning and no patch."""
    handle = Acceleration(obj, LIBRARY)
    try:
        AutoEncoderTopK, BatchTopKSAE, JumpReluAutoEncoder, TopKTrainer, BatchTopKTrainer, JumpReluTrainer = _classes()
    except ImportError:
        AutoEncoderTopK = BatchTopKSAE = JumpReluAutoEncoder = TopKTrainer = BatchTopKTrainer = JumpReluTrainer = None

    sae_names = ("encode", "forward")
    trainer_names = ("loss", "get_auxiliary_loss")
    ae_plans = ((AutoEncoderTopK, _patch_topk_ae), (BatchTopKSAE, _patch_batchtopk_ae),
                (JumpReluAutoEncoder, _patch_jumprelu_ae))
    trainer_plans = ((TopKTrainer, AutoEncoderTopK, _patch_topk_trainer, _patch_topk_ae, trainer_names),
                     (BatchTopKTrainer, BatchTopKSAE, _patch_batchtopk_trainer, _patch_batchtopk_ae, trainer_names),
                     (JumpReluTrainer, JumpReluAutoEncoder, _patch_jumprelu_trainer, _patch_jumprelu_ae, ("loss",)))

    already = [n for n in sae_names + trainer_names if n in vars(obj)]
    inner = getattr(obj, "ae", None)
    already += [f"ae.{n}" for n in sae_names if isinstance(inner, torch.nn.Module) and n in vars(inner)]
    if already:  # a second patch would capture the first one's methods: undo could not restore
        warnings.warn(f"sae_fast.accelerate: this {type(obj).__name__} already has its own {already} (accelerated "
                      "already? undo() that handle first); nothing patched", stacklevel=2)
        return handle
    if AutoEncoderTopK is not None:
        for cls, patch in ae_plans:
            if _keeps(obj, cls, sae_names):
                patch(handle, obj, backend)
                return handle
        for cls, ae_cls, patch, patch_ae, names in trainer_plans:
            if _keeps(obj, cls, names):
                ae = getattr(obj, "ae", None)
                if not _keeps(ae, ae_cls, sae_names):
                    warnings.warn(f"sae_fast.accelerate: {type(obj).__name__}.ae is a {type(ae).__name__}, not the "
                                  f"{ae_cls.__name__} its loss is accelerated for; nothing patched", stacklevel=2)
                    return handle
                patch(handle, obj, backend)
                patch_ae(handle, ae, backend)
                return handle

    warnings.warn(f"sae_fast.accelerate: {type(obj).__module__}.{type(obj).__qualname__} is not accelerated "
                  "(supported: AutoEncoderTopK, BatchTopKSAE, JumpReluAutoEncoder and their trainers TopKTrainer, "
                  "BatchTopKTrainer, JumpReluTrainer, without overrides of the patched methods); nothing patched",
                  stacklevel=2)
    return handle


__all__ = ["accelerate"]
