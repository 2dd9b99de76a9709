"""One request's decoding state: its tokens, sampling, drafting policy, relaxed check, output
processing (EOS, length, stop strings, detokenising) and statistics."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from adasd_core.detokenize import IncrementalDetokenizer, StopStringMatcher
from adasd_core.drafting import DraftPolicy
from adasd_core.grammar import Constraint
from adasd_core.sampling import SamplingParams
from adasd_core.stats import GenerationStats
from adasd_core.verification import RelaxedCheck


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float | None  # None: the first prompt token, which nothing predicts
    top: list[tuple[int, float]] | None


@dataclass
class PromptLogprobs:
    """A scored prompt (SamplingParams.prompt_logprobs): one entry per prompt token, the first
    without a log-probability. An engine event of its own, before the request's first Delta."""

    logprobs: list[TokenLogprob]


SOURCES = ("standard", "relaxed", "correction", "bonus", "ar", "forced")


@dataclass
class TokenSource:
    """Where one emitted token came from (the request option `token_sources`).

    source: a drafted candidate accepted by the standard check (`standard`) or only by the relaxed
    check (`relaxed`); the target's `correction` at the first candidate that failed both; the `bonus`
    token after a round whose candidates were all accepted; `ar`: a round with no candidates; `forced`:
    the only token the request's grammar allows there, taken without a draft step (jump-forward before a
    round's drafting, or a forced run inside a draft, fed to the draft's next step with the candidate before).
    The numbers are those of the draft's candidate at this position (for a correction: the one it
    replaced), where the round computed them; nothing is computed for this record alone."""

    source: str
    round: int  # the request's round that emitted the token, from 1
    entropy: float | None = None  # H(q) of the draft's distribution at this position (nats)
    js_distance: float | None = None  # d(p, q), where the relaxed check is on
    posterior: float | None = None  # P(A|d), where the Bayesian check was consulted (standard check failed)
    rejected: int | None = None  # correction: the draft's candidate it replaced
    text: str = ""  # this token's share of the output text (Sequence.emit; before stop strings cut it)


@dataclass
class Delta:
    """What one round adds to a request's output."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "grammar_dead_end" | None
    logprobs: list[TokenLogprob] | None = None
    sources: list[TokenSource] | None = None  # one per token id, when the request asked for them
    round: dict | None = None  # the round's counts and thresholds after it, with `sources`


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    method: str
    policy: DraftPolicy | None  # None: no drafting (ar)
    relaxed: RelaxedCheck
    generator: torch.Generator
    eos: set[int]
    detok: IncrementalDetokenizer
    stop: StopStringMatcher
    stats: GenerationStats
    context_length: int
    request_id: str = ""
    family: str | None = None  # warm-start statistics family (adasd_core.warm); None: learns nothing
    token_sources: bool = False  # report where each emitted token came from (Delta.sources)
    # reproducible requests (seeded, or greedy with a relaxed check): the acceptance their draft plan shrinks
    # towards, from the state they started from; None: they plan by the batch size (SpeculativeEngine._draft_caps)
    plan_prior: float | None = None
    fingerprint: str = ""  # the system_fingerprint of what it started from (a server's engine sets it)
    constraint: Constraint | None = None  # the grammar's matcher (SamplingParams.grammar)
    forced: list[int] = field(default_factory=list)  # this round's forced tokens, before its candidates
    tokens: list[int] = field(default_factory=list)
    slot: int = -1  # KV slot in both pools while admitted
    admitted_at: float | None = None  # time.monotonic() when the scheduler gave it a slot
    prefilled: int = 0  # prefill_ids already in the caches (all but the last are prefilled)
    # what its prefill feeds: the prompt, or after a preemption every token so far (recomputed)
    prefill_ids: list[int] = field(default_factory=list)
    preemptions: int = 0
    finish_reason: str | None = None
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # scored so far (tokens 1..prefilled)

    def __post_init__(self) -> None:
        self.tokens = list(self.prompt_ids)
        self.prefill_ids = self.prompt_ids

    @property
    def reproducible(self) -> bool:
        """Its text must repeat in any batch (seeded, or greedy with a check that can relax)."""
        return self.plan_prior is not None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def scores_prompt(self) -> bool:
        """Its prompt goes through the scoring phase (prompt logprobs, or nothing to generate)."""
        return self.params.prompt_logprobs is not None or self.params.max_tokens == 0

    @property
    def prompt_ready(self) -> bool:
        """All of its prompt but the last token is in the caches (scored without log-probabilities:
        nothing to feed)."""
        scored_only = self.scores_prompt and self.params.prompt_logprobs is None
        return self.prefilled == len(self.prefill_ids) - 1 or scored_only

    def preempted(self) -> None:
        """Its KV was freed for others: the next prefill recomputes every token but the last."""
        self.prefill_ids, self.prefilled, self.preemptions = list(self.tokens), 0, self.preemptions + 1

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def remaining(self) -> int:
        """Tokens this request may still add."""
        return min(self.params.max_tokens - self.generated, self.context_length - len(self.tokens))

    def checkpoint(self, batched: bool) -> tuple:
        """What a failed batch's retry restores: the generator's state (a sampled request in a batch:
        its drafts drew from it) and the grammar matcher's position."""
        state = self.generator.get_state() if batched and not self.params.greedy else None
        return state, None if self.constraint is None else self.constraint.consumed

    def rewind(self, saved: tuple) -> None:
        state, consumed = saved
        if state is not None:
            self.generator.set_state(state)
        if consumed is not None:
            self.constraint.restore(consumed)

    def acceptance_estimate(self, prior: float, weight: float = 4.0) -> float:
        """P(a candidate is accepted | the ones before it were): accepted / examined candidates (each
        round examines its accepted ones plus at most one rejection), shrunk towards `prior` while
        the history is short."""
        s = self.stats
        rejections = (s.drafted_by_position[0] if s.drafted_by_position else 0) - s.bonus_tokens
        return (s.accepted_tokens + weight * prior) / (s.accepted_tokens + rejections + weight)

    def emit(self, emitted: list[int], logprobs: list[TokenLogprob] | None,
             sources: list[TokenSource] | None = None, finish: str | None = None) -> Delta:
        """Append tokens, apply EOS / length / stop strings, and produce the text delta. `finish`: end
        the request with this reason unless those end it first."""
        for i, t in enumerate(emitted):
            if t in self.eos:
                emitted = emitted[: i + 1]
                logprobs = logprobs[: i + 1] if logprobs is not None else None
                sources = sources[: i + 1] if sources is not None else None
                self.finish_reason = "stop"
                break
        self.tokens.extend(emitted)
        self.stats.generated_tokens = self.generated
        if self.finish_reason is None and self.remaining <= 0:
            self.finish_reason = "length"
        if self.finish_reason is None and finish:
            self.finish_reason = finish
        if sources is None:
            text = self.detok.push([t for t in emitted if t not in self.eos])
            if self.finished:
                text += self.detok.flush()
        else:  # one token at a time, so that each knows its share of the text
            for t, src in zip(emitted, sources, strict=True):
                src.text = "" if t in self.eos else self.detok.push([t])
            if self.finished:
                sources[-1].text += self.detok.flush()
            text = "".join(src.text for src in sources)
        text, stopped = self.stop.push(text)
        if stopped:
            self.finish_reason = "stop"
        elif self.finished:
            text += self.stop.flush()
        return Delta(text=text, token_ids=emitted, finish_reason=self.finish_reason, logprobs=logprobs, sources=sources)
