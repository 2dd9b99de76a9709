"""Structured outputs through the official openai client: parse() with pydantic models, raw
json_schema streamed and not, json_object, vLLM's guided_* fields, forced tool calls, logit_bias,
and greedy speculation equal to `ar` under the same schema."""

from __future__ import annotations

import json
import re
from typing import Annotated, Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

MESSAGES = [{"role": "user", "content": "Describe a person as JSON."}]


class Person(BaseModel):
    name: str = Field(max_length=16)
    age: int = Field(ge=0, le=120)
    role: Literal["engineer", "artist", "doctor"]
    tags: list[Annotated[str, Field(max_length=8)]] = Field(max_length=3)


SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12}, "population": {"type": "integer", "minimum": 0, "maximum": 99999},
    "capital": {"type": "boolean"}}, "required": ["city", "population", "capital"], "additionalProperties": False}
RAW = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}


def test_parse_with_a_pydantic_model(client):
    for method in ("adasd", "ar"):
        out = client.chat.completions.parse(model="tiny", messages=MESSAGES, response_format=Person,
                                            temperature=0, extra_body={"adasd": {"method": method}})
        person = out.choices[0].message.parsed
        assert isinstance(person, Person) and out.choices[0].finish_reason == "stop", out.choices[0]


def test_raw_json_schema_streamed_and_not(client):
    body = dict(model="tiny", messages=MESSAGES, response_format=RAW, temperature=0)
    whole = client.chat.completions.create(**body)
    text = whole.choices[0].message.content
    jsonschema.validate(json.loads(text), SCHEMA)
    chunks = list(client.chat.completions.create(**body, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


def test_sampled_json_schema_validates(client):
    for seed in range(3):
        out = client.chat.completions.create(model="tiny", messages=MESSAGES, response_format=RAW,
                                             temperature=1.0, seed=seed)
        jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMA)


def test_completions_take_response_format_too(client):
    out = client.completions.create(model="tiny", prompt="city = ", max_tokens=120, temperature=0,
                                    extra_body={"response_format": RAW})
    assert out.choices[0].finish_reason == "stop", (out.choices[0].text, out.usage)
    jsonschema.validate(json.loads(out.choices[0].text), SCHEMA)


def test_json_object(client):
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, response_format={"type": "json_object"},
                                         temperature=0)
    choice = out.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:  # cut short: still the beginning of an object
        assert choice.finish_reason == "length" and choice.message.content.startswith("{")


def test_guided_fields(client):
    out = client.completions.create(model="tiny", prompt="Pick one:", max_tokens=10, temperature=0,
                                    extra_body={"guided_choice": ["yes", "no", "maybe"]})
    assert out.choices[0].text in ("yes", "no", "maybe") and out.choices[0].finish_reason == "stop"
    out = client.completions.create(model="tiny", prompt="Phone:", max_tokens=20, temperature=0.8, seed=3,
                                    extra_body={"guided_regex": r"\d{3}-\d{4}"})
    assert re.fullmatch(r"\d{3}-\d{4}", out.choices[0].text)


def test_greedy_speculation_equals_ar_under_the_schema(client):
    """Fixed-K methods always draft; adasd's plan may rightly choose plain rounds on this tiny pair
    (its draft step costs about what the target's does), so only its tokens are compared."""
    texts = {}
    for name, method, k in (("ar", "ar", 5), ("vanilla", "vanilla", 5), ("vanilla-2", "vanilla", 2),
                            ("verify-only", "verify-only", 3), ("adasd", "adasd", 5)):
        out = client.chat.completions.create(model="tiny", messages=MESSAGES, response_format=RAW, temperature=0,
                                             extra_body={"adasd": {"method": method, "k": k, "verification": "none"}})
        texts[name] = out.choices[0].message.content
        if method in ("vanilla", "verify-only"):
            assert out.usage.speculative["drafted_tokens"] > 0
    assert len(set(texts.values())) == 1, texts


def test_forced_tokens_are_their_own_source(client):
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, response_format=RAW,
                                         temperature=0, extra_body={"adasd": {"token_sources": True}})
    sources = [s["source"] for s in out.choices[0].model_extra["adasd"]["token_sources"]]
    assert sources[0] == "forced"  # '{"' cannot be anything else  # noqa: ERA001
    assert out.usage.speculative["forced_tokens"] == sources.count("forced") > 0


def test_logit_bias_keeps_a_token_out(client):
    body = dict(model="tiny", prompt="def add(a, b):", max_tokens=24, temperature=0,
                extra_body={"ignore_eos": True, "adasd": {"token_sources": True}})
    free = client.completions.create(**body)
    ids = [s["token_id"] for s in free.choices[0].model_extra["adasd"]["token_sources"]]
    banned = max(set(ids), key=ids.count)
    out = client.completions.create(**body, logit_bias={str(banned): -100})
    kept = [s["token_id"] for s in out.choices[0].model_extra["adasd"]["token_sources"]]
    assert banned not in kept and len(kept) == 24


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.mark.parametrize("tool_choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"],
                         ids=["named", "required"])
def test_forced_tool_calls_streamed_and_not(client, tool_choice):
    body = dict(model="tiny", messages=ASK, tools=[WEATHER, TIME], tool_choice=tool_choice,
                temperature=0)
    out = client.chat.completions.create(**body)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call-")
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    if tool_choice != "required":
        assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), schema[call.function.name])

    name, arguments, finishes = None, "", []
    for chunk in client.chat.completions.create(**body, stream=True):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for tc in delta.tool_calls or []:
            name = tc.function.name or name
            arguments += tc.function.arguments or ""
        finishes += [chunk.choices[0].finish_reason] if chunk.choices[0].finish_reason else []
    assert (name, json.loads(arguments)) == (call.function.name, json.loads(call.function.arguments))
    assert finishes == ["tool_calls"]


def test_parse_a_pydantic_tool(client):
    import openai

    class Lookup(BaseModel):
        word: str = Field(max_length=10)
        language: Literal["en", "fr"]

    tool = openai.pydantic_function_tool(Lookup)
    out = client.chat.completions.parse(model="tiny", messages=ASK, tools=[tool], temperature=0,
                                        tool_choice={"type": "function", "function": {"name": "Lookup"}})
    assert isinstance(out.choices[0].message.tool_calls[0].function.parsed_arguments, Lookup)


BAD = {
    "bad-schema-type": ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "strin"}}}}, "response_format.json_schema.schema"),
    "unsupported-keyword": ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "not": {"type": "string"}}, "strict": True}}}, "response_format.json_schema.schema"),
    "schema-missing": ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
                       "response_format.json_schema"),
    "unknown-format-type": ({"response_format": {"type": "yaml"}}, "response_format.type"),
    "bad-regex": ({"guided_regex": "(["}, "guided_regex"),
    "empty-choice": ({"guided_choice": []}, "guided_choice"),
    "two-constraints": ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice"),
    "auto-tools": ({"tools": [WEATHER]}, "tool_choice"),
    "tool-without-parameters": ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"},
                                "tools.0.function.parameters"),
    "unknown-named-tool": ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                           "tool_choice.function.name"),
    "logit-bias-not-an-id": ({"logit_bias": {"x": 1}}, "logit_bias"),
    "logit-bias-out-of-vocab": ({"logit_bias": {"9999999": 1}}, "logit_bias"),
    "presence-out-of-range": ({"presence_penalty": 3}, "presence_penalty"),
}


@pytest.mark.parametrize("extra, param", list(BAD.values()), ids=list(BAD))
def test_bad_structured_requests_are_400s(server, extra, param):
    with server.http() as http:
        r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": ASK, "max_tokens": 5, **extra})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and err["type"] == "invalid_request_error", err
        ok = http.post("/v1/chat/completions", json={"model": "tiny", "messages": ASK, "max_tokens": 2})
        assert ok.status_code == 200
