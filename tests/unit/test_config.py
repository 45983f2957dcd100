from pathlib import Path

import pytest

from monitor.config import ServerConfig, load_config
from monitor.errors import ConfigError


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("port: 6000\nworkers: 3\nmax_tokens: 100\n")
    cfg = load_config(
        f,
        env={"SAFETY_MONITOR_PORT": "7000", "SAFETY_MONITOR_DRAIN_SECONDS": "2.5"},
        overrides={"port": 8000, "host": None},
    )
    assert (cfg.port, cfg.workers, cfg.max_tokens, cfg.drain_seconds, cfg.host) == (8000, 3, 100, 2.5, "127.0.0.1")


def test_defaults() -> None:
    cfg = load_config(env={})
    assert cfg == ServerConfig()
    assert cfg.max_message_bytes == 64 * 1024 * 1024


def test_unknown_key_lists_allowed(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("prot: 1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'prot'; expected one of host, port"):
        load_config(f, env={})


def test_bad_env_value_names_variable() -> None:
    with pytest.raises(ConfigError, match=r"environment SAFETY_MONITOR_WORKERS.*expected int.*'many'"):
        load_config(env={"SAFETY_MONITOR_WORKERS": "many"})


def test_out_of_range_rejected() -> None:
    with pytest.raises(ConfigError, match=r"port: expected 0\.\.65535, got 70000"):
        load_config(env={}, overrides={"port": 70000})
