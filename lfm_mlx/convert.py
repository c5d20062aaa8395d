"""Import tool traces from other formats as our chat rows.

    lfm-mlx convert --from hermes|sharegpt|xlam|folded IN.jsonl OUT.jsonl

Formats (from their public descriptions):
- hermes: `conversations` (from/value) or `messages` (role/content); tools as JSON inside `<tools>...</tools>`
  in the system turn; calls as `<tool_call>{"name": ..., "arguments": ...}</tool_call>` in assistant text;
  results as `<tool_response>...</tool_response>` in `tool` turns.
- sharegpt: `conversations` with from human / gpt / function_call / observation (/ system), `tools` and
  `system` as row keys (tools a JSON string or a list).
- xlam: xLAM / APIGen rows: `query`, `tools` and `answers` (JSON strings or lists); tool parameters in
  xLAM's own `{param: {type: "str, optional", description, default}}` form or as a JSON schema.
- folded: system prose and the tool declarations (JSON) folded into the first user turn, tool results
  as user turns starting `[TOOL_RESPONSE name=...]`, JSON (or pythonic) calls in assistant text.

Every converted row is checked by `lfm_mlx.data.check_row` (what training accepts); a row that cannot be
converted or fails the check is reported as `file:line: reason`, never dropped silently.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from lfm_mlx.data import check_row, load_rows
from lfm_mlx.errors import InvalidInput
from lfm_mlx.fsutil import atomic_write_text
from lfm_mlx.tools import ToolCall, ToolCallSyntaxError, parse_json_calls, parse_tool_calls

FORMATS = ("hermes", "sharegpt", "xlam", "folded")
_USER_ROLES = ("human", "user")
_ASSISTANT_ROLES = ("gpt", "assistant", "model")


class RowProblem(ValueError):
    """Why one row cannot be converted (the caller adds `file:line`)."""


@dataclass
class ConvertResult:
    """Converted rows, the problems as `file:line: reason`, and counts for the summary."""

    format: str
    rows: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    n_read: int = 0
    tool_calls: int = 0
    tool_results: int = 0

    def counts(self) -> dict:
        return {"format": self.format, "read": self.n_read, "converted": len(self.rows),
                "reported": len(self.problems), "tool_calls": self.tool_calls, "tool_results": self.tool_results}

    def summary(self) -> str:
        return (f"{self.format}: {self.n_read} rows read, {len(self.rows)} converted "
                f"({self.tool_calls} tool calls, {self.tool_results} tool results), {len(self.problems)} reported")


# ---------------------------------------------------------------- shared pieces


class _Turns:
    """Builds an OpenAI-style message list; tool results are matched to the calls they answer."""

    def __init__(self) -> None:
        self.messages: list[dict] = []
        self.pending: list[str] = []  # names of calls not answered yet, in order

    def add(self, role: str, content: str) -> None:
        self.messages.append({"role": role, "content": content})

    def assistant(self, content: str, calls: list[ToolCall]) -> None:
        entries = [{"type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
        last = self.messages[-1] if self.messages else None
        # A call turn right after the assistant's own text (ShareGPT's gpt + function_call) is one turn.
        if last is not None and last["role"] == "assistant" and calls and not content:
            last.setdefault("tool_calls", []).extend(entries)
            self.pending += [c.name for c in calls]
            return
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if entries:
            message["tool_calls"] = entries
        self.messages.append(message)
        self.pending = [c.name for c in calls]

    def tool(self, content: str, name: str | None = None) -> None:
        if name is not None:
            if name not in self.pending:
                unanswered = ", ".join(self.pending) or "none"
                raise RowProblem(f"a tool result for {name!r} answers no call (unanswered calls: {unanswered})")
            self.pending.remove(name)
        elif self.pending:
            self.pending.pop(0)
        self.messages.append({"role": "tool", "content": content})


def _json_value(value: Any, key: str) -> Any:
    """A row field that may hold JSON as a string (xLAM, ShareGPT `tools`) or the value itself."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise RowProblem(f"`{key}` is a string that is not JSON ({err.msg}, column {err.colno})") from None


def _tool_schema(spec: Any, where: str) -> dict:
    """A declared tool as our `{"type": "function", "function": {...}}`."""
    if isinstance(spec, dict) and isinstance(spec.get("function"), dict):
        return {"type": "function", "function": spec["function"]}
    if isinstance(spec, dict) and isinstance(spec.get("name"), str):
        return {"type": "function", "function": spec}
    raise RowProblem(f"{where}: a tool declaration needs a `name`, got {json.dumps(spec)[:80]}")


def _tool_list(value: Any, where: str) -> list[dict]:
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise RowProblem(f"{where} must be a list of tool declarations, got {type(value).__name__}")
    return [_tool_schema(spec, where) for spec in value]


def _is_declaration(value: Any) -> bool:
    """Does a JSON value found in prose declare tools (one schema or a list of them)?"""
    items = value if isinstance(value, list) else [value]
    if not items:
        return False
    for item in items:
        if not isinstance(item, dict):
            return False
        spec = item.get("function") if isinstance(item.get("function"), dict) else item
        if not isinstance(spec.get("name"), str) or not ({"parameters", "description"} & spec.keys()):
            return False
    return True


def _declarations(text: str) -> tuple[list[tuple[int, int]], list[dict]]:
    """Every tool declaration written as JSON inside `text`: their spans and the tools, in order."""
    decoder = json.JSONDecoder()
    spans, tools, pos = [], [], 0
    while pos < len(text):
        if text[pos] not in "[{":
            pos += 1
            continue
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            pos += 1
            continue
        if _is_declaration(value):
            spans.append((pos, end))
            tools.extend(_tool_list(value, "the tool declarations"))
        pos = end  # a JSON value that is no declaration is data: its inner objects are too
    return spans, tools


def _turns_of(value: dict) -> list[tuple[str, str, int]]:
    """(role, text, index) of every turn, from `conversations` (from/value) or `messages` (role/content)."""
    turns = value.get("conversations", value.get("messages"))
    if not isinstance(turns, list) or not turns:
        raise RowProblem("needs a non-empty `conversations` (or `messages`) list")
    out = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowProblem(f"turn {index} is a {type(turn).__name__}, not an object")
        role, text = turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))
        if not isinstance(role, str) or not isinstance(text, str):
            raise RowProblem(f"turn {index} needs a string `from`/`role` and a string `value`/`content`")
        out.append((role.lower(), text, index))
    return out


def _calls(text: str, where: str) -> list[ToolCall]:
    try:
        return parse_json_calls(text)
    except ToolCallSyntaxError as err:
        raise RowProblem(f"{where}: not a tool call: {err}") from None


def _result_text(body: str) -> tuple[str, str | None]:
    """A tool result's text and the tool name when it is `{"name": ..., "content": ...}`."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return body, None
    if isinstance(value, dict) and isinstance(value.get("name"), str) and "content" in value:
        content = value["content"]
        return (content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)), value["name"]
    return body, None


# ---------------------------------------------------------------- formats

_TOOLS_BLOCK = re.compile(r"<tools>(.*?)</tools>", re.DOTALL)
_TOOL_CALL_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
_TOOL_RESPONSE_BLOCK = re.compile(r"<tool_response>(.*?)</tool_response>", re.DOTALL)


def from_hermes(value: dict) -> dict:
    """Hermes function calling: `<tools>` in the system turn, `<tool_call>` / `<tool_response>` blocks."""
    turns, tools = _Turns(), []
    if value.get("tools") is not None:
        tools = _tool_list(_json_value(value["tools"], "tools"), "`tools`")
    for role, text, index in _turns_of(value):
        where = f"turn {index} ({role})"
        if role == "system":
            blocks = _TOOLS_BLOCK.findall(text)
            for block in blocks:
                spans, found = _declarations(block)
                if not found and block.strip() not in ("", "[]"):  # an empty list declares no tools, rightly
                    raise RowProblem(f"{where}: <tools> holds no JSON tool declaration")
                tools.extend(found)
            prose = _TOOLS_BLOCK.sub("", text).strip()
            # Hermes' boilerplate teaches its own <tool_call> syntax, which would contradict LFM's: drop it.
            if prose and "<tool_call>" not in prose and "<tools>" not in prose:
                turns.add("system", prose)
        elif role in _USER_ROLES:
            turns.add("user", text)
        elif role in _ASSISTANT_ROLES:
            if "<tool_call>" in text and not all(m.group(0).endswith("</tool_call>") for m in _TOOL_CALL_BLOCK.finditer(text)):
                raise RowProblem(f"{where}: <tool_call> without a closing </tool_call>")
            calls = [c for body in _TOOL_CALL_BLOCK.findall(text) for c in _calls(body.strip(), where)]
            turns.assistant(_TOOL_CALL_BLOCK.sub("", text).strip(), calls)
        elif role == "tool":
            bodies = _TOOL_RESPONSE_BLOCK.findall(text) or [text]
            for body in bodies:
                content, name = _result_text(body.strip())
                turns.tool(content, name)
        else:
            raise RowProblem(f"{where}: unknown role {role!r} (hermes turns are system, human, gpt, tool)")
    return {"messages": turns.messages, "tools": tools}


def from_sharegpt(value: dict) -> dict:
    """ShareGPT with function calls: function_call / observation turns, `tools` and `system` row keys."""
    turns, tools = _Turns(), []
    if value.get("tools") is not None:
        tools = _tool_list(_json_value(value["tools"], "tools"), "`tools`")
    if isinstance(value.get("system"), str) and value["system"].strip():
        turns.add("system", value["system"])
    for role, text, index in _turns_of(value):
        where = f"turn {index} ({role})"
        if role == "system":
            turns.add("system", text)
        elif role in _USER_ROLES:
            turns.add("user", text)
        elif role in _ASSISTANT_ROLES:
            turns.assistant(text, [])
        elif role == "function_call":
            turns.assistant("", _calls(text, where))
        elif role in ("observation", "tool", "function_response"):
            turns.tool(text)
        else:
            raise RowProblem(f"{where}: unknown role {role!r} (sharegpt turns are system, human, gpt, "
                             "function_call, observation)")
    return {"messages": turns.messages, "tools": tools}


_XLAM_TYPES = (("str", "string"), ("int", "integer"), ("float", "number"), ("bool", "boolean"),
               ("list", "array"), ("tuple", "array"), ("set", "array"), ("dict", "object"))


def _xlam_parameters(params: Any, name: str) -> dict:
    """xLAM's `{param: {type: "str, optional", description, default}}` as a JSON schema object."""
    if not isinstance(params, dict):
        raise RowProblem(f"tool {name!r}: parameters must be an object, got {type(params).__name__}")
    if params.get("type") == "object" or isinstance(params.get("properties"), dict):
        return params  # already a JSON schema
    properties, required = {}, []
    for key, spec in params.items():
        if not isinstance(spec, dict):
            raise RowProblem(f"tool {name!r}: parameter {key!r} must be an object with a type and description")
        declared = str(spec.get("type", ""))
        schema = {k: v for k, v in spec.items() if k != "type"}
        base = declared.split(",")[0].strip().lower()
        for prefix, json_type in _XLAM_TYPES:
            if base.startswith(prefix):
                schema["type"] = json_type
                break
        properties[key] = schema
        if "optional" not in declared.lower() and "default" not in spec:
            required.append(key)
    return {"type": "object", "properties": properties, "required": required}


def from_xlam(value: dict) -> dict:
    """xLAM / APIGen: one user query, the offered tools and the answering calls."""
    if not isinstance(value.get("query"), str) or not value["query"].strip():
        raise RowProblem("needs a non-empty string `query`")
    for key in ("tools", "answers"):
        if key not in value:
            raise RowProblem(f"needs `{key}` (a JSON list, or a string holding one)")
    tools = []
    for spec in _tool_list(_json_value(value["tools"], "tools"), "`tools`"):
        function = dict(spec["function"])
        function["parameters"] = _xlam_parameters(function.get("parameters", {}), function["name"])
        tools.append({"type": "function", "function": function})
    answers = _json_value(value["answers"], "answers")
    if not isinstance(answers, list) or not answers:
        raise RowProblem("`answers` is empty: the row has no call, so no assistant turn to train on")
    calls = _calls(json.dumps(answers), "`answers`")
    turns = _Turns()
    turns.add("user", value["query"])
    turns.assistant("", calls)
    return {"messages": turns.messages, "tools": tools}


_TOOL_RESPONSE_MARK = re.compile(r"^[ \t]*\[TOOL_RESPONSE name=([^\]\s]+)\][ \t]*\n?", re.MULTILINE)


def from_folded(value: dict) -> dict:
    """System prose + tool declarations folded into the first user turn, `[TOOL_RESPONSE name=...]` turns."""
    turns, tools, first_user = _Turns(), [], True
    for role, text, index in _turns_of(value):
        where = f"turn {index} ({role})"
        if role == "system":
            turns.add("system", text)
        elif role in _USER_ROLES and first_user:
            first_user = False
            spans, tools = _declarations(text)
            if not spans:
                raise RowProblem(f"{where}: the first user turn declares no tools (expected a JSON tool schema or list)")
            prose = re.sub(r"<tools>\s*$", "", text[: spans[0][0]]).strip()
            question = re.sub(r"^\s*</tools>", "", text[spans[-1][1]:]).strip()
            if not question:
                raise RowProblem(f"{where}: no user question after the tool declarations")
            if prose:
                turns.add("system", prose)
            turns.add("user", question)
        elif role in _USER_ROLES:
            marks = list(_TOOL_RESPONSE_MARK.finditer(text))
            if not marks:
                turns.add("user", text)
                continue
            if text[: marks[0].start()].strip():
                raise RowProblem(f"{where}: text before [TOOL_RESPONSE ...] (a result turn holds results only)")
            for number, mark in enumerate(marks):
                end = marks[number + 1].start() if number + 1 < len(marks) else len(text)
                turns.tool(text[mark.end():end].strip(), mark.group(1))
        elif role in _ASSISTANT_ROLES:
            parsed = parse_tool_calls(text)
            if parsed.malformed:
                raise RowProblem(f"{where}: {parsed.malformed[0]}")
            turns.assistant(parsed.content, parsed.calls)
        else:
            raise RowProblem(f"{where}: unknown role {role!r} (folded turns are system, user, assistant)")
    return {"messages": turns.messages, "tools": tools}


CONVERTERS = {"hermes": from_hermes, "sharegpt": from_sharegpt, "xlam": from_xlam, "folded": from_folded}


# ---------------------------------------------------------------- rows and files


def convert_row(value: Any, fmt: str, where: str = "row") -> dict:
    """One source row as our row (validated by data.check_row); raise RowProblem saying why not."""
    if fmt not in CONVERTERS:
        raise InvalidInput(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not isinstance(value, dict):
        raise RowProblem(f"a {fmt} row is a JSON object, got a {type(value).__name__}")
    row = CONVERTERS[fmt](value)
    if isinstance(value.get("id"), (str, int)):
        row = {"id": value["id"], **row}
    _, problems = check_row(row, where)
    if problems:
        raise RowProblem("; ".join(problems))
    return row


def convert_rows(source: str | Path | Sequence[dict], fmt: str) -> ConvertResult:
    """Convert a JSONL file (or a list of row dicts); every row is converted or reported."""
    if fmt not in CONVERTERS:
        raise InvalidInput(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    result = ConvertResult(format=fmt)
    for item in load_rows(source):
        result.n_read += 1
        try:
            if item.error:
                raise RowProblem(item.error)
            row = convert_row(item.value, fmt, item.where)
        except RowProblem as err:
            result.problems.append(f"{item.where}: {err}")
            continue
        result.rows.append(row)
        for message in row["messages"]:
            result.tool_calls += len(message.get("tool_calls", []))
            result.tool_results += message["role"] == "tool"
    return result


def convert_file(src: str | Path, dst: str | Path, fmt: str) -> ConvertResult:
    """Convert `src` (JSONL) into `dst` (our rows, JSONL, written atomically); see convert_rows.

    Raises InvalidInput when no row converts (most likely the wrong format), without writing `dst`.
    """
    if Path(dst).resolve() == Path(src).resolve():
        raise InvalidInput(f"{dst}: the output would overwrite the input; write it to another file")
    result = convert_rows(src, fmt)
    if not result.rows:
        raise InvalidInput(f"{src}: none of its {result.n_read} rows converts as {fmt} "
                           f"(first: {result.problems[0]}); is --from right?")
    atomic_write_text(dst, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in result.rows))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lfm-mlx convert", description="Convert tool traces to lfm_mlx chat rows.")
    parser.add_argument("--from", dest="fmt", required=True, choices=FORMATS, help="the input's format")
    parser.add_argument("input", help="JSONL file in that format")
    parser.add_argument("output", help="JSONL file of chat rows to write")
    args = parser.parse_args(argv)
    result = convert_file(args.input, args.output, args.fmt)
    for problem in result.problems:
        print(problem, file=sys.stderr)
    print(f"{result.summary()}; wrote {args.output}")
    return 1 if result.problems else 0


if __name__ == "__main__":
    sys.exit(main())
