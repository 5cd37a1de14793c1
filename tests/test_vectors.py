"""The shared test vectors (tests/vectors/) are the Python data plane's answers.

tests/vectors/generate.py wrote them from proxy/dataplane/heads.py and proxy/dataplane/frames.py;
the compiled data plane's core replays the same files in its cargo tests
(proxy/dataplane/core/tests/vectors.rs), so the two data planes are held to one
answer for every request head and every frame stream in them. Here:

* every head's answer is still what the Python parser and the listener's
  checks give (a change of behaviour on either side shows up as a diff of the
  vectors, to be regenerated deliberately and matched by the Rust core);
* every frame stream, cut at every recorded place, gives both builds of the
  frame parser (Python and C) the recorded forwarding, counts and errors;
* close frames are built as recorded;
* every identity case (tests/vectors/identity.json) still gets the recorded
  key and address from proxy/dataplane/identity.py, and the same from the
  compiled Identity the native listener uses;
* black box: a real loopwatch answers a sample of the refused heads with the
  recorded response, and its upstream never sees them.
"""

from __future__ import annotations

import asyncio
import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from loopwatch.proxy.dataplane.native import Identity
from tests.conftest import RawBackend, loopwatch, read_response, switching_protocols
from tests.vectors.reference import (
    FRAME_BUILDS,
    close_frame_answer,
    expand_cuts,
    frames_answer,
    head_answer,
    identity_answer,
    native_spec,
    raw,
    unpack,
)

VECTORS = Path(__file__).parent / "vectors"


@cache
def vectors(name: str) -> dict[str, Any]:
    return json.loads((VECTORS / name).read_text())


def test_vectors_cover_the_grammar_and_every_answer() -> None:
    heads = vectors("request_heads.json")["cases"]
    outcomes = {(c["expect"]["outcome"], c["expect"].get("reason")) for c in heads}
    assert {
        ("accept", None),
        ("partial", None),
        ("reject", "bad_request"),
        ("reject", "head_too_large"),
        ("reject", "version"),
        ("reject", "upgrade_required"),
        ("reject", "upgrade_with_body"),
    } <= outcomes
    names = {c["name"] for c in heads}
    # Every bad request of tests/test_bad_input.py is in them.
    from tests.test_bad_input import BAD_REQUESTS

    assert {f"bad-input/{k}" for k in BAD_REQUESTS} <= names
    frames = vectors("frames.json")
    reasons = {
        c["expect"]["error"]["reason"].split(" 0x")[0]
        for c in frames["cases"]
        if c["expect"]["error"]
    }
    assert len(reasons) >= 14, reasons  # every kind of violation
    assert len(frames["cases"]) >= 300


def test_request_heads_are_the_python_answers() -> None:
    data = vectors("request_heads.json")
    default = data["default_max_head_size"]
    wrong = []
    for case in data["cases"]:
        answer = head_answer(raw(case["input"]), case.get("max_head_size", default))
        if answer != case["expect"]:
            wrong.append(f"{case['name']}: now {answer}, recorded {case['expect']}")
    assert not wrong, (
        f"{len(wrong)} heads changed (regenerate the vectors on purpose):\n" + "\n".join(wrong[:20])
    )


@pytest.mark.parametrize("build", sorted(FRAME_BUILDS))
def test_frame_streams_are_the_python_answers(build: str) -> None:
    parser = FRAME_BUILDS[build]
    wrong = []
    runs = 0
    for case in vectors("frames.json")["cases"]:
        stream = unpack(case["stream"])
        splits = [([], {})] + [(s["cuts"], s["expect"]) for s in case["splits"]]
        for cuts, diff in splits:
            expect = {**case["expect"], **diff}
            answer = frames_answer(parser, case["config"], stream, expand_cuts(cuts, len(stream)))
            runs += 1
            if answer != expect:
                wrong.append(f"{case['name']} cut at {cuts}: now {answer}, recorded {expect}")
    assert runs > 1000
    assert not wrong, f"{len(wrong)} streams changed:\n" + "\n".join(wrong[:10])


def test_compiled_frame_parser_is_among_the_builds() -> None:
    # The C build is what the relay runs; the vectors must hold for it too.
    assert set(FRAME_BUILDS) == {"python", "compiled"}


def test_close_frames_are_the_python_answers() -> None:
    for case in vectors("frames.json")["close_frames"]:
        assert close_frame_answer(case["code"], case["reason"], case["masked"]) == case["expect"], (
            case
        )


def test_identity_vectors_cover_every_source_and_verdict() -> None:
    data = vectors("identity.json")
    cases = data["cases"]
    assert len(cases) >= 2000
    sources = {c["expect"]["source"].partition(":")[0] for c in cases}
    assert sources == {"header", "cookie", "query", "jwt", "ip"}
    # Verified keys under every kind of key, and refused tokens beside them.
    verified = {c["config"] for c in cases if c["expect"]["verified"]}
    assert {"hs256", "rsa", "ec", "p384", "p521", "ed25519_certificate"} <= verified
    keys = {c["expect"]["key"] for c in cases}
    assert any(k.startswith("sha256:") for k in keys)  # hashed long values
    assert any("@" in k for k in keys)  # bound to the address
    addresses = {c["expect"]["address"] for c in cases}
    assert "1.2.3.4" in addresses and any(":" in a for a in addresses)  # XFF, IPv6


def test_identity_vectors_are_the_python_answers() -> None:
    data = vectors("identity.json")
    configs = {name: c["settings"] for name, c in data["configs"].items()}
    wrong = []
    for case in data["cases"]:
        answer = identity_answer(
            configs[case["config"]], raw(case["head"]), case["peer"], data["now"]
        )
        if answer != case["expect"]:
            wrong.append(
                f"{case['config']} / {case['name']}: now {answer}, recorded {case['expect']}"
            )
    assert not wrong, (
        f"{len(wrong)} identities changed (regenerate the vectors on purpose):\n"
        + "\n".join(wrong[:20])
    )


def test_identity_configs_are_what_native_py_passes() -> None:
    # The Rust replay (core/tests/identity_vectors.rs) configures itself from
    # the recorded arguments: they must be what native.identity_spec gives.
    for name, config in vectors("identity.json")["configs"].items():
        assert native_spec(config["settings"]) == config["native"], name


def test_native_identity_gives_the_recorded_answers() -> None:
    # The compiled Identity through its Python face, as the listener holds it.
    data = vectors("identity.json")
    identities = {
        name: Identity(**{k: raw(v) if k in ("secret", "public_key_pem") and v is not None else v
                          for k, v in c["native"].items()})
        for name, c in data["configs"].items()
    }  # fmt: skip
    wrong = []
    for case in data["cases"]:
        key, source, address, verified = identities[case["config"]].identify(
            raw(case["head"]), case["peer"], data["now"]
        )
        answer = {"key": key, "source": source, "address": address, "verified": verified}
        if answer != case["expect"]:
            wrong.append(
                f"{case['config']} / {case['name']}: native {answer}, Python {case['expect']}"
            )
    assert not wrong, f"{len(wrong)} differ:\n" + "\n".join(wrong[:20])


def black_box_sample() -> list[dict[str, Any]]:
    """Refused heads worth a real connection: every named shape, and every
    20th of the generated ones (sweeps, mutations); size-limit cases need a
    head to arrive in one read, which TCP does not promise (test_bad_input
    covers them)."""
    out = []
    generated = 0
    for case in vectors("request_heads.json")["cases"]:
        if case["expect"]["outcome"] != "reject" or "max_head_size" in case:
            continue
        if case["name"].startswith("size/"):
            continue
        if case["name"].startswith(("sweep/", "mutation/")):
            generated += 1
            if generated % 20:
                continue
        out.append(case)
    return out


async def test_refused_heads_get_the_recorded_answer_from_a_real_listener() -> None:
    cases = black_box_sample()
    assert len(cases) > 150

    def answer(head: bytes) -> bytes:
        if b"sec-websocket-key" in head.lower():
            return switching_protocols(head)
        return b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n"

    async with RawBackend(answer) as backend, loopwatch(backend.url) as lw:
        wrong = []
        for case in cases:
            expect = case["expect"]
            reader, writer = await asyncio.open_connection("127.0.0.1", lw.proxy_port)
            try:
                writer.write(raw(case["input"]))
                response = await asyncio.wait_for(read_response(reader), 10)
                after = await asyncio.wait_for(reader.read(), 10)
            finally:
                writer.close()
            got = (
                response.status,
                [
                    [n.decode(), v.decode()]
                    for n, v in response.headers
                    if n == b"Sec-WebSocket-Version"
                ],
            )
            want = (expect["status"], expect["headers"])
            if got != want or after != b"":
                wrong.append(f"{case['name']}: got {got} then {after!r}, recorded {want}")
            elif "response" in expect and response.head + response.body != raw(expect["response"]):
                wrong.append(f"{case['name']}: answered {response.head + response.body!r}")
        assert not wrong, "\n".join(wrong[:20])
        assert backend.connections == 0  # no refused head reached the upstream
