"""Where a structured round's time goes: greedy schema requests in process on the default pair (the
batch plan on, as the server runs), each phase of the round timed by wrapping the function that does it,
per round and per call. The forwards against the host work around them (llguidance's masks, the masked
probabilities, acceptance):

    python scripts/structured_rounds.py --method adasd
    python scripts/structured_rounds.py --method ar
"""

from __future__ import annotations

import argparse
import collections
import json
import time

import torch
from structured_speed import PROMPTS, SCHEMA, prompt_ids

from adasd_core import engine, proposer, runner
from adasd_core.engine import SpecConfig
from adasd_core.grammar import Constraint, GrammarSpec
from adasd_core.llm import LLM
from adasd_core.models import load_pair
from adasd_core.sampling import SamplingParams

PHASES = [(engine.SpeculativeEngine, "_round_batch", "round"), (runner.ModelRunner, "verify", "target verify"),
          (proposer.DraftModelProposer, "propose", "drafting (all)"),
          (runner.ModelRunner, "draft_step", "draft forward"),
          (engine, "finish_batch", "acceptance"), (engine, "verified_logits", "verified rows masked"),
          (engine, "jump_forward", "jump-forward"), (engine, "logits_to_probs_rows", "target probabilities"),
          (proposer, "process_logits", "draft rows masked"), (proposer, "logits_to_probs_rows", "draft probabilities"),
          (proposer, "sample_rows", "draft sampling"), (Constraint, "mask", "llguidance mask"),
          (Constraint, "consume", "llguidance consume"), (Constraint, "forced", "forced-token check")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="adasd")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes over the prompts, after one untimed")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spent, calls = collections.defaultdict(float), collections.Counter()
    for owner, name, label in PHASES:
        def timed(*a, _f=getattr(owner, name), _label=label, **k):
            t = time.perf_counter()
            try:
                return _f(*a, **k)
            finally:
                spent[_label] += time.perf_counter() - t
                calls[_label] += 1
        setattr(owner, name, timed)
    llm = LLM(load_pair(), batch_aware=True)
    tok = llm.pair.tokenizer
    grammar = GrammarSpec("json_schema", json.dumps(SCHEMA))
    for rep in range(args.repeats + 1):
        if rep == 1:
            spent.clear()
            calls.clear()
        for prompt in PROMPTS:
            llm.generate(prompt_ids(tok, prompt), SamplingParams(max_tokens=160, grammar=grammar),
                         SpecConfig(method=args.method))
    rounds = calls["round"]
    print(f"{args.method}: {rounds} rounds, {spent['round'] / rounds * 1e3:.2f} ms a round")
    for label in sorted(spent, key=lambda k: -spent[k]):
        print(f"  {label:22s} {calls[label] / rounds:5.2f} calls a round  {spent[label] / rounds * 1e3:7.3f} ms a round"
              f"  {spent[label] / calls[label] * 1e6:8.1f} us a call")


if __name__ == "__main__":
    main()
