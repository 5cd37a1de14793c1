"""A plain install is complete (issue 15, item 6).

The wheel is built once per session from exactly what the Dockerfile's build
stage copies (so it is also the image's wheel), and installed into a fresh venv
under the session's temporary directory — outside the source tree — with its
dependencies and no extras. Every subcommand then runs from a working
directory that is not the source tree: --version, check-config, demo,
demo-backend, simulate, replay, run and export-monitoring. The wheel itself
installs nothing at top level but `loopwatch`, and holds every module, the
compiled parts and the data files.

The build runs `pip wheel --no-deps` on a copy of those files; the build
backend's requirements come from the package index (or PIP_FIND_LINKS). A Rust
extension in setup.py is built with CARGO_TARGET_DIR pointing at the source
tree's target directory, so the dependencies compiled there are reused.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

import loopwatch
from loopwatch.proxy.app.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent
# The package-dir mapping of pyproject.toml: source folder -> path in the wheel.
MAPPED = {"loopwatch": "loopwatch", "proxy": "loopwatch/proxy", "detectors": "loopwatch/detectors",
          "dashboards": "loopwatch/dashboards", "config": "loopwatch/config"}  # fmt: skip
VERSION = loopwatch.__version__

# The wheel build can compile Rust from scratch; everything else is bounded tighter.
pytestmark = pytest.mark.timeout(1200)


# --- the build and the install (once per session) ------------------------------------


def dockerfile_build_sources() -> list[str]:
    """The paths the Dockerfile's build stage COPYs from the context."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    sources: list[str] = []
    stage = 0
    for line in text.splitlines():
        words = line.strip().split()
        if not words or words[0].startswith("#"):
            continue
        if words[0].upper() == "FROM":
            stage += 1
        elif words[0].upper() == "COPY" and stage == 1 and not any(w.startswith("--") for w in words):
            sources += words[1:-1]
    return sources


def dockerignore_excludes() -> list[str]:
    """The exclusions that follow .dockerignore's allow-list (`**/x`, `dir/`)."""
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    return [ln.rstrip("/") for ln in lines if ln and ln[0] not in "#!" and ln != "*"]


def copy_build_context(dest: Path) -> None:
    """The Docker build context as the Dockerfile copies it, into `dest`."""
    excludes = dockerignore_excludes()

    def excluded(relative: str) -> bool:
        return any(
            fnmatch.fnmatch(relative, p) or fnmatch.fnmatch(relative.rsplit("/", 1)[-1], p[3:])
            if p.startswith("**/")
            else fnmatch.fnmatch(relative, p)
            for p in excludes
        )

    def ignore(directory: str, names: list[str]) -> set[str]:
        relative = Path(directory).relative_to(ROOT).as_posix()
        prefix = "" if relative == "." else relative + "/"
        return {n for n in names if excluded(prefix + n)}

    for source in dockerfile_build_sources():
        path = ROOT / source
        if path.is_dir():
            shutil.copytree(path, dest / source, ignore=ignore)
        else:
            (dest / source).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest / source)


@dataclass(frozen=True)
class Wheel:
    path: Path
    seconds: float  # the build, Rust included
    log: str  # the build backend's output (pip -v)


@dataclass(frozen=True)
class PlainInstall:
    venv: Path
    seconds: float  # venv creation and pip install

    @property
    def loopwatch(self) -> str:
        return str(self.venv / "bin" / "loopwatch")

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")

    def env(self) -> dict[str, str]:
        """A user's shell with this venv first on PATH: nothing of the source tree's
        venv, no PYTHONPATH, no LOOPWATCH_* settings of whoever runs the tests."""
        drop = ("LOOPWATCH_", "PYTHON", "VIRTUAL_ENV", "OTEL_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        return env

    def run(
        self, *args: str, cwd: Path, timeout: float = 60, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        assert not cwd.resolve().is_relative_to(ROOT), "run from outside the source tree"
        return subprocess.run(
            [self.loopwatch, *args], cwd=cwd, env=env or self.env(), capture_output=True,
            text=True, timeout=timeout,
        )  # fmt: skip


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Wheel:
    context = tmp_path_factory.mktemp("context")
    out = tmp_path_factory.mktemp("wheelhouse")
    copy_build_context(context)
    env = {**os.environ, "CARGO_TARGET_DIR": str(ROOT / "proxy" / "dataplane" / "target")}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--wheel-dir", str(out), str(context)],
        capture_output=True, text=True, timeout=1100, env=env,
    )  # fmt: skip
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    [built] = out.glob("loopwatch-*.whl")
    return Wheel(built, seconds, result.stdout + result.stderr)


@pytest.fixture(scope="session")
def plain(wheel: Wheel, tmp_path_factory: pytest.TempPathFactory) -> PlainInstall:
    venv = tmp_path_factory.mktemp("plain") / "venv"
    assert not venv.resolve().is_relative_to(ROOT)
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
         "--no-input", str(wheel.path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return PlainInstall(venv, time.monotonic() - started)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A working directory that is not the source tree."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    return cwd


# --- what the wheel holds ------------------------------------------------------------


def wheel_names(wheel: Wheel) -> list[str]:
    with zipfile.ZipFile(wheel.path) as z:
        return z.namelist()


def test_the_wheel_installs_nothing_at_top_level_but_loopwatch(wheel: Wheel) -> None:
    names = wheel_names(wheel)
    dist_info = f"loopwatch-{VERSION}.dist-info/"
    assert all(n.startswith(("loopwatch/", dist_info)) for n in names), sorted(
        n for n in names if not n.startswith(("loopwatch/", dist_info))
    )
    with zipfile.ZipFile(wheel.path) as z:
        record = z.read(dist_info + "RECORD").decode()
        assert z.read(dist_info + "top_level.txt").decode().split() == ["loopwatch"]
        metadata = z.read(dist_info + "METADATA").decode()
        assert z.read(dist_info + "licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
    recorded = {line.split(",")[0] for line in record.splitlines() if line}
    assert recorded == set(names)
    # The SPDX expression, and no test-only package among the plain dependencies.
    assert "License-Expression: Apache-2.0" in metadata
    plain_requires = [
        line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]
    assert plain_requires and not any("websockets" in r or "pytest" in r for r in plain_requires)


def test_the_wheel_holds_every_module_the_compiled_parts_and_the_data(wheel: Wheel) -> None:
    names = set(wheel_names(wheel))
    # setuptools names every folder it finds importable but not in `packages`
    # (data folders included: they are listed as packages, pyproject.toml).
    assert "absent from the `packages` configuration" not in wheel.log
    assert "Successfully built loopwatch" in wheel.log
    # Every module of the mapped folders (a subpackage missing from pyproject's
    # `packages` would be silently left out of the wheel).
    for folder, target in MAPPED.items():
        for module in (ROOT / folder).rglob("*.py"):
            relative = module.relative_to(ROOT / folder)
            if "target" in relative.parts:  # the Rust build's output
                continue
            assert f"{target}/{relative.as_posix()}" in names, module
    # The compiled data plane (setup.py), and no C frame parser any more.
    assert any(fnmatch.fnmatch(n, "loopwatch/proxy/dataplane/_dataplane*.so") for n in names)
    assert not any(fnmatch.fnmatch(n, "loopwatch/proxy/dataplane/_frames*") for n in names)
    # The data files, all of those in the source folders: the status page, the
    # dashboard, the rules and their tests, Grafana's provisioning.
    data = [
        *(ROOT / "proxy/admin/static").glob("[!.]*"),
        ROOT / "dashboards/loopwatch.json",
        *(ROOT / "dashboards/rules").rglob("*.yml"),
        *(ROOT / "dashboards/provisioning").rglob("*.y*ml"),
        ROOT / "config/loopwatch.yaml",
    ]
    assert len(data) > 10
    for f in data:
        folder, *rest = f.relative_to(ROOT).parts
        assert "/".join([MAPPED[folder], *rest]) in names, f
    # No sources of the compiled parts, no byte code.
    leaked = [n for n in names if n.endswith((".c", ".rs", ".toml", ".lock", ".pyc"))]
    assert not leaked, leaked


# --- every subcommand, in a plain install, from elsewhere ----------------------------------


def test_version_from_the_script_and_python_m(plain: PlainInstall, outside: Path) -> None:
    result = plain.run("--version", cwd=outside)
    assert (result.returncode, result.stdout.strip()) == (0, f"loopwatch {VERSION}"), result.stderr
    result = subprocess.run(
        [plain.python, "-m", "loopwatch", "--version"], cwd=outside, env=plain.env(),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert (result.returncode, result.stdout.strip()) == (0, f"loopwatch {VERSION}"), result.stderr


def test_check_config_accepts_the_reference_config_and_names_a_bad_key(
    plain: PlainInstall, outside: Path
) -> None:
    # The reference as an install prints it (no source tree there: the deploy
    # probe found no way to the annotated keys but the docs).
    printed = plain.run("example-config", cwd=outside)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == (ROOT / "config" / "loopwatch.yaml").read_text()
    (outside / "loopwatch.yaml").write_text(printed.stdout)
    result = plain.run("check-config", "loopwatch.yaml", cwd=outside)
    assert result.returncode == 0, result.stdout + result.stderr
    (outside / "bad.yaml").write_text("upstream: ws://127.0.0.1:8000\nlisten_on: 0.0.0.0:8080\n")
    result = plain.run("check-config", "bad.yaml", cwd=outside)
    assert result.returncode == 2 and "listen_on" in result.stdout + result.stderr


def test_demo_catches_the_loop(plain: PlainInstall, outside: Path) -> None:
    result = plain.run("demo", "--duration", "5", cwd=outside, timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"the loop was caught \d+\.\d+s after tab-bug's first attempt", result.stdout)
    assert "unharmed" in result.stdout and "Traceback" not in result.stderr


@contextlib.contextmanager
def started(
    plain: PlainInstall, *args: str, cwd: Path, env: dict[str, str] | None = None, logs: bool = False
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`loopwatch ARGS` in the background; yields it and its first line of output
    (of its log, on stderr, with `logs`). Stopped with SIGTERM at the end (killed
    if it does not stop)."""
    proc = subprocess.Popen(
        [plain.loopwatch, *args], cwd=cwd, env=env or plain.env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        stream = proc.stderr if logs else proc.stdout
        assert stream is not None
        yield proc, stream.readline()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def get_json(url: str) -> object:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def test_demo_backend_answers_and_stops_on_sigterm(plain: PlainInstall, outside: Path) -> None:
    with started(plain, "demo-backend", "--listen", "127.0.0.1:0", cwd=outside) as (proc, line):
        found = re.search(r"demo backend on (http://127\.0\.0\.1:\d+)", line)
        assert found, line
        answer = get_json(f"{found.group(1)}/token?sub=alice&ttl=60")
        assert isinstance(answer, dict) and answer["token"].count(".") == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def test_simulate_records_and_replay_flags_the_same_client(plain: PlainInstall, outside: Path) -> None:
    (outside / "record.yaml").write_text(f"record:\n  path: {outside / 'events.jsonl'}\n")
    result = plain.run(
        "simulate", "auth-loop", "--duration", "2", "--config", "record.yaml", "--json", "--check",
        cwd=outside, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    [behaviour] = json.loads(result.stdout)["behaviours"]
    assert behaviour["outcome"] == "flagged and refused" and behaviour["as_expected"] is True

    result = plain.run("replay", "events.jsonl", "--json", cwd=outside)
    assert result.returncode == 0, result.stdout + result.stderr
    replayed = json.loads(result.stdout)
    assert not replayed["corrupt"]
    assert {(f["key"], f["rule"]) for f in replayed["findings"]} >= {
        ("auth-loop-1@127.0.0.1", "auth_failure_loop")
    }


def test_export_monitoring_writes_what_prometheus_and_grafana_load(
    plain: PlainInstall, outside: Path
) -> None:
    result = plain.run("export-monitoring", "monitoring", cwd=outside)
    assert result.returncode == 0, result.stdout + result.stderr
    out = outside / "monitoring"
    dashboard = json.loads((out / "loopwatch.json").read_text())
    assert dashboard["uid"] == "loopwatch-overview"
    rules = sorted(p.name for p in (out / "rules").glob("*.yml"))
    assert rules == ["alerts.yml", "recording.yml"]
    for path in [*out.rglob("*.yml"), *out.rglob("*.yaml")]:
        assert yaml.safe_load(path.read_text()), path
    provisioning = {p.relative_to(out).as_posix() for p in (out / "provisioning").rglob("*.yaml")}
    assert provisioning == {
        "provisioning/dashboards/loopwatch.yaml",
        "provisioning/datasources/prometheus.yaml",
    }
    assert f"wrote     {Path('monitoring') / 'loopwatch.json'}" in result.stdout
    # The exported rules pass their own unit tests where they were written.
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: run `make system-deps`"
    tests = sorted(str(p) for p in (out / "rules" / "tests").glob("*.yml"))
    assert tests
    check = subprocess.run([promtool, "test", "rules", *tests], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr


def shadowing_folders(cwd: Path, *names: str) -> None:
    """Folders named like loopwatch's own packages, importable from `cwd`, that fail
    loudly when imported (another project's `proxy/`, the PyPI package proxy.py)."""
    for name in names:
        (cwd / name).mkdir()
        (cwd / name / "__init__.py").write_text(f"raise ImportError('the wrong {name} package')\n")


def test_a_proxy_folder_in_the_working_directory_shadows_nothing(
    plain: PlainInstall, outside: Path
) -> None:
    shadowing_folders(outside, "proxy", "detectors", "dashboards")
    for command in ([plain.loopwatch, "--version"], [plain.python, "-m", "loopwatch", "--version"]):
        result = subprocess.run(command, cwd=outside, env=plain.env(), capture_output=True, text=True, timeout=60)
        assert (result.returncode, result.stdout.strip()) == (0, f"loopwatch {VERSION}"), result.stderr

    # The span exporter child, started from there, even beside a `loopwatch/` folder
    # (it runs `python -P -m loopwatch…`: the working directory is not on its path):
    # spans reach the console exporter (the child's stdout; loopwatch logs on stderr).
    shadowing_folders(outside, "loopwatch")
    env = {**plain.env(), "OTEL_TRACES_EXPORTER": "console", "OTEL_TRACES_SAMPLER": "always_on"}
    with started(plain, "demo-backend", "--listen", "127.0.0.1:0", cwd=outside) as (_, line):
        backend = re.search(r"http://(127\.0\.0\.1:\d+)", line)
        assert backend, line
        with started(
            plain, "run", "--upstream", f"ws://{backend.group(1)}", "--listen", "127.0.0.1:0",
            "--admin-listen", "127.0.0.1:0", cwd=outside, env=env, logs=True,
        ) as (proc, first):  # fmt: skip
            listening = json.loads(first)
            while listening["event"] == "fd_limit":  # a machine whose hard limit is below the default's need
                assert proc.stderr is not None
                listening = json.loads(proc.stderr.readline())
            assert listening["event"] == "listening", listening
            token = get_json(f"http://{backend.group(1)}/token?sub=alice&ttl=60")
            assert isinstance(token, dict)
            websocket_round_trip(f"ws://{listening['proxy']}/ws?token={token['token']}")
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=30)
    spans = [json.loads(s) for s in re.findall(r"^\{\n.*?^\}$", out, re.S | re.M)]
    assert spans and all(s["context"]["trace_id"] for s in spans), out[-3000:] + err[-3000:]
    assert "span_exporter_exited" not in out + err


def websocket_round_trip(url: str) -> None:
    """One message through a WebSocket, with the standard library only (the test
    is about the plain install's processes, not about any client library)."""
    import base64
    import socket
    import struct
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    assert parts.hostname == "127.0.0.1" and parts.port
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            f"GET {parts.path}?{parts.query} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        reader = sock.makefile("rb")
        status = reader.readline()
        assert status.startswith(b"HTTP/1.1 101"), status
        while reader.readline() not in (b"\r\n", b""):
            pass
        mask = os.urandom(4)
        payload = b"hello"
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        sock.sendall(struct.pack("!BB", 0x81, 0x80 | len(payload)) + mask + masked)
        head = reader.read(2)
        assert head[0] == 0x81 and head[1] == len(payload), head
        assert reader.read(len(payload)) == payload
        close = struct.pack("!H", 1000)
        masked_close = bytes(b ^ mask[i % 4] for i, b in enumerate(close))
        sock.sendall(struct.pack("!BB", 0x88, 0x80 | len(close)) + mask + masked_close)
        assert reader.read(2)[0] == 0x88  # the close frame's reply


# --- export-monitoring's refusals, in this tree ------------------------------------------


def export(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(["export-monitoring", *args])
    return code, out.getvalue(), err.getvalue()


def test_export_monitoring_never_replaces_a_differing_file_without_force(tmp_path: Path) -> None:
    target = tmp_path / "monitoring"
    code, out, _ = export(str(target))
    assert code == 0 and out.count("wrote ") == len(list(target.rglob("*.*"))) > 10
    shipped = (ROOT / "dashboards" / "rules" / "alerts.yml").read_bytes()
    assert (target / "rules" / "alerts.yml").read_bytes() == shipped

    # Again: nothing to do.
    code, out, _ = export(str(target))
    assert code == 0 and "wrote " not in out and "unchanged" in out

    # A local edit is not overwritten, and nothing else is written either.
    (target / "rules" / "alerts.yml").write_text("# my edit\n")
    (target / "loopwatch.json").unlink()
    code, out, err = export(str(target))
    assert code == 1 and out == ""
    assert "nothing written (--force replaces them)" in err and str(target / "rules" / "alerts.yml") in err
    assert not (target / "loopwatch.json").exists()
    assert (target / "rules" / "alerts.yml").read_text() == "# my edit\n"

    code, out, _ = export(str(target), "--force")
    assert code == 0
    assert f"replaced  {target / 'rules' / 'alerts.yml'}" in out
    assert f"wrote     {target / 'loopwatch.json'}" in out
    assert (target / "rules" / "alerts.yml").read_bytes() == shipped
    assert not [p for p in target.rglob(".*")], "a temporary file was left behind"


def test_export_monitoring_refuses_a_target_that_cannot_hold_the_files(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    code, _, err = export(str(tmp_path / "file"))
    assert code == 2 and "is not a directory" in err
    (tmp_path / "dir" / "loopwatch.json").mkdir(parents=True)
    code, _, err = export(str(tmp_path / "dir"))
    assert code == 2 and "is a directory" in err
    assert not (tmp_path / "dir" / "rules").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs and /dev/zero are POSIX")
def test_export_monitoring_never_reads_what_is_not_a_regular_file_of_the_right_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A FIFO in a file's place hung the command; a link to /dev/zero was read
    until the OOM killer came (22 GB). Both are "differs", unread."""
    from loopwatch.proxy.tools import monitoring

    target = tmp_path / "monitoring"
    assert export(str(target))[0] == 0
    os.mkfifo(target / "loopwatch.json.fifo")
    (target / "loopwatch.json").unlink()
    (target / "loopwatch.json.fifo").rename(target / "loopwatch.json")
    (target / "rules" / "alerts.yml").unlink()
    (target / "rules" / "alerts.yml").symlink_to("/dev/zero")
    (target / "rules" / "recording.yml").unlink()
    (target / "rules" / "recording.yml").symlink_to(tmp_path / "nowhere")
    shipped_json = (ROOT / "dashboards" / "loopwatch.json").read_bytes()
    (target / "rules" / "tests").joinpath("loop_test.yml").write_bytes(b"x" * 10)  # another size

    opened: list[str] = []
    real_open = os.open

    def spy(path: Any, flags: int, *args: Any) -> int:
        opened.append(os.fspath(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(monitoring.os, "open", spy)
    code, out, err = export(str(target))
    assert code == 1 and out == ""
    for name in ("loopwatch.json", "rules/alerts.yml", "rules/recording.yml", "rules/tests/loop_test.yml"):
        assert f"  {target / name}\n" in err
    # Only files of the shipped size were opened, none of the odd ones.
    assert not {str(target / n) for n in ("loopwatch.json", "rules/alerts.yml", "rules/recording.yml")} & set(opened)
    assert str(target / "rules" / "tests" / "loop_test.yml") not in opened

    code, out, _ = export(str(target), "--force")
    assert code == 0 and f"replaced  {target / 'loopwatch.json'}" in out
    assert (target / "loopwatch.json").read_bytes() == shipped_json
    assert not (target / "rules" / "alerts.yml").is_symlink()  # the link replaced, /dev/zero untouched


def test_export_monitoring_refuses_an_empty_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Path("") is the working directory: a script's empty variable wrote the files there.
    monkeypatch.chdir(tmp_path)
    code, out, err = export("")
    assert code == 2 and out == "" and err == "loopwatch export-monitoring: DIR: expected a directory, got ''\n"
    assert list(tmp_path.iterdir()) == []


def test_version_in_this_tree(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli_main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"loopwatch {VERSION}\n"
