"""What a parse finds: a ToolCall, the ParseResult of a text, the syntax error, and the call markers."""

from __future__ import annotations

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
