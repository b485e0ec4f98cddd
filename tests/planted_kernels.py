"""Kernels with planted defects for testing the kernel report (kept outside test_ modules:
pytest's assertion rewriting of a test module breaks Triton's compile of kernels defined there)."""

import triton
import triton.language as tl


@triton.jit
def spilling_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    # Two BLOCK-wide fp32 loads issued before use by one warp: far over 255 registers per thread.
    # (No tl.sum etc.: library jit functions break a compile made while the interpreter is on.)
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    y = tl.load(x_ptr + (BLOCK - 1 - offs))
    tl.store(out_ptr + offs, x * y + x)
