"""Fused encoder GEMM + running top-k: the [N, M] pre-activations are never written.

Program (row block, latent split) computes ``pre = (x - b_dec) @ W_encᵀ + b_enc`` one
[BLOCK_N, BLOCK_M] tile at a time with ``tl.dot`` (the launcher forms ``x - b_dec`` once,
``encoder_tile.centered_input``) and folds each tile into a running list of
the BLOCK_M best entries per row:

* every entry becomes one int64 key, ``orderable(pre) << 32 | (2³² - 1 - latent)``, so a
  descending key order is descending ``pre`` with the smaller latent first among equal
  values (the package's tie rule), keys are distinct, and a key carries its own index;
* the running list is kept *unsorted*; only its minimum (the row's current threshold)
  matters. Once a few tiles are in, almost every new entry is below the threshold (a row
  sees about k·ln(M/k) insertions over all M latents), so a tile is folded by extracting its
  few candidates one round at a time (row max, replace the row minimum): a handful of
  reductions instead of a sort. A tile with many candidates (the first ones, or adversarial
  orders) is merged with two bitonic sorts instead: the best list descending against the
  tile ascending, elementwise max = the BLOCK_M largest of the union (a bitonic half-cleaner).
* empty slots hold distinct sentinel keys just above ``KEY_MIN``, below every real key, so
  "replace the minimum" never duplicates an entry.

Each program sorts its list once at the end and writes the best K_PAD keys per row to
``partial [N, splits, K_PAD]``; the launcher merges the splits with one ``torch.topk`` over
``splits·K_PAD`` keys per row, so the extra memory is O(N·k·splits). Ties are decided on
the fp32 pre-activation; NaN ranks above every number. With ``HAS_AUX`` the same tiles also feed a second list
restricted to dead latents (AuxK).
"""

import itertools
from typing import Optional

import torch
import triton
import triton.language as tl

from .encoder_tile import centered_input, check_weight_offsets, encoder_pre_tile
from .sparse_gather import _device_ctx, _interpreted, config_arch, needs_upcast

_KEY_MIN = -(2**63)  # "no candidate": below every sentinel and every real key
_SENTINEL_CEIL = _KEY_MIN + 2**20  # empty-slot sentinels are _KEY_MIN + 1 + slot, below this
_LOW_MASK = 0xFFFFFFFF


@triton.jit
def _keys(pre, latent, valid):
    """int64 keys ordered like (pre descending, latent ascending); invalid entries -> KEY_MIN.
    Every NaN becomes the positive quiet NaN, which ranks above +inf (torch.topk's order):
    a NaN with its sign bit set would otherwise rank below -inf."""
    bits = tl.where(pre != pre, 0x7FC00000, pre.to(tl.int32, bitcast=True))
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed-int order == float order
    low = 4294967295 - latent.to(tl.int64)
    key = (ordered.to(tl.int64) << 32) | low
    return tl.where(valid, key, -9223372036854775808)


@triton.jit
def _fold(best, keys, SORT_ABOVE: tl.constexpr):
    """best ∪ keys -> the BLOCK_M largest, unsorted. best: distinct keys (sentinels for empty
    slots); keys: this tile's keys, KEY_MIN where invalid."""
    thresh = tl.min(best, axis=1)
    cand = tl.where(keys > thresh[:, None], keys, -9223372036854775808)
    need = tl.max(tl.sum((cand != -9223372036854775808).to(tl.int32), axis=1), axis=0)
    if need > SORT_ABOVE:
        best = tl.maximum(tl.sort(best, dim=1, descending=True), tl.sort(cand, dim=1))
    else:
        for _ in range(need):
            c = tl.max(cand, axis=1)
            replace = (best == thresh[:, None]) & (c > thresh)[:, None]
            best = tl.where(replace, c[:, None], best)
            cand = tl.where(cand == c[:, None], -9223372036854775808, cand)
            thresh = tl.min(best, axis=1)
    return best


@triton.jit
def _topk_partial_kernel(
    x_ptr, w_ptr, b_enc_ptr, dead_ptr, part_ptr, aux_part_ptr,
    n_rows, d, m, latents_per_split,
    stride_xn, stride_xd, stride_wm, stride_wd,
    HAS_B_ENC: tl.constexpr, HAS_AUX: tl.constexpr,
    K_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    SORT_ABOVE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_rows
    lat_begin = split * latents_per_split
    lat_end = tl.minimum(lat_begin + latents_per_split, m)

    cols = tl.arange(0, BLOCK_M)
    sentinels = cols.to(tl.int64) - 9223372036854775807  # KEY_MIN + 1 + slot: distinct
    best = tl.broadcast_to(sentinels[None, :], [BLOCK_N, BLOCK_M])
    aux_best = best
    for m0 in range(lat_begin, lat_end, BLOCK_M):
        offs_m = m0 + cols
        mask_m = offs_m < lat_end
        acc = encoder_pre_tile(x_ptr, w_ptr, b_enc_ptr, offs_n, mask_n, offs_m, mask_m, d,
                               stride_xn, stride_xd, stride_wm, stride_wd, HAS_B_ENC,
                               BLOCK_N, BLOCK_M, BLOCK_D, INPUT_PRECISION, UPCAST)
        valid = mask_n[:, None] & mask_m[None, :]
        keys = _keys(acc, offs_m[None, :], valid)
        best = _fold(best, keys, SORT_ABOVE)
        if HAS_AUX:
            dead = tl.load(dead_ptr + offs_m, mask=mask_m, other=0) != 0
            aux_best = _fold(aux_best, tl.where(dead[None, :], keys, -9223372036854775808), SORT_ABOVE)

    out_offs = (offs_n[:, None].to(tl.int64) * n_splits + split) * K_PAD + cols[None, :]
    out_mask = mask_n[:, None] & (cols[None, :] < K_PAD)
    tl.store(part_ptr + out_offs, tl.sort(best, dim=1, descending=True), mask=out_mask)
    if HAS_AUX:
        tl.store(aux_part_ptr + out_offs, tl.sort(aux_best, dim=1, descending=True), mask=out_mask)


def _decode_keys(keys: torch.Tensor, k: int):
    """Top-k of int64 keys per row -> (fp32 pre, int64 latent, valid mask)."""
    top = torch.topk(keys, k, dim=1, sorted=True).values
    valid = top > _SENTINEL_CEIL
    latent = _LOW_MASK - (top & _LOW_MASK)
    ordered = (top >> 32).to(torch.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    pre = bits.view(torch.float32)
    return pre, latent.masked_fill(~valid, 0), valid


def _tile_config(k_pad: int, elem_size: int, has_aux: bool = False, arch: int = 90):
    """(BLOCK_N, BLOCK_M, BLOCK_D, num_warps, num_stages) on a GPU of compute capability
    ``arch`` (80, 90, ...). The running lists are BLOCK_N x BLOCK_M int64 keys in registers."""
    block_m = max(k_pad, 64)
    if elem_size <= 2:
        if block_m <= 64 and not has_aux:
            # benchmarks/results/tune_topk_encode_h200.txt (bf16, N=16384 d=2304 M=131072 k=64):
            # 4 warps / 4 stages 45.3 ms against 68.5 ms for 8 warps / 3 stages (at the launch's
            # specialization the sm_90 build does not spill; sm_80 spills 440 B of the lists).
            return 64, 64, 64, 4, 4
        if not has_aux and arch >= 90:
            # k > 64 (BatchTopK's 2k candidates): 64 rows keep wgmma's tile, and 8 warps hold
            # the 64 x 128 lists without spilling at the launch's specialization (kernel
            # report; the 32-row launch used before runs mma.sync; sm_80 spills ~1 KB at 64
            # rows and keeps 32). Not yet timed.
            return 64, block_m, 64, 8, 3
        return max(16, 64 * 64 // block_m), block_m, 64, 8, 3  # AuxK: not yet timed
    return max(16, 32 * 64 // block_m), block_m, 32, 8, 3


# Tiles with more candidates than this are merged by sorting rather than round by round.
_SORT_ABOVE = 16


def _config(n: int, m: int, k_pad: int, elem_size: int, interpreted: bool, has_aux: bool = False,
            device: Optional[torch.device] = None):
    if interpreted:  # one small config: the interpreter runs programs one by one in numpy
        return dict(block_n=16, block_m=max(k_pad, 16), block_d=32, warps=4, stages=1, splits=1,
                    sort_above=_SORT_ABOVE)
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else device
    block_n, block_m, block_d, warps, stages = _tile_config(k_pad, elem_size, has_aux, config_arch(device))
    n_blocks = max(1, triton.cdiv(n, block_n))
    # Enough programs to fill the GPU, each with at least a few latent tiles.
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    splits = max(1, min(triton.cdiv(m, 4 * block_m), triton.cdiv(2 * sms, n_blocks)))
    return dict(block_n=block_n, block_m=block_m, block_d=block_d, warps=warps, stages=stages, splits=splits,
                sort_above=_SORT_ABOVE)


def topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: Optional[torch.Tensor],
    b_dec: Optional[torch.Tensor],
    k: int,
    dead_mask: Optional[torch.Tensor] = None,
    k_aux: int = 0,
    *,
    splits: Optional[int] = None,
    config: Optional[dict] = None,
):
    """(pre [N, k], indices [N, k] int64, aux_pre [N, k_aux], aux_indices [N, k_aux]), pre in
    x's dtype; aux slots beyond the number of dead latents hold 0 / index 0. ``splits``
    overrides the number of latent splits (tests of the cross-split merge); ``config``
    overrides launch parameters (benchmarks/tune_topk_encode.py)."""
    n, d = x.shape
    m = W_enc.shape[0]
    out_dtype = x.dtype
    has_aux = dead_mask is not None and k_aux > 0
    if n == 0:
        k_out = k_aux if has_aux else 0
        return (x.new_empty((0, k)), x.new_empty((0, k), dtype=torch.int64), x.new_empty((0, k_out)),
                x.new_empty((0, k_out), dtype=torch.int64))
    x = centered_input(x, b_dec, W_enc.dtype)
    b_enc = b_enc.contiguous() if b_enc is not None else None  # encoder_pre_tile reads it at unit stride
    k_pad = triton.next_power_of_2(max(k, k_aux if has_aux else 1))
    cfg = _config(n, m, k_pad, W_enc.element_size(), _interpreted(), has_aux, x.device)
    cfg.update(config or {})
    if splits:
        cfg["splits"] = splits
    check_weight_offsets(W_enc, cfg["block_d"], "topk_encode")
    block_m = max(cfg["block_m"], k_pad)
    latents_per_split = triton.cdiv(triton.cdiv(m, cfg["splits"]), block_m) * block_m
    n_splits = triton.cdiv(m, latents_per_split)
    part = torch.empty((n, n_splits, k_pad), device=x.device, dtype=torch.int64)
    aux_part = torch.empty_like(part) if has_aux else part
    dead = dead_mask.to(torch.int8) if has_aux else part
    grid = (triton.cdiv(n, cfg["block_n"]), n_splits)
    with _device_ctx(x):
        _topk_partial_kernel[grid](
            x, W_enc, b_enc if b_enc is not None else x, dead, part, aux_part,
            n, d, m, latents_per_split,
            x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1),
            HAS_B_ENC=b_enc is not None, HAS_AUX=has_aux,
            K_PAD=k_pad, BLOCK_N=cfg["block_n"], BLOCK_M=block_m, BLOCK_D=cfg["block_d"],
            SORT_ABOVE=cfg["sort_above"], INPUT_PRECISION="ieee" if W_enc.element_size() >= 4 else "tf32",
            UPCAST=needs_upcast(W_enc.dtype),
            num_warps=cfg["warps"], num_stages=cfg["stages"],
        )
    pre, idx, _ = _decode_keys(part.view(n, -1), k)
    pre = pre.to(out_dtype)
    if not has_aux:
        return pre, idx, pre.new_zeros((n, 0)), idx.new_zeros((n, 0))
    aux_pre, aux_idx, valid = _decode_keys(aux_part.view(n, -1), k_aux)
    return pre, idx, aux_pre.masked_fill(~valid, 0).to(out_dtype), aux_idx


def launch_specs() -> list:
    """Launch configurations for the static kernel report (see sparse_gather.launch_specs), one
    per arch (the k > 64 launch differs between sm_80 and sm_90)."""
    specs = []
    for dt, elem in (("bf16", 2), ("fp32", 4)):
        for k_pad, has_aux, arch in itertools.product((64, 128), (False, True), (80, 90)):
            block_n, block_m, block_d, warps, stages = _tile_config(k_pad, elem, has_aux, arch)
            specs.append(dict(
                name=f"topk_partial[{dt},k<={k_pad}{',aux' if has_aux else ''}]",
                kernel=_topk_partial_kernel,
                types=dict(x_ptr=f"*{dt}", w_ptr=f"*{dt}", b_enc_ptr=f"*{dt}", dead_ptr="*i8",
                           part_ptr="*i64", aux_part_ptr="*i64", n_rows="i32", d="i32", m="i32",
                           latents_per_split="i32", stride_xn="i64", stride_wm="i64"),
                constexprs=dict(stride_xd=1, stride_wd=1, HAS_B_ENC=True, HAS_AUX=has_aux, K_PAD=k_pad,
                                BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d, SORT_ABOVE=_SORT_ABOVE,
                                INPUT_PRECISION="ieee" if elem >= 4 else "tf32", UPCAST=False),
                num_warps=warps, num_stages=stages, matmul=dt == "bf16", archs=(arch,),
                divisible=("n_rows", "d", "m", "latents_per_split"),  # N=16384, d=2304, M=131072
                main=dt == "bf16" and k_pad == 64 and not has_aux,
                allow=_untuned_allowances(dt, k_pad, has_aux),
            ))
    # SAELens' layout: W_enc is a [d, M] parameter, so the op gets its transposed view (unit
    # latent stride, a runtime d stride of M: int32 at launch, widened to int64 in the tile).
    for arch in (80, 90):
        block_n, block_m, block_d, warps, stages = _tile_config(64, 2, False, arch)
        specs.append(dict(
            name="topk_partial[bf16,k<=64,W_enc^T]",
            kernel=_topk_partial_kernel,
            types=dict(x_ptr="*bf16", w_ptr="*bf16", b_enc_ptr="*bf16", dead_ptr="*i8",
                       part_ptr="*i64", aux_part_ptr="*i64", n_rows="i32", d="i32", m="i32",
                       latents_per_split="i32", stride_xn="i64", stride_wd="i32"),
            constexprs=dict(stride_xd=1, stride_wm=1, HAS_B_ENC=True, HAS_AUX=False, K_PAD=64,
                            BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d, SORT_ABOVE=_SORT_ABOVE,
                            INPUT_PRECISION="tf32", UPCAST=False),
            num_warps=warps, num_stages=stages, matmul=True, archs=(arch,),
            divisible=("n_rows", "d", "m", "latents_per_split"),
            main=True, allow=_untuned_allowances("bf16", 64, False),
        ))
    return specs


def _untuned_allowances(dt: str, k_pad: int, has_aux: bool) -> dict:
    """What the kernel report tolerates for now, and why (measured with the report at the
    launch's real specialization, Triton 3.8)."""
    allow = {}
    if dt == "bf16" and k_pad == 64 and not has_aux:
        allow["spills"] = ("sm_80 only: 4 warps hold the 64x64 running key lists with ~1 KB spilled to L1 "
                           "(the sm_90 build is clean); 4 warps ran 1.5x faster than the 8-warp launch on an "
                           "H200 (45.3 vs 68.5 ms, benchmarks/results/tune_topk_encode_h200.txt)")
    if dt == "bf16" and k_pad > 64 and has_aux:
        allow["spills"] = ("two running lists of 128 int64 keys per row (BatchTopK-size k with AuxK) exceed "
                           "255 registers: sm_80 ~500 B, sm_90 ~160 B to L1; correct (interpreter and "
                           "reference tests); not yet timed on a GPU")
    if dt == "fp32":
        allow["spills"] = ("ptxas holds these 8-warp fp32 builds to 128 registers and spills up to 120 B "
                           "(k<=64 with AuxK, k<=128; both arches); fp32 is the precision path (IEEE dot), "
                           "not the throughput path, and is not tuned")
    if dt == "bf16" and k_pad > 64 and has_aux:
        allow["no_wgmma"] = ("BLOCK_N=32 keeps the two 128-wide lists (AuxK) in registers but is below "
                             "wgmma's 64-row tile, so sm_90 uses mma.sync (64 rows spill ~1.9 KB); to be "
                             "tuned on a GPU")
    return allow
