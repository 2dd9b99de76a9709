"""Issue 12: excess surprisal (the price of the relaxed check) and the warm start across requests."""

import dataclasses
import math

from toy import fed_check, markov_pair, random_tables

from adasd_core.drafting import RejectedEntropy
from adasd_core.engine import SpecConfig
from adasd_core.llm import LLM
from adasd_core.sampling import SamplingParams
from adasd_core.verification import BayesCheck, ThresholdCheck
from adasd_core.warm import SharedStats, family_key, load_state, pair_identity, save_state

V = 6


def engine_for(seed: int = 0, sharpness: float = 1.5) -> LLM:
    target, draft = random_tables(V, seed, sharpness)
    return LLM(markov_pair(target, draft), calibrate=False)


def excess_over_requests(engine, spec, n_requests=60, tokens=40, temperature=1.0):
    """Token-weighted mean excess surprisal and its standard error over requests (one sample each)."""
    means, total, count = [], 0.0, 0
    for seed in range(n_requests):
        res = engine.generate([0], SamplingParams(max_tokens=tokens, temperature=temperature, seed=seed,
                                                  ignore_eos=True), spec)
        s = res.stats
        assert s.surprisal_count == len(res.token_ids)
        means.append(s.excess_surprisal)
        total, count = total + s.surprisal_sum, count + s.surprisal_count
    m = sum(means) / len(means)
    se = math.sqrt(sum((x - m) ** 2 for x in means) / (len(means) - 1) / len(means))
    return total / count, m, se


def test_excess_surprisal_is_zero_in_expectation_for_lossless_methods():
    engine = engine_for()
    for spec in (SpecConfig(method="ar"), SpecConfig(method="vanilla", k=4), SpecConfig(method="gen-only")):
        _, mean, se = excess_over_requests(engine, spec)
        assert abs(mean) < 4 * se + 0.02, (spec.method, mean, se)


def test_excess_surprisal_is_positive_when_failed_candidates_are_accepted():
    engine = engine_for()
    # a threshold check that accepts every failed candidate: T_V above any distance
    spec = SpecConfig(method="verify-only", k=4, verification="threshold", warm_start=False)
    orig = ThresholdCheck.accept_probability
    ThresholdCheck.accept_probability = lambda self, d: [1.0] * len(d)
    try:
        _, mean, se = excess_over_requests(engine, spec, n_requests=30)
    finally:
        ThresholdCheck.accept_probability = orig
    assert mean > 4 * se and mean > 0.1, (mean, se)


def test_excess_surprisal_reaches_usage_dict():
    engine = engine_for()
    res = engine.generate([0], SamplingParams(max_tokens=8, temperature=1.0, seed=1),
                          SpecConfig(method="adasd", warm_start=True))
    d = res.stats.to_dict()
    assert d["excess_surprisal"] == round(res.stats.surprisal_sum / res.stats.surprisal_count, 5)
    assert d["surprisal_count"] == len(res.token_ids) and d["warm_start"] is True


def test_min_posterior_gates_the_bayes_check():
    check = BayesCheck(min_posterior=0.9)
    for d in (0.1, 0.12, 0.15, 0.6, 0.62, 0.65):
        check.add(d, d < 0.5)
    p = check.posterior(0.4)
    assert 0 < p < 0.9 and check.accept_probability([0.4]) == [0.0]
    assert check.accept_probability([0.1])[0] == check.posterior(0.1) >= 0.9


# ---------------------------------------------------------------------------- warm start


def test_second_request_starts_from_the_first_requests_statistics():
    engine = engine_for()
    spec = SpecConfig(method="adasd", verification="threshold", warm_start=True)
    params = SamplingParams(max_tokens=30, temperature=1.0, seed=3, ignore_eos=True)
    engine.generate([0], params, spec)
    shared = engine.warm.shared[family_key("adasd", "threshold", greedy=False)]
    assert shared.rounds > 0 and shared.rejected.count > 0
    seq = engine.new_sequence([0], params, spec)
    assert seq.policy.rejected.count == shared.rejected.count and seq.policy.threshold == shared.entropy_threshold
    assert seq.relaxed.n_accepted == shared.relaxed.n_accepted and seq.relaxed is not shared.relaxed
    # a copy: the request's own rounds do not write into the server's state except through observe
    seq.relaxed.add(0.3, True)
    assert seq.relaxed.n_accepted == shared.relaxed.n_accepted + 1


def test_cold_start_starts_empty_and_is_reproducible():
    engine = engine_for()
    warm, cold = SpecConfig(method="adasd", warm_start=True), SpecConfig(method="adasd", warm_start=False)
    assert SpecConfig(method="adasd").warm_start is False  # the engine's default; the server's is warm
    params = SamplingParams(max_tokens=30, temperature=1.0, seed=5, ignore_eos=True)
    first = engine.generate([0], params, cold).token_ids
    engine.generate([1], params, warm)  # the server learns more
    seq = engine.new_sequence([0], params, cold)
    assert seq.policy.threshold is None and not seq.relaxed.accepted and not seq.relaxed.rejected
    assert engine.generate([0], params, cold).token_ids == first  # cold + seed: independent of history
    assert engine.generate([0], params, cold).stats.warm_start is False


def test_greedy_and_sampled_learn_apart_and_lossless_rows_learn_nothing():
    assert family_key("adasd", "bayes", True) != family_key("adasd", "bayes", False)
    assert family_key("vanilla", "bayes", False) is None and family_key("ar", "bayes", True) is None
    assert family_key("gen-only", "bayes", False) == "gen-only/none/sampled"


def test_save_load_roundtrip_and_mismatch(tmp_path):
    engine = engine_for()
    for spec in (SpecConfig(method="adasd"), SpecConfig(method="hybrid", verification="threshold")):
        engine.generate([0], SamplingParams(max_tokens=30, temperature=1.0, seed=2, ignore_eos=True), spec)
    ident = pair_identity(engine.pair, {"window": 20})
    path = tmp_path / "state.json"
    save_state(path, ident, engine.warm.shared)
    loaded = load_state(path, ident)
    assert set(loaded) == set(engine.warm.shared)
    for key, s in engine.warm.shared.items():
        assert loaded[key].to_json() == s.to_json()
        assert loaded[key].summary() == s.summary()
    assert load_state(path, "another-pair") == {}
    assert load_state(tmp_path / "missing.json", ident) == {}
    (tmp_path / "bad.json").write_text("{not json")
    assert load_state(tmp_path / "bad.json", ident) == {}
    # the identity covers the models' names and configs and the settings (not the weights)
    renamed = dataclasses.replace(engine.pair, target_name="another-target")
    assert pair_identity(renamed, {"window": 20}) != ident
    assert pair_identity(engine.pair, {"window": 10}) != ident
    assert pair_identity(engine_for(seed=9).pair, {"window": 20}) == ident


def test_loaded_state_warms_new_requests():
    engine = engine_for()
    state = SharedStats(kind="bayes", rejected=RejectedEntropy(6.0, 3))
    for d in (0.1, 0.2, 0.7, 0.8):
        state.relaxed.add(d, d < 0.5)
    engine.warm.shared[family_key("adasd", "bayes", False)] = SharedStats.from_json(state.to_json())
    seq = engine.new_sequence([0], SamplingParams(max_tokens=4, temperature=1.0),
                              SpecConfig(method="adasd", warm_start=True))
    assert seq.policy.threshold == 2.0 and list(seq.relaxed.accepted) == [0.1, 0.2]


def test_the_draft_folder_sets_the_pairs_bayes_gate():
    from types import SimpleNamespace

    from toy import markov_pair, random_tables

    from adasd_core.engine import SpecConfig
    from adasd_core.llm import LLM

    target, draft = random_tables(8, seed=3)
    pair = markov_pair(target, draft)
    default = LLM(pair, calibrate=False).new_sequence([1], None, SpecConfig(method="adasd"))
    assert default.relaxed.min_posterior == BayesCheck.min_posterior
    pair.draft.config = SimpleNamespace(adasd_draft={"min_posterior": 1.0})
    for warm in (False, True):
        seq = LLM(pair, calibrate=False).new_sequence([1], None, SpecConfig(method="adasd", warm_start=warm))
        assert seq.relaxed.min_posterior == 1.0
        assert not seq.relaxed.can_relax and seq.plan_prior is None  # lossless greedy: planned by the batch
    seeded = LLM(pair, calibrate=False).new_sequence(
        [1], SamplingParams(max_tokens=4, temperature=1.0, seed=3), SpecConfig(method="adasd"))
    assert seeded.plan_prior is not None  # its draws still depend on the draft lengths


def test_a_gate_of_one_never_relaxes_even_a_certain_posterior():
    check = fed_check(BayesCheck(min_posterior=1.0), accepted=(0.1, 0.12, 0.11), rejected=(0.9, 0.95, 0.92))
    p, posterior = check.judge(0.1)
    assert posterior is not None and posterior > 0.99 and p == 0.0
    assert BayesCheck(min_posterior=0.9).judge(0.1)[0] == 0.0  # not ready: no samples
