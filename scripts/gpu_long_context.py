"""An 8B-shaped grouped-query Llama (Llama 3.1 8B's widths, random weights) at 4k and 8k tokens of context:
the lean path against transformers, its step times against the bandwidth floor of its weights, and its
memory against the capacity model. Written as JSON with one list of checks, each {name, value, limit, ok,
enforced}; scripts/gpu_check.sh runs it (part long_context) and `--tiny` is its CPU form (tests/core/test_gpu_check.py).

  exact    float32, the 8B's widths with 2 layers: three sequences of different lengths prefilled in 2,048-token
           chunks, then one ragged batch of verify blocks at different starts: lean vs transformers per sequence
  agree    the dtype (bf16), all 32 layers: a verify block after 4k and 8k tokens, lean vs transformers
  steps    at 4k: decode at B = 1 and 8, verify 8 tokens at B = 1 and 5 at B = 8, each against
           floor = (weights read + KV read) / bandwidth; B = 8 against B = 1; a 2,048-token prefill chunk
           against its matmul FLOPs at the card's bf16 rate
  fused    CUDA: the batched verify, a later prefill chunk and a decode step with the math kernel turned off
           (flash / efficient / cuDNN only), query groups folded; the grouped layout (enable_gqa with a mask)
           is tried the same way and reported
  memory   CUDA: a 2,048-token prefill chunk's scratch at 6k-8k (peak minus before), folded and grouped; the
           planner's blocks (kv_cache.plan_blocks at memory_fraction 0.9) allocated, then used by a prefill chunk
           and a batched decode step: the pool takes what the plan said and the peak stays inside the card

    python scripts/gpu_long_context.py --device cuda --dtype bfloat16 --out long_context.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adasd_core import kv_cache, lean  # noqa: E402
from adasd_core.device import FOLD_ENV  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from gpu_step_costs import timed  # noqa: E402  (one timing loop for both GPU scripts)

# Llama 3.1 8B: 8.03 G parameters, 32 query heads over 8 KV heads of 128
SHAPE_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
            head_dim=8, vocab_size=500, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0})

CHUNK = 2048  # the engine's prefill budget per step on CUDA (prompt tokens)
BANDWIDTH = 4.8e12  # bytes/s: H200 HBM3e by the datasheet
BF16_FLOPS = 7.9e14  # FLOP/s: a dense bf16 matrix product measured on an H200 here (KINDS.md)
# limits: first guesses for an eager PyTorch path (no CUDA graphs), to revisit after the first run
STEP_OVER_FLOOR = 2.5  # a decode / verify step within 2.5x of reading its weights and KV once
BATCH8_OVER_BATCH1 = 1.6  # 8 sequences' decode step against one's (weights read once for all)
VERIFY8_OVER_DECODE = 1.5  # 8 tokens of one sequence against one token
CHUNK_OVER_FLOOR = 3.0  # a prefill chunk within 3x of its matmul FLOPs at the bf16 rate
CHUNK_SCRATCH = 1 << 30  # bytes a folded 2,048-token chunk may add at 8k (the math kernel needs several GiB)
AGREE = {"float32": (1e-3, 0.99999), "bfloat16": (0.03, 0.999), "float16": (0.03, 0.999)}  # (relative error, cosine)
EXACT = 1e-3  # float32: max |lean - transformers| / max |transformers|


def build(shape: dict, device: torch.device, dtype: torch.dtype, layers: int | None = None, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(max_position_embeddings=16384, **{**shape, **({"num_hidden_layers": layers} if layers else {})})
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.eval().requires_grad_(False)
    model.config._attn_implementation = "sdpa"
    return model


def release(model) -> None:
    """Drop a model and its lean layout (lean caches one per model), and give its memory back."""
    lean._models.pop(model, None)
    lean._supported.pop(model, None)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def median_s(fn, device: torch.device, iters: int, warmup: int) -> float:
    return timed(fn, device, iters, warmup)["median_ms"] / 1e3


def check(name: str, value: float, limit: float, enforced: bool = True, below: bool = True) -> dict:
    """value <= limit (or >= where below is False)."""
    ok = value <= limit if below else value >= limit
    return {"name": name, "value": round(float(value), 6), "limit": round(float(limit), 6),
            "ok": bool(ok), "enforced": bool(enforced)}


def bytes_of(model) -> dict:
    """Weight bytes read by a step: every matrix but the input embedding (a step reads only its rows);
    KV bytes per token of context."""
    cfg = model.config
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    tied = embed.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    read = total if tied else total - embed.numel() * embed.element_size()
    return {"weights": total, "weights_read": read, "kv_per_token": kv_cache.kv_bytes_per_slot(model, 1),
            "matmul_params": read // embed.element_size(), "layers": cfg.num_hidden_layers}


def floor_s(sizes: dict, batch: int, context: int, bandwidth: float) -> float:
    """A step that reads its weights once and every sequence's KV once, at `bandwidth`."""
    return (sizes["weights_read"] + batch * context * sizes["kv_per_token"]) / bandwidth


def chunk_floor_s(sizes: dict, tokens: int, flops: float) -> float:
    """A prefill chunk's matmuls (2 FLOP per parameter per token) at `flops`: attention not counted."""
    return 2 * sizes["matmul_params"] * tokens / flops


def step_checks(t: dict, sizes: dict, context: int, chunk: int, bandwidth: float, flops: float,
                enforced: bool) -> list[dict]:
    """The thresholds on the measured step times `t` (seconds): decode_b1, decode_b8, verify_b1_8,
    verify_b8_5, chunk (a prefill chunk of `chunk` tokens)."""
    out = [check(f"{name} / floor at {context}", t[name] / floor_s(sizes, b, context, bandwidth),
                 STEP_OVER_FLOOR, enforced)
           for name, b in (("decode_b1", 1), ("decode_b8", 8), ("verify_b1_8", 1), ("verify_b8_5", 8))]
    out.append(check("decode_b8 / decode_b1", t["decode_b8"] / t["decode_b1"], BATCH8_OVER_BATCH1, enforced))
    out.append(check("verify_b1_8 / decode_b1", t["verify_b1_8"] / t["decode_b1"], VERIFY8_OVER_DECODE, enforced))
    out.append(check("prefill chunk / matmul floor", t["chunk"] / chunk_floor_s(sizes, chunk, flops), CHUNK_OVER_FLOOR,
                     enforced))
    return out


def agreement(got: torch.Tensor, ref: torch.Tensor) -> dict:
    got, ref = got.float(), ref.float()
    return {"relative_error": ((got - ref).norm() / ref.norm()).item(),
            "min_cosine": torch.nn.functional.cosine_similarity(got, ref, dim=-1).min().item(),
            "max_abs_over_max": ((got - ref).abs().max() / ref.abs().max()).item(),
            "top1_agreement": (got.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "finite": bool(torch.isfinite(got).all())}


def prefill(pool, slot: int, ids: list[int], chunk: int) -> None:
    for s in range(0, len(ids), chunk):
        pool.forward([slot], [ids[s : s + chunk]])


# ---------------------------------------------------------------------------- parts


@torch.inference_mode()
def part_exact(shape, device, contexts, chunk, gen) -> tuple[dict, list[dict]]:
    """float32 at the 8B's widths, 2 layers: a ragged batch after long prompts, lean vs transformers."""
    model = build(shape, device, torch.float32, layers=2, seed=1)
    vocab, top = shape["vocab_size"], max(contexts)
    lengths = [top, top - top // 16 - 3, contexts[0]]  # three sequences, three starts
    seqs = [torch.randint(0, vocab, (n + 16,), generator=gen).tolist() for n in lengths]
    ref, fast = kv_cache.HFPool(model, 3, top + 32), kv_cache.make_pool(model, 3, top + 32)
    assert isinstance(fast, kv_cache.LeanPool)
    for s, n in enumerate(lengths):
        for pool in (ref, fast):
            prefill(pool, s, seqs[s][:n], chunk)
    feeds = [seqs[0][lengths[0] : lengths[0] + 5], seqs[1][lengths[1] : lengths[1] + 1],
             seqs[2][lengths[2] : lengths[2] + 8]]
    got = fast.forward([0, 1, 2], feeds, all_logits=True)
    want = ref.forward([0, 1, 2], feeds, all_logits=True)
    result = {"lengths": lengths, "feeds": [len(f) for f in feeds], **agreement(got, want)}
    del ref, fast
    release(model)
    return result, [check("exact: float32 ragged verify after long prompts, max |diff| / max",
                          result["max_abs_over_max"], EXACT)]


@torch.inference_mode()
def part_agree(model, device, dtype_name, contexts, chunk, gen) -> tuple[dict, list[dict]]:
    """The full model in its dtype: a verify block after each context, lean vs transformers."""
    vocab = model.config.vocab_size
    rel_limit, cos_limit = AGREE[dtype_name]
    results, checks = {}, []
    for context in contexts:
        ids = torch.randint(0, vocab, (context + 5,), generator=gen).tolist()
        _, cache = kv_cache.hf_forward(model, torch.tensor([ids[:context]], device=device))
        want, cache = kv_cache.hf_forward(model, torch.tensor([ids[context:]], device=device), cache, logits_to_keep=5)
        del cache
        pool = kv_cache.make_pool(model, 1, context + 16)
        prefill(pool, 0, ids[:context], chunk)
        got = pool.forward([0], [ids[context:]], all_logits=True)
        results[context] = r = agreement(got, want[0])
        checks.append(check(f"agree at {context}: relative error", r["relative_error"], rel_limit))
        checks.append(check(f"agree at {context}: min cosine", r["min_cosine"], cos_limit, below=False))
        checks.append(check(f"agree at {context}: finite", float(r["finite"]), 1.0, below=False))
        del pool
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results, checks


def _fold(on: bool) -> None:
    """The lean attention's layout for the calls that follow: query groups folded, or enable_gqa."""
    os.environ[FOLD_ENV] = "1" if on else "0"


@torch.inference_mode()
def part_steps(model, device, context, chunk, iters, warmup, gen, bandwidth, flops) -> tuple[dict, list[dict]]:
    """Step times at `context` tokens, 8 slots filled, and the fused-kernel check on the same pool."""
    vocab = model.config.vocab_size
    pool = kv_cache.make_pool(model, 8, context + 2 * chunk + 16)
    prompts = [torch.randint(0, vocab, (context,), generator=gen).tolist() for _ in range(8)]
    for s in range(8):
        prefill(pool, s, prompts[s], chunk)
    more = torch.randint(0, vocab, (chunk,), generator=gen).tolist()

    def call(slots, n, all_logits=True):
        def run():
            # the round's host read
            pool.forward(slots, [more[:n]] * len(slots), all_logits=all_logits).argmax(-1).tolist()
            for s in slots:
                pool.rollback(s, context)
        return run

    shapes = {"decode_b1": ([0], 1), "decode_b8": (list(range(8)), 1),
              "verify_b1_8": ([0], 8), "verify_b8_5": (list(range(8)), 5)}
    t = {name: median_s(call(slots, n), device, iters, warmup) for name, (slots, n) in shapes.items()}
    t["chunk"] = median_s(call([0], chunk, all_logits=False), device, max(3, iters // 4), 1)
    _fold(False)
    t["verify_b8_5_grouped"] = median_s(call(list(range(8)), 5), device, iters, warmup)
    _fold(True)
    out = {"context": context, "seconds": {k: round(v, 6) for k, v in t.items()}}
    sizes = bytes_of(model)
    out["floors_s"] = {name: round(floor_s(sizes, b, context, bandwidth), 6)
                       for name, b in (("b1", 1), ("b8", 8))}
    out["chunk_floor_s"] = round(chunk_floor_s(sizes, chunk, flops), 6)
    checks = step_checks(t, sizes, context, chunk, bandwidth, flops, enforced=device.type == "cuda")

    if device.type == "cuda":  # the same shapes with the math kernel turned off
        from torch.nn.attention import SDPBackend, sdpa_kernel

        fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
        fused += [SDPBackend.CUDNN_ATTENTION] if hasattr(SDPBackend, "CUDNN_ATTENTION") else []
        kernels = {}
        for fold in (True, False):
            _fold(fold)
            for name, (slots, n, all_logits) in {"verify_b8_5": (list(range(8)), 5, True), "decode_b1": ([0], 1, True),
                                                 "chunk_after_context": ([0], 256, False)}.items():
                key = f"{name} {'folded' if fold else 'grouped'}"
                try:
                    with sdpa_kernel(fused):
                        call(slots, n, all_logits)()
                    kernels[key] = "fused"
                except RuntimeError as exc:
                    kernels[key] = "math only: " + str(exc).strip().splitlines()[-1][:200]
                    for s in slots:
                        pool.rollback(s, context)
        _fold(True)
        out["kernels"] = kernels
        checks += [check(f"fused kernel: {k}", float(v == "fused"), 1.0, below=False) for k, v in kernels.items()
                   if k.endswith("folded")]
    pool = None  # frees the KV pool before the next part (the closures above are done with it)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out, checks


@torch.inference_mode()
def part_memory(model, device, context, chunk, gen, memory_fraction=0.9) -> tuple[dict, list[dict]]:
    """CUDA: a late prefill chunk's scratch (folded, grouped); the planner's blocks allocated and used."""
    from adasd_core.drafting import WINDOW

    vocab = model.config.vocab_size
    out, checks = {}, []
    pool = kv_cache.make_pool(model, 1, context + 16)
    ids = torch.randint(0, vocab, (context,), generator=gen).tolist()
    prefill(pool, 0, ids[: context - chunk], chunk)
    for fold in (True, False):
        _fold(fold)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        pool.forward([0], [ids[context - chunk :]])
        torch.cuda.synchronize()
        out[f"chunk_scratch_bytes_{'folded' if fold else 'grouped'}"] = torch.cuda.max_memory_allocated() - before
        pool.rollback(0, context - chunk)
    _fold(True)
    checks.append(check(f"scratch of a {chunk}-token chunk at {context} (folded), GiB",
                        out["chunk_scratch_bytes_folded"] / 2**30, CHUNK_SCRATCH / 2**30))
    del pool
    torch.cuda.empty_cache()

    # the capacity model: as many slots as the planner gives, then a chunk and a wide decode step in them
    pair = SimpleNamespace(target=model, draft=None, context_length=context, device=device)
    free0, total = torch.cuda.mem_get_info(device)
    blocks, per_block = kv_cache.plan_blocks(pair, max_running=4096, memory_fraction=memory_fraction)
    capacity = context + WINDOW + 2
    slots = min(16, blocks // -(-capacity // 16))
    before = torch.cuda.memory_allocated()
    pool = kv_cache.make_pool(model, slots, capacity, blocks=blocks)
    pool_bytes = torch.cuda.memory_allocated() - before
    torch.cuda.reset_peak_memory_stats()
    prefill(pool, 0, ids, chunk)
    batch = list(range(min(16, slots)))
    for s in batch[1:]:
        pool.forward([s], [ids[:64]])
    pool.forward(batch, [[1]] * len(batch)).argmax(-1).tolist()
    torch.cuda.synchronize()
    peak_reserved = torch.cuda.max_memory_reserved()
    free1, _ = torch.cuda.mem_get_info(device)
    out.update(blocks=blocks, per_block_bytes=per_block, pool_bytes=pool_bytes, card_bytes=total,
               free_before_pool=free0, free_after=free1, peak_reserved=peak_reserved)
    checks.append(check("pool bytes / planned (blocks x per block)", pool_bytes / (blocks * per_block), 1.001))
    # the plan leaves (1 - memory_fraction) of the card to everything else: a chunk and a wide step in the
    # full pool take less than half of it
    checks.append(check("card free after using the full pool / card", free1 / total, (1 - memory_fraction) / 2,
                        below=False))
    budget = free0 - (1 - memory_fraction) * total
    checks.append(check("planned blocks x per block / budget", blocks * per_block / budget, 1.001))
    del pool
    torch.cuda.empty_cache()
    return out, checks


def markdown(result: dict) -> str:
    rows = ["| check | value | limit | holds |", "| --- | ---: | ---: | --- |"]
    for c in result["checks"]:
        flag = "yes" if c["ok"] else ("**no**" if c["enforced"] else "no (not enforced here)")
        rows.append(f"| {c['name']} | {c['value']:.4g} | {c['limit']:.4g} | {flag} |")
    steps = result.get("steps", {}).get("seconds")
    if steps:
        rows += ["", "step times (ms): " + ", ".join(f"{k} {v * 1e3:.3f}" for k, v in steps.items())]
    mem = result.get("memory")
    if mem:
        rows += ["", "memory: " + ", ".join(f"{k} {v / 2**30:.2f} GiB" if "bytes" in k or k.startswith(("free", "peak"))
                                            else f"{k} {v}" for k, v in mem.items())]
    if result.get("steps", {}).get("kernels"):
        rows += ["", "kernels with math off: " + "; ".join(f"{k}: {v}" for k, v in result["steps"]["kernels"].items())]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(AGREE))
    p.add_argument("--contexts", default="4096,8192")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--bandwidth", type=float, default=BANDWIDTH, help="bytes/s of the card's memory")
    p.add_argument("--flops", type=float, default=BF16_FLOPS, help="FLOP/s of the card's dense matrix products")
    p.add_argument("--tiny", action="store_true", help="tiny shapes and contexts (the CPU form)")
    p.add_argument("--out", default="long_context.json")
    args = p.parse_args(argv)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shape, chunk, contexts = SHAPE_8B, CHUNK, [int(x) for x in args.contexts.split(",")]
    if args.tiny:
        shape, chunk, contexts, args.iters, args.warmup = TINY, 16, [48, 96], min(args.iters, 3), 1
    gen = torch.Generator().manual_seed(0)
    import transformers

    result = {"device": str(device), "dtype": args.dtype, "tiny": args.tiny, "contexts": contexts, "chunk": chunk,
              "torch": torch.__version__, "transformers": transformers.__version__, "bandwidth": args.bandwidth,
              "flops": args.flops, "shape": shape, "checks": [], "errors": {}}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)

    def run(name, fn):
        t0 = time.perf_counter()
        try:
            result[name], checks = fn()
            result["checks"] += checks
        except Exception as exc:  # noqa: BLE001 - one part's failure is recorded; the others still run
            import traceback

            result["errors"][name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        result.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 2)
        print(f"{name}: {result['seconds'][name]}s", file=sys.stderr, flush=True)

    run("exact", lambda: part_exact(shape, device, contexts, chunk, gen))
    model = build(shape, device, dtype)
    result["sizes"] = bytes_of(model)
    run("agree", lambda: part_agree(model, device, args.dtype, contexts, chunk, gen))
    run("steps", lambda: part_steps(model, device, contexts[0], chunk, args.iters, args.warmup, gen, args.bandwidth,
                                    args.flops))
    if device.type == "cuda":
        run("memory", lambda: part_memory(model, device, contexts[-1], chunk, gen))
    os.environ.pop(FOLD_ENV, None)
    result["ok"] = not result["errors"] and all(c["ok"] for c in result["checks"] if c["enforced"])
    result["table"] = markdown(result)
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    print(result["table"])
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
