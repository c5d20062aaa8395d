"""A row rendered with the model's chat template and tokenized, the loss mask on every assistant turn and nothing else."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from lfm_mlx.errors import InvalidInput
from lfm_mlx.data.rows import Row, check_row


@dataclass
class Example:
    """One tokenized conversation; `mask[j]` is True where token j is trained on."""

    ids: list[int]
    mask: list[bool]
    row_id: str

    @property
    def n_tokens(self) -> int:
        return len(self.ids)

    @property
    def n_trainable(self) -> int:
        # Token 0 is never a target (it has no previous token).
        return sum(self.mask[1:])


class TemplateError(InvalidInput):
    """The chat template cannot give assistant-only loss masks (not prefix-stable, no end token)."""


def _render(tokenizer, messages: list[dict], tools: list[dict] | None, generation_prompt: bool) -> str:
    kwargs = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs)


def _end_of_turn_ids(tokenizer) -> set[int]:
    listed = getattr(tokenizer, "eos_token_ids", None)  # mlx-lm: a set; transformers: may be an int
    ids = {listed} if isinstance(listed, int) else set(listed or [])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    if not ids:
        raise TemplateError("the tokenizer has no EOS token; set eos_token (e.g. <|im_end|>) in tokenizer_config.json")
    return ids


def _boundary(tokenizer, full_ids: list[int], full_text: str, prefix_text: str, where: str) -> int:
    """Index of the first token of `full_ids` that lies wholly after `prefix_text`."""
    if not full_text.startswith(prefix_text):
        raise TemplateError(
            f"{where}: the chat template is not prefix-stable: rendering the messages up to this turn "
            f"does not give a prefix of the whole conversation (diverges at character "
            f"{_common_prefix(full_text, prefix_text)}). Loss masks need a template that renders "
            "earlier turns the same way whatever follows them."
        )
    prefix_ids = tokenizer.encode(prefix_text, add_special_tokens=False)
    if full_ids[: len(prefix_ids)] == prefix_ids:
        return len(prefix_ids)
    # A token straddles the boundary (e.g. the prompt's "\n" merged with content starting with
    # "\n"): start after it, at the first token whose decoded prefix covers `prefix_text`.
    for j in range(_common_prefix(full_ids, prefix_ids), len(full_ids) + 1):
        if len(tokenizer.decode(full_ids[:j], skip_special_tokens=False)) >= len(prefix_text):
            return j
    raise TemplateError(
        f"{where}: cannot locate the turn boundary in the tokens (the tokenizer does not decode back to its text)"
    )


def _common_prefix(a: Sequence, b: Sequence) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def encode_row(row: Row | dict, tokenizer) -> Example:
    """Render a row through the tokenizer's chat template and mark every assistant turn.

    For assistant message i the trained span runs from the end of `messages[:i]` rendered with
    the generation prompt to the end of `messages[:i + 1]`, cut after its last end-of-turn token:
    content + tool calls + `<|im_end|>`, not the newline after it nor `<|im_start|>assistant\\n`.
    The template's own `{% generation %}` marks are not needed.
    """
    if isinstance(row, dict):
        checked, problems = check_row(row, "row")
        if problems:
            raise ValueError("invalid row: " + "; ".join(problems))
        row = checked
    full_text = _render(tokenizer, row.messages, row.tools, generation_prompt=False)
    ids = tokenizer.encode(full_text, add_special_tokens=False)  # the template emits BOS itself
    end_ids = _end_of_turn_ids(tokenizer)
    mask = [False] * len(ids)
    for i, message in enumerate(row.messages):
        if message["role"] != "assistant":
            continue
        where = f"{row.where}: messages[{i}]"
        prompt = _render(tokenizer, row.messages[:i], row.tools, generation_prompt=True)
        turn = _render(tokenizer, row.messages[: i + 1], row.tools, generation_prompt=False)
        start = _boundary(tokenizer, ids, full_text, prompt, where)
        stop = _boundary(tokenizer, ids, full_text, turn, where)
        ends = [j for j in range(start, stop) if ids[j] in end_ids]
        if not ends:
            raise TemplateError(
                f"{where}: the assistant turn renders without an end-of-turn token {sorted(end_ids)}; "
                "the model would never learn to stop. Check the chat template and eos_token."
            )
        for j in range(start, ends[-1] + 1):
            mask[j] = True
    return Example(ids=ids, mask=mask, row_id=row.row_id)


def trained_spans(example: Example, tokenizer) -> list[str]:
    """The decoded text of each contiguous run of masked tokens."""
    spans, run = [], []
    for token, trained in zip(example.ids + [None], example.mask + [False]):
        if trained:
            run.append(token)
        elif run:
            spans.append(tokenizer.decode(run, skip_special_tokens=False))
            run = []
    return spans
