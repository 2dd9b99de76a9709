"""The demo build's quick mode end to end, and its determinism."""

import hashlib
import json

from typer.testing import CliRunner

from adasd_core.cli import app
from adasd_core.demo.build import BuildConfig, build
from adasd_core.demo.data import HELD_OUT, load_corpus


def _digest(folder):
    return {f.relative_to(folder).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*.safetensors")) + sorted(folder.rglob("tokenizer.json"))}


def test_quick_build_end_to_end_via_cli(tmp_path):
    result = CliRunner().invoke(app, ["build-demo", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for role in ("target", "draft"):
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            assert (tmp_path / role / name).exists()
    report = json.loads((tmp_path / "report.json").read_text())
    assert 0.0 <= report["vanilla_k5_greedy_acceptance"] <= 1.0
    assert report["held_out_loss_nats"]["target"] > 0
    assert report["decode_step_ms"]["target"] > 0
    assert (tmp_path / "REPORT.md").read_text().startswith("# Demo pair report")
    log = json.loads((tmp_path / "build_log.json").read_text())
    assert log["corpus"]["held_out_files"] > 0


def test_quick_build_is_deterministic(tmp_path, quick_pair_dir):
    build(tmp_path, BuildConfig.quick(), stages=("tokenizer", "target", "draft"), progress=False)
    assert _digest(tmp_path) == _digest(quick_pair_dir)


def test_held_out_modules_never_train():
    corpus = load_corpus()
    train = {path for path, _ in corpus.train}
    held = {path for path, _ in corpus.held_out}
    assert held and not train & held
    assert all(any(p == h or p.startswith(h) for h in HELD_OUT) for p in held)
