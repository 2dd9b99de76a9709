"""Fixtures of the reliability tests: real servers (`python -m server`) on 127.0.0.1 and free ports.

ADASD_TEST_PAIR=/path/with/{target,draft} reuses an existing pair instead of building the quick one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from scripts.reliability.serverproc import ServerProcess

API_KEY = "sk-adasd-reliability"


@pytest.fixture(scope="session")
def rel_pair_dir(request) -> Path:
    if os.environ.get("ADASD_TEST_PAIR"):
        return Path(os.environ["ADASD_TEST_PAIR"])
    return request.getfixturevalue("quick_pair_dir")  # tests/conftest.py


@pytest.fixture(scope="session")
def rel_start(rel_pair_dir, tmp_path_factory):
    """Factory: rel_start(**settings) -> a ready ServerProcess (stopped at the end of the session)."""
    started: list[ServerProcess] = []
    log_dir = tmp_path_factory.mktemp("reliability_logs")

    def start(api_key: str | None = API_KEY, round_delay_s: float = 0.02, **settings) -> ServerProcess:
        srv = ServerProcess(rel_pair_dir / "target", rel_pair_dir / "draft", api_key=api_key, log_dir=log_dir,
                            round_delay_s=round_delay_s, device="cpu", log_level="warning", **settings)
        started.append(srv)
        srv.wait_ready(timeout=600)
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture(scope="session")
def rel_server(rel_start) -> ServerProcess:
    """Shared server: API key on, default limits (max_body_bytes 1 MiB)."""
    return rel_start()
