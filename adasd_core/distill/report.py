"""The draft's figures, measured after export on the held-out prompts: acceptance of vanilla SD
(greedy, K=5) on chat and code, the draft's step as a share of the target's, sizes, a chat sample."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from adasd_core.distill.prompts import eval_prompts


def _chat_ids(tokenizer, text: str) -> list[int]:
    from adasd_core.distill.generate import chat_prompt

    return chat_prompt(tokenizer, text)


def step_share(engine, repeats: int = 5) -> dict:
    """Single-token decode steps of both models, interleaved, medians (ms) and their ratio."""
    from adasd_core.costs import decode_step_seconds

    pair = engine.pair
    target, draft = [], []
    for _ in range(repeats):
        target.append(decode_step_seconds(pair.target, pair))
        draft.append(decode_step_seconds(pair.draft, pair))
    t, d = statistics.median(target), statistics.median(draft)
    return {"target_step_ms": round(t * 1e3, 2), "draft_step_ms": round(d * 1e3, 2), "draft_share": round(d / t, 3)}


def acceptance(engine, prompts: list[dict], max_tokens: int, k: int = 5) -> dict:
    """Vanilla SD, greedy: accepted / drafted candidates per prompt kind, and tokens per target forward."""
    from adasd_core.engine import SpecConfig
    from adasd_core.sampling import SamplingParams

    tok = engine.pair.tokenizer
    spec, params = SpecConfig(method="vanilla", k=k), SamplingParams(max_tokens=max_tokens)
    out = {}
    for kind in sorted({p["kind"] for p in prompts}):
        drafted = accepted = tokens = forwards = 0
        for p in (p for p in prompts if p["kind"] == kind):
            s = engine.generate(_chat_ids(tok, p["prompt"]), params, spec).stats
            drafted += s.drafted_tokens
            accepted += s.accepted_tokens
            tokens += s.generated_tokens
            forwards += s.target_forwards
        out[kind] = {"acceptance": round(accepted / max(drafted, 1), 3), "drafted": drafted,
                     "tokens_per_target_forward": round(tokens / max(forwards, 1), 3),
                     "prompts": sum(p["kind"] == kind for p in prompts)}
    return out


def report(pair_target, out: Path, work: Path, cfg) -> dict:
    """Assemble the exported draft with the target, measure it, and write REPORT.md beside it."""
    from adasd_core import lean, smollm2
    from adasd_core.engine import SpecConfig
    from adasd_core.llm import LLM
    from adasd_core.models import load_pair
    from adasd_core.sampling import SamplingParams

    target_dir = Path(pair_target.target.name_or_path)
    assembled = smollm2.assemble_draft(out, target_dir, work / "assembled")
    pair = load_pair(str(target_dir), str(assembled), device="cpu", dtype="float32", max_model_len=cfg.context)
    engine = LLM(pair, calibrate=False, max_running=2)
    t0 = time.time()
    prompts = eval_prompts()
    result = {"steps": step_share(engine), "acceptance": acceptance(engine, prompts, cfg.eval_max_tokens)}
    q = next(p["prompt"] for p in prompts if p["kind"] == "code")
    sample = engine.generate(_chat_ids(pair.tokenizer, q), SamplingParams(max_tokens=cfg.eval_max_tokens),
                             SpecConfig(method="adasd"))
    result["sample"] = {"prompt": q, "answer": sample.text}
    head_tokens = getattr(pair.draft, "adasd_head_tokens", None)
    result["sizes"] = {
        "draft_layers": pair.draft.config.num_hidden_layers,
        "draft_parameters_own": sum(p.numel() for n, p in pair.draft.named_parameters() if "embed_tokens" not in n),
        "head_tokens": int(head_tokens.numel()) if head_tokens is not None else None,
        "draft_int8": lean.int8_weights(pair.draft),
        "package_mib": round(sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 2**20, 2),
        "target_parameters": sum(p.numel() for p in pair.target.parameters()),
    }
    result["seconds"] = round(time.time() - t0, 1)
    from adasd_core.device import machine_info

    result["machine"] = machine_info()
    (out / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    log = json.loads((work / "build_log.json").read_text()) if (work / "build_log.json").exists() else {}
    (out / "REPORT.md").write_text(markdown(result, log))
    return result


def markdown(r: dict, log: dict) -> str:
    acc, st, sz = r["acceptance"], r["steps"], r["sizes"]
    lines = ["# The SmolLM2 draft: build report", "",
             "Measured by `adasd build-draft` after export (the draft assembled with the target's embeddings), "
             f"on {r['machine'].get('cpu')} ({r['machine'].get('torch_threads')} threads), "
             f"torch {r['machine'].get('torch')}.",
             "", "| | value |", "|---|---:|",
             f"| draft decoder layers (from the target's {log.get('train', {}).get('init_layers', '?')}) "
             f"| {sz['draft_layers']} |",
             "| draft's own parameters / package size (bf16) "
             f"| {sz['draft_parameters_own'] / 1e6:.1f} M / {sz['package_mib']} MiB |",
             f"| head subset | {sz['head_tokens']} tokens |",
             f"| target decode step | {st['target_step_ms']} ms |",
             f"| draft decode step{' (int8 weights)' if sz.get('draft_int8') else ''} | {st['draft_step_ms']} ms "
             f"({st['draft_share']:.3f} of the target's) |"]
    for kind, a in acc.items():
        lines.append(f"| vanilla SD (K=5, greedy) acceptance per drafted token, held-out {kind} prompts "
                     f"({a['prompts']}) | {a['acceptance']:.3f} "
                     f"({a['tokens_per_target_forward']:.2f} tokens per target forward) |")
    data, head = log.get("data", {}), log.get("head", {})
    if data:
        lines.append(f"| training text: conversations / tokens the target wrote | {data.get('conversations')} / "
                     f"{data.get('taught_tokens')} |")
    if head:
        lines.append(f"| head coverage of the target's tokens (train / held-out text) | {head.get('coverage_train')} / "
                     f"{head.get('coverage_held_out')} |")
    for key, label in (("agreement_init", "before training"), ("agreement_trained", "after training")):
        if key in log:
            lines.append(f"| top-1 agreement with the target on held-out text, {label} "
                         f"| {log[key]['top1_agreement']} |")
    secs = log.get("seconds", {})
    if secs:
        per_stage = ", ".join(f"{k} {v:.0f}" for k, v in secs.items())
        lines.append(f"| build time (s): {per_stage} | {sum(secs.values()):.0f} |")
    lines += ["", f"A held-out code prompt, greedy, adasd: **{r['sample']['prompt']}**", "",
              "```", r["sample"]["answer"], "```", ""]
    return "\n".join(lines)
