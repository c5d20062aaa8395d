"""The package's shape, checked from the source alone (ast, no imports): no import cycles between
lfm_mlx's modules and subpackages, imports that run one way down the layers, and no module over
MAX_LINES lines but the listed ones; and the same layers checked by import-linter (`lint-imports`).

Cycles are counted over every import, the ones inside functions included (a lazy import hides a
cycle from the interpreter, not from a reader). Two graphs: one node per module, and one node per
top-level unit (a module of lfm_mlx, or a whole subpackage such as lfm_mlx.grouped)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli, which import-linter (the test extra) brings there
    import tomli as tomllib

PACKAGE = Path(__file__).resolve().parent.parent / "lfm_mlx"
PYPROJECT = PACKAGE.parent / "pyproject.toml"
MAX_LINES = 500
# Over MAX_LINES today; shrink this list as they are split (never add to it).
OVER_LIMIT: set[str] = set()
# Import cycles known today (each a set of modules); shrink as they are broken (never add to it).
KNOWN_CYCLES: list[set[str]] = []


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The lfm_mlx modules `name` imports (anywhere in the file): `from P import X` counts as P.X when
    P.X is a module, else as P."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text())
    typing_only = {id(inner) for node in ast.walk(tree)  # `if TYPE_CHECKING:` imports: annotations, no edge
                   if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
                   for inner in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = name.split(".")
                anchor = anchor[:len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {target for target in found if target in known and target != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def unit_of(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else name


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def unexpected(found: list[list[str]]) -> list[list[str]]:
    return [cycle for cycle in found if set(cycle) not in KNOWN_CYCLES]


def test_no_import_cycle_between_modules():
    found = cycles(graph())
    assert unexpected(found) == []
    gone = [known for known in KNOWN_CYCLES if sorted(known) not in found]
    assert not gone, f"no longer a cycle: take {gone} off KNOWN_CYCLES"


def test_no_import_cycle_between_subpackages_and_modules():
    units: dict[str, set[str]] = {}
    for source, targets in graph().items():
        units.setdefault(unit_of(source), set()).update(unit_of(t) for t in targets if unit_of(t) != unit_of(source))
    units.pop("lfm_mlx", None)  # the root package only re-exports lazily (importlib), it is no layer
    units = {unit: {t for t in targets if t != "lfm_mlx"} for unit, targets in units.items()}
    assert unexpected(cycles(units)) == []


# Top-level units by layer, highest first: a unit may import its own layer and those below, never above.
# The layers are the import-linter contract's in pyproject.toml (one list, read here and by lint-imports).
LAYER_NAMES = ("demo", "stages", "shared", "base")  # demo: the synthetic task and its run, never imported


def contract_layers() -> dict[str, set[str]]:
    contract = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]["contracts"][0]
    assert contract["type"] == "layers" and len(contract["layers"]) == len(LAYER_NAMES), contract
    return {name: {unit.strip() for unit in layer.split(":")} for name, layer in zip(LAYER_NAMES, contract["layers"])}


LAYERS = contract_layers()


def test_dependencies_run_one_way():
    """demo -> stages -> shared (train, memory, kernels) -> base (model, data, files), never back."""
    rank = {f"lfm_mlx.{name}": i for i, names in enumerate(LAYERS.values()) for name in names}
    units = {unit_of(name) for name in modules()} - {"lfm_mlx"}
    assert not units - set(rank), f"place these in a layer of pyproject.toml's import-linter contract: {sorted(units - set(rank))}"
    upward = sorted(f"{unit_of(source)} -> {unit_of(target)}" for source, targets in graph().items()
                    for target in targets if unit_of(target) in rank and unit_of(source) in rank
                    and rank[unit_of(target)] < rank[unit_of(source)])
    assert upward == [], "imports against the layers (move the shared code down): " + ", ".join(upward)


def test_import_linter_contract_passes():
    """The same layers checked by import-linter (`lint-imports`, as CI runs it): over the import graph
    Python sees, every lfm_mlx module placed in a layer (exhaustive)."""
    lint = Path(sys.executable).parent / "lint-imports"
    assert lint.exists(), f"{lint} is missing: pip install -e '.[test]' (import-linter is in the test extra)"
    result = subprocess.run([str(lint), "--no-cache", "--no-logo"], cwd=PACKAGE.parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_module_over_the_line_limit_but_the_listed_ones():
    sizes = {str(path.relative_to(PACKAGE.parent)): len(path.read_text().splitlines())
             for path in PACKAGE.rglob("*.py")}
    over = {path for path, lines in sizes.items() if lines > MAX_LINES}
    assert over <= OVER_LIMIT, f"over {MAX_LINES} lines and not listed: {sorted(over - OVER_LIMIT)}"
    shrunk = {path for path in OVER_LIMIT if sizes.get(path, 0) <= MAX_LINES}
    assert not shrunk, f"now within {MAX_LINES} lines (or gone): take {sorted(shrunk)} off OVER_LIMIT"


def test_the_checker_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


MAX_FUNCTION_LINES = 80
# Over MAX_FUNCTION_LINES today: the explicit training loops only (issue 28); shrink this list, never add to it.
# (estimate_peak and the demo's _run_stages, once over too, are split already.)
LONG_FUNCTIONS: set[str] = {
    "lfm_mlx/grouped/trainer.py::GroupedMoETrainer._run_phase",  # the grouped trainer's training loop
    "lfm_mlx/lora/train.py::_train_lora",  # the LoRA training loop
}


def function_lengths() -> dict[str, int]:
    """Lines from `def` to the last line of the body, for every function and method (nested ones too,
    each counted whole), by 'lfm_mlx/path.py::Class.name'."""
    lengths = {}

    def visit(node: ast.AST, path: str, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if not isinstance(child, ast.ClassDef):
                    lengths[f"{path}::{prefix}{child.name}"] = child.end_lineno - child.lineno + 1
                visit(child, path, f"{prefix}{child.name}.")
            else:
                visit(child, path, prefix)

    for path in sorted(PACKAGE.rglob("*.py")):
        visit(ast.parse(path.read_text()), str(path.relative_to(PACKAGE.parent)), "")
    return lengths


def test_no_function_over_the_line_limit_but_the_training_loops():
    lengths = function_lengths()
    over = {name for name, lines in lengths.items() if lines > MAX_FUNCTION_LINES}
    assert over <= LONG_FUNCTIONS, (f"over {MAX_FUNCTION_LINES} lines and not listed (split it into named steps): "
                                    + ", ".join(f"{name} ({lengths[name]})" for name in sorted(over - LONG_FUNCTIONS)))
    shrunk = {name for name in LONG_FUNCTIONS if lengths.get(name, 0) <= MAX_FUNCTION_LINES}
    assert not shrunk, f"now within {MAX_FUNCTION_LINES} lines (or gone): take {sorted(shrunk)} off LONG_FUNCTIONS"
