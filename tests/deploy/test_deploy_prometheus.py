"""Check 4: promtool accepts the compose stack's Prometheus config, and every dashboard
query parses as PromQL (promtool check rules on a rule file made from them)."""

from __future__ import annotations

import json

import yaml
from deploy_support import DASHBOARD, DOCKER, dashboard_exprs, grafana_to_promql, require_tool, run

PROMETHEUS_YML = DOCKER / "prometheus" / "prometheus.yml"


def test_promtool_check_config():
    promtool = require_tool("promtool", "apt-get install -y prometheus")
    result = run([promtool, "check", "config", str(PROMETHEUS_YML)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_scrapes_adasd_every_5s():
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "adasd"]
    assert job["scrape_interval"] == "5s"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == ["adasd:8000"]


def test_dashboard_queries_parse(tmp_path):
    promtool = require_tool("promtool", "apt-get install -y prometheus")
    exprs = dashboard_exprs(json.loads(DASHBOARD.read_text()))
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": grafana_to_promql(expr)} for i, (_, expr) in enumerate(exprs)
    ]}]}
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = run([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
