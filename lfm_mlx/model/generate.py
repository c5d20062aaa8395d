"""Greedy continuations of many prompts at once, through mlx-lm's batch generator.

Prompts of different lengths run left-padded; mlx-lm masks the padding in attention and in the
short convolutions, so each continuation is the one the prompt gets alone (checked token for token
on the demo's suites and in tests/test_evaluate.py). On 2 CPU cores the demo's 96 cases took 6.3 s
with 16 prompts prefilled and 32 continuations decoded at once; 8/32 and 32/64 came within 0.4 s.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFILL_BATCH, DECODE_BATCH = 16, 32


@dataclass
class Continuation:
    tokens: list[int]  # the generated tokens, the end token included when it `stopped`
    stopped: bool  # ended on an end token (else cut at max_tokens)


def prompt_ids(tokenizer, messages: list[dict], tools: list[dict] | None) -> list[int]:
    """The chat template's prompt for the assistant's next turn, as token ids."""
    prompt = tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True, tokenize=False)
    # The template already writes <|startoftext|>; encoding without special tokens avoids a second BOS.
    return tokenizer.encode(prompt, add_special_tokens=False)


def greedy_continuations(model, tokenizer, prompts: list[list[int]], max_tokens: int) -> list[Continuation]:
    """Each prompt's greedy continuation (up to `max_tokens` tokens), in the prompts' order."""
    from mlx_lm.generate import BatchGenerator

    generator = BatchGenerator(model, stop_tokens=[[t] for t in tokenizer.eos_token_ids],
                               prefill_batch_size=PREFILL_BATCH, completion_batch_size=DECODE_BATCH)
    try:
        uids = generator.insert(prompts, [max_tokens] * len(prompts))
        out = {uid: Continuation([], False) for uid in uids}
        while responses := generator.next_generated():
            for response in responses:
                out[response.uid].tokens.append(response.token)
                out[response.uid].stopped = response.finish_reason == "stop"
    finally:
        generator.close()
    return [out[uid] for uid in uids]
