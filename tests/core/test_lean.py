"""The lean batched forward (adasd_core.lean over kv_cache.LeanPool) gives transformers' logits, per
sequence, through ragged batches, rollbacks and slot swaps. The models run on ADASD_TEST_DEVICE (cpu
unless set: scripts/gpu_check.sh sets cuda), float32."""

import os

import pytest
import torch
import torch.nn.functional as F
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

DEVICE = torch.device(os.environ.get("ADASD_TEST_DEVICE", "cpu"))
SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=512)


def _model(cls, cfg_cls, seed=0, **kw):
    torch.manual_seed(seed)
    model = cls(cfg_cls(**{**SMALL, **kw})).eval().to(DEVICE)
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


def _close(a, b):
    # fused q/k/v and gate/up matmuls, and grouped-query attention's sdpa route, round differently
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_logits_match_transformers_through_prefill_steps_and_rollback(name):
    model = MODELS[name]()
    assert lean.supports(model)
    ids = torch.randint(0, SMALL["vocab_size"], (300,), generator=torch.Generator().manual_seed(1))
    ref = kv_cache.HFPool(model, 1, 320)
    fast = kv_cache.make_pool(model, 1, 320)
    assert isinstance(fast, kv_cache.LeanPool)
    pos = 0
    # prefill, single steps, a verify-sized block, rollbacks, long appends
    for n, back in [(40, 0), (1, 0), (1, 0), (6, 3), (6, 6), (1, 0), (21, 10), (120, 0), (1, 1), (5, 0)]:
        chunk = ids[pos : pos + n].tolist()
        _close(ref.forward([0], [chunk], all_logits=True), fast.forward([0], [chunk], all_logits=True))
        pos += n - back
        ref.rollback(0, pos)
        fast.rollback(0, pos)
        assert fast.length(0) == ref.length(0) == pos
    chunk = ids[pos : pos + 3].tolist()
    _close(ref.forward([0], [chunk]), fast.forward([0], [chunk]))


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_a_ragged_batch_gives_each_sequence_its_own_logits(name):
    """Sequences of different lengths, fed different numbers of tokens, in any slot order (gathered,
    or with idle slots in between), with rollbacks and slot swaps, match transformers alone."""
    model = MODELS[name]()
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, SMALL["vocab_size"], (200,), generator=g).tolist() for _ in range(4)]
    ref, fast = kv_cache.HFPool(model, 4, 256), kv_cache.make_pool(model, 4, 256)
    pos = [0] * 4
    steps = [([0, 1, 2, 3], [30, 5, 1, 12]), ([0, 1, 2, 3], [1, 1, 1, 1]), ([1, 3], [4, 2]), ([0, 2, 3], [6, 1, 3]),
             ([3, 1], [2, 2]), ([2], [7]), ([0, 1, 2, 3], [21, 1, 6, 2])]
    for slots, ns in steps:
        feeds = [seqs[s][pos[s] : pos[s] + n] for s, n in zip(slots, ns)]
        _close(ref.forward(slots, feeds, all_logits=True), fast.forward(slots, feeds, all_logits=True))
        for s, n in zip(slots, ns):
            pos[s] += n - min(2, n)  # roll back part of what was fed, as a rejection does
            ref.rollback(s, pos[s])
            fast.rollback(s, pos[s])
    for pool in (ref, fast):
        pool.swap(0, 3)
    seqs[0], seqs[3], pos[0], pos[3] = seqs[3], seqs[0], pos[3], pos[0]
    feeds = [seqs[s][pos[s] : pos[s] + 2] for s in range(4)]
    _close(ref.forward([0, 1, 2, 3], feeds), fast.forward([0, 1, 2, 3], feeds))
    assert fast.lengths == [ref.length(s) for s in range(4)] == [p + 2 for p in pos]


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2"])
def test_decode_and_verify_rows_are_the_same_bits_alone_or_batched(name):
    """On the CPU library (float32 products of up to F32_ROWS rows, row-wise norms and attention), a sequence's
    decode and verify rows have the same bits whatever shares the call: greedy speculation against `ar` in
    any batch compares the target with itself."""
    from adasd_core import paged_attention

    if DEVICE.type != "cpu":
        pytest.skip("a property of the CPU library's path")
    if not paged_attention.kernel_available():
        pytest.fail("gcc is on this kind of machine: the CPU library must build")
    model = MODELS[name]()
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(0, SMALL["vocab_size"], (80,), generator=g).tolist() for _ in range(4)]
    batched, alone = kv_cache.make_pool(model, 4, 128), kv_cache.make_pool(model, 4, 128)
    for s, n in enumerate((30, 17, 41, 5)):  # prompts fed alone in both pools (prefill is another kernel's)
        for pool in (batched, alone):
            pool.forward([s], [seqs[s][:n]])
    for slots, ns in [([0, 1, 2, 3], [1, 1, 1, 1]), ([0, 1, 2, 3], [6, 1, 3, 8]), ([2, 0], [1, 5]),
                      ([3, 1, 0], [4, 4, 1])]:
        feeds = [seqs[s][batched.length(s) : batched.length(s) + n] for s, n in zip(slots, ns)]
        rows = batched.forward(slots, feeds, all_logits=True).split(ns)
        for s, feed, got in zip(slots, feeds, rows):
            assert torch.equal(alone.forward([s], [feed], all_logits=True), got), (name, slots, s)
        for s, n in zip(slots, ns):  # a rejection of all but the first
            for pool in (batched, alone):
                pool.rollback(s, pool.length(s) - n + 1)


@pytest.mark.parametrize("name", ["llama-gqa", "llama-bias-llama3-rope", "int4-self-draft"])
def test_the_one_call_stack_gives_the_per_op_paths_bits(name, monkeypatch):
    """All layers of a decode or verify step in one call of the CPU library (lean_stack) run the per-op path's
    functions in its order: the same logits and captured hidden states, bit for bit, float32 and int4."""
    from adasd_core import paged_attention, selfdraft

    if DEVICE.type != "cpu":
        pytest.skip("a property of the CPU library's path")
    if not paged_attention.kernel_available():
        pytest.fail("gcc is on this kind of machine: the CPU library must build")
    if name == "int4-self-draft":  # widths the library's int4 product takes (multiples of 64)
        target = _model(LlamaForCausalLM, LlamaConfig, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=128, num_hidden_layers=3)
        model = selfdraft.quantised(lean.lean_model(target), "int4", None)
        assert isinstance(model.layers[0][1], selfdraft.Int4Linear) and model.layers[0][1].own
    else:
        target = MODELS[name]()
        model = lean.lean_model(target)
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, SMALL["vocab_size"], (60,), generator=g).tolist() for _ in range(3)]
    pool = kv_cache.make_pool(target, 3, 128)
    for s, n in enumerate((20, 9, 33)):
        pool.forward([s], [seqs[s][:n]])
    capture = (0, 1, model.n_layers, 1)  # the inputs of layers 0 and 1 (twice) and the last layer's output

    def step(slots, ns, env):
        monkeypatch.setenv(lean.STACK_ENV, env)
        model.__dict__.pop("_stack_of", None)
        feeds = [seqs[s][pool.length(s) : pool.length(s) + n] for s, n in zip(slots, ns)]
        paged = lean.Paged([pool.blocks.tables[s] for s in slots], pool.blocks.size)
        out = lean.forward(model, pool.k, pool.v, slots, [pool.length(s) for s in slots], feeds, True, capture,
                           paged=paged)
        assert (model._stack_of[1] is not None) == (env == "1"), "the stack path must run (and only when on)"
        return out

    step([0], [1], "1")  # grows the rotary table once, outside the comparison
    for slots, ns in [([0], [1]), ([0, 1, 2], [1, 1, 1]), ([2, 0], [6, 3]), ([1], [5])]:
        (logits, hidden), (logits_1, hidden_1) = step(slots, ns, "0"), step(slots, ns, "1")
        assert torch.equal(logits, logits_1) and torch.equal(hidden, hidden_1), (name, slots, ns)
        assert hidden.shape == (sum(ns), len(capture) * SMALL["hidden_size"])


def test_unknown_architectures_keep_the_transformers_forward():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).eval()
    assert not lean.supports(gpt2)
    assert isinstance(kv_cache.make_pool(gpt2, 1, 16), kv_cache.HFPool)
    dynamic_rope = _model(LlamaForCausalLM, LlamaConfig, num_attention_heads=4, num_key_value_heads=4,
                          rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    assert not lean.supports(dynamic_rope)
    windowed = _model(MistralForCausalLM, MistralConfig, num_attention_heads=4, num_key_value_heads=2,
                      sliding_window=32)
    assert not lean.supports(windowed)
    split = MODELS["llama"]()
    assert lean.supports(split)
    split.hf_device_map = {"model.embed_tokens": 0, "model.layers": 1, "lm_head": "disk"}  # offloaded to disk
    assert not lean.supports(split)
    split.hf_device_map = {"model.embed_tokens": 0, "model.layers": 1, "lm_head": "cpu"}  # or to the host
    assert not lean.supports(split)
    split.hf_device_map = {"model.embed_tokens": 0, "model.layers": 1, "lm_head": 1}  # spread over two cards
    assert lean.supports(split)
    with torch.device("meta"):
        offloaded = LlamaForCausalLM(split.config)  # what accelerate leaves of weights it loads in hooks
    assert not lean.supports(offloaded)


def test_engine_output_is_the_same_on_either_path(quick_engine, monkeypatch):
    from adasd_core.engine import SpecConfig
    from adasd_core.llm import LLM
    from adasd_core.sampling import SamplingParams

    monkeypatch.setattr(lean, "supports_cached", lambda model: False)
    slow_engine = LLM(quick_engine.pair, calibrate=False, max_running=2)
    monkeypatch.undo()
    fast_engine = LLM(quick_engine.pair, calibrate=False, max_running=2)
    assert isinstance(slow_engine.runner.target, kv_cache.HFPool)
    assert isinstance(fast_engine.runner.target, kv_cache.LeanPool)
    prompt = "def main(args):\n    "
    params = SamplingParams(max_tokens=24, temperature=0.8, seed=3, ignore_eos=True)
    for method in ("ar", "adasd"):
        spec = SpecConfig(method=method)
        fast = fast_engine.generate(prompt, params, spec).token_ids
        assert fast == slow_engine.generate(prompt, params, spec).token_ids


def test_packed_linear_matches_the_plain_one_at_every_row_count():
    """MKL's packed GEMM (CPU, float32) serves any number of rows with the plain product's values."""
    torch.manual_seed(3)
    weight, bias = torch.randn(3072, 576), torch.randn(3072)  # wide enough to keep its packed copy
    lin = lean.Linear(weight, bias)
    if torch.backends.mkl.is_available():
        assert lin.packed is not None
    for rows in (1, 2, 3, 5, 8, 15, 16, 17, 64, 100):
        x = torch.randn(rows, 576)
        torch.testing.assert_close(lin(x), F.linear(x, weight, bias), rtol=1e-5, atol=1e-4)
    assert lean.Linear(weight.double()).packed is None  # other dtypes take the plain product


def test_the_librarys_float32_product_is_the_product_and_the_same_bits_at_any_row_count(monkeypatch):
    """Decode and verify calls (up to F32_ROWS rows) take the CPU library's kernel: the product within float32
    rounding (against float64), output widths off its tiles (of 4 and of 3 weight rows), with and without a bias,
    and each row bitwise the same alone as in any call up to F32_ROWS rows, whatever passes the call's rows take;
    larger calls keep MKL; ADASD_F32_KERNEL=0 and widths it cannot take keep torch's product."""
    from adasd_core import paged_attention

    if not paged_attention.kernel_available():
        pytest.fail("gcc is on this kind of machine: the CPU library must build")
    gen = torch.Generator().manual_seed(5)
    calls = []
    real = paged_attention.f32_matmul
    monkeypatch.setattr(paged_attention, "f32_matmul", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    for n, k, with_bias in ((3, 16, False), (13, 48, True), (960, 576, False), (3071, 576, True)):
        weight = torch.randn(n, k, generator=gen)
        bias = torch.randn(n, generator=gen) if with_bias else None
        lin = lean.Linear(weight, bias)
        assert lin.rows == lean.F32_ROWS
        x = torch.randn(lean.F32_ROWS, k, generator=gen)
        y = lin(x)
        ref = x.double() @ weight.double().T + (0 if bias is None else bias.double())
        assert (y.double() - ref).abs().max() <= 1e-6 * (x.abs() @ weight.abs().T).double().max() + 1e-5, (n, k)
        for rows in ([0], [7], [0, 1], [2, 3, 4], list(range(6)), list(range(1, 8)), list(range(5, 13)),
                     list(range(12)), list(range(13)), list(range(3, 20))):
            assert torch.equal(lin(x[rows]), y[rows]), (n, k, rows)
    assert calls and max(calls) == lean.F32_ROWS
    calls.clear()
    big = lean.Linear(torch.randn(64, 32, generator=gen))
    x = torch.randn(lean.F32_ROWS + 1, 32)
    torch.testing.assert_close(big(x), F.linear(x, big.weight), rtol=1e-5, atol=1e-4)
    assert calls == []  # past F32_ROWS: MKL
    assert lean.Linear(torch.randn(8, 20)).rows == 0  # a width off the kernel's 16 lanes
    assert lean.Linear(torch.randn(8, 32).double()).rows == 0
    assert lean.Linear(torch.randn(32, 8).T).rows == 0  # not contiguous
    monkeypatch.setenv(lean.F32_ENV, "0")
    assert lean.Linear(torch.randn(8, 32)).rows == 0


def test_a_packed_layout_that_would_grow_the_weight_past_the_limit_is_not_kept():
    """MKL's packed layout carries a fixed overhead of a few MB: the default target's output projection
    (576 x 576) packs to ~7x its bytes, its MLP's gate/up (3072 x 576) to under 3x. Only the latter keeps it."""
    if not torch.backends.mkl.is_available():
        pytest.fail("the CPU build of torch here has MKL; this test checks its packed path")
    narrow, wide = lean.Linear(torch.randn(576, 576)), lean.Linear(torch.randn(3072, 576))
    assert narrow.packed is None and wide.packed is not None
    assert wide.packed.numel() <= lean.PACK_MAX_GROWTH * wide.weight.numel()
    x = torch.randn(3, 576)
    torch.testing.assert_close(narrow(x), F.linear(x, narrow.weight), rtol=1e-5, atol=1e-4)


def test_a_subset_head_scores_only_its_tokens_on_either_path():
    """A draft head over part of the vocabulary: the lean path computes those rows only, transformers'
    forward is masked to the same distribution, and every other token has probability 0."""
    from adasd_core import draft_head

    model = MODELS["llama-gqa"]()
    tokens = torch.tensor([0, 3, 5, 17, 40, 41, 96])
    draft_head.attach(model, tokens)
    ref, fast = kv_cache.HFPool(model, 1, 64), kv_cache.make_pool(model, 1, 64)
    assert isinstance(fast, kv_cache.LeanPool) and fast.lean.head.weight.shape[0] == len(tokens)
    ids = torch.randint(0, SMALL["vocab_size"], (12,), generator=torch.Generator().manual_seed(4)).tolist()
    for chunk in (ids[:9], ids[9:10], ids[10:]):
        a, b = ref.forward([0], [chunk], all_logits=True), fast.forward([0], [chunk], all_logits=True)
        outside = torch.ones(SMALL["vocab_size"], dtype=torch.bool)
        outside[tokens] = False
        assert torch.isinf(a[:, outside]).all() and torch.isinf(b[:, outside]).all()
        _close(a[:, tokens], b[:, tokens])
        assert torch.softmax(b, -1)[:, outside].sum() == 0
    with pytest.raises(ValueError, match="past the model's output width"):
        draft_head.attach(model, torch.tensor([SMALL["vocab_size"]]))


def test_int8_linear_is_close_to_the_float_product():
    """Per-row int8 weights with 7-bit dynamic activations: a few tenths of a percent of the output's
    scale, at every row count."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.fail("this CPU build of torch has no fbgemm engine")
    torch.manual_seed(5)
    weight, bias = torch.randn(300, 64) * 0.05, torch.randn(300) * 0.1
    lin = lean.Linear(weight, bias, int8=True)
    assert lin.int8 is not None and lin.packed is None
    for rows in (1, 2, 5, 16, 100):
        x = torch.randn(rows, 64)
        ref = F.linear(x, weight, bias)
        err = (lin(x) - ref).abs().max() / ref.abs().max()
        assert 0 < err < 0.02, (rows, float(err))


def test_a_draft_folder_asks_for_int8_weights(monkeypatch):
    """config adasd_draft.int8_weights: the lean forward quantises the matmuls (CPU, float32);
    ADASD_INT8=0 and other models keep float weights. The argmax mostly survives."""
    import copy

    plain = MODELS["llama-gqa"]().cpu()  # int8 weights are a CPU path
    flagged = copy.deepcopy(plain)
    flagged.config.adasd_draft = {"int8_weights": True}
    assert lean.int8_weights(flagged) and not lean.int8_weights(plain)
    monkeypatch.setenv(lean.INT8_ENV, "0")
    assert not lean.int8_weights(flagged)
    monkeypatch.delenv(lean.INT8_ENV)
    q8, fp = kv_cache.make_pool(flagged, 1, 64), kv_cache.make_pool(plain, 1, 64)
    assert all(lin.int8 is not None for lin in q8.lean.layers[0][1:] if isinstance(lin, lean.Linear))
    assert q8.lean.head.int8 is not None and fp.lean.head.int8 is None
    ids = torch.randint(0, SMALL["vocab_size"], (40,), generator=torch.Generator().manual_seed(6)).tolist()
    a, b = fp.forward([0], [ids], all_logits=True), q8.forward([0], [ids], all_logits=True)
    assert not torch.equal(a, b)
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.8


def test_int8_rows_do_not_depend_on_their_batch_mates():
    """Each row is quantised with its own scale: bitwise the same output alone and in any batch, and
    as precise beside a row 100x larger. fbgemm's one scale per call (ADASD_INT8=call) is neither."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.fail("this CPU build of torch has no fbgemm engine")
    torch.manual_seed(7)
    weight, bias = torch.randn(301, 67) * 0.05, torch.randn(301) * 0.1  # odd widths: vector tails too
    x = torch.randn(40, 67) * torch.logspace(-1, 1, 40)[:, None]
    ref = F.linear(x, weight, bias)
    for per_call in (False, True):
        lin = lean.Linear(weight, bias, int8=True, per_call=per_call)
        alone = torch.cat([lin(x[r : r + 1]) for r in range(40)])
        changed = sum(not torch.equal(lin(x[perm][:m]), alone[perm][:m]) for m in (2, 3, 8, 17, 40)
                      for perm in (torch.arange(40), torch.arange(40).flip(0), torch.randperm(40)))
        err = ((lin(x) - ref).abs().amax(1) / ref.abs().amax(1)).max()
        if per_call:
            assert changed > 0 and err > 0.05, (changed, float(err))
        else:
            assert changed == 0 and err < 0.03, (changed, float(err))


@pytest.mark.parametrize("name", ["llama-gqa", "llama-bias-llama3-rope"])
def test_an_int8_draft_gives_a_sequence_the_same_logits_in_any_batch(name, monkeypatch):
    """The int8 lean forward (rows quantised on their own, attention per sequence): a sequence's logits
    in a ragged batch, with idle slots, rollbacks and prefills beside other prompts, are bitwise those
    it gets alone. With one activation scale per call they are not."""
    import copy

    for per_call in (False, True):
        monkeypatch.setenv(lean.INT8_ENV, "call" if per_call else "1")
        model = copy.deepcopy(MODELS[name]()).cpu()
        model.config.adasd_draft = {"int8_weights": True}
        together, alone = kv_cache.make_pool(model, 4, 256), kv_cache.make_pool(model, 4, 256)
        assert together.lean.int8 and together.lean.int8_per_call == per_call
        g = torch.Generator().manual_seed(3)
        seqs = [torch.randint(0, SMALL["vocab_size"], (200,), generator=g).tolist() for _ in range(4)]
        pos, changed = [0] * 4, 0
        steps = [([0, 1, 2, 3], [30, 5, 1, 12]), ([0, 1, 2, 3], [1, 1, 1, 1]), ([1, 3], [4, 2]), ([0, 2, 3], [6, 1, 3]),
                 ([0, 1, 2, 3], [3, 1, 5, 2]), ([2], [7]), ([0, 1, 3], [21, 1, 2])]
        for slots, ns in steps:
            feeds = [seqs[s][pos[s] : pos[s] + n] for s, n in zip(slots, ns)]
            rows = together.forward(slots, feeds, all_logits=True, alone=True).split(ns)
            for s, f, row in zip(slots, feeds, rows):
                changed += not torch.equal(row, alone.forward([s], [f], all_logits=True))
            for s, n in zip(slots, ns):
                pos[s] += n - min(2, n)  # roll back part of what was fed, as a rejection does
                together.rollback(s, pos[s])
                alone.rollback(s, pos[s])
        assert (changed > 0) == per_call, changed


GQA_MODELS = {
    "llama-gqa": MODELS["llama-gqa"],
    "qwen2": MODELS["qwen2"],
    "llama-mqa-8": lambda: _model(LlamaForCausalLM, LlamaConfig, num_attention_heads=8, num_key_value_heads=1),
}


@pytest.mark.parametrize("name", sorted(GQA_MODELS))
def test_folded_query_groups_match_grouped_heads_and_transformers(name, monkeypatch):
    """Grouped query heads folded into the query rows (one mask row per folded row) give the logits of
    enable_gqa and of transformers: chunked prefill, ragged batches, verify blocks at different starts,
    single decode steps, in any slot order."""
    model = GQA_MODELS[name]()
    g = torch.Generator().manual_seed(7)
    seqs = [torch.randint(0, SMALL["vocab_size"], (220,), generator=g).tolist() for _ in range(3)]
    ref = kv_cache.HFPool(model, 3, 256)
    pools = {fold: kv_cache.make_pool(model, 3, 256) for fold in (True, False)}
    pos = [0] * 3
    steps = [([0], [16]), ([0], [16]), ([0], [9]),  # one prompt prefilled in chunks (the first causal, then masked)
             ([1, 2], [30, 3]), ([0, 1, 2], [5, 1, 12]),  # ragged: a prefill chunk beside decode steps
             ([0, 1, 2], [4, 4, 4]), ([2, 0], [6, 2]),  # verify blocks at different starts, out of slot order
             ([1], [1]), ([0], [5]), ([0, 2], [1, 1]), ([0, 1, 2], [17, 2, 1])]
    for slots, ns in steps:
        feeds = [seqs[s][pos[s] : pos[s] + n] for s, n in zip(slots, ns)]
        want = ref.forward(slots, feeds, all_logits=True)
        got = {}
        for fold, pool in pools.items():
            monkeypatch.setattr(lean, "fold_query_groups", lambda device, fold=fold: fold)
            got[fold] = pool.forward(slots, feeds, all_logits=True)
        torch.testing.assert_close(got[True], got[False], rtol=1e-5, atol=1e-5)
        _close(want, got[True])
        for s, n in zip(slots, ns):
            pos[s] += n - min(1, n - 1)  # keep all but one of a block, as a partial acceptance does
            for pool in (ref, *pools.values()):
                pool.rollback(s, pos[s])


def test_single_sequence_steps_take_no_mask_and_folded_steps_no_enable_gqa(monkeypatch):
    """B == 1: a decode step and a prefill from position 0 pass no mask (the kernel's causal flag for the
    prefill); a verify block after a prefix needs one. Folded calls never pass enable_gqa."""
    model = GQA_MODELS["llama-mqa-8"]()
    pool = kv_cache.make_pool(model, 2, 64)
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, **kw):
        calls.append((tuple(q.shape), None if attn_mask is None else tuple(attn_mask.shape), is_causal, enable_gqa))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(lean, "fold_query_groups", lambda device: True)
    layers, D = model.config.num_hidden_layers, 64 // 8

    def one_call(slots, feeds):
        calls.clear()
        pool.forward(slots, feeds)
        assert len(calls) == layers and len(set(calls)) == 1
        return calls[0]

    assert one_call([0], [[1, 2, 3, 4, 5]]) == ((1, 8, 5, D), None, True, True)  # prefill: causal, grouped heads
    assert one_call([0], [[6]]) == ((1, 1, 8, D), None, False, False)  # decode: 8 folded rows, no mask
    assert one_call([0], [[7, 8, 9]]) == ((1, 1, 24, D), (1, 1, 24, 9), False, False)  # verify: one mask row per row
    assert one_call([0, 1], [[1], [2, 3]]) == ((2, 1, 16, D), (2, 1, 16, 10), False, False)  # ragged batch
    monkeypatch.setattr(lean, "fold_query_groups", lambda device: False)
    assert one_call([0], [[4]]) == ((1, 8, 1, D), None, False, True)
    assert one_call([0, 1], [[1, 2], [3]]) == ((2, 8, 2, D), (2, 1, 2, 13), False, True)


def test_a_model_split_over_devices_keeps_each_layers_kv_on_its_device(monkeypatch):
    """A device map over two cards: each layer's K, V in a buffer on its layer's device, the hidden state
    (and the step's indices) moved at the boundary, the logits transformers' through ragged batches,
    rollbacks and a slot swap. The two devices here are one device under two names (cpu and cpu:0, or
    cuda:0 and cuda), so the per-device plumbing runs on a machine of one device."""
    model = _model(LlamaForCausalLM, LlamaConfig, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4)
    model.hf_device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0,
                           "model.layers.2": 1, "model.layers.3": 1, "model.norm": 1, "lm_head": 1}
    assert lean.supports(model)
    fast_model = lean.lean_model(model)
    here = fast_model.device
    second = torch.device(here.type, 0) if here.index is None else torch.device(here.type)  # the same, named apart
    assert second != here
    fast_model.layer_devices = [fast_model.device] * 2 + [second] * 2  # where that map puts the weights
    fast_model.split = True
    moves = []
    to = lean._to
    monkeypatch.setattr(lean, "_to", lambda device, *ts: moves.append(device) or to(device, *ts))
    ref, fast = kv_cache.HFPool(model, 3, 128), kv_cache.make_pool(model, 3, 128)
    assert isinstance(fast, kv_cache.LeanPool) and [layers for layers, _, _ in fast.buffers] == [[0, 1], [2, 3]]
    assert [k.device for _, k, _ in fast.buffers] == [here] * 2  # (both are this device)
    for i, (layers, k, v) in [(i, b) for b in fast.buffers for i in b[0]]:
        j = layers.index(i)
        assert fast.k[i].data_ptr() == k[j].data_ptr() and fast.v[i].data_ptr() == v[j].data_ptr()

    g = torch.Generator().manual_seed(8)
    seqs = [torch.randint(0, SMALL["vocab_size"], (100,), generator=g).tolist() for _ in range(3)]
    pos = [0] * 3
    for slots, ns in [([0], [12]), ([0, 1, 2], [1, 9, 4]), ([2, 0], [3, 3]), ([1], [1]), ([0, 1, 2], [2, 1, 5])]:
        moves.clear()
        feeds = [seqs[s][pos[s] : pos[s] + n] for s, n in zip(slots, ns)]
        _close(ref.forward(slots, feeds, all_logits=True), fast.forward(slots, feeds, all_logits=True))
        assert moves and set(moves) == {second}  # into the second card's layers, never elsewhere
        for s, n in zip(slots, ns):
            pos[s] += n - min(1, n - 1)
            ref.rollback(s, pos[s])
            fast.rollback(s, pos[s])
    assert fast.buffers[1][1][:, 0, :, : pos[0]].abs().sum() > 0  # the second device's layers hold their KV
    for pool in (ref, fast):
        pool.swap(0, 2)
    seqs[0], seqs[2], pos[0], pos[2] = seqs[2], seqs[0], pos[2], pos[0]
    feeds = [seqs[s][pos[s] : pos[s] + 2] for s in range(3)]
    _close(ref.forward([0, 1, 2], feeds), fast.forward([0, 1, 2], feeds))
