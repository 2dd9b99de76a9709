"""Issue 12 in the server: the worker's warm-start state, its gauges, its file, the request field."""

import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/toy.py

from toy import markov_pair, random_tables  # noqa: E402

from adasd_core.engine import SpecConfig  # noqa: E402
from adasd_core.llm import LLM  # noqa: E402
from adasd_core.sampling import SamplingParams  # noqa: E402
from adasd_core.warm import WarmState, load_state, pair_identity  # noqa: E402
from server.messages import Done, Submit  # noqa: E402
from server.metrics import AdasdMetrics  # noqa: E402
from server.protocol import AdasdOptions  # noqa: E402
from server.serving import OpenAIServing, merge_stats  # noqa: E402
from server.settings import Settings  # noqa: E402
from server.worker import Worker, warm_state_path  # noqa: E402


class Conn:
    def __init__(self):
        self.sent = []

    def send(self, msg):
        self.sent.append(msg)

    def poll(self, timeout):
        return False


def run_one(worker, rid, spec):
    params = SamplingParams(max_tokens=24, temperature=1.0, seed=1, ignore_eos=True)
    worker.handle(Submit(rid, [0, 1], params, spec, time.monotonic()))
    while rid in worker.requests:
        worker.step()
    return next(m for m in worker.conn.sent if isinstance(m, Done) and m.rid == rid)


def test_gauges_show_the_servers_state_and_the_file_keeps_it(tmp_path):
    target, draft = random_tables(6, 0)
    pair = markov_pair(target, draft)
    ident = pair_identity(pair, {"window": 20})
    path = tmp_path / "state.json"
    engine = LLM(pair, calibrate=False, warm=WarmState(path=str(path), identity=ident))
    worker = Worker(engine, Conn())
    done = run_one(worker, "a", SpecConfig(method="adasd", verification="threshold"))
    state = done.stats["warm_state"]
    family = "adasd/threshold/sampled"
    shared = engine.warm.shared[family]
    assert state[family]["rounds"] == shared.rounds > 0
    assert state[family]["js_threshold"] == shared.relaxed.threshold

    metrics = AdasdMetrics("m")
    metrics.observe_warm_state(state)
    text = metrics.render()[0].decode()
    assert f'adasd_warm_rounds{{family="{family}",model_name="m"}} {float(shared.rounds)}' in text
    assert f'adasd_warm_entropy_threshold{{family="{family}",model_name="m"}}' in text

    assert worker.dirty
    worker.save_state()
    assert not worker.dirty and load_state(path, ident)[family].to_json() == shared.to_json()

    # a restarted worker on the same pair resumes; a request may still ask for a cold start
    engine2 = LLM(markov_pair(target, draft), calibrate=False, warm=WarmState.open(str(path), ident))
    params = SamplingParams(max_tokens=4, temperature=1.0)
    seq = engine2.new_sequence([0], params, SpecConfig(method="adasd", verification="threshold", warm_start=True))
    assert seq.relaxed.threshold == shared.relaxed.threshold
    cold = engine2.new_sequence([0], params, SpecConfig(method="adasd", verification="threshold", warm_start=False))
    assert cold.relaxed.threshold is None


def test_request_field_and_usage():
    serving = SimpleNamespace(settings=Settings())
    assert OpenAIServing.spec_config(serving, AdasdOptions(warm_start=False)).warm_start is False
    assert OpenAIServing.spec_config(serving, AdasdOptions()).warm_start is True
    # n > 1: the merged excess surprisal is per token over all choices (5.0 / 8), not the mean of their means (0.5)
    stats = [{"generated_tokens": 2, "surprisal_sum": 0.5, "surprisal_sq_sum": 0.25, "surprisal_count": 2,
              "warm_start": True},
             {"generated_tokens": 6, "surprisal_sum": 4.5, "surprisal_sq_sum": 4.0, "surprisal_count": 6,
              "warm_start": True}]
    merged = merge_stats(stats)
    assert merged["excess_surprisal"] == 0.625 and merged["warm_start"] is True and merged["surprisal_count"] == 8


def test_state_path_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert warm_state_path({"warm_state_path": ""}) == str(tmp_path / "adasd")
    assert warm_state_path({"warm_state_path": "none"}) is None
    assert warm_state_path({"warm_state_path": "/x/s.json"}) == "/x/s.json"
    assert Settings(warm_state_path="none").warm_state_path == "none"


def test_a_restarted_worker_plans_from_the_saved_plan_and_snapshots(pair_dir, tmp_path):
    """load_engine: the first start saves its measured plan; the next start, whatever it measures, plans
    reproducible requests from the saved one and restores the published snapshots (same fingerprints)."""
    from adasd_core.verification import Observation
    from adasd_core.warm import SharedStats, Snapshot, family_key
    from server.worker import load_engine

    settings = Settings(target=str(pair_dir / "target"), draft=str(pair_dir / "draft"), device="cpu",
                        dtype="float32", max_running=2, warm_state_path=str(tmp_path / "warm.json")).model_dump()
    first, _ = load_engine(settings)
    family = family_key("adasd", "bayes", True)
    first.warm.shared[family] = SharedStats(kind="bayes")
    first.warm.shared[family].observe(Observation(drafted=2, accepted=1, standard=(True, False), entropies=(0.5, 1.5),
                                                  distances=(0.2, 0.6)))
    first.warm.restore({family: Snapshot(first.warm.shared[family])})
    Worker(first, Conn()).save_state()

    second, _ = load_engine(settings)
    assert second.costs is not second.warm.plan  # measured again at this start; not what it plans with
    assert second.warm.plan.to_json() == first.warm.plan.to_json()
    assert second.warm.published[family].digest == first.warm.published[family].digest
    assert second.fingerprints() == first.fingerprints()
    settings["warm_state_path"] = "none"  # nothing saved: the plan is this start's, and the fingerprint says so
    third, _ = load_engine(settings)
    assert third.fingerprints()["-"] == first.fingerprints()["-"]
    assert third.fingerprints()[family + "#cold"] != first.fingerprints()[family + "#cold"]


def test_the_worker_has_the_grammar_tokenizer_before_the_first_constrained_request(pair_dir, monkeypatch):
    """load_engine makes llguidance's tokenizer view (a third of a second on the default pair): the first
    request with a grammar, and the rounds it shares with others, do not pay for it."""
    import json

    import pytest

    from adasd_core import constrained
    from adasd_core.grammar import GrammarSpec
    from adasd_core.sampling import SamplingParams
    from server.worker import load_engine

    settings = Settings(target=str(pair_dir / "target"), draft=str(pair_dir / "draft"), device="cpu",
                        dtype="float32", max_running=2, warm_state_path="none").model_dump()
    engine, _ = load_engine(settings)
    built = engine.grammars._tokenizer
    assert built is not None
    monkeypatch.setattr(constrained, "ll_tokenizer", lambda *a: pytest.fail("built again at the first request"))
    spec = GrammarSpec("json_schema", json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}}))
    assert engine.grammars.constraint(SamplingParams(grammar=spec)) is not None
    assert engine.grammars._tokenizer is built
