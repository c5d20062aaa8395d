"""lfm_mlx.sweep on tiny-moe: a real sweep, a refusal by the estimate, a stop by the watchdog.

The tiny model's memory is mostly the runtime baseline (~0.3 GB), and group sizes differ by ~2 MB,
less than RSS noise; so the stop tests set budgets a few tens of MB around the baseline that the
first (generous) sweep measured in a fresh process like theirs, wide enough to be robust.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lfm_mlx.memory import GB
from lfm_mlx.sweep import EXIT_BAD_INPUT, EXIT_NOTHING_FITS, PLOT_NAME, REPORT_NAME, TOLERANCE, main, plot_sweep

ROOT = Path(__file__).resolve().parents[1]


def run_cli(out: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lfm_mlx.sweep", "--preset", "tiny-moe", "--out", str(out), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.fixture(scope="module")
def generous(tmp_path_factory):
    """A whole sweep under the default 64 GB budget: every size of tiny-moe (6 MoE layers) fits."""
    out = tmp_path_factory.mktemp("sweep-ok")
    proc = run_cli(out, "--seq-len", "256", "--steps", "2", "--group-sizes", "1,2,4,6,8")
    assert proc.returncode == 0, proc.stderr
    return proc, out, json.loads((out / REPORT_NAME).read_text())


def test_sweep_measures_every_size_within_tolerance(generous):
    proc, out, report = generous
    assert "size  status  fit from  predicted GB  measured GB  error" in proc.stdout
    assert "last safe size: 6" in proc.stdout
    ran = [r for r in report["sizes"] if r["status"] == "ok"]
    assert [r["size"] for r in ran] == [1, 2, 4, 6]
    assert report["skipped_sizes"] == [{"size": 8, "reason": "the model has 6 MoE layers"}]
    assert report["stop"] is None and report["last_safe_size"] == 6
    baseline = report["baseline"]
    assert baseline["unified"] and baseline["rss"] > 0
    for r in ran:
        m, est = r["measured"], r["estimate"]
        assert r["layers"] == list(range(2, 2 + r["size"]))  # the first MoE layers: worst-case backward
        assert len(r["steps"]) == 2 and m["timed_steps"] == 1 and m["step_s"] > 0
        assert m["tokens_per_s"] == pytest.approx(256 / m["step_s"])
        assert m["mlx_peak"] >= report["model"]["weights_bytes"]  # the step holds the model
        assert m["used"] == max(max(s["rss"], s["active"] + s["cache"], s["peak"]) for s in r["steps"])
        # On the CPU backend the step's peak is the process's (Linux peak RSS), not MLX's alone.
        assert m["process_peak"] >= m["rss"] and m["used"] >= baseline["rss"] + m["mlx_peak"] // 2
        # The memory model, recomputed from the stored numbers: runtime + estimate vs the watchdog's figure.
        assert est["predicted_used"] == baseline["rss"] + est["runtime_overhead"] + est["total"]
        assert m["backward_peak"] > m["active_before"] and m["update_peak"] > m["active_before"]
        error = (est["predicted_used"] - m["used"]) / m["used"]
        assert error == pytest.approx(r["error"])
        assert abs(error) <= TOLERANCE, (r["size"], error)
    # Calibration: each size predicted from the smaller ones only; the first calibrates itself.
    cal = report["calibration"]
    assert cal["mode"] == "fitted" and cal["from_sizes"] == [1, 2, 4, 6] and len(cal["points"]) == 4
    assert [r["calibrated_from"] for r in ran[1:]] == [[1], [1, 2], [1, 2, 4]]
    assert ran[0]["calibrated_from"].startswith("itself") and abs(ran[0]["error"]) < 1e-3
    assert "for every size predicted before it ran (sizes 2, 4, 6)" in proc.stdout
    assert report["within_tolerance"] is True
    # The uncalibrated estimate grows with the group by exact byte counts.
    totals = [r["raw_estimate"]["total"] for r in ran]
    assert all(a < b for a, b in zip(totals, totals[1:]))
    rec = report["recommendation"]
    assert (rec["group_size"], rec["stride"], rec["groups"]) == (6, 5, 1)
    versions = report["machine"]["versions"]
    assert versions["mlx"] and versions["mlx-lm"] and versions["lfm_mlx"] and versions["python"]
    assert report["machine"]["backend"] == "cpu" and report["machine"]["ram_bytes"] > 0


def test_plot_is_made_from_the_json(generous, tmp_path):
    _, out, _ = generous
    assert (out / PLOT_NAME).read_bytes()[:4] == b"\x89PNG"
    again = plot_sweep(out / REPORT_NAME, tmp_path / "again.png")
    assert again.read_bytes()[:4] == b"\x89PNG" and again.stat().st_size > 10_000


def budget_args(baseline_gb: float, soft_mb: float, hard_mb: float) -> list[str]:
    return ["--budget-gb", f"{baseline_gb + (hard_mb + 20) / 1000:.4f}",
            "--soft-gb", f"{baseline_gb + soft_mb / 1000:.4f}", "--hard-gb", f"{baseline_gb + hard_mb / 1000:.4f}"]


def test_estimate_over_the_hard_stop_refuses_without_running(generous, tmp_path):
    # At 1024 tokens the first size's step is estimated at ~80 MB: over a hard stop 30 MB above the runtime.
    baseline_gb = generous[2]["baseline"]["rss"] / GB
    proc = run_cli(tmp_path, "--seq-len", "1024", "--steps", "2", "--group-sizes", "1,2,4",
                   *budget_args(baseline_gb, soft_mb=20, hard_mb=30))
    assert proc.returncode == EXIT_NOTHING_FITS, proc.stderr
    report = json.loads((tmp_path / REPORT_NAME).read_text())
    first = report["sizes"][0]
    assert first["status"] == "refused" and first["measured"] is None and "steps" not in first
    assert "exceeds the hard stop" in first["reason"] and "GB + estimated step" in first["reason"]
    assert first["estimate"]["predicted_used"] > report["budget"]["hard_gb"] * GB
    assert [s["reason"] for s in report["skipped_sizes"]] == ["escalation stopped at size 1"] * 2
    assert report["stop"]["status"] == "refused" and report["last_safe_size"] is None
    assert report["recommendation"]["group_size"] is None
    assert "last safe size: none (escalation ended: size 1 refused by the estimate)" in proc.stdout
    assert (tmp_path / PLOT_NAME).exists()


def test_watchdog_stops_a_size_the_estimate_let_through(generous, tmp_path):
    # A given calibration of 0.01 makes the estimate ~100x too small (a wrong memory model): the size is
    # admitted, really runs, and its real memory (~80 MB above the runtime) crosses the hard stop at +30 MB.
    baseline_gb = generous[2]["baseline"]["rss"] / GB
    proc = run_cli(tmp_path, "--seq-len", "1024", "--steps", "2", "--group-sizes", "1,2", "--calibrate", "0.01",
                   *budget_args(baseline_gb, soft_mb=20, hard_mb=30))
    assert proc.returncode == EXIT_NOTHING_FITS, proc.stderr
    report = json.loads((tmp_path / REPORT_NAME).read_text())
    first = report["sizes"][0]
    assert first["status"] == "stopped" and "memory hard stop" in first["reason"]
    assert first["estimate"]["predicted_used"] <= report["budget"]["hard_gb"] * GB  # admitted
    assert first["steps"][-1]["level"] == "hard"
    assert first["measured"]["used"] >= report["budget"]["hard_gb"] * GB
    assert report["calibration"] == {"mode": "given", "factor": 0.01, "runtime_overhead": 0, "points": []}
    assert report["skipped_sizes"] == [{"size": 2, "reason": "escalation stopped at size 1"}]
    assert report["stop"]["status"] == "stopped" and report["last_safe_size"] is None
    assert "last safe size: none (escalation ended: size 1 stopped by the watchdog)" in proc.stdout


def test_bad_input_names_the_setting_and_the_fix(tmp_path, capsys):
    assert main(["--preset", "tiny-dense", "--steps", "0", "--out", str(tmp_path)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "--preset 'tiny-dense' is not an MoE preset" in err and "tiny-moe" in err
    assert "--steps 0 must be >= 1" in err
    assert main(["--preset", "tiny-moe", "--calibrate", "twice", "--out", str(tmp_path)]) == EXIT_BAD_INPUT
    assert "--calibrate 'twice': use fit, none or a factor" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--preset", "tiny-moe", "--group-sizes", "1,x"])
    assert "give comma-separated integers" in capsys.readouterr().err
    assert main(["--preset", "tiny-moe", "--soft-gb", "61", "--out", str(tmp_path)]) == EXIT_BAD_INPUT
    assert "soft_gb < hard_gb" in capsys.readouterr().err


def test_cli_says_what_it_sweeps_a_line_per_size_and_quiet_leaves_the_end_line(generous, tmp_path):
    proc, out, report = generous
    start, *lines = proc.stderr.splitlines()
    assert start.startswith("lfm-mlx sweep: group sizes 1,2,4,6,8 of preset tiny-moe on Device(cpu, 0) (BLAS: "), start
    assert (": 2 step(s) each of 256 random tokens, adamw, masters split, experts auto; memory soft/hard 54/60 GB of 64 "
            "(machine ") in start and start.endswith(f"; writing {out}"), start
    assert "\r" not in proc.stderr and all(line.startswith("lfm-mlx sweep: ") for line in lines), proc.stderr
    assert sum(line.startswith("lfm-mlx sweep: size ") for line in lines) >= 4  # a line per size measured
    plot = f"{out / PLOT_NAME}" if (out / PLOT_NAME).exists() else "not made ("
    assert proc.stdout.splitlines()[-1].startswith(
        f"sweep: largest group size within the budget: 6; report {out / REPORT_NAME}, plot {plot}")

    quiet = run_cli(tmp_path, "--seq-len", "64", "--steps", "2", "--group-sizes", "1", "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    assert quiet.stdout.startswith("sweep: largest group size within the budget: 1; report ")
    assert len(quiet.stdout.splitlines()) == 1


def test_two_ranks_report_each_ranks_memory_and_the_all_reduce_and_rank_0_alone_writes(generous, tmp_path):
    """mlx.launch -n 2 --backend ring: each rank in its own directory, as if on its own machine."""
    from test_distributed import LAUNCH, free_port_pair

    for rank in (0, 1):
        (tmp_path / f"rank{rank}").mkdir()
    sweep = f"{sys.executable} -m lfm_mlx.sweep --preset tiny-moe --seq-len 128 --steps 2 --group-sizes 1,2 --out out"
    proc = subprocess.run([str(LAUNCH), "-n", "2", "--backend", "ring", "--starting-port", str(free_port_pair()),
                           "--", "bash", "-c", f'cd rank$MLX_RANK && exec {sweep}'], cwd=tmp_path, timeout=300,
                          env={**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True)
    assert "sweep: largest group size within the budget: 2" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stdout.count("group-size sweep:") == 1 and "rank GB" in proc.stdout  # rank 0's table alone
    assert not any((tmp_path / "rank1").iterdir())  # rank 1 wrote nothing
    report = json.loads((tmp_path / "rank0" / "out" / REPORT_NAME).read_text())
    assert report["world_size"] == 2
    one, two = (r["ranks"] for r in report["sizes"])
    for r in (one, two):
        assert r["world_size"] == 2 and len(r["rank_used"]) == len(r["rank_mlx_peak"]) == 2
        assert min(r["rank_used"] + r["rank_mlx_peak"]) > 0 and r["allreduce_bytes"] > 0 and r["allreduce_s"] > 0
    assert two["allreduce_bytes"] == 2 * one["allreduce_bytes"]  # tiny-moe's MoE layers are alike
    # One process: the report and table as before, nothing of ranks.
    assert "world_size" not in generous[2] and not any("ranks" in r for r in generous[2]["sizes"])
    assert "rank GB" not in generous[0].stdout


def test_the_old_frozen_path_flag_and_field_still_work_with_one_warning(capsys, monkeypatch):
    """--frozen-path (and SweepConfig.frozen_path, value 'batched') are --expert-kernel's old spellings."""
    from lfm_mlx import console
    from lfm_mlx.sweep.cli import main as sweep_main
    from lfm_mlx.sweep.config import SweepConfig

    monkeypatch.setattr(console, "_WARNED", set())
    assert SweepConfig(preset="tiny-moe", frozen_path="batched").expert_kernel == "blocks"
    assert SweepConfig(preset="tiny-moe", expert_kernel="batched").expert_kernel == "blocks"
    assert capsys.readouterr().err.count("warning") == 1
    monkeypatch.setattr(console, "_WARNED", set())
    assert sweep_main(["--preset", "not-a-preset", "--frozen-path", "batched", "-q"]) == 2  # checked, then refused
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "--frozen-path is deprecated; use --expert-kernel" in err, err
