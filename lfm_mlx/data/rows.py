"""Training rows read and validated (OpenAI chat form; every problem of a row in one error), before any model loads."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from lfm_mlx.errors import InvalidInput, MissingInput


ROLES = ("system", "user", "assistant", "tool")
DEFAULT_MAX_TOKENS = 10240


@dataclass
class RawRow:
    """One row as read: where it came from, the parsed value, or why it could not be parsed."""

    where: str  # "path:line" or "rows[i]"
    value: Any = None
    error: str | None = None


@dataclass
class Row:
    """A valid row, normalized (arguments as dicts, text parts joined)."""

    row_id: str
    where: str
    messages: list[dict]
    tools: list[dict] | None = None


@dataclass
class ValidationResult:
    """Valid rows, the dropped ones as (where, reason), and the sha256 of each source file."""

    rows: list[Row]
    dropped: list[tuple[str, str]] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)
    n_read: int = 0


class RowValidationError(InvalidInput):
    """Bad rows, all of them listed as `file:line: reason` in one message (`.problems`)."""

    def __init__(self, problems: list[str], n_bad: int, n_read: int):
        self.problems = problems
        super().__init__(
            f"{n_bad} of {n_read} rows are invalid:\n" + "\n".join(problems)
            + "\nfix these rows, or drop and count them with skip_invalid: true (a config key; on the command "
              "line `lfm-mlx train CONFIG --set skip_invalid=true`, `lfm-mlx lora CONFIG --skip-invalid true`)"
        )


def _source_files(source) -> list[Path] | None:
    """The files of `source`, or None when it is a list of in-memory rows."""
    if isinstance(source, (str, Path)):
        return [Path(source)]
    items = list(source)
    if not items:
        raise InvalidInput("no training data: got an empty list of files or rows")
    if all(isinstance(item, dict) for item in items):
        return None
    if all(isinstance(item, (str, Path)) for item in items):
        return [Path(item) for item in items]
    raise TypeError("training data must be a JSONL path, a list of paths, or a list of row dicts")


def load_rows(source: str | Path | Sequence[str | Path] | Sequence[dict]) -> list[RawRow]:
    """Read rows from JSONL file(s) or take a list of dicts; blank lines are skipped."""
    files = _source_files(source)
    if files is None:
        return [RawRow(where=f"rows[{i}]", value=row) for i, row in enumerate(source)]
    rows = []
    for path in files:
        if not path.is_file():
            raise MissingInput(f"training data file {path} does not exist")
        found = 0
        with open(path, "rb") as handle:  # bytes: a line that is not UTF-8 is one bad row, not a crash
            for number, raw in enumerate(handle, start=1):
                where = f"{path}:{number}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    bad = raw[error.start:error.start + 1]
                    rows.append(RawRow(where=where, error=f"not UTF-8 text (byte {error.start}: {bad!r}); "
                                                          "save the file as UTF-8"))
                    found += 1
                    continue
                if not line.strip():
                    continue
                found += 1
                try:
                    rows.append(RawRow(where=where, value=json.loads(line)))
                except json.JSONDecodeError as error:
                    rows.append(RawRow(where=where, error=f"invalid JSON: {error.msg} (column {error.colno})"))
        if not found:
            raise InvalidInput(f"training data file {path} holds no rows (it is empty or blank); "
                               "put one JSON chat row per line in it, or leave it out")
    return rows


def _text(value: Any, what: str, problems: list[str]) -> str | None:
    """Content as a string: a string, or OpenAI text parts joined; None (with a problem) otherwise."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str) for part in value
    ):
        return "".join(part["text"] for part in value)
    problems.append(f"{what}: content must be a string (or a list of text parts), got {type(value).__name__}")
    return None


def _check_tools(tools: Any, problems: list[str]) -> set[str]:
    """Validate the `tools` list; return the tool names."""
    names: set[str] = set()
    if not isinstance(tools, list):
        problems.append(f"`tools` must be a list of tool schemas, got {type(tools).__name__}")
        return names
    for i, tool in enumerate(tools):
        spec = tool.get("function") if isinstance(tool, dict) and "function" in tool else tool
        if isinstance(tool, dict) and "function" in tool and tool.get("type", "function") != "function":
            problems.append(f"tools[{i}]: type {tool.get('type')!r} is not 'function'")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            problems.append(f"tools[{i}]: needs a non-empty `name` (or `function.name`)")
            continue
        if "parameters" in spec and not isinstance(spec["parameters"], dict):
            problems.append(f"tools[{i}] ({spec['name']}): `parameters` must be a JSON schema object")
        if spec["name"] in names:
            problems.append(f"tools[{i}]: tool {spec['name']!r} is listed twice")
        names.add(spec["name"])
    return names


def _check_call(call: Any, what: str, tool_names: set[str] | None, problems: list[str]) -> dict | None:
    """Validate one assistant tool call; return it normalized (arguments as a dict)."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict):
        problems.append(f"{what}: a tool call needs a `function` object with `name` and `arguments`")
        return None
    if call.get("type", "function") != "function":
        problems.append(f"{what}: type {call.get('type')!r} is not 'function'")
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        problems.append(f"{what}: missing function.name")
        return None
    if "arguments" not in fn:
        problems.append(f"{what} ({name}): missing function.arguments (use {{}} for a call without arguments)")
        return None
    arguments = fn["arguments"]
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as error:
            problems.append(f"{what} ({name}): arguments are not valid JSON: {error.msg} (column {error.colno})")
            return None
    if not isinstance(arguments, dict):
        problems.append(f"{what} ({name}): arguments must be a JSON object, got {type(arguments).__name__}")
        return None
    if tool_names is None:
        problems.append(f"{what}: calls {name!r} but the row has no `tools` list; add the tool schemas under `tools`")
    elif name not in tool_names:
        problems.append(f"{what}: calls {name!r}, which is not in `tools` ({', '.join(sorted(tool_names)) or 'empty'})")
    normalized = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if "id" in call:
        normalized["id"] = call["id"]
    return normalized


def check_row(value: Any, where: str) -> tuple[Row | None, list[str]]:
    """Validate one parsed row: (normalized Row, []) or (None, every problem found)."""
    if not isinstance(value, dict):
        return None, [f"row is a JSON {type(value).__name__}, expected an object with `messages`"]
    problems: list[str] = []
    messages = value.get("messages")
    if not isinstance(messages, list) or not messages:
        got = "missing" if messages is None else f"{type(messages).__name__} {messages!r}"[:60]
        return None, [f"`messages` must be a non-empty list of chat messages ({got})"]
    tools = value.get("tools")
    tool_names = _check_tools(tools, problems) if tools is not None else None

    normalized: list[dict] = []
    pending: list[dict] = []  # calls of the latest assistant turn not yet answered by a tool turn
    has_assistant = False
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        what = f"messages[{i}]" + (f" ({role})" if isinstance(role, str) else "")
        if not isinstance(message, dict):
            problems.append(f"{what}: a message must be an object with `role` and `content`")
            continue
        if role not in ROLES:
            problems.append(f"{what}: unknown role {role!r}; use one of {', '.join(ROLES)}")
            continue
        content = message.get("content")
        if role == "assistant":
            has_assistant = True
            text = "" if content is None else _text(content, what, problems)
            calls = message.get("tool_calls") or []
            if not isinstance(calls, list):
                problems.append(f"{what}: tool_calls must be a list")
                calls = []
            checked = [_check_call(c, f"{what} tool_calls[{j}]", tool_names, problems) for j, c in enumerate(calls)]
            if text is not None and not text.strip() and not calls:
                problems.append(f"{what}: empty assistant turn (no content and no tool_calls)")
            out = {"role": role, "content": text or ""}
            if calls:
                out["tool_calls"] = [c for c in checked if c is not None]
            pending = list(out.get("tool_calls", []))
        else:
            if content is None:
                problems.append(f"{what}: missing content")
                continue
            text = _text(content, what, problems)
            out = {"role": role, "content": text}
            if role == "tool":
                problems.extend(_answer_call(message, what, pending, out))
            else:
                pending = []
        normalized.append(out)
    if not has_assistant:
        problems.append("no assistant turn: nothing to train on")
    if problems:
        return None, problems
    row_id = value.get("id")
    row_id = str(row_id) if isinstance(row_id, (str, int)) else where
    return Row(row_id=row_id, where=where, messages=normalized, tools=tools), []


def _answer_call(message: dict, what: str, pending: list[dict], out: dict) -> list[str]:
    """Match a tool turn to a pending call of the preceding assistant turn (by id when given)."""
    if not pending:
        return [f"{what}: tool result without a preceding assistant tool call to answer"]
    call_id = message.get("tool_call_id")
    if call_id is not None:
        out["tool_call_id"] = call_id
        ids = [c.get("id") for c in pending]
        if any(i is not None for i in ids):
            if call_id not in ids:
                return [f"{what}: tool_call_id {call_id!r} matches no unanswered call (ids: {ids})"]
            pending.pop(ids.index(call_id))
            return []
    pending.pop(0)
    return []


def validate_rows(source: str | Path | Sequence[str | Path] | Sequence[dict],
                  skip_invalid: bool = False) -> ValidationResult:
    """Validate every row. Raise RowValidationError listing every bad row as `where: reason`,
    or with `skip_invalid` drop them and record why."""
    raw = load_rows(source)
    files = _source_files(source)
    sources = {str(path): hashlib.sha256(path.read_bytes()).hexdigest() for path in files or []}
    rows, dropped, problems = [], [], []
    for item in raw:
        found = [item.error] if item.error else []
        row = None
        if not found:
            row, found = check_row(item.value, item.where)
        if found:
            dropped.append((item.where, "; ".join(found)))
            problems.extend(f"{item.where}: {reason}" for reason in found)
        else:
            rows.append(row)
    if dropped and not skip_invalid:
        raise RowValidationError(problems, len(dropped), len(raw))
    return ValidationResult(rows=rows, dropped=dropped, sources=sources, n_read=len(raw))
