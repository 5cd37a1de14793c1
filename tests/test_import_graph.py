"""The parts of loopwatch and the one-way dependencies between them.

The import graph is read from the source (every `import` and `from … import`,
relative ones resolved, function-level ones included; `if TYPE_CHECKING:`
blocks counted separately). It fails on a cycle between modules of different
parts, on `detectors` importing anything of loopwatch outside itself, and on a
part importing one its place in the design does not allow
(docs/architecture.md, "Parts").
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Where each top-level folder lives in the one namespace (pyproject.toml, package-dir).
PACKAGE_DIRS = {"loopwatch": ROOT / "loopwatch", "loopwatch.proxy": ROOT / "proxy",
                "loopwatch.detectors": ROOT / "detectors", "loopwatch.dashboards": ROOT / "dashboards"}


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("").parts
            if any(part in {"target", "tests", "fuzz"} for part in rel[:-1]):
                continue
            name = ".".join((package, *rel)).removesuffix(".__init__")
            if package == "loopwatch" and len(rel) > 1:
                continue
            found[name] = path
    return found


MODULES = modules()


def part_of(module: str) -> str:
    """loopwatch.proxy.observe.metrics -> proxy.observe; loopwatch.detectors.x -> detectors."""
    parts = module.split(".")
    if parts[1:2] == ["proxy"] and len(parts) > 3:
        return f"proxy.{parts[2]}"
    if parts[1:2] == ["proxy"] and len(parts) == 3:
        return f"proxy.{parts[2]}"  # proxy/brain.py, proxy/sections.py: parts of one module
    return ".".join(parts[1:2]) or "loopwatch"


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    if node.level:
        base = importer.split(".")
        if not is_package:
            base = base[:-1]
        base = base[: len(base) - (node.level - 1)]
        module = ".".join([*base, *([node.module] if node.module else [])])
    else:
        module = node.module or ""
    targets = []
    for alias in node.names:
        sub = f"{module}.{alias.name}"
        targets.append(sub if sub in MODULES else module)
    return targets


def imports(typing_too: bool) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        typing_only = set() if typing_too else _type_checking_lines(tree)
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in typing_only:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                targets = _resolve(name, path.name == "__init__.py", node)
            else:
                continue
            for target in targets:
                while target and target not in MODULES and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in MODULES and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(MODULES):
        if v not in index:
            visit(v)
    return found


def test_the_walk_sees_every_part() -> None:
    parts = {part_of(m) for m in MODULES}
    assert {"detectors", "dashboards", "proxy.dataplane", "proxy.brain", "proxy.observe", "proxy.state",
            "proxy.admin", "proxy.app", "proxy.tools"} <= parts
    graph = imports(typing_too=False)
    assert "loopwatch.detectors.engine" in graph["loopwatch.proxy.brain"]


@pytest.mark.parametrize("typing_too", [False, True], ids=["at-run-time", "with-type-imports"])
def test_no_cycle_between_modules_of_different_parts(typing_too: bool) -> None:
    across = [c for c in cycles(imports(typing_too)) if len({part_of(m) for m in c}) > 1]
    assert across == []


def test_detectors_import_nothing_of_loopwatch_outside_themselves() -> None:
    graph = imports(typing_too=True)
    outside = {(m, t) for m in MODULES if part_of(m) == "detectors" for t in graph.get(m, ())
               if part_of(t) != "detectors"}
    assert outside == set()


def test_the_settings_loader_loads_no_telemetry_redis_aiohttp_or_data_plane() -> None:
    """The config loader is a leaf: it loads the parts' settings models and the
    pure engine's, nothing that serves, observes or stores."""
    code = (
        "import sys, loopwatch.proxy.app.settings as s\n"
        "s.load_settings({})\n"
        "print('\\n'.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'opentelemetry', 'redis', 'aiohttp', 'prometheus_client', 'httptools', 'uvloop', 'jwt'}"
        " or m.startswith('loopwatch.'))))\n"
    )
    done = subprocess.run([sys.executable, "-P", "-c", code.replace("{}", "None")], capture_output=True,
                          text=True, timeout=60, cwd="/")
    assert done.returncode == 0, done.stderr
    loaded = done.stdout.split()
    third_party = [m for m in loaded if not m.startswith("loopwatch.")]
    assert third_party == []
    ours = {m for m in loaded if m.startswith("loopwatch.")}
    assert "loopwatch.proxy.app.settings" in ours and "loopwatch.proxy.dataplane.settings" in ours
    parts = {"admin", "app", "dataplane", "observe", "state", "tools"}
    allowed = {"loopwatch.proxy", "loopwatch.proxy.sections",
               *(f"loopwatch.proxy.{p}" for p in parts), *(f"loopwatch.proxy.{p}.settings" for p in parts)}
    assert sorted(m for m in ours if m.partition(".")[2].partition(".")[0] != "detectors" and m not in allowed) == []


def test_observers_import_only_observe_the_neutral_records_and_the_engine() -> None:
    """Observers consume the event stream (the Gate's calls, the Connection record)
    and the brain's decisions: an observe.* module imports only observe.*, the
    sections base, the data plane's boundary records, detectors, the app's
    settings type and the version; never the listener, a relay, the brain."""
    graph = imports(typing_too=True)
    allowed_modules = {"loopwatch", "loopwatch.proxy.sections", "loopwatch.proxy.dataplane.boundary",
                       "loopwatch.proxy.app.settings"}
    outside = sorted((m, t) for m in MODULES if part_of(m) == "proxy.observe" for t in graph.get(m, ())
                     if part_of(t) not in {"proxy.observe", "detectors"} and t not in allowed_modules)
    assert outside == []
