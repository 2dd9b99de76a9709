"""The `adasd.token_sources` option over HTTP: every streamed chunk and non-streamed choice says
where its tokens came from; with the option off the responses are the OpenAI shape exactly; the
official openai client reads both."""

from __future__ import annotations

import json
from collections import Counter

import pytest

SOURCES = {"standard", "relaxed", "correction", "bonus", "ar"}
ON = {"adasd": {"token_sources": True, "method": "adasd", "verification": "threshold"}, "ignore_eos": True}


def check_sources(adasd: dict, text: str, usage) -> Counter:
    """A choice's (or a whole stream's) token sources against its text and usage."""
    tokens, rounds = adasd["token_sources"], adasd["rounds"]
    assert len(tokens) == usage.completion_tokens
    assert "".join(t["text"] for t in tokens) == text
    assert [r["round"] for r in rounds] == list(range(1, len(rounds) + 1))
    assert [t["round"] for t in tokens] == sorted(t["round"] for t in tokens) and tokens[-1]["round"] == len(rounds)
    for t in tokens:
        assert t["source"] in SOURCES and isinstance(t["token_id"], int)
        assert (t["entropy"] is not None) == (t["source"] in ("standard", "relaxed", "correction"))
        assert (t["rejected"] is not None) == (t["source"] == "correction")
    counts = Counter(t["source"] for t in tokens)
    spec = usage.speculative
    assert counts["standard"] == spec["accepted_standard"] and counts["relaxed"] == spec["accepted_relaxed"]
    assert counts["bonus"] == spec["bonus_tokens"] and len(rounds) == spec["rounds"]
    assert sum(r["drafted"] for r in rounds) == spec["drafted_tokens"]
    assert rounds[-1]["estimated_speedup"] == pytest.approx(spec["estimated_speedup"], abs=1e-3)
    return counts


def merged(parts: list[dict]) -> dict:
    return {"token_sources": [t for p in parts for t in p["token_sources"]],
            "rounds": [r for p in parts for r in p["rounds"]]}


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_openai_client_reads_token_sources_streamed_and_not(client, endpoint):
    if endpoint == "completions":
        create, kw = client.completions.create, dict(prompt="def area(r):\n")
    else:
        create, kw = client.chat.completions.create, dict(messages=[{"role": "user", "content": "def area(r):"}])
    kw.update(model="tiny", max_tokens=24, temperature=0, extra_body=ON)
    full = create(**kw)
    choice = full.choices[0]
    text = choice.text if endpoint == "completions" else choice.message.content
    check_sources(choice.adasd, text, full.usage)

    pieces, parts, usage = [], [], None
    for chunk in create(stream=True, stream_options={"include_usage": True}, **kw):
        usage = chunk.usage or usage
        for c in chunk.choices:
            pieces.append(c.text if endpoint == "completions" else (c.delta.content or ""))
            if c.model_extra.get("adasd"):
                parts.append(c.adasd)
    assert parts and all(len(p["rounds"]) == 1 for p in parts)  # one round per chunk
    check_sources(merged(parts), "".join(pieces), usage)


def test_sources_with_n_and_several_prompts_stay_with_their_choice(client):
    r = client.completions.create(model="tiny", prompt=["x = ", "import "], n=2, max_tokens=10, temperature=1.0, seed=4,
                                  extra_body=ON)
    assert len(r.choices) == 4
    for c in r.choices:
        assert len(c.adasd["token_sources"]) == 10  # ignore_eos: every choice generates max_tokens
        assert "".join(t["text"] for t in c.adasd["token_sources"]) == c.text


def test_off_by_default_responses_keep_the_openai_shape(server):
    body = {"model": "tiny", "prompt": "a = ", "max_tokens": 6, "temperature": 0}
    with server.http() as http:
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200 and set(r.json()["choices"][0]) == {"index", "text", "logprobs", "finish_reason"}
        off = http.post("/v1/completions", json={**body, "adasd": {"token_sources": False}})
        assert "adasd" not in off.json()["choices"][0]
        chat = http.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 4,
                                                         "messages": [{"role": "user", "content": "hi"}]})
        assert set(chat.json()["choices"][0]) == {"index", "message", "logprobs", "finish_reason"}
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
            chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert chunks and all("adasd" not in c for ch in chunks for c in ch["choices"])


def test_a_bad_option_is_a_400_naming_it(server):
    with server.http() as http:
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": "a", "adasd": {"token_sources": [1]}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "adasd.token_sources"
