"""Load and save LFM2 (dense) and LFM2-MoE models with mlx-lm's model classes.

Accepts every layout in use: HF per-expert `experts.E.w{1,2,3}`, transformers-5 fused
`experts.gate_up_proj` / `experts.down_proj`, HF conv (D, 1, K), mlx-lm stacked `switch_mlp` and
conv (D, K, 1), quantized mlx-lm directories, single files or shards with an index, local
directories or hub repo ids. Why not plain `mlx_lm.load`: it ignores the shard index, has no
fused-expert layout, fails late on bad input, and does not pick a compute dtype per backend.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import shutil
import struct
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path

from lfm_mlx.errors import InvalidInput, MissingInput

SUPPORTED_MODEL_TYPES = ("lfm2", "lfm2_moe")
_COMMON_KEYS = [
    "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "norm_eps", "conv_L_cache",
]
REQUIRED_KEYS = {
    "lfm2_moe": _COMMON_KEYS + [
        "intermediate_size", "moe_intermediate_size", "num_experts", "num_experts_per_tok",
        "num_dense_layers",
    ],
    "lfm2": _COMMON_KEYS,
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_FLOAT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)


# ---------------------------------------------------------------- locating files


def resolve_model_path(path_or_repo: str | Path) -> Path:
    """A local directory as is; otherwise a hub repo id fetched (or found in cache) by huggingface-hub."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InvalidInput(f"{path} is a file; pass the model directory that holds config.json")
        return path
    text = str(path_or_repo)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise MissingInput(f"model directory {text} does not exist; check the path")
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(
            text, allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt"]
        )
    except Exception as err:  # offline, unknown repo, auth: one clear message
        raise MissingInput(
            f"could not fetch {text!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
            f"If this machine is offline, download the model elsewhere and pass its local directory, "
            f"e.g. lfm_mlx.load('/path/to/{text.split('/')[-1]}')"
        ) from None
    return Path(local)


def read_config(model_dir: Path) -> dict:
    """config.json, validated: supported model_type and every key the model classes need."""
    path = model_dir / "config.json"
    if not path.exists():
        raise MissingInput(f"{path} is missing; a model directory needs config.json")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InvalidInput(f"{path}: not valid JSON ({err}); restore the file from the source model") from None
    if not isinstance(config, dict):
        raise InvalidInput(f"{path}: the top level is a {type(config).__name__}, not an object; restore the file "
                           "from the source model")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InvalidInput(
            f"{path}: model_type {model_type!r} is not supported; lfm_mlx handles "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (LFM2 dense and LFM2-MoE)"
        )
    problems = []
    for key in REQUIRED_KEYS[model_type]:
        if key in config:
            continue
        near = difflib.get_close_matches(key, list(config), n=1)
        hint = f" (found {near[0]!r}: a typo?)" if near else ""
        problems.append(f"missing key {key!r}{hint}")
    if "layer_types" not in config and "full_attn_idxs" not in config:
        problems.append("missing key 'layer_types' (or 'full_attn_idxs'): which layers are attention")
    if model_type == "lfm2" and "block_ff_dim" not in config and "intermediate_size" not in config:
        problems.append("missing key 'block_ff_dim' (or 'intermediate_size')")
    if problems:
        raise InvalidInput(f"{path}: " + "; ".join(problems) + ". Add the keys from the source model's config.json")
    if model_type == "lfm2":  # fill the block_* keys that mlx-lm needs and HF configs may omit
        config.setdefault("block_dim", config["hidden_size"])
        config.setdefault("block_multiple_of", 256)
        config.setdefault("block_ffn_dim_multiplier", 1.0)
        config.setdefault("block_auto_adjust_ff_dim", True)
    config.setdefault("conv_bias", False)
    config.setdefault("max_position_embeddings", 128000)
    if model_type == "lfm2_moe":
        config.setdefault("use_expert_bias", True)
        config.setdefault("norm_topk_prob", True)
    return config


def _inside(model_dir: Path, name: str, where: Path | None = None) -> Path:
    """The path of shard `name` (named by `where`, else found there), refusing names and links
    that leave the model directory."""
    candidate = Path(name)
    resolved = (model_dir / candidate).resolve()
    if candidate.is_absolute() or ".." in candidate.parts or not resolved.is_relative_to(model_dir.resolve()):
        raise InvalidInput(
            f"{where or model_dir / name}: shard {name!r} points outside the model directory (to {resolved}); "
            f"weights must be plain files inside {model_dir}"
        )
    return model_dir / candidate


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model: those the index names, else every *.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
            raise InvalidInput(f"{index}: not a safetensors index ({err!r}); it needs a 'weight_map' object") from None
        files = []
        for name in names:
            if not isinstance(name, str):
                raise InvalidInput(f"{index}: shard name {name!r} is not a file name; restore the index")
            path = _inside(model_dir, name, index)
            if not path.exists():
                raise MissingInput(f"{index}: shard {name!r} is missing from {model_dir}; copy it there")
            files.append(path)
        return files
    files = sorted(p for p in model_dir.glob("*.safetensors") if not p.name.startswith("."))
    if not files:
        raise MissingInput(f"{model_dir}: no *.safetensors weights found (no pickle .bin files are read)")
    for path in files:
        _inside(model_dir, path.name)  # a symlink out of the directory is refused too
    return files


def check_safetensors(path: Path) -> None:
    """Refuse a truncated or corrupt safetensors file before MLX reads it."""
    size = path.stat().st_size
    fix = "re-download or re-copy it"
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise InvalidInput(f"{path}: truncated ({size} bytes, no safetensors header); {fix}")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise InvalidInput(f"{path}: corrupt header length {header_len} for a {size}-byte file; {fix}")
        try:
            header = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InvalidInput(f"{path}: corrupt safetensors header (not JSON); {fix}") from None
    if not isinstance(header, dict):
        raise InvalidInput(f"{path}: corrupt safetensors header (not a JSON object); {fix}")
    data_end = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        offsets = meta.get("data_offsets") if isinstance(meta, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise InvalidInput(f"{path}: tensor {name!r} has corrupt data_offsets {offsets!r}; {fix}")
        data_end = max(data_end, offsets[1])
    if 8 + header_len + data_end > size:
        raise InvalidInput(
            f"{path}: truncated: the header describes {8 + header_len + data_end} bytes, the file has {size}; {fix}"
        )


def base_fingerprint(path_or_repo: str | Path, samples: int = 16, chunk: int = 1 << 16) -> str:
    """What a LoRA adapter records of its base: sha256 of config.json, each weight file's header and
    size, and `samples` chunks spread over its data (cheap on an 8B; two trainings of one
    architecture differ in them, which headers alone would not show)."""
    model_dir = resolve_model_path(path_or_repo)
    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    for path in weight_files(model_dir):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as handle:
            header_len = struct.unpack("<Q", handle.read(8))[0]
            digest.update(handle.read(min(header_len, size)))
            data_start = min(size, 8 + header_len)
            spread = max(size - data_start - chunk, 0)
            for i in range(samples):
                handle.seek(data_start + spread * i // max(samples - 1, 1))
                digest.update(handle.read(chunk))
    return digest.hexdigest()


def check_tokenizer(model_dir: Path) -> None:
    missing = [name for name in TOKENIZER_FILES if not (model_dir / name).exists()]
    if missing:
        raise MissingInput(
            f"{model_dir}: tokenizer file(s) {', '.join(missing)} missing; copy them from the source "
            f"model directory (lfm_mlx never guesses a tokenizer)"
        )


# ---------------------------------------------------------------- layouts


def to_mlx_layout(weights: dict[str, mx.array], config: dict) -> dict[str, mx.array]:
    """Fused transformers-5 experts -> mlx-lm `switch_mlp`; the rest is left to mlx-lm's sanitize."""
    out = {}
    for name, value in weights.items():
        if name.endswith("feed_forward.experts.gate_up_proj"):
            prefix = name.removesuffix("experts.gate_up_proj")
            inter = value.shape[1] // 2  # rows [0, I) are the gate (w1), [I, 2I) the up projection (w3)
            out[prefix + "switch_mlp.gate_proj.weight"] = value[:, :inter]
            out[prefix + "switch_mlp.up_proj.weight"] = value[:, inter:]
        elif name.endswith("feed_forward.experts.down_proj"):
            out[name.removesuffix("experts.down_proj") + "switch_mlp.down_proj.weight"] = value
        elif name == "lm_head.weight" and config.get("tie_word_embeddings", True):
            continue  # tied: the embedding is the output projection
        else:
            out[name] = value
    return out


def compute_dtype(config: dict) -> mx.Dtype:
    """bfloat16 on GPUs; float32 on the CPU, where gather_mm (MoE experts) supports nothing else."""
    if mx.default_device() == mx.gpu:
        return mx.bfloat16
    return mx.float32


def build_model(config: dict, weights: dict[str, mx.array] | None = None) -> nn.Module:
    """An uninitialised mlx-lm model for `config`, quantized where config's per-path entries say so
    or, as mlx-lm decides, where `weights` hold scales for a layer."""
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    quantization = config.get("quantization")
    if quantization:
        def predicate(path: str, module: nn.Module):
            if path in quantization:
                return quantization[path]
            return hasattr(module, "to_quantized") and weights is not None and f"{path}.scales" in weights

        nn.quantize(model, group_size=quantization["group_size"], bits=quantization["bits"],
                    mode=quantization.get("mode", "affine"), class_predicate=predicate)
    return model


def cast_floats(model: nn.Module, dtype: mx.Dtype) -> None:
    """Cast float parameters to `dtype`; `expert_bias` stays float32 (it only ranks experts)."""
    def cast(path, value):
        if path.endswith("expert_bias") or value.dtype not in _FLOAT_DTYPES:
            return value
        return value.astype(dtype)

    model.update(tree_map_with_path(cast, model.parameters()))


def load_weights(model_dir: Path) -> dict[str, mx.array]:
    weights = {}
    for path in weight_files(model_dir):
        check_safetensors(path)
        try:
            weights.update(mx.load(str(path)))
        except (RuntimeError, ValueError) as err:  # a header our check passed but MLX refuses
            raise InvalidInput(f"{path}: MLX cannot read it ({err}); re-download or re-copy it") from None
    return weights


def load(path_or_repo: str | Path, dtype: mx.Dtype | None = None, lazy: bool = False,
         with_tokenizer: bool = True, return_config: bool = False):
    """Load an LFM2 / LFM2-MoE model (and its tokenizer) from a directory or hub repo id.

    Returns (model, tokenizer) or (model, tokenizer, config). `dtype` defaults to
    `compute_dtype(config)`: bfloat16 on GPU, float32 on CPU.
    """
    model_dir = resolve_model_path(path_or_repo)
    config = read_config(model_dir)
    if with_tokenizer:
        check_tokenizer(model_dir)
    weights = to_mlx_layout(load_weights(model_dir), config)
    try:
        model = build_model(config, weights)
    except (TypeError, ValueError, KeyError) as err:  # a value of the right key but the wrong kind
        raise InvalidInput(f"{model_dir / 'config.json'}: mlx-lm cannot build the model from it "
                           f"({type(err).__name__}: {err}); restore the file from the source model") from None
    try:
        weights = model.sanitize(weights)
        model.load_weights(list(weights.items()), strict=True)
    except (ValueError, KeyError, IndexError) as err:
        raise InvalidInput(
            f"{model_dir}: the weights do not match config.json ({err}). Check that config.json "
            f"belongs to these safetensors files"
        ) from None
    cast_floats(model, dtype or compute_dtype(config))
    model.eval()
    if not lazy:
        mx.eval(model.parameters())
    tokenizer = None
    if with_tokenizer:
        from mlx_lm.tokenizer_utils import load as load_tokenizer

        tokenizer = load_tokenizer(model_dir, eos_token_ids=config.get("eos_token_id"))
    if return_config:
        return model, tokenizer, config
    return model, tokenizer


# ---------------------------------------------------------------- saving


def copy_tokenizer(src_dir: Path, dst_dir: Path) -> None:
    """Copy tokenizer and chat-template files, making sure `tool_parser_type` is pythonic."""
    check_tokenizer(src_dir)
    for path in src_dir.iterdir():
        if path.name.startswith("tokenizer") or path.name in ("special_tokens_map.json", "chat_template.jinja",
                                                               "generation_config.json"):
            shutil.copy2(path, dst_dir / path.name)
    config_path = dst_dir / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    # mlx_lm.server only auto-detects the parser from <|tool_list_start|>, which LFM2.5 lacks.
    tok_config.setdefault("tool_parser_type", "pythonic")
    config_path.write_text(json.dumps(tok_config, indent=2))


def save_model_dir(model: nn.Module, config: dict, tokenizer_src: Path, out_dir: Path,
                   weights_dtype: mx.Dtype | None = mx.bfloat16) -> None:
    """Write an mlx-lm directory (config.json, safetensors + index, tokenizer) into `out_dir`.

    Float weights are stored as `weights_dtype` (bf16) except `expert_bias` (float32); quantized
    weights keep their packing. Callers wrap this in `fsutil.atomic_dir`.
    """
    from mlx_lm.utils import make_shards

    weights = {}
    for name, value in tree_flatten(model.parameters()):
        if weights_dtype is not None and value.dtype in _FLOAT_DTYPES:
            value = value.astype(mx.float32 if name.endswith("expert_bias") else weights_dtype)
        weights[name] = value
    shards = make_shards(weights)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(out_dir / name), shard, metadata={"format": "mlx"})
        weight_map.update({k: name for k in shard})
    total = sum(v.nbytes for v in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = dict(config)
    config.pop("quantization_config", None)
    if "quantization" in config:
        config["quantization_config"] = config["quantization"]  # mlx-lm writes both
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    copy_tokenizer(Path(tokenizer_src), out_dir)


def model_size_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))

