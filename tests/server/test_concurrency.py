"""Concurrent streams are interleaved and each gets its own correct text; disconnects cancel work."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from server_support import API_KEY, LONG, wait_for

N_STREAMS = 16


def requests() -> list[dict]:
    out = []
    for i in range(N_STREAMS):
        sampling = {"temperature": 0} if i % 2 == 0 else {"temperature": 1.0, "seed": 100 + i}
        out.append({"model": "tiny", "prompt": f"value_{i} = {i} * ", "max_tokens": 12, **sampling})
    return out


async def stream_all(base_url: str, bodies: list[dict]) -> list[tuple[str, list[str], float, float]]:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)

    async def one(body: dict):
        text, finishes, first, last = [], [], None, None
        async for chunk in await client.completions.create(stream=True, **body):
            now = time.monotonic()
            first = first or now
            last = now
            for c in chunk.choices:
                text.append(c.text)
                if c.finish_reason:
                    finishes.append(c.finish_reason)
        return "".join(text), finishes, first, last

    try:
        return await asyncio.gather(*(one(b) for b in bodies))
    finally:
        await client.close()


def test_16_concurrent_streams(server, client):
    bodies = requests()
    expected = [client.completions.create(**b).choices[0].text for b in bodies]
    results = asyncio.run(stream_all(server.base_url, bodies))
    for i, (text, finishes, _, _) in enumerate(results):
        assert text == expected[i], i
        assert len(finishes) == 1, i
    # the worker interleaves: several streams are producing at the same time
    spans = [(first, last) for _, _, first, last in results]
    overlapping = max(sum(1 for start, end in spans if start <= t <= end) for t, _ in spans)
    assert overlapping >= 2
    assert server.metric("adasd_num_requests_running") == 0





def test_stream_disconnect_cancels_the_generation(server):
    cancelled = server.metric("adasd_requests_total", status="cancelled")
    success = server.metric("adasd_requests_total", status="success")
    with server.http() as http, http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    # closed after the first event: the worker stops it within a round and frees its slot
    assert wait_for(
        lambda: server.metric("adasd_requests_total", status="cancelled") == cancelled + 1), server.log_tail()
    assert wait_for(lambda: server.metric("adasd_num_requests_running") == 0), server.log_tail()
    assert server.metric("adasd_requests_total", status="success") == success
    assert server.ready()[0] == 200


def test_non_stream_disconnect_cancels_the_generation(server):
    cancelled = server.metric("adasd_requests_total", status="cancelled")
    body = {**LONG, "n": 4}  # at least 2.4 s: far longer than the client waits
    with server.http(timeout=0.5) as http, pytest.raises(httpx.TimeoutException):
        http.post("/v1/completions", json=body)
    assert wait_for(
        lambda: server.metric("adasd_requests_total", status="cancelled") == cancelled + 4), server.log_tail()
    assert wait_for(lambda: server.metric("adasd_num_requests_running") == 0), server.log_tail()
