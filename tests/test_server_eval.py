"""Eval through OpenAI-compatible endpoints: a real `mlx_lm.server` subprocess (slow), and clear errors +
partial reports for an unreachable endpoint, a timeout and a failing request (small local HTTP servers)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from lfm_mlx.evaluate import FAILURE_TYPES, BackendError, EndpointBackend, evaluate, main

MESSAGES_WITH_HISTORY = [
    {"role": "user", "content": "What's the weather in Lisbon?"},
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Lisbon"}}}]},
    {"role": "tool", "content": "{\"temp_c\": 19, \"conditions\": \"light rain\"}"},
]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city.",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
SUITE = {
    "name": "endpoint_mini",
    "system": "You are a helpful assistant with tools.",
    "tools": {"get_weather": WEATHER},
    "cases": [
        {"id": "call", "category": "tool", "messages": [{"role": "user", "content": "Weather in Porto?"}], "tools": ["get_weather"],
         "expect": {"tool_call": {"name": "get_weather", "arguments": {"city": {"contains": "Porto"}}}}},
        {"id": "final", "category": "finalization", "messages": MESSAGES_WITH_HISTORY, "tools": ["get_weather"],
         "expect": {"final_answer": {"contains": ["19"]}}},
        {"id": "boom", "category": "no_tool", "messages": [{"role": "user", "content": "boom: say hi"}], "tools": ["get_weather"],
         "expect": {"no_tool_call": {}}},
    ],
}


@pytest.fixture
def suite_path(tmp_path) -> Path:
    path = tmp_path / "endpoint_mini.json"
    path.write_text(json.dumps(SUITE))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def mlx_lm_server(model: Path, log_path: Path, startup_s: float = 120.0) -> Iterator[str]:
    """A real `mlx_lm.server` subprocess on 127.0.0.1 serving `model`; yields its /v1 base URL."""
    port = free_port()
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlx_lm.server", "--model", str(model), "--host", "127.0.0.1", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            deadline = time.time() + startup_s
            while True:
                assert server.poll() is None, f"mlx_lm.server exited: {log_path.read_text()[-2000:]}"
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as reply:
                        if reply.status == 200:
                            break
                except OSError:
                    pass
                assert time.time() < deadline, f"mlx_lm.server did not come up within {startup_s:.0f} s"
                time.sleep(0.5)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def check_report_shape(report: dict, n_cases: int) -> None:
    assert report["format"] == "lfm_mlx.eval_report" and len(report["cases"]) == n_cases
    for case in report["cases"]:
        assert case["passes"] == sum(r["passed"] for r in case["runs"]) and len(case["runs"]) == case["repeats"]
        for run in case["runs"]:
            assert run["passed"] or run["failure"] in FAILURE_TYPES
            assert isinstance(run["content"], str) and isinstance(run["calls"], list)
    metrics = report["metrics"]
    assert metrics["runs"] == sum(len(c["runs"]) for c in report["cases"])
    assert sum(e["runs"] for e in metrics["per_category"].values()) == metrics["runs"]


# ---------------------------------------------------------------- the real mlx_lm.server


@pytest.mark.slow
def test_mlx_lm_server_end_to_end(tmp_path, suite_path):
    from lfm_mlx.synthetic import write_synthetic_model

    # float32 weights: mlx_lm.load keeps the stored dtype, and MoE gather_mm runs only in float32 on CPU.
    model = write_synthetic_model(tmp_path / "tiny", "tiny-moe", dtype="float32")
    assert json.loads((model / "tokenizer_config.json").read_text())["tool_parser_type"] == "pythonic"
    with mlx_lm_server(model, tmp_path / "server.log") as url:
        out = tmp_path / "eval"
        code = main(["--endpoint", url, "--suite", str(suite_path), "--out", str(out),
                     "--max-tokens", "24", "--repeats", "2"])
        assert code == 0, (tmp_path / "server.log").read_text()[-2000:]
        report = json.loads((out / "report.json").read_text())
        assert report["complete"] and report["error"] is None and report["backend"]["kind"] == "endpoint"
        check_report_shape(report, 3)
        for case in report["cases"]:
            assert case["stable"]  # the server decodes greedily by default
            for run in case["runs"]:
                assert run["failure"] != "error", run["detail"]  # every request, tool history included, was accepted
                assert run["finish_reason"] in ("stop", "length", "tool_calls")
        raw_out = tmp_path / "eval_raw"
        assert main(["--endpoint", url, "--suite", str(suite_path), "--out", str(raw_out),
                     "--max-tokens", "24", "--raw"]) == 0
        assert json.loads((raw_out / "report.json").read_text())["settings"]["raw"] is True


# ---------------------------------------------------------------- failures of the endpoint


def test_unreachable_endpoint_gives_a_clear_error_and_a_partial_report(tmp_path, suite_path, capsys):
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    code = main(["--endpoint", url, "--suite", str(suite_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and f"cannot reach {url}" in err and "partial report written" in err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["complete"] is False and "cannot reach" in report["error"] and report["cases"] == []
    assert "Incomplete run" in (tmp_path / "out" / "summary.md").read_text()
    assert main(["--endpoint", url, "--suite", "all", "--out", str(tmp_path / "all")]) == 1
    names = [s["name"] for s in json.loads((tmp_path / "all" / "report.json").read_text())["suites"]]
    assert names == ["hermes_agent", "multiturn", "router"]


class _Handler(BaseHTTPRequestHandler):
    """A deliberately bad endpoint: slow for 'Porto', HTTP 500 for 'boom', a plain answer otherwise."""

    delay = 0.0

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = json.dumps(body["messages"])
        if "Porto" in text and self.delay:
            time.sleep(self.delay)
        if "boom" in text:
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b'{"error": "model exploded"}')
            return
        reply = {"choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "It is 19 degrees."}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def bad_server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    _Handler.delay = 0.0


def test_failed_request_is_recorded_and_the_run_goes_on(tmp_path, suite_path, bad_server):
    url = f"http://127.0.0.1:{bad_server.server_address[1]}/v1"
    report = evaluate(EndpointBackend(url), [suite_path], tmp_path / "out", progress=False)
    assert report["complete"]
    check_report_shape(report, 3)
    by_id = {c["id"]: c["runs"][0] for c in report["cases"]}
    assert by_id["boom"]["failure"] == "error" and "HTTP 500" in by_id["boom"]["detail"]
    assert by_id["call"]["failure"] == "refusal" and by_id["final"]["passed"]
    assert report["metrics"]["errors"] == 1


def test_timeout_stops_the_run_with_a_partial_report(tmp_path, suite_path, bad_server):
    _Handler.delay = 3.0
    url = f"http://127.0.0.1:{bad_server.server_address[1]}/v1"
    with pytest.raises(BackendError, match="no answer within 0.5 s"):
        EndpointBackend(url, timeout=0.5).respond([{"role": "user", "content": "Porto"}], [], 8, 0.0)
    report = evaluate(EndpointBackend(url, timeout=0.5), [suite_path], tmp_path / "out", progress=False)
    assert not report["complete"] and "raise --timeout" in report["error"] and report["cases"] == []
    assert json.loads((tmp_path / "out" / "report.json").read_text())["complete"] is False
