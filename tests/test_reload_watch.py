"""`reload_watch` and `admin.token_file`: a mounted ConfigMap or Secret that
changes (Kubernetes swaps a `..data` link) applies without a signal."""

from __future__ import annotations

import asyncio
import itertools
import os
from pathlib import Path

import aiohttp
import pytest

from loopwatch.proxy.app.settings import ConfigError, load_settings
from loopwatch.proxy.app.watch import FileWatch, snapshot, watched_files
from tests.conftest import wait_for
from tests.processes import loopwatch_run


def mount(folder: Path, files: dict[str, str], version: str) -> None:
    """What the kubelet does with a ConfigMap or Secret volume: the files in a
    folder of their own, `..data` a link to it swapped atomically, and each
    name a link through `..data`."""
    data = folder / f"..{version}"
    data.mkdir()
    for name, text in files.items():
        (data / name).write_text(text)
    link = folder / "..data_tmp"
    link.symlink_to(data.name)
    link.rename(folder / "..data")
    for name in files:
        if not (folder / name).is_symlink():
            (folder / name).symlink_to(f"..data/{name}")


async def test_a_swapped_mount_reloads_and_a_refused_file_is_tried_at_its_next_change(tmp_path: Path) -> None:
    folder = tmp_path / "config"
    folder.mkdir()
    mount(folder, {"loopwatch.yaml": "policy: {mode: enforce}\n"}, "1")
    config = str(folder / "loopwatch.yaml")
    reloads: list[str] = []

    async def reload() -> None:
        reloads.append(Path(config).read_text())
        if "broken" in reloads[-1]:
            raise ConfigError("policy.mode: broken")

    watch = FileWatch(lambda: 0.05, lambda: [config], reload)
    watch.start()
    try:
        await asyncio.sleep(0.2)
        assert reloads == []  # nothing changed: no reload
        mount(folder, {"loopwatch.yaml": "policy: {mode: broken}\n"}, "2")
        await wait_for(lambda: len(reloads) == 1)
        await asyncio.sleep(0.2)
        assert len(reloads) == 1  # refused, and not tried again until it changes
        mount(folder, {"loopwatch.yaml": "policy: {mode: observe}\n"}, "3")
        await wait_for(lambda: len(reloads) == 2)
        assert reloads[-1] == "policy: {mode: observe}\n"
        os.utime(folder / "..3" / "loopwatch.yaml", ns=(1, 1))  # written in place
        await wait_for(lambda: len(reloads) == 3)
    finally:
        await watch.stop()


async def test_a_file_written_in_place_in_chunks_is_reloaded_once_whole(tmp_path: Path) -> None:
    """`cat new.yaml > loopwatch.yaml`, `cp`, an editor that keeps the inode: the
    file is truncated and written in chunks, and a look during the write saw
    it cut short. YAML has no end marker, so the half parsed and was applied,
    the sections not yet written at their defaults (the reload probe, M1: a
    deny list gone for 3 s). The writer here puts a chunk in at every look
    (`files` is asked once a look), so no two looks find the file the same
    until it is whole."""
    config = tmp_path / "loopwatch.yaml"
    config.write_text("policy: {mode: enforce}\n")
    whole = 'upstream: "ws://127.0.0.1:9"\npolicy:\n  deny: ["10.0.0.0/8"]\nadmin:\n  token: "s3cret-token"\n'
    cuts = [0, whole.index("policy:"), whole.index("admin:"), len(whole)]
    chunks = [whole[a:b] for a, b in itertools.pairwise(cuts)]  # the first ends before `policy:`
    writing = False
    reloads: list[str] = []

    def files() -> list[str]:
        if writing and chunks:
            with config.open("w" if len(chunks) == 3 else "a") as f:  # truncated first, as `>` does
                f.write(chunks.pop(0))
        return [str(config)]

    async def reload() -> None:
        reloads.append(config.read_text())

    watch = FileWatch(lambda: 0.05, files, reload)
    watch.start()
    try:
        writing = True
        await wait_for(lambda: len(reloads) == 1)
        await asyncio.sleep(0.3)  # and no other: the whole file was taken once
        assert reloads == [whole]
    finally:
        await watch.stop()


def test_a_link_led_elsewhere_is_a_change_even_to_the_same_inode(tmp_path: Path) -> None:
    """A ConfigMap's files are reached through the `..data` link; the kubelet
    deletes the old version's files, so the new version's may get the inode
    numbers they freed. Where the links lead is part of a file's state: here
    two names of one inode (hard links), the link swapped from one to the other."""
    (tmp_path / "..1").mkdir()
    (tmp_path / "..2").mkdir()
    (tmp_path / "..1" / "loopwatch.yaml").write_text("policy: {mode: enforce}\n")
    os.link(tmp_path / "..1" / "loopwatch.yaml", tmp_path / "..2" / "loopwatch.yaml")
    (tmp_path / "..data").symlink_to("..1")
    config = tmp_path / "loopwatch.yaml"
    config.symlink_to("..data/loopwatch.yaml")
    before = snapshot([str(config)])[str(config)]
    (tmp_path / "..data_tmp").symlink_to("..2")
    (tmp_path / "..data_tmp").rename(tmp_path / "..data")
    after = snapshot([str(config)])[str(config)]
    assert before is not None and after is not None and before.inode == after.inode
    assert before != after


def test_the_files_watched_are_the_config_and_those_it_names(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    settings = load_settings(
        None, env={}, overrides={"admin.token_file": str(token), "identity.jwt.public_key_file": "/k.pem"}
    )
    assert watched_files("/etc/lw.yaml", settings) == ["/etc/lw.yaml", "/k.pem", str(token)]
    assert watched_files(None, load_settings(None, env={})) == []


def test_the_token_file_is_read_and_checked(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")  # a Secret's file: its newline dropped
    assert load_settings(None, env={}, overrides={"admin.token_file": str(token)}).admin.token == "s3cret-token"
    with pytest.raises(ConfigError, match="admin.token_file: set admin.token or admin.token_file, not both"):
        load_settings(None, env={}, overrides={"admin.token_file": str(token), "admin.token": "other-token"})
    with pytest.raises(ConfigError, match=r"admin.token_file: cannot read .*/missing: No such file"):
        load_settings(None, env={}, overrides={"admin.token_file": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="admin.token_file: .* is empty"):
        token.write_text("\n")
        load_settings(None, env={}, overrides={"admin.token_file": str(token)})
    with pytest.raises(ConfigError, match="admin.token_file: cannot read .*: a directory"):
        load_settings(None, env={}, overrides={"admin.token_file": str(tmp_path)})


async def test_a_rotated_admin_token_applies_without_a_signal(tmp_path: Path) -> None:
    """The Kubernetes case end to end: `loopwatch run` with the admin token in
    a mounted Secret and reload_watch on; the Secret is updated; the new token
    is taken and the old one refused, with no SIGHUP sent."""
    secret = tmp_path / "secret"
    secret.mkdir()
    mount(secret, {"token": "first-token\n"}, "1")
    config = tmp_path / "loopwatch.yaml"
    config.write_text(
        'upstream: "ws://127.0.0.1:9"\nlisten: "127.0.0.1:0"\nreload_watch: 100ms\n'
        f'admin:\n  listen: "127.0.0.1:0"\n  token_file: "{secret / "token"}"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH_")}
    async with loopwatch_run("--config", str(config), env=env) as run:
        admin = "http://" + (await run.until("listening"))["admin"]

        async def status(token: str) -> int:
            async with aiohttp.ClientSession() as session, session.get(
                f"{admin}/api/clients", headers={"Authorization": f"Bearer {token}"}
            ) as response:
                return response.status

        assert await status("first-token") == 200
        mount(secret, {"token": "second-token\n"}, "2")
        for _ in range(100):
            if await status("second-token") == 200:
                break
            await asyncio.sleep(0.05)
        assert await status("second-token") == 200
        assert await status("first-token") == 401
        assert (await run.until("config_changed"))["files"] == [str(secret / "token")]
