"""Backend/device parametrisation and tolerance rules shared by the op tests.

Tolerances (shared DESIGN): fp32 against an fp64 reference tightly; fp16/bf16 at most twice
the error that plain torch makes on the same computation in that dtype, both measured
against the fp64 reference (relative Frobenius error)."""

import contextlib
import os

import pytest
import torch

FP32_RTOL = 2e-6


def major_minor(version: str) -> tuple:
    """``"2.14.1+cu130"`` -> ``(2, 14)``: for gating tests on torch / triton versions."""
    return tuple(int(p) for p in version.split("+")[0].split(".")[:2])


def fullgraph_dynamic_sizes():
    """Context for ``torch.compile(fullgraph=True)`` of ops whose output size depends on the
    data (BatchTopK's kept entries, JumpReLU's select): torch >= 2.10 turns
    ``capture_dynamic_output_shape_ops`` on for fullgraph itself (pytorch#163123); older
    torch needs it set, as users of those versions must (see README)."""
    if major_minor(torch.__version__) >= (2, 10):
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True)


def on_grid(t: torch.Tensor, step_log2: int, bound: float) -> torch.Tensor:
    """``t`` rounded to multiples of ``2**-step_log2`` in ``[-bound, bound]``. Test inputs on
    such grids make every dot product exact in fp32, so two kernels that tile a GEMM
    differently must agree bit for bit under Triton's interpreter: its ``tl.dot`` is numpy's
    matmul, whose float32 rounding depends on the tile's shape and the CPU (OpenBLAS picks
    the kernel and blocking by both), so random data is bit-equal on some machines only."""
    scale = 2.0 ** step_log2
    return (t * scale).round().clamp(-bound * scale, bound * scale) / scale


def backend_params():
    """(backend, device) pairs: one test body runs them all."""
    params = [pytest.param("reference", "cpu", id="reference-cpu")]
    if os.environ.get("TRITON_INTERPRET") == "1":
        params.append(pytest.param("triton", "cpu", id="triton-interp"))
    params += [
        pytest.param("reference", "cuda", id="reference-cuda", marks=pytest.mark.gpu),
        pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.gpu),
        pytest.param("cuda", "cuda", id="cuda-cuda", marks=[pytest.mark.gpu, pytest.mark.cuda_ext]),
        pytest.param("fastest", "cuda", id="fastest-cuda", marks=[pytest.mark.gpu, pytest.mark.cuda_ext]),
    ]
    return params


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x = x.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    assert torch.isfinite(x).all(), "non-finite values in output (unwritten or NaN-poisoned elements?)"
    denom = ref.norm().item()
    return (x - ref).norm().item() / (denom if denom > 0 else 1.0)


def assert_close(out: torch.Tensor, ref64: torch.Tensor, plain: torch.Tensor = None, what: str = "output"):
    """``plain``: the same computation done by plain torch in ``out``'s dtype (needed for
    fp16/bf16)."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    err = rel_err(out, ref64)
    if out.dtype in (torch.float32, torch.float64):
        assert err <= FP32_RTOL, f"{what}: relative error {err:.3e} > {FP32_RTOL:.0e}"
        return
    assert plain is not None, "fp16/bf16 comparisons need the plain-torch result"
    bound = 2 * rel_err(plain, ref64)
    # An exactly representable result makes plain torch's error 0; allow one rounding then.
    bound = max(bound, torch.finfo(out.dtype).eps / 2)
    assert err <= bound, f"{what}: relative error {err:.3e} > 2x plain torch ({bound:.3e})"


def import_dictionary_learning():
    """``pytest.importorskip("dictionary_learning")``, then torch put back as it was.

    dictionary_learning imports nnsight (0.3), which at import replaces torch attributes for
    the whole process, among them ``FakeTensor.__new__`` with a wrapper that rejects the
    ``pytype`` argument of current torch: every opcheck and torch.compile of a custom op in
    the same process then fails. pytest imports every test module before running any, so
    without this the whole session would be affected. Our tests never trace with nnsight."""
    import sys

    module = pytest.importorskip("dictionary_learning")
    nnsight = sys.modules.get("nnsight")
    patcher = getattr(nnsight, "DEFAULT_PATCHER", None)
    if patcher is not None:
        patcher.__exit__(None, None, None)
    return module
