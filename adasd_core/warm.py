"""Warm start (issue 12): what earlier requests on the same pair learned is the next request's prior.

The engine keeps one `SharedStats` per method family (method, relaxed check, greedy or sampled:
the distances and entropies are computed on the request's processed distributions, so greedy and
sampled requests learn apart). It holds T_G's rejected-entropy sums and a relaxed check (T_V's
sums or the two KDE samples); every finished round of every request updates it with that round's
observations, labelled as the request's own statistics are (the standard check's outcome). A new
request starts from a copy and then learns from its own rounds; `warm_start=False` starts empty
(the per-request semantics of shared/ADASD.md). The state is small (at most 2 x 256 distances per
family) and serialises to JSON with the pair's identity, so a restarted worker resumes from it.

Reproducibility (issue 15): in the server, requests do not read the live state, which every round
of every request moves, but a published `Snapshot` of it. `Schedule` says when a family's live state
is published: first after `first` rounds, then each time its rounds have doubled, and never again once
a published snapshot has `freeze` rounds (converged: the KDE windows are long full and T_G's mean is
well known). A snapshot is immutable and named by a digest of its content; the digest, the pair's
identity and the draft plan (`StepCosts` frozen at the first start) make the `system_fingerprint`.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from adasd_core.drafting import EntropyStop, RejectedEntropy
from adasd_core.verification import Observation, RelaxedCheck, make_relaxed_check

log = logging.getLogger("adasd.warm")
FORMAT = 2  # 2: published snapshots and the draft plan saved with the live state


@dataclass
class SharedStats:
    kind: str  # the relaxed check: bayes | threshold | none
    rejected: RejectedEntropy = field(default_factory=RejectedEntropy)  # T_G
    rounds: int = 0
    accepted: int = 0  # candidates accepted (standard or relaxed) / examined: the family's acceptance
    examined: int = 0
    relaxed: RelaxedCheck = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.relaxed is None:
            self.relaxed = make_relaxed_check(self.kind)

    @property
    def entropy_threshold(self) -> float | None:
        return self.rejected.threshold

    @property
    def acceptance(self) -> float | None:
        """P(a candidate is accepted | the ones before it were), over every round learned from."""
        return self.accepted / self.examined if self.examined else None

    def seed(self, policy, relaxed: RelaxedCheck) -> RelaxedCheck:
        """Start a request from this state: T_G's sums into its policy; returns its relaxed check."""
        if isinstance(policy, EntropyStop):
            policy.rejected = copy.copy(self.rejected)
        return copy.deepcopy(self.relaxed) if relaxed.name == self.relaxed.name else relaxed

    def observe(self, obs: Observation) -> None:
        """One finished round of any request of the family."""
        self.rounds += 1
        self.accepted += obs.accepted
        self.examined += len(obs.standard)
        self.rejected.observe(obs)
        self.relaxed.observe(obs)

    def summary(self) -> dict:
        return {"rounds": self.rounds, "entropy_threshold": self.entropy_threshold, **self.relaxed.state()}

    def to_json(self) -> dict:
        return {"kind": self.kind, "sum_rejected": self.rejected.total, "n_rejected": self.rejected.count,
                "rounds": self.rounds, "accepted": self.accepted, "examined": self.examined,
                "relaxed": self.relaxed.to_json()}

    @classmethod
    def from_json(cls, data: dict) -> SharedStats:
        s = cls(kind=data["kind"], rejected=RejectedEntropy(float(data["sum_rejected"]), int(data["n_rejected"])),
                rounds=int(data.get("rounds", 0)), accepted=int(data.get("accepted", 0)),
                examined=int(data.get("examined", 0)))
        s.relaxed.load_json(data["relaxed"])
        return s


def digest(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Snapshot:
    """A published, immutable copy of one family's statistics: what new requests start from."""

    def __init__(self, stats: SharedStats):
        self.stats = SharedStats.from_json(stats.to_json())  # a copy that nothing else holds
        self.digest = digest(self.stats.to_json())

    @staticmethod
    @functools.cache
    def empty(kind: str) -> Snapshot:
        """What a family starts from before its first publication, and a cold request always."""
        return Snapshot(SharedStats(kind=kind))

    @property
    def rounds(self) -> int:
        return self.stats.rounds

    @property
    def acceptance(self) -> float | None:
        return self.stats.acceptance

    def seed(self, policy, relaxed: RelaxedCheck) -> RelaxedCheck:
        return self.stats.seed(policy, relaxed)


@dataclass(frozen=True)
class Schedule:
    """When a family's live statistics are published: at `first` rounds, then whenever they have
    doubled since the last snapshot, until a snapshot holds `freeze` rounds (0: never freeze)."""

    first: int = 32
    freeze: int = 4096

    def frozen(self, published: Snapshot | None) -> bool:
        return published is not None and self.freeze > 0 and published.rounds >= self.freeze

    def due(self, live: SharedStats, published: Snapshot | None) -> bool:
        if self.frozen(published):
            return False
        last = published.rounds if published is not None else 0
        return live.rounds >= max(self.first, 2 * last)


def fingerprint(static: str, plan: str | None, snapshot: str | None) -> str:
    """The OpenAI `system_fingerprint` of a request: what it reads besides its own fields (the
    server's identity and defaults, the draft plan when its method drafts adaptively, the snapshot
    of its family when it starts warm or an empty one when cold)."""
    return "fp_" + digest([static, plan or "", snapshot or ""])[:12]


ADAPTIVE_METHODS = ("gen-only", "adasd", "hybrid")  # their draft length follows a plan (the batch-aware cap)
MAX_EPOCHS = 256  # published states kept for requests pinned to one (a family stops publishing once frozen)


class WarmState:
    """What the server's requests start from and learn into, in one place: the live statistics per
    family, the snapshots published from them (by epoch), the draft plan reproducible requests plan
    with (a StepCosts table, measured at the first start) and the fingerprints that name them;
    saved to and loaded from one file.

    Without a schedule (in process: benchmarks, the CLI, tests) a warm request starts from the live
    statistics themselves and no fingerprint is computed; with one (the server) it starts from the
    published snapshot of the epoch its fingerprint names.
    """

    def __init__(self, schedule: Schedule | None = None, static_fingerprint: str = "", path: str | None = None,
                 identity: str = "", plan=None):
        self.schedule = schedule
        self.static_fingerprint = static_fingerprint  # the server's identity and defaults
        self.path, self.identity = path, identity  # where it is saved (None: nowhere) and for which pair
        self.plan = plan  # StepCosts of the draft plan; None until the engine adopts its measured table
        self.shared: dict[str, SharedStats] = {}
        self.published: dict[str, Snapshot] = {}
        self.epoch = 0  # count of publications; epochs[e] is the published dict after the e-th
        self.epochs: dict[int, dict[str, Snapshot]] = {0: self.published}
        self._plan_digest: tuple = (None, "")

    @classmethod
    def open(cls, path: str | None, identity: str, schedule: Schedule | None = None,
             static_fingerprint: str = "") -> WarmState:
        """The state saved at `path` for this pair (`identity`), or a new one where there is none."""
        warm = cls(schedule, static_fingerprint, path, identity)
        if path is None:
            return warm
        saved = load_full(path, identity)
        warm.shared.update(saved.families)
        warm.restore(saved.published)
        if saved.plan is not None:
            from adasd_core.costs import StepCosts

            try:  # reproducible requests plan as they did before the restart, not from this start's timings
                warm.plan = StepCosts.from_json(saved.plan)
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("ignoring the saved draft plan in %s: %s", path, exc)
        if warm.shared:
            log.info("warm start: loaded the statistics of %d method families (%d published) from %s",
                     len(warm.shared), len(warm.published), path)
        return warm

    def adopt_plan(self, table) -> None:
        """The engine's measured table becomes the draft plan unless one was saved; a new plan is
        saved at once (the first start on this machine: its plan is kept for the next ones)."""
        if self.plan is not None:
            return
        self.plan = table
        if self.path is not None:
            try:
                self.save()
            except OSError as exc:
                log.warning("could not save the warm-start state to %s: %s", self.path, exc)

    # ------------------------------------------------------------------ requests

    def start(self, family: str | None, kind: str, warm: bool, epoch: int | None,
              with_plan: bool) -> tuple[SharedStats | Snapshot | None, str]:
        """(what a new request starts from, None when cold or for a method that learns nothing; its
        system_fingerprint, "" without a schedule). Every family a request has used learns from its
        rounds, warm or cold; `epoch` pins the published state (default the latest)."""
        if family is None:
            return None, self.fingerprint(None, with_plan) if self.schedule is not None else ""
        live = self.shared.setdefault(family, SharedStats(kind=kind))
        if self.schedule is None:
            return (live if warm else None), ""
        snapshot = (self.epochs.get(epoch, self.published).get(family) if warm else None) or Snapshot.empty(kind)
        return (snapshot if warm else None), self.fingerprint(snapshot, with_plan)

    def observe(self, family: str, obs: Observation) -> None:
        self.shared[family].observe(obs)

    # ------------------------------------------------------------------ publication

    def publish_due(self) -> list[str]:
        """Publish every family whose schedule says so (between engine steps: a running request keeps
        the copy it started from). Returns the families published."""
        if self.schedule is None:
            return []
        due = [k for k, live in self.shared.items() if self.schedule.due(live, self.published.get(k))]
        if due:
            self.published = {**self.published, **{k: Snapshot(self.shared[k]) for k in due}}
            self.epoch += 1
            self.epochs[self.epoch] = self.published
            self.epochs.pop(self.epoch - MAX_EPOCHS, None)
        return due

    def restore(self, published: dict[str, Snapshot]) -> None:
        """Start from saved snapshots (a restarted worker): they are epoch 0 of this process."""
        self.published = dict(published)
        self.epoch, self.epochs = 0, {0: self.published}

    # ------------------------------------------------------------------ fingerprints

    @property
    def plan_digest(self) -> str:
        if self._plan_digest[0] is not self.plan:  # computed once per plan
            self._plan_digest = (self.plan, digest(self.plan.to_json()) if self.plan is not None else "")
        return self._plan_digest[1]

    def fingerprint(self, snapshot: Snapshot | None, with_plan: bool) -> str:
        """The system_fingerprint of a request starting from `snapshot` (None: a method that learns
        nothing), covering the draft plan where its draft length follows the plan."""
        return fingerprint(self.static_fingerprint, self.plan_digest if with_plan else None,
                           snapshot.digest if snapshot is not None else None)

    def fingerprints(self, methods, verifications, with_plan, epoch: int | None = None) -> dict[str, str]:
        """{fingerprint_key: system_fingerprint} of every request kind at a published epoch;
        `with_plan(method)` says whether that method's fingerprint covers the plan."""
        published = self.epochs.get(epoch, self.published) if epoch is not None else self.published
        out = {"-": self.fingerprint(None, with_plan("ar"))}
        for family in all_families(methods, verifications):
            method, kind, _ = family.split("/")
            out[family] = self.fingerprint(published.get(family) or Snapshot.empty(kind), with_plan(method))
            out[family + "#cold"] = self.fingerprint(Snapshot.empty(kind), with_plan(method))
        return out

    # ------------------------------------------------------------------ persistence and gauges

    def save(self) -> None:
        """Write the live statistics, the snapshots and the plan (atomically; nowhere without a path)."""
        if self.path is not None:
            save_state(self.path, self.identity, self.shared, self.published,
                       self.plan.to_json() if self.plan is not None else None)

    def summary(self) -> dict:
        """{family: summary} of the live statistics, with the rounds of the published snapshot."""
        return {k: {**v.summary(), "published_rounds": self.published[k].rounds if k in self.published else 0}
                for k, v in self.shared.items()}


def fingerprint_key(method: str, verification: str, greedy: bool, warm_start: bool) -> str:
    """Which entry of the worker's fingerprint table a request reads (the front end stamps its
    response with it before the worker has seen the request)."""
    family = family_key(method, verification, greedy)
    if family is None:
        return "-"
    return family if warm_start else family + "#cold"


def all_families(methods, verifications) -> list[str]:
    keys = {family_key(m, v, g) for m in methods for v in verifications for g in (True, False)}
    return sorted(k for k in keys if k is not None)


def family_key(method: str, verification: str, greedy: bool) -> str | None:
    """The statistics family of a request; None for methods that learn nothing (ar, vanilla)."""
    if method in ("ar", "vanilla"):
        return None
    relaxed = verification if method in ("verify-only", "adasd", "hybrid") else "none"
    return f"{method}/{relaxed}/{'greedy' if greedy else 'sampled'}"


# ---------------------------------------------------------------------------- persistence


def pair_identity(pair, extra: dict | None = None) -> str:
    """A hash of what the statistics depend on: both models' names and configs, the vocabulary size
    and the algorithm's settings (`extra`)."""
    parts = {"target": pair.target_name, "draft": pair.draft_name, "vocab": pair.vocab_size, "format": FORMAT,
             **(extra or {})}
    for name in ("target", "draft"):
        model = getattr(pair, name)
        cfg = getattr(model, "config", None)
        parts[f"{name}_config"] = cfg.to_json_string(use_diff=False) if hasattr(cfg, "to_json_string") else repr(cfg)
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def save_state(path: str | os.PathLike, identity: str, shared: dict[str, SharedStats],
               published: dict[str, Snapshot] | None = None, plan: dict | None = None) -> None:
    """Write atomically (a crash mid-write leaves the previous file): the live statistics, the
    published snapshots and the draft plan (StepCosts.to_json)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"format": FORMAT, "identity": identity,
                       "families": {k: v.to_json() for k, v in shared.items()},
                       "published": {k: v.stats.to_json() for k, v in (published or {}).items()},
                       "plan": plan})
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(body)
    os.replace(tmp, path)


@dataclass
class SavedState:
    families: dict[str, SharedStats] = field(default_factory=dict)  # live
    published: dict[str, Snapshot] = field(default_factory=dict)
    plan: dict | None = None  # StepCosts.to_json() of the draft plan


def load_full(path: str | os.PathLike, identity: str) -> SavedState:
    """Everything saved, or an empty state when the file is missing, unreadable or for another pair."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return SavedState()
    except (OSError, ValueError) as exc:
        log.warning("ignoring the warm-start state %s: %s", path, exc)
        return SavedState()
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("identity") != identity:
        log.warning("ignoring the warm-start state %s: saved for another model pair or format", path)
        return SavedState()
    try:
        return SavedState({k: SharedStats.from_json(v) for k, v in data["families"].items()},
                          {k: Snapshot(SharedStats.from_json(v)) for k, v in (data.get("published") or {}).items()},
                          data.get("plan"))
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("ignoring the warm-start state %s: %s", path, exc)
        return SavedState()


def load_state(path: str | os.PathLike, identity: str) -> dict[str, SharedStats]:
    """The saved live families, or {} when the file is missing, unreadable or for another pair."""
    return load_full(path, identity).families
