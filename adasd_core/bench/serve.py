"""`adasd bench-serve`: a running OpenAI-compatible server, over HTTP, at several concurrencies.

Each request is POST /v1/completions with stream=true (and stream_options.include_usage, so the
final chunk carries the token count). Per concurrency level: aggregate tokens/s, TTFT and
inter-token latency p50/p99, errors. Then the in-process engine runs the same prompts one at a
time, for the overhead ratio: HTTP single-stream tokens/s / in-process tokens/s.

Definitions (per request, times from sending the request):
- TTFT: until the first chunk with text.
- inter-token latency (ITL): (latency - TTFT) / (tokens - 1), the mean gap between tokens after the
  first (vLLM's TPOT). A speculative server sends several tokens per chunk, so the gaps between
  chunks are reported separately (chunk gap p50/p99).
- tokens: usage.completion_tokens from the stream; when the server sends no usage, the completion
  re-tokenized with the local tokenizer (marked in the results).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from adasd_core.device import machine_info

DEFAULT_CONCURRENCY = (1, 4, 8, 16)


@dataclass
class ServeBenchConfig:
    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None  # None: the first id /v1/models lists
    api_key: str | None = None
    concurrency: tuple[int, ...] = DEFAULT_CONCURRENCY
    requests: int | None = None  # per level; None: max(8, 2 x concurrency)
    max_tokens: int = 128
    temperature: float = 0.0
    prompts: int = 16  # distinct prompts (held-out module windows), used in turn
    prompt_tokens: int = 128
    prompts_file: str | None = None  # JSONL of {"prompt": "..."} instead of the demo prompts
    method: str | None = "adasd"  # sent as the `adasd.method` extension and run in process; None: defaults
    ignore_eos: bool = True  # vLLM's extension: every request generates max_tokens tokens
    extra_body: dict = field(default_factory=dict)  # merged into every request body
    in_process: bool = True  # also run the in-process engine for the overhead ratio
    overhead_repeats: int = 3  # passes of the interleaved HTTP / in-process comparison (median ratio)
    target: str = "demo"  # the in-process pair (and the tokenizer for the demo prompts)
    draft: str = "demo"
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
        if self.overhead_repeats < 1:
            raise ValueError("overhead_repeats must be >= 1")
        self.base_url = self.base_url.rstrip("/")
        if self.base_url.endswith("/v1"):
            self.base_url = self.base_url[:-3]

    def requests_for(self, concurrency: int) -> int:
        return self.requests if self.requests else max(8, 2 * concurrency)


@dataclass
class RequestResult:
    index: int
    ok: bool
    tokens: int = 0
    token_source: str = "usage"  # "usage" | "tokenizer"
    ttft_s: float | None = None
    latency_s: float | None = None
    chunks: int = 0
    chunk_gaps_s: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    text: str = ""

    @property
    def itl_s(self) -> float | None:
        if self.ttft_s is None or self.latency_s is None or self.tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.tokens - 1)


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# ----------------------------------------------------------------------------- HTTP


def _headers(cfg: ServeBenchConfig) -> dict:
    return {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}


def wait_until_ready(cfg: ServeBenchConfig, poll_s: float = 2.0) -> None:
    """Poll GET /ready (adasd's readiness probe) while it answers 503; a server without the
    endpoint (404) counts as ready. An unreachable server raises at once."""
    import httpx

    deadline = time.monotonic() + cfg.ready_timeout_s
    while True:
        r = httpx.get(f"{cfg.base_url}/ready", headers=_headers(cfg), timeout=30)
        if r.status_code != 503:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{cfg.base_url} was not ready after {cfg.ready_timeout_s:g} s: {r.text[:200]}")
        time.sleep(poll_s)


def server_model(cfg: ServeBenchConfig) -> str:
    import httpx

    r = httpx.get(f"{cfg.base_url}/v1/models", headers=_headers(cfg), timeout=30)
    r.raise_for_status()
    data = r.json().get("data") or []
    if not data:
        raise RuntimeError(f"{cfg.base_url}/v1/models lists no model")
    return data[0]["id"]


def request_body(cfg: ServeBenchConfig, model: str, prompt: str, index: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": cfg.max_tokens, "temperature": cfg.temperature,
            "top_p": 1.0, "stream": True, "stream_options": {"include_usage": True}}
    if cfg.temperature > 0:
        body["seed"] = cfg.seed + index
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if cfg.method:
        body["adasd"] = {"method": cfg.method}
    body.update(cfg.extra_body)
    return body


async def stream_one(client, body: dict, index: int, count_tokens=None) -> RequestResult:
    """One streamed completion; never raises (failures come back as ok=False)."""
    import httpx

    res = RequestResult(index=index, ok=False)
    texts: list[str] = []
    usage = None
    done = False
    last = None
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                detail = (await resp.aread()).decode("utf-8", "replace")[:300]
                res.error = f"HTTP {resp.status_code}: {detail}"
                res.latency_s = time.perf_counter() - t0
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    done = True
                    break
                chunk = json.loads(payload)
                if "error" in chunk:
                    err = chunk["error"]
                    res.error = "in-stream error: " + (err.get("message", str(err)) if isinstance(err, dict) else str(err))
                    break
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    text = choice.get("text") or ""
                    if text:
                        now = time.perf_counter()
                        if res.ttft_s is None:
                            res.ttft_s = now - t0
                        else:
                            res.chunk_gaps_s.append(now - last)
                        last = now
                        res.chunks += 1
                        texts.append(text)
                    if choice.get("finish_reason"):
                        res.finish_reason = choice["finish_reason"]
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    res.latency_s = time.perf_counter() - t0
    res.text = "".join(texts)
    if res.error is None and not done:
        res.error = "the stream ended without data: [DONE]"
    if usage and usage.get("completion_tokens") is not None:
        res.tokens = int(usage["completion_tokens"])
    elif count_tokens is not None:
        res.tokens, res.token_source = count_tokens(res.text), "tokenizer"
    else:
        res.tokens, res.token_source = res.chunks, "chunks"
    res.ok = res.error is None
    return res


async def run_level(cfg: ServeBenchConfig, bodies: list[dict], concurrency: int, count_tokens=None,
                    on_done=None) -> tuple[list[RequestResult], float]:
    """All bodies, `concurrency` in flight at a time. Returns the results and the level's wall time."""
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for i, body in enumerate(bodies):
        queue.put_nowait((i, body))
    results: list[RequestResult] = []
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=cfg.base_url, headers=_headers(cfg), limits=limits,
                                 timeout=httpx.Timeout(cfg.timeout_s, connect=30.0)) as client:
        async def worker() -> None:
            while True:
                try:
                    i, body = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results.append(await stream_one(client, body, i, count_tokens))
                if on_done:
                    on_done()

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    results.sort(key=lambda r: r.index)
    return results, wall


def level_summary(concurrency: int, results: list[RequestResult], wall_s: float) -> dict:
    ok = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in ok)
    ms = lambda v: None if v is None else round(v * 1e3, 2)  # noqa: E731
    gaps = [g for r in ok for g in r.chunk_gaps_s]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "error_messages": sorted({r.error for r in results if r.error})[:5],
        "wall_s": round(wall_s, 3),
        "tokens": tokens,
        "tokens_per_s": round(tokens / wall_s, 2) if wall_s > 0 else None,
        "requests_per_s": round(len(ok) / wall_s, 3) if wall_s > 0 else None,
        # one stream's own rate (tokens / its latency, TTFT included), as a single client sees it
        "stream_tokens_per_s": round(tokens / sum(r.latency_s for r in ok), 2) if ok else None,
        "ttft_ms": {"p50": ms(percentile([r.ttft_s for r in ok], 50)), "p99": ms(percentile([r.ttft_s for r in ok], 99))},
        "itl_ms": {"p50": ms(percentile([r.itl_s for r in ok], 50)), "p99": ms(percentile([r.itl_s for r in ok], 99))},
        "chunk_gap_ms": {"p50": ms(percentile(gaps, 50)), "p99": ms(percentile(gaps, 99))},
        "latency_ms": {"p50": ms(percentile([r.latency_s for r in ok], 50)),
                       "p99": ms(percentile([r.latency_s for r in ok], 99))},
        "tokens_per_chunk": round(tokens / max(1, sum(r.chunks for r in ok)), 2),
        "token_count_source": sorted({r.token_source for r in ok}),
    }


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


def overhead(cfg: ServeBenchConfig, engine, model: str, prompts: list[str], count_tokens=None,
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
        res = asyncio.run(run_level(cfg, [request_body(cfg, model, prompt, i)], 1, count_tokens))[0][0]
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


def run_bench_serve(cfg: ServeBenchConfig, progress: bool = True, pair=None) -> dict:
    """Benchmark the server at cfg.base_url; write bench_serve.{json,md,png} under cfg.out_dir."""
    import torch
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

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
    else:
        prompts = demo_prompts(tokenizer, cfg.prompts, cfg.prompt_tokens, cfg.max_tokens, context)
    count_tokens = (lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])) if tokenizer else None

    wait_until_ready(cfg)
    model = cfg.model or server_model(cfg)
    # warm-up (not counted): the server's first request pays for lazy initialisation
    warm = asyncio.run(run_level(cfg, [request_body(cfg, model, prompts[0], 0)], 1, count_tokens))[0][0]
    levels = []
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   disable=not progress)
    with bar:
        for c in cfg.concurrency:
            n = cfg.requests_for(c)
            bodies = [request_body(cfg, model, prompts[i % len(prompts)], i) for i in range(n)]
            job = bar.add_task(f"concurrency {c}", total=n)
            results, wall = asyncio.run(run_level(cfg, bodies, c, count_tokens, on_done=lambda: bar.advance(job)))
            levels.append(level_summary(c, results, wall))
        local = ratio = None
        if cfg.in_process:
            from adasd_core.engine import SpeculativeEngine

            n1 = cfg.requests_for(1)
            job = bar.add_task("HTTP vs in process", total=cfg.overhead_repeats)
            local, ratio = overhead(cfg, SpeculativeEngine(pair), model, [prompts[i % len(prompts)] for i in range(n1)],
                                    count_tokens, on_done=lambda: bar.advance(job))
    result = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(time.time() - started, 1),
        "machine": machine_info(),
        "server": {"base_url": cfg.base_url, "model": model, "warm_up_ok": warm.ok,
                   "warm_up_error": warm.error},
        "config": {k: v for k, v in asdict(cfg).items() if k != "api_key"},
        "levels": levels,
        "in_process": local,
        "overhead": ratio,
    }
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "bench_serve.json", "markdown": out / "bench_serve.md"}
    if cfg.plots:
        png = _plot(result, out)
        if png:
            files["plot"] = png
    result["files"] = {k: str(v) for k, v in files.items()}
    files["json"].write_text(json.dumps(result, indent=1))
    files["markdown"].write_text(markdown(result))
    return result


def markdown(result: dict) -> str:
    cfg = result["config"]
    fmt = lambda v, spec=".1f": "-" if v is None else f"{v:{spec}}"  # noqa: E731
    lines = [
        "# adasd bench-serve", "",
        f"{result['created']}; server {result['server']['base_url']} (model `{result['server']['model']}`); "
        f"{result['wall_s']} s in all.", "",
        f"- Requests: /v1/completions, stream=true, max_tokens {cfg['max_tokens']}, temperature {cfg['temperature']}"
        f"{', ignore_eos' if cfg['ignore_eos'] else ''}{', adasd.method ' + cfg['method'] if cfg['method'] else ''}.",
        "- Machine (client side): " + ", ".join(f"{k} {v}" for k, v in result["machine"].items()),
        "- TTFT: to the first chunk with text. ITL: (latency - TTFT) / (tokens - 1) per request. "
        "Chunk gap: time between chunks (a round sends several tokens at once).", "",
        "| concurrency | requests | errors | tok/s (all streams) | tok/s (one stream) | TTFT p50 / p99 (ms) | "
        "ITL p50 / p99 (ms) | chunk gap p50 / p99 (ms) | tokens/chunk |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lv in result["levels"]:
        lines.append(
            f"| {lv['concurrency']} | {lv['requests']} | {lv['errors']} | {fmt(lv['tokens_per_s'])} | "
            f"{fmt(lv['stream_tokens_per_s'])} | {fmt(lv['ttft_ms']['p50'])} / {fmt(lv['ttft_ms']['p99'])} | "
            f"{fmt(lv['itl_ms']['p50'], '.2f')} / {fmt(lv['itl_ms']['p99'], '.2f')} | "
            f"{fmt(lv['chunk_gap_ms']['p50'], '.2f')} / {fmt(lv['chunk_gap_ms']['p99'], '.2f')} | "
            f"{fmt(lv['tokens_per_chunk'], '.2f')} |")
    errors = sorted({m for lv in result["levels"] for m in lv["error_messages"]})
    if errors:
        lines += ["", "Errors seen: " + "; ".join(f"`{e}`" for e in errors)]
    ov = result["overhead"]
    if ov:
        lines += ["", f"Overhead: one HTTP stream {fmt(ov['http_single_stream_tokens_per_s'])} tok/s, in process "
                      f"{fmt(result['in_process']['tokens_per_s'])} tok/s ({result['in_process']['method']}, same prompts "
                      f"and parameters, interleaved, medians of {len(ov['passes'])} passes): ratio "
                      f"**{fmt(ov['ratio'], '.3f')}** (goal {ov['goal']}: {'met' if ov['met'] else 'not met'}).",
                  "Per pass (HTTP / in process tok/s): "
                  + ", ".join(f"{p['http']:.1f} / {p['local']:.1f}" for p in ov["passes"]) + "."]
    return "\n".join(lines) + "\n"


def _plot(result: dict, out: Path):
    from adasd_core.bench.plots import _pyplot

    plt = _pyplot()
    levels = [lv for lv in result["levels"] if lv["tokens_per_s"] is not None]
    if not levels:
        return None
    c = [lv["concurrency"] for lv in levels]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    a1.plot(c, [lv["tokens_per_s"] for lv in levels], marker="o", label="all streams")
    a1.plot(c, [lv["stream_tokens_per_s"] for lv in levels], marker="o", label="one stream")
    if result.get("in_process"):
        a1.axhline(result["in_process"]["tokens_per_s"], ls="--", color="grey", label="in process, one request")
    a1.set_xlabel("concurrency")
    a1.set_ylabel("tokens/s")
    a1.legend(fontsize=8)
    for key, label in (("ttft_ms", "TTFT"), ("itl_ms", "ITL")):
        for q, ls in (("p50", "-"), ("p99", ":")):
            a2.plot(c, [lv[key][q] for lv in levels], marker="o", ls=ls, label=f"{label} {q}")
    a2.set_yscale("log")
    a2.set_xlabel("concurrency")
    a2.set_ylabel("ms")
    a2.legend(fontsize=8)
    fig.suptitle(f"bench-serve: {result['server']['model']}")
    path = out / "bench_serve.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
