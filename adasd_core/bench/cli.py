"""Typer commands for `adasd bench` and `adasd bench-serve`; adasd_core/cli.py registers them:

    from adasd_core.bench.cli import bench, bench_serve
    app.command("bench")(bench)
    app.command("bench-serve")(bench_serve)
"""

from __future__ import annotations

import json

import typer
from rich.console import Console

from adasd_core.bench.methods import METHOD_KEYS

console = Console()


def _split(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def bench(
    tasks: str = typer.Option("next-line,continuation", help="Comma-separated: next-line, continuation, gsm8k, "
                              "humaneval, mmlu (the last three need --gsm8k/--humaneval/--mmlu PATH)."),
    methods: str = typer.Option(",".join(METHOD_KEYS), help="Comma-separated rows to run."),
    modes: str = typer.Option("greedy,sampled", help="greedy (temperature 0) and/or sampled."),
    temperature: float = typer.Option(0.7, help="Temperature of the sampled mode."),
    prompts: int = typer.Option(8, help="Prompts of the continuation (speed) task."),
    next_line_prompts: int = typer.Option(100, "--next-line-prompts", help="Prompts of the next-line task."),
    eval_prompts: int = typer.Option(50, "--eval-prompts", help="Prompts per GSM8K/HumanEval/MMLU file (0: all)."),
    repeats: int = typer.Option(3, help="Repeats of the continuation task (medians are reported)."),
    max_tokens: int = typer.Option(128, "--max-tokens", help="New tokens per continuation request."),
    k: int = typer.Option(5, help="Draft length of vanilla SD and verify-only."),
    gsm8k: str | None = typer.Option(None, help="GSM8K JSONL (question, answer)."),
    humaneval: str | None = typer.Option(None, help="HumanEval JSONL (task_id, prompt, test, entry_point)."),
    mmlu: str | None = typer.Option(None, help="MMLU JSONL (question, choices, answer)."),
    chat: bool = typer.Option(False, help="Wrap GSM8K/HumanEval/MMLU prompts in the tokenizer's chat template."),
    out: str = typer.Option("bench_results", help="Output folder (bench.md, bench.json, PNGs)."),
    threads: int | None = typer.Option(None, help="torch threads (default: torch's choice)."),
    seed: int = typer.Option(0),
    quick: bool = typer.Option(False, help="A few tiny prompts: checks the pipeline in seconds."),
    plots: bool = typer.Option(True, "--plots/--no-plots"),
    as_json: bool = typer.Option(False, "--json", help="Print the result rows as JSON."),
    target: str = typer.Option("smollm2", help="Target model: 'smollm2', 'tiny', a hub id or a local path."),
    draft: str = typer.Option("smollm2", help="Draft model: 'smollm2', 'tiny', a hub id or a local path."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16."),
):
    """Benchmark every method in process: tokens/s, accuracy, speedups, acceptance, fidelity."""
    from adasd_core.bench.harness import BenchConfig, run_bench

    opts = dict(target=target, draft=draft, device=device, dtype=dtype, tasks=_split(tasks), methods=_split(methods),
                modes=_split(modes), temperature=temperature, k=k, gsm8k=gsm8k, humaneval=humaneval, mmlu=mmlu,
                chat=chat, out_dir=out, threads=threads, seed=seed, plots=plots)
    if not quick:
        opts.update(continuation_prompts=prompts, next_line_prompts=next_line_prompts,
                    eval_prompts=eval_prompts or None, repeats=repeats, max_tokens=max_tokens)
    try:
        cfg = BenchConfig.quick(**opts) if quick else BenchConfig(**opts)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    result = run_bench(cfg, progress=not as_json)
    if as_json:
        print(json.dumps({"rows": result["rows"], "targets": result["targets"], "files": result["files"]}))
        return
    print(open(result["files"]["markdown"]).read())  # plain: a console would re-wrap the table


def bench_serve(
    base_url: str = typer.Argument("http://127.0.0.1:8000", help="The server's base URL."),
    concurrency: str = typer.Option("1,2,4,8,16", help="Comma-separated concurrency levels."),
    methods: str = typer.Option("ar,adasd,hybrid", help="Comma-separated rows, each sent as the adasd.method "
                                "extension ('server': none, the server's default)."),
    requests: int = typer.Option(0, help="Requests per level, row and repeat (0: max(8, 2 x concurrency))."),
    repeats: int = typer.Option(3, help="Passes over levels x rows, interleaved (aggregate tok/s: the median)."),
    max_tokens: int = typer.Option(128, "--max-tokens"),
    temperature: float = typer.Option(0.0),
    prompts_file: str | None = typer.Option(None, "--prompts-file", help="JSONL of {\"prompt\": ...} "
                                               "(default: the built-in set, --prompt-set)."),
    prompt_set: str = typer.Option("auto", "--prompt-set", help="chat (held-out chat and code requests), windows "
                                   "(the tiny pair's held-out modules), or auto (windows for tiny, else chat)."),
    external: str | None = typer.Option(None, help="Another OpenAI-compatible server's base URL (llama-server, "
                                           "vLLM...): a row of its own, plain OpenAI requests, same prompts."),
    external_name: str = typer.Option("external", "--external-name", help="The external server's row name."),
    external_model: str | None = typer.Option(None, "--external-model",
                                                 help="Model name to send it (default: the first of its /v1/models)."),
    external_api_key: str | None = typer.Option(None, "--external-api-key"),
    arrival_rate: float = typer.Option(0.0, "--arrival-rate", help="Requests/s of the arrivals-while-streaming "
                                       "rows (ITL p99, stalls of running streams); 0: none."),
    arrival_pattern: str = typer.Option("poisson", "--arrival-pattern", help="poisson or fixed (every 1/rate s)."),
    arrival_requests: int = typer.Option(16, "--arrival-requests", help="Requests per arrivals row and repeat."),
    baseline: str | None = typer.Option(None, help="An earlier bench_serve.json: adasd at 1 client must be "
                                           "no slower (a target row)."),
    method: str = typer.Option("adasd", help="The method the overhead ratio runs (over HTTP and in process)."),
    ignore_eos: bool = typer.Option(True, "--ignore-eos/--no-ignore-eos"),
    in_process: bool = typer.Option(True, "--in-process/--no-in-process",
                                    help="Also run the engine in process for the overhead ratio."),
    overhead_repeats: int = typer.Option(3, "--overhead-repeats",
                                         help="Passes of the interleaved HTTP / in-process comparison (median)."),
    model: str | None = typer.Option(None, help="Model name to send (default: the first of /v1/models)."),
    api_key: str | None = typer.Option(None, "--api-key", envvar="OPENAI_API_KEY"),
    out: str = typer.Option("bench_results"),
    threads: int | None = typer.Option(None),
    plots: bool = typer.Option(True, "--plots/--no-plots"),
    as_json: bool = typer.Option(False, "--json"),
    target: str = typer.Option("smollm2", help="In-process target (and the prompts' tokenizer)."),
    draft: str = typer.Option("auto", help="In-process draft (auto: the server's default)."),
    device: str = typer.Option("auto"),
    dtype: str = typer.Option("auto"),
):
    """Benchmark a running server over HTTP: a sweep of concurrency levels x methods (aggregate and
    per-request tokens/s, TTFT, inter-token latency, speedup over ar), arrivals while others stream,
    an external server's row, and the HTTP overhead."""
    from adasd_core.bench.serve import ServeBenchConfig, run_bench_serve

    externals = [{"name": external_name, "base_url": external, "model": external_model,
                  "api_key": external_api_key}] if external else []
    try:
        cfg = ServeBenchConfig(base_url=base_url, concurrency=tuple(int(c) for c in _split(concurrency)),
                               methods=tuple(m for m in _split(methods)), requests=requests or None, repeats=repeats,
                               max_tokens=max_tokens, temperature=temperature,
                               prompts_file=prompts_file, prompt_set=prompt_set,
                               method=None if method == "server" else method, externals=externals,
                               arrival_rate=arrival_rate, arrival_pattern=arrival_pattern,
                               arrival_requests=arrival_requests, baseline=baseline,
                               ignore_eos=ignore_eos, in_process=in_process, overhead_repeats=overhead_repeats,
                               model=model, api_key=api_key,
                               out_dir=out, threads=threads, plots=plots, target=target, draft=draft, device=device,
                               dtype=dtype)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    try:
        result = run_bench_serve(cfg, progress=not as_json)
    except Exception as exc:  # noqa: BLE001 - an unreachable server is the usual cause: say so plainly
        import httpx

        if isinstance(exc, httpx.HTTPError):
            try:
                url = exc.request.url
            except RuntimeError:  # an error raised without a request
                url = cfg.base_url
            console.print(f"[red]error:[/red] cannot reach {url}: {exc}")
            raise typer.Exit(2) from None
        raise
    if as_json:
        print(json.dumps({k: result[k] for k in ("rows", "levels", "arrivals", "targets", "in_process", "overhead",
                                                 "files")}))
        return
    print(open(result["files"]["markdown"]).read())  # plain: a console would re-wrap the table
