"""sparse_decode_csr: CSR codes (rows of different lengths, empty rows, duplicates) against
dense fp64 math, every gradient, bad input, opcheck and compile."""

import pytest
import torch

import sae_fast
from sae_fast.ops.decode import sparse_decode_csr_op

from helpers import backend_params


def _codes(n, m, d, device, dtype, max_per_row=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, max_per_row + 1, (n,), generator=g)
    counts[0] = 0  # an empty row
    row_offsets = torch.zeros(n + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=row_offsets[1:])
    nnz = int(row_offsets[-1])
    values = torch.randn(nnz, generator=g, dtype=torch.float64)
    indices = torch.randint(0, m, (nnz,), generator=g)
    W = torch.randn(m, d, generator=g, dtype=torch.float64)
    bias = torch.randn(d, generator=g, dtype=torch.float64)
    mk = lambda t: t.to(device, dtype).requires_grad_()
    return mk(values), indices.to(device), row_offsets.to(device), mk(W), mk(bias)


def _dense(values, indices, row_offsets, W, bias):
    n = row_offsets.shape[0] - 1
    rows = torch.repeat_interleave(torch.arange(n, device=values.device), row_offsets.diff())
    codes = values.new_zeros(n, W.shape[0]).index_put((rows, indices), values, accumulate=True)
    return codes @ W + bias


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("n,m,d", [(9, 31, 13), (1, 5, 70), (17, 200, 33)])
def test_matches_dense_with_gradients(backend, device, n, m, d):
    dtype = torch.float64 if backend == "reference" else torch.float32
    v, i, ro, W, b = _codes(n, m, d, device, dtype)
    i[1::5] = i[0] if i.numel() else i  # some duplicate latents inside rows
    got = sae_fast.sparse_decode_csr(v, i, ro, W, b, backend=backend)
    want = _dense(v, i, ro, W, b)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(want)
    for a, c in zip(torch.autograd.grad(got, (v, W, b), g), torch.autograd.grad(want, (v, W, b), g)):
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(indices=torch.tensor([0, 1, 99])), IndexError, "indices"),
        (dict(row_offsets=torch.tensor([0, 2, 1, 3])), ValueError, "row_offsets"),
        (dict(row_offsets=torch.tensor([1, 2, 2, 3])), ValueError, "row_offsets"),
        (dict(row_offsets=torch.tensor([0, 1, 2, 3], dtype=torch.int32)), TypeError, "row_offsets"),
        (dict(values=torch.randn(2)), ValueError, "shape"),
        (dict(bias=torch.randn(3)), ValueError, "bias"),
    ],
)
def test_bad_input(change, exc, match):
    args = dict(values=torch.randn(3), indices=torch.tensor([0, 1, 2]), row_offsets=torch.tensor([0, 1, 1, 3]),
                W_dec=torch.randn(5, 4), bias=torch.randn(4))
    args.update(change)
    with pytest.raises(exc, match=match):
        sae_fast.sparse_decode_csr(**args)


def test_opcheck_and_compile():
    v, i, ro, W, b = _codes(6, 11, 5, "cpu", torch.float32)
    torch.library.opcheck(sparse_decode_csr_op, (v, i, ro, W, b, "reference"))
    f = lambda v, W, b: sae_fast.sparse_decode_csr(v, i, ro, W, b, backend="reference", check_indices=False).square().sum()
    got = torch.autograd.grad(torch.compile(f, backend="aot_eager", fullgraph=True)(v, W, b), (v, W, b))
    want = torch.autograd.grad(f(v, W, b), (v, W, b))
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c)
