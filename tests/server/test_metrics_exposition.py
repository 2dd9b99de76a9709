"""server/metrics.py writes the exposition itself (cheap enough for an endpoint picker's 50 ms
scrapes): it must be the text prometheus_client would write for the same values, and the pool
gauges must follow the definitions in PoolState."""

from __future__ import annotations

import random
from dataclasses import fields

import pytest
from prometheus_client import CollectorRegistry, disable_created_metrics, generate_latest
from prometheus_client import Counter as PCounter
from prometheus_client import Gauge as PGauge
from prometheus_client import Histogram as PHistogram
from prometheus_client.parser import text_string_to_metric_families

from server.messages import KVUsage
from server.metrics import KV_COUNTERS, LATENCY_BUCKETS, AdasdMetrics, Counter, Gauge, Histogram, PoolState


def test_text_is_prometheus_clients():
    disable_created_metrics()
    ours: list = []
    theirs = CollectorRegistry()
    rng = random.Random(0)
    c = Counter(ours, "x_requests_total", 'Requests "quoted", back\\slash\nnewline.', ["model_name", "status"])
    pc = PCounter("x_requests_total", 'Requests "quoted", back\\slash\nnewline.', ["model_name", "status"],
                  registry=theirs)
    g = Gauge(ours, "x_level", "A level.", ["model_name"])
    pg = PGauge("x_level", "A level.", ["model_name"], registry=theirs)
    h = Histogram(ours, "x_latency_seconds", "Latency.", ["model_name"], buckets=LATENCY_BUCKETS)
    ph = PHistogram("x_latency_seconds", "Latency.", ["model_name"], buckets=LATENCY_BUCKETS, registry=theirs)
    for value in ("a", 'we"ird\\la\nbel'):
        for status in ("ok", "error"):
            n = rng.choice([0, 1, 7, 999_999, 1_000_000, 1_234_567, 12.5])
            c.labels(value, status).inc(n)
            pc.labels(value, status).inc(n)
        level = rng.choice([0.0, -3.25, 1e-9, 2.5e7, float("nan"), float("inf")])
        g.labels(value).set(level)
        pg.labels(value).set(level)
        # bucket bounds exactly (a value on a bound counts in that bucket), between and beyond them
        for v in list(LATENCY_BUCKETS) + [rng.uniform(0, 100) for _ in range(200)] + [0.0, 1e6]:
            h.labels(value).observe(v)
            ph.labels(value).observe(v)
    assert "".join(f.render() for f in ours) == generate_latest(theirs).decode()


def test_text_changes_with_values_and_only_then():
    m = AdasdMetrics("tiny")
    first = m.render()[0]
    assert m.render()[0] == first
    m.itl.observe(0.01)
    second = m.render()[0]
    assert second != first
    itl = {s.name: s.value for f in text_string_to_metric_families(second.decode()) for s in f.samples
           if s.name.startswith("adasd_inter_token_latency_seconds")}
    assert itl["adasd_inter_token_latency_seconds_count"] == 1 and itl["adasd_inter_token_latency_seconds_sum"] == 0.01


def test_pool_fractions_by_hand():
    pool = PoolState(running=3, waiting=2, blocks_total=80, block_size=16, blocks_used=30, blocks_cached=12,
                     target_bytes_per_token=4096, draft_bytes_per_token=1024, target_tokens=600, draft_tokens=500)
    assert pool.usage_fraction() == 30 / 80  # the cached blocks count as free
    # (600 * 4096 + 500 * 1024) / (80 * 16 * (4096 + 1024))
    assert pool.token_fraction() == pytest.approx(2969600 / 6553600)
    assert PoolState(blocks_used=9, blocks_total=8).usage_fraction() == 1.0
    assert PoolState().usage_fraction() == 0 == PoolState().token_fraction()  # no worker yet


def families(m: AdasdMetrics) -> dict:
    return {f.name: f for f in text_string_to_metric_families(m.render()[0].decode())}


def value(got: dict, family: str) -> float:
    (sample,) = got[family].samples
    assert sample.labels["model_name"] == "tiny", family
    return sample.value


READY = {"slots": 4, "kv_blocks": 520, "block_size": 16, "prefix_caching": True, "kv_bytes_per_block": 40960,
         "kv_bytes_per_token": {"target": 2048, "draft": 512}, "dtype": "bfloat16"}


@pytest.mark.parametrize("vllm_names", [False, True])
def test_pool_series(vllm_names):
    m = AdasdMetrics("tiny", vllm_names=vllm_names)
    before = families(m)
    assert "adasd_cache_config_info" not in before, "no pool sizes before a worker reports them"
    assert value(before, "adasd_kv_cache_usage_perc") == 0 == value(before, "adasd_kv_blocks_total")
    m.set_pool(READY)
    m.set_load(running=1, waiting=3)
    m.observe_kv(KVUsage(target_tokens=207, draft_tokens=207, blocks_used=13, blocks_cached=40))
    got = families(m)
    assert value(got, "adasd_kv_cache_usage_perc") == 13 / 520
    assert value(got, "adasd_kv_cache_tokens_perc") == pytest.approx(207 / (520 * 16))
    assert (value(got, "adasd_kv_blocks_total"), value(got, "adasd_kv_blocks_used"),
            value(got, "adasd_kv_blocks_cached")) == (520, 13, 40)
    (info,) = got["adasd_cache_config_info"].samples
    assert info.value == 1 and info.labels == {"model_name": "tiny", "block_size": "16", "num_gpu_blocks": "520",
                                               "cache_dtype": "bfloat16", "enable_prefix_caching": "True"}
    vllm = {"vllm:num_requests_waiting": 3, "vllm:num_requests_running": 1, "vllm:kv_cache_usage_perc": 13 / 520,
            "vllm:cache_config_info": 1}
    for name, expected in vllm.items():
        if vllm_names:
            assert got[name].type == "gauge" and value(got, name) == expected, name
        else:
            assert name not in got
    if vllm_names:
        assert got["vllm:cache_config_info"].samples[0].labels == info.labels
    m.set_pool(None)  # the worker died: nothing resident any more
    gone = families(m)
    assert value(gone, "adasd_kv_cache_tokens_perc") == 0 == value(gone, "adasd_kv_cache_usage_perc")
    assert value(gone, "adasd_kv_blocks_cached") == 0
    m.set_pool({**READY, "prefix_caching": False})
    (info,) = families(m)["adasd_cache_config_info"].samples
    assert info.labels["enable_prefix_caching"] == "False"


# the counters as Prometheus names them (prometheus_client's parser drops _total from a counter's family)
COUNTERS = {"prefix_queries": "adasd_prefix_cache_queries", "prefix_hits": "adasd_prefix_cache_hits",
            "preemptions": "adasd_num_preemptions"}
VLLM_COUNTERS = {"prefix_queries": "vllm:prefix_cache_queries", "prefix_hits": "vllm:prefix_cache_hits",
                 "preemptions": "vllm:num_preemptions"}


def counts(m: AdasdMetrics, names: dict[str, str]) -> dict[str, float]:
    got = families(m)
    out = {}
    for field, name in names.items():
        (sample,) = got[name].samples
        assert got[name].type == "counter" and sample.name == name + "_total", name
        out[field] = sample.value
    return out


@pytest.mark.parametrize("vllm_names", [False, True])
def test_kv_counters_count_on_across_worker_restarts(vllm_names):
    """The worker reports totals since it started; the front end adds their increments."""
    m = AdasdMetrics("tiny", vllm_names=vllm_names)
    zero = dict.fromkeys(COUNTERS, 0)
    assert counts(m, COUNTERS) == zero, "the counters exist from the start"
    m.set_pool(READY)
    m.observe_kv(KVUsage(prefix_queries=100, prefix_hits=32, preemptions=1))
    m.observe_kv(KVUsage(prefix_queries=100, prefix_hits=32, preemptions=1))  # unchanged: nothing added
    m.observe_kv(KVUsage(prefix_queries=250, prefix_hits=96, preemptions=2))
    assert counts(m, COUNTERS) == {"prefix_queries": 250, "prefix_hits": 96, "preemptions": 2}
    m.set_pool(None)  # the worker died; a new one counts from 0
    m.set_pool(READY)
    m.observe_kv(KVUsage(prefix_queries=40, prefix_hits=16))
    expected = {"prefix_queries": 290, "prefix_hits": 112, "preemptions": 2}
    assert counts(m, COUNTERS) == expected
    if vllm_names:
        assert counts(m, VLLM_COUNTERS) == expected
    else:
        assert not set(VLLM_COUNTERS.values()) & set(families(m))
    m.set_pool(READY)  # a new worker ready without an exit seen first: still a fresh baseline
    m.observe_kv(KVUsage(prefix_queries=10, prefix_hits=0, preemptions=0))
    assert counts(m, COUNTERS) == {**expected, "prefix_queries": 300}


def test_kv_usage_carries_every_counter():
    assert set(KV_COUNTERS) == set(COUNTERS) <= {f.name for f in fields(KVUsage)}
