"""KV memory in use with 16 requests of 512 tokens each running together, against the reservation of one
whole slot per request (what the pool held before it was paged), and the process's resident memory.

    python scripts/kv_memory.py --requests 16 --total-tokens 512
"""

from __future__ import annotations

import argparse
import json

import torch

from adasd_core.engine import SpecConfig
from adasd_core.kv_cache import kv_bytes_per_slot
from adasd_core.llm import LLM
from adasd_core.models import load_pair
from adasd_core.sampling import SamplingParams


def resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--total-tokens", type=int, default=512)
    ap.add_argument("--method", default="adasd")
    args = ap.parse_args()
    torch.set_num_threads(2)
    pair = load_pair("smollm2", "smollm2", device="cpu")
    engine = LLM(pair, calibrate=False, max_running=args.requests)
    idle = resident()
    with open("adasd_core/bench/prompts/smollm2_eval.jsonl") as f:
        prompts = [json.loads(line)["prompt"] for line in f][: args.requests]
    seqs = []
    for p in prompts:
        text = pair.tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                  tokenize=False)
        ids = pair.tokenizer(text, add_special_tokens=False)["input_ids"]
        seqs.append(engine.new_sequence(list(ids), SamplingParams(max_tokens=args.total_tokens - len(ids),
                                                                  ignore_eos=True), SpecConfig(method=args.method)))
    for s in seqs:
        engine.add(s)
    peak = {"blocks_used": 0, "draft_blocks": 0, "running": 0}
    while not engine.idle:
        engine.step()
        r = engine.kv_report()
        draft = engine.runner.draft.blocks.used if engine.runner.draft is not engine.runner.target else 0
        if r["blocks_used"] > peak["blocks_used"]:
            peak.update(blocks_used=r["blocks_used"], draft_blocks=draft, running=len(engine.scheduler.running))
    bs, cap = engine.block_size, engine.runner.target.capacity
    per_token = kv_bytes_per_slot(pair.target, 1) + kv_bytes_per_slot(pair.draft, 1)
    in_use = (peak["blocks_used"] * kv_bytes_per_slot(pair.target, bs) + peak["draft_blocks"]
              * kv_bytes_per_slot(pair.draft, bs))
    reserved = args.requests * cap * per_token
    print(json.dumps({"requests": args.requests, "tokens_each": args.total_tokens, "peak_running": peak["running"],
                      "peak_target_blocks": peak["blocks_used"], "peak_draft_blocks": peak["draft_blocks"],
                      "kv_in_use_mib": round(in_use / 2**20, 1), "slot_reservation_mib": round(reserved / 2**20, 1),
                      "in_use_over_reservation": round(in_use / reserved, 4),
                      "rss_idle_gib": round(idle / 2**30, 2), "rss_after_gib": round(resident() / 2**30, 2)}))


if __name__ == "__main__":
    main()
