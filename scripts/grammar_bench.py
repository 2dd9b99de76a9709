"""Grammar libraries at the default pair's vocabulary: compile time, mask time per token, rollback.

Feeds the tokens of valid JSON instances of a few schemas through each library's matcher and times
the mask computed before every token (the work a constrained step adds). Run on 1 thread:

    OMP_NUM_THREADS=1 python scripts/grammar_bench.py [--xgrammar-path DIR]

xgrammar is measured only where it imports (it is not a dependency).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

SCHEMAS = {
    "person": ({"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string",
                                                     "pattern": "^[0-9]{5}$"}}, "required": ["city", "zip"]}},
        "required": ["name", "age", "tags", "address"], "additionalProperties": False},
        {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org", "tags": ["math", "engines", "poetry"],
         "address": {"city": "London", "zip": "12345"}}),
    "enum-list": ({"type": "object", "properties": {
        "items": {"type": "array", "items": {"type": "object", "properties": {
            "kind": {"enum": ["fruit", "vegetable", "grain"]}, "count": {"type": "integer"},
            "price": {"type": "number"}}, "required": ["kind", "count", "price"]}}},
        "required": ["items"]},
        {"items": [{"kind": "fruit", "count": 3, "price": 1.25}, {"kind": "grain", "count": 10, "price": 0.5},
                   {"kind": "vegetable", "count": 7, "price": 2.0}]}),
}


def median_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


def bench_llguidance(hf_tok, vocab: int) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    t0 = time.perf_counter()
    tok = llguidance.hf.from_tokenizer(hf_tok, n_vocab=vocab)
    out = {"tokenizer_s": time.perf_counter() - t0, "schemas": {}}
    mask = llguidance.torch.allocate_token_bitmask(1, vocab)
    for name, (schema, instance) in SCHEMAS.items():
        ids = hf_tok(json.dumps(instance), add_special_tokens=False)["input_ids"]
        t0 = time.perf_counter()
        m = llguidance.LLMatcher(tok, llguidance.LLMatcher.grammar_from_json_schema(schema), log_level=0)
        compile_s = time.perf_counter() - t0
        times = []
        for t in ids:
            t0 = time.perf_counter()
            llguidance.torch.fill_next_token_bitmask(m, mask)
            times.append(time.perf_counter() - t0)
            assert m.consume_token(t), m.get_error()
        t0 = time.perf_counter()
        assert m.rollback(len(ids) // 2)
        rollback_s = time.perf_counter() - t0
        out["schemas"][name] = {"tokens": len(ids), "compile_ms": compile_s * 1e3, "mask_ms_median": median_ms(times),
                                "mask_ms_max": max(times) * 1e3, "rollback_ms": rollback_s * 1e3}
    return out


def bench_xgrammar(hf_tok, vocab: int) -> dict:
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(hf_tok, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    out = {"tokenizer_s": time.perf_counter() - t0, "schemas": {}}
    mask = xgr.allocate_token_bitmask(1, vocab)
    for name, (schema, instance) in SCHEMAS.items():
        ids = hf_tok(json.dumps(instance), add_special_tokens=False)["input_ids"]
        t0 = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(schema))
        compile_s = time.perf_counter() - t0
        m = xgr.GrammarMatcher(compiled, max_rollback_tokens=64)
        times = []
        for t in ids:
            t0 = time.perf_counter()
            m.fill_next_token_bitmask(mask)
            times.append(time.perf_counter() - t0)
            assert m.accept_token(t), (name, t)
        t0 = time.perf_counter()
        m.rollback(len(ids) // 2)
        rollback_s = time.perf_counter() - t0
        out["schemas"][name] = {"tokens": len(ids), "compile_ms": compile_s * 1e3, "mask_ms_median": median_ms(times),
                                "mask_ms_max": max(times) * 1e3, "rollback_ms": rollback_s * 1e3}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default=str(Path.home() / ".cache/adasd/smollm2-135m-instruct"))
    ap.add_argument("--xgrammar-path", default=None, help="a folder holding xgrammar (pip install --target)")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(args.tokenizer)
    vocab = len(hf_tok)
    result = {"vocab": vocab, "llguidance": bench_llguidance(hf_tok, vocab)}
    if args.xgrammar_path:
        sys.path.insert(0, args.xgrammar_path)
    try:
        result["xgrammar"] = bench_xgrammar(hf_tok, vocab)
    except ImportError as exc:
        result["xgrammar"] = f"not measured: {exc}"
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
