"""detectors/ stays sans-I/O: no clocks, sockets, logging, event loops or telemetry.

Walks every module of the package (pkgutil) and every import statement in it
(ast), including imports inside functions and ``if TYPE_CHECKING`` blocks.
"""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
from pathlib import Path

import pytest

from loopwatch import detectors

FORBIDDEN = (
    "asyncio",
    "socket",
    "time",
    "logging",
    "threading",
    "aiohttp",
    "prometheus_client",
    "opentelemetry",
    "loopwatch.proxy",
    "loopwatch.dashboards",
)


def _modules() -> list[str]:
    names = [detectors.__name__]
    for info in pkgutil.walk_packages(detectors.__path__, prefix="loopwatch.detectors."):
        names.append(info.name)
    return names


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            found.append((node.lineno, "__import__"))
    return found


def test_the_walk_finds_the_whole_package() -> None:
    names = _modules()
    assert {"loopwatch.detectors.engine", "loopwatch.detectors.breaker", "loopwatch.detectors.rules.no_backoff"} <= set(names)
    assert len(names) >= 20


@pytest.mark.parametrize("module", _modules())
def test_module_imports_nothing_impure(module: str) -> None:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    bad = [
        f"{spec.origin}:{line}: imports {name}"
        for line, name in _imports(Path(spec.origin))
        if name == "__import__" or name.split(".")[0] in FORBIDDEN
    ]
    assert bad == []


def test_the_checker_would_catch_an_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import os\nfrom time import monotonic\ndef f():\n    import asyncio.events\n")
    assert [n for _, n in _imports(sample) if n.split(".")[0] in FORBIDDEN] == ["time", "asyncio.events"]
