"""SAELens (v6) adapter: ``accelerate(sae)`` routes a SAELens SAE through the sae_fast ops, in place.

    from sae_fast.integrations.saelens import accelerate
    handle = accelerate(sae)          # or sae_fast.integrations.accelerate(sae); or `with accelerate(sae):`
    ...                               # sae.encode / decode / forward / training_forward_pass
    handle.undo()

What is accelerated (per instance: other instances of the class are untouched):

===========================  =========================================================
SAELens class                patched methods
===========================  =========================================================
``TopKSAE``                  ``encode``, ``decode``, ``forward``
``TopKTrainingSAE``          the same + ``training_forward_pass`` (MSE + AuxK)
``BatchTopKTrainingSAE``     the same + ``training_forward_pass`` (MSE + AuxK + the
                             running ``topk_threshold`` update); ``k`` may be fractional
``JumpReLUSAE``              ``encode``, ``decode``, ``forward``
``JumpReLUTrainingSAE``      the same + ``training_forward_pass`` (MSE + L0 "step" loss +
                             ``pre_act_loss``)
===========================  =========================================================

Everything else (StandardSAE/ReLU, gated, AbsTopK, matryoshka, temporal, matching pursuit,
transcoders, and any subclass that overrides a method the fast path replaces or relies on) is
left untouched with a warning; the returned ``Acceleration`` then patches nothing.

How each method runs:

* ``forward`` / ``training_forward_pass``: one fused op selects the latents (TopK, BatchTopK,
  JumpReLU: GEMM + selection, no dense ``[N, M]`` pre-activations) and the reconstruction is a
  sparse decode of the selected entries; the backward touches only those entries. Leading batch
  dims are flattened to ``[N, d]`` and restored.
* ``encode`` returns what SAELens returns: the dense ``[..., M]`` activations, scattered from
  the sparse codes (a COO tensor for ``TopKTrainingSAE`` with ``use_sparse_activations``).
* ``decode`` of activations that need no gradient (dense or COO, edited or not) is a sparse
  decode of their non-zero entries, read from the tensor. Activations that need one: when
  they are an accelerated ``encode``'s own output, as ``HookedSAETransformer`` runs
  ``decode(encode(x))`` under autograd, the sparse codes ``encode`` attached are decoded with
  their graph (exact: the gradient SAELens gives the zero entries only reaches the scatter
  that built the tensor, which discards it); not when the tensor was edited in place, is a
  leaf (``requires_grad_()`` on a no-grad encode), retains its gradient or carries a tensor
  hook (call ``retain_grad()`` / ``register_hook`` before ``decode`` to observe the dense
  gradient): those, and any other activations needing a gradient, run SAELens's dense
  ``decode`` (SAELens gives every latent, active or not, a gradient).
* Input processing calls the SAE's own ``reshape_fn_in`` / ``run_time_activation_norm_fn_in``
  and output ``run_time_activation_norm_fn_out`` / ``reshape_fn_out``, in SAELens's order, so
  ``hook_z`` reshaping and every ``normalize_activations`` mode give SAELens's results;
  ``apply_b_dec_to_input`` passes ``b_dec`` to the op (subtracted inside the fused GEMM).
* ``rescale_acts_by_decoder_norm`` (TopK / BatchTopK): the selection runs on
  ``pre · ‖W_dec[m]‖``, computed as the op's GEMM against ``W_enc · ‖W_dec‖`` and
  ``b_enc · ‖W_dec‖`` (a per-call product the size of ``W_enc``, differentiable; no weight is
  stored), and decoding multiplies by ``1 / ‖W_dec[m]‖`` like SAELens's ``act_times_W_dec``,
  so gradients reach ``W_dec`` through the norms exactly as in SAELens.
* Parameters are read from the SAE at every call (``W_enc.T`` is passed as a strided view):
  nothing is copied or cached, so SAELens's optimizer, ``state_dict``, ``save_model``,
  ``.to()`` and ``fold_W_dec_norm`` keep working while accelerated.

Falling back to SAELens's own method, for that call only:

* any hook registered on one of the SAE's hook points (``hook_sae_input``,
  ``hook_sae_acts_pre``, ``hook_sae_acts_post``, ``hook_sae_recons``, ``hook_sae_error``,
  ``hook_sae_output``), or a global module hook: hooks see SAELens's exact dense tensors.
  (Hooks on the SAE module itself run as usual: ``nn.Module.__call__`` wraps the patched
  ``forward``.) Inside SAELens's ``_disable_hooks`` the fast path is used again;
* ``use_error_term`` without hooks is honoured by the fast path: ``forward`` returns
  ``sae_out + (x - sae_out).detach()`` as SAELens does (its clean recomputation without hooks
  is the same reconstruction);
* an empty input, a wrong input width, or an activation module replaced by the user;
* ``decode`` of activations that require grad (see above), or of another sparse layout;
* ``JumpReLUTrainingSAE``: ``training_forward_pass`` with ``jumprelu_sparsity_loss_mode``
  "tanh" or "quadratic" (the ops give the batch-mean L0 with its straight-through threshold
  gradient, not a per-row L0 nor differentiable listed activations), or with
  ``jumprelu_ste_to_input`` (the op gives the L0 step no gradient to the pre-activations);
  ``forward`` with ``jumprelu_ste_to_input`` while autograd is on; ``encode`` while autograd
  is on and the threshold requires grad (the dense activations' straight-through threshold
  gradient needs every near-threshold entry: train with ``training_forward_pass``), or with a
  negative threshold (SAELens's training JumpReLU has no ReLU; the op's encoder does);
* TopK AuxK with ``normalize_activations`` "constant_norm_rescale" / "layer_norm" (SAELens
  raises its ValueError there, so does the fallback).

Behaviours that differ from SAELens (all documented in the tests):

* ``TrainStepOutput.feature_acts`` is a sparse COO ``[..., M]`` tensor (SAELens's
  ``SAETrainer`` consumes it as with SAELens's own ``use_sparse_activations``): TopK stores its
  k entries per row (zeros where ReLU clipped), BatchTopK the kept entries, JumpReLU the active
  entries plus near-threshold inactive ones with value 0. TopK's and BatchTopK's values carry
  the autograd graph; JumpReLU's are detached (the op returns its listed codes detached).
* ``TrainStepOutput.hidden_pre`` is not computed (that is the dense ``[N, M]`` tensor the
  fast path avoids): it is the same sparse tensor as ``feature_acts``. SAELens's own
  ``encode_with_hidden_pre`` is left unpatched for anyone who needs the dense pre-activations.
* Ties: the ops keep the smaller latent id (TopK) or row-major order (BatchTopK) among equal
  values; ``torch.topk`` leaves the order unspecified. TopK keeps the k largest pre-activations
  then applies ReLU, as SAELens does; BatchTopK does not store zero activations, which SAELens
  writes as explicit zeros (the dense results agree).
* The ops accumulate in fp32 and ignore autocast: under ``SAETrainerConfig(autocast=True)``
  they compute in the parameters' dtype where SAELens's matmuls would run in bf16.
* Pickling the whole accelerated module (``torch.save(sae)``) fails on the patched methods:
  ``undo()`` first, or save the ``state_dict`` / ``save_model`` as SAELens does. A
  ``copy.deepcopy`` of an accelerated SAE is accelerated too, with no handle of its own.
"""

from __future__ import annotations

import types
import warnings
from typing import Any, Callable, Optional

import torch

from .._backend import BACKENDS
from ..ops import (
    batchtopk_encode,
    jumprelu_encode,
    jumprelu_training_forward,
    sparse_decode,
    sparse_decode_csr,
    topk_encode,
)
from ._patch import Acceleration

LIBRARY = "sae_lens"

# Marks the functions this module installs (an instance already holding one is accelerated).
_MARK = "_sae_fast_saelens"
# The attribute an accelerated encode sets on the activations it returns (see _tag).
_CODES = "_sae_fast_codes"
# SAELens's TopK AuxK refuses these modes (residual and reconstruction in different spaces).
_NORMALIZING = ("constant_norm_rescale", "layer_norm")
# BatchTopK AuxK: when at most M / 8 latents are dead, a dense GEMM over the dead columns only
# ([N, dead], cuBLAS); above that, the fused TopK op's dead-latent selection (no [N, M] tensor).
_DENSE_AUX_SHARE = 8

_INFERENCE_METHODS = ("encode", "decode", "forward", "process_sae_in")
_TRAINING_METHODS = _INFERENCE_METHODS + ("encode_with_hidden_pre", "training_forward_pass", "calculate_aux_loss")


def _sae_lens():
    """SAELens's classes, imported on first use (this module is loaded for SAELens objects)."""
    from sae_lens.saes import batchtopk_sae, jumprelu_sae, sae, topk_sae

    return types.SimpleNamespace(
        TopKSAE=topk_sae.TopKSAE, TopKTrainingSAE=topk_sae.TopKTrainingSAE, TopK=topk_sae.TopK,
        BatchTopKTrainingSAE=batchtopk_sae.BatchTopKTrainingSAE, BatchTopK=batchtopk_sae.BatchTopK,
        JumpReLUSAE=jumprelu_sae.JumpReLUSAE, JumpReLUTrainingSAE=jumprelu_sae.JumpReLUTrainingSAE,
        TrainStepOutput=sae.TrainStepOutput,
    )


def _kinds(sl):
    """(kind, SAELens base class, methods a subclass must inherit unchanged), most derived first."""
    return [
        ("batchtopk_training", sl.BatchTopKTrainingSAE,
         _TRAINING_METHODS + ("calculate_topk_aux_loss", "update_topk_threshold")),
        ("topk_training", sl.TopKTrainingSAE, _TRAINING_METHODS + ("calculate_topk_aux_loss",)),
        ("topk", sl.TopKSAE, _INFERENCE_METHODS),
        ("jumprelu_training", sl.JumpReLUTrainingSAE, _TRAINING_METHODS),
        ("jumprelu", sl.JumpReLUSAE, _INFERENCE_METHODS),
    ]


# ---------------------------------------------------------------------------------------------
# Shared pieces


def _has_hooks(sae) -> bool:
    """True when a hook would fire inside the SAE: one on any of its hook points (looked up as
    the current attribute, so SAELens's ``_disable_hooks`` swap counts as hook-free) or a
    global module hook."""
    from torch.nn.modules import module as nn_module

    for name in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks"):
        if getattr(nn_module, name, None):
            return True
    for name, point in sae.hook_dict.items():
        hp = sae._modules.get(name, point)  # the current attribute: _disable_hooks swaps it
        if hp is not None and (hp._forward_hooks or hp._forward_pre_hooks or hp._backward_hooks
                               or getattr(hp, "_backward_pre_hooks", None)):
            return True
    return False


def _process_in(sae, x: torch.Tensor) -> torch.Tensor:
    """SAELens's ``process_sae_in`` without the hook (none is registered on the fast path) and
    without the ``b_dec`` subtraction (the op does it)."""
    x = sae.reshape_fn_in(x.to(sae.dtype))
    return sae.run_time_activation_norm_fn_in(x)


def _process_out(sae, out: torch.Tensor) -> torch.Tensor:
    """The tail of SAELens's ``decode`` after ``hook_sae_recons``."""
    out = sae.run_time_activation_norm_fn_out(out)
    return sae.reshape_fn_out(out, sae.d_head)


def _centre(sae) -> Optional[torch.Tensor]:
    return sae.b_dec if sae.cfg.apply_b_dec_to_input else None


def _input_ok(sae, xin: torch.Tensor) -> bool:
    return xin.dim() >= 1 and xin.shape[-1] == sae.cfg.d_in and xin.numel() > 0 and xin.is_floating_point()


def _flat(xin: torch.Tensor):
    return xin.shape[:-1], xin.reshape(-1, xin.shape[-1])


def _topk_weights(sae):
    """(W [M, d], b [M], norm [M] or None) of the selection: with
    ``rescale_acts_by_decoder_norm`` the selection runs on ``pre · ‖W_dec[m]‖``, which is the
    GEMM against ``W_enc · ‖W_dec‖`` plus ``b_enc · ‖W_dec‖`` (per call, differentiable)."""
    if sae.cfg.rescale_acts_by_decoder_norm:
        norm = sae.W_dec.norm(dim=-1)
        return (sae.W_enc * norm).T, sae.b_enc * norm, norm
    return sae.W_enc.T, sae.b_enc, None


def _decoder_values(values, indices, norm):
    """SAELens's ``act_times_W_dec``: activations times ``1 / ‖W_dec‖`` when rescaling."""
    return values if norm is None else values * (1 / norm)[indices]


def _csr_rows(row_offsets: torch.Tensor, nnz: int) -> torch.Tensor:
    n = row_offsets.shape[0] - 1
    return torch.repeat_interleave(torch.arange(n, device=row_offsets.device), row_offsets.diff(), output_size=nnz)


def _offsets(rows: torch.Tensor, n: int) -> torch.Tensor:
    """CSR row offsets [n + 1] of sorted row ids."""
    return torch.searchsorted(rows, torch.arange(n + 1, device=rows.device, dtype=rows.dtype))


def _tag(acts: torch.Tensor, rows, cols, values) -> torch.Tensor:
    """Attach the sparse codes an ``encode`` scattered into ``acts`` (flat row ids sorted,
    latent ids, values with their autograd graph) so that ``decode(acts)`` can decode them
    directly; the tensor's version counter detects later in-place edits. Inference tensors
    have no version counter and are not tagged (their decode extracts the entries)."""
    if not acts.is_inference():
        setattr(acts, _CODES, (rows, cols, values, acts._version))
    return acts


def _coo(values, rows, cols, lead, m):
    """A sparse COO ``[*lead, m]`` tensor from flat row ids (as SAELens's sparse TopK builds it)."""
    if len(lead) == 1:
        parts = [rows]
    elif len(lead) == 0:
        parts = []
    else:
        parts = list(torch.unravel_index(rows, tuple(lead)))
    indices = torch.stack([*parts, cols])
    return torch.sparse_coo_tensor(indices, values, (*lead, m), check_invariants=False)


def _dense(values, rows, cols, lead, m):
    """The dense ``[*lead, m]`` activations with ``values`` at (rows, cols), zeros elsewhere;
    differentiable with respect to ``values``; tagged with its codes."""
    out = values.new_zeros((lead.numel(), m)).index_put((rows, cols), values).reshape(*lead, m)
    return _tag(out, rows, cols, values)


def _tagged_codes(feature_acts: torch.Tensor):
    """The codes our ``encode`` attached to ``feature_acts``, used only where a gradient must
    flow and decoding them is exactly SAELens's dense decode: the tensor is still the output of
    the scatter that built it (unmodified, not a leaf made by ``requires_grad_()`` on a no-grad
    encode) and nobody observes its own gradient (not retained, no tensor hook), so the
    gradient SAELens gives its zero entries reaches nothing. Without a gradient to carry, the
    entries are read from the tensor itself: writes through ``.data`` or ``.numpy()`` leave
    the version counter alone and would go unseen."""
    if not (feature_acts.requires_grad and torch.is_grad_enabled()) or feature_acts.is_inference():
        return None
    tag = getattr(feature_acts, _CODES, None)
    if tag is None or tag[3] != feature_acts._version or not tag[2].requires_grad:
        return None
    if feature_acts.is_leaf or feature_acts.retains_grad or feature_acts._backward_hooks:
        return None
    return tag[:3]


def _entries(feature_acts: torch.Tensor, m: int):
    """(rows, cols, values) of the non-zero entries of dense or COO activations, rows sorted
    (row-major order): from the attached codes, else extracted (values then carry no graph:
    only used when the activations need no gradient)."""
    tagged = _tagged_codes(feature_acts)
    if tagged is not None:
        return tagged
    lead = feature_acts.shape[:-1]
    if feature_acts.is_sparse:
        fa = feature_acts.detach().coalesce()  # sorted lexicographically, duplicates summed
        ind = fa.indices()
        rows = torch.zeros(ind.shape[1], dtype=torch.int64, device=ind.device)
        for dim, size in enumerate(lead):
            rows = rows * size + ind[dim]
        return rows, ind[-1], fa.values()
    f2 = feature_acts.detach().reshape(lead.numel(), m)
    rows, cols = f2.nonzero(as_tuple=True)
    return rows, cols, f2[rows, cols]


def _decode_ok(sae, feature_acts) -> bool:
    if _has_hooks(sae) or not isinstance(feature_acts, torch.Tensor):
        return False
    if not (feature_acts.dim() >= 1 and feature_acts.shape[-1] == sae.cfg.d_sae
            and feature_acts.dtype == sae.W_dec.dtype and feature_acts.shape[:-1].numel() > 0):
        return False
    if feature_acts.layout == torch.sparse_coo:
        if feature_acts.dense_dim() != 0:
            return False
    elif feature_acts.layout != torch.strided:
        return False
    if feature_acts.requires_grad and torch.is_grad_enabled() and _tagged_codes(feature_acts) is None:
        return False  # SAELens gives every latent a gradient, active or not
    return True


def _error_term(sae, x, sae_out):
    """SAELens's ``use_error_term``: the error is ``x`` minus the hook-free reconstruction,
    which without hooks is ``sae_out`` itself; it carries no gradient."""
    if sae.use_error_term:
        with torch.no_grad():
            err = x - sae_out
        sae_out = sae_out + err
    return sae_out


def _aux_sizes(sae_in: torch.Tensor, dead: Optional[torch.Tensor]):
    """SAELens's AuxK sizes: (k_aux, scale, num_dead); k_aux = 0 when there is no AuxK."""
    num_dead = 0 if dead is None else int(dead.sum())
    if num_dead == 0:
        return 0, 0.0, 0
    k_aux = sae_in.shape[-1] // 2
    scale = min(num_dead / k_aux, 1.0)
    return min(k_aux, num_dead), scale, num_dead


def _aux_loss(sae, sae_in, sae_out, aux_values, aux_indices, norm, lead, backend):
    """SAELens's TopK auxiliary loss from the top-k_aux dead pre-activations per row."""
    residual = (sae_in - sae_out).detach()
    values = _decoder_values(aux_values, aux_indices, norm).to(sae.W_dec.dtype)  # (autocast: a bf16 GEMM)
    recons = sparse_decode(values, aux_indices, sae.W_dec, None, backend=backend)
    recons = sae.reshape_fn_out(recons.reshape(*lead, -1), sae.d_head)
    return (recons - residual).pow(2).sum(dim=-1).mean()


def _dead_topk(flat, W, b, centre, dead, k_aux, backend):
    """Per row, the top-``k_aux`` pre-activations (``W``, ``b`` as the selection uses them)
    among dead latents: (values [N, k_aux] with autograd, latent ids [N, k_aux])."""
    dead_ids = dead.nonzero().view(-1)
    if dead_ids.numel() * _DENSE_AUX_SHARE <= W.shape[0]:
        x_bar = flat if centre is None else flat - centre
        pre = x_bar @ W[dead_ids].T + b[dead_ids]
        values, j = pre.topk(k_aux, dim=-1, sorted=False)
        return values, dead_ids[j]
    codes = topk_encode(flat, W, b, 1, b_dec=centre, dead_mask=dead, k_aux=k_aux, backend=backend)
    return codes.aux_values, codes.aux_indices


# ---------------------------------------------------------------------------------------------
# The patched methods, per kind. Each is a plain function of (self, ...) taking SAELens's
# original (the class's function) for its fallback; handle.set binds it to the instance.


def _generic_decode(backend, original, rescaled: bool):
    def decode(self, feature_acts):
        if not _decode_ok(self, feature_acts):
            return original(self, feature_acts)
        rows, cols, values = _entries(feature_acts, self.cfg.d_sae)
        lead = feature_acts.shape[:-1]
        n = lead.numel()
        norm = self.W_dec.norm(dim=-1) if rescaled and self.cfg.rescale_acts_by_decoder_norm else None
        out = sparse_decode_csr(_decoder_values(values, cols, norm), cols, _offsets(rows, n), self.W_dec, self.b_dec,
                                backend=backend)
        return _process_out(self, out.reshape(*lead, -1))

    return decode


def _topk_patches(sl, backend, originals, training: bool):
    def k_of(self):
        act = self.activation_fn
        return act.k if type(act) is sl.TopK and isinstance(act.k, int) and 1 <= act.k <= self.cfg.d_sae else None

    def codes_of(self, x, dead=None, k_aux=0):
        """(lead, flat input, codes, norm) or None for the fallback."""
        k = k_of(self)
        if k is None or _has_hooks(self):
            return None
        xin = _process_in(self, x)
        if not _input_ok(self, xin):
            return None
        lead, flat = _flat(xin)
        W, b, norm = _topk_weights(self)
        codes = topk_encode(flat, W, b, k, b_dec=_centre(self), dead_mask=dead if k_aux else None, k_aux=k_aux,
                            backend=backend)
        return lead, flat, codes, norm

    def encode(self, x):
        got = codes_of(self, x)
        if got is None:
            return originals["encode"](self, x)
        lead, flat, codes, _ = got
        n, k = codes.values.shape
        m = self.cfg.d_sae
        rows = torch.arange(n, device=flat.device).repeat_interleave(k)
        values, cols = codes.values.reshape(-1), codes.indices.reshape(-1)
        if getattr(self.activation_fn, "use_sparse_activations", False):
            return _tag(_coo(values, rows, cols, lead, m), rows, cols, values)
        return _tag(codes.values.new_zeros((n, m)).scatter(-1, codes.indices, codes.values).reshape(*lead, m), rows,
                    cols, values)

    def forward(self, x):
        got = codes_of(self, x)
        if got is None:
            return originals["forward"](self, x)
        lead, _, codes, norm = got
        out = sparse_decode(_decoder_values(codes.values, codes.indices, norm), codes.indices, self.W_dec, self.b_dec,
                            backend=backend)
        return _error_term(self, x, _process_out(self, out.reshape(*lead, -1)))

    patches = {"encode": encode, "decode": _generic_decode(backend, originals["decode"], True), "forward": forward}
    if not training:
        return patches

    def training_forward_pass(self, step_input):
        sae_in = step_input.sae_in
        dead = step_input.dead_neuron_mask
        k_aux, scale, _ = _aux_sizes(sae_in, dead)
        if k_aux and self.cfg.normalize_activations in _NORMALIZING:
            return originals["training_forward_pass"](self, step_input)  # raises SAELens's ValueError
        got = codes_of(self, sae_in, dead=None if dead is None else dead.to(torch.bool), k_aux=k_aux)
        if got is None:
            return originals["training_forward_pass"](self, step_input)
        lead, flat, codes, norm = got
        out = sparse_decode(_decoder_values(codes.values, codes.indices, norm), codes.indices, self.W_dec, self.b_dec,
                            backend=backend)
        sae_out = _process_out(self, out.reshape(*lead, -1))
        mse_loss = self.mse_loss_fn(sae_out, sae_in).sum(dim=-1).mean()
        if k_aux:
            aux = _aux_loss(self, sae_in, sae_out, codes.aux_values, codes.aux_indices, norm, lead, backend)
            aux = self.cfg.aux_loss_coefficient * scale * aux
        else:
            aux = sae_out.new_tensor(0.0)
        n, k = codes.values.shape
        rows = torch.arange(n, device=flat.device).repeat_interleave(k)
        acts = _coo(codes.values.reshape(-1), rows, codes.indices.reshape(-1), lead, self.cfg.d_sae)
        losses = {"mse_loss": mse_loss, "auxiliary_reconstruction_loss": aux}
        return sl.TrainStepOutput(sae_in=sae_in, sae_out=sae_out, feature_acts=acts, hidden_pre=acts,
                                  loss=mse_loss + aux, losses=losses)

    patches["training_forward_pass"] = training_forward_pass
    return patches


def _batchtopk_patches(sl, backend, originals):
    def k_of(self):
        act = self.activation_fn
        if type(act) is not sl.BatchTopK:
            return None
        k = float(act.k)  # fractional k: both keep int(k·N) of the batch
        if not 0 < k <= self.cfg.d_sae:
            return None
        return int(k) if k.is_integer() else k

    def codes_of(self, x):
        k = k_of(self)
        if k is None or _has_hooks(self):
            return None
        xin = _process_in(self, x)
        if not _input_ok(self, xin):
            return None
        lead, flat = _flat(xin)
        W, b, norm = _topk_weights(self)
        codes = batchtopk_encode(flat, W, b, k, b_dec=_centre(self), backend=backend)
        return lead, flat, W, b, codes, norm

    def decoded(self, codes, norm):
        return sparse_decode_csr(_decoder_values(codes.values, codes.indices, norm), codes.indices, codes.row_offsets,
                                 self.W_dec, self.b_dec, backend=backend)

    def encode(self, x):
        got = codes_of(self, x)
        if got is None:
            return originals["encode"](self, x)
        lead, _, _, _, codes, _ = got
        rows = _csr_rows(codes.row_offsets, codes.indices.shape[0])
        return _dense(codes.values, rows, codes.indices, lead, self.cfg.d_sae)

    def forward(self, x):
        got = codes_of(self, x)
        if got is None:
            return originals["forward"](self, x)
        lead, _, _, _, codes, norm = got
        return _error_term(self, x, _process_out(self, decoded(self, codes, norm).reshape(*lead, -1)))

    def training_forward_pass(self, step_input):
        sae_in = step_input.sae_in
        dead = step_input.dead_neuron_mask
        k_aux, scale, _ = _aux_sizes(sae_in, dead)
        if k_aux and self.cfg.normalize_activations in _NORMALIZING:
            return originals["training_forward_pass"](self, step_input)  # raises SAELens's ValueError
        got = codes_of(self, sae_in)
        if got is None:
            return originals["training_forward_pass"](self, step_input)
        lead, flat, W, b, codes, norm = got
        sae_out = _process_out(self, decoded(self, codes, norm).reshape(*lead, -1))
        mse_loss = self.mse_loss_fn(sae_out, sae_in).sum(dim=-1).mean()
        if k_aux:
            aux_values, aux_indices = _dead_topk(flat, W, b, _centre(self), dead.to(torch.bool), k_aux, backend)
            aux = _aux_loss(self, sae_in, sae_out, aux_values, aux_indices, norm, lead, backend)
            aux = self.cfg.aux_loss_coefficient * scale * aux
        else:
            aux = sae_out.new_tensor(0.0)
        rows = _csr_rows(codes.row_offsets, codes.indices.shape[0])
        acts = _coo(codes.values, rows, codes.indices, lead, self.cfg.d_sae)
        losses = {"mse_loss": mse_loss, "auxiliary_reconstruction_loss": aux}
        output = sl.TrainStepOutput(sae_in=sae_in, sae_out=sae_out, feature_acts=acts, hidden_pre=acts,
                                    loss=mse_loss + aux, losses=losses)
        # SAELens's own update, fed the kept activations (all positive: zeros are not stored)
        self.update_topk_threshold(codes.values.detach())
        output.metrics["topk_threshold"] = self.topk_threshold
        return output

    return {"encode": encode, "decode": _generic_decode(backend, originals["decode"], True), "forward": forward,
            "training_forward_pass": training_forward_pass}


def _jumprelu_patches(sl, backend, originals):
    def ready(self, x):
        if _has_hooks(self) or not isinstance(self.activation_fn, torch.nn.ReLU):
            return None
        xin = _process_in(self, x)
        return _flat(xin) if _input_ok(self, xin) else None

    def encode(self, x):
        got = ready(self, x)
        if got is None:
            return originals["encode"](self, x)
        lead, flat = got
        codes = jumprelu_encode(flat, self.W_enc.T, self.b_enc, self.threshold.detach(), b_dec=_centre(self),
                                backend=backend)
        rows = _csr_rows(codes.row_offsets, codes.indices.shape[0])
        return _dense(codes.values, rows, codes.indices, lead, self.cfg.d_sae)

    def forward(self, x):
        got = ready(self, x)
        if got is None:
            return originals["forward"](self, x)
        lead, flat = got
        codes = jumprelu_encode(flat, self.W_enc.T, self.b_enc, self.threshold.detach(), b_dec=_centre(self),
                                backend=backend)
        out = sparse_decode_csr(codes.values, codes.indices, codes.row_offsets, self.W_dec, self.b_dec, backend=backend)
        return _error_term(self, x, _process_out(self, out.reshape(*lead, -1)))

    return {"encode": encode, "decode": _generic_decode(backend, originals["decode"], False), "forward": forward}


def _jumprelu_training_patches(sl, backend, originals):
    def ready(self, x):
        if _has_hooks(self):
            return None
        xin = _process_in(self, x)
        return _flat(xin) if _input_ok(self, xin) else None

    def run(self, flat):
        """The fused training forward: (x_hat [N, d], l0, codes) with SAELens's JumpReLU
        semantics (``pre · H(pre - θ)``, no ReLU) and straight-through gradients."""
        theta = self.threshold.to(flat.dtype)
        return jumprelu_training_forward(flat, self.W_enc.T, self.b_enc, theta, self.W_dec, self.b_dec,
                                         bandwidth=float(self.bandwidth),
                                         apply_b_dec_to_input=bool(self.cfg.apply_b_dec_to_input),
                                         return_codes=True, backend=backend)

    def encode(self, x):
        grad = torch.is_grad_enabled() and (self.threshold.requires_grad or self.cfg.jumprelu_ste_to_input)
        got = None if grad or bool((self.threshold < 0).any()) else ready(self, x)
        if got is None:
            return originals["encode"](self, x)
        lead, flat = got
        theta = self.threshold.detach().to(flat.dtype)
        codes = jumprelu_encode(flat, self.W_enc.T, self.b_enc, theta, b_dec=_centre(self), backend=backend)
        rows = _csr_rows(codes.row_offsets, codes.indices.shape[0])
        return _dense(codes.values, rows, codes.indices, lead, self.cfg.d_sae)

    def forward(self, x):
        got = None if (torch.is_grad_enabled() and self.cfg.jumprelu_ste_to_input) else ready(self, x)
        if got is None:
            return originals["forward"](self, x)
        lead, flat = got
        x_hat, _, _ = run(self, flat)
        return _error_term(self, x, _process_out(self, x_hat.reshape(*lead, -1)))

    def training_forward_pass(self, step_input):
        cfg = self.cfg
        if cfg.jumprelu_sparsity_loss_mode != "step" or cfg.jumprelu_ste_to_input:
            return originals["training_forward_pass"](self, step_input)
        sae_in = step_input.sae_in
        got = ready(self, sae_in)
        if got is None:
            return originals["training_forward_pass"](self, step_input)
        with torch.no_grad():  # as SAELens: keep the threshold non-negative, outside the graph
            self.threshold.data.clamp_(min=0.0)
        lead, flat = got
        x_hat, l0, codes = run(self, flat)
        sae_out = _process_out(self, x_hat.reshape(*lead, -1))
        mse_loss = self.mse_loss_fn(sae_out, sae_in).sum(dim=-1).mean()
        # SAELens: mean over rows of coefficient · Σ_m Step(pre - θ) = coefficient · mean L0
        losses = {"mse_loss": mse_loss, "l0_loss": step_input.coefficients["l0"] * l0}
        if cfg.pre_act_loss_coefficient is not None:
            losses["pre_act_loss"] = pre_act_loss(self, flat, step_input.dead_neuron_mask, sae_out)
        loss = mse_loss
        for value in list(losses.values())[1:]:
            loss = loss + value
        rows = _csr_rows(codes.row_offsets, codes.indices.shape[0])
        acts = _coo(codes.values, rows, codes.indices, lead, cfg.d_sae)
        return sl.TrainStepOutput(sae_in=sae_in, sae_out=sae_out, feature_acts=acts, hidden_pre=acts, loss=loss,
                                  losses=losses)

    def pre_act_loss(self, flat, dead, like):
        """SAELens's ``calculate_pre_act_loss`` on the dead columns only (live ones are
        multiplied by 0 there): ``coef · mean_n Σ_{m dead} relu(θ_m - pre_nm) · ‖W_dec[m]‖``."""
        if dead is None or not bool(dead.any()):
            return like.new_tensor(0.0)
        ids = dead.to(torch.bool).nonzero().view(-1)
        centre = _centre(self)
        x_bar = flat if centre is None else flat - centre
        pre = x_bar @ self.W_enc[:, ids] + self.b_enc[ids]
        theta = self.threshold.to(pre.dtype)[ids]
        per_item = ((theta - pre).relu() * self.W_dec.norm(dim=1)[ids]).sum(dim=-1)
        return self.cfg.pre_act_loss_coefficient * per_item.mean()

    return {"encode": encode, "decode": _generic_decode(backend, originals["decode"], False), "forward": forward,
            "training_forward_pass": training_forward_pass}


# ---------------------------------------------------------------------------------------------


def _classify(sae) -> tuple[Optional[str], Optional[str]]:
    """(kind, None) when ``sae`` can be accelerated, else (None, reason)."""
    try:
        sl = _sae_lens()
    except ImportError as err:  # a SAELens without the v6 layout
        return None, f"this SAELens version is not supported ({err})"
    cls = type(sae)
    for kind, base, methods in _kinds(sl):
        if not isinstance(sae, base):
            continue
        changed = [m for m in methods if getattr(cls, m, None) is not getattr(base, m)]
        if changed:
            return None, (f"{cls.__qualname__} overrides {', '.join(changed)} of {base.__qualname__}, which the fast "
                          "path would bypass")
        mine = [name for name in ("encode", "decode", "forward", "training_forward_pass") if name in sae.__dict__]
        if mine:
            already = any(getattr(getattr(sae.__dict__[n], "__func__", None), _MARK, False) for n in mine)
            return None, ("it is already accelerated (undo the first handle first)" if already else
                          f"its {', '.join(mine)} already replaced on the instance by other code")
        act = getattr(sae, "activation_fn", None)
        expected = {"batchtopk_training": sl.BatchTopK, "topk_training": sl.TopK, "topk": sl.TopK}.get(kind)
        if expected is not None and type(act) is not expected:
            return None, f"its activation_fn is {type(act).__qualname__}, not SAELens's {expected.__qualname__}"
        if kind == "jumprelu" and not isinstance(act, torch.nn.ReLU):
            return None, f"its activation_fn is {type(act).__qualname__}, not ReLU"
        return kind, None
    return None, (f"the {cls.__qualname__} architecture is not accelerated (sae_fast accelerates TopKSAE, "
                  "TopKTrainingSAE, BatchTopKTrainingSAE, JumpReLUSAE and JumpReLUTrainingSAE)")


def accelerate(sae: Any, *, backend: Optional[str] = None) -> Acceleration:
    """Route a SAELens v6 SAE's ``encode`` / ``decode`` / ``forward`` (and, for training SAEs,
    ``training_forward_pass``) through the sae_fast ops, in place; see this module's docstring
    for what runs where and what falls back to SAELens.

    Args:
        sae: a SAELens ``SAE`` instance.
        backend: the sae_fast backend for every op call (``"fastest"``, ``"cuda"``,
            ``"triton"``, ``"reference"``; None for the default of ``sae_fast._backend``).

    Returns an ``Acceleration``: ``undo()`` (or leaving a ``with`` block) restores the SAE.
    For an architecture that is not accelerated it warns and patches nothing.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"sae_fast.integrations.saelens.accelerate: backend must be None or one of {BACKENDS}, "
                         f"got {backend!r}")
    handle = Acceleration(sae, LIBRARY)
    kind, reason = _classify(sae)
    if kind is None:
        warnings.warn(f"sae_fast: SAELens {type(sae).__qualname__} left unaccelerated: {reason}.", stacklevel=2)
        return handle
    sl = _sae_lens()
    cls = type(sae)
    names = ("encode", "decode", "forward") + (("training_forward_pass",) if kind.endswith("_training") else ())
    originals: dict[str, Callable] = {name: getattr(cls, name) for name in names}
    if kind == "topk":
        patches = _topk_patches(sl, backend, originals, training=False)
    elif kind == "topk_training":
        patches = _topk_patches(sl, backend, originals, training=True)
    elif kind == "batchtopk_training":
        patches = _batchtopk_patches(sl, backend, originals)
    elif kind == "jumprelu":
        patches = _jumprelu_patches(sl, backend, originals)
    else:
        patches = _jumprelu_training_patches(sl, backend, originals)
        cfg = sae.cfg
        if cfg.jumprelu_sparsity_loss_mode != "step" or cfg.jumprelu_ste_to_input:
            what = (f"jumprelu_sparsity_loss_mode={cfg.jumprelu_sparsity_loss_mode!r}"
                    if cfg.jumprelu_sparsity_loss_mode != "step" else "jumprelu_ste_to_input=True")
            warnings.warn(f"sae_fast: JumpReLUTrainingSAE.training_forward_pass runs SAELens's own code with {what} "
                          "(sae_fast accelerates the 'step' L0 loss without STE to the input); encode, decode and "
                          "forward are accelerated.", stacklevel=2)
    for name in names:
        fn = patches[name]
        setattr(fn, _MARK, True)
        fn.__doc__ = f"sae_fast-accelerated {cls.__qualname__}.{name} (see sae_fast.integrations.saelens)."
        handle.set(sae, name, fn)
    return handle


__all__ = ["accelerate"]
