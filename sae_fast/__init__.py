"""sae_fast: fused Triton and CUDA kernels for sparse autoencoders and sparse attention,
as torch operators with autograd, and in-place adapters for SAELens, sparsify and
dictionary_learning. Importing registers the ``sae_fast::`` ops and does nothing else: no
device queries, no compilation, none of the adapted libraries imported."""

from ._backend import cuda_extension_available
from .integrations import accelerate
from .ops import (
    BatchTopKCodes,
    block_mask_attention,
    block_sparse_attention,
    JumpReLUCodes,
    TopKCodes,
    batchtopk_encode,
    jumprelu_encode,
    jumprelu_training_forward,
    sparse_decode,
    sparse_decode_csr,
    topk_encode,
    vertical_slash_index,
)
from .sparse_attention import HeadPattern, SparseAttentionConfig, patch_sparse_attention, search_patterns

__version__ = "0.1.0"
__all__ = ["jumprelu_encode", "jumprelu_training_forward", "JumpReLUCodes", "sparse_decode", "sparse_decode_csr", "topk_encode", "TopKCodes", "batchtopk_encode", "BatchTopKCodes", "block_sparse_attention", "block_mask_attention", "vertical_slash_index", "cuda_extension_available", "accelerate", "HeadPattern", "SparseAttentionConfig",
           "patch_sparse_attention", "search_patterns", "__version__"]
