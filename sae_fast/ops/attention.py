"""``sae_fast::block_sparse_attention``: block-sparse flash attention for long-context
prefill (MInference-style ranges + columns), forward and backward, native GQA.

Two custom ops, each opaque to torch.compile: the forward (returns ``out`` and ``lse``) and
its backward (``dq, dk, dv`` given the gradients of both outputs). Backends: the Triton
kernels (``triton_kernels/block_sparse_attention.py``) or the dense fp32 reference
(``reference/attention.py``), chosen by ``sae_fast._backend.resolve_backend``: CUDA tensors
go to Triton (there is no CUDA-extension kernel for this op), CPU tensors to Triton under
``TRITON_INTERPRET=1`` and to the reference otherwise, fp64 to the reference.

Forward: one program per (batch, query head, query block) walks the block's key ranges and
then its gathered columns with an fp32 online softmax (exp2, scale·log2(e) folded in).
Backward (deterministic by default, no float atomics): dQ by the same walk; dK/dV by one
program per (batch, kv head, 64-key tile) over a device-built list of (query head, query
block, key mask) entries, with the distinct column keys of a kv head packed 64 per tile (see
the kernel module's docstring). Index values are never read on the host: no device sync.

``block_mask_attention`` runs the same kernel from a FlexAttention ``BlockMask``.
"""

from typing import Optional

import torch

from .. import _backend
from . import _checks

_OP = "block_sparse_attention"
_BLOCK_SIZES = (16, 32, 64, 128, 256)
MAX_HEAD_DIM = 256  # above 128 the kernels run 8 warps (kernel report: no spills at 256)


def _impl(backend: str):
    if backend == "reference":
        from ..reference import attention

        return attention
    from ..triton_kernels import block_sparse_attention

    return block_sparse_attention


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return _checks.accumulation_dtype(dtype)


@torch.library.custom_op("sae_fast::block_sparse_attention", mutates_args=())
def block_sparse_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_count: torch.Tensor,
    block_offset: torch.Tensor,
    column_count: torch.Tensor,
    column_index: torch.Tensor,
    causal: bool,
    scale: float,
    block_m: int,
    block_n: int,
    deterministic: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _impl(backend).block_sparse_attention(
        q, k, v, block_count.contiguous(), block_offset.contiguous(), column_count.contiguous(),
        column_index.contiguous(), causal, scale, block_m, block_n,
    )
    return out, lse


@block_sparse_attention_op.register_fake
def _(q, k, v, block_count, block_offset, column_count, column_index, causal, scale, block_m, block_n,
      deterministic, backend):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=_lse_dtype(q.dtype))


@torch.library.custom_op("sae_fast::block_sparse_attention_backward", mutates_args=())
def block_sparse_attention_backward_op(
    grad_out: torch.Tensor,
    grad_lse: Optional[torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    block_count: torch.Tensor,
    block_offset: torch.Tensor,
    column_count: torch.Tensor,
    column_index: torch.Tensor,
    causal: bool,
    scale: float,
    block_m: int,
    block_n: int,
    deterministic: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) through the same sparsity. ``grad_lse`` None: lse carries no gradient."""
    idx = (block_count.contiguous(), block_offset.contiguous(), column_count.contiguous(), column_index.contiguous())
    if backend == "reference":
        from ..reference import attention

        return attention.block_sparse_attention_backward(grad_out, grad_lse, q, k, v, out, lse, *idx,
                                                         causal, scale, block_m, block_n)
    from ..triton_kernels import block_sparse_attention as kernels

    return kernels.block_sparse_attention_backward(grad_out, grad_lse, q, k, v, out, lse, *idx,
                                                   causal, scale, block_m, block_n, deterministic)


@block_sparse_attention_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, block_count, block_offset, column_count, column_index, causal,
      scale, block_m, block_n, deterministic, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, block_count, block_offset, column_count, column_index, causal, scale, block_m, block_n, det, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, block_count, block_offset, column_count, column_index)
    ctx.args = (causal, scale, block_m, block_n, det, backend)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, block_count, block_offset, column_count, column_index = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = block_sparse_attention_backward_op(
        grad_out, grad_lse, q, k, v, out, lse, block_count, block_offset, column_count, column_index, *ctx.args
    )
    need = ctx.needs_input_grad
    return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None) + (None,) * 10


block_sparse_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _resolve(backend, device, dtype) -> str:
    if backend == "cuda":
        raise ValueError(f"{_OP}: there is no CUDA-extension kernel for this op; use backend='triton' "
                         "(the default on CUDA tensors) or 'reference'")
    resolved = _backend.resolve_backend(backend, device, dtype, _OP)
    # "fastest" (the default on CUDA when the extension is built) means Triton here.
    return "triton" if resolved in ("fastest", "cuda") else resolved


def _check_index(name, t, shape_prefix, dim, device):
    _checks.check_tensor(_OP, name, t, dim=dim, dtypes=_checks.INDEX_DTYPES)
    if tuple(t.shape[: len(shape_prefix)]) != tuple(shape_prefix):
        want = "[" + ", ".join(map(str, shape_prefix)) + (", *]" if dim > len(shape_prefix) else "]")
        raise ValueError(f"{_OP}: {name} must be {want} (B, Hq, cdiv(T, block_m)), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{_OP}: {name} is on {t.device} but q is on {device}")


def check_inputs(q, k, v, block_count, block_offset, column_count, column_index, scale, block_m, block_n):
    """Shapes, dtypes, devices, block sizes and scale; errors name the argument, the
    expected and the actual value. Index values are not read (no device sync): out-of-range
    keys are masked by definition, see ``block_sparse_attention``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.check_tensor(_OP, name, t, dim=4, dtypes=_checks.FLOAT_DTYPES)
    _checks.check_same_device(_OP, q=q, k=k, v=v)
    _checks.check_same_dtype(_OP, q=q, k=k, v=v)
    B, Hq, T, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"{_OP}: k and v must have the same shape [B, Hkv, S, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    Bk, Hkv, S, Dk = k.shape
    if Bk != B or Dk != D:
        raise ValueError(f"{_OP}: k must be [B={B}, Hkv, S, D={D}] to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"{_OP}: the number of query heads ({Hq}) must be a multiple of the number of kv heads ({Hkv})")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"{_OP}: head dim must be in [1, {MAX_HEAD_DIM}] (64 and 128 are the tuned sizes), got {D}")
    for name, bs in (("block_m", block_m), ("block_n", block_n)):
        if _checks.integer(bs) not in _BLOCK_SIZES:
            raise ValueError(f"{_OP}: {name} must be one of {_BLOCK_SIZES}, got {bs!r}")
    if scale is not None and not (_checks.real(scale) is not None and 0 < float(scale) < float("inf")):
        raise ValueError(f"{_OP}: scale must be a positive finite number, got {scale!r}")
    nqb = -(-T // block_m)
    _check_index("block_count", block_count, (B, Hq, nqb), 3, q.device)
    _check_index("block_offset", block_offset, (B, Hq, nqb), 4, q.device)
    _check_index("column_count", column_count, (B, Hq, nqb), 3, q.device)
    _check_index("column_index", column_index, (B, Hq, nqb), 4, q.device)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_count: torch.Tensor,
    block_offset: torch.Tensor,
    column_count: torch.Tensor,
    column_index: torch.Tensor,
    *,
    causal: bool = True,
    scale: Optional[float] = None,
    block_m: int = 64,
    block_n: int = 64,
    deterministic: bool = True,
    backend: Optional[str] = None,
):
    """Block-sparse attention over an MInference-style index. Returns ``(out, lse)``.

    Args:
        q: ``[B, Hq, T, D]``; k, v: ``[B, Hkv, S, D]`` (SDPA layout, any strides: a
            ``[B, T, H, D]`` tensor ``.transpose(1, 2)`` is read in place). ``Hq`` a multiple
            of ``Hkv``: query head h reads kv head ``h // (Hq // Hkv)`` (GQA, K/V never
            repeated). D ≤ 256 (64 and 128 are the tuned sizes; up to 256, e.g. Gemma's
            heads, runs 8-warp launches that need about 200 KB of shared memory per block
            for the backward: A100 / H100 class GPUs). fp16 / bf16 / fp32 (fp64 runs on the
            reference).
        block_count ``[B, Hq, NQB]``, block_offset ``[B, Hq, NQB, MAX_BLOCKS]``: per query block
            of ``block_m`` rows (``NQB = cdiv(T, block_m)``), the start ``s`` of each key range
            ``[s, s + block_n)``; starts need not be aligned and ranges may run past ``S`` or
            past the diagonal (masked).
        column_count ``[B, Hq, NQB]``, column_index ``[B, Hq, NQB, MAX_COLS]``: single keys.
            int32 or int64, any strides. Entries beyond the counts are ignored, counts are
            clipped to ``[0, MAX_*]``, and keys outside ``[0, S)`` are ignored. The caller
            guarantees that no key is listed twice for one query block (a key listed twice
            would count twice in the forward, and the gradients would then be undefined: the
            Triton backward merges duplicates, the reference counts a key once).
        causal: also mask keys ``j > i + (S - T)`` (bottom-right aligned, as flash-attn).
        scale: softmax scale, default ``D ** -0.5``.
        block_m, block_n: the index's block sizes, powers of two in [16, 256].
        deterministic: the backward uses no float atomics (default): bitwise reproducible.
            False lets the dK/dV pass also produce dQ with fp32 atomics (one pass fewer).
        backend: None / ``"auto"``, ``"triton"`` or ``"reference"`` (dense fp32 attention over
            the expanded mask, O(T·S) memory: tests and small inputs).

    Returns:
        out ``[B, Hq, T, D]`` (contiguous, q's dtype) and lse ``[B, Hq, T]`` fp32 (fp64 for fp64
        inputs), the natural-log sum of ``exp(scale · q·k)`` over the attended keys. A row that
        sees no key has out = 0 and lse = -inf (no NaN, zero gradients). Differentiable in
        q, k and v through both outputs (once: no double backward).

    K and V must be finite everywhere in ``[0, S)``, padding included: as in flash attention, a
    masked-out key inside a loaded tile still meets the probabilities as 0·v, so a NaN or inf
    there reaches rows that never attend it (zero-fill padding). Rows past a sequence's real
    length inside its last query block are computed like any other row; mask them in the loss.
    """
    check_inputs(q, k, v, block_count, block_offset, column_count, column_index, scale, block_m, block_n)
    block_m, block_n = _checks.integer(block_m), _checks.integer(block_n)  # (numpy ints -> int for the op)
    resolved = _resolve(backend, q.device, q.dtype)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    return block_sparse_attention_op(q, k, v, block_count, block_offset, column_count, column_index,
                                     bool(causal), scale, block_m, block_n, bool(deterministic), resolved)


# ------------------------------------------------------------------ FlexAttention block masks


def _mask_mod_values(mask_mod, b, h, q_idx, kv_idx):
    """Evaluate a FlexAttention mask_mod on broadcastable index tensors (elementwise mask
    mods, including ones that index tensors by q_idx / kv_idx); torch.vmap as a fallback."""
    shape = torch.broadcast_shapes(b.shape, h.shape, q_idx.shape, kv_idx.shape)
    try:
        res = mask_mod(b, h, q_idx, kv_idx)
        return torch.broadcast_to(torch.as_tensor(res, device=q_idx.device), shape).to(torch.bool)
    except Exception:  # a mask_mod written for scalars: vmap it over every dimension
        args = [t.expand(shape).reshape(-1) for t in (b, h, q_idx, kv_idx)]
        return torch.vmap(mask_mod)(*args).reshape(shape).to(torch.bool)


def block_mask_to_index(block_mask, B: int, H: int, T: int, S: int, *, chunk: int = 256):
    """Convert a FlexAttention ``BlockMask`` into this op's index.

    Full blocks become aligned ranges. Partial blocks (those FlexAttention evaluates its
    mask_mod on) are evaluated here once per (batch, head), on their in-bounds positions, as
    FlexAttention does (also for a mask shared over B or H), and must each be all-True (kept
    as a range), all-False (dropped), the same keys for every row (kept as single columns:
    sink tokens that do not fill a block, as in A-shape masks) or exactly the causal
    restriction of the block (``kv <= q + S - T``, bottom-right; for T == S that is the usual
    ``q >= kv``) — the common case of causal, block-aligned sliding-window and block-aligned
    document-causal masks. Any other partial block (a row-dependent pattern our per-block key lists cannot express) raises
    ValueError. When causal blocks occur, the kernel runs with ``causal=True`` and every
    other kept block must lie at or below the diagonal.

    On torch < 2.6 a BlockMask carries no sequence lengths and ``create_block_mask`` records
    ``BLOCK_SIZE`` 128 whatever block it used: a mask whose kv_indices are not
    ``cdiv(S, BLOCK_SIZE[1])`` wide is refused there (build it with ``BLOCK_SIZE=128`` or
    with ``BlockMask.from_kv_blocks``).

    Returns ``(block_count, block_offset, column_count, column_index, causal, block_m,
    block_n)``, index tensors int32 ``[B, H, NQB, ...]``. Reads the mask on the
    host side (device syncs): convert once, reuse the index.
    """
    if not all(hasattr(block_mask, a) for a in ("BLOCK_SIZE", "kv_num_blocks", "kv_indices", "mask_mod")):
        raise TypeError("block_mask_attention: block_mask must be a torch.nn.attention.flex_attention.BlockMask "
                        f"(create_block_mask), got {type(block_mask).__name__}")
    bq, bk = block_mask.BLOCK_SIZE if isinstance(block_mask.BLOCK_SIZE, tuple) else (block_mask.BLOCK_SIZE,) * 2
    bq, bk = int(bq), int(bk)
    lengths = getattr(block_mask, "seq_lengths", None)  # torch < 2.6: only the padded block grid
    q_len, kv_len = (int(x) for x in lengths) if lengths is not None else (T, S)
    if (q_len, kv_len) != (T, S):
        raise ValueError(f"block_mask_attention: block_mask is for (Q_LEN, KV_LEN) = {(q_len, kv_len)}, "
                         f"the inputs have (T, S) = {(T, S)}")
    if bq not in _BLOCK_SIZES or bk not in _BLOCK_SIZES:
        raise ValueError(f"block_mask_attention: BLOCK_SIZE {(bq, bk)} must be powers of two in {_BLOCK_SIZES}")
    num, idx = block_mask.kv_num_blocks, block_mask.kv_indices
    Bm, Hm, nqb = num.shape
    if Bm not in (1, B) or Hm not in (1, H):
        raise ValueError(f"block_mask_attention: block_mask has batch/head dims {(Bm, Hm)}, need 1 or {(B, H)}")
    if nqb != -(-T // bq):
        raise ValueError(f"block_mask_attention: block_mask has {nqb} query blocks, expected cdiv({T}, {bq})")
    dev = num.device
    nk = idx.shape[-1]
    if lengths is None and nk != -(-S // bk):
        # torch < 2.6's create_block_mask records BLOCK_SIZE 128 whatever block it used (and
        # one query block of Q_LEN rows below 128): the only trace of the real kv block is the
        # width of kv_indices, which it always builds as cdiv(KV_LEN, kv block).
        raise ValueError(f"block_mask_attention: block_mask has {nk} kv blocks per row, expected cdiv({S}, {bk}); "
                         "it does not record its sequence lengths (torch < 2.6), whose create_block_mask records "
                         "BLOCK_SIZE 128 whatever it used: build the mask with BLOCK_SIZE=128, or with "
                         "BlockMask.from_kv_blocks(..., BLOCK_SIZE=...) and cdiv(S, BLOCK_SIZE[1]) wide indices")
    mask_mod = block_mask.mask_mod
    if mask_mod is not None and (Bm, Hm) != (B, H):
        # A mask shared over batch or heads (B or H None in create_block_mask) shares its block
        # lists, but FlexAttention evaluates the mask_mod inside partial blocks with each real
        # (b, h): so must we, or a b- or h-dependent mask_mod is read at (0, 0) for everyone.
        num, idx = num.expand(B, H, nqb), idx.expand(B, H, nqb, nk)
    listed = torch.arange(nk, device=dev) < num[..., None].long()
    keep = listed.clone()
    causal_blocks = torch.zeros_like(listed)
    pos = listed.nonzero()  # [P, 4]: b, h, qb, slot
    col_entries = []  # [b, h, qb, key] of blocks whose rows all see the same keys: single columns
    ar_q = torch.arange(bq, device=dev)
    ar_k = torch.arange(bk, device=dev)
    for c0 in range(0, pos.shape[0], chunk):
        p = pos[c0:c0 + chunk]
        b_i, h_i, qb_i = p[:, 0], p[:, 1], p[:, 2]
        kb_i = idx[b_i, h_i, qb_i, p[:, 3]].long()
        qi = (qb_i[:, None] * bq + ar_q)[:, :, None]
        ki = (kb_i[:, None] * bk + ar_k)[:, None, :]
        inb = (qi < T) & (ki < S)
        vals = _mask_mod_values(mask_mod, b_i[:, None, None], h_i[:, None, None], qi.clamp(max=T - 1),
                                ki.clamp(max=S - 1)) if mask_mod is not None else torch.ones_like(inb)
        vals = vals & inb
        diag = inb & (ki <= qi + (S - T))
        full = (vals | ~inb).flatten(1).all(1)
        empty = ~vals.flatten(1).any(1)
        is_causal = (vals == diag).flatten(1).all(1) & ~full & ~empty
        # every row sees the same keys (a block's first row is always in bounds): e.g. sink
        # tokens that do not fill a block, kept as single columns
        row0 = vals[:, :1, :]
        is_cols = ((vals == row0) | ~inb).flatten(1).all(1) & ~full & ~empty & ~is_causal
        if is_cols.any():
            j, c = row0[is_cols, 0, :].nonzero().unbind(1)
            sel = is_cols.nonzero().view(-1)[j]
            col_entries.append(torch.stack([b_i[sel], h_i[sel], qb_i[sel], kb_i[sel] * bk + c], 1))
        bad = ~(full | empty | is_causal | is_cols)
        if bad.any():
            j = int(bad.nonzero()[0, 0])
            raise ValueError(
                "block_mask_attention: a partial block (batch "
                f"{int(b_i[j])}, head {int(h_i[j])}, query block {int(qb_i[j])}, kv block {int(kb_i[j])}) is "
                "neither full, empty, the causal diagonal nor the same keys for every row; its mask depends "
                "on the row in a way per-block key lists cannot express exactly")
        keep[b_i, h_i, qb_i, p[:, 3]] = ~empty & ~is_cols
        causal_blocks[b_i, h_i, qb_i, p[:, 3]] = is_causal
    offsets = idx.long()
    if block_mask.full_kv_num_blocks is not None:
        fnum, fidx = block_mask.full_kv_num_blocks, block_mask.full_kv_indices
        flisted = torch.arange(fidx.shape[-1], device=dev) < fnum[..., None].long()
        lead = torch.broadcast_shapes(keep.shape[:3], flisted.shape[:3])
        grow = lambda t: t.expand(*lead, t.shape[-1])  # noqa: E731  (one side may be shared over b/h)
        keep = torch.cat([grow(keep), grow(flisted)], -1)
        causal_blocks = torch.cat([grow(causal_blocks), grow(torch.zeros_like(flisted))], -1)
        offsets = torch.cat([grow(offsets), grow(fidx.long())], -1)
    causal = bool(causal_blocks.any())
    cols = torch.cat(col_entries) if col_entries else torch.zeros((0, 4), dtype=torch.long, device=dev)
    if causal and cols.numel() and bool((cols[:, 3] > cols[:, 2] * bq + (S - T)).any()):
        raise ValueError("block_mask_attention: the mask mixes causal diagonal blocks with single keys above "
                         "the diagonal; one causal flag cannot express both")
    if causal:
        # every kept non-causal block must be entirely visible under the causal mask
        qb_first = (torch.arange(nqb, device=dev) * bq).view(1, 1, nqb, 1)
        k_last = torch.clamp(offsets * bk + bk, max=S) - 1
        hidden = keep & ~causal_blocks & (k_last > qb_first + (S - T))
        if hidden.any():
            raise ValueError("block_mask_attention: the mask mixes causal diagonal blocks with kept blocks "
                             "above the diagonal; one causal flag cannot express both")
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)
    block_offset = (torch.gather(offsets, -1, order) * bk).to(torch.int32)
    block_count = keep.sum(-1).to(torch.int32)
    block_count = block_count.expand(B, H, nqb).contiguous()
    block_offset = block_offset.expand(B, H, nqb, block_offset.shape[-1]).contiguous()
    column_count = torch.zeros((B, H, nqb), dtype=torch.int64, device=dev)
    max_cols = 0
    if cols.numel():
        flat = (cols[:, 0] * H + cols[:, 1]) * nqb + cols[:, 2]
        column_count.view(-1).index_add_(0, flat, torch.ones_like(flat))
        max_cols = int(column_count.max())
        order = torch.argsort(flat * (S + 1) + cols[:, 3])
        flat, keys = flat[order], cols[order, 3]
        starts = torch.cumsum(column_count.view(-1), 0) - column_count.view(-1)
        slot = torch.arange(flat.numel(), device=dev) - starts[flat]
    column_index = torch.zeros((B * H * nqb, max_cols), dtype=torch.int32, device=dev)
    if cols.numel():
        column_index[flat, slot] = keys.to(torch.int32)
    column_index = column_index.view(B, H, nqb, max_cols)
    return block_count, block_offset, column_count.to(torch.int32), column_index, causal, bq, bk


def block_mask_attention(q, k, v, block_mask, *, scale: Optional[float] = None, backend: Optional[str] = None,
                         deterministic: bool = True):
    """Attention under a FlexAttention ``BlockMask`` (``torch.nn.attention.flex_attention``)
    with this package's block-sparse kernel: ``(out, lse)`` as ``block_sparse_attention``.
    The mask is converted by ``block_mask_to_index`` (see there for which partial blocks are
    exact; others raise ValueError); q/k/v as in ``block_sparse_attention`` (GQA native)."""
    _checks.check_tensor("block_mask_attention", "q", q, dim=4)
    _checks.check_tensor("block_mask_attention", "k", k, dim=4)
    B, H, T, _ = q.shape
    S = k.shape[2]
    bc, bo, cc, ci, causal, bm, bn = block_mask_to_index(block_mask, B, H, T, S)
    return block_sparse_attention(q, k, v, bc.to(q.device), bo.to(q.device), cc.to(q.device), ci.to(q.device),
                                  causal=causal, scale=scale, block_m=bm, block_n=bn, backend=backend,
                                  deterministic=deterministic)
