"""Fuzzing below the schema, short form: mutated bodies (lone surrogates, NUL, invalid UTF-8, overlong
and non-finite numbers, deep nesting, huge arrays) over one keep-alive connection, each followed by
a normal completion on that same connection.

Checks: no 5xx, every error in the OpenAI shape without a traceback, the connection is never closed
or reset, the normal request right after each case gets a 200, and the worker never restarted.
ADASD_REL_BYTEFUZZ_CASES sets the number of cases (CI default 300, bounded to 60 s). The long form
is `python -m scripts.reliability.bytefuzz` (docs/RELIABILITY.md).
"""

from __future__ import annotations

import json
import os
import random

from scripts.reliability import bytefuzz

CASES = int(os.environ.get("ADASD_REL_BYTEFUZZ_CASES", "300"))


def test_byte_level_fuzz_keeps_the_connection_and_the_server(rel_server):
    pid = rel_server.ready()[1]["worker_pid"]
    report = bytefuzz.run(rel_server.base_url, rel_server.headers, rel_server.model, cases=CASES, max_time=60, seed=11)
    print(report.summary())
    assert not report.failures, json.dumps(report.failures[:5], indent=1)
    assert report.server_errors == 0
    assert report.cases >= min(CASES, 30), report.summary()  # the time bound did not cut it to nothing
    assert report.client_errors > report.cases // 2  # most mutations are refused, each with a 4xx
    code, body = rel_server.ready()
    assert code == 200 and body["worker_pid"] == pid


def test_mutations_are_seeded_and_bounded():
    pool = [json.dumps(body).encode() for _, body in bytefuzz.seeds("tiny")]
    runs = []
    for _ in range(2):
        rng = random.Random(5)
        runs.append([bytefuzz.mutate(rng, pool[i % len(pool)]) for i in range(50)])
    assert runs[0] == runs[1]
    rng = random.Random(0)
    names = set()
    for _ in range(2000):
        name, body = bytefuzz.mutate(rng, rng.choice(pool))
        names.add(name.split("+")[0])
        assert len(body) < 16 * bytefuzz.MAX_BODY  # within what the server drains before its 413
    assert names == set(bytefuzz.MUTATORS)
