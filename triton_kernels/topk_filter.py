"""TopK encoding as a probe, a filtering encoder GEMM, and a small exact top-k.

The fused kernel (``topk_encode.py``) keeps each row's running top-k in registers, which
caps its tiles at 64 rows x 64 latents: every latent tile re-reads the program's x rows and
every row block re-reads W, about 2·N·M·d·(1/64 + 1/64) bytes through L2. This path instead
fixes, per row, a value its top-k must clear, so the GEMM needs no list at all and can use
GEMM-sized tiles:

1. Probe: the pre-activations of an evenly spread ``1/PROBE_SHARE`` of the latents (whole
   64-latent tiles, one cuBLAS GEMM). The k-th largest probe value of a row is at most the
   row's true k-th largest; lowered by a margin that covers the rounding difference between
   the probe's GEMM and the kernel's, it is the row's threshold.
2. ``_filter_kernel``: ``pre = x_c @ W_encᵀ + b_enc`` in [BLOCK_N, BLOCK_M] tiles (grouped
   launch order so concurrent programs share W tiles in L2); the epilogue appends the
   entries at or above the row's threshold (fp32 value, int32 latent) to the row's slice of a candidate buffer: an
   atomic per candidate reserves its slot (``entry_slots``, the default), or one per row
   and tile with a row-wise cumsum placing them (more registers; the bench times both).
   The order within a row varies from run to run; the selection below does not.
3. Exact top-k of each row's candidates (``torch.topk`` over the keys). A row whose
   candidates overflowed the buffer, or that ended with fewer than k (a margin too small
   for its rounding), is recomputed by the fused kernel: the result is always the exact
   top-k of the kernel's fp32 pre-activations, whatever the probe said.

With exchangeable latents a row keeps about k·PROBE_SHARE candidates (1024 at k = 64);
``cap`` defaults to four times that. Extra memory: N x cap int64 keys. AuxK (a second list
over dead latents) is not handled here: those calls go to the fused kernel.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from . import topk_encode as fused
from .encoder_tile import centered_input, check_weight_offsets, encoder_pre_tile
from .sparse_gather import _device_ctx, _interpreted, needs_upcast

PROBE_SHARE = 16  # the probe computes 1/16 of the latents
PROBE_TILE = 64  # ... in whole tiles of this many latents
THRESHOLD_MARGIN = 2.0 ** -6  # relative: bf16 rounding of the probe's output (2^-9) with room


@triton.jit
def _filter_kernel(
    x_ptr, w_ptr, b_enc_ptr, thr_ptr, count_ptr, cand_val_ptr, cand_idx_ptr,
    n_rows, d, m, cap,
    stride_xn, stride_xd, stride_wm, stride_wd,
    HAS_B_ENC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    GROUP_N: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, ENTRY_SLOTS: tl.constexpr,
):
    # grouped order: GROUP_N row blocks sweep the latent tiles together, so a W tile is read
    # from memory once per group rather than once per row block
    pid = tl.program_id(0)
    num_n = tl.cdiv(n_rows, BLOCK_N)
    num_m = tl.cdiv(m, BLOCK_M)
    per_group = GROUP_N * num_m
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(num_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_m = (pid % per_group) // group_size

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n = offs_n < n_rows
    mask_m = offs_m < m
    acc = encoder_pre_tile(x_ptr, w_ptr, b_enc_ptr, offs_n, mask_n, offs_m, mask_m, d,
                           stride_xn, stride_xd, stride_wm, stride_wd, HAS_B_ENC,
                           BLOCK_N, BLOCK_M, BLOCK_D, INPUT_PRECISION, UPCAST)
    thr = tl.load(thr_ptr + offs_n, mask=mask_n, other=float("inf"))
    # NaN entries are candidates too: the exact selection orders them like the fused kernel
    sel = mask_n[:, None] & mask_m[None, :] & ((acc >= thr[:, None]) | (acc != acc))
    if ENTRY_SLOTS:
        # one atomic per candidate reserves its slot. On a flat view: atomics on the tile's
        # [BLOCK_N, BLOCK_M] layout trip a Triton 3.8 layout-propagation assertion. Kernel
        # report at 128 x 64: 144 registers against the row-slot epilogue's 243 (its cumsum).
        flat = tl.arange(0, BLOCK_N * BLOCK_M)
        rows = pid_n * BLOCK_N + flat // BLOCK_M
        cols = pid_m * BLOCK_M + flat % BLOCK_M
        fsel = tl.reshape(sel, [BLOCK_N * BLOCK_M])
        pos = tl.atomic_add(count_ptr + rows, 1, mask=fsel, sem="relaxed")
        ok = fsel & (pos < cap)
        dst = rows.to(tl.int64) * cap + pos
        tl.store(cand_val_ptr + dst, tl.reshape(acc, [BLOCK_N * BLOCK_M]), mask=ok)
        tl.store(cand_idx_ptr + dst, cols, mask=ok)
    else:
        # one atomic per row reserves the tile's slots, a row-wise cumsum places the candidates
        sel_i = sel.to(tl.int32)
        count = tl.sum(sel_i, axis=1)
        base = tl.atomic_add(count_ptr + offs_n, count, mask=mask_n & (count > 0))
        pos = base[:, None] + tl.cumsum(sel_i, axis=1) - 1
        ok = sel & (pos < cap)
        # values and int32 latents, not int64 keys: fewer live registers in the epilogue (keys
        # are formed afterwards over the few candidates)
        row_base = offs_n[:, None].to(tl.int64) * cap
        tl.store(cand_val_ptr + row_base + pos, acc, mask=ok)
        tl.store(cand_idx_ptr + row_base + pos, tl.broadcast_to(offs_m[None, :], [BLOCK_N, BLOCK_M]), mask=ok)


def _tile_config(interpreted: bool) -> dict:
    if interpreted:  # the interpreter runs programs one by one: small tiles
        return dict(block_n=16, block_m=32, block_d=32, group_n=2, warps=4, stages=1, entry_slots=True)
    # 128 rows x 64 latents, 8 warps, a slot atomic per candidate (kernel report: no spills;
    # with entry_slots=False, the row cumsum, ~100 more registers; at 128 x 128 either
    # spills). Untimed: the TopK bench times both epilogues.
    return dict(block_n=128, block_m=64, block_d=64, group_n=8, warps=8, stages=3, entry_slots=True)


def probe_latents(m: int, device) -> torch.Tensor:
    """Indices of whole PROBE_TILE-latent tiles spread evenly over [0, m), about m / PROBE_SHARE."""
    n_tiles = triton.cdiv(m, PROBE_TILE)
    n_probe = max(1, n_tiles // PROBE_SHARE)
    starts = torch.div(torch.arange(n_probe, device=device) * n_tiles, n_probe, rounding_mode="floor") * PROBE_TILE
    idx = (starts[:, None] + torch.arange(PROBE_TILE, device=device)).flatten()
    return idx[idx < m]


def row_thresholds(x_c: torch.Tensor, W_enc: torch.Tensor, b_enc: Optional[torch.Tensor], k: int) -> torch.Tensor:
    """fp32 [N]: the k-th largest probe pre-activation of each row, lowered by the margin
    (relative, plus an absolute part for values near 0); -inf where the probe has < k latents."""
    idx = probe_latents(W_enc.shape[0], W_enc.device)
    if idx.numel() < k:
        return torch.full((x_c.shape[0],), float("-inf"), device=x_c.device)
    pre = torch.nn.functional.linear(x_c.to(W_enc.dtype), W_enc.index_select(0, idx)).float()
    if b_enc is not None:
        pre += b_enc[idx].float()
    kth = torch.topk(pre, k, dim=1, sorted=False).values.min(dim=1).values
    spread = pre.abs().amax(dim=1)
    return kth - THRESHOLD_MARGIN * (kth.abs() + 2.0 ** -10 * spread) - 1e-6


def candidate_keys(val: torch.Tensor, idx: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """int64 keys of ``topk_encode`` (value order, smaller latent first) for each row's first
    ``count`` candidates; the unwritten slots after them get KEY_MIN."""
    bits = val.view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed-int order == float order
    keys = (ordered.to(torch.int64) << 32) | (fused._LOW_MASK - idx.to(torch.int64))
    written = torch.arange(val.shape[1], device=val.device)[None, :] < count[:, None]
    return keys.masked_fill(~written, fused._KEY_MIN)


def topk_encode_filtered(x, W_enc, b_enc, b_dec, k: int, cap: Optional[int] = None,
                         config: Optional[dict] = None):
    """Same contract as ``topk_encode.topk_encode`` without AuxK: (pre [N, k] in x's dtype,
    latent [N, k] int64, empty aux pair), descending, ties to the smaller latent. ``cap``:
    candidate slots per row (default 4·k·PROBE_SHARE); ``config`` overrides the launch."""
    n, d = x.shape
    m = W_enc.shape[0]
    out_dtype = x.dtype
    if n == 0 or m < 2 * PROBE_SHARE * PROBE_TILE:  # too few latents for a probe to pay
        return fused.topk_encode(x, W_enc, b_enc, b_dec, k)
    cap = int(cap or 4 * k * PROBE_SHARE)
    if cap < k:
        raise ValueError(f"topk_encode_filtered: cap ({cap}) must be at least k ({k})")
    x_c = centered_input(x, b_dec, W_enc.dtype)
    b_enc = b_enc.contiguous() if b_enc is not None else None  # encoder_pre_tile reads it at unit stride
    thr = row_thresholds(x_c, W_enc, b_enc, k).contiguous()
    count = torch.zeros(n, device=x.device, dtype=torch.int32)
    cand_val = torch.empty((n, cap), device=x.device, dtype=torch.float32)
    cand_idx = torch.empty((n, cap), device=x.device, dtype=torch.int32)
    cfg = dict(_tile_config(_interpreted()), **(config or {}))
    check_weight_offsets(W_enc, cfg["block_d"], "topk_encode_filtered")
    grid = (triton.cdiv(n, cfg["block_n"]) * triton.cdiv(m, cfg["block_m"]),)
    with _device_ctx(x):
        _filter_kernel[grid](
            x_c, W_enc, b_enc if b_enc is not None else x_c, thr, count, cand_val, cand_idx,
            n, d, m, cap,
            x_c.stride(0), x_c.stride(1), W_enc.stride(0), W_enc.stride(1),
            HAS_B_ENC=b_enc is not None, BLOCK_N=cfg["block_n"], BLOCK_M=cfg["block_m"], BLOCK_D=cfg["block_d"],
            GROUP_N=cfg["group_n"], INPUT_PRECISION="ieee" if W_enc.element_size() >= 4 else "tf32",
            UPCAST=needs_upcast(W_enc.dtype), ENTRY_SLOTS=cfg["entry_slots"],
            num_warps=cfg["warps"], num_stages=cfg["stages"],
        )
    redo = (count < k) | (count > cap)
    width = int(count.masked_fill(redo, 0).max().clamp(min=k, max=cap))  # one host sync
    pre, idx, _ = fused._decode_keys(candidate_keys(cand_val[:, :width], cand_idx[:, :width], count), k)
    pre = pre.to(out_dtype)
    bad = redo.nonzero().flatten()
    if bad.numel():  # exact, whatever the probe said
        bad_pre, bad_idx, _, _ = fused.topk_encode(x.index_select(0, bad), W_enc, b_enc, b_dec, k)
        pre[bad] = bad_pre
        idx[bad] = bad_idx
    return pre, idx, pre.new_zeros((n, 0)), idx.new_zeros((n, 0))


def launch_specs() -> list:
    """The filtering GEMM's launches for the static kernel report (bf16, d a multiple of 16):
    both epilogues."""
    cfg = _tile_config(False)
    return [dict(
        name=f"topk_filter[bf16,{'entry' if entry else 'row'}-slots]", kernel=_filter_kernel,
        types=dict(x_ptr="*bf16", w_ptr="*bf16", b_enc_ptr="*bf16", thr_ptr="*fp32", count_ptr="*i32",
                   cand_val_ptr="*fp32", cand_idx_ptr="*i32", n_rows="i32", d="i32", m="i32", cap="i32",
                   stride_xn="i64", stride_wm="i64"),
        constexprs=dict(stride_xd=1, stride_wd=1, HAS_B_ENC=True, BLOCK_N=cfg["block_n"], BLOCK_M=cfg["block_m"],
                        BLOCK_D=cfg["block_d"], GROUP_N=cfg["group_n"], INPUT_PRECISION="tf32", UPCAST=False,
                        ENTRY_SLOTS=entry),
        num_warps=cfg["warps"], num_stages=cfg["stages"], matmul=True, main=False, allow={},
        divisible=("d",),
    ) for entry in (True, False)]
