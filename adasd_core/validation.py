"""Prompt checks shared by the engine and the server's front end (one definition each)."""

from __future__ import annotations

from adasd_core.errors import ContextLengthError, InvalidRequestError


def check_prompt_ids(ids: list[int], vocab_size: int, context_length: int, param: str = "prompt") -> None:
    """A prompt must have a token, only ids in the vocabulary, and leave room for one new token."""
    if not ids:
        raise InvalidRequestError("the prompt is empty: send at least one token", param=param)
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(f"token id {bad} is outside the vocabulary (0..{vocab_size - 1})", param=param)
    if len(ids) >= context_length:
        raise ContextLengthError(f"the prompt has {len(ids)} tokens but this model's context is {context_length} "
                                 "tokens and at least one must be left for the completion; shorten it", param=param)
