"""How often batch mates change a reproducible request's tokens through floating-point rounding (issue 15).

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python scripts/batch_invariance.py [--pair DIR] [--requests 60]
        [--tokens 32] [--batch 4] [--no-batch-aware] [--out result.json]
    ... --throughput [--pair tiny] [--batch 16] [--passes 3]

In process, on a pair folder with target/ and draft/ (default: the quick pair, built in seconds),
with the server's settings (batch-aware cap, published warm-start snapshots): every probe request
(greedy adasd, and seeded adasd at temperature 1.0) runs alone, then again in a batch with `--batch - 1`
mates of other methods and temperatures, from the same snapshot. `--no-batch-aware` drafts as the paper
does (on the quick pair the cap finds that drafting never pays, so the probes would not draft at
all). Nothing but rounding differs between the two runs (the plan, the start state and the random
draws are the same by construction), so every difference is a rounding effect: a batched matmul that
sums in another order, a near tie that flips. Prints the requests and tokens that differ and, for
scale, the largest logit difference between a batched and a lone target forward.

`--throughput` measures the price instead: `--batch` greedy adasd requests at once, planned alone
(reproducible, the server's way) or by their batch size (the cap's plan before issue 15), alternated
over `--passes`; tokens per second of each and their ratio, medians over passes.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import torch

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


def logit_spread(engine, prompts, batch: int) -> dict:
    """Largest |batched - alone| over the target's logits: of a 4-token verify run with ragged batch
    mates, and of one decode step after a prompt prefilled with the mates' prompts in the same forward."""
    pool, verify, prefill = engine.runner.target, 0.0, 0.0
    slots = list(range(batch))
    for p in prompts[: 8]:
        feeds = [p[:-4]] + [q[:-4] for q in random.sample(prompts, batch - 1)]
        pool.forward(slots, feeds)
        alone = pool.forward([0], [p[-4:]], all_logits=True).clone()
        pool.rollback(0, len(feeds[0]))
        mates = [list(range(1, 2 + i % 4)) for i in range(batch - 1)]  # ragged, as in a round
        together = pool.forward(slots, [p[-4:]] + mates, all_logits=True)[:4]
        verify = max(verify, float((together - alone).abs().max()))
        for s in slots:
            pool.clear(s)
        pool.forward([0], [feeds[0]])
        alone = pool.forward([0], [p[-4:-3]]).clone()
        pool.clear(0)
        pool.forward(slots, feeds)
        together = pool.forward([0], [p[-4:-3]])
        prefill = max(prefill, float((together - alone).abs().max()))
        for s in slots:
            pool.clear(s)
    return {"verify": verify, "prefill": prefill}


def throughput(engine, prompts, args) -> dict:
    import statistics
    import time

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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pair", default=None, help="folder with target/ and draft/ (default: build the quick pair)")
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--batch-aware", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--throughput", action="store_true")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    random.seed(0)
    if args.pair == "tiny":
        pair = load_pair("tiny", "tiny", device="cpu", dtype="float32")
    elif args.pair is None:
        from adasd_core.demo.build import BuildConfig, build

        args.pair = tempfile.mkdtemp(prefix="quick_pair_")
        build(Path(args.pair), BuildConfig.quick(), stages=("tokenizer", "target", "draft"), progress=False)
    if args.pair != "tiny":
        pair = load_pair(str(Path(args.pair) / "target"), str(Path(args.pair) / "draft"), device="cpu",
                         dtype="float32")
    engine = LLM(pair, max_running=args.batch, batch_aware=args.batch_aware, warm=WarmState(schedule=Schedule()))
    from adasd_core.bench.tasks import continuation_task, demo_sources

    task = continuation_task(pair.tokenizer, demo_sources(), args.requests + 16, 48, args.tokens, pair.context_length)
    prompts = [p.ids for p in task.prompts]
    # warm the server's state first, as a server that has served for a while
    warm_up = [(prompts[i % len(prompts)],
                SamplingParams(max_tokens=args.tokens, temperature=t, seed=i, ignore_eos=True),
                SpecConfig(method="adasd", warm_start=True))
               for i, t in enumerate([0.0, 1.0] * 20)]
    for i in range(0, len(warm_up), args.batch):
        run(engine, warm_up[i : i + args.batch], None)
    epoch = engine.warm.epoch
    engine.warm.schedule = Schedule(first=10**9)  # one snapshot throughout: only rounding can differ
    if args.throughput:
        result = throughput(engine, prompts, args)
        result["plan"] = engine.warm.plan.summary()
        print(json.dumps(result, indent=1))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
        return

    result = {"pair": args.pair, "batch": args.batch, "batch_aware": args.batch_aware, "tokens": args.tokens,
              "epoch": epoch, "published": {k: v.rounds for k, v in engine.warm.published.items()},
              "max_logit_difference": logit_spread(engine, prompts, args.batch)}
    for name, temperature in (("greedy", 0.0), ("seeded", 1.0)):
        differ, tokens, first_diff, drafted = 0, 0, [], 0
        for i in range(args.requests):
            params = SamplingParams(max_tokens=args.tokens, temperature=temperature, seed=1000 + i, ignore_eos=True)
            mine = (prompts[i], params, SpecConfig(method="adasd", warm_start=True))
            alone = run(engine, [mine], epoch)[0]
            drafted += engine.last_drafted
            mates = [(prompts[(i + 7 * j) % len(prompts)],
                      SamplingParams(max_tokens=args.tokens // 2 + 5 * j, temperature=(0.0, 0.7, 1.0)[(i + j) % 3],
                                     seed=None if j % 2 else j, ignore_eos=True),
                      SpecConfig(method=METHODS[(i + j) % len(METHODS)], warm_start=True))
                     for j in range(1, args.batch)]
            batched = run(engine, [mine, *mates], epoch)[0]
            tokens += len(alone)
            if batched != alone:
                differ += 1
                first_diff.append(next(k for k, (a, b) in enumerate(zip(alone, batched)) if a != b))
        result[name] = {"requests": args.requests, "tokens": tokens, "drafted": drafted, "requests_that_differ": differ,
                        "first_difference_at": first_diff}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
