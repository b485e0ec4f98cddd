"""batchtopk_encode: the batch-wide selection (training mode) and the threshold selection
(inference mode) against a dense formulation written from the definition (one [N, M]
matmul, a stable sort of the flattened ReLU: row-major order among ties), exactly, and every
gradient; the capacity-retry paths; bad input; opcheck and compile. Integer-valued inputs
make every pre-activation exact in fp32 and ties common."""

import pytest
import torch

import sae_fast
from sae_fast.ops.batchtopk import batchtopk_encode_op

from helpers import backend_params, fullgraph_dynamic_sizes


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
        winners = torch.sort(flat, descending=True, stable=True).indices[: int(k * x.shape[0])]
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
@pytest.mark.parametrize("n,d,m,k", [(9, 13, 53, 5), (4, 6, 17, 1), (3, 5, 11, 11), (12, 7, 40, 3),
                                     (9, 13, 53, 2.5), (7, 5, 19, 0.3), (3, 5, 11, 10.9)])
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
        (dict(k=20.5), ValueError, "k must be"),
        (dict(k=-1.5), ValueError, "k must be"),
        (dict(k=float("nan")), ValueError, "k must be"),
        (dict(k="3"), ValueError, "k must be"),
        (dict(k=True), ValueError, "k must be"),
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
    dead = torch.zeros(19, dtype=torch.bool)
    dead[[2, 5, 11, 17]] = True
    torch.library.opcheck(batchtopk_encode_op, (x, W, b, c, None, 3, "reference", dead, 6))


@pytest.mark.parametrize("threshold", [None, 0.2, torch.tensor(0.1)], ids=["train", "float", "tensor"])
def test_compile_fullgraph(threshold):
    g = torch.Generator().manual_seed(4)
    x, W, b = (torch.randn(*s, generator=g).requires_grad_() for s in ((6, 5), (19, 5), (19,)))
    f = lambda x, W, b: sae_fast.batchtopk_encode(x, W, b, 3, threshold=threshold, backend="reference").values.square().sum()
    with fullgraph_dynamic_sizes():
        loss = torch.compile(f, backend="aot_eager", fullgraph=True)(x, W, b)
    got = torch.autograd.grad(loss, (x, W, b))
    want = torch.autograd.grad(f(x, W, b), (x, W, b))
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c)


def test_compile_fullgraph_auxk():
    g = torch.Generator().manual_seed(4)
    x, W, b = (torch.randn(*s, generator=g).requires_grad_() for s in ((6, 5), (19, 5), (19,)))
    dead = torch.zeros(19, dtype=torch.bool)
    dead[[0, 5, 11]] = True

    def f(x, W, b):
        c = sae_fast.batchtopk_encode(x, W, b, 3, dead_mask=dead, k_aux=4, backend="reference")
        return c.values.square().sum() + torch.relu(c.aux_values).pow(3).sum()

    with fullgraph_dynamic_sizes():
        loss = torch.compile(f, backend="aot_eager", fullgraph=True)(x, W, b)
    got = torch.autograd.grad(loss, (x, W, b))
    want = torch.autograd.grad(f(x, W, b), (x, W, b))
    assert want[1][[0, 5, 11]].abs().sum() > 0  # the aux term reached the dead latents' rows
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c)


# ---- AuxK: each row's top-k_aux pre-activations among dead latents, as topk_encode returns them


def _dense_aux(x, W, b_enc, b_dec, dead, k_aux):
    """Differentiable explicit AuxK entries: a stable descending sort of the raw pre-activations
    with live latents at -inf (ties: the smaller latent id), the first min(k_aux, #dead)."""
    pre = (x - b_dec) @ W.T + b_enc
    valid = min(k_aux, int(dead.sum()))
    order = torch.sort(pre.detach().masked_fill(~dead, float("-inf")), dim=1, descending=True, stable=True).indices
    idx = order[:, :valid]
    return torch.gather(pre, 1, idx), idx


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("n,d,m,k,dead_ids,k_aux", [
    (9, 13, 53, 5, [0, 3, 4, 9, 20, 21, 22, 40, 52], 4),  # latent 0 dead; more dead than k_aux
    (4, 6, 17, 1, [0, 16], 5),  # fewer dead latents than k_aux: missing slots
    (3, 5, 11, 11, list(range(11)), 11),  # every latent dead, k = k_aux = M
    (12, 7, 40, 3, [7], 1),
])
def test_auxk_entries_and_gradients(backend, device, n, d, m, k, dead_ids, k_aux):
    x, W, b_enc, b_dec = _int_leaves(n, d, m, device, _dtype(backend))  # integer data: many ties
    dead = torch.zeros(m, dtype=torch.bool, device=device)
    dead[dead_ids] = True
    codes = sae_fast.batchtopk_encode(x, W, b_enc, k, b_dec=b_dec, dead_mask=dead, k_aux=k_aux, backend=backend)
    plain = sae_fast.batchtopk_encode(x, W, b_enc, k, b_dec=b_dec, backend=backend)
    for a, b in zip(codes[:4], plain[:4]):  # the batch selection is untouched by AuxK
        assert torch.equal(a, b)
    assert codes.aux_values.shape == codes.aux_indices.shape == (n, k_aux)
    assert codes.aux_indices.dtype == torch.int64 and codes.aux_values.dtype == x.dtype
    want_v, want_i = _dense_aux(x, W, b_enc, b_dec, dead, k_aux)
    valid = want_i.shape[1]
    assert torch.equal(codes.aux_indices[:, :valid], want_i)
    assert torch.equal(codes.aux_values[:, :valid].detach(), want_v.detach())  # raw pre: negatives kept
    assert (codes.aux_values[:, valid:] == 0).all() and (codes.aux_indices[:, valid:] == 0).all()
    # gradients through kept values and aux values together vs the dense formula
    batch_want, keep = _dense_batch(x, W, b_enc, b_dec, k)
    got, _ = _to_dense(codes, n, m)
    gen = torch.Generator().manual_seed(9)
    g = torch.randn(n, m, dtype=x.dtype, generator=gen).to(device)
    ga = torch.randn(n, k_aux, dtype=x.dtype, generator=gen).to(device)
    leaves = (x, W, b_enc, b_dec)
    g_got = torch.autograd.grad((got, codes.aux_values), leaves, (g, ga), retain_graph=True)
    g_want = torch.autograd.grad((batch_want, want_v), leaves, (g, ga[:, :valid]))
    for name, a, b in zip(("x", "W_enc", "b_enc", "b_dec"), g_got, g_want):
        torch.testing.assert_close(a, b, msg=lambda s: f"grad {name}: {s}")
    # the aux values alone reach the encoder (dead latents' rows of W_enc and b_enc)
    g_aux = torch.autograd.grad(codes.aux_values, (W, b_enc), ga)
    assert g_aux[0][dead_ids].abs().sum() > 0 and g_aux[1][dead_ids].abs().sum() > 0
    live = ~dead
    assert (g_aux[0][live] == 0).all() and (g_aux[1][live] == 0).all()


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_auxk_matches_topk_encode(backend, device, dtype):
    """Same aux entries (values, ids, missing slots) as topk_encode in every dtype, random data."""
    g = torch.Generator().manual_seed(11)
    n, d, m = 7, 10, 45
    x, W, b_enc, b_dec = (torch.randn(*s, generator=g).to(device, dtype) for s in ((n, d), (m, d), (m,), (d,)))
    dead = torch.rand(m, generator=g).to(device) < 0.3
    for k_aux in (3, int(dead.sum()) + 2):
        bt = sae_fast.batchtopk_encode(x, W, b_enc, 4, b_dec=b_dec, dead_mask=dead, k_aux=k_aux,
                                       index_dtype=torch.int32, backend=backend)
        tk = sae_fast.topk_encode(x, W, b_enc, 4, b_dec=b_dec, dead_mask=dead, k_aux=k_aux, index_dtype=torch.int32,
                                  backend=backend)
        assert bt.aux_indices.dtype == torch.int32
        assert torch.equal(bt.aux_indices, tk.aux_indices) and torch.equal(bt.aux_values, tk.aux_values)


@pytest.mark.parametrize("backend,device", backend_params())
def test_auxk_survives_the_saturated_row_retry(backend, device):
    """Row 2 takes the whole budget, so its candidate list is recomputed twice: its aux entries
    (and everyone's) must still be the explicit top-k_aux among dead latents."""
    n, d, m, k = 6, 5, 300, 4
    x, W, b_enc, b_dec = (t.detach() for t in _int_leaves(n, d, m, device, _dtype(backend)))
    W = W.abs() + 1
    x = x.abs()
    x[2] += 50.0
    dead = torch.zeros(m, dtype=torch.bool, device=device)
    dead[::7] = True
    codes = sae_fast.batchtopk_encode(x, W, b_enc, k, dead_mask=dead, k_aux=6, backend=backend)
    _, keep = _dense_batch(x, W, b_enc, None, k)
    _, mask = _to_dense(codes, n, m)
    assert keep[2].sum() == n * k and torch.equal(mask, keep)
    want_v, want_i = _dense_aux(x, W, b_enc, torch.zeros_like(x[0]), dead, 6)
    assert torch.equal(codes.aux_indices, want_i) and torch.equal(codes.aux_values, want_v)


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(k_aux=2), ValueError, "needs dead_mask"),
        (dict(k_aux=-1, dead_mask=torch.ones(20, dtype=torch.bool)), ValueError, "k_aux must be"),
        (dict(k_aux=21, dead_mask=torch.ones(20, dtype=torch.bool)), ValueError, "k_aux must be"),
        (dict(k_aux=2.0, dead_mask=torch.ones(20, dtype=torch.bool)), ValueError, "k_aux must be"),
        (dict(k_aux=True, dead_mask=torch.ones(20, dtype=torch.bool)), ValueError, "k_aux must be"),
        (dict(k_aux=2, dead_mask=torch.ones(19, dtype=torch.bool)), ValueError, "dead_mask must be"),
        (dict(k_aux=2, dead_mask=torch.ones(20)), TypeError, "dead_mask"),
        (dict(k_aux=2, dead_mask=torch.ones(4, 5, dtype=torch.bool)), ValueError, "dead_mask"),
        (dict(k_aux=2, dead_mask=torch.ones(20, dtype=torch.bool), threshold=0.5), ValueError, "training mode"),
    ],
)
def test_bad_auxk_input(change, exc, match):
    args = dict(x=torch.randn(4, 6), W_enc=torch.randn(20, 6), b_enc=torch.randn(20), k=3)
    args.update(change)
    with pytest.raises(exc, match=match):
        sae_fast.batchtopk_encode(args.pop("x"), args.pop("W_enc"), args.pop("b_enc"), args.pop("k"), **args)


def test_auxk_dead_mask_on_another_device():
    meta_mask = torch.ones(20, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match="dead_mask is on meta"):
        sae_fast.batchtopk_encode(torch.randn(4, 6), torch.randn(20, 6), None, 3, dead_mask=meta_mask, k_aux=2)


def test_auxk_op_refuses_inference_mode():
    """The op itself (not only the wrapper) refuses AuxK with a threshold."""
    x, W = torch.randn(4, 6), torch.randn(20, 6)
    with pytest.raises(ValueError, match="training mode"):
        batchtopk_encode_op(x, W, None, None, torch.tensor(0.1), 3, "reference", torch.ones(20, dtype=torch.bool), 2)


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
    for a, b in zip(got[:4], want[:4]):
        assert torch.equal(a, b)
    assert got.aux_values is None and got.aux_indices is None


@pytest.mark.parametrize("backend,device", backend_params())
def test_fractional_k_below_one_row(backend, device):
    """k·N < 1 keeps nothing (as SAELens's topk of int(k·N) = 0 entries): empty CSR, threshold 0."""
    x, W, b_enc, b_dec = _int_leaves(3, 5, 11, device, _dtype(backend))
    codes = sae_fast.batchtopk_encode(x, W, b_enc, 0.2, b_dec=b_dec, backend=backend)
    assert codes.values.numel() == 0 and codes.row_offsets.tolist() == [0, 0, 0, 0] and codes.threshold == 0
