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

from lfm_mlx.evaluate.backends import (Backend, BackendError, EndpointBackend, LlamaCppBackend, MLXBackend,
                                       to_openai_messages)
from lfm_mlx.evaluate.cli import load_suites, main
from lfm_mlx.evaluate.grading import FAILURE_TYPES, classify_wrong_tool, grade
from lfm_mlx.evaluate.report import (REPORT_FORMAT, compare_main, compare_markdown,
                                     compare_reports, summary_markdown, write_report)
from lfm_mlx.evaluate.run import (compute_metrics, evaluate, evaluate_endpoint, evaluate_model, run_suite,
                                  run_suites)
from lfm_mlx.suites.observe import Response, observe

__all__ = [
    "FAILURE_TYPES", "REPORT_FORMAT", "Backend", "BackendError", "EndpointBackend", "LlamaCppBackend", "MLXBackend",
    "Response", "classify_wrong_tool", "compare_main", "compare_markdown", "compare_reports", "compute_metrics",
    "evaluate", "evaluate_endpoint", "evaluate_model", "grade", "load_suites", "main", "observe", "run_suite",
    "run_suites", "summary_markdown", "to_openai_messages", "write_report",
]
