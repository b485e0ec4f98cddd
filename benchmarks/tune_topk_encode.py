"""Sweep the launch parameters of the fused TopK encoder kernel on a GPU.

    python benchmarks/tune_topk_encode.py [--shape N,d,M,k] [--dtype bf16] [--quick]

Times the fused kernel (``triton_kernels/topk_encode.py``) for each (BLOCK_N, BLOCK_M,
BLOCK_D, num_warps, num_stages, sort_above) choice at one shape, next to the floors it is
measured against: the cuBLAS GEMM alone (``F.linear``) and ``F.linear`` + ``torch.topk``.
Prints ms and TFLOP/s (2·N·M·d per pass), best first; a config that fails to compile
(shared memory, registers) is reported and skipped. The defaults in ``_tile_config`` are
chosen from this output.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _bench(fn) -> float:
    from triton.testing import do_bench

    try:
        from .harness import rep_for_samples
    except ImportError:  # run as a script: benchmarks/ is on sys.path
        from harness import rep_for_samples

    # at least 5 timed runs per config (a 50 ms kernel at rep=50 was timed once)
    return float(do_bench(fn, warmup=10, rep=rep_for_samples(fn, 50, samples=5, cap_ms=1000), return_mode="median"))


def priority_configs(k_pad: int, default: dict) -> list[dict]:
    """Tried right after the default. A program holds BLOCK_N rows of x and walks the latents
    BLOCK_M at a time, re-reading its x rows from L2 for every latent tile while each W tile
    is read once per row block: L2 traffic ~ 2·N·M·d·(1/BLOCK_N + 1/BLOCK_M) bytes, 309 GB
    at 64 x 64 for N=16384, d=2304, M=131072: 45 ms measured on an H200 is ~7 TB/s, about
    what L2 delivers (consistent with an L2-bound kernel; the GEMM alone takes 14.5 ms). 128 rows cut it by a quarter; the running lists (BLOCK_N x BLOCK_M
    int64) then need 8 warps, which build without spilling at k <= 64 on sm_90 (kernel
    report: 241 regs at 3 stages, 247 at 4)."""
    if k_pad > 64:
        return []
    return [dict(default, block_n=128, block_m=64, block_d=64, warps=8, stages=st) for st in (3, 4)]


def candidate_configs(quick: bool, k_pad: int, elem_size: int = 2) -> list[dict]:
    """The grid, ordered by how many knobs differ from the kernel's current default (the
    default first, then its one-knob neighbours): a sweep cut short by its budget has then
    timed the changes most likely to matter (an H200 lease ran out after 11 of 32)."""
    from sae_fast.triton_kernels.topk_encode import _SORT_ABOVE, _tile_config

    bm = max(64, k_pad)
    grid = dict(block_n=[32, 64, 128], block_m=[bm, 2 * bm], block_d=[32, 64], warps=[4, 8], stages=[3, 4],
                sort_above=[_SORT_ABOVE])
    if quick:
        grid.update(block_m=[bm], stages=[3])
    out = [dict(zip(grid, v)) for v in itertools.product(*grid.values())]
    out = [c for c in out if 64 * 64 <= c["block_n"] * c["block_m"] <= 128 * 128]
    from sae_fast.triton_kernels.sparse_gather import config_arch

    arch = config_arch("cuda") if torch.cuda.is_available() else 90  # the launch defaults' family
    default = dict(zip(("block_n", "block_m", "block_d", "warps", "stages"), _tile_config(k_pad, elem_size, arch=arch)),
                   sort_above=_SORT_ABOVE)
    if default not in out:
        out.append(default)
    first = priority_configs(k_pad, default)
    rank = lambda c: first.index(c) if c in first else len(first)  # noqa: E731
    out.sort(key=lambda c: (c != default, rank(c), sum(c[key] != default[key] for key in default)))
    # sort_above sweep around the default tile
    out += [dict(default, sort_above=s) for s in (0, 4, 8, 32, 64) if s != _SORT_ABOVE]
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--shape", default="16384,2304,131072,64", help="N,d,M,k")
    p.add_argument("--quick", action="store_true", help="fewer configs")
    p.add_argument("--budget-s", type=float, default=400, help="stop sweeping after this many seconds")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("tune_topk_encode: needs a CUDA GPU")
    import triton

    from sae_fast.triton_kernels import topk_encode as fused

    N, d, M, k = (int(v) for v in args.shape.split(","))
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    x = torch.randn(N, d, device="cuda").to(dtype)
    W = (torch.randn(M, d, device="cuda") * d**-0.5).to(dtype)
    b = torch.zeros(M, device="cuda", dtype=dtype)
    tflop = 2 * N * M * d / 1e12
    print(f"shape N={N} d={d} M={M} k={k} {args.dtype}; {torch.cuda.get_device_name()}", flush=True)
    ref = {}
    for name, fn in (("gemm_only", lambda: F.linear(x, W, b)),
                     ("linear_topk", lambda: torch.topk(F.linear(x, W, b), k, dim=1))):
        try:
            ms = _bench(fn)
            ref[name] = ms
            print(f"{name:>12}: {ms:8.3f} ms  {tflop / ms * 1e3:6.1f} TFLOP/s", flush=True)
        except torch.OutOfMemoryError:
            print(f"{name:>12}: OOM")
        torch.cuda.empty_cache()
    want = fused.topk_encode(x, W, b, None, k)[1]
    results = []
    t0 = time.time()
    for cfg in candidate_configs(args.quick, triton.next_power_of_2(k), x.element_size()):
        if time.time() - t0 > args.budget_s:
            print("budget spent; stopping the sweep", flush=True)
            break
        try:
            got = fused.topk_encode(x, W, b, None, k, config=cfg)[1]
            same = (got == want).float().mean().item()
            ms = _bench(lambda: fused.topk_encode(x, W, b, None, k, config=cfg))
        except Exception as e:  # compile failures (shared memory, registers) are data here
            print(f"{cfg}: failed: {str(e).splitlines()[0][:100]}", flush=True)
            continue
        results.append((ms, cfg, same))
        print(f"{ms:8.3f} ms  {tflop / ms * 1e3:6.1f} TFLOP/s  x{ms / ref.get('gemm_only', float('nan')):.2f} gemm  "
              f"same-idx {same:.4f}  {cfg}", flush=True)
    print("\nbest first:")
    for ms, cfg, same in sorted(results, key=lambda r: r[0])[:10]:
        print(f"{ms:8.3f} ms  {tflop / ms * 1e3:6.1f} TFLOP/s  x{ms / ref.get('gemm_only', float('nan')):.2f} gemm  {cfg}")


if __name__ == "__main__":
    main()
