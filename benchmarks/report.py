"""Benchmark results as a markdown table and a PNG plot (JSON is the source of truth)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

from mrkd.atomic import atomic_open, atomic_write_text

ROW_KEYS = ("backend", "impl", "batch", "median_ms", "p90_ms", "images_per_s", "speedup_vs_baseline", "speedup")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return "" if value is None else str(value)


def markdown(results: Dict[str, dict]) -> str:
    """One section per benchmark; row lists become tables, scalars a bullet list."""
    lines: List[str] = []
    machine = results.get("machine", {})
    if machine:
        lines.append("Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items() if v is not None))
        lines.append("")
    for name, result in results.items():
        if name == "machine" or not isinstance(result, dict):
            continue
        lines.append(f"### {name}")
        lines.append("")
        scalars = {k: v for k, v in result.items() if not isinstance(v, (list, dict))}
        for key, value in scalars.items():
            lines.append(f"- {key}: {_fmt(value)}")
        # Row lists become tables; a dict of dicts (one entry per variant) becomes a table too.
        named = [dict(name=key, **value) for key, value in result.items() if isinstance(value, dict)]
        tables = [value for value in result.values() if isinstance(value, list) and value and isinstance(value[0], dict)]
        for table in tables + ([named] if named else []):
            columns = (["name"] if table is named else []) + [c for c in ROW_KEYS if any(c in row for row in table)]
            columns += sorted({c for row in table for c in row} - set(columns))
            lines.append("")
            lines.append("| " + " | ".join(columns) + " |")
            lines.append("|" + "---|" * len(columns))
            for row in table:
                lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
        lines.append("")
    return "\n".join(lines)


def speedup_rows(results: Dict[str, dict]) -> List[Tuple[str, float]]:
    """(label, speed-up) of every row that has a ratio against its baseline."""
    bars = []
    for name, result in results.items():
        if not isinstance(result, dict):
            continue
        for row in result.get("rows", []):
            ratio = row.get("speedup_vs_baseline", row.get("speedup"))
            if isinstance(ratio, (int, float)) and not isinstance(ratio, bool):
                bars.append((f"{name}: {row.get('backend', row.get('impl', '?'))} b{row.get('batch', '')}", ratio))
    return bars


def plot(results: Dict[str, dict], path: Path) -> Optional[str]:
    """Bar chart of speed-up against the baseline for every row that has one; returns None when
    written, else why not (no such row, matplotlib missing)."""
    from mrkd.deps import MissingDependencyError, require

    bars = speedup_rows(results)
    if not bars:
        return f"{path.name} not written: no row has a speed-up against a baseline"
    try:
        matplotlib = require("matplotlib", "the speed-up plot needs matplotlib")
    except MissingDependencyError as exc:
        return f"{path.name} not written: " + " ".join(str(exc).split())
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values = [label for label, _ in bars], [value for _, value in bars]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(values) + 1.5))
    ax.barh(range(len(values)), values, color="tab:blue")
    ax.axvline(1.0, color="k", lw=1, ls="--")
    ax.set_yticks(range(len(values)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("speed-up vs baseline (same run, same machine)")
    ax.invert_yaxis()
    fig.tight_layout()
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)
    return None


def write_all(results: Dict[str, dict], out_dir: Path) -> Tuple[Dict[str, Path], List[str]]:
    """Write results.json, RESULTS.md and (where there is something to plot) speedups.png; returns
    the files written and a line for each one that was not."""
    import json
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "RESULTS.md"}
    atomic_write_text(paths["json"], json.dumps(results, indent=2, default=str) + "\n")
    atomic_write_text(paths["markdown"], "# mrkd benchmark results\n\n" + markdown(results) + "\n")
    skipped = []
    why_not = plot(results, out_dir / "speedups.png")
    if why_not is None:
        paths["plot"] = out_dir / "speedups.png"
    else:
        skipped.append(why_not)
    return paths, skipped
