"""Inputs at the edges of the encoders' and decoders' contracts, each found wrong once: strided
biases and row offsets, empty batches, NaN and ±inf pre-activations, bf16 thresholds of
either sign. Every backend must compute the same function (one body runs them all)."""

import pytest
import torch

import sae_fast

from helpers import backend_params

BACKENDS = backend_params()


def _case(dtype=torch.float32, n=9, d=11, m=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(dtype)
    W = torch.randn(m, d, generator=g).to(dtype)
    return x, W, g


def _strided_biases(m, g, dtype=torch.float32):
    """The same bias three ways: contiguous, every other element of a wider tensor, and one
    value expanded (stride 0)."""
    wide = torch.randn(2 * m, generator=g).to(dtype)
    strided = wide[::2]
    expanded = torch.tensor(0.3, dtype=dtype).expand(m)
    return [(strided.contiguous(), strided), (expanded.contiguous(), expanded)]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_strided_b_enc_equals_contiguous(backend, device):
    x, W, g = _case()
    x, W = x.to(device), W.to(device)
    theta = torch.rand(W.shape[0], generator=g).to(device)
    for dense_b, view_b in _strided_biases(W.shape[0], g):
        dense_b, view_b = dense_b.to(device), view_b.to(device)
        assert view_b.stride(0) != 1
        a, b = (sae_fast.topk_encode(x, W, bb, 5, backend=backend) for bb in (dense_b, view_b))
        assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)
        a, b = (sae_fast.jumprelu_encode(x, W, bb, theta, dense=True, backend=backend) for bb in (dense_b, view_b))
        assert torch.equal(a, b)
        a, b = (sae_fast.batchtopk_encode(x, W, bb, 3, threshold=0.2, backend=backend) for bb in (dense_b, view_b))
        assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)
        a, b = (sae_fast.batchtopk_encode(x, W, bb, 3, backend=backend) for bb in (dense_b, view_b))
        assert torch.equal(a.indices, b.indices) and torch.equal(a.row_offsets, b.row_offsets)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_strided_row_offsets_in_csr_decode(backend, device):
    g = torch.Generator().manual_seed(3)
    W_dec = torch.randn(20, 7, generator=g).to(device)
    offsets = torch.tensor([0, 2, 5, 6], dtype=torch.int64)
    wide = torch.stack([offsets, torch.full_like(offsets, 99)], dim=1).reshape(-1)  # [0, 99, 2, 99, ...]
    view = wide.to(device)[::2]
    assert view.stride(0) == 2
    values = torch.randn(6, generator=g).to(device)
    indices = torch.tensor([1, 4, 0, 7, 19, 3]).to(device)
    want = sae_fast.sparse_decode_csr(values, indices, offsets.to(device), W_dec, backend=backend)
    got = sae_fast.sparse_decode_csr(values, indices, view, W_dec, backend=backend)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_batch(backend, device):
    x, W, _ = _case(n=0)
    x, W = x.to(device), W.to(device)
    dead = torch.zeros(W.shape[0], dtype=torch.bool, device=device)
    dead[::3] = True
    codes = sae_fast.topk_encode(x, W, None, 4, dead_mask=dead, k_aux=6, backend=backend)
    assert codes.values.shape == (0, 4) and codes.indices.shape == (0, 4) and codes.aux_values.shape == (0, 6)
    codes = sae_fast.batchtopk_encode(x, W, None, 4, backend=backend)
    assert codes.values.shape == (0,) and codes.row_offsets.tolist() == [0]
    codes = sae_fast.batchtopk_encode(x, W, None, 4, threshold=0.1, backend=backend)
    assert codes.values.shape == (0,) and codes.row_offsets.tolist() == [0]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_bf16_thresholds_of_either_sign(backend, device):
    """pre = [1, .5, -1, -.5] against θ = [-.25, .25, -2, -.75] (Triton's interpreter once
    ordered bf16 values of opposite sign wrongly), and a pre that bf16 rounds up onto θ = 1
    (it once truncated): a bf16 computation keeps exactly what plain torch keeps."""
    x = torch.tensor([[1.0, 0.5], [1.0 + 3 * 2 ** -9, 0.0]], dtype=torch.bfloat16, device=device)
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], dtype=torch.bfloat16, device=device)
    theta = torch.tensor([-0.25, 0.25, -2.0, 1.0], dtype=torch.bfloat16, device=device)
    pre = (x.double() @ W.double().T).to(torch.bfloat16)  # [[1, .5, -1, -.5], [1.0078125, 0, -1.0078125, 0]]
    want = torch.where((pre > theta) & (pre > 0), pre, torch.zeros_like(pre))
    got = sae_fast.jumprelu_encode(x, W, None, theta, dense=True, backend=backend)
    assert torch.equal(got, want)
    codes = sae_fast.batchtopk_encode(x, W, None, 1, threshold=-0.5, backend=backend)
    assert codes.indices.tolist() == [0, 1, 0] and codes.row_offsets.tolist() == [0, 2, 3]
    W_dec = torch.eye(4, dtype=torch.bfloat16, device=device)
    x_hat, l0 = sae_fast.jumprelu_training_forward(x, W, None, theta, W_dec, None, backend=backend)
    assert torch.equal(x_hat, torch.where(pre > theta, pre, torch.zeros_like(pre)))
    assert float(l0) == float((pre > theta).sum()) / 2


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nan_ranks_first_whatever_its_sign(backend, device):
    x = torch.tensor([[1.0, 2.0]], device=device)
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], device=device)
    for nan in (float("nan"), -float("nan")):
        b = torch.tensor([0.0, nan, 5.0], device=device)
        codes = sae_fast.topk_encode(x, W, b, 2, backend=backend)
        assert codes.indices.tolist() == [[1, 2]] and codes.values[0, 0].isnan() and float(codes.values[0, 1]) == 5


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_batchtopk_nan_row_keeps_its_nans_and_spares_the_others(backend, device):
    """A NaN row once made the cut value NaN, which emptied every row's codes and reported a
    threshold of 0: the loss looked fine. Now the NaN row's codes are NaN (NaN ranks first)
    and the other rows keep codes; the threshold is over the finite kept values."""
    x, W, _ = _case(n=6, d=8, m=40, seed=4)
    x, W = x.to(device), W.to(device)
    x[2, 3] = float("nan")
    codes = sae_fast.batchtopk_encode(x, W, None, 3, backend=backend)
    counts = codes.row_offsets.diff()
    rows = torch.repeat_interleave(torch.arange(6, device=device), counts)
    assert int(counts.sum()) == 18
    assert bool(codes.values[rows == 2].isnan().all()) and int(counts[2]) > 0
    others = codes.values[rows != 2]
    assert others.numel() > 0 and bool(torch.isfinite(others).all())
    assert float(codes.threshold) == float(others.min())


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_auxk_keeps_a_dead_latents_infinite_pre_activation(backend, device, sign):
    """A dead latent whose pre-activation overflows to ±inf is a real AuxK slot (value ±inf,
    its own index, its own gradient), not the "missing slot" marker."""
    x = torch.tensor([[1e38, 1e38]], device=device)
    W = torch.tensor([[1.0, 0.0], [10.0 * sign, 10.0 * sign], [0.0, 0.0]], device=device, requires_grad=True)
    dead = torch.tensor([False, True, False], device=device)
    codes = sae_fast.topk_encode(x, W, None, 1, dead_mask=dead, k_aux=1, backend=backend)
    assert codes.aux_indices.tolist() == [[1]] and float(codes.aux_values.detach()) == sign * float("inf")
    codes.aux_values.sum().backward()  # d aux / d W_enc[1] = x: finite
    assert (W.grad.abs().sum(1) > 0).nonzero().view(-1).tolist() == [1]  # never a live latent
    b = sae_fast.batchtopk_encode(x, W.detach(), None, 1, dead_mask=dead, k_aux=1, backend=backend)
    assert b.aux_indices.tolist() == [[1]] and float(b.aux_values) == sign * float("inf")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_centred_input_is_rounded_to_the_weights_dtype(backend, device):
    """``x - b_dec`` is the GEMM's operand in W_enc's dtype on every backend: 256 - 0.5 rounds
    to 256 in bf16, so latent 0's pre-activation is 0, not 0.5, and latent 1 (0.25) wins."""
    bf = dict(dtype=torch.bfloat16, device=device)
    x = torch.tensor([[256.0, 256.0]], **bf)
    b_dec = torch.tensor([0.5, 0.0], **bf)
    W = torch.tensor([[1.0, -1.0], [0.0, 2.0 ** -10]], **bf)
    codes = sae_fast.topk_encode(x, W, None, 1, b_dec=b_dec, backend=backend)
    assert codes.indices.tolist() == [[1]] and float(codes.values) == 0.25
    theta = torch.tensor([0.1, 0.1], **bf)
    dense = sae_fast.jumprelu_encode(x, W, None, theta, b_dec=b_dec, dense=True, backend=backend)
    assert dense.tolist() == [[0.0, 0.25]]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_threshold_encoders_keep_nan(backend, device):
    """A NaN input row reaches the output of the threshold encoders (JumpReLU, BatchTopK
    inference) instead of encoding to nothing and decoding to b_dec."""
    x, W, g = _case(n=5, d=6, m=23, seed=8)
    x, W = x.to(device), W.to(device)
    x[3, 1] = float("nan")
    theta = torch.rand(23, generator=g).to(device)
    codes = sae_fast.jumprelu_encode(x, W, None, theta, backend=backend)
    counts = codes.row_offsets.diff()
    rows = torch.repeat_interleave(torch.arange(5, device=device), counts)
    assert int(counts[3]) == 23 and bool(codes.values[rows == 3].isnan().all())
    assert bool(torch.isfinite(codes.values[rows != 3]).all())
    W_dec = torch.randn(23, 6, generator=g).to(device)
    x_hat, _ = sae_fast.jumprelu_training_forward(x, W, None, theta, W_dec, None, backend=backend)
    assert bool(x_hat[3].isnan().all()) and bool(torch.isfinite(x_hat[[0, 1, 2, 4]]).all())
    inference = sae_fast.batchtopk_encode(x, W, None, 2, threshold=0.3, backend=backend)
    assert int(inference.row_offsets.diff()[3]) == 23


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_zero_width_decoder(backend, device):
    W_dec = torch.empty(9, 0, device=device)
    values, indices = torch.rand(4, 3, device=device), torch.randint(0, 9, (4, 3), device=device)
    assert sae_fast.sparse_decode(values, indices, W_dec, backend=backend).shape == (4, 0)
    offsets = torch.tensor([0, 5, 5, 12], device=device)
    out = sae_fast.sparse_decode_csr(values.view(-1), indices.view(-1), offsets, W_dec, backend=backend)
    assert out.shape == (3, 0)
    with pytest.raises(ValueError, match="sparse_decode_csr: row_offsets must rise"):
        sae_fast.sparse_decode_csr(values.view(-1), indices.view(-1), offsets.flip(0), W_dec, backend=backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_jumprelu_without_latents(backend, device):
    """M = 0 (the threshold kernel's launch divided by it): no entries, x_hat = b_dec, zero
    gradients, as the reference computes it."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, generator=g).to(device).requires_grad_()
    W_enc, W_dec = torch.empty(0, 4, device=device, requires_grad=True), torch.empty(0, 4, device=device)
    theta = torch.empty(0, device=device, requires_grad=True)
    b_dec = torch.randn(4, generator=g).to(device).requires_grad_()
    codes = sae_fast.jumprelu_encode(x, W_enc, None, theta.detach(), backend=backend)
    assert codes.values.numel() == codes.indices.numel() == 0 and codes.row_offsets.tolist() == [0] * 4
    assert sae_fast.jumprelu_encode(x, W_enc, None, theta.detach(), dense=True, backend=backend).shape == (3, 0)
    x_hat, l0 = sae_fast.jumprelu_training_forward(x, W_enc, None, theta, W_dec, b_dec, backend=backend)
    assert torch.equal(x_hat.detach(), b_dec.detach().expand(3, 4)) and float(l0.detach()) == 0.0
    gx, gw, gt, gb = torch.autograd.grad(x_hat.square().sum() + l0, (x, W_enc, theta, b_dec))
    assert not gx.any() and gw.shape == (0, 4) and gt.shape == (0,)
    torch.testing.assert_close(gb, 2 * 3 * b_dec.detach())


def _window_past_2_31(m, d, device, g):
    """A [m, d] fp16 transposed view into a [d, 2^24] weight (SAELens keeps W_enc as [d, M] and
    the adapters pass W_enc.T): its column stride is 2^24, so (d - 1)·stride passes 2^31 at
    d = 129. Only the m·d elements of the window are written (the rest is never touched:
    lazily committed memory on CPU, 4.3 GB on a GPU)."""
    stride = 1 << 24
    storage = torch.empty(d * stride, dtype=torch.float16, device=device)
    W = storage.as_strided((m, d), (1, stride))
    W.copy_(torch.randn(m, d, generator=g).to(torch.float16))
    assert (d - 1) * W.stride(1) >= 2 ** 31
    return W


KERNEL_BACKENDS = [p for p in BACKENDS if p.values[0] != "reference"]


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_transposed_weights_with_offsets_past_2_31(backend, device):
    """Kernels once formed d-offsets as int32 · stride: with this view the products wrapped and
    the Triton encoders and decoders read outside the weight (a segfault under the
    interpreter, garbage or a fault on a GPU). A kernel reads the same values in the same order
    whatever the strides, so the view must give bitwise what a contiguous copy gives. (The
    reference backend is not a subject: torch's CPU GEMM sums in a layout-dependent order.)"""
    g = torch.Generator().manual_seed(11)
    m, d, n = 64, 129, 5
    W = _window_past_2_31(m, d, device, g)
    dense = W.contiguous()
    x = torch.randn(n, d, generator=g).to(torch.float16).to(device)
    b = torch.randn(m, generator=g).to(torch.float16).to(device)
    theta = torch.rand(m, generator=g).to(device)

    def topk_with_grad(w):
        xr = x.clone().requires_grad_(True)
        out = sae_fast.topk_encode(xr, w, b, 7, backend=backend)
        out.values.float().square().sum().backward()  # d/dx gathers rows of w (a decode)
        return out.values.detach(), out.indices, xr.grad

    for a, c in zip(topk_with_grad(dense), topk_with_grad(W)):
        assert torch.equal(a, c)
    a, c = (sae_fast.jumprelu_encode(x, w, b, theta, dense=True, backend=backend) for w in (dense, W))
    assert torch.equal(a, c)
    for threshold in (0.2, None):  # the threshold kernel, then the batch selection's candidates
        a, c = (sae_fast.batchtopk_encode(x, w, b, 3, threshold=threshold, backend=backend) for w in (dense, W))
        assert torch.equal(a.indices, c.indices) and torch.equal(a.values, c.values)

    # The same view as a decoder, forward and the gradient of its values.
    indices = torch.randint(0, m, (n, 6), generator=g).to(device)

    def decode_with_grad(w):
        v = torch.randn(n, 6, generator=torch.Generator().manual_seed(5)).to(torch.float16).to(device)
        v.requires_grad_(True)
        out = sae_fast.sparse_decode(v, indices, w, backend=backend)
        out.float().sum().backward()
        return out.detach(), v.grad

    for a, c in zip(decode_with_grad(dense), decode_with_grad(W)):
        assert torch.equal(a, c)


def test_weight_layouts_whose_tile_offsets_would_wrap_are_refused():
    """The tile keeps arange(BLOCK_D)·stride_wd in int32 (int64 there spilled the TopK tile):
    a transposed weight with more than 2^31 / (BLOCK_D - 1) latents must be refused by name,
    not read through wrapped offsets. Meta tensors: layouts without memory."""
    from sae_fast.triton_kernels.encoder_tile import check_weight_offsets

    def view(m, d, stride):
        return torch.empty_strided((m, d), (1, stride), device="meta", dtype=torch.bfloat16)

    check_weight_offsets(view(64, 2304, 1 << 24), 128, "topk_encode")  # OpenAI's 16M latents fit
    check_weight_offsets(view(64, 2304, 1 << 31), 128, "topk_encode")  # >= 2^31 arrives as int64
    check_weight_offsets(view(64, 2, 1 << 30), 128, "topk_encode")  # lane 1 · 2^30 fits
    check_weight_offsets(torch.empty((1 << 26, 2304), device="meta"), 128, "topk_encode")  # row-major
    with pytest.raises(ValueError, match=r"topk_encode: W_enc's d-axis stride \(33554432.*W_enc.contiguous"):
        check_weight_offsets(view(64, 2304, 1 << 25), 128, "topk_encode")
    with pytest.raises(ValueError, match="tile depth 9"):
        check_weight_offsets(view(64, 9, 1 << 30), 128, "threshold_encode")
