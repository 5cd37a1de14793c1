"""Kubernetes service links: the LOOPWATCH_* variables the kubelet injects for a
Service named loopwatch are ignored with one warning; every other unknown
LOOPWATCH_* variable stays an error, and no real setting can be taken for one."""

from __future__ import annotations

import asyncio
import os
import sys
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path

import aiohttp
import pytest
from pydantic import BaseModel

from loopwatch.proxy.app.settings import (
    ENV_PREFIX,
    ENV_SEPARATOR,
    ConfigError,
    Settings,
    _strip_optional,
    ignored_service_links,
    load_settings,
    service_link_name,
)
from tests.conftest import echo, websockets_backend
from tests.processes import loopwatch_run

ROOT = Path(__file__).resolve().parent.parent
SUBPROCESS = pytest.mark.asyncio(loop_factories=["asyncio"])

# Exactly what the kubelet sets (pkg/kubelet/envvars) for this Service, cluster IP 10.96.0.17:
#   kind: Service
#   metadata: {name: loopwatch}
#   spec: {ports: [{name: proxy, port: 8080}, {name: admin, port: 9900}]}
KUBELET_ENV = {
    "LOOPWATCH_SERVICE_HOST": "10.96.0.17",
    "LOOPWATCH_SERVICE_PORT": "8080",
    "LOOPWATCH_SERVICE_PORT_PROXY": "8080",
    "LOOPWATCH_SERVICE_PORT_ADMIN": "9900",
    "LOOPWATCH_PORT": "tcp://10.96.0.17:8080",
    "LOOPWATCH_PORT_8080_TCP": "tcp://10.96.0.17:8080",
    "LOOPWATCH_PORT_8080_TCP_PROTO": "tcp",
    "LOOPWATCH_PORT_8080_TCP_PORT": "8080",
    "LOOPWATCH_PORT_8080_TCP_ADDR": "10.96.0.17",
    "LOOPWATCH_PORT_9900_TCP": "tcp://10.96.0.17:9900",
    "LOOPWATCH_PORT_9900_TCP_PROTO": "tcp",
    "LOOPWATCH_PORT_9900_TCP_PORT": "9900",
    "LOOPWATCH_PORT_9900_TCP_ADDR": "10.96.0.17",
}


def env_names(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> Iterator[str]:
    """The LOOPWATCH_* name of every setting and every section (a section can be
    set as one YAML mapping), all the way down."""
    for name, field in model.model_fields.items():
        path = (*prefix, name)
        yield ENV_PREFIX + ENV_SEPARATOR.join(path).upper()
        tp = _strip_optional(field.annotation)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            yield from env_names(tp, path)
        elif typing.get_origin(tp) is dict:
            raise AssertionError(f"{'.'.join(path)}: a mapping setting; extend this walk to its keys")


def test_no_setting_has_the_shape_of_a_service_link() -> None:
    names = list(env_names(Settings))
    assert "LOOPWATCH_ADMIN__LISTEN" in names and "LOOPWATCH_HEALTH_CHECK__TOKEN" in names
    assert len(names) > 100
    assert [n for n in names if service_link_name(n)] == []
    # The walk would notice: these are the shapes.
    assert all(service_link_name(n) for n in KUBELET_ENV)


def test_the_variables_of_a_service_named_loopwatch_are_ignored() -> None:
    settings = load_settings(env={**KUBELET_ENV, "LOOPWATCH_UPSTREAM": "ws://backend:9000"})
    assert settings.upstream == "ws://backend:9000"
    assert settings.listen == "0.0.0.0:8080" and settings.admin.listen == "127.0.0.1:9900"
    assert ignored_service_links({**KUBELET_ENV, "LOOPWATCH_UPSTREAM": "ws://b", "HOME": "/"}) == sorted(KUBELET_ENV)


def test_other_services_in_our_prefix_ipv6_and_other_protocols() -> None:
    env = {
        # Service loopwatch-admin (dual-stack cluster, IPv6 primary), one unnamed UDP port.
        "LOOPWATCH_ADMIN_SERVICE_HOST": "fd00:10:96::a",
        "LOOPWATCH_ADMIN_SERVICE_PORT": "9900",
        "LOOPWATCH_ADMIN_PORT": "udp://[fd00:10:96::a]:9900",
        "LOOPWATCH_ADMIN_PORT_9900_UDP": "udp://[fd00:10:96::a]:9900",
        "LOOPWATCH_ADMIN_PORT_9900_UDP_PROTO": "udp",
        "LOOPWATCH_ADMIN_PORT_9900_UDP_PORT": "9900",
        "LOOPWATCH_ADMIN_PORT_9900_UDP_ADDR": "fd00:10:96::a",
        # Older kubelets wrote IPv6 without brackets; SCTP.
        "LOOPWATCH_DB_PORT": "sctp://fd00::1:5432",
        "LOOPWATCH_DB_PORT_5432_SCTP": "sctp://fd00::1:5432",
    }
    load_settings(env=env)
    assert ignored_service_links(env) == sorted(env)


@pytest.mark.parametrize(
    ("name", "value", "error"),
    [
        # Typos and look-alikes stay errors naming the variable.
        ("LOOPWATCH_UPSTREAMM", "ws://backend:9000", "upstreamm: unknown key; did you mean `upstream`?"),
        ("LOOPWATCH_ADMIN_PORT", "9900", "admin_port: unknown key"),  # not tcp://ADDR:PORT
        ("LOOPWATCH_SERVICE_HOST", "loopwatch.default.svc", "service_host: unknown key"),  # not an IP
        ("LOOPWATCH_SERVICE_PORT", "http", "service_port: unknown key"),
        ("LOOPWATCH_SERVICE_PORT_ADMIN", "99999", "service_port_admin: unknown key"),
        ("LOOPWATCH_PORT", "http://10.96.0.17:8080", "port: unknown key"),
        ("LOOPWATCH_PORT_8080_TCP", "tcp://10.96.0.17:9900", "port_8080_tcp: unknown key"),  # port differs
        ("LOOPWATCH_PORT_8080_TCP", "udp://10.96.0.17:8080", "port_8080_tcp: unknown key"),  # protocol differs
        ("LOOPWATCH_PORT_8080_TCP_PROTO", "udp", "port_8080_tcp_proto: unknown key"),
        ("LOOPWATCH_PORT_8080_TCP_PORT", "9900", "port_8080_tcp_port: unknown key"),
        ("LOOPWATCH_PORT_8080_TCP_ADDR", "10.96.0", "port_8080_tcp_addr: unknown key"),
        ("LOOPWATCH_PORT_8080_HTTP", "tcp://10.96.0.17:8080", "port_8080_http: unknown key"),
        ("LOOPWATCH_service_host", "10.96.0.17", "service_host: unknown key"),  # kubelet writes upper case
        # The loader's own "__" is never a service link, whatever the value.
        ("LOOPWATCH_ADMIN__PORT", "tcp://10.96.0.17:9900", "admin.port: unknown key"),
        ("LOOPWATCH_ADMIN__SERVICE_HOST", "10.96.0.17", "admin.service_host: unknown key"),
        ("LOOPWATCH_LIMITS__X_PORT_80_TCP_PORT", "80", "limits.x_port_80_tcp_port: unknown key"),
    ],
)
def test_anything_else_unknown_stays_an_error(name: str, value: str, error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env={**KUBELET_ENV, name: value})
    [line] = caught.value.errors
    assert line.startswith(error) and line.endswith(f"(from {name})")
    assert name not in ignored_service_links({name: value})


def test_the_operator_cli_variable_is_not_a_setting() -> None:
    settings = load_settings(env={"LOOPWATCH_ADMIN_URL": "http://127.0.0.1:9900"})
    assert settings == Settings()


# --- as a process: check-config and run -------------------------------------------------


def process_env(extra: Mapping[str, str]) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH_")}
    return {**base, **extra}


async def loopwatch_cli(*argv: str, env: Mapping[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loopwatch", *argv, cwd=ROOT, env=process_env(env),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@SUBPROCESS
async def test_check_config_notes_them_once_and_still_refuses_a_typo(tmp_path: Path) -> None:
    config = tmp_path / "loopwatch.yaml"
    config.write_text('upstream: "ws://127.0.0.1:9000"\n')
    code, out, err = await loopwatch_cli("check-config", str(config), env=KUBELET_ENV)
    assert code == 0, err
    assert "ws://127.0.0.1:9000" in out
    assert err.splitlines() == [
        f"note: ignoring {', '.join(sorted(KUBELET_ENV))}: Kubernetes service links (a Service named "
        "loopwatch or loopwatch-...), not settings; set enableServiceLinks: false in the pod spec to drop them"
    ]

    code, out, err = await loopwatch_cli(
        "check-config", str(config), env={**KUBELET_ENV, "LOOPWATCH_UPSTREAMM": "ws://x:1"}
    )
    assert code == 2 and out == ""
    assert "upstreamm: unknown key; did you mean `upstream`? (from LOOPWATCH_UPSTREAMM)" in err


@SUBPROCESS
async def test_run_starts_cleanly_with_them_and_warns_once() -> None:
    async with websockets_backend(echo) as (url, _):
        args = ("--upstream", url, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0")
        async with loopwatch_run(*args, env=process_env(KUBELET_ENV)) as run:
            listening = await run.until("listening")
            admin = str(listening["admin"])
            async with aiohttp.ClientSession() as session, session.get(f"http://{admin}/readyz") as resp:
                assert resp.status == 200  # serving (and past installing its signal handlers)
    warnings = run.events("service_links_ignored")
    assert len(warnings) == 1
    assert warnings[0]["level"] == "warning" and warnings[0]["variables"] == sorted(KUBELET_ENV)
    assert "enableServiceLinks: false" in str(warnings[0]["why"])


@SUBPROCESS
async def test_run_still_exits_2_on_a_typo_among_them() -> None:
    code, _, err = await loopwatch_cli(
        "run", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
        env={**KUBELET_ENV, "LOOPWATCH_UPSTREAMM": "ws://127.0.0.1:9000"},
    )
    assert code == 2
    assert "(from LOOPWATCH_UPSTREAMM)" in err
    assert "LOOPWATCH_SERVICE_HOST" not in err and "LOOPWATCH_PORT" not in err
