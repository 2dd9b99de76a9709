"""Step costs of a random-weight Llama pair: what speculative decoding trades against.

For a target (about 1B-shaped) and a draft (about 100M-shaped), both with random weights, on one
device and dtype, with a KV cache of `--context` tokens already filled, it times:

  step      one new token for one sequence (a decode step)
  verify_k  a block of k tokens for one sequence (k = 4, 8, 16): what the target pays to check k drafts
  batch_B   one new token for each of B sequences (B = 1, 2, 4, 8, 16): what batching buys

The transformers forward (DynamicCache) is timed for every shape; the engine's own single-sequence
path (adasd_core.kv_cache, the lean forward for Llama) for step and verify. Each figure is the
median of `--iters` timed calls after warm-ups; the cache is cropped back to `--context` after each
call, so every call sees the same cache length. Written as JSON (and a Markdown table on stdout).
Used by scripts/gpu_check.sh; `--tiny` is its CPU smoke mode.

    python scripts/gpu_step_costs.py --device cuda --dtype bfloat16 --out step_costs.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

SHAPES = {
    # about Llama-3.2-1B: 1.24 G parameters with its 128k vocabulary
    "target": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                   num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    # a ~100M draft on the same vocabulary (embeddings tied: 66 M of them are the vocabulary)
    "draft": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=128256, tie_word_embeddings=True),
}
TINY = {
    "target": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True),
    "draft": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, vocab_size=1000, tie_word_embeddings=True),
}


def build(shape: dict, context: int, device: torch.device, dtype: torch.dtype, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(max_position_embeddings=max(4096, 2 * context), **shape)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.eval().requires_grad_(False)
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, iters: int, warmup: int) -> dict:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_ms": round(statistics.median(times) * 1e3, 4), "min_ms": round(min(times) * 1e3, 4),
            "iters": iters}


@torch.inference_mode()
def measure(model, context: int, blocks: list[int], batches: list[int], iters: int, warmup: int,
            device: torch.device) -> dict:
    """transformers' forward over a DynamicCache (every shape), and the engine's own path (a KV pool:
    the lean batched forward where the model supports it) for step, verify blocks and batches."""
    from adasd_core import kv_cache

    vocab = model.config.vocab_size
    out: dict = {"parameters": sum(p.numel() for p in model.parameters())}

    def hf(batch: int):
        _, cache = kv_cache.hf_forward(model, torch.randint(0, vocab, (batch, context), device=device))
        return cache

    def hf_call(cache, batch: int, tokens: int):
        ids = torch.randint(0, vocab, (batch, tokens), device=device)

        def run():
            kv_cache.hf_forward(model, ids, cache, logits_to_keep=tokens)
            cache.crop(context - cache.get_seq_length())

        return run

    one = hf(1)
    out["step"] = timed(hf_call(one, 1, 1), device, iters, warmup)
    for k in blocks:
        out[f"verify_{k}"] = timed(hf_call(one, 1, k), device, iters, warmup)
    del one
    for b in batches:
        cache = hf(b)
        out[f"batch_{b}"] = timed(hf_call(cache, b, 1), device, iters, warmup)
        del cache

    # the engine's path: a KV pool (lean and batched where the model supports it)
    try:
        pool = kv_cache.make_pool(model, max(batches), context + max(blocks) + 2)
        engine: dict = {"pool": type(pool).__name__}
        prompt = torch.randint(0, vocab, (context,)).tolist()
        pool.forward(list(range(max(batches))), [prompt] * max(batches))

        def engine_call(batch: int, tokens: int):
            feeds = [prompt[:tokens]] * batch

            def run():
                pool.forward(list(range(batch)), feeds, all_logits=True)
                for s in range(batch):
                    pool.rollback(s, context)

            return run

        engine["step"] = timed(engine_call(1, 1), device, iters, warmup)
        for k in blocks:
            engine[f"verify_{k}"] = timed(engine_call(1, k), device, iters, warmup)
        for b in batches:
            engine[f"batch_{b}"] = timed(engine_call(b, 1), device, iters, warmup)
            engine[f"batch_{b}_verify_{blocks[0]}"] = timed(engine_call(b, blocks[0]), device, iters, warmup)
    except Exception as exc:  # noqa: BLE001 - report it, keep the transformers figures
        engine = {"error": f"{type(exc).__name__}: {exc}"}
    out["engine_path"] = engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def markdown(result: dict) -> str:
    rows = ["| model | parameters | step ms | " + " | ".join(f"verify {k} ms" for k in result["blocks"])
            + " | " + " | ".join(f"B={b} ms" for b in result["batches"]) + " |"]
    rows.append("|" + " --- |" * (2 + 1 + len(result["blocks"]) + len(result["batches"])))
    for role in ("target", "draft"):
        m = result["models"][role]
        cells = [role, f"{m['parameters'] / 1e6:.1f} M", f"{m['step']['median_ms']:.3f}"]
        cells += [f"{m[f'verify_{k}']['median_ms']:.3f}" for k in result["blocks"]]
        cells += [f"{m[f'batch_{b}']['median_ms']:.3f}" for b in result["batches"]]
        rows.append("| " + " | ".join(cells) + " |")
        e = m["engine_path"]
        if "step" in e:
            cells = [f"{role} (engine path, {e['pool']})", "", f"{e['step']['median_ms']:.3f}"]
            cells += [f"{e[f'verify_{k}']['median_ms']:.3f}" for k in result["blocks"]]
            cells += [f"{e[f'batch_{b}']['median_ms']:.3f}" for b in result["batches"]]
            rows.append("| " + " | ".join(cells) + " |")
    r = result["ratios"]
    rows.append("")
    rows.append(f"draft step / target step: {r['draft_over_target_step']:.3f}; target verify_k / step: "
                + ", ".join(f"k={k}: {v:.2f}" for k, v in r["target_verify_over_step"].items())
                + "; target batch_B / step: "
                + ", ".join(f"B={b}: {v:.2f}" for b, v in r["target_batch_over_step"].items()))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--context", type=int, default=512, help="tokens already in the KV cache")
    p.add_argument("--blocks", default="4,8,16")
    p.add_argument("--batches", default="1,2,4,8,16")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--tiny", action="store_true", help="tiny models, short cache, few iterations (CPU smoke test)")
    p.add_argument("--out", default="step_costs.json")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shapes = TINY if args.tiny else SHAPES
    if args.tiny:
        args.context, args.iters, args.warmup = min(args.context, 32), min(args.iters, 3), 1
    blocks = [int(x) for x in args.blocks.split(",") if x]
    batches = [int(x) for x in args.batches.split(",") if x]

    import transformers

    result = {"device": str(device), "dtype": args.dtype, "context": args.context, "blocks": blocks,
              "batches": batches, "tiny": args.tiny, "torch": torch.__version__,
              "transformers": transformers.__version__, "models": {}}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    for seed, role in enumerate(("target", "draft")):
        t0 = time.perf_counter()
        model = build(shapes[role], args.context, device, dtype, seed)
        result["models"][role] = measure(model, args.context, blocks, batches, args.iters, args.warmup, device)
        result["models"][role]["shape"] = shapes[role]
        result["models"][role]["seconds"] = round(time.perf_counter() - t0, 2)
        del model
        print(f"{role}: done in {result['models'][role]['seconds']}s", file=sys.stderr, flush=True)

    t, d = result["models"]["target"], result["models"]["draft"]
    result["ratios"] = {
        "draft_over_target_step": d["step"]["median_ms"] / t["step"]["median_ms"],
        "target_verify_over_step": {k: t[f"verify_{k}"]["median_ms"] / t["step"]["median_ms"] for k in blocks},
        "target_batch_over_step": {b: t[f"batch_{b}"]["median_ms"] / t["step"]["median_ms"] for b in batches},
    }
    result["table"] = markdown(result)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(result["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
