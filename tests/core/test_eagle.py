"""EAGLE-3 heads: the published layout loads, drafting reads the target's states as training does,
every lossless method stays exact with a head as the draft (greedy: the target's tokens; sampled: its
distribution), batched and with rollbacks, and `build-eagle` runs end to end, deterministic and resumable."""

from __future__ import annotations

import json

import pytest
import torch
from draft_checks import (
    LOSSLESS,
    check_mixed_batch_matches_alone,
    check_sampling_keeps_target_distribution,
    small_target,
)
from transformers import LlamaConfig

from adasd_core import eagle
from adasd_core.engine import SpecConfig
from adasd_core.errors import ModelLoadError
from adasd_core.kv_cache import make_pool
from adasd_core.llm import LLM
from adasd_core.models import load_pair
from adasd_core.sampling import SamplingParams


def random_head(target, draft_vocab: int, aux=(0, 1, 1), kv_heads: int = 2, seed: int = 0, std: float = 0.05):
    """A head with random weights for `target`, over a random subset of its vocabulary."""
    torch.manual_seed(seed)
    tc = target.config
    cfg = LlamaConfig(hidden_size=tc.hidden_size, intermediate_size=2 * tc.hidden_size, num_attention_heads=4,
                      num_key_value_heads=kv_heads, head_dim=tc.hidden_size // 4, rms_norm_eps=1e-6,
                      vocab_size=tc.vocab_size, max_position_embeddings=512,
                      rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})
    cfg.draft_vocab_size = draft_vocab
    head = eagle.Eagle3Head(cfg, tc.hidden_size, tc.vocab_size, aux)
    ids = torch.randperm(tc.vocab_size)[:draft_vocab].sort().values
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, std)
        for norm in (head.midlayer.input_layernorm, head.midlayer.hidden_norm,
                     head.midlayer.post_attention_layernorm, head.norm):
            norm.weight.fill_(1.0)
        head.d2t.copy_(ids - torch.arange(draft_vocab))
        head.t2d[ids] = True
    return head


@pytest.fixture(scope="module")
def head_dir(quick_pair_dir, tmp_path_factory):
    """build-eagle's untrained start for the quick target (an early exit after its first layer, which the
    target often agrees with), its layer's weights randomised enough that it also disagrees (on any machine's
    quick target: 0.02 gave full agreement on one CPU), over 300 of the target's tokens."""
    from adasd_core.distill.eagle import new_head

    target = load_pair(str(quick_pair_dir / "target"), None, device="cpu").target
    ids = torch.randperm(target.config.vocab_size, generator=torch.Generator().manual_seed(0))[:300].sort().values
    head = new_head(target, ids, (0, 1, 1))
    with torch.no_grad():
        head.midlayer.self_attn.o_proj.weight.normal_(0, 0.1)
        head.midlayer.mlp.down_proj.weight.normal_(0, 0.1)
    out = tmp_path_factory.mktemp("head") / "eagle3"
    eagle.save(head, out, dtype=torch.float32)
    return out


def test_the_published_layout_round_trips(quick_pair_dir, head_dir):
    from safetensors import safe_open

    with safe_open(head_dir / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
    assert {"fc.weight", "midlayer.hidden_norm.weight", "midlayer.input_layernorm.weight",
            "midlayer.self_attn.q_proj.weight", "midlayer.mlp.down_proj.weight", "norm.weight", "lm_head.weight",
            "d2t", "t2d"} <= keys
    assert not any("embed_tokens" in k for k in keys)  # the target's are shared
    cfg = json.loads((head_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["draft_vocab_size"] == 300
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 1, 1]
    pair = load_pair(str(quick_pair_dir / "target"), str(head_dir), device="cpu")
    head = pair.draft
    assert isinstance(head, eagle.Eagle3Head) and head.aux_layers == (0, 1, 1)
    assert head.embed is pair.target.get_input_embeddings().weight
    assert head.midlayer.self_attn.q_proj.weight.shape[1] == 2 * pair.target.config.hidden_size
    assert int(head.t2d.sum()) == 300 and head.t2d[head.target_ids()].all()


def test_a_published_checkpoint_with_model_prefix_and_bin_weights_loads(quick_pair_dir, head_dir, tmp_path):
    """SGLang's and SpecForge's exports: a PyTorch .bin, names under `model.`, no t2d (derived from d2t)."""
    sd = eagle._state_dict(head_dir)
    out = tmp_path / "bin"
    out.mkdir()
    torch.save({("model." + k if k.startswith("midlayer") else k): v for k, v in sd.items() if k != "t2d"},
               out / "pytorch_model.bin")
    (out / "config.json").write_text((head_dir / "config.json").read_text())
    a = load_pair(str(quick_pair_dir / "target"), str(head_dir), device="cpu").draft
    b = load_pair(str(quick_pair_dir / "target"), str(out), device="cpu").draft
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


@pytest.mark.parametrize("problem", ["layers", "fc", "d2t"])
def test_a_head_that_does_not_fit_the_target_is_refused_clearly(quick_pair_dir, head_dir, tmp_path, problem):
    cfg = json.loads((head_dir / "config.json").read_text())
    sd = eagle._state_dict(head_dir)
    if problem == "layers":
        cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] = [0, 1, 7]
    elif problem == "fc":
        sd["fc.weight"] = sd["fc.weight"][:, :-4]
    else:
        sd["d2t"] = sd["d2t"] + 5000
    out = tmp_path / problem
    out.mkdir()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(cfg))
    words = {"layers": "layers [0, 1, 7]", "fc": "fc.weight", "d2t": "outside the target's vocabulary"}[problem]
    with pytest.raises(ModelLoadError, match="EAGLE-3 head") as err:
        load_pair(str(quick_pair_dir / "target"), str(out), device="cpu")
    assert words in str(err.value)


def test_drafting_reads_the_states_as_training_does(quick_pair_dir, head_dir):
    """The head's catch-up step and its own steps over its KV slot give the logits of the training-time
    forward (Eagle3Head.train_forward) at steps 1, 2 and 3."""
    pair = load_pair(str(quick_pair_dir / "target"), str(head_dir), device="cpu")
    head, target = pair.draft, pair.target
    seq = torch.randint(0, target.config.vocab_size, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    _, states = make_pool(target, 1, 64).forward([0], [seq[:30]], all_logits=True, capture=head.aux_layers)
    with torch.no_grad():
        steps = head.train_forward(states[None], torch.tensor(seq)[None], 3)
    pool, p = make_pool(head, 1, 64), 20
    got = [pool.forward([0], [seq[1 : p + 2]], features=states[: p + 1])]
    for s in (2, 3):
        got.append(pool.forward([0], [[seq[p + s]]], hidden=pool.hidden))
    for step, logits in zip(steps, got):
        torch.testing.assert_close(logits[0, head.target_ids()], step[0, p], atol=2e-5, rtol=1e-4)
        outside = torch.ones(target.config.vocab_size, dtype=torch.bool)
        outside[head.target_ids()] = False
        assert torch.isinf(logits[0, outside]).all()


def test_greedy_with_a_head_is_the_target_alone_for_every_lossless_method(quick_pair_dir, head_dir):
    from adasd_core.demo.data import load_corpus

    pair = load_pair(str(quick_pair_dir / "target"), str(head_dir), device="cpu")
    engine = LLM(pair, calibrate=False)
    tok = pair.tokenizer
    prompts = [tok(text, add_special_tokens=False)["input_ids"][100:140] for _, text in load_corpus().held_out[:3]]
    prompts.append(prompts[0][:1])  # one token: no state to read before the first round
    for prompt in prompts:
        ref = engine.generate(prompt, SamplingParams(max_tokens=40), SpecConfig(method="ar")).token_ids
        for spec in LOSSLESS:
            out = engine.generate(prompt, SamplingParams(max_tokens=40), spec)
            assert out.token_ids == ref, (spec, prompt)
    stats = [engine.generate(p, SamplingParams(max_tokens=40, ignore_eos=True), LOSSLESS[0]).stats for p in prompts]
    assert 0 < sum(s.accepted_tokens for s in stats) < sum(s.drafted_tokens for s in stats)  # accepted and rejected


def test_a_mixed_batch_with_a_head_matches_each_request_alone(quick_pair_dir, head_dir):
    pair = load_pair(str(quick_pair_dir / "target"), str(head_dir), device="cpu")
    engine = LLM(pair, calibrate=False, max_running=4)
    check_mixed_batch_matches_alone(engine)
    assert all(s is None for s in engine.runner.states)


def test_sampling_with_a_head_keeps_the_target_distribution(quick_pair_dir):
    """Chi-square over every 3-token continuation: vanilla and adasd with a head (over part of the
    vocabulary: q = 0 elsewhere) sample the target's own distribution, in batches."""
    target = small_target(5, seed=1)
    head = random_head(target, 4, aux=(0, 1, 1), std=0.3)
    with torch.no_grad():
        head.lm_head.weight.mul_(3.0)  # a draft unlike the target: every path of the check runs
    head.shared_embed = target.get_input_embeddings().weight
    head.eval().requires_grad_(False)
    tok = load_pair(str(quick_pair_dir / "target"), None, device="cpu").tokenizer
    engine, counts, _ = check_sampling_keeps_target_distribution(target, head, tok)
    outside = int((~head.t2d).nonzero()[0])  # never drafted: only the target's residual gives it its mass
    assert sum(k for c, k in counts.items() if outside in c) > 0
    params = SamplingParams(max_tokens=3, temperature=1.0, seed=0)
    assert engine.generate([1, 3], params, SpecConfig(method="vanilla", k=2)).stats.draft_forwards


def test_build_eagle_runs_every_stage_deterministically_and_resumes(quick_pair_dir, tmp_path, monkeypatch):
    from adasd_core.distill import eagle as build

    target = str(quick_pair_dir / "target")
    cfg = build.EagleBuildConfig.quick()
    log = build.build_eagle(tmp_path / "w1", tmp_path / "o1", cfg, target=target, progress=False)
    assert log["train"]["curve"] and len(log["agreement_trained"]["top1_agreement_by_step"]) == cfg.ttt_steps
    assert {"config.json", "model.safetensors", "build_log.json"} <= {p.name for p in (tmp_path / "o1").iterdir()}
    # the same seed on the same machine: the same head
    build.build_eagle(tmp_path / "w2", tmp_path / "o2", cfg, target=target, progress=False)
    # a build stopped after its step-2 checkpoint resumes to the same head
    losses, calls = build.step_losses, []

    def stops(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # one held-out batch, then training steps 1, 2, and here 3
            raise KeyboardInterrupt
        return losses(*args, **kwargs)

    monkeypatch.setattr(build, "step_losses", stops)
    with pytest.raises(KeyboardInterrupt):
        build.build_eagle(tmp_path / "w3", tmp_path / "o3", cfg, target=target, progress=False)
    assert torch.load(tmp_path / "w3" / "eagle_ckpt.pt", weights_only=False)["step"] == 2
    monkeypatch.setattr(build, "step_losses", losses)
    build.build_eagle(tmp_path / "w3", tmp_path / "o3", cfg, target=target, progress=False)
    a, b, c = (eagle._state_dict(tmp_path / f"o{i}") for i in (1, 2, 3))
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    pair = load_pair(target, str(tmp_path / "o1"), device="cpu")
    engine = LLM(pair, calibrate=False)
    prompt = pair.tokenizer("the king said", add_special_tokens=False)["input_ids"]
    ref = engine.generate(prompt, SamplingParams(max_tokens=24), SpecConfig(method="ar")).token_ids
    assert engine.generate(prompt, SamplingParams(max_tokens=24), SpecConfig(method="vanilla")).token_ids == ref


def test_the_shipped_head_loads_for_the_default_target_and_keeps_its_tokens():
    """adasd_core/smollm2_eagle3 (built by build-eagle): the published layout, under the package's size
    budget, drafting on the real target with greedy output equal to the target alone."""
    from adasd_core.model_files import EAGLE_DIR

    assert sum(f.stat().st_size for f in EAGLE_DIR.iterdir()) < 32 * 2**20
    pair = load_pair("smollm2", "smollm2-eagle3", device="cpu", max_model_len=512)
    assert isinstance(pair.draft, eagle.Eagle3Head) and pair.draft.aux_layers == (2, 15, 27)
    engine = LLM(pair, calibrate=False, max_running=1)
    prompt = pair.tokenizer.apply_chat_template([{"role": "user", "content": "Name three primary colours."}],
                                                add_generation_prompt=True, tokenize=False)
    ids = pair.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    ref = engine.generate(ids, params, SpecConfig(method="ar")).token_ids
    out = engine.generate(ids, params, SpecConfig(method="vanilla", k=4))
    assert out.token_ids == ref and out.stats.drafted_tokens > 0
