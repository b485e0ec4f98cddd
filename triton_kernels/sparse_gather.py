"""The two sparse products behind sparse decode and the encoders' backward passes.

csr_gather_sum  out[r, :] = sum_{e in row r} coef[e] * src[col[e], :]  (+ bias)
    rows are CSR segments; with no offsets every row holds k consecutive entries.
    Decode forward: rows = tokens, col = latents, src = W_dec.
    Decoder weight gradient: rows = latents (segments of a stable sort by latent),
    col = tokens, src = grad_output: atomic-free, so deterministic.
gathered_dot    out[n, j] = <grad[n, :], src[col[n, j], :]>
    Gradient of decode w.r.t. its values.

Both read src through arbitrary strides (a transposed weight view needs no copy), use
int64 offsets, and accumulate in fp32.
"""

import os
from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _csr_gather_sum_kernel(
    coef_ptr, col_ptr, offsets_ptr, src_ptr, bias_ptr, out_ptr,
    k, d,
    stride_src_row, stride_src_col, stride_bias, stride_out_row,
    HAS_OFFSETS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < d
    if HAS_OFFSETS:
        start = tl.load(offsets_ptr + row)
        end = tl.load(offsets_ptr + row + 1)
    else:
        start = row * k
        end = start + k
    # A 2-D accumulator reduced once at the end: a reduction over the entry axis inside the
    # loop would cross warps (shared memory and a barrier) on every step.
    acc = tl.zeros([BLOCK_E, BLOCK_D], dtype=tl.float32)
    # BLOCK_E source rows per step, so that many independent row loads are in flight.
    for e0 in range(start, end, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        mask_e = offs_e < end
        cols = tl.load(col_ptr + offs_e, mask=mask_e, other=0).to(tl.int64)
        coefs = tl.load(coef_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
        rows = tl.load(
            src_ptr + cols[:, None] * stride_src_row + offs_d[None, :].to(tl.int64) * stride_src_col,
            mask=mask_e[:, None] & mask_d[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += coefs[:, None] * rows
    total = tl.sum(acc, axis=0)
    if HAS_BIAS:
        total += tl.load(bias_ptr + offs_d * stride_bias, mask=mask_d, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out_row + offs_d, total.to(out_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _gathered_dot_kernel(
    grad_ptr, col_ptr, src_ptr, out_ptr,
    k, d,
    stride_grad_row, stride_grad_col, stride_col_row,
    stride_src_row, stride_src_col, stride_out_row,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < k
    cols = tl.load(col_ptr + n * stride_col_row + offs_k, mask=mask_k, other=0).to(tl.int64)
    # Reduced over d once at the end, not per step (see _csr_gather_sum_kernel).
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < d
        g = tl.load(grad_ptr + n * stride_grad_row + offs_d.to(tl.int64) * stride_grad_col, mask=mask_d, other=0.0)
        rows = tl.load(
            src_ptr + cols[:, None] * stride_src_row + offs_d[None, :].to(tl.int64) * stride_src_col,
            mask=mask_k[:, None] & mask_d[None, :],
            other=0.0,
        )
        acc += rows.to(tl.float32) * g.to(tl.float32)[None, :]
    total = tl.sum(acc, axis=1)
    tl.store(out_ptr + n * stride_out_row + offs_k, total.to(out_ptr.dtype.element_ty), mask=mask_k)


@triton.jit
def _entry_dot_kernel(
    grad_ptr, row_ptr, col_ptr, src_ptr, out_ptr,
    nnz, d,
    stride_grad_row, stride_src_row,
    BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[e] = <grad[row[e]], src[col[e]]> for flat entries (CSR codes: rows differ per entry)."""
    offs_e = tl.program_id(0).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)  # nnz may pass 2^31
    mask_e = offs_e < nnz
    rows = tl.load(row_ptr + offs_e, mask=mask_e, other=0).to(tl.int64)
    cols = tl.load(col_ptr + offs_e, mask=mask_e, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_E, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_e[:, None] & (offs_d < d)[None, :]
        g = tl.load(grad_ptr + rows[:, None] * stride_grad_row + offs_d[None, :], mask=mask, other=0.0)
        w = tl.load(src_ptr + cols[:, None] * stride_src_row + offs_d[None, :], mask=mask, other=0.0)
        acc += g.to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + offs_e, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=mask_e)


def _block_d(d: int, row_bytes: int, elem_size: int) -> int:
    """Columns per program: ``row_bytes`` of each gathered row, fewer when d is small."""
    return min(triton.next_power_of_2(max(d, 1)), max(16, row_bytes // elem_size))


# Launch heuristics, measured on an H100 with benchmarks/tune_sparse_gather.py at
# N=8192, k=64, M=131072, d=2304 bf16 (see benchmarks/results/README.md):
#   decode forward (uniform rows):  8 rows x 1 KiB per step        0.71 ms (2.5x the old 256 B tiles)
#   weight gradient (CSR, ~4/row):  4 rows x 2 KiB per step        0.76 ms (14x: fewer, wider programs)
#   values gradient:                32 entries x 256 B per step    0.78 ms
_UNIFORM_ROW_BYTES, _UNIFORM_BLOCK_E = 1024, 8
_CSR_ROW_BYTES, _CSR_BLOCK_E = 2048, 4
_DOT_ROW_BYTES, _DOT_BLOCK_K = 256, 32


def _empty(shape, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Output buffer. The interpreter truncates fp32 -> bf16 where GPUs round to nearest even,
    so under it kernels write fp32 and torch rounds (see ``_finish``). With
    SAE_FAST_POISON_OUTPUTS=1 (tests) outputs start as NaN so an unwritten element shows."""
    if dtype == torch.bfloat16 and _interpreted():
        dtype = torch.float32
    if os.environ.get("SAE_FAST_POISON_OUTPUTS") == "1":
        return torch.full(shape, float("nan"), device=like.device, dtype=dtype)
    return torch.empty(shape, device=like.device, dtype=dtype)


def _finish(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return out if out.dtype == dtype else out.to(dtype)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def needs_upcast(dtype: torch.dtype) -> bool:
    """True for bf16 operands under Triton's interpreter, which has no bf16 arithmetic: the
    kernels widen them to fp32 first (``encoder_pre_tile``, the attention kernels)."""
    return dtype == torch.bfloat16 and _interpreted()


def _device_ctx(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else _NullCtx()


def config_arch(device: torch.device) -> int:
    """Which launch configs suit the GPU: 90 for sm_90 / sm_100 / sm_103 (asynchronous
    tensor-core MMA, 227 KB of shared memory per block), 80 for the rest (sm_80 / 86 / 89 and
    the consumer Blackwell sm_120: mma.sync, 99-163 KB). 90 off the GPU (the interpreter
    ignores launch configs)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 90
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major in (9, 10) else 80


class _NullCtx:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def csr_gather_sum(
    coef: torch.Tensor,
    col: torch.Tensor,
    row_offsets: Optional[torch.Tensor],
    num_rows: int,
    src: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    block_e: Optional[int] = None,
    block_d: Optional[int] = None,
    num_warps: Optional[int] = None,
) -> torch.Tensor:
    """out [num_rows, d] in src's dtype. ``coef``/``col`` are contiguous 1-D; ``row_offsets``
    is int64 [num_rows + 1] or None for rows of ``coef.numel() // num_rows`` entries.
    ``block_e``/``block_d``/``num_warps`` override the launch heuristics (for tuning)."""
    d = src.shape[1]
    if num_rows == 0 or d == 0:
        return src.new_empty((num_rows, d))
    num_entries = coef.numel()
    if num_entries == 0:  # k = 0: nothing to gather
        out = src.new_zeros((num_rows, d))
        return out.add_(bias) if bias is not None else out
    out = _empty((num_rows, d), src, src.dtype)
    k = 0 if row_offsets is not None else num_entries // num_rows
    if row_offsets is None:
        block_d = block_d or _block_d(d, _UNIFORM_ROW_BYTES, src.element_size())
        block_e = block_e or min(_UNIFORM_BLOCK_E, triton.next_power_of_2(k))
    else:
        block_d = block_d or _block_d(d, _CSR_ROW_BYTES, src.element_size())
        block_e = block_e or min(_CSR_BLOCK_E, triton.next_power_of_2(max(1, -(-num_entries // num_rows))))
    grid = (num_rows, triton.cdiv(d, block_d))
    with _device_ctx(src):
        _csr_gather_sum_kernel[grid](
            coef, col, row_offsets if row_offsets is not None else col, src,
            bias if bias is not None else src, out,
            k, d,
            src.stride(0), src.stride(1), bias.stride(0) if bias is not None else 0, out.stride(0),
            HAS_OFFSETS=row_offsets is not None, HAS_BIAS=bias is not None,
            BLOCK_E=block_e, BLOCK_D=block_d,
            num_warps=num_warps or 4,
        )
    return _finish(out, src.dtype)


def gathered_dot(
    grad: torch.Tensor,
    col: torch.Tensor,
    src: torch.Tensor,
    *,
    block_k: Optional[int] = None,
    block_d: Optional[int] = None,
    num_warps: Optional[int] = None,
) -> torch.Tensor:
    """out [N, k] in grad's dtype; ``col`` [N, k] with unit stride along k.
    ``block_k``/``block_d``/``num_warps`` override the launch heuristics (for tuning)."""
    n_rows, k = col.shape
    d = grad.shape[1]
    if n_rows == 0 or k == 0 or d == 0:
        return grad.new_zeros((n_rows, k))
    out = _empty((n_rows, k), grad, grad.dtype)
    block_k = block_k or min(_DOT_BLOCK_K, triton.next_power_of_2(k))
    block_d = block_d or _block_d(d, _DOT_ROW_BYTES, src.element_size())
    grid = (n_rows, triton.cdiv(k, block_k))
    with _device_ctx(src):
        _gathered_dot_kernel[grid](
            grad, col, src, out,
            k, d,
            grad.stride(0), grad.stride(1), col.stride(0),
            src.stride(0), src.stride(1), out.stride(0),
            BLOCK_K=block_k, BLOCK_D=block_d,
            num_warps=num_warps or 4,
        )
    return _finish(out, grad.dtype)


def entry_dot(grad: torch.Tensor, rows: torch.Tensor, col: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """out [nnz] in grad's dtype: <grad[rows[e]], src[col[e]]> (the values gradient of CSR
    decoding). Rows of grad and src are made unit-stride along d."""
    nnz, d = col.numel(), grad.shape[1]
    if nnz == 0 or d == 0:
        return grad.new_zeros((nnz,))
    grad = grad if grad.stride(1) == 1 else grad.contiguous()
    src = src if src.stride(1) == 1 else src.contiguous()
    out = _empty((nnz,), grad, grad.dtype)
    block_d = _block_d(d, _DOT_ROW_BYTES, src.element_size())
    with _device_ctx(src):
        _entry_dot_kernel[(triton.cdiv(nnz, _DOT_BLOCK_K),)](
            grad, rows.contiguous(), col.contiguous(), src, out, nnz, d, grad.stride(0), src.stride(0),
            BLOCK_E=_DOT_BLOCK_K, BLOCK_D=block_d, num_warps=4,
        )
    return _finish(out, grad.dtype)


def launch_specs() -> list:
    """The launch configurations the heuristics above produce at representative sizes, for
    the static kernel report (``sae-fast kernel-report``): compiled for sm_80 / sm_90 with
    no GPU and checked for register spills and shared memory. Each entry: name, kernel,
    argument types by name (pointers as ``*dtype``), constexprs, num_warps, and ``allow``
    (what the report tolerates, with the reason)."""
    specs = []
    for dt, elem in (("bf16", 2), ("fp32", 4)):
        for has_offsets in (False, True):
            row_bytes, block_e = (_CSR_ROW_BYTES, _CSR_BLOCK_E) if has_offsets else (_UNIFORM_ROW_BYTES, _UNIFORM_BLOCK_E)
            specs.append(dict(
                name=f"csr_gather_sum[{dt},{'csr' if has_offsets else 'uniform'}]",
                kernel=_csr_gather_sum_kernel,
                types=dict(coef_ptr=f"*{dt}", col_ptr="*i64", offsets_ptr="*i64", src_ptr=f"*{dt}",
                           bias_ptr=f"*{dt}", out_ptr=f"*{dt}", k="i32", d="i32", stride_src_row="i64",
                           stride_src_col="i64", stride_bias="i64", stride_out_row="i64"),
                constexprs=dict(HAS_OFFSETS=has_offsets, HAS_BIAS=not has_offsets, BLOCK_E=block_e,
                                BLOCK_D=_block_d(4096, row_bytes, elem)),
                num_warps=4, divisible=("k", "d"), allow={},  # k=64, d=2304
            ))
        specs.append(dict(
            name=f"gathered_dot[{dt}]",
            kernel=_gathered_dot_kernel,
            types=dict(grad_ptr=f"*{dt}", col_ptr="*i64", src_ptr=f"*{dt}", out_ptr=f"*{dt}", k="i32", d="i32",
                       stride_grad_row="i64", stride_grad_col="i64", stride_col_row="i64",
                       stride_src_row="i64", stride_src_col="i64", stride_out_row="i64"),
            constexprs=dict(BLOCK_K=_DOT_BLOCK_K, BLOCK_D=_block_d(4096, _DOT_ROW_BYTES, elem)),
            num_warps=4, divisible=("k", "d"), allow={},
        ))
        specs.append(dict(
            name=f"entry_dot[{dt}]",
            kernel=_entry_dot_kernel,
            types=dict(grad_ptr=f"*{dt}", row_ptr="*i64", col_ptr="*i64", src_ptr=f"*{dt}", out_ptr=f"*{dt}",
                       nnz="i32", d="i32", stride_grad_row="i64", stride_src_row="i64"),
            constexprs=dict(BLOCK_E=_DOT_BLOCK_K, BLOCK_D=_block_d(4096, _DOT_ROW_BYTES, elem)),
            num_warps=4, divisible=("d",), allow={},
        ))
    return specs
