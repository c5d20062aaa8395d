"""One rung of `lfm-mlx ladder`, in a process of its own: quantize a GGUF, or measure one in llama.cpp.

    python -m lfm_mlx.ladder_worker quantize JOB.json RESULT.json
    python -m lfm_mlx.ladder_worker measure JOB.json RESULT.json

A process per step because llama.cpp aborts the whole process on some inputs (an override type it
cannot quantize to), and because peak RSS is a per-process high-water mark: a fresh process measures
one file's load + suite and nothing else. This module imports neither MLX's model code nor
transformers: prompts arrive rendered by the model's own chat template (the parent renders them).
"""

from __future__ import annotations

import json
import re
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def peak_rss_bytes() -> int:
    """This process's peak resident set size. Linux: VmHWM, since ru_maxrss keeps the high-water mark
    of the process that spawned this one across exec (the ladder's parent, with MLX loaded)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status)[1]) * 1024
    except (OSError, TypeError):
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # macOS: bytes, per process


def quantize(job: dict) -> dict:
    from lfm_mlx.gguf import quantize_gguf

    imatrix = None
    if job.get("imatrix"):
        with np.load(job["imatrix"]) as data:
            imatrix = {name: data[name] for name in data.files}
    return quantize_gguf(job["source"], job["out"], job["qtype"], job.get("overrides") or None, imatrix)


class _Prompts:
    """What LlamaCppBackend asks of a tokenizer, answered from prompts the parent rendered with the
    model's real chat template (keyed by messages + tools)."""

    def __init__(self, prompts: dict[str, str], eos_token_ids: list[int]):
        self.prompts, self.eos_token_ids = prompts, set(eos_token_ids)

    def apply_chat_template(self, messages, tools=None, add_generation_prompt=True, tokenize=False) -> str:
        return self.prompts[prompt_key(messages, tools)]


def _backend(job: dict):
    """evaluate.LlamaCppBackend (its respond, its grading) over pre-rendered prompts: its own
    __init__ would import transformers for the template, which this process's peak RSS must not hold."""
    from lfm_mlx.evaluate import LlamaCppBackend
    from lfm_mlx.gguf import open_gguf

    class Prerendered(LlamaCppBackend):
        def __init__(self) -> None:
            self.gguf_path, self.tokenizer_dir = job["gguf"], job["tokenizer_dir"]
            threads = {"n_threads": job["threads"], "n_threads_batch": job["threads"]} if job.get("threads") else {}
            self.llm = open_gguf(job["gguf"], n_ctx=job["n_ctx"], seed=0, verbose=False, **threads)
            self.tokenizer = _Prompts(job["prompts"], job["eos_token_ids"])

    return Prerendered()


def prompt_key(messages: list[dict], tools: list[dict] | None) -> str:
    return json.dumps([messages, tools or None], sort_keys=True, ensure_ascii=False)


def speed(llm, prompt: str, prefill_tokens: int, decode_tokens: int, repeats: int) -> dict:
    """Prefill and greedy decode tokens/s on a fixed prompt (tiled to `prefill_tokens`), medians of repeats."""
    import llama_cpp

    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    ids = (ids * (prefill_tokens // len(ids) + 1))[:prefill_tokens]
    n_vocab = llm.n_vocab()
    prefill, decode = [], []
    for _ in range(repeats):
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        prefill.append(time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(decode_tokens):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,))
            llm.eval([int(logits.argmax())])  # greedy, whatever it is: a fixed length, EOS or not
        decode.append(time.perf_counter() - start)
    return {"prefill_tokens": prefill_tokens, "decode_tokens": decode_tokens, "repeats": repeats,
            "prefill_tok_s": round(prefill_tokens / statistics.median(prefill), 2),
            "decode_tok_s": round(decode_tokens / statistics.median(decode), 2)}


def measure(job: dict) -> dict:
    from lfm_mlx.evaluate import run_suites
    from lfm_mlx.suites import load_suite

    suite = load_suite(job["suite"])
    if job.get("limit"):
        from dataclasses import replace

        suite = replace(suite, cases=suite.cases[: job["limit"]])
    rss_before = peak_rss_bytes()
    start = time.perf_counter()
    backend = _backend(job)
    load_seconds = time.perf_counter() - start
    result = speed(backend.llm, job["speed_prompt"], job["prefill_tokens"], job["decode_tokens"], job["repeats"])
    report = run_suites([suite], backend, max_tokens=job["max_tokens"], progress=False)
    return dict(result, load_seconds=round(load_seconds, 3), n_threads=backend.llm.n_threads,
                n_threads_batch=backend.llm.n_threads_batch,
                rss_before_load_bytes=rss_before, peak_rss_bytes=peak_rss_bytes(), report=report)


def main(argv: list[str]) -> int:
    mode, job_path, result_path = argv
    job = json.loads(Path(job_path).read_text())
    result = {"quantize": quantize, "measure": measure}[mode](job)
    from lfm_mlx.fsutil import atomic_write_json

    atomic_write_json(result_path, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
