"""Task accuracy of the default pair's methods on the held-out chat and code prompts.

    PYTHONPATH=$PWD OMP_NUM_THREADS=2 python scripts/task_accuracy.py [--methods ar,vanilla,adasd]
        [--min-posterior 0.7,0.9] [--temperature 0] [--seeds 1] [--max-tokens 192] [--out acc.json] [--draft self]

In process (LLM, warm start as the server has it), every prompt of bench/prompts/smollm2_eval.jsonl
with a checkable answer, in the chat template, stopped at EOS: chat rows score 1 when one of their
answers appears in the reply, code rows when the function passes its tests (a subprocess). `adasd`
rows run once per `--min-posterior` setting. Prints one JSON line per row: accuracy (chat, code,
all) and the rows whose verdict differs from the first row's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

from adasd_core import postprocess  # noqa: E402
from adasd_core.bench.evals import score_chat_eval  # noqa: E402
from adasd_core.bench.tasks import chat_eval_prompts, chat_eval_rows  # noqa: E402
from adasd_core.engine import SpecConfig  # noqa: E402
from adasd_core.llm import LLM  # noqa: E402
from adasd_core.models import load_pair  # noqa: E402
from adasd_core.sampling import SamplingParams  # noqa: E402
from adasd_core.verification import BayesCheck  # noqa: E402

SETTING: dict = {}
_accept = postprocess.accept_batch


def _accept_at_setting(candidates, target_probs, draft_probs, greedy, generators, relaxed, stable=None):
    """accept_batch with the row's min_posterior on each request's relaxed check."""
    for check in relaxed:
        if "min_posterior" in SETTING and hasattr(check, "min_posterior"):
            check.min_posterior = SETTING["min_posterior"]
    return _accept(candidates, target_probs, draft_probs, greedy, generators, relaxed, stable)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="ar,vanilla,adasd")
    ap.add_argument("--min-posterior", default=str(BayesCheck.min_posterior))
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=192)
    ap.add_argument("--prompts", type=int, default=0, help="the first N checkable prompts only (0: all)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--draft", default="smollm2", help="the default target's draft (e.g. self)")
    args = ap.parse_args(argv)
    pair = load_pair("smollm2", args.draft, device="cpu")
    # the rows with a checkable answer (short factual answers, functions with tests)
    pairs = [(r, t) for r, t in zip(chat_eval_rows(), chat_eval_prompts(pair.tokenizer))
             if "answers" in r or "tests" in r][: args.prompts or None]
    rows = [r for r, _ in pairs]
    prompts = [pair.tokenizer(t, add_special_tokens=False)["input_ids"] for _, t in pairs]
    postprocess.accept_batch = _accept_at_setting
    results, first = {}, None
    for method in args.methods.split(","):
        settings = [float(x) for x in args.min_posterior.split(",")] if method == "adasd" else [None]
        for setting in settings:
            name = method if setting is None else f"adasd@{setting:g}"
            SETTING.clear()
            if setting is not None:
                SETTING["min_posterior"] = setting
            engine = LLM(pair, calibrate=False)  # its own warm state per row
            spec = SpecConfig(method=method, warm_start=True)
            scores, texts = [], []
            for seed in range(args.seeds):
                for i, (row, prompt) in enumerate(zip(rows, prompts)):
                    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                            seed=None if args.temperature == 0 else 1000 * seed + i)
                    text = engine.generate(prompt, params, spec).text
                    texts.append(text)
                    scores.append(score_chat_eval(row, text))
            kinds = [r["kind"] for r in rows] * args.seeds
            acc = {k: sum(s for s, kk in zip(scores, kinds) if kk == k) / kinds.count(k) for k in ("chat", "code")}
            out = {"row": name, "accuracy": sum(scores) / len(scores), **{f"{k}_accuracy": v for k, v in acc.items()},
                   "n": len(scores)}
            if first is None:
                first = (scores, texts)
            else:
                out["verdicts_differ"] = sum(a != b for a, b in zip(scores, first[0]))
                out["texts_differ"] = sum(a != b for a, b in zip(texts, first[1]))
            print(json.dumps(out), flush=True)
            results[name] = {**out, "scores": scores, "texts": texts}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
