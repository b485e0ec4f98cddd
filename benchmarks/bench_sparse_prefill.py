"""Benchmark end-to-end long-context prefill of a HF Llama model: dense SDPA vs the
``sae_fast.sparse_attention`` patch (MInference-style dynamic sparse attention).

    python benchmarks/bench_sparse_prefill.py [--quick] [--T 8192,32768,131072] [--layers 4]
        [--providers sdpa,vertical_slash,a_shape] [--out PATH] [--no-save] [--list] [--dry-run]

Model: a random-weight ``LlamaForCausalLM`` built from a config with Llama-3-8B shapes
(hidden 4096, 32 query / 8 KV heads, head dim 128, MLP 14336, vocab 128256, rope theta 5e5)
but only ``--layers`` decoder layers (default 4), bf16, batch 1. Random weights are fine for
timing: the kernels' cost depends on the budgets, not on what the heads attend to.

Providers (one row each per T, mode ``prefill``: ``model(input_ids, use_cache=False,
logits_to_keep=1)``, i.e. the whole forward but only the last position's logits):

* ``sdpa``: the model as loaded (``attn_implementation="sdpa"``; on H100 SDPA dispatches
  to its FlashAttention backend for causal bf16 without a mask; the row records the backend
  as SDPA, not as FlashAttention).
* ``vertical_slash``: patched, every head vertical-slash 1000 / 6096 (MInference's default).
* ``a_shape``: patched, every head A-shape 128 sink + 3968 local (MInference's defaults).

Index estimation is timed separately (mode ``index``, one layer: q, k of the model's shape,
``build_layer_index``), since MInference reports it inside its prefill time and readers want
to know its share. Extra columns: ``layers``, ``speedup`` (dense time / this time, same T),
``index_ms_per_layer``, ``converter`` (the ``vertical_slash_index`` backend used).

Correctness guard (``ok``): at T <= 8192 the patched model with budgets covering the whole
sequence must give the dense model's last-token logits (bf16 tolerance).

Timings need a GPU: on CPU the script says so and exits 2. ``--list`` prints the plan anywhere;
``--dry-run`` runs the whole path once on a tiny CPU model (no timing) to check the plumbing.
First run on an H200 on 2026-12-04: results/README.md.
"""

from __future__ import annotations

import argparse

import torch

try:
    from . import harness
    from .bench_block_sparse_attention import useful_entries
except ImportError:
    import harness
    from bench_block_sparse_attention import useful_entries

OP = "sparse_prefill"
T_VALUES = (8192, 32768, 131072)
PROVIDERS = ("sdpa", "vertical_slash", "a_shape")
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5)


def shape_plan(quick: bool, t_values=T_VALUES, layers: int = 4) -> list[dict]:
    if quick:
        t_values = t_values[:1]
    return [dict(B=1, T=t, layers=layers, Hq=32, Hkv=8, D=128) for t in t_values]


def build_model(layers: int, max_t: int, device: str, dtype=torch.bfloat16, **overrides):
    """Random-weight Llama (Llama-3-8B shapes unless overridden) on ``device``."""
    import transformers

    shapes = {**LLAMA3_8B, **overrides}
    cfg = transformers.LlamaConfig(num_hidden_layers=layers, max_position_embeddings=max(max_t, 8192),
                                   attn_implementation="sdpa", **shapes)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # allocate in the target dtype (works on every transformers version)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def provider_config(name: str, layers: int, heads: int, full: bool = False):
    harness.import_sae_fast()
    from sae_fast.sparse_attention import SparseAttentionConfig

    big = 1 << 30
    if name == "vertical_slash":
        return SparseAttentionConfig.vertical_slash(layers, heads, big if full else 1000, big if full else 6096)
    if name == "a_shape":
        return SparseAttentionConfig.a_shape(layers, heads, 128, big if full else 3968)
    raise ValueError(f"unknown provider {name!r}")


def prefill(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits


def _guard(model, ids, name, layers, heads, **patch_kw) -> bool:
    from sae_fast.sparse_attention import patch_sparse_attention

    want = prefill(model, ids).float()
    with patch_sparse_attention(model, provider_config(name, layers, heads, full=True), min_prefill_len=1,
                                **patch_kw):
        got = prefill(model, ids).float()
    err = float((got - want).norm() / want.norm())
    return err < 3e-2


class _DensityProbe:
    """Inside the context, the fraction of causal (row, key) pairs that the first patched
    layer's index covers, for the row: budgets meant for real attention (MInference's 1000 /
    6096) can cover every block when a model's scores have no structure, as random weights."""

    def __init__(self):
        self.density = None

    def __enter__(self):
        from sae_fast.sparse_attention import patch as patch_module

        self._module, self._original = patch_module, patch_module.build_layer_index

        def probe(q, k, *args, **kwargs):
            index = self._original(q, k, *args, **kwargs)
            if self.density is None:
                B, H, T = q.shape[0], q.shape[1], q.shape[2]
                self.density = useful_entries(*index, T, block=kwargs.get("block_m", 64)) / (B * H * T * (T + 1) / 2)
            return index

        patch_module.build_layer_index = probe
        return self

    def __exit__(self, *exc):
        self._module.build_layer_index = self._original


def _converter() -> str:
    from sae_fast.ops.attention_index import cuda_kernel_available

    return "cuda" if torch.cuda.is_available() and cuda_kernel_available() else "reference"


def dry_run(layers: int = 2, T: int = 200) -> None:
    """The full path on a tiny CPU model, no timing: build, patch, estimate, prefill, undo."""
    harness.import_sae_fast()
    from sae_fast.sparse_attention import build_layer_index, patch_sparse_attention

    small = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 vocab_size=512)
    model = build_model(layers, T, "cpu", torch.float32, **small)
    ids = torch.randint(0, 512, (1, T), generator=torch.Generator().manual_seed(0))
    dense = prefill(model, ids)
    for name in PROVIDERS[1:]:
        cfg = provider_config(name, layers, 4)
        with patch_sparse_attention(model, cfg, min_prefill_len=1, backend="reference") as h:
            got = prefill(model, ids)
        q = torch.randn(1, 4, T, 32)
        k = torch.randn(1, 2, T, 32)
        index = build_layer_index(q, k, cfg[0])
        print(f"dry-run {name}: stats={dict(h.stats)} last-logit rel. diff vs dense="
              f"{float((got - dense).norm() / dense.norm()):.3g} index widths={[t.shape[-1] for t in index[1::2]]}")
        assert h.stats["sparse"] == layers
    print("dry run ok; timings need a CUDA GPU (run without --dry-run there)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="T = 8K only")
    p.add_argument("--T", default=",".join(map(str, T_VALUES)))
    p.add_argument("--layers", type=int, default=4, help="decoder layers (Llama-3-8B has 32)")
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--out", default=None)
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--list", action="store_true", help="print the planned shapes and exit (no GPU needed)")
    p.add_argument("--dry-run", action="store_true", help="run the path once on a tiny CPU model, no timing")
    args = p.parse_args(argv)
    shapes = shape_plan(args.quick, tuple(int(t) for t in args.T.split(",")), args.layers)
    providers = sorted(args.providers.split(","), key=lambda n: n != "sdpa")  # dense first: speedup
    unknown = set(providers) - set(PROVIDERS)
    if unknown:
        raise SystemExit(f"unknown providers {sorted(unknown)}; choose from {PROVIDERS}")
    if args.list:
        for s in shapes:
            print(harness.shape_str(s), "providers=" + ",".join(providers), "modes=prefill,index")
        return []
    if args.dry_run:
        dry_run()
        return []
    harness.require_cuda()
    harness.import_sae_fast()
    from sae_fast.sparse_attention import build_layer_index, patch_sparse_attention

    peaks = harness.measure_peaks()
    model = build_model(args.layers, max(s["T"] for s in shapes), "cuda")
    heads, kv, D = LLAMA3_8B["num_attention_heads"], LLAMA3_8B["num_key_value_heads"], LLAMA3_8B["head_dim"]
    converter = _converter()
    rows = []
    for shape in shapes:
        T = shape["T"]
        ids = torch.randint(0, LLAMA3_8B["vocab_size"], (1, T), device="cuda",
                            generator=torch.Generator(device="cuda").manual_seed(0))
        dense_ms = None
        for name in providers:
            extra = dict(layers=args.layers, converter=converter)
            try:
                if name == "sdpa":
                    timing = harness.bench(lambda: prefill(model, ids))
                    dense_ms = timing["median_ms"]
                    rows.append(harness.make_row(OP, name, "prefill", shape, "bf16", timing=timing, peaks=peaks,
                                                 extra=extra))
                    continue
                ok = _guard(model, ids, name, args.layers, heads) if T <= 8192 else None
                cfg = provider_config(name, args.layers, heads)
                with _DensityProbe() as probe, patch_sparse_attention(model, cfg, min_prefill_len=1) as h:
                    timing = harness.bench(lambda: prefill(model, ids))
                extra["density"] = None if probe.density is None else round(probe.density, 4)
                if h.stats["sparse"] == 0:
                    raise RuntimeError(f"the sparse path was never taken: {dict(h.stats)}")
                if dense_ms:
                    extra["speedup"] = round(dense_ms / timing["median_ms"], 3)
                # one layer's index estimation, on q / k of the model's shapes
                g = torch.Generator(device="cuda").manual_seed(1)
                q = torch.randn(1, heads, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
                k = torch.randn(1, kv, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
                idx_timing = harness.bench(lambda: build_layer_index(q, k, cfg[0]))
                extra["index_ms_per_layer"] = round(idx_timing["median_ms"], 3)
                rows.append(harness.make_row(OP, name, "prefill", shape, "bf16", timing=timing, peaks=peaks, ok=ok,
                                             extra=extra))
                rows.append(harness.make_row(OP, name, "index", shape, "bf16", timing=idx_timing, peaks=peaks,
                                             extra=dict(extra, note_scope="one layer")))
            except torch.OutOfMemoryError as e:
                rows.append(harness.make_row(OP, name, "prefill", shape, "bf16", note=f"OOM: {str(e)[:60]}",
                                             extra=extra))
            except Exception as e:  # a provider that fails is a row too
                rows.append(harness.make_row(OP, name, "prefill", shape, "bf16",
                                             error=f"{type(e).__name__}: {e}"[:300], extra=extra))
            torch.cuda.empty_cache()
    if not args.no_save:
        harness.append_results(rows, args.out)
    harness.print_table(rows)
    return rows


if __name__ == "__main__":
    harness.run_cli(main)
