"""Sweep the launch parameters of the fused threshold kernel (JumpReLU; BatchTopK inference).

    python benchmarks/tune_threshold_encode.py [--shape N,d,M,L0] [--dtype bf16] [--budget-s 150]

Times ``triton_kernels/threshold_encode.py`` in the JumpReLU training configuration (a
threshold per latent set so that about L0 latents of a row are active, the band of half
width 0.025 around it listed too, no ReLU rule) for each (BLOCK_N, BLOCK_M, BLOCK_D,
num_warps, num_stages), next to the cuBLAS GEMM alone (the floor: the selection should
hide behind it). Candidates are timed in order of distance from the current default, so a
sweep cut short by its budget has tried the likeliest wins. Every config's output is
compared with the default's (share of rows listing as many entries). The first H200 run of the JumpReLU forward (48.6
ms against a 7.3 ms GEMM) was never tuned; the TopK kernel's sweep found 1.5x by going from
8 warps / 3 stages to 4 warps / 4 stages on the same tile (the default is now 8 warps /
4 stages: 4 warps spill here).
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


def candidate_configs(elem_size: int = 2) -> list[dict]:
    from sae_fast.triton_kernels.threshold_encode import _tile_config

    grid = dict(block_n=[32, 64, 128], block_m=[64, 128], block_d=[32, 64], warps=[4, 8], stages=[3, 4])
    out = [dict(zip(grid, v)) for v in itertools.product(*grid.values())]
    out = [c for c in out if c["block_n"] * c["block_m"] <= 128 * 128]
    default = dict(zip(("block_n", "block_m", "block_d", "warps", "stages"), _tile_config(elem_size)))
    if default not in out:
        out.append(default)
    out.sort(key=lambda c: sum(c[key] != default[key] for key in default))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--shape", default="8192,2304,131072,64", help="N,d,M,L0")
    p.add_argument("--budget-s", type=float, default=150, help="stop sweeping after this many seconds")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("tune_threshold_encode: needs a CUDA GPU")
    from sae_fast.triton_kernels import threshold_encode as fused

    N, d, M, L0 = (int(v) for v in args.shape.split(","))
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    x = torch.randn(N, d, device="cuda").to(dtype)
    W = (torch.randn(M, d, device="cuda") * d**-0.5).to(dtype)  # pre ~ N(0, 1)
    b = torch.zeros(M, device="cuda", dtype=dtype)
    # θ with P(pre > θ) = L0 / M for N(0, 1) pre-activations
    theta_value = float(torch.special.ndtri(torch.tensor(1 - L0 / M, dtype=torch.float64)))
    theta = torch.full((M,), theta_value, device="cuda", dtype=dtype)
    tflop = 2 * N * M * d / 1e12
    print(f"shape N={N} d={d} M={M} L0={L0} (θ={theta_value:.3f}) {args.dtype}; {torch.cuda.get_device_name()}",
          flush=True)
    gemm_ms = _bench(lambda: F.linear(x, W, b))
    print(f"   gemm_only: {gemm_ms:8.3f} ms  {tflop / gemm_ms * 1e3:6.1f} TFLOP/s", flush=True)

    def run(cfg=None):
        return fused.threshold_encode(x, W, b, None, theta, relu=False, half_band=0.025, capacity=512, config=cfg)

    want = run()
    print(f"   listed per row: {want[0].numel() / N:.1f}", flush=True)
    results = []
    t0 = time.time()
    for cfg in candidate_configs(x.element_size()):
        if time.time() - t0 > args.budget_s:
            print("budget spent; stopping the sweep", flush=True)
            break
        try:
            got = run(cfg)
            # rows listing as many entries as the default launch (GEMM rounding may move an
            # entry at the band's edge, so a little under 1.0 is no error)
            same = (got[2].diff() == want[2].diff()).float().mean().item()
            ms = _bench(lambda: run(cfg))
        except Exception as e:  # compile failures (shared memory, registers) are data here
            print(f"{cfg}: failed: {str(e).splitlines()[0][:100]}", flush=True)
            continue
        results.append((ms, cfg, same))
        print(f"{ms:8.3f} ms  {tflop / ms * 1e3:6.1f} TFLOP/s  x{ms / gemm_ms:.2f} gemm  same-rows {same:.4f}  {cfg}",
              flush=True)
    print("\nbest first:")
    for ms, cfg, same in sorted(results, key=lambda r: r[0])[:10]:
        print(f"{ms:8.3f} ms  {tflop / ms * 1e3:6.1f} TFLOP/s  x{ms / gemm_ms:.2f} gemm  same-rows {same:.4f}  {cfg}")


if __name__ == "__main__":
    main()
