"""Server configuration: defaults, then a YAML file, then ``SAFETY_MONITOR_*`` env, then flags.

``ServerConfig`` is a pydantic-settings model: types and bounds are declared on the fields, the YAML
file and the environment are read by pydantic-settings' own sources, and ``load_config`` layers them.
An unknown key or a bad value raises ``ConfigError`` naming the key, the source and what is allowed.
"""

from __future__ import annotations

import difflib
import os
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from monitor._yaml import YamlError, load_yaml
from monitor.errors import ConfigError, echo

__all__ = ["ENV_PREFIX", "OTHER_COMPONENTS_ENV", "ServerConfig", "load_config"]

ENV_PREFIX = "SAFETY_MONITOR_"
# ``SAFETY_MONITOR_*`` variables other components read (the sidecar ignores them): with the
# sidecar's own keys, every name a ``SAFETY_MONITOR_*`` variable may have. Any other is a start-up
# error, so a typo (``SAFETY_MONITOR_AUTH_TOKN``) cannot silently leave auth off.
# tests/unit/test_config.py checks this list against the names the code and docs use.
OTHER_COMPONENTS_ENV: dict[str, str] = {
    **{
        key: "the vLLM adapter (monitor.integrations.vllm)"
        for key in (
            "SIDECAR",
            "HOOK_POINTS",
            "TOKEN",
            "PROJECTED",
            "HALT",
            "MAX_QUEUED_ROWS",
            "CHUNK_TOKENS",
            "CONNECT_TIMEOUT",
            "SEND_TIMEOUT",
            "HOLD_BACK_TOKENS",
            "TLS_CA",
            "TLS_CERT",
            "TLS_KEY",
        )
    },
    "VLLM_PYTHON": "vLLM's Python for the bundle build, the demo and the tests",
    "CACHE": "the model cache (monitor.models)",
}

Port = Annotated[int, Field(ge=0, le=65535)]
Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]
MAX_PROBLEMS = 5  # problems named in one error; the rest are counted
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
        1024 by default: the vLLM adapter keeps one stream per running request, and vLLM runs up
        to 256 sequences by default (1024 on large GPUs); a stream costs the sidecar a few KB.
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
    drift_state_strict: a saved drift state that is corrupt (unreadable JSON, wrong types) stops
        the start-up (one line, exit 2) instead of being moved aside to ``<file>.corrupt-<time>``
        (logged, counted in ``safety_monitor_drift_state_corrupt_total``) for a fresh reference.
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
    otlp_endpoint: ``http://HOST:PORT`` (plain) or ``https://HOST:PORT`` (TLS) of an OTLP/gRPC
        receiver (an OpenTelemetry Collector, Phoenix, Tempo...): each scored generation's verdicts
        go there as ``gen_ai.evaluation.result`` log events, with the request's trace context (None:
        off). Needs the ``otel`` extra. Exported off the scoring path; a full queue drops (counted).
    otel_service_name: the ``service.name`` resource attribute of those events.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True, validate_default=True)

    host: str = "127.0.0.1"
    port: Port = 50051
    metrics_host: str = "127.0.0.1"
    metrics_port: Port = 9464
    max_message_bytes: Positive = 64 * 1024 * 1024
    workers: Positive = 2
    max_in_flight: Positive = 64
    max_streams: Positive = 1024
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
    drift_state_strict: bool = False
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
    otlp_endpoint: str | None = None
    otel_service_name: str = "safety-monitor"

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

    @field_validator("otlp_endpoint")
    @classmethod
    def _otlp_endpoint(cls, value: str | None) -> str | None:
        if value is not None:
            from monitor.telemetry import check_endpoint

            try:
                check_endpoint(value)
            except ConfigError as exc:  # pydantic names the key itself
                raise ValueError(str(exc).removeprefix("otlp_endpoint: ").split(", got ")[0]) from None
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
        if self.tls_cert and self.tls_key:
            _check_pem(self.tls_cert, self.tls_key, self.tls_client_ca)
        return self


def _check_pem(cert: str, key: str, client_ca: str | None) -> None:
    """Parse the TLS files now: gRPC reports a bad one only as "Failed to bind to address"."""

    def no_password() -> bytes:
        raise ValueError("encrypted keys are not supported")  # never prompt on a terminal

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    checks = (
        ("tls_cert", cert, "a PEM certificate chain", lambda: ctx.load_verify_locations(cafile=cert)),
        ("tls_key", key, "the PEM private key of tls_cert", lambda: ctx.load_cert_chain(cert, key, no_password)),
        ("tls_client_ca", client_ca, "PEM CA certificates", lambda: ctx.load_verify_locations(cafile=client_ca)),
    )
    for name, path, what, load in checks:
        if not path:
            continue
        try:
            load()
        except (ssl.SSLError, OSError, ValueError) as exc:
            fallback = str(exc) if type(exc) is ValueError else "not readable as PEM"
            reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or fallback
            raise ValueError(f"{name}: expected {what}, got {path!r} ({reason})") from None


_OPTIONAL = frozenset(name for name, f in ServerConfig.model_fields.items() if f.default is None)


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' env source, reading a given mapping instead of ``os.environ``."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {k.lower(): v for k, v in self._environ.items()}


def _describe(exc: ValidationError, origin: Mapping[str, str]) -> str:
    """One line per problem: the key, where its value came from, what was expected and what came.

    Unknown keys are named together, once per source, with the list of known keys said once.
    """
    lines = []
    unknown: dict[str, list[str]] = {}
    for err in exc.errors():
        key = str(err["loc"][0]) if err["loc"] else ""
        where = f" ({origin[key]})" if key in origin else ""
        msg = err["msg"].removeprefix("Value error, ").replace("Input should be ", "expected ", 1)
        if err["type"] == "extra_forbidden":
            unknown.setdefault(origin.get(key, "arguments"), []).append(echo(key))
        elif key:
            lines.append(f"{key}{where}: {msg}, got {echo(err['input'])}")
        else:
            lines.append(msg)
    for source, keys in unknown.items():
        named = ", ".join(keys[:MAX_PROBLEMS]) + (
            f" and {len(keys) - MAX_PROBLEMS} more" if len(keys) > MAX_PROBLEMS else ""
        )
        lines.append(
            f"{source}: unknown key{'s' if len(keys) > 1 else ''} {named}; "
            f"expected one of {', '.join(ServerConfig.model_fields)}"
        )
    if len(lines) > MAX_PROBLEMS:  # a hostile file must not make a huge message
        lines[MAX_PROBLEMS:] = [f"and {len(lines) - MAX_PROBLEMS} more problems"]
    return "; ".join(lines)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path}: cannot read: no such file")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path}: expected UTF-8 text: {exc.reason} at byte {exc.start}") from None
    except YamlError as exc:
        raise ConfigError(f"config file {path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of keys, got {type(data).__name__} {echo(data)}")
    return data


def _check_env_names(environ: Mapping[str, str]) -> None:
    """Refuse a ``SAFETY_MONITOR_*`` variable that neither the sidecar nor another component reads."""
    known = {f"{ENV_PREFIX}{name.upper()}" for name in ServerConfig.model_fields}
    known |= {f"{ENV_PREFIX}{name}" for name in OTHER_COMPONENTS_ENV}
    # pydantic-settings reads the environment case-insensitively: so does this check
    unknown = sorted(k for k in environ if k.upper().startswith(ENV_PREFIX) and k.upper() not in known)
    if not unknown:
        return
    problems = []
    for name in unknown[:MAX_PROBLEMS]:
        close = difflib.get_close_matches(name.upper(), sorted(known), n=1, cutoff=0.8)
        hint = f" (did you mean {close[0]}?)" if close else ""
        problems.append(f"environment {echo(name)}: unknown variable{hint}")
    if len(unknown) > MAX_PROBLEMS:
        problems.append(f"and {len(unknown) - MAX_PROBLEMS} more")
    raise ConfigError(
        "; ".join(problems) + f"; expected {ENV_PREFIX}<key> for a key of the sidecar's config "
        f"or one of {', '.join(ENV_PREFIX + n for n in OTHER_COMPONENTS_ENV)} (read by other components)"
    )


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
    environ = os.environ if env is None else env
    _check_env_names(environ)
    for key, value in _MappingEnvSource(ServerConfig, environ)().items():
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
