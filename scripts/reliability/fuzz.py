"""Fuzzing, long form: the schemathesis CLI (`st run`) against the server's own /openapi.json.

    python -m scripts.reliability.fuzz --target tiny --draft tiny --max-examples 500 --max-time 1800
    python -m scripts.reliability.fuzz --url http://127.0.0.1:8000 --api-key KEY

Every operation, checks `not_a_server_error` and `response_schema_conformance` (our responses
match what we declare), all phases (examples, coverage, fuzzing, stateful), bounded by
--max-examples per operation and --max-time overall. Loopback only. Exit status: schemathesis'.
The CI short form is tests/reliability/test_rel_fuzz.py. schemathesis only sends valid Unicode in
well-formed JSON; scripts/reliability/bytefuzz.py fuzzes below that (bytes, escapes, numbers, nesting).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys

from scripts.reliability.serverproc import attach_or_start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.reliability.fuzz", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="an already running server (loopback only)")
    p.add_argument("--api-key", default="sk-adasd-fuzz")
    p.add_argument("--target", default="tiny")
    p.add_argument("--draft", default="tiny")
    p.add_argument("--max-examples", type=int, default=200, help="examples per operation")
    p.add_argument("--max-time", type=int, default=600, help="seconds for the whole run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", default="1")
    p.add_argument("--log-dir", default=None)
    p.add_argument("--report-dir", default=None, help="also write schemathesis' junit + ndjson reports here")
    args = p.parse_args(argv)

    srv, base, _ = attach_or_start(args)
    st = shutil.which("st") or shutil.which("schemathesis")
    cmd = [st, "run", base + "/openapi.json", "--url", base, "-H", f"Authorization: Bearer {args.api_key}",
           "--checks", "not_a_server_error,response_schema_conformance", "--max-examples", str(args.max_examples),
           "--max-time", str(args.max_time), "--seed", str(args.seed), "--workers", str(args.workers),
           "--request-timeout", "120", "--suppress-health-check", "all"]
    if args.report_dir:
        cmd += ["--report", "junit,ndjson", "--report-dir", args.report_dir]
    print("+ " + " ".join(c if "Bearer" not in c else "Authorization: Bearer ***" for c in cmd), flush=True)
    try:
        return subprocess.call(cmd)
    finally:
        if srv:
            srv.stop()


if __name__ == "__main__":
    sys.exit(main())
