"""Sweep the Triton launch parameters of the sparse-gather kernels on a GPU.

    python benchmarks/tune_sparse_gather.py [--dtype bf16] [--shape N,k,M,d]

Times each (block, num_warps) choice of the three kernel uses inside sparse decode at one
shape (default: the main benchmark shape), next to the CUDA extension when it is built:
  fwd   csr_gather_sum, uniform rows of k entries over W_dec    (decode forward)
  dW    csr_gather_sum, latent rows of a stable sort over grad  (decoder weight gradient)
  dval  gathered_dot over W_dec                                 (values gradient)
Prints ms and effective GB/s (gathered bytes / time) per config, best first. The launch
heuristics in triton_kernels/sparse_gather.py are chosen from this output.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _bench(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--shape", default="8192,64,131072,2304", help="N,k,M,d")
    p.add_argument("--top", type=int, default=8, help="configs printed per kernel")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("tune_sparse_gather: needs a CUDA GPU")

    from sae_fast import cuda_extension_available
    from sae_fast.triton_kernels import sparse_gather as tk

    N, k, M, d = (int(x) for x in args.shape.split(","))
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    values = torch.randn(N, k, device="cuda").to(dtype)
    indices = torch.randint(0, M, (N, k), device="cuda")
    W = (torch.randn(M, d, device="cuda") * 0.02).to(dtype)
    grad = torch.randn(N, d, device="cuda").to(dtype)
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offsets = torch.zeros(M + 1, device="cuda", dtype=torch.int64)
    torch.cumsum(torch.bincount(flat, minlength=M), 0, out=offsets[1:])
    rows_of = (order // k).contiguous()
    coef_sorted = values.reshape(-1)[order].contiguous()
    esize = W.element_size()
    gathered = N * k * d * esize

    uses = {
        "fwd": dict(
            bytes=gathered + N * d * esize,
            triton=lambda **c: tk.csr_gather_sum(values.reshape(-1), flat, None, N, W, None, **c),
            cuda=lambda: torch.ops.sae_fast.csr_gather_sum(values.reshape(-1), flat, None, N, W, None),
            space=dict(block_e=[8, 16, 32], block_d=[128, 256, 512], num_warps=[4, 8]),
        ),
        "dW": dict(
            bytes=gathered + M * d * esize,
            triton=lambda **c: tk.csr_gather_sum(coef_sorted, rows_of, offsets, M, grad, None, **c),
            cuda=lambda: torch.ops.sae_fast.csr_gather_sum(coef_sorted, rows_of, offsets, M, grad, None),
            space=dict(block_e=[4, 8, 16], block_d=[256, 512, 1024], num_warps=[4, 8]),
        ),
        "dval": dict(
            bytes=gathered + N * d * esize,
            triton=lambda **c: tk.gathered_dot(grad, indices, W, **c),
            cuda=lambda: torch.ops.sae_fast.gathered_dot(grad, indices, W),
            space=dict(block_k=[8, 16, 32], block_d=[128, 256, 512], num_warps=[4, 8]),
        ),
    }
    print(f"shape N={N} k={k} M={M} d={d} {args.dtype}; GPU {torch.cuda.get_device_name()}")
    for name, use in uses.items():
        want = use["triton"]()
        results = []
        keys = list(use["space"])
        for combo in itertools.product(*use["space"].values()):
            cfg = dict(zip(keys, combo))
            try:
                got = use["triton"](**cfg)
                torch.cuda.synchronize()
                if not torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2):
                    results.append((float("inf"), cfg, "WRONG"))
                    continue
                results.append((_bench(lambda: use["triton"](**cfg)), cfg, ""))
            except Exception as e:  # too much shared memory or registers: skip the config
                results.append((float("inf"), cfg, type(e).__name__))
        results.sort(key=lambda r: r[0])
        default_ms = _bench(lambda: use["triton"]())
        print(f"\n== {name}: floor bytes {use['bytes'] / 1e9:.2f} GB (gathered rows counted each time)")
        print(f"  triton default          {default_ms:8.3f} ms  {use['bytes'] / default_ms / 1e6:7.0f} GB/s")
        if cuda_extension_available():
            ms = _bench(use["cuda"])
            print(f"  cuda extension          {ms:8.3f} ms  {use['bytes'] / ms / 1e6:7.0f} GB/s")
        for ms, cfg, note in results[: args.top]:
            print(f"  {cfg}  {ms:8.3f} ms  {use['bytes'] / ms / 1e6:7.0f} GB/s {note}")
        bad = [r for r in results if r[2]]
        if bad:
            print(f"  ({len(bad)} configs failed: {sorted({r[2] for r in bad})})")


if __name__ == "__main__":
    main()
