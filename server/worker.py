"""The worker process: loads the target and draft once and runs the speculative loop.

It talks to the front end over one duplex multiprocessing pipe with the messages of
server/messages.py: Submit, Cancel and Shutdown in; Ready or Fatal, then Started, PromptScored,
Delta, Done, Error, KVUsage and Published out. Every submitted rid ends with exactly one Done or
Error.

Every submitted request goes to the engine at once (its scheduler holds the one waiting queue and
admits up to max_running while KV blocks last: a full pool queues or preempts the newest request,
never fails). The loop runs one engine step (a chunk of prefill for new requests and one batched
round for every running one), says which requests the step admitted, sends their outputs, then
reads the pipe again, so a cancel stops its request within one round and frees its blocks.

A device error that can leave the CUDA context unusable (server/faults.py) ends the process: every
request in flight gets a 503, a Fatal says why, and the worker exits with DEVICE_FAULT_EXIT so that
the front end starts a fresh one. Out-of-memory stays with the requests of its step.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, fields
from typing import Any

from adasd_core.errors import AdasdError
from server import messages as m
from server.faults import FAULT_FILE_ENV, FaultFile, is_device_fault, summary

log = logging.getLogger("adasd.worker")

POLL_IDLE_S = 0.5
# KVUsage reports (engine.kv_report()) at most this often; at once when the pool empties
KV_REPORT_S = 0.05
KV_FIELDS = tuple(f.name for f in fields(m.KVUsage))
# For tests and demos: sleep this long after each round of the loop, to make a tiny model
# behave like a slow one (requests that reliably outlive a disconnect, a kill or a full queue).
ROUND_DELAY_ENV = "ADASD_DEBUG_ROUND_DELAY_S"
DEVICE_FAULT_EXIT = 3  # the worker's exit status after a device fault (the front end restarts it)


@dataclass
class Request:
    """One generation as the worker sees it: what was submitted, and its engine state."""

    submit: m.Submit
    seq: Any  # adasd_core.sequence.Sequence, queued in the engine from submission
    started: bool = False  # the engine has admitted it to the running set (Started sent)
    requeued: bool = False  # preempted and waiting again (Preempted sent)

    @property
    def rid(self) -> str:
        return self.submit.rid


class TokenText:
    """Token ids -> display strings for logprobs (cached; the vocabulary is small and reused)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        s = self.cache.get(token_id)
        if s is None:
            s = self.cache[token_id] = self.tokenizer.decode([token_id])
        return s

    def payload(self, logprobs) -> list | None:
        """[(token, logprob, [(token, logprob), ...]), ...]; logprob and top are None for a first prompt token."""
        if logprobs is None:
            return None
        return [(self(lp.token_id), lp.logprob, None if lp.top is None else [(self(t), v) for t, v in lp.top])
                for lp in logprobs]

    def sources(self, delta) -> dict | None:
        """A round's token sources as the API sends them (the `adasd` object of a choice), or None."""
        if delta.sources is None:
            return None
        tokens = [{"token_id": t, "text": s.text, "source": s.source, "round": s.round, "entropy": _r(s.entropy),
                   "js_distance": _r(s.js_distance), "posterior": _r(s.posterior),
                   "rejected": None if s.rejected is None else {"token_id": s.rejected, "text": self(s.rejected)}}
                  for t, s in zip(delta.token_ids, delta.sources)]
        rnd = {k: _r(v) if isinstance(v, float) else v for k, v in delta.round.items()}
        return {"token_sources": tokens, "rounds": [{k: rnd.get(k) for k in ROUND_FIELDS}]}


# every round record has these (None where the method has no such state)
ROUND_FIELDS = ("round", "drafted", "accepted", "relaxed", "entropy_threshold", "js_threshold", "kde_accepted",
                "kde_rejected", "estimated_speedup")


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 5)


SAVE_EVERY_S = 30.0  # warm-start state: saved at most this often while serving, and at shutdown


class Worker:
    def __init__(self, engine, conn, round_delay_s: float = 0.0, faults: FaultFile | None = None):
        self.engine = engine
        self.conn = conn
        self.round_delay_s = round_delay_s
        self.saved_at = time.monotonic()
        self.dirty = False
        self.announced_epoch = engine.warm.epoch
        self.requests: dict[str, Request] = {}  # in the engine: waiting or running
        self.token_text = TokenText(engine.pair.tokenizer)
        self.stopping = False
        self.exit_code = 0  # DEVICE_FAULT_EXIT once the device has failed
        self.faults = faults  # test-only injection point, checked before each step
        self.kv_sent, self.kv_sent_at = m.KVUsage(), 0.0

    # ------------------------------------------------------------------ loop

    def run(self) -> None:
        while not self.stopping:
            self.poll(0.0 if self.requests else POLL_IDLE_S)
            if self.stopping:
                break
            if self.requests:
                self.step()
                if self.round_delay_s:
                    time.sleep(self.round_delay_s)
            self.report_kv()
            if self.dirty and time.monotonic() - self.saved_at > SAVE_EVERY_S:
                self.save_state()
        if self.exit_code:  # the engine may be unusable: nothing more is asked of it (the last publication is saved)
            return
        self.cancel_all()
        if self.dirty:
            self.save_state()

    def report_kv(self) -> None:
        report = self.engine.kv_report()
        usage = m.KVUsage(**{name: int(report[name]) for name in KV_FIELDS})
        now = time.monotonic()
        if usage != self.kv_sent and (now - self.kv_sent_at >= KV_REPORT_S or usage.empty):
            self.kv_sent, self.kv_sent_at = usage, now
            self.send(usage)

    def warm_state(self) -> dict:
        """{family: summary} of the engine's warm-start statistics (the gauges show it)."""
        return self.engine.warm.summary()

    def save_state(self) -> None:
        """The warm-start state to its file (where it has one)."""
        self.saved_at, self.dirty = time.monotonic(), False
        try:
            self.engine.warm.save()
        except OSError as exc:
            log.warning("could not save the warm-start state to %s: %s", self.engine.warm.path, exc)

    def announce(self) -> None:
        """After a publication: new fingerprints to the front end, and the snapshots to disk at once
        (rare; a worker killed later restarts with exactly what its last responses were stamped with)."""
        epoch = self.engine.warm.epoch
        if epoch == self.announced_epoch:
            return
        self.announced_epoch = epoch
        log.info("warm start: published epoch %d (%s)", epoch, ", ".join(
            f"{k}: {v.rounds} rounds" for k, v in sorted(self.engine.warm.published.items())))
        self.send(m.Published(epoch, self.engine.fingerprints()))
        self.save_state()

    def poll(self, timeout: float) -> None:
        """Handle every message already in the pipe (waiting up to `timeout` for the first)."""
        try:
            while self.conn.poll(timeout):
                self.handle(self.conn.recv())
                timeout = 0.0
        except (EOFError, OSError):  # the front end is gone
            self.stopping = True

    def handle(self, msg: m.ToWorker) -> None:
        match msg:
            case m.Submit():
                self.submit(msg)
            case m.Cancel():
                self.cancel(msg.rid)
            case m.Shutdown():
                started = sum(r.started for r in self.requests.values())
                log.info("shutting down (%d running, %d waiting are cancelled)", started, len(self.requests) - started)
                self.stopping = True
            case _:
                log.error("unknown message %r", msg)

    def submit(self, sub: m.Submit) -> None:
        """A request -> the engine's queue (it admits while KV blocks last), or its error now."""
        try:
            seq = self.engine.new_sequence(sub.prompt_ids, sub.params, sub.spec, request_id=sub.rid, epoch=sub.epoch)
        except AdasdError as exc:
            self.send(m.Error(sub.rid, exc.status_code, exc.message, exc.param, exc.code))
            return
        except Exception as exc:
            if is_device_fault(exc):
                self.send(device_error(sub.rid))
                return self.device_failed(exc)
            log.exception("request %s failed to start", sub.rid)
            self.send(internal_error(sub.rid))
            return
        self.engine.add(seq)
        self.requests[sub.rid] = Request(sub, seq)

    def report_started(self) -> None:
        """Started for the requests the last step admitted (before any of their output); Preempted for
        those it sent back to wait, and Started(resumed) when they run again."""
        for req in self.requests.values():
            admitted = req.seq.admitted_at is not None
            if not req.started:
                if admitted:
                    req.started = True
                    self.send(m.Started(req.rid, max(0.0, req.seq.admitted_at - req.submit.submitted_at)))
            elif req.requeued == admitted:
                req.requeued = not admitted
                self.send(m.Preempted(req.rid) if req.requeued else m.Started(req.rid, 0.0, resumed=True))

    def step(self) -> None:
        from adasd_core.sequence import PromptLogprobs  # here: the front end imports this module without torch

        try:
            if self.faults is not None:
                self.faults.check()
            events = self.engine.step()
        except Exception as exc:  # outside any one sequence: end every running request, keep serving
            if is_device_fault(exc):
                return self.device_failed(exc)
            log.exception("engine step failed")
            for req in list(self.requests.values()):
                if req.started:
                    self.finish(req)
                    self.send(internal_error(req.rid))
            return
        self.report_started()
        for seq, result in events:
            req = self.requests.get(seq.request_id)
            if req is None:
                continue
            if isinstance(result, BaseException):
                if is_device_fault(result):
                    return self.device_failed(result)
                log.error("request %s failed", req.rid, exc_info=result)
                self.finish(req)
                self.send(internal_error(req.rid))
                continue
            if isinstance(result, PromptLogprobs):
                self.send(m.PromptScored(req.rid, self.token_text.payload(result.logprobs)))
                continue
            self.send(m.Delta(req.rid, result.text, result.token_ids, result.finish_reason,
                              self.token_text.payload(result.logprobs), self.token_text.sources(result)))
            if seq.finished:
                self.finish(req)
                self.dirty = True
                self.send(m.Done(req.rid, "success", {**seq.stats.to_dict(), "warm_state": self.warm_state()}))
        self.announce()

    def device_failed(self, exc: BaseException) -> None:
        """The device may be unusable for good: fail every request with a 503 and stop (the front
        end starts a fresh worker). The engine is not called again."""
        reason = f"device error: {summary(exc)}"
        log.critical("%s; the worker exits so that a fresh one takes over", reason, exc_info=exc)
        for req in self.requests.values():
            self.send(device_error(req.rid))
        self.requests.clear()
        self.send(m.Fatal(reason))
        self.stopping, self.exit_code = True, DEVICE_FAULT_EXIT

    # ------------------------------------------------------------------ endings

    def finish(self, req: Request) -> None:
        self.requests.pop(req.rid, None)
        self.engine.abort(req.seq)  # frees its blocks or its place in the queue (no-op once the engine released it)

    def cancel(self, rid: str) -> None:
        req = self.requests.get(rid)
        if req is not None:  # an unknown rid has already finished
            self.finish(req)
            self.send(m.Done(rid, "cancelled", req.seq.stats.to_dict() if req.started else None))

    def cancel_all(self) -> None:
        for rid in list(self.requests):
            self.cancel(rid)

    def send(self, msg: m.FromWorker) -> None:
        try:
            self.conn.send(msg)
        except (BrokenPipeError, EOFError, OSError):
            self.stopping = True


def device_error(rid: str) -> m.Error:
    return m.Error(rid, 503, "the server's accelerator failed while serving this request; a fresh worker is "
                             "starting: retry shortly", None, "device_error")


def internal_error(rid: str) -> m.Error:
    """A bug, not the request's fault: the client gets a 500 that says only that (the log has the rest)."""
    return m.Error(rid, 500, "internal error in the worker (see the server log)", None, "internal_error")


# ---------------------------------------------------------------------------- process entry


def load_engine(settings: dict):
    """The pair, its KV blocks and the warm-start state, as the settings ask: (engine, KV bytes per block)."""
    from adasd_core.device import device_identity
    from adasd_core.engine import SpecConfig, SpeculativeEngine
    from adasd_core.kv_cache import plan_blocks
    from adasd_core.models import load_pair
    from adasd_core.warm import Schedule, WarmState, pair_identity

    pair = load_pair(
        target=settings["target"], draft=settings["draft"], device=settings["device"], dtype=settings["dtype"],
        device_map=settings["device_map"], trust_remote_code=settings["trust_remote_code"],
        max_model_len=settings["max_model_len"],
    )
    max_running, block_size = settings["max_running"], settings.get("block_size", 16)
    blocks, per_block = plan_blocks(pair, max_running, block_size, settings.get("gpu_memory_fraction", 0.9))
    if settings.get("kv_blocks"):
        from adasd_core.drafting import WINDOW
        from adasd_core.errors import ModelLoadError

        one = -(-(pair.context_length + WINDOW + 2) // block_size)
        if settings["kv_blocks"] < one:
            raise ModelLoadError(f"kv_blocks={settings['kv_blocks']} cannot hold one sequence of the context length "
                                 f"{pair.context_length}: it takes {one} blocks of {block_size} "
                                 "(or lower max_model_len)")
        blocks = settings["kv_blocks"]
    full = blocks * block_size // pair.context_length
    if full < max_running:  # requests shorter than the context still run max_running at once
        log.warning("KV memory holds %d full-length sequences, not max_running=%d: %d blocks of %d tokens "
                    "(%.2f MiB each); the newest request is preempted when blocks run out", full, max_running,
                    blocks, block_size, per_block / 2**20)
    spec = SpecConfig(method=settings["method"], k=settings["k"], verification=settings["verification"])
    # what the statistics and the plan depend on besides the models: the algorithm's settings, the device,
    # its model (GPU and capability, or CPU) and number format: a state file carried to other hardware is not used there
    identity = pair_identity(pair, {"window": spec.window, "dtype": str(pair.dtype), "device": pair.device.type,
                                    "hardware": device_identity(pair.device)})
    schedule = Schedule(first=settings.get("warm_epoch_rounds", 32), freeze=settings.get("warm_freeze_rounds", 4096))
    warm = WarmState.open(warm_state_file(settings, identity), identity, schedule,
                          static_fingerprint(identity, settings))
    engine = SpeculativeEngine(pair, default_spec=spec, max_running=max_running,
                               batch_aware=settings.get("batch_aware", True), warm=warm, kv_blocks=blocks,
                               block_size=block_size, prefix_caching=settings.get("prefix_caching", True))
    engine.grammars.prepare()
    return engine, per_block


def warm_state_file(settings: dict, identity: str) -> str | None:
    """The warm-start state's file: warm_state_path as a .json file, or a file named by the pair's
    identity in that directory (default: next to the Hugging Face cache); None when saving is off."""
    path = warm_state_path(settings)
    if path is None:
        return None
    return f"{path}/warm_stats_{identity}.json" if os.path.isdir(path) or not path.endswith(".json") else path


def static_fingerprint(identity: str, settings: dict) -> str:
    """What every response's system_fingerprint covers besides the plan and the snapshot: the pair
    and its identity settings, the defaults a request may leave out, the code's version and its seeded draws."""
    from importlib.metadata import PackageNotFoundError, version

    from adasd_core.sampling import SEEDED_DRAWS

    try:
        code = version("adasd")
    except PackageNotFoundError:
        code = "unknown"
    keys = ("method", "k", "verification", "batch_aware")
    return json.dumps({"identity": identity, "code": code, "draws": SEEDED_DRAWS, **{k: settings.get(k) for k in keys}},
                      sort_keys=True)


def warm_state_path(settings: dict) -> str | None:
    """Where the warm-start state is saved: settings' warm_state_path (a directory or a .json file;
    "none" turns saving off), else a directory next to the Hugging Face cache."""
    path = settings.get("warm_state_path", "")
    if path is None or str(path).lower() == "none":
        return None
    if path:
        return str(path)
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(hf_home, "adasd")


def ready_info(engine, settings: dict, block_bytes: int, load_s: float) -> dict:
    """What the Ready message tells the front end about the loaded engine."""
    from adasd_core.kv_cache import kv_bytes_per_slot

    pair = engine.pair
    return {
        "pid": os.getpid(),
        "context_length": pair.context_length,
        "vocab_size": pair.vocab_size,
        "device": str(pair.device),
        "dtype": str(pair.dtype).removeprefix("torch."),
        "target_step_s": engine.target_step_s,
        "slots": settings["max_running"],  # requests run at once
        "kv_blocks": engine.kv_blocks,  # in each pool, the target's and the draft's
        "block_size": engine.block_size,
        "prefix_caching": engine.prefix_caching,
        "kv_bytes_per_block": block_bytes,  # target and draft together
        "kv_bytes_per_token": {"target": kv_bytes_per_slot(pair.target, 1),
                               "draft": kv_bytes_per_slot(pair.draft, 1) if pair.draft is not None else 0},
        "batched": engine.runner.batched,
        "step_costs": engine.costs.summary(),
        "load_s": load_s,
        "warm_state": engine.warm.summary(),
        "epoch": engine.warm.epoch,
        "fingerprints": engine.fingerprints(),
    }


def main(settings: dict, conn) -> None:
    """Process entry point (multiprocessing, spawn start method)."""
    # the front end orchestrates shutdown; a Ctrl-C or SIGTERM to the process group must not
    # kill the worker under requests that are still draining
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=settings["log_level"].upper() if settings["log_level"] != "trace" else "DEBUG",
                        format=f"%(asctime)s %(levelname)s worker[{os.getpid()}] %(message)s")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        t0 = time.perf_counter()
        engine, block_bytes = load_engine(settings)
    except BaseException as exc:
        from adasd_core.errors import ModelLoadError

        if isinstance(exc, ModelLoadError):  # its message says what, where and what to do
            log.debug("could not load the models", exc_info=True)
            message = exc.message
        else:
            log.exception("could not load the models")
            message = f"could not load the models: {type(exc).__name__}: {exc}"
        try:
            conn.send(m.Fatal(message))
        except OSError:
            pass
        return
    info = ready_info(engine, settings, block_bytes, round(time.perf_counter() - t0, 3))
    draft = engine.pair.draft_name or "none"
    if settings["draft"] != draft and settings["draft"]:  # 'auto': the draft it chose
        draft = f"{draft} ({settings['draft']})"
    log.info("loaded target=%s draft=%s on %s in %.1fs; %d KV blocks of %d tokens (%.2f MiB each), prefix caching "
             "%s, up to %d requests at once, %s engine", settings["target"], draft, info["device"],
             info["load_s"], info["kv_blocks"], info["block_size"], block_bytes / 2**20,
             "on" if info["prefix_caching"] else "off", info["slots"],
             "batched" if info["batched"] else "unbatched (no lean path for this model)")
    try:
        conn.send(m.Ready(info))
    except OSError:
        return
    delay = float(os.environ.get(ROUND_DELAY_ENV) or 0.0)
    if delay:
        log.warning("%s=%s: every round is slowed down on purpose", ROUND_DELAY_ENV, delay)
    faults = FaultFile.from_env()
    if faults is not None:
        log.warning("%s=%s: faults are injected on request (tests only)", FAULT_FILE_ENV, faults.path)
    worker = Worker(engine, conn, round_delay_s=delay, faults=faults)
    worker.run()
    conn.close()
    if worker.exit_code:
        log.error("stopped after a device error (exit status %d)", worker.exit_code)
    else:
        log.info("stopped")
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(worker.exit_code)  # nothing left to clean up; skips a slow interpreter teardown (torch, tokenizers)
