"""sae_fast.sparse_attention: pattern configs (MInference JSON) and the online index
estimators, each against an explicit loop implementation on random q, k with odd T, GQA and
batch > 1; full budgets reproduce dense causal attention (the Triton kernel under the
interpreter on small sizes)."""

import json

import pytest
import torch

from sae_fast.ops.attention import block_sparse_attention
from sae_fast.reference.attention import expand_block_sparse_mask
from sae_fast.sparse_attention import (HeadPattern, SparseAttentionConfig, a_shape_index, block_sparse_index,
                                       build_layer_index, dense_index, estimate_vertical_slash,
                                       vertical_slash_layer_index, vertical_slash_scores)

# ----------------------------------------------------------------------------- configs


def test_json_round_trip_and_minference_names(tmp_path):
    layers = [[HeadPattern.vertical_slash(1000, 6096, 0.9), HeadPattern.a_shape(128, 3968, 0.5)],
              [HeadPattern.block_sparse(100, 0.7), HeadPattern.dense()]]
    cfg = SparseAttentionConfig(layers)
    path = cfg.save(tmp_path / "c.json")
    raw = json.loads(path.read_text())
    assert raw[0] == {"0": ["vertical_and_slash", 1000, 6096, 0.9], "1": ["stream_llm", 128, 3968, 0.5]}
    assert raw[1]["0"] == ["block_sparse", 100, 0, 0.7]
    assert SparseAttentionConfig.load(path) == cfg
    # a file as MInference writes it (floats, placeholders, heads out of order)
    mi = [{"1": ["vertical_and_slash", 3500.0, 100, 0.99], "0": ["block_sparse", 64, -1, 0.5]}]
    (tmp_path / "mi.json").write_text(json.dumps(mi))
    got = SparseAttentionConfig.load(tmp_path / "mi.json")
    assert got.layers == [[HeadPattern.block_sparse(64, 0.5), HeadPattern.vertical_slash(3500, 100, 0.99)]]
    assert (got.num_layers, got.num_heads) == (1, 2)


def test_uniform_constructors():
    c = SparseAttentionConfig.vertical_slash(3, 5)
    assert c.num_layers == 3 and c.num_heads == 5 and c.kinds() == {"vertical_slash"}
    assert c[2][4] == HeadPattern("vertical_slash", 1000, 6096)
    assert SparseAttentionConfig.a_shape(1, 2)[0][0] == HeadPattern.a_shape(128, 3968)
    assert SparseAttentionConfig.dense(1, 1).kinds() == {"dense"}
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        SparseAttentionConfig.vertical_slash(2, 0)
    with pytest.raises(ValueError, match="layer 1 has 1 heads"):
        SparseAttentionConfig([[HeadPattern.dense()] * 2, [HeadPattern.dense()]])


@pytest.mark.parametrize("content, match", [
    ('{"0": ["vertical_and_slash", 1, 2, 0.5]}', "expected a non-empty JSON list"),
    ("[]", "expected a non-empty JSON list"),
    ('[["vertical_and_slash", 1, 2, 0.5]]', "layer 0 must be an object"),
    ('[{"a": ["vertical_and_slash", 1, 2, 0.5]}]', "head keys must be decimal strings"),
    ('[{"0": ["vertical_and_slash", 1, 2, 0.5, 7]}]', r"layer 0, head '0': expected \[pattern_name"),
    ('[{"0": ["triangle", 1, 2, 0.5]}]', "unknown pattern name 'triangle'"),
    ('[{"0": ["vertical_and_slash", "1000", 2, 0.5]}]', "vertical_size must be an integer"),
    ('[{"0": ["vertical_and_slash", 1.5, 2, 0.5]}]', "vertical_size must be an integer"),
    ('[{"0": ["vertical_and_slash", 10, 0, 0.5]}]', "slash_size >= 1"),
    ('[{"0": ["stream_llm", -1, 64, 0.5]}]', "sink"),
    ('[{"0": ["block_sparse", 0, 0, 0.5]}]', "key blocks kept"),
    ('[{"0": ["vertical_and_slash", 1, 2, "high"]}]', "search_score must be a finite number"),
    ('[{"0": ["vertical_and_slash", 1, 2, 0.5], "2": ["vertical_and_slash", 1, 2, 0.5]}]', r"heads 0..H-1"),
    ('[{"0": ["dense", 0, 0, 1]}, {"0": ["dense", 0, 0, 1], "1": ["dense", 0, 0, 1]}]', "different head counts"),
    ('[{"0": ["dense", 0, 0, 1]', "not valid JSON"),
])
def test_bad_files_are_refused_with_the_place(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        SparseAttentionConfig.load(path)


def test_head_pattern_validation():
    with pytest.raises(ValueError, match="kind must be one of"):
        HeadPattern("star")
    with pytest.raises(TypeError, match="vertical_size must be an int"):
        HeadPattern("vertical_slash", 1.0, 5)
    with pytest.raises(ValueError, match="local window"):
        HeadPattern.a_shape(4, 0)
    assert HeadPattern.a_shape(4, 8).sink == 4 and HeadPattern.a_shape(4, 8).local == 8
    assert HeadPattern.block_sparse(3).top_blocks == 3


# ----------------------------------------------------------------------------- helpers


def _qk(B=2, Hq=6, Hkv=2, T=149, D=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, T, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, T, D, generator=g, dtype=dtype)
    return q, k, v


def _mask(index, T, bm=64, bn=64):
    return expand_block_sparse_mask(*index, T, T, block_m=bm, block_n=bn)


def _causal(T):
    return torch.ones(T, T, dtype=torch.bool).tril()


# ----------------------------------------------------------------------------- vertical-slash


def _explicit_probe(q, k, last_q, scale):
    """Column and diagonal sums by plain loops over batch, head and diagonal, fp64."""
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    L = min(last_q, T)
    col = torch.zeros(B, Hq, T, dtype=torch.float64)
    dia = torch.zeros(B, Hq, T, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            s = q[b, h, T - L:].double() @ k[b, h // G].double().T * scale
            for r in range(L):
                s[r, T - L + r + 1:] = float("-inf")
            p = torch.softmax(s, -1)
            col[b, h] = p.sum(0)
            for o in range(T):
                dia[b, h, o] = sum(float(p[r, T - L + r - o]) for r in range(L) if T - L + r - o >= 0)
    return col, dia


@pytest.mark.parametrize("T, last_q", [(149, 64), (40, 64), (97, 16)])
def test_vertical_slash_scores_match_explicit_loops(T, last_q):
    q, k, _ = _qk(T=T)
    col, dia = vertical_slash_scores(q, k, last_q=last_q, scale=0.3)
    want_col, want_dia = _explicit_probe(q, k, last_q, 0.3)
    torch.testing.assert_close(col.double(), want_col, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dia.double(), want_dia, atol=1e-5, rtol=1e-5)
    L = min(last_q, T)
    torch.testing.assert_close(col.sum(-1), torch.full_like(col[..., 0], float(L)))  # each row sums to 1


def test_fp16_probe_scales_before_the_products_overflow():
    """fp16 q·k past 65504 is inf (then NaN probabilities outrank every real column); the
    scaled logits here are ~N(0, 7²), well inside fp16, and must match fp64 math."""
    g = torch.Generator().manual_seed(3)
    q = (300 * torch.randn(1, 2, 70, 64, generator=g)).half()
    k = (300 * torch.randn(1, 1, 70, 64, generator=g)).half()
    assert torch.isinf(q[0, 0].float() @ k[0, 0].float().T).logical_not().all()  # finite in fp32...
    assert torch.isinf(q[0, 0] @ k[0, 0].T).any()  # ...but not as fp16 products
    col, dia = vertical_slash_scores(q, k, last_q=16, scale=1e-5)
    want_col, want_dia = _explicit_probe(q, k, 16, 1e-5)
    assert torch.isfinite(col).all() and torch.isfinite(dia).all()
    torch.testing.assert_close(col.double(), want_col, atol=3e-2, rtol=0)
    torch.testing.assert_close(dia.double(), want_dia, atol=3e-2, rtol=0)


def test_vertical_slash_estimate_selects_forced_then_top_scores():
    T = 149
    q, k, _ = _qk(T=T, seed=3)
    budgets_v = [40, 35, 5, 0, 400, 31]
    budgets_s = [110, 120, 3, 1, 500, 100]
    vert, slash = estimate_vertical_slash(q, k, budgets_v, budgets_s)
    col, dia = _explicit_probe(q, k, 64, 16 ** -0.5)
    assert vert.shape == (2, 6, T) and slash.shape == (2, 6, T)  # width clipped to T
    for b in range(2):
        for h in range(6):
            v = vert[b, h][vert[b, h] >= 0].tolist()
            s = slash[b, h][slash[b, h] >= 0].tolist()
            nv, ns = min(budgets_v[h], T), min(budgets_s[h], T)
            assert len(v) == nv and len(s) == ns and len(set(v)) == nv and len(set(s)) == ns
            # forced first (columns from 0, nearest diagonals), then the best of the rest
            assert v[:min(nv, 30)] == list(range(min(nv, 30)))
            assert s[:min(ns, 100)] == list(range(min(ns, 100)))
            rest_v = col[b, h, 30:].argsort(descending=True)[:max(0, nv - 30)] + 30
            rest_s = dia[b, h, 100:].argsort(descending=True)[:max(0, ns - 100)] + 100
            assert set(v[30:]) == set(rest_v.tolist())
            assert set(s[100:]) == set(rest_s.tolist())


def test_vertical_slash_index_covers_the_estimated_pattern():
    """The kernel index (via sae_fast.vertical_slash_index) contains exactly-or-more than the
    pattern: every causal key on a chosen column or diagonal of that row."""
    T = 149
    q, k, _ = _qk(T=T, seed=5)
    vert, slash = estimate_vertical_slash(q, k, 40, 105)
    mask = _mask(vertical_slash_layer_index(q, k, 40, 105), T)
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    for b in range(2):
        for h in range(6):
            V = torch.zeros(T, dtype=torch.bool)
            V[vert[b, h][vert[b, h] >= 0]] = True
            S = torch.zeros(T, dtype=torch.bool)
            S[slash[b, h][slash[b, h] >= 0]] = True
            pattern = (j <= i) & (V[None, :] | S[(i - j).clamp(min=0)])
            assert bool((mask[b, h] >= pattern).all())
            assert not bool((mask[b, h] & ~_causal(T)).any())


# ----------------------------------------------------------------------------- block-sparse


def _explicit_block_sparse(q, k, top, bm, bn):
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    nqb, nkb = -(-T // bm), -(-T // bn)
    mask = torch.zeros(B, Hq, T, T, dtype=torch.bool)
    for b in range(B):
        for h in range(Hq):
            kp = torch.stack([k[b, h // G, j * bn:(j + 1) * bn].double().mean(0) for j in range(nkb)])
            for qb in range(nqb):
                rows = range(qb * bm, min((qb + 1) * bm, T))
                qp = q[b, h, rows.start:rows.stop].double().mean(0)
                sc = kp @ qp
                causal = [j for j in range(nkb) if j * bn <= rows[-1]]
                diag = [j for j in causal if j * bn + bn > rows.start]
                others = sorted((j for j in causal if j not in diag), key=lambda j: -float(sc[j]))
                chosen = (diag + others)[:max(top[h], len(diag))]
                for j in chosen:
                    for i in rows:
                        mask[b, h, i, j * bn:min((j + 1) * bn, i + 1)] = True
    return mask


@pytest.mark.parametrize("T, bm, bn", [(149, 64, 64), (150, 32, 64), (100, 64, 32)])
def test_block_sparse_matches_explicit_selection(T, bm, bn):
    q, k, _ = _qk(T=T, seed=7)
    top = [1, 2, 3, 1, 100, 2]
    index = block_sparse_index(q, k, top, block_m=bm, block_n=bn)
    assert index[3].shape[-1] == 0  # no columns
    got = _mask(index, T, bm, bn)
    torch.testing.assert_close(got, _explicit_block_sparse(q, k, top, bm, bn))
    starts = index[1]
    listed = torch.arange(starts.shape[-1]) < index[0][..., None]
    assert bool(((starts % bn == 0) | ~listed).all())


# ----------------------------------------------------------------------------- A-shape


def _explicit_a_shape(T, sink, local, bm):
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    m0 = (i // bm) * bm
    hi = torch.clamp(m0 + bm, max=T)
    return (j <= i) & ((j < sink) | (j >= torch.minimum(hi - local, m0)))


@pytest.mark.parametrize("sink, local", [(0, 1), (4, 1), (5, 70), (128, 64), (70, 5), (64, 100), (3, 150), (300, 7),
                                         (33, 33), (0, 500)])
@pytest.mark.parametrize("T, bm, bn", [(149, 64, 64), (77, 16, 32), (200, 32, 16)])
def test_a_shape_equals_sink_plus_window_mask(sink, local, T, bm, bn):
    index = a_shape_index(2, T, [sink, 1], [local, 3], block_m=bm, block_n=bn)
    got = _mask(index, T, bm, bn)
    assert got.shape == (2, 2, T, T)
    torch.testing.assert_close(got[1, 0], _explicit_a_shape(T, sink, local, bm))
    torch.testing.assert_close(got[0, 1], _explicit_a_shape(T, 1, 3, bm))
    # every row sees itself, even with a window narrower than a query block (it once saw
    # nothing there: zero output rows)
    assert bool(got.diagonal(dim1=-2, dim2=-1).all())
    # no key listed twice: ranges disjoint and columns outside them
    bc, bo, cc, ci = index
    for qb in range(bc.shape[2]):
        keys = []
        for r in range(int(bc[0, 0, qb])):
            keys += range(int(bo[0, 0, qb, r]), int(bo[0, 0, qb, r]) + bn)
        keys += [int(x) for x in ci[0, 0, qb, :int(cc[0, 0, qb])]]
        assert len(keys) == len(set(keys))


# ----------------------------------------------------------------------------- layers


def test_mixed_layer_takes_each_heads_own_lists():
    T = 149
    q, k, _ = _qk(T=T, seed=11)
    pats = [HeadPattern.vertical_slash(40, 105), HeadPattern.a_shape(5, 70), HeadPattern.block_sparse(2),
            HeadPattern.dense(), HeadPattern.vertical_slash(3, 7), HeadPattern.a_shape(64, 64)]
    got = _mask(build_layer_index(q, k, pats), T)
    for h, p in enumerate(pats):
        alone = _mask(build_layer_index(q, k, [p] * 6), T)
        torch.testing.assert_close(got[:, h], alone[:, h], msg=f"head {h} ({p.kind})")
    assert bool((got[:, 3] == _causal(T)).all())


FULL = [HeadPattern.vertical_slash(10_000, 10_000), HeadPattern.a_shape(0, 10_000), HeadPattern.a_shape(10_000, 1),
        HeadPattern.block_sparse(10_000), HeadPattern.dense()]


@pytest.mark.parametrize("T", [149, 40])
def test_full_budgets_select_every_causal_key(T):
    q, k, _ = _qk(T=T, seed=2)
    for p in FULL:
        assert bool((_mask(build_layer_index(q, k, [p] * 6), T) == _causal(T)).all()), p
    assert bool((_mask(dense_index(2, 6, T), T) == _causal(T)).all())


@pytest.mark.parametrize("pattern", [FULL[0], FULL[1], FULL[3], "mixed"], ids=["vs", "a_shape", "block", "mixed"])
def test_full_budgets_reproduce_dense_attention_with_the_kernel(pattern):
    """The Triton kernel (interpreter on CPU) over the estimated index equals dense causal
    SDPA: B = 2, GQA 6/2, T = 101 (not a multiple of 64)."""
    T = 101
    q, k, v = _qk(T=T, seed=4)
    pats = FULL[:4] + FULL[:2] if pattern == "mixed" else [pattern] * 6
    index = build_layer_index(q, k, pats)
    out, _ = block_sparse_attention(q, k, v, *index, backend="triton")
    want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
                                                            is_causal=True)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)


def test_sparse_budgets_attend_to_the_pattern_only():
    """A sparse A-shape through the kernel equals softmax over the explicit mask."""
    T = 101
    q, k, v = _qk(T=T, seed=9)
    index = build_layer_index(q, k, [HeadPattern.a_shape(7, 20)] * 6, block_m=32, block_n=16)
    out, _ = block_sparse_attention(q, k, v, *index, block_m=32, block_n=16, backend="triton")
    m = _explicit_a_shape(T, 7, 20, 32)
    want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
                                                            attn_mask=m)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)


def test_bf16_inputs_and_strided_views():
    q, k, _ = _qk(T=90, dtype=torch.bfloat16)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, T, H, D] memory read as SDPA layout
    a = build_layer_index(qt, k, [HeadPattern.vertical_slash(10, 20)] * 6)
    b = build_layer_index(q, k, [HeadPattern.vertical_slash(10, 20)] * 6)
    for x, y in zip(a, b):
        assert torch.equal(x, y) and x.dtype == torch.int32


def test_estimator_errors():
    q, k, _ = _qk(T=50)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        build_layer_index(q, k[:, :1].expand(2, 4, 50, 16), [HeadPattern.dense()] * 6)
    with pytest.raises(ValueError, match="as many keys as queries"):
        build_layer_index(q, k[:, :, :40], [HeadPattern.dense()] * 6)
    with pytest.raises(ValueError, match="5 patterns for 6 query heads"):
        build_layer_index(q, k, [HeadPattern.dense()] * 5)
    with pytest.raises(ValueError, match="vertical_size must be a non-negative int"):
        estimate_vertical_slash(q, k, -1, 5)
    with pytest.raises(ValueError, match="one per query head"):
        estimate_vertical_slash(q, k, [1, 2], 5)
    with pytest.raises(ValueError, match="block_n must be one of"):
        build_layer_index(q, k, [HeadPattern.dense()] * 6, block_n=48)
    with pytest.raises(ValueError, match="block_m must be one of"):
        a_shape_index(1, 50, 4, 8, block_m=8)
    with pytest.raises(TypeError, match="floating point"):
        build_layer_index(q.long(), k.long(), [HeadPattern.dense()] * 6)
