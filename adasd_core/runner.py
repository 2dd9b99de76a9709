"""The model runner: the pair's two KV pools, slot for slot, and the batched forwards over them.

Slot s of the target's pool and slot s of the draft's belong to the same sequence. The target's
slot holds every token of its sequence but the last; the draft's holds a prefix of that (it may
lag: a sequence that has not drafted for a while catches up at its next draft step). Logits come
back cut to the pair's common vocabulary, on the pair's device.

With an EAGLE-3 head as the draft (adasd_core.eagle) the target's forwards also return the states the
head reads (the inputs of its auxiliary layers) at every fed position; a slot keeps those of the
positions the head has not read yet (`pending_states`: target length - head length), cut back with the
target's rollback, and the head reads them at its next draft step.

A self-draft (adasd_core.selfdraft) has no pool of its own: its forwards run over the target's slots
(kv_cache.SharedPool), so it needs no prefill and never lags; after drafting, the target's length goes
back to what it was (`self_drafted`) and the verify pass overwrites the provisional K/V.
"""

from __future__ import annotations

import torch

from adasd_core.eagle import Eagle3Head
from adasd_core.errors import ModelLoadError
from adasd_core.kv_cache import LeanPool, SharedPool, make_pool
from adasd_core.models import ModelPair
from adasd_core.selfdraft import SelfDraft


class ModelRunner:
    def __init__(self, pair: ModelPair, slots: int, capacity: int, blocks: int | None = None, block_size: int = 16,
                 prefix_caching: bool = True):
        self.vocab, self.device = pair.vocab_size, pair.device
        self.head = isinstance(pair.draft, Eagle3Head)
        self.shared = isinstance(pair.draft, SelfDraft)
        # a head reads the target's states at every position, which a reused prefix never computed
        self.prefix_caching = prefix_caching and not self.head
        paging = {"blocks": blocks, "block_size": block_size, "prefix_caching": self.prefix_caching}
        self.target = make_pool(pair.target, slots, capacity, **paging)
        if (self.head or self.shared) and not isinstance(self.target, LeanPool):
            what = "an EAGLE-3 head" if self.head else "self-drafting"
            raise ModelLoadError(f"{what} needs a Llama-family target that runs on the lean forward")
        if self.shared:
            self.draft = SharedPool(pair.draft.lean_model(), self.target)
        else:
            self.draft = make_pool(pair.draft, slots, capacity, **paging) if pair.draft is not None else None
        # the pools whose blocks run out (a self-draft's are its target's; a head's are slots)
        self.paged = [p for p in (self.target, None if self.shared or self.head else self.draft)
                      if isinstance(p, LeanPool)]
        self.batched = bool(self.target.batched)
        self.capture: tuple[int, ...] = pair.draft.aux_layers if self.head else ()
        self.states: list[torch.Tensor | None] = [None] * slots  # per slot: states the head has not read

    def _target_forward(self, slots: list[int], feeds: list[list[int]], all_logits: bool,
                        keep_states: list[bool], want_logits: bool = True) -> torch.Tensor | None:
        if not self.head:
            return self.target.forward(slots, feeds, all_logits=all_logits, want_logits=want_logits)
        logits, states = self.target.forward(slots, feeds, all_logits=all_logits, capture=self.capture,
                                             want_logits=want_logits)
        for slot, rows, keep in zip(slots, states.split([len(f) for f in feeds]), keep_states):
            if keep:
                held = self.states[slot]
                self.states[slot] = rows if held is None or not len(held) else torch.cat((held, rows))
        return logits

    def _logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[:, : self.vocab].to(self.device)

    # ------------------------------------------------------------------ forwards

    def feed_prompts(self, batch: list, keep_logits: bool) -> torch.Tensor | None:
        """Append one chunk of each (sequence, n)'s prompt (from what is already in: `prefilled`) to its
        slots in one batched target forward. `keep_logits` (prompt scoring): every fed position's
        logits [sum n, V], cut to the vocabulary but left where the target computed them (rows are
        moved in chunks by the caller), and no draft work; else the sequences that draft feed their
        draft slots too."""
        slots = [seq.slot for seq, _ in batch]
        feeds = [seq.prefill_ids[seq.prefilled : seq.prefilled + n] for seq, n in batch]
        # a prompt's last token is fed by its first round: a chunk's logits are read only when scoring
        logits = self._target_forward(slots, feeds, keep_logits, [seq.policy is not None for seq, _ in batch],
                                      want_logits=keep_logits)
        if keep_logits:
            return logits[:, : self.vocab]
        # a head reads the prompt's states at its first draft step; a self-draft reads the target's KV; a draft
        # slot that holds less (a shorter cached prefix) catches up in the same forward
        drafting = [(seq.slot, seq.prefill_ids[self.draft.length(seq.slot) : seq.prefilled + n])
                    for seq, n in batch if seq.policy is not None] if not self.head and not self.shared else []
        if drafting:
            alone = any(seq.reproducible for seq, _ in batch if seq.policy is not None)
            self.draft.forward([s for s, _ in drafting], [f for _, f in drafting], alone=alone, want_logits=False)
        return None

    def verify(self, slots: list[int], feeds: list[list[int]], drafting: list[bool] | None = None) -> torch.Tensor:
        """One batched target forward of each slot's last token and candidates: [sum n_b, V] logits.
        `drafting`: which slots' sequences draft (a head keeps their states)."""
        keep = drafting if drafting is not None else [True] * len(slots)
        return self._logits(self._target_forward(slots, feeds, True, keep))

    def draft_step(self, slots: list[int], feeds: list[list[int]], hidden: torch.Tensor | None = None,
                   alone: bool = False) -> torch.Tensor:
        """One batched draft forward: logits [B, V] at each slot's last fed token (a head's rows read
        `hidden`, its own previous output). `alone`: the batch holds a reproducible request, so each
        row is what its sequence would get alone (LeanPool.forward)."""
        if self.head:
            return self._logits(self.draft.forward(slots, feeds, hidden=hidden))
        return self._logits(self.draft.forward(slots, feeds, alone=alone))

    # ------------------------------------------------------------------ an EAGLE-3 head's states

    def pending_states(self, slot: int) -> int:
        held = self.states[slot]
        return 0 if held is None else len(held)

    def head_catch_up(self, slots: list[int], feeds: list[list[int]]) -> torch.Tensor:
        """The head reads every target state it has not read (feeds[b]: the token after each of those
        positions): logits [B, V] at each slot's last one."""
        for slot, feed in zip(slots, feeds):
            assert len(feed) == self.pending_states(slot), (slot, len(feed), self.pending_states(slot))
        logits = self.draft.forward(slots, feeds, features=torch.cat([self.states[s] for s in slots]))
        for slot in slots:  # read: the head's slot now reaches the target's length
            self.states[slot] = None
        return self._logits(logits)

    def head_drafted(self, slot: int) -> None:
        """After a round's drafting: the head's slot back to the positions that read the target's states
        (those before the target's length; its own drafted positions come after)."""
        self.draft.rollback(slot, min(self.draft.length(slot), self.target.length(slot)))

    def self_drafted(self, slot: int, length: int) -> None:
        """After a self-draft's steps: the target's slot back to its length before them (the drafted K/V
        past it are provisional; the verify pass writes those positions again)."""
        self.target.rollback(slot, length)

    # ------------------------------------------------------------------ slots

    def draft_length(self, slot: int) -> int:
        return self.draft.length(slot) if self.draft is not None else 0

    def lengths(self, slot: int) -> tuple[int, int]:
        """(target, draft) tokens held in a slot."""
        return self.target.length(slot), self.draft_length(slot)

    def rollback(self, slot: int, length: int) -> None:
        """Cut a slot back to its first `length` tokens (the draft's only where it holds more)."""
        self.target.rollback(slot, length)
        if self.draft is not None:
            self.draft.rollback(slot, min(self.draft.length(slot), length))
        self._cut_states(slot)

    def restore(self, slot: int, lengths: tuple[int, int]) -> None:
        """Undo a failed forward's writes: back to lengths() taken before it (a head keeps what it read of
        the target's states before then: those positions are the sequence's)."""
        self.target.rollback(slot, lengths[0])
        if self.draft is not None:
            keep = lengths[0] if self.head else lengths[1]
            self.draft.rollback(slot, min(keep, self.draft.length(slot)))
        self._cut_states(slot)

    def _cut_states(self, slot: int) -> None:
        held = self.states[slot]
        if held is not None:
            self.states[slot] = held[: self.target.length(slot) - self.draft.length(slot)]

    def swap(self, a: int, b: int) -> None:
        for pool in (self.target, self.draft):
            if pool is not None:
                pool.swap(a, b)
        self.states[a], self.states[b] = self.states[b], self.states[a]

    def clear(self, slot: int) -> None:
        for pool in (self.target, self.draft):
            if pool is not None:
                pool.clear(slot)
        self.states[slot] = None

    def reuse_prefix(self, slot: int, ids: list[int], limit: int) -> int:
        """Take the cached blocks of the longest prefix of `ids` (at most `limit` positions) into an empty
        slot: the target's positions found (the draft's may be fewer: it catches up when fed)."""
        found = self.target.match(slot, ids, limit)
        if self.draft is not None and not self.shared:
            self.draft.match(slot, ids, found)
        return found

    def commit(self, slot: int, length: int) -> None:
        """The slot's first `length` positions hold final tokens (a prompt's): cacheable."""
        for pool in (self.target, self.draft):
            if pool is not None:
                pool.commit(slot, length)

    def shortfall(self, wanted: list[tuple[int, int]]) -> int:
        """Blocks missing, in the tightest pool, for every (slot, positions) in `wanted` to fit."""
        return max((sum(p.needed(s, n) for s, n in wanted) - p.blocks.available for p in self.paged), default=-1)

    def kv_tokens(self, slots: list[int]) -> tuple[int, int]:
        """Tokens resident in the (target, draft) pools over these slots."""
        draft = 0 if self.shared else sum(self.draft_length(s) for s in slots)
        return sum(self.target.length(s) for s in slots), draft
