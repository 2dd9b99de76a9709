"""Fault injection against a real server on 127.0.0.1, each scenario bounded in count and time.

    python -m scripts.reliability.faults --target tiny --draft tiny              # all scenarios
    python -m scripts.reliability.faults --only kill_worker,sigterm --clients 16

Scenarios (each starts its own server, so one fault cannot hide another):
  kill_worker   SIGKILL the worker while clients stream: what each in-flight client saw, recovery time
  disconnects   clients drop their connection at random points: running/waiting gauges return to 0
  sigterm       SIGTERM during load: in-flight requests finish or get a clean error; exit within the timeout
  bad_bodies    malformed, mistyped, non-UTF-8, oversized (413) and over-long bodies: clean 4xx, no traces
  slow_clients  streams read very slowly while other clients keep being served

Every 4xx/5xx body seen is scanned for stack traces ("Traceback", 'File "').
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import time

import httpx

from scripts.reliability.serverproc import ServerProcess, metric, wait_for

TRACE_MARKERS = ("Traceback", 'File "')
ERROR_KEYS = {"message", "type", "param", "code"}


class BodyLog:
    """Every error body seen (status >= 400 or an error event inside a stream)."""

    def __init__(self):
        self.bodies: list[tuple[int, str]] = []

    def add(self, status: int, text: str) -> None:
        self.bodies.append((status, text))

    def traces(self) -> list[str]:
        return [t for _, t in self.bodies if any(m in t for m in TRACE_MARKERS)]

    def bad_shape(self) -> list[str]:
        out = []
        for _status, text in self.bodies:
            try:
                err = json.loads(text)["error"]
                if set(err) != ERROR_KEYS:
                    out.append(text)
            except (ValueError, KeyError, TypeError):
                out.append(text)
        return out


def body(model: str, max_tokens: int = 24, **kw) -> dict:
    return {"model": model, "prompt": "def f(x):\n", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "adasd": {"method": "ar"}, **kw}


async def stream_once(http: httpx.AsyncClient, payload: dict, log: BodyLog, started: asyncio.Event | None = None,
                      read_delay: float = 0.0, stop_after_chunks: int | None = None) -> dict:
    """One streamed completion: {'outcome': ok | error:<code> | http <status> | <exception> | dropped, 'chunks'}."""
    chunks = 0
    try:
        async with http.stream("POST", "/v1/completions", json={**payload, "stream": True}) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                log.add(r.status_code, text)
                return {"outcome": f"http {r.status_code}" + _code(r, text), "chunks": 0}
            error, done = None, False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                data = json.loads(line[6:])
                if "error" in data:
                    log.add(r.status_code, line[6:])
                    error = data["error"]["code"]
                    continue
                chunks += 1
                if started is not None:
                    started.set()
                if stop_after_chunks is not None and chunks >= stop_after_chunks:
                    return {"outcome": "dropped", "chunks": chunks}  # leaving the block closes the connection
                if read_delay:
                    await asyncio.sleep(read_delay)
            outcome = f"error:{error}" if error else ("ok" if done else "no [DONE]")
            return {"outcome": outcome, "chunks": chunks}
    except httpx.HTTPError as exc:
        return {"outcome": type(exc).__name__, "chunks": chunks}


async def post_once(http: httpx.AsyncClient, payload: dict, log: BodyLog) -> dict:
    t0 = time.perf_counter()
    try:
        r = await http.post("/v1/completions", json=payload)
    except httpx.HTTPError as exc:
        return {"outcome": type(exc).__name__, "latency_s": time.perf_counter() - t0}
    if r.status_code >= 400:
        log.add(r.status_code, r.text)
        return {"outcome": f"http {r.status_code}" + _code(r, r.text), "latency_s": time.perf_counter() - t0}
    return {"outcome": "ok", "latency_s": time.perf_counter() - t0}


def _code(r: httpx.Response, text: str) -> str:
    """' <error.code>' of an OpenAI-shaped error body, else ' (text/plain: <start of the body>)'."""
    try:
        return " " + json.loads(text)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return f" ({r.headers.get('content-type', '?').split(';')[0]}: {text[:40]!r})"


def tally(results: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in results:
        out[r["outcome"]] = out.get(r["outcome"], 0) + 1
    return dict(sorted(out.items()))


def gauges(base_url: str) -> tuple[float, float]:
    return metric(base_url, "adasd_num_requests_running"), metric(base_url, "adasd_num_requests_waiting")


def client(srv: ServerProcess, timeout: float = 120) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    return httpx.AsyncClient(base_url=srv.base_url, headers=srv.headers, timeout=timeout, limits=limits)


# ---------------------------------------------------------------------------- scenarios


async def kill_worker(srv: ServerProcess, clients: int = 8, max_tokens: int = 120) -> dict:
    """SIGKILL the worker while `clients` stream (half) or wait (half) on long generations."""
    log = BodyLog()
    old_pid = srv.wait_ready()["worker_pid"]
    started = asyncio.Event()
    async with client(srv) as http:
        tasks = [asyncio.create_task(stream_once(http, body(srv.model, max_tokens), log, started)) if i % 2 == 0
                 else asyncio.create_task(post_once(http, body(srv.model, max_tokens), log)) for i in range(clients)]
        await asyncio.wait_for(started.wait(), 60)
        await asyncio.sleep(0.2)
        t_kill = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)
        results = await asyncio.gather(*tasks)
        seen_by_clients_s = time.monotonic() - t_kill
        loop = asyncio.get_running_loop()
        new = await loop.run_in_executor(None, lambda: srv.wait_ready(timeout=300, not_pid=old_pid))
        recovery_s = time.monotonic() - t_kill
    # a fresh connection: the pool's idle ones may be past the server's keep-alive timeout by now, and
    # reusing one as the server closes it is a client-side race, not the recovery under test
    async with client(srv) as http:
        after = await post_once(http, body(srv.model, 4), log)
    reaped = not _alive(old_pid)
    return {"scenario": "kill_worker", "clients": clients, "client_outcomes": tally(results),
            "all_clients_answered_s": round(seen_by_clients_s, 2), "recovery_s": round(recovery_s, 2),
            "old_worker_pid": old_pid, "new_worker_pid": new["worker_pid"], "old_worker_reaped": reaped,
            "request_after_recovery": after["outcome"], "error_bodies": len(log.bodies),
            "traces_in_bodies": len(log.traces()), "bad_error_shapes": len(log.bad_shape()),
            "ok": all(r["outcome"] in ("ok", "error:worker_died", "http 503 worker_died") for r in results)
            and after["outcome"] == "ok" and reaped and not log.traces() and not log.bad_shape()}


async def disconnects(srv: ServerProcess, clients: int = 24, max_tokens: int = 60, seed: int = 0) -> dict:
    """Clients that drop at random points: before the first byte, after k chunks, non-streamed mid-wait."""
    rng = random.Random(seed)
    log = BodyLog()

    async def one(i: int) -> dict:
        how = rng.choice(["timeout", "chunks", "chunks", "complete"])
        if how == "timeout":  # non-streamed: the client gives up while the request waits or runs
            give_up_s = 0.05 + rng.random() * 0.5
            async with httpx.AsyncClient(base_url=srv.base_url, headers=srv.headers, timeout=give_up_s) as h:
                r = await post_once(h, body(srv.model, max_tokens), log)
            return {"outcome": "gave up" if r["outcome"] != "ok" else "ok", "chunks": 0}
        async with client(srv) as h:
            stop = rng.randint(1, 8) if how == "chunks" else None
            return await stream_once(h, body(srv.model, max_tokens), log, stop_after_chunks=stop)

    results = await asyncio.gather(*(one(i) for i in range(clients)))
    t0 = time.monotonic()
    loop = asyncio.get_running_loop()
    drained = await loop.run_in_executor(
        None, lambda: wait_for(lambda: gauges(srv.base_url) == (0, 0), timeout=30, interval=0.1))
    drain_s = time.monotonic() - t0
    cancelled = metric(srv.base_url, "adasd_requests_total", status="cancelled")
    async with client(srv) as h:
        after = await post_once(h, body(srv.model, 4), log)
    return {"scenario": "disconnects", "clients": clients, "client_outcomes": tally(results),
            "gauges_back_to_zero": drained, "drain_s": round(drain_s, 2), "cancelled_total": cancelled,
            "request_after": after["outcome"], "traces_in_bodies": len(log.traces()),
            "ok": drained and after["outcome"] == "ok" and not log.traces()}


async def sigterm(srv: ServerProcess, clients: int = 8, max_tokens: int = 40, shutdown_timeout: float = 10.0) -> dict:
    """SIGTERM while `clients` stream: each finishes ([DONE] after its tokens) or gets a clean error."""
    log = BodyLog()
    srv.wait_ready()
    started = asyncio.Event()
    async with client(srv) as http:
        tasks = [asyncio.create_task(stream_once(http, body(srv.model, max_tokens), log, started)) if i % 2 == 0
                 else asyncio.create_task(post_once(http, body(srv.model, max_tokens), log)) for i in range(clients)]
        await asyncio.wait_for(started.wait(), 60)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        results = await asyncio.gather(*tasks)
    loop = asyncio.get_running_loop()
    try:
        code = await loop.run_in_executor(None, lambda: srv.proc.wait(shutdown_timeout + 15))
    except Exception:
        code = None
    exit_s = time.monotonic() - t0
    srv_log = srv.log_tail(400)
    clean = {"ok", "error:shutting_down", "http 503 shutting_down"}
    is_clean = lambda o: o in clean or o.startswith("http 503 (")  # noqa: E731  (uvicorn's own 503 while closing)
    return {"scenario": "sigterm", "clients": clients, "shutdown_timeout_s": shutdown_timeout,
            "client_outcomes": tally(results), "exit_code": code, "exit_s": round(exit_s, 2),
            "traceback_in_log": "Traceback" in srv_log, "traces_in_bodies": len(log.traces()),
            # uvicorn re-raises the captured SIGTERM after a clean shutdown: -15 is the conventional status
            "ok": code in (0, -signal.SIGTERM) and exit_s <= shutdown_timeout + 5
            and all(is_clean(r["outcome"]) for r in results) and not log.traces() and "Traceback" not in srv_log}


def bad_bodies_cases(model: str, max_body_bytes: int) -> list[tuple[str, str, bytes, dict, set[int]]]:
    """(name, path, raw body, headers, acceptable statuses)."""
    j = {"content-type": "application/json"}
    dumps = lambda o: json.dumps(o).encode()  # noqa: E731
    big_prompt = "word " * (max_body_bytes // 5 - 100)  # under the body limit, far over the context
    return [
        ("invalid JSON", "/v1/completions", b'{"model": "tiny", "prompt": ', j, {400}),
        ("JSON array", "/v1/completions", b"[1, 2, 3]", j, {400}),
        ("JSON string", "/v1/chat/completions", b'"hello"', j, {400}),
        ("empty body", "/v1/completions", b"", j, {400}),
        ("not UTF-8", "/v1/completions", b'{"model": "tiny", "prompt": "\xff\xfe\xfa"}', j, {400}),
        ("wrong types", "/v1/completions", dumps({"model": 1, "prompt": {"a": 1}, "max_tokens": "many"}), j, {400}),
        ("negative max_tokens", "/v1/completions", dumps({"model": model, "prompt": "x", "max_tokens": -1}), j, {400}),
        ("huge max_tokens", "/v1/completions", dumps({"model": model, "prompt": "x", "max_tokens": 10**12}), j, {400}),
        ("huge n", "/v1/completions", dumps({"model": model, "prompt": "x", "n": 10**6}), j, {400}),
        ("NaN temperature", "/v1/completions",
         b'{"model": "%s", "prompt": "x", "temperature": NaN}' % model.encode(), j, {400}),
        ("token id out of vocab", "/v1/completions",
         dumps({"model": model, "prompt": [10**9], "max_tokens": 1}), j, {400}),
        ("deeply nested", "/v1/completions",
         b'{"model": "tiny", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", j, {400}),
        ("lone surrogate in the prompt", "/v1/completions",
         b'{"model": "%s", "prompt": "abc \\udc80 def", "max_tokens": 1}' % model.encode(), j, {400}),
        ("unknown chat role", "/v1/chat/completions",
         dumps({"model": model, "messages": [{"role": "wizard", "content": "x"}], "max_tokens": 1}), j, {400}),
        ("float token id", "/v1/completions", dumps({"model": model, "prompt": [1, 2.5], "max_tokens": 1}), j, {400}),
        ("messages empty", "/v1/chat/completions", dumps({"model": model, "messages": []}), j, {400}),
        ("message no role", "/v1/chat/completions", dumps({"model": model, "messages": [{"content": "x"}]}), j, {400}),
        ("unknown model path", "/v1/completions", dumps({"model": "/etc/passwd", "prompt": "x"}), j, {404}),
        ("text/plain body", "/v1/completions", dumps({"model": model, "prompt": "x", "max_tokens": 1}),
         {"content-type": "text/plain"}, {200, 400, 415}),
        ("oversized body (413)", "/v1/completions", b'{"prompt": "' + b"a" * (max_body_bytes + 10) + b'"}', j, {413}),
        ("body 20x the limit (413)", "/v1/completions", b"a" * (max_body_bytes * 20), j, {413}),
        ("prompt over the context", "/v1/completions",
         dumps({"model": model, "prompt": big_prompt, "max_tokens": 1}), j, {400}),
    ]


async def bad_bodies(srv: ServerProcess, max_body_bytes: int = 1 << 20) -> dict:
    log = BodyLog()
    rows, ok = [], True
    async with client(srv, timeout=60) as http:
        for name, path, raw, headers, expected in bad_bodies_cases(srv.model, max_body_bytes):
            try:
                r = await http.post(path, content=raw, headers=headers)
                status, text = r.status_code, r.text
            except httpx.HTTPError as exc:  # e.g. the server closed the connection after a 413
                status, text = 0, type(exc).__name__
            if status >= 400:
                log.add(status, text)
            good = status in expected and not any(m in text for m in TRACE_MARKERS)
            ok &= good
            rows.append({"case": name, "status": status, "expected": sorted(expected), "ok": good})
        after = await post_once(http, body(srv.model, 2), log)
    bad_shapes = log.bad_shape()
    return {"scenario": "bad_bodies", "cases": rows, "traces_in_bodies": len(log.traces()),
            "bad_error_shapes": bad_shapes[:3], "request_after": after["outcome"],
            "server_alive": srv.proc.poll() is None,
            "ok": ok and not bad_shapes and after["outcome"] == "ok" and srv.proc.poll() is None}


async def slow_clients(srv: ServerProcess, slow: int = 4, fast: int = 8, read_delay: float = 0.5, max_tokens: int = 16,
                       fast_requests: int = 5) -> dict:
    """`slow` streams read one chunk every `read_delay` s while `fast` clients each send `fast_requests` requests."""
    log = BodyLog()
    baseline = []
    async with client(srv) as http:
        for _ in range(3):
            baseline.append((await post_once(http, body(srv.model, 8), log))["latency_s"])
        started = asyncio.Event()
        slow_tasks = [asyncio.create_task(stream_once(http, body(srv.model, max_tokens), log, started,
                                                      read_delay=read_delay))
                      for _ in range(slow)]
        await asyncio.wait_for(started.wait(), 60)

        async def fast_client() -> list[dict]:
            return [await post_once(http, body(srv.model, 8), log) for _ in range(fast_requests)]

        t0 = time.monotonic()
        fast_results = [r for rs in await asyncio.gather(*(fast_client() for _ in range(fast))) for r in rs]
        fast_s = time.monotonic() - t0
        slow_results = await asyncio.gather(*slow_tasks)
        slow_s = time.monotonic() - t0
    lat = sorted(r["latency_s"] for r in fast_results)
    return {"scenario": "slow_clients", "slow": slow, "fast": fast, "read_delay_s": read_delay,
            "slow_outcomes": tally(slow_results), "fast_outcomes": tally(fast_results),
            "fast_all_done_s": round(fast_s, 2), "slow_all_done_s": round(slow_s, 2),
            "fast_latency_p50_ms": round(lat[len(lat) // 2] * 1000, 1), "fast_latency_max_ms": round(lat[-1] * 1000, 1),
            "idle_latency_ms": round(sorted(baseline)[1] * 1000, 1),
            # the fast clients are done while the slow streams are still being read
            "ok": all(r["outcome"] == "ok" for r in fast_results + slow_results) and fast_s < slow_s}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


SCENARIOS = ("kill_worker", "disconnects", "sigterm", "bad_bodies", "slow_clients")


def run_scenario(name: str, start, clients: int) -> dict:
    """`start(**settings)` -> a ready ServerProcess. The server is stopped afterwards."""
    settings = {"shutdown_timeout": 10} if name == "sigterm" else {}
    srv = start(**settings)
    try:
        if name == "kill_worker":
            return asyncio.run(kill_worker(srv, clients))
        if name == "disconnects":
            return asyncio.run(disconnects(srv, 3 * clients))
        if name == "sigterm":
            return asyncio.run(sigterm(srv, clients, shutdown_timeout=10))
        if name == "bad_bodies":
            return asyncio.run(bad_bodies(srv))
        if name == "slow_clients":
            return asyncio.run(slow_clients(srv, slow=max(2, clients // 2), fast=clients))
        raise ValueError(name)
    finally:
        srv.stop()


def markdown(results: list[dict]) -> str:
    lines = ["| scenario | result | details |", "|---|---|---|"]
    for r in results:
        details = {k: v for k, v in r.items() if k not in ("scenario", "ok", "cases")}
        if "cases" in r:
            details["cases"] = ", ".join(f"{c['case']}: {c['status']}" for c in r["cases"])
        lines.append(f"| {r['scenario']} | {'PASS' if r['ok'] else 'FAIL'} | "
                     + "; ".join(f"{k}={v}" for k, v in details.items()).replace("|", "/") + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.reliability.faults", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="tiny")
    p.add_argument("--draft", default="tiny")
    p.add_argument("--api-key", default="sk-adasd-faults")
    p.add_argument("--clients", type=int, default=8, help="in-flight clients per scenario")
    p.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated subset of: " + ", ".join(SCENARIOS))
    p.add_argument("--round-delay", type=float, default=0.02,
                   help="slow every worker round down by this (s) so generations outlive the fault (debug knob)")
    p.add_argument("--json", default=None)
    p.add_argument("--log-dir", default=None)
    args = p.parse_args(argv)

    def start(**settings) -> ServerProcess:
        srv = ServerProcess(args.target, args.draft, api_key=args.api_key, log_dir=args.log_dir,
                            round_delay_s=args.round_delay, device="cpu", log_level="warning", **settings)
        try:
            srv.wait_ready(timeout=600)
        except BaseException:
            srv.stop()
            raise
        return srv

    results = [run_scenario(name, start, args.clients) for name in args.only.split(",") if name]
    print(markdown(results))
    print("\n```json\n" + json.dumps(results, indent=1) + "\n```")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
