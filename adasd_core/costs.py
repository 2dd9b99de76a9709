"""Step costs of the loaded pair, measured at start, and the draft length that pays at a batch size.

A round at batch size B that drafts k tokens per sequence costs one draft step just after the
target's forward (its weights have evicted the draft's: "cold"), k - 1 warm draft steps, and one
target forward over k+1 tokens per sequence; with a per-token acceptance rate a it yields
(1 - a^(k+1)) / (1 - a) tokens per sequence. Plain decoding yields one token per target forward
of one token. The best k maximises tokens per second; k = 0 means plain batched decoding.
What the table misses (per-sequence work of a speculative round, ragged batches) is learned
online: `observe` keeps, per batch size, the ratio of measured to predicted round times, for
rounds with and without drafting, and the choice scales each side by its ratio.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

import torch

BATCH_SIZES = (1, 2, 4, 8, 16, 32)
LENGTHS = (1, 2, 4, 8, 16)


def _interp(xs: list[int], ys: list[float], x: float) -> float:
    """Piecewise linear in x, extrapolated linearly past the ends."""
    if len(xs) == 1:
        return ys[0]
    i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return max(1e-9, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def _expected_tokens(acceptance: float, k: int) -> float:
    """Tokens a round yields from k candidates accepted in turn with probability `acceptance` each."""
    a = min(max(acceptance, 0.0), 0.99)
    return (1 - a ** (k + 1)) / (1 - a)


@dataclass
class StepCosts:
    """Seconds per target forward of (B sequences x n tokens) and per draft step of B sequences."""

    batch_sizes: list[int]
    lengths: list[int]
    target: list[list[float]]  # [batch size][length]
    draft: list[float]  # [batch size], a cold step (right after a target forward)
    draft_warm: list[float] | None = None  # [batch size], the steps after it
    measured: bool = True
    # per batch-size bucket: measured / predicted round time, with and without drafting
    ratio: dict = field(default_factory=dict, repr=False)
    # per batch-size bucket and drafting or not: measured tokens per second per sequence (EMA) and rounds
    rates: dict = field(default_factory=dict, repr=False)
    _since_draft: dict = field(default_factory=dict, repr=False)  # per bucket: plain rounds since a drafting one
    _cache: dict = field(default_factory=dict, repr=False)

    def target_cost(self, batch: int, n: int) -> float:
        per_b = [_interp(self.lengths, row, n) for row in self.target]
        return _interp(self.batch_sizes, per_b, batch)

    def draft_cost(self, batch: int, warm: bool = False) -> float:
        return _interp(self.batch_sizes, self.draft_warm if (warm and self.draft_warm) else self.draft, batch)

    def round_cost(self, batch: int, draft_steps: int, tokens_per_sequence: float) -> float:
        """Predicted seconds of a round: its batched draft steps and a target forward over
        `tokens_per_sequence` tokens per sequence (k+1 when every sequence drafts k)."""
        drafting = self.draft_cost(batch) + (draft_steps - 1) * self.draft_cost(batch, warm=True) if draft_steps else 0.0
        return drafting + self.target_cost(batch, tokens_per_sequence)

    def _bucket(self, batch: int) -> int:
        return 1 << max(0, batch - 1).bit_length()  # 1, 2, 4, 8, 16, ...

    def observe(self, batch: int, draft_steps: int, tokens_per_sequence: float, seconds: float,
                tokens: int | None = None) -> None:
        """A round's measured time against the table's prediction for the work it did, and (given the
        tokens it emitted) its measured tokens per second per sequence."""
        bucket = self._bucket(batch)
        key = (bucket, draft_steps > 0)
        r = seconds / self.round_cost(batch, draft_steps, tokens_per_sequence)
        old = self.ratio.get(key)
        self.ratio[key] = r if old is None else 0.9 * old + 0.1 * r
        if old is None or abs(self.ratio[key] - old) > 0.02 * old:
            self._cache.clear()
        if tokens is not None and seconds > 0:
            rate = tokens / batch / seconds
            ema, n = self.rates.get(key, (rate, 0))
            self.rates[key] = (rate if n == 0 else 0.95 * ema + 0.05 * rate, n + 1)
            self._since_draft[bucket] = 0 if draft_steps else self._since_draft.get(bucket, 0) + 1

    # rounds of each kind a bucket measures before its rates decide; plain rounds between re-probes
    EXPLORE_ROUNDS = 8
    REPROBE_EVERY = 64

    def drafting_measured_to_pay(self, batch: int) -> bool:
        """Whether drafting rounds have measured more tokens per second than plain ones at this batch
        size, all costs in (the table cannot see everything a server pays: its front end's share of
        the cores, ragged batches, the draft catching up). Until both kinds have EXPLORE_ROUNDS
        rounds, plain ones are measured first, then the plan's own choice; where drafting lost, one
        round in REPROBE_EVERY drafts again so the verdict follows the load."""
        bucket = self._bucket(batch)
        plain, spec = self.rates.get((bucket, False), (0.0, 0)), self.rates.get((bucket, True), (0.0, 0))
        if plain[1] < self.EXPLORE_ROUNDS:
            return False
        if spec[1] < self.EXPLORE_ROUNDS or spec[0] >= plain[0]:
            return True
        return self._since_draft.get(bucket, 0) >= self.REPROBE_EVERY

    def best_draft_length(self, batch: int, acceptance: float, k_max: int) -> int:
        """The draft length (0..k_max) with the most tokens per second at this batch size."""
        # the answer is computed at the rounded acceptance it is cached under, so it is a function of the
        # arguments alone (not of which request first filled the cache: issue 15)
        a = round(min(max(acceptance, 0.0), 0.99), 2)
        key = (batch, a, k_max)
        if key not in self._cache:
            bucket = self._bucket(batch)
            spec, plain = self.ratio.get((bucket, True), 1.0), self.ratio.get((bucket, False), 1.0)
            best_k, best = 0, 1.0 / (plain * self.target_cost(batch, 1))
            for k in range(1, k_max + 1):
                rate = (1 - a ** (k + 1)) / (1 - a) / (spec * self.round_cost(batch, k, k + 1))
                if rate > best:
                    best_k, best = k, rate
            self._cache[key] = best_k
        return self._cache[key]

    def _target_row(self, batch: int) -> list[float]:
        """The target's cost over the table's lengths at this batch size (interpolated once per size)."""
        key = ("row", batch)
        if key not in self._cache:
            self._cache[key] = [_interp(self.batch_sizes, [r[j] for r in self.target], batch)
                                for j in range(len(self.lengths))]
        return self._cache[key]

    def plan_batch(self, acceptances: list[float], caps: list[int],
                   fixed: list[tuple[int, float]] = ()) -> list[int]:
        """Draft lengths for the free sequences of one round, chosen together: the plan with the most
        expected tokens per second for the whole batch, under measured round times.

        `acceptances[i]` and `caps[i]` describe free sequence i (adaptive: any length 0..cap);
        `fixed` are (length, acceptance) of the round's other sequences, which draft that length
        whatever this plan says (fixed-K methods, reproducible requests, plain decoding at 0).
        Candidates: the m sequences most likely to be accepted draft min(k, cap) each, the rest none,
        for every k and m. With m = 0 and nothing fixed the round is plain decoding: no draft work."""
        n_free = len(acceptances)
        if n_free == 0:
            return []
        if self.measured and not self.drafting_measured_to_pay(n_free + len(fixed)):
            return [0] * n_free
        # computed at rounded acceptances and cached under them: under load the batch's plan rarely
        # changes from round to round, and a plan is a function of its key alone
        acceptances = [round(min(max(x, 0.0), 0.99), 2) for x in acceptances]
        fixed = [(k, round(min(max(x, 0.0), 0.99), 2)) for k, x in fixed]
        key = ("plan", tuple(acceptances), tuple(caps), tuple(fixed))
        if key not in self._cache:
            if len(self._cache) > 4096:  # bounded: keys move with every request's acceptance
                self._cache.clear()
            self._cache[key] = self._plan_batch(acceptances, caps, fixed)
        return list(self._cache[key])

    def _plan_batch(self, acceptances: list[float], caps: list[int], fixed: list[tuple[int, float]]) -> list[int]:
        n_free = len(acceptances)
        batch = n_free + len(fixed)
        bucket = self._bucket(batch)
        spec_r, plain_r = self.ratio.get((bucket, True), 1.0), self.ratio.get((bucket, False), 1.0)
        row = self._target_row(batch)
        fixed_rows, fixed_steps = sum(k for k, _ in fixed), max((k for k, _ in fixed), default=0)
        fixed_drafting = sum(1 for k, _ in fixed if k)
        base = n_free + sum(_expected_tokens(a, k) for k, a in fixed)

        # per-call tables: draft steps by how many sequences draft, the target by total rows
        cold = [0.0] + [self.draft_cost(n) for n in range(1, batch + 1)]
        warm = [0.0] + [self.draft_cost(n, warm=True) for n in range(1, batch + 1)]
        target: dict[int, float] = {}

        def seconds(rows: int, steps: int, drafting: int) -> float:
            t = target.get(rows)
            if t is None:
                t = target[rows] = _interp(self.lengths, row, 1 + rows / batch)
            if not steps:
                return t * plain_r
            return (t + cold[drafting] + (steps - 1) * warm[drafting]) * spec_r

        order = sorted(range(n_free), key=lambda i: -acceptances[i])
        a = [acceptances[i] for i in order]
        capped = [caps[i] for i in order]
        best_plan, best_rate = (0, 0), base / seconds(fixed_rows, fixed_steps, fixed_drafting)
        for k in range(1, max(caps, default=0) + 1):
            if a[0] ** k < 1e-3:  # even the likeliest sequence's k-th candidate adds nothing
                break
            gain, rows, drafting, steps = 0.0, fixed_rows, fixed_drafting, fixed_steps
            for m in range(n_free):
                ki = k if k < capped[m] else capped[m]
                if ki:
                    gain += (1 - a[m] ** (ki + 1)) / (1 - a[m]) - 1
                    rows, drafting, steps = rows + ki, drafting + 1, max(steps, ki)
                rate = (base + gain) / seconds(rows, steps, drafting)
                if rate > best_rate:
                    best_plan, best_rate = (k, m + 1), rate
        k, m = best_plan
        out = [0] * n_free
        for i in order[:m]:
            out[i] = min(k, caps[i])
        return out

    @classmethod
    def nominal(cls) -> "StepCosts":
        """A fixed model for engines that do not measure (tests): a draft step costs 0.15 of a
        target step, and a target forward grows by 3% per extra token in the batch."""
        bs, ns = [1, 32], [1, 21]
        target = [[1.0 + 0.03 * (b * n - 1) for n in ns] for b in bs]
        return cls(bs, ns, target, [0.15 * t[0] for t in target], measured=False)

    def frozen(self) -> "StepCosts":
        """The table alone, without the online ratios (plans that must not depend on the server's history)."""
        return StepCosts(self.batch_sizes, self.lengths, self.target, self.draft, self.draft_warm, self.measured)

    def to_json(self) -> dict:
        """The table (not the online ratios): saved with the warm-start state, so that a restarted
        server plans reproducible requests as before instead of from its new timings."""
        return {"batch_sizes": list(self.batch_sizes), "lengths": list(self.lengths),
                "target": [list(r) for r in self.target], "draft": list(self.draft),
                "draft_warm": None if self.draft_warm is None else list(self.draft_warm), "measured": self.measured}

    @classmethod
    def from_json(cls, data: dict) -> "StepCosts":
        floats = lambda xs: [float(x) for x in xs]  # noqa: E731
        costs = cls([int(b) for b in data["batch_sizes"]], [int(n) for n in data["lengths"]],
                    [floats(r) for r in data["target"]], floats(data["draft"]),
                    None if data.get("draft_warm") is None else floats(data["draft_warm"]), bool(data["measured"]))
        if not (len(costs.target) == len(costs.batch_sizes) == len(costs.draft)
                and all(len(r) == len(costs.lengths) for r in costs.target)):
            raise ValueError("a step-cost table whose rows do not match its sizes")
        return costs

    def summary(self) -> dict:
        return {
            "target_step_s": round(self.target_cost(1, 1), 6),
            "draft_step_s": round(self.draft_cost(1), 6),
            "draft_warm_step_s": round(self.draft_cost(1, warm=True), 6),
            "target_b8_s": round(self.target_cost(8, 1), 6),
        }


@torch.inference_mode()
def measure(target_pool, draft_pool, vocab: int, max_batch: int, context: int = 64, repeats: int = 3) -> StepCosts:
    """Time the target over (B, n) and the draft over B on the pools' first slots, then free them.

    Each draft step is timed right after a target forward, as in a round (the target's weights
    have just evicted the draft's from the caches)."""
    batch_sizes = [b for b in BATCH_SIZES if b <= max_batch] or [1]
    lengths = [n for n in LENGTHS if context + n < target_pool.capacity]
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (context,), generator=gen).tolist()
    slots = list(range(max(batch_sizes)))
    for pool in (target_pool, draft_pool):
        if pool is not None:
            pool.forward(slots, [prompt] * len(slots))

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn().argmax(-1).tolist()  # the host sync a round pays to read its tokens
        return time.perf_counter() - t0

    def target_step(b: int, n: int) -> float:
        t = timed(lambda: target_pool.forward(slots[:b], [prompt[:n]] * b, all_logits=True))
        for s in slots[:b]:
            target_pool.rollback(s, context)
        return t

    def draft_step(b: int, warm: bool = False) -> float:
        target_step(b, 4)
        if warm:
            draft_pool.forward(slots[:b], [prompt[:1]] * b)
        t = timed(lambda: draft_pool.forward(slots[:b], [prompt[:1]] * b))
        for s in slots[:b]:
            draft_pool.rollback(s, context)
        return t

    def fastest(fn) -> float:
        # the minimum: another process on the same cores (the server's front end starting up) only
        # ever adds time, and a new shape's first run pays for kernel selection and allocation
        fn()
        return min(fn() for _ in range(repeats))

    def one_pass() -> tuple[list[list[float]], list[float], list[float]]:
        target, draft, warm = [], [], []
        for b in batch_sizes:
            target.append([fastest(lambda: target_step(b, n)) for n in lengths])
            has_draft = draft_pool is not None
            draft.append(fastest(lambda: draft_step(b)) if has_draft else float("inf"))
            warm.append(fastest(lambda: draft_step(b, warm=True)) if has_draft else float("inf"))
        return target, draft, warm

    # two passes a little apart, cell by cell the faster: a burst of load rarely covers both
    (t1, d1, w1), (t2, d2, w2) = one_pass(), one_pass()
    target = [[min(a, b) for a, b in zip(r1, r2)] for r1, r2 in zip(t1, t2)]
    draft, warm = [min(a, b) for a, b in zip(d1, d2)], [min(a, b) for a, b in zip(w1, w2)]
    # more work never costs less: a cell above a larger shape's time was disturbed; take that time
    for i in reversed(range(len(batch_sizes))):
        for j in reversed(range(len(lengths))):
            later = [target[i][j + 1]] if j + 1 < len(lengths) else []
            later += [target[i + 1][j]] if i + 1 < len(batch_sizes) else []
            target[i][j] = min([target[i][j], *later])
        if i + 1 < len(batch_sizes):
            draft[i], warm[i] = min(draft[i], draft[i + 1]), min(warm[i], warm[i + 1])
    for pool in (target_pool, draft_pool):
        if pool is not None:
            for s in slots:
                pool.clear(s)
    return StepCosts(batch_sizes, lengths, target, draft, warm)


@torch.inference_mode()
def decode_step_seconds(model, pair, context: int = 64, repeats: int = 9) -> float:
    """Median wall time of one single-token decode step after `context` cached tokens,
    including the host sync a real step pays to read its token."""
    n = min(context, pair.context_length - 2)
    from adasd_core.kv_cache import make_pool

    pool = make_pool(model, 1, n + 2)
    ids = (torch.arange(n) % pair.vocab_size).tolist()
    pool.forward([0], [ids])
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        pool.forward([0], [ids[:1]])[-1].argmax().item()
        times.append(time.perf_counter() - t0)
        pool.rollback(0, n)
    times.sort()
    return times[len(times) // 2]
