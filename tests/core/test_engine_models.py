"""The engine on real transformers Llama models: greedy equivalence with the target alone
(ours and transformers' generate), detokenisation, pair loading."""

import shutil

import pytest
import torch

from adasd_core.demo.data import load_corpus
from adasd_core.engine import SpecConfig
from adasd_core.errors import IncompatiblePairError
from adasd_core.llm import LLM
from adasd_core.models import load_pair
from adasd_core.sampling import SamplingParams

LOSSLESS = [
    SpecConfig(method="vanilla", k=5),
    SpecConfig(method="vanilla", k=1),
    SpecConfig(method="gen-only"),
    SpecConfig(method="verify-only", verification="none"),
    SpecConfig(method="adasd", verification="none"),
]


def held_out_prompts(tokenizer, n=4, length=40):
    corpus = load_corpus()
    prompts = []
    for _, text in corpus.held_out[:n]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        prompts.append(ids[200 : 200 + length])
    return prompts


def check_greedy_equivalence(engine, prompts, max_tokens):
    for prompt in prompts:
        ref = engine.generate(prompt, SamplingParams(max_tokens=max_tokens), SpecConfig(method="ar"))
        for spec in LOSSLESS:
            out = engine.generate(prompt, SamplingParams(max_tokens=max_tokens), spec)
            assert out.token_ids == ref.token_ids, (spec, prompt)
            assert out.text == ref.text


def test_greedy_equivalence_quick_pair(quick_engine):
    check_greedy_equivalence(quick_engine, held_out_prompts(quick_engine.pair.tokenizer), 48)


def test_greedy_equivalence_random_pair(random_engine):
    prompts = held_out_prompts(random_engine.pair.tokenizer, n=3)
    check_greedy_equivalence(random_engine, prompts, 40)
    out = random_engine.generate(prompts[0], SamplingParams(max_tokens=40), SpecConfig(method="vanilla"))
    assert out.stats.acceptance_rate < 0.5  # random weights: the draft is mostly rejected


def test_greedy_equivalence_tiny_pair():
    engine = LLM(load_pair("tiny", "tiny", device="cpu"), calibrate=False)
    check_greedy_equivalence(engine, held_out_prompts(engine.pair.tokenizer, n=3, length=64), 64)


def test_ar_matches_transformers_generate(quick_engine):
    pair = quick_engine.pair
    for prompt in held_out_prompts(pair.tokenizer, n=3):
        ours = quick_engine.generate(prompt, SamplingParams(max_tokens=40, ignore_eos=True), SpecConfig(method="ar"))
        ref = pair.target.generate(
            torch.tensor([prompt]), max_new_tokens=40, do_sample=False, min_new_tokens=40,
            pad_token_id=pair.tokenizer.pad_token_id,
        )[0, len(prompt):].tolist()
        assert ours.token_ids == ref


def test_incremental_detokenization_multibyte(quick_engine):
    from adasd_core.detokenize import IncrementalDetokenizer

    tok = quick_engine.pair.tokenizer
    text = "def naïve(x):\n    return 'héllo wörld — 你好 🎉'  # ü\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tok, prompt_ids=tok("x = 1\n", add_special_tokens=False)["input_ids"])
    deltas = [detok.push([t]) for t in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_stream_equals_generate(quick_engine):
    prompt = "import os\n\ndef "
    params = SamplingParams(max_tokens=30)
    full = quick_engine.generate(prompt, params, SpecConfig(method="adasd"))
    deltas = list(quick_engine.stream(prompt, params, SpecConfig(method="adasd")))
    assert "".join(d.text for d in deltas) == full.text
    assert [t for d in deltas for t in d.token_ids] == full.token_ids
    assert [d.finish_reason for d in deltas].count(None) == len(deltas) - 1


def test_logprobs_are_target_logprobs(quick_engine):
    out = quick_engine.generate("def f(", SamplingParams(max_tokens=10, logprobs=3), SpecConfig(method="vanilla"))
    assert len(out.logprobs) == len(out.token_ids)
    for lp, t in zip(out.logprobs, out.token_ids):
        assert lp.token_id == t and lp.logprob <= 0 and len(lp.top) == 3
        assert lp.top[0][0] == t  # greedy: the chosen token is the top one


def test_different_vocabularies_are_refused(quick_pair_dir, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    draft = tmp_path / "draft"
    shutil.copytree(quick_pair_dir / "draft", draft)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (draft / f).unlink()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"])
    tok.train_from_iterator(["something else entirely " * 50], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(draft)
    with pytest.raises(IncompatiblePairError, match="different vocabularies.*sizes"):
        load_pair(str(quick_pair_dir / "target"), str(draft), device="cpu")


def test_missing_tiny_message(monkeypatch, tmp_path):
    import adasd_core.models as models

    monkeypatch.setattr(models, "TINY_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="adasd build-tiny"):
        models.resolve_model_path("tiny", "target")


def test_tokenizer_without_pad_or_eos(quick_pair_dir, caplog):
    from transformers import AutoTokenizer

    from adasd_core.models import _eos_ids, _fix_tokenizer

    tok = AutoTokenizer.from_pretrained(quick_pair_dir / "target")
    tok.pad_token = None
    _fix_tokenizer(tok)
    assert tok.pad_token_id == tok.eos_token_id

    tok.eos_token = None
    tok.pad_token = None
    with caplog.at_level("WARNING"):
        _fix_tokenizer(tok)
    assert "no EOS token" in caplog.text

    class Cfg:
        eos_token_id = [7, 9]

    class Model:
        generation_config = Cfg()
        config = type("C", (), {"eos_token_id": 3})()

    assert _eos_ids(Model(), tok) == {3, 7, 9}  # a list in generation_config (Llama 3 style) counts too
