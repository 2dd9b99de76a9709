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

from adasd_core import paged_attention
from adasd_core.device import int_tensors
from adasd_core.sampling import categorical, exponentials, inverse_cdf, race, top_token

LN2 = math.log(2.0)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """[N, V] -> [N] Shannon entropy in nats."""
    # clamped on both sides: a model's tail probabilities are often subnormal floats, whose products run
    # several times slower on x86; the clamp adds at most V x 7e-29 nats
    probs = probs.float()
    if probs.device.type == "cpu" and probs.dim() == 2 and paged_attention.kernel_available():
        return paged_attention.row_entropy(probs.contiguous())  # one pass per row: no [N, V] temporaries
    probs = probs.clamp_min(1e-30)
    return -(probs * torch.log(probs)).sum(-1)


def js_distance(target_probs: torch.Tensor, draft_probs: torch.Tensor, rows: torch.Tensor | None = None,
                draft_rows: torch.Tensor | None = None, target_entropy: torch.Tensor | None = None,
                draft_entropy: torch.Tensor | None = None) -> torch.Tensor:
    """[N, V], [N, V] -> [N] Jensen-Shannon distance sqrt(JSD), log base 2, in [0, 1]; with `rows` and
    `draft_rows` [N], between target_probs[rows] and draft_probs[draft_rows] (on the CPU without gathering
    them: one pass over each pair, reusing the rows' entropy() [N] where given)."""
    if rows is not None:
        if paged_attention.takes_rows(target_probs, draft_probs):
            return paged_attention.js_rows(target_probs, rows, draft_probs, draft_rows, target_entropy, draft_entropy)
        target_probs, draft_probs = target_probs[rows], draft_probs[draft_rows]
    p, q = target_probs.float(), draft_probs.float()
    m = 0.5 * (p + q)
    jsd = entropy(m) - 0.5 * (entropy(p) + entropy(q))
    # the root taken in double: torch's float32 sqrt is a last bit off the rounded root on some CPUs (seen on
    # an AMD EPYC); the double root rounded to float is the rounded root everywhere, as the row kernel's is
    return (jsd / LN2).clamp(0.0, 1.0).double().sqrt().float()


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
        return candidates == top_token(target_probs)
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
        return int(top_token(target_probs))
    residual = (target_probs - draft_probs).clamp_min(0.0)
    total = residual.sum()
    # p == q leaves no residual mass; then p itself is the right distribution
    dist = residual / total if total > 1e-12 else target_probs
    return int(categorical(dist, generator))


def bonus_token(target_probs: torch.Tensor, greedy: bool, generator: torch.Generator | None) -> int:
    if greedy:
        return int(top_token(target_probs))
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
    # -log p(x) - H(p) of each emitted token (the accepted candidates, then the last token) under the
    # processed target distribution at its position (accept_batch computes it with the rest)
    excess: list[float] | None = None

    @property
    def examined(self) -> int:
        return len(self.standard)

    def observation(self, drafted: int, entropies: list[float]) -> Observation:
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

    def without(self, positions: list[int]) -> Observation:
        """The round less the candidates at `positions` (a grammar's forced ones: no draft step chose them and
        the check cannot fail them, so they teach nothing about the draft)."""
        if not positions:
            return self
        skip = set(positions)
        keep = [i for i in range(len(self.standard)) if i not in skip]
        return Observation(self.drafted - len(skip), self.accepted - sum(1 for p in skip if p < self.accepted),
                           tuple(self.standard[i] for i in keep), tuple(self.entropies[i] for i in keep),
                           None if self.distances is None else tuple(self.distances[i] for i in keep))

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
    relaxed: RelaxedCheck,
    stable: bool = False,
) -> Verdict:
    """One sequence's round (accept_batch of one): candidates [k], target_probs [k+1, V] (the last
    row is the bonus position), draft_probs [k, V]."""
    return accept_batch([candidates], target_probs, draft_probs, [greedy], [generator], [relaxed], [stable])[0]


def accept_batch(
    candidates: list[list[int]],
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None,
    greedy: list[bool],
    generators: list[torch.Generator | None],
    relaxed: list[RelaxedCheck],
    stable: list[bool] | None = None,
    draft_entropy: list[float] | None = None,
) -> list[Verdict]:
    """Every sequence of a round at once: accept candidates in order; the first that fails both
    checks ends that sequence's round, with the correction token there (else the bonus token).

    candidates[b]: k_b ids; target_probs [sum (k_b + 1), V]: per sequence its candidates' rows, then
    its bonus row; draft_probs [sum k_b, V]; draft_entropy [sum k_b]: entropy() of each draft row, where
    the proposer has it (the distances then need not sum it again). The standard check, the distances,
    the last token and each emitted token's excess surprisal are computed for the whole batch on the
    device, and read in one transfer (a greedy round on the CPU reads first and leaves the check to the host:
    _greedy_reads). Only a check that can relax goes back to the host (P(A|d) from its
    KDEs); for it the last token is drawn at every row, with one uniform, and the host picks the row.
    Random draws, per sampled sequence from its own generator, in one call: the standard check's
    k uniforms, the relaxed check's k (where it is on), one for the last token; then, where `stable`
    (a seeded request: its text must repeat in any batch), V exponentials, and its last token is drawn
    by the exponential race (sampling.race) rather than by the inverse CDF.
    """
    B = len(candidates)
    ks = [len(c) for c in candidates]
    K, R = sum(ks), sum(ks) + B
    assert target_probs.shape[0] == R and (K == 0 or draft_probs.shape[0] == K), (target_probs.shape, ks)
    dev = target_probs.device
    if K == 0:
        return _plain_round(target_probs, greedy, generators, relaxed, stable or [False] * B)
    uses_d = [r.name != "none" for r in relaxed]
    free = [r.can_relax for r in relaxed]  # the host decides how many it keeps
    cstart = [sum(ks[:b]) for b in range(B)]  # each sequence's first candidate (draft row)
    offsets = [c + b for b, c in enumerate(cstart)]  # and its first target row
    d_rows = [c for b in range(B) if uses_d[b] for c in range(cstart[b], cstart[b] + ks[b])]
    if dev.type == "cpu" and all(greedy):
        flat = _greedy_reads(candidates, target_probs, draft_probs, ks, offsets, uses_d, free, d_rows, draft_entropy)
    else:
        flat = _device_reads(candidates, target_probs, draft_probs, greedy, generators, stable, ks, uses_d, free,
                             cstart, offsets, d_rows, draft_entropy)
    return _verdicts(flat, ks, greedy, relaxed, uses_d, free)


def _distances(target_probs: torch.Tensor, draft_probs: torch.Tensor, target_rows: torch.Tensor, d_rows: list[int],
               d_idx: torch.Tensor, entropy_rows: torch.Tensor, draft_entropy: list[float] | None) -> torch.Tensor:
    """[len(d_rows)] float64: the JS distance of each draft row d_rows[i] to its target row target_rows[i]."""
    h_draft = None if draft_entropy is None else torch.tensor([draft_entropy[i] for i in d_rows])
    return js_distance(target_probs, draft_probs, target_rows, d_idx, entropy_rows[target_rows], h_draft).double()


def _greedy_reads(candidates: list[list[int]], target_probs: torch.Tensor, draft_probs: torch.Tensor, ks: list[int],
                  offsets: list[int], uses_d: list[bool], free: list[bool], d_rows: list[int],
                  draft_entropy: list[float] | None) -> list[float]:
    """_device_reads for a round of greedy sequences on the CPU, where reading is free: every row's argmax
    and the surprisals read at once, the standard check and the leading passes left to the host (a few
    small tensor ops rather than the general path's forty; the same lists, the same verdicts)."""
    K, R = sum(ks), target_probs.shape[0]
    cand_rows = [o + j for o, k in zip(offsets, ks) for j in range(k)]
    flat_c = [t for c in candidates for t in c]
    top = top_token(target_probs)  # [R]
    entropy_rows = entropy(target_probs)  # [R]
    rows_t, cand_t, d_idx = int_tensors(target_probs.device, cand_rows + list(range(R)), flat_c, d_rows)
    p = target_probs[rows_t, torch.cat((cand_t, top))]  # each candidate's p(x), then each row's p(argmax)
    surprisal = -torch.log(p.clamp_min(1e-30)) - entropy_rows[rows_t]  # [K + R]
    reads = [top.double(), surprisal.double()]
    if d_rows:
        reads.append(_distances(target_probs, draft_probs, rows_t[d_idx], d_rows, d_idx, entropy_rows, draft_entropy))
    flat = torch.cat(reads).tolist()
    top_h, surp_h, d_h = flat[:R], flat[R : R + K], flat[2 * R + K :]
    std_h = [float(t == top_h[r]) for t, r in zip(flat_c, cand_rows)]
    n_h, tok_h, s_last_h, c0 = [], [], [], 0
    for b, k in enumerate(ks):
        n = 0  # leading passes
        while n < k and std_h[c0 + n]:
            n += 1
        c0 += k
        n_h.append(float(n))
        for j in (range(k + 1) if free[b] else [n]):
            tok_h.append(top_h[offsets[b] + j])
            s_last_h.append(flat[R + K + offsets[b] + j])
    rel_h = [0.0] * sum(k for k, d, f in zip(ks, uses_d, free) if d and f)  # no draw: greedy
    return std_h + surp_h + d_h + rel_h + n_h + tok_h + s_last_h


def _device_reads(candidates: list[list[int]], target_probs: torch.Tensor, draft_probs: torch.Tensor,
                  greedy: list[bool], generators: list[torch.Generator | None], stable: list[bool] | None,
                  ks: list[int], uses_d: list[bool], free: list[bool], cstart: list[int], offsets: list[int],
                  d_rows: list[int], draft_entropy: list[float] | None) -> list[float]:
    """accept_batch's device work, read in one transfer: the standard check, the candidates' excess
    surprisals, the distances, each sequence's leading passes, the last tokens and their surprisals."""
    B, K = len(ks), sum(ks)
    dev = target_probs.device
    # uniforms, [2k + 1] or [k + 1] per sampled sequence (zeros for greedy ones: never read)
    draws = [torch.rand(k * (2 if d else 1) + 1, generator=g, dtype=torch.float64, device=dev) if not gr
             else torch.zeros(k * (2 if d else 1) + 1, dtype=torch.float64, device=dev)
             for k, d, g, gr in zip(ks, uses_d, generators, greedy)]
    u_std = [u[:k] for u, k in zip(draws, ks)]
    u_rel = [u[k : 2 * k] if d else None for u, k, d in zip(draws, ks, uses_d)]
    u_last = torch.stack([u[-1] for u in draws])  # [B]
    V = target_probs.shape[-1]
    noise = [exponentials((V,), g, dev) if st and not gr else None
             for g, gr, st in zip(generators, greedy, stable or [False] * B)]

    # every index the round needs, in one copy to the device
    last_seq, last_j = [], []  # the last token's sequence and row within it (-1: where the device says)
    for b, k in enumerate(ks):
        for j in (range(k + 1) if free[b] else [-1]):
            last_seq.append(b)
            last_j.append(j)
    raced = [i for i, b in enumerate(last_seq) if noise[b] is not None]  # last-token rows drawn by the race
    (cand, rows, g_c, pad_b, pad_j, d_idx, greedy_t, ks_t, cstart_t, offsets_t, seq_t, j_fixed, raced_t) = int_tensors(
        dev, [t for c in candidates for t in c], [o + j for o, k in zip(offsets, ks) for j in range(k)],
        [gr for gr, k in zip(greedy, ks) for _ in range(k)], [b for b, k in enumerate(ks) for _ in range(k)],
        [j for k in ks for j in range(k)], d_rows, greedy, ks, cstart, offsets, last_seq, last_j, raced)
    entropy_rows = entropy(target_probs)  # [R]
    p_x = target_probs[rows, cand]  # [K]
    q_x = draft_probs[torch.arange(K, device=dev), cand]
    std = torch.where(g_c.bool(), cand == top_token(target_probs, rows), torch.cat(u_std) * q_x < p_x)  # [K]
    surprisal = -torch.log(p_x.clamp_min(1e-30)) - entropy_rows[rows]  # [K]
    # leading passes per sequence (kept candidates, as the device sees them): the round of a check that
    # cannot relax ends at the first failure
    padded = torch.zeros(B, max(ks), dtype=torch.bool, device=dev)
    padded[pad_b, pad_j] = std
    n_dev = padded.long().cumprod(1).sum(1)
    host = [std.double(), surprisal.double()]
    if d_rows:
        host.append(_distances(target_probs, draft_probs, rows[d_idx], d_rows, d_idx, entropy_rows, draft_entropy))
    host += [u for i, u in enumerate(u_rel) if u is not None and free[i]]
    # the last token: at the first failure (the residual max(0, p - q)) or the bonus row (p), one row
    # per sequence; every row of a sequence whose check can relax
    j_t = torch.where(j_fixed >= 0, j_fixed, n_dev[seq_t])  # [L] the row within the sequence
    row_t = offsets_t[seq_t] + j_t  # its target row
    has_q = j_t < ks_t[seq_t]  # a candidate's row (the residual), not the bonus row
    didx = cstart_t[seq_t] + j_t
    if all(greedy):  # no draw to make
        token = top_token(target_probs, row_t)  # [L]
    else:
        p_last = target_probs[row_t]  # [L, V]
        q_last = draft_probs[didx.clamp(0, K - 1)] * has_q[:, None]
        residual = (p_last - q_last).clamp_min(0.0)
        # p == q leaves no residual mass; then p itself is the right distribution
        dist = torch.where(residual.sum(-1, keepdim=True) > 1e-12, residual, p_last)
        drawn = inverse_cdf(dist, u_last[seq_t])  # [L]
        if raced:
            drawn[raced_t] = race(dist[raced_t], torch.stack([noise[last_seq[i]] for i in raced]))
        token = torch.where(greedy_t.bool()[seq_t], top_token(p_last), drawn)  # [L]
    s_last = -torch.log(target_probs[row_t, token].clamp_min(1e-30)) - entropy_rows[row_t]
    host += [n_dev.double(), token.double(), s_last.double()]
    return torch.cat(host).tolist()  # the round's one transfer to the host


def _verdicts(flat: list[float], ks: list[int], greedy: list[bool], relaxed: list[RelaxedCheck], uses_d: list[bool],
              free: list[bool]) -> list[Verdict]:
    """The verdicts from the round's reads (laid out as _device_reads returns them); the relaxed check's
    host loop where it can relax."""
    B, K = len(ks), sum(ks)
    pos = 0

    def take(n: int) -> list[float]:
        nonlocal pos
        pos += n
        return flat[pos - n : pos]

    L = sum(k + 1 if f else 1 for k, f in zip(ks, free))  # last-token rows
    std_h, surp_h = take(K), take(K)
    d_h = take(sum(k for k, d in zip(ks, uses_d) if d))
    rel_h = [take(k) if uses_d[b] and free[b] else None for b, k in enumerate(ks)]
    n_h, tok_h, s_last_h = take(B), take(L), take(L)

    verdicts, c0, d0, l0 = [], 0, 0, 0
    for b, k in enumerate(ks):
        std_b = [bool(x) for x in std_h[c0 : c0 + k]]
        d_b = d_h[d0 : d0 + k] if uses_d[b] else None
        standard, posteriors = [], [] if uses_d[b] else None
        n_acc, n_relaxed = (0, 0)
        if free[b]:  # the host's loop: the relaxed check may accept a candidate the standard check failed
            for i in range(k):
                posterior = None
                ok = std_b[i]
                if not ok:
                    p_accept, posterior = relaxed[b].judge(d_b[i])
                    ok = p_accept > 0.5 if greedy[b] else rel_h[b][i] < p_accept
                    n_relaxed += ok
                standard.append(std_b[i])
                posteriors.append(posterior)
                if not ok:
                    break
                n_acc += 1
            j = n_acc
        else:
            n_acc = int(n_h[b])
            standard = std_b[: n_acc + (n_acc < k)]
            if posteriors is not None:  # a check that cannot relax still reports the posterior it would have used
                posteriors = [None] * n_acc + ([relaxed[b].judge(d_b[n_acc])[1]] if n_acc < k else [])
            j = 0
        token_b, s_b = int(tok_h[l0 + j]), s_last_h[l0 + j]
        v = Verdict(n_acc, token_b, standard, d_b[: len(standard)] if d_b is not None else None, n_relaxed, posteriors)
        v.excess = surp_h[c0 : c0 + n_acc] + [s_b]
        verdicts.append(v)
        c0 += k
        d0 += k if uses_d[b] else 0
        l0 += k + 1 if free[b] else 1
    return verdicts


def _plain_round(target_probs: torch.Tensor, greedy: list[bool], generators: list[torch.Generator | None],
                 relaxed: list[RelaxedCheck], stable: list[bool]) -> list[Verdict]:
    """accept_batch of a round without candidates (plain decoding): row b is sequence b's bonus row. The same
    draws as the general path (one uniform per sampled sequence, then its V exponentials where stable) and
    the same tokens, without its index bookkeeping (a plain round's host time is the step's overhead)."""
    dev = target_probs.device
    u = [None if gr else torch.rand(1, generator=g, dtype=torch.float64, device=dev)
         for g, gr in zip(generators, greedy)]
    if all(greedy):
        token = top_token(target_probs)
    else:
        zero = torch.zeros(1, dtype=torch.float64, device=dev)
        drawn = inverse_cdf(target_probs, torch.cat([zero if x is None else x for x in u]))
        raced = [b for b, (gr, st) in enumerate(zip(greedy, stable)) if st and not gr]
        if raced:
            noise = torch.stack([exponentials(target_probs.shape[-1:], generators[b], dev) for b in raced])
            drawn[raced] = race(target_probs[raced], noise)
        token = torch.where(torch.tensor(greedy, device=dev), top_token(target_probs), drawn)
    p_x = target_probs.gather(-1, token[:, None]).squeeze(-1)
    surprisal = -torch.log(p_x.clamp_min(1e-30)) - entropy(target_probs)
    flat = torch.cat((token.double(), surprisal.double())).tolist()  # the round's one transfer to the host
    B = len(greedy)
    out = []
    for b, check in enumerate(relaxed):
        on = [] if check.name != "none" else None
        out.append(Verdict(0, int(flat[b]), [], on, 0, None if on is None else [], excess=[flat[B + b]]))
    return out


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
