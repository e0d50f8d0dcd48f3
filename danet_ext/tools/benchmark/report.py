"""Benchmark output: CSV/JSON files, a text table and PNG plots."""
from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict
from typing import Dict, List, Optional

from .cases import Result


def write_results(results: List[Result], out_dir: str, meta: Dict[str, object], stem: str = "results") -> List[str]:
    """CSV and JSON of the results (JSON with the machine description)."""
    os.makedirs(out_dir, exist_ok=True)
    rows = [asdict(r) for r in results]
    csv_path = os.path.join(out_dir, f"{stem}.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k != "extra"] if rows else ["op"])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: v for k, v in row.items() if k != "extra"})
    json_path = os.path.join(out_dir, f"{stem}.json")
    with open(json_path, "w") as f:
        json.dump({"machine": meta, "results": rows}, f, indent=1)
    return [csv_path, json_path]


def format_table(results: List[Result]) -> str:
    """A plain-text table: one line per (op, mode, shape), impls side by side, with speed-ups."""
    groups: Dict[tuple, Dict[str, Result]] = {}
    impls: List[str] = []
    for r in results:
        groups.setdefault((r.op, r.mode, r.shape), {})[r.impl] = r
        if r.impl not in impls:
            impls.append(r.impl)
    header = f"{'op':<20} {'mode':<17} {'shape':<18}" + "".join(f" {i + ' ms':>14} {i + ' MiB':>14}" for i in impls)
    if "reference" in impls and "danet_ext" in impls:
        header += f" {'speed-up':>9} {'mem ratio':>9}"
    lines = [header, "-" * len(header)]
    for (op, mode, shape), by_impl in groups.items():
        line = f"{op:<20} {mode:<17} {shape:<18}"
        for i in impls:
            r = by_impl.get(i)
            ms = f"{r.seconds * 1e3:.1f}" if r and r.seconds else (r.note.split(":")[0] if r else "-")
            mib = f"{r.peak_bytes / 2**20:.1f}" if r and r.peak_bytes is not None else "-"
            line += f" {ms:>14} {mib:>14}"
        ours, ref = by_impl.get("danet_ext"), by_impl.get("reference")
        if ours and ref and ours.seconds and ref.seconds:
            line += f" {ref.seconds / ours.seconds:>8.2f}x"
            if ours.peak_bytes and ref.peak_bytes:
                line += f" {ours.peak_bytes / ref.peak_bytes:>8.1%}"
        lines.append(line)
    return "\n".join(lines)


def plot_results(results: List[Result], out_dir: str, op: str, title: str, stem: str,
                 series_key: Optional[str] = None) -> Optional[str]:
    """Time and peak memory against feature-map size (log scales), one line per impl and mode."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in results if r.op == op and r.seconds]
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    keys = sorted({(r.impl, r.mode, r.extra.get(series_key) if series_key else None) for r in rows}, key=str)
    for impl, mode, series in keys:
        sel = sorted((r for r in rows if (r.impl, r.mode) == (impl, mode)
                      and (series_key is None or r.extra.get(series_key) == series)), key=lambda r: r.n)
        label = f"{impl} {mode}" + (f" {series_key}={series}" if series_key else "")
        style = "-" if mode == "forward" else "--"
        axes[0].plot([r.n for r in sel], [r.seconds * 1e3 for r in sel], style, marker="o", label=label)
        mem = [(r.n, r.peak_bytes / 2**20) for r in sel if r.peak_bytes]
        if mem:
            axes[1].plot(*zip(*mem), style, marker="o", label=label)
    for ax, ylabel in zip(axes, ("time (ms)", "peak extra memory (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("positions N = H x W")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = os.path.join(out_dir, f"{stem}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
