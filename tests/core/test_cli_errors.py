"""A model that cannot be loaded is one clear message and exit status 1, without a traceback
(issue 11, part 4): hub ids that are not cached and cannot be downloaded, paths that do not exist,
folders without weights or a tokenizer, and pairs too large for memory."""

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from adasd_core import model_files, models
from adasd_core.cli import app
from adasd_core.errors import ModelLoadError, ModelNotFoundError

ROOT = Path(__file__).resolve().parents[2]
DEMO_TARGET = ROOT / "adasd_core" / "demo" / "weights" / "target"
runner = CliRunner()


def _no_hub_env(tmp_path) -> dict:
    """No network for the hub (a closed local port) and an empty cache; HF_HUB_OFFLINE unset."""
    dropped = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "ADASD_LOG_LEVEL")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf_home"), PYTHONPATH=str(ROOT),
               NO_COLOR="1", COLUMNS="200")
    return env


def _run(args, env, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adasd_core.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def _assert_one_message(output: str) -> None:
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output


def _folder(tmp_path, name, files) -> Path:
    d = tmp_path / name
    d.mkdir()
    for f in files:
        shutil.copy(DEMO_TARGET / f, d / f)
    return d


@pytest.fixture(autouse=True)
def _hub(monkeypatch, tmp_path):
    """In process: an empty cache, online, and a hub that must not be asked unless a test says so."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "ADASD_LOG_LEVEL"):
        monkeypatch.delenv(var, raising=False)
    model_files.probe_hub.cache_clear()

    def no_probe(name):
        raise AssertionError(f"the hub was asked about {name}")

    monkeypatch.setattr(model_files, "probe_hub", no_probe)


# ---------------------------------------------------------------------------- the two commands


def test_generate_hub_id_without_network(tmp_path):
    env = _no_hub_env(tmp_path)
    r = _run(["generate", "def f():", "--target", "meta-llama/Llama-3.2-1B", "--draft", "meta-llama/Llama-3.2-1B"], env)
    assert r.returncode == 1, r.stderr
    _assert_one_message(r.stdout + r.stderr)
    msg = r.stderr
    for what in ("meta-llama/Llama-3.2-1B", "--target", "cache", str(tmp_path / "hf_home"), "could not be reached",
                 "'tiny'", "HF_HUB_OFFLINE=1", "local model folder"):
        assert what in msg, (what, msg)


def test_serve_nonexistent_path(tmp_path):
    env = _no_hub_env(tmp_path)
    r = _run(["serve", "--target", "/nonexistent", "--port", "0"], env)
    assert r.returncode == 1, r.stderr
    _assert_one_message(r.stdout + r.stderr)
    assert "no folder at /nonexistent" in r.stderr and "'tiny'" in r.stderr
    # at debug level the traceback is there too
    r = _run(["serve", "--target", "/nonexistent", "--port", "0", "--log-level", "debug"], env)
    assert r.returncode == 1 and "Traceback" in r.stderr and "ModelNotFoundError" in r.stderr


# ---------------------------------------------------------------------------- folders


def test_folder_without_weights(tmp_path):
    d = _folder(tmp_path, "noweights", ["config.json", "tokenizer.json", "tokenizer_config.json"])
    r = runner.invoke(app, ["generate", "x", "--target", str(d), "--draft", "tiny", "--device", "cpu"])
    assert r.exit_code == 1
    _assert_one_message(r.output)
    assert "has no weights" in r.output and "tokenizer.json" in r.output  # what it does hold

    r = runner.invoke(app, ["generate", "x", "--target", str(d), "--draft", "tiny", "--log-level", "debug"])
    assert r.exit_code == 1 and "Traceback" in r.output


def test_folder_without_tokenizer_or_config(tmp_path):
    d = _folder(tmp_path, "notok", ["config.json", "model.safetensors"])
    with pytest.raises(ModelLoadError, match="has no tokenizer files"):
        model_files.locate(str(d), "draft")
    d = _folder(tmp_path, "empty", [])
    with pytest.raises(ModelLoadError, match="has no config.json, no weights.*no tokenizer.*holds: nothing"):
        model_files.locate(str(d), "target")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        model_files.locate(str(DEMO_TARGET / "config.json"), "target")


def test_bench_gets_the_same_message(tmp_path):
    r = runner.invoke(app, ["bench", "--quick", "--target", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1
    _assert_one_message(r.output)
    assert "no folder at" in r.output


def test_local_path_and_tiny_still_load():
    assert model_files.locate("tiny", "draft").where == "builtin"
    assert model_files.locate(str(DEMO_TARGET), "target").where == "local"
    pair = models.load_pair(str(DEMO_TARGET), "tiny", device="cpu")
    assert pair.vocab_size > 0


# ---------------------------------------------------------------------------- hub ids and the cache


def _cache_snapshot(cache: Path, repo: str, files) -> Path:
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("abc123")
    for f in files:
        shutil.copy(DEMO_TARGET / f, snap / f)
    return snap


ALL_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def test_offline_uses_the_cache_or_says_it_is_not_there(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match=r"not in the Hugging Face cache .*HF_HUB_OFFLINE=1 keeps the hub out"):
        model_files.locate("org/model", "target")
    snap = _cache_snapshot(tmp_path / "hub_cache", "org/model", ALL_FILES)
    src = model_files.locate("org/model", "target")
    assert (src.where, src.path) == ("cache", str(snap))


def test_unreachable_hub_falls_back_to_a_complete_cached_copy(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(model_files, "probe_hub", lambda name: ("unreachable", "ConnectError: refused"))
    with pytest.raises(ModelNotFoundError, match="has no copy.*could not be reached"):
        model_files.locate("org/model", "target")
    snap = _cache_snapshot(tmp_path / "hub_cache", "org/model", ["config.json"])
    with pytest.raises(ModelNotFoundError, match="has an incomplete copy"):
        model_files.locate("org/model", "target")
    for f in ALL_FILES[1:]:
        shutil.copy(DEMO_TARGET / f, snap / f)
    src = model_files.locate("org/model", "target")
    assert src.where == "cache" and "loading the cached snapshot" in caplog.text


def test_hub_answers(monkeypatch):
    monkeypatch.setattr(model_files, "probe_hub", lambda name: ("ok", ""))
    assert model_files.locate("org/model", "draft") == model_files.ModelSource("org/model", "org/model", "hub")
    monkeypatch.setattr(model_files, "probe_hub", lambda name: ("missing", "404"))
    with pytest.raises(ModelNotFoundError, match="has no such model. Check the spelling"):
        model_files.locate("org/model", "draft")
    monkeypatch.setattr(model_files, "probe_hub", lambda name: ("gated", "401"))
    with pytest.raises(ModelLoadError, match="is gated.*hf auth login"):
        model_files.locate("org/model", "draft")


def test_bad_names():
    with pytest.raises(ModelNotFoundError, match="no folder at .*not a hub id"):
        model_files.locate("bad name!", "target")
    with pytest.raises(ModelNotFoundError, match="no folder at /no/such/dir\\."):
        model_files.locate("/no/such/dir", "target")


# ---------------------------------------------------------------------------- memory


def _big_folder(tmp_path) -> Path:
    """The demo's config and tokenizer with a safetensors header that claims 400 G parameters (no data)."""
    d = _folder(tmp_path, "big", ["config.json", "tokenizer.json", "tokenizer_config.json"])
    header = json.dumps({"w": {"dtype": "BF16", "shape": [4_000_000, 100_000], "data_offsets": [0, 8 * 10**11]}})
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header.encode())
    return d


def test_pair_too_large_for_memory(tmp_path):
    d = _big_folder(tmp_path)
    assert model_files.parameter_count(d) == 4 * 10**11
    r = runner.invoke(app, ["generate", "x", "--target", str(d), "--draft", "tiny", "--device", "cpu"])
    assert r.exit_code == 1
    _assert_one_message(r.output)
    assert "do not fit on cpu" in r.output and "1.5 TiB" in r.output and "--dtype bfloat16" in r.output


def test_out_of_memory_while_loading(monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(models, "load_model", oom)
    with pytest.raises(ModelLoadError, match=r"out of memory on cpu while loading the target model 'tiny' "
                                             r"\(weights in float32: target .*MiB.*Tried to allocate"):
        models.load_pair("tiny", "tiny", device="cpu")


def test_other_load_failures_are_one_message(monkeypatch, tmp_path):
    d = _folder(tmp_path, "broken", ["tokenizer.json", "tokenizer_config.json"])
    (d / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    (d / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"could not load the target (tokenizer|model) '.*broken' from the local "
                                             r"folder"):
        models.load_pair(str(d), None, device="cpu")
