"""Building turns, rows and suites from a surface: `generate_rows`, `build_suite`, `check_disjoint`, `write_task`."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from lfm_mlx.fsutil import atomic_write_json, atomic_write_text
from lfm_mlx.demo.task.fillers import SLOT_MAKERS
from lfm_mlx.demo.task.surfaces import (
    CHAT_WRAPPERS, HELD_CHAT_WRAPPERS, HELD_WRAPPERS, TASK_WRAPPERS, WRAPPERS, Intent, Surface, get_surface,
)


_LONE_SLOT = re.compile(r"^\{(\w+)\}$")


def _fill(spec: Any, slots: dict) -> Any:
    """A format string over the slots; a lone `{slot}` keeps the slot's type; constants pass through."""
    if not isinstance(spec, str):
        return spec
    lone = _LONE_SLOT.match(spec)
    return slots[lone.group(1)] if lone else spec.format(**slots)


def _slots(intent: Intent, rng: random.Random, pool: str) -> dict:
    slots: dict = {}
    for maker in intent.makers:
        slots.update(SLOT_MAKERS[maker](rng, pool))
    return slots


def _prompt(intent: Intent, rng: random.Random, slots: dict, split: str) -> tuple[str, str, str]:
    """(prompt, phrasing, wrapper) for a split.

    "train" / "dev": a training phrasing in a training wrapper. "test": a training phrasing in a
    held-out wrapper (with held-out fillers, from `_slots`): a request the task rows never show,
    but made of parts they do. "paraphrase": a held-out phrasing, in any wrapper: wording the task
    rows never use, which takes a base that knows what the words mean.
    """
    wrappers, held_wrappers = (WRAPPERS, HELD_WRAPPERS) if intent.wrap else (["{p}"], HELD_CHAT_WRAPPERS)
    if split == "known":  # the pre-training surface: every wording, as a real base knows the language
        phrasing, wrapper = rng.choice(intent.phrasings + intent.held_phrasings), rng.choice(wrappers + held_wrappers)
    elif split == "paraphrase":
        phrasing, wrapper = rng.choice(intent.held_phrasings), rng.choice(wrappers + held_wrappers)
    elif split == "test":
        phrasing, wrapper = rng.choice(intent.phrasings), rng.choice(held_wrappers)
    else:
        phrasing, wrapper = rng.choice(intent.phrasings), rng.choice(TASK_WRAPPERS if intent.wrap else CHAT_WRAPPERS)
    return wrapper.format(p=phrasing.format(**slots)), phrasing, wrapper


def _call(intent: Intent, slots: dict) -> dict:
    arguments = {key: _fill(spec, slots) for key, spec in intent.arguments.items()}
    return {"type": "function", "function": {"name": intent.tool, "arguments": arguments}}


def _tool_list(surface: Surface, rng: random.Random, needed: str | None, k: int) -> list[str]:
    """`k` tool names: the needed one (if any) plus random distractors, shuffled."""
    others = [name for name in surface.tools if name != needed]
    names = ([needed] if needed else []) + rng.sample(others, k - (1 if needed else 0))
    rng.shuffle(names)
    return names


def _choose(surface: Surface, rng: random.Random, category: str) -> tuple[Intent, bool]:
    """An intent of `category` ('finalization': any tool intent) and whether it is a finalization turn."""
    if category == "finalization":
        return rng.choice([i for i in surface.intents if i.tool]), True
    return rng.choice([i for i in surface.intents if i.category == category]), False


def _conversation(intent: Intent, final: bool, prompt: str, slots: dict) -> tuple[list[dict], dict]:
    """(messages up to the turn the model answers, the gold assistant turn)."""
    messages = [{"role": "user", "content": prompt}]
    if intent.tool is None:
        return messages, {"role": "assistant", "content": _fill(intent.answer, slots)}
    call = {"role": "assistant", "content": "", "tool_calls": [_call(intent, slots)]}
    if not final:
        return messages, call
    messages += [call, {"role": "tool", "content": intent.result.format(**slots)}]
    return messages, {"role": "assistant", "content": intent.answer.format(**slots)}


# ---------------------------------------------------------------- rows and suites


def generate_rows(n: int, seed: int = 0, surface: str | Surface = "task", tools_per_row: int = 2,
                  weights: dict[str, float] | None = None, full_traces: bool = False) -> list[dict]:
    """`n` training rows `{"id", "messages", "tools"}` drawn from the training pools only.

    Categories are drawn with `weights` (default: uniform over the surface's categories); the
    same arguments always give the same rows. `full_traces`: a tool call's row goes on to the tool's
    result and the answer from it (the loss is on both assistant turns), as a real agent's trace does,
    instead of ending at the call.
    """
    surface = get_surface(surface)
    weights = weights or {c: 1.0 for c in surface.categories}
    unknown = sorted(set(weights) - set(surface.categories))
    if unknown:
        raise ValueError(f"weights name unknown categories {unknown}; {surface.name} has {list(surface.categories)}")
    if not 1 <= tools_per_row <= len(surface.tools):
        raise ValueError(f"tools_per_row={tools_per_row}: use 1..{len(surface.tools)}")
    rng = random.Random(f"{surface.name}-rows-{seed}")
    categories = list(weights)
    rows = []
    for index in range(n):
        intent, final = _choose(surface, rng, rng.choices(categories, [weights[c] for c in categories])[0])
        slots = _slots(intent, rng, surface.pool)
        prompt, _, _ = _prompt(intent, rng, slots, "known" if surface.pool == "known" else "train")
        messages, gold = _conversation(intent, final or (full_traces and intent.tool is not None), prompt, slots)
        names = _tool_list(surface, rng, intent.tool, tools_per_row)
        rows.append({"id": f"{surface.name}-{seed}-{index}", "messages": messages + [gold],
                     "tools": [surface.tools[name] for name in names]})
    return rows


def _expect(intent: Intent, final: bool, slots: dict, gold: dict) -> dict:
    """The suite expectation for a case: substring matchers on string arguments, exact on the rest."""
    if intent.tool is not None and not final:
        arguments = gold["tool_calls"][0]["function"]["arguments"]
        matchers = {key: {"contains": value} if isinstance(value, str) else {"exact": value}
                    for key, value in arguments.items()}
        return {"tool_call": {"name": intent.tool, "arguments": matchers, "example_arguments": arguments}}
    answer = {"contains": [str(_fill(c, slots)) for c in intent.contains], "example_answer": gold["content"]}
    return {"final_answer" if final else "no_tool_call": answer}


SPLITS = {
    "test": "training phrasings in held-out wrappers, held-out fillers.",
    "paraphrase": "held-out phrasings, held-out fillers.",
    "dev": "training pools, for repair sets.",
}


def build_suite(surface: str | Surface = "task", split: str = "test", per_category: int = 10, seed: int = 0,
                tools_per_row: int = 2) -> dict:
    """An eval suite (the lfm_mlx.suites JSON schema) with `per_category` cases per category.

    split="test": training phrasings in held-out wrappers, with held-out fillers, every case
    `held_out`, so no prompt can occur in training rows. split="paraphrase": held-out phrasings
    (wording the rows never use) with held-out fillers. split="dev": training pools with a separate
    seed, not held out, for repair sets (which never train on held-out cases).
    """
    surface = get_surface(surface)
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: use one of {list(SPLITS)}")
    held = split != "dev"
    rng = random.Random(f"{surface.name}-suite-{split}-{seed}")
    cases, seen = [], set()
    for category in surface.categories:
        made, attempts = 0, 0
        while made < per_category:
            attempts += 1
            if attempts > 50 * per_category:
                raise ValueError(f"category {category!r} of surface {surface.name!r} has fewer than {per_category} "
                                 f"distinct {split} prompts; lower per_category or add phrasings")
            intent, final = _choose(surface, rng, category)
            slots = _slots(intent, rng, "held" if held else surface.pool)
            prompt, phrasing, wrapper = _prompt(intent, rng, slots, split)
            if prompt in seen:
                continue  # a suite asks each prompt once
            seen.add(prompt)
            messages, gold = _conversation(intent, final, prompt, slots)
            cases.append({
                "id": f"{category}-{made + 1:02d}", "category": category, "messages": messages,
                "tools": _tool_list(surface, rng, intent.tool, tools_per_row),
                "expect": _expect(intent, final, slots, gold), "held_out": held,
                "notes": f"intent {intent.name}; phrasing {phrasing!r}; wrapper {wrapper!r}",
            })
            made += 1
    name = f"demo_{surface.name}" + ("" if split == "test" else f"_{split}")
    description = f"Synthetic {surface.name} surface ({split} split, seed {seed}) from lfm_mlx.task: {SPLITS[split]}"
    return {"name": name, "description": description, "version": 1, "tools": dict(surface.tools), "cases": cases}


def _user_prompts(messages: list[dict]) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "user"]


def check_disjoint(rows: list[dict], suite: dict) -> None:
    """Raise ValueError if a held-out case's prompt occurs in the rows, or it reuses a training
    phrasing + wrapper pair (the case notes name them)."""
    trained = {p for row in rows for p in _user_prompts(row["messages"])}
    problems = []
    for case in suite["cases"]:
        if not case.get("held_out"):
            continue
        for prompt in _user_prompts(case["messages"]):
            if prompt in trained:
                problems.append(f"case {case['id']!r}: prompt {prompt!r} occurs in the training rows")
    if problems:
        raise ValueError(f"suite {suite['name']!r} is not held out: " + "; ".join(problems[:5])
                         + f" ({len(problems)} in all). Regenerate with other seeds or more held-out fillers")


def write_task(out_dir: str | Path, rows: int = 600, seed: int = 0, per_category: int = 10,
               tools_per_row: int = 2, surface: str = "task", weights: dict[str, float] | None = None,
               full_traces: bool = False) -> dict[str, Path]:
    """Write train.jsonl, suite.json (held-out test), suite_paraphrase.json and suite_dev.json into
    out_dir (atomically each). `weights`, `full_traces`: the training rows' mix and shape (`generate_rows`).

    Both held-out suites are checked against the rows written (`check_disjoint`)."""
    out_dir = Path(out_dir)
    train = generate_rows(rows, seed, surface, tools_per_row, weights, full_traces)
    atomic_write_text(out_dir / "train.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in train))
    paths = {"train": out_dir / "train.jsonl"}
    for split, key in (("test", "suite"), ("paraphrase", "suite_paraphrase"), ("dev", "suite_dev")):
        suite = build_suite(surface, split, per_category, seed, tools_per_row)
        check_disjoint(train, suite)
        paths[key] = out_dir / f"{key}.json"
        atomic_write_json(paths[key], suite)
    return paths

