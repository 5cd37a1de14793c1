"""A real redis-server for the tests: Debian's binary on a free loopback port,
no persistence, a temporary directory, stopped by PID (tests/test_redis.py,
tests/test_prometheus_e2e.py)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.conftest import free_port


class RedisServer:
    """One redis-server process on a fixed loopback port; restartable on that port."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None, "redis-server is required (.ci/system-deps installs it)"
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # The port (port 0's, from the ephemeral range) may be held for a moment
        # when the server starts: by an outgoing connection's own end, a replica
        # reconnecting to the server not started yet connected to itself (TCP's
        # self-connect), or a busy machine's socket; redis-server then exits
        # (a CI run). Such a holder lets go within a reconnect: tried again.
        for _ in range(20):
            self._start()
            if self._answered():
                return
            self.proc = None
            time.sleep(0.25)
        raise AssertionError("redis-server did not start: " + (self.workdir / "redis.log").read_text())

    def _start(self) -> None:
        assert self.proc is None
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.workdir),
                "--logfile", str(self.workdir / "redis.log"),
                "--enable-debug-command", "local",  # DEBUG SLEEP: a slow Redis
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def _answered(self) -> bool:
        """PONG within 10 s: True; the process ended (its port taken): False."""
        assert self.proc is not None
        deadline = time.monotonic() + 10
        while not self._pong():
            if self.proc.poll() is not None:
                return False
            assert time.monotonic() < deadline, "redis-server did not answer PING"
            time.sleep(0.02)
        return self.proc.poll() is None  # not another server's PONG on the port

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
