"""Configuration precedence (defaults < YAML < env < flags), validation messages, and the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from adpa.cli import build_parser, main
from adpa.config import settings_from_args
from adpa.services.config import ServeConfig


def load(argv: list[str]) -> ServeConfig:
    return settings_from_args(ServeConfig, build_parser().parse_args(["serve", *argv]))


def test_precedence_yaml_env_flags(tmp_path, monkeypatch):
    config = tmp_path / "serve.yaml"
    config.write_text("role: reference\nmodel: from-yaml\nport: 1111\nhttp_port: 2222\nmax_k: 7\n")
    monkeypatch.setenv("ADPA_PORT", "3333")
    monkeypatch.setenv("ADPA_MAX_K", "9")
    cfg = load(["--config", str(config), "--max-k", "11"])
    assert cfg.model == "from-yaml"  # YAML over default
    assert cfg.http_port == 2222
    assert cfg.port == 3333  # env over YAML
    assert cfg.max_k == 11  # flag over env
    assert cfg.host == "127.0.0.1"  # loopback unless asked


def test_secrets_from_env_are_hidden(monkeypatch):
    monkeypatch.setenv("ADPA_AUTH_TOKEN", "hunter2")
    cfg = load(["--role", "reference", "--model", "m"])
    assert cfg.auth_token.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(cfg)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--role", "teacher", "--model", "m"], "needs reference"),
        (["--role", "reference", "--model", "m", "--reference", "r"], "takes no reference"),
        (["--role", "teacher", "--model", "m", "--reference", "r", "--beta", "-1"], "beta must be > 0"),
        (["--role", "reference"], "model"),
        (["--role", "teacher", "--model", "m", "--reference", "r", "--watch-reference-s", "0"],
         "watch_reference_s must be > 0, got 30.0, 4.0, 0.0"),
    ],
)
def test_invalid_configs_name_the_problem(argv, message):
    with pytest.raises(ValidationError, match=message):
        load(argv)


def test_unknown_yaml_key_is_rejected(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("role: reference\nmodel: m\nmax_kk: 3\n")
    with pytest.raises(ValidationError, match="max_kk"):
        load(["--config", str(config)])


def test_cli_reports_bad_config_without_traceback(capsys):
    assert main(["serve", "--role", "teacher", "--model", "m"]) == 2
    err = capsys.readouterr().err
    assert "needs reference" in err and "Traceback" not in err


def test_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for name in ServeConfig.model_fields:
        assert "--" + name.replace("_", "-") in out


def test_the_console_script_runs():
    """The one subprocess here: the installed `adpa` entry point starts and answers --version."""
    adpa = Path(sys.executable).with_name("adpa")
    proc = subprocess.run([str(adpa), "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("adpa ")


def test_what_the_program_loads_for_life_is_imported_without_collections_and_frozen():
    """`adpa`'s start-up imports (torch, transformers, the server stack) run with Python's cyclic
    collector off and end frozen; the collector is on again after, or stays off if it was."""
    import gc

    from adpa.cli import _loading_for_life

    frozen = gc.get_freeze_count()
    with _loading_for_life():
        assert not gc.isenabled()
        made = [[] for _ in range(1000)]  # objects the collector tracks, made while loading
    assert gc.isenabled() and gc.get_freeze_count() >= frozen + len(made)
    gc.disable()
    try:
        with _loading_for_life():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_an_empty_environment_variable_is_unset(monkeypatch):
    """`ADPA_AUTH_TOKEN=` (an empty line in a compose .env) must not turn auth on with an empty token."""
    monkeypatch.setenv("ADPA_AUTH_TOKEN", "")
    monkeypatch.setenv("ADPA_TLS_CERT", "")
    cfg = load(["--role", "reference", "--model", "m"])
    assert cfg.auth_token is None and cfg.tls_cert is None


def test_a_reference_ignores_the_teachers_reference_variable(monkeypatch):
    """The Ray reference deployment loads its settings with reference="" over an ADPA_REFERENCE meant
    for the teacher (they share one environment on a Ray node)."""
    monkeypatch.setenv("ADPA_REFERENCE", "grpc://elsewhere:50052")
    assert ServeConfig.load(role="teacher", model="m").reference == "grpc://elsewhere:50052"
    cfg = ServeConfig.load(role="reference", model="m", reference="")
    assert cfg.role == "reference" and not cfg.remote_reference
