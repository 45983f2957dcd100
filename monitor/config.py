"""Server configuration: defaults, then a YAML file, then ``SAFETY_MONITOR_*`` env, then flags.

``ServerConfig`` is a pydantic-settings model: types and bounds are declared on the fields, the YAML
file and the environment are read by pydantic-settings' own sources, and ``load_config`` layers them.
An unknown key or a bad value raises ``ConfigError`` naming the key, the source and what is allowed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from monitor.errors import ConfigError

__all__ = ["ENV_PREFIX", "ServerConfig", "load_config"]

ENV_PREFIX = "SAFETY_MONITOR_"

Port = Annotated[int, Field(ge=0, le=65535)]
Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ServerConfig(BaseSettings):
    """Settings of one sidecar process.

    host: gRPC bind address (default 127.0.0.1: a sidecar talks to its pod's inference server).
    port: gRPC port (0 picks a free one).
    metrics_host / metrics_port: where ``/metrics`` is served over HTTP (port 0 picks one).
    max_message_bytes: largest gRPC message accepted or sent, in bytes (default 64 MiB).
    workers: threads that decode and score requests.
    max_in_flight: unary RPCs (Score, GetDetectors) processed at once; more are shed with
        RESOURCE_EXHAUSTED (counted).
    max_streams: ScoreStream and Ingest calls open at once (a separate budget, so idle or
        abandoned streams never starve Score); more are shed with RESOURCE_EXHAUSTED (counted).
    stream_idle_seconds: a stream that sends no message for this long is ended DEADLINE_EXCEEDED.
    max_stream_chunks: most messages in one ScoreStream or Ingest call (RESOURCE_EXHAUSTED past it).
    send_timeout_seconds: a ScoreStream whose client reads no verdict for this long (the server is
        blocked sending one) is ended and its slot freed (counted in
        ``safety_monitor_send_timeouts_total``).
    max_tokens: largest token count of one activation block (one request or one stream chunk).
    max_stream_tokens: largest total token count of one ScoreStream.
    drain_seconds: on SIGTERM, how long in-flight RPCs may run before the server exits.
    bundle: detector bundle folder; None loads the embedded default.
    auth_token: when set, RPCs must send metadata ``authorization: Bearer <token>``.
    log_level: Python logging level name.
    drift_state: file the drift engine's state (baseline + windows) is saved to and restored from;
        None keeps it in memory only.
    drift_baseline: baseline file from ``monitor baseline``; used when there is no saved state.
        Without either, the first ``drift_reference_events`` events become the reference.
    drift_reference_events: events per statistic in the reference sample.
    drift_window_events: events per statistic in the sliding current window.
    drift_save_seconds: how often the drift state is written (atomically) to ``drift_state``;
        also written at shutdown. A SIGKILL loses at most this many seconds of drift events.
    audit_log: JSONL file that gets one record per finished generation (None: no audit log).
        A reply is sent only once its record is written and flushed to the OS.
    audit_fsync: also fsync each group commit before replying (survives power loss, not only a
        killed process; costs one fsync per burst).
    audit_max_bytes / audit_backups / audit_max_age_seconds: rotate the audit log when it would
        pass this size or age (0: never), keeping this many old files (audit.jsonl.1 is the newest).
    tls_cert / tls_key: PEM server certificate chain and key: gRPC and ``/metrics`` serve TLS only.
        The files are re-read when they change (new connections get the new certificate).
    tls_client_ca: PEM CA bundle: clients (gRPC and ``/metrics``) must present a certificate it
        signed (mutual TLS). Needs tls_cert and tls_key.
    metrics_auth: when set, ``/metrics`` requires ``Authorization: Bearer <metrics_auth>`` (401
        otherwise, counted). Unset, ``/metrics`` is open to whoever reaches metrics_host: it shows
        counts, the model id and the bundle name, never request text or ids (``auth_token``
        protects only gRPC, since Prometheus scrapers rarely send a token).
    critic_url: base URL of an OpenAI-compatible server to critique outputs with (None: no critiques).
    critic_model: model name sent to the critic.
    critique_mode: fast (one yes/no token per principle) or full (a parsed written critique).
    critique_sample_rate: share of unflagged generations critiqued (every flagged one is).
    critique_queue / critique_concurrency / critique_timeout: the critique queue's bound, parallel
        calls and per-call timeout in seconds. A full queue drops (counted); scoring never waits.
    constitution: YAML file of principles (None: the default constitution).
    debate_url: base URL of an OpenAI-compatible server that debates generations on which a critical
        detector fired (None: no debates). debate_model: model name sent to it.
    debate_rounds / debate_max_tokens: argument rounds per debate and tokens per argument.
    debate_queue / debate_timeout: the debate queue's bound and the per-debate timeout in seconds.
        A full queue drops (counted); scoring and HALT never wait.
    blas_threads: numpy BLAS threads in a ``monitor serve`` process (1 avoids thread contention).
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True, validate_default=True)

    host: str = "127.0.0.1"
    port: Port = 50051
    metrics_host: str = "127.0.0.1"
    metrics_port: Port = 9464
    max_message_bytes: Positive = 64 * 1024 * 1024
    workers: Positive = 2
    max_in_flight: Positive = 64
    max_streams: Positive = 32
    stream_idle_seconds: Annotated[float, Field(gt=0)] = 30.0
    max_stream_chunks: Positive = 16384
    send_timeout_seconds: Annotated[float, Field(gt=0)] = 10.0
    max_tokens: Positive = 8192
    max_stream_tokens: Positive = 65536
    drain_seconds: Annotated[float, Field(ge=0)] = 30.0
    bundle: str | None = None
    auth_token: str | None = None
    log_level: str = "INFO"
    drift_state: str | None = None
    drift_baseline: str | None = None
    drift_reference_events: Positive = 2000
    drift_window_events: Positive = 500
    drift_save_seconds: Annotated[float, Field(gt=0)] = 5.0
    audit_log: str | None = None
    audit_fsync: bool = False
    audit_max_bytes: NonNegative = 256 * 1024 * 1024
    audit_backups: NonNegative = 5
    audit_max_age_seconds: Annotated[float, Field(ge=0)] = 0.0
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    metrics_auth: str | None = None
    critic_url: str | None = None
    critic_model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    critique_mode: Literal["fast", "full"] = "fast"
    critique_sample_rate: Annotated[float, Field(ge=0.0, le=1.0)] = 0.05
    critique_queue: Positive = 100
    critique_concurrency: Positive = 2
    critique_timeout: Annotated[float, Field(gt=0)] = 30.0
    constitution: str | None = None
    debate_url: str | None = None
    debate_model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    debate_rounds: NonNegative = 1
    debate_max_tokens: Positive = 64
    debate_queue: Positive = 20
    debate_timeout: Annotated[float, Field(gt=0)] = 300.0
    blas_threads: Positive = 1

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError(_describe(exc, {})) from exc

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Built directly, a config is its defaults plus the arguments; ``load_config`` layers the
        # file and the environment (so a test or the demo never picks up the caller's env).
        return (init_settings,)

    @model_validator(mode="before")
    @classmethod
    def _empty_is_none(cls, data: Any) -> Any:
        """An empty string (``SAFETY_MONITOR_AUTH_TOKEN=``) means "not set" for an optional field."""
        if isinstance(data, dict):
            return {k: None if v == "" and k in _OPTIONAL else v for k, v in data.items()}
        return data

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.upper() not in LOG_LEVELS:
            raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}")
        return value

    @model_validator(mode="after")
    def _tls_files(self) -> ServerConfig:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert / tls_key: expected both (a certificate and its key) or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca: mutual TLS needs tls_cert and tls_key too")
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            value = getattr(self, name)
            if value and not Path(value).is_file():
                raise ValueError(f"{name}: expected a readable PEM file, got {value!r} (no such file)")
        return self


_OPTIONAL = frozenset(name for name, f in ServerConfig.model_fields.items() if f.default is None)


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' env source, reading a given mapping instead of ``os.environ``."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {k.lower(): v for k, v in self._environ.items()}


def _describe(exc: ValidationError, origin: Mapping[str, str]) -> str:
    """One line per problem: the key, where its value came from, what was expected and what came."""
    lines = []
    for err in exc.errors():
        key = str(err["loc"][0]) if err["loc"] else ""
        where = f" ({origin[key]})" if key in origin else ""
        msg = err["msg"].removeprefix("Value error, ").replace("Input should be ", "expected ", 1)
        if err["type"] == "extra_forbidden":
            source = origin.get(key, "arguments")
            lines.append(f"{source}: unknown key {key!r}; expected one of {', '.join(ServerConfig.model_fields)}")
        elif key:
            lines.append(f"{key}{where}: {msg}, got {err['input']!r}")
        else:
            lines.append(msg)
    return "; ".join(lines)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path}: cannot read: no such file")
    try:
        data = YamlConfigSettingsSource(ServerConfig, yaml_file=path).yaml_data
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML: {exc}") from exc
    except (TypeError, ValueError) as exc:  # a list or a scalar at the top level
        raise ConfigError(f"config file {path}: expected a mapping of keys ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of keys, got {type(data).__name__}")
    return data


def load_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ServerConfig:
    """Build a ``ServerConfig`` from a YAML file, the environment and explicit overrides (None: unset)."""
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if path is not None:
        for key, value in _read_yaml(Path(path)).items():
            values[key], origin[key] = value, f"config file {path}"
    for key, value in _MappingEnvSource(ServerConfig, os.environ if env is None else env)().items():
        values[key], origin[key] = value, f"environment {ENV_PREFIX}{key.upper()}"
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key], origin[key] = value, "command line"
    try:
        return ServerConfig(**values)
    except ConfigError as exc:
        if isinstance(exc.__cause__, ValidationError):  # describe it again, naming each value's source
            raise ConfigError(_describe(exc.__cause__, origin)) from None
        raise
