"""lfm_mlx.repair: repair sets from eval reports (selection, gold rows, held-out splits, manifest),
their use by mlx_lm's chat dataset loader, and the committed example under repair_datasets/."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from lfm_mlx.evaluate import Response, run_suite, write_report
from lfm_mlx.repair import build_repair_set, case_row, main
from lfm_mlx.suites import gold_call, load_suite
from lfm_mlx.tools import TOOL_CALL_START, parse_tool_calls, render_pythonic

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "lfm_mlx" / "templates" / "lfm2.5.jinja"


class HalfRightBackend:
    """Gold answers for every other case, plain text for the rest: a report with passes and failures."""

    def __init__(self, suite):
        self.index = {json.dumps(c.messages): (n, c) for n, c in enumerate(suite.cases)}

    def describe(self):
        return {"kind": "scripted"}

    def respond(self, messages, tools, max_tokens, temperature):
        n, case = self.index[json.dumps(messages)]
        if n % 2:
            return Response("I am not sure.", None)
        if case.expect.tool_call is None:
            return Response(case.expect.answer.example_answer, None)
        return Response(render_pythonic([gold_call(case)]), None)


@pytest.fixture(scope="module")
def report_path(tmp_path_factory) -> Path:
    suite = load_suite("hermes_agent")
    report = run_suite(suite, HalfRightBackend(suite))
    out = tmp_path_factory.mktemp("eval")
    write_report(report, out)
    return out / "report.json"


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_repair_set_selection_rows_and_splits(report_path, tmp_path):
    report = json.loads(report_path.read_text())
    failed = {c["id"] for c in report["cases"] if not c["runs"][0]["passed"]}
    manifest = build_repair_set(report_path, "iter01", tmp_path, holdout=["terminal-01"], seed=3)
    out = tmp_path / "iter01"
    sel = manifest["selection"]
    assert sel["failures"] == len(failed) and sel["skipped"] == {}
    assert sel["passing_chosen"] == min(sel["passing_available"], round(0.5 * len(failed)))
    assert sel["no_tool_chosen"] == min(sel["no_tool_available"], round(0.5 * len(failed)))

    suite = load_suite("hermes_agent")
    cases = {c.id: c for c in suite.cases}
    held = {c.id for c in suite.cases if c.held_out} | {"terminal-01"}
    seen = []
    for split in ("train", "valid", "test"):
        rows = read_rows(out / f"{split}.jsonl")
        info = manifest["splits"][split]
        assert info["rows"] == len(rows) == sum(info["per_category"].values())
        if rows:
            assert info["sha256"] == hashlib.sha256((out / f"{split}.jsonl").read_bytes()).hexdigest()
        for case_key, row in zip(info["cases"], rows):
            case = cases[case_key.split("/", 1)[1]]
            seen.append(case.id)
            assert split != "train" or case.id not in held
            assert row["tools"] == case.tools  # the exact schema the case offered
            assert row["messages"][:-1] == case.messages
            gold = row["messages"][-1]
            assert gold["role"] == "assistant"
            for message in row["messages"]:  # never raw tool text in content
                assert not parse_tool_calls(message.get("content") or "").calls
                assert TOOL_CALL_START not in (message.get("content") or "")
            if case.expect.tool_call is not None:
                (entry,) = gold["tool_calls"]
                assert entry["function"]["name"] == case.expect.tool_call.name
                assert isinstance(entry["function"]["arguments"], dict) and gold["content"] == ""
            else:
                assert gold["content"] == case.expect.answer.example_answer and "tool_calls" not in gold
    assert len(seen) == len(set(seen)) == sel["failures"] + sel["passing_chosen"] + sel["no_tool_chosen"]
    assert failed <= set(seen)
    held_seen = {f"hermes_agent/{c}" for c in held if c in seen}
    assert held_seen and held_seen <= set(manifest["splits"]["test"]["cases"])
    assert manifest["source_report"]["sha256"] == hashlib.sha256(report_path.read_bytes()).hexdigest()
    assert (out / "source_report.json").read_bytes() == report_path.read_bytes()
    assert manifest["suites"][0]["sha256"] == suite.sha256 and manifest["seed"] == 3

    again = build_repair_set(report_path, "iter01b", tmp_path, holdout=["terminal-01"], seed=3)
    assert again["splits"] == manifest["splits"]  # the seed fixes the selection and the split


def test_rows_render_canonical_calls_and_load_in_mlx_lm(report_path, tmp_path, tiny_dense_dir):
    from types import SimpleNamespace

    from mlx_lm.tokenizer_utils import load as load_tokenizer
    from mlx_lm.tuner.datasets import load_local_dataset

    from lfm_mlx.data import encode_row, trained_spans, validate_rows

    build_repair_set(report_path, "set", tmp_path)
    tokenizer = load_tokenizer(tiny_dense_dir)
    # lfm_mlx's own loader: every row valid, and the gold turn (canonical call syntax) is what gets trained.
    checked = validate_rows(sorted((tmp_path / "set").glob("*.jsonl")))
    assert checked.dropped == [] and len(checked.rows) == sum(1 for p in (tmp_path / "set").glob("*.jsonl") for _ in p.open())
    for row in checked.rows[:8]:
        spans = trained_spans(encode_row(row, tokenizer), tokenizer)
        gold = row.messages[-1]
        if gold.get("tool_calls"):
            call = gold["tool_calls"][0]["function"]
            assert spans[-1].startswith("<|tool_call_start|>[" + call["name"] + "(") and spans[-1].endswith("<|im_end|>")
        else:
            assert spans[-1] == gold["content"] + "<|im_end|>"
    train, valid, test = load_local_dataset(tmp_path / "set", tokenizer, SimpleNamespace(mask_prompt=True))
    assert len(train) and len(valid)
    start = tokenizer.convert_tokens_to_ids("<|tool_call_start|>")
    rows_with_calls = 0
    for dataset in (train, valid, test):
        for index in range(min(len(dataset), 12)):  # a dozen rows per split keep this test fast
            row = dataset[index]
            tokens, offset = dataset.process(row)
            assert 0 < offset < len(tokens)
            if "tool_calls" in row["messages"][-1]:
                rows_with_calls += 1
                assert start in tokens[offset:]  # the template renders the call in the trained completion
                text = tokenizer.decode(tokens[offset:])
                assert parse_tool_calls(text).calls[0].name == row["messages"][-1]["tool_calls"][0]["function"]["name"]
    assert rows_with_calls > 0


def test_cases_without_a_gold_answer_are_skipped_and_counted(tmp_path):
    suite = json.loads((REPO / "lfm_mlx" / "suites" / "hermes_agent.json").read_text())
    suite["cases"] = suite["cases"][:2] + [c for c in suite["cases"] if c["id"] == "no_tool-01"]
    del suite["cases"][0]["expect"]["tool_call"]["example_arguments"]  # a regex matcher alone is no gold
    del suite["cases"][2]["expect"]["no_tool_call"]["example_answer"]
    path = tmp_path / "hermes_small.json"
    path.write_text(json.dumps(suite))
    loaded = load_suite(path)
    assert case_row(loaded.cases[0]) is None and case_row(loaded.cases[1]) is not None
    report = run_suite(loaded, _Silent())
    write_report(report, tmp_path / "eval")
    manifest = build_repair_set(tmp_path / "eval" / "report.json", "s", tmp_path / "sets")
    assert manifest["selection"]["skipped"] == {"no_gold_call": 1, "no_example_answer": 1}
    assert sum(info["rows"] for info in manifest["splits"].values()) == 1


class _Silent:
    def describe(self):
        return {"kind": "scripted"}

    def respond(self, messages, tools, max_tokens, temperature):
        return Response("", None)


def test_changed_suite_and_bad_report_give_clear_errors(report_path, tmp_path):
    suite_copy = tmp_path / "hermes_agent.json"
    data = json.loads((REPO / "lfm_mlx" / "suites" / "hermes_agent.json").read_text())
    data["description"] = "edited after the eval"
    suite_copy.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="changed since the eval .* pass --suite"):
        build_repair_set(report_path, "x", tmp_path, suites=[suite_copy])
    not_report = tmp_path / "r.json"
    not_report.write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="not an lfm_mlx eval report"):
        build_repair_set(not_report, "x", tmp_path)
    with pytest.raises(ValueError, match="plain directory name"):
        build_repair_set(report_path, "../escape", tmp_path)


def test_cli_writes_once_and_refuses_to_overwrite(report_path, tmp_path, capsys):
    args = [str(report_path), "--name", "cli", "--out", str(tmp_path), "--holdout", "hermes_agent/web-01"]
    assert main(args) == 0
    manifest = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert manifest["command"].startswith("lfm-mlx repair-set ") and "hermes_agent/web-01" in manifest["holdout"]
    assert "hermes_agent/web-01" not in manifest["splits"]["train"]["cases"]
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
    assert main(args + ["--force"]) == 0


def test_committed_example_repair_set_is_consistent():
    manifests = sorted((REPO / "repair_datasets").glob("*/manifest.json"))
    assert manifests, "repair_datasets/ should hold the example set made by lfm-mlx repair-set"
    for path in manifests:
        manifest = json.loads(path.read_text())
        folder = path.parent
        assert manifest["format"] == "lfm_mlx.repair_set" and manifest["command"].startswith("lfm-mlx repair-set")
        report = json.loads((folder / "source_report.json").read_text())
        assert manifest["source_report"]["sha256"] == hashlib.sha256((folder / "source_report.json").read_bytes()).hexdigest()
        assert report["format"] == "lfm_mlx.eval_report" and report["command"].startswith("lfm-mlx eval")
        held = set(manifest["holdout"])
        for split, info in manifest["splits"].items():
            rows = read_rows(folder / f"{split}.jsonl")
            assert len(rows) == info["rows"]
            if split == "train":
                assert not held & set(info["cases"])
            for row in rows:
                assert set(row) == {"messages", "tools"} and row["messages"][-1]["role"] == "assistant"
                assert not any(TOOL_CALL_START in (m.get("content") or "") for m in row["messages"])
