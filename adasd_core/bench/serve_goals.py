"""The serving sweep's reference row and targets, shared by the sweep, its report and its plots."""

REFERENCE = "ar"  # speedups are over this row
# the real pair's targets (greedy, 128 tokens): adasd over ar by concurrency (never below it); adasd's
# aggregate at 8 clients over its own at 1; adasd at 1 client over an external server's row (llama-server
# with the same draft) and at 8 over that server's best row; inter-token latency p99 of the arrivals rows
# within a factor of their median; adasd at 1 client no slower than a baseline run (--baseline)
VS_AR_GOAL = {1: 1.5, 2: 1.2, 4: 1.2, 8: 1.0, 16: 1.0}
VS_AR_DEFAULT = 1.0  # other levels: never below ar
SCALING_GOAL = 4.0
EXTERNAL_ONE_CLIENT_GOAL = 1.0
EXTERNAL_BEST_AT_8_GOAL = 0.8
ITL_P99_OVER_MEDIAN_GOAL = 2.0  # at most
BASELINE_GOAL = 1.0


def vs_ar_goal(concurrency: int) -> float:
    return VS_AR_GOAL.get(concurrency, VS_AR_DEFAULT)
