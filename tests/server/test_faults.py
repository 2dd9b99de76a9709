"""Faults: a full queue (429), the worker killed mid-request (errors, restart), SIGTERM (graceful shutdown)."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest
from server_support import GOOD, LONG, check_error_body, post_in_thread, wait_for


def assert_clean_exit(srv) -> None:
    # uvicorn re-raises the captured SIGTERM after its shutdown: -15 is the conventional, clean status
    assert srv.proc.wait(60) in (0, -signal.SIGTERM)
    log = srv.log_tail(200)
    assert "Application shutdown complete" in log and "Traceback" not in log, log


@pytest.fixture(scope="module")
def small(start_server):
    """One generation at a time and one waiting: the third is refused."""
    return start_server(max_running=1, max_queue=1)


def test_queue_full_gets_429_with_retry_after(small):
    url = small.base_url + "/v1/completions"
    with httpx.stream("POST", url, json={**LONG, "stream": True}, timeout=120) as a:
        lines = a.iter_lines()
        assert next(lines).startswith("data: ")  # A is running
        t, b = post_in_thread(url, {**GOOD, "max_tokens": 10})  # B waits for the slot
        assert wait_for(lambda: small.metric("adasd_num_requests_waiting") == 1), small.log_tail()
        c = httpx.post(url, json=GOOD)
        assert c.status_code == 429 and int(c.headers["retry-after"]) >= 1
        check_error_body(c.json(), "queue_full")
        assert small.metric("adasd_requests_total", status="rejected") >= 1
    # A's client went away: A is cancelled, B gets the slot and finishes
    t.join(120)
    assert b["response"].status_code == 200, b
    assert httpx.get(small.base_url + "/health").status_code == 200
    assert httpx.post(url, json=GOOD).status_code == 200


def test_worker_killed_mid_request(small):
    url = small.base_url + "/v1/completions"
    code, info = small.ready()
    assert code == 200
    old_pid = info["worker_pid"]
    errors_before = small.metric("adasd_requests_total", status="error")
    with httpx.stream("POST", url, json={**LONG, "stream": True}, timeout=120) as a:
        lines = a.iter_lines()
        assert next(lines).startswith("data: ")
        t, b = post_in_thread(url, LONG)  # waiting behind the stream
        assert wait_for(lambda: small.metric("adasd_num_requests_waiting") == 1), small.log_tail()
        os.kill(old_pid, signal.SIGKILL)
        rest = [line for line in lines if line]
    # the stream had started: the error comes inside it, then [DONE]
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2].removeprefix("data: "))
    check_error_body(error, "worker_died")
    # the non-streamed request had not: a plain 503
    t.join(60)
    assert b["response"].status_code == 503
    check_error_body(b["response"].json(), "worker_died")
    # /ready is false while a new worker loads, then true with a new pid
    code, info = small.ready()
    assert code == 503 and info["status"] == "restarting"
    assert httpx.post(url, json=GOOD).status_code == 503
    new = small.wait_ready(not_pid=old_pid)
    assert new["worker_pid"] not in (None, old_pid)
    r = httpx.post(url, json=GOOD)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    assert small.metric("adasd_worker_up") == 1
    assert small.metric("adasd_requests_total", status="error") == errors_before + 2
    with pytest.raises(ProcessLookupError):
        os.kill(old_pid, 0)  # reaped, not a zombie


def test_sigterm_lets_in_flight_streams_finish(start_server):
    srv = start_server(shutdown_timeout=30)
    worker_pid = srv.ready()[1]["worker_pid"]
    body = {**LONG, "max_tokens": 30, "stream": True}
    with httpx.stream("POST", srv.base_url + "/v1/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        srv.proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    finishes = [c["finish_reason"] for line in rest[:-1] for c in json.loads(line[6:])["choices"] if c["finish_reason"]]
    assert finishes == ["length"]
    assert_clean_exit(srv)
    with pytest.raises(ProcessLookupError):
        os.kill(worker_pid, 0)


def test_sigterm_cancels_what_does_not_finish_in_time(start_server):
    srv = start_server(shutdown_timeout=1)
    worker_pid = srv.ready()[1]["worker_pid"]
    body = {**LONG, "stream": True}  # at least 2.4 s: beyond the 1 s allowed
    with httpx.stream("POST", srv.base_url + "/v1/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    # the stream is ended by the server, in time, with an error inside it and [DONE]
    assert time.monotonic() - t0 < 5
    assert rest[-1] == "data: [DONE]"
    check_error_body(json.loads(rest[-2].removeprefix("data: ")), "shutting_down")
    assert_clean_exit(srv)
    with pytest.raises(ProcessLookupError):
        os.kill(worker_pid, 0)
