"""Server configuration: defaults, then a YAML file, then ``SAFETY_MONITOR_*`` env, then flags.

Every key is a field of ``ServerConfig``; an unknown key or a bad value raises ``ConfigError``
naming the key, the source and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from monitor.errors import ConfigError

__all__ = ["ENV_PREFIX", "ServerConfig", "load_config"]

ENV_PREFIX = "SAFETY_MONITOR_"


@dataclass(frozen=True)
class ServerConfig:
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
    critic_url: base URL of an OpenAI-compatible server to critique outputs with (None: no critiques).
    critic_model: model name sent to the critic.
    critique_mode: fast (one yes/no token per principle) or full (a parsed written critique).
    critique_sample_rate: share of unflagged generations critiqued (every flagged one is).
    critique_queue / critique_concurrency / critique_timeout: the critique queue's bound, parallel
        calls and per-call timeout in seconds. A full queue drops (counted); scoring never waits.
    constitution: YAML file of principles (None: the default constitution).
    blas_threads: numpy BLAS threads in a ``monitor serve`` process (1 avoids thread contention).
    """

    host: str = "127.0.0.1"
    port: int = 50051
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464
    max_message_bytes: int = 64 * 1024 * 1024
    workers: int = 2
    max_in_flight: int = 64
    max_streams: int = 32
    stream_idle_seconds: float = 30.0
    max_stream_chunks: int = 16384
    max_tokens: int = 8192
    max_stream_tokens: int = 65536
    drain_seconds: float = 30.0
    bundle: str | None = None
    auth_token: str | None = None
    log_level: str = "INFO"
    drift_state: str | None = None
    drift_baseline: str | None = None
    drift_reference_events: int = 2000
    drift_window_events: int = 500
    drift_save_seconds: float = 5.0
    audit_log: str | None = None
    audit_fsync: bool = False
    audit_max_bytes: int = 256 * 1024 * 1024
    audit_backups: int = 5
    audit_max_age_seconds: float = 0.0
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    critic_url: str | None = None
    critic_model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    critique_mode: str = "fast"
    critique_sample_rate: float = 0.05
    critique_queue: int = 100
    critique_concurrency: int = 2
    critique_timeout: float = 30.0
    constitution: str | None = None
    blas_threads: int = 1

    def __post_init__(self) -> None:
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535:
                raise ConfigError(f"{name}: expected 0..65535, got {value}")
        for name in (
            "max_message_bytes",
            "workers",
            "max_in_flight",
            "max_streams",
            "max_stream_chunks",
            "max_tokens",
            "max_stream_tokens",
            "drift_reference_events",
            "drift_window_events",
            "critique_queue",
            "critique_concurrency",
            "blas_threads",
        ):
            value = getattr(self, name)
            if value < 1:
                raise ConfigError(f"{name}: expected a positive integer, got {value}")
        for name in ("audit_max_bytes", "audit_backups", "audit_max_age_seconds"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: expected >= 0 (0 turns it off), got {getattr(self, name)}")
        if self.stream_idle_seconds <= 0:
            raise ConfigError(f"stream_idle_seconds: expected > 0, got {self.stream_idle_seconds}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert / tls_key: expected both (a certificate and its key) or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("tls_client_ca: mutual TLS needs tls_cert and tls_key too")
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            value = getattr(self, name)
            if value and not Path(value).is_file():
                raise ConfigError(f"{name}: expected a readable PEM file, got {value!r} (no such file)")
        if self.drain_seconds < 0:
            raise ConfigError(f"drain_seconds: expected >= 0, got {self.drain_seconds}")
        if self.critique_mode not in ("fast", "full"):
            raise ConfigError(f"critique_mode: expected fast or full, got {self.critique_mode!r}")
        if not 0.0 <= self.critique_sample_rate <= 1.0:
            raise ConfigError(f"critique_sample_rate: expected 0..1, got {self.critique_sample_rate}")
        if self.critique_timeout <= 0:
            raise ConfigError(f"critique_timeout: expected > 0, got {self.critique_timeout}")
        if self.drift_save_seconds <= 0:
            raise ConfigError(f"drift_save_seconds: expected > 0, got {self.drift_save_seconds}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(f"log_level: expected DEBUG, INFO, WARNING, ERROR or CRITICAL, got {self.log_level!r}")


_FIELDS = {f.name: f for f in dataclasses.fields(ServerConfig)}


def _coerce(key: str, value: Any, source: str) -> Any:
    """Convert ``value`` to the type of field ``key`` (strings from env/flags included)."""
    kind = str(_FIELDS[key].type)
    if value is None or (isinstance(value, str) and value == "" and "None" in kind):
        if "None" in kind:
            return None
        raise ConfigError(f"{key} ({source}): expected a value, got nothing")
    try:
        if kind.startswith("bool"):
            return _bool(value)
        if kind.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind.startswith("float"):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} ({source}): expected {kind.split(' ')[0]}, got {value!r}") from None


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


def load_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ServerConfig:
    """Build a ``ServerConfig`` from a YAML file, the environment and explicit overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"config file {p}: cannot read: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p}: not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: expected a mapping of keys, got {type(loaded).__name__}")
        for key, value in loaded.items():
            if key not in _FIELDS:
                raise ConfigError(f"config file {p}: unknown key {key!r}; expected one of {', '.join(_FIELDS)}")
            values[key] = _coerce(key, value, f"config file {p}")
    environ = os.environ if env is None else env
    for key in _FIELDS:
        name = ENV_PREFIX + key.upper()
        if name in environ:
            values[key] = _coerce(key, environ[name], f"environment {name}")
    for key, value in (overrides or {}).items():
        if key not in _FIELDS:
            raise ConfigError(f"unknown setting {key!r}; expected one of {', '.join(_FIELDS)}")
        if value is not None:
            values[key] = _coerce(key, value, "command line")
    return ServerConfig(**values)
