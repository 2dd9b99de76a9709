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

from adasd_core.drafting import WINDOW
from adasd_core.logits_processors import Rows, process_logits
from adasd_core.round_output import Draft
from adasd_core.runner import ModelRunner
from adasd_core.sampling import logits_to_probs_rows, sample_rows
from adasd_core.sequence import Sequence
from adasd_core.verification import entropy


class DraftModelProposer:
    """Batched draft steps, one per draft position the grammar leaves open, over the sequences still drafting."""

    forced_runs = True  # a grammar's forced candidates go into the next step's feed, with no step of their own

    def __init__(self, runner: ModelRunner):
        self.runner = runner

    def _first_step(self, seqs: list[Sequence]) -> torch.Tensor:
        # the draft slot may lag; the round's forced tokens go in with the first step
        feeds = [s.tokens[self.runner.draft_length(s.slot):] + s.forced for s in seqs]
        return self.runner.draft_step([s.slot for s in seqs], feeds, alone=any(s.reproducible for s in seqs))

    def _next_step(self, seqs: list[Sequence], rows: list[int], last: list[list[int]]) -> torch.Tensor:
        """The step after one: seqs (rows[i] their row in the previous step) each fed its candidates since."""
        return self.runner.draft_step([s.slot for s in seqs], last, alone=any(s.reproducible for s in seqs))

    def _drafting(self, seqs: list[Sequence]) -> list[Sequence]:
        return seqs

    def _done(self, seqs: list[Sequence]) -> None:
        pass

    def propose(self, seqs: list[Sequence], caps: list[int]) -> dict[Sequence, Draft]:
        capped = dict(zip(seqs, caps))
        seqs = self._drafting(seqs)
        out = {s: Draft([], [], [], [] if s.constraint is not None else None) for s in seqs}
        active = [(s, capped[s]) for s in seqs]
        logits = self._first_step(seqs) if seqs else None
        while active:
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
            still, rows, feeds = [], [], []
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
                fed = len(d.ids) - 1
                if self._goes_on(seq, d, cap, token, h) and (d.masks is None or not self.forced_runs
                                                             or self._take_forced(seq, d, q[i])):
                    still.append((seq, cap))
                    rows.append(i)
                    feeds.append(d.ids[fed:])
            active = still
            if active:
                logits = self._next_step([s for s, _ in active], rows, feeds)
        self._done(seqs)
        return out

    @staticmethod
    def _room(seq: Sequence, d: Draft, token: int) -> bool:
        """Whether a candidate may follow `token`: not EOS, within what the request may still add and the
        round's hard cap, and a grammar that goes on."""
        return token not in seq.eos and len(d.ids) < min(seq.remaining - 1 - len(seq.forced), WINDOW) and \
            (seq.constraint is None or seq.constraint.viable_mask() is not None)

    def _goes_on(self, seq: Sequence, d: Draft, cap: int, token: int, h: float) -> bool:
        """Whether a sequence drafts on after its candidate `token` (entropy h): `cap` and the policy count
        draft steps (a grammar's forced candidates take none)."""
        steps = len(d.ids) - len(d.forced)
        return steps < cap and seq.policy.keep_drafting(h, steps) and self._room(seq, d, token)

    def _take_forced(self, seq: Sequence, d: Draft, row: torch.Tensor) -> bool:
        """The candidates the grammar forces next, each as a draft step would give it (its masked
        distribution one-hot, its entropy 0) but without the step: they go into the next step's feed
        together. Whether the sequence drafts on after them."""
        c = seq.constraint
        while (token := c.forced(mask := c.mask())) is not None:
            d.masks.append(mask)
            c.consume(token)
            d.forced.append(len(d.ids))
            d.ids.append(token)
            one_hot = torch.zeros_like(row)
            one_hot[token] = 1.0  # a scalar fill: no index tensor copied to the device
            d.probs.append(one_hot)
            d.entropies.append(0.0)
            if not self._room(seq, d, token):
                return False
        return True


class EagleProposer(DraftModelProposer):
    """Draft steps of an EAGLE-3 head (adasd_core.eagle): the first reads the target's states at every
    position the head has not seen (from the runner), the next ones the head's own output at the previous
    row. A sequence with forced tokens this round, or with no state to read yet, does not draft; after
    drafting, the head's slots keep only the positions that read the target's states."""

    forced_runs = False  # each step reads the head's output at the row before: one candidate per step

    def _drafting(self, seqs: list[Sequence]) -> list[Sequence]:
        return [s for s in seqs if not s.forced and self.runner.pending_states(s.slot) > 0]

    def _first_step(self, seqs: list[Sequence]) -> torch.Tensor:
        # position p reads the target's state there and the token after it: tokens draft_length + 1 ..
        feeds = [s.tokens[self.runner.draft_length(s.slot) + 1 :] for s in seqs]
        logits = self.runner.head_catch_up([s.slot for s in seqs], feeds)
        self._hidden = self.runner.draft.hidden
        return logits

    def _next_step(self, seqs: list[Sequence], rows: list[int], last: list[int]) -> torch.Tensor:
        hidden = self._hidden
        if len(rows) < len(hidden):  # some stopped: the others' rows only
            hidden = hidden[torch.tensor(rows, device=hidden.device)]
        logits = self.runner.draft_step([s.slot for s in seqs], last, hidden=hidden)
        self._hidden = self.runner.draft.hidden
        return logits

    def _done(self, seqs: list[Sequence]) -> None:
        self._hidden = None
        for s in seqs:
            self.runner.head_drafted(s.slot)


class SelfDraftProposer(DraftModelProposer):
    """Draft steps of a self-draft (adasd_core.selfdraft) over the target's own slots: the first feeds each
    sequence's last token (the target's slot holds every token but the last), and after drafting each
    target slot goes back to its length before the round's steps."""

    def _drafting(self, seqs: list[Sequence]) -> list[Sequence]:
        self._lengths = [self.runner.target.length(s.slot) for s in seqs]
        return seqs

    def _done(self, seqs: list[Sequence]) -> None:
        for s, n in zip(seqs, self._lengths):
            self.runner.self_drafted(s.slot, n)
