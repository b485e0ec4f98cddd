"""Test tiers (see shared DESIGN): default (CPU, Triton under the interpreter), ``cuda_ext``
(the compiled extension, CPU is enough), ``gpu`` (a CUDA GPU), ``slow`` (--run-slow)."""

import os

import pytest
import torch

# The interpreter is read when @triton.jit decorates, so it must be set before any kernel
# module is imported; on a GPU machine the real compiler is used instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    # The regression benchmarks (test_benchmark_regression.py) only time on a GPU; elsewhere
    # they run once each as smoke tests. pytest-benchmark reads the option after this hook.
    if not torch.cuda.is_available() and hasattr(config.option, "benchmark_disable"):
        config.option.benchmark_disable = True


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    from sae_fast import cuda_extension_available

    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_ext = pytest.mark.skip(reason="sae_fast._C not built (SAE_FAST_BUILD_CUDA=1 pip install ...)")
    skip_slow = pytest.mark.skip(reason="slow: pass --run-slow")
    has_gpu = torch.cuda.is_available()
    has_ext = cuda_extension_available()
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)
        if "cuda_ext" in item.keywords and not has_ext:
            item.add_marker(skip_ext)
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Kernel launchers fill outputs with NaN first, so an element no program wrote fails."""
    monkeypatch.setenv("SAE_FAST_POISON_OUTPUTS", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
