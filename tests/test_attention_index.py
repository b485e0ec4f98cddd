"""vertical_slash_index: the four index tensors against a brute-force construction.

For random patterns (empty lists, all-padding heads, duplicates, slashes and verticals
beyond the sequence, odd lengths, B > 1 with different seq_lens, block_m != block_n) the
tests check that
  1. every (i, j) of the requested pattern is in the set the tensors denote,
  2. no key is listed twice for a query block (ranges disjoint, columns outside them),
  3. the denoted set is exactly causal ∩ (ranges ∪ columns) and nothing is listed for rows
     or keys beyond seq_len,
  4. the number of ranges is the minimum for covering the union of the diagonal spans with
     block_n-wide ranges (an independent point-by-point greedy, which is optimal),
and that the outputs equal that independent implementation element for element (padding
0). Plus opcheck / torch.compile of both registered ops, bad input, and (GPU tier) the CUDA
kernel against the torch implementation, exactly.
"""

import random

import pytest
import torch

from sae_fast.ops import attention_index as ai
from sae_fast.reference import attention_index as ref


# ---------------------------------------------------------------------------------------
# Brute force


def brute_force_lists(vertical, slash, seq_lens, L, bm, bn):
    """Per (b, h, qb): (range starts, columns), computed point by point in plain Python."""
    B, H, _ = vertical.shape
    nqb = -(-L // bm)
    out = {}
    for b in range(B):
        n = min(max(int(seq_lens[b]), 0), L)
        for h in range(H):
            verts = {int(x) for x in vertical[b, h].tolist() if x >= 0}
            offs = {int(x) for x in slash[b, h].tolist() if x >= 0}
            for qb in range(nqb):
                m0, m1 = qb * bm, min(qb * bm + bm, n)
                if m1 <= m0:  # a block past the sequence is empty
                    out[b, h, qb] = ([], [])
                    continue
                union = sorted({i - o for i in range(m0, m1) for o in offs if i - o >= 0})
                starts = []
                for j in union:  # greedy point cover: optimal for fixed-width intervals
                    if not starts or j >= starts[-1] + bn:
                        starts.append(j)
                cols = sorted(j for j in verts if j < m1 and not any(s <= j < s + bn for s in starts))
                out[b, h, qb] = (starts, cols)
    return out


def pattern_mask(vertical, slash, seq_lens, L):
    """P[b, h, i, j]: row i < n sees key j <= i when j is a vertical or i - j a slash."""
    B, H, _ = vertical.shape
    P = torch.zeros(B, H, L, L, dtype=torch.bool)
    i = torch.arange(L).view(L, 1)
    j = torch.arange(L).view(1, L)
    for b in range(B):
        n = int(seq_lens[b])
        valid = (i < n) & (j <= i)
        for h in range(H):
            for v in vertical[b, h].tolist():
                if 0 <= v < L:
                    P[b, h] |= valid & (j == v)
            for o in slash[b, h].tolist():
                if o >= 0:
                    P[b, h] |= valid & (i - j == o)
    return P


def denoted_mask(outputs, seq_lens, L, bm, bn):
    """D[b, h, i, j] from the four tensors (rows < seq_len, causal), and the multiplicity of
    every listed key per row before the causal mask (must be <= 1)."""
    block_count, block_offset, column_count, column_index = (t.cpu() for t in outputs)
    B, H, nqb = block_count.shape
    D = torch.zeros(B, H, L, L, dtype=torch.bool)
    mult = torch.zeros(B, H, nqb, L + 2 * bn, dtype=torch.int64)  # keys may reach past L
    for b in range(B):
        n = int(seq_lens[b])
        for h in range(H):
            for qb in range(nqb):
                keys = mult[b, h, qb]
                for s in block_offset[b, h, qb, : block_count[b, h, qb]].tolist():
                    keys[s : s + bn] += 1
                for c in column_index[b, h, qb, : column_count[b, h, qb]].tolist():
                    keys[c] += 1
                for i in range(qb * bm, min(qb * bm + bm, n)):
                    D[b, h, i, : i + 1] = keys[: i + 1] > 0
    return D, mult


def check_outputs(outputs, vertical, slash, seq_lens, L, bm, bn):
    block_count, block_offset, column_count, column_index = (t.cpu() for t in outputs)
    B, H, NV = vertical.shape
    NS = slash.shape[2]
    nqb, max_blocks, max_cols = ref.index_buffer_sizes(L, bm, bn, NV, NS)
    assert block_count.shape == (B, H, nqb) and column_count.shape == (B, H, nqb)
    assert block_offset.shape == (B, H, nqb, max_blocks)
    assert column_index.shape == (B, H, nqb, max_cols)
    for t in (block_count, block_offset, column_count, column_index):
        assert t.dtype == torch.int32 and t.is_contiguous()

    # Element for element against the independent point-by-point implementation (4).
    expected = brute_force_lists(vertical, slash, seq_lens, L, bm, bn)
    for (b, h, qb), (starts, cols) in expected.items():
        got_starts = block_offset[b, h, qb].tolist()
        got_cols = column_index[b, h, qb].tolist()
        assert block_count[b, h, qb] == len(starts), (b, h, qb)
        assert got_starts == starts + [0] * (max_blocks - len(starts)), (b, h, qb)
        assert column_count[b, h, qb] == len(cols), (b, h, qb)
        assert got_cols == cols + [0] * (max_cols - len(cols)), (b, h, qb)

    # (1)-(3) on dense masks.
    D, mult = denoted_mask(outputs, seq_lens, L, bm, bn)
    assert mult.numel() == 0 or int(mult.max()) <= 1, "a key is listed twice for one query block"
    P = pattern_mask(vertical, slash, seq_lens, L)
    assert not (P & ~D).any(), "a pattern entry is not covered"
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    assert not (D & ~causal).any()
    for b in range(B):
        n = int(seq_lens[b])
        assert not D[b, :, n:].any(), "rows beyond seq_len"
        cols = column_index[b, ..., :].long()
        listed = torch.arange(max_cols) < column_count[b].unsqueeze(-1)
        assert not (listed & (cols >= n)).any(), "a column beyond seq_len"
        starts = block_offset[b].long()
        listed = torch.arange(max_blocks) < block_count[b].unsqueeze(-1)
        assert not (listed & (starts >= n)).any(), "a range starting beyond seq_len"


# ---------------------------------------------------------------------------------------
# Random cases


def random_case(rng: random.Random, *, dtype=torch.int64):
    B, H = rng.randint(1, 3), rng.randint(1, 3)
    L = rng.choice([1, 17, 45, 63, 64, 97, 130])
    bm = rng.choice([16, 32, 64])
    bn = rng.choice([16, 32, 64])
    NV, NS = rng.choice([0, 1, 5, 12]), rng.choice([0, 1, 4, 9])

    def draw(n, hi):
        values = []
        for _ in range(n):
            r = rng.random()
            if r < 0.15:
                values.append(-rng.randint(1, 3))  # padding
            elif r < 0.25:
                values.append(rng.randint(L, L + 40))  # beyond the sequence
            elif r < 0.4 and values:
                values.append(rng.choice(values))  # duplicate
            elif r < 0.55:
                values.append(rng.randint(0, 3))  # sinks / near diagonals
            else:
                values.append(rng.randint(0, hi))
        return values

    vertical = torch.tensor([[draw(NV, L - 1) for _ in range(H)] for _ in range(B)], dtype=dtype).view(B, H, NV)
    slash = torch.tensor([[draw(NS, L - 1) for _ in range(H)] for _ in range(B)], dtype=dtype).view(B, H, NS)
    if rng.random() < 0.3 and NV:
        vertical[rng.randrange(B), rng.randrange(H)] = -1  # an all-padding head
    if rng.random() < 0.3 and NS:
        slash[rng.randrange(B), rng.randrange(H)] = -1
    seq_lens = torch.tensor([rng.choice([0, L, rng.randint(0, L)]) for _ in range(B)], dtype=dtype)
    return vertical, slash, seq_lens, L, bm, bn


@pytest.mark.parametrize("seed", range(24))
def test_random_patterns_against_brute_force(seed):
    rng = random.Random(seed)
    vertical, slash, seq_lens, L, bm, bn = random_case(rng, dtype=rng.choice([torch.int32, torch.int64]))
    out = ai.vertical_slash_index(vertical, slash, seq_lens, bm, bn, context_len=L, backend="reference")
    check_outputs(out, vertical, slash, seq_lens, L, bm, bn)


def test_hand_computed_case():
    """L = 128, 64 x 64 blocks, diagonals 0, 1, 2, verticals 0, 5, 100.
    Block 0 (rows 0..63): spans [0, 62), [0, 63), [0, 64) -> one range at 0, which holds
    verticals 0 and 5; 100 lies past the block. Block 1 (rows 64..127): spans [62, 126),
    [63, 127), [64, 128) -> ranges at 62 and 126 (the union is 66 keys wide); 100 lies in the
    first range, 0 and 5 become columns."""
    vertical = torch.tensor([[[100, 0, 5, 0]]])
    slash = torch.tensor([[[2, 0, 1]]])
    bc, bo, cc, ci = ai.vertical_slash_index(vertical, slash, torch.tensor([128]), 64, 64, context_len=128)
    assert bc.tolist() == [[[1, 2]]]
    assert bo.tolist() == [[[[0, 0], [62, 126]]]]
    assert cc.tolist() == [[[0, 2]]]
    assert ci.tolist() == [[[[0, 0, 0, 0], [0, 5, 0, 0]]]]  # max_cols = NV = 4


@pytest.mark.parametrize("bm,bn", [(64, 16), (16, 64), (32, 32)])
def test_runs_of_diagonals_merge(bm, bn):
    """Runs of consecutive diagonals share ranges: a run of r diagonals needs
    ceil((rows + r - 1) / bn) ranges per full block, never one per diagonal."""
    L = 160
    slash = torch.tensor(list(range(10)) + list(range(20, 25)) + [100]).view(1, 1, -1)
    vertical = torch.tensor([0, 1, 2, 3, 70, 71, 140]).view(1, 1, -1)
    seq_lens = torch.tensor([L])
    out = ai.vertical_slash_index(vertical, slash, seq_lens, bm, bn, context_len=L)
    check_outputs(out, vertical, slash, seq_lens, L, bm, bn)
    # Last block, rows m0..L-1: runs 0..9 and 20..24 cover keys [m0 - 24, L) in one union
    # (the spans overlap since bm > 10); diagonal 100 adds a span of bm keys.
    m0 = L - bm
    assert int(out[0][0, 0, -1]) <= -(-(bm + 24) // bn) + -(-bm // bn)
    assert int(out[0][0, 0, -1]) < 16


def test_order_of_inputs_does_not_matter():
    rng = random.Random(7)
    vertical, slash, seq_lens, L, bm, bn = random_case(rng)
    vertical = torch.randint(-2, 80, (2, 3, 11))
    slash = torch.randint(-2, 80, (2, 3, 7))
    seq_lens = torch.tensor([80, 51])
    base = ai.vertical_slash_index(vertical, slash, seq_lens, 32, 16, context_len=80)
    perm_v = torch.randperm(11)
    perm_s = torch.randperm(7)
    shuffled = ai.vertical_slash_index(vertical[..., perm_v], slash[..., perm_s], seq_lens, 32, 16, context_len=80)
    desc = ai.vertical_slash_index(
        vertical.sort(-1).values, slash.sort(-1, descending=True).values, seq_lens, 32, 16, context_len=80
    )
    for a, b, c in zip(base, shuffled, desc):
        assert torch.equal(a, b) and torch.equal(a, c)
    check_outputs(base, vertical, slash, seq_lens, 80, 32, 16)


def test_non_contiguous_and_mixed_dtypes():
    vertical = torch.randint(-1, 60, (3, 2, 9), dtype=torch.int32).transpose(0, 1)  # [2, 3, 9] strided
    slash = torch.randint(-1, 60, (2, 3, 10), dtype=torch.int64)[..., ::2]
    seq_lens = torch.tensor([60, 33], dtype=torch.int32)
    assert not vertical.is_contiguous() and not slash.is_contiguous()
    out = ai.vertical_slash_index(vertical, slash, seq_lens, 16, 32, context_len=60)
    check_outputs(out, vertical, slash, seq_lens, 60, 16, 32)
    again = ai.vertical_slash_index(vertical.contiguous().long(), slash.contiguous().int(), seq_lens.long(), 16, 32, context_len=60)
    for a, b in zip(out, again):
        assert torch.equal(a, b)


def test_empty_shapes_and_defaults():
    # No lists at all: every count 0, zero-width lists.
    v = torch.empty(2, 3, 0, dtype=torch.int64)
    s = torch.empty(2, 3, 0, dtype=torch.int64)
    bc, bo, cc, ci = ai.vertical_slash_index(v, s, torch.tensor([40, 7]), context_len=40)
    assert bc.shape == (2, 3, 1) and bo.shape == (2, 3, 1, 0) and ci.shape == (2, 3, 1, 0)
    assert not bc.any() and not cc.any()
    # context_len 0: no query blocks.
    out = ai.vertical_slash_index(torch.zeros(1, 1, 3, dtype=torch.int64), torch.zeros(1, 1, 2, dtype=torch.int64), torch.tensor([0]))
    assert [tuple(t.shape) for t in out] == [(1, 1, 0), (1, 1, 0, 0), (1, 1, 0), (1, 1, 0, 0)]
    # context_len inferred from seq_lens; seq_lens None means full length.
    v = torch.tensor([[[0, 5]]])
    s = torch.tensor([[[0]]])
    inferred = ai.vertical_slash_index(v, s, torch.tensor([70]), 64, 64)
    explicit = ai.vertical_slash_index(v, s, None, 64, 64, context_len=70)
    assert inferred[0].shape == (1, 1, 2)
    for a, b in zip(inferred, explicit):
        assert torch.equal(a, b)


def test_buffer_sizes_are_tight_enough_and_reached():
    """Every slash range distinct and far apart reaches NS * ceil(bm / bn) ranges; a full
    diagonal fan reaches ceil(L / bn)."""
    L, bm, bn = 256, 64, 16
    slash = torch.tensor([0, 40, 80, 120, 160, 200]).view(1, 1, -1)  # spans 64 wide, apart
    out = ai.vertical_slash_index(torch.empty(1, 1, 0, dtype=torch.int64), slash, torch.tensor([L]), bm, bn, context_len=L)
    nqb, max_blocks, _ = ref.index_buffer_sizes(L, bm, bn, 0, 6)
    assert max_blocks == min(L // bn, 6 * 4) == 16
    assert int(out[0].max()) == max_blocks
    vertical = torch.arange(L).view(1, 1, -1)
    out = ai.vertical_slash_index(vertical, torch.empty(1, 1, 0, dtype=torch.int64), torch.tensor([L]), bm, bn, context_len=L)
    assert int(out[2].max()) == L == ref.index_buffer_sizes(L, bm, bn, L, 0)[2]


# ---------------------------------------------------------------------------------------
# Bad input


def _ok():
    return torch.zeros(2, 3, 4, dtype=torch.int64), torch.zeros(2, 3, 5, dtype=torch.int64), torch.tensor([10, 20])


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda v, s, n, kw: (v[0], s, n, kw), ValueError, "vertical_idx must be 3-D"),
        (lambda v, s, n, kw: (v, s[:, :2], n, kw), ValueError, "slash_idx must be"),
        (lambda v, s, n, kw: (v, s[:1], n, kw), ValueError, "slash_idx must be"),
        (lambda v, s, n, kw: (v.float(), s, n, kw), TypeError, "vertical_idx must have dtype"),
        (lambda v, s, n, kw: (v, s.to(torch.int16), n, kw), TypeError, "slash_idx must have dtype"),
        (lambda v, s, n, kw: (v, s, n.float(), kw), TypeError, "seq_lens must have dtype"),
        (lambda v, s, n, kw: (v, s, n[:1], kw), ValueError, r"seq_lens must be \[B\]"),
        (lambda v, s, n, kw: (v, s, n.view(2, 1), kw), ValueError, "seq_lens must be 1-D"),
        (lambda v, s, n, kw: (v, s, torch.tensor([-1, 3]), kw), ValueError, "seq_lens must be >= 0"),
        (lambda v, s, n, kw: (v, s, torch.tensor([5, 33]), kw), ValueError, "seq_lens must be <= context_len"),
        (lambda v, s, n, kw: (v, s, n, {**kw, "block_m": 48}), ValueError, "block_m must be a power of two"),
        (lambda v, s, n, kw: (v, s, n, {**kw, "block_n": 8}), ValueError, "block_n must be a power of two"),
        (lambda v, s, n, kw: (v, s, n, {**kw, "block_m": 64.0}), ValueError, "block_m must be a power of two"),
        (lambda v, s, n, kw: (v, s, n, {**kw, "context_len": -1}), ValueError, "context_len must lie in"),
        (lambda v, s, n, kw: (v, s, n, {**kw, "context_len": 2**31}), ValueError, "context_len must lie in"),
        (lambda v, s, n, kw: (v, s, n, {**kw, "backend": "cuda"}), ValueError, "needs CUDA tensors"),
        (lambda v, s, n, kw: (v, s, n, {**kw, "backend": "nope"}), ValueError, "backend must be one of"),
    ],
)
def test_bad_input(mutate, exc, match):
    v, s, n = _ok()
    v, s, n, kw = mutate(v, s, n, {"context_len": 32, "block_m": 16, "block_n": 16})
    with pytest.raises(exc, match=match):
        ai.vertical_slash_index(v, s, n, kw.pop("block_m"), kw.pop("block_n"), **kw)


def test_unchecked_seq_lens_are_clamped():
    v, s, _ = _ok()
    v = torch.randint(-1, 40, v.shape)
    s = torch.randint(-1, 40, s.shape)
    got = ai.vertical_slash_index(v, s, torch.tensor([-5, 99]), 16, 16, context_len=32, check_seq_lens=False)
    want = ai.vertical_slash_index(v, s, torch.tensor([0, 32]), 16, 16, context_len=32)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_backends_that_have_no_kernel_fall_back_to_auto():
    v, s, n = _ok()
    base = ai.vertical_slash_index(v, s, n, 16, 16, context_len=32)
    for backend in ("auto", "triton", "fastest", "reference"):
        for a, b in zip(ai.vertical_slash_index(v, s, n, 16, 16, context_len=32, backend=backend), base):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------
# The registered ops: opcheck and torch.compile


def _op_args(device="cpu"):
    vertical = torch.tensor([[[0, 3, 3, -1, 40], [5, 1, -1, -1, 9]]], device=device).expand(2, 2, 5).contiguous()
    slash = torch.tensor([[[0, 1, 2, 17, -1, 2]]], device=device).expand(2, 2, 6).contiguous()
    seq_lens = torch.tensor([45, 20], device=device)
    return vertical, slash, seq_lens


def test_opcheck_python_op():
    v, s, n = _op_args()
    torch.library.opcheck(torch.ops.sae_fast.vertical_slash_index.default, (v, s, n, 45, 16, 32, "reference", True))


def test_compile_fullgraph():
    v, s, n = _op_args()
    torch._dynamo.reset()

    def fn(v, s, n):
        bc, bo, cc, ci = ai.vertical_slash_index(v, s, n, 16, 32, context_len=45)
        return bc + cc, bo, ci

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(v, s, n), fn(v, s, n)):
        assert torch.equal(got, want)


@pytest.mark.cuda_ext
def test_extension_op_cpu_kernel_is_the_reference():
    v, s, n = _op_args()
    got = torch.ops.sae_fast.convert_vertical_slash_index(v, s, n, 45, 16, 32)
    want = ref.vertical_slash_index(v, s, n, 45, 16, 32)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    schema = str(torch.ops.sae_fast.convert_vertical_slash_index.default._schema).replace("SymInt", "int")
    assert schema == (
        "sae_fast::convert_vertical_slash_index(Tensor vertical_idx, Tensor slash_idx, Tensor seq_lens, "
        "int context_len, int block_m, int block_n) -> (Tensor, Tensor, Tensor, Tensor)"
    )
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        torch.ops.sae_fast.convert_vertical_slash_index(v, s, n, 45, 16, 24)


@pytest.mark.cuda_ext
def test_opcheck_extension_op():
    v, s, n = _op_args()
    torch.library.opcheck(torch.ops.sae_fast.convert_vertical_slash_index.default, (v, s, n, 45, 16, 32))
    meta = torch.ops.sae_fast.convert_vertical_slash_index(*(t.to("meta") for t in (v, s, n)), 45, 16, 32)
    assert [tuple(t.shape) for t in meta] == [(2, 2, 3), (2, 2, 3, 2), (2, 2, 3), (2, 2, 3, 5)]


@pytest.mark.cuda_ext
def test_compile_fullgraph_extension_op():
    v, s, n = _op_args()
    torch._dynamo.reset()

    def fn(v, s, n):
        return torch.ops.sae_fast.convert_vertical_slash_index(v, s, n, 45, 16, 32)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(v, s, n), fn(v, s, n)):
        assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------
# GPU tier: the CUDA kernel equals the torch implementation exactly


def _assert_same(got, want):
    names = ("block_count", "block_offset", "column_count", "column_index")
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert torch.equal(a.cpu(), b.cpu()), name


@pytest.mark.gpu
@pytest.mark.cuda_ext
@pytest.mark.parametrize("seed", range(16))
def test_cuda_kernel_small_random_against_brute_force(seed):
    rng = random.Random(100 + seed)
    vertical, slash, seq_lens, L, bm, bn = random_case(rng, dtype=rng.choice([torch.int32, torch.int64]))
    args = (vertical.cuda(), slash.cuda(), seq_lens.cuda())
    got = ai.vertical_slash_index(*args, bm, bn, context_len=L, backend="cuda")
    want = ai.vertical_slash_index(*args, bm, bn, context_len=L, backend="reference")
    _assert_same(got, want)
    _assert_same(want, ai.vertical_slash_index(vertical, slash, seq_lens, bm, bn, context_len=L, backend="reference"))
    check_outputs(got, vertical, slash, seq_lens, L, bm, bn)


@pytest.mark.gpu
@pytest.mark.cuda_ext
@pytest.mark.parametrize(
    "B,H,L,NV,NS,bm,bn",
    [
        (1, 32, 8192, 1000, 600, 64, 64),  # MInference-like budgets
        (3, 4, 5000, 300, 200, 128, 32),  # odd L, block_m > block_n, B > 1
        (2, 5, 3001, 77, 513, 16, 64),  # block_m < block_n, many slashes
        (2, 1, 70000, 40, 2000, 64, 64),  # more query blocks than threads per block
    ],
)
def test_cuda_kernel_matches_reference_at_size(B, H, L, NV, NS, bm, bn):
    gen = torch.Generator(device="cuda").manual_seed(B * 1000 + NV)
    for index_dtype in (torch.int32, torch.int64):
        vertical = torch.randint(-8, L + 100, (B, H, NV), device="cuda", generator=gen, dtype=index_dtype)
        slash = torch.randint(-8, L + 100, (B, H, NS), device="cuda", generator=gen, dtype=index_dtype)
        # MInference-like: sinks and the nearest diagonals are always in, duplicated here.
        vertical[..., :30] = torch.arange(30, device="cuda", dtype=index_dtype)
        slash[..., :100] = torch.arange(100, device="cuda", dtype=index_dtype)
        slash[..., 100:120] = slash[..., :20]
        vertical[0, 0] = -1  # an all-padding head
        seq_lens = torch.randint(0, L + 1, (B,), device="cuda", generator=gen)
        seq_lens[0] = L
        got = ai.vertical_slash_index(vertical, slash, seq_lens, bm, bn, context_len=L, backend="cuda")
        want = ai.vertical_slash_index(vertical, slash, seq_lens, bm, bn, context_len=L, backend="reference")
        _assert_same(got, want)
        # Strided (transposed) inputs and the other index dtype give the same lists.
        strided = ai.vertical_slash_index(
            vertical.transpose(0, 1).contiguous().transpose(0, 1), slash.long(), seq_lens.int(), bm, bn, context_len=L, backend="cuda"
        )
        _assert_same(strided, want)


@pytest.mark.gpu
@pytest.mark.cuda_ext
def test_cuda_kernel_edge_shapes():
    for v_shape, s_shape, L in [((2, 3, 0), (2, 3, 4), 100), ((2, 3, 5), (2, 3, 0), 100), ((1, 1, 3), (1, 1, 2), 0), ((0, 3, 3), (0, 3, 2), 50)]:
        vertical = torch.randint(-1, 120, v_shape, device="cuda")
        slash = torch.randint(-1, 120, s_shape, device="cuda")
        seq_lens = torch.full((v_shape[0],), L, device="cuda")
        got = ai.vertical_slash_index(vertical, slash, seq_lens, 32, 64, context_len=L, backend="cuda")
        want = ai.vertical_slash_index(vertical, slash, seq_lens, 32, 64, context_len=L, backend="reference")
        _assert_same(got, want)


@pytest.mark.gpu
@pytest.mark.cuda_ext
def test_cuda_kernel_opcheck_and_deterministic():
    v, s, n = _op_args("cuda")
    torch.library.opcheck(torch.ops.sae_fast.convert_vertical_slash_index.default, (v, s, n, 45, 16, 32))
    torch.library.opcheck(torch.ops.sae_fast.vertical_slash_index.default, (v, s, n, 45, 16, 32, "cuda", True))
    vertical = torch.randint(-1, 4096, (2, 8, 500), device="cuda")
    slash = torch.randint(-1, 4096, (2, 8, 300), device="cuda")
    seq_lens = torch.tensor([4096, 1000], device="cuda")
    first = ai.vertical_slash_index(vertical, slash, seq_lens, context_len=4096, backend="cuda")
    for _ in range(3):
        _assert_same(ai.vertical_slash_index(vertical, slash, seq_lens, context_len=4096, backend="cuda"), first)
