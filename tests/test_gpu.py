"""GPU tier: every backend at the real size the issue names (N=8192, k=64, M=131072,
d=2304) in fp32/fp16/bf16, against the reference in fp64; plain torch (embedding_bag in the
same dtype) sets the fp16/bf16 bound. Also determinism, strided weights and the scalar
(unaligned) paths."""

import pytest
import torch
import torch.nn.functional as F

import sae_fast
from sae_fast.reference import sparse_gather as ref

from helpers import assert_close

pytestmark = pytest.mark.gpu

KERNEL_BACKENDS = [
    "triton",
    pytest.param("cuda", marks=pytest.mark.cuda_ext),
    pytest.param("fastest", marks=pytest.mark.cuda_ext),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
REAL = (8192, 64, 131072, 2304)


def _inputs(n, k, m, d, dtype, *, transposed=False):
    values = (torch.randn(n, k, device="cuda").relu() + 0.05).to(dtype)
    indices = torch.randint(0, m, (n, k), device="cuda")
    if transposed:
        W_dec = (torch.randn(d, m, device="cuda") * 0.02).to(dtype).t()
    else:
        W_dec = (torch.randn(m, d, device="cuda") * 0.02).to(dtype)
    bias = torch.randn(d, device="cuda").to(dtype)
    grad_out = torch.randn(n, d, device="cuda").to(dtype)
    return values, indices, W_dec, bias, grad_out


def _fp64_truth(values, indices, W_dec, bias, grad_out):
    v, W, b, g = (t.double() for t in (values, W_dec, bias, grad_out))
    n, k = indices.shape
    out = ref.csr_gather_sum(v.reshape(-1), indices.reshape(-1), None, n, W, b)
    d_values = ref.gathered_dot(g, indices, W)
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offsets = torch.zeros(W.shape[0] + 1, dtype=torch.int64, device="cuda")
    torch.cumsum(torch.bincount(flat, minlength=W.shape[0]), 0, out=offsets[1:])
    d_W = ref.csr_gather_sum(v.reshape(-1)[order], order // k, offsets, W.shape[0], g)
    return out, d_values, d_W, g.sum(0)


def _run(fn, values, W_dec, bias, grad_out):
    v, W, b = (t.detach().clone().requires_grad_() for t in (values, W_dec, bias))
    out = fn(v, W, b)
    out.backward(grad_out)
    return out.detach(), v.grad, W.grad, b.grad


def _plain(values, indices, W_dec, bias, grad_out):
    """Plain torch in the inputs' dtype. embedding_bag for the output and the W_dec / bias
    gradients; its per-sample-weights backward has no bf16 CUDA kernel, so the values
    gradient is the batched product of the gathered rows with grad_out."""
    out, _, d_W, d_b = _run(
        lambda v, W, b: F.embedding_bag(indices, W, per_sample_weights=v.detach(), mode="sum") + b,
        values, W_dec, bias, grad_out,
    )
    d_values = torch.bmm(W_dec[indices], grad_out.unsqueeze(-1)).squeeze(-1)
    return out, d_values, d_W, d_b


def _check(backend, values, indices, W_dec, bias, grad_out):
    got = _run(lambda v, W, b: sae_fast.sparse_decode(v, indices, W, b, backend=backend), values, W_dec, bias, grad_out)
    truth = _fp64_truth(values, indices, W_dec, bias, grad_out)
    plain = _plain(values, indices, W_dec, bias, grad_out) if values.dtype != torch.float32 else [None] * 4
    for name, g, t, p in zip(("out", "d_values", "d_W_dec", "d_bias"), got, truth, plain):
        assert g.dtype == values.dtype, name
        assert_close(g, t, p, name)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_real_size(backend, dtype):
    _check(backend, *_inputs(*REAL, dtype))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1000, 33, 5000, 2303), (77, 1, 3, 7), (513, 128, 70000, 4096), (300, 7, 1000, 9000)], ids=str)
def test_odd_sizes(backend, dtype, shape):
    _check(backend, *_inputs(*shape, dtype))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_transposed_weight(backend, dtype):
    _check(backend, *_inputs(1024, 32, 20000, 768, dtype, transposed=True))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_int32_indices_and_unaligned_views(backend):
    values, indices, W_dec, bias, grad_out = _inputs(700, 16, 3000, 1025, torch.bfloat16)
    W_view = torch.randn(3000, 1027, device="cuda").to(torch.bfloat16)[:, 1:1026]  # unaligned base and rows
    W_view.copy_(W_dec)
    _check(backend, values, indices.int(), W_view, bias, grad_out)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_deterministic(backend):
    values, indices, W_dec, bias, grad_out = _inputs(4096, 64, 2048, 768, torch.bfloat16)  # heavy collisions
    runs = [_run(lambda v, W, b: sae_fast.sparse_decode(v, indices, W, b, backend=backend), values, W_dec, bias, grad_out) for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_out_of_range_index_raises_on_gpu():
    values, indices, W_dec, bias, _ = _inputs(16, 4, 100, 64, torch.float32)
    indices[3, 2] = 100
    with pytest.raises(IndexError, match="found 100"):
        sae_fast.sparse_decode(values, indices, W_dec, bias)


def test_default_backend_on_gpu():
    expected = "fastest" if sae_fast.cuda_extension_available() else "triton"
    assert sae_fast._backend.resolve_backend(None, torch.device("cuda"), torch.bfloat16, "x") == expected


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compile_inductor_gpu(backend):
    values, indices, W_dec, bias, grad_out = _inputs(256, 16, 1000, 256, torch.bfloat16)
    fn = torch.compile(lambda v, W, b: sae_fast.sparse_decode(v, indices, W, b, backend=backend) * 2, fullgraph=True)
    got = _run(fn, values, W_dec, bias, grad_out)
    want = _run(lambda v, W, b: sae_fast.sparse_decode(v, indices, W, b, backend=backend) * 2, values, W_dec, bias, grad_out)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
