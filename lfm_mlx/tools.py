"""Tool-call formats: parse and render LFM2 pythonic calls, JSON calls and the bare bracket form.

LFM2 / LFM2.5 emit `<|tool_call_start|>[name(arg='v', n=3)]<|tool_call_end|>`; other runtimes and
fine-tunes emit JSON (`{"name": ..., "arguments": {...}}`, fenced or bare) or the bracket form
without the special tokens. `parse_tool_calls` finds all of them in a model's text with a small
hand-written parser (never `eval`), and reports what looks like a call but cannot be parsed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

TOOL_CALL_START = "<|tool_call_start|>"
TOOL_CALL_END = "<|tool_call_end|>"
# Turn / stream markers a raw generation may still carry; they are not content.
_STRAY_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|im_start|>assistant\n")

# Where a parsed call came from: inside the tool-call markers (what a server's pythonic parser
# returns as structured tool_calls), the bracket form without markers, or JSON.
NATIVE, BRACKET, JSON_FORM = "native", "bracket", "json"


@dataclass
class ToolCall:
    """One tool call: a function name and its keyword arguments."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)

    def to_openai(self) -> dict:
        """The OpenAI chat `tool_calls` entry (arguments as a mapping, as chat templates take it)."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ParseResult:
    """Calls found in a text, the text left outside them, and what could not be parsed."""

    calls: list[ToolCall] = field(default_factory=list)
    content: str = ""
    malformed: list[str] = field(default_factory=list)
    formats: list[str] = field(default_factory=list)  # per call: native | bracket | json
    repairs: list[str] = field(default_factory=list)  # fixes the tolerant JSON pass applied


class ToolCallSyntaxError(ValueError):
    """Raised by the low-level parsers; the message names the offset and what was expected."""


# --------------------------------------------------------------------------------------------
# A small scanner for Python / JSON literal values and pythonic calls.

# Names follow Python's identifier rules, Unicode letters included (`año_vehiculo`), plus '-' for
# tool names such as `system-settings`: a letter or '_' first, then letters, digits, '_' or '-'.
_IDENT = r"[^\W\d][\w\-]*"
_NAME_RE = re.compile(_IDENT)
_NUMBER_RE = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_KEYWORD_RE = re.compile(rf"({_IDENT})[ \t]*=(?!=)")

_CONSTANTS = {"None": None, "True": True, "False": False, "null": None, "true": True, "false": False}
_SIMPLE_ESCAPES = {
    "\\": "\\", "'": "'", '"': '"', "/": "/", "n": "\n", "t": "\t", "r": "\r", "b": "\b",
    "f": "\f", "0": "\0", "\n": "",
}


def _is_identifier(name: str) -> bool:
    """Python's own test (`x²` is \\w but no identifier), with '-' allowed inside tool names."""
    return name.replace("-", "_").isidentifier()


class _Scanner:
    """Recursive-descent parser over `text` from `pos`.

    tolerant=True is the JSON repair mode: bare-word dict keys are accepted and containers left
    open at the end of the text are closed; each fix is recorded in `repairs`.
    """

    def __init__(self, text: str, pos: int = 0, tolerant: bool = False) -> None:
        self.text = text
        self.pos = pos
        self.tolerant = tolerant
        self.repairs: list[str] = []

    def fail(self, expected: str) -> ToolCallSyntaxError:
        snippet = self.text[self.pos : self.pos + 20]
        found = repr(snippet) if snippet else "end of text"
        return ToolCallSyntaxError(f"expected {expected} at offset {self.pos}, found {found}")

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t\r\n":
            self.pos += 1

    def at_end(self) -> bool:
        self.skip_ws()
        return self.pos >= len(self.text)

    def peek(self) -> str:
        self.skip_ws()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def accept(self, char: str) -> bool:
        if self.peek() == char:
            self.pos += 1
            return True
        return False

    def name(self, dotted: bool) -> str:
        self.skip_ws()
        parts = []
        while True:
            match = _NAME_RE.match(self.text, self.pos)
            if not match or not _is_identifier(match.group()):
                raise self.fail("a name")
            parts.append(match.group())
            self.pos = match.end()
            if not (dotted and self.text.startswith(".", self.pos)):
                return ".".join(parts)
            self.pos += 1

    def string(self) -> str:
        quote = self.text[self.pos]
        self.pos += 1
        out = []
        while True:
            if self.pos >= len(self.text):
                raise ToolCallSyntaxError(f"unterminated string starting with {quote} before the end of text")
            char = self.text[self.pos]
            if char == quote:
                self.pos += 1
                return "".join(out)
            if char != "\\":
                out.append(char)
                self.pos += 1
                continue
            esc = self.text[self.pos + 1 : self.pos + 2]
            if esc in _SIMPLE_ESCAPES:
                out.append(_SIMPLE_ESCAPES[esc])
                self.pos += 2
            elif esc in ("u", "x"):
                width = 4 if esc == "u" else 2
                digits = self.text[self.pos + 2 : self.pos + 2 + width]
                if len(digits) != width or not all(c in "0123456789abcdefABCDEF" for c in digits):
                    raise self.fail(f"{width} hex digits after \\{esc}")
                out.append(chr(int(digits, 16)))
                self.pos += 2 + width
            else:
                # Python keeps unknown escapes verbatim (e.g. a regex '\d'); so do we.
                out.append("\\")
                self.pos += 1

    def value(self) -> Any:
        char = self.peek()
        if char in ("'", '"'):
            return _join_surrogates(self.string())
        if char == "[":
            self.pos += 1
            return self.sequence("]")
        if char == "{":
            self.pos += 1
            return self.mapping()
        match = _NUMBER_RE.match(self.text, self.pos)
        if match:
            self.pos = match.end()
            token = match.group()
            return float(token) if any(c in token for c in ".eE") else int(token)
        match = _NAME_RE.match(self.text, self.pos)
        if match and match.group() in _CONSTANTS:
            self.pos = match.end()
            return _CONSTANTS[match.group()]
        if match:
            raise self.fail(f"a value (bare name {match.group()!r}: quote strings)")
        if not char and self.tolerant:
            raise _EndOfText()
        raise self.fail("a value")

    def close_at_end(self, closer: str) -> bool:
        """In tolerant mode, a container still open at the end of the text is closed here."""
        if self.tolerant and self.at_end():
            self.repairs.append(f"added missing {closer!r}")
            return True
        return False

    def sequence(self, closer: str) -> list:
        items: list = []
        while True:
            if self.accept(closer) or self.close_at_end(closer):
                return items
            try:
                items.append(self.value())
            except _EndOfText:
                self.close_at_end(closer)
                return items
            if self.accept(","):
                continue
            if self.accept(closer) or self.close_at_end(closer):
                return items
            raise self.fail(f"',' or {closer!r}")

    def mapping(self) -> dict:
        out: dict = {}
        while True:
            if self.accept("}") or self.close_at_end("}"):
                return out
            char = self.peek()
            if char in ("'", '"'):
                key = _join_surrogates(self.string())
            elif self.tolerant and _NAME_RE.match(self.text, self.pos):
                key = self.name(dotted=False)
                self.repairs.append(f"quoted bare key {key!r}")
            else:
                raise self.fail("a quoted dict key")
            if not self.accept(":"):
                raise self.fail("':' after a dict key")
            try:
                out[key] = self.value()
            except _EndOfText:
                raise self.fail("a value after ':'") from None
            if self.accept(","):
                continue
            if self.accept("}") or self.close_at_end("}"):
                return out
            raise self.fail("',' or '}'")

    def call(self) -> ToolCall:
        name = self.name(dotted=True)
        if not self.accept("("):
            raise self.fail(f"'(' after the function name {name!r}")
        arguments: dict[str, Any] = {}
        while not self.accept(")"):
            self.skip_ws()
            match = _KEYWORD_RE.match(self.text, self.pos)
            if not match or not _is_identifier(match.group(1)):
                raise self.fail(f"a keyword argument in {name}(...) (tool calls take keyword=value only)")
            key = match.group(1)
            self.pos = match.end()
            if key in arguments:
                raise ToolCallSyntaxError(f"argument {key!r} given twice in {name}(...)")
            arguments[key] = self.value()
            if not self.accept(",") and self.peek() != ")":
                raise self.fail(f"',' or ')' in {name}(...)")
        return ToolCall(name, arguments)

    def call_list(self) -> list[ToolCall]:
        """`[call, call, ...]` (at least one call)."""
        if not self.accept("["):
            raise self.fail("'[' opening a list of calls")
        calls = [self.call()]
        while self.accept(","):
            if self.peek() == "]":
                break
            calls.append(self.call())
        if not self.accept("]"):
            raise self.fail("',' or ']' after a call")
        return calls


class _EndOfText(Exception):
    """Internal: the tolerant scanner ran out of text where a value should start."""


def _join_surrogates(text: str) -> str:
    """JSON writes characters outside the BMP as \\uD83D\\uDE00 surrogate pairs; rejoin them."""
    if not any("\ud800" <= c <= "\udfff" for c in text):
        return text
    try:
        return text.encode("utf-16", "surrogatepass").decode("utf-16")
    except UnicodeDecodeError:
        raise ToolCallSyntaxError(f"lone surrogate escape in string {text[:40]!r}") from None


def parse_pythonic(text: str) -> list[ToolCall]:
    """Parse a whole `[a(x='1'), b.c(y=[1, {"k": 2}])]` payload; raise ToolCallSyntaxError if it is not one."""
    scanner = _Scanner(text)
    calls = scanner.call_list()
    if not scanner.at_end():
        raise scanner.fail("end of the call list")
    return calls


# --------------------------------------------------------------------------------------------
# JSON calls.

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


# --------------------------------------------------------------------------------------------
# Finding calls in free text.

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


# --------------------------------------------------------------------------------------------
# Rendering.

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
