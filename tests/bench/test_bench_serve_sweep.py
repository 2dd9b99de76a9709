"""`adasd bench-serve`'s sweep (levels x methods, interleaved), its report's arithmetic, the external row,
the arrivals-while-streaming rows and the targets, against fake OpenAI streaming servers."""

import json
import statistics

import pytest
import typer
from bench_fake_server import MODEL, FakeServer
from typer.testing import CliRunner

from adasd_core.bench.cli import bench_serve
from adasd_core.bench.serve import RequestResult, ServeBenchConfig, check_targets, run_bench_serve
from adasd_core.bench.serve_client import stalls_at_arrivals
from adasd_core.bench.serve_sweep import arrival_offsets, baseline_tokens_per_s

METHODS = ("ar", "adasd", "hybrid")


def _prompts_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "def f(x):"}\n{"prompt": "import os"}\n')
    return str(path)


def test_sweep_report_is_consistent(tmp_path):
    ours, ext = FakeServer(tokens_per_chunk=2, speculative=True), FakeServer(tokens_per_chunk=1)
    with ours as url, ext as ext_url:
        cfg = ServeBenchConfig(base_url=url, concurrency=(1, 2), methods=METHODS, requests=2, repeats=2, max_tokens=8,
                               prompts_file=_prompts_file(tmp_path), in_process=False, out_dir=str(tmp_path),
                               externals=[{"name": "llama-server", "base_url": ext_url + "/v1"}],
                               arrival_rate=200, arrival_pattern="fixed", arrival_requests=3)
        res = run_bench_serve(cfg, progress=False)
    names = [*METHODS, "llama-server"]
    assert [(r["concurrency"], r["method"]) for r in res["rows"]] == [(c, m) for c in (1, 2) for m in names]
    for r in res["rows"]:
        assert r["requests"] == 2 * 2 and r["errors"] == 0 and r["tokens"] == 4 * 8
        assert len(r["passes"]) == 2
        for p in r["passes"]:  # aggregate = tokens / wall, per pass
            assert p["tokens"] == 2 * 8 and p["tokens_per_s"] == pytest.approx(p["tokens"] / p["wall_s"], rel=1e-3)
        assert r["tokens_per_s"] == statistics.median(p["tokens_per_s"] for p in r["passes"])
        assert r["tokens_per_chunk"] == (1.0 if r["method"] == "llama-server" else 2.0)
        assert 0 < r["ttft_ms"]["p50"] <= r["ttft_ms"]["p99"] <= r["latency_ms"]["p99"]
        assert r["chunk_gap_ms"]["p50"] <= r["chunk_gap_ms"]["p99"] <= r["chunk_gap_ms"]["max"]
        assert r["request_tokens_per_s"]["p50"] > 0
        if r["method"] == "llama-server":
            assert r["speculative"] is None
        else:
            assert r["speculative"]["mean_draft_length"] == (0.0 if r["method"] == "ar" else 3.0)
    for lv in res["levels"]:  # speedup = the two rows' ratio
        here = {r["method"]: r for r in res["rows"] if r["concurrency"] == lv["concurrency"]}
        assert set(lv["speedup_vs_ar"]) == {"adasd", "hybrid", "llama-server"}
        for m, v in lv["speedup_vs_ar"].items():
            assert v == pytest.approx(here[m]["tokens_per_s"] / here["ar"]["tokens_per_s"], rel=1e-3)
        assert lv["mean_draft_length"] == {"ar": 0.0, "adasd": 3.0, "hybrid": 3.0}
    vs_ar = [t for t in res["targets"] if t["target"] == "vs_ar"]
    assert [(t["concurrency"], t["threshold"], t["goal"]) for t in vs_ar] == [(1, 1.5, ">= 1.5"), (2, 1.2, ">= 1.2")]
    assert {t["target"] for t in res["targets"]} == {"vs_ar", "vs_llama-server", "arrivals_itl_p99_over_p50"}
    for t in vs_ar:  # verdict: met == value >= goal
        assert t["met"] == (t["value"] >= t["threshold"])
        lv = next(lv for lv in res["levels"] if lv["concurrency"] == t["concurrency"])
        assert t["value"] == pytest.approx(lv["speedup_vs_ar"]["adasd"], abs=1e-3)
    # the external server got plain OpenAI requests; ours the extension, interleaved in rotating order
    ext_bodies = ext.app.state.bodies
    assert len(ext_bodies) == 1 + 2 * 2 * 2 + 2 * 3  # warm-up, levels x requests x repeats, arrivals x repeats
    for b in ext_bodies:
        assert "adasd" not in b and b["ignore_eos"] is True and b["model"] == MODEL and b["max_tokens"] == 8
    sent = [b["adasd"]["method"] for b in ours.app.state.bodies]
    assert sent[:3] == list(METHODS)  # warm-ups
    assert sent[3:9] == ["ar", "ar", "adasd", "adasd", "hybrid", "hybrid"]  # pass 1, level 1: ar first
    assert sent[9:15] == ["adasd", "adasd", "hybrid", "hybrid", "ar", "ar"]  # level 2: the order rotated
    assert [a["method"] for a in res["arrivals"]] == names
    for a in res["arrivals"]:
        assert a["requests"] == 2 * 3 and a["errors"] == 0 and a["concurrency"] is None
        assert a["stall_at_arrival_ms"]["count"] >= 0 and a["arrival_rate"] == 200
    assert res["externals"] == [{"name": "llama-server", "base_url": ext_url, "model": MODEL}]
    saved = json.loads((tmp_path / "bench_serve.json").read_text())
    assert saved["rows"] == res["rows"] and saved["levels"] == res["levels"]
    md = (tmp_path / "bench_serve.md").read_text()
    assert "| concurrency | ar tok/s | adasd tok/s | hybrid tok/s | llama-server tok/s | adasd / ar |" in md
    assert "## Arrivals while others stream" in md and "| vs_ar | adasd | 1 |" in md
    assert (tmp_path / "bench_serve.png").stat().st_size > 0


def _row(method, c, tps):
    return {"method": method, "concurrency": c, "tokens_per_s": tps}


def test_targets():
    rows = [_row("ar", 1, 100.0), _row("adasd", 1, 160.0), _row("ar", 2, 150.0), _row("adasd", 2, 170.0),
            _row("ar", 8, 200.0), _row("adasd", 8, 640.0), _row("ar", 16, 700.0), _row("adasd", 16, 699.0),
            _row("llama-server", 1, 150.0), _row("llama-server", 8, 700.0)]
    arrivals = [{"method": "adasd", "itl_ms": {"p50": 40.0, "p99": 90.0}},
                {"method": "ar", "itl_ms": {"p50": 1, "p99": 1}}]
    got = {(t["target"], t.get("concurrency")): t
           for t in check_targets(rows, baseline=125.0, externals=["llama-server"], arrivals=arrivals)}
    assert got[("scaling_8_vs_1_client", None)]["value"] == 4.0 and got[("scaling_8_vs_1_client", None)]["met"]
    assert got[("vs_ar", 1)]["value"] == 1.6 and got[("vs_ar", 1)]["threshold"] == 1.5 and got[("vs_ar", 1)]["met"]
    assert got[("vs_ar", 2)]["threshold"] == 1.2 and not got[("vs_ar", 2)]["met"]  # 1.133
    assert got[("vs_ar", 8)]["value"] == 3.2 and got[("vs_ar", 8)]["threshold"] == 1.0
    assert got[("vs_ar", 16)]["threshold"] == 1.0 and not got[("vs_ar", 16)]["met"]  # below ar at 16
    assert got[("vs_llama-server", 1)]["value"] == 1.067 and got[("vs_llama-server", 1)]["met"]
    best = got[("8_clients_vs_llama-server_best", 8)]
    assert best["value"] == 0.914 and best["threshold"] == 0.8 and best["met"]
    itl = got[("arrivals_itl_p99_over_p50", None)]
    assert itl["value"] == 2.25 and not itl["met"] and itl["goal"] == "<= 2.0"
    assert got[("1_client_vs_baseline", 1)]["value"] == 1.28 and got[("1_client_vs_baseline", 1)]["met"]
    for t in got.values():
        if t["target"] != "arrivals_itl_p99_over_p50":
            assert t["met"] == (t["value"] >= t["threshold"])
    assert check_targets([_row("adasd", 1, 1.0)]) == []  # nothing to compare


def test_baseline_file(tmp_path):
    new, old = tmp_path / "new.json", tmp_path / "old.json"
    new.write_text(json.dumps({"rows": [_row("ar", 1, 90.0), _row("adasd", 1, 120.0)]}))
    old.write_text(json.dumps({"config": {"method": "adasd"}, "levels": [{"concurrency": 1, "tokens_per_s": 110.0}]}))
    assert baseline_tokens_per_s(str(new)) == 120.0
    assert baseline_tokens_per_s(str(old)) == 110.0  # the format before the sweep: one method's levels
    assert baseline_tokens_per_s(str(new), concurrency=4) is None


def test_arrival_offsets():
    fixed = arrival_offsets(ServeBenchConfig(arrival_rate=4, arrival_pattern="fixed", arrival_requests=3))
    assert fixed == [0.0, 0.25, 0.5]
    cfg = ServeBenchConfig(arrival_rate=10, arrival_requests=200, seed=1)
    poisson = arrival_offsets(cfg)
    assert poisson == arrival_offsets(cfg) and poisson[0] == 0.0  # the same times for every row
    assert all(a < b for a, b in zip(poisson, poisson[1:]))
    assert 0.07 < poisson[-1] / 199 < 0.13  # mean gap about 1 / rate
    with pytest.raises(ValueError, match="arrival pattern"):
        ServeBenchConfig(arrival_rate=1, arrival_pattern="bursty")


def test_stalls_at_arrivals():
    a = RequestResult(0, True, sent_at=0.0, chunk_times_s=[0.1, 0.2, 0.6, 0.7])  # gap 0.2-0.6 spans b's arrival
    b = RequestResult(1, True, sent_at=0.3, chunk_times_s=[0.2, 0.3])  # chunks at 0.5 and 0.6: no arrival between
    failed = RequestResult(2, False, sent_at=0.65)  # its arrival counts; its own (absent) gaps do not
    assert stalls_at_arrivals([a, b, failed]) == pytest.approx([0.4, 0.1])  # a's 0.6-0.7 spans 0.65


def test_row_names_must_differ():
    with pytest.raises(ValueError, match="distinct"):
        ServeBenchConfig(methods=("ar", "adasd"), externals=[{"name": "ar", "base_url": "http://127.0.0.1:1"}])


def test_cli_sweep_with_external(tmp_path):
    app = typer.Typer()
    app.command("bench-serve")(bench_serve)
    app.command("other")(lambda: None)  # two commands: typer keeps the subcommand name
    with FakeServer(speculative=True) as url, FakeServer() as ext:
        result = CliRunner().invoke(app, ["bench-serve", url, "--concurrency", "1,2", "--requests", "2", "--repeats",
                                          "1", "--max-tokens", "4", "--prompts-file", _prompts_file(tmp_path),
                                          "--external", ext, "--external-name", "llama-server", "--no-in-process",
                                          "--no-plots", "--json", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert [r["method"] for r in out["rows"]] == ["ar", "adasd", "hybrid", "llama-server"] * 2
    assert [lv["concurrency"] for lv in out["levels"]] == [1, 2] and out["arrivals"] == []
    assert {t["target"] for t in out["targets"]} == {"vs_ar", "vs_llama-server"} and out["overhead"] is None
