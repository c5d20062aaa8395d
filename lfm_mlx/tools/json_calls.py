"""Calls written as JSON (`{"name": ..., "arguments": {...}}`, one or a list), decoded with a tolerant pass."""

from __future__ import annotations

import json
from typing import Any

from lfm_mlx.tools.calls import ToolCall, ToolCallSyntaxError
from lfm_mlx.tools.pythonic import _EndOfText, _Scanner


def _calls_from_json(value: Any) -> list[ToolCall] | None:
    """Interpret a decoded JSON value as calls; None when it is not call-shaped at all.

    Raises ToolCallSyntaxError when it is call-shaped but broken (e.g. arguments not an object).
    """
    if isinstance(value, list):
        if not value:
            return None
        calls = []
        for item in value:
            got = _calls_from_json(item)
            if got is None:
                return None
            calls.extend(got)
        return calls
    if not isinstance(value, dict):
        return None
    if isinstance(value.get("tool_calls"), list):
        return _calls_from_json(value["tool_calls"])
    if isinstance(value.get("function"), dict):  # OpenAI {"type": "function", "function": {...}}
        return _calls_from_json(value["function"])
    name = value.get("name", value.get("function"))
    if not isinstance(name, str) or not name:
        return None
    # A data object that merely has a "name" field ({"name": "Alice", "age": 3}) is not a call.
    if not ({"arguments", "parameters"} & value.keys()) and not value.keys() <= {"name", "function", "type", "id"}:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as err:
            raise ToolCallSyntaxError(f"arguments of {name!r} are a string that is not JSON ({err.msg})") from None
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise ToolCallSyntaxError(f"arguments of {name!r} must be an object, got {type(arguments).__name__}")
    return [ToolCall(name, arguments)]


def _decode_json_at(text: str, pos: int) -> tuple[Any, int, list[str]]:
    """Decode one JSON value starting at text[pos]: strict first, then the tolerant repair pass.

    The repair pass accepts single quotes, trailing commas, Python constants, bare keys and
    closes containers left open at the end of the text. Returns (value, end, repairs).
    """
    try:
        value, end = json.JSONDecoder().raw_decode(text, pos)
        return value, end, []
    except json.JSONDecodeError:
        pass
    scanner = _Scanner(text, pos, tolerant=True)
    try:
        value = scanner.value()
    except _EndOfText:
        raise scanner.fail("a JSON value") from None
    repairs = scanner.repairs or ["accepted non-JSON syntax (quotes, trailing commas or constants)"]
    return value, scanner.pos, repairs


def parse_json_calls(text: str) -> list[ToolCall]:
    """Parse text that is exactly one JSON call or a list of them (with the repair pass)."""
    start = len(text) - len(text.lstrip())
    value, end, _ = _decode_json_at(text, start)
    if text[end:].strip():
        raise ToolCallSyntaxError(f"unexpected text after the JSON value at offset {end}: {text[end:end + 20]!r}")
    calls = _calls_from_json(value)
    if calls is None:
        raise ToolCallSyntaxError("JSON value is not a tool call (no 'name' or 'function' key)")
    return calls
