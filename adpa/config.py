"""Configuration plumbing shared by every command: pydantic settings <- YAML <- env <- CLI flags.

A settings class is the one source of truth: its fields become the CLI flags (with their
descriptions as --help), the YAML keys and the ADPA_* environment variables.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from pydantic import SecretStr
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

S = TypeVar("S", bound="AdpaSettings")


class AdpaSettings(BaseSettings):
    """Base of every config: ADPA_<FIELD> environment variables, unknown keys rejected."""

    # An empty ADPA_* variable (e.g. `ADPA_AUTH_TOKEN=` from a compose .env) means unset, not "".
    model_config = SettingsConfigDict(env_prefix="ADPA_", extra="forbid", env_ignore_empty=True)

    @classmethod
    def load(cls: type[S], config_file: str | Path | None = None, **overrides: Any) -> S:
        """Defaults < YAML file < ADPA_* environment < `overrides` (the CLI flags)."""
        if config_file is not None and not Path(config_file).is_file():
            raise FileNotFoundError(f"config file {config_file} does not exist")

        class _FromYaml(cls):  # type: ignore[valid-type, misc]
            model_config = SettingsConfigDict(yaml_file=config_file)

            @classmethod
            def settings_customise_sources(
                cls_, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
            ) -> tuple[PydanticBaseSettingsSource, ...]:
                sources = [init_settings, env_settings]
                if config_file is not None:
                    sources.append(YamlConfigSettingsSource(settings_cls))
                return tuple(sources)

        loaded = _FromYaml(**{k: v for k, v in overrides.items() if v is not None})
        return cls.model_construct(**{name: getattr(loaded, name) for name in cls.model_fields})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_settings_arguments(parser: argparse.ArgumentParser, settings_cls: type[AdpaSettings]) -> None:
    """One flag per field; defaults stay None so YAML and environment values are not overridden."""
    for name, field in settings_cls.model_fields.items():
        annotation = field.annotation
        args = typing.get_args(annotation)
        if typing.get_origin(annotation) in (typing.Union, types.UnionType):
            annotation = next(a for a in args if a is not type(None))
            args = typing.get_args(annotation)
        default = "required" if field.is_required() else f"default: {field.default}"
        if annotation is SecretStr:
            default = "default: none"
        help_text = f"{field.description or ''} ({default}; env ADPA_{name.upper()})"
        kwargs: dict[str, Any] = {"help": help_text, "default": None, "dest": name}
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(annotation) is typing.Literal:
            kwargs["choices"] = list(args)
        elif annotation in (int, float):
            kwargs["type"] = annotation
            kwargs["metavar"] = annotation.__name__.upper()
        else:
            kwargs["metavar"] = "VALUE"
        parser.add_argument(_flag(name), **kwargs)


def settings_from_args(settings_cls: type[S], args: argparse.Namespace) -> S:
    overrides = {name: getattr(args, name, None) for name in settings_cls.model_fields}
    return settings_cls.load(getattr(args, "config", None), **overrides)
