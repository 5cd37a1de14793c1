"""The operator commands: the admin API from a shell, as `fail2ban-client` is
for fail2ban.

    loopwatch clients [--all]          tracked clients, worst first
    loopwatch client KEY               one client: cooldown, findings, history
    loopwatch release KEY              end its cooldown, forget its findings
    loopwatch cooldown KEY --for 10m   refuse it for a while, whatever the mode
    loopwatch breakers                 every route's circuit breakers
    loopwatch breaker-reset NAME       close a breaker now (--route PREFIX: one route's)
    loopwatch reload                   re-read the config file and environment

Readable tables by default; `--json` prints the API's JSON for scripts. The
admin API is found through `--admin URL`, else `LOOPWATCH_ADMIN_URL`, else the
`admin.listen` that `loopwatch run` would use here (`--config` or
`LOOPWATCH_CONFIG`, and `LOOPWATCH_ADMIN__LISTEN`); the token through
`--token-file`, else that configuration's `admin.token` (`LOOPWATCH_ADMIN__TOKEN`).
Each kind of failure has its own exit status (ExitCode), so scripts can tell
"loopwatch is down" from "wrong token" from "no such client".

Plain urllib: no new dependency, no proxy (a bearer token never goes through
HTTP(S)_PROXY) and no redirects (a token never follows one to another host).
"""

from __future__ import annotations

import argparse
import enum
import functools
import io
import json
import math
import os
import re
import signal
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple
from urllib.parse import quote, urlencode, urlsplit

from ... import __version__

DEFAULT_TIMEOUT = 10.0
MAX_ANSWER = 32 * 1024 * 1024  # bytes; --all reads pages of at most 500 clients
PAGE = 500  # the admin API's largest page (admin_api.MAX_PAGE)
COMMANDS = ("clients", "client", "release", "cooldown", "breakers", "breaker-reset", "reload")


class ExitCode(enum.IntEnum):
    OK = 0
    FAILED = 1  # the admin API answered with an error: refused reload, bad request, server error, not the API
    USAGE = 2  # bad arguments, or no admin address/token to be read from the configuration
    UNREACHABLE = 3  # connection refused, no answer within --timeout, name not resolved, TLS failure
    UNAUTHORIZED = 4  # 401 / 403: token missing or wrong, or the request refused
    NOT_FOUND = 5  # no such client or breaker


class OperatorError(Exception):
    """A failure the command reports as one message and an exit status."""

    def __init__(self, code: ExitCode, message: str, details: tuple[str, ...] = ()):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


class Target(NamedTuple):
    """Where the admin API is and how to authenticate to it."""

    url: str  # scheme://host:port, no trailing slash
    token: str | None
    token_source: str | None  # where the token came from, for the 401 message
    timeout: float


# --- finding the admin API -----------------------------------------------------


def resolve_target(args: argparse.Namespace, env: Mapping[str, str]) -> Target:
    url = args.admin or env.get("LOOPWATCH_ADMIN_URL") or None
    config = args.config or env.get("LOOPWATCH_CONFIG")
    configured = _admin_settings(config, env) if url is None or args.token_file is None else None
    if url is None:
        assert configured is not None
        url = _url_for_listen(configured.listen)
    token, token_source = resolve_token(args.token_file, config, env, configured)
    return Target(check_admin_url(url), token, token_source, args.timeout)


def resolve_token(
    token_file: str | None, config: str | None, env: Mapping[str, str], configured: Configured | None = None
) -> tuple[str | None, str | None]:
    """The admin token and where it came from (for the 401 message): the token
    file, else LOOPWATCH_ADMIN__TOKEN, else admin.token of `config` (`configured`
    when the caller has read it already); (None, None) when none is set.
    `loopwatch simulate --admin` resolves it the same way."""
    if token_file is not None:
        return _read_token_file(token_file), token_file
    if configured is None:
        configured = _admin_settings(config, env)
    if configured.token is None:
        return None, None
    return configured.token, configured.token_source


def _read_token_file(path: str) -> str:
    from .settings import token_problem

    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise OperatorError(ExitCode.USAGE, f"--token-file {path}: cannot read it: {e}") from None
    if not token:
        raise OperatorError(ExitCode.USAGE, f"--token-file {path}: the file is empty")
    if "\n" in token or "\r" in token:
        raise OperatorError(
            ExitCode.USAGE, f"--token-file {path}: expected the token alone on one line, got more than one line"
        )
    problem = token_problem(token)  # what admin.token accepts, so that the server could hold it
    if problem is not None:
        raise OperatorError(ExitCode.USAGE, f"--token-file {path}: {problem}")
    return token


class Configured(NamedTuple):
    listen: str  # admin.listen
    token: str | None  # admin.token
    token_source: str  # the variable or file it would come from


def _admin_settings(config: str | None, env: Mapping[str, str]) -> Configured:
    """admin.listen and admin.token as `loopwatch run` would read them here; the
    file's other sections and the environment's other settings are not this
    command's business: `loopwatch reload` of a file with an error elsewhere
    reaches the server, which refuses it and says so (its reload metrics and
    the LoopwatchConfigReloadFailed alert)."""
    from ..app.settings import ConfigError, load_settings

    admin_env = {k: v for k, v in env.items() if k == "LOOPWATCH_ADMIN" or k.startswith("LOOPWATCH_ADMIN__")}
    try:
        settings = load_settings(config, env=admin_env, only="admin")
    except ConfigError as e:
        raise OperatorError(
            ExitCode.USAGE,
            "cannot read the admin address and token from the configuration; fix it or pass "
            "--admin URL (and --token-file); the running loopwatch was not told",
            tuple(e.errors),
        ) from None
    if "LOOPWATCH_ADMIN__TOKEN" in admin_env:
        source = "LOOPWATCH_ADMIN__TOKEN"
    elif settings.admin.token_file is not None:
        source = f"admin.token_file ({settings.admin.token_file})"
    else:
        source = f"admin.token in {config}" if config else "admin.token"
    return Configured(settings.admin.listen, settings.admin.token, source)


def _url_for_listen(listen: str) -> str:
    from ..sections import parse_host_port

    host, port = parse_host_port(listen)
    if port == 0:
        raise OperatorError(
            ExitCode.USAGE,
            f"admin.listen is {listen} (any free port): pass --admin URL with the port loopwatch "
            "logged at start (its `listening` line)",
        )
    # A wildcard listener is reached on loopback from the same host.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def check_admin_url(url: str) -> str:
    """The admin API's base URL, checked; every message starts "admin URL:"."""
    authority = re.split(r"[/?#]", url.partition("://")[2] if "://" in url else url, maxsplit=1)[0]
    userinfo, at, _ = authority.rpartition("@")
    if at:
        # urllib would take `user:password@host` for the host name (a DNS failure),
        # and the message would print the password: refused, and never shown.
        shown = url.replace(userinfo + "@", "***@", 1)
        raise OperatorError(
            ExitCode.USAGE,
            "admin URL: expected no user name or password in it (pass the admin token with "
            f"--token-file FILE, or LOOPWATCH_ADMIN__TOKEN), got {shown!r}",
        )
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise OperatorError(
            ExitCode.USAGE, f"admin URL: expected http://HOST:PORT such as http://127.0.0.1:9900, got {url!r}"
        )
    if parts.query or parts.fragment:
        raise OperatorError(ExitCode.USAGE, f"admin URL: expected no query or fragment, got {url!r}")
    if any(ch <= " " or ch == "\x7f" for ch in url):  # http.client would refuse to send it
        raise OperatorError(ExitCode.USAGE, f"admin URL: expected no spaces or control characters, got {url!r}")
    return url.rstrip("/")


# --- talking to it -------------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the 3xx surfaces as an HTTPError: the admin API never redirects


class AdminClient:
    """JSON requests to the admin API; every failure becomes an OperatorError."""

    def __init__(self, target: Target):
        self.target = target
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())

    def get(self, path: str, query: Mapping[str, Any] | None = None) -> Any:
        return self._call("GET", path, query, None)

    def post(self, path: str, body: Mapping[str, Any] | None = None) -> Any:
        return self._call("POST", path, None, body)

    def _call(self, method: str, path: str, query: Mapping[str, Any] | None, body: Mapping[str, Any] | None) -> Any:
        url = self.target.url + path + (f"?{urlencode(query)}" if query else "")
        headers = {"Accept": "application/json", "User-Agent": f"loopwatch-cli/{__version__}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.target.token is not None:
            headers["Authorization"] = f"Bearer {self.target.token}"
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        deadline = time.monotonic() + self.target.timeout  # the body as a whole; the socket bounds each step
        try:
            with self._opener.open(request, timeout=self.target.timeout) as response:
                raw = _read_bounded(response, deadline)
                status = response.status
        except urllib.error.HTTPError as e:
            try:
                raw = _read_bounded(e, deadline)
            except (OperatorError, OSError):
                raw = b""  # the status says enough
            finally:
                e.close()
            raise self._refusal(e.code, e.reason, raw, method, path) from None
        except urllib.error.URLError as e:
            raise self._unreachable(e.reason) from None
        except (TimeoutError, OSError) as e:  # a timeout or reset while reading the answer
            raise self._unreachable(e) from None
        except ValueError:
            # http.client refuses a header value it cannot send (a line break, a
            # character outside Latin-1). Its message holds the value: not shown.
            what = f"the token from {self.target.token_source}" if self.target.token else "a header"
            raise OperatorError(
                ExitCode.USAGE, f"cannot send {what} in an HTTP header: expected printable ASCII without spaces"
            ) from None
        try:
            return json.loads(raw)
        except ValueError:
            raise OperatorError(
                ExitCode.FAILED,
                f"{self.target.url} answered {method} {_short(path)} with {status} but not JSON: "
                "is it loopwatch's admin port?",
            ) from None

    def _unreachable(self, reason: object) -> OperatorError:
        where = f"cannot reach the admin API at {self.target.url}"
        if isinstance(reason, TimeoutError):
            why = f"no answer within {self.target.timeout:g}s (--timeout)"
        elif isinstance(reason, ConnectionRefusedError):
            why = "connection refused: is loopwatch running, and is this its admin.listen address?"
        elif isinstance(reason, socket.gaierror):
            why = f"cannot resolve the host name ({reason.strerror})"
        elif isinstance(reason, ssl.SSLError):
            why = f"TLS failed ({reason.reason or reason})"
        elif isinstance(reason, OSError):
            why = reason.strerror or str(reason) or type(reason).__name__
        else:
            why = str(reason)
        return OperatorError(ExitCode.UNREACHABLE, f"{where}: {why}")

    def _refusal(self, status: int, reason: str, raw: bytes, method: str, path: str) -> OperatorError:
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = None
        message = answer.get("error") if isinstance(answer, dict) else None
        details = tuple(str(e) for e in answer.get("errors", ())) if isinstance(answer, dict) else ()
        if status == 401:
            if self.target.token is None:
                hint = "no token was sent: set LOOPWATCH_ADMIN__TOKEN or pass --token-file"
            else:
                hint = f"the token from {self.target.token_source} is not the admin.token loopwatch runs with"
            return OperatorError(ExitCode.UNAUTHORIZED, f"token missing or wrong (401): {hint}")
        if status == 403:
            return OperatorError(
                ExitCode.UNAUTHORIZED, f"the admin API refused the request (403): {message or reason}"
            )
        if message is None and status in (400, 414, 431):
            # Refused by the HTTP server before the admin API saw it (a request line
            # or header over its limit): what it said is the reason.
            said = raw.decode("utf-8", "replace").strip().splitlines()[:1]
            return OperatorError(
                ExitCode.FAILED,
                f"{_short(self.target.url)} refused {method} {_short(path)} as malformed ({status} {reason})"
                + (f": {_short(said[0], 200)}" if said else ""),
            )
        if message is None:
            return OperatorError(
                ExitCode.FAILED,
                f"{self.target.url} answered {method} {_short(path)} with {status} {reason}, not the admin "
                "API's JSON: is it loopwatch's admin port?",
            )
        if status == 404:
            return OperatorError(ExitCode.NOT_FOUND, message)
        return OperatorError(ExitCode.FAILED, f"{message} ({status})", details)


def _read_bounded(response: Any, deadline: float) -> bytes:
    """The body, at most MAX_ANSWER bytes, read by `deadline` (time.monotonic): the
    socket timeout bounds each read, this the whole of a body that trickles in."""
    raw = bytearray()
    while chunk := response.read1(64 * 1024):  # what has arrived: read() would wait for all of it
        raw += chunk
        if len(raw) > MAX_ANSWER:
            raise OperatorError(ExitCode.FAILED, f"the answer is larger than {MAX_ANSWER} bytes; not reading it")
        if time.monotonic() > deadline:
            raise TimeoutError("the answer did not arrive in time")
    return bytes(raw)


# aiohttp reads a request line of at most 8190 bytes and answers a longer one
# itself, in plain text. Room is left for the method, the route and the query.
MAX_PATH_SEGMENT = 7900


def key_path(key: str, what: str = "client key") -> str:
    """A client key as one path segment: `@`, `/`, `%`, spaces, … all quoted;
    OperatorError when the admin port could not take it in a URL."""
    quoted = quote(key, safe="")
    if len(quoted) > MAX_PATH_SEGMENT:
        raise OperatorError(
            ExitCode.USAGE,
            f"the {what} is {len(key)} characters ({len(quoted)} URL-quoted): more than the admin API takes "
            f"in a URL (a request line of 8190 bytes at most), and more than any client key holds: identity "
            "hashes a value over identity.max_key_length (256 by default) to sha256:… (docs/identity.md); "
            "copy the key as `loopwatch clients` shows it",
        )
    return quoted


def _short(path: str, limit: int = 80) -> str:
    """A request path as a message shows it: the start of a long one is enough."""
    return path if len(path) <= limit else path[:limit] + "…"


# --- the commands -------------------------------------------------------------------


@dataclass
class Output:
    out: IO[str]
    err: IO[str]
    as_json: bool

    def json(self, data: Any) -> None:
        self.out.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")

    def table(self, table: Any) -> None:
        from rich.console import Console

        console = functools.partial(Console, markup=False, highlight=False, emoji=False)
        if self.out.isatty():
            console(file=self.out).print(table)
            return
        # Not a terminal: plain lines, as wide as the widest row (a key of 256
        # wide characters is 512 columns), so a row stays one line for grep
        # and awk, without the padding a screen needs.
        from rich.measure import Measurement

        unbounded = console(file=io.StringIO(), width=1 << 20)
        width = Measurement.get(unbounded, unbounded.options, table).maximum
        buffer = io.StringIO()
        console(file=buffer, width=max(width, 80)).print(table)
        lines = [line.rstrip() for line in buffer.getvalue().splitlines()]
        while lines and not lines[0]:
            lines.pop(0)
        while lines and not lines[-1]:
            lines.pop()
        self.out.write("\n".join(lines) + "\n")

    def line(self, text: str) -> None:
        self.out.write(text + "\n")


def cmd_clients(api: AdminClient, args: argparse.Namespace, o: Output) -> ExitCode:
    data = _all_clients(api) if args.all else api.get("/api/clients", {"limit": args.limit})
    if o.as_json:
        o.json(data)
        return ExitCode.OK
    clients = data.get("clients", [])
    now = float(data.get("now", 0.0))
    total = int(data.get("total", len(clients)))
    if not clients:
        o.line("no tracked clients")
        return ExitCode.OK
    table = _table(("client", ""), ("status", ""), ("attempts", "r"), ("per s", "r"), ("open", "r"),
                   ("cooldown", ""), ("findings", ""), ("close codes", ""), ("last seen", "r"))
    for c in clients:
        table.add_row(
            c["key"], c["status"], str(c["attempts_total"]), f"{c['attempts_per_second']:.1f}",
            str(c["open_connections"]), _cooldown(c.get("cooldown") or {}),
            ", ".join(f"{f['rule']} {f['severity']}" for f in c.get("findings", [])) or "-",
            _codes(c.get("close_codes") or {}), _ago(now - c["last_seen"]),
        )
    o.table(table)
    more = "" if len(clients) >= total else f" (--all for every one, or --limit up to {PAGE})"
    o.line(f"{len(clients)} of {total} tracked clients, worst first{more}")
    return ExitCode.OK


def _all_clients(api: AdminClient) -> dict[str, Any]:
    """Every page; one document shaped like a page, each client once."""
    first = api.get("/api/clients", {"limit": PAGE, "offset": 0})
    clients = list(first.get("clients", []))
    seen = {c["key"] for c in clients}
    total = int(first.get("total", len(clients)))
    # Bounded by the total the first page reported (the table may shift between pages).
    for page in range(1, math.ceil(total / PAGE) + 1):
        if len(clients) >= total:
            break
        data = api.get("/api/clients", {"limit": PAGE, "offset": page * PAGE})
        batch = data.get("clients", [])
        for c in batch:
            if c["key"] not in seen:
                seen.add(c["key"])
                clients.append(c)
        if len(batch) < PAGE:
            break
    return {"now": first.get("now"), "clients": clients, "total": max(total, len(clients))}


def cmd_client(api: AdminClient, args: argparse.Namespace, o: Output) -> ExitCode:
    c = api.get(f"/api/clients/{key_path(args.key)}")
    if o.as_json:
        o.json(c)
        return ExitCode.OK
    now = float(c.get("now", 0.0))
    summary = _table(("", ""), ("", ""), header=False)
    cooldown = c.get("cooldown") or {}
    for name, value in (
        ("client", c["key"]),
        ("status", c["status"]),
        ("attempts", f"{c['attempts_total']} ({c['attempts_per_second']:.1f}/s now)"),
        ("open connections", str(c["open_connections"])),
        ("first seen", _ago(now - c["first_seen"])),
        ("last seen", _ago(now - c["last_seen"])),
        ("auth failures in a row", str(c["consecutive_auth_failures"])),
        ("close codes", _codes(c.get("close_codes") or {}, top=None)),
        ("cooldown", _cooldown(cooldown, long=True)),
    ):
        summary.add_row(name, value)
    o.table(summary)
    findings = c.get("findings", [])
    if findings:
        table = _table(("finding", ""), ("severity", ""), ("raised", "r"), ("last match", "r"),
                       ("clears in", "r"), ("evidence", ""), title="findings")
        for f in findings:
            table.add_row(
                f["rule"], f["severity"], _ago(now - f["raised_at"]), _ago(now - f["last_match"]),
                _duration(max(0.0, f["clears_at"] - now)), _evidence(f.get("evidence") or {}),
            )
        o.table(table)
    else:
        o.line("no findings")
    history = c.get("history", [])
    if history:
        table = _table(("when", "r"), ("event", ""), ("detail", ""), title="history, newest last")
        for h in history:
            detail = {k: v for k, v in h.items() if k not in ("type", "t")}
            table.add_row(_ago(now - h["t"]), h["type"], _evidence(detail))
        o.table(table)
    return ExitCode.OK


def cmd_release(api: AdminClient, args: argparse.Namespace, o: Output) -> ExitCode:
    data = api.post(f"/api/clients/{key_path(args.key)}/release")
    if o.as_json:
        o.json(data)
    else:
        o.line(f"released {args.key}: its cooldown ended, its findings and evidence forgotten")
    return ExitCode.OK


def cmd_cooldown(api: AdminClient, args: argparse.Namespace, o: Output) -> ExitCode:
    data = api.post(f"/api/clients/{key_path(args.key)}/cooldown", {"duration": args.duration})
    if o.as_json:
        o.json(data)
    else:
        seconds = float(data.get("cooldown_seconds", args.duration))
        o.line(f"{args.key} is refused for {_duration(seconds)} (`loopwatch release` ends it sooner)")
    return ExitCode.OK


def cmd_breakers(api: AdminClient, args: argparse.Namespace, o: Output) -> ExitCode:
    data = api.get("/api/breakers")
    if o.as_json:
        o.json(data)
        return ExitCode.OK
    table = _table(("route", ""), ("breaker", ""), ("state", ""), ("enabled", ""), ("calls", "r"),
                   ("failures", "r"), ("failure ratio", "r"), ("retry in", "r"), ("open wait", "r"), ("trips", "r"),
                   ("probes ok/allowed", "r"), ("last opened", ""))
    for b in data.get("breakers", []):
        table.add_row(
            b.get("route", ""), b["name"], b["state"], "yes" if b["enabled"] else "no", str(b["calls"]), str(b["failures"]),
            f"{b['failure_ratio']:.2f}", _duration(b["retry_after"]) if b["retry_after"] else "-",
            _duration(b["open_wait"]), str(b["trips"]), f"{b['probes_succeeded']}/{b['probes_permitted']}",
            _last_trip(b.get("last_trip")),
        )
    o.table(table)
    return ExitCode.OK


def _last_trip(trip: dict[str, Any] | None) -> str:
    """What opened a breaker last: `5/8 failed, 40s ago`, `probe failed, 3s ago`."""
    if not trip:
        return "-"
    what = {"failure_ratio": f"{trip['failures']}/{trip['calls']} failed", "probe_failed": "probe failed",
            "probe_timeout": "probe timed out"}.get(trip["cause"], str(trip["cause"]))  # fmt: skip
    return f"{what}, {_duration(trip['ago'])} ago"


def cmd_breaker_reset(api: AdminClient, args: argparse.Namespace, o: Output) -> ExitCode:
    path = f"/api/breakers/{key_path(args.name, 'breaker name')}/reset"
    if args.route is not None:
        path += "?" + urlencode({"route": args.route})
    data = api.post(path)
    if o.as_json:
        o.json(data)
    elif args.route is not None:
        o.line(f"breaker {args.name} of route {args.route} closed")
    else:
        o.line(f"breaker {args.name} closed on every route")
    return ExitCode.OK


def cmd_reload(api: AdminClient, args: argparse.Namespace, o: Output) -> ExitCode:
    data = api.post("/api/reload")
    if o.as_json:
        o.json(data)
        return ExitCode.OK
    restart = data.get("restart_required") or []
    if restart:
        o.line("reloaded; these changed settings apply only after a restart: " + ", ".join(restart))
    else:
        o.line("reloaded; every change applies now")
    return ExitCode.OK


HANDLERS = {
    "clients": cmd_clients,
    "client": cmd_client,
    "release": cmd_release,
    "cooldown": cmd_cooldown,
    "breakers": cmd_breakers,
    "breaker-reset": cmd_breaker_reset,
    "reload": cmd_reload,
}


def run_command(
    args: argparse.Namespace,
    env: Mapping[str, str] | None = None,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
) -> int:
    """Run one operator command; its exit status."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    try:
        target = resolve_target(args, env if env is not None else {})
        return int(HANDLERS[args.command](AdminClient(target), args, Output(out, err, args.json)))
    except OperatorError as e:
        err.write(f"loopwatch {args.command}: {e.message}\n")
        for line in e.details:
            err.write(f"  {line}\n")
        return int(e.code)
    except (KeyError, TypeError, AttributeError) as e:  # a field the tables need is missing or odd
        err.write(
            f"loopwatch {args.command}: unexpected answer from the admin API ({type(e).__name__}: {e}); "
            "is it a loopwatch of another version? --json prints it as it came\n"
        )
        return int(ExitCode.FAILED)
    except BrokenPipeError:  # `loopwatch clients --all | head`: the reader has what it wanted
        if out is sys.stdout:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt:
        return 128 + signal.SIGINT


# --- the command line ------------------------------------------------------------------


def _duration_arg(value: str) -> float:
    from ...detectors.units import parse_duration

    try:
        seconds = float(value)  # a bare number is seconds, as in the config file
    except ValueError:
        try:
            seconds = parse_duration(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    if not (math.isfinite(seconds) and seconds > 0):
        raise argparse.ArgumentTypeError(f"expected a duration of more than 0s, got {value!r}")
    return seconds


def _key_arg(value: str) -> str:
    if not value:
        raise argparse.ArgumentTypeError("expected a client key such as alice@203.0.113.7, got ''")
    return value


def _limit_arg(value: str) -> int:
    try:
        limit = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer from 1 to {PAGE}, got {value!r}") from None
    if not 1 <= limit <= PAGE:
        raise argparse.ArgumentTypeError(f"expected an integer from 1 to {PAGE}, got {limit}")
    return limit


def _timeout_arg(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise argparse.ArgumentTypeError(f"expected seconds greater than 0, got {value!r}")
    return seconds


def add_commands(sub: Any) -> None:
    """The operator subcommands on `loopwatch`'s subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_argument_group("admin API")
    where.add_argument(
        "--admin", metavar="URL",
        help="the admin API, e.g. http://127.0.0.1:9900 (default: $LOOPWATCH_ADMIN_URL, else admin.listen "
        "of the configuration `loopwatch run` would read here)",
    )
    where.add_argument(
        "--token-file", metavar="FILE",
        help="file holding the admin token (default: $LOOPWATCH_ADMIN__TOKEN, else admin.token of the configuration)",
    )
    where.add_argument("--config", "-c", metavar="FILE", help="config file to read admin.listen and admin.token "
                       "from (default: $LOOPWATCH_CONFIG)")
    where.add_argument("--timeout", type=_timeout_arg, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                       help=f"give up on an unanswered request after this long (default {DEFAULT_TIMEOUT:g})")
    common.add_argument("--json", action="store_true", help="print the admin API's JSON instead of a table")
    epilog = (
        "exit status: 0 done, 1 the admin API answered with an error, 2 usage, 3 admin API unreachable "
        "(refused, timeout), 4 token missing or wrong / refused (401, 403), 5 no such client or breaker"
    )

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help, description=help, epilog=epilog)

    clients = add("clients", "tracked clients, worst first (cooldown, critical, warning, ok)")
    clients.add_argument("--all", action="store_true", help="every tracked client, not only the first page")
    clients.add_argument("--limit", type=_limit_arg, default=50, help=f"clients on the page (1-{PAGE}, default 50)")
    add("client", "one client: attempts, close codes, cooldown, findings with evidence, history").add_argument(
        "key", type=_key_arg, metavar="KEY", help="the client key, as `loopwatch clients` shows it")
    add("release", "end a client's cooldown and forget its findings, repeats and evidence").add_argument(
        "key", type=_key_arg, metavar="KEY")
    cooldown = add("cooldown", "refuse a client for a while, whatever the mode (rule `manual`)")
    cooldown.add_argument("key", type=_key_arg, metavar="KEY")
    cooldown.add_argument("--for", dest="duration", type=_duration_arg, required=True, metavar="DURATION",
                          help='how long: "30s", "10m", "1h", or seconds')
    add("breakers", "every route's circuit breakers: state, failures in the window, open wait, trips")
    reset = add("breaker-reset", "close a circuit breaker now, of one route or of every route")
    reset.add_argument("name", metavar="NAME", help="upstream or auth")
    reset.add_argument("--route", metavar="PREFIX", help="the route (its path_prefix, as `loopwatch breakers` "
                       "shows it); every route's breaker NAME when left out")
    add("reload", "re-read the config file and environment, as SIGHUP does")


# --- formatting ---------------------------------------------------------------------


def _table(*columns: tuple[str, str], title: str | None = None, header: bool = True) -> Any:
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, title=title, title_justify="left", show_header=header, pad_edge=False)
    for name, align in columns:
        table.add_column(name, justify="right" if align == "r" else "left", overflow="fold")
    return table


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(round(seconds))
    d, rest = divmod(whole, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    parts = [f"{n}{u}" for n, u in ((d, "d"), (h, "h"), (m, "m"), (s, "s")) if n]
    return "".join(parts[:2])


def _ago(seconds: float) -> str:
    return f"{_duration(max(0.0, seconds))} ago"


def _cooldown(c: Mapping[str, Any], long: bool = False) -> str:
    remaining = c.get("remaining") or 0
    if remaining <= 0:
        return "-"
    text = f"{_duration(remaining)} left, {c.get('rule') or '?'}"
    if (c.get("repeat") or 0) > 1:
        text += f", repeat {c['repeat']}"
    if not c.get("enforced", True):
        text += ", observed only" if long else ", observed"
    return text


def _codes(codes: Mapping[str, int], top: int | None = 3) -> str:
    ranked = sorted(codes.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ranked if top is None else ranked[:top]
    text = " ".join(f"{code}×{n}" for code, n in shown)
    if top is not None and len(ranked) > top:
        text += " …"
    return text or "-"


def _evidence(evidence: Mapping[str, Any]) -> str:
    parts = []
    for k, v in evidence.items():
        if k in ("first_seen", "last_seen"):  # clock readings, not evidence a reader can use
            continue
        if isinstance(v, float):
            v = round(v, 3)
        elif isinstance(v, list):
            v = [round(x, 3) if isinstance(x, float) else x for x in v]
        parts.append(f"{k}={json.dumps(v, separators=(',', ':'), ensure_ascii=False)}")
    return " ".join(parts) or "-"
