"""Eval backends: an in-process MLX model, an OpenAI-compatible endpoint, a GGUF file run by llama.cpp."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Protocol

from lfm_mlx.suites.observe import Response
from lfm_mlx.tools import ToolCallSyntaxError, calls_from_openai


class BackendError(RuntimeError):
    """The backend cannot go on (unreachable endpoint, timeout); the run stops with a partial report."""


class Backend(Protocol):
    def describe(self) -> dict: ...

    def respond(self, messages: list[dict], tools: list[dict], max_tokens: int, temperature: float) -> Response: ...


class MLXBackend:
    """An in-process MLX model (loaded once), optionally with LoRA adapters; greedy unless temperature > 0.

    By default it computes in `lfm_mlx.load`'s dtype (float32 on CPU, bfloat16 on a GPU). On the
    CPU, int8 experts of a small model are dequantized once at load (`float_experts_on_cpu`).
    `as_served=True` loads it with `mlx_lm.load`, as `mlx_lm.server` does: the stored dtypes
    (bfloat16 for our directories), so on CPU its greedy answers are the server's token for token
    (measured: docs/benchmarks.md, "Eval in-process vs mlx_lm.server"), at about 3x the time.
    Greedy evaluations answer many cases at once (`respond_many`, mlx-lm's batch generation).
    """

    def __init__(self, model_dir: str | Path, adapter_path: str | Path | None = None, seed: int = 0,
                 as_served: bool = False) -> None:
        import mlx.core as mx

        from lfm_mlx.model.io import load
        from lfm_mlx.model.quant import float_experts_on_cpu

        self.model_dir, self.adapter_path = str(model_dir), adapter_path and str(adapter_path)
        self.as_served = as_served
        self.batches = not as_served  # the server answers each request alone: as served, so do we
        if as_served:
            from mlx_lm import load as mlx_lm_load

            self.model, self.tokenizer = mlx_lm_load(self.model_dir, adapter_path=self.adapter_path)
        else:
            self.model, self.tokenizer = load(model_dir)
            float_experts_on_cpu(self.model)
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

        from lfm_mlx.model.generate import prompt_ids

        text, finish = "", None
        for chunk in stream_generate(self.model, self.tokenizer, prompt_ids(self.tokenizer, messages, tools),
                                     max_tokens=max_tokens, sampler=make_sampler(temp=temperature)):
            text += chunk.text
            finish = chunk.finish_reason
        return Response(text=text, structured=None, finish_reason=finish)

    def respond_many(self, conversations: list[tuple[list[dict], list[dict]]], max_tokens: int) -> list[Response]:
        """Greedy answers to many (messages, tools) at once (`greedy_continuations`): `respond`'s
        answers at about a quarter of the time."""
        from lfm_mlx.model.generate import greedy_continuations, prompt_ids

        prompts = [prompt_ids(self.tokenizer, messages, tools) for messages, tools in conversations]
        out = []
        for answer in greedy_continuations(self.model, self.tokenizer, prompts, max_tokens):
            text = self.tokenizer.decode(answer.tokens[:-1] if answer.stopped else answer.tokens)
            out.append(Response(text=text, structured=None, finish_reason="stop" if answer.stopped else "length"))
        return out


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
