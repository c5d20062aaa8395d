"""Which GGUF should I ship? A quant ladder measured in llama.cpp.

    lfm-mlx ladder MODEL_DIR OUT_DIR --suite SUITE [--types Q8_0 Q4_K_M ...] [--imatrix-from JSONL] [--tolerance N]
    lfm-mlx ladder --redraw OUT_DIR            (ladder.md and ladder.png again, from ladder.json alone)

Exports the float parent once, then quantizes it to each type with llama.cpp's quantizer and measures
every file in llama.cpp on this machine: size on disk, peak RSS of load + suite, prefill and decode
tokens/s (a fixed prompt and length, medians of repeats), the suite's pass rate per category with
leaks and false positives, and how often its greedy answers equal the parent's. Recommends the
smallest file within --tolerance cases of the parent that keeps every category, and gives the reason
for each other rung. A rung written `TYPE@REGEX=GGML_TYPE[@...]` adds per-tensor overrides (e.g.
`Q4_K_M@token_embd=q8_0`). Each quantization and measurement runs in a process of its own, so a
rung llama.cpp refuses (or aborts on) is reported, and the ladder goes on. ladder.json is rewritten
after every rung; Ctrl-C stops with what was measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from lfm_mlx.errors import InvalidInput, MissingInput, debugging, read_json_input
from lfm_mlx.fsutil import atomic_file, atomic_write_json, atomic_write_text, locked, recover, refuse_overlap
from lfm_mlx.gguf import OUTTYPES, QUANT_TYPES

FORMAT = "lfm_mlx.ladder"
DEFAULT_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_XS", "Q3_K_M", "IQ3_XS")
# i-quants and K-quants of 4 bits or fewer: with --imatrix-from, measured with and without the matrix
IMATRIX_TYPES = {"Q4_K_M", "Q4_K_S", "IQ4_XS", "Q3_K_M", "Q3_K_S", "IQ3_M", "IQ3_XS", "Q2_K", "IQ2_M"}


# ---------------------------------------------------------------- rungs


def parse_rungs(types: list[str], imatrix: bool) -> list[dict]:
    """--types entries -> rungs {name, qtype, imatrix, overrides}; a bad entry names itself and the fix."""
    import gguf

    rungs = []
    for entry in types:
        qtype, *parts = entry.split("@")
        if qtype.upper() not in QUANT_TYPES:
            raise InvalidInput(f"--types {entry!r}: {qtype!r} is not a type llama.cpp's quantizer is offered for; "
                               f"choose from {', '.join(QUANT_TYPES)}")
        overrides = {}
        for part in parts:
            pattern, _, type_name = part.rpartition("=")
            if not pattern or type_name.upper() not in gguf.GGMLQuantizationType.__members__:
                raise InvalidInput(f"--types {entry!r}: {part!r} is not REGEX=GGML_TYPE; write e.g. "
                                   f"{qtype}@token_embd=q8_0")
            try:
                re.compile(pattern)
            except re.error as err:
                raise InvalidInput(f"--types {entry!r}: {pattern!r} is not a valid regex ({err})") from None
            overrides[pattern] = type_name.lower()
        base = {"name": entry.upper() if not parts else f"{qtype.upper()}@{'@'.join(parts)}",
                "qtype": qtype.upper(), "imatrix": False, "overrides": overrides}
        rungs.append(base)
        if imatrix and base["qtype"] in IMATRIX_TYPES:
            rungs.append(dict(base, name=base["name"] + "+imatrix", imatrix=True))
    names = [r["name"] for r in rungs]
    if len(set(names)) < len(names):
        raise InvalidInput(f"--types lists a rung twice ({', '.join(sorted({n for n in names if names.count(n) > 1}))}); "
                           "list each once")
    return rungs


def _file_name(stem: str, rung: str, taken: set[str]) -> str:
    name = f"{stem}-{re.sub(r'[^A-Za-z0-9_.=@-]', '_', rung.replace('+', '-'))}.gguf"
    while name in taken:
        name = name.removesuffix(".gguf") + "_.gguf"
    taken.add(name)
    return name


# ---------------------------------------------------------------- child processes


def _why(log: str, code: int) -> str:
    """One line saying why a child failed: llama.cpp's own words where it gave them."""
    causes = []
    # the last tensor it warned about before stopping, without the warnings it fell back from
    refused = re.findall(r"(\S+)\s+- ncols\s+(\d+) not divisible by (\d+) \(required for type\s+(\w+)\)(?! -> fall)", log)
    if refused:
        name, columns, block, kind = refused[-1]
        causes.append(f"{name} has rows of {columns}, not a multiple of {kind}'s block of {block}")
    failed = re.findall(r"failed to quantize: (.+)", log)
    if failed:
        causes.insert(0, f"llama.cpp: {failed[-1].strip()}")
    asserts = re.findall(r"(GGML_ASSERT\(.+?\) failed|GGML_ABORT.*|fatal error.*)", log)
    if asserts:
        causes.insert(0, f"llama.cpp: {asserts[-1].strip()}")
    if code < 0:
        causes.insert(0, f"llama.cpp killed the process ({signal.Signals(-code).name})")
    if not causes:
        lines = [line.strip() for line in log.splitlines() if line.strip()]
        errors = [line for line in lines if re.match(r"\w*(Error|Exception)\b", line)]
        causes.append((errors or lines or [f"exit code {code}, no message"])[-1])
    return "; ".join(causes)[:600]


def _child(mode: str, job: dict, work: Path) -> tuple[dict | None, str]:
    """Run ladder_worker MODE on `job` in a fresh process: (result, "") or (None, why it failed)."""
    job_path, result_path = work / f"{mode}-job.json", work / f"{mode}-result.json"
    job_path.write_text(json.dumps(job))
    result_path.unlink(missing_ok=True)
    done = subprocess.run([sys.executable, "-m", "lfm_mlx.ladder_worker", mode, str(job_path), str(result_path)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    if done.returncode != 0 or not result_path.exists():
        return None, _why(done.stdout, done.returncode)
    return json.loads(result_path.read_text()), ""


def _measured(rung: dict, result: dict, parent_texts: dict | None, out_dir: Path) -> dict:
    """Copy a measurement into its rung record (the eval report goes to evals/NAME/); return the
    greedy answers by case id."""
    from lfm_mlx.evaluate import write_report

    report = result.pop("report")
    folder = out_dir / "evals" / rung["file"].removesuffix(".gguf")
    write_report(report, folder)
    m = report["metrics"]
    texts = {c["id"]: c["runs"][0]["text"] for c in report["cases"] if c["runs"]}
    parent_texts = texts if parent_texts is None else parent_texts
    shared = [i for i in texts if i in parent_texts]
    rung.update(result, status="measured", suite_complete=report["complete"], suite_error=report["error"],
                passed=m["passed"], runs=m["runs"], pass_rate=m["pass_rate"],
                per_category={k: {"passed": v["passed"], "runs": v["runs"]} for k, v in m["per_category"].items()},
                text_tool_leaks=m["text_tool_leaks"], false_positives=m["failure_types"].get("false_positive", 0),
                malformed=m["malformed_calls"], agreement=round(sum(texts[i] == parent_texts[i] for i in shared)
                                                                / len(shared), 4) if shared else None,
                eval_report=str(folder.relative_to(out_dir) / "report.json"))
    return texts


# ---------------------------------------------------------------- the rule


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def judge(ladder: dict) -> None:
    """Verdict and reasons for every rung, and the recommendation: the smallest measured file whose
    passes are within `tolerance` cases of the parent's and that passes at least one case in every
    category the parent passes one in (like fuse's fidelity gate, each failed condition is a reason)."""
    rungs, tolerance = ladder["rungs"], ladder["settings"]["tolerance"]
    if not rungs or rungs[0].get("status") != "measured":
        ladder["recommendation"] = None
        return
    parent = rungs[0]
    parent.update(verdict="parent", reasons=[])
    candidates = []
    for rung in rungs[1:]:
        reasons = []
        if rung["status"] != "measured":
            reasons.append(f"failed to {rung['stage']}: {rung['error']}")
        else:
            if not rung["suite_complete"]:
                reasons.append(f"the suite did not finish: {rung['suite_error']}")
            if rung["passed"] < parent["passed"] - tolerance:
                reasons.append(f"passes {rung['passed']}/{rung['runs']}, more than {tolerance} case(s) below the "
                               f"parent's {parent['passed']}/{parent['runs']}")
            lost = [f"{name} (0/{entry['runs']}; parent {parent['per_category'][name]['passed']}/{entry['runs']})"
                    for name, entry in rung["per_category"].items()
                    if entry["passed"] == 0 and parent["per_category"].get(name, {}).get("passed", 0) > 0]
            if lost:
                reasons.append("loses " + ", ".join(lost))
        rung.update(verdict="rejected", reasons=reasons)
        if not reasons:
            candidates.append(rung)
    best = min(candidates, key=lambda r: r["bytes"], default=None)  # ties: the earlier rung
    for rung in candidates:
        if rung is best:
            rung["verdict"] = "recommended"
            continue
        rung["reasons"] = [f"within tolerance, but the same size as {best['name']}, which comes first"
                           if rung["bytes"] == best["bytes"] else
                           f"within tolerance, but {_size(rung['bytes'] - best['bytes'])} larger than {best['name']}"]
    if best is not None:
        why = (f"the smallest file within {tolerance} case(s) of the parent ({best['passed']}/{best['runs']} vs "
               f"{parent['passed']}/{parent['runs']}) that keeps every category: {_size(best['bytes'])}, "
               f"{best['bytes'] / parent['bytes']:.0%} of the parent")
    else:
        why = f"no quantized rung is within {tolerance} case(s) of the parent in every category: ship the parent"
    ladder["recommendation"] = {"rung": (best or parent)["name"], "file": (best or parent)["file"], "why": why}


# ---------------------------------------------------------------- views (rebuilt from ladder.json)


def markdown(ladder: dict) -> str:
    from lfm_mlx.report import markdown_table

    rungs = ladder["rungs"]
    categories = list(rungs[0].get("per_category", {})) if rungs else []
    rows = []
    for r in rungs:
        row = {"rung": r["name"], "size": _size(r["bytes"]) if r.get("bytes") else None,
               "verdict": r.get("verdict", r.get("status"))}
        if r.get("status") == "measured":
            row.update({"peak RSS": _size(r["peak_rss_bytes"]), "prefill tok/s": r["prefill_tok_s"],
                        "decode tok/s": r["decode_tok_s"], "pass": f"{r['passed']}/{r['runs']}",
                        "leaks": r["text_tool_leaks"], "false pos.": r["false_positives"],
                        "agrees": r["agreement"]})
            row.update({c: f"{e['passed']}/{e['runs']}" for c, e in r["per_category"].items()})
        rows.append(row)
    columns = ["rung", "size", "peak RSS", "prefill tok/s", "decode tok/s", "pass", *categories, "leaks",
               "false pos.", "agrees", "verdict"]
    s = ladder["settings"]
    lines = [f"# Quant ladder: {Path(ladder['model_dir']).name} on {ladder['suite']['name']}", "",
             f"llama.cpp {ladder['machine']['llama_cpp']} on {ladder['machine']['platform']}, "
             f"{rungs[0].get('n_threads', '?') if rungs else '?'} thread(s); speed: {s['prefill_tokens']} prompt "
             f"tokens, {s['decode_tokens']} decoded, median of {s['repeats']}; suite: "
             f"{ladder['suite']['cases']} cases, greedy, max {s['max_tokens']} tokens; tolerance "
             f"{s['tolerance']} case(s); agrees = share of cases whose greedy answer equals the parent's.", "",
             markdown_table(rows, columns, {"prefill tok/s": ",.1f", "decode tok/s": ",.1f", "agrees": ".0%"}), ""]
    if not ladder["complete"]:
        lines += [f"**Incomplete ladder**: {ladder['error']}", ""]
    rec = ladder.get("recommendation")
    if rec:
        lines += [f"**Recommended: {rec['rung']}** (`{rec['file']}`): {rec['why']}.", ""]
    lines += [f"- {r['name']}: " + "; ".join(r["reasons"]) for r in rungs if r.get("reasons")]
    return "\n".join(lines) + "\n"


def redraw(out_dir: str | Path) -> tuple[Path, Path]:
    """ladder.md and ladder.png from OUT_DIR/ladder.json (and nothing else)."""
    from lfm_mlx.report import plot_points

    out_dir = Path(out_dir)
    path = out_dir / "ladder.json"
    ladder = read_json_input(path, f"run `lfm-mlx ladder MODEL_DIR {out_dir} --suite SUITE` first",
                             "pass a directory `lfm-mlx ladder` wrote")
    if not isinstance(ladder, dict) or ladder.get("format") != FORMAT:
        raise InvalidInput(f"{path} is not a quant ladder (no format {FORMAT!r}); pass a directory `lfm-mlx ladder` wrote")
    atomic_write_text(out_dir / "ladder.md", markdown(ladder))
    points = [(r["name"], r["bytes"] / 1e6, r["pass_rate"]) for r in ladder["rungs"] if r.get("status") == "measured"]
    marked = (ladder.get("recommendation") or {}).get("rung")
    with atomic_file(out_dir / "ladder.png", suffix=".png") as tmp:
        plot_points(points, tmp, f"{Path(ladder['model_dir']).name}: size vs pass rate ({ladder['suite']['name']})",
                    "file size (MB)", "suite pass rate", marked)
    return out_dir / "ladder.md", out_dir / "ladder.png"


# ---------------------------------------------------------------- the ladder


def run_ladder(model_dir: str | Path, out_dir: str | Path, suite: str, types: list[str] | None = None,
               imatrix_from: str | Path | None = None, tolerance: int = 1, outtype: str = "bf16",
               limit: int | None = None, max_tokens: int = 256, prefill_tokens: int = 512, decode_tokens: int = 128,
               repeats: int = 3, threads: int | None = None, command: str | None = None,
               log=print) -> dict:
    """Measure the ladder into OUT_DIR (GGUF files, evals/, ladder.json/.md/.png); return ladder.json's dict."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    settings = {"tolerance": tolerance, "outtype": outtype, "limit": limit, "max_tokens": max_tokens,
                "prefill_tokens": prefill_tokens, "decode_tokens": decode_tokens, "repeats": repeats,
                "threads": threads, "imatrix_from": imatrix_from and str(imatrix_from)}
    _check_inputs(model_dir, imatrix_from, settings)
    rungs = parse_rungs(list(types or DEFAULT_TYPES), imatrix_from is not None)
    loaded = _load_suite_cut(suite, limit)
    refuse_overlap(out_dir, {"model directory": model_dir})
    tokenizer, prompts = _chat_prompts(model_dir, loaded)
    ladder = _new_ladder(model_dir, loaded, settings, command)
    measure_job = {"suite": str(loaded.path), "limit": limit, "tokenizer_dir": str(model_dir), "prompts": prompts,
                   "eos_token_ids": sorted(tokenizer.eos_token_ids), "speed_prompt": next(iter(prompts.values())),
                   "n_ctx": 4096, "threads": threads, "max_tokens": max_tokens, "prefill_tokens": prefill_tokens,
                   "decode_tokens": decode_tokens, "repeats": repeats}
    with locked(out_dir), tempfile.TemporaryDirectory(prefix="lfm_mlx-ladder-") as tmp:
        bench = _Bench(out_dir, Path(tmp), measure_job, log)
        try:
            _climb(ladder, rungs, model_dir, imatrix_from, bench)
        except KeyboardInterrupt:
            ladder["error"] = "interrupted (Ctrl-C); the rungs above were measured"
        finally:
            if ladder["rungs"]:
                _save(ladder, out_dir)
    return ladder


def _check_inputs(model_dir: Path, imatrix_from: str | Path | None, settings: dict) -> None:
    """Refuse a bad setting or a missing input before anything is loaded."""
    for name, key, least in (("--tolerance", "tolerance", 0), ("--limit", "limit", 1),
                             ("--max-tokens", "max_tokens", 1), ("--prefill-tokens", "prefill_tokens", 1),
                             ("--decode-tokens", "decode_tokens", 1), ("--repeats", "repeats", 1),
                             ("--threads", "threads", 1)):
        value = settings[key]
        if value is not None and value < least:
            raise InvalidInput(f"{name} {value}: must be at least {least}")
    outtype = settings["outtype"]
    if outtype not in OUTTYPES or outtype == "q8_0":
        raise InvalidInput(f"--outtype {outtype!r}: the parent must be a float export (bf16, f16 or f32)")
    if not model_dir.is_dir():
        raise MissingInput(f"model directory {model_dir} does not exist; pass a local model directory")
    if imatrix_from is not None and not Path(imatrix_from).is_file():
        raise MissingInput(f"--imatrix-from {imatrix_from}: no such file (chat rows or text, one JSON object a line)")


def _load_suite_cut(suite: str, limit: int | None):
    """The suite, cut to its first `limit` cases."""
    from lfm_mlx.suites import load_suite

    loaded = load_suite(suite)
    return replace(loaded, cases=loaded.cases[:limit])


def _chat_prompts(model_dir: Path, loaded) -> tuple[object, dict[str, str]]:
    """The model's tokenizer, and every case's prompt rendered by its chat template (by prompt key):
    the children get the rendered text, so they import neither MLX's model code nor transformers."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from lfm_mlx.ladder_worker import prompt_key

    tokenizer = load_tokenizer(model_dir)
    prompts = {prompt_key(c.messages, c.tools): tokenizer.apply_chat_template(
        c.messages, tools=c.tools or None, add_generation_prompt=True, tokenize=False) for c in loaded.cases}
    return tokenizer, prompts


def _new_ladder(model_dir: Path, loaded, settings: dict, command: str | None) -> dict:
    """ladder.json before the first rung: what is measured, how, and on which machine."""
    import llama_cpp

    return {
        "format": FORMAT, "version": 1, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command, "complete": False, "error": None, "model_dir": str(model_dir),
        "suite": {"name": loaded.name, "path": str(loaded.path), "sha256": loaded.sha256, "cases": len(loaded.cases)},
        "settings": settings,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "llama_cpp": f"llama-cpp-python {llama_cpp.__version__}"},
        "rungs": [], "recommendation": None,
    }


def _save(ladder: dict, out_dir: Path) -> None:
    """Judge what was measured so far and write ladder.json, .md and .png."""
    judge(ladder)
    atomic_write_json(out_dir / "ladder.json", ladder)
    redraw(out_dir)


@dataclass
class _Bench:
    """Where rungs are written (out_dir) and worked on (work), the measure job each child gets, the log."""

    out_dir: Path
    work: Path
    measure_job: dict
    log: Callable[[str], None]

    def measure(self, rung: dict, parent_texts: dict | None) -> dict:
        """Measure the rung's file in a child process into the rung; return its greedy answers by case id."""
        result, why = _child("measure", dict(self.measure_job, gguf=str(self.out_dir / rung["file"])), self.work)
        texts = {}
        if result is None:
            rung.update(status="failed", stage="load and measure in llama.cpp", error=why)
        else:
            texts = _measured(rung, result, parent_texts, self.out_dir)
        self.log(f"ladder: {rung['name']}: " + (f"{_size(rung['bytes'])}, pass {rung['passed']}/{rung['runs']}, "
                                                f"decode {rung['decode_tok_s']:.1f} tok/s" if result else f"failed: {why}"))
        return texts

    def quantize(self, rung: dict, source: Path, imatrix: Path | None) -> bool:
        """Quantize `source` to the rung's file in a child process; record the size or why it failed."""
        job = {"source": str(source), "out": str(self.out_dir / rung["file"]),
               "qtype": rung["qtype"], "overrides": rung["overrides"],
               "imatrix": str(imatrix) if rung["imatrix"] else None}
        result, why = _child("quantize", job, self.work)
        recover(self.out_dir / rung["file"])  # what a quantizer llama.cpp aborted left: its temporary,
        (self.out_dir / f".{rung['file']}.lock").unlink(missing_ok=True)  # and its (dead) lock file
        if result is None:
            rung.update(status="failed", stage="quantize", error=why)
            self.log(f"ladder: {rung['name']}: failed to quantize: {why}")
            return False
        rung.update(bytes=result["bytes"], tensor_types=result["tensor_types"], quantize_seconds=result["seconds"])
        return True


def _climb(ladder: dict, rungs: list[dict], model_dir: Path, imatrix_from: str | Path | None, bench: _Bench) -> None:
    """Export and measure the parent, then quantize and measure each rung, saving after every rung;
    mark the ladder complete at the end (or say why the parent stopped it)."""
    taken: set[str] = set()
    parent = _export_parent(model_dir, ladder["settings"]["outtype"], bench.out_dir, taken)
    ladder["rungs"].append(parent)
    parent_texts = bench.measure(parent, None)
    if parent["status"] != "measured":  # nothing to compare against: stop here
        ladder["error"] = f"the parent {parent['file']} failed in llama.cpp: {parent['error']}"
        return
    imatrix = _importance_matrix(model_dir, imatrix_from, bench) if imatrix_from is not None else None
    for rung in rungs:
        rung["file"] = _file_name(model_dir.name, rung["name"], taken)
        ladder["rungs"].append(rung)
        if bench.quantize(rung, bench.out_dir / parent["file"], imatrix):
            bench.measure(rung, parent_texts)
        _save(ladder, bench.out_dir)
    ladder["complete"] = True


def _export_parent(model_dir: Path, outtype: str, out_dir: Path, taken: set[str]) -> dict:
    """The float parent rung, exported to OUT_DIR: every quantized rung is made from it."""
    from lfm_mlx.gguf import export_gguf

    parent = {"name": outtype.upper(), "qtype": None, "imatrix": False, "overrides": {},
              "file": _file_name(model_dir.name, outtype.upper(), taken)}
    report = export_gguf(model_dir, out_dir / parent["file"], outtype)
    parent.update(bytes=report["bytes"], tensor_types=report["tensor_types"])
    return parent


def _importance_matrix(model_dir: Path, imatrix_from: str | Path, bench: _Bench) -> Path:
    """The importance matrix of the transcripts in `imatrix_from`, computed in MLX, in the work folder."""
    import numpy as np

    from lfm_mlx.gguf import compute_imatrix, read_samples

    imatrix, samples = bench.work / "imatrix.npz", read_samples(imatrix_from)
    bench.log(f"ladder: importance matrix from {len(samples)} transcripts (MLX)")
    np.savez(imatrix, **compute_imatrix(model_dir, samples))
    return imatrix


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--redraw"]:
        if len(argv) != 2:
            print("usage: lfm-mlx ladder --redraw OUT_DIR", file=sys.stderr)
            return 2
        try:
            for path in redraw(argv[1]):
                print(f"wrote {path}")
        except (FileNotFoundError, ValueError) as err:
            if debugging():
                raise
            print(f"lfm-mlx ladder: error: {err}", file=sys.stderr)
            return 2
        return 0
    parser = argparse.ArgumentParser(prog="lfm-mlx ladder", description=" ".join(__doc__.split("\n\n")[2].split()))
    parser.add_argument("model_dir", help="HF or mlx-lm model directory (e.g. a fused model)")
    parser.add_argument("out_dir", help="output directory: the GGUF files, evals/, ladder.json, ladder.md, ladder.png")
    parser.add_argument("--suite", required=True, help="suite JSON path or shipped name (hermes_agent, router, multiturn)")
    parser.add_argument("--types", nargs="+", metavar="TYPE[@REGEX=GGML_TYPE]",
                        help=f"rungs, largest first (default: {' '.join(DEFAULT_TYPES)}; offered: {', '.join(QUANT_TYPES)})")
    parser.add_argument("--imatrix-from", metavar="JSONL", help="transcripts for an importance matrix: the i-quants and "
                        "K-quants of 4 bits or fewer are then measured with it (+imatrix) and without it")
    parser.add_argument("--tolerance", type=int, default=1, help="cases a rung may pass fewer than the parent (default 1)")
    parser.add_argument("--outtype", default="bf16", help="the parent's float type: bf16 (default), f16 or f32")
    parser.add_argument("--limit", type=int, help="run only the suite's first N cases")
    parser.add_argument("--max-tokens", type=int, default=256, help="per suite answer (default 256)")
    parser.add_argument("--prefill-tokens", type=int, default=512, help="speed prompt length (default 512)")
    parser.add_argument("--decode-tokens", type=int, default=128, help="tokens decoded for speed (default 128)")
    parser.add_argument("--repeats", type=int, default=3, help="speed repeats; medians reported (default 3)")
    parser.add_argument("--threads", type=int, help="llama.cpp threads (default: llama-cpp-python's, half the cores)")
    args = parser.parse_args(argv)
    try:
        ladder = run_ladder(args.model_dir, args.out_dir, args.suite, args.types, args.imatrix_from, args.tolerance,
                            args.outtype, args.limit, args.max_tokens, args.prefill_tokens, args.decode_tokens,
                            args.repeats, args.threads, command="lfm-mlx ladder " + shlex.join(argv))
    except (FileNotFoundError, ValueError, ImportError) as err:
        if debugging():
            raise
        print(f"lfm-mlx ladder: error: {err}", file=sys.stderr)
        return 2
    print(markdown(ladder))
    print(f"wrote {Path(args.out_dir) / 'ladder.json'}, ladder.md, ladder.png")
    if not ladder["complete"]:
        print(f"lfm-mlx ladder: stopped: {ladder['error']} (what was measured is kept)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
