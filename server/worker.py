"""The worker process: loads the target and draft once and runs the speculative loop.

It talks to the front end over one duplex multiprocessing pipe, with tuples:

    front end -> worker                         worker -> front end
    ("submit", rid, prompt_ids, params, spec,   ("ready", info)            loaded; info has pid, context...
               submitted_at[, epoch])           ("fatal", message)         could not load; exits
    ("cancel", rid)                             ("started", rid, queue_s)  admitted to the running set
    ("shutdown",)                               ("prompt_logprobs", rid, logprobs)   a scored prompt, before its deltas
                                                ("delta", rid, text, token_ids, finish_reason, logprobs,
                                                          adasd)   adasd: token sources (or None)
                                                ("done", rid, status, stats)    status: success | cancelled
                                                ("error", rid, status_code, message, param, code)
                                                ("kv", target_tokens, draft_tokens)  KV pool fill
                                                ("published", epoch, fingerprints)  new warm-start snapshots

`epoch` pins a request to the published warm-start state the front end stamped its
system_fingerprint from (info["epoch"] at ready, then each "published"); the worker keeps the
recent ones, so a publication racing with a submit cannot change what the request reads.

Every submitted rid ends with exactly one "done" or "error". The loop hands waiting requests to the
engine while it has free KV slots, then runs one engine step (a chunk of prefill for new requests
and one batched round for every running one), then reads the pipe again, so a cancel stops its
request within one round and frees its slot.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from adasd_core.errors import AdasdError

log = logging.getLogger("adasd.worker")

POLL_IDLE_S = 0.5
# "kv" reports (tokens resident in the KV pools) at most this often; at once when the pool empties
KV_REPORT_S = 0.05
# For tests and demos: sleep this long after each round of the loop, to make a tiny model
# behave like a slow one (requests that reliably outlive a disconnect, a kill or a full queue).
ROUND_DELAY_ENV = "ADASD_DEBUG_ROUND_DELAY_S"


@dataclass
class Request:
    """One generation as the worker sees it."""

    rid: str
    prompt_ids: list[int]
    params: Any  # adasd_core.sampling.SamplingParams
    spec: Any  # adasd_core.engine.SpecConfig
    submitted_at: float  # time.monotonic() in the front end (one clock per host)
    epoch: int | None = None  # the published warm-start state it reads (None: the latest)
    seq: Any = None  # adasd_core.sequence.Sequence once admitted


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
    def __init__(self, engine, conn, round_delay_s: float = 0.0, state_path: str | None = None,
                 state_identity: str = ""):
        self.engine = engine
        self.conn = conn
        self.round_delay_s = round_delay_s
        self.state_path = state_path  # None: the warm-start state lives only as long as the process
        self.state_identity = state_identity
        self.saved_at = time.monotonic()
        self.dirty = False
        self.announced_epoch = getattr(engine, "epoch", 0)
        self.waiting: deque[Request] = deque()
        self.running: dict[str, Request] = {}
        self.token_text = TokenText(engine.pair.tokenizer)
        self.stopping = False
        self.kv_sent, self.kv_sent_at = (0, 0), 0.0

    # ------------------------------------------------------------------ loop

    def run(self) -> None:
        while not self.stopping:
            busy = bool(self.running or self.waiting)
            self.poll(0.0 if busy else POLL_IDLE_S)
            if self.stopping:
                break
            self.admit()
            if self.running:
                self.step()
                if self.round_delay_s:
                    time.sleep(self.round_delay_s)
            self.report_kv()
            if self.dirty and time.monotonic() - self.saved_at > SAVE_EVERY_S:
                self.save_state()
        self.cancel_all()
        if self.dirty:
            self.save_state()

    def report_kv(self) -> None:
        tokens = self.engine.kv_tokens()
        now = time.monotonic()
        if tokens != self.kv_sent and (now - self.kv_sent_at >= KV_REPORT_S or tokens == (0, 0)):
            self.kv_sent, self.kv_sent_at = tokens, now
            self.send("kv", *tokens)

    def warm_state(self) -> dict:
        """{family: summary} of the engine's warm-start statistics (the gauges show it)."""
        return warm_summary(self.engine)

    def save_state(self) -> None:
        self.saved_at, self.dirty = time.monotonic(), False
        if not self.state_path:
            return
        from adasd_core.warm import save_state

        try:
            save_state(self.state_path, self.state_identity, self.engine.shared, self.engine.published,
                       self.engine.plan_costs.to_json())
        except OSError as exc:
            log.warning("could not save the warm-start state to %s: %s", self.state_path, exc)

    def announce(self) -> None:
        """After a publication: new fingerprints to the front end, and the snapshots to disk at once
        (rare; a worker killed later restarts with exactly what its last responses were stamped with)."""
        epoch = getattr(self.engine, "epoch", 0)
        if epoch == self.announced_epoch:
            return
        self.announced_epoch = epoch
        log.info("warm start: published epoch %d (%s)", epoch, ", ".join(
            f"{k}: {v.rounds} rounds" for k, v in sorted(self.engine.published.items())))
        self.send("published", epoch, self.engine.fingerprints())
        self.save_state()

    def poll(self, timeout: float) -> None:
        """Handle every message already in the pipe (waiting up to `timeout` for the first)."""
        try:
            while self.conn.poll(timeout):
                self.handle(self.conn.recv())
                timeout = 0.0
        except (EOFError, OSError):  # the front end is gone
            self.stopping = True

    def handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "submit":
            _, rid, prompt_ids, params, spec, submitted_at, *epoch = msg
            self.waiting.append(Request(rid, prompt_ids, params, spec, submitted_at, epoch[0] if epoch else None))
        elif kind == "cancel":
            self.cancel(msg[1])
        elif kind == "shutdown":
            log.info("shutting down (%d running, %d waiting are cancelled)", len(self.running), len(self.waiting))
            self.stopping = True
        else:
            log.error("unknown message %r", kind)

    def admit(self) -> None:
        """Waiting requests -> the engine, while it has free KV slots (a full pool queues, never fails)."""
        while self.waiting and self.engine.free_slots > 0:
            req = self.waiting.popleft()
            try:
                req.seq = self.engine.new_sequence(req.prompt_ids, req.params, req.spec, request_id=req.rid,
                                                   epoch=req.epoch)
            except AdasdError as exc:
                self.send("error", req.rid, exc.status_code, exc.message, exc.param, exc.code)
                continue
            except Exception:
                log.exception("request %s failed to start", req.rid)
                self.send("error", req.rid, 500, "internal error in the worker (see the server log)", None, "internal_error")
                continue
            self.engine.add(req.seq)
            self.send("started", req.rid, max(0.0, time.monotonic() - req.submitted_at))
            self.running[req.rid] = req

    def step(self) -> None:
        from adasd_core.sequence import PromptLogprobs  # here: the front end imports this module without torch

        try:
            events = self.engine.step()
        except Exception:  # a bug outside any one sequence: end every running request, keep serving
            log.exception("engine step failed")
            for req in list(self.running.values()):
                self.finish(req)
                self.send("error", req.rid, 500, "internal error in the worker (see the server log)", None, "internal_error")
            return
        for seq, result in events:
            req = self.running.get(seq.request_id)
            if req is None:
                continue
            if isinstance(result, BaseException):
                log.error("request %s failed", req.rid, exc_info=result)
                self.finish(req)
                self.send("error", req.rid, 500, "internal error in the worker (see the server log)", None, "internal_error")
                continue
            if isinstance(result, PromptLogprobs):
                self.send("prompt_logprobs", req.rid, self.token_text.payload(result.logprobs))
                continue
            self.send("delta", req.rid, result.text, result.token_ids, result.finish_reason,
                      self.token_text.payload(result.logprobs), self.token_text.sources(result))
            if seq.finished:
                self.finish(req)
                self.dirty = True
                self.send("done", req.rid, "success", {**seq.stats.to_dict(), "warm_state": self.warm_state()})
        self.announce()

    # ------------------------------------------------------------------ endings

    def finish(self, req: Request) -> None:
        self.running.pop(req.rid, None)
        self.engine.abort(req.seq)  # frees the slot (no-op once the engine has released it)

    def cancel(self, rid: str) -> None:
        for req in self.waiting:
            if req.rid == rid:
                self.waiting.remove(req)
                self.send("done", rid, "cancelled", None)
                return
        req = self.running.get(rid)
        if req is not None:  # an unknown rid has already finished
            self.finish(req)
            self.send("done", rid, "cancelled", req.seq.stats.to_dict())

    def cancel_all(self) -> None:
        for rid in [r.rid for r in self.waiting] + list(self.running):
            self.cancel(rid)

    def send(self, *msg) -> None:
        try:
            self.conn.send(msg)
        except (BrokenPipeError, EOFError, OSError):
            self.stopping = True


# ---------------------------------------------------------------------------- process entry


def load_engine(settings: dict):
    from adasd_core.device import device_identity
    from adasd_core.engine import SpecConfig, SpeculativeEngine
    from adasd_core.kv_cache import plan_slots
    from adasd_core.models import load_pair

    pair = load_pair(
        target=settings["target"], draft=settings["draft"], device=settings["device"], dtype=settings["dtype"],
        device_map=settings["device_map"], trust_remote_code=settings["trust_remote_code"],
        max_model_len=settings["max_model_len"],
    )
    slots, per_slot = plan_slots(pair, settings["max_running"], settings.get("gpu_memory_fraction", 0.9))
    if slots < settings["max_running"]:
        log.warning("max_running=%d does not fit in memory: %d KV slots (%.1f MiB each)", settings["max_running"],
                    slots, per_slot / 2**20)
    from adasd_core.costs import StepCosts
    from adasd_core.warm import Schedule, load_full, pair_identity, save_state

    spec = SpecConfig(method=settings["method"], k=settings["k"], verification=settings["verification"])
    engine = SpeculativeEngine(pair, default_spec=spec, max_running=slots, batch_aware=settings.get("batch_aware", True))
    engine.kv_bytes_per_slot = per_slot
    engine.schedule = Schedule(first=settings.get("warm_epoch_rounds", 32), freeze=settings.get("warm_freeze_rounds", 4096))
    # what the statistics and the plan depend on besides the models: the algorithm's settings and the
    # device, its model (GPU and capability, or CPU) and number format: a state file carried to other hardware is not used there
    engine.state_identity = pair_identity(pair, {"window": spec.window, "dtype": str(pair.dtype),
                                                 "device": pair.device.type, "hardware": device_identity(pair.device)})
    engine.static_fingerprint = static_fingerprint(engine.state_identity, settings)
    engine.state_path = None
    path = warm_state_path(settings)
    if path is not None:
        engine.state_path = f"{path}/warm_stats_{engine.state_identity}.json" if os.path.isdir(path) or not path.endswith(
            ".json") else path
        state = load_full(engine.state_path, engine.state_identity)
        engine.shared.update(state.families)
        engine.restore_published(state.published)
        if state.plan is not None:
            try:  # reproducible requests plan as they did before the restart, not from this start's timings
                engine.plan_costs = StepCosts.from_json(state.plan)
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("ignoring the saved draft plan in %s: %s", engine.state_path, exc)
        if engine.shared:
            log.info("warm start: loaded the statistics of %d method families (%d published) from %s",
                     len(engine.shared), len(engine.published), engine.state_path)
        if state.plan is None:  # the first start on this machine: keep its plan for the next ones
            try:
                save_state(engine.state_path, engine.state_identity, engine.shared, engine.published,
                           engine.plan_costs.to_json())
            except OSError as exc:
                log.warning("could not save the warm-start state to %s: %s", engine.state_path, exc)
    return engine


def static_fingerprint(identity: str, settings: dict) -> str:
    """What every response's system_fingerprint covers besides the plan and the snapshot: the pair
    and its identity settings, the defaults a request may leave out, the code's version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        code = version("adasd")
    except PackageNotFoundError:
        code = "unknown"
    keys = ("method", "k", "verification", "batch_aware")
    return json.dumps({"identity": identity, "code": code, **{k: settings.get(k) for k in keys}}, sort_keys=True)


def warm_summary(engine) -> dict:
    """{family: summary} of the live warm-start statistics, with the rounds of the published snapshot."""
    published = getattr(engine, "published", {})
    out = {}
    for k, v in getattr(engine, "shared", {}).items():
        out[k] = v.summary()
        out[k]["published_rounds"] = published[k].rounds if k in published else 0
    return out


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
        engine = load_engine(settings)
    except BaseException as exc:
        from adasd_core.errors import ModelLoadError

        if isinstance(exc, ModelLoadError):  # its message says what, where and what to do
            log.debug("could not load the models", exc_info=True)
            message = exc.message
        else:
            log.exception("could not load the models")
            message = f"could not load the models: {type(exc).__name__}: {exc}"
        try:
            conn.send(("fatal", message))
        except OSError:
            pass
        return
    from adasd_core.kv_cache import kv_bytes_per_slot

    pair = engine.pair
    info = {
        "pid": os.getpid(),
        "context_length": pair.context_length,
        "vocab_size": pair.vocab_size,
        "device": str(pair.device),
        "dtype": str(pair.dtype).removeprefix("torch."),
        "target_step_s": engine.target_step_s,
        "slots": engine.slots,
        "slot_tokens": engine.target_pool.capacity,
        "kv_bytes_per_token": {"target": kv_bytes_per_slot(pair.target, 1),
                               "draft": kv_bytes_per_slot(pair.draft, 1) if pair.draft is not None else 0},
        "kv_mib_per_slot": round(engine.kv_bytes_per_slot / 2**20, 2),
        "batched": bool(engine.target_pool.batched),
        "step_costs": engine.costs.summary(),
        "load_s": round(time.perf_counter() - t0, 3),
        "warm_state": warm_summary(engine),
        "epoch": engine.epoch,
        "fingerprints": engine.fingerprints(),
    }
    log.info("loaded target=%s draft=%s on %s in %.1fs; %d KV slots of %s tokens (%.1f MiB each), %s engine",
             settings["target"], settings["draft"], info["device"], info["load_s"], info["slots"], info["context_length"],
             info["kv_mib_per_slot"], "batched" if info["batched"] else "unbatched (no lean path for this model)")
    try:
        conn.send(("ready", info))
    except OSError:
        return
    delay = float(os.environ.get(ROUND_DELAY_ENV) or 0.0)
    if delay:
        log.warning("%s=%s: every round is slowed down on purpose", ROUND_DELAY_ENV, delay)
    Worker(engine, conn, round_delay_s=delay, state_path=engine.state_path, state_identity=engine.state_identity).run()
    conn.close()
    log.info("stopped")
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # nothing left to clean up; skips a slow interpreter teardown (torch, tokenizers)
