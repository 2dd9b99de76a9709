"""Token sources (the request option `token_sources`): where each emitted token came from, and the
round records beside them; switching them on changes no token."""

from collections import Counter

import pytest
import torch
from toy import fed_check, markov_pair

from adasd_core.engine import SpecConfig
from adasd_core.llm import LLM
from adasd_core.round_output import Draft as _Draft
from adasd_core.round_output import token_sources as _token_sources
from adasd_core.sampling import SamplingParams
from adasd_core.sequence import SOURCES
from adasd_core.verification import BayesCheck, RelaxedCheck, Verdict, accept_candidates

DRAFTED = ("standard", "relaxed", "correction")


def toy_engine(v: int = 12, eos: bool = False) -> LLM:
    """A Markov pair whose draft disagrees often, greedy too (all five sources occur)."""
    g = torch.Generator().manual_seed(0)
    target = torch.randn(v, v, generator=g) * 1.5
    draft = target + torch.randn(v, v, generator=g) * 2.5
    return LLM(markov_pair(target, draft, eos=eos), calibrate=False, max_running=4)


def run(engine, spec: SpecConfig, params: SamplingParams, prompt=(1, 2)):
    deltas = []
    gen = engine.start(list(prompt), params, spec)
    while not gen.finished:
        deltas.append(gen.step())
    return deltas, gen.stats


def test_hand_built_round_gives_each_token_its_source():
    draft = _Draft(ids=[1, 2, 3, 4], probs=[], entropies=[0.5, 0.6, 0.7, 0.8])
    verdict = Verdict(n_accepted=2, token=5, standard=[True, False, False], distances=[0.1, 0.2, 0.3], n_relaxed=1,
                      posteriors=[None, 0.8, 0.4])
    got = [(s.source, s.round, s.entropy, s.js_distance, s.posterior, s.rejected)
           for s in _token_sources(draft, verdict, 7)]
    assert got == [("standard", 7, 0.5, 0.1, None, None), ("relaxed", 7, 0.6, 0.2, 0.8, None),
                   ("correction", 7, 0.7, 0.3, 0.4, 3)]
    all_in = Verdict(n_accepted=2, token=9, standard=[True, True], distances=None, n_relaxed=0)
    got = [(s.source, s.entropy, s.js_distance) for s in _token_sources(_Draft([1, 2], [], [0.5, 0.6]), all_in, 1)]
    assert got == [("standard", 0.5, None), ("standard", 0.6, None), ("bonus", None, None)]
    plain = Verdict(n_accepted=0, token=4, standard=[], distances=None, n_relaxed=0)
    assert [(s.source, s.entropy) for s in _token_sources(None, plain, 3)] == [("ar", None)]


def test_verdict_reports_the_posterior_only_where_the_bayes_check_was_consulted():
    check = fed_check(BayesCheck(min_posterior=0.0), accepted=(0.1, 0.15, 0.2), rejected=(0.6, 0.7, 0.8))
    # candidate 0 passes (it is the target's argmax), candidate 1 fails the standard check
    target = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]])
    draft = torch.tensor([[0.8, 0.2, 0.0], [0.1, 0.6, 0.3]])
    v = accept_candidates([0, 1], target, draft, True, None, check)
    assert v.standard == [True, False]
    assert v.posteriors[0] is None and v.posteriors[1] == pytest.approx(check.posterior(v.distances[1]))
    off = accept_candidates([0, 1], target, draft, True, None, RelaxedCheck())
    assert off.posteriors is None and off.distances is None


CASES = [
    ("ar", "none", 0.0), ("vanilla", "none", 1.0), ("gen-only", "none", 0.0), ("verify-only", "threshold", 1.0),
    ("adasd", "bayes", 1.0), ("adasd", "threshold", 0.0), ("hybrid", "bayes", 0.0),
]


@pytest.mark.parametrize("method,verification,temperature", CASES, ids=[f"{m}-{v}-T{t:g}" for m, v, t in CASES])
def test_sources_account_for_every_token_and_round(method, verification, temperature):
    engine = toy_engine()
    spec = SpecConfig(method=method, verification=verification, k=4, token_sources=True)
    deltas, stats = run(engine, spec, SamplingParams(max_tokens=160, temperature=temperature, seed=3, ignore_eos=True))
    relaxing = method in ("verify-only", "adasd", "hybrid") and verification != "none"
    counts, drafted, thresholds = Counter(), 0, []
    for n, delta in enumerate(deltas, start=1):
        src, rnd = delta.sources, delta.round
        assert len(src) == len(delta.token_ids) and "".join(s.text for s in src) == delta.text
        assert {s.round for s in src} == {rnd["round"]} and rnd["round"] == n
        *kept, last = [s.source for s in src]
        assert set(kept) <= {"standard", "relaxed"} and len(kept) == rnd["accepted"]
        assert kept.count("relaxed") == rnd["relaxed"]
        assert last == ("ar" if rnd["drafted"] == 0 else "bonus" if rnd["accepted"] == rnd["drafted"] else "correction")
        for s, token in zip(src, delta.token_ids):
            assert (s.entropy is not None) == (s.source in DRAFTED)
            assert (s.js_distance is not None) == (s.source in DRAFTED and relaxing)
            if s.posterior is not None:  # only where the standard check failed and the Bayesian check was asked
                assert verification == "bayes" and s.source in ("relaxed", "correction") and 0 <= s.posterior <= 1
            if s.source == "relaxed" and verification == "bayes":
                assert s.posterior >= BayesCheck.min_posterior
            assert (s.rejected is not None) == (s.source == "correction")
            if s.source == "correction":
                assert s.rejected != token  # a failed candidate is never its own correction
        counts.update(s.source for s in src)
        drafted += rnd["drafted"]
        if method in ("ar", "vanilla", "verify-only"):  # no entropy stop: no T_G
            assert rnd["entropy_threshold"] is None
        thresholds.append(rnd["entropy_threshold"])
    assert set(counts) <= set(SOURCES)
    assert counts["standard"] == stats.accepted_standard and counts["relaxed"] == stats.accepted_relaxed
    assert counts["bonus"] == stats.bonus_tokens and drafted == stats.drafted_tokens
    assert len(deltas) == stats.rounds and sum(counts.values()) == stats.generated_tokens == 160
    assert (counts["ar"] == 160) == (method == "ar")
    if method in ("gen-only", "adasd", "hybrid"):  # T_G: from the first candidate the standard check rejects
        assert (thresholds[-1] is not None) == (counts["correction"] + counts["relaxed"] > 0)
    if verification == "threshold":  # the toy pair disagrees often enough for both
        assert counts["relaxed"] > 0 and counts["correction"] > 0


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_sources_change_no_token(temperature):
    engine = toy_engine(eos=True)
    params = SamplingParams(max_tokens=120, temperature=temperature, seed=9)
    outs = []
    for on in (False, True):
        deltas, stats = run(engine, SpecConfig(method="adasd", verification="threshold", token_sources=on), params)
        assert all((d.sources is not None) == on for d in deltas)
        outs.append(([t for d in deltas for t in d.token_ids], "".join(d.text for d in deltas),
                     [d.finish_reason for d in deltas], stats.rounds, stats.accepted_relaxed))
    assert outs[0] == outs[1]


def test_eos_cuts_the_sources_with_the_tokens():
    engine = toy_engine(eos=True)
    for seed in range(20):
        deltas, stats = run(engine, SpecConfig(method="vanilla", k=6, token_sources=True),
                            SamplingParams(max_tokens=200, temperature=1.0, seed=seed))
        if deltas[-1].finish_reason == "stop":
            break
    assert deltas[-1].finish_reason == "stop"  # some seed reaches EOS (its probability is about 1/12 per token)
    last = deltas[-1]
    assert len(last.sources) == len(last.token_ids) and last.sources[-1].text == ""
    assert sum(len(d.sources) for d in deltas) == stats.generated_tokens


def test_speedup_of_the_last_round_is_the_requests(quick_engine):
    deltas, stats = run(quick_engine, SpecConfig(method="adasd", token_sources=True),
                        SamplingParams(max_tokens=24, ignore_eos=True), prompt=quick_engine.encode("def f(x):\n"))
    assert deltas[-1].round["estimated_speedup"] == pytest.approx(stats.estimated_speedup)
    assert all(d.round["estimated_speedup"] > 0 for d in deltas)


def test_token_texts_add_up_to_the_text_with_multibyte_characters(quick_engine):
    """Byte-level tokens split a character over several tokens: the token that completes it carries it."""
    text = "naïve café → 日本語 🎉 done"
    ids = quick_engine.encode(text)
    seq = quick_engine.new_sequence([ids[0]], SamplingParams(max_tokens=len(ids), ignore_eos=True),
                                    SpecConfig(method="ar", token_sources=True))
    pieces = []
    for t in ids[1:]:
        src = _token_sources(None, Verdict(0, t, [], None, 0), 1)
        delta = seq.emit([t], None, src)
        assert delta.text == src[0].text
        pieces.append(src[0].text)
    assert "".join(pieces) == quick_engine.decode(ids[1:]) and "" in pieces  # some token ended mid-character
