"""Aggregate throughput of two adasd replicas behind nginx (least_conn), against one replica.

    python -m scripts.deploy.proxy_bench [--target DIR --draft DIR] [--concurrency 8,16] [--repeats 3]

Starts two servers (one torch thread each) and nginx on this machine, then, per concurrency level
and pass, runs the same streamed requests against: one replica directly, one replica through nginx
(the proxy's own cost) and both replicas through nginx, in an order rotated from pass to pass.
Prints per row the aggregate completion tokens/s (median over passes), TTFT p50 and how the
requests split between the replicas. Without --target / --draft it builds the quick pair. On a
2-core machine the client shares the cores with both replicas: run it alone (under the CPU lock).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from scripts.deploy.proxy import Nginx
from scripts.reliability.serverproc import ServerProcess


async def run_level(url: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    body = {"model": "tiny", "prompt": "def main():", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    tokens, ttft, upstreams, errors = [], [], Counter(), 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal errors
        while not queue.empty():
            queue.get_nowait()
            t0 = time.perf_counter()
            first, used = None, 0
            async with client.stream("POST", url + "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    errors += 1
                    continue
                upstreams[r.headers.get("x-upstream", "direct")] += 1
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                        first = time.perf_counter() - t0
                    if chunk.get("usage"):
                        used = chunk["usage"]["completion_tokens"]
            tokens.append(used)
            ttft.append(first or 0.0)

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=concurrency + 2)) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {"tok_s": sum(tokens) / wall, "ttft_p50_ms": 1e3 * statistics.median(ttft) if ttft else None,
            "errors": errors, "split": dict(upstreams)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target")
    p.add_argument("--draft")
    p.add_argument("--concurrency", default="8,16")
    p.add_argument("--requests", type=int, default=32, help="requests per level and row")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if not args.target:
        from adasd_core.demo.build import quick_pair

        args.target, args.draft = quick_pair()
    work = Path(tempfile.mkdtemp(prefix="adasd-proxy-"))
    # max_running 16: the slots do not cap the highest level
    servers = [ServerProcess(args.target, args.draft, log_dir=work, device="cpu", log_level="warning", max_running=16)
               for _ in range(2)]
    proxies = []
    try:
        for srv in servers:
            srv.wait_ready(timeout=600)
        both = Nginx([f"127.0.0.1:{s.port}" for s in servers], work / "nginx-both")
        one = Nginx([f"127.0.0.1:{servers[0].port}"], work / "nginx-one")
        proxies = [both, one]
        rows = {"1 replica, direct": servers[0].base_url, "1 replica, nginx": one.base_url,
                "2 replicas, nginx (least_conn)": both.base_url}
        levels = [int(c) for c in args.concurrency.split(",")]
        results: dict = {(name, c): [] for name in rows for c in levels}
        for url in rows.values():  # warm-up: calibrated step costs, first-request paths
            asyncio.run(run_level(url, 2, 4, 8))
        order = list(rows)
        for rep in range(args.repeats):
            for i, c in enumerate(levels):
                rotation = (rep + i) % len(order)
                for name in order[rotation:] + order[:rotation]:
                    results[(name, c)].append(asyncio.run(run_level(rows[name], c, args.requests, args.max_tokens)))
        print(f"| concurrency | row | tok/s (median of {args.repeats}) | per pass | TTFT p50 (ms) | errors | split |")
        print("|---:|---|---:|---|---:|---:|---|")
        for c in levels:
            for name in rows:
                runs = results[(name, c)]
                split = Counter()
                for r in runs:
                    split.update(r["split"])
                passes = ", ".join(f"{r['tok_s']:.0f}" for r in runs)
                ttft = statistics.median(r["ttft_p50_ms"] for r in runs)
                shares = " / ".join(str(v) for _, v in sorted(split.items())) if len(split) > 1 else "-"
                tok_s = statistics.median(r["tok_s"] for r in runs)
                errors = sum(r["errors"] for r in runs)
                print(f"| {c} | {name} | {tok_s:.1f} | {passes} | {ttft:.0f} | {errors} | {shares} |")
    finally:
        for proxy in proxies:
            proxy.stop()
        for srv in servers:
            srv.stop()


if __name__ == "__main__":
    main()
