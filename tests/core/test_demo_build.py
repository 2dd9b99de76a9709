"""The demo build's quick mode end to end, and its determinism."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adasd_core.cli import app
from adasd_core.demo.build import BuildConfig, encode_corpus
from adasd_core.demo.data import HELD_OUT, load_corpus
from adasd_core.demo.report import held_out_loss, held_out_prompts
from adasd_core.engine import SpecConfig
from adasd_core.llm import LLM
from adasd_core.models import load_pair
from adasd_core.sampling import SamplingParams

REPO = Path(__file__).resolve().parents[2]


def _digest(folder):
    return {f.relative_to(folder).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*.safetensors")) + sorted(folder.rglob("tokenizer.json"))}


def test_quick_build_end_to_end_via_cli(tmp_path):
    result = CliRunner().invoke(app, ["build-tiny", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for role in ("target", "draft"):
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            assert (tmp_path / role / name).exists()
    report = json.loads((tmp_path / "report.json").read_text())
    # the report's numbers are what the built pair does: measured again here, the same way
    cfg = BuildConfig.quick()
    pair = load_pair(str(tmp_path / "target"), str(tmp_path / "draft"), device="cpu", dtype="float32")
    held = encode_corpus(pair.tokenizer, load_corpus(max_files=cfg.max_files).held_out)
    engine = LLM(pair, calibrate=False)
    prompts = held_out_prompts(held, report["acceptance_prompts"], 32)
    assert len(prompts) == report["acceptance_prompts"] == 3
    stats = [engine.generate(p, SamplingParams(max_tokens=report["acceptance_tokens_per_prompt"], ignore_eos=True),
                             SpecConfig(method="vanilla", k=5)).stats for p in prompts]
    drafted, accepted = sum(s.drafted_tokens for s in stats), sum(s.accepted_tokens for s in stats)
    assert drafted > 0 and report["vanilla_k5_greedy_acceptance"] == round(accepted / drafted, 4)
    for role in ("target", "draft"):
        loss = held_out_loss(getattr(pair, role), held, cfg.context, cfg.eval_windows)
        assert report["held_out_loss_nats"][role] == pytest.approx(loss, abs=1e-4) and loss > 0
    assert report["decode_step_ms"]["target"] > 0
    assert (tmp_path / "REPORT.md").read_text().startswith("# Demo pair report")
    log = json.loads((tmp_path / "build_log.json").read_text())
    assert log["corpus"]["held_out_files"] > 0


BUILD = ("from adasd_core.demo.build import BuildConfig, build; import sys; "
         "build(sys.argv[1], BuildConfig.quick(), stages=('tokenizer', 'target', 'draft'), progress=False)")


def test_quick_build_is_deterministic(tmp_path):
    """Two builds, each in a fresh interpreter as a user would run them, give the same bytes.

    Not against the session's quick pair: that one was built in this process, after whatever
    state earlier tests left behind (threads, RNGs, library caches), which is not what the
    docs promise ('deterministic given the seed, the Python version and the machine')."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for name in ("a", "b"):
        done = subprocess.run([sys.executable, "-c", BUILD, str(tmp_path / name)], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    first, second = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert len(first) == 4 and first == second  # model.safetensors and tokenizer.json of target and draft


def test_held_out_modules_never_train():
    corpus = load_corpus()
    train = {path for path, _ in corpus.train}
    held = {path for path, _ in corpus.held_out}
    assert held and not train & held
    assert all(any(p == h or p.startswith(h) for h in HELD_OUT) for p in held)
