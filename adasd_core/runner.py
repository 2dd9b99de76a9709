"""The model runner: the pair's two KV pools, slot for slot, and the batched forwards over them.

Slot s of the target's pool and slot s of the draft's belong to the same sequence. The target's
slot holds every token of its sequence but the last; the draft's holds a prefix of that (it may
lag: a sequence that has not drafted for a while catches up at its next draft step). Logits come
back cut to the pair's common vocabulary, on the pair's device.
"""

from __future__ import annotations

import torch

from adasd_core.kv_cache import make_pool
from adasd_core.models import ModelPair


class ModelRunner:
    def __init__(self, pair: ModelPair, slots: int, capacity: int):
        self.vocab, self.device = pair.vocab_size, pair.device
        self.target = make_pool(pair.target, slots, capacity)
        self.draft = make_pool(pair.draft, slots, capacity) if pair.draft is not None else None
        self.batched = bool(self.target.batched)

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
        feeds = [seq.prompt_ids[seq.prefilled : seq.prefilled + n] for seq, n in batch]
        logits = self.target.forward(slots, feeds, all_logits=keep_logits)
        if keep_logits:
            return logits[:, : self.vocab]
        drafting = [(s, f) for (seq, _), s, f in zip(batch, slots, feeds) if seq.policy is not None]
        if drafting:
            self.draft.forward([s for s, _ in drafting], [f for _, f in drafting])
        return None

    def verify(self, slots: list[int], feeds: list[list[int]]) -> torch.Tensor:
        """One batched target forward of each slot's last token and candidates: [sum n_b, V] logits."""
        return self._logits(self.target.forward(slots, feeds, all_logits=True))

    def draft_step(self, slots: list[int], feeds: list[list[int]]) -> torch.Tensor:
        """One batched draft forward: logits [B, V] at each slot's last fed token."""
        return self._logits(self.draft.forward(slots, feeds))

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

    def restore(self, slot: int, lengths: tuple[int, int]) -> None:
        """Undo a failed forward's writes: back to lengths() taken before it."""
        self.target.rollback(slot, lengths[0])
        if self.draft is not None:
            self.draft.rollback(slot, min(lengths[1], self.draft.length(slot)))

    def swap(self, a: int, b: int) -> None:
        for pool in (self.target, self.draft):
            if pool is not None:
                pool.swap(a, b)

    def clear(self, slot: int) -> None:
        for pool in (self.target, self.draft):
            if pool is not None:
                pool.clear(slot)

    def kv_tokens(self, slots: list[int]) -> tuple[int, int]:
        """Tokens resident in the (target, draft) pools over these slots."""
        return sum(self.target.length(s) for s in slots), sum(self.draft_length(s) for s in slots)
