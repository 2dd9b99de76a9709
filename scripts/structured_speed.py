"""Greedy structured requests on the default pair: adasd against ar under the same JSON schema (tokens
must be equal for the lossless rows), tokens per second, forced tokens, and the grammar's host time
per token. In process (batch planning off), or through a running server with --server (its default
method against its `:ar` model, interleaved request by request, `--repeats` passes, medians):

    OMP_NUM_THREADS=1 python scripts/structured_speed.py
    python scripts/structured_speed.py --server http://127.0.0.1:8000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from adasd_core.engine import SpecConfig
from adasd_core.grammar import GrammarSpec
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


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A prompt as one user turn under the model's chat template, ready for generation."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def through_server(url: str, repeats: int) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=url.rstrip("/") + "/v1", api_key="none")
    model = client.models.list().data[0].id
    fmt = {"type": "json_schema", "json_schema": {"name": "profile", "schema": SCHEMA, "strict": True}}
    rates = {model: [], f"{model}:ar": []}
    texts = {name: {} for name in rates}
    for r in range(repeats):
        for prompt in PROMPTS:
            order = list(rates) if r % 2 == 0 else list(rates)[::-1]
            for name in order:
                t0 = time.perf_counter()
                out = client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}],
                                                     temperature=0, max_tokens=160, response_format=fmt)
                rates[name].append(out.usage.completion_tokens / (time.perf_counter() - t0))
                texts[name][prompt] = out.choices[0].message.content
                json.loads(out.choices[0].message.content)
    ar = statistics.median(rates[f"{model}:ar"])
    for name, tps in rates.items():
        print(f"{name:28s} {statistics.median(tps):7.1f} tok/s  x{statistics.median(tps) / ar:.2f} vs ar  "
              f"(per request {min(tps):.1f}-{max(tps):.1f})")
    print(f"same text as ar on every prompt: {texts[model] == texts[f'{model}:ar']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--server", help="a running server's base URL (default: in process)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.server:
        return through_server(args.server, args.repeats)
    llm = LLM(load_pair())
    grammar = GrammarSpec("json_schema", json.dumps(SCHEMA))
    rows = {}
    for method, verification in (("ar", "none"), ("vanilla", "none"), ("adasd", "none"), ("adasd", "bayes")):
        tps, forced, outs = [], [], []
        for prompt in PROMPTS:
            ids = prompt_ids(llm.pair.tokenizer, prompt)
            t0 = time.perf_counter()
            out = llm.generate(ids, SamplingParams(max_tokens=160, grammar=grammar),
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
    c = llm.grammars.constraint(SamplingParams(grammar=grammar))
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
