"""Check 5: docker/compose.yaml (and its CPU override, merged the way Compose merges it)
validates against the compose-spec JSON schema, and its services wire together."""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path

import pytest
import yaml
from deploy_support import CONFIGS, DOCKER, REPO, require_package

COMPOSE = DOCKER / "compose.yaml"
COMPOSE_CPU = DOCKER / "compose.cpu.yaml"


class _Reset:
    """Compose's `!reset` tag: the key is removed from the merged model."""


class ComposeLoader(yaml.SafeLoader):
    pass


ComposeLoader.add_constructor("!reset", lambda loader, node: _Reset())


def load(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=ComposeLoader)  # noqa: S506 - SafeLoader subclass


def merge(base, override):
    """Compose's merge of an override file, enough for mappings, scalars and `!reset`."""
    if isinstance(override, _Reset):
        return _Reset()
    if isinstance(base, dict) and isinstance(override, dict):
        out = copy.deepcopy(base)
        for key, value in override.items():
            merged = merge(out.get(key), value)
            if isinstance(merged, _Reset):
                out.pop(key, None)
            else:
                out[key] = merged
        return out
    return copy.deepcopy(override)


@pytest.fixture(scope="module")
def schema() -> dict:
    # check-jsonschema vendors the compose-spec schema (Apache-2.0) with its licence.
    require_package("check_jsonschema", "pip install check-jsonschema")
    vendor = resources.files("check_jsonschema") / "builtin_schemas" / "vendor"
    return json.loads((vendor / "compose-spec.json").read_text())


def validate(schema: dict, document: dict) -> list[str]:
    jsonschema = require_package("jsonschema", "pip install jsonschema")
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    errors = sorted(cls(schema).iter_errors(document), key=lambda e: list(e.path))
    return [f"{'/'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors]


def test_compose_schema(schema):
    assert validate(schema, load(COMPOSE)) == []


def test_compose_cpu_override_schema(schema):
    merged = merge(load(COMPOSE), load(COMPOSE_CPU))
    assert validate(schema, merged) == []
    adasd = merged["services"]["adasd"]
    assert adasd["build"]["args"]["VARIANT"] == "cpu"
    assert "deploy" not in adasd, "the CPU variant reserves no GPU"


def test_schema_catches_mistakes(schema):
    broken = load(COMPOSE)
    broken["services"]["adasd"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] = "gpu"
    broken["services"]["adasd"]["portz"] = ["8000:8000"]
    assert len(validate(schema, broken)) >= 2


def test_services_wire_together():
    compose = load(COMPOSE)
    services = compose["services"]
    assert {"adasd", "prometheus", "grafana"} <= set(services)
    adasd = services["adasd"]
    assert (DOCKER / adasd["build"]["context"] / adasd["build"]["dockerfile"]).resolve() == REPO / "Dockerfile"
    (device,) = adasd["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    assert any(p.endswith(":8000") for p in adasd["ports"])
    volumes = {v.split(":")[1]: v.split(":")[0] for v in adasd["volumes"]}
    assert volumes["/models"] in compose["volumes"]
    assert (DOCKER / volumes["/app/configs"]).resolve() == CONFIGS
    default_config = adasd["environment"]["ADASD_CONFIG"].split(":-")[1].rstrip("}")
    assert (CONFIGS / Path(default_config).relative_to("/app/configs")).is_file()

    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name}: {source}"
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]


def test_grafana_provisioning():
    grafana = load(COMPOSE)["services"]["grafana"]
    mounts = {v.split(":")[1]: DOCKER / v.split(":")[0] for v in grafana["volumes"] if v.startswith(".")}
    provisioning = mounts["/etc/grafana/provisioning"]
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "dashboards.yaml").read_text())["providers"]
    container_path = provider["options"]["path"]
    assert (mounts[container_path] / "adasd.json").is_file()
    dashboard = json.loads((mounts[container_path] / "adasd.json").read_text())
    assert dashboard["templating"]["list"][0]["current"]["value"] == datasource["uid"]
