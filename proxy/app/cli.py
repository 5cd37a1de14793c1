"""The `loopwatch` command line."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from importlib.resources import files
from typing import TYPE_CHECKING, Any

# isort: split
from . import early  # noqa: F401  - first: before the imports below take their quarter second

# isort: split
import yaml

from ... import __version__
from ..admin.client import COMMANDS as OPERATOR_COMMANDS
from ..admin.client import add_commands as add_operator_commands
from ..admin.client import run_command as run_operator_command
from ..observe.logs import setup_logging
from ..observe.observers import Observer, reload_applied
from .settings import ConfigError, Settings, dump_settings, ignored_service_links, load_settings

if TYPE_CHECKING:
    from ..observe.settings import LogSettings

SERVICE_LINKS_HINT = (
    "Kubernetes service links (a Service named loopwatch or loopwatch-...), not settings; "
    "set enableServiceLinks: false in the pod spec to drop them"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loopwatch", description=__doc__)
    parser.add_argument("--version", action="version", version=f"loopwatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the proxy")
    run.add_argument("--config", "-c", default=os.environ.get("LOOPWATCH_CONFIG"), help="YAML config file")
    run.add_argument("--upstream", help="upstream URL, e.g. ws://127.0.0.1:8000")
    run.add_argument("--listen", help="HOST:PORT of the proxy listener")
    run.add_argument("--admin-listen", help="HOST:PORT of the admin listener")
    run.add_argument("--log-format", choices=("json", "text"), help="log line format")
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    run.add_argument("--dataplane-threads", metavar="N", help='data plane worker threads, or "auto" (one per core)')

    check = sub.add_parser(
        "check-config", help="validate a config file (and LOOPWATCH_* variables) and print the effective config"
    )
    check.add_argument(
        "file", nargs="?", default=os.environ.get("LOOPWATCH_CONFIG"),
        help="the config file (default: $LOOPWATCH_CONFIG, as for run); without either, the defaults and "
        "LOOPWATCH_* variables",
    )  # fmt: skip

    sub.add_parser(
        "example-config",
        help="print the reference config: every key with its default and a comment",
        description="Prints config/loopwatch.yaml as this version ships it (a pip install or the image "
        "has no source tree): `loopwatch example-config > loopwatch.yaml`, then edit.",
    )

    demo = sub.add_parser("demo", help="backend + loopwatch + clients on loopback, live")
    demo.add_argument("--duration", type=float, default=30.0, help="seconds to run (default 30)")
    demo.add_argument("--keep-running", action="store_true", help="keep running until Ctrl-C")

    backend = sub.add_parser("demo-backend", help="the demo's token-checking echo backend")
    backend.add_argument("--listen", default="127.0.0.1:8000")

    sim = sub.add_parser(
        "simulate",
        help="play a client behaviour against loopwatch and report what it made of it",
        description="Scenarios: auth-loop, duplicate, backoff, refresh, herd, flaky, mixed. Without "
        "--url, the demo backend and a loopwatch are started in this process.",
    )
    sim.add_argument("scenario", metavar="SCENARIO",
                     choices=("auth-loop", "duplicate", "backoff", "refresh", "herd", "flaky", "mixed"))
    sim.add_argument("--clients", type=int, help="clients in the scenario (default: per scenario)")
    sim.add_argument("--rate", type=float, default=20.0, help="attempts/s of a looping client (default 20)")
    sim.add_argument("--duration", type=float, help="seconds to run (default: per scenario, at most 600)")
    sim.add_argument("--url", help="a running loopwatch, e.g. ws://127.0.0.1:8080/ws (loopback only)")
    sim.add_argument("--admin", help="its admin URL, to ask which clients were flagged")
    sim.add_argument("--token-file", metavar="FILE", help="file holding the admin token (default: "
                     "$LOOPWATCH_ADMIN__TOKEN, else admin.token of $LOOPWATCH_CONFIG)")
    sim.add_argument("--config", "-c", help="config of the in-process loopwatch (without --url)")
    sim.add_argument("--allow-remote", action="store_true", help="allow a --url that is not loopback")
    sim.add_argument("--max-attempts", type=int, default=20_000, help="stop after this many attempts")
    sim.add_argument("--seed", type=int, default=0, help="seed of the behaviours' randomness")
    sim.add_argument("--json", action="store_true", help="print the report as JSON")
    sim.add_argument("--check", action="store_true", help="exit 1 when an outcome is not the expected one, or could not be verified")

    rep = sub.add_parser(
        "replay",
        help="run recorded events through the engine: which clients would be flagged, and why",
        description="EVENTS are files written by the record: section (oldest first: PATH.2 PATH.1 PATH).",
    )
    rep.add_argument("events", metavar="EVENTS.jsonl", nargs="+", help="recorded events (.jsonl or .jsonl.gz)")
    rep.add_argument("--config", "-c", default=os.environ.get("LOOPWATCH_CONFIG"), help="YAML config to replay with")
    rep.add_argument("--json", action="store_true", help="print the result as JSON")
    rep.add_argument("--seed", type=int, default=0, help="seed of the cooldown jitter (the proxy uses 0)")

    export = sub.add_parser(
        "export-monitoring",
        help="write the Grafana dashboard, Prometheus rules and provisioning files to DIR",
        description="Writes the files this version ships: loopwatch.json, rules/*.yml (with "
        "rules/tests/, for promtool test rules) and provisioning/ for Grafana. Files already "
        "there with other content are not replaced unless --force.",
    )
    export.add_argument("dir", metavar="DIR", help="directory to write to (created if missing)")
    export.add_argument("--force", action="store_true", help="replace files whose content differs")

    add_operator_commands(sub)  # clients, client, release, cooldown, breakers, breaker-reset, reload
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":  # its own errors said in its own words; stdout unused
        return cmd_run(args)
    try:
        code = dispatch(args)
        sys.stdout.flush()
    except OSError as exc:
        # Output into a full disk or a closed pipe (`> /dev/full`, a reader
        # gone): one line, not a traceback; the interpreter's last flush of
        # what is left goes nowhere.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        where = f": {exc.filename}" if exc.filename else ""
        print(f"loopwatch {args.command}: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    return code


def dispatch(args: argparse.Namespace) -> int:
    """Every command but `run`."""
    if args.command in OPERATOR_COMMANDS:
        return run_operator_command(args, env=os.environ)
    if args.command == "check-config":
        ignored = ignored_service_links(os.environ)
        if ignored:
            print(f"note: ignoring {', '.join(ignored)}: {SERVICE_LINKS_HINT}", file=sys.stderr)
        return check_config_main(args.file)
    if args.command == "example-config":
        sys.stdout.write(files("loopwatch.config").joinpath("loopwatch.yaml").read_text(encoding="utf-8"))
        return 0
    if args.command == "demo":
        from ..tools.demo import demo_main

        return demo_main(duration=args.duration, keep_running=args.keep_running)
    if args.command == "demo-backend":
        from ..tools.demo import backend_main

        return backend_main(args.listen)
    if args.command == "simulate":
        from ..tools.simulate import SimulateOptions, simulate_main

        return simulate_main(
            SimulateOptions(
                args.scenario, clients=args.clients, rate=args.rate, duration=args.duration,
                url=args.url, admin=args.admin, config=args.config, allow_remote=args.allow_remote,
                max_attempts=args.max_attempts, seed=args.seed, json=args.json, check=args.check,
                token_file=args.token_file,
            ),
            env=os.environ,
        )
    if args.command == "replay":
        from ..tools.replay import replay_main

        return replay_main(args.events, args.config, args.json, args.seed)
    if args.command == "export-monitoring":
        from ..tools.monitoring import export_main

        return export_main(args.dir, force=args.force)
    raise AssertionError(args.command)


class LogSetup(Observer):
    """Keeps the process's log lines as `logging:` says (level and format)
    across reloads: `loopwatch run` sets them up at start and adds this."""

    name = "log_setup"

    def __init__(self, applied: LogSettings):
        self.applied = applied

    def on_config(self, settings: Settings, info: dict[str, Any]) -> None:
        if reload_applied(info) and settings.logging != self.applied:
            self.applied = settings.logging
            setup_logging(self.applied.level, self.applied.format)


def check_config_main(path: str | None) -> int:
    """`loopwatch check-config [FILE]`: every error to stderr and 2, or the
    effective config and 0. The files it names (certificates, keys, the CA
    bundle) are read as `run` reads them."""
    from ..observe.tracing import tracing_env_errors
    from .planes import settings_errors, settings_warnings

    try:
        settings = load_settings(path)
    except ConfigError as exc:
        errors = exc.errors
    else:
        errors = settings_errors(settings)
    errors = [*errors, *tracing_env_errors(os.environ)]
    if errors:
        for line in errors:
            print(line, file=sys.stderr)
        return 2
    for line in settings_warnings(settings):
        print(f"note: {line}", file=sys.stderr)
    try:
        settings.require_upstream()
    except ConfigError as exc:
        # Not an error here: `loopwatch run --upstream URL` can still supply it.
        print(f"note: {exc}", file=sys.stderr)
    sys.stdout.write(yaml.safe_dump(dump_settings(settings), sort_keys=False, allow_unicode=True))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    overrides = {
        key: value
        for key, value in {
            "upstream": args.upstream,
            "listen": args.listen,
            "admin.listen": args.admin_listen,
            "logging.format": args.log_format,
            "logging.level": args.log_level,
            "dataplane_threads": args.dataplane_threads,
        }.items()
        if value is not None
    }
    from ..observe.tracing import tracing_env_errors
    from .planes import settings_errors, settings_warnings

    try:
        settings = load_settings(args.config, env=os.environ, overrides=overrides)
        settings.require_upstream()
        errors = settings_errors(settings)
    except ConfigError as e:
        errors = e.errors
    errors = [*errors, *tracing_env_errors(os.environ)]  # every one, as check-config says them
    if errors:
        print(f"loopwatch: invalid configuration:\n{ConfigError(errors)}", file=sys.stderr)
        return 2
    setup_logging(settings.logging.level, settings.logging.format)
    import logging

    from ..observe.logs import event

    ignored = ignored_service_links(os.environ)
    if ignored:  # one line for all of them, once per process (a reload reads the same environment)
        event(logging.getLogger("loopwatch"), "service_links_ignored", logging.WARNING,
              variables=ignored, why=SERVICE_LINKS_HINT)
    for warning in settings_warnings(settings):
        event(logging.getLogger("loopwatch"), "config_warning", logging.WARNING, message=warning)
    from ..observe.tracing import TracingConfigError
    from .runtime import ConfigSources, Running, ignore_stop_signals, run_loop, serve

    def follow_logging(running: Running) -> None:
        """A reload's `logging:` applies at once (from the line after its config_loaded)."""
        running.observers.add(LogSetup(settings.logging))

    sources = ConfigSources(args.config, dict(os.environ), overrides)
    try:
        status = run_loop(lambda: serve(settings, sources=sources, on_started=follow_logging))
        ignore_stop_signals()
        assert isinstance(status, int)  # serve's exit status
        return status
    except (ConfigError, TracingConfigError) as e:  # a file it cannot read; an OTEL_* variable it cannot honour
        print(f"loopwatch: invalid configuration:\n{e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"loopwatch: cannot start: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
