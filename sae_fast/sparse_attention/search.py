"""Offline pattern search (MInference-style): which pattern and budget suits each head.

One forward pass of the model over one sample. At each layer the attention function is
swapped (through transformers' ``AttentionInterface``, as in ``patch``) for one that sees the
layer's q and k, scores every candidate pattern, then runs the original attention so the
next layer sees the dense model's activations. A candidate's score for a head is the share
of the head's dense causal softmax mass that the candidate's *estimated* index keeps (the
estimate from the same q, k the patched model would use online), averaged over query rows.
Dense attention is computed one head and a few query blocks at a time, so memory stays at
``O(rows_per_chunk x T)`` per layer whatever the number of heads and candidates.

The best candidate per head (highest score; the earlier candidate on ties) goes into the
returned ``SparseAttentionConfig``, with its score as MInference's ``search_score``.
Candidates should have similar kernel cost, or the search just picks the largest budget.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .estimate import LAST_Q, build_layer_index
from .patch import _PATCHED, attention_modules, original_attention, register_attention, _set_impl
from .patterns import HeadPattern, SparseAttentionConfig, model_shape

__all__ = ["search_patterns", "default_candidates", "attention_mass_kept"]

SEARCH_IMPL_NAME = "sae_fast_search"
_HOOKS = {}  # id(attention module) -> callback, only during a search


def default_candidates() -> list:
    """Candidates of about the same cost, ~7K keys per query row (MInference's 1000 + 6096
    budget): vertical-heavy, slash-heavy and balanced vertical-slash, an A-shape and a
    block-sparse pattern of the same width."""
    return [
        HeadPattern.vertical_slash(1000, 6096),
        HeadPattern.vertical_slash(3500, 3596),
        HeadPattern.vertical_slash(100, 6996),
        HeadPattern.a_shape(128, 6968),
        HeadPattern.block_sparse(111),
    ]


def _row_key_masks(index, qb0: int, qb1: int, T: int, block_n: int, h: int, b: int) -> torch.Tensor:
    """Keys listed for query blocks ``qb0 .. qb1-1`` of (b, h): bool ``[qb1 - qb0, T]``."""
    bc, bo, cc, ci = (t[b, h, qb0:qb1] for t in index)
    n = qb1 - qb0
    dev = bc.device
    keys = torch.zeros(n, T + 1, dtype=torch.bool, device=dev)  # column T: discard bin
    if bo.shape[-1]:
        listed = torch.arange(bo.shape[-1], device=dev) < bc[:, None].long()
        cols = bo[..., None].long() + torch.arange(block_n, device=dev)
        ok = listed[..., None] & (cols >= 0) & (cols < T)
        keys.scatter_(1, torch.where(ok, cols, T).flatten(1), True)
    if ci.shape[-1]:
        listed = torch.arange(ci.shape[-1], device=dev) < cc[:, None].long()
        cols = ci.long()
        ok = listed & (cols >= 0) & (cols < T)
        keys.scatter_(1, torch.where(ok, cols, T), True)
    return keys[:, :T]


@torch.no_grad()
def attention_mass_kept(q: torch.Tensor, k: torch.Tensor, indices: Sequence, *, scale: Optional[float] = None,
                        block_m: int = 64, block_n: int = 64, rows_per_chunk: int = 1024) -> torch.Tensor:
    """For each index set (the four tensors of ``block_sparse_attention``) and each query head,
    the share of the dense causal softmax mass ``softmax(scale q kᵀ)`` that falls on the keys
    the index lists (causally), averaged over query rows and batch. Returns fp32
    ``[len(indices), Hq]`` in [0, 1]. Dense scores are built one head and ``rows_per_chunk``
    rows at a time (GQA: query head h reads kv head ``h // (Hq / Hkv)``, k is not repeated)."""
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    scale = float(D ** -0.5 if scale is None else scale)
    rows_per_chunk = max(block_m, rows_per_chunk // block_m * block_m)
    out = torch.zeros(len(indices), Hq, dtype=torch.float64, device=q.device)
    keys_ar = torch.arange(T, device=q.device)
    for b in range(B):
        for h in range(Hq):
            kh = k[b, h // G].float()
            for r0 in range(0, T, rows_per_chunk):
                r1 = min(T, r0 + rows_per_chunk)
                rows = torch.arange(r0, r1, device=q.device)
                causal = keys_ar[None, :] <= rows[:, None]
                s = (q[b, h, r0:r1].float() @ kh.T) * scale
                p = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
                qb0, qb1 = r0 // block_m, -(-r1 // block_m)
                for c, index in enumerate(indices):
                    keys = _row_key_masks(index, qb0, qb1, T, block_n, h, b)
                    m = keys[(rows // block_m) - qb0] & causal
                    out[c, h] += (p * m).sum().double()
    return (out / (B * T)).float()


def _default_scale(module, query):
    return getattr(module, "scaling", query.shape[-1] ** -0.5)


@torch.no_grad()
def search_patterns(model, input_ids: torch.Tensor, candidates: Optional[Sequence[HeadPattern]] = None, *,
                    block_m: int = 64, block_n: int = 64, last_q: int = LAST_Q, rows_per_chunk: int = 1024,
                    return_scores: bool = False):
    """Choose a pattern per (layer, query head) of ``model`` from ``candidates`` on one sample.

    Args:
        model: a causal LM ``patch_sparse_attention`` supports (not currently patched).
        input_ids: ``[1, T]`` (or ``[T]``) token ids of one unpadded sample; MInference uses one
            ~30K-token retrieval prompt. Longer is more representative, T² per head of time.
        candidates: ``HeadPattern`` s to compare (default ``default_candidates()``).
        return_scores: also return the fp32 ``[layers, heads, candidates]`` kept-mass table.

    Returns a ``SparseAttentionConfig`` (``.save(path)`` writes MInference's JSON), or
    ``(config, scores)``."""
    candidates = list(default_candidates() if candidates is None else candidates)
    if not candidates or not all(isinstance(c, HeadPattern) for c in candidates):
        raise ValueError("search_patterns: candidates must be a non-empty list of HeadPattern")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError("search_patterns: input_ids must be an integer tensor [1, T]")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
        raise ValueError(f"search_patterns: input_ids must be one sample [1, T], got {tuple(input_ids.shape)}")
    modules = attention_modules(model)
    n_layers, n_heads = model_shape(model)
    if any(m in _PATCHED for m in modules):
        raise ValueError("search_patterns: the model is patched; undo() the patch first (the search needs dense "
                         "attention)")
    original = model.config._attn_implementation
    if original not in ("sdpa", "eager"):
        raise ValueError(f"search_patterns: attention implementation {original!r}; use 'sdpa' or 'eager'")
    scores = torch.full((n_layers, n_heads, len(candidates)), float("nan"))
    called = set()
    fallback = {}

    def make_hook(layer):
        def hook(module, query, key, value, attention_mask, **kwargs):
            window = kwargs.get("sliding_window")
            if window is not None and query.shape[2] > int(window):
                raise ValueError(f"search_patterns: layer {layer} attends within a sliding window of {window} keys "
                                 f"(the sample has {query.shape[2]} tokens); patch_sparse_attention leaves such "
                                 "layers dense, and the search scores plain causal attention only")
            for reason in ("softcap", "sinks", "s_aux"):
                if kwargs.get(reason) is not None:
                    raise ValueError(f"search_patterns: layer {layer} uses {reason.replace('s_aux', 'sinks')} "
                                     "attention, which patch_sparse_attention leaves dense (it falls back there); "
                                     "the search scores plain causal softmax attention only")
            if attention_mask is not None or key.shape[2] != query.shape[2]:
                raise ValueError("search_patterns: got a padding mask or a KV cache; pass one unpadded sample")
            scale = kwargs.get("scaling") or _default_scale(module, query)
            idx = [build_layer_index(query, key, [c] * query.shape[1], scale=scale, block_m=block_m,
                                     block_n=block_n, last_q=last_q) for c in candidates]
            kept = attention_mass_kept(query, key, idx, scale=scale, block_m=block_m, block_n=block_n,
                                       rows_per_chunk=rows_per_chunk)
            scores[layer] = kept.T.cpu()
            called.add(layer)
            fn = fallback.get(type(module)) or fallback.setdefault(type(module), original_attention(module, original))
            return fn(module, query, key, value, attention_mask, **kwargs)

        return hook

    for i, m in enumerate(modules):
        _HOOKS[id(m)] = make_hook(i)
    register_attention(SEARCH_IMPL_NAME, _search_attention_forward)
    try:
        _set_impl(model, SEARCH_IMPL_NAME)
        model(input_ids=input_ids, use_cache=False)
    finally:
        for m in modules:
            _HOOKS.pop(id(m), None)
        _set_impl(model, original)
    missing = [i for i in range(n_layers) if i not in called]
    if missing:
        raise RuntimeError(f"search_patterns: layers {missing} were never called through the attention interface")
    if not torch.isfinite(scores).all():
        # the dense attention itself is not finite there (NaN/inf in q or k): no pattern can be
        # judged, and the choice would be an accident of NaN ordering
        layer, head = (int(x) for x in (~torch.isfinite(scores)).any(-1).nonzero()[0])
        raise ValueError(f"search_patterns: layer {layer} head {head}: the dense attention probabilities are not "
                         "finite (NaN or inf in its queries or keys; a 16-bit model overflowing on this sample?), "
                         "so no candidate can be scored")
    best = scores.argmax(-1)  # first maximum on ties
    layers = [[candidates[int(best[i, h])].with_score(float(scores[i, h, best[i, h]])) for h in range(n_heads)]
              for i in range(n_layers)]
    config = SparseAttentionConfig(layers)
    return (config, scores) if return_scores else config


def _search_attention_forward(module, query, key, value, attention_mask, **kwargs):
    hook = _HOOKS.get(id(module))
    if hook is None:
        return original_attention(module, "sdpa")(module, query, key, value, attention_mask, **kwargs)
    return hook(module, query, key, value, attention_mask, **kwargs)
