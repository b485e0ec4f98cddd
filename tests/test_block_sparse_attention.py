"""block_sparse_attention: MInference-style ranges + columns, forward (out, lse) and backward,
against dense attention over the expanded mask (fp32/fp64 reference) and SDPA; empty rows,
unaligned and diagonal-crossing ranges, columns, GQA, odd T != S, per-(b, h) patterns,
strided inputs, fp16/bf16, determinism, the backward's tile plan, opcheck, compile, bad
input, FlexAttention block masks. CPU: Triton under the interpreter (small shapes: it runs
programs one at a time), the GPU tier at real lengths."""

import math
import os
import random

import pytest
import torch
import torch.nn.functional as F

from sae_fast.ops import attention as ops
from sae_fast.ops.attention import (block_mask_attention, block_sparse_attention, block_sparse_attention_backward_op,
                                    block_sparse_attention_op)
from sae_fast.reference import attention as ref

from helpers import rel_err

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = [pytest.param("reference", "cpu", id="reference")]
if INTERP:
    BACKENDS.append(pytest.param("triton", "cpu", id="triton-interp"))
BACKENDS.append(pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.gpu))


# ------------------------------------------------------------------------------- index makers


def make_index(B, H, T, S, *, block_m=64, block_n=64, max_blocks=3, max_cols=12, seed=0, causal=True,
               empty=(), dtype=torch.int32, garbage=True):
    """Random per-(b, h, qb) patterns with the caller's guarantee (no key listed twice in a
    block): unaligned ranges, one near the diagonal in most blocks (slash-like), ranges that
    leave [0, S), columns outside the ranges (some >= S: ignored), garbage past the counts.
    ``empty``: (b, h, qb) triples that list nothing."""
    rng = random.Random(seed)
    nqb = -(-T // block_m)
    bc = torch.zeros(B, H, nqb, dtype=torch.int64)
    cc = torch.zeros(B, H, nqb, dtype=torch.int64)
    bo = torch.zeros(B, H, nqb, max(max_blocks, 0), dtype=torch.int64)
    ci = torch.zeros(B, H, nqb, max(max_cols, 0), dtype=torch.int64)
    for b in range(B):
        for h in range(H):
            for qb in range(nqb):
                if (b, h, qb) in empty:
                    starts, cols = [], []
                else:
                    n = rng.randint(0, max_blocks)
                    diag = qb * block_m + (S - T) if causal else rng.randint(0, S)
                    s = diag - rng.randint(block_n // 4, 3 * block_n // 2) if rng.random() < 0.8 else rng.randint(-20, S)
                    starts = []
                    for _ in range(n):
                        starts.append(s)
                        s = s - block_n - rng.randint(0, 40)  # walk left, disjoint
                    covered = {j for s in starts for j in range(s, s + block_n)}
                    pool = [j for j in range(0, S + 8) if j not in covered]
                    cols = sorted(rng.sample(pool, min(len(pool), rng.randint(0, max_cols))))
                bc[b, h, qb] = len(starts)
                cc[b, h, qb] = len(cols)
                if garbage:
                    bo[b, h, qb] = torch.randint(-10**6, 10**6, (bo.shape[-1],))
                    ci[b, h, qb] = torch.randint(-10**6, 10**6, (ci.shape[-1],))
                bo[b, h, qb, :len(starts)] = torch.tensor(starts, dtype=torch.int64)
                ci[b, h, qb, :len(cols)] = torch.tensor(cols, dtype=torch.int64)
    return bc.to(dtype), bo.to(dtype), cc.to(dtype), ci.to(dtype)


def full_index(B, H, T, S, block_m=64, block_n=64):
    """Every key, as aligned ranges."""
    nqb, nkb = -(-T // block_m), -(-S // block_n)
    bc = torch.full((B, H, nqb), nkb, dtype=torch.int32)
    bo = (torch.arange(nkb, dtype=torch.int32) * block_n).expand(B, H, nqb, nkb).contiguous()
    return bc, bo, torch.zeros(B, H, nqb, dtype=torch.int32), torch.zeros(B, H, nqb, 0, dtype=torch.int32)


def qkv(B, Hq, Hkv, T, S, D, dtype=torch.float32, device="cpu", strided=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if strided:  # [B, T, H, D] storage viewed as [B, H, T, D]
        q = torch.randn(B, T, Hq, D, generator=g).transpose(1, 2)
        k = torch.randn(B, S, Hkv, D, generator=g).transpose(1, 2)
        v = torch.randn(B, S, Hkv, D, generator=g).transpose(1, 2)
    else:
        q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in ((Hq, T), (Hkv, S), (Hkv, S)))
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]


def _grads(out, lse, inputs, g, gl):
    loss = (out.float() * g).sum() + (torch.where(torch.isfinite(lse), lse, 0).float() * gl).sum()
    return torch.autograd.grad(loss, inputs)


def _ref64(q, k, v, idx, **kw):
    """fp64 reference with gradients (the ground truth)."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out, lse = ref.block_sparse_attention(*leaves, *idx, **kw)
    return leaves, out, lse


# ------------------------------------------------------------------------------- reference


def test_expanded_mask_matches_explicit_loops():
    B, H, T, S = 2, 3, 37, 45
    idx = make_index(B, H, T, S, block_m=16, block_n=16, max_blocks=3, max_cols=5, seed=3)
    bc, bo, cc, ci = (t.long() for t in idx)
    for causal in (True, False):
        mask = ref.expand_block_sparse_mask(*idx, T, S, causal=causal, block_m=16, block_n=16)
        want = torch.zeros(B, H, T, S, dtype=torch.bool)
        for b in range(B):
            for h in range(H):
                for i in range(T):
                    qb = i // 16
                    keys = {s + j for s in bo[b, h, qb, :bc[b, h, qb]].tolist() for j in range(16)}
                    keys |= set(ci[b, h, qb, :cc[b, h, qb]].tolist())
                    for j in keys:
                        if 0 <= j < S and (not causal or j <= i + S - T):
                            want[b, h, i, j] = True
        assert torch.equal(mask, want)


def test_reference_gradcheck_fp64():
    """The reference's explicit backward (including the lse gradient) against finite
    differences."""
    B, Hq, Hkv, T, S, D = 1, 2, 1, 20, 23, 8
    idx = make_index(B, Hq, T, S, block_m=16, block_n=16, max_blocks=2, max_cols=4, seed=1, empty={(0, 1, 0)})
    q, k, v = (t.detach().double().requires_grad_() for t in qkv(B, Hq, Hkv, T, S, D))

    def f(q, k, v):
        out, lse = block_sparse_attention(q, k, v, *idx, block_m=16, block_n=16, backend="reference")
        return out, torch.where(torch.isfinite(lse), lse, 0)

    assert torch.autograd.gradcheck(f, (q, k, v), fast_mode=True)


# ---------------------------------------------------------------------------- forward/backward


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_full_mask_is_dense_sdpa(backend, device):
    """Every key listed: the causal result is SDPA's is_causal one (T == S), and the
    non-causal one plain SDPA, gradients included."""
    B, H, T, D = 1, 2, 100, 64
    q, k, v = qkv(B, H, H, T, T, D, device=device)
    idx = [t.to(device) for t in full_index(B, H, T, T)]
    for causal in (True, False):
        out, lse = block_sparse_attention(q, k, v, *idx, causal=causal, backend=backend)
        want = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        assert rel_err(out, want) < 2e-6
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
        if causal:
            scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=device).triu(1), float("-inf"))
        assert rel_err(lse, torch.logsumexp(scores, -1)) < 2e-6
        if causal:
            g = torch.randn_like(out)
            got = torch.autograd.grad(out, (q, k, v), g)
            exp = torch.autograd.grad(want, (q, k, v), g)
            for a, e, name in zip(got, exp, "qkv"):
                assert rel_err(a, e) < 1e-5, name


CASES = {
    # B, Hq, Hkv, T, S, D, strided, empty (b, h, qb) blocks
    "gqa2-odd-strided": (2, 4, 2, 150, 170, 64, True, {(0, 1, 1), (1, 3, 2)}),
    "mqa-T>S": (1, 4, 1, 130, 100, 64, False, {(0, 2, 0)}),
}


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_with_gradients(backend, device, case):
    """Random per-(b, h, qb) patterns (unaligned ranges crossing the diagonal or leaving
    [0, S), columns, empty blocks, garbage past the counts) in fp32 against the fp64
    reference: out, lse and the gradients of both with respect to q, k and v."""
    B, Hq, Hkv, T, S, D, strided, empty = CASES[case]
    idx = list(make_index(B, Hq, T, S, seed=list(CASES).index(case), empty=empty))
    idx[0] = idx[0].long()  # mixed int32 / int64 indices
    n = int(idx[0][0, 0, 0])
    idx[0][0, 0, 0] = 99  # a count beyond MAX_BLOCKS: clipped to it
    idx[1][0, 0, 0, n:] = 10**6  # the extra ranges lie past S
    idx = [t.to(device) for t in idx]
    q, k, v = qkv(B, Hq, Hkv, T, S, D, device=device, strided=strided)
    assert not q.is_contiguous() or not strided
    out, lse = block_sparse_attention(q, k, v, *idx, backend=backend)
    leaves, want, want_lse = _ref64(q, k, v, idx)
    assert out.shape == q.shape and lse.shape == q.shape[:3] and lse.dtype == torch.float32
    assert rel_err(out, want) < 2e-6
    empty_rows = torch.isinf(want_lse)
    assert empty_rows.any() and (~empty_rows).any()
    assert torch.equal(torch.isinf(lse), empty_rows) and (lse[empty_rows] < 0).all()
    assert rel_err(torch.where(empty_rows, 0, lse), torch.where(empty_rows, 0, want_lse)) < 2e-6
    assert (out[empty_rows] == 0).all()
    g, gl = torch.randn_like(out), torch.randn_like(lse)
    got = _grads(out, lse, (q, k, v), g, gl)
    exp = _grads(want, want_lse, leaves, g.double(), gl.double())
    for a, e, name in zip(got, exp, "qkv"):
        assert a.shape == e.shape
        assert rel_err(a, e) < 1e-5, name
    assert (got[0][empty_rows] == 0).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_rows_zero_out_and_gradients(backend, device):
    """Rows that see nothing (no entries, or only keys right of the diagonal / past S):
    out 0, lse -inf, no NaN anywhere, zero gradients; keys nobody sees get zero dK/dV."""
    B, H, T, S, D = 1, 2, 70, 90, 64
    nqb = 2
    bc = torch.tensor([[[0, 1], [1, 0]]], dtype=torch.int32)
    # causal, S - T = 20: row i sees keys j <= i + 20. Head 0: block 0 lists nothing, block 1
    # the range 85.. (keys 85..89), which row 64 cannot see yet. Head 1: a range past S, nothing.
    bo = torch.tensor([[[[0], [85]], [[200], [0]]]], dtype=torch.int32)
    cc = torch.zeros(B, H, nqb, dtype=torch.int32)
    ci = torch.zeros(B, H, nqb, 1, dtype=torch.int32)
    idx = [t.to(device) for t in (bc, bo, cc, ci)]
    q, k, v = qkv(B, H, 1, T, S, D, device=device)
    out, lse = block_sparse_attention(q, k, v, *idx, backend=backend)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    seen = torch.zeros(B, H, T, dtype=torch.bool)
    seen[0, 0, 65:] = True
    seen = seen.to(device)
    assert (out[~seen] == 0).all() and torch.isneginf(lse[~seen]).all() and torch.isfinite(lse[seen]).all()
    dq, dk, dv = torch.autograd.grad(out.sum() + torch.where(seen, lse, 0).sum(), (q, k, v))
    for t in (dq, dk, dv):
        assert torch.isfinite(t).all()
    assert (dq[~seen] == 0).all() and (dq[seen] != 0).any()
    assert (dk[:, :, :85] == 0).all() and (dv[:, :, :85] == 0).all() and (dv[:, :, 85:] != 0).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_a_nan_query_row_reports_nan_not_empty(backend, device):
    """A NaN in one query row makes that row's scores NaN: out and lse are NaN there (-inf
    means "saw no key", which it did), every other row is untouched."""
    B, H, T, D = 1, 2, 70, 64
    q, k, v = qkv(B, H, 1, T, T, D, device=device)
    idx = [t.to(device) for t in make_index(B, H, T, T, max_blocks=2, max_cols=4, seed=3)]
    clean_out, clean_lse = block_sparse_attention(q, k, v, *idx, backend=backend)
    r = int(torch.isfinite(clean_lse[0, 1]).nonzero()[3])  # a row that sees keys
    q = q.detach().clone()
    q[0, 1, r, 7] = float("nan")
    out, lse = block_sparse_attention(q, k, v, *idx, backend=backend)
    assert torch.isnan(lse[0, 1, r]) and torch.isnan(out[0, 1, r]).all()
    other = torch.ones(B, H, T, dtype=torch.bool, device=device)
    other[0, 1, r] = False
    assert torch.equal(lse[other], clean_lse[other]) and torch.equal(out[other], clean_out[other])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_columns_only_and_non_causal(backend, device):
    """No ranges at all (MAX_BLOCKS = 0), columns only, causal and not."""
    B, Hq, Hkv, T, S, D = 1, 2, 1, 80, 75, 64
    bc, bo, cc, ci = make_index(B, Hq, T, S, max_blocks=0, max_cols=20, seed=5)
    assert bo.shape[-1] == 0 and (cc > 0).any()
    idx = [t.to(device) for t in (bc, bo, cc, ci)]
    q, k, v = qkv(B, Hq, Hkv, T, S, D, device=device)
    for causal in (False, True):
        out, lse = block_sparse_attention(q, k, v, *idx, causal=causal, backend=backend)
        leaves, want, want_lse = _ref64(q, k, v, idx, causal=causal)
        assert rel_err(out, want) < 2e-6
        g = torch.randn_like(out)
        for a, e in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(want, leaves, g.double())):
            assert rel_err(a, e) < 1e-5


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, device, dtype):
    """fp16 / bf16 inputs (fp32 accumulation, P and dS rounded to the input dtype, as flash
    attention): relative RMS error against the fp64 reference of the same rounded inputs."""
    B, Hq, Hkv, T, S, D = 1, 2, 1, 100, 120, 64
    idx = [t.to(device) for t in make_index(B, Hq, T, S, seed=11)]
    q, k, v = qkv(B, Hq, Hkv, T, S, D, dtype=dtype, device=device)
    out, lse = block_sparse_attention(q, k, v, *idx, backend=backend)
    assert out.dtype == dtype and lse.dtype == torch.float32
    leaves, want, want_lse = _ref64(q, k, v, idx)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert rel_err(out, want) < tol
    fin = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), fin) and rel_err(lse[fin], want_lse[fin]) < tol / 4
    g = torch.randn_like(out, dtype=torch.float32)
    got = torch.autograd.grad(out.float(), (q, k, v), g)
    exp = torch.autograd.grad(want, leaves, g.double())
    for a, e, name in zip(got, exp, "qkv"):
        assert a.dtype == dtype
        assert rel_err(a, e) < 4 * tol, name


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] == "triton"])
def test_backward_is_deterministic(backend, device):
    """Two backward passes are bitwise equal (no float atomics on the default path);
    deterministic=False (dQ by atomics in the dK/dV pass) agrees to rounding."""
    B, Hq, Hkv, T, S, D = 1, 2, 1, 100, 100, 64
    idx = [t.to(device) for t in make_index(B, Hq, T, S, seed=7, max_cols=20)]
    q, k, v = qkv(B, Hq, Hkv, T, S, D, device=device)
    out, lse = block_sparse_attention(q, k, v, *idx, backend=backend)
    g = torch.randn_like(out)
    args = (g, None, q.detach(), k.detach(), v.detach(), out.detach(), lse, *idx, True, D ** -0.5, 64, 64)
    first = block_sparse_attention_backward_op(*args, True, backend)
    second = block_sparse_attention_backward_op(*args, True, backend)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    loose = block_sparse_attention_backward_op(*args, False, backend)
    for a, b in zip(first, loose):
        assert rel_err(b, a) < 1e-6


def test_backward_plan_covers_each_pair_once():
    """The dK/dV tile lists (built with sorts and prefix sums) reproduce the mask exactly,
    every (row, key) pair in one entry only; block_n = 128 ranges span three 64-key tiles."""
    from sae_fast.triton_kernels.block_sparse_attention import TILE_N, build_backward_plan

    B, Hq, Hkv, T, S = 2, 4, 2, 150, 300
    for bm, bn, causal in ((64, 64, True), (32, 128, True), (64, 64, False)):
        idx = make_index(B, Hq, T, S, block_m=bm, block_n=bn, max_blocks=3, max_cols=30, seed=bn + bm, causal=causal)
        plan = build_backward_plan(*idx, T, S, Hkv, causal=causal, block_m=bm, block_n=bn)
        G, nqb, nkb = Hq // Hkv, -(-T // bm), plan["nkb"]
        ntt = nkb + plan["nct"]
        cover = torch.zeros(B, Hq, T, S, dtype=torch.int32)
        off = plan["tile_off"].tolist()
        assert off[-1] <= plan["ent_qb"].numel() and off == sorted(off)
        for gtile in range(B * Hkv * ntt):
            bkv, t = divmod(gtile, ntt)
            b, kvh = divmod(bkv, Hkv)
            for e in range(off[gtile], off[gtile + 1]):
                h = kvh * G + int(plan["ent_head"][e])
                qb = int(plan["ent_qb"][e])
                words = plan["ent_bits"][e].tolist()
                for slot in range(TILE_N):
                    if not (words[slot // 32] >> (slot % 32)) & 1:
                        continue
                    key = t * TILE_N + slot if t < nkb else int(plan["col_keys"][bkv, (t - nkb) * TILE_N + slot])
                    assert 0 <= key < S
                    cover[b, h, qb * bm:(qb + 1) * bm, key] += 1
        mask = ref.expand_block_sparse_mask(*idx, T, S, causal=causal, block_m=bm, block_n=bn)
        rows = torch.arange(T)[:, None]
        lim = (rows + S - T) if causal else torch.full_like(rows, S)
        seen = cover * (torch.arange(S)[None, :] <= lim)
        assert seen.max() <= 1
        assert torch.equal(seen.bool(), mask)
        keys = plan["col_keys"]
        assert torch.equal(plan["slot_of_key"].ne(-1).sum(1), keys.ne(-1).sum(1))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ranges_at_the_diagonal_and_the_end(backend, device):
    """Ranges whose last key is exactly the first row's last visible key, or one past it
    (the kernel's unmasked fast path must not take the latter), ending at S or one past it,
    starting below 0; columns at the same edges."""
    B, H, T, S, D = 1, 4, 64, 160, 64  # one query block, S - T = 96: row 0 sees keys <= 96
    bc = torch.tensor([[[1], [1], [2], [1]]])
    # head 0 ends at row 0's last key, head 1 one past it; head 2 ends at S - 1 (and starts
    # below 0), head 3 one past S - 1 (the non-causal edge cases)
    bo = torch.tensor([[[[33, 0]], [[34, 0]], [[96, -40]], [[97, 0]]]])
    cc = torch.tensor([[[2], [0], [0], [2]]])
    ci = torch.tensor([[[[97, 98]], [[0, 0]], [[0, 0]], [[0, 1]]]])  # 97: one past row 0's last key
    idx = [t.to(device) for t in (bc, bo, cc, ci)]
    q, k, v = qkv(B, H, 1, T, S, D, device=device)
    for causal in (True, False):
        out, lse = block_sparse_attention(q, k, v, *idx, causal=causal, backend=backend)
        leaves, want, _ = _ref64(q, k, v, idx, causal=causal)
        assert rel_err(out, want) < 2e-6
        g = torch.randn_like(out)
        for a, e in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(want, leaves, g.double())):
            assert rel_err(a, e) < 1e-5


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_head_dim_not_a_power_of_two(backend, device):
    """D = 40 runs on 64-wide tiles with the padding masked; block sizes 32 x 16."""
    B, Hq, Hkv, T, S, D = 1, 2, 2, 45, 50, 40
    idx = [t.to(device) for t in make_index(B, Hq, T, S, block_m=32, block_n=16, max_blocks=3, max_cols=6, seed=4)]
    q, k, v = qkv(B, Hq, Hkv, T, S, D, device=device)
    out, lse = block_sparse_attention(q, k, v, *idx, block_m=32, block_n=16, scale=0.2, backend=backend)
    leaves, want, want_lse = _ref64(q, k, v, idx, block_m=32, block_n=16, scale=0.2)
    assert rel_err(out, want) < 2e-6
    g = torch.randn_like(out)
    for a, e in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(want, leaves, g.double())):
        assert rel_err(a, e) < 1e-5


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("D", [256, 200])
def test_head_dims_above_128(backend, device, D):
    """Gemma-size heads (256) and a padded one (200 on 256-wide tiles), forward and backward,
    GQA, odd T; fp32 against the fp64 reference (the GPU tier runs bf16 at real length)."""
    B, Hq, Hkv, T, S = 1, 4, 2, 37, 45
    idx = [t.to(device) for t in make_index(B, Hq, T, S, block_m=16, block_n=16, max_blocks=2, max_cols=5, seed=9)]
    q, k, v = qkv(B, Hq, Hkv, T, S, D, device=device, seed=5)
    out, lse = block_sparse_attention(q, k, v, *idx, block_m=16, block_n=16, backend=backend)
    leaves, want, want_lse = _ref64(q, k, v, idx, block_m=16, block_n=16)
    assert rel_err(out, want) < 2e-6
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert rel_err(lse[finite], want_lse[finite]) < 2e-6
    g = torch.randn_like(out)
    for a, e, name in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(want, leaves, g.double()), "qkv"):
        assert rel_err(a, e) < 1e-5, name


def test_launch_falls_back_to_fewer_stages_when_shared_memory_is_short(monkeypatch):
    """A GPU with less shared memory per block than a config assumes (sm_86 / sm_89 / sm_120:
    ~100 KB) makes Triton refuse the build before launching; the launcher retries with fewer
    pipeline stages, remembers the depth that loaded, and names the sizes when none fits. An
    explicit (tuning) config launches as given."""
    from triton.runtime.errors import OutOfResources

    from sae_fast.triton_kernels import block_sparse_attention as bsa

    monkeypatch.setattr(bsa, "_FITTED_STAGES", {})

    class FakeKernel:  # needs 60 KB per stage
        def __init__(self, limit):
            self.limit, self.calls = limit, []

        def __getitem__(self, grid):
            def launch(*args, num_stages, **meta):
                self.calls.append(num_stages)
                if 60_000 * num_stages > self.limit:
                    raise OutOfResources(60_000 * num_stages, self.limit, "shared memory")
            return launch

    meta = dict(HEAD_DIM=256, BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3)
    kern = FakeKernel(limit=101_376)
    bsa._launch_fitting(kern, (1,), (), meta, torch.device("cpu"), "test")
    assert kern.calls == [3, 2, 1]
    bsa._launch_fitting(kern, (1,), (), meta, torch.device("cpu"), "test")
    assert kern.calls == [3, 2, 1, 1]  # remembered
    with pytest.raises(OutOfResources):
        bsa._launch_fitting(FakeKernel(101_376), (1,), (), meta, torch.device("cpu"), "test", exact=True)
    with pytest.raises(RuntimeError, match=r"HEAD_DIM=256, BLOCK_M=64, BLOCK_N=128\) needs 60000 bytes"):
        bsa._launch_fitting(FakeKernel(50_000), (1,), (), dict(meta, BLOCK_N=128), torch.device("cpu"), "t2")


@pytest.mark.parametrize("capability,family", [((8, 0), 80), ((8, 6), 80), ((8, 9), 80), ((9, 0), 90),
                                               ((10, 0), 90), ((12, 0), 80)])
def test_launch_configs_follow_the_gpu_family(monkeypatch, capability, family):
    """sm_90 / sm_100 get the wgmma-sized launches (227 KB of shared memory per block); the
    ~100 KB GPUs (sm_86 / 89 / 120, no wgmma) get sm_80's. Off the GPU: 90."""
    from sae_fast.triton_kernels.sparse_gather import config_arch

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert config_arch(torch.device("cuda", 0)) == family
    assert config_arch(torch.device("cpu")) == 90


TRITON_DEVICES = [pytest.param("cpu", id="interp", marks=pytest.mark.skipif(not INTERP, reason="needs TRITON_INTERPRET=1")),
                  pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("causal", [True, False])
def test_two_key_tiles_per_step(device, causal):
    """The forward and dQ launches with ``tiles_per_step=2`` (two ranges side by side in one
    step, 2·block_n columns per step): odd range counts (the last step half empty), ranges
    crossing the diagonal or leaving [0, S), more columns than one step holds, empty blocks,
    garbage past the counts; fp32 against the fp64 reference."""
    from sae_fast.triton_kernels import block_sparse_attention as bsa

    B, Hq, Hkv, T, S, D, bm, bn = 2, 4, 2, 75, 90, 16, 16, 16
    idx = make_index(B, Hq, T, S, block_m=bm, block_n=bn, max_blocks=5, max_cols=40, seed=7, causal=causal,
                     empty={(0, 1, 2), (1, 3, 0)})
    counts = idx[0].flatten()
    assert (counts % 2 == 1).any() and (counts >= 2).any() and (idx[2] > 2 * bn).any()
    idx = [t.to(device) for t in idx]
    q, k, v = (t.detach() for t in qkv(B, Hq, Hkv, T, S, D, device=device))
    leaves, want, want_lse = _ref64(q, k, v, idx, causal=causal, block_m=bm, block_n=bn)
    g = torch.randn(want.shape, dtype=torch.float64, device=device)
    want_grads = torch.autograd.grad(want, leaves, g)
    two = dict(num_warps=4, num_stages=2, tiles_per_step=2)
    out, lse = bsa.block_sparse_attention(q, k, v, *idx, causal=causal, block_m=bm, block_n=bn, config=two)
    assert rel_err(out, want) < 2e-6
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), finite) and not finite.all()
    assert rel_err(lse[finite], want_lse[finite]) < 2e-6
    grads = bsa.block_sparse_attention_backward(g.float(), None, q, k, v, out, lse, *idx, causal=causal,
                                                block_m=bm, block_n=bn, configs={"dq": two})
    for a, e, name in zip(grads, want_grads, "qkv"):
        assert rel_err(a, e) < 1e-5, name
    with pytest.raises(ValueError, match="tiles_per_step"):
        bsa.block_sparse_attention(q, k, v, *idx, block_m=bm, block_n=bn, config=dict(two, tiles_per_step=3))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("deterministic", [True, False])
def test_dkdv_walks_query_blocks_in_row_slices(device, deterministic):
    """The dK/dV launch that takes each entry's query block in slices of fewer rows (the
    sm_90 head-dim-128 config: 32 of 64), here 16 of 32 (and 4 of 64, the last block's
    slices partly or wholly past T): every slice of every entry must be visited once. fp32
    against the fp64 reference; the non-deterministic launch also adds dQ per slice."""
    from sae_fast.triton_kernels import block_sparse_attention as bsa

    for T, bm in ((75, 32), (70, 64)):
        B, Hq, Hkv, S, D, bn = 1, 4, 2, 90, 16, 16
        idx = make_index(B, Hq, T, S, block_m=bm, block_n=bn, max_blocks=4, max_cols=20, seed=11)
        idx = [t.to(device) for t in idx]
        q, k, v = (t.detach() for t in qkv(B, Hq, Hkv, T, S, D, device=device, seed=3))
        leaves, want, want_lse = _ref64(q, k, v, idx, block_m=bm, block_n=bn)
        g = torch.randn(want.shape, dtype=torch.float64, device=device)
        want_grads = torch.autograd.grad(want, leaves, g)
        out, lse = bsa.block_sparse_attention(q, k, v, *idx, block_m=bm, block_n=bn)
        grads = bsa.block_sparse_attention_backward(
            g.float(), None, q, k, v, out, lse, *idx, block_m=bm, block_n=bn, deterministic=deterministic,
            configs={"dkdv": dict(num_warps=4, num_stages=2, block_m=16)})
        for a, e, name in zip(grads, want_grads, "qkv"):
            assert rel_err(a, e) < 1e-5, (T, bm, name)


# ----------------------------------------------------------------------- opcheck and compile


def _tiny(device="cpu"):
    B, Hq, Hkv, T, S, D = 1, 2, 1, 30, 40, 16
    idx = make_index(B, Hq, T, S, block_m=32, block_n=16, max_blocks=2, max_cols=3, seed=2)
    return qkv(B, Hq, Hkv, T, S, D, device=device), [t.to(device) for t in idx]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    (q, k, v), idx = _tiny(device)
    args = (q, k, v, *idx, True, 0.3, 32, 16, True, backend)
    torch.library.opcheck(block_sparse_attention_op, args)
    out, lse = block_sparse_attention_op(*args)
    g = torch.randn_like(out)
    torch.library.opcheck(block_sparse_attention_backward_op,
                          (g, torch.randn_like(lse), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(),
                           *idx, True, 0.3, 32, 16, True, backend))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_compile_fullgraph_forward_backward(backend, device):
    (q, k, v), idx = _tiny(device)

    def f(q, k, v):
        out, lse = block_sparse_attention(q, k, v, *idx, block_m=32, block_n=16, backend=backend)
        return out.square().sum() + torch.where(torch.isfinite(lse), lse, 0).sum()

    got = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v), (q, k, v))
    want = torch.autograd.grad(f(q, k, v), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------- bad input


def _good():
    (q, k, v), idx = _tiny()
    return dict(q=q, k=k, v=v, block_count=idx[0], block_offset=idx[1], column_count=idx[2], column_index=idx[3],
                block_m=32, block_n=16)


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(q=torch.randn(2, 30, 16)), ValueError, "q must be 4-D"),
        (dict(k=torch.randn(1, 1, 40, 8), v=torch.randn(1, 1, 40, 8)), ValueError, "k must be"),
        (dict(v=torch.randn(1, 1, 41, 16)), ValueError, "k and v"),
        (dict(k=torch.randn(1, 3, 40, 16), v=torch.randn(1, 3, 40, 16)), ValueError, "multiple"),
        (dict(q=torch.randn(1, 2, 30, 16, dtype=torch.float16)), TypeError, "dtype"),
        (dict(q=torch.randn(1, 2, 30, 264), k=torch.randn(1, 1, 40, 264), v=torch.randn(1, 1, 40, 264)), ValueError,
         "head dim must be in"),
        (dict(block_count=torch.zeros(1, 2, 2, dtype=torch.int32)), ValueError, r"block_count must be \[1, 2, 1\]"),
        (dict(block_offset=torch.zeros(1, 2, 1, dtype=torch.int32)), ValueError, "block_offset must be 4-D"),
        (dict(column_index=torch.zeros(1, 2, 1, 3)), TypeError, "column_index must have dtype"),
        (dict(column_count=torch.zeros(1, 1, 1, dtype=torch.int32)), ValueError, "column_count must be"),
        (dict(block_m=48), ValueError, "block_m must be one of"),
        (dict(block_n=8), ValueError, "block_n must be one of"),
        (dict(scale=-1.0), ValueError, "scale must be a positive"),
        (dict(backend="cuda"), ValueError, "no CUDA-extension kernel"),
        (dict(backend="nope"), ValueError, "backend must be one of"),
    ],
)
def test_bad_input(change, exc, match):
    args = _good()
    args.update(change)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    idx = [args.pop(n) for n in ("block_count", "block_offset", "column_count", "column_index")]
    with pytest.raises(exc, match=match):
        block_sparse_attention(q, k, v, *idx, **args)


def test_triton_launch_refuses_a_batch_past_the_grid_limit():
    """Heads go on grid y and batch entries on z (B·H on one axis failed to launch past
    65535); each is limited to 65535, refused with a clear error before any launch."""
    from triton_kernels import block_sparse_attention as kernels

    for B, H in ((65536, 1), (1, 65536)):
        q = torch.empty(B, H, 1, 16, device="meta", dtype=torch.bfloat16)
        kv = torch.empty(B, 1, 1, 16, device="meta", dtype=torch.bfloat16)
        idx = [torch.empty(B, H, 1, *s, device="meta", dtype=torch.int32) for s in ((), (1,), (), (1,))]
        with pytest.raises(ValueError, match=f"batch {B}, heads {H}"):
            kernels.block_sparse_attention(q, kv, kv, *idx)
        with pytest.raises(ValueError, match="at most 65535 each"):
            kernels.block_sparse_attention_backward(q, None, q, kv, kv, q, q[..., 0].float(), *idx)


# --------------------------------------------------------------------- FlexAttention BlockMask


def _flex():
    fa = pytest.importorskip("torch.nn.attention.flex_attention")
    return fa


def _create_block_mask(fa, mask_mod, B, H, T, S, device, block):
    """``create_block_mask`` with ``BLOCK_SIZE=block``. torch < 2.6 (no ``seq_lengths``)
    records BLOCK_SIZE 128 whatever it used and takes one query block below 128 rows, so
    there the same mask is built from the dense mask_mod with ``BlockMask.from_kv_blocks``."""
    bm = fa.create_block_mask(mask_mod, B, H, T, S, device=device, BLOCK_SIZE=block)
    if hasattr(bm, "seq_lengths"):
        return bm
    nqb, nkb = -(-T // block), -(-S // block)
    ar = lambda n: torch.arange(n, device=device)  # noqa: E731
    dense = mask_mod(ar(B or 1).view(-1, 1, 1, 1), ar(H or 1).view(1, -1, 1, 1), ar(T).view(1, 1, -1, 1),
                     ar(S).view(1, 1, 1, -1)).expand(B or 1, H or 1, T, S)
    padded = torch.zeros(B or 1, H or 1, nqb * block, nkb * block, dtype=torch.bool, device=device)
    inb = torch.zeros_like(padded[0, 0])
    padded[..., :T, :S], inb[:T, :S] = dense, True
    blocks = padded.view(B or 1, H or 1, nqb, block, nkb, block)
    any_kept = blocks.any(5).any(3)
    full = (blocks | ~inb.view(nqb, block, nkb, block)).all(5).all(3) & any_kept

    def ordered(m):
        return m.sum(-1).to(torch.int32), torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)

    return fa.BlockMask.from_kv_blocks(*ordered(any_kept & ~full), *ordered(full), BLOCK_SIZE=block,
                                       mask_mod=mask_mod)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_block_mask_matches_flex_attention(backend, device):
    """Causal (diagonal partial blocks) and block-sparse (random whole blocks, each query
    block keeping its diagonal) masks: our kernel against FlexAttention's own result, GQA."""
    fa = _flex()
    B, Hq, Hkv, T, D = 1, 2, 1, 130, 64
    q, k, v = qkv(B, Hq, Hkv, T, T, D, device=device)
    keep = torch.rand(2, 3, 3, generator=torch.Generator().manual_seed(0)).lt(0.5) | torch.eye(3, dtype=torch.bool)
    keep = keep.to(device)

    def causal(b, h, qi, ki):
        return qi >= ki

    def blocks(b, h, qi, ki):
        return keep[h, qi // 64, ki // 64]

    def blocks_causal(b, h, qi, ki):
        return blocks(b, h, qi, ki) & (qi >= ki)

    for mod, H in ((causal, None), (blocks, Hq), (blocks_causal, Hq)):
        bm = _create_block_mask(fa, mod, None, H, T, T, device, 64)
        out, lse = block_mask_attention(q, k, v, bm, backend=backend)
        want = fa.flex_attention(q.detach(), k.detach(), v.detach(), block_mask=bm, enable_gqa=True)
        assert rel_err(out, want) < 2e-6, mod.__name__
    bc, bo, cc, ci, is_causal, bq, bk = ops.block_mask_to_index(bm, B, Hq, T, T)
    assert is_causal and (bq, bk) == (64, 64) and ci.shape[-1] == 0


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_block_mask_shared_over_batch_and_heads_evaluates_each(backend, device):
    """A mask built with B = H = None shares its block lists (taken at b = h = 0), but
    FlexAttention evaluates the mask_mod with the real (b, h) inside partial blocks: here batch
    1 drops its 4th diagonal block and head 1 its 3rd, which must not be read at (0, 0)."""
    fa = _flex()
    B, Hq, Hkv, T, D = 2, 2, 1, 64, 16
    q, k, v = qkv(B, Hq, Hkv, T, T, D, device=device)

    def causal_with_holes(b, h, qi, ki):
        own = qi // 16 == ki // 16
        return (qi >= ki) & ~((b == 1) & own & (qi // 16 == 3)) & ~((h == 1) & own & (qi // 16 == 2))

    bm = _create_block_mask(fa, causal_with_holes, None, None, T, T, device, 16)
    out, lse = block_mask_attention(q, k, v, bm, backend=backend)
    want = fa.flex_attention(q.detach(), k.detach(), v.detach(), block_mask=bm, enable_gqa=True)
    assert rel_err(out, want) < 2e-6
    with pytest.raises(TypeError, match="must be a torch.nn.attention.flex_attention.BlockMask"):
        block_mask_attention(q, k, v, None)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_block_mask_sink_tokens_become_columns(backend, device):
    """A-shape as FlexAttention users write it: 4 sink tokens (less than a block) + a causal
    block-local window. The sink part of each block is the same keys for every row: single
    columns; the result equals FlexAttention's, GQA and odd T included, gradients too."""
    fa = _flex()
    B, Hq, Hkv, T, D = 2, 2, 1, 75, 16
    q, k, v = qkv(B, Hq, Hkv, T, T, D, device=device)

    def sink_local(b, h, qi, ki):
        return ((ki < 4) | (qi // 16 == ki // 16)) & (qi >= ki)

    bm = _create_block_mask(fa, sink_local, None, None, T, T, device, 16)
    bc, bo, cc, ci, is_causal, _, _ = ops.block_mask_to_index(bm, B, Hq, T, T)
    assert is_causal and cc[0, 0].tolist() == [0] + [4] * 4 and ci[0, 0, 1].tolist() == [0, 1, 2, 3]
    out, lse = block_mask_attention(q, k, v, bm, backend=backend)
    want = fa.flex_attention(q.detach(), k.detach(), v.detach(), block_mask=bm, enable_gqa=True)
    assert rel_err(out, want) < 2e-6
    mask = sink_local(0, 0, torch.arange(T, device=device)[:, None], torch.arange(T, device=device)[None, :])
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = torch.softmax((qd @ kd.repeat_interleave(2, 1).transpose(-1, -2) * D ** -0.5).masked_fill(~mask, -float("inf")),
                        -1) @ vd.repeat_interleave(2, 1)
    g = torch.randn_like(ref)
    ref.backward(g)
    out.backward(g.to(out.dtype))
    for got, w in ((q.grad, qd.grad), (k.grad, kd.grad), (v.grad, vd.grad)):
        assert rel_err(got, w) < 1e-5


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_block_mask_rejects_row_dependent_partial_blocks():
    fa = _flex()
    T = 100

    def window(b, h, qi, ki):  # a 10-token window: partial blocks that are not the diagonal
        return (qi >= ki) & (qi - ki < 10)

    bm = _create_block_mask(fa, window, None, None, T, T, "cpu", 32)
    q = torch.randn(1, 1, T, 16)
    with pytest.raises(ValueError, match="neither full, empty, the causal diagonal nor the same keys"):
        block_mask_attention(q, q, q, bm)
    # torch < 2.6 masks carry no lengths: there the block grid is what disagrees
    with pytest.raises(ValueError, match="Q_LEN, KV_LEN" if hasattr(bm, "seq_lengths") else "query blocks"):
        block_mask_attention(q[:, :, :50], q, q, bm)


class _MaskWithoutLengths:
    """A BlockMask as torch < 2.6 hands it over: no seq_lengths, BLOCK_SIZE as recorded."""

    def __init__(self, bm, block_size):
        for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "mask_mod"):
            setattr(self, name, getattr(bm, name))
        self.BLOCK_SIZE = block_size


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_block_mask_without_lengths_needs_its_real_block_size():
    """torch < 2.6: create_block_mask(BLOCK_SIZE=(128, 32)) at T = 100 used 32-key blocks but
    records (128, 128) and no lengths. Read as 128-key blocks it would attend to keys the mask
    drops, silently: refused. With the block size it used, the result is exact."""
    fa = _flex()
    B, H, T, D = 1, 2, 100, 16
    q, k, v = qkv(B, H, H, T, T, D)

    def even_blocks(b, h, qi, ki):  # keys 0-31 and 64-95: read as 128-key blocks, all of them
        return (ki // 32) % 2 == 0

    bm = fa.create_block_mask(even_blocks, None, None, T, T, device="cpu", BLOCK_SIZE=(128, 32))
    as_recorded = bm if not hasattr(bm, "seq_lengths") else _MaskWithoutLengths(bm, (128, 128))
    with pytest.raises(ValueError, match=r"4 kv blocks per row, expected cdiv\(100, 128\).*torch < 2.6"):
        block_mask_attention(q, k, v, as_recorded)
    out, _ = block_mask_attention(q, k, v, _MaskWithoutLengths(bm, (128, 32)))
    mask = even_blocks(0, 0, torch.arange(T)[:, None], torch.arange(T)[None, :])
    want = torch.softmax((q.double() @ k.double().transpose(-1, -2) * D ** -0.5).masked_fill(~mask, -float("inf")),
                         -1) @ v.double()
    assert rel_err(out, want) < 1e-5


# ------------------------------------------------------------------------------------ GPU tier


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,D", [(4096, 128), (16384, 128), (4096, 256)])
def test_gpu_long_context(dtype, T, D):
    """Real lengths, vertical-slash-like patterns (block 64), 4 query / 2 kv heads, D = 128
    (and 256, Gemma's heads, on the 8-warp launches): out, lse and gradients against the fp32
    dense reference over the expanded mask."""
    B, Hq, Hkv = 1, 4 if T <= 4096 else 2, 2 if T <= 4096 else 1
    S = T
    nqb = T // 64
    gen = torch.Generator().manual_seed(0)
    n_slash, n_vert = 8, 64
    bc = torch.full((B, Hq, nqb), n_slash, dtype=torch.int32)
    rows = torch.arange(nqb)[:, None] * 64
    offs = rows - torch.arange(n_slash)[None, :] * 64 * torch.randint(1, 9, (n_slash,), generator=gen).cumsum(0)[None, :]
    offs = offs - torch.randint(0, 64, (1, n_slash), generator=gen)
    offs[:, 0] = rows[:, 0]  # the diagonal block
    bo = offs.expand(B, Hq, nqb, n_slash).to(torch.int32).contiguous()
    # verticals: distinct keys outside all ranges of the block (recomputed per block on CPU)
    cc = torch.zeros(B, Hq, nqb, dtype=torch.int32)
    ci = torch.zeros(B, Hq, nqb, n_vert, dtype=torch.int32)
    cand = torch.randperm(S, generator=gen)[:4 * n_vert].sort().values
    for qb in range(nqb):
        covered = torch.zeros(S + 64 * 80, dtype=torch.bool)
        for s in offs[qb].tolist():
            covered[max(s, 0):max(s + 64, 0)] = True
        free = cand[~covered[cand]][:n_vert]
        cc[:, :, qb] = free.numel()
        ci[:, :, qb, :free.numel()] = free.to(torch.int32)
    idx = [t.cuda() for t in (bc, bo, cc, ci)]
    q, k, v = qkv(B, Hq, Hkv, T, S, D, dtype=dtype, device="cuda")
    out, lse = block_sparse_attention(q, k, v, *idx)
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    want, want_lse = ref.block_sparse_attention(*leaves, *idx)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert rel_err(out, want) < tol
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    exp = torch.autograd.grad(want, leaves, g.float())
    for a, e in zip(got, exp):
        assert rel_err(a, e) < 4 * tol
    again = torch.autograd.grad(block_sparse_attention(q, k, v, *idx)[0], (q, k, v), g)
    for a, b in zip(got, again):
        assert torch.equal(a, b)
