"""`lfm-mlx eval`: the command line."""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from lfm_mlx import console
from lfm_mlx.evaluate.backends import Backend, EndpointBackend, MLXBackend
from lfm_mlx.evaluate.report import _pct, compare_main, summary_markdown
from lfm_mlx.evaluate.run import evaluate
from lfm_mlx.suites import Suite, load_suite, shipped_suites


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
