"""`python -m server [flags]`: the same as `adasd serve [flags]`.

Settings precedence: command-line flags > ADASD_* environment variables > YAML (--config or
$ADASD_CONFIG) > defaults. Every setting has a flag named after it (max_running -> --max-running).
"""

from __future__ import annotations

import argparse
import sys
import traceback

from pydantic import ValidationError

from server.settings import CONFIG_ENV, Settings

HELP = {
    "target": "target model: 'smollm2' or 'tiny' (built-in pairs), a hub id or a local folder",
    "draft": "draft model: 'auto' (self on a float32 CPU target, else 'smollm2'), 'smollm2' (the default target's "
             "distilled draft), 'smollm2-eagle3' (the default target's EAGLE-3 head), 'tiny', a hub id or a "
             "local folder (a draft model or an EAGLE-3 head), 'self[:int4|int8[:full|HEAD]]' (the target's own "
             "weights quantised at load, over its KV cache), or 'none' (method ar only)",
    "served_model_name": "model id clients send (default: smollm2-135m-instruct / adasd-tiny, else the target id)",
    "device": "auto | cpu | cuda | cuda:N | mps",
    "dtype": "auto | float32 | bfloat16 | float16",
    "device_map": "'auto' to spread a large target over several GPUs",
    "method": "default method: ar | vanilla | gen-only | verify-only | adasd | hybrid",
    "k": "draft length for vanilla / verify-only",
    "verification": "relaxed check: bayes | threshold | none",
    "max_model_len": "cap the context length",
    "api_key": "require `Authorization: Bearer KEY` on /v1/* (prefer ADASD_API_KEY: flags show in ps)",
    "max_queue": "generations that may wait beyond the running ones before requests get 429",
    "max_running": "generations batched together (the KV pool is sized for this many full-length sequences when "
                   "memory allows; with less, the newest request is preempted when blocks run out)",
    "gpu_memory_fraction": "share of the GPU the models and KV blocks may use",
    "block_size": "positions per KV block: a power of two from 1 to 256",
    "kv_blocks": "KV blocks per pool instead of what memory and max_running give (at least one full-length "
                 "sequence's; for capacity trials)",
    "prefix_caching": "reuse the KV blocks of a prompt prefix that an earlier request computed "
                      "(--no-prefix-caching: every prompt is computed in full)",
    "batch_aware": "cap adaptive drafts by what pays at the current batch size (off: for experiments)",
    "vllm_metric_names": "also publish the load and KV series under vLLM's names (vllm:num_requests_waiting, "
                         "...) for endpoint pickers configured for vLLM",
    "warm_epoch_rounds": "a method family's warm-start statistics are first published after this many rounds, "
                         "then each time its rounds double",
    "warm_freeze_rounds": "no publication after a snapshot of this many rounds (0: never freeze)",
    "tool_parser": "how tool_choice \"auto\" reads tool calls from the output: hermes (Qwen2.5, Hermes) | llama3_json "
                   "(Llama 3.1, 3.2) | none | auto (from the chat template)",
    "max_body_bytes": "largest request body (413 beyond)",
    "shutdown_timeout": "seconds in-flight requests get to finish on SIGTERM",
}
ALIASES = {"tool_parser": ["--tool-call-parser"]}  # vLLM's name of the flag


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="adasd serve",
        description="OpenAI-compatible server with adaptive speculative decoding. Settings precedence: "
                    "flags > ADASD_* environment variables > YAML config > defaults.",
    )
    p.add_argument("--config", default=None, help=f"YAML file of flat settings (or ${CONFIG_ENV})")
    for name, field in Settings.model_fields.items():
        flags = ["--" + name.replace("_", "-"), *ALIASES.get(name, [])]
        default = "" if field.default is None else f" (default: {field.default})"
        help_text = HELP.get(name, name.replace("_", " ")) + default
        if field.annotation is bool:
            p.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            p.add_argument(*flags, dest=name, default=None, metavar=name.upper(), help=help_text)
    return p


def settings_from_args(argv: list[str] | None = None) -> Settings:
    args = vars(parser().parse_args(argv))
    config = args.pop("config")
    return Settings.load(config, **args)


def check_models(settings: Settings) -> None:
    """Refuse, before the worker starts, a target or draft that cannot be found or lacks files: one
    message and exit status 1 (the traceback too at --log-level debug). Cheap: no torch, no weights."""
    from adasd_core.errors import ModelLoadError
    from adasd_core.model_files import check_pair

    try:
        check_pair(settings.target, settings.draft)
    except ModelLoadError as exc:
        if settings.log_level in ("debug", "trace"):
            traceback.print_exc()
        print(f"adasd serve: error: {exc.message}", file=sys.stderr)
        raise SystemExit(1) from None


def main(argv: list[str] | None = None) -> None:
    try:
        settings = settings_from_args(argv)
    except (ValidationError, FileNotFoundError, ValueError) as exc:
        print(f"adasd serve: invalid settings:\n{exc}", file=sys.stderr)
        raise SystemExit(2) from None
    check_models(settings)
    from server.app import run

    run(settings)


if __name__ == "__main__":
    main()
