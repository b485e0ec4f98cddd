"""torch.library registrations of every sae_fast operator (namespace ``sae_fast::``)."""

from .decode import sparse_decode

__all__ = ["sparse_decode"]
