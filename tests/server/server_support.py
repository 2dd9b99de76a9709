"""Helpers of the server tests: real servers (`python -m server`) on free ports, and waiting."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from server.worker import ROUND_DELAY_ENV

REPO = Path(__file__).resolve().parents[2]
API_KEY = "sk-adasd-test"
START_TIMEOUT_S = 300
# every worker round takes at least this long, so that `LONG` requests reliably outlive the
# client actions the fault tests take while they run, however fast the machine
ROUND_DELAY_S = 0.02
# ~120 rounds (method ar: exactly one token per round) -> at least 2.4 s
LONG = {"model": "tiny", "prompt": "x", "max_tokens": 120, "temperature": 0, "ignore_eos": True,
        "adasd": {"method": "ar"}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m server ...` in a subprocess; its log goes to a file shown on failure."""

    def __init__(self, pair_dir: Path, log_dir: Path, api_key: str | None = None, round_delay_s: float = ROUND_DELAY_S,
                 **settings):
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
        env[ROUND_DELAY_ENV] = str(round_delay_s)
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


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False
