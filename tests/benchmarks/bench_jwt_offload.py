"""A flood of distinct ES256-signed tokens against the connections that need no
signature check (issue 16, JWT checks off the async worker): the cheap
connections' handshake latency with the flood ÷ without, for the data plane
that checks signatures inline on its async worker (`--before`, an extension
built from an earlier commit) and for this one (the check on tokio's blocking
pool, a bounded number at a time), in the same run, alternating.

    .venv/bin/python -m tests.benchmarks.bench_jwt_offload --before PATH.so
    .venv/bin/python -m tests.benchmarks.bench_jwt_offload --before PATH.so --no-docs

PATH.so: the extension module `loopwatch.proxy.dataplane._dataplane` built from
the commit to compare with (proxy/dataplane/README.md says how). Each round
starts a fresh loopwatch (detection off: the pass-through gate, so the flood is
never refused and only identity differs; `identity.jwt.verify` with an ES256
key) per variant; then, from this process, a cheap client does sequential
upgrades without a token (connect, upgrade, 101, close; each from its own
loopback address) for a few seconds alone, then as long again beside a process
of `ATTACKERS` clients that send upgrades with distinct ES256 tokens (each new:
the verified-token cache never answers) as fast as they are answered.

Writes the section "## JWT signature checks off the async worker" of
docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing import Queue
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from tests.benchmarks.report import replace_section
from tests.benchmarks.targets import HOST, ROOT, Proc, _popen, _readline, machine, start_backend

DOC = ROOT / "docs" / "performance.md"
HEADING = "## JWT signature checks off the async worker"
ATTACKERS = 16
PHASE_S = 3.0
TOKENS = 24_000
KEY = ec.derive_private_key(12345, ec.SECP256R1())
VARIANTS = ("before", "after")


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def es256_tokens(count: int, start: int) -> list[str]:
    header = b64u(json.dumps({"alg": "ES256", "typ": "JWT"}).encode())
    exp = int(time.time()) + 3600
    out = []
    for i in range(start, start + count):
        payload = b64u(json.dumps({"sub": f"flood-{i}", "exp": exp}).encode())
        signing_input = f"{header}.{payload}"
        r, s = decode_dss_signature(KEY.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        out.append(f"{signing_input}.{b64u(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}")
    return out


def serve(backend_port: int, pem: str, extension: str | None) -> None:
    """loopwatch in this process, with the extension module at `extension`
    (None: the installed one)."""
    if extension:
        import importlib.util

        name = "loopwatch.proxy.dataplane._dataplane"
        spec = importlib.util.spec_from_file_location(name, extension)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    from tests.benchmarks.bench_admission import serve as serve_mode

    overrides = {
        "identity.jwt.verify": True,
        "identity.jwt.algorithms": ["ES256"],
        "identity.jwt.public_key_file": pem,
    }
    serve_mode("off", backend_port, overrides)


def request(token: str | None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (
        f"GET /ws HTTP/1.1\r\nHost: bench.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{auth}\r\n"
    ).encode()


async def upgrade(port: int, token: str | None, source: str) -> int:
    reader, writer = await asyncio.open_connection(HOST, port, local_addr=(source, 0))
    try:
        writer.write(request(token))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        return int(head.split(b" ", 2)[1])
    finally:
        writer.close()


async def flood(port: int, tokens: list[str], seconds: float) -> dict:
    """ATTACKERS clients sending upgrades with `tokens` for `seconds`."""
    end = time.perf_counter() + seconds
    counts = {"flooded": 0, "errors": 0}

    async def attacker(n: int) -> None:
        while time.perf_counter() < end and tokens:
            try:
                await upgrade(port, tokens.pop(), f"127.0.{10 + n}.1")
                counts["flooded"] += 1
            except (TimeoutError, OSError, asyncio.IncompleteReadError):
                counts["errors"] += 1

    await asyncio.gather(*(attacker(n) for n in range(ATTACKERS)))
    return counts


def flood_process(port: int, tokens: list[str], seconds: float, out: Queue) -> None:
    out.put(asyncio.run(flood(port, tokens, seconds)))


async def probe(port: int) -> dict:
    """Sequential cheap upgrades (no token) for PHASE_S."""
    latencies: list[float] = []
    errors = 0
    end = time.perf_counter() + PHASE_S
    i = 0
    while time.perf_counter() < end:
        i += 1
        t0 = time.perf_counter()
        status = await upgrade(port, None, f"127.1.{i // 250 % 250}.{i % 250 + 1}")
        latencies.append(time.perf_counter() - t0)
        if status != 101:
            errors += 1
    latencies.sort()
    return {
        "p50_us": 1e6 * latencies[len(latencies) // 2],
        "p99_us": 1e6 * latencies[int(len(latencies) * 0.99)],
        "cheap": len(latencies),
        "errors": errors,
    }


def phase(port: int, tokens: list[str] | None) -> dict:
    """The probe alone, or beside the flood (run by a process of its own, so
    that the probe's latency is not its event loop's)."""
    if not tokens:
        return {**asyncio.run(probe(port)), "flooded_per_s": 0.0}
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=flood_process, args=(port, tokens, PHASE_S + 1.0, out))
    proc.start()
    time.sleep(0.5)  # the flood under way
    result = asyncio.run(probe(port))
    counts = out.get(timeout=60)
    proc.join(10)
    return {
        **result,
        "flooded_per_s": counts["flooded"] / (PHASE_S + 1.0),
        "errors": result["errors"] + counts["errors"],
    }


def run(rounds: int, before: str) -> dict:
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="lw-bench-jwt-") as tmp_name:
        tmp = Path(tmp_name)
        pem = tmp / "es256.pem"
        pem.write_bytes(
            KEY.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        backend = start_backend(tmp)
        try:
            for rnd in range(rounds):
                for variant in VARIANTS if rnd % 2 == 0 else VARIANTS[::-1]:
                    cmd = [sys.executable, "-m", "tests.benchmarks.bench_jwt_offload", "--serve",
                           "--backend-port", str(backend.port), "--pem", str(pem)]  # fmt: skip
                    if variant == "before":
                        cmd += ["--extension", before]
                    log = tmp / f"loopwatch-{variant}-{rnd}.log"
                    proc = _popen(cmd, log, cwd=ROOT, stdout=subprocess.PIPE)
                    lw = Proc(
                        f"loopwatch-{variant}", proc, json.loads(_readline(proc, 30.0))["port"], log
                    )
                    try:
                        tokens = es256_tokens(TOKENS, TOKENS * (2 * rnd + VARIANTS.index(variant)))
                        alone = phase(lw.port, None)
                        flooded = phase(lw.port, tokens)
                    finally:
                        lw.stop()
                    r = {"alone": alone, "flood": flooded}
                    results[variant].append(r)
                    print(f"round {rnd + 1} {variant:6}: alone p50 {alone['p50_us']:6.0f} p99 {alone['p99_us']:6.0f} µs; "
                          f"flood p50 {flooded['p50_us']:6.0f} p99 {flooded['p99_us']:6.0f} µs, "
                          f"{flooded['flooded_per_s']:.0f} tokens/s, errors {alone['errors'] + flooded['errors']}",
                          flush=True)  # fmt: skip
        finally:
            backend.stop()
    out: dict = {}
    for variant, runs in results.items():
        out[variant] = {
            f"{ph}_{q}": statistics.median(r[ph][q] for r in runs)
            for ph in ("alone", "flood")
            for q in ("p50_us", "p99_us", "flooded_per_s")
        }
        out[variant]["errors"] = sum(r[ph]["errors"] for r in runs for ph in ("alone", "flood"))
    return out


def report(out: dict, command: str) -> str:
    rows = []
    for v, label in (
        ("before", "inline on the worker (before)"),
        ("after", "blocking pool, bounded (after)"),
    ):
        o = out[v]
        rows.append(
            f"| {label} | {o['alone_p50_us']:.0f} / {o['alone_p99_us']:.0f} µs | "
            f"{o['flood_p50_us']:.0f} / {o['flood_p99_us']:.0f} µs | "
            f"{o['flood_p50_us'] / o['alone_p50_us']:.1f}× / {o['flood_p99_us'] / o['alone_p99_us']:.1f}× | "
            f"{o['flood_flooded_per_s']:.0f} | {o['errors']} |"
        )
    lines = [
        HEADING,
        "",
        f"Command: `{command}` — {machine().get('cpu', 'this machine')}, medians of alternating rounds.",
        f"A cheap client (sequential upgrades without a token) alone, then beside {ATTACKERS} clients",
        "sending upgrades with distinct ES256 tokens (never cached) as fast as they are answered;",
        "detection off, `identity.jwt.verify` with an ES256 key; the flood comes from a Python process,",
        "the cheap client from another, on the same 2 cores as loopwatch. BEFORE.so: the extension",
        "built from the commit before the change (0552c48): `git archive 0552c48 proxy/dataplane | tar",
        "-x -C /tmp/before`, then in /tmp/before/proxy/dataplane `PYO3_BUILD_EXTENSION_MODULE=1 cargo",
        "build --release -p loopwatch-dataplane-py` and take `target/release/lib_dataplane.so`.",
        "",
        "| signature check | cheap p50 / p99 alone | cheap p50 / p99 in the flood | flood ÷ alone (p50 / p99) | flood tokens/s | errors |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--before", help="the extension module built from the commit to compare with"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--serve", action="store_true")
    parser.add_argument("--backend-port", type=int)
    parser.add_argument("--pem")
    parser.add_argument("--extension")
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.backend_port, args.pem, args.extension)
        return 0
    if not args.before:
        parser.error("--before PATH.so is required")
    out = run(args.rounds, args.before)
    command = (
        f"python -m tests.benchmarks.bench_jwt_offload --before BEFORE.so --rounds {args.rounds}"
    )
    text = report(out, command)
    print(text)
    if not args.no_docs:
        replace_section(DOC, HEADING, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
