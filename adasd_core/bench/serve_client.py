"""The HTTP client of `adasd bench-serve`: streamed OpenAI /v1/completions requests, timed chunk by chunk.

Per request, times from sending it:
- TTFT: until the first chunk with text.
- chunk times: when each chunk with text arrived (a speculative server sends several tokens per chunk).
- inter-token latency (ITL): (latency - TTFT) / (tokens - 1), the mean gap between tokens after the
  first (vLLM's TPOT). The gaps between chunks (and the longest, a stall) are kept as well.
- tokens: usage.completion_tokens from the stream; when the server sends no usage, the completion
  re-tokenized with a local tokenizer, or failing that the number of chunks (marked per request).

Two ways to send a batch of requests: `run_closed` keeps `concurrency` requests in flight (a new one
starts when one ends); `run_open` starts each request at a given time, whether or not others are
still streaming (arrivals while others stream).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field


@dataclass
class Endpoint:
    """One OpenAI-compatible server. `extension`: it takes adasd's request extension (`adasd.method`)."""

    name: str
    base_url: str
    model: str | None = None  # None: the first id /v1/models lists
    api_key: str | None = None
    extension: bool = True
    timeout_s: float = 600.0
    ready_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        self.base_url = normalise_url(self.base_url)


def normalise_url(url: str) -> str:
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


@dataclass
class RequestResult:
    index: int
    ok: bool
    tokens: int = 0
    token_source: str = "usage"  # "usage" | "tokenizer" | "chunks"
    sent_at: float = 0.0  # perf_counter when the request was sent
    ttft_s: float | None = None
    latency_s: float | None = None
    chunks: int = 0
    chunk_times_s: list[float] = field(default_factory=list)  # arrival of each chunk with text, from sent_at
    finish_reason: str | None = None
    error: str | None = None
    text: str = ""
    speculative: dict | None = None  # usage.speculative (adasd's statistics), when the server sends it

    @property
    def chunk_gaps_s(self) -> list[float]:
        t = self.chunk_times_s
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def itl_s(self) -> float | None:
        if self.ttft_s is None or self.latency_s is None or self.tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.tokens - 1)

    @property
    def tokens_per_s(self) -> float | None:
        """This request's own rate, TTFT included: what one client sees."""
        return self.tokens / self.latency_s if self.ok and self.latency_s else None


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def wait_until_ready(server, poll_s: float = 2.0) -> None:
    """Poll GET /ready (adasd's readiness probe) while it answers 503; a server without the
    endpoint (404) counts as ready. An unreachable server raises at once. `server`: anything with
    base_url, api_key and ready_timeout_s (an Endpoint or a ServeBenchConfig)."""
    import httpx

    base = normalise_url(server.base_url)
    deadline = time.monotonic() + server.ready_timeout_s
    while True:
        r = httpx.get(f"{base}/ready", headers=headers(server.api_key), timeout=30)
        if r.status_code != 503:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{base} was not ready after {server.ready_timeout_s:g} s: {r.text[:200]}")
        time.sleep(poll_s)


def server_model(server) -> str:
    import httpx

    base = normalise_url(server.base_url)
    r = httpx.get(f"{base}/v1/models", headers=headers(server.api_key), timeout=30)
    r.raise_for_status()
    data = r.json().get("data") or []
    if not data:
        raise RuntimeError(f"{base}/v1/models lists no model")
    return data[0]["id"]


async def stream_one(client, body: dict, index: int, count_tokens=None) -> RequestResult:
    """One streamed completion; never raises (failures come back as ok=False)."""
    import httpx

    t0 = time.perf_counter()
    res = RequestResult(index=index, ok=False, sent_at=t0)
    texts: list[str] = []
    usage = None
    done = False
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                detail = (await resp.aread()).decode("utf-8", "replace")[:300]
                res.error = f"HTTP {resp.status_code}: {detail}"
                res.latency_s = time.perf_counter() - t0
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    done = True
                    break
                chunk = json.loads(payload)
                if "error" in chunk:
                    err = chunk["error"]
                    message = err.get("message", str(err)) if isinstance(err, dict) else str(err)
                    res.error = "in-stream error: " + message
                    break
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    text = choice.get("text") or ""
                    if text:
                        now = time.perf_counter() - t0
                        if res.ttft_s is None:
                            res.ttft_s = now
                        res.chunk_times_s.append(now)
                        res.chunks += 1
                        texts.append(text)
                    if choice.get("finish_reason"):
                        res.finish_reason = choice["finish_reason"]
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    res.latency_s = time.perf_counter() - t0
    res.text = "".join(texts)
    if res.error is None and not done:
        res.error = "the stream ended without data: [DONE]"
    if usage and usage.get("completion_tokens") is not None:
        res.tokens = int(usage["completion_tokens"])
        if isinstance(usage.get("speculative"), dict):
            res.speculative = usage["speculative"]
    elif count_tokens is not None:
        res.tokens, res.token_source = count_tokens(res.text), "tokenizer"
    else:
        res.tokens, res.token_source = res.chunks, "chunks"
    res.ok = res.error is None
    return res


def _client(endpoint: Endpoint, connections: int):
    import httpx

    limits = httpx.Limits(max_connections=connections + 2, max_keepalive_connections=connections + 2)
    return httpx.AsyncClient(base_url=endpoint.base_url, headers=headers(endpoint.api_key), limits=limits,
                             timeout=httpx.Timeout(endpoint.timeout_s, connect=30.0))


async def run_closed(endpoint: Endpoint, bodies: list[dict], concurrency: int, count_tokens=None,
                     on_done=None) -> tuple[list[RequestResult], float]:
    """All bodies, `concurrency` in flight at a time. Returns the results (in body order) and the wall time
    from the first request sent to the last one finished."""
    queue: asyncio.Queue = asyncio.Queue()
    for i, body in enumerate(bodies):
        queue.put_nowait((i, body))
    results: list[RequestResult] = []
    async with _client(endpoint, concurrency) as client:
        async def worker() -> None:
            while True:
                try:
                    i, body = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results.append(await stream_one(client, body, i, count_tokens))
                if on_done:
                    on_done()

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    results.sort(key=lambda r: r.index)
    return results, wall


async def run_open(endpoint: Endpoint, bodies: list[dict], offsets_s: list[float], count_tokens=None,
                   on_done=None) -> tuple[list[RequestResult], float]:
    """Body i is sent offsets_s[i] seconds after the start, whatever is still streaming then.
    Returns the results (in body order) and the wall time until the last one finished."""
    async with _client(endpoint, len(bodies)) as client:
        t0 = time.perf_counter()

        async def one(i: int, body: dict) -> RequestResult:
            await asyncio.sleep(max(0.0, t0 + offsets_s[i] - time.perf_counter()))
            res = await stream_one(client, body, i, count_tokens)
            if on_done:
                on_done()
            return res

        results = await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies)))
        wall = time.perf_counter() - t0
    return list(results), wall


def stalls_at_arrivals(results: list[RequestResult]) -> list[float]:
    """Chunk gaps of running streams during which another request was sent (its prefill competes with
    their decoding): for each ok request, each gap between two of its chunks that contains another
    request's send time."""
    sends = sorted(r.sent_at for r in results)
    out = []
    for r in results:
        if not r.ok:
            continue
        times = [r.sent_at + t for t in r.chunk_times_s]
        for a, b in zip(times, times[1:]):
            if any(a < s < b for s in sends if s != r.sent_at):
                out.append(b - a)
    return out
