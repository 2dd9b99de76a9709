"""scripts/gpu_check.sh stays runnable: its CPU short mode runs every part in a tiny form and each part
must pass and write its file; the long-context part's thresholds are computed as documented. The CUDA
mode is run by hand on a GPU machine (docs/performance/gpu.md)."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PARTS = {"step_costs": "step_costs.json", "long_context": "long_context.json", "bench_serve": "bench_serve.json",
         "core_tests": "core_tests.log", "server_tests": "server_tests.log"}


def _long_context():
    spec = importlib.util.spec_from_file_location("gpu_long_context", ROOT / "scripts" / "gpu_long_context.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
@pytest.mark.skipif(bool(os.environ.get("GPU_CHECK_WORK")), reason="inside gpu_check.sh already")
@pytest.mark.timeout(580)
def test_gpu_check_cpu_short(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ADASD_", "OUT"))}
    env.update(PYTHON=sys.executable, TMPDIR=str(tmp_path))
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu-short", "--out", str(out)], env=env,
                       cwd=tmp_path, capture_output=True, text=True, timeout=570)
    log = (out / "misc.log").read_text(errors="replace") if (out / "misc.log").exists() else ""
    assert (out / "summary.json").exists(), r.stderr + log
    summary = json.loads((out / "summary.json").read_text())
    status = {p["part"]: p for p in summary["parts"]}
    assert set(status) == set(PARTS), summary
    for part, file in PARTS.items():
        assert status[part]["status"] == "ok", (part, status[part], log[-4000:])
        assert (out / file).stat().st_size > 0, part
    assert r.returncode == 0 and summary["ok"], r.stderr
    assert (out / "summary.md").read_text().count("| ok |") == len(PARTS)
    # what the device tool brings back: at most 8 files, none deeper than two folders
    assert len([p for p in out.rglob("*") if p.is_file()]) <= 8

    steps = json.loads((out / "step_costs.json").read_text())
    for role in ("target", "draft"):
        m = steps["models"][role]
        assert {"step", "verify_4", "verify_8", "verify_16", "batch_1", "batch_16"} <= set(m)
        assert m["step"]["median_ms"] > 0
    assert "passed" in (out / "core_tests.log").read_text()
    assert json.loads((out / "bench_serve.json").read_text())["levels"]

    long = json.loads((out / "long_context.json").read_text())
    assert long["ok"] and not long["errors"] and long["tiny"]
    names = [c["name"] for c in long["checks"]]
    assert any(n.startswith("exact:") for n in names) and any(n.startswith("agree at") for n in names)
    assert any("/ floor" in n for n in names) and "decode_b8 / decode_b1" in names
    # on the CPU the lean path's logits are held to float32 limits; the GPU's time limits are computed, not enforced
    assert all(c["ok"] for c in long["checks"] if c["enforced"]) and any(not c["enforced"] for c in long["checks"])
    md = (out / "summary.md").read_text()
    assert "## long context" in md and "the planner's draft lengths by concurrency" in md
    assert md.count("\n| 1 |") == 1  # the one concurrency level of the short mode


def test_long_context_thresholds_are_computed_as_documented():
    """The floors and limits of scripts/gpu_long_context.py on the 8B's numbers: an H200 reading 15 GiB of
    weights takes 3.3 ms, and each check compares what it says."""
    lc = _long_context()
    sizes = {"weights_read": 15 * 2**30, "kv_per_token": 128 * 1024, "matmul_params": 7_500_000_000}
    floor1 = lc.floor_s(sizes, 1, 4096, 4.8e12)
    assert floor1 == pytest.approx((15 * 2**30 + 4096 * 128 * 1024) / 4.8e12) and 0.0034 < floor1 < 0.0035
    floor8 = lc.floor_s(sizes, 8, 4096, 4.8e12)
    assert floor8 / floor1 == pytest.approx((15 + 8 * 0.5) / (15 + 0.5))  # 512 MiB of KV per sequence at 4k
    assert lc.chunk_floor_s(sizes, 2048, 7.9e14) == pytest.approx(2 * 7.5e9 * 2048 / 7.9e14)
    t = {"decode_b1": 2.0 * floor1, "decode_b8": 1.5 * 2.0 * floor1, "verify_b1_8": 3.0 * floor1,
         "verify_b8_5": 2.4 * floor8, "chunk": 0.2}
    checks = {c["name"]: c for c in lc.step_checks(t, sizes, 4096, 2048, 4.8e12, 7.9e14, enforced=True)}
    decode_b1 = checks["decode_b1 / floor at 4096"]
    assert decode_b1["value"] == pytest.approx(2.0) and decode_b1["ok"]
    assert not checks["verify_b1_8 / floor at 4096"]["ok"]  # 3.0 > 2.5
    assert checks["verify_b8_5 / floor at 4096"]["ok"]
    assert checks["decode_b8 / decode_b1"]["value"] == pytest.approx(1.5) and checks["decode_b8 / decode_b1"]["ok"]
    assert checks["verify_b1_8 / decode_b1"]["value"] == pytest.approx(1.5)
    chunk = checks["prefill chunk / matmul floor"]
    assert chunk["value"] == pytest.approx(0.2 / lc.chunk_floor_s(sizes, 2048, 7.9e14)) and not chunk["ok"]
    assert lc.check("x", 0.9990, 0.999, below=False)["ok"] and not lc.check("x", 0.998, 0.999, below=False)["ok"]


def test_the_weights_a_step_reads_leave_out_the_input_embedding():
    """An untied model reads every matrix but the input embedding (a step reads a few of its rows);
    a tied one reads the shared matrix as its head."""
    lc = _long_context()
    untied = lc.build(lc.TINY, "cpu", __import__("torch").float32)
    sizes = lc.bytes_of(untied)
    embed = untied.get_input_embeddings().weight
    assert sizes["weights_read"] == sizes["weights"] - embed.numel() * 4
    assert sizes["kv_per_token"] == 2 * 2 * 2 * 8 * 4  # K and V x layers x KV heads x head dim x float32
    tied = lc.build({**lc.TINY, "tie_word_embeddings": True}, "cpu", __import__("torch").float32)
    assert lc.bytes_of(tied)["weights_read"] == lc.bytes_of(tied)["weights"]
