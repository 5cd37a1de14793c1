"""`dataplane_threads`: the data plane's worker threads (nginx's
worker_processes, Envoy's --concurrency). Checked from outside: check-config's
answers, the threads a `loopwatch run` process really has (named
loopwatch-dataplane, counted in /proc/PID/task), its `listening` line and
`loopwatch_dataplane_threads` on /metrics, and a reload that changes it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from loopwatch.proxy.app.cli import check_config_main
from loopwatch.proxy.app.runtime import ConfigSources, start
from loopwatch.proxy.app.settings import ConfigError, load_settings
from tests.test_lifecycle import ROOT, SUBPROCESS, clean_env, run_cli

# The runtime names its threads "loopwatch-dataplane" (listener.rs); the
# kernel keeps the first 15 bytes of a thread's name in `comm`.
THREAD_COMM = "loopwatch-dataplane"[:15]
UPSTREAM = "ws://127.0.0.1:9"  # never connected to: no client comes
EXPECTED = 'expected "auto" or an integer from 1 to 1024, got '


def dataplane_threads(pid: int) -> int:
    """The threads of process `pid` named as the data plane's runtime names its own."""
    count = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread that just ended
            if (task / "comm").read_text().rstrip("\n") == THREAD_COMM:
                count += 1
    return count


def cgroup_cpu_quota() -> int | None:
    """The CPU quota of this process's cgroup in whole CPUs (rounded down, at
    least 1), the smallest along its ancestors, as Rust's
    std::thread::available_parallelism reads it; None without one."""
    quotas: list[int] = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            roots, name, period_name = [Path("/sys/fs/cgroup")], "cpu.max", None
        elif "cpu" in controllers.split(","):  # cgroup v1
            roots = [Path("/sys/fs/cgroup") / d for d in ("cpu", "cpu,cpuacct", "cpuacct,cpu")]
            name, period_name = "cpu.cfs_quota_us", "cpu.cfs_period_us"
        else:
            continue
        for root in roots:
            directory = root / path.lstrip("/")
            while True:
                with contextlib.suppress(OSError, ValueError):
                    if period_name is None:
                        quota, period = (directory / name).read_text().split()
                    else:
                        quota = (directory / name).read_text().strip()
                        period = (directory / period_name).read_text().strip()
                    if quota not in ("max", "-1") and int(period) > 0:
                        quotas.append(max(1, int(quota) // int(period)))
                if directory == root:
                    break
                directory = directory.parent
    return min(quotas) if quotas else None


def cores_for(cpus: set[int]) -> int:
    """What "auto" comes to for a process allowed on `cpus` (in this cgroup)."""
    quota = cgroup_cpu_quota()
    return len(cpus) if quota is None else min(len(cpus), quota)


def scrape_threads(admin_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    values = [line.split()[1] for line in text.splitlines() if line.startswith("loopwatch_dataplane_threads ")]
    assert len(values) == 1, text
    return float(values[0])


# --- the setting ------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "loaded"), [("auto", "auto"), ("1", 1), ("2", 2), ("'8'", 8), ("1024", 1024)])
def test_check_config_takes_auto_or_a_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str, loaded: object
) -> None:
    config = tmp_path / "loopwatch.yaml"
    config.write_text(f"upstream: {UPSTREAM}\ndataplane_threads: {value}\n")
    assert check_config_main(str(config)) == 0
    assert f"\ndataplane_threads: {loaded}\n" in capsys.readouterr().out
    assert load_settings(config, env={}).dataplane_threads == loaded


def test_the_default_is_auto() -> None:
    assert load_settings(None, env={}).dataplane_threads == "auto"


@pytest.mark.parametrize(
    ("value", "shown"),
    [("0", "0"), ("-1", "-1"), ("1.5", "1.5"), ("many", "'many'"), ("true", "True"),
     ("1025", "1025"), ("null", "None"), ("''", "''"), ("[2]", "[2]")],
)  # fmt: skip
def test_check_config_names_a_bad_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str, shown: str
) -> None:
    config = tmp_path / "loopwatch.yaml"
    config.write_text(f"upstream: {UPSTREAM}\ndataplane_threads: {value}\n")
    assert check_config_main(str(config)) == 2
    assert f"dataplane_threads: {EXPECTED}{shown}" in capsys.readouterr().err


def test_a_bad_value_from_the_environment_or_command_line_names_its_source() -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(None, env={"LOOPWATCH_DATAPLANE_THREADS": "0"})
    assert e.value.errors == [f"dataplane_threads: {EXPECTED}'0' (from LOOPWATCH_DATAPLANE_THREADS)"]
    assert load_settings(None, env={"LOOPWATCH_DATAPLANE_THREADS": "3"}).dataplane_threads == 3
    with pytest.raises(ConfigError) as e:
        load_settings(None, env={}, overrides={"dataplane_threads": "none"})
    assert e.value.errors == [f"dataplane_threads: {EXPECTED}'none' (from the command line)"]


@SUBPROCESS
async def test_run_refuses_a_bad_count_before_starting() -> None:
    status, _, err = await run_cli("run", "--upstream", UPSTREAM, "--listen", "127.0.0.1:0",
                                   "--admin-listen", "127.0.0.1:0", "--dataplane-threads", "0")  # fmt: skip
    assert status == 2
    assert f"dataplane_threads: {EXPECTED}'0' (from the command line)" in err


# --- the running process ------------------------------------------------------------------


@dataclass
class Process:
    proc: asyncio.subprocess.Process
    listening: dict[str, object] = field(default_factory=dict)

    @property
    def admin_port(self) -> int:
        return int(str(self.listening["admin"]).rsplit(":", 1)[1])


@contextlib.asynccontextmanager
async def loopwatch_run(
    *args: str, env: dict[str, str] | None = None, cpus: set[int] | None = None
) -> AsyncIterator[Process]:
    """`loopwatch run` on free loopback ports (allowed on `cpus` only, when
    given), until its `listening` line; killed on exit."""
    preexec: Callable[[], None] | None = None
    if cpus is not None:
        allowed = set(cpus)

        def preexec() -> None:
            os.sched_setaffinity(0, allowed)

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loopwatch", "run",
        "--upstream", UPSTREAM, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", *args,
        cwd=ROOT, env=clean_env(**(env or {})), preexec_fn=preexec,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    p = Process(proc)
    seen: list[str] = []
    listening: asyncio.Future[dict[str, object]] = asyncio.get_running_loop().create_future()

    async def read_log() -> None:  # to the end: a full pipe would stall its logging
        assert proc.stderr is not None
        async for raw in proc.stderr:
            text = raw.decode(errors="replace")
            seen.append(text)
            with contextlib.suppress(ValueError):
                line = json.loads(text)
                if isinstance(line, dict) and line.get("event") == "listening" and not listening.done():
                    listening.set_result(line)
        if not listening.done():
            listening.set_exception(AssertionError("loopwatch exited before listening:\n" + "".join(seen)))

    reader = asyncio.create_task(read_log())
    try:
        p.listening = await asyncio.wait_for(listening, 30)
        yield p
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        await asyncio.wait_for(reader, 10)


async def threads_of(p: Process) -> tuple[int, int, float]:
    """(threads in /proc, the `listening` line's count, the gauge on /metrics)."""
    listed = p.listening["dataplane_threads"]
    assert isinstance(listed, int)
    # A thread takes its name once it runs: the runtime's last worker may not
    # have run yet when the `listening` line is out (seen once in CI: 1 of 2).
    deadline = asyncio.get_running_loop().time() + 5.0
    counted = dataplane_threads(p.proc.pid)
    while counted < listed and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
        counted = dataplane_threads(p.proc.pid)
    return counted, listed, await asyncio.to_thread(scrape_threads, p.admin_port)


@SUBPROCESS
async def test_one_thread_from_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "loopwatch.yaml"
    config.write_text("dataplane_threads: 1\n")
    async with loopwatch_run("--config", str(config)) as p:
        assert await threads_of(p) == (1, 1, 1.0)


@SUBPROCESS
async def test_two_threads_from_the_environment_and_three_from_the_command_line() -> None:
    async with loopwatch_run(env={"LOOPWATCH_DATAPLANE_THREADS": "2"}) as p:
        assert await threads_of(p) == (2, 2, 2.0)
    # The flag outranks the environment; more threads than cores is allowed.
    async with loopwatch_run("--dataplane-threads", "3", env={"LOOPWATCH_DATAPLANE_THREADS": "2"}) as p:
        assert await threads_of(p) == (3, 3, 3.0)


@SUBPROCESS
async def test_auto_is_one_per_core_the_process_may_run_on() -> None:
    """The default: one thread per CPU of the process's affinity (within a
    cgroup CPU quota), here as Python's os.sched_getaffinity sees it; a
    process pinned to one CPU (taskset -c N) gets one."""
    allowed = os.sched_getaffinity(0)
    async with loopwatch_run() as p:
        n = cores_for(allowed)
        assert await threads_of(p) == (n, n, float(n))
    async with loopwatch_run(cpus={min(allowed)}) as p:
        assert await threads_of(p) == (1, 1, 1.0)


# --- a reload -------------------------------------------------------------------------------


async def test_a_reload_that_changes_it_waits_for_a_restart(tmp_path: Path) -> None:
    config = tmp_path / "loopwatch.yaml"
    base = f'upstream: "{UPSTREAM}"\nlisten: "127.0.0.1:0"\nadmin:\n  listen: "127.0.0.1:0"\n'
    config.write_text(base + "dataplane_threads: 1\n")
    lw = await start(load_settings(config, env={}), sources=ConfigSources(str(config), {}, {}))
    try:
        assert lw.plane.threads == 1
        config.write_text(base + "dataplane_threads: 2\n")
        assert lw.reload() == {"reloaded": True, "restart_required": ["dataplane_threads"]}
        config.write_text(base + "dataplane_threads: auto\n")
        assert lw.reload() == {"reloaded": True, "restart_required": ["dataplane_threads"]}
        assert lw.plane.threads == 1  # the runtime of the start
        config.write_text(base + "dataplane_threads: 0\n")
        with pytest.raises(ConfigError, match="dataplane_threads: expected"):
            lw.reload()
        assert lw.plane.threads == 1
    finally:
        await lw.close()


async def test_what_waits_for_a_restart_is_named_against_the_start(tmp_path: Path) -> None:
    """Every reload names what differs from the start and waits for a restart,
    until a restart or until it is undone; `settings` (`GET /api/config`) keeps
    the values that run. The admin token and hosts apply at once; its address
    waits."""
    config = tmp_path / "loopwatch.yaml"
    base = f'upstream: "{UPSTREAM}"\nlisten: "127.0.0.1:0"\n'
    admin = 'admin:\n  listen: "127.0.0.1:0"\n'
    config.write_text(base + admin)
    lw = await start(load_settings(config, env={}), sources=ConfigSources(str(config), {}, {}))
    try:
        config.write_text(base.replace("127.0.0.1:0", "127.0.0.1:1") + admin)
        assert lw.reload() == {"reloaded": True, "restart_required": ["listen"]}
        assert lw.reload() == {"reloaded": True, "restart_required": ["listen"]}  # still
        assert lw.settings.listen == "127.0.0.1:0"  # what is bound
        config.write_text(base + admin)
        assert lw.reload() == {"reloaded": True, "restart_required": []}  # undone
        config.write_text(base + admin + '  token: "t0123"\n  allowed_hosts: ["loopwatch.internal"]\n')
        assert lw.reload() == {"reloaded": True, "restart_required": []}
        assert lw.settings.admin.allowed_hosts == ("loopwatch.internal",)
        config.write_text(base + 'admin:\n  listen: "127.0.0.1:1"\n  event_streams: {max_streams: 3}\n')
        restart = lw.reload()["restart_required"]
        assert restart == ["admin.event_streams", "admin.listen"]
        assert lw.settings.admin.listen == "127.0.0.1:0"
        assert lw.settings.admin.event_streams.max_streams != 3
    finally:
        await lw.close()
