"""The demo pair's report: sizes, held-out loss, decode-step costs and vanilla acceptance."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from adasd_core.costs import decode_step_seconds
from adasd_core.device import machine_info
from adasd_core.engine import SpecConfig
from adasd_core.llm import LLM
from adasd_core.models import load_pair
from adasd_core.sampling import SamplingParams


@torch.inference_mode()
def held_out_loss(model, stream: torch.Tensor, seq: int, windows: int) -> float:
    """Mean next-token cross-entropy (nats) over consecutive held-out windows."""
    total, count = 0.0, 0
    n = min(windows, (stream.numel() - 1) // seq)
    for i in range(n):
        chunk = stream[i * seq : i * seq + seq + 1].long()[None]
        logits = model(input_ids=chunk[:, :-1]).logits.float()
        total += F.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
        count += seq
    return total / count


def _dir_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def held_out_prompts(stream: torch.Tensor, n: int, length: int) -> list[list[int]]:
    """n prompts of `length` tokens at evenly spaced offsets of the held-out stream."""
    step = max(length, (stream.numel() - length) // n)
    return [stream[i * step : i * step + length].tolist() for i in range(n) if i * step + length <= stream.numel()]


def make_report(out: Path, held_stream: torch.Tensor, cfg) -> dict:
    """cfg: the build's BuildConfig (adasd_core.demo.build)."""
    pair = load_pair(str(out / "target"), str(out / "draft"), device="cpu", dtype="float32")
    engine = LLM(pair)
    n_prompts, new_tokens = (24, 64) if cfg.max_files is None else (3, 16)
    prompts = held_out_prompts(held_stream, n_prompts, 64 if cfg.max_files is None else 32)

    drafted = accepted = 0
    for p in prompts:
        params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
        s = engine.generate(p, params, SpecConfig(method="vanilla", k=5)).stats
        drafted += s.drafted_tokens
        accepted += s.accepted_tokens
    target_step = decode_step_seconds(pair.target, pair, repeats=15)
    draft_step = decode_step_seconds(pair.draft, pair, repeats=15)

    sample_prompt = prompts[len(prompts) // 2]
    sample = engine.generate(sample_prompt, SamplingParams(max_tokens=96), SpecConfig(method="ar"))
    report = {
        "size_mib": {"target": round(_dir_mib(out / "target"), 2), "draft": round(_dir_mib(out / "draft"), 2)},
        "parameters": {"target": sum(p.numel() for p in pair.target.parameters()),
                       "draft": sum(p.numel() for p in pair.draft.parameters())},
        "held_out_loss_nats": {
            "target": round(held_out_loss(pair.target, held_stream, cfg.context, cfg.eval_windows), 4),
            "draft": round(held_out_loss(pair.draft, held_stream, cfg.context, cfg.eval_windows), 4),
        },
        "decode_step_ms": {"target": round(target_step * 1e3, 3), "draft": round(draft_step * 1e3, 3),
                           "ratio": round(target_step / draft_step, 2)},
        "vanilla_k5_greedy_acceptance": round(accepted / max(1, drafted), 4),
        "acceptance_prompts": len(prompts),
        "acceptance_tokens_per_prompt": new_tokens,
        "machine": machine_info(),
        "samples": {"prompt": pair.tokenizer.decode(sample_prompt), "target_greedy": sample.text},
    }
    report["size_mib"]["total"] = round(report["size_mib"]["target"] + report["size_mib"]["draft"], 2)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "REPORT.md").write_text(_markdown(report, out))
    return report


def _markdown(r: dict, out: Path) -> str:
    log = json.loads((out / "build_log.json").read_text()) if (out / "build_log.json").exists() else {}
    secs = lambda k: log.get(k, {}).get("seconds", "?")  # noqa: E731
    refine = f" + {secs('refine')} (again, on the target's continuations)" if "refine" in log else ""
    return f"""# Demo pair report

| | target | draft |
|---|---|---|
| parameters | {r['parameters']['target']:,} | {r['parameters']['draft']:,} |
| size on disk (MiB, bf16) | {r['size_mib']['target']} | {r['size_mib']['draft']} |
| training time (s) | {secs('target')} | {secs('draft')} (distilled from the target){refine} |
| held-out loss (nats/token) | {r['held_out_loss_nats']['target']} | {r['held_out_loss_nats']['draft']} |
| one decode step (ms, median) | {r['decode_step_ms']['target']} | {r['decode_step_ms']['draft']} |

- Decode-step cost ratio target/draft: **{r['decode_step_ms']['ratio']}x**
- Greedy acceptance rate of vanilla SD (K=5) on held-out modules: **{r['vanilla_k5_greedy_acceptance']}**
  ({r['acceptance_prompts']} prompts x {r['acceptance_tokens_per_prompt']} tokens)
- Machine: {', '.join(f'{k} {v}' for k, v in r['machine'].items())}

## A greedy continuation by the target (held-out code)

Prompt:
```python
{r['samples']['prompt']}
```
Continuation:
```python
{r['samples']['target_greedy']}
```
"""
