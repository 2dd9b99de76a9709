"""Start `python -m server` on 127.0.0.1 and a free port; find its worker; read its RSS and gauges."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

REPO = Path(__file__).resolve().parents[2]
ROUND_DELAY_ENV = "ADASD_DEBUG_ROUND_DELAY_S"  # server.worker.ROUND_DELAY_ENV (not imported: keeps torch out)
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def check_loopback(url: str) -> str:
    host = urlparse(url).hostname or ""
    if host not in LOOPBACK:
        raise SystemExit(f"refusing {url!r}: reliability traffic goes to loopback (127.0.0.1) only")
    return url.rstrip("/")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m server --host 127.0.0.1 --port <free> ...`; its log goes to a file."""

    def __init__(self, target: str, draft: str | None, api_key: str | None = None, log_dir: str | Path | None = None,
                 round_delay_s: float = 0.0, served_model_name: str = "tiny", env: dict[str, str] | None = None,
                 **settings):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.model = served_model_name
        log_dir = Path(log_dir or tempfile.mkdtemp(prefix="adasd-rel-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"server-{self.port}.log"
        args = [sys.executable, "-m", "server", "--target", str(target), "--draft", str(draft or "none"),
                "--host", "127.0.0.1", "--port", str(self.port), "--served-model-name", served_model_name]
        for name, value in settings.items():
            flag = name.replace("_", "-")
            args += [f"--{flag}" if value else f"--no-{flag}"] if isinstance(value, bool) else [f"--{flag}", str(value)]
        environ = {k: v for k, v in os.environ.items() if not k.startswith("ADASD_")}
        environ.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
        if api_key:
            environ["ADASD_API_KEY"] = api_key
        if round_delay_s:
            environ[ROUND_DELAY_ENV] = str(round_delay_s)
        environ.update(env or {})  # e.g. server.faults.FAULT_FILE_ENV
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, cwd=REPO, env=environ, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def ready(self) -> tuple[int, dict]:
        return ready(self.base_url)

    def wait_ready(self, timeout: float = 300, not_pid: int | None = None) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            code, body = self.ready()
            if code == 200 and body.get("worker_pid") != not_pid:
                return body
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log_tail()}")

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


def ready(base_url: str) -> tuple[int, dict]:
    try:
        r = httpx.get(base_url + "/ready", timeout=5)
        return r.status_code, r.json()
    except (httpx.TransportError, ValueError):
        return 0, {}


def metrics(base_url: str) -> dict[tuple[str, tuple], float]:
    """All samples of /metrics: {(name, sorted label items): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(base_url + "/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(base_url: str, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 if none)."""
    return sum(v for (n, lab), v in metrics(base_url).items()
               if n == name and all(dict(lab).get(k) == val for k, val in labels.items()))


def rss_mb(pid: int | None) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).memory_info().rss / 2**20 if pid else None
    except psutil.Error:
        return None


def front_end_pid(worker_pid: int | None) -> int | None:
    """The worker's parent (the front end), for servers started elsewhere (--url)."""
    import psutil

    try:
        return psutil.Process(worker_pid).ppid() if worker_pid else None
    except psutil.Error:
        return None


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def attach_or_start(args) -> tuple[ServerProcess | None, str, str | None]:
    """The server a reliability script talks to: --url (loopback only), or one it starts on
    --target / --draft. Returns (the started server or None, base URL, model name if known)."""
    if args.url:
        return None, check_loopback(args.url), getattr(args, "model", None)
    srv = ServerProcess(args.target, args.draft, api_key=args.api_key, log_dir=args.log_dir, device="cpu",
                        log_level="warning")
    try:
        srv.wait_ready(timeout=600)
    except BaseException:
        srv.stop()
        raise
    return srv, srv.base_url, srv.model
