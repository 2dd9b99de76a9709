"""LLM.kv_tokens(): the tokens resident in the target's and the draft's KV pools
(what the server's adasd_kv_cache_tokens_perc reports), by the cache invariant of a round."""

from __future__ import annotations

from toy import markov_pair, random_tables

from adasd_core.engine import SpecConfig
from adasd_core.llm import LLM
from adasd_core.sampling import SamplingParams


def test_kv_tokens_follow_the_sequences_and_return_to_zero():
    target, draft = random_tables(6, 0)
    engine = LLM(markov_pair(target, draft), calibrate=False, max_running=2)
    assert engine.kv_tokens() == (0, 0)
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=3, ignore_eos=True)
    seqs = [engine.new_sequence([1, 2, 3, 4, 5], params, SpecConfig(method="adasd")),
            engine.new_sequence([2, 3], params, SpecConfig(method="ar"))]
    for seq in seqs:
        engine.add(seq)
    engine.step()
    most_draft = 0
    while not all(s.finished for s in seqs):
        running = [s for s in seqs if not s.finished]
        target_tokens, draft_tokens = engine.kv_tokens()
        # a slot holds every token of its sequence but the last; the draft's holds a prefix of that
        assert target_tokens == sum(len(s.tokens) - 1 for s in running)
        assert 0 <= draft_tokens <= target_tokens
        most_draft = max(most_draft, draft_tokens)
        engine.step()
    assert most_draft > 0, "the adasd sequence drafted: its draft slot held tokens"
    assert engine.kv_tokens() == (0, 0)
