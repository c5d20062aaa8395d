"""BFCL v4 (Berkeley Function Calling Leaderboard) as an eval suite: a guard against forgetting general tool calling.

    pip download --no-deps bfcl-eval -d bfcl     # the wheel holds bfcl_eval/data/; nothing is installed
    lfm-mlx eval --model DIR --suite bfcl:simple_python,multiple,parallel,parallel_multiple,irrelevance,live_simple \\
        --bfcl-data bfcl --limit 20 --out runs/bfcl

The data files are read from the directory the user points at (the data folder itself, a folder holding
`bfcl_eval/data/`, or one holding the downloaded wheel, read in place); the `bfcl-eval` package is never
imported (it pins numpy 1.26.4 and many API clients). Each case's functions are offered as OpenAI tools
through the model's own chat template, replies are parsed with lfm_mlx.tools, and graded with BFCL's AST
rules: every parameter has a list of acceptable values, "" in that list marks it optional, strings compare
after BFCL's normalization (case, spaces and ,./-_*^ ignored), an int is accepted for a float, parallel calls
match in any order, irrelevance cases pass when no call is made (one deliberate difference: a reply holding a
call that cannot be parsed fails as malformed there, where BFCL passes any reply it cannot decode). Reports
have our suites' format.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lfm_mlx.errors import InvalidInput, MissingInput
from lfm_mlx.suites import AnswerExpect, Case, Expectation, Suite, ToolCallExpect
from lfm_mlx.suites.observe import observe
from lfm_mlx.tools import ToolCall

RECIPE = "pip download --no-deps bfcl-eval -d bfcl   (then pass --bfcl-data bfcl)"
# The single-turn Python categories BFCL grades with its AST checker, and how each is checked.
CATEGORIES = {
    "simple_python": "simple", "multiple": "multiple", "parallel": "parallel", "parallel_multiple": "parallel",
    "irrelevance": "irrelevance", "live_simple": "simple", "live_multiple": "multiple", "live_parallel": "parallel",
    "live_parallel_multiple": "parallel", "live_irrelevance": "irrelevance", "live_relevance": "relevance",
}
DEFAULT_CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance", "live_simple")
# BFCL's function-doc types -> OpenAI (JSON schema) tool types; unknown types become strings, as BFCL does.
OPENAI_TYPES = {
    "integer": "integer", "number": "number", "float": "number", "string": "string", "boolean": "boolean",
    "bool": "boolean", "array": "array", "list": "array", "dict": "object", "object": "object", "tuple": "array",
    "any": "string",
}
# BFCL's function-doc types -> the Python type a value must have (tuples arrive as lists).
PYTHON_TYPES = {"string": str, "integer": int, "float": float, "number": float, "boolean": bool, "array": list,
                "tuple": list, "dict": dict, "object": dict, "any": str}
# BFCL appends this to every Python category's function descriptions; so do we, to prompt as it does.
PYTHON_HINT = " Note that the provided function is in Python 3 syntax."


@dataclass
class BfclCase(Case):
    """A BFCL case: our Case plus its original function docs and acceptable answers."""

    functions: list[dict] = field(default_factory=list)
    answers: list[dict] = field(default_factory=list)  # [{function name: {param: [acceptable values]}}]
    kind: str = "simple"


@dataclass
class BfclSuite(Suite):
    """One BFCL category; it grades its own cases with BFCL's rules."""

    def grade(self, case: BfclCase, response: Any, raw: bool = False) -> dict:
        run, calls, leaked, _ = observe(case, response, raw)
        if run["failure"] == "error":
            return run
        problem = verdict(case, calls)
        if problem is None and case.kind == "irrelevance" and run["malformed"]:
            # Stricter than BFCL (which passes any reply it cannot decode): a broken call is still a call.
            problem = f"malformed: {run['malformed'][0]}"
        if problem is None:
            run["passed"] = True
        elif not calls:
            run.update(failure="leak" if leaked else "malformed" if run["malformed"] else "refusal", detail=problem)
        else:
            run.update(failure=problem.split(":", 1)[0], detail=problem.split(": ", 1)[-1])
        return run


# ---------------------------------------------------------------- reading the data


def data_reader(root: str | Path) -> tuple[str, Callable[[str], str | None]]:
    """Where BFCL's data is under `root` and a reader of its files by relative name (None: no such file)."""
    root = Path(root)
    for base in (root, root / "bfcl_eval" / "data", root / "data"):
        if (base / "possible_answer").is_dir():
            return str(base), lambda name, base=base: (base / name).read_text() if (base / name).is_file() else None
    wheels = [root] if root.suffix == ".whl" and root.is_file() else sorted(root.glob("bfcl_eval-*.whl")) if root.is_dir() else []
    if wheels:
        archive = zipfile.ZipFile(wheels[-1])  # read in place: nothing of the package is installed or imported
        names = set(archive.namelist())

        def read(name: str) -> str | None:
            member = f"bfcl_eval/data/{name}"
            return archive.read(member).decode("utf-8") if member in names else None

        return f"{wheels[-1]}!bfcl_eval/data", read
    raise MissingInput(f"--bfcl-data {root}: no BFCL data there (a folder with possible_answer/, one holding "
                       f"bfcl_eval/data/, or a bfcl_eval wheel); get it with: {RECIPE}")


def _jsonl(text: str, where: str) -> list[dict]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise InvalidInput(f"{where}:{number}: not JSON ({err.msg}); is this BFCL v4 data?") from None
    return rows


def _openai_types(schema: dict) -> dict:
    """A BFCL parameter schema with OpenAI types, nested properties and items included."""
    schema["type"] = OPENAI_TYPES.get(schema.get("type"), "string")
    for sub in (schema.get("properties") or {}).values():
        if isinstance(sub, dict):
            _openai_types(sub)
    if isinstance(schema.get("items"), dict):
        _openai_types(schema["items"])
    return schema


def to_tool(function: dict) -> dict:
    """A BFCL function doc as an OpenAI tool (dict -> object, float -> number, ...)."""
    spec = copy.deepcopy(function)
    spec["description"] = spec.get("description", "") + PYTHON_HINT
    parameters = spec.setdefault("parameters", {"type": "dict", "properties": {}})
    parameters["type"] = "object"
    for sub in (parameters.get("properties") or {}).values():
        _openai_types(sub)
    return {"type": "function", "function": spec}


def load_category(root: str | Path, category: str, limit: int | None = None) -> BfclSuite:
    """One BFCL v4 category as a suite (its first `limit` cases)."""
    if category not in CATEGORIES:
        raise InvalidInput(f"BFCL category {category!r} is not one this suite grades; choose from {', '.join(CATEGORIES)}")
    where, read = data_reader(root)
    name = f"BFCL_v4_{category}.json"
    questions = read(name)
    if questions is None:
        raise MissingInput(f"{where}/{name} does not exist; is --bfcl-data the BFCL v4 data? ({RECIPE})")
    kind = CATEGORIES[category]
    answers_text = "" if kind in ("irrelevance", "relevance") else read(f"possible_answer/{name}")
    if answers_text is None:
        raise MissingInput(f"{where}/possible_answer/{name} does not exist; the BFCL data is incomplete ({RECIPE})")
    answers = {row["id"]: row["ground_truth"] for row in _jsonl(answers_text, f"{where}/possible_answer/{name}")}
    cases = []
    for entry in _jsonl(questions, f"{where}/{name}")[:limit]:
        case_id = entry.get("id")
        if not isinstance(entry.get("question"), list) or len(entry["question"]) != 1:
            raise InvalidInput(f"{where}/{name}: case {case_id!r} is not a single-turn question")
        gold = answers.get(case_id, [])
        if kind not in ("irrelevance", "relevance") and not gold:
            raise InvalidInput(f"{where}/possible_answer/{name}: no answer for case {case_id!r}")
        documented = {f["name"] for f in entry["function"]}
        for expected in gold:
            if next(iter(expected)) not in documented:
                raise InvalidInput(f"{where}/{name}: case {case_id!r} expects {next(iter(expected))!r}, which it does not document")
        expect = (Expectation(no_tool_call=AnswerExpect()) if kind == "irrelevance"
                  else Expectation(tool_call=ToolCallExpect(name=next(iter(gold[0])) if gold else entry["function"][0]["name"])))
        # held_out: a benchmark case must never reach a repair set's training split.
        cases.append(BfclCase(suite=f"bfcl:{category}", id=case_id, category=category, messages=entry["question"][0],
                              tools=[to_tool(f) for f in entry["function"]], expect=expect, held_out=True,
                              functions=entry["function"], answers=gold, kind=kind))
    digest = hashlib.sha256((questions + "\n" + answers_text).encode()).hexdigest()
    return BfclSuite(name=f"bfcl:{category}", path=Path(f"{where}/{name}"), sha256=digest,
                     description=f"BFCL v4 {category}", servers={}, cases=cases)


def load_suites(spec: str, root: str | Path | None, limit: int | None = None) -> list[BfclSuite]:
    """`bfcl:cat1,cat2` (or `bfcl` for the default slice) -> one suite per category."""
    if root is None:
        raise MissingInput(f"--suite {spec} needs --bfcl-data DIR with BFCL v4's data files; get them with: {RECIPE}")
    names = spec.partition(":")[2]
    categories = [c.strip() for c in names.split(",") if c.strip()] if names else list(DEFAULT_CATEGORIES)
    return [load_category(root, category, limit) for category in categories]


# ---------------------------------------------------------------- grading (BFCL's AST rules)


def standardize(text: str) -> str:
    """BFCL's string normalization: spaces and , . / - _ * ^ dropped, lower case, ' read as "."""
    return re.sub(r"[ ,./\-_*^]", "", text).lower().replace("'", '"')


def _norm(value: Any) -> Any:
    return standardize(value) if isinstance(value, str) else value


def _dict_ok(value: dict, acceptable: list) -> bool:
    """A dict argument matches one acceptable dict: known keys, acceptable values, omitted keys optional."""
    for option in acceptable:
        if not isinstance(option, dict):
            continue
        known = all(key in option and _norm(item) in [_norm(a) for a in option[key]] for key, item in value.items())
        complete = all(key in value or "" in allowed for key, allowed in option.items())
        if known and complete:
            return True
    return False


def _typed(value: Any, wanted: type | None) -> bool:
    return wanted is None or type(value) is wanted or (wanted is float and type(value) is int)


def check_value(param: str, value: Any, schema: dict, acceptable: list) -> str | None:
    """None when `value` is acceptable for `param`, else `failure: reason`."""
    declared = schema.get("type")
    wanted = PYTHON_TYPES.get(declared)
    if wanted is float and type(value) is int:
        value = float(value)  # BFCL accepts an int where a float is declared
    sample = next((a for a in acceptable if a != ""), None)
    wrong = f"wrong_arguments: {param}={value!r} is not one of {acceptable}"
    if wanted is not None and type(value) is not wanted:
        # BFCL's "variable" rule: a value typed like the acceptable answers themselves is compared as is.
        if sample is not None and type(value) is type(sample):
            return None if value in acceptable else wrong
        return f"wrong_arguments: {param} must be {declared}, got {type(value).__name__} {value!r}"
    if wanted is dict:
        return None if _dict_ok(value, acceptable) else wrong
    if wanted is list:
        item_type = PYTHON_TYPES.get((schema.get("items") or {}).get("type"))
        if item_type is dict:  # a list of dicts: same length, each matching in order
            for option in acceptable:
                if isinstance(option, list) and len(option) == len(value) and all(
                        isinstance(v, dict) and _dict_ok(v, [o]) for v, o in zip(value, option)):
                    return None
            return wrong
        if not all(_typed(item, item_type) for item in value):
            return None if value in acceptable else wrong  # BFCL then compares the list as given
        return None if [_norm(v) for v in value] in [[_norm(a) for a in o] for o in acceptable if isinstance(o, list)] else wrong
    if isinstance(value, str):
        return None if standardize(value) in [standardize(a) for a in acceptable if isinstance(a, str)] else wrong
    return None if value in acceptable else wrong


def check_call(function: dict, call: ToolCall, acceptable: dict[str, list]) -> str | None:
    """None when `call` is one of the acceptable calls of `function`, else `failure: reason`."""
    if call.name != function["name"]:
        return f"wrong_tool: expected {function['name']}, got {call.name}"
    parameters = function.get("parameters") or {}
    properties = parameters.get("properties") or {}
    for param in parameters.get("required") or []:
        if param not in call.arguments:
            return f"wrong_arguments: {call.name} lacks the required {param!r}"
    for param, value in call.arguments.items():
        if param not in properties or param not in acceptable:
            return f"wrong_arguments: {call.name} got the unexpected parameter {param!r}"
        problem = check_value(param, value, properties[param], acceptable[param])
        if problem:
            return problem
    for param, allowed in acceptable.items():
        if param not in call.arguments and "" not in allowed:
            return f"wrong_arguments: {call.name} lacks {param!r} (it has no default here)"
    return None


def _doc(case: BfclCase, name: str) -> dict:
    return next(f for f in case.functions if f["name"] == name)


def verdict(case: BfclCase, calls: list[ToolCall]) -> str | None:
    """None when the calls pass the case under BFCL's rules, else `failure: reason`."""
    if case.kind == "irrelevance":
        return f"false_positive: called {', '.join(c.name for c in calls)}" if calls else None
    if case.kind == "relevance":
        return None if calls else "refusal: expected a call, got none"
    if not calls:
        return f"expected {len(case.answers)} call(s), got none"
    if len(calls) != len(case.answers):
        return f"wrong_count: expected {len(case.answers)} call(s), got {len(calls)}"
    if case.kind in ("simple", "multiple"):
        name, acceptable = next(iter(case.answers[0].items()))
        problem = check_call(_doc(case, name), calls[0], acceptable)
        if problem and problem.startswith("wrong_tool") and calls[0].name not in {f["name"] for f in case.functions}:
            problem = "unknown_tool" + problem[len("wrong_tool"):]
        return problem
    unmatched = list(range(len(calls)))
    for expected in case.answers:  # order-free: each expected call takes the first unmatched call that fits
        name, acceptable = next(iter(expected.items()))
        fits = [i for i in unmatched if check_call(_doc(case, name), calls[i], acceptable) is None]
        if not fits:
            return f"wrong_arguments: no call matches the expected {name}(...) among the unmatched calls"
        unmatched.remove(fits[0])
    return None
