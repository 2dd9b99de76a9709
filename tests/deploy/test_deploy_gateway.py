"""Check 9: the inference-gateway overlay (docker/k8s-gateway), without a cluster.

Both kustomizations render with `kubectl kustomize`; the core kinds validate against the API
schemas (kubernetes-validate) and the custom resources against the JSON schemas in schemas/
(check-jsonschema, offline); the pool, the route, the picker's Helm values, the ScaledObject and
the Deployment agree on names, labels and ports; and every metric the picker config and the
scaling query read exists, as a gauge, in a live server's /metrics and moves with its load.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time

import httpx
import pytest
import yaml
from deploy_support import (
    DOCKER,
    K8S,
    K8S_GATEWAY,
    kustomize_build,
    promql_selectors,
    require_package,
    run,
    schema_file,
)
from prometheus_client.parser import text_string_to_metric_families

CORE_GROUPS = ("v1", "apps/v1")
KUBERNETES_VERSIONS = ["1.29.0", "latest"]
# The labels Prometheus adds to the series it scrapes through the ServiceMonitor (not on /metrics).
TARGET_LABELS = {"namespace", "service", "pod", "job", "endpoint", "instance", "container"}
# llm-d-router's built-in engine config for vLLM (pods without the engine-type label).
VLLM_NAMES = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
              "vllm:cache_config_info")


@pytest.fixture(scope="module")
def base() -> list[dict]:
    return kustomize_build(K8S)


@pytest.fixture(scope="module")
def overlay() -> list[dict]:
    return kustomize_build(K8S_GATEWAY)


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def epp_values() -> dict:
    return yaml.safe_load((K8S_GATEWAY / "epp-values.yaml").read_text())


def picker_config() -> dict:
    custom = epp_values()["router"]["epp"]
    return yaml.safe_load(custom["pluginsCustomConfig"][custom["pluginsConfigFile"]])


def engine_config(name: str = "adasd") -> dict:
    (extractor,) = [p for p in picker_config()["plugins"] if p["type"] == "core-metrics-extractor"]
    (config,) = [c for c in extractor["parameters"]["engineConfigs"] if c["name"] == name]
    return config


def scaling_trigger(overlay: list[dict]) -> dict:
    (trigger,) = one(overlay, "ScaledObject")["spec"]["triggers"]
    return trigger


# ---------------------------------------------------------------------------- rendering and schemas


def test_both_kustomizations_render(base, overlay):
    assert sorted(d["kind"] for d in base) == ["ConfigMap", "Deployment", "Service"]
    assert sorted(d["kind"] for d in overlay) == ["ConfigMap", "Deployment", "HTTPRoute", "InferencePool", "Namespace",
                                                  "ScaledObject", "Service", "ServiceMonitor"]
    namespace = yaml.safe_load((K8S_GATEWAY / "kustomization.yaml").read_text())["namespace"]
    assert all(d["metadata"].get("namespace") == namespace for d in overlay if d["kind"] != "Namespace")
    assert one(overlay, "Namespace")["metadata"]["name"] == namespace


def test_overlay_deployment(base, overlay):
    """Replicas leave the Deployment (KEDA sets them); pods carry the engine-type label; probes."""
    assert one(base, "Deployment")["spec"]["replicas"] == 1
    deployment = one(overlay, "Deployment")
    assert "replicas" not in deployment["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels["llm-d.ai/engine-type"] == engine_config()["name"] == "adasd"
    # the selector is immutable in a live Deployment: the overlay must not change it
    assert deployment["spec"]["selector"] == one(base, "Deployment")["spec"]["selector"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["startupProbe"]["httpGet"]["path"] == "/ready"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_kinds_validate(base, overlay, version):
    kv = require_package("kubernetes_validate", "pip install kubernetes-validate")
    version = kv.latest_version() if version == "latest" else version
    core = [d for d in base + overlay if d["apiVersion"] in CORE_GROUPS]
    assert len(core) == 7
    for doc in core:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as err:
            pytest.fail(f"{doc['kind']} against {version}: {err.message} at {list(err.path)}")


def check_jsonschema(schema, docs: list[dict], tmp_path) -> subprocess.CompletedProcess:
    require_package("check_jsonschema", "pip install check-jsonschema")
    paths = []
    for i, doc in enumerate(docs):
        path = tmp_path / f"{i}-{doc.get('kind', 'doc')}.yaml"
        path.write_text(yaml.safe_dump(doc))
        paths.append(str(path))
    return run([sys.executable, "-m", "check_jsonschema", "--schemafile", str(schema), *paths])


def test_custom_resources_validate(overlay, tmp_path):
    custom = [d for d in overlay if d["apiVersion"] not in CORE_GROUPS]
    assert {d["kind"] for d in custom} == {"InferencePool", "HTTPRoute", "ScaledObject", "ServiceMonitor"}
    for doc in custom:
        result = check_jsonschema(schema_file(doc), [doc], tmp_path)
        assert result.returncode == 0, f"{doc['kind']}: {result.stdout}{result.stderr}"


def test_schemas_refuse_mistakes(overlay, tmp_path):
    """The schemas are strict: a threshold that is not a string, a misspelt field, a bad enum fail."""
    scaled = one(overlay, "ScaledObject")
    pool = one(overlay, "InferencePool")
    bad_threshold = yaml.safe_load(yaml.safe_dump(scaled))
    bad_threshold["spec"]["triggers"][0]["metadata"]["threshold"] = 8
    misspelt = yaml.safe_load(yaml.safe_dump(pool))
    misspelt["spec"]["targetPort"] = misspelt["spec"].pop("targetPorts")
    bad_mode = yaml.safe_load(yaml.safe_dump(pool))
    bad_mode["spec"]["endpointPickerRef"]["failureMode"] = "FailClosed"  # the CRD says FailClose
    for doc in (bad_threshold, misspelt, bad_mode):
        result = check_jsonschema(schema_file(doc), [doc], tmp_path)
        assert result.returncode == 1, f"accepted: {doc['spec']}"


def test_picker_config_validates(tmp_path):
    config = picker_config()
    schema = schema_file(config)
    result = check_jsonschema(schema, [config], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    typo = yaml.safe_load(yaml.safe_dump(config))
    (extractor,) = [p for p in typo["plugins"] if p["type"] == "core-metrics-extractor"]
    extractor["parameters"]["engineConfigs"][0]["kvUsageSpecs"] = "x"
    assert check_jsonschema(schema, [typo], tmp_path).returncode == 1
    # every profile plugin is declared, and the scorers the picker needs are there
    declared = {p.get("name", p["type"]) for p in config["plugins"]}
    for profile in config["schedulingProfiles"]:
        assert {p["pluginRef"] for p in profile["plugins"]} <= declared
    assert {"queue-scorer", "kv-cache-utilization-scorer", "metrics-data-source"} <= declared
    (source,) = [p for p in config["plugins"] if p["type"] == "metrics-data-source"]
    assert source["parameters"]["path"] == "/metrics"


# ---------------------------------------------------------------------------- agreement


def test_pool_route_picker_and_deployment_agree(overlay):
    deployment, service, pool = one(overlay, "Deployment"), one(overlay, "Service"), one(overlay, "InferencePool")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    container_ports = {p["containerPort"] for p in container["ports"]}

    selector = pool["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items(), "the pool selects no adasd pod"
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [8000] and 8000 in container_ports

    values = epp_values()["router"]
    assert values["inferencePool"]["create"] is False, "the pool is ours: the chart must not make a second one"
    assert values["modelServers"]["matchLabels"] == selector
    assert values["modelServers"]["targetPorts"] == pool["spec"]["targetPorts"]

    # the picker's Service is the chart's `<release>-epp`, release and namespace as DEPLOY.md installs it
    deploy_md = (DOCKER / "DEPLOY.md").read_text()
    m = re.search(r"helm (?:upgrade -i|install) (\S+) oci://ghcr\.io/llm-d/charts/llm-d-router-gateway\s.*?-n (\S+)",
                  deploy_md)
    assert m, "DEPLOY.md does not show the chart's install command"
    release, namespace = m.groups()
    ref = pool["spec"]["endpointPickerRef"]
    assert ref["name"] == f"{release}-epp" and ref["port"]["number"] == 9002
    assert namespace == pool["metadata"]["namespace"]

    route = one(overlay, "HTTPRoute")
    (rule,) = route["spec"]["rules"]
    (backend,) = rule["backendRefs"]
    assert (backend["group"], backend["kind"], backend["name"]) == (
        "inference.networking.k8s.io", "InferencePool", pool["metadata"]["name"])
    assert route["spec"]["parentRefs"][0]["name"] == "inference-gateway"
    assert "name: inference-gateway" in deploy_md, "DEPLOY.md must create the Gateway the route attaches to"

    monitor = one(overlay, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod_labels.items()


def test_scaler_targets_the_deployment_at_max_running(overlay):
    """The threshold per replica is the server's slot count: scale out when every slot is busy."""
    from server.settings import Settings

    scaled = one(overlay, "ScaledObject")
    deployment = one(overlay, "Deployment")
    target = scaled["spec"]["scaleTargetRef"]
    assert (target.get("kind", "Deployment"), target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 1 <= scaled["spec"]["minReplicaCount"] < scaled["spec"]["maxReplicaCount"]
    trigger = scaling_trigger(overlay)
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    config = one(overlay, "ConfigMap")["data"]
    max_running = int(config.get("ADASD_MAX_RUNNING") or yaml.safe_load(config["config.yaml"]).get("max_running")
                      or Settings.model_fields["max_running"].default)
    assert float(trigger["metadata"]["threshold"]) == max_running
    query_labels = [labels for _, labels in promql_selectors(trigger["metadata"]["query"])]
    namespace = scaled["metadata"]["namespace"]
    service = one(overlay, "Service")["metadata"]["name"]
    assert all(labels == {"namespace": f"={namespace}", "service": f"={service}"} for labels in query_labels), (
        "the query must select this pool's series only")


# ---------------------------------------------------------------------------- a live server's /metrics


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """The picker's metric spec: name, or name{label=value,...} (values quoted or not)."""
    m = re.fullmatch(r"\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*(?:\{([^}]*)\})?\s*", spec)
    assert m, f"not a metric spec: {spec!r}"
    labels = {}
    for pair in filter(None, (m.group(2) or "").split(",")):
        key, _, value = pair.partition("=")
        labels[key.strip()] = value.strip().strip('"')
    return m.group(1), labels


def scrape(base_url: str) -> dict:
    """{family name: (type, [samples])} of GET /metrics."""
    text = httpx.get(base_url + "/metrics", timeout=10).text
    return {f.name: (f.type, f.samples) for f in text_string_to_metric_families(text)}


def gauge_value(families: dict, name: str, **labels) -> float:
    kind, samples = families[name]
    assert kind == "gauge", f"{name} is a {kind}"
    (sample,) = [s for s in samples if labels.items() <= s.labels.items()]
    return sample.value


def test_picker_and_scaler_metrics_exist_as_gauges(picker_server, overlay):
    families = scrape(picker_server.base_url)
    config = engine_config()
    for field in ("queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec", "cacheInfoSpec"):
        name, labels = parse_spec(config[field])
        assert name in families, f"{field}: {name} is not on /metrics"
        kind, samples = families[name]
        assert kind == "gauge", f"{field}: {name} is a {kind}, the picker reads gauges"
        matching = [s for s in samples if labels.items() <= s.labels.items()]
        assert len(matching) == 1, f"{field}: one series per pod expected, {len(matching)} match {labels}"
    (info,) = families[parse_spec(config["cacheInfoSpec"])[0]][1]
    int(info.labels["block_size"]), int(info.labels["num_gpu_blocks"])  # the picker's Atoi
    for name in VLLM_NAMES:  # ADASD_VLLM_METRIC_NAMES=true: what unlabelled pods are read with
        assert families.get(name, ("missing",))[0] == "gauge", name

    for name, labels in promql_selectors(scaling_trigger(overlay)["metadata"]["query"]):
        assert families.get(name, ("missing",))[0] == "gauge", f"the scaling query reads {name}"
        assert set(labels) <= TARGET_LABELS | {k for s in families[name][1] for k in s.labels}


def test_picker_metrics_follow_the_load(picker_server):
    """One request at a time: a first one holds the blocks its tokens fill (usage above 0, tokens resident),
    a second waits; then all 0 (the blocks left in the prefix cache count as free)."""
    base = picker_server.base_url
    ready = httpx.get(base + "/ready", timeout=10).json()
    assert ready["slots"] == 1
    idle = scrape(base)
    for name in ("adasd_kv_cache_usage_perc", "vllm:kv_cache_usage_perc", "adasd_kv_cache_tokens_perc",
                 "adasd_num_requests_running", "vllm:num_requests_waiting"):
        assert gauge_value(idle, name) == 0, name
    (info,) = idle["adasd_cache_config_info"][1]
    from adasd_core.drafting import WINDOW

    blocks, block_size = ready["kv_blocks"], ready["block_size"]
    assert info.labels["num_gpu_blocks"] == str(blocks) and info.labels["block_size"] == str(block_size) == "16"
    assert info.labels["enable_prefix_caching"] == "True"
    assert blocks * block_size >= ready["context_length"], "one full-length sequence fits"

    body = {"model": "tiny", "prompt": "def f(x):", "max_tokens": 100, "temperature": 0, "ignore_eos": True,
            "adasd": {"method": "ar"}}
    threads = [threading.Thread(target=httpx.post, args=(base + "/v1/completions",),
                                kwargs={"json": body, "timeout": 120})
               for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.3)
    try:
        deadline, busy = time.monotonic() + 30, None
        while time.monotonic() < deadline:
            snap = scrape(base)
            if (gauge_value(snap, "adasd_num_requests_waiting") == 1
                    and gauge_value(snap, "adasd_kv_cache_tokens_perc") > 0):
                busy = snap
                break
            time.sleep(0.05)
        assert busy is not None, picker_server.log_tail()
        assert gauge_value(busy, "adasd_num_requests_running") == gauge_value(busy, "vllm:num_requests_running") == 1
        assert gauge_value(busy, "vllm:num_requests_waiting") == 1
        # tokens resident: at most the prompt (a token per character at most, and BOS), the 100
        # tokens and a draft window, in the blocks they fill
        most = len(body["prompt"]) + 1 + 100 + WINDOW
        usage = gauge_value(busy, "adasd_kv_cache_usage_perc")
        assert usage == gauge_value(busy, "vllm:kv_cache_usage_perc")
        assert 0 < usage <= -(-most // block_size) / blocks
        assert 0 < gauge_value(busy, "adasd_kv_cache_tokens_perc") <= min(usage, most / (blocks * block_size))
    finally:
        for t in threads:
            t.join(120)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        after = scrape(base)
        if (gauge_value(after, "adasd_kv_cache_tokens_perc") == 0
                and gauge_value(after, "adasd_kv_cache_usage_perc") == 0):
            break
        time.sleep(0.05)
    assert gauge_value(after, "adasd_kv_cache_tokens_perc") == 0 == gauge_value(after, "adasd_kv_cache_usage_perc")
    assert gauge_value(after, "adasd_num_requests_waiting") == 0 == gauge_value(after, "vllm:num_requests_running")
