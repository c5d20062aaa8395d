"""lfm_mlx.demo.task: seeded rows that validate and render, suites in the lfm_mlx.suites schema, held-out disjointness."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys

import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from lfm_mlx.demo import task
from lfm_mlx.data import encode_row, validate_rows
from lfm_mlx.suites import load_suite
from lfm_mlx.tools import ToolCall, parse_tool_calls, render_pythonic


@pytest.mark.parametrize("surface", ["task", "pretrain"])
def test_rows_are_deterministic_and_seeded(surface):
    first = task.generate_rows(40, seed=3, surface=surface)
    assert first == task.generate_rows(40, seed=3, surface=surface)
    assert first != task.generate_rows(40, seed=4, surface=surface)
    assert task.build_suite(surface, "test", 3, seed=1) == task.build_suite(surface, "test", 3, seed=1)


@pytest.mark.parametrize("surface", ["task", "pretrain"])
def test_rows_validate_and_cover_every_category(surface):
    rows = task.generate_rows(300, seed=0, surface=surface)
    checked = validate_rows(rows)
    assert len(checked.rows) == 300 and not checked.dropped
    tools = task.get_surface(surface).tools
    kinds = {"call": 0, "final": 0, "plain": 0}
    for row in rows:
        listed = {t["function"]["name"] for t in row["tools"]}
        assert len(listed) == 2 and listed <= set(tools)
        roles = [m["role"] for m in row["messages"]]
        if "tool" in roles:
            kinds["final"] += 1
            assert roles == ["user", "assistant", "tool", "assistant"]
        elif row["messages"][-1].get("tool_calls"):
            kinds["call"] += 1
            assert row["messages"][-1]["tool_calls"][0]["function"]["name"] in listed
        else:
            kinds["plain"] += 1
    assert all(count > 20 for count in kinds.values()), kinds


def test_rows_render_with_assistant_masks(tiny_moe_dir):
    tokenizer = load_tokenizer(tiny_moe_dir)
    for row in task.generate_rows(30, seed=0) + task.generate_rows(30, seed=0, surface="pretrain"):
        example = encode_row(row, tokenizer)
        assert example.n_trainable > 0
        assert example.n_tokens < 512  # short rows keep the CPU demo inside its time budget


def test_gold_calls_round_trip_through_the_parser():
    for row in task.generate_rows(200, seed=5):
        for message in row["messages"]:
            for call in message.get("tool_calls", []):
                fn = call["function"]
                rendered = render_pythonic([ToolCall(fn["name"], fn["arguments"])])
                parsed = parse_tool_calls(rendered)
                assert not parsed.malformed
                assert [(c.name, c.arguments) for c in parsed.calls] == [(fn["name"], fn["arguments"])]


@pytest.mark.parametrize("surface", ["task", "pretrain"])
@pytest.mark.parametrize("split", ["test", "paraphrase", "dev"])
def test_suites_load_with_the_suite_schema(tmp_path, surface, split):
    suite = task.build_suite(surface, split, per_category=4, seed=2)
    path = tmp_path / "suite.json"
    path.write_text(json.dumps(suite))
    loaded = load_suite(path)  # pydantic schema + semantic checks (gold answers satisfy their matchers)
    categories = task.get_surface(surface).categories
    assert len(loaded.cases) == 4 * len(categories)
    assert {c.category for c in loaded.cases} == set(categories)
    assert all(c.held_out == (split != "dev") for c in loaded.cases)
    kinds = {c.expect.kind for c in loaded.cases}
    assert kinds == {"tool_call", "no_tool_call", "final_answer"}
    assert len({c.messages[0]["content"] for c in loaded.cases}) == len(loaded.cases)  # no prompt asked twice


@pytest.mark.parametrize("split", ["test", "paraphrase"])
def test_held_out_suite_never_occurs_in_training(split):
    rows = task.generate_rows(3000, seed=0)
    suite = task.build_suite("task", split, per_category=20, seed=0)
    task.check_disjoint(rows, suite)
    trained = {m["content"] for row in rows for m in row["messages"] if m["role"] == "user"}
    held = [c["messages"][0]["content"] for c in suite["cases"]]
    assert not trained & set(held)
    # The check itself catches a leaked prompt.
    leaked = rows + [{"messages": [{"role": "user", "content": held[0]}], "tools": []}]
    with pytest.raises(ValueError, match="occurs in the training rows"):
        task.check_disjoint(leaked, suite)


def test_held_out_pools_are_disjoint_from_training_pools():
    assert not set(task._WORDS) & set(task._HELD_WORDS)
    assert not set(task._NAMES) & set(task._HELD_NAMES)
    assert not set(task._CITIES) & set(task._HELD_CITIES)
    assert not set(task._TOPICS) & set(task._HELD_TOPICS)
    assert not set(task._LABELS) & set(task._HELD_LABELS)
    assert not set(task.WRAPPERS) & set(task.HELD_WRAPPERS)
    for surface in task.SURFACES.values():
        for intent in surface.intents:
            assert intent.held_phrasings and not set(intent.phrasings) & set(intent.held_phrasings), intent.name
    # Made-up fillers are never a real word of either pool.
    real = set(task._WORDS + task._HELD_WORDS)
    for sources in (task._WORDS, task._WORDS + task._HELD_WORDS):  # the task's splices, pre-training's
        fresh = {task._splice(random.Random(i), sources) for i in range(2000)}
        assert not fresh & real and len(fresh) > 1500  # real words never, rarely twice
    assert not set(task.HELD_CHAT_WRAPPERS) & {"{p}"}
    # A test prompt is a training phrasing in a held-out wrapper; a paraphrase prompt a held-out phrasing.
    rng = random.Random(0)
    for intent in task.TASK_INTENTS:
        for _ in range(20):
            slots = task._slots(intent, rng, "held")
            _, phrasing, wrapper = task._prompt(intent, rng, slots, "test")
            assert phrasing in intent.phrasings and wrapper in task.HELD_WRAPPERS + task.HELD_CHAT_WRAPPERS
            _, phrasing, _ = task._prompt(intent, rng, slots, "paraphrase")
            assert phrasing in intent.held_phrasings


def test_surfaces_share_no_tool_names():
    assert not set(task.TASK_TOOLS) & set(task.PRETRAIN_TOOLS)
    assert not set(task.TASK_TOOLS) & set(task.PRETRAIN.tools)  # sibling tools included


def _filler_words(rows: list[dict]) -> set[str]:
    return {w for row in rows for m in row["messages"] for w in re.findall(r"[a-z]+", str(m.get("content") or "")
                                                                            + str(m.get("tool_calls") or ""))}


def test_task_rows_never_show_held_out_words_and_mostly_made_up_ones():
    task_words = _filler_words(task.generate_rows(400, seed=0))
    assert not task_words & set(task._HELD_WORDS)
    # Values rarely repeat, so a model must copy them, not recall them: most words of one seed's rows
    # (the made-up fillers, spliced afresh) occur in no row of another seed.
    only_here = task_words - _filler_words(task.generate_rows(400, seed=1))
    assert len(only_here) > 450  # 521 spliced afresh; a fixed pool of 1,500 words gave 376
    # The pre-training surface knows every word, the task's held-out ones included (a real base does).
    assert _filler_words(task.generate_rows(400, seed=0, surface="pretrain")) & set(task._HELD_WORDS)


def _prompts(rows: list[dict]) -> list[str]:
    return [m["content"] for row in rows for m in row["messages"] if m["role"] == "user"]


def test_only_the_pre_training_surface_uses_held_out_wording():
    """A real base knows the words of every request; the task's training rows never show the held-out
    phrasings and wrappers that its suites use, so those suites test transfer from the base."""
    held = [re.compile(re.escape(w).replace(re.escape("{p}"), ".+") + "$") for w in task.HELD_WRAPPERS + task.HELD_CHAT_WRAPPERS]

    def held_out_wrapped(prompts):
        return sum(any(wrapper.match(p) for wrapper in held) for p in prompts)

    assert held_out_wrapped(_prompts(task.generate_rows(600, seed=0))) == 0
    assert held_out_wrapped(_prompts(task.generate_rows(600, seed=0, surface="pretrain"))) > 50
    paraphrases = [i.held_phrasings[0].split("{")[0].strip() for i in task.TASK_INTENTS if i.wrap]
    pretrain = " ".join(_prompts(task.generate_rows(2000, seed=0, surface="pretrain")))
    assert all(p in pretrain for p in paraphrases if p), [p for p in paraphrases if p not in pretrain]


def test_sibling_answers_do_not_carry_the_values_the_task_checks():
    """After a tool result the base answers in its sibling's own words, which never hold the result's
    value that a task finalization case checks: the base cannot pass those before task training."""
    for row in task.generate_rows(400, seed=0, surface="pretrain"):
        roles = [m["role"] for m in row["messages"]]
        if "tool" not in roles or row["messages"][1]["tool_calls"][0]["function"]["name"] in task.PRETRAIN_TOOLS:
            continue
        result, answer = row["messages"][-2]["content"], row["messages"][-1]["content"]
        checked = [v for v in json.loads(result).values() if isinstance(v, (str, int)) and not isinstance(v, bool)]
        assert not [v for v in checked if str(v) in answer and str(v) not in row["messages"][0]["content"]], row


def test_bad_settings_fail_clearly():
    with pytest.raises(ValueError, match="unknown surface"):
        task.generate_rows(1, surface="nope")
    with pytest.raises(ValueError, match="unknown categories"):
        task.generate_rows(1, weights={"browsing": 1.0})
    with pytest.raises(ValueError, match="tools_per_row"):
        task.generate_rows(1, tools_per_row=99)
    with pytest.raises(ValueError, match="split"):
        task.build_suite(split="train")
    with pytest.raises(ValueError, match="distinct test prompts"):
        task.build_suite("pretrain", "test", per_category=500)


def test_main_writes_rows_and_suites(tmp_path, capsys):
    assert task.main([str(tmp_path / "out"), "--rows", "50", "--per-category", "3"]) == 0
    out = tmp_path / "out"
    assert len((out / "train.jsonl").read_text().splitlines()) == 50
    assert load_suite(out / "suite.json").name == "demo_task"
    assert load_suite(out / "suite_dev.json").name == "demo_task_dev"
    assert load_suite(out / "suite_paraphrase.json").name == "demo_task_paraphrase"
    assert "suite:" in capsys.readouterr().out


@pytest.mark.parametrize("module", ["lfm_mlx.task", "lfm_mlx.demo.task"])
def test_the_recorded_command_and_the_moved_module_both_write_the_task(module, tmp_path):
    """`python -m lfm_mlx.task` (README) is a shim over lfm_mlx.demo.task; both write the same rows."""
    done = subprocess.run([sys.executable, "-m", module, str(tmp_path / "out"), "--rows", "20", "--per-category", "2"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    task.main([str(tmp_path / "direct"), "--rows", "20", "--per-category", "2"])
    assert (tmp_path / "out" / "train.jsonl").read_text() == (tmp_path / "direct" / "train.jsonl").read_text()
