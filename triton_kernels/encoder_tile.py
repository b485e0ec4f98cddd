"""The encoder GEMM tile shared by the fused encoders (topk_encode, threshold_encode)."""

from typing import Optional

import torch
import triton
import triton.language as tl


def centered_input(x: torch.Tensor, b_dec: Optional[torch.Tensor], w_dtype: torch.dtype) -> torch.Tensor:
    """``x - b_dec`` in fp32, rounded once to the weights' dtype: the exact operand the tile
    used to build per (row block, latent tile, k step) by loading x, subtracting and rounding
    in registers. Done once here ([N, d], a few MB), the tile's A operand is a plain load that
    the pipeliner copies straight into shared memory for the tensor cores."""
    if b_dec is None:
        return x
    return (x.to(torch.float32) - b_dec.to(torch.float32)).to(w_dtype)


_INT32_MAX = 2 ** 31 - 1


def check_weight_offsets(W_enc: torch.Tensor, block_d: int, op: str) -> None:
    """``encoder_pre_tile`` forms arange(BLOCK_D)·stride_wd in int32 (a stride >= 2^31 arrives
    as int64 and is safe): refuse a weight layout where that product could wrap."""
    stride, lanes = W_enc.stride(1), min(block_d, W_enc.shape[1])  # (masked lanes never load)
    if stride <= _INT32_MAX and (lanes - 1) * stride > _INT32_MAX:
        raise ValueError(
            f"{op}: W_enc's d-axis stride ({stride}, a transposed [d, M] weight with M = {stride} latents) "
            f"times the tile depth {lanes} passes 2^31; pass W_enc as a row-major [M, d] tensor "
            f"(W_enc.contiguous()) for more than {_INT32_MAX // (lanes - 1)} latents in this layout")


@triton.jit
def encoder_pre_tile(
    x_ptr, w_ptr, b_enc_ptr, offs_n, mask_n, offs_m, mask_m, d,
    stride_xn, stride_xd, stride_wm, stride_wd,
    HAS_B_ENC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr = False,
):
    """``pre = x_c @ W_encᵀ + b_enc`` for rows ``offs_n`` and latents ``offs_m``, in fp32:
    [BLOCK_N, BLOCK_M], where x_c is the already centered input (``centered_input``).
    Operands go to the tensor cores in the weights' dtype (bf16/fp16; fp32 with
    ``INPUT_PRECISION="ieee"``, so near-ties select like an fp32 matmul). ``UPCAST``: bf16
    operands under Triton's interpreter, which has no bf16 arithmetic (its bf16 dot returned
    garbage): they are widened to fp32 first, where a bf16 x bf16 product is exact, so only
    the summation order differs from the GPU's tensor cores (``needs_upcast``)."""
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    # 64-bit offsets: a transposed W_enc view has stride_wd = M, and (d - 1)·M passes 2^31 at
    # Gemma Scope's d = 2304, M = 2^20 (int32 wrapped: a wild read). For W the step's base is an
    # int64 scalar and only arange·stride_wd stays int32 (check_weight_offsets): an int64 [BLOCK_D,
    # 1] offset spilled the sm_90 TopK tile (96 B, kernel report) where this split spills none.
    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < d
        xt = tl.load(x_ptr + offs_n[:, None].to(tl.int64) * stride_xn + offs_d[None, :].to(tl.int64) * stride_xd,
                     mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        d0_wide = d0 + tl.zeros([], dtype=tl.int64)  # (d0 is a Python int under the interpreter)
        wt = tl.load(w_ptr + d0_wide * stride_wd + offs_m[None, :].to(tl.int64) * stride_wm
                     + tl.arange(0, BLOCK_D)[:, None] * stride_wd,
                     mask=mask_m[None, :] & mask_d[:, None], other=0.0)
        if UPCAST:
            acc += tl.dot(xt.to(wt.dtype).to(tl.float32), wt.to(tl.float32), out_dtype=tl.float32,
                          input_precision="ieee")
        else:
            acc += tl.dot(xt.to(wt.dtype), wt, out_dtype=tl.float32, input_precision=INPUT_PRECISION)
    if HAS_B_ENC:
        acc += tl.load(b_enc_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)[None, :]
    return acc
