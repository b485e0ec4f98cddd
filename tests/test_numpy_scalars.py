"""Sizes and thresholds read from numpy arrays (np.int64 k, np.float32 threshold, np.int64
block sizes) are accepted by every op and give the results of the Python numbers; bool and
tensors stay refused where an int is asked for."""

import numpy as np
import pytest
import torch

import sae_fast
from sae_fast.ops.attention_index import vertical_slash_index


def _encoder(n=7, d=12, m=33, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(m, d, generator=g), torch.randn(m, generator=g)


def test_encoders_take_numpy_sizes_and_thresholds():
    x, W, b = _encoder()
    dead = torch.zeros(33, dtype=torch.bool)
    dead[::3] = True
    want = sae_fast.topk_encode(x, W, b, 4, dead_mask=dead, k_aux=5, backend="reference")
    got = sae_fast.topk_encode(x, W, b, np.int64(4), dead_mask=dead, k_aux=np.int32(5), backend="reference")
    assert all(torch.equal(a, c) for a, c in zip(want, got) if a is not None)
    want = sae_fast.batchtopk_encode(x, W, b, 2.5, backend="reference")
    got = sae_fast.batchtopk_encode(x, W, b, np.float32(2.5), backend="reference")
    assert torch.equal(want.values, got.values) and torch.equal(want.indices, got.indices)
    want = sae_fast.batchtopk_encode(x, W, b, 3, threshold=0.5, backend="reference")
    got = sae_fast.batchtopk_encode(x, W, b, np.int64(3), threshold=np.float32(0.5), backend="reference")
    assert torch.equal(want.values, got.values) and torch.equal(want.row_offsets, got.row_offsets)
    for bad in (True, 4.0, torch.tensor(4)):
        with pytest.raises(ValueError, match="k must be an int"):
            sae_fast.topk_encode(x, W, b, bad, backend="reference")
    with pytest.raises(TypeError, match="threshold must be"):
        sae_fast.batchtopk_encode(x, W, b, 3, threshold=True, backend="reference")


def test_attention_and_index_take_numpy_block_sizes():
    g = torch.Generator().manual_seed(1)
    B, H, T, D = 1, 2, 70, 16
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    vertical = torch.tensor([[[0, 5, 33], [1, 2, 60]]])
    slash = torch.tensor([[[0, 7], [0, 20]]])
    seq = torch.tensor([T])
    want_idx = vertical_slash_index(vertical, slash, seq, 32, 16, backend="reference")
    got_idx = vertical_slash_index(vertical, slash, seq, np.int64(32), np.int64(16), context_len=np.int64(T),
                                   backend="reference")
    assert all(torch.equal(a, c) for a, c in zip(want_idx, got_idx))
    want = sae_fast.block_sparse_attention(q, k, v, *want_idx, block_m=32, block_n=16, backend="reference")
    got = sae_fast.block_sparse_attention(q, k, v, *want_idx, block_m=np.int64(32), block_n=np.int32(16),
                                          scale=np.float32(D ** -0.5), backend="reference")
    torch.testing.assert_close(got[0], want[0])
    with pytest.raises(ValueError, match="block_m must be one of"):
        sae_fast.block_sparse_attention(q, k, v, *want_idx, block_m=True, block_n=16, backend="reference")


def test_jumprelu_training_takes_a_numpy_bandwidth():
    x, W, b = _encoder()
    W_dec = torch.randn(33, 12, generator=torch.Generator().manual_seed(4))
    theta = torch.full((33,), 0.2)
    want = sae_fast.jumprelu_training_forward(x, W, b, theta, W_dec, None, bandwidth=0.05, backend="reference")
    got = sae_fast.jumprelu_training_forward(x, W, b, theta, W_dec, None, bandwidth=np.float32(0.05),
                                             backend="reference")
    for a, c in zip(want, got):
        torch.testing.assert_close(a, c)
    with pytest.raises(ValueError, match="bandwidth must be a finite float"):
        sae_fast.jumprelu_training_forward(x, W, b, theta, W_dec, None, bandwidth=True, backend="reference")
