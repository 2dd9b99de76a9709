"""server/metrics.py writes the exposition itself (cheap enough for an endpoint picker's 50 ms
scrapes): it must be the text prometheus_client would write for the same values, and the pool
gauges must follow the definitions in PoolState."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, disable_created_metrics, generate_latest
from prometheus_client import Counter as PCounter
from prometheus_client import Gauge as PGauge
from prometheus_client import Histogram as PHistogram
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import LATENCY_BUCKETS, AdasdMetrics, Counter, Gauge, Histogram, PoolState


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
    pool = PoolState(running=3, waiting=2, slots=8, slot_tokens=1000, target_bytes_per_token=4096,
                     draft_bytes_per_token=1024, target_tokens=600, draft_tokens=500)
    assert pool.reserved_fraction() == 3 / 8
    # (600 * 4096 + 500 * 1024) / (8 * 1000 * (4096 + 1024))
    assert pool.token_fraction() == pytest.approx(2969600 / 40960000)
    assert PoolState(running=9, slots=8).reserved_fraction() == 1.0  # a request between "done" and its release
    assert PoolState().reserved_fraction() == 0 == PoolState().token_fraction()  # no worker yet


def families(m: AdasdMetrics) -> dict:
    return {f.name: f for f in text_string_to_metric_families(m.render()[0].decode())}


@pytest.mark.parametrize("vllm_names", [False, True])
def test_pool_series(vllm_names):
    m = AdasdMetrics("tiny", vllm_names=vllm_names)
    before = families(m)
    assert "adasd_cache_config_info" not in before, "no pool sizes before a worker reports them"
    assert before["adasd_kv_cache_usage_perc"].samples[0].value == 0
    m.set_pool({"slots": 4, "slot_tokens": 2070, "kv_bytes_per_token": {"target": 2048, "draft": 512},
                "dtype": "bfloat16"})
    m.set_load(running=1, waiting=3)
    m.set_kv_tokens(207, 207)
    got = families(m)
    assert got["adasd_kv_cache_usage_perc"].samples[0].value == 0.25
    assert got["adasd_kv_cache_tokens_perc"].samples[0].value == pytest.approx(207 / (4 * 2070))
    (info,) = got["adasd_cache_config_info"].samples
    assert info.value == 1 and info.labels == {"model_name": "tiny", "block_size": "2070", "num_gpu_blocks": "4",
                                               "cache_dtype": "bfloat16", "enable_prefix_caching": "False"}
    vllm = {"vllm:num_requests_waiting": 3, "vllm:num_requests_running": 1, "vllm:kv_cache_usage_perc": 0.25,
            "vllm:cache_config_info": 1}
    for name, value in vllm.items():
        if vllm_names:
            assert got[name].type == "gauge" and got[name].samples[0].value == value, name
            assert got[name].samples[0].labels["model_name"] == "tiny"
        else:
            assert name not in got
    m.set_pool(None)  # the worker died: nothing resident any more
    assert families(m)["adasd_kv_cache_tokens_perc"].samples[0].value == 0
