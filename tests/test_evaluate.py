"""lfm_mlx.suites + lfm_mlx.evaluate: suite validation, grading / failure classification, metrics,
partial reports, and the in-process MLX backend on a tiny synthetic model (with and without adapters)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lfm_mlx.evaluate import (
    FAILURE_TYPES,
    BackendError,
    MLXBackend,
    Response,
    evaluate,
    evaluate_model,
    grade,
    main,
    run_suite,
    to_openai_messages,
)
from lfm_mlx.suites import gold_call, load_suite, shipped_suites
from lfm_mlx.tools import ToolCall, render_json, render_pythonic


def fn(name, **props):
    return {"type": "function", "function": {"name": name, "description": name,
                                             "parameters": {"type": "object", "properties": {k: {"type": v} for k, v in props.items()},
                                                            "required": list(props)[:1]}}}


MINI = {
    "name": "mini",
    "servers": {"shell": ["terminal"]},
    "tools": {t["function"]["name"]: t for t in [
        fn("github.create_issue", repo="string", title="string"), fn("github.list_issues", repo="string"),
        fn("jira.create_issue", project="string", summary="string"), fn("slack.post_message", channel="string", text="string"),
        fn("terminal", command="string"),
    ]},
    "cases": [
        {"id": "issue", "category": "route", "messages": [{"role": "user", "content": "Open an issue in acme/api about the Safari login bug"}],
         "tools": ["github.create_issue", "github.list_issues", "jira.create_issue", "slack.post_message"],
         "expect": {"tool_call": {"name": "github.create_issue",
                                  "arguments": {"repo": {"exact": "acme/api"}, "title": {"regex": "(?i)safari"}},
                                  "example_arguments": {"title": "Safari login fails"}}}},
        {"id": "chat", "category": "no_tool", "messages": [{"role": "user", "content": "What is 6 * 7?"}], "tools": ["terminal"],
         "expect": {"no_tool_call": {"contains": ["42"], "example_answer": "6 * 7 = 42."}}},
        {"id": "final", "category": "finalize", "held_out": True,
         "messages": [{"role": "user", "content": "pwd"},
                      {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "terminal", "arguments": {"command": "pwd"}}}]},
                      {"role": "tool", "content": "/home/me"}],
         "tools": ["terminal"], "expect": {"final_answer": {"contains": ["/home/me"], "example_answer": "You are in /home/me."}}},
    ],
}


@pytest.fixture
def mini_path(tmp_path) -> Path:
    path = tmp_path / "mini.json"
    path.write_text(json.dumps(MINI))
    return path


@pytest.fixture
def mini(mini_path):
    suite = load_suite(mini_path)
    return suite, {case.id: case for case in suite.cases}


class ScriptedBackend:
    """Replays fixed responses per case id (in order for repeats); for the pure grading logic."""

    def __init__(self, script: dict, fail_after: int | None = None):
        self.script, self.calls, self.fail_after = {k: list(v) if isinstance(v, list) else [v] for k, v in script.items()}, 0, fail_after

    def describe(self):
        return {"kind": "scripted"}

    def respond(self, messages, tools, max_tokens, temperature):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise BackendError("cannot reach http://127.0.0.1:9/v1 (Connection refused)")
        user = [m["content"] for m in messages if m["role"] == "user"][0]
        key = next(k for k in self.script if k in user)
        replies = self.script[key]
        reply = replies.pop(0) if len(replies) > 1 else replies[0]
        return reply if isinstance(reply, Response) else Response(reply, None)


class OracleBackend:
    """Answers every case with its own gold: the call rendered as `form`, or the example answer."""

    def __init__(self, suite, form="native"):
        self.by_prompt = {json.dumps(c.messages): c for c in suite.cases}
        self.form = form

    def describe(self):
        return {"kind": "oracle", "form": self.form}

    def respond(self, messages, tools, max_tokens, temperature):
        case = self.by_prompt[json.dumps(messages)]
        if case.expect.tool_call is None:
            return Response(case.expect.answer.example_answer, None)
        call = gold_call(case)
        return Response(render_pythonic([call]) if self.form == "native" else render_json([call]), None)


# ---------------------------------------------------------------- suites


@pytest.mark.parametrize("name", shipped_suites())
def test_shipped_suites_pass_with_their_own_gold(name):
    suite = load_suite(name)
    assert len(suite.cases) >= 20
    report = run_suite(suite, OracleBackend(suite))
    m = report["metrics"]
    failures = [(c["id"], c["runs"][0]["detail"]) for c in report["cases"] if not c["runs"][0]["passed"]]
    assert failures == [] and m["pass_rate"] == 1.0
    assert m["no_tool_false_positive_rate"] in (0.0, None) and m["text_tool_leaks"] == 0
    assert m["structured_tool_call_rate"] in (1.0, None)


def test_shipped_router_has_variable_k_and_namespaced_servers():
    suite = load_suite("router")
    sizes = {len(c.tools) for c in suite.cases}
    assert {5, 15, 35} <= sizes
    assert len({suite.server_of(t["function"]["name"]) for c in suite.cases for t in c.tools}) >= 12


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda s: s["cases"][0].pop("expect"), "case 'issue' (cases[0]) key expect: Field required"),
        (lambda s: s["cases"][1]["expect"]["no_tool_call"].update(bogus=1), "case 'chat' (cases[1]) key expect.no_tool_call.bogus"),
        (lambda s: s["cases"][0]["expect"]["tool_call"]["arguments"]["repo"].update(contains="x"), "exactly one of exact / contains"),
        (lambda s: s["cases"][0]["expect"]["tool_call"]["arguments"].update(title={"regex": "("}), "does not compile"),
        (lambda s: s["cases"][0]["tools"].append("nope.tool"), "'nope.tool' is not in the suite's tool library"),
        (lambda s: s["cases"][1].update(id="issue"), "duplicate id"),
        (lambda s: s["cases"][0].update(tools=["slack.post_message"]), "'github.create_issue' is not among the case's tools"),
        (lambda s: s["cases"][0]["expect"]["tool_call"]["arguments"].update(colour={"any": True}), "arguments.colour: not a parameter"),
        (lambda s: s["cases"][0]["expect"]["tool_call"].update(example_arguments={"title": "no match"}), "fails its own matcher"),
        (lambda s: s["cases"][1]["expect"]["no_tool_call"].update(example_answer="41"), "answer lacks '42'"),
        (lambda s: s["cases"][1]["messages"].append({"role": "assistant", "content": "hi"}), "last message must be a user or tool turn"),
    ],
)
def test_malformed_suite_names_file_case_and_key(tmp_path, mutate, expected):
    data = json.loads(json.dumps(MINI))
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as err:
        load_suite(path)
    assert str(path) in str(err.value) and expected in str(err.value), str(err.value)


def test_suite_json_syntax_error_gives_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"name": "x",\n "cases": [}\n')
    with pytest.raises(ValueError, match=r"broken\.json:2:\d+: invalid JSON"):
        load_suite(path)
    with pytest.raises(FileNotFoundError, match="shipped suite"):
        load_suite("no_such_suite")


# ---------------------------------------------------------------- grading


NATIVE_OK = render_pythonic([ToolCall("github.create_issue", {"repo": "acme/api", "title": "Safari login"})])


@pytest.mark.parametrize(
    "text, failure",
    [
        (NATIVE_OK, None),
        ("Sure! <|tool_call_start|>[github.create_issue(title='Login broken on Safari', repo='acme/api')]<|tool_call_end|>", None),
        (render_pythonic([ToolCall("github.list_issues", {"repo": "acme/api"})]), "sibling"),
        (render_pythonic([ToolCall("slack.post_message", {"channel": "#eng", "text": "safari"})]), "cross_server"),
        (render_pythonic([ToolCall("jira.create_issue", {"project": "API", "summary": "Safari"})]), "wrong_prefix"),
        (render_pythonic([ToolCall("gitlab.create_issue", {"repo": "acme/api"})]), "wrong_prefix"),
        (render_pythonic([ToolCall("bash", {"command": "gh issue create"})]), "unknown_tool"),
        (render_pythonic([ToolCall("github.create_issue", {"repo": "acme/web", "title": "Safari"})]), "wrong_arguments"),
        (render_pythonic([ToolCall("github.create_issue", {"title": "Safari"})]), "wrong_arguments"),
        ("I can't open issues, sorry.", "refusal"),
        ("<|tool_call_start|>[github.create_issue(repo=acme/api)]<|tool_call_end|>", "malformed"),
        ('[github.create_issue(repo="acme/api", title="Safari")]', "leak"),
        ('{"name": "github.create_issue", "arguments": {"repo": "acme/api", "title": "Safari"}}', "leak"),
        (render_pythonic([ToolCall("github.create_issue", {"repo": "acme/api", "title": "Safari"})] * 2), "loop"),
    ],
)
def test_tool_call_failure_classification(mini, text, failure):
    suite, cases = mini
    run = grade(cases["issue"], Response(text, None), suite)
    assert run["failure"] == failure and run["passed"] == (failure is None), run
    assert failure is None or failure in FAILURE_TYPES


def test_raw_mode_counts_calls_left_in_text(mini):
    suite, cases = mini
    leaked = '[github.create_issue(repo="acme/api", title="Safari")]'
    strict, raw = grade(cases["issue"], Response(leaked, None), suite), grade(cases["issue"], Response(leaked, None), suite, raw=True)
    assert (strict["passed"], strict["failure"]) == (False, "leak") and raw["passed"]
    assert strict["leaked_calls"] == raw["leaked_calls"] and len(raw["leaked_calls"]) == 1
    assert strict["structured_calls"] == raw["structured_calls"] == 0


def test_endpoint_responses_structured_calls_and_content_leaks(mini):
    suite, cases = mini
    structured = Response("", [ToolCall("github.create_issue", {"repo": "acme/api", "title": "Safari bug"})], "tool_calls")
    assert grade(cases["issue"], structured, suite)["passed"]
    # A server that failed to parse leaves the native block in content: that is a leak, not a call.
    leaked = Response(NATIVE_OK, [], "stop")
    run = grade(cases["issue"], leaked, suite)
    assert run["failure"] == "leak" and run["structured_calls"] == 0
    assert grade(cases["issue"], Response("", None, error="HTTP 500: boom"), suite)["failure"] == "error"
    # mlx_lm.server drops call text its parser cannot read: no calls, no content, finish_reason tool_calls
    # (or length, when max_tokens cut the call). That is a malformed call, not a refusal.
    raw = {"choice": {"finish_reason": "tool_calls", "message": {"content": None, "tool_calls": None}}}
    dropped = grade(cases["issue"], Response("", [], "tool_calls", raw=raw), suite)
    assert dropped["failure"] == "malformed" and json.loads(dropped["raw"]) == raw
    assert grade(cases["issue"], Response("", [], "length"), suite)["failure"] == "malformed"
    assert grade(cases["issue"], Response("", [], "stop"), suite)["failure"] == "refusal"


@pytest.mark.parametrize(
    "case_id, text, failure",
    [
        ("chat", "6 * 7 = 42", None),
        ("chat", "It is forty-two.", "wrong_answer"),
        ("chat", "", "wrong_answer"),
        ("chat", render_pythonic([ToolCall("terminal", {"command": "python -c 'print(6*7)'"})]), "false_positive"),
        ("chat", 'Let me check. [terminal(command="echo $((6*7))")]', "false_positive"),
        ("chat", "<|tool_call_start|>[terminal(command=)]<|tool_call_end|>", "malformed"),
        ("final", "You're in /home/me.", None),
        ("final", render_pythonic([ToolCall("terminal", {"command": "pwd"})]), "loop"),
        ("final", render_pythonic([ToolCall("terminal", {"command": "ls"})]), "false_positive"),
    ],
)
def test_no_tool_and_finalization_classification(mini, case_id, text, failure):
    suite, cases = mini
    run = grade(cases[case_id], Response(text, None), suite)
    assert run["failure"] == failure and run["passed"] == (failure is None), run


def test_metrics_and_stability_over_repeats(mini_path):
    script = {
        "Open an issue": [NATIVE_OK, "no idea"],  # flaky: passes once out of two
        "6 * 7": [render_pythonic([ToolCall("terminal", {"command": "echo 42"})])],  # a false positive, both times
        "pwd": ["You are in /home/me."],
    }
    report = run_suite(mini_path, ScriptedBackend(script), repeats=2)
    m = report["metrics"]
    assert report["complete"] and m["runs"] == 6 and m["passed"] == 3
    assert m["per_category"] == {"finalize": {"runs": 2, "passed": 2, "pass_rate": 1.0},
                                 "no_tool": {"runs": 2, "passed": 0, "pass_rate": 0.0},
                                 "route": {"runs": 2, "passed": 1, "pass_rate": 0.5}}
    assert m["structured_tool_call_rate"] == 0.5 and m["no_tool_false_positive_rate"] == 0.5 and m["finalization_rate"] == 1.0
    assert m["failure_types"] == {"false_positive": 2, "refusal": 1}
    assert m["stability"] == round(2 / 3, 4) and m["flaky_cases"] == ["mini/issue"]
    issue = report["cases"][0]
    assert (issue["passes"], issue["repeats"], issue["stable"]) == (1, 2, False)


def test_backend_error_leaves_a_partial_report(mini_path, tmp_path):
    backend = ScriptedBackend({"Open an issue": NATIVE_OK, "6 * 7": "42", "pwd": "/home/me"}, fail_after=2)
    report = evaluate(backend, [mini_path], tmp_path / "out", progress=False)
    assert not report["complete"] and "Connection refused" in report["error"]
    assert [c["id"] for c in report["cases"]] == ["issue", "chat"]
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["complete"] is False and len(saved["cases"]) == 2 and saved["metrics"]["runs"] == 2
    assert "Incomplete run" in (tmp_path / "out" / "summary.md").read_text()


def test_to_openai_messages_links_tool_results_to_calls(mini):
    _, cases = mini
    wire = to_openai_messages(cases["final"].messages)
    call = wire[1]["tool_calls"][0]
    assert json.loads(call["function"]["arguments"]) == {"command": "pwd"}
    assert wire[2]["tool_call_id"] == call["id"]
    assert cases["final"].messages[1]["tool_calls"][0]["function"]["arguments"] == {"command": "pwd"}  # input untouched


def test_cli_rejects_a_bad_suite_before_loading_anything(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "bad", "cases": [{"id": "x"}]}))
    code = main(["--endpoint", "http://127.0.0.1:9/v1", "--suite", str(bad), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "bad.json" in err and "case 'x' (cases[0]) key category" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the in-process MLX backend


@pytest.fixture
def tiny_model(tiny_moe_dir) -> Path:
    return tiny_moe_dir  # conftest's session-wide synthetic LFM2-MoE (bf16 on disk, float32 compute on CPU)


def test_mlx_backend_end_to_end_greedy_is_stable(tiny_model, mini_path, tmp_path):
    report = evaluate_model(tiny_model, [mini_path], tmp_path / "eval", repeats=2, max_tokens=12, progress=False)
    assert report["complete"] and report["backend"] == {"kind": "mlx", "model": str(tiny_model), "adapter_path": None,
                                                   "loaded_by": "lfm_mlx.load", "dtype": "float32"}
    assert report["settings"]["decoding"] == "greedy"
    for case in report["cases"]:
        assert case["stable"]  # greedy decoding: both repeats say the same thing
        first, second = case["runs"]
        assert first["content"] == second["content"] and first["finish_reason"] in ("stop", "length")
        assert first["passed"] or first["failure"] in FAILURE_TYPES
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["metrics"] == report["metrics"]
    summary = (tmp_path / "eval" / "summary.md").read_text()
    assert "| overall |" in summary and "Text-tool leaks: calls written in plain text" in summary  # the columns explained


def test_batched_greedy_answers_are_the_one_at_a_time_answers(tiny_model, mini_path):
    """Left-padded batches (prompts of different lengths) answer every case as `respond` does alone."""
    from lfm_mlx.model.generate import prompt_ids

    suite = load_suite(mini_path)
    backend = MLXBackend(tiny_model)
    alone = [backend.respond(c.messages, c.tools, 12, 0.0) for c in suite.cases]
    batched = backend.respond_many([(c.messages, c.tools) for c in suite.cases], 12)
    assert len({len(prompt_ids(backend.tokenizer, c.messages, c.tools)) for c in suite.cases}) > 1  # padding is exercised
    assert [(r.text, r.finish_reason) for r in batched] == [(r.text, r.finish_reason) for r in alone]
    report = run_suite(suite, backend, max_tokens=12)
    assert report["settings"]["batched"] and [c["runs"][0]["text"] for c in report["cases"]] == [r.text for r in alone]


def test_cpu_eval_runs_int8_experts_as_float32_copies_within_the_size_bound(tiny_moe_mixed_dir, monkeypatch):
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    from lfm_mlx.model import quant

    def quantized(backend):
        return sum(isinstance(m, QuantizedSwitchLinear) for _, m in backend.model.named_modules())

    assert quantized(MLXBackend(tiny_moe_mixed_dir)) == 0  # the CPU's gather_qmm is slow: float32 copies
    assert quantized(MLXBackend(tiny_moe_mixed_dir, as_served=True)) > 0  # as mlx_lm.server loads it
    monkeypatch.setattr(quant, "FLOAT_EXPERTS_MAX_BYTES", 1024)  # copies past the bound: the experts stay int8
    assert quantized(MLXBackend(tiny_moe_mixed_dir)) > 0


def test_mlx_backend_with_adapters(tiny_model, mini_path, tmp_path):
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from lfm_mlx.model.io import load

    # Write a LoRA adapter with non-zero B so that it really changes the model's outputs.
    model, _ = load(tiny_model)
    lora = {"rank": 4, "scale": 20.0, "dropout": 0.0}
    linear_to_lora_layers(model, 4, lora)
    mx.random.seed(1)
    weights = {k: mx.random.normal(v.shape) * 0.5 for k, v in tree_flatten(model.trainable_parameters()) if "lora" in k}
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    mx.save_safetensors(str(adapters / "adapters.safetensors"), weights)
    (adapters / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": 4, "lora_parameters": lora}))

    base, tuned = MLXBackend(tiny_model), MLXBackend(tiny_model, adapters)
    assert tuned.describe()["adapter_path"] == str(adapters)
    suite = load_suite(mini_path)
    texts = []
    for backend in (base, tuned):
        report = run_suite(suite, backend, max_tokens=12)
        assert report["complete"]
        texts.append([c["runs"][0]["content"] for c in report["cases"]])
    assert texts[0] != texts[1]


def test_cli_says_what_it_runs_shows_a_few_progress_lines_in_a_log_and_quiet_leaves_the_end_line(
        tiny_model, mini_path, tmp_path):
    import os
    import subprocess
    import sys

    def cli(*extra: str) -> subprocess.CompletedProcess:  # stdout and stderr are pipes, as in a log
        return subprocess.run([sys.executable, "-m", "lfm_mlx", "eval", "--model", str(tiny_model), "--suite",
                               str(mini_path), "--out", str(tmp_path / "eval"), "--max-tokens", "8", *extra],
                              capture_output=True, text=True, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
                              timeout=300)

    result = cli("--repeats", "3")
    assert result.returncode == 0, result.stderr
    cases = len(load_suite(mini_path).cases)
    start, *progress = result.stderr.splitlines()
    assert start.startswith(f"lfm-mlx eval: {cases} case(s) x 3 repeat(s) of mini on {tiny_model} in-process, "
                            "float32 on Device(cpu, 0) (BLAS: "), start
    assert start.endswith(f"writing {tmp_path / 'eval'}"), start
    assert "\r" not in result.stderr and 1 <= len(progress) <= 4, result.stderr  # a line a quarter, not a refresh a run
    assert progress[-1].startswith(f"lfm-mlx eval: 100% ({3 * cases}/{3 * cases} runs"), progress
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    end = result.stdout.splitlines()[-1]
    assert end == (f"eval: pass rate {100 * report['metrics']['pass_rate']:.1f}% ({report['metrics']['passed']}/"
                   f"{3 * cases} runs); wrote {tmp_path / 'eval' / 'report.json'} and {tmp_path / 'eval' / 'summary.md'}")
    assert "| overall |" in result.stdout  # the summary table before it

    quiet = cli("--quiet")
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout.splitlines() == [quiet.stdout.strip()]
    assert quiet.stdout.startswith("eval: pass rate ")
