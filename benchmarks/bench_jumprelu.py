"""Benchmark the JumpReLU training forward (+ backward): x_hat, l0 and the straight-through
threshold gradient, without an [N, M] tensor.

    python benchmarks/bench_jumprelu.py [--quick] [--out PATH]

Providers: ``gemm_only`` (the cuBLAS encoder GEMM alone: the floor), ``torch_dense`` (the
dense formulation every library uses: [N, M] pre-activations, a straight-through autograd
step, a dense decode GEMM) and ``sae_fast`` (``jumprelu_training_forward``). SAELens's own
``JumpReLUTrainingSAE`` joins with the library adapters (issue 7), which build its objects.
Gemma Scope sizes: d=2304, M ∈ {16384, 131072, 1048576}, N=8192; θ set so ~L0 latents are
active per row.
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

OP = "jumprelu_training"
MAIN = {"N": 8192, "d": 2304, "M": 131072, "L0": 64}
SWEEP = {"M": [16384, 1048576]}
MODES = ("fwd", "fwd+bwd")
PROVIDERS = ("gemm_only", "torch_dense", "sae_fast")


def shape_plan(quick: bool) -> list[dict]:
    return harness.one_at_a_time(MAIN, SWEEP, quick)


class _DenseJump(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        near = ((pre - theta) / ctx.eps).abs() < 0.5
        return g * (pre > theta), (-(theta / ctx.eps) * near * g).sum(0), None


def _torch_dense(x, W_enc, b_enc, theta, W_dec, b_dec, eps=0.05):
    pre = F.linear(x - b_dec, W_enc, b_enc)
    f = _DenseJump.apply(pre, theta, eps)
    return f @ W_dec + b_dec


def provider_fn(name: str, leaves):
    if name == "gemm_only":
        return lambda x, W_enc, b_enc, theta, W_dec, b_dec: F.linear(x, W_enc, b_enc)
    if name == "torch_dense":
        return _torch_dense
    if name == "sae_fast":
        sae_fast = harness.import_sae_fast()
        return lambda *a: sae_fast.jumprelu_training_forward(*a, bandwidth=0.05)[0]
    raise ValueError(f"unknown provider {name!r}")


def provider_flops(name: str, mode: str, N: int, d: int, M: int, L0: int) -> int:
    """The work each provider does (not a shared floor): a dense GEMM is 2·N·M·d and its
    backward two more; our encoder GEMM is dense, the decode and every backward product sparse
    (2·N·L0·d each: decode; dx, dW_enc; dpre, dW_dec)."""
    gemm, sparse = 2 * N * M * d, 2 * N * L0 * d
    if name == "gemm_only":
        return gemm if mode == "fwd" else 3 * gemm
    if name == "torch_dense":  # encoder and decoder GEMMs
        return 2 * gemm if mode == "fwd" else 6 * gemm
    return gemm + sparse if mode == "fwd" else gemm + 5 * sparse


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--providers", default=",".join(PROVIDERS))
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
        N, d, M, L0 = shape["N"], shape["d"], shape["M"], shape["L0"]
        torch.manual_seed(0)
        bf = torch.bfloat16
        x = torch.randn(N, d, device="cuda", dtype=bf).requires_grad_()
        W_enc = (torch.randn(M, d, device="cuda") * d**-0.5).to(bf).requires_grad_()
        W_dec = (torch.randn(M, d, device="cuda") * d**-0.5).to(bf).requires_grad_()
        b_enc = torch.zeros(M, device="cuda", dtype=bf).requires_grad_()
        b_dec = torch.zeros(d, device="cuda", dtype=bf).requires_grad_()
        # pre ~ N(0, 1): the threshold whose upper tail keeps L0 of M entries per row
        q = torch.tensor(1 - L0 / M, dtype=torch.float64)
        theta_value = float(torch.special.ndtri(q))
        theta = torch.full((M,), theta_value, device="cuda", dtype=bf).requires_grad_()
        leaves = [x, W_enc, b_enc, theta, W_dec, b_dec]
        # Bytes: the op's floor (every provider). Forward: read x, W_enc, W_dec; write x̂.
        # Backward adds: read x, grad, W_enc, W_dec; write dx, dW_enc, dW_dec.
        nbytes = {"fwd": (2 * N * d + 2 * M * d) * 2, "fwd+bwd": (5 * N * d + 6 * M * d) * 2}
        for name in args.providers.split(","):
            fn = provider_fn(name, leaves)
            for mode in MODES:
                try:
                    if mode == "fwd":
                        timing = harness.bench(lambda: fn(*leaves))
                    else:
                        out = fn(*leaves)
                        grad = torch.randn_like(out)
                        timing = harness.bench(lambda: fn(*leaves).backward(grad), grad_to_none=leaves)
                    rows.append(harness.make_row(OP, name, mode, shape, "bf16", timing=timing,
                                                 flops=provider_flops(name, mode, N, d, M, L0), bytes=nbytes[mode],
                                                 peaks=peaks))
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
