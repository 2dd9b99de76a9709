"""Raw SSE framing, read with httpx: `data: {json}\\n\\n` events, finish_reason once per choice, [DONE] last."""

from __future__ import annotations

import json

import pytest


def events(raw: str) -> list[str]:
    assert raw.endswith("data: [DONE]\n\n"), raw[-200:]
    assert "\r" not in raw
    parts = raw.split("\n\n")
    assert parts[-1] == ""
    for p in parts[:-1]:
        assert p.startswith("data: ") and "\n" not in p, repr(p)
    return [p.removeprefix("data: ") for p in parts[:-1]]


def post_stream(server, path: str, body: dict) -> str:
    with server.http() as http, http.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        return r.read().decode()


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_sse_framing(server, endpoint):
    common = {"model": "tiny", "max_tokens": 6, "temperature": 1.0, "seed": 2, "n": 2, "stream": True,
              "stream_options": {"include_usage": True}}
    if endpoint == "completions":
        path, body, obj = "/v1/completions", {"prompt": ["a = 1\n", "import sys\n"], **common}, "text_completion"
        n_choices = 4
    else:
        path, obj = "/v1/chat/completions", "chat.completion.chunk"
        body = {"messages": [{"role": "user", "content": "hi"}], **common}
        n_choices = 2
    data = events(post_stream(server, path, body))
    assert data[-1] == "[DONE]" and data.count("[DONE]") == 1
    chunks = [json.loads(d) for d in data[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == obj and c["model"] == "tiny" for c in chunks)
    finishes: dict[int, int] = {}
    for c in chunks[:-1]:
        assert "usage" not in c
        for choice in c["choices"]:
            if choice["finish_reason"] is not None:
                finishes[choice["index"]] = finishes.get(choice["index"], 0) + 1
    assert finishes == {i: 1 for i in range(n_choices)}
    last = chunks[-1]  # the usage chunk comes after every finish_reason, right before [DONE]
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == last["usage"]["speculative"]["generated_tokens"]


def test_stream_without_usage_has_no_usage_chunk(server):
    data = events(post_stream(server, "/v1/completions", {"prompt": "x", "max_tokens": 3, "stream": True}))
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["choices"] and "usage" not in c for c in chunks)
