"""Check 8: the image's default command (the Dockerfile's CMD, JSON form), run directly on
this machine's CPU with ADASD_CONFIG=configs/tiny.yaml, serves a completion; and the
image's HEALTHCHECK command succeeds against it."""

from __future__ import annotations

import json
import subprocess
import sys

from deploy_support import Server, dockerfile_instructions, final_stage, http


def test_default_command_serves_a_completion(deploy_server: Server, served_model: str, completion: dict):
    assert "serve" in deploy_server.cmd
    assert completion["object"] == "text_completion"
    assert completion["model"] == served_model
    (choice,) = completion["choices"]
    assert isinstance(choice["text"], str) and choice["finish_reason"] in ("length", "stop")
    usage = completion["usage"]
    assert 1 <= usage["completion_tokens"] <= 8
    assert usage["prompt_tokens"] >= 1
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_probe_endpoints(deploy_server: Server):
    for path in ("/health", "/ready"):
        status, body = http("GET", deploy_server.base_url + path, timeout=10)
        assert status == 200, f"{path}: {status} {body[:200]!r}"


def test_healthcheck_command(deploy_server: Server):
    """The HEALTHCHECK CMD as written in the Dockerfile, pointed at this server's port."""
    (health,) = [rest for word, rest in final_stage(dockerfile_instructions()) if word == "HEALTHCHECK"]
    cmd = json.loads(health[health.index("CMD") + 3:].strip())
    cmd = [a.replace("127.0.0.1:8000", f"127.0.0.1:{deploy_server.port}") for a in cmd]
    if cmd[0] in ("python", "python3"):
        cmd[0] = sys.executable
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
