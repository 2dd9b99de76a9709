"""`adasd bench` in quick mode: outputs exist and agree with each other."""

import json

import pytest
from bench_fixtures import GSM8K, HUMANEVAL, write_jsonl

from adasd_core.bench.harness import TARGETS, BenchConfig, _useful_length, check_targets, completion_text, run_bench
from adasd_core.bench.methods import METHOD_KEYS
from adasd_core.bench.tasks import cut_at_stop
from adasd_core.models import load_pair


@pytest.fixture(scope="module")
def random_pair(random_pair_dir):
    # target and draft disagree often, so lossless rows are really tested
    return load_pair(str(random_pair_dir / "target"), str(random_pair_dir / "draft"), device="cpu")


@pytest.fixture(scope="module")
def result(random_pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return run_bench(BenchConfig.quick(out_dir=str(out)), pair=random_pair, progress=False), out


def rows_of(res, task, mode):
    return {r["method"]: r for r in res["rows"] if r["task"] == task and r["mode"] == mode}


def test_outputs_written(result):
    res, out = result
    for name in ("bench.json", "bench.md", "speedup.png", "acceptance_by_position.png", "thresholds.png"):
        assert (out / name).stat().st_size > 0, name
    on_disk = json.loads((out / "bench.json").read_text())
    assert on_disk["rows"] == res["rows"]
    for key in ("cpu", "cores", "torch_threads", "torch", "transformers", "python"):
        assert key in on_disk["machine"]
    md = (out / "bench.md").read_text()
    assert "| method | tok/s | accuracy | vs vanilla | vs target | #cand | #match | accept | fidelity |" in md
    assert "## continuation, sampled (temperature 0.7)" in md and "HF assisted generation" in md
    assert "num_assistant_tokens_schedule" not in md and "schedule `" in md


def test_every_row_for_every_task_and_mode(result):
    res, _ = result
    for task in ("next-line", "continuation"):
        for mode in ("greedy", "sampled"):
            rows = rows_of(res, task, mode)
            assert list(rows) == list(METHOD_KEYS)
            for r in rows.values():
                assert r["tokens"] > 0 and r["tokens_per_s"] > 0
            assert rows["vanilla"]["speedup_vs_vanilla"] == 1.0 and rows["target"]["speedup_vs_target"] == 1.0
            assert len(rows["target"]["tokens_per_s_repeats"]) == (2 if task == "continuation" else 1)


def test_greedy_fidelity(result):
    res, _ = result
    for task in ("next-line", "continuation"):
        rows = rows_of(res, task, "greedy")
        # lossless rows reproduce the target alone token for token; so does transformers' loop
        for key in ("target", "hf-target", "vanilla", "hf-assisted", "gen-only"):
            assert rows[key]["fidelity"] == 1.0, (task, key)
            assert rows[key]["identical_outputs"] == 1.0
        assert rows["target"]["accuracy"] == rows["hf-target"]["accuracy"]
        assert rows["vanilla"]["accuracy"] == rows["target"]["accuracy"]
        # the random draft does not agree with the random target
        assert rows["draft"]["fidelity"] < 1.0
        for r in rows_of(res, task, "sampled").values():
            assert r["fidelity"] is None


def test_speculative_columns(result):
    res, _ = result
    rows = rows_of(res, "continuation", "greedy")
    for key in ("draft", "target", "hf-target"):
        assert rows[key]["cand_per_round"] is None and rows[key]["acceptance_rate"] is None
    for key in ("vanilla", "verify-only", "gen-only", "adasd-bayes", "adasd-threshold", "hf-assisted"):
        r = rows[key]
        assert r["cand_per_round"] > 0 and 0 <= r["acceptance_rate"] <= 1
        assert r["match_per_round"] == pytest.approx(r["cand_per_round"] * r["acceptance_rate"], rel=0.01, abs=0.01)
    assert rows["vanilla"]["cand_per_round"] <= 5
    assert rows["vanilla"]["by_position"] and len(rows["vanilla"]["by_position"]["drafted"]) <= 5
    for tr in res["traces"]["rounds"].values():
        assert tr and "entropy_threshold" in tr[0] and "drafted" in tr[0]
    assert "js_threshold" in res["traces"]["rounds"]["adasd-threshold"][0]


def test_targets_section(result):
    res, _ = result
    names = {(t["target"], t["mode"]) for t in res["targets"]}
    for mode in ("greedy", "sampled"):
        for name in ("adasd_vs_vanilla", "adasd_vs_hf_assisted", "adasd_vs_target", "accuracy_vs_target",
                     "our_target_vs_hf_generate"):
            assert (name, mode) in names
    assert_verdicts(res["targets"], res["rows"])


def assert_verdicts(targets, rows):
    """Each target's value is the ratio (or difference) of its rows, and met is value >= goal (<= for the
    excess surprisal)."""
    rows = {(r["task"], r["mode"], r["method"]): r for r in rows}
    versus = {"adasd_vs_vanilla": "vanilla", "adasd_vs_hf_assisted": "hf-assisted", "adasd_vs_target": "target",
              "our_target_vs_hf_generate": "hf-target"}
    for t in targets:
        row = rows[(t["task"], t["mode"], t["method"])]
        if t["target"] == "accuracy_vs_target":
            exact = row["accuracy"] - rows[(t["task"], t["mode"], "target")]["accuracy"]
            goal, rounding = -TARGETS["accuracy_points"], 0.005
        elif t["target"] == "excess_surprisal":  # a ceiling on the row's own column
            exact, goal = row["excess_surprisal"], TARGETS["excess_surprisal"]
            assert t["mode"] == "sampled" and t["value"] == exact and t["met"] is (exact <= goal), t
            assert float(t["goal"].split()[1]) == goal
            continue
        else:  # a speed ratio of two rows
            exact = row["tokens_per_s"] / rows[(t["task"], t["mode"], versus[t["target"]])]["tokens_per_s"]
            goal, rounding = TARGETS[t["target"]], 0.0005
        assert abs(t["value"] - exact) <= rounding + 1e-12, t
        assert t["met"] is (exact >= goal), t
        assert float(t["goal"].split()[1]) == goal


def test_verdicts_on_hand_made_rows():
    """Both sides of every goal: adasd 2.5x vanilla but 1.1x HF assisted, our loop slower than generate(),
    0.5 accuracy points lost on one task and 1.5 on another, an excess surprisal above the ceiling
    (then below it)."""
    tps = {"target": 10.0, "hf-target": 10.5, "vanilla": 16.0, "hf-assisted": 36.4, "adasd-bayes": 40.0}
    accuracy = {"target": 50.0, "adasd-bayes": 49.5, "vanilla": 50.0, "hf-target": 50.0, "hf-assisted": 50.0}  # %
    rows = [{"task": "continuation", "mode": mode, "method": m, "tokens_per_s": v, "accuracy": accuracy[m]}
            for mode in ("greedy", "sampled") for m, v in tps.items()]
    rows.append({"task": "gsm8k", "mode": "greedy", "method": "target", "tokens_per_s": 1.0, "accuracy": 60.0})
    rows.append({"task": "gsm8k", "mode": "greedy", "method": "adasd-bayes", "tokens_per_s": 1.0, "accuracy": 58.5})
    sampled_adasd = next(r for r in rows if r["mode"] == "sampled" and r["method"] == "adasd-bayes")
    sampled_adasd["excess_surprisal"] = TARGETS["excess_surprisal"] + 0.05
    targets = check_targets(rows)
    assert_verdicts(targets, rows)
    met = {(t["target"], t["task"], t["mode"]): t["met"] for t in targets}
    assert met == {(name, "continuation", mode): ok for mode in ("greedy", "sampled") for name, ok in (
        ("adasd_vs_vanilla", True), ("adasd_vs_hf_assisted", False), ("adasd_vs_target", True),
        ("our_target_vs_hf_generate", False), ("accuracy_vs_target", True))} | {
        ("accuracy_vs_target", "gsm8k", "greedy"): False, ("excess_surprisal", "continuation", "sampled"): False}
    sampled_adasd["excess_surprisal"] = TARGETS["excess_surprisal"] - 0.05
    targets = check_targets(rows)
    assert_verdicts(targets, rows)
    assert [t["met"] for t in targets if t["target"] == "excess_surprisal"] == [True]


def test_records_are_interleaved(result):
    res, _ = result
    recs = [r for r in res["records"] if r["task"] == "continuation" and r["mode"] == "greedy" and r["repeat"] == 0]
    n = len(METHOD_KEYS)
    first, second = [r["method"] for r in recs[:n]], [r["method"] for r in recs[n : 2 * n]]
    assert sorted(first) == sorted(METHOD_KEYS) and first != second  # every method per prompt, order rotated
    assert {r["prompt"] for r in recs[:n]} == {0}


def test_eval_tasks_run(random_pair, tmp_path):
    """GSM8K, HumanEval and MMLU tasks from fixture files go through the same loop."""
    mmlu = [{"question": "2 + 2 = ?", "choices": ["3", "4", "5", "6"], "answer": 1}] * 2
    cfg = BenchConfig.quick(
        tasks=("gsm8k", "humaneval", "mmlu"), modes=("greedy",), methods=("target", "vanilla", "adasd-bayes"),
        gsm8k=str(write_jsonl(tmp_path / "g.jsonl", GSM8K)),
        humaneval=str(write_jsonl(tmp_path / "h.jsonl", [HUMANEVAL])),
        mmlu=str(write_jsonl(tmp_path / "m.jsonl", mmlu)), humaneval_timeout_s=5.0, out_dir=str(tmp_path / "out"),
        plots=False)
    res = run_bench(cfg, pair=random_pair, progress=False)
    tasks = {t["name"]: t for t in res["tasks"]}
    assert set(tasks) == {"gsm8k", "humaneval", "mmlu"}
    assert tasks["humaneval"]["stop"] and tasks["gsm8k"]["stop"]
    for r in res["rows"]:
        assert r["accuracy"] is not None  # random models score 0, but every request was scored
    assert not (tmp_path / "out" / "speedup.png").exists()


def test_config_errors():
    with pytest.raises(ValueError, match="unknown task"):
        BenchConfig(tasks=("nope",))
    with pytest.raises(ValueError, match="--gsm8k"):
        BenchConfig(tasks=("gsm8k",))
    with pytest.raises(ValueError, match="unknown method"):
        BenchConfig(methods=("target", "medusa"))


def test_stop_handling(random_pair):
    tok = random_pair.tokenizer
    prompt = tok("x = 1", add_special_tokens=False)["input_ids"]
    gen = tok("\ny = 2\n\n\nz = 3", add_special_tokens=False)["input_ids"]
    text = completion_text(tok, prompt, gen)
    assert text == "\ny = 2\n\n\nz = 3"
    assert cut_at_stop(text, ["\n\n\n"]) == "\ny = 2"
    n = _useful_length(tok, prompt, gen, ["\n\n\n"])
    assert "\n\n\n" in completion_text(tok, prompt, gen[:n])
    assert "\n\n\n" not in completion_text(tok, prompt, gen[: n - 1])
    assert _useful_length(tok, prompt, gen, []) == len(gen)


def test_quality_columns_agree_with_records(result):
    """Issue 12: per-request means of the target's log-probability and excess surprisal, the gap to
    the target alone paired by prompt and repeat, standard errors and sample sizes."""
    import statistics

    res, out = result
    for mode in ("greedy", "sampled"):
        recs = [r for r in res["records"] if r["task"] == "continuation" and r["mode"] == mode]
        rows = rows_of(res, "continuation", mode)
        for key, row in rows.items():
            mine = [r for r in recs if r["method"] == key and r["scored"]]
            assert row["quality_requests"] == len(mine) and row["quality_tokens"] == sum(r["tokens"] for r in mine)
            ex = [r["excess_sum"] / r["scored"] for r in mine]
            assert row["excess_surprisal"] == pytest.approx(statistics.fmean(ex), abs=1e-4)
            assert row["excess_surprisal_se"] == pytest.approx(statistics.stdev(ex) / len(ex) ** 0.5, abs=1e-4)
            lp = {(r["repeat"], r["prompt"]): r["logprob_sum"] / r["scored"] for r in mine}
            ref = {(r["repeat"], r["prompt"]): r["logprob_sum"] / r["scored"] for r in recs
                   if r["method"] == "target" and r["scored"]}
            gap = statistics.fmean(v - ref[k] for k, v in lp.items())
            assert row["logprob_gap"] == pytest.approx(gap, abs=1e-4)
            assert row["target_logprob"] <= 0
            if key == "target":
                assert row["logprob_gap"] == 0.0
            relaxed = [r["relaxed"] for r in recs if r["method"] == key and r["relaxed"] is not None]
            if key in ("vanilla", "gen-only"):
                assert row["relaxed_share"] == 0.0
            elif not relaxed:
                assert row["relaxed_share"] is None
    md = (out / "bench.md").read_text()
    assert "Quality, continuation, sampled" in md and "excess surprisal" in md
    assert (out / "speed_quality.png").stat().st_size > 0
    assert any(t["target"] == "excess_surprisal" for t in res["targets"])


def test_greedy_rows_of_lossless_methods_score_like_the_target(result):
    res, _ = result
    rows = rows_of(res, "continuation", "greedy")
    # the same tokens give the same target log-probabilities
    for key in ("vanilla", "gen-only", "hf-target"):
        assert rows[key]["target_logprob"] == pytest.approx(rows["target"]["target_logprob"], abs=1e-3)
