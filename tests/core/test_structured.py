"""Structured outputs and sampling controls under speculation, on Markov-chain models: greedy equal to
`ar` under the same grammar, sampled distributions equal to the processed target's (chi-square),
forced tokens, errors and dead ends."""

import itertools
import re
from collections import Counter

import pytest
import torch
from scipy.stats import chisquare
from toy import markov_pair, random_tables

from adasd_core.engine import SpecConfig
from adasd_core.errors import InvalidRequestError
from adasd_core.grammar import GrammarDeadEnd, GrammarSpec, apply_bitmask
from adasd_core.llm import LLM
from adasd_core.sampling import SamplingParams

V = 6  # letters a-e, then EOS
LETTERS = "abcde"


def engine(seed: int, sharpness: float = 2.0) -> tuple[LLM, torch.Tensor, torch.Tensor]:
    target, draft = random_tables(V, seed, sharpness)
    return LLM(markov_pair(target, draft, eos=True), calibrate=False), target, draft


LOSSLESS = [SpecConfig(method="vanilla", k=3), SpecConfig(method="gen-only"),
            SpecConfig(method="adasd", verification="none"), SpecConfig(method="hybrid", k=2, verification="none")]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("spec", LOSSLESS, ids=lambda s: s.method)
def test_greedy_equals_ar_under_the_grammar(seed, spec):
    eng, _, _ = engine(seed)
    pattern = "[abc][a-e]d(ab|ba|cc)+e"
    grammar = GrammarSpec("regex", pattern)
    ref = eng.generate([0], SamplingParams(max_tokens=14, grammar=grammar), SpecConfig(method="ar"))
    out = eng.generate([0], SamplingParams(max_tokens=14, grammar=grammar), spec)
    assert out.token_ids == ref.token_ids
    assert re.fullmatch(pattern, out.text) or (out.finish_reason == "length" and re.match("[abc][a-e]d", out.text))
    free = eng.generate([0], SamplingParams(max_tokens=14), SpecConfig(method="ar"))
    assert free.text != out.text  # the grammar changed the output: the test exercises the mask
    assert out.stats.drafted_tokens > 0


def test_a_finished_grammar_ends_with_eos():
    eng, _, _ = engine(3)
    out = eng.generate([0], SamplingParams(max_tokens=20, grammar=GrammarSpec("regex", "ab(c|d)")),
                       SpecConfig(method="vanilla", k=4))
    assert re.fullmatch("ab(c|d)", out.text) and out.finish_reason == "stop"


CLASSES = ["abc", "d", "abcde", "bd"]  # a product language: the mask at position i is CLASSES[i]


def _masked_joint(table: torch.Tensor, temperature: float) -> dict[tuple, float]:
    probs = torch.softmax(table.double() / temperature, dim=-1)
    out = {}
    for seq in itertools.product(*[[LETTERS.index(c) for c in cls] for cls in CLASSES]):
        p, prev = 1.0, 0
        for t, cls in zip(seq, CLASSES):
            allowed = [LETTERS.index(c) for c in cls]
            p *= float(probs[prev, t] / probs[prev, allowed].sum())
            prev = t
        out[seq] = p
    return out


def _pvalue(counts: Counter, exact: dict, n: int) -> float:
    cells = list(exact)
    assert sum(counts[c] for c in cells) == n  # nothing outside the language
    return chisquare([counts[c] for c in cells], [n * exact[c] for c in cells]).pvalue


@pytest.mark.parametrize("spec", LOSSLESS[:3], ids=lambda s: s.method)
def test_sampling_reproduces_the_masked_target_distribution(spec):
    eng, target, draft = engine(7, sharpness=1.0)
    grammar = GrammarSpec("regex", "".join(f"[{c}]" for c in CLASSES))
    n, temperature = 3000, 0.9
    counts = Counter()
    for seed in range(n):
        out = eng.generate([0], SamplingParams(max_tokens=4, temperature=temperature, seed=seed, grammar=grammar), spec)
        counts[tuple(out.token_ids)] += 1
    assert _pvalue(counts, _masked_joint(target, temperature), n) > 1e-3
    assert _pvalue(counts, _masked_joint(draft, temperature), n) < 1e-6  # power: the draft's is told apart


CONTROLS = dict(presence_penalty=0.7, frequency_penalty=0.5, repetition_penalty=1.3, logit_bias={2: 1.5})


def _controlled_joint(table: torch.Tensor, temperature: float, prompt: list[int], length: int) -> dict[tuple, float]:
    out = {}
    for seq in itertools.product(range(V - 1), repeat=length):  # EOS never wins here (checked by the caller)
        p, prev = 1.0, prompt[-1]
        for i, t in enumerate(seq):
            logits = table[prev].double().clone()
            counts = torch.bincount(torch.tensor(seq[:i], dtype=torch.long), minlength=V).double()
            seen = (counts > 0) | torch.isin(torch.arange(V), torch.tensor(prompt))
            r = CONTROLS["repetition_penalty"]
            logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
            logits = logits - CONTROLS["frequency_penalty"] * counts - CONTROLS["presence_penalty"] * (counts > 0)
            logits[2] += CONTROLS["logit_bias"][2]
            p *= float(torch.softmax(logits / temperature, -1)[t])
            prev = t
        out[seq] = p
    return out


@pytest.mark.parametrize("spec", [SpecConfig(method="vanilla", k=2), SpecConfig(method="adasd", verification="none")],
                         ids=lambda s: s.method)
def test_sampling_controls_stay_exact(spec):
    target, draft = random_tables(V, 11, sharpness=1.0)
    target[:, V - 1] = draft[:, V - 1] = -30.0  # no EOS: every sample has the full length
    eng = LLM(markov_pair(target, draft, eos=True), calibrate=False)
    n, temperature, prompt = 4000, 1.0, [0, 1]
    counts = Counter()
    for seed in range(n):
        out = eng.generate(prompt, SamplingParams(max_tokens=3, temperature=temperature, seed=seed, **CONTROLS), spec)
        counts[tuple(out.token_ids)] += 1
    exact = _controlled_joint(target, temperature, prompt, 3)
    plain = {}
    for seq in exact:  # the same chain without the controls: the test tells them apart
        p, prev = 1.0, prompt[-1]
        for t in seq:
            p *= float(torch.softmax(target[prev].double() / temperature, -1)[t])
            prev = t
        plain[seq] = p
    for lo in range(2):  # pairs of positions, as the engine's own distribution tests
        cells = list(itertools.product(range(V - 1), repeat=2))
        obs = [sum(v for k, v in counts.items() if k[lo : lo + 2] == c) for c in cells]
        expected = [n * sum(p for s, p in exact.items() if s[lo : lo + 2] == c) for c in cells]
        assert chisquare(obs, expected).pvalue > 1e-3
    cells = list(itertools.product(range(V - 1), repeat=2))
    obs = [sum(v for k, v in counts.items() if k[:2] == c) for c in cells]
    expected = [n * sum(p for s, p in plain.items() if s[:2] == c) for c in cells]
    assert chisquare(obs, [e * n / sum(expected) for e in expected]).pvalue < 1e-6


def test_logit_bias_keeps_a_token_out():
    eng, _, _ = engine(4)
    free = eng.generate([0], SamplingParams(max_tokens=20, ignore_eos=True), SpecConfig(method="vanilla", k=3))
    banned = Counter(free.token_ids).most_common(1)[0][0]
    out = eng.generate([0], SamplingParams(max_tokens=20, ignore_eos=True, logit_bias={banned: -100.0}),
                       SpecConfig(method="vanilla", k=3))
    assert banned not in out.token_ids and len(out.token_ids) == 20


def test_stop_token_ids_end_the_output():
    eng, _, _ = engine(4)
    free = eng.generate([0], SamplingParams(max_tokens=20, ignore_eos=True), SpecConfig(method="ar"))
    stop = free.token_ids[5]
    out = eng.generate([0], SamplingParams(max_tokens=20, ignore_eos=True, stop_token_ids=[stop]),
                       SpecConfig(method="adasd"))
    assert out.token_ids == free.token_ids[: free.token_ids.index(stop) + 1] and out.finish_reason == "stop"


def test_forced_tokens_skip_drafting_and_say_so():
    eng, _, _ = engine(5)
    gen = eng.start([0], SamplingParams(max_tokens=12, grammar=GrammarSpec("regex", "abcd[a-e]+")),
                    SpecConfig(method="adasd", token_sources=True))
    sources = []
    while not gen.finished:
        delta = gen.step()
        sources += [s.source for s in delta.sources]
    gen.close()
    assert sources[:4] == ["forced"] * 4 and "forced" not in sources[4:]
    assert gen.stats.forced_tokens == 4 and gen.stats.generated_tokens == 12


@pytest.mark.parametrize("seed", [0, 1])
def test_forced_runs_inside_a_draft_take_no_draft_step(seed):
    """After each free letter the grammar forces "cde": inside a draft those candidates are taken without a
    draft step (fed with the letter before them to the next step), reported as forced, and the output is
    still the target's alone under the grammar."""
    eng, _, _ = engine(seed)
    grammar = GrammarSpec("regex", "([ab]cde){3}")
    ref = eng.generate([0], SamplingParams(max_tokens=13, grammar=grammar), SpecConfig(method="ar"))
    gen = eng.start([0], SamplingParams(max_tokens=13, grammar=grammar),
                    SpecConfig(method="vanilla", k=12, token_sources=True))
    ids, sources = [], []
    while not gen.finished:
        delta = gen.step()
        ids += delta.token_ids
        sources += [s.source for s in delta.sources]
    gen.close()
    assert ids == ref.token_ids and re.fullmatch("([ab]cde){3}", ref.text)
    letters = [eng.pair.tokenizer.decode([t]) for t in ids]
    assert all(s == "forced" for s, ch in zip(sources, letters) if ch in ("c", "d", "e"))
    assert all(s != "forced" for s, ch in zip(sources, letters) if ch in ("a", "b"))
    st = gen.stats
    # every draft step samples a free letter: the forced runs ride along as candidates, counted as forced
    # (not drafted: no step chose them), so only the sampled letters are drafted
    forced_in_draft = sum(1 for s, ch in zip(sources, letters) if s == "forced")
    assert st.forced_tokens == forced_in_draft == 9
    assert st.drafted_tokens <= st.draft_forwards <= 4 * st.rounds
    assert st.drafted_tokens == sum(st.drafted_by_position) and st.accepted_tokens <= st.drafted_tokens


@pytest.mark.parametrize("spec, param", [
    (GrammarSpec("regex", "(["), "response_format"),
    (GrammarSpec("json_schema", '{"type": "strin"}', "response_format.json_schema.schema"),
     "response_format.json_schema.schema"),
    (GrammarSpec("json_schema", '{"not": {"type": "string"}}', "guided_json"), "guided_json"),
])
def test_bad_grammars_are_request_errors(spec, param):
    eng, _, _ = engine(0)
    with pytest.raises(InvalidRequestError) as err:
        eng.new_sequence([0], SamplingParams(grammar=spec))
    assert err.value.param == param


def test_logit_bias_outside_the_vocabulary():
    eng, _, _ = engine(0)
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        eng.new_sequence([0], SamplingParams(logit_bias={V: 1.0}))


def test_a_dead_end_ends_that_request_alone():
    eng, _, _ = engine(6)
    grammar = GrammarSpec("regex", "[a-e]+")
    doomed = eng.new_sequence([0], SamplingParams(max_tokens=10, grammar=grammar), SpecConfig(method="adasd"))
    other = eng.new_sequence([0], SamplingParams(max_tokens=10, grammar=grammar), SpecConfig(method="adasd"))
    alone = eng.generate([0], SamplingParams(max_tokens=10, grammar=grammar), SpecConfig(method="adasd"))
    real_mask = doomed.constraint.mask

    def mask():
        if doomed.constraint.consumed >= 3:
            raise GrammarDeadEnd("no token")
        return real_mask()

    doomed.constraint.mask = mask
    tokens = eng.run_together([doomed, other])
    assert doomed.finish_reason == "grammar_dead_end" and 3 <= len(tokens[0]) < 10
    assert tokens[1] == alone.token_ids and other.finish_reason == "length"


def _bitmask(allowed: set[int], vocab: int) -> torch.Tensor:
    """llguidance's layout: bit t % 32 of int32 word t // 32 says token t is allowed."""
    words = [0] * ((vocab + 31) // 32)
    for t in allowed:
        words[t // 32] |= 1 << (t % 32)
    return torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)


def test_a_draft_row_the_mask_empties_proposes_uniformly_over_the_allowed_tokens():
    # a draft head over a subset of the vocabulary (tokens 0-3 here) has -inf logits elsewhere: a mask that
    # allows only tokens outside it leaves the row empty, and the draft must still propose an allowed token
    vocab = 40
    logits = torch.full((2, vocab), float("-inf"))
    logits[:, :4] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    masks = [_bitmask({5, 33}, vocab), _bitmask({1, 2, 33}, vocab)]
    target = logits.clone()
    apply_bitmask(target, [0, 1], masks)
    assert torch.isinf(target[0]).all()  # the target's rows are not changed into a proposal
    draft = logits.clone()
    apply_bitmask(draft, [0, 1], masks, uniform_fallback=True)
    probs = torch.softmax(draft, dim=-1)
    assert probs[0, 5].item() == pytest.approx(0.5) and probs[0, 33].item() == pytest.approx(0.5)
    assert probs[1].nonzero().flatten().tolist() == [1, 2]  # a row with allowed tokens left: only masked
    assert draft[1, 1].item() == 2.0 and draft[1, 2].item() == 3.0


@pytest.mark.parametrize("fallback", [False, True])
def test_the_cpu_librarys_bitmask_gives_the_torch_paths_logits(fallback, monkeypatch):
    from adasd_core import grammar, paged_attention

    assert paged_attention.kernel_available()
    vocab = 49152 + 37  # a last word that is partly past the vocabulary
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, vocab, generator=g)
    logits[3, 100:] = float("-inf")  # a subset head's row, emptied by its mask below
    masks = [_bitmask(set(torch.randint(0, vocab, (n,), generator=g).tolist()), vocab) for n in (1, 700, 30000)]
    masks.append(_bitmask(set(range(200, 300)), vocab))
    masks.append(torch.full(((vocab + 31) // 32,), -1, dtype=torch.int32))  # everything allowed
    rows = [4, 0, 2, 3, 1]
    got = logits.clone()
    grammar.apply_bitmask(got, rows, masks, uniform_fallback=fallback)
    monkeypatch.setattr(paged_attention, "kernel_available", lambda: False)
    want = logits.clone()
    grammar.apply_bitmask(want, rows, masks, uniform_fallback=fallback)
    assert torch.equal(got, want)
    assert torch.isinf(got[3]).all() != fallback  # the emptied row: uniform over its allowed tokens or left empty
