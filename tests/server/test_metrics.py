"""/metrics: the exact names the dashboard uses, values that match each request's own usage,
and a real Prometheus server scraping them."""

from __future__ import annotations

import math
import shutil
import subprocess
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_support import ServerProcess, free_port

from scripts.reliability.serverproc import metrics as scrape
from server.metrics import AdasdMetrics

COUNTERS = ["adasd_requests_total", "adasd_prompt_tokens_total", "adasd_generation_tokens_total",
            "adasd_draft_tokens_total", "adasd_accepted_tokens_total", "adasd_target_forwards_total",
            "adasd_draft_forwards_total"]
HISTOGRAMS = ["adasd_time_to_first_token_seconds", "adasd_inter_token_latency_seconds",
              "adasd_e2e_request_latency_seconds", "adasd_request_queue_time_seconds", "adasd_request_acceptance_rate",
              "adasd_request_speedup", "adasd_request_mean_draft_length"]
GAUGES = ["adasd_num_requests_running", "adasd_num_requests_waiting", "adasd_worker_up", "adasd_entropy_threshold",
          "adasd_js_threshold"]
# counter -> the usage.speculative field it adds up (accepted tokens: one series per check)
COUNTER_FIELDS = {("adasd_prompt_tokens_total", ()): "prompt_tokens",
                  ("adasd_generation_tokens_total", ()): "generated_tokens",
                  ("adasd_draft_tokens_total", ()): "drafted_tokens",
                  ("adasd_accepted_tokens_total", (("check", "standard"),)): "accepted_standard",
                  ("adasd_accepted_tokens_total", (("check", "relaxed"),)): "accepted_relaxed",
                  ("adasd_target_forwards_total", ()): "target_forwards",
                  ("adasd_draft_forwards_total", ()): "draft_forwards"}
THRESHOLD_GAUGES = {"adasd_entropy_threshold": "entropy_threshold", "adasd_js_threshold": "js_threshold"}
# On the tempered pair (tests/conftest.py) a candidate is accepted with probability ~0.4 and
# rejected otherwise: 48 tokens (~50 scored candidates) fill both groups, so T_G and T_V are known.
LONG_SAMPLED = dict(model="tiny", max_tokens=48, temperature=1.0,
                    extra_body={"ignore_eos": True, "adasd": {"method": "adasd", "verification": "threshold"}})


def samples(server) -> dict[str, list]:
    text = httpx.get(server.base_url + "/metrics").text
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


def value(snapshot: dict, name: str, **labels) -> float:
    """The sample `name` of a scrape whose labels are model_name="tiny" plus `labels`."""
    key = (name, tuple(sorted({"model_name": "tiny", **labels}.items())))
    return snapshot[key]


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def exported(m: AdasdMetrics) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(m.render()[0].decode()) for s in family.samples}


def test_exporter_adds_up_stats_and_keeps_the_last_known_thresholds():
    m = AdasdMetrics("tiny")
    start = exported(m)
    assert math.isnan(value(start, "adasd_entropy_threshold")) and math.isnan(value(start, "adasd_js_threshold"))
    assert value(start, "adasd_requests_total", method="adasd", status="success") == 0
    stats = dict(method="adasd", prompt_tokens=5, generated_tokens=12, rounds=3, drafted_tokens=10, accepted_standard=6,
                 accepted_relaxed=2, target_forwards=4, draft_forwards=13, acceptance_rate=0.8,
                 mean_draft_length=3.3333, estimated_speedup=1.5, entropy_threshold=1.25, js_threshold=0.32)
    m.observe_request("adasd", "success", stats)
    after_first = exported(m)
    assert value(after_first, "adasd_entropy_threshold") == 1.25 and value(after_first, "adasd_js_threshold") == 0.32
    # a request that did not learn its thresholds (no rejection yet) leaves the gauges as they were
    m.observe_request("adasd", "success", {**stats, "entropy_threshold": None, "js_threshold": None})
    # method ar drafts nothing: no acceptance rate and no draft length to observe
    ar = dict(method="ar", prompt_tokens=5, generated_tokens=7, rounds=7, target_forwards=8, drafted_tokens=0,
              acceptance_rate=0.0, mean_draft_length=0.0)
    m.observe_request("ar", "success", ar)
    m.observe_request("adasd", "cancelled", None)
    got = exported(m)
    for (name, labels), field in COUNTER_FIELDS.items():
        assert value(got, name, **dict(labels)) == 2 * stats[field] + ar.get(field, 0), name
    assert value(got, "adasd_requests_total", method="adasd", status="success") == 2
    assert value(got, "adasd_requests_total", method="ar", status="success") == 1
    assert value(got, "adasd_requests_total", method="adasd", status="cancelled") == 1
    assert value(got, "adasd_request_acceptance_rate_count") == 2
    assert value(got, "adasd_request_acceptance_rate_sum") == pytest.approx(1.6)
    assert value(got, "adasd_request_mean_draft_length_count") == 2
    assert value(got, "adasd_request_speedup_sum") == pytest.approx(3.0)
    assert value(got, "adasd_entropy_threshold") == 1.25 and value(got, "adasd_js_threshold") == 0.32


def test_metric_names_and_labels(server, client):
    client.completions.create(prompt="x = 0\n", seed=0, **{**LONG_SAMPLED, "max_tokens": 4})
    got = samples(server)
    names = COUNTERS + GAUGES + [h + suffix for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")]
    missing = [n for n in names if n not in got]
    assert not missing
    for name in names:
        for s in got[name]:
            assert s.labels.get("model_name") == "tiny", s


@pytest.fixture(scope="module")
def tempered_server(tempered_pair_dir, tmp_path_factory):
    # the draft is as large as its target, so the batch-aware cap would (rightly) stop drafting: off here
    srv = ServerProcess(tempered_pair_dir, tmp_path_factory.mktemp("tempered_server"), batch_aware=False)
    srv.wait_ready()
    yield srv
    srv.stop()


def test_metrics_match_each_requests_usage(tempered_server):
    """Counters grow by exactly what the request's usage reports; the threshold gauges show its T_G and T_V."""
    import openai

    with openai.OpenAI(base_url=tempered_server.base_url + "/v1", api_key="none", max_retries=0, timeout=120) as client:
        for seed in (0, 1):
            before = scrape(tempered_server.base_url)
            r = client.completions.create(prompt=f"x = {seed}\n", seed=seed, **LONG_SAMPLED)
            after = scrape(tempered_server.base_url)
            spec = r.usage.speculative
            assert spec["generated_tokens"] == r.usage.completion_tokens == 48

            def delta(name, after=after, before=before, **labels):
                return value(after, name, **labels) - value(before, name, **labels)

            for (name, labels), field in COUNTER_FIELDS.items():
                assert delta(name, **dict(labels)) == spec[field], (name, spec)
            assert delta("adasd_requests_total", method="adasd", status="success") == 1
            for h in ("adasd_time_to_first_token_seconds", "adasd_e2e_request_latency_seconds",
                      "adasd_request_queue_time_seconds", "adasd_request_acceptance_rate",
                      "adasd_request_mean_draft_length"):
                assert delta(h + "_count") == 1, h
            assert delta("adasd_request_acceptance_rate_sum") == pytest.approx(spec["acceptance_rate"])
            assert delta("adasd_request_mean_draft_length_sum") == pytest.approx(spec["mean_draft_length"])
            assert spec["entropy_threshold"] is not None and spec["js_threshold"] is not None, spec  # see LONG_SAMPLED
            for gauge, field in THRESHOLD_GAUGES.items():
                assert value(after, gauge) == spec[field], gauge
    assert value(after, "adasd_worker_up") == 1
    assert value(after, "adasd_num_requests_running") == 0 and value(after, "adasd_num_requests_waiting") == 0


def test_prometheus_scrapes_the_server(server, client, tmp_path):
    prometheus = shutil.which("prometheus")
    assert prometheus, ("the prometheus binary is missing: `make test` installs it, "
                        "or run: sudo apt-get install -y prometheus")
    prom_port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: adasd\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{server.port}']\n"
    )
    log = open(tmp_path / "prometheus.log", "w")
    prom = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        client.completions.create(prompt="x = 0\n", seed=0, **{**LONG_SAMPLED, "max_tokens": 6})
        api = f"http://127.0.0.1:{prom_port}/api/v1/query"
        deadline, result = time.monotonic() + 60, []
        while time.monotonic() < deadline:
            try:
                r = httpx.get(api, params={"query": 'adasd_generation_tokens_total{model_name="tiny"}'}, timeout=5)
                result = r.json()["data"]["result"] if r.status_code == 200 else []
            except httpx.TransportError:
                result = []
            if result and float(result[0]["value"][1]) > 0:
                break
            time.sleep(0.5)
        assert result and float(result[0]["value"][1]) > 0, (tmp_path / "prometheus.log").read_text()[-2000:]
        assert result[0]["metric"]["job"] == "adasd"
        up = httpx.get(api, params={"query": "adasd_worker_up"}).json()["data"]["result"]
        assert float(up[0]["value"][1]) == 1
        query = "sum(adasd_accepted_tokens_total) / sum(adasd_draft_tokens_total)"
        rate = httpx.get(api, params={"query": query}).json()
        assert rate["status"] == "success"
    finally:
        prom.terminate()
        prom.wait(10)
        log.close()
