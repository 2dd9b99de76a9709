"""Fixtures of the server tests: a tiny trained pair and real servers on free ports.

ADASD_TEST_PAIR=/path/with/{target,draft} reuses an existing pair instead of building one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from server_support import API_KEY, ServerProcess


@pytest.fixture(scope="session")
def pair_dir(request) -> Path:
    if os.environ.get("ADASD_TEST_PAIR"):
        return Path(os.environ["ADASD_TEST_PAIR"])
    try:
        return request.getfixturevalue("quick_pair_dir")  # tests/conftest.py builds one per session
    except pytest.FixtureLookupError:
        from adasd_core.demo.build import BuildConfig, build

        out = request.getfixturevalue("tmp_path_factory").mktemp("server_pair")
        build(out, BuildConfig.quick(), stages=("tokenizer", "target", "draft"), progress=False)
        return out


@pytest.fixture(scope="session")
def int8_pair_dir(pair_dir, tmp_path_factory) -> Path:
    """The test pair with the default pair's kind of draft: its folder asks for int8 weights
    (config adasd_draft.int8_weights), which the lean forward then runs on the CPU."""
    import json
    import shutil

    out = tmp_path_factory.mktemp("int8_pair")
    shutil.copytree(pair_dir / "target", out / "target")
    shutil.copytree(pair_dir / "draft", out / "draft")
    config = json.loads((out / "draft" / "config.json").read_text())
    config["adasd_draft"] = {**config.get("adasd_draft", {}), "int8_weights": True}
    (out / "draft" / "config.json").write_text(json.dumps(config, indent=1))
    return out


@pytest.fixture(scope="session")
def start_server(pair_dir, tmp_path_factory):
    """Factory: start_server(**settings) -> ServerProcess (stopped at the end of the session);
    `pair=` another pair folder."""
    started: list[ServerProcess] = []
    log_dir = tmp_path_factory.mktemp("server_logs")

    def start(api_key: str | None = None, wait: bool = True, pair: Path | None = None, **settings) -> ServerProcess:
        srv = ServerProcess(pair or pair_dir, log_dir, api_key=api_key, **settings)
        started.append(srv)
        if wait:
            srv.wait_ready()
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture(scope="session")
def server(start_server) -> ServerProcess:
    """The shared server: API key on, default queue sizes. It never publishes warm-start snapshots:
    its tests compare requests with each other, and a publication between two of them would rightly
    change the answer (with the system_fingerprint); publication has tests of its own
    (test_same_answer.py, test_warm_state.py)."""
    return start_server(api_key=API_KEY, warm_epoch_rounds=10**9)


@pytest.fixture(scope="session")
def client(server):
    import openai

    # closed here, not by its __del__ after pytest has closed the log streams ("--- Logging error ---")
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def async_client(server):
    import openai

    return openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
