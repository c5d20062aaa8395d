"""Tool-call evaluation: run suites against an in-process MLX model or an OpenAI-compatible endpoint.

    lfm-mlx eval --model DIR [--adapter-path ADAPTERS] --suite router --out runs/eval
    lfm-mlx eval --endpoint http://127.0.0.1:8080/v1 --suite hermes_agent --out runs/eval
    lfm-mlx eval --model DIR --suite bfcl:simple_python,irrelevance --bfcl-data DIR --limit 20 --out runs/bfcl
    lfm-mlx eval --compare BEFORE/report.json AFTER/report.json      (per-category deltas)

Every response is graded against the case's expectation and classified (sibling, cross_server,
wrong_prefix, wrong_arguments, refusal, false_positive, leak, malformed, loop, ...). By default only
structured calls count (message.tool_calls, or for an in-process model the calls inside the
tool-call markers, which is what a server's pythonic parser returns); a call left in plain text is a
"text-tool leak". `--raw` is the parser-disabled mode: lfm_mlx parses the raw text itself and every
call it finds counts. Writes report.json and summary.md (atomically), also when a run stops early.
"""

from __future__ import annotations

import argparse
import json
import shlex
import socket
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Protocol

from lfm_mlx import console
from lfm_mlx.errors import InvalidInput, MissingInput
from lfm_mlx.fsutil import atomic_write_json, atomic_write_text
from lfm_mlx.suites import Case, Suite, argument_problems, load_suite, shipped_suites
from lfm_mlx.tools import NATIVE, ParseResult, ToolCall, ToolCallSyntaxError, calls_from_openai, parse_tool_calls

REPORT_FORMAT = "lfm_mlx.eval_report"
FAILURE_TYPES = (
    "sibling", "cross_server", "wrong_prefix", "wrong_tool", "unknown_tool", "wrong_arguments", "refusal",
    "false_positive", "leak", "malformed", "loop", "wrong_answer", "wrong_count", "error",
)


@dataclass
class Response:
    """One model reply as the client sees it."""

    text: str  # raw generation (in-process) or message.content (endpoint)
    structured: list[ToolCall] | None  # the server's parsed tool_calls; None: `text` is the raw generation
    finish_reason: str | None = None
    error: str | None = None  # a failed request that does not stop the run (e.g. HTTP 500 on one case)
    raw: dict | None = None  # the endpoint's choices[0] and usage as received, kept in the report


class BackendError(RuntimeError):
    """The backend cannot go on (unreachable endpoint, timeout); the run stops with a partial report."""


class Backend(Protocol):
    def describe(self) -> dict: ...

    def respond(self, messages: list[dict], tools: list[dict], max_tokens: int, temperature: float) -> Response: ...


# ---------------------------------------------------------------- backends


class MLXBackend:
    """An in-process MLX model (loaded once), optionally with LoRA adapters; greedy unless temperature > 0.

    By default it computes in `lfm_mlx.load`'s dtype (float32 on CPU, bfloat16 on a GPU).
    `as_served=True` loads it with `mlx_lm.load`, as `mlx_lm.server` does: the stored dtypes
    (bfloat16 for our directories), so on CPU its greedy answers are the server's token for token
    (measured: docs/benchmarks.md, "Eval in-process vs mlx_lm.server"), at about 3x the time.
    """

    def __init__(self, model_dir: str | Path, adapter_path: str | Path | None = None, seed: int = 0,
                 as_served: bool = False) -> None:
        import mlx.core as mx

        from lfm_mlx.models import load

        self.model_dir, self.adapter_path = str(model_dir), adapter_path and str(adapter_path)
        self.as_served = as_served
        if as_served:
            from mlx_lm import load as mlx_lm_load

            self.model, self.tokenizer = mlx_lm_load(self.model_dir, adapter_path=self.adapter_path)
        else:
            self.model, self.tokenizer = load(model_dir)
            if adapter_path:
                from mlx_lm.tuner.utils import load_adapters

                load_adapters(self.model, str(adapter_path))
                self.model.eval()
        self.dtype = str(self.model.model.embedding_norm.weight.dtype).removeprefix("mlx.core.")  # never quantized
        mx.random.seed(seed)

    def describe(self) -> dict:
        return {"kind": "mlx", "model": self.model_dir, "adapter_path": self.adapter_path,
                "loaded_by": "mlx_lm.load (as mlx_lm.server)" if self.as_served else "lfm_mlx.load",
                "dtype": self.dtype}

    def respond(self, messages: list[dict], tools: list[dict], max_tokens: int, temperature: float) -> Response:
        from mlx_lm.generate import stream_generate
        from mlx_lm.sample_utils import make_sampler

        prompt = self.tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True, tokenize=False)
        # The template already writes <|startoftext|>; encoding without special tokens avoids a second BOS.
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        text, finish = "", None
        for chunk in stream_generate(self.model, self.tokenizer, ids, max_tokens=max_tokens, sampler=make_sampler(temp=temperature)):
            text += chunk.text
            finish = chunk.finish_reason
        return Response(text=text, structured=None, finish_reason=finish)


class EndpointBackend:
    """An OpenAI-compatible chat completions endpoint (mlx_lm.server, llama.cpp's server), via urllib."""

    def __init__(self, url: str, model: str | None = None, timeout: float = 120.0, api_key: str | None = None) -> None:
        self.url = url.rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"endpoint {url!r} is not an http(s) URL; pass e.g. http://127.0.0.1:8080/v1")
        self.model, self.timeout, self.api_key = model, timeout, api_key

    def describe(self) -> dict:
        return {"kind": "endpoint", "url": self.url, "model": self.model, "timeout_s": self.timeout}

    def respond(self, messages: list[dict], tools: list[dict], max_tokens: int, temperature: float) -> Response:
        body: dict[str, Any] = {"messages": to_openai_messages(messages), "max_tokens": max_tokens,
                                "temperature": temperature, "stream": False}
        if tools:
            body["tools"] = tools
        if self.model:
            body["model"] = self.model
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(f"{self.url}/chat/completions", json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                payload = json.loads(reply.read())
        except urllib.error.HTTPError as err:
            detail = err.read()[:300].decode("utf-8", "replace")
            if err.code in (401, 403, 404):  # wrong URL or credentials: every request would fail the same way
                raise BackendError(f"{self.url}/chat/completions answered HTTP {err.code}: {detail}; check the URL (it should end in /v1) and the API key") from None
            return Response("", None, error=f"HTTP {err.code}: {detail}")
        except (TimeoutError, socket.timeout):
            raise BackendError(f"{self.url} gave no answer within {self.timeout:g} s; raise --timeout or lower --max-tokens") from None
        except urllib.error.URLError as err:
            if isinstance(err.reason, (TimeoutError, socket.timeout)):
                raise BackendError(f"{self.url} gave no answer within {self.timeout:g} s; raise --timeout or lower --max-tokens") from None
            raise BackendError(f"cannot reach {self.url} ({err.reason}); is the server running? e.g. mlx_lm.server --model DIR --port PORT") from None
        except (json.JSONDecodeError, ConnectionError) as err:
            raise BackendError(f"{self.url} returned a broken response ({err}); is it an OpenAI-compatible server?") from None
        try:
            choice = payload["choices"][0]
            message = choice["message"]
        except (KeyError, IndexError, TypeError):
            return Response("", None, error=f"response has no choices[0].message: {str(payload)[:300]}")
        text, finish, raw = message.get("content") or "", choice.get("finish_reason"), {"choice": choice, "usage": payload.get("usage")}
        try:
            structured = calls_from_openai(message.get("tool_calls"))
        except ToolCallSyntaxError as err:
            return Response(text, [], finish, error=f"bad tool_calls: {err}", raw=raw)
        return Response(text, structured, finish, raw=raw)


class LlamaCppBackend:
    """A GGUF file run in-process by llama.cpp (llama-cpp-python), greedy by default.

    The prompt is rendered with the model directory's chat template (the GGUF embeds the same
    template; lfm_mlx.gguf's tests check both render the same text) and tokenized by llama.cpp;
    the raw generation, special tokens included, is parsed like the in-process MLX backend's.
    """

    def __init__(self, gguf_path: str | Path, tokenizer_dir: str | Path, n_ctx: int = 2048, seed: int = 0) -> None:
        from mlx_lm.tokenizer_utils import load as load_tokenizer

        from lfm_mlx.gguf import open_gguf

        self.gguf_path, self.tokenizer_dir = str(gguf_path), str(tokenizer_dir)
        self.llm = open_gguf(self.gguf_path, n_ctx=n_ctx, seed=seed, verbose=False)
        self.tokenizer = load_tokenizer(Path(tokenizer_dir))

    def describe(self) -> dict:
        return {"kind": "llama.cpp", "model": self.gguf_path, "tokenizer": self.tokenizer_dir}

    def respond(self, messages: list[dict], tools: list[dict], max_tokens: int, temperature: float) -> Response:
        prompt = self.tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True, tokenize=False)
        tokens = self.llm.tokenize(prompt.encode(), add_bos=False, special=True)
        self.llm.reset()
        out, finish = [], "length"
        for token in self.llm.generate(tokens, temp=temperature, top_k=1 if temperature == 0 else 40, reset=True):
            if token == self.llm.token_eos() or token in self.tokenizer.eos_token_ids:
                finish = "stop"
                break
            out.append(token)
            if len(out) >= max_tokens:
                break
        text = self.llm.detokenize(out, special=True).decode("utf-8", "replace")
        return Response(text=text, structured=None, finish_reason=finish)


def to_openai_messages(messages: list[dict]) -> list[dict]:
    """Suite messages -> the OpenAI wire form: arguments as JSON strings, call ids linking tool results."""
    out, pending, counter = [], [], 0
    for message in messages:
        message = dict(message)
        if message.get("tool_calls"):
            calls = []
            for entry in message["tool_calls"]:
                function = dict(entry["function"])
                if not isinstance(function.get("arguments"), str):
                    function["arguments"] = json.dumps(function.get("arguments") or {}, ensure_ascii=False)
                counter += 1
                call_id = entry.get("id") or f"call_{counter}"
                pending.append(call_id)
                calls.append({"id": call_id, "type": "function", "function": function})
            message["tool_calls"] = calls
        elif message["role"] == "tool" and "tool_call_id" not in message and pending:
            message["tool_call_id"] = pending.pop(0)
        out.append(message)
    return out


# ---------------------------------------------------------------- grading


def _key(call: ToolCall) -> str:
    return call.name + json.dumps(call.arguments, sort_keys=True)


def _base(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def classify_wrong_tool(expected: str, got: str, case: Case, suite: Suite) -> str:
    """Why a call to `got` instead of `expected` is wrong: wrong_prefix / sibling / cross_server / wrong_tool / unknown_tool."""
    offered = {tool["function"]["name"] for tool in case.tools}
    expected_server, got_server = suite.server_of(expected), suite.server_of(got)
    if _base(got) == _base(expected) and expected_server != got_server:
        return "wrong_prefix"  # right tool, wrong server namespace (offered or invented)
    if got not in offered:
        return "unknown_tool"
    if not expected_server and not got_server:
        return "wrong_tool"  # a flat tool surface has no servers to compare
    return "sibling" if expected_server == got_server else "cross_server"


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


def grade(case: Case, response: Response, suite: Suite, raw: bool = False) -> dict:
    """Grade one response against its case: pass / fail, the failure type and what the model did."""
    run, calls, leaked, parsed = observe(case, response, raw)
    if run["failure"] == "error":
        return run
    malformed, loop, history = run["malformed"], run["loop"], {_key(c) for c in case.history_calls()}
    expect = case.expect
    if expect.tool_call is not None:
        wanted = expect.tool_call
        if not calls:
            failure = "leak" if leaked else "malformed" if malformed else "refusal"
            detail = f"expected {wanted.name}(...), got " + ("a call left in the text" if leaked else "no call")
            run.update(failure=failure, detail=detail)
            return run
        named = [c for c in calls if c.name == wanted.name]
        if not named:
            run.update(failure=classify_wrong_tool(wanted.name, calls[0].name, case, suite),
                       detail=f"expected {wanted.name}, got {calls[0].name}")
            return run
        problems = []
        for call in named:  # several calls of the right tool: one correct one is enough
            problems = argument_problems(wanted, call, case.tool_schema(wanted.name))
            if not problems:
                break
        if problems:
            run.update(failure="wrong_arguments", detail="; ".join(problems))
        elif loop:
            run.update(failure="loop", detail="the same call repeated")
        else:
            run["passed"] = True
        return run
    answer = expect.answer
    if calls or leaked:
        repeated = any(_key(c) in history for c in calls + leaked)
        run.update(failure="loop" if repeated else "false_positive",
                   detail=("repeated an earlier call: " if repeated else "called ") + ", ".join(c.name for c in calls + leaked))
    elif malformed:
        run.update(failure="malformed", detail=malformed[0])
    elif problems := answer.problems(parsed.content):
        run.update(failure="wrong_answer", detail="; ".join(problems))
    else:
        run["passed"] = True
    return run


# ---------------------------------------------------------------- running


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def compute_metrics(cases: list[dict]) -> dict:
    """Overall and per-category / per-suite metrics from the graded case records."""
    runs = [(c, r) for c in cases for r in c["runs"]]
    tool_runs = [r for c, r in runs if c["expect"] == "tool_call"]
    quiet_runs = [r for c, r in runs if c["expect"] != "tool_call"]
    final_runs = [r for c, r in runs if c["expect"] == "final_answer"]

    def group(field: str) -> dict:
        out: dict[str, dict] = {}
        for case, run in runs:
            entry = out.setdefault(case[field], {"runs": 0, "passed": 0})
            entry["runs"] += 1
            entry["passed"] += run["passed"]
        for entry in out.values():
            entry["pass_rate"] = _rate(entry["passed"], entry["runs"])
        return dict(sorted(out.items()))

    repeated = [c for c in cases if len(c["runs"]) > 1]
    return {
        "cases": len(cases),
        "runs": len(runs),
        "passed": sum(r["passed"] for _, r in runs),
        "pass_rate": _rate(sum(r["passed"] for _, r in runs), len(runs)),
        "per_category": group("category"),
        "per_suite": group("suite"),
        "structured_tool_call_rate": _rate(sum(r["structured_calls"] > 0 for r in tool_runs), len(tool_runs)),
        "no_tool_false_positive_rate": _rate(sum(bool(r["calls"] or r["leaked_calls"]) for r in quiet_runs), len(quiet_runs)),
        "finalization_rate": _rate(sum(r["passed"] for r in final_runs), len(final_runs)),
        "text_tool_leaks": sum(bool(r["leaked_calls"]) for _, r in runs),
        "malformed_calls": sum(bool(r["malformed"]) for _, r in runs),
        "loops": sum(r["loop"] for _, r in runs),
        "errors": sum(r["failure"] == "error" for _, r in runs),
        "failure_types": dict(Counter(r["failure"] for _, r in runs if r["failure"]).most_common()),
        "stable_cases": sum(c["stable"] for c in repeated) if repeated else None,
        "stability": _rate(sum(c["stable"] for c in repeated), len(repeated)),
        "flaky_cases": [f"{c['suite']}/{c['id']}" for c in repeated if not c["stable"]],
    }


def run_suites(suites: list[Suite], backend: Backend, repeats: int = 1, max_tokens: int = 256,
               temperature: float = 0.0, raw: bool = False, progress: bool = True,
               on_case: Callable[[dict], None] | None = None) -> dict:
    """Run every case `repeats` times and return the report dict.

    A BackendError (or Ctrl-C) stops the run: the report then holds the cases finished so far,
    `complete: false` and the error message. `on_case(report)` runs after each finished case.
    """
    if repeats < 1 or max_tokens < 1 or temperature < 0:
        raise ValueError(f"need repeats >= 1, max_tokens >= 1, temperature >= 0; got {repeats}, {max_tokens}, {temperature}")
    report: dict[str, Any] = {
        "format": REPORT_FORMAT, "version": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "complete": False, "error": None,
        "backend": backend.describe(),
        "settings": {"repeats": repeats, "max_tokens": max_tokens, "temperature": temperature, "raw": raw,
                     "decoding": "greedy" if temperature == 0 else "sampled"},
        "suites": [{"name": s.name, "path": str(s.path), "sha256": s.sha256, "cases": len(s.cases)} for s in suites],
        "cases": [],
    }
    total = sum(len(s.cases) for s in suites) * repeats
    bar = console.progress("eval", total, "run", show=progress)
    try:
        for suite in suites:
            for case in suite.cases:
                runs = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    response = backend.respond(case.messages, case.tools, max_tokens, temperature)
                    # A suite with its own rules (BFCL's AST checker) grades itself.
                    run = suite.grade(case, response, raw) if hasattr(suite, "grade") else grade(case, response, suite, raw)
                    run["seconds"] = round(time.perf_counter() - start, 3)
                    runs.append(run)
                    bar.update(1)
                passes = sum(r["passed"] for r in runs)
                record = {"suite": suite.name, "id": case.id, "category": case.category, "expect": case.expect.kind,
                          "held_out": case.held_out, "passes": passes, "repeats": repeats,
                          "stable": passes in (0, repeats), "runs": runs}
                report["cases"].append(record)
                if on_case is not None:
                    on_case(report)
        report["complete"] = True
    except BackendError as err:
        report["error"] = str(err)
    except KeyboardInterrupt:
        report["error"] = "interrupted (Ctrl-C)"
    finally:
        bar.close()
    report["metrics"] = compute_metrics(report["cases"])
    return report


def run_suite(suite: Suite | str | Path, backend: Backend, repeats: int = 1, max_tokens: int = 256,
              temperature: float = 0.0, raw: bool = False, progress: bool = False) -> dict:
    """Run one suite (a Suite, a path or a shipped suite name) and return its report dict."""
    if not isinstance(suite, Suite):
        suite = load_suite(suite)
    return run_suites([suite], backend, repeats, max_tokens, temperature, raw, progress)


def evaluate(backend: Backend, suites: list[Suite | str | Path], out_dir: str | Path, repeats: int = 1,
             max_tokens: int = 256, temperature: float = 0.0, raw: bool = False, progress: bool = True,
             command: str | None = None) -> dict:
    """Run suites (Suite objects, paths or shipped names) and write out_dir/report.json + summary.md.

    The report is rewritten after every case, so even a killed run leaves the cases it finished.
    `command` (the CLI line, if any) is recorded in the report for provenance.
    """
    suites = [s if isinstance(s, Suite) else load_suite(s) for s in suites]
    out_dir = Path(out_dir)

    def checkpoint(report: dict) -> None:
        partial = dict(report, command=command, error="run in progress", metrics=compute_metrics(report["cases"]))
        atomic_write_json(out_dir / "report.json", partial)

    report = run_suites(suites, backend, repeats, max_tokens, temperature, raw, progress, on_case=checkpoint)
    report["command"] = command
    write_report(report, out_dir)
    return report


def evaluate_model(model_dir: str | Path, suite_paths: list[str | Path], out_dir: str | Path,
                   adapter_path: str | Path | None = None, **kwargs: Any) -> dict:
    """Evaluate an MLX model directory (optionally with adapters) on suites; see `evaluate`."""
    return evaluate(MLXBackend(model_dir, adapter_path), suite_paths, out_dir, **kwargs)


def evaluate_endpoint(url: str, suite_paths: list[str | Path], out_dir: str | Path, model: str | None = None,
                      timeout: float = 120.0, **kwargs: Any) -> dict:
    """Evaluate an OpenAI-compatible endpoint on suites; see `evaluate`."""
    return evaluate(EndpointBackend(url, model, timeout), suite_paths, out_dir, **kwargs)


# ---------------------------------------------------------------- output


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def summary_markdown(report: dict) -> str:
    """A short human summary of a report."""
    m = report["metrics"]
    lines = [f"# Tool-call eval: {', '.join(s['name'] for s in report['suites'])}", ""]
    backend = report["backend"]
    lines.append(f"Backend: {backend.get('kind')} `{backend.get('model') or backend.get('url')}`"
                 + (f" + adapters `{backend['adapter_path']}`" if backend.get("adapter_path") else "")
                 + (f", {backend['dtype']} compute, loaded by {backend['loaded_by']}" if backend.get("dtype") else ""))
    settings = report.get("settings", {})
    lines.append(f"Settings: {settings.get('repeats')} repeat(s), max {settings.get('max_tokens')} tokens, "
                 f"temperature {settings.get('temperature')}, {'raw text parsing' if settings.get('raw') else 'structured calls only'}")
    if not report["complete"]:
        lines += ["", f"**Incomplete run** ({m['cases']} cases done): {report['error']}"]
    lines += ["", "| metric | value |", "|---|---|",
              f"| overall | {m['passed']}/{m['runs']} ({_pct(m['pass_rate'])}) |",
              f"| structured tool-call rate | {_pct(m['structured_tool_call_rate'])} |",
              f"| no-tool false-positive rate | {_pct(m['no_tool_false_positive_rate'])} |",
              f"| finalization | {_pct(m['finalization_rate'])} |",
              f"| text-tool leaks | {m['text_tool_leaks']} |",
              f"| malformed calls | {m['malformed_calls']} |",
              f"| loops | {m['loops']} |"]
    if m["stability"] is not None:
        lines.append(f"| stable cases | {m['stable_cases']} ({_pct(m['stability'])}) |")
    lines += ["", "Structured tool-call rate: tool cases answered with a structured call, right or wrong. "
              "No-tool false positives: cases that needed no call but got one. Finalization: answers from a tool "
              "result. Text-tool leaks: calls written in plain text, which a server does not return as tool_calls. "
              "Malformed: call text no parser could read (or a server dropped). Loops: a call repeated."]
    lines += ["", "| category | passed | rate |", "|---|---|---|"]
    lines += [f"| {name} | {e['passed']}/{e['runs']} | {_pct(e['pass_rate'])} |" for name, e in m["per_category"].items()]
    if m["failure_types"]:
        lines += ["", "Failures: " + ", ".join(f"{k} {v}" for k, v in m["failure_types"].items())]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write report.json and summary.md into out_dir atomically; return both paths."""
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "summary.md", summary_markdown(report))
    return out_dir / "report.json", out_dir / "summary.md"


def _load_report(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise MissingInput(f"{path} does not exist; pass a report.json (or its directory) that lfm-mlx eval wrote") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InvalidInput(f"{path} is not JSON ({err}); pass a report.json that lfm-mlx eval wrote") from None
    if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT or "metrics" not in report:
        raise InvalidInput(f"{path} is not an lfm_mlx eval report (no format {REPORT_FORMAT!r} with metrics)")
    return report


def compare_reports(before: dict, after: dict) -> list[dict]:
    """Per-category pass rates of two reports and their difference (percentage points), then overall."""
    rows = []
    first, second = before["metrics"]["per_category"], after["metrics"]["per_category"]
    for name in sorted(set(first) | set(second)):
        a, b = first.get(name, {}).get("pass_rate"), second.get(name, {}).get("pass_rate")
        rows.append({"category": name, "before": a, "after": b, "runs": (first.get(name, {}).get("runs"), second.get(name, {}).get("runs")),
                     "delta_pp": None if a is None or b is None else round(100 * (b - a), 1)})
    a, b = before["metrics"]["pass_rate"], after["metrics"]["pass_rate"]
    rows.append({"category": "overall", "before": a, "after": b, "runs": (before["metrics"]["runs"], after["metrics"]["runs"]),
                 "delta_pp": None if a is None or b is None else round(100 * (b - a), 1)})
    return rows


def compare_markdown(before: dict, after: dict, names: tuple[str, str] = ("before", "after")) -> str:
    """The table a user reads to see what a fine-tune cost or gained, per category."""
    lines = [f"| category | {names[0]} | {names[1]} | delta |", "|---|---|---|---|"]
    for row in compare_reports(before, after):
        delta = "n/a" if row["delta_pp"] is None else f"{row['delta_pp']:+.1f} pp"
        lines.append(f"| {row['category']} | {_pct(row['before'])} | {_pct(row['after'])} | {delta} |")
    # Deltas mean something only over the same cases and settings: say when they differ.
    if [s.get("sha256") for s in before["suites"]] != [s.get("sha256") for s in after["suites"]]:
        lines.append("\nNote: the two reports ran different suites or suite data.")
    if before.get("settings") != after.get("settings"):
        lines.append(f"\nNote: settings differ: {before.get('settings')} vs {after.get('settings')}")
    for report, name in ((before, names[0]), (after, names[1])):
        if not report.get("complete"):
            lines.append(f"\nNote: {name} is an incomplete run ({report.get('error')}).")
    return "\n".join(lines) + "\n"


def compare_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lfm-mlx eval --compare", description="Per-category deltas of two eval reports.")
    parser.add_argument("--compare", nargs=2, required=True, metavar=("BEFORE", "AFTER"), help="two report.json files (or their directories)")
    args = parser.parse_args(argv)
    try:
        before, after = (_load_report(path) for path in args.compare)
    except (ValueError, FileNotFoundError) as err:
        print(f"lfm-mlx eval: {err}", file=sys.stderr)
        return 2
    print(compare_markdown(before, after, tuple(args.compare)))
    return 0


def load_suites(entries: list[str], bfcl_data: str | None = None, limit: int | None = None) -> list[Suite]:
    """--suite entries (paths, shipped names, 'all', bfcl:CATS) -> suites, each cut to its first `limit` cases."""
    suites: list[Suite] = []
    for entry in entries:
        if entry == "bfcl" or entry.startswith("bfcl:"):
            from lfm_mlx.bfcl import load_suites as load_bfcl

            suites.extend(load_bfcl(entry, bfcl_data, limit))
            continue
        for name in shipped_suites() if entry == "all" else [entry]:
            suite = load_suite(name)
            suites.append(replace(suite, cases=suite.cases[:limit]))
    return suites


def _start_line(backend: Backend, suites: list[Suite], args: argparse.Namespace) -> str:
    """What the eval runs, on what, and where it writes."""
    info = backend.describe()
    if info["kind"] == "endpoint":
        target = f"endpoint {info['url']}"
    else:
        adapters = f" + adapters {info['adapter_path']}" if info.get("adapter_path") else ""
        target = f"{info['model']}{adapters} in-process, {info['dtype']} on {console.where()}"
    cases = sum(len(s.cases) for s in suites)
    decoding = "greedy" if args.temperature == 0 else f"temperature {args.temperature:g}"
    return (f"{cases} case(s) x {args.repeats} repeat(s) of {', '.join(s.name for s in suites)} on {target}; "
            f"{decoding}, at most {args.max_tokens} tokens; writing {Path(args.out)}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--compare" in argv:
        return compare_main(argv)
    parser = argparse.ArgumentParser(prog="lfm-mlx eval", description="Tool-call evaluation of an MLX model or an OpenAI-compatible endpoint.")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", help="MLX / HF model directory, evaluated in-process")
    target.add_argument("--endpoint", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8080/v1")
    parser.add_argument("--adapter-path", help="LoRA adapters for --model")
    parser.add_argument("--endpoint-model", help="'model' field sent to the endpoint (default: the server's own)")
    parser.add_argument("--suite", action="append", required=True,
                        help="suite JSON path, shipped name (hermes_agent, router, multiturn), 'all', or "
                             "bfcl:CAT1,CAT2 (BFCL v4 categories, with --bfcl-data); repeatable")
    parser.add_argument("--bfcl-data", help="BFCL v4 data: its data folder, or the folder `pip download --no-deps "
                                            "bfcl-eval -d DIR` wrote")
    parser.add_argument("--limit", type=int, help="run only the first N cases of each suite / BFCL category")
    parser.add_argument("--out", required=True, help="output directory for report.json and summary.md")
    parser.add_argument("--repeats", type=int, default=1, help="runs per case (stability); default 1")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--raw", action="store_true", help="parser-disabled mode: parse calls from the raw text, count them all")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per endpoint request")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed for --model with --temperature > 0")
    parser.add_argument("--as-served", action="store_true",
                        help="load --model with mlx_lm.load, as mlx_lm.server does (stored dtypes, bfloat16 for our "
                             "directories) instead of lfm_mlx.load's float32 on CPU: the server's answers token for "
                             "token, about 3x slower on CPU")
    console.add_quiet(parser)
    args = parser.parse_args(argv)
    try:
        if args.limit is not None and args.limit < 1:
            parser.error(f"--limit must be >= 1, got {args.limit}")
        suites = load_suites(args.suite, args.bfcl_data, args.limit)  # fail fast, before loading a model
        if args.model:
            backend: Backend = MLXBackend(args.model, args.adapter_path, seed=args.seed, as_served=args.as_served)
        else:
            if args.as_served:
                parser.error("--as-served applies to --model; an endpoint already is the server")
            if args.adapter_path:
                parser.error("--adapter-path applies to --model; start the server with its own --adapter-path")
            backend = EndpointBackend(args.endpoint, args.endpoint_model, args.timeout)
        command = "lfm-mlx eval " + " ".join(shlex.quote(a) for a in argv)
        console.say("eval", _start_line(backend, suites, args), args.quiet)
        report = evaluate(backend, suites, args.out, args.repeats, args.max_tokens, args.temperature, args.raw,
                          progress=not args.quiet, command=command)
    except (ValueError, FileNotFoundError) as err:
        print(f"lfm-mlx eval: {err}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(summary_markdown(report))
    m = report["metrics"]
    print(f"eval: pass rate {_pct(m['pass_rate'])} ({m['passed']}/{m['runs']} runs); wrote "
          f"{Path(args.out) / 'report.json'} and {Path(args.out) / 'summary.md'}")
    if not report["complete"]:
        print(f"lfm-mlx eval: stopped early: {report['error']} (partial report written)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
