"""The sweep's table on stdout and its plot, both from the JSON report."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from lfm_mlx.memory import GB
from lfm_mlx.report import text_table
from lfm_mlx.sweep.config import _SELF
from lfm_mlx.sweep.machine import predicted_used


def _fit_label(calibrated_from) -> str:
    if calibrated_from is None:
        return "raw"
    if calibrated_from == _SELF:
        return "self"
    return calibrated_from if isinstance(calibrated_from, str) else ",".join(map(str, calibrated_from))


def format_table(report: dict) -> str:
    """The per-size table printed on stdout (GB = 1e9 bytes). 'fit from': the sizes whose
    measurements calibrated this size's prediction ('self': the calibration point, not a test)."""
    rows = []
    for r in report["sizes"]:
        m = r["measured"] or {}
        rows.append({
            "size": r["size"], "status": r["status"], "fit from": _fit_label(r["calibrated_from"]),
            "predicted GB": r["estimate"]["predicted_used"] / GB, "measured GB": m["used"] / GB if m else None,
            "error": r.get("error"), "raw error": r.get("raw_error"), "step est GB": r["estimate"]["total"] / GB,
            "MLX peak GB": m["mlx_peak"] / GB if m else None, "step error": r.get("step_error"),
            "RSS GB": m["rss"] / GB if m else None, "step s": m.get("step_s"), "tokens/s": m.get("tokens_per_s"),
        })
        if "ranks" in r:  # under mlx.launch: each rank's measured GB, the all-reduce of a step
            ranks = r["ranks"]
            rows[-1].update({"rank GB": "/".join(f"{u / GB:.3f}" for u in ranks["rank_used"]),
                             "all-reduce MB": ranks["allreduce_bytes"] / 1e6, "all-reduce s": ranks["allreduce_s"]})
    columns = ["size", "status", "fit from", "predicted GB", "measured GB", "error", "raw error", "step est GB",
               "MLX peak GB", "step error", "RSS GB", "step s", "tokens/s"]
    if report.get("world_size", 1) > 1:
        columns += ["rank GB", "all-reduce MB", "all-reduce s"]
    fmt = {c: ".3f" for c in columns if c.endswith("GB")}
    fmt.update({"error": "+.1%", "raw error": "+.1%", "step error": "+.1%", "step s": ".3f", "tokens/s": ",.0f",
                "all-reduce MB": ",.2f", "all-reduce s": ".4f"})
    budget, cal, rec = report["budget"], report["calibration"], report["recommendation"]
    lines = [
        f"group-size sweep: {report['model']['source']}, {report['batch']['tokens']} tokens/step, "
        f"{report['settings']['optimizer']}, frozen experts {report.get('expert_kernel', report.get('frozen_path'))['choice']}, attention "
        f"{report['attention']['kind']}, {report['machine']['backend']} "
        f"({report['machine']['gpu'] or report['machine']['cpu']})",
        f"budget {budget['total_gb']:g} GB: soft {budget['soft_gb']:g}, hard stop {budget['hard_gb']:g}; runtime "
        f"baseline {predicted_used(0, report['baseline']) / GB:.3f} GB (in 'predicted')",
        text_table(rows, columns, fmt),
    ]
    if cal["mode"] == "fitted":
        lines.append(
            f"calibration (each size from the smaller ones measured before it), final fit from sizes "
            f"{_fit_label(cal['from_sizes'])}: activation side x{cal['activation_factor']:.3f}, optimizer update "
            f"{cal['update_per_trainable_byte']:.2f} x trainable bytes {cal['update_intercept'] / GB:+.3f} GB, "
            f"runtime overhead during a step {cal['runtime_overhead'] / GB:+.3f} GB")
    elif cal["mode"] == "given":
        lines.append(f"calibration: given factor x{cal['factor']:.3f} on the whole estimate")
    for s in report["skipped_sizes"]:
        lines.append(f"size {s['size']}: skipped ({s['reason']})")
    tested = [r["size"] for r in report["sizes"] if r.get("error") is not None and r["calibrated_from"] != _SELF]
    if tested:
        verdict = "within" if report["within_tolerance"] else "NOT within"
        lines.append(f"estimate vs measured: {verdict} {report['tolerance']:.0%} for every size predicted before it "
                     f"ran (sizes {', '.join(map(str, tested))})")
    else:
        lines.append("estimate vs measured: no size was predicted and then run, nothing to compare")
    last, stop = report["last_safe_size"], report["stop"]
    how = {"refused": "refused by the estimate", "stopped": "stopped by the watchdog"}
    lines.append(f"last safe size: {last if last is not None else 'none'}"
                 + (f" (escalation ended: size {stop['size']} {how[stop['status']]})" if stop else ""))
    if rec["group_size"] is not None:
        lines.append(f"recommended: group size {rec['group_size']}, stride {rec['stride']} ({rec['groups']} groups). "
                     f"{rec['why']}")
    else:
        lines.append(f"recommended: none. {rec['why']}")
    return "\n".join(lines)


def plot_sweep(json_path: str | Path, out_png: str | Path | None = None) -> Path:
    """Plot a sweep report from its JSON: memory (predicted and measured, with the soft and hard
    limits) and step time against group size. Writes next to the JSON unless `out_png` is given."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    json_path = Path(json_path)
    report = json.loads(json_path.read_text())
    out_png = Path(out_png) if out_png else json_path.with_suffix(".png")
    sizes = report["sizes"]
    ran = [r for r in sizes if r["measured"]]
    fig, (mem, speed) = plt.subplots(1, 2, figsize=(11, 4.2))
    mem.plot([r["size"] for r in sizes], [r["estimate"]["predicted_used"] / GB for r in sizes], "o--",
             label="predicted (estimate + runtime)")
    mem.plot([r["size"] for r in ran], [r["measured"]["used"] / GB for r in ran], "s-",
             label="measured (watchdog figure)")
    mem.plot([r["size"] for r in sizes], [r["estimate"]["total"] / GB for r in sizes], "x--", color="gray",
             label="estimate (step, MLX)")
    mem.plot([r["size"] for r in ran], [r["measured"]["mlx_peak"] / GB for r in ran], "^:", label="measured MLX peak")
    for r in sizes:
        if r["status"] in ("refused", "stopped"):
            mem.annotate(r["status"], (r["size"], r["estimate"]["predicted_used"] / GB), textcoords="offset points",
                         xytext=(4, 6), color="red")
    budget = report["budget"]
    mem.axhline(budget["hard_gb"], color="red", linestyle="--", label=f"hard stop {budget['hard_gb']:g} GB")
    mem.axhline(budget["soft_gb"], color="orange", linestyle=":", label=f"soft limit {budget['soft_gb']:g} GB")
    highest = max([r["estimate"]["predicted_used"] for r in sizes] + [r["measured"]["used"] for r in ran], default=0)
    if 0 < highest / GB < 0.1 * budget["soft_gb"]:
        mem.set_yscale("log")  # a tiny model far below the limits: keep both visible
    mem.set_xlabel("group size (MoE layers)")
    mem.set_ylabel("peak memory (GB)")
    mem.set_title("memory per step")
    mem.grid(alpha=0.3)
    mem.legend(fontsize=7, loc="best")
    timed = [r for r in ran if r["measured"]["step_s"] is not None]
    speed.plot([r["size"] for r in timed], [r["measured"]["step_s"] for r in timed], "o-", color="tab:green")
    speed.set_xlabel("group size (MoE layers)")
    speed.set_ylabel("step time (s, median)")
    speed.set_title(f"step time, {report['batch']['tokens']} tokens")
    speed.grid(alpha=0.3)
    fig.suptitle(f"{report['model']['source']} on {report['machine']['backend']} "
                 f"({report['machine']['gpu'] or report['machine']['cpu']})", fontsize=10)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{out_png.name}.tmp-", suffix=".png", dir=out_png.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the plot is an ordinary file
        os.replace(tmp, out_png)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out_png
