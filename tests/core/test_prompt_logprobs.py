"""Prompt scoring (SamplingParams.prompt_logprobs): the prompt's log-probabilities are the target's
own (transformers' forward), alone, in a batch with running generations, and across chunks."""

import math

import torch

from adasd_core.engine import SpecConfig
from adasd_core.sampling import SamplingParams
from adasd_core.sequence import PromptLogprobs

CODE = ("import os\nimport sys\n\n\nclass Config:\n    def __init__(self, path):\n        self.path = path\n"
        "        self.values = {}\n\n    def load(self):\n        with open(self.path) as f:\n"
        "            for line in f:\n                key, _, value = line.partition('=')\n"
        "                self.values[key.strip()] = value.strip()\n")


def prompts(engine, lengths):
    ids = engine.encode(CODE * 3)
    return [ids[7 * i : 7 * i + n] for i, n in enumerate(lengths)]


@torch.inference_mode()
def reference(engine, ids, top_n):
    """transformers' forward over the whole prompt: (logprob of token i+1, top-N ids, top-N values) per position."""
    logits = engine.pair.target(input_ids=torch.tensor([ids])).logits[0, :, : engine.pair.vocab_size].float()
    logp = torch.log_softmax(logits, dim=-1)
    chosen = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist()
    vals, top = logp.topk(top_n, dim=-1)
    return chosen, top.tolist(), vals.tolist()


def check_scores(engine, ids, entries, top_n):
    assert [e.token_id for e in entries] == ids
    assert entries[0].logprob is None and entries[0].top is None  # nothing predicts the first token
    chosen, top, vals = reference(engine, ids, top_n)
    for i, e in enumerate(entries[1:]):
        assert math.isclose(e.logprob, chosen[i], abs_tol=1e-4), (i, e.logprob, chosen[i])
        assert [t for t, _ in e.top] == top[i]
        assert all(math.isclose(v, r, abs_tol=1e-4) for (_, v), r in zip(e.top, vals[i]))


def test_scoring_a_prompt_gives_the_targets_log_probabilities(quick_engine):
    for ids in prompts(quick_engine, [40, 100, 2]):
        out = quick_engine.generate(ids, SamplingParams(max_tokens=0, prompt_logprobs=3), SpecConfig(method="adasd"))
        check_scores(quick_engine, ids, out.prompt_logprobs, 3)
        assert out.token_ids == [] and out.text == "" and out.finish_reason == "length"
        assert out.stats.draft_forwards == 0  # the target alone
    one = quick_engine.generate(ids[:1], SamplingParams(max_tokens=0, prompt_logprobs=1))
    assert len(one.prompt_logprobs) == 1 and one.prompt_logprobs[0].logprob is None


def test_scoring_then_generating_gives_what_generating_alone_does(quick_engine):
    ids = prompts(quick_engine, [50])[0]
    params = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=2)
    for spec in (SpecConfig(method="ar"), SpecConfig(method="vanilla", k=4)):
        alone = quick_engine.generate(ids, params, spec)
        out = quick_engine.generate(ids, SamplingParams(max_tokens=12, ignore_eos=True, logprobs=2, prompt_logprobs=2),
                                    spec)
        check_scores(quick_engine, ids, out.prompt_logprobs, 2)
        assert out.token_ids == alone.token_ids and out.text == alone.text
        # to the last bits only: `alone` may start from cached prompt blocks that another batch computed
        assert all(math.isclose(a.logprob, b.logprob, abs_tol=1e-5) for a, b in zip(out.logprobs, alone.logprobs))
        assert len(out.logprobs) == len(alone.logprobs) == 12


def test_prompts_longer_than_a_chunk_are_scored_in_the_batch_with_running_generations(quick_engine, monkeypatch):
    engine = quick_engine
    # prompt tokens per step: every prompt below takes chunks
    monkeypatch.setattr(engine.scheduler, "prefill_budget", 16)
    gen_ids, *score_ids = prompts(engine, [30, 110, 70, 45])
    greedy = SamplingParams(max_tokens=24, ignore_eos=True)
    alone = engine.generate(gen_ids, greedy, SpecConfig(method="vanilla", k=3)).token_ids
    then_gen = engine.generate(score_ids[2], SamplingParams(max_tokens=8, ignore_eos=True), SpecConfig(method="ar"))

    seqs = [engine.new_sequence(gen_ids, greedy, SpecConfig(method="vanilla", k=3))]
    seqs += [engine.new_sequence(ids, SamplingParams(max_tokens=0, prompt_logprobs=2)) for ids in score_ids[:2]]
    seqs.append(engine.new_sequence(score_ids[2], SamplingParams(max_tokens=8, ignore_eos=True, prompt_logprobs=2),
                                    SpecConfig(method="ar")))
    for s in seqs:
        engine.add(s)
    tokens, scores, steps = {id(s): [] for s in seqs}, {}, 0
    while not engine.idle:
        steps += 1
        for seq, event in engine.step():
            assert not isinstance(event, Exception), event
            if isinstance(event, PromptLogprobs):
                assert id(seq) not in scores and not tokens[id(seq)]  # once, before any generated token
                scores[id(seq)] = event.logprobs
            else:
                tokens[id(seq)].extend(event.token_ids)
    assert engine.free_slots == engine.slots and all(o is None for o in engine.scheduler.owner)

    assert tokens[id(seqs[0])] == alone  # the generation ran alongside, unchanged
    assert id(seqs[0]) not in scores
    for seq, ids in zip(seqs[1:], score_ids):
        check_scores(engine, ids, scores[id(seq)], 2)
        assert seq.stats.target_forwards >= math.ceil((len(ids) - 1) / 16)  # chunked
        assert seq.stats.draft_forwards == 0
    assert tokens[id(seqs[3])] == then_gen.token_ids
    assert steps >= math.ceil(sum(len(ids) - 1 for ids in score_ids) / 16)  # the budget bounds each step
