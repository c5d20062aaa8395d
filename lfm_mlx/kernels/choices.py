"""Which custom CUDA kernels a run takes in place of MLX's own ops: one value, decided once and passed
down, so what `dequantize()` or a row gather does depends on what it is given, not on what ran
earlier in the process. Every kernel is taken only when a probe found it bit-identical and faster."""

from __future__ import annotations

from dataclasses import dataclass, field

from lfm_mlx.kernels import fused_adamw, int8_moments


@dataclass
class UpdateKernels:
    """The optimizer's kernel records for one run: AdamW's per master layout and the int8 moments'
    packing, each probed on the run's first real tensor large enough (small ones time launch costs)
    and kept for the rest of the run."""

    adamw: dict[str, dict] = field(default_factory=fused_adamw.unprobed)
    moments: dict = field(default_factory=int8_moments.unprobed)


@dataclass(frozen=True)
class KernelChoices:
    """The kernels of a run. `dequant`: frozen int8 experts dequantized by the custom kernel;
    `row_gather`: rows between tokens and expert blocks moved by the custom kernels; `layout`: the walk's
    device layouts of the expert blocks from one kernel (all three from the start-up probes); `update`: the optimizer's, probed at its first large update. The default
    takes no kernel: MLX's ops everywhere (any backend but CUDA)."""

    dequant: bool = False
    row_gather: bool = False
    layout: bool = False
    update: UpdateKernels = field(default_factory=UpdateKernels, compare=False)

    @classmethod
    def from_records(cls, records: dict) -> "KernelChoices":
        """From the start-up probes' records ({"dequant_kernel": ..., "row_gather_kernel": ...,
        "layout_kernel": ...}; a record without the layout's, as runs before it wrote, keeps MLX's layout)."""
        return cls(dequant=records["dequant_kernel"]["choice"] == "kernel",
                   row_gather=records["row_gather_kernel"]["choice"] == "kernel",
                   layout=records.get("layout_kernel", {}).get("choice") == "kernel")
