"""torch.library registrations of every sae_fast operator (namespace ``sae_fast::``)."""

from .batchtopk import BatchTopKCodes, batchtopk_encode
from .decode import sparse_decode, sparse_decode_csr
from .jumprelu import JumpReLUCodes, jumprelu_encode, jumprelu_training_forward
from .topk import TopKCodes, topk_encode

__all__ = ["jumprelu_encode", "jumprelu_training_forward", "JumpReLUCodes", "sparse_decode", "sparse_decode_csr", "topk_encode", "TopKCodes", "batchtopk_encode", "BatchTopKCodes"]
