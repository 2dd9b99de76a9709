"""Check 11: a real proxy in front of two replicas (scripts/deploy/proxy.py: nginx, least_conn).

Two servers on the quick pair, one thread each, behind nginx: a stream arrives event by event
through the proxy (an nginx that compresses it, the control, delivers it in clumps), requests spread over
both replicas, and a replica killed under load costs only the requests it was serving: the other
replica's streams finish, and new requests go to it.
"""

from __future__ import annotations

import statistics
import threading
import time

import httpx
import pytest

from scripts.deploy.proxy import Nginx
from scripts.reliability.serverproc import ServerProcess

ROUND_DELAY_S = 0.02  # every round at least this long: a token per 20 ms or slower


@pytest.fixture(scope="module")
def replicas(quick_pair_dir, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("replicas")
    servers = [ServerProcess(str(quick_pair_dir / "target"), str(quick_pair_dir / "draft"), log_dir=log_dir,
                             round_delay_s=ROUND_DELAY_S, device="cpu", log_level="warning") for _ in range(2)]
    try:
        for srv in servers:
            srv.wait_ready()
        yield servers
    finally:
        for srv in servers:
            srv.stop()


@pytest.fixture(scope="module")
def proxy(replicas, tmp_path_factory):
    nginx = Nginx([f"127.0.0.1:{s.port}" for s in replicas], tmp_path_factory.mktemp("nginx"))
    yield nginx
    nginx.stop()


def body(max_tokens: int) -> dict:
    return {"model": "tiny", "prompt": "def main():", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "adasd": {"method": "ar"}}  # ar: one token per round


class Stream:
    """One streamed completion through the proxy, read in a thread: arrival time of every event."""

    def __init__(self, url: str, max_tokens: int):
        self.url, self.max_tokens = url, max_tokens
        self.upstream: str | None = None
        self.events: list[tuple[float, str]] = []
        self.error: str | None = None
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=body(self.max_tokens), timeout=120) as r:
                self.upstream = r.headers.get("x-upstream")
                if r.status_code != 200:
                    self.error = f"HTTP {r.status_code}"
                    return
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events.append((time.monotonic(), line[6:]))
        except httpx.HTTPError as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    @property
    def complete(self) -> bool:
        return self.error is None and bool(self.events) and self.events[-1][1] == "[DONE]"

    def text_events(self) -> list[float]:
        import json

        return [t for t, data in self.events if data != "[DONE]" and json.loads(data)["choices"][0]["text"]]


def median_gap(times: list[float]) -> float:
    """The median time between arrivals: a stall anywhere on the path (a busy VM, the client's thread
    descheduled) clumps the events behind it, but only buffering clumps most of them."""
    return statistics.median(b - a for a, b in zip(times, times[1:]))


def test_sse_passes_event_by_event(proxy, tmp_path):
    s = Stream(proxy.base_url, 40)
    s.thread.join(120)
    assert s.complete, (s.error, proxy.error_log())
    times = s.text_events()
    assert len(times) >= 30, len(times)  # a token per round; the detokenizer may hold a few back
    assert median_gap(times) >= 0.5 * ROUND_DELAY_S, f"median gap {median_gap(times) * 1e3:.2f} ms: buffered"
    assert times[-1] - times[0] >= 0.6 * len(times) * ROUND_DELAY_S

    # the control: through an nginx that compresses the stream (zlib holds output back until its
    # buffer fills), the same stream arrives in a few clumps
    buffered = Nginx([s.upstream], tmp_path / "buffered", buffering=True, gzip=True)
    try:
        b = Stream(buffered.base_url, 40)
        b.thread.join(120)
    finally:
        buffered.stop()
    assert b.complete, b.error
    assert median_gap(b.text_events()) < 0.1 * ROUND_DELAY_S, "the check cannot tell buffering apart"


def test_killing_a_replica_costs_only_its_requests(replicas, proxy):
    streams = [Stream(proxy.base_url, 100) for _ in range(8)]  # the quick pair: 128 positions
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(s.text_events() or s.error for s in streams):
        time.sleep(0.05)
    assert all(s.text_events() for s in streams), [s.error for s in streams]
    addr = {f"127.0.0.1:{srv.port}": srv for srv in replicas}
    served = {a: [s for s in streams if s.upstream == a] for a in addr}
    assert all(len(v) >= 2 for v in served.values()), {a: len(v) for a, v in served.items()}  # least_conn spreads

    victim, survivor = replicas
    victim_addr, survivor_addr = f"127.0.0.1:{victim.port}", f"127.0.0.1:{survivor.port}"
    assert not any(s.complete for s in served[victim_addr]), "the victim's requests ended before the kill"
    victim.proc.kill()  # SIGKILL the front end: its worker sees the pipe close and exits
    for s in streams:
        s.thread.join(120)

    for s in served[victim_addr]:
        assert not s.complete, "a request of the killed replica cannot have finished"
    for s in served[survivor_addr]:
        assert s.complete and len(s.text_events()) >= 90, (s.error, len(s.text_events()), survivor.log_tail())

    # new requests: the dead replica is skipped (a refused connection is retried on the other)
    for _ in range(6):
        r = httpx.post(proxy.base_url + "/v1/completions", timeout=60,
                       json={"model": "tiny", "prompt": "x", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, (r.status_code, r.text[:300], proxy.error_log())
        assert r.headers["x-upstream"].split(", ")[-1] == survivor_addr
