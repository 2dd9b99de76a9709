"""The batched engine: mixed batches give each request what it gets alone, seeded requests ignore
their batch mates, slots are freed on every ending, one failure ends one request."""

from collections import Counter

import pytest
import torch
from scipy.stats import chisquare
from toy import markov_pair, random_tables, sequence_probability

from adasd_core.engine import SpecConfig
from adasd_core.llm import LLM
from adasd_core.sampling import SamplingParams
from adasd_core.verification import BayesCheck, RelaxedCheck, accept_candidates

LOSSLESS = [SpecConfig(method="ar"), SpecConfig(method="vanilla", k=3), SpecConfig(method="vanilla", k=7),
            SpecConfig(method="gen-only"), SpecConfig(method="adasd", verification="none"),
            SpecConfig(method="hybrid", verification="none")]


def run_batch(engine, requests) -> list[list[int]]:
    """Add every (prompt, params, spec) at once and step until all end; tokens per request."""
    out = engine.run_together([engine.new_sequence(p, params, spec) for p, params, spec in requests])
    assert engine.free_slots == engine.slots and all(o is None for o in engine.scheduler.owner)
    return out


def drain(engine, seqs) -> tuple[dict[int, list[int]], list[int]]:
    """Step until idle: each sequence's tokens by index, and the indices that ended with an exception."""
    out, errors = {i: [] for i in range(len(seqs))}, []
    while not engine.idle:
        for seq, event in engine.step():
            if isinstance(event, Exception):
                errors.append(seqs.index(seq))
            else:
                out[seqs.index(seq)].extend(event.token_ids)
    return out, errors


def mixed_requests(prompts, max_tokens):
    return [(p, SamplingParams(max_tokens=max_tokens + 7 * (i % 3), ignore_eos=True), LOSSLESS[i % len(LOSSLESS)])
            for i, p in enumerate(prompts)]


def test_mixed_greedy_batch_on_toy_models_matches_each_alone():
    target, draft = random_tables(8, seed=11)
    engine = LLM(markov_pair(target, draft), calibrate=False, max_running=4)
    prompts = [[i % 8, (3 * i) % 8][: 1 + i % 2] for i in range(9)]  # more requests than slots: some queue
    requests = mixed_requests(prompts, 20)
    alone = [engine.generate(*r).token_ids for r in requests]
    assert run_batch(engine, requests) == alone


@pytest.mark.parametrize("pair_name", ["random", "tiny"])
def test_mixed_greedy_batch_on_llama_pairs_matches_each_alone(pair_name, random_pair_dir):
    from adasd_core.models import load_pair

    pair = load_pair(str(random_pair_dir / "target"), str(random_pair_dir / "draft"), device="cpu") \
        if pair_name == "random" else load_pair("tiny", "tiny", device="cpu")
    engine = LLM(pair, calibrate=False, max_running=6)
    assert engine.runner.target.batched
    prompts = ["def parse(line):", "import os\nimport sys\n\nclass Config:\n    def __init__(self", "x = [",
               "    return self._data[key]\n\ndef ", "for i in range(10):\n", "# a comment\n"]
    requests = mixed_requests(prompts, 16)
    alone = [engine.generate(*r).token_ids for r in requests]
    assert run_batch(engine, requests) == alone


def test_sampled_lossless_batch_keeps_the_target_distribution():
    """The chi-square test of test_engine_toy, with every sample drawn inside a batch of 8 mixed methods."""
    v, n, temperature = 5, 4000, 0.9
    target, draft = random_tables(v, seed=7, sharpness=1.0)
    engine = LLM(markov_pair(target, draft), calibrate=False, max_running=8)
    specs = [SpecConfig(method="vanilla", k=2), SpecConfig(method="gen-only"), SpecConfig(method="ar"),
             SpecConfig(method="adasd", verification="none")]
    requests = [([0], SamplingParams(max_tokens=3, temperature=temperature, seed=s), specs[s % len(specs)])
                for s in range(n)]
    counts = Counter()
    for i in range(0, n, 8):
        counts.update(tuple(t) for t in run_batch(engine, requests[i : i + 8]))
    cells = [(a, b, c) for a in range(v) for b in range(v) for c in range(v)]
    for table, expect_fit in ((target, True), (draft, False)):
        expected = [n * sequence_probability(table, 0, list(c), temperature) for c in cells]
        p = chisquare([counts[c] for c in cells], expected).pvalue
        assert (p > 1e-3) if expect_fit else (p < 1e-6)


def test_a_seeded_request_does_not_depend_on_its_batch_mates(random_pair_dir):
    from adasd_core.models import load_pair

    pair = load_pair(str(random_pair_dir / "target"), str(random_pair_dir / "draft"), device="cpu")
    engine = LLM(pair, calibrate=False, max_running=4)
    mine = ("def f(x):", SamplingParams(max_tokens=30, temperature=1.0, seed=5, ignore_eos=True),
            SpecConfig(method="adasd"))
    alone = engine.generate(*mine[:2], mine[2]).token_ids
    others = [(p, SamplingParams(max_tokens=m, temperature=0.7, ignore_eos=True), SpecConfig(method=meth))
              for p, m, meth in [("import", 40, "hybrid"), ("class A:", 12, "ar"), ("x", 25, "vanilla")]]
    assert run_batch(engine, [others[0], mine, others[1], others[2]])[1] == alone
    assert run_batch(engine, [mine, others[2]])[0] == alone


def test_abort_frees_the_slot_and_the_others_finish():
    target, draft = random_tables(8, seed=12)
    engine = LLM(markov_pair(target, draft), calibrate=False, max_running=2)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    seqs = [engine.new_sequence([i], params, SpecConfig(method="vanilla")) for i in range(4)]
    for s in seqs:
        engine.add(s)
    engine.step()
    assert len(engine.scheduler.running) == 2 and len(engine.scheduler.waiting) == 2  # a full pool queues
    engine.abort(seqs[0])  # running
    engine.abort(seqs[3])  # waiting
    assert seqs[0].finish_reason == "abort" and seqs[0].slot == -1
    out, errors = drain(engine, seqs)
    assert errors == [] and out[0] == out[3] == []
    assert all(s.finished for s in seqs) and [s.generated for s in seqs[1:3]] == [30, 30]
    assert engine.free_slots == 2 and engine.scheduler.owner == [None, None]


def test_a_failing_sequence_ends_alone(monkeypatch):
    target, draft = random_tables(8, seed=13)
    engine = LLM(markov_pair(target, draft), calibrate=False, max_running=4)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    seqs = [engine.new_sequence([i], params, SpecConfig(method="vanilla")) for i in range(3)]
    ref = [engine.generate([i], params, SpecConfig(method="vanilla")).token_ids for i in range(3)]
    for s in seqs:
        engine.add(s)

    def broken_emit(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(seqs[1], "emit", broken_emit)
    out, errors = drain(engine, seqs)
    assert errors == [1] and seqs[1].finish_reason == "error"
    assert out[0] == ref[0] and out[2] == ref[2]
    assert engine.free_slots == 4


def test_a_failing_batched_forward_is_retried_one_sequence_at_a_time(monkeypatch):
    """A forward that breaks only when a given sequence is in the batch ends that sequence alone."""
    target, draft = random_tables(8, seed=14)
    engine = LLM(markov_pair(target, draft), calibrate=False, max_running=4)
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    ref = [engine.generate([i], params, SpecConfig(method="vanilla")).token_ids for i in range(3)]
    seqs = [engine.new_sequence([i], params, SpecConfig(method="vanilla")) for i in range(3)]
    for s in seqs:
        engine.add(s)
    forward = engine.runner.target.forward

    def fragile(slots, feeds, all_logits=False, **kw):
        if seqs[2].slot in slots and engine.scheduler.running and seqs[2].generated >= 3:
            raise RuntimeError("bad input")
        return forward(slots, feeds, all_logits, **kw)

    monkeypatch.setattr(engine.runner.target, "forward", fragile)
    out, errors = drain(engine, seqs)
    assert errors == [2]
    assert out[0] == ref[0] and out[1] == ref[1]


def test_sampled_relaxed_check_accepts_with_the_posterior_probability():
    """Candidates the standard check must reject (target probability 0) are accepted by the
    relaxed check in the share P(A|d) says, within binomial bounds."""
    v = 6
    target_probs = torch.tensor([[0.0, 0.5, 0.5, 0, 0, 0], [1 / v] * v])  # candidate 0 is impossible for the target
    draft_probs = torch.tensor([[0.6, 0.2, 0.2, 0, 0, 0]])

    class Fixed(RelaxedCheck):
        name = "fixed"

        def accept_probability(self, d):
            return [0.3] * len(d)

    from adasd_core.verification import js_distance

    d = float(js_distance(target_probs[:1], draft_probs))
    bayes = BayesCheck(min_posterior=0.0)  # the paper's rule; accepted distances a little below d, rejected a
    # little above: P(A|d) is mid-range
    for offset in (-0.08, -0.05, -0.03, -0.01):
        bayes.add(d + offset, True)
    for offset in (0.0, 0.02, 0.04, 0.07, 0.1):
        bayes.add(d + offset, False)
    posterior = bayes.posterior(d)
    assert 0.05 < posterior < 0.95  # a state where the draw decides
    n = 4000
    for check, p in ((Fixed(), 0.3), (bayes, posterior)):
        gen = torch.Generator().manual_seed(0)
        accepted = sum(accept_candidates([0], target_probs, draft_probs, False, gen, check).n_accepted
                       for _ in range(n))
        sd = (n * p * (1 - p)) ** 0.5
        assert abs(accepted - n * p) < 4 * sd, (accepted, n * p)


def test_best_draft_length_follows_costs_and_acceptance():
    from adasd_core.costs import BatchPlanner, StepCosts

    # draft step 0.1 of a target step; a target forward grows 2% per token alone, 30% per token at B=16
    bs, ns = [1, 16], [1, 21]
    costs = BatchPlanner(StepCosts(bs, ns, [[1.0, 1.4], [3.0, 3.0 + 0.3 * 20 * 16]], [0.1, 0.3]))
    assert (costs.best_draft_length(1, 0.9, 20) > costs.best_draft_length(1, 0.5, 20)
            > costs.best_draft_length(1, 0.1, 20))
    assert costs.best_draft_length(1, 0.8, 20) > costs.best_draft_length(16, 0.8, 20)
    assert costs.best_draft_length(16, 0.3, 20) == 0  # plain batched decoding wins
    assert costs.best_draft_length(1, 0.99, 3) == 3  # never past the policy's own cap
    free_draft_expensive_verify = BatchPlanner(StepCosts(bs, ns, [[1.0, 21.0], [1.0, 21.0]], [1.0, 1.0]))
    assert free_draft_expensive_verify.best_draft_length(1, 0.9, 20) == 0


def test_the_batch_plan_alone_is_the_single_sequence_rule():
    from adasd_core.costs import BatchPlanner, OnlineCorrection, StepCosts

    costs = BatchPlanner(StepCosts([1, 16], [1, 21], [[1.0, 1.4], [3.0, 3.0 + 0.3 * 20 * 16]], [0.1, 0.3],
                                   measured=False), OnlineCorrection())
    for a in (0.05, 0.3, 0.5, 0.8, 0.9):
        for cap in (1, 3, 20):
            assert costs.plan_batch([a], [cap]) == [costs.best_draft_length(1, a, cap)]


def test_the_batch_plan_drafts_for_the_sequences_that_pay_and_none_where_none_does():
    from adasd_core.costs import BatchPlanner, OnlineCorrection, StepCosts

    # a weight-bound target (rows nearly free) and a draft step of 0.1: a likely sequence pays, an unlikely one not
    flat = BatchPlanner(StepCosts([1, 8], [1, 21], [[1.0, 1.1], [1.2, 1.4]], [0.1, 0.12], measured=False))
    plan = flat.plan_batch([0.05, 0.9, 0.05, 0.1], [5, 5, 5, 5])
    assert plan[1] >= 2 and plan[0] == plan[2] == plan[3] == 0
    # every row costs as much as a sequence's step at 8: plain decoding for all, whatever the acceptance
    per_row = BatchPlanner(StepCosts([1, 8], [1, 21], [[1.0, 21.0], [8.0, 8.0 * 21]], [0.1, 0.3], measured=False))
    assert per_row.plan_batch([0.3] * 8, [5] * 8) == [0] * 8
    assert per_row.plan_batch([0.3], [5]) == [0]
    # fixed sequences' drafting is paid anyway: a free sequence may ride along in their draft steps
    alone = flat.plan_batch([0.5], [4], fixed=[(0, 0.0)])
    riding = flat.plan_batch([0.5], [4], fixed=[(4, 0.5)])
    assert riding[0] >= alone[0]
    # measured rounds: drafting rounds taking 3x their prediction turn drafting off
    table = StepCosts([1, 8], [1, 21], [[1.0, 1.1], [1.2, 1.4]], [0.1, 0.12], measured=False)
    slow = BatchPlanner(table, OnlineCorrection())
    assert slow.plan_batch([0.5] * 4, [5] * 4) != [0] * 4
    for _ in range(40):
        slow.observe(4, 2, 3.0, 3.0 * table.round_cost(4, 2, 3.0))
        slow.observe(4, 0, 1.0, table.round_cost(4, 0, 1.0))
    assert slow.plan_batch([0.5] * 4, [5] * 4) == [0] * 4


def test_measured_rates_decide_where_the_table_says_drafting_pays():
    from adasd_core.costs import BatchPlanner, OnlineCorrection, StepCosts

    table = StepCosts([1, 8], [1, 21], [[1.0, 1.1], [1.2, 1.4]], [0.1, 0.12])  # drafting pays on paper
    costs = BatchPlanner(table, OnlineCorrection())
    plan = lambda: costs.plan_batch([0.5] * 4, [5] * 4)  # noqa: E731
    assert plan() == [0] * 4  # nothing measured at this batch size: plain rounds first
    for _ in range(OnlineCorrection.EXPLORE_ROUNDS):
        costs.observe(4, 0, 1.0, 1.0, tokens=4)  # 1 token per sequence per second
    assert plan() != [0] * 4  # then the plan's own choice, to measure drafting
    spec_s = table.round_cost(4, 2, 3.0)  # drafting rounds take what the table says, but gain nothing
    for _ in range(OnlineCorrection.EXPLORE_ROUNDS):
        costs.observe(4, 2, 3.0, spec_s, tokens=4)
    assert plan() == [0] * 4  # drafting measured slower: plain decoding
    assert costs.plan_batch([0.5], [5]) == [0]  # another batch size has its own verdict (none yet: plain first)
    for _ in range(OnlineCorrection.REPROBE_EVERY):
        costs.observe(4, 0, 1.0, 1.0, tokens=4)
    assert plan() != [0] * 4  # a re-probe after REPROBE_EVERY plain rounds
    for _ in range(40):
        costs.observe(4, 2, 3.0, spec_s, tokens=8)  # now drafting rounds yield 2 tokens per sequence
    assert plan() != [0] * 4 and costs.plan_batch([0.5] * 4, [5] * 4) != [0] * 4


def test_a_bad_first_drafting_round_does_not_outweigh_the_next_ones():
    """Measured rates are running means until the EMA's window fills: one rejected first round (a plain
    token for a draft step's price) followed by rounds that gain must let drafting win."""
    from adasd_core.costs import OnlineCorrection, StepCosts

    table = StepCosts([1, 8], [1, 21], [[1.0, 1.1], [1.2, 1.4]], [0.1, 0.12])
    c = OnlineCorrection()
    for _ in range(c.EXPLORE_ROUNDS):
        c.observe(table, 1, 0, 1.0, 1.0, tokens=1)  # plain: 1 token/s
    c.observe(table, 1, 1, 2.0, 2.0, tokens=1)  # a first drafting round rejected: 0.5 token/s
    for _ in range(c.EXPLORE_ROUNDS - 1):
        c.observe(table, 1, 3, 4.0, 1.5, tokens=3)  # then 2 tokens/s
    rate, rounds = c.rates[(1, True)]
    assert rounds == c.EXPLORE_ROUNDS and rate == pytest.approx((1 + 3 * 7) / (2.0 + 1.5 * 7))
    assert c.drafting_pays(1)


def test_one_slow_first_drafting_round_does_not_turn_drafting_off_for_good():
    """A drafting round measured at 3x its prediction (a new shape's first call) before any other: the
    plan keeps drafting until EXPLORE_ROUNDS of them are measured; once drafting has lost on measured
    rates, each re-probe drafts even where the measured ratio would plan none."""
    from adasd_core.costs import BatchPlanner, OnlineCorrection, StepCosts

    table = StepCosts([1, 8], [1, 21], [[1.0, 1.1], [1.2, 1.4]], [0.1, 0.12])  # drafting pays on paper
    costs = BatchPlanner(table, OnlineCorrection())
    plan = lambda: costs.plan_batch([0.6], [5])  # noqa: E731
    for _ in range(OnlineCorrection.EXPLORE_ROUNDS):
        costs.observe(1, 0, 1.0, table.round_cost(1, 0, 1.0), tokens=1)
    k = plan()[0]
    assert k > 0
    costs.observe(1, k, k + 1.0, 3.0 * table.round_cost(1, k, k + 1.0), tokens=1)
    assert plan()[0] > 0  # one slow round is not yet a verdict
    for _ in range(OnlineCorrection.EXPLORE_ROUNDS - 1):
        costs.observe(1, k, k + 1.0, 3.0 * table.round_cost(1, k, k + 1.0), tokens=1)
    assert plan() == [0]  # measured: drafting rounds cost 3x and gain nothing
    for _ in range(OnlineCorrection.REPROBE_EVERY):
        costs.observe(1, 0, 1.0, table.round_cost(1, 0, 1.0), tokens=1)
    assert plan()[0] > 0  # the re-probe drafts


def test_a_round_planned_at_zero_runs_no_draft_work():
    from adasd_core.costs import StepCosts

    target, draft = random_tables(8, seed=16)
    engine = LLM(markov_pair(target, draft), calibrate=False, max_running=4, batch_aware=True)
    engine.costs = StepCosts([1, 4], [1, 21], [[1.0, 30.0], [4.0, 120.0]], [1.0, 1.0])
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    ar = [engine.generate([1 + i, 2, 3], params, SpecConfig(method="ar")).token_ids for i in range(4)]
    calls = []
    forward = engine.runner.draft.forward
    engine.runner.draft.forward = lambda slots, feeds, **kw: calls.append(len(feeds)) or forward(slots, feeds, **kw)
    seqs = [engine.new_sequence([1 + i, 2, 3], params, SpecConfig(method="adasd", verification="none"))
            for i in range(4)]
    out = engine.run_together(seqs)
    assert out == ar
    assert len(calls) == 1 and calls[0] == 4  # the prompts' prefill only; no draft step in any round
    assert all(s.stats.drafted_tokens == 0 for s in seqs)


def test_batch_aware_cap_turns_drafting_off_where_it_does_not_pay():
    from adasd_core.costs import StepCosts

    target, draft = random_tables(8, seed=15)
    engine = LLM(markov_pair(target, draft), calibrate=False, max_running=4, batch_aware=True)
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    ar = engine.generate([1], params, SpecConfig(method="ar")).token_ids
    out = engine.generate([1], params, SpecConfig(method="gen-only"))
    assert out.stats.drafted_tokens > 0  # the nominal costs make drafting pay alone
    # a draft step costs a target step
    engine.costs = StepCosts([1, 4], [1, 21], [[1.0, 30.0], [1.0, 30.0]], [1.0, 1.0])
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    ar = engine.generate([1], params, SpecConfig(method="ar")).token_ids
    for method in ("gen-only", "adasd", "hybrid"):
        out = engine.generate([1], params, SpecConfig(method=method, verification="none"))
        assert out.stats.drafted_tokens == 0 and out.token_ids == ar
    # fixed-K methods are explicit baselines: the cap leaves them alone
    assert engine.generate([1], params, SpecConfig(method="vanilla", k=3)).stats.mean_draft_length > 2


def test_draft_forwards_run_each_sequence_alone_only_beside_a_reproducible_request():
    """Per-sequence attention (an int8 draft's rows bitwise what they are alone) costs time: a draft
    forward asks for it only when its batch holds a seeded request, or a greedy one whose check can
    relax; other batches run batched attention."""
    from adasd_core.models import load_pair

    engine = LLM(load_pair("tiny", "tiny", device="cpu"), calibrate=False, max_running=4)
    draft = engine.runner.draft
    calls = []
    forward = draft.forward

    def spy(slots, feeds, *a, alone=False, **kw):
        owners = engine.scheduler.owner
        calls.append((alone, any(owners[s].reproducible for s in slots)))
        return forward(slots, feeds, *a, alone=alone, **kw)

    draft.forward = spy
    spec = SpecConfig(method="vanilla", k=3)
    free = [([1 + i], SamplingParams(max_tokens=12, temperature=(0.0, 0.8)[i % 2], ignore_eos=True), spec)
            for i in range(3)]
    run_batch(engine, free)
    assert calls and not any(alone for alone, _ in calls)
    calls.clear()
    seeded = ([9], SamplingParams(max_tokens=12, temperature=0.8, seed=5, ignore_eos=True), spec)
    run_batch(engine, free + [seeded])
    assert any(alone for alone, _ in calls)
    assert all(alone == holds for alone, holds in calls), calls
