"""The worker loop in-process, with a fake engine: round-robin, admission, cancel, error isolation."""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace

import pytest

from adasd_core.errors import InvalidRequestError
from server.worker import Worker


class FakeStats:
    def __init__(self, gen):
        self.gen = gen

    def to_dict(self) -> dict:
        return {"generated_tokens": self.gen.done_rounds}


class FakeGen:
    def __init__(self, rounds: int, fail_at: int | None = None):
        self.rounds, self.fail_at = rounds, fail_at
        self.done_rounds = 0
        self.closed = False
        self.stats = FakeStats(self)

    @property
    def finished(self) -> bool:
        return self.done_rounds >= self.rounds or self.closed

    def step(self):
        if self.fail_at is not None and self.done_rounds == self.fail_at:
            raise RuntimeError("boom")
        self.done_rounds += 1
        return SimpleNamespace(text="x", token_ids=[1], finish_reason="length" if self.finished else None, logprobs=None)

    def close(self) -> None:
        self.closed = True


class FakeEngine:
    """prompt_ids[0] = rounds to run; prompt_ids[1] (optional) = round at which step() raises; [] -> 400."""

    def __init__(self):
        self.pair = SimpleNamespace(tokenizer=SimpleNamespace(decode=lambda ids: "x"))
        self.gens: dict[int, FakeGen] = {}

    def start(self, prompt_ids, params, spec):
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        gen = FakeGen(prompt_ids[0], prompt_ids[1] if len(prompt_ids) > 1 else None)
        self.gens[id(gen)] = gen
        return gen


class FakeConn:
    """Scripted pipe: `inbox` is read by the worker; `on_send(msg, conn)` may push replies.
    When the worker waits with nothing to do and nothing to read, the pipe reports EOF."""

    def __init__(self, inbox, on_send=None):
        self.inbox = deque(inbox)
        self.sent: list[tuple] = []
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


def submit(rid: str, *prompt) -> tuple:
    return ("submit", rid, list(prompt), None, None, 0.0)


def run(inbox, max_running=8, on_send=None) -> list[tuple]:
    conn = FakeConn(inbox, on_send)
    Worker(FakeEngine(), conn, max_running).run()
    return conn.sent


def deltas(sent) -> list[str]:
    return [m[1] for m in sent if m[0] == "delta"]


def endings(sent) -> dict[str, list[tuple]]:
    out: dict[str, list[tuple]] = {}
    for m in sent:
        if m[0] in ("done", "error"):
            out.setdefault(m[1], []).append(m)
    return out


def test_round_robin_interleaves_running_requests():
    sent = run([submit("a", 3), submit("b", 3), submit("c", 1)])
    assert deltas(sent) == ["a", "b", "c", "a", "b", "a", "b"]
    ends = endings(sent)
    assert {rid: [m[2] for m in ms] for rid, ms in ends.items()} == {"a": ["success"], "b": ["success"], "c": ["success"]}


def test_max_running_queues_the_rest():
    sent = run([submit("a", 2), submit("b", 2)], max_running=1)
    kinds = [(m[0], m[1]) for m in sent]
    assert kinds == [("started", "a"), ("delta", "a"), ("delta", "a"), ("done", "a"),
                     ("started", "b"), ("delta", "b"), ("delta", "b"), ("done", "b")]


def test_cancel_stops_a_request_within_one_round():
    def cancel_a_after_first_delta(msg, conn):
        if msg[:2] == ("delta", "a") and not any(m[:2] == ("cancel", "a") for m in conn.inbox):
            conn.inbox.append(("cancel", "a"))

    sent = run([submit("a", 50), submit("b", 3)], on_send=cancel_a_after_first_delta)
    assert deltas(sent).count("a") == 1  # b's round runs, then the cancel is read before a's next round
    (done_a,) = endings(sent)["a"]
    assert done_a[2] == "cancelled" and done_a[3] == {"generated_tokens": 1}
    assert endings(sent)["b"][0][2] == "success"


def test_cancel_of_a_waiting_request():
    sent = run([submit("a", 2), submit("b", 2), ("cancel", "b")], max_running=1)
    assert endings(sent)["b"] == [("done", "b", "cancelled", None)]
    assert "b" not in deltas(sent)


def test_a_failing_request_does_not_stop_the_others():
    sent = run([submit("a", 3), submit("b", 3, 1), submit("bad")])
    ends = endings(sent)
    assert ends["bad"] == [("error", "bad", 400, "the prompt is empty", "prompt", None)]
    assert ends["b"][0][0] == "error" and ends["b"][0][2] == 500 and "boom" not in ends["b"][0][3]
    assert ends["a"][0][2] == "success" and deltas(sent).count("a") == 3


@pytest.mark.parametrize("max_running", [1, 2, 8])
def test_every_request_ends_exactly_once(max_running):
    inbox = [submit(f"r{i}", i % 4 + 1) for i in range(10)] + [("cancel", "r3"), ("cancel", "r9")]
    sent = run(inbox, max_running=max_running)
    ends = endings(sent)
    assert sorted(ends) == sorted(f"r{i}" for i in range(10))
    assert all(len(v) == 1 for v in ends.values())


def test_shutdown_cancels_everything_in_flight():
    sent = run([submit("a", 100), submit("b", 100), ("shutdown",)], max_running=1)
    assert {rid: ms[0][2] for rid, ms in endings(sent).items()} == {"a": "cancelled", "b": "cancelled"}
