"""Check 6: the Grafana dashboard is well formed, reads only the server's metrics (the
contract's names statically, the live /metrics exposition when the server runs)."""

from __future__ import annotations

import json
from collections import defaultdict

from deploy_support import DASHBOARD, dashboard_exprs, grafana_to_promql, promql_selectors

# The exporter's contract (server/metrics.py): name -> (type, labels besides model_name).
CONTRACT = {
    "adasd_requests_total": ("counter", {"method", "status"}),
    "adasd_prompt_tokens_total": ("counter", set()),
    "adasd_generation_tokens_total": ("counter", set()),
    "adasd_draft_tokens_total": ("counter", set()),
    "adasd_accepted_tokens_total": ("counter", {"check"}),
    "adasd_target_forwards_total": ("counter", set()),
    "adasd_draft_forwards_total": ("counter", set()),
    "adasd_time_to_first_token_seconds": ("histogram", set()),
    "adasd_inter_token_latency_seconds": ("histogram", set()),
    "adasd_e2e_request_latency_seconds": ("histogram", set()),
    "adasd_request_queue_time_seconds": ("histogram", set()),
    "adasd_request_acceptance_rate": ("histogram", set()),
    "adasd_request_speedup": ("histogram", set()),
    "adasd_request_mean_draft_length": ("histogram", set()),
    "adasd_num_requests_running": ("gauge", set()),
    "adasd_num_requests_waiting": ("gauge", set()),
    "adasd_worker_up": ("gauge", set()),
    "adasd_entropy_threshold": ("gauge", set()),
    "adasd_js_threshold": ("gauge", set()),
    "adasd_kv_blocks_total": ("gauge", set()),
    "adasd_kv_blocks_used": ("gauge", set()),
    "adasd_kv_blocks_cached": ("gauge", set()),
    "adasd_kv_cache_usage_perc": ("gauge", set()),
    "adasd_kv_cache_tokens_perc": ("gauge", set()),
    "adasd_prefix_cache_queries_total": ("counter", set()),
    "adasd_prefix_cache_hits_total": ("counter", set()),
    "adasd_num_preemptions_total": ("counter", set()),
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def selectors() -> list[tuple[str, str, dict[str, str]]]:
    """(panel title, metric name, label matchers) of every selector of every query."""
    return [(title, name, labels)
            for title, expr in dashboard_exprs(dashboard())
            for name, labels in promql_selectors(grafana_to_promql(expr))]


def family_of(name: str) -> str:
    """A series name as PromQL writes it, mapped back to its metric: histograms are queried
    through their _bucket/_sum/_count series."""
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and CONTRACT.get(name[: -len(suffix)], ("",))[0] == "histogram":
            return name[: -len(suffix)]
    return name


def test_dashboard_is_well_formed():
    d = dashboard()
    assert d["uid"] == "adasd" and 36 <= d["schemaVersion"] <= 41
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in d["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            refs = [t["refId"] for t in panel["targets"]]
            assert len(refs) == len(set(refs)), panel["title"]
    cells = {}
    for panel in d["panels"]:
        pos = panel["gridPos"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    assert "model_name" in variables["model"]["definition"]


def test_dashboard_has_the_panels_operators_need():
    titles = " | ".join(p["title"].lower() for p in dashboard()["panels"])
    for words in ("acceptance rate", "speedup", "tokens/s", "time to first token", "inter-token latency",
                  "running / waiting", "queue time", "draft length", "thresholds", "requests by status", "worker",
                  "kv blocks", "prefix-cache hit rate", "preemptions"):
        assert words in titles, words
    exprs = " ".join(e for _, e in dashboard_exprs(dashboard()))
    for q in ("histogram_quantile(0.5, sum by (le, model_name) (rate(adasd_request_speedup_bucket",
              "histogram_quantile(0.9, sum by (le, model_name) (rate(adasd_request_speedup_bucket",
              "histogram_quantile(0.99, sum by (le, model_name) (rate(adasd_time_to_first_token_seconds_bucket",
              "histogram_quantile(0.99, sum by (le, model_name) (rate(adasd_inter_token_latency_seconds_bucket",
              "adasd_entropy_threshold", "adasd_js_threshold"):
        assert q in exprs, q


def test_dashboard_uses_only_contract_metrics():
    used = set()
    for title, name, labels in selectors():
        family = family_of(name)
        assert family in CONTRACT, f"{title}: {name} is not a metric of the server's contract"
        kind, label_names = CONTRACT[family]
        assert name == family or kind == "histogram", f"{title}: {name}"
        assert kind != "histogram" or name != family, f"{title}: query {family} through _bucket/_sum/_count"
        assert set(labels) <= label_names | {"model_name"}, f"{title}: {name}{labels}"
        assert labels.get("model_name") == '=~.*', f"{title}: {name} is not filtered by $model"
        used.add(family)
    assert used == set(CONTRACT), f"metrics no panel shows: {sorted(set(CONTRACT) - used)}"


def exported_series(metrics_text: str) -> tuple[dict[str, set[str]], dict[str, dict[str, set[str]]], dict[str, str]]:
    """From an exposition: series name -> label names, series name -> label -> values, and
    series name -> type of its metric family."""
    from prometheus_client.parser import text_string_to_metric_families

    labels: dict[str, set[str]] = defaultdict(set)
    values: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    kinds: dict[str, str] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            labels[sample.name] |= set(sample.labels) - {"le"}
            for key, value in sample.labels.items():
                values[sample.name][key].add(value)
            kinds[sample.name] = family.type
    return labels, values, kinds


def test_dashboard_metrics_exported(metrics_text: str):
    """Every series the dashboard queries is in the running server's /metrics, with the
    labels and label values its queries filter on, and of the right type."""
    labels, values, kinds = exported_series(metrics_text)
    missing, problems = set(), []
    for title, name, matchers in selectors():
        if name not in labels:
            missing.add(name if name == family_of(name) else f"{name} (histogram {family_of(name)})")
            continue
        if name != family_of(name) and kinds[name] != "histogram":
            problems.append(f"{title}: {family_of(name)} is a {kinds[name]}, the dashboard reads it as a histogram")
        for label, matcher in matchers.items():
            if label not in labels[name]:
                problems.append(f"{title}: {name} has no label {label}")
            elif matcher.startswith("=") and not matcher.startswith("=~"):
                if matcher[1:] not in values[name][label]:
                    problems.append(f"{title}: no {name}{{{label}=\"{matcher[1:]}\"}} series (pre-create it)")
    assert not missing, f"metrics the dashboard reads but /metrics lacks: {sorted(missing)}"
    assert not problems, "\n".join(problems)
    for name in labels:
        if name.startswith("adasd_"):
            assert "model_name" in labels[name], f"{name} lacks the model_name label"
