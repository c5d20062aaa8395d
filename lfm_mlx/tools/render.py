"""Rendering calls as the LFM2.5 chat template writes them (pythonic), or as JSON."""

from __future__ import annotations

import json
from typing import Any

from lfm_mlx.tools.calls import TOOL_CALL_END, TOOL_CALL_START, ToolCall


def render_value(value: Any) -> str:
    """One argument value as the LFM2.5 chat template writes it.

    Strings single-quoted (backslash, quote, newline, carriage return escaped), mappings and
    lists as JSON (non-ASCII kept), everything else via str(): True / False / None / numbers.
    """
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r")
        return "'" + escaped + "'"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def render_pythonic(calls: list[ToolCall], markers: bool = True) -> str:
    """`<|tool_call_start|>[a(x='1'), b(n=2)]<|tool_call_end|>`, exactly as the chat template renders."""
    rendered = []
    for call in calls:
        args = ", ".join(f"{key}={render_value(value)}" for key, value in call.arguments.items())
        rendered.append(f"{call.name}({args})")
    body = "[" + ", ".join(rendered) + "]"
    return TOOL_CALL_START + body + TOOL_CALL_END if markers else body


def render_json(calls: list[ToolCall]) -> str:
    """JSON form: one `{"name": ..., "arguments": {...}}` object, or a list of them for several calls."""
    objects = [{"name": call.name, "arguments": call.arguments} for call in calls]
    return json.dumps(objects[0] if len(objects) == 1 else objects, ensure_ascii=False)
