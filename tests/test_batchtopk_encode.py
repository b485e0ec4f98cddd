"""batchtopk_encode: the batch-wide selection (training mode) and the threshold selection
(inference mode) against a dense formulation written from the definition (one [N, M]
matmul, a stable sort of the flattened ReLU: row-major order among ties), exactly, and every
gradient; the capacity-retry paths; bad input; opcheck and compile. Integer-valued inputs
make every pre-activation exact in fp32 and ties common."""

import pytest
import torch

import sae_fast
from sae_fast.ops.batchtopk import batchtopk_encode_op

from helpers import backend_params


def _dense_batch(x, W, b_enc, b_dec, k, threshold=None):
    """Differentiable dense [N, M] codes and the boolean mask of kept entries."""
    pre = x @ W.T
    if b_dec is not None:
        pre = (x - b_dec) @ W.T
    if b_enc is not None:
        pre = pre + b_enc
    act = torch.relu(pre)
    if threshold is None:
        flat = act.detach().reshape(-1)
        winners = torch.sort(flat, descending=True, stable=True).indices[: k * x.shape[0]]
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[winners] = True
        keep = keep.view_as(pre) & (pre.detach() > 0)
    else:
        keep = (pre.detach() > threshold) & (pre.detach() > 0)
    return act * keep, keep


def _to_dense(codes, n, m):
    rows = torch.repeat_interleave(torch.arange(n, device=codes.values.device), codes.row_offsets.diff())
    out = codes.values.new_zeros(n, m)
    out = out.index_put((rows, codes.indices.long()), codes.values)
    mask = torch.zeros(n, m, dtype=torch.bool, device=out.device)
    mask[rows, codes.indices.long()] = True
    return out, mask


def _int_leaves(n, d, m, device, dtype, seed=3):
    g = torch.Generator().manual_seed(seed)
    ints = lambda lo, hi, *s: torch.randint(lo, hi, s, generator=g).to(dtype).to(device).requires_grad_()
    return ints(-3, 4, n, d), ints(-3, 4, m, d), ints(-2, 3, m), ints(-1, 2, d)


def _dtype(backend):
    return torch.float64 if backend == "reference" else torch.float32


def _check_csr(codes, n):
    ro = codes.row_offsets
    assert ro.shape == (n + 1,) and ro[0] == 0 and ro[-1] == codes.values.numel() == codes.indices.numel()
    for r in range(n):  # ascending, distinct latents in each row
        seg = codes.indices[ro[r]:ro[r + 1]]
        assert (seg.diff() > 0).all()


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("n,d,m,k", [(9, 13, 53, 5), (4, 6, 17, 1), (3, 5, 11, 11), (12, 7, 40, 3)])
def test_training_selection_and_gradients(backend, device, n, d, m, k):
    x, W, b_enc, b_dec = _int_leaves(n, d, m, device, _dtype(backend))
    codes = sae_fast.batchtopk_encode(x, W, b_enc, k, b_dec=b_dec, backend=backend)
    _check_csr(codes, n)
    want, keep = _dense_batch(x, W, b_enc, b_dec, k)
    got, mask = _to_dense(codes, n, m)
    assert torch.equal(mask, keep)
    assert torch.equal(got.detach(), want.detach())
    assert codes.threshold == (want[keep].min() if keep.any() else 0)
    g = torch.randn(n, m, dtype=x.dtype, generator=torch.Generator().manual_seed(5)).to(device)
    g_got = torch.autograd.grad(got, (x, W, b_enc, b_dec), g)
    g_want = torch.autograd.grad(want, (x, W, b_enc, b_dec), g)
    for name, a, b in zip(("x", "W_enc", "b_enc", "b_dec"), g_got, g_want):
        torch.testing.assert_close(a, b, msg=lambda s: f"grad {name}: {s}")


@pytest.mark.parametrize("backend,device", backend_params())
def test_one_row_takes_most_of_the_batch(backend, device):
    """A row far above the others wins far more than its 2k candidate slots: the selection
    must find out and widen that row's list (twice here), never drop its winners."""
    n, d, m, k = 6, 5, 300, 4
    x, W, b_enc, b_dec = (t.detach() for t in _int_leaves(n, d, m, device, _dtype(backend)))
    W = W.abs() + 1
    x = x.abs()
    x[2] += 50.0  # row 2's pre-activations beat every other row's
    codes = sae_fast.batchtopk_encode(x, W, b_enc, k, b_dec=None, backend=backend)
    _, keep = _dense_batch(x, W, b_enc, None, k)
    _, mask = _to_dense(codes, n, m)
    assert keep[2].sum() == n * k  # the whole budget went to row 2: 24 > 2k = 8
    assert torch.equal(mask, keep)


@pytest.mark.parametrize("backend,device", backend_params())
def test_all_negative_and_few_positive(backend, device):
    n, d, m = 5, 4, 23
    x = torch.ones(n, d, device=device, dtype=_dtype(backend))
    W = -torch.ones(m, d, device=device, dtype=x.dtype)
    codes = sae_fast.batchtopk_encode(x, W, None, 3, backend=backend)
    assert codes.values.numel() == 0 and codes.row_offsets.tolist() == [0] * (n + 1)
    assert codes.threshold == 0
    W[7] = 1.0  # one positive latent in every row: 5 entries kept, fewer than k·N = 15
    codes = sae_fast.batchtopk_encode(x, W, None, 3, backend=backend)
    assert codes.indices.tolist() == [7] * n and codes.row_offsets.tolist() == list(range(n + 1))


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("threshold", [2.0, -1.0, 0.0])
def test_inference_threshold_and_gradients(backend, device, threshold):
    n, d, m = 11, 9, 37
    x, W, b_enc, b_dec = _int_leaves(n, d, m, device, _dtype(backend))
    codes = sae_fast.batchtopk_encode(x, W, b_enc, 4, b_dec=b_dec, threshold=threshold, backend=backend)
    _check_csr(codes, n)
    want, keep = _dense_batch(x, W, b_enc, b_dec, 4, threshold=threshold)
    got, mask = _to_dense(codes, n, m)
    assert torch.equal(mask, keep) and torch.equal(got.detach(), want.detach())
    assert codes.threshold.item() == threshold
    g = torch.randn(n, m, dtype=x.dtype, generator=torch.Generator().manual_seed(6)).to(device)
    for a, b in zip(torch.autograd.grad(got, (x, W, b_enc, b_dec), g), torch.autograd.grad(want, (x, W, b_enc, b_dec), g)):
        torch.testing.assert_close(a, b)


def test_running_threshold_reproduces_training_selection():
    """Inference with (just below) the batch threshold keeps what training kept when there are
    no ties at the threshold."""
    x, W, b = torch.randn(20, 8, dtype=torch.float64), torch.randn(50, 8, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    train = sae_fast.batchtopk_encode(x, W, b, 4)
    infer = sae_fast.batchtopk_encode(x, W, b, 4, threshold=train.threshold - 1e-12)
    assert torch.equal(train.indices, infer.indices) and torch.equal(train.row_offsets, infer.row_offsets)


def test_gradcheck():
    g = torch.Generator().manual_seed(2)
    x, W, b, c = (torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_() for s in ((5, 4), (13, 4), (13,), (4,)))
    f = lambda *a: sae_fast.batchtopk_encode(a[0], a[1], a[2], 3, b_dec=a[3]).values
    assert torch.autograd.gradcheck(f, (x, W, b, c))


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(k=0), ValueError, "k must be"),
        (dict(k=21), ValueError, "k must be"),
        (dict(W_enc=torch.randn(20, 5)), ValueError, "W_enc must be"),
        (dict(b_enc=torch.randn(19)), ValueError, "b_enc must be"),
        (dict(b_dec=torch.randn(5)), ValueError, "b_dec must be"),
        (dict(x=torch.randn(4, 6, dtype=torch.float64)), TypeError, "dtype"),
        (dict(threshold=torch.ones(3)), ValueError, "0-d"),
        (dict(threshold="0.5"), TypeError, "threshold"),
        (dict(threshold=float("nan")), ValueError, "NaN"),
        (dict(threshold=torch.tensor(float("nan"))), ValueError, "NaN"),
        (dict(index_dtype=torch.int16), TypeError, "index_dtype"),
    ],
)
def test_bad_input(change, exc, match):
    args = dict(x=torch.randn(4, 6), W_enc=torch.randn(20, 6), b_enc=torch.randn(20), k=3)
    args.update(change)
    with pytest.raises(exc, match=match):
        sae_fast.batchtopk_encode(args.pop("x"), args.pop("W_enc"), args.pop("b_enc"), args.pop("k"), **args)


def test_opcheck():
    g = torch.Generator().manual_seed(4)
    x, W, b, c = (torch.randn(*s, generator=g).requires_grad_() for s in ((6, 5), (19, 5), (19,), (5,)))
    torch.library.opcheck(batchtopk_encode_op, (x, W, b, c, None, 3, "reference"))
    torch.library.opcheck(batchtopk_encode_op, (x, W, None, None, torch.tensor(0.3), 3, "reference"))


@pytest.mark.parametrize("threshold", [None, 0.2, torch.tensor(0.1)], ids=["train", "float", "tensor"])
def test_compile_fullgraph(threshold):
    g = torch.Generator().manual_seed(4)
    x, W, b = (torch.randn(*s, generator=g).requires_grad_() for s in ((6, 5), (19, 5), (19,)))
    f = lambda x, W, b: sae_fast.batchtopk_encode(x, W, b, 3, threshold=threshold, backend="reference").values.square().sum()
    got = torch.autograd.grad(torch.compile(f, backend="aot_eager", fullgraph=True)(x, W, b), (x, W, b))
    want = torch.autograd.grad(f(x, W, b), (x, W, b))
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c)


# ---- the threshold kernel's capacity retry, and its per-latent thresholds (JumpReLU)

TRITON_DEVICES = [p for p in backend_params() if p.values[0] == "triton"]


@pytest.mark.parametrize("backend,device", TRITON_DEVICES)
@pytest.mark.parametrize("per_latent", [False, True])
@pytest.mark.parametrize("capacity,splits", [(2, 1), (1, 3), (64, 2)])
def test_threshold_kernel_overflow_and_per_latent(backend, device, per_latent, capacity, splits):
    from sae_fast.reference.threshold import threshold_select
    from sae_fast.triton_kernels import threshold_encode as fused

    n, d, m = 13, 10, 70
    x, W, b_enc, b_dec = (t.detach() for t in _int_leaves(n, d, m, device, torch.float32))
    thr = torch.randint(-2, 3, (m,) if per_latent else (), generator=torch.Generator().manual_seed(8)).float().to(device)
    got = fused.threshold_encode(x, W, b_enc, b_dec, thr, capacity=capacity, splits=splits)
    want = threshold_select(x.cpu(), W.cpu(), b_enc.cpu(), b_dec.cpu(), thr.cpu())
    assert want[2].diff().max() > capacity or capacity == 64  # the retry path ran
    for name, a, b in zip(("values", "indices", "row_offsets"), got, want):
        assert torch.equal(a.cpu(), b), name


# ---- GPU tier: the size, exact against a dense selection in the kernel's own
# arithmetic is not available (cuBLAS rounds differently), so: the CSR's invariants, the
# count k·N, the threshold against the candidates, a sample of rows against fp32 dense math,
# and no [N, M] allocation.


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_real_size_gpu(dtype):
    n, d, m, k = 16384, 2304, 131072, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, d, device="cuda", generator=g).to(dtype)
    W = (torch.randn(m, d, device="cuda", generator=g) * d**-0.5).to(dtype)
    b = torch.zeros(m, device="cuda", dtype=dtype)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    codes = sae_fast.batchtopk_encode(x, W, b, k)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < n * m * 2 / 16, f"peak extra memory {extra / 2**20:.0f} MiB: an [N, M] tensor?"
    assert codes.values.numel() == n * k  # random data: far more than k·N positive entries
    assert codes.row_offsets[-1] == n * k and (codes.values >= codes.threshold).all()
    counts = codes.row_offsets.diff()
    assert counts.max() > 2 * k or counts.min() < k  # rows really get different counts
    rows = torch.arange(0, n, 211, device="cuda")
    pre = (x[rows].float() @ W.float().T).to(dtype).float()
    thr = codes.threshold.float()
    margin = 2e-2 * thr.abs() if dtype != torch.float32 else 1e-5 * thr.abs()
    for r in rows.tolist():
        got = set(codes.indices[codes.row_offsets[r]:codes.row_offsets[r + 1]].tolist())
        sure = set(torch.nonzero(pre[r // 211] > thr + margin).view(-1).tolist())  # must be kept
        maybe = set(torch.nonzero(pre[r // 211] >= thr - margin).view(-1).tolist())  # may be kept
        assert sure <= got <= maybe, f"row {r}"
    inf = sae_fast.batchtopk_encode(x, W, b, k, threshold=codes.threshold)
    assert inf.row_offsets[-1] < n * k  # strictly above the smallest kept value


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("threshold", [None, 1.0], ids=["train", "infer"])
def test_strided_weight(backend, device, threshold):
    """A [d, M] storage viewed as [M, d] (SAELens / Gemma Scope layout) selects the same."""
    x, W, b_enc, b_dec = (t.detach() for t in _int_leaves(8, 11, 29, device, _dtype(backend)))
    Wt = W.T.contiguous().T
    assert not Wt.is_contiguous()
    got = sae_fast.batchtopk_encode(x, Wt, b_enc, 3, b_dec=b_dec, threshold=threshold, backend=backend)
    want = sae_fast.batchtopk_encode(x, W, b_enc, 3, b_dec=b_dec, threshold=threshold, backend=backend)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
