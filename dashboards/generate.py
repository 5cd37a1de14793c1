"""Generate loopwatch's Grafana dashboard and the Kubernetes PrometheusRule.

    python -m loopwatch.dashboards.generate          # write dashboards/loopwatch.json and
                                           # config/examples/kubernetes/prometheusrule.yaml
    python -m loopwatch.dashboards.generate --check  # exit 1 if either committed file is stale

The dashboard is built with the Grafana Foundation SDK pinned in pyproject.toml
(Grafana 11.6 target), so a panel's JSON shape is the SDK's, not hand-written.
Every query names only metrics from docs/metrics.md or recording rules from
dashboards/rules/; tests/test_dashboards.py checks that, and
tests/test_prometheus_e2e.py runs every query against a real Prometheus.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import heatmap, stat, statetimeline, table, timeseries
from grafana_foundation_sdk.builders.prometheus import Dataquery as PrometheusQuery
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models import heatmap as heatmap_model
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD_FILE = ROOT / "dashboards" / "loopwatch.json"
RULES_DIR = ROOT / "dashboards" / "rules"
PROMETHEUS_RULE_FILE = ROOT / "config" / "examples" / "kubernetes" / "prometheusrule.yaml"

UID = "loopwatch-overview"
# Every panel and every query points at the dashboard's datasource variable, so
# one import works against any Prometheus without editing uids.
DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")

# Label filters from the template variables. "All" is ".*", so series without a
# label (none here) would still match.
SEL = 'job=~"$job", instance=~"$instance"'
SEL_ROUTE = SEL + ', route=~"$route"'

# Recording rules from dashboards/rules/recording.yml that panels share with alerts.
ATTEMPTS_5M = "job_instance_route_outcome:loopwatch_connection_attempts:rate5m"
AUTH_FAILURES_5M = "job_instance_route:loopwatch_auth_failures:rate5m"
HANDSHAKE_ERRORS_5M = "job_instance_route_error:loopwatch_upstream_handshake_errors:rate5m"

# Alert thresholds drawn on the panels that confirm them (kept equal to alerts.yml
# by tests/test_dashboards.py).
AUTH_FAILURE_RATIO_THRESHOLD = 0.2
HANDSHAKE_ERROR_RATIO_THRESHOLD = 0.05
COOLDOWN_THRESHOLD = 10
REJECTED_RATE_THRESHOLD = 1  # requests/s refused before detection, per instance
CONNECTIONS_LIMIT_THRESHOLD = 0.9  # client connections / limits.max_connections


def query(
    expr: str,
    legend: str = "__auto",
    *,
    ref: str = "A",
    instant: bool = False,
    fmt: PromQueryFormat | None = None,
) -> PrometheusQuery:
    q = PrometheusQuery().expr(expr).legend_format(legend).ref_id(ref).datasource(DATASOURCE)
    q = q.instant() if instant else q.range()
    if fmt is not None:
        q = q.format(fmt)
    return q


def thresholds(*steps: tuple[float | None, str]) -> db.ThresholdsConfig:
    return (
        db.ThresholdsConfig()
        .mode(model.ThresholdsMode.ABSOLUTE)
        .steps([model.Threshold(value=value, color=color) for value, color in steps])
    )


def legend_table(*calcs: str) -> common_builders.VizLegendOptions:
    return (
        common_builders.VizLegendOptions()
        .show_legend(True)
        .display_mode(common.LegendDisplayMode.TABLE)
        .placement(common.LegendPlacement.BOTTOM)
        .calcs(list(calcs) or ["lastNotNull", "max"])
    )


def tooltip_all() -> common_builders.VizTooltipOptions:
    return (
        common_builders.VizTooltipOptions()
        .mode(common.TooltipDisplayMode.MULTI)
        .sort(common.SortOrder.DESCENDING)
    )


def ts(
    title: str, description: str, *targets: PrometheusQuery, unit: str = "short"
) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .min(0)
        .fill_opacity(10)
        .legend(legend_table())
        .tooltip(tooltip_all())
        .height(8)
        .span(12)
    )
    for target in targets:
        panel = panel.with_target(target)
    return panel


def refs(*queries: tuple[str, str]) -> list[PrometheusQuery]:
    """Queries lettered A, B, C … in order."""
    return [query(expr, legend, ref=chr(ord("A") + i)) for i, (expr, legend) in enumerate(queries)]


def p50_p99(bucket: str) -> list[PrometheusQuery]:
    """The 50th and 99th percentile of a route-labelled histogram's `_bucket`
    series, over the routes the dashboard selects."""
    return refs(*(
        (f"histogram_quantile({q}, sum by (le) (rate({bucket}{{{SEL_ROUTE}}}[$__rate_interval])))", f"p{label}")
        for q, label in (("0.5", "50"), ("0.99", "99"))
    ))  # fmt: skip


def color_override(names: list[str], color: str) -> db.DashboardFieldConfigSourceOverrides:
    """A fixed color for the series named `names`.

    Grafana's dashboard schema types a matcher's options and an override's values
    as objects, so this uses the byNames matcher ({mode, names}) and the color
    property, both objects, rather than byName/byRegexp with a string.
    """
    return (
        db.DashboardFieldConfigSourceOverrides()
        .matcher(model.MatcherConfig(id_val="byNames", options={"mode": "include", "names": names}))
        .properties(
            [model.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": color})]
        )
    )


# --- rows -------------------------------------------------------------------


def overview() -> list[cogbuilder.Builder[Any]]:
    attempts = ts(
        "Connection attempts/s by outcome",
        "WebSocket upgrade attempts per second, by how they ended: opened (101 relayed), "
        "refused (loopwatch refused it: cooldown, min interval, max concurrent, deny list, "
        "open breaker, or out of open files: see Requests refused before detection), upstream_refused (the backend answered non-101, e.g. 401/403), "
        "upstream_error (backend unreachable or timed out), client_gone. "
        "If it looks wrong: a tall 'refused' band means enforcement is working on someone — "
        "see Loops and GET /api/clients; 'upstream_refused'/'upstream_error' growing means the "
        "backend or its auth is failing — see Close codes and Latency. A jump of 'opened' for "
        "every client at once is a reconnect storm (backend restart), not a loop.",
        query(
            f"sum by (outcome) (rate(loopwatch_connection_attempts_total{{{SEL_ROUTE}}}[$__rate_interval]))",
            "{{outcome}}",
        ),
        unit="reqps",
    ).stacking(common_builders.StackingConfig().mode(common.StackingMode.NORMAL))
    active = ts(
        "Active connections",
        "WebSockets relayed right now, per route. A healthy service shows a smooth curve that "
        "follows its users. A saw-tooth (rising then dropping to zero) means connections are "
        "being dropped together — check Close codes for who closed them. A steady climb with "
        "flat attempts can be duplicate connections per client (rule duplicate_connections).",
        query(f"sum by (route) (loopwatch_connections_active{{{SEL_ROUTE}}})", "{{route}}"),
    )
    flagged = ts(
        "Clients flagged, by rule",
        "Clients with an active finding now, by the rule that flagged them and its severity. It "
        "should be 0 or close to it. A critical line is a connection loop (alert "
        "LoopwatchConnectionLoopDetected, which names its rule); a looping client is often "
        "flagged by other rules too, at warning: list them with GET /api/clients and read "
        "one with GET /api/clients/{key}. Flags clear after a quiet period, so the line lags "
        "the fix by about 30 s. The most any one replica counts: replicas that share state "
        "each count every client.",
        query(
            "max by (rule, severity) "
            f"(sum by (job, instance, rule, severity) (loopwatch_clients_flagged{{{SEL}}}))",
            "{{rule}} {{severity}}",
        ),
    ).span(8)
    cooldown = (
        stat.Panel()
        .title("Clients in cooldown")
        .description(
            "Clients loopwatch is refusing right now (close 1013 or HTTP 429 until their "
            "cooldown ends). A few is normal while a loop is being contained. Many at once "
            f"(alert LoopwatchClientsInCooldownHigh, above {COOLDOWN_THRESHOLD}) usually means "
            "a bad frontend release or an auth outage blamed on clients: check the Auth-failure "
            "ratio panel and the auth breaker, and release clients with "
            "POST /api/clients/{key}/release if they are not at fault. The most any one "
            "replica counts: replicas that share state each count every client."
        )
        .datasource(DATASOURCE)
        .with_target(query(f"max(loopwatch_clients_in_cooldown{{{SEL}}})", "in cooldown"))
        .unit("short")
        .thresholds(thresholds((None, "green"), (1, "orange"), (COOLDOWN_THRESHOLD, "red")))
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .graph_mode(common.BigValueGraphMode.AREA)
        .height(8)
        .span(4)
    )
    breakers = (
        statetimeline.Panel()
        .title("Circuit breakers")
        .description(
            "State of each circuit breaker per route and instance (each route has its own "
            "pair): closed (green, normal), half_open (yellow, probing), open (red: new "
            "upgrades on that route are refused with 1013/503; other routes are untouched). "
            "'upstream' opens on connect errors, timeouts and 5xx at the route's handshakes; "
            "'auth' opens when the route's auth-failure ratio is high, i.e. the auth service "
            "behind it is failing. If one is red: GET /api/breakers shows why and until when; "
            "fix that route's backend or auth service, then POST "
            "/api/breakers/{name}/reset?route={route} if you must not wait for the half-open "
            "probe (alert LoopwatchCircuitBreakerOpen)."
        )
        .datasource(DATASOURCE)
        .with_target(
            query(
                # 0 closed, 1 half_open, 2 open: one row per route, breaker and instance.
                f'max by (instance, route, breaker) (2 * loopwatch_circuit_state{{{SEL}, state="open"}}'
                f' + ignoring(state) loopwatch_circuit_state{{{SEL}, state="half_open"}})',
                "{{route}} {{breaker}} {{instance}}",
            )
        )
        .mappings(
            [
                model.ValueMap(
                    options={
                        "0": model.ValueMappingResult(text="closed", color="green", index=0),
                        "1": model.ValueMappingResult(text="half_open", color="yellow", index=1),
                        "2": model.ValueMappingResult(text="open", color="red", index=2),
                    }
                )
            ]
        )
        .thresholds(thresholds((None, "green"), (1, "yellow"), (2, "red")))
        .color_scheme(db.FieldColor().mode(model.FieldColorModeId.THRESHOLDS))
        .show_value(common.VisibilityMode.AUTO)
        .height(8)
        .span(12)
    )
    return [attempts, active, flagged, cooldown, breakers]


def close_codes() -> list[cogbuilder.Builder[Any]]:
    # The initiators are a fixed set, so the three 1008 series names are too.
    highlight_1008 = color_override(
        [f"1008 by {who}" for who in ("client", "upstream", "proxy")], "red"
    )
    closes = ts(
        "Closes/s by code and initiator",
        "Ended WebSockets per second by close code and by who closed first (client, upstream, "
        "proxy). 1008 Policy Violation is drawn in red: it is how backends reject a bad or "
        "raced auth token, and 1008 closes by 'upstream' rising together with attempts is the "
        "signature of an auth-failure loop. 1006 means a connection died without a close "
        "frame (network, crash); 1013 by 'proxy' is loopwatch refusing clients in cooldown; "
        "1001 is a shutdown or navigation. If 1008 dominates, check the Auth-failure ratio and "
        "Loops rows and GET /api/clients for the clients behind it.",
        query(
            f"sum by (code, initiator) (rate(loopwatch_connection_closes_total{{{SEL_ROUTE}}}[$__rate_interval]))",
            "{{code}} by {{initiator}}",
        ),
        unit="reqps",
    ).overrides([highlight_1008])
    ratio = ts(
        "Auth-failure ratio",
        "Auth failures (a close with an auth code, 1008 by default, or a 401/403 to the upgrade) "
        "as a share of what reached the backend. Two views: the 5-minute PromQL ratio the alert "
        "LoopwatchAuthFailureRatioHigh uses, per attempt not refused by loopwatch (threshold "
        f"{AUTH_FAILURE_RATIO_THRESHOLD:.0%}, dashed), and each instance's engine line over "
        "detection.fleet.window, per auth outcome (a normal close, or a connection that lived "
        "detection.healthy_after, is a success). Both count attempts, not clients: a few looping "
        "clients can carry them, and then show as flagged clients in the Loops row. The auth "
        "breaker counts clients (by address): GET /api/breakers. High while few clients are "
        "flagged points at the auth service or token issuer.",
        *refs(
            (
                f"sum({AUTH_FAILURES_5M}{{{SEL_ROUTE}}})"
                f' / sum({ATTEMPTS_5M}{{{SEL_ROUTE}, outcome!="refused"}})',
                "PromQL 5m ratio",
            ),
            (
                f"max by (instance) (loopwatch_fleet_auth_failure_ratio{{{SEL}}})",
                "engine {{instance}}",
            ),
        ),
        unit="percentunit",
    )
    ratio = (
        ratio.max(1)
        .thresholds(thresholds((None, "green"), (AUTH_FAILURE_RATIO_THRESHOLD, "red")))
        .thresholds_style(
            common_builders.GraphThresholdsStyleConfig().mode(
                common.GraphThresholdsStyleMode.DASHED
            )
        )
    )
    return [closes, ratio]


def loops() -> list[cogbuilder.Builder[Any]]:
    findings = ts(
        "Findings by rule and severity",
        "Findings raised per interval by each detection rule (auth_failure_loop, "
        "rapid_reconnect, short_lived, duplicate_connections, no_backoff) and severity. "
        "Critical findings are what cooldowns act on by default and what the loop alert "
        "fires on; warnings are for eyes. Any bar at all deserves a look: open the Top "
        "offenders table, then GET /api/clients/{key} for a client's history and evidence. "
        "A rule that fires for healthy clients needs its thresholds tuned in the config "
        "(detection.rules.*), or mode: observe while you tune. The most any one replica "
        "raised: replicas that share state each raise every finding.",
        query(
            "max by (rule, severity) (sum by (job, instance, rule, severity) "
            f"(increase(loopwatch_findings_total{{{SEL}}}[$__rate_interval])))",
            "{{rule}} {{severity}}",
        ),
    ).draw_style(common.GraphDrawStyle.BARS)
    enforcement = ts(
        "Refusals/s by reason",
        "Attempts loopwatch refused (solid) by reason: cooldown, min_interval, max_concurrent, "
        "deny, circuit_open; and attempts that observe mode or a partial rollout let through "
        "but enforcement would have refused ('would refuse', no backend protection). "
        "'cooldown' following a finding is the system working. 'circuit_open' means every "
        "client is refused: see Circuit breakers. Large 'would refuse' with no refusals "
        "means you are in observe mode while a loop runs.",
        *refs(
            (
                f"sum by (reason) (rate(loopwatch_refusals_total{{{SEL_ROUTE}}}[$__rate_interval]))",
                "{{reason}}",
            ),
            (
                f"sum by (reason) (rate(loopwatch_would_reject_total{{{SEL}}}[$__rate_interval]))",
                "would refuse: {{reason}}",
            ),
        ),
        unit="reqps",
    )
    fleet = ts(
        "Loop or storm? Fleet attempt rate",
        "The engine's fleet-wide attempt rate, and the same rate drawn again in orange where "
        "the engine flagged a reconnect storm (the rate far above its baseline) within the "
        "interval (0 elsewhere): the flag itself lasts seconds, often less than a scrape. A storm — "
        "every client reconnecting once after a backend restart or deploy — raises the rate "
        "without flagging clients and is not a loop; it should settle within a minute or "
        "two (alert LoopwatchReconnectStorm if it does not: look for a backend that keeps "
        "restarting). A loop raises the rate *and* flags a few clients (panel Clients "
        "flagged).",
        *refs(
            (f"sum(loopwatch_fleet_attempts_per_second{{{SEL}}})", "attempts/s"),
            (
                f"sum(loopwatch_fleet_attempts_per_second{{{SEL}}}) * on () "
                f"(max(increase(loopwatch_reconnect_storms_total{{{SEL}}}[$__rate_interval])) > bool 0)",
                "during a storm",
            ),
        ),
        unit="reqps",
    ).overrides([color_override(["during a storm"], "orange")])
    top = (
        table.Panel()
        .title("Top offenders")
        .description(
            "The clients with the highest attempt rates right now (top-K, detection.top_k). The "
            "client column is a hash of the key unless telemetry.expose_client_keys is on; "
            "match it with GET /api/clients, which lists keys worst first. A client here at "
            "several attempts per second is looping: GET /api/clients/{key} shows its history; "
            "POST /api/clients/{key}/cooldown stops it, POST /api/clients/{key}/release lets a "
            "wrongly flagged one back in."
        )
        .datasource(DATASOURCE)
        .with_target(
            query(
                f"topk(10, max by (client) (loopwatch_top_offender_attempts_per_second{{{SEL}}}))",
                "{{client}}",
                instant=True,
                fmt=PromQueryFormat.TABLE,
            )
        )
        .with_transformation(
            model.DataTransformerConfig(
                id_val="organize",
                options={
                    "excludeByName": {"Time": True},
                    "renameByName": {"Value": "attempts/s"},
                },
            )
        )
        .sort_by([common_builders.TableSortByFieldState().display_name("attempts/s").desc(True)])
        .unit("reqps")
        .height(8)
        .span(12)
    )
    return [findings, enforcement, fleet, top]


def latency() -> list[cogbuilder.Builder[Any]]:
    bucket = "loopwatch_upstream_handshake_duration_seconds_bucket"
    handshake = ts(
        "Upstream handshake duration p50 / p99",
        "Time from the client's upgrade request to the backend's answer (any status), 50th and "
        "99th percentile. This is what a user waits for before a socket opens. A rising p99 "
        "with a flat p50 is a slow tail (overloaded backend replica, slow auth lookup); both "
        "rising means the backend is saturated — a loop hammering it looks like this until "
        "cooldowns kick in. Values near limits.handshake_timeout end as 504s.",
        *p50_p99(bucket),
        unit="s",
    ).span(8)
    errors = ts(
        "Upstream handshake error ratio",
        "Share of attempts that reached for the backend (not refused by loopwatch) and failed "
        "at the handshake, over 5 minutes, stacked by error: connect, timeout, tls, closed, "
        "bad_response, status_5xx. The stack's top is what alert "
        f"LoopwatchUpstreamHandshakeErrors compares with {HANDSHAKE_ERROR_RATIO_THRESHOLD:.0%} "
        "(dashed). connect/timeout: the backend is down or unreachable from loopwatch — check "
        "it and the upstream URL in the config; status_5xx: it is up but failing. The upstream "
        "breaker opens on these (GET /api/breakers), and from then on refuses the attempts "
        "before they reach for the backend (circuit_open, panel Refusals/s by reason): only "
        "its probes count here, so a backend down for good reads as a low ratio; the "
        "Circuit breakers panel and alert LoopwatchCircuitBreakerOpen say it.",
        query(
            f"sum by (error) ({HANDSHAKE_ERRORS_5M}{{{SEL_ROUTE}}})"
            f' / ignoring(error) group_left sum({ATTEMPTS_5M}{{{SEL_ROUTE}, outcome!="refused"}})',
            "{{error}}",
        ),
        unit="percentunit",
    )
    errors = (
        errors.stacking(common_builders.StackingConfig().mode(common.StackingMode.NORMAL))
        .thresholds(thresholds((None, "green"), (HANDSHAKE_ERROR_RATIO_THRESHOLD, "red")))
        .thresholds_style(
            common_builders.GraphThresholdsStyleConfig().mode(
                common.GraphThresholdsStyleMode.DASHED
            )
        )
        .span(8)
    )
    lifetime = (
        heatmap.Panel()
        .title("Connection duration")
        .description(
            "How long relayed WebSockets lived, 101 to close, per bucket of the duration "
            "histogram: each column is one interval, brighter cells hold more connections. "
            "Healthy traffic lives long (minutes and up). A bright band at the bottom "
            "(under a second or two) is sockets dying young: the incident's loop showed "
            "sockets living under 50 ms. Cross-check Close codes for why they ended and "
            "the short_lived and rapid_reconnect rules in Findings."
        )
        .datasource(DATASOURCE)
        .with_target(
            query(
                f"sum by (le) (increase(loopwatch_connection_duration_seconds_bucket{{{SEL_ROUTE}}}[$__rate_interval]))",
                "{{le}}",
                fmt=PromQueryFormat.HEATMAP,
            )
        )
        .calculate(False)
        .y_axis(heatmap.YAxisConfig().unit("s"))
        .color(
            heatmap.HeatmapColorOptions()
            .mode(heatmap_model.HeatmapColorMode.SCHEME)
            .scheme("Oranges")
            .scale(heatmap_model.HeatmapColorScale.EXPONENTIAL)
            .exponent(0.5)
            .fill("dark-orange")
        )
        .cell_values(heatmap.CellValues().unit("short"))
        .height(8)
        .span(8)
    )
    return [handshake, errors, lifetime]


def relay() -> list[cogbuilder.Builder[Any]]:
    messages = ts(
        "Messages/s each way",
        "WebSocket data messages relayed per second, client_to_upstream and upstream_to_client. "
        "It follows your application's protocol. Zero messages with many opened connections "
        "means sockets close before talking (a loop). A sudden drop in one direction only "
        "means one side stopped sending: look at that side's logs.",
        query(
            f"sum by (direction) (rate(loopwatch_messages_total{{{SEL_ROUTE}}}[$__rate_interval]))",
            "{{direction}}",
        ),
        unit="reqps",
    )
    size = ts(
        "Payload bytes/s each way",
        "Payload bytes of those messages per second, each way. Spikes with flat message rates "
        "are large messages; messages over limits.max_message_size end with close 1009 "
        "(see Close codes).",
        query(
            f"sum by (direction) (rate(loopwatch_message_bytes_total{{{SEL_ROUTE}}}[$__rate_interval]))",
            "{{direction}}",
        ),
        unit="Bps",
    )
    plain = ts(
        "Plain HTTP requests/s by status class",
        "Plain HTTP requests (not WebSocket upgrades) forwarded per second, stacked by the class "
        "of the status the client got: the backend's, or loopwatch's own 502/504/408 when the "
        "backend failed or was too slow (those are also in Requests refused before detection); "
        "none: the client left before any response. A rise of 5xx with a flat total is the "
        "backend failing; the access lines (telemetry.access_log) name the paths. Clients whose "
        "polling fallback carries them around WebSocket refusals show here (docs/relay.md).",
        query(
            f"sum by (code) (rate(loopwatch_http_requests_total{{{SEL_ROUTE}}}[$__rate_interval]))",
            "{{code}}",
        ),
        unit="reqps",
    ).stacking(common_builders.StackingConfig().mode(common.StackingMode.NORMAL))
    plain_bucket = "loopwatch_http_request_duration_seconds_bucket"
    plain_latency = ts(
        "Plain HTTP request duration p50 / p99",
        "Time from a plain request's head to the end of its response, 50th and 99th "
        "percentile: the backend's answer and the body's transfer. A p99 at "
        "limits.response_timeout (60 s by default) is requests ending as 504s.",
        *p50_p99(plain_bucket),
        unit="s",
    )
    return [messages, size, plain, plain_latency]


def itself() -> list[cogbuilder.Builder[Any]]:
    tracked = ts(
        "Tracked clients",
        "Clients the detection engine holds state for, per instance; bounded by "
        "detection.max_clients. It should follow your number of users. A line pinned at "
        "the cap means state is being evicted (next panel) and detection gets blind to slow "
        "loops: raise detection.max_clients, or look for a flood of forged keys.",
        query(f"sum by (instance) (loopwatch_clients_tracked{{{SEL}}})", "{{instance}}"),
    ).span(6)
    evictions = ts(
        "Client evictions/s",
        "Clients dropped from state by the LRU cap. Normally 0. Sustained evictions mean "
        "more distinct keys than detection.max_clients: either real growth (raise the cap) "
        "or someone inventing keys (a flood of random tokens or addresses — check the "
        "identity sources and their binding in the config).",
        query(
            f"sum by (instance) (rate(loopwatch_clients_evicted_total{{{SEL}}}[$__rate_interval]))",
            "{{instance}}",
        ),
    ).span(6)
    observer_errors = ts(
        "Observer errors, lost spans, lost and failed events/s",
        "Exceptions raised by an observer (telemetry, logs, recorder …). The relay carries on, "
        "but what that observer records is incomplete — metrics or logs may be missing. Any "
        "non-zero value is a loopwatch bug: the JSON logs have the traceback; report it. "
        "Lost spans: finished spans dropped before an exporter got them, because the span "
        "exporter process was slower than the traffic (its queue was full) or had died (it is "
        "restarted within a second, the log says span_exporter_exited). Traces of those "
        "connections are missing; the proxy is unaffected. Lost events: connection events the "
        "data plane could not hand to the brain because the queue between them was full "
        "(loopwatch_events_dropped_total): traffic is unaffected, but detection did not see "
        "those attempts. Losses that go on fire LoopwatchEventsDropped: the brain is saturated "
        "(see CPU used and Event-loop lag); add replicas. Failed events: the brain raised while "
        "handling them (loopwatch_events_failed_total), a bug: any fires "
        "LoopwatchEventHandlingFailed; the log has the traceback.",
        *refs(
            (
                f"sum by (instance, observer) (rate(loopwatch_observer_errors_total{{{SEL}}}[$__rate_interval]))",
                "{{observer}} {{instance}}",
            ),
            (
                f"sum by (instance) (rate(loopwatch_spans_dropped_total{{{SEL}}}[$__rate_interval]))",
                "spans lost {{instance}}",
            ),
            (
                f"sum by (instance) (rate(loopwatch_events_dropped_total{{{SEL}}}[$__rate_interval]))",
                "events lost {{instance}}",
            ),
            (
                f"sum by (instance) (rate(loopwatch_events_failed_total{{{SEL}}}[$__rate_interval]))",
                "events failed {{instance}}",
            ),
        ),
    ).span(6)
    build = (
        table.Panel()
        .title("Build info")
        .description(
            "The loopwatch version each instance runs, its data plane and WebSocket frame parser "
            "(native and rust: the compiled data plane is the only one; the labels stay for the "
            "queries that read them), plus its configuration reloads "
            "in the dashboard's time range. During a rollout two versions show; afterwards one should. "
            "Reloads with result 'error' mean a config change was rejected and the old "
            "config is still in force: run loopwatch check-config on the new file (errors it "
            "prints would stop the next restart too). After 5 minutes alert "
            "LoopwatchConfigReloadFailed fires (docs/runbooks.md#loopwatchconfigreloadfailed)."
        )
        .datasource(DATASOURCE)
        .with_target(
            query(
                f"max by (instance, version, dataplane, frame_parser) (loopwatch_build_info{{{SEL}}})",
                "",
                ref="A",
                instant=True,
                fmt=PromQueryFormat.TABLE,
            )
        )
        .with_target(
            query(
                f"sum by (instance, result) (increase(loopwatch_config_reloads_total{{{SEL}}}[$__range]))",
                "",
                ref="B",
                instant=True,
                fmt=PromQueryFormat.TABLE,
            )
        )
        .with_transformation(
            model.DataTransformerConfig(
                id_val="organize",
                options={
                    "excludeByName": {"Time": True, "Value #A": True},
                    "renameByName": {"Value #B": "reloads"},
                },
            )
        )
        .height(8)
        .span(6)
    )
    return [tracked, evictions, observer_errors, build, *health(), early_refusals(), state_store()]


def state_store() -> timeseries.Panel:
    return ts(
        "Replicas cut off from the shared state store",
        "With state.backend: redis, 1 while a replica cannot reach Redis and decides alone "
        "(1 - loopwatch_state_store_up; always 0 with state.backend: memory), and its failed "
        "round trips to Redis per second (connects, publishes, pings and reads that failed or "
        "took longer than state.redis.timeout). A replica cut off still relays every client and "
        "refuses the loops it sees itself; a loop spread over the replicas is caught only where "
        "one replica's share crosses a threshold. It reconnects by itself, so a failover shows "
        "as a blip. All replicas at once: Redis or its network. One replica: its network path "
        "or its credentials. Alert LoopwatchStateStoreDown fires after 2 minutes cut off, or cut "
        "off at least once a minute for 2 minutes (docs/runbooks.md#loopwatchstatestoredown). "
        "Also what a connected replica refuses of what it reads there, per second and reason "
        "(a signing key that differs, a clock off, two replicas under one replica_id): it takes "
        "nothing from the replicas it refuses, as if cut off; alert LoopwatchStateStoreRefusing "
        "(docs/runbooks.md#loopwatchstatestorerefusing).",
        *refs(
            (f"sum by (instance) (1 - loopwatch_state_store_up{{{SEL}}})", "cut off {{instance}}"),
            (
                f"sum by (instance) (rate(loopwatch_state_store_errors_total{{{SEL}}}[$__rate_interval]))",
                "errors/s {{instance}}",
            ),
            (
                f"sum by (instance, reason) "
                f"(rate(loopwatch_state_store_messages_refused_total{{{SEL}}}[$__rate_interval]))",
                "refused/s {{instance}} {{reason}}",
            ),
        ),
    ).span(8)


def early_refusals() -> timeseries.Panel:
    panel = ts(
        "Requests refused before detection, by reason",
        "Requests loopwatch answered itself before the detection engine saw them, per second, "
        "stacked by reason: bad_request (400: not valid HTTP/1.1, smuggling shapes), "
        "head_too_large (431, or 414 for a long URL), head_timeout and body_timeout (408: a head or body too slow, "
        "slowloris), upstream_timeout (504) and response_timeout (a stalled plain response), "
        "version (505), upgrade_required (426), upgrade_with_body (400), not_implemented (501: a "
        "transfer coding besides chunked), no_route (404), "
        "overload (503 at limits.max_connections), address_limit (503: one address holding "
        "too many connections or heads), shutting_down (503 while draining), fd_limit (503: out "
        "of open files, see Open file descriptors), and with tls: tls_error, tls_timeout (a failed or "
        "stalled TLS handshake, cut) and not_tls (400: plain HTTP to the TLS port), deny (403: a plain request "
        "from a denied client), upstream_error (502) and upstream_cut (a plain request's upstream "
        "failed, or ended its response mid-body). A few a minute "
        "is internet background. Alert LoopwatchRequestsRejected fires when one instance's "
        f"5-minute rate stays above {REJECTED_RATE_THRESHOLD}/s (dashed) for 10 minutes: pick "
        "that instance to compare (this panel's rate follows the zoom; the alert averages 5 "
        "minutes). overload, address_limit and fd_limit are refusals honest users feel; the JSON logs "
        "(request_rejected) name the addresses (docs/runbooks.md#loopwatchrequestsrejected).",
        query(
            f"sum by (reason) (rate(loopwatch_requests_rejected_total{{{SEL}}}[$__rate_interval]))",
            "{{reason}}",
        ),
        unit="reqps",
    )
    return (
        panel.stacking(common_builders.StackingConfig().mode(common.StackingMode.NORMAL))
        .thresholds(thresholds((None, "green"), (REJECTED_RATE_THRESHOLD, "red")))
        .thresholds_style(
            common_builders.GraphThresholdsStyleConfig().mode(
                common.GraphThresholdsStyleMode.DASHED
            )
        )
        .span(16)
    )


# process_* is the standard name any Python (or Go) exporter uses: keep only the
# series of targets that are loopwatch, whatever else the job variable matches.
LOOPWATCH_ONLY = f"and on (job, instance) loopwatch_build_info{{{SEL}}}"
LAG_BUCKET = "loopwatch_event_loop_lag_seconds_bucket"


def health() -> list[cogbuilder.Builder[Any]]:
    """The process loopwatch runs in: CPU, memory, descriptors, the brain's event loop."""
    cpu = ts(
        "CPU used (100 % = one core)",
        "CPU time the loopwatch process spends, user and system, as a share of one core "
        "(process_cpu_seconds_total; the span exporter child is not included). The data plane "
        "runs on every core, so the process may go past 100 %; the brain (detection and "
        "telemetry) is one event loop on one core: when it is saturated, Event-loop lag climbs, "
        "refusals come later and loopwatch_events_dropped_total moves (detection sees less; "
        "traffic never waits for it). Compare with Connection attempts/s: a "
        "flood of attempts or refused requests (Requests refused before detection) explains "
        "it; steady traffic with rising CPU is worth a profile (docs/performance.md). Add "
        "replicas rather than waiting for it to settle.",
        query(
            f"sum by (instance) (rate(process_cpu_seconds_total{{{SEL}}}[$__rate_interval]) "
            f"{LOOPWATCH_ONLY})",
            "{{instance}}",
        ),
        unit="percentunit",
    ).span(8)
    memory = ts(
        "Resident memory",
        "Resident memory (RSS) of the loopwatch process. It grows with open connections "
        "(buffers on both legs), tracked clients (bounded by detection.max_clients) and "
        "status-page streams, and should come back down when they go. A climb that never "
        "returns with flat Active connections and Tracked clients is a leak: note the version "
        "(Build info), take the JSON logs and report it. Set the container's memory limit "
        "well above the peak seen here under a reconnect storm.",
        query(
            f"sum by (instance) (process_resident_memory_bytes{{{SEL}}} {LOOPWATCH_ONLY})",
            "{{instance}}",
        ),
        unit="bytes",
    ).span(8)
    fds = ts(
        "Open file descriptors",
        "Descriptors the loopwatch process holds: two per relayed WebSocket (client and "
        "upstream legs), one per other client socket (handshakes in progress, slow or idle "
        "HTTP) and per upstream HTTP connection, plus a few for listeners, logs and pipes. "
        "It should track twice Active connections. Far above that means sockets are held "
        "before the engine sees them (a slowloris, one address holding many heads: see "
        "Requests refused before detection). At the limit (process_max_fds, ulimit -n) new "
        "connections fail to be accepted: raise the limit or add replicas.",
        query(
            f"sum by (instance) (process_open_fds{{{SEL}}} {LOOPWATCH_ONLY})",
            "{{instance}}",
        ),
    ).span(12)
    lag = ts(
        "Event-loop lag p50 / p99",
        "How late the brain's event loop wakes a task that sleeps half a second "
        "(loopwatch_event_loop_lag_seconds). The brain judges the data plane's events, writes "
        "the enforcement table, wakes the engine and answers scrapes and the admin API on that "
        "loop; the data plane relays on its own threads and never waits for it. So lag does "
        "not slow connections: it delays detection, and a looping client is refused that much "
        "later (more late refusals, loopwatch_enforcement_lag_total). Idle it is about 1 ms "
        "(uvloop's timer tick). A p99 above 10 ms means the loop is busy or blocked: with the "
        "process's CPU high and events dropped (loopwatch_events_dropped_total), the brain is "
        "saturated (add replicas); with low CPU, something blocks it (a slow DNS lookup, a disk "
        "write, a long collector pause) — the JSON logs and a py-spy dump of the process show "
        "what.",
        *refs(
            (
                f"histogram_quantile(0.5, sum by (instance, le) "
                f"(rate({LAG_BUCKET}{{{SEL}}}[$__rate_interval])))",
                "p50 {{instance}}",
            ),
            (
                f"histogram_quantile(0.99, sum by (instance, le) "
                f"(rate({LAG_BUCKET}{{{SEL}}}[$__rate_interval])))",
                "p99 {{instance}}",
            ),
        ),
        unit="s",
    ).span(8)
    connections = ts(
        "Client connections, share of the limit",
        "Client connections open on each instance (loopwatch_client_connections: TLS handshakes, "
        "request heads, held refusals, relayed WebSockets, plain requests, idle keep-alives) "
        "over its limits.max_connections (loopwatch_client_connections_max). At 100 % every new "
        "connection is refused (503, overload in Requests refused before detection); alert "
        f"LoopwatchClientConnectionsNearLimit fires above {CONNECTIONS_LIMIT_THRESHOLD:.0%} "
        "(dashed) for 5 minutes. Well above what Active connections holds: connections that are "
        "not (yet) WebSockets, handshakes or heads left hanging (a slow-connection attack), or "
        "plain HTTP.",
        query(
            f"max by (instance) (loopwatch_client_connections{{{SEL}}}"
            f" / loopwatch_client_connections_max{{{SEL}}})",
            "{{instance}}",
        ),
        unit="percentunit",
    )
    connections = (
        connections.thresholds(thresholds((None, "green"), (CONNECTIONS_LIMIT_THRESHOLD, "red")))
        .thresholds_style(
            common_builders.GraphThresholdsStyleConfig().mode(
                common.GraphThresholdsStyleMode.DASHED
            )
        )
        .span(12)
    )
    return [cpu, memory, lag, fds, connections]


ROWS: list[tuple[str, Any]] = [
    ("Overview", overview),
    ("Close codes", close_codes),
    ("Loops", loops),
    ("Latency and lifetime", latency),
    ("Relay", relay),
    ("loopwatch itself", itself),
]


def variables() -> list[cogbuilder.Builder[model.VariableModel]]:
    all_selected = model.VariableOption(selected=True, text="All", value="$__all")

    def label_values(name: str, label: str, query_text: str, description: str) -> db.QueryVariable:
        return (
            db.QueryVariable(name)
            .label(label)
            .description(description)
            .datasource(DATASOURCE)
            # A plain string: the schema's only other form (object of objects) is not
            # what Grafana's Prometheus variable editor writes.
            .query(query_text)
            .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(model.VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            # A regex, not Grafana's expanded list, so a new replica shows up at once.
            .all_value(".*")
            .current(all_selected)
        )

    return [
        db.DatasourceVariable("datasource")
        .label("Data source")
        .type("prometheus")
        .description("The Prometheus that scrapes loopwatch's /metrics."),
        label_values(
            "job",
            "Job",
            "label_values(loopwatch_build_info, job)",
            "Prometheus job of the loopwatch targets.",
        ),
        label_values(
            "instance",
            "Instance",
            'label_values(loopwatch_build_info{job=~"$job"}, instance)',
            "loopwatch replicas (admin host:port).",
        ),
        label_values(
            "route",
            "Route",
            'label_values(loopwatch_connection_attempts_total{job=~"$job", instance=~"$instance"}, route)',
            "Route path_prefix; applies to panels whose metric has a route.",
        ),
    ]


def build_dashboard() -> model.Dashboard:
    builder = (
        db.Dashboard("loopwatch")
        .uid(UID)
        .description(
            "WebSocket connection loops caught by loopwatch: attempts, close codes, findings, "
            "cooldowns, breakers, latency and relay volume. Every panel says what to do when "
            "it looks wrong; docs/dashboards.md explains the rows, docs/runbooks.md the alerts."
        )
        .tags(["loopwatch", "websocket"])
        .editable()
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("browser")
        .variables(variables())
        .link(
            db.DashboardLink("Runbooks")
            .type(model.DashboardLinkType.LINK)
            .url("https://github.com/loopwatch/loopwatch/blob/main/docs/runbooks.md")
            .icon("doc")
            .target_blank(True)
        )
    )
    for title, make_panels in ROWS:
        builder = builder.with_row(db.Row(title))
        for panel in make_panels():
            builder = builder.with_panel(panel)
    dashboard = builder.build()
    # Stable ids in layout order: Grafana needs unique panel ids, and fixed ones
    # keep the committed JSON (and links to ?viewPanel=N) stable across edits.
    for number, panel in enumerate(dashboard.panels or [], start=1):
        panel.id_val = number
    return dashboard


def dashboard_json() -> str:
    return json.dumps(build_dashboard(), cls=JSONEncoder, sort_keys=True, indent=2) + "\n"


# --- Kubernetes PrometheusRule ---------------------------------------------


class _LiteralDumper(yaml.SafeDumper):
    """Multi-line strings (PromQL, descriptions) as YAML block literals, as in the rule files."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_LiteralDumper.add_representer(str, _str_representer)


def rule_files() -> list[Path]:
    return sorted(RULES_DIR.glob("*.yml"))


def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = []
    for path in rule_files():
        groups.extend(yaml.safe_load(path.read_text())["groups"])
    return groups


def prometheus_rule_yaml() -> str:
    resource = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "loopwatch",
            "labels": {
                "app.kubernetes.io/name": "loopwatch",
                # The label a default kube-prometheus-stack selects rules by.
                "release": "kube-prometheus-stack",
            },
        },
        "spec": {"groups": rule_groups()},
    }
    header = (
        "# Generated by `python -m loopwatch.dashboards.generate` from dashboards/rules/*.yml: do not edit.\n"
        "# The same recording and alerting rules for the Prometheus Operator.\n"
    )
    return header + yaml.dump(resource, Dumper=_LiteralDumper, sort_keys=False, width=1000)


# --- command line ------------------------------------------------------------


def outputs() -> dict[Path, str]:
    return {DASHBOARD_FILE: dashboard_json(), PROMETHEUS_RULE_FILE: prometheus_rule_yaml()}


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loopwatch.dashboards.generate", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if a committed file differs")
    args = parser.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        if args.check:
            stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {_shown(path)}")
    for path in stale:
        print(f"{_shown(path)} is stale: run python -m loopwatch.dashboards.generate", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
