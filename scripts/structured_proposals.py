"""Where a structured pass's draft proposals are accepted, by the grammar's mask sizes: greedy schema
requests in process on the default pair (the batch plan on, as the server runs), every proposal the target
scored grouped by the mask at its position and at the one before it (forced: one token; a few: up to 64;
some: up to 4,096; free: more), with its acceptance and mean draft entropy. Whether a stop rule could
read the grammar before paying a draft step (docs/structured-outputs.md):

    python scripts/structured_proposals.py ["another prompt" ...]
"""

from __future__ import annotations

import collections
import json
import sys

import torch
from structured_speed import PROMPTS, SCHEMA, prompt_ids

from adasd_core.engine import SpecConfig, SpeculativeEngine
from adasd_core.grammar import GrammarSpec, unpack_bitmask
from adasd_core.llm import LLM
from adasd_core.models import load_pair
from adasd_core.sampling import SamplingParams


def allowed(mask: torch.Tensor) -> int:
    return int(unpack_bitmask(mask[None], mask.numel() * 32).sum())


def size(n: int) -> str:
    return "forced" if n == 1 else "a few" if n <= 64 else "some" if n <= 4096 else "free"


def main() -> None:
    torch.set_num_threads(2)
    llm = LLM(load_pair(), batch_aware=True)
    tok = llm.pair.tokenizer
    groups = collections.defaultdict(lambda: [0, 0, 0.0])  # proposals, accepted, entropy summed
    round_batch = SpeculativeEngine._round_batch

    def traced(engine, seqs):
        before = {s: len(s.tokens) for s in seqs}
        seen = {}
        propose = engine.proposer.propose

        def proposing(ss, caps):
            start = {}
            for s in ss:  # the mask before the first proposal: the last forced token's, or the last token's
                c = s.constraint
                if s.forced:
                    start[s] = 1
                else:
                    c.rollback(1)
                    start[s] = allowed(c.mask())
                    c.consume(s.tokens[-1])
            forced = {s: len(s.forced) for s in ss}
            drafts = propose(ss, caps)
            seen.update({s: (drafts[s], start[s], forced[s]) for s in drafts})
            return drafts

        engine.proposer.propose = proposing
        try:
            events = round_batch(engine, seqs)
        finally:
            engine.proposer.propose = propose
        for s, (d, start, forced) in seen.items():
            new = s.tokens[before[s] + forced:]
            accepted = 0
            while accepted < min(len(d.ids), len(new)) and new[accepted] == d.ids[accepted]:
                accepted += 1
            sizes = [allowed(m) for m in d.masks]
            for i, (n, prev) in enumerate(zip(sizes, [start] + sizes[:-1])):
                if i in d.forced or i > accepted:  # the grammar's own tokens; candidates after the rejection
                    continue
                g = groups[(size(prev), size(n))]
                g[0] += 1
                g[1] += i < accepted
                g[2] += d.entropies[i]
        return events

    SpeculativeEngine._round_batch = traced
    grammar = GrammarSpec("json_schema", json.dumps(SCHEMA))
    for prompt in PROMPTS + sys.argv[1:]:
        llm.generate(prompt_ids(tok, prompt), SamplingParams(max_tokens=160, grammar=grammar),
                     SpecConfig(method="adasd"))
    total = [sum(g[i] for g in groups.values()) for i in (0, 1)]
    print(f"{total[0]} proposals scored, {total[1]} accepted ({total[1] / total[0]:.2f})")
    print(f"{'mask before -> here':24s} {'proposals':>9s} {'accepted':>9s} {'entropy':>8s}")
    for (prev, n), (count, acc, h) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
        print(f"{prev + ' -> ' + n:24s} {count:9d} {acc / count:9.2f} {h / count:8.2f}")


if __name__ == "__main__":
    main()
