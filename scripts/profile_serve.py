"""Where a served token's time goes: py-spy samples the worker and the front end while one client
streams greedy requests (compare its inter-token time with scripts/step_profile.py's lean step).

    python scripts/profile_serve.py --method ar --requests 6 --max-tokens 128 [--target smollm2 --draft smollm2]

Prints (and with --json writes) the client's inter-token time and the worker's and the front end's
time by function (self time, and the
inclusive time of the frames that matter: the engine step, the target forward, the pipe, the
detokenizer). Run it alone on the cores: py-spy's samples are proportions, but the inter-token time is not.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
# inclusive-time frames reported for the worker: (label, function name as py-spy prints it)
WORKER_FRAMES = [("engine step", "step (adasd_core/engine.py"), ("target forward", "forward (adasd_core/lean.py"),
                 ("feed prompts", "feed_prompts (adasd_core/runner.py"), ("propose", "propose (adasd_core/proposer.py"),
                 ("finish round", "finish_round (adasd_core/postprocess.py"),
                 ("emit / detokenize", "emit (adasd_core/sequence.py"),
                 ("pipe send", "send (server/worker.py"), ("pipe poll", "poll (server/worker.py"),
                 ("kv report", "report_kv (server/worker.py"),
                 ("probs", "logits_to_probs_rows (adasd_core/sampling.py")]


def wait_ready(url: str, timeout: float = 600.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not become ready")


def stream_once(url: str, prompt: str, max_tokens: int, method: str) -> tuple[list[float], int]:
    """Chunk arrival times (s) of one streamed chat completion, and its completion tokens."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "adasd": {"method": method},
            "ignore_eos": True}
    times, tokens = [], 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
    return times, tokens


def aggregate(raw: Path) -> tuple[int, collections.Counter, collections.Counter]:
    """py-spy raw output (folded stacks with counts) -> (samples, self counts, inclusive counts) by frame."""
    total, own, incl = 0, collections.Counter(), collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    return total, own, incl


def inclusive(incl: collections.Counter, key: str) -> int:
    return sum(n for f, n in incl.items() if key in f)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="smollm2")
    ap.add_argument("--draft", default="smollm2")
    ap.add_argument("--method", default="ar")
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--port", type=int, default=8799)
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    url = f"http://127.0.0.1:{args.port}"
    work = Path(tempfile.mkdtemp(prefix="profile_serve_"))
    server = subprocess.Popen([sys.executable, "-m", "server", "--target", args.target, "--draft", args.draft,
                               "--port", str(args.port), "--max-running", "1", "--warm-state-path", "none"],
                              cwd=ROOT, stdout=open(work / "server.log", "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        wait_ready(url)
        worker = httpx.get(f"{url}/ready", timeout=5).json()["worker_pid"]
        prompt = "Write a Python function that returns the n-th Fibonacci number, with a docstring and tests."
        stream_once(url, prompt, 16, args.method)  # warm-up
        spies = [subprocess.Popen([py_spy, "record", "--pid", str(pid), "--rate", str(args.rate), "--format", "raw",
                                   "--output", str(work / f"{name}.txt"), "--nonblocking"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for name, pid in (("worker", worker), ("frontend", server.pid))]
        time.sleep(1.0)
        itl = []
        for _ in range(args.requests):
            times, tokens = stream_once(url, prompt, args.max_tokens, args.method)
            if len(times) > 1 and tokens > 1:
                itl.append((times[-1] - times[0]) / (tokens - 1))
        for spy in spies:
            spy.send_signal(signal.SIGINT)
        for spy in spies:
            spy.wait(60)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)
    result = {"method": args.method, "requests": args.requests, "max_tokens": args.max_tokens,
              "itl_ms_median": round(1e3 * statistics.median(itl), 2) if itl else None, "processes": {}}
    for name in ("worker", "frontend"):
        raw = work / f"{name}.txt"
        if not raw.exists():
            continue
        total, own, incl = aggregate(raw)
        top = [{"frame": f, "share": round(n / total, 4)} for f, n in own.most_common(15)]
        rows = {}
        if name == "worker":
            rows = {label: round(inclusive(incl, key) / total, 4) for label, key in WORKER_FRAMES}
        result["processes"][name] = {"samples": total, "self_top": top, "inclusive": rows}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
