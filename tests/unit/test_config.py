import re
from pathlib import Path

import pytest

from monitor.config import OTHER_COMPONENTS_ENV, ServerConfig, load_config
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


def test_direct_construction_ignores_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFETY_MONITOR_PORT", "7000")
    assert ServerConfig().port == 50051
    assert load_config().port == 7000


@pytest.mark.parametrize(("text", "expected"), [("false", False), ("0", False), ("no", False), ("true", True)])
def test_bool_from_env_and_file(tmp_path: Path, text: str, expected: bool) -> None:
    assert load_config(env={"SAFETY_MONITOR_AUDIT_FSYNC": text}).audit_fsync is expected
    f = tmp_path / "c.yaml"
    f.write_text(f"audit_fsync: {text}\n")
    assert load_config(f, env={}).audit_fsync is expected


def test_bad_bool_names_variable() -> None:
    with pytest.raises(
        ConfigError, match=r"audit_fsync \(environment SAFETY_MONITOR_AUDIT_FSYNC\): expected a valid bool.*'maybe'"
    ):
        load_config(env={"SAFETY_MONITOR_AUDIT_FSYNC": "maybe"})


def test_empty_env_unsets_an_optional_field() -> None:
    assert load_config(env={"SAFETY_MONITOR_AUTH_TOKEN": ""}).auth_token is None


def test_unknown_key_lists_allowed(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("prot: 1\n")
    with pytest.raises(ConfigError, match=r"config file .*c\.yaml: unknown key 'prot'; expected one of host, port"):
        load_config(f, env={})


def test_unknown_override_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"command line: unknown key 'prot'"):
        load_config(env={}, overrides={"prot": 1})


def test_file_that_is_not_a_mapping(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("- port\n- 1\n")
    with pytest.raises(ConfigError, match=r"config file .*c\.yaml: expected a mapping of keys"):
        load_config(f, env={})
    f.write_text("port: [1\n")
    with pytest.raises(ConfigError, match=r"config file .*c\.yaml: not valid YAML"):
        load_config(f, env={})
    with pytest.raises(ConfigError, match=r"config file .*missing\.yaml: cannot read"):
        load_config(tmp_path / "missing.yaml", env={})


def test_bad_env_value_names_variable() -> None:
    with pytest.raises(
        ConfigError, match=r"workers \(environment SAFETY_MONITOR_WORKERS\): expected a valid integer.*'many'"
    ):
        load_config(env={"SAFETY_MONITOR_WORKERS": "many"})


def test_out_of_range_rejected() -> None:
    with pytest.raises(ConfigError, match=r"port \(command line\): expected less than or equal to 65535, got 70000"):
        load_config(env={}, overrides={"port": 70000})
    with pytest.raises(ConfigError, match=r"critique_sample_rate: expected less than or equal to 1, got 1\.5"):
        ServerConfig(critique_sample_rate=1.5)
    with pytest.raises(ConfigError, match=r"workers: expected greater than or equal to 1, got 0"):
        ServerConfig(workers=0)


def test_choices_and_cross_field_rules(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"critique_mode \(environment SAFETY_MONITOR_CRITIQUE_MODE\): .*fast.*full"):
        load_config(env={"SAFETY_MONITOR_CRITIQUE_MODE": "slow"})
    with pytest.raises(ConfigError, match=r"log_level: expected one of DEBUG, INFO"):
        ServerConfig(log_level="chatty")
    with pytest.raises(ConfigError, match=r"tls_cert / tls_key: expected both"):
        ServerConfig(tls_cert=str(tmp_path / "cert.pem"))


def test_frozen() -> None:
    cfg = ServerConfig()
    with pytest.raises(ValueError, match="frozen"):
        cfg.port = 1  # type: ignore[misc]


LEVELS = zip("abcdef", ['"x"', "*a", "*b", "*c", "*d", "*e"], strict=True)
BOMB = "".join(f"{n}: &{n} [{', '.join([p] * 9)}]\n" for n, p in LEVELS)  # 0.3 KB, 9**6 items


def test_a_yaml_alias_bomb_is_refused_before_it_is_expanded(tmp_path: Path) -> None:
    from monitor._yaml import YamlError, load_yaml

    with pytest.raises(YamlError, match="expected at most 200000 nodes with aliases expanded"):
        load_yaml(BOMB + "port: *f\n")
    with pytest.raises(YamlError, match=r"expected no recursive alias, got one \(line 1, column 4\)"):
        load_yaml("a: &a [*a]")
    assert load_yaml("a: &a [1, 2]\nb: *a\n") == {"a": [1, 2], "b": [1, 2]}  # ordinary aliases still work


def test_a_bad_value_is_echoed_cut_short(tmp_path: Path) -> None:
    """9**4 aliased items are under the node bound; the message still echoes only a few of them."""
    config = tmp_path / "c.yaml"
    config.write_text(BOMB.split("e:")[0].replace("a: &a", "z: &a", 1).replace("\nd: &d", "\nport: &d"))
    with pytest.raises(ConfigError) as info:
        load_config(config)
    message = str(info.value)
    assert f"port (config file {config}): expected a valid integer, got [[[[" in message
    assert len(message) < 1500  # the known keys (~900 characters) and one value cut at 160


def test_an_unknown_safety_monitor_variable_is_refused_naming_it() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={"SAFETY_MONITOR_AUTH_TOKN": "s3cret", "PATH": "/bin"})
    assert str(info.value).startswith(
        "environment 'SAFETY_MONITOR_AUTH_TOKN': unknown variable (did you mean SAFETY_MONITOR_AUTH_TOKEN?); "
        "expected SAFETY_MONITOR_<key> for a key of the sidecar's config or one of SAFETY_MONITOR_SIDECAR"
    )
    with pytest.raises(ConfigError, match="environment 'safety_monitor_worker': unknown variable"):
        load_config(env={"safety_monitor_worker": "2"})  # read case-insensitively, checked so too


def test_variables_of_other_components_are_accepted_and_ignored() -> None:
    env = {f"SAFETY_MONITOR_{name}": "x" for name in OTHER_COMPONENTS_ENV if name not in ("TLS_CERT", "TLS_KEY")}
    assert load_config(env=env) == ServerConfig()


def test_every_safety_monitor_name_in_the_repository_is_known() -> None:
    """The one list stays whole: each name the code, docs and manifests use is a config key or
    belongs to another component, and every vLLM adapter setting is listed."""
    from monitor.integrations.vllm._settings import AdapterSettings

    root = Path(__file__).resolve().parents[2]
    known = {k.upper() for k in ServerConfig.model_fields} | set(OTHER_COMPONENTS_ENV)
    files = [p for d in ("monitor", "deploy", "docs", "scripts", "bench", "tests") for p in (root / d).rglob("*")]
    files += [root / "README.md", root / "Makefile"]
    used = set()
    for p in files:
        if p.is_file() and p.suffix in {".py", ".md", ".yaml", ".yml", "", ".toml", ".sh"}:
            used |= set(re.findall(r"SAFETY_MONITOR_([A-Z][A-Z0-9_]*[A-Z0-9])", p.read_text(errors="ignore")))
    assert "SIDECAR" in used and "AUTH_TOKEN" in used
    assert sorted(used - known - {"AUTH_TOKN"}) == []  # AUTH_TOKN: the typo the test above uses
    assert {f.upper() for f in AdapterSettings.__dataclass_fields__} <= set(OTHER_COMPONENTS_ENV)
