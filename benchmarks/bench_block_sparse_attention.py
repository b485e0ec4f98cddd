"""Benchmark block-sparse attention prefill (MInference vertical-slash patterns).

    python benchmarks/bench_block_sparse_attention.py [--quick] [--T 8192,32768] [--density 0.03,0.1]
        [--providers sae_fast,flex,sdpa_flash] [--modes fwd,bwd] [--out PATH] [--list]

Shapes: B = 1, 32 query / 8 KV heads (GQA), D = 128, bf16, causal, T = S ∈ {8K, 32K, 128K},
target densities 3 %, 10 %, 20 % of the causal (row, key) pairs. Per head a vertical-slash
pattern (a local window of diagonals, random far diagonals, the first 30 keys plus random
verticals), converted to the kernel's index with ``sae_fast.ops.attention_index.
vertical_slash_index`` when present, else with the local converter below (same format).

Providers:

* ``sae_fast``: ``block_sparse_attention`` (Triton), 64×64 blocks.
* ``flex``: ``torch.compile(flex_attention)`` with a ``BlockMask`` at its native 128×128
  block granularity covering the same keys (every 128-key block the index touches; the
  diagonal blocks causal-masked): FlexAttention cannot express single columns or unaligned
  ranges, so it computes a superset (``flex_density`` in the row).
* ``sdpa_flash``: dense causal SDPA on the FlashAttention backend (GQA native).

Modes: ``fwd``; ``bwd`` (forward once untimed, then ``out.backward`` with fresh gradients);
``plan`` (sae_fast only: the device-side tile lists the backward builds, included in bwd);
``fwd_ranges`` / ``fwd_columns`` (sae_fast only, with ``fwd``: the forward over the index's
key ranges alone / its gathered columns alone, each with its own useful FLOPs, to tell which
half of the walk holds the forward below its target).
The index conversion is timed separately as ``index`` rows.

Columns beyond the harness's: ``density`` (useful entries / causal entries), ``useful
TFLOP/s`` = useful (row, key) entries × 4·D (forward) or × 10·D (backward: 2.5×) over the time
(dense SDPA: all causal entries), ``pct_dense`` = that rate over dense SDPA's at the same T.
Timings need a GPU; on CPU the script says so (exit 2); ``--list`` works anywhere.
First run on an H200 on 2026-12-04: results/README.md.
"""

from __future__ import annotations

import argparse

import torch

try:
    from . import harness
except ImportError:
    import harness

OP = "block_sparse_attention"
HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 64
T_VALUES = (8192, 32768, 131072)
DENSITIES = (0.03, 0.10, 0.20)
MODES = ("fwd", "bwd")
PROVIDERS = ("sae_fast", "flex", "sdpa_flash")
FLEX_BLOCK = 128


def shape_plan(quick: bool, t_values=T_VALUES, densities=DENSITIES) -> list[dict]:
    if quick:
        t_values, densities = t_values[:1], densities[1:2]
    return [dict(B=1, Hq=HEADS, Hkv=KV_HEADS, T=t, D=HEAD_DIM, density=d) for t in t_values for d in densities]


# ------------------------------------------------------------------------------- patterns


def vertical_slash_pattern(H: int, T: int, density: float, *, device="cuda", seed: int = 0):
    """(vertical [1, H, NV], slash [1, H, NS]) aiming at ``density`` of the causal pairs: half
    of each row's budget a local window of diagonals, a third far random diagonals, the rest
    verticals (always the first 30 keys). Sorted like MInference (verticals ascending, slashes
    descending)."""
    g = torch.Generator().manual_seed(seed)
    budget = max(64, int(density * T / 2))  # keys per row on average
    window = max(64, budget // 2)
    n_far = max(1, budget // 3 // BLOCK)  # each far diagonal costs a 64-wide range per block
    n_vert = max(30, budget - window - n_far * BLOCK)
    verts, slashes = [], []
    for _ in range(H):
        far = torch.randperm(max(1, T - window), generator=g)[:n_far] + window
        s = torch.cat([torch.arange(window), far]).unique().sort(descending=True).values
        v = torch.cat([torch.arange(30), torch.randperm(T, generator=g)[:n_vert]]).unique()[:n_vert].sort().values
        verts.append(v)
        slashes.append(s)
    pad = lambda xs: torch.nn.utils.rnn.pad_sequence(xs, batch_first=True, padding_value=-1)
    return pad(verts)[None].to(device), pad(slashes)[None].to(device)


def local_vertical_slash_index(vertical, slash, T: int, block: int = BLOCK):
    """The kernel's index from a vertical-slash pattern (T = S, batch 1), vectorised per head.
    Diagonal o covers keys [m0 - o, m0 + block - o) of the block starting at row m0; walking
    the spans in ascending order, each range starts at the first key not yet covered (the
    ranges of every block are the same up to the shift m0). Verticals inside a range or
    past the block's last row are dropped; the rest become columns."""
    dev = vertical.device
    _, H, _ = vertical.shape
    nqb = -(-T // block)
    m0 = torch.arange(nqb, device=dev) * block
    rel_starts, counts_r = [], []
    for h in range(H):
        offs = slash[0, h]
        offs = offs[offs >= 0].sort(descending=True).values.tolist()
        starts, covered = [], -(1 << 60)
        for o in offs:  # ascending span starts x = -o
            x = -o
            if x + block > covered:
                s = max(x, covered)
                starts.append(s)
                covered = s + block
        rel_starts.append(torch.tensor(starts or [0], device=dev))
        counts_r.append(len(starts))
    max_r = max(len(s) for s in rel_starts)
    bc = torch.zeros(1, H, nqb, dtype=torch.int32, device=dev)
    bo = torch.zeros(1, H, nqb, max_r, dtype=torch.int32, device=dev)
    nv = vertical.shape[-1]
    cc = torch.zeros(1, H, nqb, dtype=torch.int32, device=dev)
    ci = torch.zeros(1, H, nqb, nv, dtype=torch.int32, device=dev)
    for h in range(H):
        rel = rel_starts[h][: counts_r[h]]
        starts = m0[:, None] + rel[None, :]  # [nqb, R], descending? rel ascending
        keep = starts + block > 0  # ranges wholly before key 0 are dropped
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
        bc[0, h] = keep.sum(1).to(torch.int32)
        bo[0, h, :, : rel.numel()] = torch.gather(starts, 1, order).to(torch.int32)
        # coverage of relative key offsets d = key - m0 by the ranges
        lo = int(rel.min()) if rel.numel() else 0
        span = torch.zeros(block - lo + 1, dtype=torch.int32, device=dev)
        for r in rel.tolist():
            span[r - lo:r - lo + block] = 1
        v = vertical[0, h]
        v = v[v >= 0]
        d = v[None, :] - m0[:, None]  # [nqb, nv]
        inside = (d >= lo) & (d < lo + span.numel())
        covered = inside & (span[(d - lo).clamp(0, span.numel() - 1)] > 0)
        ok = ~covered & (v[None, :] < torch.clamp(m0 + block, max=T)[:, None])
        order = torch.argsort((~ok).to(torch.int8), dim=1, stable=True)
        cc[0, h] = ok.sum(1).to(torch.int32)
        ci[0, h, :, : v.numel()] = torch.gather(v[None, :].expand(nqb, -1), 1, order).to(torch.int32)
    return bc, bo, cc, ci


def build_index(vertical, slash, T: int):
    """Prefer the package's converter (another worker's op); fall back to the local one."""
    try:
        from sae_fast.ops.attention_index import vertical_slash_index

        return vertical_slash_index(vertical, slash, None, BLOCK, BLOCK, context_len=T,
                                    check_seq_lens=False), "vertical_slash_index"  # (as the estimate calls it: no sync)
    except (ImportError, NotImplementedError, RuntimeError):
        return local_vertical_slash_index(vertical, slash, T), "local"


def useful_entries(bc, bo, cc, ci, T: int, block: int = BLOCK) -> int:
    """Exact number of (row, key) pairs the index attends to (causal, T = S)."""
    total = 0
    rows = torch.arange(block, device=bc.device)
    nqb = bc.shape[-1]
    m0 = (torch.arange(nqb, device=bc.device) * block)[:, None, None]
    for h in range(bc.shape[1]):
        s = bo[0, h].long()[:, :, None]
        listed = (torch.arange(s.shape[1], device=s.device)[None, :] < bc[0, h, :, None])[:, :, None]
        i = m0 + rows[None, None, :]
        hi = torch.minimum(s + block, torch.minimum(i + 1, torch.full_like(i, T)))
        n = (hi - s.clamp(min=0)).clamp(min=0) * (i < T) * listed
        total += int(n.sum())
        c = ci[0, h].long()
        listed_c = torch.arange(c.shape[1], device=c.device)[None, :] < cc[0, h, :, None]
        m1 = torch.clamp(m0[:, :, 0] + block, max=T)
        total += int(((m1 - torch.maximum(c, m0[:, :, 0])).clamp(min=0) * listed_c).sum())
    return total


def split_index(index, part: str):
    """The index with only its key ranges (``part="ranges"``) or only its gathered columns
    (``"columns"``) listed: the other half's counts set to zero."""
    bc, bo, cc, ci = index
    if part == "ranges":
        return bc, bo, torch.zeros_like(cc), ci
    if part == "columns":
        return torch.zeros_like(bc), bo, cc, ci
    raise ValueError(f"unknown index part {part!r}")


def flex_block_mask(bc, bo, cc, ci, T: int):
    """A FlexAttention BlockMask (128×128 blocks) covering every key the index lists."""
    from torch.nn.attention.flex_attention import BlockMask

    dev = bc.device
    H, nqb = bc.shape[1], bc.shape[2]
    nb = -(-T // FLEX_BLOCK)
    touched = torch.zeros(H, nb, nb + 1, dtype=torch.bool, device=dev)
    qb128 = (torch.arange(nqb, device=dev) * BLOCK) // FLEX_BLOCK
    hh = torch.arange(H, device=dev)[:, None, None]
    qq = qb128[None, :, None]
    r = bo[0].long()
    listed = torch.arange(r.shape[-1], device=dev) < bc[0, ..., None]
    for edge in (r, r + BLOCK - 1):
        kb = torch.where(listed & (edge >= 0) & (edge < T), edge // FLEX_BLOCK, nb)
        touched[hh.expand_as(kb), qq.expand_as(kb), kb] = True
    c = ci[0].long()
    listed = torch.arange(c.shape[-1], device=dev) < cc[0, ..., None]
    kb = torch.where(listed, c // FLEX_BLOCK, nb)
    touched[hh.expand_as(kb), qq.expand_as(kb), kb] = True
    touched = touched[..., :nb]
    qi = torch.arange(nb, device=dev)
    full = touched & (qi[None, None, :] < qi[None, :, None])
    diag = touched & (qi[None, None, :] == qi[None, :, None])

    def lists(m):
        order = torch.argsort((~m).to(torch.int8), dim=-1, stable=True)
        return m.sum(-1).to(torch.int32)[None], order.to(torch.int32)[None]

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    num, idx = lists(diag)
    fnum, fidx = lists(full)
    density = float((full.sum() + diag.sum()) * FLEX_BLOCK * FLEX_BLOCK) / (H * T * (T + 1) / 2)
    bm = BlockMask.from_kv_blocks(num, idx, fnum, fidx, BLOCK_SIZE=FLEX_BLOCK, mask_mod=causal, seq_lengths=(T, T))
    return bm, density


# ------------------------------------------------------------------------------ providers


def provider_fn(name: str, index, flex_mask):
    if name == "sae_fast":
        harness.import_sae_fast()
        from sae_fast.ops.attention import block_sparse_attention

        return lambda q, k, v: block_sparse_attention(q, k, v, *index)[0]
    if name == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        # The bwd mode replays one graph's backward (retain_graph=True), which compiled graphs
        # with donated buffers refuse (seen at T=32K on an H200); donation only saves memory.
        import torch._functorch.config as functorch_config

        functorch_config.donated_buffer = False
        compiled = torch.compile(flex_attention, dynamic=False)  # (a second T must not reuse a dynamic-shape graph)
        return lambda q, k, v: compiled(q, k, v, block_mask=flex_mask, enable_gqa=True)
    if name == "sdpa_flash":
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def dense(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        return dense
    raise ValueError(f"unknown provider {name!r}")


def _guard(out, q, k, v, index, T) -> bool:
    """At T <= 8K: the first 4 query heads (one kv head) against the fp32 dense reference."""
    if T > 8192:
        return None
    harness.import_sae_fast()
    from sae_fast.reference.attention import block_sparse_attention as ref

    g = HEADS // KV_HEADS
    idx = [t[:, :g] for t in index]
    want, _ = ref(q[:, :g].float(), k[:, :1].float(), v[:, :1].float(), *idx)
    err = (out[:, :g].float() - want).norm() / want.norm()
    return bool(err < 2e-2)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="T = 8K, density 10%% only")
    p.add_argument("--T", default=",".join(map(str, T_VALUES)))
    p.add_argument("--density", default=",".join(map(str, DENSITIES)))
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--out", default=None)
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--list", action="store_true", help="print the planned shapes and exit (no GPU needed)")
    args = p.parse_args(argv)
    shapes = shape_plan(args.quick, tuple(int(t) for t in args.T.split(",")),
                        tuple(float(d) for d in args.density.split(",")))
    providers = sorted(args.providers.split(","), key=lambda n: n != "sdpa_flash")  # dense first: pct_dense
    modes = args.modes.split(",")
    if args.list:
        for s in shapes:
            print(harness.shape_str(s), "providers=" + ",".join(providers), "modes=" + ",".join(modes))
        return []
    harness.require_cuda()
    peaks = harness.measure_peaks()
    rows = []
    dense_rate = {}
    for shape in shapes:
        T, D = shape["T"], shape["D"]
        torch.manual_seed(0)
        q = torch.randn(1, HEADS, T, D, device="cuda", dtype=torch.bfloat16).requires_grad_()
        k = torch.randn(1, KV_HEADS, T, D, device="cuda", dtype=torch.bfloat16).requires_grad_()
        v = torch.randn(1, KV_HEADS, T, D, device="cuda", dtype=torch.bfloat16).requires_grad_()
        vert, slash = vertical_slash_pattern(HEADS, T, shape["density"])
        index, converter = build_index(vert, slash, T)
        index = tuple(index)
        timing = harness.bench(lambda: build_index(vert, slash, T))
        entries = useful_entries(*index, T)
        causal_entries = HEADS * T * (T + 1) // 2
        density = entries / causal_entries
        extra = dict(density=round(density, 4), converter=converter)
        rows.append(harness.make_row(OP, "sae_fast", "index", shape, "bf16", timing=timing, peaks=peaks, extra=extra))
        flex_mask, flex_density = (None, None)
        if "flex" in providers:
            flex_mask, flex_density = flex_block_mask(*index, T)
        for name in providers:
            fn = provider_fn(name, index, flex_mask)
            work = causal_entries if name == "sdpa_flash" else entries
            row_extra = dict(extra, flex_density=flex_density) if name == "flex" else dict(extra)
            extra_modes = []
            if name == "sae_fast":
                extra_modes += ["fwd_ranges", "fwd_columns"] if "fwd" in modes else []
                extra_modes += ["plan"] if "bwd" in modes else []
            for mode in modes + extra_modes:
                try:
                    ok = None
                    if mode == "fwd":
                        out = fn(q, k, v)
                        if name == "sae_fast":
                            ok = _guard(out, q, k, v, index, T)
                        timing = harness.bench(lambda: fn(q, k, v))
                        flops = 4 * D * work
                    elif mode == "bwd":
                        out = fn(q, k, v)
                        grad = torch.randn_like(out)
                        timing = harness.bench(lambda: out.backward(grad, retain_graph=True), grad_to_none=[q, k, v])
                        flops = 10 * D * work
                    elif mode in ("fwd_ranges", "fwd_columns"):
                        part = split_index(index, mode.removeprefix("fwd_"))
                        part_fn = provider_fn(name, part, None)
                        timing = harness.bench(lambda: part_fn(q, k, v))
                        flops = 4 * D * useful_entries(*part, T)
                    else:  # the backward's tile lists alone
                        from sae_fast.triton_kernels.block_sparse_attention import build_backward_plan

                        timing = harness.bench(lambda: build_backward_plan(*index, T, T, KV_HEADS))
                        flops = None
                    row = harness.make_row(OP, name, mode, shape, "bf16", timing=timing, flops=flops, peaks=peaks,
                                           ok=ok, extra=row_extra)
                    if flops and name == "sdpa_flash":
                        dense_rate[(T, mode)] = row.tflops
                    if flops and (T, mode) in dense_rate:
                        row.extra["pct_dense"] = round(100 * row.tflops / dense_rate[(T, mode)], 1)
                    rows.append(row)
                except torch.OutOfMemoryError as e:
                    rows.append(harness.make_row(OP, name, mode, shape, "bf16", note=f"OOM: {str(e)[:60]}",
                                                 extra=row_extra))
                except Exception as e:  # a provider that fails is a row too
                    rows.append(harness.make_row(OP, name, mode, shape, "bf16", error=f"{type(e).__name__}: {e}"[:300],
                                                 extra=row_extra))
                torch.cuda.empty_cache()
    if not args.no_save:
        harness.append_results(rows, args.out)
    harness.print_table(rows)
    return rows


if __name__ == "__main__":
    harness.run_cli(main)
