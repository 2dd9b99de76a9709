"""The Markdown report of `adasd bench` (bench.md), from the result dict that bench.json holds."""

from __future__ import annotations

COLUMNS = ("method", "tok/s", "accuracy", "vs vanilla", "vs target", "#cand", "#match", "accept", "fidelity")

DEFINITIONS = """\
- **tok/s**: generated tokens / seconds, each request timed end to end (prompt token ids in, token ids out,
  prefill included); the median over repeats of (all prompts' tokens / all prompts' seconds).
- **accuracy**: share of correct completions (%), scored tasks only.
- **vs vanilla / vs target**: tok/s over vanilla SD's / over the target alone's (our loop), same task and mode.
- **#cand / #match**: candidates drafted / candidates accepted per round (per target forward), over all requests.
  For HF assisted generation: assistant forward calls / target forward calls, and (tokens - rounds) / rounds.
- **accept**: accepted candidates / drafted candidates.
- **fidelity** (greedy only): over the prompts, the share of positions i < n of the target alone's greedy output
  (n tokens, our loop) where the row's token i equals the target's token i (positional match, token-weighted).
  Lossless rows must show 1.00; sampled runs show -.
- **Quality** (sampled runs; after each timed request, one target forward over prompt + output): **log p/token**,
  the target's mean log-probability (plain softmax, temperature 1, what `logprobs` reports) of each generated
  token; **gap vs target**, its difference from the target alone's on the same prompt and repeat (paired; noisy:
  each sample drifts into its own contexts); **excess surprisal**, the mean of -log p(x) - H(p) under the
  request's processed distribution p at the contexts the output itself made: zero in expectation for a lossless
  method, so it measures the price of the relaxed check at low variance. Means of per-request means, ± one
  standard error over the n requests. **relaxed**: candidates only the relaxed check accepted / generated tokens.
"""

QUALITY_COLUMNS = ("method", "n req", "tokens", "log p/token", "gap vs target", "excess surprisal", "relaxed",
                   "vs vanilla")


def _fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|"]
    for r in rows:
        cells = [
            r["label"], _fmt(r["tokens_per_s"], ".1f"), _fmt(r["accuracy"], ".1f", "%"),
            _fmt(r["speedup_vs_vanilla"], ".2f", "x"), _fmt(r["speedup_vs_target"], ".2f", "x"),
            _fmt(r["cand_per_round"]), _fmt(r["match_per_round"]), _fmt(r["acceptance_rate"]),
            _fmt(r["fidelity"], ".3f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pm(value, se, spec: str = "+.3f") -> str:
    if value is None:
        return "-"
    return f"{value:{spec}}" + ("" if se is None else f" ± {se:.3f}")


def quality_table(rows: list[dict]) -> str:
    align = ["---"] + ["---:"] * (len(QUALITY_COLUMNS) - 1)
    lines = ["| " + " | ".join(QUALITY_COLUMNS) + " |", "|" + "|".join(align) + "|"]
    for r in rows:
        cells = [r["label"], str(r.get("quality_requests", "-")), str(r.get("quality_tokens", "-")),
                 _pm(r.get("target_logprob"), r.get("target_logprob_se"), ".3f"),
                 _pm(r.get("logprob_gap"), r.get("logprob_gap_se")),
                 _pm(r.get("excess_surprisal"), r.get("excess_surprisal_se")),
                 _fmt(r.get("relaxed_share"), ".3f"), _fmt(r["speedup_vs_vanilla"], ".2f", "x")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    cfg, machine, models = result["config"], result["machine"], result["models"]
    out = [
        "# adasd bench",
        "",
        f"{result['created']}; {result['wall_s']} s in all.",
        "",
        f"- Models: target `{models['target']}`, draft `{models['draft']}` on {models['device']} ({models['dtype']}); "
        f"one decode step: target {models['decode_step'].get('target_ms', '?')} ms, "
        f"draft {models['decode_step'].get('draft_ms', '?')} ms (median)",
        "- Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items())
        + (f"; 1-minute load average {result['load_average']['start']} at the start, {result['load_average']['end']} "
           "at the end (a load above the bench's thread count means other work competed for the CPU)"
           if result.get("load_average", {}).get("start") is not None else ""),
        f"- Greedy: temperature 0. Sampled: temperature {cfg['temperature']}, top-p 1, top-k off; "
        "the same seed for every method on a given prompt and repeat.",
    ]
    for m in result["methods"]:
        if "assistant_schedule" in m:
            s = m["assistant_schedule"]
            threshold = ("re-fitted every round" if s["confidence_threshold_adapts"]
                         else "fixed: scikit-learn is not installed")
            out.append(
                f"- HF assisted generation runs transformers' defaults: num_assistant_tokens "
                f"{s['num_assistant_tokens']}, schedule `{s['num_assistant_tokens_schedule']}`, assistant confidence "
                f"threshold {s['assistant_confidence_threshold']} "
                f"({threshold})"
            )
    out.append("")
    for t in result["tasks"]:
        skipped = f", {t['skipped']} skipped (too long for the context)" if t["skipped"] else ""
        out.append(f"- Task **{t['name']}**: {t['prompts']} prompts{skipped}, up to {t['max_tokens']} new tokens, "
                   f"{t['repeats']} repeat(s). {t['notes']}")
    out.append("")
    for t in result["tasks"]:
        for mode in cfg["modes"]:
            rows = [r for r in result["rows"] if r["task"] == t["name"] and r["mode"] == mode]
            temp = "temperature 0" if mode == "greedy" else f"temperature {cfg['temperature']}"
            out += [f"## {t['name']}, {mode} ({temp})", "", table(rows), ""]
            if mode == "sampled" and any(r.get("quality_requests") for r in rows):
                out += [f"Quality, {t['name']}, sampled (nats per token):", "", quality_table(rows), ""]
    if result["targets"]:
        out += ["## Targets (issue 4), measured in this run", "",
                "| target | method | task | mode | value | goal | met |", "|---|---|---|---|---:|---|---|"]
        for t in result["targets"]:
            value = (f"{t['value']:+.2f} points" if t["target"].startswith("accuracy") else
                     f"{t['value']:.3f} nats" if t["target"] == "excess_surprisal" else f"{t['value']:.2f}x")
            out.append(f"| {t['target']} | {t.get('method', '')} | {t['task']} | {t['mode']} | {value} | {t['goal']} | "
                       f"{'yes' if t['met'] else '**no**'} |")
        out.append("")
    out += ["## Definitions", "", DEFINITIONS]
    files = result.get("files", {})
    pngs = [p for k, p in files.items() if p.endswith(".png")]
    if pngs:
        out += ["## Plots", ""] + [f"![{k}]({p.rsplit('/', 1)[-1]})" for k, p in files.items() if p.endswith(".png")]
        out.append("")
    return "\n".join(out)
