"""What `loopwatch replay` reads: a day of many distinct clients costs
counters, not a report each (L2 of the tools probe)."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from typing import Any

from loopwatch.proxy.app.settings import load_settings
from loopwatch.proxy.tools.replay import replay


def loop_lines(key: str = "k@10.0.0.1", t0: float = 10.0, n: int = 4) -> list[dict[str, Any]]:
    """The incident: enough for an auth_failure_loop finding."""
    lines: list[dict[str, Any]] = []
    for i in range(n):
        t = t0 + i * 0.05
        lines.append({"type": "attempt", "key": key, "route": "/", "t": t, "addr": "10.0.0.1", "wall": 1.8e9 + t})
        lines.append({"type": "opened", "key": key, "route": "/", "t": t + 0.001, "conn_id": i + 1})
        lines.append({"type": "closed", "key": key, "route": "/", "t": t + 0.002, "conn_id": i + 1, "code": 1008,
                      "reason": "", "initiator": "upstream", "duration": 0.001})  # fmt: skip
    return lines


def write(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


# --- L2: memory by distinct client --------------------------------------------------------


def test_memory_stays_small_per_client_whatever_the_number_of_clients(tmp_path: Path) -> None:
    """A day of 300 000 IP keys took 463 MB (377 MB with detection.max_clients
    1000): a report of ~1 KB for every client ever seen, and a template each.
    Clients that matter to the report (flagged, refused, decided otherwise)
    keep theirs; the others are a count of attempts."""
    n = 20_000
    path = tmp_path / "big.jsonl"
    with path.open("w") as fh:
        for i in range(n):
            key, t = f"user{i}@10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 1000.0 + i * 0.001
            fh.write(json.dumps({"type": "attempt", "key": key, "route": "/ws", "t": t, "addr": "10.0.0.1"}) + "\n")
            fh.write(json.dumps({"type": "handshake_failed", "key": key, "route": "/ws", "t": t + 0.0005,
                                 "status": 401, "error": None}) + "\n")  # fmt: skip
        for line in loop_lines("looper@10.9.9.9", 1021.0):
            fh.write(json.dumps(line) + "\n")
    settings = load_settings(None, env={}, overrides={"detection.max_clients": 100})
    tracemalloc.start()
    try:
        report = replay([str(path)], settings)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.client_count == n + 1
    assert list(report.clients) == ["looper@10.9.9.9"]  # the one that matters
    quiet = report.find("user7@10.0.0.7")
    assert quiet is not None and (quiet.attempts, quiet.admitted, quiet.flagged) == (1, 1, False)
    # Measured: ~115 bytes a client (the key and its count); it was ~1 040.
    assert peak / n < 300, peak / n
