"""The front end's side of the worker: start and supervise it, submit, stream and cancel requests.

The event loop reads the worker's messages as they arrive (a reader on its pipe: no thread hop
per token); a sender thread writes submits and cancels, so a large prompt never blocks
the loop. Each HTTP request becomes a RequestGroup of one or more generations (prompts x n) whose
outputs arrive on one asyncio queue. If the worker dies, every in-flight generation fails with a
503 and a new worker is started (after a first successful load; a first load that fails stops
the server). A worker whose device failed says so (Fatal) before it exits: from then until a
fresh worker is ready, the client is not ready and `last_error` says why (/health, /ready).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import multiprocessing as mp
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from adasd_core.errors import AdasdError, InvalidRequestError
from server import messages as m
from server import worker as worker_module
from server.errors import (
    EngineDeadError,
    InternalError,
    QueueFullError,
    ServiceUnavailableError,
)
from server.metrics import AdasdMetrics
from server.settings import Settings

log = logging.getLogger("adasd.server")

MAX_RESTART_DELAY_S = 30.0
FATAL_EXIT_GRACE_S = 10.0  # a worker that reported a fatal error and has not exited by then is killed


@dataclass
class SubRequest:
    prompt_ids: list[int]
    params: Any  # SamplingParams
    spec: Any  # SpecConfig


@dataclass
class TokenDelta:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list | None  # [(token, logprob, [(token, logprob), ...]), ...]
    adasd: dict | None = None  # {"token_sources": [...], "rounds": [...]} when the request asked for them


@dataclass
class PromptScores:
    """A scored prompt (echo with logprobs), before the generation's first TokenDelta."""

    logprobs: list  # [(token, logprob, [(token, logprob), ...]), ...]; None, None for the first token


@dataclass
class Finished:
    status: str  # success | cancelled
    stats: dict | None


@dataclass
class Failed:
    error: AdasdError


Output = TokenDelta | PromptScores | Finished | Failed


@dataclass
class _Slot:
    """One generation in flight."""

    rid: str
    group: RequestGroup
    index: int
    method: str
    arrival: float
    state: str = "waiting"  # waiting | running
    last_token_at: float | None = None
    cancelled: bool = False


class RequestGroup:
    """The generations of one HTTP request; iterate for (index, Output) until all have ended."""

    def __init__(self, client: EngineClient, size: int, fingerprint: str | None = None):
        self.client = client
        self.size = size
        self.fingerprint = fingerprint  # system_fingerprint: the published state every generation reads
        self.slots: list[_Slot] = []
        self.queue: asyncio.Queue[tuple[int, Output]] = asyncio.Queue()
        self.ended = 0

    def put(self, index: int, out: Output) -> None:
        self.queue.put_nowait((index, out))

    async def __aiter__(self) -> AsyncIterator[tuple[int, Output]]:
        while self.ended < self.size:
            index, out = await self.queue.get()
            if not isinstance(out, (TokenDelta, PromptScores)):
                self.ended += 1
            yield index, out

    def abort(self) -> None:
        """Cancel the generations that have not ended (no-op for the others)."""
        for slot in self.slots:
            self.client.cancel(slot)


@dataclass
class _WorkerHandle:
    proc: Any  # multiprocessing.Process
    conn: Any  # multiprocessing.connection.Connection
    outbox: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)

    @property
    def pid(self) -> int | None:
        return self.proc.pid


class EngineClient:
    def __init__(self, settings: Settings, metrics: AdasdMetrics, on_fatal: Callable[[str], None] | None = None):
        self.settings = settings
        self.metrics = metrics
        self.on_fatal = on_fatal
        self.state = "starting"  # starting | ready | restarting | failed | stopping
        self.info: dict | None = None  # from the worker's Ready message
        # the worker's published warm-start state: its epoch and {warm.fingerprint_key: fingerprint}
        self.epoch: int | None = None
        self.fingerprints: dict[str, str] = {}
        self.last_error: str | None = None
        self._worker: _WorkerHandle | None = None
        self._slots: dict[str, _Slot] = {}
        self._ever_ready = False
        self._restarts = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._restart_task: asyncio.Task | None = None

    # ------------------------------------------------------------------ state

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def worker_pid(self) -> int | None:
        return self._worker.pid if self._worker else None

    @property
    def capacity(self) -> int:
        return self.settings.max_running + self.settings.max_queue

    def check_ready(self) -> None:
        if self.state == "ready":
            return
        if self.state == "stopping":
            raise ServiceUnavailableError("the server is shutting down", code="shutting_down")
        if self.state == "failed":
            raise ServiceUnavailableError(f"the worker failed to start: {self.last_error}", code="worker_failed")
        what = "restarting" if self.state == "restarting" else "loading the models"
        raise ServiceUnavailableError(f"the worker is {what}; retry shortly (GET /ready says when it is up)")

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        # the worker ignores SIGTERM (so a signal to the whole process group still drains), so
        # multiprocessing's own exit handler could not stop it: kill it if it outlives us
        atexit.register(self._kill_worker)
        await self._spawn()

    def _kill_worker(self) -> None:
        handle = self._worker
        if handle is not None and handle.proc.is_alive():
            handle.proc.kill()
            handle.proc.join(5)

    async def _spawn(self) -> None:
        handle = await asyncio.to_thread(self._start_process)
        if self.state == "stopping":  # shut down while it was starting
            handle.proc.kill()
            await asyncio.to_thread(handle.proc.join, 5)
            return
        self._worker = handle
        log.info("started worker pid %s", handle.pid)
        self._loop.add_reader(handle.conn.fileno(), self._readable, handle)
        threading.Thread(target=self._send, args=(handle,), name=f"adasd-sender-{handle.pid}", daemon=True).start()

    def _start_process(self) -> _WorkerHandle:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=worker_module.main, args=(self.settings.model_dump(), child),
                           name="adasd-worker", daemon=True)
        proc.start()
        child.close()  # so the parent sees EOF when the worker dies
        return _WorkerHandle(proc, parent)

    def begin_drain(self, grace_s: float) -> None:
        """SIGTERM: refuse new requests and stop restarting the worker; in-flight requests get
        `grace_s` seconds, then end with a 503 (in-stream for streams) so every response completes.
        Safe to call from a signal handler."""
        if self.state == "failed":
            return
        self.state = "stopping"
        if self._loop is not None:
            self._loop.call_soon_threadsafe(lambda: self._loop.call_later(grace_s, self._abort_in_flight))

    def _abort_in_flight(self) -> None:
        if not self._slots:
            return
        log.warning("shutdown: cancelling %d generations that did not finish in time", len(self._slots))
        for slot in list(self._slots.values()):
            self.cancel(slot)
        self._fail_all(ServiceUnavailableError("the server is shutting down; this request was cancelled",
                                               code="shutting_down"), status="cancelled")

    async def shutdown(self, timeout: float = 10.0) -> None:
        self.state = "stopping"
        if self._restart_task:
            self._restart_task.cancel()
        handle, self._worker = self._worker, None
        if handle is not None:
            handle.outbox.put(m.Shutdown())
            await asyncio.to_thread(handle.proc.join, timeout)
            if handle.proc.is_alive():
                log.warning("worker pid %s did not exit in %.0fs; killing it", handle.pid, timeout)
                handle.proc.kill()
                await asyncio.to_thread(handle.proc.join, 5)
            handle.outbox.put(None)
        self.metrics.worker_up.set(0)
        shut_down = ServiceUnavailableError("the server shut down before this request finished", code="shutting_down")
        self._fail_all(shut_down, status="cancelled")

    # ------------------------------------------------------------------ the worker's pipe

    def _readable(self, handle: _WorkerHandle) -> None:
        """The worker's pipe has data (event loop): one message (the loop calls again while more wait). The
        worker writes a message whole, so a recv never waits long for the rest of one."""
        try:
            msg = handle.conn.recv()
            try:
                self._on_message(handle, msg)
            except Exception:  # a bug in handling one message must not stop the others
                log.exception("handling %s from worker pid %s", type(msg).__name__, handle.pid)
            return
        except (EOFError, OSError):
            pass
        except Exception:  # a message that cannot be unpickled: treat the worker as broken
            log.exception("bad message from worker pid %s", handle.pid)
            handle.proc.kill()
        self._loop.remove_reader(handle.conn.fileno())
        threading.Thread(target=self._reap, args=(handle,), name=f"adasd-reaper-{handle.pid}", daemon=True).start()

    def _reap(self, handle: _WorkerHandle) -> None:
        handle.proc.join()
        self._call(self._on_exit, handle)

    def _send(self, handle: _WorkerHandle) -> None:
        while True:
            msg = handle.outbox.get()
            if msg is None:
                return
            try:
                handle.conn.send(msg)
            except (OSError, EOFError, ValueError):
                return

    def _call(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the server is gone
            pass

    # ------------------------------------------------------------------ requests

    def submit(self, subs: list[SubRequest], method: str, fingerprint_key: str | None = None) -> RequestGroup:
        """Queue a request's generations, or refuse all of them (503 not ready, 429 queue full).
        They are pinned to the worker's latest published epoch, whose fingerprint the group carries."""
        self.check_ready()
        if len(subs) > self.capacity:
            raise InvalidRequestError(
                f"this request needs {len(subs)} generations (prompts x n) but the server holds at most "
                f"{self.capacity} at once (max_running + max_queue); send fewer", param="n")
        if len(self._slots) + len(subs) > self.capacity:
            for _ in subs:
                self.metrics.observe_request(method, "rejected", None)
            raise QueueFullError(f"the request queue is full ({len(self._slots)} generations in flight, "
                                 f"capacity {self.capacity}); retry later")
        group = RequestGroup(self, len(subs), self.fingerprints.get(fingerprint_key) if fingerprint_key else None)
        now = time.monotonic()
        for i, sub in enumerate(subs):
            slot = _Slot(uuid.uuid4().hex, group, i, method, now)
            self._slots[slot.rid] = slot
            group.slots.append(slot)
            self._worker.outbox.put(m.Submit(slot.rid, sub.prompt_ids, sub.params, sub.spec, now, self.epoch))
        self._update_gauges()
        return group

    def cancel(self, slot: _Slot) -> None:
        if slot.rid in self._slots and not slot.cancelled and self._worker is not None:
            slot.cancelled = True
            self._worker.outbox.put(m.Cancel(slot.rid))

    # ------------------------------------------------------------------ worker messages (event loop)

    def _on_message(self, handle: _WorkerHandle, msg: m.FromWorker) -> None:
        if handle is not self._worker:
            return  # from a worker that has been replaced
        match msg:
            case m.Ready():
                self._on_ready(handle, msg.info)
            case m.Fatal():
                self.last_error = msg.message
                if self.state == "ready":  # a serving worker that is about to exit: refuse new requests now
                    log.error("worker pid %s is exiting: %s", handle.pid, msg.message)
                    self.state = "restarting"
                    self._loop.call_later(FATAL_EXIT_GRACE_S, self._kill_stuck, handle)
            case m.KVUsage():
                self.metrics.observe_kv(msg)
            case m.Published():
                self.epoch, self.fingerprints = msg.epoch, msg.fingerprints
            case m.Started() | m.Preempted() | m.PromptScored() | m.Delta() | m.Done() | m.Error():
                slot = self._slots.get(msg.rid)
                if slot is not None:
                    self._on_generation(slot, msg)
            case _:
                log.error("unknown worker message %r", msg)

    def _on_ready(self, handle: _WorkerHandle, info: dict) -> None:
        self.info, self.last_error = info, None
        self.state = "ready" if self.state != "stopping" else self.state
        self._ever_ready, self._restarts = True, 0
        self.metrics.worker_up.set(1)
        self.metrics.set_pool(self.info)
        self.metrics.observe_warm_state(self.info.pop("warm_state", None))
        self.epoch, self.fingerprints = self.info.pop("epoch", None), self.info.pop("fingerprints", None) or {}
        log.info("worker pid %s ready (context %s tokens)", handle.pid, self.info["context_length"])

    def _on_generation(self, slot: _Slot, msg: m.Started | m.Preempted | m.PromptScored | m.Delta | m.Done | m.Error
                       ) -> None:
        match msg:
            case m.Started():
                slot.state = "running"
                if not msg.resumed:
                    self.metrics.queue_time.observe(msg.queue_s)
                self._update_gauges()
            case m.Preempted():
                slot.state = "waiting"
                self._update_gauges()
            case m.PromptScored():
                slot.group.put(slot.index, PromptScores(msg.logprobs))
            case m.Delta():
                self._observe_tokens(slot, len(msg.token_ids))
                delta = TokenDelta(msg.text, msg.token_ids, msg.finish_reason, msg.logprobs, msg.adasd)
                slot.group.put(slot.index, delta)
            case m.Done():
                stats = msg.stats
                if stats:
                    stats = dict(stats)
                    self.metrics.observe_warm_state(stats.pop("warm_state", None))
                self._release(slot)
                if msg.status == "success":
                    self.metrics.e2e.observe(time.monotonic() - slot.arrival)
                self.metrics.observe_request(slot.method, msg.status, stats)
                slot.group.put(slot.index, Finished(msg.status, stats))
            case m.Error():
                self._release(slot)
                self.metrics.observe_request(slot.method, "error", None)
                slot.group.put(slot.index, Failed(_worker_error(msg)))

    def _observe_tokens(self, slot: _Slot, n: int) -> None:
        if not n:
            return
        now = time.monotonic()
        if slot.last_token_at is None:
            self.metrics.ttft.observe(now - slot.arrival)
        else:
            gap = (now - slot.last_token_at) / n
            for _ in range(n):
                self.metrics.itl.observe(gap)
        slot.last_token_at = now

    def _kill_stuck(self, handle: _WorkerHandle) -> None:
        if handle.proc.is_alive():
            log.warning("worker pid %s did not exit after its fatal error; killing it", handle.pid)
            handle.proc.kill()

    def _on_exit(self, handle: _WorkerHandle) -> None:
        handle.outbox.put(None)
        if handle is not self._worker:
            return
        self._worker = None
        self.info = None
        self.metrics.worker_up.set(0)
        self.metrics.set_pool(None)
        code = handle.proc.exitcode
        self._fail_all(EngineDeadError())
        if self.state == "stopping":
            return
        if not self._ever_ready:
            self.state = "failed"
            self.last_error = self.last_error or f"the worker exited with code {code} while loading"
            log.error("worker pid %s failed to start: %s", handle.pid, self.last_error)
            if self.on_fatal:
                self.on_fatal(self.last_error)
            return
        self.state = "restarting"
        self.last_error = self.last_error or f"the worker exited with code {code}"
        log.error("worker pid %s exited with code %s; restarting it", handle.pid, code)
        self._restart_task = asyncio.get_running_loop().create_task(self._restart())

    async def _restart(self) -> None:
        while self.state == "restarting":
            delay = min(MAX_RESTART_DELAY_S, 0.5 * 2 ** self._restarts)
            self._restarts += 1
            await asyncio.sleep(delay)
            if self.state != "restarting":
                return
            try:
                await self._spawn()
                return
            except Exception:
                log.exception("could not start a new worker; retrying")

    def _release(self, slot: _Slot) -> None:
        self._slots.pop(slot.rid, None)
        self._update_gauges()

    def _fail_all(self, error: AdasdError, status: str = "error") -> None:
        for slot in list(self._slots.values()):
            self._release(slot)
            self.metrics.observe_request(slot.method, "cancelled" if slot.cancelled else status, None)
            slot.group.put(slot.index, Failed(error))

    def _update_gauges(self) -> None:
        running = sum(1 for s in self._slots.values() if s.state == "running")
        self.metrics.set_load(running, len(self._slots) - running)


def _worker_error(msg: m.Error) -> AdasdError:
    if msg.status_code == 503:
        return ServiceUnavailableError(msg.message, code=msg.code or "not_ready")
    if msg.status_code >= 500:
        return InternalError(msg.message)
    err = InvalidRequestError(msg.message, param=msg.param, code=msg.code)
    err.status_code = msg.status_code
    return err
