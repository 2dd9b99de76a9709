"""Check 7: every configs/*.yaml (and the Kubernetes ConfigMap's config.yaml) is read by
the server's own settings model; without the server, against the documented contract."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml
from deploy_support import CONFIGS, K8S

CONFIG_FILES = sorted(CONFIGS.glob("*.yaml"))

# The settings contract of the server (server/settings.py), for the checks that run without it.
KEYS = {
    "target", "draft", "served_model_name", "device", "dtype", "device_map", "trust_remote_code", "method",
    "k", "verification", "max_model_len", "host", "port", "api_key", "max_queue", "max_running",
    "max_body_bytes", "shutdown_timeout", "log_level", "tool_parser",
}
CHOICES = {
    "dtype": {"auto", "float32", "bfloat16", "float16"},
    "device_map": {None, "auto"},
    "method": {"ar", "vanilla", "gen-only", "verify-only", "adasd", "hybrid"},
    "verification": {"bayes", "threshold", "none"},
    "tool_parser": {"auto", "hermes", "llama3_json", "none"},
}
PAIRS = {
    "smollm2.yaml": ("smollm2", "auto"),
    "tiny.yaml": ("tiny", "tiny"),
    "llama-3.1-70b_llama-3.1-8b.yaml": ("meta-llama/Llama-3.1-70B-Instruct", "meta-llama/Llama-3.1-8B-Instruct"),
    "llama-3.1-70b_llama-3.2-1b.yaml": ("meta-llama/Llama-3.1-70B-Instruct", "meta-llama/Llama-3.2-1B-Instruct"),
    "qwen2.5-72b_qwen2.5-7b.yaml": ("Qwen/Qwen2.5-72B-Instruct", "Qwen/Qwen2.5-7B-Instruct"),
    "llama-3.1-8b_llama-3.2-1b.yaml": ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.2-1B-Instruct"),
    "qwen2.5-7b_qwen2.5-0.5b.yaml": ("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"),
    "llama-3.1-8b_eagle3.yaml": ("meta-llama/Llama-3.1-8B-Instruct", "yuhuili/EAGLE3-LLaMA3.1-Instruct-8B"),
}
# Published architectures: (layers, kv heads, head dim) -> KV bytes per token in bf16.
KV_KIB = {
    "meta-llama/Llama-3.1-70B-Instruct": 2 * 80 * 8 * 128 * 2 // 1024,
    "meta-llama/Llama-3.1-8B-Instruct": 2 * 32 * 8 * 128 * 2 // 1024,
    "meta-llama/Llama-3.2-1B-Instruct": 2 * 16 * 8 * 64 * 2 // 1024,
    "Qwen/Qwen2.5-72B-Instruct": 2 * 80 * 8 * 128 * 2 // 1024,
    "Qwen/Qwen2.5-7B-Instruct": 2 * 28 * 4 * 128 * 2 // 1024,
    "Qwen/Qwen2.5-0.5B-Instruct": 2 * 24 * 2 * 64 * 2 // 1024,
    "yuhuili/EAGLE3-LLaMA3.1-Instruct-8B": 2 * 1 * 8 * 128 * 2 // 1024,  # one decoder layer
}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def k8s_config(tmp_path: Path) -> Path:
    data = yaml.safe_load((K8S / "configmap.yaml").read_text())["data"]["config.yaml"]
    path = tmp_path / "k8s-config.yaml"
    path.write_text(data)
    return path


def test_the_expected_pairs_are_there():
    assert {p.name for p in CONFIG_FILES} == set(PAIRS)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_config_follows_the_contract(path: Path):
    config = load(path)
    assert set(config) <= KEYS, set(config) - KEYS
    for key, allowed in CHOICES.items():
        if key in config:
            assert config[key] in allowed, f"{key}: {config[key]!r}"
    assert re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", config["device"])
    assert isinstance(config["k"], int) and config["k"] >= 1
    assert (config["target"], config["draft"]) == PAIRS[path.name]
    assert config.get("trust_remote_code", False) is False
    family = "hermes" if "Qwen2.5" in config["target"] else "llama3_json" if "Llama-3.1" in config["target"] else None
    assert config.get("tool_parser") == family  # the parser of the family's tool-call format


BUILTIN = ("smollm2.yaml", "tiny.yaml")


@pytest.mark.parametrize("path", [p for p in CONFIG_FILES if p.name not in BUILTIN], ids=lambda p: p.name)
def test_hub_pair_header_sizes(path: Path):
    """The comment header states the GPUs and the KV cache per token of target and draft."""
    config = load(path)
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    assert "GPUs:" in header and "weights" in header and "KV cache" in header
    target, draft = KV_KIB[config["target"]], KV_KIB[config["draft"]]
    assert f"= {target} KiB/token" in header
    assert re.search(rf"=\s+{draft} KiB/token", header)
    assert f"{target + draft} KiB/token together" in header
    big = "70B" in config["target"] or "72B" in config["target"]
    assert config["dtype"] == "bfloat16"
    assert config["device_map"] == ("auto" if big else None)


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_pairs_run_anywhere(name):
    config = load(CONFIGS / name)
    assert config["device"] in ("auto", "cpu") and config["dtype"] == "auto"


@pytest.mark.parametrize("path", CONFIG_FILES + ["k8s"], ids=lambda p: getattr(p, "name", p))
def test_settings_from_yaml(path, tmp_path: Path, monkeypatch):
    """The server's own settings model accepts the file and reads back its values."""
    for name in [n for n in os.environ if n.startswith("ADASD_")]:
        monkeypatch.delenv(name)  # the environment would win over the file
    from server.settings import Settings

    path = k8s_config(tmp_path) if path == "k8s" else path
    settings = Settings.from_yaml(path)
    for key, value in load(path).items():
        assert getattr(settings, key) == value, key
