"""Block-sparse flash attention for long-context prefill (MInference-style index), forward and
backward, with native GQA and arbitrary q/k/v strides.

Index (see ``sae_fast.reference.attention``): per (batch b, query head h, query block qb of
BLOCK_M rows) a list of key ranges ``[s, s + BLOCK_N)`` (any start; keys outside ``[0, S)``
and, when causal, right of the bottom-right diagonal are masked) and a list of single key
columns. Query head h reads kv head ``h // GROUP``; K/V are never repeated.

Forward (``_fwd_kernel``), one program per (qb, b·Hq + h), heavy (late, causal) blocks first:
the Q tile is loaded once; the ranges are walked one BLOCK_N tile each (a per-element
mask only for tiles that cross the diagonal or leave ``[0, S)``), then the columns are
gathered BLOCK_N at a time (K/V rows loaded by index). Online softmax in fp32 in base 2: the
scale and log2(e) are folded into one multiplier so each score costs one FMA and one exp2.
A row that sees nothing gets out = 0 and lse = -inf (the running max is made finite before
it is subtracted, so no inf - inf).

Backward, deterministic (no float atomics):

* ``_bwd_delta_kernel``: delta = rowsum(O ∘ dO) - dlse (fp32; dlse lets lse be an output
  that carries gradient: d lse / d s = P).
* ``_bwd_dq_kernel``: per (b, h, qb), the forward's walk again; dS = P ∘ (dP - delta),
  dQ = scale · dS·K. One writer per dQ row.
* ``_bwd_dkdv_kernel``: one program per (b, kv head, key tile of TILE_N = 64 keys) owns its
  dK/dV rows and walks a list of (query head, query block, 64-bit key mask) entries built on
  the device by ``build_backward_plan`` (sorts and prefix sums, no atomics; two host syncs).
  Range keys use aligned tiles ``[t·64, t·64 + 64)``; a range covers a contiguous span of one
  or two tiles, and the spans of one (head, block) in one tile are merged into one mask.
  Column keys would waste most of an aligned tile (one column per tile), so the distinct
  column keys of each (b, kv head) are ranked and packed 64 per *column tile* (K/V rows
  gathered by index). The column launch writes their dK/dV partials (fp32, by rank); the
  range launch writes every dK/dV row and, for column keys (a key → rank table), also its
  own fp32 partial; ``_bwd_cols_finalize_kernel`` then writes column keys' rows as the sum
  of the two. Every row has one final writer and a fixed summation order (entries sorted by
  query head, then query block), which also sums a kv head's query heads in a fixed order.

``deterministic=False`` additionally lets the dK/dV programs produce dQ (fp32 atomics into a
buffer, no separate dQ pass: 5 instead of 7 tile products per (query, key) tile).
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from .sparse_gather import _device_ctx, _empty, _finish, _interpreted

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
TILE_N = 64  # keys per dK/dV program: one 64-bit mask per (head, block) entry
_MASK_WORDS = TILE_N // 32  # masks are stored as 32-bit words in int64 (no sign games)
_I64_MAX = torch.iinfo(torch.int64).max


# ----------------------------------------------------------------------------------- helpers


@triton.jit
def _head_dim_mask(offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """[1, BLOCK_D] mask of real head dims: a constant (folded away) when BLOCK_D == HEAD_DIM,
    so loads keep their full vector width."""
    if BLOCK_D == HEAD_DIM:
        return tl.full([1, BLOCK_D], 1, tl.int1)
    else:
        return (offs_d < HEAD_DIM)[None, :]


# Loads of bf16 are upcast to fp32 under the interpreter (UPCAST), which cannot do bf16
# arithmetic; p.to(<input dtype>).to(<operand dtype>) then still rounds P and dS to bf16 (a
# no-op pair of casts on a GPU). Helpers are inlined in the loops: under the interpreter a
# @triton.jit call costs as much as a dozen tile operations.


# ----------------------------------------------------------------------------------- forward
#
# Index arithmetic: rows and keys are int32 (T, S < 2**31); batch/head bases and every
# row's address offset are int64. A query block's walk is two loops, the key ranges and then
# the gathered columns, BLOCK_N keys per step: each loop's index load and K/V loads then have
# addresses that Triton's pipeliner can issue stages ahead (cp.async). One loop with a branch
# per step (range or column chunk) kept the index load out of the pipeline.


@triton.jit
def _row_limits(offs_m, qb, T, S, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """Row i sees keys j <= lim[i]: the causal diagonal (bottom-right) and the end of the keys
    in one bound; lim_lo is the block's first row's, the strictest."""
    if CAUSAL:
        lim = tl.minimum(offs_m + (S - T), S - 1)
        lim_lo = tl.minimum(qb * BLOCK_M + (S - T), S - 1)
    else:
        lim = tl.zeros([BLOCK_M], dtype=tl.int32) + (S - 1)
        lim_lo = S - 1
    return lim, lim_lo


@triton.jit
def _range_keys(boff_row, i, offs_nn, lim_lo, S, BLOCK_N: tl.constexpr):
    """Keys of range i, [start, start + BLOCK_N): which exist, and whether the tile needs the
    per-element mask (it crosses the diagonal or an end of the keys)."""
    start = tl.minimum(tl.maximum(tl.load(boff_row + i), -BLOCK_N), S).to(tl.int32)
    keys = start + offs_nn
    kv_ok = (keys >= 0) & (keys < S)
    masked = (start < 0) | (start + (BLOCK_N - 1) > lim_lo)
    return keys, kv_ok, masked


@triton.jit
def _column_keys(cidx_row, c0, n_cols, offs_nn, S):
    """Columns c0 .. c0 + BLOCK_N of the block's list (-1 and out-of-range entries masked)."""
    offs_c = c0 + offs_nn
    cols = tl.load(cidx_row + offs_c, mask=offs_c < n_cols, other=-1)
    kv_ok = (cols >= 0) & (cols < S)
    return tl.where(kv_ok, cols, -1).to(tl.int32), kv_ok


@triton.jit
def _load_kv(k_base, v_base, keys, kv_ok, stride_ks, stride_kd, stride_vs, stride_vd, offs_d, d_ok,
             UPCAST: tl.constexpr):
    key_off = tl.where(kv_ok, keys, 0).to(tl.int64)[:, None]
    k = tl.load(k_base + key_off * stride_ks + offs_d[None, :] * stride_kd, mask=kv_ok[:, None] & d_ok, other=0.0)
    v = tl.load(v_base + key_off * stride_vs + offs_d[None, :] * stride_vd, mask=kv_ok[:, None] & d_ok, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def _fwd_step(q, k, v, keys, kv_ok, masked, lim, m_i, l_i, acc, qk_scale, v_ptr, PRECISION: tl.constexpr):
    """One key tile of the online softmax (base 2, running max kept finite for rows that have
    seen nothing yet, so no (-inf) - (-inf))."""
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if masked:
        qk = tl.where(kv_ok[None, :] & (keys[None, :] <= lim[:, None]), qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(qk * qk_scale - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v_ptr.dtype.element_ty).to(v.dtype), v, acc, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _dq_step(q, do, k, v, keys, kv_ok, masked, lim, lse2, delta, dq, qk_scale, k_ptr, PRECISION: tl.constexpr):
    """One key tile of dQ: P from the saved lse, dS = P ∘ (dP - delta), dQ += dS·K."""
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    p = tl.exp2(qk * qk_scale - lse2[:, None])
    if masked:
        p = tl.where(kv_ok[None, :] & (keys[None, :] <= lim[:, None]), p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k_ptr.dtype.element_ty).to(k.dtype), k, dq, input_precision=PRECISION)


@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
    bcount_ptr, boff_ptr, ccount_ptr, cidx_ptr,
    T, S, H, GROUP, NQB, MAX_BLOCKS, MAX_COLS, qk_scale,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_ot,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    qb = NQB - 1 - tl.program_id(0)  # late query blocks (most keys under causal) first
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    kvh = h // GROUP
    idx = bh * NQB + qb  # row of the (contiguous) index tensors

    offs_mm = tl.arange(0, BLOCK_M)
    offs_m = qb * BLOCK_M + offs_mm
    offs_nn = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = _head_dim_mask(offs_d, HEAD_DIM, BLOCK_D)
    row_ok = offs_m < T
    lim, lim_lo = _row_limits(offs_m, qb, T, S, BLOCK_M, CAUSAL)

    row0 = (qb * BLOCK_M).to(tl.int64)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + row0 * stride_qt
                + offs_mm[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + b * stride_vb + kvh * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    n_blocks = tl.minimum(tl.maximum(tl.load(bcount_ptr + idx), 0), MAX_BLOCKS)
    n_cols = tl.minimum(tl.maximum(tl.load(ccount_ptr + idx), 0), MAX_COLS)
    boff_row = boff_ptr + idx * MAX_BLOCKS
    for i in range(0, n_blocks):
        keys, kv_ok, masked = _range_keys(boff_row, i, offs_nn, lim_lo, S, BLOCK_N)
        k, v = _load_kv(k_base, v_base, keys, kv_ok, stride_ks, stride_kd, stride_vs, stride_vd, offs_d, d_ok, UPCAST)
        m_i, l_i, acc = _fwd_step(q, k, v, keys, kv_ok, masked, lim, m_i, l_i, acc, qk_scale, v_ptr, PRECISION)
    cidx_row = cidx_ptr + idx * MAX_COLS
    for c0 in range(0, n_cols, BLOCK_N):
        keys, kv_ok = _column_keys(cidx_row, c0, n_cols, offs_nn, S)
        k, v = _load_kv(k_base, v_base, keys, kv_ok, stride_ks, stride_kd, stride_vs, stride_vd, offs_d, d_ok, UPCAST)
        m_i, l_i, acc = _fwd_step(q, k, v, keys, kv_ok, True, lim, m_i, l_i, acc, qk_scale, v_ptr, PRECISION)

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]  # rows that saw nothing: acc = 0 -> out = 0
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    o_ptrs = out_ptr + b * stride_ob + h * stride_oh + row0 * stride_ot + offs_mm[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok)
    tl.store(lse_ptr + bh * T + offs_m, lse, mask=row_ok)


# ---------------------------------------------------------------------------------- backward


@triton.jit
def _bwd_delta_kernel(
    o_ptr, do_ptr, dlse_ptr, delta_ptr,
    T, H,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_lb, stride_lh, stride_lt,
    HAS_DLSE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """delta[b, h, t] = Σ_d O·dO - dlse (fp32), the row term of dS = P ∘ (dP - delta)."""
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = _head_dim_mask(offs_d, HEAD_DIM, BLOCK_D)
    ok = offs_t < T
    t64 = offs_t.to(tl.int64)[:, None]
    o = tl.load(o_ptr + b * stride_ob + h * stride_oh + t64 * stride_ot + offs_d[None, :] * stride_od,
                mask=ok[:, None] & d_ok, other=0.0)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + t64 * stride_dot + offs_d[None, :] * stride_dod,
                 mask=ok[:, None] & d_ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(dlse_ptr + b * stride_lb + h * stride_lh + offs_t.to(tl.int64) * stride_lt,
                         mask=ok, other=0.0).to(tl.float32)
    tl.store(delta_ptr + bh * T + offs_t, delta, mask=ok)


@triton.jit
def _bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    bcount_ptr, boff_ptr, ccount_ptr, cidx_ptr,
    T, S, H, GROUP, NQB, MAX_BLOCKS, MAX_COLS, qk_scale, sm_scale,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """dQ of one (b, h, qb): the forward's walk, P from the saved lse, dS = P ∘ (dP - delta)."""
    qb = NQB - 1 - tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    kvh = h // GROUP
    idx = bh * NQB + qb

    offs_mm = tl.arange(0, BLOCK_M)
    offs_m = qb * BLOCK_M + offs_mm
    offs_nn = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = _head_dim_mask(offs_d, HEAD_DIM, BLOCK_D)
    row_ok = offs_m < T
    lim, lim_lo = _row_limits(offs_m, qb, T, S, BLOCK_M, CAUSAL)

    row0 = (qb * BLOCK_M).to(tl.int64)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + row0 * stride_qt
                + offs_mm[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok, other=0.0)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + row0 * stride_dot
                 + offs_mm[:, None] * stride_dot + offs_d[None, :] * stride_dod, mask=row_ok[:, None] & d_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse2 = tl.load(lse_ptr + bh * T + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + bh * T + offs_m, mask=row_ok, other=0.0)
    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + b * stride_vb + kvh * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    n_blocks = tl.minimum(tl.maximum(tl.load(bcount_ptr + idx), 0), MAX_BLOCKS)
    n_cols = tl.minimum(tl.maximum(tl.load(ccount_ptr + idx), 0), MAX_COLS)
    boff_row = boff_ptr + idx * MAX_BLOCKS
    for i in range(0, n_blocks):
        keys, kv_ok, masked = _range_keys(boff_row, i, offs_nn, lim_lo, S, BLOCK_N)
        k, v = _load_kv(k_base, v_base, keys, kv_ok, stride_ks, stride_kd, stride_vs, stride_vd, offs_d, d_ok, UPCAST)
        dq = _dq_step(q, do, k, v, keys, kv_ok, masked, lim, lse2, delta, dq, qk_scale, k_ptr, PRECISION)
    cidx_row = cidx_ptr + idx * MAX_COLS
    for c0 in range(0, n_cols, BLOCK_N):
        keys, kv_ok = _column_keys(cidx_row, c0, n_cols, offs_nn, S)
        k, v = _load_kv(k_base, v_base, keys, kv_ok, stride_ks, stride_kd, stride_vs, stride_vd, offs_d, d_ok, UPCAST)
        dq = _dq_step(q, do, k, v, keys, kv_ok, True, lim, lse2, delta, dq, qk_scale, k_ptr, PRECISION)

    dq = dq * sm_scale
    dq_ptrs = dq_ptr + b * stride_dqb + h * stride_dqh + row0 * stride_dqt + offs_mm[:, None] * stride_dqt + offs_d[None, :]
    tl.store(dq_ptrs, dq.to(dq_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok)


@triton.jit
def _bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr,
    dk_ptr, dv_ptr, dq_acc_ptr,
    tile_off_ptr, ent_head_ptr, ent_qb_ptr, ent_bits_ptr,
    col_keys_ptr, slot_ptr, col_dk_ptr, col_dv_ptr, rng_dk_ptr, rng_dv_ptr,
    T, S, H, HKV, GROUP, TILES, TILE0, COL_ROWS, qk_scale, sm_scale,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dkb, stride_dkh, stride_dks,
    stride_dvb, stride_dvh, stride_dvs,
    IS_COL: tl.constexpr, HAS_COLS: tl.constexpr, ATOMIC_DQ: tl.constexpr, CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, QBLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, WORDS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program per (key tile, b·Hkv + kv head). Range launch (IS_COL False): tile t holds
    keys [t·BLOCK_N, t·BLOCK_N + BLOCK_N) and writes dK/dV (plus the column partials of its
    keys). Column launch: tile t holds the column keys ranked t·BLOCK_N.. of this kv head and
    writes unscaled fp32 partials [COL_ROWS, HEAD_DIM] per kv head; the range launch keeps
    its own partials of column keys beside them, and a finalize kernel sums the two."""
    tile = tl.program_id(0)
    bkv = tl.program_id(1).to(tl.int64)
    b = bkv // HKV
    kvh = bkv % HKV
    g = bkv * TILES + TILE0 + tile
    e0 = tl.load(tile_off_ptr + g)
    e1 = tl.load(tile_off_ptr + g + 1)
    offs_n = tl.arange(0, BLOCK_N)
    offs_mm = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = _head_dim_mask(offs_d, HEAD_DIM, BLOCK_D)
    if IS_COL:
        if e0 == e1:
            return  # no entries: no column key ranked here (nothing reads these rows)
        keys = tl.load(col_keys_ptr + bkv * COL_ROWS + tile * BLOCK_N + offs_n)
        key_ok = keys >= 0
    else:
        keys = tile * BLOCK_N + offs_n
        key_ok = keys < S
    key_off = keys.to(tl.int64)[:, None]
    k = tl.load(k_ptr + b * stride_kb + kvh * stride_kh + key_off * stride_ks + offs_d[None, :] * stride_kd,
                mask=key_ok[:, None] & d_ok, other=0.0)
    v = tl.load(v_ptr + b * stride_vb + kvh * stride_vh + key_off * stride_vs + offs_d[None, :] * stride_vd,
                mask=key_ok[:, None] & d_ok, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    word_of = offs_n // 32
    bit_of = (offs_n % 32).to(tl.int64)
    causal_lim = keys - (S - T)  # key j is seen by rows i >= j - (S - T)

    for e in range(e0, e1):
        h = kvh * GROUP + tl.load(ent_head_ptr + e)
        qb = tl.load(ent_qb_ptr + e)
        words = tl.load(ent_bits_ptr + e * WORDS + word_of)
        kmask = (((words >> bit_of) & 1) != 0) & key_ok
        bh = b * H + h
        q_base = q_ptr + b * stride_qb + h * stride_qh
        do_base = do_ptr + b * stride_dob + h * stride_doh
        for m0 in range(0, QBLOCK, BLOCK_M):
            rows = qb * QBLOCK + m0 + offs_mm
            r_ok = rows < T
            row_off = rows.to(tl.int64)[:, None]
            q = tl.load(q_base + row_off * stride_qt + offs_d[None, :] * stride_qd, mask=r_ok[:, None] & d_ok, other=0.0)
            do = tl.load(do_base + row_off * stride_dot + offs_d[None, :] * stride_dod, mask=r_ok[:, None] & d_ok,
                         other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse2 = tl.load(lse_ptr + bh * T + rows, mask=r_ok, other=0.0) * 1.4426950408889634
            delta = tl.load(delta_ptr + bh * T + rows, mask=r_ok, other=0.0)
            mask = kmask[:, None] & r_ok[None, :]
            if CAUSAL:
                mask = mask & (rows[None, :] >= causal_lim[:, None])
            qkT = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # [keys, rows]
            pT = tl.where(mask, tl.exp2(qkT * qk_scale - lse2[None, :]), 0.0)
            dv += tl.dot(pT.to(do_ptr.dtype.element_ty).to(do.dtype), do, input_precision=PRECISION)
            dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            dsT = pT * (dpT - delta[None, :])
            dk += tl.dot(dsT.to(q_ptr.dtype.element_ty).to(q.dtype), q, input_precision=PRECISION)
            if ATOMIC_DQ:
                dq = tl.dot(tl.trans(dsT.to(k_ptr.dtype.element_ty).to(k.dtype)), k, input_precision=PRECISION)
                tl.atomic_add(dq_acc_ptr + (bh * T + row_off) * HEAD_DIM + offs_d[None, :], dq * sm_scale,
                              mask=r_ok[:, None] & d_ok)

    if IS_COL:  # unscaled partials, summed with the range partials by _bwd_cols_finalize_kernel
        ptrs = (bkv * COL_ROWS + tile * BLOCK_N + offs_n).to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(col_dk_ptr + ptrs, dk, mask=d_ok)
        tl.store(col_dv_ptr + ptrs, dv, mask=d_ok)
    else:
        w_ok = key_ok[:, None] & d_ok
        tl.store(dk_ptr + b * stride_dkb + kvh * stride_dkh + key_off * stride_dks + offs_d[None, :],
                 (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=w_ok)
        tl.store(dv_ptr + b * stride_dvb + kvh * stride_dvh + key_off * stride_dvs + offs_d[None, :],
                 dv.to(dv_ptr.dtype.element_ty), mask=w_ok)
        if HAS_COLS:
            # column keys of this tile: also keep the unscaled fp32 range partial (their final
            # rows are written by the finalize kernel; reading the column partials here instead
            # costs registers that spill at head dim 128)
            slot = tl.load(slot_ptr + bkv * S + keys, mask=key_ok, other=-1)
            ptrs = (bkv * COL_ROWS + slot).to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
            s_ok = (slot >= 0)[:, None] & d_ok
            tl.store(rng_dk_ptr + ptrs, dk, mask=s_ok)
            tl.store(rng_dv_ptr + ptrs, dv, mask=s_ok)


@triton.jit
def _bwd_cols_finalize_kernel(
    col_keys_ptr, col_dk_ptr, col_dv_ptr, rng_dk_ptr, rng_dv_ptr, dk_ptr, dv_ptr,
    HKV, COL_ROWS, sm_scale,
    stride_dkb, stride_dkh, stride_dks,
    stride_dvb, stride_dvh, stride_dvs,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """dK/dV rows of column keys = column partial + range partial, written once each (the
    column keys of a kv head are distinct), after the range launch wrote every other row."""
    bkv = tl.program_id(1).to(tl.int64)
    b = bkv // HKV
    kvh = bkv % HKV
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = _head_dim_mask(offs_d, HEAD_DIM, BLOCK_D)
    keys = tl.load(col_keys_ptr + bkv * COL_ROWS + r, mask=r < COL_ROWS, other=-1)
    ok = (keys >= 0)[:, None] & d_ok
    src = (bkv * COL_ROWS + r).to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
    dk = tl.load(col_dk_ptr + src, mask=ok, other=0.0) + tl.load(rng_dk_ptr + src, mask=ok, other=0.0)
    dv = tl.load(col_dv_ptr + src, mask=ok, other=0.0) + tl.load(rng_dv_ptr + src, mask=ok, other=0.0)
    key_off = keys.to(tl.int64)[:, None]
    tl.store(dk_ptr + b * stride_dkb + kvh * stride_dkh + key_off * stride_dks + offs_d[None, :],
             (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=ok)
    tl.store(dv_ptr + b * stride_dvb + kvh * stride_dvh + key_off * stride_dvs + offs_d[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- configuration


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _fwd_config(block_m: int, head_dim: int, arch: int = 90, kernel: str = "fwd") -> dict:
    """(num_warps, num_stages) of the forward (``kernel="fwd"``) and dQ (``"dq"``) kernels,
    read off the kernel report at the launch's real specialization (its occupancy column):

    * sm_90: one warpgroup (4 warps) per 64-row query block, so each wgmma covers all 64 rows
      and the row max / sum stay inside the warpgroup; two blocks per SM (forward 189 regs at
      head dim 128, dQ 242), K/V loads pipelined 2 deep (3 at head dim 64). Eight warps split
      the 64 keys of a score tile across two warpgroups (an exchange through shared memory for
      every row reduction) and fit one block per SM.
    * sm_80 (mma.sync): 8 warps at head dim 128 (4 spill a few bytes), 4 at 64 for the forward.
    * 128-row query blocks: 8 warps (two warpgroups of 64 rows).
    Timings to confirm on a GPU: ``benchmarks/tune_block_sparse_attention.py``."""
    if block_m >= 128:
        return dict(num_warps=8, num_stages=3 if head_dim <= 64 else 2)
    if arch >= 90:
        return dict(num_warps=4, num_stages=3 if kernel == "fwd" and head_dim <= 64 else 2)
    if kernel == "fwd":
        return dict(num_warps=4, num_stages=3) if head_dim <= 64 else dict(num_warps=8, num_stages=3)
    return dict(num_warps=8, num_stages=2)


def _dkdv_config(head_dim: int, arch: int = 90) -> dict:
    """dK/dV: two fp32 accumulators [64 keys, D] and four [64, rows] tiles per step; the query
    rows of an entry are taken ``block_m`` at a time. sm_90: one warpgroup per 64-key tile, two
    blocks per SM, loads pipelined 2 deep (head dim 128 needs 32-row steps to stay under 255
    registers). sm_80: 8 warps with 32-row steps at head dim 128 (4 warps spill)."""
    if head_dim <= 64:
        return dict(num_warps=4, num_stages=2, block_m=64)
    if arch >= 90:
        return dict(num_warps=4, num_stages=2, block_m=32)
    return dict(num_warps=8, num_stages=2, block_m=32)


def _arch(t: torch.Tensor) -> int:
    """Compute capability of t's GPU as 80, 90, ...; 90 elsewhere (the interpreter ignores it)."""
    if t.is_cuda:
        major, minor = torch.cuda.get_device_capability(t.device)
        return 10 * major + minor
    return 90


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and _interpreted()


def _dummy(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """A real pointer for an absent or empty tensor argument (never dereferenced)."""
    if t is None or t.numel() == 0:
        return like
    return t


# --------------------------------------------------------------------------------- launchers


def block_sparse_attention(q, k, v, block_count, block_offset, column_count, column_index,
                           causal=True, scale=None, block_m=64, block_n=64, config: Optional[dict] = None):
    """(out [B, Hq, T, D] contiguous in q's dtype, lse [B, Hq, T] fp32). Index tensors
    contiguous, int32 or int64; shapes already checked by the op. ``config`` (num_warps,
    num_stages) overrides the launch (benchmarks/tune_block_sparse_attention.py)."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else float(scale)
    out = _empty((B, H, T, D), q, q.dtype)
    lse = _empty((B, H, T), q, torch.float32)
    if B * H * T == 0:
        return _finish(out, q.dtype), lse
    nqb = triton.cdiv(T, block_m)
    cfg = dict(config) if config else _fwd_config(block_m, D, _arch(q))
    with _device_ctx(q):
        _fwd_kernel[(nqb, B * H)](
            q, k, v, out, lse,
            block_count, _dummy(block_offset, block_count), column_count, _dummy(column_index, column_count),
            T, S, H, H // Hkv, nqb, block_offset.shape[-1], column_index.shape[-1], scale * LOG2E,
            *q.stride(), *k.stride(), *v.stride(), *out.stride()[:3],
            CAUSAL=bool(causal), HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_M=block_m, BLOCK_N=block_n,
            UPCAST=_upcast(q.dtype), PRECISION=_precision(q.dtype), **cfg,
        )
    return _finish(out, q.dtype), lse


def _bits_below(n: torch.Tensor) -> torch.Tensor:
    """(1 << n) - 1 for 0 <= n <= 32, in int64."""
    return torch.bitwise_left_shift(torch.ones_like(n), n) - 1


def build_backward_plan(block_count, block_offset, column_count, column_index, T, S, Hkv,
                        causal=True, block_m=64, block_n=64):
    """The per-(b, kv head, key tile) entry lists of the dK/dV kernel, with torch ops on the
    index's device: no atomics (sorts, prefix sums, index writes to distinct places), so the
    same index always gives the same lists. Two host syncs (``nonzero``) keep only the listed
    ranges and columns: the index is padded to its widest query block (at T = 32K, 16.8M
    range slots held 0.3M ranges), and every temporary here scales with what it holds.

    Entries are (tile, query head in group, query block, key mask). Tiles 0..NKB-1 of a kv
    head are the aligned key tiles that ranges cover; tiles NKB.. are column tiles: the
    distinct column keys of the kv head ranked in ascending order, TILE_N per tile. Spans
    and columns are clipped to keys that some row of the block may see (``[0, S)``, causal),
    so no entry is empty.

    Returns a dict: tile_off [B·Hkv·NTT + 1] int64 (CSR over tiles, NTT = NKB + NCT tiles per
    kv head), ent_head / ent_qb int32, ent_bits [E, WORDS] int64 (32-bit words), col_keys
    [B·Hkv, NCT·TILE_N] int32 (-1: empty slot), slot_of_key [B·Hkv, S] int32 (-1: not a
    column key), nkb, nct.
    """
    dev = block_count.device
    B, H, NQB = block_count.shape
    G = H // Hkv
    BH = B * Hkv
    NKB = triton.cdiv(S, TILE_N)
    MB, MC = block_offset.shape[-1], column_index.shape[-1]
    NCT = triton.cdiv(min(S, G * NQB * MC), TILE_N)
    NTT = NKB + NCT
    i64 = torch.int64

    qb_i = torch.arange(NQB, device=dev, dtype=i64)
    row_last = torch.clamp((qb_i + 1) * block_m, max=T) - 1
    lim = torch.clamp(row_last + (S - T), max=S - 1) if causal else torch.full_like(qb_i, S - 1)  # [NQB]

    keys_parts, words_parts = [], []
    word_lo = torch.arange(_MASK_WORDS, device=dev, dtype=i64) * 32
    if MB:
        listed = torch.arange(MB, device=dev) < block_count[..., None].to(i64)
        b_r, h_r, qb_r, j_r = listed.nonzero(as_tuple=True)  # host sync: the listed ranges only
        starts = block_offset[b_r, h_r, qb_r, j_r].to(i64)[:, None]  # [R, 1]
        pieces = triton.cdiv(block_n, TILE_N) + 1
        t = torch.div(starts, TILE_N, rounding_mode="floor") + torch.arange(pieces, device=dev)  # [R, pieces]
        lo = torch.maximum(torch.maximum(starts, t * TILE_N), torch.zeros((), dtype=i64, device=dev))
        hi = torch.minimum(torch.minimum(starts + block_n, (t + 1) * TILE_N), lim[qb_r][:, None] + 1)
        ok = hi > lo
        bkv = (b_r * Hkv + h_r // G)[:, None]
        key = (bkv * NTT + t) * (G * NQB) + ((h_r % G) * NQB + qb_r)[:, None]
        keys_parts.append(torch.where(ok, key, _I64_MAX).reshape(-1))
        rel_lo = (lo - t * TILE_N)[..., None] - word_lo
        rel_hi = (hi - t * TILE_N)[..., None] - word_lo
        words = _bits_below(rel_hi.clamp(0, 32)) - _bits_below(rel_lo.clamp(0, 32))
        words_parts.append(torch.where(ok[..., None], words, 0).reshape(-1, _MASK_WORDS))

    col_keys = torch.full((BH, max(NCT, 1) * TILE_N), -1, dtype=torch.int32, device=dev)
    slot_of_key = torch.full((BH, S), -1, dtype=torch.int32, device=dev)
    if MC and NCT:
        cols = column_index.to(i64)
        listed = torch.arange(MC, device=dev) < column_count[..., None].to(i64)
        ok = listed & (cols >= 0) & (cols <= lim[:, None])
        flat_ok = ok.reshape(-1).nonzero().squeeze(1)  # host sync: position in [B, H, NQB, MC]
    if MC and NCT and flat_ok.numel():  # the count is known on the host after the sync
        h_c = (flat_ok // (NQB * MC)) % H
        bkv_c = (flat_ok // (H * NQB * MC)) * Hkv + h_c // G
        ck_sorted, order = torch.sort(bkv_c * S + cols.reshape(-1)[flat_ok])
        first = torch.ones_like(ck_sorted, dtype=torch.bool)
        first[1:] = ck_sorted[1:] != ck_sorted[:-1]
        distinct = torch.cumsum(first.to(i64), 0)  # distinct keys up to and including i
        owner = ck_sorted // S
        # distinct keys of lower kv heads: count before the first entry of this kv head
        head_start = torch.searchsorted(ck_sorted, torch.arange(BH, device=dev, dtype=i64) * S)
        before = torch.where(head_start > 0, distinct[(head_start - 1).clamp(min=0)], 0)
        rank = distinct - 1 - before[owner]
        col = ck_sorted % S
        # key tables: written once per distinct key (distinct places: deterministic)
        trash_k, trash_s = BH * col_keys.shape[1], BH * S
        ck_flat = torch.cat([col_keys.view(-1), col_keys.new_full((1,), -1)])
        ck_flat[torch.where(first, owner * col_keys.shape[1] + rank, trash_k)] = col.to(torch.int32)
        col_keys = ck_flat[:-1].view(BH, -1)
        sk_flat = torch.cat([slot_of_key.view(-1), slot_of_key.new_full((1,), -1)])
        sk_flat[torch.where(first, owner * S + col, trash_s)] = rank.to(torch.int32)
        slot_of_key = sk_flat[:-1].view(BH, S)
        # entries: (column tile, head in group, block) with one bit
        flat = flat_ok[order]  # position in [B, H, NQB, MC]
        hq = (flat // (NQB * MC)) % H
        qb = (flat // MC) % NQB
        tile = NKB + rank // TILE_N
        keys_parts.append((owner * NTT + tile) * (G * NQB) + (hq % G) * NQB + qb)
        slot = (rank % TILE_N)[:, None]
        bit = torch.bitwise_left_shift(torch.ones_like(slot), (slot - word_lo).clamp(0, 31))
        in_word = (slot >= word_lo) & (slot < word_lo + 32)
        words_parts.append(torch.where(in_word, bit, 0))

    if keys_parts:
        keys = torch.cat(keys_parts)
        words = torch.cat(words_parts)
    else:
        keys = torch.full((0,), _I64_MAX, dtype=i64, device=dev)
        words = torch.zeros((0, _MASK_WORDS), dtype=i64, device=dev)
    E = keys.numel()
    sorted_keys, order = torch.sort(keys)
    words = words[order]
    first = torch.ones(E, dtype=torch.bool, device=dev)
    last = torch.ones(E, dtype=torch.bool, device=dev)
    if E > 1:
        first[1:] = sorted_keys[1:] != sorted_keys[:-1]
        last[:-1] = first[1:]
    # Merge each run of equal keys (one (tile, head, block)): its masks are disjoint, so the
    # OR is the sum, taken as a difference of prefix sums (exact in int64). Only 1-D scans:
    # torch runs those as one device-wide scan, while a scan down dim 0 of [E, WORDS] (or a
    # cummax) walks the E rows nearly serially on a GPU (380 ms at T = 8K on an H200).
    csum = torch.stack([torch.cumsum(words[:, w].contiguous(), 0) for w in range(_MASK_WORDS)], 1)
    run = torch.cumsum(first.to(i64), 0) - 1  # which run each entry belongs to
    run_base = torch.zeros((E + 1, _MASK_WORDS), dtype=i64, device=dev)
    run_base[torch.where(first, run, E)] = csum - words  # one write per run: distinct places
    merged = csum - run_base[run.clamp(min=0)]
    keep = last & (sorted_keys != _I64_MAX)
    target = torch.where(keep, torch.cumsum(keep.to(i64), 0) - 1, E)
    ent_keys = torch.full((E + 1,), _I64_MAX, dtype=i64, device=dev)
    ent_keys[target] = sorted_keys
    ent_bits = torch.zeros((E + 1, _MASK_WORDS), dtype=i64, device=dev)
    ent_bits[target] = merged
    ent_keys, ent_bits = ent_keys[:E], ent_bits[:E]
    within = torch.where(ent_keys != _I64_MAX, ent_keys % (G * NQB), 0)
    ent_head = (within // NQB).to(torch.int32)
    ent_qb = (within % NQB).to(torch.int32)
    bounds = torch.arange(BH * NTT + 1, device=dev, dtype=i64) * (G * NQB)
    tile_off = torch.searchsorted(ent_keys, bounds)
    return dict(tile_off=tile_off, ent_head=ent_head, ent_qb=ent_qb, ent_bits=ent_bits.contiguous(),
                col_keys=col_keys, slot_of_key=slot_of_key, nkb=NKB, nct=NCT)


def block_sparse_attention_backward(grad_out, grad_lse, q, k, v, out, lse,
                                    block_count, block_offset, column_count, column_index,
                                    causal=True, scale=None, block_m=64, block_n=64, deterministic=True,
                                    configs: Optional[dict] = None, plan: Optional[dict] = None):
    """(dq, dk, dv), contiguous, in the inputs' dtypes. Extra memory: delta [B, Hq, T] fp32, the
    tile plan (O(index entries)), and with columns four fp32 buffers of min(S, G·NQB·MAX_COLS)
    rows × D per kv head; ``deterministic=False`` adds an fp32 dQ buffer. ``configs`` may
    override the launches: ``{"dq": {num_warps, num_stages}, "dkdv": {num_warps, num_stages,
    block_m}}`` (benchmarks/tune_block_sparse_attention.py). ``plan``: a ``build_backward_plan``
    result for this index, to time the kernels without it."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    scale = D ** -0.5 if scale is None else float(scale)
    if B * H * T == 0 or S == 0:  # nothing attended: every gradient is zero
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    dq = _empty((B, H, T, D), q, q.dtype)
    dk = _empty((B, Hkv, S, D), k, k.dtype)
    dv = _empty((B, Hkv, S, D), v, v.dtype)
    upcast, precision = _upcast(q.dtype), _precision(q.dtype)
    BLOCK_D = _block_d(D)
    nqb = triton.cdiv(T, block_m)

    delta = _empty((B, H, T), q, torch.float32)  # NaN under poisoning: an unwritten row fails the tests
    block_t = 64
    with _device_ctx(q):
        _bwd_delta_kernel[(triton.cdiv(T, block_t), B * H)](
            out, grad_out, _dummy(grad_lse, lse), delta, T, H,
            *out.stride(), *grad_out.stride(), *(grad_lse.stride() if grad_lse is not None else (0, 0, 0)),
            HAS_DLSE=grad_lse is not None, HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_T=block_t,
            num_warps=4,
        )

    configs = configs or {}
    arch = _arch(q)
    if deterministic:
        cfg = dict(configs.get("dq") or _fwd_config(block_m, D, arch, kernel="dq"))
        with _device_ctx(q):
            _bwd_dq_kernel[(nqb, B * H)](
                q, k, v, grad_out, lse, delta, dq,
                block_count, _dummy(block_offset, block_count), column_count, _dummy(column_index, column_count),
                T, S, H, G, nqb, block_offset.shape[-1], column_index.shape[-1], scale * LOG2E, scale,
                *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride()[:3],
                CAUSAL=bool(causal), HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=block_m, BLOCK_N=block_n,
                UPCAST=upcast, PRECISION=precision, **cfg,
            )
        dq_acc = delta  # unused pointer
    else:
        dq_acc = torch.zeros((B, H, T, D), device=q.device, dtype=torch.float32)

    if plan is None:
        plan = build_backward_plan(block_count, block_offset, column_count, column_index, T, S, Hkv,
                                   causal=causal, block_m=block_m, block_n=block_n)
    nkb, nct = plan["nkb"], plan["nct"]
    col_rows = plan["col_keys"].shape[1]
    if nct:  # column partials, and the range partials of the same keys
        col_dk, col_dv, rng_dk, rng_dv = torch.empty((4, B * Hkv, col_rows, D), device=q.device, dtype=torch.float32)
    else:
        col_dk = col_dv = rng_dk = rng_dv = delta
    dkdv_cfg = dict(configs.get("dkdv") or _dkdv_config(D, arch))
    sub_m = min(block_m, dkdv_cfg["block_m"])
    common = (
        q, k, v, grad_out, lse, delta, dk, dv, dq_acc,
        plan["tile_off"], plan["ent_head"], plan["ent_qb"], plan["ent_bits"],
        plan["col_keys"], plan["slot_of_key"], col_dk, col_dv, rng_dk, rng_dv,
        T, S, H, Hkv, G, nkb + nct,
    )
    tail = (
        col_rows, scale * LOG2E, scale,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride()[:3], *dv.stride()[:3],
    )
    meta = dict(ATOMIC_DQ=not deterministic, CAUSAL=bool(causal), HEAD_DIM=D, BLOCK_D=BLOCK_D, QBLOCK=block_m,
                BLOCK_M=sub_m, BLOCK_N=TILE_N, WORDS=_MASK_WORDS, UPCAST=upcast, PRECISION=precision,
                num_warps=dkdv_cfg["num_warps"], num_stages=dkdv_cfg["num_stages"])
    with _device_ctx(q):
        if nct:  # column partials; the finalize kernel adds them to the range partials
            _bwd_dkdv_kernel[(nct, B * Hkv)](*common, nkb, *tail, IS_COL=True, HAS_COLS=True, **meta)
        _bwd_dkdv_kernel[(nkb, B * Hkv)](*common, 0, *tail, IS_COL=False, HAS_COLS=nct > 0, **meta)
        if nct:
            block_r = 32
            _bwd_cols_finalize_kernel[(triton.cdiv(col_rows, block_r), B * Hkv)](
                plan["col_keys"], col_dk, col_dv, rng_dk, rng_dv, dk, dv, Hkv, col_rows, scale,
                *dk.stride()[:3], *dv.stride()[:3], HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_R=block_r, num_warps=4,
            )
    if not deterministic:
        dq = dq_acc
    return _finish(dq, q.dtype), _finish(dk, k.dtype), _finish(dv, v.dtype)


# ------------------------------------------------------------------------------ kernel report


def launch_specs() -> list:
    """Launch configurations for the static kernel report (see sparse_gather.launch_specs):
    bf16, head dims 64 and 128, 64×64 blocks. Allowed spills were located with nvdisasm: no
    local-memory access inside the kernels' main loops."""
    specs = []
    idx = dict(bcount_ptr="*i32", boff_ptr="*i32", ccount_ptr="*i32", cidx_ptr="*i32")
    dims = dict(T="i32", S="i32", H="i32", GROUP="i32", NQB="i32", MAX_BLOCKS="i32", MAX_COLS="i32",
                qk_scale="fp32")
    # batch/head strides as int64; row strides as int32, as Triton specializes them at run
    # time for every realistic layout (a row stride is at most H·D)
    strides = {f"stride_{t}{a}": "i64" for t in ("q", "k", "v", "do") for a in ("b", "h")}
    strides.update({f"stride_{t}": "i32" for t in ("qt", "ks", "vs", "dot")})
    unit = {f"stride_{t}d": 1 for t in ("q", "k", "v", "do")}
    for arch, d in ((80, 64), (80, 128), (90, 64), (90, 128)):  # the launch configs differ per arch
        cfg = _fwd_config(64, d, arch)
        qcfg = _fwd_config(64, d, arch, kernel="dq")
        specs.append(dict(
            name=f"bsa_fwd[bf16,d={d}]", kernel=_fwd_kernel,
            types=dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", out_ptr="*bf16", lse_ptr="*fp32", **idx, **dims,
                       **strides, stride_ob="i64", stride_oh="i64", stride_ot="i32"),
            constexprs=dict(stride_qd=1, stride_kd=1, stride_vd=1, CAUSAL=True, HEAD_DIM=d, BLOCK_D=d, BLOCK_M=64,
                            BLOCK_N=64, UPCAST=False, PRECISION="tf32"),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], matmul=True, main=d == 128, archs=(arch,),
            allow={},
        ))
        specs.append(dict(
            name=f"bsa_bwd_dq[bf16,d={d}]", kernel=_bwd_dq_kernel,
            types=dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", do_ptr="*bf16", lse_ptr="*fp32",
                       delta_ptr="*fp32", dq_ptr="*bf16", **idx, **dims, sm_scale="fp32", **strides,
                       stride_dqb="i64", stride_dqh="i64", stride_dqt="i32"),
            constexprs=dict(**unit, CAUSAL=True, HEAD_DIM=d, BLOCK_D=d, BLOCK_M=64, BLOCK_N=64, UPCAST=False,
                            PRECISION="tf32"),
            num_warps=qcfg["num_warps"], num_stages=qcfg["num_stages"], matmul=True, main=False, archs=(arch,),
            allow={},
        ))
        kcfg = _dkdv_config(d, arch)
        for is_col in (False, True):
            specs.append(dict(
                name=f"bsa_bwd_dkdv[bf16,d={d},{'columns' if is_col else 'ranges'}]", kernel=_bwd_dkdv_kernel,
                types=dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", do_ptr="*bf16", lse_ptr="*fp32",
                           delta_ptr="*fp32", dk_ptr="*bf16", dv_ptr="*bf16", dq_acc_ptr="*fp32",
                           tile_off_ptr="*i64", ent_head_ptr="*i32", ent_qb_ptr="*i32", ent_bits_ptr="*i64",
                           col_keys_ptr="*i32", slot_ptr="*i32", col_dk_ptr="*fp32", col_dv_ptr="*fp32",
                           rng_dk_ptr="*fp32", rng_dv_ptr="*fp32",
                           T="i32", S="i32", H="i32", HKV="i32", GROUP="i32", TILES="i32", TILE0="i32",
                           COL_ROWS="i32", qk_scale="fp32", sm_scale="fp32", **strides,
                           stride_dkb="i64", stride_dkh="i64", stride_dks="i32",
                           stride_dvb="i64", stride_dvh="i64", stride_dvs="i32"),
                constexprs=dict(**unit, IS_COL=is_col, HAS_COLS=True, ATOMIC_DQ=False, CAUSAL=True, HEAD_DIM=d,
                                BLOCK_D=d, QBLOCK=64, BLOCK_M=kcfg["block_m"], BLOCK_N=TILE_N, WORDS=_MASK_WORDS,
                                UPCAST=False, PRECISION="tf32"),
                num_warps=kcfg["num_warps"], num_stages=kcfg["num_stages"], matmul=True,
                main=False, archs=(arch,), allow={},
            ))
    specs.append(dict(
        name="bsa_bwd_delta[bf16,d=128]", kernel=_bwd_delta_kernel,
        types=dict(o_ptr="*bf16", do_ptr="*bf16", dlse_ptr="*fp32", delta_ptr="*fp32", T="i32", H="i32",
                   stride_ob="i64", stride_oh="i64", stride_ot="i32", stride_dob="i64", stride_doh="i64",
                   stride_dot="i32", stride_lb="i64", stride_lh="i64", stride_lt="i32"),
        constexprs=dict(stride_od=1, stride_dod=1, HAS_DLSE=False, HEAD_DIM=128, BLOCK_D=128, BLOCK_T=64),
        num_warps=4, num_stages=1, main=False, allow={},
    ))
    for spec in specs:  # the benchmarks' prompt lengths (8K, 32K) are multiples of 16, as T, S
        spec["divisible"] = tuple(n for n in ("T", "S") if n in spec["types"])
    return specs
