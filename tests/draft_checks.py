"""Checks every kind of draft (a draft model, an EAGLE-3 head, a self-draft) must pass the same way."""

from __future__ import annotations

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
