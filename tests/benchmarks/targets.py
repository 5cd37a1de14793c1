"""Processes the benchmarks start: the echo backend, loopwatch, nginx, HAProxy, the
load generators; their configs (generated into a temp dir) and their /proc figures.
"""

from __future__ import annotations

import json
import os
import re
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def raise_nofile(want: int = 65536) -> int:
    """Raise RLIMIT_NOFILE (children inherit it); the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for new_hard in (max(hard, want), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, new_hard), new_hard))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --- /proc -------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime + cutime + cstime of the processes, summed (seconds)."""
    total = 0
    for pid in pids:
        try:
            f = _stat_fields(pid)
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return total / CLK_TCK


def cpu_split(pids: list[int]) -> tuple[float, float]:
    """(user, system) seconds of the processes, children included."""
    user = system = 0
    for pid in pids:
        try:
            f = _stat_fields(pid)
        except (FileNotFoundError, ProcessLookupError):
            continue
        user += int(f[11]) + int(f[13])
        system += int(f[12]) + int(f[14])
    return user / CLK_TCK, system / CLK_TCK


def sched_seconds(pids: list[int]) -> float:
    """On-CPU time of every live thread of the processes (ns resolution), a cross-check."""
    total = 0
    for pid in pids:
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total / 1e9


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += int(_stat_fields(pid)[21]) * PAGE
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


# glibc puts each thread arena's heaps at multiples of their largest size (64 MiB on 64-bit).
ARENA_ALIGN = 64 << 20


def rss_in_thread_arenas(pid: int) -> int:
    """The bytes of `pid`'s RSS in glibc's thread arenas (/proc/PID/smaps: anonymous
    mappings at a 64 MiB boundary): loopwatch's tokio threads' memory, and what its
    Python threads allocate with malloc; the rest is the main heap, CPython's own
    arenas, stacks and files."""
    total, in_arena = 0, False
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                head = line.split(maxsplit=6)
                if "-" in head[0] and len(head) >= 5:  # a mapping's first line: range perms offset dev inode [path]
                    start = int(head[0].split("-", 1)[0], 16)
                    in_arena = len(head) == 5 and start % ARENA_ALIGN == 0
                elif in_arena and head[0] == "Rss:":
                    total += int(head[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return total


def callgrind_instructions(out: Path) -> int | None:
    """Instructions a callgrind run counted: the `totals:` of its output file and
    of any further parts it dumped (`out.1`, …). Not `summary:` as well, which
    repeats the total (or is 0 when instrumentation started switched off).
    None: no output."""
    totals = [int(m) for p in sorted(out.parent.glob(out.name + "*"))
              for m in re.findall(r"^totals: (\d+)", p.read_text(), re.M)]  # fmt: skip
    return sum(totals) if totals else None


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        kids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if int(_stat_fields(int(entry))[1]) == pid:
                        kids.append(int(entry))
                except (FileNotFoundError, ProcessLookupError, IndexError):
                    pass
        return kids


# --- processes -------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    proc: subprocess.Popen
    port: int
    log: Path | None = None
    family: bool = False  # count the children too (nginx master + worker)
    extra: dict = field(default_factory=dict)

    def pids(self) -> list[int]:
        pids = [self.proc.pid]
        if self.family:
            pids += children(self.proc.pid)
        return pids

    def cpu(self) -> float:
        return cpu_seconds(self.pids())

    def split(self) -> tuple[float, float]:
        return cpu_split(self.pids())

    def sched(self) -> float:
        return sched_seconds(self.pids())

    def rss(self) -> int:
        return rss_bytes(self.pids())

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM if self.name != "nginx" else signal.SIGQUIT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _wait_port(port: int, proc: subprocess.Popen, what: str, log: Path | None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {_tail(log)}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout}s: {_tail(log)}")


def _popen(cmd: list[str], log: Path, **kw) -> subprocess.Popen:
    """Start a process with stderr (and stdout unless given) into `log`."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        kw.setdefault("stdout", fd)
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.Popen(cmd, stderr=fd, **kw)
    finally:
        os.close(fd)


def _tail(log: Path | None) -> str:
    if log is None or not log.exists():
        return ""
    return log.read_text(errors="replace")[-2000:]


def start_backend(tmp: Path) -> Proc:
    log = tmp / "backend.log"
    proc = _popen([sys.executable, "-m", "tests.benchmarks.backend", "--port", "0"], log,
                  cwd=ROOT, stdout=subprocess.PIPE)
    line = _readline(proc, 20.0)
    port = json.loads(line)["port"]
    return Proc("backend", proc, port, log)


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise RuntimeError(f"no answer within {timeout:.0f}s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"process exited ({proc.poll()})")
    return line.decode() if isinstance(line, bytes) else line


def config_args(tmp: Path, name: str, config: str | None) -> list[str]:
    """`--config FILE` for a target given a configuration (YAML), written to
    tmp/NAME.yaml; nothing without one."""
    if config is None:
        return []
    path = tmp / f"{name}.yaml"
    path.write_text(config)
    return ["--config", str(path)]


def start_loopwatch(tmp: Path, backend_port: int, name: str = "loopwatch", config: str | None = None, *,
                    python: list[str] | None = None, cwd: Path = ROOT, env: dict[str, str | None] | None = None) -> Proc:
    """`loopwatch run` in front of the backend, started with the command `python`
    (by default $BENCH_LOOPWATCH_PYTHON, split at spaces, or this interpreter)
    from `cwd`, in this environment without its LOOPWATCH_ variables and with
    `env` applied on top (a None value unsets the variable)."""
    log = tmp / f"{name}.log"
    cmd = [
        *(python or (os.environ.get("BENCH_LOOPWATCH_PYTHON") or sys.executable).split()), "-m", "loopwatch", "run",
        "--upstream", f"ws://{HOST}:{backend_port}",
        "--listen", f"{HOST}:0", "--admin-listen", f"{HOST}:0",
    ]
    cmd += config_args(tmp, name, config)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH_")}
    for key, value in (env or {}).items():
        if value is None:
            environ.pop(key, None)
        else:
            environ[key] = value
    proc = _popen(cmd, log, cwd=cwd, stdout=subprocess.DEVNULL, env=environ)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}: {_tail(log)}")
        for line in log.read_text(errors="replace").splitlines():
            if '"listening"' in line:
                try:
                    info = json.loads(line)
                except ValueError:
                    continue
                port = int(str(info["proxy"]).rsplit(":", 1)[1])
                return Proc(name, proc, port, log, extra={"admin": info.get("admin")})
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{name} did not report listening: {_tail(log)}")


def start_native(tmp: Path, backend_port: int, name: str = "native", *, threads: int = 1,
                 deny: str | None = None, engine: bool = False, queue_capacity: int | None = None,
                 brain_rate: float | None = None, brain_interval: float | None = None,
                 config: str | None = None) -> Proc:
    """The native listener (tests/benchmarks/native_target.py); `deny`: refuse every
    loopback client with "http-429" or "close-1013"; `engine`: its brain thread feeds
    the real detection engine; `brain_rate`: an overloaded brain (events/s at most);
    `config`: a loopwatch configuration (YAML) whose `limits:` it serves with.
    `native_stats(proc)` asks it for its counters."""
    log = tmp / f"{name}.log"
    cmd = [sys.executable, "-m", "tests.benchmarks.native_target",
           "--upstream", f"ws://{HOST}:{backend_port}", "--threads", str(threads), *config_args(tmp, name, config)]
    if deny is not None:
        cmd += ["--deny", "--reject-with", deny]
    if engine:
        cmd.append("--engine")
    if queue_capacity is not None:
        cmd += ["--queue-capacity", str(queue_capacity)]
    if brain_rate is not None:
        cmd += ["--brain-rate", str(brain_rate)]
    if brain_interval is not None:
        cmd += ["--brain-interval", str(brain_interval)]
    proc = _popen(cmd, log, cwd=ROOT, stdout=subprocess.PIPE, stdin=subprocess.PIPE)
    try:
        info = json.loads(_readline(proc, 30.0))
    except (RuntimeError, ValueError) as e:
        proc.kill()
        raise RuntimeError(f"{name} did not start: {e}: {_tail(log)}") from None
    port = int(str(info["proxy"]).rsplit(":", 1)[1])
    return Proc(name, proc, port, log, extra={"native": "bare"})


def native_stats(proc: Proc, timeout: float = 10.0) -> dict:
    """The counters of a native_target process (events drained and dropped, the
    brain thread's CPU seconds, the listener's counters)."""
    assert proc.proc.stdin is not None
    proc.proc.stdin.write(b"stats\n")
    proc.proc.stdin.flush()
    return json.loads(_readline(proc.proc, timeout))


DATA_PLANE_THREADS = "loopwatch-datap"  # tokio's worker name, cut to 15 characters by the kernel


def thread_seconds(pids: list[int], prefix: str = DATA_PLANE_THREADS) -> tuple[float, float]:
    """(every thread, threads whose name starts with `prefix`) on-CPU seconds of the
    processes (/proc/PID/task/*/schedstat, ns resolution)."""
    total = named = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    ns = int(f.read().split()[0])
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    comm = f.read().strip()
            except (FileNotFoundError, ProcessLookupError):
                continue
            total += ns
            if comm.startswith(prefix):
                named += ns
    return total / 1e9, named / 1e9


def named_thread_seconds(pids: list[int], prefix: str = DATA_PLANE_THREADS) -> dict[int, float]:
    """On-CPU seconds of each thread whose name starts with `prefix`, by thread id."""
    out: dict[int, float] = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    if not f.read().startswith(prefix):
                        continue
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    out[int(tid)] = int(f.read().split()[0]) / 1e9
            except (FileNotFoundError, ProcessLookupError):
                continue
    return out


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine spent busy since boot (/proc/stat:
    everything but idle and iowait), to tell what other processes took."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK


def named_thread_split(pids: list[int], prefix: str = DATA_PLANE_THREADS) -> tuple[float, float]:
    """(user, system) seconds of the threads whose name starts with `prefix`
    (/proc/PID/task/TID/stat, 10 ms ticks)."""
    user = system = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    if not f.read().startswith(prefix):
                        continue
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            user += int(fields[11])
            system += int(fields[12])
    return user / CLK_TCK, system / CLK_TCK


def build_cload(tmp: Path) -> Path:
    """Compile tests/benchmarks/cload.c (the C load generator) into `tmp`; raises
    RuntimeError when there is no C compiler or the build fails."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc) for tests/benchmarks/cload.c")
    out = tmp / "cload"
    done = subprocess.run([cc, "-O2", "-o", str(out), str(ROOT / "tests" / "benchmarks" / "cload.c")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"cload.c did not build: {done.stderr[-1000:]}")
    return out


def build_floor() -> Path:
    """Build the tokio floor (proxy/dataplane/floor, `cargo build --release`; it shares
    the data plane's compiled tokio, so about a second once `make install` ran) and
    return its executable; raises RuntimeError without cargo or when the build fails."""
    cargo = shutil.which("cargo")
    if cargo is None:
        raise RuntimeError("no cargo for proxy/dataplane/floor")
    done = subprocess.run([cargo, "build", "--release", "--quiet", "-p", "loopwatch-floor", "--message-format=json",
                           "--manifest-path", str(ROOT / "proxy" / "dataplane" / "Cargo.toml")],
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"the tokio floor did not build: {done.stderr[-1000:]}")
    for line in done.stdout.splitlines():
        message = json.loads(line)
        if message.get("reason") == "compiler-artifact" and message.get("executable"):
            return Path(message["executable"])
    raise RuntimeError("cargo built no loopwatch-floor executable")


def start_floor(tmp: Path, binary: Path, backend_port: int, name: str, *, refuse: str | None = None) -> Proc:
    """The tokio floor (proxy/dataplane/floor): one worker thread, as the listener
    alone; `refuse` ("http-429" or "close-1013"): every request refused so, instead
    of proxied."""
    log = tmp / f"{name}.log"
    how = ["--refuse", refuse] if refuse else ["--upstream", f"{HOST}:{backend_port}"]
    cmd = [str(binary), "--threads", "1", *how]
    proc = _popen(cmd, log, cwd=ROOT, stdout=subprocess.PIPE)
    try:
        info = json.loads(_readline(proc, 30.0))
    except (RuntimeError, ValueError) as e:
        proc.kill()
        raise RuntimeError(f"{name} did not start: {e}: {_tail(log)}") from None
    return Proc(name, proc, int(str(info["proxy"]).rsplit(":", 1)[1]), log)


def run_cload(binary: Path, port: int, mode: str, *, concurrency: int, seconds: float, max_ops: int,
              sources: int = 0, cpu: int = -1) -> dict:
    """One run of the C load generator (see cload.c): its JSON result, plus its
    CPU seconds as `loadgen_cpu_s`."""
    cmd = [str(binary), HOST, str(port), mode, str(concurrency), str(seconds), str(max_ops), str(sources), str(cpu)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise RuntimeError(f"cload failed ({done.returncode}): {done.stderr[-500:]}")
    result = json.loads(done.stdout)
    result["loadgen_cpu_s"] = result["cpu_user_s"] + result["cpu_sys_s"]
    return result


def nginx_config(tmp: Path, port: int, backend_port: int, nofile: int) -> str:
    conns = max(1024, min(40_000, nofile - 200))
    return f"""\
# generated by tests/benchmarks: one worker, WebSocket proxying, foreground
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {tmp}/nginx.pid;
error_log {tmp}/nginx.error.log warn;
events {{
    worker_connections {conns};
}}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    server {{
        listen {HOST}:{port} backlog=4096;
        location = /refuse {{
            add_header Retry-After 5 always;
            return 429 "refused\\n";
        }}
        location / {{
            proxy_pass http://{HOST}:{backend_port};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_set_header Host $host;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
    }}
}}
"""


def start_nginx(tmp: Path, backend_port: int, nofile: int) -> Proc:
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(nginx_config(tmp, port, backend_port, nofile))
    log = tmp / "nginx.error.log"
    out = tmp / "nginx.out"
    proc = _popen([NGINX, "-p", str(tmp), "-c", str(conf)], out)
    try:
        _wait_port(port, proc, "nginx", out)
    except RuntimeError as e:
        raise RuntimeError(f"{e}\n{_tail(log)}") from None
    deadline = time.monotonic() + 10
    while not children(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return Proc("nginx", proc, port, log, family=True)


def haproxy_config(port: int, backend_port: int, nofile: int) -> str:
    maxconn = max(1000, min(30_000, (nofile - 200) // 2))
    return f"""\
# generated by tests/benchmarks: one thread, WebSocket proxying (HTTP mode, tunnel after 101), foreground
global
    nbthread 1
    maxconn {maxconn}
defaults
    mode http
    timeout connect 5s
    timeout client 3600s
    timeout server 3600s
    timeout tunnel 3600s
    timeout http-request 10s
frontend fe
    bind {HOST}:{port}
    maxconn {maxconn}
    http-request return status 429 content-type text/plain string "refused" hdr Retry-After 5 if {{ path /refuse }}
    default_backend be
backend be
    server s1 {HOST}:{backend_port} maxconn {maxconn}
"""


def start_haproxy(tmp: Path, backend_port: int, nofile: int) -> Proc:
    port = free_port()
    conf = tmp / "haproxy.cfg"
    conf.write_text(haproxy_config(port, backend_port, nofile))
    log = tmp / "haproxy.log"
    proc = _popen([HAPROXY, "-db", "-f", str(conf)], log)
    _wait_port(port, proc, "haproxy", log)
    return Proc("haproxy", proc, port, log)


class LoadGen:
    """A persistent load-generator process: one JSON command in, one JSON result out."""

    def __init__(self, name: str, tmp: Path):
        self.name = name
        self.proc = _popen([sys.executable, "-m", "tests.benchmarks.loadgen"], tmp / f"{name}.log",
                           cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        json.loads(_readline(self.proc, 20.0))

    def send(self, command: dict) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(command) + "\n").encode())
        self.proc.stdin.flush()

    def receive(self, timeout: float) -> dict:
        return json.loads(_readline(self.proc, timeout))

    def call(self, command: dict, timeout: float = 120.0) -> dict:
        self.send(command)
        return self.receive(timeout)

    def cpu(self) -> float:
        return cpu_seconds([self.proc.pid])

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send({"op": "quit"})
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)


def versions() -> dict[str, str]:
    def run(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (out.stdout + out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "unavailable"

    import platform

    try:
        import uvloop

        uv = uvloop.__version__
    except ImportError:  # pragma: no cover
        uv = "absent"
    return {
        "nginx": run([NGINX, "-v"]),
        "haproxy": run([HAPROXY, "-v"]),
        "python": platform.python_version(),
        "uvloop": uv,
    }


def machine() -> dict[str, object]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        mem = 0
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": os.uname().release,
        "memory_mib": mem,
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }
