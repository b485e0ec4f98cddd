"""torch.library registrations of every sae_fast operator (namespace ``sae_fast::``)."""

from .batchtopk import BatchTopKCodes, batchtopk_encode
from .decode import sparse_decode, sparse_decode_csr
from .topk import TopKCodes, topk_encode

__all__ = ["sparse_decode", "sparse_decode_csr", "topk_encode", "TopKCodes", "batchtopk_encode", "BatchTopKCodes"]
