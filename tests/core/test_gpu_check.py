"""scripts/gpu_check.sh stays runnable (issue 11, part 6): its CPU short mode runs every part in a
tiny form and each part must pass and write its file. The CUDA mode is run by hand on a GPU machine
(docs/performance/gpu.md)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PARTS = {"step_costs": "step_costs.json", "bench": "bench.json", "bench_serve": "bench_serve.json",
         "core_tests": "core_tests.log", "server_tests": "server_tests.log"}


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
