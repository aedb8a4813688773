"""The run report: documents and bytes in/out per stage, rejection reasons, stage counters, the
"nothing lost" balance, and a bar chart of where documents were dropped (report.png)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge.utils import atomic_path, write_json_atomic


def report_markdown(report: dict[str, Any]) -> str:
    lines = ["| stage | docs in | docs out | added | rejected | MB in | MB out | seconds |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in report["stages"]:
        lines.append(f"| {s['name']} | {s['docs_in']} | {s['docs_out']} | {s['added']} | "
                     f"{sum(s['rejected'].values())} | {s['bytes_in'] / 1e6:.2f} | {s['bytes_out'] / 1e6:.2f} | "
                     f"{s.get('seconds', 0):.2f} |")
    lines += ["", "| rejection reason | documents |", "|---|---:|"]
    reasons: dict[str, int] = {}
    for s in report["stages"]:
        for r, n in s["rejected"].items():
            reasons[r] = reasons.get(r, 0) + n
    lines += [f"| {r} | {n} |" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])]
    if report.get("counters"):
        lines += ["", "| counter | value |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(report["counters"].items())]
    b = report["balance"]
    lines += ["", f"input {b['input_docs']} + added {b['added_docs']} = kept {b['kept_docs']} + rejected "
              f"{b['rejected_docs']}: {'balanced' if b['balanced'] else 'NOT BALANCED'}"]
    return "\n".join(lines) + "\n"


def plot_drops(report: dict[str, Any], path: str | Path) -> Path | None:
    """Horizontal bars: documents rejected by each stage, split by reason. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    stages = [s for s in report["stages"]]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(stages) + 1.5))
    names = [s["name"] for s in stages]
    left = [0] * len(stages)
    reasons = sorted({r for s in stages for r in s["rejected"]})
    cmap = plt.get_cmap("tab20")
    for k, reason in enumerate(reasons):
        vals = [s["rejected"].get(reason, 0) for s in stages]
        ax.barh(names, vals, left=left, color=cmap(k % 20), label=reason)
        left = [a + b for a, b in zip(left, vals)]
    ax.invert_yaxis()
    ax.set_xlabel("documents rejected")
    ax.set_title(f"where documents were dropped ({report['balance']['input_docs']} in, "
                 f"{report['balance']['kept_docs']} kept)")
    if reasons:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_path(path) as tmp:  # a kill mid-write must not leave an empty report.png
            fig.savefig(tmp, dpi=100, format=path.suffix.lstrip(".") or "png")  # tmp's .tmp names no format
    finally:
        plt.close(fig)
    return path


def write_report(report: dict[str, Any], out_dir: str | Path, plot: bool = True) -> dict[str, Path]:
    out = Path(out_dir)
    paths = {"json": out / "report.json", "md": out / "report.md"}
    write_json_atomic(paths["json"], report)
    with atomic_path(paths["md"]) as tmp:
        tmp.write_text(report_markdown(report))
    if plot:
        png = plot_drops(report, out / "report.png")
        if png is not None:
            paths["png"] = png
    return paths


def load_report(out_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(out_dir) / "report.json").read_text())
