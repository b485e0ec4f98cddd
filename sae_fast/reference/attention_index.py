"""Reference of the vertical-slash index conversion (MInference's sparse prefill pattern):
per query block, the key ranges and single key columns a block-sparse attention kernel
visits. Plain torch, CPU or CUDA, no argument checks (``sae_fast.ops.attention_index``
checks and documents the contract; the CUDA kernel ``csrc/vertical_slash_index.cu``
computes the same tensors bit for bit).

Per query block ``qb`` of (b, h), rows ``[m0, m1)`` with ``m0 = qb * block_m`` and
``m1 = min(m0 + block_m, n)``, ``n = clamp(seq_lens[b], 0, context_len)`` (the block is
empty when ``m0 >= n``):

1. Each diagonal offset ``o >= 0`` covers the keys ``[max(0, m0 - o), m1 - o)`` (empty when
   ``o >= m1``). Taking the offsets in descending order gives these spans in ascending
   start (and end) order; a greedy cover of their union by ``block_n``-wide ranges (each
   range starts at the first key of the union not yet covered) gives the fewest ranges, and
   they come out disjoint and ascending.
2. Each distinct vertical ``0 <= j < m1`` that lies in no range becomes a column (ascending).

The loop of step 1 is sequential over the offsets (the start of a range depends on where
the previous one ended) and vectorised over all (b, h, query block) rows; step 2 is one
vectorised search of every vertical among its row's ranges.
"""

from __future__ import annotations

import torch

# Bound on the [rows, NV] temporaries of the column step (rows = query blocks).
_CHUNK_ELEMENTS = 1 << 22


def cdiv(a, b):
    return (a + b - 1) // b


def index_buffer_sizes(context_len, block_m: int, block_n: int, num_vertical, num_slash):
    """``(num_query_blocks, max_blocks, max_columns)``: the last dimensions of the outputs.

    ``max_blocks = min(ceil(L / block_n), NS * ceil(block_m / block_n))``: the ranges of a
    query block start at distinct keys below L at least ``block_n`` apart, and the greedy
    cover is no larger than tiling each of the (at most NS) diagonal spans, each at most
    ``block_m`` wide, on its own. ``max_columns = min(NV, L)``: distinct keys below L.
    Arguments may be SymInts (fake kernels)."""
    nqb = cdiv(context_len, block_m)
    max_blocks = _min(cdiv(context_len, block_n), num_slash * cdiv(block_m, block_n))
    max_cols = _min(num_vertical, context_len)
    return nqb, max_blocks, max_cols


def _min(a, b):
    if isinstance(a, int) and isinstance(b, int):
        return min(a, b)
    return torch.sym_min(a, b)


def _row_bounds(seq_lens: torch.Tensor, context_len: int, block_m: int, nqb: int):
    """m0 [1, 1, NQB] and m1 [B, 1, NQB] (int64); m1 = 0 marks an empty query block."""
    device = seq_lens.device
    n = seq_lens.to(torch.int64).clamp(0, context_len).view(-1, 1, 1)
    m0 = (torch.arange(nqb, device=device, dtype=torch.int64) * block_m).view(1, 1, nqb)
    m1 = torch.minimum(m0 + block_m, n)
    m1 = torch.where(m1 > m0, m1, torch.zeros_like(m1))
    return m0, m1


def _slash_ranges(slash_idx, m0, m1, nqb, block_m, block_n, max_blocks):
    """Greedy range cover of the diagonal spans. Returns (count [B, H, NQB] int64,
    starts [B, H, NQB, max_blocks] int64, 0 past the count)."""
    B, H, NS = slash_idx.shape
    device = slash_idx.device
    shape = (B, H, nqb)
    count = torch.zeros(shape, dtype=torch.int64, device=device)
    cov_end = torch.zeros(shape, dtype=torch.int64, device=device)
    # One spare slot at the end takes the writes of rows that place fewer ranges.
    starts = torch.zeros(shape + (max_blocks + 1,), dtype=torch.int64, device=device)
    if NS == 0 or max_blocks == 0 or nqb == 0:
        return count, starts[..., :max_blocks]
    offsets = torch.sort(slash_idx.to(torch.int64), dim=-1, descending=True).values
    per_span = cdiv(block_m, block_n)  # most ranges one span can add (width <= block_m)
    dump = torch.full(shape, max_blocks, dtype=torch.int64, device=device)
    for k in range(NS):
        o = offsets[:, :, k : k + 1]  # [B, H, 1]
        end = m1 - o  # [B, H, NQB]
        first = torch.maximum((m0 - o).clamp(min=0), cov_end)
        # Padding (o < 0), empty blocks (m1 = 0), diagonals beyond the block (o >= m1) and
        # spans already covered all give end <= first.
        need = (o >= 0) & (end > first)
        added = torch.where(need, cdiv(end - first, block_n), torch.zeros_like(end))
        for t in range(per_span):
            slot = torch.where(t < added, count + t, dump)
            starts.scatter_(3, slot.unsqueeze(-1), (first + t * block_n).unsqueeze(-1))
        cov_end = torch.where(need, first + added * block_n, cov_end)
        count = count + added
    return count, starts[..., :max_blocks].contiguous()


def _columns(vertical_idx, m1, count, starts, nqb, block_n, max_cols):
    """Verticals outside every range. Returns (count [B, H, NQB], index [B, H, NQB, max_cols]),
    int64, 0 past the count."""
    B, H, NV = vertical_idx.shape
    device = vertical_idx.device
    col_count = torch.zeros((B, H, nqb), dtype=torch.int64, device=device)
    col_index = torch.zeros((B, H, nqb, max_cols), dtype=torch.int64, device=device)
    if NV == 0 or max_cols == 0 or nqb == 0:
        return col_count, col_index
    v = torch.sort(vertical_idx.to(torch.int64), dim=-1).values  # ascending, padding first
    distinct = torch.ones_like(v, dtype=torch.bool)
    distinct[..., 1:] = v[..., 1:] != v[..., :-1]
    v_ok = (v >= 0) & distinct  # [B, H, NV]
    max_blocks = starts.shape[-1]
    # Starts past the count become "infinite" so each row of starts stays sorted.
    slots = torch.arange(max_blocks, device=device)
    big = torch.iinfo(torch.int64).max // 2
    sorted_starts = torch.where(slots < count.unsqueeze(-1), starts, torch.full_like(starts, big))
    rows = max(1, _CHUNK_ELEMENTS // max(NV * B * H, 1))
    for q0 in range(0, nqb, rows):
        q1 = min(nqb, q0 + rows)
        vv = v.unsqueeze(2).expand(B, H, q1 - q0, NV)
        keep = v_ok.unsqueeze(2) & (vv < m1[:, :, q0:q1].unsqueeze(-1))
        if max_blocks > 0:
            seq = sorted_starts[:, :, q0:q1].contiguous()
            at = torch.searchsorted(seq, vv.contiguous(), right=True) - 1  # last start <= v
            start = torch.gather(seq, 3, at.clamp(min=0))
            keep &= ~((at >= 0) & (vv < start + block_n))
        pos = torch.cumsum(keep, dim=-1) - 1
        col_count[:, :, q0:q1] = keep.sum(-1)
        out = torch.zeros((B, H, q1 - q0, max_cols + 1), dtype=torch.int64, device=device)
        slot = torch.where(keep, pos, torch.full_like(pos, max_cols))
        out.scatter_(3, slot, vv.contiguous())
        col_index[:, :, q0:q1] = out[..., :max_cols]
    return col_count, col_index


def vertical_slash_index(
    vertical_idx: torch.Tensor,
    slash_idx: torch.Tensor,
    seq_lens: torch.Tensor,
    context_len: int,
    block_m: int = 64,
    block_n: int = 64,
):
    """``(block_count, block_offset, column_count, column_index)``, all int32, shapes
    ``[B, H, NQB]``, ``[B, H, NQB, max_blocks]``, ``[B, H, NQB]``, ``[B, H, NQB, max_cols]``
    (``index_buffer_sizes``); entries past a count are 0. The contract is documented in
    ``sae_fast.ops.attention_index``."""
    B, H, NV = vertical_idx.shape
    NS = slash_idx.shape[2]
    nqb, max_blocks, max_cols = index_buffer_sizes(context_len, block_m, block_n, NV, NS)
    m0, m1 = _row_bounds(seq_lens, context_len, block_m, nqb)
    count, starts = _slash_ranges(slash_idx, m0, m1, nqb, block_m, block_n, max_blocks)
    col_count, col_index = _columns(vertical_idx, m1, count, starts, nqb, block_n, max_cols)
    i32 = torch.int32
    return count.to(i32), starts.to(i32), col_count.to(i32), col_index.to(i32)
