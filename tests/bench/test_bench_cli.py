"""The typer commands that adasd_core/cli.py registers as `adasd bench` and `adasd bench-serve`."""

import json

import typer
from bench_fake_server import FakeServer
from typer.testing import CliRunner

from adasd_core.bench.cli import bench, bench_serve

app = typer.Typer()
app.command("bench")(bench)
app.command("bench-serve")(bench_serve)
runner = CliRunner()


def test_bench_quick_json(quick_pair_dir, tmp_path):
    result = runner.invoke(app, ["bench", "--quick", "--json", "--no-plots", "--methods", "target,hf-target,vanilla",
                                 "--modes", "greedy", "--tasks", "continuation", "--out", str(tmp_path),
                                 "--target", str(quick_pair_dir / "target"), "--draft", str(quick_pair_dir / "draft"),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert [r["method"] for r in out["rows"]] == ["target", "hf-target", "vanilla"]
    assert (tmp_path / "bench.md").exists() and (tmp_path / "bench.json").exists()


def test_bench_bad_options():
    result = runner.invoke(app, ["bench", "--tasks", "gsm8k"])
    assert result.exit_code == 2 and "--gsm8k PATH" in result.output
    result = runner.invoke(app, ["bench", "--methods", "target,medusa"])
    assert result.exit_code == 2 and "unknown method 'medusa'" in result.output


def test_bench_serve_json(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "x = 1"}\n')
    with FakeServer() as url:
        result = runner.invoke(app, ["bench-serve", url, "--concurrency", "1,2", "--requests", "2", "--max-tokens", "4",
                                     "--prompts-file", str(prompts), "--no-in-process", "--no-plots", "--json",
                                     "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert [lv["concurrency"] for lv in out["levels"]] == [1, 2] and out["overhead"] is None


def test_bench_serve_unreachable(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "x = 1"}\n')
    result = runner.invoke(app, ["bench-serve", "http://127.0.0.1:9", "--prompts-file", str(prompts),
                                 "--no-in-process", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "cannot reach" in result.output
