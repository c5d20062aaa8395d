"""lfm_mlx.tools: parsing every call form, malformed reporting, rendering as the chat template does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lfm_mlx.tools import (
    BRACKET,
    JSON_FORM,
    NATIVE,
    ToolCall,
    ToolCallSyntaxError,
    calls_from_openai,
    parse_json_calls,
    parse_pythonic,
    parse_tool_calls,
    render_json,
    render_pythonic,
    render_value,
)

TEMPLATE = Path(__file__).resolve().parents[1] / "lfm_mlx" / "templates" / "lfm2.5.jinja"


def canon(calls: list[ToolCall]) -> str:
    """Type-exact comparison key: json distinguishes True from 1 and 1.0 from 1."""
    return json.dumps([[c.name, c.arguments] for c in calls])


# ---------------------------------------------------------------- pythonic / native form

def test_native_several_calls_nested_values():
    text = '<|tool_call_start|>[a(x="1"), b.c(y=[1, {"k": 2}])]<|tool_call_end|>'
    result = parse_tool_calls(text)
    assert canon(result.calls) == canon([ToolCall("a", {"x": "1"}), ToolCall("b.c", {"y": [1, {"k": 2}]})])
    assert result.formats == [NATIVE, NATIVE]
    assert result.content == "" and result.malformed == []


def test_native_literals_quotes_and_escapes():
    text = (
        "Let me look. <|tool_call_start|>[system-settings.get_display(a=None, b=True, c=False, "
        "d=-1.5e3, e=42, f='it\\'s \"ok\"\\n', g=\"tab\\there\", h={\"x\": null, \"y\": [true, false]}, "
        "i='\\u00e9')]<|tool_call_end|>"
    )
    result = parse_tool_calls(text)
    assert result.content == "Let me look."
    (call,) = result.calls
    assert call.name == "system-settings.get_display"
    assert call.arguments == {
        "a": None, "b": True, "c": False, "d": -1500.0, "e": 42, "f": "it's \"ok\"\n",
        "g": "tab\there", "h": {"x": None, "y": [True, False]}, "i": "é",
    }
    assert type(call.arguments["e"]) is int and type(call.arguments["d"]) is float


def test_native_marker_inside_a_string_argument_does_not_end_the_block():
    text = '<|tool_call_start|>[echo(text="<|tool_call_end|>")]<|tool_call_end|>tail'
    result = parse_tool_calls(text)
    assert canon(result.calls) == canon([ToolCall("echo", {"text": "<|tool_call_end|>"})])
    assert result.content == "tail"


def test_native_block_cut_off_before_the_end_marker_is_recovered_and_noted():
    result = parse_tool_calls("<|tool_call_start|>[terminal(command='ls')]<|im_end|>")
    assert canon(result.calls) == canon([ToolCall("terminal", {"command": "ls"})])
    assert result.malformed == [] and "missing <|tool_call_end|>" in result.repairs[0]


def test_json_inside_native_markers():
    text = '<|tool_call_start|>[{"name": "a", "arguments": {"q": 1}}]<|tool_call_end|>'
    result = parse_tool_calls(text)
    assert canon(result.calls) == canon([ToolCall("a", {"q": 1})]) and result.formats == [NATIVE]


@pytest.mark.parametrize(
    "payload, reason",
    [
        ('[f("positional")]', "keyword argument"),
        ("[f(x=1, x=2)]", "given twice"),
        ("[f(x=foo)]", "bare name 'foo'"),
        ("[f(x=1) junk]", "',' or ']'"),
        ("[f(x='open)]", "unterminated string"),
        ("[f(x={1: 2})]", "quoted dict key"),
        ("[]", "not a call"),
    ],
)
def test_malformed_native_blocks_are_reported_with_the_reason(payload, reason):
    result = parse_tool_calls(f"<|tool_call_start|>{payload}<|tool_call_end|> rest")
    assert result.calls == []
    assert len(result.malformed) == 1 and reason in result.malformed[0], result.malformed
    assert result.content == "rest"


def test_parse_pythonic_rejects_trailing_text_and_never_evaluates():
    with pytest.raises(ToolCallSyntaxError, match="end of the call list"):
        parse_pythonic("[f(x=1)] + [g()]")
    with pytest.raises(ToolCallSyntaxError, match="bare name '__import__'"):
        parse_pythonic("[f(x=__import__('os').getcwd())]")


@pytest.mark.parametrize(
    "text",
    [
        "<|tool_call_start|>[calc_impuesto(año_vehiculo=2024, marca='Seat')]<|tool_call_end|>",
        "[calc_impuesto(año_vehiculo=2024, marca='Seat')]",
        "Voy a llamar [calc_impuesto(año_vehiculo=2024, marca='Seat')] ahora.",
    ],
)
def test_unicode_keyword_names_parse_like_python_identifiers(text):
    # A BFCL live_simple case has `año_vehiculo`; Python accepts it as a keyword, so must we.
    result = parse_tool_calls(text)
    assert result.malformed == []
    assert [(c.name, c.arguments) for c in result.calls] == [("calc_impuesto", {"año_vehiculo": 2024, "marca": "Seat"})]


def test_unicode_function_names_and_render_round_trip():
    calls = [ToolCall("obtener_año", {"país": "España"}), ToolCall("überprüfen.größe", {"n": 1})]
    assert canon(parse_pythonic(render_pythonic(calls, markers=False))) == canon(calls)
    # Without the markers a bracket call named with non-ASCII letters is still found, not skipped as prose.
    result = parse_tool_calls("Llamo a [obtener_año(país='España')] ya.")
    assert [c.name for c in result.calls] == ["obtener_año"] and result.formats == [BRACKET]


@pytest.mark.parametrize(
    "payload",
    ["[f(x²=1)]", "[f(2x=1)]", "[f(x=1), g(año²=2)]", "[f(x=1), ²g(y=2)]"],
)
def test_names_that_are_not_identifiers_are_reported_malformed_not_dropped(payload):
    # `²` is a Unicode word character but not an identifier character; the call is malformed, never silent.
    for text in (f"<|tool_call_start|>{payload}<|tool_call_end|>", f"see {payload} here"):
        result = parse_tool_calls(text)
        assert result.calls == [] and len(result.malformed) == 1, (text, result)


def test_bracket_form_without_markers_in_prose():
    result = parse_tool_calls('I will call [get_weather(city="Paris"), get_time(tz="CET")] now.')
    assert [c.name for c in result.calls] == ["get_weather", "get_time"]
    assert result.formats == [BRACKET, BRACKET]
    assert result.content == "I will call  now."


def test_plain_prose_with_brackets_is_not_a_call():
    text = "Use [links](https://x.org) or {braces}; the user {\"name\": \"Alice\", \"age\": 3} exists."
    result = parse_tool_calls(text)
    assert result.calls == [] and result.malformed == [] and result.content == text


# ---------------------------------------------------------------- JSON forms

@pytest.mark.parametrize(
    "text",
    [
        '{"name": "search", "arguments": {"q": "x"}}',
        '```json\n{"name": "search", "arguments": {"q": "x"}}\n```',
        '<tool_call>{"function": "search", "parameters": {"q": "x"}}</tool_call>',
        '{"type": "function", "function": {"name": "search", "arguments": "{\\"q\\": \\"x\\"}"}}',
        'Calling now: {"name": "search", "parameters": {"q": "x"}} ok',
    ],
)
def test_json_call_forms(text):
    result = parse_tool_calls(text)
    assert canon(result.calls) == canon([ToolCall("search", {"q": "x"})])
    assert result.formats == [JSON_FORM] and result.malformed == []


@pytest.mark.parametrize(
    "text, repair",
    [
        ("{'name': 'search', 'arguments': {'q': 'x'}}", "non-JSON"),
        ('{"name": "search", "arguments": {"q": "x",},}', "non-JSON"),
        ('{"name": "search", "arguments": {"q": "x"}', "missing '}'"),
        ('{name: "search", arguments: {q: "x"}}', "bare key"),
    ],
)
def test_json_repair_pass(text, repair):
    result = parse_tool_calls(text)
    assert canon(result.calls) == canon([ToolCall("search", {"q": "x"})])
    assert any(repair in note for note in result.repairs), result.repairs


def test_json_list_of_calls_and_broken_json_call():
    calls = parse_json_calls('[{"name": "a", "arguments": {}}, {"name": "b", "parameters": {"z": 1}}]')
    assert canon(calls) == canon([ToolCall("a", {}), ToolCall("b", {"z": 1})])
    result = parse_tool_calls('{"name": "broken", "arguments": {"inner": {"name": "x", "arguments": {}}, "q": bare}}')
    assert result.calls == []  # the inner object is not taken for a call
    assert len(result.malformed) == 1 and "bare name 'bare'" in result.malformed[0]
    result = parse_tool_calls('{"name": "s", "arguments": "{not json"}')
    assert result.calls == [] and "not JSON" in result.malformed[0]


def test_calls_from_openai_structured_tool_calls():
    entries = [
        {"id": "1", "type": "function", "function": {"name": "a", "arguments": '{"x": [1, 2]}'}},
        {"type": "function", "function": {"name": "b", "arguments": {"y": None}}},
    ]
    assert canon(calls_from_openai(entries)) == canon([ToolCall("a", {"x": [1, 2]}), ToolCall("b", {"y": None})])
    with pytest.raises(ToolCallSyntaxError, match=r"tool_calls\[0\]"):
        calls_from_openai([{"type": "function"}])


# ---------------------------------------------------------------- rendering

def test_render_matches_the_lfm25_chat_template():
    from transformers.utils.chat_template_utils import render_jinja_template

    calls = [
        ToolCall("browser.navigate", {"url": "https://x.org/?q=it's", "n": 3, "f": 0.5, "b": True, "z": None}),
        ToolCall("write_file", {"text": "a\\b\nc\r", "d": {"k": [1, "é"]}, "l": ["x", {"y": False}]}),
    ]
    messages = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "", "tool_calls": [c.to_openai() for c in calls]},
    ]
    (rendered,), _ = render_jinja_template(
        conversations=[messages], chat_template=TEMPLATE.read_text(), bos_token="<|startoftext|>"
    )
    expected = "<|im_start|>assistant\n" + render_pythonic(calls) + "<|im_end|>\n"
    assert rendered.endswith(expected), rendered
    assert render_value("it's") == "'it\\'s'" and render_value({"a": None}) == '{"a": null}'


# ---------------------------------------------------------------- round trips

_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_\-]{0,8}(\.[A-Za-z_][A-Za-z0-9_]{0,8}){0,2}", fullmatch=True)
_keys = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True)
_scalars = st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
_calls = st.lists(st.builds(ToolCall, _names, st.dictionaries(_keys, _values, max_size=4)), min_size=1, max_size=3)


@settings(max_examples=150, deadline=None)
@given(_calls, st.sampled_from(["", "Sure. ", "text\n"]))
def test_pythonic_round_trip(calls, prefix):
    result = parse_tool_calls(prefix + render_pythonic(calls))
    assert canon(result.calls) == canon(calls)
    assert result.formats == [NATIVE] * len(calls) and result.malformed == []
    assert result.content == prefix.strip()
    bare = parse_tool_calls("ok " + render_pythonic(calls, markers=False))
    assert canon(bare.calls) == canon(calls) and bare.formats == [BRACKET] * len(calls)


@settings(max_examples=150, deadline=None)
@given(_calls, st.booleans())
def test_json_round_trip(calls, fenced):
    text = render_json(calls)
    if fenced:
        text = "```json\n" + text + "\n```"
    result = parse_tool_calls(text)
    assert canon(result.calls) == canon(calls)
    assert result.formats == [JSON_FORM] * len(calls) and result.malformed == [] and result.content == ""


def test_fenced_json_whose_string_holds_a_fence():
    text = 'Here:\n```json\n{"name": "write_file", "arguments": {"text": "```py\\nx\\n```"}}\n```\nDone.'
    result = parse_tool_calls(text)
    assert canon(result.calls) == canon([ToolCall("write_file", {"text": "```py\nx\n```"})])
    assert result.content == "Here:\n\nDone."
