"""Draft-length policies: when to stop drafting within a round.

A policy answers `keep_drafting(entropy, n)` after each candidate and learns in `observe` from
the round's Observation (the candidates the target examined), like transformers'
update_candidate_strategy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from adasd_core.verification import Observation

WINDOW = 20  # hard cap per round (the paper's value)


@dataclass
class RejectedEntropy:
    """T_G: the mean draft entropy of every candidate the target has rejected so far (the running
    mean over the whole history, not a window); None before the first rejection."""

    total: float = 0.0
    count: int = 0

    @property
    def threshold(self) -> float | None:
        return self.total / self.count if self.count else None

    def observe(self, obs: Observation) -> None:
        rejected = obs.rejected_entropies
        self.total += sum(rejected)
        self.count += len(rejected)


class DraftPolicy:
    name = "fixed"
    uses_entropy = False
    adaptive = False  # its length follows the text, so a batch-aware cap may shorten it

    @property
    def max_draft(self) -> int:
        """The most candidates this policy drafts in the next round."""
        raise NotImplementedError  # pragma: no cover - abstract

    def keep_drafting(self, entropy: float, n_drafted: int) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def observe(self, obs: Observation) -> None:
        pass

    @property
    def threshold(self) -> float | None:
        return None


@dataclass
class FixedK(DraftPolicy):
    k: int = 5

    def __post_init__(self) -> None:
        if not 1 <= self.k <= WINDOW:
            raise ValueError(f"k must be between 1 and {WINDOW}")

    @property
    def max_draft(self) -> int:
        return self.k

    def keep_drafting(self, entropy: float, n_drafted: int) -> bool:
        return n_drafted < self.k


@dataclass
class EntropyStop(DraftPolicy):
    """Stop after a candidate whose draft entropy exceeds T_G, the running mean entropy of every
    rejected candidate so far; before the first rejection, draft up to the window."""

    name = "entropy"
    uses_entropy = True
    adaptive = True
    window: int = WINDOW
    rejected: RejectedEntropy = field(default_factory=RejectedEntropy)

    @property
    def max_draft(self) -> int:
        return self.window

    @property
    def threshold(self) -> float | None:
        return self.rejected.threshold

    def keep_drafting(self, entropy: float, n_drafted: int) -> bool:
        if n_drafted >= self.window:
            return False
        t = self.threshold
        return t is None or entropy <= t

    def observe(self, obs: Observation) -> None:
        self.rejected.observe(obs)


@dataclass
class CappedEntropyStop(EntropyStop):
    """The entropy stop under a draft-length cap that follows the outcomes, as transformers'
    assisted generation schedules its drafts: +2 after a round whose candidates were all
    accepted, -1 otherwise. It bounds AdaSD's long drafts (the first rounds, before T_G is
    known, and stretches where the draft is confident but wrong)."""

    name = "capped-entropy"
    cap: int = 5

    @property
    def max_draft(self) -> int:
        return self.cap

    def keep_drafting(self, entropy: float, n_drafted: int) -> bool:
        return n_drafted < self.cap and super().keep_drafting(entropy, n_drafted)

    def observe(self, obs: Observation) -> None:
        super().observe(obs)
        self.cap = min(self.window, self.cap + 2) if obs.all_accepted else max(1, self.cap - 1)
