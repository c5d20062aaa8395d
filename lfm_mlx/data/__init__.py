"""Training rows: validation, chat rendering with assistant-only loss masks, token cap, splits,
manifest and batches.

Rows are JSONL objects in OpenAI chat form: `messages` (system / user / assistant / tool roles,
assistant `tool_calls` with `function.name` and `arguments` as an object or a JSON string) and an
optional `tools` list (`{"type": "function", "function": {...}}` or bare `{name, description,
parameters}`; rendered as given). Every row is validated before any model loads; rendering needs
only the tokenizer. Each example is one conversation in one sequence: LFM2's short convolutions
would carry state across packed samples.

The package, one concern per module: `rows` (reading, validation), `encode` (chat rendering, loss
masks), `dataset` (token cap, splits, manifest), `batches` (order, padding, masked loss), `cli` (main).
"""

from __future__ import annotations

from lfm_mlx.data.rows import (
    ROLES, DEFAULT_MAX_TOKENS, RawRow, Row, ValidationResult, RowValidationError, load_rows, check_row,
    validate_rows,
)
from lfm_mlx.data.encode import (
    Example, TemplateError, encode_row, trained_spans,
)
from lfm_mlx.data.dataset import (
    Dataset, length_histogram, split_sizes, build_dataset,
)
from lfm_mlx.data.batches import (
    Batch, batch_order, make_batch, iterate_batches, masked_loss,
)
from lfm_mlx.data.cli import (
    main,
)

__all__ = [
    "ROLES", "DEFAULT_MAX_TOKENS", "RawRow", "Row", "ValidationResult", "RowValidationError", "load_rows",
    "check_row", "validate_rows", "Example", "TemplateError", "encode_row", "trained_spans", "Dataset",
    "length_histogram", "split_sizes", "build_dataset", "Batch", "batch_order", "make_batch", "iterate_batches",
    "masked_loss", "main",
]
