"""Online index estimation: from one layer's q and k (and the layer's per-head patterns) to the
four index tensors ``sae_fast.block_sparse_attention`` walks.

Why online: the *shape* of a head's pattern is stable across inputs (chosen offline), but the
columns, diagonals and blocks that carry its mass depend on the prompt. MInference estimates
them from a cheap probe: the last 64 queries against all keys (vertical-slash) or
mean-pooled 64-token blocks (block-sparse). A-shape needs no estimate.

Everything here is batched and GQA-aware: the queries of the ``G = Hq / Hkv`` heads that
share a kv head are stacked against that kv head's keys in one matmul (K/V are never
repeated), all heads of a layer are processed at once (no Python loop over heads), and a layer
whose heads use different patterns gets one set of index tensors, each kind's lists padded to
the widest.

The estimates run without autograd (their results are integer indices): under a grad-enabled
prefill the probe's per-chunk buffers would otherwise all stay referenced by the graph, and
the chunk bound on them would not hold.

Budgets larger than the sequence are clipped; a budget covering the whole sequence selects
every causal key, so the result equals dense causal attention up to float rounding.

Layering: plain torch plus the ``sae_fast`` ops (``vertical_slash_index``); no kernels here.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from ..ops.attention_index import vertical_slash_index
from .patterns import HeadPattern

__all__ = [
    "vertical_slash_scores",
    "estimate_vertical_slash",
    "vertical_slash_layer_index",
    "block_sparse_index",
    "a_shape_index",
    "dense_index",
    "build_layer_index",
    "LAST_Q",
    "FORCED_VERTICALS",
    "FORCED_SLASHES",
]

LAST_Q = 64  # queries used to estimate vertical-slash patterns (MInference's last_q)
FORCED_VERTICALS = 30  # the first keys (attention sinks) are always kept
FORCED_SLASHES = 100  # the nearest diagonals (local context) are always kept
# Forced entries score above any attainable sum (a column or diagonal sum over LAST_Q softmax
# rows is at most LAST_Q), ordered so a budget smaller than the forced set keeps the first
# columns / nearest diagonals. 1e6 + small integers are exact in fp32.
_FORCED = 1.0e6
# Bound on the fp32 [B, heads, last_q, T] probe buffers (elements): kv heads are processed in
# chunks below it.
_PROBE_ELEMENTS = 1 << 27
_BLOCK_SIZES = (16, 32, 64, 128, 256)

Index = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
Budget = Union[int, Sequence[int], torch.Tensor]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_qk(q: torch.Tensor, k: torch.Tensor, who: str):
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"{who}: q must be [B, Hq, T, D] and k [B, Hkv, T, D] tensors, got "
                         f"{getattr(q, 'shape', type(q))} and {getattr(k, 'shape', type(k))}")
    B, Hq, T, D = q.shape
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(f"{who}: k must be [B={B}, Hkv, T={T}, D={D}] to match q {tuple(q.shape)}, got {tuple(k.shape)} "
                         "(prefill only: as many keys as queries)")
    if k.shape[1] == 0 or Hq % k.shape[1]:
        raise ValueError(f"{who}: query heads ({Hq}) must be a multiple of kv heads ({k.shape[1]})")
    if q.device != k.device:
        raise ValueError(f"{who}: q is on {q.device}, k on {k.device}")
    if not q.is_floating_point() or not k.is_floating_point():
        raise TypeError(f"{who}: q and k must be floating point, got {q.dtype} and {k.dtype}")


def _check_blocks(block_m, block_n, who: str):
    for name, bs in (("block_m", block_m), ("block_n", block_n)):
        if isinstance(bs, bool) or bs not in _BLOCK_SIZES:
            raise ValueError(f"{who}: {name} must be one of {_BLOCK_SIZES} (the kernel's block sizes), got {bs!r}")


def _per_head(budget: Budget, H: int, who: str, name: str) -> list:
    """A budget as a list of H non-negative Python ints (patterns are host-side metadata)."""
    if isinstance(budget, torch.Tensor):
        budget = budget.tolist()
    if isinstance(budget, int) and not isinstance(budget, bool):
        budget = [budget] * H
    budget = list(budget)
    if len(budget) != H or any(not isinstance(b, int) or isinstance(b, bool) or b < 0 for b in budget):
        raise ValueError(f"{who}: {name} must be a non-negative int or {H} of them (one per query head), got {budget!r}")
    return budget


def _grouped_scores(q_rows: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``q_rows [B, Hq, R, D] @ k[B, Hkv, S, D]ᵀ`` -> fp32 ``[B, Hq, R, S]`` without repeating k:
    the G query heads of a kv head are stacked into one ``[G·R, D]`` operand. The matmul runs in
    the inputs' dtype (fp32 accumulation inside; what a tensor core does), the result is fp32."""
    B, Hq, R, D = q_rows.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    qg = q_rows.reshape(B, Hkv, G * R, D)
    s = torch.matmul(qg, k.to(q_rows.dtype).transpose(-1, -2))
    return s.float().view(B, Hq, R, S)


@torch.no_grad()
def vertical_slash_scores(q: torch.Tensor, k: torch.Tensor, *, scale: Optional[float] = None,
                          last_q: int = LAST_Q) -> Tuple[torch.Tensor, torch.Tensor]:
    """MInference's probe, without the forced entries: ``(column_scores, diagonal_scores)``,
    both fp32 ``[B, Hq, T]``.

    The last ``L = min(last_q, T)`` queries are scored against every key (``scale`` default
    ``D**-0.5``), causally masked inside the final ``L x L`` square, softmaxed per row. Column j's
    score is the sum of its probabilities over the L rows; diagonal o's score is the sum over
    rows i of ``p[i, i - o]`` (key ``i - o``, so o = 0 is the main diagonal). A probe row with a
    non-finite logit (NaN or inf in its query or in a key it sees) contributes nothing."""
    _check_qk(q, k, "vertical_slash_scores")
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    L = min(int(last_q), T)
    if L < 1:
        raise ValueError(f"vertical_slash_scores: last_q must be >= 1, got {last_q}")
    scale = float(D ** -0.5 if scale is None else scale)
    dev = q.device
    rows = torch.arange(T - L, T, device=dev)  # absolute positions of the probe rows
    keys = torch.arange(T, device=dev)
    causal = keys[None, :] <= rows[:, None]  # [L, T]
    # diagonal o of row r reads key rows[r] - o
    offsets = torch.arange(T, device=dev)
    diag_key = rows[:, None] - offsets[None, :]  # [L, T]
    diag_ok = diag_key >= 0
    diag_key = diag_key.clamp(min=0)
    col = torch.empty(B, Hq, T, dtype=torch.float32, device=dev)
    dia = torch.empty(B, Hq, T, dtype=torch.float32, device=dev)
    chunk = max(1, _PROBE_ELEMENTS // max(1, B * G * L * T))  # kv heads per chunk
    q_last = q[:, :, T - L:, :]
    post_scale = scale
    if q.dtype == torch.float16:
        # fp16 products overflow to inf past 65504 (then NaN probabilities outrank every real
        # column); the scaled logits fit wherever the attention itself is finite
        q_last, post_scale = (q_last.float() * scale).to(q.dtype), 1.0
    for c0 in range(0, Hkv, chunk):
        c1 = min(Hkv, c0 + chunk)
        h0, h1 = c0 * G, c1 * G
        s = _grouped_scores(q_last[:, h0:h1], k[:, c0:c1]) * post_scale
        s = s.masked_fill(~causal, float("-inf"))
        # A probe row with a NaN or inf logit (a non-finite query, or a non-finite key it sees)
        # softmaxes to NaN everywhere; it contributes nothing, so the finite rows still rank and
        # no NaN sum outranks the forced entries (topk puts NaN above everything: the sinks and
        # the main diagonal were dropped and rows saw no key)
        p = torch.softmax(s, dim=-1).nan_to_num_(nan=0.0)  # [B, h, L, T]
        col[:, h0:h1] = p.sum(2)
        d = torch.gather(p, 3, diag_key.expand(p.shape))
        dia[:, h0:h1] = (d * diag_ok).sum(2)
        del s, p, d
    return col, dia


def _top_with_budget(scores: torch.Tensor, budgets: list, limit: int) -> torch.Tensor:
    """Per head, the ``min(budget[h], limit)`` highest-scoring positions, best first; padding
    -1. ``scores [B, H, N]`` -> int64 ``[B, H, min(max budget, limit, N)]``."""
    B, H, N = scores.shape
    width = min(max(budgets) if budgets else 0, limit, N)
    if width == 0:
        return torch.full((B, H, 0), -1, dtype=torch.int64, device=scores.device)
    idx = torch.topk(scores, width, dim=-1, sorted=True).indices
    bud = torch.tensor(budgets, device=scores.device).clamp(max=width).view(1, H, 1)
    rank = torch.arange(width, device=scores.device).view(1, 1, width)
    return torch.where(rank < bud, idx, torch.full_like(idx, -1))


def estimate_vertical_slash(q: torch.Tensor, k: torch.Tensor, vertical_size: Budget, slash_size: Budget, *,
                            scale: Optional[float] = None, last_q: int = LAST_Q,
                            forced_verticals: int = FORCED_VERTICALS,
                            forced_slashes: int = FORCED_SLASHES) -> Tuple[torch.Tensor, torch.Tensor]:
    """MInference's vertical-slash estimate for all heads at once.

    Args:
        q ``[B, Hq, T, D]``, k ``[B, Hkv, T, D]`` (SDPA layout, GQA: Hq a multiple of Hkv; any
            strides). vertical_size, slash_size: one int or one per query head (0 for a head
            that selects nothing: the other heads of a mixed layer).
        forced_verticals: the first keys kept whatever their score (attention sinks).
        forced_slashes: the nearest diagonals kept whatever their score (local context).

    Returns ``(vertical_idx [B, Hq, NV], slash_idx [B, Hq, NS])`` int64, best first, -1 padding
    past each head's budget (``NV = min(max budget, T)``): the input of
    ``sae_fast.vertical_slash_index``. Budgets are clipped to T; with ``slash_size >= T`` every
    diagonal is chosen, i.e. dense causal attention. Budgets below the forced counts are not
    raised (MInference raises them to 30 columns / 50 diagonals): the forced entries rank
    first, nearest first, and a budget keeps that many of them."""
    _check_qk(q, k, "estimate_vertical_slash")
    Hq, T = q.shape[1], q.shape[2]
    vb = _per_head(vertical_size, Hq, "estimate_vertical_slash", "vertical_size")
    sb = _per_head(slash_size, Hq, "estimate_vertical_slash", "slash_size")
    col, dia = vertical_slash_scores(q, k, scale=scale, last_q=last_q)
    fv, fs = min(int(forced_verticals), T), min(int(forced_slashes), T)
    if fv > 0:
        col[..., :fv] = _FORCED + torch.arange(fv, 0, -1, device=q.device, dtype=torch.float32)
    if fs > 0:
        dia[..., :fs] = _FORCED + torch.arange(fs, 0, -1, device=q.device, dtype=torch.float32)
    return _top_with_budget(col, vb, T), _top_with_budget(dia, sb, T)


def vertical_slash_layer_index(q, k, vertical_size: Budget, slash_size: Budget, *, scale=None,
                               block_m: int = 64, block_n: int = 64, last_q: int = LAST_Q,
                               index_backend: Optional[str] = None) -> Index:
    """``estimate_vertical_slash`` followed by ``sae_fast.vertical_slash_index`` (T = S, no
    padding): the kernel's four index tensors ``[B, Hq, cdiv(T, block_m), ...]``."""
    v, s = estimate_vertical_slash(q, k, vertical_size, slash_size, scale=scale, last_q=last_q)
    T = q.shape[2]
    return vertical_slash_index(v, s, None, block_m, block_n, context_len=T, backend=index_backend,
                                check_seq_lens=False)


@torch.no_grad()
def block_sparse_index(q: torch.Tensor, k: torch.Tensor, top_blocks: Budget, *, block_m: int = 64,
                       block_n: int = 64) -> Index:
    """Block-sparse estimate: mean-pool each ``block_m`` rows of q and ``block_n`` rows of k (a
    partial last block is averaged over its real rows), score query block against key block,
    keep per query block the ``top_blocks[h]`` best key blocks among the causal ones
    (a key block is causal when its first key is at or before the query block's last row),
    always including the diagonal blocks (those holding one of the block's own rows; with
    ``block_m > block_n`` there are several, and they are kept even beyond the budget, so
    every row sees itself). A NaN or -inf block score ranks below every finite one, +inf above
    them (both below the diagonal blocks).

    Returns the index with aligned ranges ``kb * block_n`` in ascending order and no columns.
    The kernel's causal mask trims the diagonal blocks row by row."""
    _check_qk(q, k, "block_sparse_index")
    _check_blocks(block_m, block_n, "block_sparse_index")
    B, Hq, T, D = q.shape
    dev = q.device
    tb = _per_head(top_blocks, Hq, "block_sparse_index", "top_blocks")
    nqb, nkb = _cdiv(T, block_m), _cdiv(T, block_n)

    def pool(x, bs, n):
        # fp32 accumulation without an fp32 copy of x (a 128K-token q would be GBs)
        full = T // bs
        parts = [x[:, :, :full * bs].reshape(x.shape[0], x.shape[1], full, bs, D).sum(3, dtype=torch.float32)]
        if full < n:
            parts.append(x[:, :, full * bs:].sum(2, keepdim=True, dtype=torch.float32))
        cnt = torch.full((n,), float(bs), device=dev)
        cnt[-1] = float(T - (n - 1) * bs)
        return torch.cat(parts, 2) / cnt.view(1, 1, n, 1)

    qp, kp = pool(q, block_m, nqb), pool(k, block_n, nkb)
    scores = _grouped_scores(qp, kp)  # [B, Hq, nqb, nkb] fp32
    # Non-finite scores (NaN or inf in a pooled block): NaN and -inf rank below every finite
    # score, +inf above them, all below the diagonal's marker and above the non-causal blocks.
    # Left as they were, NaN (which topk puts first) and +inf (tied with the marker) pushed the
    # diagonal block out of a small budget.
    big = torch.finfo(scores.dtype).max
    scores = scores.nan_to_num(nan=-big, posinf=big, neginf=-big)
    m0 = torch.arange(nqb, device=dev) * block_m
    last = torch.clamp(m0 + block_m, max=T) - 1  # last row of each query block
    k0 = torch.arange(nkb, device=dev) * block_n
    causal = k0[None, :] <= last[:, None]  # [nqb, nkb]
    diag = causal & (k0[None, :] + block_n > m0[:, None])
    scores = scores.masked_fill(~causal, float("-inf")).masked_fill(diag, float("inf"))
    width = min(max(max(tb), _cdiv(block_m, block_n)), nkb)
    top = torch.topk(scores, width, dim=-1, sorted=True).indices  # [B, Hq, nqb, width]
    n_causal, n_diag = causal.sum(-1), diag.sum(-1)  # [nqb]
    budget = torch.tensor(tb, device=dev).view(1, Hq, 1)
    count = torch.minimum(torch.maximum(budget, n_diag.view(1, 1, nqb)), n_causal.view(1, 1, nqb))
    count = count.expand(B, Hq, nqb)
    rank = torch.arange(width, device=dev)
    keep = rank < count[..., None]
    blocks = torch.where(keep, top, torch.full_like(top, nkb)).sort(-1).values
    offsets = torch.where(blocks < nkb, blocks * block_n, torch.zeros_like(blocks))
    i32 = torch.int32
    return (count.to(i32).contiguous(), offsets.to(i32).contiguous(),
            torch.zeros(B, Hq, nqb, dtype=i32, device=dev), torch.zeros(B, Hq, nqb, 0, dtype=i32, device=dev))


def a_shape_index(batch: int, T: int, sink: Budget, local: Budget, *, num_heads: Optional[int] = None,
                  block_m: int = 64, block_n: int = 64, device=None) -> Index:
    """A-shape (StreamingLLM-like) index, built directly: no estimate.

    Semantics (exact, per row): query row i of query block ``qb`` (rows ``m0 .. hi-1``,
    ``hi = min(m0 + block_m, T)``) attends to keys ``j <= i`` with ``j < sink`` or
    ``j >= min(hi - local, m0)``. The window is anchored at the block's last row (the last row
    of a block sees exactly ``local`` recent keys, earlier rows of the block fewer), because the
    kernel's lists are per query block; it always reaches back to the block's first row, so a
    window narrower than ``block_m`` still lets every row see itself (anchored at the last row
    alone, the first rows of a block saw no key at all and output zeros). Sinks are whole ``block_n`` ranges plus single columns
    for a remainder; the window is ranges from its first key (a range running past the
    diagonal is trimmed by the causal mask). When the window reaches the sinks the two merge
    into one run of ranges from key 0, so no key is listed twice.

    ``sink`` / ``local``: one int or one per head (``num_heads`` then defaults to their
    length). Returns the four index tensors ``[batch, H, cdiv(T, block_m), ...]`` (int32)."""
    _check_blocks(block_m, block_n, "a_shape_index")
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"a_shape_index: T must be a positive int, got {T!r}")
    if num_heads is None:
        num_heads = len(sink) if not isinstance(sink, int) else (len(local) if not isinstance(local, int) else 1)
    H = int(num_heads)
    sk = [min(s, T) for s in _per_head(sink, H, "a_shape_index", "sink")]
    lc = _per_head(local, H, "a_shape_index", "local")
    if any(x < 1 for x in lc):
        raise ValueError(f"a_shape_index: local must be >= 1 (each row sees itself), got {lc}")
    lc = [min(x, T) for x in lc]
    nqb = _cdiv(T, block_m)
    max_blocks = min(_cdiv(T, block_n) + 1, max(s // block_n + _cdiv(max(w, block_m), block_n) for s, w in zip(sk, lc)) + 1)
    max_cols = min(block_n - 1, max(s % block_n for s in sk))
    dev = torch.device(device) if device is not None else torch.device("cpu")
    sink_t = torch.tensor(sk, device=dev).view(H, 1, 1)
    local_t = torch.tensor(lc, device=dev).view(H, 1, 1)
    m0 = (torch.arange(nqb, device=dev) * block_m).view(1, nqb, 1)
    hi = torch.clamp(m0 + block_m, max=T)
    lo = torch.minimum(hi - local_t, m0).clamp(min=0)  # [H, nqb, 1]: at least the block's own rows
    merged = lo <= sink_t
    full_sink = torch.where(merged, torch.zeros_like(sink_t), sink_t // block_n)
    n_win = torch.where(merged, _cdiv_t(hi, block_n), _cdiv_t(hi - lo, block_n))
    win_start = torch.where(merged, torch.zeros_like(lo), lo)
    slot = torch.arange(max_blocks, device=dev).view(1, 1, max_blocks)
    starts = torch.where(slot < full_sink, slot * block_n, win_start + (slot - full_sink) * block_n)
    count = (full_sink + n_win).squeeze(-1)  # [H, nqb]
    starts = torch.where(slot < count[..., None], starts, torch.zeros_like(starts))
    rem0 = full_sink * block_n  # first sink key not in a range (non-merged case)
    n_rem = torch.where(merged, torch.zeros_like(sink_t), sink_t - rem0).squeeze(-1).expand(H, nqb)
    cslot = torch.arange(max_cols, device=dev).view(1, 1, max_cols)
    cols = torch.where(cslot < n_rem[..., None], rem0 + cslot, torch.zeros_like(cslot))
    i32 = torch.int32

    def batch_of(t):
        return t.to(i32).unsqueeze(0).expand(batch, *t.shape).contiguous()

    return batch_of(count), batch_of(starts), batch_of(n_rem), batch_of(cols)


def _cdiv_t(a: torch.Tensor, b: int) -> torch.Tensor:
    return torch.div(a + (b - 1), b, rounding_mode="floor")


def dense_index(batch: int, num_heads: int, T: int, *, block_m: int = 64, block_n: int = 64, device=None) -> Index:
    """Dense causal attention as an index: ranges from key 0 to each query block's end."""
    return a_shape_index(batch, T, 0, T if T > 0 else 1, num_heads=num_heads, block_m=block_m, block_n=block_n,
                         device=device)


def _pad_last(t: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, width - t.shape[-1])) if t.shape[-1] < width else t


def _merge(parts: list, B: int, H: int, nqb: int, device) -> Index:
    """Per-head selection among index sets: ``parts`` is a list of (head_mask [H] bool, index)."""
    i32 = torch.int32
    if len(parts) == 1:
        return tuple(t.to(i32).contiguous() for t in parts[0][1])
    wb = max(p[1][1].shape[-1] for p in parts)
    wc = max(p[1][3].shape[-1] for p in parts)
    bc = torch.zeros(B, H, nqb, dtype=i32, device=device)
    bo = torch.zeros(B, H, nqb, wb, dtype=i32, device=device)
    cc = torch.zeros(B, H, nqb, dtype=i32, device=device)
    ci = torch.zeros(B, H, nqb, wc, dtype=i32, device=device)
    for mask, (c1, o1, c2, o2) in parts:
        m3 = mask.view(1, H, 1)
        m4 = mask.view(1, H, 1, 1)
        bc = torch.where(m3, c1.to(i32), bc)
        bo = torch.where(m4, _pad_last(o1.to(i32), wb), bo)
        cc = torch.where(m3, c2.to(i32), cc)
        ci = torch.where(m4, _pad_last(o2.to(i32), wc), ci)
    return bc, bo, cc, ci


def build_layer_index(q: torch.Tensor, k: torch.Tensor, patterns: Sequence[HeadPattern], *,
                      scale: Optional[float] = None, block_m: int = 64, block_n: int = 64,
                      last_q: int = LAST_Q, index_backend: Optional[str] = None) -> Index:
    """One layer's index for ``block_sparse_attention``, heads with different patterns mixed.

    ``patterns``: one ``HeadPattern`` per query head. Each kind present in the layer is
    estimated once for all heads (heads of other kinds get a zero budget or are discarded),
    and each head takes its own kind's lists; the list widths are padded to the widest kind.
    """
    _check_qk(q, k, "build_layer_index")
    _check_blocks(block_m, block_n, "build_layer_index")
    B, Hq, T, _ = q.shape
    patterns = list(patterns)
    if len(patterns) != Hq:
        raise ValueError(f"build_layer_index: {len(patterns)} patterns for {Hq} query heads")
    dev = q.device
    nqb = _cdiv(T, block_m)
    kinds = [p.kind for p in patterns]
    parts = []

    def mask_of(*names):
        return torch.tensor([kd in names for kd in kinds], device=dev)

    if "vertical_slash" in kinds:
        vs = [p.kind == "vertical_slash" for p in patterns]
        vb = [p.vertical_size if m else 0 for p, m in zip(patterns, vs)]
        sb = [p.slash_size if m else 0 for p, m in zip(patterns, vs)]
        parts.append((mask_of("vertical_slash"), vertical_slash_layer_index(
            q, k, vb, sb, scale=scale, block_m=block_m, block_n=block_n, last_q=last_q, index_backend=index_backend)))
    if "block_sparse" in kinds:
        tb = [p.top_blocks if p.kind == "block_sparse" else 1 for p in patterns]
        parts.append((mask_of("block_sparse"), block_sparse_index(q, k, tb, block_m=block_m, block_n=block_n)))
    if "a_shape" in kinds or "dense" in kinds:
        sink = [p.sink if p.kind == "a_shape" else 0 for p in patterns]
        local = [p.local if p.kind == "a_shape" else max(T, 1) for p in patterns]
        parts.append((mask_of("a_shape", "dense"), a_shape_index(B, T, sink, local, num_heads=Hq, block_m=block_m,
                                                                 block_n=block_n, device=dev)))
    return _merge(parts, B, Hq, nqb, dev)
