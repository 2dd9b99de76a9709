"""Fixtures of the deployment checks (tests/deploy).

The static checks (hadolint, yamllint, Kubernetes schemas, promtool, compose schema) need
only their tools. The live checks start the server the way the image does: the
Dockerfile's CMD, run on this machine's CPU with ADASD_CONFIG=configs/tiny.yaml, wait for
/ready, send one completion, then read /metrics.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from deploy_support import (  # noqa: E402
    READY_TIMEOUT_S,
    REPO,
    Server,
    free_port,
    http,
    image_cmd,
    localize_cmd,
    server_env,
)


@pytest.fixture(scope="session")
def deploy_server(tmp_path_factory) -> Server:
    """The image's default command (Dockerfile CMD) serving the tiny config on the CPU."""
    port = free_port()
    cmd = localize_cmd(image_cmd(), port)
    log = tmp_path_factory.mktemp("adasd-server") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=server_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", port, cmd, proc, log)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{' '.join(cmd)} exited with {proc.returncode} before /ready:\n{server.log_tail()}")
            try:
                status, _ = http("GET", server.base_url + "/ready", timeout=5)
                if status == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"/ready not 200 within {READY_TIMEOUT_S:.0f}s:\n{server.log_tail()}")
            time.sleep(0.5)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


@pytest.fixture(scope="session")
def served_model(deploy_server: Server) -> str:
    status, body = http("GET", deploy_server.base_url + "/v1/models")
    assert status == 200, body[:500]
    models = json.loads(body)["data"]
    assert models, "/v1/models lists no model"
    return models[0]["id"]


@pytest.fixture(scope="session")
def completion(deploy_server: Server, served_model: str) -> dict:
    """One completion through the image's command, as a client would send it."""
    request = {"model": served_model, "prompt": "def add(a, b):", "max_tokens": 8}
    status, body = http("POST", deploy_server.base_url + "/v1/completions", request, timeout=300)
    assert status == 200, f"POST /v1/completions -> {status}: {body[:500]!r}\n{deploy_server.log_tail()}"
    return json.loads(body)


@pytest.fixture(scope="session")
def metrics_text(deploy_server: Server, completion: dict) -> str:
    """The exposition of GET /metrics after one completion has been served."""
    status, body = http("GET", deploy_server.base_url + "/metrics")
    assert status == 200, body[:500]
    return body.decode()


@pytest.fixture(scope="session")
def picker_server(quick_pair_dir, tmp_path_factory):
    """The quick pair served with vLLM's names on and max_running 1 (so a second request waits),
    every round slowed a little so that requests outlive the scrapes that look at them."""
    from scripts.reliability.serverproc import ServerProcess

    srv = ServerProcess(str(quick_pair_dir / "target"), str(quick_pair_dir / "draft"),
                        log_dir=tmp_path_factory.mktemp("picker_server"), round_delay_s=0.02, device="cpu",
                        max_running=1, vllm_metric_names=True, log_level="warning")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()
