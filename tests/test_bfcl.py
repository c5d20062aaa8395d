"""lfm_mlx.bfcl: BFCL v4 data read from a user's directory, tools as OpenAI schemas, BFCL's AST grading rules.

The cases are BFCL-shaped ones written here (no BFCL data is copied). LFM_MLX_BFCL_DATA=DIR also checks
the real data: every ground-truth call, rendered in LFM2.5's call syntax, must parse and pass.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest

from lfm_mlx.bfcl import CATEGORIES, data_reader, load_category, load_suites, standardize, to_tool
from lfm_mlx.errors import InvalidInput, MissingInput
from lfm_mlx.evaluate import FAILURE_TYPES, Response, evaluate, main
from lfm_mlx.tools import ToolCall, parse_tool_calls, render_pythonic


def doc(name: str, properties: dict, required: list[str]) -> dict:
    return {"name": name, "description": f"{name} does a thing.",
            "parameters": {"type": "dict", "properties": properties, "required": required}}


AREA = doc("geometry.area", {"base": {"type": "integer", "description": "b"}, "height": {"type": "float", "description": "h"},
                             "unit": {"type": "string", "description": "u"}}, ["base", "height"])
WEATHER = doc("get_weather", {"city": {"type": "string", "description": "c"}, "days": {"type": "integer", "description": "d"},
                              "metric": {"type": "boolean", "description": "m"}}, ["city"])
FILTER = doc("db.filter", {"where": {"type": "dict", "description": "w", "properties": {"age": {"type": "integer"}}},
                           "tags": {"type": "array", "items": {"type": "string"}, "description": "t"},
                           "rows": {"type": "array", "items": {"type": "dict"}, "description": "r"}}, ["where"])
TAX = doc("impuesto.calcular", {"año_vehiculo": {"type": "integer", "description": "año"},
                                "marca": {"type": "string", "description": "m"}}, ["año_vehiculo"])

QUESTIONS = {
    "simple_python": [
        ("simple_python_0", "Area of a triangle, base 10 and height 5?", [AREA],
         [{"geometry.area": {"base": [10], "height": [5.0], "unit": ["units", ""]}}]),
        ("simple_python_1", "Filter adults tagged new york.", [FILTER],
         [{"db.filter": {"where": [{"age": [18, 21]}], "tags": [["New York", "NYC"], ""], "rows": [""]}}]),
        ("simple_python_2", "Filter rows a and b.", [FILTER],
         [{"db.filter": {"where": [{"age": [1]}], "rows": [[{"k": ["a"]}, {"k": ["b"]}]]}}]),
    ],
    "multiple": [("multiple_0", "Weather in Paris for 3 days?", [AREA, WEATHER],
                  [{"get_weather": {"city": ["Paris", "Paris, France"], "days": [3], "metric": ["", True]}}])],
    "parallel": [("parallel_0", "Weather in Oslo and Lima?", [WEATHER],
                  [{"get_weather": {"city": ["Oslo"], "days": [""]}}, {"get_weather": {"city": ["Lima"], "days": [""]}}])],
    "parallel_multiple": [("parallel_multiple_0", "Area 2x3 and weather in Rome.", [AREA, WEATHER],
                           [{"geometry.area": {"base": [2], "height": [3.0]}}, {"get_weather": {"city": ["Rome"]}}])],
    "irrelevance": [("irrelevance_0", "Who wrote Hamlet?", [AREA], None)],
    "live_simple": [("live_simple_0-0-0", "Impuesto de un Seat de 2024", [TAX],
                     [{"impuesto.calcular": {"año_vehiculo": [2024], "marca": ["Seat", ""]}}])],
}


def write_data(root: Path) -> Path:
    (root / "possible_answer").mkdir(parents=True)
    for category, cases in QUESTIONS.items():
        lines, answers = [], []
        for case_id, question, functions, gold in cases:
            lines.append(json.dumps({"id": case_id, "question": [[{"role": "user", "content": question}]], "function": functions}))
            if gold is not None:
                answers.append(json.dumps({"id": case_id, "ground_truth": gold}))
        (root / f"BFCL_v4_{category}.json").write_text("\n".join(lines) + "\n")
        if answers:
            (root / "possible_answer" / f"BFCL_v4_{category}.json").write_text("\n".join(answers) + "\n")
    return root


@pytest.fixture
def data(tmp_path) -> Path:
    return write_data(tmp_path / "bfcl_eval" / "data")


def call(name: str, **arguments) -> ToolCall:
    return ToolCall(name, arguments)


def grade(data: Path, category: str, calls: list[ToolCall] | str, index: int = 0) -> dict:
    suite = load_category(data, category)
    text = calls if isinstance(calls, str) else render_pythonic(calls)
    return suite.grade(suite.cases[index], Response(text, None))


def test_function_docs_become_openai_tools():
    tool = to_tool(FILTER)
    assert tool["type"] == "function" and tool["function"]["name"] == "db.filter"
    params = tool["function"]["parameters"]
    assert params["type"] == "object"
    assert params["properties"]["where"]["type"] == "object"
    assert params["properties"]["where"]["properties"]["age"]["type"] == "integer"
    assert params["properties"]["rows"]["items"]["type"] == "object"
    assert to_tool(AREA)["function"]["parameters"]["properties"]["height"]["type"] == "number"
    assert tool["function"]["description"].endswith("Note that the provided function is in Python 3 syntax.")
    assert FILTER["parameters"]["type"] == "dict"  # the BFCL doc itself is left as read: it grades


@pytest.mark.parametrize("calls, failure", [
    ([call("geometry.area", base=10, height=5.0, unit="units")], None),
    ([call("geometry.area", base=10, height=5)], None),  # an int for a float; `unit` optional ("" listed)
    ([call("geometry.area", base=10.0, height=5.0)], "wrong_arguments"),  # a float for an integer
    ([call("geometry.area", base=10, height=5, unit="cm")], "wrong_arguments"),
    ([call("geometry.area", base=10)], "wrong_arguments"),  # the required height is missing
    ([call("geometry.area", base=10, height=5, color="red")], "wrong_arguments"),  # not a parameter
    ([call("geometry.area", base=True, height=5)], "wrong_arguments"),  # a bool is no integer
    ([call("geometry.volume", base=10, height=5)], "unknown_tool"),
    ([call("geometry.area", base=10, height=5)] * 2, "wrong_count"),
    ("The area is 25.", "refusal"),
    ("<|tool_call_start|>[geometry.area(base=10, height=)]<|tool_call_end|>", "malformed"),
])
def test_simple_category_rules(data, calls, failure):
    run = grade(data, "simple_python", calls)
    assert run["passed"] == (failure is None) and run["failure"] == failure, run
    assert failure is None or failure in FAILURE_TYPES


@pytest.mark.parametrize("arguments, passed", [
    ({"where": {"age": 21}, "tags": ["new york", "nyc"]}, True),  # strings compare after BFCL's normalization
    ({"where": {"age": 21}, "tags": ["New-York", "N.Y.C."]}, True),
    ({"where": {"age": 21}}, True),  # tags optional
    ({"where": {"age": 30}}, False),
    ({"where": {"age": 21, "name": "x"}}, False),  # a dict key that no answer has
    ({"where": {}}, False),  # a dict key without a default is missing
    ({"where": {"age": 21}, "tags": ["nyc", "new york"]}, False),  # list order counts
])
def test_dict_and_list_parameters(data, arguments, passed):
    assert grade(data, "simple_python", [ToolCall("db.filter", arguments)], index=1)["passed"] is passed


def test_list_of_dicts_matches_in_order(data):
    assert grade(data, "simple_python", [call("db.filter", where={"age": 1}, rows=[{"k": "A"}, {"k": "b"}])], 2)["passed"]
    assert not grade(data, "simple_python", [call("db.filter", where={"age": 1}, rows=[{"k": "b"}, {"k": "a"}])], 2)["passed"]


def test_multiple_parallel_and_irrelevance(data):
    assert grade(data, "multiple", [call("get_weather", city="paris, france", days=3)])["passed"]
    assert grade(data, "multiple", [call("geometry.area", base=1, height=2.0)])["failure"] == "wrong_tool"
    # Parallel calls match in any order; each expected call needs a call of its own.
    assert grade(data, "parallel", [call("get_weather", city="Lima"), call("get_weather", city="Oslo")])["passed"]
    assert not grade(data, "parallel", [call("get_weather", city="Lima"), call("get_weather", city="Lima")])["passed"]
    assert grade(data, "parallel", [call("get_weather", city="Oslo")])["failure"] == "wrong_count"
    mixed = [call("get_weather", city="Rome"), call("geometry.area", base=2, height=3)]
    assert grade(data, "parallel_multiple", mixed)["passed"]
    assert grade(data, "irrelevance", "Shakespeare wrote it.")["passed"]
    run = grade(data, "irrelevance", [call("geometry.area", base=1, height=1.0)])
    assert run["failure"] == "false_positive" and not run["passed"]
    # A broken call is still an attempt to call: malformed, not a pass (BFCL would pass what it cannot decode).
    run = grade(data, "irrelevance", "<|tool_call_start|>[geometry.area(base=1, height=]<|tool_call_end|>")
    assert run["failure"] == "malformed" and not run["passed"]


def test_unicode_keyword_case_parses_and_passes(data):
    text = "<|tool_call_start|>[impuesto.calcular(año_vehiculo=2024, marca='Seat')]<|tool_call_end|>"
    run = grade(data, "live_simple", text)
    assert run["passed"] and run["malformed"] == [] and run["calls"][0]["arguments"]["año_vehiculo"] == 2024


def test_standardize_is_bfcls_normalization():
    assert standardize("New York, NY") == standardize("new-york.ny") == "newyorkny"
    assert standardize("it's") == 'it"s'


def test_data_found_in_the_folder_its_parent_or_the_wheel(data, tmp_path):
    assert data_reader(data)[0] == str(data)
    assert data_reader(tmp_path)[0] == str(data)  # the folder holding bfcl_eval/data
    wheel_dir = tmp_path / "dl"
    wheel_dir.mkdir()
    with zipfile.ZipFile(wheel_dir / "bfcl_eval-2026.1.1-py3-none-any.whl", "w") as archive:
        for path in data.rglob("*.json"):
            archive.write(path, f"bfcl_eval/data/{path.relative_to(data)}")
    suite = load_category(wheel_dir, "parallel")  # what `pip download --no-deps bfcl-eval -d dl` leaves
    assert suite.name == "bfcl:parallel" and [c.id for c in suite.cases] == ["parallel_0"]
    assert suite.cases[0].held_out  # a benchmark case never goes into a repair set's training split
    with pytest.raises(MissingInput, match="pip download --no-deps bfcl-eval"):
        data_reader(tmp_path / "nothing")
    with pytest.raises(InvalidInput, match="not one this suite grades"):
        load_category(data, "multi_turn_base")
    with pytest.raises(MissingInput, match="needs --bfcl-data"):
        load_suites("bfcl:simple_python", None)
    assert [s.name for s in load_suites("bfcl:irrelevance,parallel", data, limit=1)] == ["bfcl:irrelevance", "bfcl:parallel"]


def gold_arguments(acceptable: dict) -> dict:
    """The first acceptable value of each parameter (dicts inside values picked the same way); "" omits it."""
    out = {}
    for key, values in acceptable.items():
        if not isinstance(values, list):  # a few real answers nest a plain dict value
            out[key] = values
            continue
        value = next((v for v in values if v != ""), None)
        if value is None:
            continue
        if isinstance(value, dict):
            value = gold_arguments(value)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            value = [gold_arguments(v) for v in value]
        out[key] = value
    return out


class GoldBackend:
    """Answers each case with its first acceptable call, or with text for irrelevance: a scripted model."""

    def __init__(self, wrong: set[str] = frozenset()) -> None:
        self.wrong, self.by_question = wrong, {}
        for cases in QUESTIONS.values():
            for case_id, question, _, gold in cases:
                self.by_question[question] = (case_id, gold)

    def describe(self) -> dict:
        return {"kind": "scripted", "model": "gold"}

    def respond(self, messages, tools, max_tokens, temperature) -> Response:
        assert all(tool["function"]["parameters"]["type"] == "object" for tool in tools)
        case_id, gold = self.by_question[messages[-1]["content"]]
        if gold is None or case_id in self.wrong:
            return Response("No tool fits.", None, "stop")
        calls = [ToolCall(name, gold_arguments(args)) for answer in gold for name, args in answer.items()]
        return Response(render_pythonic(calls), None, "stop")


def test_report_has_our_format_and_compare_prints_deltas(data, tmp_path, capsys):
    suites = load_suites("bfcl:" + ",".join(QUESTIONS), data)
    before = evaluate(GoldBackend(wrong={"multiple_0", "simple_python_0"}), suites, tmp_path / "before", progress=False)
    after = evaluate(GoldBackend(), suites, tmp_path / "after", progress=False)
    assert after["metrics"]["pass_rate"] == 1.0 and after["format"] == "lfm_mlx.eval_report"
    assert before["metrics"]["per_category"]["multiple"] == {"runs": 1, "passed": 0, "pass_rate": 0.0}
    assert before["metrics"]["per_category"]["simple_python"]["passed"] == 2
    assert before["metrics"]["no_tool_false_positive_rate"] == 0.0
    assert (tmp_path / "after" / "summary.md").read_text().count("| irrelevance | 1/1 |") == 1
    assert main(["--compare", str(tmp_path / "before" / "report.json"), str(tmp_path / "after")]) == 0
    out = capsys.readouterr().out
    assert "| multiple | 0.0% | 100.0% | +100.0 pp |" in out
    assert "| simple_python | 66.7% | 100.0% | +33.3 pp |" in out and "| irrelevance | 100.0% | 100.0% | +0.0 pp |" in out
    assert "| overall | 75.0% | 100.0% | +25.0 pp |" in out
    (tmp_path / "junk.json").write_text("{}")
    assert main(["--compare", str(tmp_path / "junk.json"), str(tmp_path / "after")]) == 2
    assert "not an lfm_mlx eval report" in capsys.readouterr().err


def test_cli_needs_the_data_and_says_how_to_get_it(tmp_path, capsys):
    code = main(["--endpoint", "http://127.0.0.1:9/v1", "--suite", "bfcl:simple_python", "--out", str(tmp_path / "o")])
    assert code == 2 and "pip download --no-deps bfcl-eval" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_runs_a_bfcl_slice_on_a_tiny_model(tiny_moe_dir, data, tmp_path):
    out = tmp_path / "eval"
    code = main(["--model", str(tiny_moe_dir), "--suite", "bfcl:simple_python,irrelevance", "--bfcl-data", str(data),
                 "--limit", "1", "--max-tokens", "4", "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    assert code == 0 and report["complete"]
    assert [(c["suite"], c["id"]) for c in report["cases"]] == [("bfcl:simple_python", "simple_python_0"),
                                                               ("bfcl:irrelevance", "irrelevance_0")]
    assert set(report["metrics"]["per_category"]) == {"simple_python", "irrelevance"}


@pytest.mark.skipif(not os.environ.get("LFM_MLX_BFCL_DATA"), reason="set LFM_MLX_BFCL_DATA to the real BFCL v4 data")
def test_real_bfcl_ground_truth_parses_in_lfm25_syntax():
    for category in CATEGORIES:
        for case in load_category(os.environ["LFM_MLX_BFCL_DATA"], category).cases:
            calls = [ToolCall(name, gold_arguments(args)) for answer in case.answers for name, args in answer.items()]
            if not calls:
                continue
            result = parse_tool_calls(render_pythonic(calls))
            assert result.malformed == [], (case.id, result.malformed)
            assert [(c.name, c.arguments) for c in result.calls] == [(c.name, c.arguments) for c in calls], case.id


def test_the_demo_scores_a_bfcl_slice_before_and_after(tiny_moe_dir, data, tmp_path):
    from lfm_mlx.demo import DemoConfig, StageLog, bfcl_slice, bfcl_text

    log = StageLog()
    result = bfcl_slice(DemoConfig(bfcl_data=str(data), bfcl_per_category=1), tiny_moe_dir, tiny_moe_dir,
                        tmp_path / "eval", log)
    rows = {row["category"]: row for row in result["compare"]}
    assert set(rows) == set(QUESTIONS) | {"overall"}
    assert rows["overall"]["runs"] == (len(QUESTIONS), len(QUESTIONS))
    assert all(row["delta_pp"] == 0.0 for row in rows.values())  # the same model twice: greedy, no change
    assert (tmp_path / "eval" / "bfcl_base" / "report.json").is_file() and [r["stage"] for r in log.rows] == [
        "BFCL slice, base and fused 8-bit"]
    assert "BFCL v4 slice (1 cases per category)" in bfcl_text(result)
    skipped = bfcl_text(bfcl_slice(DemoConfig(), tiny_moe_dir, tiny_moe_dir, tmp_path / "none", log))
    assert "pip download --no-deps bfcl-eval" in skipped and not (tmp_path / "none").exists()
