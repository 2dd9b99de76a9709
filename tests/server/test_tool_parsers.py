"""The tool-call parsers of tool_choice "auto" on strings (no server): hermes and llama3_json, one
call, several, content before, malformed output as content, the template detection, and a stream
split at every position giving what the whole output gives."""

from __future__ import annotations

import json

import pytest

from adasd_core.errors import InvalidRequestError
from server.protocol import ChatCompletionRequest
from server.structured import AutoTools, ToolMode, tool_mode
from server.tool_parsers import HermesParser, Llama3JsonParser, ToolStream, auto_parser, detect, parse

HERMES, LLAMA = HermesParser(), Llama3JsonParser()
WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
TIME = '{"name": "get_time", "arguments": {"zone": "CET"}}'


def calls(parser, text, parallel=True):
    content, found = parse(parser, text, parallel)
    return content, [(c.name, json.loads(c.arguments)) for c in found]


PARIS = ("get_weather", {"city": "Paris", "unit": "celsius"})
CET = ("get_time", {"zone": "CET"})

HERMES_CASES = {
    "one": (f"<tool_call>\n{WEATHER}\n</tool_call>", (None, [PARIS])),
    "several": (f"<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n{TIME}\n</tool_call>", (None, [PARIS, CET])),
    "content-before": (f"Let me look.\n<tool_call>\n{WEATHER}\n</tool_call>", ("Let me look.\n", [PARIS])),
    "unclosed-last": (f"<tool_call>\n{WEATHER}\n", (None, [PARIS])),  # EOS right after the JSON
    "arguments-as-text": ('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>',
                          (None, [("f", {"x": 1})])),
    "no-arguments": ('<tool_call>{"name": "f"}</tool_call>', (None, [("f", {})])),
    "plain": ("The weather is fine.", ("The weather is fine.", [])),
    "malformed-json": ('Sure <tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>',
                       ('Sure <tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>', [])),
    "cut-short": (f"<tool_call>\n{WEATHER[:30]}", (f"<tool_call>\n{WEATHER[:30]}", [])),
    "no-name": ('<tool_call>{"arguments": {}}</tool_call>', ('<tool_call>{"arguments": {}}</tool_call>', [])),
    "one-bad-of-two": (f"<tool_call>{WEATHER}</tool_call><tool_call>[1]</tool_call>",
                       (f"<tool_call>{WEATHER}</tool_call><tool_call>[1]</tool_call>", [])),
}


@pytest.mark.parametrize("text, expected", list(HERMES_CASES.values()), ids=list(HERMES_CASES))
def test_hermes(text, expected):
    assert calls(HERMES, text) == expected


LLAMA_ONE = '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}'
LLAMA_CASES = {
    "one": (LLAMA_ONE, (None, [PARIS])),
    "python-tag": ("<|python_tag|>" + LLAMA_ONE, (None, [PARIS])),
    "several": (LLAMA_ONE + '; {"name": "get_time", "parameters": {"zone": "CET"}}', (None, [PARIS, CET])),
    "semicolon-in-a-string": ('{"name": "f", "parameters": {"q": "a; b"}}', (None, [("f", {"q": "a; b"})])),
    "arguments-key": ('{"name": "f", "arguments": {"x": 1}}', (None, [("f", {"x": 1})])),
    "plain": ("Paris is sunny.", ("Paris is sunny.", [])),
    "json-not-a-call": ('{"city": "Paris"}', ('{"city": "Paris"}', [])),
    "malformed": ('{"name": "f", "parameters": {', ('{"name": "f", "parameters": {', [])),
    "text-after": (LLAMA_ONE + " and more", (LLAMA_ONE + " and more", [])),
    "content-first": ("Sure: " + LLAMA_ONE, ("Sure: " + LLAMA_ONE, [])),  # a call is the whole output
}


@pytest.mark.parametrize("text, expected", list(LLAMA_CASES.values()), ids=list(LLAMA_CASES))
def test_llama3_json(text, expected):
    assert calls(LLAMA, text) == expected


def test_parallel_false_keeps_the_first_call():
    assert calls(HERMES, HERMES_CASES["several"][0], parallel=False) == (None, [PARIS])
    assert calls(LLAMA, LLAMA_CASES["several"][0], parallel=False) == (None, [PARIS])


def streamed(parser, pieces):
    stream = ToolStream(parser)
    content = "".join(stream.feed(p) for p in pieces)
    tail, found = stream.finish()
    return content + tail, [(c.name, json.loads(c.arguments)) for c in found]


@pytest.mark.parametrize("parser, cases", [(HERMES, HERMES_CASES), (LLAMA, LLAMA_CASES)], ids=["hermes", "llama3"])
def test_split_at_every_position_gives_the_whole(parser, cases):
    for name, (text, (content, found)) in cases.items():
        for cut in range(len(text) + 1):
            assert streamed(parser, [text[:cut], text[cut:]]) == (content or "", found), (name, cut)
        assert streamed(parser, list(text)) == (content or "", found), name  # one character at a time


def test_stream_holds_back_what_may_start_a_call():
    stream = ToolStream(HERMES)
    assert stream.feed("Let me") == "Let me"
    assert stream.feed(" look <tool") == " look "  # "<tool" may be the marker
    assert stream.feed("_call>") == ""
    assert stream.feed(WEATHER + "</tool_call>") == ""
    assert stream.finish()[0] == "" and [c.name for c in stream.finish()[1]] == ["get_weather"]
    stream = ToolStream(HERMES)
    assert stream.feed("a <to") == "a " and stream.feed("day") == "<today"  # not the marker after all
    stream = ToolStream(LLAMA)
    assert stream.feed(" ") == "" and stream.feed('{"na') == ""  # a leading "{" may be a call
    stream = ToolStream(LLAMA)
    assert stream.feed("Paris") == "Paris" and stream.feed(" {") == " {"  # content: a call is the whole output


QWEN_LIKE = "{%- if tools %}<tools>{{ tools }}</tools> ... <tool_call>\n{\"name\": ...}\n</tool_call>{%- endif %}"
LLAMA_LIKE = ('{%- if tools %}{{- "Given the following functions, please respond with a JSON for a function call " }}'
              '{%- endif %}{{- "<|python_tag|>" }}')


def test_template_detection():
    assert detect(QWEN_LIKE) == "hermes" and detect(LLAMA_LIKE) == "llama3_json"
    assert detect("{% for m in messages %}{{ m.content }}{% endfor %}") is None
    assert isinstance(auto_parser("auto", QWEN_LIKE), HermesParser)
    assert isinstance(auto_parser("auto", {"default": "x", "tool_use": LLAMA_LIKE}), Llama3JsonParser)
    assert isinstance(auto_parser("hermes", LLAMA_LIKE), HermesParser)  # the setting wins
    for setting, template, why in [("auto", "{{ messages }}", "has no tools"), ("none", QWEN_LIKE, "tool_parser none"),
                                   ("auto", "{% if tools %}{{ tools }}{% endif %}", "no tool-call parser matches"),
                                   ("hermes", None, "has no tools")]:
        with pytest.raises(InvalidRequestError) as err:
            auto_parser(setting, template)
        assert why in err.value.message and err.value.param == "tool_choice", err.value.message
        assert '"required"' in err.value.message


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def request(**fields):
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], tools=[TOOL], **fields)


def test_tool_mode_choices():
    for choice in (None, "auto"):
        mode = tool_mode(request(tool_choice=choice), QWEN_LIKE)
        assert isinstance(mode, AutoTools) and mode.parallel and mode.tools == [TOOL]
    assert tool_mode(request(tool_choice="auto", parallel_tool_calls=False), QWEN_LIKE).parallel is False
    assert tool_mode(request(tool_choice="none"), QWEN_LIKE) is None
    assert isinstance(tool_mode(request(tool_choice="required"), QWEN_LIKE), ToolMode)  # still constrained
    with pytest.raises(InvalidRequestError, match="chat template has no tools"):
        tool_mode(request(), "{{ messages }}")
