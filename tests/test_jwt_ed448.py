"""JWTs signed with Ed448 (`EdDSA` with an Ed448 `public_key_file`), end to end on
both data planes: a real loopwatch, real sockets, tokens signed here with
`cryptography` (no JWT library), the client key read back from the admin API and
acted on with it.

- A token the key verifies names its subject: not bound to the address
  (identity.bind_verified is off), so a cooldown on the subject refuses it from
  every address.
- A token signed by another Ed448 key, or tampered with, names nobody: that
  client is keyed by its address, and the subject's cooldown does not touch it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed448

from loopwatch.proxy.app.runtime import Running
from tests.conftest import loopwatch, read_response, upgrade_request, wait_for

KEY = ed448.Ed448PrivateKey.from_private_bytes(bytes(range(57)))
OTHER_KEY = ed448.Ed448PrivateKey.from_private_bytes(b"\x07" * 57)


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def ed448_token(claims: dict[str, Any], key: ed448.Ed448PrivateKey = KEY) -> str:
    """A compact JWS, alg EdDSA, signed with the Ed448 `key` (RFC 8037)."""
    header = b64u(json.dumps({"alg": "EdDSA", "typ": "JWT"}).encode())
    payload = b64u(json.dumps(claims).encode())
    signing_input = f"{header}.{payload}"
    return f"{signing_input}.{b64u(key.sign(signing_input.encode()))}"


def ed448_verify(directory: Path) -> dict[str, object]:
    """The identity overrides that verify EdDSA with KEY's public key (a PEM file
    written into `directory`)."""
    pem = directory / "ed448.pem"
    pem.write_bytes(
        KEY.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return {
        "identity.jwt.verify": True,
        "identity.jwt.algorithms": ["EdDSA"],
        "identity.jwt.public_key_file": str(pem),
    }


def claims(sub: str) -> dict[str, Any]:
    return {"sub": sub, "exp": int(time.time()) + 600}


async def upgrade_status(lw: Running, token: str, source: str) -> int:
    """The answer's status to an upgrade carrying `token`, sent from `source`."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", lw.proxy_port, local_addr=(source, 0)
    )
    try:
        writer.write(upgrade_request("/ws", extra=f"Authorization: Bearer {token}\r\n".encode()))
        return (await asyncio.wait_for(read_response(reader, head_only=True), 10)).status
    finally:
        writer.close()


async def tracked(lw: Running, key: str) -> bool:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://127.0.0.1:{lw.admin_port}/api/clients/{quote(key, safe='')}") as r,
    ):
        return r.status == 200


async def test_an_ed448_signed_token_names_its_subject_and_a_forged_one_nobody(
    echo_backend: str, tmp_path: Path
) -> None:
    overrides = {
        **ed448_verify(tmp_path),
        "policy.reject_with": "http-429",
    }
    good = ed448_token(claims("alice"))
    forged = ed448_token(claims("alice"), OTHER_KEY)
    head, payload, signature = good.split(".")
    raw = bytearray(base64.urlsafe_b64decode(signature + "=="))
    raw[3] ^= 1
    tampered = f"{head}.{payload}.{b64u(bytes(raw))}"
    async with loopwatch(echo_backend, **overrides) as lw:
        assert await upgrade_status(lw, good, "127.0.0.1") == 101
        assert await upgrade_status(lw, forged, "127.0.0.2") == 101
        assert await upgrade_status(lw, tampered, "127.0.0.3") == 101
        # The verified subject is the key (unbound); the others are their addresses.
        for key in ("alice", "127.0.0.2", "127.0.0.3"):
            await wait_for(lambda: lw.plane.settled())
            assert await tracked(lw, key), key
        assert not await tracked(lw, "alice@127.0.0.2")
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                f"http://127.0.0.1:{lw.admin_port}/api/clients/alice/cooldown",
                json={"duration": "30s"},
            ) as r,
        ):
            assert r.status == 200
        # alice is refused from any address; the forger is not alice.
        assert await upgrade_status(lw, good, "127.0.0.4") == 429
        assert await upgrade_status(lw, good, "127.0.0.1") == 429
        assert await upgrade_status(lw, forged, "127.0.0.2") == 101
