"""Step costs of the loaded pair and the draft lengths that pay, in three parts:

- `StepCosts`: the table, measured at start (or saved): seconds per target forward of B sequences
  x n tokens and per draft step of B sequences. A round at batch size B that drafts k tokens per
  sequence costs one draft step just after the target's forward (its weights have evicted the
  draft's: "cold"), k - 1 warm draft steps, and one target forward over k+1 tokens per sequence.
- `OnlineCorrection`: what the table misses (per-sequence work of a speculative round, ragged
  batches, a front end sharing the cores), learned from measured rounds: per batch-size bucket,
  the ratio of measured to predicted round times and the measured tokens per second, with and
  without drafting.
- `BatchPlanner`: pure and memoised over a table (and a correction, or none for plans that must
  not depend on the server's history): with a per-token acceptance rate a, k candidates yield
  `expected_tokens(a, k)` = (1 - a^(k+1)) / (1 - a) tokens; plain decoding yields one token per
  target forward of one token. The plan maximises expected tokens per second; k = 0 is plain
  batched decoding.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

import torch

BATCH_SIZES = (1, 2, 4, 8, 16, 32)
LENGTHS = (1, 2, 4, 8, 16)
MAX_ACCEPTANCE = 0.99  # acceptances are clamped below 1 (the expected-token series would not end)


def _interp(xs: list[int], ys: list[float], x: float) -> float:
    """Piecewise linear in x, extrapolated linearly past the ends."""
    if len(xs) == 1:
        return ys[0]
    i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return max(1e-9, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def clamp_acceptance(acceptance: float) -> float:
    """The acceptance a plan is computed (and memoised) at: clamped and rounded to 0.01."""
    return round(min(max(acceptance, 0.0), MAX_ACCEPTANCE), 2)


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens a round yields from k candidates accepted in turn with probability `acceptance` each
    (the bonus or correction token included)."""
    a = min(max(acceptance, 0.0), MAX_ACCEPTANCE)
    return (1 - a ** (k + 1)) / (1 - a)


def bucket(batch: int) -> int:
    """The batch-size bucket measured rounds are pooled in: 1, 2, 4, 8, 16, ..."""
    return 1 << max(0, batch - 1).bit_length()


@dataclass(frozen=True)
class StepCosts:
    """Seconds per target forward of (B sequences x n tokens) and per draft step of B sequences."""

    batch_sizes: list[int]
    lengths: list[int]
    target: list[list[float]]  # [batch size][length]
    draft: list[float]  # [batch size], a cold step (right after a target forward)
    draft_warm: list[float] | None = None  # [batch size], the steps after it
    measured: bool = True  # False: a nominal table (tests); measured rounds then teach nothing

    def target_cost(self, batch: int, n: float) -> float:
        return _interp(self.batch_sizes, [_interp(self.lengths, row, n) for row in self.target], batch)

    def target_row(self, batch: int) -> list[float]:
        """The target's cost over the table's lengths at this batch size."""
        return [_interp(self.batch_sizes, [r[j] for r in self.target], batch) for j in range(len(self.lengths))]

    def draft_cost(self, batch: int, warm: bool = False) -> float:
        return _interp(self.batch_sizes, self.draft_warm if (warm and self.draft_warm) else self.draft, batch)

    def round_cost(self, batch: int, draft_steps: int, tokens_per_sequence: float) -> float:
        """Predicted seconds of a round: its batched draft steps and a target forward over
        `tokens_per_sequence` tokens per sequence (k+1 when every sequence drafts k)."""
        drafting = (self.draft_cost(batch) + (draft_steps - 1) * self.draft_cost(batch, warm=True)
                    if draft_steps else 0.0)
        return drafting + self.target_cost(batch, tokens_per_sequence)

    @classmethod
    def nominal(cls) -> StepCosts:
        """A fixed model for engines that do not measure (tests): a draft step costs 0.15 of a
        target step, and a target forward grows by 3% per extra token in the batch."""
        bs, ns = [1, 32], [1, 21]
        target = [[1.0 + 0.03 * (b * n - 1) for n in ns] for b in bs]
        return cls(bs, ns, target, [0.15 * t[0] for t in target], measured=False)

    def to_json(self) -> dict:
        """The table: saved with the warm-start state, so that a restarted server plans
        reproducible requests as before instead of from its new timings."""
        return {"batch_sizes": list(self.batch_sizes), "lengths": list(self.lengths),
                "target": [list(r) for r in self.target], "draft": list(self.draft),
                "draft_warm": None if self.draft_warm is None else list(self.draft_warm), "measured": self.measured}

    @classmethod
    def from_json(cls, data: dict) -> StepCosts:
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


@dataclass
class OnlineCorrection:
    """Measured rounds against the table, per batch-size bucket and drafting or not: the ratio of
    measured to predicted time (EMA) and the tokens per second per sequence (EMA, with counts)."""

    RATIO_SMOOTHING = 0.1
    RATE_SMOOTHING = 0.05
    RATIO_TOLERANCE = 0.02  # a ratio that moves less keeps the memoised plans
    # rounds of each kind a bucket measures before its rates decide; plain rounds between re-probes
    EXPLORE_ROUNDS = 8
    REPROBE_EVERY = 64

    ratio: dict = field(default_factory=dict)  # (bucket, drafting) -> measured / predicted
    ratio_n: dict = field(default_factory=dict)  # (bucket, drafting) -> rounds in it
    rates: dict = field(default_factory=dict)  # (bucket, drafting) -> (tokens/s per sequence, rounds)
    since_draft: dict = field(default_factory=dict)  # bucket -> plain rounds since a drafting one
    _sums: dict = field(default_factory=dict)  # (bucket, drafting) -> (mean tokens per sequence, mean seconds, rounds)
    version: int = 0  # bumped when a ratio moves past RATIO_TOLERANCE: memoised plans are stale

    def observe(self, table: StepCosts, batch: int, draft_steps: int, tokens_per_sequence: float, seconds: float,
                tokens: int | None = None) -> None:
        """A round's measured time against the table's prediction for the work it did, and (given the
        tokens it emitted) its measured tokens per second per sequence."""
        b = bucket(batch)
        key = (b, draft_steps > 0)
        r = seconds / table.round_cost(batch, draft_steps, tokens_per_sequence)
        old, n = self.ratio.get(key), self.ratio_n.get(key, 0)
        w = max(self.RATIO_SMOOTHING, 1.0 / (n + 1))  # a running mean first: one slow round is one of many
        self.ratio[key] = r if old is None else (1 - w) * old + w * r
        self.ratio_n[key] = n + 1
        if old is None or abs(self.ratio[key] - old) > self.RATIO_TOLERANCE * old or n + 1 == self.EXPLORE_ROUNDS:
            self.version += 1
        if tokens is not None and seconds > 0:
            # tokens and seconds averaged apart (a ratio of means, not a mean of per-round ratios, which
            # over-weights short rounds), each a running mean until the EMA's window is reached: the
            # first rounds, often a rejection, must not stand for the next twenty
            n_tok, n_s, n = self._sums.get(key, (0.0, 0.0, 0))
            w = max(self.RATE_SMOOTHING, 1.0 / (n + 1))
            n_tok, n_s = (1 - w) * n_tok + w * tokens / batch, (1 - w) * n_s + w * seconds
            self._sums[key] = (n_tok, n_s, n + 1)
            self.rates[key] = (n_tok / n_s, n + 1)
            before = self.since_draft.get(b, 0)
            self.since_draft[b] = 0 if draft_steps else before + 1
            if self.since_draft[b] == self.REPROBE_EVERY or (draft_steps and before >= self.REPROBE_EVERY):
                self.version += 1  # a re-probe starts or ends: its plans differ (ratios)

    def ratios(self, batch: int) -> tuple[float, float]:
        """(drafting, plain) measured / predicted round time at this batch size. A kind with fewer than
        EXPLORE_ROUNDS rounds takes the other's ratio (the table's error is mostly the whole machine's),
        and so does drafting during a re-probe: a drafting ratio from one slow first round (a new shape's
        first call) would make drafting look too dear to be planned, hence never measured again. 1 where
        neither is measured."""
        b = bucket(batch)

        def known(drafting: bool) -> float | None:
            return self.ratio.get((b, drafting)) if self.ratio_n.get((b, drafting), 0) >= self.EXPLORE_ROUNDS else None

        spec = None if self._lost(b) and self._reprobe_due(b) else known(True)
        plain = known(False)
        spec = spec or plain or 1.0  # ratios are positive
        return spec, plain or spec

    def _lost(self, b: int) -> bool:
        """Both kinds measured, and drafting rounds gave fewer tokens per second."""
        plain, spec = self.rates.get((b, False), (0.0, 0)), self.rates.get((b, True), (0.0, 0))
        return min(plain[1], spec[1]) >= self.EXPLORE_ROUNDS and spec[0] < plain[0]

    def _reprobe_due(self, b: int) -> bool:
        return self.since_draft.get(b, 0) >= self.REPROBE_EVERY

    def drafting_pays(self, batch: int) -> bool:
        """Whether drafting rounds have measured more tokens per second than plain ones at this batch
        size, all costs in. Until both kinds have EXPLORE_ROUNDS rounds, plain ones are measured
        first, then the plan's own choice; where drafting lost, one round in REPROBE_EVERY drafts
        again so the verdict follows the load."""
        b = bucket(batch)
        if self.rates.get((b, False), (0.0, 0))[1] < self.EXPLORE_ROUNDS:
            return False
        return not self._lost(b) or self._reprobe_due(b)


class BatchPlanner:
    """Draft lengths over a cost table, corrected by measured rounds when given a correction (None:
    the table alone, a function of the table and the arguments). Memoised under rounded
    acceptances: under load a batch's plan rarely changes from round to round, and a plan is a
    function of its key alone."""

    MEMO_SIZE = 4096  # entries; bounded because keys move with every request's acceptance

    def __init__(self, table: StepCosts, correction: OnlineCorrection | None = None):
        self.table = table
        self.correction = correction
        self._memo: dict = {}
        self._version = 0

    def observe(self, batch: int, draft_steps: int, tokens_per_sequence: float, seconds: float,
                tokens: int | None = None) -> None:
        """A measured round (OnlineCorrection.observe)."""
        if self.correction is not None:
            self.correction.observe(self.table, batch, draft_steps, tokens_per_sequence, seconds, tokens)

    def _ratios(self, batch: int) -> tuple[float, float]:
        return self.correction.ratios(batch) if self.correction is not None else (1.0, 1.0)

    def _memoised(self, key, compute):
        version = self.correction.version if self.correction is not None else 0
        if version != self._version or len(self._memo) > self.MEMO_SIZE:
            self._memo.clear()
            self._version = version
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def best_draft_length(self, batch: int, acceptance: float, k_max: int) -> int:
        """The draft length (0..k_max) with the most tokens per second for one sequence at this batch size."""
        a = clamp_acceptance(acceptance)

        def compute() -> int:
            spec, plain = self._ratios(batch)
            best_k, best = 0, 1.0 / (plain * self.table.target_cost(batch, 1))
            for k in range(1, k_max + 1):
                rate = expected_tokens(a, k) / (spec * self.table.round_cost(batch, k, k + 1))
                if rate > best:
                    best_k, best = k, rate
            return best_k

        return self._memoised(("one", batch, a, k_max), compute)

    def plan_batch(self, acceptances: list[float], caps: list[int], fixed: list[tuple[int, float]] = ()) -> list[int]:
        """Draft lengths for the free sequences of one round, chosen together: the plan with the most
        expected tokens per second for the whole batch.

        `acceptances[i]` and `caps[i]` describe free sequence i (adaptive: any length 0..cap);
        `fixed` are (length, acceptance) of the round's other sequences, which draft that length
        whatever this plan says (fixed-K methods, reproducible requests, plain decoding at 0).
        Candidates: the m sequences most likely to be accepted draft min(k, cap) each, the rest none,
        for every k and m. With m = 0 and nothing fixed the round is plain decoding: no draft work."""
        if not acceptances:
            return []
        if self.correction is not None and self.table.measured and \
                not self.correction.drafting_pays(len(acceptances) + len(fixed)):
            return [0] * len(acceptances)
        acceptances = [clamp_acceptance(x) for x in acceptances]
        fixed = [(k, clamp_acceptance(x)) for k, x in fixed]
        key = ("batch", tuple(acceptances), tuple(caps), tuple(fixed))
        return list(self._memoised(key, lambda: self._plan_batch(acceptances, caps, fixed)))

    def _plan_batch(self, acceptances: list[float], caps: list[int], fixed: list[tuple[int, float]]) -> list[int]:
        n_free = len(acceptances)
        batch = n_free + len(fixed)
        spec_r, plain_r = self._ratios(batch)
        row = self.table.target_row(batch)
        fixed_rows, fixed_steps = sum(k for k, _ in fixed), max((k for k, _ in fixed), default=0)
        fixed_drafting = sum(1 for k, _ in fixed if k)
        base = n_free + sum(expected_tokens(a, k) for k, a in fixed)

        # per-call tables: draft steps by how many sequences draft, the target by total rows
        cold = [0.0] + [self.table.draft_cost(n) for n in range(1, batch + 1)]
        warm = [0.0] + [self.table.draft_cost(n, warm=True) for n in range(1, batch + 1)]
        target: dict[int, float] = {}

        def seconds(rows: int, steps: int, drafting: int) -> float:
            t = target.get(rows)
            if t is None:
                t = target[rows] = _interp(self.table.lengths, row, 1 + rows / batch)
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
                ki = min(k, capped[m])
                if ki:
                    gain += expected_tokens(a[m], ki) - 1
                    rows, drafting, steps = rows + ki, drafting + 1, max(steps, ki)
                rate = (base + gain) / seconds(rows, steps, drafting)
                if rate > best_rate:
                    best_plan, best_rate = (k, m + 1), rate
        k, m = best_plan
        out = [0] * n_free
        for i in order[:m]:
            out[i] = min(k, caps[i])
        return out


@torch.inference_mode()
def measure(target_pool, draft_pool, vocab: int, max_batch: int, context: int = 64, repeats: int = 3) -> StepCosts:
    """Time the target over (B, n) and the draft over B on the pools' first slots, then free them.

    Each draft step is timed right after a target forward, as in a round (the target's weights
    have just evicted the draft's from the caches)."""
    from adasd_core.kv_cache import SharedPool

    context = max(1, min(context, target_pool.capacity - max(LENGTHS) - 1))  # slots sized for one short request
    for pool in (target_pool, draft_pool):  # no more sequences than the pools' blocks hold
        blocks = getattr(pool, "blocks", None)
        if blocks is not None and not isinstance(pool, SharedPool):
            max_batch = min(max_batch, max(1, blocks.available // -(-(context + 2 * max(LENGTHS)) // blocks.size)))
    batch_sizes = [b for b in BATCH_SIZES if b <= max_batch] or [1]
    lengths = [n for n in LENGTHS if context + n < target_pool.capacity]
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (context,), generator=gen).tolist()
    slots = list(range(max(batch_sizes)))
    for pool in (target_pool, draft_pool):
        if pool is not None and not isinstance(pool, SharedPool):  # a self-draft reads the target's slots
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
            target.append([fastest(lambda b=b, n=n: target_step(b, n)) for n in lengths])
            has_draft = draft_pool is not None
            draft.append(fastest(lambda b=b: draft_step(b)) if has_draft else float("inf"))
            warm.append(fastest(lambda b=b: draft_step(b, warm=True)) if has_draft else float("inf"))
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


class AcceptancePrior:
    """Per method, the acceptance a sequence without history of its own is planned at: a moving
    average over the rounds of every request, starting optimistic so that new requests draft and learn."""

    START = 0.6
    SMOOTHING = 0.02

    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def get(self, method: str) -> float:
        return self.values.get(method, self.START)

    def observe(self, method: str, obs) -> None:
        self.values[method] = (1 - self.SMOOTHING) * self.get(method) + self.SMOOTHING * obs.acceptance


class RoundClock:
    """What a round costs its caller: the round itself plus the caller's time since the last round
    ended (a server's sending and polling); a gap longer than IDLE_GAP_S is an idle wait, not work."""

    IDLE_GAP_S = 0.5

    def __init__(self) -> None:
        self.round_end: float | None = None  # when the last round ended, if the caller stepped straight on
        self.outside_s = 0.0

    def step_started(self) -> None:
        gap = time.perf_counter() - self.round_end if self.round_end is not None else 0.0
        self.outside_s = gap if gap < self.IDLE_GAP_S else 0.0

    def round_ended(self, ran: bool) -> None:
        self.round_end = time.perf_counter() if ran else None
