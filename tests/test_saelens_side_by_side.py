"""Issue 6's side-by-side: our TopK trainer against SAELens's own TopK trainer on the same
batches and budget (the full-size run on SmolLM2 activations is
benchmarks/compare_saelens_training.py; this is its small synthetic twin, run whenever
sae-lens is installed). Both get the same two learning rates and keep their best."""

import argparse
import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("sae_lens")

from sae_fast.demo import DemoConfig, synthetic_data  # noqa: E402

_BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_saelens_training.py"


def _compare_module():
    spec = importlib.util.spec_from_file_location("compare_saelens_training", _BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_topk_fvu_no_worse_than_saelens_on_the_same_batches():
    cmp = _compare_module()
    data, _ = synthetic_data(DemoConfig(samples=4096), torch.Generator().manual_seed(0))
    args = argparse.Namespace(num_latents=512, k=4, steps=100, batch_size=256, seed=0, backend="reference")
    lrs = (1e-3, 4e-3)
    ours = min(cmp.train_sae_fast(data, args, lr)[0] for lr in lrs)
    theirs = min(cmp.train_saelens(data, args, lr)[0] for lr in lrs)
    print(f"FVU sae_fast {ours:.4f}, SAELens {theirs:.4f}")
    assert ours <= theirs, f"sae_fast FVU {ours:.4f} is worse than SAELens's {theirs:.4f}"
