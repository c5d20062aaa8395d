"""lfm_mlx.convert: Hermes, ShareGPT, xLAM and folded traces -> our rows; every bad row reported as file:line.

The fixture rows are written here from each format's public description (no dataset rows copied).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lfm_mlx.cli import main as cli_main
from lfm_mlx.convert import convert_file, convert_row, convert_rows
from lfm_mlx.data import validate_rows
from lfm_mlx.errors import InvalidInput, MissingInput

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"name": "get_time", "description": "Local time in a timezone.",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}

HERMES_SYSTEM = ("You are a function calling AI model. You are provided with function signatures within <tools></tools> "
                 "XML tags. Here are the available tools: <tools> " + json.dumps(WEATHER) + " "
                 + json.dumps({"type": "function", "function": TIME}) + " </tools> For each function call return a "
                 "json object within <tool_call></tool_call> XML tags.")


def hermes(*turns: tuple[str, str], system: str = HERMES_SYSTEM) -> dict:
    return {"conversations": [{"from": "system", "value": system}] + [{"from": f, "value": v} for f, v in turns]}


HERMES_GOOD = [
    # Hermes data often writes the call as a Python dict (single quotes): the repair pass reads it.
    hermes(("human", "Weather in Oslo?"),
           ("gpt", "<tool_call>\n{'arguments': {'city': 'Oslo'}, 'name': 'get_weather'}\n</tool_call>"),
           ("tool", '<tool_response>\n{"name": "get_weather", "content": {"temp_c": 3}}\n</tool_response>'),
           ("gpt", "It is 3 °C in Oslo.")),
    hermes(("human", "Weather in Lima and the time in Tokyo?"),
           ("gpt", 'Checking both.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Lima"}}</tool_call>\n'
                   '<tool_call>{"name": "get_time", "arguments": {"tz": "Asia/Tokyo"}}</tool_call>'),
           ("tool", '<tool_response>{"name": "get_time", "content": "09:00"}</tool_response>\n'
                    '<tool_response>{"name": "get_weather", "content": "sunny"}</tool_response>'),
           ("gpt", "Lima is sunny; it is 09:00 in Tokyo.")),
    hermes(("human", "Thanks!"), ("gpt", "You're welcome."), system="You are terse. <tools> [] </tools>"),
]
HERMES_BAD = [
    (hermes(("human", "Book a flight"), ("gpt", '<tool_call>{"name": "book_flight", "arguments": {}}</tool_call>')),
     "calls 'book_flight', which is not in `tools`"),
    (hermes(("human", "Weather?"), ("gpt", '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}')),
     "without a closing </tool_call>"),
    (hermes(("human", "Weather?"), ("gpt", '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'),
            ("tool", '<tool_response>{"name": "get_time", "content": "1"}</tool_response>')),
     "a tool result for 'get_time' answers no call"),
]

SHAREGPT_GOOD = [
    {"conversations": [{"from": "human", "value": "Weather in Rome?"},
                       {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Rome"}}'},
                       {"from": "observation", "value": '{"temp_c": 21}'},
                       {"from": "gpt", "value": "21 °C in Rome."}],
     "system": "You help with travel.", "tools": json.dumps([WEATHER["function"], TIME])},
    {"conversations": [{"from": "human", "value": "Time in Paris?"},
                       {"from": "gpt", "value": "Let me look."},
                       {"from": "function_call", "value": '{"name": "get_time", "arguments": "{\\"tz\\": \\"Europe/Paris\\"}"}'},
                       {"from": "observation", "value": "14:05"},
                       {"from": "gpt", "value": "It is 14:05."}],
     "tools": [TIME]},
    {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "Hello!"}]},
]
SHAREGPT_BAD = [
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "get_time(tz=1"}],
      "tools": [TIME]}, "not a tool call"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "observation", "value": "42"},
                        {"from": "gpt", "value": "ok"}]}, "tool result without a preceding assistant tool call"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, "unknown role 'bot'"),
]

XLAM_TOOLS = [{"name": "convert_currency", "description": "Convert an amount between currencies.",
               "parameters": {"amount": {"description": "Amount", "type": "float"},
                              "to": {"description": "Target currency", "type": "str, optional", "default": "EUR"},
                              "rounding": {"description": "Decimals", "type": "int, optional"}}}]
XLAM_GOOD = [
    {"id": 7, "query": "Convert 12.5 USD to euros.", "tools": json.dumps(XLAM_TOOLS),
     "answers": json.dumps([{"name": "convert_currency", "arguments": {"amount": 12.5, "to": "EUR"}}])},
    {"query": "Convert 3 and 4 dollars to yen.", "tools": XLAM_TOOLS,
     "answers": [{"name": "convert_currency", "arguments": {"amount": 3, "to": "JPY"}},
                 {"name": "convert_currency", "arguments": {"amount": 4, "to": "JPY"}}]},
]
XLAM_BAD = [
    ({"query": "Hello", "tools": json.dumps(XLAM_TOOLS), "answers": "[]"}, "`answers` is empty"),
    ({"query": "Weather?", "tools": json.dumps(XLAM_TOOLS),
      "answers": json.dumps([{"name": "get_weather", "arguments": {"city": "Oslo"}}])}, "not in `tools`"),
    ({"query": "x", "tools": "[{'name': ", "answers": "[]"}, "`tools` is a string that is not JSON"),
]

FOLDED_PROSE = "You are the offline encyclopedia assistant. Answer from the tools.\nTools:\n"
ARTICLE = {"name": "article_overview", "description": "Lead and sections of an article.",
           "parameters": {"type": "object", "properties": {"title": {"type": "string"}}, "required": ["title"]}}


def folded(*turns: tuple[str, str], question: str = "What is a solar panel?") -> dict:
    first = FOLDED_PROSE + json.dumps([ARTICLE]) + "\n" + question
    return {"messages": [{"role": "user", "content": first}] + [{"role": r, "content": c} for r, c in turns]}


FOLDED_GOOD = [
    folded(("assistant", '{"function": "article_overview", "parameters": {"title": "Solar panel"}}'),
           ("user", '[TOOL_RESPONSE name=article_overview]\n{"title": "Solar panel", "lead": "A device..."}'),
           ("assistant", "A solar panel converts sunlight into electricity.")),
    folded(("assistant", 'Looking it up.\n```tool_call\n{"function": "article_overview", "parameters": {"title": "Sun"}}\n```'),
           ("user", "[TOOL_RESPONSE name=article_overview]\n{\"lead\": \"The Sun is a star.\"}"),
           ("assistant", "The Sun is a star."), ("user", "Thanks"), ("assistant", "Glad to help.")),
]
FOLDED_BAD = [
    ({"messages": [{"role": "user", "content": "Just a question"}, {"role": "assistant", "content": "ok"}]},
     "declares no tools"),
    (folded(("assistant", '{"function": "article_overview", "parameters": {"title": "Sun"}}'),
            ("user", "[TOOL_RESPONSE name=map_search]\n{}"), ("assistant", "done")),
     "a tool result for 'map_search' answers no call"),
    (folded(("assistant", '{"function": "article_overview", "parameters": {"title": }}')), "unparseable JSON call"),
]

CASES = {"hermes": (HERMES_GOOD, HERMES_BAD), "sharegpt": (SHAREGPT_GOOD, SHAREGPT_BAD),
         "xlam": (XLAM_GOOD, XLAM_BAD), "folded": (FOLDED_GOOD, FOLDED_BAD)}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("fmt", sorted(CASES))
def test_every_row_is_converted_or_reported_with_its_line(fmt, tmp_path):
    good, bad = CASES[fmt]
    src = write_jsonl(tmp_path / "in.jsonl", good + [row for row, _ in bad] + ["{not json"])
    result = convert_file(src, tmp_path / "out.jsonl", fmt)
    assert len(result.rows) == len(good) and result.n_read == len(good) + len(bad) + 1
    assert len(result.problems) == len(bad) + 1
    for number, (_, reason) in enumerate(bad, start=len(good) + 1):
        problem = result.problems[number - len(good) - 1]
        assert problem.startswith(f"{src}:{number}: ") and reason in problem, problem
    assert result.problems[-1].startswith(f"{src}:{result.n_read}: invalid JSON")
    # What was written is what training accepts, row for row.
    checked = validate_rows(tmp_path / "out.jsonl")
    assert len(checked.rows) == len(good) and not checked.dropped


def test_hermes_rows_in_detail():
    row = convert_row(HERMES_GOOD[1], "hermes")
    assert [t["function"]["name"] for t in row["tools"]] == ["get_weather", "get_time"]
    # The Hermes boilerplate (its own <tool_call> syntax) is dropped; a plain persona is kept.
    assert row["messages"][0] == {"role": "user", "content": "Weather in Lima and the time in Tokyo?"}
    assistant = row["messages"][1]
    assert assistant["content"] == "Checking both."
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in assistant["tool_calls"]] == [
        ("get_weather", {"city": "Lima"}), ("get_time", {"tz": "Asia/Tokyo"})]
    assert [m["content"] for m in row["messages"][2:4]] == ["09:00", "sunny"]
    assert convert_row(HERMES_GOOD[0], "hermes")["messages"][2]["content"] == '{"temp_c": 3}'
    assert convert_row(HERMES_GOOD[2], "hermes")["messages"][0] == {"role": "system", "content": "You are terse."}


def test_sharegpt_rows_in_detail():
    row = convert_row(SHAREGPT_GOOD[1], "sharegpt")
    # gpt text followed by a function_call turn is one assistant turn: its text, then the call.
    assert row["messages"][1] == {"role": "assistant", "content": "Let me look.", "tool_calls": [
        {"type": "function", "function": {"name": "get_time", "arguments": {"tz": "Europe/Paris"}}}]}
    assert row["tools"] == [{"type": "function", "function": TIME}]
    first = convert_row(SHAREGPT_GOOD[0], "sharegpt")
    assert first["messages"][0] == {"role": "system", "content": "You help with travel."}
    assert first["messages"][3] == {"role": "tool", "content": '{"temp_c": 21}'}


def test_xlam_parameters_become_a_json_schema():
    row = convert_row(XLAM_GOOD[0], "xlam")
    assert row["id"] == 7
    params = row["tools"][0]["function"]["parameters"]
    assert params["required"] == ["amount"]
    assert {k: v.get("type") for k, v in params["properties"].items()} == {"amount": "number", "to": "string", "rounding": "integer"}
    assert params["properties"]["to"]["default"] == "EUR"
    assert len(convert_row(XLAM_GOOD[1], "xlam")["messages"][1]["tool_calls"]) == 2


def test_folded_first_turn_splits_into_system_tools_and_question():
    row = convert_row(FOLDED_GOOD[0], "folded")
    assert row["tools"] == [{"type": "function", "function": ARTICLE}]
    assert row["messages"][0] == {"role": "system", "content": FOLDED_PROSE.strip()}
    assert row["messages"][1] == {"role": "user", "content": "What is a solar panel?"}
    assert row["messages"][2]["tool_calls"][0]["function"] == {"name": "article_overview", "arguments": {"title": "Solar panel"}}
    assert row["messages"][3] == {"role": "tool", "content": '{"title": "Solar panel", "lead": "A device..."}'}
    fenced = convert_row(FOLDED_GOOD[1], "folded")["messages"][2]
    assert fenced["content"] == "Looking it up." and len(fenced["tool_calls"]) == 1


def test_cli_reports_rows_prints_counts_and_exit_codes(tmp_path, capsys):
    src = write_jsonl(tmp_path / "x.jsonl", XLAM_GOOD + [XLAM_BAD[0][0]])
    assert cli_main(["convert", "--from", "xlam", str(src), str(tmp_path / "o.jsonl")]) == 1
    out, err = capsys.readouterr()
    assert f"{src}:3: `answers` is empty" in err
    assert "xlam: 3 rows read, 2 converted (3 tool calls, 0 tool results), 1 reported" in out
    ok = write_jsonl(tmp_path / "ok.jsonl", XLAM_GOOD)
    assert cli_main(["convert", "--from", "xlam", str(ok), str(tmp_path / "o2.jsonl")]) == 0
    capsys.readouterr()
    # Bad input files: one message, exit 2, nothing written.
    for argv, message in [
        (["--from", "xlam", str(tmp_path / "missing.jsonl"), str(tmp_path / "o3.jsonl")], "does not exist"),
        (["--from", "hermes", str(ok), str(tmp_path / "o3.jsonl")], "none of its 2 rows converts as hermes"),
        (["--from", "xlam", str(write_jsonl(tmp_path / "empty.jsonl", [])), str(tmp_path / "o3.jsonl")], "holds no rows"),
        (["--from", "xlam", str(ok), str(ok)], "would overwrite the input"),
    ]:
        assert cli_main(["convert", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o3.jsonl").exists()


def test_python_api_takes_rows_and_raises_user_errors(tmp_path):
    result = convert_rows(FOLDED_GOOD + [FOLDED_BAD[0][0]], "folded")
    assert result.counts() == {"format": "folded", "read": 3, "converted": 2, "reported": 1,
                               "tool_calls": 2, "tool_results": 2}
    assert result.problems[0].startswith("rows[2]: ")
    with pytest.raises(InvalidInput, match="unknown format"):
        convert_rows(FOLDED_GOOD, "openai")
    with pytest.raises(MissingInput):
        convert_file(tmp_path / "nope.jsonl", tmp_path / "out.jsonl", "folded")
