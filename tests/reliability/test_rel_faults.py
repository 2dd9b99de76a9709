"""Faults, short forms of `python -m scripts.reliability.faults` (each scenario bounded in count and time)."""

from __future__ import annotations

import asyncio

import pytest

from scripts.reliability import faults


def test_worker_killed_mid_stream_under_load(rel_start):
    srv = rel_start(max_running=4)
    res = asyncio.run(faults.kill_worker(srv, clients=6, max_tokens=120))
    print(res)
    assert res["ok"], res
    # every in-flight client was answered (a clean error), none hung or saw a broken connection
    assert set(res["client_outcomes"]) <= {"ok", "error:worker_died", "http 503 worker_died"}, res
    assert res["recovery_s"] < 120, res


def test_random_disconnects_leak_nothing(rel_server):
    res = asyncio.run(faults.disconnects(rel_server, clients=24, max_tokens=60, seed=1))
    print(res)
    assert res["ok"], res
    assert res["gauges_back_to_zero"], res


def test_sigterm_during_load_is_graceful(rel_start):
    srv = rel_start(shutdown_timeout=10)
    res = asyncio.run(faults.sigterm(srv, clients=6, max_tokens=30, shutdown_timeout=10))
    print(res)
    assert res["ok"], res


def test_sigterm_cuts_what_outlives_the_timeout_cleanly(rel_start):
    srv = rel_start(shutdown_timeout=1)
    res = asyncio.run(faults.sigterm(srv, clients=4, max_tokens=120, shutdown_timeout=1))
    print(res)
    assert res["ok"], res
    assert "error:shutting_down" in res["client_outcomes"] or "http 503 shutting_down" in res["client_outcomes"], res


def test_malformed_and_oversized_bodies(rel_server):
    res = asyncio.run(faults.bad_bodies(rel_server))
    failed = [c for c in res["cases"] if not c["ok"]]
    assert not failed, failed
    assert res["ok"], res


@pytest.mark.timeout(180)
def test_slow_stream_readers_do_not_block_others(rel_server):
    res = asyncio.run(faults.slow_clients(rel_server, slow=3, fast=6, read_delay=0.4, max_tokens=12, fast_requests=3))
    print(res)
    assert res["ok"], res
