"""Patch a Hugging Face causal LM so that long prefills run block-sparse attention.

How: transformers (>= 4.48, with ``masking_utils`` from 4.53) looks each attention layer's
function up by name in ``AttentionInterface`` from ``config._attn_implementation``. We register
one function under ``"sae_fast_sparse"`` (and the SDPA mask builder under the same name in
``AttentionMaskInterface``) and switch the model's implementation to it with
``model.set_attn_implementation``. No model class is monkeypatched, so every architecture
whose attention goes through that interface (Llama, SmolLM2, Qwen2/3, Mistral, Gemma ...)
works; ``undo()`` switches back.

The registered function decides per call. It takes the sparse path only for a *prefill*: no
KV history (as many keys as queries), at least ``min_prefill_len`` tokens, no padding (the
SDPA mask builder then hands over ``attention_mask=None``), no dropout, no
``output_attentions``, no soft-capping, no attention sinks/position bias, and no sliding
window shorter than the prompt. Otherwise it calls the model's original implementation
(``"sdpa"`` or ``"eager"``), so decode steps in ``generate()``, padded batches and short
prompts behave exactly as before. ``handle.stats`` counts which path each call took and why.

On the sparse path: ``estimate.build_layer_index`` turns the layer's q, k and its per-head
patterns into an index, ``sae_fast.block_sparse_attention`` (GQA native, the model's
``scaling``) computes the attention.
"""

from __future__ import annotations

import collections
import sys
import weakref
from typing import Callable, Optional

import torch

from .._backend import BACKENDS
from ..hf import decoder_layers
from ..ops.attention import MAX_HEAD_DIM, block_sparse_attention
from .estimate import LAST_Q, build_layer_index
from .patterns import SparseAttentionConfig, model_shape

__all__ = ["patch_sparse_attention", "SparseAttentionPatch", "IMPL_NAME", "DEFAULT_MIN_PREFILL_LEN"]

IMPL_NAME = "sae_fast_sparse"
# Below this many tokens the sparse path is not taken. MInference's own kernels are slower
# than dense FlashAttention below ~50K tokens; re-tune with benchmarks/bench_sparse_prefill.py.
DEFAULT_MIN_PREFILL_LEN = 16384
_SUPPORTED_ORIGINALS = ("sdpa", "eager")
# Set on each patched attention module: a deep copy of a patched model (TRL's reference model,
# say) shares our implementation name but none of the patch; its modules find their original
# implementation here instead of assuming SDPA (eager-only models such as Gemma2 raise there)
_ORIGINAL_ATTR = "_sae_fast_original_attention"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# attention module -> (handle, layer index). Weak: a deleted model leaves nothing behind.
_PATCHED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_registered = set()


# ------------------------------------------------------------------ transformers plumbing


def _interfaces():
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as e:  # pragma: no cover - depends on the installed transformers
        raise ImportError("sae_fast.sparse_attention needs transformers >= 4.53 (AttentionInterface and "
                          f"masking_utils.AttentionMaskInterface): {e}") from None
    return AttentionInterface, AttentionMaskInterface, sdpa_mask


def register_attention(name: str, fn: Callable) -> None:
    """Register ``fn`` as attention implementation ``name``, with SDPA-style masks (None for
    an unpadded causal prefill or a single-token decode, else a boolean [B, 1, T, S] mask)."""
    AttentionInterface, AttentionMaskInterface, sdpa_mask = _interfaces()
    if name not in _registered:
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, sdpa_mask)
        _registered.add(name)


def attention_modules(model) -> list:
    """The self-attention module of each decoder layer, in layer order. ValueError with the
    reason when the model is not a decoder-only LM whose attention uses AttentionInterface."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation") and not hasattr(config, "_attn_implementation"):
        raise ValueError(f"{type(model).__name__} is not a Hugging Face transformers model (no config / attention "
                         "implementation); patch_sparse_attention supports decoder-only causal LMs")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{type(model).__name__} is an encoder-decoder model; patch_sparse_attention supports "
                         "decoder-only causal LMs (Llama, Qwen2, Mistral, SmolLM2, ...)")
    try:
        layers = decoder_layers(model)
    except ValueError as e:
        raise ValueError(f"{type(model).__name__} is not supported by patch_sparse_attention: {e}") from None
    mods = []
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None:
            raise ValueError(f"{type(model).__name__} is not supported by patch_sparse_attention: decoder layer {i} "
                             f"({type(layer).__name__}) has no self_attn module (Llama-style layers have one)")
        if not getattr(attn, "is_causal", True):
            raise ValueError(f"{type(model).__name__}: layer {i} attention is not causal; sparse prefill needs a "
                             "causal LM")
        mods.append(attn)
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    if can_set is not None and not can_set():
        raise ValueError(f"{type(model).__name__}'s attention does not dispatch through transformers' "
                         "AttentionInterface, so its implementation cannot be switched; not supported")
    return mods


def _set_impl(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # transformers < 4.56
        model.config._attn_implementation = name
    if model.config._attn_implementation != name:
        raise ValueError(f"{type(model).__name__}: could not switch its attention implementation to {name!r} "
                         f"(still {model.config._attn_implementation!r})")


def original_attention(module, impl: str) -> Callable:
    """The function the model would have called: SDPA, or the module's own eager function (with
    the boolean/None mask our mask builder makes turned into eager's additive float mask)."""
    from transformers import AttentionInterface

    if impl == "sdpa":
        return AttentionInterface._global_mapping["sdpa"]
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        return AttentionInterface._global_mapping["sdpa"]

    def eager_with_float_mask(module, query, key, value, attention_mask, **kwargs):
        return eager(module, query, key, value, _additive_mask(attention_mask, query, key), **kwargs)

    return eager_with_float_mask


def _additive_mask(mask, query, key):
    T, S = query.shape[2], key.shape[2]
    if mask is None:
        if T == 1:
            return None  # a single query sees every cached key
        i = torch.arange(T, device=query.device)[:, None] + (S - T)
        mask = (torch.arange(S, device=query.device)[None, :] <= i)[None, None]
    if mask.dtype != torch.bool:
        return mask
    zero = torch.zeros((), dtype=query.dtype, device=query.device)
    return torch.where(mask, zero, torch.finfo(query.dtype).min)


# ------------------------------------------------------------------ the attention function


def _sparse_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                              scaling: Optional[float] = None, **kwargs):
    entry = _PATCHED.get(module)
    if entry is None:  # a module of a model that shares our implementation name but is not patched
        impl = module.__dict__.get(_ORIGINAL_ATTR, "sdpa")
        return original_attention(module, impl)(module, query, key, value, attention_mask, dropout=dropout,
                                                scaling=scaling, **kwargs)
    handle, layer = entry
    return handle._attend(module, layer, query, key, value, attention_mask, dropout, scaling, kwargs)


class SparseAttentionPatch:
    """Handle returned by ``patch_sparse_attention``: ``undo()`` restores the model's original
    attention implementation; use it as a context manager to undo on exit.

    ``stats`` is a ``collections.Counter`` of calls per path: ``"sparse"``, ``"dense_layer"``
    (every head of the layer dense: the original implementation is faster) and
    ``"fallback:<reason>"`` (reasons: ``short``, ``kv_cache``, ``mask``, ``dropout``,
    ``output_attentions``, ``softcap``, ``sliding_window``, ``sinks``, ``position_bias``,
    ``paged_cache``, ``not_causal``, ``dtype``, ``head_dim``: values of another width than the
    queries, as in DeepSeek's MLA, or heads wider than the kernel's limit)."""

    def __init__(self, model, config: SparseAttentionConfig, modules, original: str, *, min_prefill_len: int,
                 block_m: int, block_n: int, last_q: int, backend: Optional[str], index_backend: Optional[str]):
        # Weak references: _PATCHED's values hold this handle, so strong ones would keep a
        # patched model alive forever once the caller dropped it without undo().
        self._model = weakref.ref(model)
        self.config = config
        self.original = original
        self.min_prefill_len = min_prefill_len
        self.block_m, self.block_n, self.last_q = block_m, block_n, last_q
        self.backend, self.index_backend = backend, index_backend
        self.stats = collections.Counter()
        self._modules = [weakref.ref(m) for m in modules]
        self._fallbacks = {}
        self.active = True

    @property
    def model(self):
        """The patched model (None once it has been garbage-collected)."""
        return self._model()

    # -------------------------------------------------------------- decisions

    def _fallback_reason(self, module, query, key, value, attention_mask, dropout, kwargs) -> Optional[str]:
        if kwargs.get("output_attentions"):
            return "output_attentions"
        if dropout and dropout > 0:
            return "dropout"
        if kwargs.get("softcap") is not None:
            return "softcap"
        if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
            return "sinks"
        if kwargs.get("position_bias") is not None:
            return "position_bias"
        if kwargs.get("cache") is not None:
            return "paged_cache"
        if kwargs.get("is_causal") is False or not getattr(module, "is_causal", True):
            return "not_causal"
        T, S = query.shape[2], key.shape[2]
        if S != T:
            return "kv_cache"
        window = kwargs.get("sliding_window")
        if window is not None and T > int(window):
            return "sliding_window"
        if attention_mask is not None:
            return "mask"
        if T < self.min_prefill_len:
            return "short"
        if query.dtype not in _FLOAT_DTYPES:
            return "dtype"
        # DeepSeek-V2/V3's compressed attention (MLA): values narrower than queries and keys
        # (head_dim is None on those modules, so patching could not tell)
        if value.shape[-1] != query.shape[-1] or query.shape[-1] > MAX_HEAD_DIM:
            return "head_dim"
        return None

    def _attend(self, module, layer, query, key, value, attention_mask, dropout, scaling, kwargs):
        reason = self._fallback_reason(module, query, key, value, attention_mask, dropout, kwargs)
        patterns = self.config.layers[layer]
        if reason is None and all(p.kind == "dense" for p in patterns):
            reason = "dense_layer"
            self.stats[reason] += 1
        elif reason is not None:
            self.stats["fallback:" + reason] += 1
        if reason is not None:
            fn = self._fallbacks.get(type(module))
            if fn is None:
                fn = self._fallbacks[type(module)] = original_attention(module, self.original)
            return fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        self.stats["sparse"] += 1
        index = build_layer_index(query, key, patterns, scale=scaling, block_m=self.block_m, block_n=self.block_n,
                                  last_q=self.last_q, index_backend=self.index_backend)
        out, _ = block_sparse_attention(query, key, value, *index, causal=True, scale=scaling, block_m=self.block_m,
                                        block_n=self.block_n, backend=self.backend)
        return out.transpose(1, 2).contiguous(), None

    # -------------------------------------------------------------- lifecycle

    def undo(self) -> None:
        """Restore the original attention implementation (idempotent)."""
        if not self.active:
            return
        for ref in self._modules:
            m = ref()
            if m is not None and _PATCHED.get(m, (None,))[0] is self:
                del _PATCHED[m]
                m.__dict__.pop(_ORIGINAL_ATTR, None)
        if self.model is not None:
            _set_impl(self.model, self.original)
        self.active = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()
        return False

    def __repr__(self):
        state = "active" if self.active else "undone"
        return (f"SparseAttentionPatch({type(self.model).__name__}, {self.config!r}, min_prefill_len="
                f"{self.min_prefill_len}, {state}, stats={dict(self.stats)})")


def patch_sparse_attention(model, config: SparseAttentionConfig, *, min_prefill_len: int = DEFAULT_MIN_PREFILL_LEN,
                           block_m: int = 64, block_n: int = 64, last_q: int = LAST_Q,
                           backend: Optional[str] = None, index_backend: Optional[str] = None) -> SparseAttentionPatch:
    """Make ``model``'s long prefills use dynamic sparse attention (MInference-style).

    Args:
        model: a transformers decoder-only causal LM whose attention dispatches through
            ``AttentionInterface`` (Llama, SmolLM2, Qwen2, Mistral, ...), attention
            implementation ``"sdpa"`` or ``"eager"``.
        config: per-layer, per-query-head patterns; its shape must match the model's
            ``num_hidden_layers x num_attention_heads``.
        min_prefill_len: prompts shorter than this use the original attention.
        block_m, block_n: the kernel's block sizes (64 is what MInference's estimates assume).
        last_q: queries used by the vertical-slash estimate.
        backend: ``block_sparse_attention`` backend (None: Triton on GPU, see its docstring).
        index_backend: ``vertical_slash_index`` backend (None: CUDA kernel on GPU if built).

    Returns a ``SparseAttentionPatch`` (``.undo()``, context manager, ``.stats``). Raises
    ValueError for an unsupported model, a config of the wrong shape, an original attention
    implementation other than sdpa/eager, a head dim above the kernel's limit, or a model that
    is already patched."""
    if not isinstance(config, SparseAttentionConfig):
        raise TypeError(f"patch_sparse_attention: config must be a SparseAttentionConfig, got {type(config).__name__}")
    if isinstance(min_prefill_len, bool) or not isinstance(min_prefill_len, int) or min_prefill_len < 1:
        raise ValueError(f"patch_sparse_attention: min_prefill_len must be a positive int, got {min_prefill_len!r}")
    for name, bs in (("block_m", block_m), ("block_n", block_n)):
        if isinstance(bs, bool) or bs not in (16, 32, 64, 128, 256):
            raise ValueError(f"patch_sparse_attention: {name} must be a power of two in [16, 256], got {bs!r}")
    # checked here, not at the first long prefill (which may come hours into a job)
    if isinstance(last_q, bool) or not isinstance(last_q, int) or last_q < 1:
        raise ValueError(f"patch_sparse_attention: last_q must be a positive int, got {last_q!r}")
    for name, value, allowed in (("backend", backend, tuple(b for b in BACKENDS if b != "cuda")),
                                 ("index_backend", index_backend, BACKENDS)):
        if value is not None and value not in allowed:
            raise ValueError(f"patch_sparse_attention: {name} must be None or one of {allowed}, got {value!r}")
    modules = attention_modules(model)
    n_layers, n_heads = model_shape(model)
    if len(modules) != n_layers:
        raise ValueError(f"{type(model).__name__}: found {len(modules)} decoder layers, config says {n_layers}")
    config.check_model_shape(n_layers, n_heads)
    if any(m in _PATCHED for m in modules):
        raise ValueError(f"{type(model).__name__} is already patched; undo() the first patch before patching again")
    original = model.config._attn_implementation
    if original not in _SUPPORTED_ORIGINALS:
        raise ValueError(f"patch_sparse_attention: the model's attention implementation is {original!r}; supported "
                         f"originals are {_SUPPORTED_ORIGINALS} (the fallback for decode and short prompts). Call "
                         "model.set_attn_implementation('sdpa') first")
    head_dim = getattr(modules[0], "head_dim", None)
    if head_dim is not None and head_dim > MAX_HEAD_DIM:
        raise ValueError(f"patch_sparse_attention: head_dim {head_dim} exceeds the block-sparse kernel's limit "
                         f"{MAX_HEAD_DIM}")
    register_attention(IMPL_NAME, _sparse_attention_forward)
    handle = SparseAttentionPatch(model, config, modules, original, min_prefill_len=min_prefill_len, block_m=block_m,
                                  block_n=block_n, last_q=last_q, backend=backend, index_backend=index_backend)
    for i, m in enumerate(modules):
        _PATCHED[m] = (handle, i)
        m.__dict__[_ORIGINAL_ATTR] = original
    try:
        _set_impl(model, IMPL_NAME)
    except Exception:
        for m in modules:
            _PATCHED.pop(m, None)
            m.__dict__.pop(_ORIGINAL_ATTR, None)
        raise
    return handle
