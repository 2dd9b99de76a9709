"""Verification: the standard (lossless) check, the relaxed Jensen-Shannon check, and the
correction / bonus tokens.

Words used here (shared/ADASD.md):
- candidate: a token the draft proposed; target_probs p_i and draft_probs q_i are the two
  models' processed next-token distributions at its position.
- standard check: greedy accepts iff x_i == argmax p_i; sampling accepts with probability
  min(1, p_i(x_i) / q_i(x_i)). Lossless.
- relaxed check: a candidate that fails the standard check is still accepted when the JS distance
  d_i says the two distributions agree (threshold T_V, or a Bayesian posterior P(A|d)).
- correction token: emitted at the first candidate that fails both checks (argmax p_i, or a sample
  from norm(max(0, p_i - q_i))). bonus token: emitted from p_{k+1} when every candidate passed.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import torch

from adasd_core.sampling import categorical

LN2 = math.log(2.0)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """[N, V] -> [N] Shannon entropy in nats."""
    probs = probs.float()
    return -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)


def js_distance(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """[N, V], [N, V] -> [N] Jensen-Shannon distance sqrt(JSD), log base 2, in [0, 1]."""
    p, q = target_probs.float(), draft_probs.float()
    m = 0.5 * (p + q)
    jsd = entropy(m) - 0.5 * (entropy(p) + entropy(q))
    return (jsd / LN2).clamp(0.0, 1.0).sqrt()


def standard_check(
    candidates: torch.Tensor,
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    greedy: bool,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """[k], [k, V], [k, V] -> [k] bool: the lossless acceptance test per candidate."""
    assert candidates.dim() == 1 and target_probs.shape == draft_probs.shape
    if greedy:
        return candidates == target_probs.argmax(-1)
    idx = candidates[:, None]
    p_x = target_probs.gather(-1, idx).squeeze(-1)
    q_x = draft_probs.gather(-1, idx).squeeze(-1)
    u = torch.rand(candidates.shape, generator=generator, device=candidates.device)
    return u * q_x < p_x  # u < p/q without dividing by a tiny q


def correction_token(
    target_probs: torch.Tensor, draft_probs: torch.Tensor, greedy: bool, generator: torch.Generator | None
) -> int:
    """[V], [V] -> the target's token at a rejected position."""
    if greedy:
        return int(target_probs.argmax())
    residual = (target_probs - draft_probs).clamp_min(0.0)
    total = residual.sum()
    # p == q leaves no residual mass; then p itself is the right distribution
    dist = residual / total if total > 1e-12 else target_probs
    return int(categorical(dist, generator))


def bonus_token(target_probs: torch.Tensor, greedy: bool, generator: torch.Generator | None) -> int:
    if greedy:
        return int(target_probs.argmax())
    return int(categorical(target_probs, generator))


@dataclass
class Verdict:
    """One sequence's round after verification."""

    n_accepted: int  # candidates kept (standard or relaxed)
    token: int  # the correction token (n_accepted < k) or the bonus token
    standard: list[bool]  # standard-check outcome of each examined candidate
    distances: list[float] | None  # JS distance of each examined candidate (relaxed check on)
    n_relaxed: int
    # P(A|d) of each examined candidate where the relaxed check computed one (it failed the standard
    # check; Bayesian check), else None; None when the relaxed check is off
    posteriors: list[float | None] | None = None

    @property
    def examined(self) -> int:
        return len(self.standard)

    def observation(self, drafted: int, entropies: list[float]) -> "Observation":
        """What this round teaches the learners (`entropies`: the draft's, one per candidate)."""
        n = self.examined
        return Observation(drafted, self.n_accepted, tuple(self.standard), tuple(entropies[:n]),
                           None if self.distances is None else tuple(self.distances))


@dataclass(frozen=True)
class Observation:
    """One sequence's round as every learner reads it (RelaxedCheck, DraftPolicy, the warm-start
    state, the planner's acceptance prior): the candidates the target examined, up to and including
    the first that failed both checks, labelled by the standard check so that relaxed acceptances
    cannot feed on themselves."""

    drafted: int  # candidates proposed (k)
    accepted: int  # of them kept, by the standard or the relaxed check
    standard: tuple[bool, ...]  # the standard check's outcome per examined candidate
    entropies: tuple[float, ...]  # H(q) per examined candidate
    distances: tuple[float, ...] | None  # d(p, q) per examined candidate, where the relaxed check is on

    @property
    def rejected_entropies(self) -> list[float]:
        return [h for h, ok in zip(self.entropies, self.standard) if not ok]

    @property
    def all_accepted(self) -> bool:
        return self.accepted == self.drafted

    @property
    def acceptance(self) -> float:
        """Accepted over examined candidates: P(a candidate is kept | the ones before it were)."""
        return self.accepted / len(self.standard) if self.standard else 1.0


def accept_candidates(
    candidates: list[int],
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None,
    greedy: bool,
    generator: torch.Generator | None,
    relaxed: "RelaxedCheck",
) -> Verdict:
    """Accept candidates in order; the first that fails both checks ends the round.

    candidates [k], target_probs [k+1, V] (the last row is the bonus position), draft_probs [k, V].
    Random draws, in this order from the request's generator: the standard check's k uniforms,
    the relaxed check's k uniforms (sampled requests with a relaxed check), the last token.
    """
    k = len(candidates)
    assert target_probs.shape[0] == k + 1 and (k == 0 or draft_probs.shape[0] == k)
    standard, distances, posteriors, n_accepted, n_relaxed = [], None, None, 0, 0
    if k:
        device = target_probs.device
        cand = torch.tensor(candidates, device=device)
        std = standard_check(cand, target_probs[:k], draft_probs, greedy, generator).tolist()
        use_relaxed = relaxed.name != "none"
        d = js_distance(target_probs[:k], draft_probs).tolist() if use_relaxed else None
        draws = torch.rand(k, generator=generator, device=device).tolist() if (use_relaxed and not greedy) else None
        posteriors = [] if use_relaxed else None
        for i in range(k):
            posterior = None
            if std[i]:
                ok = True
            elif use_relaxed:  # the posterior is only needed where the standard check failed
                p_accept, posterior = relaxed.judge(d[i])
                ok = p_accept > 0.5 if greedy else draws[i] < p_accept
                n_relaxed += ok
            else:
                ok = False
            standard.append(bool(std[i]))
            if use_relaxed:
                posteriors.append(posterior)
            if not ok:
                break
            n_accepted += 1
        distances = d[: len(standard)] if use_relaxed else None
    if n_accepted < k:
        token = correction_token(target_probs[n_accepted], draft_probs[n_accepted], greedy, generator)
    else:
        token = bonus_token(target_probs[k], greedy, generator)
    return Verdict(n_accepted, token, standard, distances, n_relaxed, posteriors)


# --------------------------------------------------------------------------- relaxed checks


class RelaxedCheck:
    """Online statistics over JS distances, labelled by the standard check's outcome."""

    name = "none"

    @property
    def can_relax(self) -> bool:
        """Whether this check may accept a candidate the standard check failed (else it is lossless)."""
        return self.name != "none"

    def accept_probability(self, d: list[float]) -> list[float]:
        """Probability of accepting each failed candidate; 0 until both groups have data."""
        return [0.0] * len(d)

    def judge(self, d: float) -> tuple[float, float | None]:
        """(probability of accepting a failed candidate at distance d, the posterior P(A|d) behind it
        or None where the check has none)."""
        return self.accept_probability([d])[0], None

    def observe(self, obs: Observation) -> None:
        """Learn from a round: each examined candidate's distance, in its standard-check group."""
        if obs.distances is not None:
            for d, ok in zip(obs.distances, obs.standard):
                self.add(d, ok)

    def add(self, d: float, accepted: bool) -> None:
        pass

    def state(self) -> dict:
        return {}

    def to_json(self) -> dict:
        return {}

    def load_json(self, data: dict) -> None:
        pass


@dataclass
class ThresholdCheck(RelaxedCheck):
    """v1: accept iff d < T_V, T_V = (mean d of accepted + mean d of rejected) / 2."""

    name = "threshold"
    position: float = 0.5  # T_V's place between the two means (0: the accepted mean, 0.5: the paper's midpoint)
    sum_accepted: float = 0.0
    n_accepted: int = 0
    sum_rejected: float = 0.0
    n_rejected: int = 0

    @property
    def threshold(self) -> float | None:
        if not (self.n_accepted and self.n_rejected):
            return None
        mean_a, mean_r = self.sum_accepted / self.n_accepted, self.sum_rejected / self.n_rejected
        return mean_a + self.position * (mean_r - mean_a)

    def accept_probability(self, d: list[float]) -> list[float]:
        t = self.threshold
        return [0.0 if t is None else float(x < t) for x in d]

    def add(self, d: float, accepted: bool) -> None:
        if accepted:
            self.sum_accepted += d
            self.n_accepted += 1
        else:
            self.sum_rejected += d
            self.n_rejected += 1

    def state(self) -> dict:
        return {"js_threshold": self.threshold}

    def to_json(self) -> dict:
        return {"sum_accepted": self.sum_accepted, "n_accepted": self.n_accepted, "sum_rejected": self.sum_rejected,
                "n_rejected": self.n_rejected}

    def load_json(self, data: dict) -> None:
        self.sum_accepted, self.n_accepted = float(data["sum_accepted"]), int(data["n_accepted"])
        self.sum_rejected, self.n_rejected = float(data["sum_rejected"]), int(data["n_rejected"])


def _bandwidth(samples: deque) -> float:
    """Scott's rule with a floor."""
    n = len(samples)
    mean = sum(samples) / n
    std = math.sqrt(sum((s - mean) ** 2 for s in samples) / max(1, n - 1))
    return max(1.06 * std * n ** -0.2, 0.02)


def _kde(samples: deque, x: float, h: float | None = None) -> float:
    """Gaussian KDE density at x with bandwidth h (Scott's rule by default)."""
    n = len(samples)
    h = h or _bandwidth(samples)
    norm = 1.0 / (n * h * math.sqrt(2 * math.pi))
    return norm * sum(math.exp(-0.5 * ((x - s) / h) ** 2) for s in samples)


@dataclass
class BayesCheck(RelaxedCheck):
    """v2: P(A|d) = p(d|A)P(A) / (p(d|A)P(A) + p(d|R)P(R)) with Gaussian KDEs.

    The KDE samples are bounded (most recent `max_samples` per group); the priors count every
    observation. Distances of exactly 0 or 1 count for the priors but not the KDEs.
    """

    name = "bayes"
    max_samples: int = 256
    min_samples: int = 2
    # a failed candidate may be relaxed only where P(A|d) >= this (ours; 0 is the paper's rule; 0.7 from the
    # tiny pair's measured frontier, docs/methods.md "Calibrating the relaxed check"; a draft folder may set its
    # pair's own: adasd_draft.min_posterior, 1 for the default pair)
    min_posterior: float = 0.7
    accepted: deque = field(default_factory=deque)
    rejected: deque = field(default_factory=deque)
    n_accepted: int = 0
    n_rejected: int = 0
    _bandwidths: tuple[float, float] | None = field(default=None, repr=False)  # cached until the next observe

    def ready(self) -> bool:
        return len(self.accepted) >= self.min_samples and len(self.rejected) >= self.min_samples

    def posterior(self, d: float) -> float | None:
        if not self.ready():
            return None
        if self._bandwidths is None:
            self._bandwidths = (_bandwidth(self.accepted), _bandwidth(self.rejected))
        prior_a = self.n_accepted / (self.n_accepted + self.n_rejected)
        like_a = _kde(self.accepted, d, self._bandwidths[0]) * prior_a
        like_r = _kde(self.rejected, d, self._bandwidths[1]) * (1.0 - prior_a)
        total = like_a + like_r
        return like_a / total if total > 0 else 0.0

    def accept_probability(self, d: list[float]) -> list[float]:
        return [self.judge(x)[0] for x in d]

    @property
    def can_relax(self) -> bool:
        return self.min_posterior < 1.0  # a gate of 1 or more: never (lossless)

    def judge(self, d: float) -> tuple[float, float | None]:
        p = self.posterior(d)
        return (p if p is not None and p >= self.min_posterior and self.can_relax else 0.0), p

    def add(self, d: float, accepted: bool) -> None:
        group = self.accepted if accepted else self.rejected
        if accepted:
            self.n_accepted += 1
        else:
            self.n_rejected += 1
        if 0.0 < d < 1.0:
            self._bandwidths = None
            group.append(d)
            if len(group) > self.max_samples:
                group.popleft()

    def state(self) -> dict:
        return {"kde_accepted": len(self.accepted), "kde_rejected": len(self.rejected)}

    def to_json(self) -> dict:
        return {"accepted": list(self.accepted), "rejected": list(self.rejected), "n_accepted": self.n_accepted,
                "n_rejected": self.n_rejected}

    def load_json(self, data: dict) -> None:
        self.accepted = deque(float(x) for x in data["accepted"][-self.max_samples:])
        self.rejected = deque(float(x) for x in data["rejected"][-self.max_samples:])
        self.n_accepted, self.n_rejected = int(data["n_accepted"]), int(data["n_rejected"])
        self._bandwidths = None


def make_relaxed_check(kind: str) -> RelaxedCheck:
    if kind == "bayes":
        return BayesCheck()
    if kind == "threshold":
        return ThresholdCheck()
    if kind == "none":
        return RelaxedCheck()
    raise ValueError(f"unknown verification {kind!r}: use bayes, threshold or none")
