"""The benchmark and tuning scripts are what a short GPU lease runs; a script broken on CPU
would waste it. On CPU: each bench's ``--list`` plan, the sparse-prefill dry run and its
density probe, and the tuning sweeps' candidate order (the kernel's default first)."""

import os
import sys
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module", autouse=True)
def _bench_path():
    sys.path.insert(0, str(BENCH_DIR))
    yield
    sys.path.remove(str(BENCH_DIR))


@pytest.mark.parametrize("script", ["bench_sparse_decode", "bench_block_sparse_attention", "bench_sparse_prefill",
                                    "bench_integrations", "bench_topk_encode"])
def test_list_plans_without_a_gpu(script, capsys):
    module = __import__(script)
    module.main(["--list"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith(("N=", "B=")) for line in lines), lines  # one shape per line


def test_sparse_prefill_dry_run_and_density_probe():
    import bench_sparse_prefill as bench
    from sae_fast.sparse_attention import SparseAttentionConfig, patch_sparse_attention

    bench.dry_run(layers=2, T=130)
    small = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 vocab_size=97)
    model = bench.build_model(2, 256, "cpu", torch.float32, **small)
    ids = torch.randint(0, 97, (1, 256), generator=torch.Generator().manual_seed(0))
    # A-shape, 64 sink keys and 64 local keys, over 4 query blocks of 64 rows: the first two
    # blocks see every causal key, the last two miss the middle (density about 0.63)
    cfg = SparseAttentionConfig.a_shape(2, 4, 64, 64)
    with bench._DensityProbe() as probe, patch_sparse_attention(model, cfg, min_prefill_len=1, backend="reference"):
        bench.prefill(model, ids)
    assert probe.density is not None and 0.3 < probe.density < 0.9
    from sae_fast.sparse_attention import patch as patch_module

    assert patch_module.build_layer_index.__name__ == "build_layer_index"  # the probe put it back


@pytest.mark.parametrize("k", [64, 128])
def test_topk_sweep_starts_at_the_default(k):
    import tune_topk_encode as tune
    from sae_fast.triton_kernels.topk_encode import _tile_config

    configs = tune.candidate_configs(False, k)
    first = configs[0]
    assert (first["block_n"], first["block_m"], first["block_d"], first["warps"], first["stages"]) == _tile_config(k, 2)
    keys = [tuple(sorted(c.items())) for c in configs]
    assert len(keys) == len(set(keys))
    priority = tune.priority_configs(k, first)
    assert configs[1:1 + len(priority)] == priority and all(p in configs for p in priority)
    distance = [sum(c[key] != first[key] for key in ("block_n", "block_m", "block_d", "warps", "stages"))
                for c in configs[1 + len(priority):] if c["sort_above"] == first["sort_above"]]
    assert distance == sorted(distance)


def test_threshold_sweep_starts_at_the_default():
    import tune_threshold_encode as tune
    from sae_fast.triton_kernels.threshold_encode import _tile_config

    configs = tune.candidate_configs(2)
    first = configs[0]
    assert (first["block_n"], first["block_m"], first["block_d"], first["warps"], first["stages"]) == _tile_config(2)
    keys = [tuple(sorted(c.items())) for c in configs]
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize("kernel", ["fwd", "dq", "dkdv"])
@pytest.mark.parametrize("arch", [80, 90])
def test_attention_sweep_starts_at_the_default(kernel, arch):
    import tune_block_sparse_attention as tune
    from sae_fast.triton_kernels.block_sparse_attention import _dkdv_config, _fwd_config, _two_tiles_config

    configs = tune.candidates(kernel, 128, arch)
    default = _dkdv_config(128, arch) if kernel == "dkdv" else _fwd_config(64, 128, arch, kernel=kernel)
    assert configs[0] == default
    rest = configs[1:]
    if kernel != "dkdv" and arch >= 90:  # then the two-tiles-per-step launch
        assert rest[0] == _two_tiles_config(128, kernel) and rest[0]["tiles_per_step"] == 2
        rest = rest[1:]
    keys = [tuple(sorted(c.items())) for c in configs]
    assert len(keys) == len(set(keys))
    distance = [sum(c[key] != default[key] for key in default) for c in rest]
    assert distance == sorted(distance)
    if kernel != "dkdv":
        assert {c["tiles_per_step"] for c in configs} == {1, 2}


def test_attention_sweep_dry_run(capsys):
    """Each kernel's launch overrides (forward ``config``, backward ``configs`` with a prebuilt
    ``plan``) reach the kernels and give the default's numbers (interpreter, tiny T)."""
    import os

    import tune_block_sparse_attention as tune

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the dry run is the CPU path (Triton's interpreter)")
    assert tune.main(["--dry-run", "--T", "64", "--head-dim", "64"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.split()[:1] in (["fwd"], ["dq"], ["dkdv"])]
    assert len(rows) == 6
    assert all(float(row[-1]) < 2e-2 for row in rows), rows  # bf16 outputs; dK/dV row steps change the sum order


def test_integrations_dry_run():
    """bench_integrations' builders and steps (issue 7's GPU benchmark) run for all three
    libraries, unpatched and accelerated, on the CPU at a tiny shape."""
    pytest.importorskip("sae_lens")
    pytest.importorskip("sparsify")
    from helpers import import_dictionary_learning

    import_dictionary_learning()  # and undo nnsight's process-wide torch patches, or later opchecks fail
    import bench_integrations

    results = bench_integrations.main(["--dry-run"])
    assert [lib for lib, _ in results] == ["saelens", "sparsify", "dictionary_learning"]


def test_attention_bench_counts_each_index_half():
    """The attention bench's useful-FLOP counts (whole index, ranges alone, columns alone)
    against the expanded mask: the halves are disjoint and add up to the whole."""
    import bench_block_sparse_attention as bench
    from sae_fast.reference.attention import expand_block_sparse_mask

    T = 1000
    vert, slash = bench.vertical_slash_pattern(2, T, 0.1, device="cpu", seed=4)
    index = bench.local_vertical_slash_index(vert, slash, T)
    counts = {}
    for part in ("ranges", "columns", None):
        idx = bench.split_index(index, part) if part else index
        want = int(expand_block_sparse_mask(*idx, T, T).sum())
        assert bench.useful_entries(*idx, T) == want, part
        counts[part] = want
    assert counts["ranges"] > 0 and counts["columns"] > 0
    assert counts["ranges"] + counts["columns"] == counts[None]
    with pytest.raises(ValueError, match="part"):
        bench.split_index(index, "diagonals")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU path: Triton's interpreter")
def test_topk_bench_filter_provider_selects_like_the_default():
    """The forward-only candidate rows (both epilogues) measure the default op's selection."""
    import bench_topk_encode as bench
    from helpers import on_grid

    g = torch.Generator().manual_seed(0)
    x, W, b = torch.randn(9, 32, generator=g), torch.randn(2100, 32, generator=g) / 6, torch.randn(2100, generator=g)
    x, W, b = on_grid(x, 4, 4), on_grid(W, 6, 1), on_grid(b, 6, 4)  # exact sums: bit-equal on any CPU
    want = bench.provider_fn("sae_fast")(x, W, b, 16)
    for name in ("sae_fast_filter", "sae_fast_filter_rowslots"):
        got = bench.provider_fn(name)(x, W, b, 16)
        torch.testing.assert_close(got.relu().sort(dim=1).values, want.relu().sort(dim=1).values, rtol=0, atol=0)
    assert "sae_fast_filter" in bench.PROVIDERS and bench.FORWARD_ONLY <= set(bench.PROVIDERS)
