"""Checks of the CUDA extension that need no GPU.

1. The CPU kernels of the extension's ops stand in for the CUDA ones in every CPU test
   (schemas, fakes, opcheck, autograd): they must refuse what the CUDA host code refuses
   (csrc/sparse_gather.cu), instead of returning a silently different answer.
2. The per-query-block logic of ``csrc/vertical_slash_index.cu`` is plain integer code marked
   ``__host__ __device__``: compiled for the host with the system C++ compiler and fed the
   sorted lists exactly as the CUDA launcher feeds them, it must give the torch reference's
   tensors bit for bit on ties, duplicates, padding, empty blocks and values near the int64
   limits (the GPU tier compares the kernel itself, on smaller value ranges).
"""

import ctypes
import random
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_fast.reference import attention_index as ref_index

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------
# 1. CPU kernels of the extension ops refuse bad input like the CUDA kernels


def _csr_args(**change):
    args = dict(
        coef=torch.randn(6),
        col=torch.tensor([0, 1, 2, 3, 4, 5]),
        row_offsets=None,
        num_rows=3,
        src=torch.randn(7, 9),
        bias=None,
    )
    args.update(change)
    return args


@pytest.mark.cuda_ext
@pytest.mark.parametrize(
    "change,exc,match",
    [
        # Silently wrong before: the 7th entry was dropped (7 // 3 = 2 entries per row).
        (dict(coef=torch.randn(7), col=torch.zeros(7, dtype=torch.long)), ValueError, "split evenly"),
        # Silently wrong before: 2 rows came back for num_rows = 3 (the fake says 3).
        (dict(row_offsets=torch.tensor([0, 2, 6])), ValueError, r"row_offsets must have shape \[num_rows \+ 1\] = \[4\]"),
        (dict(row_offsets=torch.tensor([0, 2, 4, 6], dtype=torch.int32)), TypeError, "row_offsets must be int64"),
        (dict(coef=torch.randn(6).half()), TypeError, "coef must have src's dtype"),
        (dict(col=torch.zeros(6)), TypeError, "col must be int32 or int64"),
        (dict(bias=torch.randn(9).double()), TypeError, "bias must have src's dtype"),
        (dict(bias=torch.randn(8)), ValueError, r"bias must have shape \[d\] = \[9\]"),
        (dict(src=torch.randn(9)), ValueError, "src must be 2-D"),
        (dict(src=torch.randn(7, 9).double(), coef=torch.randn(6).double()), TypeError, "src must be float32"),
        (dict(col=torch.zeros(5, dtype=torch.long)), ValueError, "same length"),
        (dict(coef=torch.randn(0), col=torch.zeros(0, dtype=torch.long), num_rows=-1), ValueError, "num_rows must be >= 0"),
        (dict(src=torch.randn(0, 9)), ValueError, "src has no rows"),
    ],
)
def test_csr_gather_sum_cpu_kernel_refuses_like_cuda(change, exc, match):
    a = _csr_args(**change)
    with pytest.raises(exc, match=f"csr_gather_sum: .*{match}"):
        torch.ops.sae_fast.csr_gather_sum(a["coef"], a["col"], a["row_offsets"], a["num_rows"], a["src"], a["bias"])


@pytest.mark.cuda_ext
@pytest.mark.parametrize(
    "change,exc,match",
    [
        # Silently accepted before (the CUDA kernel refuses each of them).
        (dict(col=torch.zeros(2, 4, dtype=torch.long)), ValueError, "must share N"),
        (dict(grad=torch.randn(3, 9).half()), TypeError, "src must have grad's dtype"),
        (dict(col=torch.zeros(3, 4)), TypeError, "col must be int32 or int64"),
        (dict(grad=torch.randn(3, 9).double(), src=torch.randn(7, 9).double()), TypeError, "grad must be float32"),
        (dict(grad=torch.randn(3, 8)), ValueError, "must share d"),
        (dict(col=torch.zeros(3, dtype=torch.long)), ValueError, "col must be 2-D"),
        (dict(src=torch.randn(0, 9)), ValueError, "src has no rows"),
    ],
)
def test_gathered_dot_cpu_kernel_refuses_like_cuda(change, exc, match):
    a = dict(grad=torch.randn(3, 9), col=torch.zeros(3, 4, dtype=torch.long), src=torch.randn(7, 9))
    a.update(change)
    with pytest.raises(exc, match=f"gathered_dot: .*{match}"):
        torch.ops.sae_fast.gathered_dot(a["grad"], a["col"], a["src"])


@pytest.mark.cuda_ext
def test_cpu_kernels_still_take_every_valid_layout():
    """The checks refuse nothing the CUDA kernels take: int32 columns, strided 16-bit data,
    empty rows, k = 0, d = 0, zero rows."""
    from sae_fast.reference import sparse_gather as ref

    src = torch.randn(7, 18, dtype=torch.bfloat16)[:, ::2]
    coef = torch.randn(6, dtype=torch.bfloat16)
    col = torch.tensor([0, 6, 2, 2, 4, 5], dtype=torch.int32)
    for offsets, rows in ((None, 3), (torch.tensor([0, 0, 5, 6]), 3), (None, 6)):
        got = torch.ops.sae_fast.csr_gather_sum(coef, col, offsets, rows, src, src[0])
        torch.testing.assert_close(got, ref.csr_gather_sum(coef, col, offsets, rows, src, src[0]), rtol=0, atol=0)
    assert torch.ops.sae_fast.csr_gather_sum(coef[:0], col[:0], None, 4, src, None).eq(0).all()
    assert torch.ops.sae_fast.csr_gather_sum(coef[:0], col[:0], None, 0, src[:0], None).shape == (0, 9)
    assert torch.ops.sae_fast.csr_gather_sum(coef, col, None, 3, torch.randn(7, 0, dtype=torch.bfloat16), None).shape == (3, 0)
    grad = torch.randn(3, 9, dtype=torch.bfloat16)
    got = torch.ops.sae_fast.gathered_dot(grad, col.view(3, 2), src)
    torch.testing.assert_close(got, ref.gathered_dot(grad, col.view(3, 2), src), rtol=0, atol=0)
    assert torch.ops.sae_fast.gathered_dot(grad, col[:0].view(3, 0), src).shape == (3, 0)


# ---------------------------------------------------------------------------------------
# 2. vertical_slash_index.cu's per-block logic, compiled for the host, vs the reference

_HARNESS = r"""
#include <cstdint>
#define __host__
#define __device__
%(params)s
%(function)s
extern "C" void run(const int64_t* v, const int64_t* s, const int64_t* lens, int64_t B, int64_t H, int64_t nv,
                    int64_t ns, int64_t L, int64_t bm, int64_t bn, int64_t nqb, int64_t max_blocks, int64_t max_cols,
                    int32_t* bc, int32_t* bo, int32_t* cc, int32_t* ci) {
  VerticalSlashParams p{lens, bc, bo, cc, ci, B * H, H, nqb, nv, ns, L, bm, bn, max_blocks, max_cols};
  for (int64_t bh = 0; bh < B * H; ++bh)  // the kernel's loops: (batch, head) then query block
    for (int64_t qb = 0; qb < nqb; ++qb) index_one_query_block(v + bh * nv, s + bh * ns, lens[bh / H], qb, bh * nqb + qb, p);
}
"""


@pytest.fixture(scope="module")
def host_index_lib(tmp_path_factory):
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    source = (ROOT / "csrc" / "vertical_slash_index.cu").read_text()
    params = re.search(r"^struct VerticalSlashParams \{.*?^\};", source, re.S | re.M)
    function = re.search(
        r"^template <typename vert_t, typename slash_t>\n__host__ __device__ inline void index_one_query_block\(.*?^\}",
        source,
        re.S | re.M,
    )
    assert params and function, "csrc/vertical_slash_index.cu changed shape: update this harness"
    tmp = tmp_path_factory.mktemp("vsi_host")
    cpp = tmp / "harness.cpp"
    cpp.write_text(_HARNESS % {"params": params.group(0), "function": function.group(0)})
    lib = tmp / "libvsi.so"
    subprocess.run([cxx, "-O1", "-std=c++17", "-shared", "-fPIC", str(cpp), "-o", str(lib)], check=True, capture_output=True)
    return ctypes.CDLL(str(lib))


def _host_kernel(lib, vertical, slash, seq_lens, L, bm, bn):
    """What convert_vertical_slash_index_cuda computes: sorted int64 lists, lengths as int64,
    outputs poisoned with -1, nothing launched for B * H = 0 or no query blocks."""
    B, H, nv = vertical.shape
    ns = slash.shape[2]
    nqb, max_blocks, max_cols = ref_index.index_buffer_sizes(L, bm, bn, nv, ns)
    outs = [np.full(shape, -1, np.int32) for shape in ((B, H, nqb), (B, H, nqb, max_blocks), (B, H, nqb), (B, H, nqb, max_cols))]
    if B * H and nqb:
        v = np.ascontiguousarray(torch.sort(vertical, -1).values.long().numpy())
        s = np.ascontiguousarray(torch.sort(slash, -1).values.long().numpy())
        n = np.ascontiguousarray(seq_lens.long().numpy())
        ptr = lambda a: ctypes.c_void_p(a.ctypes.data)
        sizes = [ctypes.c_int64(x) for x in (B, H, nv, ns, L, bm, bn, nqb, max_blocks, max_cols)]
        lib.run(ptr(v), ptr(s), ptr(n), *sizes, *[ptr(o) for o in outs])
    return [torch.from_numpy(o) for o in outs]


def _draw(rng, count, L):
    values = []
    for _ in range(count):
        r = rng.random()
        if r < 0.1:
            values.append(-rng.randint(1, 2**62))  # padding, down to very negative
        elif r < 0.15:
            values.append(rng.randint(L, 2**63 - 1))  # beyond the sequence, up to int64 max
        elif r < 0.3 and values:
            values.append(rng.choice(values))  # duplicate (ties after the sort)
        elif r < 0.45:
            values.append(rng.randint(0, 4))  # sinks / nearest diagonals
        else:
            values.append(rng.randint(0, max(L - 1, 0)))
    return values


@pytest.mark.parametrize("seed", range(4))
def test_cuda_index_logic_equals_reference(host_index_lib, seed):
    rng = random.Random(seed)
    for _ in range(60):
        B, H = rng.randint(0, 3), rng.randint(0, 3)
        L = rng.choice([0, 1, 15, 16, 17, 33, 64, 100, 257])
        bm, bn = rng.choice([16, 32, 64, 128]), rng.choice([16, 32, 64, 128])
        nv, ns = rng.choice([0, 1, 3, 20]), rng.choice([0, 1, 3, 20])
        dtype = rng.choice([torch.int32, torch.int64])
        if dtype == torch.int32:  # keep the extremes representable
            draw = lambda c: [max(min(x, 2**31 - 1), -(2**31)) for x in _draw(rng, c, L)]
        else:
            draw = lambda c: _draw(rng, c, L)
        vertical = torch.tensor([[draw(nv) for _ in range(H)] for _ in range(B)], dtype=dtype).view(B, H, nv)
        slash = torch.tensor([[draw(ns) for _ in range(H)] for _ in range(B)], dtype=dtype).view(B, H, ns)
        seq_lens = torch.tensor([rng.choice([0, L, rng.randint(-5, L + 5)]) for _ in range(B)], dtype=torch.int64)
        want = ref_index.vertical_slash_index(vertical, slash, seq_lens, L, bm, bn)
        got = _host_kernel(host_index_lib, vertical, slash, seq_lens, L, bm, bn)
        case = (B, H, L, bm, bn, nv, ns, dtype)
        for name, a, b in zip(("block_count", "block_offset", "column_count", "column_index"), got, want):
            assert a.shape == b.shape and torch.equal(a, b), (name, case, vertical.tolist(), slash.tolist(), seq_lens.tolist())
