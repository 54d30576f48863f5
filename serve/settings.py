"""ServeSettings: flags > LAYERPRUNE_SERVE_* environment > configs/serve.yaml > defaults."""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError,
                               YamlConfigSettingsSource)

from layerprune.errors import LayerpruneError, first_line
from layerprune.files import SERVE_CONFIG
from layerprune.options import cli

ENV_PREFIX = "LAYERPRUNE_SERVE_"
# JSON's longest spelling of one character: an astral character escaped as a surrogate pair, "\ud83d\ude00".
ESCAPED_CHAR_BYTES = 12
JSON_SLACK_PER_TEXT = 64  # its quotes, comma, brackets and the indentation of pretty-printed JSON
JSON_SLACK = 65_536  # the other fields (truncate, raw_scores, parameters, ...)
_config_file: ContextVar[Path | None] = ContextVar("serve_config_file", default=None)


class ServeSettings(BaseSettings):
    """Every setting of the server. `Annotated[..., cli()]` makes a field a flag of `layerprune serve` and
    `python -m serve` too (layerprune.options.add_options): its name, type and description are the flag's."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    host: Annotated[str, cli()] = Field("127.0.0.1", description="interface to bind; loopback unless asked")
    port: Annotated[int, cli()] = Field(8080, ge=0, le=65535, description="port to listen on")
    max_batch_size: Annotated[int, cli()] = Field(
        32, ge=1, le=4096, description="inputs a micro-batch collects (its last request may go past it), and the "
        "most rows of one onnxruntime run")
    max_wait_ms: Annotated[float, cli()] = Field(5.0, ge=0, le=10_000,
                                                 description="wait for more inputs once the queue is empty")
    max_inputs_per_request: Annotated[int, cli()] = Field(64, ge=1, description="inputs in one request; more: 422")
    max_chars_per_input: Annotated[int, cli()] = Field(10_000, ge=1, description="characters per input; more: 422")
    max_queue: Annotated[int, cli()] = Field(4096, ge=1,
                                             description="inputs waiting for the model; beyond it requests get 429")
    max_queue_tokens: int = Field(
        65_536, ge=1, description="estimated tokens waiting for the model; beyond it 429 with Retry-After "
        "(a request is always taken when nothing is queued)")
    max_batch_tokens: Annotated[int, cli()] = Field(
        4096, ge=1, description="rows x padded length per onnxruntime run (TEI's max_batch_tokens): "
        "long inputs run in smaller batches, which bounds the memory of one run")
    run_overhead_tokens: float | None = Field(
        None, ge=0, le=4096, description="a run's fixed cost in padded tokens, for cutting a micro-batch into "
        "length-aware runs; None: measured at start-up")
    memory_arena: bool = Field(False, description="onnxruntime's CPU arena: a little faster on short inputs, but it "
                               "keeps the memory of the largest run for good")
    api_key: Annotated[SecretStr | None, cli()] = Field(
        None, description="require 'Authorization: Bearer KEY' (not on health probes or docs); better set "
        "LAYERPRUNE_SERVE_API_KEY, which other users cannot see in the process list")
    cors_origins: list[str] = Field([], description="origins allowed by CORS; empty: none (no CORS headers)")
    timeout_header_s: float = Field(10, gt=0, description="a request's headers must arrive within this")
    timeout_body_s: float = Field(30, gt=0, description="a request's body must arrive within this, else 408")
    timeout_keep_alive_s: int = Field(5, ge=1, description="idle keep-alive connections are closed after this")
    timeout_shutdown_s: int = Field(10, ge=0, description="on SIGTERM, wait this long for requests in flight")
    max_connections: int = Field(1024, ge=1, description="concurrent connections and requests; beyond: 503 (the "
                                 "health probes are answered still)")
    max_header_bytes: int = Field(65_536, ge=1024, description="a request's head (request line and headers) may "
                                  "take this many bytes; beyond: 431 and closed")
    auto_truncate: bool = Field(True, description="/predict default for 'truncate' (TEI's --auto-truncate)")
    threads: Annotated[int | None, cli()] = Field(
        None, ge=1, description="onnxruntime intra-op threads (default: onnxruntime's own)")
    allow_unvalidated: Annotated[bool, cli()] = Field(
        False, description="serve a bundle whose validation did not pass (said on /v1/models and in the log)")
    ray: Annotated[bool, cli()] = Field(False, description="serve as a Ray Serve deployment: same gate, routes and "
                                        "batching per replica (pip install 'layerprune[ray]')")
    replicas: Annotated[int, cli()] = Field(1, ge=1, description="Ray Serve replicas; with --max-replicas, "
                                            "the autoscaling minimum")
    max_replicas: Annotated[int | None, cli()] = Field(
        None, ge=1, description="Ray Serve autoscaling from --replicas up to this many")
    ray_address: Annotated[str | None, cli()] = Field(
        None, description="Ray cluster to join ('auto', 'ray://host:10001'); default: a local Ray instance")
    log_level: Annotated[Literal["critical", "error", "warning", "info", "debug"], cli()] = Field(
        "info", description="the server's and uvicorn's log level")

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
        path = _config_file.get()
        if path is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)

    @field_validator("api_key")
    @classmethod
    def _usable_key(cls, key: SecretStr | None) -> SecretStr | None:
        """An empty key would turn the check off, and one with whitespace around it can never be sent."""
        if key is not None and (not key.get_secret_value() or key.get_secret_value() != key.get_secret_value().strip()):
            raise ValueError("the key is empty or starts or ends with whitespace")
        return key

    def max_body_bytes(self, pair_input: bool) -> int:
        """Request bodies beyond this are refused (413) before JSON parsing: the largest a valid request can
        be, every input at max_chars_per_input characters each spelled as long as JSON can (12 bytes),
        two texts an input on a pair model, plus slack for the other fields."""
        texts = self.max_inputs_per_request * (2 if pair_input else 1)
        return texts * (ESCAPED_CHAR_BYTES * self.max_chars_per_input + JSON_SLACK_PER_TEXT) + JSON_SLACK

    @property
    def max_json_items(self) -> int:
        """Commas and opening brackets a request body may hold: a valid request needs about two per input
        (64 pairs: 200), so the parsed body is its strings plus a bounded number of objects."""
        return 4 * self.max_inputs_per_request + 64


def load_settings(config: Path | None = None, **overrides: Any) -> ServeSettings:
    """Settings from `config` (default: LAYERPRUNE_SERVE_CONFIG, else ./configs/serve.yaml when present),
    the environment, and `overrides` (None values are left out). A LayerpruneError on bad values."""
    if config is None:
        env = os.environ.get(ENV_PREFIX + "CONFIG")
        config = Path(env) if env else (SERVE_CONFIG if SERVE_CONFIG.is_file() else None)
    if config is not None and not Path(config).is_file():
        raise LayerpruneError(f"serve config {config} not found")
    if config is not None:
        _check_yaml(Path(config))
    token = _config_file.set(Path(config) if config is not None else None)
    try:
        return ServeSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        message = err["msg"].removeprefix("Value error, ")
        raise LayerpruneError(f"bad serve setting {where}: {message}") from None
    except SettingsError as exc:  # an environment variable of a list setting that is not JSON
        raise LayerpruneError(f"bad serve setting: {first_line(exc)} (lists are JSON, e.g. "
                              f'{ENV_PREFIX}CORS_ORIGINS=\'["https://app.example"]\')') from None
    finally:
        _config_file.reset(token)


def _check_yaml(path: Path) -> None:
    """One line for a settings file that cannot be read, is not YAML, or is not a mapping (pydantic-settings
    would raise a yaml or TypeError traceback for these)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise LayerpruneError(f"serve config {path} is not valid YAML{at}: {problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LayerpruneError(f"cannot read serve config {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if data is not None and not isinstance(data, dict):
        raise LayerpruneError(f"serve config {path} must be a mapping of setting: value, not a {type(data).__name__}")
