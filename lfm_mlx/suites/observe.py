"""What a model did in reply to a case, before any verdict: the reply (`Response`) and `observe`, shared
by evaluate's grading and bfcl's (so neither imports the other)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from lfm_mlx.suites import Case
from lfm_mlx.tools import NATIVE, ParseResult, ToolCall, parse_tool_calls


@dataclass
class Response:
    """One model reply as the client sees it."""

    text: str  # raw generation (in-process) or message.content (endpoint)
    structured: list[ToolCall] | None  # the server's parsed tool_calls; None: `text` is the raw generation
    finish_reason: str | None = None
    error: str | None = None  # a failed request that does not stop the run (e.g. HTTP 500 on one case)
    raw: dict | None = None  # the endpoint's choices[0] and usage as received, kept in the report


def _key(call: ToolCall) -> str:
    return call.name + json.dumps(call.arguments, sort_keys=True)


def _dropped_call(response: Response, structured: list[ToolCall], leaked: list[ToolCall]) -> list[str]:
    """What a server's reply says about a call it could not parse and left out.

    mlx_lm.server takes the text between the tool-call markers out of the content and returns
    what its parser made of it: nothing, when that text is not a call (finish_reason "tool_calls",
    no calls) or was cut off by max_tokens (finish_reason "length", no content, no calls). The
    in-process backends see that text and count it malformed; so does this.
    """
    if response.structured is None or structured or leaked or response.error:
        return []
    if response.finish_reason == "tool_calls":
        return ["the server ended on a tool call (finish_reason tool_calls) but returned no parsed call"]
    if response.finish_reason == "length" and not response.text:
        return ["the server returned no content and no call for a reply cut at max_tokens (an unfinished call it dropped)"]
    return []


def observe(case: Case, response: Response, raw: bool = False) -> tuple[dict, list[ToolCall], list[ToolCall], ParseResult]:
    """What the model did, before any verdict: the run record (not passed yet), the calls that
    count (structured ones; all parsed ones with `raw`), the calls left in plain text, and the parse."""
    parsed = parse_tool_calls(response.text or "")
    if response.structured is None:  # raw generation: calls inside the markers are what a server returns structured
        structured = [c for c, form in zip(parsed.calls, parsed.formats) if form == NATIVE]
        leaked = [c for c, form in zip(parsed.calls, parsed.formats) if form != NATIVE]
    else:  # a server already took its calls out; anything still parseable in content leaked
        structured, leaked = list(response.structured), list(parsed.calls)
    malformed = list(parsed.malformed) + _dropped_call(response, structured, leaked)
    calls = structured + leaked if raw else structured
    history = {_key(c) for c in case.history_calls()}
    keys = [_key(c) for c in calls]
    loop = len(set(keys)) < len(keys) or any(k in history for k in keys)
    run: dict[str, Any] = {
        "passed": False, "failure": None, "detail": "",
        "calls": [{"name": c.name, "arguments": c.arguments} for c in calls],
        "structured_calls": len(structured),
        "leaked_calls": [{"name": c.name, "arguments": c.arguments} for c in leaked],
        "malformed": malformed, "repairs": parsed.repairs, "loop": loop,
        "content": parsed.content[:2000], "text": (response.text or "")[:2000], "finish_reason": response.finish_reason,
    }
    if response.raw is not None:
        run["raw"] = json.dumps(response.raw, ensure_ascii=False)[:2000]
    if response.error:
        run.update(failure="error", detail=response.error)
    return run, calls, leaked, parsed
