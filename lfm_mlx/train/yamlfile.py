"""YAML config files read strictly: a key given twice in one mapping is an error naming both lines
(PyYAML keeps the last one silently), and unreadable text names the file and line."""

from __future__ import annotations

from pathlib import Path

import yaml

from lfm_mlx.errors import InvalidInput, MissingInput


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys."""


def _mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise InvalidInput(f"{loader.source_name}:{line}: key {key!r} is given twice (also on line {seen[key]}); "
                               "keep one of them")
        seen[key] = line
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def read_yaml(path: str | Path, what: str = "config") -> object:
    """The parsed YAML of `path` (None for an empty file); InvalidInput / MissingInput name the file."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"{what} {path} does not exist; pass a YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InvalidInput(f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    loader = _StrictLoader(text)
    loader.source_name = str(path)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or err
        raise InvalidInput(f"{at}: not valid YAML ({problem}); fix the syntax there") from None
    finally:
        loader.dispose()
