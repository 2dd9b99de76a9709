"""Settings: defaults, YAML, env, flags, and their precedence (flags > env > YAML > defaults)."""

from __future__ import annotations

import typing

import pytest
from pydantic import ValidationError

from server.__main__ import settings_from_args
from server.settings import Method, Settings, Verification


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("ADASD_"):
            monkeypatch.delenv(key)


def write(tmp_path, text: str):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults():
    s = Settings()
    assert (s.target, s.draft, s.served_model_name, s.host, s.port) == (
        "smollm2", "auto", "smollm2-135m-instruct", "127.0.0.1", 8000)
    assert (s.method, s.k, s.verification, s.api_key, s.device_map) == ("adasd", 5, "bayes", None, None)
    assert s.max_body_bytes == 1 << 20 and s.max_running >= 1 and s.max_queue >= 1


def test_served_name_defaults_to_the_target_id():
    assert Settings(target="Qwen/Qwen2.5-0.5B").served_model_name == "Qwen/Qwen2.5-0.5B"
    assert Settings(target="x", served_model_name="y").served_model_name == "y"


def test_precedence_flags_over_env_over_yaml(tmp_path, monkeypatch):
    path = write(tmp_path, "port: 9001\nmax_running: 3\nmethod: vanilla\nk: 7\n")
    s = Settings.from_yaml(path)
    assert (s.port, s.max_running, s.method, s.k) == (9001, 3, "vanilla", 7)

    monkeypatch.setenv("ADASD_PORT", "9002")
    monkeypatch.setenv("ADASD_K", "4")
    s = Settings.from_yaml(path)
    assert (s.port, s.k, s.max_running) == (9002, 4, 3)  # env beats YAML; YAML beats defaults

    s = Settings.from_yaml(path, port=9003, k=None)  # a flag not given (None) does not override
    assert (s.port, s.k) == (9003, 4)


def test_config_env_var_and_cli(tmp_path, monkeypatch):
    path = write(tmp_path, "target: some/model\ndraft: some/draft\nmax_queue: 2\n")
    monkeypatch.setenv("ADASD_CONFIG", str(path))
    monkeypatch.setenv("ADASD_API_KEY", "secret")
    s = settings_from_args(["--max-queue", "5", "--trust-remote-code", "--log-level", "DEBUG"])
    assert (s.target, s.served_model_name, s.max_queue, s.api_key) == ("some/model", "some/model", 5, "secret")
    assert s.trust_remote_code is True and s.log_level == "debug"


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValidationError, match="portt"):
        Settings.from_yaml(write(tmp_path, "portt: 1\n"))  # typo: unknown key
    with pytest.raises(ValidationError):
        Settings(method="fast")
    with pytest.raises(ValidationError):
        Settings(k=0)
    with pytest.raises(ValidationError, match="needs a draft"):
        Settings(draft="none")
    assert Settings(draft="none", method="ar").draft is None
    with pytest.raises(FileNotFoundError):
        Settings.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="mapping"):
        Settings.from_yaml(write(tmp_path, "- a\n- b\n"))


def test_method_names_match_the_engine():
    from adasd_core.engine import METHODS, VERIFICATIONS

    assert set(typing.get_args(Method)) == set(METHODS)
    assert set(typing.get_args(Verification)) == set(VERIFICATIONS)


def test_kv_block_settings(tmp_path, monkeypatch):
    assert (Settings().block_size, Settings().prefix_caching) == (16, True)
    s = settings_from_args(["--block-size", "32", "--no-prefix-caching"])
    assert (s.block_size, s.prefix_caching) == (32, False)
    assert Settings.from_yaml(write(tmp_path, "block_size: 1\nprefix_caching: false\n")).block_size == 1
    monkeypatch.setenv("ADASD_BLOCK_SIZE", "256")
    assert Settings().block_size == 256
    for bad in ("12", "0", "-16", "512"):
        with pytest.raises(ValidationError, match="block_size must be a power of two from 1 to 256"):
            settings_from_args(["--block-size", bad])
    assert Settings().kv_blocks is None and settings_from_args(["--kv-blocks", "300"]).kv_blocks == 300
    with pytest.raises(ValidationError, match="kv_blocks"):
        settings_from_args(["--kv-blocks", "0"])


def test_a_bad_block_size_stops_serve_with_its_reason(capsys):
    from server.__main__ import main

    with pytest.raises(SystemExit) as stop:
        main(["--block-size", "24"])
    assert stop.value.code == 2
    assert "block_size must be a power of two from 1 to 256" in capsys.readouterr().err


def test_tool_parser_setting(tmp_path, monkeypatch):
    assert Settings().tool_parser == "auto"
    assert settings_from_args(["--tool-call-parser", "hermes"]).tool_parser == "hermes"  # vLLM's flag
    assert settings_from_args(["--tool-parser", "llama3_json"]).tool_parser == "llama3_json"
    assert Settings.from_yaml(write(tmp_path, "tool_parser: none\n")).tool_parser == "none"
    monkeypatch.setenv("ADASD_TOOL_PARSER", "hermes")
    assert Settings().tool_parser == "hermes"
    with pytest.raises(ValidationError, match="tool_parser"):
        settings_from_args(["--tool-call-parser", "mistral"])
