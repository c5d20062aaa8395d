"""Custom kernels and the numerics beside them, each a bit-identical, faster stand-in for a portable MLX
path (CUDA kernels are taken only when a start-up probe finds them so): `probe` (timing and the choice),
`choices` (`KernelChoices`: a run's choices, made once and passed down), `dequant` (int8 experts),
`row_gather` (rows between tokens and expert blocks), `block_layout` (the expert blocks' layout in one
kernel), `expert_blocks` (MoE blocks as padded expert blocks through batched matmuls), `fused_adamw`
(AdamW per master layout), `int8_moments` (AdamW moments as 8-bit codes), `master_bits` (the float32
master split into bf16 weights and their low bits)."""
