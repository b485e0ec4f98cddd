"""EleutherAI sparsify (``eai-sparsify``, module ``sparsify``): ``SparseCoder`` on sae_fast ops.

``accelerate(coder)`` replaces the instance's ``encode``, ``decode`` and ``forward`` (never the
class's) by versions built on ``sae_fast.topk_encode`` / ``sae_fast.sparse_decode``, keeping
their signatures, sparsify's own ``EncoderOutput`` / ``ForwardOutput`` NamedTuples and its
training semantics (checked against eai-sparsify 1.3.3):

* encode: ``pre = relu((x - b_dec) @ encoder.weightᵀ + encoder.bias)`` (no ``b_dec``
  subtraction when ``cfg.transcode``), then the ``cfg.k`` largest per row.
* decode: ``Σ_j top_acts[n, j] · W_dec[top_indices[n, j]] + b_dec``.
* forward(x, y=None, dead_mask=None, *, total_variance=None): ``sae_out = decode(encode(x))``
  ``+ x @ W_skipᵀ`` (skip connection); ``y`` defaults to ``x`` (transcoders pass it);
  ``total_variance = Σ (y - mean₀(y))²`` unless given; ``fvu = Σ (y - sae_out)² / total_variance``.
  AuxK when ``dead_mask`` has ``num_dead > 0`` dead latents: ``k_aux = min(d_out // 2,
  num_dead)``, ``scale = min(num_dead / (d_out // 2), 1)``, the ``k_aux`` largest ReLU'd
  pre-activations among dead latents decoded *without* ``b_dec`` into ``e_hat``, and
  ``auxk_loss = scale · Σ (e_hat - (y - sae_out).detach())² / total_variance`` (``b_dec`` is
  added once, in ``sae_out``: the double count reported in sparsify issue #132 is fixed in
  the installed version, and a test pins it). ``cfg.multi_topk``: the ``4k`` largest are
  decoded (with ``b_dec``, without ``W_skip``) into ``multi_topk_fvu``, and, exactly as
  sparsify does, the returned ``sae_out`` / ``latent_acts`` / ``latent_indices`` are then
  those of the ``4k`` decode (``fvu`` stays the ``k`` one).
* ``cfg`` is read at every call, so sparsify's trainer may change ``cfg.k`` (k decay).
* ``normalize_decoder``: sparsify applies it outside ``forward``
  (``set_decoder_norm_to_unit_norm``, ``remove_gradient_parallel_to_decoder_directions``,
  called by its trainer on ``W_dec.data`` / ``W_dec.grad``); those methods are untouched and
  keep working, since the patched methods read the coder's own parameters at each call (no
  copies: sparsify's optimizer, state dict and checkpoints see the same tensors).

What is faster: one fused kernel selects the top-k (and, with ``multi_topk``, the top-4k,
whose first k columns are the top-k; and the AuxK top-k_aux among dead latents) without a
dense ``[N, M]`` tensor, and every backward product touches the selected entries only.

Differences from sparsify (all tested in ``tests/test_integration_sparsify.py``):

* Gradients are those of the mathematical forward. sparsify's fused encoder backward ignores
  the gradient reaching ``pre_acts``, so its AuxK loss and its multi-TopK FVU train only the
  decoder; here they also reach ``encoder.weight``, ``encoder.bias``, ``b_dec`` (through
  ``x - b_dec``) and ``x``. sparsify's backward also skips the ReLU mask: a selected latent
  whose pre-activation is ≤ 0 (a row with fewer than k positive ones) still passes gradient
  to its encoder row there; here it gets none.
* ``pre_acts``: sparsify's ``EncoderOutput`` carries the dense ReLU'd ``[N, M]``
  pre-activations. ``forward`` never builds them (AuxK and multi-TopK come from the fused
  selection). The public ``encode`` keeps the field, since callers read it (dense latents for
  interpretability tools): with ``accelerate(coder, pre_acts=True)`` (the default) it is
  computed by one extra dense GEMM + ReLU, differentiably; with ``pre_acts=False`` it is
  ``None`` and ``encode`` builds no ``[N, M]`` tensor at all.
* Order and ties: codes come in descending order (sparsify's ``topk(sorted=False)`` order is
  unspecified), ties by the smaller latent id. When a row has fewer than k positive
  pre-activations the extra slots hold value 0 in both, but here their ids are those of the
  largest non-positive pre-activations, while sparsify's are arbitrary zeros.
* Precision: sparsify's ``forward`` runs under CUDA bf16 autocast (its encoder GEMM and
  ``W_skip`` product in bf16, ``latent_acts`` bf16); the accelerated one computes in the
  coder's dtype with fp32 accumulation (no per-call weight casts; store the coder in bf16 to
  train in bf16). Inputs are cast to the coder's dtype. Leading dimensions beyond [N, d] are
  accepted by encode / decode.

Left untouched (with a ``warnings.warn`` and nothing patched): ``activation="groupmax"``,
subclasses that override ``encode`` / ``decode`` / ``forward``, coders without an
``nn.Linear`` encoder, and sparsify versions whose NamedTuples or ``forward`` parameters
differ from the ones above. If ``cfg.activation`` is changed away from ``"topk"`` after
acceleration, the patched methods call sparsify's own.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .. import _backend
from ..ops import sparse_decode, topk_encode
from ._patch import Acceleration

_ENCODER_FIELDS = ("top_acts", "top_indices", "pre_acts")
_FORWARD_FIELDS = ("sae_out", "latent_acts", "latent_indices", "fvu", "auxk_loss", "multi_topk_fvu")
_FORWARD_PARAMS = {"self", "x", "y", "dead_mask", "total_variance"}


def _unsupported(coder: Any) -> Optional[str]:
    """Why ``coder`` cannot be accelerated, or None. Looks at the installed sparsify."""
    try:
        from sparsify.fused_encoder import EncoderOutput
        from sparsify.sparse_coder import ForwardOutput, SparseCoder
    except ImportError as e:  # a sparsify too different from the one this adapter knows
        return f"sparsify's sparse_coder / fused_encoder modules do not import ({e})"
    if not isinstance(coder, SparseCoder):
        return f"{type(coder).__qualname__} is not a sparsify SparseCoder"
    cls = type(coder)
    for name in ("encode", "decode", "forward"):
        if getattr(cls, name) is not getattr(SparseCoder, name):
            return f"{cls.__qualname__} overrides SparseCoder.{name}"
    if EncoderOutput._fields != _ENCODER_FIELDS or ForwardOutput._fields != _FORWARD_FIELDS:
        return (f"this sparsify's EncoderOutput{EncoderOutput._fields} / ForwardOutput{ForwardOutput._fields} "
                f"differ from the known {_ENCODER_FIELDS} / {_FORWARD_FIELDS}")
    params = set(inspect.signature(SparseCoder.forward).parameters)
    if not {"x", "y", "dead_mask"} <= params <= _FORWARD_PARAMS:
        return f"this sparsify's SparseCoder.forward takes {sorted(params)}, not the known {sorted(_FORWARD_PARAMS)}"
    activation = getattr(coder.cfg, "activation", None)
    if activation != "topk":
        return f"activation={activation!r} (only 'topk' is accelerated)"
    encoder = getattr(coder, "encoder", None)
    if not isinstance(encoder, torch.nn.Linear):
        return "its encoder is not an nn.Linear (an older checkpoint layout)"
    own = [name for name in ("encode", "decode", "forward") if name in vars(coder)]
    if own:  # a second patch would capture the first one's methods: undo could not restore
        return f"it already has its own {own} (accelerated already? undo() that handle first)"
    return None


def _active(coder: Any) -> bool:
    return getattr(coder.cfg, "activation", None) == "topk"


def _codes(coder: Any, x: torch.Tensor, k: int, backend, dead_mask=None, k_aux: int = 0):
    """TopKCodes of ``x`` [..., d] (leading dims flattened for the op and restored)."""
    W = coder.encoder.weight
    x = x.to(W.dtype)
    lead = x.shape[:-1]
    codes = topk_encode(
        x.reshape(-1, x.shape[-1]), W, coder.encoder.bias, k,
        b_dec=None if coder.cfg.transcode else coder.b_dec,
        dead_mask=dead_mask, k_aux=k_aux, backend=backend,
    )
    if len(lead) == 1:
        return codes
    return type(codes)(*(None if t is None else t.reshape(*lead, t.shape[-1]) for t in codes))


def _dense_pre_acts(coder: Any, x: torch.Tensor) -> torch.Tensor:
    """sparsify's ``pre_acts``: the dense ReLU'd pre-activations [..., M] (plain torch)."""
    W = coder.encoder.weight
    x = x.to(W.dtype)
    if not coder.cfg.transcode:
        x = x - coder.b_dec
    return F.relu(F.linear(x, W, coder.encoder.bias))


def _decode(coder, acts, indices, bias, backend, check_indices):
    assert coder.W_dec is not None, "Decoder weight was not initialized."
    return sparse_decode(acts.to(coder.W_dec.dtype), indices, coder.W_dec, bias,
                         backend=backend, check_indices=check_indices)


def accelerate(coder: Any, *, backend: Optional[str] = None, pre_acts: bool = True) -> Acceleration:
    """Route a sparsify ``SparseCoder``'s ``encode`` / ``decode`` / ``forward`` through the
    sae_fast ops, in place (see the module docstring for semantics and differences).

    Args:
        coder: a ``sparsify.SparseCoder`` (alias ``Sae``) with ``activation="topk"``.
        backend: the sae_fast backend for every op (None: the default, see
            ``sae_fast._backend``).
        pre_acts: whether the public ``encode`` still returns the dense ``[N, M]``
            ``pre_acts`` (one extra dense GEMM); False returns None there. ``forward``
            never computes it.

    Returns an ``Acceleration``: ``undo()`` or leaving a ``with`` block restores the coder.
    Unsupported coders are left untouched with a warning (``handle.patched`` is empty).
    """
    if backend is not None and backend not in _backend.BACKENDS:
        raise ValueError(f"sparsify.accelerate: backend must be None or one of {_backend.BACKENDS}, got {backend!r}")
    handle = Acceleration(coder, "sparsify")
    why = _unsupported(coder)
    if why is not None:
        warnings.warn(f"sae_fast.accelerate: sparsify {type(coder).__name__} left untouched: {why}", stacklevel=2)
        return handle

    from sparsify.fused_encoder import EncoderOutput
    from sparsify.sparse_coder import ForwardOutput

    cls = type(coder)
    has_total_variance = "total_variance" in inspect.signature(cls.forward).parameters
    want_pre_acts = bool(pre_acts)

    def encode(self, x: torch.Tensor):
        """sae_fast-accelerated ``SparseCoder.encode`` (sae_fast.integrations.sparsify)."""
        if not _active(self):
            return cls.encode(self, x)
        codes = _codes(self, x, self.cfg.k, backend)
        dense = _dense_pre_acts(self, x) if want_pre_acts else None
        return EncoderOutput(codes.values, codes.indices, dense)

    def decode(self, top_acts: torch.Tensor, top_indices: torch.Tensor) -> torch.Tensor:
        """sae_fast-accelerated ``SparseCoder.decode`` (sae_fast.integrations.sparsify)."""
        if not _active(self):
            return cls.decode(self, top_acts, top_indices)
        return _decode(self, top_acts, top_indices, self.b_dec, backend, True)

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, dead_mask: Optional[torch.Tensor] = None,
                *, total_variance: Optional[torch.Tensor] = None):
        """sae_fast-accelerated ``SparseCoder.forward`` (sae_fast.integrations.sparsify):
        the same ForwardOutput, with no dense [N, M] tensor."""
        if not _active(self):
            extra = {"total_variance": total_variance} if has_total_variance else {}
            return cls.forward(self, x, y, dead_mask=dead_mask, **extra)
        assert self.W_dec is not None, "Decoder weight was not initialized."
        k = self.cfg.k
        if y is None:
            y = x

        k_aux, scale = 0, 1.0
        if dead_mask is not None and (num_dead := int(dead_mask.sum())) > 0:
            # sparsify's AuxK sizes (Gao et al. 2024, appendix B.1)
            k_aux = y.shape[-1] // 2
            scale = min(num_dead / k_aux, 1.0)
            k_aux = min(k_aux, num_dead)
        multi = bool(self.cfg.multi_topk)
        # One selection serves all: the top-4k's first k columns are the top-k (descending).
        codes = _codes(self, x, 4 * k if multi else k, backend,
                       dead_mask=dead_mask if k_aux else None, k_aux=k_aux)
        top_acts, top_indices = codes.values[..., :k], codes.indices[..., :k]

        sae_out = _decode(self, top_acts, top_indices, self.b_dec, backend, False)
        if self.W_skip is not None:
            sae_out = sae_out + x.to(self.W_skip.dtype) @ self.W_skip.mT
        e = y - sae_out
        if total_variance is None:
            total_variance = (y - y.mean(0)).pow(2).sum()

        if k_aux:
            # Residual of the live latents predicted by the dead ones; e already holds b_dec.
            e_hat = _decode(self, torch.relu(codes.aux_values), codes.aux_indices, None, backend, False)
            auxk_loss = scale * (e_hat - e.detach()).pow(2).sum() / total_variance
        else:
            auxk_loss = sae_out.new_tensor(0.0)

        fvu = e.pow(2).sum() / total_variance

        if multi:
            top_acts, top_indices = codes.values, codes.indices
            sae_out = _decode(self, top_acts, top_indices, self.b_dec, backend, False)
            multi_topk_fvu = (sae_out - y).pow(2).sum() / total_variance
        else:
            multi_topk_fvu = sae_out.new_tensor(0.0)

        return ForwardOutput(sae_out, top_acts, top_indices, fvu, auxk_loss, multi_topk_fvu)

    handle.set(coder, "encode", encode)
    handle.set(coder, "decode", decode)
    handle.set(coder, "forward", forward)
    return handle


__all__ = ["accelerate"]
