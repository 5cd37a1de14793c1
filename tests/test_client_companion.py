"""The JavaScript client companion (client/): its own unit tests, run with
node's built-in test runner (a fake WebSocket and a fake clock, no npm
package), plus what makes it dependency-free.

node comes from Debian's `nodejs` (.ci/system-deps installs it); a machine
without it fails here with that hint, it never skips.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "client"
NODE_TIMEOUT = 120  # seconds for the whole node run; it takes about one


def node() -> str:
    path = shutil.which("node") or shutil.which("nodejs")
    if path is None:
        pytest.fail("node is not installed: run .ci/system-deps (installs Debian's nodejs)")
    return path


def test_the_companion_s_node_tests_pass() -> None:
    files = sorted(str(p.relative_to(ROOT)) for p in (CLIENT / "test").glob("*.test.js"))
    assert len(files) >= 4, files
    # The files by name rather than the directory: node 18 (Debian 12's) and
    # node 22 read a directory argument differently. TAP, whatever node's default.
    command = [node(), "--test", "--test-reporter=tap", *files]
    try:
        run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=NODE_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"node --test ran over {NODE_TIMEOUT}s:\n{e.stdout or ''}\n{e.stderr or ''}")
    output = f"{run.stdout}\n{run.stderr}"
    if run.returncode != 0:
        pytest.fail(f"node --test failed (exit {run.returncode}):\n{output}")
    summary = dict(re.findall(r"^# (tests|pass|fail|cancelled|skipped|todo) (\d+)$", run.stdout, re.M))
    assert summary.get("fail") == "0" and summary.get("cancelled") == "0", output
    assert summary.get("skipped") == "0" and summary.get("todo") == "0", output  # no skips, as in CI
    assert int(summary.get("tests", "0")) >= 30 and summary["pass"] == summary["tests"], output


def test_package_has_no_dependencies_and_the_project_s_license() -> None:
    package = json.loads((CLIENT / "package.json").read_text(encoding="utf-8"))
    for field in ("dependencies", "devDependencies", "peerDependencies", "optionalDependencies"):
        assert not package.get(field), field
    assert package["license"] == "Apache-2.0"
    assert package["type"] == "module"
    for target in package["exports"].values():
        assert (CLIENT / target).is_file(), target


def test_the_module_imports_only_its_own_files() -> None:
    """Dependency-free: every import in the shipped code is a relative path that exists."""
    shipped = sorted([*(CLIENT / "src").glob("*.js"), *(CLIENT / "testing").glob("*.js")])
    assert shipped
    for path in shipped:
        text = path.read_text(encoding="utf-8")
        specifiers = re.findall(r"""^\s*(?:import|export)\b[^;]*?\bfrom\s+["']([^"']+)["']""", text, re.M)
        specifiers += re.findall(r"""\bimport\(\s*["']([^"']+)["']""", text)
        for spec in specifiers:
            assert spec.startswith("./"), f"{path.name} imports {spec!r}"
            assert (path.parent / spec).resolve().is_file(), f"{path.name}: {spec} does not exist"
        assert "require(" not in text, path.name
