"""Benchmarks: `adasd bench` (in process, every method on every task) and `adasd bench-serve`
(a running server over HTTP). See PERFORMANCE.md for the method."""

from adasd_core.bench.harness import BenchConfig, run_bench
from adasd_core.bench.methods import METHOD_KEYS

__all__ = ["BenchConfig", "run_bench", "METHOD_KEYS"]
