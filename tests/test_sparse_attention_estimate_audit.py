"""Audit of the online sparse-attention estimates (``sae_fast.sparse_attention.estimate``)
against MInference's documented semantics, by a brute-force fp64 re-implementation written
here: the last-q probe with the causal mask inside the final square, column and diagonal
sums, the forced first columns and nearest diagonals (diagonal 0 first), per-head budgets
(0, below the forced set, past T), GQA (each query head scores its own kv head's keys), B > 1,
T not a multiple of 64 and T smaller than last_q; non-finite inputs; and the operator's index
contract for every builder (sorted, in range, disjoint, every row sees itself)."""

import math

import pytest
import torch

from sae_fast.reference.attention import expand_block_sparse_mask
from sae_fast.sparse_attention import (HeadPattern, block_sparse_index, build_layer_index, estimate_vertical_slash,
                                       vertical_slash_layer_index, vertical_slash_scores)
from sae_fast.sparse_attention.estimate import FORCED_SLASHES, FORCED_VERTICALS


def _qk(B, Hq, Hkv, T, D=8, seed=0, scale_q=1.0):
    g = torch.Generator().manual_seed(seed)
    q = scale_q * torch.randn(B, Hq, T, D, generator=g)
    k = torch.randn(B, Hkv, T, D, generator=g)
    return q, k


# ----------------------------------------------------------------------------- fp64 brute force


def _fp64_probe(q, k, last_q, scale):
    """Column / diagonal sums of the probe, one (b, h, probe row, key) at a time in fp64.
    Query head h reads kv head h // (Hq / Hkv). A row with a non-finite logit is skipped."""
    B, Hq, T, _ = q.shape
    G = Hq // k.shape[1]
    L = min(last_q, T)
    col = torch.zeros(B, Hq, T, dtype=torch.float64)
    dia = torch.zeros(B, Hq, T, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            kk = k[b, h // G].double()
            for i in range(T - L, T):
                logits = [float(q[b, h, i].double() @ kk[j]) * scale for j in range(i + 1)]  # keys j <= i
                if not all(math.isfinite(x) for x in logits):
                    continue
                top = max(logits)
                e = [math.exp(x - top) for x in logits]
                z = sum(e)
                for j in range(i + 1):
                    col[b, h, j] += e[j] / z
                    dia[b, h, i - j] += e[j] / z
    return col, dia


def _assert_selection(got, scores, budget, forced, T, what, tol=1e-5):
    """``got``: one head's list (best first, -1 padding). Forced entries 0..f-1 come first in
    that order; the rest are the best-scoring others (ties within ``tol`` either way)."""
    n = min(budget, T)
    f = min(forced, T)
    chosen = [int(x) for x in got if x >= 0]
    assert len(chosen) == n and len(set(chosen)) == n, (what, chosen)
    assert all(int(x) == -1 for x in got[n:]), what
    assert chosen[:min(n, f)] == list(range(min(n, f))), (what, chosen[:f])
    rest = chosen[min(n, f):]
    assert all(f <= x < T for x in rest), (what, rest)
    if rest:
        others = scores[f:]
        t = float(others.sort(descending=True).values[len(rest) - 1])
        assert all(float(scores[x]) >= t - tol for x in rest), (what, rest)
        must = {int(i) + f for i in (others > t + tol).nonzero().flatten()}
        assert must <= set(rest), (what, sorted(must - set(rest)))


@pytest.mark.parametrize("B, Hq, Hkv, T, last_q", [
    (2, 6, 2, 150, 64),  # GQA 3, T not a multiple of 64
    (1, 4, 1, 37, 64),   # T smaller than last_q: the whole causal matrix is the probe
    (2, 2, 2, 65, 64),   # one row past a block
    (1, 3, 1, 64, 1),    # a single probe row
    (2, 4, 2, 130, 100),
])
def test_probe_and_selection_match_fp64_brute_force(B, Hq, Hkv, T, last_q):
    q, k = _qk(B, Hq, Hkv, T, seed=T + Hq)
    scale = 0.45
    col, dia = vertical_slash_scores(q, k, scale=scale, last_q=last_q)
    want_col, want_dia = _fp64_probe(q, k, last_q, scale)
    torch.testing.assert_close(col.double(), want_col, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(dia.double(), want_dia, atol=2e-6, rtol=2e-6)
    # budgets per head: none, below the forced sets, between, past T
    vb = [0, 7, 45, 10_000, 31, 3][:Hq]
    sb = [1, 60, 140, 10_000, 2, 101][:Hq]
    vert, slash = estimate_vertical_slash(q, k, vb, sb, scale=scale, last_q=last_q)
    for b in range(B):
        for h in range(Hq):
            _assert_selection(vert[b, h], want_col[b, h], vb[h], FORCED_VERTICALS, T, ("vertical", b, h))
            _assert_selection(slash[b, h], want_dia[b, h], sb[h], FORCED_SLASHES, T, ("slash", b, h))


def test_each_query_head_of_a_group_gets_its_own_estimate():
    """GQA: the query heads sharing a kv head are not pooled; each ranks by its own queries."""
    q, k = _qk(1, 2, 1, 200, seed=4)
    g = torch.Generator().manual_seed(5)
    q[0, 1] = 3 * torch.randn(200, 8, generator=g)
    vert, _ = estimate_vertical_slash(q, k, 60, 1, forced_verticals=0)
    solo0, _ = estimate_vertical_slash(q[:, :1], k, 60, 1, forced_verticals=0)
    solo1, _ = estimate_vertical_slash(q[:, 1:], k, 60, 1, forced_verticals=0)
    assert torch.equal(vert[:, :1], solo0) and torch.equal(vert[:, 1:], solo1)
    assert set(vert[0, 0].tolist()) != set(vert[0, 1].tolist())


# ----------------------------------------------------------------------------- non-finite inputs


def _row_sees_itself(index, T, bm=64, bn=64):
    mask = expand_block_sparse_mask(*index, T, T, block_m=bm, block_n=bn)
    return mask.diagonal(dim1=-2, dim2=-1)


def test_a_non_finite_probe_row_does_not_push_out_the_forced_entries():
    """One query row of the probe with a NaN (or inf): its softmax row is NaN. The NaN column
    and diagonal sums used to outrank the forced sinks and diagonal 0 (topk puts NaN first), so
    the chosen slashes were far diagonals and most rows of the sequence saw no key at all. Now
    that row contributes nothing: the choice is the brute-force one over the finite rows."""
    T = 150
    q, k = _qk(1, 2, 1, T, seed=1)
    q[0, 0, T - 5] = float("nan")
    q[0, 1, T - 9, 3] = float("inf")
    vb, sb = [5, 40], [3, 105]
    vert, slash = estimate_vertical_slash(q, k, vb, sb)
    want_col, want_dia = _fp64_probe(q, k, 64, 8 ** -0.5)
    for h in range(2):
        _assert_selection(vert[0, h], want_col[0, h], vb[h], FORCED_VERTICALS, T, ("vertical", h))
        _assert_selection(slash[0, h], want_dia[0, h], sb[h], FORCED_SLASHES, T, ("slash", h))
    assert bool(_row_sees_itself(vertical_slash_layer_index(q, k, vb, sb), T).all())


def test_a_non_finite_key_leaves_the_forced_entries():
    """A NaN key before the probe poisons every probe row; the estimate then has no information
    but still keeps the sinks and the nearest diagonals (diagonal 0 first)."""
    T = 140
    q, k = _qk(2, 2, 1, T, seed=2)
    k[1, 0, 20] = float("nan")
    vert, slash = estimate_vertical_slash(q, k, 4, 2)
    assert vert[1].tolist() == [[0, 1, 2, 3]] * 2 and slash[1].tolist() == [[0, 1]] * 2
    col, dia = vertical_slash_scores(q, k)
    assert bool(torch.isfinite(col).all() and torch.isfinite(dia).all())
    assert float(col[1].abs().max()) == 0.0  # no finite probe row in batch 1
    torch.testing.assert_close(col[0].sum(-1), torch.full((2,), 64.0))  # batch 0 untouched


@pytest.mark.parametrize("where", ["nan_query_row", "inf_key", "nan_key"])
def test_block_sparse_keeps_the_diagonal_block_whatever_the_scores(where):
    """A NaN pooled score (a NaN query row) outranked the diagonal block's +inf marker in topk,
    and an inf key gave +inf scores tied with it: with a budget of one block, query blocks lost
    their own rows (rows saw only earlier blocks). Non-finite scores now rank below finite ones
    (+inf above them), always below the diagonal."""
    T = 200
    q, k = _qk(1, 2, 1, T, seed=3)
    q = q.abs()  # positive pooled queries: an inf key entry gives +inf scores, not NaN
    if where == "nan_query_row":
        q[0, 0, 70] = float("nan")
    elif where == "inf_key":
        k[0, 0, 3, 0] = float("inf")
    else:
        k[0, 0, 130] = float("nan")
    for bm, bn in [(64, 64), (32, 64), (64, 16)]:
        index = block_sparse_index(q, k, [1, 2], block_m=bm, block_n=bn)
        mask = expand_block_sparse_mask(*index, T, T, block_m=bm, block_n=bn)
        assert bool(mask.diagonal(dim1=-2, dim2=-1).all()), (where, bm, bn)
        bc, bo = index[0], index[1]
        nqb = bc.shape[-1]
        for qb in range(nqb):
            m0, last = qb * bm, min(qb * bm + bm, T) - 1
            n_diag = len([j for j in range(0, last + 1, bn) if j + bn > m0])
            n_causal = len(range(0, last + 1, bn))
            assert int(bc[0, 0, qb]) == min(max(1, n_diag), n_causal)
            assert int(bc[0, 1, qb]) == min(max(2, n_diag), n_causal)
    if where == "inf_key":
        # +inf is the best non-diagonal score: head 1's second block is key block 0
        index = block_sparse_index(q, k, [1, 2])
        assert [int(x) for x in index[1][0, 1, 2, :2]] == [0, 128]


# ----------------------------------------------------------------------------- index contract


def _check_contract(index, B, H, T, bm, bn, what):
    """The block_sparse_attention / vertical_slash_index contract: int32 contiguous; per query
    block, range starts strictly ascending and >= block_n apart, in [0, m1); columns strictly
    ascending, in [0, m1), outside every range; zeros past the counts; each row sees itself."""
    bc, bo, cc, ci = index
    nqb = -(-T // bm)
    assert all(t.dtype == torch.int32 and t.is_contiguous() for t in index), what
    assert bc.shape == (B, H, nqb) and cc.shape == (B, H, nqb) and bo.shape[:3] == ci.shape[:3] == (B, H, nqb)
    for b in range(B):
        for h in range(H):
            for qb in range(nqb):
                m0, m1 = qb * bm, min(qb * bm + bm, T)
                n, c = int(bc[b, h, qb]), int(cc[b, h, qb])
                assert 0 <= n <= bo.shape[-1] and 0 <= c <= ci.shape[-1], what
                starts, cols = bo[b, h, qb, :n].tolist(), ci[b, h, qb, :c].tolist()
                assert not bo[b, h, qb, n:].any() and not ci[b, h, qb, c:].any(), what
                assert all(0 <= s < m1 for s in starts) and all(0 <= j < m1 for j in cols), (what, qb, starts, cols)
                assert all(y >= x + bn for x, y in zip(starts, starts[1:])), (what, qb, starts)
                assert all(y > x for x, y in zip(cols, cols[1:])), (what, qb, cols)
                assert not any(s <= j < s + bn for j in cols for s in starts), (what, qb)
                for i in range(m0, m1):
                    assert i in cols or any(s <= i < s + bn for s in starts), (what, "row", i)


@pytest.mark.parametrize("T, bm, bn, last_q", [(1, 64, 64, 64), (17, 16, 16, 64), (100, 16, 64, 16),
                                               (130, 128, 16, 64), (150, 32, 32, 200), (64, 64, 128, 1)])
def test_every_builder_satisfies_the_index_contract(T, bm, bn, last_q):
    q, k = _qk(2, 6, 2, T, seed=T)
    q[1, 2, -1] = float("nan")  # a non-finite probe row in one head
    pats = [HeadPattern.vertical_slash(0, 1), HeadPattern.vertical_slash(3, 2), HeadPattern.a_shape(5, 3),
            HeadPattern.block_sparse(1), HeadPattern.dense(), HeadPattern.a_shape(40, 70)]
    _check_contract(build_layer_index(q, k, pats, block_m=bm, block_n=bn, last_q=last_q), 2, 6, T, bm, bn, "mixed")
    for p in pats:
        _check_contract(build_layer_index(q, k, [p] * 6, block_m=bm, block_n=bn, last_q=last_q), 2, 6, T, bm, bn, p)


# ----------------------------------------------------------------------------- autograd


def test_estimates_keep_no_autograd_graph_in_a_grad_enabled_prefill():
    """A prefill with grad enabled (a plain ``model(ids)``) handed the estimates q and k that
    require grad: the probe's softmax outputs of every kv-head chunk were saved for a backward
    that never comes (the indices are integers), so all chunks' [B, h, L, T] buffers stayed
    alive together and the chunk bound on them did not hold."""
    q, k = _qk(1, 6, 2, 150, seed=6)
    q.requires_grad_(True)
    k.requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    pats = [HeadPattern.vertical_slash(5, 7), HeadPattern.block_sparse(1), HeadPattern.a_shape(3, 9)] * 2
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        index = build_layer_index(q, k, pats)
        col, dia = vertical_slash_scores(q, k)
    assert saved == []
    assert col.grad_fn is None and dia.grad_fn is None and not col.requires_grad
    want = build_layer_index(q.detach(), k.detach(), pats)
    assert all(torch.equal(a, b) for a, b in zip(index, want))
