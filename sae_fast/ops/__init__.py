"""torch.library registrations of every sae_fast operator (namespace ``sae_fast::``)."""

from .attention import block_mask_attention, block_sparse_attention
from .attention_index import vertical_slash_index
from .batchtopk import BatchTopKCodes, batchtopk_encode
from .decode import sparse_decode, sparse_decode_csr
from .jumprelu import JumpReLUCodes, jumprelu_encode, jumprelu_training_forward
from .topk import TopKCodes, topk_encode

__all__ = ["jumprelu_encode", "jumprelu_training_forward", "JumpReLUCodes", "sparse_decode", "sparse_decode_csr", "topk_encode", "TopKCodes", "batchtopk_encode", "BatchTopKCodes", "block_sparse_attention", "block_mask_attention", "vertical_slash_index"]
