"""The model itself, below every stage: `io` (load any layout, save, the compute dtype), `moe` (MoE layer
lists, expert projection names and paths), `quant` (affine int8: pack/unpack, requantization, expert
quantization, dense weights) and `synthetic` (tiny HF-layout model directories for tests and the demo)."""
