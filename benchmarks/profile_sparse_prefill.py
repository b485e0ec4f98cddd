"""Per-kernel GPU time of one prefill of the benchmark's model, dense and patched (torch.profiler).

    python benchmarks/profile_sparse_prefill.py [--T 32768] [--layers 1] [--providers sdpa,a_shape,vertical_slash]

On an H200 (2026-12-04) the A-shape patch at T=32K (23% of the causal pairs) took as long as
dense flash attention although the kernel alone should save ~40% of the attention time:
this prints, per provider, the top kernels by GPU time and the share of the attention
kernel, the index estimate and everything else, so that the gap can be named. Also the
index density, as in bench_sparse_prefill.py.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=32768)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--providers", default="sdpa,a_shape,vertical_slash")
    p.add_argument("--rows", type=int, default=12, help="kernels listed per provider")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("profile_sparse_prefill: needs a CUDA GPU")
    import bench_sparse_prefill as bench
    from torch.profiler import ProfilerActivity, profile

    from sae_fast.sparse_attention import patch_sparse_attention

    model = bench.build_model(args.layers, args.T, "cuda")
    heads = bench.LLAMA3_8B["num_attention_heads"]
    ids = torch.randint(0, bench.LLAMA3_8B["vocab_size"], (1, args.T), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(0))
    for name in args.providers.split(","):
        probe = bench._DensityProbe()
        with contextlib.ExitStack() as stack:
            if name != "sdpa":
                stack.enter_context(probe)
                stack.enter_context(patch_sparse_attention(model, bench.provider_config(name, args.layers, heads),
                                                           min_prefill_len=1))
            for _ in range(2):  # warm-up: Triton compiles, cuBLAS handles
                bench.prefill(model, ids)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                bench.prefill(model, ids)
                torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_time_total > 0 and e.device_type.name == "CUDA"]
        events.sort(key=lambda e: e.device_time_total, reverse=True)
        total = sum(e.device_time_total for e in events) / 1e3
        print(f"== {name}: {total:.2f} ms of GPU kernels over {args.layers} layer(s)"
              + (f", index density {probe.density:.3f}" if probe.density is not None else ""))
        for e in events[:args.rows]:
            share = 100 * e.device_time_total / 1e3 / total
            print(f"   {e.device_time_total / 1e3:9.3f} ms {share:5.1f}%  x{e.count:<4d} {e.key[:100]}")
        groups = {"attention kernel": ("_fwd_kernel", "flash", "attention"), "gemm": ("gemm", "sm90_xmma", "cutlass"),
                  "sort/scan (index)": ("sort", "scan", "radix", "cumsum")}
        for group, keys in groups.items():
            ms = sum(e.device_time_total for e in events if any(k in e.key.lower() for k in keys)) / 1e3
            print(f"   group {group:20s} {ms:9.3f} ms")


if __name__ == "__main__":
    main()
