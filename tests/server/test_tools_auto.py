"""tool_choice "auto" through a real server and the official openai client, on a copy of the tiny pair
whose chat template renders tools in the Hermes way: the tools reach the template, calls in earlier
turns reach it as HF templates read them, and the output is parsed into tool_calls, streamed and not.

The tiny model does not write <tool_call> by itself: a guided_regex (which "auto" leaves to the
request) makes the real engine emit the call's text, so that everything after the model (the
detokenized pieces, the parser, the wire format, the client's parsing) is the real path."""

from __future__ import annotations

import json
import shutil

import pytest
from server_support import API_KEY

from adasd_core.model_files import TINY_DIR

HERMES_TEMPLATE = """\
{%- if tools %}<|system|>
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Call a function as <tool_call>
{"name": <name>, "arguments": <object>}
</tool_call>
{% endif %}
{%- for message in messages %}
{%- if message.role == "tool" %}<|user|>
<tool_response>
{{ message.content }}
</tool_response>
{% else %}<|{{ message.role }}|>
{{ message.content }}
{%- for call in message.tool_calls or [] %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|assistant|>
{% endif %}"""

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}}}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "Weather and time in Paris?"}]
CONTENT = "Let me check.\n"
CALLS = [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
OUTPUT = CONTENT + "".join(f'<tool_call>\n{{"name": "{n}", "arguments": {json.dumps(a)}}}\n</tool_call>\n'
                           for n, a in CALLS)


def literal(text: str) -> str:
    """A regex matching exactly `text` (llguidance's syntax: no escaped newline)."""
    return "".join("\\n" if c == "\n" else "\\" + c if c in "\\.+*?()|[]{}^$" else c for c in text)


@pytest.fixture(scope="module")
def tools_server(start_server, tmp_path_factory):
    pair = tmp_path_factory.mktemp("hermes_pair")
    for role in ("target", "draft"):
        shutil.copytree(TINY_DIR / role, pair / role)
        (pair / role / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    srv = start_server(api_key=API_KEY, pair=pair, round_delay_s=0.0, warm_epoch_rounds=10**9)
    with srv.http() as http:
        assert http.get("/tokenizer_info").json()["chat_template"] == HERMES_TEMPLATE  # the copy's, not the pair's
    return srv


@pytest.fixture(scope="module")
def tools_client(tools_server):
    import openai

    with openai.OpenAI(base_url=tools_server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120) as c:
        yield c


def rendered(srv, body: dict) -> tuple[str, int]:
    """The chat template's text of `body` ({"messages", "tools"}) and its token count."""
    with srv.http() as http:
        ids = http.post("/tokenize", json=body).json()["tokens"]
        return http.post("/detokenize", json={"tokens": ids}).json()["prompt"], len(ids)


def named(calls) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in calls]


def test_the_tools_and_earlier_calls_reach_the_template(tools_server):
    text, n = rendered(tools_server, {"messages": ASK, "tools": TOOLS})
    assert "<tools>" in text and json.dumps(WEATHER["function"]["parameters"]) in text and '"get_time"' in text
    assert "<tools>" not in rendered(tools_server, {"messages": ASK})[0]
    turn = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call-1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call-1", "content": "18 C"}]
    text, _ = rendered(tools_server, {"messages": turn, "tools": TOOLS})
    # arguments as an object (the template's tojson of a string would quote it), the result as the tool's turn
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text, text
    assert "<tool_response>\n18 C\n</tool_response>" in text


def test_auto_returns_tool_calls(tools_server, tools_client):
    body = dict(model="tiny", messages=ASK, tools=TOOLS, temperature=0, max_tokens=300,
                extra_body={"guided_regex": literal(OUTPUT)})
    for choice in ("auto", None):  # no tool_choice with tools: "auto", as OpenAI
        out = tools_client.chat.completions.create(**body, **({"tool_choice": choice} if choice else {}))
        message = out.choices[0].message
        assert out.choices[0].finish_reason == "tool_calls" and message.content == CONTENT, out.choices[0]
        assert named(message.tool_calls) == CALLS
        assert all(c.type == "function" and c.id.startswith("call-") for c in message.tool_calls)
        assert len({c.id for c in message.tool_calls}) == 2
        # the prompt was the template's rendering with the tools
        assert out.usage.prompt_tokens == rendered(tools_server, {"messages": ASK, "tools": TOOLS})[1]

    # the next turn: the client's own message object and the tool's answers go back in
    results = [{"role": "tool", "tool_call_id": c.id, "content": "ok"} for c in message.tool_calls]
    turn = ASK + [message.model_dump(exclude_none=True)] + results
    again = tools_client.chat.completions.create(model="tiny", messages=turn, tools=TOOLS, max_tokens=3)
    assert again.usage.prompt_tokens == rendered(tools_server, {"messages": turn, "tools": TOOLS})[1]

    one = tools_client.chat.completions.create(**body, parallel_tool_calls=False)
    assert named(one.choices[0].message.tool_calls) == CALLS[:1] and one.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("parallel", [True, False])
def test_auto_streams_tool_calls(tools_client, parallel):
    body = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice="auto", temperature=0, max_tokens=300,
                parallel_tool_calls=parallel, extra_body={"guided_regex": literal(OUTPUT)})
    content, calls, finishes = "", {}, []
    for chunk in tools_client.chat.completions.create(**body, stream=True):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            if tc.index not in calls:  # a call's first delta names it
                assert tc.id and tc.type == "function" and tc.function.name, tc
                calls[tc.index] = [tc.function.name, ""]
            calls[tc.index][1] += tc.function.arguments or ""
        finishes += [chunk.choices[0].finish_reason] if chunk.choices[0].finish_reason else []
    expected = CALLS if parallel else CALLS[:1]
    assert content == CONTENT and finishes == ["tool_calls"]
    assert [(n, json.loads(a)) for _, (n, a) in sorted(calls.items())] == expected

    # the client's stream helper accumulates the same message
    with tools_client.chat.completions.stream(**body) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.content == CONTENT and named(final.choices[0].message.tool_calls) == expected


def test_auto_without_a_call_is_content(tools_client):
    text = "Paris is mild <today>."  # "<" might have started a call: held, then sent as content
    body = dict(model="tiny", messages=ASK, tools=TOOLS, temperature=0, max_tokens=100,
                extra_body={"guided_regex": literal(text)})
    out = tools_client.chat.completions.create(**body)
    choice = out.choices[0]
    assert (choice.message.content, choice.message.tool_calls, choice.finish_reason) == (text, None, "stop")
    chunks = list(tools_client.chat.completions.create(**body, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert not any(c.choices[0].delta.tool_calls for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]


def test_a_cut_call_is_content(tools_client):
    out = tools_client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, temperature=0, max_tokens=12,
                                               extra_body={"guided_regex": literal(OUTPUT)})
    choice = out.choices[0]
    assert choice.finish_reason == "length" and choice.message.tool_calls is None
    assert OUTPUT.startswith(choice.message.content)


def test_auto_on_a_template_without_tools_is_a_400(server):
    with server.http() as http:
        for extra in ({"tool_choice": "auto"}, {}):
            r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": ASK, "tools": TOOLS, **extra})
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["param"] == "tool_choice" and err["type"] == "invalid_request_error"
            assert "chat template has no tools" in err["message"] and 'tool_choice "required"' in err["message"]
