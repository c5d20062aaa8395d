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

from lfm_mlx.lora.adapters import (adapter_config, apply_lora, load_data, lora_keys, lora_parameters,
                                   save_safetensors_atomic, select_layers)
from lfm_mlx.lora.cli import main
from lfm_mlx.lora.config import (KNOWN_MODULES, MODULE_GROUPS, RUN_IDENTITY_KEYS, LoraConfig, config_from_dict,
                                 load_config)
from lfm_mlx.lora.train import NonFiniteStop, evaluate_loss, train_lora

__all__ = [
    "KNOWN_MODULES", "MODULE_GROUPS", "RUN_IDENTITY_KEYS", "LoraConfig", "NonFiniteStop", "adapter_config",
    "apply_lora", "config_from_dict", "evaluate_loss", "load_config", "load_data", "lora_keys", "lora_parameters",
    "main", "save_safetensors_atomic", "select_layers", "train_lora",
]
