"""Tool-call formats: parse and render LFM2 pythonic calls, JSON calls and the bare bracket form.

LFM2 / LFM2.5 emit `<|tool_call_start|>[name(arg='v', n=3)]<|tool_call_end|>`; other runtimes and
fine-tunes emit JSON (`{"name": ..., "arguments": {...}}`, fenced or bare) or the bracket form
without the special tokens. `parse_tool_calls` finds all of them in a model's text with a small
hand-written parser (never `eval`), and reports what looks like a call but cannot be parsed.

The package, one concern per module: `calls` (ToolCall, ParseResult, markers), `pythonic` (the scanner),
`json_calls`, `parse` (parse_tool_calls), `render`.
"""

from __future__ import annotations

from lfm_mlx.tools.calls import (
    TOOL_CALL_START, TOOL_CALL_END, NATIVE, BRACKET, JSON_FORM, ToolCall, ParseResult, ToolCallSyntaxError,
)
from lfm_mlx.tools.pythonic import (
    parse_pythonic,
)
from lfm_mlx.tools.json_calls import (
    parse_json_calls,
)
from lfm_mlx.tools.parse import (
    parse_tool_calls, calls_from_openai,
)
from lfm_mlx.tools.render import (
    render_value, render_pythonic, render_json,
)

__all__ = [
    "TOOL_CALL_START", "TOOL_CALL_END", "NATIVE", "BRACKET", "JSON_FORM", "ToolCall", "ParseResult",
    "ToolCallSyntaxError", "parse_pythonic", "parse_json_calls", "parse_tool_calls", "calls_from_openai",
    "render_value", "render_pythonic", "render_json",
]
