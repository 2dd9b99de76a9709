"""The sweep of `adasd bench-serve`: concurrency levels x methods against one server, interleaved.

For each repeat, for each concurrency level c, every run (one per method, sent to our server as the
`adasd.method` extension, then one per external server, with plain OpenAI requests) in an order
rotated from level to level and repeat to repeat: the level's requests, c in flight at a time. So
machine noise falls on every method alike. A row (level, method) pools its requests over repeats
for the percentiles; its aggregate tok/s is the median over repeats of (tokens / wall time).

Optionally, arrivals while others stream: per method, `arrival_requests` requests sent at fixed
intervals or Poisson times (the same times for every method), whatever is still streaming; it
reports ITL and chunk gaps, and the gaps of running streams that span another request's arrival.

Then (optional) the overhead ratio: one HTTP stream against the engine in process, same prompts.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from adasd_core.bench.serve_client import (
    Endpoint,
    RequestResult,
    normalise_url,
    percentile,
    run_closed,
    run_open,
    server_model,
    stalls_at_arrivals,
    wait_until_ready,
)
from adasd_core.bench.serve_goals import (  # noqa: F401
    BASELINE_GOAL,
    EXTERNAL_BEST_AT_8_GOAL,
    EXTERNAL_ONE_CLIENT_GOAL,
    ITL_P99_OVER_MEDIAN_GOAL,
    REFERENCE,
    SCALING_GOAL,
    VS_AR_GOAL,
    vs_ar_goal,
)
from adasd_core.bench.serve_report import write_outputs
from adasd_core.device import machine_info

DEFAULT_CONCURRENCY = (1, 2, 4, 8, 16)
SWEEP_METHODS = ("ar", "adasd", "hybrid")  # the CLI's default rows


@dataclass
class ServeBenchConfig:
    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None  # None: the first id /v1/models lists
    api_key: str | None = None
    concurrency: tuple[int, ...] = DEFAULT_CONCURRENCY
    methods: tuple[str, ...] | None = None  # rows sent as adasd.method; None: just `method`
    requests: int | None = None  # per level, method and repeat; None: max(8, 2 x concurrency)
    repeats: int = 1  # passes over levels x methods (medians of aggregate tok/s)
    max_tokens: int = 128
    temperature: float = 0.0
    prompts: int = 16  # distinct prompts (held-out module windows), used in turn
    prompt_tokens: int = 128
    prompts_file: str | None = None  # JSONL of {"prompt": "..."} instead of the built-in prompts
    # built-in prompts: "chat" (held-out chat and code requests in the chat template), "windows" (windows
    # of the tiny pair's held-out modules); "auto": windows for the tiny pair, chat otherwise
    prompt_set: str = "auto"
    method: str | None = "adasd"  # the in-process method of the overhead ratio (and the row when methods is None)
    ignore_eos: bool = True  # vLLM's extension (llama-server takes it too): every request generates max_tokens
    extra_body: dict = field(default_factory=dict)  # merged into every request body sent to our server
    externals: list[dict] = field(default_factory=list)  # [{name, base_url, model?, api_key?}]: one row each
    arrival_rate: float = 0.0  # requests/s of the arrivals-while-streaming rows; 0: none
    arrival_pattern: str = "poisson"  # poisson | fixed
    arrival_requests: int = 16
    in_process: bool = True  # also run the in-process engine for the overhead ratio
    overhead_repeats: int = 3  # passes of the interleaved HTTP / in-process comparison (median ratio)
    baseline: str | None = None  # an earlier bench_serve.json: adasd at 1 client must be no slower
    target: str = "smollm2"  # the in-process pair (and the tokenizer of the prompts)
    draft: str = "auto"  # as the server's default
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    timeout_s: float = 600.0
    ready_timeout_s: float = 600.0  # how long to wait for a server that is still loading (503 on /ready)
    threads: int | None = None
    out_dir: str = "bench_results"
    plots: bool = True

    def __post_init__(self) -> None:
        self.concurrency = tuple(int(c) for c in self.concurrency)
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError("concurrency levels must be >= 1")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.overhead_repeats < 1 or self.repeats < 1:
            raise ValueError("repeats must be >= 1")
        if self.arrival_rate < 0 or self.arrival_requests < 1:
            raise ValueError("arrival_rate must be >= 0 and arrival_requests >= 1")
        if self.prompt_set not in ("auto", "chat", "windows"):
            raise ValueError(f"unknown prompt set {self.prompt_set!r}: use auto, chat or windows")
        if self.arrival_pattern not in ("poisson", "fixed"):
            raise ValueError(f"unknown arrival pattern {self.arrival_pattern!r}: use poisson or fixed")
        self.methods = tuple(None if m == "server" else m for m in self.methods) if self.methods else None
        self.base_url = normalise_url(self.base_url)
        names = [m or "server" for m in self.row_methods()] + [e["name"] for e in self.externals]
        if len(set(names)) != len(names):
            raise ValueError(f"row names must be distinct: {', '.join(names)}")
        for e in self.externals:
            if not e.get("name") or not e.get("base_url"):
                raise ValueError("an external server needs a name and a base URL")

    def requests_for(self, concurrency: int) -> int:
        return self.requests if self.requests else max(8, 2 * concurrency)

    def row_methods(self) -> tuple[str | None, ...]:
        """The methods sent to our server, one row each (None: no extension, the server's default)."""
        return self.methods if self.methods else (self.method,)


@dataclass
class Run:
    """One row of the sweep: a method on our server, or an external server."""

    key: str  # the row's name: the method, or the external server's name
    endpoint: Endpoint
    method: str | None  # adasd.method (None: none sent)
    model: str = ""


def request_body(cfg: ServeBenchConfig, run: Run, prompt: str, index: int) -> dict:
    body = {"model": run.model, "prompt": prompt, "max_tokens": cfg.max_tokens, "temperature": cfg.temperature,
            "top_p": 1.0, "stream": True, "stream_options": {"include_usage": True}}
    if cfg.temperature > 0:
        body["seed"] = cfg.seed + index
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if run.endpoint.extension:
        if run.method:
            body["adasd"] = {"method": run.method}
        body.update(cfg.extra_body)
    return body


def arrival_offsets(cfg: ServeBenchConfig) -> list[float]:
    """Send times (s from the start) of the arrival rows: every 1/rate s, or a seeded Poisson process."""
    n, rate = cfg.arrival_requests, cfg.arrival_rate
    if cfg.arrival_pattern == "fixed":
        return [i / rate for i in range(n)]
    rng, t, out = random.Random(cfg.seed), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


# ----------------------------------------------------------------------------- summaries


def _ms(v):
    return None if v is None else round(v * 1e3, 2)


def _p(values, q):
    return _ms(percentile(values, q))


def speculative_summary(results: list[RequestResult]) -> dict | None:
    """Pooled over the requests that returned usage.speculative: drafted / rounds (mean draft length),
    accepted / drafted, generated / rounds."""
    stats = [r.speculative for r in results if r.ok and r.speculative]
    if not stats:
        return None
    total = lambda key: sum(s.get(key) or 0 for s in stats)  # noqa: E731
    rounds, drafted = total("rounds"), total("drafted_tokens")
    accepted = total("accepted_standard") + total("accepted_relaxed")
    return {"requests": len(stats), "rounds": rounds, "drafted_tokens": drafted,
            "mean_draft_length": round(drafted / rounds, 3) if rounds else None,
            "acceptance_rate": round(accepted / drafted, 3) if drafted else None,
            "tokens_per_round": round(total("generated_tokens") / rounds, 3) if rounds else None}


def summarise(key: str, concurrency: int | None, passes: list[tuple[list[RequestResult], float]]) -> dict:
    """One row from its passes (results, wall time) over repeats."""
    results = [r for rs, _ in passes for r in rs]
    ok = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in ok)
    per_pass = []
    for rs, wall in passes:
        t = sum(r.tokens for r in rs if r.ok)
        per_pass.append({"requests": len(rs), "errors": sum(not r.ok for r in rs), "tokens": t,
                         "wall_s": round(wall, 6), "tokens_per_s": round(t / wall, 2) if wall > 0 else None,
                         "requests_per_s": round(sum(r.ok for r in rs) / wall, 3) if wall > 0 else None})
    med = lambda k: (statistics.median(p[k] for p in per_pass)  # noqa: E731
                     if all(p[k] is not None for p in per_pass) else None)
    gaps = [g for r in ok for g in r.chunk_gaps_s]
    return {
        "method": key,
        "concurrency": concurrency,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "error_messages": sorted({r.error for r in results if r.error})[:5],
        "wall_s": round(sum(w for _, w in passes), 3),
        "tokens": tokens,
        # aggregate: all streams' tokens / the pass's wall time, median over passes
        "tokens_per_s": med("tokens_per_s"),
        "requests_per_s": med("requests_per_s"),
        # one request's own rate (tokens / its latency, TTFT included), as one client sees it
        "request_tokens_per_s": {"p50": round(percentile([r.tokens_per_s for r in ok], 50), 2) if ok else None},
        "stream_tokens_per_s": round(tokens / sum(r.latency_s for r in ok), 2) if ok else None,
        "ttft_ms": {"p50": _p([r.ttft_s for r in ok], 50), "p99": _p([r.ttft_s for r in ok], 99)},
        "itl_ms": {"p50": _p([r.itl_s for r in ok], 50), "p99": _p([r.itl_s for r in ok], 99)},
        "chunk_gap_ms": {"p50": _p(gaps, 50), "p99": _p(gaps, 99), "max": _ms(max(gaps)) if gaps else None},
        "latency_ms": {"p50": _p([r.latency_s for r in ok], 50), "p99": _p([r.latency_s for r in ok], 99)},
        "tokens_per_chunk": round(tokens / max(1, sum(r.chunks for r in ok)), 2),
        "token_count_source": sorted({r.token_source for r in ok}),
        "speculative": speculative_summary(ok),
        "passes": per_pass,
    }


def compare_levels(rows: list[dict], concurrency: tuple[int, ...]) -> list[dict]:
    """Per level: each row's aggregate tok/s over the `ar` row's, and the mean draft length per method."""
    out = []
    for c in concurrency:
        here = {r["method"]: r for r in rows if r["concurrency"] == c}
        ref = (here.get(REFERENCE) or {}).get("tokens_per_s")
        out.append({
            "concurrency": c,
            "tokens_per_s": {m: r["tokens_per_s"] for m, r in here.items()},
            f"speedup_vs_{REFERENCE}": {m: round(r["tokens_per_s"] / ref, 4) for m, r in here.items()
                                        if m != REFERENCE and ref and r["tokens_per_s"] is not None},
            "mean_draft_length": {m: r["speculative"]["mean_draft_length"] for m, r in here.items()
                                  if r["speculative"] and r["speculative"]["mean_draft_length"] is not None},
        })
    return out


def _verdict(target: str, value: float, goal: float, **extra) -> dict:
    value = round(value, 3)
    return {"target": target, **extra, "value": value, "goal": f">= {goal}", "threshold": goal, "met": value >= goal}


def baseline_tokens_per_s(path: str, method: str = "adasd", concurrency: int = 1) -> float | None:
    """An earlier bench_serve.json's aggregate tok/s for `method` at `concurrency` (this format's rows,
    or the single-method levels of the format before the sweep)."""
    old = json.loads(Path(path).read_text())
    for r in old.get("rows") or []:
        if r.get("method") == method and r.get("concurrency") == concurrency:
            return r.get("tokens_per_s")
    if (old.get("config") or {}).get("method") == method and not old.get("rows"):
        for lv in old.get("levels") or []:
            if lv.get("concurrency") == concurrency:
                return lv.get("tokens_per_s")
    return None


def check_targets(rows: list[dict], baseline: float | None = None, subject: str = "adasd",
                  externals: list[str] = (), arrivals: list[dict] = ()) -> list[dict]:
    """The serving targets (serve_goals), measured in this run: closed-loop rows, the external servers'
    rows, and the arrivals rows' inter-token latency."""
    def get(method: str, c: int) -> float | None:
        return next((r["tokens_per_s"] for r in rows if r["method"] == method and r["concurrency"] == c), None)

    out = []
    one, eight = get(subject, 1), get(subject, 8)
    if one and eight:
        out.append(_verdict("scaling_8_vs_1_client", eight / one, SCALING_GOAL, method=subject))
    for c in sorted({r["concurrency"] for r in rows}):
        a, b = get(subject, c), get(REFERENCE, c)
        if a and b:
            out.append(_verdict(f"vs_{REFERENCE}", a / b, vs_ar_goal(c), method=subject, concurrency=c))
    for name in externals:
        ext_one = get(name, 1)
        if one and ext_one:
            out.append(_verdict(f"vs_{name}", one / ext_one, EXTERNAL_ONE_CLIENT_GOAL, method=subject, concurrency=1))
        best = max((r["tokens_per_s"] for r in rows if r["method"] == name and r["tokens_per_s"]), default=None)
        if eight and best:
            out.append(_verdict(f"8_clients_vs_{name}_best", eight / best, EXTERNAL_BEST_AT_8_GOAL, method=subject,
                                concurrency=8))
    for r in arrivals:
        itl = r.get("itl_ms") or {}
        if r["method"] == subject and itl.get("p50") and itl.get("p99") is not None:
            ratio = round(itl["p99"] / itl["p50"], 3)
            out.append({"target": "arrivals_itl_p99_over_p50", "method": subject, "value": ratio,
                        "goal": f"<= {ITL_P99_OVER_MEDIAN_GOAL}", "threshold": ITL_P99_OVER_MEDIAN_GOAL,
                        "met": ratio <= ITL_P99_OVER_MEDIAN_GOAL})
    if one and baseline:
        out.append(_verdict("1_client_vs_baseline", one / baseline, BASELINE_GOAL, method=subject, concurrency=1))
    return out


# ----------------------------------------------------------------------------- prompts


def demo_prompts(tokenizer, n: int, prompt_tokens: int, max_tokens: int, context_length: int) -> list[str]:
    from adasd_core.bench.tasks import continuation_task, demo_sources

    task = continuation_task(tokenizer, demo_sources(), n, prompt_tokens, max_tokens, context_length)
    return [tokenizer.decode(p.ids) for p in task.prompts]


def file_prompts(path: str, n: int) -> list[str]:
    from adasd_core.bench.evals import read_jsonl

    rows = read_jsonl(path)
    bad = [i for i, r in enumerate(rows, 1) if not isinstance(r.get("prompt"), str)]
    if bad:
        raise ValueError(f"{path} record {bad[0]} needs a string field 'prompt'")
    return [r["prompt"] for r in rows[:n]]


# ----------------------------------------------------------------------------- in process


def overhead(cfg: ServeBenchConfig, engine, run: Run, prompts: list[str], count_tokens=None,
             on_done=None) -> tuple[dict, dict]:
    """One HTTP stream against the engine alone in this process, on the same prompts and
    parameters, timed from text in to result out (tokenization and prefill included, as the
    server's are). Prompt by prompt the two alternate which runs first, over
    cfg.overhead_repeats passes, so the machine's drift falls on both; the ratio is the median
    over passes of HTTP tok/s / in-process tok/s. Returns (in_process, overhead)."""
    from adasd_core.engine import SpecConfig
    from adasd_core.sampling import SamplingParams

    spec = SpecConfig(method=cfg.method) if cfg.method else engine.default_spec

    def params(i):
        return SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=1.0,
                              seed=cfg.seed + i if cfg.temperature > 0 else None, ignore_eos=cfg.ignore_eos)

    def local(i: int, prompt: str) -> tuple[int, float]:
        t0 = time.perf_counter()
        res = engine.generate(prompt, params(i), spec)
        return res.stats.generated_tokens, time.perf_counter() - t0

    def http(i: int, prompt: str) -> tuple[int, float]:
        res = asyncio.run(run_closed(run.endpoint, [request_body(cfg, run, prompt, i)], 1, count_tokens))[0][0]
        if not res.ok:
            raise RuntimeError(f"an HTTP request of the overhead comparison failed: {res.error}")
        return res.tokens, res.latency_s

    local(0, prompts[0])  # warm-up
    passes = []
    for r in range(cfg.overhead_repeats):
        totals = {"http": [0, 0.0], "local": [0, 0.0]}
        for i, prompt in enumerate(prompts):
            for kind in (("http", "local") if (i + r) % 2 == 0 else ("local", "http")):
                tokens, seconds = (http if kind == "http" else local)(i, prompt)
                totals[kind][0] += tokens
                totals[kind][1] += seconds
        passes.append({"local_tokens": totals["local"][0], **{k: round(t / s, 2) for k, (t, s) in totals.items()}})
        if on_done:
            on_done()
    med = lambda key: statistics.median(p[key] for p in passes)  # noqa: E731
    ratio = statistics.median(p["http"] / p["local"] for p in passes)
    in_process = {"method": spec.method, "requests": len(prompts) * len(passes),
                  "tokens": sum(p["local_tokens"] for p in passes), "tokens_per_s": med("local")}
    return in_process, {"http_single_stream_tokens_per_s": med("http"), "in_process_tokens_per_s": med("local"),
                        "ratio": round(ratio, 4), "passes": passes, "goal": ">= 0.95", "met": ratio >= 0.95}


# ----------------------------------------------------------------------------- driver


def _runs(cfg: ServeBenchConfig) -> list[Run]:
    ours = Endpoint("this server", cfg.base_url, cfg.model, cfg.api_key, extension=True, timeout_s=cfg.timeout_s,
                    ready_timeout_s=cfg.ready_timeout_s)
    runs = [Run(m or "server", ours, m) for m in cfg.row_methods()]
    for e in cfg.externals:
        ep = Endpoint(e["name"], e["base_url"], e.get("model"), e.get("api_key"), extension=False,
                      timeout_s=cfg.timeout_s, ready_timeout_s=cfg.ready_timeout_s)
        runs.append(Run(e["name"], ep, None))
    return runs


def _rotated(items: list, shift: int) -> list:
    shift %= len(items)
    return items[shift:] + items[:shift]


def run_bench_serve(cfg: ServeBenchConfig, progress: bool = True, pair=None) -> dict:
    """Benchmark the server at cfg.base_url (and cfg.externals); write bench_serve.{json,md,png}
    under cfg.out_dir."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started = time.time()
    tokenizer, context = None, 1 << 30
    if cfg.in_process or cfg.prompts_file is None:
        if pair is None and cfg.in_process:
            from adasd_core.models import load_pair

            pair = load_pair(cfg.target, cfg.draft, device=cfg.device, dtype=cfg.dtype)
        if pair is not None:
            tokenizer, context = pair.tokenizer, pair.context_length
        else:
            from transformers import AutoTokenizer

            from adasd_core.models import resolve_model_path

            tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.target, "target"))
    if cfg.prompts_file:
        prompts = file_prompts(cfg.prompts_file, cfg.prompts)
    elif cfg.prompt_set == "chat" or (cfg.prompt_set == "auto" and cfg.target != "tiny" and tokenizer.chat_template):
        from adasd_core.bench.tasks import chat_eval_prompts

        prompts = chat_eval_prompts(tokenizer, cfg.prompts)
    else:
        prompts = demo_prompts(tokenizer, cfg.prompts, cfg.prompt_tokens, cfg.max_tokens, context)
    count_tokens = (lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])) if tokenizer else None

    runs = _runs(cfg)
    models: dict[str, str] = {}
    for run in runs:
        ep = run.endpoint
        if ep.name not in models:
            wait_until_ready(ep)
            models[ep.name] = ep.model or server_model(ep)
        run.model = models[ep.name]
    # warm-up (not counted), one request per row: the first request of a method pays for lazy initialisation
    warm = {run.key: asyncio.run(run_closed(run.endpoint, [request_body(cfg, run, prompts[0], 0)], 1,
                                            count_tokens))[0][0] for run in runs}

    def bodies(run: Run, n: int) -> list[dict]:
        return [request_body(cfg, run, prompts[i % len(prompts)], i) for i in range(n)]

    closed: dict[tuple[int, str], list] = {}
    opened: dict[str, list] = {}
    offsets = arrival_offsets(cfg) if cfg.arrival_rate > 0 else []
    total = cfg.repeats * len(runs) * (sum(cfg.requests_for(c) for c in cfg.concurrency) + len(offsets))
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   disable=not progress)
    local = ratio = None
    with bar:
        job = bar.add_task("sweep", total=total)
        step = lambda: bar.advance(job)  # noqa: E731
        for r in range(cfg.repeats):
            for li, c in enumerate(cfg.concurrency):
                for run in _rotated(runs, r + li):
                    bar.update(job, description=f"r{r + 1}/{cfg.repeats} c={c} {run.key}")
                    closed.setdefault((c, run.key), []).append(
                        asyncio.run(run_closed(run.endpoint, bodies(run, cfg.requests_for(c)), c, count_tokens, step)))
            if offsets:
                for run in _rotated(runs, r):
                    bar.update(job, description=f"r{r + 1}/{cfg.repeats} arrivals {run.key}")
                    opened.setdefault(run.key, []).append(
                        asyncio.run(run_open(run.endpoint, bodies(run, len(offsets)), offsets, count_tokens, step)))
        if cfg.in_process:
            from adasd_core.llm import LLM

            n1 = cfg.requests_for(1)
            ours = next((run for run in runs if run.endpoint.extension and run.method == cfg.method), None) or Run(
                cfg.method or "server", runs[0].endpoint, cfg.method, runs[0].model)
            ojob = bar.add_task("HTTP vs in process", total=cfg.overhead_repeats)
            local, ratio = overhead(cfg, LLM(pair), ours, [prompts[i % len(prompts)] for i in range(n1)],
                                    count_tokens, on_done=lambda: bar.advance(ojob))

    rows = [summarise(run.key, c, closed[(c, run.key)]) for c in cfg.concurrency for run in runs]
    arrivals = []
    for run in runs:
        if run.key in opened:
            row = summarise(run.key, None, opened[run.key])
            stalls = [s for rs, _ in opened[run.key] for s in stalls_at_arrivals(rs)]
            row.update(arrival_rate=cfg.arrival_rate, arrival_pattern=cfg.arrival_pattern,
                       stall_at_arrival_ms={"count": len(stalls), "p50": _p(stalls, 50), "p99": _p(stalls, 99),
                                            "max": _ms(max(stalls)) if stalls else None})
            arrivals.append(row)
    base = baseline_tokens_per_s(cfg.baseline) if cfg.baseline else None
    config = {k: v for k, v in asdict(cfg).items() if k != "api_key"}
    config["externals"] = [{k: v for k, v in e.items() if k != "api_key"} for e in cfg.externals]
    result = {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "wall_s": round(time.time() - started, 1),
        "machine": machine_info(),
        "server": {"base_url": cfg.base_url, "model": models[runs[0].endpoint.name],
                   "warm_up_ok": all(w.ok for w in warm.values()),
                   "warm_up_error": next((f"{k}: {w.error}" for k, w in warm.items() if w.error), None)},
        "externals": [{"name": run.key, "base_url": run.endpoint.base_url, "model": run.model}
                      for run in runs if not run.endpoint.extension],
        "config": config,
        "rows": rows,
        "levels": compare_levels(rows, cfg.concurrency),
        "arrivals": arrivals,
        "baseline": {"path": cfg.baseline, "tokens_per_s": base} if cfg.baseline else None,
        "targets": check_targets(rows, base, externals=[run.key for run in runs if not run.endpoint.extension],
                                 arrivals=arrivals),
        "in_process": local,
        "overhead": ratio,
    }
    write_outputs(result, Path(cfg.out_dir), plots=cfg.plots)
    return result
