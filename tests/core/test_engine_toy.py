"""The round loop on Markov-chain models with hand-built logits: exact tokens, exact
distributions, forward counts and cache contents."""

from collections import Counter

import pytest
import torch
from scipy.stats import chisquare
from toy import markov_pair, random_tables, sequence_probability

from adasd_core.engine import SpecConfig
from adasd_core.errors import ContextLengthError, InvalidRequestError
from adasd_core.llm import LLM
from adasd_core.sampling import SamplingParams

V = 5


def engine_for(target, draft, **kw) -> LLM:
    return LLM(markov_pair(target, draft, **kw), calibrate=False)


def cycle_table(v: int, strength: float = 10.0) -> torch.Tensor:
    """Token i is followed by i+1 (mod v-1 when the last id is EOS)."""
    t = torch.zeros(v, v)
    for i in range(v):
        t[i, (i + 1) % v] = strength
    return t


def cyclic_pair(seed: int, v: int = 8):
    """Greedy target walks an 8-cycle; the draft agrees except on a few rows."""
    target, _ = random_tables(v, seed)
    perm = torch.randperm(v, generator=torch.Generator().manual_seed(seed)).tolist()
    for a, b in zip(perm, perm[1:] + perm[:1]):
        target[a, b] += 20.0
    draft = target.clone()
    for row in perm[::3]:
        draft[row, (row + 3) % v] += 40.0
    return target, draft


@pytest.mark.parametrize("method", ["vanilla", "gen-only", "verify-only", "adasd", "hybrid"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_matches_target_alone(method, seed):
    target, draft = cyclic_pair(seed)
    eng = engine_for(target, draft)
    verification = "none" if method in ("verify-only", "adasd", "hybrid") else "bayes"
    ref = eng.generate([0, 3], SamplingParams(max_tokens=40), SpecConfig(method="ar"))
    out = eng.generate([0, 3], SamplingParams(max_tokens=40), SpecConfig(method=method, verification=verification))
    assert out.token_ids == ref.token_ids
    assert 0 < out.stats.acceptance_rate < 1  # the draft disagrees sometimes: the test exercises rejections


def _sample_counts(eng, spec, n, temperature, length=3):
    counts = Counter()
    for seed in range(n):
        out = eng.generate([0], SamplingParams(max_tokens=length, temperature=temperature, seed=seed), spec)
        counts[tuple(out.token_ids)] += 1
    return counts


def _chi2_pvalue(counts, table, n, temperature, length):
    """Chi-square of the sampled sequences against the exact chain: the joint distribution of
    tokens 1-2 and that of tokens 2-3 (length 3: where vanilla k=2's bonus token lands); the
    smaller p-value."""
    import itertools

    seqs = list(itertools.product(range(V), repeat=length))
    exact = {seq: sequence_probability(table, 0, list(seq), temperature) for seq in seqs}
    pvalues = []
    for lo in range(length - 1):
        cells = list(itertools.product(range(V), repeat=2))
        expected = [n * sum(p for seq, p in exact.items() if seq[lo : lo + 2] == c) for c in cells]
        observed = [sum(v for k, v in counts.items() if k[lo : lo + 2] == c) for c in cells]
        pvalues.append(chisquare(observed, expected).pvalue)
    return min(pvalues)


@pytest.mark.parametrize(
    "spec",
    [SpecConfig(method="vanilla", k=2), SpecConfig(method="adasd", verification="none"), SpecConfig(method="gen-only"),
     SpecConfig(method="hybrid", k=2, verification="none")],
    ids=["vanilla", "adasd-relaxed-off", "gen-only", "hybrid-relaxed-off"],
)
def test_sampling_reproduces_target_distribution(spec):
    target, draft = random_tables(V, seed=7, sharpness=1.0)
    eng = engine_for(target, draft)
    n, temperature = 4000, 0.9
    counts = _sample_counts(eng, spec, n, temperature)
    assert _chi2_pvalue(counts, target, n, temperature, 3) > 1e-3
    # power check: the same test rejects the draft's own distribution
    assert _chi2_pvalue(counts, draft, n, temperature, 3) < 1e-6


def test_seeded_sampling_is_reproducible():
    target, draft = random_tables(8, seed=3, sharpness=1.0)
    eng = engine_for(target, draft)
    spec = SpecConfig(method="adasd", verification="bayes")
    a = eng.generate([1], SamplingParams(max_tokens=30, temperature=1.0, seed=42), spec)
    b = eng.generate([1], SamplingParams(max_tokens=30, temperature=1.0, seed=42), spec)
    c = eng.generate([1], SamplingParams(max_tokens=30, temperature=1.0, seed=43), spec)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_forward_counts_and_no_prefix_rerun():
    target, draft = random_tables(8, seed=4)
    eng = engine_for(target, draft)
    prompt = [1, 2, 3, 4, 5]
    out = eng.generate(prompt, SamplingParams(max_tokens=30), SpecConfig(method="vanilla", k=4))
    s = out.stats
    assert s.target_forwards == s.rounds + 1  # prefill + one per round
    assert s.draft_forwards == s.drafted_tokens + 1  # prefill + one per candidate
    target_calls = eng.pair.target.calls
    assert target_calls[0] == len(prompt) - 1  # the prefill feeds all but the prompt's last token
    # every round feeds the last token plus its candidates, never the prefix again
    assert sum(target_calls[1:]) == s.rounds + s.drafted_tokens


def test_kv_rollback_holds_exactly_the_accepted_prefix():
    target, draft = random_tables(8, seed=5)
    eng = engine_for(target, draft)
    gen = eng.start([0, 1, 2], SamplingParams(max_tokens=60), SpecConfig(method="vanilla", k=5))
    saw_rejection = False
    while not gen.finished:
        before = gen.stats.drafted_tokens - gen.stats.accepted_tokens
        gen.step()
        saw_rejection |= gen.stats.drafted_tokens - gen.stats.accepted_tokens > before
        if gen.finished:
            break
        slot = gen.seq.slot
        tkeys = eng.runner.target.caches[slot].layers[0].keys.flatten().long().tolist()
        dkeys = eng.runner.draft.caches[slot].layers[0].keys.flatten().long().tolist()
        assert tkeys == gen.tokens[:-1]  # everything but the newest token
        assert dkeys == gen.tokens[: len(dkeys)] and len(dkeys) >= len(gen.tokens) - 2
    assert saw_rejection


def test_max_tokens_one():
    target, draft = random_tables(8, seed=6)
    eng = engine_for(target, draft)
    out = eng.generate([0, 1], SamplingParams(max_tokens=1), SpecConfig(method="adasd"))
    assert len(out.token_ids) == 1 and out.finish_reason == "length"
    assert out.stats.drafted_tokens == 0 and out.stats.target_forwards == 2  # the prefill, then one plain step


def test_eos_inside_a_draft_ends_the_generation():
    v = 6
    table = cycle_table(v)  # 0 -> 1 -> ... -> 5 (EOS)
    eng = engine_for(table, table.clone(), eos=True)
    out = eng.generate([1], SamplingParams(max_tokens=20), SpecConfig(method="vanilla", k=10))
    assert out.token_ids == [2, 3, 4, 5]
    assert out.finish_reason == "stop" and out.text == "cde"
    assert out.stats.rounds == 1  # the draft stopped at EOS and the target accepted it in the same round


def test_stop_string_across_a_round_boundary():
    table = cycle_table(V)  # a -> b -> c -> d -> e -> a
    eng = engine_for(table, table.clone())
    gen = eng.start([0], SamplingParams(max_tokens=30, stop=["dea"]), SpecConfig(method="vanilla", k=2))
    first = gen.step()  # emits b c d, but "d" could start the stop string: it is held back
    assert first.token_ids == [1, 2, 3] and first.text == "bc"
    second = gen.step()
    assert second.finish_reason == "stop" and second.text == ""
    full = eng.generate([0], SamplingParams(max_tokens=30, stop=["dea"]), SpecConfig(method="vanilla", k=2))
    assert full.text == "bc" and full.finish_reason == "stop"


def test_context_limit_and_empty_prompt():
    target, draft = random_tables(8, seed=8)
    eng = engine_for(target, draft, context=8)
    with pytest.raises(ContextLengthError, match="context is 8 tokens"):
        eng.start([1] * 8, SamplingParams(max_tokens=1))
    out = eng.generate([1] * 6, SamplingParams(max_tokens=10), SpecConfig(method="adasd"))
    assert len(out.token_ids) == 2 and out.finish_reason == "length"
    with pytest.raises(InvalidRequestError, match="empty"):
        eng.start([], SamplingParams())
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        eng.start([99], SamplingParams())


def test_relaxed_check_accepts_some_rejections_greedy():
    target, draft = random_tables(8, seed=2, sharpness=0.7)
    eng = engine_for(target, draft)
    ref = eng.generate([0], SamplingParams(max_tokens=200), SpecConfig(method="ar"))
    out = eng.generate([0], SamplingParams(max_tokens=200), SpecConfig(method="adasd", verification="threshold"))
    assert out.stats.accepted_relaxed > 0
    assert out.stats.js_threshold is not None and 0 < out.stats.js_threshold < 1
    assert out.token_ids != ref.token_ids  # lossy by design
