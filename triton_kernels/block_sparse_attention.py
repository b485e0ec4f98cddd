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

import itertools
from typing import Optional

import torch
import triton
import triton.language as tl

from .sparse_gather import _device_ctx, _empty, _finish, config_arch, needs_upcast

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
def _range_keys(boff_row, i, n_blocks, offs_nn, lim_lo, S, BLOCK_N: tl.constexpr, STEP: tl.constexpr):
    """Keys of ranges i .. i + STEP - 1, each [start, start + BLOCK_N), side by side in one tile
    of STEP·BLOCK_N keys: which exist, and whether the tile needs the per-element mask (a range
    crosses the diagonal or an end of the keys, or the last step has fewer than STEP ranges)."""
    start = tl.minimum(tl.maximum(tl.load(boff_row + i), -BLOCK_N), S).to(tl.int32)
    masked = (start < 0) | (start + (BLOCK_N - 1) > lim_lo)
    if STEP == 1:
        keys = start + offs_nn
    else:  # STEP == 2
        has_2nd = i + 1 < n_blocks
        start2 = tl.load(boff_row + i + 1, mask=has_2nd, other=S)  # absent: all its keys >= S
        start2 = tl.minimum(tl.maximum(start2, -BLOCK_N), S).to(tl.int32)
        masked = masked | (start2 < 0) | (start2 + (BLOCK_N - 1) > lim_lo)
        keys = tl.where(offs_nn < BLOCK_N, start + offs_nn, start2 + (offs_nn - BLOCK_N))
    kv_ok = (keys >= 0) & (keys < S)
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
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STEP: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    qb = NQB - 1 - tl.program_id(0)  # late query blocks (most keys under causal) first
    h = tl.program_id(1)  # grid (·, H, B): heads on y, batch on z (each < 65536; B·H on one axis was not)
    b = tl.program_id(2).to(tl.int64)
    bh = b * H + h
    kvh = h // GROUP
    idx = bh * NQB + qb  # row of the (contiguous) index tensors

    offs_mm = tl.arange(0, BLOCK_M)
    offs_m = qb * BLOCK_M + offs_mm
    offs_nn = tl.arange(0, STEP * BLOCK_N)  # one step's keys: STEP ranges, or STEP·BLOCK_N columns
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
    for i in range(0, n_blocks, STEP):
        keys, kv_ok, masked = _range_keys(boff_row, i, n_blocks, offs_nn, lim_lo, S, BLOCK_N, STEP)
        k, v = _load_kv(k_base, v_base, keys, kv_ok, stride_ks, stride_kd, stride_vs, stride_vd, offs_d, d_ok, UPCAST)
        m_i, l_i, acc = _fwd_step(q, k, v, keys, kv_ok, masked, lim, m_i, l_i, acc, qk_scale, v_ptr, PRECISION)
    cidx_row = cidx_ptr + idx * MAX_COLS
    for c0 in range(0, n_cols, STEP * BLOCK_N):
        keys, kv_ok = _column_keys(cidx_row, c0, n_cols, offs_nn, S)
        k, v = _load_kv(k_base, v_base, keys, kv_ok, stride_ks, stride_kd, stride_vs, stride_vd, offs_d, d_ok, UPCAST)
        m_i, l_i, acc = _fwd_step(q, k, v, keys, kv_ok, True, lim, m_i, l_i, acc, qk_scale, v_ptr, PRECISION)

    empty = l_i == 0.0  # (a NaN row is not empty: its lse stays NaN, as the reference's)
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]  # rows that saw nothing: acc = 0 -> out = 0
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
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
    h = tl.program_id(1)  # grid (·, H, B): heads on y, batch on z (each < 65536; B·H on one axis was not)
    b = tl.program_id(2).to(tl.int64)
    bh = b * H + h
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
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STEP: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dQ of one (b, h, qb): the forward's walk, P from the saved lse, dS = P ∘ (dP - delta)."""
    qb = NQB - 1 - tl.program_id(0)
    h = tl.program_id(1)  # grid (·, H, B): heads on y, batch on z (each < 65536; B·H on one axis was not)
    b = tl.program_id(2).to(tl.int64)
    bh = b * H + h
    kvh = h // GROUP
    idx = bh * NQB + qb

    offs_mm = tl.arange(0, BLOCK_M)
    offs_m = qb * BLOCK_M + offs_mm
    offs_nn = tl.arange(0, STEP * BLOCK_N)  # one step's keys: STEP ranges, or STEP·BLOCK_N columns
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
    for i in range(0, n_blocks, STEP):
        keys, kv_ok, masked = _range_keys(boff_row, i, n_blocks, offs_nn, lim_lo, S, BLOCK_N, STEP)
        k, v = _load_kv(k_base, v_base, keys, kv_ok, stride_ks, stride_kd, stride_vs, stride_vd, offs_d, d_ok, UPCAST)
        dq = _dq_step(q, do, k, v, keys, kv_ok, masked, lim, lse2, delta, dq, qk_scale, k_ptr, PRECISION)
    cidx_row = cidx_ptr + idx * MAX_COLS
    for c0 in range(0, n_cols, STEP * BLOCK_N):
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
    kvh = tl.program_id(1)  # grid (·, Hkv, B)
    b = tl.program_id(2).to(tl.int64)
    bkv = b * HKV + kvh
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

    # One flat loop over (entry, BLOCK_M-row slice of its query block): Triton pipelines only
    # innermost loops, and a nested walk re-primed and drained the Q/dO prefetch per entry.
    SUB: tl.constexpr = QBLOCK // BLOCK_M
    for it in range(e0 * SUB, e1 * SUB):
        e = it // SUB
        h = kvh * GROUP + tl.load(ent_head_ptr + e)
        qb = tl.load(ent_qb_ptr + e)
        words = tl.load(ent_bits_ptr + e * WORDS + word_of)
        kmask = (((words >> bit_of) & 1) != 0) & key_ok
        bh = b * H + h
        q_base = q_ptr + b * stride_qb + h * stride_qh
        do_base = do_ptr + b * stride_dob + h * stride_doh
        rows = qb * QBLOCK + (it % SUB) * BLOCK_M + offs_mm
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
    kvh = tl.program_id(1)  # grid (·, Hkv, B)
    b = tl.program_id(2).to(tl.int64)
    bkv = b * HKV + kvh
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
    * head dims above 128 (Gemma's 256): 8 warps, 2 stages on both arches (sm_90: forward 211
      regs / 168 KB, dQ 246 regs / 196 KB; sm_80: 184 / 104 KB, 255 / 136 KB; no spills).
    Launches that need more shared memory than the GPU gives a block run with fewer stages
    (``_launch_fitting``).
    * ``tiles_per_step``: key tiles of ``block_n`` keys per online-softmax step (1 or 2). Two
      make each step's GEMMs [64, 128] and halve the per-step work that does not scale with
      the keys (the rescale of the [64, D] accumulator, the row max and sum, the loop's
      barriers); at head dim 128 it builds without spilling on sm_90 only with 8 warps
      (``_two_tiles_config``; kernel report). 1 until timed against 2.
    Timings to confirm on a GPU: ``benchmarks/tune_block_sparse_attention.py``."""
    if head_dim > 128:  # [64, 256] fp32 accumulators: 4 warps spill 0.2-2 KB, 8 none (both arches)
        return dict(num_warps=8, num_stages=2, tiles_per_step=1)
    if block_m >= 128:
        return dict(num_warps=8, num_stages=3 if head_dim <= 64 else 2, tiles_per_step=1)
    if arch >= 90:
        return dict(num_warps=4, num_stages=3 if kernel == "fwd" and head_dim <= 64 else 2, tiles_per_step=1)
    if kernel == "fwd":
        return dict(num_warps=4, num_stages=3, tiles_per_step=1) if head_dim <= 64 else \
            dict(num_warps=8, num_stages=3, tiles_per_step=1)
    return dict(num_warps=8, num_stages=2, tiles_per_step=1)


def _two_tiles_config(head_dim: int, kernel: str = "fwd") -> dict:
    """sm_90 launch of the ``tiles_per_step=2`` candidate that keeps its build free of spills
    (kernel report; one warpgroup spills 0.2-0.6 KB at head dim 128, and 24 B in dQ at 64): the
    [64, 128] score tile, the accumulator and P need two warpgroups, except the head-dim-64
    forward."""
    if head_dim <= 64 and kernel == "fwd":
        return dict(num_warps=4, num_stages=2, tiles_per_step=2)
    return dict(num_warps=8, num_stages=2, tiles_per_step=2)


def _launch_config(cfg: dict) -> tuple[int, dict]:
    """(tiles_per_step, the rest as launch keywords) of a forward / dQ config."""
    cfg = dict(cfg)
    step = int(cfg.pop("tiles_per_step", 1))
    if step not in (1, 2):
        raise ValueError(f"tiles_per_step must be 1 or 2, got {step}")
    return step, cfg


def _dkdv_config(head_dim: int, arch: int = 90) -> dict:
    """dK/dV: two fp32 accumulators [64 keys, D] and four [64, rows] tiles per step; the query
    rows of an entry are taken ``block_m`` at a time. sm_90: one warpgroup per 64-key tile, two
    blocks per SM, loads pipelined 2 deep (head dim 128 needs 32-row steps to stay under 255
    registers). sm_80: 8 warps with 32-row steps at head dim 128 (4 warps spill). Head dims
    above 128: 8 warps, 32-row steps on both (4 warps spill 4-7 KB)."""
    if head_dim > 128:
        return dict(num_warps=8, num_stages=2, block_m=32)
    if head_dim <= 64:
        return dict(num_warps=4, num_stages=2, block_m=64)
    if arch >= 90:
        return dict(num_warps=4, num_stages=2, block_m=32)
    return dict(num_warps=8, num_stages=2, block_m=32)


def _arch(t: torch.Tensor) -> int:
    """80 or 90: which of the configs below suit t's GPU (``sparse_gather.config_arch``)."""
    return config_arch(t.device)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _dummy(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """A real pointer for an absent or empty tensor argument (never dereferenced)."""
    if t is None or t.numel() == 0:
        return like
    return t


# --------------------------------------------------------------------------------- launchers

_FITTED_STAGES: dict = {}  # (kernel, device, launch meta) -> the pipeline depth that loaded


def _launch_fitting(kernel, grid, args, meta: dict, device: torch.device, what: str, exact: bool = False) -> None:
    """``kernel[grid](*args, **meta)``, with fewer pipeline stages when the build needs more
    shared memory than this GPU gives one block (each stage buffers a K and a V tile): the
    configs are sized for A100 / H100 (163 / 227 KB), and block sizes above 64, head dims above
    128 or a GPU with ~100 KB per block (sm_86 / sm_89 / sm_120) may not fit them. Triton
    refuses such a build before launching it (``OutOfResources``); the depth that loaded is
    remembered per launch shape. Fails with the sizes when even one stage does not fit.
    ``exact``: a caller's explicit config (the tuning sweep) launches as given or fails."""
    from triton.runtime.errors import OutOfResources

    key = (what, device, tuple(sorted(meta.items())))
    stages = meta.get("num_stages", 2) if exact else _FITTED_STAGES.get(key, meta.get("num_stages", 2))
    while True:
        try:
            kernel[grid](*args, **dict(meta, num_stages=stages))
        except OutOfResources as e:
            if exact:
                raise
            if e.name != "shared memory" or stages <= 1:
                sizes = ", ".join(f"{n}={meta[n]}" for n in ("HEAD_DIM", "QBLOCK", "BLOCK_M", "BLOCK_N") if n in meta)
                raise RuntimeError(
                    f"block_sparse_attention: the {what} kernel ({sizes}) needs {e.required} bytes of "
                    f"{e.name} per block even unpipelined, and this GPU allows {e.limit}: use smaller "
                    f"block_m / block_n (64 x 64 fits every supported GPU up to head dim 128)") from e
            stages -= 1
            continue
        _FITTED_STAGES[key] = stages
        return



_MAX_GRID_YZ = 65535  # CUDA's limit on grid y and z, where heads and batch go


def _check_grid(B: int, H: int, what: str) -> None:
    if B > _MAX_GRID_YZ or H > _MAX_GRID_YZ:
        raise ValueError(f"block_sparse_attention {what}: the Triton kernels launch one grid row per head and one "
                         f"layer per batch entry, at most {_MAX_GRID_YZ} each; got batch {B}, heads {H} (split the "
                         "batch)")


def block_sparse_attention(q, k, v, block_count, block_offset, column_count, column_index,
                           causal=True, scale=None, block_m=64, block_n=64, config: Optional[dict] = None):
    """(out [B, Hq, T, D] contiguous in q's dtype, lse [B, Hq, T] fp32). Index tensors
    contiguous, int32 or int64; shapes already checked by the op. ``config`` (num_warps,
    num_stages, tiles_per_step) overrides the launch (benchmarks/tune_block_sparse_attention.py)."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    _check_grid(B, H, "forward")
    scale = D ** -0.5 if scale is None else float(scale)
    out = _empty((B, H, T, D), q, q.dtype)
    lse = _empty((B, H, T), q, torch.float32)
    if B * H * T == 0:
        return _finish(out, q.dtype), lse
    nqb = triton.cdiv(T, block_m)
    step, cfg = _launch_config(config or _fwd_config(block_m, D, _arch(q)))
    with _device_ctx(q):
        _launch_fitting(_fwd_kernel, (nqb, H, B), (
            q, k, v, out, lse,
            block_count, _dummy(block_offset, block_count), column_count, _dummy(column_index, column_count),
            T, S, H, H // Hkv, nqb, block_offset.shape[-1], column_index.shape[-1], scale * LOG2E,
            *q.stride(), *k.stride(), *v.stride(), *out.stride()[:3],
        ), dict(CAUSAL=bool(causal), HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_M=block_m, BLOCK_N=block_n, STEP=step,
                UPCAST=needs_upcast(q.dtype), PRECISION=_precision(q.dtype), **cfg), q.device, "forward",
            exact=config is not None)
    return _finish(out, q.dtype), lse


# ----------------------------------------------------------------------- backward tile plan
#
# The plan is built on the index's device in about 30 launches. The eager-torch version it
# replaces issued 212 aten ops (torch profiler, the benchmark's T = 8K index) and took 3.0 ms
# on an H200, as much as ~10-15 µs of host time per op would explain; the new one gives the
# same lists (compared on 60 random indices and the benchmark's). Keys sort as
# (b·Hkv + kv head, tile, query head in group, query block); _I64_MAX marks an empty slot
# (sorted last, never listed).


@triton.jit
def _bits_below_i64(n):
    """(1 << n) - 1 for 0 <= n <= 32 (int64)."""
    return (tl.full(n.shape, 1, tl.int64) << n) - 1


@triton.jit
def _plan_ranges_kernel(
    bcount_ptr, boff_ptr, first_ptr, keys_ptr, words_ptr,
    T, S, H, HKV, GROUP, NQB, MB, NTT, QBLOCK,
    CAUSAL: tl.constexpr, RANGE_N: tl.constexpr, PIECES: tl.constexpr, CHUNK: tl.constexpr,
    TILE: tl.constexpr,
):
    """One program per (b, query head, query block): each listed range [s, s + RANGE_N) gives
    PIECES entries, one per aligned key tile it may touch (key, two 32-bit mask words),
    clipped to [0, S) and to the keys the block's last row sees; an empty piece gets key MAX.
    Entries go to slots (first[row] + j)·PIECES + piece: first = exclusive prefix of counts."""
    r = tl.program_id(0).to(tl.int64)
    qb = r % NQB
    bh = r // NQB
    h = bh % H
    bkv = (bh // H) * HKV + h // GROUP
    within = (h % GROUP) * NQB + qb
    n = tl.minimum(tl.maximum(tl.load(bcount_ptr + r), 0), MB)
    base = tl.load(first_ptr + r)
    if CAUSAL:
        lim = tl.minimum(tl.minimum((qb + 1) * QBLOCK, T) - 1 + (S - T), S - 1)
    else:
        lim = S - 1
    for j0 in range(0, n, CHUNK):
        j = j0 + tl.arange(0, CHUNK)
        jm = j < n
        start = tl.load(boff_ptr + r * MB + j, mask=jm, other=0).to(tl.int64)
        # clamped where no piece can change, then floor-divided with a non-negative numerator
        start = tl.minimum(tl.maximum(start, -(RANGE_N + TILE)), S + TILE)
        tile0 = (start + 1024 * TILE) // TILE - 1024
        for p in tl.static_range(PIECES):
            t = tile0 + p
            lo = tl.maximum(tl.maximum(start, t * TILE), 0)
            hi = tl.minimum(tl.minimum(start + RANGE_N, (t + 1) * TILE), lim + 1)
            ok = jm & (hi > lo)
            key = tl.where(ok, (bkv * NTT + t) * (GROUP * NQB) + within, 9223372036854775807)
            rel_lo = lo - t * TILE
            rel_hi = hi - t * TILE
            w0 = _bits_below_i64(tl.minimum(tl.maximum(rel_hi, 0), 32)) - _bits_below_i64(tl.minimum(tl.maximum(rel_lo, 0), 32))
            w1 = (_bits_below_i64(tl.minimum(tl.maximum(rel_hi - 32, 0), 32))
                  - _bits_below_i64(tl.minimum(tl.maximum(rel_lo - 32, 0), 32)))
            slot = (base + j) * PIECES + p
            tl.store(keys_ptr + slot, key, mask=jm)
            tl.store(words_ptr + 2 * slot, tl.where(ok, w0, 0), mask=jm)
            tl.store(words_ptr + 2 * slot + 1, tl.where(ok, w1, 0), mask=jm)


@triton.jit
def _plan_columns_kernel(
    ccount_ptr, cidx_ptr, first_ptr, ckey_ptr, within_ptr,
    T, S, H, HKV, GROUP, NQB, MC, QBLOCK,
    CAUSAL: tl.constexpr, CHUNK: tl.constexpr,
):
    """One program per (b, query head, query block): each listed column that some row of the
    block may see becomes (b·Hkv + kv head)·S + key, beside (head in group, block); others
    get MAX. Slots first[row] + c (exclusive prefix of the column counts)."""
    r = tl.program_id(0).to(tl.int64)
    qb = r % NQB
    bh = r // NQB
    h = bh % H
    bkv = (bh // H) * HKV + h // GROUP
    within = ((h % GROUP) * NQB + qb).to(tl.int32)
    n = tl.minimum(tl.maximum(tl.load(ccount_ptr + r), 0), MC)
    base = tl.load(first_ptr + r)
    if CAUSAL:
        lim = tl.minimum(tl.minimum((qb + 1) * QBLOCK, T) - 1 + (S - T), S - 1)
    else:
        lim = S - 1
    for c0 in range(0, n, CHUNK):
        c = c0 + tl.arange(0, CHUNK)
        cm = c < n
        col = tl.load(cidx_ptr + r * MC + c, mask=cm, other=-1).to(tl.int64)
        ok = cm & (col >= 0) & (col <= lim)
        tl.store(ckey_ptr + base + c, tl.where(ok, bkv * S + col, 9223372036854775807), mask=cm)
        tl.store(within_ptr + base + c, within + 0 * c.to(tl.int32), mask=cm)


@triton.jit
def _plan_column_rank_kernel(
    ck_ptr, within_ptr, distinct_ptr, before_ptr, col_keys_ptr, slot_ptr, keys_ptr, words_ptr,
    C, S, NTT, NKB, GROUP, NQB, COL_ROWS, OUT0,
    BLOCK: tl.constexpr, TILE: tl.constexpr,
):
    """Over the sorted column keys: rank = distinct keys of the same kv head before this one;
    the first copy of each key writes the key <-> rank tables (distinct places); every copy
    writes its entry (column tile NKB + rank // TILE, one bit) to slot OUT0 + i."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    im = i < C
    ck = tl.load(ck_ptr + i, mask=im, other=9223372036854775807)
    prev = tl.load(ck_ptr + i - 1, mask=im & (i > 0), other=-1)
    valid = im & (ck != 9223372036854775807)
    owner = tl.where(valid, ck // S, 0)
    col = tl.where(valid, ck % S, 0)
    rank = tl.load(distinct_ptr + i, mask=valid, other=1) - 1 - tl.load(before_ptr + owner, mask=valid, other=0)
    first = valid & (ck != prev)
    tl.store(col_keys_ptr + owner * COL_ROWS + rank, col.to(tl.int32), mask=first)
    tl.store(slot_ptr + owner * S + col, rank.to(tl.int32), mask=first)
    within = tl.load(within_ptr + i, mask=valid, other=0).to(tl.int64)
    key = tl.where(valid, (owner * NTT + NKB + rank // TILE) * (GROUP * NQB) + within, 9223372036854775807)
    slot = rank % TILE
    one = tl.full([BLOCK], 1, tl.int64)
    w0 = tl.where(valid & (slot < 32), one << tl.minimum(slot, 31), 0)
    w1 = tl.where(valid & (slot >= 32), one << tl.maximum(slot - 32, 0), 0)
    tl.store(keys_ptr + OUT0 + i, key, mask=im)
    tl.store(words_ptr + 2 * (OUT0 + i), w0, mask=im)
    tl.store(words_ptr + 2 * (OUT0 + i) + 1, w1, mask=im)


@triton.jit
def _plan_last_kernel(skeys_ptr, last_ptr, E, BLOCK: tl.constexpr):
    """1 where a sorted entry ends its run of equal keys (and is not an empty slot), else 0."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    im = i < E
    key = tl.load(skeys_ptr + i, mask=im, other=9223372036854775807)
    nxt = tl.load(skeys_ptr + i + 1, mask=im & (i + 1 < E), other=-1)
    tl.store(last_ptr + i, (im & (key != nxt) & (key != 9223372036854775807)).to(tl.int64), mask=im)


@triton.jit
def _plan_merge_kernel(
    skeys_ptr, order_ptr, words_ptr, last_ptr, pos_ptr, ent_keys_ptr, ent_head_ptr, ent_qb_ptr, ent_bits_ptr,
    E, NQB, GROUP, BLOCK: tl.constexpr, MAX_RUN: tl.constexpr,
):
    """The last entry of each run of equal sorted keys (one tile, head, block) ORs the run's
    mask words (read through the sort order) and writes the merged entry to slot pos - 1
    (pos: inclusive prefix count of run ends), so the entries stay sorted and packed. A run
    holds at most TILE + 8 entries when no key is listed twice for a block (the op's
    documented precondition); MAX_RUN bounds the walk back."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    im = i < E
    last = tl.load(last_ptr + i, mask=im, other=0) != 0
    key = tl.load(skeys_ptr + i, mask=last, other=0)
    src = tl.load(order_ptr + i, mask=last, other=0)
    w0 = tl.load(words_ptr + 2 * src, mask=last, other=0)
    w1 = tl.load(words_ptr + 2 * src + 1, mask=last, other=0)
    walking = last
    for step in range(1, MAX_RUN):
        j = i - step
        walking = walking & (j >= 0)
        walking = walking & (tl.load(skeys_ptr + j, mask=walking, other=-1) == key)
        sj = tl.load(order_ptr + j, mask=walking, other=0)
        w0 = w0 | tl.load(words_ptr + 2 * sj, mask=walking, other=0)
        w1 = w1 | tl.load(words_ptr + 2 * sj + 1, mask=walking, other=0)
    out = tl.load(pos_ptr + i, mask=last, other=1) - 1
    within = key % (GROUP * NQB)
    tl.store(ent_keys_ptr + out, key, mask=last)
    tl.store(ent_head_ptr + out, (within // NQB).to(tl.int32), mask=last)
    tl.store(ent_qb_ptr + out, (within % NQB).to(tl.int32), mask=last)
    tl.store(ent_bits_ptr + 2 * out, w0, mask=last)
    tl.store(ent_bits_ptr + 2 * out + 1, w1, mask=last)


_PLAN_CHUNK = 128  # index entries a row program handles per step
_PLAN_BLOCK = 256  # sorted entries per program (rank, run ends, merge)
_PLAN_MAX_RUN = TILE_N + 8  # longest run of one (tile, head, block) under the op's precondition


def build_backward_plan(block_count, block_offset, column_count, column_index, T, S, Hkv,
                        causal=True, block_m=64, block_n=64):
    """The per-(b, kv head, key tile) entry lists of the dK/dV kernel, built on the index's
    device without atomics (row-ordered writes, one sort of the entries, prefix sums), so the
    same index always gives the same lists. Two host syncs (the listed ranges' and columns'
    totals) size everything by what the index holds, not by its padding (at T = 32K, 16.8M
    range slots held 0.3M ranges).

    Entries are (tile, query head in group, query block, key mask). Tiles 0..NKB-1 of a kv
    head are the aligned key tiles that ranges cover; tiles NKB.. are column tiles: the
    distinct column keys of the kv head ranked in ascending order, TILE_N per tile. Spans
    and columns are clipped to keys that some row of the block may see (``[0, S)``, causal),
    so no entry is empty.

    Returns a dict: tile_off [B·Hkv·NTT + 1] int64 (CSR over tiles, NTT = NKB + NCT tiles per
    kv head), ent_head / ent_qb int32, ent_bits [E, WORDS] int64 (32-bit words), col_keys
    [B·Hkv, NCT·TILE_N] int32 (-1: empty slot), slot_of_key [B·Hkv, S] int32 (-1: not a
    column key), nkb, nct. Entries past tile_off[-1] are padding.
    """
    assert _MASK_WORDS == 2
    dev = block_count.device
    B, H, NQB = block_count.shape
    G = H // Hkv
    BH = B * Hkv
    NKB = triton.cdiv(S, TILE_N)
    MB, MC = block_offset.shape[-1], column_index.shape[-1]
    NCT = triton.cdiv(min(S, G * NQB * MC), TILE_N)
    NTT = NKB + NCT
    rows = B * H * NQB
    i64 = torch.int64
    pieces = triton.cdiv(block_n, TILE_N) + 1
    dims = (T, S, H, Hkv, G, NQB)
    block_count, block_offset = block_count.contiguous(), block_offset.contiguous()
    column_count, column_index = column_count.contiguous(), column_index.contiguous()

    def exclusive_prefix(counts, width):
        c = counts.reshape(-1).to(i64).clamp(0, width)
        incl = torch.cumsum(c, 0)
        return incl - c, int(incl[-1])  # host sync: the total sizes the buffers

    n_ranges = n_cols = 0
    if MB and rows:
        range_first, n_ranges = exclusive_prefix(block_count, MB)
    if MC and NCT and rows:
        col_first, n_cols = exclusive_prefix(column_count, MC)
    E = n_ranges * pieces + n_cols
    keys = torch.empty(E, dtype=i64, device=dev)
    words = torch.empty((E, _MASK_WORDS), dtype=i64, device=dev)
    col_keys = torch.full((BH, max(NCT, 1) * TILE_N), -1, dtype=torch.int32, device=dev)
    slot_of_key = torch.full((BH, S), -1, dtype=torch.int32, device=dev)
    with _device_ctx(block_count):
        if n_ranges:
            _plan_ranges_kernel[(rows,)](
                block_count, block_offset, range_first, keys, words, *dims, MB, NTT, block_m,
                CAUSAL=bool(causal), RANGE_N=block_n, PIECES=pieces, CHUNK=_PLAN_CHUNK, TILE=TILE_N, num_warps=4)
        if n_cols:
            ck = torch.empty(n_cols, dtype=i64, device=dev)
            within = torch.empty(n_cols, dtype=torch.int32, device=dev)
            _plan_columns_kernel[(rows,)](
                column_count, column_index, col_first, ck, within, *dims, MC, block_m,
                CAUSAL=bool(causal), CHUNK=_PLAN_CHUNK, num_warps=4)
            ck, order = torch.sort(ck)
            within = within[order]
            new_key = torch.ones(n_cols, dtype=i64, device=dev)
            new_key[1:] = ck[1:] != ck[:-1]
            distinct = torch.cumsum(new_key, 0)  # distinct keys up to and including i
            head_start = torch.searchsorted(ck, torch.arange(BH, device=dev, dtype=i64) * S)
            before = torch.where(head_start > 0, distinct[(head_start - 1).clamp(min=0)], 0)
            _plan_column_rank_kernel[(triton.cdiv(n_cols, _PLAN_BLOCK),)](
                ck, within, distinct, before, col_keys, slot_of_key, keys, words,
                n_cols, S, NTT, NKB, G, NQB, col_keys.shape[1], n_ranges * pieces,
                BLOCK=_PLAN_BLOCK, TILE=TILE_N, num_warps=4)
        sorted_keys, order = torch.sort(keys)
        last = torch.empty(E, dtype=i64, device=dev)
        ent_keys = torch.full((E,), _I64_MAX, dtype=i64, device=dev)
        ent_head = torch.zeros(E, dtype=torch.int32, device=dev)
        ent_qb = torch.zeros(E, dtype=torch.int32, device=dev)
        ent_bits = torch.zeros((E, _MASK_WORDS), dtype=i64, device=dev)
        if E:
            grid = (triton.cdiv(E, _PLAN_BLOCK),)
            _plan_last_kernel[grid](sorted_keys, last, E, BLOCK=_PLAN_BLOCK, num_warps=4)
            _plan_merge_kernel[grid](sorted_keys, order, words, last, torch.cumsum(last, 0), ent_keys, ent_head,
                                     ent_qb, ent_bits, E, NQB, G, BLOCK=_PLAN_BLOCK, MAX_RUN=_PLAN_MAX_RUN,
                                     num_warps=4)
    bounds = torch.arange(BH * NTT + 1, device=dev, dtype=i64) * (G * NQB)
    tile_off = torch.searchsorted(ent_keys, bounds)
    return dict(tile_off=tile_off, ent_head=ent_head, ent_qb=ent_qb, ent_bits=ent_bits,
                col_keys=col_keys, slot_of_key=slot_of_key, nkb=NKB, nct=NCT)


def block_sparse_attention_backward(grad_out, grad_lse, q, k, v, out, lse,
                                    block_count, block_offset, column_count, column_index,
                                    causal=True, scale=None, block_m=64, block_n=64, deterministic=True,
                                    configs: Optional[dict] = None, plan: Optional[dict] = None):
    """(dq, dk, dv), contiguous, in the inputs' dtypes. Extra memory: delta [B, Hq, T] fp32, the
    tile plan (O(index entries)), and with columns four fp32 buffers of min(S, G·NQB·MAX_COLS)
    rows × D per kv head; ``deterministic=False`` adds an fp32 dQ buffer. ``configs`` may
    override the launches: ``{"dq": {num_warps, num_stages, tiles_per_step}, "dkdv": {num_warps, num_stages,
    block_m}}`` (benchmarks/tune_block_sparse_attention.py). ``plan``: a ``build_backward_plan``
    result for this index, to time the kernels without it."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    _check_grid(B, H, "backward")
    G = H // Hkv
    scale = D ** -0.5 if scale is None else float(scale)
    if B * H * T == 0 or S == 0:  # nothing attended: every gradient is zero
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    dq = _empty((B, H, T, D), q, q.dtype)
    dk = _empty((B, Hkv, S, D), k, k.dtype)
    dv = _empty((B, Hkv, S, D), v, v.dtype)
    upcast, precision = needs_upcast(q.dtype), _precision(q.dtype)
    BLOCK_D = _block_d(D)
    nqb = triton.cdiv(T, block_m)

    delta = _empty((B, H, T), q, torch.float32)  # NaN under poisoning: an unwritten row fails the tests
    block_t = 64
    with _device_ctx(q):
        _bwd_delta_kernel[(triton.cdiv(T, block_t), H, B)](
            out, grad_out, _dummy(grad_lse, lse), delta, T, H,
            *out.stride(), *grad_out.stride(), *(grad_lse.stride() if grad_lse is not None else (0, 0, 0)),
            HAS_DLSE=grad_lse is not None, HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_T=block_t,
            num_warps=4,
        )

    configs = configs or {}
    arch = _arch(q)
    if deterministic:
        exact = bool(configs.get("dq"))
        step, cfg = _launch_config(configs.get("dq") or _fwd_config(block_m, D, arch, kernel="dq"))
        with _device_ctx(q):
            _launch_fitting(_bwd_dq_kernel, (nqb, H, B), (
                q, k, v, grad_out, lse, delta, dq,
                block_count, _dummy(block_offset, block_count), column_count, _dummy(column_index, column_count),
                T, S, H, G, nqb, block_offset.shape[-1], column_index.shape[-1], scale * LOG2E, scale,
                *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride()[:3],
            ), dict(CAUSAL=bool(causal), HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=block_m, BLOCK_N=block_n, STEP=step,
                    UPCAST=upcast, PRECISION=precision, **cfg), q.device, "dQ", exact=exact)
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
    exact = bool(configs.get("dkdv"))
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
            _launch_fitting(_bwd_dkdv_kernel, (nct, Hkv, B), (*common, nkb, *tail),
                            dict(meta, IS_COL=True, HAS_COLS=True), q.device, "dK/dV", exact=exact)
        _launch_fitting(_bwd_dkdv_kernel, (nkb, Hkv, B), (*common, 0, *tail),
                        dict(meta, IS_COL=False, HAS_COLS=nct > 0), q.device, "dK/dV", exact=exact)
        if nct:
            block_r = 32
            _bwd_cols_finalize_kernel[(triton.cdiv(col_rows, block_r), Hkv, B)](
                plan["col_keys"], col_dk, col_dv, rng_dk, rng_dv, dk, dv, Hkv, col_rows, scale,
                *dk.stride()[:3], *dv.stride()[:3], HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_R=block_r, num_warps=4,
            )
    if not deterministic:
        dq = dq_acc
    return _finish(dq, q.dtype), _finish(dk, k.dtype), _finish(dv, v.dtype)


# ------------------------------------------------------------------------------ kernel report


def launch_specs() -> list:
    """Launch configurations for the static kernel report (see sparse_gather.launch_specs):
    bf16, head dims 64, 128 and 256, 64×64 blocks. Allowed spills were located with nvdisasm: no
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
    for arch, d in itertools.product((80, 90), (64, 128, 256)):  # the launch configs differ per arch
        cfg = _fwd_config(64, d, arch)
        qcfg = _fwd_config(64, d, arch, kernel="dq")
        # the default launch, and on sm_90 the two-tiles-per-step candidate of the tuning sweep
        for step in (1, 2) if arch >= 90 and d <= 128 else (1,):
            tag = "" if step == cfg["tiles_per_step"] else f",{step} tiles/step"
            if tag:
                cfg, qcfg = _two_tiles_config(d, "fwd"), _two_tiles_config(d, "dq")
            specs.append(dict(
                name=f"bsa_fwd[bf16,d={d}{tag}]", kernel=_fwd_kernel,
                types=dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", out_ptr="*bf16", lse_ptr="*fp32", **idx,
                           **dims, **strides, stride_ob="i64", stride_oh="i64", stride_ot="i32"),
                constexprs=dict(stride_qd=1, stride_kd=1, stride_vd=1, CAUSAL=True, HEAD_DIM=d, BLOCK_D=d,
                                BLOCK_M=64, BLOCK_N=64, STEP=step, UPCAST=False, PRECISION="tf32"),
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], matmul=True,
                main=d == 128 and not tag, archs=(arch,), allow={},
            ))
            specs.append(dict(
                name=f"bsa_bwd_dq[bf16,d={d}{tag}]", kernel=_bwd_dq_kernel,
                types=dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", do_ptr="*bf16", lse_ptr="*fp32",
                           delta_ptr="*fp32", dq_ptr="*bf16", **idx, **dims, sm_scale="fp32", **strides,
                           stride_dqb="i64", stride_dqh="i64", stride_dqt="i32"),
                constexprs=dict(**unit, CAUSAL=True, HEAD_DIM=d, BLOCK_D=d, BLOCK_M=64, BLOCK_N=64, STEP=step,
                                UPCAST=False, PRECISION="tf32"),
                num_warps=qcfg["num_warps"], num_stages=qcfg["num_stages"], matmul=True, main=False,
                archs=(arch,), allow={},
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
    i32 = dict.fromkeys(("T", "S", "H", "HKV", "GROUP", "NQB", "QBLOCK"), "i32")
    plan_specs = [
        ("ranges", _plan_ranges_kernel,
         dict(bcount_ptr="*i32", boff_ptr="*i32", first_ptr="*i64", keys_ptr="*i64", words_ptr="*i64", **i32,
              MB="i32", NTT="i32"),
         dict(CAUSAL=True, RANGE_N=64, PIECES=2, CHUNK=_PLAN_CHUNK, TILE=TILE_N)),
        ("columns", _plan_columns_kernel,
         dict(ccount_ptr="*i32", cidx_ptr="*i32", first_ptr="*i64", ckey_ptr="*i64", within_ptr="*i32", **i32,
              MC="i32"),
         dict(CAUSAL=True, CHUNK=_PLAN_CHUNK)),
        ("column_rank", _plan_column_rank_kernel,
         dict(ck_ptr="*i64", within_ptr="*i32", distinct_ptr="*i64", before_ptr="*i64", col_keys_ptr="*i32",
              slot_ptr="*i32", keys_ptr="*i64", words_ptr="*i64", C="i32", S="i32", NTT="i32", NKB="i32",
              GROUP="i32", NQB="i32", COL_ROWS="i32", OUT0="i32"),
         dict(BLOCK=_PLAN_BLOCK, TILE=TILE_N)),
        ("run_ends", _plan_last_kernel, dict(skeys_ptr="*i64", last_ptr="*i64", E="i32"), dict(BLOCK=_PLAN_BLOCK)),
        ("merge", _plan_merge_kernel,
         dict(skeys_ptr="*i64", order_ptr="*i64", words_ptr="*i64", last_ptr="*i64", pos_ptr="*i64",
              ent_keys_ptr="*i64", ent_head_ptr="*i32", ent_qb_ptr="*i32", ent_bits_ptr="*i64", E="i32", NQB="i32",
              GROUP="i32"),
         dict(BLOCK=_PLAN_BLOCK, MAX_RUN=_PLAN_MAX_RUN)),
    ]
    for name, kernel, types, constexprs in plan_specs:
        specs.append(dict(name=f"bsa_bwd_plan[{name}]", kernel=kernel, types=types, constexprs=constexprs,
                          num_warps=4, main=False, allow={}))
    for spec in specs:  # the benchmarks' prompt lengths (8K, 32K) are multiples of 16, as T, S
        spec["divisible"] = tuple(n for n in ("T", "S") if n in spec["types"])
    return specs
