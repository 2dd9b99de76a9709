"""The report of `adasd bench-serve`: bench_serve.md (Markdown tables) and bench_serve.json, from the
result dict that serve_sweep.run_bench_serve builds."""

from __future__ import annotations

import json
from pathlib import Path

DEFINITIONS = """\
- **tok/s (aggregate)**: all streams' completion tokens / the wall time from the first request sent to the
  last one finished, per pass; the median over passes (repeats).
- **tok/s per request**: one request's tokens / its latency (TTFT included), as one client sees it; p50 over
  the row's requests.
- **TTFT**: from sending the request to the first chunk with text.
- **ITL**: per request, (latency - TTFT) / (tokens - 1), the mean gap between tokens after the first (vLLM's
  TPOT); p50 / p99 over requests.
- **chunk gap**: time between two chunks of one stream (a speculative round sends several tokens at once); p50,
  p99 and the longest (max), a stall.
- **stall at arrival**: the chunk gaps of running streams during which another request was sent.
- **/ ar**: the row's aggregate tok/s over the `ar` row's at the same concurrency.
- **draft len**: drafted tokens / rounds over the row's requests, from `usage.speculative` (our server only).
"""


def _fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else f"{value:{spec}}"


def _pair(d: dict, a: str = "p50", b: str = "p99", spec: str = ".1f") -> str:
    return f"{_fmt(d.get(a), spec)} / {_fmt(d.get(b), spec)}"


def _draft(row: dict) -> str:
    spec = row.get("speculative")
    return _fmt(spec and spec.get("mean_draft_length"), ".2f")


def level_table(result: dict) -> list[str]:
    """One line per concurrency level: every row's aggregate tok/s, its ratio over ar, the draft lengths."""
    names = list(dict.fromkeys(r["method"] for r in result["rows"]))
    ratio_names = [n for n in names if n != "ar"] if "ar" in names else []
    drafted = [n for n in names if any(r["method"] == n and r["speculative"] for r in result["rows"])]
    head = ([f"{n} tok/s" for n in names] + [f"{n} / ar" for n in ratio_names]
            + [f"draft len {n}" for n in drafted if n != "ar"])
    lines = ["| concurrency | " + " | ".join(head) + " |", "|" + "---:|" * (len(head) + 1)]
    for lv in result["levels"]:
        here = {r["method"]: r for r in result["rows"] if r["concurrency"] == lv["concurrency"]}
        speed = lv.get("speedup_vs_ar", {})
        cells = ([_fmt(lv["tokens_per_s"].get(n)) for n in names]
                 + [(f"**{speed[n]:.2f}x**" if n == "adasd" else f"{speed[n]:.2f}x") if n in speed else "-"
                    for n in ratio_names]
                 + [_draft(here[n]) if n in here else "-" for n in drafted if n != "ar"])
        lines.append(f"| {lv['concurrency']} | " + " | ".join(cells) + " |")
    return lines


def row_table(rows: list[dict]) -> list[str]:
    lines = ["| concurrency | method | requests | errors | tok/s (aggregate) | tok/s per request (p50) | "
             "TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | chunk gap p50 / p99 / max (ms) | tokens/chunk | draft len |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        g = r["chunk_gap_ms"]
        lines.append(
            f"| {r['concurrency']} | {r['method']} | {r['requests']} | {r['errors']} | {_fmt(r['tokens_per_s'])} | "
            f"{_fmt(r['request_tokens_per_s']['p50'])} | {_pair(r['ttft_ms'])} | {_pair(r['itl_ms'], spec='.2f')} | "
            f"{_fmt(g['p50'], '.2f')} / {_fmt(g['p99'], '.2f')} / {_fmt(g['max'], '.1f')} | "
            f"{_fmt(r['tokens_per_chunk'], '.2f')} | {_draft(r)} |")
    return lines


def arrivals_table(rows: list[dict]) -> list[str]:
    lines = ["| method | requests | errors | tok/s (aggregate) | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | "
             "chunk gap p99 / max (ms) | stall at arrival p99 / max (ms) | gaps spanning an arrival | draft len |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s = r["stall_at_arrival_ms"]
        lines.append(
            f"| {r['method']} | {r['requests']} | {r['errors']} | {_fmt(r['tokens_per_s'])} | {_pair(r['ttft_ms'])} | "
            f"{_pair(r['itl_ms'], spec='.2f')} | {_pair(r['chunk_gap_ms'], 'p99', 'max')} | {_pair(s, 'p99', 'max')} | "
            f"{s['count']} | {_draft(r)} |")
    return lines


def markdown(result: dict) -> str:
    cfg = result["config"]
    methods = ", ".join(r for r in dict.fromkeys(r["method"] for r in result["rows"]))
    ext = "".join(f"; external `{e['name']}` {e['base_url']} (model `{e['model']}`, plain OpenAI requests)"
                  for e in result.get("externals", []))
    out = [
        "# adasd bench-serve", "",
        f"{result['created']}; server {result['server']['base_url']} (model `{result['server']['model']}`){ext}; "
        f"{result['wall_s']} s in all.", "",
        f"- Requests: /v1/completions, stream=true, max_tokens {cfg['max_tokens']}, temperature {cfg['temperature']}"
        f"{', ignore_eos' if cfg['ignore_eos'] else ''}; rows: {methods} (our server's rows send `adasd.method`).",
        f"- Sweep: {cfg['repeats']} pass(es); in each, per concurrency level, every row in turn (the order rotated "
        "from level to level and pass to pass), each running the level's requests with that many in flight. "
        "Requests per level: " + ", ".join(f"{r['concurrency']}: {r['passes'][0]['requests']}"
                                           for r in result["rows"] if r["method"] == result["rows"][0]["method"]) + ".",
        "- Machine (client side): " + ", ".join(f"{k} {v}" for k, v in result["machine"].items()),
    ]
    if not result["server"]["warm_up_ok"]:
        out.append(f"- The warm-up failed: `{result['server']['warm_up_error']}`")
    out += ["", "## Aggregate tok/s per concurrency level", ""] + level_table(result)
    out += ["", "## Every row", ""] + row_table(result["rows"])
    errors = sorted({m for r in result["rows"] + result.get("arrivals", []) for m in r["error_messages"]})
    if errors:
        out += ["", "Errors seen: " + "; ".join(f"`{e}`" for e in errors)]
    if result.get("arrivals"):
        out += ["", f"## Arrivals while others stream ({cfg['arrival_requests']} requests, {cfg['arrival_pattern']} "
                    f"arrivals at {cfg['arrival_rate']:g} requests/s, the same send times for every row)", ""]
        out += arrivals_table(result["arrivals"])
    if result.get("targets"):
        base = result.get("baseline")
        out += ["", "## Targets, measured in this run", "",
                "| target | method | concurrency | value | goal | met |", "|---|---|---:|---:|---|---|"]
        for t in result["targets"]:
            out.append(f"| {t['target']} | {t.get('method', '')} | {t.get('concurrency', '-') or '-'} | "
                       f"{t['value']:.2f}x | {t['goal']} | {'yes' if t['met'] else '**no**'} |")
        if base:
            out.append(f"\nBaseline: {base['path']} (adasd at 1 client: {_fmt(base['tokens_per_s'])} tok/s).")
    ov = result.get("overhead")
    if ov:
        out += ["", f"Overhead: one HTTP stream {_fmt(ov['http_single_stream_tokens_per_s'])} tok/s, in process "
                    f"{_fmt(result['in_process']['tokens_per_s'])} tok/s ({result['in_process']['method']}, "
                    f"same prompts and parameters, interleaved, medians of {len(ov['passes'])} passes): ratio "
                    f"**{_fmt(ov['ratio'], '.3f')}** (goal {ov['goal']}: {'met' if ov['met'] else 'not met'}).",
                "Per pass (HTTP / in process tok/s): "
                + ", ".join(f"{p['http']:.1f} / {p['local']:.1f}" for p in ov["passes"]) + "."]
    out += ["", "## Definitions", "", DEFINITIONS]
    if "plot" in result.get("files", {}):
        out += ["![bench-serve](bench_serve.png)", ""]
    return "\n".join(out)


def write_outputs(result: dict, out: Path, plots: bool = True) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "bench_serve.json", "markdown": out / "bench_serve.md"}
    if plots:
        from adasd_core.bench.serve_plots import plot

        png = plot(result, out)
        if png:
            files["plot"] = png
    result["files"] = {k: str(v) for k, v in files.items()}
    files["json"].write_text(json.dumps(result, indent=1))
    files["markdown"].write_text(markdown(result))
    return files
