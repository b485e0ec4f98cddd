"""The streamed TopK reference against a dense formulation written independently: one
[N, M] matmul, then a sort by (value descending, latent index ascending)."""

import pytest
import torch

from sae_fast.reference.topk import topk_select


def _dense_truth(x, W, b_enc, b_dec, k, dead=None, k_aux=0):
    pre = ((x.double() - (b_dec.double() if b_dec is not None else 0)) @ W.double().T)
    if b_enc is not None:
        pre = pre + b_enc.double()
    pre = pre.to(x.dtype).double()
    m = W.shape[0]
    # Sort key: value descending, then index ascending (lexicographic via two stable sorts).
    idx = torch.arange(m).expand_as(pre)
    order = torch.sort(pre, dim=1, descending=True, stable=True).indices  # stable keeps index order for ties
    v, i = torch.gather(pre, 1, order)[:, :k], torch.gather(idx, 1, order)[:, :k]
    out = [v.to(x.dtype), i]
    if dead is not None and k_aux > 0:
        dpre = pre.masked_fill(~dead, float("-inf"))
        order = torch.sort(dpre, dim=1, descending=True, stable=True).indices[:, :k_aux]
        av, ai = torch.gather(dpre, 1, order), torch.gather(idx, 1, order)
        ai = ai.masked_fill(torch.isinf(av), 0)
        out += [av.to(x.dtype), ai]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,d,m,k,block_m", [(7, 13, 101, 5, 16), (3, 5, 9, 9, 4), (4, 8, 33, 1, 7), (5, 6, 20, 3, 100)])
def test_matches_dense(dtype, n, d, m, k, block_m):
    # Small integers: every pre-activation is exact in every dtype (so the comparison can be
    # exact whatever the summation order) and ties are frequent (so the tie rule is tested).
    x = torch.randint(-3, 4, (n, d)).to(dtype)
    W = torch.randint(-3, 4, (m, d)).to(dtype)
    b_enc = torch.randint(-2, 3, (m,)).to(dtype)
    b_dec = torch.randint(-1, 2, (d,)).to(dtype)
    got = topk_select(x, W, b_enc, k, b_dec=b_dec, block_m=block_m)
    v, i = _dense_truth(x, W, b_enc, b_dec, k)
    torch.testing.assert_close(got.pre, v, rtol=0, atol=0)
    assert torch.equal(got.indices, i)


def test_ties_break_toward_smaller_index_across_blocks():
    x = torch.ones(2, 4)
    W = torch.zeros(10, 4)
    W[[1, 3, 6, 8]] = 1.0  # four equal maxima in different blocks of 3
    got = topk_select(x, W, None, 3, block_m=3)
    assert got.indices.tolist() == [[1, 3, 6], [1, 3, 6]]
    got = topk_select(x, W, None, 6, block_m=3)
    assert got.indices[0].tolist() == [1, 3, 6, 8, 0, 2]  # then the zeros, by index


def test_aux_among_dead_latents():
    n, d, m = 6, 5, 40
    x, W, b = (torch.randint(-3, 4, s).float() for s in ((n, d), (m, d), (m,)))
    dead = torch.zeros(m, dtype=torch.bool)
    dead[[2, 5, 17, 33]] = True
    got = topk_select(x, W, b, 4, dead_mask=dead, k_aux=6, block_m=8)  # k_aux > dead count
    v, i, av, ai = _dense_truth(x, W, b, None, 4, dead, 6)
    torch.testing.assert_close(got.pre, v)
    assert torch.equal(got.indices, i)
    torch.testing.assert_close(got.aux_pre, av)
    assert torch.equal(got.aux_indices, ai)
    assert torch.isinf(got.aux_pre[:, 4:]).all() and (got.aux_indices[:, 4:] == 0).all()
    assert set(got.aux_indices[:, :4].flatten().tolist()) <= {2, 5, 17, 33}


def test_random_floats_agree_up_to_rounding():
    x, W, b = torch.randn(9, 37), torch.randn(300, 37), torch.randn(300)
    got = topk_select(x, W, b, 16, block_m=64)
    v, i = _dense_truth(x, W, b, None, 16)
    torch.testing.assert_close(got.pre, v, rtol=1e-5, atol=1e-5)
    assert (got.indices == i).float().mean() > 0.95  # only near-ties may swap


def test_transposed_weight_view():
    x, W = torch.randint(-3, 4, (5, 7)).float(), torch.randint(-3, 4, (7, 30)).float().T  # [d, M] storage as [M, d]
    got = topk_select(x, W, None, 4, block_m=8)
    v, i = _dense_truth(x, W, None, None, 4)
    torch.testing.assert_close(got.pre, v)
    assert torch.equal(got.indices, i)
