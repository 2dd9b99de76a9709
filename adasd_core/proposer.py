"""Proposers: where a round's candidates come from.

A proposer turns a batch of sequences and their caps into each sequence's Draft (candidate ids,
the draft's processed distribution at each, its entropy). `DraftModelProposer` runs a draft model
over the runner's draft pool; a sequence stops at its cap, at EOS, or when its policy says so
(fixed K, AdaSD's entropy threshold T_G, the hybrid cap), while the others go on. A sequence with a
grammar drafts under its mask (the draft's logits processed as the target's will be:
logits_processors.py) and its matcher takes each candidate; it stops where the grammar is complete
or dead-ends.
"""

from __future__ import annotations

import torch

from adasd_core.logits_processors import Rows, process_logits
from adasd_core.round_output import Draft
from adasd_core.runner import ModelRunner
from adasd_core.sampling import logits_to_probs_rows, sample_rows
from adasd_core.sequence import Sequence
from adasd_core.verification import entropy


class DraftModelProposer:
    """Batched draft steps, one per draft position, over the sequences still drafting."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner

    def propose(self, seqs: list[Sequence], caps: list[int]) -> dict[Sequence, Draft]:
        out = {s: Draft([], [], [], [] if s.constraint is not None else None) for s in seqs}
        active = list(zip(seqs, caps))
        # the draft slot may lag; the round's forced tokens go in with the first step
        feeds = [s.tokens[self.runner.draft_length(s.slot):] + s.forced for s in seqs]
        while active:
            logits = self.runner.draft_step([s.slot for s, _ in active], feeds)
            params = [s.params for s, _ in active]
            # only the rows a grammar or a control changes (an unconstrained batch builds nothing)
            runs = [Rows(s, i, s.forced + out[s].ids, [len(s.forced) + len(out[s].ids)],
                         [s.constraint.mask()] if s.constraint is not None else None)
                    for i, (s, _) in enumerate(active) if s.constraint is not None or s.params.controls]
            if runs:
                logits = process_logits(logits, runs, draft=True)
            masks = {r.seq: r.masks[0] for r in runs if r.masks}
            q = logits_to_probs_rows(logits, params)  # [A, V]
            x = sample_rows(q, params, [s.generator for s, _ in active])
            vals = torch.stack([x.to(q.dtype), entropy(q)]).tolist()  # one host sync per draft step
            still = []
            for i, (seq, cap) in enumerate(active):
                token, h = int(vals[0][i]), vals[1][i]
                d = out[seq]
                d.ids.append(token)
                d.probs.append(q[i])
                d.entropies.append(h)
                seq.stats.draft_forwards += 1
                if d.masks is not None:
                    d.masks.append(masks[seq])
                    seq.constraint.consume(token)
                if token not in seq.eos and len(d.ids) < cap and seq.policy.keep_drafting(h, len(d.ids)) and \
                        (seq.constraint is None or seq.constraint.viable_mask() is not None):
                    still.append((seq, cap))
            active = still
            feeds = [[out[s].ids[-1]] for s, _ in active]
        return out

