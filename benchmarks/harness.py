"""Shared benchmark harness: device facts, measured ceilings, timing, result rows.

Every op family's bench script builds on this so that rows from all of them carry the same
columns and land in the same kind of file (``benchmarks/results/<op>.jsonl``, one JSON object
per line, appended so later runs can be compared with earlier ones).

Timing follows /work/.library/device/METHOD.md: ``triton.testing.do_bench`` (device events,
L2 flushed before every timed run), median with p20/p80; ceilings measured once per run on
the card in hand (a large device-to-device copy, a large bf16 GEMM), never datasheet numbers.
"""

from __future__ import annotations

import datetime
import functools
import json
import platform
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
MIB = 1 << 20
GIB = 1 << 30

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class NoCudaError(RuntimeError):
    """Raised by everything that times: there is nothing meaningful to time on a CPU."""


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise NoCudaError(
            "timings need a CUDA GPU, and torch sees none (torch.cuda.is_available() is False). "
            "Run this benchmark on a GPU machine; correctness on CPU is covered by tests/."
        )


def run_cli(main: Callable[[Optional[Sequence[str]]], object]) -> None:
    """Entry point for bench scripts: a missing GPU is a plain message and exit code 2."""
    try:
        main(None)
    except NoCudaError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def import_sae_fast():
    """The installed package, or the source tree beside this folder when it is not installed."""
    try:
        import sae_fast
    except ImportError:
        sys.path.insert(0, str(REPO_ROOT))
        import sae_fast
    return sae_fast


def one_at_a_time(main: dict, sweep: dict, quick: bool) -> list[dict]:
    """The main shape, then (unless quick) the main shape with one dimension changed at a time."""
    if quick:
        return [dict(main)]
    return [dict(main)] + [{**main, key: v} for key, vs in sweep.items() for v in vs]


def _git_sha() -> str:
    # A copy of the tree without .git (a lent GPU box) gets the sha from the caller.
    if os.environ.get("SAE_FAST_GIT_SHA"):
        return os.environ["SAE_FAST_GIT_SHA"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "") if sha else "unknown"
    except Exception:  # no git, no repository, no commits yet: still benchmark
        return "unknown"


@functools.lru_cache(maxsize=None)
def device_info() -> dict:
    """Facts that make a row comparable with another: which card, which software, which code.

    Works without a GPU (gpu fields are None) so CPU dry runs can still describe themselves."""
    import triton

    info = {
        "gpu": None, "sm_count": None, "compute_capability": None, "gpu_mem_gib": None,
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "git_sha": _git_sha(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(gpu=props.name, sm_count=props.multi_processor_count,
                    compute_capability=f"{props.major}.{props.minor}",
                    gpu_mem_gib=round(props.total_memory / GIB, 1))
    return info


def _median_ms(fn: Callable[[], object], rep_ms: int = 200, warmup_ms: int = 50) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def _copy_ms(nbytes: int) -> float:
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return _median_ms(lambda: dst.copy_(src))


def _gemm_ms(n: int) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty_like(a)
    return _median_ms(lambda: torch.mm(a, b, out=c))


@functools.lru_cache(maxsize=None)
def measure_peaks(copy_bytes: int = 2 * GIB, gemm_n: int = 8192) -> dict:
    """Measured ceilings of this card, once per process: copy GB/s (read + write counted) and
    bf16 GEMM TFLOP/s. Random data, not zeros: zeros can run faster than real data."""
    require_cuda()
    free, _ = torch.cuda.mem_get_info()
    copy_bytes = min(copy_bytes, free // 4)  # src + dst with room to spare on small cards
    copy_ms = _copy_ms(copy_bytes)
    gemm_ms = _gemm_ms(gemm_n)
    torch.cuda.empty_cache()
    return {
        "copy_gbps_peak": round(2 * copy_bytes / copy_ms / 1e6, 1),
        "gemm_tflops_peak": round(2 * gemm_n**3 / gemm_ms / 1e9, 1),
        "copy_bytes": copy_bytes, "gemm_n": gemm_n,
    }


def rep_for_samples(fn: Callable[[], object], rep_ms: float, *, samples: int = 10, cap_ms: float = 3000,
                    grad_to_none: Optional[Sequence[torch.Tensor]] = None) -> float:
    """The ``rep`` to give ``do_bench`` so that a slow op still gets ``samples`` timed runs:
    do_bench runs max(1, rep / estimate) times, so a 70 ms op at rep=100 was one sample (its
    median, p20 and p80 equal). At most ``cap_ms`` of timing per row."""
    fn()  # (compiles, autotunes: outside the estimate)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for t in grad_to_none or ():
        t.grad = None
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    for t in grad_to_none or ():
        t.grad = None
    return max(rep_ms, min(samples * start.elapsed_time(end), cap_ms))


def bench(fn: Callable[[], object], *, rep_ms: int = 100, warmup_ms: int = 25,
          grad_to_none: Optional[Sequence[torch.Tensor]] = None) -> dict:
    """Median / p20 / p80 ms of ``fn`` and its peak memory above what was allocated before.

    ``grad_to_none``: tensors whose ``.grad`` is reset before each timed run (backward
    timing), so gradients are freshly allocated, never accumulated."""
    require_cuda()
    from triton.testing import do_bench

    rep = rep_for_samples(fn, rep_ms, grad_to_none=grad_to_none)
    median, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep, grad_to_none=grad_to_none,
                                quantiles=[0.5, 0.2, 0.8])
    # Peak memory of one call, measured after warm-up so one-off autotuning buffers stay out.
    for t in grad_to_none or ():
        t.grad = None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    peak_mib = (torch.cuda.max_memory_allocated() - before) / MIB
    del result
    for t in grad_to_none or ():
        t.grad = None
    return {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "peak_mem_mib": peak_mib}


@dataclass
class Row:
    """One (op, provider, mode, shape, dtype) measurement. A skipped or failed provider is a
    row too, with ``note`` / ``error`` set and no timings, so the record says what was tried."""

    op: str
    provider: str
    mode: str  # "fwd" | "bwd" | "fwd+bwd"
    shape: dict
    dtype: str
    median_ms: Optional[float] = None
    p20_ms: Optional[float] = None
    p80_ms: Optional[float] = None
    peak_mem_mib: Optional[float] = None
    bytes: Optional[int] = None  # modelled bytes moved (each op's script defines them)
    flops: Optional[int] = None
    gbps: Optional[float] = None
    tflops: Optional[float] = None
    pct_copy_bw: Optional[float] = None  # gbps / measured copy GB/s
    pct_gemm: Optional[float] = None  # tflops / measured bf16 GEMM TFLOP/s
    ok: Optional[bool] = None  # passed the correctness guard (None: not checked)
    error: Optional[str] = None
    note: Optional[str] = None
    extra: dict = field(default_factory=dict)  # op-specific fields, flattened on output
    device: dict = field(default_factory=dict)  # device_info() + measured peaks

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(d.pop("extra"))
        d.update(d.pop("device"))
        return d


def make_row(op: str, provider: str, mode: str, shape: dict, dtype: str, *,
             timing: Optional[dict] = None, bytes: Optional[int] = None,
             flops: Optional[int] = None, peaks: Optional[dict] = None, **fields) -> Row:
    """Build a row and derive the rate columns from the timing and the measured peaks."""
    extra = dict(fields.pop("extra", {}))  # a copy: callers reuse one dict across their rows
    row = Row(op=op, provider=provider, mode=mode, shape=dict(shape), dtype=dtype,
              bytes=bytes, flops=flops, extra=extra, **fields)
    row.device = {**device_info(), **(peaks or {})}
    if timing:
        row.median_ms, row.p20_ms, row.p80_ms = timing["median_ms"], timing["p20_ms"], timing["p80_ms"]
        row.peak_mem_mib = timing.get("peak_mem_mib")
        seconds = row.median_ms / 1e3
        if bytes:
            row.gbps = bytes / seconds / 1e9
            if peaks:
                row.pct_copy_bw = 100 * row.gbps / peaks["copy_gbps_peak"]
        if flops:
            row.tflops = flops / seconds / 1e12
            if peaks:
                row.pct_gemm = 100 * row.tflops / peaks["gemm_tflops_peak"]
    return row


def results_path(op: str) -> Path:
    return RESULTS_DIR / f"{op}.jsonl"


def append_results(rows: Sequence[Row], path: Optional[Path | str] = None) -> Path:
    """Append rows as JSON lines (default ``benchmarks/results/<op>.jsonl``)."""
    if not rows:
        raise ValueError("append_results: no rows to write")
    path = Path(path) if path is not None else results_path(rows[0].op)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row.to_dict(), default=str) + "\n")
    return path


def shape_str(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def _fmt(value, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def print_table(rows: Sequence[Row], file=None) -> None:
    """Compact markdown table: one line per row, aligned columns."""
    header = ["provider", "mode", "shape", "dtype", "ms", "p20-p80", "MiB", "GB/s", "%BW",
              "TFLOP/s", "%GEMM", "ok", "note"]
    lines = []
    for r in rows:
        spread = "" if r.p20_ms is None else f"{r.p20_ms:.3f}-{r.p80_ms:.3f}"
        note = r.error or r.note or ""
        note = note.splitlines()[0][:60] if note else ""
        lines.append([r.provider, r.mode, shape_str(r.shape), r.dtype, _fmt(r.median_ms, 3), spread,
                      _fmt(r.peak_mem_mib, 0), _fmt(r.gbps, 0), _fmt(r.pct_copy_bw, 0),
                      _fmt(r.tflops, 1), _fmt(r.pct_gemm, 1),
                      "" if r.ok is None else ("yes" if r.ok else "NO"), note])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    numeric = set(range(4, 11))

    def render(cells):
        return "| " + " | ".join(str(c).rjust(w) if i in numeric else str(c).ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    out = [render(header), "|" + "|".join(("-" * (w + 1) + ":") if i in numeric else "-" * (w + 2)
                                         for i, w in enumerate(widths)) + "|"]
    out += [render(cells) for cells in lines]
    print("\n".join(out), file=file or sys.stdout)
