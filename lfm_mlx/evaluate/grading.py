"""Grading: pass / fail against a case's expectation, and the failure type."""

from __future__ import annotations

from lfm_mlx.suites import Case, Suite, argument_problems
from lfm_mlx.suites.observe import Response, _key, observe

FAILURE_TYPES = (
    "sibling", "cross_server", "wrong_prefix", "wrong_tool", "unknown_tool", "wrong_arguments", "refusal",
    "false_positive", "leak", "malformed", "loop", "wrong_answer", "wrong_count", "error",
)


def _base(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def classify_wrong_tool(expected: str, got: str, case: Case, suite: Suite) -> str:
    """Why a call to `got` instead of `expected` is wrong: wrong_prefix / sibling / cross_server / wrong_tool / unknown_tool."""
    offered = {tool["function"]["name"] for tool in case.tools}
    expected_server, got_server = suite.server_of(expected), suite.server_of(got)
    if _base(got) == _base(expected) and expected_server != got_server:
        return "wrong_prefix"  # right tool, wrong server namespace (offered or invented)
    if got not in offered:
        return "unknown_tool"
    if not expected_server and not got_server:
        return "wrong_tool"  # a flat tool surface has no servers to compare
    return "sibling" if expected_server == got_server else "cross_server"


def grade(case: Case, response: Response, suite: Suite, raw: bool = False) -> dict:
    """Grade one response against its case: pass / fail, the failure type and what the model did."""
    run, calls, leaked, parsed = observe(case, response, raw)
    if run["failure"] == "error":
        return run
    malformed, loop, history = run["malformed"], run["loop"], {_key(c) for c in case.history_calls()}
    expect = case.expect
    if expect.tool_call is not None:
        wanted = expect.tool_call
        if not calls:
            failure = "leak" if leaked else "malformed" if malformed else "refusal"
            detail = f"expected {wanted.name}(...), got " + ("a call left in the text" if leaked else "no call")
            run.update(failure=failure, detail=detail)
            return run
        named = [c for c in calls if c.name == wanted.name]
        if not named:
            run.update(failure=classify_wrong_tool(wanted.name, calls[0].name, case, suite),
                       detail=f"expected {wanted.name}, got {calls[0].name}")
            return run
        problems = []
        for call in named:  # several calls of the right tool: one correct one is enough
            problems = argument_problems(wanted, call, case.tool_schema(wanted.name))
            if not problems:
                break
        if problems:
            run.update(failure="wrong_arguments", detail="; ".join(problems))
        elif loop:
            run.update(failure="loop", detail="the same call repeated")
        else:
            run["passed"] = True
        return run
    answer = expect.answer
    if calls or leaked:
        repeated = any(_key(c) in history for c in calls + leaked)
        run.update(failure="loop" if repeated else "false_positive",
                   detail=("repeated an earlier call: " if repeated else "called ") + ", ".join(c.name for c in calls + leaked))
    elif malformed:
        run.update(failure="malformed", detail=malformed[0])
    elif problems := answer.problems(parsed.content):
        run.update(failure="wrong_answer", detail="; ".join(problems))
    else:
        run["passed"] = True
    return run
