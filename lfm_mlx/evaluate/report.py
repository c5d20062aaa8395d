"""Eval reports: summary.md, report.json, and the per-category comparison of two reports (--compare)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lfm_mlx.errors import InvalidInput, read_json_input
from lfm_mlx.fsutil import atomic_write_json, atomic_write_text

REPORT_FORMAT = "lfm_mlx.eval_report"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def summary_markdown(report: dict) -> str:
    """A short human summary of a report."""
    m = report["metrics"]
    lines = [f"# Tool-call eval: {', '.join(s['name'] for s in report['suites'])}", ""]
    backend = report["backend"]
    lines.append(f"Backend: {backend.get('kind')} `{backend.get('model') or backend.get('url')}`"
                 + (f" + adapters `{backend['adapter_path']}`" if backend.get("adapter_path") else "")
                 + (f", {backend['dtype']} compute, loaded by {backend['loaded_by']}" if backend.get("dtype") else ""))
    settings = report.get("settings", {})
    lines.append(f"Settings: {settings.get('repeats')} repeat(s), max {settings.get('max_tokens')} tokens, "
                 f"temperature {settings.get('temperature')}, {'raw text parsing' if settings.get('raw') else 'structured calls only'}")
    if not report["complete"]:
        lines += ["", f"**Incomplete run** ({m['cases']} cases done): {report['error']}"]
    lines += ["", "| metric | value |", "|---|---|",
              f"| overall | {m['passed']}/{m['runs']} ({_pct(m['pass_rate'])}) |",
              f"| structured tool-call rate | {_pct(m['structured_tool_call_rate'])} |",
              f"| no-tool false-positive rate | {_pct(m['no_tool_false_positive_rate'])} |",
              f"| finalization | {_pct(m['finalization_rate'])} |",
              f"| text-tool leaks | {m['text_tool_leaks']} |",
              f"| malformed calls | {m['malformed_calls']} |",
              f"| loops | {m['loops']} |"]
    if m["stability"] is not None:
        lines.append(f"| stable cases | {m['stable_cases']} ({_pct(m['stability'])}) |")
    lines += ["", "Structured tool-call rate: tool cases answered with a structured call, right or wrong. "
              "No-tool false positives: cases that needed no call but got one. Finalization: answers from a tool "
              "result. Text-tool leaks: calls written in plain text, which a server does not return as tool_calls. "
              "Malformed: call text no parser could read (or a server dropped). Loops: a call repeated."]
    lines += ["", "| category | passed | rate |", "|---|---|---|"]
    lines += [f"| {name} | {e['passed']}/{e['runs']} | {_pct(e['pass_rate'])} |" for name, e in m["per_category"].items()]
    if m["failure_types"]:
        lines += ["", "Failures: " + ", ".join(f"{k} {v}" for k, v in m["failure_types"].items())]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write report.json and summary.md into out_dir atomically; return both paths."""
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "summary.md", summary_markdown(report))
    return out_dir / "report.json", out_dir / "summary.md"


def _load_report(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    report = read_json_input(path, "pass a report.json (or its directory) that lfm-mlx eval wrote",
                             "pass a report.json that lfm-mlx eval wrote")
    if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT or "metrics" not in report:
        raise InvalidInput(f"{path} is not an lfm_mlx eval report (no format {REPORT_FORMAT!r} with metrics)")
    return report


def compare_reports(before: dict, after: dict) -> list[dict]:
    """Per-category pass rates of two reports and their difference (percentage points), then overall."""
    rows = []
    first, second = before["metrics"]["per_category"], after["metrics"]["per_category"]
    for name in sorted(set(first) | set(second)):
        a, b = first.get(name, {}).get("pass_rate"), second.get(name, {}).get("pass_rate")
        rows.append({"category": name, "before": a, "after": b, "runs": (first.get(name, {}).get("runs"), second.get(name, {}).get("runs")),
                     "delta_pp": None if a is None or b is None else round(100 * (b - a), 1)})
    a, b = before["metrics"]["pass_rate"], after["metrics"]["pass_rate"]
    rows.append({"category": "overall", "before": a, "after": b, "runs": (before["metrics"]["runs"], after["metrics"]["runs"]),
                 "delta_pp": None if a is None or b is None else round(100 * (b - a), 1)})
    return rows


def compare_markdown(before: dict, after: dict, names: tuple[str, str] = ("before", "after")) -> str:
    """The table a user reads to see what a fine-tune cost or gained, per category."""
    lines = [f"| category | {names[0]} | {names[1]} | delta |", "|---|---|---|---|"]
    for row in compare_reports(before, after):
        delta = "n/a" if row["delta_pp"] is None else f"{row['delta_pp']:+.1f} pp"
        lines.append(f"| {row['category']} | {_pct(row['before'])} | {_pct(row['after'])} | {delta} |")
    # Deltas mean something only over the same cases and settings: say when they differ.
    if [s.get("sha256") for s in before["suites"]] != [s.get("sha256") for s in after["suites"]]:
        lines.append("\nNote: the two reports ran different suites or suite data.")
    if before.get("settings") != after.get("settings"):
        lines.append(f"\nNote: settings differ: {before.get('settings')} vs {after.get('settings')}")
    for report, name in ((before, names[0]), (after, names[1])):
        if not report.get("complete"):
            lines.append(f"\nNote: {name} is an incomplete run ({report.get('error')}).")
    return "\n".join(lines) + "\n"


def compare_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lfm-mlx eval --compare", description="Per-category deltas of two eval reports.")
    parser.add_argument("--compare", nargs=2, required=True, metavar=("BEFORE", "AFTER"), help="two report.json files (or their directories)")
    args = parser.parse_args(argv)
    try:
        before, after = (_load_report(path) for path in args.compare)
    except (ValueError, FileNotFoundError) as err:
        print(f"lfm-mlx eval: {err}", file=sys.stderr)
        return 2
    print(compare_markdown(before, after, tuple(args.compare)))
    return 0
