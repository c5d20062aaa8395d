"""Tool-call eval suites: the JSON schema (pydantic, validated at load), loading, expectation matching.

A suite is a JSON file: a tool library, optional server groups, and cases. A case is messages +
candidate tools + one expectation (a tool call with argument matchers, no tool call, or a final
answer after tool results) + a category. The schema is documented in suites/README.md.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lfm_mlx.tools import ToolCall, ToolCallSyntaxError, calls_from_openai

SUITES_DIR = Path(__file__).resolve().parent


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ArgMatcher(_Strict):
    """Exactly one of: exact value, substring (case-insensitive), regex (re.search), any (present)."""

    exact: Any = None
    contains: str | None = None
    regex: str | None = None
    any: Literal[True] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> "ArgMatcher":
        given = sorted(self.model_fields_set)
        if len(given) != 1:
            raise ValueError(f"a matcher takes exactly one of exact / contains / regex / any, got {given}")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as err:
                raise ValueError(f"regex {self.regex!r} does not compile: {err}") from None
        return self

    @property
    def kind(self) -> str:
        return next(iter(self.model_fields_set))

    def matches(self, value: Any) -> bool:
        """Does an argument value satisfy this matcher?"""
        if self.kind == "any":
            return True
        if self.kind == "exact":
            return same_value(self.exact, value)
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        if self.kind == "contains":
            return self.contains.lower() in text.lower()
        return re.search(self.regex, text) is not None


class ToolCallExpect(_Strict):
    name: str
    arguments: dict[str, ArgMatcher] = Field(default_factory=dict)
    allow_extra_arguments: bool = True
    # A full argument set that satisfies the matchers: the gold call for repair sets.
    example_arguments: dict[str, Any] | None = None


class AnswerExpect(_Strict):
    contains: list[str] = Field(default_factory=list)  # every string must appear (case-insensitive)
    omits: list[str] = Field(default_factory=list)  # none may appear (case-insensitive)
    example_answer: str | None = None  # a reply that satisfies contains / omits: the repair-set gold

    def problems(self, text: str) -> list[str]:
        low = text.lower()
        missing = [s for s in self.contains if s.lower() not in low]
        present = [s for s in self.omits if s.lower() in low]
        out = [f"answer lacks {s!r}" for s in missing] + [f"answer contains {s!r}" for s in present]
        if not text.strip():
            out.append("empty answer")
        return out


class Expectation(_Strict):
    tool_call: ToolCallExpect | None = None
    no_tool_call: AnswerExpect | None = None
    final_answer: AnswerExpect | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> "Expectation":
        given = sorted(self.model_fields_set)
        if len(given) != 1:
            raise ValueError(f"expect takes exactly one of tool_call / no_tool_call / final_answer, got {given}")
        return self

    @property
    def kind(self) -> str:
        return next(iter(self.model_fields_set))

    @property
    def answer(self) -> AnswerExpect | None:
        return self.no_tool_call or self.final_answer


class FunctionSpec(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_\-]*(\.[A-Za-z_][A-Za-z0-9_\-]*)*$")
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class ToolSpec(_Strict):
    """The OpenAI tool schema: {"type": "function", "function": {name, description, parameters}}."""

    type: Literal["function"] = "function"
    function: FunctionSpec


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # name / tool_call_id pass through to endpoints
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = ""
    tool_calls: list[dict[str, Any]] | None = None


class CaseModel(_Strict):
    id: str = Field(min_length=1)
    category: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    tools: list[str | ToolSpec] = Field(default_factory=list)  # names from the suite library, or inline
    expect: Expectation
    held_out: bool = False  # never goes into a repair set's train split
    notes: str = ""


class SuiteModel(_Strict):
    name: str
    description: str = ""
    version: int = 1
    system: str | None = None  # prepended as a system message to cases that have none
    servers: dict[str, list[str]] = Field(default_factory=dict)  # server -> tool names (un-dotted names)
    tools: dict[str, ToolSpec] = Field(default_factory=dict)  # library, keyed by function name
    cases: list[CaseModel]


@dataclass
class Case:
    """A resolved case: full messages (suite system prompt applied) and full tool schemas."""

    suite: str
    id: str
    category: str
    messages: list[dict]
    tools: list[dict]
    expect: Expectation
    held_out: bool

    def tool_schema(self, name: str) -> dict | None:
        for tool in self.tools:
            if tool["function"]["name"] == name:
                return tool
        return None

    def history_calls(self) -> list[ToolCall]:
        """Calls the assistant already made earlier in the conversation."""
        calls: list[ToolCall] = []
        for message in self.messages:
            if message["role"] == "assistant" and message.get("tool_calls"):
                calls.extend(calls_from_openai(message["tool_calls"]))
        return calls


@dataclass
class Suite:
    name: str
    path: Path
    sha256: str
    description: str
    servers: dict[str, str]  # tool name -> server, from the suite's `servers` groups
    cases: list[Case]

    def server_of(self, name: str) -> str:
        """The server (namespace) a tool belongs to: declared group, else the dotted prefix, else ''."""
        if name in self.servers:
            return self.servers[name]
        return name.rsplit(".", 1)[0] if "." in name else ""


def same_value(expected: Any, got: Any) -> bool:
    """Exact match with JSON types: 3 == 3.0, but True != 1 and "3" != 3."""
    if isinstance(expected, bool) or isinstance(got, bool):
        return isinstance(expected, bool) and isinstance(got, bool) and expected == got
    if isinstance(expected, (int, float)) and isinstance(got, (int, float)):
        return expected == got
    if isinstance(expected, dict) and isinstance(got, dict):
        return expected.keys() == got.keys() and all(same_value(expected[k], got[k]) for k in expected)
    if isinstance(expected, list) and isinstance(got, list):
        return len(expected) == len(got) and all(same_value(a, b) for a, b in zip(expected, got))
    return type(expected) is type(got) and expected == got


def argument_problems(expect: ToolCallExpect, call: ToolCall, schema: dict | None) -> list[str]:
    """Why `call`'s arguments fail the expectation (empty when they pass). Assumes the name matched."""
    problems = []
    for key, matcher in expect.arguments.items():
        if key not in call.arguments:
            problems.append(f"missing argument {key!r}")
        elif not matcher.matches(call.arguments[key]):
            problems.append(f"argument {key!r}={call.arguments[key]!r} fails {matcher.kind} {getattr(matcher, matcher.kind)!r}")
    params = (schema or {}).get("function", {}).get("parameters", {})
    for key in params.get("required", []):
        if key not in call.arguments and key not in expect.arguments:
            problems.append(f"missing required argument {key!r}")
    if not expect.allow_extra_arguments:
        known = set(params.get("properties", {})) | set(expect.arguments)
        problems.extend(f"unexpected argument {key!r}" for key in call.arguments if key not in known)
    return problems


def gold_call(case: Case) -> ToolCall | None:
    """The call a correct model makes: exact matchers + example_arguments; None if underdetermined."""
    expect = case.expect.tool_call
    if expect is None:
        return None
    arguments = dict(expect.example_arguments or {})
    for key, matcher in expect.arguments.items():
        if matcher.kind == "exact":
            arguments[key] = matcher.exact
        elif key not in arguments:
            return None  # contains / regex / any say what is acceptable, not what to write
    call = ToolCall(expect.name, arguments)
    return call if not argument_problems(expect, call, case.tool_schema(expect.name)) else None


# ---------------------------------------------------------------- loading


def _describe_loc(raw: Any, loc: tuple) -> str:
    """Turn a pydantic error location into 'case ID (cases[3]) key a.b' using the raw JSON."""
    if len(loc) >= 2 and loc[0] == "cases" and isinstance(loc[1], int):
        case_id = None
        if isinstance(raw, dict) and isinstance(raw.get("cases"), list) and loc[1] < len(raw["cases"]):
            entry = raw["cases"][loc[1]]
            case_id = entry.get("id") if isinstance(entry, dict) else None
        key = ".".join(str(part) for part in loc[2:]) or "(the case itself)"
        return f"case {case_id!r} (cases[{loc[1]}]) key {key}"
    return "key " + ".".join(str(part) for part in loc)


def _semantic_problems(model: SuiteModel) -> list[str]:
    """Checks pydantic cannot express: ids, tool references, matcher keys, history calls, golds."""
    problems = []
    seen: set[str] = set()
    for name, spec in model.tools.items():
        if spec.function.name != name:
            problems.append(f"key tools.{name}: library key differs from function.name {spec.function.name!r}")
    for index, case in enumerate(model.cases):
        where = f"case {case.id!r} (cases[{index}])"
        if case.id in seen:
            problems.append(f"{where} key id: duplicate id; ids must be unique within a suite")
        seen.add(case.id)
        names = []
        for position, tool in enumerate(case.tools):
            if isinstance(tool, str):
                if tool not in model.tools:
                    problems.append(f"{where} key tools[{position}]: {tool!r} is not in the suite's tool library")
                names.append(tool)
            else:
                names.append(tool.function.name)
        if len(set(names)) != len(names):
            problems.append(f"{where} key tools: a tool is listed twice")
        for position, message in enumerate(case.messages):
            try:
                calls_from_openai(message.tool_calls)
            except ToolCallSyntaxError as err:
                problems.append(f"{where} key messages[{position}].tool_calls: {err}")
        if case.messages[-1].role not in ("user", "tool"):
            problems.append(f"{where} key messages: the last message must be a user or tool turn (the model answers it)")
        expect = case.expect
        if expect.tool_call is not None:
            if expect.tool_call.name not in names:
                problems.append(f"{where} key expect.tool_call.name: {expect.tool_call.name!r} is not among the case's tools")
            spec = model.tools.get(expect.tool_call.name)
            for tool in case.tools:
                if not isinstance(tool, str) and tool.function.name == expect.tool_call.name:
                    spec = tool
            properties = spec.function.parameters.get("properties", {}) if spec else {}
            for key in expect.tool_call.arguments:
                if properties and key not in properties:
                    problems.append(f"{where} key expect.tool_call.arguments.{key}: not a parameter of {expect.tool_call.name!r} ({sorted(properties)})")
            example = expect.tool_call.example_arguments
            if example is not None:
                for key, matcher in expect.tool_call.arguments.items():
                    if key in example and not matcher.matches(example[key]):
                        problems.append(f"{where} key expect.tool_call.example_arguments.{key}: {example[key]!r} fails its own matcher")
        if expect.final_answer is not None and not any(m.role == "tool" for m in case.messages):
            problems.append(f"{where} key expect.final_answer: the case has no tool result to finalize; use no_tool_call")
        answer = expect.answer
        if answer is not None and answer.example_answer is not None and answer.problems(answer.example_answer):
            problems.append(f"{where} key expect.*.example_answer: {answer.problems(answer.example_answer)}")
    return problems


def load_suite(path: str | Path) -> Suite:
    """Load and validate a suite file (a path, or the name of a shipped suite such as 'router').

    Raises ValueError naming the file, the case id and the key of every problem found.
    """
    path = resolve_suite_path(path)
    data = path.read_bytes()
    try:
        raw = json.loads(data)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}:{err.colno}: invalid JSON ({err.msg}); fix the syntax there") from None
    try:
        model = SuiteModel.model_validate(raw)
    except ValidationError as err:
        lines = [f"  {_describe_loc(raw, e['loc'])}: {e['msg']} (got {str(e.get('input'))[:80]!r})" for e in err.errors()]
        raise ValueError(f"{path}: invalid suite, {len(lines)} problem(s):\n" + "\n".join(lines)) from None
    problems = _semantic_problems(model)
    if problems:
        raise ValueError(f"{path}: invalid suite, {len(problems)} problem(s):\n" + "\n".join("  " + p for p in problems))

    servers = {tool: server for server, tools in model.servers.items() for tool in tools}
    cases = []
    for case in model.cases:
        messages = [m.model_dump(exclude_none=True) for m in case.messages]
        if model.system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": model.system})
        tools = [(model.tools[t] if isinstance(t, str) else t).model_dump() for t in case.tools]
        cases.append(Case(model.name, case.id, case.category, messages, tools, case.expect, case.held_out))
    digest = hashlib.sha256(data).hexdigest()
    return Suite(model.name, path, digest, model.description, servers, cases)


def resolve_suite_path(path: str | Path) -> Path:
    """A suite path, or a shipped suite's name ('router', 'hermes_agent.json')."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    shipped = SUITES_DIR / (candidate.name if candidate.suffix == ".json" else f"{candidate.name}.json")
    if not candidate.parent.parts and shipped.is_file():
        return shipped
    names = ", ".join(shipped_suites())
    raise FileNotFoundError(f"suite {str(path)!r} not found: pass a JSON file path or a shipped suite ({names})")


def shipped_suites() -> list[str]:
    """Names of the suites that ship with lfm_mlx."""
    return sorted(p.stem for p in SUITES_DIR.glob("*.json"))
