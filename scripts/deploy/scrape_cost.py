"""What a /metrics scrape costs the server's event loop while it streams under load.

    python -m scripts.deploy.scrape_cost [--target DIR --draft DIR] [--clients 8] [--seconds 20]

Runs the server in this process (uvicorn, its worker process as usual) with the /metrics route
timed from inside: the handler's wall time and the CPU time of the event-loop thread over it (the
loop does nothing else meanwhile, so that is what the scrape takes from streaming), and render()
alone (under the load, and afterwards with every family rendered afresh). A client process keeps
`--clients` streams going and scrapes every 50 ms, as an endpoint picker does. Without
--target / --draft it builds the quick pair (seconds). Loopback only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time

CLIENT = r"""
import asyncio, json, sys, time
import httpx

url, clients, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
body = {"model": "tiny", "prompt": "def main():", "max_tokens": 100, "temperature": 0, "ignore_eos": True,
        "stream": True}

async def stream(client, stop, counts):
    while time.monotonic() < stop:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            assert r.status_code == 200, r.status_code
            async for line in r.aiter_lines():
                counts["events"] += line.startswith("data: ")
        counts["requests"] += 1

async def scrape(client, stop, counts):
    while time.monotonic() < stop:
        t = time.perf_counter()
        r = await client.get(url + "/metrics")
        counts["scrape_ms"].append((time.perf_counter() - t) * 1e3)
        assert r.status_code == 200
        await asyncio.sleep(0.05)

async def main():
    counts = {"events": 0, "requests": 0, "scrape_ms": []}
    stop = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients + 4)) as client:
        await asyncio.gather(scrape(client, stop, counts), *(stream(client, stop, counts) for _ in range(clients)))
    print(json.dumps(counts))

asyncio.run(main())
"""


class TimedMetrics:
    """ASGI wrapper: wall and loop-thread CPU time of every GET /metrics."""

    def __init__(self, app):
        self.app, self.wall, self.cpu = app, [], []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/metrics":
            return await self.app(scope, receive, send)
        w, c = time.perf_counter(), time.thread_time()
        await self.app(scope, receive, send)
        self.cpu.append((time.thread_time() - c) * 1e6)
        self.wall.append((time.perf_counter() - w) * 1e6)


def summary(values: list[float]) -> dict:
    values = sorted(values)
    return {"n": len(values), "p50": round(statistics.median(values), 1),
            "p99": round(values[min(len(values) - 1, int(0.99 * len(values)))], 1), "max": round(values[-1], 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target")
    p.add_argument("--draft")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20.0)
    args = p.parse_args()
    if not args.target:
        from adasd_core.demo.build import quick_pair

        args.target, args.draft = quick_pair()

    import uvicorn

    from scripts.reliability.serverproc import free_port
    from server.app import build_app
    from server.settings import Settings

    port = free_port()
    settings = Settings(target=args.target, draft=args.draft, served_model_name="tiny", device="cpu", port=port,
                        max_running=args.clients, log_level="warning", warm_state_path="none")
    app = build_app(settings)
    timed = TimedMetrics(app)
    render_us: list[float] = []
    render_load_us: list[float] = []
    metrics, render = app.state.metrics, app.state.metrics.render

    def timed_render():
        t = time.perf_counter()
        out = render()
        render_load_us.append((time.perf_counter() - t) * 1e6)
        return out

    metrics.render = timed_render  # what the /metrics endpoint calls, timed under load
    server = uvicorn.Server(uvicorn.Config(timed, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    result: dict = {}

    def drive() -> None:
        import httpx

        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        out = subprocess.run([sys.executable, "-c", CLIENT, url, str(args.clients), str(args.seconds)],
                             capture_output=True, text=True, timeout=args.seconds + 300)
        result.update(json.loads(out.stdout or "{}") if out.returncode == 0 else {"error": out.stderr[-2000:]})
        metrics.render = render
        for _ in range(2000):  # render() alone, on the state the load left (every family rendered afresh)
            for family in metrics.registry if isinstance(metrics.registry, list) else ():
                family.text = None
            t = time.perf_counter()
            metrics.render()
            render_us.append((time.perf_counter() - t) * 1e6)
        server.should_exit = True

    threading.Thread(target=drive, daemon=True).start()
    server.run()
    if "error" in result:
        raise SystemExit(result["error"])
    report = {"clients": args.clients, "seconds": args.seconds, "requests": result["requests"],
              "stream_events": result["events"], "scrape_handler_wall_us": summary(timed.wall),
              "scrape_loop_cpu_us": summary(timed.cpu), "scrape_client_ms": summary(result["scrape_ms"]),
              "render_under_load_us": summary(render_load_us),
              "render_all_families_fresh_us": summary(render_us),
              "exposition_bytes": len(app.state.metrics.render()[0])}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
