"""Per-request statistics of the speculative loop, collected in one dataclass."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class GenerationStats:
    method: str = ""
    prompt_tokens: int = 0
    generated_tokens: int = 0
    rounds: int = 0
    drafted_tokens: int = 0
    accepted_standard: int = 0
    accepted_relaxed: int = 0
    bonus_tokens: int = 0
    forced_tokens: int = 0  # the only token the grammar allowed, taken without drafting (jump-forward)
    target_forwards: int = 0
    draft_forwards: int = 0
    time_draft_s: float = 0.0
    time_verify_s: float = 0.0
    time_other_s: float = 0.0
    time_prefill_s: float = 0.0
    batch_size_sum: int = 0  # sum over rounds of the batch size the round ran in
    wall_s: float = 0.0
    target_step_s: float = 0.0  # measured cost of one single-token target decode step
    entropy_threshold: float | None = None  # final T_G
    js_threshold: float | None = None  # final T_V (threshold check)
    kde_accepted: int | None = None  # KDE sample sizes (bayes check)
    kde_rejected: int | None = None
    # accepted / drafted counts by position in the draft (index 0 is the first candidate)
    accepted_by_position: list[int] = field(default_factory=list)
    drafted_by_position: list[int] = field(default_factory=list)
    # excess surprisal of each emitted token, -log p(x) - H(p) under the request's processed target
    # distribution p at its position: zero in expectation for a lossless method (sampled requests)
    surprisal_sum: float = 0.0
    surprisal_sq_sum: float = 0.0
    surprisal_count: int = 0
    warm_start: bool | None = None  # None: no statistics to warm (ar and the lossless fixed-K rows)
    # (T_G, T_V or P(A) summary) after each round, when tracing is on
    trace: list[dict] | None = None

    def observe_round(self, drafted: int, n_standard: int, n_relaxed: int, bonus: bool,
                      accepted_flags: list[bool]) -> None:
        self.rounds += 1
        self.drafted_tokens += drafted
        self.accepted_standard += n_standard
        self.accepted_relaxed += n_relaxed
        self.bonus_tokens += int(bonus)
        for i in range(drafted):
            if i >= len(self.drafted_by_position):
                self.drafted_by_position.append(0)
                self.accepted_by_position.append(0)
            self.drafted_by_position[i] += 1
            self.accepted_by_position[i] += int(i < len(accepted_flags) and accepted_flags[i])

    def record_thresholds(self, entropy_threshold: float | None, relaxed_state: dict) -> None:
        """The final T_G and the relaxed check's state (RelaxedCheck.state())."""
        self.entropy_threshold = entropy_threshold
        self.js_threshold = relaxed_state.get("js_threshold")
        self.kde_accepted = relaxed_state.get("kde_accepted")
        self.kde_rejected = relaxed_state.get("kde_rejected")

    def observe_surprisal(self, excess: list[float]) -> None:
        self.surprisal_sum += sum(excess)
        self.surprisal_sq_sum += sum(e * e for e in excess)
        self.surprisal_count += len(excess)

    @property
    def excess_surprisal(self) -> float | None:
        """Mean excess surprisal per emitted token (nats); None before any token."""
        return self.surprisal_sum / self.surprisal_count if self.surprisal_count else None

    @property
    def accepted_tokens(self) -> int:
        return self.accepted_standard + self.accepted_relaxed

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def mean_draft_length(self) -> float:
        return self.drafted_tokens / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_round(self) -> float:
        return self.generated_tokens / self.rounds if self.rounds else 0.0

    @property
    def mean_batch_size(self) -> float:
        return self.batch_size_sum / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def estimated_speedup(self) -> float:
        """Target-alone time for these tokens (tokens x one measured target step) / wall time."""
        if self.wall_s <= 0 or self.target_step_s <= 0:
            return 0.0
        return self.generated_tokens * self.target_step_s / self.wall_s

    def to_dict(self) -> dict:
        out = asdict(self)
        if out["trace"] is None:
            del out["trace"]
        for name in ("accepted_tokens", "acceptance_rate", "mean_draft_length", "tokens_per_round",
                     "tokens_per_second", "estimated_speedup", "mean_batch_size"):
            out[name] = round(getattr(self, name), 4) if isinstance(getattr(self, name), float) else getattr(self, name)
        es = self.excess_surprisal
        out["excess_surprisal"] = None if es is None else round(es, 5)
        for name in ("surprisal_sum", "surprisal_sq_sum"):
            out[name] = round(out[name], 6)
        for name in ("time_draft_s", "time_verify_s", "time_other_s", "time_prefill_s", "wall_s", "target_step_s"):
            out[name] = round(out[name], 6)
        return out
