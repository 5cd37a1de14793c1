"""The Grafana dashboard: generated from code, schema-valid, and built only from real metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from loopwatch.dashboards import generate, promql

ROOT = Path(__file__).resolve().parent.parent
RUNBOOKS = ROOT / "docs" / "runbooks.md"
SCHEMA_DIR = ROOT / "dashboards" / "schema"
ROWS = ["Overview", "Close codes", "Loops", "Latency and lifetime", "Relay", "loopwatch itself"]
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(generate.DASHBOARD_FILE.read_text())


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel but rows, rows' nested panels included."""
    result = []
    for panel in dashboard["panels"]:
        result.extend(
            inner for inner in [panel, *panel.get("panels", [])] if inner["type"] != "row"
        )
    return result


def schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMA_DIR / f"{name}.jsonschema.json").read_text())


def schema_errors(document: Any, root: dict[str, Any], definition: str | None = None) -> list[str]:
    if definition is not None:
        root = {**root, "$ref": f"#/definitions/{definition}"}
    validator = jsonschema.Draft7Validator(root)
    return [f"{list(e.absolute_path)}: {e.message[:200]}" for e in validator.iter_errors(document)]


def test_committed_dashboard_is_what_the_code_generates(dashboard: dict[str, Any]) -> None:
    assert generate.DASHBOARD_FILE.read_text() == generate.dashboard_json(), (
        "run python -m loopwatch.dashboards.generate"
    )


def test_generate_check_exits_zero_when_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dashboards.generate", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_generate_check_exits_one_on_a_stale_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale = tmp_path / "loopwatch.json"
    monkeypatch.setattr(generate, "DASHBOARD_FILE", stale)
    monkeypatch.setattr(generate, "PROMETHEUS_RULE_FILE", tmp_path / "prometheusrule.yaml")
    generate.main([])  # writes both into tmp_path
    assert generate.main(["--check"]) == 0
    stale.write_text(stale.read_text().replace('"loopwatch"', '"edited by hand"', 1))
    assert generate.main(["--check"]) == 1


def test_dashboard_validates_against_grafanas_schema(dashboard: dict[str, Any]) -> None:
    assert schema_errors(dashboard, schema("dashboard")) == []


def test_timeseries_panels_and_queries_validate(dashboard: dict[str, Any]) -> None:
    timeseries, prometheus = schema("timeseries"), schema("prometheus")
    checked = 0
    for panel in panels(dashboard):
        if panel["type"] == "timeseries":
            assert schema_errors(panel["options"], timeseries, "Options") == [], panel["title"]
            custom = panel["fieldConfig"]["defaults"].get("custom", {})
            assert schema_errors(custom, timeseries, "FieldConfig") == [], panel["title"]
            checked += 1
        for target in panel["targets"]:
            assert schema_errors(target, prometheus) == [], (panel["title"], target["expr"])
    assert checked >= 10


def test_vendored_schema_keeps_its_attribution() -> None:
    source = (SCHEMA_DIR / "SOURCE.md").read_text()
    assert "grafana-foundation-sdk" in source and "Apache License" in source
    assert "Apache License" in (SCHEMA_DIR / "LICENSE").read_text()


def test_identity_uid_and_no_numeric_id(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == generate.UID == "loopwatch-overview"
    assert "id" not in dashboard  # Grafana assigns it per instance; a fixed one clashes on import


def test_rows_in_order(dashboard: dict[str, Any]) -> None:
    assert [p["title"] for p in dashboard["panels"] if p["type"] == "row"] == ROWS


def test_panel_ids_are_unique(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in dashboard["panels"]] + [
        q["id"] for p in dashboard["panels"] for q in p.get("panels", [])
    ]
    assert len(ids) == len(set(ids))
    assert all(isinstance(i, int) and i > 0 for i in ids)


def test_template_variables(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance", "route"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"] == DATASOURCE
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
        query = variables[name]["query"]
        selector, label = re.fullmatch(r"label_values\((.+), (\w+)\)", query).groups()
        assert label == name
        assert promql.metric_names(selector) <= known_names()


def test_every_panel_and_target_uses_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    for panel in panels(dashboard):
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, (panel["title"], target["refId"])


def test_every_panel_says_what_it_shows_and_what_to_do(dashboard: dict[str, Any]) -> None:
    for panel in panels(dashboard):
        description = panel.get("description", "")
        assert len(description) >= 150, panel["title"]


def test_rates_use_rate_interval(dashboard: dict[str, Any]) -> None:
    # Fixed windows belong in recording rules; panels follow the zoom.
    for panel, target in promql.dashboard_targets(dashboard):
        for window in re.findall(r"\[([^\]]*)\]", target["expr"]):
            if panel["type"] == "table" and target.get("instant"):
                assert window in ("$__rate_interval", "$__range"), (panel["title"], window)
            else:
                assert window == "$__rate_interval", (panel["title"], window)


def test_queries_filter_by_the_template_variables(dashboard: dict[str, Any]) -> None:
    for panel, target in promql.dashboard_targets(dashboard):
        for matchers in re.findall(r"\{([^{}]*)\}", target["expr"]):
            assert 'job=~"$job"' in matchers and 'instance=~"$instance"' in matchers, (
                panel["title"],
                matchers,
            )


def known_names() -> set[str]:
    families = promql.catalogue(ROOT / "docs" / "metrics.md")
    assert len(families) >= 20, "docs/metrics.md's catalogue table did not parse"
    recorded = {
        rule["record"]
        for path in generate.rule_files()
        for rule in promql.rules(yaml.safe_load(path.read_text())["groups"])
        if "record" in rule
    }
    return promql.exposed_series_names(families) | recorded


def test_queries_name_only_catalogue_metrics_and_recording_rules(dashboard: dict[str, Any]) -> None:
    known = known_names()
    seen = set()
    for panel, target in promql.dashboard_targets(dashboard):
        names = promql.metric_names(target["expr"])
        assert names, (panel["title"], target["expr"])
        assert names <= known, (panel["title"], sorted(names - known))
        seen |= names
    # Every panel row the issue names has its metric.
    for metric in (
        "loopwatch_connection_attempts_total",
        "loopwatch_connections_active",
        "loopwatch_clients_flagged",
        "loopwatch_clients_in_cooldown",
        "loopwatch_circuit_state",
        "loopwatch_connection_closes_total",
        "loopwatch_fleet_auth_failure_ratio",
        "loopwatch_findings_total",
        "loopwatch_top_offender_attempts_per_second",
        "loopwatch_upstream_handshake_duration_seconds_bucket",
        "loopwatch_connection_duration_seconds_bucket",
        "loopwatch_messages_total",
        "loopwatch_message_bytes_total",
        "loopwatch_clients_tracked",
        "loopwatch_clients_evicted_total",
        "loopwatch_observer_errors_total",
        "loopwatch_spans_dropped_total",
        "loopwatch_build_info",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "loopwatch_event_loop_lag_seconds_bucket",
        "loopwatch_requests_rejected_total",
    ):
        assert metric in seen, metric


def test_process_panels_show_only_loopwatch_targets(dashboard: dict[str, Any]) -> None:
    # process_* is every Python and Go exporter's name: with Job on "All" (.*), a bare
    # selector would draw other services' CPU and memory as loopwatch's.
    guard = 'and on (job, instance) loopwatch_build_info{job=~"$job", instance=~"$instance"}'
    guarded = 0
    for panel, target in promql.dashboard_targets(dashboard):
        foreign = {n for n in promql.metric_names(target["expr"]) if not n.startswith("loopwatch_")}
        foreign -= {n for n in foreign if ":loopwatch_" in n}  # recording rules of our series
        if foreign:
            assert guard in target["expr"], (panel["title"], target["expr"])
            guarded += 1
    assert guarded >= 3


def test_metric_name_extraction() -> None:
    expr = (
        'sum by (le, route) (rate(a_bucket{code="1008", reason=~"x}y|by (z)"}[$__rate_interval] offset 5m))'
        ' / ignoring(error) group_left sum(b:c:rate5m{job=~"$job"}) * 1e3 > bool 0.5'
        ' and on (job) topk(10, max by (client) (d)) or label_replace(e, "dst", "$1", "src", "(.*)")'
        ' unless count_values("v", ${datasource_f})'
    )
    assert promql.metric_names(expr) == {"a_bucket", "b:c:rate5m", "d", "e"}


def test_1008_is_highlighted_on_the_close_code_panel(dashboard: dict[str, Any]) -> None:
    [panel] = [p for p in panels(dashboard) if p["title"] == "Closes/s by code and initiator"]
    assert (
        "{{code}}" in panel["targets"][0]["legendFormat"]
        and "{{initiator}}" in panel["targets"][0]["legendFormat"]
    )
    [override] = panel["fieldConfig"]["overrides"]
    assert override["matcher"]["id"] == "byNames"
    names = override["matcher"]["options"]["names"]
    assert {"1008 by client", "1008 by upstream", "1008 by proxy"} == set(names)
    assert override["properties"] == [
        {"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}}
    ]


def test_thresholds_drawn_match_the_alerts() -> None:
    alerts = {
        rule["alert"]: rule["expr"]
        for path in generate.rule_files()
        for rule in promql.rules(yaml.safe_load(path.read_text())["groups"])
        if "alert" in rule
    }
    assert f"> {generate.AUTH_FAILURE_RATIO_THRESHOLD}\n" in alerts["LoopwatchAuthFailureRatioHigh"]
    assert (
        f"> {generate.HANDSHAKE_ERROR_RATIO_THRESHOLD}\n"
        in alerts["LoopwatchUpstreamHandshakeErrors"]
    )
    assert alerts["LoopwatchClientsInCooldownHigh"].endswith(f"> {generate.COOLDOWN_THRESHOLD}")
    assert alerts["LoopwatchRequestsRejected"].endswith(f"> {generate.REJECTED_RATE_THRESHOLD}")
    assert alerts["LoopwatchClientConnectionsNearLimit"].endswith(f"> {generate.CONNECTIONS_LIMIT_THRESHOLD}")


def test_docs_explain_every_row_and_panel(dashboard: dict[str, Any]) -> None:
    doc = (ROOT / "docs" / "dashboards.md").read_text()
    for row in ROWS:
        assert f"\n### {row}\n" in doc, row
    for panel in panels(dashboard):
        assert f"**{panel['title']}**" in doc, panel["title"]


# Bold words of the runbooks that name no panel: their section headings.
RUNBOOK_HEADINGS = {"Severity:", "What it means.", "Confirm.", "What to do.", "for:", "not"}


def test_the_panels_the_runbooks_name_exist(dashboard: dict[str, Any]) -> None:
    """An operator in an incident looks for the panel a runbook names: two
    runbooks named one by a title it had lost (the new3 and docs probes)."""
    titles = {panel["title"] for panel in panels(dashboard)}
    prose = re.sub(r"^```.*?^```", "", RUNBOOKS.read_text(), flags=re.MULTILINE | re.DOTALL)  # no code blocks
    named = {" ".join(bold.split()) for bold in re.findall(r"\*\*([^*]+?)\*\*", prose)}
    assert named - RUNBOOK_HEADINGS - titles == set()


# Grafana's values for the variables, as the e2e test substitutes them.
VARIABLES = {"job": ".*", "instance": ".*", "route": ".*", "__rate_interval": "1m", "__range": "1h"}


def test_every_query_is_valid_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    # promtool parses each expression as a recording rule: a syntax error, or a
    # function Prometheus 2.42 lacks, fails here before anyone opens Grafana.
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: run `make system-deps`"
    exprs = [
        promql.substitute(t["expr"], VARIABLES) for _, t in promql.dashboard_targets(dashboard)
    ]
    rules = [{"record": f"dashboard:query_{i}:check", "expr": e} for i, e in enumerate(exprs)]
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout
