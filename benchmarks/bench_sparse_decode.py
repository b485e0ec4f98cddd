"""Benchmark sparse decode: out[n] = sum_j values[n, j] * W_dec[indices[n, j]] + bias.

    python benchmarks/bench_sparse_decode.py [--quick] [--dtype bf16] [--out PATH]

Times forward, backward (grads of values, W_dec, bias) and forward+backward for each
provider over a shape sweep, after checking each provider against an fp32 embedding_bag
reference. Appends rows to benchmarks/results/sparse_decode.jsonl and prints a table last.
Importable: ``main(argv)`` returns the rows. See benchmarks/README.md for the columns.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

try:  # imported as benchmarks.bench_sparse_decode
    from . import harness
except ImportError:  # run as a script: benchmarks/ is sys.path[0]
    import harness

OP = "sparse_decode"
MAIN_SHAPE = {"N": 8192, "k": 64, "M": 131072, "d": 2304}
SMALL_SHAPE = {"N": 2048, "k": 32, "M": 16384, "d": 768}
# One parameter at a time around the main shape.
SWEEP = {"N": [1024, 32768], "k": [32, 128], "d": [768, 4096], "M": [16384, 1048576]}
MODES = ("fwd", "bwd", "fwd+bwd")
PROVIDERS = ("torch_dense", "torch_embedding_bag", "torch_gather_bmm", "sae_fast_triton", "sae_fast_cuda", "sae_fast_fastest", "sparsify")
# Relative error norm of the forward output and of each gradient vs the fp32 reference.
TOLERANCE = {"bf16": 2e-2, "fp16": 5e-3, "fp32": 1e-3}
DEVICE = "cuda"  # a module constant so a CPU dry run of the plumbing can swap it
DENSE_MAX_FRACTION_OF_FREE = 0.4  # the dense [N, M] tensor must fit well inside free memory

DecodeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


class Skip(Exception):
    """The provider does not apply here (not installed, too big): a row with a note."""


def shape_plan(quick: bool) -> list[dict]:
    if quick:
        return [dict(MAIN_SHAPE), dict(SMALL_SHAPE)]
    shapes = [dict(MAIN_SHAPE)]
    for name, sizes in SWEEP.items():
        shapes += [{**MAIN_SHAPE, name: size} for size in sizes]
    return shapes


# ---------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    values: torch.Tensor  # [N, k], requires grad
    indices: torch.Tensor  # [N, k] int64
    W_dec: torch.Tensor  # [M, d], requires grad
    bias: torch.Tensor  # [d], requires grad
    grad_out: torch.Tensor  # [N, d]

    @property
    def leaves(self) -> list[torch.Tensor]:
        return [self.values, self.W_dec, self.bias]


def make_inputs(shape: dict, dtype: torch.dtype, seed: int) -> Inputs:
    """Random like real TopK codes, never zeros: zeros hide wrong indexing and time faster."""
    N, k, M, d = shape["N"], shape["k"], shape["M"], shape["d"]
    torch.manual_seed(seed)
    dev = DEVICE
    values = (torch.randn(N, k, device=dev).relu() + 0.1).to(dtype)  # positive, like TopK acts
    W_dec = torch.randn(M, d, device=dev, dtype=dtype) * 0.02
    return Inputs(
        values=values.requires_grad_(),
        indices=torch.randint(0, M, (N, k), device=dev, dtype=torch.int64),
        W_dec=W_dec.requires_grad_(),
        bias=(torch.randn(d, device=dev, dtype=dtype) * 0.02).requires_grad_(),
        grad_out=torch.randn(N, d, device=dev, dtype=dtype),
    )


def reference(inp: Inputs) -> tuple[torch.Tensor, dict]:
    """fp32 embedding_bag forward and gradients: the ground truth for the guard."""
    v = inp.values.detach().float().requires_grad_()
    W = inp.W_dec.detach().float().requires_grad_()
    b = inp.bias.detach().float().requires_grad_()
    out = F.embedding_bag(inp.indices, W, per_sample_weights=v, mode="sum") + b
    out.backward(inp.grad_out.float())
    return out.detach(), {"values": v.grad, "W_dec": W.grad, "bias": b.grad}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).norm() / want.norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------- providers


def torch_dense(values, indices, W_dec, bias):
    # scatter_add, not scatter: duplicate indices in a row must add up as in the sparse op.
    dense = values.new_zeros(values.shape[0], W_dec.shape[0]).scatter_add(1, indices, values)
    return torch.addmm(bias, dense, W_dec)


def torch_embedding_bag(values, indices, W_dec, bias):
    return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum") + bias


def torch_gather_bmm(values, indices, W_dec, bias):
    # Materialises the gathered rows [N, k, d]: what several SAE codebases do. Its backward
    # (index_put with accumulation) works in bf16, unlike embedding_bag's values gradient.
    return torch.bmm(values.unsqueeze(1), W_dec[indices]).squeeze(1) + bias


def _sae_fast_provider(backend: str) -> DecodeFn:
    sae_fast = harness.import_sae_fast()
    if backend in ("cuda", "fastest"):
        available = getattr(sae_fast, "cuda_extension_available", None)
        if available is None or not available():
            raise Skip("skipped: CUDA extension sae_fast._C not built")

    def decode(values, indices, W_dec, bias):
        return sae_fast.sparse_decode(values, indices, W_dec, bias, backend=backend, check_indices=False)

    return decode


def _sparsify_provider(dtype: torch.dtype) -> DecodeFn:
    """EleutherAI sparsify's decoder, black box. Releases differ on whether it takes W_dec as
    [M, d] or as the view W_dec.mT ([d, M]); a tiny probe whose indices are valid under both
    layouts picks the one that gives the right answer, so the real run cannot index out of range."""
    try:
        from sparsify.utils import decoder_impl
    except Exception as e:  # not installed, or its imports fail
        raise Skip(f"skipped: sparsify not importable ({type(e).__name__})")
    M, d = 96, 64
    W = torch.randn(M, d, device=DEVICE, dtype=dtype)
    idx = torch.randint(0, d, (4, 8), device=DEVICE)
    vals = torch.rand(4, 8, device=DEVICE, dtype=dtype)
    want = F.embedding_bag(idx, W.float(), per_sample_weights=vals.float(), mode="sum")
    for transposed in (False, True):
        try:
            got = decoder_impl(idx, vals, W.mT if transposed else W)
        except Exception:
            continue
        if got.shape == want.shape and rel_err(got, want) < 5e-2:
            if transposed:
                return lambda values, indices, W_dec, bias: decoder_impl(indices, values, W_dec.mT) + bias
            return lambda values, indices, W_dec, bias: decoder_impl(indices, values, W_dec) + bias
    raise Skip("skipped: sparsify decoder_impl matched neither W_dec layout on a probe")


def build_provider(name: str, shape: dict, dtype: torch.dtype) -> DecodeFn:
    if name == "torch_dense":
        dense_bytes = shape["N"] * shape["M"] * torch.finfo(dtype).bits // 8
        free, _ = torch.cuda.mem_get_info()
        if dense_bytes > DENSE_MAX_FRACTION_OF_FREE * free:
            raise Skip(f"skipped: dense [N, M] is {dense_bytes / harness.GIB:.1f} GiB, "
                       f"over {DENSE_MAX_FRACTION_OF_FREE:.0%} of {free / harness.GIB:.1f} GiB free")
        return torch_dense
    if name == "torch_embedding_bag":
        return torch_embedding_bag
    if name == "torch_gather_bmm":
        gathered = shape["N"] * shape["k"] * shape["d"] * torch.finfo(dtype).bits // 8
        free, _ = torch.cuda.mem_get_info()
        if 3 * gathered > DENSE_MAX_FRACTION_OF_FREE * free:  # rows, their grad, the bmm's
            raise Skip(f"skipped: gathered [N, k, d] is {gathered / harness.GIB:.1f} GiB")
        return torch_gather_bmm
    if name == "sae_fast_triton":
        return _sae_fast_provider("triton")
    if name == "sae_fast_cuda":
        return _sae_fast_provider("cuda")
    if name == "sae_fast_fastest":  # the default on a GPU with the extension
        return _sae_fast_provider("fastest")
    if name == "sparsify":
        return _sparsify_provider(dtype)
    raise ValueError(f"unknown provider {name!r}; choose from {PROVIDERS}")


# ---------------------------------------------------------------------------- roofline


def work_model(shape: dict, elem: int, idx_elem: int, mode: str, dense: bool,
               unique_rows: int) -> dict:
    """Bytes the op must move (gathered-row model, the ``bytes`` column), a floor that reads
    each distinct W_dec row and each grad_out row once (``bytes_floor``), and FLOPs.

    fwd: gathered W rows N*k*d + values and indices N*k + output N*d (+ bias d).
    bwd: dvalues reads gathered W rows N*k*d and grad_out N*d; dW reads grad_out rows once per
         entry N*k*d and writes all of dW M*d (rows no entry selects are zero but still
         written); values and indices N*k are read, dvalues N*k written, dbias d written.
    FLOPs: 2*N*k*d per sparse product (fwd one, bwd two). For the dense provider the real
    work is dense GEMMs, 2*N*M*d each, so its FLOPs are that count and its TFLOP/s means
    something; its bytes stay the sparse model (an effective bandwidth, same for all)."""
    N, k, M, d = shape["N"], shape["k"], shape["M"], shape["d"]
    entries = N * k * (elem + idx_elem)
    fwd = N * k * d * elem + entries + N * d * elem + d * elem
    bwd = 2 * N * k * d * elem + N * d * elem + M * d * elem + entries + N * k * elem + d * elem
    fwd_floor = unique_rows * d * elem + entries + N * d * elem + d * elem
    bwd_floor = unique_rows * d * elem + N * d * elem + M * d * elem + entries + N * k * elem + d * elem
    products = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[mode]
    flops = products * 2 * N * (M if dense else k) * d
    if mode == "fwd":
        return {"bytes": fwd, "bytes_floor": fwd_floor, "flops": flops}
    if mode == "bwd":
        return {"bytes": bwd, "bytes_floor": bwd_floor, "flops": flops}
    return {"bytes": fwd + bwd, "bytes_floor": fwd_floor + bwd_floor, "flops": flops}


# ---------------------------------------------------------------------------- running


def check_provider(fn: DecodeFn, inp: Inputs, ref_out: torch.Tensor, ref_grads: dict,
                   tol: float) -> dict:
    """Forward and gradients vs the fp32 reference. A backward that raises is recorded but
    does not hide a good forward."""
    out = fn(inp.values, inp.indices, inp.W_dec, inp.bias)
    result = {"rel_err": rel_err(out, ref_out), "rel_err_grad": None, "bwd_error": None}
    try:
        out.backward(inp.grad_out)
        grads = {"values": inp.values.grad, "W_dec": inp.W_dec.grad, "bias": inp.bias.grad}
        if any(g is None for g in grads.values()):
            raise RuntimeError("backward left a gradient unset: " + ", ".join(n for n, g in grads.items() if g is None))
        result["rel_err_grad"] = max(rel_err(grads[n], ref_grads[n]) for n in grads)
    except Exception as e:
        result["bwd_error"] = f"{type(e).__name__}: {e}"
    finally:
        for t in inp.leaves:
            t.grad = None
    errors = [result["rel_err"]] + ([result["rel_err_grad"]] if result["rel_err_grad"] is not None else [])
    result["ok"] = all(e < tol for e in errors)  # NaN compares False: fails
    return result


def time_mode(fn: DecodeFn, inp: Inputs, mode: str, rep_ms: int, warmup_ms: int) -> dict:
    """Forward runs with grad-requiring inputs (as in training). Backward: forward once
    outside the timed region, then backward with retain_graph, grads reset to None per run."""
    args = (inp.values, inp.indices, inp.W_dec, inp.bias)
    if mode == "fwd":
        return harness.bench(lambda: fn(*args), rep_ms=rep_ms, warmup_ms=warmup_ms)
    if mode == "bwd":
        out = fn(*args)
        timing = harness.bench(lambda: out.backward(inp.grad_out, retain_graph=True),
                               rep_ms=rep_ms, warmup_ms=warmup_ms, grad_to_none=inp.leaves)
        del out
        return timing
    if mode == "fwd+bwd":
        return harness.bench(lambda: fn(*args).backward(inp.grad_out),
                             rep_ms=rep_ms, warmup_ms=warmup_ms, grad_to_none=inp.leaves)
    raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def _release(inp: Optional[Inputs] = None) -> None:
    """Drop gradients and cached blocks between runs so each starts from the same memory."""
    if inp is not None:
        for t in inp.leaves:
            t.grad = None
    try:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    except Exception:  # a sticky CUDA error: the next launch reports it in its own row
        pass


def bench_shape(shape: dict, dtype_name: str, providers, modes, peaks: dict, *, seed: int,
                rep_ms: int, warmup_ms: int) -> list[harness.Row]:
    dtype = harness.DTYPES[dtype_name]
    elem = torch.finfo(dtype).bits // 8
    tol = TOLERANCE[dtype_name]
    rows: list[harness.Row] = []

    def row(provider, mode, **fields):
        rows.append(harness.make_row(OP, provider, mode, shape, dtype_name, peaks=peaks, **fields))

    # W_dec, its grad, the fp32 reference copy and grad, plus token-sized tensors.
    N, k, M, d = shape["N"], shape["k"], shape["M"], shape["d"]
    need = M * d * (2 * elem + 8) + N * d * (3 * elem + 8) + N * k * 32
    free, _ = torch.cuda.mem_get_info()
    if need > 0.85 * free:
        note = f"skipped: shape needs ~{need / harness.GIB:.1f} GiB, {free / harness.GIB:.1f} GiB free"
        for provider in providers:
            for mode in modes:
                row(provider, mode, note=note)
        return rows

    inp = make_inputs(shape, dtype, seed)
    ref_out, ref_grads = reference(inp)
    unique_rows = int(torch.unique(inp.indices).numel())
    _release(inp)

    for provider in providers:
        print(f"  {provider} ...", flush=True)
        try:
            fn = build_provider(provider, shape, dtype)
            check = check_provider(fn, inp, ref_out, ref_grads, tol)
        except Skip as s:
            for mode in modes:
                row(provider, mode, note=str(s))
            continue
        except Exception as e:  # a provider that fails is a row, not a crashed run
            for mode in modes:
                row(provider, mode, error=_error_text(e))
            _release(inp)
            continue
        for mode in modes:
            work = work_model(shape, elem, inp.indices.element_size(), mode,
                              dense=provider == "torch_dense", unique_rows=unique_rows)
            extra = {"rel_err": check["rel_err"], "rel_err_grad": check["rel_err_grad"],
                     "bytes_floor": work["bytes_floor"],
                     "floor_ms": work["bytes_floor"] / (peaks["copy_gbps_peak"] * 1e6),
                     "index_dtype": str(inp.indices.dtype).replace("torch.", ""), "seed": seed}
            if mode != "fwd" and check["bwd_error"]:
                row(provider, mode, ok=False, error=check["bwd_error"], extra=extra)
                continue
            try:
                timing = time_mode(fn, inp, mode, rep_ms, warmup_ms)
                row(provider, mode, timing=timing, bytes=work["bytes"], flops=work["flops"],
                    ok=check["ok"], extra=extra)
            except Exception as e:
                row(provider, mode, ok=check["ok"], error=_error_text(e), extra=extra)
            finally:
                _release(inp)
    del inp, ref_out, ref_grads
    _release()
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench_sparse_decode.py",
        description="Time sae_fast.sparse_decode against torch and peer providers (needs a CUDA GPU).")
    p.add_argument("--quick", action="store_true", help="only the main shape and one smaller one")
    p.add_argument("--dtype", choices=sorted(harness.DTYPES), default="bf16", help="values / W_dec dtype (default bf16)")
    p.add_argument("--providers", default=",".join(PROVIDERS),
                   help=f"comma list, default all: {','.join(PROVIDERS)}")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list, default all: {','.join(MODES)}")
    p.add_argument("--out", type=Path, default=None,
                   help=f"JSON-lines file the rows are appended to (default benchmarks/results/{OP}.jsonl)")
    p.add_argument("--no-save", action="store_true", help="print the table but append nothing")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench timed repetitions, in ms (default 100)")
    p.add_argument("--warmup-ms", type=int, default=25, help="do_bench warm-up, in ms (default 25)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--list", action="store_true", help="print the planned shapes and exit (no GPU needed)")
    args = p.parse_args(argv)
    args.providers = [s.strip() for s in args.providers.split(",") if s.strip()]
    args.modes = [s.strip() for s in args.modes.split(",") if s.strip()]
    for name, chosen, allowed in (("provider", args.providers, PROVIDERS), ("mode", args.modes, MODES)):
        bad = [c for c in chosen if c not in allowed]
        if bad or not chosen:
            p.error(f"unknown {name} {bad or chosen}; choose from {', '.join(allowed)}")
    return args


def main(argv=None) -> list[harness.Row]:
    args = parse_args(argv)
    shapes = shape_plan(args.quick)
    if args.list:
        for shape in shapes:
            print(harness.shape_str(shape))
        print(f"providers: {', '.join(args.providers)}; modes: {', '.join(args.modes)}; dtype: {args.dtype}")
        return []
    harness.require_cuda()
    info = harness.device_info()
    peaks = harness.measure_peaks()
    print(f"{info['gpu']} ({info['sm_count']} SMs), torch {info['torch']}, triton {info['triton']}, "
          f"CUDA {info['cuda']}, git {info['git_sha']}")
    print(f"measured: copy {peaks['copy_gbps_peak']:.0f} GB/s (read+write), "
          f"bf16 GEMM {peaks['gemm_tflops_peak']:.0f} TFLOP/s")
    rows: list[harness.Row] = []
    for i, shape in enumerate(shapes):
        print(f"{harness.shape_str(shape)} {args.dtype}", flush=True)
        try:
            rows += bench_shape(shape, args.dtype, args.providers, args.modes, peaks, seed=args.seed + i,
                                rep_ms=args.rep_ms, warmup_ms=args.warmup_ms)
        except Exception as e:  # inputs or reference failed (e.g. out of memory): keep going
            rows += [harness.make_row(OP, p, m, shape, args.dtype, peaks=peaks, error=_error_text(e))
                     for p in args.providers for m in args.modes]
            _release()
    if not args.no_save:
        print(f"appended {len(rows)} rows to {harness.append_results(rows, args.out or harness.results_path(OP))}")
    harness.print_table(rows)
    return rows


if __name__ == "__main__":
    harness.run_cli(main)
