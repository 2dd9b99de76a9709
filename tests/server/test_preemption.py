"""A burst larger than the KV pool: the newest requests are preempted and recomputed, every request completes
with the text it gets alone, and none gets an error."""

from __future__ import annotations

import asyncio

import httpx
from server_support import API_KEY


def test_a_burst_larger_than_the_pool_completes_without_errors(start_server):
    # one full-length sequence of the test pair (128 + 22 positions) takes 10 blocks: 12 hold one and a bit
    srv = start_server(api_key=API_KEY, kv_blocks=12, max_running=8, warm_epoch_rounds=10**9)
    bodies = [{"model": "tiny", "prompt": f"value_{i} = {i} * ", "max_tokens": 100, "temperature": 0,
               "ignore_eos": True} for i in range(8)]

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=srv.base_url, headers=srv.headers, timeout=600) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))

    together = asyncio.run(burst())
    assert [r.status_code for r in together] == [200] * len(bodies)
    assert srv.metric("adasd_num_preemptions_total") > 0
    with srv.http(timeout=600) as client:
        alone = [client.post("/v1/completions", json=b).json() for b in bodies]
    for t, a in zip(together, alone):
        body = t.json()
        assert body["usage"]["completion_tokens"] == 100 and body["choices"][0]["text"] == a["choices"][0]["text"]
    assert srv.metric("adasd_kv_blocks_used") == 0
