"""A round's constrained part: the tokens a request's grammar forces (jump-forward, before drafting),
and the verified rows processed by each request's controls and grammar masks (logits_processors.py)."""

from __future__ import annotations

import logging

import torch

from adasd_core.errors import InvalidRequestError
from adasd_core.grammar import Constraint, GrammarDeadEnd, ll_tokenizer
from adasd_core.logits_processors import Rows, process_logits
from adasd_core.round_output import Draft
from adasd_core.sampling import SamplingParams
from adasd_core.sequence import Sequence

log = logging.getLogger(__name__)

MAX_FORCED = 64  # forced tokens taken per round (each still costs a mask; the verify pass takes them all)


class Grammars:
    """A pair's grammar matchers: llguidance's view of its tokenizer, made at the first grammar request."""

    def __init__(self, pair):
        self.pair, self._tokenizer = pair, None

    def prepare(self) -> None:
        """Make llguidance's view of the tokenizer now (about 0.3 s for the default pair's), so that the first
        constrained request, and every request sharing its rounds, does not wait for it mid-serving. A
        tokenizer it cannot read is left to the first request, which then reports the error."""
        try:
            self._ll_tokenizer()
        except Exception as exc:  # the first constrained request reports it instead
            log.warning("grammars: llguidance's tokenizer not built at load (%s)", exc)

    def _ll_tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = ll_tokenizer(self.pair.tokenizer, self.pair.vocab_size, self.pair.eos_token_ids)
        return self._tokenizer

    def constraint(self, params: SamplingParams) -> Constraint | None:
        """The request's matcher (None without a grammar), its token-id controls checked first."""
        vocab = self.pair.vocab_size
        for name, tokens in (("logit_bias", list(params.logit_bias or ())), ("stop_token_ids", params.stop_token_ids)):
            if any(not 0 <= t < vocab for t in tokens):
                raise InvalidRequestError(f"{name} names a token id outside the vocabulary (0 to {vocab - 1})",
                                          param=name)
        if params.grammar is None:
            return None
        return Constraint(self._ll_tokenizer(), params.grammar, vocab)


def jump_forward(seqs: list[Sequence]) -> list[tuple[Sequence, object]]:
    """Each constrained sequence takes the tokens its grammar forces (its mask allows one token), up to
    one fewer than it may still add (the round adds one); a sequence whose grammar allows no token ends
    here, finish reason "grammar_dead_end". Returns the ended sequences' events."""
    ended = []
    for seq in seqs:
        seq.forced = []
        c = seq.constraint
        if c is None:
            continue
        try:
            while len(seq.forced) < min(seq.remaining - 1, MAX_FORCED) and not c.stopped:
                token = c.forced(c.mask())
                if token is None:
                    break
                c.consume(token)
                seq.forced.append(token)
            c.mask()
        except GrammarDeadEnd:
            c.restore(c.consumed - len(seq.forced))
            seq.forced = []
            logprobs = [] if seq.params.logprobs is not None else None
            sources = [] if seq.token_sources else None
            ended.append((seq, seq.emit([], logprobs, sources, finish="grammar_dead_end")))
    return ended


def verified_logits(seqs: list[Sequence], drafts: dict[Sequence, Draft], cands: list[list[int]],
                    logits: torch.Tensor) -> torch.Tensor:
    """The rows the round verifies (each sequence's last k_b + 1: its forced tokens' rows are not
    checked), processed by the request's controls and its grammar's masks: [sum (k_b + 1), V]."""
    forced = [len(s.forced) for s in seqs]
    if any(forced):
        rows, start = [], 0
        for f, c in zip(forced, cands):
            rows += range(start + f, start + f + len(c) + 1)
            start += f + len(c) + 1
        logits = logits[torch.tensor(rows, device=logits.device)]
    runs, start = [], 0
    for s, c in zip(seqs, cands):
        if s.constraint is not None or s.params.controls:  # the others' rows stay as they are
            masks = None
            if s.constraint is not None:
                masks = (drafts[s].masks if s in drafts else []) + [s.constraint.row_mask()]
            runs.append(Rows(s, start, s.forced + c, [len(s.forced) + j for j in range(len(c) + 1)], masks))
        start += len(c) + 1
    return process_logits(logits, runs) if runs else logits
