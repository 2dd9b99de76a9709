"""The image's install step, without Docker: the files a `docker build .` of a clean
checkout sends (after .dockerignore) build a wheel that carries the server, the `adasd`
command and the embedded demo pair (package data the CPU image serves)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile

import pytest
from deploy_support import REPO, build_context_files, checkout_files

WEIGHTS = "adasd_core/demo/weights/"


@pytest.fixture(scope="module")
def context_files() -> list[str]:
    assert shutil.which("git") and (REPO / ".git").exists(), "needs git and a git checkout to list the build context"
    return build_context_files()


@pytest.fixture(scope="module")
def wheel(context_files: list[str], tmp_path_factory) -> zipfile.ZipFile:
    ctx = tmp_path_factory.mktemp("context")
    for name in context_files:
        (ctx / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, ctx / name)
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(out), str(ctx)]
    if importlib.util.find_spec("setuptools") is not None:
        cmd.insert(4, "--no-build-isolation")  # the backend is here: no download needed
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (path,) = out.glob("*.whl")
    return zipfile.ZipFile(path)


def test_context_has_what_the_dockerfile_copies(context_files: list[str]):
    assert "pyproject.toml" in context_files
    assert any(f.startswith("configs/") for f in context_files)
    assert not any(f.startswith(("tests/", ".git/", "docker/")) for f in context_files)


def test_wheel_carries_the_server(wheel: zipfile.ZipFile):
    names = wheel.namelist()
    assert "adasd_core/cli.py" in names
    assert any(n.startswith("server/") and n.endswith(".py") for n in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "adasd = adasd_core.cli:" in wheel.read(entry_points).decode()


def test_wheel_carries_the_demo_pair(wheel: zipfile.ZipFile, context_files: list[str]):
    weights = [f for f in checkout_files() if f.startswith(WEIGHTS)]
    assert {f"{WEIGHTS}{role}/model.safetensors" for role in ("target", "draft")} <= set(weights)
    missing = sorted(set(weights) - set(context_files))
    assert not missing, f".dockerignore keeps these out of the image: {missing}"
    missing = sorted(set(weights) - set(wheel.namelist()))
    assert not missing, f"package data left out of the wheel (the CPU image would lack them): {missing}"
