"""Per-kernel GPU time of one sparse-decode forward+backward, per backend (torch.profiler).

    python benchmarks/profile_sparse_decode.py [--shape N,k,M,d] [--dtype bf16]

Shows where the backward's time goes (sort, bincount, gathers, bias reduction, launches)
so the benchmark's totals can be read against each kernel's byte floor.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--shape", default="8192,64,131072,2304", help="N,k,M,d")
    p.add_argument("--backends", default="triton,cuda")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("profile_sparse_decode: needs a CUDA GPU")
    import sae_fast
    from torch.profiler import ProfilerActivity, profile

    N, k, M, d = (int(x) for x in args.shape.split(","))
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    values = (torch.randn(N, k, device="cuda").relu() + 0.1).to(dtype).requires_grad_()
    indices = torch.randint(0, M, (N, k), device="cuda")
    W = (torch.randn(M, d, device="cuda") * 0.02).to(dtype).requires_grad_()
    bias = torch.zeros(d, device="cuda", dtype=dtype).requires_grad_()
    grad = torch.randn(N, d, device="cuda").to(dtype)
    for backend in args.backends.split(","):
        if backend == "cuda" and not sae_fast.cuda_extension_available():
            continue

        def step():
            values.grad = W.grad = bias.grad = None
            sae_fast.sparse_decode(values, indices, W, bias, backend=backend).backward(grad)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        print(f"\n===== backend={backend} N={N} k={k} M={M} d={d} {args.dtype} (5 steps)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
