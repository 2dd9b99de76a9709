"""Which sequences the engine works on: one waiting queue, admission to KV slots, the prompt
tokens each step may feed, and slot ownership.

A sequence waits until a slot is free, then either has its prompt scored (prompt log-probabilities,
or nothing to generate: `Sequence.scores_prompt`) or prefilled, in chunks under one budget of prompt
tokens per step (scoring first), so a long prompt never freezes the running streams for long.
Once all but its last prompt token are in, it runs: one round per step. Running sequences hold
slots 0..R-1 (the batch is a contiguous range of both pools); new ones are admitted from the top.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from adasd_core.runner import ModelRunner
from adasd_core.sequence import Sequence


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

    def schedule(self) -> ScheduledStep:
        """Admit waiting sequences to free slots, then choose this step's prompt chunks."""
        while self.waiting and None in self.owner:
            seq = self.waiting.popleft()
            slot = len(self.owner) - 1 - self.owner[::-1].index(None)  # from the top: running grows from 0
            self.owner[slot], seq.slot, seq.admitted_at = seq, slot, time.monotonic()
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
        n = min(seq.prompt_len - 1 - seq.prefilled, budget) if wanted(seq) else 0
        if n > 0:
            batch.append((seq, n))
            budget -= n
        if budget <= 0:
            break
    return batch
