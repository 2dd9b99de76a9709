"""Hand-built distributions: entropy, JS distance, standard check, relaxed checks, tokens."""

import math

import pytest
import torch

from adasd_core.drafting import CappedEntropyStop, EntropyStop, FixedK
from adasd_core.verification import (
    BayesCheck,
    Observation,
    RelaxedCheck,
    ThresholdCheck,
    accept_batch,
    accept_candidates,
    bonus_token,
    correction_token,
    entropy,
    js_distance,
    standard_check,
)


def test_entropy_known_values():
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    assert entropy(probs).tolist() == pytest.approx([math.log(4), 0.0, math.log(2)], abs=1e-6)


def test_js_distance_known_values_bounds_symmetry():
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5], [1.0, 0.0]])
    q = torch.tensor([[0.0, 1.0], [0.5, 0.5], [0.5, 0.5]])
    d = js_distance(p, q)
    # disjoint supports: JSD = 1 bit; identical: 0
    assert d[0].item() == pytest.approx(1.0, abs=1e-6)
    assert d[1].item() == pytest.approx(0.0, abs=1e-6)
    # p = (1, 0), q = (1/2, 1/2): m = (3/4, 1/4); JSD = H(m) - (0 + 1)/2 in bits
    h_m = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert d[2].item() == pytest.approx(math.sqrt(h_m - 0.5), abs=1e-6)
    g = torch.Generator().manual_seed(0)
    a = torch.softmax(torch.randn(64, 10, generator=g) * 3, -1)
    b = torch.softmax(torch.randn(64, 10, generator=g) * 3, -1)
    dab, dba = js_distance(a, b), js_distance(b, a)
    assert torch.allclose(dab, dba, atol=1e-6)
    assert (dab >= 0).all() and (dab <= 1).all()


def test_standard_check_greedy_exact():
    target = torch.tensor([[0.1, 0.7, 0.2], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    draft = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    ok = standard_check(torch.tensor([1, 1, 2]), target, draft, greedy=True, generator=None)
    assert ok.tolist() == [True, False, True]


def test_standard_check_sampling_rate():
    # p(x)=0.2, q(x)=0.8 -> accept with probability 0.25; p>=q -> always
    target = torch.tensor([[0.2, 0.8], [0.9, 0.1]]).repeat(5000, 1)
    draft = torch.tensor([[0.8, 0.2], [0.5, 0.5]]).repeat(5000, 1)
    cands = torch.tensor([0, 0]).repeat(5000)
    ok = standard_check(cands, target, draft, greedy=False, generator=torch.Generator().manual_seed(1))
    assert ok[0::2].float().mean().item() == pytest.approx(0.25, abs=0.02)
    assert ok[1::2].all()


def test_correction_and_bonus_tokens():
    target = torch.tensor([0.1, 0.6, 0.3])
    draft = torch.tensor([0.1, 0.1, 0.8])
    assert correction_token(target, draft, greedy=True, generator=None) == 1
    assert bonus_token(target, greedy=True, generator=None) == 1
    # residual max(0, p - q) = (0, 0.5, 0): the correction must be token 1 every time
    g = torch.Generator().manual_seed(0)
    assert {correction_token(target, draft, greedy=False, generator=g) for _ in range(50)} == {1}
    # p == q leaves no residual: fall back to p
    same = torch.tensor([0.0, 0.0, 1.0])
    assert correction_token(same, same, greedy=False, generator=g) == 2
    counts = torch.bincount(torch.tensor([bonus_token(target, False, g) for _ in range(4000)]), minlength=3)
    assert (counts / 4000).tolist() == pytest.approx([0.1, 0.6, 0.3], abs=0.03)


def test_threshold_check_paper_example():
    check = ThresholdCheck()
    assert check.threshold is None
    assert check.accept_probability([0.1]) == [0.0]  # only the standard check until both groups have data
    for d in (0.1, 0.2):
        check.add(d, accepted=True)  # mean 0.15
    for d in (0.48, 0.50):
        check.add(d, accepted=False)  # mean 0.49
    assert check.threshold == pytest.approx(0.32)
    assert check.accept_probability([0.31, 0.33]) == [1.0, 0.0]


def test_bayes_posterior_matches_hand_computation():
    check = BayesCheck()
    for d in (0.1, 0.2):
        check.add(d, True)
    assert check.posterior(0.1) is None  # rejected group still empty
    for d in (0.6, 0.7, 0.0, 1.0):  # 0 and 1 count for the prior, not the KDE
        check.add(d, False)
    assert len(check.rejected) == 2 and check.n_rejected == 4

    def kde(samples, x):
        n = len(samples)
        mean = sum(samples) / n
        std = math.sqrt(sum((s - mean) ** 2 for s in samples) / (n - 1))
        h = max(1.06 * std * n ** -0.2, 0.02)
        return sum(math.exp(-0.5 * ((x - s) / h) ** 2) for s in samples) / (n * h * math.sqrt(2 * math.pi))

    for x in (0.15, 0.4, 0.65):
        pa = kde([0.1, 0.2], x) * (2 / 6)
        pr = kde([0.6, 0.7], x) * (4 / 6)
        assert check.posterior(x) == pytest.approx(pa / (pa + pr), rel=1e-9)
    assert check.posterior(0.15) > 0.5 > check.posterior(0.65)


def test_bayes_sample_is_bounded():
    check = BayesCheck(max_samples=8)
    for i in range(100):
        check.add(0.01 + i / 200, i % 2 == 0)
    assert len(check.accepted) == 8 and len(check.rejected) == 8
    assert check.n_accepted == 50 and check.n_rejected == 50


def round_of(rejected: list[float], all_accepted: bool = False) -> Observation:
    """A round whose examined candidates the standard check failed, with these draft entropies."""
    n = len(rejected)
    return Observation(drafted=n if all_accepted else n + 1, accepted=n if all_accepted else 0,
                       standard=(False,) * n, entropies=tuple(rejected), distances=None)


def test_entropy_stop_threshold_is_running_mean_of_rejections():
    policy = EntropyStop(window=20)
    assert policy.threshold is None
    assert policy.keep_drafting(entropy=50.0, n_drafted=3)  # undefined T_G: draft to the window
    assert not policy.keep_drafting(entropy=0.0, n_drafted=20)
    policy.observe(round_of([1.0, 3.0]))
    assert policy.threshold == pytest.approx(2.0)
    policy.observe(round_of([]))
    policy.observe(round_of([5.0]))
    assert policy.threshold == pytest.approx(3.0)  # over all rejections, not a window
    assert policy.keep_drafting(2.9, 1) and not policy.keep_drafting(3.1, 1)


def test_capped_entropy_stop_follows_the_outcomes():
    policy = CappedEntropyStop(window=8, cap=3)
    assert policy.keep_drafting(50.0, 2) and not policy.keep_drafting(0.0, 3)  # no T_G yet: the cap stops it
    policy.observe(round_of([], all_accepted=True))
    assert policy.cap == 5
    policy.observe(round_of([2.0], all_accepted=False))
    assert policy.cap == 4 and policy.threshold == pytest.approx(2.0)
    assert policy.keep_drafting(1.9, 3) and not policy.keep_drafting(2.1, 1)  # T_G still stops it
    for _ in range(10):
        policy.observe(round_of([], all_accepted=True))
    assert policy.cap == 8  # never past the window
    for _ in range(10):
        policy.observe(round_of([4.0], all_accepted=False))
    assert policy.cap == 1  # and always at least one candidate


def test_fixed_k():
    policy = FixedK(3)
    assert [policy.keep_drafting(99.0, n) for n in (1, 2, 3)] == [True, True, False]
    with pytest.raises(ValueError):
        FixedK(0)


def _batch_case(seed: int = 0):
    """Four sequences of one round: greedy and sampled, every kind of relaxed check, k from 0 to 4."""
    from toy import fed_check

    V, ks = 12, [3, 0, 4, 2]
    gen = torch.Generator().manual_seed(seed)
    cands = [torch.randint(0, V, (k,), generator=gen).tolist() for k in ks]
    target = torch.softmax(3 * torch.randn(sum(ks) + len(ks), V, generator=gen), -1)
    draft = torch.softmax(3 * torch.randn(sum(ks), V, generator=gen), -1)
    for i, c in enumerate([t for cs in cands for t in cs]):  # make some candidates the target's choice
        if i % 2 == 0:
            draft[i, c] += 1.0
            draft[i] /= draft[i].sum()
    checks = [fed_check(BayesCheck(min_posterior=0.0), (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)), RelaxedCheck(),
              fed_check(BayesCheck(min_posterior=1.0), (0.1, 0.2), (0.6, 0.7)),
              fed_check(ThresholdCheck(), (0.1, 0.2), (0.6, 0.8))]
    return cands, target, draft, checks


def test_a_batched_round_gives_every_sequence_the_verdict_it_gets_alone():
    # sequence 1 drafts nothing: alone it takes the plain round's path, in the batch the general one
    for seed in range(6):
        for greedy, stable in (([True] * 4, [False] * 4), ([False] * 4, [False] * 4), ([False] * 4, [True] * 4),
                               ([True, False, False, True], [False, True, False, True])):
            cands, target, draft, checks = _batch_case(seed)
            gens = [torch.Generator().manual_seed(100 + i) for i in range(4)]
            batch = accept_batch(cands, target, draft, greedy, gens, checks, stable)
            t0, d0 = 0, 0
            for b, c in enumerate(cands):
                k = len(c)
                alone = accept_candidates(c, target[t0 : t0 + k + 1], draft[d0 : d0 + k] if k else None, greedy[b],
                                          torch.Generator().manual_seed(100 + b), checks[b], stable[b])
                assert (batch[b].n_accepted, batch[b].token, batch[b].standard, batch[b].posteriors,
                        batch[b].distances, batch[b].n_relaxed) == \
                    (alone.n_accepted, alone.token, alone.standard, alone.posteriors, alone.distances,
                     alone.n_relaxed), (seed, b)
                assert batch[b].excess == pytest.approx(alone.excess, abs=1e-6)
                t0, d0 = t0 + k + 1, d0 + k


def test_a_batched_round_reads_the_device_once(monkeypatch):
    cands, target, draft, checks = _batch_case(3)
    reads = []
    for name in ("tolist", "item", "__bool__", "__int__", "__float__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name: reads.append(_n) or _o(self, *a))
    accept_batch(cands, target, draft, [False, True, False, True], [torch.Generator().manual_seed(i) for i in range(4)],
                 checks)
    assert reads == ["tolist"], reads


def test_a_greedy_round_on_the_cpu_reads_what_the_general_path_reads():
    """An all-greedy CPU round takes its own reads (the standard check and the leading passes on the host):
    the same verdicts as the general path's device reads, for every kind of check, at a real vocabulary."""
    from toy import fed_check

    def checks():  # one of each kind, fed the same distances
        return [fed_check(BayesCheck(min_posterior=0.0), (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)), RelaxedCheck(),
                fed_check(ThresholdCheck(), (0.1, 0.2), (0.6, 0.8)),
                fed_check(BayesCheck(min_posterior=1.0), (0.1, 0.2), (0.6, 0.7))]

    for seed in range(4):
        for V, ks in ((12, [3, 0, 4, 2]), (49152, [5, 1, 0, 3])):
            gen = torch.Generator().manual_seed(seed)
            target = torch.softmax(4 * torch.randn(sum(ks) + len(ks), V, generator=gen), -1)
            draft = torch.softmax(4 * torch.randn(sum(ks), V, generator=gen), -1)
            cands, r, d = [], 0, 0
            for k in ks:  # each candidate the target's choice with probability 3/4, else the draft's
                row = []
                for j in range(k):
                    agree = torch.rand((), generator=gen) < 0.75
                    row.append(int(target[r + j].argmax() if agree else draft[d + j].argmax()))
                cands.append(row)
                r, d = r + k + 1, d + k
            lean = accept_batch(cands, target, draft, [True] * 4, [None] * 4, checks())
            # the same four behind a sampled sequence: the round takes the general path
            extra_t = torch.softmax(torch.randn(2, V, generator=gen), -1)
            extra_d = torch.softmax(torch.randn(1, V, generator=gen), -1)
            ref = accept_batch(cands + [[0]], torch.cat((target, extra_t)), torch.cat((draft, extra_d)),
                               [True] * 4 + [False], [None] * 4 + [torch.Generator().manual_seed(seed)],
                               checks() + [RelaxedCheck()])[:4]
            for b, (x, y) in enumerate(zip(lean, ref)):
                assert (x.n_accepted, x.token, x.standard, x.posteriors, x.distances, x.n_relaxed) == \
                    (y.n_accepted, y.token, y.standard, y.posteriors, y.distances, y.n_relaxed), (seed, V, b)
                assert x.excess == pytest.approx(y.excess, abs=1e-6)
            assert {v.n_accepted for v in lean} != {0}  # the rounds accept candidates


def test_a_plain_round_draws_what_the_general_path_draws(monkeypatch):
    """A round where no sequence drafts: each one's token, its excess surprisal and what it leaves in its
    generator are those of the same sequence in a round where another one drafts; one read of the device."""
    from toy import fed_check

    V = 12
    gen = torch.Generator().manual_seed(7)
    rows = torch.softmax(3 * torch.randn(4, V, generator=gen), -1)
    greedy, stable = [True, False, False, True], [False, False, True, True]
    checks = [RelaxedCheck(), fed_check(BayesCheck(min_posterior=0.0), (0.1, 0.2), (0.6, 0.7)), RelaxedCheck(),
              fed_check(ThresholdCheck(), (0.1, 0.2), (0.6, 0.8))]
    gens = [torch.Generator().manual_seed(50 + i) for i in range(4)]
    reads = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(1) or original(self))
    plain = accept_batch([[]] * 4, rows, None, greedy, gens, checks, stable)
    assert len(reads) == 1
    # the same four bonus rows behind a drafting sequence 0 (general path): its rows come first
    lead = torch.softmax(torch.randn(3, V, generator=gen), -1)
    mixed = accept_batch([[1, 2]] + [[]] * 4, torch.cat((lead, rows)), torch.softmax(torch.randn(2, V), -1),
                         [True] + greedy, [None] + [torch.Generator().manual_seed(50 + i) for i in range(4)],
                         [RelaxedCheck()] + checks, [False] + stable)[1:]
    for b, (p, m) in enumerate(zip(plain, mixed)):
        assert (p.n_accepted, p.token, p.standard, p.distances, p.posteriors, p.n_relaxed) == \
            (m.n_accepted, m.token, m.standard, m.distances, m.posteriors, m.n_relaxed), b
        assert p.excess == pytest.approx(m.excess, abs=1e-6)
        assert p.excess[0] == pytest.approx(-math.log(rows[b, p.token]) - float(entropy(rows[b : b + 1])), abs=1e-5)
    assert plain[0].token == int(rows[0].argmax()) and plain[3].token == int(rows[3].argmax())
    # the generators are where the general path leaves them
    after = [torch.Generator().manual_seed(50 + i) for i in range(4)]
    accept_batch([[1, 2]] + [[]] * 4, torch.cat((lead, rows)), torch.softmax(torch.randn(2, V), -1), [True] + greedy,
                 [None] + after, [RelaxedCheck()] + checks, [False] + stable)
    assert [g.get_state().tolist() for g in gens] == [g.get_state().tolist() for g in after]


def test_an_observation_without_the_grammars_forced_candidates():
    """Candidates 1 and 2 were forced (no draft step chose them): the learners see the sampled ones alone."""
    obs = Observation(5, 3, (True, True, True, False), (0.5, 0.0, 0.0, 2.0), (0.1, 0.0, 0.0, 0.7))
    less = obs.without([1, 2])
    assert less == Observation(3, 1, (True, False), (0.5, 2.0), (0.1, 0.7))
    assert less.rejected_entropies == [2.0] and less.acceptance == 0.5
    assert obs.without([4]) == Observation(4, 3, (True, True, True, False), (0.5, 0.0, 0.0, 2.0), (0.1, 0.0, 0.0, 0.7))
    assert obs.without([]) is obs
