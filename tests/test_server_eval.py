"""Eval through OpenAI-compatible endpoints: a real `mlx_lm.server` subprocess (slow) read by our eval and by the
`openai` client, and clear errors + partial reports for an unreachable endpoint, a timeout and a failing request
(small local HTTP servers)."""

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

from lfm_mlx.evaluate import FAILURE_TYPES, BackendError, EndpointBackend, MLXBackend, evaluate, main, run_suite

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
    from lfm_mlx.model.synthetic import write_synthetic_model

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


def write_scripted_model(out: Path, script: str) -> Path:
    """A real tiny-dense model directory whose greedy answer to any chat prompt is `script`, token for token.

    Every layer's output projection is zero except layer 0's MLP, which maps the embedding of each
    script token (orthogonal, rms 1) to the next one's, so the next token depends on the last one
    alone; every other embedding is near zero. The prompt's last token and the script's tokens must differ.
    """
    import mlx.core as mx
    import numpy as np
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from lfm_mlx.model.synthetic import write_synthetic_model

    model = write_synthetic_model(out, "tiny-dense", dtype="float32")
    tokenizer = load_tokenizer(model)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    chain = tokenizer.encode(prompt, add_special_tokens=False)[-1:] + tokenizer.encode(script, add_special_tokens=False)
    assert len(set(chain)) == len(chain), f"script tokens repeat: {chain}"
    weights = dict(mx.load(str(model / "model.safetensors")))
    vocab, hidden = weights["model.embed_tokens.weight"].shape
    rng = np.random.default_rng(0)
    embed = rng.normal(0, 0.01, (vocab, hidden)).astype(np.float32)
    embed[chain] = np.linalg.qr(rng.normal(size=(hidden, hidden)))[0][: len(chain)] * np.sqrt(hidden)
    w1, w3, w2 = (np.zeros(weights[f"model.layers.0.feed_forward.{n}.weight"].shape, np.float32) for n in ("w1", "w3", "w2"))
    for unit, (token, following) in enumerate(zip(chain, chain[1:])):
        w1[unit] = 20 * embed[token] / hidden  # gate on for this token alone (silu(20) ~ 20)
        w3[unit] = embed[token] / hidden
        w2[:, unit] = 10 * embed[following] / 20  # adds 10x the next token's embedding
    for name, value in weights.items():
        if name.endswith(("out_proj.weight", "feed_forward.w2.weight")):
            weights[name] = mx.zeros_like(value)
        elif name.endswith("norm.weight"):
            weights[name] = mx.ones_like(value)
    weights.update({"model.embed_tokens.weight": mx.array(embed), "model.layers.0.feed_forward.w1.weight": mx.array(w1),
                    "model.layers.0.feed_forward.w3.weight": mx.array(w3), "model.layers.0.feed_forward.w2.weight": mx.array(w2)})
    mx.save_safetensors(str(model / "model.safetensors"), weights)
    return model


FORECAST = {"type": "function", "function": {"name": "get_forecast", "description": "Forecast for the next days.",
                                             "parameters": {"type": "object", "properties": {"days": {"type": "integer"}}, "required": ["days"]}}}
FORECAST_SUITE = {
    "name": "forecast", "tools": {"get_forecast": FORECAST},
    "cases": [{"id": "call", "category": "tool", "messages": [{"role": "user", "content": "Forecast for three days?"}],
               "tools": ["get_forecast"], "expect": {"tool_call": {"name": "get_forecast", "arguments": {"days": {"exact": 3}}}}}],
}


@pytest.mark.slow
def test_server_calls_seen_by_the_openai_client_our_eval_and_in_process(tmp_path):
    """A call the server parses, one it cannot parse and one cut by max_tokens: the openai client, our
    endpoint eval and the in-process eval of the same model read each the same way."""
    from openai import OpenAI

    suite = tmp_path / "forecast.json"
    suite.write_text(json.dumps(FORECAST_SUITE))
    good = write_scripted_model(tmp_path / "good", "<|tool_call_start|>[get_forecast(days=3)]<|tool_call_end|><|im_end|>")
    bad = write_scripted_model(tmp_path / "bad", "<|tool_call_start|>oops<|tool_call_end|><|im_end|>")
    messages = FORECAST_SUITE["cases"][0]["messages"]
    for model, max_tokens, finish, passed in ((good, 24, "tool_calls", True), (good, 3, "length", False), (bad, 24, "tool_calls", False)):
        local = run_suite(suite, MLXBackend(model), max_tokens=max_tokens)["cases"][0]["runs"][0]
        with mlx_lm_server(model, tmp_path / "server.log") as url:
            reply = OpenAI(base_url=url, api_key="unused").chat.completions.create(
                model="default_model", messages=messages, tools=[FORECAST], max_tokens=max_tokens, temperature=0.0)
            served = run_suite(suite, EndpointBackend(url), max_tokens=max_tokens)["cases"][0]["runs"][0]
        choice = reply.choices[0]
        assert choice.finish_reason == finish and not choice.message.content
        if passed:
            assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [("get_forecast", {"days": 3})]
        else:  # the server dropped the call text its parser could not read
            assert not choice.message.tool_calls
        for run in (local, served):
            assert run["passed"] is passed and run["failure"] == (None if passed else "malformed"), run
            assert run["calls"] == ([{"name": "get_forecast", "arguments": {"days": 3}}] if passed else [])
        assert json.loads(served["raw"])["choice"]["finish_reason"] == finish  # the server's reply as received
        assert local["text"].startswith("<|tool_call_start|>")  # in-process keeps the raw generation


@pytest.mark.slow
def test_in_process_eval_as_served_answers_as_the_server(tmp_path):
    """The shipped pre-trained base (experts int8): in-process eval loaded as mlx_lm.server loads it gives the
    server's answers case for case; the default float32 load is recorded as such."""
    from lfm_mlx.mixed import mix
    from lfm_mlx.demo.task import main as task_main

    base = Path(__file__).resolve().parents[1] / "lfm_mlx" / "demo" / "bases" / "demo-moe-wide"
    mix(base, tmp_path / "mixed")
    assert task_main([str(tmp_path / "task"), "--rows", "20", "--per-category", "2"]) == 0
    suite = tmp_path / "task" / "suite.json"
    as_served = MLXBackend(tmp_path / "mixed", as_served=True)
    assert as_served.describe()["dtype"] == "bfloat16" and MLXBackend(tmp_path / "mixed").describe()["dtype"] == "float32"
    local = run_suite(suite, as_served, max_tokens=48)
    with mlx_lm_server(tmp_path / "mixed", tmp_path / "server.log") as url:
        served = run_suite(suite, EndpointBackend(url), max_tokens=48)
    assert len(local["cases"]) == len(served["cases"]) == len(json.loads(suite.read_text())["cases"]) >= 8
    for a, b in zip(local["cases"], served["cases"]):
        ra, rb = a["runs"][0], b["runs"][0]
        assert (ra["calls"], ra["content"].strip(), ra["failure"]) == (rb["calls"], rb["content"].strip(), rb["failure"]), (a["id"], ra, rb)
    assert sum(r["runs"][0]["structured_calls"] > 0 for r in served["cases"]) >= 4  # the base does call tools


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
