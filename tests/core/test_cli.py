import json

from typer.testing import CliRunner

from adasd_core.cli import app
from adasd_core.engine import SpecConfig
from adasd_core.sampling import SamplingParams

runner = CliRunner()


def _models(d):
    return ["--target", str(d / "target"), "--draft", str(d / "draft"), "--device", "cpu"]


def test_generate_json(quick_pair_dir, quick_engine):
    args = ["generate", "def f(x):", "--max-tokens", "12", "--method", "vanilla", "--k", "3", "--json"]
    result = runner.invoke(app, [*args, *_models(quick_pair_dir)])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(out) == {"text", "token_ids", "finish_reason", "stats"}
    for key in ("rounds", "drafted_tokens", "accepted_standard", "accepted_relaxed", "bonus_tokens", "target_forwards",
                "draft_forwards", "mean_draft_length", "acceptance_rate", "time_draft_s", "time_verify_s",
                "time_other_s", "estimated_speedup", "entropy_threshold"):
        assert key in out["stats"]
    # what it prints is what the engine does: greedy vanilla is the target's own greedy output,
    # with the engine's own counts
    params = SamplingParams(max_tokens=12)
    ar = quick_engine.generate("def f(x):", params, SpecConfig(method="ar"))
    same = quick_engine.generate("def f(x):", params, SpecConfig(method="vanilla", k=3))
    assert out["token_ids"] == ar.token_ids and out["text"] == ar.text and out["finish_reason"] == ar.finish_reason
    stats = out["stats"]
    assert stats["generated_tokens"] == len(out["token_ids"]) <= 12
    for key in ("rounds", "drafted_tokens", "accepted_standard", "accepted_relaxed", "bonus_tokens", "target_forwards",
                "draft_forwards"):
        assert stats[key] == getattr(same.stats, key), key
    assert stats["accepted_relaxed"] == 0  # vanilla is lossless
    drafted = stats["drafted_tokens"]
    assert stats["acceptance_rate"] == (round(stats["accepted_standard"] / drafted, 4) if drafted else 0.0)


def test_generate_compare(quick_pair_dir):
    result = runner.invoke(app, ["generate", "import os", "--max-tokens", "8", "--compare", "--repeats", "1", "--json",
                                 *_models(quick_pair_dir)])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout.strip().splitlines()[-1])["rows"]
    assert [r["method"].split()[0] for r in rows] == ["ar", "vanilla", "gen-only", "verify-only", "adasd", "hybrid"]


def test_generate_bad_input_is_a_clear_error(quick_pair_dir):
    result = runner.invoke(app, ["generate", "x", "--method", "nope", *_models(quick_pair_dir)])
    assert result.exit_code == 2 and "unknown method" in result.output
    result = runner.invoke(app, ["generate", "", *_models(quick_pair_dir)])
    assert result.exit_code == 2 and "empty" in result.output
