"""`adasd bench-serve` against a fake OpenAI streaming server (the real one is tested in tests/server)."""

import json

import pytest
from bench_fake_server import MODEL, FakeServer

from adasd_core.bench.serve import ServeBenchConfig, percentile, run_bench_serve, wait_until_ready
from adasd_core.models import load_pair


@pytest.fixture(scope="module")
def quick_pair(quick_pair_dir):
    return load_pair(str(quick_pair_dir / "target"), str(quick_pair_dir / "draft"), device="cpu")


def test_percentile():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile(list(range(101)), 99) == 99


def test_levels_and_overhead(quick_pair, tmp_path):
    with FakeServer(tokens_per_chunk=2) as url:
        cfg = ServeBenchConfig(base_url=url + "/v1", concurrency=(1, 3), requests=4, max_tokens=8, prompts=3,
                               prompt_tokens=16, out_dir=str(tmp_path), temperature=0.0)
        res = run_bench_serve(cfg, progress=False, pair=quick_pair)
    assert res["server"]["model"] == MODEL and res["server"]["warm_up_ok"]
    assert [lv["concurrency"] for lv in res["levels"]] == [1, 3]
    for lv in res["rows"]:
        assert lv["requests"] == 4 and lv["errors"] == 0
        assert lv["tokens"] == 4 * 8 and lv["token_count_source"] == ["usage"]
        assert lv["tokens_per_s"] > 0 and lv["tokens_per_chunk"] == 2.0
        assert 0 < lv["ttft_ms"]["p50"] <= lv["ttft_ms"]["p99"] <= lv["latency_ms"]["p99"]
        assert lv["itl_ms"]["p50"] > 0 and lv["chunk_gap_ms"]["p50"] > 0
    passes = res["overhead"]["passes"]
    assert len(passes) == cfg.overhead_repeats == 3
    assert res["in_process"]["method"] == "adasd" and res["in_process"]["tokens"] == 3 * 4 * 8
    median = sorted(p["http"] / p["local"] for p in passes)[1]
    assert res["overhead"]["ratio"] == pytest.approx(median, rel=1e-3) and median > 0
    assert res["overhead"]["goal"] == ">= 0.95" and res["overhead"]["met"] is (median >= 0.95)
    for name in ("bench_serve.json", "bench_serve.md", "bench_serve.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "bench_serve.json").read_text())["rows"] == res["rows"]
    assert "| concurrency |" in (tmp_path / "bench_serve.md").read_text()


def _prompts_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "def f(x):"}\n{"prompt": "import os"}\n')
    return str(path)


def test_request_bodies_are_openai_streaming(tmp_path):
    server = FakeServer()
    with server as url:
        cfg = ServeBenchConfig(base_url=url, concurrency=(2,), requests=2, max_tokens=5, temperature=0.5,
                               prompts_file=_prompts_file(tmp_path), in_process=False, out_dir=str(tmp_path),
                               plots=False)
        res = run_bench_serve(cfg, progress=False)
    assert res["overhead"] is None and res["rows"][0]["errors"] == 0
    bodies = server.app.state.bodies[1:]  # after the warm-up request
    assert {b["prompt"] for b in bodies} == {"def f(x):", "import os"}
    for b in bodies:
        assert b["stream"] is True and b["stream_options"] == {"include_usage": True}
        assert b["model"] == MODEL and b["max_tokens"] == 5 and b["temperature"] == 0.5
        assert b["ignore_eos"] is True and b["adasd"] == {"method": "adasd"} and "seed" in b


def test_errors_are_counted(tmp_path):
    with FakeServer() as url:
        for fail, expect in (("http", "HTTP 400"), ("stream", "in-stream error: worker died")):
            cfg = ServeBenchConfig(base_url=url, concurrency=(2,), requests=3, max_tokens=4, in_process=False,
                                   prompts_file=_prompts_file(tmp_path), out_dir=str(tmp_path), plots=False,
                                   extra_body={"fail": fail})
            res = run_bench_serve(cfg, progress=False)
            lv = res["rows"][0]
            assert lv["errors"] == 3 and lv["tokens"] == 0 and any(expect in m for m in lv["error_messages"])
            assert not res["server"]["warm_up_ok"]


def test_waits_for_a_loading_server(tmp_path):
    server = FakeServer(loading_polls=2)
    with server as url:
        cfg = ServeBenchConfig(base_url=url, concurrency=(1,), requests=1, max_tokens=2, in_process=False,
                               prompts_file=_prompts_file(tmp_path), out_dir=str(tmp_path), plots=False)
        wait_until_ready(cfg, poll_s=0.01)
        assert server.app.state.polls == 3
        cfg.ready_timeout_s = 0.0
        server.app.state.polls = 0
        with pytest.raises(TimeoutError, match="not ready"):
            wait_until_ready(cfg, poll_s=0.01)
