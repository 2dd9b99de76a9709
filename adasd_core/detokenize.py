"""Incremental detokenisation and stop strings.

Text is released only when it is final: a byte-level token may end in the middle of a UTF-8
character (decoded as U+FFFD until the rest arrives), and text that could still grow into a
stop string is held back until it cannot.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    """Decode a growing list of token ids into text deltas (prefix/read offsets, as TGI does)."""

    def __init__(self, tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        # a few prompt tokens give merges and leading spaces their context
        self._context = list(prompt_ids[-4:]) if prompt_ids else []
        self.prefix_offset = 0
        self.read_offset = len(self._context)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        all_ids = self._context + self.ids
        prefix_text = self._decode(all_ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(all_ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(all_ids)
            return delta
        return ""

    def flush(self) -> str:
        """At the end of generation: whatever is left, even an incomplete character."""
        all_ids = self._context + self.ids
        prefix_text = self._decode(all_ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(all_ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(all_ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""


class StopStringMatcher:
    """Holds back text that may be the start of a stop string; reports a match."""

    def __init__(self, stop: list[str]):
        self.stop = [s for s in stop if s]
        self.pending = ""
        self.hold = max((len(s) for s in self.stop), default=1) - 1

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to release, stopped)."""
        if not self.stop:
            return text, False
        self.pending += text
        hits = [(self.pending.find(s), s) for s in self.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            i = min(i for i, _ in hits)
            out, self.pending = self.pending[:i], ""
            return out, True
        # release everything that cannot be the start of a stop string
        keep = 0
        for n in range(min(self.hold, len(self.pending)), 0, -1):
            tail = self.pending[-n:]
            if any(s.startswith(tail) for s in self.stop):
                keep = n
                break
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
