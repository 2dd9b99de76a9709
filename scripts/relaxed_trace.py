"""Traces of the relaxed check (issue 12): what each relaxed acceptance costs.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python scripts/relaxed_trace.py [--pair tiny|smollm2] [--prompts 12]
        [--seeds 3] [--tokens 96] [--temperature 1.0] [--methods vanilla,adasd-bayes,...] [--out trace.json]
        [--draft self] [--min-posterior 0.7,0.9,1]

Every request runs in process (LLM, calibrate=False), seeds 0..S-1 for every method,
on held-out prompts: continuation windows of the tiny pair's held-out modules, or for `smollm2` the
held-out chat and code requests (bench/prompts/smollm2_eval.jsonl, chat and code alternating). Per
method: mean excess surprisal per emitted token (-log p(x) - H(p), processed target distribution)
with its standard error over requests, mean target log-prob per token (temperature-1 softmax, as
`logprobs` reports it), acceptance, relaxed share; per relaxed acceptance: d, P(A|d), its round, the
group sizes and the token's excess surprisal.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys

import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

from adasd_core import postprocess, verification  # noqa: E402
from adasd_core.bench.tasks import chat_eval_prompts, chat_eval_rows, continuation_task, demo_sources  # noqa: E402
from adasd_core.engine import SpecConfig  # noqa: E402
from adasd_core.llm import LLM  # noqa: E402
from adasd_core.models import load_pair  # noqa: E402
from adasd_core.sampling import SamplingParams  # noqa: E402
from adasd_core.verification import entropy, js_distance  # noqa: E402

ROWS = {
    "ar": SpecConfig(method="ar"),
    "vanilla": SpecConfig(method="vanilla"),
    "gen-only": SpecConfig(method="gen-only"),
    "verify-only": SpecConfig(method="verify-only"),
    "adasd-bayes": SpecConfig(method="adasd"),
    "adasd-threshold": SpecConfig(method="adasd", verification="threshold"),
    "hybrid": SpecConfig(method="hybrid"),
}

EVENTS: list[dict] = []
_original = verification.accept_candidates


KNOBS: dict = {}


def _traced(candidates, target_probs, draft_probs, greedy, generator, relaxed, stable=False):
    """accept_candidates, plus one event per examined candidate (no effect on the draws)."""
    for name, value in KNOBS.items():  # experiment settings of the relaxed check
        if hasattr(relaxed, name):
            setattr(relaxed, name, value)
    state = {"n_a": getattr(relaxed, "n_accepted", None), "n_r": getattr(relaxed, "n_rejected", None),
             "kde_a": len(getattr(relaxed, "accepted", ()) or ()), "kde_r": len(getattr(relaxed, "rejected", ()) or ())}
    posts = None
    if candidates and relaxed.name != "none":
        d = js_distance(target_probs[: len(candidates)], draft_probs).tolist()
        posts = relaxed.accept_probability(d)
    v = _original(candidates, target_probs, draft_probs, greedy, generator, relaxed, stable)
    if candidates:
        k = len(candidates)
        idx = torch.tensor(candidates)[:, None]
        p_x = target_probs[:k].gather(-1, idx).squeeze(-1)
        q_x = draft_probs.gather(-1, idx).squeeze(-1)
        ex = (-torch.log(p_x.clamp_min(1e-30)) - entropy(target_probs[:k])).tolist()
        d = js_distance(target_probs[:k], draft_probs).tolist()
        for i, std in enumerate(v.standard):
            EVENTS.append({"pos": i, "d": d[i], "std": std, "kept": i < v.n_accepted, "p": float(p_x[i]),
                           "q": float(q_x[i]), "excess": ex[i], "post": None if posts is None else posts[i], **state})
    return v


def _traced_batch(candidates, target_probs, draft_probs, greedy, generators, relaxed, stable=None):
    """accept_batch for the one request a row runs at a time, through _traced."""
    assert len(candidates) == 1, "relaxed_trace runs one request at a time"
    return [_traced(candidates[0], target_probs, draft_probs, greedy[0], generators[0], relaxed[0],
                    bool(stable and stable[0]))]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pair", default="tiny", choices=("tiny", "smollm2"))
    ap.add_argument("--draft", default=None, help="the draft (default: the pair's own; e.g. self)")
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--methods", default=",".join(ROWS))
    ap.add_argument("--out", default=None)
    ap.add_argument("--cold", action="store_true", help="warm_start=False: every request starts empty")
    ap.add_argument("--min-posterior", default=None,
                    help="comma-separated settings: one row per method and setting (e.g. 0.7,0.9,1.0)")
    ap.add_argument("--tv-position", type=float, default=None)
    args = ap.parse_args(argv)
    if args.tv_position is not None:
        KNOBS["position"] = args.tv_position
    settings = [None] if args.min_posterior is None else [float(x) for x in args.min_posterior.split(",")]

    postprocess.accept_batch = _traced_batch
    pair = load_pair(args.pair, args.draft or args.pair, device="cpu")
    if args.pair == "tiny":
        prompts = [p.ids for p in continuation_task(pair.tokenizer, demo_sources(), args.prompts, 128, args.tokens,
                                                    pair.context_length).prompts]
        kinds = ["window"] * len(prompts)
    else:
        rows = chat_eval_rows(args.prompts)
        prompts = [pair.tokenizer(t, add_special_tokens=False)["input_ids"]
                   for t in chat_eval_prompts(pair.tokenizer, args.prompts)]
        kinds = [r["kind"] for r in rows]
    results, reference = {}, None
    for key in args.methods.split(","):
        for setting in (settings if "adasd" in key or key in ("verify-only", "hybrid") else [None]):
            name = key if setting is None else f"{key}@{setting:g}"
            if setting is not None:
                KNOBS["min_posterior"] = setting
            else:
                KNOBS.pop("min_posterior", None)
            results[name] = _run_row(name, pair, ROWS[key], args, prompts, kinds, reference)
            if reference is None:
                reference = results[name]["_ids"]
    for row in results.values():
        row.pop("_ids")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f)


def _mean_se(xs):
    return statistics.fmean(xs), (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0)


def _run_row(name, pair, spec, args, prompts, kinds, reference):
    """One row: every prompt x seed on a fresh engine (its own warm state), so rows don't feed each other."""
    engine = LLM(pair, calibrate=False)
    spec = dataclasses.replace(spec, warm_start=not args.cold)
    per_req, events_all, ids = [], [], []
    for seed in range(args.seeds):
        for i, prompt in enumerate(prompts):
            EVENTS.clear()
            params = SamplingParams(max_tokens=args.tokens, temperature=args.temperature, seed=1000 * seed + i,
                                    ignore_eos=True, logprobs=0)
            res = engine.generate(prompt, params, spec)
            s = res.stats
            lp = [t.logprob for t in res.logprobs]
            ids.append(list(res.token_ids))
            per_req.append({"kind": kinds[i], "excess": s.excess_surprisal, "logprob": sum(lp) / len(lp),
                            "n": s.surprisal_count, "drafted": s.drafted_tokens, "relaxed": s.accepted_relaxed,
                            "std": s.accepted_standard, "rounds": s.rounds, "tokens": len(res.token_ids)})
            for e in EVENTS:
                e["request"] = len(per_req) - 1
            events_all += list(EVENTS)
    row = _summary(per_req, events_all)
    for kind in sorted(set(kinds)):
        sub = [r for r in per_req if r["kind"] == kind]
        if len(set(kinds)) > 1:
            row[kind] = _summary(sub, [e for e in events_all if per_req[e["request"]]["kind"] == kind])
    if reference is not None:  # greedy rows: how much of the first row's text each request reproduces
        same = [_common_prefix(a, b) / max(1, len(b)) for a, b in zip(ids, reference)]
        row["prefix_match_vs_first_row"] = statistics.fmean(same)
        row["identical_vs_first_row"] = sum(1 for a, b in zip(ids, reference) if a == b) / len(ids)
    print(json.dumps({"row": name, **{k: _round(v) for k, v in row.items()}}), flush=True)
    if args.out:
        row["events"] = events_all
    row["_ids"] = ids
    return row


def _round(v):
    if isinstance(v, float):
        return round(v, 4)
    if isinstance(v, dict):
        return {k: _round(x) for k, x in v.items()}
    return v


def _common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _summary(per_req, events_all):
    ex_m, ex_se = _mean_se([r["excess"] for r in per_req])
    lp_m, lp_se = _mean_se([r["logprob"] for r in per_req])
    drafted = sum(r["drafted"] for r in per_req)
    relaxed = [e for e in events_all if e["kept"] and not e["std"]]
    fails = [e for e in events_all if not e["std"]]
    rounds = sum(r["rounds"] for r in per_req)
    row = {"requests": len(per_req), "tokens": sum(r["n"] for r in per_req), "excess": ex_m, "excess_se": ex_se,
           "logprob": lp_m, "logprob_se": lp_se, "drafted": drafted,
           "std_accepted": sum(r["std"] for r in per_req), "relaxed_accepted": len(relaxed),
           "failed": len(fails), "rounds": rounds,
           "tokens_per_forward": sum(r["tokens"] for r in per_req) / max(1, rounds),
           "relaxed_share_of_drafted": len(relaxed) / drafted if drafted else None,
           "relaxed_share_of_failures": len(relaxed) / len(fails) if fails else None,
           "cand_per_round": drafted / max(1, rounds)}
    if relaxed:
        row["relaxed_excess_mean"] = statistics.fmean(e["excess"] for e in relaxed)
        row["relaxed_post_mean"] = statistics.fmean(e["post"] for e in relaxed)
        row["relaxed_d_mean"] = statistics.fmean(e["d"] for e in relaxed)
        row["relaxed_with_kde_le_10"] = sum(1 for e in relaxed if min(e["kde_a"], e["kde_r"]) <= 10) / len(relaxed)
        row["fail_d_mean"] = statistics.fmean(e["d"] for e in fails)
        acc = [e for e in events_all if e["std"]]
        row["std_d_mean"] = statistics.fmean(e["d"] for e in acc) if acc else None
        row["fail_post_mean"] = statistics.fmean((e["post"] or 0.0) for e in fails)
    return row


if __name__ == "__main__":
    sys.exit(main())
