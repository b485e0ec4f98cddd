"""The compiled extension: it builds, imports, declares its schemas, and its CPU (reference)
and fake kernels work, all without a GPU."""

import pytest
import torch

import sae_fast
from sae_fast.reference import sparse_gather as ref

pytestmark = pytest.mark.cuda_ext


def test_extension_loads_and_declares_schemas():
    assert sae_fast.cuda_extension_available()
    import importlib

    importlib.import_module("sae_fast._C")

    schemas = {
        "csr_gather_sum": "sae_fast::csr_gather_sum(Tensor coef, Tensor col, Tensor? row_offsets, SymInt num_rows, Tensor src, Tensor? bias) -> Tensor",
        "gathered_dot": "sae_fast::gathered_dot(Tensor grad, Tensor col, Tensor src) -> Tensor",
    }
    for name, schema in schemas.items():
        got = str(getattr(torch.ops.sae_fast, name).default._schema)
        assert got.replace("SymInt", "int") == schema.replace("SymInt", "int"), got


def _inputs(device="cpu"):
    coef = torch.randn(12, device=device)
    col = torch.randint(0, 7, (12,), device=device)
    src = torch.randn(7, 9, device=device)
    bias = torch.randn(9, device=device)
    offsets = torch.tensor([0, 3, 3, 10, 12], device=device)
    return coef, col, offsets, src, bias


def test_cpu_kernels_are_the_reference():
    coef, col, offsets, src, bias = _inputs()
    got = torch.ops.sae_fast.csr_gather_sum(coef, col, offsets, 4, src, bias)
    torch.testing.assert_close(got, ref.csr_gather_sum(coef, col, offsets, 4, src, bias))
    got = torch.ops.sae_fast.csr_gather_sum(coef, col, None, 3, src, None)
    torch.testing.assert_close(got, ref.csr_gather_sum(coef, col, None, 3, src, None))
    grad = torch.randn(3, 9)
    col2 = col.view(3, 4)
    torch.testing.assert_close(torch.ops.sae_fast.gathered_dot(grad, col2, src), ref.gathered_dot(grad, col2, src))


def test_opcheck_schema_and_fake():
    coef, col, offsets, src, bias = _inputs()
    torch.library.opcheck(torch.ops.sae_fast.csr_gather_sum.default, (coef, col, offsets, 4, src, bias))
    torch.library.opcheck(torch.ops.sae_fast.gathered_dot.default, (torch.randn(3, 9), col.view(3, 4), src))


def test_fake_shapes_on_meta():
    coef, col, offsets, src, bias = _inputs("meta")
    assert torch.ops.sae_fast.csr_gather_sum(coef, col, offsets, 4, src, bias).shape == (4, 9)
    assert torch.ops.sae_fast.gathered_dot(torch.empty(3, 9, device="meta"), col.view(3, 4), src).shape == (3, 4)
