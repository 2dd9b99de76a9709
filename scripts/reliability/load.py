"""Load / soak: N concurrent clients (half streaming, half not) for a fixed duration, loopback only.

    python -m scripts.reliability.load --clients 64 --duration 300 --target tiny --draft tiny
    python -m scripts.reliability.load --clients 16 --duration 20 --url http://127.0.0.1:8000 --api-key KEY

Prints a Markdown summary and writes JSON (--json). Reports failed requests (429s counted apart:
they are the server's deliberate back-pressure), tokens/s, TTFT and inter-chunk latency p50/p99,
RSS of the front end and the worker at start (after a warm-up) and end, the largest
running / waiting gauges seen, and whether both gauges return to 0 afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field

import httpx

from scripts.reliability.serverproc import (
    ServerProcess,
    check_loopback,
    front_end_pid,
    metric,
    metrics,
    ready,
    rss_mb,
    wait_for,
)

PROMPTS = ["def add(a, b):\n", "x = 1\n", "The quick brown fox", "import os\n", "for i in range(10):\n",
           "Once upon a time", "class Point:\n", "print('hello')\n"]


@dataclass
class Stats:
    ok: int = 0
    rejected_429: int = 0
    failed: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)

    def fail(self, why: str) -> None:
        self.failed += 1
        self.failures[why] = self.failures.get(why, 0) + 1


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def one_request(http: httpx.AsyncClient, body: dict, stream: bool, stats: Stats) -> None:
    t0 = time.perf_counter()
    try:
        if not stream:
            r = await http.post("/v1/completions", json=body)
            if r.status_code == 429:
                stats.rejected_429 += 1
                return
            if r.status_code != 200:
                return stats.fail(f"http {r.status_code}")
            stats.ok += 1
            stats.tokens += r.json()["usage"]["completion_tokens"]
            stats.e2e.append(time.perf_counter() - t0)
            return
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        async with http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code == 429:
                await r.aread()
                stats.rejected_429 += 1
                return
            if r.status_code != 200:
                await r.aread()
                return stats.fail(f"http {r.status_code}")
            last, first, done, usage, error = None, None, False, None, None
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    error = chunk["error"].get("code") or "error"
                    continue
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if any(c.get("text") for c in chunk.get("choices", [])):
                    now = time.perf_counter()
                    if first is None:
                        first = now
                        stats.ttft.append(now - t0)
                    else:
                        stats.itl.append(now - last)
                    last = now
            if error:
                return stats.fail(f"stream error {error}")
            if not done:
                return stats.fail("stream ended without [DONE]")
            stats.ok += 1
            stats.tokens += usage["completion_tokens"] if usage else 0
            stats.e2e.append(time.perf_counter() - t0)
    except httpx.HTTPError as exc:
        stats.fail(f"{type(exc).__name__}: {exc}"[:120])


async def client_loop(i: int, base_url: str, headers: dict, model: str, deadline: float, max_tokens: int,
                      stats: Stats, timeout: float) -> None:
    rng = random.Random(i)
    stream = i % 2 == 0
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout) as http:
        while time.monotonic() < deadline:
            body = {"model": model, "prompt": rng.choice(PROMPTS),
                    "max_tokens": rng.randint(max(1, max_tokens // 2), max_tokens),
                    "temperature": rng.choice([0.0, 0.8]), "seed": rng.randrange(1 << 30)}
            before = stats.rejected_429
            await one_request(http, body, stream, stats)
            if stats.rejected_429 > before:
                await asyncio.sleep(0.2 + rng.random() * 0.3)  # honour the back-pressure a little


def gauges_now(base_url: str) -> tuple[float, float]:
    """(running, waiting) from one scrape of /metrics."""
    m = metrics(base_url)
    get = lambda name: sum(v for (n, _), v in m.items() if n == name)  # noqa: E731
    return get("adasd_num_requests_running"), get("adasd_num_requests_waiting")


async def poll_gauges(base_url: str, stop: asyncio.Event, peaks: dict) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        try:
            running, waiting = await loop.run_in_executor(None, gauges_now, base_url)
            peaks["running"] = max(peaks.get("running", 0), running)
            peaks["waiting"] = max(peaks.get("waiting", 0), waiting)
            peaks["in_flight"] = max(peaks.get("in_flight", 0), running + waiting)
        except httpx.HTTPError:
            peaks["scrape_errors"] = peaks.get("scrape_errors", 0) + 1
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except TimeoutError:
            pass


def snapshot_rss(base_url: str, fe_pid: int | None) -> dict:
    _, info = ready(base_url)
    wpid = info.get("worker_pid")
    fe = fe_pid or front_end_pid(wpid)
    return {"front_end_pid": fe, "worker_pid": wpid, "front_end_rss_mb": rss_mb(fe), "worker_rss_mb": rss_mb(wpid)}


async def run_load(base_url: str, headers: dict, model: str, clients: int, duration: float, max_tokens: int,
                   fe_pid: int | None = None, timeout: float = 120.0) -> dict:
    """Run the load; returns the result dict (see `markdown`)."""
    # warm-up: one request of each kind, so start RSS is measured with everything loaded
    warm = Stats()
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout) as http:
        for stream in (False, True):
            await one_request(http, {"model": model, "prompt": "x", "max_tokens": 4}, stream, warm)
    start = snapshot_rss(base_url, fe_pid)
    stats, peaks, stop = Stats(), {}, asyncio.Event()
    poller = asyncio.create_task(poll_gauges(base_url, stop, peaks))
    t0 = time.monotonic()
    deadline = t0 + duration
    await asyncio.gather(*(client_loop(i, base_url, headers, model, deadline, max_tokens, stats, timeout)
                           for i in range(clients)))
    elapsed = time.monotonic() - t0
    stop.set()
    await poller
    loop = asyncio.get_running_loop()
    drained = await loop.run_in_executor(None, lambda: wait_for(
        lambda: (metric(base_url, "adasd_num_requests_running") == 0
                 and metric(base_url, "adasd_num_requests_waiting") == 0),
        timeout=30, interval=0.2))
    end = snapshot_rss(base_url, fe_pid)

    def growth(key: str) -> float | None:
        a, b = start.get(key), end.get(key)
        restarted = start["worker_pid"] != end["worker_pid"] and key == "worker_rss_mb"
        return None if not a or b is None or restarted else (b - a) / a * 100

    ms = lambda x: None if x is None else round(x * 1000, 1)  # noqa: E731
    return {
        "clients": clients, "duration_s": duration, "elapsed_s": round(elapsed, 1), "max_tokens": max_tokens,
        "requests_ok": stats.ok, "rejected_429": stats.rejected_429, "failed": stats.failed, "failures": stats.failures,
        "completion_tokens": stats.tokens, "tokens_per_s": round(stats.tokens / elapsed, 1),
        "requests_per_s": round(stats.ok / elapsed, 2),
        "ttft_ms_p50": ms(pct(stats.ttft, 50)), "ttft_ms_p99": ms(pct(stats.ttft, 99)),
        "itl_ms_p50": ms(pct(stats.itl, 50)), "itl_ms_p99": ms(pct(stats.itl, 99)),
        "e2e_ms_p50": ms(pct(stats.e2e, 50)), "e2e_ms_p99": ms(pct(stats.e2e, 99)),
        "peak_running": peaks.get("running"), "peak_waiting": peaks.get("waiting"),
        "peak_in_flight": peaks.get("in_flight"),
        "gauges_back_to_zero": drained, "rss_start": start, "rss_end": end,
        "front_end_rss_growth_pct": growth("front_end_rss_mb"), "worker_rss_growth_pct": growth("worker_rss_mb"),
    }


def markdown(res: dict) -> str:
    f = lambda v, nd=1: "n/a" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))  # noqa: E731
    s, e = res["rss_start"], res["rss_end"]
    rows = [
        ("clients / duration", f"{res['clients']} clients, {res['duration_s']:g} s (elapsed {res['elapsed_s']} s)"),
        ("requests ok / 429 / failed",
         f"{res['requests_ok']} / {res['rejected_429']} / {res['failed']} {res['failures'] or ''}".strip()),
        ("tokens/s (completion)", f(res["tokens_per_s"])),
        ("requests/s", f(res["requests_per_s"], 2)),
        ("TTFT p50 / p99 (ms, streams)", f"{f(res['ttft_ms_p50'])} / {f(res['ttft_ms_p99'])}"),
        ("inter-chunk latency p50 / p99 (ms)", f"{f(res['itl_ms_p50'])} / {f(res['itl_ms_p99'])}"),
        ("end-to-end p50 / p99 (ms)", f"{f(res['e2e_ms_p50'])} / {f(res['e2e_ms_p99'])}"),
        ("peak running / waiting / running+waiting gauges",
         f"{f(res['peak_running'], 0)} / {f(res['peak_waiting'], 0)} / {f(res['peak_in_flight'], 0)}"),
        ("gauges back to 0 after the run", str(res["gauges_back_to_zero"])),
        ("front-end RSS start → end (MB)",
         f"{f(s['front_end_rss_mb'])} → {f(e['front_end_rss_mb'])} ({f(res['front_end_rss_growth_pct'])} %)"),
        ("worker RSS start → end (MB)",
         f"{f(s['worker_rss_mb'])} → {f(e['worker_rss_mb'])} ({f(res['worker_rss_growth_pct'])} %)"),
    ]
    return "| measure | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)


def verdict(res: dict, max_rss_growth_pct: float = 10.0, capacity: float | None = None) -> list[str]:
    """The targets this run missed (empty: all met)."""
    problems = []
    if res["failed"]:
        problems.append(f"{res['failed']} failed requests: {res['failures']}")
    if not res["requests_ok"]:
        problems.append("no request succeeded")
    for key in ("front_end_rss_growth_pct", "worker_rss_growth_pct"):
        if res[key] is not None and res[key] > max_rss_growth_pct:
            problems.append(f"{key} = {res[key]:.1f} % > {max_rss_growth_pct} %")
    # the bound the server enforces: generations in flight (running + waiting) <= max_running + max_queue
    # (a generation counts as waiting until the worker reports it running, so `waiting` alone may briefly
    # exceed max_queue while running is below max_running)
    if capacity is not None and (res["peak_in_flight"] or 0) > capacity:
        problems.append(f"running+waiting reached {res['peak_in_flight']} > max_running+max_queue {capacity}")
    if not res["gauges_back_to_zero"]:
        problems.append("running/waiting gauges did not return to 0")
    return problems


def add_server_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server (started here unless --url)")
    g.add_argument("--url", help="an already running server (loopback only), e.g. http://127.0.0.1:8000")
    g.add_argument("--api-key", default=None, help="API key (of --url, or set on the server started here)")
    g.add_argument("--target", default="tiny")
    g.add_argument("--draft", default="tiny")
    g.add_argument("--model", default=None, help="model name to send (default: the served name)")
    g.add_argument("--max-running", type=int, default=8)
    g.add_argument("--max-queue", type=int, default=64)
    g.add_argument("--log-dir", default=None)
    g.add_argument("--start-timeout", type=float, default=600.0, help="seconds the server may take to load")


def start_or_attach(args) -> tuple[str, dict, str, ServerProcess | None]:
    if args.url:
        base = check_loopback(args.url)
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        model = args.model or httpx.get(base + "/v1/models", headers=headers, timeout=10).json()["data"][0]["id"]
        return base, headers, model, None
    srv = ServerProcess(args.target, args.draft, api_key=args.api_key, log_dir=args.log_dir, device="cpu",
                        max_running=args.max_running, max_queue=args.max_queue, log_level="warning")
    try:
        srv.wait_ready(timeout=args.start_timeout)
    except BaseException:
        srv.stop()
        raise
    return srv.base_url, srv.headers, args.model or srv.model, srv


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.reliability.load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=300.0, help="seconds of load (clients start no request after it)")
    p.add_argument("--max-tokens", type=int, default=32, help="each request asks for max_tokens/2 .. max_tokens")
    p.add_argument("--timeout", type=float, default=120.0, help="per-request timeout (s)")
    p.add_argument("--json", default=None, help="write the result here")
    p.add_argument("--max-rss-growth", type=float, default=10.0, help="target: RSS growth %% (exit 1 beyond)")
    add_server_args(p)
    args = p.parse_args(argv)
    base, headers, model, srv = start_or_attach(args)
    try:
        res = asyncio.run(run_load(base, headers, model, args.clients, args.duration, args.max_tokens,
                                   fe_pid=srv.proc.pid if srv else None, timeout=args.timeout))
    finally:
        if srv:
            res_exit = srv.stop()
    if srv:
        res["server_exit_code"] = res_exit
    res["problems"] = verdict(res, args.max_rss_growth, None if args.url else args.max_running + args.max_queue)
    print(markdown(res))
    print("\n```json\n" + json.dumps(res, indent=1) + "\n```")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    if res["problems"]:
        print("\nPROBLEMS:\n- " + "\n- ".join(res["problems"]), file=sys.stderr)
    return 1 if res["problems"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
