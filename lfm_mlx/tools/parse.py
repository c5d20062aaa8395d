"""Finding every call in a model's free text (native markers, bracket form, fenced or tagged JSON) and
reporting what looks like a call but cannot be parsed; OpenAI `tool_calls` to ToolCalls."""

from __future__ import annotations

import re

from lfm_mlx.tools.calls import (
    BRACKET, JSON_FORM, NATIVE, ParseResult, TOOL_CALL_END, TOOL_CALL_START, ToolCall, ToolCallSyntaxError,
    _STRAY_MARKERS,
)
from lfm_mlx.tools.pythonic import _IDENT, _Scanner
from lfm_mlx.tools.json_calls import _calls_from_json, _decode_json_at


# Openers of a fenced (```json) or tagged (<tool_call>) JSON call; the closer is matched after the value.
_OPENER_RE = re.compile(r"```[ \t]*(?:json|tool_call|tool_calls|tool|javascript)?[ \t]*\n|<tool_call>")
_CLOSER_RE = re.compile(r"\s*(?:```|</tool_call>)")
_BRACKET_START_RE = re.compile(rf"\[\s*{_IDENT}(?:\.{_IDENT})*\s*\(")
_JSON_HINT_RE = re.compile(r"""["']?(?:name|function)["']?\s*:""")


def _parse_native_block(text: str, start: int) -> tuple[list[ToolCall] | None, int, str | None, str | None]:
    """Parse the payload after a `<|tool_call_start|>` at `start`.

    Returns (calls or None, end of the block, malformed reason or None, repair note or None).
    """
    body = start + len(TOOL_CALL_START)
    scanner = _Scanner(text, body)
    calls: list[ToolCall] | None = None
    error = None
    try:
        if scanner.peek() == "[" and _BRACKET_START_RE.match(text, scanner.pos):
            calls = scanner.call_list()
        elif scanner.peek() in ("[", "{"):
            value, scanner.pos, _ = _decode_json_at(text, scanner.pos)
            calls = _calls_from_json(value)
            if calls is None:
                error = "the block holds JSON that is not a call"
        else:
            calls = [scanner.call()]  # a single call without the list brackets
    except ToolCallSyntaxError as err:
        error = str(err)
        calls = None
    scanner.skip_ws()
    if calls is not None and text.startswith(TOOL_CALL_END, scanner.pos):
        return calls, scanner.pos + len(TOOL_CALL_END), None, None
    end_marker = text.find(TOOL_CALL_END, body)
    block_end = len(text) if end_marker < 0 else end_marker + len(TOOL_CALL_END)
    rest = text[scanner.pos :]
    leftover = rest
    for marker in _STRAY_MARKERS:
        leftover = leftover.replace(marker, "")
    if calls is not None and end_marker < 0 and not leftover.strip():
        # Generation stopped right after the calls (a server still parses these).
        return calls, len(text), None, f"missing {TOOL_CALL_END} after the calls"
    if calls is not None:
        error = f"unexpected text after the calls at offset {scanner.pos}: {rest[:20]!r}"
    payload = text[body:block_end].removesuffix(TOOL_CALL_END)
    return None, block_end, f"unparseable tool-call block {payload[:60]!r}: {error}", None


def _scan_free_text(text: str, spans: list[tuple[int, int]], result: ParseResult) -> None:
    """Bare JSON calls and bracket calls outside the spans already taken, left to right.

    One left-to-right pass lets the outermost structure win: a JSON call whose string holds
    `[f(x=1)]`, or a bracket call whose dict argument looks like a JSON call, stays one call.
    """
    pos = 0
    while True:
        pos = _next_free(text, spans, pos, "{[")
        if pos < 0:
            return
        if _BRACKET_START_RE.match(text, pos):
            scanner = _Scanner(text, pos)
            try:
                calls = scanner.call_list()
            except ToolCallSyntaxError as err:
                result.malformed.append(f"unparseable bracket call at offset {pos}: {err}")
                end = _balanced_end(text, pos)
                spans.append((pos, end))
                pos = end
                continue
            _take(result, calls, BRACKET, [])
            spans.append((pos, scanner.pos))
            pos = scanner.pos
            continue
        window = text[pos : pos + 200]
        if not _JSON_HINT_RE.search(window):
            pos += 1
            continue
        try:
            value, end, repairs = _decode_json_at(text, pos)
            calls = _calls_from_json(value)
        except ToolCallSyntaxError as err:
            if text[pos] == "{" and re.match(r"""\{\s*["'](?:name|function)["']\s*:""", window):
                result.malformed.append(f"unparseable JSON call at offset {pos}: {err}")
                # Skip the whole broken object so its inner objects are not taken for calls.
                end = _balanced_end(text, pos)
                spans.append((pos, end))
                pos = end
            else:
                pos += 1
            continue
        if calls is None:
            pos = end  # a JSON value that is not a call: its inner objects are data too
            continue
        _take(result, calls, JSON_FORM, repairs)
        spans.append((pos, end))
        pos = end


def _balanced_end(text: str, pos: int) -> int:
    """End of the bracketed region opening at text[pos] (quotes respected), or the end of text."""
    depth, quote = 0, ""
    index = pos
    while index < len(text):
        char = text[index]
        if quote:
            if char == "\\":
                index += 1
            elif char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return index + 1
        index += 1
    return len(text)


def _in_spans(pos: int, spans: list[tuple[int, int]]) -> bool:
    return any(start <= pos < end for start, end in spans)


def _next_free(text: str, spans: list[tuple[int, int]], pos: int, chars: str) -> int:
    while pos < len(text):
        if text[pos] in chars and not _in_spans(pos, spans):
            return pos
        pos += 1
    return -1


def _take(result: ParseResult, calls: list[ToolCall], form: str, repairs: list[str]) -> None:
    result.calls.extend(calls)
    result.formats.extend([form] * len(calls))
    result.repairs.extend(repairs)


def parse_tool_calls(text: str) -> ParseResult:
    """Find every tool call in a model's text: native blocks, fenced / tagged / bare JSON, bracket form.

    Calls are returned by form (native blocks, then fenced / tagged JSON, then bare JSON and
    bracket calls in text order); `content` is the text outside the calls; `malformed` lists what looked like a call
    but could not be parsed, with the reason.
    """
    result = ParseResult()
    spans: list[tuple[int, int]] = []

    pos = text.find(TOOL_CALL_START)
    while pos >= 0:
        calls, end, problem, repair = _parse_native_block(text, pos)
        if calls is not None:
            _take(result, calls, NATIVE, [repair] if repair else [])
        if problem:
            result.malformed.append(problem)
        spans.append((pos, end))
        pos = text.find(TOOL_CALL_START, end)
    stray_end = [m.start() for m in re.finditer(re.escape(TOOL_CALL_END), text) if not _in_spans(m.start(), spans)]
    if stray_end:
        result.malformed.append(f"{TOOL_CALL_END} without a matching {TOOL_CALL_START} at offset {stray_end[0]}")
        for start in stray_end:
            spans.append((start, start + len(TOOL_CALL_END)))

    for match in _OPENER_RE.finditer(text):
        if _in_spans(match.start(), spans):
            continue
        start = match.end() + len(text[match.end() :]) - len(text[match.end() :].lstrip())
        if text[start : start + 1] not in ("{", "["):
            continue
        try:
            # Decode from the value itself (not up to the next fence): strings may hold ```.
            value, end, repairs = _decode_json_at(text, start)
            calls = _calls_from_json(value)
        except ToolCallSyntaxError as err:
            if _JSON_HINT_RE.search(text, start, start + 200):
                result.malformed.append(f"unparseable JSON call block at offset {match.start()}: {err}")
                spans.append((match.start(), _balanced_end(text, start)))
            continue
        if calls is None:
            continue
        closer = _CLOSER_RE.match(text, end)
        _take(result, calls, JSON_FORM, repairs)
        spans.append((match.start(), closer.end() if closer else end))

    _scan_free_text(text, spans, result)

    pieces, last = [], 0
    for start, end in sorted(spans):
        if start >= last:
            pieces.append(text[last:start])
            last = end
        else:
            last = max(last, end)
    pieces.append(text[last:])
    content = "".join(pieces)
    for marker in _STRAY_MARKERS:
        content = content.replace(marker, "")
    result.content = content.strip()
    return result


def calls_from_openai(tool_calls: list[dict] | None) -> list[ToolCall]:
    """Structured OpenAI `message.tool_calls` -> ToolCall list (arguments may be a JSON string).

    Raises ToolCallSyntaxError naming the entry when one is not a call.
    """
    calls = []
    for index, entry in enumerate(tool_calls or []):
        function = entry.get("function") if isinstance(entry, dict) else None
        if not isinstance(function, dict):
            raise ToolCallSyntaxError(f"tool_calls[{index}] has no 'function' object: {entry!r}")
        got = _calls_from_json(function)
        if not got:
            raise ToolCallSyntaxError(f"tool_calls[{index}].function has no name: {function!r}")
        calls.extend(got)
    return calls
