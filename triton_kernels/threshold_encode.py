"""Fused encoder GEMM + threshold selection into capacity-bounded row lists.

Program (row block, latent split) computes ``pre = (x - b_dec) @ W_encᵀ + b_enc`` one
[BLOCK_N, BLOCK_M] tile at a time with ``tl.dot`` (the launcher forms ``x - b_dec`` once,
``encoder_tile.centered_input``) and keeps the active entries,
``pre > threshold`` and (with RELU) ``pre > 0`` (``relu(pre)·H(pre - θ)`` is non-zero
exactly there; the threshold is one scalar, or one per latent for JumpReLU), and every NaN
``pre``, so NaN inputs reach the output. With HAS_BAND
it also keeps every entry within ``half_band`` of the threshold, active or not (JumpReLU
training needs them for the straight-through threshold gradient); with DENSE_OUT it also
writes the dense activations. Kept entries are appended to
the row's slot of ``values / indices [N, splits, capacity]`` at positions given by a
running count plus a prefix sum over the tile, in ascending latent order. The count keeps
growing past the capacity: ``counts [N, splits]`` is exact even when entries did not fit,
so the launcher detects an overflow and reruns just those rows with a capacity that fits
(nothing is ever dropped). The [N, M] pre-activations are never written.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from .encoder_tile import centered_input, check_weight_offsets, encoder_pre_tile
from .sparse_gather import _device_ctx, _interpreted, needs_upcast


@triton.jit
def _round_to_bf16(v):
    """fp32 -> the nearest bf16 value (ties to even), still as fp32; NaN stays NaN."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(v != v, v, bits.to(tl.float32, bitcast=True))


@triton.jit
def _threshold_select_kernel(
    x_ptr, w_ptr, b_enc_ptr, thr_ptr, val_ptr, idx_ptr, count_ptr, dense_ptr,
    n_rows, d, m, latents_per_split, capacity, half_band,
    stride_xn, stride_xd, stride_wm, stride_wd,
    HAS_B_ENC: tl.constexpr, THR_PER_LATENT: tl.constexpr,
    RELU: tl.constexpr, HAS_BAND: tl.constexpr, DENSE_OUT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_rows
    lat_begin = split * latents_per_split
    lat_end = tl.minimum(lat_begin + latents_per_split, m)
    slot = (offs_n.to(tl.int64) * n_splits + split) * capacity  # start of each row's list
    if not THR_PER_LATENT:
        thr_scalar = tl.load(thr_ptr).to(tl.float32)

    count = tl.zeros([BLOCK_N], dtype=tl.int32)
    for m0 in range(lat_begin, lat_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < lat_end
        acc = encoder_pre_tile(x_ptr, w_ptr, b_enc_ptr, offs_n, mask_n, offs_m, mask_m, d,
                               stride_xn, stride_xd, stride_wm, stride_wd, HAS_B_ENC,
                               BLOCK_N, BLOCK_M, BLOCK_D, INPUT_PRECISION, UPCAST)
        # Compare in the output dtype, as a dense computation in that dtype would.
        if THR_PER_LATENT:
            thr = tl.load(thr_ptr + offs_m, mask=mask_m, other=0.0)[None, :]
        else:
            thr = thr_scalar.to(val_ptr.dtype.element_ty)
        if EMULATE_BF16:
            # Triton's interpreter truncates fp32 -> bf16 and orders bf16 values of opposite sign
            # wrongly: round to nearest even by hand and compare the (exact) bf16 values in fp32
            pre = _round_to_bf16(acc)
            thr = thr.to(tl.float32)
        else:
            pre = acc.to(val_ptr.dtype.element_ty)
        valid = mask_n[:, None] & mask_m[None, :]
        active = pre > thr
        if RELU:
            active = active & (pre > 0)
        active = valid & (active | (pre != pre))  # NaN is kept: it must reach the output
        if DENSE_OUT:
            tl.store(dense_ptr + offs_n[:, None].to(tl.int64) * m + offs_m[None, :],
                     tl.where(active, pre, 0.0).to(dense_ptr.dtype.element_ty), mask=valid)
        keep = active
        if HAS_BAND:  # also the entries within the band around the threshold, active or not
            keep = keep | (valid & (tl.abs(pre.to(tl.float32) - thr.to(tl.float32)) < half_band))
        keep_i = keep.to(tl.int32)
        pos = count[:, None] + tl.cumsum(keep_i, axis=1) - 1
        store = keep & (pos < capacity)
        tl.store(val_ptr + slot[:, None] + pos, pre.to(val_ptr.dtype.element_ty), mask=store)
        tl.store(idx_ptr + slot[:, None] + pos, offs_m[None, :] + 0 * pos, mask=store)
        count += tl.sum(keep_i, axis=1)
    tl.store(count_ptr + offs_n.to(tl.int64) * n_splits + split, count, mask=mask_n)


def _tile_config(elem_size: int, dense: bool = False):
    """(BLOCK_N, BLOCK_M, BLOCK_D, num_warps, num_stages) on a GPU: a plain GEMM tile (the
    selection is a prefix sum and masked stores per tile), the largest the kernel report
    compiles without spills on sm_80 and sm_90 (the dense store's pointers need the smaller
    row block). bf16: 4 stages, which took the TopK kernel's 8-warp launch of the same encoder
    tile from 68.5 to 52.0 ms on an H200 (results/tune_topk_encode_h200.txt); not yet timed
    for this kernel. (4 warps, that sweep's best, spill ~500 B here: the epilogue's per-entry
    store addresses.)"""
    if elem_size <= 2:
        return (32, 64, 64, 8, 3) if dense else (64, 64, 64, 8, 4)
    return (32, 64, 32, 8, 3) if dense else (64, 64, 32, 8, 3)


def _launch(x, W_enc, b_enc, threshold, capacity: int, splits: Optional[int], relu=True, half_band=None,
            dense=None, config: Optional[dict] = None, out_dtype: Optional[torch.dtype] = None):
    """x already centered (``centered_input``); values in ``out_dtype`` (default x's)."""
    n, d = x.shape
    out_dtype = out_dtype or x.dtype
    m = W_enc.shape[0]
    if _interpreted():
        block_n, block_m, block_d, warps, stages, auto_splits = 16, 16, 32, 4, 1, 1
    else:
        block_n, block_m, block_d, warps, stages = _tile_config(W_enc.element_size(), dense is not None)
        if config:  # benchmarks/tune_threshold_encode.py
            block_n, block_m, block_d = config["block_n"], config["block_m"], config["block_d"]
            warps, stages = config["warps"], config["stages"]
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        auto_splits = max(1, min(triton.cdiv(m, 4 * block_m), triton.cdiv(2 * sms, max(1, triton.cdiv(n, block_n)))))
    check_weight_offsets(W_enc, block_d, "threshold_encode")
    splits = splits or auto_splits
    latents_per_split = triton.cdiv(triton.cdiv(m, splits), block_m) * block_m
    splits = triton.cdiv(m, latents_per_split)
    values = torch.empty((n, splits, capacity), device=x.device, dtype=out_dtype)
    indices = torch.empty((n, splits, capacity), device=x.device, dtype=torch.int32)
    counts = torch.empty((n, splits), device=x.device, dtype=torch.int32)
    if n == 0:
        return values, indices, counts
    grid = (triton.cdiv(n, block_n), splits)
    with _device_ctx(x):
        _threshold_select_kernel[grid](
            x, W_enc, b_enc if b_enc is not None else x, threshold,
            values, indices, counts, dense if dense is not None else values,
            n, d, m, latents_per_split, capacity, float(half_band or 0.0),
            x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1),
            HAS_B_ENC=b_enc is not None, THR_PER_LATENT=threshold.dim() == 1,
            RELU=relu, HAS_BAND=half_band is not None, DENSE_OUT=dense is not None,
            BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d,
            INPUT_PRECISION="ieee" if W_enc.element_size() >= 4 else "tf32",
            UPCAST=needs_upcast(W_enc.dtype), EMULATE_BF16=needs_upcast(out_dtype),
            num_warps=warps, num_stages=stages,
        )
    return values, indices, counts


def _compact(values, indices, counts, rows: Optional[torch.Tensor] = None):
    """Flat (values, int64 indices, row ids) of the filled slots, rows ascending."""
    cap = values.shape[2]
    filled = torch.arange(cap, device=values.device) < counts.clamp(max=cap).unsqueeze(-1)
    row_ids = torch.arange(values.shape[0], device=values.device) if rows is None else rows
    row_ids = row_ids.view(-1, 1, 1).expand_as(filled)
    return values[filled], indices[filled].long(), row_ids[filled]


def threshold_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: Optional[torch.Tensor],
    b_dec: Optional[torch.Tensor],
    threshold: torch.Tensor,
    *,
    capacity: int = 128,
    splits: Optional[int] = None,
    relu: bool = True,
    half_band: Optional[float] = None,
    dense: Optional[torch.Tensor] = None,
    config: Optional[dict] = None,
):
    """CSR of the entries with ``pre > threshold`` (and ``pre > 0`` when ``relu``), plus, with
    ``half_band``, those with ``|pre - threshold| < half_band`` (fp32): (values [nnz] in x's
    dtype, indices [nnz] int64 ascending within a row, row_offsets [N+1] int64).
    ``threshold`` is a 0-d tensor or one per latent [M]. ``dense`` (an [N, M] contiguous
    tensor in x's dtype) also receives every active value, zeros elsewhere. ``capacity`` is the
    first guess of entries per row and latent split; rows that overflow it are recomputed
    with their exact count. ``config`` overrides the launch on a GPU (block_n, block_m,
    block_d, warps, stages: benchmarks/tune_threshold_encode.py)."""
    n = x.shape[0]
    out_dtype = x.dtype
    if n == 0 or W_enc.shape[0] == 0:  # no entries; the launch heuristics divide by both counts
        return (x.new_empty((0,)), x.new_empty((0,), dtype=torch.int64),
                torch.zeros(n + 1, device=x.device, dtype=torch.int64))
    threshold = threshold.to(out_dtype).contiguous()
    b_enc = b_enc.contiguous() if b_enc is not None else None  # encoder_pre_tile reads it at unit stride
    x = centered_input(x, b_dec, W_enc.dtype)
    values, indices, counts = _launch(x, W_enc, b_enc, threshold, capacity, splits, relu, half_band, dense,
                                      config, out_dtype)
    per_row = counts.sum(1, dtype=torch.int64)
    over = (counts > capacity).any(1)
    vals, idx, rows = _compact(values, indices, counts.masked_fill(over.unsqueeze(1), 0))
    if bool(over.any()):  # one sync; the common case needs no second pass
        again = over.nonzero().view(-1)
        # the same splits, so every row's count per split is the one just measured
        v2, i2, c2 = _launch(x[again], W_enc, b_enc, threshold, int(counts[again].max()), counts.shape[1],
                             relu, half_band, config=config, out_dtype=out_dtype)
        vals2, idx2, rows2 = _compact(v2, i2, c2, again)
        order = torch.sort(torch.cat([rows, rows2]), stable=True).indices
        vals, idx = torch.cat([vals, vals2])[order], torch.cat([idx, idx2])[order]
    row_offsets = torch.zeros(n + 1, device=x.device, dtype=torch.int64)
    torch.cumsum(per_row, 0, out=row_offsets[1:])
    return vals, idx, row_offsets


def launch_specs() -> list:
    """Launch configurations for the static kernel report (see sparse_gather.launch_specs):
    BatchTopK inference (scalar θ), JumpReLU encode (per-latent θ, CSR or dense) and the
    JumpReLU training pass (per-latent θ, no ReLU rule, the band)."""
    variants = {
        "scalar": dict(THR_PER_LATENT=False, RELU=True, HAS_BAND=False, DENSE_OUT=False),
        "per-latent": dict(THR_PER_LATENT=True, RELU=True, HAS_BAND=False, DENSE_OUT=False),
        "per-latent,dense": dict(THR_PER_LATENT=True, RELU=True, HAS_BAND=False, DENSE_OUT=True),
        "per-latent,band": dict(THR_PER_LATENT=True, RELU=False, HAS_BAND=True, DENSE_OUT=False),
    }
    specs = []
    for dt, elem in (("bf16", 2), ("fp32", 4)):
        for variant, flags in variants.items():
            block_n, block_m, block_d, warps, stages = _tile_config(elem, flags["DENSE_OUT"])
            specs.append(dict(
                name=f"threshold_select[{dt},{variant}]",
                kernel=_threshold_select_kernel,
                types=dict(x_ptr=f"*{dt}", w_ptr=f"*{dt}", b_enc_ptr=f"*{dt}", thr_ptr=f"*{dt}",
                           val_ptr=f"*{dt}", idx_ptr="*i32", count_ptr="*i32", dense_ptr=f"*{dt}", n_rows="i32",
                           d="i32", m="i32", latents_per_split="i32", capacity="i32", half_band="fp32",
                           stride_xn="i64", stride_wm="i64"),
                constexprs=dict(stride_xd=1, stride_wd=1, HAS_B_ENC=True, **flags, BLOCK_N=block_n,
                                BLOCK_M=block_m, BLOCK_D=block_d, INPUT_PRECISION="ieee" if elem >= 4 else "tf32",
                                UPCAST=False, EMULATE_BF16=False),
                num_warps=warps, num_stages=stages, matmul=dt == "bf16", main=dt == "bf16",
                divisible=("n_rows", "d", "m", "latents_per_split"),  # N=8192, d=2304, M=131072
                allow=_allowances(dt, flags["DENSE_OUT"]),
            ))
    return specs


def _allowances(dt: str, dense: bool) -> dict:
    """What the kernel report tolerates, and why (Triton 3.8, at the launch's specialization)."""
    if not dense:
        return {}
    allow = {"no_wgmma": "dense output (a compatibility path for callers that need [N, M]) uses 32-row "
                         "blocks so its store pointers fit in registers (64 rows spill), below wgmma's "
                         "64-row tile: sm_90 uses mma.sync"}
    allow["spills"] = ("dense output: ptxas holds the 8-warp build to 128 registers and may spill ~12 B "
                       "(bf16 on sm_80, fp32 on sm_90 as measured); a compatibility path, not a throughput path")
    return allow
