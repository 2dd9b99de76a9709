"""The paged KV cache (kv_cache.Blocks, kv_cache.LeanPool): blocks follow the tokens, a prefix seen before is
reused, and a pool too small for its requests preempts and recomputes instead of failing; tokens never change."""

from __future__ import annotations

import pytest
import torch
from draft_checks import LOSSLESS

from adasd_core.engine import SpecConfig
from adasd_core.kv_cache import Blocks, OutOfBlocks
from adasd_core.llm import LLM
from adasd_core.models import load_pair
from adasd_core.sampling import SamplingParams

SYSTEM = "you are a helpful assistant who answers in a few words and never repeats the question back to the user. "
QUESTIONS = ["the king said", "once upon a time", "and then she", "what is the name of the"]


@pytest.fixture(scope="module")
def pair(quick_pair_dir):
    return load_pair(str(quick_pair_dir / "target"), str(quick_pair_dir / "draft"), device="cpu")


@pytest.fixture(scope="module")
def tiny():
    return load_pair("tiny", "tiny", device="cpu")  # 512 positions: room to outgrow what admission reserved


def _blocks(n: int = 8, size: int = 4) -> Blocks:
    b = Blocks(n, size, slots=3)
    b.copy = lambda src, dst: b.copies.append((src, dst))
    b.copies = []
    return b


# ---------------------------------------------------------------------------- the tables


def test_blocks_are_taken_as_positions_are_written_and_whole_ones_go_back():
    b = _blocks()
    b.grow(0, [1, 2, 3, 4, 5])
    assert b.tables[0] == [0, 1] and b.used == 2
    b.grow(1, [9])
    b.grow(0, [6, 7, 8, 9])  # interleaved growth: slot 0's third block is not next to its second
    assert b.tables[0] == [0, 1, 3] and b.tables[1] == [2]
    b.truncate(0, 6)  # a rejection: the block past position 8 goes back, the partial one stays
    assert b.tables[0] == [0, 1] and b.tokens[0] == [1, 2, 3, 4, 5, 6] and b.available == 8 - 3
    assert b.needed(0, 8) == 0 and b.needed(0, 9) == 1 and b.needed(2, 1) == 1
    b.grow(2, list(range(20)))
    with pytest.raises(OutOfBlocks):
        b.grow(2, list(range(20)))


def test_final_blocks_are_reused_by_a_later_sequence_with_the_same_prefix():
    b = _blocks()
    prompt = [5, 6, 7, 8, 1, 2, 3, 4, 9, 9]
    b.grow(0, prompt)
    b.commit(0, 9)  # 9 final positions: two full blocks keyed
    b.release(0)
    assert b.used == 0 and len(b.idle) == 2  # free, but still holding the prefix
    assert b.match(1, prompt, limit=9) == 8 and b.tables[1] == [0, 1] and b.hits == 8 and b.queries == 9
    assert b.match(2, [5, 6, 7, 8, 0, 2, 3, 4], limit=7) == 4  # the second block differs: the first is shared
    assert b.refs[0] == 2 and b.tables[2] == [0]
    # the same tokens after another prefix are another block
    b.grow(2, [1, 2, 3, 4])
    b.commit(2, 8)
    assert b.match(0, [1, 2, 3, 4, 9], limit=4) == 0


def test_cached_blocks_are_evicted_least_recently_released_first_and_only_when_nothing_else_is_free():
    b = _blocks(n=4)
    for slot, first in ((0, 10), (1, 20)):
        b.grow(slot, [first] * 4)
        b.commit(slot, 4)
    b.release(0)  # released first: evicted first
    b.release(1)
    b.grow(2, [1] * 8)  # the two never-keyed blocks
    assert sorted(b.tables[2]) == [2, 3] and len(b.idle) == 2
    b.grow(2, [1])
    assert b.tables[2][-1] == 0 and len(b.idle) == 1  # slot 0's prefix is gone, slot 1's stays
    assert b.match(0, [20] * 4 + [0], limit=4) == 4 and b.match(1, [10] * 4 + [0], limit=4) == 0


def test_cutting_into_a_shared_block_writes_a_copy_and_an_unshared_one_leaves_the_cache():
    b = _blocks()
    b.grow(0, [1, 2, 3, 4, 5, 6, 7, 8])
    b.commit(0, 8)
    assert b.match(1, [1, 2, 3, 4, 5, 6, 7, 8, 0], limit=8) == 8
    b.truncate(1, 6)  # slot 1 will write positions 6.. of a block slot 0 still reads
    assert b.tables[1][1] != b.tables[0][1] and b.copies == [(b.tables[0][1], b.tables[1][1])]
    b.truncate(0, 6)  # slot 0 alone holds its block now: it is no longer a cached prefix
    b.release(0)
    b.release(1)
    assert b.match(2, [1, 2, 3, 4, 5, 6, 7, 8, 0], limit=8) == 4


# ---------------------------------------------------------------------------- the engine


def _requests(tokenizer, n_tokens: int = 16):
    specs = [SpecConfig(method="ar"), *LOSSLESS]
    return [(SYSTEM + q, SamplingParams(max_tokens=n_tokens, ignore_eos=True), specs[i % len(specs)])
            for i, q in enumerate(QUESTIONS * 2)]


def test_greedy_tokens_are_the_same_with_prefix_caching_on_and_off_and_a_shared_prefix_skips_its_prefill(pair):
    requests = _requests(pair.tokenizer)
    off = LLM(pair, calibrate=False, max_running=4, prefix_caching=False)
    on = LLM(pair, calibrate=False, max_running=4)
    expected = [off.generate(*r).token_ids for r in requests]
    forwards = []
    for r, want in zip(requests, expected):
        out = on.generate(*r)
        assert out.token_ids == want
        forwards.append(out.stats.target_forwards - out.stats.generated_tokens)
    report = on.kv_report()
    prompt = len(on.new_sequence(requests[0][0]).prompt_ids)
    assert report["prefix_hits"] >= (len(requests) - 1) * (len(pair.tokenizer(SYSTEM)["input_ids"]) // 16) * 16
    assert report["prefix_queries"] == sum(len(on.new_sequence(p).prompt_ids) - 1 for p, _, _ in requests)
    assert off.kv_report()["prefix_hits"] == 0 and prompt > 32
    # together, with the cache warm: still each one's tokens alone
    assert on.run_together([on.new_sequence(*r) for r in requests]) == expected
    assert on.free_slots == on.slots and on.kv_report()["blocks_used"] == 0


def test_a_pool_too_small_for_its_requests_preempts_and_every_request_gets_its_own_tokens(tiny):
    pair = tiny
    requests = _requests(pair.tokenizer, n_tokens=100)
    alone = LLM(pair, calibrate=False, max_running=1)
    expected = [alone.generate(*r).token_ids for r in requests]
    prompt = len(alone.new_sequence(requests[0][0]).prompt_ids)
    # room for three of the eight at their full length: more are admitted than can finish together
    blocks = 3 * -(-(prompt + 100) // 16)
    for caching in (True, False):
        small = LLM(pair, calibrate=False, max_running=8, kv_blocks=blocks, prefix_caching=caching)
        assert small.run_together([small.new_sequence(*r) for r in requests]) == expected
        report = small.kv_report()
        assert report["preemptions"] > 0 and report["blocks_used"] == 0 and small.free_slots == small.slots


def test_blocks_in_use_follow_the_tokens_not_the_context_length(tiny):
    engine = LLM(tiny, calibrate=False, max_running=4, prefix_caching=False)
    per_seq = -(-engine.runner.target.capacity // 16)
    assert engine.kv_blocks == 4 * per_seq  # by default: what four full-length sequences would hold
    seqs = [engine.new_sequence(SYSTEM + q, SamplingParams(max_tokens=30, ignore_eos=True)) for q in QUESTIONS]
    for s in seqs:
        engine.add(s)
    peak = 0
    while not engine.idle:
        engine.step()
        report = engine.kv_report()
        held = sum(-(-engine.runner.target.length(s.slot) // 16) for s in seqs if s.slot >= 0)
        assert report["blocks_used"] == held
        peak = max(peak, report["blocks_used"])
    longest = max(len(s.tokens) for s in seqs)
    assert 0 < peak <= 4 * -(-longest // 16) < engine.kv_blocks / 5


def test_prompt_scores_are_exact_with_the_prompt_in_the_cache(pair):
    engine = LLM(pair, calibrate=False, max_running=2)
    prompt = SYSTEM + QUESTIONS[0]
    scored = SamplingParams(max_tokens=0, prompt_logprobs=2)
    cold = engine.generate(prompt, scored).prompt_logprobs
    engine.generate(prompt, SamplingParams(max_tokens=4))  # now the prompt's blocks are cached
    assert engine.kv_report()["prefix_hits"] > 0
    warm = engine.generate(prompt, scored).prompt_logprobs
    assert [(e.token_id, e.logprob, e.top) for e in warm] == [(e.token_id, e.logprob, e.top) for e in cold]


def test_a_self_draft_shares_the_targets_blocks_through_preemption():
    pair = load_pair("tiny", "self:int8", device="cpu")
    requests = [(p, SamplingParams(max_tokens=90, ignore_eos=True), SpecConfig(method="vanilla", k=4))
                for p in ("the king", "once upon a time the", "and", "she said that the old man had")]
    alone = LLM(pair, calibrate=False, max_running=1)
    expected = [alone.generate(*r).token_ids for r in requests]
    small = LLM(pair, calibrate=False, max_running=4, kv_blocks=2 * -(-(10 + 90) // 16))
    assert small.run_together([small.new_sequence(*r) for r in requests]) == expected
    assert small.kv_report()["preemptions"] > 0
    assert small.runner.draft.blocks is small.runner.target.blocks


def test_the_pools_memory_is_resident_only_where_blocks_were_written():
    from adasd_core.kv_cache import _zeros

    def resident() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    before = resident()
    buf = _zeros((64, 1024, 1024), dtype=torch.float32, device=torch.device("cpu"))  # 256 MiB mapped
    buf[3, 5, 7] = 1.0
    assert resident() - before < 16 * 2**20
    buf[:8] = 2.0  # 32 MiB written
    assert 32 * 2**20 <= resident() - before < 48 * 2**20
    assert buf[8:16].abs().sum() == 0 and buf[3, 5, 7] == 2.0



def test_a_prefill_chunk_runs_no_lm_head_and_the_tokens_are_as_with_its_logits_computed(tiny, monkeypatch):
    from adasd_core import lean

    requests = [(p, SamplingParams(max_tokens=12, ignore_eos=True), SpecConfig(method="vanilla", k=3))
                for p in ("once upon a time the old king", "and she said that")]
    heads = []
    real_head, real_forward = lean.LeanModel.logits, lean.forward
    monkeypatch.setattr(lean.LeanModel, "logits", lambda self, x: heads.append(x.shape[0]) or real_head(self, x))

    def run(force_logits: bool) -> tuple[list, int]:
        monkeypatch.setattr(lean, "forward", lambda *a, **kw: real_forward(*a, **{**kw, "want_logits": True})
                            if force_logits else real_forward(*a, **kw))
        heads.clear()
        llm = LLM(tiny, calibrate=False, max_running=2)
        if not force_logits:
            assert llm.runner.target.forward([0], [[5, 6, 7]], want_logits=False) is None and heads == []
            llm.runner.target.rollback(0, 0)
        return llm.run_together([llm.new_sequence(*r) for r in requests]), len(heads)

    got, heads_now = run(False)
    before, heads_before = run(True)  # every chunk's last row through the head, then dropped
    assert got == before
    # the prompts' chunk on the target and on the draft (one batched forward each): heads that no longer run
    assert heads_before >= heads_now + 2
