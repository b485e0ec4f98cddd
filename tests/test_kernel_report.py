"""Static kernel health on CPU: every Triton kernel compiles for sm_80 / sm_90 without
register spills or over-limit shared memory, and the report really catches a spilling kernel."""

import pytest
from sae_fast import kernel_report


@pytest.mark.parametrize("main_only", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["main", "all"])
def test_package_triton_kernels_are_healthy(main_only):
    """The main-path configurations by default; every variant with --run-slow (and in CI's
    separate `sae-fast kernel-report` step: about 10 minutes of compiles on 2 cores)."""
    results = kernel_report.triton_report((80, 90), main_only=main_only)
    names = {h.name.split("[")[0] for h in results}
    assert {"csr_gather_sum", "gathered_dot", "topk_partial", "threshold_select"} <= names
    assert {h.arch for h in results} == {80, 90}
    for h in results:
        assert h.registers > 0, f"{h.name}: no ptxas report parsed"
        if h.name.startswith("topk_partial[bf16,k<=64") and h.arch == 90:
            assert h.wgmma, f"{h.name}: the fused encoder GEMM must use wgmma on sm_90"
    bad = [(h.name, h.arch, h.problems) for h in results if not h.ok]
    assert not bad, f"kernels with spills or too much shared memory: {bad}"


_PLANTED_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
from planted_kernels import spilling_kernel
from sae_fast import kernel_report
spec = dict(name="planted_spill", kernel=spilling_kernel, types=dict(x_ptr="*fp32", out_ptr="*fp32"),
            constexprs=dict(BLOCK=32 * 512), num_warps=1, allow=json.loads(sys.argv[2]))
h = kernel_report.triton_health(spec, 90)
print(json.dumps(dict(spill_bytes=h.spill_bytes, problems=list(h.problems), ok=h.ok)))
"""


def _planted_health(allow):
    """The planted kernel's report, compiled in a child with the interpreter off (as the
    package report does under the interpreter): an interpreted launch elsewhere in this
    process can leave triton.language patched (Triton's interpreter does not undo the patch
    of a jit function called outside a launch), and a compile then fails in the front end
    (seen once in CI: "'block_argument' object has no attribute 'dtype'")."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    run = subprocess.run([sys.executable, "-c", _PLANTED_CHILD, str(Path(__file__).parent), json.dumps(allow)],
                         env={**os.environ, "TRITON_INTERPRET": "0"}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_report_catches_spills_unless_allowed():
    h = _planted_health({})
    assert h["spill_bytes"] > 0 and "spills" in h["problems"] and not h["ok"]
    h = _planted_health({"spills": "planted for this test"})
    assert h["ok"]


def test_ptxas_parser():
    text = """ptxas info    : Compiling entry function 'kern_a' for 'sm_90a'
ptxas info    : Function properties for kern_a
    8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 2048 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function 'kern_b' for 'sm_90a'
ptxas info    : Function properties for kern_b
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 400 bytes cmem[0]
"""
    a, b = kernel_report._parse_ptxas(text)
    assert (a["name"], a["registers"], a["spill_bytes"], a["smem_bytes"]) == ("kern_a", 255, 28, 2048)
    assert (b["name"], b["registers"], b["spill_bytes"], b["smem_bytes"]) == ("kern_b", 40, 0, 0)


@pytest.mark.cuda_ext
def test_csrc_kernels_are_healthy():
    results = kernel_report.csrc_report(90)
    assert {h.name.split(":")[0] for h in results} >= {"sparse_gather.cu"}
    assert len(results) >= 2
    bad = [(h.name, h.problems) for h in results if not h.ok]
    assert not bad, f"CUDA kernels with spills or too much shared memory: {bad}"


def test_cli_kernel_report(capsys):
    assert kernel_report.main(["--arch", "90", "--only", "gathered_dot"]) == 0
    assert "0 failing" in capsys.readouterr().out


def test_source_allowances():
    text = "// kernel-report: allow spills in my_kernel: measured faster this way\n__global__ void my_kernel() {}\n"
    assert kernel_report._source_allowances(text) == {"my_kernel": {"spills": "measured faster this way"}}


def test_shared_memory_limit_is_the_build_arch():
    """164 KiB fits an H100 block (227 KiB) but not an A100 one (163 KiB)."""
    judged = {}
    for arch in (80, 90):
        h = kernel_report.KernelHealth(name="k", arch=arch, source="triton", smem_bytes=164 * 1024)
        kernel_report._judge(h)
        judged[arch] = h.problems
    assert judged == {80: ["smem_over_block_limit"], 90: []}
