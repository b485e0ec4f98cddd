"""topk_encode: selection and every gradient against a dense autograd formulation (one
[N, M] matmul + sort), AuxK, bad input, opcheck and compile. CPU backends here; the fused
kernel and the GPU tier come with the Triton kernel."""

import pytest
import torch

import sae_fast
from sae_fast.ops.topk import topk_encode_op

from helpers import backend_params


def _dense(x, W, b_enc, b_dec, k, dead=None, k_aux=0):
    """Differentiable dense reference: values/indices by a stable sort (ties: smaller id)."""
    pre = (x - b_dec) @ W.T + b_enc
    order = torch.sort(pre.detach(), dim=1, descending=True, stable=True).indices
    idx = order[:, :k]
    out = [torch.relu(torch.gather(pre, 1, idx)), idx]
    if k_aux:
        dpre = pre.masked_fill(~dead, float("-inf"))
        aidx = torch.sort(dpre.detach(), dim=1, descending=True, stable=True).indices[:, :k_aux]
        out += [torch.gather(pre, 1, aidx), aidx]
    return out


def _leaves(n, d, m, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(1)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_()
    return mk(n, d), mk(m, d), mk(m), mk(d)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("n,d,m,k", [(7, 13, 53, 5), (3, 5, 9, 9), (4, 6, 17, 1)])
def test_values_indices_and_gradients(backend, device, n, d, m, k):
    x, W, b_enc, b_dec = _leaves(n, d, m, device=device)
    dtype = torch.float64 if backend == "reference" else torch.float32
    x, W, b_enc, b_dec = (t.detach().to(dtype).requires_grad_() for t in (x, W, b_enc, b_dec))
    got = sae_fast.topk_encode(x, W, b_enc, k, b_dec=b_dec, backend=backend)
    want = _dense(x, W, b_enc, b_dec, k)
    assert torch.equal(got.indices, want[1])
    torch.testing.assert_close(got.values, want[0])
    gv = torch.randn_like(got.values)
    g_got = torch.autograd.grad(got.values, (x, W, b_enc, b_dec), gv)
    g_want = torch.autograd.grad(want[0], (x, W, b_enc, b_dec), gv)
    for name, a, b in zip(("x", "W_enc", "b_enc", "b_dec"), g_got, g_want):
        torch.testing.assert_close(a, b, msg=lambda s: f"grad {name}: {s}")


def test_aux_gradients_and_missing_slots():
    n, d, m = 5, 7, 30
    x, W, b_enc, b_dec = _leaves(n, d, m)
    dead = torch.zeros(m, dtype=torch.bool)
    dead[[0, 4, 11]] = True  # latent 0 dead: a missing slot's index 0 must not double its gradient
    got = sae_fast.topk_encode(x, W, b_enc, 4, b_dec=b_dec, dead_mask=dead, k_aux=5)
    want = _dense(x, W, b_enc, b_dec, 4, dead, 3)
    assert torch.equal(got.aux_indices[:, :3], want[3])
    torch.testing.assert_close(got.aux_values[:, :3], want[2])
    assert (got.aux_values[:, 3:] == 0).all() and (got.aux_indices[:, 3:] == 0).all()
    gv, ga = torch.randn_like(got.values), torch.randn_like(got.aux_values)
    g_got = torch.autograd.grad((got.values, got.aux_values), (x, W, b_enc, b_dec), (gv, ga))
    g_want = torch.autograd.grad((want[0], want[2]), (x, W, b_enc, b_dec), (gv, ga[:, :3]))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


def test_gradcheck():
    x, W, b_enc, b_dec = _leaves(4, 5, 11)
    f = lambda *a: sae_fast.topk_encode(a[0], a[1], a[2], 3, b_dec=a[3]).values
    assert torch.autograd.gradcheck(f, (x, W, b_enc, b_dec))


def test_rows_with_few_positive_and_ties():
    x = torch.ones(3, 4, dtype=torch.float64)
    W = torch.zeros(10, 4, dtype=torch.float64)
    W[7] = 1.0
    W[[2, 5]] = -1.0
    codes = sae_fast.topk_encode(x, W, None, 4)
    assert codes.indices[0].tolist() == [7, 0, 1, 3]  # one positive, then zeros by id
    assert codes.values[0].tolist() == [4.0, 0.0, 0.0, 0.0]


def test_int32_indices_and_transposed_weight():
    x, W, b_enc, b_dec = _leaves(4, 6, 20)
    Wt = W.detach().T.contiguous().T  # [M, d] view of a [d, M] storage
    codes = sae_fast.topk_encode(x.detach(), Wt, b_enc.detach(), 3, index_dtype=torch.int32)
    want = _dense(x.detach(), W.detach(), b_enc.detach(), 0, 3)
    assert codes.indices.dtype == torch.int32 and torch.equal(codes.indices.long(), want[1])


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(k=0), ValueError, "k must be"),
        (dict(k=21), ValueError, "k must be"),
        (dict(k_aux=2), ValueError, "needs dead_mask"),
        (dict(W_enc=torch.randn(20, 5)), ValueError, "W_enc must be"),
        (dict(b_enc=torch.randn(19)), ValueError, "b_enc must be"),
        (dict(x=torch.randn(4, 6, dtype=torch.float64)), TypeError, "dtype"),
        (dict(dead_mask=torch.zeros(20)), TypeError, "dead_mask"),
        (dict(index_dtype=torch.int16), TypeError, "index_dtype"),
    ],
)
def test_bad_input(change, exc, match):
    args = dict(x=torch.randn(4, 6), W_enc=torch.randn(20, 6), b_enc=torch.randn(20), k=3)
    args.update(change)
    with pytest.raises(exc, match=match):
        sae_fast.topk_encode(args.pop("x"), args.pop("W_enc"), args.pop("b_enc"), args.pop("k"), **args)


def test_opcheck():
    x, W, b_enc, b_dec = (t.detach().float().requires_grad_() for t in _leaves(5, 6, 19))
    dead = torch.rand(19) < 0.3
    torch.library.opcheck(topk_encode_op, (x, W, b_enc, b_dec, dead, 4, 3, "reference"))
    torch.library.opcheck(topk_encode_op, (x, W, None, None, None, 2, 0, "reference"))


def test_compile_fullgraph():
    x, W, b_enc, b_dec = (t.detach().float().requires_grad_() for t in _leaves(5, 6, 19))
    f = lambda x, W, b, c: sae_fast.topk_encode(x, W, b, 3, b_dec=c, backend="reference").values.sum()
    got = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(x, W, b_enc, b_dec), (x, W))
    want = torch.autograd.grad(f(x, W, b_enc, b_dec), (x, W))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# ---- the fused Triton kernel (interpreter on CPU, compiled on GPU) vs the reference, exactly:
# integer-valued inputs make every pre-activation exact in fp32 and ties common.

TRITON_DEVICES = [p for p in backend_params() if p.values[0] == "triton"]


def _int_inputs(n, d, m, device, negative_rows=False):
    g = torch.Generator().manual_seed(3)
    ints = lambda lo, hi, *s: torch.randint(lo, hi, s, generator=g).float().to(device)
    x, W, b_enc, b_dec = ints(-3, 4, n, d), ints(-3, 4, m, d), ints(-2, 3, m), ints(-1, 2, d)
    if negative_rows:
        x[0] = b_dec  # row 0: x - b_dec = 0, so pre = b_enc, all negative
        b_enc = -b_enc.abs() - 1
    return x, W, b_enc, b_dec


@pytest.mark.parametrize("backend,device", TRITON_DEVICES)
@pytest.mark.parametrize("n,d,m,k,splits", [(19, 37, 70, 5, None), (5, 9, 33, 33, None), (17, 20, 101, 1, 3),
                                            (9, 50, 200, 20, 4), (3, 7, 40, 8, 2)])
@pytest.mark.parametrize("sort_above", [None, 0, 10**6], ids=["default", "always-sort", "never-sort"])
def test_fused_kernel_matches_reference_exactly(backend, device, n, d, m, k, splits, sort_above):
    """Both ways of folding a tile into the running list (a sort-merge, or candidate by
    candidate) must select exactly what the reference selects."""
    from sae_fast.triton_kernels import topk_encode as fused

    x, W, b_enc, b_dec = _int_inputs(n, d, m, device, negative_rows=True)
    dead = torch.rand(m, generator=torch.Generator().manual_seed(4)) < 0.15
    dead = dead.to(device)
    k_aux = min(6, m)
    config = None if sort_above is None else dict(sort_above=sort_above)
    got = fused.topk_encode(x, W, b_enc, b_dec, k, dead, k_aux, splits=splits, config=config)
    want = topk_encode_op(x.cpu(), W.cpu(), b_enc.cpu(), b_dec.cpu(), dead.cpu(), k, k_aux, "reference")
    for name, a, b in zip(("pre", "indices", "aux_pre", "aux_indices"), got, want):
        assert torch.equal(a.cpu(), b), name
    assert (got[0][0] < 0).all()  # the all-negative row keeps its k largest (negative) pre


@pytest.mark.parametrize("backend,device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fused_kernel_16bit_weights_select_like_fp32(backend, device, dtype):
    """Small integers are exact in 16 bits and their products and sums exact in fp32, so the
    16-bit kernel (tensor cores on GPU, widened operands in the interpreter) must select the
    fp32 kernel's latents and return its values rounded to the 16-bit dtype."""
    from sae_fast.triton_kernels import topk_encode as fused

    x, W, b_enc, b_dec = _int_inputs(13, 24, 90, device)
    want = fused.topk_encode(x, W, b_enc, b_dec, 6)
    got = fused.topk_encode(*(t.to(dtype) for t in (x, W, b_enc, b_dec)), 6)
    assert got[0].dtype == dtype
    assert torch.equal(got[1], want[1])
    assert torch.equal(got[0], want[0].to(dtype))


@pytest.mark.parametrize("backend,device", TRITON_DEVICES)
def test_fused_kernel_strided_weight_and_no_biases(backend, device):
    from sae_fast.triton_kernels import topk_encode as fused

    x, W, _, _ = _int_inputs(11, 24, 45, device)
    Wt = W.T.contiguous().T  # [M, d] view of a [d, M] storage
    got = fused.topk_encode(x, Wt, None, None, 7, splits=2)
    want = topk_encode_op(x.cpu(), W.cpu(), None, None, None, 7, 0, "reference")
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])


@pytest.mark.parametrize("backend,device", TRITON_DEVICES)
@pytest.mark.parametrize("order", ["ascending", "descending"])
def test_fused_kernel_monotone_latent_order(backend, device, order):
    """pre rising with the latent id makes every tile's entries all candidates (the worst
    case for the running list); falling, none after the first tile."""
    from sae_fast.triton_kernels import topk_encode as fused

    n, d, m, k = 6, 3, 150, 9
    x = torch.ones(n, d, device=device)
    x[:, 0] = torch.arange(1, n + 1, device=device)
    ramp = torch.arange(m, device=device, dtype=torch.float32)
    W = torch.zeros(m, d, device=device)
    W[:, 0] = ramp if order == "ascending" else -ramp
    got = fused.topk_encode(x, W, None, None, k)
    want = topk_encode_op(x.cpu(), W.cpu(), None, None, None, k, 0, "reference")
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])


# ---- GPU tier: the real size, and no [N, M] allocation.


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
    codes = sae_fast.topk_encode(x, W, b, k)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < n * m * 2 / 16, f"peak extra memory {extra / 2**20:.0f} MiB: an [N, M] tensor?"
    rows = torch.arange(0, n, 97, device="cuda")  # check a sample of rows against fp32 dense math
    pre = x[rows].float() @ W.float().T
    want = torch.topk(pre, k, dim=1)
    torch.testing.assert_close(codes.values[rows].float(), want.values.relu(), rtol=2e-2, atol=2e-2)
    overlap = (codes.indices[rows].unsqueeze(2) == want.indices.unsqueeze(1)).any(2).float().mean()
    assert overlap > 0.97  # rounding of half-precision operands may swap near-ties only
