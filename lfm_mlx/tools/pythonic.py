"""A small scanner for Python / JSON literal values and pythonic calls (`[name(arg='v', n=3)]`), never `eval`."""

from __future__ import annotations

import re
from typing import Any

from lfm_mlx.tools.calls import ToolCall, ToolCallSyntaxError


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
