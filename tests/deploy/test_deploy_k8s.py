"""Check 3: the Kubernetes manifests validate against the API schemas (kubernetes-validate,
bundled schemas, offline) and agree with each other and with the image."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from deploy_support import CONFIGS, K8S, require_package

# Oldest still-common cluster version and the newest the package knows.
KUBERNETES_VERSIONS = ["1.29.0", "latest"]
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def manifests() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def by_kind(kind: str) -> dict:
    found = [d for p in manifests() for d in documents(p) if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", manifests(), ids=lambda p: p.name)
def test_manifest_schema(path: Path, version: str):
    kv = require_package("kubernetes_validate", "pip install kubernetes-validate")
    version = kv.latest_version() if version == "latest" else version
    for doc in documents(path):
        if (doc.get("apiVersion"), doc.get("kind")) in CRD_KINDS:
            # A custom resource: no schema ships for it, so check its shape by hand.
            assert doc["metadata"]["name"] and doc["spec"]["selector"]["matchLabels"]
            assert all(e.get("port") and e.get("path") for e in doc["spec"]["endpoints"])
            continue
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as err:
            pytest.fail(f"{path.name} ({doc['kind']}) against {version}: {err.message} at {list(err.path)}")


def test_kustomization_lists_existing_files():
    k = kustomization()
    assert k["kind"] == "Kustomization"
    for name in k["resources"]:
        assert (K8S / name).is_file(), name
    assert {"configmap.yaml", "deployment.yaml", "service.yaml"} <= set(k["resources"])
    # The CRD-dependent ServiceMonitor stays opt-in, so `kubectl apply -k` works on any cluster.
    assert "servicemonitor.yaml" not in k["resources"]


def test_deployment_contract():
    deployment = by_kind("Deployment")
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    (container,) = spec["containers"]
    res = container["resources"]
    assert res["limits"]["nvidia.com/gpu"] == 1 and res["requests"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/ready"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "model load takes minutes"
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == "8000"
    assert ann["prometheus.io/path"] == "/metrics"
    assert pod["metadata"]["labels"] == deployment["spec"]["selector"]["matchLabels"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001, "the Dockerfile's adasd uid"

    env = {e["name"]: e.get("value") for e in container["env"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    config_volume = volumes["config"]["configMap"]
    (item,) = config_volume["items"]
    assert env["ADASD_CONFIG"] == f"{mounts['config']}/{item['path']}" == "/etc/adasd/config.yaml"
    assert env["HF_HOME"] == mounts["models"] == "/models"
    configmap = by_kind("ConfigMap")
    assert config_volume["name"] == configmap["metadata"]["name"]
    assert item["key"] in configmap["data"]
    assert any(e.get("configMapRef", {}).get("name") == configmap["metadata"]["name"] for e in container["envFrom"])
    assert container["ports"][0]["containerPort"] == 8000


def test_service_selects_the_pods():
    service = by_kind("Service")
    labels = by_kind("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] in ("http", 8000)


def test_configmap_settings():
    """The env keys are ADASD_* settings and config.yaml uses only the keys of configs/."""
    data = by_kind("ConfigMap")["data"]
    config = yaml.safe_load(data["config.yaml"])
    known = set()
    for path in CONFIGS.glob("*.yaml"):
        known |= set(yaml.safe_load(path.read_text()))
    assert set(config) <= known, set(config) - known
    for key in data:
        assert key == "config.yaml" or key.startswith("ADASD_"), key
