"""A JSON schema for one version of a CustomResourceDefinition, for offline validation with
check-jsonschema (tests/deploy vendors the schemas this writes; see tests/deploy/schemas/README.md).

    python scripts/deploy/crd_schema.py CRD.yaml v1 OUT.json

The CRD's openAPIV3Schema becomes JSON Schema: descriptions and the x-kubernetes-* extensions are
dropped (CEL rules cannot be checked offline), int-or-string becomes anyOf integer / string,
nullable adds null, and every object with declared properties refuses unknown fields (as
`kubectl apply --validate=strict` does) unless the CRD preserves unknown fields there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml


def convert(node):
    if isinstance(node, list):
        return [convert(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: convert(v) for k, v in node.items()
           if k != "description" and not k.startswith("x-kubernetes-") and k != "nullable"}
    if "properties" in node and "properties" in out:  # a property named "description" is kept
        out["properties"] = {k: convert(v) for k, v in node["properties"].items()}
    if node.get("x-kubernetes-int-or-string"):
        out = {"anyOf": [{"type": "integer"}, {"type": "string"}], **{k: v for k, v in out.items() if k != "type"}}
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    preserve = node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-embedded-resource")
    if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


def crd_schema(crd: dict, version: str) -> dict:
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = convert(served["schema"]["openAPIV3Schema"])
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    schema["properties"]["apiVersion"] = {"const": f"{group}/{version}"}
    schema["properties"]["kind"] = {"const": kind}
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata"})
    return {"$schema": "http://json-schema.org/draft-07/schema#", "title": f"{kind} {group}/{version}", **schema}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("crd", type=Path)
    p.add_argument("version")
    p.add_argument("out", type=Path)
    args = p.parse_args()
    crd = next(d for d in yaml.safe_load_all(args.crd.read_text()) if d and d.get("kind") == "CustomResourceDefinition")
    args.out.write_text(json.dumps(crd_schema(crd, args.version), indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
