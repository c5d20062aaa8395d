"""LoRA repair passes on LFM2 / LFM2-MoE models (bf16 or mixed int8-expert bases), on mlx_lm.tuner.

    lfm-mlx lora CONFIG.yaml [--rank 8 --learning-rate 5e-5 ...]   (CLI > YAML > defaults)

    # CONFIG.yaml: every key of LoraConfig; these three are required
    model: runs/trained-mixed            # bf16 or mixed (int8 experts) LFM2 / LFM2-MoE directory
    data: repair_datasets/iter10         # train/valid/test.jsonl, or JSONL file(s) split by `splits`
    out_dir: runs/iter10-lora
    rank: 16                             # alpha defaults to 2 * rank (scale 2.0)
    layers: all                          # or 8 (the last 8), or [2, 6, 10]
    modules: [attention, conv, mlp, experts]   # + router, or paths such as self_attn.q_proj
    learning_rate: 1.0e-4
    patience: 3                          # evaluations without improvement before stopping

Trains mlx-lm's own LoRA layers (`LoRALinear`, and `LoRASwitchLinear` for experts, which wraps
int8 `QuantizedSwitchLinear` experts as they are) on structured chat rows with `tool_calls`,
rendered and masked by `lfm_mlx.data` (loss on every assistant turn, nothing else). Why not
`mlx_lm.lora`: it masks all but the last message and has no early stopping or exact resume.
The output directory is an mlx-lm adapter directory (`adapters.safetensors` holding the best
validation checkpoint, `adapter_config.json`), so `mlx_lm.load(model, adapter_path=DIR)` takes it
unchanged; it also holds the run: resolved config, data manifest, `metrics.jsonl`, the resumable
`checkpoint/` and `summary.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from lfm_mlx import console, distributed
from lfm_mlx.errors import InvalidInput, debugging
from lfm_mlx.fsutil import (
    atomic_dir, atomic_file, atomic_write_json, atomic_write_text, check_free_space, locked, recover_directory,
    refuse_overlap,
)
from lfm_mlx.models import base_fingerprint

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
        for key in ("skip_invalid", "resume", "progress"):
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
        from lfm_mlx.yamlfile import read_yaml

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


# ---------------------------------------------------------------- applying LoRA


def select_layers(layers: str | int | list[int], n_layers: int) -> list[int]:
    """Layer indices for a `layers` setting; errors name the key and the model's layer count."""
    if layers == "all":
        return list(range(n_layers))
    if isinstance(layers, int):
        if layers > n_layers:
            raise ValueError(f"layers: {layers} is more than the model's {n_layers} layers; use at most {n_layers} or 'all'")
        return list(range(n_layers - layers, n_layers))
    bad = [i for i in layers if i >= n_layers]
    if bad:
        raise ValueError(f"layers: {bad} out of range; the model has layers 0..{n_layers - 1}")
    return sorted(layers)


def lora_keys(model: nn.Module, layers: str | int | list[int], modules: list[str]) -> list[str]:
    """Full module paths (`model.layers.5.self_attn.q_proj`) that get LoRA layers.

    Full paths (rather than mlx-lm's per-layer relative keys) let a list of layers round-trip
    through `adapter_config.json`: mlx-lm's `linear_to_lora_layers` also matches keys on the
    model's own `named_modules`.
    """
    wanted = []
    for name in modules:
        wanted.extend(MODULE_GROUPS.get(name, (name,)))
    present = dict(model.named_modules())
    keys = []
    for index in select_layers(layers, len(model.layers)):
        for name in wanted:
            path = f"model.layers.{index}.{name}"
            if path in present and path not in keys:
                keys.append(path)
    if not keys:
        raise ValueError(
            f"modules {modules} match nothing in layers {layers!r} of this model "
            f"(e.g. 'experts' on a dense LFM2 or 'attention' on conv-only layers); widen `modules` or `layers`"
        )
    return keys


def adapter_config(config: LoraConfig, keys: list[str], n_layers: int) -> dict:
    """adapter_config.json: the keys mlx_lm.tuner.utils.load_adapters reads, plus our settings."""
    return {
        "fine_tune_type": "lora",
        "num_layers": n_layers,
        "lora_parameters": {"rank": config.rank, "scale": config.lora_scale, "dropout": config.dropout, "keys": keys},
        "model": config.model,
        "lfm_mlx": {"alpha": config.alpha, "layers": config.layers, "modules": config.modules,
                    "base_fingerprint": base_fingerprint(config.model)},
    }


def apply_lora(model: nn.Module, config: LoraConfig) -> dict:
    """Freeze `model`, add LoRA layers as `config` says (via mlx-lm); return the adapter config."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    keys = lora_keys(model, config.layers, config.modules)
    adapter = adapter_config(config, keys, len(select_layers(config.layers, len(model.layers))))
    model.freeze()
    linear_to_lora_layers(model, adapter["num_layers"], adapter["lora_parameters"])
    return adapter


def lora_parameters(model: nn.Module) -> dict[str, mx.array]:
    """The trainable LoRA tensors by full name (what adapters.safetensors holds)."""
    return dict(tree_flatten(model.trainable_parameters()))


def save_safetensors_atomic(path: Path, arrays: dict[str, mx.array], metadata: dict | None = None) -> None:
    """mx.save_safetensors through a temporary sibling file and a rename."""
    with atomic_file(path, suffix=".safetensors") as tmp:
        mx.save_safetensors(str(tmp), arrays, metadata=metadata or {})


# ---------------------------------------------------------------- data


def load_data(config: LoraConfig, tokenizer):
    """(train, valid, test) Examples and a manifest. A directory is a repair set with train.jsonl and
    optional valid.jsonl / test.jsonl; files are split by `splits`."""
    from lfm_mlx.data import build_dataset

    def build(source, splits):
        return build_dataset(source, tokenizer, config.max_tokens, splits, config.seed, config.skip_invalid)

    sources = [config.data] if isinstance(config.data, str) else list(config.data)
    if len(sources) == 1 and Path(sources[0]).is_dir():
        root = Path(sources[0])
        if not (root / "train.jsonl").is_file():
            raise FileNotFoundError(f"data: {root} is a directory without train.jsonl; a repair set holds train/valid/test.jsonl")
        parts, manifest = {}, {"repair_set": str(root)}
        for name, splits in (("train", (1.0, 0.0, 0.0)), ("valid", (0.0, 1.0, 0.0)), ("test", (0.0, 0.0, 1.0))):
            path = root / f"{name}.jsonl"
            if path.is_file() and path.stat().st_size > 0:
                dataset = build(path, splits)
                parts[name] = getattr(dataset, name)
                manifest[name] = dataset.manifest
            else:
                parts[name] = []
        return parts["train"], parts["valid"], parts["test"], manifest
    dataset = build(sources, tuple(config.splits))
    if not dataset.train:
        raise ValueError(f"data: no training examples after the split {config.splits}; raise the train fraction")
    return dataset.train, dataset.valid, dataset.test, dataset.manifest


# ---------------------------------------------------------------- training


def _loss(model: nn.Module, inputs: mx.array, targets: mx.array, mask: mx.array,
          n_total: mx.array | None = None) -> tuple[mx.array, mx.array]:
    """Mean loss over the masked tokens; divided by `n_total` (every rank's tokens) it is this rank's
    share of the global batch's mean, so the ranks' gradients sum to the whole batch's gradient."""
    from lfm_mlx.data import masked_loss

    total, count = masked_loss(model(inputs), targets, mask)
    return total / mx.maximum(count if n_total is None else n_total, 1), count


def evaluate_loss(model: nn.Module, examples: list, batch_size: int,
                  world: distributed.World | None = None) -> float | None:
    """Token-weighted mean loss over every masked token of `examples` (None when empty); with
    several ranks each scores its slice and every rank gets the same total."""
    from lfm_mlx.data import iterate_batches, masked_loss

    if not examples:
        return None
    model.eval()
    world = world or distributed.World()
    total, count = 0.0, 0
    mine = world.shard(examples)
    for batch in iterate_batches(mine, batch_size, seed=0, epoch=0) if mine else ():
        loss_sum, n = masked_loss(model(batch.inputs), batch.targets, batch.loss_mask)
        mx.eval(loss_sum, n)
        total, count = total + loss_sum.item(), count + n.item()
    total, count = world.sum_scalars(total, count)
    return total / max(count, 1)


def _schedule(config: LoraConfig, total_steps: int):
    lr = config.learning_rate
    if config.lr_schedule == "cosine":
        main = optim.cosine_decay(lr, max(total_steps - config.warmup_steps, 1), lr * 0.1)
    else:
        main = lambda step: mx.array(lr, dtype=mx.float32)  # noqa: E731
    if config.warmup_steps:
        warmup = optim.linear_schedule(lr * 0.01, lr, config.warmup_steps)
        return optim.join_schedules([warmup, main], [config.warmup_steps])
    return main


def _read_checkpoint(path: Path, adapters: dict, optimizer_state: dict) -> tuple[dict, dict]:
    """The checkpoint's adapters and optimizer state, checked against this run's (rank 0 reads them)."""
    saved = mx.load(str(path / "adapters.safetensors")), mx.load(str(path / "optimizer.safetensors"))
    if set(saved[0]) != set(adapters) or set(saved[1]) != set(optimizer_state):
        raise ValueError(f"{path}: adapters or optimizer state do not match this run's LoRA layers; start a new out_dir")
    return saved


class NonFiniteStop(RuntimeError):
    """Too many consecutive steps whose loss, gradient or update was non-finite (each was undone)."""

    exit_code = 65  # EX_DATAERR, as lfm-mlx train


def _all_finite(tree) -> bool:
    """True when every array of `tree` is finite: one reduction over them (LoRA tensors are small)."""
    leaves = [value for _, value in tree_flatten(tree)]
    total = sum(value.astype(mx.float32).square().sum() for value in leaves)  # overflow counts as non-finite
    return bool(mx.isfinite(total).item())


def _checkpoint(out: Path, model: nn.Module, optimizer: optim.Optimizer, state: dict) -> None:
    arrays = [*lora_parameters(model).values(), *(v for _, v in tree_flatten(optimizer.state))]
    check_free_space(out / "checkpoint", sum(a.nbytes for a in arrays), "the LoRA checkpoint")
    with atomic_dir(out / "checkpoint") as tmp:
        mx.save_safetensors(str(tmp / "adapters.safetensors"), lora_parameters(model))
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        (tmp / "state.json").write_text(json.dumps(state, indent=2))


def _check_resumable(out: Path, config: LoraConfig) -> dict | None:
    """The checkpoint state to resume from, or None for a fresh run; refuse mismatched runs."""
    state_path = out / "checkpoint" / "state.json"
    if not state_path.exists():
        return None
    state = json.loads(state_path.read_text())
    if not config.resume:
        raise FileExistsError(
            f"out_dir: {out} already holds a LoRA run (step {state['step']}); set resume: true to continue it "
            f"or choose a new out_dir"
        )
    fingerprint = base_fingerprint(config.model)
    if state.get("base_fingerprint", fingerprint) != fingerprint:
        raise InvalidInput(
            f"model: {config.model} is not the base {out}'s checkpoint was trained on (its weights or config.json "
            f"differ: fingerprint {fingerprint[:12]} vs {state['base_fingerprint'][:12]}); pass that base, or "
            f"choose a new out_dir")
    previous = state.get("config", {})
    changed = [f"{k} ({previous.get(k)!r} -> {getattr(config, k)!r})" for k in RUN_IDENTITY_KEYS
               if json.dumps(previous.get(k)) != json.dumps(getattr(config, k))]
    if changed:
        raise ValueError(
            f"out_dir: {out} holds a run made with different settings: {', '.join(changed)}; "
            f"restore them to resume, or choose a new out_dir"
        )
    return state


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows written after the checkpoint we resume from (they will be redone)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def train_lora(config: LoraConfig, on_step: Callable[[dict], None] | None = None) -> dict:
    """Run (or resume) a LoRA pass; return the summary also written to out_dir/summary.json. The
    out_dir is locked for the whole run: a second process on it gets DirectoryBusy."""
    problems = config.problems()
    if problems:
        raise InvalidInput("invalid LoRA config:\n  " + "\n  ".join(problems))
    out = Path(config.out_dir)
    world = distributed.init()  # one process, or the ranks mlx.launch started: rank 0 alone holds the lock and writes

    def claim(stack: contextlib.ExitStack) -> None:
        refuse_overlap(out, {"base model": config.model})  # an output is never an input
        stack.enter_context(locked(out))
        recover_directory(out)  # what killed writes left: temporaries, a half-replaced checkpoint

    with contextlib.ExitStack() as stack:
        world.on_main(claim, stack)
        return _train_lora(config, out, on_step, world)


def _train_lora(config: LoraConfig, out: Path, on_step: Callable[[dict], None] | None,
                world: distributed.World) -> dict:
    from lfm_mlx.data import batch_order, make_batch
    from lfm_mlx.models import load

    resume_state = world.broadcast_json(world.on_main(_check_resumable, out, config))
    if resume_state is not None and resume_state.get("world_size", 1) != world.size:
        raise InvalidInput(
            f"out_dir: {out} was trained by {resume_state.get('world_size', 1)} process(es) and this launch has "
            f"{world.size}; resume it with the same count (mlx.launch -n {resume_state.get('world_size', 1)}), "
            f"or choose a new out_dir")

    model, tokenizer, model_config = load(config.model, return_config=True)
    train, valid, test, manifest = load_data(config, tokenizer)
    mx.random.seed(config.seed)  # LoRA A matrices start random
    adapter = apply_lora(model, config)
    previous_manifest = out / "data_manifest.json"
    if world.size > 1:  # every rank loads its own copy of the base and the rows: they must be rank 0's
        mine = json.dumps([adapter["lfm_mlx"]["base_fingerprint"], manifest], sort_keys=True, default=str)
        world.agree(None if world.broadcast_json(mine) == mine else InvalidInput(
            f"rank {world.rank}: model {config.model} or data {config.data} differ from rank 0's; give every "
            f"machine the same files"))

    def write_run_files() -> None:
        if resume_state is not None and previous_manifest.exists() \
                and json.loads(previous_manifest.read_text()) != json.loads(json.dumps(manifest)):
            raise ValueError(f"data: the rows changed since {out}'s checkpoint (see {previous_manifest}); "
                             f"restore them to resume, or choose a new out_dir")
        atomic_write_json(out / "adapter_config.json", adapter)
        atomic_write_json(out / "run_config.json", config.to_dict())
        atomic_write_json(out / "data_manifest.json", manifest)

    world.on_main(write_run_files)
    n_trainable = sum(v.size for v in lora_parameters(model).values())
    if world.size > 1 and world.main and config.progress:
        grad_bytes = sum(v.nbytes for v in lora_parameters(model).values())
        print(f"[lora] {world.size} ranks, batch {config.batch_size} each (global {config.batch_size * world.size}); "
              + distributed.cost_model(grad_bytes, world.size, f"{n_trainable:,} adapter gradients"), file=sys.stderr)

    steps_per_epoch = math.ceil(len(train) / (config.batch_size * world.size))  # batch_size is per rank
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    optimizer = optim.AdamW(learning_rate=_schedule(config, total_steps), weight_decay=config.weight_decay)
    if config.progress and world.main:
        console.say("lora", _start_line(config, adapter, model_config, manifest, (train, valid, test), total_steps,
                                        n_trainable, resume_state))

    state = {"step": 0, "epoch": 0, "batch": 0, "best_val_loss": None, "best_step": None, "bad_evals": 0,
             "stopped_early": False, "elapsed_s": 0.0, "skipped_steps": 0, "consecutive_skips": 0,
             "config_changes": []}
    changes = {}
    if resume_state is not None:  # rank 0 reads the checkpoint and hands it to the others bit for bit
        optimizer.init(model.trainable_parameters())
        like = lora_parameters(model), dict(tree_flatten(optimizer.state))
        saved = world.on_main(_read_checkpoint, out / "checkpoint", *like) or (None, None)
        model.load_weights(list(world.broadcast_arrays(saved[0], like[0]).items()), strict=False)
        restored = world.broadcast_arrays(saved[1], like[1])
        optimizer.state = tree_map_with_path(lambda name, _: restored[name], optimizer.state)
        state.update({k: resume_state.get(k, state[k]) for k in state})
        world.on_main(_truncate_metrics, out / "metrics.jsonl", state["step"])
        previous = resume_state.get("config", {})
        changes = {k: [previous.get(k), v] for k, v in config.to_dict().items()
                   if k in previous and json.dumps(previous[k]) != json.dumps(v)}
        if changes:  # settings a resume may change (learning_rate, patience, ...): kept in the run's history
            state["config_changes"].append({"step": state["step"], "changes": changes})
            state["consecutive_skips"] = 0
    mx.random.seed(config.seed + state["step"])  # dropout masks

    loss_and_grad = nn.value_and_grad(model, _loss)
    fingerprint = adapter["lfm_mlx"]["base_fingerprint"]
    metrics_file = open(out / "metrics.jsonl", "a") if world.main else None
    started = time.perf_counter() - state["elapsed_s"]

    def log(row: dict) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
        if on_step is not None:
            on_step(row)

    def save_best() -> None:
        world.on_main(save_safetensors_atomic, out / "adapters.safetensors", lora_parameters(model), {"format": "mlx"})

    def checkpoint() -> None:
        world.on_main(_checkpoint, out, model, optimizer, {**state, "config": config.to_dict(),
                                                           "base_fingerprint": fingerprint, "world_size": world.size})

    def validate() -> bool:
        """Evaluate; update best / patience; True when training should stop."""
        val = evaluate_loss(model, valid, config.batch_size, world)
        model.train()
        if val is None:
            save_best()  # no validation set: the latest adapters are the result
            return False
        best = state["best_val_loss"]
        improved = best is None or val < best - config.min_delta
        log({"step": state["step"], "epoch": state["epoch"], "val_loss": val, "improved": improved})
        if improved:
            state.update(best_val_loss=val, best_step=state["step"], bad_evals=0)
            save_best()
        else:
            state["bad_evals"] += 1
        return bool(config.patience) and state["bad_evals"] >= config.patience

    bar = console.progress("lora", total_steps, "step", state["step"], show=config.progress and world.main)
    done = state["stopped_early"] or state["step"] >= total_steps
    if changes:
        log({"step": state["step"], "config_change": changes})
    if state["step"] == 0 and not done and valid:
        validate()  # the starting point, so "best" can never be worse than the base
    model.train()
    try:
        while not done and state["epoch"] < config.epochs:
            # One seeded order of global batches; each rank takes its slice (all of it when alone).
            order = batch_order([e.n_tokens for e in train], config.batch_size * world.size, config.seed, state["epoch"])
            for indices in order[state["batch"]:]:
                mine = world.shard(indices)
                batch = make_batch([train[i] for i in mine]) if mine else None
                tokens = batch.loss_mask.sum() if mine else mx.array(0, mx.int32)
                tokens = world.sum(tokens)
                if batch is not None:
                    (loss, _), grads = loss_and_grad(model, batch.inputs, batch.targets, batch.loss_mask, tokens)
                else:  # fewer examples left than ranks: this rank adds nothing
                    loss, grads = mx.array(0.0), tree_map(mx.zeros_like, model.trainable_parameters())
                loss, grads = world.sum(loss), world.all_sum_tree(grads)  # before clipping: every rank, one update
                grad_norm = None
                if config.max_grad_norm is not None:
                    grads, grad_norm = optim.clip_grad_norm(grads, config.max_grad_norm)
                # References, not copies (MLX arrays are immutable): a non-finite step is undone with them.
                before = (model.trainable_parameters(), tree_map_with_path(lambda _, v: v, optimizer.state))
                finite = _all_finite([loss, grads])
                if finite:
                    optimizer.update(model, grads)
                    mx.eval(model.trainable_parameters(), optimizer.state, loss, tokens)
                    finite = _all_finite(model.trainable_parameters())
                state["step"] += 1
                state["batch"] += 1
                if not finite:
                    model.update(before[0])
                    optimizer.state = before[1]
                    state["skipped_steps"] += 1
                    state["consecutive_skips"] += 1
                    log({"step": state["step"], "epoch": state["epoch"], "skipped": "a non-finite loss, gradient or "
                         "updated adapter weights; the step was undone", "loss": str(loss.item())})
                    if state["consecutive_skips"] >= config.max_consecutive_skips:
                        checkpoint()
                        raise NonFiniteStop(
                            f"stopped at step {state['step']}: {state['consecutive_skips']} consecutive steps had a "
                            f"non-finite loss, gradient or update (each undone; {out / 'checkpoint'} holds the last "
                            f"good adapters; see {out / 'metrics.jsonl'}). Fix the data, or lower the learning rate "
                            f"and resume: lfm-mlx lora CONFIG --learning-rate {config.learning_rate / 10:g}")
                    continue
                state["consecutive_skips"] = 0
                row = {"step": state["step"], "epoch": state["epoch"], "train_loss": loss.item(),
                       "tokens": tokens.item(), "lr": optimizer.learning_rate.item(),
                       "grad_norm": None if grad_norm is None else grad_norm.item(),
                       "elapsed_s": round(time.perf_counter() - started, 3),
                       "peak_memory_gb": round(mx.get_peak_memory() / 1e9, 4)}
                if world.size > 1:
                    row.update(allreduce_bytes=world.reduce_bytes, allreduce_s=round(world.reduce_s, 6))
                log(row)
                bar.set_postfix(loss=f"{row['train_loss']:.3f}", val=state["best_val_loss"] and f"{state['best_val_loss']:.3f}")
                bar.update(1)
                last = state["step"] >= total_steps
                stop = False
                if state["step"] % config.eval_every == 0 or last:
                    stop = validate()
                    state["stopped_early"] = stop
                if stop or last or state["step"] % config.save_every == 0:
                    state["elapsed_s"] = time.perf_counter() - started
                    checkpoint()
                if stop or last:
                    done = True
                    break
            else:
                state["epoch"] += 1
                state["batch"] = 0
    finally:
        if metrics_file is not None:
            metrics_file.close()
        bar.close()

    # The result is the best validation checkpoint (or the latest, without a validation set).
    best = world.on_main(lambda: dict(mx.load(str(out / "adapters.safetensors"))))
    model.load_weights(list(world.broadcast_arrays(best, lora_parameters(model)).items()), strict=False)
    summary = {
        "adapter_path": str(out), "model": config.model, "steps": state["step"], "total_steps": total_steps,
        "epochs_completed": round(state["step"] / steps_per_epoch, 3), "stopped_early": state["stopped_early"],
        "best_val_loss": state["best_val_loss"], "best_step": state["best_step"],
        "test_loss": evaluate_loss(model, test, config.batch_size, world), "world_size": world.size,
        "trainable_parameters": n_trainable, "lora_layers": len(adapter["lora_parameters"]["keys"]),
        "examples": {"train": len(train), "valid": len(valid), "test": len(test)},
        "elapsed_s": round(time.perf_counter() - started, 3),
        "peak_memory_gb": round(mx.get_peak_memory() / 1e9, 4),
        "skipped_steps": state["skipped_steps"], "config_changes": state["config_changes"],
    }
    if valid and state["best_step"] == 0:
        # Best-checkpoint selection kept the zero-initialized adapters (B = 0): they change nothing.
        summary["warning"] = (f"validation loss never improved on step 0 ({state['best_val_loss']:.4f}) in "
                              f"{state['step']} steps, so the adapters kept are the untrained ones and leave the model "
                              f"unchanged; lower learning_rate (now {config.learning_rate}) or add training rows")
        if world.main:
            print(f"[lora] warning: {summary['warning']}", file=sys.stderr)
    world.on_main(atomic_write_json, out / "summary.json", summary)
    return summary


def _start_line(config: LoraConfig, adapter: dict, model_config: dict, manifest: dict, splits: tuple,
                total_steps: int, n_trainable: int, resume_state: dict | None) -> str:
    """One line a user reads before the first step: what trains where, for how long, on which rows."""
    from lfm_mlx.models import compute_dtype

    parts = [manifest[k] for k in ("train", "valid", "test") if k in manifest] if "repair_set" in manifest else [manifest]
    kept, read = sum(p["kept"] for p in parts), sum(p["rows_read"] for p in parts)
    dropped = f" ({read - kept} dropped: out_dir/data_manifest.json)" if read > kept else ""
    return (f"{'resuming at step ' + str(resume_state['step']) if resume_state else 'starting'}: rank {config.rank} "
            f"adapters (scale {config.lora_scale:g}) on {len(adapter['lora_parameters']['keys'])} linear layers "
            f"({', '.join(config.modules)}) of {config.model}, {n_trainable:,} parameters, on {console.where()}, "
            f"compute {str(compute_dtype(model_config)).removeprefix('mlx.core.')}; {total_steps} steps at learning "
            f"rate {config.learning_rate:g}; rows {kept} of {read}{dropped}, train/valid/test "
            f"{'/'.join(str(len(s)) for s in splits)}; out_dir {config.out_dir}")


# ---------------------------------------------------------------- command line


def _parse_value(text: str) -> Any:
    """A CLI value read as YAML, so `--layers 4`, `--modules [attention,experts]`, `--alpha null` work."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lfm-mlx lora", description=" ".join(__doc__.split("\n\n")[0].split()),
        epilog="Every config key is also a flag (--learning-rate 5e-5, --modules '[attention, experts]'); "
               "flags override the YAML file, which overrides the defaults.",
    )
    parser.add_argument("config", nargs="?", help="YAML config file")
    for f in dataclasses.fields(LoraConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=_parse_value,
                            default=argparse.SUPPRESS, metavar="VALUE", help=f"(default: {default!r})")
    console.add_quiet(parser)
    args = vars(parser.parse_args(argv))
    path = args.pop("config", None)
    if args.pop("quiet"):
        args["progress"] = False
    try:
        config = load_config(path, args)
        summary = train_lora(config)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        if debugging():
            raise
        print(f"lfm-mlx lora: {err}", file=sys.stderr)
        return 2
    except NonFiniteStop as err:
        print(f"lfm-mlx lora: {err}", file=sys.stderr)
        return NonFiniteStop.exit_code
    if distributed.init().main:  # one line per job, not one per rank; the numbers are in summary.json
        best = f"best step {summary['best_step']} of {summary['steps']}, valid loss {summary['best_val_loss']:.4f}" \
            if summary["best_val_loss"] is not None else f"{summary['steps']} steps, no validation rows"
        test = f", test loss {summary['test_loss']:.4f}" if summary["test_loss"] is not None else ""
        print(f"adapters: {Path(config.out_dir) / 'adapters.safetensors'} ({best}{test}, skipped "
              f"{summary['skipped_steps']}; summary {Path(config.out_dir) / 'summary.json'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
