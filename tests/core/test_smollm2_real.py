"""The real default pair, set up by the code users run (PyPI once, then the cache): the target's
shape, a real answer, the lean forward's logits against transformers' on it, and the draft."""

from __future__ import annotations

import pytest
import torch

from adasd_core import draft_head, kv_cache, smollm2


@pytest.fixture(scope="module")
def real_pair():
    from adasd_core.models import load_pair

    return load_pair("smollm2", "smollm2", device="cpu", dtype="float32", max_model_len=1024)


def test_the_target_is_smollm2_135m_instruct(real_pair):
    cfg = real_pair.target.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.vocab_size, cfg.tie_word_embeddings) == ("llama", 30, 576, 9, 3, 49152, True)
    assert sum(p.numel() for p in real_pair.target.parameters()) == 134_515_008
    assert real_pair.tokenizer.eos_token == "<|im_end|>" and real_pair.tokenizer.chat_template
    assert (smollm2.target_dir() / "adasd_setup.json").is_file()


def test_the_lean_forward_gives_transformers_logits_on_the_real_target(real_pair):
    model = real_pair.target
    ref, fast = kv_cache.HFPool(model, 2, 256), kv_cache.make_pool(model, 2, 256)
    assert isinstance(fast, kv_cache.LeanPool)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 49152, (120,), generator=g).tolist() for _ in range(2)]
    pos = [0, 0]
    # prefill, single steps, a verify block with a rollback, then a ragged batch of both slots
    for slots, ns, back in [([0], [40], 0), ([0], [1], 0), ([0], [6], 3), ([1], [17], 0), ([0, 1], [5, 1], 1),
                            ([0, 1], [1, 1], 0)]:
        feeds = [seqs[s][pos[s] : pos[s] + n] for s, n in zip(slots, ns)]
        a, b = ref.forward(slots, feeds, all_logits=True), fast.forward(slots, feeds, all_logits=True)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        assert torch.equal(a.argmax(-1), b.argmax(-1))
        for s, n in zip(slots, ns):
            pos[s] += n - back
            ref.rollback(s, pos[s])
            fast.rollback(s, pos[s])


def test_a_greedy_chat_answer_and_lossless_speculation(real_pair):
    from adasd_core.distill.generate import chat_prompt
    from adasd_core.engine import SpecConfig
    from adasd_core.llm import LLM
    from adasd_core.sampling import SamplingParams

    engine = LLM(real_pair, calibrate=False, max_running=2)
    ids = chat_prompt(real_pair.tokenizer, "What is the capital of France?")
    params = SamplingParams(max_tokens=24)
    ar = engine.generate(ids, params, SpecConfig(method="ar"))
    assert "Paris" in ar.text
    for method in ("vanilla", "gen-only"):  # lossless: exactly the target's tokens
        out = engine.generate(ids, params, SpecConfig(method=method))
        assert out.token_ids == ar.token_ids, method
        assert out.stats.drafted_tokens > 0
    assert draft_head.tokens_of(real_pair.draft) is not None


def test_the_drafts_lean_forward_gives_transformers_logits_and_runs_on_int8(real_pair, monkeypatch):
    """The shipped draft (4 layers, subset head, the target's embeddings): with float weights the lean
    path gives transformers' logits; its folder asks for int8 weights, which the CPU path then uses."""
    from adasd_core import lean
    from adasd_core.distill.generate import chat_prompt

    draft = real_pair.draft
    assert lean.int8_weights(draft)
    ids = chat_prompt(real_pair.tokenizer, "Explain what a Python list comprehension is, with an example.")
    q8 = kv_cache.make_pool(draft, 1, 256)
    assert isinstance(q8, kv_cache.LeanPool) and q8.lean.int8
    monkeypatch.setenv(lean.INT8_ENV, "0")
    fresh = type(draft)(draft.config)  # a second model object: the lean layout is built per model
    fresh.load_state_dict(draft.state_dict())
    draft_head.attach(fresh, draft_head.tokens_of(draft))
    ref, fast = kv_cache.HFPool(fresh, 1, 256), kv_cache.make_pool(fresh, 1, 256)
    assert isinstance(fast, kv_cache.LeanPool) and not fast.lean.int8
    a, b, c = (p.forward([0], [ids], all_logits=True) for p in (ref, fast, q8))
    keep = torch.isfinite(a)
    assert torch.equal(keep, torch.isfinite(b)) and torch.equal(keep, torch.isfinite(c))
    torch.testing.assert_close(b[keep], a[keep], rtol=1e-4, atol=1e-4)
    assert not torch.equal(c[keep], a[keep])  # int8 is a different, cheaper forward
