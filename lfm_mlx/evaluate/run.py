"""Running suites against a backend: the report dict, its metrics, the partial report after every case."""

from __future__ import annotations

import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from lfm_mlx import console
from lfm_mlx.evaluate.backends import Backend, BackendError, EndpointBackend, MLXBackend
from lfm_mlx.evaluate.grading import grade
from lfm_mlx.evaluate.report import REPORT_FORMAT, write_report
from lfm_mlx.fsutil import atomic_write_json
from lfm_mlx.suites import Suite, load_suite
from lfm_mlx.suites.observe import Response


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def compute_metrics(cases: list[dict]) -> dict:
    """Overall and per-category / per-suite metrics from the graded case records."""
    runs = [(c, r) for c in cases for r in c["runs"]]
    tool_runs = [r for c, r in runs if c["expect"] == "tool_call"]
    quiet_runs = [r for c, r in runs if c["expect"] != "tool_call"]
    final_runs = [r for c, r in runs if c["expect"] == "final_answer"]

    def group(field: str) -> dict:
        out: dict[str, dict] = {}
        for case, run in runs:
            entry = out.setdefault(case[field], {"runs": 0, "passed": 0})
            entry["runs"] += 1
            entry["passed"] += run["passed"]
        for entry in out.values():
            entry["pass_rate"] = _rate(entry["passed"], entry["runs"])
        return dict(sorted(out.items()))

    repeated = [c for c in cases if len(c["runs"]) > 1]
    return {
        "cases": len(cases),
        "runs": len(runs),
        "passed": sum(r["passed"] for _, r in runs),
        "pass_rate": _rate(sum(r["passed"] for _, r in runs), len(runs)),
        "per_category": group("category"),
        "per_suite": group("suite"),
        "structured_tool_call_rate": _rate(sum(r["structured_calls"] > 0 for r in tool_runs), len(tool_runs)),
        "no_tool_false_positive_rate": _rate(sum(bool(r["calls"] or r["leaked_calls"]) for r in quiet_runs), len(quiet_runs)),
        "finalization_rate": _rate(sum(r["passed"] for r in final_runs), len(final_runs)),
        "text_tool_leaks": sum(bool(r["leaked_calls"]) for _, r in runs),
        "malformed_calls": sum(bool(r["malformed"]) for _, r in runs),
        "loops": sum(r["loop"] for _, r in runs),
        "errors": sum(r["failure"] == "error" for _, r in runs),
        "failure_types": dict(Counter(r["failure"] for _, r in runs if r["failure"]).most_common()),
        "stable_cases": sum(c["stable"] for c in repeated) if repeated else None,
        "stability": _rate(sum(c["stable"] for c in repeated), len(repeated)),
        "flaky_cases": [f"{c['suite']}/{c['id']}" for c in repeated if not c["stable"]],
    }


BATCH_CASES = 32  # cases a batching backend answers at once; the report is written after each batch


def _answers(backend: Backend, cases: list, repeats: int, max_tokens: int, temperature: float,
             batched: bool) -> list[list[Response]]:
    """Each case's `repeats` answers: all in one `respond_many` call when `batched`, else one call each."""
    if batched:
        flat = backend.respond_many([(c.messages, c.tools) for c in cases for _ in range(repeats)], max_tokens)
        return [flat[i * repeats:(i + 1) * repeats] for i in range(len(cases))]
    return [[backend.respond(c.messages, c.tools, max_tokens, temperature) for _ in range(repeats)] for c in cases]


def run_suites(suites: list[Suite], backend: Backend, repeats: int = 1, max_tokens: int = 256,
               temperature: float = 0.0, raw: bool = False, progress: bool = True,
               on_case: Callable[[dict], None] | None = None) -> dict:
    """Run every case `repeats` times and return the report dict.

    A BackendError (or Ctrl-C) stops the run: the report then holds the cases finished so far,
    `complete: false` and the error message. `on_case(report)` runs after each finished case (after each
    batch of BATCH_CASES, for a backend that answers greedy cases in batches: `batches`, `respond_many`).
    """
    if repeats < 1 or max_tokens < 1 or temperature < 0:
        raise ValueError(f"need repeats >= 1, max_tokens >= 1, temperature >= 0; got {repeats}, {max_tokens}, {temperature}")
    report: dict[str, Any] = {
        "format": REPORT_FORMAT, "version": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "complete": False, "error": None,
        "backend": backend.describe(),
        "settings": {"repeats": repeats, "max_tokens": max_tokens, "temperature": temperature, "raw": raw,
                     "decoding": "greedy" if temperature == 0 else "sampled"},
        "suites": [{"name": s.name, "path": str(s.path), "sha256": s.sha256, "cases": len(s.cases)} for s in suites],
        "cases": [],
    }
    total = sum(len(s.cases) for s in suites) * repeats
    bar = console.progress("eval", total, "run", show=progress)
    batched = temperature == 0 and getattr(backend, "batches", False)  # sampling stays one answer at a time
    report["settings"]["batched"] = batched
    try:
        for suite in suites:
            step = BATCH_CASES if batched else 1
            for first in range(0, len(suite.cases), step):
                cases = suite.cases[first:first + step]
                start = time.perf_counter()
                answers = _answers(backend, cases, repeats, max_tokens, temperature, batched)
                share = (time.perf_counter() - start) / (len(cases) * repeats)  # an answer's share of the time
                for case, responses in zip(cases, answers):
                    runs = []
                    for response in responses:
                        # A suite with its own rules (BFCL's AST checker) grades itself.
                        run = suite.grade(case, response, raw) if hasattr(suite, "grade") else grade(case, response, suite, raw)
                        run["seconds"] = round(share, 3)
                        runs.append(run)
                        bar.update(1)
                    passes = sum(r["passed"] for r in runs)
                    record = {"suite": suite.name, "id": case.id, "category": case.category, "expect": case.expect.kind,
                              "held_out": case.held_out, "passes": passes, "repeats": repeats,
                              "stable": passes in (0, repeats), "runs": runs}
                    report["cases"].append(record)
                if on_case is not None:
                    on_case(report)
        report["complete"] = True
    except BackendError as err:
        report["error"] = str(err)
    except KeyboardInterrupt:
        report["error"] = "interrupted (Ctrl-C)"
    finally:
        bar.close()
    report["metrics"] = compute_metrics(report["cases"])
    return report


def run_suite(suite: Suite | str | Path, backend: Backend, repeats: int = 1, max_tokens: int = 256,
              temperature: float = 0.0, raw: bool = False, progress: bool = False) -> dict:
    """Run one suite (a Suite, a path or a shipped suite name) and return its report dict."""
    if not isinstance(suite, Suite):
        suite = load_suite(suite)
    return run_suites([suite], backend, repeats, max_tokens, temperature, raw, progress)


def evaluate(backend: Backend, suites: list[Suite | str | Path], out_dir: str | Path, repeats: int = 1,
             max_tokens: int = 256, temperature: float = 0.0, raw: bool = False, progress: bool = True,
             command: str | None = None) -> dict:
    """Run suites (Suite objects, paths or shipped names) and write out_dir/report.json + summary.md.

    The report is rewritten after every case, so even a killed run leaves the cases it finished.
    `command` (the CLI line, if any) is recorded in the report for provenance.
    """
    suites = [s if isinstance(s, Suite) else load_suite(s) for s in suites]
    out_dir = Path(out_dir)

    def checkpoint(report: dict) -> None:
        partial = dict(report, command=command, error="run in progress", metrics=compute_metrics(report["cases"]))
        atomic_write_json(out_dir / "report.json", partial)

    report = run_suites(suites, backend, repeats, max_tokens, temperature, raw, progress, on_case=checkpoint)
    report["command"] = command
    write_report(report, out_dir)
    return report


def evaluate_model(model_dir: str | Path, suite_paths: list[str | Path], out_dir: str | Path,
                   adapter_path: str | Path | None = None, **kwargs: Any) -> dict:
    """Evaluate an MLX model directory (optionally with adapters) on suites; see `evaluate`."""
    return evaluate(MLXBackend(model_dir, adapter_path), suite_paths, out_dir, **kwargs)


def evaluate_endpoint(url: str, suite_paths: list[str | Path], out_dir: str | Path, model: str | None = None,
                      timeout: float = 120.0, **kwargs: Any) -> dict:
    """Evaluate an OpenAI-compatible endpoint on suites; see `evaluate`."""
    return evaluate(EndpointBackend(url, model, timeout), suite_paths, out_dir, **kwargs)
