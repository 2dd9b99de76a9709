"""/metrics: the exact names the dashboard uses, and a real Prometheus server scraping them."""

from __future__ import annotations

import shutil
import subprocess
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_support import free_port

COUNTERS = ["adasd_requests_total", "adasd_prompt_tokens_total", "adasd_generation_tokens_total",
            "adasd_draft_tokens_total", "adasd_accepted_tokens_total", "adasd_target_forwards_total",
            "adasd_draft_forwards_total"]
HISTOGRAMS = ["adasd_time_to_first_token_seconds", "adasd_inter_token_latency_seconds",
              "adasd_e2e_request_latency_seconds", "adasd_request_queue_time_seconds", "adasd_request_acceptance_rate",
              "adasd_request_speedup", "adasd_request_mean_draft_length"]
GAUGES = ["adasd_num_requests_running", "adasd_num_requests_waiting", "adasd_worker_up", "adasd_entropy_threshold",
          "adasd_js_threshold"]


def traffic(client, n: int = 2) -> None:
    for i in range(n):
        client.completions.create(model="tiny", prompt=f"x = {i}\n", max_tokens=6, temperature=1.0, seed=i,
                                  extra_body={"ignore_eos": True, "adasd": {"verification": "threshold"}})


def samples(server) -> dict[str, list]:
    text = httpx.get(server.base_url + "/metrics").text
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


def test_metric_names_labels_and_values(server, client):
    before = server.metric("adasd_generation_tokens_total")
    traffic(client)
    got = samples(server)
    names = COUNTERS + GAUGES + [h + suffix for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")]
    missing = [n for n in names if n not in got]
    assert not missing
    for name in names:
        for s in got[name]:
            assert s.labels.get("model_name") == "tiny", s
    assert {s.labels["check"] for s in got["adasd_accepted_tokens_total"]} == {"standard", "relaxed"}
    assert server.metric("adasd_generation_tokens_total") == before + 12
    assert server.metric("adasd_requests_total", method="adasd", status="success") >= 2
    assert server.metric("adasd_worker_up") == 1
    assert server.metric("adasd_time_to_first_token_seconds_count") >= 2
    assert server.metric("adasd_request_queue_time_seconds_count") >= 2
    assert server.metric("adasd_js_threshold") > 0  # threshold verification reports T_V
    assert server.metric("adasd_entropy_threshold") > 0
    drafted, accepted = server.metric("adasd_draft_tokens_total"), server.metric("adasd_accepted_tokens_total")
    assert 0 < drafted and 0 <= accepted <= drafted
    assert server.metric("adasd_num_requests_running") == 0 and server.metric("adasd_num_requests_waiting") == 0


PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


@pytest.mark.skipif(not shutil.which(PROMETHEUS), reason="needs the prometheus binary (apt-get install prometheus)")
def test_prometheus_scrapes_the_server(server, client, tmp_path):
    prom_port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: adasd\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{server.port}']\n"
    )
    log = open(tmp_path / "prometheus.log", "w")
    prom = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        traffic(client)
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
        rate = httpx.get(api, params={"query": "sum(adasd_accepted_tokens_total) / sum(adasd_draft_tokens_total)"}).json()
        assert rate["status"] == "success"
    finally:
        prom.terminate()
        prom.wait(10)
        log.close()
