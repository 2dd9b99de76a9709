"""Fixtures for the server tests: a tiny trained pair and real servers (`python -m server`) on free ports.

ADASD_TEST_PAIR=/path/with/{target,draft} reuses an existing pair instead of building one.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
API_KEY = "sk-adasd-test"
START_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m server ...` in a subprocess; its log goes to a file shown on failure."""

    def __init__(self, pair_dir: Path, log_dir: Path, api_key: str | None = None, **settings):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.log_path = log_dir / f"server-{self.port}.log"
        args = [sys.executable, "-m", "server", "--target", str(pair_dir / "target"), "--draft", str(pair_dir / "draft"),
                "--port", str(self.port), "--served-model-name", "tiny"]
        for name, value in settings.items():
            args += [f"--{name.replace('_', '-')}", str(value)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("ADASD_")}
        env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
        if api_key:
            env["ADASD_API_KEY"] = api_key
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def http(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers, timeout=kw.pop("timeout", 60), **kw)

    def ready(self) -> tuple[int, dict]:
        try:
            r = httpx.get(self.base_url + "/ready", timeout=5)
            return r.status_code, r.json()
        except httpx.TransportError:
            return 0, {}

    def wait_ready(self, timeout: float = START_TIMEOUT_S, not_pid: int | None = None) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            code, body = self.ready()
            if code == 200 and body.get("worker_pid") != not_pid:
                return body
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log_tail()}")

    def metric(self, name: str, **labels) -> float:
        """Sum of the samples of `name` whose labels include `labels` (0 if none)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.base_url + "/metrics", timeout=10).text
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total

    def log_tail(self, n: int = 60) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


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
def start_server(pair_dir, tmp_path_factory):
    """Factory: start_server(**settings) -> ServerProcess (stopped at the end of the session)."""
    started: list[ServerProcess] = []
    log_dir = tmp_path_factory.mktemp("server_logs")

    def start(api_key: str | None = None, wait: bool = True, **settings) -> ServerProcess:
        srv = ServerProcess(pair_dir, log_dir, api_key=api_key, **settings)
        started.append(srv)
        if wait:
            srv.wait_ready()
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture(scope="session")
def server(start_server) -> ServerProcess:
    """The shared server: API key on, default queue sizes."""
    return start_server(api_key=API_KEY)


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def async_client(server):
    import openai

    return openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
