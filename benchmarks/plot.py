"""Charts from a benchmark results file (JSON lines written by harness.append_results).

    python benchmarks/plot.py benchmarks/results/sparse_decode.jsonl --out DIR

For each (GPU, dtype) in the file, using the latest row of each (provider, mode, shape):
  <op>_<gpu>_<dtype>_vs_bytes.png      median time vs modelled bytes (markers only: the
                                       points are unrelated shapes), one panel per mode
  <op>_<gpu>_<dtype>_sweep_<field>.png median time vs one shape field, the others held at the
                                       most common value (the main shape), one panel per mode
Log-log axes; bars span p20-p80; one line per provider.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

MODE_ORDER = ("fwd", "bwd", "fwd+bwd")


def load_rows(path: Path, gpu: str | None = None, dtype: str | None = None) -> list[dict]:
    """Timed rows only; a later line for the same (gpu, dtype, provider, mode, shape) wins."""
    latest: dict[tuple, dict] = {}
    with Path(path).open() as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                print(f"warning: {path}:{line_no}: skipped, not JSON ({e})", file=sys.stderr)
                continue
            if row.get("median_ms") is None:
                continue
            if gpu and gpu.lower() not in str(row.get("gpu", "")).lower():
                continue
            if dtype and row.get("dtype") != dtype:
                continue
            key = (row.get("gpu"), row["dtype"], row["provider"], row["mode"],
                   tuple(sorted(row["shape"].items())))
            latest[key] = row
    return list(latest.values())


def _slug(text) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "-", str(text)).strip("-") or "unknown"


def _modes(rows):
    present = {r["mode"] for r in rows}
    return [m for m in MODE_ORDER if m in present] + sorted(present - set(MODE_ORDER))


def _panel_figure(rows, x_of, xlabel, title, label_points=False):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter, NullLocator

    plain = FuncFormatter(lambda v, _: f"{v:g}")

    modes = _modes(rows)
    fig, axes = plt.subplots(1, len(modes), figsize=(5.2 * len(modes), 4.2), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        by_provider = defaultdict(list)
        for r in rows:
            if r["mode"] == mode:
                by_provider[r["provider"]].append(r)
        for provider in sorted(by_provider):
            pts = sorted(by_provider[provider], key=lambda r: (x_of(r), r["median_ms"]))
            xs = [x_of(r) for r in pts]
            ys = [r["median_ms"] for r in pts]
            err = [[y - (r.get("p20_ms") or y) for r, y in zip(pts, ys)],
                   [(r.get("p80_ms") or y) - y for r, y in zip(pts, ys)]]
            # Sweep points share every other field, so a line between them means something;
            # across unrelated shapes it would not: markers only.
            ax.errorbar(xs, ys, yerr=err, marker="o", markersize=4, capsize=2, label=provider,
                        linestyle="-" if label_points else "none")
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(plain)
            axis.set_minor_formatter(NullFormatter())
        if label_points:  # a sweep has few x values: label exactly those, as plain numbers
            ticks = sorted({x_of(r) for r in rows})
            ax.set_xticks(ticks)
            ax.set_xticklabels([str(t) for t in ticks])
            ax.xaxis.set_minor_locator(NullLocator())
        ax.set_title(mode)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("median time (ms)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def sweep_axes(rows) -> dict[str, list[dict]]:
    """Shape fields that vary while every other field sits at its most common value."""
    fields = sorted({f for r in rows for f in r["shape"]})
    base = {f: Counter(r["shape"].get(f) for r in rows).most_common(1)[0][0] for f in fields}
    axes = {}
    for f in fields:
        chosen = [r for r in rows if all(r["shape"].get(g) == base[g] for g in fields if g != f)]
        if len({r["shape"].get(f) for r in chosen}) >= 2:
            axes[f] = chosen
    return axes


def plot_file(path: Path, out_dir: Path, gpu: str | None = None, dtype: str | None = None) -> list[Path]:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("plot.py needs matplotlib: pip install matplotlib (or the project's [bench] extra)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load_rows(path, gpu, dtype)
    if not rows:
        raise SystemExit(f"{path}: no timed rows to plot (filters: gpu={gpu!r}, dtype={dtype!r})")
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = defaultdict(list)
    for r in rows:
        groups[(r.get("op", "op"), r.get("gpu"), r["dtype"])].append(r)
    written = []
    for (op, gpu_name, dt), group in sorted(groups.items(), key=lambda kv: str(kv[0])):
        stem = f"{_slug(op)}_{_slug(gpu_name)}_{_slug(dt)}"
        charts = [("vs_bytes", "modelled bytes moved (GB)", lambda r: r["bytes"] / 1e9,
                   [r for r in group if r.get("bytes")])]
        for field, chosen in sweep_axes(group).items():
            charts.append((f"sweep_{field}", field, lambda r, f=field: r["shape"][f], chosen))
        for name, xlabel, x_of, chart_rows in charts:
            if not chart_rows:
                continue
            fig = _panel_figure(chart_rows, x_of, xlabel, f"{op} on {gpu_name}, {dt}",
                                label_points=name.startswith("sweep_"))
            target = out_dir / f"{stem}_{name}.png"
            fig.savefig(target, dpi=120)
            plt.close(fig)
            written.append(target)
    return written


def main(argv=None) -> list[Path]:
    p = argparse.ArgumentParser(description="Plot benchmark results (JSON lines) as PNG charts.")
    p.add_argument("results", type=Path, help="results file, e.g. benchmarks/results/sparse_decode.jsonl")
    p.add_argument("--out", type=Path, default=Path("benchmarks/plots"), help="output directory (default %(default)s)")
    p.add_argument("--gpu", help="only rows whose GPU name contains this (case-insensitive)")
    p.add_argument("--dtype", help="only rows of this dtype (bf16, fp16, fp32)")
    args = p.parse_args(argv)
    written = plot_file(args.results, args.out, args.gpu, args.dtype)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
