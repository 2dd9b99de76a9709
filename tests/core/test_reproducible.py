"""Issue 15: greedy and seeded requests give the same tokens on the same server state, whatever runs
beside them: requests start from published snapshots (adasd_core.warm), and a reproducible request
plans its drafts from saved state only (never its batch size, the live costs or the live acceptance)."""

import pytest
import torch
from toy import markov_pair, random_tables

from adasd_core.costs import BatchPlanner, StepCosts
from adasd_core.engine import SpecConfig
from adasd_core.llm import LLM
from adasd_core.sampling import SamplingParams
from adasd_core.warm import Schedule, Snapshot, WarmState, family_key, fingerprint_key, save_state

V = 8
# drafting pays alone (a verify of k+1 tokens costs about one step) but not at 4 sequences, where each
# verified token costs 1.45 steps: a request planned by its batch size drafts there, one planned alone does
def alone_pays() -> StepCosts:
    return StepCosts([1, 4], [1, 21], [[1.0, 1.4], [1.0, 30.0]], [0.1, 0.1], measured=False)


GREEDY = (SamplingParams(max_tokens=40, ignore_eos=True), SpecConfig(method="adasd", warm_start=True))
SEEDED = (SamplingParams(max_tokens=40, temperature=1.0, seed=7, ignore_eos=True),
          SpecConfig(method="adasd", warm_start=True))


def make_engine(schedule=Schedule(first=16, freeze=0), costs=None, warm=None) -> LLM:
    target, draft = random_tables(V, seed=21, sharpness=1.5)
    costs = costs or alone_pays()
    engine = LLM(markov_pair(target, draft), calibrate=False, max_running=4, batch_aware=True,
                 warm=warm or WarmState(schedule=schedule, plan=costs))
    engine.costs = costs  # live: the online correction moves it
    return engine


def run(engine, requests, epoch=None) -> list[list[int]]:
    """(prompt, params, spec) all at once until every one ends; tokens per request."""
    return engine.run_together([engine.new_sequence(p, params, spec, epoch=epoch) for p, params, spec in requests])


def traffic(n: int, seed: int = 0) -> list:
    """Requests of every method and temperature, unseeded ones included."""
    methods = ["ar", "vanilla", "gen-only", "verify-only", "adasd", "hybrid"]
    out = []
    for i in range(n):
        temperature = (0.0, 0.7, 1.0)[(i + seed) % 3]
        params = SamplingParams(max_tokens=12 + 5 * (i % 3), temperature=temperature,
                                seed=None if i % 2 else 100 + i, ignore_eos=True)
        spec = SpecConfig(method=methods[(i + seed) % len(methods)], verification=("bayes", "threshold")[i % 2],
                          warm_start=True)
        out.append(([(i * 3 + seed) % V], params, spec))
    return out


def warmed(engine, n: int = 12):
    """Serve some traffic, so that every family the tests use has a published snapshot."""
    for i in range(0, n, 4):
        run(engine, traffic(4, seed=i))
    run(engine, [([1], *GREEDY), ([2], *SEEDED)] * 2)
    assert {family_key("adasd", "bayes", True), family_key("adasd", "bayes", False)} <= set(engine.warm.published)


def test_schedule_publishes_at_doubling_rounds_then_freezes():
    from adasd_core.warm import SharedStats

    sched, live, snap, published_at = Schedule(first=32, freeze=256), SharedStats(kind="bayes"), None, []
    for r in range(1, 1000):
        live.rounds = r
        if sched.due(live, snap):
            snap = Snapshot(live)
            published_at.append(r)
    assert published_at == [32, 64, 128, 256] and sched.frozen(snap)
    assert Schedule(first=32, freeze=0).due(live, snap)  # 0: never frozen, doubling forever


@pytest.mark.parametrize("request_", [GREEDY, SEEDED], ids=["greedy-adasd", "seeded-adasd"])
def test_batch_mates_and_live_state_never_change_a_reproducible_request(request_):
    engine = make_engine()
    warmed(engine)
    epoch = engine.warm.epoch
    mine = ([3], *request_)
    alone = run(engine, [mine], epoch=epoch)[0]
    fp = engine.new_sequence(*mine, epoch=epoch).fingerprint
    # the same request among batch mates of every method, while the live statistics, the per-method
    # running acceptance and the online cost correction move, and with other timings measured
    engine.warm.schedule = Schedule(first=10**9)  # no publication in between: the same epoch throughout
    for seed in range(3):
        engine.costs = StepCosts([1, 4], [1, 21], [[1.0, 1.0 + seed], [2.0, 40.0]], [0.3, 0.5], measured=True)
        batch = traffic(3, seed=seed)
        batch.insert(seed, mine)
        out = run(engine, batch, epoch=epoch)
        assert out[seed] == alone
        assert engine.new_sequence(*mine, epoch=epoch).fingerprint == fp
    # the batch plan differs: a greedy lossless request drafts nothing beside 3 plain ones here, alone it drafts
    lossless = ([3], SamplingParams(max_tokens=20, ignore_eos=True), SpecConfig(method="gen-only"))
    plain = ([4], SamplingParams(max_tokens=20, ignore_eos=True), SpecConfig(method="ar"))
    engine.costs = alone_pays()
    seqs = [engine.new_sequence(*r) for r in [lossless, plain, plain, plain]]
    assert engine._draft_caps(seqs)[0] == 0 < engine._draft_caps(seqs[:1])[0]
    assert engine._draft_caps([engine.new_sequence(*mine), *seqs[1:]])[0] > 0


def test_a_publication_mid_stream_leaves_running_requests_alone():
    engine = make_engine(Schedule(first=16, freeze=0))
    warmed(engine)
    epoch = engine.warm.epoch
    mine = [([3], *GREEDY), ([4], *SEEDED)]
    alone = [run(engine, [r], epoch=epoch)[0] for r in mine]
    # long requests of the same families publish new snapshots while `mine` run
    long = [([i], SamplingParams(max_tokens=120, temperature=t, seed=i, ignore_eos=True), GREEDY[1])
            for i, t in ((5, 0.0), (6, 1.0))]
    out = run(engine, [*mine, *long], epoch=epoch)
    for _, params, spec in mine:  # their families published while they ran
        family = family_key(spec.method, spec.verification, params.greedy)
        assert engine.warm.published[family] is not engine.warm.epochs[epoch][family]
    assert out[:2] == alone
    # new requests read the new snapshot, and their fingerprint says so
    assert engine.new_sequence(*mine[0]).fingerprint != engine.new_sequence(*mine[0], epoch=epoch).fingerprint


def test_requests_start_from_the_snapshot_not_the_live_state():
    engine = make_engine(Schedule(first=16, freeze=0))
    warmed(engine)
    engine.warm.schedule = Schedule(first=10**9)
    run(engine, [([5], *GREEDY)])  # the live state learns on after the last publication
    family = family_key("adasd", "bayes", True)
    live, snap = engine.warm.shared[family], engine.warm.published[family]
    assert live.rounds > snap.rounds  # the live state learned on since the last publication
    seq = engine.new_sequence([0], *GREEDY)
    assert seq.relaxed.n_accepted == snap.stats.relaxed.n_accepted != live.relaxed.n_accepted
    assert seq.policy.rejected.count == snap.stats.rejected.count
    assert list(seq.relaxed.accepted) == list(snap.stats.relaxed.accepted)
    assert seq.plan_prior == snap.stats.acceptance
    # the front end's table names the same fingerprint as the request's own, at every epoch
    for epoch in (0, engine.warm.epoch):
        table = engine.fingerprints(epoch)
        for params, spec in (GREEDY, SEEDED, (GREEDY[0], SpecConfig(method="adasd", warm_start=False)),
                             (GREEDY[0], SpecConfig(method="ar")), (SEEDED[0], SpecConfig(method="hybrid"))):
            key = fingerprint_key(spec.method, spec.verification, params.greedy, spec.warm_start)
            assert table[key] == engine.new_sequence([0], params, spec, epoch=epoch).fingerprint
    assert engine.fingerprints(0)[family] != engine.fingerprints()[family]


def test_a_cold_request_keeps_its_per_request_semantics():
    cold = (SamplingParams(max_tokens=40, temperature=1.0, seed=3, ignore_eos=True),
            SpecConfig(method="adasd", warm_start=False))
    fresh = make_engine()
    first = run(fresh, [([2], *cold)])[0]
    engine = make_engine()
    warmed(engine)
    seq = engine.new_sequence([2], *cold)
    assert seq.policy.threshold is None and not seq.relaxed.accepted and seq.plan_prior == 0.6
    assert run(engine, [([2], *cold), *traffic(3)])[0] == first
    # it reads the same (empty) state as a family that has not published yet, and says so
    key = family_key("adasd", "bayes", False)
    assert engine.fingerprints()[key + "#cold"] == make_engine().fingerprints()[key] != engine.fingerprints()[key]


def test_a_failed_batch_is_retried_with_the_same_draws(monkeypatch):
    engine = make_engine()
    warmed(engine)
    epoch, mine = engine.warm.epoch, ([3], *SEEDED)
    alone = run(engine, [mine], epoch=epoch)[0]
    engine.warm.schedule = Schedule(first=10**9)
    others = traffic(2)
    seqs = [engine.new_sequence(*r, epoch=epoch) for r in [mine, *others]]
    forward, failures = engine.runner.target.forward, []

    def fragile(slots, feeds, all_logits=False, **kw):  # the batched verify fails once, after the drafts drew
        if all_logits and len(slots) > 1 and seqs[0].generated >= 6 and not failures:
            failures.append(len(slots))
            raise RuntimeError("transient")
        return forward(slots, feeds, all_logits, **kw)

    monkeypatch.setattr(engine.runner.target, "forward", fragile)
    for s in seqs:
        engine.add(s)
    out = []
    while not engine.idle:
        for seq, event in engine.step():
            assert not isinstance(event, Exception), event
            if seq is seqs[0]:
                out.extend(event.token_ids)
    assert failures and out == alone


def test_snapshot_and_plan_survive_a_restart(tmp_path):
    engine = make_engine()
    warmed(engine)
    path = tmp_path / "state.json"
    save_state(path, "pair", engine.warm.shared, engine.warm.published, engine.warm.plan.to_json())
    epoch, fps, mine = engine.warm.epoch, engine.fingerprints(), [([3], *GREEDY), ([4], *SEEDED)]
    before = [run(engine, [r], epoch=epoch)[0] for r in mine]  # (these may publish: pinned to the saved epoch)

    # a new process: other timings measured at its start, then the saved state restored
    restarted = make_engine(costs=StepCosts([1, 4], [1, 21], [[1.0, 3.0], [1.0, 30.0]], [0.4, 0.4]),
                            warm=WarmState.open(str(path), "pair", Schedule(first=16, freeze=0)))
    assert restarted.fingerprints() == fps
    assert [run(restarted, [r], epoch=0)[0] for r in mine] == before  # the restored state is epoch 0
    # without the saved plan the fingerprint of an adaptive method says the plan changed
    restarted.warm.plan = restarted.costs
    assert restarted.fingerprints()[family_key("adasd", "bayes", True)] != fps[family_key("adasd", "bayes", True)]
    assert restarted.fingerprints()["-"] == fps["-"]


def test_the_best_draft_length_does_not_depend_on_the_order_of_calls():
    """Its cache is shared by every request: an answer must not depend on who asked first."""
    xs = [0.2 + 0.001 * i for i in range(790)]
    first, second = BatchPlanner(alone_pays()), BatchPlanner(alone_pays())
    forward = [first.best_draft_length(1, a, 20) for a in xs]
    backward = [second.best_draft_length(1, a, 20) for a in reversed(xs)][::-1]
    assert forward == backward and len(set(forward)) > 3


def test_step_costs_roundtrip_exactly():
    costs = StepCosts([1, 2], [1, 4], [[0.1 / 3, 0.2], [0.3, float("inf")]], [0.01, 0.02], [0.005, 0.006])
    import json

    again = StepCosts.from_json(json.loads(json.dumps(costs.to_json())))
    assert again.to_json() == costs.to_json()
    assert BatchPlanner(again).best_draft_length(1, 0.7, 10) == BatchPlanner(costs).best_draft_length(1, 0.7, 10)
    with pytest.raises(ValueError):
        StepCosts.from_json({**costs.to_json(), "draft": [0.1]})
    assert torch.equal(torch.tensor(again.target[0]), torch.tensor(costs.target[0]))
