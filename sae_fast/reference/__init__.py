"""Plain-torch reference implementations: same signatures as the kernels, computed in fp32
(fp64 for fp64 inputs). They are the CPU backend when the Triton interpreter is off, and the
ground truth that tests compare every kernel against. No Triton or CUDA imports here."""

from .sparse_gather import csr_gather_sum, gathered_dot

__all__ = ["csr_gather_sum", "gathered_dot"]
