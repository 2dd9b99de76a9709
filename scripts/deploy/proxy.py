"""nginx in front of adasd replicas on this machine: least-connections balancing, SSE unbuffered.

    proxy = Nginx(["127.0.0.1:8001", "127.0.0.1:8002"], workdir)   # starts it on a free port
    proxy.base_url ... proxy.stop()

The same settings a production nginx in front of adasd needs (docker/DEPLOY.md): HTTP/1.1 with
keep-alive to the replicas, no response buffering (each SSE event goes out as it comes), long read
timeouts for long generations, and retries only where nothing was sent yet (a refused connection),
never for a request a replica had started: a generation is not idempotent.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx

from scripts.reliability.serverproc import free_port

CONF = """\
worker_processes 1;
{user}
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {work}/access.log;
    client_body_temp_path {work}/client_body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;

    upstream adasd {{
        least_conn;
{servers}
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 2m;
        client_body_buffer_size 2m;
        location / {{
            proxy_pass http://adasd;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_buffering {buffering};
            gzip {gzip};
            gzip_types text/event-stream application/json;
            gzip_min_length 0;
            proxy_cache off;
            proxy_read_timeout 600s;
            proxy_send_timeout 600s;
            proxy_connect_timeout 2s;
            # a refused or failed connection goes to the next replica; a started request does not
            proxy_next_upstream error timeout;
            add_header X-Upstream $upstream_addr always;
        }}
    }}
}}
"""


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if found is None:
        raise FileNotFoundError("nginx is not installed: `make test-tools` installs it (apt-get install nginx)")
    return found


class Nginx:
    def __init__(self, upstreams: list[str], workdir: str | Path, buffering: bool = False, gzip: bool = False,
                 port: int | None = None):
        """buffering / gzip: the settings that hold SSE back (on for the tests' control only)."""
        self.work = Path(workdir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        # max_fails=1: one failed connection takes a replica out for fail_timeout
        servers = "\n".join(f"        server {u} max_fails=1 fail_timeout=10s;" for u in upstreams)
        # run as root (CI), nginx's workers would switch to `nobody`, who cannot write to workdir
        user = "user root;" if os.geteuid() == 0 else ""
        self.conf = self.work / "nginx.conf"
        self.conf.write_text(CONF.format(user=user, work=self.work, servers=servers, port=self.port,
                                         buffering="on" if buffering else "off", gzip="on" if gzip else "off"))
        binary = nginx_binary()
        check = subprocess.run([binary, "-t", "-q", "-p", str(self.work), "-c", str(self.conf)], capture_output=True,
                               text=True)
        if check.returncode != 0:
            raise RuntimeError(f"nginx -t refused {self.conf}:\n{check.stderr}")
        self.proc = subprocess.Popen([binary, "-p", str(self.work), "-c", str(self.conf), "-g", "daemon off;"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}: {self.proc.stderr.read().decode()}")
            try:
                httpx.get(self.base_url + "/health", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.05)
        raise TimeoutError(f"nginx not answering on {self.base_url}")

    def error_log(self) -> str:
        path = self.work / "error.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGQUIT)  # graceful: the master and its worker
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
