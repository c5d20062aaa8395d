"""Tables and plots made from JSON reports (never from in-memory state, so any run can be re-plotted)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence


def _cells(rows: Sequence[dict], columns: Sequence[str], formats: dict[str, str] | None) -> list[list[str]]:
    formats = formats or {}
    out = []
    for row in rows:
        line = []
        for column in columns:
            value, spec = row.get(column), formats.get(column)
            if value is None or value == "":
                line.append("-")
            elif spec and isinstance(value, (int, float)) and not isinstance(value, bool):
                line.append(format(value, spec))
            else:
                line.append(str(value))
        out.append(line)
    return out


def text_table(rows: Sequence[dict], columns: Sequence[str], formats: dict[str, str] | None = None) -> str:
    """A fixed-width table; `formats` maps a column to a format spec such as '.1%' or ',.0f'."""
    cells = _cells(rows, columns, formats)
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict], columns: Sequence[str], formats: dict[str, str] | None = None) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in _cells(rows, columns, formats)]
    return "\n".join(lines)


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSON-lines file; a torn last line (a killed writer) is skipped, not fatal."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_series(series: Iterable[tuple[str, Sequence[float], Sequence[float]]], out_png: str | Path,
                title: str, xlabel: str, ylabel: str, hline: tuple[float, str] | None = None) -> Path:
    """One line per (label, xs, ys); an optional horizontal reference line (value, label)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, xs, ys in series:
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=label)
    if hline is not None:
        ax.axhline(hline[0], color="red", linestyle="--", label=hline[1])
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)


def plot_bars(labels: Sequence[str], values: Sequence[float], out_png: str | Path, title: str,
              ylabel: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(range(len(labels)), values, color="tab:blue")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=20, ha="right")
    for bar, value in zip(bars, values):
        ax.annotate(f"{value:.0%}" if max(values, default=0) <= 1 else f"{value:.3g}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)


def plot_points(points: Sequence[tuple[str, float, float]], out_png: str | Path, title: str, xlabel: str,
                ylabel: str, marked: str | None = None) -> Path:
    """One labelled point per (label, x, y); the point labelled `marked` drawn as a red star."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, x, y in points:
        star = label == marked
        ax.scatter([x], [y], marker="*" if star else "o", s=180 if star else 40,
                   color="tab:red" if star else "tab:blue", zorder=3)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)
