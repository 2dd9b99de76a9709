"""Server settings: one flat model read from, in order of precedence,

    command-line flags  >  ADASD_* environment variables  >  YAML file  >  defaults

The YAML file is named by `--config` or by the ADASD_CONFIG environment variable; it uses exactly
the flat keys below (configs/*.yaml). Unknown keys are an error, so a typo does not pass silently.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from adasd_core.drafting import WINDOW

CONFIG_ENV = "ADASD_CONFIG"
MAX_BLOCK_SIZE = 256
# the `model` clients send for the built-in pairs (any other target is served under its own id)
BUILTIN_SERVED_NAMES = {"smollm2": "smollm2-135m-instruct", "tiny": "adasd-tiny"}

# mirrors adasd_core.engine.METHODS / VERIFICATIONS (kept here so settings load without torch;
# tests/server/test_settings.py checks they agree)
Method = Literal["ar", "vanilla", "gen-only", "verify-only", "adasd", "hybrid"]
Verification = Literal["bayes", "threshold", "none"]
LogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]
ToolParserName = Literal["auto", "hermes", "llama3_json", "none"]  # server/tool_parsers.py

_yaml_data: ContextVar[dict[str, Any] | None] = ContextVar("_yaml_data", default=None)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ADASD_", extra="forbid", validate_default=True)

    # models
    target: str = "smollm2"
    draft: str | None = "auto"  # self on a float32 CPU target, else the default target's distilled draft
    served_model_name: str | None = None  # default: smollm2-135m-instruct / adasd-tiny, else the target id
    device: str = "auto"
    dtype: str = "auto"
    device_map: Literal["auto"] | None = None
    trust_remote_code: bool = False
    max_model_len: int | None = Field(None, ge=2)
    # speculative decoding defaults (a request may override them in its `adasd` object)
    method: Method = "adasd"
    k: int = Field(5, ge=1, le=WINDOW)
    verification: Verification = "bayes"
    # warm start: where the server's learned statistics are saved (a directory or a .json file);
    # empty: $HF_HOME/adasd (default ~/.cache/huggingface/adasd); "none": kept in memory only
    warm_state_path: str | None = ""
    # when the statistics new requests start from are published (adasd_core.warm.Schedule): first after this
    # many rounds of a family, then whenever its rounds have doubled, frozen once a snapshot holds
    # warm_freeze_rounds (0: never); responses' system_fingerprint changes only at a publication
    warm_epoch_rounds: int = Field(32, ge=1)
    warm_freeze_rounds: int = Field(4096, ge=0)
    # tool_choice "auto": how the model's free output is read for tool calls (server/tool_parsers.py);
    # auto: from the chat template's own format (hermes: <tool_call>; llama3_json: Llama 3.1's), none: "auto" is a 400
    tool_parser: ToolParserName = "auto"
    # HTTP
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = None
    max_queue: int = Field(64, ge=0)  # requests waiting beyond the running ones
    max_running: int = Field(8, ge=1)  # generations batched together (the KV pool holds max_running full contexts
    # when memory allows; with less, the newest request is preempted when blocks run out)
    gpu_memory_fraction: float = Field(0.9, gt=0.0, le=1.0)  # share of the GPU the models and KV blocks may use
    block_size: int = 16  # positions per KV block
    kv_blocks: int | None = Field(None, ge=1)  # blocks per pool instead of the planned number (tests, capacity trials)
    prefix_caching: bool = True  # reuse the KV blocks of a prompt prefix an earlier request computed
    batch_aware: bool = True  # cap adaptive drafts by what pays at the current batch size (off: experiments)
    # /metrics: also publish the endpoint picker's series under vLLM's names (vllm:num_requests_waiting,
    # vllm:num_requests_running, vllm:kv_cache_usage_perc, vllm:cache_config_info, vllm:prefix_cache_queries, ...)
    vllm_metric_names: bool = False
    max_body_bytes: int = Field(1 << 20, ge=1024)
    shutdown_timeout: float = Field(30.0, ge=0)
    log_level: LogLevel = "info"

    @field_validator("draft", "served_model_name", "device_map", "api_key", "max_model_len", "kv_blocks",
                     mode="before")
    @classmethod
    def _none_words(cls, v: Any) -> Any:
        # lets env vars and flags say "none": ADASD_DRAFT=none serves the target alone
        if isinstance(v, str) and v.strip().lower() in ("", "none", "null"):
            return None
        return v

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if not 1 <= v <= MAX_BLOCK_SIZE or v & (v - 1):
            raise ValueError(f"block_size must be a power of two from 1 to {MAX_BLOCK_SIZE} (16 is the default), "
                             f"got {v}")
        return v

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _defaults(self) -> Settings:
        if self.served_model_name is None:
            self.served_model_name = BUILTIN_SERVED_NAMES.get(self.target, self.target)
        if self.draft is None and self.method != "ar":
            raise ValueError(f"method {self.method!r} needs a draft model: set `draft` or use method 'ar'")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        data = _yaml_data.get()
        if data:
            sources.append(InitSettingsSource(settings_cls, init_kwargs=data))
        return tuple(sources)

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides: Any) -> Settings:
        """Settings from a YAML file; `overrides` (command-line flags) and ADASD_* env vars win."""
        token = _yaml_data.set(read_yaml(path))
        try:
            return cls(**_given(overrides))
        finally:
            _yaml_data.reset(token)

    @classmethod
    def load(cls, config: str | os.PathLike | None = None, **overrides: Any) -> Settings:
        """What `adasd serve` uses: `config` (or $ADASD_CONFIG) if any, then env, then flags.

        Overrides whose value is None (flags not given) are ignored.
        """
        path = config or os.environ.get(CONFIG_ENV)
        if path:
            return cls.from_yaml(path, **overrides)
        return cls(**_given(overrides))


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {str(p)!r} does not exist")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(p)!r} must be a mapping of flat keys (target: ..., port: ...)")
    return data


def _given(overrides: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in overrides.items() if v is not None}
