"""Which sequences the engine works on: one waiting queue, admission to KV slots, the prompt
tokens each step may feed, and slot ownership.

A sequence waits until a slot is free and the KV blocks its prompt needs are, then either has its
prompt scored (prompt log-probabilities, or nothing to generate: `Sequence.scores_prompt`) or
prefilled, in chunks under one budget of prompt tokens per step (scoring first), so a long prompt
never freezes the running streams for long; a prefill starts after the longest prefix the pools
hold in cached blocks. Once all but its last prompt token are in, it runs: one round per step.
Running sequences hold slots 0..R-1; new ones are admitted from the top.

Every step first makes room: each running sequence may write GROWTH positions in its next round, and
when the blocks for that are not free, the newest sequence is preempted (its blocks freed, its
final ones left in the prefix cache) and waits at the head of the queue to recompute its tokens.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from adasd_core.constrained import MAX_FORCED
from adasd_core.drafting import WINDOW
from adasd_core.runner import ModelRunner
from adasd_core.sequence import Sequence

GROWTH = 2 + WINDOW + MAX_FORCED  # positions one round may write past a sequence's length (forced, drafts, verify)


@dataclass
class ScheduledStep:
    """One step's prompt work: (sequence, prompt tokens to feed) per sequence."""

    score: list[tuple[Sequence, int]]  # every position's logits kept (prompt log-probabilities)
    prefill: list[tuple[Sequence, int]]


class Scheduler:
    def __init__(self, runner: ModelRunner, slots: int, prefill_budget: int):
        self.runner = runner
        self.prefill_budget = prefill_budget  # prompt tokens per step, scoring and prefill together
        self.owner: list[Sequence | None] = [None] * slots
        self.waiting: deque[Sequence] = deque()
        self.scoring: list[Sequence] = []
        self.prefilling: list[Sequence] = []
        self.running: list[Sequence] = []  # running[i].slot == i
        self.preemptions = 0

    @property
    def idle(self) -> bool:
        return not (self.waiting or self.prefilling or self.scoring or self.running)

    @property
    def free_slots(self) -> int:
        return len(self.owner) - len(self.running) - len(self.prefilling) - len(self.scoring) - len(self.waiting)

    def held_slots(self) -> list[int]:
        return [s for s, owner in enumerate(self.owner) if owner is not None]

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def _wanted(self) -> list[tuple[int, int]]:
        """(slot, positions) each admitted sequence may hold by the end of this step."""
        cap = self.runner.target.capacity
        out = [(s.slot, min(self.runner.target.length(s.slot) + GROWTH, cap)) for s in self.running]
        out += [(s.slot, min(len(s.prefill_ids) + GROWTH, cap)) for s in self.prefilling]
        return out + [(s.slot, s.prompt_len) for s in self.scoring]

    def _make_room(self) -> None:
        """Preempt the newest sequences until every admitted one's next step fits in the blocks."""
        while self.runner.shortfall(self._wanted()) > 0:
            held = self.running + self.prefilling
            if len(held) + len(self.scoring) <= 1:
                return  # one sequence always fits (plan_blocks)
            self.preempt(max(held, key=lambda s: s.admitted_at))

    def preempt(self, seq: Sequence) -> None:
        """Free a running or prefilling sequence's blocks; it waits first in line to recompute its tokens."""
        if seq in self.running:
            self.release(seq)
        else:
            self.drop(seq)
        seq.preempted()
        seq.admitted_at = None
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def schedule(self) -> ScheduledStep:
        """Make room, admit waiting sequences to free slots while blocks allow (after the cached prefix of
        their prompt), then choose this step's prompt chunks."""
        self._make_room()
        while self.waiting and None in self.owner:
            seq = self.waiting[0]
            slot = len(self.owner) - 1 - self.owner[::-1].index(None)  # from the top: running grows from 0
            n = len(seq.prefill_ids)
            found = 0 if seq.scores_prompt else self.runner.reuse_prefix(slot, seq.prefill_ids, n - 1)
            busy = self.running or self.prefilling or self.scoring
            wanted = self._wanted() + [(slot, min(n + GROWTH, self.runner.target.capacity))]
            if busy and self.runner.shortfall(wanted) > 0:
                self.runner.clear(slot)  # its blocks are not free yet: it waits, the cached prefix stays cached
                break
            self.waiting.popleft()
            self.owner[slot], seq.slot, seq.admitted_at, seq.prefilled = seq, slot, time.monotonic(), found
            (self.scoring if seq.scores_prompt else self.prefilling).append(seq)
        score = _chunks(self.scoring, self.prefill_budget, lambda s: s.params.prompt_logprobs is not None)
        prefill = _chunks(self.prefilling, self.prefill_budget - sum(n for _, n in score), lambda s: True)
        return ScheduledStep(score, prefill)

    def start_running(self, seq: Sequence) -> None:
        """A sequence whose prompt is in leaves its queue and joins the batch."""
        (self.scoring if seq in self.scoring else self.prefilling).remove(seq)
        self._move(seq, len(self.running))
        self.running.append(seq)

    def drop(self, seq: Sequence) -> None:
        """Take a scoring or prefilling sequence out and free its slot."""
        (self.scoring if seq in self.scoring else self.prefilling).remove(seq)
        self._clear(seq)

    def release(self, seq: Sequence) -> None:
        """Free a running sequence's slot; the last running sequence moves into it (slots stay 0..R-1)."""
        i = self.running.index(seq)
        last = self.running.pop()
        if last is not seq:
            self._move(last, i)
            self.running[i] = last
        self._clear(seq)

    def abort(self, seq: Sequence) -> None:
        """Drop a sequence wherever it is and free its slot now."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.prefilling or seq in self.scoring:
            self.drop(seq)
        elif seq in self.running:
            self.release(seq)

    def _move(self, seq: Sequence, slot: int) -> None:
        """Put seq's caches in `slot`, swapping with whoever holds it."""
        if seq.slot == slot:
            return
        other = self.owner[slot]
        self.runner.swap(seq.slot, slot)
        self.owner[seq.slot], self.owner[slot] = other, seq
        if other is not None:
            other.slot = seq.slot
        seq.slot = slot

    def _clear(self, seq: Sequence) -> None:
        self.runner.clear(seq.slot)
        self.owner[seq.slot] = None
        seq.slot = -1


def _chunks(queue: list[Sequence], budget: int, wanted) -> list[tuple[Sequence, int]]:
    """The next prompt tokens (all but each prompt's last) of the queue's wanted sequences, in order,
    up to `budget` tokens in all."""
    batch = []
    for seq in queue:
        n = min(len(seq.prefill_ids) - 1 - seq.prefilled, budget) if wanted(seq) else 0
        if n > 0:
            batch.append((seq, n))
            budget -= n
        if budget <= 0:
            break
    return batch
