"""Constrained decoding through llguidance (docs/structured-outputs.md says why this library).

A request's `GrammarSpec` (JSON Schema, any JSON object, a regex, a choice list or a Lark grammar)
compiles to an llguidance grammar; each sequence holds a `Constraint`: a matcher advanced over
every token it commits, the draft's candidates included, and rolled back past a rejection. Masks
are int32 bitmasks [W = ceil(V / 32)] computed on the host; `apply_bitmask` unpacks a batch of them
and applies them to logits [N, V] in one tensor op.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np
import torch

from adasd_core import paged_attention
from adasd_core.errors import InvalidRequestError

KINDS = ("json_schema", "json_object", "regex", "choice", "lark")
ANY_JSON_OBJECT = {"type": "object"}


@dataclass(frozen=True)
class GrammarSpec:
    """What a request's output must match (picklable: it travels to the worker in SamplingParams).
    `value`: the schema as JSON text, the regex, the choices as a JSON list, or the Lark text.
    `param`: the request field it came from, for errors."""

    kind: str
    value: str = ""
    param: str = "response_format"
    lenient: bool = False  # JSON Schema: ignore keywords llguidance lacks instead of refusing them

    def __post_init__(self) -> None:
        assert self.kind in KINDS, self.kind

    def grammar(self) -> str:
        """The llguidance grammar text (not yet checked: `check` does)."""
        import llguidance

        # fixed separators: no run of whitespace for a small model to loop in, and more forced tokens
        options = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": self.lenient}
        if self.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema(ANY_JSON_OBJECT, overrides=options)
        if self.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(self.value, overrides=options)
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.value)
        if self.kind == "choice":
            choices = json.loads(self.value)
            return llguidance.LLMatcher.grammar_from_regex("|".join(re.escape(c) for c in choices))
        return llguidance.LLMatcher.grammar_from_lark(self.value)

    def check(self) -> str:
        """The grammar, or InvalidRequestError naming the field (bad schema, unsupported keyword,
        a regex that does not compile)."""
        import llguidance

        try:
            grammar = self.grammar()
        except (ValueError, TypeError) as exc:
            raise InvalidRequestError(f"{self.param}: {exc}", param=self.param) from None
        error = llguidance.LLMatcher.validate_grammar(grammar)
        if error and not error.startswith("WARNING"):
            what = {"json_schema": "the JSON schema", "regex": "the regex", "choice": "the choices",
                    "lark": "the grammar"}.get(self.kind, "the grammar")
            raise InvalidRequestError(f"{self.param}: {what} cannot be used: {error.strip()}", param=self.param)
        return grammar


def json_schema_spec(schema, param: str) -> GrammarSpec:
    """A JSON Schema from a request (a dict, or JSON text) -> its GrammarSpec; 400 if it is not an object."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"{param} is not valid JSON: {exc}", param=param) from None
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"{param} must be a JSON Schema object", param=param)
    return GrammarSpec("json_schema", json.dumps(schema), param)


def choice_spec(choices, param: str) -> GrammarSpec:
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise InvalidRequestError(f"{param} must be a non-empty list of non-empty strings", param=param)
    return GrammarSpec("choice", json.dumps(choices), param)


# --------------------------------------------------------------------------- the engine's side


def ll_tokenizer(tokenizer, vocab: int, eos: set[int]):
    """The pair's tokenizer as llguidance's (about a second for a 49k vocabulary: made once per engine)."""
    import llguidance
    import llguidance.hf

    eos_ids = sorted(eos)
    try:
        from transformers import PreTrainedTokenizerFast

        if isinstance(tokenizer, PreTrainedTokenizerFast):
            return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=eos_ids or None)
    except ImportError:
        pass
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_PlainTokenizer(tokenizer, vocab, eos_ids)),
                                  n_vocab=vocab, eos_token=eos_ids or None)


class _PlainTokenizer:
    """Any tokenizer with decode and __call__ (the toy models'), in the shape llguidance wraps."""

    def __init__(self, tokenizer, vocab: int, eos_ids: list[int]):
        self.tokenizer = tokenizer
        self.eos_token_id = eos_ids[0] if eos_ids else vocab - 1
        self.bos_token_id = None
        self.special_token_ids = eos_ids
        self.tokens = [b"" if i in eos_ids else tokenizer.decode([i]).encode() for i in range(vocab)]

    def __call__(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


class GrammarDeadEnd(Exception):
    """The grammar allows no token here (or refused one): the request ends, finish reason "grammar"."""


class Constraint:
    """One sequence's matcher. Its state is every token the sequence committed, plus the candidates
    of the round in flight; `rollback` undoes the rejected ones. The mask at the current state is
    cached until the state moves."""

    def __init__(self, tokenizer, spec: GrammarSpec, vocab: int):
        import llguidance

        self.matcher = llguidance.LLMatcher(tokenizer, spec.check(), log_level=0)
        if self.matcher.is_error():
            raise InvalidRequestError(f"{spec.param}: {self.matcher.get_error()}", param=spec.param)
        self.words = (vocab + 31) // 32
        self.consumed = 0
        self._mask: torch.Tensor | None = None

    def mask(self) -> torch.Tensor:
        """[W] int32 bitmask of the tokens allowed next; GrammarDeadEnd where there is none."""
        if self._mask is None:
            self._check()
            mask = torch.zeros(self.words, dtype=torch.int32)
            self.matcher.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)
            self._check()
            self._mask = mask
        return self._mask

    def viable_mask(self) -> torch.Tensor | None:
        """The mask, or None where the grammar dead-ends here or only EOS can follow (drafting stops)."""
        try:
            mask = self.mask()
        except GrammarDeadEnd:
            return None
        return None if self.stopped else mask

    def row_mask(self) -> torch.Tensor:
        """The mask of a verified row: a dead end's row is left free (a sequence that commits into
        it ends at its next round)."""
        try:
            return self.mask()
        except GrammarDeadEnd:
            return torch.full((self.words,), -1, dtype=torch.int32)

    def forced(self, mask: torch.Tensor) -> int | None:
        """The one token a mask allows, else None (none allowed: GrammarDeadEnd)."""
        words = mask.numpy().view(np.uint32)
        nz = np.flatnonzero(words)
        if len(nz) == 0:
            raise GrammarDeadEnd("the grammar allows no token here")
        if len(nz) > 1:
            return None
        w = int(words[nz[0]])
        if w & (w - 1):
            return None
        return int(nz[0]) * 32 + w.bit_length() - 1

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise GrammarDeadEnd(f"the grammar refused token {token}: {self.matcher.get_error()}")
        self.consumed += 1
        self._mask = None

    def rollback(self, n: int) -> None:
        if n:
            assert self.matcher.rollback(n), self.matcher.get_error()
            self.consumed -= n
            self._mask = None

    def restore(self, consumed: int) -> None:
        """Back to the state after `consumed` tokens (a failed batch's retry)."""
        self.rollback(self.consumed - consumed)

    @property
    def stopped(self) -> bool:
        """Nothing but EOS can follow (the grammar is complete and accepts no more)."""
        return self.matcher.is_stopped()

    def _check(self) -> None:
        if self.matcher.is_error():
            raise GrammarDeadEnd(self.matcher.get_error())


_BITS = None


def unpack_bitmask(masks: torch.Tensor, vocab: int) -> torch.Tensor:
    """[N, W] int32 bitmasks -> [N, V] bool (True: allowed)."""
    global _BITS
    if _BITS is None or _BITS.device != masks.device:
        _BITS = torch.arange(32, dtype=torch.int32, device=masks.device)
    return ((masks[:, :, None] >> _BITS) & 1).bool().flatten(1)[:, :vocab]


def apply_bitmask(logits: torch.Tensor, rows: list[int], masks: list[torch.Tensor],
                  uniform_fallback: bool = False) -> None:
    """In place: logits [N, V] rows `rows` get -inf where their bitmask [W] forbids a token (one copy, one op).
    `uniform_fallback` (the draft's rows): a row with no allowed token left (a draft head over a subset of
    the vocabulary) becomes uniform over the allowed tokens, a proposal like any other."""
    if not rows:
        return
    stacked = torch.stack(masks)
    if paged_attention.takes_rows(logits):  # in place, row by row: no [N, V] temporaries
        return paged_attention.apply_bitmask_rows(logits, rows, stacked, uniform_fallback)
    allowed = unpack_bitmask(stacked.to(logits.device, non_blocking=True), logits.shape[-1])
    idx = torch.tensor(rows, device=logits.device)
    masked = logits[idx].masked_fill(~allowed, float("-inf"))
    if uniform_fallback:
        empty = ~torch.isfinite(masked).any(-1, keepdim=True)
        masked = torch.where(empty, torch.zeros_like(masked).masked_fill(~allowed, float("-inf")), masked)
    logits[idx] = masked
