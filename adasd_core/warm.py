"""Warm start (issue 12): what earlier requests on the same pair learned is the next request's prior.

The engine keeps one `SharedStats` per method family (method, relaxed check, greedy or sampled:
the distances and entropies are computed on the request's processed distributions, so greedy and
sampled requests learn apart). It holds T_G's rejected-entropy sums and a relaxed check (T_V's
sums or the two KDE samples); every finished round of every request updates it with that round's
observations, labelled as the request's own statistics are (the standard check's outcome). A new
request starts from a copy and then learns from its own rounds; `warm_start=False` starts empty
(the per-request semantics of shared/ADASD.md). The state is small (at most 2 x 256 distances per
family) and serialises to JSON with the pair's identity, so a restarted worker resumes from it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from adasd_core.drafting import EntropyStop
from adasd_core.verification import RelaxedCheck, make_relaxed_check

log = logging.getLogger("adasd.warm")
FORMAT = 1


@dataclass
class SharedStats:
    kind: str  # the relaxed check: bayes | threshold | none
    sum_rejected: float = 0.0  # T_G: entropies of every rejected candidate
    n_rejected: int = 0
    rounds: int = 0
    relaxed: RelaxedCheck = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.relaxed is None:
            self.relaxed = make_relaxed_check(self.kind)

    @property
    def entropy_threshold(self) -> float | None:
        return self.sum_rejected / self.n_rejected if self.n_rejected else None

    def seed(self, policy, relaxed: RelaxedCheck) -> RelaxedCheck:
        """Start a request from this state: T_G's sums into its policy; returns its relaxed check."""
        if isinstance(policy, EntropyStop):
            policy.sum_rejected, policy.n_rejected = self.sum_rejected, self.n_rejected
        return copy.deepcopy(self.relaxed) if relaxed.name == self.relaxed.name else relaxed

    def observe(self, distances: list[float] | None, standard: list[bool], rejected_entropies: list[float]) -> None:
        """One finished round's observations (the candidates it examined)."""
        self.rounds += 1
        self.sum_rejected += sum(rejected_entropies)
        self.n_rejected += len(rejected_entropies)
        if distances is not None:
            for d, std in zip(distances, standard):
                self.relaxed.observe(d, std)

    def summary(self) -> dict:
        return {"rounds": self.rounds, "entropy_threshold": self.entropy_threshold, **self.relaxed.state()}

    def to_json(self) -> dict:
        return {"kind": self.kind, "sum_rejected": self.sum_rejected, "n_rejected": self.n_rejected,
                "rounds": self.rounds, "relaxed": self.relaxed.to_json()}

    @classmethod
    def from_json(cls, data: dict) -> "SharedStats":
        s = cls(kind=data["kind"], sum_rejected=float(data["sum_rejected"]), n_rejected=int(data["n_rejected"]),
                rounds=int(data.get("rounds", 0)))
        s.relaxed.load_json(data["relaxed"])
        return s


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


def save_state(path: str | os.PathLike, identity: str, shared: dict[str, SharedStats]) -> None:
    """Write atomically (a crash mid-write leaves the previous file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"format": FORMAT, "identity": identity,
                       "families": {k: v.to_json() for k, v in shared.items()}})
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(body)
    os.replace(tmp, path)


def load_state(path: str | os.PathLike, identity: str) -> dict[str, SharedStats]:
    """The saved families, or {} when the file is missing, unreadable or for another pair."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring the warm-start state %s: %s", path, exc)
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("identity") != identity:
        log.warning("ignoring the warm-start state %s: saved for another model pair or format", path)
        return {}
    try:
        return {k: SharedStats.from_json(v) for k, v in data["families"].items()}
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("ignoring the warm-start state %s: %s", path, exc)
        return {}
