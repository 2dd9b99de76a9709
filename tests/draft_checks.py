"""Checks every kind of draft (a draft model, an EAGLE-3 head, a self-draft) must pass the same way."""

from __future__ import annotations

import torch

from adasd_core.engine import SpecConfig
from adasd_core.sampling import SamplingParams

LOSSLESS = [SpecConfig(method="vanilla", k=5), SpecConfig(method="vanilla", k=1), SpecConfig(method="gen-only"),
            SpecConfig(method="adasd", verification="none"), SpecConfig(method="hybrid", verification="none")]


def check_mixed_batch_matches_alone(engine) -> None:
    """Requests of every lossless method (and ar) run together give each one's tokens alone, every slot
    is freed after, and the relaxed checks run on the draft's distributions."""
    specs = [SpecConfig(method="ar"), *LOSSLESS]
    prompts = ["the king", "once upon a time the", "and", "she said that the old man had", "it was", "we"]
    requests = [(p, SamplingParams(max_tokens=20 + 5 * (i % 3), ignore_eos=True), specs[i % len(specs)])
                for i, p in enumerate(prompts)]
    alone = [engine.generate(*r).token_ids for r in requests]
    together = engine.run_together([engine.new_sequence(p, params, spec) for p, params, spec in requests])
    assert together == alone
    assert engine.free_slots == engine.slots
    for verification in ("bayes", "threshold"):
        out = engine.generate("the king", SamplingParams(max_tokens=30, ignore_eos=True),
                              SpecConfig(method="adasd", verification=verification))
        assert len(out.token_ids) == 30 and out.stats.drafted_tokens > 0


def small_target(vocab: int, seed: int):
    """A 2-layer random Llama over `vocab` tokens whose distributions are far from uniform, so that a
    wrong sampler shows in a chi-square test."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model.requires_grad_(False)


def check_sampling_keeps_target_distribution(target, draft, tokenizer, n: int = 3000, temperature: float = 1.0):
    """Chi-square over every 3-token continuation of [1, 3]: vanilla and adasd (lossless) with `draft`,
    8 requests at a time, sample `target`'s own distribution. Returns (engine, counts per continuation,
    the requests' statistics)."""
    from collections import Counter
    from itertools import product

    from scipy.stats import chisquare

    from adasd_core.llm import LLM
    from adasd_core.models import ModelPair

    v = target.config.vocab_size
    pair = ModelPair(target=target, draft=draft, tokenizer=tokenizer, device=torch.device("cpu"),
                     dtype=torch.float32, context_length=64, vocab_size=v)
    engine = LLM(pair, calibrate=False, max_running=8)
    prompt = [1, 3]
    specs = [SpecConfig(method="vanilla", k=2), SpecConfig(method="adasd", verification="none")]
    counts, stats = Counter(), []
    for i in range(0, n, 8):
        seqs = [engine.new_sequence(prompt, SamplingParams(max_tokens=3, temperature=temperature, seed=s,
                                                           ignore_eos=True), specs[s % 2]) for s in range(i, i + 8)]
        counts.update(tuple(t) for t in engine.run_together(seqs))
        stats.extend(s.stats for s in seqs)
    cells = list(product(range(v), repeat=3))
    probs = []
    with torch.no_grad():
        for c in cells:
            lp = torch.log_softmax(target(torch.tensor([prompt + list(c)])).logits[0].float() / temperature, -1)
            probs.append(float(sum(lp[len(prompt) - 1 + j, c[j]] for j in range(3)).exp()))
    total = sum(probs)
    assert abs(total - 1) < 1e-4
    assert chisquare([counts[c] for c in cells], [n * p / total for p in probs]).pvalue > 1e-3
    return engine, counts, stats
