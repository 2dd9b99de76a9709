"""The lean forward (adasd_core.lean) gives transformers' logits, and its cache rolls back and grows."""

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from adasd_core import kv_cache, lean

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=512)


def _model(cls, cfg_cls, seed=0, **kw):
    torch.manual_seed(seed)
    model = cls(cfg_cls(**{**SMALL, **kw})).eval()
    model.config._attn_implementation = "sdpa"
    return model


MODELS = {
    "llama": lambda: _model(LlamaForCausalLM, LlamaConfig, num_attention_heads=4, num_key_value_heads=4),
    "llama-gqa": lambda: _model(LlamaForCausalLM, LlamaConfig, num_attention_heads=4, num_key_value_heads=2),
    "llama-bias-llama3-rope": lambda: _model(
        LlamaForCausalLM, LlamaConfig, num_attention_heads=4, num_key_value_heads=4, attention_bias=True, mlp_bias=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen2": lambda: _model(Qwen2ForCausalLM, Qwen2Config, num_attention_heads=4, num_key_value_heads=2),
    "mistral": lambda: _model(MistralForCausalLM, MistralConfig, num_attention_heads=4, num_key_value_heads=2,
                              sliding_window=None),
}


def _close(a, b, exact):
    if exact:
        assert torch.equal(a, b), (a - b).abs().max()
    else:  # grouped-query attention takes a different sdpa route in transformers
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_logits_match_transformers_through_prefill_steps_and_rollback(name):
    model = MODELS[name]()
    assert lean.supports(model)
    exact = model.config.num_key_value_heads == model.config.num_attention_heads
    ids = torch.randint(0, SMALL["vocab_size"], (300,), generator=torch.Generator().manual_seed(1))
    ref = kv_cache.new_cache(model, use_lean=False)
    fast = lean.LeanCache(lean.lean_model(model), capacity=16)  # forces several doublings
    assert isinstance(kv_cache.new_cache(model), lean.LeanCache)
    pos = 0
    # prefill, single steps, a verify-sized block, rollbacks, and appends past the capacity
    for n, back in [(40, 0), (1, 0), (1, 0), (6, 3), (6, 6), (1, 0), (21, 10), (120, 0), (1, 1), (5, 0)]:
        chunk = ids[pos : pos + n]
        _close(kv_cache.forward(model, chunk, ref), kv_cache.forward(model, chunk, fast), exact)
        pos += n - back
        kv_cache.rollback(ref, pos)
        kv_cache.rollback(fast, pos)
        assert kv_cache.cache_length(fast) == kv_cache.cache_length(ref) == pos
    _close(kv_cache.forward(model, ids[pos : pos + 3], ref, logits_to_keep=1),
           kv_cache.forward(model, ids[pos : pos + 3], fast, logits_to_keep=1), exact)


def test_unknown_architectures_keep_the_transformers_forward():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).eval()
    assert not lean.supports(gpt2)
    assert not isinstance(kv_cache.new_cache(gpt2), lean.LeanCache)
    dynamic_rope = _model(LlamaForCausalLM, LlamaConfig, num_attention_heads=4, num_key_value_heads=4,
                          rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    assert not lean.supports(dynamic_rope)
    windowed = _model(MistralForCausalLM, MistralConfig, num_attention_heads=4, num_key_value_heads=2, sliding_window=32)
    assert not lean.supports(windowed)
    split = MODELS["llama"]()
    assert lean.supports(split)
    split.hf_device_map = {"model.embed_tokens": 0, "model.layers": 1, "lm_head": "disk"}  # spread or offloaded
    assert not lean.supports(split)


def test_engine_output_is_the_same_on_either_path(quick_engine, monkeypatch):
    from adasd_core.engine import SpecConfig
    from adasd_core.sampling import SamplingParams

    prompt = "def main(args):\n    "
    params = SamplingParams(max_tokens=24, temperature=0.8, seed=3, ignore_eos=True)
    for method in ("ar", "adasd"):
        spec = SpecConfig(method=method)
        fast = quick_engine.generate(prompt, params, spec).token_ids
        monkeypatch.setattr(lean, "supports_cached", lambda model: False)
        slow = quick_engine.generate(prompt, params, spec).token_ids
        monkeypatch.undo()
        assert fast == slow
