"""Which method a request runs: the methods of shared/ADASD.md (and ours), as one small config."""

from __future__ import annotations

from dataclasses import dataclass

from adasd_core.drafting import WINDOW, CappedEntropyStop, DraftPolicy, EntropyStop, FixedK
from adasd_core.errors import InvalidRequestError
from adasd_core.verification import RelaxedCheck, make_relaxed_check

METHODS = ("ar", "vanilla", "gen-only", "verify-only", "adasd", "hybrid")
VERIFICATIONS = ("bayes", "threshold", "none")
RELAXED_METHODS = ("verify-only", "adasd", "hybrid")  # the ones whose `verification` applies


@dataclass
class SpecConfig:
    """Which method a request runs. `verification` applies to verify-only, adasd and hybrid;
    `k` is the fixed draft length of vanilla and verify-only, and hybrid's first cap."""

    method: str = "adasd"
    k: int = 5
    verification: str = "bayes"
    window: int = WINDOW
    trace: bool = False
    token_sources: bool = False  # report where each emitted token came from (Delta.sources, Delta.round)
    # start from the statistics of earlier requests (adasd_core.warm); off here (the CLI, benchmarks: the
    # per-request semantics of shared/ADASD.md, seeded runs independent of history), on by default in the server
    warm_start: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidRequestError(
                f"unknown method {self.method!r}: use one of {', '.join(METHODS)}", param="method"
            )
        if self.verification not in VERIFICATIONS:
            raise InvalidRequestError(
                f"unknown verification {self.verification!r}: use one of {', '.join(VERIFICATIONS)}",
                param="verification",
            )
        if not 1 <= self.k <= WINDOW:
            raise InvalidRequestError(f"k must be between 1 and {WINDOW}", param="k")
        if not 1 <= self.window <= WINDOW:
            raise InvalidRequestError(f"window must be between 1 and {WINDOW}", param="window")

    def draft_policy(self) -> DraftPolicy | None:
        if self.method == "ar":
            return None
        if self.method in ("vanilla", "verify-only"):
            return FixedK(self.k)
        if self.method == "hybrid":
            return CappedEntropyStop(self.window, cap=min(self.k, self.window))
        return EntropyStop(self.window)

    def relaxed_check(self) -> RelaxedCheck:
        return make_relaxed_check(self.verification if self.method in RELAXED_METHODS else "none")
