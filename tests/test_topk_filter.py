"""The probe-and-filter TopK encoder (``triton_kernels/topk_filter.py``): the same keys as
the fused kernel, bit for bit, whatever the probe's thresholds do (too low: overflow; too
high: too few candidates; both recomputed exactly), ties, NaN rows, small dictionaries,
bad arguments. CPU: Triton's interpreter at small sizes; GPU tier at a training size."""

import os

import pytest
import torch

from helpers import on_grid

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = [pytest.param("cpu", id="interp", marks=pytest.mark.skipif(not INTERP, reason="needs TRITON_INTERPRET=1")),
           pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


def _modules():
    from sae_fast.triton_kernels import topk_encode as fused
    from sae_fast.triton_kernels import topk_filter as filt

    return fused, filt


def _inputs(n, d, m, dtype, device, seed=0, biases=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    W = torch.randn(m, d, generator=g) / d ** 0.5
    b_enc = torch.randn(m, generator=g) / 10 if biases else None
    b_dec = torch.randn(d, generator=g) / 5 if biases else None
    if device == "cpu":  # exact sums: bit-equal keys whatever the interpreter's matmul rounding
        x, W = on_grid(x, 4, 4), on_grid(W, 6, 1)
        b_enc = None if b_enc is None else on_grid(b_enc, 7, 1)
        b_dec = None if b_dec is None else on_grid(b_dec, 4, 1)
    to = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return to(x), to(W), to(b_enc), to(b_dec)


def _same(got, want):
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0, equal_nan=True)
    assert got[2].shape == (got[0].shape[0], 0) and got[3].shape == (got[0].shape[0], 0)


class _Spy:
    """Counts the rows the fused kernel recomputes."""

    def __init__(self, monkeypatch, fused, filt):
        self.rows = 0
        real = fused.topk_encode

        def spy(x, *args, **kw):
            self.rows += x.shape[0]
            return real(x, *args, **kw)

        monkeypatch.setattr(filt.fused, "topk_encode", spy)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("entry_slots", [True, False], ids=["entry-slots", "row-slots"])
@pytest.mark.parametrize("dtype,biases,k", [(torch.float32, True, 8), (torch.bfloat16, True, 33),
                                            (torch.float16, False, 1)])
def test_matches_the_fused_kernel(device, entry_slots, dtype, biases, k, monkeypatch):
    """Both epilogues (a slot atomic per candidate, or per row and tile with a cumsum)."""
    fused, filt = _modules()
    x, W, b_enc, b_dec = _inputs(19, 40, 2100, dtype, device, biases=biases)
    want = fused.topk_encode(x, W, b_enc, b_dec, k)
    spy = _Spy(monkeypatch, fused, filt)
    _same(filt.topk_encode_filtered(x, W, b_enc, b_dec, k, config=dict(entry_slots=entry_slots)), want)
    assert spy.rows == 0  # the probe's thresholds held for every row
    if dtype == torch.float32:  # and both are the exact top-k of the fp32 pre-activations
        pre = (x.double() - b_dec.double()) @ W.double().T + b_enc.double()
        assert torch.equal(torch.topk(pre, k, dim=1).indices, want[1])


@pytest.mark.parametrize("device", DEVICES)
def test_thresholds_too_low_overflow_and_are_recomputed(device, monkeypatch):
    """Probe latents with tiny weights: every row's threshold is far too low, the candidate
    slots overflow, and those rows go to the fused kernel (also forced with cap = k)."""
    fused, filt = _modules()
    x, W, b_enc, b_dec = _inputs(19, 40, 2100, torch.float32, device, seed=1, biases=False)
    probe = filt.probe_latents(W.shape[0], W.device)
    W[probe] *= 2.0 ** -10  # a power of two keeps the sums exact (see _inputs)
    want = fused.topk_encode(x, W, b_enc, b_dec, 8)
    spy = _Spy(monkeypatch, fused, filt)
    _same(filt.topk_encode_filtered(x, W, b_enc, b_dec, 8, cap=64), want)
    assert spy.rows == 19
    x2, W2, b2, d2 = _inputs(19, 40, 2100, torch.float32, device, seed=2)
    want2 = fused.topk_encode(x2, W2, b2, d2, 8)
    spy.rows = 0
    _same(filt.topk_encode_filtered(x2, W2, b2, d2, 8, cap=8), want2)
    assert spy.rows > 0
    spy.rows = 0  # the row-slot epilogue counts overflowing rows the same way
    _same(filt.topk_encode_filtered(x2, W2, b2, d2, 8, cap=8, config=dict(entry_slots=False)), want2)
    assert spy.rows > 0


@pytest.mark.parametrize("device", DEVICES)
def test_thresholds_too_high_leave_too_few_and_are_recomputed(device, monkeypatch):
    """A threshold above a row's k-th value (here: forced for every other row) leaves it
    fewer than k candidates; that row is recomputed, the others are not."""
    fused, filt = _modules()
    x, W, b_enc, b_dec = _inputs(19, 40, 2100, torch.bfloat16, device, seed=3)
    real = filt.row_thresholds

    def too_high(*args):
        thr = real(*args)
        thr[::2] = float("inf")
        return thr

    want = fused.topk_encode(x, W, b_enc, b_dec, 5)
    monkeypatch.setattr(filt, "row_thresholds", too_high)
    spy = _Spy(monkeypatch, fused, filt)
    _same(filt.topk_encode_filtered(x, W, b_enc, b_dec, 5), want)
    assert spy.rows == 10


@pytest.mark.parametrize("device", DEVICES)
def test_ties_and_nan_rows(device):
    """Duplicated latents (equal values: the smaller latent first) and a row with NaN inputs
    select exactly as the fused kernel does."""
    fused, filt = _modules()
    x, W, b_enc, b_dec = _inputs(19, 40, 2100, torch.float32, device, seed=4, biases=False)
    W[1000:1500] = W[0:500]
    x[3, 7] = float("nan")
    _same(filt.topk_encode_filtered(x, W, b_enc, b_dec, 12), fused.topk_encode(x, W, b_enc, b_dec, 12))


def test_small_dictionaries_and_bad_arguments(monkeypatch):
    fused, filt = _modules()
    if not INTERP:
        pytest.skip("CPU path: Triton's interpreter (TRITON_INTERPRET=1)")
    x, W, b_enc, b_dec = _inputs(5, 16, 300, torch.float32, "cpu")
    want = fused.topk_encode(x, W, b_enc, b_dec, 4)
    spy = _Spy(monkeypatch, fused, filt)
    _same(filt.topk_encode_filtered(x, W, b_enc, b_dec, 4), want)
    assert spy.rows == 5  # too few latents for a probe: the fused kernel did it all
    x, W, b_enc, b_dec = _inputs(5, 16, 2100, torch.float32, "cpu")
    with pytest.raises(ValueError, match="cap"):
        filt.topk_encode_filtered(x, W, b_enc, b_dec, 8, cap=7)
    assert filt.probe_latents(2100, "cpu").numel() == 2 * 64  # whole tiles, ~1/16, spread out
    assert filt.probe_latents(2100, "cpu")[64].item() == 1024


@pytest.mark.gpu
def test_gpu_training_size_matches_the_fused_kernel():
    fused, filt = _modules()
    x, W, b_enc, b_dec = _inputs(4096, 2304, 65536, torch.bfloat16, "cuda", seed=5)
    _same(filt.topk_encode_filtered(x, W, b_enc, b_dec, 64), fused.topk_encode(x, W, b_enc, b_dec, 64))
