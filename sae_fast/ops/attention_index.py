"""``sae_fast::vertical_slash_index``: MInference's vertical-slash attention pattern turned into
the per-query-block lists that the block-sparse attention kernel walks.

Positions and causality
-----------------------
Batch element b holds ``n = seq_lens[b]`` tokens in a padded length ``L = context_len``
(tokens first, padding after). Queries i and keys j both run over ``0 .. n-1`` (T = S = n);
the causal rule is FlashAttention's bottom-right one, which for T = S is ``j <= i``. Query
rows and keys at or past n belong to no pattern: their lists are empty and no listed key is
>= n.

Inputs
------
* ``vertical_idx [B, H, NV]`` int32/int64: key columns every query of head h sees. Any
  order; values < 0 are padding and ignored; duplicates are allowed (counted once); values
  >= n are ignored (beyond the sequence).
* ``slash_idx [B, H, NS]`` int32/int64: diagonal offsets ``o >= 0``; query i sees key
  ``i - o``. Any order (MInference's descending order and ascending both work: both lists
  are sorted internally); values < 0 are padding; duplicates allowed; ``o >= n`` selects no
  key and is ignored.
* ``seq_lens [B]`` int32/int64 in ``[0, L]``; ``block_m``, ``block_n`` powers of two >= 16
  (query rows per block; width of a key range).

The pattern: row i < n sees ``P_i = {j <= i : j in V[b, h] or i - j in S[b, h]}``.

Outputs (all int32, contiguous)
-------------------------------
For each (b, h) and query block ``qb`` (rows ``m0 = qb*block_m`` to
``m1 = min(m0 + block_m, n)``, exclusive; ``NQB = ceil(L / block_m)``):

* ``block_count [B, H, NQB]`` and ``block_offset [B, H, NQB, MAX_BLOCKS]``: the first
  ``block_count`` entries are starts s of key ranges ``[s, s + block_n)``, strictly
  ascending and pairwise disjoint (``s_{k+1} >= s_k + block_n``), with ``0 <= s < m1``
  but not aligned to block_n. A range may reach past the diagonal, past n and past L: the
  kernel must apply the causal mask ``j <= i`` to range keys and mask key loads at L.
* ``column_count [B, H, NQB]`` and ``column_index [B, H, NQB, MAX_COLS]``: the first
  ``column_count`` entries are single keys j, strictly ascending, ``0 <= j < m1`` (so
  ``j < n``), each a vertical of (b, h), none inside any range of the block. The kernel
  applies the causal mask to them as well (a column can lie past some rows of the block).
* Entries past a count are 0 (an in-bounds key, so a whole-vector load masked by the count
  is safe). Query blocks with ``m0 >= n`` have both counts 0.
* ``MAX_BLOCKS = min(ceil(L / block_n), NS * ceil(block_m / block_n))`` and
  ``MAX_COLS = min(NV, L)``: always enough (``index_buffer_sizes``).

The set this denotes: row i of block qb (``m0 <= i < m1``) attends to
``D_i = {j <= i : j in some [s, s + block_n)} ∪ {j <= i : j in the columns}``; no key
appears twice in a block's lists (ranges disjoint, columns distinct and outside every
range), so a kernel that sums every listed key once computes softmax over exactly D_i.
``D_i`` contains the pattern ``P_i`` and is in general a superset of it: a range covers
its keys for every row of the block, also keys that lie on none of its diagonals for that
row (the over-coverage MInference accepts, whole ranges being what a tensor core computes).
Verticals inside a range are therefore covered for all rows and are dropped; the others
become columns. Rows i >= n of a partial last block are not part of D: the kernel must
ignore (or mask) their outputs.

How ranges are chosen: diagonal o covers the keys ``[max(0, m0 - o), m1 - o)`` of the
block. Walking the offsets in descending order (spans in ascending order), each new range
starts at the first key of the union of spans not yet covered. This greedy cover uses the
fewest ``block_n``-wide ranges that cover the union (so never more than MInference's
one range per run of diagonals), and its ranges are disjoint by construction.

Backends: ``"cuda"`` (the extension's kernel, ``csrc/vertical_slash_index.cu``) and
``"reference"`` (plain torch, ``sae_fast/reference/attention_index.py``, CPU or CUDA). They
return identical tensors. ``None``/``"auto"`` (or ``SAE_FAST_BACKEND``): CUDA tensors go to
the CUDA kernel when the extension is built, everything else to the reference. The op has no
Triton kernel: ``"triton"`` and ``"fastest"`` choose like ``"auto"``.
"""

# No ``from __future__ import annotations`` here: until pytorch/pytorch#145667 (torch 2.7)
# custom_op inferred the schema by eval()-ing string annotations in torch's own namespace,
# where ``Tuple`` is undefined ("Unsupported type annotation Tuple[...]" at import on torch 2.5).
import os
from typing import Optional, Tuple

import torch

from .. import _backend
from ..reference import attention_index as _ref
from . import _checks

_OP = "vertical_slash_index"
_INT32_MAX = 2**31 - 1
index_buffer_sizes = _ref.index_buffer_sizes

__all__ = ["vertical_slash_index", "index_buffer_sizes"]


def _is_power_of_two(x) -> bool:
    x = _checks.integer(x)
    return x is not None and x > 0 and (x & (x - 1)) == 0


def check_index_arguments(vertical_idx, slash_idx, seq_lens, context_len, block_m, block_n, op: str = _OP):
    """Shapes, dtypes, devices and block sizes (no device sync)."""
    _checks.check_tensor(op, "vertical_idx", vertical_idx, dim=3, dtypes=_checks.INDEX_DTYPES)
    _checks.check_tensor(op, "slash_idx", slash_idx, dim=3, dtypes=_checks.INDEX_DTYPES)
    _checks.check_tensor(op, "seq_lens", seq_lens, dim=1, dtypes=_checks.INDEX_DTYPES)
    B, H = vertical_idx.shape[:2]
    if tuple(slash_idx.shape[:2]) != (B, H):
        raise ValueError(
            f"{op}: slash_idx must be [B, H, NS] = [{B}, {H}, NS] like vertical_idx {tuple(vertical_idx.shape)}, "
            f"got {tuple(slash_idx.shape)}"
        )
    if seq_lens.shape[0] != B:
        raise ValueError(f"{op}: seq_lens must be [B] = [{B}] (vertical_idx is {tuple(vertical_idx.shape)}), got {tuple(seq_lens.shape)}")
    _checks.check_same_device(op, vertical_idx=vertical_idx, slash_idx=slash_idx, seq_lens=seq_lens)
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if not _is_power_of_two(value) or value < 16:
            raise ValueError(f"{op}: {name} must be a power of two >= 16, got {value!r}")
    if not isinstance(context_len, torch.SymInt) and _checks.integer(context_len) is None:
        raise TypeError(f"{op}: context_len must be an int, got {type(context_len).__name__}")
    if not isinstance(context_len, torch.SymInt) and not 0 <= context_len <= _INT32_MAX:
        raise ValueError(f"{op}: context_len must lie in [0, 2^31 - 1] (outputs are int32), got {context_len}")


def _check_seq_len_values(seq_lens: torch.Tensor, context_len: int, op: str = _OP):
    """ValueError unless 0 <= seq_lens <= context_len. Synchronises with the device once."""
    if seq_lens.numel() == 0:
        return
    lo, hi = (int(x) for x in torch.aminmax(seq_lens))
    if lo < 0:
        raise ValueError(f"{op}: seq_lens must be >= 0, found {lo}")
    if hi > context_len:
        raise ValueError(f"{op}: seq_lens must be <= context_len = {context_len}, found {hi}")


def cuda_kernel_available() -> bool:
    """The extension is built and has this op (an extension built before it existed has not)."""
    if not _backend.cuda_extension_available():
        return False
    from . import cuda_registrations

    return cuda_registrations.HAS_VERTICAL_SLASH_INDEX


def _resolve_backend(requested, device: torch.device) -> str:
    choice = requested if requested is not None else os.environ.get("SAE_FAST_BACKEND", "auto")
    if choice not in _backend.BACKENDS:
        raise ValueError(f"{_OP}: backend must be one of {_backend.BACKENDS}, got {choice!r}")
    if choice in ("auto", "fastest", "triton"):  # no Triton kernel for this op
        return "cuda" if device.type == "cuda" and cuda_kernel_available() else "reference"
    if choice == "cuda":
        if device.type != "cuda":
            raise ValueError(f"{_OP}: backend 'cuda' needs CUDA tensors, got device {device}")
        if not cuda_kernel_available():
            raise RuntimeError(
                f"{_OP}: backend 'cuda' needs the compiled extension sae_fast._C with this op, which is not "
                "built; reinstall with SAE_FAST_BUILD_CUDA=1 (see README) or use backend='reference'"
            )
    return choice


@torch.library.custom_op("sae_fast::vertical_slash_index", mutates_args=())
def vertical_slash_index_op(
    vertical_idx: torch.Tensor,
    slash_idx: torch.Tensor,
    seq_lens: torch.Tensor,
    context_len: int,
    block_m: int,
    block_n: int,
    backend: str,
    check_seq_lens: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if check_seq_lens:
        _check_seq_len_values(seq_lens, context_len)
    if backend == "cuda":
        from . import cuda_registrations

        return cuda_registrations.convert_vertical_slash_index(vertical_idx, slash_idx, seq_lens, context_len, block_m, block_n)
    return _ref.vertical_slash_index(vertical_idx, slash_idx, seq_lens, context_len, block_m, block_n)


@vertical_slash_index_op.register_fake
def _(vertical_idx, slash_idx, seq_lens, context_len, block_m, block_n, backend, check_seq_lens):
    B, H, nv = vertical_idx.shape
    nqb, max_blocks, max_cols = index_buffer_sizes(context_len, block_m, block_n, nv, slash_idx.shape[2])
    i32 = torch.int32
    return (
        vertical_idx.new_empty((B, H, nqb), dtype=i32),
        vertical_idx.new_empty((B, H, nqb, max_blocks), dtype=i32),
        vertical_idx.new_empty((B, H, nqb), dtype=i32),
        vertical_idx.new_empty((B, H, nqb, max_cols), dtype=i32),
    )


def vertical_slash_index(
    vertical_idx: torch.Tensor,
    slash_idx: torch.Tensor,
    seq_lens: Optional[torch.Tensor],
    block_m: int = 64,
    block_n: int = 64,
    *,
    context_len: Optional[int] = None,
    backend: Optional[str] = None,
    check_seq_lens: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Convert a vertical-slash pattern to ``(block_count, block_offset, column_count,
    column_index)``; the format is specified in this module's docstring.

    Args:
        vertical_idx: ``[B, H, NV]`` int32/int64 key columns (any order; < 0 padding).
        slash_idx: ``[B, H, NS]`` int32/int64 diagonal offsets ``o`` (key ``i - o`` for query
            i; any order; < 0 padding).
        seq_lens: ``[B]`` int32/int64 tokens per batch element, in ``[0, context_len]``;
            None means every element is ``context_len`` long (then context_len is required).
        block_m: query rows per block (power of two >= 16).
        block_n: keys per range (power of two >= 16).
        context_len: the padded length L (queries = keys). None: ``max(seq_lens)`` (one device
            sync; pass it explicitly under torch.compile or to fix the output shapes).
        backend: ``"cuda"``, ``"reference"`` or None for the default (see module docstring).
        check_seq_lens: verify ``0 <= seq_lens <= context_len`` (one device sync). With False
            the lengths are clamped into that interval.
    """
    if seq_lens is None:
        if context_len is None:
            raise ValueError(f"{_OP}: pass seq_lens or context_len")
        _checks.check_tensor(_OP, "vertical_idx", vertical_idx, dim=3)
        seq_lens = torch.full((vertical_idx.shape[0],), int(context_len), dtype=torch.int64, device=vertical_idx.device)
    _checks.check_tensor(_OP, "seq_lens", seq_lens, dim=1, dtypes=_checks.INDEX_DTYPES)
    if context_len is None:
        context_len = int(seq_lens.max()) if seq_lens.numel() else 0
    check_index_arguments(vertical_idx, slash_idx, seq_lens, context_len, block_m, block_n)
    block_m, block_n = _checks.integer(block_m), _checks.integer(block_n)  # (numpy ints -> int for the op)
    if not isinstance(context_len, torch.SymInt):
        context_len = _checks.integer(context_len)
    resolved = _resolve_backend(backend, vertical_idx.device)
    return vertical_slash_index_op(
        vertical_idx, slash_idx, seq_lens, context_len, block_m, block_n, resolved, bool(check_seq_lens)
    )
