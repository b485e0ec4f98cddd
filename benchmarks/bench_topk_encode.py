"""Benchmark TopK encoding: values, indices = topk((x - b_dec) @ W_encᵀ + b_enc, k).

    python benchmarks/bench_topk_encode.py [--quick] [--out PATH]

Providers: ``gemm_only`` (the cuBLAS GEMM alone: the floor a fused kernel is measured
against), ``torch_linear_topk`` (F.linear + topk, what most SAE code does), ``sae_fast``
(the default backend: fused Triton selection, sparse backward), ``sae_fast_filter`` (the
probe-and-filter candidate, ``triton_kernels/topk_filter.py``: forward only, same keys as the
fused kernel; a row per backward mode says so; ``sae_fast_filter_rowslots`` is its other
epilogue), ``sparsify`` (EleutherAI
sparsify's ``SparseCoder.encode``, its fused encoder, when the package is installed: rows say
"not installed" otherwise), and the BatchTopK pair ``torch_batchtopk`` (F.linear, ReLU, one
topk over the flattened batch) / ``sae_fast_batchtopk`` (exact CSR selection). Modes fwd / bwd / fwd+bwd
(backward to x, W_enc, b_enc through the selected values). Rows carry FLOPs (2·N·M·d per
GEMM-sized pass) and peak memory: the fused op's should not grow with M beyond the weights.
First run on an H200 on 2026-12-04: results/README.md.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

try:
    from . import harness
except ImportError:
    import harness

OP = "topk_encode"
MAIN = {"N": 16384, "d": 2304, "M": 131072, "k": 64}
SWEEP = {"M": [65536, 262144, 1048576], "k": [32, 128]}
MODES = ("fwd", "bwd", "fwd+bwd")
PROVIDERS = ("gemm_only", "torch_linear_topk", "sae_fast", "sae_fast_filter", "sae_fast_filter_rowslots", "sparsify",
             "torch_batchtopk", "sae_fast_batchtopk")
FORWARD_ONLY = {"sae_fast_filter", "sae_fast_filter_rowslots"}  # kernels without an autograd registration


def shape_plan(quick: bool) -> list[dict]:
    return harness.one_at_a_time(MAIN, SWEEP, quick)


def _sparsify_encoder(x, W, b, k):
    """sparsify's own encoder (its fused GEMM + top-k autograd function), weights shared."""
    from sparsify import SparseCoder, SparseCoderConfig

    coder = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=W.shape[0], k=k), device=x.device, dtype=x.dtype)
    coder.encoder.weight = torch.nn.Parameter(W.detach(), requires_grad=True)
    coder.encoder.bias = torch.nn.Parameter(b.detach(), requires_grad=True)

    def encode(x, W, b, k):
        return coder.encode(x).top_acts

    encode.params = list(coder.parameters())  # its own leaves: their .grad is reset between runs too
    return encode


def provider_fn(name: str, x=None, W=None, b=None, k=None):
    if name == "sparsify":
        return _sparsify_encoder(x, W, b, k)
    if name == "torch_batchtopk":
        def batch(x, W, b, k):
            acts = F.linear(x, W, b).relu()
            top = torch.topk(acts.flatten(), k * x.shape[0], sorted=False)
            return top.values
        return batch
    if name == "sae_fast_batchtopk":
        sae_fast = harness.import_sae_fast()
        return lambda x, W, b, k: sae_fast.batchtopk_encode(x, W, b, k).values
    if name == "gemm_only":
        return lambda x, W, b, k: F.linear(x, W, b)
    if name == "torch_linear_topk":
        return lambda x, W, b, k: torch.topk(F.linear(x, W, b), k, dim=1, sorted=False).values.relu()
    if name.startswith("sae_fast_filter"):
        harness.import_sae_fast()
        from sae_fast.triton_kernels import topk_filter

        config = dict(entry_slots=not name.endswith("rowslots"))
        return lambda x, W, b, k: topk_filter.topk_encode_filtered(x.detach(), W.detach(), b.detach(), None, k,
                                                                   config=config)[0]
    if name == "sae_fast":
        sae_fast = harness.import_sae_fast()
        return lambda x, W, b, k: sae_fast.topk_encode(x, W, b, k).values
    raise ValueError(f"unknown provider {name!r}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--list", action="store_true", help="print the planned shapes and exit")
    args = p.parse_args(argv)
    shapes = shape_plan(args.quick)
    if args.list:
        for s in shapes:
            print(harness.shape_str(s))
        return []
    harness.require_cuda()
    peaks = harness.measure_peaks()
    rows = []
    for shape in shapes:
        N, d, M, k = shape["N"], shape["d"], shape["M"], shape["k"]
        torch.manual_seed(0)
        x = torch.randn(N, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
        W = (torch.randn(M, d, device="cuda") * d**-0.5).to(torch.bfloat16).requires_grad_()
        b = torch.zeros(M, device="cuda", dtype=torch.bfloat16).requires_grad_()
        gemm_flops = 2 * N * M * d
        # Bytes: the op's floor per mode (the same for every provider). Forward: read x and W.
        # Backward: read x and W again, write dx, dW (dense, zeros included) and db.
        fwd_bytes, bwd_bytes = (N * d + M * d) * 2, (2 * N * d + 2 * M * d + M) * 2
        for name in args.providers.split(","):
            try:
                fn = provider_fn(name, x, W, b, k)
            except ImportError as e:
                rows.append(harness.make_row(OP, name, "fwd", shape, "bf16", note=f"not installed: {e}"))
                continue
            for mode in args.modes.split(","):
                if mode != "fwd" and name in FORWARD_ONLY:
                    rows.append(harness.make_row(OP, name, mode, shape, "bf16", note="forward only"))
                    continue
                leaves = [x, W, b, *getattr(fn, "params", [])]
                # FLOPs: the work each provider does. A dense backward is two more GEMMs; a sparse
                # one (ours, sparsify's embedding_bag + index_add) 2·N·k·d per product
                sparse_bwd = name.startswith("sae_fast") or name == "sparsify"
                bwd_flops = 4 * N * k * d if sparse_bwd else 2 * gemm_flops
                try:
                    if mode == "fwd":
                        timing = harness.bench(lambda: fn(x, W, b, k))
                        flops, nbytes = gemm_flops, fwd_bytes
                    else:
                        out = fn(x, W, b, k)
                        grad = torch.randn_like(out)
                        if mode == "bwd":
                            timing = harness.bench(lambda: out.backward(grad, retain_graph=True), grad_to_none=leaves)
                            flops, nbytes = bwd_flops, bwd_bytes
                        else:
                            timing = harness.bench(lambda: fn(x, W, b, k).backward(grad), grad_to_none=leaves)
                            flops, nbytes = gemm_flops + bwd_flops, fwd_bytes + bwd_bytes
                    rows.append(harness.make_row(OP, name, mode, shape, "bf16", timing=timing, flops=flops,
                                                 bytes=nbytes, peaks=peaks))
                except torch.OutOfMemoryError as e:
                    rows.append(harness.make_row(OP, name, mode, shape, "bf16", note=f"OOM: {str(e)[:60]}"))
                except Exception as e:  # a failing provider is a row; the others still run and are written
                    rows.append(harness.make_row(OP, name, mode, shape, "bf16", error=f"{type(e).__name__}: {e}"[:300]))
                torch.cuda.empty_cache()
    harness.append_results(rows, args.out)
    harness.print_table(rows)
    return rows


if __name__ == "__main__":
    harness.run_cli(main)
