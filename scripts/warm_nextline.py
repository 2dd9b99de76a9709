"""Warm start on short requests, with and without published snapshots (issues 12 and 15).

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python scripts/warm_nextline.py [--prompts 100] [--passes 3]
        [--temperature 0] [--out result.json]

In process on the embedded tiny pair, the next-line task of `adasd bench` (held-out lines, up to 32
tokens, stop at the line break). Rows, interleaved prompt by prompt in every pass:
- vanilla: vanilla SD (K=5), the reference;
- adasd cold: `warm_start: false`, every request starts empty;
- adasd warm (live): every request starts from the live statistics of all earlier ones (issue 12);
- adasd warm (snapshot): every request starts from the last published snapshot, the server's way
  (adasd_core.warm.Schedule's defaults: first at 32 rounds, doubling, frozen at 4096).
The two warm engines first serve one untimed pass (a server that has served a little). Per pass:
tokens / seconds of each row over all prompts and its ratio to vanilla; the table gives the medians
over passes, with candidates per round and the snapshot's rounds at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from adasd_core.bench.tasks import demo_sources, next_line_task
from adasd_core.engine import SpecConfig
from adasd_core.llm import LLM
from adasd_core.models import load_pair
from adasd_core.sampling import SamplingParams
from adasd_core.warm import Schedule, WarmState


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="tiny")
    ap.add_argument("--draft", default="tiny")
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    pair = load_pair(args.target, args.draft, device="cpu")
    task = next_line_task(pair.tokenizer, demo_sources(), args.prompts, 192, 32, pair.context_length)
    cold = LLM(pair, calibrate=False, max_running=1)
    live = LLM(pair, calibrate=False, max_running=1)
    snap = LLM(pair, calibrate=False, max_running=1, warm=WarmState(schedule=Schedule()))
    publications = []  # how the snapshot settles from one publication to the next
    publish = snap.warm.publish_due

    def traced_publish():
        for family in publish():
            s = snap.warm.published[family].stats
            post = {}
            if hasattr(s.relaxed, "posterior"):
                post = {f"P(A|{d})": s.relaxed.posterior(d) for d in (0.2, 0.4, 0.6)}
            publications.append({"family": family, "rounds": s.rounds, "entropy_threshold": s.entropy_threshold,
                                 "acceptance": s.acceptance, **s.relaxed.state(), **post})
        return []

    snap.warm.publish_due = traced_publish
    rows = {
        "vanilla": (cold, SpecConfig(method="vanilla")),
        "adasd cold": (cold, SpecConfig(method="adasd", warm_start=False)),
        "adasd warm (live)": (live, SpecConfig(method="adasd", warm_start=True)),
        "adasd warm (snapshot)": (snap, SpecConfig(method="adasd", warm_start=True)),
    }

    def params(i: int, p: int) -> SamplingParams:
        return SamplingParams(max_tokens=task.max_tokens, temperature=args.temperature, seed=1000 * p + i,
                              stop=list(task.stop), ignore_eos=task.ignore_eos)

    for i, prompt in enumerate(task.prompts):  # untimed: the warm engines serve a little first
        for name in ("adasd warm (live)", "adasd warm (snapshot)"):
            engine, spec = rows[name]
            engine.generate(prompt.ids, params(i, -1), spec)
    passes = []
    for p in range(args.passes):
        acc = {name: {"tokens": 0, "seconds": 0.0, "rounds": 0, "drafted": 0} for name in rows}
        for i, prompt in enumerate(task.prompts):
            for name, (engine, spec) in rows.items():
                t0 = time.perf_counter()
                res = engine.generate(prompt.ids, params(i, p), spec)
                a = acc[name]
                a["seconds"] += time.perf_counter() - t0
                a["tokens"] += len(res.token_ids)
                a["rounds"] += res.stats.rounds
                a["drafted"] += res.stats.drafted_tokens
        ref = acc["vanilla"]["tokens"] / acc["vanilla"]["seconds"]
        for a in acc.values():
            a["tok_s"] = a["tokens"] / a["seconds"]
            a["vs_vanilla"] = a["tok_s"] / ref
        passes.append(acc)
        print(f"pass {p}: " + ", ".join(f"{n} {a['vs_vanilla']:.3f}x" for n, a in acc.items()), flush=True)

    table = {}
    for name in rows:
        table[name] = {
            "tok_s": statistics.median(ps[name]["tok_s"] for ps in passes),
            "vs_vanilla": statistics.median(ps[name]["vs_vanilla"] for ps in passes),
            "candidates_per_round": statistics.median(ps[name]["drafted"] / ps[name]["rounds"] for ps in passes),
        }
    result = {"prompts": len(task.prompts), "passes": args.passes, "temperature": args.temperature, "rows": table,
              "published": {k: v.rounds for k, v in snap.warm.published.items()}, "publications": publications,
              "per_pass": passes}
    print("| row | tok/s | vs vanilla | candidates / round |\n|---|---:|---:|---:|")
    for name, r in table.items():
        print(f"| {name} | {r['tok_s']:.1f} | {r['vs_vanilla']:.3f}x | {r['candidates_per_round']:.2f} |")
    print("| snapshot at rounds | T_G | acceptance | KDE sizes | P(A|0.2) | P(A|0.4) | P(A|0.6) |\n"
          "|---:|---:|---:|---|---:|---:|---:|")
    f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    for e in publications:
        print(f"| {e['rounds']} | {f(e['entropy_threshold'])} | {f(e['acceptance'])} | {e.get('kde_accepted')} / "
              f"{e.get('kde_rejected')} | {f(e.get('P(A|0.2)'))} | {f(e.get('P(A|0.4)'))} | {f(e.get('P(A|0.6)'))} |")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
