"""Greedy structured requests on the default pair, in process: adasd against ar under the same JSON
schema (tokens must be equal for the lossless rows), tokens per second, forced tokens, and the
grammar's host time per token. Run on 1 thread:

    OMP_NUM_THREADS=1 python scripts/structured_speed.py
"""

from __future__ import annotations

import json
import statistics
import time

from adasd_core.engine import SpecConfig
from adasd_core.grammar import Constraint, GrammarSpec
from adasd_core.llm import LLM
from adasd_core.models import load_pair
from adasd_core.sampling import SamplingParams

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "occupation": {"type": "string", "maxLength": 24}, "hobbies": {"type": "array", "items": {"type": "string",
                                                                                               "maxLength": 16},
                                                                      "maxItems": 3},
    "city": {"type": "string", "maxLength": 20}},
    "required": ["name", "age", "occupation", "hobbies", "city"], "additionalProperties": False}
PROMPTS = ["Describe a fictional engineer as JSON.", "Give me a JSON profile of a painter from Lyon.",
           "Create a JSON record for a retired teacher."]


def main() -> None:
    llm = LLM(load_pair())
    grammar = GrammarSpec("json_schema", json.dumps(SCHEMA))
    rows = {}
    for method, verification in (("ar", "none"), ("vanilla", "none"), ("adasd", "none"), ("adasd", "bayes")):
        tps, forced, outs = [], [], []
        for prompt in PROMPTS:
            tok = llm.pair.tokenizer
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            t0 = time.perf_counter()
            out = llm.generate(list(ids), SamplingParams(max_tokens=160, grammar=grammar),
                               SpecConfig(method=method, verification=verification))
            tps.append(len(out.token_ids) / (time.perf_counter() - t0))
            forced.append(out.stats.forced_tokens / max(1, len(out.token_ids)))
            outs.append(out.token_ids)
            json.loads(out.text)
        rows[f"{method}/{verification}"] = (statistics.median(tps), statistics.median(forced), outs)
    ar = rows["ar/none"]
    for name, (tps, forced, outs) in rows.items():
        print(f"{name:14s} {tps:7.1f} tok/s  x{tps / ar[0]:.2f} vs ar  forced {forced:.0%}  "
              f"same tokens as ar: {outs == ar[2]}")
    # the grammar's host time per token (mask + consume), over one output
    c = Constraint(llm._ll_tokenizer, grammar, llm.pair.vocab_size)
    times = []
    for t in ar[2][0]:
        t0 = time.perf_counter()
        c.mask()
        c.consume(t)
        times.append(time.perf_counter() - t0)
    print(f"grammar host time per token: median {statistics.median(times) * 1e3:.3f} ms; "
          f"target step {llm.target_step_s * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
