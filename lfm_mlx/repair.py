"""Repair datasets from an eval report: the failed cases plus a balanced share of passing and no-tool cases.

    lfm-mlx repair-set runs/eval/report.json --name iter01 --out repair_datasets/

Each row is a structured chat row, `{"messages": [..., gold assistant turn], "tools": [...]}`: the gold
turn carries `tool_calls` (name + argument mapping, never raw tool text in content) or, for no-tool
and finalization cases, the case's example answer. The chat template renders the canonical call
syntax at training time. Held-out cases (the suite's `held_out` flag or --holdout) never reach train.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shlex
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from lfm_mlx.data import check_row
from lfm_mlx.evaluate import REPORT_FORMAT
from lfm_mlx.fsutil import atomic_dir
from lfm_mlx.suites import Case, Suite, gold_call, load_suite, resolve_suite_path
from lfm_mlx.tools import parse_tool_calls

MANIFEST_FORMAT = "lfm_mlx.repair_set"


def case_row(case: Case) -> dict | None:
    """The training row for a case: its messages + the gold assistant turn; None without a gold answer."""
    if case.expect.tool_call is not None:
        call = gold_call(case)
        if call is None:
            return None
        gold = {"role": "assistant", "content": "", "tool_calls": [call.to_openai()]}
    else:
        answer = case.expect.answer.example_answer
        if answer is None:
            return None
        if parse_tool_calls(answer).calls:  # a gold answer must never teach tool text in content
            raise ValueError(f"{case.suite}/{case.id}: example_answer contains tool-call text; write a plain answer")
        gold = {"role": "assistant", "content": answer}
    return {"messages": [dict(m) for m in case.messages] + [gold], "tools": case.tools}


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_report(path: str | Path) -> dict:
    """Read an eval report, checking that it is one."""
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"report {path} does not exist; run `lfm-mlx eval ... --out DIR` first") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}:{err.colno}: invalid JSON ({err.msg})") from None
    if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT:
        raise ValueError(f"{path}: not an lfm_mlx eval report (key 'format' should be {REPORT_FORMAT!r})")
    for key in ("suites", "cases"):
        if not isinstance(report.get(key), list):
            raise ValueError(f"{path}: key {key!r} is missing or not a list; is the report truncated?")
    return report


def _report_suites(report: dict, report_path: Path, overrides: list[str | Path]) -> dict[str, Suite]:
    """The suites a report was made from, checked against the hashes the report recorded."""
    by_name = {}
    for path in overrides:
        suite = load_suite(path)
        by_name[suite.name] = suite
    out = {}
    for entry in report["suites"]:
        name = entry["name"]
        if name not in by_name:
            recorded = Path(entry["path"])
            by_name[name] = load_suite(recorded if recorded.is_file() else resolve_suite_path(name))
        suite = by_name[name]
        if entry.get("sha256") and suite.sha256 != entry["sha256"]:
            raise ValueError(
                f"{report_path}: suite {name!r} ({suite.path}) changed since the eval (sha256 {suite.sha256[:12]} != "
                f"{entry['sha256'][:12]}); pass --suite with the file that was evaluated, or re-run the eval"
            )
        out[name] = suite
    return out


def _split(rows: list[tuple[Case, dict]], held: set[str], seed: int, valid_fraction: float,
           test_fraction: float) -> dict[str, list[tuple[Case, dict]]]:
    """Held-out cases go to test; the rest are shuffled into train / valid / test (valid gets >= 1 row)."""
    splits: dict[str, list] = {"train": [], "valid": [], "test": []}
    free = []
    for case, row in rows:
        if case.held_out or case.id in held or f"{case.suite}/{case.id}" in held:
            splits["test"].append((case, row))
        else:
            free.append((case, row))
    random.Random(seed).shuffle(free)
    n_valid = max(1, round(valid_fraction * len(free))) if len(free) >= 2 else 0
    n_test = round(test_fraction * len(free)) if len(free) - n_valid > 1 else 0
    splits["valid"] = free[:n_valid]
    splits["test"] += free[n_valid : n_valid + n_test]
    splits["train"] = free[n_valid + n_test :]
    return splits


def build_repair_set(report_path: str | Path, name: str, out_dir: str | Path, suites: list[str | Path] = (),
                     holdout: list[str] = (), seed: int = 0, passing_ratio: float = 0.5, no_tool_ratio: float = 0.5,
                     valid_fraction: float = 0.1, test_fraction: float = 0.1, command: str | None = None,
                     note: str | None = None, force: bool = False) -> dict:
    """Build out_dir/name/{train,valid,test}.jsonl + manifest.json from an eval report; return the manifest.

    Selection: every failed case (any run failed), plus up to passing_ratio x failures passing
    tool-call cases and no_tool_ratio x failures passing no-tool / finalization cases (seeded
    sample), so the repair does not teach calling tools everywhere. Cases without a gold answer
    are skipped and counted. The source report is copied in as source_report.json.
    """
    _check_options(name, passing_ratio, no_tool_ratio, valid_fraction, test_fraction)
    report_path = Path(report_path)
    report = load_report(report_path)
    suite_map = _report_suites(report, report_path, list(suites))
    failed, passing, quiet = _sort_cases(report, report_path, suite_map)
    rng = random.Random(seed)
    chosen_passing = rng.sample(passing, min(len(passing), round(passing_ratio * len(failed))))
    chosen_quiet = rng.sample(quiet, min(len(quiet), round(no_tool_ratio * len(failed))))
    rows, skipped, sources = _training_rows((("failure", failed), ("passing", chosen_passing),
                                             ("no_tool", chosen_quiet)))
    if not rows:
        raise ValueError(f"{report_path}: no case with a gold answer was selected ({dict(skipped)} skipped); nothing to write")

    splits = _split(rows, set(holdout), seed, valid_fraction, test_fraction)
    manifest = {
        "format": MANIFEST_FORMAT, "version": 1, "name": name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command, "note": note, "seed": seed,
        "source_report": _source_report_entry(report, report_path),
        "suites": [{"name": s.name, "path": str(s.path), "sha256": s.sha256} for s in suite_map.values()],
        "selection": {"failures": len(failed), "passing_available": len(passing), "passing_chosen": len(chosen_passing),
                      "no_tool_available": len(quiet), "no_tool_chosen": len(chosen_quiet), "skipped": dict(skipped),
                      "passing_ratio": passing_ratio, "no_tool_ratio": no_tool_ratio},
        "holdout": sorted(set(holdout) | {f"{c.suite}/{c.id}" for c, _ in rows if c.held_out}),
        "splits": {},
    }
    _write_set(Path(out_dir) / name, force, splits, sources, manifest, report_path)
    return manifest


def _check_options(name: str, passing_ratio: float, no_tool_ratio: float, valid_fraction: float,
                   test_fraction: float) -> None:
    """Refuse a dataset name that is not a plain directory name, and ratios or fractions out of range."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"--name {name!r}: use a plain directory name such as iter01")
    for label, value in (("passing_ratio", passing_ratio), ("no_tool_ratio", no_tool_ratio),
                         ("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if value < 0 or (label.endswith("fraction") and value >= 0.5):
            raise ValueError(f"{label}={value}: ratios must be >= 0 and fractions in [0, 0.5)")


def _sort_cases(report: dict, report_path: Path, suite_map: dict[str, Suite]) -> tuple[list[Case], list[Case], list[Case]]:
    """The report's cases, in its order, as (failed, passing tool-call, passing no-tool) suite cases."""
    cases_by_key = {(s.name, c.id): c for s in suite_map.values() for c in s.cases}
    failed, passing, quiet = [], [], []
    for record in report["cases"]:
        case = cases_by_key.get((record["suite"], record["id"]))
        if case is None:
            raise ValueError(f"{report_path}: case {record['suite']}/{record['id']} is not in suite {record['suite']!r}")
        if record["passes"] < len(record["runs"]):
            failed.append(case)
        elif case.expect.kind == "tool_call":
            passing.append(case)
        else:
            quiet.append(case)
    return failed, passing, quiet


def _training_rows(groups) -> tuple[list[tuple[Case, dict]], Counter, dict[str, str]]:
    """Each chosen case's training row (checked by the training loader's rules), the cases skipped for
    want of a gold answer (counted by reason), and which group each row came from (by SUITE/ID)."""
    rows, skipped, sources = [], Counter(), {}
    for source, group in groups:
        for case in group:
            row = case_row(case)
            if row is None:
                skipped["no_gold_call" if case.expect.kind == "tool_call" else "no_example_answer"] += 1
                continue
            _, problems = check_row(row, f"{case.suite}/{case.id}")  # the training loader's own row rules
            if problems:
                raise ValueError(f"suite {case.suite!r} case {case.id!r} makes an invalid training row: {'; '.join(problems)}")
            rows.append((case, row))
            sources[f"{case.suite}/{case.id}"] = source
    return rows, skipped, sources


def _source_report_entry(report: dict, report_path: Path) -> dict:
    """The manifest's record of the eval report the set was built from (copied in as source_report.json)."""
    return {"path": str(report_path), "copy": "source_report.json", "sha256": _file_sha256(report_path),
            "command": report.get("command"), "created": report.get("created"),
            "backend": report.get("backend"), "complete": report.get("complete"),
            "pass_rate": report.get("metrics", {}).get("pass_rate")}


def _write_set(folder: Path, force: bool, splits: dict[str, list[tuple[Case, dict]]], sources: dict[str, str],
               manifest: dict, report_path: Path) -> None:
    """Write the split files, the source report's copy and the manifest (its splits filled in) into
    `folder`, as a whole or not at all."""
    with atomic_dir(folder, replace=force) as tmp:
        for split, items in splits.items():
            text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for _, row in items)
            if items:  # mlx_lm's loader fails on an empty split file but accepts a missing one
                (tmp / f"{split}.jsonl").write_text(text)
            manifest["splits"][split] = {
                "file": f"{split}.jsonl" if items else None,
                "rows": len(items),
                "sha256": hashlib.sha256(text.encode()).hexdigest() if items else None,
                "per_category": dict(sorted(Counter(f"{c.suite}/{c.category}" for c, _ in items).items())),
                "per_source": dict(sorted(Counter(sources[f"{c.suite}/{c.id}"] for c, _ in items).items())),
                "cases": [f"{c.suite}/{c.id}" for c, _ in items],
            }
        (tmp / "source_report.json").write_bytes(report_path.read_bytes())
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lfm-mlx repair-set", description="Build a repair dataset from an eval report.")
    parser.add_argument("report", help="report.json written by `lfm-mlx eval`")
    parser.add_argument("--name", required=True, help="dataset name: writes OUT/NAME/{train,valid,test}.jsonl + manifest.json")
    parser.add_argument("--out", default="repair_datasets", help="parent directory (default repair_datasets)")
    parser.add_argument("--suite", action="append", default=[], help="suite file to use instead of the path in the report; repeatable")
    parser.add_argument("--holdout", action="append", default=[], help="case id (or SUITE/ID) kept out of train; repeatable")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--passing-ratio", type=float, default=0.5, help="passing tool-call cases per failure (default 0.5)")
    parser.add_argument("--no-tool-ratio", type=float, default=0.5, help="passing no-tool cases per failure (default 0.5)")
    parser.add_argument("--valid-fraction", type=float, default=0.1)
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--note", help="free text stored in the manifest (e.g. how the model was made)")
    parser.add_argument("--force", action="store_true", help="replace an existing OUT/NAME")
    args = parser.parse_args(argv)
    command = "lfm-mlx repair-set " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    try:
        manifest = build_repair_set(args.report, args.name, args.out, args.suite, args.holdout, args.seed,
                                    args.passing_ratio, args.no_tool_ratio, args.valid_fraction, args.test_fraction,
                                    command, args.note, args.force)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"lfm-mlx repair-set: {err}", file=sys.stderr)
        return 2
    counts = {split: info["rows"] for split, info in manifest["splits"].items()}
    print(f"wrote {Path(args.out) / args.name}: {counts}, skipped {manifest['selection']['skipped'] or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
