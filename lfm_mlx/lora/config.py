"""The LoRA run's config: `LoraConfig`, its checks, and loading it from YAML and flags."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lfm_mlx.errors import InvalidInput

# Config `modules` groups -> module paths inside a decoder layer (mlx-lm names).
MODULE_GROUPS: dict[str, tuple[str, ...]] = {
    "attention": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
    "conv": ("conv.in_proj", "conv.out_proj"),
    "mlp": ("feed_forward.gate_proj", "feed_forward.up_proj", "feed_forward.down_proj"),
    "experts": ("feed_forward.switch_mlp.gate_proj", "feed_forward.switch_mlp.up_proj",
                "feed_forward.switch_mlp.down_proj"),
    "router": ("feed_forward.gate",),
}
KNOWN_MODULES = {name for names in MODULE_GROUPS.values() for name in names}
# A resumed run must agree with its checkpoint on these keys; the rest (steps, patience, ...) may change.
RUN_IDENTITY_KEYS = ("model", "data", "rank", "alpha", "scale", "dropout", "layers", "modules",
                     "batch_size", "max_tokens", "splits", "seed")


@dataclass
class LoraConfig:
    """Every setting of a LoRA repair pass; YAML keys and CLI flags (`--learning-rate`) use these
    names. Relative paths are taken from the working directory."""

    model: str = ""  # base model directory: bf16 or mixed (int8 experts)
    data: str | list[str] = ""  # repair-set dir (train/valid/test.jsonl) or JSONL file(s) split by `splits`
    out_dir: str = ""  # adapter directory, also the run directory
    rank: int = 16
    alpha: float | None = None  # scale = alpha / rank; with neither alpha nor scale, alpha = 2 * rank
    scale: float | None = None  # mlx-lm's LoRA scale; give alpha or scale, not both
    dropout: float = 0.0
    layers: str | int | list[int] = "all"  # "all", the last N layers, or a list of layer indices
    modules: list[str] = field(default_factory=lambda: ["attention", "conv", "mlp", "experts"])
    learning_rate: float = 1e-4
    lr_schedule: str = "cosine"  # cosine (to 10% of learning_rate) or constant, after warmup
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    batch_size: int = 1
    epochs: int = 2
    max_steps: int | None = None
    max_tokens: int = 4096  # rows longer than this are dropped (and counted in the manifest)
    splits: list[float] = field(default_factory=lambda: [0.9, 0.1, 0.0])  # only for JSONL data
    eval_every: int = 50  # steps between validation passes
    patience: int = 3  # stop after this many evaluations without improvement; 0 never stops early
    min_delta: float = 0.0  # an improvement must lower validation loss by more than this
    save_every: int = 50  # steps between resumable checkpoints
    max_consecutive_skips: int = 3  # steps in a row with a non-finite loss, gradient or update (each undone)
    seed: int = 0
    skip_invalid: bool = False
    # Train on float32 copies of int8 experts (the same values): faster where quantized expert matmuls
    # are slow (MLX's CPU backend), at 4 bytes a weight; the adapters fit the int8 model as they are.
    float_experts: bool = False
    resume: bool = True  # continue from out_dir/checkpoint when present
    progress: bool = True

    @property
    def lora_scale(self) -> float:
        if self.scale is not None:
            return float(self.scale)
        alpha = 2.0 * self.rank if self.alpha is None else self.alpha
        return float(alpha) / self.rank

    def problems(self) -> list[str]:
        """Every invalid value, each naming its key and the fix."""
        out = []
        for key in ("model", "out_dir"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                out.append(f"{key}: required, a directory path (got {getattr(self, key)!r})")
        data = [self.data] if isinstance(self.data, str) else self.data
        if not isinstance(data, list) or not data or not all(isinstance(d, str) and d for d in data):
            out.append(f"data: {self.data!r} must be a repair-set directory or JSONL file path(s)")
        for key in ("rank", "batch_size", "epochs", "eval_every", "save_every", "max_tokens", "max_consecutive_skips"):
            value = getattr(self, key)
            if not _is_int(value) or value < 1:
                out.append(f"{key}: {value!r} must be an integer >= 1")
        for key in ("warmup_steps", "patience", "seed"):
            value = getattr(self, key)
            if not _is_int(value) or value < 0:
                out.append(f"{key}: {value!r} must be an integer >= 0")
        if self.max_steps is not None and (not _is_int(self.max_steps) or self.max_steps < 1):
            out.append(f"max_steps: {self.max_steps!r} must be an integer >= 1 or null")
        if self.alpha is not None and self.scale is not None:
            out.append("alpha and scale: give one of them (scale = alpha / rank), not both")
        for key in ("alpha", "scale", "max_grad_norm"):
            value = getattr(self, key)
            if value is not None and (not _is_number(value) or value <= 0):
                out.append(f"{key}: {value!r} must be a number > 0 or null")
        if not _is_number(self.learning_rate) or not 0 < self.learning_rate < 1:  # also refuses .inf and .nan
            out.append(f"learning_rate: {self.learning_rate!r} must be a number in (0, 1), e.g. 1e-4")
        for key in ("weight_decay", "min_delta"):
            if not _is_number(getattr(self, key)) or getattr(self, key) < 0:
                out.append(f"{key}: {getattr(self, key)!r} must be a number >= 0")
        if not _is_number(self.dropout) or not 0 <= self.dropout < 1:
            out.append(f"dropout: {self.dropout!r} must be a number in [0, 1)")
        if self.lr_schedule not in ("cosine", "constant"):
            out.append(f"lr_schedule: {self.lr_schedule!r} must be 'cosine' or 'constant'")
        if not (isinstance(self.splits, list) and len(self.splits) == 3 and all(_is_number(f) and f >= 0 for f in self.splits)
                and abs(sum(self.splits) - 1) < 1e-6):
            out.append(f"splits: {self.splits!r} must be [train, valid, test] fractions >= 0 summing to 1")
        out.extend(_layer_problems(self.layers))
        if not isinstance(self.modules, list) or not self.modules:
            out.append(f"modules: {self.modules!r} must be a non-empty list, e.g. [attention, conv, mlp, experts]")
        else:
            for name in self.modules:
                if not isinstance(name, str) or (name not in MODULE_GROUPS and name not in KNOWN_MODULES):
                    near = difflib.get_close_matches(str(name), list(MODULE_GROUPS) + sorted(KNOWN_MODULES), n=1)
                    hint = f" (did you mean {near[0]!r}?)" if near else ""
                    out.append(f"modules: unknown module {name!r}{hint}; use groups {sorted(MODULE_GROUPS)} "
                               f"or paths such as 'self_attn.q_proj'")
        for key in ("skip_invalid", "float_experts", "resume", "progress"):
            if not isinstance(getattr(self, key), bool):
                out.append(f"{key}: {getattr(self, key)!r} must be true or false")
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _layer_problems(layers: Any) -> list[str]:
    fix = "use 'all', a count N (the last N layers) or a list of layer indices"
    if layers == "all" or (_is_int(layers) and layers >= 1):
        return []
    if isinstance(layers, list) and layers and all(_is_int(i) and i >= 0 for i in layers):
        return [] if len(set(layers)) == len(layers) else [f"layers: {layers!r} lists a layer twice"]
    return [f"layers: {layers!r} is not valid; {fix}"]


# ---------------------------------------------------------------- config files


def _yaml_key_lines(text: str) -> dict[str, int]:
    """Line number of each top-level key, for error messages."""
    import yaml

    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {key.value: key.start_mark.line + 1 for key, _ in node.value if isinstance(key, yaml.ScalarNode)}


def config_from_dict(values: dict, where: dict[str, str] | None = None, source: str = "config") -> LoraConfig:
    """Defaults overridden by `values`; one ValueError lists every problem, each at its
    location (`where[key]`, e.g. `lora.yaml:7` or `--rank`), else at `source`."""
    where = where or {}
    names = [f.name for f in dataclasses.fields(LoraConfig)]
    problems, updates = [], {}
    for key, value in values.items():
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {near[0]!r}?" if near else f"known keys: {', '.join(names)}"
            problems.append(f"{where.get(key, source)}: unknown key {key!r}; {hint}")
            continue
        if key in _FLOAT_KEYS and (_is_int(value) or isinstance(value, str)):
            value = _as_float(value)
        updates[key] = list(value) if key == "splits" and isinstance(value, tuple) else value
    config = dataclasses.replace(LoraConfig(), **updates)
    for problem in config.problems():
        key = problem.split(":", 1)[0].split(" ")[0]
        problems.append(f"{where.get(key, source)}: {problem}")
    if problems:
        raise InvalidInput(f"invalid LoRA config ({len(problems)} problem(s)):\n  " + "\n  ".join(problems))
    return config


def _as_float(value: Any) -> Any:
    """YAML 1.1 reads `1e-4` (no dot) as a string; take it as the number it means."""
    try:
        return float(value)
    except ValueError:
        return value


_FLOAT_KEYS = ("learning_rate", "alpha", "scale", "dropout", "weight_decay", "min_delta", "max_grad_norm")


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> LoraConfig:
    """Defaults < YAML file < overrides (the CLI's flags), validated together."""
    values: dict = {}
    where: dict[str, str] = {}
    if path is not None:
        from lfm_mlx.train.yamlfile import read_yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"LoRA config {path} does not exist; pass a YAML file (see `lfm-mlx lora --help`)")
        loaded = read_yaml(path, "LoRA config")  # duplicate keys and bad syntax name their line
        text = path.read_text()
        loaded = {} if loaded is None else loaded
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: the config must be a mapping (model: ..., data: ...), got {type(loaded).__name__}")
        values.update(loaded)
        lines = _yaml_key_lines(text)
        where.update({key: f"{path}:{lines[key]}" if key in lines else str(path) for key in loaded})
    for key, value in (overrides or {}).items():
        values[key] = value
        where[key] = f"--{str(key).replace('_', '-')}"
    return config_from_dict(values, where, source=str(path) if path else "command line")

