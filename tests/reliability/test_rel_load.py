"""Load, short form of `python -m scripts.reliability.load` (CI: 16 clients for 20 s by default).

ADASD_REL_LOAD_CLIENTS / ADASD_REL_LOAD_S change the size; the long form is in docs/RELIABILITY.md.
"""

from __future__ import annotations

import asyncio
import os

from scripts.reliability.load import markdown, run_load, verdict


def test_concurrent_streaming_and_plain_clients(rel_start):
    clients = int(os.environ.get("ADASD_REL_LOAD_CLIENTS", "16"))
    duration = float(os.environ.get("ADASD_REL_LOAD_S", "20"))
    max_queue = 8  # smaller than the client count: 429s are possible and allowed, the queue stays bounded
    srv = rel_start(round_delay_s=0, max_running=8, max_queue=max_queue)
    res = asyncio.run(run_load(srv.base_url, srv.headers, srv.model, clients, duration, max_tokens=24,
                               fe_pid=srv.proc.pid))
    print("\n" + markdown(res))
    # RSS after a short run is noisy (allocator warm-up): the CI bound is looser than the soak's 10 %
    problems = verdict(res, max_rss_growth_pct=25.0, capacity=8 + max_queue)
    assert not problems, problems
    assert res["requests_ok"] >= clients
    assert res["peak_running"] <= 8
