"""loopwatch's settings: the models, loading with precedence, readable errors.

Sources, lowest precedence first: built-in defaults, the YAML file,
``LOOPWATCH_*`` environment variables, command-line overrides. They are merged
into one plain mapping and validated once, so every mistake is reported in the
same pass, each as ``dotted.key[0].path: expected …, got …`` rather than
pydantic's raw multi-line text.

Adding a section (detection, policy, …) is one line on ``Settings``::

    detection: DetectionSettings = DetectionSettings()

where ``DetectionSettings`` subclasses ``Section``. Its keys then work from the
file, from ``LOOPWATCH_DETECTION__<KEY>`` and in error messages without more code;
``tests/test_config.py`` fails until they are also in ``config/loopwatch.yaml``
and ``docs/configuration.md``.
"""

from __future__ import annotations

import copy
import difflib
import ipaddress
import os
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import PurePath
from typing import Annotated, Any, Literal, NamedTuple

import yaml
from pydantic import (
    BaseModel,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from ...detectors.settings import BreakerSettings, DetectionSettings, PolicySettings
from ...detectors.units import Duration, format_duration
from ..admin.settings import AdminSettings, HealthCheckSettings
from ..dataplane.settings import (
    DataplaneThreads,
    IdentitySettings,
    Limits,
    ListenerTLS,
    Route,
    UpstreamTLS,
)
from ..observe.settings import LogSettings, RecordSettings, TelemetrySettings
from ..sections import (
    SECRET,
    FieldError,
    ListenAddress,
    Section,
    UpstreamURL,
    parse_host_port,
    read_setting_file,
)
from ..state.settings import StateSettings

ENV_PREFIX = "LOOPWATCH_"
# Names the file rather than a setting; the CLI reads it.
ENV_CONFIG = "LOOPWATCH_CONFIG"
# The admin API's URL for the operator commands (`loopwatch clients`, …), not a setting.
ENV_ADMIN_URL = "LOOPWATCH_ADMIN_URL"
ENV_SEPARATOR = "__"
REDACTED = "***"

Loc = tuple[str | int, ...]


class ConfigError(Exception):
    """One or more configuration mistakes, each a self-contained line."""

    def __init__(self, errors: str | Sequence[str]) -> None:
        self.errors: list[str] = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("\n".join(self.errors))


# --- value types -----------------------------------------------------------


# --- models ----------------------------------------------------------------


def _binds_overlap(a: str, b: str) -> bool:
    """Whether two listening sockets on these hosts (one port) clash: the same
    address in any spelling (`[::0]`, `[::ffff:127.0.0.1]`), or one of them all
    addresses: `::` both families (loopwatch binds it dual stack), `0.0.0.0`
    IPv4's (and a name, which may be one). `0.0.0.0` and `::1` do not."""

    def address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | str:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            return text
        mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
        return mapped or ip

    x, y = address(a), address(b)
    if x == y or ipaddress.IPv6Address("::") in (x, y):
        return True
    for wildcard, other in ((x, y), (y, x)):
        if wildcard == ipaddress.IPv4Address("0.0.0.0"):
            return not isinstance(other, ipaddress.IPv6Address)
    return False


class Settings(Section):
    listen: ListenAddress = "0.0.0.0:8080"
    upstream: UpstreamURL | None = None
    routes: tuple[Route, ...] = ()
    tls: ListenerTLS = ListenerTLS()
    upstream_tls: UpstreamTLS = UpstreamTLS()
    limits: Limits = Limits()
    admin: AdminSettings = AdminSettings()
    logging: LogSettings = LogSettings()
    identity: IdentitySettings = IdentitySettings()
    detection: DetectionSettings = DetectionSettings()
    policy: PolicySettings = PolicySettings()
    breakers: BreakerSettings = BreakerSettings()
    state: StateSettings = StateSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    record: RecordSettings = RecordSettings()
    health_check: HealthCheckSettings = HealthCheckSettings()
    # The data plane that moves the bytes: the compiled one (Rust on tokio,
    # proxy/dataplane/), the only one since the asyncio plane was removed
    # (issue 16). The key stays so that configs naming it keep loading.
    dataplane: Literal["native"] = "native"
    # Its worker threads (tokio's): "auto", one per core the process may run
    # on (CPU affinity and cgroup quota), or a count; read at start only.
    dataplane_threads: DataplaneThreads = "auto"
    # Look at the config file and the files it names this often, and reload
    # when one changed (proxy/app/watch.py); None: on SIGHUP and the API only.
    # At least 100 ms: each look stats every watched file, and a look a microsecond
    # (or `1ms`, meant as `1m`) kept most of a core busy (the extremes probe).
    reload_watch: Duration | None = None

    @field_validator("reload_watch")
    @classmethod
    def _watch_not_too_often(cls, value: float | None) -> float | None:
        if value is not None and value < 0.1:
            raise ValueError(
                f"expected 100ms or more (each look reads every watched file's status), got {format_duration(value)}"
            )
        return value

    @field_validator("dataplane", mode="before")
    @classmethod
    def _no_python_plane(cls, value: object) -> object:
        if value == "python":
            raise ValueError("the asyncio data plane was removed (issue 16): native is the only one")
        return value

    # A field validator rather than a model validator: it runs even when other
    # sections are invalid, so this error is reported together with theirs.
    @field_validator("routes")
    @classmethod
    def _check_routes(cls, routes: tuple[Route, ...], info: ValidationInfo) -> tuple[Route, ...]:
        if routes and info.data.get("upstream") is not None:
            raise ValueError("cannot be combined with `upstream` (set one or the other)")
        first: dict[str, int] = {}
        for i, route in enumerate(routes):
            if route.path_prefix in first:
                raise FieldError(
                    (i, "path_prefix"),
                    f"{route.path_prefix!r} is already the prefix of routes[{first[route.path_prefix]}]",
                )
            first[route.path_prefix] = i
        return routes

    @field_validator("admin")
    @classmethod
    def _own_port(cls, admin: AdminSettings, info: ValidationInfo) -> AdminSettings:
        """The admin port and the proxy's cannot be one (both bound at start:
        "address already in use", naming neither key)."""
        listen = info.data.get("listen")
        if listen is None:
            return admin
        proxy, own = parse_host_port(listen), parse_host_port(admin.listen)
        if own.port and own.port == proxy.port and _binds_overlap(own.host, proxy.host):
            raise FieldError(("listen",), f"{admin.listen!r} is the proxy's own address (listen: {listen!r})")
        return admin

    def effective_routes(self) -> tuple[Route, ...]:
        """The routes to match, longest path_prefix first (so the longest prefix wins)."""
        routes = self.routes
        if self.upstream is not None:
            routes = (Route(path_prefix="/", upstream=self.upstream),)
        return tuple(sorted(routes, key=lambda r: len(r.path_prefix), reverse=True))

    def require_upstream(self) -> None:
        """Raise ConfigError unless some upstream is set (`run` needs one; check-config not)."""
        if self.upstream is None and not self.routes:
            raise ConfigError(
                "upstream: required: set `upstream` or `routes` (or LOOPWATCH_UPSTREAM / --upstream)"
            )


# --- loading ---------------------------------------------------------------


def load_settings(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    only: str | None = None,
) -> Settings:
    """Defaults < YAML file at `path` < `env` (os.environ when None) < `overrides`.

    `overrides` maps dotted key paths ("upstream", "limits.max_connections") to
    values; a None value means "not given" and is skipped. `only` names the one
    top-level section of the file to read (the others stay at their defaults):
    the operator commands need `admin:`, whatever is wrong elsewhere.
    """
    data = {} if path is None else _read_yaml(path)
    if only is not None:
        data = {only: data[only]} if only in data else {}
    errors: list[str] = []
    origins: dict[Loc, str] = {}
    env_layer = _env_layer(os.environ if env is None else env, errors)
    override_layer = [
        (tuple(key.split(".")), value, "the command line")
        for key, value in (overrides or {}).items()
        if value is not None
    ]
    for layer in (env_layer, override_layer):
        _apply(data, layer, origins)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        errors.extend(_format_errors(exc, origins))
    if errors:
        raise ConfigError(errors)
    return settings


Layer = list[tuple[tuple[str, ...], Any, str]]


def _env_layer(env: Mapping[str, str], errors: list[str]) -> Layer:
    layer: Layer = []
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or name in (ENV_CONFIG, ENV_ADMIN_URL):
            continue
        if _is_service_link(name, env[name]):
            continue  # Kubernetes put it there, not the operator (ignored_service_links)
        parts = _env_parts(name)
        if not all(parts):
            errors.append(f"{name}: expected LOOPWATCH_<KEY> or LOOPWATCH_<SECTION>__<KEY>")
            continue
        raw = env[name]
        if not raw.strip():
            # As YAML an empty value is null, which for many keys means "off" (the
            # idle timeout, per-client and per-address caps): a template's `VAR=`
            # with nothing after it would switch protections off in silence.
            errors.append(f"{name}: empty; unset it for the default, or write null to mean none")
            continue
        try:
            layer.append((parts, _env_value(_type_at(parts), raw), name))
        except ValueError as exc:  # a duplicate key, an integer no setting takes
            errors.append(f"{name}: {exc}")
    return layer


def _env_value(tp: Any, raw: str) -> Any:
    """A variable's value for a setting of type `tp`: YAML, except where the
    setting takes text. As YAML a token "123456" would turn into a number, "null"
    or "~" into no token at all, an audience "2024" into a number and a key file
    "off" into false. A setting that takes text or something else (an audience or a
    list of them; a count or a share) still reads "[a, b]" as a list and "null" as
    none."""
    tp = _strip_optional(tp)
    if tp in (str, SecretStr) or (isinstance(tp, type) and issubclass(tp, PurePath)):
        return raw
    value = _yaml_scalar(raw)
    takes_text = str in typing.get_args(tp)
    if takes_text and value is not None and not isinstance(value, list | dict):
        return raw
    return value


def _env_parts(name: str) -> tuple[str, ...]:
    """LOOPWATCH_LIMITS__MAX_CONNECTIONS -> ("limits", "max_connections")."""
    return tuple(name[len(ENV_PREFIX) :].lower().split(ENV_SEPARATOR))


# Kubernetes' service links. For every Service in the pod's namespace the kubelet
# sets, with <SVC> the Service's name upper-cased and "-" turned into "_" (so a
# Service named loopwatch or loopwatch-admin lands in our prefix):
#   <SVC>_SERVICE_HOST=10.0.0.11            <SVC>_SERVICE_PORT=8080
#   <SVC>_SERVICE_PORT_<PORT NAME>=8080     <SVC>_PORT=tcp://10.0.0.11:8080
#   <SVC>_PORT_8080_TCP=tcp://10.0.0.11:8080
#   <SVC>_PORT_8080_TCP_PROTO=tcp  <SVC>_PORT_8080_TCP_PORT=8080  <SVC>_PORT_8080_TCP_ADDR=10.0.0.11
# A variable is taken for one only when its name AND its value have that shape
# and it names no setting, so a typo such as LOOPWATCH_ADMIN_PORT=9900 stays an error.
# Names are upper case with single underscores (a Service or port name has no
# "--"), so nothing spelt with the loader's own "__" is ever taken for one.
_NAME = r"[A-Z0-9]+(?:_[A-Z0-9]+)*"
_SVC = r"LOOPWATCH(?:_" + _NAME + ")?"
_LINK = r"(?P<proto>tcp|udp|sctp)://(?P<host>\[[0-9A-Fa-f:.]+\]|[0-9A-Fa-f:.]+):(?P<port>[0-9]{1,5})"
_PORT_PROTO = r"_PORT_(?P<port>[0-9]{1,5})_(?P<proto>TCP|UDP|SCTP)"


def _ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value.removeprefix("[").removesuffix("]"))
    except ValueError:
        return False
    return True


def _port(value: str) -> bool:
    return value.isascii() and value.isdigit() and 0 < int(value) <= 65535


def _link(value: str, proto: str | None = None, port: str | None = None) -> bool:
    m = re.fullmatch(_LINK, value)
    return bool(
        m
        and _ip(m["host"])
        and _port(m["port"])
        and (proto is None or m["proto"] == proto.lower())
        and (port is None or m["port"] == port)
    )


class ServiceLinkShape(NamedTuple):
    name: re.Pattern[str]
    value_fits: Callable[[re.Match[str], str], bool]


SERVICE_LINK_SHAPES: tuple[ServiceLinkShape, ...] = (
    ServiceLinkShape(re.compile(_SVC + r"_SERVICE_HOST"), lambda m, v: _ip(v)),
    ServiceLinkShape(re.compile(_SVC + r"_SERVICE_PORT(?:_" + _NAME + ")?"), lambda m, v: _port(v)),
    ServiceLinkShape(re.compile(_SVC + r"_PORT"), lambda m, v: _link(v)),
    ServiceLinkShape(re.compile(_SVC + _PORT_PROTO), lambda m, v: _link(v, m["proto"], m["port"])),
    ServiceLinkShape(re.compile(_SVC + _PORT_PROTO + "_PROTO"), lambda m, v: v == m["proto"].lower()),
    ServiceLinkShape(re.compile(_SVC + _PORT_PROTO + "_PORT"), lambda m, v: v == m["port"]),
    ServiceLinkShape(re.compile(_SVC + _PORT_PROTO + "_ADDR"), lambda m, v: _ip(v)),
)


def service_link_name(name: str) -> bool:
    """Whether `name` has the shape of a Kubernetes service-link variable."""
    return any(shape.name.fullmatch(name) for shape in SERVICE_LINK_SHAPES)


def _is_service_link(name: str, value: str) -> bool:
    parts = _env_parts(name)
    if all(parts) and _type_at(parts) is not None:
        return False  # a real setting is never swallowed, whatever its name looks like
    for shape in SERVICE_LINK_SHAPES:
        m = shape.name.fullmatch(name)
        if m and shape.value_fits(m, value):
            return True
    return False


def ignored_service_links(env: Mapping[str, str]) -> list[str]:
    """The LOOPWATCH_* variables load_settings ignores because Kubernetes set them
    (a Service named loopwatch or loopwatch-…), sorted; the callers warn once."""
    return sorted(
        name for name, value in env.items() if name.startswith(ENV_PREFIX) and _is_service_link(name, value)
    )


def _yaml_scalar(raw: str) -> Any:
    """A variable's text as YAML, read as a file is: duplicate keys and
    integers no setting takes refused, a list or mapping that is no YAML said
    so (ValueError saying why); other text that is not YAML (a tag-like
    `!urn:…`, a date that is none) is the text."""
    try:
        return yaml.load(raw, Loader=_Loader)  # noqa: S506  - a SafeLoader, with the file's checks
    except RefusedValue as exc:
        raise ValueError(exc.problem) from None
    except yaml.MarkedYAMLError as exc:
        if raw.lstrip().startswith(("[", "{")):
            raise ValueError(f"invalid YAML: {', '.join(p for p in (exc.context, exc.problem) if p)}") from None
        return raw
    except (yaml.YAMLError, ValueError):
        return raw


def _apply(data: dict[str, Any], layer: Layer, origins: dict[Loc, str]) -> None:
    touched: set[str] = set()
    for parts, value, label in layer:
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        leaf, value = parts[-1], copy.deepcopy(value)
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            _deep_merge(node[leaf], value)
        else:
            node[leaf] = value
        for loc in [loc for loc in origins if loc[: len(parts)] == parts]:
            del origins[loc]
        origins[parts] = label
        touched.add(parts[0])
    # `upstream` and `routes` are two spellings of one setting, so precedence
    # applies to the pair: `--upstream URL` replaces the file's routes instead
    # of conflicting with them. One source setting both is still an error.
    for mine, other in (("upstream", "routes"), ("routes", "upstream")):
        if mine in touched and other not in touched:
            data.pop(other, None)


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value


class RefusedValue(yaml.constructor.ConstructorError):
    """YAML that reads, refused as a setting's value: a duplicate key, an
    integer no setting takes."""


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """SafeLoader that refuses duplicate keys, which PyYAML would silently collapse."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[str, int] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise RefusedValue(
                        None,
                        None,
                        f"duplicate key {key_node.value!r} (first on line {seen[key_node.value]})",
                        key_node.start_mark,
                    )
                seen[key_node.value] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        # Python refuses to read an integer of more than 4 300 digits with a
        # ValueError no YAML error handler expects (a traceback, a reload
        # answered 500 and not counted): no setting takes one of 100.
        digits = sum(c.isdigit() for c in node.value)
        if digits > MAX_INT_DIGITS:
            raise RefusedValue(None, None, f"an integer of {digits} digits: no setting takes one that large", node.start_mark)
        value: int = super().construct_yaml_int(node)
        return value


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
# The most digits an integer in a config file may have (MAX_SIZE, 1 TiB, has 13;
# a mistake of a few more is told apart by its setting's own bound).
MAX_INT_DIGITS = 99


def _read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    name = os.fspath(path)
    try:
        # A config file is a few KB (the reference config with every key is
        # under 30 KB); more is not a config (a 60 MB file took 20 s to parse,
        # inside the running proxy on a reload).
        raw = read_setting_file(name)
        text = raw.decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read the config file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{name}: cannot read the config file: not UTF-8 text") from None
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:  # empty, or only comments: all defaults
            return {}
        if not isinstance(node, yaml.MappingNode):
            got = "a list" if isinstance(node, yaml.SequenceNode) else repr(node.value)
            raise ConfigError(
                f"{name}:{node.start_mark.line + 1}: expected a mapping of settings "
                f"(key: value lines) at the top level, got {got}"
            )
        data: dict[str, Any] = loader.construct_document(node)
        return data
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
        reason = ", ".join(part for part in (exc.context, exc.problem) if part)
        raise ConfigError(f"{where}: invalid YAML: {reason}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{name}: invalid YAML: {exc}") from None
    finally:
        loader.dispose()


# --- error messages --------------------------------------------------------

_EXPECTED = {
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "string_type": "expected a string",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "dict_type": "expected a mapping",
    "list_type": "expected a list",
    "tuple_type": "expected a list",
    "greater_than": "expected a value greater than {gt}",
    "greater_than_equal": "expected a value of at least {ge}",
    "less_than": "expected a value less than {lt}",
    "less_than_equal": "expected a value of at most {le}",
    "literal_error": "expected one of {expected}",
}


def _format_errors(exc: ValidationError, origins: Mapping[Loc, str]) -> list[str]:
    lines: list[str] = []
    for error in exc.errors(include_url=False):
        loc: Loc = tuple(error["loc"])
        ctx = error.get("ctx") or {}
        kind = error["type"]
        cause = ctx.get("error")
        if isinstance(cause, FieldError):
            loc += cause.loc
        if kind == "missing":
            message = "required"
        elif kind == "extra_forbidden":
            message = "unknown key" + _hint(loc)
        elif kind in ("value_error", "assertion_error") and cause is not None:
            message = str(cause)  # our validators and detectors.units say "expected …, got …"
        else:
            expected = _EXPECTED.get(kind, "").format(**ctx) or _fallback(error["msg"])
            message = f"{expected}, got {_show(error['input'])}"
        line = f"{_dotted(loc)}: {message}" if loc else message
        source = _origin(loc, origins, unknown=kind == "extra_forbidden")
        if source:
            line += f" (from {source})"
        if line not in lines:
            lines.append(line)
    return lines


def _fallback(msg: str) -> str:
    if msg.startswith("Input should be "):
        return "expected " + msg.removeprefix("Input should be ")
    return msg[:1].lower() + msg[1:]


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _origin(loc: Loc, origins: Mapping[Loc, str], unknown: bool = False) -> str | None:
    """Where the setting at `loc` came from: the variable that set it or a
    section above it. An `unknown` key may have been made by variables that set
    something below it: a misspelt section (`LOOPWATCH_DETECTON__X`) is an
    error about `detecton` itself."""
    best: Loc | None = None
    for key in origins:
        if loc[: len(key)] == key and (best is None or len(key) > len(best)):
            best = key
    if best is not None:
        return origins[best]
    below = sorted({source for key, source in origins.items() if key[: len(loc)] == loc}) if unknown else []
    return ", ".join(below) or None


def _hint(loc: Loc) -> str:
    parent = _strip_optional(_type_at(loc[:-1]))
    if not (isinstance(parent, type) and issubclass(parent, BaseModel)):
        return ""
    names = list(parent.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), names, n=1)
    if close:
        return f"; did you mean `{close[0]}`?"
    return "; known keys: " + ", ".join(names)


def _strip_optional(tp: Any) -> Any:
    """The type under Annotated[...] and `X | None` wrappers."""
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _type_at(loc: Sequence[str | int]) -> Any:
    """The annotation of the setting at `loc` under Settings, or None if there is none."""
    tp: Any = Settings
    for part in loc:
        tp = _strip_optional(tp)
        origin = typing.get_origin(tp)
        if isinstance(part, int) and origin in (tuple, list):
            tp = typing.get_args(tp)[0]
        elif isinstance(part, str) and origin is dict:
            tp = typing.get_args(tp)[1]
        elif isinstance(part, str) and isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(part)
            if field is None:
                return None
            tp = field.annotation
        else:
            return None
    return tp


# --- dumping and the check-config command ----------------------------------


def dump_settings(settings: Settings, *, redact: bool = True) -> dict[str, Any]:
    """Plain JSON/YAML-able data that load_settings reads back; secrets "***" if redact.

    Secrets are fields marked SECRET (OptionalSecret) and pydantic SecretStr values.
    """
    data = settings.model_dump(mode="json")
    _secrets(settings, data, redact)
    return data


def _secrets(model: BaseModel, data: dict[str, Any], redact: bool) -> None:
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            # pydantic always dumps "**********"; without redaction the dump must load back.
            data[name] = REDACTED if redact else value.get_secret_value()
        elif any(m is SECRET for m in field.metadata):
            if redact:
                data[name] = REDACTED
        elif isinstance(value, BaseModel):
            _secrets(value, data[name], redact)
        elif isinstance(value, tuple | list):
            for item, item_data in zip(value, data[name], strict=True):
                if isinstance(item, BaseModel):
                    _secrets(item, item_data, redact)
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, BaseModel):
                    _secrets(item, data[name][str(key)], redact)
