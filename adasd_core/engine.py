"""The engine: every step schedules (scheduler.py), runs (prompt chunks, then one batched round for
every running sequence) and postprocesses (postprocess.py), for all methods of shared/ADASD.md.

A round, in its phases:
- plan: each sequence's cap; under `batch_aware` the adaptive methods' caps are planned for the
  whole batch (costs.BatchPlanner), so drafting runs only where it pays at this batch size;
- propose: batched draft steps (proposer.py); each sequence stops on its own policy (fixed K, the
  entropy threshold T_G, the hybrid cap) while the others go on;
- verify: one batched target forward scores every sequence's last token, candidates and bonus
  position (ragged lengths, packed by the runner's pools);
- finish: per sequence, acceptance (verification.accept_candidates), the correction or bonus token,
  one Observation for every learner, and both caches cut back to the accepted prefix;
- account: the round's measured cost to the planner, its time to each request's statistics.
`ar` requests ride in the same batch with no candidates. A grammar's forced tokens go first, with no
draft and no check; then drafts and verified rows take the request's masks and controls (constrained.py).
"""

from __future__ import annotations

import time

from adasd_core.constrained import Grammars, jump_forward, verified_logits
from adasd_core.costs import AcceptancePrior, BatchPlanner, OnlineCorrection, RoundClock, StepCosts, measure
from adasd_core.detokenize import IncrementalDetokenizer, StopStringMatcher
from adasd_core.device import synchronize
from adasd_core.drafting import WINDOW
from adasd_core.errors import InvalidRequestError
from adasd_core.models import ModelPair
from adasd_core.postprocess import finish_batch, score_prompts, scored_prompt
from adasd_core.proposer import DraftModelProposer, EagleProposer, SelfDraftProposer
from adasd_core.round_output import Draft
from adasd_core.runner import ModelRunner
from adasd_core.sampling import SamplingParams, logits_to_probs_rows, make_generator
from adasd_core.scheduler import Scheduler
from adasd_core.sequence import Delta, PromptLogprobs, Sequence
from adasd_core.spec import METHODS, VERIFICATIONS, SpecConfig
from adasd_core.stats import GenerationStats
from adasd_core.validation import check_prompt_ids
from adasd_core.warm import ADAPTIVE_METHODS, WarmState, family_key

__all__ = ["METHODS", "VERIFICATIONS", "SpecConfig", "SpeculativeEngine"]
Event = tuple[Sequence, "Delta | PromptLogprobs | Exception"]


class SpeculativeEngine:
    """Holds a loaded pair, its runner and scheduler; one thread drives it: `new_sequence`
    (validates) -> `add` -> `step()` repeatedly (events per sequence) -> `abort` to drop one early.
    adasd_core.llm.LLM serves single requests over it. `batch_aware` plans the adaptive methods'
    drafts for the batch (the server turns it on); off, every method drafts as shared/ADASD.md
    defines it (benchmarks, the CLI). `warm`: the warm-start state requests start from."""

    def __init__(self, pair: ModelPair, default_spec: SpecConfig | None = None, calibrate: bool = True,
                 max_running: int = 16, batch_aware: bool = False, warm: WarmState | None = None,
                 kv_blocks: int | None = None, block_size: int = 16, prefix_caching: bool = True):
        self.pair, self.slots, self.batch_aware = pair, max_running, batch_aware
        self.default_spec = default_spec or SpecConfig()
        capacity = pair.context_length + WINDOW + 2  # a sequence's prompt, output and one round's drafts
        self.runner = ModelRunner(pair, max_running, capacity, kv_blocks, block_size, prefix_caching)
        self.block_size, self.prefix_caching = block_size, self.runner.prefix_caching
        self.kv_blocks = self.runner.target.blocks.n_blocks if self.runner.paged else 0
        proposer = DraftModelProposer
        if self.runner.head or self.runner.shared:
            proposer = EagleProposer if self.runner.head else SelfDraftProposer
        self.proposer = proposer(self.runner)
        self.scheduler = Scheduler(self.runner, max_running, 2048 if pair.device.type == "cuda" else 256)
        self.warm = warm or WarmState()
        self.prior = AcceptancePrior()  # per method, from finished rounds of all requests
        self.clock, self.rounds = RoundClock(), 0
        self._alone_planner: BatchPlanner | None = None
        self.costs = StepCosts.nominal()
        self.target_step_s = 0.0
        self.min_posterior = pair.min_posterior  # the Bayesian check's gate measured for this pair
        self.grammars = Grammars(pair)
        if calibrate:
            self.calibrate()
        self.warm.adopt_plan(self.costs)  # reproducible requests plan with this table, or the one saved before

    @property
    def costs(self) -> StepCosts:
        return self.planner.table

    @costs.setter
    def costs(self, table: StepCosts) -> None:
        self.planner = BatchPlanner(table, OnlineCorrection())  # the online correction starts over

    def calibrate(self) -> float:
        """Measure the step costs (the unit of the speedup estimate and of the batch plan)."""
        assert self.scheduler.idle, "calibrate() while requests run"
        self.costs = measure(self.runner.target, self.runner.draft, self.pair.vocab_size, self.slots)
        self.target_step_s = self.costs.target_cost(1, 1)
        return self.target_step_s

    @property
    def idle(self) -> bool:
        return self.scheduler.idle

    @property
    def free_slots(self) -> int:
        return self.scheduler.free_slots

    def kv_tokens(self) -> tuple[int, int]:
        """Tokens resident in the (target, draft) KV pools over the slots in use."""
        return self.runner.kv_tokens(self.scheduler.held_slots())

    def kv_report(self) -> dict:
        """The KV pool's state for the metrics: resident tokens, the target pool's blocks (held by
        sequences, cached for reuse, in all), and since start the prefix cache's queried and found prompt
        tokens and the preemptions."""
        target, draft = self.kv_tokens()
        blocks = self.runner.target.blocks if self.runner.paged else None
        return {"target_tokens": target, "draft_tokens": draft, "block_size": self.block_size,
                "blocks_total": self.kv_blocks, "blocks_used": blocks.used if blocks else 0,
                "blocks_cached": len(blocks.idle) if blocks else 0, "prefix_queries": blocks.queries if blocks else 0,
                "prefix_hits": blocks.hits if blocks else 0, "preemptions": self.scheduler.preemptions}

    # ---------------------------------------------------------------- requests

    def new_sequence(self, prompt: str | list[int], params: SamplingParams | None = None,
                     spec: SpecConfig | None = None, request_id: str = "", epoch: int | None = None) -> Sequence:
        """Validate a request and build its state (no model work). `epoch`: the published state it
        starts from (the one its fingerprint names; default the latest)."""
        pair, params, spec = self.pair, params or SamplingParams(), spec or self.default_spec
        ids = pair.tokenizer(prompt, add_special_tokens=True)["input_ids"] if isinstance(prompt, str) else list(prompt)
        check_prompt_ids(ids, pair.vocab_size, pair.context_length)
        constraint = self.grammars.constraint(params)  # the controls checked against the vocabulary, too
        if spec.method != "ar" and pair.draft is None:
            raise InvalidRequestError(f"method {spec.method!r} needs a draft model; this server has none",
                                      param="method")
        stats = GenerationStats(method=spec.method, prompt_tokens=len(ids), target_step_s=self.target_step_s,
                                trace=[] if spec.trace else None)
        policy, relaxed = spec.draft_policy(), spec.relaxed_check()
        family = family_key(spec.method, spec.verification, params.greedy)
        start, fp = self.warm.start(family, relaxed.name, spec.warm_start, epoch, self._with_plan(spec.method))
        if family is not None:
            stats.warm_start = spec.warm_start
        if start is not None:
            relaxed = start.seed(policy, relaxed)
        if self.min_posterior is not None and hasattr(relaxed, "min_posterior"):
            relaxed.min_posterior = self.min_posterior
        # a request whose tokens the draft lengths decide (seeded, or greedy with a check that can relax) plans
        # as if alone, from saved state only: its output depends on neither its batch mates nor the server's timings;
        # the others (greedy lossless: the target's tokens at any length; sampled without a seed) plan by the batch
        plan_prior = None
        if params.seed is not None or (params.greedy and relaxed.can_relax):
            acceptance = start.acceptance if start is not None else None
            plan_prior = AcceptancePrior.START if acceptance is None else acceptance
        return Sequence(
            prompt_ids=ids, params=params, method=spec.method, policy=policy, relaxed=relaxed,
            generator=make_generator(params.seed, pair.device),
            eos=(set() if params.ignore_eos else set(pair.eos_token_ids)) | set(params.stop_token_ids),
            detok=IncrementalDetokenizer(pair.tokenizer, ids), stop=StopStringMatcher(params.stop), stats=stats,
            context_length=pair.context_length, request_id=request_id, family=family, token_sources=spec.token_sources,
            plan_prior=plan_prior, fingerprint=fp, constraint=constraint,
        )

    def _with_plan(self, method: str) -> bool:
        """Whether a method's fingerprint covers the draft plan (its draft length follows the plan)."""
        return self.batch_aware and method in ADAPTIVE_METHODS

    def fingerprints(self, epoch: int | None = None) -> dict[str, str]:
        """{warm.fingerprint_key: system_fingerprint} of every request kind at a published epoch."""
        return self.warm.fingerprints(METHODS, VERIFICATIONS, self._with_plan, epoch)

    def add(self, seq: Sequence) -> None:
        """Queue a sequence; it gets a slot and prefills in the next steps."""
        self.scheduler.add(seq)

    def abort(self, seq: Sequence) -> None:
        """Drop a sequence wherever it is and free its slot now."""
        self.scheduler.abort(seq)
        if seq.finish_reason is None:
            seq.finish_reason = "abort"

    # ---------------------------------------------------------------- one engine step

    def step(self) -> list[Event]:
        """Admit; score and prefill one chunk of prompts; one round for every running sequence.
        Returns each affected sequence's Delta (or PromptLogprobs), or the exception that ended it."""
        self.clock.step_started()
        scheduled = self.scheduler.schedule()
        events = self._feed(scheduled.score, scoring=True) + self._feed(scheduled.prefill, scoring=False)
        running = list(self.scheduler.running)  # with the prompts that came in just now
        events += self._round(running) if running else []
        if not running:
            self.clock.round_ended(False)
        self.warm.publish_due()
        return events

    def _feed(self, batch: list[tuple[Sequence, int]], scoring: bool) -> list[Event]:
        """One batched target forward over a chunk of each (sequence, n)'s prompt; then the sequences
        whose prompt is in leave their queue: a scored one gets its PromptLogprobs, then finishes
        (max_tokens 0) or runs; a prefilled one runs. A failed forward ends the batch's requests only."""
        sched = self.scheduler
        if batch:
            t0 = time.perf_counter()
            try:
                logits = self.runner.feed_prompts(batch, keep_logits=scoring)
                if scoring:
                    score_prompts(batch, logits, self.pair.device)
            except Exception as exc:  # the batch's requests end; the running ones go on
                for seq, _ in batch:
                    sched.drop(seq)
                    seq.finish_reason = "error"
                return [(seq, exc) for seq, _ in batch]
            synchronize(self.pair.device)
            elapsed = time.perf_counter() - t0
            for seq, n in batch:
                seq.prefilled += n
                self.runner.commit(seq.slot, seq.prefilled)
                seq.stats.target_forwards += 1
                seq.stats.draft_forwards += not scoring and seq.policy is not None
                seq.stats.time_prefill_s += elapsed
        events: list[Event] = []
        for seq in [s for s in (sched.scoring if scoring else sched.prefilling) if s.prompt_ready]:
            if scoring and seq.params.prompt_logprobs is not None:
                events.append((seq, scored_prompt(seq)))
            if scoring and seq.params.max_tokens == 0:
                events.append((seq, seq.emit([], [] if seq.params.logprobs is not None else None)))  # "length"
                sched.drop(seq)
            else:
                sched.start_running(seq)
        return events

    # ---------------------------------------------------------------- one round

    def _round(self, seqs: list[Sequence]) -> list[Event]:
        # a retry starts from the same draws, so a seeded request gives the same tokens whether or not its batch failed
        saved = [(self.runner.lengths(s.slot), s.checkpoint(len(seqs) > 1)) for s in seqs]
        try:
            return self._round_batch(seqs)
        except Exception as exc:
            if len(seqs) == 1:
                self.scheduler.release(seqs[0])
                seqs[0].finish_reason = "error"
                return [(seqs[0], exc)]
        # the batch failed before any sequence changed: undo its cache writes, then run one sequence
        # at a time so that only the one that fails ends
        for seq, (before, state) in zip(seqs, saved):
            seq.rewind(state)
            self.runner.restore(seq.slot, before)
        return [event for seq in list(seqs) for event in self._round([seq])]

    def _round_batch(self, seqs: list[Sequence]) -> list[Event]:
        """One round of the batch, in its phases: plan, propose, verify, finish, account."""
        t0 = time.perf_counter()
        self.rounds += 1
        ended = jump_forward(seqs)
        seqs = [s for s in seqs if not s.finished]
        if not seqs:  # every one ended at its grammar
            for seq, _ in ended:
                self.scheduler.release(seq)
            return ended
        caps = self._draft_caps(seqs)
        drafts = self.proposer.propose([s for s, c in zip(seqs, caps) if c > 0], [c for c in caps if c > 0])
        t1 = time.perf_counter()
        cands = [drafts[s].ids if s in drafts else [] for s in seqs]
        feeds = [[s.tokens[-1]] + s.forced + c for s, c in zip(seqs, cands)]
        logits = self.runner.verify([s.slot for s in seqs], feeds,  # [sum (F_b + k_b + 1), V]
                                    [s.policy is not None for s in seqs])
        target_probs = logits_to_probs_rows(verified_logits(seqs, drafts, cands, logits),
                                            [s.params for s, c in zip(seqs, cands) for _ in range(len(c) + 1)])
        synchronize(self.pair.device)  # every timed phase ends on the device too (no-op on the CPU)
        t2 = time.perf_counter()
        jumped = {s: len(s.forced) for s in seqs}  # finish_round takes them
        events = list(zip(seqs, finish_batch(seqs, drafts, target_probs, logits, self.runner, self.warm, self.prior)))
        self._account(seqs, drafts, feeds, events + ended, (t0, t1, t2, time.perf_counter()), jumped)
        return events + ended

    def _draft_caps(self, seqs: list[Sequence]) -> list[int]:
        """Each sequence's most candidates this round. Under `batch_aware`, the adaptive sequences' caps are
        planned together (BatchPlanner.plan_batch): when drafting cannot win at this batch and these acceptances,
        the plan is 0 for all and the round is plain decoding; reproducible ones plan alone, from the warm plan."""
        caps, free = [], []
        for i, seq in enumerate(seqs):
            cap = 0 if seq.policy is None else min(seq.remaining - 1 - len(seq.forced), seq.policy.max_draft)  # +1
            if seq.constraint is not None and seq.constraint.stopped:
                cap = 0  # only EOS can follow
            if self.batch_aware and cap > 0 and seq.policy.adaptive:
                if seq.plan_prior is not None:
                    cap = self._alone().best_draft_length(1, seq.acceptance_estimate(seq.plan_prior), cap)
                else:
                    free.append(i)
            caps.append(cap)
        if free:
            accept = [seq.acceptance_estimate(self.prior.get(seq.method)) for seq in seqs]
            fixed = [(caps[i], accept[i]) for i in range(len(seqs)) if i not in set(free)]
            # no probing where drafting does not pay: a probe must first feed the draft every token since
            # its last draft, which costs as much as drafting all along
            for i, k in zip(free, self.planner.plan_batch([accept[i] for i in free], [caps[i] for i in free], fixed)):
                caps[i] = k
        return caps

    def _alone(self) -> BatchPlanner:
        """The planner of reproducible requests: the warm state's plan alone, no online correction."""
        if self._alone_planner is None or self._alone_planner.table is not self.warm.plan:
            self._alone_planner = BatchPlanner(self.warm.plan)
        return self._alone_planner

    def _account(self, seqs: list[Sequence], drafts: dict[Sequence, Draft], feeds: list[list[int]],
                 events: list[Event], times: tuple[float, float, float, float], jumped: dict[Sequence, int]) -> None:
        """The round's measured cost (to the planner) and time (to each request's statistics); finished ones leave.
        The planner's rates count the tokens the target decided: a grammar's forced tokens come with either
        kind of round, and a plain round that took a long forced run must not stand for plain decoding."""
        t0, t1, t2, t3 = times
        if self.costs.measured:  # a nominal table (tests) learns nothing from timings
            draft_steps = max((len(d.ids) - len(d.forced) for d in drafts.values()), default=0)
            decided = 0
            for seq, d in events:
                if isinstance(d, Delta):
                    n = len(d.token_ids) - jumped.get(seq, 0)
                    forced = drafts[seq].forced if seq in drafts else ()
                    decided += max(0, n - sum(1 for p in forced if p < n - 1))
            self.planner.observe(len(seqs), draft_steps, sum(len(f) for f in feeds) / len(seqs),
                                 t3 - t0 + self.clock.outside_s, tokens=decided)
        self.clock.round_ended(True)
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
                self.scheduler.release(seq)
