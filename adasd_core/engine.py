"""The batched round loop that serves all methods of shared/ADASD.md.

Every running request advances by one round per engine step, all in one batch:
- draft: one batched draft forward per draft position; each sequence stops on its own policy
  (fixed K, the entropy threshold T_G, the hybrid cap), under a batch-aware cap for the adaptive
  policies, while the others go on;
- verify: one batched target forward scores every sequence's last token, candidates and bonus
  position (ragged lengths, packed by kv_cache / lean);
- per sequence: acceptance (verification.accept_candidates), correction or bonus token,
  statistics, and rollback of both caches to the accepted prefix.
`ar` requests ride in the same batch with no candidates.
Prompt scoring (prompt_logprobs: echo with logprobs) is a phase of its own before the prefill: the
target alone over the prompt, chunked like a prefill but keeping every position's logits, with no
draft work; a scored request then finishes (max_tokens 0) or runs like a prefilled one.

Cache invariant between rounds: a sequence's target slot holds every token but the last; its
draft slot holds a prefix of that. New requests prefill all but their last prompt token in
chunks between rounds, so a long prompt never freezes the running streams for long.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Iterator

import torch

from adasd_core import costs as step_costs
from adasd_core.detokenize import IncrementalDetokenizer, StopStringMatcher
from adasd_core.drafting import WINDOW, CappedEntropyStop, DraftPolicy, EntropyStop, FixedK
from adasd_core.errors import InvalidRequestError
from adasd_core.kv_cache import make_pool
from adasd_core.models import ModelPair
from adasd_core.sampling import SamplingParams, logits_to_probs_rows, make_generator, sample_rows
from adasd_core.costs import decode_step_seconds  # noqa: F401  (re-exported)
from adasd_core.round_output import Draft, excess_surprisal, token_logprobs, token_sources
from adasd_core.sequence import Delta, PromptLogprobs, Sequence, TokenLogprob
from adasd_core.stats import GenerationStats
from adasd_core.validation import check_prompt_ids
from adasd_core.verification import RelaxedCheck, accept_candidates, entropy, make_relaxed_check
from adasd_core.warm import (
    ADAPTIVE_METHODS,
    Schedule,
    SharedStats,
    Snapshot,
    all_families,
    digest,
    family_key,
    fingerprint,
)

METHODS = ("ar", "vanilla", "gen-only", "verify-only", "adasd", "hybrid")
SCORE_ROWS = 256  # prompt logprobs are computed this many positions at a time (float32 [rows, V] each)
PRIOR_ACCEPTANCE = 0.6  # assumed before a method has any history: optimistic, so new requests draft and learn
VERIFICATIONS = ("bayes", "threshold", "none")
MAX_EPOCHS = 256  # published states kept for requests pinned to one (a family stops publishing once frozen)
__all__ = ["METHODS", "VERIFICATIONS", "Delta", "GenerationResult", "PromptLogprobs", "Sequence", "SpecConfig",
           "SpeculativeEngine", "TokenLogprob", "decode_step_seconds"]


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
            raise InvalidRequestError(f"unknown method {self.method!r}: use one of {', '.join(METHODS)}", param="method")
        if self.verification not in VERIFICATIONS:
            raise InvalidRequestError(
                f"unknown verification {self.verification!r}: use one of {', '.join(VERIFICATIONS)}", param="verification"
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
        relaxed = self.method in ("verify-only", "adasd", "hybrid")
        return make_relaxed_check(self.verification if relaxed else "none")


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: GenerationStats
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None  # SamplingParams.prompt_logprobs: the first has none


def pair_min_posterior(pair: ModelPair) -> float | None:
    """BayesCheck.min_posterior as chosen on this pair's own frontier, from the draft's config
    (`adasd_draft.min_posterior`); None: the class default."""
    extra = getattr(getattr(pair.draft, "config", None), "adasd_draft", None) or {}
    value = extra.get("min_posterior") if isinstance(extra, dict) else None
    return None if value is None else float(value)


class SpeculativeEngine:
    """Holds a loaded pair and its KV pools; runs batched rounds. One thread drives it.

    Serving: `new_sequence` (validates) -> `add` -> `step()` repeatedly (events per sequence)
    -> `abort` to drop one early. Single requests: `generate`, `stream`, `start`.
    `batch_aware` caps the adaptive methods' drafts by what pays at the batch size (the server
    turns it on); off, every method drafts as shared/ADASD.md defines it (benchmarks, the CLI).
    """

    def __init__(self, pair: ModelPair, default_spec: SpecConfig | None = None, calibrate: bool = True,
                 max_running: int = 16, batch_aware: bool = False):
        self.pair = pair
        self.default_spec = default_spec or SpecConfig()
        self.slots = max_running
        capacity = pair.context_length + WINDOW + 2  # idle slots run a dummy token past their length
        self.target_pool = make_pool(pair.target, max_running, capacity)
        self.draft_pool = make_pool(pair.draft, max_running, capacity) if pair.draft is not None else None
        self.owner: list[Sequence | None] = [None] * max_running
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self.scoring: list[Sequence] = []  # admitted; prompt being scored (Sequence.scores_prompt)
        self.running: list[Sequence] = []  # running[i].slot == i: the batch is slots 0..R-1
        self.prefill_budget = 2048 if pair.device.type == "cuda" else 256  # prompt tokens per step
        self.batch_aware = batch_aware
        self.rounds = 0
        self._round_end: float | None = None  # when the last round ended, if the caller stepped straight on
        self._outside_s = 0.0
        self.acceptance_prior: dict[str, float] = {}  # per method, from finished rounds of all requests
        self.shared: dict[str, SharedStats] = {}  # warm start: per family, from finished rounds of all requests
        # published snapshots (adasd_core.warm): with a schedule (the server), new requests start from these,
        # never from the live `shared`; without one (in process) they start from `shared` itself
        self.schedule: Schedule | None = None
        self.published: dict[str, Snapshot] = {}
        self.epoch = 0  # count of publications; epochs[e] is the published dict after the e-th
        self.epochs: dict[int, dict[str, Snapshot]] = {0: self.published}
        self.static_fingerprint = ""  # the server's identity and defaults (server.worker sets it)
        # the step costs reproducible requests plan with: measured once, then saved with the warm-start state
        self.costs = self.plan_costs = step_costs.StepCosts.nominal()
        self._plan_digest: tuple = (None, "")
        self.target_step_s = 0.0
        # the Bayesian check's gate measured for this pair (the draft folder's config asks for it)
        self.min_posterior = pair_min_posterior(pair)
        if calibrate:
            self.calibrate()

    # ---------------------------------------------------------------- helpers

    def encode(self, text: str) -> list[int]:
        return self.pair.tokenizer(text, add_special_tokens=True)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.pair.tokenizer.decode(ids, skip_special_tokens=True)

    def calibrate(self) -> float:
        """Measure the step costs (the unit of the speedup estimate and the batch-aware cap)."""
        assert not (self.running or self.prefilling or self.scoring), "calibrate() while requests run"
        self.costs = step_costs.measure(self.target_pool, self.draft_pool, self.pair.vocab_size, self.slots)
        self.plan_costs = self.costs.frozen()
        self.target_step_s = self.costs.target_cost(1, 1)
        return self.target_step_s

    @property
    def idle(self) -> bool:
        return not (self.waiting or self.prefilling or self.scoring or self.running)

    @property
    def free_slots(self) -> int:
        return self.slots - len(self.running) - len(self.prefilling) - len(self.scoring) - len(self.waiting)

    def kv_tokens(self) -> tuple[int, int]:
        """Tokens resident in the (target, draft) KV pools over the slots in use."""
        held = [s for s, owner in enumerate(self.owner) if owner is not None]
        target = sum(self.target_pool.length(s) for s in held)
        draft = sum(self.draft_pool.length(s) for s in held) if self.draft_pool is not None else 0
        return target, draft

    # ---------------------------------------------------------------- requests

    def new_sequence(self, prompt: str | list[int], params: SamplingParams | None = None,
                     spec: SpecConfig | None = None, request_id: str = "", epoch: int | None = None) -> Sequence:
        """Validate a request and build its state (no model work). `epoch`: the published state it
        starts from (the one its fingerprint names; default the latest)."""
        pair, params, spec = self.pair, params or SamplingParams(), spec or self.default_spec
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        check_prompt_ids(ids, pair.vocab_size, pair.context_length)
        if spec.method != "ar" and pair.draft is None:
            raise InvalidRequestError(f"method {spec.method!r} needs a draft model; this server has none", param="method")
        stats = GenerationStats(method=spec.method, prompt_tokens=len(ids), target_step_s=self.target_step_s)
        if spec.trace:
            stats.trace = []
        policy, relaxed = spec.draft_policy(), spec.relaxed_check()
        family = family_key(spec.method, spec.verification, params.greedy)
        start: SharedStats | Snapshot | None = None  # the state it starts from
        if family is not None:
            shared = self.shared.setdefault(family, SharedStats(kind=relaxed.name))
            stats.warm_start = spec.warm_start
            if spec.warm_start:
                if self.schedule is None:
                    start = shared
                else:
                    start = self.epochs.get(epoch, self.published).get(family) or Snapshot.empty(relaxed.name)
                relaxed = start.seed(policy, relaxed)
        if self.min_posterior is not None and hasattr(relaxed, "min_posterior"):
            relaxed.min_posterior = self.min_posterior
        # a request whose tokens the draft lengths decide (seeded, or greedy with a check that can relax) plans them
        # as if alone, from saved state only, so its output depends on neither its batch mates nor the
        # server's timings; the others (greedy lossless: their tokens are the target's whatever the
        # lengths; sampled without a seed) plan by the batch size
        plan_prior = None
        if params.seed is not None or (params.greedy and relaxed.can_relax):
            acceptance = (start.stats if isinstance(start, Snapshot) else start).acceptance if start else None
            plan_prior = PRIOR_ACCEPTANCE if acceptance is None else acceptance
        fp = ""
        if self.schedule is not None:
            snap = start if isinstance(start, Snapshot) else (Snapshot.empty(relaxed.name) if family else None)
            fp = self._fingerprint(spec.method, snap)
        return Sequence(
            prompt_ids=ids, params=params, method=spec.method, policy=policy, relaxed=relaxed,
            generator=make_generator(params.seed, pair.device), eos=set() if params.ignore_eos else pair.eos_token_ids,
            detok=IncrementalDetokenizer(pair.tokenizer, ids), stop=StopStringMatcher(params.stop), stats=stats,
            context_length=pair.context_length, request_id=request_id, family=family, token_sources=spec.token_sources,
            plan_prior=plan_prior, fingerprint=fp,
        )

    # ---------------------------------------------------------------- published state (warm start)

    def publish_due(self) -> list[str]:
        """Publish every family whose schedule says so (between engine steps: a running request keeps
        the copy it started from). Returns the families published."""
        if self.schedule is None:
            return []
        due = [k for k, live in self.shared.items() if self.schedule.due(live, self.published.get(k))]
        if due:
            self.published = {**self.published, **{k: Snapshot(self.shared[k]) for k in due}}
            self.epoch += 1
            self.epochs[self.epoch] = self.published
            self.epochs.pop(self.epoch - MAX_EPOCHS, None)
        return due

    def restore_published(self, published: dict[str, Snapshot]) -> None:
        """Start from saved snapshots (a restarted worker): they are epoch 0 of this process."""
        self.published = dict(published)
        self.epoch, self.epochs = 0, {0: self.published}

    @property
    def plan_digest(self) -> str:
        if self._plan_digest[0] is not self.plan_costs:  # computed once per plan
            self._plan_digest = (self.plan_costs, digest(self.plan_costs.to_json()))
        return self._plan_digest[1]

    def _fingerprint(self, method: str, snap: Snapshot | None) -> str:
        plan = self.plan_digest if (self.batch_aware and method in ADAPTIVE_METHODS) else None
        return fingerprint(self.static_fingerprint, plan, snap.digest if snap is not None else None)

    def fingerprints(self, epoch: int | None = None) -> dict[str, str]:
        """{warm.fingerprint_key: system_fingerprint} of every request kind at a published epoch."""
        published = self.epochs.get(epoch, self.published) if epoch is not None else self.published
        out = {"-": self._fingerprint("ar", None)}
        for family in all_families(METHODS, VERIFICATIONS):
            method, kind, _ = family.split("/")
            out[family] = self._fingerprint(method, published.get(family) or Snapshot.empty(kind))
            out[family + "#cold"] = self._fingerprint(method, Snapshot.empty(kind))
        return out

    def add(self, seq: Sequence) -> None:
        """Queue a sequence; it gets a slot and prefills in the next steps."""
        self.waiting.append(seq)

    def abort(self, seq: Sequence) -> None:
        """Drop a sequence wherever it is and free its slot now."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.prefilling or seq in self.scoring:
            (self.prefilling if seq in self.prefilling else self.scoring).remove(seq)
            self._clear_slot(seq)
        elif seq in self.running:
            self._release(seq)
        if seq.finish_reason is None:
            seq.finish_reason = "abort"

    # ---------------------------------------------------------------- one engine step

    def step(self) -> list[tuple[Sequence, Delta | Exception]]:
        """Admit, score and prefill one chunk of prompts, run one round for every running sequence.
        Returns each affected sequence's Delta (or PromptLogprobs), or the exception that ended it."""
        events: list[tuple[Sequence, Delta | PromptLogprobs | Exception]] = []
        # what the caller did between the last round and this step (a server's sending and polling) is
        # part of what a round costs it; long gaps are idle waits, not work
        gap = time.perf_counter() - self._round_end if self._round_end is not None else 0.0
        self._outside_s = gap if gap < 0.5 else 0.0
        self._admit()
        budget = self.prefill_budget  # prompt tokens per step, scoring and prefill together
        if self.scoring:
            scored, used = self._score_chunk(budget)
            events += scored
            budget -= used
        if self.prefilling:
            events += self._prefill_chunk(budget)
        if self.running:
            events += self._round(list(self.running))
        else:
            self._round_end = None
        self.publish_due()
        return events

    def _admit(self) -> None:
        while self.waiting and None in self.owner:
            seq = self.waiting.popleft()
            slot = len(self.owner) - 1 - self.owner[::-1].index(None)  # from the top: running grows from 0
            self.owner[slot], seq.slot = seq, slot
            (self.scoring if seq.scores_prompt else self.prefilling).append(seq)

    def _prefill_chunk(self, budget: int | None = None) -> list[tuple[Sequence, Delta | Exception]]:
        """Feed up to `budget` (prefill_budget) prompt tokens (all but each prompt's last) in one batched forward."""
        budget, batch = self.prefill_budget if budget is None else budget, []
        for seq in self.prefilling:
            n = min(seq.prompt_len - 1 - seq.prefilled, budget)
            if n > 0:
                batch.append((seq, n))
                budget -= n
            if budget <= 0:
                break
        events = []
        if batch:
            t0 = time.perf_counter()
            try:
                feeds = [seq.prompt_ids[seq.prefilled : seq.prefilled + n] for seq, n in batch]
                self.target_pool.forward([seq.slot for seq, _ in batch], feeds)
                drafting = [(seq, f) for (seq, _), f in zip(batch, feeds) if seq.policy is not None]
                if drafting:
                    self.draft_pool.forward([seq.slot for seq, _ in drafting], [f for _, f in drafting])
            except Exception as exc:  # the batch's requests end; the running ones go on
                for seq, _ in batch:
                    self.prefilling.remove(seq)
                    self._clear_slot(seq)
                    seq.finish_reason = "error"
                    events.append((seq, exc))
                return events
            elapsed = time.perf_counter() - t0
            for seq, n in batch:
                seq.prefilled += n
                seq.stats.target_forwards += 1
                seq.stats.draft_forwards += seq.policy is not None
                seq.stats.time_prefill_s += elapsed
        for seq in [s for s in self.prefilling if s.prefilled == s.prompt_len - 1]:
            self.prefilling.remove(seq)
            self._move(seq, len(self.running))
            self.running.append(seq)
        return events

    # ---------------------------------------------------------------- prompt scoring

    def _score_chunk(self, budget: int) -> tuple[list[tuple[Sequence, Delta | PromptLogprobs | Exception]], int]:
        """Score up to `budget` prompt tokens of the scoring sequences (all but each prompt's last) in
        one batched target forward that keeps every position's logits; no draft work. Returns the
        events and the tokens fed. A sequence whose prompt is scored gets its PromptLogprobs, then
        finishes (max_tokens 0) or joins the running batch with its target cache filled; the draft
        cache, if any, is fed the prompt by its first draft step (the draft slot may lag)."""
        batch = []
        for seq in self.scoring:
            n = min(seq.prompt_len - 1 - seq.prefilled, budget) if seq.params.prompt_logprobs is not None else 0
            if n > 0:
                batch.append((seq, n))
                budget -= n
            if budget <= 0:
                break
        events: list[tuple[Sequence, Delta | PromptLogprobs | Exception]] = []
        if batch:
            t0 = time.perf_counter()
            try:
                feeds = [seq.prompt_ids[seq.prefilled : seq.prefilled + n] for seq, n in batch]
                logits = self.target_pool.forward([seq.slot for seq, _ in batch], feeds, all_logits=True)
                rows = logits[:, : self.pair.vocab_size].split([n for _, n in batch])  # [n_b, V] each
                for (seq, n), r in zip(batch, rows):
                    # row i predicts prompt token prefilled + i + 1
                    targets = seq.prompt_ids[seq.prefilled + 1 : seq.prefilled + n + 1]
                    for i in range(0, n, SCORE_ROWS):
                        seq.prompt_logprobs += token_logprobs(r[i : i + SCORE_ROWS].to(self.pair.device),
                                                               targets[i : i + SCORE_ROWS], seq.params.prompt_logprobs)
            except Exception as exc:  # the batch's requests end; the others go on
                for seq, _ in batch:
                    self.scoring.remove(seq)
                    self._clear_slot(seq)
                    seq.finish_reason = "error"
                    events.append((seq, exc))
                return events, sum(n for _, n in batch)
            elapsed = time.perf_counter() - t0
            for seq, n in batch:
                seq.prefilled += n
                seq.stats.target_forwards += 1
                seq.stats.time_prefill_s += elapsed
        for seq in [s for s in self.scoring if s.params.prompt_logprobs is None or s.prefilled == s.prompt_len - 1]:
            self.scoring.remove(seq)
            if seq.params.prompt_logprobs is not None:
                first = TokenLogprob(seq.prompt_ids[0], None, None)
                events.append((seq, PromptLogprobs([first] + seq.prompt_logprobs)))
            if seq.params.max_tokens == 0:
                events.append((seq, seq.emit([], [] if seq.params.logprobs is not None else None)))  # "length"
                self._clear_slot(seq)
            else:
                self._move(seq, len(self.running))
                self.running.append(seq)
        return events, sum(n for _, n in batch)

    # ---------------------------------------------------------------- one round

    def _draft_caps(self, seqs: list[Sequence]) -> list[int]:
        """Each sequence's most candidates this round. Under `batch_aware`, the adaptive sequences'
        caps are planned together (StepCosts.plan_batch): when drafting cannot win at this batch and
        these acceptances, the plan is 0 for all of them and the round is plain decoding."""
        caps, free = [], []
        for i, seq in enumerate(seqs):
            if seq.policy is None:
                caps.append(0)
                continue
            cap = min(seq.remaining - 1, seq.policy.max_draft)  # the round always adds one target token
            if self.batch_aware and seq.policy.adaptive and cap > 0:
                if seq.plan_prior is not None:  # reproducible: as if alone, from the saved plan and its start state
                    cap = self.plan_costs.best_draft_length(1, seq.acceptance_estimate(seq.plan_prior), cap)
                else:
                    free.append(i)
            caps.append(cap)
        if free:
            accept = [seq.acceptance_estimate(self.acceptance_prior.get(seq.method, PRIOR_ACCEPTANCE)) for seq in seqs]
            chosen = set(free)
            fixed = [(caps[i], accept[i]) for i in range(len(seqs)) if i not in chosen]
            # no probing where drafting does not pay: a probe must first feed the draft every token since
            # its last draft, which costs as much as drafting all along
            plan = self.costs.plan_batch([accept[i] for i in free], [caps[i] for i in free], fixed)
            for i, k in zip(free, plan):
                caps[i] = k
        return caps

    def _round(self, seqs: list[Sequence]) -> list[tuple[Sequence, Delta | Exception]]:
        lengths = [(self.target_pool.length(s.slot), self.draft_pool.length(s.slot) if self.draft_pool else 0)
                   for s in seqs]
        # the drafts of a failed batch drew from the sampled requests' generators: a retry starts from the
        # same draws, so a seeded request gives the same tokens whether or not its batch failed
        rng = [s.generator.get_state() if len(seqs) > 1 and not s.params.greedy else None for s in seqs]
        try:
            return self._round_batch(seqs)
        except Exception as exc:
            if len(seqs) == 1:
                self._release(seqs[0])
                seqs[0].finish_reason = "error"
                return [(seqs[0], exc)]
        # the batch failed before any sequence changed: undo its cache writes, then run one sequence
        # at a time so that only the one that fails ends
        for seq, (t_len, d_len), state in zip(seqs, lengths, rng):
            if state is not None:
                seq.generator.set_state(state)
            self.target_pool.rollback(seq.slot, t_len)
            if self.draft_pool is not None:
                self.draft_pool.rollback(seq.slot, min(d_len, self.draft_pool.length(seq.slot)))
        events = []
        for seq in list(seqs):
            events += self._round([seq])
        return events

    def _round_batch(self, seqs: list[Sequence]) -> list[tuple[Sequence, Delta | Exception]]:
        """One round of the batch, in its phases: plan, draft, verify, finish, account."""
        t0 = time.perf_counter()
        self.rounds += 1
        caps = self._draft_caps(seqs)
        drafts = self._draft([s for s, c in zip(seqs, caps) if c > 0], [c for c in caps if c > 0])
        t1 = time.perf_counter()
        feeds, target_probs, logits = self._verify(seqs, drafts)
        t2 = time.perf_counter()
        events = [(seq, self._finish_one(seq, drafts.get(seq), p, lg)) for seq, p, lg in zip(seqs, target_probs, logits)]
        self._account(seqs, drafts, feeds, events, (t0, t1, t2, time.perf_counter()))
        return events

    def _verify(self, seqs: list[Sequence], drafts: dict[Sequence, Draft]):
        """One batched target forward: every sequence feeds its last token and its candidates, and gets
        k+1 rows of logits and of processed probabilities (per sequence: [k+1, V] each)."""
        feeds = [[s.tokens[-1]] + (drafts[s].ids if s in drafts else []) for s in seqs]
        logits = self.target_pool.forward([s.slot for s in seqs], feeds, all_logits=True)
        logits = logits[:, : self.pair.vocab_size].to(self.pair.device)  # [sum k_b + 1, V]
        row_params = [s.params for s, f in zip(seqs, feeds) for _ in f]
        sizes = [len(f) for f in feeds]
        return feeds, logits_to_probs_rows(logits, row_params).split(sizes), logits.split(sizes)

    def _finish_one(self, seq: Sequence, draft: Draft | None, target_probs: torch.Tensor,
                    logits: torch.Tensor) -> Delta | Exception:
        try:
            return self._finish_round(seq, draft, target_probs, logits)
        except Exception as exc:  # one broken request must not take the others down
            seq.finish_reason = "error"
            return exc

    def _account(self, seqs: list[Sequence], drafts: dict[Sequence, Draft], feeds: list[list[int]],
                 events: list, times: tuple[float, float, float, float]) -> None:
        """The round's measured cost (to the batch plan) and time (to each request's statistics);
        finished sequences leave the batch."""
        t0, t1, t2, t3 = times
        if self.costs.measured:
            draft_steps = max((len(d.ids) for d in drafts.values()), default=0)
            emitted = sum(len(d.token_ids) for _, d in events if isinstance(d, Delta))
            self.costs.observe(len(seqs), draft_steps, sum(len(f) for f in feeds) / len(seqs),
                               t3 - t0 + self._outside_s, tokens=emitted)
        self._round_end = time.perf_counter()
        for seq, delta in events:
            s = seq.stats
            s.time_draft_s += t1 - t0
            s.time_verify_s += t2 - t1
            s.time_other_s += t3 - t2
            s.wall_s += t3 - t0
            s.batch_size_sum += len(seqs)
            if isinstance(delta, Delta) and delta.round is not None:
                delta.round["estimated_speedup"] = s.estimated_speedup  # now that this round's time is in
            if seq.finished:
                self._release(seq)

    def _draft(self, seqs: list[Sequence], caps: list[int]) -> dict[Sequence, Draft]:
        """Batched draft steps; a sequence leaves the batch when its policy stops it."""
        V = self.pair.vocab_size
        out = {s: Draft([], [], []) for s in seqs}
        active = list(zip(seqs, caps))
        feeds = [s.tokens[self.draft_pool.length(s.slot):] for s in seqs]  # the draft slot may lag
        while active:
            logits = self.draft_pool.forward([s.slot for s, _ in active], feeds)[:, :V].to(self.pair.device)
            params = [s.params for s, _ in active]
            q = logits_to_probs_rows(logits, params)  # [A, V]
            x = sample_rows(q, params, [s.generator for s, _ in active])
            vals = torch.stack([x.to(q.dtype), entropy(q)]).tolist()  # one host sync per draft step
            still = []
            for i, (seq, cap) in enumerate(active):
                token, h = int(vals[0][i]), vals[1][i]
                d = out[seq]
                d.ids.append(token)
                d.probs.append(q[i])
                d.entropies.append(h)
                seq.stats.draft_forwards += 1
                if token not in seq.eos and len(d.ids) < cap and seq.policy.keep_drafting(h, len(d.ids)):
                    still.append((seq, cap))
            active = still
            feeds = [[out[s].ids[-1]] for s, _ in active]
        return out

    def _finish_round(self, seq: Sequence, draft: Draft | None, target_probs: torch.Tensor,
                      logits: torch.Tensor) -> Delta:
        """Acceptance, statistics, cache rollback and output for one sequence."""
        candidates = draft.ids if draft else []
        draft_probs = torch.stack(draft.probs) if draft else None
        verdict = accept_candidates(candidates, target_probs, draft_probs, seq.params.greedy, seq.generator, seq.relaxed)
        k, n_acc = len(candidates), verdict.n_accepted
        seq.stats.target_forwards += 1
        if k:
            # the statistics learn after the round, from the candidates examined, labelled by the standard check
            if verdict.distances is not None:
                for d, std in zip(verdict.distances, verdict.standard):
                    seq.relaxed.observe(d, std)
            rejected_h = [h for h, std in zip(draft.entropies, verdict.standard) if not std]
            seq.policy.update(rejected_h, all_accepted=n_acc == k)
            if seq.family is not None:  # the server's state learns from every request's rounds
                self.shared[seq.family].observe(verdict.distances, verdict.standard, rejected_h, n_acc)
            prior = self.acceptance_prior.get(seq.method, PRIOR_ACCEPTANCE)
            self.acceptance_prior[seq.method] = 0.98 * prior + 0.02 * (n_acc / (n_acc + (n_acc < k)))
        n_standard = sum(verdict.standard[:n_acc])
        seq.stats.observe_round(k, n_standard, n_acc - n_standard, bonus=k > 0 and n_acc == k,
                                accepted_flags=[True] * n_acc + ([False] if n_acc < k else []))
        record = None
        if seq.stats.trace is not None or seq.token_sources:
            record = {"entropy_threshold": seq.policy.threshold if seq.policy else None, **seq.relaxed.state(),
                      "drafted": k, "accepted": n_acc}
            if seq.stats.trace is not None:
                seq.stats.trace.append(record)

        # caches: keep the sequence up to the last accepted candidate (the new last token is not in them)
        self.target_pool.rollback(seq.slot, len(seq.tokens) + n_acc)
        if self.draft_pool is not None:
            self.draft_pool.rollback(seq.slot, min(self.draft_pool.length(seq.slot), len(seq.tokens) + n_acc))

        emitted = candidates[:n_acc] + [verdict.token]
        logprobs = token_logprobs(logits[: n_acc + 1], emitted, seq.params.logprobs) if seq.params.logprobs is not None else None
        excess = excess_surprisal(target_probs[: n_acc + 1], emitted)  # one host sync
        sources = token_sources(draft, verdict, seq.stats.rounds) if seq.token_sources else None
        delta = seq.emit(emitted, logprobs, sources)
        if sources is not None:
            delta.round = {"round": seq.stats.rounds, "relaxed": verdict.n_relaxed, **record}
        seq.stats.observe_surprisal(excess[: len(delta.token_ids)])  # EOS may cut the round short
        if seq.finished:
            seq.stats.record_thresholds(seq.policy.threshold if seq.policy else None, seq.relaxed.state())
        return delta

    # ---------------------------------------------------------------- slots

    def _move(self, seq: Sequence, slot: int) -> None:
        """Put seq's caches in `slot`, swapping with whoever holds it."""
        if seq.slot == slot:
            return
        other = self.owner[slot]
        for pool in (self.target_pool, self.draft_pool):
            if pool is not None:
                pool.swap(seq.slot, slot)
        self.owner[seq.slot], self.owner[slot] = other, seq
        if other is not None:
            other.slot = seq.slot
        seq.slot = slot

    def _clear_slot(self, seq: Sequence) -> None:
        for pool in (self.target_pool, self.draft_pool):
            if pool is not None:
                pool.clear(seq.slot)
        self.owner[seq.slot] = None
        seq.slot = -1

    def _release(self, seq: Sequence) -> None:
        """Free a running sequence's slot; the last running sequence moves into it (slots stay 0..R-1)."""
        i = self.running.index(seq)
        last = self.running.pop()
        if last is not seq:
            self._move(last, i)
            self.running[i] = last
        self._clear_slot(seq)

    # ---------------------------------------------------------------- single requests

    def start(self, prompt: str | list[int], params: SamplingParams | None = None, spec: SpecConfig | None = None) -> "Generation":
        if not self.idle:
            raise RuntimeError("start()/generate() need an idle engine; a server drives it with add() and step()")
        seq = self.new_sequence(prompt, params, spec)
        self.add(seq)
        return Generation(self, seq)

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None, spec: SpecConfig | None = None) -> Iterator[Delta]:
        gen = self.start(prompt, params, spec)
        try:
            while not gen.finished:
                yield gen.step()
        finally:
            gen.close()

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None, spec: SpecConfig | None = None) -> GenerationResult:
        text, ids, logprobs = [], [], [] if (params and params.logprobs is not None) else None
        gen = self.start(prompt, params, spec)
        try:
            while not gen.finished:
                d = gen.step()
                text.append(d.text)
                ids.extend(d.token_ids)
                if logprobs is not None and d.logprobs:
                    logprobs.extend(d.logprobs)
        finally:
            gen.close()
        return GenerationResult("".join(text), ids, gen.seq.finish_reason, gen.stats, logprobs, gen.prompt_logprobs)

    def run_together(self, seqs: list[Sequence]) -> list[list[int]]:
        """Add the sequences at once and step until the engine is idle: each one's tokens (batch
        experiments and tests; an error in any sequence is raised)."""
        for s in seqs:
            self.add(s)
        out: dict[int, list[int]] = {id(s): [] for s in seqs}
        while not self.idle:
            for seq, event in self.step():
                if isinstance(event, Exception):
                    raise event
                out[id(seq)].extend(event.token_ids)
        return [out[id(s)] for s in seqs]


class Generation:
    """One request driven alone through the engine; `step()` returns its next round's Delta."""

    def __init__(self, engine: SpeculativeEngine, seq: Sequence):
        self.engine = engine
        self.seq = seq
        self.prompt_logprobs: list[TokenLogprob] | None = None  # once the prompt is scored

    @property
    def finished(self) -> bool:
        return self.seq.finished

    @property
    def stats(self) -> GenerationStats:
        return self.seq.stats

    @property
    def tokens(self) -> list[int]:
        return self.seq.tokens

    def step(self) -> Delta:
        assert not self.finished, "step() after the generation finished"
        while True:
            for seq, event in self.engine.step():
                if seq is self.seq:
                    if isinstance(event, Exception):
                        raise event
                    if isinstance(event, PromptLogprobs):  # precedes a Delta of the same step or a later one
                        self.prompt_logprobs = event.logprobs
                        continue
                    return event

    def close(self) -> None:
        """Free the slot now (a cancelled request must not hold memory)."""
        self.engine.abort(self.seq)
