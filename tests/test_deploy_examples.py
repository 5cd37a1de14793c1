"""Deployment examples that cannot run here (no Docker daemon, no cluster): parsed and
cross-checked, so every mounted file exists, every loopwatch command line and
LOOPWATCH_* variable is one loopwatch accepts, ports agree between the pieces, the
Kubernetes PrometheusRule is exactly the rule files, and the probes and scrapes each
example sets up pass the admin port's Host check as the orchestrator would send them."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fnmatch
import http.server
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import yaml
from prometheus_client import CollectorRegistry

from loopwatch.dashboards import generate
from loopwatch.proxy.admin.api import Exposure
from loopwatch.proxy.admin.server import AdminServer
from loopwatch.proxy.app.cli import build_parser
from loopwatch.proxy.app.settings import Settings, load_settings
from loopwatch.proxy.observe import span_export
from loopwatch.proxy.sections import parse_host_port
from loopwatch.proxy.tools.demo_backend import issue_token
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "config" / "examples"
COMPOSE = EXAMPLES / "docker-compose.yml"
KUBERNETES = EXAMPLES / "kubernetes"


# --- helpers -------------------------------------------------------------------


def loopwatch_settings(
    argv: list[str], env: dict[str, str]
) -> tuple[argparse.Namespace, Settings | None]:
    """Parse `loopwatch ARGV` with the real parser; for `run`, resolve settings as
    `loopwatch run` does (defaults < env < flags), which rejects unknown keys."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse's way of saying no
        raise AssertionError(f"loopwatch rejects {argv}") from exc
    if args.command != "run":
        return args, None
    assert args.config is None, "examples configure loopwatch by flags and environment only"
    overrides = {
        "upstream": args.upstream,
        "listen": args.listen,
        "admin.listen": args.admin_listen,
    }
    settings = load_settings(None, env=env, overrides=overrides)
    settings.require_upstream()
    return args, settings


def port_of(address: str) -> int:
    return parse_host_port(address).port


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def exec_form(value: str) -> list[str]:
    return json.loads(value) if value.startswith("[") else shlex.split(value)


def stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions, one list per build stage (FROM first)."""
    out: list[list[tuple[str, str]]] = []
    for keyword, rest in dockerfile_instructions():
        if keyword == "FROM":
            out.append([])
        if out:
            out[-1].append((keyword, rest))
    return out


def image_env() -> dict[str, str]:
    """The environment the image's last stage sets (the build stage's is not in it)."""
    env: dict[str, str] = {}
    for keyword, rest in stages()[-1]:
        if keyword == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as the container sees it when the shell sets none
    of it: a key without a value is taken from the shell, so it is unset here."""
    return {k: str(v) for k, v in service.get("environment", {}).items() if v is not None}


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path to host path for a compose service's bind mounts."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith((".", "/")):
            mounts[target] = (COMPOSE.parent / source).resolve()
    return mounts


def host_path(mounts: dict[str, Path], container_path: str) -> Path:
    """Where a path inside the container comes from, through the longest mount."""
    path = PurePosixPath(container_path)
    for target in sorted(mounts, key=len, reverse=True):
        if path == PurePosixPath(target) or PurePosixPath(target) in path.parents:
            return mounts[target] / path.relative_to(target)
    raise AssertionError(f"{container_path} is not mounted from the repository")


def published(service: dict[str, Any]) -> set[int]:
    """Container ports a compose service publishes."""
    return {int(str(port).rsplit(":", 1)[-1].split("/")[0]) for port in service.get("ports", [])}


def loopwatch_down_job_regex() -> str:
    rules = {r.get("alert"): r for g in generate.rule_groups() for r in g["rules"]}
    return re.search(r'up\{job=~"([^"]+)"\}', rules["LoopwatchDown"]["expr"]).group(1)


def kubernetes_objects() -> dict[str, dict[str, Any]]:
    objects = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and "kind" in doc and doc["kind"] != "Kustomization":
                objects[doc["kind"]] = doc
    return objects


# --- Dockerfile ------------------------------------------------------------------


def test_dockerfile_is_slim_and_non_root() -> None:
    instructions = dockerfile_instructions()
    images = [rest.split()[0] for keyword, rest in instructions if keyword == "FROM"]
    assert images and all(
        re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", image) for image in images
    ), images
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users, "no USER: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    # The last stage's USER comes after its last RUN (nothing later runs as root).
    last_stage = instructions[max(i for i, (k, _) in enumerate(instructions) if k == "FROM") :]
    kinds = [k for k, _ in last_stage]
    assert max(i for i, k in enumerate(kinds) if k == "USER") > max(
        i for i, k in enumerate(kinds) if k == "RUN"
    )


def test_dockerfile_entrypoint_command_environment_and_ports() -> None:
    instructions = dict(dockerfile_instructions())  # last of each kind wins, as in Docker
    assert exec_form(instructions["ENTRYPOINT"]) == ["loopwatch"]
    env = image_env()
    args, settings = loopwatch_settings(
        exec_form(instructions["CMD"]), {**env, "LOOPWATCH_UPSTREAM": "ws://backend:8000"}
    )
    assert settings is not None
    assert parse_host_port(settings.admin.listen).host == "0.0.0.0", (
        "admin port unreachable from outside"
    )
    exposed = {int(p) for p in instructions["EXPOSE"].split()}
    assert exposed == {port_of(settings.listen), port_of(settings.admin.listen)}


def test_dockerfile_healthcheck_calls_healthz_on_the_admin_port() -> None:
    """The check, run as the image runs it: it asks /healthz on the port of
    LOOPWATCH_ADMIN__LISTEN (the image's, or one moved with that variable)."""
    instructions = dict(dockerfile_instructions())
    check = instructions["HEALTHCHECK"]
    assert "CMD" in check
    command = exec_form(check.split("CMD", 1)[1].strip())
    assert command[0] == "python"  # in the slim image (no curl or wget there)
    _, settings = loopwatch_settings(["run", "--upstream", "ws://backend:8000"], image_env())
    assert settings is not None
    asked: list[str] = []

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the standard library's name
            asked.append(self.path)
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            port = server.server_address[1]
            # A proxy in the container's environment (Docker's client `proxies`
            # set it) is not asked: the check was unhealthy behind one (the
            # deploy probe). It points nowhere here.
            proxied = {"http_proxy": f"http://127.0.0.1:{free_port()}", "HTTP_PROXY": f"http://127.0.0.1:{free_port()}"}
            for listen in (f"0.0.0.0:{port}", f"[::]:{port}"):
                env = {**os.environ, **image_env(), **proxied, "LOOPWATCH_ADMIN__LISTEN": listen}
                assert subprocess.run([sys.executable, *command[1:]], env=env, timeout=30).returncode == 0
            moved = {**os.environ, **image_env(), "LOOPWATCH_ADMIN__LISTEN": f"0.0.0.0:{free_port()}"}
            assert subprocess.run([sys.executable, *command[1:]], env=moved, timeout=30,
                                  stderr=subprocess.DEVNULL).returncode != 0  # fmt: skip
        finally:
            server.shutdown()
    assert asked == ["/healthz", "/healthz"]
    # Without the variable set, the image's own admin port.
    assert image_env()["LOOPWATCH_ADMIN__LISTEN"].rpartition(":")[2] == str(port_of(settings.admin.listen))


def test_dockerfile_copies_only_what_exists_and_the_context_keeps() -> None:
    ignore = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert ignore[0] == "*", "the context is an allow-list"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copies = [
        rest.split()
        for keyword, rest in dockerfile_instructions()
        if keyword == "COPY" and "--from" not in rest
    ]
    assert copies
    for *sources, _dest in copies:
        for source in sources:
            assert (ROOT / source).exists(), source
            assert source.rstrip("/") in allowed, f"{source} is excluded by .dockerignore"
    # Everything the package build needs is in the context.
    for package in ("proxy", "detectors", "pyproject.toml", "setup.py", "README.md"):
        assert package in allowed


def pip_commands(stage: list[tuple[str, str]], verb: str) -> list[list[str]]:
    """`pip VERB …` command lines in a stage's RUN instructions."""
    found = []
    for keyword, rest in stage:
        if keyword != "RUN":
            continue
        for command in re.split(r"&&|;", rest):
            words = shlex.split(command)
            while words and words[0].startswith("--mount"):  # RUN --mount=… pip …
                words = words[1:]
            if words[:2] == ["pip", verb]:
                found.append(words[2:])
    return found


def test_dockerfile_image_is_a_plain_install_of_the_wheel() -> None:
    """The image gets what `pip install loopwatch` gets: the wheel built from the
    context, installed with its dependencies and no extras (so no test-only
    packages: tests/test_wheel.py runs every subcommand in such an install)."""
    build, runtime = stages()[0], stages()[-1]
    [wheel] = pip_commands(build, "wheel")
    assert wheel[-1] == "." and "--no-deps" not in wheel, wheel  # loopwatch and its dependencies
    [install] = pip_commands(runtime, "install")
    targets = [w for w in install if not w.startswith("-")]
    assert targets == ["/wheels/*.whl"], install
    assert not any("[" in w or w in ("-e", "--editable") for w in install), install


def test_dockerfile_build_stage_has_cargo_when_the_build_compiles_rust() -> None:
    setup_py = (ROOT / "setup.py").read_text()
    if "RustExtension(" not in setup_py:  # only the C frame parser: gcc is enough
        assert "gcc" in " ".join(rest for _, rest in stages()[0])
        return
    build = stages()[0]
    copied = [rest for keyword, rest in build if keyword == "COPY" and "--from=rust:" in rest]
    assert any("/usr/local/cargo" in c for c in copied), "no Rust toolchain in the build stage"
    env = {}
    for keyword, rest in build:
        if keyword == "ENV":
            env.update(item.partition("=")[::2] for item in shlex.split(rest))
    assert "/usr/local/cargo/bin" in env.get("PATH", "").split(":"), env


# --- docker compose ----------------------------------------------------------------


def test_compose_wires_the_five_services() -> None:
    services = compose()["services"]
    assert set(services) == {"backend", "loopwatch", "prometheus", "alertmanager", "grafana"}


def test_compose_mounts_and_build_context_exist() -> None:
    for name, service in compose()["services"].items():
        for target, source in bind_mounts(service).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) does not exist"
            assert source.is_relative_to(ROOT), source
        if "build" in service:
            context = (COMPOSE.parent / service["build"]["context"]).resolve()
            assert (context / service["build"]["dockerfile"]).is_file()


def test_compose_loopwatch_command_ports_and_upstream() -> None:
    services = compose()["services"]
    _, settings = loopwatch_settings(
        services["loopwatch"]["command"],
        {**image_env(), **compose_env(services["loopwatch"])},
    )
    assert settings is not None and settings.upstream is not None
    assert published(services["loopwatch"]) == {
        port_of(settings.listen),
        port_of(settings.admin.listen),
    }
    # The upstream is the backend service, on the port the backend listens on.
    upstream = urlsplit(settings.upstream)
    assert upstream.hostname == "backend"
    backend_args, _ = loopwatch_settings(services["backend"]["command"], {})
    assert backend_args.command == "demo-backend"
    assert port_of(backend_args.listen) == upstream.port


def test_compose_prometheus_scrapes_loopwatch_loads_the_rules_and_alerts_alertmanager() -> None:
    services = compose()["services"]
    mounts = bind_mounts(services["prometheus"])
    config_flag = next(
        a for a in services["prometheus"]["command"] if a.startswith("--config.file=")
    )
    config_path = host_path(mounts, config_flag.split("=", 1)[1])
    config = yaml.safe_load(config_path.read_text())

    _, settings = loopwatch_settings(services["loopwatch"]["command"], image_env())
    assert settings is not None
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "loopwatch"]
    assert re.fullmatch(loopwatch_down_job_regex(), job["job_name"])
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"loopwatch:{port_of(settings.admin.listen)}"]

    [alertmanager] = [
        t
        for am in config["alerting"]["alertmanagers"]
        for sc in am["static_configs"]
        for t in sc["targets"]
    ]
    host, port = alertmanager.split(":")
    assert host in services and int(port) in published(services[host])

    # The rule globs, seen from the host through the mounts, are exactly the rule files.
    loaded = set()
    for pattern in config["rule_files"]:
        directory = host_path(mounts, str(PurePosixPath(pattern).parent))
        loaded |= {
            p for p in directory.iterdir() if fnmatch.fnmatch(p.name, PurePosixPath(pattern).name)
        }
    assert loaded == set(generate.rule_files())


def test_compose_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: run `make system-deps`"
    services = compose()["services"]
    mounts = bind_mounts(services["prometheus"])
    config = yaml.safe_load((EXAMPLES / "prometheus.yml").read_text())
    # Container paths to host paths, so promtool also loads and checks the rules.
    config["rule_files"] = [
        str(host_path(mounts, str(PurePosixPath(p).parent)) / PurePosixPath(p).name)
        for p in config["rule_files"]
    ]
    rewritten = tmp_path / "prometheus.yml"
    rewritten.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [promtool, "check", "config", str(rewritten)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(generate.rule_files())} rule files found" in result.stdout


def test_compose_grafana_provisions_the_datasource_and_the_dashboard() -> None:
    services = compose()["services"]
    grafana = services["grafana"]
    # The image matches the Grafana release the SDK generates for.
    target = importlib.metadata.version("grafana-foundation-sdk").split("!")[-1]
    tag = grafana["image"].split(":")[1]
    assert tag.split(".")[:2] == target.split(".")[:2], (tag, target)

    mounts = bind_mounts(grafana)
    provisioning = host_path(mounts, "/etc/grafana/provisioning")
    assert provisioning == ROOT / "dashboards" / "provisioning"

    [datasource] = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())[
        "datasources"
    ]
    assert datasource["type"] == "prometheus"
    url = urlsplit(datasource["url"])
    assert url.hostname in services and url.port in published(services[url.hostname])
    assert url.hostname == "prometheus"

    [provider] = yaml.safe_load((provisioning / "dashboards" / "loopwatch.yaml").read_text())[
        "providers"
    ]
    assert provider["type"] == "file"
    dashboards = [
        t for t in mounts if t.startswith(provider["options"]["path"] + "/") and t.endswith(".json")
    ]
    assert [host_path(mounts, t) for t in dashboards] == [generate.DASHBOARD_FILE]


def test_alertmanager_routes_every_severity_to_a_defined_receiver() -> None:
    config = yaml.safe_load((EXAMPLES / "alertmanager.yml").read_text())
    receivers = {r["name"] for r in config["receivers"]}
    route = config["route"]
    assert route["receiver"] in receivers
    routed = {}
    for child in route["routes"]:
        assert child["receiver"] in receivers
        for matcher in child["matchers"]:
            m = re.fullmatch(r'severity="(\w+)"', matcher)
            if m:
                routed[m.group(1)] = child["receiver"]
    severities = {
        r["labels"]["severity"] for g in generate.rule_groups() for r in g["rules"] if "alert" in r
    }
    assert severities <= set(routed), severities - set(routed)
    alerts = {r["alert"] for g in generate.rule_groups() for r in g["rules"] if "alert" in r}
    for rule in config.get("inhibit_rules", []):
        for matcher in rule["source_matchers"]:
            m = re.fullmatch(r'alertname="(\w+)"', matcher)
            if m:
                assert m.group(1) in alerts


# --- Kubernetes -----------------------------------------------------------------------


def containers() -> dict[str, dict[str, Any]]:
    spec = kubernetes_objects()["Deployment"]["spec"]["template"]["spec"]
    return {c["name"]: c for c in spec["containers"]}


def container_env(container: dict[str, Any]) -> dict[str, str]:
    # Values from secrets are not here; a placeholder shows their key is accepted.
    return {e["name"]: e.get("value", "placeholder-secret") for e in container.get("env", [])}


def test_kubernetes_sidecar_command_environment_and_upstream() -> None:
    sidecar, backend = containers()["loopwatch"], containers()["backend"]
    _, settings = loopwatch_settings(sidecar["args"], {**image_env(), **container_env(sidecar)})
    assert settings is not None and settings.upstream is not None
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert ports == {"ws": port_of(settings.listen), "admin": port_of(settings.admin.listen)}
    # Beside the backend: the upstream is the pod's loopback and the backend's port.
    backend_args, _ = loopwatch_settings(backend["args"], {})
    upstream = urlsplit(settings.upstream)
    assert upstream.hostname == "127.0.0.1"
    assert (parse_host_port(backend_args.listen).host, port_of(backend_args.listen)) == (
        "127.0.0.1",
        upstream.port,
    )


def test_kubernetes_probes_hit_health_and_readiness_on_the_admin_port() -> None:
    sidecar = containers()["loopwatch"]
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    _, settings = loopwatch_settings(sidecar["args"], {**image_env(), **container_env(sidecar)})
    assert settings is not None
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = sidecar[probe]["httpGet"]
        assert get["path"] == path
        port = ports[get["port"]] if isinstance(get["port"], str) else get["port"]
        assert port == port_of(settings.admin.listen)


def test_kubernetes_service_and_servicemonitor_line_up() -> None:
    objects = kubernetes_objects()
    pod_labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service = objects["Service"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert objects["Deployment"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    container_ports = {p["name"] for p in containers()["loopwatch"]["ports"]}
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    for port in service_ports.values():
        assert port["targetPort"] in container_ports
    # Nothing routes to the backend directly.
    assert all(p["targetPort"] != 8000 for p in service_ports.values())

    monitor = objects["ServiceMonitor"]
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    [endpoint] = monitor["spec"]["endpoints"]
    assert (
        endpoint["port"] in service_ports
        and service_ports[endpoint["port"]]["targetPort"] == "admin"
    )
    assert endpoint["path"] == "/metrics"
    # The job Prometheus will give these targets is one LoopwatchDown watches.
    job = service["metadata"]["labels"][monitor["spec"]["jobLabel"]]
    assert re.fullmatch(loopwatch_down_job_regex(), job), job


def pod_spec() -> dict[str, Any]:
    return kubernetes_objects()["Deployment"]["spec"]["template"]["spec"]


def test_kubernetes_admin_token_is_required_and_service_links_are_off() -> None:
    # Without the secret the pod must not start with an admin port anyone in the
    # cluster can reach; service links would put LOOPWATCH_* variables in it.
    assert pod_spec()["enableServiceLinks"] is False
    [token] = [e for e in containers()["loopwatch"]["env"] if e["name"] == "LOOPWATCH_ADMIN__TOKEN"]
    ref = token["valueFrom"]["secretKeyRef"]
    assert ref["name"] and ref["key"] and ref.get("optional", False) is False


def test_examples_beyond_loopback_say_how_to_set_the_token() -> None:
    """Every example whose admin port listens beyond loopback has no token in the
    file (it is a secret) and tells the reader to set LOOPWATCH_ADMIN__TOKEN."""
    for path in sorted(EXAMPLES.glob("*.yaml")):
        settings = load_settings(path, env={})
        if Exposure.of(parse_host_port(settings.admin.listen).host) is Exposure.NETWORK:
            assert settings.admin.token is None, path.name
            assert not settings.admin.insecure, path.name
            assert "LOOPWATCH_ADMIN__TOKEN" in path.read_text(), path.name


@contextlib.asynccontextmanager
async def admin_port_as_configured(settings: Settings) -> AsyncIterator[str]:
    """The admin port with an example's admin settings, bound to loopback (the
    exposure rules judge the configured address); yields its base URL."""
    server = AdminServer(CollectorRegistry(), ready=lambda: True, settings=lambda: settings.admin)
    await server.start("127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.stop()


async def status_of(base: str, method: str, path: str, host: str) -> int:
    async with aiohttp.ClientSession() as s, s.request(method, base + path, headers={"Host": host}) as r:
        return r.status


async def test_probes_and_scrapes_of_every_example_pass_the_admin_guard() -> None:
    """What the orchestrators send, with the Host they send it with, answered 200
    by an admin port configured as each example configures it; a change without
    the token refused."""
    pod_ip = "10.42.0.17"  # the kubelet and a ServiceMonitor's Prometheus use the pod's address

    # Docker: the image's HEALTHCHECK, on the container's loopback.
    _, image = loopwatch_settings(["run", "--upstream", "ws://backend:8000"], image_env())
    assert image is not None
    admin = port_of(image.admin.listen)
    async with admin_port_as_configured(image) as base:
        assert await status_of(base, "GET", "/healthz", f"127.0.0.1:{admin}") == 200
        assert await status_of(base, "POST", "/api/reload", f"127.0.0.1:{admin}") == 403  # no token

    # docker compose: Prometheus scrapes the service by its name.
    services = compose()["services"]
    _, composed = loopwatch_settings(
        services["loopwatch"]["command"], {**image_env(), **compose_env(services["loopwatch"])}
    )
    assert composed is not None
    config = yaml.safe_load((EXAMPLES / "prometheus.yml").read_text())
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "loopwatch"]
    [target] = [t for sc in job["static_configs"] for t in sc["targets"]]
    async with admin_port_as_configured(composed) as base:
        assert await status_of(base, "GET", job.get("metrics_path", "/metrics"), target) == 200
        assert await status_of(base, "GET", "/healthz", f"127.0.0.1:{admin}") == 200
        assert await status_of(base, "POST", "/api/reload", f"localhost:{admin}") == 403  # no token

    # Kubernetes: liveness and readiness probes, the ServiceMonitor's scrape.
    sidecar = containers()["loopwatch"]
    _, pod = loopwatch_settings(sidecar["args"], {**image_env(), **container_env(sidecar)})
    assert pod is not None and pod.admin.token is not None
    [endpoint] = kubernetes_objects()["ServiceMonitor"]["spec"]["endpoints"]
    async with admin_port_as_configured(pod) as base:
        host = f"{pod_ip}:{port_of(pod.admin.listen)}"
        for probe in ("livenessProbe", "readinessProbe"):
            assert await status_of(base, "GET", sidecar[probe]["httpGet"]["path"], host) == 200, probe
        assert await status_of(base, "GET", endpoint["path"], host) == 200
        assert await status_of(base, "POST", "/api/reload", host) == 401  # the token is set


def test_kubernetes_prometheusrule_is_the_rule_files() -> None:
    rule = kubernetes_objects()["PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"]["groups"] == generate.rule_groups()
    assert generate.PROMETHEUS_RULE_FILE.read_text() == generate.prometheus_rule_yaml(), (
        "run python -m loopwatch.dashboards.generate"
    )


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    manifests = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests


@pytest.mark.parametrize(
    "path", sorted((ROOT / "dashboards" / "provisioning").rglob("*.yaml")), ids=lambda p: p.name
)
def test_provisioning_files_are_grafana_v1(path: Path) -> None:
    assert yaml.safe_load(path.read_text())["apiVersion"] == 1


# --- the backend both examples run: the loopwatch image's demo-backend -------------------


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    return _normalized(re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0])


def modules_of_the_test_extra() -> list[str]:
    """Top-level modules of the packages only the `test` extra brings in (websockets,
    pytest, hypothesis, …): what a plain install, like the image, does not have."""
    requires = importlib.metadata.requires("loopwatch") or []
    extra = {_requirement_name(r) for r in requires if re.search(r"extra\s*==\s*.test.", r)}
    # Everything the plain dependencies pull in, which the image does have.
    plain: set[str] = set()
    todo = [_requirement_name(r) for r in requires if "extra" not in r]
    while todo:
        name = todo.pop()
        if name in plain:
            continue
        plain.add(name)
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            todo += [
                _requirement_name(r)
                for r in importlib.metadata.requires(name) or []
                if "extra" not in r
            ]
    return sorted(
        module
        for module, dists in importlib.metadata.packages_distributions().items()
        if any(_normalized(d) in extra - plain for d in dists)
    )



# `loopwatch ARGS` with the test extra's modules made unimportable, as in the image.
WITHOUT_TEST_EXTRAS = (
    "import sys\n"
    "for name in sys.argv[1].split(','):\n"
    "    sys.modules[name] = None\n"
    "from loopwatch.proxy.app.cli import main\n"
    "raise SystemExit(main(sys.argv[2:]))\n"
)


def example_backends() -> dict[str, tuple[str, list[str]]]:
    """Example name to (image, loopwatch arguments) of the backend it runs."""
    services = compose()["services"]
    return {
        "docker compose": (services["backend"]["image"], services["backend"]["command"]),
        "kubernetes": (containers()["backend"]["image"], containers()["backend"]["args"]),
    }


def test_the_examples_backend_is_the_loopwatch_image_demo_backend() -> None:
    services = compose()["services"]
    assert services["backend"]["image"] == services["loopwatch"]["image"]
    assert services["backend"]["build"] == services["loopwatch"]["build"]
    assert containers()["backend"]["image"] == containers()["loopwatch"]["image"]
    assert exec_form(dict(dockerfile_instructions())["ENTRYPOINT"]) == ["loopwatch"]
    listen = {}
    for name, (_, argv) in example_backends().items():
        args, _ = loopwatch_settings(argv, {})
        assert args.command == "demo-backend", name
        listen[name] = parse_host_port(args.listen).host
    # compose: loopwatch reaches it across containers; Kubernetes: beside it in the pod.
    assert listen == {"docker compose": "0.0.0.0", "kubernetes": "127.0.0.1"}
    # The image's websockets-free install is what runs it.
    test_only = modules_of_the_test_extra()
    assert "websockets" in test_only and "aiohttp" not in test_only


@pytest.mark.parametrize("example", ["docker compose", "kubernetes"])
async def test_the_examples_backend_command_runs_without_the_test_extras(
    example: str, tmp_path: Path
) -> None:
    """The example's backend command line, on loopback with a free port, in a
    process that cannot import websockets, pytest or any other test-only package:
    it issues tokens, echoes with a valid one, closes 1008 on an expired one and
    stops on SIGTERM (what `docker stop` and the kubelet send) with status 0."""
    _, argv = example_backends()[example]
    assert argv[0] == "demo-backend"
    i = argv.index("--listen") + 1
    argv = [*argv[:i], "127.0.0.1:0", *argv[i + 1 :]]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WITHOUT_TEST_EXTRAS, ",".join(modules_of_the_test_extra()), *argv,
        cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        found = re.search(r"demo backend on (http://127\.0\.0\.1:\d+)", line)
        assert found, line + (await proc.stderr.read()).decode()
        base = found.group(1)
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            async with http.get(f"{base}/token", params={"sub": "probe", "ttl": "60"}) as r:
                assert r.status == 200
                token = (await r.json())["token"]
            async with http.ws_connect(f"{base}/ws", params={"token": token}) as ws:
                await ws.send_str("hello")
                assert (await ws.receive(timeout=5)).data == "hello"
            expired = issue_token("probe", -60)
            async with http.ws_connect(f"{base}/ws", params={"token": expired}) as ws:
                msg = await ws.receive(timeout=5)
                assert (msg.type, msg.data, msg.extra) == (aiohttp.WSMsgType.CLOSE, 1008, "token expired")
            async with http.get(f"{base}/token", params={"ttl": "forever"}) as r:
                assert r.status == 400  # a clear answer, not a 500
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        assert b"Traceback" not in await proc.stderr.read()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_kubernetes_waits_before_sigterm_and_its_grace_covers_the_drain() -> None:
    """SIGTERM closes the listener at once, while the pod leaves the Service's
    endpoints seconds later: the sidecar waits in preStop first (and the
    backend as long, so the drain still finds it), and the grace period
    covers the wait, the drain and the span exporter's hand-over."""
    spec = kubernetes_objects()["Deployment"]["spec"]["template"]["spec"]
    sidecar, backend = containers()["loopwatch"], containers()["backend"]
    wait = sidecar["lifecycle"]["preStop"]["sleep"]["seconds"]
    _, settings = loopwatch_settings(sidecar["args"], {**image_env(), **container_env(sidecar)})
    assert settings is not None
    # The kubelet runs both hooks at once: the backend outlasts the drain.
    assert wait >= 5
    assert backend["lifecycle"]["preStop"]["sleep"]["seconds"] > wait + settings.limits.shutdown_timeout
    grace = wait + settings.limits.shutdown_timeout + span_export.CHILD_EXIT_WAIT
    assert spec["terminationGracePeriodSeconds"] >= grace
    # The memory request is above what the sidecar holds idle (~77 MiB).
    assert sidecar["resources"]["requests"]["memory"] == "96Mi"
