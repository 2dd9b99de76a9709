"""How often batch mates change a reproducible request's tokens (issues 15 and 32).

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python scripts/batch_invariance.py [--pair DIR|tiny|smollm2]
        [--requests 60] [--tokens 32] [--batch 4] [--repeats 1] [--int8 row,call] [--no-batch-aware]
        [--out result.json]
    ... --throughput [plan] [--pair tiny] [--batch 16] [--passes 3]
    ... --throughput int8 --pair smollm2 [--batch 4] [--passes 5]

In process, on a pair folder with target/ and draft/ (default: the quick pair, built in seconds;
`smollm2`: the default pair from `adasd setup`), with the server's settings (batch-aware cap, published
warm-start snapshots): every probe request (greedy adasd, and seeded adasd at temperature 1.0) runs
alone, then `--repeats` times again in a batch with `--batch - 1` mates of other methods and
temperatures (other mates each time), from the same snapshot. `--no-batch-aware` drafts as the paper
does (on the quick pair the cap finds that drafting never pays, so the probes would not draft at all).
The plan, the start state and the random draws are the same by construction, so every difference
comes from the forwards: a batched matmul or attention that sums in another order, a near tie that
flips, or (int8 drafts) an activation scale shared by the batch. Prints the requests that differ,
and the largest logit difference between batched and lone forwards, of the target and the draft
(`rows_differ`: rows not bitwise equal).

`--int8 row,call`: an int8 draft (the default pair's) runs each listed way, alternating request by
request: `row` (the engine's: each row's activations quantised on their own, attention per
sequence; batch-invariant) and `call` (ADASD_INT8=call: fbgemm's one activation scale per call).

`--throughput` (`plan`) measures the price of planning alone: `--batch` greedy adasd requests at once,
planned alone (reproducible, the server's way) or by their batch size (the cap's plan before issue
15), alternated over `--passes`; tokens per second of each and their ratio, medians over passes.
`--throughput int8` measures the price of the batch-invariant int8 draft: `--batch` seeded adasd
requests at temperature 1.0 at once, with the draft's `row` and `call` forwards alternated over
`--passes`; tokens per second, acceptance, and one draft step's time at batch 1 and `--batch`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from adasd_core import lean
from adasd_core.engine import SpecConfig
from adasd_core.llm import LLM
from adasd_core.models import load_pair
from adasd_core.sampling import SamplingParams
from adasd_core.warm import Schedule, WarmState

METHODS = ("ar", "vanilla", "gen-only", "verify-only", "adasd", "hybrid")


def run(engine, requests, epoch):
    seqs = [engine.new_sequence(p, params, spec, epoch=epoch) for p, params, spec in requests]
    out = engine.run_together(seqs)
    engine.last_drafted = seqs[0].stats.drafted_tokens
    return out


def _spread(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    """Largest |a - b| (equal entries, -inf ones too, count 0) and the rows not bitwise equal."""
    diff = torch.where(a == b, 0.0, a - b).abs()
    return float(diff.max()), int((diff > 0).any(-1).sum())


def logit_spread(pool, prompts, batch: int) -> dict:
    """Largest |batched - alone| over a pool's logits (target or draft): of a 4-token verify run with
    ragged batch mates, and of one decode step after a prompt prefilled with the mates' prompts in
    the same forward; with the rows (of 4 + 1 per prompt) that are not bitwise equal."""
    out = {"verify": 0.0, "prefill": 0.0, "rows": 0, "rows_differ": 0}
    slots = list(range(batch))
    for p in prompts[:8]:
        feeds = [p[:-4]] + [q[:-4] for q in random.sample(prompts, batch - 1)]
        pool.forward(slots, feeds)
        alone = pool.forward([0], [p[-4:]], all_logits=True).clone()
        pool.rollback(0, len(feeds[0]))
        mates = [list(range(1, 2 + i % 4)) for i in range(batch - 1)]  # ragged, as in a round
        together = pool.forward(slots, [p[-4:]] + mates, all_logits=True)[:4]
        d, rows = _spread(together, alone)
        out["verify"], out["rows_differ"] = max(out["verify"], d), out["rows_differ"] + rows
        for s in slots:
            pool.clear(s)
        pool.forward([0], [feeds[0]])
        alone = pool.forward([0], [p[-4:-3]]).clone()
        pool.clear(0)
        pool.forward(slots, feeds)
        together = pool.forward([0], [p[-4:-3]])
        d, rows = _spread(together, alone)
        out["prefill"], out["rows_differ"] = max(out["prefill"], d), out["rows_differ"] + rows
        out["rows"] += 5
        for s in slots:
            pool.clear(s)
    return out


def int8_variants(pair, modes: list[str]) -> dict:
    """{mode: the draft's LeanModel built that way}, or {"float": None} when the draft is not int8."""
    if pair.draft is None or not lean.int8_weights(pair.draft) or not lean.supports(pair.draft):
        return {"float": None}
    variants, before = {}, os.environ.get(lean.INT8_ENV)
    try:
        for mode in modes:
            assert mode in ("row", "call"), mode
            os.environ[lean.INT8_ENV] = "call" if mode == "call" else "1"
            variants[mode] = lean.LeanModel(pair.draft)
    finally:
        os.environ.pop(lean.INT8_ENV)
        if before is not None:
            os.environ[lean.INT8_ENV] = before
    return variants


def use(engine, variant) -> None:
    if variant is not None:
        engine.runner.draft.lean = variant


def mixed_mates(prompts, i: int, r: int, args) -> list[tuple]:
    """`--batch - 1` requests of other methods and temperatures, other ones for each repeat r."""
    return [(prompts[(i + 7 * j + 13 * r) % len(prompts)],
             SamplingParams(max_tokens=args.tokens // 2 + 5 * j, temperature=(0.0, 0.7, 1.0)[(i + j + r) % 3],
                            seed=None if (j + r) % 2 else j, ignore_eos=True),
             SpecConfig(method=METHODS[(i + j + r) % len(METHODS)], warm_start=True))
            for j in range(1, args.batch)]


def plan_throughput(engine, prompts, args) -> dict:
    def once(by_batch: bool) -> float:
        requests = [(prompts[i % len(prompts)], SamplingParams(max_tokens=args.tokens, ignore_eos=True),
                     SpecConfig(method="adasd", warm_start=True)) for i in range(args.batch)]
        seqs = [engine.new_sequence(*r) for r in requests]
        for s in seqs:
            if by_batch:
                s.plan_prior = None
            engine.add(s)
        t0 = time.perf_counter()
        while not engine.idle:
            engine.step()
        return sum(s.generated for s in seqs) / (time.perf_counter() - t0)

    rows = {"alone": [], "by_batch": []}
    for _ in range(args.passes):
        rows["alone"].append(once(False))
        rows["by_batch"].append(once(True))
    ratios = [a / b for a, b in zip(rows["alone"], rows["by_batch"])]
    return {"batch": args.batch, "tokens": args.tokens, "tok_s_planned_alone": statistics.median(rows["alone"]),
            "tok_s_planned_by_batch": statistics.median(rows["by_batch"]), "ratio": statistics.median(ratios),
            "per_pass": rows}


def draft_step_ms(engine, prompts, batch: int, reps: int = 20) -> float:
    """One draft decode step over `batch` slots after 32-token prompts (median of `reps`), in ms."""
    pool, slots = engine.runner.draft, list(range(batch))
    pool.forward(slots, [prompts[i][:32] for i in slots])
    times = []
    for r in range(reps):
        t0 = time.perf_counter()
        pool.forward(slots, [[prompts[i][32 + r % 8]] for i in slots])
        times.append(time.perf_counter() - t0)
        for s in slots:
            pool.rollback(s, 32)
    for s in slots:
        pool.clear(s)
    return 1e3 * statistics.median(times)


def int8_throughput(engine, prompts, variants: dict, args) -> dict:
    """`--batch` seeded adasd requests (temperature 1.0) at once, with each draft variant in turn."""
    def once(variant, p: int) -> tuple[float, float]:
        use(engine, variant)
        requests = [(prompts[(p * args.batch + i) % len(prompts)],
                     SamplingParams(max_tokens=args.tokens, temperature=1.0, seed=100 * p + i, ignore_eos=True),
                     SpecConfig(method="adasd", warm_start=True)) for i in range(args.batch)]
        seqs = [engine.new_sequence(*r) for r in requests]
        for s in seqs:
            engine.add(s)
        t0 = time.perf_counter()
        while not engine.idle:
            engine.step()
        elapsed = time.perf_counter() - t0
        drafted = sum(s.stats.drafted_tokens for s in seqs)
        accepted = sum(s.stats.accepted_standard + s.stats.accepted_relaxed for s in seqs)
        return sum(s.generated for s in seqs) / elapsed, accepted / max(drafted, 1)

    modes = list(variants)
    rows = {m: {"tok_s": [], "acceptance": []} for m in modes}
    for p in range(args.passes):
        for m in (modes if p % 2 == 0 else modes[::-1]):  # alternate which mode goes first
            tok_s, acc = once(variants[m], p)
            rows[m]["tok_s"].append(tok_s)
            rows[m]["acceptance"].append(acc)
    out = {"batch": args.batch, "tokens": args.tokens, "passes": args.passes, "threads": torch.get_num_threads()}
    for m in modes:
        use(engine, variants[m])
        out[m] = {"tok_s": statistics.median(rows[m]["tok_s"]), "acceptance": statistics.median(rows[m]["acceptance"]),
                  "draft_step_ms_batch_1": draft_step_ms(engine, prompts, 1),
                  f"draft_step_ms_batch_{args.batch}": draft_step_ms(engine, prompts, args.batch), "per_pass": rows[m]}
    if len(modes) == 2:
        a, b = modes
        out[f"ratio_{a}_over_{b}"] = statistics.median([x / y for x, y in zip(rows[a]["tok_s"], rows[b]["tok_s"])])
    return out


def same_answers(engine, prompts, variants: dict, epoch, args) -> dict:
    """Per draft variant, greedy and seeded probes: alone, then `--repeats` batches of mixed mates."""
    result = {m: {} for m in variants}
    for name, temperature in (("greedy", 0.0), ("seeded", 1.0)):
        acc = {m: {"requests": args.requests, "tokens": 0, "drafted": 0, "requests_that_differ": 0,
                   "first_difference_at": []} for m in variants}
        for i in range(args.requests):
            params = SamplingParams(max_tokens=args.tokens, temperature=temperature, seed=1000 + i, ignore_eos=True)
            mine = (prompts[i], params, SpecConfig(method="adasd", warm_start=True))
            for m, variant in variants.items():  # alternating, request by request
                use(engine, variant)
                alone = run(engine, [mine], epoch)[0]
                a = acc[m]
                a["drafted"] += engine.last_drafted
                a["tokens"] += len(alone)
                firsts = [next((k for k, (x, y) in enumerate(zip(alone, batched)) if x != y), len(alone))
                          for batched in (run(engine, [mine, *mixed_mates(prompts, i, r, args)], epoch)[0]
                                          for r in range(args.repeats)) if batched != alone]
                if firsts:
                    a["requests_that_differ"] += 1
                    a["first_difference_at"].append(min(firsts))
        for m in variants:
            result[m][name] = acc[m]
    return result


def load(args):
    if args.pair == "tiny":
        return load_pair("tiny", "tiny", device="cpu", dtype="float32")
    if args.pair == "smollm2":
        from adasd_core import smollm2

        return load_pair(str(smollm2.target_dir()), str(smollm2.draft_dir()), device="cpu", dtype="float32")
    if args.pair is None:
        from adasd_core.demo.build import BuildConfig, build

        args.pair = tempfile.mkdtemp(prefix="quick_pair_")
        build(Path(args.pair), BuildConfig.quick(), stages=("tokenizer", "target", "draft"), progress=False)
    return load_pair(str(Path(args.pair) / "target"), str(Path(args.pair) / "draft"), device="cpu", dtype="float32")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pair", default=None,
                    help="folder with target/ and draft/, tiny, or smollm2 (default: the quick pair)")
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1, help="batched runs of each probe, each with other mates")
    ap.add_argument("--int8", default="row", help="comma list of row, call: the int8 draft's forwards to compare")
    ap.add_argument("--batch-aware", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--throughput", nargs="?", const="plan", choices=("plan", "int8"), default=None)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--warm-requests", type=int, default=40)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    random.seed(0)
    pair = load(args)
    variants = int8_variants(pair, args.int8.split(","))
    engine = LLM(pair, max_running=args.batch, batch_aware=args.batch_aware, warm=WarmState(schedule=Schedule()))
    use(engine, next(iter(variants.values())))
    from adasd_core.bench.tasks import continuation_task, demo_sources

    task = continuation_task(pair.tokenizer, demo_sources(), args.requests + 16, 48, args.tokens, pair.context_length)
    prompts = [p.ids for p in task.prompts]
    # warm the server's state first, as a server that has served for a while
    warm_up = [(prompts[i % len(prompts)],
                SamplingParams(max_tokens=args.tokens, temperature=t, seed=i, ignore_eos=True),
                SpecConfig(method="adasd", warm_start=True))
               for i, t in enumerate([0.0, 1.0] * (args.warm_requests // 2))]
    for i in range(0, len(warm_up), args.batch):
        run(engine, warm_up[i : i + args.batch], None)
    epoch = engine.warm.epoch
    engine.warm.schedule = Schedule(first=10**9)  # one snapshot throughout: only the forwards can differ
    conditions = {"pair": args.pair, "threads": torch.get_num_threads(), "batch": args.batch, "tokens": args.tokens,
                  "batch_aware": args.batch_aware}
    if args.throughput:
        if args.throughput == "plan":
            result = plan_throughput(engine, prompts, args)
        else:
            assert len(variants) == 2, "--throughput int8 compares two forwards of an int8 draft: --int8 row,call"
            result = int8_throughput(engine, prompts, variants, args)
        result = {**conditions, **result, "plan": engine.warm.plan.summary()}
    else:
        result = {**conditions, "repeats": args.repeats, "epoch": epoch,
                  "published": {k: v.rounds for k, v in engine.warm.published.items()},
                  "max_logit_difference": {"target": logit_spread(engine.runner.target, prompts, args.batch)}}
        for m, variant in variants.items():
            use(engine, variant)
            result["max_logit_difference"][f"draft ({m})"] = logit_spread(engine.runner.draft, prompts, args.batch)
        result.update(same_answers(engine, prompts, variants, epoch, args))
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
