"""`adasd build-draft` end to end on the quick pair (seconds): every stage runs, the build is
deterministic given the seed, training resumes from its checkpoint to the same weights, the
export is the package format that assembly and loading expect, and no held-out prompt leaks."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from adasd_core import draft_head
from adasd_core.distill import build as draft_build
from adasd_core.distill import prompts as draft_prompts
from adasd_core.distill import train as draft_train


@pytest.fixture(scope="module")
def quick_build(quick_pair_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("draft_build")
    log = draft_build.build_draft(root / "work", root / "out", draft_build.DraftBuildConfig.quick(),
                                  target=str(quick_pair_dir / "target"), progress=False)
    return root, log


def test_every_stage_runs_and_reports(quick_build, quick_pair_dir):
    root, log = quick_build
    out = root / "out"
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "head_tokens.json", "REPORT.md",
                                               "report.json", "generation_config.json"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["adasd_draft"]["shared_with_target"] == ["model.embed_tokens.weight"]
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in keys)
    assert not any("embed_tokens" in k for k in keys)  # assembled from the target, not carried
    head = draft_head.load(out)
    assert 0 < head.numel() <= 64 and log["head"]["size"] == head.numel()
    assert set(log["seconds"]) >= {"users", "answers", "train", "report"}
    rep = log["report"]
    assert set(rep["acceptance"]) == {"chat", "code"} and 0 <= rep["steps"]["draft_share"]
    assert rep["acceptance"]["code"]["prompts"] == sum(p["kind"] == "code" for p in draft_prompts.eval_prompts())
    assert "vanilla SD (K=5, greedy) acceptance" in (out / "REPORT.md").read_text()
    # the assembled draft loads as the pair's draft: same vocabulary, head subset attached
    from adasd_core.models import load_pair

    pair = load_pair(str(quick_pair_dir / "target"), str(root / "work" / "assembled"), device="cpu")
    assert draft_head.tokens_of(pair.draft).tolist() == head.tolist()


def test_the_build_is_deterministic_given_the_seed(quick_build, quick_pair_dir, tmp_path):
    root, _ = quick_build
    draft_build.build_draft(tmp_path / "work", tmp_path / "out", draft_build.DraftBuildConfig.quick(),
                            target=str(quick_pair_dir / "target"), stages=draft_build.STAGES[:-1], progress=False)
    for name in ("model.safetensors", "head_tokens.json", "config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (root / "out" / name).read_bytes(), name


def test_training_resumes_from_its_checkpoint_to_the_same_weights(quick_build, quick_pair_dir, tmp_path):
    from adasd_core.models import load_pair

    root, _ = quick_build
    cfg = draft_build.DraftBuildConfig.quick()
    records, _ = draft_build._records(root / "work", cfg)
    head = draft_head.load(root / "out")
    target = load_pair(str(quick_pair_dir / "target"), None, device="cpu").target
    plan = replace(cfg.plan, steps=4)

    def run(ckpt, stop_at=None):
        draft = draft_train.draft_from_target(target, (0, 1))

        def on_step(step, loss):
            if step == stop_at:
                raise KeyboardInterrupt

        try:
            draft_train.train(draft, records, head, plan, 0, ckpt, ckpt_every=2, on_step=on_step)
        except KeyboardInterrupt:
            draft = draft_train.draft_from_target(target, (0, 1))
            draft_train.train(draft, records, head, plan, 0, ckpt, ckpt_every=2)
        return draft.state_dict()

    whole = run(tmp_path / "a.pt")
    resumed = run(tmp_path / "b.pt", stop_at=3)
    assert torch.load(tmp_path / "b.pt", weights_only=False)["step"] == 4
    for key, value in whole.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=key)


def test_held_out_prompts_never_reach_training():
    prompts = [p["prompt"] for p in draft_prompts.eval_prompts()]
    held = draft_prompts.HeldOut(prompts)
    assert all(held.overlaps(p) for p in prompts)
    assert held.overlaps("Hi! " + prompts[3] + " Thanks.")
    assert not held.overlaps("Write a Python function `parse(line)` that splits a CSV line into fields.")
    code = draft_prompts.code_prompts(0, 50, 20, held)
    assert len(code) > 40 and not any(held.overlaps(p) for p in code)


def test_the_soft_loss_is_the_cross_entropy_to_the_teachers_renormalised_top_k():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    ids = torch.tensor([[0, 2, -1]])  # the teacher's third token is outside the head subset
    lp = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).half()
    p = torch.tensor([0.5, 0.3]) / 0.8
    expected = -(p * torch.log_softmax(logits, -1)[0, [0, 2]]).sum()
    torch.testing.assert_close(draft_train.soft_loss(logits, ids, lp), expected, rtol=1e-3, atol=1e-3)
