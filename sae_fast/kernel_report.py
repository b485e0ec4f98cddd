"""Static kernel health, no GPU needed: ``sae-fast kernel-report`` / ``python -m sae_fast.kernel_report``.

Compiles every Triton kernel of the package, at the launch configurations its heuristics
produce (``launch_specs()`` of each kernel module), for sm_80 and sm_90 (Triton compiles for
an explicit target without a device), runs ``ptxas -v`` on the PTX, and reports registers,
spill bytes, shared memory and, for matmul kernels on sm_90, whether wgmma instructions are
present. With ``--csrc`` it also compiles ``csrc/*.cu`` for sm_90 with ``nvcc -Xptxas -v``.

A kernel fails when it spills registers, uses more shared memory than a block may on the arch
it was built for (sm_80 163 KiB, sm_90 227 KiB), or is a matmul kernel without wgmma on sm_90 — unless its spec's ``allow`` names
that problem with the reason. Exit status 1 when any kernel fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

# Opt-in shared memory per block: A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB. A build is judged
# against its own arch's limit: the launch heuristics pick per arch (a spec's ``archs``).
_MAX_BLOCK_SMEM = {80: 163 * 1024, 90: 227 * 1024}
# Per-SM limits for the occupancy column: shared memory per SM (A100 164 KiB, H100 228 KiB; the
# runtime reserves 1 KiB per block), 64K registers and 64 warps on both.
_SM_SMEM = {80: 164 * 1024, 90: 228 * 1024}
KERNEL_MODULES = ("sparse_gather", "topk_encode", "topk_filter", "threshold_encode", "block_sparse_attention")  # modules of sae_fast.triton_kernels with launch_specs()
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class KernelHealth:
    name: str
    arch: int
    source: str  # "triton" or "csrc"
    registers: int = 0
    spill_bytes: int = 0  # spill stores + spill loads
    smem_bytes: int = 0  # static + dynamic (Triton's launch shared memory)
    wgmma: Optional[bool] = None  # only asked of matmul kernels on sm_90
    num_warps: int = 0  # Triton launches (0: not known, csrc)
    ctas_per_sm: int = 0  # resident blocks per SM that registers, warps and shared memory allow
    problems: list = field(default_factory=list)
    allowed: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(p in self.allowed for p in self.problems)


_PTXAS_LINE = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_SMEM = re.compile(r"(\d+) bytes smem")


def _parse_ptxas(text: str) -> list[dict]:
    """One dict per 'Compiling entry function' / 'Function properties' block of ptxas -v."""
    entries, current = [], None
    for line in text.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?([\w$]+)'?", line)
        if m:
            name = m.group(1)
            if current is None or current["name"] != name:
                current = {"name": name, "registers": 0, "spill_bytes": 0, "smem_bytes": 0}
                entries.append(current)
            continue
        if current is None:
            continue
        if (m := _SPILL.search(line)):
            current["spill_bytes"] = int(m.group(1)) + int(m.group(2))
        if (m := _PTXAS_LINE.search(line)):
            current["registers"] = int(m.group(1))
            if (s := _SMEM.search(line)):
                current["smem_bytes"] = int(s.group(1))
    return entries


def _ptxas() -> str:
    """Triton's bundled ptxas (it matches the PTX version Triton emits)."""
    import triton.backends.nvidia as nvidia

    bundled = Path(nvidia.__file__).parent / "bin" / "ptxas"
    if bundled.exists():
        return str(bundled)
    found = shutil.which("ptxas")
    if found is None:
        raise RuntimeError("kernel-report: no ptxas found (neither Triton's bundled one nor on PATH)")
    return found


def _as_jit(kernel):
    """Under TRITON_INTERPRET=1 @triton.jit gives an interpreter object; compile its function."""
    from triton.runtime.jit import JITFunction

    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)


def _launch_attrs(arg_names, signature: dict, spec: dict) -> dict:
    """The divisibility facts a real launch gives the compiler. At launch Triton marks every
    pointer that is 16-byte aligned and every integer that is a multiple of 16 (``tt.divisibility
    = 16``) and compiles a variant for it; that lets it prove 16-byte vector loads and turn
    loops' loads into cp.async pipelines. Without these hints the report compiled a different
    (scalar-load, unpipelined, register-hungrier) program than the GPU runs. Marked here:
    pointers, ``stride_*`` arguments, and the integers a spec lists under ``divisible``
    (sizes that are multiples of 16 at the representative shape, e.g. d = 2304)."""
    extra = set(spec.get("divisible", ()))
    unknown = extra - set(arg_names)
    if unknown:
        raise ValueError(f"kernel-report: {spec['name']}: 'divisible' names unknown arguments {sorted(unknown)}")
    attrs = {}
    for i, name in enumerate(arg_names):
        kind = signature[name]
        if kind == "constexpr":
            continue
        if kind.startswith("*") or (name.startswith("stride") and kind[0] in "iu") or name in extra:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def ctas_per_sm(arch: int, num_warps: int, registers: int, smem_bytes: int) -> int:
    """Blocks of one kernel an SM can hold at once: registers are allocated per warp in units
    of 256 (a thread's count rounded up to 8), at most 64 warps and 32 blocks, and the block's
    shared memory plus the 1 KiB the runtime reserves for it."""
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = 65536 // (regs_per_warp * num_warps)
    by_warps = 64 // num_warps
    by_smem = _SM_SMEM.get(arch, _SM_SMEM[80]) // (smem_bytes + 1024)
    return max(0, min(by_regs, by_warps, by_smem, 32))


def triton_health(spec: dict, arch: int) -> KernelHealth:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _as_jit(spec["kernel"])
    signature = {}
    for name in fn.arg_names:
        signature[name] = "constexpr" if name in spec["constexprs"] else spec["types"][name]
    src = ASTSource(fn=fn, signature=signature, constexprs=dict(spec["constexprs"]),
                    attrs=_launch_attrs(fn.arg_names, signature, spec))
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": spec["num_warps"], "num_stages": spec.get("num_stages", 3)})
    ptx = compiled.asm["ptx"]
    gpu_name = re.search(r"^\.target (\S+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        out = subprocess.run([_ptxas(), "-v", f"--gpu-name={gpu_name}", str(path), "-o", os.devnull],
                             capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"kernel-report: ptxas failed on {spec['name']} for sm_{arch}:\n{out.stderr}")
    entries = _parse_ptxas(out.stdout + out.stderr)
    if len(entries) != 1:
        raise RuntimeError(f"kernel-report: expected one entry in ptxas output for {spec['name']}, got {entries}")
    e = entries[0]
    health = KernelHealth(name=spec["name"], arch=arch, source="triton", registers=e["registers"],
                          spill_bytes=e["spill_bytes"], smem_bytes=e["smem_bytes"] + int(compiled.metadata.shared),
                          allowed=dict(spec.get("allow", {})), num_warps=spec["num_warps"])
    health.ctas_per_sm = ctas_per_sm(arch, spec["num_warps"], health.registers, health.smem_bytes)
    if spec.get("matmul") and arch >= 90:
        health.wgmma = "wgmma" in ptx
    _judge(health)
    return health


def _triton_report_in_child(archs, only, main_only=False) -> list[KernelHealth]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "sae_fast.kernel_report", "--arch", ",".join(map(str, archs)), "--json", str(path)]
        if only:
            cmd += ["--only", only]
        if main_only:
            cmd += ["--main-only"]
        run = subprocess.run(cmd, env={**os.environ, "TRITON_INTERPRET": "0"}, capture_output=True, text=True)
        if not path.exists():
            raise RuntimeError(f"kernel-report: the compile child failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}")
        rows = json.loads(path.read_text())
    return [KernelHealth(**{k: v for k, v in row.items() if k != "ok"}) for row in rows]


def _judge(h: KernelHealth) -> None:
    if h.spill_bytes:
        h.problems.append("spills")
    if h.smem_bytes > _MAX_BLOCK_SMEM.get(h.arch, _MAX_BLOCK_SMEM[80]):
        h.problems.append("smem_over_block_limit")
    if h.wgmma is False:
        h.problems.append("no_wgmma")


def triton_report(archs=(80, 90), only: Optional[str] = None, main_only: bool = False) -> list[KernelHealth]:
    """``main_only``: just the launch configurations of the main path (bf16, no AuxK, k <=
    64), skipping the variants marked ``main: False`` whose compiles take minutes on 2 cores."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        # Under the interpreter the kernels' @triton.jit helpers (and tl.sort & co.) are
        # interpreter objects the compiler rejects: compile in a child with it off.
        return _triton_report_in_child(archs, only, main_only)
    import importlib

    results = []
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(f"sae_fast.triton_kernels.{module_name}")
        for spec in module.launch_specs():
            if (only and only not in spec["name"]) or (main_only and not spec.get("main", True)):
                continue
            for arch in archs:
                if arch in spec.get("archs", (arch,)):  # specs whose launch config depends on the arch
                    results.append(triton_health(spec, arch))
    return results


def csrc_report(arch: int = 90) -> list[KernelHealth]:
    """nvcc -Xptxas -v over csrc/*.cu for one arch (needs nvcc and torch's headers)."""
    from torch.utils import cpp_extension

    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda", cpp_extension.CUDA_HOME]
    nvccs = [Path(h) / "bin" / "nvcc" for h in homes if h]
    nvcc = next((n for n in nvccs if n.exists()), None)
    if nvcc is None:
        raise RuntimeError(f"kernel-report --csrc: nvcc not found in {[str(n) for n in nvccs]} (set CUDA_HOME)")
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{REPO_ROOT / 'csrc'}"]
    import sysconfig

    includes.append(f"-I{sysconfig.get_paths()['include']}")
    results = []
    for cu in sorted((REPO_ROOT / "csrc").glob("*.cu")):
        cmd = [str(nvcc), "-c", str(cu), "-o", os.devnull, "-O3", "-std=c++20", "--expt-relaxed-constexpr",
               f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas=-v", "-DTORCH_EXTENSION_NAME=_C",
               "-D_GLIBCXX_USE_CXX11_ABI=1", *includes]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"kernel-report: nvcc failed on {cu.name}:\n{out.stderr[-4000:]}")
        allowances = _source_allowances(cu.read_text())
        for e in _parse_ptxas(out.stdout + out.stderr):
            full = _demangle(e["name"]).replace("(anonymous namespace)::", "")
            full = re.sub(r"^void ", "", full)
            base = re.sub(r"<.*", "", full.split("(")[0]).split("::")[-1]
            h = KernelHealth(name=f"{cu.name}:{_short_name(full)}", arch=arch, source="csrc",
                             registers=e["registers"], spill_bytes=e["spill_bytes"], smem_bytes=e["smem_bytes"],
                             allowed=allowances.get(base, {}))
            _judge(h)
            results.append(h)
    return results


_ALLOW_COMMENT = re.compile(r"//\s*kernel-report:\s*allow\s+(\w+)\s+in\s+(\w+):\s*(.+)")


def _source_allowances(text: str) -> dict:
    """``// kernel-report: allow PROBLEM in KERNEL: reason`` comments beside CUDA kernels."""
    allowed: dict = {}
    for problem, kernel, reason in _ALLOW_COMMENT.findall(text):
        allowed.setdefault(kernel, {})[problem] = reason.strip()
    return allowed


def _short_name(demangled: str) -> str:
    """kernel<template args> without namespaces and the parameter list."""
    return re.sub(r"\b\w+::", "", demangled.split("(")[0])


def _demangle(name: str) -> str:
    filt = shutil.which("c++filt")
    if filt is None:
        return name
    return subprocess.run([filt, name], capture_output=True, text=True).stdout.strip() or name


def print_table(results: list[KernelHealth]) -> None:
    print(f"{'kernel':<60} {'sm':>3} {'warps':>5} {'regs':>5} {'spill B':>8} {'smem B':>8} {'CTA/SM':>6} {'wgmma':>6}  status")
    for h in results:
        wg = "-" if h.wgmma is None else ("yes" if h.wgmma else "NO")
        if not h.problems:
            status = "ok"
        elif h.ok:
            status = "allowed: " + "; ".join(f"{p} ({h.allowed[p]})" for p in h.problems)
        else:
            status = "FAIL: " + ", ".join(h.problems)
        warps = str(h.num_warps) if h.num_warps else "-"
        occ = str(h.ctas_per_sm) if h.ctas_per_sm else "-"
        print(f"{h.name[:60]:<60} {h.arch:>3} {warps:>5} {h.registers:>5} {h.spill_bytes:>8} {h.smem_bytes:>8} {occ:>6} {wg:>6}  {status}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="sae-fast kernel-report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="80,90", help="compute capabilities for the Triton kernels (default 80,90)")
    p.add_argument("--csrc", action="store_true", help="also compile csrc/*.cu for sm_90 with nvcc -Xptxas -v")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    p.add_argument("--only", metavar="TEXT", help="only the Triton kernels whose name contains TEXT")
    p.add_argument("--main-only", action="store_true", help="only the main-path launch configurations")
    args = p.parse_args(argv)
    archs = tuple(int(a) for a in args.arch.split(",") if a)
    results = triton_report(archs, args.only, args.main_only)
    if args.csrc:
        results += csrc_report(90)
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(h) | {"ok": h.ok} for h in results], indent=1))
    failed = [h for h in results if not h.ok]
    print(f"kernel-report: {len(results)} kernel builds, {len(failed)} failing")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
