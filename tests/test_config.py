"""proxy.config: defaults, the reference file, error messages, precedence, dumps."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, SecretStr

from loopwatch.detectors.units import parse_duration, parse_size
from loopwatch.proxy.app.cli import check_config_main
from loopwatch.proxy.app.cli import main as cli_main
from loopwatch.proxy.app.settings import (
    ConfigError,
    Settings,
    _strip_optional,
    dump_settings,
    load_settings,
)
from loopwatch.proxy.dataplane.settings import Route
from loopwatch.proxy.sections import HostPort, Section, parse_host_port
from tests.conftest import self_signed_cert

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "config" / "loopwatch.yaml"
EXAMPLES = sorted((ROOT / "config" / "examples").glob("*.yaml"))
DOCS = ROOT / "docs" / "configuration.md"


def leaf_paths(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    """Dotted paths of every setting that is not itself a section."""
    for name, field in model.model_fields.items():
        tp = _strip_optional(field.annotation)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            yield from leaf_paths(tp, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "loopwatch.yaml"
    path.write_text(text)
    return path


def errors_of(text: str, tmp_path: Path, **kwargs: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text), env=kwargs.pop("env", {}), **kwargs)
    assert str(caught.value) == "\n".join(caught.value.errors)
    return caught.value.errors


@pytest.fixture(autouse=True)
def _no_loopwatch_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # check_config_main reads os.environ; the developer's shell must not leak in.
    for name in list(os.environ):
        if name.startswith("LOOPWATCH_"):
            monkeypatch.delenv(name)


# --- defaults and the reference file ----------------------------------------


def test_defaults() -> None:
    s = load_settings(env={})
    assert s == Settings()
    assert s.listen == "0.0.0.0:8080"
    assert s.upstream is None and s.routes == ()
    assert s.limits.max_message_size == 64 * 1024 * 1024
    assert s.limits.max_head_size == 16 * 1024
    assert s.limits.handshake_timeout == 10.0
    assert s.limits.connect_timeout == 5.0
    assert s.limits.idle_timeout == 3600.0
    assert s.limits.max_connections == 10_000
    assert s.admin.listen == "127.0.0.1:9900" and s.admin.token is None
    assert (s.logging.level, s.logging.format) == ("info", "json")
    assert s.upstream_tls.verify is True


def test_reference_file_is_exactly_the_defaults() -> None:
    assert load_settings(REFERENCE, env={}) == Settings()


def test_reference_file_lists_every_key() -> None:
    raw = yaml.safe_load(REFERENCE.read_text())
    missing = []
    for path in leaf_paths(Settings):
        node: Any = raw
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                missing.append(path)
                break
            node = node[part]
    assert missing == []


def test_docs_list_every_key() -> None:
    text = DOCS.read_text()
    missing = [p for p in leaf_paths(Settings) if f"`{p}`" not in text]
    assert missing == []


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_load(example: Path) -> None:
    load_settings(example, env={}).require_upstream()


def test_empty_file_and_empty_section_mean_defaults(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "# nothing\n"), env={}) == Settings()
    assert load_settings(write(tmp_path, "tls:\nlimits:\n"), env={}) == Settings()


def test_sections_are_frozen() -> None:
    s = Settings()
    with pytest.raises(ValueError):
        s.limits.max_connections = 5  # type: ignore[misc]
    assert hash(s) == hash(Settings())


# --- routes and upstream ----------------------------------------------------


def test_upstream_shorthand_is_one_root_route() -> None:
    s = Settings(upstream="ws://backend:9000")
    assert s.effective_routes() == (Route(path_prefix="/", upstream="ws://backend:9000"),)


def test_routes_longest_prefix_first(tmp_path: Path) -> None:
    s = load_settings(
        write(
            tmp_path,
            """
routes:
  - {path_prefix: "/", upstream: "http://default"}
  - {path_prefix: "/ws/chat", upstream: "wss://chat"}
  - {path_prefix: "/ws", upstream: "ws://ws"}
""",
        ),
        env={},
    )
    assert [r.path_prefix for r in s.effective_routes()] == ["/ws/chat", "/ws", "/"]
    assert s.routes[0].path_prefix == "/"  # the file's order itself is kept


def test_require_upstream() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings().require_upstream()
    assert caught.value.errors == [
        "upstream: required: set `upstream` or `routes` (or LOOPWATCH_UPSTREAM / --upstream)"
    ]
    Settings(upstream="https://x").require_upstream()
    Settings(routes=[Route(path_prefix="/", upstream="ws://x")]).require_upstream()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:9900", ("127.0.0.1", 9900)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("localhost:65535", ("localhost", 65535)),
        ("[::1]:8080", ("::1", 8080)),
    ],
)
def test_parse_host_port(value: str, expected: tuple[str, int]) -> None:
    parsed = parse_host_port(value)
    assert parsed == expected and isinstance(parsed, HostPort)
    assert str(parsed) == value


@pytest.mark.parametrize(
    "value", ["8080", "host", ":8080", "::1:8080", "[::1]8080", "h:-1", "h:x", "h:65536", 8080]
)
def test_parse_host_port_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="expected"):
        parse_host_port(value)


# --- error messages ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "limits: {handshake_timeout: soon}",
            'limits.handshake_timeout: expected a duration such as "10s" or "500ms", got \'soon\'',
        ),
        (
            "limits: {max_message_size: lots}",
            'limits.max_message_size: expected a size such as "64KiB" or "16MiB", got \'lots\'',
        ),
        (
            "limits: {max_connections: many}",
            "limits.max_connections: expected an integer, got 'many'",
        ),
        (
            "limits: {max_connections: 0}",
            "limits.max_connections: expected a value of at least 1, got 0",
        ),
        (
            "limits: {connect_timeout: 0s}",
            "limits.connect_timeout: expected a value greater than 0, got '0s'",
        ),
        (
            "upstream_tls: {verify: maybe}",
            "upstream_tls.verify: expected true or false, got 'maybe'",
        ),
        ("limits: 5", "limits: expected a mapping, got 5"),
        ("routes: {a: 1}", "routes: expected a list, got a mapping"),
        (
            "logging: {level: loud}",
            "logging.level: expected one of 'debug', 'info', 'warning' or 'error', got 'loud'",
        ),
        (
            "limits: {max_conections: 5}",
            "limits.max_conections: unknown key; did you mean `max_connections`?",
        ),
        ("lisen: ':1'", "lisen: unknown key; did you mean `listen`?"),
        (
            "admin: {zzz: 1}",
            "admin.zzz: unknown key; known keys: listen, token, token_file, allowed_hosts, insecure, event_streams",
        ),
        (
            "routes: [{path_prefix: /a, upstream: ws://a}, {path_prefix: /b, upstream: 'ftp://b'}]",
            "routes[1].upstream: expected a ws://, wss://, http:// or https:// URL, got 'ftp://b'",
        ),
        (
            "routes: [{path_prefix: /a, upstream: ws://a, extra: 1}]",
            "routes[0].extra: unknown key; known keys: path_prefix, upstream",
        ),
        ("routes: [{path_prefix: /a}]", "routes[0].upstream: required"),
        (
            "routes: [{path_prefix: ws, upstream: ws://a}]",
            "routes[0].path_prefix: expected a path starting with \"/\", got 'ws'",
        ),
        (
            "routes: [{path_prefix: /a, upstream: ws://a}, {path_prefix: /a, upstream: ws://b}]",
            "routes[1].path_prefix: '/a' is already the prefix of routes[0]",
        ),
        (
            "upstream: 'ws://a'\nroutes: [{path_prefix: /, upstream: ws://b}]",
            "routes: cannot be combined with `upstream` (set one or the other)",
        ),
        (
            "upstream: 'backend:9000'",
            "upstream: expected a ws://, wss://, http:// or https:// URL, got 'backend:9000'",
        ),
        (
            "tls: {cert_file: a.pem}",
            "tls.key_file: required when `cert_file` is set (set both or neither)",
        ),
        (
            "tls: {key_file: a.key}",
            "tls.cert_file: required when `key_file` is set (set both or neither)",
        ),
        (
            "upstream_tls: {cert_file: client.pem}",
            "upstream_tls.key_file: required when `cert_file` is set (set both or neither)",
        ),
        (
            "upstream_tls: {key_file: client.key}",
            "upstream_tls.cert_file: required when `key_file` is set (set both or neither)",
        ),
        (
            "listen: '0.0.0.0:70000'",
            "listen: expected a port from 0 to 65535, got 70000 in '0.0.0.0:70000'",
        ),
        (
            "admin: {listen: 9900}",
            'admin.listen: expected HOST:PORT such as "0.0.0.0:8080" or "[::1]:8080", got 9900',
        ),
        ("admin: {token: ''}", "admin.token: expected a non-empty secret (or null for none)"),
    ],
)
def test_error_messages(tmp_path: Path, text: str, expected: str) -> None:
    assert errors_of(text, tmp_path) == [expected]


def test_errors_are_reported_together(tmp_path: Path) -> None:
    errors = errors_of(
        """
listen: "x"
limits:
  handshake_timeout: soon
  max_connections: many
logging: {format: xml}
tls: {cert_file: a.pem}
routes: [{path_prefix: /, upstream: ws://a}]
upstream: ws://b
""",
        tmp_path,
    )
    assert [e.split(":")[0] for e in errors] == [
        "listen",
        "routes",
        "tls.key_file",
        "limits.handshake_timeout",
        "limits.max_connections",
        "logging.format",
    ]
    assert all("\n" not in e for e in errors)


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    (error,) = errors_of("listen: ok\nlimits:\n  max_connections: [1\n", tmp_path)
    assert re.match(rf"{re.escape(str(tmp_path / 'loopwatch.yaml'))}:4:1: invalid YAML: ", error)


def test_yaml_bad_indentation(tmp_path: Path) -> None:
    (error,) = errors_of("limits:\n  a: 1\n b: 2\n", tmp_path)
    assert "loopwatch.yaml:3:" in error and "invalid YAML" in error


def test_non_mapping_top_level(tmp_path: Path) -> None:
    (error,) = errors_of("# a list\n- listen: x\n", tmp_path)
    assert error.endswith(
        "loopwatch.yaml:2: expected a mapping of settings (key: value lines) at the top level, "
        "got a list"
    )
    (error,) = errors_of("just words\n", tmp_path)
    assert error.endswith("got 'just words'")


def test_duplicate_key(tmp_path: Path) -> None:
    (error,) = errors_of("listen: ':1'\nlimits: {}\nlisten: ':2'\n", tmp_path)
    assert error.endswith(
        "loopwatch.yaml:3:1: invalid YAML: duplicate key 'listen' (first on line 1)"
    )


def test_only_a_regular_file_of_reasonable_size_is_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """/dev/zero was read until memory ran out (a MemoryError traceback), a FIFO
    waited for a writer forever, a 60 MB file took 20 s: by check-config, run,
    and a reload inside the running proxy."""
    from loopwatch.proxy.sections import MAX_SETTING_FILE_BYTES as MAX_CONFIG_BYTES

    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * MAX_CONFIG_BYTES + b"\n")
    for path, why in (
        ("/dev/zero", "not a regular file"),
        (str(fifo), "not a regular file"),
        (str(tmp_path), "a directory"),
        (str(big), "larger than 4 MiB"),
    ):
        with pytest.raises(ConfigError) as caught:
            load_settings(path, env={})
        assert caught.value.errors == [f"{path}: cannot read the config file: {why}"]
        assert check_config_main(path) == 2
        assert capsys.readouterr().err == f"{path}: cannot read the config file: {why}\n"
    # A link to a regular file (how Kubernetes mounts a ConfigMap) is read, and so is a file at the bound.
    at_bound = tmp_path / "at-bound.yaml"
    at_bound.write_bytes(b"listen: '127.0.0.1:1'\n" + b"#" * (MAX_CONFIG_BYTES - 23) + b"\n")
    link = tmp_path / "link.yaml"
    link.symlink_to(at_bound)
    assert load_settings(link, env={}).listen == "127.0.0.1:1"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read the config file"):
        load_settings(tmp_path / "nope.yaml", env={})


# --- environment and overrides ----------------------------------------------


def test_environment() -> None:
    s = load_settings(
        env={
            "LOOPWATCH_UPSTREAM": "wss://backend:443",
            "LOOPWATCH_LISTEN": "[::1]:0",
            "LOOPWATCH_ADMIN__TOKEN": "123456",  # verbatim: stays a string
            "LOOPWATCH_LIMITS__HANDSHAKE_TIMEOUT": "500ms",
            "LOOPWATCH_LIMITS__MAX_CONNECTIONS": "7",
            "LOOPWATCH_UPSTREAM_TLS__VERIFY": "false",
            "LOOPWATCH_CONFIG": "/ignored.yaml",
            "OTHER": "x",
        }
    )
    assert s.upstream == "wss://backend:443"
    assert s.listen == "[::1]:0"
    assert s.admin.token == "123456"
    assert s.limits.handshake_timeout == 0.5
    assert s.limits.max_connections == 7
    assert s.upstream_tls.verify is False


def test_environment_routes_as_yaml() -> None:
    s = load_settings(env={"LOOPWATCH_ROUTES": "[{path_prefix: /ws, upstream: 'ws://a'}]"})
    assert s.routes == (Route(path_prefix="/ws", upstream="ws://a"),)


def test_unknown_env_var_names_the_variable() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env={"LOOPWATCH_LIMITS__MAX_CONECTIONS": "5", "LOOPWATCH_NOPE": "1"})
    assert caught.value.errors == [
        "limits.max_conections: unknown key; did you mean `max_connections`? "
        "(from LOOPWATCH_LIMITS__MAX_CONECTIONS)",
        "nope: unknown key; known keys: "
        + ", ".join(Settings.model_fields)
        + " (from LOOPWATCH_NOPE)",
    ]
    # A misspelt section is an error about the section: still named (the tools probe).
    with pytest.raises(ConfigError) as caught:
        load_settings(env={"LOOPWATCH_DETECTON__MAX_CLIENTS": "5"})
    assert caught.value.errors == [
        "detecton: unknown key; did you mean `detection`? (from LOOPWATCH_DETECTON__MAX_CLIENTS)"
    ]


def test_malformed_env_var_name() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env={"LOOPWATCH_LIMITS____X": "1"})
    assert caught.value.errors == [
        "LOOPWATCH_LIMITS____X: expected LOOPWATCH_<KEY> or LOOPWATCH_<SECTION>__<KEY>"
    ]


def test_bad_env_value_names_the_variable(tmp_path: Path) -> None:
    errors = errors_of(
        "limits: {max_connections: many}",
        tmp_path,
        env={"LOOPWATCH_LIMITS__HANDSHAKE_TIMEOUT": "soon", "LOOPWATCH_LISTEN": "nowhere"},
    )
    assert errors == [
        'listen: expected HOST:PORT such as "0.0.0.0:8080" or "[::1]:8080", got \'nowhere\' '
        "(from LOOPWATCH_LISTEN)",
        'limits.handshake_timeout: expected a duration such as "10s" or "500ms", got \'soon\' '
        "(from LOOPWATCH_LIMITS__HANDSHAKE_TIMEOUT)",
        "limits.max_connections: expected an integer, got 'many'",  # from the file
    ]


def test_bad_override_names_the_command_line() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env={}, overrides={"listen": "x:y"})
    assert caught.value.errors[0].endswith("(from the command line)")


def test_precedence(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
listen: "0.0.0.0:1"
admin: {listen: "127.0.0.1:2", token: from-file}
limits: {max_connections: 3, connect_timeout: 3s, idle_timeout: 3s}
""",
    )
    env = {
        "LOOPWATCH_ADMIN__TOKEN": "from-env",
        "LOOPWATCH_LIMITS__MAX_CONNECTIONS": "4",
        "LOOPWATCH_LIMITS__CONNECT_TIMEOUT": "4s",
    }
    overrides = {"limits.max_connections": 5, "listen": "0.0.0.0:5", "upstream": None}
    s = load_settings(path, env=env, overrides=overrides)
    assert s.limits.idle_timeout == 3.0  # file over default
    assert s.admin.listen == "127.0.0.1:2"  # file; env for admin.token leaves it alone
    assert s.admin.token == "from-env"  # env over file
    assert s.limits.connect_timeout == 4.0  # env over file
    assert s.limits.max_connections == 5  # overrides over env
    assert s.listen == "0.0.0.0:5"  # overrides over file
    assert s.upstream is None  # a None override means "not given"
    assert s.limits.handshake_timeout == 10.0  # default


def test_upstream_from_a_higher_source_replaces_routes(tmp_path: Path) -> None:
    path = write(tmp_path, "routes: [{path_prefix: /ws, upstream: 'ws://file'}]\n")
    s = load_settings(path, env={}, overrides={"upstream": "ws://cli"})
    assert s.routes == () and s.upstream == "ws://cli"
    s = load_settings(write(tmp_path, "upstream: ws://file\n"), env={"LOOPWATCH_ROUTES": "[]"})
    assert s.upstream is None and s.routes == ()
    with pytest.raises(ConfigError, match="routes: cannot be combined with `upstream`"):
        load_settings(
            env={
                "LOOPWATCH_UPSTREAM": "ws://a",
                "LOOPWATCH_ROUTES": "[{path_prefix: /, upstream: 'ws://b'}]",
            }
        )


# --- dumping and check-config -------------------------------------------------


def _full_settings(tmp_path: Path) -> Settings:
    return load_settings(
        write(
            tmp_path,
            """
listen: "[::1]:0"
routes: [{path_prefix: /ws, upstream: "wss://a:443/x"}, {path_prefix: /, upstream: "http://b"}]
tls: {cert_file: c.pem, key_file: k.pem}
upstream_tls: {verify: false, ca_file: ca.pem, server_name: backend.internal, cert_file: cc.pem, key_file: ck.pem}
limits: {max_message_size: 1MiB, idle_timeout: 250ms, handshake_timeout: 90s, max_connections: 12}
admin: {token: s3cret}
logging: {level: DEBUG, format: text}
""",
        ),
        env={},
    )


def test_dump_is_plain_and_redacted(tmp_path: Path) -> None:
    s = _full_settings(tmp_path)
    data = dump_settings(s)
    assert data["admin"]["token"] == "***"
    assert data["limits"]["max_message_size"] == "1MiB"
    assert data["limits"]["idle_timeout"] == "250ms"
    assert data["limits"]["handshake_timeout"] == "90s"
    assert data["routes"][0] == {"path_prefix": "/ws", "upstream": "wss://a:443/x"}
    assert data["logging"]["level"] == "debug"
    assert "s3cret" not in yaml.safe_dump(data) and "s3cret" not in repr(s)
    assert dump_settings(Settings())["admin"]["token"] is None  # "unset" stays visible


def test_dump_round_trips(tmp_path: Path) -> None:
    s = _full_settings(tmp_path)
    path = tmp_path / "dumped.yaml"
    path.write_text(yaml.safe_dump(dump_settings(s, redact=False)))
    assert load_settings(path, env={}) == s
    path.write_text(yaml.safe_dump(dump_settings(s)))
    assert load_settings(path, env={}) == s.model_copy(
        update={"admin": s.admin.model_copy(update={"token": "***"})}
    )
    path.write_text(yaml.safe_dump(dump_settings(Settings())))
    assert load_settings(path, env={}) == Settings()


def test_secret_str_sections_are_redacted_and_round_trip() -> None:
    # Sections added later (identity's JWT secret) may use pydantic's SecretStr.
    class Vault(Section):
        key: SecretStr | None = None

    class WithVault(Settings):
        vault: Vault = Vault()

    s = WithVault(vault=Vault(key=SecretStr("0123")))
    assert dump_settings(s)["vault"]["key"] == "***"
    assert WithVault.model_validate(dump_settings(s, redact=False)) == s


def test_check_config_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The staging example with its certificate, key and CA bundle where it says."""
    cert, key = self_signed_cert(tmp_path, ["staging.example.com"])
    text = (ROOT / "config" / "examples" / "staging.yaml").read_text()
    for path, real in [("/etc/loopwatch/tls/staging.example.com.crt", cert),
                       ("/etc/loopwatch/tls/staging.example.com.key", key),
                       ("/etc/loopwatch/tls/internal-ca.pem", cert)]:  # fmt: skip
        assert path in text
        text = text.replace(path, real)
    assert check_config_main(str(write(tmp_path, text))) == 0
    out, err = capsys.readouterr()
    assert yaml.safe_load(out)["routes"][0]["path_prefix"] == "/ws"
    assert err == ""


def test_check_config_reads_the_files_run_reads(capsys: pytest.CaptureFixture[str]) -> None:
    """A file the data plane could not read fails the check as it would fail
    `run` and a reload: every one named (the runbooks' "until check-config
    exits 0")."""
    assert check_config_main(str(ROOT / "config" / "examples" / "staging.yaml")) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        'tls.cert_file: cannot read "/etc/loopwatch/tls/staging.example.com.crt": No such file or directory (os error 2)',
        'upstream_tls.ca_file: cannot read "/etc/loopwatch/tls/internal-ca.pem": No such file or directory (os error 2)',
    ]


def test_check_config_reads_the_ca_bundle_whatever_the_routes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """upstream_tls.ca_file is read with only ws:// routes too: a bundle that
    was wrong all along fails the check now, not the reload that adds the first
    wss:// route. Without a file argument, check-config reads $LOOPWATCH_CONFIG,
    as `run` does (it printed the defaults, exit 0, while `run` refused)."""
    config = str(write(tmp_path, f'upstream: "ws://127.0.0.1:1"\nupstream_tls: {{ca_file: "{tmp_path}/ca.pem"}}\n'))
    error = f'upstream_tls.ca_file: cannot read "{tmp_path}/ca.pem": No such file or directory (os error 2)'
    assert check_config_main(config) == 2
    assert capsys.readouterr().err.splitlines() == [error]
    (tmp_path / "ca.pem").write_text("not PEM\n")
    assert check_config_main(config) == 2
    assert "upstream_tls.ca_file" in capsys.readouterr().err
    monkeypatch.setenv("LOOPWATCH_CONFIG", config)
    assert cli_main(["check-config"]) == 2
    assert "upstream_tls.ca_file" in capsys.readouterr().err
    cert, _ = self_signed_cert(tmp_path, ["backend.internal"])
    (tmp_path / "ca.pem").write_text(Path(cert).read_text())
    assert cli_main(["check-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["upstream_tls"]["ca_file"] == f"{tmp_path}/ca.pem"


def test_check_config_reads_the_client_certificate_for_upstreams(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """upstream_tls.cert_file and key_file are read as `run` and a reload read
    them, whatever the routes (here a ws:// one), each error naming its file."""
    cert, key = self_signed_cert(tmp_path, ["client.example"])
    other = tmp_path / "other"
    other.mkdir()
    _, other_key = self_signed_cert(other, ["other.example"])
    missing = str(tmp_path / "missing.pem")

    def check(cert_file: str, key_file: str) -> tuple[int, str, str]:
        text = f'upstream: "ws://backend:9000"\nupstream_tls: {{cert_file: "{cert_file}", key_file: "{key_file}"}}\n'
        code = check_config_main(str(write(tmp_path, text)))
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = check(missing, key)
    assert (code, out) == (2, "")
    assert err.splitlines() == [f'upstream_tls.cert_file: cannot read "{missing}": No such file or directory (os error 2)']
    code, out, err = check(cert, other_key)
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        f'upstream_tls.key_file: the key in "{other_key}" is not the key of the certificate in "{cert}"'
    ]
    code, out, err = check(cert, key)
    assert (code, err) == (0, "")
    assert yaml.safe_load(out)["upstream_tls"] == {
        "verify": True, "ca_file": None, "server_name": None, "cert_file": cert, "key_file": key,
    }  # fmt: skip


def test_check_config_defaults_notes_missing_upstream(capsys: pytest.CaptureFixture[str]) -> None:
    assert check_config_main(str(REFERENCE)) == 0
    out, err = capsys.readouterr()
    assert load_settings_from_text(out) == Settings()
    assert "upstream: required" in err


def test_check_config_redacts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOOPWATCH_ADMIN__TOKEN", "hunter2")
    assert check_config_main(str(write(tmp_path, "upstream: ws://a\n"))) == 0
    out, _ = capsys.readouterr()
    assert "hunter2" not in out and yaml.safe_load(out)["admin"]["token"] == "***"


def test_check_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "limits: {handshake_timeout: soon, max_conections: 1}\n")
    assert check_config_main(str(path)) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        'limits.handshake_timeout: expected a duration such as "10s" or "500ms", got \'soon\'',
        "limits.max_conections: unknown key; did you mean `max_connections`?",
    ]


def load_settings_from_text(text: str) -> Settings:
    return Settings.model_validate(yaml.safe_load(text))


# --- what an operator's file and environment may not say (a configuration probe) ---------


def test_sizes_and_counts_beyond_reason_are_errors_not_tracebacks(tmp_path: Path) -> None:
    """They overflowed the data plane's integers: a traceback from check-config
    and run, or a reload half applied and answered 500."""
    text = (
        'upstream: "ws://a:1"\nlimits: {max_message_size: "99999999999999999999GiB", '
        "max_connections: 1000000000000000000000000000000, max_connections_per_address: 100000000000000000000}\n"
        "policy: {max_held: 100000000000000000000000, max_held_per_key: 100000000000000000000000}\n"
    )
    errors = errors_of(text, tmp_path)
    assert [e.split(":")[0] for e in errors] == [
        "limits.max_message_size", "limits.max_connections", "limits.max_connections_per_address",
        "policy.max_held", "policy.max_held_per_key",
    ]  # fmt: skip
    assert errors[0] == "limits.max_message_size: expected at most 1024GiB, got '99999999999999999999GiB'"


def test_integers_too_large_for_a_float_or_for_python_are_errors_not_tracebacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The extremes probe: a duration of 400 digits raised OverflowError in
    float(), one of 5 000 a ValueError in the YAML loader: check-config and
    run printed a traceback (exit 1), a reload answered 500 and was neither
    counted nor alerted on."""
    big, huge = "9" * 99, "9" * 5000
    path = write(tmp_path, f'upstream: "ws://a:1"\nlimits:\n  handshake_timeout: {huge}\n')
    assert check_config_main(str(path)) == 2
    assert capsys.readouterr().err.strip() == (
        f"{path}:3:22: invalid YAML: an integer of 5000 digits: no setting takes one that large"
    )
    env = {"LOOPWATCH_LIMITS__HANDSHAKE_TIMEOUT": big, "LOOPWATCH_LIMITS__MAX_MESSAGE_SIZE": huge}
    errors = errors_of('upstream: "ws://a:1"\n', tmp_path, env=env)
    assert errors == [
        "LOOPWATCH_LIMITS__MAX_MESSAGE_SIZE: an integer of 5000 digits: no setting takes one that large",
        f"limits.handshake_timeout: expected at most 366d, got {big[:20]}…(99 characters)"
        " (from LOOPWATCH_LIMITS__HANDSHAKE_TIMEOUT)",
    ]
    with pytest.raises(ValueError, match="expected at most 366d"):
        parse_duration(10**400)
    with pytest.raises(ValueError, match="expected at most 1024GiB"):
        parse_size(huge + "KiB")


@pytest.mark.parametrize("text", ["\u0661s", "\uff11s", "1\u0660ms"])
def test_digits_of_other_scripts_are_no_durations_or_sizes(text: str) -> None:
    """Python's \\d takes every script's digits: "١s" (Arabic-Indic) was one second."""
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(text)
    with pytest.raises(ValueError):
        parse_size(text.rstrip("ms"))
    assert parse_duration("10s") == 10.0 and parse_size("16KiB") == 16384


def test_a_timeout_under_a_nanosecond_is_the_least_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The extremes probe: the settings took 1e-10 s, and the data plane refused
    it as zero, three times and without its section's name."""
    path = write(tmp_path, 'upstream: "ws://a:1"\nlimits: {handshake_timeout: 0.0000000001}\n')
    assert check_config_main(str(path)) == 0, capsys.readouterr().err


def test_an_environment_value_is_read_as_a_file_is(tmp_path: Path) -> None:
    """The new-changes probe: a duplicate key in a variable's YAML was "expected
    a mapping" (the text taken as a string), where the file says which key."""
    env = {"LOOPWATCH_IDENTITY": "{sources: [ip], sources: [header:x-user]}", "LOOPWATCH_LIMITS__MAX_CONNECTIONS": "9" * 120}
    assert errors_of('upstream: "ws://a:1"\n', tmp_path, env=env) == [
        "LOOPWATCH_IDENTITY: duplicate key 'sources' (first on line 1)",
        "LOOPWATCH_LIMITS__MAX_CONNECTIONS: an integer of 120 digits: no setting takes one that large",
    ]


def test_an_environment_text_that_is_no_yaml_stays_text_and_a_broken_list_says_why(tmp_path: Path) -> None:
    """The probe of the latest changes: an audience `!urn:example:api` (a YAML
    tag) or `2024-13-45` (a date that is none) was refused once variables were
    read as files are; a list that is no YAML said only "expected a list"."""
    env = {"LOOPWATCH_IDENTITY__JWT__AUDIENCE": "!urn:example:api"}
    assert load_settings(write(tmp_path, 'upstream: "ws://a:1"\n'), env=env).identity.jwt.audience == "!urn:example:api"
    env = {"LOOPWATCH_IDENTITY__JWT__AUDIENCE": "2024-13-45"}
    assert load_settings(write(tmp_path, 'upstream: "ws://a:1"\n'), env=env).identity.jwt.audience == "2024-13-45"
    errors = errors_of('upstream: "ws://a:1"\n', tmp_path, env={"LOOPWATCH_IDENTITY__SOURCES": "[ip, header:x"})
    assert len(errors) == 1 and errors[0].startswith("LOOPWATCH_IDENTITY__SOURCES: invalid YAML: "), errors


def test_a_reload_watch_under_100ms_is_an_error(tmp_path: Path) -> None:
    """The extremes probe: `reload_watch: 1ms` (meant as 1m) kept a sixth of a core stat-ing files."""
    assert errors_of('upstream: "ws://a:1"\nreload_watch: 1ms\n', tmp_path) == [
        "reload_watch: expected 100ms or more (each look reads every watched file's status), got 1ms"
    ]
    assert load_settings(write(tmp_path, 'upstream: "ws://a:1"\nreload_watch: 100ms\n'), env={}).reload_watch == 0.1


@pytest.mark.parametrize(
    "url, why",
    [
        ("ws://svc:hunter2@backend:9000/chat", "expected no user:password@"),
        ("ws://backend:9000/chat?tenant=a", "expected no query or fragment"),
        ("ws://backend:9000/chat#x", "expected no query or fragment"),
        ("ws://backend:0/chat", "expected a port from 1 to 65535"),
    ],
)
def test_what_an_upstream_url_would_lose_is_an_error(tmp_path: Path, url: str, why: str) -> None:
    """Credentials, a query and a fragment were accepted and silently not sent
    (the password printed by check-config); port 0 became 80."""
    [error] = errors_of(f'upstream: "{url}"\n', tmp_path)
    assert error.startswith(f"upstream: {why}") and "hunter2" not in error


def test_an_admin_token_from_a_secret_file_loses_its_newline() -> None:
    settings = load_settings(None, env={"LOOPWATCH_ADMIN__TOKEN": "s3cret\n"})
    assert settings.admin.token is not None and settings.admin.token == "s3cret"
    assert load_settings_from_text('admin: {token: " t0k3n\\n"}').admin.token == "t0k3n"
    with pytest.raises(ValueError, match="expected a non-empty secret"):
        load_settings_from_text('admin: {token: "  \\n"}')


def test_an_admin_token_is_printable_ascii_an_http_header_can_carry(tmp_path: Path) -> None:
    """A non-ASCII token worked from curl (UTF-8) but not from the operator
    commands (urllib sends Latin-1, or fails with a traceback); one with inner
    whitespace or a line break cannot be sent at all. The error names the
    setting and where the first bad character is, never the token."""
    expected = "expected printable ASCII without spaces"
    [error] = errors_of('admin: {token: "令牌-admin-token"}\n', tmp_path)
    assert error.startswith(f"admin.token: {expected}") and "non-ASCII character (U+4EE4) at character 1" in error
    assert "令牌" not in error
    [error] = errors_of('admin: {token: "tökén-admin"}\n', tmp_path)
    assert "non-ASCII character (U+00F6) at character 2" in error and "tök" not in error
    [error] = errors_of('admin: {token: "two words"}\n', tmp_path)
    assert error.startswith(f"admin.token: {expected}") and "whitespace at character 4" in error
    [error] = errors_of("", tmp_path, env={"LOOPWATCH_ADMIN__TOKEN": "line\nbreak\n"})
    assert "a line break at character 5" in error and error.endswith("(from LOOPWATCH_ADMIN__TOKEN)")
    [error] = errors_of("", tmp_path, env={"LOOPWATCH_ADMIN__TOKEN": "nul\x00"})
    assert "a control character at character 4" in error
    # Longer than an HTTP server takes in a header (aiohttp: 8190 bytes): it could never be sent.
    [error] = errors_of("", tmp_path, env={"LOOPWATCH_ADMIN__TOKEN": "t" * 5000})
    assert error == "admin.token: expected at most 4096 characters (it is sent as an HTTP header), got 5000 (from LOOPWATCH_ADMIN__TOKEN)"
    # Every visible ASCII character is fine, and surrounding whitespace is still dropped.
    visible = "".join(chr(c) for c in range(0x21, 0x7F))
    assert load_settings(None, env={"LOOPWATCH_ADMIN__TOKEN": f" {visible}\n"}).admin.token == visible


def test_an_empty_environment_variable_is_an_error() -> None:
    """As YAML it was null, and null turns protections off in silence."""
    with pytest.raises(ConfigError) as caught:
        load_settings(None, env={"LOOPWATCH_POLICY__MAX_CONCURRENT": "", "LOOPWATCH_LIMITS__IDLE_TIMEOUT": " "})
    assert caught.value.errors == [
        "LOOPWATCH_LIMITS__IDLE_TIMEOUT: empty; unset it for the default, or write null to mean none",
        "LOOPWATCH_POLICY__MAX_CONCURRENT: empty; unset it for the default, or write null to mean none",
    ]
    assert load_settings(None, env={"LOOPWATCH_LIMITS__IDLE_TIMEOUT": "null"}).limits.idle_timeout is None


def test_check_config_refuses_what_run_would(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A health check no route serves, a recording it cannot write: run refused
    them after check-config passed them."""
    text = (
        'routes:\n  - {path_prefix: /ws, upstream: "ws://a:1"}\n'
        "health_check: {enabled: true, path: /healthz}\n"
        f'record: {{path: "{tmp_path}/missing/events.jsonl"}}\n'
    )
    assert check_config_main(str(write(tmp_path, text))) == 2
    assert capsys.readouterr().err.splitlines() == [
        "health_check.path: no route matches '/healthz'",
        f"record.path: no directory '{tmp_path}/missing' to write 'events.jsonl' in",
    ]


def test_check_config_refuses_a_recording_or_a_listen_host_run_cannot_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The tools probe: a record.path in /proc passed every test (a regular,
    writable file) and `run` failed with "[Errno 22] Invalid argument",
    naming neither key nor path; a listen host that does not resolve passed
    check-config and failed `run` (nginx -t refuses it)."""
    text = (
        'upstream: "ws://a:1"\nlisten: "nosuchhost.invalid:8080"\n'
        'record: {path: "/proc/version"}\n'
    )
    assert check_config_main(str(write(tmp_path, text))) == 2
    record, listen = capsys.readouterr().err.splitlines()
    assert record == "record.path: '/proc/version' cannot be appended to: Invalid argument"
    assert listen.startswith("listen: cannot resolve the host name 'nosuchhost.invalid' (")
    # An existing file the recorder can append to, an address and localhost pass.
    events = tmp_path / "events.jsonl"
    events.write_text("")
    ok = f'upstream: "ws://a:1"\nlisten: "localhost:0"\nadmin: {{listen: "[::1]:0"}}\nrecord: {{path: "{events}"}}\n'
    assert check_config_main(str(write(tmp_path, ok))) == 0
    assert events.read_text() == ""


def test_blank_secrets_and_prefixes_that_never_match_are_errors(tmp_path: Path) -> None:
    text = (
        'routes:\n  - {path_prefix: "/a?b", upstream: "ws://x:1"}\n  - {path_prefix: "/ws ", upstream: "ws://x:1"}\n'
        'health_check: {token: ""}\nstate: {redis: {password: "  "}}\n'
    )
    assert sorted(errors_of(text, tmp_path)) == [
        "health_check.token: expected a non-empty secret (or null for none)",
        "routes[0].path_prefix: expected a path (no query, fragment or space: it could never match), got '/a?b'",
        "routes[1].path_prefix: expected a path (no query, fragment or space: it could never match), got '/ws '",
        "state.redis.password: expected a non-empty secret (or null for none)",
    ]


def test_settings_that_contradict_each_other_are_errors(tmp_path: Path) -> None:
    """Both ports bound at start (it failed with "address already in use",
    naming neither key); a reconnect backoff whose ceiling is below its floor."""
    assert errors_of('upstream: "ws://a:1"\nlisten: "0.0.0.0:9900"\n', tmp_path) == [
        "admin.listen: '127.0.0.1:9900' is the proxy's own address (listen: '0.0.0.0:9900')"
    ]
    # Other spellings of one address, or of the wildcard (new7, new8: accepted,
    # then "address already in use" at start); IPv4's wildcard beside an IPv6
    # address binds.
    for listen, admin in (
        ("127.0.0.1:9900", "[::0]:9900"),
        ("127.0.0.1:9900", "[::ffff:127.0.0.1]:9900"),
        ("[0:0::0]:9900", "10.0.0.1:9900"),
        ("0.0.0.0:9900", "localhost:9900"),
    ):
        config = f'upstream: "ws://a:1"\nlisten: "{listen}"\nadmin: {{listen: "{admin}"}}\n'
        assert errors_of(config, tmp_path) == [
            f"admin.listen: {admin!r} is the proxy's own address (listen: {listen!r})"
        ], (listen, admin)
    for listen, admin in (("0.0.0.0:9900", "[::1]:9900"), ("127.0.0.1:9900", "127.0.0.2:9900")):
        assert load_settings(None, env={}, overrides={"listen": listen, "admin.listen": admin, "upstream": "ws://a:1"})
    assert errors_of('state: {redis: {reconnect_min: 10s, reconnect_max: 1s}}\n', tmp_path) == [
        "state.redis: reconnect_max (1s) must not be below reconnect_min (10s)"
    ]
    # Port 0 is any free port: the two never meet.
    assert load_settings(None, env={}, overrides={"listen": "127.0.0.1:0", "admin.listen": "127.0.0.1:0"})
    # A Redis URL's query: TLS's CA and client certificate, a socket's database;
    # nothing that would override loopwatch's own timeouts.
    tls = "rediss://redis:6380/0?ssl_ca_certs=/ca.pem&ssl_certfile=/c.pem&ssl_keyfile=/k.pem"
    assert load_settings(None, env={}, overrides={"state.redis.url": tls}).state.redis.url == tls
    assert load_settings(None, env={}, overrides={"state.redis.url": "unix:///run/redis.sock?db=2"})
    [error] = errors_of('state: {redis: {url: "redis://r:6379/0?socket_timeout=30"}}\n', tmp_path)
    assert error.startswith("state.redis.url: expected no query parameters besides db, ssl_ca_certs")
    assert error.endswith("got socket_timeout")


def test_environment_text_settings_stay_text() -> None:
    """As YAML an audience "2024" was a number and a key file named "off" was false:
    a setting that takes text takes the variable as written."""
    s = load_settings(
        env={
            "LOOPWATCH_IDENTITY__JWT__AUDIENCE": "2024",
            "LOOPWATCH_IDENTITY__JWT__PUBLIC_KEY_FILE": "off",
        }
    )
    assert s.identity.jwt.audience == "2024"
    assert s.identity.jwt.public_key_file == Path("off")
    # What else the setting takes still reads as YAML: a list, and none.
    s = load_settings(env={"LOOPWATCH_IDENTITY__JWT__AUDIENCE": "[web, api]"})
    assert s.identity.jwt.audience == ("web", "api")
    assert load_settings(env={"LOOPWATCH_IDENTITY__JWT__AUDIENCE": "null"}).identity.jwt.audience is None
    # A count or a share: both still read.
    s = load_settings(env={"LOOPWATCH_LIMITS__MAX_CONNECTIONS_PER_ADDRESS": "7"})
    assert s.limits.max_connections_per_address == 7


def test_true_is_not_a_number(tmp_path: Path) -> None:
    """pydantic took true for 1: `max_connections: true` allowed one connection."""
    errors = errors_of("limits: {max_connections: true}\npolicy: {max_concurrent: false}\n", tmp_path)
    assert errors == [
        "limits.max_connections: expected a number, got true",
        "policy.max_concurrent: expected a number, got false",
    ]


@pytest.mark.parametrize("listen", ["999.1.1.1:80", "10.0.0.256:80", "[::g]:80"])
def test_listen_not_an_address(listen: str) -> None:
    """It passed as a host name and failed only at the bind, after check-config."""
    with pytest.raises(ConfigError) as caught:
        load_settings(env={}, overrides={"listen": listen})
    assert "expected an IP address or a host name" in caught.value.errors[0]


def test_source_names_no_request_can_carry_are_errors(tmp_path: Path) -> None:
    """`cookie: sid` passed and never matched: every client fell back to ip in silence."""
    for source, why in [
        ("cookie: sid", "is not a valid cookie name"),
        ("cookie:sid=1", "is not a valid cookie name"),
        ("query: token", "is not a query parameter name"),
        ("query:a&b", "is not a query parameter name"),
    ]:
        [error] = errors_of(f"identity: {{sources: ['{source}', 'ip']}}\n", tmp_path)
        assert error.startswith("identity.sources[0]: ") and why in error, error
    s = load_settings_from_text("identity: {sources: ['cookie:sid', 'query:token', 'ip']}\n")
    assert s.identity.sources == ("cookie:sid", "query:token", "ip")


def test_check_config_without_a_file_checks_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The Dockerfile, compose file and Kubernetes example configure loopwatch
    by flags and LOOPWATCH_* variables only: check-config needed a file (and
    refused /dev/null) to check that."""
    from loopwatch.proxy.app.cli import build_parser

    assert build_parser().parse_args(["check-config"]).file is None
    monkeypatch.setenv("LOOPWATCH_UPSTREAM", "ws://127.0.0.1:8000")
    monkeypatch.setenv("LOOPWATCH_ADMIN__LISTEN", "0.0.0.0:9900")
    assert check_config_main(None) == 0
    out, err = capsys.readouterr()
    assert yaml.safe_load(out)["admin"]["listen"] == "0.0.0.0:9900"
    monkeypatch.setenv("LOOPWATCH_LIMITS__MAX_CONNECTIONS", "many")
    assert check_config_main(None) == 2
    assert "limits.max_connections" in capsys.readouterr().err
