"""Helpers of the server tests: real servers (`python -m server`) on free ports, and waiting.

The process handling is scripts/reliability/serverproc.py's; this adds the tests' defaults."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx

from scripts.reliability import serverproc
from scripts.reliability.serverproc import free_port, wait_for  # noqa: F401  (re-exported for the tests)

API_KEY = "sk-adasd-test"
# every worker round takes at least this long, so that `LONG` requests reliably outlive the
# client actions the fault tests take while they run, however fast the machine
ROUND_DELAY_S = 0.02
# ~120 rounds (method ar: exactly one token per round) -> at least 2.4 s
LONG = {"model": "tiny", "prompt": "x", "max_tokens": 120, "temperature": 0, "ignore_eos": True,
        "adasd": {"method": "ar"}}
GOOD = {"model": "tiny", "prompt": "x = 1\n", "max_tokens": 2}


def post_in_thread(url: str, body: dict) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run():
        try:
            out["response"] = httpx.post(url, json=body, timeout=120)
        except Exception as exc:  # reported by the test
            out["exception"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def check_error_body(body: dict, code: str) -> None:
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["code"] == code, body


class ServerProcess(serverproc.ServerProcess):
    """A server on a pair folder (target/ and draft/), its log in `log_dir`, served as "tiny"."""

    def __init__(self, pair_dir: Path, log_dir: Path, api_key: str | None = None, round_delay_s: float = ROUND_DELAY_S,
                 **settings):
        super().__init__(str(pair_dir / "target"), str(pair_dir / "draft"), api_key=api_key, log_dir=log_dir,
                         round_delay_s=round_delay_s, **settings)

    def http(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers, timeout=kw.pop("timeout", 60), **kw)

    def metric(self, name: str, **labels) -> float:
        """Sum of the samples of `name` whose labels include `labels` (0 if none)."""
        return serverproc.metric(self.base_url, name, **labels)
