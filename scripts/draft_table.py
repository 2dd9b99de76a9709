"""The table of drafts for the default target: each draft's step cost share c (its single-token step over
the target's, interleaved medians), and greedy vanilla K=5 on held-out chat and code prompts of
adasd_core/bench/prompts/smollm2_eval.jsonl: accepted per drafted token, by draft position, and tokens
per target forward.

    python scripts/draft_table.py                       # the distilled draft and the EAGLE-3 head
    python scripts/draft_table.py --drafts smollm2-eagle3 --prompts 8 --tokens 64 --json out.json

Run it alone on the machine (one CPU-heavy job at a time).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch


def step_shares(pairs: dict, repeats: int) -> dict[str, float]:
    from adasd_core.costs import decode_step_seconds

    first = next(iter(pairs.values()))
    times: dict[str, list[float]] = {"target": [], **{n: [] for n in pairs}}
    for _ in range(repeats):  # interleaved, so a burst of load falls on all alike
        times["target"].append(decode_step_seconds(first.target, first))
        for name, pair in pairs.items():
            times[name].append(decode_step_seconds(pair.draft, pair))
    target = statistics.median(times["target"])
    return {"target_ms": round(target * 1e3, 2),
            **{n: {"step_ms": round(statistics.median(v) * 1e3, 2), "c": round(statistics.median(v) / target, 3)}
               for n, v in times.items() if n != "target"}}


def acceptance(pair, n_prompts: int, tokens: int, k: int) -> dict:
    from adasd_core.bench.tasks import chat_eval_prompts, chat_eval_rows
    from adasd_core.engine import SpecConfig
    from adasd_core.llm import LLM
    from adasd_core.sampling import SamplingParams

    rows = chat_eval_rows(n_prompts)
    prompts = [pair.tokenizer(t, add_special_tokens=False)["input_ids"]
               for t in chat_eval_prompts(pair.tokenizer, n_prompts)]
    engine = LLM(pair, calibrate=False, max_running=1)
    out: dict[str, dict] = {}
    for row, prompt in zip(rows, prompts):
        res = engine.generate(prompt, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True),
                              SpecConfig(method="vanilla", k=k))
        s = res.stats
        agg = out.setdefault(row["kind"], {"accepted": 0, "drafted": 0, "tokens": 0, "rounds": 0,
                                           "by_position": [[0, 0] for _ in range(k)]})
        agg["accepted"] += s.accepted_standard
        agg["drafted"] += s.drafted_tokens
        agg["tokens"] += len(res.token_ids)
        agg["rounds"] += s.rounds
        for i, (a, d) in enumerate(zip(s.accepted_by_position, s.drafted_by_position)):
            agg["by_position"][i][0] += a
            agg["by_position"][i][1] += d
    return {kind: {"accepted_per_drafted": round(a["accepted"] / max(a["drafted"], 1), 3),
                   "tokens_per_forward": round(a["tokens"] / max(a["rounds"], 1), 3),
                   # of the candidates drafted at position i (the chain reached it), the share accepted
                   "accepted_by_position": [round(x / max(d, 1), 3) for x, d in a["by_position"]]}
            for kind, a in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drafts", default="smollm2,smollm2-eagle3")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    from adasd_core.models import load_pair

    pairs = {name: load_pair("smollm2", name, device="cpu", max_model_len=1024) for name in args.drafts.split(",")}
    steps = step_shares(pairs, args.repeats)
    print(json.dumps(steps), flush=True)
    result = {"steps": steps,
              "acceptance": {name: acceptance(pair, args.prompts, args.tokens, args.k) for name, pair in pairs.items()},
              "setup": {"prompts": args.prompts, "tokens": args.tokens, "k": args.k,
                        "threads": torch.get_num_threads()}}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
