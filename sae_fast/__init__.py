"""sae_fast: fused Triton and CUDA kernels for sparse autoencoders and sparse attention,
as torch operators with autograd. Importing registers the ``sae_fast::`` ops and does
nothing else: no device queries, no compilation."""

from ._backend import cuda_extension_available
from .integrations import accelerate
from .ops import (
    BatchTopKCodes,
    JumpReLUCodes,
    TopKCodes,
    batchtopk_encode,
    jumprelu_encode,
    jumprelu_training_forward,
    sparse_decode,
    sparse_decode_csr,
    topk_encode,
)

__version__ = "0.1.0"
__all__ = ["jumprelu_encode", "jumprelu_training_forward", "JumpReLUCodes", "sparse_decode", "sparse_decode_csr", "topk_encode", "TopKCodes", "batchtopk_encode", "BatchTopKCodes", "cuda_extension_available", "accelerate", "__version__"]
