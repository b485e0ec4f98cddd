"""JumpReLU encoding and the fused training forward against a dense reference written from the
formulas (one [N, M] matmul, straight-through autograd Functions with the rectangle kernel),
exactly where the data allow it: integer inputs and thresholds on a half-integer grid put
entries exactly at θ and at θ ± ε/2."""

import pytest
import torch

import sae_fast
from sae_fast.ops.jumprelu import jumprelu_gate_op, jumprelu_l0_op, jumprelu_select_op

from helpers import backend_params, fullgraph_dynamic_sizes


def _rect(u):
    return (u.abs() < 0.5).to(u.dtype)


class _Jump(torch.autograd.Function):
    """f = pre·H(pre - θ); ∂pre = g·H, ∂θ = Σ_n g·(-(θ/ε))·K((pre-θ)/ε)."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        k = _rect((pre - theta) / ctx.eps)
        return g * (pre > theta).to(g.dtype), (-(theta / ctx.eps) * k * g).sum(0), None


class _Step(torch.autograd.Function):
    """H(pre - θ); no gradient to pre, ∂θ = Σ_n g·(-(1/ε))·K((pre-θ)/ε)."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        return None, (-(1 / ctx.eps) * _rect((pre - theta) / ctx.eps) * g).sum(0), None


def _dense_training(x, W_enc, b_enc, theta, W_dec, b_dec, eps, apply_b_dec=True):
    pre = ((x - b_dec) if apply_b_dec else x) @ W_enc.T + b_enc
    x_hat = _Jump.apply(pre, theta, eps) @ W_dec + b_dec
    l0 = _Step.apply(pre, theta, eps).sum(1).mean()
    return x_hat, l0


def _leaves(n, d, m, device, dtype, seed=0, d_out=None):
    g = torch.Generator().manual_seed(seed)
    ints = lambda lo, hi, *s: torch.randint(lo, hi, s, generator=g).to(dtype)
    x, W_enc, b_enc, b_dec = ints(-2, 3, n, d), ints(-2, 3, m, d), ints(-2, 3, m), ints(-1, 2, d_out or d)
    theta = ints(0, 7, m) / 2  # 0, 0.5, ..., 3: pre lands exactly on θ and on θ ± 1/2
    W_dec = torch.randn(m, d_out or d, generator=g, dtype=torch.float64).to(dtype)
    return [t.to(device).requires_grad_() for t in (x, W_enc, b_enc, theta, W_dec, b_dec)]


def _dtype(backend):
    return torch.float64 if backend == "reference" else torch.float32


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("n,d,m,eps", [(9, 7, 45, 1.0), (5, 11, 33, 0.05), (13, 6, 70, 3.0)])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_training_forward_and_every_gradient(backend, device, n, d, m, eps, apply_b_dec):
    leaves = _leaves(n, d, m, device, _dtype(backend))
    x_hat, l0 = sae_fast.jumprelu_training_forward(*leaves, bandwidth=eps, apply_b_dec_to_input=apply_b_dec,
                                                    backend=backend)
    want_x_hat, want_l0 = _dense_training(*leaves, eps, apply_b_dec)
    torch.testing.assert_close(x_hat, want_x_hat)
    torch.testing.assert_close(l0, want_l0)
    w = torch.randn(x_hat.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device, x_hat.dtype)
    loss = lambda xh, l: (w * xh).sum() + 0.7 * l
    got = torch.autograd.grad(loss(x_hat, l0), leaves)
    want = torch.autograd.grad(loss(want_x_hat, want_l0), leaves)
    names = ("x", "W_enc", "b_enc", "threshold", "W_dec", "b_dec")
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, msg=lambda s: f"grad {name}: {s}")
    assert got[3].abs().sum() > 0  # the threshold really received straight-through gradient


@pytest.mark.parametrize("backend,device", backend_params())
def test_edge_rows_and_zero_threshold(backend, device):
    """pre[n, m] = x[n, 0] + b_enc[m]: row 0 entirely inactive, row 1 entirely active, rows
    2-3 on the θ grid; θ = 0 for a third of the latents; a transcoder (d_out = 3)."""
    n, d, m = 4, 5, 24
    leaves = _leaves(n, d, m, device, _dtype(backend), d_out=3)
    x, W_enc, b_enc, theta, W_dec, b_dec = leaves
    with torch.no_grad():
        W_enc.zero_()
        W_enc[:, 0] = 1.0
        x[:, 0] = torch.tensor([-100.0, 100.0, 1.0, 2.0], device=device)
        b_enc.copy_(torch.arange(m, device=device) % 5 - 2.0)
        theta[: m // 3] = 0.0
    x_hat, l0 = sae_fast.jumprelu_training_forward(*leaves, bandwidth=1.0, apply_b_dec_to_input=False, backend=backend)
    want = _dense_training(*leaves, 1.0, False)
    torch.testing.assert_close(x_hat, want[0])
    torch.testing.assert_close(l0, want[1])
    torch.testing.assert_close(x_hat[0], b_dec.detach())  # nothing active in row 0
    got_g = torch.autograd.grad(x_hat.sum() + l0, leaves)
    want_g = torch.autograd.grad(want[0].sum() + want[1], leaves)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dense", [False, True], ids=["csr", "dense"])
def test_encode_values_indices_and_gradients(backend, device, dense):
    n, d, m = 10, 9, 41
    x, W_enc, b_enc, theta, _, b_dec = _leaves(n, d, m, device, _dtype(backend), seed=3)
    theta = (theta.detach() - 1.0)  # some θ < 0: the ReLU rule decides there
    got = sae_fast.jumprelu_encode(x, W_enc, b_enc, theta, b_dec=b_dec, dense=dense, backend=backend)
    pre = (x - b_dec) @ W_enc.T + b_enc
    want = torch.relu(pre) * (pre > theta).to(pre.dtype)
    if dense:
        dense_got = got
    else:
        rows = torch.repeat_interleave(torch.arange(n, device=device), got.row_offsets.diff())
        dense_got = x.new_zeros(n, m).index_put((rows, got.indices), got.values)
        mask = torch.zeros(n, m, dtype=torch.bool, device=device)
        mask[rows, got.indices] = True
        assert torch.equal(mask, want.detach() > 0)
    assert torch.equal(dense_got.detach(), want.detach())
    g = torch.randn(n, m, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(device, x.dtype)
    for a, b in zip(torch.autograd.grad(dense_got, (x, W_enc, b_enc, b_dec), g),
                    torch.autograd.grad(want, (x, W_enc, b_enc, b_dec), g)):
        torch.testing.assert_close(a, b)


def test_encode_refuses_a_threshold_that_wants_grad():
    x, W, b, theta, _, _ = _leaves(3, 4, 8, "cpu", torch.float64)
    with pytest.raises(ValueError, match="jumprelu_training_forward"):
        sae_fast.jumprelu_encode(x, W, b, theta)
    sae_fast.jumprelu_encode(x, W, b, theta.detach())
    with torch.no_grad():
        sae_fast.jumprelu_encode(x, W, b, theta)


@pytest.mark.parametrize("bandwidth", [0.0, -0.1, float("nan"), float("inf"), "0.05", True])
def test_bandwidth_validation(bandwidth):
    with pytest.raises(ValueError, match="bandwidth"):
        sae_fast.jumprelu_training_forward(*_leaves(3, 4, 8, "cpu", torch.float64), bandwidth=bandwidth)


@pytest.mark.parametrize(
    "fn,change,match",
    [
        ("encode", dict(threshold=torch.rand(7)), "threshold must be"),
        ("encode", dict(W_enc=torch.randn(8, 5)), "W_enc must be"),
        ("encode", dict(b_dec=torch.randn(3)), "b_dec must be"),
        ("train", dict(W_dec=torch.randn(7, 4)), "W_dec must be"),
        ("train", dict(b_dec=torch.randn(5)), "b_dec must be"),
        ("train", dict(W_dec=torch.randn(8, 6), b_dec=torch.randn(6)), "d_out == d_in"),
    ],
)
def test_bad_input(fn, change, match):
    args = dict(x=torch.randn(3, 4), W_enc=torch.randn(8, 4), b_enc=torch.randn(8), threshold=torch.rand(8))
    if fn == "encode":
        args.update(change)
        with pytest.raises(ValueError, match=match):
            sae_fast.jumprelu_encode(args.pop("x"), args.pop("W_enc"), args.pop("b_enc"), args.pop("threshold"), **args)
    else:
        args.update(W_dec=torch.randn(8, 4), b_dec=torch.randn(4))
        args.update(change)
        with pytest.raises(ValueError, match=match):
            sae_fast.jumprelu_training_forward(**args)


def test_opcheck():
    x, W, b, theta, W_dec, b_dec = (t.detach().float().requires_grad_() for t in _leaves(6, 5, 19, "cpu", torch.float64))
    torch.library.opcheck(jumprelu_select_op, (x, W, b, b_dec, theta, 0.5, False, False, "reference"))
    torch.library.opcheck(jumprelu_select_op, (x, W, b, None, theta.detach(), None, True, True, "reference"))
    pre, idx, _, _ = jumprelu_select_op(x, W, b, b_dec, theta, 0.5, False, False, "reference")
    pre = pre.detach().requires_grad_()
    torch.library.opcheck(jumprelu_gate_op, (pre, idx, theta, 1.0))
    torch.library.opcheck(jumprelu_l0_op, (pre, idx, theta, 1.0, 6))


def test_compile_fullgraph():
    leaves = [t.detach().float().requires_grad_() for t in _leaves(6, 5, 19, "cpu", torch.float64)]

    def f(*a):
        x_hat, l0 = sae_fast.jumprelu_training_forward(*a, bandwidth=1.0, backend="reference")
        return (x_hat - a[0]).square().sum() + 0.1 * l0

    with fullgraph_dynamic_sizes():
        loss = torch.compile(f, backend="aot_eager", fullgraph=True)(*leaves)
    got = torch.autograd.grad(loss, leaves)
    want = torch.autograd.grad(f(*leaves), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# ---- GPU tier at Gemma Scope sizes: the training forward against dense math on a sample of
# rows (half-precision GEMMs round differently, so entries within rounding of θ may flip),
# exact L0 bookkeeping; and, separately, no [N, M] allocation.


def _gemma_scope_leaves(n, d, m, dtype, theta):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, d, device="cuda", generator=g).to(dtype)
    W_enc = (torch.randn(m, d, device="cuda", generator=g) * d**-0.5).to(dtype)  # pre ~ N(0, 1)
    W_dec = (torch.randn(m, d, device="cuda", generator=g) * d**-0.5).to(dtype)
    b_enc = torch.zeros(m, device="cuda", dtype=dtype)
    b_dec = torch.zeros(d, device="cuda", dtype=dtype)
    threshold = torch.full((m,), theta, device="cuda", dtype=dtype)
    return [t.requires_grad_() for t in (x, W_enc, b_enc, threshold, W_dec, b_dec)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_no_dense_allocation_gpu(dtype):
    """Peak memory of forward + backward beyond the gradients is the output, a few [N, d]
    fp32 workspaces, the selection's per-row first-guess buffers and a bounded cost per listed
    entry; the bound is checked to lie well under one [N, M] tensor, so one would fail it."""
    n, d, m = 4096, 2304, 131072
    leaves = _gemma_scope_leaves(n, d, m, dtype, theta=3.0)  # ~0.15% active: L0 ~ 190
    grad_x_hat = torch.randn(n, d, device="cuda", dtype=dtype)  # the loss's gradient, made up front
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    x_hat, l0, codes = sae_fast.jumprelu_training_forward(*leaves, bandwidth=0.05, return_codes=True)
    torch.autograd.backward([x_hat, l0], [grad_x_hat, torch.ones_like(l0)])
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    listed = codes.indices.numel()
    grads_bytes = sum(t.numel() * t.element_size() for t in leaves)
    bound = (grads_bytes + x_hat.numel() * x_hat.element_size() + 2 * n * d * 4  # output, fp32 workspaces
             + n * 512 * 16  # the selection's first-guess buffers (512 entries a row)
             + 64 * listed)  # per listed entry: values, indices, gradients, the latent-major order
    one_dense = n * m * leaves[0].element_size()
    assert bound - grads_bytes < one_dense / 2, "the bound could not catch an [N, M] tensor at this size"
    assert extra < bound, (f"peak extra memory {(extra - grads_bytes) / 2**20:.0f} MiB beyond the gradients for "
                           f"{listed} listed entries (bound {(bound - grads_bytes) / 2**20:.0f} MiB): an [N, M] tensor?")


def _check_against_own_selection(leaves, x_hat, l0, codes, rows, sel_tol, val_rtol, out_tol):
    """Half-precision GEMMs round ``pre`` differently from exact math, so entries within
    rounding of θ may land on either side, and each flip moves x̂ by θ·W_dec[m] (at θ = 2.5 a
    few flips among a hundred actives are a ~10% change of x̂). So: the kernel's own active set
    may differ from exact ``pre > θ`` only within ``sel_tol`` of θ; its values are ``pre``
    rounded; x̂ is exact math over its own active set; l0 counts that set."""
    x, W_enc, b_enc, theta, W_dec, b_dec = [t.detach().double() for t in leaves]
    n = x.shape[0]
    pre = (x[rows] - b_dec) @ W_enc.T + b_enc  # fp64 from the same (rounded) inputs
    ro = codes.row_offsets
    counts = ro[1:] - ro[:-1]
    entry_row = torch.repeat_interleave(torch.arange(n, device=ro.device), counts)
    pos = torch.full((n,), -1, dtype=torch.int64, device=ro.device)
    pos[rows] = torch.arange(rows.numel(), device=ro.device)
    mine = pos[entry_row] >= 0
    active = torch.zeros_like(pre, dtype=torch.bool)
    got = torch.zeros_like(pre)
    on = mine & (codes.values != 0)  # listed inactive near-threshold entries carry f = 0
    active[pos[entry_row[on]], codes.indices[on]] = True
    got[pos[entry_row[on]], codes.indices[on]] = codes.values[on].double()
    flips = active != (pre > theta)
    assert not flips.any() or (pre - theta).abs()[flips].max() < sel_tol, "an entry far from θ was misclassified"
    torch.testing.assert_close(got[active], pre[active], rtol=val_rtol, atol=1e-5)
    want = (pre * active) @ W_dec + b_dec
    err = (x_hat[rows].double() - want).norm() / want.norm()
    assert err < out_tol, f"x_hat rel. error {err:.2e} against exact math over the kernel's own selection"
    assert l0.item() == pytest.approx((codes.values != 0).sum().item() / n, rel=1e-6)
    assert leaves[3].grad.abs().sum() > 0 and torch.isfinite(leaves[3].grad).all()
    return int(flips.sum())


def test_own_selection_check_bf16_reference():
    """The check above on the torch reference in bf16, where flips do happen (so the check is
    exercised where a GPU is not)."""
    n, d, m = 64, 96, 300
    g = torch.Generator().manual_seed(0)
    leaves = [t.to(torch.bfloat16).requires_grad_() for t in (
        torch.randn(n, d, generator=g), torch.randn(m, d, generator=g) * d**-0.5, torch.zeros(m),
        torch.full((m,), 1.0), torch.randn(m, d, generator=g) * d**-0.5, torch.zeros(d))]
    x_hat, l0, codes = sae_fast.jumprelu_training_forward(*leaves, bandwidth=0.05, return_codes=True,
                                                           backend="reference")
    (x_hat.float().square().sum() + l0).backward()
    flips = _check_against_own_selection(leaves, x_hat, l0, codes, torch.arange(0, n, 3), sel_tol=2**-7,
                                         val_rtol=2**-8, out_tol=1e-2)
    assert flips > 0  # else this test shows nothing about rounding near θ


@pytest.mark.gpu
@pytest.mark.parametrize("m", [16384, 131072])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gemma_scope_size_gpu(m, dtype):
    n, d = 4096, 2304
    # θ = 2.5: ~0.6% of N(0,1) entries active, ~800 a row at M = 131072, beyond the
    # selection's first guess of 512 a row, so its recompute path runs too.
    leaves = _gemma_scope_leaves(n, d, m, dtype, theta=2.5)
    x_hat, l0, codes = sae_fast.jumprelu_training_forward(*leaves, bandwidth=0.05, return_codes=True)
    (x_hat.float().square().sum() + l0).backward()
    rows = torch.arange(0, n, 97, device="cuda")
    if dtype == torch.float32:  # tf32-free fp32: at most a handful of flips, at 1e-4 of θ
        _check_against_own_selection(leaves, x_hat, l0, codes, rows, sel_tol=1e-4, val_rtol=1e-5, out_tol=1e-4)
    else:  # bf16 rounds pre near θ = 2.5 to steps of 2^-6
        _check_against_own_selection(leaves, x_hat, l0, codes, rows, sel_tol=2**-6, val_rtol=2**-8, out_tol=1e-2)
