"""The worker loop in-process, with a fake engine: batched steps, admission, cancel, error isolation,
device faults."""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace

import pytest
import torch

from adasd_core.errors import InvalidRequestError
from adasd_core.warm import WarmState
from server.messages import Cancel, Delta, Done, Error, Fatal, KVUsage, Preempted, Shutdown, Started, Submit
from server.worker import DEVICE_FAULT_EXIT, Worker


class FakeStats:
    def __init__(self, seq):
        self.seq = seq

    def to_dict(self) -> dict:
        return {"generated_tokens": self.seq.done_rounds}


class FakeSeq:
    def __init__(self, request_id: str, rounds: int, fail_at: int | None = None):
        self.request_id, self.rounds, self.fail_at = request_id, rounds, fail_at
        self.done_rounds = 0
        self.finish_reason = None
        self.admitted_at: float | None = None
        self.stats = FakeStats(self)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class FakeEngine:
    """The engine's serving interface over `slots` KV slots: it queues what does not fit and admits
    at the start of a step. prompt_ids[0] = rounds to run; prompt_ids[1] (optional) = round at which
    that sequence fails; [] -> 400."""

    def __init__(self, slots: int):
        self.pair = SimpleNamespace(tokenizer=SimpleNamespace(decode=lambda ids: "x"))
        self.slots = slots
        self.waiting: deque[FakeSeq] = deque()
        self.running: list[FakeSeq] = []
        self.aborted: list[str] = []
        self.warm = WarmState()

    @property
    def free_slots(self) -> int:
        return self.slots - len(self.running)

    def new_sequence(self, prompt_ids, params, spec, request_id="", epoch=None):
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        return FakeSeq(request_id, prompt_ids[0], prompt_ids[1] if len(prompt_ids) > 1 else None)

    def add(self, seq) -> None:
        self.waiting.append(seq)

    def step(self):
        while self.waiting and self.free_slots > 0:
            seq = self.waiting.popleft()
            seq.admitted_at = 0.0
            self.running.append(seq)
            assert len(self.running) <= self.slots, "the pool is never overfilled"
        events = []
        for seq in list(self.running):  # one batched round: every running sequence advances
            if seq.fail_at is not None and seq.done_rounds == seq.fail_at:
                seq.finish_reason = "error"
                self.running.remove(seq)
                events.append((seq, RuntimeError("boom")))
                continue
            seq.done_rounds += 1
            if seq.done_rounds >= seq.rounds:
                seq.finish_reason = "length"
                self.running.remove(seq)
            events.append((seq, SimpleNamespace(text="x", token_ids=[1], finish_reason=seq.finish_reason, logprobs=None,
                                                sources=None)))
        return events

    def abort(self, seq) -> None:
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
            self.aborted.append(seq.request_id)
        seq.finish_reason = seq.finish_reason or "abort"

    def kv_report(self) -> dict:
        # this pool holds nothing: no KVUsage report (the tests below count messages)
        return {"target_tokens": 0, "draft_tokens": 0, "blocks_used": 0, "blocks_cached": 0, "blocks_total": 64,
                "block_size": 16, "prefix_queries": 0, "prefix_hits": 0, "preemptions": 0}


class FakeConn:
    """Scripted pipe: `inbox` is read by the worker; `on_send(msg, conn)` may push replies.
    When the worker waits with nothing to do and nothing to read, the pipe reports EOF."""

    def __init__(self, inbox, on_send=None):
        self.inbox = deque(inbox)
        self.sent: list = []
        self.on_send = on_send

    def poll(self, timeout: float) -> bool:
        if not self.inbox and timeout > 0:
            raise EOFError
        return bool(self.inbox)

    def recv(self):
        return self.inbox.popleft()

    def send(self, msg) -> None:
        self.sent.append(msg)
        if self.on_send:
            self.on_send(msg, self)


def submit(rid: str, *prompt) -> Submit:
    return Submit(rid, list(prompt), None, None, 0.0)


def run(inbox, max_running=8, on_send=None) -> list:
    conn = FakeConn(inbox, on_send)
    Worker(FakeEngine(max_running), conn).run()
    return conn.sent


def deltas(sent) -> list[str]:
    return [m.rid for m in sent if isinstance(m, Delta)]


def endings(sent) -> dict[str, list[Done | Error]]:
    out: dict[str, list[Done | Error]] = {}
    for m in sent:
        if isinstance(m, (Done, Error)):
            out.setdefault(m.rid, []).append(m)
    return out


def cancel_a_after_first_delta(msg, conn):
    if isinstance(msg, Delta) and msg.rid == "a" and Cancel("a") not in conn.inbox:
        conn.inbox.append(Cancel("a"))


def test_round_robin_interleaves_running_requests():
    sent = run([submit("a", 3), submit("b", 3), submit("c", 1)])
    assert deltas(sent) == ["a", "b", "c", "a", "b", "a", "b"]
    ends = endings(sent)
    statuses = {rid: [m.status for m in ms] for rid, ms in ends.items()}
    assert statuses == {"a": ["success"], "b": ["success"], "c": ["success"]}


def test_max_running_queues_the_rest():
    sent = run([submit("a", 2), submit("b", 2)], max_running=1)
    kinds = [(type(m), m.rid) for m in sent]
    assert kinds == [(Started, "a"), (Delta, "a"), (Delta, "a"), (Done, "a"),
                     (Started, "b"), (Delta, "b"), (Delta, "b"), (Done, "b")]


class PreemptingEngine(FakeEngine):
    """Preempts the newest running sequence once, at its second step, as the scheduler does when
    blocks run out: it waits again at the head of the queue."""

    steps = 0

    def step(self):
        self.steps += 1
        if self.steps == 2:
            seq = self.running.pop()
            seq.admitted_at = None
            self.waiting.appendleft(seq)
            self.slots -= 1  # its blocks are taken until the other one ends
        if self.steps == 4:
            self.slots += 1
        return super().step()


def test_a_preempted_request_is_reported_waiting_then_running_again():
    conn = FakeConn([submit("a", 6), submit("b", 6)])
    Worker(PreemptingEngine(2), conn).run()
    states = [(type(m).__name__, m.rid, getattr(m, "resumed", None)) for m in conn.sent
              if isinstance(m, (Started, Preempted))]
    assert states == [("Started", "a", False), ("Started", "b", False), ("Preempted", "b", None),
                      ("Started", "b", True)], states
    assert deltas(conn.sent).count("b") == 6 and [type(e) for e in endings(conn.sent)["b"]] == [Done]


def test_cancel_stops_a_request_within_one_round():
    sent = run([submit("a", 50), submit("b", 3)], on_send=cancel_a_after_first_delta)
    assert deltas(sent).count("a") == 1  # b's round runs, then the cancel is read before a's next round
    (done_a,) = endings(sent)["a"]
    assert done_a.status == "cancelled" and done_a.stats == {"generated_tokens": 1}
    assert endings(sent)["b"][0].status == "success"


def test_cancel_of_a_waiting_request():
    sent = run([submit("a", 2), submit("b", 2), Cancel("b")], max_running=1)
    assert endings(sent)["b"] == [Done("b", "cancelled", None)]
    assert "b" not in deltas(sent)


def test_a_failing_request_does_not_stop_the_others():
    sent = run([submit("a", 3), submit("b", 3, 1), submit("bad")])
    ends = endings(sent)
    assert ends["bad"] == [Error("bad", 400, "the prompt is empty", "prompt", None)]
    assert isinstance(ends["b"][0], Error) and ends["b"][0].status_code == 500 and "boom" not in ends["b"][0].message
    assert ends["a"][0].status == "success" and deltas(sent).count("a") == 3


@pytest.mark.parametrize("max_running", [1, 2, 8])
def test_every_request_ends_exactly_once(max_running):
    inbox = [submit(f"r{i}", i % 4 + 1) for i in range(10)] + [Cancel("r3"), Cancel("r9")]
    sent = run(inbox, max_running=max_running)
    ends = endings(sent)
    assert sorted(ends) == sorted(f"r{i}" for i in range(10))
    assert all(len(v) == 1 for v in ends.values())


def test_shutdown_cancels_everything_in_flight():
    sent = run([submit("a", 100), submit("b", 100), Shutdown()], max_running=1)
    assert {rid: ms[0].status for rid, ms in endings(sent).items()} == {"a": "cancelled", "b": "cancelled"}


def test_slots_are_freed_on_finish_cancel_and_error_and_a_full_pool_queues():
    engine = FakeEngine(slots=2)
    conn = FakeConn([submit("a", 50), submit("b", 3, 1), submit("c", 2), submit("d", 2)], cancel_a_after_first_delta)
    Worker(engine, conn).run()  # FakeEngine.step asserts the pool is never overfilled
    ends = endings(conn.sent)
    assert {rid: type(ms[0]) for rid, ms in ends.items()} == {"a": Done, "b": Error, "c": Done, "d": Done}
    assert engine.aborted == ["a"] and engine.running == [] and engine.free_slots == 2
    started = [m.rid for m in conn.sent if isinstance(m, Started)]
    assert started == ["a", "b", "c", "d"]
    # c waited for a freed slot: it starts only after a or b ended
    first_end = min(i for i, m in enumerate(conn.sent) if isinstance(m, (Done, Error)))
    assert next(i for i, m in enumerate(conn.sent) if isinstance(m, Started) and m.rid == "c") > first_end


class FillingEngine(FakeEngine):
    """Every running sequence holds one target and one draft token per round it has run, in blocks of
    4 positions; a finished sequence leaves its full blocks in the prefix cache; every admission looks
    up 8 prompt tokens and finds 4."""

    def __init__(self, slots: int):
        super().__init__(slots)
        self.admitted, self.cached = 0, 0

    def step(self):
        self.admitted += min(len(self.waiting), self.free_slots)
        running = list(self.running)
        events = super().step()
        self.cached += sum(seq.done_rounds // 4 for seq in running if seq not in self.running)
        return events

    def kv_report(self) -> dict:
        n = sum(seq.done_rounds for seq in self.running)
        return {**super().kv_report(), "target_tokens": n, "draft_tokens": n,
                "blocks_used": sum(-(-seq.done_rounds // 4) for seq in self.running), "blocks_cached": self.cached,
                "prefix_queries": 8 * self.admitted, "prefix_hits": 4 * self.admitted}


def test_kv_reports_are_throttled_and_end_at_zero(monkeypatch):
    import server.worker as worker_module

    clock = [0.0]
    monkeypatch.setattr(worker_module.time, "monotonic", lambda: clock[0])

    def tick(msg, conn):  # each delta costs 10 ms: a round of both requests 20 ms
        if isinstance(msg, Delta):
            clock[0] += 0.01

    conn = FakeConn([submit("a", 30), submit("b", 30)], tick)
    Worker(FillingEngine(2), conn).run()
    reports = [(i, m) for i, m in enumerate(conn.sent) if isinstance(m, KVUsage)]
    # about one report per KV_REPORT_S (50 ms) of the 0.6 s, not one per round (30)
    assert 4 <= len(reports) <= clock[0] / worker_module.KV_REPORT_S + 2 < 30, reports
    for _, r in reports[:-1]:
        assert r.target_tokens == r.draft_tokens > 0 and r.blocks_used == 2 * -(-(r.target_tokens // 2) // 4), r
        assert (r.prefix_queries, r.prefix_hits, r.preemptions) == (16, 8, 0), r
    last_done = max(i for i, m in enumerate(conn.sent) if isinstance(m, Done))
    i, last = reports[-1]
    assert i > last_done and last.empty, "the pool's emptying is reported at once"
    assert last == KVUsage(blocks_cached=2 * (30 // 4), prefix_queries=16, prefix_hits=8), last


class FailingEngine(FakeEngine):
    """FakeEngine whose `fail_step`-th step raises `exc` (or, with per_seq, ends the first sequence with it)."""

    def __init__(self, slots: int, exc: BaseException, fail_step: int, per_seq: bool = False):
        super().__init__(slots)
        self.exc, self.fail_step, self.per_seq = exc, fail_step, per_seq
        self.steps = 0
        self.calls_after_failure = 0

    def step(self):
        self.steps += 1
        if self.steps > self.fail_step:
            self.calls_after_failure += 1
        if self.steps != self.fail_step:
            return super().step()
        if not self.per_seq:
            raise self.exc
        seq = self.running.pop(0)
        seq.finish_reason = "error"
        return [(seq, self.exc)]


def run_failing(engine: FailingEngine, inbox) -> tuple[Worker, list]:
    conn = FakeConn(inbox)
    worker = Worker(engine, conn)
    worker.run()
    return worker, conn.sent


@pytest.mark.parametrize("per_seq", [False, True], ids=["step", "sequence"])
def test_a_device_error_fails_everything_with_503_and_exits(per_seq):
    engine = FailingEngine(2, RuntimeError("CUDA error: device-side assert triggered"), fail_step=2, per_seq=per_seq)
    worker, sent = run_failing(engine, [submit("a", 5), submit("b", 5), submit("c", 5)])  # c waits for a slot
    ends = endings(sent)
    assert sorted(ends) == ["a", "b", "c"] and all(len(v) == 1 for v in ends.values())
    for (err,) in ends.values():
        assert isinstance(err, Error) and err.status_code == 503 and err.code == "device_error"
    assert set(deltas(sent)) == {"a", "b"}  # the rounds before the failure went out
    fatal = [m for m in sent if isinstance(m, Fatal)]
    assert len(fatal) == 1 and "device-side assert" in fatal[0].message and sent[-1] is fatal[0]
    assert worker.exit_code == DEVICE_FAULT_EXIT and worker.stopping
    assert engine.calls_after_failure == 0 and engine.aborted == []  # the engine is not touched again


def test_out_of_memory_ends_its_step_and_the_worker_goes_on():
    engine = FailingEngine(2, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), fail_step=2)
    worker, sent = run_failing(engine, [submit("a", 5), submit("b", 5), submit("c", 3)])
    ends = endings(sent)
    assert [(e.status_code, e.code) for e in ends["a"] + ends["b"]] == [(500, "internal_error")] * 2
    assert ends["c"][0].status == "success"  # admitted after the failure, served by the same worker
    assert worker.exit_code == 0 and not any(isinstance(m, Fatal) for m in sent)


def test_load_engine_plans_blocks_from_the_settings(monkeypatch):
    """load_engine sizes the pool with plan_blocks and hands the engine its blocks, block size and
    prefix caching; max_running stays the concurrency limit even where fewer full contexts fit."""
    import adasd_core.device
    import adasd_core.engine
    import adasd_core.kv_cache
    import adasd_core.models
    import adasd_core.warm
    from server.settings import Settings
    from server.worker import load_engine

    pair = SimpleNamespace(context_length=1024, dtype=torch.float32, device=torch.device("cpu"))
    planned, built = [], []

    def plan_blocks(pair_, max_running, block_size=16, memory_fraction=0.9):
        planned.append((pair_, max_running, block_size, memory_fraction))
        return 100, 4096  # 100 x 32 = 3200 positions: 3 full-length sequences, not 8

    monkeypatch.setattr(adasd_core.kv_cache, "plan_blocks", plan_blocks, raising=False)
    monkeypatch.setattr(adasd_core.models, "load_pair", lambda **kwargs: pair)
    monkeypatch.setattr(adasd_core.device, "device_identity", lambda device: "cpu")
    monkeypatch.setattr(adasd_core.warm, "pair_identity", lambda pair_, extra: "pair")
    prepared = []
    grammars = SimpleNamespace(prepare=lambda: prepared.append(1))
    monkeypatch.setattr(adasd_core.engine, "SpeculativeEngine",
                        lambda pair_, **kwargs: built.append(kwargs) or SimpleNamespace(**kwargs, grammars=grammars))
    settings = Settings(block_size=32, prefix_caching=False, gpu_memory_fraction=0.8,
                        warm_state_path="none").model_dump()
    engine, per_block = load_engine(settings)
    assert planned == [(pair, 8, 32, 0.8)] and per_block == 4096
    assert prepared == [1]  # the grammars' tokenizer made at load
    (kwargs,) = built
    assert (kwargs["max_running"], kwargs["kv_blocks"], kwargs["block_size"], kwargs["prefix_caching"]) == \
        (8, 100, 32, False)
    # kv_blocks overrides the plan, down to one full-length sequence (1024 + 22 positions: 33 blocks of 32)
    built.clear()
    load_engine({**settings, "kv_blocks": 33})
    assert built[0]["kv_blocks"] == 33
    from adasd_core.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="kv_blocks=32 cannot hold one sequence"):
        load_engine({**settings, "kv_blocks": 32})


def test_ready_info_sizes_the_front_ends_pool(monkeypatch):
    """The Ready info's pool keys are the ones the front end's metrics read."""
    from prometheus_client.parser import text_string_to_metric_families

    import adasd_core.kv_cache
    from server.metrics import AdasdMetrics
    from server.worker import ready_info

    monkeypatch.setattr(adasd_core.kv_cache, "kv_bytes_per_slot", lambda model, capacity: model.per_token * capacity)
    pair = SimpleNamespace(context_length=1024, vocab_size=100, device=torch.device("cpu"), dtype=torch.bfloat16,
                           target=SimpleNamespace(per_token=2048), draft=SimpleNamespace(per_token=512))
    engine = SimpleNamespace(pair=pair, target_step_s=0.01, kv_blocks=300, block_size=16, prefix_caching=False,
                             runner=SimpleNamespace(batched=True), costs=SimpleNamespace(summary=dict),
                             warm=WarmState(), fingerprints=dict)
    info = ready_info(engine, {"max_running": 8}, 16 * (2048 + 512), 1.5)
    assert {k: info[k] for k in ("slots", "kv_blocks", "block_size", "prefix_caching", "kv_bytes_per_block",
                                 "kv_bytes_per_token", "dtype")} == {
        "slots": 8, "kv_blocks": 300, "block_size": 16, "prefix_caching": False, "kv_bytes_per_block": 40960,
        "kv_bytes_per_token": {"target": 2048, "draft": 512}, "dtype": "bfloat16"}
    metrics = AdasdMetrics("tiny")
    metrics.set_pool(info)
    metrics.observe_kv(KVUsage(target_tokens=480, draft_tokens=480, blocks_used=30))
    got = {f.name: f.samples for f in text_string_to_metric_families(metrics.render()[0].decode())}
    assert got["adasd_cache_config_info"][0].labels == {"model_name": "tiny", "block_size": "16",
                                                        "num_gpu_blocks": "300", "cache_dtype": "bfloat16",
                                                        "enable_prefix_caching": "False"}
    assert got["adasd_kv_cache_usage_perc"][0].value == 0.1
    assert got["adasd_kv_cache_tokens_perc"][0].value == pytest.approx(480 / (300 * 16))
