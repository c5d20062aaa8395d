"""Applying LoRA to a model (which layers and modules), the adapter files, and the run's data."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from lfm_mlx.fsutil import atomic_file
from lfm_mlx.lora.config import MODULE_GROUPS, LoraConfig
from lfm_mlx.model.io import base_fingerprint


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

