"""lfm_mlx.data: row validation, assistant-only loss masks, token cap, splits, manifest, batches."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx_lm.tokenizer_utils import load as load_tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lfm_mlx.data import (
    RowValidationError,
    TemplateError,
    build_dataset,
    encode_row,
    iterate_batches,
    load_rows,
    main,
    masked_loss,
    trained_spans,
    validate_rows,
)
from lfm_mlx.tools import calls_from_openai, render_pythonic

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}},
    },
}
SEARCH = {"name": "search", "description": "Web search", "parameters": {"type": "object", "properties": {}}}

# Assistant text turn, assistant turn with text + tool call (arguments as a JSON string), tool
# result, final answer.
TRACE = {
    "id": "trace-1",
    "tools": [WEATHER, SEARCH],
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! Ask me about the weather."},
        {"role": "user", "content": "Weather in Paris for 2 days?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 20, "sky": "clear"}'},
        {"role": "assistant", "content": "Clear, 20 degrees."},
    ],
}
TOOLS_JSON = json.dumps(WEATHER) + ", " + json.dumps(SEARCH)
# Every token of the rendered trace is in exactly one of these runs, in this order.
EXPECTED_TRAINED = [
    "Hello! Ask me about the weather.<|im_end|>",
    "Checking.<|tool_call_start|>[get_weather(city='Paris', days=2)]<|tool_call_end|><|im_end|>",
    "Clear, 20 degrees.<|im_end|>",
]
EXPECTED_UNTRAINED = [
    "<|startoftext|><|im_start|>system\nBe brief.\nList of tools: [" + TOOLS_JSON + "]<|im_end|>\n"
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "\n<|im_start|>user\nWeather in Paris for 2 days?<|im_end|>\n<|im_start|>assistant\n",
    '\n<|im_start|>tool\n{"temp": 20, "sky": "clear"}<|im_end|>\n<|im_start|>assistant\n',
    "\n",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_moe_dir):
    """The tokenizer the trainer uses: mlx-lm's wrapper around the synthetic model's tokenizer."""
    return load_tokenizer(tiny_moe_dir)


def runs(example, tokenizer, trained: bool) -> list[str]:
    """Decoded text of each maximal run of tokens whose mask equals `trained`."""
    out, current, previous = [], [], None
    for token, flag in zip(example.ids, example.mask):
        if flag != previous and current:
            if previous == trained:
                out.append(tokenizer.decode(current, skip_special_tokens=False))
            current = []
        current.append(token)
        previous = flag
    if current and previous == trained:
        out.append(tokenizer.decode(current, skip_special_tokens=False))
    return out


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


# ---------------------------------------------------------------- masks


def test_mask_token_by_token_on_tool_trace(tokenizer):
    example = encode_row(TRACE, tokenizer)
    assert example.row_id == "trace-1"
    assert runs(example, tokenizer, trained=True) == EXPECTED_TRAINED
    assert runs(example, tokenizer, trained=False) == EXPECTED_UNTRAINED
    # Token by token around each trained span: `<|im_start|>assistant\n` before it and the `\n`
    # after `<|im_end|>` stay untrained.
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    starts = [j for j in range(1, len(example.ids)) if example.mask[j] and not example.mask[j - 1]]
    ends = [j for j in range(len(example.ids) - 1) if example.mask[j] and not example.mask[j + 1]]
    assert len(starts) == len(ends) == 3
    for start, end in zip(starts, ends):
        assert example.ids[start - len(header):start] == header
        assert not any(example.mask[start - len(header):start])
        assert example.ids[end] == im_end
        assert tokenizer.decode([example.ids[end + 1]]) == "\n" and not example.mask[end + 1]
    assert example.ids[0] == tokenizer.bos_token_id and example.ids.count(tokenizer.bos_token_id) == 1


def test_mask_agrees_with_template_generation_blocks(tiny_moe_dir, tokenizer):
    """transformers' own `{% generation %}` mask covers the same tokens plus the `\\n` after `<|im_end|>`."""
    hf = AutoTokenizer.from_pretrained(tiny_moe_dir)
    row = validate_rows([TRACE]).rows[0]
    rendered = hf.apply_chat_template(row.messages, tools=row.tools, return_dict=True,
                                      return_assistant_tokens_mask=True)
    ours = encode_row(TRACE, tokenizer)
    assert ours.ids == list(rendered["input_ids"]) == encode_row(TRACE, hf).ids
    newline = hf.encode("\n", add_special_tokens=False)
    expected = list(map(bool, rendered["assistant_masks"]))
    for j in range(1, len(expected)):
        if expected[j] and ours.ids[j - 1] == tokenizer.eos_token_id and [ours.ids[j]] == newline:
            expected[j] = False
    assert ours.mask == expected


def _tokenizer_with_template(tiny_moe_dir, template: str, merges_newlines: bool = False) -> PreTrainedTokenizerFast:
    data = json.loads((tiny_moe_dir / "tokenizer.json").read_text())
    if merges_newlines:
        # Teach the BPE "\n\n" (byte-level "ĊĊ"), as real LFM vocabularies have.
        data["model"]["vocab"]["ĊĊ"] = max(data["model"]["vocab"].values()) + 1000
        data["model"]["merges"].insert(0, ["Ċ", "Ċ"])
    from tokenizers import Tokenizer

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)), bos_token="<|startoftext|>",
        eos_token="<|im_end|>", pad_token="<|pad|>", chat_template=template,
    )


def test_token_merged_across_the_turn_boundary_is_not_trained(tiny_moe_dir):
    template = json.loads((tiny_moe_dir / "tokenizer_config.json").read_text())["chat_template"]
    tok = _tokenizer_with_template(tiny_moe_dir, template, merges_newlines=True)
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "\n\nDone."}]}
    example = encode_row(row, tok)
    # The prompt's "\n" and the content's first "\n" became one token: it stays untrained (at
    # inference the prompt already ends with "\n"), the rest of the turn is trained.
    assert "ĊĊ" in tok.convert_ids_to_tokens(example.ids)
    assert trained_spans(example, tok) == ["\nDone.<|im_end|>"]


# A minimal ChatML template with one defect each: the last turn rendered differently (so a
# prefix of the chat does not render as a prefix), or assistant turns without <|im_end|>.
_BROKEN_TURN = {
    "not prefix-stable": "{{ m.content }}{% if loop.last %} (last){% endif %}<|im_end|>",
    "without an end-of-turn token": "{{ m.content }}{% if m.role != 'assistant' %}<|im_end|>{% endif %}",
}


@pytest.mark.parametrize("error", sorted(_BROKEN_TURN))
def test_templates_unfit_for_masks_are_refused(tiny_moe_dir, error):
    template = (
        "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n" + _BROKEN_TURN[error]
        + "\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok = _tokenizer_with_template(tiny_moe_dir, template)
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                        {"role": "user", "content": "c"}]}
    with pytest.raises(TemplateError, match=error):
        encode_row(row, tok)


_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=24).filter(
    lambda s: s == s.lstrip() and "<|" not in s
)
_args = st.dictionaries(st.from_regex(r"[a-z]{1,6}", fullmatch=True),
                        st.one_of(_text, st.integers(-999, 999), st.booleans(), st.none(),
                                  st.dictionaries(st.sampled_from("xyz"), st.integers(0, 9), max_size=2)),
                        max_size=3)


@st.composite
def conversations(draw):
    messages = [{"role": "user", "content": draw(_text)}]
    for _ in range(draw(st.integers(1, 3))):
        calls = [{"type": "function", "function": {"name": draw(st.sampled_from(["get_weather", "search"])),
                                                   "arguments": draw(_args)}}
                 for _ in range(draw(st.integers(0, 2)))]
        content = draw(_text if calls else _text.filter(lambda s: s.strip()))
        messages.append({"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})})
        messages.extend({"role": "tool", "content": draw(_text)} for _ in calls)
        messages.append({"role": "user", "content": draw(_text)})
    return {"tools": [WEATHER, SEARCH], "messages": messages}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(row=conversations())
def test_trained_text_is_exactly_each_assistant_turn(tokenizer, row):
    """Property: the masked runs are each assistant turn's content + rendered calls + <|im_end|>,
    rendered independently by lfm_mlx.tools."""
    example = encode_row(row, tokenizer)
    expected = [
        m["content"] + (render_pythonic(calls_from_openai(m["tool_calls"])) if m.get("tool_calls") else "") + "<|im_end|>"
        for m in row["messages"] if m["role"] == "assistant"
    ]
    assert runs(example, tokenizer, trained=True) == expected


# ---------------------------------------------------------------- validation


def test_every_bad_row_is_reported_with_file_and_line(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}

    def call(name, arguments):
        function = {"name": name, "arguments": arguments}
        return {"role": "assistant", "tool_calls": [{"type": "function", "function": function}]}

    user = {"role": "user", "content": "q"}
    lines = [
        good,                                                                   # 1
        '{"messages": [',                                                       # 2 bad JSON
        "[1, 2]",                                                               # 3 not an object
        {"conversation": []},                                                   # 4 no messages
        {"messages": [user, {"role": "robot", "content": "x"}]},                # 5 unknown role
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]},  # 6 missing content
        {"tools": [WEATHER], "messages": [user, call("get_weather", "{city: Paris}")]},  # 7 bad JSON args
        {"tools": [WEATHER], "messages": [user, call("get_weather", "[1]")]},   # 8 args not an object
        {"tools": [WEATHER], "messages": [user, call("send_email", {})]},        # 9 unknown tool
        {"messages": [user, {"role": "assistant", "content": "  "}]},           # 10 empty assistant turn
        {"messages": [user]},                                                   # 11 no assistant turn
        {"tools": [WEATHER], "messages": [user, {"role": "tool", "content": "r"}, good["messages"][1]]},  # 12
        {"messages": [user, call("get_weather", {})]},                           # 13 no tools list
        "",                                                                     # blank: skipped
        good,                                                                   # 15
    ]
    path = write_jsonl(tmp_path / "rows.jsonl", lines)
    with pytest.raises(RowValidationError) as info:
        validate_rows(path)
    message = str(info.value)
    expected = {
        2: "invalid JSON", 3: "JSON list, expected an object", 4: "`messages` must be a non-empty list",
        5: "unknown role 'robot'", 6: "messages[0] (user): missing content",
        7: "arguments are not valid JSON", 8: "arguments must be a JSON object, got list",
        9: "calls 'send_email', which is not in `tools` (get_weather)",
        10: "empty assistant turn", 11: "no assistant turn", 12: "tool result without a preceding assistant tool call",
        13: "the row has no `tools` list",
    }
    for line, reason in expected.items():
        assert f"{path}:{line}: " in message and reason in message, (line, reason)
    assert f"{path}:1:" not in message and f"{path}:15:" not in message
    assert message.startswith("12 of 14 rows are invalid")
    assert len(info.value.problems) == 13  # line 5 also has no assistant turn

    result = validate_rows(path, skip_invalid=True)
    assert [r.where for r in result.rows] == [f"{path}:1", f"{path}:15"]
    assert len(result.dropped) == 12 and result.n_read == 14
    assert result.sources == {str(path): hashlib.sha256(path.read_bytes()).hexdigest()}


def test_normalization_and_tool_call_ids():
    row = {
        "tools": [SEARCH],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "find "}, {"type": "text", "text": "cats"}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "search", "arguments": '{"q": "cats"}'}},
                {"id": "b", "type": "function", "function": {"name": "search", "arguments": {"q": "dogs"}}}]},
            {"role": "tool", "tool_call_id": "b", "content": "dogs"},
            {"role": "tool", "tool_call_id": "a", "content": "cats"},
            {"role": "assistant", "content": "done"},
        ],
    }
    messages = validate_rows([row]).rows[0].messages
    assert messages[0]["content"] == "find cats"
    assert [c["function"]["arguments"] for c in messages[1]["tool_calls"]] == [{"q": "cats"}, {"q": "dogs"}]
    row["messages"][3]["tool_call_id"] = "zzz"
    with pytest.raises(RowValidationError, match="tool_call_id 'zzz' matches no unanswered call"):
        validate_rows([row])
    assert load_rows([row])[0].where == "rows[0]"


# ---------------------------------------------------------------- dataset


def _rows(n: int) -> list[dict]:
    return [
        {"id": f"r{i}", "tools": [WEATHER], "messages": [
            {"role": "user", "content": "weather " * (1 + i % 7)},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": f"c{i}"}}}]},
            {"role": "tool", "content": "sunny " * (i % 5)},
            {"role": "assistant", "content": "It is sunny. " * (1 + i % 11)},
        ]}
        for i in range(n)
    ]


def test_build_dataset_cap_splits_manifest(tmp_path, tokenizer):
    rows = _rows(60)
    path = write_jsonl(tmp_path / "rows.jsonl", rows + ['{"bad json'])
    lengths = {r["id"]: encode_row(r, tokenizer).n_tokens for r in rows}
    cap = sorted(lengths.values())[45]  # some rows are longer than this
    over = sorted(i for i, n in lengths.items() if n > cap)
    assert over

    with pytest.raises(RowValidationError, match=r"rows.jsonl:61: invalid JSON"):
        build_dataset(path, tokenizer, max_tokens=cap)
    data = build_dataset(path, tokenizer, max_tokens=cap, splits=(0.8, 0.1, 0.1), seed=3, skip_invalid=True)
    manifest = data.manifest
    kept = 60 - len(over)
    assert manifest["kept"] == kept and manifest["rows_read"] == 61
    assert manifest["dropped"] == {"invalid": 1, "over_cap": len(over), "no_trainable": 0}
    assert sorted(d["row"].rsplit(":", 1)[1] for d in manifest["dropped_rows"] if d["reason"] == "over_cap") == sorted(
        str(int(i[1:]) + 1) for i in over)
    assert manifest["sources"] == {str(path): hashlib.sha256(path.read_bytes()).hexdigest()}
    assert manifest["max_tokens"] == cap and manifest["seed"] == 3
    sizes = manifest["splits"]["sizes"]
    assert sizes == {"train": len(data.train), "valid": len(data.valid), "test": len(data.test)}
    assert sizes["valid"] == sizes["test"] == round(kept * 0.1) and sum(sizes.values()) == kept
    assert sum(manifest["token_lengths"]["counts"]) == kept
    assert manifest["token_lengths"]["max"] <= cap
    # One row per example (no packing), each appearing once across the splits.
    ids = [e.row_id for e in data.train + data.valid + data.test]
    assert sorted(ids) == sorted(set(lengths) - set(over))
    assert all(e.n_tokens == lengths[e.row_id] and e.n_trainable > 0 for e in data.train)
    # Seeded: same seed, same split; another seed, another split.
    again = build_dataset(path, tokenizer, max_tokens=cap, splits=(0.8, 0.1, 0.1), seed=3, skip_invalid=True)
    other = build_dataset(path, tokenizer, max_tokens=cap, splits=(0.8, 0.1, 0.1), seed=4, skip_invalid=True)
    assert [e.row_id for e in again.valid] == [e.row_id for e in data.valid]
    assert [e.row_id for e in other.train] != [e.row_id for e in data.train]

    data.write_manifest(tmp_path / "out" / "manifest.json")
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest
    with pytest.raises(ValueError, match="summing to 1"):
        build_dataset(path, tokenizer, splits=(0.5, 0.1, 0.1))


# ---------------------------------------------------------------- batches and loss


def test_batches_pad_right_and_resume(tokenizer):
    examples = [encode_row(r, tokenizer) for r in _rows(11)]
    by_id = {e.row_id: e for e in examples}
    batches = list(iterate_batches(examples, batch_size=4, seed=1, epoch=0, pad_id=0))
    assert [len(b.row_ids) for b in batches] == [4, 4, 3]
    assert sorted(i for b in batches for i in b.row_ids) == sorted(by_id)
    for batch in batches:
        inputs, targets, mask = (np.array(a) for a in batch[:3])
        for b, row_id in enumerate(batch.row_ids):
            example = by_id[row_id]
            n = example.n_tokens - 1
            assert inputs[b, :n].tolist() == example.ids[:-1] and targets[b, :n].tolist() == example.ids[1:]
            assert mask[b, :n].tolist() == example.mask[1:]
            assert not mask[b, n:].any() and (inputs[b, n:] == 0).all()
    # Same (seed, epoch) -> same order; resume from batch 1 gives the tail; epochs differ.
    again = list(iterate_batches(examples, 4, seed=1, epoch=0, start_batch=1))
    assert [b.row_ids for b in again] == [b.row_ids for b in batches[1:]]
    assert [b.row_ids for b in iterate_batches(examples, 4, seed=1, epoch=1)] != [b.row_ids for b in batches]
    # A pad multiple rounds every width up, with the padding masked.
    for batch in iterate_batches(examples, 4, seed=1, pad_id=0, pad_multiple=64):
        width = max(len(by_id[i].ids) for i in batch.row_ids) - 1
        assert batch.inputs.shape[1] == -(-width // 64) * 64 and not np.array(batch.loss_mask)[:, width:].any()
    # Length bucketing pads less.
    padding = lambda bs: sum(np.array(b.inputs).size - int(sum(len(by_id[i].ids) - 1 for i in b.row_ids)) for b in bs)
    assert padding(list(iterate_batches(examples, 4, seed=1, sort_by_length=True))) < padding(batches)


def test_masked_loss_ignores_prompt_and_padding(tokenizer):
    examples = [encode_row(r, tokenizer) for r in _rows(3)]
    inputs, targets, mask, _ = next(iterate_batches(examples, batch_size=3, seed=0))
    vocab = 64 + int(mx.max(targets).item())
    logits = mx.random.normal((*targets.shape, vocab), key=mx.random.key(0)).astype(mx.bfloat16)
    total, count = masked_loss(logits, targets, mask)
    # Reference: log-softmax in numpy over the masked positions only.
    x = np.array(logits.astype(mx.float32))
    logp = x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
    picked = np.take_along_axis(logp, np.array(targets)[..., None], axis=-1)[..., 0]
    m = np.array(mask)
    assert int(count.item()) == int(m.sum()) == sum(e.n_trainable for e in examples)
    assert float(total.item()) == pytest.approx(float(-(picked * m).sum()), rel=1e-4)
    # Garbage (even NaN) at untrained positions does not reach the loss.
    spoiled = mx.where(mask[..., None], logits, mx.array(float("nan"), dtype=logits.dtype))
    assert float(masked_loss(spoiled, targets, mask)[0].item()) == pytest.approx(float(total.item()), rel=1e-6)


def test_main_validates_before_loading_and_summarizes(tmp_path, tiny_moe_dir, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    assert main([str(bad), "--model", str(tmp_path / "no-such-model")]) == 2
    assert f"{bad}:1: no assistant turn" in capsys.readouterr().out
    good = write_jsonl(tmp_path / "good.jsonl", [TRACE] * 4)
    out = tmp_path / "manifest.json"
    assert main([str(good), "--model", str(tiny_moe_dir), "--manifest", str(out), "--splits", "1", "0", "0"]) == 0
    printed = capsys.readouterr().out
    assert "Clear, 20 degrees.<|im_end|>" in printed
    assert json.loads(out.read_text())["kept"] == 4
