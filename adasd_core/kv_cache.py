"""KV cache helpers. A cache holds every token of the sequence but the last; a rejection is
undone by cutting the cache back to the accepted prefix, never by re-running it.

Llama-family models run adasd_core.lean (a buffer written by position, where cutting back is
lowering a length); other models run transformers' forward over a DynamicCache.
"""

from __future__ import annotations

import inspect

import torch

from adasd_core import lean

_CACHE_KWARG: dict[type, str] = {}


def new_cache(model, use_lean: bool = True):
    if use_lean and lean.supports_cached(model):
        return lean.new_cache(model)
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
    if isinstance(cache, lean.LeanCache):
        cache.length = length
    elif extra:
        cache.crop(-extra)


def _cache_kwarg(model) -> str:
    """transformers 5.24 renamed `past_key_values` to `cache`."""
    cls = type(model)
    if cls not in _CACHE_KWARG:
        params = inspect.signature(cls.forward).parameters
        _CACHE_KWARG[cls] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KWARG[cls]


@torch.inference_mode()
def forward(model, ids: torch.Tensor, cache, logits_to_keep: int = 0) -> torch.Tensor:
    """ids [n] appended to the cache -> logits [n or logits_to_keep, V_model]."""
    if isinstance(cache, lean.LeanCache):
        return lean.forward(ids, cache, logits_to_keep)
    return forward_batch(model, ids[None], cache, logits_to_keep)[0]


@torch.inference_mode()
def forward_batch(model, ids: torch.Tensor, cache, logits_to_keep: int = 0) -> torch.Tensor:
    """transformers' forward: ids [B, n] appended to a DynamicCache -> logits [B, n or logits_to_keep, V]."""
    kwargs = {_cache_kwarg(model): cache}
    return model(input_ids=ids, use_cache=True, logits_to_keep=logits_to_keep, **kwargs).logits
