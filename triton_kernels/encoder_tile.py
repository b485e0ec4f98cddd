"""The encoder GEMM tile shared by the fused encoders (topk_encode, threshold_encode)."""

import triton
import triton.language as tl


@triton.jit
def encoder_pre_tile(
    x_ptr, w_ptr, b_enc_ptr, b_dec_ptr, offs_n, mask_n, offs_m, mask_m, d,
    stride_xn, stride_xd, stride_wm, stride_wd,
    HAS_B_ENC: tl.constexpr, HAS_B_DEC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """``pre = (x - b_dec) @ W_encᵀ + b_enc`` for rows ``offs_n`` and latents ``offs_m``, in
    fp32: [BLOCK_N, BLOCK_M]. Operands go to the tensor cores in the weights' dtype (bf16/fp16;
    fp32 with ``INPUT_PRECISION="ieee"``, so near-ties select like an fp32 matmul)."""
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < d
        xt = tl.load(x_ptr + offs_n[:, None].to(tl.int64) * stride_xn + offs_d[None, :] * stride_xd,
                     mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        if HAS_B_DEC:
            xt = xt.to(tl.float32) - tl.load(b_dec_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
            xt = tl.where(mask_n[:, None] & mask_d[None, :], xt, 0.0)
        wt = tl.load(w_ptr + offs_m[None, :].to(tl.int64) * stride_wm + offs_d[:, None] * stride_wd,
                     mask=mask_m[None, :] & mask_d[:, None], other=0.0)
        acc += tl.dot(xt.to(wt.dtype), wt, out_dtype=tl.float32, input_precision=INPUT_PRECISION)
    if HAS_B_ENC:
        acc += tl.load(b_enc_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)[None, :]
    return acc
