"""Dynamic sparse attention for long-context prefill of Hugging Face causal LMs (MInference-style).

* ``patterns``: ``HeadPattern`` (vertical-slash, A-shape, block-sparse, dense) and
  ``SparseAttentionConfig`` (layer -> head -> pattern; MInference's JSON format).
* ``estimate``: online index estimation from a layer's q and k, batched and GQA-aware.
* ``patch``: ``patch_sparse_attention(model, config)`` through transformers' AttentionInterface.
* ``search``: ``search_patterns(model, input_ids)``, the offline per-head pattern choice.

This is the modules layer: it uses torch and the ``sae_fast`` ops (``block_sparse_attention``,
``vertical_slash_index``), never kernels directly. Importing it imports no transformers.
"""

from .estimate import (a_shape_index, block_sparse_index, build_layer_index, dense_index, estimate_vertical_slash,
                       vertical_slash_layer_index, vertical_slash_scores)
from .patch import SparseAttentionPatch, patch_sparse_attention
from .patterns import HeadPattern, SparseAttentionConfig
from .search import attention_mass_kept, default_candidates, search_patterns

__all__ = [
    "HeadPattern",
    "SparseAttentionConfig",
    "patch_sparse_attention",
    "SparseAttentionPatch",
    "search_patterns",
    "default_candidates",
    "attention_mass_kept",
    "build_layer_index",
    "estimate_vertical_slash",
    "vertical_slash_scores",
    "vertical_slash_layer_index",
    "block_sparse_index",
    "a_shape_index",
    "dense_index",
]
