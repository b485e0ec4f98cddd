"""sparse_decode: every backend against dense fp64 math, forward and all gradients, edge
cases, bad input, gradcheck, opcheck and torch.compile."""

import pytest
import torch

import sae_fast

from helpers import assert_close, backend_params, major_minor

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (N, k, M, d): odd sizes; k > 16 and d > 256 make the kernels loop over entry and column blocks.
SHAPES = [(7, 5, 13, 37), (3, 1, 2, 1), (9, 33, 50, 300), (1, 4, 4, 8)]


def dense_decode(values, indices, W_dec, bias, dtype):
    """x_hat = codes @ W_dec + bias with the dense [N, M] code matrix (duplicates summed)."""
    n, m = values.shape[0], W_dec.shape[0]
    codes = torch.zeros(n, m, dtype=dtype, device=values.device)
    codes = codes.scatter_add(1, indices.long(), values.to(dtype))
    out = codes @ W_dec.to(dtype)
    return out if bias is None else out + bias.to(dtype)


def make_inputs(n, k, m, d, dtype, device, *, index_dtype=torch.int64, bias=True):
    values = torch.randn(n, k, dtype=dtype, device=device)
    indices = torch.randint(0, m, (n, k), device=device, dtype=index_dtype)
    W_dec = torch.randn(m, d, dtype=dtype, device=device)
    b = torch.randn(d, dtype=dtype, device=device) if bias else None
    return values, indices, W_dec, b


def grads_of(fn, values, W_dec, bias, grad_out):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (values, W_dec, bias)]
    out = fn(leaves[0], leaves[1], leaves[2])
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [t.grad if t is not None else None for t in leaves]


def check_against_dense(backend, values, indices, W_dec, bias):
    dtype = values.dtype
    grad_out = torch.randn(values.shape[0], W_dec.shape[1], dtype=dtype, device=values.device)

    def ours(v, w, b):
        return sae_fast.sparse_decode(v, indices, w, b, backend=backend)

    def dense(precision):
        return lambda v, w, b: dense_decode(v, indices, w, b, precision)

    out, grads = grads_of(ours, values, W_dec, bias, grad_out)
    ref, ref_grads = grads_of(dense(torch.float64), values, W_dec, bias, grad_out)
    plain, plain_grads = (None, [None] * 3)
    if dtype in (torch.float16, torch.bfloat16):
        plain, plain_grads = grads_of(dense(dtype), values, W_dec, bias, grad_out)
    assert out.dtype == dtype
    assert_close(out, ref, plain, "output")
    for name, g, r, p in zip(("values", "W_dec", "bias"), grads, ref_grads, plain_grads):
        if r is not None:
            assert g.dtype == dtype, name
            assert_close(g, r, p, f"grad {name}")


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_dense(backend, device, dtype, shape):
    check_against_dense(backend, *make_inputs(*shape, dtype, device))


@pytest.mark.parametrize("backend,device", backend_params())
def test_int32_indices_no_bias(backend, device):
    check_against_dense(backend, *make_inputs(6, 3, 10, 19, torch.float32, device, index_dtype=torch.int32, bias=False))


@pytest.mark.parametrize("backend,device", backend_params())
def test_duplicates_and_zero_values(backend, device):
    values, indices, W_dec, bias = make_inputs(5, 6, 7, 33, torch.float32, device)
    indices[:, :3] = 4  # the same latent three times in every row
    indices[0] = 2
    values[:, 5] = 0.0
    check_against_dense(backend, values, indices, W_dec, bias)


@pytest.mark.parametrize("backend,device", backend_params())
def test_transposed_weight_view(backend, device):
    values, indices, _, bias = make_inputs(5, 4, 11, 21, torch.float32, device)
    storage = torch.randn(21, 11, device=device)  # [d, M] storage, as in dictionary_learning
    W_dec = storage.t()
    assert not W_dec.is_contiguous()
    check_against_dense(backend, values, indices, W_dec, bias)


@pytest.mark.parametrize("backend,device", backend_params())
def test_strided_values_and_leading_dims(backend, device):
    values, indices, W_dec, bias = make_inputs(6, 8, 9, 17, torch.float32, device)
    v = values[:, ::2]  # non-contiguous
    i = indices[:, ::2]
    out = sae_fast.sparse_decode(v.reshape(2, 3, 4), i.reshape(2, 3, 4), W_dec, bias, backend=backend)
    assert out.shape == (2, 3, 17)
    ref = dense_decode(v, i, W_dec, bias, torch.float64)
    assert_close(out.reshape(6, 17), ref)


@pytest.mark.parametrize("backend,device", backend_params())
def test_empty_batch_and_k_zero(backend, device):
    values, indices, W_dec, bias = make_inputs(0, 4, 9, 17, torch.float32, device)
    W = W_dec.clone().requires_grad_()
    out = sae_fast.sparse_decode(values, indices, W, bias, backend=backend)
    assert out.shape == (0, 17)
    out.sum().backward()
    assert torch.equal(W.grad, torch.zeros_like(W))

    values, indices, W_dec, bias = make_inputs(3, 0, 9, 17, torch.float32, device)
    out = sae_fast.sparse_decode(values, indices, W_dec, bias, backend=backend)
    assert torch.equal(out, bias.expand(3, 17))
    out = sae_fast.sparse_decode(values, indices, W_dec, None, backend=backend)
    assert torch.equal(out, torch.zeros(3, 17, device=device))


@pytest.mark.parametrize("backend,device", backend_params())
def test_weight_grad_deterministic(backend, device):
    values, indices, W_dec, _ = make_inputs(64, 8, 5, 40, torch.float32, device)  # many collisions
    grad_out = torch.randn(64, 40, device=device)
    results = []
    for _ in range(2):
        W = W_dec.clone().requires_grad_()
        sae_fast.sparse_decode(values, indices, W, backend=backend).backward(grad_out)
        results.append(W.grad)
    assert torch.equal(results[0], results[1])


def test_unselected_latents_get_zero_grad():
    values, indices, W_dec, _ = make_inputs(4, 2, 10, 6, torch.float32, "cpu")
    indices[:] = torch.tensor([1, 3])
    W = W_dec.clone().requires_grad_()
    sae_fast.sparse_decode(values, indices, W).sum().backward()
    untouched = [m for m in range(10) if m not in (1, 3)]
    assert torch.equal(W.grad[untouched], torch.zeros(len(untouched), 6))
    assert (W.grad[[1, 3]] != 0).all()


def test_gradcheck_float64():
    values, indices, W_dec, bias = make_inputs(4, 3, 6, 5, torch.float64, "cpu")
    indices[1, 0] = indices[1, 1]  # a duplicate
    args = [t.clone().requires_grad_() for t in (values, W_dec, bias)]
    assert torch.autograd.gradcheck(lambda v, w, b: sae_fast.sparse_decode(v, indices, w, b), args)


@pytest.mark.parametrize("backend,device", backend_params())
def test_opcheck(backend, device):
    values, indices, W_dec, bias = make_inputs(5, 3, 7, 11, torch.float32, device)
    grad = torch.randn(5, 11, device=device)
    ops = torch.ops.sae_fast
    cases = [
        (ops.sparse_decode.default, (values.requires_grad_(), indices, W_dec.requires_grad_(), bias.requires_grad_(), backend, True)),
        (ops.sparse_decode.default, (values.detach(), indices, W_dec.detach(), None, backend, False)),
        (ops.sparse_decode_grad_values.default, (grad, indices, W_dec.detach(), backend)),
        (ops.sparse_decode_grad_weight.default, (grad, values.detach(), indices, 7, backend)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend,device", backend_params())
def test_compile_fullgraph_forward_backward(backend, device):
    values, indices, W_dec, bias = make_inputs(6, 4, 9, 13, torch.float32, device)

    def loss(v, w, b):
        return (sae_fast.sparse_decode(v, indices, w, b, backend=backend) ** 2).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    eager_args = [t.clone().requires_grad_() for t in (values, W_dec, bias)]
    comp_args = [t.clone().requires_grad_() for t in (values, W_dec, bias)]
    loss(*eager_args).backward()
    compiled(*comp_args).backward()
    for a, b in zip(eager_args, comp_args):
        torch.testing.assert_close(b.grad, a.grad)


def _inductor_cannot_use_installed_triton():
    """torch 2.5's inductor imports names triton >= 3.2 removed (torch 2.5 pins triton 3.1):
    with a newer triton beside it (possible with CPU torch wheels) inductor fails upstream."""
    import triton  # a dependency of the package

    return major_minor(torch.__version__) < (2, 6) and major_minor(triton.__version__) >= (3, 2)


@pytest.mark.skipif("_inductor_cannot_use_installed_triton()",
                    reason="torch < 2.6's inductor does not work with triton >= 3.2 (upstream)")
def test_compile_default_backend_inductor_cpu():
    values, indices, W_dec, bias = make_inputs(6, 4, 9, 13, torch.float32, "cpu")
    fn = torch.compile(lambda v, w: sae_fast.sparse_decode(v, indices, w, bias).relu().sum(), fullgraph=True)
    args = [t.clone().requires_grad_() for t in (values, W_dec)]
    fn(*args).backward()
    ref_args = [t.clone().double().requires_grad_() for t in (values, W_dec)]
    dense_decode(ref_args[0], indices, ref_args[1], bias, torch.float64).relu().sum().backward()
    for a, r in zip(args, ref_args):
        assert_close(a.grad, r.grad)


# ---- bad input ----------------------------------------------------------------------------

def _good():
    return make_inputs(4, 3, 6, 5, torch.float32, "cpu")


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: a.update(values=a["values"].long()), TypeError, "values must have dtype"),
        (lambda a: a.update(indices=a["indices"].float()), TypeError, "indices must have dtype"),
        (lambda a: a.update(indices=a["indices"].to(torch.int16)), TypeError, "indices must have dtype"),
        (lambda a: a.update(indices=a["indices"][:, :2]), ValueError, "indices must have the shape"),
        (lambda a: a.update(W_dec=a["W_dec"][0]), ValueError, "W_dec must be 2-D"),
        (lambda a: a.update(W_dec=a["W_dec"].half()), TypeError, "W_dec has dtype"),
        (lambda a: a.update(bias=a["bias"][:4]), ValueError, r"bias must be \[5\]"),
        (lambda a: a.update(bias=a["bias"].double()), TypeError, "bias has dtype"),
        (lambda a: a.update(W_dec="weights"), TypeError, "W_dec must be a torch.Tensor"),
        (lambda a: a.update(W_dec=a["W_dec"].to("meta")), ValueError, "W_dec is on meta"),
        (lambda a: a["indices"].__setitem__((1, 2), 6), IndexError, r"indices must lie in \[0, 6\), found 6"),
        (lambda a: a["indices"].__setitem__((0, 0), -1), IndexError, "found -1"),
        (lambda a: a.update(backend="fast"), ValueError, "backend must be one of"),
        (lambda a: a.update(backend="cuda"), ValueError, "needs CUDA tensors"),
    ],
)
def test_bad_input(mutate, exc, match):
    values, indices, W_dec, bias = _good()
    args = dict(values=values, indices=indices, W_dec=W_dec, bias=bias, backend=None)
    mutate(args)
    with pytest.raises(exc, match=match):
        sae_fast.sparse_decode(args["values"], args["indices"], args["W_dec"], args["bias"], backend=args["backend"])


def test_float64_needs_reference_backend():
    values, indices, W_dec, bias = make_inputs(2, 2, 3, 4, torch.float64, "cpu")
    with pytest.raises(TypeError, match="backend 'triton' supports"):
        sae_fast.sparse_decode(values, indices, W_dec, bias, backend="triton")


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    values, indices, W_dec, bias = _good()
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        sae_fast.sparse_decode(values, indices, W_dec, bias, backend="triton")


def test_env_backend_override(monkeypatch):
    monkeypatch.setenv("SAE_FAST_BACKEND", "reference")
    assert sae_fast._backend.resolve_backend(None, torch.device("cpu"), torch.float32, "x") == "reference"
    monkeypatch.setenv("SAE_FAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="backend must be one of"):
        sae_fast._backend.resolve_backend(None, torch.device("cpu"), torch.float32, "x")


def test_skip_index_check_still_correct_for_valid_indices():
    values, indices, W_dec, bias = _good()
    out = sae_fast.sparse_decode(values, indices, W_dec, bias, check_indices=False)
    assert_close(out, dense_decode(values, indices, W_dec, bias, torch.float64))


def test_ops_are_registered():
    for name in ("sparse_decode", "sparse_decode_grad_values", "sparse_decode_grad_weight"):
        assert hasattr(torch.ops.sae_fast, name), name
