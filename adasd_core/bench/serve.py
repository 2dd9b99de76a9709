"""`adasd bench-serve`: a running OpenAI-compatible server, over HTTP, at several concurrencies.

The tool is split by role; this module re-exports its public names:
- serve_client: streamed /v1/completions requests, timed chunk by chunk (TTFT, ITL, chunk gaps, tokens);
  closed-loop (c in flight) and open-loop (arrivals at given times) batches.
- serve_sweep: the configuration, the sweep (concurrency levels x methods, interleaved, repeats),
  the arrivals-while-streaming rows, the overhead ratio (HTTP vs in process), the targets.
- serve_report: bench_serve.md and bench_serve.json.
- serve_plots: bench_serve.png.
"""

from adasd_core.bench.serve_client import (  # noqa: F401
    Endpoint,
    RequestResult,
    percentile,
    run_closed,
    run_open,
    server_model,
    stream_one,
    wait_until_ready,
)
from adasd_core.bench.serve_report import markdown  # noqa: F401
from adasd_core.bench.serve_sweep import (  # noqa: F401
    DEFAULT_CONCURRENCY,
    SWEEP_METHODS,
    ServeBenchConfig,
    check_targets,
    compare_levels,
    run_bench_serve,
    summarise,
)
