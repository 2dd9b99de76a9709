"""KV cache helpers. A cache holds every token of the sequence but the last; a rejection is
undone by cutting the cache back to the accepted prefix, never by re-running it."""

from __future__ import annotations

import torch


def new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # transformers < 4.56
        return DynamicCache()


def cache_length(cache) -> int:
    return cache.get_seq_length()


def rollback(cache, length: int) -> None:
    """Keep the first `length` positions."""
    extra = cache.get_seq_length() - length
    assert extra >= 0, f"cannot roll a cache of {cache.get_seq_length()} forward to {length}"
    if extra:
        cache.crop(-extra)


@torch.inference_mode()
def forward(model, ids: torch.Tensor, cache, logits_to_keep: int = 0) -> torch.Tensor:
    """ids [n] appended to the cache -> logits [n or logits_to_keep, V_model]."""
    out = model(input_ids=ids[None], past_key_values=cache, use_cache=True, logits_to_keep=logits_to_keep)
    return out.logits[0]
