"""Regression gate for kernel speed (pytest-benchmark), separate from the timed sweep in
benchmarks/. On a GPU, save a baseline and compare later runs against it:

    pytest tests/test_benchmark_regression.py --benchmark-autosave
    pytest tests/test_benchmark_regression.py --benchmark-compare --benchmark-compare-fail=median:10%

Without a GPU every case runs once with timing disabled (conftest), as a smoke test that the
benchmarked calls still work; the results are still checked against the reference."""

import pytest
import torch

import sae_fast
from sae_fast.reference import sparse_gather as ref

HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"
# The main decode shape on a GPU; a small one under the interpreter.
SHAPE = (8192, 64, 131072, 2304) if HAS_GPU else (64, 8, 300, 96)
DTYPE = torch.bfloat16 if HAS_GPU else torch.float32
BACKENDS = ["triton", "cuda", "fastest"] if HAS_GPU else ["triton"]


def _inputs():
    n, k, m, d = SHAPE
    g = torch.Generator(device="cpu").manual_seed(0)
    values = (torch.randn(n, k, generator=g).relu() + 0.1).to(DEVICE, DTYPE)
    indices = torch.randint(0, m, (n, k), generator=g).to(DEVICE)
    W_dec = (torch.randn(m, d, generator=g) * 0.02).to(DEVICE, DTYPE)
    grad = torch.randn(n, d, generator=g).to(DEVICE, DTYPE)
    return values, indices, W_dec, grad


def _sync(x):
    if HAS_GPU:
        torch.cuda.synchronize()
    return x


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_decode_forward(benchmark, backend):
    if backend != "triton" and not sae_fast.cuda_extension_available():
        pytest.skip("sae_fast._C not built")
    values, indices, W_dec, _ = _inputs()
    benchmark.group = f"sparse_decode fwd {SHAPE}"
    out = benchmark(lambda: _sync(sae_fast.sparse_decode(values, indices, W_dec, backend=backend, check_indices=False)))
    want = ref.csr_gather_sum(values.double().reshape(-1), indices.reshape(-1), None, SHAPE[0], W_dec.double())
    torch.testing.assert_close(out.double(), want, rtol=2e-2 if HAS_GPU else 1e-5, atol=2e-2 if HAS_GPU else 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_decode_forward_backward(benchmark, backend):
    if backend != "triton" and not sae_fast.cuda_extension_available():
        pytest.skip("sae_fast._C not built")
    values, indices, W_dec, grad = _inputs()
    values.requires_grad_()
    W_dec.requires_grad_()

    def step():
        values.grad = W_dec.grad = None
        sae_fast.sparse_decode(values, indices, W_dec, backend=backend, check_indices=False).backward(grad)
        return _sync(values.grad)

    benchmark.group = f"sparse_decode fwd+bwd {SHAPE}"
    got = benchmark(step)
    want = ref.gathered_dot(grad.double(), indices, W_dec.detach().double())
    torch.testing.assert_close(got.double(), want, rtol=2e-2 if HAS_GPU else 1e-5, atol=5e-2 if HAS_GPU else 1e-5)
