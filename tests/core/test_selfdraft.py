"""Self-drafting (`--draft self`): the target's own weights quantised at load draft over the target's KV
slots. Every lossless method stays exact (greedy: the target's tokens, alone and in mixed batches;
sampled: its distribution), the verify pass leaves the target's cache exactly as the target alone writes
it, the draft holds no KV of its own, and bad settings are refused clearly."""

from __future__ import annotations

import subprocess

import pytest
import torch
from draft_checks import (
    LOSSLESS,
    check_mixed_batch_matches_alone,
    check_sampling_keeps_target_distribution,
    small_target,
)

from adasd_core import lean, paged_attention, selfdraft
from adasd_core.engine import SpecConfig
from adasd_core.errors import ModelLoadError
from adasd_core.kv_cache import SharedPool, kv_bytes_per_slot, make_pool, plan_blocks
from adasd_core.llm import LLM
from adasd_core.model_files import locate
from adasd_core.models import load_pair
from adasd_core.sampling import SamplingParams

PRECISIONS = ["self:int8", "self"]  # self: int4


def _prompts(tok) -> list[list[int]]:
    from adasd_core.demo.data import load_corpus

    prompts = [tok(text, add_special_tokens=False)["input_ids"][100:140] for _, text in load_corpus().held_out[:3]]
    return [*prompts, prompts[0][:1]]  # and a one-token prompt


@pytest.mark.parametrize("draft", PRECISIONS)
def test_greedy_self_draft_is_the_target_alone_for_every_lossless_method(draft):
    pair = load_pair("tiny", draft, device="cpu")  # trained, 12 layers: its quantised copy disagrees at times
    engine = LLM(pair, calibrate=False)
    assert isinstance(engine.runner.draft, SharedPool) and engine.runner.draft.k is engine.runner.target.k
    drafted = accepted = 0
    for prompt in _prompts(pair.tokenizer):
        ref = engine.generate(prompt, SamplingParams(max_tokens=40, ignore_eos=True), SpecConfig(method="ar"))
        for spec in LOSSLESS:
            out = engine.generate(prompt, SamplingParams(max_tokens=40, ignore_eos=True), spec)
            assert out.token_ids == ref.token_ids, (draft, spec, prompt)
            drafted, accepted = drafted + out.stats.drafted_tokens, accepted + out.stats.accepted_tokens
    assert 0 < accepted < drafted  # both paths of the check ran


def test_the_verify_pass_leaves_the_targets_cache_as_the_target_alone_writes_it():
    """The draft's provisional K/V are overwritten: after the same tokens, the target's slot holds what
    `ar` wrote there (a stale draft entry would differ: the draft's weights are quantised)."""
    pair = load_pair("tiny", "self:int4", device="cpu")
    engine = LLM(pair, calibrate=False, max_running=1, prefix_caching=False)  # each run writes its own prompt
    prompt = _prompts(pair.tokenizer)[0]
    caches = {}
    for method in ("ar", "vanilla"):
        gen = engine.start(prompt, SamplingParams(max_tokens=30, ignore_eos=True), SpecConfig(method=method, k=4))
        while not gen.finished:
            gen.step()
            if gen.seq.slot is not None:
                slot, pool = gen.seq.slot, engine.runner.target
                n = pool.length(slot)
                if n <= caches.get(method, (0,))[0]:  # a finished sequence's slot is freed
                    continue
                caches[method] = (n, *pool.kv(slot), gen.seq.tokens[:])
                assert engine.runner.kv_tokens([slot]) == (n, 0)  # the draft holds none of its own
        if method == "vanilla":  # every drafted position was written by the draft first (rejections: the greedy test)
            assert gen.stats.drafted_tokens > 0 and gen.stats.accepted_tokens > 0
        gen.close()
    (n_ar, k_ar, v_ar, t_ar), (n_sd, k_sd, v_sd, t_sd) = caches["ar"], caches["vanilla"]
    n = min(n_ar, n_sd)
    assert n > len(prompt) and t_ar[:n] == t_sd[:n]
    # equal up to the float rounding of a verify's several rows against ar's one-row products ...
    assert (k_ar[:, :, :n] - k_sd[:, :, :n]).abs().max() < 1e-4 and (v_ar[:, :, :n] - v_sd[:, :, :n]).abs().max() < 1e-4
    # ... far below what the quantised draft writes at the same positions
    alone = make_pool(pair.draft, 1, n + 1)
    alone.forward([0], [t_ar[:n]])
    assert (alone.kv(0)[0][:, :, :n] - k_ar[:, :, :n]).abs().max() > 1e-2


def test_a_mixed_batch_with_a_self_draft_matches_each_request_alone():
    pair = load_pair("tiny", "self:int8", device="cpu")
    engine = LLM(pair, calibrate=False, max_running=4)
    check_mixed_batch_matches_alone(engine)


def test_sampling_with_a_self_draft_keeps_the_target_distribution(quick_pair_dir):
    """Chi-square over every 3-token continuation of a small target drafted by its own int4 copy with a
    head over part of the vocabulary (q = 0 elsewhere), in batches."""
    target = small_target(5, seed=1)
    draft = selfdraft.SelfDraft(target, "int4", torch.tensor([0, 1, 3, 4]))
    tok = load_pair(str(quick_pair_dir / "target"), None, device="cpu").tokenizer
    _, counts, stats = check_sampling_keeps_target_distribution(target, draft, tok)
    assert sum(k for c, k in counts.items() if 2 in c) > 0  # outside the head: the target's residual alone
    drafted = sum(s.drafted_tokens for s in stats)
    assert 0 < sum(s.accepted_tokens for s in stats) < drafted


def test_the_self_draft_holds_no_kv_and_quantises_without_copying_the_target(quick_pair_dir):
    pair = load_pair(str(quick_pair_dir / "target"), "self", device="cpu")
    assert pair.draft.precision == "int4"
    assert kv_bytes_per_slot(pair.draft, 128) == 0
    _, per_block = plan_blocks(pair, 4)
    assert per_block == kv_bytes_per_slot(pair.target, 16)
    lm = pair.draft.lean_model()
    # int4 where the input width takes a kernel's groups (q/k/v, o, gate/up: 64 wide), int8 where not (down: 172)
    kinds = {type(m).__name__ for m in lm.layers[0][1:] if not isinstance(m, torch.Tensor)}
    assert kinds == {"Int4Linear", "Linear"}
    target = lean.lean_model(pair.target)
    assert lm.embed is target.embed and lm.norm is target.norm  # shared, not copied
    assert lm.layers[0][1].weight is not target.layers[0][1].weight
    # the channel scales live in the draft's own norm weights; plain rounding shares the target's
    assert pair.draft.calibration and lm.layers[0][0] is not target.layers[0][0]
    plain = load_pair(str(quick_pair_dir / "target"), "self:int4-rtn", device="cpu").draft
    assert plain.calibration is None and plain.lean_model().layers[0][0] is lean.lean_model(plain.target).layers[0][0]


def _window() -> int:
    from adasd_core.drafting import WINDOW

    return WINDOW


def test_bad_self_draft_settings_are_refused_clearly(quick_pair_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="precision 'int3'"):
        locate("self:int3", "draft")
    with pytest.raises(ModelLoadError, match="pass it to --draft"):
        locate("self", "target")
    with pytest.raises(ModelLoadError, match="head_tokens.json"):
        load_pair(str(quick_pair_dir / "target"), f"self:int8:{tmp_path}", device="cpu")
    # a head subset from a draft folder's file, and the full head on request
    head = tmp_path / "head"
    head.mkdir()
    (head / "head_tokens.json").write_text('{"tokens": [5, 9, 100]}')
    pair = load_pair(str(quick_pair_dir / "target"), f"self:int8:{head}", device="cpu")
    assert pair.draft.tokens.tolist() == [5, 9, 100]
    assert load_pair(str(quick_pair_dir / "target"), "self:int8:full", device="cpu").draft.tokens is None


def test_the_default_draft_is_the_self_draft_on_a_cpu_and_the_distilled_one_elsewhere(quick_pair_dir):
    from adasd_core.models import default_draft

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert default_draft("smollm2", cpu, torch.float32) == "self"
    assert default_draft("smollm2", cuda, torch.bfloat16) == "smollm2"
    assert default_draft("smollm2", cpu, torch.bfloat16) == "smollm2"  # self-drafting quantises float32 only
    with pytest.raises(ModelLoadError, match="pass a draft model"):
        default_draft("org/other-model", cuda, torch.bfloat16)
    assert locate("auto", "draft").path == "auto"  # the front end leaves it to the worker, which knows the device
    pair = load_pair(str(quick_pair_dir / "target"), "auto", device="cpu")
    assert pair.draft_name == "self" and isinstance(pair.draft, selfdraft.SelfDraft)


@pytest.mark.parametrize("draft", PRECISIONS)
def test_self_draft_rows_are_the_same_batched_or_alone_for_reproducible_requests(draft):
    """A seeded request's draft rows must not depend on its batch mates: with `alone` (the batch holds a
    reproducible request) each row is bitwise what its sequence gets alone."""
    pair = load_pair("tiny", draft, device="cpu")
    pool = make_pool(pair.draft, 6, 128)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, pair.vocab_size, (n,), generator=gen).tolist() for n in (20, 35, 7, 50, 12, 28)]
    pool.forward(list(range(6)), prompts, alone=True)
    alone = []
    for s in range(6):
        alone.append(pool.forward([s], [[100 + s]], alone=True)[0])
        pool.rollback(s, len(prompts[s]))
    for batch in ([0, 1], [0, 1, 2, 3], list(range(6)), [1, 3, 5]):
        out = pool.forward(batch, [[100 + s] for s in batch], alone=True)
        for i, s in enumerate(batch):
            assert torch.equal(out[i], alone[s]), (draft, batch, s)
            pool.rollback(s, len(prompts[s]))


@pytest.fixture(params=["native", "no-vnni"])
def int4_library(request, tmp_path, monkeypatch):
    """The CPU library as this machine builds it, and built without AVX-512 VNNI (the float path other
    CPUs take), swapped in for the test."""
    assert paged_attention.kernel_available(), "the CPU kernel did not build (see the warning)"
    if request.param == "no-vnni":
        lib = tmp_path / "no_vnni.so"
        subprocess.run(["gcc", *paged_attention.FLAGS, "-mno-avx512vnni", "-shared", str(paged_attention.SOURCE),
                        "-o", str(lib), "-lm"], check=True, capture_output=True)
        monkeypatch.setattr(paged_attention, "_lib", paged_attention._load(lib))
    return request.param


def test_the_cpu_librarys_int4_product_is_the_dequantised_product_and_batch_invariant(int4_library):
    """int4_matmul against its codes' dequantised weights in float64 (int8 activations where the CPU has VNNI
    bound the error), for row counts across its tiles, output widths off its blocks of 16, with and without a
    bias; each row bitwise the same alone as in any batch."""
    gen = torch.Generator().manual_seed(0)
    for n, k, bias in ((10, 64, True), (67, 128, False), (256, 576, True)):
        codes = torch.randint(0, 16, (n, k), generator=gen)
        scale = torch.rand(n, k // 64, generator=gen) * 0.01
        low = -torch.rand(n, k // 64, generator=gen) * 0.08
        packed, sm = paged_attention.int4_pack(codes, scale, low)
        deq = (codes.double().reshape(n, k // 64, 64) * scale.bfloat16().double()[..., None]
               + low.bfloat16().double()[..., None]).reshape(n, k)
        b = torch.randn(n, generator=gen) if bias else None
        x = torch.randn(9, k, generator=gen)
        ref = x.double() @ deq.T + (0 if b is None else b.double())
        y = paged_attention.int4_matmul(x, packed, sm, b, n)
        assert y.shape == (9, n)
        # int8 activations: each product off by at most |w| amax(x) / 254; float activations: rounding alone
        bound = (deq.abs().sum(1) * x.abs().amax(1, keepdim=True) / 254).max() if int4_library == "native" else 1e-4
        assert (y.double() - ref).abs().max() <= bound, (n, k, int4_library)
        for rows in ([0], [3], [0, 1, 2], [4, 5, 6, 7, 8], list(range(9))):
            assert torch.equal(paged_attention.int4_matmul(x[rows], packed, sm, b, n), y[rows]), (n, k, rows)


def test_int4_weights_reconstruct_each_group_within_half_a_step():
    """Int4Linear's codes, scale and minimum per group of 64 (read back through the product of the identity)
    put each weight within half a step of its value (the step: the group's range over 15; bf16 scale and
    minimum add a little), a constant group exactly, and keep a group's extremes."""
    gen = torch.Generator().manual_seed(1)
    n, k = 48, 192
    w = torch.randn(n, k, generator=gen) * 0.05
    w[0, :64] = 0.0  # a constant group
    w[1, 5] = 2.0  # an outlier
    lin = selfdraft.Int4Linear(w, None)
    assert lin.own
    deq = lin(torch.eye(k)).T.double().reshape(n, k // 64, 64)  # one-hot rows: exact in int8 activations too
    g = w.double().reshape(n, k // 64, 64)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    step = (hi - lo) / 15
    bf16 = (lo.abs() + 15 * step) * 2 ** -8  # the stored scale's and minimum's rounding, at most
    assert (deq[0, 0] == 0).all()
    assert ((deq - g).abs() <= step / 2 + bf16).all(), ((deq - g).abs() - step / 2).max()
    assert ((deq.amax(-1, keepdim=True) - hi).abs() <= bf16).all()
    assert ((deq.amin(-1, keepdim=True) - lo).abs() <= bf16).all()


def test_int4_weights_packed_in_slices_of_rows_are_the_whole_matrix_packed(monkeypatch):
    """A matrix taller than Int4Linear's slice (a vocabulary's head) packs slice by slice, to bound its
    temporaries: the same bytes and scales as its codes packed at once, for rows off the slice and the block,
    on the CPU library's layout and on torch's kernel's (k off the library's group of 64)."""
    monkeypatch.setattr(selfdraft, "PACK_ROWS", 32)
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(100, 128, generator=gen)
    lin = selfdraft.Int4Linear(w, None)
    assert lin.own
    q, scale, lo = selfdraft.int4_codes(w.reshape(100, 2, 64))
    packed, sm = paged_attention.int4_pack(q.reshape(100, 128), scale[..., 0], lo[..., 0])
    assert torch.equal(lin.packed, packed) and torch.equal(lin.scales, sm)

    w = torch.randn(96, 96, generator=gen)  # 96 % 64: torch's kernel, its group of 32
    lin = selfdraft.Int4Linear(w, None)
    assert not lin.own and lin.group == 32
    q, scale, lo = selfdraft.int4_codes(w.reshape(96, 3, 32))
    zero = lo + 8 * scale
    assert torch.equal(lin.packed, torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.reshape(96, 96), 1))
    assert torch.equal(lin.scales,
                       torch.stack((scale[..., 0], zero[..., 0]), -1).transpose(0, 1).contiguous().bfloat16())


def test_activation_aware_scales_fold_exactly_and_favour_the_loud_channels():
    """The int4 precision's channel scales (AWQ-style) change no function before rounding: the smoothed
    float layers give the target's logits; the scales are not all one; and where one input channel's
    activations run 40x the others, the chosen scales round the product closer than plain rounding."""
    from adasd_core.kv_cache import LeanPool

    pair = load_pair("tiny", None, device="cpu")
    target = lean.lean_model(pair.target)
    ids = _prompts(pair.tokenizer)[0]
    scales = selfdraft.layer_scales(target, pair.target, selfdraft.calibration_ids(pair.tokenizer, 256))
    smooth = selfdraft.smoothed(target, scales)
    assert any(not torch.equal(a[i], b[i]) for a, b in zip(smooth.layers, target.layers) for i in (0, 3))
    ref = LeanPool(target, 1, 64).forward([0], [ids], all_logits=True)
    out = LeanPool(smooth, 1, 64).forward([0], [ids], all_logits=True)
    assert (out - ref).abs().max() <= 1e-3 * ref.abs().max()

    gen = torch.Generator().manual_seed(2)
    w = torch.randn(96, 128, generator=gen) * 0.05
    x = torch.randn(200, 128, generator=gen)
    x[:, 7] *= 40
    s = selfdraft.channel_scales(w, x)
    assert s[7] > s.median()

    def err(scale):
        return ((x / scale) @ selfdraft.rounded(w * scale).T - x @ w.T).pow(2).mean()

    assert err(s) < 0.9 * err(torch.ones(128))


def test_the_warm_state_identity_follows_how_the_self_draft_was_built(quick_pair_dir, monkeypatch):
    """Statistics learned on one quantisation must not load for another under the same --draft name: the
    precision, the calibration, the head's rows and the quantiser's version are all in the pair's identity."""
    from adasd_core.warm import pair_identity

    target = str(quick_pair_dir / "target")
    base = load_pair(target, "self", device="cpu")
    ident = pair_identity(base, {"window": 20})
    assert pair_identity(load_pair(target, "self", device="cpu"), {"window": 20}) == ident  # a restart
    for name in ("self:int4-rtn", "self:int8"):  # no calibration; int8
        assert pair_identity(load_pair(target, name, device="cpu"), {"window": 20}) != ident, name
    other = load_pair(target, "self", device="cpu")
    other.draft = selfdraft.SelfDraft(other.target, "int4", torch.tensor([0, 1, 3, 4]), base.draft.calibration)
    assert pair_identity(other, {"window": 20}) != ident  # a head over part of the vocabulary
    monkeypatch.setattr(selfdraft, "QUANTISER_VERSION", selfdraft.QUANTISER_VERSION + 1)
    rebuilt = load_pair(target, "self", device="cpu")
    assert rebuilt.draft_name == base.draft_name and pair_identity(rebuilt, {"window": 20}) != ident
