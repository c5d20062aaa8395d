"""The estimate of one grouped-training step's peak memory, per component, from the model config and a
`StepShape`, before any weight loads."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace

from lfm_mlx import console
from lfm_mlx.model.moe import EXPERT_KERNEL_DEPRECATION, EXPERT_KERNELS, expert_kernel


GB = 1e9

# Components that live for the whole step (weights, the dequantized group, its gradients and
# optimizer state) are summed; the backward pass and the optimizer update happen at different
# times, so only the larger of the two transient sums adds to the peak.
PERSISTENT = ("weights", "group_dequant", "gradients", "optimizer_state")
BACKWARD = ("activations", "logits", "attention", "frozen_dequant")
# Routed rows of a padded expert block for each routed row (`kernels.expert_blocks`), calibrated: the
# busiest expert's count reached 4.2x the mean across the layers of the random-weight 8B model,
# the walk guesses it with 1.25x headroom, and two layers are in flight. Measured on an H200 at
# 10,240 tokens, groups 4 / 6 / 7 / 8: 41.6 / 51.3 / 57.9 / 60.7 GB, which the estimate without
# this term put at 37.1 / 46.9 / 51.9 / 56.8 GB (with it: 43.2 / 53.0 / 58.0 / 62.9).
BLOCK_PADDING = 6.0
UPDATE = ("optimizer_update",)


@dataclass
class MemoryEstimate:
    """Estimated peak bytes of one training step, per component; `total` applies the calibration.

    `scales` multiplies single components and `calibration` the whole (both 1.0 until a sweep
    measures them: `calibrate(measured)` returns the factor that makes `total` match a measurement).
    `baseline` is the runtime's fixed memory before any weight exists (interpreter, libraries:
    `runtime_baseline()`), added to `total` as measured, outside the calibration (default 0: the
    step's own bytes only).
    """

    weights: int
    group_dequant: int
    gradients: int
    optimizer_state: int
    activations: int
    logits: int
    attention: int
    frozen_dequant: int
    optimizer_update: int
    calibration: float = 1.0
    scales: dict[str, float] = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)
    baseline: int = 0

    def components(self) -> dict[str, int]:
        """Component name -> bytes after its scale (before the global calibration)."""
        return {
            name: int(round(getattr(self, name) * self.scales.get(name, 1.0)))
            for name in PERSISTENT + BACKWARD + UPDATE
        }

    @property
    def raw_total(self) -> int:
        """Peak bytes of the step before the global calibration factor (without the baseline)."""
        parts = self.components()
        persistent = sum(parts[name] for name in PERSISTENT)
        backward = sum(parts[name] for name in BACKWARD)
        update = sum(parts[name] for name in UPDATE)
        return persistent + max(backward, update)

    @property
    def total(self) -> int:
        """Estimated peak bytes: the calibrated step plus the runtime baseline."""
        return int(round(self.raw_total * self.calibration)) + self.baseline

    def calibrate(self, measured_bytes: float) -> float:
        """The calibration factor that makes this estimate's total equal `measured_bytes`."""
        if measured_bytes <= self.baseline:
            raise ValueError(f"measured_bytes={measured_bytes} must be > the baseline {self.baseline} "
                             "(a measured peak, in bytes, of the same process)")
        return float(measured_bytes - self.baseline) / self.raw_total

    def as_table(self) -> str:
        """A printable per-component table in GB."""
        parts = self.components()
        backward = sum(parts[name] for name in BACKWARD)
        update = sum(parts[name] for name in UPDATE)
        peak = "forward/backward" if backward >= update else "optimizer step"
        lines = [f"{'component':<18}{'GB':>9}  held during"]
        for names, when in ((PERSISTENT, "the whole step"), (BACKWARD, "forward/backward"), (UPDATE, "optimizer step")):
            for name in names:
                note = "" if when in ("the whole step", peak) else " (not the peak)"
                lines.append(f"{name:<18}{parts[name] / GB:>9.3f}  {when}{note}")
        if self.baseline:
            lines.append(f"{'runtime baseline':<18}{self.baseline / GB:>9.3f}  before any weight")
        if self.calibration != 1.0:
            lines.append(f"{'calibration':<18}{self.calibration:>9.3f}x")
        lines.append(f"{'total (peak)':<18}{self.total / GB:>9.3f}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready: components in bytes, total, calibration, scales and the inputs."""
        return {
            "components": self.components(), "total": self.total, "raw_total": self.raw_total,
            "calibration": self.calibration, "scales": dict(self.scales), "inputs": dict(self.inputs),
            "baseline": self.baseline,
        }


def model_shapes(config: dict) -> dict:
    """The LFM2-MoE shape numbers `estimate_peak` needs, from an HF (or mlx-lm) config dict."""
    required = [
        "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
        "num_experts", "num_experts_per_tok", "num_attention_heads", "num_key_value_heads",
    ]
    missing = [key for key in required if key not in config]
    if missing:
        raise ValueError(
            f"model config is missing {missing} (model_type={config.get('model_type')!r}); "
            "estimate_peak needs an LFM2-MoE config.json (Lfm2MoeConfig keys)"
        )
    n_layers = int(config["num_hidden_layers"])
    if "layer_types" in config and config["layer_types"]:
        attention = [i for i, kind in enumerate(config["layer_types"]) if kind == "full_attention"]
    elif "full_attn_idxs" in config:
        attention = list(config["full_attn_idxs"])
    else:
        raise ValueError("model config has neither layer_types nor full_attn_idxs; cannot tell attention from conv layers")
    heads = int(config["num_attention_heads"])
    return dict(
        V=int(config["vocab_size"]), D=int(config["hidden_size"]), I=int(config["intermediate_size"]),
        M=int(config["moe_intermediate_size"]), L=n_layers, E=int(config["num_experts"]),
        k=int(config["num_experts_per_tok"]), H=heads, KV=int(config["num_key_value_heads"]),
        hd=int(config["hidden_size"]) // heads, dense=int(config.get("num_dense_layers", 0)),
        K=int(config.get("conv_L_cache", 3)), conv_bias=bool(config.get("conv_bias", False)),
        tied=bool(config.get("tie_word_embeddings", True)), attention=attention,
    )


def parameter_counts(config: dict) -> dict[str, int]:
    """Parameter counts by kind: embeddings, attention, conv, norms, dense_mlp, routers, expert_bias, experts."""
    s = model_shapes(config)
    D, hd = s["D"], s["hd"]
    n_attn = len(s["attention"])
    n_moe = s["L"] - s["dense"]
    attention = D * s["H"] * hd + 2 * D * s["KV"] * hd + s["H"] * hd * D + 2 * hd  # q,k,v,o + q/k norms
    conv = D * 3 * D + D * D + D * s["K"] + (5 * D if s["conv_bias"] else 0)  # in_proj, out_proj, depthwise conv
    return {
        "embeddings": s["V"] * D * (1 if s["tied"] else 2),
        "attention": n_attn * attention,
        "conv": (s["L"] - n_attn) * conv,
        "norms": 2 * D * s["L"] + D,
        "dense_mlp": s["dense"] * 3 * D * s["I"],
        "routers": n_moe * s["E"] * D,
        "expert_bias": n_moe * s["E"],
        "experts": n_moe * s["E"] * 3 * D * s["M"],
    }


def weights_bytes(config: dict, expert_bits: int = 8, group_bits_size: int = 64,
                  compute_dtype_bytes: int = 2) -> int:
    """Bytes of the mixed model: affine-quantized experts (+ a scale and a bias per group), rest in
    the compute dtype, expert_bias float32."""
    counts = parameter_counts(config)
    experts = counts["experts"]
    quantized = experts * expert_bits // 8 + (experts // group_bits_size) * 2 * compute_dtype_bytes
    rest = sum(n for kind, n in counts.items() if kind not in ("experts", "expert_bias"))
    return quantized + rest * compute_dtype_bytes + counts["expert_bias"] * 4


@dataclass(frozen=True)
class StepShape:
    """What one grouped-training step holds, as the estimate needs it (`TrainConfig.settings(...)
    .step_shape(...)` makes it from a config).

    `group_size` MoE layers train (experts dequantized, routers trainable), on batches of
    `batch_size` x `seq_len` tokens (the longest example). `group_bits_size` is the quantization
    group (elements per scale/bias pair). `expert_kernel`: "qmm" (frozen experts through int8
    gather_qmm), "dequant" (dequantized just in time) or "blocks" (dequantized just in time, padded
    expert blocks: the same weights' memory). `attention`: "materialized" (scores held as fp32
    B*H*S*S, as MLX's sdpa backward does on CPU) or "fused". `optimizer_state_bytes`: 4 for fp32
    state, 2 when the optimizer keeps state in a bf16 parameter's dtype.

    The grouped trainer's settings, when given (`master` None keeps the older description through
    `compute_dtype_bytes`, `optimizer_state_bytes` and the estimate's scales):
    `master` "float32" / "compute" / "compute-stochastic" (a master copy of the group's experts and
    routers in float32 or the compute dtype; "split", bfloat16 weights and their 16 low bits, counts
    as float32: the same bytes); `fused_update` the grouped trainer's FusedAdamW (float32 moments, one
    tensor updated at a time); `lean_gradients` the experts' gradients in the compute dtype, whatever
    the master's; `loss_chunk` tokens per cross-entropy chunk (0: all logits at once); `moment_bits` 8
    for the fused update's int8 moments (1.125 bytes an element with their scales), `second_moment_bits`
    the second moment's where it differs (32 with moment_bits 8: only the first moment int8);
    `keep_expert_activations` the frozen expert blocks keep their gate and up projections and output
    for the backward pass (blocks kernel, checkpointed)."""

    group_size: int
    seq_len: int
    batch_size: int = 1
    optimizer: str = "adamw"
    expert_bits: int = 8
    group_bits_size: int = 64
    compute_dtype_bytes: int = 2
    grad_checkpoint: bool = True
    expert_kernel: str = "qmm"
    attention: str = "materialized"
    optimizer_state_bytes: int = 4
    grad_accumulation: int = 1
    master: str | None = None
    fused_update: bool = False
    lean_gradients: bool = False
    loss_chunk: int = 0
    moment_bits: int = 32
    keep_expert_activations: bool = False
    second_moment_bits: int | None = None


def _problems(shape: StepShape, baseline: int, scales: dict[str, float] | None) -> list[str]:
    """Every bad setting of `shape` (and of the estimate's own arguments), each with its fix."""
    problems = []
    if shape.optimizer not in ("adamw", "adafactor"):
        problems.append(f"optimizer={shape.optimizer!r}: use 'adamw' or 'adafactor'")
    if shape.expert_kernel not in EXPERT_KERNELS:
        problems.append(f"expert_kernel={shape.expert_kernel!r}: use 'qmm', 'dequant' or 'blocks'")
    if shape.master not in (None, "split", "float32", "compute", "compute-stochastic"):
        problems.append(f"master={shape.master!r}: use 'split', 'float32', 'compute' or 'compute-stochastic'")
    if shape.moment_bits not in (8, 32):
        problems.append(f"moment_bits={shape.moment_bits}: use 32 (float32 moments) or 8 (int8 moments)")
    second = _second_moment_bits(shape)
    if second not in (8, 32) or second < shape.moment_bits:
        problems.append(f"second_moment_bits={second}: use 32, or 8 with moment_bits=8")
    if shape.loss_chunk < 0:
        problems.append(f"loss_chunk={shape.loss_chunk} must be >= 0 (tokens; 0 for no chunking)")
    if shape.attention not in ("materialized", "fused"):
        problems.append(f"attention={shape.attention!r}: use 'materialized' or 'fused'")
    for name in ("group_size", "seq_len", "batch_size", "grad_accumulation", "group_bits_size"):
        if getattr(shape, name) < 1:
            problems.append(f"{name}={getattr(shape, name)} must be >= 1")
    if baseline < 0:
        problems.append(f"baseline={baseline} must be >= 0 (bytes)")
    unknown = sorted(set(scales or {}) - set(PERSISTENT + BACKWARD + UPDATE))
    if unknown:
        problems.append(f"scales for unknown components {unknown}; known: {list(PERSISTENT + BACKWARD + UPDATE)}")
    return problems


def _second_moment_bits(shape: StepShape) -> int:
    return shape.moment_bits if shape.second_moment_bits is None else shape.second_moment_bits


@dataclass(frozen=True)
class _Sizes:
    """The model's shape numbers (`model_shapes`) and what the step derives from them."""

    s: dict
    group: int  # trained MoE layers (the group size, capped at the model's MoE layers)
    window: range  # layers the backward pass runs through: the first MoE layer to the top (worst case)
    tokens: int  # batch_size * seq_len

    @classmethod
    def of(cls, config: dict, shape: StepShape) -> "_Sizes":
        s = model_shapes(config)
        return cls(s, min(shape.group_size, s["L"] - s["dense"]), range(s["dense"], s["L"]),
                   shape.batch_size * shape.seq_len)

    @property
    def expert_elems(self) -> int:
        """The group's trained experts (dequantized)."""
        return self.group * self.s["E"] * 3 * self.s["D"] * self.s["M"]

    @property
    def router_elems(self) -> int:
        return self.group * self.s["E"] * self.s["D"]

    @property
    def frozen_moe(self) -> int:
        """MoE layers of the backward window outside the group."""
        return max(len(self.window) - self.group, 0)


def activations_bytes(z: _Sizes, shape: StepShape) -> int:
    """What the window's layers hold for the backward pass (per token: inputs, norms, mixer, MoE, router)."""
    s, D, M, E, k = z.s, z.s["D"], z.s["M"], z.s["E"], z.s["k"]
    kvd = s["KV"] * s["hd"]
    per_token = []  # elements each window layer holds for backward, per token
    for layer in z.window:
        mixer = 6 * D + 4 * kvd if layer in s["attention"] else 8 * D  # projections, norms, rope / conv gates
        ffn = k * (3 * D + 3 * M) + D  # routed copy of x, gate/up/act, down out, weighted, combined
        per_token.append(D + 4 * D + mixer + ffn + 3 * E)  # input, norms + residuals, mixer, MoE, router
    if shape.grad_checkpoint:
        # Layer inputs kept; one layer recomputed at a time, with its gradients.
        act_elems = len(z.window) * D + 2 * max(per_token) + 2 * D
    else:
        act_elems = sum(per_token) + 2 * D
    if shape.expert_kernel == "blocks":
        # Padded expert blocks: every expert's rows padded to the busiest one's (guessed with
        # headroom), for the two layers in flight: the rows beyond those `ffn` counts.
        act_elems += 2 * k * (D + 3 * M) * (BLOCK_PADDING - 1)
    if shape.keep_expert_activations and shape.expert_kernel == "blocks" and shape.grad_checkpoint:
        # Every frozen layer's gate and up blocks (padded) and its per-choice output, until its backward.
        act_elems += z.frozen_moe * k * (2 * M * BLOCK_PADDING + D)
    return z.tokens * act_elems * shape.compute_dtype_bytes


def logits_bytes(z: _Sizes, shape: StepShape) -> int:
    """LM head + cross-entropy over the vocabulary: logits (plus an fp32 copy for the loss), then
    softmax temporaries and the logits gradient in fp32 (plus its cast back); chunked, one chunk's
    worth at a time (and the hidden states' gradient)."""
    V, cb = z.s["V"], shape.compute_dtype_bytes
    fp32_copy = 0 if cb == 4 else 1
    head_tokens = min(z.tokens, shape.loss_chunk) if shape.loss_chunk else z.tokens
    logits = head_tokens * V * (cb + 4 * fp32_copy) + head_tokens * V * (8 + cb * fp32_copy)
    return logits + (z.tokens * z.s["D"] * 4 if shape.loss_chunk else 0)


def attention_bytes(z: _Sizes, shape: StepShape) -> int:
    """fp32 attention scores B*H*S*S the backward pass holds (materialized attention only)."""
    n_attn = sum(1 for layer in z.window if layer in z.s["attention"])
    if shape.attention != "materialized" or not n_attn:
        return 0
    scores = shape.batch_size * z.s["H"] * shape.seq_len * shape.seq_len * 4
    return scores * ((1 if shape.grad_checkpoint else n_attn) + 2)


def frozen_dequant_bytes(z: _Sizes, shape: StepShape) -> int:
    """Frozen layers' experts dequantized just in time (dequant and blocks kernels)."""
    if shape.expert_kernel not in ("dequant", "blocks") or not z.frozen_moe:
        return 0
    # Checkpointed, the grouped trainer walks the layers (`walk_loss_and_grad`) with at most two
    # in flight: two frozen layers' dequantized stacks (measured at the 8B shapes on an H200:
    # 32.7 GB against 33.7 estimated at 2,048 tokens; 37.5 / 55.1 against 37.1 / 56.8 at 10,240
    # tokens, groups 4 / 8).
    # As one graph (no checkpointing), every frozen layer's stacks stay for the backward pass.
    per_layer_experts = z.s["E"] * 3 * z.s["D"] * z.s["M"] * shape.compute_dtype_bytes
    return per_layer_experts * (min(z.frozen_moe, 2) if shape.grad_checkpoint else z.frozen_moe)


def _state_elems(z: _Sizes, shape: StepShape) -> int:
    """Optimizer state elements: AdamW's two moments, or Adafactor's row and column second-moment
    vectors (for (E, out, in) expert stacks E * (out + in) per projection: gate, up M x D; down D x M)."""
    if shape.optimizer == "adamw":
        return 2 * (z.expert_elems + z.router_elems)
    E, D, M = z.s["E"], z.s["D"], z.s["M"]
    return z.group * (3 * E * (M + D) + (E + D))


def group_bytes_described(z: _Sizes, shape: StepShape) -> dict[str, int]:
    """The group's copies, gradients, optimizer state and update transient when `master` is None (the
    older description: compute-dtype copies, `optimizer_state_bytes` per state element)."""
    trainable, cb = z.expert_elems + z.router_elems, shape.compute_dtype_bytes
    return dict(group_dequant=z.expert_elems * cb,
                gradients=trainable * cb * (2 if shape.grad_accumulation > 1 else 1),
                optimizer_state=_state_elems(z, shape) * shape.optimizer_state_bytes,
                optimizer_update=trainable * cb)


def group_bytes(z: _Sizes, shape: StepShape) -> dict[str, int]:
    """The group's master copies, gradients, optimizer state and update transient for the grouped
    trainer's settings (`master`, `lean_gradients`, `fused_update`, moment bits)."""
    if shape.master is None:
        return group_bytes_described(z, shape)
    cb, state_elems = shape.compute_dtype_bytes, _state_elems(z, shape)
    master_bytes = 4 if shape.master in ("float32", "split") else cb
    group_dequant = (z.expert_elems + z.router_elems) * master_bytes
    gradients = group_dequant * (2 if shape.grad_accumulation > 1 else 1)
    if shape.lean_gradients:
        gradients = z.expert_elems * cb + z.router_elems * master_bytes
    # mlx.optimizers: every tensor's new weights, moments and temporaries at once (measured:
    # 3.9x the trained weights on CUDA, 5x on CPU, float32 masters).
    optimizer_update = 4 * group_dequant
    optimizer_state = state_elems * shape.optimizer_state_bytes
    if shape.optimizer == "adamw":
        optimizer_state = state_elems * master_bytes  # mlx.optimizers keep moments in the weights' dtype
    if shape.fused_update and shape.optimizer == "adamw":
        # int8 codes take 1.125 bytes an element (a float32 scale and bias per 64); the mean of both moments
        state_bytes = sum(4 if bits == 32 else 1.125 for bits in (shape.moment_bits, _second_moment_bits(shape))) / 2
        optimizer_state = int(state_elems * state_bytes)
        # One tensor at a time, UPDATE_CHUNK (2**25) elements at a time: a chunk's float32
        # temporaries, and the largest stack's new weights and moments before they replace the old.
        stack = z.s["E"] * z.s["D"] * z.s["M"]
        optimizer_update = int(min(stack, 1 << 25) * (master_bytes + 4 * 4) + stack * (master_bytes + 2 * state_bytes))
    return dict(group_dequant=group_dequant, gradients=gradients, optimizer_state=optimizer_state,
                optimizer_update=optimizer_update)


def estimate_peak(config: dict, shape: StepShape | None = None, *, calibration: float = 1.0,
                  scales: dict[str, float] | None = None, baseline: int = 0, **fields) -> MemoryEstimate:
    """Estimate the peak memory of one grouped-training step of `shape` (a `StepShape`; its fields may
    also come, or be changed, as keywords: `estimate_peak(config, group_size=4, seq_len=2048)`) on the
    model of `config`, one function per component. The worst case is assumed: the group sits at the
    first MoE layer, so backward runs through every layer from there to the top. `baseline`: the
    runtime's bytes before any weight (`runtime_baseline()`); `calibration` and `scales` as in
    `MemoryEstimate`."""
    if "frozen_path" in fields:  # the keyword before issue 28
        console.deprecated("expert_kernel", EXPERT_KERNEL_DEPRECATION)
        fields["expert_kernel"] = fields.pop("frozen_path")
    if "expert_kernel" in fields:
        fields["expert_kernel"] = expert_kernel(fields["expert_kernel"])
    shape = replace(shape, **fields) if shape is not None else StepShape(**fields)
    problems = _problems(shape, baseline, scales)
    if problems:
        raise ValueError("estimate_peak: " + "; ".join(problems))
    z = _Sizes.of(config, shape)
    inputs = {**dataclasses.asdict(shape), "second_moment_bits": _second_moment_bits(shape),
              "baseline": baseline, "config": dict(config)}
    return MemoryEstimate(
        # The group's int8 copy stays in `weights` (the reference for update retention), also when the
        # trainer parks it on disk (offload_group_start): the measured peaks of the H200 at 10,240
        # tokens (dequant path) came within 0.6-0.8 GB of the estimate with it, 0.7-1.0 GB above without.
        weights=weights_bytes(config, shape.expert_bits, shape.group_bits_size, shape.compute_dtype_bytes),
        **group_bytes(z, shape),  # group_dequant, gradients, optimizer_state, optimizer_update
        activations=activations_bytes(z, shape),
        logits=logits_bytes(z, shape),
        attention=attention_bytes(z, shape),
        frozen_dequant=frozen_dequant_bytes(z, shape),
        calibration=calibration, scales=dict(scales or {}), inputs=inputs, baseline=baseline,
    )
