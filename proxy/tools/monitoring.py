"""`loopwatch export-monitoring DIR`: the Grafana dashboard, the Prometheus rules
(and their promtool tests) and Grafana's provisioning files, written out of the
installed package, so a plain `pip install` has everything docs/dashboards.md
describes without the source tree.

DIR gets the layout of the repository's dashboards/ folder, so the rule tests'
relative paths hold and the paths in the docs read the same:

    DIR/loopwatch.json
    DIR/rules/recording.yml, DIR/rules/alerts.yml, DIR/rules/tests/*.yml
    DIR/provisioning/dashboards/loopwatch.yaml, DIR/provisioning/datasources/prometheus.yaml

A file already in DIR with the same content is left alone; with other content
nothing is written at all unless --force, which replaces it. Anything else in
a file's place (a FIFO, a device, a link to one, a dangling link) counts as
other content, and is never read.
"""

from __future__ import annotations

import enum
import os
import stat
import sys
import tempfile
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path, PurePosixPath
from typing import TextIO

PACKAGE = "loopwatch.dashboards"
# What is exported, relative to the package: files, or folders taken with every
# .yml/.yaml below them. The package data of loopwatch.dashboards (pyproject.toml).
EXPORTED = ("loopwatch.json", "rules", "provisioning")
SUFFIXES = (".yml", ".yaml")


@dataclass(frozen=True, slots=True)
class MonitoringFile:
    path: PurePosixPath  # relative to DIR, as in the package
    content: bytes


class Change(enum.Enum):
    NEW = "wrote"
    SAME = "unchanged"
    DIFFERENT = "replaced"


@dataclass(frozen=True, slots=True)
class Planned:
    file: MonitoringFile
    target: Path
    change: Change


class ExportError(Exception):
    """DIR cannot hold the files: it is a file, or a target is a folder."""


def shipped_files() -> list[MonitoringFile]:
    """The monitoring files in the installed package, in a stable order."""
    root = files(PACKAGE)
    out: list[MonitoringFile] = []
    for name in EXPORTED:
        item = root.joinpath(name)
        if item.is_file():
            out.append(MonitoringFile(PurePosixPath(name), item.read_bytes()))
        elif item.is_dir():
            out.extend(_walk(item, PurePosixPath(name)))
        else:
            raise ExportError(f"{PACKAGE} has no {name}: the installation is incomplete")
    return sorted(out, key=lambda f: f.path.parts)


def _walk(folder: Traversable, at: PurePosixPath) -> list[MonitoringFile]:
    out: list[MonitoringFile] = []
    for item in folder.iterdir():
        if item.is_dir():
            out.extend(_walk(item, at / item.name))
        elif item.name.endswith(SUFFIXES):
            out.append(MonitoringFile(at / item.name, item.read_bytes()))
    return out


def plan(directory: Path, shipped: list[MonitoringFile]) -> list[Planned]:
    """What writing `shipped` into `directory` would change; nothing is written."""
    if directory.exists() and not directory.is_dir():
        raise ExportError(f"{directory} exists and is not a directory")
    planned = []
    for file in shipped:
        target = directory.joinpath(*file.path.parts)
        if target.is_dir():
            raise ExportError(f"{target} is a directory, where {file.path} goes")
        planned.append(Planned(file, target, _change(target, file.content)))
    return planned


def _change(target: Path, content: bytes) -> Change:
    """What writing `content` to `target` would be. Only a regular file of the
    content's very size is read (and no further than that size): reading a FIFO
    waits for a writer forever, a device such as /dev/zero never ends, and
    merely opening some devices does something. A symbolic link to a regular
    file is judged by that file."""
    try:
        target.lstat()
    except FileNotFoundError:
        return Change.NEW
    try:
        found = target.stat()
    except OSError:  # a dangling link or a loop of links: something is there, not ours
        return Change.DIFFERENT
    if not stat.S_ISREG(found.st_mode) or found.st_size != len(content):
        return Change.DIFFERENT
    # O_NONBLOCK: should it have become a FIFO since, opening it does not wait.
    fd = os.open(target, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return Change.DIFFERENT
        return Change.SAME if fh.read(len(content) + 1) == content else Change.DIFFERENT


def _write(target: Path, content: bytes) -> None:
    """Write through a temporary file beside the target and rename it into place,
    so a reader (Grafana polls its provisioning folder) never sees half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(content)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_main(directory: str, force: bool = False, out: TextIO | None = None) -> int:
    """0 when DIR holds the files; 1 when files with other content are in the way
    (nothing written; --force replaces them); 2 when DIR cannot hold them."""
    out = out or sys.stdout
    if not directory:
        # Path("") is the working directory: never what an empty variable in a script meant.
        print("loopwatch export-monitoring: DIR: expected a directory, got ''", file=sys.stderr)
        return 2
    target = Path(directory)
    try:
        planned = plan(target, shipped_files())
    except (ExportError, OSError) as e:
        print(f"loopwatch export-monitoring: {e}", file=sys.stderr)
        return 2
    different = [p for p in planned if p.change is Change.DIFFERENT]
    if different and not force:
        print(
            f"loopwatch export-monitoring: {len(different)} file(s) in {target} differ from "
            "this version's; nothing written (--force replaces them):",
            file=sys.stderr,
        )
        for p in different:
            print(f"  {p.target}", file=sys.stderr)
        return 1
    try:
        for p in planned:
            if p.change is not Change.SAME:
                _write(p.target, p.file.content)
    except OSError as e:
        print(f"loopwatch export-monitoring: {e}", file=sys.stderr)
        return 2
    for p in planned:
        print(f"{p.change.value:<9} {p.target}", file=out)
    written = sum(p.change is not Change.SAME for p in planned)
    print(
        f"{written} of {len(planned)} file(s) written to {target}. Next: load rules/*.yml in "
        f"Prometheus (promtool test rules {target / 'rules' / 'tests'}/*.yml checks them), and "
        "import loopwatch.json in Grafana or provision it with provisioning/ "
        "(docs/dashboards.md).",
        file=out,
    )
    return 0
