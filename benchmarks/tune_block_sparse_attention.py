"""Sweep the launch parameters of the block-sparse attention kernels on a GPU.

    python benchmarks/tune_block_sparse_attention.py [--T 8192] [--density 0.1] [--head-dim 128]
        [--kernels fwd,dq,dkdv] [--budget-s 150] [--out PATH] [--list]

Same problem as ``bench_block_sparse_attention.py`` (B = 1, 32 query / 8 KV heads, bf16,
causal, a vertical-slash index at the target density). For each kernel, each candidate
(num_warps, num_stages, and key tiles per softmax step for the forward and dQ, or query rows
per step for dK/dV) is timed with the other kernels at their
defaults: ``fwd`` times the forward alone; ``dq`` and ``dkdv`` time the whole backward (the
tile plan is built once, outside the timing, and passed in; the two kernels are separate
launches, so a row's difference from the default row is that kernel's). Every candidate's
outputs are compared with the default's (max abs difference; the dQ and dK/dV kernels are
deterministic, so a correct config gives the same numbers up to its accumulation order).

Why: the defaults (``_fwd_config`` / ``_dkdv_config``) were read off the static kernel report
(registers, spills, blocks per SM at the launch's specialization), not timed. Candidates run
default first, then (sm_90) two key tiles per step at its spill-free launch, then
nearest-to-default, so a sweep cut short by its budget has tried the likeliest wins.
``--list`` prints the candidates without a GPU; ``--dry-run`` runs the first candidates of each
kernel once on the CPU (Triton's interpreter, TRITON_INTERPRET=1) at a small T, untimed, to
check the script itself.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

KERNELS = ("fwd", "dq", "dkdv")


def candidates(kernel: str, head_dim: int = 128, arch: int = 90) -> list[dict]:
    """Launch candidates of one kernel, the default first, then by how many fields differ."""
    from sae_fast.triton_kernels.block_sparse_attention import _dkdv_config, _fwd_config, _two_tiles_config

    first = []
    if kernel == "dkdv":
        grid = dict(num_warps=[4, 8], num_stages=[1, 2, 3], block_m=[32, 64])
        default = _dkdv_config(head_dim, arch)
    else:
        grid = dict(num_warps=[4, 8], num_stages=[1, 2, 3, 4], tiles_per_step=[1, 2])
        default = _fwd_config(64, head_dim, arch, kernel=kernel)
        if arch >= 90 and head_dim <= 128:  # two key tiles per step at the launch that builds without spills
            first = [_two_tiles_config(head_dim, kernel)]
    out = [dict(zip(grid, v)) for v in itertools.product(*grid.values())]
    if default not in out:
        out.append(default)
    out.sort(key=lambda c: (c not in first, sum(c[key] != default[key] for key in default), sorted(c.items())))
    out.remove(default)
    return [default] + out


def _problem(T: int, density: float, head_dim: int, dev: str = "cuda"):
    from bench_block_sparse_attention import HEADS, KV_HEADS, build_index, vertical_slash_pattern

    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, HEADS, T, head_dim, device=dev, dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, KV_HEADS, T, head_dim, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, KV_HEADS, T, head_dim, device=dev, dtype=torch.bfloat16, generator=g)
    vertical, slash = vertical_slash_pattern(HEADS, T, density, device=dev)
    index, _ = build_index(vertical, slash, T)
    return q, k, v, tuple(t.contiguous() for t in index)


def _bench(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=5, rep=30, return_mode="median"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=8192)
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--head-dim", type=int, default=128, choices=(64, 128, 256))
    p.add_argument("--kernels", default=",".join(KERNELS))
    p.add_argument("--budget-s", type=float, default=150, help="stop sweeping after this many seconds")
    p.add_argument("--out", help="also write the table to this file")
    p.add_argument("--list", action="store_true", help="print the candidates and exit (no GPU needed)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, interpreter: run the first two candidates of each kernel once, untimed")
    args = p.parse_args(argv)
    kernels = [k for k in args.kernels.split(",") if k]
    bad = [k for k in kernels if k not in KERNELS]
    if bad:
        p.error(f"unknown kernels {bad}; choose from {KERNELS}")
    from sae_fast.triton_kernels.sparse_gather import config_arch

    arch = config_arch("cuda") if torch.cuda.is_available() else 90  # the launch defaults' family
    if args.list:
        for kern in kernels:
            for c in candidates(kern, args.head_dim, arch):
                print(kern, c)
        return 0
    if not torch.cuda.is_available() and not args.dry_run:
        print("tune_block_sparse_attention: needs a CUDA GPU (--list and --dry-run work anywhere)", file=sys.stderr)
        return 2
    bench = _bench
    if args.dry_run:
        bench = lambda fn: (fn(), float("nan"))[1]  # noqa: E731  one untimed call

    from sae_fast.triton_kernels import block_sparse_attention as bsa

    q, k, v, index = _problem(args.T, args.density, args.head_dim, "cpu" if args.dry_run else "cuda")
    out, lse = bsa.block_sparse_attention(q, k, v, *index)
    g_out = torch.randn_like(out)
    base_grads = bsa.block_sparse_attention_backward(g_out, None, q, k, v, out, lse, *index)
    plan = bsa.build_backward_plan(*index, args.T, args.T, k.shape[1])
    device_name = "dry run (CPU)" if args.dry_run else torch.cuda.get_device_name()
    lines = [f"# {device_name} T={args.T} density~{args.density} D={args.head_dim} "
             f"torch {torch.__version__} arch sm_{arch}",
             f"{'kernel':<6} {'config':<48} {'ms':>8} {'vs default':>10} {'max |diff|':>11}"]
    print("\n".join(lines), flush=True)
    t_start = time.perf_counter()
    for kern in kernels:
        default_ms = None
        for cfg in candidates(kern, args.head_dim, arch)[: 2 if args.dry_run else None]:
            if time.perf_counter() - t_start > args.budget_s:
                lines.append(f"# budget of {args.budget_s:.0f} s spent: stopped before {kern} {cfg}")
                print(lines[-1], flush=True)
                break
            try:
                if kern == "fwd":
                    fn = lambda: bsa.block_sparse_attention(q, k, v, *index, config=cfg)  # noqa: E731
                    diff = (fn()[0].float() - out.float()).abs().max().item()
                else:
                    configs = {kern: cfg}
                    fn = lambda: bsa.block_sparse_attention_backward(  # noqa: E731
                        g_out, None, q, k, v, out, lse, *index, configs=configs, plan=plan)
                    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(fn(), base_grads))
                ms = bench(fn)
            except Exception as exc:  # a config the compiler rejects (shared memory, registers)
                if args.dry_run:
                    raise
                line = f"{kern:<6} {str(cfg):<48} {'failed':>8}  {type(exc).__name__}: {str(exc)[:80]}"
            else:
                default_ms = default_ms if default_ms is not None else ms  # the default runs first
                line = f"{kern:<6} {str(cfg):<48} {ms:>8.3f} {default_ms / ms:>9.2f}x {diff:>11.3g}"
            lines.append(line)
            print(line, flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
